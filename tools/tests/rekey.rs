#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! `caasctl vehicle rekey` against a real gateway started in this process (no car connects):
//! the guard of --yes, the gateway's guard of the previous key, the table and the JSON.

mod common;

use common::{gateway_config, post, register_car, start_gateway};
use serde_json::{json, Value};

use common::{ctl, value_of, OPS_TOKEN as TOKEN};
const VIN1: &str = "WVWZZZ1JZXW000001";
/// Never registered.
const UNKNOWN_VIN: &str = "WVWZZZ1JZXW000009";

/// The public key of the seed `[seed; 32]` (as `register_car` makes them), hex.
fn key_hex(seed: u8) -> String {
    let key = caas_protocol::SigningKey::from_bytes(&[seed; 32]).verifying_key();
    caas_protocol::verifying_key_to_hex(&key).to_string()
}

/// What `POST /vehicles` answers for VIN1 with `key`: 200 while it is the car's key, 409
/// while another one is.
fn provisioning_status(base: &str, key: &str) -> u16 {
    let car = json!({"vin": VIN1, "publicKey": key, "platform": "mqb-evo"});
    post(base, TOKEN, "/vehicles", &car, None).0
}

#[test]
fn rekey_replaces_a_cars_key_only_with_yes_and_the_right_previous_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = start_gateway(gateway_config(dir.path().join("gw"), TOKEN));
    register_car(&base, TOKEN, VIN1, 10);
    let (old, new) = (key_hex(10), key_hex(20));
    let rekey = |key: &str, previous: &str, more: &[&str]| {
        let mut args = vec![
            "vehicle",
            "rekey",
            VIN1,
            "--public-key",
            key,
            "--previous-public-key",
            previous,
        ];
        args.extend(more);
        ctl(&base, &args)
    };

    // Without --yes nothing is sent: the car keeps its key.
    let line = rekey(&new, &old, &[]).err().to_owned();
    assert!(line.contains("--yes") && line.contains(VIN1), "{line}");
    assert_eq!(provisioning_status(&base, &old), 200);

    // A previous key that is not the car's: the gateway's 409, nothing changed.
    let line = rekey(&new, &key_hex(30), &["--yes"]).err().to_owned();
    assert!(
        line.contains("HTTP 409") && line.contains(r#""field":"previousPublicKey""#),
        "{line}"
    );
    assert_eq!(provisioning_status(&base, &old), 200);

    let t = rekey(&new, &old, &["--yes"]).ok().to_owned();
    assert_eq!(value_of(&t, "VIN"), VIN1, "{t}");
    assert_eq!(value_of(&t, "Public key"), new, "{t}");
    assert_eq!(value_of(&t, "Platform"), "mqb-evo", "{t}");
    assert_eq!(provisioning_status(&base, &new), 200);
    assert_eq!(provisioning_status(&base, &old), 409);
    // A repeat answers the same record, as JSON here.
    let run = rekey(&new, &old, &["--yes", "--json"]);
    let v: Value = serde_json::from_str(run.ok()).unwrap();
    assert_eq!(
        (&v["vin"], &v["publicKey"]),
        (&json!(VIN1), &json!(new)),
        "{v}"
    );
    let t = ctl(&base, &["vehicle", "history", VIN1]).ok().to_owned();
    assert!(t.contains("KEY_REPLACED") && t.contains(&new[..16]), "{t}");

    // Keys and VINs are checked before anything is sent; the gateway names an unknown car.
    let line = rekey("zz", &new, &["--yes"]).err().to_owned();
    assert!(line.contains(r#"invalid --public-key "zz""#), "{line}");
    let line = rekey(&key_hex(40), "", &["--yes"]).err().to_owned();
    assert!(line.contains("invalid --previous-public-key"), "{line}");
    let mut args = vec!["vehicle", "rekey", "NOT-A-VIN", "--public-key", &new];
    args.extend(["--previous-public-key", &old, "--yes"]);
    let line = ctl(&base, &args).err().to_owned();
    assert!(line.contains("NOT-A-VIN"), "{line}");
    let mut args = vec!["vehicle", "rekey", UNKNOWN_VIN, "--public-key", &new];
    args.extend(["--previous-public-key", &old, "--yes"]);
    let line = ctl(&base, &args).err().to_owned();
    assert!(
        line.contains("HTTP 404") && line.contains(r#""field":"vin""#),
        "{line}"
    );
    assert_eq!(provisioning_status(&base, &new), 200);
}
