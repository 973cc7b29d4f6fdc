//! `caas-sim run`: drive a gateway the way the CaaS core would.
//!
//! Activations and deactivations go out at a target rate (open loop: a request is sent on
//! its tick whether or not earlier ones have finished, up to [`MAX_IN_FLIGHT`] HTTP requests
//! at once; ticks that find no free slot are counted as `skipped`), or one campaign goes to
//! the whole fleet. The webhook receiver checks every callback's HMAC, matches it to its
//! request and measures POST-to-callback latency; the report says how many requests got
//! exactly one final callback, none, or more than one.
//!
//! A scenario is flags or a TOML file:
//!
//! ```toml
//! rate = 200              # requests per second
//! duration = "30s"
//! campaign = false        # true: one campaign to every car instead
//! deactivate_share = 0.2  # share of requests that are deactivations
//! settle = "60s"          # how long to wait for the last callbacks
//!
//! [[services]]
//! service_id = "power-boost"
//! flags = ["power_boost"]
//! lasting = "temporary"   # temporary | permanent | subscription
//! expires_in = "1h"       # for temporary
//! weight = 3
//!
//! [faults]                # for the fleet `run --cars N` starts itself
//! drop_commands = 0.1
//! drop_for = "3s"
//!
//! [platform]              # that fleet's platform (default: the seed catalogue)
//! name = "van-2027"
//! optional = ["power_boost", "cargo_heating"]
//! base = ["abs", "esc"]
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::api::{Api, Lasting};
use crate::faults::FaultPlan;
use crate::stats::{new_histogram, record, Percentiles};
use crate::webhook::Receiver;

/// Most IoT API requests in flight at once. Each is one HTTP/1.1 connection to the gateway,
/// and the gateway's file descriptors are shared with its cars: with 19,000 cars under a
/// limit of 20,000 open files per process, 1,024 connections left about 130 of them waiting
/// unaccepted in the listen queue until they timed out. 512 in flight still allows 85 ms per
/// request at 6,000 requests a second.
pub const MAX_IN_FLIGHT: usize = 512;
/// Most requests one run tracks (the rest are sent but not matched).
pub const MAX_TRACKED_REQUESTS: usize = 1_000_000;

/// One service of the mix.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceMix {
    /// The catalog's service id.
    pub service_id: String,
    /// Feature flags it switches on.
    pub flags: Vec<String>,
    /// `temporary`, `permanent` or `subscription`.
    #[serde(default = "default_lasting")]
    pub lasting: String,
    /// For `temporary`: how long from the request.
    #[serde(default)]
    pub expires_in: Option<String>,
    /// Relative weight in the mix.
    #[serde(default = "one")]
    pub weight: u32,
}

fn default_lasting() -> String {
    "permanent".to_string()
}
fn one() -> u32 {
    1
}

/// A scenario.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Requests per second.
    #[serde(default = "default_rate")]
    pub rate: f64,
    /// How long to send.
    #[serde(default = "default_duration")]
    pub duration: String,
    /// One campaign to every car instead of single requests.
    #[serde(default)]
    pub campaign: bool,
    /// Share of requests that are deactivations.
    #[serde(default)]
    pub deactivate_share: f64,
    /// How long to wait for the last callbacks.
    #[serde(default = "default_settle")]
    pub settle: String,
    /// The mix of services (default: the seed catalogue, permanent).
    #[serde(default)]
    pub services: Vec<ServiceMix>,
    /// Faults of a fleet started by `run --cars`.
    #[serde(default)]
    pub faults: FaultPlan,
    /// The platform of a fleet started by `run --cars` (default: the seed catalogue).
    #[serde(default)]
    pub platform: Option<crate::fleet::PlatformSpec>,
}

fn default_rate() -> f64 {
    100.0
}
fn default_duration() -> String {
    "10s".to_string()
}
fn default_settle() -> String {
    "60s".to_string()
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            rate: default_rate(),
            duration: default_duration(),
            campaign: false,
            deactivate_share: 0.0,
            settle: default_settle(),
            services: Vec::new(),
            faults: FaultPlan::default(),
            platform: None,
        }
    }
}

