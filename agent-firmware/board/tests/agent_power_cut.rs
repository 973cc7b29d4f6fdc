//! Power cuts under the real agent core: the firmware's driver order (persist, then lines,
//! then ack, then report) over the A/B store on a NOR flash double that loses power at the
//! N-th erase or write. After every cut the car reboots (`Agent::new` from what the store
//! holds) and the test checks:
//!
//! - the stored record is never corrupt (the agent does not boot to its safe state);
//! - every acknowledged command is there: `applied_seq` >= the newest acknowledged seq;
//! - nothing else appears: `applied_seq` is the acknowledged one or the one in flight;
//! - `applied_seq` never goes backwards over a chain of cuts;
//! - after boot the feature lines are exactly the applied command's grants still in force;
//! - redelivering the unacknowledged commands brings the car to the newest one.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::BTreeSet;

use caas_agent::{Action, Agent, BootStatus, Catalog, Config, MAX_PERSISTED_SIZE};
use caas_firmware_board::store::{SlotStore, StoreError};
use caas_protocol::{
    seal_command, Command, CommandBody, DesiredState, Grant, SigningKey, TrustedKey, Vin,
    MAX_COMMAND_FRAME_SIZE,
};
use common::{Failure, FlashError, Rng};

const SECTOR: usize = 4096;
type Flash = common::CutFlash<SECTOR>;
const FLAGS: [&str; 4] = [
    "power_boost",
    "highway_autopilot",
    "snow_mode",
    "heated_seats",
];
const T0: u64 = 1_700_000_000;
/// Commands in a sequence, and seconds between them.
const COMMANDS: u64 = 6;
const STEP_SECS: u64 = 10;

struct Car {
    gateway: SigningKey,
    vin: Vin,
}

impl Car {
    fn new() -> Self {
        Car {
            gateway: SigningKey::from_bytes(&[0x11; 32]),
            vin: "WVWZZZ1JZXW000001".parse().unwrap(),
        }
    }

    fn config(&self) -> Config<Catalog<'static>> {
        let mut trusted_keys = heapless::Vec::new();
        trusted_keys
            .push(TrustedKey::new(self.gateway.verifying_key()))
            .unwrap();
        Config {
            vin: self.vin,
            trusted_keys,
            device_key: SigningKey::from_bytes(&[0x33; 32]),
            platform: Catalog {
                optional: &FLAGS,
                base: &["abs"],
            },
            firmware_version: "test".parse().unwrap(),
            report_interval_secs: 0,
        }
    }

    /// Command `seq` (1-based): a varying subset of the flags, every odd one with a grant
    /// that ends 5 s after it is issued (before the next command), so ended grants are
    /// also persisted, by `handle_timeout` or at boot.
    fn command(&self, seq: u64) -> (Vec<u8>, Vec<Grant>, u64) {
        let now = T0 + seq * STEP_SECS;
        let mut grants = Vec::new();
        for (i, flag) in FLAGS.iter().enumerate() {
            if (seq >> i) & 1 == 1 || i as u64 == seq % 4 {
                let mut g = Grant::new(format!("svc{i}").parse().unwrap());
                g.flags.push(flag.parse().unwrap()).unwrap();
                if seq % 2 == 1 && i == 0 {
                    g.ends_at = Some(now + 5);
                }
                grants.push(g);
            }
        }
        let mut desired = DesiredState::default();
        for g in &grants {
            desired.grants.push(g.clone()).unwrap();
        }
        let cmd = Command {
            vin: self.vin,
            seq,
            issued_at: now,
            not_after: now + 3600,
            body: CommandBody::SetState(desired),
        };
        let mut buf = [0u8; MAX_COMMAND_FRAME_SIZE];
        (
            seal_command(&cmd, &self.gateway, &mut buf)
                .unwrap()
                .to_vec(),
            grants,
            now,
        )
    }
}

/// The flags that must be on at `now` after command `seq` (0: none).
fn expected_lines(car: &Car, seq: u64, now: u64) -> BTreeSet<String> {
    if seq == 0 {
        return BTreeSet::new();
    }
    let (_, grants, _) = car.command(seq);
    grants
        .iter()
        .filter(|g| g.is_active_at(now))
        .flat_map(|g| g.flags.iter().map(|f| f.as_str().to_string()))
        .collect()
}

/// What one power-on did before it ended (cleanly or by a cut).
struct Run {
    mem: Vec<u8>,
    /// Newest seq acknowledged in this run.
    acked: Option<u64>,
    /// The seq whose record was being written when power went (if a command's).
    in_flight: Option<u64>,
    cut: bool,
    /// Erases and writes the flash saw.
    ops: u64,
}

