//! deploy/: the Prometheus configuration and rules are valid, and every alert fires (and
//! stays quiet) as its unit tests say — checked by Prometheus' own `promtool`
//! (Debian's `prometheus` package; scripts/setup.sh installs it where it can).

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
    assert!(rules.contains("SUCCESS: 10 rules found"), "{rules}");
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `GET http://127.0.0.1:{port}{path}` as JSON (Prometheus' HTTP API), via curl.
fn get(port: u16, path: &str) -> serde_json::Value {
    let out = Command::new("curl").args(["-s", "--max-time", "5", &format!("http://127.0.0.1:{port}{path}")]).output();
    out.ok().and_then(|o| serde_json::from_slice(&o.stdout).ok()).unwrap_or_default()
}

/// A real Prometheus (on loopback, generated config, the repository's rules) scrapes a
/// running `launch --workers 2`: the target is up, `moxin_step` rises, and every recording
/// and alerting rule evaluates without error against the live series.
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
    let job = crate::common::tiny_job(t, 100_000, "");
    let mut launch = Command::new(crate::common::BIN)
        .args(["launch", crate::common::s(&job), "--workers", "2", "--out", crate::common::s(&t.join("run"))])
        .args(["--set", &format!("cluster.metrics_listen=127.0.0.1:{metrics_port}")])
        .env("MOXIN_LOG", "warn")
        .spawn()
        .unwrap();
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/rules.yml");
    let config = t.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {:?}\nscrape_configs:\n  \
             - job_name: moxin-coordinator\n    static_configs:\n      - targets: [\"127.0.0.1:{metrics_port}\"]\n",
            rules.display().to_string()
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
            .is_some_and(|a| !a.is_empty() && a.iter().all(|t| t["health"] == "up"));
        let groups = get(prom_port, "/api/v1/rules");
        let rules: Vec<&serde_json::Value> = groups["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        let evaluated = rules.len() == 10 && rules.iter().all(|r| r["health"] == "ok");
        if up && evaluated {
            outcome = Ok(());
            break;
        }
        outcome = Err(format!("targets {targets}; rules {groups}"));
    }
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    // A clean stop (SIGINT): the workers stop with it instead of waiting for a coordinator.
    let _ = Command::new("kill").args(["-INT", &launch.id().to_string()]).status();
    let _ = launch.wait();
    outcome.unwrap();
}
