//! `caas-sim bench`: the performance table, embedded broker vs Mosquitto, side by side.
//!
//! For each broker it starts a fresh gateway process (temporary data directory, webhooks to
//! this process), connects the fleet (in this process), then measures, in this order:
//!
//! 1. cars connected and the connect rate;
//! 2. a campaign to every car, the first after the gateway started, until every request is
//!    final (`GET /campaigns/{id}`), then a repeat with another service;
//! 3. p50/p99 POST→callback latency at a fixed rate (default 1,000/s), and the floor under
//!    it at the same rate: bare MQTT round trips through the same broker and bare HTTP
//!    round trips to the gateway ([`crate::floor`]);
//! 4. the highest rate, of a rising list (stopping after two misses in a row), whose p99
//!    POST→callback stays under 50 ms and that the run actually achieves (end to end: POST → signed command → car verifies,
//!    persists, applies → signed report → callback);
//! 5. memory: gateway (and Mosquitto) resident growth per connected car, and the
//!    simulator's;
//! 6. CPU per activation by process (gateway, Mosquitto, the fleet's processes, and this
//!    process, the load driver: POSTs and callback checks) over the fixed-rate run of 3, and
//!    CPU per car over each campaign of 2, from the `/proc/PID/stat` user + system times
//!    before and after each phase.
//!
//! With `--baseline BIN`, each broker's column is run again right after with that gateway
//! binary (a previous build), and rows of this build's figures over the baseline's close the
//! table: one run, one hour of the machine, for both.
//!
//! These are measurements, printed as a markdown table; nothing is asserted. Both sides
//! share the same machine, so the simulator's own CPU use is part of every number; CPU per
//! activation is the figure that holds on a busy machine, where latencies and rates move
//! with whatever else runs.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;

use crate::cli::FleetChild;
use crate::fleet::FleetOptions;
use crate::floor::{disk_flushes, http_round_trips, mqtt_round_trips, Floor};
use crate::gateway_proc::{GatewayProc, GatewaySpawn, Mosquitto};
use crate::scenario::{run_scenario, samples_csv, Scenario, ServiceMix};

/// Longest the bench waits for the campaigns' callbacks before timing single requests.
const CALLBACK_DRAIN: Duration = Duration::from_secs(120);
use crate::webhook::Receiver;

/// `caas-sim bench` flags.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Number of cars.
    #[arg(long, default_value_t = 10_000)]
    pub cars: u64,
    /// Rates tried, rising, for the sustained-rate search (per second).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "250,500,1000,1500,2000,2500,3000,4000,5000,6000,8000,10000"
    )]
    pub rates: Vec<f64>,
    /// How long each rate of the search runs.
    #[arg(long, value_parser = crate::parse_duration, default_value = "5s")]
    pub step: Duration,
    /// The p99 bound of the sustained rate, in milliseconds.
    #[arg(long, default_value_t = 50.0)]
    pub p99_ms: f64,
    /// The fixed rate of the latency row.
    #[arg(long, default_value_t = 1000.0)]
    pub latency_rate: f64,
    /// How long the latency row runs.
    #[arg(long, value_parser = crate::parse_duration, default_value = "10s")]
    pub latency_duration: Duration,
    /// Only this broker: `embedded` or `mosquitto`.
    #[arg(long)]
    pub only: Option<String>,
    /// Also write the table here.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Write the latency row's requests as CSV, one file per column (`DIR/latency-BROKER.csv`,
    /// `latency-BROKER-baseline.csv` for a `--baseline` column; the columns of `run --samples`).
    #[arg(long)]
    pub samples: Option<std::path::PathBuf>,
    /// No progress bars.
    #[arg(long)]
    pub no_progress: bool,
    /// A second `caas-gateway` binary (say, built from the previous commit): each broker's
    /// column is run again with it right after, so that the two share the hour of this
    /// shared machine, and rows of ratios (this build ÷ baseline) close the table. The
    /// cars, the driver and the webhook receiver are this build's in both.
    #[arg(long)]
    pub baseline: Option<std::path::PathBuf>,
}

