//! Starting a real gateway (and Mosquitto) as child processes, on free loopback ports, in
//! temporary directories.
//!
//! The gateway process is `caas-sim gateway serve ...`: this binary links the
//! `caas-gateway` library and its hidden `gateway` subcommand runs exactly what
//! `caas-gateway serve` runs (`caas_gateway::config::ServeArgs` → `caas_gateway::run`), so
//! the demo, the benchmark and the end-to-end tests need no second binary to be built first.
//! [`GatewaySpawn::binary`] runs a given `caas-gateway` binary instead.
//!
//! Children are killed when their handle is dropped; their output goes to log files in the
//! temporary directory, whose path an error message names.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::api::Api;

/// Longest wait for a child to start answering.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A free TCP port on 127.0.0.1 (bound then released: another process could take it in
/// between, which on a test machine is rare enough).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// How to start a gateway.
#[derive(Debug, Clone)]
pub struct GatewaySpawn {
    /// A `caas-gateway` binary to run; `None`: `gateway serve` of [`GatewaySpawn::sim_binary`].
    pub binary: Option<PathBuf>,
    /// A binary running `caas_sim::cli::main` (its hidden `gateway serve` is the gateway);
    /// `None`: this very binary.
    pub sim_binary: Option<PathBuf>,
    /// External broker `mqtt://HOST:PORT` instead of the embedded one.
    pub broker: Option<String>,
    /// Where callbacks go.
    pub webhook_url: Option<String>,
    /// The callbacks' HMAC secret.
    pub webhook_secret: String,
    /// The API token.
    pub api_token: String,
    /// Attempts per request.
    pub attempts: u32,
    /// Timeout per attempt (`2s`).
    pub attempt_timeout: String,
    /// Backoff list (`1s,1s,1s`).
    pub backoff: String,
    /// Reuse this data directory (to restart a gateway on its data); `None`: a new temp dir.
    pub data: Option<PathBuf>,
    /// Use these ports (to restart on the same ones); `None`: free ones.
    pub ports: Option<(u16, u16)>,
}

impl Default for GatewaySpawn {
    fn default() -> Self {
        GatewaySpawn {
            binary: None,
            sim_binary: None,
            broker: None,
            webhook_url: None,
            webhook_secret: "demo-secret".to_string(),
            api_token: "dev-token".to_string(),
            attempts: 3,
            attempt_timeout: "2s".to_string(),
            backoff: "1s,1s,1s".to_string(),
            data: None,
            ports: None,
        }
    }
}

