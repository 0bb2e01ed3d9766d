//! deploy/: the Prometheus configuration and rules are valid, and every alert fires (and
//! stays quiet) as its unit tests say — checked by Prometheus' own `promtool`
//! (Debian's `prometheus` package; scripts/setup.sh installs it where it can). The Grafana
//! dashboard is its generator's output (grafana-foundation-sdk), well-formed, and every one
//! of its queries evaluates against a live Prometheus.

use std::path::Path;
use std::process::Command;

fn promtool(args: &[&str]) -> Option<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    let out = Command::new("promtool").args(args).current_dir(&dir).output().ok()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    Some(text)
}

#[test]
fn prometheus_config_and_rules_pass_promtool() {
    let Some(version) = promtool(&["--version"]) else {
        eprintln!("SKIPPED: promtool is not installed (apt-get install prometheus; scripts/setup.sh does on Debian)");
        return;
    };
    assert!(version.contains("promtool"), "{version}");
    let config = promtool(&["check", "config", "prometheus.yml"]).unwrap();
    assert!(config.contains("SUCCESS"), "{config}");
    let rules = promtool(&["check", "rules", "rules.yml"]).unwrap();
    assert!(rules.contains("SUCCESS: 11 rules found"), "{rules}");
    let tests = promtool(&["test", "rules", "rules_test.yml"]).unwrap();
    assert!(tests.contains("SUCCESS"), "{tests}");
    // Every alert has a unit test.
    let defined =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/rules.yml")).unwrap();
    let tested =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/rules_test.yml"))
            .unwrap();
    for alert in defined.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")) {
        assert!(tested.contains(&format!("alertname: {alert}")), "alert {alert} has no promtool test");
    }
}

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(repo("deploy/grafana/moxin-train.json")).unwrap()).unwrap()
}

/// Every panel of the dashboard (rows' nested panels included), rows left out.
fn dashboard_panels(d: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().into_iter().flatten() {
        if p["type"] == "row" {
            out.extend(p["panels"].as_array().into_iter().flatten());
        } else {
            out.push(p);
        }
    }
    out
}

/// `(panel title, PromQL)` for every query of the dashboard.
fn dashboard_queries(d: &serde_json::Value) -> Vec<(String, String)> {
    dashboard_panels(d)
        .into_iter()
        .flat_map(|p| {
            p["targets"].as_array().into_iter().flatten().map(move |t| {
                (
                    p["title"].as_str().unwrap_or_default().to_string(),
                    t["expr"].as_str().unwrap_or_default().to_string(),
                )
            })
        })
        .collect()
}

/// The `moxin_*` metric names an expression reads, without the summary suffixes.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("moxin_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        let name = &tail[..end];
        let base = name.strip_suffix("_sum").or_else(|| name.strip_suffix("_count")).unwrap_or(name);
        names.push(base.to_string());
        rest = &tail[end..];
    }
    names
}

