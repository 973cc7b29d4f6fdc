//! # caas-tests: end-to-end tests of the whole system
//!
//! The tests in `tests/` start the real programs as processes, each on free loopback ports
//! with its own temporary directory: a gateway (`caas-e2e-sim gateway serve`, which is the
//! `caas-gateway serve` code: embedded broker, or Mosquitto as the external one; sled,
//! signed commands, retries, webhooks) and a fleet of virtual cars (`caas-e2e-sim fleet`, the
//! real agent core over real MQTT connections, with fault injection). The test process
//! itself plays the CaaS core: it calls the IoT API and receives the HMAC-signed callbacks
//! ([`caas_sim::webhook`]); the technician's `caasctl` runs as `caas-e2e-ctl`.
//!
//! This library is the harness: [`Env`] (a gateway, a fleet and a receiver), [`Gateway`]
//! (the gateway process, which a test can kill, signal and start again on its data),
//! [`start_gateway_and_receiver`] (the two without a fleet; [`receiver_and_gateway_opts`]
//! for a gateway with further flags, such as the mTLS listener's), [`AgentProcess`] (the
//! real car agent binary, `caas-e2e-agent`, as one telematics unit, on plain MQTT or mutual
//! TLS), [`caasctl`](fn@caasctl) (the technician's CLI run against the gateway), [`metric`] (one value
//! of the gateway's `/metrics`), [`CommandWatch`] (what the broker delivers on some cars'
//! command topics) and [`listening_addrs`]. `tests/common` has what only test targets can
//! have: the package's binaries' paths. The short retry policies keep the whole run to a
//! couple of minutes on two cores.

use std::collections::HashMap;
use std::io::BufRead;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use caas_sim::api::Api;
use caas_sim::gateway_proc::{free_port, tail, wait_until_healthy};
use caas_sim::stats::FleetReport;
use caas_sim::webhook::Receiver;

pub mod agent;
pub mod ctl;

pub use agent::{AgentProcess, AgentSpec, AgentTls};
pub use ctl::{caasctl, make_key, stdout_of, KeyFiles};

/// Longest wait for a fleet to provision and connect.
pub const FLEET_START_TIMEOUT: Duration = Duration::from_secs(120);

/// The gateway's retry policy for a test.
#[derive(Debug, Clone)]
pub struct Retry {
    /// Attempts per request.
    pub attempts: u32,
    /// Timeout per attempt, e.g. `1s`.
    pub attempt_timeout: &'static str,
    /// Backoff list, e.g. `500ms`.
    pub backoff: &'static str,
}

/// How a test's gateway runs.
#[derive(Debug, Clone)]
pub struct GatewayOpts {
    /// Its retry policy.
    pub retry: Retry,
    /// An external broker (`mqtt://HOST:PORT`) instead of the embedded one.
    pub broker: Option<String>,
    /// Where its callbacks go.
    pub webhook_url: String,
    /// The callbacks' HMAC secret.
    pub webhook_secret: String,
    /// The API token.
    pub token: String,
    /// Its command-signing key file (`--signing-key`); `None` for the default, one the
    /// gateway generates in its data directory.
    pub signing_key: Option<PathBuf>,
    /// Further `serve` flags (the mTLS listener's, say), given after the others.
    pub extra_args: Vec<String>,
}

