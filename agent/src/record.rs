//! The persisted record: the small, versioned, checksummed state a car keeps across reboots,
//! and the compact form the agent keeps of it in RAM.
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
//! `grants` is encoded exactly as a command's grant list (`caas_protocol::EncodedGrants`), so
//! the record that applies a command is made from the command's own bytes, in place, in the
//! agent's one buffer ([`command_record_in_place`]): a microcontroller never holds a decoded
//! command and a record side by side. The record is written whole, as one value, so a store
//! only has to replace one blob atomically (sled `insert` + `flush`, a flash page pair, a file
//! `rename`). Anything that does not parse, does not checksum, or carries another version is
//! refused with a [`RecordError`]; the agent then boots to its safe state (see
//! [`crate::Agent::new`]).
//!
//! In RAM the agent does not keep the record, nor whole [`Grant`]s (432 bytes each on a
//! 32-bit target, most of it feature-flag names): it keeps an [`AppliedState`], whose grants
//! name their flags by their number in the platform's catalogue
//! ([`crate::FeatureCatalog`]), and decodes records into it one grant at a time.

use core::fmt;

use caas_protocol::{
    EncodedGrants, FeatureFlag, Grant, Param, ServiceId, Vin, MAX_FLAGS_PER_GRANT, MAX_GRANTS,
    MAX_GRANT_SIZE, MAX_PARAMS_PER_GRANT, VIN_LEN,
};
use heapless::Vec;
use serde::ser::{SerializeSeq, SerializeStruct};
use serde::{Serialize, Serializer};

use crate::machine::FeatureCatalog;

/// The record version this crate writes and reads.
pub const PERSISTED_VERSION: u8 = 1;
const MAGIC: &[u8; 4] = b"CAST";
const HEADER: usize = 4 + 1 + 2;
const CRC_LEN: usize = 4;
/// Bytes of the (vin, applied_seq, trusted_time) prefix at most: VIN (length byte + 17) and
/// two u64 varints (10 each).
const PREFIX_MAX: usize = 1 + VIN_LEN + 2 * 10;
/// Largest payload: the prefix, the grant count byte, and every grant at its largest.
const MAX_PAYLOAD: usize = PREFIX_MAX + 1 + MAX_GRANTS * MAX_GRANT_SIZE;
/// Largest encoded record, in bytes. Size a store's slot (and an encode buffer) with it.
pub const MAX_PERSISTED_SIZE: usize = HEADER + MAX_PAYLOAD + CRC_LEN;

/// Everything a car must remember across a reboot, decoded whole: for stores, tools and
/// tests (about 3.5 KiB; the agent itself keeps the smaller [`AppliedState`]).
#[derive(Debug, Clone, PartialEq, Eq)]
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
        let len = write_record(
            buf,
            &self.vin,
            self.applied_seq,
            self.trusted_time,
            &self.grants,
        )?;
        Ok(&buf[..len])
    }

    /// Decodes and verifies a stored record.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let record = RecordView::open(bytes)?;
        let mut grants = Vec::new();
        for grant in record.grants.iter() {
            grants.push(grant).map_err(|_| RecordError::Corrupt)?;
        }
        Ok(PersistedState {
            vin: record.vin,
            applied_seq: record.applied_seq,
            trusted_time: record.trusted_time,
            grants,
        })
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

/// One grant as the agent keeps it in RAM: a [`Grant`] whose flags are numbers in the
/// platform's catalogue ([`crate::FeatureCatalog::optional_index`]) instead of names
/// (296 bytes instead of 432 on a 32-bit target).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedGrant {
    /// The catalog's service id.
    pub service_id: ServiceId,
    /// The feature flags it switches on, as optional-feature numbers of the platform.
    pub flags: Vec<u16, MAX_FLAGS_PER_GRANT>,
    /// Its parameters.
    pub params: Vec<Param, MAX_PARAMS_PER_GRANT>,
    /// When it ends (Unix seconds, UTC); `None` for permanent or until withdrawn.
    pub ends_at: Option<u64>,
}

