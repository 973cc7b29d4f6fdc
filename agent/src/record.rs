//! The persisted record: the small, versioned, checksummed state a car keeps across reboots.
//!
//! ```text
//! offset  size  field
//! 0       4     magic "CAST" (CaaS agent state)
//! 4       1     record version (PERSISTED_VERSION = 1)
//! 5       2     payload length n, u16 little-endian
//! 7       n     payload: postcard of (vin, applied_seq, trusted_time, grants)
//! 7+n     4     CRC-32 (IEEE 802.3, the zlib/PNG one) of bytes [0, 7+n), little-endian
//! ```
//!
//! The record is written whole, as one value, so a store only has to replace one blob
//! atomically (sled `insert` + `flush`, a flash page pair, a file `rename`). Anything that
//! does not parse, does not checksum, or carries another version is refused with a
//! [`RecordError`]; the agent then boots to its safe state (see [`crate::Agent::new`]).

use core::fmt;

use caas_protocol::{Grant, Vin, MAX_GRANTS, MAX_GRANT_SIZE, VIN_LEN};
use heapless::Vec;
use serde::ser::SerializeSeq;
use serde::{Deserialize, Serialize, Serializer};

/// The record version this crate writes and reads.
pub const PERSISTED_VERSION: u8 = 1;
const MAGIC: &[u8; 4] = b"CAST";
const HEADER: usize = 4 + 1 + 2;
const CRC_LEN: usize = 4;
/// Largest payload: VIN (length byte + 17), two u64 varints (10 each), the grant count
/// byte, and every grant at its largest.
const MAX_PAYLOAD: usize = 1 + VIN_LEN + 2 * 10 + 1 + MAX_GRANTS * MAX_GRANT_SIZE;
/// Largest encoded record, in bytes. Size a store's slot (and an encode buffer) with it.
pub const MAX_PERSISTED_SIZE: usize = HEADER + MAX_PAYLOAD + CRC_LEN;

/// Everything a car must remember across a reboot.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PersistedState {
    /// The car the record belongs to; a record for another VIN is refused at boot.
    pub vin: Vin,
    /// Sequence number of the newest applied `SetState` (0: none yet).
    pub applied_seq: u64,
    /// The car's latest trustworthy time (Unix seconds) when the record was written.
    pub trusted_time: u64,
    /// The granted services, as the newest applied command gave them (grants that have
    /// ended are dropped when the agent notices they ended).
    pub grants: Vec<Grant, MAX_GRANTS>,
}

impl PersistedState {
    /// The state of a car that has never applied a command.
    pub fn empty(vin: Vin) -> Self {
        PersistedState {
            vin,
            applied_seq: 0,
            trusted_time: 0,
            grants: Vec::new(),
        }
    }

    /// Encodes the record into `buf` (size it with [`MAX_PERSISTED_SIZE`]) and returns the
    /// bytes to store.
    pub fn encode<'b>(&self, buf: &'b mut [u8]) -> Result<&'b [u8], RecordError> {
        RecordRef {
            vin: &self.vin,
            applied_seq: self.applied_seq,
            trusted_time: self.trusted_time,
            grants: GrantsRef {
                grants: &self.grants,
                active_at: None,
            },
        }
        .encode(buf)
    }

    /// Decodes and verifies a stored record.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        if bytes.len() < HEADER + CRC_LEN || &bytes[..4] != MAGIC {
            return Err(RecordError::Corrupt);
        }
        if bytes[4] != PERSISTED_VERSION {
            return Err(RecordError::UnknownVersion(bytes[4]));
        }
        let len = usize::from(u16::from_le_bytes([bytes[5], bytes[6]]));
        if bytes.len() != HEADER + len + CRC_LEN {
            return Err(RecordError::Corrupt);
        }
        let body_end = HEADER + len;
        let mut stored = [0u8; CRC_LEN];
        stored.copy_from_slice(&bytes[body_end..]);
        if crc32(&bytes[..body_end]) != u32::from_le_bytes(stored) {
            return Err(RecordError::Corrupt);
        }
        let (state, rest): (PersistedState, _) =
            postcard::take_from_bytes(&bytes[HEADER..body_end])
                .map_err(|_| RecordError::Corrupt)?;
        if !rest.is_empty() || state.grants.iter().any(|g| g.flags.is_empty()) {
            return Err(RecordError::Corrupt);
        }
        Ok(state)
    }
}

/// Why a stored record was refused, or could not be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordError {
    /// Too short, wrong magic, wrong length, bad checksum or undecodable payload.
    Corrupt,
    /// A record version this build does not read (the version byte is given).
    UnknownVersion(u8),
    /// The output buffer is smaller than the record (size it with [`MAX_PERSISTED_SIZE`]).
    BufferTooSmall,
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::Corrupt => f.write_str("persisted state is corrupt (checksum or layout)"),
            RecordError::UnknownVersion(v) => write!(f, "persisted state has unknown version {v}"),
            RecordError::BufferTooSmall => f.write_str("buffer too small for the persisted state"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for RecordError {}

/// The record's payload, serialized straight from borrowed parts so that the agent never
/// needs a second owned copy of its grants (kilobytes on a microcontroller) to write one.
#[derive(Serialize)]
pub(crate) struct RecordRef<'a> {
    pub(crate) vin: &'a Vin,
    pub(crate) applied_seq: u64,
    pub(crate) trusted_time: u64,
    pub(crate) grants: GrantsRef<'a>,
}

