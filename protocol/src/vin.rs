//! The Vehicle Identification Number.

use core::fmt;
use core::str::FromStr;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Length of every VIN (ISO 3779).
pub const VIN_LEN: usize = 17;

/// A validated 17-character VIN: digits and capital letters except I, O and Q (ISO 3779).
///
/// Validated on construction and on decode, so a `Vin` in hand is always well formed and can
/// be used verbatim in topic names and in the broker's tenant id (it is alphanumeric).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Vin([u8; VIN_LEN]);

/// Why a string is not a VIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum VinError {
    /// Not exactly 17 bytes long.
    Length(usize),
    /// A character outside the ISO 3779 alphabet, at this position.
    Character(usize),
}

impl fmt::Display for VinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VinError::Length(n) => write!(f, "a VIN has 17 characters, this one has {n}"),
            VinError::Character(i) => write!(
                f,
                "character {} is not allowed in a VIN (0-9 and A-Z except I, O, Q)",
                i + 1
            ),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for VinError {}

fn is_vin_char(b: u8) -> bool {
    matches!(b, b'0'..=b'9' | b'A'..=b'Z') && !matches!(b, b'I' | b'O' | b'Q')
}

impl Vin {
    /// Validates raw bytes as a VIN.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, VinError> {
        if bytes.len() != VIN_LEN {
            return Err(VinError::Length(bytes.len()));
        }
        if let Some(i) = bytes.iter().position(|&b| !is_vin_char(b)) {
            return Err(VinError::Character(i));
        }
        let mut out = [0u8; VIN_LEN];
        out.copy_from_slice(bytes);
        Ok(Vin(out))
    }

    /// The VIN as a string slice.
    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored, so this cannot fail; fall back to "" rather than panic.
        core::str::from_utf8(&self.0).unwrap_or("")
    }

    /// The VIN's 17 bytes.
    pub fn as_bytes(&self) -> &[u8; VIN_LEN] {
        &self.0
    }
}

impl FromStr for Vin {
    type Err = VinError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Vin::from_bytes(s.as_bytes())
    }
}

impl fmt::Display for Vin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Vin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Vin({})", self.as_str())
    }
}

impl Serialize for Vin {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Vin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Vin;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a 17-character VIN")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vin, E> {
                Vin::from_bytes(v.as_bytes()).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_iso_3779_vins() {
        let vin: Vin = "1HGCM82633A004352".parse().unwrap();
        assert_eq!(vin.as_str(), "1HGCM82633A004352");
    }

    #[test]
    fn rejects_bad_vins() {
        assert_eq!("1HGCM82633A00435".parse::<Vin>(), Err(VinError::Length(16)));
        assert_eq!(
            "1HGCM82633A0043522".parse::<Vin>(),
            Err(VinError::Length(18))
        );
        assert_eq!(
            "IHGCM82633A004352".parse::<Vin>(),
            Err(VinError::Character(0))
        );
        assert_eq!(
            "1HGCM82633A00435O".parse::<Vin>(),
            Err(VinError::Character(16))
        );
        assert_eq!(
            "1HGCM8Q633A004352".parse::<Vin>(),
            Err(VinError::Character(6))
        );
        assert_eq!(
            "1hgcm82633a004352".parse::<Vin>(),
            Err(VinError::Character(1))
        );
    }
}
