//! The agent core's rules, each against a simulated car (tests/common).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use caas_agent::*;
use caas_protocol::*;
use common::*;

fn rejected(car: &Car) -> (u64, RejectCode) {
    let outcome = car.last_report().outcome;
    outcome
        .refusal()
        .unwrap_or_else(|| panic!("expected a rejection, got {outcome:?}"))
}

/// The grants the last report names as refused (0 for a refusal that names none).
fn refused_grants(car: &Car) -> u8 {
    match car.last_report().outcome {
        Outcome::GrantsRefused { grants, .. } => grants,
        Outcome::Rejected { .. } => 0,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// Asserts the frame was refused with `code`, acknowledged once, and changed nothing.
fn assert_refused(car: &mut Car, frame: &[u8], now: u64, seq: u64, code: RejectCode) {
    let store = car.store.clone();
    let lines = car.lines.clone();
    let state = car.agent.state().clone();
    let done = car.frame(frame, now);
    assert_eq!(
        done,
        vec![Done::Ack, Done::Publish],
        "a refusal is acked and reported, nothing else"
    );
    assert_eq!(rejected(car), (seq, code));
    assert_eq!(car.agent.last_rejection(), Some((seq, code)));
    assert_eq!(car.store, store);
    assert_eq!(car.lines, lines);
    assert_eq!(car.agent.state(), &state);
}

#[test]
fn a_valid_command_is_persisted_then_applied_then_acked_then_reported() {
    let mut car = Car::new(T0);
    let cmd = set_state(
        1,
        T0,
        vec![
            grant("boost", &["power_boost"], Some(T0 + 100)),
            grant("seats", &["heated_seats"], None),
        ],
    );
    let done = car.command(&cmd, T0);
    assert_eq!(
        done,
        vec![
            Done::Persist,
            Done::On("power_boost".into()),
            Done::On("heated_seats".into()),
            Done::Ack,
            Done::Publish
        ]
    );
    assert_eq!(car.acks, 1);
    assert_eq!(
        car.lines["power_boost"],
        vec![("level".to_string(), "boost".to_string())]
    );
    let stored = car.stored();
    assert_eq!(stored.applied_seq, 1);
    assert_eq!(stored.grants.len(), 2);
    let report = car.last_report();
    assert_eq!(report.outcome, Outcome::Applied { seq: 1 });
    assert_eq!(report.applied_seq, 1);
    assert_eq!(report.active.len(), 2);
    assert_eq!(report.active[0].ends_at, Some(T0 + 100));
    assert_eq!(report.diagnostics.firmware_version.as_str(), "1.2.3");
    assert!(report.diagnostics.error_codes.is_empty());
}

#[test]
fn a_newer_command_replaces_the_whole_state_and_refreshes_parameters() {
    let mut car = Car::new(T0);
    car.command(
        &set_state(
            1,
            T0,
            vec![
                grant("boost", &["power_boost"], None),
                grant("seats", &["heated_seats"], None),
            ],
        ),
        T0,
    );
    let done = car.command(
        &set_state(
            2,
            T0 + 1,
            vec![grant("boost2", &["power_boost", "snow_mode"], None)],
        ),
        T0 + 1,
    );
    assert_eq!(
        done,
        vec![
            Done::Persist,
            Done::Off("heated_seats".into()),
            Done::On("power_boost".into()),
            Done::On("snow_mode".into()),
            Done::Ack,
            Done::Publish
        ]
    );
    assert_eq!(car.lines_on(), vec!["power_boost", "snow_mode"]);
    assert_eq!(
        car.lines["power_boost"][0].1, "boost2",
        "new parameters reach a line that stayed on"
    );
    // An empty desired state withdraws everything.
    let done = car.command(&set_state(3, T0 + 2, vec![]), T0 + 2);
    assert_eq!(done[0], Done::Persist);
    assert!(car.lines.is_empty());
    assert!(car.last_report().active.is_empty());
}

#[test]
fn frames_that_do_not_verify_are_refused_and_change_nothing() {
    let mut car = Car::new(T0);
    car.command(
        &set_state(1, T0, vec![grant("boost", &["power_boost"], None)]),
        T0,
    );
    let mut tampered = seal(
        &set_state(2, T0, vec![grant("seats", &["heated_seats"], None)]),
        &gateway_key(),
    );
    let n = tampered.len();
    tampered[n - 70] ^= 1;
    assert_refused(&mut car, &tampered, T0, 0, RejectCode::BadSignature);
    let stranger = SigningKey::from_bytes(&[9; 32]);
    let forged = seal(
        &set_state(2, T0, vec![grant("seats", &["heated_seats"], None)]),
        &stranger,
    );
    assert_refused(&mut car, &forged, T0, 0, RejectCode::UnknownKey);
    assert_refused(&mut car, b"garbage", T0, 0, RejectCode::Malformed);
    assert_refused(
        &mut car,
        &vec![0u8; MAX_COMMAND_FRAME_SIZE + 1],
        T0,
        0,
        RejectCode::TooLarge,
    );
}

#[test]
fn another_cars_command_is_refused() {
    let mut car = Car::new(T0);
    let mut cmd = set_state(1, T0, vec![grant("boost", &["power_boost"], None)]);
    cmd.vin = other_vin();
    assert_refused(
        &mut car,
        &seal(&cmd, &gateway_key()),
        T0,
        1,
        RejectCode::WrongVin,
    );
}

#[test]
fn replays_and_rollbacks_are_refused_and_the_last_applied_is_resent() {
    let mut car = Car::new(T0);
    let one = seal(
        &set_state(1, T0, vec![grant("boost", &["power_boost"], None)]),
        &gateway_key(),
    );
    let three = seal(
        &set_state(3, T0, vec![grant("seats", &["heated_seats"], None)]),
        &gateway_key(),
    );
    let two = seal(
        &set_state(2, T0, vec![grant("snow", &["snow_mode"], None)]),
        &gateway_key(),
    );
    car.frame(&one, T0);
    car.frame(&three, T0);
    // Rolling back to an older state is refused, even one never seen.
    assert_refused(&mut car, &two, T0, 2, RejectCode::Replay);
    assert_refused(&mut car, &one, T0, 1, RejectCode::Replay);
    // The command in force, delivered again, is acked and reported, not applied again.
    let done = car.frame(&three, T0 + 5);
    assert_eq!(done, vec![Done::Ack, Done::Publish]);
    assert_eq!(car.last_report().outcome, Outcome::Applied { seq: 3 });
    assert_eq!(car.lines_on(), vec!["heated_seats"]);
    // ...even once it has expired: it was applied, and saying so settles it.
    let done = car.frame(&three, T0 + 10_000);
    assert_eq!(done, vec![Done::Ack, Done::Publish]);
    assert_eq!(car.last_report().outcome, Outcome::Applied { seq: 3 });
}

#[test]
fn expired_and_future_commands_are_refused() {
    let mut car = Car::new(T0);
    let mut old = set_state(1, T0 - 7200, vec![grant("boost", &["power_boost"], None)]);
    old.not_after = T0 - 1;
    assert_refused(
        &mut car,
        &seal(&old, &gateway_key()),
        T0,
        1,
        RejectCode::Expired,
    );
    let early = set_state(
        1,
        T0 + MAX_FUTURE_SKEW_SECS + 1,
        vec![grant("boost", &["power_boost"], None)],
    );
    assert_refused(
        &mut car,
        &seal(&early, &gateway_key()),
        T0,
        1,
        RejectCode::IssuedInFuture,
    );
    // Within the skew is fine, and pulls the trusted clock forward.
    let skewed = set_state(
        1,
        T0 + MAX_FUTURE_SKEW_SECS,
        vec![grant("boost", &["power_boost"], None)],
    );
    car.command(&skewed, T0);
    assert_eq!(car.agent.state().applied_seq, 1);
    assert_eq!(car.agent.trusted_time(), T0 + MAX_FUTURE_SKEW_SECS);
}

#[test]
fn base_platform_and_unknown_features_are_refused_all_or_nothing() {
    let mut car = Car::new(T0);
    car.command(
        &set_state(1, T0, vec![grant("boost", &["power_boost"], None)]),
        T0,
    );
    let base = set_state(
        2,
        T0,
        vec![
            grant("seats", &["heated_seats"], None),
            grant("brakes", &["abs"], None),
        ],
    );
    assert_refused(
        &mut car,
        &seal(&base, &gateway_key()),
        T0,
        2,
        RejectCode::BasePlatformFeature,
    );
    // The report names the second grant, the one that touches the base platform.
    assert_eq!(refused_grants(&car), 0b10);
    let unknown = set_state(
        2,
        T0,
        vec![
            grant("seats", &["heated_seats"], None),
            grant("x", &["warp_drive"], None),
        ],
    );
    assert_refused(
        &mut car,
        &seal(&unknown, &gateway_key()),
        T0,
        2,
        RejectCode::UnknownFeature,
    );
    assert_eq!(refused_grants(&car), 0b10);
    assert_eq!(car.lines_on(), vec!["power_boost"]);
    // A refusal for the seq names no grant: the command is not to blame for what it holds.
    assert_refused(
        &mut car,
        &seal(&set_state(0, T0, vec![]), &gateway_key()),
        T0,
        0,
        RejectCode::Replay,
    );
    assert_eq!(refused_grants(&car), 0);
    // The refused seq stays usable: the gateway's corrected command goes through.
    car.command(
        &set_state(2, T0, vec![grant("seats", &["heated_seats"], None)]),
        T0,
    );
    assert_eq!(car.lines_on(), vec!["heated_seats"]);
}

#[test]
fn a_status_query_is_answered_with_its_nonce_and_changes_nothing() {
    let mut car = Car::new(T0);
    car.command(
        &set_state(1, T0, vec![grant("boost", &["power_boost"], None)]),
        T0,
    );
    let q = Command {
        vin: vin(),
        seq: 0,
        issued_at: T0,
        not_after: T0 + 60,
        body: CommandBody::QueryStatus { nonce: 77 },
    };
    let store = car.store.clone();
    let done = car.command(&q, T0 + 1);
    assert_eq!(done, vec![Done::Ack, Done::Publish]);
    assert_eq!(car.last_report().outcome, Outcome::Status { nonce: 77 });
    assert_eq!(car.last_report().applied_seq, 1);
    assert_eq!(car.store, store);
}

#[test]
fn a_temporary_grant_ends_on_time_while_offline() {
    let mut car = Car::new(T0);
    car.command(
        &set_state(
            1,
            T0,
            vec![
                grant("boost", &["power_boost"], Some(T0 + 100)),
                grant("seats", &["heated_seats"], None),
            ],
        ),
        T0,
    );
    assert_eq!(
        car.agent.poll_timeout(),
        Some(T0 + 100),
        "the earliest grant end is the next wake-up"
    );
    assert!(car
        .timeout(T0 + 99)
        .iter()
        .all(|d| !matches!(d, Done::Off(_))));
    assert_eq!(car.lines_on(), vec!["heated_seats", "power_boost"]);
    let done = car.timeout(T0 + 100);
    // The lines that stay on are sent again: a flag two grants shared may change hands.
    assert_eq!(
        done,
        vec![
            Done::Persist,
            Done::Off("power_boost".into()),
            Done::On("heated_seats".into())
        ]
    );
    assert_eq!(car.lines_on(), vec!["heated_seats"]);
    let stored = car.stored();
    assert_eq!(
        stored.grants.len(),
        1,
        "the ended grant is dropped from the store"
    );
    assert!(stored.trusted_time >= T0 + 100);
    assert_eq!(
        car.agent.poll_timeout(),
        Some(T0 + 600),
        "next: the periodic report"
    );
}

#[test]
fn turning_the_clock_back_never_extends_a_paid_period() {
    let mut car = Car::new(T0);
    car.command(
        &set_state(
            1,
            T0,
            vec![grant("boost", &["power_boost"], Some(T0 + 100))],
        ),
        T0,
    );
    // While running: the clock jumps back a day; the grant still ends after 100 s of use.
    car.timeout(T0 + 40);
    car.timeout(T0 - 86_400);
    assert_eq!(car.agent.trusted_time(), T0 + 40);
    assert_eq!(
        car.agent.poll_timeout(),
        Some(T0 - 86_400 + 60),
        "answered on the car's (wrong) clock"
    );
    car.timeout(T0 - 86_400 + 59);
    assert_eq!(car.lines_on(), vec!["power_boost"]);
    car.timeout(T0 - 86_400 + 60);
    assert!(car.lines.is_empty());

    // Across a reboot, before the end: the stored trusted time bounds what a clock set
    // back can gain to the time the car was off.
    let mut car = Car::new(T0);
    car.command(
        &set_state(
            1,
            T0 + 10,
            vec![grant("boost", &["power_boost"], Some(T0 + 100))],
        ),
        T0,
    );
    car.reboot(config(), T0 - 5000);
    assert_eq!(car.agent.trusted_time(), T0 + 10);
    assert_eq!(car.lines_on(), vec!["power_boost"]);
    assert_eq!(car.agent.poll_timeout(), Some(T0 - 5000 + 90));
    car.timeout(T0 - 5000 + 90);
    assert!(car.lines.is_empty());

    // Across a reboot after the end: the ended grant is gone from the store for good.
    car.reboot(config(), T0 - 100_000);
    assert!(car.lines.is_empty());
    assert!(car.agent.active_grants().next().is_none());
    assert!(car.agent.trusted_time() >= T0 + 100);
}

#[test]
fn a_grant_that_ended_while_the_car_was_off_is_dropped_at_boot() {
    let mut car = Car::new(T0);
    car.command(
        &set_state(
            1,
            T0,
            vec![
                grant("boost", &["power_boost"], Some(T0 + 100)),
                grant("seats", &["heated_seats"], None),
            ],
        ),
        T0,
    );
    car.lines.clear();
    car.agent = Agent::new(config(), car.store.as_deref(), T0 + 1000);
    let done = car.drain();
    assert_eq!(done, vec![Done::Persist, Done::On("heated_seats".into())]);
    assert_eq!(car.stored().grants.len(), 1);
}

#[test]
fn the_gateway_key_rotates_without_downtime() {
    let old = gateway_key();
    let new = next_gateway_key();
    let mut car = Car::boot(config_with(&[&old, &new]), None, T0);
    car.command(
        &set_state(1, T0, vec![grant("boost", &["power_boost"], None)]),
        T0,
    );
    let by_new = seal(
        &set_state(2, T0, vec![grant("seats", &["heated_seats"], None)]),
        &new,
    );
    car.frame(&by_new, T0);
    assert_eq!(car.agent.state().applied_seq, 2);
    // The old key retired: its commands are refused, the new key's still work.
    car.reboot(config_with(&[&new]), T0 + 1);
    let by_old = seal(
        &set_state(3, T0 + 1, vec![grant("snow", &["snow_mode"], None)]),
        &old,
    );
    assert_refused(&mut car, &by_old, T0 + 1, 0, RejectCode::UnknownKey);
    car.frame(
        &seal(
            &set_state(3, T0 + 1, vec![grant("snow", &["snow_mode"], None)]),
            &new,
        ),
        T0 + 1,
    );
    assert_eq!(car.lines_on(), vec!["snow_mode"]);
}

#[test]
fn a_corrupt_or_foreign_record_boots_to_the_safe_state_and_says_so() {
    let mut car = Car::new(T0);
    car.command(
        &set_state(5, T0, vec![grant("boost", &["power_boost"], None)]),
        T0,
    );
    let good = car.store.clone().unwrap();

    let mut corrupt = good.clone();
    corrupt[10] ^= 0x40;
    let mut version = good.clone();
    version[4] = 99;
    let mut foreign = caas_agent::PersistedState::decode(&good).unwrap();
    foreign.vin = other_vin();
    let mut buf = vec![0u8; MAX_PERSISTED_SIZE];
    let foreign = foreign.encode(&mut buf).unwrap().to_vec();

    for (record, code) in [
        (corrupt, ERR_STATE_CORRUPT),
        (version, ERR_STATE_VERSION),
        (foreign, ERR_STATE_WRONG_VIN),
    ] {
        let mut car = Car::boot(config(), Some(record), T0 + 1);
        assert_eq!(car.agent.boot_status(), BootStatus::SafeState);
        assert!(
            car.lines.is_empty(),
            "no optional feature in the safe state"
        );
        assert_eq!(car.agent.state().applied_seq, 0);
        car.agent.handle_connected(T0 + 1);
        car.drain();
        let codes: Vec<&str> = car
            .last_report()
            .diagnostics
            .error_codes
            .iter()
            .map(|c| c.as_str())
            .collect();
        assert_eq!(codes, vec![code]);
        // The gateway's retained state brings the car back.
        car.command(
            &set_state(5, T0, vec![grant("boost", &["power_boost"], None)]),
            T0 + 2,
        );
        assert_eq!(car.lines_on(), vec!["power_boost"]);
    }
    let car = Car::boot(config(), Some(good), T0 + 1);
    assert_eq!(car.agent.boot_status(), BootStatus::Restored);
    assert_eq!(car.lines_on(), vec!["power_boost"]);
}

#[test]
fn a_record_granting_a_feature_the_platform_lost_drops_that_grant() {
    let mut state = caas_agent::PersistedState::empty(vin());
    state.applied_seq = 4;
    state.grants.push(grant("brakes", &["abs"], None)).unwrap();
    state
        .grants
        .push(grant("boost", &["power_boost"], None))
        .unwrap();
    let mut buf = vec![0u8; MAX_PERSISTED_SIZE];
    let bytes = state.encode(&mut buf).unwrap().to_vec();
    let car = Car::boot(config(), Some(bytes), T0);
    assert_eq!(car.lines_on(), vec!["power_boost"]);
    assert_eq!(car.stored().grants.len(), 1);
    assert_eq!(
        car.agent.diagnostics().error_codes[0].as_str(),
        ERR_STATE_FEATURES
    );
}

#[test]
fn a_failed_persist_applies_nothing_and_acks_nothing() {
    let mut car = Car::new(T0);
    car.command(
        &set_state(1, T0, vec![grant("boost", &["power_boost"], None)]),
        T0,
    );
    let frame = seal(
        &set_state(2, T0, vec![grant("seats", &["heated_seats"], None)]),
        &gateway_key(),
    );
    car.fail_next_persist = true;
    let done = car.frame(&frame, T0);
    assert_eq!(done, vec![Done::Persist, Done::Publish]);
    assert_eq!(car.acks, 1, "only the first command was acked");
    assert_eq!(rejected(&car), (2, RejectCode::StorageFailed));
    assert_eq!(car.agent.state().applied_seq, 1);
    assert_eq!(car.lines_on(), vec!["power_boost"]);
    assert!(car
        .last_report()
        .diagnostics
        .error_codes
        .iter()
        .any(|c| c.as_str() == ERR_PERSIST_FAILED));
    // The broker redelivers it; this time the store works.
    car.frame(&frame, T0 + 1);
    assert_eq!(car.acks, 2);
    assert_eq!(car.lines_on(), vec!["heated_seats"]);
}

#[test]
fn a_persist_never_handed_out_is_dropped_with_its_ack() {
    let mut car = Car::new(T0);
    car.agent.handle_frame(
        &seal(
            &set_state(1, T0, vec![grant("boost", &["power_boost"], None)]),
            &gateway_key(),
        ),
        T0,
    );
    // The driver breaks the contract and hands over another frame without draining.
    car.command(
        &set_state(2, T0, vec![grant("seats", &["heated_seats"], None)]),
        T0,
    );
    assert_eq!(
        car.acks, 1,
        "seq 1 was never stored, so it is not acked (the broker will redeliver)"
    );
    assert_eq!(car.stored().applied_seq, 2);
}

#[test]
fn periodic_and_reconnect_reports_carry_a_counter() {
    let mut car = Car::new(T0);
    assert_eq!(car.agent.poll_timeout(), Some(T0 + 600));
    car.timeout(T0 + 599);
    assert!(car.reports.is_empty());
    car.timeout(T0 + 600);
    assert_eq!(car.last_report().outcome, Outcome::Periodic { counter: 0 });
    car.agent.handle_connected(T0 + 601);
    car.drain();
    assert_eq!(car.last_report().outcome, Outcome::Periodic { counter: 1 });
    assert_eq!(car.agent.poll_timeout(), Some(T0 + 1201));
    car.agent.set_signal_strength(250);
    car.agent.add_error_code("HOOK_FAILED".parse().unwrap());
    car.timeout(T0 + 1201);
    assert_eq!(car.last_report().diagnostics.signal_strength, 100);
    assert_eq!(
        car.last_report().diagnostics.error_codes[0].as_str(),
        "HOOK_FAILED"
    );
    car.agent.clear_error_code("HOOK_FAILED");
    assert!(car.agent.diagnostics().error_codes.is_empty());
}

#[test]
fn the_trusted_time_is_written_down_hourly_even_when_nothing_happens() {
    let mut car = Car::new(T0);
    car.command(&set_state(1, T0, vec![]), T0);
    let t = T0 + TIME_PERSIST_INTERVAL_SECS;
    let done = car.timeout(t);
    assert_eq!(done[0], Done::Persist);
    assert_eq!(car.stored().trusted_time, t);
}

#[test]
fn frames_received_into_the_agents_buffer_are_handled_the_same() {
    let mut car = Car::new(T0);
    let frame = seal(
        &set_state(1, T0, vec![grant("boost", &["power_boost"], None)]),
        &gateway_key(),
    );
    car.agent.frame_buffer()[..frame.len()].copy_from_slice(&frame);
    car.agent.handle_buffered_frame(frame.len(), T0);
    car.drain();
    assert_eq!(car.lines_on(), vec!["power_boost"]);
    assert_eq!(car.acks, 1);
    car.agent.handle_buffered_frame(AGENT_BUFFER_SIZE + 1, T0);
    car.drain();
    assert_eq!(rejected(&car), (0, RejectCode::TooLarge));
}

#[test]
fn the_agent_is_send_and_small() {
    fn is_send<T: Send>() {}
    is_send::<Agent<Catalog<'static>>>();
    let size = std::mem::size_of::<Agent<Catalog<'static>>>();
    println!("size_of::<Agent>() on this host: {size} bytes (buffer {AGENT_BUFFER_SIZE})");
    // 64-bit hosts store lengths in 8 bytes; the Cortex-M4 build is smaller still (the
    // crate checks it stays within 7 KiB there at compile time).
    assert!(size < 8 * 1024, "{size}");
}

/// Everything an observer can see of an agent, for comparing two of them.
fn observed(car: &mut Car) -> String {
    let agent = &car.agent;
    format!(
        "{:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?}",
        agent.boot_status(),
        agent.state(),
        agent.trusted_time(),
        agent.poll_timeout(),
        agent.diagnostics(),
        agent.lines_on().iter().collect::<Vec<_>>(),
        agent.active_grants().collect::<Vec<_>>(),
        car.lines,
    )
}

#[test]
fn rebooting_in_place_is_booting_anew() {
    // Records to boot from: none, a sound one with a grant that ends while the car is off, a
    // corrupt one, another car's, one naming a lost feature, one too long for any buffer.
    let mut car = Car::new(T0);
    car.command(
        &set_state(
            3,
            T0,
            vec![
                grant("boost", &["power_boost"], Some(T0 + 50)),
                grant("seats", &["heated_seats", "snow_mode"], None),
            ],
        ),
        T0,
    );
    let good = car.store.clone().unwrap();
    let mut corrupt = good.clone();
    corrupt[12] ^= 1;
    let mut foreign = PersistedState::decode(&good).unwrap();
    foreign.vin = other_vin();
    let mut lost = PersistedState::decode(&good).unwrap();
    lost.grants.push(grant("brakes", &["abs"], None)).unwrap();
    let mut buf = vec![0u8; MAX_PERSISTED_SIZE];
    let foreign = foreign.encode(&mut buf).unwrap().to_vec();
    let lost = lost.encode(&mut buf).unwrap().to_vec();
    let long = vec![0u8; AGENT_BUFFER_SIZE + 1];
    let records = [
        None,
        Some(good),
        Some(corrupt),
        Some(foreign),
        Some(lost),
        Some(long),
    ];

    for record in records {
        let now = T0 + 100;
        let mut anew = Car::boot(config(), record.clone(), now);
        // The same agent, used first (a command applied, reports sent), then rebooted.
        let mut again = Car::new(T0);
        again.command(
            &set_state(9, T0, vec![grant("x", &["highway_autopilot"], None)]),
            T0,
        );
        again.agent.handle_connected(T0);
        again.drain();
        again.lines.clear();
        again.reports.clear();
        again.acks = 0;
        let stored = record.as_ref().map(|r| {
            let buf = again.agent.frame_buffer();
            let n = r.len().min(buf.len());
            buf[..n].copy_from_slice(&r[..n]);
            r.len()
        });
        again.agent.reboot_from_buffer(stored, now);
        again.store = record.clone();
        let done = again.drain();
        let done_anew = {
            // Car::boot drained already; boot once more to see the same first actions.
            let mut fresh = Car {
                agent: Agent::new(config(), record.as_deref(), now),
                store: record.clone(),
                lines: Default::default(),
                acks: 0,
                reports: Vec::new(),
                fail_next_persist: false,
            };
            fresh.drain()
        };
        assert_eq!(done, done_anew, "{record:?}");
        assert_eq!(observed(&mut again), observed(&mut anew), "{record:?}");
        // And they go on alike: the same command, the same reports (bar the signature's
        // randomness-free determinism: Ed25519 signatures are deterministic).
        let cmd = set_state(10, now, vec![grant("boost", &["power_boost"], None)]);
        assert_eq!(again.command(&cmd, now), anew.command(&cmd, now));
        assert_eq!(again.last_report(), anew.last_report());
        assert_eq!(again.store, anew.store);
    }
}

#[test]
fn an_unbooted_agent_is_a_fresh_car_at_time_zero() {
    let mut unbooted = Car {
        agent: Agent::unbooted(config()),
        store: None,
        lines: Default::default(),
        acks: 0,
        reports: Vec::new(),
        fail_next_persist: false,
    };
    let mut fresh = Car::boot(config(), None, 0);
    assert_eq!(unbooted.drain(), vec![]);
    assert_eq!(observed(&mut unbooted), observed(&mut fresh));
}

#[test]
fn lines_on_names_the_lines_switched_on() {
    let mut car = Car::new(T0);
    assert!(car.agent.lines_on().is_empty());
    car.command(
        &set_state(
            1,
            T0,
            vec![
                grant("a", &["snow_mode", "power_boost"], None),
                grant("b", &["power_boost"], None),
            ],
        ),
        T0,
    );
    let lines = car.agent.lines_on();
    assert_eq!(lines.len(), 2);
    assert!(lines.contains("snow_mode") && lines.contains("power_boost"));
    assert!(!lines.contains("heated_seats"));
    let names: Vec<String> = lines.iter().map(|f| f.as_str().to_string()).collect();
    assert_eq!(names, vec!["snow_mode", "power_boost"]);
    // The grants keep their flags by catalogue number; active_grants names them again.
    assert_eq!(car.agent.state().grants[0].flags, [2u16, 0]);
    let active: Vec<Grant> = car.agent.active_grants().collect();
    assert_eq!(active[0], grant("a", &["snow_mode", "power_boost"], None));
}

#[test]
fn catalogues_number_only_their_optional_features() {
    let flag = |s: &str| FeatureFlag::new(s).unwrap();
    assert_eq!(CATALOG.optional_index(&flag("snow_mode")), Some(2));
    assert_eq!(CATALOG.optional_name(2), Some("snow_mode"));
    assert_eq!(CATALOG.optional_index(&flag("abs")), None);
    assert_eq!(CATALOG.optional_index(&flag("radio")), None);
    assert_eq!(CATALOG.optional_name(4), None);
    // A name listed in both lists is base: never switchable.
    let both = Catalog {
        optional: &["abs", "snow_mode"],
        base: &["abs"],
    };
    assert_eq!(both.optional_index(&flag("abs")), None);
    assert_eq!(both.classify(&flag("abs")), FeatureClass::Base);
}

/// The largest command the bounds allow is applied, stored and reported in full.
#[test]
fn the_largest_command_is_applied_and_stored_whole() {
    let flags: Vec<String> = (0..MAX_LINES)
        .map(|i| format!("{i:02}{}", "f".repeat(30)))
        .collect();
    let optional: &'static [&'static str] = Box::leak(
        flags
            .iter()
            .map(|f| &*Box::leak(f.clone().into_boxed_str()))
            .collect::<Vec<&'static str>>()
            .into_boxed_slice(),
    );
    let mut cfg = config();
    cfg.platform = Catalog {
        optional,
        base: &["abs"],
    };
    let mut desired = DesiredState::default();
    for i in 0..MAX_GRANTS {
        desired.settles.push(RequestId([i as u8; 16])).unwrap();
        let mut g = Grant::new(format!("{i}{}", "s".repeat(31)).parse().unwrap());
        for j in 0..MAX_FLAGS_PER_GRANT {
            g.flags
                .push(optional[i * MAX_FLAGS_PER_GRANT + j].parse().unwrap())
                .unwrap();
        }
        for j in 0..MAX_PARAMS_PER_GRANT {
            g.params
                .push(Param {
                    key: format!("{j}{}", "k".repeat(23)).parse().unwrap(),
                    value: "v".repeat(24).parse().unwrap(),
                })
                .unwrap();
        }
        g.ends_at = Some(u64::MAX);
        desired.grants.push(g).unwrap();
    }
    let cmd = Command {
        vin: vin(),
        seq: u64::MAX,
        issued_at: T0,
        not_after: u64::MAX,
        body: CommandBody::SetState(desired.clone()),
    };
    let frame = seal(&cmd, &gateway_key());
    // Every field at its largest but the issue time (5 varint bytes of 10: it is now).
    assert_eq!(frame.len(), MAX_COMMAND_FRAME_SIZE - 5);
    let mut car = Car::boot(cfg, None, T0);
    let done = car.frame(&frame, T0);
    assert_eq!(
        done.len(),
        1 + MAX_LINES + 2,
        "persist, every line, ack, report"
    );
    let stored = car.stored();
    assert_eq!(&stored.grants, &desired.grants);
    // The record too, but for the trusted time (now, as above).
    assert_eq!(car.store.as_ref().unwrap().len(), MAX_PERSISTED_SIZE - 5);
    assert_eq!(
        car.agent.active_grants().collect::<Vec<_>>(),
        &desired.grants[..]
    );
    assert_eq!(car.lines.len(), MAX_LINES);
    assert_eq!(car.lines[optional[5]].len(), MAX_PARAMS_PER_GRANT);
    assert_eq!(car.last_report().active.len(), MAX_GRANTS);
    // Rebooted from that record: the same lines again.
    car.reboot(car_config(optional), T0 + 1);
    assert_eq!(car.lines.len(), MAX_LINES);
}

fn car_config(optional: &'static [&'static str]) -> Config<Catalog<'static>> {
    let mut cfg = config();
    cfg.platform = Catalog {
        optional,
        base: &["abs"],
    };
    cfg
}
