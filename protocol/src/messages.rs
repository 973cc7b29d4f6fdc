//! The command a gateway sends and the report a car answers with.

use core::fmt;
use core::str::FromStr;
use heapless::Vec;
use serde::{Deserialize, Serialize};

use crate::names::{ErrorCode, FeatureFlag, FirmwareVersion, ParamKey, ParamValue, ServiceId};
use crate::reject::RejectCode;
use crate::vin::{Vin, VIN_LEN};

/// Most grants one command carries (the car's whole desired state).
pub const MAX_GRANTS: usize = 8;
/// Most feature flags one grant switches on.
pub const MAX_FLAGS_PER_GRANT: usize = 4;
/// Most parameters one grant carries.
pub const MAX_PARAMS_PER_GRANT: usize = 4;
/// Most request ids one command names as settled by it (the gateway maps any older ones
/// folded into the same sequence number itself).
pub const MAX_SETTLES: usize = 8;
/// Most diagnostic error codes one report carries.
pub const MAX_ERROR_CODES: usize = 4;
/// Highest network signal strength a report may carry (a percentage).
pub const MAX_SIGNAL_STRENGTH: u8 = 100;

/// Bytes of a postcard varint holding any `u64`.
const VARINT_U64_MAX: usize = 10;
/// Bytes of a postcard length prefix for anything this crate bounds (all lengths < 128).
const LEN_PREFIX: usize = 1;
const fn str_max(n: usize) -> usize {
    LEN_PREFIX + n
}
const VIN_MAX: usize = str_max(VIN_LEN);
const OPTION_U64_MAX: usize = 1 + VARINT_U64_MAX;
const PARAM_MAX: usize = str_max(ParamKey::MAX_LEN) + str_max(ParamValue::MAX_LEN);
/// Largest encoded [`Grant`].
pub const MAX_GRANT_SIZE: usize = str_max(ServiceId::MAX_LEN)
    + LEN_PREFIX
    + MAX_FLAGS_PER_GRANT * str_max(FeatureFlag::MAX_LEN)
    + LEN_PREFIX
    + MAX_PARAMS_PER_GRANT * PARAM_MAX
    + OPTION_U64_MAX;
const DESIRED_MAX: usize =
    LEN_PREFIX + MAX_SETTLES * RequestId::LEN + LEN_PREFIX + MAX_GRANTS * MAX_GRANT_SIZE;
/// Largest encoded [`Command`] payload.
pub const MAX_COMMAND_SIZE: usize = VIN_MAX + 3 * VARINT_U64_MAX + 1 + DESIRED_MAX;
const ACTIVE_MAX: usize = str_max(ServiceId::MAX_LEN) + OPTION_U64_MAX;
const DIAGNOSTICS_MAX: usize = str_max(FirmwareVersion::MAX_LEN)
    + LEN_PREFIX
    + MAX_ERROR_CODES * str_max(ErrorCode::MAX_LEN)
    + 1;
/// Largest encoded [`Outcome`]: a tag and a `u64`, plus a code byte and a grant bit set
/// when grants are refused.
const OUTCOME_MAX: usize = 1 + VARINT_U64_MAX + 1 + 1;
/// Largest encoded [`Report`] payload.
pub const MAX_REPORT_SIZE: usize = VIN_MAX
    + 2 * VARINT_U64_MAX
    + OUTCOME_MAX
    + LEN_PREFIX
    + MAX_GRANTS * ACTIVE_MAX
    + DIAGNOSTICS_MAX;

/// Identifies one IoT API request (a UUID's 16 bytes), so a car's report can settle it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct RequestId(pub [u8; 16]);

impl RequestId {
    /// Encoded size: 16 raw bytes, no length prefix.
    pub const LEN: usize = 16;
}

impl fmt::Display for RequestId {
    /// The canonical UUID text form, `8-4-4-4-12` lowercase hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Built in a buffer and written once: the gateway formats several ids per request,
        // and a `write!` per byte made this a visible share of its CPU.
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = [b'-'; 36];
        let mut at = 0;
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                at += 1;
            }
            text[at] = HEX[usize::from(b >> 4)];
            text[at + 1] = HEX[usize::from(b & 0x0f)];
            at += 2;
        }
        f.write_str(core::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({self})")
    }
}