/// Waits until the gateway `child` answers `/healthz` through `api`, at most
/// [`START_TIMEOUT`]; an error with the tail of its `log` if it exits first.
pub async fn wait_until_healthy(api: &Api, child: &mut Child, log: &Path) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if api.healthy().await {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "the gateway exited ({status}); its log {}:\n{}",
                log.display(),
                tail(log)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "the gateway did not answer /healthz within {START_TIMEOUT:?}; log {}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A running gateway process.
pub struct GatewayProc {
    child: Child,
    /// The IoT API base URL.
    pub http: String,
    /// The broker cars connect to, `HOST:PORT`.
    pub mqtt: String,
    /// The data directory.
    pub data: PathBuf,
    /// The log file.
    pub log: PathBuf,
    _temp: Option<tempfile::TempDir>,
    spawn: GatewaySpawn,
    http_port: u16,
    mqtt_port: u16,
}

impl GatewayProc {
    /// Starts a gateway and waits until `/healthz` answers.
    pub async fn start(spawn: &GatewaySpawn) -> Result<GatewayProc> {
        let (temp, data) = match &spawn.data {
            Some(d) => (None, d.clone()),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("caas-gateway-")
                    .tempdir()
                    .context("creating a temporary data directory")?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let (http_port, mqtt_port) = match spawn.ports {
            Some(p) => p,
            None => (free_port()?, free_port()?),
        };
        let log = data.join(format!("gateway-{http_port}.log"));
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = match &spawn.binary {
            Some(b) => Command::new(b),
            None => {
                let exe = match &spawn.sim_binary {
                    Some(p) => p.clone(),
                    None => std::env::current_exe().context("locating caas-sim")?,
                };
                let mut c = Command::new(exe);
                c.arg("gateway");
                c
            }
        };
        cmd.arg("serve")
            .args(["--http", &format!("127.0.0.1:{http_port}")])
            .arg("--data")
            .arg(data.join("gw"))
            .args(["--api-token", &spawn.api_token])
            .args(["--attempts", &spawn.attempts.to_string()])
            .args(["--attempt-timeout", &spawn.attempt_timeout])
            .args(["--backoff", &spawn.backoff])
            .args(["--webhook-secret", &spawn.webhook_secret]);
        let mqtt = match &spawn.broker {
            Some(url) => {
                cmd.args(["--broker", url]);
                crate::fleet::split_host_port(url).map(|(h, p)| format!("{h}:{p}"))?
            }
            None => {
                cmd.args(["--mqtt", &format!("127.0.0.1:{mqtt_port}")]);
                format!("127.0.0.1:{mqtt_port}")
            }
        };
        if let Some(url) = &spawn.webhook_url {
            cmd.args(["--webhook-url", url]);
        }
        cmd.env("RUST_LOG", "warn,caas_gateway=info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file.try_clone()?))
            .stderr(Stdio::from(log_file));
        let child = cmd.spawn().context("starting the gateway")?;
        let mut gw = GatewayProc {
            child,
            http: format!("http://127.0.0.1:{http_port}"),
            mqtt,
            data,
            log,
            _temp: temp,
            spawn: spawn.clone(),
            http_port,
            mqtt_port,
        };
        gw.wait_healthy().await?;
        Ok(gw)
    }

    async fn wait_healthy(&mut self) -> Result<()> {
        let api = self.api()?;
        wait_until_healthy(&api, &mut self.child, &self.log).await
    }

    /// An API client for it.
    pub fn api(&self) -> Result<Api> {
        Api::new(&self.http, &self.spawn.api_token)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the gateway process, bytes.
    pub fn rss(&self) -> u64 {
        crate::rss_of(&self.child.id().to_string())
    }

    /// Stops it (SIGKILL: the gateway's durability must not depend on a clean stop) and
    /// starts it again on the same data directory and ports.
    pub async fn restart(&mut self) -> Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut spawn = self.spawn.clone();
        spawn.data = Some(self.data.clone());
        spawn.ports = Some((self.http_port, self.mqtt_port));
        let mut fresh = GatewayProc::start(&spawn).await?;
        std::mem::swap(&mut self.child, &mut fresh.child);
        // `fresh` now holds the dead child; it owns no temp dir (data was given).
        Ok(())
    }
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last lines of a log file.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Where the `mosquitto` binary is, if installed.
pub fn mosquitto_binary() -> Option<PathBuf> {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("mosquitto");
        if p.is_file() {
            return Some(p);
        }
    }
    ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// A Mosquitto broker on a free loopback port, anonymous, no persistence, with the per-client
/// bounds of the shipped configuration (`gateway/mosquitto/mosquitto.conf`: 100 messages in
/// flight, 1,000 queued), so that the bench measures what is shipped. (Until 2026-12-08 it
/// had 1,000 and 100,000, which hid that those bounds dropped a campaign's reports to a
/// gateway subscribed at QoS 1.)
pub struct Mosquitto {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: SocketAddr,
    _temp: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts it and waits until it accepts connections.
    pub async fn start() -> Result<Mosquitto> {
        let bin = mosquitto_binary()
            .context("mosquitto is not installed (scripts/install-deps.sh installs it)")?;
        let temp = tempfile::Builder::new()
            .prefix("caas-mosquitto-")
            .tempdir()?;
        let port = free_port()?;
        let conf = temp.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_inflight_messages 100\nmax_queued_messages 1000\nmax_connections -1\n\
                 set_tcp_nodelay true\nlog_type error\nlog_dest stderr\n"
            ),
        )?;
        let log = std::fs::File::create(temp.path().join("mosquitto.log"))?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting mosquitto")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if Instant::now() >= deadline {
                bail!("mosquitto did not listen on {addr}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Mosquitto {
            child,
            addr,
            _temp: temp,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the broker, bytes.
    pub fn rss(&self) -> u64 {
        crate::rss_of(&self.child.id().to_string())
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