/// One column of the table.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Column {
    /// Broker name.
    pub broker: String,
    /// Run with the `--baseline` gateway.
    pub baseline: bool,
    /// Cars connected.
    pub connected: u64,
    /// Cars per second while connecting.
    pub connect_rate: f64,
    /// Highest rate that kept p99 under the bound (0 if none did).
    pub sustained_rate: f64,
    /// p99 at that rate, ms.
    pub sustained_p99_ms: f64,
    /// p50 at the latency rate, ms.
    pub p50_ms: f64,
    /// p99 at the latency rate, ms.
    pub p99_ms: f64,
    /// Achieved rate of the latency row.
    pub latency_achieved: f64,
    /// The latency row's mean time per stage, from the gateway's histograms, ms.
    pub stages: Option<StageMeans>,
    /// The machine's floor at the latency rate: bare MQTT round trips (two broker hops).
    pub floor_mqtt: Option<Floor>,
    /// The machine's floor at the latency rate: bare HTTP round trips (`GET /healthz`).
    pub floor_http: Option<Floor>,
    /// The machine's floor at the latency rate: bare disk flushes (4 KiB + `fdatasync`).
    pub floor_disk: Option<Floor>,
    /// Campaign to every car, first after start, seconds.
    pub campaign_first_secs: f64,
    /// Campaign repeat, seconds.
    pub campaign_repeat_secs: f64,
    /// Gateway resident growth per connected car, bytes.
    pub gateway_per_car: u64,
    /// Mosquitto resident growth per connected car, bytes (external broker only).
    pub broker_per_car: Option<u64>,
    /// Simulator memory per car, bytes.
    pub sim_per_car: u64,
    /// CPU per activation over the fixed-rate run, µs.
    pub cpu_per_activation: CpuShare,
    /// CPU per car over the first campaign, µs.
    pub cpu_per_car_first: CpuShare,
    /// CPU per car over the repeat campaign, µs.
    pub cpu_per_car_repeat: CpuShare,
    /// Callbacks that were not exactly one per request, over the whole column.
    pub callback_anomalies: u64,
    /// Requests the gateway refused or that failed in HTTP, over the whole column (load
    /// beyond what it keeps up with shows here, not as a callback anomaly).
    pub http_errors: u64,
    /// The first of those HTTP errors.
    pub first_http_error: Option<String>,
    /// What went wrong, if something did.
    pub error: Option<String>,
}

/// Mean time per stage of a run, from the gateway's `/metrics` histograms (their sums and
/// counts before and after it), in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct StageMeans {
    /// `caas_accept_seconds`: arrival to the durable 2xx.
    pub accept_ms: f64,
    /// `caas_activation_latency_seconds`: arrival to the car's confirming report.
    pub report_ms: f64,
    /// `caas_callback_delivery_seconds`: final state to the callback's 2xx.
    pub callback_ms: f64,
}

impl StageMeans {
    /// The means over what happened between two `/metrics` texts (`None` if a histogram is
    /// missing or saw nothing new).
    pub fn between(before: &str, after: &str) -> Option<StageMeans> {
        let mean = |name: &str| {
            let sum =
                metric(after, &format!("{name}_sum"))? - metric(before, &format!("{name}_sum"))?;
            let count = metric(after, &format!("{name}_count"))?
                - metric(before, &format!("{name}_count"))?;
            (count > 0.0).then(|| sum / count * 1e3)
        };
        Some(StageMeans {
            accept_ms: mean("caas_accept_seconds")?,
            report_ms: mean("caas_activation_latency_seconds")?,
            callback_ms: mean("caas_callback_delivery_seconds")?,
        })
    }
}

/// The value of the unlabelled sample `name` in a Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// CPU time of one phase by process, in µs per unit of work (activation or car); `None`
/// where not measured.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CpuShare {
    /// The gateway process (with the embedded broker, when it is the broker).
    pub gateway: Option<f64>,
    /// The Mosquitto process (external broker only).
    pub broker: Option<f64>,
    /// The fleet: its process and every worker process below it.
    pub fleet: Option<f64>,
    /// This process: the load driver (POSTs, webhook receiver, campaign polling).
    pub driver: Option<f64>,
}

/// One process's figure of a [`CpuShare`].
type ShareOf = fn(&CpuShare) -> Option<f64>;

/// The processes of one column whose CPU time is read.
struct Procs {
    gateway: u32,
    broker: Option<u32>,
    fleet: u32,
}

/// CPU seconds used so far by each process of a column.
#[derive(Clone, Copy)]
struct CpuSnap {
    gateway: Option<f64>,
    broker: Option<f64>,
    fleet: Option<f64>,
    driver: Option<f64>,
}

impl Procs {
    fn snap(&self) -> CpuSnap {
        CpuSnap {
            gateway: crate::cpu_secs_of(&self.gateway.to_string()),
            broker: self.broker.and_then(|p| crate::cpu_secs_of(&p.to_string())),
            fleet: crate::cpu_secs_of_tree(self.fleet),
            driver: crate::cpu_secs_of("self"),
        }
    }
}

impl CpuSnap {
    /// µs per unit of work between `self` and `later`, over `units`.
    fn per(&self, later: &CpuSnap, units: u64) -> CpuShare {
        let per = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if units > 0 => Some((b - a).max(0.0) * 1e6 / units as f64),
            _ => None,
        };
        CpuShare {
            gateway: per(self.gateway, later.gateway),
            broker: per(self.broker, later.broker),
            fleet: per(self.fleet, later.fleet),
            driver: per(self.driver, later.driver),
        }
    }
}

