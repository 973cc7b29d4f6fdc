//! `caas-gateway check` (the real binary): the settings `serve` would start with, checked
//! without starting: every certificate, key and list loaded, expiry reported (expired: an
//! error; within 30 days: a warning), nothing written; and the expiry gauges while serving.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::process::Command;

use common::*;

struct Checked {
    code: i32,
    stdout: String,
    stderr: String,
}

fn check(args: &[&str]) -> Checked {
    let out = Command::new(env!("CARGO_BIN_EXE_caas-gateway"))
        .arg("check")
        .args(args)
        .env_clear()
        .output()
        .unwrap();
    Checked {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn settings_that_would_start_are_reported_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    pki.write_crl(1, &[]);
    let data = dir.path().join("gw");
    let (ca, cert, key, crl) = (
        dir.path().join("ca.pem"),
        dir.path().join("server.pem"),
        dir.path().join("server.key"),
        dir.path().join("crl.pem"),
    );
    let mqtts = |crl: &std::path::Path| {
        [
            "--mqtts",
            "127.0.0.1:8883",
            "--tls-ca",
            s(&ca),
            "--tls-cert",
            s(&cert),
            "--tls-key",
            s(&key),
            "--tls-crl",
        ]
        .map(str::to_owned)
        .into_iter()
        .chain([s(crl).to_owned()])
        .collect::<Vec<_>>()
    };
    let mut all: Vec<String> = [
        "--https",
        "127.0.0.1:8443",
        "--https-cert",
        s(&cert),
        "--https-key",
        s(&key),
        "--https-client-ca",
        s(&ca),
        "--data",
        s(&data),
        "--webhook-url",
        "https://core.example/hook",
        "--webhook-secret",
        "s3cret",
        "--webhook-ca",
        s(&ca),
        "--api-token",
        "t0ken",
    ]
    .map(str::to_owned)
    .to_vec();
    all.extend(mqtts(&crl));
    let r = check(&all.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    for expected in [
        "IoT API over HTTP on 127.0.0.1:8080 (loopback)",
        "IoT API over TLS on 127.0.0.1:8443; callers need a certificate from",
        "IoT API certificate",
        "MQTT over mutual TLS on 127.0.0.1:8883; revocation list",
        "(0 revoked)",
        "MQTT TLS certificate",
        "valid until",
        "callbacks to https://core.example/hook, trusting",
        "warning: no signing key at",
        "no store in",
        "retries: 4 attempts of 60s, backoff 60s,300s,900s,1800s",
        "ok: serve would start with these settings (1 warning)",
    ] {
        assert!(r.stdout.contains(expected), "{expected:?} in\n{}", r.stdout);
    }
    assert!(!data.exists(), "check wrote nothing");

    // Within 30 days: a warning, still a start. Expired: not a start.
    let soon = time::OffsetDateTime::now_utc() + time::Duration::days(10);
    pki.issue_until("soon", &["127.0.0.1"], "server", None, true, Some(soon));
    let gone = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    pki.issue_until("gone", &["127.0.0.1"], "server", None, true, Some(gone));
    let with_cert = |name: &str| {
        let (c, k) = (
            dir.path().join(format!("{name}.pem")),
            dir.path().join(format!("{name}.key")),
        );
        check(&[
            "--https",
            "127.0.0.1:8443",
            "--https-cert",
            s(&c),
            "--https-key",
            s(&k),
            "--no-http",
        ])
    };
    let r = with_cert("soon");
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("warning: IoT API certificate")
            && (r.stdout.contains("in 9 days") || r.stdout.contains("in 10 days")),
        "{}",
        r.stdout
    );
    assert!(
        !r.stdout.contains("IoT API over HTTP"),
        "--no-http: {}",
        r.stdout
    );
    assert!(
        r.stdout.contains("warning: the development API token"),
        "{}",
        r.stdout
    );
    let r = with_cert("gone");
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("gone.pem expired at"), "{}", r.stderr);

    // A key that is not the certificate's, a list from no CA of --tls-ca, a bad combination.
    let r = check(&[
        "--https",
        "127.0.0.1:8443",
        "--https-cert",
        s(&cert),
        "--https-key",
        s(&dir.path().join("soon.key")),
    ]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("--https-cert"), "{}", r.stderr);
    let other = tempfile::tempdir().unwrap();
    let foreign = Pki::new(other.path()).write_crl(1, &[]);
    let r = check(
        &mqtts(&foreign)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let r = check(&["--no-http"]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("--no-http needs --https"), "{}", r.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listeners_certificates_expiry_is_served_as_gauges() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let end = time::OffsetDateTime::now_utc() + time::Duration::days(20);
    let end = end.replace_nanosecond(0).unwrap();
    pki.issue_until("api", &["127.0.0.1"], "api", None, true, Some(end));
    let mut c = config(&dir.path().join("gw"), None);
    c.https = Some("127.0.0.1:0".parse().unwrap());
    c.https_files = Some(caas_gateway::HttpsFiles {
        cert: dir.path().join("api.pem"),
        key: dir.path().join("api.key"),
        client_ca: None,
    });
    let c = pki.with_mqtts(c);
    let gw = caas_gateway::start(c).await.unwrap();
    let api = Api::new(gw.http_addr());
    assert_eq!(
        api.metric("caas_https_cert_expires_at_seconds").await,
        end.unix_timestamp() as f64
    );
    let mqtts = api.metric("caas_mqtts_cert_expires_at_seconds").await;
    assert!(
        mqtts > (end + time::Duration::days(365)).unix_timestamp() as f64,
        "rcgen's far-off default: {mqtts}"
    );
    gw.shutdown().await;
}
