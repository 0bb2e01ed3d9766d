//! The control plane is closed to strangers: a coordinator with a join token refuses RPCs
//! without it (and logs the refusal, never the secret); one with TLS and a client CA admits
//! only workers that trust its certificate and present one of their own from that CA —
//! no certificate, a certificate from another CA, an expired one, or a worker trusting
//! another CA are each refused. Certificates are made by the test (rcgen).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

use crate::common::{s, tiny_job, BIN};

/// PEM files of a test PKI.
struct Pki {
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
    expired_client: (PathBuf, PathBuf),
    rogue_ca: PathBuf,
    rogue_client: (PathBuf, PathBuf),
}

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let pem = params.self_signed(&key).unwrap().pem();
    (params, key, pem)
}

fn leaf(dir: &Path, name: &str, issuer: &Issuer<'_, KeyPair>, expired: bool) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let cert = params.signed_by(&key, issuer).unwrap();
    let (c, k) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

fn pki(dir: &Path) -> Pki {
    let (ca_params, ca_key, ca_pem) = ca("moxin test CA");
    let (rogue_params, rogue_key, rogue_pem) = ca("rogue CA");
    let issuer = Issuer::new(ca_params, ca_key);
    let rogue = Issuer::new(rogue_params, rogue_key);
    let (ca, rogue_ca) = (dir.join("ca.pem"), dir.join("rogue-ca.pem"));
    std::fs::write(&ca, ca_pem).unwrap();
    std::fs::write(&rogue_ca, rogue_pem).unwrap();
    Pki {
        ca,
        server: leaf(dir, "coordinator", &issuer, false),
        client: leaf(dir, "worker", &issuer, false),
        expired_client: leaf(dir, "expired-worker", &issuer, true),
        rogue_ca,
        rogue_client: leaf(dir, "rogue-worker", &rogue, false),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A coordinator for a 3-step tiny job on 127.0.0.1 with `args`; its log goes to `log`.
fn coordinator(dir: &Path, args: &[&str], log: &Path) -> (Child, u16) {
    let job = tiny_job(dir, 3, "");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let child = Command::new(BIN)
        .args(["coordinator", s(&job), "--out", s(&dir.join("run")), "--listen", &listen])
        .args(args)
        .env("MOXIN_LOG", "info")
        .env_remove("MOXIN_TOKEN")
        .env_remove("MOXIN_TOKEN_FILE")
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    // Serving once it listens.
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(&listen).is_err() {
        assert!(Instant::now() < deadline, "the coordinator did not listen: {}", std::fs::read_to_string(log).unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, port)
}

/// Runs the binary with `args` and `MOXIN_TOKEN` = `token` (if any).
fn client(args: &[&str], token: Option<&str>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env("MOXIN_LOG", "warn").env_remove("MOXIN_TOKEN").env_remove("MOXIN_TOKEN_FILE");
    if let Some(t) = token {
        cmd.env("MOXIN_TOKEN", t);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).output().unwrap()
}

/// A worker that must be refused: exit 1, no panic, `expected` in its error.
fn refused(args: &[&str], token: Option<&str>, expected: &[&str]) {
    let started = Instant::now();
    let out = client(args, token);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?} should be refused: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(expected.iter().any(|e| stderr.contains(e)), "{args:?}: expected one of {expected:?} in: {stderr}");
    // Refused as final, not retried until --connect-timeout ran out.
    assert!(!stderr.contains("did not come back within"), "{args:?} was retried: {stderr}");
    eprintln!("refused in {:.1} s: {}", started.elapsed().as_secs_f64(), stderr.trim().lines().last().unwrap_or(""));
}

fn finishes(mut coordinator: Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = coordinator.try_wait().unwrap() {
            assert!(status.success(), "coordinator: {status}\n{}", std::fs::read_to_string(log).unwrap());
            return;
        }
        if Instant::now() > deadline {
            let _ = coordinator.kill();
            panic!("the job did not finish: {}", std::fs::read_to_string(log).unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_join_token_is_required_on_every_rpc_and_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let token = "0f1e2d3c4b5a69788796a5b4c3d2e1f0";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let log = dir.path().join("coordinator.log");
    let (coord, port) = coordinator(dir.path(), &["--token-file", s(&token_file)], &log);
    let url = format!("http://127.0.0.1:{port}");
    let wrong = "ffffffffffffffffffffffffffffffff";

    refused(&["checkpoint", &url], None, &["no join token"]);
    refused(&["checkpoint", &url], Some(wrong), &["wrong join token"]);
    refused(&["scale", &url, "--workers", "2"], Some(wrong), &["wrong join token"]);
    let worker = ["worker", "--coordinator", url.as_str(), "--connect-timeout", "5"];
    refused(&worker, None, &["no join token"]);
    refused(&worker, Some(wrong), &["wrong join token"]);
    // A token too short to be safe is refused before anything is sent.
    refused(&worker, Some("short"), &["at least 16"]);

    let out = client(&worker, Some(token));
    assert!(out.status.success(), "the worker with the token: {}", String::from_utf8_lossy(&out.stderr));
    finishes(coord, &log);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("refused an RPC from 127.0.0.1"), "{text}");
    assert!(!text.contains(wrong) && !text.contains(token), "a token reached the log:\n{text}");
}

#[test]
fn mutual_tls_admits_only_workers_with_a_certificate_from_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let log = dir.path().join("coordinator.log");
    let (coord, port) = coordinator(
        dir.path(),
        &["--tls-cert", s(&pki.server.0), "--tls-key", s(&pki.server.1), "--tls-client-ca", s(&pki.ca)],
        &log,
    );
    let url = format!("https://127.0.0.1:{port}");
    let worker = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> =
            ["worker", "--coordinator", &url, "--connect-timeout", "5"].iter().map(|a| a.to_string()).collect();
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };
    let run = |extra: &[&str], expected: &[&str]| {
        let args = worker(extra);
        refused(&args.iter().map(String::as_str).collect::<Vec<_>>(), None, expected);
    };
    let tls_refusal = ["certificate", "alert", "handshake", "cannot reach", "lost the connection"];
    // Plain HTTP to a TLS port, and https without a CA to check the coordinator against.
    refused(
        &["worker", "--coordinator", &format!("http://127.0.0.1:{port}"), "--connect-timeout", "5"],
        None,
        &["use an https:// URL and --tls-ca"],
    );
    run(&[], &["needs --tls-ca"]);
    // Trusting another CA: the coordinator's certificate does not verify.
    run(&["--tls-ca", s(&pki.rogue_ca)], &[&format!("not signed by the CA in --tls-ca {}", s(&pki.rogue_ca))]);
    // A key that is not the certificate's is named before anything is tried.
    run(
        &["--tls-ca", s(&pki.ca), "--tls-cert", s(&pki.client.0), "--tls-key", s(&pki.rogue_client.1)],
        &[&format!("--tls-key {}: the key does not belong to the certificate", s(&pki.rogue_client.1))],
    );
    // No client certificate, one from another CA, an expired one: the coordinator refuses.
    run(&["--tls-ca", s(&pki.ca)], &tls_refusal);
    run(
        &["--tls-ca", s(&pki.ca), "--tls-cert", s(&pki.rogue_client.0), "--tls-key", s(&pki.rogue_client.1)],
        &tls_refusal,
    );
    run(
        &["--tls-ca", s(&pki.ca), "--tls-cert", s(&pki.expired_client.0), "--tls-key", s(&pki.expired_client.1)],
        &tls_refusal,
    );
    // A bad file is named: a missing one, and a key given where the CA belongs.
    run(&["--tls-ca", s(&dir.path().join("absent.pem"))], &["absent.pem"]);
    run(
        &["--tls-ca", s(&pki.client.1)],
        &[&format!("{}: the CA certificate has no CERTIFICATE block", s(&pki.client.1))],
    );
    // Mutual TLS without a client certificate: the coordinator requires one.
    run(&["--tls-ca", s(&pki.ca)], &["requires a client certificate"]);

    // The coordinator's own pair is checked before its run directory is touched.
    let job = tiny_job(dir.path(), 3, "");
    let elsewhere = dir.path().join("mismatched-run");
    let out = client(
        &[
            "coordinator",
            s(&job),
            "--out",
            s(&elsewhere),
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            s(&pki.server.0),
            "--tls-key",
            s(&pki.client.1),
        ],
        None,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("the coordinator's --tls-cert"), "{stderr}");
    assert!(stderr.contains("does not belong to the certificate") && !elsewhere.exists(), "{stderr}");

    // The coordinator's log shows the connections it refused at the handshake.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("tls accept error"), "{text}");

    let args = worker(&["--tls-ca", s(&pki.ca), "--tls-cert", s(&pki.client.0), "--tls-key", s(&pki.client.1)]);
    let out = client(&args.iter().map(String::as_str).collect::<Vec<_>>(), None);
    assert!(out.status.success(), "the certified worker: {}", String::from_utf8_lossy(&out.stderr));
    finishes(coord, &log);
    let state = std::fs::read_to_string(dir.path().join("run/coordinator/state.json")).unwrap();
    assert!(state.contains("https://127.0.0.1"), "{state}");
}
