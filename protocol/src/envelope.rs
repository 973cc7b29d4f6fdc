//! The signed envelope: header, payload, signature.
//!
//! ```text
//! offset  size  field
//! 0       8     domain tag: "caas-cmd" (command) or "caas-rpt" (report)
//! 8       1     format version (1)
//! 9       8     signer key id: SHA-512("caas-key-id" || public key)[0..8]
//! 17      2     payload length, u16 little-endian
//! 19      n     payload: the postcard encoding of a Command or a Report
//! 19+n    64    Ed25519 signature over bytes [0, 19+n)
//! ```
//!
//! The signature covers the tag, so a report can never pass for a command or the other way
//! round, and covers the exact payload bytes, so there is no re-encoding ambiguity. Payloads
//! are decoded only after the signature verifies.

use core::fmt;
use ed25519_dalek::Signer;
use sha2::{Digest, Sha512};

use crate::keys::{SigningKey, VerifyingKey};
use crate::messages::{Command, Report, MAX_COMMAND_SIZE, MAX_REPORT_SIZE};
use crate::reject::RejectCode;

/// The envelope format this crate writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// Bytes before the payload.
pub const FRAME_HEADER_SIZE: usize = 19;
/// Bytes of the trailing signature.
pub const SIGNATURE_SIZE: usize = 64;
/// Largest command frame; a car refuses anything longer with [`RejectCode::TooLarge`].
pub const MAX_COMMAND_FRAME_SIZE: usize = FRAME_HEADER_SIZE + MAX_COMMAND_SIZE + SIGNATURE_SIZE;
/// Largest report frame; a gateway refuses anything longer.
pub const MAX_REPORT_FRAME_SIZE: usize = FRAME_HEADER_SIZE + MAX_REPORT_SIZE + SIGNATURE_SIZE;
/// Largest frame of either kind.
pub const MAX_FRAME_SIZE: usize = if MAX_COMMAND_FRAME_SIZE > MAX_REPORT_FRAME_SIZE {
    MAX_COMMAND_FRAME_SIZE
} else {
    MAX_REPORT_FRAME_SIZE
};

const COMMAND_TAG: &[u8; 8] = b"caas-cmd";
const REPORT_TAG: &[u8; 8] = b"caas-rpt";
const KEY_ID_CONTEXT: &[u8] = b"caas-key-id";

/// Which kind of message a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// Gateway to car.
    Command,
    /// Car to gateway.
    Report,
}

impl FrameKind {
    fn tag(self) -> &'static [u8; 8] {
        match self {
            FrameKind::Command => COMMAND_TAG,
            FrameKind::Report => REPORT_TAG,
        }
    }

    fn max_frame(self) -> usize {
        match self {
            FrameKind::Command => MAX_COMMAND_FRAME_SIZE,
            FrameKind::Report => MAX_REPORT_FRAME_SIZE,
        }
    }
}

