//! Bounded, validated ASCII names: feature flags, service ids, parameters, error codes.
//!
//! Each type checks its alphabet and length on construction and on decode, so the agent
//! never holds a name it could not put in a log line, a topic or a GPIO table.

use core::fmt;
use core::str::FromStr;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a valid name of its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NameError {
    /// Empty.
    Empty,
    /// Longer than the kind allows (the maximum is given).
    TooLong(usize),
    /// A character outside the kind's alphabet, at this byte position.
    Character(usize),
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Empty => f.write_str("must not be empty"),
            NameError::TooLong(max) => write!(f, "longer than {max} bytes"),
            NameError::Character(i) => write!(f, "character {} is not allowed", i + 1),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for NameError {}

fn is_flag_char(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_')
}

fn is_ident_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn is_service_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':')
}

fn is_printable(b: u8) -> bool {
    (0x20..0x7f).contains(&b)
}

macro_rules! bounded_name {
    ($(#[$doc:meta])* $name:ident, $max:expr, $allowed:ident, $allow_empty:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(heapless::String<{ $max }>);

        impl $name {
            /// Longest value, in bytes.
            pub const MAX_LEN: usize = $max;

            /// Validates and copies `s`.
            pub fn new(s: &str) -> Result<Self, NameError> {
                if s.is_empty() && !$allow_empty {
                    return Err(NameError::Empty);
                }
                if s.len() > $max {
                    return Err(NameError::TooLong($max));
                }
                if let Some(i) = s.bytes().position(|b| !$allowed(b)) {
                    return Err(NameError::Character(i));
                }
                let mut out = heapless::String::new();
                out.push_str(s).map_err(|_| NameError::TooLong($max))?;
                Ok(Self(out))
            }

            /// The value as a string slice.
            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str(stringify!($name))
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$name, E> {
                        $name::new(v).map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

bounded_name!(
    /// A feature flag: 1-32 bytes of `[a-z0-9_]`, the very string the IoT API's
    /// `configuration.featureFlags` carries (e.g. `power_boost`), so no lookup table sits
    /// between the API and the car.
    FeatureFlag, 32, is_flag_char, false
);
bounded_name!(
    /// A service id from the catalog: 1-32 bytes of `[A-Za-z0-9_.:-]`.
    ServiceId, 32, is_service_char, false
);
bounded_name!(
    /// A parameter name (the IoT API's `configuration.parameters` keys): 1-24 bytes of `[A-Za-z0-9_]`.
    ParamKey, 24, is_ident_char, false
);
bounded_name!(
    /// A parameter value: 0-24 bytes of printable ASCII.
    ParamValue, 24, is_printable, true
);
bounded_name!(
    /// A diagnostic error code reported by the car: 1-16 bytes of `[A-Za-z0-9_]`.
    ErrorCode, 16, is_ident_char, false
);
bounded_name!(
    /// A firmware version string: 1-24 bytes of printable ASCII.
    FirmwareVersion, 24, is_printable, false
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_flags_are_lowercase_snake_case() {
        assert!(FeatureFlag::new("power_boost").is_ok());
        assert!(FeatureFlag::new("a").is_ok());
        assert_eq!(FeatureFlag::new(""), Err(NameError::Empty));
        assert_eq!(FeatureFlag::new("Power"), Err(NameError::Character(0)));
        assert_eq!(FeatureFlag::new("snow-mode"), Err(NameError::Character(4)));
        assert!(FeatureFlag::new(&"x".repeat(32)).is_ok());
        assert_eq!(
            FeatureFlag::new(&"x".repeat(33)),
            Err(NameError::TooLong(32))
        );
    }

    #[test]
    fn other_names_keep_their_alphabets() {
        assert!(ServiceId::new("svc-power.boost:v2").is_ok());
        assert!(ServiceId::new("a b").is_err());
        assert!(ParamKey::new("boostPercent").is_ok());
        assert!(ParamKey::new("boost%").is_err());
        assert!(ParamValue::new("").is_ok());
        assert!(ParamValue::new("15 %").is_ok());
        assert!(ParamValue::new("caf\u{e9}").is_err());
        assert!(ErrorCode::new("E_BATT_LOW").is_ok());
        assert!(FirmwareVersion::new("2.4.1-rc1").is_ok());
    }
}
