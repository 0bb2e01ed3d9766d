//! `moxin-train`: the command-line front end. Glue only: configuration and job logic live
//! in `moxin-coordinator`, training in `moxin-worker`, data in `moxin-data`.
#![forbid(unsafe_code)]

mod commands;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

/// Train open Mistral-style LLMs end to end, on one laptop or a GPU cluster.
#[derive(Parser)]
#[command(name = "moxin-train", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Only check the command line (flags, values, required arguments), print `ok: <command>`
    /// and exit 0; nothing is read, started or written (deploy/kubernetes is tested with it).
    #[arg(long, global = true)]
    check_args: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model in this process from a job config (resumes if the run dir has checkpoints).
    Train(TrainArgs),
    /// Score a checkpoint, as JSON: mean loss on prepared data (--data), or accuracy on
    /// prompts with answers (--prompts).
    Eval(EvalArgs),
    /// Prepare training data.
    #[command(subcommand)]
    Data(DataCommand),
    /// Parameter count and memory of a model preset (allocates nothing).
    ModelInfo(ModelInfoArgs),
    /// Per-GPU memory of training a model (parameters, gradients, optimizer, activations).
    Plan(PlanArgs),
    /// Continue a text prompt with a checkpoint.
    Generate(GenerateArgs),
    /// Write a checkpoint as a Hugging Face MistralForCausalLM folder.
    ExportHf(ExportHfArgs),
    /// Import a Hugging Face Mistral or Llama folder as a checkpoint (for `model.init_from`).
    ImportHf(ImportHfArgs),
    /// Logits of a checkpoint's model for token rows (fp32, CPU; for comparing implementations).
    Logits(LogitsArgs),
    /// Run a distributed job on this machine: a coordinator plus N worker processes.
    Launch(LaunchArgs),
    /// Serve a job's coordinator (cluster mode); workers join with `moxin-train worker`.
    Coordinator(CoordinatorArgs),
    /// Join a job as a worker (cluster mode).
    Worker(WorkerArgs),
    /// Change the worker count of a running job (`launch` starts or releases processes).
    Scale(ScaleArgs),
    /// Ask a running job to checkpoint at its next step boundary (e.g. before maintenance).
    Checkpoint(CheckpointArgs),
    /// A job at a glance: phase, step, loss, throughput, ETA and every worker (live).
    Status(StatusArgs),
    /// What this machine can run: libtorch, CUDA devices, NCCL, the backend a worker would use.
    Doctor(DoctorArgs),
    /// Measurements used by bench/*.sh.
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// `plan --recompute`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum RecomputeArg {
    None,
    Elementwise,
    Blocks,
}