/// The short name of a public key carried in every frame.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    /// The id of `key`: the first 8 bytes of SHA-512("caas-key-id" || key).
    pub fn of(key: &VerifyingKey) -> Self {
        let digest = Sha512::new()
            .chain_update(KEY_ID_CONTEXT)
            .chain_update(key.as_bytes())
            .finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        KeyId(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// A public key a verifier trusts, with its precomputed id (and, on hosts, optionally
/// tables that make verifying its signatures faster: [`TrustedKey::with_tables`]).
#[derive(Clone, Copy)]
pub struct TrustedKey {
    /// The key's id as frames carry it.
    pub id: KeyId,
    /// The key.
    pub key: VerifyingKey,
    tables: Tables,
}

impl TrustedKey {
    /// Trusts `key`.
    pub fn new(key: VerifyingKey) -> Self {
        TrustedKey {
            id: KeyId::of(&key),
            key,
            tables: Tables::default(),
        }
    }

    /// Trusts `key` and verifies its signatures with tables made for it, in about a quarter
    /// less time, with the same answers: for a key that signs many frames in this process (a
    /// car's gateway key). Each key's tables are made once per process (about 30 KiB, kept
    /// until it exits), for at most [`crate::MAX_KEYS_WITH_TABLES`] keys; beyond that this
    /// is [`TrustedKey::new`].
    #[cfg(feature = "std")]
    pub fn with_tables(key: VerifyingKey) -> Self {
        TrustedKey {
            tables: crate::hostverify::tables_for(&key),
            ..TrustedKey::new(key)
        }
    }

    /// Whether this key was given verification tables.
    #[cfg(feature = "std")]
    pub fn has_tables(&self) -> bool {
        self.tables.is_some()
    }

    /// Verifies `signature` over `signed` strictly (as [`RawFrame::verify`]).
    fn verify(&self, signed: &[u8], signature: &[u8; SIGNATURE_SIZE]) -> Result<(), RejectCode> {
        verify_signature(self.tables, &self.key, signed, signature)
    }
}

/// A trusted key's verification tables: made on hosts only ([`crate::hostverify`]).
#[cfg(feature = "std")]
type Tables = Option<&'static crate::hostverify::KeyTables>;
#[cfg(not(feature = "std"))]
type Tables = NoTables;

/// Microcontrollers verify without tables.
#[cfg(not(feature = "std"))]
#[derive(Clone, Copy, Default)]
struct NoTables;

/// Ed25519 `verify_strict`: on hosts [`crate::hostverify`]'s (the same answers for less work,
/// less still with `tables`), on microcontrollers ed25519-dalek's.
fn verify_signature(
    tables: Tables,
    key: &VerifyingKey,
    signed: &[u8],
    signature: &[u8; SIGNATURE_SIZE],
) -> Result<(), RejectCode> {
    #[cfg(feature = "std")]
    let valid = crate::hostverify::verify(tables, key, signed, signature);
    #[cfg(not(feature = "std"))]
    let valid = {
        let NoTables = tables;
        key.verify_strict(signed, &ed25519_dalek::Signature::from_bytes(signature))
            .is_ok()
    };
    if valid {
        Ok(())
    } else {
        Err(RejectCode::BadSignature)
    }
}

/// Two trusted keys are equal when their keys are (tables or not).
impl PartialEq for TrustedKey {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for TrustedKey {}

impl fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustedKey")
            .field("id", &self.id)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// A frame split into its parts, not yet verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawFrame<'a> {
    /// The kind its tag names.
    pub kind: FrameKind,
    /// The format version byte.
    pub version: u8,
    /// The signer's key id.
    pub key_id: KeyId,
    /// The payload bytes.
    pub payload: &'a [u8],
    /// The bytes the signature covers (header and payload).
    pub signed: &'a [u8],
    /// The signature.
    pub signature: [u8; SIGNATURE_SIZE],
}

impl RawFrame<'_> {
    /// Verifies the signature (strictly: no malleable or small-order signatures or keys).
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), RejectCode> {
        verify_signature(Tables::default(), key, self.signed, &self.signature)
    }
}

/// Splits a frame of `expected` kind into its parts, checking length, tag and version.
/// Nothing here is trusted yet; use [`open_command`] or [`open_report`] to verify and decode.
pub fn parse_frame(frame: &[u8], expected: FrameKind) -> Result<RawFrame<'_>, RejectCode> {
    if frame.len() > expected.max_frame() {
        return Err(RejectCode::TooLarge);
    }
    if frame.len() < FRAME_HEADER_SIZE + SIGNATURE_SIZE {
        return Err(RejectCode::Malformed);
    }
    let kind = match &frame[..8] {
        t if t == COMMAND_TAG => FrameKind::Command,
        t if t == REPORT_TAG => FrameKind::Report,
        _ => return Err(RejectCode::Malformed),
    };
    if kind != expected {
        return Err(RejectCode::Malformed);
    }
    let version = frame[8];
    if version != FORMAT_VERSION {
        return Err(RejectCode::UnsupportedVersion);
    }
    let mut key_id = [0u8; 8];
    key_id.copy_from_slice(&frame[9..17]);
    let payload_len = usize::from(u16::from_le_bytes([frame[17], frame[18]]));
    if frame.len() != FRAME_HEADER_SIZE + payload_len + SIGNATURE_SIZE {
        return Err(RejectCode::Malformed);
    }
    let signed_end = FRAME_HEADER_SIZE + payload_len;
    let mut signature = [0u8; SIGNATURE_SIZE];
    signature.copy_from_slice(&frame[signed_end..]);
    Ok(RawFrame {
        kind,
        version,
        key_id: KeyId(key_id),
        payload: &frame[FRAME_HEADER_SIZE..signed_end],
        signed: &frame[..signed_end],
        signature,
    })
}

