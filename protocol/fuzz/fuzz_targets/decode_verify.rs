//! Fuzzes the car's and the gateway's first contact with untrusted bytes: frame parsing,
//! signature verification and payload decoding. Nothing may panic, and nothing but a frame
//! signed by the trusted key may verify. The hosts' verification, with and without a key's
//! tables (`TrustedKey::with_tables`), must answer exactly as ed25519-dalek's `verify_strict`
//! (what microcontrollers run).
#![no_main]

use caas_protocol::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let gateway = SigningKey::from_bytes(&[0x42; 32]);
    let car = SigningKey::from_bytes(&[0x24; 32]);
    let trusted = [TrustedKey::new(gateway.verifying_key())];
    let car_trusted = TrustedKey::new(car.verifying_key());
    for (kind, key) in [(FrameKind::Command, &gateway), (FrameKind::Report, &car)] {
        if let Ok(raw) = parse_frame(data, kind) {
            let public = key.verifying_key();
            let strict = public
                .verify_strict(raw.signed, &ed25519_dalek::Signature::from_bytes(&raw.signature))
                .is_ok();
            assert_eq!(raw.verify(&public).is_ok(), strict);
        }
    }
    if let Ok(cmd) = open_command(data, &trusted) {
        // Only a frame the gateway key really signed can get here; re-sealing is canonical.
        let mut buf = [0u8; MAX_COMMAND_FRAME_SIZE];
        let again = seal_command(&cmd, &gateway, &mut buf).expect("a verified command re-seals");
        assert_eq!(again, data);
    }
    let tabled = [TrustedKey::with_tables(gateway.verifying_key())];
    assert_eq!(open_command(data, &tabled), open_command(data, &trusted));
    let car_tabled = TrustedKey::with_tables(car.verifying_key());
    assert_eq!(open_report(data, &car_tabled), open_report(data, &car_trusted));
    // The payload decoders on their own, without the signature gate.
    let _ = postcard::from_bytes::<Command>(data);
    let _ = postcard::from_bytes::<Report>(data);
});
