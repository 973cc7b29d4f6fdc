//! Fuzzes the car's and the gateway's first contact with untrusted bytes: frame parsing,
//! signature verification and payload decoding. Nothing may panic, and nothing but a frame
//! signed by the trusted key may verify.
#![no_main]

use caas_protocol::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let gateway = SigningKey::from_bytes(&[0x42; 32]);
    let car = SigningKey::from_bytes(&[0x24; 32]);
    let trusted = [TrustedKey::new(gateway.verifying_key())];
    let car_trusted = TrustedKey::new(car.verifying_key());
    let _ = parse_frame(data, FrameKind::Command);
    let _ = parse_frame(data, FrameKind::Report);
    if let Ok(cmd) = open_command(data, &trusted) {
        // Only a frame the gateway key really signed can get here; re-sealing is canonical.
        let mut buf = [0u8; MAX_COMMAND_FRAME_SIZE];
        let again = seal_command(&cmd, &gateway, &mut buf).expect("a verified command re-seals");
        assert_eq!(again, data);
    }
    let _ = open_report(data, &car_trusted);
    // The payload decoders on their own, without the signature gate.
    let _ = postcard::from_bytes::<Command>(data);
    let _ = postcard::from_bytes::<Report>(data);
});
