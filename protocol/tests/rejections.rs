//! One test per rejection code, and the frame-robustness sweeps: every truncation and every
//! single-byte flip of a valid frame is refused without a panic.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
use caas_protocol::*;
use common::*;

fn ctx<'a>(vin: &'a Vin, last: u64, now: u64) -> CheckContext<'a> {
    CheckContext {
        vin,
        last_applied_seq: last,
        now,
        platform: &Catalog,
    }
}

/// Opens and checks a frame as a car at `now` with `last` applied would.
fn car_verdict(frame: &[u8], last: u64, now: u64) -> Result<Command, RejectCode> {
    let cmd = open_command(frame, &trusted_gateway())?;
    let vin = vin();
    check_command(&cmd, &ctx(&vin, last, now))?;
    Ok(cmd)
}

#[test]
fn a_valid_command_is_accepted() {
    let frame = seal_cmd(&typical_command(), &gateway_key());
    assert_eq!(
        car_verdict(&frame, 6, ISSUED_AT + 10),
        Ok(typical_command())
    );
}

#[test]
fn bad_signature() {
    let mut frame = seal_cmd(&typical_command(), &gateway_key());
    let last = frame.len() - 1;
    frame[last] ^= 0x01;
    assert_eq!(
        car_verdict(&frame, 0, ISSUED_AT),
        Err(RejectCode::BadSignature)
    );
    // A payload byte changed after signing (seq 7 -> 8) is caught the same way.
    let mut frame = seal_cmd(&typical_command(), &gateway_key());
    let seq_at = FRAME_HEADER_SIZE + 18;
    assert_eq!(frame[seq_at], 7);
    frame[seq_at] = 8;
    assert_eq!(
        car_verdict(&frame, 0, ISSUED_AT),
        Err(RejectCode::BadSignature)
    );
}

#[test]
fn unknown_key() {
    let frame = seal_cmd(&typical_command(), &SigningKey::from_bytes(&[1; 32]));
    assert_eq!(
        car_verdict(&frame, 0, ISSUED_AT),
        Err(RejectCode::UnknownKey)
    );
}

#[test]
fn key_rotation_trusts_either_key() {
    let old = gateway_key();
    let new = SigningKey::from_bytes(&[0x43; 32]);
    let trusted = [
        TrustedKey::new(old.verifying_key()),
        TrustedKey::new(new.verifying_key()),
    ];
    for key in [&old, &new] {
        let frame = seal_cmd(&typical_command(), key);
        assert_eq!(open_command(&frame, &trusted), Ok(typical_command()));
    }
}

#[test]
fn wrong_vin() {
    let mut cmd = typical_command();
    cmd.vin = OTHER_VIN.parse().unwrap();
    let frame = seal_cmd(&cmd, &gateway_key());
    assert_eq!(car_verdict(&frame, 0, ISSUED_AT), Err(RejectCode::WrongVin));
}

#[test]
fn replay_and_rollback() {
    let frame = seal_cmd(&typical_command(), &gateway_key());
    assert_eq!(car_verdict(&frame, 7, ISSUED_AT), Err(RejectCode::Replay));
    assert_eq!(car_verdict(&frame, 9, ISSUED_AT), Err(RejectCode::Replay));
}

#[test]
fn expired() {
    let cmd = typical_command();
    let frame = seal_cmd(&cmd, &gateway_key());
    assert!(car_verdict(&frame, 0, cmd.not_after).is_ok());
    assert_eq!(
        car_verdict(&frame, 0, cmd.not_after + 1),
        Err(RejectCode::Expired)
    );
}

#[test]
fn issued_in_future() {
    let frame = seal_cmd(&typical_command(), &gateway_key());
    assert!(car_verdict(&frame, 0, ISSUED_AT - MAX_FUTURE_SKEW_SECS).is_ok());
    assert_eq!(
        car_verdict(&frame, 0, ISSUED_AT - MAX_FUTURE_SKEW_SECS - 1),
        Err(RejectCode::IssuedInFuture)
    );
}

