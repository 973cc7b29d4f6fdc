//! A fleet of virtual cars in this process: provisioning, connecting, running, reporting.
//!
//! Provisioning derives each car's key from the fleet seed and its index and registers it
//! with `POST /vehicles` ([`PROVISION_CONCURRENCY`] requests at a time). Connecting is
//! paced (`connect_rate` per second) and bounded ([`FleetOptions::max_connecting`]
//! handshakes at once), so ten thousand cars do not hit the broker's accept loop at once.
//! Every car is one tokio task on the process's one runtime.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use caas_protocol::{FirmwareVersion, TrustedKey, VerifyingKey, Vin};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::api::Api;
use crate::car::{self, CarShared, CarSpec, FleetContext, Pacer};
use crate::faults::FaultPlan;
use crate::stats::{FleetReport, FleetStats, Percentiles};

/// Concurrent `POST /vehicles` requests while provisioning.
pub const PROVISION_CONCURRENCY: usize = 32;
/// Most cars one process runs; above it `caas-sim fleet` spreads cars over worker
/// processes (each car holds one socket, and a process here may open 20,000 files).
pub const MAX_CARS_PER_PROCESS: u64 = 15_000;

/// How to build a fleet.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// The gateway's base URL (for provisioning and its key).
    pub gateway: String,
    /// The IoT API token.
    pub api_token: String,
    /// CA certificates (PEM) trusted for an https:// gateway, besides the public roots.
    pub gateway_ca: Option<std::path::PathBuf>,
    /// The broker, `HOST:PORT`, or several addresses of it separated by commas (cars are
    /// spread over them round-robin).
    pub mqtt: String,
    /// Cars in this process.
    pub cars: u64,
    /// Index of the first car (worker processes take slices).
    pub first_index: u64,
    /// Seed of the cars' keys.
    pub seed: u64,
    /// The 6-character VIN prefix.
    pub vin_prefix: String,
    /// First connections per second (0: unpaced).
    pub connect_rate: u32,
    /// Most handshakes in flight at once.
    pub max_connecting: usize,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Seconds between periodic reports (0: none).
    pub report_interval_secs: u64,
    /// Faults.
    pub faults: FaultPlan,
    /// The gateway key to trust; fetched from `GET /keys` when `None`.
    pub gateway_key: Option<VerifyingKey>,
    /// Register the cars with `POST /vehicles` (off when they already are).
    pub provision: bool,
    /// Show progress bars.
    pub progress: bool,
    /// The cars' platform (default: the seed catalogue).
    pub platform: Option<PlatformSpec>,
}

/// A car platform: its name (as registered) and its feature catalogue.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformSpec {
    /// The platform name sent with `POST /vehicles`.
    pub name: String,
    /// Feature flags commands may switch.
    pub optional: Vec<String>,
    /// Base-platform features no command may touch.
    pub base: Vec<String>,
}

impl PlatformSpec {
    /// Checks the names (feature-flag syntax, no flag in both lists).
    pub fn validate(&self) -> Result<()> {
        for f in self.optional.iter().chain(&self.base) {
            caas_protocol::FeatureFlag::new(f)
                .map_err(|e| anyhow::anyhow!("platform {}: feature `{f}`: {e}", self.name))?;
        }
        if let Some(f) = self.optional.iter().find(|f| self.base.contains(f)) {
            bail!("platform {}: `{f}` is both optional and base", self.name);
        }
        Ok(())
    }

    /// The catalogue, with names leaked once for the fleet's lifetime (the core's
    /// `Catalog` borrows `'static` lists so that every car shares one copy).
    fn leak(&self) -> caas_agent::Catalog<'static> {
        let leak_list = |v: &Vec<String>| -> &'static [&'static str] {
            let names: Vec<&'static str> = v
                .iter()
                .map(|s| &*Box::leak(s.clone().into_boxed_str()))
                .collect();
            Box::leak(names.into_boxed_slice())
        };
        caas_agent::Catalog {
            optional: leak_list(&self.optional),
            base: leak_list(&self.base),
        }
    }
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions {
            gateway: "http://127.0.0.1:8080".to_string(),
            api_token: "dev-token".to_string(),
            gateway_ca: None,
            mqtt: "127.0.0.1:1883".to_string(),
            cars: 100,
            first_index: 0,
            seed: 1,
            vin_prefix: "SMVAAA".to_string(),
            connect_rate: 2_000,
            max_connecting: 256,
            keep_alive: Duration::from_secs(60),
            report_interval_secs: 0,
            faults: FaultPlan::default(),
            gateway_key: None,
            provision: true,
            progress: true,
            platform: None,
        }
    }
}