/// The text is not a UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestIdError;

impl fmt::Display for RequestIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a request id (a UUID: 32 hex digits, dashes optional)")
    }
}

#[cfg(feature = "std")]
impl std::error::Error for RequestIdError {}

impl FromStr for RequestId {
    type Err = RequestIdError;
    fn from_str(s: &str) -> Result<Self, RequestIdError> {
        let mut out = [0u8; 16];
        let mut digits = s.bytes().filter(|&b| b != b'-');
        for byte in out.iter_mut() {
            let hi = digits.next().and_then(hex_val).ok_or(RequestIdError)?;
            let lo = digits.next().and_then(hex_val).ok_or(RequestIdError)?;
            *byte = hi << 4 | lo;
        }
        if digits.next().is_some() || s.len() > 36 {
            return Err(RequestIdError);
        }
        Ok(RequestId(out))
    }
}

fn hex_val(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// One configuration parameter of a grant (the IoT API's `configuration.parameters`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Param {
    /// Name, e.g. `boostPercent`.
    pub key: ParamKey,
    /// Value, e.g. `15`.
    pub value: ParamValue,
}

/// One purchased service as the car should run it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Grant {
    /// The catalog's service id.
    pub service_id: ServiceId,
    /// The feature flags it switches on (at least one).
    pub flags: Vec<FeatureFlag, MAX_FLAGS_PER_GRANT>,
    /// Its parameters.
    pub params: Vec<Param, MAX_PARAMS_PER_GRANT>,
    /// When it ends (Unix seconds, UTC); `None` for permanent or until withdrawn.
    pub ends_at: Option<u64>,
}

impl Grant {
    /// A grant with no flags, no parameters and no end time yet.
    pub fn new(service_id: ServiceId) -> Self {
        Grant {
            service_id,
            flags: Vec::new(),
            params: Vec::new(),
            ends_at: None,
        }
    }

    /// Whether the grant is in force at `now` (Unix seconds).
    pub fn is_active_at(&self, now: u64) -> bool {
        self.ends_at.is_none_or(|end| now < end)
    }

    /// The structural rules one grant keeps on its own (part of
    /// [`Command::check_structure`]): at least one flag, no parameter name twice.
    pub fn check_structure(&self) -> Result<(), RejectCode> {
        if self.flags.is_empty() {
            return Err(RejectCode::Malformed);
        }
        for (j, p) in self.params.iter().enumerate() {
            if self.params[..j].iter().any(|q| q.key == p.key) {
                return Err(RejectCode::Malformed);
            }
        }
        Ok(())
    }
}

/// The whole desired set of grants for a car, and the requests this state settles.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DesiredState {
    /// The IoT API requests folded into this state (the newest up to [`MAX_SETTLES`]).
    pub settles: Vec<RequestId, MAX_SETTLES>,
    /// Every grant the car should have; anything not listed is switched off.
    pub grants: Vec<Grant, MAX_GRANTS>,
}

/// What a command asks for.
// Boxing the large variant would need an allocator, which the firmware does not have.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandBody {
    /// Make this the car's whole set of optional features (wire tag 0).
    SetState(DesiredState),
    /// Answer with a status report echoing `nonce`; changes nothing (wire tag 1).
    QueryStatus {
        /// Echoed in the report's [`Outcome::Status`].
        nonce: u64,
    },
}

/// A command to one car, signed by the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// The one car this command is for.
    pub vin: Vin,
    /// Only grows for a car; a `SetState` is applied only if above the last applied one.
    pub seq: u64,
    /// When the gateway signed it (Unix seconds, UTC).
    pub issued_at: u64,
    /// After this (Unix seconds, UTC) the car must refuse it.
    pub not_after: u64,
    /// What it asks for.
    pub body: CommandBody,
}

impl Command {
    /// Structural rules a decoded command must keep, beyond its types' own bounds:
    /// `issued_at <= not_after`, every grant has at least one flag, no service id twice,
    /// no parameter name twice within a grant.
    pub fn check_structure(&self) -> Result<(), RejectCode> {
        if self.issued_at > self.not_after {
            return Err(RejectCode::Malformed);
        }
        if let CommandBody::SetState(desired) = &self.body {
            for (i, grant) in desired.grants.iter().enumerate() {
                grant.check_structure()?;
                if desired.grants[..i]
                    .iter()
                    .any(|g| g.service_id == grant.service_id)
                {
                    return Err(RejectCode::Malformed);
                }
            }
        }
        Ok(())
    }
}