/// Grants to write; with `active_at`, only those still in force then.
pub(crate) struct GrantsRef<'a> {
    pub(crate) grants: &'a [Grant],
    pub(crate) active_at: Option<u64>,
}

impl GrantsRef<'_> {
    fn keep(&self, g: &Grant) -> bool {
        self.active_at.is_none_or(|t| g.is_active_at(t))
    }
}

impl Serialize for GrantsRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let n = self.grants.iter().filter(|g| self.keep(g)).count();
        let mut seq = s.serialize_seq(Some(n))?;
        for g in self.grants.iter().filter(|g| self.keep(g)) {
            seq.serialize_element(g)?;
        }
        seq.end()
    }
}

impl RecordRef<'_> {
    pub(crate) fn encode<'b>(&self, buf: &'b mut [u8]) -> Result<&'b [u8], RecordError> {
        if buf.len() < HEADER + CRC_LEN {
            return Err(RecordError::BufferTooSmall);
        }
        let payload_end = buf.len() - CRC_LEN;
        let len = postcard::to_slice(self, &mut buf[HEADER..payload_end])
            .map_err(|_| RecordError::BufferTooSmall)?
            .len();
        // Every payload this crate can build fits in u16 (MAX_PAYLOAD is about 3 KiB).
        let len16 = u16::try_from(len).map_err(|_| RecordError::BufferTooSmall)?;
        buf[..4].copy_from_slice(MAGIC);
        buf[4] = PERSISTED_VERSION;
        buf[5..7].copy_from_slice(&len16.to_le_bytes());
        let body_end = HEADER + len;
        let crc = crc32(&buf[..body_end]);
        buf[body_end..body_end + CRC_LEN].copy_from_slice(&crc.to_le_bytes());
        Ok(&buf[..body_end + CRC_LEN])
    }
}

/// CRC-32/ISO-HDLC, bit by bit: a few kilobytes once per write do not need a table, and a
/// table would cost a microcontroller 1 KiB of flash.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use caas_protocol::{FeatureFlag, Param};

    fn state() -> PersistedState {
        let mut s = PersistedState::empty("WVWZZZ1JZXW000001".parse().unwrap());
        s.applied_seq = 42;
        s.trusted_time = 1_700_000_000;
        let mut g = Grant::new("power-boost".parse().unwrap());
        g.flags
            .push(FeatureFlag::new("power_boost").unwrap())
            .unwrap();
        g.params
            .push(Param {
                key: "boostPercent".parse().unwrap(),
                value: "15".parse().unwrap(),
            })
            .unwrap();
        g.ends_at = Some(1_800_000_000);
        s.grants.push(g).unwrap();
        s
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn records_round_trip_and_pin_their_header() {
        let s = state();
        let mut buf = [0u8; MAX_PERSISTED_SIZE];
        let bytes = s.encode(&mut buf).unwrap();
        assert_eq!(&bytes[..5], b"CAST\x01");
        assert_eq!(
            usize::from(u16::from_le_bytes([bytes[5], bytes[6]])),
            bytes.len() - 11
        );
        assert_eq!(PersistedState::decode(bytes), Ok(s));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let mut buf = [0u8; MAX_PERSISTED_SIZE];
        let good = state().encode(&mut buf).unwrap().to_vec();
        for i in 0..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    PersistedState::decode(&bad).is_err(),
                    "flip of byte {i} bit {bit} passed"
                );
            }
        }
        assert_eq!(
            PersistedState::decode(&good[..good.len() - 1]),
            Err(RecordError::Corrupt)
        );
        assert_eq!(PersistedState::decode(&[]), Err(RecordError::Corrupt));
        let mut v2 = good.clone();
        v2[4] = 2;
        assert_eq!(
            PersistedState::decode(&v2),
            Err(RecordError::UnknownVersion(2))
        );
    }

    #[test]
    fn the_largest_state_fits_the_stated_bound() {
        let mut s = PersistedState::empty("WVWZZZ1JZXW000001".parse().unwrap());
        s.applied_seq = u64::MAX;
        s.trusted_time = u64::MAX;
        for i in 0..MAX_GRANTS {
            let id = std::format!("{i}{}", "s".repeat(31));
            let mut g = Grant::new(id.parse().unwrap());
            for j in 0..caas_protocol::MAX_FLAGS_PER_GRANT {
                g.flags
                    .push(FeatureFlag::new(&std::format!("{j}{}", "f".repeat(31))).unwrap())
                    .unwrap();
            }
            for j in 0..caas_protocol::MAX_PARAMS_PER_GRANT {
                let key = std::format!("{j}{}", "k".repeat(23));
                g.params
                    .push(Param {
                        key: key.parse().unwrap(),
                        value: "v".repeat(24).parse().unwrap(),
                    })
                    .unwrap();
            }
            g.ends_at = Some(u64::MAX);
            s.grants.push(g).unwrap();
        }
        let mut buf = [0u8; MAX_PERSISTED_SIZE];
        let bytes = s.encode(&mut buf).unwrap();
        assert_eq!(bytes.len(), MAX_PERSISTED_SIZE);
        assert_eq!(PersistedState::decode(bytes), Ok(s));
        let mut small = [0u8; 40];
        assert_eq!(
            state().encode(&mut small).map(|_| ()),
            Err(RecordError::BufferTooSmall)
        );
    }
}
