//! Ed25519 keys and their text form.
//!
//! A key file is one line of 64 lowercase hex digits: for a secret key the 32-byte seed,
//! for a public key the 32-byte compressed point (RFC 8032). Whitespace around it is ignored.
//! Secret key files are written with mode 0600. The same form is accepted in the IoT API's
//! `POST /vehicles {publicKey}` and in configuration.

use core::fmt;

pub use ed25519_dalek::{SigningKey, VerifyingKey};

/// Why a text is not a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// Not 64 hex digits.
    NotHex,
    /// 64 hex digits, but not a valid Ed25519 public key (not a curve point, or a weak one).
    InvalidPoint,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::NotHex => f.write_str("a key is 64 hex digits"),
            KeyError::InvalidPoint => f.write_str("not a valid Ed25519 public key"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for KeyError {}

fn parse_hex32(text: &str) -> Result<[u8; 32], KeyError> {
    let text = text.trim().as_bytes();
    if text.len() != 64 {
        return Err(KeyError::NotHex);
    }
    let mut out = [0u8; 32];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16).ok_or(KeyError::NotHex)?;
        let lo = (pair[1] as char).to_digit(16).ok_or(KeyError::NotHex)?;
        out[i] = (hi << 4 | lo) as u8;
    }
    Ok(out)
}

/// Lowercase hex of 32 bytes.
pub(crate) fn hex32(bytes: &[u8; 32]) -> heapless::String<64> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = heapless::String::new();
    for b in bytes {
        // 64 pushes into a 64-byte string cannot overflow.
        let _ = out.push(DIGITS[usize::from(b >> 4)] as char);
        let _ = out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

/// Parses a secret key (the 32-byte seed as 64 hex digits).
pub fn signing_key_from_hex(text: &str) -> Result<SigningKey, KeyError> {
    Ok(SigningKey::from_bytes(&parse_hex32(text)?))
}

/// Parses a public key (64 hex digits), refusing points that are not on the curve or weak.
pub fn verifying_key_from_hex(text: &str) -> Result<VerifyingKey, KeyError> {
    let key = VerifyingKey::from_bytes(&parse_hex32(text)?).map_err(|_| KeyError::InvalidPoint)?;
    if key.is_weak() {
        return Err(KeyError::InvalidPoint);
    }
    Ok(key)
}

/// The 64-hex-digit text of a secret key.
pub fn signing_key_to_hex(key: &SigningKey) -> heapless::String<64> {
    hex32(&key.to_bytes())
}

/// The 64-hex-digit text of a public key.
pub fn verifying_key_to_hex(key: &VerifyingKey) -> heapless::String<64> {
    hex32(key.as_bytes())
}

/// Reading, writing and generating key files (feature `std`).
#[cfg(feature = "std")]
pub mod files {
    use super::*;
    use std::io::Write;
    use std::path::Path;

    /// A fresh key from the operating system's random source.
    pub fn generate() -> SigningKey {
        let mut seed = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
        SigningKey::from_bytes(&seed)
    }

    fn read(path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
    }

    fn invalid(path: &Path, e: KeyError) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    }

    /// Reads a secret key file.
    pub fn read_signing_key(path: &Path) -> std::io::Result<SigningKey> {
        signing_key_from_hex(&read(path)?).map_err(|e| invalid(path, e))
    }

    /// Reads a public key file.
    pub fn read_verifying_key(path: &Path) -> std::io::Result<VerifyingKey> {
        verifying_key_from_hex(&read(path)?).map_err(|e| invalid(path, e))
    }

    /// Writes a secret key file (mode 0600 on Unix), refusing to overwrite one.
    pub fn write_signing_key(path: &Path, key: &SigningKey) -> std::io::Result<()> {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts
            .open(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        writeln!(f, "{}", signing_key_to_hex(key))?;
        f.sync_all()
    }

    /// Writes a public key file.
    pub fn write_verifying_key(path: &Path, key: &VerifyingKey) -> std::io::Result<()> {
        std::fs::write(path, format!("{}\n", verifying_key_to_hex(key)))
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
    }

    /// Reads the secret key at `path`, or generates one and writes it there (and its public
    /// key beside it, with extension `.pub`) when the file does not exist.
    pub fn load_or_generate(path: &Path) -> std::io::Result<SigningKey> {
        if path.exists() {
            return read_signing_key(path);
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let key = generate();
        write_signing_key(path, &key)?;
        write_verifying_key(&path.with_extension("pub"), &key.verifying_key())?;
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_hex() {
        let sk = SigningKey::from_bytes(&[9; 32]);
        let text = signing_key_to_hex(&sk);
        assert_eq!(text.as_str(), &"09".repeat(32));
        assert_eq!(
            signing_key_from_hex(&text).unwrap().to_bytes(),
            sk.to_bytes()
        );
        let pk = verifying_key_to_hex(&sk.verifying_key());
        assert_eq!(verifying_key_from_hex(&pk), Ok(sk.verifying_key()));
        assert!(matches!(signing_key_from_hex("abc"), Err(KeyError::NotHex)));
        assert_eq!(
            verifying_key_from_hex(&"zz".repeat(32)),
            Err(KeyError::NotHex)
        );
        // The identity point is a weak key: refused.
        let mut ident = [0u8; 32];
        ident[0] = 1;
        assert_eq!(
            verifying_key_from_hex(&hex32(&ident)),
            Err(KeyError::InvalidPoint)
        );
    }
}
