//! The heap, faulted in ahead of need.
//!
//! A page the process touches for the first time costs a page fault and the kernel's zeroing
//! of it; in a virtual machine whose host backs guest memory lazily (and takes back what the
//! guest frees) it costs a fault on the host as well. On the 2-core VM the benchmarks run on,
//! fresh memory comes in at ~380 MB/s against ~8 GB/s for memory touched before, and a
//! 19,000-car campaign grows the gateway by ~200 MB: ~0.5 s of CPU in page faults over two
//! campaigns (simulator/BENCH.md, "Fresh memory").
//!
//! So the gateway keeps the pages it has used ([`retain_freed_memory`]: mimalloc returns
//! nothing to the kernel, the resident size stays at its peak), and a thread ([`Warmer`])
//! faults the heap in up to a reserve as the fleet is registered and connects, before the
//! campaigns that would need it. The reserve is [`Reserve::Auto`] by default: a base plus a
//! share per car (registered or connected, whichever is more), measured on 19,000-car runs.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::metrics::Metrics;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

/// The auto reserve's base: the gateway's own resident size before any car (sled's cache
/// filling, the runtime, the routers' buffers).
pub(crate) const AUTO_BASE_BYTES: u64 = 64 * MIB;
/// The auto reserve per car with the embedded broker: ~28 KiB of the broker's
/// connection state and ~12 KiB of campaign working set (a 19,000-car run peaks at ~780 MB).
pub(crate) const AUTO_PER_CAR_EMBEDDED: u64 = 40 * KIB;
/// The auto reserve per car with an external broker: the campaign working set.
pub(crate) const AUTO_PER_CAR_EXTERNAL: u64 = 12 * KIB;
/// The auto reserve never goes past this share of the machine's memory (1/4).
const AUTO_MAX_SHARE_OF_RAM: u64 = 4;
/// A fixed reserve never goes past this share of the machine's memory (1/2): a mistyped
/// size must not have the warmer fault in more than the machine has.
const FIXED_MAX_SHARE_OF_RAM: u64 = 2;
/// Most the warmer faults in per turn, so a reserve that jumps (a fleet connecting at once)
/// is warmed in steps and the thread gives way to the rest between them.
pub(crate) const STEP_MAX_BYTES: u64 = 64 * MIB;
/// How often the warmer looks at the fleet and the resident size.
const TICK: Duration = Duration::from_millis(250);
/// The warmer allocates in blocks of this size (each one its own allocation, all held until
/// the turn ends, so they extend the heap instead of reusing one block).
const BLOCK_BYTES: usize = MIB as usize;
/// Touching one byte per 4 KiB faults every page in, whatever the page size.
const TOUCH_STRIDE: usize = 4096;

/// How much heap to fault in ahead of need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// None: pages are faulted in as they are first used.
    Off,
    /// A fixed size, in bytes, at most half of RAM.
    Fixed(u64),
    /// [`AUTO_BASE_BYTES`] plus so many bytes per car, at most a quarter of RAM.
    Auto {
        /// Bytes per car (registered or connected, whichever are more).
        per_car: u64,
    },
}

impl Reserve {
    /// The reserve from the `heap-reserve-mb` setting: absent is auto, 0 is off.
    pub fn from_setting(mb: Option<u64>, embedded_broker: bool) -> Reserve {
        match mb {
            None => Reserve::Auto {
                per_car: if embedded_broker {
                    AUTO_PER_CAR_EMBEDDED
                } else {
                    AUTO_PER_CAR_EXTERNAL
                },
            },
            Some(0) => Reserve::Off,
            Some(mb) => Reserve::Fixed(mb.saturating_mul(MIB)),
        }
    }

    /// The resident size wanted with `cars` cars on a machine of `ram` bytes.
    fn target(self, cars: i64, ram: u64) -> u64 {
        match self {
            Reserve::Off => 0,
            Reserve::Fixed(bytes) => bytes.min(ram / FIXED_MAX_SHARE_OF_RAM),
            Reserve::Auto { per_car } => {
                let cars = u64::try_from(cars).unwrap_or(0);
                let want = AUTO_BASE_BYTES.saturating_add(cars.saturating_mul(per_car));
                want.min(ram / AUTO_MAX_SHARE_OF_RAM)
            }
        }
    }
}