/// deploy/grafana/moxin-train.json is what deploy/grafana/dashboard.py generates (when the
/// project's venv has grafana-foundation-sdk) and is a well-formed Grafana dashboard: a
/// data source variable every query uses, a `job` variable every query filters on, unique
/// panel ids, and only metrics the README documents.
#[test]
fn grafana_dashboard_is_generated_and_well_formed() {
    let committed = std::fs::read_to_string(repo("deploy/grafana/moxin-train.json")).unwrap();
    let python = repo(".venv/bin/python");
    let sdk = Command::new(&python).args(["-c", "import grafana_foundation_sdk"]).output();
    if sdk.as_ref().is_ok_and(|o| o.status.success()) {
        let out = Command::new(&python).arg(repo("deploy/grafana/dashboard.py")).output().unwrap();
        assert!(out.status.success(), "dashboard.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            String::from_utf8_lossy(&out.stdout) == committed,
            "deploy/grafana/moxin-train.json is not dashboard.py's output; regenerate it with \
             .venv/bin/python deploy/grafana/dashboard.py > deploy/grafana/moxin-train.json"
        );
    } else {
        eprintln!(
            "SKIPPED the generator comparison: {} cannot import grafana_foundation_sdk (scripts/setup.sh installs it)",
            python.display()
        );
    }

    let d = dashboard();
    assert_eq!(d["uid"], "moxin-train");
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "schemaVersion {}", d["schemaVersion"]);
    assert!(d["refresh"].as_str().is_some_and(|r| !r.is_empty()));
    let vars = d["templating"]["list"].as_array().unwrap();
    let var = |name: &str| vars.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no ${name} variable"));
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    assert_eq!(var("job")["type"], "query");
    assert_eq!(var("job")["datasource"]["uid"], "${datasource}");
    assert_eq!(var("job")["query"], "label_values(moxin_step, job)");

    let mut ids = std::collections::HashSet::new();
    for p in d["panels"].as_array().unwrap() {
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "duplicate panel id {}", p["id"]);
        assert!(p["gridPos"]["w"].as_u64().is_some_and(|w| w > 0 && w <= 24), "{}", p["title"]);
    }
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for p in dashboard_panels(&d) {
        let title = &p["title"];
        assert!(["timeseries", "stat"].contains(&p["type"].as_str().unwrap()), "{title}: type {}", p["type"]);
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().filter(|t| !t.is_empty()).unwrap_or_else(|| panic!("{title}: no query"));
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            assert!(t["refId"].as_str().is_some_and(|r| !r.is_empty()), "{title}");
            let expr = t["expr"].as_str().unwrap();
            assert!(expr.contains("job=~\"$job\""), "{title}: {expr} ignores $job");
            for name in metric_names(expr) {
                assert!(readme.contains(&format!("`{name}")), "{title}: {name} is not in README.md's metrics");
                seen.insert(name);
            }
        }
    }
    for wanted in [
        "moxin_loss",
        "moxin_tokens_total",
        "moxin_mfu",
        "moxin_step_duration_seconds",
        "moxin_collective_exposed_seconds",
        "moxin_optimizer_seconds",
        "moxin_rank_compute_seconds",
        "moxin_heartbeat_rtt_seconds",
        "moxin_heartbeat_latency_seconds",
        "moxin_membership_generation",
        "moxin_workers_connected",
        "moxin_workers_lost_total",
        "moxin_recoveries_total",
        "moxin_checkpoint_blocking_seconds",
        "moxin_checkpoint_write_seconds",
        "moxin_last_checkpoint_timestamp_seconds",
        "moxin_peak_memory_bytes",
        "moxin_device_memory_total_bytes",
    ] {
        assert!(seen.contains(wanted), "no panel shows {wanted}");
    }
}