fn svc(id: &str, flag: &str) -> ServiceMix {
    ServiceMix {
        service_id: id.to_string(),
        flags: vec![flag.to_string()],
        lasting: "subscription".to_string(),
        expires_in: None,
        weight: 1,
    }
}

async fn column(a: &BenchArgs, broker: &str, baseline: Option<&std::path::Path>) -> Result<Column> {
    let mut col = Column {
        broker: broker.to_string(),
        baseline: baseline.is_some(),
        ..Column::default()
    };
    let tag = col.tag();
    let broker = tag.as_str();
    let mosquitto = if col.broker == "mosquitto" {
        Some(Mosquitto::start().await?)
    } else {
        None
    };
    let secret = format!("bench-{:016x}", rand::random::<u64>());
    let receiver = Receiver::start(&secret).await?;
    let spawn = GatewaySpawn {
        broker: mosquitto.as_ref().map(|m| format!("mqtt://{}", m.addr)),
        webhook_url: Some(receiver.url()),
        webhook_secret: secret,
        attempts: 3,
        attempt_timeout: "30s".to_string(),
        backoff: "1s".to_string(),
        binary: baseline.map(std::path::Path::to_path_buf),
        ..GatewaySpawn::default()
    };
    let gateway = GatewayProc::start(&spawn)
        .await
        .context("starting the gateway")?;
    let api = gateway.api()?;
    // The gateway's baseline is taken before the cars are registered: it keeps what it has
    // used and faults a heap reserve in per registered car (gateway/README.md, "Memory"),
    // so its resident size after connecting counts registration, connections and reserve.
    let gw_before = gateway.rss();
    let progress = !a.no_progress;
    let seed: u64 = rand::random();
    let prefix = crate::car::random_prefix();
    let opts = FleetOptions {
        gateway: gateway.http.clone(),
        mqtt: gateway.mqtt.clone(),
        cars: a.cars,
        seed,
        vin_prefix: prefix.clone(),
        progress,
        ..FleetOptions::default()
    };
    crate::fleet::provision(&api, &opts).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let broker_before = mosquitto.as_ref().map(|m| m.rss());
    // The cars run in their own process, so their memory and the gateway's are apart.
    let mut fleet = FleetChild::spawn(
        &gateway.http,
        &gateway.mqtt,
        a.cars,
        seed,
        &prefix,
        &[
            "--no-provision".to_string(),
            "--keep-alive".to_string(),
            "120s".to_string(),
        ],
    )?;
    let t0 = Instant::now();
    col.connected = fleet
        .wait_connected(a.cars, Duration::from_secs(600), progress)
        .await;
    col.connect_rate = col.connected as f64 / t0.elapsed().as_secs_f64().max(1e-9);
    if col.connected < a.cars {
        col.error = Some(format!(
            "only {} of {} cars connected (connections stalled)",
            col.connected, a.cars
        ));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cars = col.connected.max(1);
    col.gateway_per_car = gateway.rss().saturating_sub(gw_before) / cars;
    col.broker_per_car = match (&mosquitto, broker_before) {
        (Some(m), Some(b)) => Some(m.rss().saturating_sub(b) / cars),
        _ => None,
    };
    eprintln!(
        "bench[{broker}]: {} cars connected at {:.0}/s",
        col.connected, col.connect_rate
    );
    let procs = Procs {
        gateway: gateway.pid(),
        broker: mosquitto.as_ref().map(Mosquitto::pid),
        fleet: fleet.pid(),
    };
    let vins: Vec<String> = (0..a.cars)
        .map(|i| crate::car::car_vin(&prefix, i).map(|v| v.as_str().to_string()))
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;

    let received_before = receiver.counts().received;
    for (i, (id, flag)) in [
        ("streaming", "streaming"),
        ("premium-audio", "premium_audio"),
    ]
    .iter()
    .enumerate()
    {
        let t = Instant::now();
        let cpu0 = procs.snap();
        let cid = api
            .campaign(
                &vins,
                true,
                id,
                &[flag.to_string()],
                &crate::api::Lasting::Subscription { auto_renewal: true },
            )
            .await?;
        let (ok, counts) =
            crate::demo::wait_campaign(&api, &cid, vins.len(), Duration::from_secs(600)).await;
        let secs = t.elapsed().as_secs_f64();
        let cpu = cpu0.per(&procs.snap(), vins.len() as u64);
        if i == 0 {
            col.campaign_first_secs = secs;
            col.cpu_per_car_first = cpu;
        } else {
            col.campaign_repeat_secs = secs;
            col.cpu_per_car_repeat = cpu;
        }
        eprintln!(
            "bench[{broker}]: campaign {} in {secs:.2} s ({counts})",
            i + 1
        );
        if !ok {
            col.error = Some(format!("campaign {}: {counts}", i + 1));
        }
    }
    // The campaigns are done when every car has confirmed; their callbacks may still be on
    // their way. Timing single requests while thousands of callbacks are delivered would
    // measure that backlog, so wait for it (bounded), then a little for the store writes
    // that follow deliveries.
    let callbacks = 2 * vins.len() as u64;
    let t = Instant::now();
    while receiver.counts().received.saturating_sub(received_before) < callbacks
        && t.elapsed() < CALLBACK_DRAIN
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "bench[{broker}]: campaign callbacks {} of {callbacks} in after {:.2} s more",
        receiver.counts().received.saturating_sub(received_before),
        t.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mix = vec![
        svc("power-boost", "power_boost"),
        svc("heated-seats", "heated_seats"),
        svc("snow-mode", "snow_mode"),
        svc("sport-mode", "sport_mode"),
    ];
    let scenario = |rate: f64, d: Duration| Scenario {
        rate,
        duration: format!("{}ms", d.as_millis()),
        deactivate_share: 0.0,
        settle: "30s".to_string(),
        services: mix.clone(),
        ..Scenario::default()
    };
    receiver.reset_latency();
    let cpu0 = procs.snap();
    let metrics_before = api.metrics().await.ok();
    let r = run_scenario(
        &api,
        &receiver,
        &vins,
        &scenario(a.latency_rate, a.latency_duration),
    )
    .await?;
    col.cpu_per_activation = cpu0.per(&procs.snap(), r.accepted);
    col.stages = match (metrics_before, api.metrics().await.ok()) {
        (Some(before), Some(after)) => StageMeans::between(&before, &after),
        _ => None,
    };
    if let Some(dir) = &a.samples {
        let path = dir.join(format!("latency-{broker}.csv"));
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&path, samples_csv(&receiver.samples())))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    col.p50_ms = r.callback_latency.p50_ms;
    col.p99_ms = r.callback_latency.p99_ms;
    col.latency_achieved = r.achieved_rate;
    col.count_anomalies(&r);
    eprintln!(
        "bench[{broker}]: {:.0}/s → {}{}",
        a.latency_rate,
        r.callback_latency.line(),
        anomalies(&r)
    );
    // The floor under that row: the same rate over the bare transports, fleet connected.
    let (rate, d) = (a.latency_rate, a.latency_duration);
    col.floor_mqtt = noted(
        broker,
        "MQTT round trips",
        mqtt_round_trips(&gateway.mqtt, rate, d).await,
    );
    col.floor_http = noted(
        broker,
        "HTTP round trips",
        http_round_trips(&gateway.http, rate, d).await,
    );
    col.floor_disk = noted(
        broker,
        "disk flush",
        disk_flushes(&gateway.data, rate, d).await,
    );
    let mut misses = 0;
    for &rate in &a.rates {
        receiver.reset_latency();
        let r = run_scenario(&api, &receiver, &vins, &scenario(rate, a.step)).await?;
        col.count_anomalies(&r);
        let p99 = r.callback_latency.p99_ms;
        let kept_up = r.achieved_rate >= 0.95 * rate
            && r.skipped == 0
            && r.no_callback == 0
            && r.http_errors == 0;
        eprintln!(
            "bench[{broker}]: {rate:.0}/s (achieved {:.0}/s) → p99 {p99:.1} ms{}{}",
            r.achieved_rate,
            if kept_up { "" } else { " (did not keep up)" },
            anomalies(&r)
        );
        if p99 < a.p99_ms && kept_up {
            misses = 0;
            if r.achieved_rate > col.sustained_rate {
                col.sustained_rate = r.achieved_rate;
                col.sustained_p99_ms = p99;
            }
        } else {
            // One miss on a shared machine can be noise; two in a row end the search.
            misses += 1;
            if misses >= 2 {
                break;
            }
        }
    }
    if let Some(report) = fleet.stop().await {
        col.sim_per_car = report.memory_per_car_bytes;
        if report.connect_secs > 0.0 {
            col.connect_rate = report.connect_rate_per_sec;
        }
    }
    drop(gateway);
    drop(mosquitto);
    Ok(col)
}

