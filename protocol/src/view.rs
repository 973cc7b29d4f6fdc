//! Commands read in place, for cars short of RAM.
//!
//! [`crate::open_command`] returns a whole [`Command`]: about 3.6 KiB on a 32-bit target
//! (eight grants of 432 bytes), moved several times while it is decoded. A microcontroller
//! with 16 KiB of RAM cannot hold that on top of Ed25519's own stack (about 7.8 KiB for
//! `verify_strict`). This module does the same work without ever materialising a `Command`:
//!
//! 1. [`crate::verify_command`] checks the envelope and the signature and returns the
//!    payload bytes; it returns before anything is decoded, so its stack is gone;
//! 2. [`CommandView::parse`] decodes the small fields, checks every grant one at a time (one
//!    [`Grant`] on the stack at once) and keeps the grants in their encoding;
//!    [`EncodedGrants::iter`] decodes them again, one by one, whenever they are needed.
//!
//! [`open_command_view`] does both, and [`crate::check_command_view`] applies the car-side
//! rules. Together they accept exactly the frames [`crate::open_command`] and
//! [`crate::check_command`] accept, with the same codes (the tests hold them to each other):
//! the decoding is postcard's own, piece by piece, with the very types `Command` is made of.

use core::fmt;
use serde::de::{Deserialize, Deserializer, Error as _, SeqAccess, Visitor};

use crate::envelope::{verify_command, TrustedKey};
use crate::messages::{
    Command, CommandBody, DesiredState, Grant, RequestId, MAX_GRANTS, MAX_SETTLES,
};
use crate::names::ServiceId;
use crate::reject::RejectCode;
use crate::vin::Vin;

/// Verifies a command frame against the trusted gateway keys and reads it in place: the same
/// checks, in the same order and with the same codes, as [`crate::open_command`].
pub fn open_command_view<'a>(
    frame: &'a [u8],
    trusted: &[TrustedKey],
) -> Result<CommandView<'a>, RejectCode> {
    let payload = verify_command(frame, trusted)?;
    CommandView::parse(payload)
}

/// A command read in place from its payload: the small fields decoded, the grants still
/// encoded (borrowed from the payload). About 80 bytes, against 3.6 KiB for a [`Command`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandView<'a> {
    /// The one car this command is for.
    pub vin: Vin,
    /// Only grows for a car.
    pub seq: u64,
    /// When the gateway signed it (Unix seconds, UTC).
    pub issued_at: u64,
    /// After this (Unix seconds, UTC) the car must refuse it.
    pub not_after: u64,
    /// What it asks for.
    pub body: BodyView<'a>,
}

/// What a [`CommandView`] asks for (see [`CommandBody`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyView<'a> {
    /// Make this the car's whole set of optional features.
    SetState(DesiredView<'a>),
    /// Answer with a status report echoing `nonce`.
    QueryStatus {
        /// Echoed in the report's [`crate::Outcome::Status`].
        nonce: u64,
    },
}

/// A [`DesiredState`] read in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DesiredView<'a> {
    /// The encoded `settles` list (its length prefix included).
    settles: &'a [u8],
    grants: EncodedGrants<'a>,
    grants_offset: usize,
}

impl<'a> DesiredView<'a> {
    /// The requests this state settles (at most [`MAX_SETTLES`], 132 bytes).
    pub fn settles(&self) -> heapless::Vec<RequestId, MAX_SETTLES> {
        postcard::take_from_bytes(self.settles)
            .map(|(settles, _)| settles)
            .unwrap_or_default()
    }

    /// The grants, still encoded.
    pub fn grants(&self) -> EncodedGrants<'a> {
        self.grants
    }

    /// Where the encoded grants ([`EncodedGrants::as_bytes`]) start in the payload, so a
    /// caller holding the frame can find them again after the borrow ends.
    pub fn grants_offset(&self) -> usize {
        self.grants_offset
    }
}