/// The default mix: every optional feature of the seed catalogue as its own service.
pub fn default_services() -> Vec<ServiceMix> {
    crate::car::SEED_OPTIONAL
        .iter()
        .map(|f| ServiceMix {
            service_id: f.replace('_', "-"),
            flags: vec![f.to_string()],
            lasting: if *f == "power_boost" {
                "temporary".to_string()
            } else {
                "subscription".to_string()
            },
            expires_in: (*f == "power_boost").then(|| "1h".to_string()),
            weight: 1,
        })
        .collect()
}

impl Scenario {
    /// Checks values and fills the default mix.
    pub fn validate(&mut self) -> Result<()> {
        if !(self.rate > 0.0 && self.rate <= 100_000.0) {
            bail!(
                "rate {} must be above 0 and at most 100000 per second",
                self.rate
            );
        }
        crate::parse_duration(&self.duration).map_err(anyhow::Error::msg)?;
        crate::parse_duration(&self.settle).map_err(anyhow::Error::msg)?;
        if !(0.0..=1.0).contains(&self.deactivate_share) {
            bail!("deactivate_share must be between 0 and 1");
        }
        if self.services.is_empty() {
            self.services = default_services();
        }
        for s in &self.services {
            match s.lasting.as_str() {
                "temporary" | "permanent" | "subscription" => {}
                other => bail!(
                    "service {}: lasting `{other}` (temporary, permanent, subscription)",
                    s.service_id
                ),
            }
            if let Some(e) = &s.expires_in {
                crate::parse_duration(e).map_err(anyhow::Error::msg)?;
            }
            if s.flags.is_empty() {
                bail!("service {}: no flags", s.service_id);
            }
        }
        self.faults.validate().map_err(anyhow::Error::msg)?;
        if let Some(p) = &self.platform {
            p.validate()?;
        }
        Ok(())
    }

    fn lasting_of(s: &ServiceMix) -> Lasting {
        match s.lasting.as_str() {
            "temporary" => {
                let secs = s
                    .expires_in
                    .as_deref()
                    .and_then(|e| crate::parse_duration(e).ok())
                    .unwrap_or(Duration::from_secs(3600))
                    .as_secs()
                    .max(1);
                Lasting::Temporary(crate::unix_now() + secs)
            }
            "subscription" => Lasting::Subscription { auto_renewal: true },
            _ => Lasting::Permanent,
        }
    }
}

/// The outcome of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunReport {
    /// Target rate.
    pub target_rate: f64,
    /// Requests sent per second, measured.
    pub achieved_rate: f64,
    /// Requests sent.
    pub sent: u64,
    /// Requests the gateway accepted (2xx).
    pub accepted: u64,
    /// Requests it refused or that failed in HTTP.
    pub http_errors: u64,
    /// Ticks with no free in-flight slot.
    pub skipped: u64,
    /// Accepted requests with exactly one callback.
    pub exactly_one_callback: u64,
    /// Accepted requests with no callback.
    pub no_callback: u64,
    /// Accepted requests with more than one callback.
    pub several_callbacks: u64,
    /// Callbacks by status.
    pub by_status: std::collections::BTreeMap<String, u64>,
    /// Callbacks with a bad signature.
    pub bad_signatures: u64,
    /// HTTP answer time of the POSTs.
    pub post_latency: Percentiles,
    /// POST → callback.
    pub callback_latency: Percentiles,
    /// Campaign: seconds until every request was final.
    pub campaign_secs: Option<f64>,
    /// The first HTTP error seen, if any.
    pub first_error: Option<String>,
}

