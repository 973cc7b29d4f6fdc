//! The gateway's command-signing key rolled over, end to end with real processes: a gateway
//! restarted on its data with the next key (`--signing-key`), and two real agents, one
//! provisioned with the next key beside the current one and one with the current key only
//! (see the crate docs and gateway/README.md, "Rolling the signing key over").
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::*;

use caas_sim::api::{Api, Lasting};
use caas_sim::webhook::Receiver;
use caas_tests::{
    make_key, service_states, start_gateway_and_receiver_signing_with, AgentProcess, AgentSpec,
    Gateway, KeyFiles, Retry,
};
use serde_json::Value;

/// Car 1, provisioned with the current and the next gateway key.
const VIN_BOTH_KEYS: &str = "1HGCM82633A004352";
/// Car 2, provisioned with the current gateway key only.
const VIN_OLD_KEY_ONLY: &str = "1M8GDM9AXKP042788";

/// The gateway's published keys, `(keyId, publicKey)`, from `GET /keys`.
async fn published_keys(gateway: &Gateway) -> Vec<(String, String)> {
    let keys = gateway.get("/keys").await.unwrap();
    keys["keys"]
        .as_array()
        .unwrap_or_else(|| panic!("no keys in {keys}"))
        .iter()
        .map(|k| {
            (
                k["keyId"].as_str().unwrap_or("").to_string(),
                k["publicKey"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Activates `service` (its one flag `flag`, permanent) on `vin`; the request id.
async fn activate(api: &Api, vin: &str, service: &str, flag: &str) -> String {
    api.activate(
        vin,
        service,
        &[flag.to_string()],
        &serde_json::Map::new(),
        &Lasting::Permanent,
    )
    .await
    .unwrap()
}

/// Waits for one callback for each of `ids`; their `(status, errorCode)`, in the same order.
async fn callbacks_of(receiver: &Receiver, ids: &[String]) -> Vec<(String, Option<String>)> {
    let answered = receiver.wait_for(ids, DEADLINE).await;
    assert_eq!(answered, ids.len(), "callbacks for {ids:?}");
    ids.iter()
        .map(|id| {
            let callbacks = receiver.callbacks(id);
            assert_eq!(callbacks.len(), 1, "{id}: {callbacks:?}");
            (callbacks[0].status.clone(), callbacks[0].error_code.clone())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_signing_key_rollover_cars_trusting_the_next_key_work_and_the_others_refuse() {
    // Few short attempts: a request the car refuses must end on its refusal, and one that
    // nothing answers would end NO_CONFIRMATION within seconds rather than minutes.
    let retry = Retry {
        attempts: 3,
        attempt_timeout: "1s",
        backoff: "300ms",
    };
    let dir = tempfile::Builder::new()
        .prefix("caas-e2e-key-rollover-")
        .tempdir()
        .unwrap();
    let key = |name: &'static str| {
        let dir = dir.path().to_path_buf();
        async move { make_key(ctl(), &dir, name).await.unwrap() }
    };
    // The operator's current and next signing keys, and each car's device key: all made
    // with `caasctl keys gen`.
    let (current, next, car_1_key, car_2_key): (KeyFiles, KeyFiles, KeyFiles, KeyFiles) = (
        key("gateway-current").await,
        key("gateway-next").await,
        key("car-1").await,
        key("car-2").await,
    );
    let (mut gateway, receiver) =
        start_gateway_and_receiver_signing_with(sim(), None, retry, Some(&current.secret))
            .await
            .unwrap();
    assert_eq!(
        published_keys(&gateway).await,
        [(current.key_id.clone(), current.public_hex.clone())]
    );
    let api = gateway.api().unwrap();
    for (vin, car_key) in [(VIN_BOTH_KEYS, &car_1_key), (VIN_OLD_KEY_ONLY, &car_2_key)] {
        api.register_vehicle(
            vin,
            &car_key.public_hex,
            caas_sim::car::SEED_PLATFORM,
            "1.0.0",
        )
        .await
        .unwrap();
    }
    let unit = |vin: &str, name: &str, device_key: &KeyFiles, trusted: &[&KeyFiles]| AgentSpec {
        vin: vin.to_string(),
        broker: gateway.mqtt.clone(),
        tls: None,
        gateway_keys: trusted.iter().map(|k| k.public.clone()).collect(),
        device_key: device_key.secret.clone(),
        data: dir.path().join(format!("{name}-state")),
        log: dir.path().join(format!("{name}.log")),
    };
    let car_1 = AgentProcess::start(
        agent(),
        &unit(VIN_BOTH_KEYS, "car-1", &car_1_key, &[&current, &next]),
    )
    .await
    .unwrap();
    let car_2 = AgentProcess::start(
        agent(),
        &unit(VIN_OLD_KEY_ONLY, "car-2", &car_2_key, &[&current]),
    )
    .await
    .unwrap();

    // Before the rollover both cars take commands signed with the current key.
    let first = [
        activate(&api, VIN_BOTH_KEYS, "heated-seats", "heated_seats").await,
        activate(&api, VIN_OLD_KEY_ONLY, "heated-seats", "heated_seats").await,
    ];
    assert_eq!(
        callbacks_of(&receiver, &first).await,
        [
            ("ACTIVATED".to_string(), None),
            ("ACTIVATED".to_string(), None)
        ],
        "car 1:\n{}\ncar 2:\n{}",
        car_1.log_text(),
        car_2.log_text()
    );

    // The rollover: a clean stop, and a start on the same data with the next key.
    let stopped = gateway.signal("TERM", DEADLINE).unwrap();
    assert!(stopped.success(), "SIGTERM: {stopped}");
    gateway.set_signing_key(&next.secret).unwrap();
    gateway.start_again().await.unwrap();
    let api = gateway.api().unwrap();
    assert_eq!(
        published_keys(&gateway).await,
        [(next.key_id.clone(), next.public_hex.clone())]
    );

    // From now on every command is signed with the next key: the car that trusts it takes
    // the new service, the car that does not refuses it with UNKNOWN_KEY, and its request
    // fails (no charge) with that code.
    let second = [
        activate(&api, VIN_BOTH_KEYS, "power-boost", "power_boost").await,
        activate(&api, VIN_OLD_KEY_ONLY, "power-boost", "power_boost").await,
    ];
    assert_eq!(
        callbacks_of(&receiver, &second).await,
        [
            ("ACTIVATED".to_string(), None),
            ("FAILED".to_string(), Some("UNKNOWN_KEY".to_string())),
        ],
        "car 1:\n{}\ncar 2:\n{}\ngateway:\n{}",
        car_1.log_text(),
        car_2.log_text(),
        gateway.log_text()
    );
    let car_2_request = api.request(&second[1]).await.unwrap();
    assert_eq!(
        (&car_2_request["status"], &car_2_request["errorCode"]),
        (&Value::from("FAILED"), &Value::from("UNKNOWN_KEY")),
        "{car_2_request}"
    );
    assert_eq!(
        api.request(&second[0]).await.unwrap()["status"],
        "COMPLETED"
    );

    // Car 1 holds both services, in its own account and in the gateway's.
    assert_eq!(
        car_1.active_services().await.unwrap(),
        ["heated-seats", "power-boost"]
    );
    let status = gateway
        .get(&format!("/vehicles/{VIN_BOTH_KEYS}/status"))
        .await
        .unwrap();
    assert_eq!(
        service_states(&status).unwrap(),
        [
            ("heated-seats".to_string(), "ACTIVE".to_string()),
            ("power-boost".to_string(), "ACTIVE".to_string()),
        ],
        "{status}"
    );

    // Car 2 refused the new key's commands and changed nothing: it still has its first
    // service, and says why it refused.
    let car_2_status = car_2.status().await.unwrap();
    let car_2_services: Vec<&str> = car_2_status
        .active_grants
        .iter()
        .map(|g| g.service_id.as_str())
        .collect();
    assert_eq!(car_2_services, ["heated-seats"], "{car_2_status:?}");
    assert_eq!(
        car_2_status
            .last_rejection
            .as_ref()
            .map(|r| r.code.as_str()),
        Some("UNKNOWN_KEY"),
        "{car_2_status:?}"
    );
    // The gateway agrees: the first service active, the refused one in ERROR (a request of
    // it failed).
    let status = gateway
        .get(&format!("/vehicles/{VIN_OLD_KEY_ONLY}/status"))
        .await
        .unwrap();
    assert_eq!(
        service_states(&status).unwrap(),
        [
            ("heated-seats".to_string(), "ACTIVE".to_string()),
            ("power-boost".to_string(), "ERROR".to_string()),
        ],
        "{status}"
    );

    // The restart repeated none of the first requests' callbacks.
    assert_eq!(
        callbacks_of(&receiver, &first).await,
        [
            ("ACTIVATED".to_string(), None),
            ("ACTIVATED".to_string(), None)
        ]
    );
}