impl AppliedGrant {
    /// Whether the grant is in force at `now` (Unix seconds), as [`Grant::is_active_at`].
    pub fn is_active_at(&self, now: u64) -> bool {
        self.ends_at.is_none_or(|end| now < end)
    }

    /// The compact form of `grant`; `None` when a flag is not an optional feature of
    /// `platform` (or is numbered beyond `u16`).
    pub(crate) fn from_grant<P: FeatureCatalog>(grant: Grant, platform: &P) -> Option<Self> {
        let mut flags = Vec::new();
        for flag in &grant.flags {
            let index = platform
                .optional_index(flag)
                .and_then(|i| u16::try_from(i).ok())?;
            // Cannot overflow: both lists hold MAX_FLAGS_PER_GRANT.
            flags.push(index).ok()?;
        }
        Some(AppliedGrant {
            service_id: grant.service_id,
            flags,
            params: grant.params,
            ends_at: grant.ends_at,
        })
    }

    /// The whole [`Grant`] again, flags named by `platform`.
    pub(crate) fn to_grant<P: FeatureCatalog>(&self, platform: &P) -> Grant {
        let mut grant = Grant::new(self.service_id.clone());
        for &index in &self.flags {
            if let Some(flag) = flag_name(platform, index) {
                // Cannot overflow: both lists hold MAX_FLAGS_PER_GRANT.
                let _ = grant.flags.push(flag);
            }
        }
        grant.params = self.params.clone();
        grant.ends_at = self.ends_at;
        grant
    }
}

/// The name of optional feature `index` of `platform`, as a flag.
pub(crate) fn flag_name<P: FeatureCatalog>(platform: &P, index: u16) -> Option<FeatureFlag> {
    platform
        .optional_name(usize::from(index))
        .and_then(|name| FeatureFlag::new(name).ok())
}

/// What the agent keeps of its record in RAM (about 2.4 KiB on a 32-bit target): the newest
/// applied command's seq, the trusted time the record was written with, and the grants.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AppliedState {
    /// Sequence number of the newest applied `SetState` (0: none yet).
    pub applied_seq: u64,
    /// The trusted time (Unix seconds) of the committed record (0 when none was read).
    pub trusted_time: u64,
    /// The granted services, as the newest applied command gave them, minus those whose end
    /// has been recorded.
    pub grants: Vec<AppliedGrant, MAX_GRANTS>,
}

/// How [`load_record`] found a record.
pub(crate) enum Loaded {
    /// In force; `dropped` tells whether grants naming no optional feature were left out.
    Restored { dropped: bool },
    /// A sound record of another car; nothing was taken from it.
    WrongVin,
}

/// Reads a record into `state`, one grant at a time. The whole record is checked first
/// (checksum, layout, every grant), so on an error `state` is untouched.
pub(crate) fn load_record<P: FeatureCatalog>(
    bytes: &[u8],
    vin: &Vin,
    platform: &P,
    state: &mut AppliedState,
) -> Result<Loaded, RecordError> {
    let record = RecordView::open(bytes)?;
    if &record.vin != vin {
        return Ok(Loaded::WrongVin);
    }
    state.applied_seq = record.applied_seq;
    state.trusted_time = record.trusted_time;
    state.grants.clear();
    let mut dropped = false;
    for grant in record.grants.iter() {
        match AppliedGrant::from_grant(grant, platform) {
            // Cannot overflow: a record holds at most MAX_GRANTS grants.
            Some(applied) => dropped |= state.grants.push(applied).is_err(),
            None => dropped = true,
        }
    }
    Ok(Loaded::Restored { dropped })
}

/// A stored record, checksum verified and read in place.
struct RecordView<'a> {
    vin: Vin,
    applied_seq: u64,
    trusted_time: u64,
    grants: EncodedGrants<'a>,
}