impl Column {
    /// The column's name in progress lines and sample files: the broker, and `-baseline`
    /// for the `--baseline` gateway's run.
    fn tag(&self) -> String {
        if self.baseline {
            format!("{}-baseline", self.broker)
        } else {
            self.broker.clone()
        }
    }

    fn count_anomalies(&mut self, r: &crate::scenario::RunReport) {
        self.callback_anomalies += r.no_callback + r.several_callbacks;
        self.http_errors += r.http_errors;
        if self.first_http_error.is_none() {
            self.first_http_error.clone_from(&r.first_error);
        }
    }
}

/// What went wrong in one run, for the progress line (empty when nothing did).
fn anomalies(r: &crate::scenario::RunReport) -> String {
    if r.no_callback + r.several_callbacks + r.http_errors + r.skipped == 0 {
        return String::new();
    }
    format!(
        "; {} without callback, {} with several, {} HTTP errors{}, {} ticks skipped",
        r.no_callback,
        r.several_callbacks,
        r.http_errors,
        r.first_error
            .as_deref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
        r.skipped
    )
}

fn kib(b: u64) -> String {
    format!("{:.1} KiB", b as f64 / 1024.0)
}

/// The markdown table.
pub fn table(cols: &[Column], a: &BenchArgs) -> String {
    let mut rows: Vec<(String, Vec<String>)> = vec![
        (
            "cars connected".into(),
            cols.iter().map(|c| c.connected.to_string()).collect(),
        ),
        (
            "connect rate".into(),
            cols.iter()
                .map(|c| format!("{:.0} cars/s", c.connect_rate))
                .collect(),
        ),
        (
            format!(
                "sustained activations/s end to end with p99 < {:.0} ms",
                a.p99_ms
            ),
            cols.iter()
                .map(|c| {
                    if c.sustained_rate > 0.0 {
                        format!(
                            "{:.0}/s (p99 {:.1} ms)",
                            c.sustained_rate, c.sustained_p99_ms
                        )
                    } else {
                        format!("< {:.0}/s", a.rates.first().copied().unwrap_or(0.0))
                    }
                })
                .collect(),
        ),
        (
            format!("p50 / p99 POST→callback at {:.0}/s", a.latency_rate),
            cols.iter()
                .map(|c| {
                    format!(
                        "{:.1} / {:.1} ms (achieved {:.0}/s)",
                        c.p50_ms, c.p99_ms, c.latency_achieved
                    )
                })
                .collect(),
        ),
        (
            format!(
                "mean per stage at {:.0}/s: answered / car's report / callback",
                a.latency_rate
            ),
            cols.iter()
                .map(|c| match c.stages {
                    Some(s) => format!(
                        "{:.2} / {:.2} / {:.2} ms",
                        s.accept_ms, s.report_ms, s.callback_ms
                    ),
                    None => "-".into(),
                })
                .collect(),
        ),
        (
            format!(
                "floor at {:.0}/s, p50 / p99: bare MQTT round trip (2 broker hops) · bare HTTP round trip · bare disk flush (4 KiB + fdatasync)",
                a.latency_rate
            ),
            cols.iter()
                .map(|c| {
                    format!(
                        "{} · {} · {}",
                        floor_cell(&c.floor_mqtt),
                        floor_cell(&c.floor_http),
                        floor_cell(&c.floor_disk)
                    )
                })
                .collect(),
        ),
        (
            "campaign to every car fully acknowledged, first after gateway start".into(),
            cols.iter()
                .map(|c| format!("{:.2} s", c.campaign_first_secs))
                .collect(),
        ),
        (
            "campaign to every car, repeat".into(),
            cols.iter()
                .map(|c| format!("{:.2} s", c.campaign_repeat_secs))
                .collect(),
        ),
        (
            "gateway memory per connected car".into(),
            cols.iter()
                .map(|c| match c.broker_per_car {
                    Some(b) => format!(
                        "{} (heap reserve included; + Mosquitto {})",
                        kib(c.gateway_per_car),
                        kib(b)
                    ),
                    None => format!(
                        "{} (broker and heap reserve included)",
                        kib(c.gateway_per_car)
                    ),
                })
                .collect(),
        ),
        (
            "simulator memory per car".into(),
            cols.iter().map(|c| kib(c.sim_per_car)).collect(),
        ),
        (
            "callbacks missing or repeated".into(),
            cols.iter()
                .map(|c| c.callback_anomalies.to_string())
                .collect(),
        ),
        (
            "requests refused or failed in HTTP (all rates)".into(),
            cols.iter().map(|c| c.http_errors.to_string()).collect(),
        ),
    ];
    let us = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.0} µs"));
    // The embedded broker has no process of its own: its CPU is the gateway's.
    let cell = |c: &Column, name: &str, text: String| {
        if name == "broker" && c.broker == "embedded" {
            "in the gateway".to_string()
        } else {
            text
        }
    };
    let processes: [(&str, ShareOf); 4] = [
        ("gateway", |c| c.gateway),
        ("broker", |c| c.broker),
        ("fleet", |c| c.fleet),
        ("driver", |c| c.driver),
    ];
    for (name, of) in processes {
        rows.push((
            format!("CPU per activation at {:.0}/s: {name}", a.latency_rate),
            cols.iter()
                .map(|c| cell(c, name, us(of(&c.cpu_per_activation))))
                .collect(),
        ));
    }
    for (name, of) in processes {
        rows.push((
            format!("CPU per car, campaign first / repeat: {name}"),
            cols.iter()
                .map(|c| {
                    let text = match (of(&c.cpu_per_car_first), of(&c.cpu_per_car_repeat)) {
                        (None, None) => "-".to_string(),
                        (f, r) => format!("{} / {}", us(f), us(r)),
                    };
                    cell(c, name, text)
                })
                .collect(),
        ));
    }

    if cols.iter().any(|c| c.first_http_error.is_some()) {
        rows.push((
            "first HTTP error".into(),
            cols.iter()
                .map(|c| c.first_http_error.clone().unwrap_or_else(|| "-".into()))
                .collect(),
        ));
    }
    rows.extend(ratio_rows(cols, a));
    if cols.iter().any(|c| c.error.is_some()) {
        rows.push((
            "errors".into(),
            cols.iter()
                .map(|c| c.error.clone().unwrap_or_else(|| "-".into()))
                .collect(),
        ));
    }
    let mut out = String::new();
    out.push_str("| | ");
    out.push_str(
        &cols
            .iter()
            .map(|c| {
                let broker = match c.broker.as_str() {
                    "embedded" => "embedded rumqttd".to_string(),
                    _ => format!("Mosquitto {}", mosquitto_version()),
                };
                if c.baseline {
                    format!("{broker}, baseline gateway")
                } else {
                    broker
                }
            })
            .collect::<Vec<_>>()
            .join(" | "),
    );
    out.push_str(" |\n|---|");
    out.push_str(&"---|".repeat(cols.len()));
    out.push('\n');
    for (name, vals) in rows {
        out.push_str(&format!("| {name} | {} |\n", vals.join(" | ")));
    }
    out
}

