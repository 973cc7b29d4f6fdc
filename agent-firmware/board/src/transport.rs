//! The transport seam, and the byte format of the QEMU scenario that stands in for it.
//!
//! On hardware the agent talks to the telematics modem over a UART: frames in, frames out.
//! The firmware only sees [`Transport`]. In QEMU the host test writes a scenario file of
//! [`Step`]s (each with the "now" the car's clock reads at that step, because time is an
//! input of the sans-IO core) and reads back a file of [`Out`] records.
//!
//! Scenario record: `tag u8 | now u64 LE | len u16 LE | len bytes`.
//! Output record:   `tag u8 | len u16 LE | len bytes`.

/// Bytes before a scenario step's body.
pub const STEP_HEADER_SIZE: usize = 11;
/// Bytes before an output record's body.
pub const OUT_HEADER_SIZE: usize = 3;

/// Moves whole frames between the agent and the outside world (on hardware: the UART to
/// the telematics modem, with the modem's framing).
pub trait Transport {
    /// The link's error.
    type Error;
    /// Receives the next whole frame into `buf` and returns its length, or `None` when no
    /// frame is waiting. A frame longer than `buf` is consumed and dropped, and its length
    /// is still returned: the agent core refuses a length beyond its buffer as `TOO_LARGE`
    /// and reports it, so an oversized frame is answered, not silently lost.
    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, Self::Error>;
    /// Sends one frame (a signed report).
    fn send(&mut self, frame: &[u8]) -> Result<(), Self::Error>;
}

/// What one scenario step asks the firmware to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// A frame arrives from the modem (body: the frame).
    Frame = 1,
    /// Only time passes (empty body): grants may end.
    Tick = 2,
    /// The ECU reboots: the agent is rebuilt from flash (empty body).
    Reboot = 3,
    /// Benchmark: verify the body (a command frame) alone and report guest instructions.
    BenchVerify = 4,
    /// End of the scenario (empty body).
    End = 5,
    /// The flash fails its next erase or write (empty body): a storage fault.
    FailNextWrite = 6,
}

impl StepKind {
    /// The kind for a tag byte.
    pub fn from_u8(tag: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| *k as u8 == tag)
    }

    /// Every kind (the tests check none is missing).
    pub const ALL: [StepKind; 6] = [
        Self::Frame,
        Self::Tick,
        Self::Reboot,
        Self::BenchVerify,
        Self::End,
        Self::FailNextWrite,
    ];
}

/// A decoded step header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepHeader {
    /// What to do.
    pub kind: StepKind,
    /// The car's clock at this step (Unix seconds).
    pub now: u64,
    /// Length of the body that follows.
    pub len: u16,
}

impl StepHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; STEP_HEADER_SIZE] {
        let mut out = [0u8; STEP_HEADER_SIZE];
        out[0] = self.kind as u8;
        out[1..9].copy_from_slice(&self.now.to_le_bytes());
        out[9..11].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    /// Decodes a header; `None` for an unknown tag.
    pub fn decode(bytes: &[u8; STEP_HEADER_SIZE]) -> Option<Self> {
        let kind = StepKind::from_u8(bytes[0])?;
        let mut now = [0u8; 8];
        now.copy_from_slice(&bytes[1..9]);
        Some(StepHeader {
            kind,
            now: u64::from_le_bytes(now),
            len: u16::from_le_bytes([bytes[9], bytes[10]]),
        })
    }
}

/// What the firmware writes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutKind {
    /// A signed report frame the agent sent.
    Report = 1,
    /// After each step: `step u16 LE | lines u32 LE | stack u32 LE` (bit i = feature line
    /// i; stack = the deepest the stack went during the step, in bytes).
    Lines = 2,
    /// A benchmark: `what u8 | guest instructions u64 LE`.
    Bench = 3,
    /// At the end: `stack high-water bytes u32 LE | measured window bytes u32 LE`.
    Stack = 4,
    /// A line of text (UTF-8); after each boot `boot: fresh`, `boot: restored` or
    /// `boot: safe state` (the stored record was refused).
    Log = 5,
    /// The agent acknowledged a frame to the transport (empty body).
    Ack = 6,
    /// After each boot: `stack u32 LE`, the deepest the stack went while booting.
    Boot = 7,
}