#[test]
fn malformed() {
    let frame = seal_cmd(&typical_command(), &gateway_key());
    // A report frame is not a command, whatever its signature.
    let report = seal_rpt(&typical_report(), &gateway_key());
    assert_eq!(
        car_verdict(&report, 0, ISSUED_AT),
        Err(RejectCode::Malformed)
    );
    // A length field that disagrees with the frame.
    let mut bad = frame.clone();
    bad[17] = bad[17].wrapping_add(1);
    assert_eq!(car_verdict(&bad, 0, ISSUED_AT), Err(RejectCode::Malformed));
    // Well signed, but the payload is not a command: signed garbage is still refused.
    let garbage = sign_raw(b"caas-cmd", &[0xff; 40]);
    assert_eq!(
        car_verdict(&garbage, 0, ISSUED_AT),
        Err(RejectCode::Malformed)
    );
    // Well signed, decodes, but breaks a structural rule (issued after not-after).
    let mut cmd = typical_command();
    cmd.not_after = cmd.issued_at - 1;
    let payload = postcard::to_allocvec(&cmd).unwrap();
    let frame = sign_raw(b"caas-cmd", &payload);
    assert_eq!(
        car_verdict(&frame, 0, ISSUED_AT),
        Err(RejectCode::Malformed)
    );
    // Sealing refuses it in the first place.
    let mut buf = [0u8; MAX_COMMAND_FRAME_SIZE];
    assert_eq!(
        seal_command(&cmd, &gateway_key(), &mut buf).unwrap_err(),
        SealError::Invalid(RejectCode::Malformed)
    );
    // Trailing bytes after the payload are refused.
    let mut payload = postcard::to_allocvec(&typical_command()).unwrap();
    payload.push(0);
    assert_eq!(
        car_verdict(&sign_raw(b"caas-cmd", &payload), 0, ISSUED_AT),
        Err(RejectCode::Malformed)
    );
    // A grant without flags, a duplicated service.
    for breakage in [0, 1] {
        let mut cmd = typical_command();
        if let CommandBody::SetState(d) = &mut cmd.body {
            if breakage == 0 {
                d.grants[0].flags.clear();
            } else {
                d.grants[1].service_id = d.grants[0].service_id.clone();
            }
        }
        let frame = sign_raw(b"caas-cmd", &postcard::to_allocvec(&cmd).unwrap());
        assert_eq!(
            car_verdict(&frame, 0, ISSUED_AT),
            Err(RejectCode::Malformed)
        );
    }
    // An invalid VIN inside a well-signed payload.
    let mut payload = postcard::to_allocvec(&typical_command()).unwrap();
    payload[1] = b'I';
    assert_eq!(
        car_verdict(&sign_raw(b"caas-cmd", &payload), 0, ISSUED_AT),
        Err(RejectCode::Malformed)
    );
}

#[test]
fn too_large() {
    let frame = vec![0u8; MAX_COMMAND_FRAME_SIZE + 1];
    assert_eq!(car_verdict(&frame, 0, ISSUED_AT), Err(RejectCode::TooLarge));
    let endless = vec![0u8; 1 << 20];
    assert_eq!(
        car_verdict(&endless, 0, ISSUED_AT),
        Err(RejectCode::TooLarge)
    );
}

#[test]
fn unsupported_version() {
    let mut frame = seal_cmd(&typical_command(), &gateway_key());
    frame[8] = 2;
    assert_eq!(
        car_verdict(&frame, 0, ISSUED_AT),
        Err(RejectCode::UnsupportedVersion)
    );
}

fn with_flag(flag: &str) -> Command {
    let mut cmd = typical_command();
    if let CommandBody::SetState(d) = &mut cmd.body {
        d.grants[1].flags.push(flag.parse().unwrap()).unwrap();
    }
    cmd
}

#[test]
fn unknown_feature() {
    let frame = seal_cmd(&with_flag("warp_drive"), &gateway_key());
    assert_eq!(
        car_verdict(&frame, 0, ISSUED_AT),
        Err(RejectCode::UnknownFeature)
    );
}

#[test]
fn base_platform_feature() {
    let frame = seal_cmd(&with_flag("abs"), &gateway_key());
    assert_eq!(
        car_verdict(&frame, 0, ISSUED_AT),
        Err(RejectCode::BasePlatformFeature)
    );
}