impl RunReport {
    /// Human-readable.
    pub fn text(&self) -> String {
        let statuses: Vec<String> = self
            .by_status
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let mut s = format!(
            "── run report ──\n\
             requests        {} sent at {:.0}/s (target {:.0}/s), {} accepted, {} HTTP errors, {} skipped\n\
             callbacks       {} exactly one, {} none, {} several; by status: {}; {} bad signatures\n\
             POST answer     {}\n\
             POST→callback   {}\n",
            self.sent,
            self.achieved_rate,
            self.target_rate,
            self.accepted,
            self.http_errors,
            self.skipped,
            self.exactly_one_callback,
            self.no_callback,
            self.several_callbacks,
            if statuses.is_empty() { "none".to_string() } else { statuses.join(", ") },
            self.bad_signatures,
            self.post_latency.line(),
            self.callback_latency.line(),
        );
        if let Some(c) = self.campaign_secs {
            s.push_str(&format!(
                "campaign        every request final after {c:.2} s\n"
            ));
        }
        if let Some(e) = &self.first_error {
            s.push_str(&format!("first error     {e}\n"));
        }
        s
    }
}

struct Tracked {
    ids: Mutex<Vec<String>>,
    post_hist: Mutex<hdrhistogram::Histogram<u64>>,
    accepted: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// Services with an accepted activation, per car: deactivations pick from these (a
    /// deactivation of a service the car does not have is refused with 409).
    active: Mutex<std::collections::HashMap<String, Vec<String>>>,
}