/// Why a message could not be sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SealError {
    /// The output buffer is too small (size it with `MAX_*_FRAME_SIZE`).
    BufferTooSmall,
    /// The message breaks a structural rule ([`Command::check_structure`]).
    Invalid(RejectCode),
}

impl fmt::Display for SealError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SealError::BufferTooSmall => f.write_str("output buffer too small for the frame"),
            SealError::Invalid(code) => write!(f, "message is not valid: {code}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for SealError {}

fn seal<'b, T: serde::Serialize>(
    kind: FrameKind,
    msg: &T,
    key: &SigningKey,
    buf: &'b mut [u8],
) -> Result<&'b [u8], SealError> {
    let payload_len = encode_payload(msg, buf)?;
    sign_in_place(kind, payload_len, key, buf)
}

/// Encodes `msg` at `buf[FRAME_HEADER_SIZE..]`, where its frame's payload goes.
fn encode_payload<T: serde::Serialize>(msg: &T, buf: &mut [u8]) -> Result<usize, SealError> {
    if buf.len() < FRAME_HEADER_SIZE + SIGNATURE_SIZE {
        return Err(SealError::BufferTooSmall);
    }
    Ok(postcard::to_slice(msg, &mut buf[FRAME_HEADER_SIZE..])
        .map_err(|_| SealError::BufferTooSmall)?
        .len())
}

/// Writes the header in front of the payload at `buf[FRAME_HEADER_SIZE..][..payload_len]`
/// and the signature after it.
fn sign_in_place<'b>(
    kind: FrameKind,
    payload_len: usize,
    key: &SigningKey,
    buf: &'b mut [u8],
) -> Result<&'b [u8], SealError> {
    let signed_end = FRAME_HEADER_SIZE + payload_len;
    let frame_len = signed_end + SIGNATURE_SIZE;
    if frame_len > buf.len() {
        return Err(SealError::BufferTooSmall);
    }
    // The bounds in messages.rs keep every valid message under the frame maximum.
    let len16 = u16::try_from(payload_len).map_err(|_| SealError::Invalid(RejectCode::TooLarge))?;
    buf[..8].copy_from_slice(kind.tag());
    buf[8] = FORMAT_VERSION;
    buf[9..17].copy_from_slice(&KeyId::of(&key.verifying_key()).0);
    buf[17..19].copy_from_slice(&len16.to_le_bytes());
    let signature = key.sign(&buf[..signed_end]);
    buf[signed_end..frame_len].copy_from_slice(&signature.to_bytes());
    Ok(&buf[..frame_len])
}

/// Encodes and signs a command into `buf`, returning the frame.
pub fn seal_command<'b>(
    cmd: &Command,
    key: &SigningKey,
    buf: &'b mut [u8],
) -> Result<&'b [u8], SealError> {
    cmd.check_structure().map_err(SealError::Invalid)?;
    seal(FrameKind::Command, cmd, key, buf)
}

/// Encodes and signs a report into `buf`, returning the frame.
pub fn seal_report<'b>(
    report: &Report,
    key: &SigningKey,
    buf: &'b mut [u8],
) -> Result<&'b [u8], SealError> {
    report.check_structure().map_err(SealError::Invalid)?;
    seal(FrameKind::Report, report, key, buf)
}

/// [`seal_report`] in two calls, for a signer short of stack (a microcontroller): this one
/// checks the report's structure and encodes it where its frame's payload goes
/// (`buf[FRAME_HEADER_SIZE..]`) and returns the payload's length; then
/// [`sign_report_in_place`] signs it. Each returns before the next begins, so the `Report`
/// value is off the stack before Ed25519 signing (about 7 KiB of stack) starts. The two
/// together produce exactly the frame [`seal_report`] produces.
#[inline(never)]
pub fn encode_report_payload(report: &Report, buf: &mut [u8]) -> Result<usize, SealError> {
    report.check_structure().map_err(SealError::Invalid)?;
    encode_payload(report, buf)
}

