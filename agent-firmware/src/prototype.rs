//! Evidence for a change the agent core and the protocol should make (README, "Why RAM is
//! over"): decoding a command *in place, one grant at a time* instead of by value. Not used
//! by the agent; the scenario's benchmark step measures its stack next to `open_command`'s.
//!
//! The payload layout is postcard's encoding of `Command` (protocol/SPEC.md): VIN, three
//! varints, the body's variant index, then for `SetState` the settled request ids and the
//! grants as a length-prefixed sequence. Only the grants are large (432 bytes each, 8 at
//! most), so they are decoded one by one straight into the destination's vector.

use caas_protocol::{
    parse_frame, Command, CommandBody, FrameKind, Grant, RequestId, Vin, MAX_GRANTS, MAX_SETTLES,
};

/// Decodes the payload of an (already verified) command frame into `out`, grant by grant.
/// `None` when it does not decode; `out` is then unspecified.
#[inline(never)]
pub(crate) fn decode_command_in_place(frame: &[u8], out: &mut Command) -> Option<()> {
    let raw = parse_frame(frame, FrameKind::Command).ok()?;
    let (vin, rest): (Vin, _) = postcard::take_from_bytes(raw.payload).ok()?;
    let (seq, rest): (u64, _) = postcard::take_from_bytes(rest).ok()?;
    let (issued_at, rest): (u64, _) = postcard::take_from_bytes(rest).ok()?;
    let (not_after, rest): (u64, _) = postcard::take_from_bytes(rest).ok()?;
    let (variant, rest): (u32, _) = postcard::take_from_bytes(rest).ok()?;
    out.vin = vin;
    out.seq = seq;
    out.issued_at = issued_at;
    out.not_after = not_after;
    if variant != 0 {
        // QueryStatus is small: decode it whole.
        let (nonce, rest): (u64, _) = postcard::take_from_bytes(rest).ok()?;
        out.body = CommandBody::QueryStatus { nonce };
        return rest.is_empty().then_some(());
    }
    if !matches!(out.body, CommandBody::SetState(_)) {
        out.body = CommandBody::SetState(Default::default());
    }
    let CommandBody::SetState(desired) = &mut out.body else {
        return None;
    };
    let (settles, rest): (heapless::Vec<RequestId, MAX_SETTLES>, _) =
        postcard::take_from_bytes(rest).ok()?;
    desired.settles = settles;
    desired.grants.clear();
    let (count, mut rest): (u32, _) = postcard::take_from_bytes(rest).ok()?;
    if count as usize > MAX_GRANTS {
        return None;
    }
    for _ in 0..count {
        let (grant, tail): (Grant, _) = postcard::take_from_bytes(rest).ok()?;
        desired.grants.push(grant).ok()?;
        rest = tail;
    }
    rest.is_empty().then_some(())
}
