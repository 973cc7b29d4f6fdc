#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! `caasctl vehicle decommission` against a real gateway started in this process (no car
//! connects, so an activation stays in flight): the guard of --yes, the table, the JSON of a
//! repeat, what the gateway then says of the car, and the refusals.

mod common;

use common::{caasctl, gateway_config, get, post, register_car, start_gateway};
use serde_json::{json, Value};

use common::{ctl, value_of, OPS_TOKEN as TOKEN};
const VIN1: &str = "WVWZZZ1JZXW000001";
const VIN2: &str = "WVWZZZ1JZXW000002";
/// Never registered.
const UNKNOWN_VIN: &str = "WVWZZZ1JZXW000009";

#[test]
fn decommission_takes_a_car_out_only_with_yes_and_a_repeat_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let base = start_gateway(gateway_config(dir.path().join("gw"), TOKEN));
    register_car(&base, TOKEN, VIN1, 10);
    let boost = json!({"vin": VIN1, "serviceId": "power-boost",
        "configuration": {"featureFlags": ["power_boost"]}, "duration": {"type": "PERMANENT"}});
    let (s, accepted) = post(&base, TOKEN, "/ota/activate", &boost, None);
    assert_eq!(s, 202, "{accepted}");
    let request = accepted["requestId"].as_str().unwrap().to_owned();

    // Without --yes nothing is sent: the car is still registered, its request in flight.
    let line = ctl(&base, &["vehicle", "decommission", VIN1])
        .err()
        .to_owned();
    assert!(line.contains("--yes") && line.contains(VIN1), "{line}");
    assert_eq!(
        get(&base, TOKEN, &format!("/vehicles/{VIN1}/status"))["vin"],
        VIN1
    );
    let r = get(&base, TOKEN, &format!("/ota/requests/{request}"));
    assert_eq!(r["status"], "IN_PROGRESS", "{r}");

    let t = ctl(&base, &["vehicle", "decommission", VIN1, "--yes"])
        .ok()
        .to_owned();
    assert_eq!(value_of(&t, "VIN"), VIN1, "{t}");
    assert_eq!(value_of(&t, "Requests failed"), "1", "{t}");
    // The activation was seq 1; the withdrawal is the next.
    assert_eq!(value_of(&t, "Withdrawal seq"), "2", "{t}");
    let at = value_of(&t, "Decommissioned").to_owned();
    assert!(at.starts_with("20"), "{t}");
    let r = get(&base, TOKEN, &format!("/ota/requests/{request}"));
    assert_eq!(
        (&r["status"], &r["errorCode"]),
        (&json!("FAILED"), &json!("DECOMMISSIONED")),
        "{r}"
    );

    // A repeat, as JSON: the same car and time, nothing more failed.
    let run = ctl(&base, &["vehicle", "decommission", VIN1, "--yes", "--json"]);
    let v: Value = serde_json::from_str(run.ok()).unwrap();
    assert_eq!(
        v,
        json!({"vin": VIN1, "decommissionedAt": at, "requestsFailed": 0, "withdrawalSeq": 2})
    );

    // What the tool shows of the car since: no status (the gateway says why), its history.
    let line = ctl(&base, &["vehicle", "status", VIN1]).err().to_owned();
    assert!(
        line.contains("HTTP 404") && line.contains(r#""field":"vin""#),
        "{line}"
    );
    assert!(line.contains(&format!("decommissioned at {at}")), "{line}");
    let t = ctl(&base, &["vehicle", "history", VIN1]).ok().to_owned();
    assert!(t.contains("DECOMMISSIONED"), "{t}");
    let t = ctl(&base, &["vehicle", "list"]).ok().to_owned();
    assert!(!t.contains(VIN1), "{t}");
    // Its key is free for another car.
    let key = caas_protocol::SigningKey::from_bytes(&[10; 32]).verifying_key();
    let car2 = json!({"vin": VIN2, "platform": "mqb-evo",
        "publicKey": caas_protocol::verifying_key_to_hex(&key).as_str()});
    assert_eq!(post(&base, TOKEN, "/vehicles", &car2, None).0, 201);

    // Refusals: a VIN checked before anything is sent, the gateway's 404 for an unknown
    // car, its 401 for a wrong token.
    let line = ctl(&base, &["vehicle", "decommission", "NOT-A-VIN", "--yes"])
        .err()
        .to_owned();
    assert!(line.contains("NOT-A-VIN"), "{line}");
    let line = ctl(&base, &["vehicle", "decommission", UNKNOWN_VIN, "--yes"])
        .err()
        .to_owned();
    assert!(
        line.contains("HTTP 404") && line.contains(r#""field":"vin""#),
        "{line}"
    );
    let args = [
        "vehicle",
        "decommission",
        VIN2,
        "--yes",
        "--gateway",
        &base,
        "--token",
        "wrong",
    ];
    let line = caasctl(&args).err().to_owned();
    assert!(line.contains("HTTP 401"), "{line}");
    assert_eq!(
        get(&base, TOKEN, &format!("/vehicles/{VIN2}/status"))["vin"],
        VIN2
    );
}