/// One power-on: boots from `mem`, checks the boot against `model`, then feeds commands
/// `from..=COMMANDS`, failing the flash at operation `fail_at`.
fn power_on(
    car: &Car,
    mem: Vec<u8>,
    from: u64,
    fail_at: Option<u64>,
    seed: u64,
    model: &mut Model,
    what: &str,
) -> Run {
    let boot_now = T0 + from * STEP_SECS - 1;
    let mut store = SlotStore::new(
        Flash::new(mem, fail_at, Failure::Cut, seed),
        0,
        SECTOR as u32,
    )
    .unwrap();
    // Booted as the firmware boots it: the record loaded straight into the agent's buffer,
    // the agent booted from there in place.
    let mut agent = Agent::unbooted(car.config());
    let stored = match store.load(agent.frame_buffer()) {
        Ok(Some(n)) => Some(n),
        Ok(None) => None,
        Err(e) => panic!("{what}: the store cannot be read at boot: {e:?}"),
    };
    agent.reboot_from_buffer(stored, boot_now);
    model.check_boot(car, &agent, boot_now, what);

    let mut lines = BTreeSet::new();
    let mut run = Run {
        mem: Vec::new(),
        acked: None,
        in_flight: None,
        cut: false,
        ops: 0,
    };
    let finish = |store: SlotStore<Flash>, mut run: Run| {
        let flash = store.into_flash();
        run.ops = flash.ops;
        run.mem = flash.mem;
        run
    };
    if drain(&mut agent, &mut store, &mut lines, None, &mut run).is_err() {
        return finish(store, run);
    }
    let boot_lines = expected_lines(car, agent.state().applied_seq, agent.trusted_time());
    assert_eq!(lines, boot_lines, "{what}: lines after boot");

    for seq in from..=COMMANDS {
        let (frame, _, now) = car.command(seq);
        if agent.poll_timeout().is_some_and(|t| t <= now) {
            agent.handle_timeout(now);
            if drain(&mut agent, &mut store, &mut lines, None, &mut run).is_err() {
                return finish(store, run);
            }
        }
        // Received into the agent's buffer, as the firmware receives it.
        agent.frame_buffer()[..frame.len()].copy_from_slice(&frame);
        agent.handle_buffered_frame(frame.len(), now);
        if drain(&mut agent, &mut store, &mut lines, Some(seq), &mut run).is_err() {
            return finish(store, run);
        }
        assert_eq!(
            agent.state().applied_seq,
            seq,
            "{what}: command {seq} not applied"
        );
        assert_eq!(
            lines,
            expected_lines(car, seq, now),
            "{what}: lines after command {seq}"
        );
    }
    finish(store, run)
}

/// Carries out the agent's actions in order; `Err` when power was cut.
fn drain(
    agent: &mut Agent<Catalog<'static>>,
    store: &mut SlotStore<Flash>,
    lines: &mut BTreeSet<String>,
    frame_seq: Option<u64>,
    run: &mut Run,
) -> Result<(), ()> {
    for _ in 0..256 {
        match agent.poll_action() {
            None => return Ok(()),
            Some(Action::Persist(bytes)) => {
                run.in_flight = frame_seq;
                match store.save(bytes) {
                    Ok(()) => run.in_flight = None,
                    Err(StoreError::Flash(FlashError::PowerCut)) => {
                        run.cut = true;
                        return Err(());
                    }
                    Err(e) => panic!("unexpected store error {e:?}"),
                }
            }
            Some(Action::SetFeature { flag, on, .. }) => {
                if on {
                    lines.insert(flag.as_str().to_string());
                } else {
                    lines.remove(flag.as_str());
                }
            }
            Some(Action::Ack) => run.acked = frame_seq.or(run.acked),
            Some(Action::Publish(_)) => {}
        }
    }
    panic!("the agent did not run out of actions");
}

/// What must hold at the next boot.
struct Model {
    /// Newest acknowledged seq so far (over all power-ons).
    acked: u64,
    /// The seq possibly written when power went.
    in_flight: Option<u64>,
    /// `applied_seq` at the previous boot.
    last_boot_seq: u64,
}