impl<'a> CommandView<'a> {
    /// Reads a verified command payload in place: decodes it exactly as [`Command`] decodes
    /// (no trailing bytes), and checks [`Command::check_structure`]'s rules. Refuses with
    /// [`RejectCode::Malformed`], as [`crate::open_command`] does. Not inlined: its
    /// temporaries (one [`Grant`] and the service ids seen so far, about 750 bytes) are gone
    /// when it returns.
    #[inline(never)]
    pub fn parse(payload: &'a [u8]) -> Result<Self, RejectCode> {
        let (vin, rest) = take::<Vin>(payload)?;
        let (seq, rest) = take::<u64>(rest)?;
        let (issued_at, rest) = take::<u64>(rest)?;
        let (not_after, rest) = take::<u64>(rest)?;
        // Postcard writes an enum's variant index as a u32 varint.
        let (variant, rest) = take::<u32>(rest)?;
        let (body, rest) = match variant {
            0 => {
                let (_, after_settles) = take::<heapless::Vec<RequestId, MAX_SETTLES>>(rest)?;
                let settles = &rest[..rest.len() - after_settles.len()];
                let grants_offset = payload.len() - after_settles.len();
                let (grants, rest) = EncodedGrants::take(after_settles)?;
                grants.check_structure()?;
                let desired = DesiredView {
                    settles,
                    grants,
                    grants_offset,
                };
                (BodyView::SetState(desired), rest)
            }
            1 => {
                let (nonce, rest) = take::<u64>(rest)?;
                (BodyView::QueryStatus { nonce }, rest)
            }
            _ => return Err(RejectCode::Malformed),
        };
        if !rest.is_empty() || issued_at > not_after {
            return Err(RejectCode::Malformed);
        }
        Ok(CommandView {
            vin,
            seq,
            issued_at,
            not_after,
            body,
        })
    }

    /// The whole [`Command`] (3.6 KiB: for hosts and tests, not for a microcontroller).
    pub fn to_command(&self) -> Command {
        let body = match &self.body {
            BodyView::QueryStatus { nonce } => CommandBody::QueryStatus { nonce: *nonce },
            BodyView::SetState(desired) => {
                let mut state = DesiredState {
                    settles: desired.settles(),
                    grants: heapless::Vec::new(),
                };
                for grant in desired.grants().iter() {
                    // Cannot overflow: the view holds at most MAX_GRANTS grants.
                    let _ = state.grants.push(grant);
                }
                CommandBody::SetState(state)
            }
        };
        Command {
            vin: self.vin,
            seq: self.seq,
            issued_at: self.issued_at,
            not_after: self.not_after,
            body,
        }
    }
}

/// A list of at most [`MAX_GRANTS`] grants kept in its postcard encoding (the encoding of a
/// `heapless::Vec<Grant, MAX_GRANTS>`: a varint count, then each grant), every grant known to
/// decode. The command payload carries one; the agent's stored record another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodedGrants<'a> {
    /// The whole encoding, count included.
    bytes: &'a [u8],
    /// Where the first grant starts in `bytes`.
    first: usize,
    count: usize,
}

impl<'a> EncodedGrants<'a> {
    /// Reads an encoded list of grants from the start of `input`, decoding every grant (one
    /// at a time) to check it keeps its types' bounds, and returns it with the bytes after
    /// it. Accepts exactly what decoding a `heapless::Vec<Grant, MAX_GRANTS>` accepts.
    pub fn take(input: &'a [u8]) -> Result<(Self, &'a [u8]), RejectCode> {
        let (count, after_count) = take_seq_len(input)?;
        // heapless refuses a ninth element; refusing the count itself is the same verdict.
        if count > MAX_GRANTS {
            return Err(RejectCode::Malformed);
        }
        let first = input.len() - after_count.len();
        let mut rest = after_count;
        for _ in 0..count {
            rest = skip_grant(rest)?;
        }
        let used = input.len() - rest.len();
        let grants = EncodedGrants {
            bytes: &input[..used],
            first,
            count,
        };
        Ok((grants, rest))
    }

    /// How many grants.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of the count in front of the first grant (1 when written canonically).
    pub fn count_len(&self) -> usize {
        self.first
    }

    /// The encoding (count and grants), ready to be copied into another postcard message.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The grants, decoded one at a time (each about 432 bytes on a 32-bit target).
    pub fn iter(&self) -> GrantIter<'a> {
        GrantIter {
            rest: self.bytes.get(self.first..).unwrap_or_default(),
            left: self.count,
        }
    }

    /// [`Command::check_structure`]'s rules for grants: each has at least one flag and no
    /// parameter name twice ([`Grant::check_structure`]), no service id appears twice.
    pub fn check_structure(&self) -> Result<(), RejectCode> {
        let mut seen: heapless::Vec<ServiceId, MAX_GRANTS> = heapless::Vec::new();
        for grant in self.iter() {
            grant.check_structure()?;
            if seen.contains(&grant.service_id) {
                return Err(RejectCode::Malformed);
            }
            seen.push(grant.service_id)
                .map_err(|_| RejectCode::Malformed)?;
        }
        Ok(())
    }
}