#[derive(Args)]
struct DoctorArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// All-reduce bus bandwidth of the CPU TCP ring on loopback.
    AllReduce {
        #[arg(long, default_value_t = 2)]
        ranks: usize,
        #[arg(long, default_value_t = 64)]
        mib: usize,
        #[arg(long, default_value_t = 7)]
        iters: usize,
        /// TCP only (the path between hosts), no same-host shared memory.
        #[arg(long)]
        tcp: bool,
    },
    /// One rank of `bench all-reduce` (started by it).
    #[command(hide = true)]
    AllReduceRank {
        #[arg(long)]
        rank: usize,
        #[arg(long)]
        peers: String,
        #[arg(long)]
        mib: usize,
        #[arg(long)]
        iters: usize,
    },
    /// Fused CUDA kernels against their ATen equivalents: errors and timings (needs a GPU).
    Kernels {
        #[arg(long, default_value_t = 0)]
        device: usize,
    },
    /// Compile the fused CUDA kernels to PTX (needs only the NVRTC library, no GPU).
    CompileKernels {
        /// Compute capability, e.g. 90 for Hopper.
        #[arg(long, default_value_t = 90)]
        arch: u32,
    },
    /// Writing rank 0's share of a checkpoint (model + optimizer partition, hashed while
    /// written) against the usual serialise, fsync, read back and hash, in the same run.
    CheckpointWrite {
        /// Directory to write into (on the disk checkpoints go to).
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long, default_value_t = 2048)]
        mib: usize,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Optimizer partition files of at least this many MiB (as `checkpoint.optimizer_file_mib`).
        #[arg(long, default_value_t = 1024)]
        optimizer_file_mib: u64,
    },
    /// Batched KV-cached sampling (what GRPO rollouts run) on a checkpoint: tokens/s.
    Rollout {
        /// Checkpoint or run directory.
        #[arg(long)]
        checkpoint: std::path::PathBuf,
        /// JSON file of token-id rows (prompts of any lengths).
        #[arg(long)]
        prompts: std::path::PathBuf,
        /// New tokens per row (no stop token: every row makes exactly this many).
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// CPU threads (0 = libtorch's default).
        #[arg(long, default_value_t = 0)]
        threads: i32,
        /// Where the model runs: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Weights' dtype: fp32, bf16 or fp16.
        #[arg(long, default_value = "fp32")]
        dtype: String,
    },
    /// Every NCCL collective on a world of one (needs a GPU and NCCL).
    Nccl {
        #[arg(long, default_value_t = 0)]
        device: usize,
    },
    /// Simulated workers heartbeating at 1 Hz against a running coordinator.
    Heartbeats {
        #[arg(long)]
        coordinator: String,
        #[arg(long, default_value_t = 1000)]
        workers: u32,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

#[derive(Args)]
struct LaunchArgs {
    /// Job configuration (TOML).
    config: PathBuf,
    /// Worker processes to start.
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Replace a worker process that dies at most this many times in all (the group
    /// re-forms and continues from the newest checkpoint); then the job fails.
    #[arg(long, default_value_t = 3)]
    max_restarts: u32,
    /// Worker i serves Prometheus metrics on 127.0.0.1:(PORT + i) (the coordinator's
    /// endpoint is cluster.metrics_listen).
    #[arg(long, value_name = "PORT")]
    worker_metrics_port: Option<u16>,
    /// Run directory [default: runs/<job name>].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override a config value (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Args)]
struct CoordinatorArgs {
    /// Job configuration (TOML).
    config: PathBuf,
    /// gRPC address to bind [default: cluster.listen].
    #[arg(long)]
    listen: Option<String>,
    /// Run directory [default: runs/<job name>].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override a config value (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    #[command(flatten)]
    security: ServerSecurityArgs,
}

/// What the coordinator requires of whoever calls it.
#[derive(Args)]
struct ServerSecurityArgs {
    /// Require this join token (a file holding it) on every RPC [default: the MOXIN_TOKEN
    /// environment variable, if set].
    #[arg(long, env = "MOXIN_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Serve TLS with this certificate (PEM; with --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The TLS certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: require client certificates signed by this CA (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
}

/// What a client presents to the coordinator.
#[derive(Args)]
pub(crate) struct ClientSecurityArgs {
    /// The job's join token (a file holding it) [default: the MOXIN_TOKEN environment
    /// variable; for a run directory target, the token `launch` keeps in it].
    #[arg(long, env = "MOXIN_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Verify the coordinator's certificate with this CA (PEM); the URL is then https://.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Mutual TLS: this client's certificate (PEM; with --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(Args)]
struct WorkerArgs {
    /// Coordinator URL, e.g. http://10.0.0.1:50051 (https:// with TLS).
    #[arg(long)]
    coordinator: String,
    #[command(flatten)]
    security: ClientSecurityArgs,
    /// Where this worker would like to rank: groups order hinted workers by it (then the
    /// others by arrival), and scaling down releases the highest [default: MOXIN_RANK_HINT,
    /// else a Kubernetes Indexed Job's JOB_COMPLETION_INDEX, else Slurm's SLURM_PROCID]
    #[arg(long, env = "MOXIN_RANK_HINT")]
    rank_hint: Option<u32>,
    /// Address for collective connections from peers (host must be reachable by them).
    #[arg(long, default_value = "127.0.0.1:0")]
    collective_listen: String,
    /// Serve Prometheus metrics on this address.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Train on this device (cpu, cuda, cuda:N) [default: the job's runtime.device, the GPU
    /// chosen by LOCAL_RANK or SLURM_LOCALID]
    #[arg(long)]
    device: Option<String>,
    /// Seconds to keep trying to reach the coordinator, at start and after losing it (a
    /// restarted coordinator continues the job; the worker registers again).
    #[arg(long, default_value_t = 60)]
    connect_timeout: u64,
}

#[derive(Args)]
struct ScaleArgs {
    /// The job's run directory (its coordinator's URL is in coordinator/state.json) or the
    /// coordinator's URL, e.g. http://10.0.0.1:50051.
    target: String,
    /// Workers to train with from now on.
    #[arg(long)]
    workers: u32,
    #[command(flatten)]
    security: ClientSecurityArgs,
}

#[derive(Args)]
struct StatusArgs {
    /// The job's run directory or its coordinator's URL (as for `scale`); a run directory
    /// of a job that is not running shows what it recorded last.
    target: String,
    /// Print one JSON object and exit.
    #[arg(long)]
    json: bool,
    /// Print the table once instead of refreshing it in place.
    #[arg(long)]
    once: bool,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 2.0)]
    interval: f64,
    #[command(flatten)]
    security: ClientSecurityArgs,
}

#[derive(Args)]
struct CheckpointArgs {
    /// The job's run directory or its coordinator's URL (as for `scale`).
    target: String,
    #[command(flatten)]
    security: ClientSecurityArgs,
}

#[derive(Args)]
struct TrainArgs {
    /// Job configuration (TOML), e.g. configs/tiny-pretrain.toml.
    config: PathBuf,
    /// Run directory [default: runs/<job name>].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override a config value, e.g. --set train.steps=100 (repeatable; wins over the file
    /// and over MOXIN__SECTION__KEY environment variables).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Stop after this many optimizer steps in total (writing a checkpoint unless
    /// checkpoints are off), even if train.steps is larger; running the command again
    /// resumes.
    #[arg(long, value_name = "STEPS")]
    stop_after: Option<u64>,
    /// Train on this device (cpu, cuda, cuda:N) [default: runtime.device; the GPU chosen by
    /// LOCAL_RANK or SLURM_LOCALID]
    #[arg(long)]
    device: Option<String>,
    /// Record every GPU kernel, copy and fill of the run's last N steps (through CUPTI) and
    /// write per-kernel times and the device's idle time per step to
    /// <run dir>/kernel_trace.json
    #[arg(long, value_name = "N")]
    trace_kernels: Option<u64>,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["data", "prompts"])))]