/// A gateway process (`caas-e2e-sim gateway serve`, the `caas-gateway serve` code) on free
/// loopback ports with its own data directory. Unlike `caas_sim::gateway_proc::GatewayProc`
/// it can be stopped by a signal with its exit status seen, and started again on the same
/// data and ports after either kind of stop. Killed when dropped.
pub struct Gateway {
    child: Option<Child>,
    sim: PathBuf,
    args: Vec<String>,
    /// The IoT API base URL.
    pub http: String,
    /// The broker the cars connect to, `HOST:PORT`.
    pub mqtt: String,
    /// The API token.
    pub token: String,
    /// The output of every start, one after the other.
    pub log: PathBuf,
    dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts a gateway and waits until `/healthz` answers.
    pub async fn start(sim: &Path, opts: &GatewayOpts) -> Result<Gateway> {
        let dir = tempfile::Builder::new()
            .prefix("caas-e2e-gateway-")
            .tempdir()?;
        let http_port = free_port()?;
        let data = dir.path().join("gw");
        let mut args: Vec<String> = vec![
            "gateway".into(),
            "serve".into(),
            "--http".into(),
            format!("127.0.0.1:{http_port}"),
            "--data".into(),
            data.to_string_lossy().into_owned(),
            "--api-token".into(),
            opts.token.clone(),
            "--attempts".into(),
            opts.retry.attempts.to_string(),
            "--attempt-timeout".into(),
            opts.retry.attempt_timeout.into(),
            "--backoff".into(),
            opts.retry.backoff.into(),
            "--webhook-url".into(),
            opts.webhook_url.clone(),
            "--webhook-secret".into(),
            opts.webhook_secret.clone(),
        ];
        if let Some(key) = &opts.signing_key {
            args.extend(["--signing-key".into(), key.to_string_lossy().into_owned()]);
        }
        let mqtt = match &opts.broker {
            Some(url) => {
                args.extend(["--broker".into(), url.clone()]);
                url.split_once("://")
                    .map_or(url.as_str(), |(_, rest)| rest)
                    .to_string()
            }
            None => {
                let addr = format!("127.0.0.1:{}", free_port()?);
                args.extend(["--mqtt".into(), addr.clone()]);
                addr
            }
        };
        args.extend(opts.extra_args.iter().cloned());
        let mut gw = Gateway {
            child: None,
            sim: sim.to_path_buf(),
            args,
            http: format!("http://127.0.0.1:{http_port}"),
            mqtt,
            token: opts.token.clone(),
            log: dir.path().join("gateway.log"),
            dir,
        };
        gw.start_again().await?;
        Ok(gw)
    }