impl<'a> RecordView<'a> {
    #[inline(never)]
    fn open(bytes: &'a [u8]) -> Result<Self, RecordError> {
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
        let corrupt = |_| RecordError::Corrupt;
        let payload = &bytes[HEADER..body_end];
        let (vin, rest): (Vin, _) = postcard::take_from_bytes(payload).map_err(corrupt)?;
        let (applied_seq, rest): (u64, _) = postcard::take_from_bytes(rest).map_err(corrupt)?;
        let (trusted_time, rest): (u64, _) = postcard::take_from_bytes(rest).map_err(corrupt)?;
        let (grants, rest) = EncodedGrants::take(rest).map_err(|_| RecordError::Corrupt)?;
        if !rest.is_empty() {
            return Err(RecordError::Corrupt);
        }
        grants.check_structure().map_err(|_| RecordError::Corrupt)?;
        Ok(RecordView {
            vin,
            applied_seq,
            trusted_time,
            grants,
        })
    }
}

/// Writes a record whose grant list is `grants` (anything that serializes as a list of
/// [`Grant`]s) into `buf`, returning its length.
pub(crate) fn write_record<G: Serialize + ?Sized>(
    buf: &mut [u8],
    vin: &Vin,
    applied_seq: u64,
    trusted_time: u64,
    grants: &G,
) -> Result<usize, RecordError> {
    let payload_end = buf
        .len()
        .checked_sub(CRC_LEN)
        .filter(|&end| end >= HEADER)
        .ok_or(RecordError::BufferTooSmall)?;
    let len = postcard::to_slice(
        &(vin, applied_seq, trusted_time, grants),
        &mut buf[HEADER..payload_end],
    )
    .map_err(|_| RecordError::BufferTooSmall)?
    .len();
    seal_record(buf, len)
}

/// Writes the header in front of the `len`-byte payload at `buf[HEADER..]` and the CRC
/// behind it; returns the record's length.
fn seal_record(buf: &mut [u8], len: usize) -> Result<usize, RecordError> {
    let body_end = HEADER + len;
    let end = body_end + CRC_LEN;
    // Every payload this crate can build fits in u16 (MAX_PAYLOAD is about 3 KiB).
    let len16 = u16::try_from(len).map_err(|_| RecordError::BufferTooSmall)?;
    if end > buf.len() || end > MAX_PERSISTED_SIZE {
        return Err(RecordError::BufferTooSmall);
    }
    buf[..4].copy_from_slice(MAGIC);
    buf[4] = PERSISTED_VERSION;
    buf[5..7].copy_from_slice(&len16.to_le_bytes());
    let crc = crc32(&buf[..body_end]);
    buf[body_end..end].copy_from_slice(&crc.to_le_bytes());
    Ok(end)
}

/// Turns the verified command frame in `buf` into the record that applies it, in place:
/// the command's `count` grants start at `buf[first..]` (after its count prefix), and each
/// is decoded and written again, canonically, to its place in the record, which always lies
/// before it (the record's prefix is shorter than the frame's header and the command's
/// fields, and a canonical encoding is never longer than the one read). The frame is gone
/// afterwards. Returns the record's length.
///
/// Not inlined: its one decoded grant (432 bytes) is a temporary of this frame only.
#[inline(never)]
pub(crate) fn command_record_in_place(
    buf: &mut [u8],
    vin: &Vin,
    applied_seq: u64,
    trusted_time: u64,
    first: usize,
    count: usize,
) -> Result<usize, RecordError> {
    let mut prefix = [0u8; PREFIX_MAX];
    let prefix_len = postcard::to_slice(&(vin, applied_seq, trusted_time), &mut prefix)
        .map_err(|_| RecordError::BufferTooSmall)?
        .len();
    // A count of at most MAX_GRANTS is one varint byte.
    let count_byte = u8::try_from(count)
        .ok()
        .filter(|&c| usize::from(c) <= MAX_GRANTS)
        .ok_or(RecordError::Corrupt)?;
    let grants_at = HEADER + prefix_len;
    let mut write = grants_at + 1;
    let mut read = first;
    for _ in 0..count {
        if write > read {
            return Err(RecordError::Corrupt);
        }
        let source = buf.get(read..).ok_or(RecordError::Corrupt)?;
        let (grant, rest): (Grant, _) =
            postcard::take_from_bytes(source).map_err(|_| RecordError::Corrupt)?;
        let next = buf.len() - rest.len();
        // Bounded by the source's end, so it cannot overwrite the grants not read yet.
        let written = postcard::to_slice(&grant, &mut buf[write..next])
            .map_err(|_| RecordError::Corrupt)?
            .len();
        write += written;
        read = next;
    }
    buf[HEADER..grants_at].copy_from_slice(&prefix[..prefix_len]);
    buf[grants_at] = count_byte;
    seal_record(buf, write - HEADER)
}

