//! The command line: `caas-sim fleet | run | demo | bench`.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::{Command as Process, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};

use crate::faults::FaultPlan;
use crate::fleet::{Fleet, FleetOptions, MAX_CARS_PER_PROCESS};
use crate::stats::{decode_histogram, FleetReport, Percentiles};

/// The CaaS fleet simulator.
#[derive(Parser, Debug)]
#[command(name = "caas-sim", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Provision N virtual cars and keep them connected, running the real agent core.
    Fleet(FleetArgs),
    /// Drive a running gateway the way the CaaS core would (activations at a rate, or a
    /// campaign), receiving and checking the webhook callbacks.
    Run(crate::scenario::RunArgs),
    /// One command, no setup: a gateway, 1,000 cars and the system's story.
    Demo(crate::demo::DemoArgs),
    /// Embedded broker vs Mosquitto: the performance table.
    Bench(crate::bench::BenchArgs),
    /// (internal) run the gateway: `caas-sim gateway serve` is `caas-gateway serve`.
    #[command(hide = true, subcommand)]
    Gateway(GatewayCmd),
}

#[derive(Subcommand, Debug)]
enum GatewayCmd {
    /// Serve the IoT API and the MQTT fan-out (the same options as `caas-gateway serve`).
    /// Boxed: the options are far larger than every other command's.
    Serve(Box<caas_gateway::config::ServeArgs>),
}

fn gateway_main(cmd: GatewayCmd) -> i32 {
    let GatewayCmd::Serve(args) = cmd;
    caas_gateway::serve_main(*args)
}

/// Where the gateway is.
#[derive(Args, Debug, Clone)]
pub struct GatewayArgs {
    /// The gateway's IoT API base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub gateway: String,
    /// The IoT API bearer token.
    #[arg(long, env = "CAAS_API_TOKEN", default_value = "dev-token")]
    pub api_token: String,
    /// CA certificate(s) (PEM) to trust for an https:// gateway (its `--https` listener),
    /// besides the public roots.
    #[arg(long, value_name = "FILE", env = "CAAS_GATEWAY_CA")]
    pub gateway_ca: Option<std::path::PathBuf>,
}

/// Fault injection flags (ratios are `0.3` or `30%`, durations `500ms`, `5s`, `2m`).
#[derive(Args, Debug, Clone, Default)]
pub struct FaultArgs {
    /// Share of cars offline at start.
    #[arg(long, value_parser = crate::parse_ratio, default_value = "0")]
    pub offline_at_start: f64,
    /// How long they stay offline.
    #[arg(long, value_parser = crate::parse_duration)]
    pub offline_for: Option<Duration>,
    /// Share of cars that drop (acknowledge and ignore) commands.
    #[arg(long, value_parser = crate::parse_ratio, default_value = "0")]
    pub drop_commands: f64,
    /// For how long from start they drop commands (default: for ever — they never answer).
    #[arg(long, value_parser = crate::parse_duration)]
    pub drop_for: Option<Duration>,
    /// Share of cars that refuse to apply (their store fails: STORAGE_FAILED).
    #[arg(long, value_parser = crate::parse_ratio, default_value = "0")]
    pub refuse: f64,
    /// Delay before a car handles each command (network latency).
    #[arg(long, value_parser = crate::parse_duration)]
    pub net_delay: Option<Duration>,
    /// Share of cars that drop their connection and reconnect periodically.
    #[arg(long, value_parser = crate::parse_ratio, default_value = "0")]
    pub storm: f64,
    /// How often storm cars reconnect.
    #[arg(long, value_parser = crate::parse_duration)]
    pub storm_every: Option<Duration>,
    /// Share of command frames corrupted (one byte flipped) before the car sees them.
    #[arg(long, value_parser = crate::parse_ratio, default_value = "0")]
    pub corrupt: f64,
}

