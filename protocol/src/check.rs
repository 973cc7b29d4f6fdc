//! The rules a car applies to a verified command before obeying it.
//!
//! They live here, beside the format, so that the agent core, the firmware and the
//! simulator cannot disagree on them, and so that every rejection code is tested once.

use crate::messages::{Command, CommandBody};
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
