//! A car's telematics unit stolen, end to end with real processes: a gateway with its mTLS
//! listener and revocation list, the real agent binary as the stolen unit and as its
//! replacement (each with a certificate from `caasctl certs car`), and the technician's
//! `caasctl` revoking the stolen unit's certificate and replacing the car's key.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::*;

use std::path::{Path, PathBuf};

use caas_sim::api::{Api, Lasting};
use caas_tests::{
    caasctl, make_key, metric, stdout_of, AgentProcess, AgentSpec, AgentTls, KeyFiles, Retry,
};

/// A VIN with a valid check digit.
const VIN: &str = "1HGCM82633A004352";

/// Runs caasctl, which must succeed; returns its standard output.
async fn ctl_ok(args: &[&str]) -> String {
    let out = caasctl(ctl(), args).await.unwrap();
    stdout_of(&out).unwrap()
}

async fn metric_now(api: &Api, name: &str) -> f64 {
    metric(api, name).await.unwrap()
}

async fn connectivity(api: &Api) -> String {
    let status = api.vehicle_status(VIN).await.unwrap();
    status["connectivity"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_units_certificate_is_revoked_and_its_replacement_takes_over() {
    let dir = tempfile::Builder::new()
        .prefix("caas-e2e-stolen-unit-")
        .tempdir()
        .unwrap();
    let pki = dir.path().join("pki");
    ctl_ok(&["certs", "init", "--out", path(&pki)]).await;
    let certificate = |unit: &str| -> PathBuf { dir.path().join(unit) };
    for unit in ["unit-a", "unit-b"] {
        let out = certificate(unit);
        ctl_ok(&[
            "certs",
            "car",
            "--vin",
            VIN,
            "--ca-dir",
            path(&pki),
            "--out",
            path(&out),
        ])
        .await;
    }

    // Many short attempts: a request waits through the seconds no unit is connected.
    let retry = Retry {
        attempts: 200,
        attempt_timeout: "500ms",
        backoff: "200ms",
    };
    let mqtts = format!("127.0.0.1:{}", caas_sim::gateway_proc::free_port().unwrap());
    let Started {
        receiver,
        gateway,
        api,
        gateway_key,
    } = start_gateway_with(
        dir.path(),
        retry,
        &[
            "--mqtts",
            &mqtts,
            "--tls-ca",
            path(&pki.join("ca.pem")),
            "--tls-cert",
            path(&pki.join("server.pem")),
            "--tls-key",
            path(&pki.join("server.key")),
            "--tls-crl",
            path(&pki.join("crl.pem")),
        ],
    )
    .await;
    let unit = |name: &str, device_key: &Path| AgentSpec {
        vin: VIN.to_string(),
        broker: mqtts.clone(),
        tls: Some(AgentTls {
            ca: pki.join("ca.pem"),
            cert: certificate(name).join(format!("{VIN}.pem")),
            key: certificate(name).join(format!("{VIN}.key")),
        }),
        gateway_keys: vec![gateway_key.clone()],
        device_key: device_key.to_path_buf(),
        data: dir.path().join(format!("{name}-state")),
        log: dir.path().join(format!("{name}.log")),
    };
    let permanent = serde_json::Map::new();
    let activate = |service: &'static str, flag: &'static str| {
        let (api, permanent) = (&api, &permanent);
        async move {
            api.activate(
                VIN,
                service,
                &[flag.to_string()],
                permanent,
                &Lasting::Permanent,
            )
            .await
            .unwrap()
        }
    };

    // The car with unit A, over mutual TLS: a service activated.
    let KeyFiles {
        secret: key_a,
        public_hex: public_a,
        ..
    } = make_key(ctl(), dir.path(), "unit-a-key").await.unwrap();
    api.register_vehicle(VIN, &public_a, caas_sim::car::SEED_PLATFORM, "1.0.0")
        .await
        .unwrap();
    let unit_a = AgentProcess::start(agent(), &unit("unit-a", &key_a))
        .await
        .unwrap();
    let first = activate("heated-seats", "heated_seats").await;
    let answered = receiver
        .wait_for(std::slice::from_ref(&first), DEADLINE)
        .await;
    assert_eq!(answered, 1, "no callback; unit A:\n{}", unit_a.log_text());
    assert_eq!(receiver.callbacks(&first)[0].status, "ACTIVATED");
    assert_eq!(unit_a.active_services().await.unwrap(), ["heated-seats"]);

    // Unit A is stolen with the car's certificate. The technician revokes it: the gateway
    // reads the list, closes unit A's connection and refuses its every reconnection.
    let revoked = ctl_ok(&[
        "certs",
        "revoke",
        "--cert",
        path(&certificate("unit-a").join(format!("{VIN}.pem"))),
        "--ca-dir",
        path(&pki),
        "--reason",
        "key-compromise",
    ])
    .await;
    assert!(revoked.contains("revoked"), "{revoked}");
    wait_until(
        "unit A's live connection closed",
        || metric_now(&api, "caas_mqtts_revoked_closed_total"),
        |n| *n >= 1.0,
    )
    .await;
    wait_until("the car offline", || connectivity(&api), |c| c == "OFFLINE").await;
    wait_until(
        "unit A's reconnection refused",
        || metric_now(&api, "caas_mqtts_revoked_refused_total"),
        |n| *n >= 1.0,
    )
    .await;

    // A request made now reaches no unit: the stolen one cannot get it.
    let second = activate("power-boost", "power_boost").await;
    let pending = wait_until(
        "the second request re-sent",
        || async { api.request(&second).await.unwrap() },
        |r| r["attempts"].as_u64().is_some_and(|n| n >= 2),
    )
    .await;
    assert_eq!(pending["status"], "IN_PROGRESS", "{pending}");

    // Unit B, with a key and a certificate of its own: the technician replaces the car's
    // key, and the new unit completes the request in flight.
    let KeyFiles {
        secret: key_b,
        public_hex: public_b,
        ..
    } = make_key(ctl(), dir.path(), "unit-b-key").await.unwrap();
    ctl_ok(&[
        "vehicle",
        "rekey",
        VIN,
        "--public-key",
        &public_b,
        "--previous-public-key",
        &public_a,
        "--yes",
        "--gateway",
        gateway.http.as_str(),
        "--token",
        &gateway.token,
    ])
    .await;
    let unit_b = AgentProcess::start(agent(), &unit("unit-b", &key_b))
        .await
        .unwrap();
    let answered = receiver
        .wait_for(std::slice::from_ref(&second), DEADLINE)
        .await;
    assert_eq!(
        answered,
        1,
        "no callback; unit B:\n{}\ngateway:\n{}",
        unit_b.log_text(),
        gateway.log_text()
    );
    assert_eq!(receiver.callbacks(&second)[0].status, "ACTIVATED");
    assert_eq!(
        unit_b.active_services().await.unwrap(),
        ["heated-seats", "power-boost"]
    );

    // Unit A goes on trying with its revoked certificate, and is refused each time: it
    // neither gets the car's commands nor knocks unit B's session off, which completes a
    // third request meanwhile.
    let refused_before = metric_now(&api, "caas_mqtts_revoked_refused_total").await;
    wait_until(
        "unit A tried again and was refused",
        || metric_now(&api, "caas_mqtts_revoked_refused_total"),
        |n| *n > refused_before,
    )
    .await;
    let third = activate("snow-mode", "snow_mode").await;
    assert_eq!(
        receiver
            .wait_for(std::slice::from_ref(&third), DEADLINE)
            .await,
        1
    );
    assert_eq!(receiver.callbacks(&third)[0].status, "ACTIVATED");
    assert_eq!(connectivity(&api).await, "ONLINE");
    assert_eq!(unit_a.active_services().await.unwrap(), ["heated-seats"]);
    assert_eq!(
        metric_now(&api, "caas_mqtts_revoked_closed_total").await,
        1.0,
        "unit B's connection was never closed"
    );
    for id in [&first, &second, &third] {
        assert_eq!(receiver.callbacks(id).len(), 1, "one callback for {id}");
    }
}