/// The agent's grants as the record's grant list: names from the platform's catalogue,
/// and, with `active_at`, only the grants still in force then.
pub(crate) struct AppliedGrants<'a, P> {
    pub(crate) grants: &'a [AppliedGrant],
    pub(crate) active_at: Option<u64>,
    pub(crate) platform: &'a P,
}

impl<P> AppliedGrants<'_, P> {
    fn keep(&self, g: &AppliedGrant) -> bool {
        self.active_at.is_none_or(|t| g.is_active_at(t))
    }
}

impl<P: FeatureCatalog> Serialize for AppliedGrants<'_, P> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let n = self.grants.iter().filter(|g| self.keep(g)).count();
        let mut seq = s.serialize_seq(Some(n))?;
        for grant in self.grants.iter().filter(|g| self.keep(g)) {
            seq.serialize_element(&AsGrant {
                grant,
                platform: self.platform,
            })?;
        }
        seq.end()
    }
}

/// Serializes an [`AppliedGrant`] exactly as the [`Grant`] it stands for (field order and
/// types of `Grant`'s derived `Serialize`).
struct AsGrant<'a, P> {
    grant: &'a AppliedGrant,
    platform: &'a P,
}

impl<P: FeatureCatalog> Serialize for AsGrant<'_, P> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Grant", 4)?;
        st.serialize_field("service_id", &self.grant.service_id)?;
        st.serialize_field(
            "flags",
            &FlagNames {
                flags: &self.grant.flags,
                platform: self.platform,
            },
        )?;
        st.serialize_field("params", &self.grant.params)?;
        st.serialize_field("ends_at", &self.grant.ends_at)?;
        st.end()
    }
}

struct FlagNames<'a, P> {
    flags: &'a [u16],
    platform: &'a P,
}

