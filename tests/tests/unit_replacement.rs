//! A car's telematics unit replaced, end to end with real processes: a gateway, the real
//! agent binary as the old unit and as the new one, and the technician's `caasctl` making
//! the keys and replacing the car's key at the gateway (see the crate docs).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::*;

use std::path::Path;

use caas_sim::api::{Api, Lasting};
use caas_tests::{
    caasctl, make_key, service_states, start_gateway_and_receiver, stdout_of, AgentProcess,
    AgentSpec, KeyFiles, Retry,
};
use serde_json::Value;

/// A VIN with a valid check digit.
const VIN: &str = "1HGCM82633A004352";

/// A unit's device key pair as the technician makes it: `caasctl keys gen`.
async fn make_device_key(dir: &Path, name: &str) -> KeyFiles {
    make_key(ctl(), dir, name).await.unwrap()
}

/// `caas_reports_forged_total` from the gateway's `/metrics`: reports that failed
/// verification and were ignored.
async fn forged_reports(api: &Api) -> u64 {
    caas_tests::metric(api, "caas_reports_forged_total")
        .await
        .unwrap() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_unit_takes_over_once_the_technician_replaces_the_cars_key() {
    // Many short attempts: a request waits through the minutes no unit is connected (about
    // 140 s of attempts) instead of failing, while a connected unit is re-sent its command
    // within a second.
    let retry = Retry {
        attempts: 200,
        attempt_timeout: "500ms",
        backoff: "200ms",
    };
    let (gateway, receiver) = start_gateway_and_receiver(sim(), None, retry)
        .await
        .unwrap();
    let api = gateway.api().unwrap();
    let dir = tempfile::Builder::new()
        .prefix("caas-e2e-unit-replacement-")
        .tempdir()
        .unwrap();
    let gateway_key = dir.path().join("gateway.pub");
    write_gateway_key(&api, &gateway_key).await;
    let unit = |name: &str, device_key: &Path| AgentSpec {
        vin: VIN.to_string(),
        broker: gateway.mqtt.clone(),
        tls: None,
        gateway_keys: vec![gateway_key.clone()],
        device_key: device_key.to_path_buf(),
        // Each unit, and each start of a unit standing for a new one, has a state
        // directory of its own: a new unit knows nothing of the car's services.
        data: dir.path().join(format!("{name}-state")),
        log: dir.path().join(format!("{name}.log")),
    };
    let target = [
        "--gateway",
        gateway.http.as_str(),
        "--token",
        &gateway.token,
    ];
    let ctl_json = |args: &[&str]| {
        let args: Vec<String> = args
            .iter()
            .chain(&target)
            .chain(&["--json"])
            .map(|s| s.to_string())
            .collect();
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = caasctl(ctl(), &refs).await.unwrap();
            serde_json::from_str::<Value>(&stdout_of(&out).unwrap()).unwrap()
        }
    };

    // The car with its first unit (key A): registered, connected, a service activated. The
    // agent's default catalogue is the seed's, the simulated platform's.
    let KeyFiles {
        secret: key_a,
        public_hex: public_a,
        ..
    } = make_device_key(dir.path(), "unit-a").await;
    api.register_vehicle(VIN, &public_a, caas_sim::car::SEED_PLATFORM, "1.0.0")
        .await
        .unwrap();
    let mut unit_a = AgentProcess::start(agent(), &unit("unit-a", &key_a))
        .await
        .unwrap();
    let permanent = serde_json::Map::new();
    let first = api
        .activate(
            VIN,
            "heated-seats",
            &["heated_seats".to_string()],
            &permanent,
            &Lasting::Permanent,
        )
        .await
        .unwrap();
    let answered = receiver
        .wait_for(std::slice::from_ref(&first), DEADLINE)
        .await;
    assert_eq!(answered, 1, "no callback; unit A:\n{}", unit_a.log_text());
    assert_eq!(receiver.callbacks(&first)[0].status, "ACTIVATED");
    assert_eq!(unit_a.active_services().await.unwrap(), ["heated-seats"]);

    // The old unit is taken out. A request made now finds no unit: the gateway re-sends it
    // and it stays in progress.
    unit_a.kill().unwrap();
    let second = api
        .activate(
            VIN,
            "power-boost",
            &["power_boost".to_string()],
            &permanent,
            &Lasting::Permanent,
        )
        .await
        .unwrap();
    let pending = wait_until(
        "the second request re-sent",
        || async { api.request(&second).await.unwrap() },
        |r| r["attempts"].as_u64().is_some_and(|n| n >= 2),
    )
    .await;
    assert_eq!(pending["status"], "IN_PROGRESS", "{pending}");
    let second_seq = pending["seq"].as_u64().unwrap();

    // The new unit (key B) connected before its key is at the gateway: it gets the car's
    // commands (they verify with the gateway's key) and applies them, but the gateway
    // refuses its reports as forged, so the request does not complete with them.
    let KeyFiles {
        secret: key_b,
        public_hex: public_b,
        ..
    } = make_device_key(dir.path(), "unit-b").await;
    let mut early_unit_b = AgentProcess::start(agent(), &unit("unit-b-before-rekey", &key_b))
        .await
        .unwrap();
    wait_until(
        "the early new unit applied the second request's command",
        || async { early_unit_b.status().await.map(|s| s.applied_seq).ok() },
        |seq| seq.is_some_and(|s| s >= second_seq),
    )
    .await;
    // A report the unit sends from now on carries the applied command; once one more is
    // counted forged, the gateway has seen (and refused) what would have completed it.
    let forged_at_apply = forged_reports(&api).await;
    wait_until(
        "a report of the early new unit counted as forged",
        || forged_reports(&api),
        |n| *n > forged_at_apply,
    )
    .await;
    let still = api.request(&second).await.unwrap();
    assert_eq!(still["status"], "IN_PROGRESS", "{still}");
    assert!(receiver.callbacks(&second).is_empty());
    early_unit_b.kill().unwrap();

    // The technician replaces the car's key with the new unit's.
    let replaced = ctl_json(&[
        "vehicle",
        "rekey",
        VIN,
        "--public-key",
        &public_b,
        "--previous-public-key",
        &public_a,
        "--yes",
    ])
    .await;
    assert_eq!(replaced["publicKey"], public_b.as_str(), "{replaced}");
    let listed = ctl_json(&["vehicle", "list"]).await;
    let car = listed["vehicles"]
        .as_array()
        .unwrap_or_else(|| panic!("no vehicles in {listed}"))
        .iter()
        .find(|v| v["vin"] == VIN)
        .unwrap_or_else(|| panic!("{VIN} not listed: {listed}"));
    assert_eq!(car["publicKey"], public_b.as_str(), "{car}");

    // The new unit, installed with an empty state: the gateway believes its reports now,
    // sends it the car's whole state, and the request in flight completes.
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
    let statuses = |id: &str| -> Vec<String> {
        receiver
            .callbacks(id)
            .into_iter()
            .map(|c| c.status)
            .collect()
    };
    assert_eq!(statuses(&second), ["ACTIVATED"]);
    assert_eq!(api.request(&second).await.unwrap()["status"], "COMPLETED");
    let status = ctl_json(&["vehicle", "status", VIN]).await;
    assert_eq!(
        service_states(&status).unwrap(),
        [
            ("heated-seats".to_string(), "ACTIVE".to_string()),
            ("power-boost".to_string(), "ACTIVE".to_string()),
        ],
        "{status}"
    );
    assert_eq!(
        unit_b.active_services().await.unwrap(),
        ["heated-seats", "power-boost"]
    );
    let history = ctl_json(&["vehicle", "history", VIN]).await;
    let key_replacements = history["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("no entries in {history}"))
        .iter()
        .filter(|e| e["type"] == "KEY_REPLACED")
        .count();
    assert_eq!(key_replacements, 1, "{history}");
    // The first request's one callback was all: the replacement did not repeat it.
    assert_eq!(statuses(&first), ["ACTIVATED"]);
}