/// Sends the scenario's requests to `vins` and waits for their callbacks.
pub async fn run_scenario(
    api: &Api,
    receiver: &Receiver,
    vins: &[String],
    sc: &Scenario,
) -> Result<RunReport> {
    if vins.is_empty() {
        bail!("no cars to send to");
    }
    let duration = crate::parse_duration(&sc.duration).map_err(anyhow::Error::msg)?;
    let settle = crate::parse_duration(&sc.settle).map_err(anyhow::Error::msg)?;
    let before_bad = receiver.counts().bad_signature;
    let tracked = Arc::new(Tracked {
        ids: Mutex::new(Vec::new()),
        post_hist: Mutex::new(new_histogram()),
        accepted: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
        active: Mutex::new(std::collections::HashMap::new()),
    });
    let mut report = RunReport {
        target_rate: sc.rate,
        ..RunReport::default()
    };
    if sc.campaign {
        let s = sc
            .services
            .first()
            .cloned()
            .unwrap_or_else(|| default_services().remove(0));
        let t0 = Instant::now();
        let id = api
            .campaign(
                vins,
                true,
                &s.service_id,
                &s.flags,
                &Scenario::lasting_of(&s),
            )
            .await?;
        let (_, _) = crate::demo::wait_campaign(api, &id, vins.len(), settle).await;
        report.campaign_secs = Some(t0.elapsed().as_secs_f64());
        report.sent = vins.len() as u64;
        report.accepted = vins.len() as u64;
        return Ok(report);
    }
    let total_weight: u32 = sc.services.iter().map(|s| s.weight.max(1)).sum();
    // Shared once, indexed per request: a request clones no VIN and no service.
    let services: Arc<[ServiceMix]> = sc.services.clone().into();
    let cars: Arc<[String]> = vins.into();
    // Only a mix with deactivations needs to know what each car was given.
    let track_active = sc.deactivate_share > 0.0;
    let sem = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let interval = Duration::from_secs_f64(1.0 / sc.rate);
    let start = Instant::now();
    let mut next = start;
    let mut sent = 0u64;
    let mut skipped = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    while start.elapsed() < duration {
        // Ticks already due go out at once, without a timer each.
        if next > Instant::now() {
            tokio::time::sleep_until(next.into()).await;
        }
        next += interval;
        let Ok(permit) = sem.clone().try_acquire_owned() else {
            skipped += 1;
            continue;
        };
        let car = (sent as usize) % cars.len();
        let (svc, deactivate) = {
            let mut rng = rand::thread_rng();
            let mut pick = rng.gen_range(0..total_weight.max(1));
            let mut chosen = 0;
            for (i, s) in services.iter().enumerate() {
                let w = s.weight.max(1);
                if pick < w {
                    chosen = i;
                    break;
                }
                pick -= w;
            }
            (chosen, track_active && rng.gen_bool(sc.deactivate_share))
        };
        // A deactivation takes a service this car was given; with none, it activates.
        let deactivate = if deactivate {
            tracked
                .active
                .lock()
                .ok()
                .and_then(|mut m| m.get_mut(&cars[car]).and_then(|list| list.pop()))
        } else {
            None
        };
        sent += 1;
        let api = api.clone();
        let receiver = receiver.clone();
        let tracked = tracked.clone();
        let cars = cars.clone();
        let services = services.clone();
        tasks.spawn(async move {
            let vin = &cars[car];
            let svc = &services[svc];
            let t0 = Instant::now();
            let res = match &deactivate {
                Some(service_id) => api.deactivate(vin, service_id).await,
                None => {
                    api.activate(
                        vin,
                        &svc.service_id,
                        &svc.flags,
                        &serde_json::Map::new(),
                        &Scenario::lasting_of(svc),
                    )
                    .await
                }
            };
            drop(permit);
            match res {
                Ok(id) => {
                    receiver.expect(&id, t0);
                    if track_active && deactivate.is_none() {
                        if let Ok(mut m) = tracked.active.lock() {
                            let list = m.entry(vin.clone()).or_default();
                            if !list.contains(&svc.service_id) {
                                list.push(svc.service_id.clone());
                            }
                        }
                    }
                    if let Ok(mut h) = tracked.post_hist.lock() {
                        record(&mut h, t0.elapsed());
                    }
                    tracked.accepted.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut ids) = tracked.ids.lock() {
                        if ids.len() < MAX_TRACKED_REQUESTS {
                            ids.push(id);
                        }
                    }
                }
                Err(e) => {
                    tracked.errors.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut f) = tracked.first_error.lock() {
                        f.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
        });
        // Reap finished tasks so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    let send_secs = start.elapsed().as_secs_f64();
    while tasks.join_next().await.is_some() {}
    let ids = tracked.ids.lock().map(|v| v.clone()).unwrap_or_default();
    receiver.wait_for(&ids, settle).await;
    // A late duplicate would land just after the first callback: give it a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for id in &ids {
        let cbs = receiver.callbacks(id);
        match cbs.len() {
            0 => report.no_callback += 1,
            1 => report.exactly_one_callback += 1,
            _ => report.several_callbacks += 1,
        }
        if let Some(c) = cbs.first() {
            *report.by_status.entry(c.status.clone()).or_default() += 1;
        }
    }
    report.sent = sent;
    report.skipped = skipped;
    report.achieved_rate = sent as f64 / send_secs.max(1e-9);
    report.accepted = tracked.accepted.load(Ordering::Relaxed);
    report.http_errors = tracked.errors.load(Ordering::Relaxed);
    report.first_error = tracked.first_error.lock().ok().and_then(|f| f.clone());
    report.post_latency = tracked
        .post_hist
        .lock()
        .map(|h| Percentiles::of(&h))
        .unwrap_or_default();
    report.callback_latency = receiver.latency();
    report.bad_signatures = receiver.counts().bad_signature - before_bad;
    Ok(report)
}

/// `caas-sim run` flags.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    gw: crate::cli::GatewayArgs,
    /// A TOML scenario (flags below override its rate, duration and campaign).
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// The cars to address: a file of VINs, one a line (`caas-sim fleet --vins-out`).
    #[arg(long)]
    vins: Option<PathBuf>,
    /// Requests per second.
    #[arg(long)]
    rate: Option<f64>,
    /// How long to send.
    #[arg(long)]
    duration: Option<String>,
    /// One campaign to every car instead.
    #[arg(long)]
    campaign: bool,
    /// Where the webhook receiver listens (give the gateway `--webhook-url http://ADDR/...`).
    #[arg(long, default_value = "127.0.0.1:9090")]
    webhook_listen: std::net::SocketAddr,
    /// The callbacks' HMAC secret (the gateway's `--webhook-secret`).
    #[arg(long, env = "CAAS_WEBHOOK_SECRET", default_value = "")]
    webhook_secret: String,
    /// Start a gateway (this binary's, embedded broker, temp dir) and a fleet of this many
    /// cars first, instead of using `--gateway` and `--vins`.
    #[arg(long)]
    cars: Option<u64>,
    /// Write the report as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Runtime threads (0: one, or one per core with `--cars`, whose fleet runs here too).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Write every request's timing as CSV (`posted_ms,callback_ms,request_id`: when it was
    /// POSTed, from the first POST, and how long its first callback took; empty when none
    /// came), oldest first: shows whether slow callbacks come alone or in bursts.
    #[arg(long)]
    samples: Option<PathBuf>,
}

