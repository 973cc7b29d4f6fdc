//! Power cuts against the flash store: a NOR flash double that loses power at the N-th
//! erase or write (tearing that operation), then a "reboot" (a new store over the same
//! bytes), checked after every cut:
//!
//! - the state is the last acknowledged one or the one being written, byte for byte;
//! - the store's generation and the state's sequence number never went backwards;
//! - anything acknowledged (`save` returned `Ok`) is there;
//! - the store still takes new saves afterwards.
//!
//! Exhaustive over short sequences (every write point, several tearing patterns each) and
//! random over long ones with several cuts in a row; more than 10,000 cuts in all.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use caas_firmware_board::store::{SlotStore, StoreError};
use common::{Failure, FlashError, Rng};

type CutFlash = common::CutFlash<SECTOR>;

const SECTOR: usize = 1024;
const SLOT: u32 = SECTOR as u32;
/// The store sits after one unrelated sector, to check it honours `base`.
const BASE: u32 = SECTOR as u32;
const CAPACITY: usize = 4 * SECTOR;

/// One update's payload: the state's sequence number, then bytes derived from it.
fn payload(seq: u64, len: usize) -> Vec<u8> {
    let mut p = seq.to_le_bytes().to_vec();
    let mut r = Rng(seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    while p.len() < len {
        p.push(r.next() as u8);
    }
    p
}

fn seq_of(p: &[u8]) -> u64 {
    u64::from_le_bytes(p[..8].try_into().unwrap())
}

fn boot(mem: Vec<u8>, fail_at: Option<u64>, failure: Failure, seed: u64) -> SlotStore<CutFlash> {
    SlotStore::new(CutFlash::new(mem, fail_at, failure, seed), BASE, SLOT).unwrap()
}

fn load(store: &mut SlotStore<CutFlash>) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; SECTOR];
    store.load(&mut buf).unwrap().map(|n| buf[..n].to_vec())
}

/// What the test knows about the durable state across reboots.
struct Model {
    /// The state that must survive: the last acknowledged save, or what the last reboot found.
    durable: Option<Vec<u8>>,
    /// The store generation the last reboot (or acknowledged save) saw.
    generation: u64,
}

impl Model {
    fn new() -> Self {
        Model {
            durable: None,
            generation: 0,
        }
    }

    /// After a reboot: the state is the durable one or the one in flight, never anything
    /// else, and nothing went backwards.
    fn check_reboot(
        &mut self,
        store: &mut SlotStore<CutFlash>,
        in_flight: Option<&[u8]>,
        what: &str,
    ) {
        let found = load(store);
        let ok = found == self.durable || (in_flight.is_some() && found.as_deref() == in_flight);
        assert!(
            ok,
            "{what}: after reboot the state is neither the acknowledged one (seq {:?}) nor the \
             one in flight (seq {:?}): found seq {:?}",
            self.durable.as_deref().map(seq_of),
            in_flight.map(seq_of),
            found.as_deref().map(seq_of)
        );
        assert!(
            store.generation() >= self.generation,
            "{what}: generation went backwards"
        );
        if let (Some(old), Some(new)) = (&self.durable, &found) {
            assert!(
                seq_of(new) >= seq_of(old),
                "{what}: sequence number went backwards"
            );
        }
        self.durable = found;
        self.generation = store.generation();
    }

    fn acknowledged(&mut self, store: &SlotStore<CutFlash>, p: &[u8]) {
        assert!(
            store.generation() > self.generation,
            "an acknowledged save must raise the generation"
        );
        self.durable = Some(p.to_vec());
        self.generation = store.generation();
    }
}

