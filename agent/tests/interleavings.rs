//! A thousand random interleavings of duplicate, reordered, stale and forged frames, with
//! reboots (anew, and in place as a microcontroller does) and the clock moving, all end in
//! the state of the newest valid command.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use caas_protocol::*;
use common::*;
use proptest::prelude::*;

const FLAGS: [&str; 4] = [
    "power_boost",
    "heated_seats",
    "snow_mode",
    "highway_autopilot",
];

#[derive(Debug, Clone)]
enum Event {
    /// Deliver command `i` (duplicates, reordering and stale deliveries come from the
    /// random choice of `i`).
    Deliver(usize),
    /// Deliver command `i` with a flipped payload byte.
    Tampered(usize),
    /// Deliver command `i` re-addressed to another car (validly signed).
    OtherCar(usize),
    /// Let time pass (seconds) and fire the timer.
    Tick(u64),
    /// Power cycle.
    Reboot,
    /// Power cycle as a microcontroller does it: the same agent booted again in place from
    /// the record loaded into its own buffer.
    RebootInPlace,
    /// The store fails its next write (full, worn, unplugged).
    FailNextPersist,
}

fn grants_strategy() -> impl Strategy<Value = Vec<(usize, Vec<usize>, Option<u64>)>> {
    prop::collection::vec(
        (
            0..4usize,
            prop::collection::vec(0..4usize, 1..3),
            prop::option::of(0..300u64),
        ),
        0..4,
    )
}

fn event_strategy(n: usize) -> impl Strategy<Value = Event> {
    prop_oneof![
        6 => (0..n).prop_map(Event::Deliver),
        1 => (0..n).prop_map(Event::Tampered),
        1 => (0..n).prop_map(Event::OtherCar),
        2 => (0..120u64).prop_map(Event::Tick),
        1 => Just(Event::Reboot),
        1 => Just(Event::RebootInPlace),
        1 => Just(Event::FailNextPersist),
    ]
}

fn scenario() -> impl Strategy<Value = (Vec<Command>, Vec<Event>)> {
    prop::collection::vec((1..4u64, grants_strategy()), 1..7).prop_flat_map(|specs| {
        let mut seq = 0;
        let cmds: Vec<Command> = specs
            .into_iter()
            .enumerate()
            .map(|(i, (gap, grants))| {
                seq += gap;
                let grants = grants
                    .into_iter()
                    .enumerate()
                    .map(|(j, (_, flags, end))| {
                        let mut names: Vec<&str> = flags.iter().map(|&f| FLAGS[f]).collect();
                        names.dedup();
                        grant(&format!("svc{j}"), &names, end.map(|e| T0 + e))
                    })
                    .collect();
                set_state(seq, T0 + i as u64, grants)
            })
            .collect();
        let n = cmds.len();
        (Just(cmds), prop::collection::vec(event_strategy(n), 1..40))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn any_interleaving_ends_in_the_newest_valid_commands_state((cmds, events) in scenario()) {
        let mut car = Car::new(T0);
        let mut now = T0;
        let mut newest: Option<usize> = None;
        let mut frames_handed = 0;
        let mut unacked = 0;
        for event in &events {
            match *event {
                Event::Deliver(i) => {
                    let acks = car.acks;
                    let done = car.command(&cmds[i], now);
                    frames_handed += 1;
                    if car.acks == acks {
                        // Only a failed write leaves a frame unacknowledged; the broker
                        // redelivers it, and this time the store works.
                        prop_assert_eq!(done, vec![Done::Persist, Done::Publish]);
                        let outcome = car.last_report().outcome;
                        prop_assert_eq!(outcome, Outcome::Rejected { seq: cmds[i].seq, code: RejectCode::StorageFailed });
                        car.command(&cmds[i], now);
                        frames_handed += 1;
                        prop_assert_eq!(car.acks, acks + 1);
                        unacked += 1;
                    }
                    if newest.is_none_or(|n| cmds[i].seq > cmds[n].seq) {
                        newest = Some(i);
                    }
                }
                Event::Tampered(i) => {
                    let mut frame = seal(&cmds[i], &gateway_key());
                    frame[FRAME_HEADER_SIZE + 3] ^= 0x10;
                    car.frame(&frame, now);
                    frames_handed += 1;
                    let outcome = car.last_report().outcome;
                    prop_assert_eq!(outcome, Outcome::Rejected { seq: 0, code: RejectCode::BadSignature });
                }
                Event::OtherCar(i) => {
                    let mut cmd = cmds[i].clone();
                    cmd.vin = other_vin();
                    car.command(&cmd, now);
                    frames_handed += 1;
                    let outcome = car.last_report().outcome;
                    prop_assert_eq!(outcome, Outcome::Rejected { seq: cmd.seq, code: RejectCode::WrongVin });
                }
                Event::Tick(dt) => {
                    now += dt;
                    car.timeout(now);
                }
                Event::Reboot => car.reboot(config(), now),
                Event::RebootInPlace => {
                    car.lines.clear();
                    let stored = car.store.as_ref().map(|record| {
                        car.agent.frame_buffer()[..record.len()].copy_from_slice(record);
                        record.len()
                    });
                    car.agent.reboot_from_buffer(stored, now);
                    car.drain();
                }
                Event::FailNextPersist => car.fail_next_persist = true,
            }
        }
        car.fail_next_persist = false;
        car.timeout(now);
        // Every frame handed over was acknowledged exactly once, except those whose write
        // failed (which were redelivered).
        prop_assert_eq!(car.acks, frames_handed - unacked);

        let t = car.agent.trusted_time();
        let (seq, expected): (u64, Vec<Grant>) = match newest {
            Some(i) => match &cmds[i].body {
                CommandBody::SetState(d) => (cmds[i].seq, d.grants.iter().filter(|g| g.is_active_at(t)).cloned().collect()),
                CommandBody::QueryStatus { .. } => unreachable!(),
            },
            None => (0, Vec::new()),
        };
        prop_assert_eq!(car.agent.state().applied_seq, seq);
        let active: Vec<Grant> = car.agent.active_grants().collect();
        prop_assert_eq!(&active, &expected);
        if seq > 0 {
            let stored = car.stored();
            prop_assert_eq!(stored.applied_seq, seq);
            let stored_active: Vec<Grant> = stored.grants.iter().filter(|g| g.is_active_at(t)).cloned().collect();
            prop_assert_eq!(&stored_active, &expected);
        }
        let mut want: Vec<&str> = expected.iter().flat_map(|g| g.flags.iter().map(|f| f.as_str())).collect();
        want.sort();
        want.dedup();
        prop_assert_eq!(car.lines_on(), want);
        for (flag, params) in &car.lines {
            let first = expected.iter().find(|g| g.flags.iter().any(|f| f.as_str() == flag)).unwrap();
            prop_assert_eq!(&params[0].1, &first.params[0].value.to_string());
        }
    }
}
