//! What the end-to-end test files with real agents share: the package's binaries (Cargo
//! gives their paths to test targets only, so they are found here and not in the library),
//! the tests' deadline, and waiting on it.
#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::time::Duration;

/// Longest wait for anything the tests wait on: generous, as a loaded CI machine may be
/// slow; a passing run waits a few seconds at most at each step.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The gateway (and simulator), built as this package's `caas-e2e-sim`.
pub fn sim() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_caas-e2e-sim"))
}

/// caasctl, built as this package's `caas-e2e-ctl`.
pub fn ctl() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_caas-e2e-ctl"))
}

/// The real agent, built as this package's `caas-e2e-agent`.
pub fn agent() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_caas-e2e-agent"))
}

/// [`caas_tests::wait_until`] with [`DEADLINE`], failing the test past it.
pub async fn wait_until<T: std::fmt::Debug, F: std::future::Future<Output = T>>(
    what: &str,
    probe: impl FnMut() -> F,
    ready: impl Fn(&T) -> bool,
) -> T {
    caas_tests::wait_until(what, DEADLINE, probe, ready)
        .await
        .unwrap()
}

/// Writes the gateway's public key, as `GET /keys` gives it, to `path` (the agent's
/// `--gateway-key` file).
pub async fn write_gateway_key(api: &caas_sim::api::Api, path: &Path) {
    let key = api.gateway_key().await.unwrap();
    std::fs::write(
        path,
        format!("{}\n", caas_protocol::verifying_key_to_hex(&key)),
    )
    .unwrap();
}

/// A path as the `&str` a command line takes (the tests' temporary paths are UTF-8).
pub fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// A running gateway process with its webhook receiver and API client.
pub struct Started {
    pub receiver: caas_sim::webhook::Receiver,
    pub gateway: caas_tests::Gateway,
    pub api: caas_sim::api::Api,
    /// The gateway's public key, written for the agent's `--gateway-key` (DIR/gateway.pub).
    pub gateway_key: std::path::PathBuf,
}

/// Starts a gateway process with `retry`, the serve flags `extra` after the others, and a
/// webhook receiver; writes its public key into `dir`.
pub async fn start_gateway_with(dir: &Path, retry: caas_tests::Retry, extra: &[&str]) -> Started {
    let (receiver, mut opts) = caas_tests::receiver_and_gateway_opts(retry).await.unwrap();
    opts.extra_args = extra.iter().map(|a| a.to_string()).collect();
    let gateway = caas_tests::Gateway::start(sim(), &opts).await.unwrap();
    let api = gateway.api().unwrap();
    let gateway_key = dir.join("gateway.pub");
    write_gateway_key(&api, &gateway_key).await;
    Started {
        receiver,
        gateway,
        api,
        gateway_key,
    }
}
