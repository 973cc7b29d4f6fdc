//! A car's telematics unit (and with it its signing key) replaced in the workshop:
//! `POST /vehicles/{vin}/key` against a real gateway with its embedded broker, a real
//! webhook receiver and test cars on real MQTT connections.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use caas_protocol::{verifying_key_to_hex, Outcome, SigningKey};
use common::*;
use serde_json::{json, Value};

/// A gateway whose requests stay in flight long enough for a unit to be swapped (no
/// attempt runs out while no unit is connected).
async fn patient_gateway(dir: &std::path::Path, hook: &Webhook) -> (caas_gateway::Gateway, Api) {
    let mut c = config(dir, Some(hook));
    c.retry.attempts = 30;
    c.retry.attempt_timeout = Duration::from_secs(2);
    let gw = match caas_gateway::start(c).await {
        Ok(gw) => gw,
        Err(e) => panic!("gateway start: {e:#}"),
    };
    let api = Api::new(gw.http_addr());
    (gw, api)
}

fn hex(key: &SigningKey) -> String {
    verifying_key_to_hex(&key.verifying_key()).to_string()
}

/// The key of car `n`'s replacement unit.
fn new_unit_key(n: u32) -> SigningKey {
    car_key(1000 + n)
}

async fn replace_key(api: &Api, n: u32, new: &str, previous: &str) -> (u16, Value) {
    api.post(
        &format!("/vehicles/{}/key", vin(n)),
        &json!({ "publicKey": new, "previousPublicKey": previous }),
    )
    .await
}

async fn request_status(api: &Api, id: &str) -> String {
    let (s, r) = api.get(&format!("/ota/requests/{id}")).await;
    assert_eq!(s, 200, "{r}");
    r["status"].as_str().unwrap().to_owned()
}