/// Runs `updates` (payload lengths) against a store that fails at operation `fail_at`.
/// Returns the flash bytes, the payload in flight when it failed (if any) and how many
/// operations the run took.
fn run(
    mem: Vec<u8>,
    model: &mut Model,
    first_seq: u64,
    updates: &[usize],
    fail_at: Option<u64>,
    failure: Failure,
    seed: u64,
) -> (Vec<u8>, Option<Vec<u8>>, u64) {
    let mut store = boot(mem, fail_at, failure, seed);
    for (i, &len) in updates.iter().enumerate() {
        let p = payload(first_seq + i as u64, len);
        match store.save(&p) {
            Ok(()) => model.acknowledged(&store, &p),
            Err(StoreError::Flash(FlashError::PowerCut)) => {
                let flash = store.into_flash();
                return (flash.mem, Some(p), flash.ops);
            }
            Err(StoreError::Flash(FlashError::Fault)) => {
                // Power is still on: the store must still hold the previous state.
                assert_eq!(
                    load(&mut store),
                    model.durable,
                    "a failed save changed the state"
                );
            }
            Err(e) => panic!("unexpected store error {e:?}"),
        }
    }
    let flash = store.into_flash();
    (flash.mem, None, flash.ops)
}

/// Cuts power at operation `cut` of `updates` starting from `mem`, reboots, checks, and
/// checks one more save works after the cut. Returns whether a cut happened.
fn cut_and_check(mem: Vec<u8>, updates: &[usize], cut: u64, seed: u64, what: &str) -> bool {
    let mut model = Model::new();
    let mut store = boot(mem.clone(), None, Failure::Cut, seed);
    model.durable = load(&mut store);
    model.generation = store.generation();
    let (mem, in_flight, _) = run(mem, &mut model, 100, updates, Some(cut), Failure::Cut, seed);
    let mut store = boot(mem, None, Failure::Cut, seed);
    model.check_reboot(&mut store, in_flight.as_deref(), what);
    let next = payload(10_000, 40);
    store.save(&next).unwrap();
    model.acknowledged(&store, &next);
    let mut store = boot(store.into_flash().mem, None, Failure::Cut, seed);
    model.check_reboot(&mut store, None, what);
    in_flight.is_some()
}

fn erased() -> Vec<u8> {
    vec![0xFF; CAPACITY]
}

/// Flash that already holds one committed state, so cuts hit an update, not the first save.
fn with_initial_state() -> Vec<u8> {
    let mut store = boot(erased(), None, Failure::Cut, 1);
    store.save(&payload(50, 64)).unwrap();
    store.into_flash().mem
}

#[test]
fn power_cut_at_every_write_point_of_short_sequences() {
    let max = boot(erased(), None, Failure::Cut, 1).max_payload();
    let sequences: [&[usize]; 7] = [
        &[8],
        &[max],
        &[40, 41],
        &[max, 8, max],
        &[100, 300, 8, 500],
        &[33, 64, 65, 96],
        &[max, max, max, max],
    ];
    let mut cuts = 0u64;
    for (s, updates) in sequences.iter().enumerate() {
        for (start_name, start) in [("erased", erased()), ("one state", with_initial_state())] {
            // Count the write points of a clean run, then cut at each of them.
            let (_, _, total) = run(
                start.clone(),
                &mut Model::new(),
                100,
                updates,
                None,
                Failure::Cut,
                1,
            );
            assert!(total >= 2 * updates.len() as u64);
            for cut in 0..total {
                for tear in 0..12u64 {
                    let seed = (s as u64) << 40 | cut << 8 | tear;
                    let what = format!(
                        "sequence {s} from {start_name}, cut at op {cut}, tear seed {seed}"
                    );
                    assert!(
                        cut_and_check(start.clone(), updates, cut, seed, &what),
                        "{what}: no cut"
                    );
                    cuts += 1;
                }
            }
        }
    }
    println!("exhaustive: {cuts} power cuts checked");
    assert!(cuts >= 5_000, "only {cuts} cuts");
}