struct EvalArgs {
    /// Checkpoint directory (runs/<job>/checkpoints/step-NNNNNNNN) or a run directory (its newest).
    checkpoint: PathBuf,
    /// Prepared data directory: report the mean next-token loss on it.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Batches to score (samples in order from the start of the data).
    #[arg(long, default_value_t = 16, requires = "data")]
    batches: u64,
    /// Samples per batch.
    #[arg(long, default_value_t = 8, requires = "data")]
    batch_size: u32,
    /// Prompts with reference answers (`{"prompt", "answer"}` JSONL): report the fraction the
    /// math-answer verifier accepts, as the pipeline scores held-out sets.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Completions per prompt (above 1 needs --temperature > 0; the report adds pass@samples).
    #[arg(long, default_value_t = 1, requires = "prompts")]
    samples: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0, requires = "prompts", allow_negative_numbers = true)]
    temperature: f64,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0, requires = "prompts", allow_negative_numbers = true)]
    top_p: f64,
    /// Tokens generated at most per completion.
    #[arg(long, default_value_t = 64, requires = "prompts")]
    max_new_tokens: usize,
    /// Sampling seed.
    #[arg(long, default_value_t = 0, requires = "prompts")]
    seed: u64,
    /// Completions to print with the report, to read what the model answers.
    #[arg(long, default_value_t = 0, requires = "prompts")]
    show: usize,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Tokenize .txt / .jsonl files into token shards with a manifest.
    Prepare(PrepareArgs),
    /// Tokenize JSONL conversations ({"messages": [{"role", "content"}]}) for SFT: chat
    /// template, loss only on the assistant's turns.
    PrepareSft(PrepareSftArgs),
}