/// Waits (bounded) until metric `name` exceeds `above`; returns its value.
async fn wait_metric_above(api: &Api, name: &str, above: f64) -> f64 {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let v = api.metric(name).await;
        if v > above {
            return v;
        }
        assert!(Instant::now() < end, "{name} stayed at {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_unit_gets_the_cars_state_and_completes_what_was_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (gw, api) = patient_gateway(dir.path(), &hook).await;
    let old = obeying_car(&gw, &api, 1).await;
    let boost = api.activate(1, "power-boost", "power_boost").await;
    wait_activated(&hook, &[&boost], Duration::from_secs(10)).await;

    // The old unit is taken out; an activation comes while no unit is connected.
    drop(old);
    wait_status(
        &api,
        1,
        "the old unit offline",
        Duration::from_secs(15),
        |st| st["connectivity"] == "OFFLINE",
    )
    .await;
    let seats = api.activate(1, "heated-seats", "heated_seats").await;
    assert_eq!(request_status(&api, &seats).await, "IN_PROGRESS");

    let (old_hex, new_key) = (hex(&car_key(1)), new_unit_key(1));
    let new_hex = hex(&new_key);
    let (s, rec) = replace_key(&api, 1, &new_hex, &old_hex).await;
    assert_eq!(s, 200, "{rec}");
    assert_eq!(rec["vin"], vin(1).to_string());
    assert_eq!(rec["publicKey"], new_hex);
    assert_eq!(
        (&rec["platform"], &rec["firmwareVersion"]),
        (&json!("mqb-evo"), &json!("1.0.0"))
    );
    assert!(rec["registeredAt"].as_str().is_some(), "{rec}");
    // The stored record holds the new key: provisioning with it is a repeat, with the
    // old one a conflict, and the registration time is the car's first.
    let again = json!({"vin": vin(1).to_string(), "publicKey": new_hex, "platform": "mqb-evo"});
    let (s, stored) = api.post("/vehicles", &again).await;
    assert_eq!((s, &stored["registeredAt"]), (200, &rec["registeredAt"]));
    let (s, b) = api
        .post(
            "/vehicles",
            &json!({"vin": vin(1).to_string(), "publicKey": old_hex, "platform": "mqb-evo"}),
        )
        .await;
    assert_eq!((s, b["field"].as_str()), (409, Some("publicKey")), "{b}");
    assert_eq!(api.metric("caas_vehicle_keys_replaced_total").await, 1.0);
    let replaced = history_of(&api, 1, "KEY_REPLACED").await;
    assert_eq!(replaced.len(), 1, "{replaced:?}");
    let detail = replaced[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains(&old_hex[..16]) && detail.contains(&new_hex[..16]),
        "{detail}"
    );
    // Nothing the old unit applied is on the new one: pending until it confirms.
    let (_, st) = api.get(&format!("/vehicles/{}/status", vin(1))).await;
    assert_eq!(
        services(&st),
        [
            ("heated-seats".to_owned(), "PENDING".to_owned()),
            ("power-boost".to_owned(), "PENDING".to_owned())
        ],
        "{st}"
    );
    assert_eq!(request_status(&api, &seats).await, "IN_PROGRESS");

    // The new unit, with an empty store, connects: it gets the car's whole state and its
    // confirmation (signed with the new key) completes the activation in flight.
    let new = TestCar::start_keyed(
        1,
        new_key,
        gw.public_key_hex(),
        CarOpts::plain(&gw, Mode::Obey),
    )
    .await;
    wait_activated(&hook, &[&seats], Duration::from_secs(20)).await;
    assert_eq!(car_services(&new), ["heated-seats", "power-boost"]);
    let st = wait_status(
        &api,
        1,
        "both services active",
        Duration::from_secs(10),
        |st| services(st).iter().all(|(_, s)| s == "ACTIVE"),
    )
    .await;
    assert_eq!(services(&st).len(), 2, "{st}");
    assert_eq!(api.metric("caas_reports_forged_total").await, 0.0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_replacement_reports_signed_with_the_old_key_are_forged() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (gw, api) = patient_gateway(dir.path(), &hook).await;
    api.register(2).await;
    let (old_key, new_key) = (car_key(2), new_unit_key(2));
    let (s, b) = replace_key(&api, 2, &hex(&new_key), &hex(&old_key)).await;
    assert_eq!(s, 200, "{b}");

    // The new unit is deaf: the reports below are the only ones that could settle anything.
    let unit = TestCar::start_keyed(
        2,
        new_key.clone(),
        gw.public_key_hex(),
        CarOpts::plain(&gw, Mode::Ignore),
    )
    .await;
    unit.wait_connected().await;
    let snow = api.activate(2, "snow-mode", "snow_mode").await;
    let (_, r) = api.get(&format!("/ota/requests/{snow}")).await;
    let seq = r["seq"].as_u64().unwrap();

    let forged = api.metric("caas_reports_forged_total").await;
    send_report_signed(&unit, 2, &old_key, seq, Outcome::Applied { seq }).await;
    wait_metric_above(&api, "caas_reports_forged_total", forged).await;
    assert_eq!(request_status(&api, &snow).await, "IN_PROGRESS");
    assert!(hook.for_request(&snow).is_empty());

    // The same report signed with the new key is believed.
    send_report_signed(&unit, 2, &new_key, seq, Outcome::Applied { seq }).await;
    wait_activated(&hook, &[&snow], Duration::from_secs(10)).await;
    assert_eq!(request_status(&api, &snow).await, "COMPLETED");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_is_guarded_repeatable_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (gw, api) = patient_gateway(dir.path(), &hook).await;
    let old = obeying_car(&gw, &api, 3).await;
    let (old_hex, new_key) = (hex(&car_key(3)), new_unit_key(3));
    let new_hex = hex(&new_key);

    // Refusals name the field and change nothing.
    let weak = format!("01{}", "0".repeat(62));
    let refusals = [
        (
            format!("/vehicles/{}/key", vin(3)),
            json!({"publicKey": new_hex, "previousPublicKey": hex(&car_key(4))}),
            409,
            "previousPublicKey",
        ),
        (
            format!("/vehicles/{}/key", vin(3)),
            json!({"publicKey": weak, "previousPublicKey": old_hex}),
            400,
            "publicKey",
        ),
        (
            format!("/vehicles/{}/key", vin(3)),
            json!({"publicKey": new_hex, "previousPublicKey": "xyz"}),
            400,
            "previousPublicKey",
        ),
        (
            format!("/vehicles/{}/key", vin(3)),
            json!({"publicKey": new_hex}),
            400,
            "previousPublicKey",
        ),
        (
            format!("/vehicles/{}/key", vin(3)),
            json!({"publicKey": new_hex, "previousPublicKey": old_hex, "force": true}),
            400,
            "force",
        ),
        (
            "/vehicles/NOT-A-VIN/key".to_owned(),
            json!({"publicKey": new_hex, "previousPublicKey": old_hex}),
            400,
            "vin",
        ),
        (
            format!("/vehicles/{}/key", vin(77)),
            json!({"publicKey": new_hex, "previousPublicKey": old_hex}),
            404,
            "vin",
        ),
    ];
    for (path, body, status, field) in refusals {
        let (s, b) = api.post(&path, &body).await;
        assert_eq!(
            (s, b["field"].as_str()),
            (status, Some(field)),
            "{body}: {b}"
        );
    }
    assert_eq!(api.metric("caas_vehicle_keys_replaced_total").await, 0.0);
    assert!(history_of(&api, 3, "KEY_REPLACED").await.is_empty());
    // The old unit's reports still settle requests.
    let boost = api.activate(3, "power-boost", "power_boost").await;
    wait_activated(&hook, &[&boost], Duration::from_secs(10)).await;
    assert_eq!(api.metric("caas_reports_forged_total").await, 0.0);

    // The replacement, and its repeat: the same answer, nothing changed twice, whatever
    // the repeat names as the previous key.
    drop(old);
    let (s, first) = replace_key(&api, 3, &new_hex, &old_hex).await;
    assert_eq!((s, &first["publicKey"]), (200, &json!(new_hex)), "{first}");
    for previous in [&old_hex, &new_hex, &hex(&car_key(4))] {
        let (s, again) = replace_key(&api, 3, &new_hex, previous).await;
        assert_eq!((s, &again), (200, &first));
    }
    assert_eq!(api.metric("caas_vehicle_keys_replaced_total").await, 1.0);
    assert_eq!(history_of(&api, 3, "KEY_REPLACED").await.len(), 1);
    // Now the old key is the stale one.
    let (s, b) = replace_key(&api, 3, &hex(&car_key(5)), &old_hex).await;
    assert_eq!(
        (s, b["field"].as_str()),
        (409, Some("previousPublicKey")),
        "{b}"
    );
    gw.shutdown().await;

    // Started again on the same data, the gateway believes the new key only.
    let (gw, api) = patient_gateway(dir.path(), &hook).await;
    let (s, b) = api
        .post(
            "/vehicles",
            &json!({"vin": vin(3).to_string(), "publicKey": old_hex, "platform": "mqb-evo"}),
        )
        .await;
    assert_eq!((s, b["field"].as_str()), (409, Some("publicKey")), "{b}");
    assert_eq!(history_of(&api, 3, "KEY_REPLACED").await.len(), 1);
    let unit = TestCar::start_keyed(
        3,
        new_key,
        gw.public_key_hex(),
        CarOpts::plain(&gw, Mode::Obey),
    )
    .await;
    unit.wait_connected().await;
    let seats = api.activate(3, "heated-seats", "heated_seats").await;
    wait_activated(&hook, &[&seats], Duration::from_secs(20)).await;
    assert_eq!(car_services(&unit), ["heated-seats", "power-boost"]);
    let forged = api.metric("caas_reports_forged_total").await;
    send_report_signed(&unit, 3, &car_key(3), 0, Outcome::Periodic { counter: 9 }).await;
    wait_metric_above(&api, "caas_reports_forged_total", forged).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_another_car_is_refused_at_registration_and_replacement_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (gw, api) = patient_gateway(dir.path(), &hook).await;
    api.register(1).await;
    api.register(2).await;
    let register_with = |n: u32, key: &SigningKey| json!({"vin": vin(n).to_string(), "publicKey": hex(key), "platform": "mqb-evo"});
    // Car 3 registered with car 1's key (a key copied from the wrong car): refused, and
    // car 3 is not registered.
    let (s, b) = api.post("/vehicles", &register_with(3, &car_key(1))).await;
    assert_eq!((s, b["field"].as_str()), (409, Some("publicKey")), "{b}");
    assert!(
        b["reason"].as_str().unwrap().contains(&vin(1).to_string()),
        "{b}"
    );
    let (s, _) = api.get(&format!("/vehicles/{}/status", vin(3))).await;
    assert_eq!(s, 404);
    // Car 2's unit replaced with car 1's key: refused, car 2 keeps its key.
    let (s, b) = replace_key(&api, 2, &hex(&car_key(1)), &hex(&car_key(2))).await;
    assert_eq!((s, b["field"].as_str()), (409, Some("publicKey")), "{b}");
    // Car 1's unit replaced: its old key is free for another car, its new one is not.
    let (s, b) = replace_key(&api, 1, &hex(&new_unit_key(1)), &hex(&car_key(1))).await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = api
        .post("/vehicles", &register_with(3, &new_unit_key(1)))
        .await;
    assert_eq!((s, b["field"].as_str()), (409, Some("publicKey")), "{b}");
    let (s, b) = api.post("/vehicles", &register_with(3, &car_key(1))).await;
    assert_eq!(s, 201, "{b}");

    // After a restart the owners are known again from the stored cars.
    gw.shutdown().await;
    let (gw, api) = patient_gateway(dir.path(), &hook).await;
    let (s, b) = api.post("/vehicles", &register_with(4, &car_key(2))).await;
    assert_eq!((s, b["field"].as_str()), (409, Some("publicKey")), "{b}");
    let (s, b) = replace_key(&api, 2, &hex(&car_key(1)), &hex(&car_key(2))).await;
    assert_eq!((s, b["field"].as_str()), (409, Some("publicKey")), "{b}");
    // A car registered again with its own key is still answered 200.
    let (s, b) = api.post("/vehicles", &register_with(3, &car_key(1))).await;
    assert_eq!(s, 200, "{b}");
    gw.shutdown().await;
}
