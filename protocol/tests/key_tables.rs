//! A trusted key with verification tables (`TrustedKey::with_tables`) opens every frame
//! exactly as the same key without them: valid frames, and each byte of a frame changed.
//! (Its own process, so the bounded set of keys with tables starts empty.)
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use caas_protocol::*;
use common::*;

#[test]
fn commands_open_the_same_with_and_without_tables() {
    let plain = trusted_gateway();
    let tabled = [TrustedKey::with_tables(gateway_key().verifying_key())];
    assert!(tabled[0].has_tables());
    assert!(!plain[0].has_tables());
    assert_eq!(tabled, plain, "tables do not change which key is trusted");
    let frame = seal_cmd(&typical_command(), &gateway_key());
    assert_eq!(
        open_command(&frame, &tabled),
        Ok(typical_command()),
        "a valid command opens"
    );
    for at in 0..frame.len() {
        let mut changed = frame.clone();
        changed[at] ^= 0x20;
        let with = open_command(&changed, &tabled);
        assert_eq!(with, open_command(&changed, &plain), "byte {at} changed");
        assert!(with.is_err(), "byte {at} changed and still opened");
    }
}

#[test]
fn reports_open_the_same_with_and_without_tables() {
    let plain = TrustedKey::new(car_key().verifying_key());
    let tabled = TrustedKey::with_tables(car_key().verifying_key());
    assert!(tabled.has_tables());
    let frame = seal_rpt(&typical_report(), &car_key());
    assert_eq!(open_report(&frame, &tabled), Ok(typical_report()));
    let mut forged = frame.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    assert_eq!(open_report(&forged, &tabled), Err(RejectCode::BadSignature));
    assert_eq!(open_report(&forged, &plain), Err(RejectCode::BadSignature));
    let other = TrustedKey::with_tables(gateway_key().verifying_key());
    assert_eq!(open_report(&frame, &other), Err(RejectCode::UnknownKey));
}

#[test]
fn past_the_bound_keys_verify_without_tables() {
    // The other tests' keys first, so that filling the set here leaves them their tables
    // whichever test runs first.
    assert!(TrustedKey::with_tables(gateway_key().verifying_key()).has_tables());
    assert!(TrustedKey::with_tables(car_key().verifying_key()).has_tables());
    let keys: Vec<TrustedKey> = (0..=MAX_KEYS_WITH_TABLES as u8)
        .map(|n| TrustedKey::with_tables(SigningKey::from_bytes(&[200 - n; 32]).verifying_key()))
        .collect();
    assert!(keys.iter().filter(|k| k.has_tables()).count() <= MAX_KEYS_WITH_TABLES - 2);
    let Some(last) = keys.last() else {
        panic!("keys were made");
    };
    assert!(!last.has_tables());
    let signer = SigningKey::from_bytes(&[200 - MAX_KEYS_WITH_TABLES as u8; 32]);
    let mut cmd = typical_command();
    cmd.seq += 1;
    let frame = seal_cmd(&cmd, &signer);
    assert_eq!(open_command(&frame, &[*last]), Ok(cmd));
}
