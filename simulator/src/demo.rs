//! `caas-sim demo`: the whole system's story in one command, with no setup.
//!
//! It starts a gateway (embedded broker, temporary data directory, a short retry policy:
//! 3 attempts, 2 s each, 1 s backoff), its own webhook receiver (the CaaS core's side, with
//! a tiny billing ledger: a customer is charged only on `ACTIVATED`), and 1,000 virtual cars
//! running the real agent core; then tells the story and checks each step:
//!
//! 1. a temporary power boost is activated and switches itself off on time in the car;
//! 2. a permanent feature is activated;
//! 3. it is deactivated;
//! 4. a car that never answers ends `FAILED`, is not charged, and when it comes back it
//!    finds the grant withdrawn (a newer command without it);
//! 5. an order for a car out of reach is cancelled before the car takes it: `FAILED`
//!    (`CANCELLED`), not charged, and the car, back, does not have the feature;
//! 6. a campaign reaches the whole fleet.
//!
//! It prints the report and exits 0 only if every step held.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;

use crate::api::{Api, Lasting};
use crate::car::CarSnapshot;
use crate::fleet::{Fleet, FleetOptions};
use crate::gateway_proc::{GatewayProc, GatewaySpawn};
use crate::webhook::Receiver;

/// `caas-sim demo` flags.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Number of cars.
    #[arg(long, default_value_t = 1000)]
    pub cars: u64,
    /// Seconds the temporary power boost lasts.
    #[arg(long, default_value_t = 8)]
    pub boost_secs: u64,
    /// Run a given `caas-gateway` binary instead of this binary's built-in one.
    #[arg(long)]
    pub gateway_bin: Option<std::path::PathBuf>,
    /// No progress bars.
    #[arg(long)]
    pub no_progress: bool,
}

struct Story {
    steps: Vec<(String, bool)>,
    started: Instant,
}

impl Story {
    fn check(&mut self, what: impl Into<String>, ok: bool) -> bool {
        let what = what.into();
        println!(
            "  [{:>5.1}s] {} {what}",
            self.started.elapsed().as_secs_f64(),
            if ok { "✓" } else { "✗" }
        );
        self.steps.push((what, ok));
        ok
    }

    fn say(&self, what: &str) {
        println!("\n[{:>5.1}s] {what}", self.started.elapsed().as_secs_f64());
    }
}

/// The thin backend's ledger: what the customer pays once the callback says so.
struct Ledger {
    lines: Vec<String>,
}

impl Ledger {
    fn settle(&mut self, vin: &str, service: &str, price: &str, status: &str) {
        let line = match status {
            "ACTIVATED" => format!("{vin} {service:<22} charged {price}"),
            "DEACTIVATED" => {
                format!("{vin} {service:<22} subscription ended, nothing further charged")
            }
            "CANCELLED" => {
                format!("{vin} {service:<22} order cancelled before the car took it: NOT charged")
            }
            _ => format!(
                "{vin} {service:<22} {status}: NOT charged, refund issued, support ticket open"
            ),
        };
        self.lines.push(line);
    }
}

async fn callback_of(
    rx: &Receiver,
    id: &str,
    timeout: Duration,
) -> Option<crate::webhook::Callback> {
    let ids = [id.to_string()];
    rx.wait_for(&ids, timeout).await;
    rx.callbacks(id).into_iter().next()
}

/// Orders `flag` (service `service`) for `vin` and tells the receiver when it was posted:
/// the request's id and that time.
async fn order(
    api: &Api,
    receiver: &Receiver,
    vin: &str,
    (service, flag): (&str, &str),
    params: &serde_json::Map<String, serde_json::Value>,
    lasting: &Lasting,
) -> Result<(String, Instant)> {
    let id = api
        .activate(vin, service, &[flag.to_string()], params, lasting)
        .await?;
    let posted = Instant::now();
    receiver.expect(&id, posted);
    Ok((id, posted))
}

/// `ON` or `off`: the car's `flag` line, as the story tells it.
fn line_state(fleet: &Fleet, vin: &str, flag: &str) -> &'static str {
    if has_line(fleet, vin, flag) {
        "ON"
    } else {
        "off"
    }
}

fn has_line(fleet: &Fleet, vin: &str, flag: &str) -> bool {
    fleet
        .car(vin)
        .map(|c| c.shared.snapshot().lines_on.iter().any(|l| l == flag))
        .unwrap_or(false)
}

