#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! `caasctl` against a gateway serving the IoT API over TLS with client certificates
//! (`--https`, `--https-client-ca`), with a PKI made by `caasctl certs`: `--ca` trusts the
//! development CA, `--client-cert`/`--client-key` present the backend's certificate, and
//! each missing or wrong piece is a one-line error with a non-zero exit.

mod common;

use common::{
    caasctl, caasctl_env, ctl, gateway_config, register_car, s, start_gateway_listening, value_of,
    OPS_TOKEN as TOKEN,
};

const VIN1: &str = "WVWZZZ1JZXW000001";

#[test]
fn status_over_tls_needs_the_ca_and_the_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    caasctl(&["certs", "init", "--out", s(&pki)]).ok();
    caasctl(&["certs", "client", "--name", "backend", "--ca-dir", s(&pki)]).ok();
    let mut config = gateway_config(dir.path().join("gw"), TOKEN);
    config.https = Some("127.0.0.1:0".parse().unwrap());
    config.https_files = Some(caas_gateway::HttpsFiles {
        cert: pki.join("server.pem"),
        key: pki.join("server.key"),
        client_ca: Some(pki.join("ca.pem")),
    });
    let (plain, tls) = start_gateway_listening(config);
    register_car(&format!("http://{plain}"), TOKEN, VIN1, 1);
    let base = format!("https://127.0.0.1:{}", tls.unwrap().port());
    let (ca, cert, key) = (
        pki.join("ca.pem"),
        pki.join("backend.pem"),
        pki.join("backend.key"),
    );
    let status = |extra: &[&str]| ctl(&base, &[&["vehicle", "status", VIN1], extra].concat());

    let all = [
        "--ca",
        s(&ca),
        "--client-cert",
        s(&cert),
        "--client-key",
        s(&key),
    ];
    let t = status(&all).ok().to_owned();
    assert_eq!(value_of(&t, "VIN"), VIN1, "{t}");
    // The CA from the environment, as scripts set it once.
    let run = caasctl_env(
        &[
            "vehicle",
            "status",
            VIN1,
            "--gateway",
            &base,
            "--token",
            TOKEN,
            "--json",
        ],
        &[
            ("CAAS_GATEWAY_CA", s(&ca)),
            ("CAAS_CLIENT_CERT", s(&cert)),
            ("CAAS_CLIENT_KEY", s(&key)),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(run.ok()).unwrap();
    assert_eq!(v["vin"], VIN1);

    // The stats over the same listener show its certificate's expiry (`certs init`: years).
    let stats = ctl(&base, &[&["gateway", "stats", "--json"][..], &all].concat());
    let v: serde_json::Value = serde_json::from_str(stats.ok()).unwrap();
    let left = &v["certificates"]["caas_https_cert_expires_at_seconds"]["daysLeft"];
    assert!(left.as_i64().is_some_and(|d| d > 365), "{v}");

    // Without the CA the gateway's certificate is not trusted.
    let line = status(&all[2..]).err().to_owned();
    assert!(
        line.contains("cannot reach") && line.to_lowercase().contains("certificate"),
        "{line}"
    );
    // Without a client certificate the gateway ends the handshake.
    let line = status(&all[..2]).err().to_owned();
    assert!(line.contains("cannot reach"), "{line}");
    // A key where the CA should be, a key where the certificate should be.
    let line = status(&[
        "--ca",
        s(&key),
        "--client-cert",
        s(&cert),
        "--client-key",
        s(&key),
    ])
    .err()
    .to_owned();
    assert!(
        line.contains("backend.key") && line.contains("no PEM certificate"),
        "{line}"
    );
    let line = status(&[
        "--ca",
        s(&ca),
        "--client-cert",
        s(&key),
        "--client-key",
        s(&key),
    ])
    .err()
    .to_owned();
    assert!(
        line.contains("not a PEM certificate and private key"),
        "{line}"
    );
    let line = status(&["--ca", s(&dir.path().join("missing.pem"))])
        .err()
        .to_owned();
    assert!(line.contains("missing.pem"), "{line}");
    // One half of the client pair alone is a usage error.
    let half = status(&["--ca", s(&ca), "--client-cert", s(&cert)]);
    assert_eq!(half.code, 2, "{}", half.stderr);
    assert!(half.stderr.contains("--client-key"), "{}", half.stderr);
}

#[test]
fn a_server_certificate_for_another_host_serves_the_api_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    caasctl(&["certs", "init", "--out", s(&pki)]).ok();
    let out = dir.path().join("api");
    let t = caasctl(&[
        "certs",
        "server",
        "--name",
        "gateway.fleet.test",
        "--name",
        "127.0.0.1",
        "--ca-dir",
        s(&pki),
        "--out",
        s(&out),
    ])
    .ok()
    .to_owned();
    assert!(
        t.contains("server certificate for gateway.fleet.test, 127.0.0.1"),
        "{t}"
    );
    let (cert, key) = (
        out.join("gateway.fleet.test.pem"),
        out.join("gateway.fleet.test.key"),
    );
    let mut config = gateway_config(dir.path().join("gw"), TOKEN);
    config.https = Some("127.0.0.1:0".parse().unwrap());
    config.no_http = true;
    config.https_files = Some(caas_gateway::HttpsFiles {
        cert,
        key,
        client_ca: None,
    });
    let (_, tls) = start_gateway_listening(config);
    let base = format!("https://127.0.0.1:{}", tls.unwrap().port());
    let run = caasctl(&[
        "vehicle",
        "list",
        "--gateway",
        &base,
        "--token",
        TOKEN,
        "--ca",
        s(&pki.join("ca.pem")),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(run.ok()).unwrap();
    assert!(v["vehicles"].as_array().is_some_and(Vec::is_empty), "{v}");

    for bad in ["gateway fleet", "a..b", "*."] {
        let line = caasctl(&[
            "certs",
            "server",
            "--name",
            bad,
            "--ca-dir",
            s(&pki),
            "--out",
            s(&out),
        ])
        .err()
        .to_owned();
        assert!(line.contains("invalid server name"), "{bad}: {line}");
    }
    let names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names.len(),
        2,
        "nothing written for the bad names: {names:?}"
    );
}
