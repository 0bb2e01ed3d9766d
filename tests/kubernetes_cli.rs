//! deploy/kubernetes: every kustomization is rendered with kustomize and each resource
//! validated against the Kubernetes API schema and, for the PodMonitor, the Prometheus
//! Operator's CRD schema (deploy/kubernetes/validate.py, with the tools scripts/setup.sh
//! installs); then every container's command line is run through this binary with
//! `--check-args`, and the job TOML in the ConfigMap through the config parser, so the
//! manifests cannot drift from the CLI and the config format.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use moxin_coordinator::JobConfig;
use serde_json::Value;

use crate::common::BIN;

const KUSTOMIZATIONS: [&str; 3] = ["base", "overlays/gpu", "overlays/gpu-tls"];
/// What the downward API gives `$(POD_IP)` in these checks.
const SAMPLE_POD_IP: &str = "10.1.2.3";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The rendered resources of each kustomization, validated; `None` (after printing why)
/// where the tools are not installed.
fn rendered() -> Option<&'static HashMap<String, Vec<Value>>> {
    static RENDERED: OnceLock<Option<HashMap<String, Vec<Value>>>> = OnceLock::new();
    RENDERED.get_or_init(render_and_validate).as_ref()
}

fn render_and_validate() -> Option<HashMap<String, Vec<Value>>> {
    let python = repo(".venv/bin/python");
    let probe = Command::new(&python).args(["-c", "import kubernetes_validate, pykustomize"]).output();
    if !matches!(&probe, Ok(o) if o.status.success()) {
        eprintln!(
            "SKIPPED: {} cannot import kubernetes_validate and pykustomize (scripts/setup.sh installs them)",
            python.display()
        );
        return None;
    }
    let script = repo("deploy/kubernetes/validate.py");
    let npm = repo(".venv/npm");
    let run = |args: &[&str]| {
        let out = Command::new(&python).arg(&script).arg("--npm").arg(&npm).args(args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        eprintln!("{stdout}");
        assert!(
            out.status.success(),
            "validate.py {args:?} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    // The validators reject broken resources, so their passing below means something.
    run(&["--self-test"]);
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("rendered.json");
    let dirs: Vec<String> =
        KUSTOMIZATIONS.iter().map(|k| repo("deploy/kubernetes").join(k).to_str().unwrap().to_string()).collect();
    let mut args = vec!["--json", json.to_str().unwrap()];
    args.extend(dirs.iter().map(String::as_str));
    let report = run(&args);
    assert!(report.contains("valid: 0 invalid"), "{report}");
    let all: HashMap<String, Vec<Value>> = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    Some(KUSTOMIZATIONS.iter().zip(&dirs).map(|(k, d)| (k.to_string(), all[d].clone())).collect())
}

fn find<'a>(resources: &'a [Value], kind: &str, name: &str) -> &'a Value {
    resources
        .iter()
        .find(|r| r["kind"] == kind && r["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} rendered"))
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect()).unwrap_or_default()
}

/// The container's command line as the kubelet runs it: `command` + `args`, with
/// `$(NAME)` replaced from its env (literal values; the downward API's pod IP as a sample).
fn command_line(container: &Value) -> Vec<String> {
    let mut env = HashMap::new();
    for e in container["env"].as_array().into_iter().flatten() {
        let value = if let Some(v) = e["value"].as_str() {
            v.to_string()
        } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP" {
            SAMPLE_POD_IP.to_string()
        } else {
            panic!("no sample value for env {e}")
        };
        env.insert(e["name"].as_str().unwrap().to_string(), value);
    }
    let mut argv = strs(&container["command"]);
    argv.extend(strs(&container["args"]));
    argv.iter()
        .map(|a| {
            let mut a = a.clone();
            while let Some(start) = a.find("$(") {
                let end = start + a[start..].find(')').expect("unclosed $(");
                let name = &a[start + 2..end];
                let value = env.get(name).unwrap_or_else(|| panic!("$({name}) is not in the container's env"));
                a.replace_range(start..=end, value);
            }
            a
        })
        .collect()
}

/// The value after `flag` in `argv`.
fn flag<'a>(argv: &'a [String], name: &str) -> Option<&'a str> {
    argv.iter().position(|a| a == name).map(|i| argv[i + 1].as_str())
}

/// The volume mounted over `path` in the container, and the file's path inside it.
fn mounted<'a>(pod: &'a Value, container: &Value, path: &str) -> (&'a Value, String) {
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| path.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap())))
        .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
        .unwrap_or_else(|| panic!("nothing is mounted over {path}"));
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
    (volume, path[mount["mountPath"].as_str().unwrap().len() + 1..].to_string())
}

fn pod_spec(job: &Value) -> &Value {
    &job["spec"]["template"]["spec"]
}

#[test]
fn kubernetes_manifests_render_and_validate() {
    let Some(all) = rendered() else { return };
    for (k, resources) in all {
        let kinds: Vec<&str> = resources.iter().map(|r| r["kind"].as_str().unwrap()).collect();
        for kind in ["ConfigMap", "Service", "PersistentVolumeClaim", "Job"] {
            assert!(kinds.contains(&kind), "{k}: no {kind} in {kinds:?}");
        }
        let pvc = find(resources, "PersistentVolumeClaim", "moxin-runs");
        assert_eq!(strs(&pvc["spec"]["accessModes"]), ["ReadWriteMany"], "{k}");
        assert_eq!(kinds.contains(&"PodMonitor"), k != "base", "{k}: the GPU overlays scrape with a PodMonitor");
    }
}