/// Splits `HOST:PORT` (accepts `mqtt://HOST:PORT` too).
pub fn split_host_port(addr: &str) -> Result<(String, u16)> {
    let a = addr
        .trim()
        .trim_start_matches("mqtt://")
        .trim_start_matches("tcp://");
    let (host, port) = a
        .rsplit_once(':')
        .with_context(|| format!("`{addr}` is not HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("`{addr}`: bad port"))?;
    if host.is_empty() {
        bail!("`{addr}`: empty host");
    }
    Ok((host.to_string(), port))
}

/// One car as the fleet's owner sees it.
#[derive(Clone)]
pub struct CarHandle {
    /// The car's index in the fleet.
    pub index: u64,
    /// Its VIN.
    pub vin: Vin,
    /// Its live state and fault switches.
    pub shared: Arc<CarShared>,
    /// Its faults as planned (`-` for none).
    pub faults: String,
}

/// A running fleet.
pub struct Fleet {
    /// The cars.
    pub cars: Vec<CarHandle>,
    /// Live counters.
    pub stats: Arc<FleetStats>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    started: Instant,
    connect_started: Instant,
    rss_before: u64,
    connected_after: Option<Duration>,
    rss_connected: u64,
    offline_at_start: u64,
}

/// A styled progress bar (hidden when `show` is false).
pub fn bar(len: u64, msg: &str, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    let style = ProgressStyle::with_template(
        "{msg:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec})",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style);
    pb.set_message(msg.to_string());
    pb
}

/// Registers cars `first..first+count` with the gateway.
pub async fn provision(api: &Api, opts: &FleetOptions) -> Result<()> {
    let pb = bar(opts.cars, "provisioning", opts.progress);
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..PROVISION_CONCURRENCY.min(opts.cars.max(1) as usize) {
        let api = api.clone();
        let next = next.clone();
        let pb = pb.clone();
        let opts = opts.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= opts.cars {
                    return Ok::<(), anyhow::Error>(());
                }
                let index = opts.first_index + i;
                let vin = car::car_vin(&opts.vin_prefix, index).map_err(anyhow::Error::msg)?;
                let key = car::car_key(opts.seed, index).verifying_key();
                let hex = caas_protocol::verifying_key_to_hex(&key);
                let platform = opts
                    .platform
                    .as_ref()
                    .map_or(car::SEED_PLATFORM, |p| p.name.as_str());
                api.register_vehicle(vin.as_str(), &hex, platform, FIRMWARE)
                    .await?;
                pb.inc(1);
            }
        }));
    }
    for w in workers {
        w.await.context("provisioning task")??;
    }
    pb.finish_and_clear();
    Ok(())
}

/// The firmware version the simulated cars report.
pub const FIRMWARE: &str = "sim-1.0.0";

impl Fleet {
    /// Provisions (unless told not to) and starts the cars; returns at once, the cars connect
    /// in the background (see [`Fleet::wait_connected`]).
    pub async fn start(opts: &FleetOptions) -> Result<Fleet> {
        opts.faults.validate().map_err(anyhow::Error::msg)?;
        if let Some(p) = &opts.platform {
            p.validate()?;
        }
        let api = Api::with_ca(&opts.gateway, &opts.api_token, opts.gateway_ca.as_deref())?;
        let gateway_key = match opts.gateway_key {
            Some(k) => k,
            None => api
                .gateway_key()
                .await
                .context("fetching the gateway's public key")?,
        };
        if opts.provision {
            provision(&api, opts).await?;
        }
        let brokers = opts
            .mqtt
            .split(',')
            .filter(|a| !a.trim().is_empty())
            .map(split_host_port)
            .collect::<Result<Vec<_>>>()?;
        if brokers.is_empty() {
            bail!("no MQTT broker address");
        }
        let mut trusted = heapless::Vec::new();
        // Every car verifies with the one gateway key: its tables (made once, shared by all
        // the cars) make each verification a quarter cheaper, as in the Linux agent.
        let _ = trusted.push(TrustedKey::with_tables(gateway_key));
        let stats = Arc::new(FleetStats::default());
        let (shutdown, shutdown_rx) = watch::channel(false);
        let ctx = Arc::new(FleetContext {
            brokers,
            trusted,
            platform: match &opts.platform {
                Some(p) => p.leak(),
                None => car::seed_catalog(),
            },
            firmware: FirmwareVersion::new(FIRMWARE).map_err(|e| anyhow::anyhow!("{e}"))?,
            report_interval_secs: opts.report_interval_secs,
            keep_alive: opts.keep_alive,
            stats: stats.clone(),
            connect_gate: Arc::new(Semaphore::new(opts.max_connecting.max(1))),
            pacer: Pacer::new(opts.connect_rate),
            corrupt: opts.faults.corrupt,
            net_delay: opts.faults.net_delay,
            shutdown: shutdown_rx,
            epoch: Instant::now(),
        });
        let rss_before = crate::rss_bytes();
        let mut cars = Vec::with_capacity(opts.cars as usize);
        let mut tasks = Vec::with_capacity(opts.cars as usize);
        let mut offline_at_start = 0;
        for i in 0..opts.cars {
            let index = opts.first_index + i;
            let vin = car::car_vin(&opts.vin_prefix, index).map_err(anyhow::Error::msg)?;
            let faults = opts.faults.for_car(index);
            if faults.offline_for.is_some() {
                offline_at_start += 1;
            }
            let shared = Arc::new(CarShared::new(&faults));
            cars.push(CarHandle {
                index,
                vin,
                shared: shared.clone(),
                faults: faults.describe(),
            });
            let spec = CarSpec {
                vin,
                key: car::car_key(opts.seed, index),
                faults,
                shared,
                broker_slot: index as usize,
            };
            tasks.push(tokio::spawn(car::run_car(spec, ctx.clone())));
        }
        let now = Instant::now();
        Ok(Fleet {
            cars,
            stats,
            shutdown,
            tasks,
            started: now,
            connect_started: now,
            rss_before,
            connected_after: None,
            rss_connected: 0,
            offline_at_start,
        })
    }