/// Signs the report payload [`encode_report_payload`] left in `buf` (`payload_len` bytes at
/// `buf[FRAME_HEADER_SIZE..]`): writes the header in front and the signature behind, and
/// returns the frame. The payload must be an encoded [`Report`]; a gateway opening the frame
/// decodes and checks it like any other.
#[inline(never)]
pub fn sign_report_in_place<'b>(
    payload_len: usize,
    key: &SigningKey,
    buf: &'b mut [u8],
) -> Result<&'b [u8], SealError> {
    sign_in_place(FrameKind::Report, payload_len, key, buf)
}

fn decode<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, RejectCode> {
    let (value, rest) = postcard::take_from_bytes(payload).map_err(|_| RejectCode::Malformed)?;
    if !rest.is_empty() {
        return Err(RejectCode::Malformed);
    }
    Ok(value)
}

/// Verifies a command frame against the trusted gateway keys and decodes it.
///
/// Checks, in order: size, tag, version, layout, key id, signature, payload, structure.
/// What it does not check (VIN, sequence, time, features) needs the car's state: see
/// [`crate::check_command`].
pub fn open_command(frame: &[u8], trusted: &[TrustedKey]) -> Result<Command, RejectCode> {
    let payload = verify_command(frame, trusted)?;
    let cmd: Command = decode(payload)?;
    cmd.check_structure()?;
    Ok(cmd)
}

/// The first half of [`open_command`]: checks a command frame's envelope (size, tag, version,
/// layout), finds its key among the trusted gateway keys and verifies the signature, then
/// returns the payload, not yet decoded. Decode it with [`crate::CommandView::parse`] (in
/// place) or as a [`Command`]; [`crate::open_command_view`] does both.
///
/// Not inlined, so that Ed25519's stack (about 7.8 KiB on a Cortex-M4) is gone before the
/// caller decodes anything.
#[inline(never)]
pub fn verify_command<'a>(frame: &'a [u8], trusted: &[TrustedKey]) -> Result<&'a [u8], RejectCode> {
    let raw = parse_frame(frame, FrameKind::Command)?;
    let key = trusted
        .iter()
        .find(|k| k.id == raw.key_id)
        .ok_or(RejectCode::UnknownKey)?;
    key.verify(raw.signed, &raw.signature)?;
    Ok(raw.payload)
}

/// Verifies a report frame with the car's key and decodes it. The caller must still check
/// that the report's VIN is the car whose key it used.
pub fn open_report(frame: &[u8], car_key: &TrustedKey) -> Result<Report, RejectCode> {
    let raw = parse_frame(frame, FrameKind::Report)?;
    if raw.key_id != car_key.id {
        return Err(RejectCode::UnknownKey);
    }
    car_key.verify(raw.signed, &raw.signature)?;
    let report: Report = decode(raw.payload)?;
    report.check_structure()?;
    Ok(report)
}

/// Frames at least this many are verified as one Ed25519 batch by [`open_reports`]; fewer
/// are verified one by one (a batch of one saves nothing).
#[cfg(feature = "batch")]
pub const MIN_BATCH: usize = 2;