#[test]
fn random_sequences_with_repeated_power_cuts() {
    let mut rng = Rng(0x5EED_CAFE);
    let max = boot(erased(), None, Failure::Cut, 1).max_payload() as u64;
    let mut cuts = 0u64;
    for trial in 0..1_500u64 {
        let mut model = Model::new();
        let mut mem = erased();
        let mut seq = 1u64;
        // Up to 6 power cuts in a row on the same flash, each followed by a reboot.
        for round in 0..6 {
            let n = 1 + rng.below(6) as usize;
            let updates: Vec<usize> = (0..n).map(|_| 8 + rng.below(max - 7) as usize).collect();
            // Every save is one erase, a write per 32 bytes of record and the commit word.
            let ops: u64 = updates
                .iter()
                .map(|&l| 2 + (20 + l as u64).div_ceil(32))
                .sum();
            let cut = rng.below(ops + 1);
            let seed = rng.next();
            let what = format!("trial {trial} round {round} cut {cut} seed {seed}");
            let (after, in_flight, _) = run(
                mem,
                &mut model,
                seq,
                &updates,
                Some(cut),
                Failure::Cut,
                seed,
            );
            let mut store = boot(after, None, Failure::Cut, seed);
            model.check_reboot(&mut store, in_flight.as_deref(), &what);
            if in_flight.is_some() {
                cuts += 1;
            }
            seq += updates.len() as u64;
            mem = store.into_flash().mem;
        }
    }
    println!("random: {cuts} power cuts checked");
    assert!(cuts >= 5_000, "only {cuts} cuts");
}

#[test]
fn a_failed_write_without_power_loss_changes_nothing_and_the_store_recovers() {
    let updates = [64, 200, 8, 700];
    let (_, _, total) = run(
        erased(),
        &mut Model::new(),
        1,
        &updates,
        None,
        Failure::Cut,
        1,
    );
    for fault in 0..total {
        let mut model = Model::new();
        let (mem, _, _) = run(
            erased(),
            &mut model,
            1,
            &updates,
            Some(fault),
            Failure::Fault,
            fault,
        );
        let mut store = boot(mem, None, Failure::Cut, 1);
        assert_eq!(load(&mut store), model.durable, "fault at op {fault}");
        assert!(
            model.durable.as_deref().map(seq_of) >= Some(3),
            "fault at op {fault}: later saves must land"
        );
        store.save(&payload(5, 300)).unwrap();
        let mut store = boot(store.into_flash().mem, None, Failure::Cut, 1);
        assert_eq!(
            load(&mut store),
            Some(payload(5, 300)),
            "fault at op {fault}"
        );
    }
}

#[test]
fn garbage_and_blank_flash_hold_no_state_and_oversized_payloads_are_refused() {
    let mut store = boot(erased(), None, Failure::Cut, 1);
    assert_eq!(load(&mut store), None);
    assert_eq!(store.generation(), 0);
    let too_big = vec![0u8; store.max_payload() + 1];
    assert!(matches!(store.save(&too_big), Err(StoreError::TooLarge)));
    assert_eq!(load(&mut store), None);

    let mut rng = Rng(42);
    for _ in 0..200 {
        let mem: Vec<u8> = (0..CAPACITY).map(|_| rng.next() as u8).collect();
        let mut store = boot(mem, None, Failure::Cut, 1);
        assert_eq!(load(&mut store), None);
        store.save(&payload(7, 100)).unwrap();
        assert_eq!(
            load(&mut boot(store.into_flash().mem, None, Failure::Cut, 1)),
            Some(payload(7, 100))
        );
    }

    let mut small = [0u8; 4];
    let mut store = boot(with_initial_state(), None, Failure::Cut, 1);
    assert!(matches!(
        store.load(&mut small),
        Err(StoreError::BufferTooSmall)
    ));
}

#[test]
fn bad_geometry_is_refused() {
    let flash = CutFlash::new(erased(), None, Failure::Cut, 1);
    assert!(matches!(
        SlotStore::new(flash, 100, SLOT),
        Err(StoreError::Geometry)
    ));
    let flash = CutFlash::new(erased(), None, Failure::Cut, 1);
    assert!(matches!(
        SlotStore::new(flash, 3 * SLOT, SLOT),
        Err(StoreError::Geometry)
    ));
}
