//! Running the technician's `caasctl` (built as `caas-e2e-ctl`) against a test's gateway.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};

/// Runs `caasctl ARGS` (the binary at `bin`) with no gateway or token from the environment,
/// so only the flags a test passes count.
pub async fn caasctl(bin: &Path, args: &[&str]) -> Result<Output> {
    let bin = bin.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(&bin)
            .args(&args)
            .env_remove("CAAS_GATEWAY_URL")
            .env_remove("CAAS_API_TOKEN")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", bin.display()))
    })
    .await?
}

/// Its stdout, if it succeeded; otherwise an error with its exit status and stderr.
pub fn stdout_of(out: &Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "caasctl failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout.clone()).context("caasctl's stdout is not UTF-8")
}

/// An Ed25519 key pair made by `caasctl keys gen`.
#[derive(Debug, Clone)]
pub struct KeyFiles {
    /// The secret key file (`.key`).
    pub secret: PathBuf,
    /// The public key file (`.pub`).
    pub public: PathBuf,
    /// The public key, 64 hex digits (the IoT API's `publicKey`).
    pub public_hex: String,
    /// Its key id, 16 hex digits (what signed frames carry).
    pub key_id: String,
}

/// Makes a key pair as the technician or operator does, `caasctl keys gen` (the binary at
/// `bin`): `DIR/NAME.key` and `DIR/NAME.pub`. The same command makes a car's device key and
/// a gateway's signing key.
pub async fn make_key(bin: &Path, dir: &Path, name: &str) -> Result<KeyFiles> {
    let dir = dir.to_str().context("the key directory is not UTF-8")?;
    let out = caasctl(
        bin,
        &["keys", "gen", "--out", dir, "--name", name, "--json"],
    )
    .await?;
    let v: serde_json::Value = serde_json::from_str(&stdout_of(&out)?)?;
    let text = |field: &str| {
        v[field]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no {field} in {v}"))
    };
    let public_hex = text("publicKey")?;
    if public_hex.len() != 64 {
        bail!("publicKey is not 64 hex digits: {v}");
    }
    Ok(KeyFiles {
        secret: text("secretKeyFile")?.into(),
        public: text("publicKeyFile")?.into(),
        public_hex,
        key_id: text("keyId")?,
    })
}
