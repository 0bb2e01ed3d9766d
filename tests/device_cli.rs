//! GPU-related commands on this (CPU-only) machine: they explain themselves, never panic,
//! and what can be checked without a GPU is checked (kernel compilation, the memory plan).

use crate::common::{fails, ok, run, s, tiny_job, BIN};

#[test]
fn doctor_on_a_cpu_machine_says_so_and_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    let text = ok(tmp.path(), &["doctor"]);
    assert!(text.contains("CUDA         not available"), "{text}");
    assert!(text.contains("libtorch     2.11.0"), "{text}");
    assert!(text.contains("would train on cpu"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&ok(tmp.path(), &["doctor", "--json"])).unwrap();
    assert_eq!(json["cuda_available"], false);
    assert_eq!(json["devices"].as_array().unwrap().len(), 0);
    assert!(json["backend"].as_str().unwrap().starts_with("ring"));
    assert!(json["cpu"]["cores"].as_u64().unwrap() >= 1);
    assert!(json["cpu"]["fp32_linear"].as_str().unwrap().starts_with("oneDNN"), "{json}");
    assert!(text.contains("CPU          ") && text.contains("fp32 linear  oneDNN"), "{text}");
    let aten = std::process::Command::new(BIN)
        .arg("doctor")
        .env("MOXIN_CPU_LINEAR", "aten")
        .env("MOXIN_LOG", "warn")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let aten = String::from_utf8_lossy(&aten.stdout);
    assert!(aten.contains("fp32 linear  ATen/MKL"), "{aten}");
}

#[test]
fn gpu_only_work_is_refused_clearly_on_a_cpu_machine() {
    let tmp = tempfile::tempdir().unwrap();
    let err = fails(tmp.path(), &["bench", "kernels"]);
    assert!(err.contains("needs CUDA device 0") && err.contains("doctor"), "{err}");
    let err = fails(tmp.path(), &["bench", "nccl"]);
    assert!(err.contains("needs CUDA device 0"), "{err}");
    let job = tiny_job(tmp.path(), 2, "");
    let err = fails(tmp.path(), &["train", s(&job), "--out", s(&tmp.path().join("r")), "--device", "cuda"]);
    assert!(err.contains("CUDA was asked for") && err.contains("no CUDA device"), "{err}");
    let err = fails(tmp.path(), &["train", s(&job), "--device", "gpu0"]);
    assert!(err.contains("--device gpu0") && err.contains("cuda:N"), "{err}");
    let err = fails(tmp.path(), &["train", s(&job), "--set", "runtime.kernels=fused"]);
    assert!(err.contains("runtime.kernels = fused") && err.contains("aten"), "{err}");
    let err = fails(tmp.path(), &["train", s(&job), "--set", "runtime.gemm=tuned"]);
    assert!(err.contains("runtime.gemm") && err.contains("aten"), "{err}");
    let err = fails(tmp.path(), &["train", s(&job), "--set", "runtime.gemm=fast"]);
    assert!(err.contains("runtime.gemm") && err.contains("fast") && err.contains("tuned"), "{err}");
    let err = fails(tmp.path(), &["train", s(&job), "--set", "cluster.collective=nccl"]);
    assert!(err.contains("cluster.collective = nccl"), "{err}");
    // Under `launch`, the worker's own reason reaches the last line once restarts run out.
    let err = fails(
        tmp.path(),
        &["launch", s(&job), "--workers", "1", "--max-restarts", "1", "--out", s(&tmp.path().join("l"))]
            .into_iter()
            .chain(["--set", "runtime.device=cuda"])
            .collect::<Vec<_>>(),
    );
    let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
    assert!(last.contains("restart(s) allowed") && last.contains("CUDA was asked for"), "{err}");
}

#[test]
fn fused_kernels_compile_with_the_nvrtc_beside_torch() {
    // NVRTC needs no GPU: the CUDA source compiles here exactly as on a GPU machine.
    let torch = std::fs::canonicalize(concat!(env!("CARGO_MANIFEST_DIR"), "/.libtorch")).unwrap();
    let nvrtc = torch.join("../nvidia/cu13/lib");
    if !nvrtc.join("libnvrtc.so.13").exists() {
        eprintln!("skipped: this torch build ships no NVRTC ({})", nvrtc.display());
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .args(["bench", "compile-kernels", "--arch", "90"])
        .current_dir(tmp.path())
        .env("LD_LIBRARY_PATH", &nvrtc)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kernels: Vec<&str> = json["kernels"].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
    // Every kernel the source declares was compiled (the command lists those whose entry
    // point is in the PTX).
    assert_eq!(kernels, moxin_worker::cuda::kernels::KERNEL_NAMES);
    // Without NVRTC on the library path: a clear error, not a panic.
    let out = run(tmp.path(), &["bench", "compile-kernels"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("NVRTC") && !err.contains("panicked"), "{err}");
}

#[test]
fn plan_sizes_a_moxin_7b_job() {
    let tmp = tempfile::tempdir().unwrap();
    let plan = |extra: &[&str]| -> serde_json::Value {
        let mut args =
            vec!["plan", "--model", "moxin-7b", "--gpus", "8", "--seq", "4096", "--micro-batch", "1", "--json"];
        args.extend_from_slice(extra);
        serde_json::from_str(&ok(tmp.path(), &args)).unwrap()
    };
    let with = plan(&["--recompute"]);
    assert_eq!(with["bytes"]["params"], 2 * 8_114_180_096u64);
    assert_eq!(with["bytes"]["optimizer"], 12 * 1_014_272_512u64);
    assert_eq!(with["fits"], true);
    // The default recomputes norms and SwiGLU (the GPU default, 71.3 GiB): fits.
    assert_eq!(plan(&[])["fits"], true);
    assert_eq!(plan(&[])["recompute"], "elementwise");
    assert_eq!(plan(&["--recompute", "none"])["recompute"], "none");
    let text = ok(tmp.path(), &["plan", "--model", "moxin-7b", "--gpus", "8", "--seq", "4096", "--micro-batch", "2"]);
    assert!(text.contains("does NOT fit") && text.contains("--recompute"), "{text}");
    let out = run(tmp.path(), &["plan", "--model", "moxin-7b", "--seq", "8", "--micro-batch", "1", "--recompute", "x"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "a usage error: {err}");
    assert!(err.contains("'x'") && err.contains("elementwise"), "{err}");
    let err = fails(tmp.path(), &["plan", "--model", "moxin-7b", "--seq", "65536", "--micro-batch", "1"]);
    assert!(err.contains("max_seq_len 32768"), "{err}");
    let err = fails(tmp.path(), &["plan", "--model", "moxin-7b", "--gpus", "0", "--seq", "8", "--micro-batch", "1"]);
    assert!(err.contains("--gpus"), "{err}");
}
