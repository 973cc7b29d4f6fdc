//! The broker side: a kill -9 of the gateway process (after a request's 2xx, a campaign's,
//! a decommissioning's, a campaign's stop of itself), Mosquitto as the external broker
//! (plain, and mTLS with the shipped configuration), per-car isolation on the embedded
//! broker's mTLS listener, an idle TCP socket that must not stall other cars, a car's late
//! acknowledgement on a new connection, grants held after a refusal staying held across a
//! kill -9, the process keeping its heap reserve resident, and its store running out of
//! room (a file-size limit).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use caas_protocol::TrustedKey;
use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Transport};

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_gateway(data: &Path, http: u16, mqtt: u16, hook: &Webhook) -> Proc {
    spawn_gateway_with(data, http, mqtt, hook, &[], &[])
}

fn spawn_gateway_with(
    data: &Path,
    http: u16,
    mqtt: u16,
    hook: &Webhook,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let mut command = Command::new(env!("CARGO_BIN_EXE_caas-gateway"));
    gateway_args(&mut command, data, http, mqtt, hook);
    let child = command
        .args(extra)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Proc(child)
}

/// The arguments every spawned gateway gets: `serve` on these ports and data, the test token
/// and webhook, 4 attempts of 2 s with 1 s backoffs.
fn gateway_args(command: &mut Command, data: &Path, http: u16, mqtt: u16, hook: &Webhook) {
    command
        .args([
            "serve",
            "--http",
            &format!("127.0.0.1:{http}"),
            "--mqtt",
            &format!("127.0.0.1:{mqtt}"),
        ])
        .arg("--data")
        .arg(data)
        .args([
            "--api-token",
            TOKEN,
            "--webhook-url",
            &hook.url,
            "--webhook-secret",
            SECRET,
        ])
        .args([
            "--attempts",
            "4",
            "--attempt-timeout",
            "2s",
            "--backoff",
            "1s,1s,1s",
        ]);
}