/// A floor run's result, its line printed; `None` (and the error printed) if it failed.
fn noted(tag: &str, what: &str, run: Result<Floor>) -> Option<Floor> {
    match run {
        Ok(f) => {
            eprintln!("bench[{tag}]: floor, {what} → {}", f.latency.line());
            Some(f)
        }
        Err(e) => {
            eprintln!("bench[{tag}]: floor, {what}: {e:#}");
            None
        }
    }
}

/// `p50 / p99 ms` of a floor run, with the sends it skipped if any.
fn floor_cell(f: &Option<Floor>) -> String {
    match f {
        Some(f) if f.latency.count > 0 => {
            let missing = match (f.skipped, f.lost) {
                (0, 0) => String::new(),
                (s, 0) => format!(" ({s} skipped)"),
                (0, l) => format!(" ({l} lost)"),
                (s, l) => format!(" ({s} skipped, {l} lost)"),
            };
            format!(
                "{:.2} / {:.2} ms{missing}",
                f.latency.p50_ms, f.latency.p99_ms
            )
        }
        _ => "-".into(),
    }
}

/// With `--baseline`: rows of this build's figures over the baseline gateway's, in each
/// of this build's columns (its broker's baseline column is the one after it); `-` in the
/// baseline columns and where a figure is missing.
fn ratio_rows(cols: &[Column], a: &BenchArgs) -> Vec<(String, Vec<String>)> {
    if !cols.iter().any(|c| c.baseline) {
        return Vec::new();
    }
    type Figure = fn(&Column) -> Option<f64>;
    let figures: [(String, Figure, Figure); 5] = [
        (
            "campaign first / repeat".into(),
            |c| Some(c.campaign_first_secs),
            |c| Some(c.campaign_repeat_secs),
        ),
        (
            "gateway CPU per car, campaign first / repeat".into(),
            |c| c.cpu_per_car_first.gateway,
            |c| c.cpu_per_car_repeat.gateway,
        ),
        (
            format!("p50 / p99 POST→callback at {:.0}/s", a.latency_rate),
            |c| Some(c.p50_ms),
            |c| Some(c.p99_ms),
        ),
        (
            format!(
                "gateway / broker CPU per activation at {:.0}/s",
                a.latency_rate
            ),
            |c| c.cpu_per_activation.gateway,
            |c| c.cpu_per_activation.broker,
        ),
        (
            "sustained activations/s (the rate, not its p99)".into(),
            |c| Some(c.sustained_rate),
            |_| None,
        ),
    ];
    figures
        .into_iter()
        .map(|(name, first, second)| {
            let cells = cols
                .iter()
                .map(|c| {
                    let base = cols
                        .iter()
                        .find(|b| b.baseline && b.broker == c.broker && !c.baseline);
                    let Some(base) = base else {
                        return "-".to_string();
                    };
                    let ratio = |f: Figure| match (f(c), f(base)) {
                        (Some(x), Some(y)) if x > 0.0 && y > 0.0 => Some(format!("{:.2}×", x / y)),
                        _ => None,
                    };
                    match (ratio(first), ratio(second)) {
                        (Some(x), Some(y)) => format!("{x} / {y}"),
                        (Some(x), None) => x,
                        (None, Some(y)) => format!("- / {y}"),
                        (None, None) => "-".to_string(),
                    }
                })
                .collect();
            (format!("this build ÷ baseline: {name}"), cells)
        })
        .collect()
}