/// The grants of an [`EncodedGrants`], decoded one at a time.
#[derive(Debug, Clone)]
pub struct GrantIter<'a> {
    rest: &'a [u8],
    left: usize,
}

impl Iterator for GrantIter<'_> {
    type Item = Grant;

    fn next(&mut self) -> Option<Grant> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        match postcard::take_from_bytes::<Grant>(self.rest) {
            Ok((grant, rest)) => {
                self.rest = rest;
                Some(grant)
            }
            // Cannot happen: EncodedGrants::take decoded every grant already.
            Err(_) => {
                self.left = 0;
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.left))
    }
}

fn take<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<(T, &'a [u8]), RejectCode> {
    postcard::take_from_bytes(bytes).map_err(|_| RejectCode::Malformed)
}

/// Decodes one grant and drops it. Not inlined, so the 432-byte grant is a temporary of this
/// frame only.
#[inline(never)]
fn skip_grant(bytes: &[u8]) -> Result<&[u8], RejectCode> {
    take::<Grant>(bytes).map(|(_, rest)| rest)
}

/// Reads a postcard sequence's length prefix exactly as postcard does when it decodes the
/// sequence (a varint `usize`), leaving the elements unread.
fn take_seq_len(bytes: &[u8]) -> Result<(usize, &[u8]), RejectCode> {
    take::<SeqLen>(bytes).map(|(SeqLen(n), rest)| (n, rest))
}

/// A sequence's length, read by asking postcard's sequence access for its size and
/// consuming no element. Postcard answers `None` when fewer bytes remain than the length
/// claims elements; such a sequence cannot decode (every element takes a byte at least).
struct SeqLen(usize);

