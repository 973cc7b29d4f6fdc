//! Ed25519 key files: the gateway's command-signing key and each car's device key.
//!
//! The format is the protocol crate's (`caas_protocol::files`): one line of 64 lowercase hex
//! digits, the 32-byte seed for a secret key (`NAME.key`, mode 0600) and the 32-byte public
//! key for a public key (`NAME.pub`). Both look alike, so which one a file holds is told by
//! its extension or by the caller ([`KeyFileKind`]).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use caas_protocol::{files, verifying_key_to_hex, KeyId, VerifyingKey};

/// Longest key name `keys gen --name` accepts.
pub const MAX_KEY_NAME_LEN: usize = 64;
/// Largest key file read (a key file is 65 bytes; the slack allows CRLF and blank lines).
pub const MAX_KEY_FILE_SIZE: u64 = 1024;

/// Why a key could not be made or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeysError {
    /// The name is not a plain file name.
    #[error("invalid key name {0:?}: use 1-64 of A-Z a-z 0-9 _ - . and do not start with '.'")]
    BadName(String),
    /// A file of the pair is already there.
    #[error("{0} already exists; refusing to overwrite a key (move it away first)")]
    Exists(PathBuf),
    /// The extension does not say whether the file is secret or public.
    #[error("cannot tell whether {0} holds a secret or a public key: name it .key or .pub, or pass --kind")]
    UnknownKind(PathBuf),
    /// The file is far larger than a key file.
    #[error("{0} is larger than {MAX_KEY_FILE_SIZE} bytes: not a key file")]
    TooLarge(PathBuf),
    /// Reading, writing or parsing failed (the message names the file).
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What a key file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyFileKind {
    /// A secret key (64 hex digits of the Ed25519 seed).
    Secret,
    /// A public key (64 hex digits of the compressed point).
    Public,
}

impl KeyFileKind {
    /// The kind a file's extension names: `.key` secret, `.pub` public, otherwise unknown.
    pub fn from_extension(path: &Path) -> Option<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("key") => Some(KeyFileKind::Secret),
            Some("pub") => Some(KeyFileKind::Public),
            _ => None,
        }
    }
}

/// A public key and the id frames carry for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyInfo {
    /// The public key.
    pub public_key: VerifyingKey,
    /// `KeyId::of(public_key)`, as frames carry it.
    pub key_id: KeyId,
    /// Whether it was read from a secret key file.
    pub from_secret: bool,
}

impl KeyInfo {
    fn new(public_key: VerifyingKey, from_secret: bool) -> Self {
        KeyInfo {
            public_key,
            key_id: KeyId::of(&public_key),
            from_secret,
        }
    }

    /// The public key as 64 hex digits (the `.pub` file's content, the IoT API's `publicKey`).
    pub fn public_hex(&self) -> String {
        verifying_key_to_hex(&self.public_key).as_str().to_owned()
    }
}

/// The files [`generate_key_files`] wrote.
#[derive(Debug, Clone)]
pub struct GeneratedKey {
    /// `DIR/NAME.key`, the secret key (mode 0600).
    pub secret_path: PathBuf,
    /// `DIR/NAME.pub`, the public key.
    pub public_path: PathBuf,
    /// The new key's public half and id.
    pub info: KeyInfo,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_KEY_NAME_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Generates a key pair into `DIR/NAME.key` and `DIR/NAME.pub`, creating `dir` if needed.
///
/// Refuses when either file exists, and leaves nothing behind when a write fails.
pub fn generate_key_files(dir: &Path, name: &str) -> Result<GeneratedKey, KeysError> {
    if !valid_name(name) {
        return Err(KeysError::BadName(name.to_owned()));
    }
    let secret_path = dir.join(format!("{name}.key"));
    let public_path = dir.join(format!("{name}.pub"));
    for path in [&secret_path, &public_path] {
        if path.exists() {
            return Err(KeysError::Exists(path.clone()));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display()))
    })?;
    let key = files::generate();
    files::write_signing_key(&secret_path, &key)?;
    let public = key.verifying_key();
    if let Err(e) = write_new(
        &public_path,
        &format!("{}\n", verifying_key_to_hex(&public)),
    ) {
        // Keep "changes nothing on failure": a secret without its public half is debris.
        let _ = std::fs::remove_file(&secret_path);
        return Err(e.into());
    }
    Ok(GeneratedKey {
        secret_path,
        public_path,
        info: KeyInfo::new(public, true),
    })
}

fn write_new(path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// Reads a key file of `kind` (or of the kind its extension names) and returns its public key.
pub fn read_key_info(path: &Path, kind: Option<KeyFileKind>) -> Result<KeyInfo, KeysError> {
    let kind = kind
        .or_else(|| KeyFileKind::from_extension(path))
        .ok_or_else(|| KeysError::UnknownKind(path.to_owned()))?;
    let len = std::fs::metadata(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?
        .len();
    if len > MAX_KEY_FILE_SIZE {
        return Err(KeysError::TooLarge(path.to_owned()));
    }
    Ok(match kind {
        KeyFileKind::Secret => KeyInfo::new(files::read_signing_key(path)?.verifying_key(), true),
        KeyFileKind::Public => KeyInfo::new(files::read_verifying_key(path)?, false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain_file_names() {
        assert!(valid_name("device"));
        assert!(valid_name("gateway-2026.v1"));
        for bad in ["", ".hidden", "a/b", "../x", "a b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn kind_from_extension() {
        assert_eq!(
            KeyFileKind::from_extension(Path::new("a/device.key")),
            Some(KeyFileKind::Secret)
        );
        assert_eq!(
            KeyFileKind::from_extension(Path::new("device.pub")),
            Some(KeyFileKind::Public)
        );
        assert_eq!(KeyFileKind::from_extension(Path::new("device.hex")), None);
    }
}
