//! # caas-tests: end-to-end tests of the whole system
//!
//! The tests in `tests/` start the real programs as processes, each on free loopback ports
//! with its own temporary directory: a gateway (`caas-e2e-sim gateway serve`, which is the
//! `caas-gateway serve` code: embedded broker, sled, signed commands, retries, webhooks) and
//! a fleet of 200 virtual cars (`caas-e2e-sim fleet`, the real agent core over real MQTT
//! connections, with fault injection). The test process itself plays the CaaS core: it
//! calls the IoT API and receives the HMAC-signed callbacks ([`caas_sim::webhook`]).
//!
//! This library is the harness ([`Env`]); the short retry policies keep the whole run to a
//! couple of minutes on two cores.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use caas_sim::api::Api;
use caas_sim::gateway_proc::{GatewayProc, GatewaySpawn};
use caas_sim::stats::FleetReport;
use caas_sim::webhook::Receiver;

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

/// A gateway, a fleet and a webhook receiver, all running.
pub struct Env {
    /// The gateway process.
    pub gateway: GatewayProc,
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
        caas_sim::init_crypto();
        let dir = tempfile::Builder::new().prefix("caas-e2e-").tempdir()?;
        let secret = format!("e2e-{:016x}", std::process::id());
        let receiver = Receiver::start(&secret).await?;
        let spawn = GatewaySpawn {
            sim_binary: Some(sim.to_path_buf()),
            webhook_url: Some(receiver.url()),
            webhook_secret: secret,
            attempts: retry.attempts,
            attempt_timeout: retry.attempt_timeout.to_string(),
            backoff: retry.backoff.to_string(),
            ..GatewaySpawn::default()
        };
        let gateway = GatewayProc::start(&spawn).await?;
        let api = gateway.api()?;
        let vins_path = dir.path().join("vins.txt");
        let faults_path = dir.path().join("faults.txt");
        let report_path = dir.path().join("report.json");
        let mut child = Command::new(sim)
            .arg("fleet")
            .args(["--gateway", &gateway.http, "--mqtt", &gateway.mqtt])
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
