//! Why a car refused a command.

use core::fmt;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Every way a command can be refused. The car reports the code in its signed report and
/// changes nothing. The numeric values are wire format (one byte) and never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u8)]
pub enum RejectCode {
    /// The signature does not verify with the key the key id names.
    BadSignature = 1,
    /// The key id names no trusted gateway key.
    UnknownKey = 2,
    /// The command names another car.
    WrongVin = 3,
    /// The sequence number is not above the last applied one (replay or rollback).
    Replay = 4,
    /// The current time is past the command's not-after time.
    Expired = 5,
    /// The command was issued further in the future than the allowed clock skew.
    IssuedInFuture = 6,
    /// The frame or its payload does not decode, or breaks a structural rule.
    Malformed = 7,
    /// The frame is larger than the protocol's maximum.
    TooLarge = 8,
    /// The frame's format version is not one this car speaks.
    UnsupportedVersion = 9,
    /// A grant names a feature flag this car's platform does not have.
    UnknownFeature = 10,
    /// A grant names a base-platform feature, which no command may touch.
    BasePlatformFeature = 11,
    /// The car could not apply a valid command (a feature line failed); nothing changed.
    ApplyFailed = 12,
    /// The car could not persist a valid command; nothing changed and nothing was acknowledged.
    StorageFailed = 13,
}

impl RejectCode {
    /// Every code, in wire order.
    pub const ALL: [RejectCode; 13] = [
        RejectCode::BadSignature,
        RejectCode::UnknownKey,
        RejectCode::WrongVin,
        RejectCode::Replay,
        RejectCode::Expired,
        RejectCode::IssuedInFuture,
        RejectCode::Malformed,
        RejectCode::TooLarge,
        RejectCode::UnsupportedVersion,
        RejectCode::UnknownFeature,
        RejectCode::BasePlatformFeature,
        RejectCode::ApplyFailed,
        RejectCode::StorageFailed,
    ];

    /// The wire byte.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The code for a wire byte, if it is one.
    pub fn from_u8(b: u8) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| c.as_u8() == b)
    }

    /// A stable SCREAMING_SNAKE name, used as the IoT API's `errorCode`.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::BadSignature => "BAD_SIGNATURE",
            RejectCode::UnknownKey => "UNKNOWN_KEY",
            RejectCode::WrongVin => "WRONG_VIN",
            RejectCode::Replay => "REPLAY",
            RejectCode::Expired => "EXPIRED",
            RejectCode::IssuedInFuture => "ISSUED_IN_FUTURE",
            RejectCode::Malformed => "MALFORMED",
            RejectCode::TooLarge => "TOO_LARGE",
            RejectCode::UnsupportedVersion => "UNSUPPORTED_VERSION",
            RejectCode::UnknownFeature => "UNKNOWN_FEATURE",
            RejectCode::BasePlatformFeature => "BASE_PLATFORM_FEATURE",
            RejectCode::ApplyFailed => "APPLY_FAILED",
            RejectCode::StorageFailed => "STORAGE_FAILED",
        }
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for RejectCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.as_u8())
    }
}

impl<'de> Deserialize<'de> for RejectCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let b = u8::deserialize(d)?;
        RejectCode::from_u8(b).ok_or_else(|| serde::de::Error::custom("unknown rejection code"))
    }
}