    /// Starts the stopped gateway again with the same flags, data directory and ports, and
    /// waits until `/healthz` answers.
    pub async fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("the gateway is still running");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let child = Command::new(&self.sim)
            .args(&self.args)
            .env("RUST_LOG", "warn,caas_gateway=info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting the gateway")?;
        let child = self.child.insert(child);
        let api = Api::new(&self.http, &self.token)?;
        let started = wait_until_healthy(&api, child, &self.log).await;
        if matches!(child.try_wait(), Ok(Some(_))) {
            self.child = None;
        }
        started
    }

    /// Makes the stopped gateway sign with the key in `path` from its next start on (as an
    /// operator rolling the signing key over restarts it with another `--signing-key`).
    pub fn set_signing_key(&mut self, path: &Path) -> Result<()> {
        if self.child.is_some() {
            bail!("the gateway is still running");
        }
        let path = path.to_string_lossy().into_owned();
        match self.args.iter().position(|a| a == "--signing-key") {
            Some(flag) => {
                let value = self
                    .args
                    .get_mut(flag + 1)
                    .context("--signing-key without its value")?;
                *value = path;
            }
            None => self.args.extend(["--signing-key".into(), path]),
        }
        Ok(())
    }

    /// An API client for it (a new one after a restart: the old one's pooled connections
    /// went with the old process).
    pub fn api(&self) -> Result<Api> {
        Api::new(&self.http, &self.token)
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its data directory.
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("gw")
    }

    /// Everything it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash or a power cut would end it: only what it flushed survives.
    pub fn kill_9(&mut self) -> Result<()> {
        let mut child = self.child.take().context("the gateway is not running")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Sends `signal` (`TERM`, `INT`) and waits up to `within` for the process to end; its
    /// exit status. Past `within` it is killed and this fails.
    pub fn signal(&mut self, signal: &str, within: Duration) -> Result<ExitStatus> {
        let mut child = self.child.take().context("the gateway is not running")?;
        let sent = Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()
            .context("running kill")?;
        if !sent.success() {
            bail!("kill -{signal} failed: {sent}");
        }
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the gateway did not end within {within:?} of SIG{signal}; log {}:\n{}",
                    self.log.display(),
                    tail(&self.log)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET path` with the token, as JSON (for what `Api` has no call for).
    pub async fn get(&self, path: &str) -> Result<serde_json::Value> {
        let resp = reqwest::Client::new()
            .get(format!("{}{path}", self.http))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("GET {path}: HTTP {status}: {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("GET {path}: {text}"))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts the test's webhook receiver, then a gateway with `retry` that calls it back, on
/// the external `broker` (`mqtt://HOST:PORT`) or on its embedded one for `None`.
pub async fn start_gateway_and_receiver(
    sim: &Path,
    broker: Option<&str>,
    retry: Retry,
) -> Result<(Gateway, Receiver)> {
    start_gateway_and_receiver_signing_with(sim, broker, retry, None).await
}

/// [`start_gateway_and_receiver`] with the gateway signing its commands with the key in
/// `signing_key` (`--signing-key`), or with one it generates for `None`.
pub async fn start_gateway_and_receiver_signing_with(
    sim: &Path,
    broker: Option<&str>,
    retry: Retry,
    signing_key: Option<&Path>,
) -> Result<(Gateway, Receiver)> {
    let (receiver, mut opts) = receiver_and_gateway_opts(retry).await?;
    opts.broker = broker.map(str::to_string);
    opts.signing_key = signing_key.map(Path::to_path_buf);
    let gateway = Gateway::start(sim, &opts).await?;
    Ok((gateway, receiver))
}

/// A running webhook receiver, and the options of a gateway (embedded broker) that calls it
/// back, for a test to add to before [`Gateway::start`].
pub async fn receiver_and_gateway_opts(retry: Retry) -> Result<(Receiver, GatewayOpts)> {
    caas_sim::init_crypto();
    let secret = format!("e2e-{:016x}", std::process::id());
    let receiver = Receiver::start(&secret).await?;
    let opts = GatewayOpts {
        retry,
        broker: None,
        webhook_url: receiver.url(),
        webhook_secret: secret,
        // Not the development default, so a client that ignores its token fails.
        token: format!("e2e-token-{:08x}", std::process::id()),
        signing_key: None,
        extra_args: Vec::new(),
    };
    Ok((receiver, opts))
}

/// The value of the metric `name` (a counter or gauge without labels) in the gateway's
/// `/metrics`.
pub async fn metric(api: &Api, name: &str) -> Result<f64> {
    let text = api.metrics().await?;
    text.lines()
        .find_map(|l| {
            let (n, value) = l.split_once(' ')?;
            (n == name).then(|| value.trim().parse().ok())?
        })
        .with_context(|| format!("no {name} in /metrics:\n{text}"))
}

/// A gateway, a fleet and a webhook receiver, all running.
pub struct Env {
    /// The gateway process.
    pub gateway: Gateway,
    /// The test's webhook receiver.
    pub receiver: Receiver,
    /// An IoT API client.
    pub api: Api,
    /// The fleet's VINs, in index order.
    pub vins: Vec<String>,
    /// Each VIN's planned faults (`-`, `silent`, `drop`, `storm`, ...).
    pub faults: HashMap<String, String>,
    fleet: Option<Child>,
    report_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Env {
    /// Starts a gateway with `retry`, then `cars` cars with the extra `fleet_args` (fault
    /// flags), and waits until every car is connected.
    pub async fn start(sim: &Path, cars: u64, retry: Retry, fleet_args: &[&str]) -> Result<Env> {
        Env::start_on(sim, None, cars, retry, fleet_args).await
    }

    /// [`Env::start`] with the gateway and the cars on the external `broker`
    /// (`mqtt://HOST:PORT`), or on the gateway's embedded one for `None`.
    pub async fn start_on(
        sim: &Path,
        broker: Option<&str>,
        cars: u64,
        retry: Retry,
        fleet_args: &[&str],
    ) -> Result<Env> {
        let dir = tempfile::Builder::new().prefix("caas-e2e-").tempdir()?;
        let (gateway, receiver) = start_gateway_and_receiver(sim, broker, retry).await?;
        let api = gateway.api()?;
        let vins_path = dir.path().join("vins.txt");
        let faults_path = dir.path().join("faults.txt");
        let report_path = dir.path().join("report.json");
        let mut child = Command::new(sim)
            .arg("fleet")
            .args(["--gateway", &gateway.http, "--mqtt", &gateway.mqtt])
            .args(["--api-token", &gateway.token])
            .args(["--cars", &cars.to_string(), "--no-progress"])
            .arg("--vins-out")
            .arg(&vins_path)
            .arg("--faults-out")
            .arg(&faults_path)
            .arg("--report")
            .arg(&report_path)
            .args(["--duration", "10m"])
            .args(fleet_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the fleet")?;
        let stderr = child.stderr.take().context("fleet stderr")?;
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + FLEET_START_TIMEOUT;
        let mut seen = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    let ready = line.contains("cars connected; running");
                    seen.push(line);
                    if ready {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("the fleet exited before connecting:\n{}", seen.join("\n"))
                }
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                bail!("the fleet did not connect in time:\n{}", seen.join("\n"));
            }
        }
        let vins: Vec<String> = std::fs::read_to_string(&vins_path)?
            .lines()
            .map(str::to_string)
            .collect();
        let faults = std::fs::read_to_string(&faults_path)?
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(v, f)| (v.to_string(), f.to_string()))
            .collect();
        Ok(Env {
            gateway,
            receiver,
            api,
            vins,
            faults,
            fleet: Some(child),
            report_path,
            _dir: dir,
        })
    }

    /// The VINs whose planned faults include `kind`.
    pub fn with_fault(&self, kind: &str) -> Vec<String> {
        self.vins
            .iter()
            .filter(|v| {
                self.faults
                    .get(*v)
                    .is_some_and(|f| f.split(',').any(|k| k == kind))
            })
            .cloned()
            .collect()
    }

    /// Starts the stopped gateway again on its data and ports, with a fresh API client.
    pub async fn restart_gateway(&mut self) -> Result<()> {
        self.gateway.start_again().await?;
        self.api = self.gateway.api()?;
        Ok(())
    }

    /// Stops the fleet (SIGINT, as Ctrl-C) and reads its final report.
    pub fn stop_fleet(&mut self) -> Result<FleetReport> {
        let mut child = self.fleet.take().context("fleet already stopped")?;
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                bail!("the fleet did not stop on SIGINT");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let text = std::fs::read_to_string(&self.report_path)
            .with_context(|| format!("reading {}", self.report_path.display()))?;
        Ok(serde_json::from_str(&text)?)
    }

    /// Kills the fleet's own process with SIGKILL, as a crash would, giving it no chance to
    /// stop its worker processes itself.
    pub fn kill_fleet(&mut self) -> Result<()> {
        let mut child = self.fleet.take().context("fleet already stopped")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }
}

/// Waits until `ready` holds for what `probe` returns, checking every 100 ms; after
/// `deadline` an error naming `what` and the last value seen.
pub async fn wait_until<T: std::fmt::Debug, F: std::future::Future<Output = T>>(
    what: &str,
    deadline: Duration,
    mut probe: impl FnMut() -> F,
    ready: impl Fn(&T) -> bool,
) -> Result<T> {
    let until = Instant::now() + deadline;
    loop {
        let seen = probe().await;
        if ready(&seen) {
            return Ok(seen);
        }
        if Instant::now() >= until {
            bail!("{what}: not within {deadline:?}; last seen {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Each service's state at the gateway, `(serviceId, status)` sorted, from a car's status
/// as `GET /vehicles/{vin}/status` (and `caasctl vehicle status --json`) answers it.
pub fn service_states(status: &serde_json::Value) -> Result<Vec<(String, String)>> {
    let mut states = status["activeServices"]
        .as_array()
        .with_context(|| format!("no activeServices in {status}"))?
        .iter()
        .map(|s| {
            Ok((
                s["serviceId"]
                    .as_str()
                    .with_context(|| format!("a service without serviceId in {status}"))?
                    .to_string(),
                s["status"]
                    .as_str()
                    .with_context(|| format!("a service without status in {status}"))?
                    .to_string(),
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    states.sort();
    Ok(states)
}

/// Fleet worker processes (`caas-sim fleet --worker-first ...`) running with this VIN prefix.
pub fn fleet_workers(vin_prefix: &str) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|cmd| {
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            args.contains(&b"--worker-first".as_slice())
                && args
                    .windows(2)
                    .any(|w| w == [b"--vin-prefix", vin_prefix.as_bytes()])
        })
        .count()
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut c) = self.fleet.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Every command frame the broker delivers on some cars' command topics, opened with the
/// gateway's key: what those cars were sent, seen from the car's side of the broker.
pub struct CommandWatch {
    seen: Arc<Mutex<HashMap<String, Vec<caas_protocol::Command>>>>,
    unreadable: Arc<AtomicU64>,
    connects: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl CommandWatch {
    /// Subscribes to the command topic of each of `vins` on `broker` (`HOST:PORT`) and
    /// returns once every subscription is acknowledged, so nothing published after that is
    /// missed.
    pub async fn start(
        broker: &str,
        gateway_key: caas_protocol::VerifyingKey,
        vins: &[String],
    ) -> Result<CommandWatch> {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
        let (host, port) = broker
            .rsplit_once(':')
            .with_context(|| format!("broker {broker:?} is not HOST:PORT"))?;
        let port: u16 = port.parse()?;
        let trusted = Arc::new([caas_protocol::TrustedKey::new(gateway_key)]);
        let seen: Arc<Mutex<HashMap<String, Vec<caas_protocol::Command>>>> = Arc::default();
        let unreadable = Arc::new(AtomicU64::new(0));
        let connects = Arc::new(AtomicU64::new(0));
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut tasks = Vec::new();
        for vin in vins {
            let parsed: caas_protocol::Vin = vin.parse().map_err(|e| anyhow!("{vin}: {e:?}"))?;
            let topic = caas_protocol::topics::command_topic(&parsed).to_string();
            // The embedded broker hands a connection to the router of the VIN its client id
            // starts with: the car's own, where its commands are routed.
            let mut opts = MqttOptions::new(format!("{vin}-watch"), host, port);
            opts.set_keep_alive(Duration::from_secs(30));
            let (client, mut events) = AsyncClient::new(opts, 64);
            let (vin, seen, unreadable, connects, trusted, ready) = (
                vin.clone(),
                seen.clone(),
                unreadable.clone(),
                connects.clone(),
                trusted.clone(),
                ready_tx.clone(),
            );
            tasks.push(tokio::spawn(async move {
                loop {
                    match events.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            connects.fetch_add(1, Ordering::Relaxed);
                            let _ = client.try_subscribe(topic.clone(), QoS::AtLeastOnce);
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            let _ = ready.send(());
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            match caas_protocol::open_command(&p.payload, &trusted[..]) {
                                Ok(cmd) => {
                                    if let Ok(mut m) = seen.lock() {
                                        m.entry(vin.clone()).or_default().push(cmd);
                                    }
                                }
                                Err(_) => {
                                    unreadable.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
            }));
        }
        drop(ready_tx);
        let watch = CommandWatch {
            seen,
            unreadable,
            connects,
            tasks,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for n in 0..vins.len() {
            match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
                Ok(Some(())) => {}
                _ => bail!("{n} of {} command topics subscribed in time", vins.len()),
            }
        }
        Ok(watch)
    }

    /// The commands delivered on `vin`'s topic so far, in order.
    pub fn commands(&self, vin: &str) -> Vec<caas_protocol::Command> {
        self.seen
            .lock()
            .map(|m| m.get(vin).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    /// Frames that did not open with the gateway's key.
    pub fn unreadable(&self) -> u64 {
        self.unreadable.load(Ordering::Relaxed)
    }

    /// Connections made (one per car unless one dropped, when a retained command may be
    /// delivered twice).
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }
}

impl Drop for CommandWatch {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The TCP addresses process `pid` listens on, IPv4 and IPv6 (Linux: its socket inodes in
/// `/proc/PID/fd` looked up in `/proc/net/tcp` and `tcp6`).
pub fn listening_addrs(pid: u32) -> Vec<SocketAddr> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    l.to_str()?
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // cols: sl, local, remote, state (0A = LISTEN), tx:rx, tr:when, retrnsmt, uid,
            // timeout, inode.
            if cols.len() < 10 || cols[3] != "0A" || !inodes.iter().any(|i| i == cols[9]) {
                continue;
            }
            if let Some(addr) = proc_net_addr(cols[1]) {
                out.push(addr);
            }
        }
    }
    out
}

/// `0100007F:1F90` → `127.0.0.1:8080`: the kernel prints the address's bytes as 32-bit
/// words in the machine's own byte order (IPv4 one word, IPv6 four), the port as a number.
fn proc_net_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16))
        .collect::<Result<_, _>>()
        .ok()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let ip = match bytes.len() {
        4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_addresses_read_as_the_kernel_writes_them() {
        assert_eq!(
            proc_net_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            proc_net_addr("00000000000000000000000001000000:075B"),
            Some("[::1]:1883".parse().unwrap())
        );
        assert_eq!(proc_net_addr("nonsense"), None);
    }
}