impl OutKind {
    /// The kind for a tag byte.
    pub fn from_u8(tag: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| *k as u8 == tag)
    }

    /// Every kind (the tests check none is missing).
    pub const ALL: [OutKind; 7] = [
        Self::Report,
        Self::Lines,
        Self::Bench,
        Self::Stack,
        Self::Log,
        Self::Ack,
        Self::Boot,
    ];
}

/// Benchmark ids in [`OutKind::Bench`] records.
pub mod bench {
    /// `open_command_view` alone: envelope checks, SHA-512, Ed25519 strict verify, then the
    /// in-place read.
    pub const VERIFY: u8 = 1;
    /// A whole `SetState` through the agent core: verify, check, persist, apply, sign report.
    pub const HANDLE_COMMAND: u8 = 2;
    /// Not ticks but stack bytes: the deepest the stack went (from its top) during
    /// `open_command_view` alone.
    pub const VERIFY_STACK: u8 = 3;
    /// Not ticks but stack bytes: the deepest the stack went during the in-place read of a
    /// verified command alone (`CommandView::parse`, then each grant decoded).
    pub const IN_PLACE_STACK: u8 = 4;
    /// The Ed25519 signature check alone (`parse_frame` + `RawFrame::verify`), in ticks.
    pub const SIGNATURE: u8 = 5;
    /// Not ticks but stack bytes: the deepest the stack went during [`SIGNATURE`].
    pub const SIGNATURE_STACK: u8 = 6;
    /// The same check with ed25519-compact (`opt_size`), in ticks (feature
    /// `compare-ed25519-compact` of the firmware only).
    pub const COMPACT_SIGNATURE: u8 = 7;
    /// Not ticks but stack bytes: the deepest the stack went during [`COMPACT_SIGNATURE`].
    pub const COMPACT_SIGNATURE_STACK: u8 = 8;
}

/// Encodes an output record header.
pub fn out_header(kind: OutKind, len: u16) -> [u8; OUT_HEADER_SIZE] {
    let l = len.to_le_bytes();
    [kind as u8, l[0], l[1]]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails to compile when a kind is added without a tag here, and fails when `ALL`
    /// misses one.
    #[test]
    fn every_kind_decodes_from_its_tag() {
        for tag in 0..=u8::MAX {
            if let Some(k) = StepKind::from_u8(tag) {
                let expected = match k {
                    StepKind::Frame => 1,
                    StepKind::Tick => 2,
                    StepKind::Reboot => 3,
                    StepKind::BenchVerify => 4,
                    StepKind::End => 5,
                    StepKind::FailNextWrite => 6,
                };
                assert_eq!(tag, expected);
            }
            if let Some(k) = OutKind::from_u8(tag) {
                let expected = match k {
                    OutKind::Report => 1,
                    OutKind::Lines => 2,
                    OutKind::Bench => 3,
                    OutKind::Stack => 4,
                    OutKind::Log => 5,
                    OutKind::Ack => 6,
                    OutKind::Boot => 7,
                };
                assert_eq!(tag, expected);
            }
        }
        assert_eq!((1..=6).filter_map(StepKind::from_u8).count(), 6);
        assert_eq!((1..=7).filter_map(OutKind::from_u8).count(), 7);
    }

    #[test]
    fn step_headers_round_trip_and_unknown_tags_are_refused() {
        let h = StepHeader {
            kind: StepKind::Frame,
            now: 1_700_000_123,
            len: 300,
        };
        assert_eq!(StepHeader::decode(&h.encode()), Some(h));
        let mut bad = h.encode();
        bad[0] = 99;
        assert_eq!(StepHeader::decode(&bad), None);
        assert_eq!(
            OutKind::from_u8(out_header(OutKind::Stack, 8)[0]),
            Some(OutKind::Stack)
        );
    }
}