impl RunArgs {
    /// The runtime threads to use (0: one per core). Driving a gateway takes one thread:
    /// with two, most of the driver's CPU went on waking the other one.
    pub fn threads(&self) -> usize {
        match (self.threads, self.cars) {
            (0, None) => 1,
            (n, _) => n,
        }
    }
}

/// Runs `caas-sim run`.
pub async fn run_main(a: RunArgs) -> Result<i32> {
    let mut sc = match &a.scenario {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str::<Scenario>(&text).with_context(|| format!("parsing {}", p.display()))?
        }
        None => Scenario::default(),
    };
    if let Some(r) = a.rate {
        sc.rate = r;
    }
    if let Some(d) = &a.duration {
        sc.duration = d.clone();
    }
    sc.campaign |= a.campaign;
    sc.validate()?;

    let (_gateway, _fleet, api, receiver, vins);
    if let Some(cars) = a.cars {
        let secret = if a.webhook_secret.is_empty() {
            format!("run-{:016x}", rand::random::<u64>())
        } else {
            a.webhook_secret.clone()
        };
        receiver = Receiver::start(&secret).await?;
        let spawn = crate::gateway_proc::GatewaySpawn {
            webhook_url: Some(receiver.url()),
            webhook_secret: secret,
            ..Default::default()
        };
        let gw = crate::gateway_proc::GatewayProc::start(&spawn).await?;
        api = gw.api()?;
        let opts = crate::fleet::FleetOptions {
            gateway: gw.http.clone(),
            mqtt: gw.mqtt.clone(),
            cars,
            seed: rand::random(),
            vin_prefix: crate::car::random_prefix(),
            faults: sc.faults.clone(),
            platform: sc.platform.clone(),
            ..Default::default()
        };
        let mut fleet = crate::fleet::Fleet::start(&opts).await?;
        fleet.wait_connected(Duration::from_secs(300), true).await;
        vins = fleet.vins();
        eprintln!(
            "caas-sim run: gateway {} and {} cars ready",
            gw.http,
            vins.len()
        );
        _gateway = Some(gw);
        _fleet = Some(fleet);
    } else {
        if a.webhook_secret.is_empty() {
            bail!("--webhook-secret (the gateway's) is needed to check callbacks");
        }
        let path = a
            .vins
            .as_ref()
            .context("--vins FILE (or --cars N to start a fleet) is needed")?;
        vins = std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        receiver = Receiver::start_on(a.webhook_listen, &a.webhook_secret).await?;
        eprintln!("caas-sim run: webhook receiver on {}", receiver.url());
        api = Api::with_ca(&a.gw.gateway, &a.gw.api_token, a.gw.gateway_ca.as_deref())?;
        if let Some(warning) = api
            .metrics()
            .await
            .ok()
            .and_then(|m| cars_not_yet_connected(&m, vins.len()))
        {
            eprintln!("caas-sim run: {warning}");
        }
        _gateway = None;
        _fleet = None;
    }
    let report = run_scenario(&api, &receiver, &vins, &sc).await?;
    println!("{}", report.text());
    if let Some(p) = &a.report {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.samples {
        std::fs::write(p, samples_csv(&receiver.samples()))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(f) = _fleet {
        println!("{}", f.stop().await.text());
    }
    Ok(0)
}

/// A warning when the gateway's `/metrics` text counts fewer cars connected than the `vins`
/// a run addresses: a fleet writes its VIN file before its cars register and connect, so a
/// run started on the file alone times cars still connecting.
fn cars_not_yet_connected(metrics: &str, vins: usize) -> Option<String> {
    let connected: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("caas_connected_cars "))?
        .trim()
        .parse()
        .ok()?;
    (connected < vins as f64).then(|| {
        format!(
            "the gateway has {connected} cars connected, fewer than the {vins} VINs addressed: \
             requests to cars still connecting wait for them (start once the fleet has printed \
             \"cars connected\")"
        )
    })
}