impl<'de> Deserialize<'de> for SeqLen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SeqLen;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sequence")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<SeqLen, A::Error> {
                seq.size_hint()
                    .map(SeqLen)
                    .ok_or_else(|| A::Error::custom("sequence longer than its input"))
            }
        }
        d.deserialize_seq(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{check_command, check_command_view, CheckContext, FeatureClass};
    use crate::envelope::{open_command, seal_command, FRAME_HEADER_SIZE, MAX_COMMAND_FRAME_SIZE};
    use crate::messages::{Param, MAX_FLAGS_PER_GRANT, MAX_PARAMS_PER_GRANT};
    use crate::names::FeatureFlag;
    use crate::{PlatformFeatures, SigningKey};
    use ed25519_dalek::Signer;
    use proptest::prelude::*;
    use std::vec::Vec;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[5; 32])
    }

    fn trusted() -> [TrustedKey; 1] {
        [TrustedKey::new(key().verifying_key())]
    }

    fn vin() -> Vin {
        "WVWZZZ1JZXW000001".parse().unwrap()
    }

    fn grant(id: &str, flags: &[&str], params: usize, ends_at: Option<u64>) -> Grant {
        let mut g = Grant::new(id.parse().unwrap());
        for f in flags {
            g.flags.push(f.parse().unwrap()).unwrap();
        }
        for i in 0..params {
            g.params
                .push(Param {
                    key: std::format!("k{i}").parse().unwrap(),
                    value: std::format!("value {i}").parse().unwrap(),
                })
                .unwrap();
        }
        g.ends_at = ends_at;
        g
    }

    fn command(grants: Vec<Grant>) -> Command {
        let mut desired = DesiredState::default();
        desired.settles.push(RequestId([7; 16])).unwrap();
        for g in grants {
            desired.grants.push(g).unwrap();
        }
        Command {
            vin: vin(),
            seq: 42,
            issued_at: 1_800_000_000,
            not_after: 1_800_000_600,
            body: CommandBody::SetState(desired),
        }
    }

    /// A frame around any payload, validly signed (so decoding is what is tested).
    fn sign_raw(payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::new();
        frame.extend_from_slice(b"caas-cmd");
        frame.push(1);
        frame.extend_from_slice(&trusted()[0].id.0);
        frame.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        frame.extend_from_slice(payload);
        let signature = key().sign(&frame);
        frame.extend_from_slice(&signature.to_bytes());
        frame
    }

    fn both(frame: &[u8]) -> (Result<Command, RejectCode>, Result<Command, RejectCode>) {
        let trusted = trusted();
        (
            open_command(frame, &trusted),
            open_command_view(frame, &trusted).map(|v| v.to_command()),
        )
    }

    #[test]
    fn a_view_reads_what_open_command_decodes() {
        let cmds = [
            command(std::vec![]),
            command(std::vec![
                grant("boost", &["power_boost"], 1, Some(1_800_000_100)),
                grant("seats", &["heated_seats", "snow_mode"], 0, None),
            ]),
            Command {
                body: CommandBody::QueryStatus { nonce: u64::MAX },
                ..command(std::vec![])
            },
        ];
        for cmd in cmds {
            let mut buf = [0u8; MAX_COMMAND_FRAME_SIZE];
            let frame = seal_command(&cmd, &key(), &mut buf).unwrap();
            let view = open_command_view(frame, &trusted()).unwrap();
            assert_eq!(view.to_command(), cmd);
            if let (BodyView::SetState(d), CommandBody::SetState(full)) = (&view.body, &cmd.body) {
                assert_eq!(d.grants().len(), full.grants.len());
                assert_eq!(d.settles(), full.settles);
                // The encoded grants are the grant list's own encoding, where it says.
                let payload = &frame[FRAME_HEADER_SIZE..frame.len() - 64];
                let own = postcard::to_allocvec(&full.grants).unwrap();
                assert_eq!(d.grants().as_bytes(), &own[..]);
                assert_eq!(
                    &payload[d.grants_offset()..d.grants_offset() + own.len()],
                    &own[..]
                );
            }
        }
    }

    #[test]
    fn the_largest_command_is_read_in_place() {
        let grants = (0..MAX_GRANTS)
            .map(|i| {
                let flags: Vec<std::string::String> = (0..MAX_FLAGS_PER_GRANT)
                    .map(|j| std::format!("{j}{}", "f".repeat(31)))
                    .collect();
                let flags: Vec<&str> = flags.iter().map(|s| s.as_str()).collect();
                let mut g = grant(
                    &std::format!("{i}{}", "s".repeat(31)),
                    &flags,
                    0,
                    Some(u64::MAX),
                );
                for j in 0..MAX_PARAMS_PER_GRANT {
                    g.params
                        .push(Param {
                            key: std::format!("{j}{}", "k".repeat(23)).parse().unwrap(),
                            value: "v".repeat(24).parse().unwrap(),
                        })
                        .unwrap();
                }
                g
            })
            .collect();
        let mut cmd = command(grants);
        cmd.seq = u64::MAX;
        let mut buf = [0u8; MAX_COMMAND_FRAME_SIZE];
        let frame = seal_command(&cmd, &key(), &mut buf).unwrap();
        assert!(frame.len() > 3_000);
        assert_eq!(
            open_command_view(frame, &trusted()).unwrap().to_command(),
            cmd
        );
    }

    #[test]
    fn structural_breakage_is_refused_like_open_command() {
        let base = command(std::vec![
            grant("a", &["power_boost"], 2, None),
            grant("b", &["snow_mode"], 0, None),
        ]);
        let mut breakages = Vec::new();
        let mut c = base.clone();
        c.not_after = c.issued_at - 1;
        breakages.push(c);
        for which in 0..3 {
            let mut c = base.clone();
            if let CommandBody::SetState(d) = &mut c.body {
                match which {
                    0 => d.grants[1].flags.clear(),
                    1 => d.grants[1].service_id = d.grants[0].service_id.clone(),
                    _ => d.grants[0].params[1].key = d.grants[0].params[0].key.clone(),
                }
            }
            breakages.push(c);
        }
        for c in breakages {
            let frame = sign_raw(&postcard::to_allocvec(&c).unwrap());
            let (full, view) = both(&frame);
            assert_eq!(full, Err(RejectCode::Malformed));
            assert_eq!(view, Err(RejectCode::Malformed), "{c:?}");
        }
        // Nine grants: more than the bound.
        let nine: heapless::Vec<Grant, 9> = (0..9)
            .map(|i| grant(&std::format!("g{i}"), &["power_boost"], 0, None))
            .collect();
        let mut payload = postcard::to_allocvec(&(vin(), 1u64, 2u64, 3u64, 0u8)).unwrap();
        payload.push(0);
        payload.extend(postcard::to_allocvec(&nine).unwrap());
        let (full, view) = both(&sign_raw(&payload));
        assert_eq!(full, Err(RejectCode::Malformed));
        assert_eq!(view, Err(RejectCode::Malformed));
        // An unknown body variant, trailing bytes.
        let mut payload = postcard::to_allocvec(&base).unwrap();
        payload.push(0);
        assert_eq!(both(&sign_raw(&payload)).1, Err(RejectCode::Malformed));
        let mut payload = postcard::to_allocvec(&(vin(), 1u64, 2u64, 3u64)).unwrap();
        payload.extend([2, 0]);
        assert_eq!(
            both(&sign_raw(&payload)),
            (Err(RejectCode::Malformed), Err(RejectCode::Malformed))
        );
    }

    #[test]
    fn non_canonical_varints_are_read_as_postcard_reads_them() {
        // The grant count written as a two-byte varint (0x81 0x00 = 1).
        let cmd = command(std::vec![grant("a", &["power_boost"], 1, None)]);
        let mut payload = postcard::to_allocvec(&cmd).unwrap();
        let at = postcard::to_allocvec(&(vin(), 42u64, 1_800_000_000u64, 1_800_000_600u64, 0u8))
            .unwrap()
            .len()
            + 1
            + RequestId::LEN;
        assert_eq!(payload[at], 1);
        payload[at] = 0x81;
        payload.insert(at + 1, 0);
        let (full, view) = both(&sign_raw(&payload));
        assert_eq!(full, Ok(cmd.clone()));
        assert_eq!(view, Ok(cmd));
    }

    #[test]
    fn envelope_failures_have_open_commands_codes() {
        let cmd = command(std::vec![grant("a", &["power_boost"], 1, None)]);
        let mut buf = [0u8; MAX_COMMAND_FRAME_SIZE];
        let frame = seal_command(&cmd, &key(), &mut buf).unwrap().to_vec();
        let mut tampered = frame.clone();
        tampered[FRAME_HEADER_SIZE + 3] ^= 1;
        let other = [TrustedKey::new(
            SigningKey::from_bytes(&[6; 32]).verifying_key(),
        )];
        let long = std::vec![0u8; MAX_COMMAND_FRAME_SIZE + 1];
        for f in [&tampered[..], &frame[..10], &long[..]] {
            let (full, view) = both(f);
            assert!(full.is_err());
            assert_eq!(full, view);
        }
        assert_eq!(
            open_command_view(&frame, &other).map(|v| v.seq),
            Err(RejectCode::UnknownKey)
        );
    }

    struct Platform;
    impl PlatformFeatures for Platform {
        fn classify(&self, flag: &FeatureFlag) -> FeatureClass {
            match flag.as_str() {
                "abs" => FeatureClass::Base,
                "power_boost" | "snow_mode" | "heated_seats" => FeatureClass::Optional,
                _ => FeatureClass::Unknown,
            }
        }
    }

    fn flag_name() -> impl Strategy<Value = &'static str> {
        prop::sample::select(&["power_boost", "snow_mode", "heated_seats", "abs", "radio"][..])
    }

    fn grants() -> impl Strategy<Value = Vec<Grant>> {
        prop::collection::vec(
            (
                prop::collection::vec(flag_name(), 1..=MAX_FLAGS_PER_GRANT),
                0..=MAX_PARAMS_PER_GRANT,
                prop::option::of(any::<u64>()),
            ),
            0..=MAX_GRANTS,
        )
        .prop_map(|specs| {
            specs
                .into_iter()
                .enumerate()
                .map(|(i, (flags, params, end))| {
                    grant(&std::format!("svc{i}"), &flags, params, end)
                })
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Any payload byte changed (then validly signed): both readers give one verdict,
        /// and the car-side rules one answer.
        #[test]
        fn views_agree_with_open_command_on_any_payload(
            grants in grants(),
            query in any::<bool>(),
            flip in any::<(usize, u8)>(),
            mutate in any::<bool>(),
            last in 0..100u64,
            now_delta in 0..1000u64,
        ) {
            let mut cmd = command(grants);
            if query {
                cmd.body = CommandBody::QueryStatus { nonce: 9 };
            }
            let mut payload = postcard::to_allocvec(&cmd).unwrap();
            if mutate {
                let i = flip.0 % payload.len();
                payload[i] ^= flip.1.max(1);
            }
            let frame = sign_raw(&payload);
            let (full, view) = both(&frame);
            prop_assert_eq!(&full, &view);
            let vin = vin();
            if let Ok(full) = full {
                let v = open_command_view(&frame, &trusted()).unwrap();
                let ctx = CheckContext {
                    vin: &vin,
                    last_applied_seq: last,
                    now: 1_800_000_000 - 500 + now_delta,
                    platform: &Platform,
                };
                prop_assert_eq!(check_command(&full, &ctx), check_command_view(&v, &ctx));
            }
        }
    }
}