fn mosquitto_version() -> String {
    let Some(bin) = crate::gateway_proc::mosquitto_binary() else {
        return String::new();
    };
    let out = std::process::Command::new(bin).arg("-h").output();
    out.ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            text.split_whitespace()
                .skip_while(|w| *w != "version")
                .nth(1)
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// `model name` and core count of this machine, and its memory.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map(|kb| format!("{:.0} GiB", kb as f64 / 1048576.0))
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), {mem} RAM")
}

/// Runs the benchmark and prints the table.
pub async fn bench_main(a: BenchArgs) -> Result<i32> {
    let brokers: Vec<&str> = match a.only.as_deref() {
        Some("embedded") => vec!["embedded"],
        Some("mosquitto") => vec!["mosquitto"],
        Some(other) => anyhow::bail!("--only {other}: embedded or mosquitto"),
        None => vec!["embedded", "mosquitto"],
    };
    let mut cols = Vec::new();
    for b in brokers {
        let runs = std::iter::once(None).chain(a.baseline.as_deref().map(Some));
        for baseline in runs {
            match column(&a, b, baseline).await {
                Ok(c) => cols.push(c),
                Err(e) => {
                    let failed = Column {
                        broker: b.to_string(),
                        baseline: baseline.is_some(),
                        error: Some(format!("{e:#}")),
                        ..Column::default()
                    };
                    eprintln!("bench[{}]: {e:#}", failed.tag());
                    cols.push(failed);
                }
            }
        }
    }
    let header = format!(
        "caas-sim bench: {} cars; gateway, broker and simulator on one machine: {}\n\n",
        a.cars,
        machine()
    );
    let t = table(&cols, &a);
    println!("\n{header}{t}");
    if let Some(p) = &a.out {
        std::fs::write(p, format!("{header}{t}"))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Percentiles;

    fn args() -> BenchArgs {
        BenchArgs {
            cars: 10,
            rates: vec![250.0],
            step: Duration::from_secs(1),
            p99_ms: 50.0,
            latency_rate: 1000.0,
            latency_duration: Duration::from_secs(1),
            only: None,
            out: None,
            samples: None,
            no_progress: true,
            baseline: None,
        }
    }

    #[test]
    fn stage_means_are_the_histograms_sums_over_their_counts_between_two_texts() {
        let text = |accept: (f64, u64), report: (f64, u64), callback: (f64, u64)| {
            format!(
                "# TYPE caas_accept_seconds histogram\ncaas_accept_seconds_bucket{{le=\"0.001\"}} 1\n\
                 caas_accept_seconds_sum {}\ncaas_accept_seconds_count {}\n\
                 caas_activation_latency_seconds_sum {}\ncaas_activation_latency_seconds_count {}\n\
                 caas_callback_delivery_seconds_sum {}\ncaas_callback_delivery_seconds_count {}\n",
                accept.0, accept.1, report.0, report.1, callback.0, callback.1
            )
        };
        let before = text((1.0, 1000), (2.0, 1000), (0.5, 1000));
        let after = text((1.6, 2000), (3.1, 2000), (1.0, 2000));
        let m = StageMeans::between(&before, &after).unwrap();
        assert!((m.accept_ms - 0.6).abs() < 1e-9, "{m:?}");
        assert!((m.report_ms - 1.1).abs() < 1e-9, "{m:?}");
        assert!((m.callback_ms - 0.5).abs() < 1e-9, "{m:?}");
        // Nothing new, or a gateway without the histograms: no means.
        assert_eq!(StageMeans::between(&after, &after), None);
        assert_eq!(StageMeans::between("", &after), None);
    }

    #[test]
    fn cpu_per_unit_is_the_difference_over_the_work() {
        let before = CpuSnap {
            gateway: Some(1.0),
            broker: None,
            fleet: Some(2.0),
            driver: Some(0.5),
        };
        let after = CpuSnap {
            gateway: Some(2.0),
            broker: None,
            fleet: Some(2.2),
            driver: None,
        };
        let c = before.per(&after, 1000);
        assert_eq!(c.gateway.map(f64::round), Some(1000.0));
        assert_eq!(c.fleet.map(f64::round), Some(200.0));
        assert_eq!(c.broker, None);
        assert_eq!(c.driver, None);
        assert_eq!(before.per(&after, 0).gateway, None);
    }

    #[test]
    fn the_table_keeps_its_rows_and_adds_cpu_by_process() {
        let share = CpuShare {
            gateway: Some(812.4),
            broker: Some(95.0),
            fleet: Some(120.0),
            driver: Some(80.0),
        };
        let cols = vec![
            Column {
                broker: "embedded".into(),
                cpu_per_activation: CpuShare {
                    broker: None,
                    ..share
                },
                ..Column::default()
            },
            Column {
                broker: "mosquitto".into(),
                cpu_per_activation: share,
                cpu_per_car_first: share,
                cpu_per_car_repeat: share,
                ..Column::default()
            },
        ];
        let mut cols = cols;
        cols[0].floor_mqtt = Some(Floor {
            latency: Percentiles {
                count: 10,
                p50_ms: 0.21,
                p99_ms: 0.93,
                ..Percentiles::default()
            },
            skipped: 0,
            lost: 0,
        });
        cols[0].floor_http = Some(Floor {
            latency: Percentiles {
                count: 10,
                p50_ms: 0.15,
                p99_ms: 0.7,
                ..Percentiles::default()
            },
            skipped: 3,
            lost: 0,
        });
        let t = table(&cols, &args());
        assert!(
            t.contains("| floor at 1000/s, p50 / p99: bare MQTT round trip (2 broker hops) · bare HTTP round trip · bare disk flush (4 KiB + fdatasync) | 0.21 / 0.93 ms · 0.15 / 0.70 ms (3 skipped) · - | - · - · - |"),
            "{t}"
        );
        for row in [
            "| cars connected |",
            "| connect rate |",
            "| sustained activations/s end to end with p99 < 50 ms |",
            "| p50 / p99 POST→callback at 1000/s |",
            "| campaign to every car fully acknowledged, first after gateway start |",
            "| campaign to every car, repeat |",
            "| gateway memory per connected car |",
            "| simulator memory per car |",
            "| callbacks missing or repeated |",
            "| requests refused or failed in HTTP (all rates) |",
        ] {
            assert!(t.contains(row), "{row} missing in\n{t}");
        }
        assert!(t.contains("| CPU per activation at 1000/s: gateway | 812 µs | 812 µs |"));
        assert!(t.contains("| CPU per activation at 1000/s: broker | in the gateway | 95 µs |"));
        assert!(t.contains("| CPU per activation at 1000/s: fleet | 120 µs | 120 µs |"));
        assert!(t.contains("| CPU per car, campaign first / repeat: driver | - | 80 µs / 80 µs |"));
    }

    #[test]
    fn a_baseline_column_follows_its_broker_and_ratios_close_the_table() {
        let run = |baseline: bool, first: f64, gateway_per_car: f64, p99: f64| Column {
            broker: "embedded".into(),
            baseline,
            campaign_first_secs: first,
            campaign_repeat_secs: 2.0,
            cpu_per_car_first: CpuShare {
                gateway: Some(gateway_per_car),
                ..CpuShare::default()
            },
            p50_ms: 1.0,
            p99_ms: p99,
            ..Column::default()
        };
        let cols = vec![run(false, 1.5, 90.0, 6.0), run(true, 2.0, 120.0, 0.0)];
        assert_eq!(cols[1].tag(), "embedded-baseline");
        let t = table(&cols, &args());
        assert!(
            t.contains("| | embedded rumqttd | embedded rumqttd, baseline gateway |"),
            "{t}"
        );
        // 1.5 / 2.0 and 2.0 / 2.0; the baseline column has no ratios of its own.
        assert!(
            t.contains("| this build ÷ baseline: campaign first / repeat | 0.75× / 1.00× | - |"),
            "{t}"
        );
        // The repeat's gateway CPU was not read: only the first's ratio.
        assert!(t.contains(
            "| this build ÷ baseline: gateway CPU per car, campaign first / repeat | 0.75× | - |"
        ));
        // A p99 of 0 (the baseline's row failed) gives no ratio, not a division by zero.
        assert!(
            t.contains("| this build ÷ baseline: p50 / p99 POST→callback at 1000/s | 1.00× | - |")
        );
        assert!(t.contains(
            "| this build ÷ baseline: sustained activations/s (the rate, not its p99) | - | - |"
        ));
        let without = table(&cols[..1], &args());
        assert!(!without.contains("this build ÷ baseline"), "{without}");
    }
}