/// Why a report was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The command with this seq was verified, persisted and applied (tag 0).
    Applied {
        /// The applied command's sequence number.
        seq: u64,
    },
    /// A command was refused; nothing changed (tag 1).
    Rejected {
        /// The refused command's seq, or 0 when it could not be read.
        seq: u64,
        /// Why.
        code: RejectCode,
    },
    /// The answer to a [`CommandBody::QueryStatus`] (tag 2).
    Status {
        /// The query's nonce.
        nonce: u64,
    },
    /// A periodic or after-reconnect status report (tag 3).
    Periodic {
        /// How many reports this car has sent since boot, so the gateway can see gaps.
        counter: u64,
    },
    /// A command was refused for what some of its grants switch (an unknown or
    /// base-platform feature), and these are the grants; nothing changed (tag 4). Cars name
    /// them so that the gateway fails only their requests and sends the rest again at once;
    /// a gateway must speak tag 4 before its cars send it.
    GrantsRefused {
        /// The refused command's seq.
        seq: u64,
        /// Why: [`RejectCode::UnknownFeature`] or [`RejectCode::BasePlatformFeature`] (the
        /// first grant's reason when they differ).
        code: RejectCode,
        /// The refused grants, by their place in the command: bit `i` is its `i`-th grant
        /// ([`crate::refused_grants`]).
        grants: u8,
    },
}

impl Outcome {
    /// The seq and code of a refusal (either form), `None` for any other outcome.
    pub fn refusal(&self) -> Option<(u64, RejectCode)> {
        match *self {
            Outcome::Rejected { seq, code } | Outcome::GrantsRefused { seq, code, .. } => {
                Some((seq, code))
            }
            _ => None,
        }
    }
}

/// One service the car is running.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ActiveService {
    /// The catalog's service id.
    pub service_id: ServiceId,
    /// When it ends (Unix seconds), `None` if it does not.
    pub ends_at: Option<u64>,
}

/// The car's health, as the IoT API's `diagnostics` carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnostics {
    /// Firmware version string.
    pub firmware_version: FirmwareVersion,
    /// Active diagnostic error codes.
    pub error_codes: Vec<ErrorCode, MAX_ERROR_CODES>,
    /// Network signal strength, 0-100.
    pub signal_strength: u8,
}

/// A car's signed account of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The reporting car.
    pub vin: Vin,
    /// The sequence number of the newest command it has applied (0 for none).
    pub applied_seq: u64,
    /// The car's trusted clock (Unix seconds): never earlier than the newest verified command.
    pub car_time: u64,
    /// Why this report was sent.
    pub outcome: Outcome,
    /// The services active at `car_time`.
    pub active: Vec<ActiveService, MAX_GRANTS>,
    /// Health.
    pub diagnostics: Diagnostics,
}

impl Report {
    /// Structural rules beyond the types' own bounds: signal strength at most 100.
    pub fn check_structure(&self) -> Result<(), RejectCode> {
        if self.diagnostics.signal_strength > MAX_SIGNAL_STRENGTH {
            return Err(RejectCode::Malformed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_round_trip_as_uuids() {
        let id = RequestId([
            0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 1, 2, 3, 4, 5, 6, 7, 8,
        ]);
        let mut s = heapless::String::<40>::new();
        core::fmt::write(&mut s, format_args!("{id}")).unwrap();
        assert_eq!(s.as_str(), "12345678-9abc-def0-0102-030405060708");
        assert_eq!(s.parse::<RequestId>(), Ok(id));
        assert_eq!(
            "123456789abcdef00102030405060708".parse::<RequestId>(),
            Ok(id)
        );
        assert!("123456789abcdef0010203040506070"
            .parse::<RequestId>()
            .is_err());
        assert!("123456789abcdef001020304050607080"
            .parse::<RequestId>()
            .is_err());
        assert!("zz345678-9abc-def0-0102-030405060708"
            .parse::<RequestId>()
            .is_err());
    }
}