/// `posted_ms,callback_ms,request_id` lines (header first) for `--samples`, times in
/// milliseconds with microsecond precision, `posted_ms` counted from the first sample.
pub(crate) fn samples_csv(samples: &[(String, Instant, Option<Duration>)]) -> String {
    let mut csv = String::from("posted_ms,callback_ms,request_id\n");
    let Some((_, start, _)) = samples.first() else {
        return csv;
    };
    for (id, posted, latency) in samples {
        let at = posted.saturating_duration_since(*start).as_secs_f64() * 1e3;
        let took = latency.map_or(String::new(), |d| format!("{:.3}", d.as_secs_f64() * 1e3));
        csv.push_str(&format!("{at:.3},{took},{id}\n"));
    }
    csv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_warns_when_fewer_cars_are_connected_than_it_addresses() {
        let metrics = "# TYPE caas_connected_cars gauge\ncaas_connected_cars 1200\n";
        let warning = cars_not_yet_connected(metrics, 1500).expect("a shortfall");
        assert!(
            warning.contains("1200") && warning.contains("1500"),
            "{warning}"
        );
        assert_eq!(cars_not_yet_connected(metrics, 1200), None);
        assert_eq!(
            cars_not_yet_connected("caas_requests_in_flight 3\n", 10),
            None
        );
    }

    #[test]
    fn samples_are_csv_from_the_first_post_with_an_empty_field_for_no_callback() {
        let t0 = Instant::now();
        let samples = vec![
            ("a".to_string(), t0, Some(Duration::from_micros(1_250))),
            ("b".to_string(), t0 + Duration::from_micros(2_500), None),
        ];
        assert_eq!(
            samples_csv(&samples),
            "posted_ms,callback_ms,request_id\n0.000,1.250,a\n2.500,,b\n"
        );
        assert_eq!(samples_csv(&[]), "posted_ms,callback_ms,request_id\n");
    }

    #[test]
    fn scenarios_parse_validate_and_refuse_nonsense() {
        let mut sc: Scenario = toml::from_str(
            "rate = 50\nduration = \"5s\"\n[[services]]\nservice_id = \"pb\"\nflags = [\"power_boost\"]\nlasting = \"temporary\"\nexpires_in = \"10m\"\n[faults]\ndrop_commands = 0.1\n",
        )
        .unwrap();
        sc.validate().unwrap();
        assert_eq!(sc.services.len(), 1);
        assert_eq!(sc.faults.drop_commands, 0.1);
        let mut empty = Scenario::default();
        empty.validate().unwrap();
        assert_eq!(empty.services.len(), crate::car::SEED_OPTIONAL.len());
        let mut bad = Scenario {
            rate: 0.0,
            ..Scenario::default()
        };
        assert!(bad.validate().is_err());
        assert!(toml::from_str::<Scenario>("rat = 1").is_err());
        let mut van: Scenario = toml::from_str(
            "[platform]\nname = \"van\"\noptional = [\"cargo_heating\"]\nbase = [\"abs\"]\n",
        )
        .unwrap();
        van.validate().unwrap();
        let mut clash: Scenario =
            toml::from_str("[platform]\nname = \"x\"\noptional = [\"abs\"]\nbase = [\"abs\"]\n")
                .unwrap();
        assert!(clash.validate().is_err());
        let mut bad_lasting: Scenario = toml::from_str(
            "[[services]]\nservice_id = \"x\"\nflags = [\"a\"]\nlasting = \"forever\"\n",
        )
        .unwrap();
        assert!(bad_lasting.validate().is_err());
    }
}