#[derive(Args)]
struct PrepareSftArgs {
    /// JSONL files of conversations.
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// The model's Hugging Face tokenizer.json (e.g. <checkpoint>/tokenizer.json).
    #[arg(long)]
    tokenizer: PathBuf,
    /// Chat template: "moxin" (<|system|>, <|user|>, <|assistant|> turns) or a JSON file
    /// with name, system, user, assistant and separator strings.
    #[arg(long, default_value = "moxin")]
    template: String,
    /// Longest conversation, in tokens.
    #[arg(long, default_value_t = 4096)]
    max_tokens: u32,
    /// Longer conversations: "truncate" (keep the start) or "drop".
    #[arg(long, default_value = "truncate", value_parser = ["truncate", "drop"])]
    overlong: String,
    /// Replace an existing prepared directory.
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("tok").required(true).args(["tokenizer", "train_tokenizer"]))]
struct PrepareArgs {
    /// Input files or directories (searched recursively for .txt and .jsonl).
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Use this Hugging Face tokenizer.json.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Train a byte-level BPE tokenizer with this vocabulary size on the inputs.
    #[arg(long, value_name = "VOCAB_SIZE")]
    train_tokenizer: Option<u32>,
    /// Field of each .jsonl record holding the text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// Tokens per shard file.
    #[arg(long, default_value_t = 100_000_000)]
    shard_tokens: u64,
    /// Replace an existing prepared directory.
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args)]
struct ModelInfoArgs {
    /// Preset name (tiny, bench-small, gpu-1b, moxin-7b), a model TOML file, or a
    /// checkpoint or run directory.
    preset: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PlanArgs {
    /// Preset name (tiny, bench-small, gpu-1b, moxin-7b), a model TOML file, or a
    /// checkpoint or run directory (e.g. a model imported with import-hf).
    #[arg(long)]
    model: String,
    /// GPUs the job trains on (ZeRO-1 splits the optimizer state over them).
    #[arg(long, default_value_t = 1)]
    gpus: u32,
    /// Tokens per sample.
    #[arg(long)]
    seq: u32,
    /// Samples per forward/backward on one GPU.
    #[arg(long)]
    micro_batch: u32,
    /// What backward recomputes instead of keeping: `elementwise` (norm and SwiGLU
    /// outputs; the GPU default), `blocks` (whole blocks; a bare `--recompute`) or `none`.
    #[arg(long, value_enum, num_args = 0..=1, default_value = "elementwise", default_missing_value = "blocks")]
    recompute: RecomputeArg,
    /// Accumulate and reduce gradients in bf16 instead of fp32.
    #[arg(long)]
    bf16_grads: bool,
    /// Memory of one GPU in GiB (an 80 GB H100 has 79.6).
    #[arg(long, default_value_t = 79.6)]
    gpu_memory_gib: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ExportHfArgs {
    /// Checkpoint directory (checkpoints/step-NNNNNNNN), or a run directory (its newest).
    checkpoint: PathBuf,
    /// Folder to write (new or empty).
    out: PathBuf,
    /// Weight dtype: float32, bfloat16 or float16 (default: as stored in the checkpoint).
    #[arg(long)]
    dtype: Option<String>,
    /// Largest weight file, in GB; bigger models are sharded with an index.
    #[arg(long, default_value_t = 5.0, allow_negative_numbers = true)]
    max_shard_gb: f64,
    /// Chat template for transformers' `apply_chat_template` (tokenizer_config.json):
    /// "auto" (the one the checkpoint was fine-tuned with, which SFT and GRPO checkpoints
    /// carry, else "moxin"), "moxin" (what SFT, distillation and GRPO use by default), a template JSON
    /// file as `data prepare-sft --template` takes, or "none".
    #[arg(long, default_value = "auto")]
    chat_template: String,
}

#[derive(Args)]
struct ImportHfArgs {
    /// Hugging Face model folder (config.json, model.safetensors or a sharded index).
    dir: PathBuf,
    /// Checkpoint directory to write (new or empty).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct LogitsArgs {
    /// Checkpoint directory, or a run directory (its newest).
    checkpoint: PathBuf,
    /// JSON file of token-id rows of one length, e.g. [[1, 5, 9], [1, 7, 3]].
    #[arg(long)]
    tokens: PathBuf,
    /// safetensors file to write (`logits`: fp32 [rows, length, vocab]).
    #[arg(long)]
    out: PathBuf,
    /// Replace `--out` if it exists (else an existing file is refused).
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args)]
struct GenerateArgs {
    /// Checkpoint directory, or a run directory (its newest checkpoint).
    checkpoint: PathBuf,
    /// Prompt text; repeat for several prompts, continued together in one batch.
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    temperature: f64,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true)]
    top_p: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() {
    init_logging();
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if cli.check_args {
        println!("ok: {}", matches.subcommand_name().unwrap_or_default());
        return;
    }
    if uses_cuda(&cli.command) {
        restart_with_cuda_libraries();
    }
    moxin_worker::device::keep_freed_host_memory();
    match run(cli) {
        Ok(0) => {}
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {}", moxin_proto::security::chain(e.as_ref()));
            std::process::exit(1);
        }
    }
}