/// The dashboard's queries as Prometheus runs them: Grafana's variables replaced by what
/// they stand for against `job`.
fn concrete(expr: &str, job: &str) -> String {
    let expr = expr.replace("$__rate_interval", "1m").replace("$job", job);
    assert!(!expr.contains('$'), "a Grafana variable left in {expr}");
    expr
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `GET http://127.0.0.1:{port}{path}` as JSON (Prometheus' HTTP API), via curl.
fn get(port: u16, path: &str) -> serde_json::Value {
    let out = Command::new("curl").args(["-s", "--max-time", "5", &format!("http://127.0.0.1:{port}{path}")]).output();
    out.ok().and_then(|o| serde_json::from_slice(&o.stdout).ok()).unwrap_or_default()
}

/// An instant query (`/api/v1/query`) of `expr`, as JSON.
fn query(port: u16, expr: &str) -> serde_json::Value {
    let url = format!("http://127.0.0.1:{port}/api/v1/query");
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5", "-G", "--data-urlencode", &format!("query={expr}"), &url])
        .output();
    out.ok().and_then(|o| serde_json::from_slice(&o.stdout).ok()).unwrap_or_default()
}

/// Every dashboard query evaluates ("success") on the live series; the panels a
/// coordinator alone feeds (loss, throughput, the step-time breakdown, membership) have
/// data.
fn dashboard_evaluates(port: u16, job: &str) -> Result<(), String> {
    let d = dashboard();
    let jobs = get(port, "/api/v1/label/job/values?match[]=moxin_step");
    if !jobs["data"].as_array().is_some_and(|j| j.iter().any(|v| v == job)) {
        return Err(format!("the $job variable's label_values(moxin_step, job) gives {jobs}"));
    }
    let must_have_data = ["Loss", "Tokens per second", "Step time breakdown", "Membership", "Step"];
    for (title, expr) in dashboard_queries(&d) {
        let expr = concrete(&expr, job);
        let v = query(port, &expr);
        if v["status"] != "success" {
            return Err(format!("panel {title:?}: {expr} gave {v}"));
        }
        if must_have_data.contains(&title.as_str()) && v["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
            return Err(format!("panel {title:?}: {expr} has no data yet"));
        }
    }
    Ok(())
}

/// A real Prometheus (on loopback, generated config, the repository's rules) scrapes a
/// running `launch --workers 2`: the coordinator's and both workers' endpoints
/// (`--worker-metrics-port`) are up, `moxin_step` rises, every recording
/// and alerting rule evaluates without error against the live series, and so does every
/// query of the Grafana dashboard.
#[test]
fn a_real_prometheus_scrapes_a_running_job_and_evaluates_every_rule() {
    if Command::new("prometheus").arg("--version").output().is_err()
        || Command::new("curl").arg("--version").output().is_err()
    {
        eprintln!("SKIPPED: prometheus or curl is not installed (apt-get install prometheus curl)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (metrics_port, prom_port) = (free_port(), free_port());
    // Two consecutive free ports for the workers' endpoints.
    let worker_port = loop {
        let p = free_port();
        if p < 65535 && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            break p;
        }
    };
    let job = crate::common::tiny_job(t, 100_000, "");
    let mut launch = Command::new(crate::common::BIN)
        .args(["launch", crate::common::s(&job), "--workers", "2", "--out", crate::common::s(&t.join("run"))])
        .args(["--set", &format!("cluster.metrics_listen=127.0.0.1:{metrics_port}")])
        .args(["--worker-metrics-port", &worker_port.to_string()])
        .env("MOXIN_LOG", "warn")
        .spawn()
        .unwrap();
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/rules.yml");
    let config = t.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {:?}\nscrape_configs:\n  \
             - job_name: moxin-coordinator\n    static_configs:\n      - targets: [\"127.0.0.1:{metrics_port}\"]\n  \
             - job_name: moxin-workers\n    static_configs:\n      - targets: [\"127.0.0.1:{worker_port}\", \"127.0.0.1:{}\"]\n",
            rules.display().to_string(),
            worker_port + 1
        ),
    )
    .unwrap();
    let mut prometheus = Command::new("prometheus")
        .args([
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", t.join("tsdb").display()),
            &format!("--web.listen-address=127.0.0.1:{prom_port}"),
            "--log.level=error",
        ])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let step = || {
        let v = get(prom_port, "/api/v1/query?query=max(moxin_step)");
        v["data"]["result"][0]["value"][1].as_str().and_then(|s| s.parse::<f64>().ok())
    };
    let mut first = None;
    let mut outcome = Err("no sample of moxin_step".to_string());
    while std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let Some(now) = step() else { continue };
        let Some(before) = first else {
            first = Some(now);
            continue;
        };
        if now <= before {
            continue;
        }
        let targets = get(prom_port, "/api/v1/targets");
        let up = targets["data"]["activeTargets"]
            .as_array()
            .is_some_and(|a| a.len() == 3 && a.iter().all(|t| t["health"] == "up"));
        // The workers' own series (heartbeat round trips) arrive from their endpoints.
        let rtt = query(prom_port, "moxin_heartbeat_rtt_seconds_count{job=\"moxin-workers\"}");
        let up = up && rtt["data"]["result"].as_array().is_some_and(|r| r.len() == 2);
        let groups = get(prom_port, "/api/v1/rules");
        let rules: Vec<&serde_json::Value> = groups["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        let evaluated = rules.len() == 11 && rules.iter().all(|r| r["health"] == "ok");
        if !(up && evaluated) {
            outcome = Err(format!("targets {targets}; rules {groups}"));
            continue;
        }
        outcome = dashboard_evaluates(prom_port, "moxin-coordinator");
        if outcome.is_ok() {
            break;
        }
    }
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    // A clean stop (SIGINT): the workers stop with it instead of waiting for a coordinator.
    let _ = Command::new("kill").args(["-INT", &launch.id().to_string()]).status();
    let _ = launch.wait();
    outcome.unwrap();
}

/// deploy/prometheus/prometheus-kubernetes.yml finds exactly the metrics ports of
/// deploy/kubernetes' pods, under the job names the rules and the dashboard use. Debian's
/// promtool is built without Kubernetes discovery, so the relabelling is checked by
/// applying it (keep / replace, as Prometheus does) to the discovery labels of the pods
/// the manifests define.
#[test]
fn kubernetes_service_discovery_keeps_the_metrics_ports_of_our_pods() {
    let python = repo(".venv/bin/python");
    if Command::new(&python).args(["-c", "import yaml"]).output().map_or(true, |o| !o.status.success()) {
        eprintln!("SKIPPED: {} cannot import yaml (scripts/setup.sh installs it with transformers)", python.display());
        return;
    }
    const CHECK: &str = r#"
import re, sys, yaml
config = yaml.safe_load(open(sys.argv[1]))
static = yaml.safe_load(open(sys.argv[2]))
assert config["rule_files"] == static["rule_files"], "rule files differ from prometheus.yml"
[scrape] = config["scrape_configs"]
assert scrape["kubernetes_sd_configs"] == [{"role": "pod"}]
def meta(pod_labels, namespace, pod, port):
    m = {"__meta_kubernetes_namespace": namespace, "__meta_kubernetes_pod_name": pod,
         "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
         "__address__": "10.0.0.1:%d" % port["containerPort"], "job": scrape["job_name"]}
    for k, v in pod_labels.items():
        m["__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k)] = v
    return m
def relabel(labels):
    for r in scrape["relabel_configs"]:
        value = r.get("separator", ";").join(labels.get(s, "") for s in r["source_labels"])
        match = re.fullmatch(r.get("regex", "(.*)"), value)
        action = r.get("action", "replace")
        if action == "keep":
            if not match: return None
        elif action == "replace":
            if match:
                labels[r["target_label"]] = match.expand(r.get("replacement", "$1").replace("$", "\\"))
        else:
            raise SystemExit("unexpected action " + action)
    return labels
found = []
for path in sys.argv[3:]:
    for doc in yaml.safe_load_all(open(path)):
        if not doc or doc["kind"] != "Job": continue
        template = doc["spec"]["template"]
        labels = dict(template["metadata"]["labels"])
        if "completionMode" in doc["spec"]:
            labels["batch.kubernetes.io/job-completion-index"] = "1"
        for c in template["spec"]["containers"]:
            for port in c.get("ports", []):
                t = relabel(meta(labels, "ml", doc["metadata"]["name"] + "-x", port))
                if t: found.append((t["job"], t["__address__"], t.get("completion_index", "")))
    # A pod of something else is never scraped.
    assert relabel(meta({"app.kubernetes.io/name": "other"}, "ml", "p", {"name": "metrics", "containerPort": 1})) is None
print(sorted(found))
"#;
    let dir = repo("deploy/prometheus");
    let out = Command::new(&python)
        .args(["-c", CHECK])
        .arg(dir.join("prometheus-kubernetes.yml"))
        .arg(dir.join("prometheus.yml"))
        .arg(repo("deploy/kubernetes/base/coordinator.yaml"))
        .arg(repo("deploy/kubernetes/base/workers.yaml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        text.trim(),
        "[('moxin-coordinator', '10.0.0.1:9100', ''), ('moxin-workers', '10.0.0.1:9100', '1')]",
        "targets found"
    );
}
