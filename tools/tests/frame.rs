#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! `caasctl frame inspect` on frames sealed here with the protocol crate and keys made by
//! `caasctl keys gen`.

mod common;

use std::path::Path;

use caas_protocol::*;
use common::{caasctl, caasctl_stdin, s};

const VIN: &str = "WVWZZZ1JZXW000001";

fn keypair(dir: &Path, name: &str) -> SigningKey {
    caasctl(&["keys", "gen", "--out", s(dir), "--name", name]).ok();
    files::read_signing_key(&dir.join(format!("{name}.key"))).unwrap()
}

fn command() -> Command {
    let mut grant = Grant::new("power-boost".parse().unwrap());
    grant.flags.push("power_boost".parse().unwrap()).unwrap();
    grant
        .params
        .push(Param {
            key: "boostPercent".parse().unwrap(),
            value: "15".parse().unwrap(),
        })
        .unwrap();
    grant.ends_at = Some(1_800_000_000);
    let mut seats = Grant::new("heated-seats".parse().unwrap());
    seats.flags.push("heated_seats".parse().unwrap()).unwrap();
    let mut desired = DesiredState::default();
    desired.grants.push(grant).unwrap();
    desired.grants.push(seats).unwrap();
    desired
        .settles
        .push("12345678-9abc-def0-0102-030405060708".parse().unwrap())
        .unwrap();
    Command {
        vin: VIN.parse().unwrap(),
        seq: 42,
        issued_at: 1_700_000_000,
        not_after: 1_700_086_400,
        body: CommandBody::SetState(desired),
    }
}

fn report() -> Report {
    let mut r = Report {
        vin: VIN.parse().unwrap(),
        applied_seq: 41,
        car_time: 1_700_000_100,
        outcome: Outcome::Rejected {
            seq: 40,
            code: RejectCode::Replay,
        },
        active: Default::default(),
        diagnostics: Diagnostics {
            firmware_version: "2.4.1-rc1".parse().unwrap(),
            error_codes: Default::default(),
            signal_strength: 77,
        },
    };
    r.active
        .push(ActiveService {
            service_id: "power-boost".parse().unwrap(),
            ends_at: None,
        })
        .unwrap();
    r.diagnostics
        .error_codes
        .push("E_BATT_LOW".parse().unwrap())
        .unwrap();
    r
}

#[test]
fn a_sealed_command_is_shown_field_by_field_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = keypair(dir.path(), "gateway");
    let mut buf = [0u8; MAX_COMMAND_FRAME_SIZE];
    let frame = seal_command(&command(), &gateway, &mut buf)
        .unwrap()
        .to_vec();
    let file = dir.path().join("cmd.bin");
    std::fs::write(&file, &frame).unwrap();

    let pub_key = dir.path().join("gateway.pub");
    let out = caasctl(&["frame", "inspect", s(&file), "--gateway-key", s(&pub_key)]);
    let text = out.ok();
    let key_id = KeyId::of(&gateway.verifying_key()).to_string();
    for want in [
        format!(
            "command (caas-cmd), format version 1, {} bytes",
            frame.len()
        ),
        format!("signer key id    {key_id}"),
        "signature        valid".to_owned(),
        format!("vin              {VIN}"),
        "seq              42".to_owned(),
        "issued at        1700000000 (2023-11-14T22:13:20Z)".to_owned(),
        "not after        1700086400 (2023-11-15T22:13:20Z)".to_owned(),
        "SetState: 2 grant(s)".to_owned(),
        "settles          12345678-9abc-def0-0102-030405060708".to_owned(),
        "grant power-boost".to_owned(),
        "boostPercent=15".to_owned(),
        "1800000000 (2027-01-15T08:00:00Z)".to_owned(),
        "grant heated-seats".to_owned(),
        "never (permanent)".to_owned(),
    ] {
        assert!(text.contains(&want), "missing {want:?} in:\n{text}");
    }

    assert!(
        text.contains(&hex::encode(&frame[frame.len() - SIGNATURE_SIZE..])),
        "{text}"
    );

    // The secret key works as well as the public one.
    let secret = dir.path().join("gateway.key");
    assert!(
        caasctl(&["frame", "inspect", s(&file), "--gateway-key", s(&secret)])
            .ok()
            .contains("valid")
    );

    // Without a key nothing is claimed.
    let unchecked = caasctl(&["frame", "inspect", s(&file)]);
    assert!(unchecked
        .ok()
        .contains("not checked (a command is signed by the gateway: pass --gateway-key)"));
}

