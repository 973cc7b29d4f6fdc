//! The rules a car applies to a verified command before obeying it.
//!
//! They live here, beside the format, so that the agent core, the firmware and the
//! simulator cannot disagree on them, and so that every rejection code is tested once.

use crate::messages::{Command, CommandBody, Grant, MAX_GRANTS};
use crate::names::FeatureFlag;
use crate::reject::RejectCode;
use crate::view::{BodyView, CommandView};
use crate::vin::Vin;

/// How far ahead of the car's trusted clock a command's `issued_at` may be (seconds).
/// Cars keep their clocks with the network; five minutes covers drift and slow delivery.
pub const MAX_FUTURE_SKEW_SECS: u64 = 300;

/// What a car's platform says about a feature flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureClass {
    /// Dormant in the firmware; commands may switch it on and off.
    Optional,
    /// Part of what the car was sold with; no command may touch it.
    Base,
    /// Not a feature of this platform.
    Unknown,
}

/// A car platform's feature catalogue.
pub trait PlatformFeatures {
    /// Classifies `flag`.
    fn classify(&self, flag: &FeatureFlag) -> FeatureClass;
}

/// The car's side of the checks.
pub struct CheckContext<'a> {
    /// This car.
    pub vin: &'a Vin,
    /// The sequence number of the newest applied command (0 when none).
    pub last_applied_seq: u64,
    /// The car's trusted time (Unix seconds).
    pub now: u64,
    /// The platform's feature catalogue.
    pub platform: &'a dyn PlatformFeatures,
}

/// Applies the car-side rules to a verified, decoded command: right car, not expired, not
/// from the future, not a replay (for `SetState`), only optional features of this platform.
/// `Ok` means the car should obey it; `Err` carries the code to report.
pub fn check_command(cmd: &Command, ctx: &CheckContext<'_>) -> Result<(), RejectCode> {
    check_header(&cmd.vin, cmd.issued_at, cmd.not_after, ctx)?;
    match &cmd.body {
        CommandBody::QueryStatus { .. } => Ok(()),
        CommandBody::SetState(desired) => {
            check_seq(cmd.seq, ctx)?;
            for flag in desired.grants.iter().flat_map(|g| g.flags.iter()) {
                check_flag(flag, ctx)?;
            }
            Ok(())
        }
    }
}

/// [`check_command`] for a command read in place ([`crate::CommandView`]): the same rules in
/// the same order, reading the grants one at a time.
pub fn check_command_view(
    view: &CommandView<'_>,
    ctx: &CheckContext<'_>,
) -> Result<(), RejectCode> {
    check_header(&view.vin, view.issued_at, view.not_after, ctx)?;
    match &view.body {
        BodyView::QueryStatus { .. } => Ok(()),
        BodyView::SetState(desired) => {
            check_seq(view.seq, ctx)?;
            for grant in desired.grants().iter() {
                for flag in grant.flags.iter() {
                    check_flag(flag, ctx)?;
                }
            }
            Ok(())
        }
    }
}

/// Which grants name a feature no command may switch on this car (a flag of its base
/// platform, or one it does not have): bit `i` stands for the `i`-th grant. A car refusing
/// a command for such a grant names them all in its report
/// ([`crate::Outcome::GrantsRefused`]), so the gateway fails only those requests and sends
/// the others again at once instead of guessing which grant it was. 0 when none does.
pub fn refused_grants(
    grants: impl IntoIterator<Item = impl core::borrow::Borrow<Grant>>,
    platform: &dyn PlatformFeatures,
) -> u8 {
    let mut refused = 0u8;
    for (i, grant) in grants.into_iter().take(MAX_GRANTS).enumerate() {
        let bad = grant
            .borrow()
            .flags
            .iter()
            .any(|f| platform.classify(f) != FeatureClass::Optional);
        if bad {
            refused |= 1 << i;
        }
    }
    refused
}

/// The places (0-based, in the command's order) of the grants a [`refused_grants`] set
/// names.
pub fn refused_places(grants: u8) -> impl Iterator<Item = usize> {
    (0..MAX_GRANTS).filter(move |i| grants & (1 << i) != 0)
}

// One bit a grant.
const _: () = assert!(MAX_GRANTS <= u8::BITS as usize);

fn check_header(
    vin: &Vin,
    issued_at: u64,
    not_after: u64,
    ctx: &CheckContext<'_>,
) -> Result<(), RejectCode> {
    if vin != ctx.vin {
        return Err(RejectCode::WrongVin);
    }
    if ctx.now > not_after {
        return Err(RejectCode::Expired);
    }
    if issued_at > ctx.now.saturating_add(MAX_FUTURE_SKEW_SECS) {
        return Err(RejectCode::IssuedInFuture);
    }
    Ok(())
}

fn check_seq(seq: u64, ctx: &CheckContext<'_>) -> Result<(), RejectCode> {
    if seq <= ctx.last_applied_seq {
        return Err(RejectCode::Replay);
    }
    Ok(())
}

fn check_flag(flag: &FeatureFlag, ctx: &CheckContext<'_>) -> Result<(), RejectCode> {
    match ctx.platform.classify(flag) {
        FeatureClass::Optional => Ok(()),
        FeatureClass::Base => Err(RejectCode::BasePlatformFeature),
        FeatureClass::Unknown => Err(RejectCode::UnknownFeature),
    }
}