impl FaultArgs {
    /// The plan these flags describe.
    pub fn plan(&self) -> FaultPlan {
        FaultPlan {
            offline_at_start: self.offline_at_start,
            offline_for: self.offline_for,
            drop_commands: self.drop_commands,
            drop_for: self.drop_for,
            refuse: self.refuse,
            net_delay: self.net_delay,
            storm: self.storm,
            storm_every: self.storm_every,
            corrupt: self.corrupt,
        }
    }
}

/// `caas-sim fleet`.
#[derive(Args, Debug, Clone)]
pub struct FleetArgs {
    #[command(flatten)]
    gw: GatewayArgs,
    /// The MQTT broker the gateway uses, HOST:PORT; several addresses of the same broker,
    /// comma-separated, spread the cars over them (more ephemeral ports past ~28,000 cars).
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: String,
    /// Number of cars.
    #[arg(long, default_value_t = 100)]
    cars: u64,
    /// Run this long, then stop (default: until Ctrl-C).
    #[arg(long, value_parser = crate::parse_duration)]
    duration: Option<Duration>,
    /// Write the VINs here, one a line.
    #[arg(long)]
    vins_out: Option<PathBuf>,
    /// Write `VIN faults` lines here (faults: offline, silent, drop, refuse, storm or `-`).
    #[arg(long)]
    faults_out: Option<PathBuf>,
    /// Write the final report here as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Seed of the cars' keys (random by default).
    #[arg(long)]
    seed: Option<u64>,
    /// The 6-character VIN prefix (random `SMVxxx` by default).
    #[arg(long)]
    vin_prefix: Option<String>,
    /// First connections per second.
    #[arg(long, default_value_t = 2000)]
    connect_rate: u32,
    /// Most MQTT handshakes in flight at once.
    #[arg(long, default_value_t = 256)]
    max_connecting: usize,
    /// MQTT keep-alive.
    #[arg(long, value_parser = crate::parse_duration, default_value = "60s")]
    keep_alive: Duration,
    /// Seconds between the cars' periodic status reports (0: none).
    #[arg(long, default_value_t = 0)]
    report_interval: u64,
    /// Trust this gateway public key file instead of asking `GET /keys`.
    #[arg(long)]
    gateway_key: Option<PathBuf>,
    /// Do not register the cars (they already are, with the same seed and prefix).
    #[arg(long)]
    no_provision: bool,
    /// Worker processes (0: one per 15,000 cars).
    #[arg(long, default_value_t = 0)]
    workers: u64,
    /// Longest wait for the fleet to connect.
    #[arg(long, value_parser = crate::parse_duration, default_value = "10m")]
    connect_timeout: Duration,
    /// No progress bars.
    #[arg(long)]
    no_progress: bool,
    /// The cars' platform from a TOML file (`name`, `optional = [..]`, `base = [..]`);
    /// default: the seed catalogue.
    #[arg(long)]
    platform: Option<PathBuf>,
    #[command(flatten)]
    faults: FaultArgs,
    /// Runtime threads per process (1: one thread, no cross-thread wake-ups; 0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// (internal) run as a worker: cars from this index, JSON lines on stdout.
    #[arg(long, hide = true)]
    worker_first: Option<u64>,
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    crate::init_crypto();
    let cli = match cli.command {
        Cmd::Gateway(g) => return gateway_main(g),
        other => other,
    };
    let threads = match &cli {
        Cmd::Fleet(a) => a.threads,
        Cmd::Run(a) => a.threads(),
        // The bench process is the load driver (its fleet and gateway are other processes).
        Cmd::Bench(_) => 1,
        _ => 0,
    };
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            b.worker_threads(threads);
        }
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("caas-sim: cannot start the runtime: {e}");
            return 1;
        }
    };
    let result = runtime.block_on(async move {
        match cli {
            Cmd::Gateway(_) => Ok(2),
            Cmd::Fleet(a) => fleet_main(a).await,
            Cmd::Run(a) => crate::scenario::run_main(a).await,
            Cmd::Demo(a) => crate::demo::demo_main(a).await,
            Cmd::Bench(a) => crate::bench::bench_main(a).await,
        }
    });
    // Cars' tasks may still be winding down; do not wait for them.
    runtime.shutdown_timeout(Duration::from_millis(500));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("caas-sim: {e:#}");
            1
        }
    }
}