async fn wait_line(fleet: &Fleet, vin: &str, flag: &str, on: bool, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if has_line(fleet, vin, flag) == on {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Lets `vin` answer again (reconnecting), then waits up to 15 s for it to apply a command
/// past seq `above`; the car's state at the end.
async fn come_back(fleet: &Fleet, vin: &str, above: u64) -> CarSnapshot {
    if let Some(c) = fleet.car(vin) {
        c.shared.set_silent(false);
        c.shared.reconnect.notify_one();
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let snap = fleet
            .car(vin)
            .map(|c| c.shared.snapshot())
            .unwrap_or_default();
        if snap.applied_seq > above || Instant::now() >= deadline {
            return snap;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the demo; the exit code is 0 only if the story held.
pub async fn demo_main(a: DemoArgs) -> Result<i32> {
    let progress = !a.no_progress;
    let started = Instant::now();
    println!("CaaS demo: a gateway with its embedded MQTT broker, {} virtual cars running the real agent core,", a.cars);
    println!("and a stand-in CaaS backend receiving signed callbacks. Retry policy: 3 attempts, 2 s each, 1 s backoff.");

    let secret = format!("demo-{:016x}", rand::random::<u64>());
    let receiver = Receiver::start(&secret).await?;
    let spawn = GatewaySpawn {
        binary: a.gateway_bin.clone(),
        webhook_url: Some(receiver.url()),
        webhook_secret: secret.clone(),
        ..GatewaySpawn::default()
    };
    let gateway = GatewayProc::start(&spawn)
        .await
        .context("starting the gateway")?;
    let api = gateway.api()?;
    println!(
        "gateway: IoT API {}  MQTT {}  data {} (temporary)",
        gateway.http,
        gateway.mqtt,
        gateway.data.display()
    );

    let opts = FleetOptions {
        gateway: gateway.http.clone(),
        mqtt: gateway.mqtt.clone(),
        cars: a.cars,
        seed: rand::random(),
        vin_prefix: crate::car::random_prefix(),
        progress,
        ..FleetOptions::default()
    };
    let t0 = Instant::now();
    let mut fleet = Fleet::start(&opts).await?;
    let provisioned = t0.elapsed();
    let connected = fleet
        .wait_connected(Duration::from_secs(120), progress)
        .await;
    println!(
        "fleet: {} cars registered in {:.1}s, {} connected in {:.1}s",
        a.cars,
        provisioned.as_secs_f64(),
        connected,
        fleet.report().connect_secs
    );
    let mut story = Story {
        steps: Vec::new(),
        started,
    };
    story.check(
        format!("{connected} of {} cars connected", a.cars),
        connected == a.cars,
    );
    let vins = fleet.vins();
    let pick = |i: usize| vins.get(i.min(vins.len() - 1)).cloned().unwrap_or_default();
    let (boost_car, perm_car, silent_car, cancel_car) = (pick(0), pick(1), pick(2), pick(3));
    let mut ledger = Ledger { lines: Vec::new() };
    let no_params = serde_json::Map::new();

    // The silent car's story takes longest (every attempt times out): start it first.
    story.say(&format!(
        "4. {silent_car} stops answering (its connection is up, commands vanish); the customer buys highway_autopilot"
    ));
    if let Some(c) = fleet.car(&silent_car) {
        c.shared.set_silent(true);
    }
    let (silent_req, silent_posted) = order(
        &api,
        &receiver,
        &silent_car,
        ("highway-autopilot", "highway_autopilot"),
        &no_params,
        &Lasting::Subscription { auto_renewal: true },
    )
    .await?;
    println!(
        "  POST /ota/activate → requestId {silent_req} (the gateway retries in the background)"
    );

    story.say(&format!(
        "1. {boost_car}: a temporary power boost for {} s",
        a.boost_secs
    ));
    let expiry = crate::unix_now() + a.boost_secs;
    let mut params = serde_json::Map::new();
    params.insert("boostPercent".into(), json!("15"));
    let (boost_req, boost_posted) = order(
        &api,
        &receiver,
        &boost_car,
        ("power-boost", "power_boost"),
        &params,
        &Lasting::Temporary(expiry),
    )
    .await?;
    let cb = callback_of(&receiver, &boost_req, Duration::from_secs(20)).await;
    let status = cb.as_ref().map(|c| c.status.clone()).unwrap_or_default();
    story.check(
        format!(
            "callback {status} after {} ms; the car's power_boost line is {}",
            boost_posted.elapsed().as_millis(),
            line_state(&fleet, &boost_car, "power_boost")
        ),
        status == "ACTIVATED" && has_line(&fleet, &boost_car, "power_boost"),
    );
    ledger.settle(&boost_car, "power-boost (8 s)", "€4.99", &status);

    story.say(&format!("2. {perm_car}: heated_seats, PERMANENT"));
    let (perm_req, _) = order(
        &api,
        &receiver,
        &perm_car,
        ("heated-seats", "heated_seats"),
        &no_params,
        &Lasting::Permanent,
    )
    .await?;
    let cb = callback_of(&receiver, &perm_req, Duration::from_secs(20)).await;
    let status = cb.as_ref().map(|c| c.status.clone()).unwrap_or_default();
    story.check(
        format!(
            "callback {status}; heated_seats is {} in the car",
            line_state(&fleet, &perm_car, "heated_seats")
        ),
        status == "ACTIVATED" && has_line(&fleet, &perm_car, "heated_seats"),
    );
    ledger.settle(&perm_car, "heated-seats (permanent)", "€199.00", &status);

    story.say(&format!("3. {perm_car}: heated_seats deactivated"));
    let deact_req = api.deactivate(&perm_car, "heated-seats").await?;
    receiver.expect(&deact_req, Instant::now());
    let cb = callback_of(&receiver, &deact_req, Duration::from_secs(20)).await;
    let status = cb.as_ref().map(|c| c.status.clone()).unwrap_or_default();
    story.check(
        format!(
            "callback {status}; heated_seats is {} in the car",
            if has_line(&fleet, &perm_car, "heated_seats") {
                "still ON"
            } else {
                "off"
            }
        ),
        status == "DEACTIVATED" && !has_line(&fleet, &perm_car, "heated_seats"),
    );
    ledger.settle(&perm_car, "heated-seats", "", &status);

    story.say(&format!(
        "1. (cont.) waiting for {boost_car}'s power boost to expire"
    ));
    let until_expiry = Duration::from_secs(expiry.saturating_sub(crate::unix_now()));
    let off = wait_line(
        &fleet,
        &boost_car,
        "power_boost",
        false,
        until_expiry + Duration::from_secs(3),
    )
    .await;
    let now = crate::unix_now();
    story.check(
        format!(
            "power_boost switched off by the car itself at expiry ({}s after the expiry time, no command needed)",
            now.saturating_sub(expiry)
        ),
        off && now + 1 >= expiry,
    );

    story.say(&format!(
        "4. (cont.) waiting for {silent_car}'s activation to run out of retries"
    ));
    let cb = callback_of(&receiver, &silent_req, Duration::from_secs(60)).await;
    let status = cb.as_ref().map(|c| c.status.clone()).unwrap_or_default();
    let code = cb
        .as_ref()
        .and_then(|c| c.error_code.clone())
        .unwrap_or_default();
    story.check(
        format!(
            "callback {status} ({code}) after {:.1} s",
            silent_posted.elapsed().as_secs_f64()
        ),
        status == "FAILED",
    );
    ledger.settle(&silent_car, "highway-autopilot", "€9.99/month", &status);
    let vs = api.vehicle_status(&silent_car).await.unwrap_or_default();
    let services = vs["activeServices"].as_array().cloned().unwrap_or_default();
    let autopilot_active = services
        .iter()
        .any(|s| s["serviceId"] == "highway-autopilot" && s["status"] == "ACTIVE");
    story.check(
        format!(
            "GET /vehicles/{silent_car}/status: connectivity {}, services {}",
            vs["connectivity"].as_str().unwrap_or("?"),
            serde_json::to_string(&services).unwrap_or_default()
        ),
        !autopilot_active,
    );
    println!("  a moment later the car comes back (answers again, reconnects)");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let snap = come_back(&fleet, &silent_car, 0).await;
    let withdrawn_ok =
        snap.applied_seq > 0 && !snap.lines_on.iter().any(|l| l == "highway_autopilot");
    if !withdrawn_ok {
        if let Ok(h) = api.history(&silent_car).await {
            println!("  the car's history at the gateway: {h}");
        }
    }
    story.check(
        format!(
            "the car applied the withdrawal (seq {}); highway_autopilot is {}",
            snap.applied_seq,
            if snap.lines_on.iter().any(|l| l == "highway_autopilot") {
                "ON — unpaid!"
            } else {
                "off"
            }
        ),
        withdrawn_ok,
    );

    story.say(&format!(
        "5. {cancel_car} is out of reach; the customer orders snow_mode, then cancels the order"
    ));
    if let Some(c) = fleet.car(&cancel_car) {
        c.shared.set_silent(true);
    }
    let (cancel_req, _) = order(
        &api,
        &receiver,
        &cancel_car,
        ("snow-mode", "snow_mode"),
        &no_params,
        &Lasting::Permanent,
    )
    .await?;
    let answer = api.cancel_request(&cancel_req).await?;
    let cb = callback_of(&receiver, &cancel_req, Duration::from_secs(20)).await;
    let status = cb.as_ref().map(|c| c.status.clone()).unwrap_or_default();
    let code = cb
        .as_ref()
        .and_then(|c| c.error_code.clone())
        .unwrap_or_default();
    story.check(
        format!(
            "POST /ota/requests/{cancel_req}/cancel → {} {}; callback {status} ({code})",
            answer["status"].as_str().unwrap_or("?"),
            answer["errorCode"].as_str().unwrap_or("?")
        ),
        answer["errorCode"] == "CANCELLED" && status == "FAILED" && code == "CANCELLED",
    );
    ledger.settle(&cancel_car, "snow-mode (permanent)", "€49.00", "CANCELLED");
    let snap = come_back(&fleet, &cancel_car, 1).await;
    story.check(
        format!(
            "back, the car applied the newest command (seq {}); snow_mode is {}",
            snap.applied_seq,
            if snap.lines_on.iter().any(|l| l == "snow_mode") {
                "ON — unpaid!"
            } else {
                "off"
            }
        ),
        snap.applied_seq > 1 && !snap.lines_on.iter().any(|l| l == "snow_mode"),
    );

    story.say(&format!(
        "6. a campaign: streaming (subscription) to all {} cars",
        vins.len()
    ));
    let t = Instant::now();
    let campaign = api
        .campaign(
            &vins,
            true,
            "streaming",
            &["streaming".to_string()],
            &Lasting::Subscription { auto_renewal: true },
        )
        .await?;
    let (done, counts) = wait_campaign(&api, &campaign, vins.len(), Duration::from_secs(120)).await;
    let secs = t.elapsed().as_secs_f64();
    let on = fleet
        .cars
        .iter()
        .filter(|c| {
            c.shared
                .snapshot()
                .lines_on
                .iter()
                .any(|l| l == "streaming")
        })
        .count();
    story.check(
        format!("campaign {campaign}: {counts} in {secs:.1} s; streaming ON in {on} cars"),
        done && on == vins.len(),
    );
    // Let the campaign's callbacks land before the totals.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let report = fleet.stop().await;
    println!("\n── billing (the stand-in CaaS backend, from the callbacks) ──");
    for l in &ledger.lines {
        println!("{l}");
    }
    println!("\n{}", report.text());
    let c = receiver.counts();
    println!(
        "callbacks: {} received (HMAC verified), {} duplicates, {} refused\nPOST→callback of the story's single requests (the FAILED one waited out its retries): {}",
        c.received,
        c.duplicates,
        c.bad_signature,
        receiver.latency().line()
    );
    println!(
        "gateway: {:.1} MiB resident",
        gateway.rss() as f64 / 1048576.0
    );
    let failed: Vec<&String> = story.steps.iter().filter(|s| !s.1).map(|s| &s.0).collect();
    if failed.is_empty() {
        println!(
            "\nThe story held: {} checks passed in {:.1} s.",
            story.steps.len(),
            started.elapsed().as_secs_f64()
        );
        Ok(0)
    } else {
        println!(
            "\nThe story did NOT hold: {} check(s) failed:",
            failed.len()
        );
        for f in failed {
            println!("  ✗ {f}");
        }
        println!("gateway log: {}", gateway.log.display());
        Ok(1)
    }
}

/// How often [`wait_campaign`] polls: the campaign's time is measured to within it. The
/// gateway answers from live counters, so a poll costs it no store reads.
const CAMPAIGN_POLL: Duration = Duration::from_millis(10);

/// Polls `GET /campaigns/{id}` until every request is final (COMPLETED or FAILED).
pub async fn wait_campaign(api: &Api, id: &str, total: usize, timeout: Duration) -> (bool, String) {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        if let Ok(v) = api.campaign_status(id).await {
            let n = |k: &str| v["counts"][k].as_u64().unwrap_or(0);
            last = format!(
                "{} COMPLETED, {} FAILED, {} IN_PROGRESS, {} QUEUED",
                n("COMPLETED"),
                n("FAILED"),
                n("IN_PROGRESS"),
                n("QUEUED")
            );
            if (n("COMPLETED") + n("FAILED")) as usize >= total {
                return (n("FAILED") == 0, last);
            }
        }
        if Instant::now() >= deadline {
            return (false, last);
        }
        tokio::time::sleep(CAMPAIGN_POLL).await;
    }
}