impl Model {
    fn check_boot(&mut self, car: &Car, agent: &Agent<Catalog<'static>>, now: u64, what: &str) {
        assert_ne!(
            agent.boot_status(),
            BootStatus::SafeState,
            "{what}: the stored record was corrupt"
        );
        let seq = agent.state().applied_seq;
        assert!(
            seq >= self.acked,
            "{what}: acknowledged seq {} lost, booted with {seq}",
            self.acked
        );
        assert!(
            seq == self.acked || Some(seq) == self.in_flight,
            "{what}: booted with seq {seq}, neither acknowledged {} nor in flight {:?}",
            self.acked,
            self.in_flight
        );
        assert!(
            seq >= self.last_boot_seq,
            "{what}: applied seq went backwards"
        );
        // The record only ever holds the grants of the applied command, minus ended ones.
        let granted: BTreeSet<String> = agent
            .active_grants()
            .flat_map(|g| g.flags.into_iter().map(|f| f.as_str().to_string()))
            .collect();
        assert_eq!(
            granted,
            expected_lines(car, seq, now.max(agent.trusted_time())),
            "{what}: grants at boot"
        );
        self.last_boot_seq = seq;
        self.acked = seq;
        self.in_flight = None;
    }

    fn after(&mut self, run: &Run) {
        if let Some(a) = run.acked {
            self.acked = self.acked.max(a);
        }
        self.in_flight = run.in_flight;
    }
}

/// Runs power-ons with the given cut points in a row, then one without a cut, which must
/// end at the newest command. Returns how many cuts happened.
fn chain(car: &Car, cuts: &[u64], seed: u64, what: &str) -> u64 {
    let mut model = Model {
        acked: 0,
        in_flight: None,
        last_boot_seq: 0,
    };
    let mut mem = vec![0xFF; 2 * SECTOR];
    let mut done = 0;
    for (i, &cut) in cuts.iter().enumerate() {
        let what = format!("{what}, cut {i} at op {cut}");
        let from = model.acked + 1;
        if from > COMMANDS {
            break;
        }
        let run = power_on(
            car,
            mem,
            from,
            Some(cut),
            seed.wrapping_add(i as u64),
            &mut model,
            &what,
        );
        if run.cut {
            done += 1;
        }
        model.after(&run);
        mem = run.mem;
    }
    let from = model.acked + 1;
    let run = power_on(
        car,
        mem,
        from.min(COMMANDS),
        None,
        seed,
        &mut model,
        &format!("{what}, final"),
    );
    assert!(!run.cut);
    let mut store =
        SlotStore::new(Flash::new(run.mem, None, Failure::Cut, 1), 0, SECTOR as u32).unwrap();
    let mut record = vec![0u8; MAX_PERSISTED_SIZE];
    let n = store
        .load(&mut record)
        .unwrap()
        .expect("a record after the final run");
    let state = caas_agent::PersistedState::decode(&record[..n]).unwrap();
    assert_eq!(
        state.applied_seq, COMMANDS,
        "{what}: the newest command is not stored at the end"
    );
    done
}

/// Erases and writes of a clean run of the whole sequence.
fn clean_ops(car: &Car) -> u64 {
    let mut model = Model {
        acked: 0,
        in_flight: None,
        last_boot_seq: 0,
    };
    let run = power_on(
        car,
        vec![0xFF; 2 * SECTOR],
        1,
        None,
        1,
        &mut model,
        "clean run",
    );
    assert!(!run.cut);
    run.ops
}

#[test]
fn acknowledged_commands_survive_a_power_cut_at_every_write_point() {
    let car = Car::new();
    let total = clean_ops(&car);
    assert!(
        total >= 2 * COMMANDS,
        "only {total} flash operations for {COMMANDS} commands"
    );
    let mut cuts = 0;
    for cut in 0..total {
        for tear in 0..8u64 {
            cuts += chain(
                &car,
                &[cut],
                cut << 8 | tear,
                &format!("single cut at op {cut}, tear {tear}"),
            );
        }
    }
    println!("agent, exhaustive: {cuts} power cuts at {total} write points");
    assert_eq!(cuts, 8 * total, "every write point must have been cut");
}

#[test]
fn acknowledged_commands_survive_repeated_random_power_cuts() {
    let car = Car::new();
    let total = clean_ops(&car);
    let mut rng = Rng(0xC0FF_EE00);
    let mut cuts = 0;
    for trial in 0..1_000u64 {
        let n = 1 + rng.below(4) as usize;
        let points: Vec<u64> = (0..n).map(|_| rng.below(total / 2 + 1)).collect();
        let seed = rng.next();
        cuts += chain(
            &car,
            &points,
            seed,
            &format!("trial {trial}, cuts {points:?}, seed {seed}"),
        );
    }
    println!("agent, random: {cuts} power cuts");
    assert!(cuts >= 1_000, "only {cuts} cuts");
}