impl<P: FeatureCatalog> Serialize for FlagNames<'_, P> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.flags.len()))?;
        for &index in self.flags {
            let name = self
                .platform
                .optional_name(usize::from(index))
                .ok_or_else(|| serde::ser::Error::custom("flag not in the catalogue"))?;
            seq.serialize_element(name)?;
        }
        seq.end()
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
    use crate::Catalog;
    use caas_protocol::{
        seal_command, Command, CommandBody, DesiredState, FeatureFlag, Param, SigningKey,
        TrustedKey, FRAME_HEADER_SIZE, MAX_COMMAND_FRAME_SIZE,
    };

    const CATALOG: Catalog<'static> = Catalog {
        optional: &["power_boost", "snow_mode"],
        base: &["abs"],
    };

    fn vin() -> Vin {
        "WVWZZZ1JZXW000001".parse().unwrap()
    }

    fn grant(id: &str, flags: &[&str], ends_at: Option<u64>) -> Grant {
        let mut g = Grant::new(id.parse().unwrap());
        for f in flags {
            g.flags.push(FeatureFlag::new(f).unwrap()).unwrap();
        }
        g.params
            .push(Param {
                key: "boostPercent".parse().unwrap(),
                value: "15".parse().unwrap(),
            })
            .unwrap();
        g.ends_at = ends_at;
        g
    }

    fn state() -> PersistedState {
        let mut s = PersistedState::empty(vin());
        s.applied_seq = 42;
        s.trusted_time = 1_700_000_000;
        s.grants
            .push(grant("power-boost", &["power_boost"], Some(1_800_000_000)))
            .unwrap();
        s
    }

    /// The largest grant the bounds allow, flags from `flags`.
    fn big_grant(i: usize, flag: impl Fn(usize) -> std::string::String) -> Grant {
        let id = std::format!("{i}{}", "s".repeat(31));
        let mut g = Grant::new(id.parse().unwrap());
        for j in 0..caas_protocol::MAX_FLAGS_PER_GRANT {
            g.flags.push(FeatureFlag::new(&flag(j)).unwrap()).unwrap();
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
        g
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
        let mut s = PersistedState::empty(vin());
        s.applied_seq = u64::MAX;
        s.trusted_time = u64::MAX;
        for i in 0..MAX_GRANTS {
            s.grants
                .push(big_grant(i, |j| std::format!("{j}{}", "f".repeat(31))))
                .unwrap();
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

    /// The record made in place from a command frame is the record of the decoded state.
    #[test]
    fn a_command_becomes_its_record_in_place() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let trusted = [TrustedKey::new(key.verifying_key())];
        let long = |j: usize| std::format!("{j}{}", "f".repeat(31));
        let cases: [(u64, u64, std::vec::Vec<Grant>); 4] = [
            (1, 0, std::vec![]),
            (
                7,
                1_700_000_000,
                std::vec![
                    grant("a", &["power_boost"], None),
                    grant("b", &["snow_mode", "power_boost"], Some(9))
                ],
            ),
            (
                u64::MAX,
                u64::MAX,
                (0..MAX_GRANTS).map(|i| big_grant(i, long)).collect(),
            ),
            (
                3,
                u64::MAX,
                std::vec![grant("a", &["power_boost"], Some(u64::MAX))],
            ),
        ];
        for (seq, trusted_time, grants) in cases {
            let mut desired = DesiredState::default();
            for g in &grants {
                desired.grants.push(g.clone()).unwrap();
            }
            let cmd = Command {
                vin: vin(),
                seq,
                issued_at: 1,
                not_after: 2,
                body: CommandBody::SetState(desired),
            };
            let mut buf = [0u8; MAX_COMMAND_FRAME_SIZE];
            let len = seal_command(&cmd, &key, &mut buf).unwrap().len();
            let view = caas_protocol::open_command_view(&buf[..len], &trusted).unwrap();
            let caas_protocol::BodyView::SetState(d) = view.body else {
                panic!("a SetState")
            };
            let first = FRAME_HEADER_SIZE + d.grants_offset() + d.grants().count_len();
            let count = d.grants().len();
            let n =
                command_record_in_place(&mut buf, &vin(), seq, trusted_time, first, count).unwrap();
            let mut expected = PersistedState::empty(vin());
            expected.applied_seq = seq;
            expected.trusted_time = trusted_time;
            for g in grants {
                expected.grants.push(g).unwrap();
            }
            let mut want = [0u8; MAX_PERSISTED_SIZE];
            assert_eq!(&buf[..n], expected.encode(&mut want).unwrap());
        }
    }

    /// A command whose varints and length prefixes are longer than needed (postcard reads
    /// them) still becomes its canonical record, in place.
    #[test]
    fn a_padded_command_becomes_its_canonical_record_in_place() {
        let grants = std::vec![
            grant("boost", &["power_boost"], None),
            grant("seats", &["snow_mode"], Some(300)),
        ];
        let mut desired = DesiredState::default();
        for g in &grants {
            desired.grants.push(g.clone()).unwrap();
        }
        let cmd = Command {
            vin: vin(),
            seq: 5,
            issued_at: 1,
            not_after: 2,
            body: CommandBody::SetState(desired),
        };
        let mut payload = postcard::to_allocvec(&cmd).unwrap();
        // vin (18) + three one-byte varints + variant + empty settles: the grant count.
        let at = 18 + 3 + 1 + 1;
        assert_eq!(payload[at], 2);
        // The count in three bytes, the first service id's length in two.
        assert_eq!(payload[at + 1], 5);
        payload.splice(at..at + 2, [0x82, 0x80, 0x00, 0x85, 0x00]);
        let view = caas_protocol::CommandView::parse(&payload).unwrap();
        assert_eq!(view.to_command(), cmd);
        let caas_protocol::BodyView::SetState(d) = view.body else {
            panic!("a SetState")
        };
        let mut buf = [0u8; MAX_COMMAND_FRAME_SIZE];
        buf[FRAME_HEADER_SIZE..FRAME_HEADER_SIZE + payload.len()].copy_from_slice(&payload);
        let first = FRAME_HEADER_SIZE + d.grants_offset() + d.grants().count_len();
        assert_eq!(d.grants().count_len(), 3);
        let n = command_record_in_place(&mut buf, &vin(), 5, 77, first, 2).unwrap();
        let mut expected = PersistedState::empty(vin());
        expected.applied_seq = 5;
        expected.trusted_time = 77;
        for g in grants {
            expected.grants.push(g).unwrap();
        }
        let mut want = [0u8; MAX_PERSISTED_SIZE];
        assert_eq!(&buf[..n], expected.encode(&mut want).unwrap());
    }

    #[test]
    fn applied_grants_encode_as_the_grants_they_stand_for() {
        let g = grant("b", &["snow_mode", "power_boost"], Some(9));
        let applied = AppliedGrant::from_grant(g.clone(), &CATALOG).unwrap();
        assert_eq!(&applied.flags[..], &[1, 0]);
        assert_eq!(applied.to_grant(&CATALOG), g);
        assert!(AppliedGrant::from_grant(grant("c", &["abs"], None), &CATALOG).is_none());
        let mut s = state();
        s.grants.push(g).unwrap();
        let mut compact = AppliedState {
            applied_seq: s.applied_seq,
            trusted_time: 0,
            grants: Vec::new(),
        };
        for g in &s.grants {
            compact
                .grants
                .push(AppliedGrant::from_grant(g.clone(), &CATALOG).unwrap())
                .unwrap();
        }
        let mut a = [0u8; MAX_PERSISTED_SIZE];
        let mut b = [0u8; MAX_PERSISTED_SIZE];
        let via = AppliedGrants {
            grants: &compact.grants,
            active_at: None,
            platform: &CATALOG,
        };
        let n = write_record(&mut a, &s.vin, s.applied_seq, s.trusted_time, &via).unwrap();
        assert_eq!(&a[..n], s.encode(&mut b).unwrap());
        // With `active_at`, ended grants are left out.
        let via = AppliedGrants {
            active_at: Some(10),
            ..via
        };
        let n = write_record(&mut a, &s.vin, s.applied_seq, s.trusted_time, &via).unwrap();
        let back = PersistedState::decode(&a[..n]).unwrap();
        assert_eq!(back.grants.len(), 1);
        assert_eq!(back.grants[0].service_id.as_str(), "power-boost");
        // Loading it back gives the same compact state; another VIN's record is not taken.
        let mut loaded = AppliedState::default();
        let n = write_record(
            &mut a,
            &s.vin,
            42,
            5,
            &AppliedGrants {
                active_at: None,
                ..via
            },
        )
        .unwrap();
        assert!(matches!(
            load_record(&a[..n], &s.vin, &CATALOG, &mut loaded),
            Ok(Loaded::Restored { dropped: false })
        ));
        assert_eq!(loaded.grants, compact.grants);
        assert_eq!((loaded.applied_seq, loaded.trusted_time), (42, 5));
        let other: Vin = "WVWZZZ1JZXW000002".parse().unwrap();
        let mut untouched = AppliedState::default();
        assert!(matches!(
            load_record(&a[..n], &other, &CATALOG, &mut untouched),
            Ok(Loaded::WrongVin)
        ));
        assert_eq!(untouched, AppliedState::default());
    }
}