#[test]
fn refused_grants_names_each_grant_that_switches_a_forbidden_feature() {
    let grants = |cmd: &Command| match &cmd.body {
        CommandBody::SetState(d) => d.grants.clone(),
        CommandBody::QueryStatus { .. } => panic!("a SetState"),
    };
    assert_eq!(refused_grants(grants(&typical_command()), &Catalog), 0);
    // The second grant (bit 1) is the bad one, whichever way it is bad.
    assert_eq!(
        refused_grants(grants(&with_flag("warp_drive")), &Catalog),
        0b10
    );
    assert_eq!(refused_grants(grants(&with_flag("abs")), &Catalog), 0b10);
    let mut both = with_flag("abs");
    if let CommandBody::SetState(d) = &mut both.body {
        d.grants[0]
            .flags
            .push("warp_drive".parse().unwrap())
            .unwrap();
    }
    assert_eq!(refused_grants(grants(&both), &Catalog), 0b11);
    assert_eq!(refused_places(0b1000_0101).collect::<Vec<_>>(), [0, 2, 7]);
    // The same answer from the grants read in place, as a car reads them.
    let frame = seal_cmd(&both, &gateway_key());
    let view = open_command_view(&frame, &trusted_gateway()).unwrap();
    let BodyView::SetState(desired) = view.body else {
        panic!("a SetState")
    };
    assert_eq!(refused_grants(desired.grants().iter(), &Catalog), 0b11);
}

#[test]
fn queries_are_not_replays_but_are_still_checked() {
    let query = |vin: &str, not_after| Command {
        vin: vin.parse().unwrap(),
        seq: 3,
        issued_at: ISSUED_AT,
        not_after,
        body: CommandBody::QueryStatus { nonce: 1 },
    };
    let ok = seal_cmd(&query(VIN, ISSUED_AT + 60), &gateway_key());
    assert!(car_verdict(&ok, 9, ISSUED_AT).is_ok());
    assert_eq!(
        car_verdict(&ok, 9, ISSUED_AT + 61),
        Err(RejectCode::Expired)
    );
    let other = seal_cmd(&query(OTHER_VIN, ISSUED_AT + 60), &gateway_key());
    assert_eq!(car_verdict(&other, 9, ISSUED_AT), Err(RejectCode::WrongVin));
}

#[test]
fn car_side_codes_travel_in_reports() {
    for code in RejectCode::ALL {
        let mut report = typical_report();
        report.outcome = Outcome::Rejected { seq: 9, code };
        let frame = seal_rpt(&report, &car_key());
        let car = TrustedKey::new(car_key().verifying_key());
        assert_eq!(open_report(&frame, &car).unwrap().outcome, report.outcome);
        assert_eq!(RejectCode::from_u8(code.as_u8()), Some(code));
    }
    assert_eq!(RejectCode::from_u8(0), None);
    assert_eq!(RejectCode::from_u8(14), None);
}

#[test]
fn reports_are_only_believed_from_the_car_key() {
    let car = TrustedKey::new(car_key().verifying_key());
    // Signed by the gateway key (or any other car): refused.
    let forged = seal_rpt(&typical_report(), &gateway_key());
    assert_eq!(open_report(&forged, &car), Err(RejectCode::UnknownKey));
    // A command frame signed by the car key is not a report.
    let cmd = seal_cmd(&typical_command(), &car_key());
    assert_eq!(open_report(&cmd, &car), Err(RejectCode::Malformed));
    // Signal strength above 100 is malformed.
    let mut report = typical_report();
    report.diagnostics.signal_strength = 101;
    let frame = sign_raw_with(
        b"caas-rpt",
        &postcard::to_allocvec(&report).unwrap(),
        &car_key(),
    );
    assert_eq!(open_report(&frame, &car), Err(RejectCode::Malformed));
}

#[test]
fn every_truncation_and_byte_flip_is_refused_without_panic() {
    let trusted = trusted_gateway();
    let car = TrustedKey::new(car_key().verifying_key());
    let frames = [
        (
            FrameKind::Command,
            seal_cmd(&typical_command(), &gateway_key()),
        ),
        (FrameKind::Report, seal_rpt(&typical_report(), &car_key())),
    ];
    let open = |kind, bytes: &[u8]| match kind {
        FrameKind::Command => open_command(bytes, &trusted).map(drop),
        FrameKind::Report => open_report(bytes, &car).map(drop),
    };
    let mut checked = 0;
    for (kind, frame) in &frames {
        assert!(open(*kind, frame).is_ok());
        for len in 0..frame.len() {
            assert!(
                open(*kind, &frame[..len]).is_err(),
                "truncation to {len} accepted"
            );
            checked += 1;
        }
        for i in 0..frame.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut bad = frame.clone();
                bad[i] ^= mask;
                assert!(open(*kind, &bad).is_err(), "flip {mask:#x} at {i} accepted");
                let _ = parse_frame(&bad, *kind);
                checked += 1;
            }
        }
    }
    assert!(checked > 1000);
}

