//! Feature lines: one `embedded-hal` output pin per optional feature of the platform.
//!
//! The board wires each optional feature flag (e.g. `power_boost`) to one GPIO that enables
//! it in the ECU's application firmware. The table is fixed at build time ([`PinLines::new`]);
//! a flag not in the table is not a feature of this platform.

use core::convert::Infallible;
use embedded_hal::digital::{ErrorType, OutputPin};

/// The feature lines of a board: `N` (flag name, pin) pairs. `N` is the bound on the number
/// of optional features a platform has (the firmware uses 8).
pub struct PinLines<P, const N: usize> {
    lines: [(&'static str, P); N],
    state: u32,
}

/// A pin refused to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineError {
    /// Index of the line that failed.
    pub line: usize,
}

impl<P: OutputPin, const N: usize> PinLines<P, N> {
    /// Takes the pins; every line starts off (the caller drives them to the persisted state
    /// right after boot). At most 32 lines (the state is a `u32` bitmask).
    pub fn new(lines: [(&'static str, P); N]) -> Result<Self, LineError> {
        const { assert!(N <= 32, "at most 32 feature lines") };
        let mut this = PinLines { lines, state: 0 };
        for line in 0..N {
            this.drive(line, false)?;
        }
        Ok(this)
    }

    /// The line index of `flag`, if this board has it.
    pub fn index_of(&self, flag: &str) -> Option<usize> {
        self.lines.iter().position(|(name, _)| *name == flag)
    }

    /// The flag names, in line order.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.lines.iter().map(|(name, _)| *name)
    }

    /// Switches `flag` on or off. `Ok(false)` when the board has no such line.
    pub fn set(&mut self, flag: &str, on: bool) -> Result<bool, LineError> {
        match self.index_of(flag) {
            Some(line) => self.drive(line, on).map(|()| true),
            None => Ok(false),
        }
    }

    /// Drives every line to `wanted` (bit i = line i). Lines that fail keep their old state
    /// in [`PinLines::state`]; the first failure is returned after trying them all.
    pub fn apply(&mut self, wanted: u32) -> Result<(), LineError> {
        let mut first_err = None;
        for line in 0..N {
            let on = wanted & (1 << line) != 0;
            if on != (self.state & (1 << line) != 0) {
                if let Err(e) = self.drive(line, on) {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The lines as last driven successfully (bit i = line i).
    pub fn state(&self) -> u32 {
        self.state
    }

    fn drive(&mut self, line: usize, on: bool) -> Result<(), LineError> {
        let pin = &mut self.lines[line].1;
        let result = if on { pin.set_high() } else { pin.set_low() };
        result.map_err(|_| LineError { line })?;
        if on {
            self.state |= 1 << line;
        } else {
            self.state &= !(1 << line);
        }
        Ok(())
    }
}

/// A pin that only remembers its level and how often it changed: the QEMU board's feature
/// lines, whose state the firmware writes out for the host test to check.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RecordingPin {
    /// The level last driven.
    pub high: bool,
    /// How many times the level changed (bounded by `u32`, saturating).
    pub changes: u32,
}

impl ErrorType for RecordingPin {
    type Error = Infallible;
}

impl OutputPin for RecordingPin {
    fn set_low(&mut self) -> Result<(), Infallible> {
        self.level(false);
        Ok(())
    }

    fn set_high(&mut self) -> Result<(), Infallible> {
        self.level(true);
        Ok(())
    }
}

impl RecordingPin {
    fn level(&mut self, high: bool) {
        if self.high != high {
            self.changes = self.changes.saturating_add(1);
        }
        self.high = high;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pin that fails every change, to check a failing line leaves the state as it was.
    struct BrokenPin;
    impl ErrorType for BrokenPin {
        type Error = embedded_hal::digital::ErrorKind;
    }
    impl OutputPin for BrokenPin {
        fn set_low(&mut self) -> Result<(), Self::Error> {
            Err(embedded_hal::digital::ErrorKind::Other)
        }
        fn set_high(&mut self) -> Result<(), Self::Error> {
            Err(embedded_hal::digital::ErrorKind::Other)
        }
    }

    #[test]
    fn lines_follow_flags_and_unknown_flags_are_refused() {
        let mut lines = PinLines::new([
            ("power_boost", RecordingPin::default()),
            ("snow_mode", RecordingPin::default()),
        ])
        .unwrap();
        assert_eq!(lines.state(), 0);
        assert_eq!(lines.set("snow_mode", true), Ok(true));
        assert_eq!(lines.state(), 0b10);
        assert_eq!(lines.set("autopilot", true), Ok(false));
        assert_eq!(lines.state(), 0b10);
        lines.apply(0b01).unwrap();
        assert_eq!(lines.state(), 0b01);
        assert!(lines.lines[0].1.high && !lines.lines[1].1.high);
        assert_eq!(lines.lines[1].1.changes, 2);
    }

    #[test]
    fn a_failing_pin_reports_its_line() {
        assert_eq!(
            PinLines::new([("x", BrokenPin)]).err(),
            Some(LineError { line: 0 })
        );
    }
}
