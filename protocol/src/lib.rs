//! # caas-protocol: the signed command and report formats of the CaaS fleet
//!
//! Every part of the system speaks through this crate: the gateway builds and signs
//! [`Command`]s, the agent in each car (Linux, Cortex-M, or the simulator) verifies them
//! and answers with a [`Report`] signed by the car's own key, and `caasctl` inspects both.
//!
//! The crate is `#![no_std]` and allocation-free: every string and list is a bounded
//! `heapless` type, every frame has a compile-time maximum ([`MAX_COMMAND_FRAME_SIZE`],
//! [`MAX_REPORT_FRAME_SIZE`]), and nothing here reads a clock, a socket or a disk — time is
//! an argument. Feature `std` only adds conveniences (key files, key generation,
//! `std::error::Error`).
//!
//! For a car short of RAM, [`open_command_view`] reads a command in place instead (see
//! [`CommandView`]): the same checks and verdicts without a 3.6 KiB `Command` on the stack.
//!
//! The byte layout, the bounds, the topics and the security argument are written down in
//! `protocol/SPEC.md`; tests pin the exact bytes so the format cannot drift unnoticed.
//!
//! ```
//! use caas_protocol::*;
//!
//! let gateway = SigningKey::from_bytes(&[7; 32]);
//! let vin: Vin = "WVWZZZ1JZXW000001".parse().unwrap();
//! let mut grant = Grant::new("power-boost".parse().unwrap());
//! grant.flags.push("power_boost".parse().unwrap()).unwrap();
//! grant.ends_at = Some(1_800_000_000);
//! let mut desired = DesiredState::default();
//! desired.grants.push(grant).unwrap();
//! let cmd = Command { vin, seq: 1, issued_at: 1_700_000_000, not_after: 1_700_086_400,
//!                     body: CommandBody::SetState(desired) };
//!
//! let mut buf = [0u8; MAX_COMMAND_FRAME_SIZE];
//! let frame = seal_command(&cmd, &gateway, &mut buf).unwrap();
//! let trusted = [TrustedKey::new(gateway.verifying_key())];
//! assert_eq!(open_command(frame, &trusted).unwrap(), cmd);
//! ```
#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_code)]

pub mod catalog;
mod check;
mod envelope;
#[cfg(feature = "std")]
mod hostverify;
mod keys;
mod messages;
mod names;
mod reject;
pub mod topics;
mod view;
mod vin;

pub use check::{
    check_command, check_command_view, refused_grants, refused_places, CheckContext, FeatureClass,
    PlatformFeatures, MAX_FUTURE_SKEW_SECS,
};
pub use envelope::{
    encode_report_payload, open_command, open_report, parse_frame, seal_command, seal_report,
    sign_report_in_place, verify_command, FrameKind, KeyId, RawFrame, SealError, TrustedKey,
    FORMAT_VERSION, FRAME_HEADER_SIZE, MAX_COMMAND_FRAME_SIZE, MAX_FRAME_SIZE,
    MAX_REPORT_FRAME_SIZE, SIGNATURE_SIZE,
};
#[cfg(feature = "batch")]
pub use envelope::{open_reports, MIN_BATCH};
#[cfg(feature = "std")]
pub use hostverify::MAX_KEYS_WITH_TABLES;
pub use keys::{
    signing_key_from_hex, signing_key_to_hex, verifying_key_from_hex, verifying_key_to_hex,
    KeyError, SigningKey, VerifyingKey,
};
pub use messages::*;
pub use names::{
    ErrorCode, FeatureFlag, FirmwareVersion, NameError, ParamKey, ParamValue, ServiceId,
};
pub use reject::RejectCode;
pub use view::{open_command_view, BodyView, CommandView, DesiredView, EncodedGrants, GrantIter};
pub use vin::{Vin, VinError, VIN_LEN};

#[cfg(feature = "std")]
pub use keys::files;
