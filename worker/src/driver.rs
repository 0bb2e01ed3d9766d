//! What `train` and a cluster worker share around the training loop: how a run is asked to
//! stop (signals), how it ended and the exit code that says so, the guard that turns a
//! panic on the training thread into a reported error, and the Prometheus view of a step.
//!
//! Stopping is always "checkpoint, then exit": SIGINT (Ctrl-C) and SIGTERM (what Slurm and
//! Kubernetes send before preempting) set one flag that the trainer reads at each step
//! boundary; a group agrees on it through the per-step all-reduce, so every rank stops at
//! the same step and the checkpoint is whole. A second signal ends the process at once, the
//! default way, for a user who really means it — but only a second *request*: the same
//! signal again within [`SAME_REQUEST`] is the first one delivered twice (`timeout` signals
//! its child and then the child's process group; a terminal's Ctrl-C reaches every process
//! of the group), and must not throw away the checkpoint the first one asked for.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moxin_proto::v1::StepMetrics;
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::WorkerError;

/// Exit code of a run that stopped early on request (a signal, Ctrl-C or a coordinator
/// stop) after writing its checkpoint: 128 + SIGINT, for every command and every way of
/// asking.
pub const STOPPED_EXIT_CODE: i32 = 130;

/// SIGINT and SIGTERM as a stop request. Installing twice in one process is harmless.
#[derive(Debug, Clone)]
pub struct StopSignals {
    asked: Arc<AtomicBool>,
    which: Arc<AtomicUsize>,
}

impl StopSignals {
    /// Catches SIGINT and SIGTERM from now on: the first sets [`StopSignals::flag`]; one
    /// arriving [`SAME_REQUEST`] or more later terminates the process as if it were not
    /// caught (saying so on stderr); one arriving sooner is the first delivered twice.
    #[allow(unsafe_code)]
    pub fn install() -> Result<StopSignals, WorkerError> {
        let asked = Arc::new(AtomicBool::new(false));
        let which = Arc::new(AtomicUsize::new(0));
        // When the first signal came (monotonic nanoseconds; 0 = none yet).
        let first = Arc::new(AtomicU64::new(0));
        for signal in [SIGINT, SIGTERM] {
            let (asked, which, first) = (asked.clone(), which.clone(), first.clone());
            // Runs in the signal handler: atomics, clock_gettime and write(2) only, all
            // async-signal-safe.
            let action = move || {
                let now = monotonic_ns().max(1);
                match first.compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst) {
                    Ok(_) => {
                        which.store(signal as usize, Ordering::SeqCst);
                        asked.store(true, Ordering::SeqCst);
                    }
                    Err(at) if now.saturating_sub(at) >= SAME_REQUEST.as_nanos() as u64 => {
                        let say = b"\nsecond stop signal: exiting now, without a checkpoint\n";
                        // SAFETY: write(2) to stderr from a buffer that lives for the program.
                        unsafe { libc::write(2, say.as_ptr().cast(), say.len()) };
                        let _ = signal_hook::low_level::emulate_default_handler(signal);
                    }
                    Err(_) => {
                        let say = b"\nstopping at the next step boundary, with a checkpoint (signal again after a \
second to exit at once without one)\n";
                        // SAFETY: as above.
                        unsafe { libc::write(2, say.as_ptr().cast(), say.len()) };
                    }
                }
            };
            // SAFETY: `action` is async-signal-safe (see above).
            unsafe { signal_hook::low_level::register(signal, action) }
                .map_err(|e| WorkerError::Spec(format!("cannot install a handler for signal {signal}: {e}")))?;
        }
        Ok(StopSignals { asked, which })
    }

    /// Set once a stop was asked for; hand it to [`crate::trainer::Trainer::stop_requested`].
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.asked.clone()
    }

    /// The signal that asked to stop, if one did (`"SIGINT"`, `"SIGTERM"`).
    pub fn received(&self) -> Option<&'static str> {
        if !self.asked.load(Ordering::Relaxed) {
            return None;
        }
        Some(match self.which.load(Ordering::Relaxed) as i32 {
            SIGTERM => "SIGTERM",
            SIGINT => "SIGINT (Ctrl-C)",
            _ => "a stop request",
        })
    }
}

/// Signals closer than this to the first stop signal are that signal delivered again.
pub const SAME_REQUEST: Duration = Duration::from_secs(1);

/// `CLOCK_MONOTONIC` in nanoseconds (async-signal-safe, unlike most clocks' wrappers).
#[allow(unsafe_code)]
fn monotonic_ns() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    (t.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(t.tv_nsec as u64)
}

/// How a run ended, when it did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEnd {
    /// `train.steps` were completed by this run.
    Finished {
        /// The last step.
        step: u64,
    },
    /// The run directory's newest checkpoint was already at `train.steps`.
    AlreadyFinished {
        /// Its step.
        step: u64,
    },
    /// Reached `--stop-after`.
    StoppedAfter {
        /// The step it stopped at (checkpointed).
        step: u64,
    },
    /// Stopped early on request (checkpointed, unless checkpoints are disabled).
    Stopped {
        /// Who asked: a signal's name or the coordinator's reason.
        reason: String,
    },
}

impl JobEnd {
    /// The process exit code for this end: 0, or [`STOPPED_EXIT_CODE`] for a requested stop.
    pub fn exit_code(&self) -> i32 {
        match self {
            JobEnd::Stopped { .. } => STOPPED_EXIT_CODE,
            _ => 0,
        }
    }
}