/// Runs a command; the exit code is 0, or [`moxin_worker::driver::STOPPED_EXIT_CODE`] for a
/// run stopped early on request (by a signal, Ctrl-C or its coordinator) after checkpointing.
fn run(cli: Cli) -> Result<i32> {
    let code = match cli.command {
        Command::Train(a) if moxin_coordinator::pipeline::is_pipeline(&a.config) => {
            return commands::pipeline::run(&a.config, a.out.as_deref(), &a.set, commands::pipeline::Mode::Train)
        }
        Command::Train(a) => {
            return Ok(commands::train(
                &a.config,
                commands::TrainOptions {
                    out: a.out.as_deref(),
                    overrides: &a.set,
                    stop_after: a.stop_after,
                    device: a.device.as_deref(),
                    trace_kernels: a.trace_kernels,
                },
            )?
            .exit_code())
        }
        Command::Launch(a) if moxin_coordinator::pipeline::is_pipeline(&a.config) => {
            let mode = commands::pipeline::Mode::Launch(commands::cluster::LaunchOptions {
                workers: a.workers,
                max_restarts: a.max_restarts,
                worker_metrics_port: a.worker_metrics_port,
            });
            return commands::pipeline::run(&a.config, a.out.as_deref(), &a.set, mode);
        }
        Command::Launch(a) => {
            let options = commands::cluster::LaunchOptions {
                workers: a.workers,
                max_restarts: a.max_restarts,
                worker_metrics_port: a.worker_metrics_port,
            };
            return commands::cluster::launch(&a.config, options, a.out.as_deref(), &a.set);
        }
        Command::Coordinator(a) => {
            let security = commands::cluster::server_security(
                a.security.token_file.as_deref(),
                a.security.tls_cert.as_deref(),
                a.security.tls_key.as_deref(),
                a.security.tls_client_ca.as_deref(),
            )?;
            return commands::cluster::coordinator(&a.config, a.listen.as_deref(), a.out.as_deref(), &a.set, &security);
        }
        Command::Worker(a) => {
            let security = a.security.load(None)?;
            return commands::cluster::worker(
                a.coordinator,
                security,
                a.rank_hint,
                a.collective_listen,
                a.metrics_listen,
                a.device.as_deref(),
                std::time::Duration::from_secs(a.connect_timeout),
            );
        }
        Command::Scale(a) => commands::cluster::scale(&a.target, a.workers, &a.security),
        Command::Checkpoint(a) => commands::cluster::checkpoint(&a.target, &a.security),
        Command::Status(a) => commands::status::status(&a.target, &a.security, a.json, a.once, a.interval),
        Command::Doctor(a) => commands::doctor(a.json),
        Command::Eval(a) => match (&a.data, &a.prompts) {
            (Some(data), _) => commands::eval(&a.checkpoint, data, a.batches, a.batch_size),
            (None, Some(prompts)) => commands::eval_prompts(
                &a.checkpoint,
                prompts,
                &moxin_worker::eval::AccuracyOptions {
                    max_new_tokens: a.max_new_tokens,
                    samples: a.samples,
                    temperature: a.temperature,
                    top_p: a.top_p,
                    seed: a.seed,
                    examples: a.show,
                },
            ),
            (None, None) => unreachable!("clap requires --data or --prompts"),
        },
        Command::Data(DataCommand::Prepare(a)) => commands::prepare(moxin_data::PrepareOptions {
            tokenizer: match (a.tokenizer, a.train_tokenizer) {
                (Some(path), _) => moxin_data::TokenizerSource::File(path),
                (None, Some(vocab_size)) => moxin_data::TokenizerSource::Train { vocab_size },
                (None, None) => unreachable!("clap requires one"),
            },
            inputs: a.input,
            out_dir: a.out,
            jsonl_text_field: a.text_field,
            shard_tokens: a.shard_tokens,
            overwrite: a.overwrite,
            progress: true,
        }),
        Command::Data(DataCommand::PrepareSft(a)) => {
            commands::prepare_sft(a.template.as_str(), |template| moxin_data::sft::SftPrepareOptions {
                inputs: a.input,
                out_dir: a.out,
                tokenizer: a.tokenizer,
                template,
                max_tokens: a.max_tokens,
                overlong: if a.overlong == "drop" {
                    moxin_data::sft::Overlong::Drop
                } else {
                    moxin_data::sft::Overlong::Truncate
                },
                overwrite: a.overwrite,
            })
        }
        Command::ModelInfo(a) => commands::model_info(&a.preset, a.json),
        Command::Plan(a) => commands::plan(
            &a.model,
            moxin_layout::memory::PlanInput {
                gpus: a.gpus,
                seq_len: a.seq,
                micro_batch: a.micro_batch,
                recompute: match a.recompute {
                    RecomputeArg::None => moxin_layout::memory::Recompute::None,
                    RecomputeArg::Elementwise => moxin_layout::memory::Recompute::Elementwise,
                    RecomputeArg::Blocks => moxin_layout::memory::Recompute::Blocks,
                },
                bf16_grads: a.bf16_grads,
            },
            a.gpu_memory_gib,
            a.json,
        ),
        Command::Bench(BenchCommand::AllReduce { ranks, mib, iters, tcp }) => {
            commands::bench::all_reduce(ranks, mib, iters, tcp)
        }
        Command::Bench(BenchCommand::AllReduceRank { rank, peers, mib, iters }) => {
            commands::bench::all_reduce_rank(rank, &peers, mib, iters)
        }
        Command::Bench(BenchCommand::Kernels { device }) => {
            commands::bench::print(moxin_worker::selftest::fused_kernels(device))
        }
        Command::Bench(BenchCommand::CompileKernels { arch }) => commands::bench::compile_kernels(arch),
        Command::Bench(BenchCommand::CheckpointWrite { dir, mib, repeats, optimizer_file_mib }) => {
            commands::bench::print(moxin_worker::selftest::checkpoint_write(&dir, mib, repeats, optimizer_file_mib))
        }
        Command::Bench(BenchCommand::Rollout {
            checkpoint,
            prompts,
            max_new_tokens,
            repeats,
            threads,
            device,
            dtype,
        }) => commands::bench::rollout(&checkpoint, &prompts, max_new_tokens, repeats, threads, &device, &dtype),
        Command::Bench(BenchCommand::Nccl { device }) => {
            commands::bench::print(moxin_worker::selftest::nccl_world_of_one(device))
        }
        Command::Bench(BenchCommand::Heartbeats { coordinator, workers, seconds }) => {
            commands::bench::heartbeats(&coordinator, workers, seconds)
        }
        Command::ExportHf(a) => {
            commands::hf::export(&a.checkpoint, &a.out, a.dtype.as_deref(), a.max_shard_gb, &a.chat_template)
        }
        Command::ImportHf(a) => commands::hf::import(&a.dir, &a.out),
        Command::Logits(a) => commands::hf::logits(&a.checkpoint, &a.tokens, &a.out, a.overwrite),
        Command::Generate(a) => commands::generate(
            &a.checkpoint,
            &a.prompt,
            moxin_worker::generate::SamplingOptions {
                temperature: a.temperature,
                top_p: a.top_p,
                max_new_tokens: a.max_new_tokens,
                stop_token: None,
                seed: a.seed,
            },
        ),
    };
    code.map(|()| 0)
}

