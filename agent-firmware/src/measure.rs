//! Measurements for the budget report: guest instructions (SysTick under QEMU `-icount`)
//! and the stack's high-water mark (cortex-m-rt's `paint-stack` fills the stack region with
//! 0xCCCC_CCCC before `main`; the lowest word no longer holding it is the deepest the stack
//! went).
#![allow(unsafe_code)]

use core::sync::atomic::{AtomicU32, Ordering};
use cortex_m::peripheral::{syst::SystClkSource, SYST};
use cortex_m_rt::exception;

/// SysTick reload: the full 24 bits.
const RELOAD: u32 = 0x00FF_FFFF;
static WRAPS: AtomicU32 = AtomicU32::new(0);

#[exception]
fn SysTick() {
    WRAPS.fetch_add(1, Ordering::Relaxed);
}

/// Starts SysTick on the core clock, free-running, counting wraps in its exception.
pub(crate) fn start_ticks(mut syst: SYST) {
    syst.set_clock_source(SystClkSource::Core);
    syst.set_reload(RELOAD);
    syst.clear_current();
    syst.enable_interrupt();
    syst.enable_counter();
    // The current value reads 0 until the first reload; wait for it so the first reading
    // is not taken for a full period. Bounded: the first tick comes within one clock.
    for _ in 0..10_000 {
        if SYST::get_current() != 0 {
            break;
        }
    }
}

/// Core clock ticks since [`start_ticks`].
pub(crate) fn ticks() -> u64 {
    loop {
        let before = WRAPS.load(Ordering::Relaxed);
        let current = SYST::get_current();
        if WRAPS.load(Ordering::Relaxed) == before {
            return u64::from(before) * u64::from(RELOAD + 1) + u64::from(RELOAD - current);
        }
    }
}

const PAINT: u32 = 0xCCCC_CCCC;

extern "C" {
    static _stack_start: u32;
    static _stack_end: u32;
}

/// `(deepest stack use in bytes, bytes painted)`.
pub(crate) fn stack_high_water() -> (u32, u32) {
    // Only the addresses of the linker symbols are taken; cortex-m-rt defines both.
    let (top, bottom) = (core::ptr::addr_of!(_stack_start) as usize, core::ptr::addr_of!(_stack_end) as usize);
    let mut addr = bottom;
    while addr < top {
        // SAFETY: [bottom, top) is RAM reserved for the stack by the linker script, word
        // aligned; reading it races with nothing (single core, no DMA).
        let word = unsafe { core::ptr::read_volatile(addr as *const u32) };
        if word != PAINT {
            break;
        }
        addr += 4;
    }
    ((top - addr) as u32, (top - bottom) as u32)
}