#[test]
fn kubernetes_command_lines_match_the_cli_and_the_job_config() {
    let Some(all) = rendered() else { return };
    for (k, resources) in all {
        let coordinator_job = find(resources, "Job", "moxin-coordinator");
        let worker_job = find(resources, "Job", "moxin-worker");
        // Every container's command line parses with this binary's CLI.
        for job in [coordinator_job, worker_job] {
            for c in pod_spec(job)["containers"].as_array().unwrap() {
                let argv = command_line(c);
                assert_eq!(argv[0], "moxin-train", "{k}: {argv:?}");
                let out = Command::new(BIN)
                    .args(&argv[1..])
                    .arg("--check-args")
                    .env_remove("MOXIN_TOKEN_FILE")
                    .env_remove("LD_LIBRARY_PATH")
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{k}: {argv:?} does not parse:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("ok: {}", argv[1]));
                // The join token is a file from the Secret.
                let token = flag(&argv, "--token-file").unwrap_or_else(|| panic!("{k}: {argv:?} has no --token-file"));
                assert_eq!(token, "/var/run/secrets/moxin/token");
                let (volume, file) = mounted(pod_spec(job), c, token);
                assert_eq!(volume["secret"]["secretName"], "moxin-token", "{k}");
                let mode = volume["secret"]["defaultMode"].as_u64().unwrap_or(0o644);
                assert_ne!(mode & 0o040, 0, "{k}: the token must be readable by the pod's group (fsGroup)");
                assert_eq!(file, "token");
                // Probes hit /metrics on the port the process serves it on.
                let metrics_port = c["ports"].as_array().unwrap().iter().find(|p| p["name"] == "metrics").unwrap()
                    ["containerPort"]
                    .as_u64()
                    .unwrap();
                let serves = flag(&argv, "--metrics-listen")
                    .map(str::to_string)
                    .or_else(|| argv.iter().find_map(|a| a.strip_prefix("cluster.metrics_listen=").map(str::to_string)))
                    .unwrap_or_else(|| panic!("{k}: {argv:?} serves no metrics"));
                assert_eq!(serves, format!("0.0.0.0:{metrics_port}"), "{k}");
                for probe in ["readinessProbe", "livenessProbe"] {
                    assert_eq!(c[probe]["httpGet"]["path"], "/metrics", "{k} {probe}");
                    assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{k} {probe}");
                }
            }
        }

        // The coordinator's job TOML is the ConfigMap's, and the config parser accepts it.
        let pod = pod_spec(coordinator_job);
        let c = &pod["containers"][0];
        let argv = command_line(c);
        let (volume, file) = mounted(pod, c, &argv[2]);
        let configmap = find(resources, "ConfigMap", volume["configMap"]["name"].as_str().unwrap());
        let toml = configmap["data"][&file].as_str().unwrap_or_else(|| panic!("{k}: no {file} in the ConfigMap"));
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(&file);
        std::fs::write(&path, toml).unwrap();
        let sets: Vec<String> = argv.windows(2).filter(|w| w[0] == "--set").map(|w| w[1].clone()).collect();
        let config = JobConfig::load(&path, HashMap::new(), &sets).unwrap_or_else(|e| panic!("{k}: {e}"));
        let (min, max) = (config.cluster.min_workers, config.cluster.max());
        config.validate(min).unwrap_or_else(|e| panic!("{k}: {e}"));

        // Workers: an Indexed Job of min_workers..=max_workers pods that reach the Service.
        let spec = &worker_job["spec"];
        assert_eq!(spec["completionMode"], "Indexed", "{k}: JOB_COMPLETION_INDEX comes with Indexed Jobs");
        let parallelism = spec["parallelism"].as_u64().unwrap() as u32;
        assert_eq!(spec["completions"].as_u64(), Some(parallelism as u64), "{k}");
        assert!((min..=max).contains(&parallelism), "{k}: {parallelism} workers, the job wants {min}..={max}");
        let worker = &pod_spec(worker_job)["containers"][0];
        let wargv = command_line(worker);
        assert_eq!(flag(&wargv, "--collective-listen"), Some(format!("{SAMPLE_POD_IP}:29500").as_str()), "{k}");
        let url = flag(&wargv, "--coordinator").unwrap();
        let service = find(resources, "Service", "moxin-coordinator");
        let grpc = service["spec"]["ports"].as_array().unwrap().iter().find(|p| p["name"] == "grpc").unwrap();
        let scheme = if k.ends_with("tls") { "https" } else { "http" };
        assert_eq!(url, format!("{scheme}://moxin-coordinator:{}", grpc["port"]), "{k}");
        assert_eq!(flag(&argv, "--listen"), Some(format!("0.0.0.0:{}", grpc["port"]).as_str()), "{k}");
        for (label, value) in service["spec"]["selector"].as_object().unwrap() {
            assert_eq!(&coordinator_job["spec"]["template"]["metadata"]["labels"][label], value, "{k}");
        }
        let gpus = &worker["resources"]["limits"]["nvidia.com/gpu"];
        assert_eq!(!gpus.is_null(), k != "base", "{k}: GPUs only in the GPU overlays ({gpus})");
        if k != "base" {
            assert_eq!(gpus.as_u64(), Some(1), "{k}");
        }
        if k.ends_with("tls") {
            let (ca, file) = mounted(pod_spec(worker_job), worker, flag(&wargv, "--tls-ca").unwrap());
            assert_eq!(ca["secret"]["secretName"], "moxin-tls");
            assert_eq!(file, "ca.crt");
            for f in ["--tls-cert", "--tls-key"] {
                let (v, _) = mounted(pod, c, flag(&argv, f).unwrap());
                assert_eq!(v["secret"]["secretName"], "moxin-tls", "{k} {f}");
            }
        }
    }
}