async fn wait_healthy(http: u16) {
    let end = Instant::now() + Duration::from_secs(20);
    let url = format!("http://127.0.0.1:{http}/healthz");
    loop {
        if let Ok(r) = reqwest::get(&url).await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(Instant::now() < end, "gateway did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A gateway process over `data` on fresh ports, healthy, with car 1 registered:
/// (process, API client, HTTP port, MQTT port).
async fn spawned_with_car_1(data: &Path, hook: &Webhook) -> (Proc, Api, u16, u16) {
    let (http, mqtt) = (free_port(), free_port());
    let gw = spawn_gateway(data, http, mqtt, hook);
    wait_healthy(http).await;
    let api = Api::new(format!("127.0.0.1:{http}").parse().unwrap());
    api.register(1).await;
    (gw, api, http, mqtt)
}

/// Car 1, obeying, on a gateway process's plain MQTT port, trusting the key it serves.
async fn obeying_car_1(api: &Api, mqtt: u16) -> TestCar {
    let (_, keys) = api.get("/keys").await;
    let key = keys["keys"][0]["publicKey"].as_str().unwrap().to_owned();
    TestCar::start(
        1,
        &key,
        CarOpts {
            host: "127.0.0.1".into(),
            port: mqtt,
            tls: None,
            mode: Mode::Obey,
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_campaign_cut_short_by_kill_9_is_completed_by_its_repeat() {
    const CARS: u32 = 6_000;
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (mut gw, api, http, mqtt) = spawned_with_car_1(dir.path(), &hook).await;
    let registering: Vec<_> = (0..4)
        .map(|k| {
            let api = api.clone();
            tokio::spawn(async move {
                for n in (2..=CARS).filter(|n| n % 4 == k) {
                    api.register(n).await;
                }
            })
        })
        .collect();
    for r in registering {
        r.await.unwrap();
    }
    let vins: Vec<String> = (1..=CARS).map(|n| vin(n).to_string()).collect();
    let campaign = serde_json::json!({
        "vins": vins, "action": "ACTIVATE", "serviceId": "power-boost",
        "configuration": {"featureFlags": ["power_boost"]}, "duration": {"type": "PERMANENT"}
    });
    let send = |api: Api| {
        let body = campaign.clone();
        async move {
            let r = api
                .http
                .post(format!("{}/campaigns", api.base))
                .bearer_auth(TOKEN)
                .header("Idempotency-Key", "campaign-cut-short")
                .json(&body)
                .send()
                .await
                .ok()?;
            let status = r.status().as_u16();
            Some((status, r.json::<serde_json::Value>().await.ok()?))
        }
    };
    // Half the campaign's requests made (some of them flushed): kill -9 then, its answer
    // not yet given.
    let first = tokio::spawn(send(api.clone()));
    let created = "caas_requests_total{state=\"created\"}";
    let end = Instant::now() + Duration::from_secs(20);
    while api.metric(created).await < f64::from(CARS / 2) {
        assert!(Instant::now() < end, "the campaign never began");
    }
    gw.0.kill().unwrap();
    gw.0.wait().unwrap();
    let answered = first.await.unwrap();
    eprintln!("the first POST's answer before the kill: {answered:?}");

    // The same POST again: every car's request is there once, those the kill cut short made
    // now, the others counted as they were.
    let gw = spawn_gateway(dir.path(), http, mqtt, &hook);
    wait_healthy(http).await;
    let (status, b) = send(api.clone()).await.expect("the repeat is answered");
    assert_eq!(status, 202, "{b}");
    assert_eq!(
        (b["total"].as_u64(), b["accepted"].as_u64()),
        (Some(u64::from(CARS)), Some(u64::from(CARS))),
        "{b}"
    );
    let (s, c) = api
        .get(&format!("/campaigns/{}", b["campaignId"].as_str().unwrap()))
        .await;
    assert_eq!(s, 200, "{c}");
    let counted: u64 = ["QUEUED", "IN_PROGRESS", "COMPLETED", "FAILED"]
        .iter()
        .map(|k| c["counts"][k].as_u64().unwrap())
        .sum();
    assert_eq!(counted, u64::from(CARS), "{c}");
    let made_now = api.metric(created).await;
    eprintln!("requests made by the repeat: {made_now} of {CARS}");
    assert!(made_now <= f64::from(CARS));
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_survives_kill_9_after_its_2xx() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (mut gw, api, http, mqtt) = spawned_with_car_1(dir.path(), &hook).await;
    let id = api.activate(1, "power-boost", "power_boost").await;
    // SIGKILL right after the 2xx: nothing but the flushed database survives.
    gw.0.kill().unwrap();
    gw.0.wait().unwrap();
    let gw = spawn_gateway(dir.path(), http, mqtt, &hook);
    wait_healthy(http).await;
    let (s, r) = api.get(&format!("/ota/requests/{id}")).await;
    assert_eq!(s, 200);
    assert_eq!(r["status"], "IN_PROGRESS");
    let car = obeying_car_1(&api, mqtt).await;
    let cb = hook.wait(&id, Duration::from_secs(20)).await;
    assert_eq!(cb.body["status"], "ACTIVATED");
    assert_eq!(
        car.seen.lock().unwrap().grants,
        vec!["power-boost".to_string()]
    );
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decommissioning_survives_kill_9_after_its_2xx() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (mut gw, api, http, mqtt) = spawned_with_car_1(dir.path(), &hook).await;
    let car = obeying_car_1(&api, mqtt).await;
    let boost = api.activate(1, "power-boost", "power_boost").await;
    assert_eq!(
        hook.wait(&boost, Duration::from_secs(20)).await.body["status"],
        "ACTIVATED"
    );
    // The unit leaves with the feature in its flash; a request made now waits for it.
    let flash = car.flash.lock().unwrap().clone();
    drop(car);
    let seats = api.activate(1, "heated-seats", "heated_seats").await;
    let (s, retired) = api.delete(&format!("/vehicles/{}", vin(1))).await;
    assert_eq!(s, 200, "{retired}");
    assert_eq!(retired["requestsFailed"], 1, "{retired}");
    let withdrawal = retired["withdrawalSeq"].as_u64().unwrap();
    // SIGKILL right after the 2xx: nothing but the flushed database survives.
    gw.0.kill().unwrap();
    gw.0.wait().unwrap();
    let gw = spawn_gateway(dir.path(), http, mqtt, &hook);
    wait_healthy(http).await;

    let (s, st) = api.get(&format!("/vehicles/{}/status", vin(1))).await;
    assert_eq!((s, st["field"].as_str()), (404, Some("vin")), "{st}");
    let (_, r) = api.get(&format!("/ota/requests/{seats}")).await;
    assert_eq!(
        (&r["status"], &r["errorCode"]),
        (
            &serde_json::json!("FAILED"),
            &serde_json::json!("DECOMMISSIONED")
        ),
        "{r}"
    );
    let cb = hook.wait(&seats, Duration::from_secs(20)).await;
    assert_eq!(
        (&cb.body["status"], &cb.body["errorCode"]),
        (
            &serde_json::json!("FAILED"),
            &serde_json::json!("DECOMMISSIONED")
        )
    );
    // The unit comes back with its flash: it is sent the withdrawal and drops the feature.
    let (_, keys) = api.get("/keys").await;
    let key = keys["keys"][0]["publicKey"].as_str().unwrap().to_owned();
    let opts = CarOpts {
        host: "127.0.0.1".into(),
        port: mqtt,
        tls: None,
        mode: Mode::Obey,
    };
    let car = TestCar::start_with_flash(1, car_key(1), &key, opts, flash).await;
    wait_until(
        "the unit applied the withdrawal",
        Duration::from_secs(20),
        || car.seen.lock().unwrap().applied_seq == withdrawal,
    )
    .await;
    assert_eq!(car_services(&car), Vec::<String>::new());
    // Registered again, the car's next command goes on above the withdrawal.
    api.register(1).await;
    let snow = api.activate(1, "snow-mode", "snow_mode").await;
    assert_eq!(
        hook.wait(&snow, Duration::from_secs(20)).await.body["status"],
        "ACTIVATED"
    );
    assert_eq!(car_services(&car), ["snow-mode"]);
    // A callback delivered just before the kill may come again (its delivery's record is
    // lazy): a repeat says the same, so the receiver can tell there was one outcome.
    let outcomes: Vec<_> = hook
        .for_request(&seats)
        .iter()
        .map(|c| (c.body["status"].clone(), c.body["errorCode"].clone()))
        .collect();
    assert!(
        outcomes.iter().all(|o| *o
            == (
                serde_json::json!("FAILED"),
                serde_json::json!("DECOMMISSIONED")
            )),
        "{outcomes:?}"
    );
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_that_stopped_itself_stays_stopped_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (http, mqtt) = (free_port(), free_port());
    let mut gw = spawn_gateway(dir.path(), http, mqtt, &hook);
    wait_healthy(http).await;
    let api = Api::new(format!("127.0.0.1:{http}").parse().unwrap());
    let (_, keys) = api.get("/keys").await;
    let key = keys["keys"][0]["publicKey"].as_str().unwrap().to_owned();
    // Cars 1-5 online (their platform has no warp drive: each refuses it), 6-8 offline.
    let mut cars = Vec::new();
    for n in 1..=8 {
        api.register(n).await;
    }
    for n in 1..=5 {
        let opts = CarOpts {
            host: "127.0.0.1".into(),
            port: mqtt,
            tls: None,
            mode: Mode::Obey,
        };
        let car = TestCar::start(n, &key, opts).await;
        car.wait_connected().await;
        cars.push(car);
    }
    let body = serde_json::json!({
        "vins": (1..=8).map(|n| vin(n).to_string()).collect::<Vec<_>>(),
        "action": "ACTIVATE", "serviceId": "warp-drive",
        "configuration": {"featureFlags": ["warp_drive"]},
        "duration": {"type": "PERMANENT"},
        "abortWhen": {"refusedPercent": 50, "minFinished": 5}});
    let (s, b) = api.post("/campaigns", &body).await;
    assert_eq!(s, 202, "{b}");
    let cid = b["campaignId"].as_str().unwrap().to_owned();
    let path = format!("/campaigns/{cid}");
    let campaign = || api.get(&path);
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, c) = campaign().await;
        if !c["abortedAt"].is_null() {
            break;
        }
        assert!(
            Instant::now() < end,
            "the campaign did not stop itself: {c}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // SIGKILL once it says it stopped: what it said must hold after the restart.
    gw.0.kill().unwrap();
    gw.0.wait().unwrap();
    let gw = spawn_gateway(dir.path(), http, mqtt, &hook);
    wait_healthy(http).await;
    let end = Instant::now() + Duration::from_secs(20);
    let c = loop {
        let (_, c) = campaign().await;
        if c["counts"]["IN_PROGRESS"] == 0 && c["counts"]["QUEUED"] == 0 {
            break c;
        }
        assert!(Instant::now() < end, "requests still in flight: {c}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        !c["abortedAt"].is_null() && !c["cancelledAt"].is_null(),
        "{c}"
    );
    assert_eq!(c["counts"]["FAILED"], 8, "{c}");
    let (_, page) = api
        .get(&format!("/campaigns/{cid}/requests?limit=500"))
        .await;
    let requests = page["requests"].as_array().unwrap();
    assert_eq!(requests.len(), 8, "{page}");
    for r in requests {
        let v = r["vin"].as_str().unwrap();
        let n: u32 = v[v.len() - 6..].parse().unwrap();
        let want = if n <= 5 {
            "UNKNOWN_FEATURE"
        } else {
            "CANCELLED"
        };
        assert_eq!(
            (r["status"].as_str(), r["errorCode"].as_str()),
            (Some("FAILED"), Some(want)),
            "{r}"
        );
        // Every callback of it (a repeat after the kill may come) says the same.
        let id = r["requestId"].as_str().unwrap();
        let cb = hook.wait(id, Duration::from_secs(20)).await;
        assert_eq!(cb.body["errorCode"], want, "{}", cb.body);
        assert!(hook
            .for_request(id)
            .iter()
            .all(|c| c.body["status"] == "FAILED" && c.body["errorCode"] == want));
    }
    drop((cars, gw));
}

/// The process's resident size, from `/proc`.
#[cfg(target_os = "linux")]
fn resident_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line["VmRSS:".len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib / 1024
}

/// The heap reserve is faulted in and stays resident: the warmer frees what it touched once
/// the reserve is reached, and the allocator, told to keep freed pages, does not hand them
/// back to the kernel. The environment asks mimalloc to purge at once, so the pages would go
/// if the gateway did not override that.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heap_reserve_is_faulted_in_and_stays_resident() {
    const RESERVE_MIB: u64 = 192;
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (http, mqtt) = (free_port(), free_port());
    let reserve = RESERVE_MIB.to_string();
    let gw = spawn_gateway_with(
        dir.path(),
        http,
        mqtt,
        &hook,
        &["--heap-reserve-mb", &reserve],
        &[("MIMALLOC_PURGE_DELAY", "0")],
    );
    wait_healthy(http).await;
    let api = Api::new(format!("127.0.0.1:{http}").parse().unwrap());
    let pid = gw.0.id();
    let end = Instant::now() + Duration::from_secs(60);
    while resident_mib(pid) < RESERVE_MIB {
        assert!(
            Instant::now() < end,
            "resident {} MiB, reserve {RESERVE_MIB} MiB",
            resident_mib(pid)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let prefaulted = api.metric("caas_heap_prefaulted_bytes_total").await;
    assert!(prefaulted > 0.0, "the warmer faulted nothing in");
    // With the gateway allocating (mimalloc purges from its allocation paths), the pages
    // are still there.
    let busy_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < busy_until {
        api.get_text("/metrics").await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let resident = resident_mib(pid);
    assert!(
        resident >= RESERVE_MIB * 95 / 100,
        "resident {resident} MiB after the reserve of {RESERVE_MIB} MiB was reached"
    );
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_in_flight_at_kill_9_is_sent_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    hook.hold.store(true, Ordering::SeqCst);
    let (mut gw, api, http, mqtt) = spawned_with_car_1(dir.path(), &hook).await;
    let car = obeying_car_1(&api, mqtt).await;
    let id = api.activate(1, "power-boost", "power_boost").await;
    // The request completes; its callback's first try hangs at the receiver.
    let end = Instant::now() + Duration::from_secs(20);
    while hook.held.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < end, "no callback reached the receiver");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, r) = api.get(&format!("/ota/requests/{id}")).await;
    assert_eq!(r["status"], "COMPLETED");
    // SIGKILL with the callback in flight: it was never filed in the outbox, only the car's
    // record still lists the request.
    gw.0.kill().unwrap();
    gw.0.wait().unwrap();
    drop(car);
    // Let the cut-off POST's handler finish, so only a new POST can add a callback.
    hook.hold.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = hook.for_request(&id).len();
    let gw = spawn_gateway(dir.path(), http, mqtt, &hook);
    wait_healthy(http).await;
    let end = Instant::now() + Duration::from_secs(20);
    while hook.for_request(&id).len() == before {
        assert!(
            Instant::now() < end,
            "the callback was not sent after the restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cbs = hook.for_request(&id);
    assert!(cbs
        .iter()
        .all(|c| c.body["status"] == "ACTIVATED" && c.signature_ok));
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_held_after_a_refusal_are_still_held_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (mut gw, api, http, mqtt) = spawned_with_car_1(dir.path(), &hook).await;
    let car = obeying_car_1(&api, mqtt).await;
    car.wait_connected().await;
    // Three new grants in one command, the oldest one bad; the car, deaf until the restart,
    // refuses that command without saying for which grant.
    let ([bad, boost, snow], refused) = three_grants_refused_together(&api, &car).await;
    // SIGKILL once the oldest went out alone: only what was flushed before that command
    // left survives, and the other two must still be held.
    let alone = refused + 1;
    wait_command(&car, "the oldest grant sent alone", |s| s == alone).await;
    gw.0.kill().unwrap();
    gw.0.wait().unwrap();
    let before = car.seen.lock().unwrap().set_states.len();
    // The same car (its state kept) reconnects to the new process on the same port.
    car.ignore.store(false, Ordering::SeqCst);
    let gw = spawn_gateway(dir.path(), http, mqtt, &hook);
    wait_healthy(http).await;
    let cb = hook.wait(&bad, Duration::from_secs(20)).await;
    assert_eq!(
        (&cb.body["status"], &cb.body["errorCode"]),
        (
            &serde_json::json!("FAILED"),
            &serde_json::json!("UNKNOWN_FEATURE")
        )
    );
    wait_activated(&hook, &[&boost, &snow], Duration::from_secs(20)).await;
    assert_eq!(car_services(&car), ["power-boost", "snow-mode"]);
    // The first command after the restart is the bad grant alone, as before the kill.
    let after = states_seen(&car, before);
    assert_eq!(
        after.first(),
        Some(&(alone, vec!["warp".to_owned()])),
        "{after:?}"
    );
    assert!(
        after
            .iter()
            .all(|(_, g)| !g.iter().any(|s| s == "warp") || g.len() == 1),
        "{after:?}"
    );
    drop(gw);
}

/// A gateway (in this process, with a webhook receiver) whose external broker is a plain
/// Mosquitto on a free port, not started: (data directory, receiver, gateway, API client,
/// the broker's configuration file, its port). `None` (the test is skipped) when Mosquitto
/// is not installed.
async fn gateway_on_plain_mosquitto() -> Option<(
    tempfile::TempDir,
    Webhook,
    caas_gateway::Gateway,
    Api,
    PathBuf,
    u16,
)> {
    gateway_on_plain_mosquitto_with(|_| ()).await
}

/// [`gateway_on_plain_mosquitto`], with the gateway's configuration changed by `tweak`.
async fn gateway_on_plain_mosquitto_with(
    tweak: impl FnOnce(&mut caas_gateway::Config),
) -> Option<(
    tempfile::TempDir,
    Webhook,
    caas_gateway::Gateway,
    Api,
    PathBuf,
    u16,
)> {
    if !mosquitto_or_skip() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = dir.path().join("m.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )
    .unwrap();
    let hook = Webhook::start(0).await;
    let mut c = config(&dir.path().join("gw"), Some(&hook));
    c.mqtt = None;
    c.broker = Some(format!("mqtt://127.0.0.1:{port}"));
    tweak(&mut c);
    let gw = caas_gateway::start(c).await.unwrap();
    let api = Api::new(gw.http_addr());
    Some((dir, hook, gw, api, conf, port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activation_through_mosquitto() {
    // Started before its broker: up, but not ready until the broker is there.
    let Some((_dir, hook, gw, api, conf, port)) = gateway_on_plain_mosquitto().await else {
        return;
    };
    let (s, h) = api.get("/healthz").await;
    assert_eq!(
        (s, &h["broker"]),
        (503, &serde_json::json!("disconnected")),
        "{h}"
    );
    assert_eq!(h["store"], "ok");
    let mosquitto = start_mosquitto(&conf, port).await;
    wait_healthz(&api, 200).await;
    api.register(1).await;
    let car = obeying_car_1(&api, port).await;
    car.wait_connected().await;
    let id = api.activate(1, "power-boost", "power_boost").await;
    let cb = hook.wait(&id, Duration::from_secs(15)).await;
    assert_eq!(cb.body["status"], "ACTIVATED");
    assert!(cb.signature_ok);
    let (s, b) = api
        .post(
            "/ota/deactivate",
            &serde_json::json!({"vin": vin(1).to_string(), "serviceId": "power-boost"}),
        )
        .await;
    assert_eq!(s, 202);
    let cb = hook
        .wait(b["requestId"].as_str().unwrap(), Duration::from_secs(15))
        .await;
    assert_eq!(cb.body["status"], "DEACTIVATED");
    // The broker gone: not ready again.
    drop(mosquitto);
    wait_healthz(&api, 503).await;
    gw.shutdown().await;
}

/// An outage of the external broker spends no attempt: a request accepted while it is down
/// outlives its whole retry budget (here ~4 s: 2 attempts of 1 s, 0.5 s backoff, a 1 s status
/// query) without failing, and completes once the broker is back and the car with it. Before,
/// it failed with NO_CONFIRMATION (and its grant was withdrawn) though no command had left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_spends_no_attempt() {
    let Some((_dir, hook, gw, api, conf, port)) = gateway_on_plain_mosquitto().await else {
        return;
    };
    api.register(1).await;
    let mosquitto = start_mosquitto(&conf, port).await;
    wait_healthz(&api, 200).await;
    drop(mosquitto);
    wait_healthz(&api, 503).await;

    let id = api.activate(1, "power-boost", "power_boost").await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (_, rec) = api.get(&format!("/ota/requests/{id}")).await;
    assert_eq!(rec["status"], "IN_PROGRESS", "{rec}");
    assert_eq!(rec["attempts"], 1, "{rec}");
    assert!(hook.for_request(&id).is_empty(), "no callback yet");

    let _mosquitto = start_mosquitto(&conf, port).await;
    wait_healthz(&api, 200).await;
    let car = obeying_car_1(&api, port).await;
    car.wait_connected().await;
    let cb = hook.wait(&id, SETTLED_WITHIN).await;
    assert_eq!(cb.body["status"], "ACTIVATED", "{}", cb.body);
    gw.shutdown().await;
}

/// An outage during which the engine makes more commands than the broker client's request
/// queue holds (`broker_queue`, here 16): the commands are deferred, not queued, so every
/// activation is still answered at once (before, a flusher waited on the full queue, and its
/// shard and every answer behind it with it, until the broker came back). When the broker
/// is back the gateway subscribes to the cars' reports again (ahead of anything queued) and
/// re-sends the states not yet confirmed, and the car that comes online is activated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_command_queue_holds_stalls_nothing_and_loses_nothing() {
    const CARS: u32 = 40;
    let Some((_dir, hook, gw, api, conf, port)) =
        gateway_on_plain_mosquitto_with(|c| c.broker_queue = 16).await
    else {
        return;
    };
    let mosquitto = start_mosquitto(&conf, port).await;
    wait_healthz(&api, 200).await;
    for n in 1..=CARS {
        api.register(n).await;
    }
    drop(mosquitto);
    wait_healthz(&api, 503).await;

    // One command a car, more than the queue holds: each activation is answered without
    // waiting for the broker (`activate` asserts the 202).
    let deferred = "caas_commands_deferred_total";
    let before = api.metric(deferred).await;
    let mut ids = Vec::new();
    for n in 1..=CARS {
        let answered = tokio::time::timeout(
            Duration::from_secs(10),
            api.activate(n, "power-boost", "power_boost"),
        )
        .await;
        ids.push(answered.expect("an activation waits for the broker"));
    }
    assert!(
        api.metric(deferred).await >= before + f64::from(CARS),
        "the outage's commands are deferred"
    );

    let _mosquitto = start_mosquitto(&conf, port).await;
    wait_healthz(&api, 200).await;
    let car = obeying_car_1(&api, port).await;
    car.wait_connected().await;
    let cb = hook.wait(&ids[0], SETTLED_WITHIN).await;
    assert_eq!(cb.body["status"], "ACTIVATED", "{}", cb.body);
    gw.shutdown().await;
}

/// A campaign's burst of reports reaches the gateway through a Mosquitto whose per-client
/// queues are far smaller than the burst (5 in flight and 10 queued here; the shipped
/// configuration has 100 and 1,000, for a fleet of thousands). Mosquitto 2 applies them to
/// the gateway's one subscription too, which carries every car's reports: at QoS 1 it dropped
/// those past them, and each such request waited for its attempt timeout (a 19,000-car
/// campaign took 61 s instead of ~2.4 s). The gateway now subscribes at QoS 0, which the
/// in-flight window does not hold back: every request completes on its first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaigns_reports_pass_a_mosquitto_with_small_per_client_queues() {
    const CARS: u32 = 40;
    let Some((_dir, _hook, gw, api, conf, port)) = gateway_on_plain_mosquitto_with(|c| {
        // A lost report would wait this long: far past the test's wait.
        c.retry.attempt_timeout = Duration::from_secs(120);
    })
    .await
    else {
        return;
    };
    let mut bounds = std::fs::read_to_string(&conf).unwrap();
    bounds.push_str("max_inflight_messages 5\nmax_queued_messages 10\n");
    std::fs::write(&conf, bounds).unwrap();
    let _mosquitto = start_mosquitto(&conf, port).await;
    wait_healthz(&api, 200).await;
    let (_, keys) = api.get("/keys").await;
    let key = keys["keys"][0]["publicKey"].as_str().unwrap().to_owned();
    let mut cars = Vec::new();
    for n in 1..=CARS {
        api.register(n).await;
        let opts = CarOpts {
            host: "127.0.0.1".into(),
            port,
            tls: None,
            mode: Mode::Obey,
        };
        cars.push(TestCar::start(n, &key, opts).await);
    }
    for car in &cars {
        car.wait_connected().await;
    }
    let attempts = api.metric("caas_attempts_total").await;

    let body = serde_json::json!({
        "vins": (1..=CARS).map(|n| vin(n).to_string()).collect::<Vec<_>>(),
        "action": "ACTIVATE", "serviceId": "power-boost",
        "configuration": {"featureFlags": ["power_boost"]},
        "duration": {"type": "PERMANENT"}});
    let (s, b) = api.post("/campaigns", &body).await;
    assert_eq!(s, 202, "{b}");
    let cid = b["campaignId"].as_str().unwrap().to_owned();
    let end = Instant::now() + SETTLED_WITHIN;
    loop {
        let (_, c) = api.get(&format!("/campaigns/{cid}")).await;
        if c["counts"]["COMPLETED"] == CARS {
            break;
        }
        assert!(Instant::now() < end, "reports lost on the way: {c}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        api.metric("caas_attempts_total").await,
        attempts + f64::from(CARS),
        "one attempt a car"
    );
    gw.shutdown().await;
}

/// When the external broker comes back (here without its retained messages, as the shipped
/// configuration runs it), only the car that has not confirmed its newest command gets it
/// again: a broker with persistent sessions would queue every copy for every offline car.
/// A car that confirmed its state and then lost it (its store wiped, or the unit replaced)
/// says so in the report it sends on connecting, and gets its state again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_re_sends_only_unconfirmed_states_and_a_wiped_car_gets_its_own() {
    let Some((_dir, hook, gw, api, conf, port)) = gateway_on_plain_mosquitto().await else {
        return;
    };
    let mosquitto = start_mosquitto(&conf, port).await;
    wait_healthz(&api, 200).await;
    api.register(1).await;
    api.register(2).await;
    let car = obeying_car_1(&api, port).await;
    car.wait_connected().await;
    let id = api.activate(1, "power-boost", "power_boost").await;
    assert_eq!(
        hook.wait(&id, SETTLED_WITHIN).await.body["status"],
        "ACTIVATED"
    );
    let confirmed_at = Instant::now();
    drop(car);
    // Car 2 is offline: its activation waits unconfirmed (well within its attempt).
    api.activate(2, "power-boost", "power_boost").await;

    let published = "caas_commands_published_total";
    let before = api.metric(published).await;
    drop(mosquitto);
    wait_healthz(&api, 503).await;
    let _mosquitto = start_mosquitto(&conf, port).await;
    wait_healthz(&api, 200).await;
    let end = Instant::now() + SETTLED_WITHIN;
    while api.metric(published).await <= before {
        assert!(Instant::now() < end, "nothing re-sent after the reconnect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        api.metric(published).await,
        before + 1.0,
        "only car 2's state"
    );

    // Past the 5 s in which a car's state is not re-sent twice.
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(confirmed_at.elapsed())).await;
    let wiped = obeying_car_1(&api, port).await;
    wiped.wait_connected().await;
    wait_until("the wiped car has its grant back", SETTLED_WITHIN, || {
        wiped.seen.lock().unwrap().grants == vec!["power-boost".to_string()]
    })
    .await;
    gw.shutdown().await;
}

/// Waits until `GET /healthz` answers `status`.
async fn wait_healthz(api: &Api, status: u16) {
    let end = Instant::now() + SETTLED_WITHIN;
    loop {
        let (s, h) = api.get("/healthz").await;
        if s == status {
            return;
        }
        assert!(Instant::now() < end, "/healthz stays {s}: {h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a [`Probe`]'s connection heard from the broker.
#[derive(Debug)]
enum Heard {
    ConnAck(rumqttc::ConnectReturnCode),
    SubAck(Vec<rumqttc::SubscribeReasonCode>),
    PubAck,
    Publish { topic: String, payload: Vec<u8> },
    Closed(String),
}

/// How the broker answered a SUBSCRIBE or a QoS 1 PUBLISH.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Granted,
    Refused,
    Closed,
}

/// Bound on waiting for the broker's next word to a probe.
const HEAR_WITHIN: Duration = Duration::from_secs(15);
/// Bound on waiting for a request's callback.
const SETTLED_WITHIN: Duration = Duration::from_secs(15);

/// One MQTT connection with a client certificate, driven a step at a time. It never
/// reconnects, so a connection the broker closed stays closed and is seen as such, and
/// every message the broker delivered to it is kept.
struct Probe {
    client: AsyncClient,
    heard: tokio::sync::mpsc::UnboundedReceiver<Heard>,
    delivered: Vec<(String, Vec<u8>)>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Probe {
    /// Connects; `Err` with what was heard instead of a successful CONNACK.
    async fn connect(
        client_id: &str,
        port: u16,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Probe, String> {
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
        let (client, mut el) = AsyncClient::new(opts, 16);
        let (tx, heard) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let h = match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(a))) => Heard::ConnAck(a.code),
                    Ok(Event::Incoming(Packet::SubAck(a))) => Heard::SubAck(a.return_codes),
                    Ok(Event::Incoming(Packet::PubAck(_))) => Heard::PubAck,
                    Ok(Event::Incoming(Packet::Publish(p))) => Heard::Publish {
                        topic: p.topic,
                        payload: p.payload.to_vec(),
                    },
                    Ok(_) => continue,
                    Err(e) => {
                        // Polling again would reconnect and hide that the broker hung up.
                        let _ = tx.send(Heard::Closed(e.to_string()));
                        return;
                    }
                };
                if tx.send(h).is_err() {
                    return;
                }
            }
        });
        let mut probe = Probe {
            client,
            heard,
            delivered: Vec::new(),
            task,
        };
        match probe.next().await {
            Heard::ConnAck(rumqttc::ConnectReturnCode::Success) => Ok(probe),
            other => Err(format!("{other:?}")),
        }
    }

    async fn next(&mut self) -> Heard {
        let h = tokio::time::timeout(HEAR_WITHIN, self.heard.recv())
            .await
            .expect("the broker said nothing to the probe")
            .unwrap_or_else(|| Heard::Closed("closed before".into()));
        if let Heard::Publish { topic, payload } = &h {
            self.delivered.push((topic.clone(), payload.clone()));
        }
        h
    }

    async fn subscribe(&mut self, filter: &str) -> Answer {
        if self
            .client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .is_err()
        {
            return Answer::Closed;
        }
        loop {
            match self.next().await {
                Heard::SubAck(codes) => {
                    let granted = codes
                        .iter()
                        .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_)));
                    return if granted {
                        Answer::Granted
                    } else {
                        Answer::Refused
                    };
                }
                Heard::Closed(_) => return Answer::Closed,
                _ => {}
            }
        }
    }

    /// Publishes at QoS 1. MQTT 3.1.1 has no way to refuse a PUBLISH, so the answer is an
    /// acknowledgement or a closed connection.
    async fn publish(&mut self, topic: &str, payload: Vec<u8>) -> Answer {
        if self
            .client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .is_err()
        {
            return Answer::Closed;
        }
        loop {
            match self.next().await {
                Heard::PubAck => return Answer::Granted,
                Heard::Closed(_) => return Answer::Closed,
                _ => {}
            }
        }
    }

    /// Waits for a state command for `vin`, signed by `gateway`, with a seq above `above`;
    /// returns its seq.
    async fn next_command(
        &mut self,
        vin: &caas_protocol::Vin,
        gateway: TrustedKey,
        above: u64,
    ) -> u64 {
        let topic = caas_protocol::topics::command_topic(vin);
        loop {
            match self.next().await {
                Heard::Publish { topic: t, payload } if t == topic.as_str() => {
                    if let Ok(cmd) = caas_protocol::open_command(&payload, &[gateway]) {
                        if matches!(cmd.body, caas_protocol::CommandBody::SetState(_))
                            && cmd.seq > above
                        {
                            return cmd.seq;
                        }
                    }
                }
                Heard::Closed(e) => panic!("the probe's connection closed: {e}"),
                _ => {}
            }
        }
    }

    fn delivered_on(&self, topic: &str) -> usize {
        self.delivered.iter().filter(|(t, _)| t == topic).count()
    }
}

/// How a broker turns a car away from another car's topics.
#[derive(Clone, Copy, Debug)]
enum Refusal {
    /// rumqttd with the car's VIN as its tenant: the connection is closed.
    Closes,
    /// Mosquitto 2's ACL (MQTT 3.1.1): the connection stays; a SUBSCRIBE may even be
    /// granted, but nothing the car may not read is delivered through it, and a PUBLISH is
    /// acknowledged and dropped.
    Filters,
}

/// Car 1, with its own valid certificate, next to car 2, an obeying car: car 1 connects and
/// does everything a car may do on its own topics, and cannot read car 2's commands nor put
/// a report on car 2's topic. Both cars must be registered.
async fn car_1_reaches_only_its_own_topics(
    api: &Api,
    hook: &Webhook,
    port: u16,
    pki: &Pki,
    gateway_key: &str,
    refusal: Refusal,
) {
    use caas_protocol::topics::{command_topic, report_topic};
    use caas_protocol::Outcome::Applied;
    let gw = TrustedKey::new(caas_protocol::verifying_key_from_hex(gateway_key).unwrap());
    let (vin1, vin2) = (vin(1), vin(2));
    let (cmd1, report1) = (
        command_topic(&vin1).to_string(),
        report_topic(&vin1).to_string(),
    );
    let (cmd2, report2) = (
        command_topic(&vin2).to_string(),
        report_topic(&vin2).to_string(),
    );
    let settled =
        |id: String| async move { hook.wait(&id, SETTLED_WITHIN).await.body["status"].clone() };

    let car2 = TestCar::start(
        2,
        gateway_key,
        CarOpts {
            host: "127.0.0.1".into(),
            port,
            tls: Some(pki.car(2)),
            mode: Mode::Obey,
        },
    )
    .await;
    car2.wait_connected().await;
    // From here car 2's command is retained: a subscription to car 2's topic that the
    // broker let through would be handed it at once.
    let id = api.activate(2, "power-boost", "power_boost").await;
    assert_eq!(settled(id).await, "ACTIVATED");

    // Car 1 is a working car, so whatever it is refused below is refused for the topic,
    // not for a broken certificate or connection.
    let car1 = pki.car(1);
    let mut probe = Probe::connect("car1-probe-a", port, car1.clone())
        .await
        .expect("car 1's own certificate must connect");
    assert_eq!(probe.subscribe(&cmd1).await, Answer::Granted);
    let id = api.activate(1, "snow-mode", "snow_mode").await;
    let seq1 = probe.next_command(&vin1, gw, 0).await;
    let own = report(&vin1, &car_key(1), seq1, Applied { seq: seq1 });
    assert_eq!(probe.publish(&report1, own).await, Answer::Granted);
    assert_eq!(
        settled(id).await,
        "ACTIVATED",
        "the gateway takes car 1's own report"
    );

    // Car 2's command topic.
    let answer = probe.subscribe(&cmd2).await;
    match refusal {
        Refusal::Closes => assert_eq!(answer, Answer::Closed, "subscribing to car 2's commands"),
        // The same connection goes on holding whatever the broker made of the subscription,
        // so what it is delivered below is the test.
        Refusal::Filters => assert_ne!(answer, Answer::Closed, "subscribing to car 2's commands"),
    }
    let mut read_of_car2 = probe.delivered_on(&cmd2);
    if matches!(refusal, Refusal::Closes) {
        probe = Probe::connect("car1-probe-b", port, car1.clone())
            .await
            .expect("car 1 must connect again");
        assert_eq!(probe.subscribe(&cmd1).await, Answer::Granted);
    }
    // A new command for car 2, then one for car 1: the broker had car 2's before car 1's
    // was even sent, so had it let car 1 read car 2's topic, car 1 would have it by the
    // time its own arrives.
    let id = api.activate(2, "heated-seats", "heated_seats").await;
    assert_eq!(settled(id).await, "ACTIVATED");
    let id = api
        .activate(1, "highway-autopilot", "highway_autopilot")
        .await;
    let seq1 = probe.next_command(&vin1, gw, seq1).await;
    let own = report(&vin1, &car_key(1), seq1, Applied { seq: seq1 });
    assert_eq!(probe.publish(&report1, own).await, Answer::Granted);
    assert_eq!(settled(id).await, "ACTIVATED");
    read_of_car2 += probe.delivered_on(&cmd2);
    assert_eq!(read_of_car2, 0, "car 1 was delivered car 2's commands");

    // The gauge for what reaches the gateway: a report on car 1's own topic that fails
    // verification is counted, so a report that car 1 got onto car 2's topic would be too.
    assert_eq!(api.metric(FORGED).await, 0.0);
    let not_car1s = report(&vin1, &car_key(3), seq1, Applied { seq: seq1 });
    assert_eq!(probe.publish(&report1, not_car1s).await, Answer::Granted);
    wait_metric(api, FORGED, 1.0).await;

    // Car 2's report topic: a report for car 2, which car 1 can only sign with its own key.
    let forged = report(&vin2, &car_key(1), 99, Applied { seq: 99 });
    let answer = probe.publish(&report2, forged).await;
    if matches!(refusal, Refusal::Closes) {
        assert_eq!(answer, Answer::Closed, "publishing on car 2's report topic");
    }
    // Car 2's own flow after it: the broker was done with car 1's publish (it acknowledged it
    // or hung up on it) before car 2 reports, and passes reports on to the gateway in order,
    // so whatever of car 1's got through is counted by the time car 2's report settles this.
    let (s, b) = api
        .post(
            "/ota/deactivate",
            &serde_json::json!({"vin": vin2.to_string(), "serviceId": "power-boost"}),
        )
        .await;
    assert_eq!(s, 202, "{b}");
    let id = b["requestId"].as_str().unwrap().to_owned();
    assert_eq!(settled(id).await, "DEACTIVATED");
    assert_eq!(
        api.metric(FORGED).await,
        1.0,
        "car 1's report on car 2's topic reached the gateway"
    );
    let (_, status) = api.get(&format!("/vehicles/{vin2}/status")).await;
    let services: Vec<_> = status["activeServices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["serviceId"].clone(), s["status"].clone()))
        .collect();
    assert_eq!(
        services,
        vec![(
            serde_json::json!("heated-seats"),
            serde_json::json!("ACTIVE")
        )],
        "car 2's state is what its own reports said"
    );
    drop(car2);
}

/// Car 1, with its own certificate, connects under car 2's client id (its VIN, as the agent
/// uses): a broker that let it take the id over would hang up on car 2, knocking it offline
/// at will.
async fn car_1_cannot_take_over_car_2s_client_id(api: &Api, port: u16, pki: &Pki) {
    // Car 2's last connection, just dropped, is gone for the broker too (its will said so)
    // before its client id is used again: a connection that arrives while the broker still
    // tears down the old one can be closed with it.
    wait_status(api, 2, "car 2 offline", SETTLED_WITHIN, |st| {
        st["connectivity"] == "OFFLINE"
    })
    .await;
    let vin2 = vin(2).to_string();
    let cmd2 = caas_protocol::topics::command_topic(&vin(2)).to_string();
    let mut car2 = Probe::connect(&vin2, port, pki.car(2))
        .await
        .expect("car 2 connects");
    assert_eq!(car2.subscribe(&cmd2).await, Answer::Granted);
    // Whether car 1 gets a session of its own under that id is the broker's choice.
    let _car1 = Probe::connect(&vin2, port, pki.car(1)).await;
    assert_eq!(
        car2.subscribe(&cmd2).await,
        Answer::Granted,
        "car 1 took car 2's client id over and car 2's connection was closed"
    );
}

const FORGED: &str = "caas_reports_forged_total";

async fn wait_metric(api: &Api, name: &str, value: f64) {
    let end = Instant::now() + SETTLED_WITHIN;
    loop {
        let now = api.metric(name).await;
        if now == value {
            return;
        }
        assert!(Instant::now() < end, "{name} is {now}, not {value}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_mtls_confines_each_car_to_its_own_topics() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let hook = Webhook::start(0).await;
    let mut c = pki.with_mqtts(config(&dir.path().join("gw"), Some(&hook)));
    // One router: with several, two cars may sit on different routers, where neither could
    // see the other's topics even without the tenant check, and the gateway would read the
    // routers' reports in no common order.
    c.broker_shards = 1;
    let gw = caas_gateway::start(c).await.unwrap();
    let port = gw.mqtts_addr().unwrap().port();
    let api = Api::new(gw.http_addr());
    api.register(1).await;
    api.register(2).await;

    car_1_reaches_only_its_own_topics(
        &api,
        &hook,
        port,
        &pki,
        gw.public_key_hex(),
        Refusal::Closes,
    )
    .await;
    car_1_cannot_take_over_car_2s_client_id(&api, port, &pki).await;

    // A certificate from the same CA whose Organization is not a VIN gets no session (car 1's,
    // from the same CA, did).
    pki.issue("nobody", &[], "nobody", Some("ACME"), false);
    let refused = Probe::connect("nobody", port, pki.client_config("nobody")).await;
    assert!(
        refused.is_err(),
        "a certificate without a VIN got a session"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_socket_on_the_tls_port_stalls_no_other_car() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let hook = Webhook::start(0).await;
    let (gw, port, api) =
        start_mqtts(pki.with_mqtts(config(&dir.path().join("gw"), Some(&hook)))).await;
    api.register(1).await;

    // Connected first, so it is ahead of the car in the listener's queue, and silent.
    let idle = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let car = TestCar::start(
        1,
        gw.public_key_hex(),
        CarOpts {
            host: "127.0.0.1".into(),
            port,
            tls: Some(pki.car(1)),
            mode: Mode::Obey,
        },
    )
    .await;
    car.wait_connected().await;
    // The server still holds the idle socket open (it would have closed it at the end of its
    // handshake timeout), so the car got in while the socket was still waiting, not after a
    // front that handles one handshake at a time had given up on it.
    let mut byte = [0u8; 1];
    let still_open =
        matches!(idle.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    assert!(
        still_open,
        "the idle socket was closed before the car got in"
    );
    let id = api.activate(1, "power-boost", "power_boost").await;
    assert_eq!(
        hook.wait(&id, SETTLED_WITHIN).await.body["status"],
        "ACTIVATED"
    );
    drop(idle);
    gw.shutdown().await;
}

/// Mosquitto with the shipped mTLS configuration on `port` (an empty revocation list) and a
/// gateway using it over mqtts:// with the client certificate `gateway.pem` (CN
/// caas-gateway, which the shipped ACL lets reach every car's topics).
async fn gateway_on_shipped_mosquitto(
    dir: &Path,
    pki: &Pki,
    port: u16,
    hook: &Webhook,
) -> (Mosquitto, caas_gateway::Gateway, Api) {
    pki.issue("gateway", &[], "caas-gateway", None, false);
    pki.write_crl(1, &[]);
    let m = start_shipped_mosquitto(dir, port).await;
    let mut c = config(&dir.join("gw"), Some(hook));
    c.mqtt = None;
    c.broker = Some(format!("mqtts://127.0.0.1:{port}"));
    c.tls = Some(caas_gateway::TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("gateway.pem"),
        key: dir.join("gateway.key"),
    });
    let gw = caas_gateway::start(c).await.unwrap();
    let api = Api::new(gw.http_addr());
    (m, gw, api)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_with_the_shipped_mtls_config_confines_each_car_to_its_own_topics() {
    if !mosquitto_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let port = free_port();
    let hook = Webhook::start(0).await;
    let (_m, gw, api) = gateway_on_shipped_mosquitto(dir.path(), &pki, port, &hook).await;
    api.register(1).await;
    api.register(2).await;

    car_1_reaches_only_its_own_topics(
        &api,
        &hook,
        port,
        &pki,
        gw.public_key_hex(),
        Refusal::Filters,
    )
    .await;
    car_1_cannot_take_over_car_2s_client_id(&api, port, &pki).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_gateway_certificate_is_taken_at_the_next_connection_to_mosquitto() {
    if !mosquitto_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    // Mosquitto restarts on it below: a port no other test or connection takes meanwhile.
    let port = free_port_for_restarts();
    let hook = Webhook::start(0).await;
    let (m, gw, api) = gateway_on_shipped_mosquitto(dir.path(), &pki, port, &hook).await;
    api.register(1).await;
    let car_tls = pki.car(1);
    let car = TestCar::start(
        1,
        gw.public_key_hex(),
        CarOpts {
            host: "127.0.0.1".into(),
            port,
            tls: Some(car_tls),
            mode: Mode::Obey,
        },
    )
    .await;
    car.wait_connected().await;
    let id = api.activate(1, "power-boost", "power_boost").await;
    assert_eq!(
        hook.wait(&id, SETTLED_WITHIN).await.body["status"],
        "ACTIVATED"
    );

    // The gateway's certificate is renewed and the old one revoked; the broker restarts
    // (Mosquitto reads its list only then), so the gateway must connect with the new one.
    std::fs::copy(
        dir.path().join("gateway.pem"),
        dir.path().join("gateway-old.pem"),
    )
    .unwrap();
    pki.issue("gateway", &[], "caas-gateway", None, false);
    pki.write_crl(2, &["gateway-old"]);
    drop(m);
    let _m = start_shipped_mosquitto(dir.path(), port).await;
    let id = api.activate(1, "snow-mode", "snow_mode").await;
    let end = Instant::now() + Duration::from_secs(30);
    while hook.for_request(&id).is_empty() {
        assert!(
            Instant::now() < end,
            "no callback: reloads {}, failures {}, disconnected {}, car connected {}, request {}",
            api.metric("caas_broker_tls_reloads_total").await,
            api.metric("caas_broker_tls_reload_failures_total").await,
            api.metric("caas_broker_disconnected").await,
            car.connected.load(Ordering::SeqCst),
            api.get(&format!("/ota/requests/{id}")).await.1
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        hook.wait(&id, Duration::from_secs(1)).await.body["status"],
        "ACTIVATED",
        "the gateway got back in with its renewed certificate"
    );
    assert!(api.metric("caas_broker_tls_reloads_total").await >= 1.0);
    assert_eq!(
        api.metric("caas_broker_tls_reload_failures_total").await,
        0.0
    );
    drop(car);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_filed_after_a_failed_try_is_sent_once_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    // The first try is answered 500: the callback is filed in the outbox for a retry, while
    // the car's record, written again only up to a second later, still lists the request.
    let hook = Webhook::start(1).await;
    let (mut gw, api, http, mqtt) = spawned_with_car_1(dir.path(), &hook).await;
    let car = obeying_car_1(&api, mqtt).await;
    let id = api.activate(1, "power-boost", "power_boost").await;
    wait_metric(&api, "caas_webhook_failures_total", 1.0).await;
    // Past the store's own periodic flush (the outbox entry is on disk), within the car
    // record's lazy write (it still lists the request).
    tokio::time::sleep(Duration::from_millis(450)).await;
    gw.0.kill().unwrap();
    gw.0.wait().unwrap();
    drop(car);
    assert!(
        hook.for_request(&id).is_empty(),
        "delivered before the kill"
    );

    let gw = spawn_gateway(dir.path(), http, mqtt, &hook);
    wait_healthy(http).await;
    let end = Instant::now() + SETTLED_WITHIN;
    while hook.for_request(&id).is_empty() {
        assert!(
            Instant::now() < end,
            "the callback was not sent after the restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Longer than the outbox retry's backoff: a second copy would be in by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cbs = hook.for_request(&id);
    assert_eq!(cbs.len(), 1, "delivered more than once: {cbs:?}");
    assert_eq!(cbs[0].body["status"], "ACTIVATED");
    drop(gw);
}

/// The raw MQTT 3.1.1 packets a car's client sends, so the test controls packet ids.
mod raw {
    pub(super) fn connect(client_id: &str) -> Vec<u8> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
        body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
        body.extend_from_slice(client_id.as_bytes());
        let mut packet = vec![0x10, body.len() as u8];
        packet.extend(body);
        packet
    }
    pub(super) fn puback(pkid: u16) -> Vec<u8> {
        let [hi, lo] = pkid.to_be_bytes();
        vec![0x40, 2, hi, lo]
    }
    pub(super) const PINGREQ: [u8; 2] = [0xC0, 0];
    pub(super) const PINGRESP: [u8; 2] = [0xD0, 0];
}

/// A car that acknowledges, on a new connection, a command it received on the one before
/// (its acknowledgement waits until the command is stored, and the link dropped meanwhile,
/// as after every gateway restart) keeps its connection: the broker ignores an ack for no
/// publish in flight, as Mosquitto does, where rumqttd dropped the car.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_for_no_publish_in_flight_leaves_the_car_connected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let gw = caas_gateway::start(config(dir.path(), None)).await.unwrap();
    let mut car = tokio::net::TcpStream::connect(gw.mqtt_addr().unwrap())
        .await
        .unwrap();
    car.write_all(&raw::connect(&vin(1).to_string()))
        .await
        .unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), car.read_exact(&mut connack))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "connection accepted");

    car.write_all(&raw::puback(7)).await.unwrap();
    car.write_all(&raw::PINGREQ).await.unwrap();
    let mut answer = [0u8; 2];
    let read = tokio::time::timeout(Duration::from_secs(10), car.read_exact(&mut answer)).await;
    assert!(
        matches!(read, Ok(Ok(_))),
        "the broker closed the connection: {read:?}"
    );
    assert_eq!(answer, raw::PINGRESP);
    gw.shutdown().await;
}

/// The store runs out of room (a file-size limit, as a full disk or a quota would): the
/// request that meets it is answered 500 with its requestId, `/healthz` says the store is
/// failing, and after a kill -9 and a restart without the limit every request answered 2xx
/// before is there (it was flushed before its answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_out_of_room_answers_500_and_loses_nothing_it_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (http, mqtt) = (free_port(), free_port());
    // `ulimit -f` is in KiB: the store's log file may not grow past ~1 MB, which ~500
    // requests fill; the process must survive the signal that comes with it.
    let mut command = Command::new("sh");
    command.args([
        "-c",
        "ulimit -f 977 && exec \"$0\" \"$@\"",
        env!("CARGO_BIN_EXE_caas-gateway"),
    ]);
    gateway_args(&mut command, dir.path(), http, mqtt, &hook);
    let limited = Proc(
        command
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_healthy(http).await;
    let api = Api::new(format!("127.0.0.1:{http}").parse().unwrap());
    const CARS: u32 = 100;
    for n in 0..CARS {
        api.register(n).await;
    }
    let services = [
        ("power-boost", "power_boost"),
        ("snow-mode", "snow_mode"),
        ("heated-seats", "heated_seats"),
        ("highway-autopilot", "highway_autopilot"),
    ];
    let mut acknowledged = Vec::new();
    let mut refused = None;
    // No car is online, so requests stay in flight: 100 cars × 4 services × (activation,
    // deactivation) = 800 before the per-car bound, more than the limit lets through.
    'fill: for round in 0..2 {
        for (service, flag) in services {
            for n in 0..CARS {
                let (status, body) = if round == 0 {
                    api.post("/ota/activate", &activation(n, service, flag))
                        .await
                } else {
                    let body = serde_json::json!({"vin": vin(n).to_string(), "serviceId": service});
                    api.post("/ota/deactivate", &body).await
                };
                match status {
                    202 => acknowledged.push(body["requestId"].as_str().unwrap().to_owned()),
                    500 => {
                        refused = Some(body);
                        break 'fill;
                    }
                    other => panic!("{other} {body}"),
                }
            }
        }
    }
    let refused = refused.expect("the store never ran out of room");
    assert_eq!(refused["error"], "storage failure", "{refused}");
    assert!(refused["requestId"].is_string(), "{refused}");
    assert!(!acknowledged.is_empty());
    let (status, health) = api.get("/healthz").await;
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["store"], "failing", "{health}");
    assert_eq!(api.metric("caas_store_failing").await, 1.0);

    drop(limited); // kill -9
    let _gateway = spawn_gateway(dir.path(), http, mqtt, &hook);
    wait_healthy(http).await;
    for id in &acknowledged {
        let (status, body) = api.get(&format!("/ota/requests/{id}")).await;
        assert_eq!(status, 200, "{id} answered 202 before, now: {body}");
        assert_eq!(body["phase"], "SENDING", "{body}");
    }
}