/// Opens many report frames at once, each with its car's key: the same answer as
/// [`open_report`] for every frame, for about half the verification work.
///
/// The signatures that can be are checked as one Ed25519 batch (ed25519-dalek's
/// `verify_batch`, random 128-bit coefficients derived from all the inputs). A batch only
/// takes frames a strict verifier would not refuse before doing any arithmetic: a
/// canonical, not small-order `R`, a key that is not small-order (`s` must be canonical in
/// both). If the batch fails, every frame in it is verified alone with `verify_strict`, so a
/// bad signature never passes and one bad frame costs the others only time. What a batch
/// accepts and `verify_strict` would refuse needs the signer's secret key (an `R` or key with
/// a torsion component), so it lets nobody claim another car's report.
#[cfg(feature = "batch")]
pub fn open_reports(frames: &[(&[u8], &TrustedKey)]) -> std::vec::Vec<Result<Report, RejectCode>> {
    let mut results = std::vec![Err(RejectCode::BadSignature); frames.len()];
    let mut batch: std::vec::Vec<(usize, RawFrame<'_>, &TrustedKey)> = std::vec::Vec::new();
    for (i, (frame, key)) in frames.iter().enumerate() {
        let raw = match parse_frame(frame, FrameKind::Report) {
            Ok(raw) if raw.key_id == key.id => raw,
            Ok(_) => {
                results[i] = Err(RejectCode::UnknownKey);
                continue;
            }
            Err(e) => {
                results[i] = Err(e);
                continue;
            }
        };
        if batchable(&raw.signature, &key.key) {
            batch.push((i, raw, key));
        } else {
            results[i] = key
                .verify(raw.signed, &raw.signature)
                .and_then(|()| decode_report(raw.payload));
        }
    }
    let verified = batch.len() >= MIN_BATCH && {
        let messages: std::vec::Vec<&[u8]> = batch.iter().map(|(_, raw, _)| raw.signed).collect();
        let signatures: std::vec::Vec<ed25519_dalek::Signature> = batch
            .iter()
            .map(|(_, raw, _)| ed25519_dalek::Signature::from_bytes(&raw.signature))
            .collect();
        let keys: std::vec::Vec<VerifyingKey> = batch.iter().map(|(_, _, k)| k.key).collect();
        ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok()
    };
    for (i, raw, key) in batch {
        results[i] = if verified {
            decode_report(raw.payload)
        } else {
            key.verify(raw.signed, &raw.signature)
                .and_then(|()| decode_report(raw.payload))
        };
    }
    results
}

#[cfg(feature = "batch")]
fn decode_report(payload: &[u8]) -> Result<Report, RejectCode> {
    let report: Report = decode(payload)?;
    report.check_structure()?;
    Ok(report)
}

/// Whether a batch may check this signature: `verify_strict` refuses a small-order key and a
/// small-order `R` before any arithmetic, and only accepts a canonical `R` (it compares
/// encodings); a batch compares points, so those frames are left to `verify_strict`.
#[cfg(feature = "batch")]
fn batchable(signature: &[u8; SIGNATURE_SIZE], key: &VerifyingKey) -> bool {
    let mut r = [0u8; 32];
    r.copy_from_slice(&signature[..32]);
    canonical_y(&r) && !small_order_encodings().contains(&r) && !key.is_weak()
}

/// Whether the y coordinate of an encoded point (sign bit aside) is below p = 2^255 - 19.
#[cfg(feature = "std")]
pub(crate) fn canonical_y(point: &[u8; 32]) -> bool {
    let top = point[31] & 0x7f;
    !(top == 0x7f && point[1..31].iter().all(|b| *b == 0xff) && point[0] >= 0xed)
}

/// The encodings of the eight small-order points, and the sign-flipped encodings of the two
/// with x = 0 (which decode to the same points).
#[cfg(feature = "batch")]
fn small_order_encodings() -> &'static [[u8; 32]; 10] {
    static ENCODINGS: std::sync::OnceLock<[[u8; 32]; 10]> = std::sync::OnceLock::new();
    ENCODINGS.get_or_init(|| {
        let mut out = [[0u8; 32]; 10];
        for (slot, point) in out
            .iter_mut()
            .zip(curve25519_dalek::constants::EIGHT_TORSION)
        {
            *slot = point.compress().to_bytes();
        }
        // x = 0 for the identity (y = 1) and for (0, -1) (y = p - 1): a set sign bit
        // decodes to the same point.
        out[8][0] = 1;
        out[8][31] = 0x80;
        out[9] = [0xff; 32];
        out[9][0] = 0xec;
        out
    })
}

#[cfg(all(test, feature = "batch"))]
mod batch_tests {
    use super::*;
    use curve25519_dalek::edwards::CompressedEdwardsY;

    #[test]
    fn small_order_encodings_are_the_small_order_points() {
        for enc in small_order_encodings() {
            let point = CompressedEdwardsY(*enc).decompress();
            assert!(point.is_some_and(|p| p.is_small_order()), "{enc:02x?}");
            assert!(canonical_y(enc));
        }
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(small_order_encodings().contains(&identity));
    }

    #[test]
    fn y_at_or_above_p_is_not_canonical() {
        let mut p = [0xff; 32];
        p[0] = 0xed;
        p[31] = 0x7f;
        assert!(!canonical_y(&p));
        let mut below = p;
        below[0] = 0xec;
        assert!(canonical_y(&below));
        below[31] |= 0x80; // the sign bit is not part of y
        assert!(canonical_y(&below));
    }
}