/// One line a worker process writes on stdout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum WorkerLine {
    Connected(u64),
    Done {
        report: Box<FleetReport>,
        handle_hist: String,
        connect_hist: String,
    },
}

fn options(a: &FleetArgs, seed: u64, prefix: String) -> Result<FleetOptions> {
    let gateway_key = match &a.gateway_key {
        Some(p) => Some(caas_protocol::files::read_verifying_key(p)?),
        None => None,
    };
    Ok(FleetOptions {
        gateway: a.gw.gateway.clone(),
        api_token: a.gw.api_token.clone(),
        gateway_ca: a.gw.gateway_ca.clone(),
        mqtt: a.mqtt.clone(),
        cars: a.cars,
        first_index: 0,
        seed,
        vin_prefix: prefix,
        connect_rate: a.connect_rate,
        max_connecting: a.max_connecting,
        keep_alive: a.keep_alive,
        report_interval_secs: a.report_interval,
        faults: a.faults.plan(),
        gateway_key,
        provision: !a.no_provision,
        progress: !a.no_progress,
        platform: match &a.platform {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                let spec: crate::fleet::PlatformSpec =
                    toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
                spec.validate()?;
                Some(spec)
            }
            None => None,
        },
    })
}

/// Ends at the first of: `duration` over, Ctrl-C, SIGTERM, or (with `stdin_eof`, as a
/// worker) the end of standard input, which is the parent closing it to stop the worker or
/// the parent gone: a worker must not outlive its fleet.
async fn wait_for_end(duration: Option<Duration>, stdin_eof: bool) {
    let parent_gone = async {
        if !stdin_eof {
            return std::future::pending().await;
        }
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        while let Ok(n) = tokio::io::AsyncReadExt::read(&mut stdin, &mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::select! {
        _ = sleep_for(duration) => {}
        _ = stop_signal() => {}
        _ = parent_gone => {}
    }
}

/// Sleeps `duration`, or for ever without one.
async fn sleep_for(duration: Option<Duration>) {
    match duration {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Ctrl-C or SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        return;
    }
    let _ = tokio::signal::ctrl_c().await;
}

async fn fleet_main(a: FleetArgs) -> Result<i32> {
    if a.cars == 0 {
        bail!("--cars must be at least 1");
    }
    let seed = a.seed.unwrap_or_else(rand::random);
    let prefix = a
        .vin_prefix
        .clone()
        .unwrap_or_else(crate::car::random_prefix);
    crate::car::car_vin(&prefix, 0).map_err(anyhow::Error::msg)?;
    let plan = a.faults.plan();
    plan.validate().map_err(anyhow::Error::msg)?;
    let opts = options(&a, seed, prefix.clone())?;

    if let Some(first) = a.worker_first {
        return worker_main(a, opts, first).await;
    }
    let workers = match a.workers {
        0 => a.cars.div_ceil(MAX_CARS_PER_PROCESS),
        n => n.min(a.cars),
    };
    // The files a test or QA uses to find the cars come first.
    let vins: Vec<String> = (0..a.cars)
        .map(|i| crate::car::car_vin(&prefix, i).map(|v| v.as_str().to_string()))
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    if let Some(path) = &a.vins_out {
        std::fs::write(path, vins.join("\n") + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &a.faults_out {
        let lines: Vec<String> = vins
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{v} {}", plan.for_car(i as u64).describe()))
            .collect();
        std::fs::write(path, lines.join("\n") + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!(
        "caas-sim fleet: {} cars (VINs {}00000000000..), {} process{}, broker {}, gateway {}",
        a.cars,
        prefix,
        workers,
        if workers == 1 { "" } else { "es" },
        a.mqtt,
        a.gw.gateway
    );

    let report = if workers <= 1 {
        let mut fleet = Fleet::start(&opts).await?;
        let n = fleet.wait_connected(a.connect_timeout, opts.progress).await;
        eprintln!("caas-sim fleet: {n} cars connected; running (Ctrl-C to stop)");
        let pb = run_bar(opts.progress);
        let stats = fleet.stats.clone();
        let ticker = tokio::spawn(async move {
            loop {
                let c = stats.counters();
                pb.set_message(format!(
                    "{} online | {} commands, {} acked, {} reports",
                    c.connected, c.commands_received, c.acks, c.reports
                ));
                pb.tick();
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        wait_for_end(a.duration, false).await;
        ticker.abort();
        fleet.stop().await
    } else {
        run_workers(&a, workers, seed, &prefix).await?
    };
    println!("{}", report.text());
    if let Some(path) = &a.report {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(0)
}

fn run_bar(show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new_spinner();
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
    {
        pb.set_style(style);
    }
    pb
}

fn emit(line: &WorkerLine) {
    if let Ok(text) = serde_json::to_string(line) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    }
}

async fn worker_main(a: FleetArgs, mut opts: FleetOptions, first: u64) -> Result<i32> {
    opts.first_index = first;
    opts.progress = false;
    let mut fleet = Fleet::start(&opts).await?;
    let stats = fleet.stats.clone();
    let ticker = tokio::spawn(async move {
        loop {
            emit(&WorkerLine::Connected(
                stats.ever_connected.load(Ordering::Relaxed),
            ));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    // Told to stop (signal, or the parent's pipe closed) while still connecting: stop now,
    // not after the connect timeout. Otherwise run for `--duration` after connecting.
    let stopped = wait_for_end(None, true);
    tokio::pin!(stopped);
    let connected = tokio::select! {
        _ = fleet.wait_connected(a.connect_timeout, false) => true,
        _ = &mut stopped => false,
    };
    if connected {
        tokio::select! {
            _ = sleep_for(a.duration) => {}
            _ = &mut stopped => {}
        }
    }
    ticker.abort();
    let (handle_hist, connect_hist) = fleet.stats.histograms();
    let report = fleet.stop().await;
    emit(&WorkerLine::Done {
        report: Box::new(report),
        handle_hist,
        connect_hist,
    });
    Ok(0)
}

async fn run_workers(a: &FleetArgs, workers: u64, seed: u64, prefix: &str) -> Result<FleetReport> {
    let exe = std::env::current_exe().context("locating caas-sim")?;
    let per = a.cars.div_ceil(workers);
    let connected = Arc::new(Mutex::new(vec![0u64; workers as usize]));
    let done: Arc<Mutex<Vec<WorkerLine>>> = Arc::new(Mutex::new(Vec::new()));
    let mut children = Vec::new();
    let mut stdins = Vec::new();
    let mut readers = Vec::new();
    let started = Instant::now();
    for w in 0..workers {
        let first = w * per;
        let count = per.min(a.cars.saturating_sub(first));
        if count == 0 {
            break;
        }
        let mut cmd = Process::new(&exe);
        cmd.arg("fleet")
            .args(["--gateway", &a.gw.gateway, "--api-token", &a.gw.api_token]);
        if let Some(ca) = &a.gw.gateway_ca {
            cmd.arg("--gateway-ca").arg(ca);
        }
        cmd.args(["--mqtt", &a.mqtt, "--cars", &count.to_string()])
            .args(["--seed", &seed.to_string(), "--vin-prefix", prefix])
            .args(["--worker-first", &first.to_string(), "--no-progress"])
            .args(["--threads", &a.threads.to_string()])
            .args([
                "--connect-rate",
                &(a.connect_rate as u64 / workers).max(1).to_string(),
            ])
            .args([
                "--max-connecting",
                &(a.max_connecting as u64 / workers).max(1).to_string(),
            ])
            .args(["--keep-alive", &format!("{}ms", a.keep_alive.as_millis())])
            .args(["--report-interval", &a.report_interval.to_string()])
            .args([
                "--connect-timeout",
                &format!("{}ms", a.connect_timeout.as_millis()),
            ]);
        if let Some(d) = a.duration {
            cmd.args(["--duration", &format!("{}ms", d.as_millis())]);
        }
        if let Some(k) = &a.gateway_key {
            cmd.arg("--gateway-key").arg(k);
        }
        if let Some(p) = &a.platform {
            cmd.arg("--platform").arg(p);
        }
        if a.no_provision {
            cmd.arg("--no-provision");
        }
        let f = &a.faults;
        cmd.args(["--offline-at-start", &f.offline_at_start.to_string()])
            .args(["--drop-commands", &f.drop_commands.to_string()])
            .args(["--refuse", &f.refuse.to_string()])
            .args(["--storm", &f.storm.to_string()])
            .args(["--corrupt", &f.corrupt.to_string()]);
        for (flag, d) in [
            ("--offline-for", f.offline_for),
            ("--drop-for", f.drop_for),
            ("--net-delay", f.net_delay),
            ("--storm-every", f.storm_every),
        ] {
            if let Some(d) = d {
                cmd.args([flag, &format!("{}ms", d.as_millis())]);
            }
        }
        // The worker runs until its standard input closes: dropping `stdins` stops them all,
        // and so does this process's end, however it ends.
        cmd.stdout(Stdio::piped()).stdin(Stdio::piped());
        let mut child = cmd.spawn().context("starting a worker process")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        stdins.extend(child.stdin.take());
        let connected = connected.clone();
        let done = done.clone();
        readers.push(std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                match serde_json::from_str::<WorkerLine>(&line) {
                    Ok(WorkerLine::Connected(n)) => {
                        if let Ok(mut c) = connected.lock() {
                            c[w as usize] = n;
                        }
                    }
                    Ok(d @ WorkerLine::Done { .. }) => {
                        if let Ok(mut v) = done.lock() {
                            v.push(d);
                        }
                    }
                    Err(_) => {}
                }
            }
        }));
        children.push(child);
    }
    let pb = crate::fleet::bar(a.cars, "connecting", !a.no_progress);
    let mut connected_at = None;
    // Ctrl-C or SIGTERM: the workers are told to stop (their stdin closed) and report.
    let stop = stop_signal();
    tokio::pin!(stop);
    loop {
        let n: u64 = connected.lock().map(|c| c.iter().sum()).unwrap_or(0);
        pb.set_position(n);
        if n >= a.cars && connected_at.is_none() {
            connected_at = Some(started.elapsed());
            pb.finish_and_clear();
            eprintln!("caas-sim fleet: {n} cars connected; running (Ctrl-C to stop)");
        }
        let all_exited = children
            .iter_mut()
            .all(|c| matches!(c.try_wait(), Ok(Some(_))));
        if all_exited {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = &mut stop, if !stdins.is_empty() => stdins.clear(),
        }
    }
    pb.finish_and_clear();
    for r in readers {
        let _ = r.join();
    }
    let lines = std::mem::take(&mut *done.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    let mut total = FleetReport {
        workers,
        ..FleetReport::default()
    };
    let mut handle = crate::stats::new_histogram();
    let mut connect = crate::stats::new_histogram();
    for l in lines {
        if let WorkerLine::Done {
            report,
            handle_hist,
            connect_hist,
        } = l
        {
            total.cars += report.cars;
            total.cars_connected += report.cars_connected;
            total.counters.add(&report.counters);
            total.rss_bytes += report.rss_bytes;
            total.memory_per_car_bytes += report.memory_per_car_bytes * report.cars;
            total.connect_secs = total.connect_secs.max(report.connect_secs);
            total.run_secs = total.run_secs.max(report.run_secs);
            if let Some(h) = decode_histogram(&handle_hist) {
                let _ = handle.add(&h);
            }
            if let Some(h) = decode_histogram(&connect_hist) {
                let _ = connect.add(&h);
            }
        }
    }
    if total.cars == 0 {
        bail!("no worker process reported (see their errors above)");
    }
    total.memory_per_car_bytes /= total.cars;
    if let Some(t) = connected_at {
        total.connect_secs = t.as_secs_f64();
    }
    total.connect_rate_per_sec = total.cars_connected as f64 / total.connect_secs.max(1e-9);
    total.handle_latency = Percentiles::of(&handle);
    total.connect_latency = Percentiles::of(&connect);
    Ok(total)
}

/// How long a connecting fleet may make no progress before the wait gives up.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A fleet in a child process (`caas-sim fleet` in worker mode), so its memory and CPU are
/// measured apart from the caller's.
pub struct FleetChild {
    child: std::process::Child,
    /// Held open while the fleet runs (see `wait_for_end`).
    _stdin: Option<std::process::ChildStdin>,
    connected: Arc<std::sync::atomic::AtomicU64>,
    done: Arc<Mutex<Option<FleetReport>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl FleetChild {
    /// Starts `cars` cars (provisioned by the child) with VINs `prefix` + index and keys
    /// from `seed`; `extra` are more `fleet` flags.
    pub fn spawn(
        gateway: &str,
        mqtt: &str,
        cars: u64,
        seed: u64,
        prefix: &str,
        extra: &[String],
    ) -> Result<FleetChild> {
        let exe = std::env::current_exe().context("locating caas-sim")?;
        let mut child = Process::new(exe)
            .arg("fleet")
            .args(["--gateway", gateway, "--mqtt", mqtt])
            .args(["--cars", &cars.to_string(), "--seed", &seed.to_string()])
            .args([
                "--vin-prefix",
                prefix,
                "--worker-first",
                "0",
                "--no-progress",
            ])
            .args(["--duration", "24h"])
            .args(extra)
            // A worker runs until its stdin closes: this handle's end (or ours) stops it.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the fleet process")?;
        let stdout = child.stdout.take().context("fleet stdout")?;
        let stdin = child.stdin.take();
        let connected = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let done = Arc::new(Mutex::new(None));
        let (c, d) = (connected.clone(), done.clone());
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                match serde_json::from_str::<WorkerLine>(&line) {
                    Ok(WorkerLine::Connected(n)) => c.store(n, Ordering::Relaxed),
                    Ok(WorkerLine::Done { report, .. }) => {
                        if let Ok(mut slot) = d.lock() {
                            *slot = Some(*report);
                        }
                    }
                    Err(_) => {}
                }
            }
        });
        Ok(FleetChild {
            child,
            _stdin: stdin,
            connected,
            done,
            reader: Some(reader),
        })
    }

    /// Waits until `n` cars connected (or `timeout`, or the child exits); returns the count.
    pub async fn wait_connected(&mut self, n: u64, timeout: Duration, progress: bool) -> u64 {
        let pb = crate::fleet::bar(n, "connecting", progress);
        let deadline = Instant::now() + timeout;
        let (mut last, mut last_change) = (0, Instant::now());
        loop {
            let c = self.connected.load(Ordering::Relaxed);
            pb.set_position(c);
            if c != last {
                (last, last_change) = (c, Instant::now());
            }
            let exited = matches!(self.child.try_wait(), Ok(Some(_)));
            // A broker that stops accepting (e.g. out of file descriptors) ends the wait.
            let stalled = last_change.elapsed() > STALL_TIMEOUT;
            if c >= n || exited || stalled || Instant::now() >= deadline {
                pb.finish_and_clear();
                return c;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the fleet (SIGINT) and returns its final report.
    pub async fn stop(mut self) -> Option<FleetReport> {
        let _ = Process::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(self.child.try_wait(), Ok(Some(_))) {
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.done.lock().ok().and_then(|mut d| d.take())
    }
}

impl Drop for FleetChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