#[test]
fn maximal_messages_fill_exactly_the_stated_bounds() {
    let max_u64 = u64::MAX;
    let name = |n: usize| "x".repeat(n);
    let mut desired = DesiredState::default();
    for i in 0..MAX_SETTLES {
        desired.settles.push(RequestId([i as u8; 16])).unwrap();
    }
    for g in 0..MAX_GRANTS {
        let mut sid = name(ServiceId::MAX_LEN);
        sid.replace_range(0..1, &g.to_string());
        let mut grant = Grant::new(sid.parse().unwrap());
        for f in 0..MAX_FLAGS_PER_GRANT {
            let mut flag = name(FeatureFlag::MAX_LEN);
            flag.replace_range(0..1, &f.to_string());
            grant.flags.push(flag.parse().unwrap()).unwrap();
        }
        for p in 0..MAX_PARAMS_PER_GRANT {
            let mut key = name(ParamKey::MAX_LEN);
            key.replace_range(0..1, &p.to_string());
            grant
                .params
                .push(Param {
                    key: key.parse().unwrap(),
                    value: name(ParamValue::MAX_LEN).parse().unwrap(),
                })
                .unwrap();
        }
        grant.ends_at = Some(max_u64);
        desired.grants.push(grant).unwrap();
    }
    let cmd = Command {
        vin: vin(),
        seq: max_u64,
        issued_at: max_u64,
        not_after: max_u64,
        body: CommandBody::SetState(desired),
    };
    let frame = seal_cmd(&cmd, &gateway_key());
    assert_eq!(frame.len(), MAX_COMMAND_FRAME_SIZE);
    assert_eq!(open_command(&frame, &trusted_gateway()), Ok(cmd));

    let mut report = typical_report();
    report.applied_seq = max_u64;
    report.car_time = max_u64;
    report.outcome = Outcome::GrantsRefused {
        seq: max_u64,
        code: RejectCode::BasePlatformFeature,
        grants: u8::MAX,
    };
    report.active.clear();
    for g in 0..MAX_GRANTS {
        let mut sid = name(ServiceId::MAX_LEN);
        sid.replace_range(0..1, &g.to_string());
        report
            .active
            .push(ActiveService {
                service_id: sid.parse().unwrap(),
                ends_at: Some(max_u64),
            })
            .unwrap();
    }
    report.diagnostics.firmware_version = name(FirmwareVersion::MAX_LEN).parse().unwrap();
    report.diagnostics.error_codes.clear();
    for _ in 0..MAX_ERROR_CODES {
        report
            .diagnostics
            .error_codes
            .push(name(ErrorCode::MAX_LEN).parse().unwrap())
            .unwrap();
    }
    let frame = seal_rpt(&report, &car_key());
    assert_eq!(frame.len(), MAX_REPORT_FRAME_SIZE);
    // Too small a buffer is an error, not a panic.
    let mut small = [0u8; 100];
    assert_eq!(
        seal_report(&report, &car_key(), &mut small),
        Err(SealError::BufferTooSmall)
    );
}

/// Builds a frame around arbitrary payload bytes, signed by the gateway key.
fn sign_raw(tag: &[u8; 8], payload: &[u8]) -> Vec<u8> {
    sign_raw_with(tag, payload, &gateway_key())
}

fn sign_raw_with(tag: &[u8; 8], payload: &[u8], key: &SigningKey) -> Vec<u8> {
    use ed25519_dalek::Signer;
    let mut frame = tag.to_vec();
    frame.push(FORMAT_VERSION);
    frame.extend_from_slice(&KeyId::of(&key.verifying_key()).0);
    frame.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    frame.extend_from_slice(payload);
    let sig = key.sign(&frame);
    frame.extend_from_slice(&sig.to_bytes());
    frame
}
