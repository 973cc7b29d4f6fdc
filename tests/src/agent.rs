//! The real car agent (`caas-agent run`, built as `caas-e2e-agent`) as a process: one
//! telematics unit with its own device key and state directory, talking to a gateway's
//! broker, its diagnostic endpoint on a free loopback port.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use caas_agent::runtime::diag::StatusView;
use caas_sim::gateway_proc::{free_port, tail};

/// Longest wait for a started agent's diagnostic endpoint to answer.
pub const AGENT_START_TIMEOUT: Duration = Duration::from_secs(30);

/// What one agent process runs with.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// The car.
    pub vin: String,
    /// The broker, `HOST:PORT`: plain MQTT, or TLS with `tls`.
    pub broker: String,
    /// For a TLS broker: the files of the agent's `--ca`, `--cert` and `--key`.
    pub tls: Option<AgentTls>,
    /// The public key files (`.pub`) of the gateway keys it trusts, one `--gateway-key`
    /// each (the agent takes up to 3, so a car can trust the next key before it is used).
    pub gateway_keys: Vec<PathBuf>,
    /// The unit's secret key file (`.key`).
    pub device_key: PathBuf,
    /// The unit's state directory (sled): a new unit starts with an empty one.
    pub data: PathBuf,
    /// Where its output goes (appended, so a log can hold several runs).
    pub log: PathBuf,
}

/// A unit's TLS files: the CA that signed the broker's certificate, and the unit's own
/// client certificate and key (mutual TLS).
#[derive(Debug, Clone)]
pub struct AgentTls {
    /// The CA certificate (PEM).
    pub ca: PathBuf,
    /// The unit's client certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

/// A running agent process; killed when dropped.
pub struct AgentProcess {
    child: Option<Child>,
    diag: String,
    log: PathBuf,
    http: reqwest::Client,
}

impl AgentProcess {
    /// Starts `caas-agent run` (the binary at `bin`) with `spec` and waits until its
    /// diagnostic endpoint answers. It reports every second, besides after each command and
    /// connect, so a test never waits long for the unit's next signed report.
    pub async fn start(bin: &Path, spec: &AgentSpec) -> Result<AgentProcess> {
        let diag = format!("127.0.0.1:{}", free_port()?);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .with_context(|| format!("opening {}", spec.log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("run").args(["--vin", &spec.vin]);
        match &spec.tls {
            None => {
                cmd.args(["--broker", &format!("mqtt://{}", spec.broker)]);
            }
            Some(tls) => {
                cmd.args(["--broker", &format!("mqtts://{}", spec.broker)])
                    .arg("--ca")
                    .arg(&tls.ca)
                    .arg("--cert")
                    .arg(&tls.cert)
                    .arg("--key")
                    .arg(&tls.key);
            }
        }
        for key in &spec.gateway_keys {
            cmd.arg("--gateway-key").arg(key);
        }
        cmd.arg("--device-key")
            .arg(&spec.device_key)
            .arg("--data")
            .arg(&spec.data)
            .args(["--diag", &diag, "--report-interval", "1"]);
        // Only the flags above: none of the machine's agent settings may slip in.
        for (k, _) in std::env::vars() {
            if k.starts_with("CAAS_AGENT_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .env("RUST_LOG", "info,rumqttc=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting the agent")?;
        let mut agent = AgentProcess {
            child: Some(child),
            diag,
            log: spec.log.clone(),
            http: reqwest::Client::new(),
        };
        let deadline = Instant::now() + AGENT_START_TIMEOUT;
        loop {
            if agent.status().await.is_ok() {
                return Ok(agent);
            }
            if let Some(child) = agent.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    agent.child = None;
                    bail!("the agent exited ({status}); log:\n{}", tail(&agent.log));
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "the agent's diagnostic endpoint did not answer within \
                     {AGENT_START_TIMEOUT:?}; log:\n{}",
                    tail(&agent.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The unit's own account of its state (`GET /status` on its diagnostic endpoint).
    pub async fn status(&self) -> Result<StatusView> {
        let url = format!("http://{}/status", self.diag);
        let resp = self
            .http
            .get(&url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .with_context(|| format!("GET {url}"))?
            .error_for_status()?;
        Ok(resp.json().await?)
    }

    /// The services the unit has granted now, by id, sorted.
    pub async fn active_services(&self) -> Result<Vec<String>> {
        let mut services: Vec<String> = self
            .status()
            .await?
            .active_grants
            .into_iter()
            .map(|g| g.service_id)
            .collect();
        services.sort();
        Ok(services)
    }

    /// Everything it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as pulling the unit out of the car would end it.
    pub fn kill(&mut self) -> Result<()> {
        let mut child = self.child.take().context("the agent is not running")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
