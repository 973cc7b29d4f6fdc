//! Running the technician's `caasctl` (built as `caas-e2e-ctl`) against a test's gateway.

use std::path::Path;
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
