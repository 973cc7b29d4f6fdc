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
/// The part of the stack region that is scanned and re-painted: the top 128 KiB (the whole
/// 4 MiB is painted once at reset, but a budget of 16 KiB needs no more than this).
const WINDOW: usize = 128 * 1024;
/// Bytes below the stack pointer left alone when re-painting (room for an exception frame).
const SP_MARGIN: usize = 128;

extern "C" {
    static _stack_start: u32;
    static _stack_end: u32;
}

/// `(top of the stack, lowest address scanned)`.
fn window() -> (usize, usize) {
    // Only the addresses of the linker symbols are taken; cortex-m-rt defines both.
    let (top, end) = (
        core::ptr::addr_of!(_stack_start) as usize,
        core::ptr::addr_of!(_stack_end) as usize,
    );
    (top, end.max(top.saturating_sub(WINDOW)))
}

/// The deepest the stack went since reset or the last [`repaint`], in bytes below its top.
pub(crate) fn stack_high_water() -> u32 {
    let (top, bottom) = window();
    let mut addr = bottom;
    while addr < top {
        // SAFETY: [bottom, top) is RAM the linker script reserves for the stack, word
        // aligned; reading it races with nothing (single core, no DMA).
        let word = unsafe { core::ptr::read_volatile(addr as *const u32) };
        if word != PAINT {
            break;
        }
        addr += 4;
    }
    (top - addr) as u32
}

/// Paints the unused part of the stack again, so the next [`stack_high_water`] measures
/// only what runs after this call.
pub(crate) fn repaint() {
    let (_, bottom) = window();
    let end = (cortex_m::register::msp::read() as usize).saturating_sub(SP_MARGIN) & !3;
    let mut addr = bottom;
    while addr < end {
        // SAFETY: [bottom, end) is stack region below the live stack pointer (minus a
        // margin for an exception frame): no live data is there. Single core, no DMA.
        unsafe { core::ptr::write_volatile(addr as *mut u32, PAINT) };
        addr += 4;
    }
}

/// The size of the scanned stack window, in bytes.
pub(crate) fn window_size() -> u32 {
    let (top, bottom) = window();
    (top - bottom) as u32
}