/// Runs `f`, turning a panic inside it (tch panics on errors it does not return, e.g. a
/// failed allocation) into [`WorkerError::Panic`], so the failure is reported with a
/// message instead of taking the process down mid-collective.
pub fn guard<T>(what: &str, f: impl FnOnce() -> Result<T, WorkerError>) -> Result<T, WorkerError> {
    quiet_guarded_panics();
    GUARDED.with(|g| g.set(g.get() + 1));
    let result = catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(g.get() - 1));
    match result {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            let at = PANICKED_AT.with(|p| p.take());
            Err(WorkerError::Panic(describe_panic(what, &message, at.as_deref())))
        }
    }
}

thread_local! {
    /// How many [`guard`]s this thread is inside.
    static GUARDED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    /// Where the last guarded panic on this thread happened (`file:line`), for its error.
    static PANICKED_AT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Panics that [`guard`] turns into errors are reported once, by the error: the default
/// hook's "thread 'main' panicked at …" (and libtorch's C++ frames) would come first and
/// bury it. With `RUST_BACKTRACE` set the default hook runs as usual, for debugging.
fn quiet_guarded_panics() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARDED.with(|g| g.get()) > 0 && std::env::var_os("RUST_BACKTRACE").is_none() {
                let at = info.location().map(|l| format!("{}:{}", l.file(), l.line()));
                PANICKED_AT.with(|p| *p.borrow_mut() = at);
                tracing::debug!("panic turned into an error: {info}");
            } else {
                default(info);
            }
        }));
    });
}

/// The size in "tried to allocate N bytes" (libtorch's CPU allocator) or "tried to allocate
/// 2.00 GiB" (its CUDA allocator), in GiB; `lower` is the message in lower case.
fn allocation_gib(lower: &str) -> Option<f64> {
    let mut words = lower.split("tried to allocate ").nth(1)?.split_whitespace();
    let number: f64 = words.next()?.parse().ok()?;
    let unit = words.next()?.trim_end_matches(['.', ',', ';', ')', '"']);
    let bytes = match unit {
        "bytes" | "b" => 1.0,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some(number * bytes / (1u64 << 30) as f64)
}

fn describe_panic(what: &str, message: &str, at: Option<&str>) -> String {
    let first_line = message.lines().find(|l| !l.trim().is_empty()).unwrap_or(message).trim();
    // tch's errors arrive as Debug strings: escaped newlines, then libtorch's C++ frames.
    let first_line = match first_line.split_once("\\n") {
        Some((first, _)) => first,
        None => first_line,
    };
    let lower = message.to_lowercase();
    if lower.contains("out of memory") || lower.contains("can't allocate memory") || lower.contains("cannot allocate") {
        let asked = allocation_gib(&lower).map_or(String::new(), |gib| format!("{gib:.1} GiB more was asked for; "));
        format!(
            "{what} ran out of memory ({asked}{first_line}); size the job with `moxin-train plan`, then lower \
             train.micro_batch_size or train.seq_len, set runtime.recompute = \"blocks\", use more workers \
             (ZeRO-1 splits the optimizer state) or a smaller model"
        )
    } else {
        let at = at.map_or(String::new(), |at| format!(" at {at}"));
        format!("{what} failed unexpectedly{at}: {first_line}")
    }
}

/// Publishes one step's figures as Prometheus gauges and histograms (the same names on
/// workers and on the coordinator).
pub fn record_step_metrics(m: &StepMetrics) {
    moxin_proto::record_step(m);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_and_out_of_memory_says_what_to_do() {
        let e = guard("training", || -> Result<(), WorkerError> {
            panic!("called `Result::unwrap()` on an `Err` value: Torch(\"[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: you tried to allocate 28991029248 bytes.\")")
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("ran out of memory") && e.contains("moxin-train plan"), "{e}");
        assert!(e.contains("27.0 GiB more was asked for"), "{e}");
        // libtorch's frames after the first line of its message are left out.
        let e = guard("training", || -> Result<(), WorkerError> {
            panic!("called `Result::unwrap()` on an `Err` value: Torch(\"[enforce fail] CUDA out of memory.\\nframe #0: c10::Error\\nframe #1: at::empty\")")
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("CUDA out of memory.") && !e.contains("frame #0"), "{e}");
        let cuda = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)";
        assert_eq!(allocation_gib(&cuda.to_lowercase()), Some(2.0));
        assert_eq!(allocation_gib("tried to allocate 512.00 mib."), Some(0.5));
        assert_eq!(allocation_gib("tried to allocate 3 widgets"), None);
        let e = guard("training", || -> Result<(), WorkerError> { panic!("boom") }).unwrap_err().to_string();
        assert!(e.contains("training failed unexpectedly") && e.contains(": boom"), "{e}");
        assert_eq!(guard("x", || Ok(7)).unwrap(), 7);
    }

    #[test]
    fn stop_exit_code_is_the_same_for_every_requested_stop() {
        assert_eq!(JobEnd::Stopped { reason: "SIGTERM".into() }.exit_code(), STOPPED_EXIT_CODE);
        assert_eq!(JobEnd::StoppedAfter { step: 3 }.exit_code(), 0);
        assert_eq!(JobEnd::AlreadyFinished { step: 3 }.exit_code(), 0);
    }
}
