//! The IoT API over mutual TLS, end to end with real processes: a gateway serving it with
//! `--https` and `--https-client-ca` (a PKI made by `caasctl certs`), the real agent as the
//! car, the CaaS core's activation sent over TLS with the backend's client certificate, and
//! the technician's `caasctl` reading the car over the same listener.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::*;

use std::path::{Path, PathBuf};

use caas_tests::{caasctl, make_key, stdout_of, AgentProcess, AgentSpec, KeyFiles, Retry};

/// A VIN with a valid check digit.
const VIN: &str = "1HGCM82633A004352";

/// A client of the TLS listener trusting only the PKI's CA, with the backend's certificate
/// when `with_certificate`.
fn core_client(pki: &Path, with_certificate: bool) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(pki.join("ca.pem")).unwrap()).unwrap();
    let mut b = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .timeout(std::time::Duration::from_secs(10));
    if with_certificate {
        let mut pem = std::fs::read(pki.join("backend.pem")).unwrap();
        pem.extend(std::fs::read(pki.join("backend.key")).unwrap());
        b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    b.build().unwrap()
}

/// A development PKI made by `caasctl certs` in DIR/pki (with a `backend` client certificate
/// when `client_ca`), and a gateway process serving the IoT API over TLS with its server
/// certificate (asking callers for one from its CA when `client_ca`): the gateway, the TLS
/// listener's address and the PKI's directory.
async fn tls_gateway(dir: &Path, client_ca: bool) -> (Started, String, PathBuf) {
    let pki = dir.join("pki");
    let mut make = vec![vec!["certs", "init", "--out", path(&pki)]];
    if client_ca {
        make.push(vec![
            "certs",
            "client",
            "--name",
            "backend",
            "--ca-dir",
            path(&pki),
        ]);
    }
    for args in make {
        stdout_of(&caasctl(ctl(), &args).await.unwrap()).unwrap();
    }
    let retry = Retry {
        attempts: 4,
        attempt_timeout: "2s",
        backoff: "500ms",
    };
    let https = format!("127.0.0.1:{}", caas_sim::gateway_proc::free_port().unwrap());
    let (cert, key, ca) = (
        pki.join("server.pem"),
        pki.join("server.key"),
        pki.join("ca.pem"),
    );
    let mut flags = vec![
        "--https",
        &https,
        "--https-cert",
        path(&cert),
        "--https-key",
        path(&key),
    ];
    if client_ca {
        flags.extend(["--https-client-ca", path(&ca)]);
    }
    let started = start_gateway_with(dir, retry, &flags).await;
    (started, https, pki)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_core_activates_over_mutual_tls_and_the_technician_reads_the_car_over_it() {
    let dir = tempfile::Builder::new()
        .prefix("caas-e2e-https-")
        .tempdir()
        .unwrap();
    let (
        Started {
            receiver,
            gateway,
            api,
            gateway_key,
        },
        https,
        pki,
    ) = tls_gateway(dir.path(), true).await;
    let KeyFiles {
        secret, public_hex, ..
    } = make_key(ctl(), dir.path(), "car-key").await.unwrap();
    api.register_vehicle(VIN, &public_hex, caas_sim::car::SEED_PLATFORM, "1.0.0")
        .await
        .unwrap();
    let car = AgentProcess::start(
        agent(),
        &AgentSpec {
            vin: VIN.to_string(),
            broker: gateway.mqtt.clone(),
            tls: None,
            gateway_keys: vec![gateway_key.clone()],
            device_key: secret,
            data: dir.path().join("car-state"),
            log: dir.path().join("car.log"),
        },
    )
    .await
    .unwrap();

    // The CaaS core, over TLS with its client certificate and the token.
    let activation = serde_json::json!({
        "vin": VIN,
        "serviceId": "heated-seats",
        "configuration": {"featureFlags": ["heated_seats"], "parameters": {}},
        "duration": {"type": "PERMANENT"},
    });
    let url = format!("https://{https}/ota/activate");
    let answer = core_client(&pki, true)
        .post(&url)
        .bearer_auth(&gateway.token)
        .json(&activation)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 202);
    let body: serde_json::Value = answer.json().await.unwrap();
    let id = body["requestId"].as_str().unwrap().to_owned();
    let answered = receiver.wait_for(std::slice::from_ref(&id), DEADLINE).await;
    assert_eq!(answered, 1, "no callback; the car:\n{}", car.log_text());
    assert_eq!(receiver.callbacks(&id)[0].status, "ACTIVATED");

    // Without the client certificate the handshake is refused: nothing is made.
    let refused = core_client(&pki, false)
        .post(&url)
        .bearer_auth(&gateway.token)
        .json(&activation)
        .send()
        .await;
    assert!(refused.is_err(), "{refused:?}");

    // The technician, over the same listener.
    let base = format!("https://{https}");
    let status_over_tls = |extra: &[&str]| {
        let mut args = vec!["vehicle", "status", VIN, "--gateway", &base];
        args.extend(["--token", &gateway.token]);
        args.extend(extra);
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            caasctl(ctl(), &args).await.unwrap()
        }
    };
    let (ca, cert, key) = (
        pki.join("ca.pem"),
        pki.join("backend.pem"),
        pki.join("backend.key"),
    );
    let status = status_over_tls(&[
        "--ca",
        path(&ca),
        "--client-cert",
        path(&cert),
        "--client-key",
        path(&key),
        "--json",
    ])
    .await;
    let status: serde_json::Value = serde_json::from_str(&stdout_of(&status).unwrap()).unwrap();
    assert_eq!(status["connectivity"], "ONLINE", "{status}");
    assert_eq!(
        status["activeServices"][0]["serviceId"], "heated-seats",
        "{status}"
    );
    assert_eq!(status["activeServices"][0]["status"], "ACTIVE", "{status}");
    let without_ca = status_over_tls(&[]).await;
    assert!(
        !without_ca.status.success(),
        "no --ca: the certificate is not trusted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_registers_and_drives_cars_through_the_tls_listener() {
    let dir = tempfile::Builder::new()
        .prefix("caas-e2e-https-sim-")
        .tempdir()
        .unwrap();
    let (Started { gateway, .. }, https, pki) = tls_gateway(dir.path(), false).await;
    let base = format!("https://{https}");
    let ca = pki.join("ca.pem");
    let vins = dir.path().join("vins.txt");

    // The fleet registers its cars and fetches the gateway's key over TLS.
    let mut fleet = std::process::Command::new(sim())
        .args(["fleet", "--gateway", &base, "--gateway-ca", path(&ca)])
        .args(["--api-token", &gateway.token, "--mqtt", &gateway.mqtt])
        .args(["--cars", "3", "--no-progress", "--duration", "2m"])
        .arg("--vins-out")
        .arg(&vins)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let api = gateway.api().unwrap();
    wait_until(
        "3 cars registered over TLS and connected",
        || caas_tests::metric(&api, "caas_connected_cars"),
        |n| matches!(n, Ok(v) if *v >= 3.0),
    )
    .await
    .unwrap();

    // A run over TLS: its activations are accepted. Their callbacks go to the gateway's
    // webhook (this test's receiver), so the run's own receiver waits only its settle.
    let scenario = dir.path().join("scenario.toml");
    std::fs::write(&scenario, "settle = \"1s\"\n").unwrap();
    let report = dir.path().join("run.json");
    let run = |ca: Option<&Path>| {
        let mut cmd = std::process::Command::new(sim());
        cmd.args(["run", "--gateway", &base, "--api-token", &gateway.token])
            .arg("--scenario")
            .arg(&scenario)
            .arg("--vins")
            .arg(&vins)
            .args(["--rate", "5", "--duration", "1s"])
            .args([
                "--webhook-listen",
                "127.0.0.1:0",
                "--webhook-secret",
                "unused",
            ])
            .arg("--report")
            .arg(&report)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(ca) = ca {
            cmd.arg("--gateway-ca").arg(ca);
        }
        let status = cmd.status().unwrap();
        assert!(status.success(), "caas-sim run: {status}");
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        (
            r["accepted"].as_u64().unwrap(),
            r["http_errors"].as_u64().unwrap(),
        )
    };
    let (accepted, errors) = run(Some(&ca));
    assert!(
        accepted >= 3 && errors == 0,
        "{accepted} accepted, {errors} errors"
    );
    // Without the CA the gateway's certificate is not trusted: nothing is accepted.
    let (accepted, errors) = run(None);
    assert_eq!(accepted, 0, "{errors} errors");
    assert!(errors >= 3);
    let _ = fleet.kill();
    let _ = fleet.wait();
}