#[test]
fn wrong_keys_and_tampering_are_reported_and_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = keypair(dir.path(), "gateway");
    let other = keypair(dir.path(), "other");
    let mut buf = [0u8; MAX_COMMAND_FRAME_SIZE];
    let frame = seal_command(&command(), &gateway, &mut buf)
        .unwrap()
        .to_vec();
    let file = dir.path().join("cmd.bin");
    std::fs::write(&file, &frame).unwrap();

    let wrong = caasctl(&[
        "frame",
        "inspect",
        s(&file),
        "--gateway-key",
        s(&dir.path().join("other.pub")),
    ]);
    assert!(
        wrong.err().contains("signature check failed"),
        "{}",
        wrong.stderr
    );
    assert!(
        wrong
            .stdout
            .contains(&KeyId::of(&other.verifying_key()).to_string()),
        "{}",
        wrong.stdout
    );
    // Everything is still shown: an inspector must show forged frames too.
    assert!(
        wrong.stdout.contains("seq              42"),
        "{}",
        wrong.stdout
    );

    // One flipped byte in the payload (the seq varint): same key id, bad signature.
    let mut tampered = frame.clone();
    let seq_at = FRAME_HEADER_SIZE + 1 + VIN.len();
    assert_eq!(tampered[seq_at], 42);
    tampered[seq_at] = 43;
    std::fs::write(&file, &tampered).unwrap();
    let bad = caasctl(&[
        "frame",
        "inspect",
        s(&file),
        "--gateway-key",
        s(&dir.path().join("gateway.pub")),
        "--json",
    ]);
    assert!(bad.err().contains("BAD_SIGNATURE"), "{}", bad.stderr);
    let v: serde_json::Value = serde_json::from_str(&bad.stdout).unwrap();
    assert_eq!(v["signature"]["status"], "BAD_SIGNATURE");
    assert_eq!(v["decoded"]["seq"], 43);

    // Truncated: the layout does not hold.
    std::fs::write(&file, &frame[..frame.len() - 1]).unwrap();
    let cut = caasctl(&["frame", "inspect", s(&file)]);
    assert!(cut.err().contains("MALFORMED"), "{}", cut.stderr);
    assert!(cut.stdout.is_empty());

    // Not a frame at all, and hex given without --hex.
    std::fs::write(
        &file,
        b"hello, this is not a frame at all, not even close...............................",
    )
    .unwrap();
    assert!(caasctl(&["frame", "inspect", s(&file)])
        .err()
        .contains("not a CaaS frame"));
    std::fs::write(&file, hex::encode(&frame)).unwrap();
    assert!(caasctl(&["frame", "inspect", s(&file)])
        .err()
        .contains("pass --hex"));
    std::fs::write(&file, "zz").unwrap();
    assert!(caasctl(&["frame", "inspect", s(&file), "--hex"])
        .err()
        .contains("not hex text"));
    let missing = caasctl(&["frame", "inspect", s(&dir.path().join("nope.bin"))]);
    assert!(missing.err().contains("nope.bin"), "{}", missing.stderr);
}

#[test]
fn a_report_in_hex_on_stdin_is_decoded_and_checked_with_the_car_key() {
    let dir = tempfile::tempdir().unwrap();
    let car = keypair(dir.path(), "car");
    let mut buf = [0u8; MAX_REPORT_FRAME_SIZE];
    let frame = seal_report(&report(), &car, &mut buf).unwrap().to_vec();
    // Hex with line breaks, as a log line or a copy-paste gives it.
    let text: String = hex::encode(&frame)
        .as_bytes()
        .chunks(64)
        .map(|c| format!("{}\n", std::str::from_utf8(c).unwrap()))
        .collect();

    let car_pub = dir.path().join("car.pub");
    let out = caasctl_stdin(
        &[
            "frame",
            "inspect",
            "--hex",
            "--car-key",
            s(&car_pub),
            "--json",
        ],
        text.as_bytes(),
    );
    let v: serde_json::Value = serde_json::from_str(out.ok()).unwrap();
    assert_eq!(v["kind"], "report");
    assert_eq!(v["signature"]["status"], "VALID");
    assert_eq!(v["structure"], "OK");
    assert_eq!(v["keyId"], KeyId::of(&car.verifying_key()).to_string());
    let d = &v["decoded"];
    assert_eq!(d["vin"], VIN);
    assert_eq!(d["appliedSeq"], 41);
    assert_eq!(d["carTime"]["iso"], "2023-11-14T22:15:00Z");
    assert_eq!(
        d["outcome"],
        serde_json::json!({"type": "Rejected", "seq": 40, "code": "REPLAY"})
    );
    assert_eq!(d["active"][0]["serviceId"], "power-boost");
    assert_eq!(d["active"][0]["endsAt"], serde_json::Value::Null);
    assert_eq!(d["diagnostics"]["firmwareVersion"], "2.4.1-rc1");
    assert_eq!(d["diagnostics"]["errorCodes"][0], "E_BATT_LOW");
    assert_eq!(d["diagnostics"]["networkSignalStrength"], 77);

    // The readable form, and the gateway key does not check a report.
    let out = caasctl_stdin(
        &[
            "frame",
            "inspect",
            "-",
            "--hex",
            "--gateway-key",
            s(&car_pub),
        ],
        text.as_bytes(),
    );
    let t = out.ok();
    assert!(t.contains("report (caas-rpt)"), "{t}");
    assert!(
        t.contains("outcome          Rejected (seq 40, REPLAY)"),
        "{t}"
    );
    assert!(
        t.contains("not checked (a report is signed by the car: pass --car-key)"),
        "{t}"
    );
    assert!(t.contains("signal           77%"), "{t}");
}

#[test]
fn a_report_naming_refused_grants_shows_their_places() {
    let dir = tempfile::tempdir().unwrap();
    let car = keypair(dir.path(), "car");
    let mut r = report();
    r.outcome = Outcome::GrantsRefused {
        seq: 43,
        code: RejectCode::UnknownFeature,
        grants: 0b101,
    };
    let mut buf = [0u8; MAX_REPORT_FRAME_SIZE];
    let frame = seal_report(&r, &car, &mut buf).unwrap().to_vec();
    let file = dir.path().join("report.bin");
    std::fs::write(&file, &frame).unwrap();
    let car_pub = dir.path().join("car.pub");
    let out = caasctl(&[
        "frame",
        "inspect",
        s(&file),
        "--car-key",
        s(&car_pub),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.ok()).unwrap();
    assert_eq!(
        v["decoded"]["outcome"],
        serde_json::json!({"type": "GrantsRefused", "seq": 43, "code": "UNKNOWN_FEATURE", "grants": [0, 2]})
    );
    let out = caasctl(&["frame", "inspect", s(&file), "--car-key", s(&car_pub)]);
    let t = out.ok();
    assert!(
        t.contains("Rejected (seq 43, UNKNOWN_FEATURE) for grants [0, 2] (from 0)"),
        "{t}"
    );
}
