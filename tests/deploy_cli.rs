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