    /// Waits until every car not held offline has connected once (or `timeout`), with a
    /// progress bar; returns how many connected.
    pub async fn wait_connected(&mut self, timeout: Duration, progress: bool) -> u64 {
        let target = self.cars.len() as u64 - self.offline_at_start;
        let pb = bar(target, "connecting", progress);
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.stats.ever_connected.load(Ordering::Relaxed);
            pb.set_position(n.min(target));
            if n >= target || Instant::now() >= deadline {
                pb.finish_and_clear();
                if self.connected_after.is_none() {
                    self.connected_after = Some(self.connect_started.elapsed());
                    self.rss_connected = crate::rss_bytes();
                }
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The VINs, in index order.
    pub fn vins(&self) -> Vec<String> {
        self.cars
            .iter()
            .map(|c| c.vin.as_str().to_string())
            .collect()
    }

    /// The car with `vin`.
    pub fn car(&self, vin: &str) -> Option<&CarHandle> {
        self.cars.iter().find(|c| c.vin.as_str() == vin)
    }

    /// The report as of now (the fleet keeps running).
    pub fn report(&self) -> FleetReport {
        let counters = self.stats.counters();
        let connect_secs = self
            .connected_after
            .unwrap_or_else(|| self.connect_started.elapsed())
            .as_secs_f64();
        let rss = if self.rss_connected > 0 {
            self.rss_connected
        } else {
            crate::rss_bytes()
        };
        let cars = self.cars.len() as u64;
        let pct = |slot: &std::sync::Mutex<Option<hdrhistogram::Histogram<u64>>>| {
            slot.lock()
                .ok()
                .and_then(|g| g.as_ref().map(Percentiles::of))
                .unwrap_or_default()
        };
        FleetReport {
            cars,
            workers: 1,
            cars_connected: counters.ever_connected,
            connect_secs,
            connect_rate_per_sec: if connect_secs > 0.0 {
                counters.ever_connected as f64 / connect_secs
            } else {
                0.0
            },
            run_secs: self.started.elapsed().as_secs_f64(),
            handle_latency: pct(&self.stats.handle_latency),
            connect_latency: pct(&self.stats.connect_latency),
            counters,
            rss_bytes: rss,
            memory_per_car_bytes: rss.saturating_sub(self.rss_before) / cars.max(1),
        }
    }

    /// Stops every car (each sends DISCONNECT) and returns the final report.
    pub async fn stop(self) -> FleetReport {
        let report = self.report();
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses_parse() {
        assert_eq!(
            split_host_port("127.0.0.1:1883").unwrap(),
            ("127.0.0.1".to_string(), 1883)
        );
        assert_eq!(
            split_host_port("mqtt://localhost:1884").unwrap(),
            ("localhost".to_string(), 1884)
        );
        assert!(split_host_port("localhost").is_err());
        assert!(split_host_port(":1").is_err());
        assert!(split_host_port("h:99999").is_err());
    }
}