/// What the warmer does in one turn.
#[derive(Debug, PartialEq, Eq)]
enum Turn {
    /// The reserve is as warm as it was asked to be.
    Idle,
    /// Fault in (and hold) this many more bytes.
    Touch(u64),
    /// The resident size has reached the target: free what is held. The pages stay resident
    /// ([`retain_freed_memory`]) for whatever the gateway allocates next.
    Release,
}

/// The warmer's turn, given the target, the resident size, and the last target it reached
/// (`reached`). The warmer holds what it faults in until the target is reached: freed at
/// once, the same pages would come back to it on the next turn. Once a target is reached it
/// waits for a higher one, so with an allocator that returns freed memory it does not loop.
fn turn(target: u64, resident: u64, reached: u64) -> Turn {
    if target <= reached {
        Turn::Idle
    } else if resident >= target {
        Turn::Release
    } else {
        Turn::Touch((target - resident).min(STEP_MAX_BYTES))
    }
}

/// Keeps mimalloc from returning freed pages to the kernel, so memory the process has used
/// (or the [`Warmer`] faulted in) is not faulted in again. Call it at the start of `main`,
/// before any other thread runs: mimalloc's option setter is not thread safe.
#[allow(unsafe_code)]
pub fn retain_freed_memory() {
    // `mi_option_purge_delay` in mimalloc.h (v2 and v3); -1 is "never purge".
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets one option value; no other thread is running yet (the caller's contract),
    // and the option is read with `mi_option_get` wherever mimalloc purges.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// The thread faulting the heap in; it stops when dropped.
pub(crate) struct Warmer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Warmer {
    /// Starts the warmer, unless the reserve is off or this system has no `/proc` to read the
    /// resident size from.
    pub(crate) fn start(reserve: Reserve, metrics: Arc<Metrics>) -> Option<Warmer> {
        if reserve == Reserve::Off || resident_bytes().is_none() {
            return None;
        }
        let ram = total_ram_bytes().unwrap_or(u64::MAX);
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("gw-heap-warm".into())
            .spawn(move || {
                let mut reached = 0u64;
                let mut held: Vec<Vec<u8>> = Vec::new();
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(TICK) {
                    let cars = metrics
                        .connected_cars
                        .load(Relaxed)
                        .max(metrics.cars_registered.load(Relaxed));
                    let target = reserve.target(cars, ram);
                    // Nothing to do (turn() would say Idle): spare the read of /proc.
                    if target <= reached {
                        continue;
                    }
                    let Some(resident) = resident_bytes() else {
                        return;
                    };
                    match turn(target, resident, reached) {
                        Turn::Idle => {}
                        Turn::Touch(n) => {
                            held.extend(fault_in(n));
                            metrics.heap_prefaulted_bytes.fetch_add(n, Relaxed);
                        }
                        Turn::Release => {
                            held = Vec::new();
                            reached = target;
                            tracing::debug!(
                                reserve_mib = target / MIB,
                                resident_mib = resident / MIB,
                                "heap reserve faulted in"
                            );
                        }
                    }
                }
            })
            .map_err(|e| tracing::warn!(error = %e, "cannot start the heap warmer"))
            .ok()?;
        Some(Warmer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Warmer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Allocates `bytes` (rounded up to whole blocks) and writes to every page of it; dropping
/// the result frees it all, which [`retain_freed_memory`] keeps resident for later use.
fn fault_in(bytes: u64) -> Vec<Vec<u8>> {
    let blocks = bytes.div_ceil(BLOCK_BYTES as u64) as usize;
    let mut held: Vec<Vec<u8>> = Vec::with_capacity(blocks);
    for _ in 0..blocks {
        let mut block = vec![0u8; BLOCK_BYTES];
        for i in (0..BLOCK_BYTES).step_by(TOUCH_STRIDE) {
            block[i] = 1;
        }
        held.push(block);
    }
    // The writes must happen even though nothing reads the blocks.
    std::hint::black_box(held)
}

/// This process's resident size (`VmRSS`), on systems with `/proc`.
fn resident_bytes() -> Option<u64> {
    kib_field(
        &std::fs::read_to_string("/proc/self/status").ok()?,
        "VmRSS:",
    )
}

/// The machine's memory (`MemTotal`), on systems with `/proc`.
fn total_ram_bytes() -> Option<u64> {
    kib_field(&std::fs::read_to_string("/proc/meminfo").ok()?, "MemTotal:")
}

/// The value of a `Name:   1234 kB` line, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * KIB)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_auto_reserve_grows_with_the_fleet_up_to_a_quarter_of_ram() {
        let auto = Reserve::from_setting(None, true);
        let ram = 24 * 1024 * MIB;
        assert_eq!(auto.target(0, ram), AUTO_BASE_BYTES);
        assert_eq!(
            auto.target(19_000, ram),
            AUTO_BASE_BYTES + 19_000 * AUTO_PER_CAR_EMBEDDED
        );
        assert_eq!(auto.target(-3, ram), AUTO_BASE_BYTES);
        assert_eq!(auto.target(10_000_000, ram), ram / 4);
        let external = Reserve::from_setting(None, false);
        assert_eq!(
            external.target(19_000, ram),
            AUTO_BASE_BYTES + 19_000 * AUTO_PER_CAR_EXTERNAL
        );
        assert_eq!(Reserve::from_setting(Some(0), true), Reserve::Off);
        assert_eq!(Reserve::from_setting(Some(0), true).target(19_000, ram), 0);
        let fixed = Reserve::from_setting(Some(512), false);
        assert_eq!(fixed.target(0, ram), 512 * MIB);
        assert_eq!(fixed.target(19_000, ram), 512 * MIB);
        let too_much = Reserve::from_setting(Some(1 << 40), false);
        assert_eq!(too_much.target(0, ram), ram / 2);
    }

    #[test]
    fn the_warmer_fills_the_gap_in_steps_then_releases_and_waits_for_more_cars() {
        assert_eq!(turn(64 * MIB, 80 * MIB, 0), Turn::Release);
        assert_eq!(turn(64 * MIB, 80 * MIB, 64 * MIB), Turn::Idle);
        assert_eq!(turn(1024 * MIB, 100 * MIB, 0), Turn::Touch(STEP_MAX_BYTES));
        assert_eq!(turn(1024 * MIB, 1000 * MIB, 0), Turn::Touch(24 * MIB));
        // A run: the resident size rises with what the warmer holds, then stays (retained).
        let (target, mut resident, mut reached, mut held, mut touched) =
            (300 * MIB, 100 * MIB, 0, 0, 0);
        for _ in 0..20 {
            match turn(target, resident, reached) {
                Turn::Idle => {}
                Turn::Touch(n) => {
                    held += n;
                    touched += n;
                    resident += n;
                }
                Turn::Release => {
                    held = 0;
                    reached = target;
                }
            }
        }
        assert_eq!((touched, held, reached), (200 * MIB, 0, target));
        // An allocator that gave it all back: no second round for the same target.
        assert_eq!(turn(target, 100 * MIB, reached), Turn::Idle);
        assert_eq!(
            turn(target + MIB, 100 * MIB, reached),
            Turn::Touch(STEP_MAX_BYTES)
        );
    }

    #[test]
    fn touching_faults_the_pages_in() {
        let before = resident_bytes().expect("this test runs where /proc is");
        let bytes = 64 * MIB;
        let held = fault_in(bytes);
        let during = resident_bytes().expect("/proc");
        assert_eq!(held.len() * BLOCK_BYTES, bytes as usize);
        // Other tests run beside this one and may free memory, hence three quarters.
        assert!(
            during >= before + bytes * 3 / 4,
            "resident {before} -> {during} after touching {bytes}"
        );
    }

    #[test]
    fn kib_fields_parse_and_garbage_does_not() {
        let status = "Name:\tx\nVmRSS:\t  123456 kB\nVmSwap:\t0 kB\n";
        assert_eq!(kib_field(status, "VmRSS:"), Some(123_456 * KIB));
        assert_eq!(kib_field(status, "VmHWM:"), None);
        assert_eq!(kib_field("VmRSS:\tlots kB\n", "VmRSS:"), None);
    }
}