/// Commands that may put tensors on a GPU (and so may need NCCL or NVRTC).
fn uses_cuda(command: &Command) -> bool {
    matches!(
        command,
        Command::Train(_)
            | Command::Worker(_)
            | Command::Launch(_)
            | Command::Doctor(_)
            | Command::Eval(_)
            | Command::Generate(_)
            | Command::Bench(
                BenchCommand::Kernels { .. } | BenchCommand::Nccl { .. } | BenchCommand::CompileKernels { .. }
            )
    )
}

/// On a machine with a CUDA driver where NCCL or NVRTC sit outside the loader's search path
/// (pip's `nvidia/*/lib` beside torch), restarts this process once with them on
/// `LD_LIBRARY_PATH`; see `moxin_worker::cuda::libraries`. Elsewhere, does nothing.
fn restart_with_cuda_libraries() {
    use std::os::unix::process::CommandExt;
    match moxin_worker::cuda::libraries::plan() {
        Ok(None) => {}
        Ok(Some(path)) => {
            tracing::debug!("restarting with LD_LIBRARY_PATH={path}");
            let mut args = std::env::args_os();
            let arg0 = args.next().unwrap_or_default();
            let err = std::process::Command::new("/proc/self/exe")
                .arg0(arg0)
                .args(args)
                .env("LD_LIBRARY_PATH", path)
                .env(moxin_worker::cuda::libraries::RESTARTED_ENV, "1")
                .exec();
            tracing::warn!(
                "could not restart with the CUDA libraries on the search path ({err}); NCCL may be unavailable"
            );
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

fn init_logging() {
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("MOXIN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // tonic reports a connection it refused at the TLS handshake (a worker without the job's
    // CA or client certificate, plain HTTP to a TLS port) only at debug level, and a
    // coordinator's operator needs to see those, unless MOXIN_LOG says otherwise for tonic.
    let says_tonic = std::env::var("MOXIN_LOG").is_ok_and(|v| v.contains("tonic"));
    if let (false, Ok(refusals)) = (says_tonic, "tonic::transport::server::io_stream=debug".parse()) {
        filter = filter.add_directive(refusals);
    }
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}
