//! End-to-end: a real gateway (in process) with its embedded broker, a real webhook
//! receiver and test cars on real MQTT connections.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

async fn gateway(dir: &std::path::Path, hook: &Webhook) -> (caas_gateway::Gateway, Api) {
    let gw = match caas_gateway::start(config(dir, Some(hook))).await {
        Ok(gw) => gw,
        Err(e) => panic!("gateway start: {e:#}"),
    };
    let api = Api::new(gw.http_addr());
    (gw, api)
}

fn car_opts(gw: &caas_gateway::Gateway, mode: Mode) -> CarOpts {
    CarOpts::plain(gw, mode)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activation_and_deactivation_call_back_signed() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(1).await; // the first delivery fails: the outbox retries it
    let (gw, api) = gateway(dir.path(), &hook).await;
    api.register(1).await;
    let car = TestCar::start(1, gw.public_key_hex(), car_opts(&gw, Mode::Obey)).await;
    car.wait_connected().await;

    let id = api.activate(1, "power-boost", "power_boost").await;
    let cb = hook.wait(&id, Duration::from_secs(15)).await;
    assert_eq!(cb.body["status"], "ACTIVATED");
    assert_eq!(cb.body["vin"], vin(1).to_string());
    assert!(cb.signature_ok, "callback signature must verify");
    assert_eq!(cb.previous_signature_ok, None, "no key is being rotated");
    assert!(cb.body.get("errorCode").is_none());
    assert_eq!(
        car.seen.lock().unwrap().grants,
        vec!["power-boost".to_string()]
    );

    let (s, r) = api.get(&format!("/ota/requests/{id}")).await;
    assert_eq!(s, 200);
    assert_eq!(r["status"], "COMPLETED");
    assert_eq!(r["attempts"], 1);
    let (s, st) = api.get(&format!("/vehicles/{}/status", vin(1))).await;
    assert_eq!(s, 200);
    assert_eq!(st["connectivity"], "ONLINE");
    assert_eq!(st["activeServices"][0]["serviceId"], "power-boost");
    assert_eq!(st["activeServices"][0]["status"], "ACTIVE");
    assert_eq!(st["diagnostics"]["firmwareVersion"], "1.0.0");
    assert_eq!(st["diagnostics"]["networkSignalStrength"], 80);

    let (s, b) = api
        .post(
            "/ota/deactivate",
            &json!({"vin": vin(1).to_string(), "serviceId": "power-boost"}),
        )
        .await;
    assert_eq!(s, 202, "{b}");
    let did = b["requestId"].as_str().unwrap().to_owned();
    let cb = hook.wait(&did, Duration::from_secs(15)).await;
    assert_eq!(cb.body["status"], "DEACTIVATED");
    assert!(car.seen.lock().unwrap().grants.is_empty());
    let (_, st) = api.get(&format!("/vehicles/{}/status", vin(1))).await;
    assert_eq!(st["activeServices"].as_array().unwrap().len(), 0);

    // Where the time went, by stage: both answers, both confirmations, both callbacks
    // (counted once the gateway has read the receiver's 2xx, just after the receiver saw
    // the callback). The first callback failed and was retried a backoff (1 s) later, and
    // its time counts from its request's final state, not from the retry.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while api.metric("caas_callback_delivery_seconds_count").await < 2.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "callback times not recorded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(api.metric("caas_accept_seconds_count").await, 2.0);
    assert!(api.metric("caas_accept_seconds_sum").await > 0.0);
    assert_eq!(
        api.metric("caas_activation_latency_seconds_count").await,
        2.0
    );
    assert_eq!(
        api.metric("caas_callback_delivery_seconds_count").await,
        2.0
    );
    assert!(api.metric("caas_callback_delivery_seconds_sum").await >= 0.9);

    let (s, h) = api
        .get(&format!("/vehicles/{}/history?limit=3", vin(1)))
        .await;
    assert_eq!(s, 200);
    let entries = h["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    assert!(
        entries[0]["id"].as_str().unwrap() > entries[1]["id"].as_str().unwrap(),
        "newest first"
    );
    let next = h["nextBefore"].as_str().unwrap();
    let (_, h2) = api
        .get(&format!(
            "/vehicles/{}/history?limit=500&before={next}",
            vin(1)
        ))
        .await;
    assert!(h2["entries"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["id"].as_str().unwrap() < next));
    assert!(h2["entries"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["type"] == "REQUEST"));

    // Page by page (one entry each) gives the same entries as one long page: a report and
    // the result it settles are stored together, and paging must split them.
    let (_, all) = api
        .get(&format!("/vehicles/{}/history?limit=500", vin(1)))
        .await;
    let all: Vec<String> = all["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| format!("{} {}", e["id"], e["type"]))
        .collect();
    assert!(all.iter().any(|e| e.ends_with("\"RESULT\"")), "{all:?}");
    let mut walked = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let q = match &before {
            Some(b) => format!("limit=1&before={b}"),
            None => "limit=1".into(),
        };
        let (s, h) = api.get(&format!("/vehicles/{}/history?{q}", vin(1))).await;
        assert_eq!(s, 200, "{h}");
        for e in h["entries"].as_array().unwrap() {
            walked.push(format!("{} {}", e["id"], e["type"]));
        }
        match h["nextBefore"].as_str() {
            Some(n) => before = Some(n.to_owned()),
            None => break,
        }
        assert!(
            walked.len() <= all.len(),
            "paging repeats entries: {walked:?}"
        );
    }
    assert_eq!(walked, all);

    // One final callback per request, even though the first delivery was refused.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hook.for_request(&id).len(), 1);
    assert!(api.metric("caas_webhook_failures_total").await >= 1.0);
    assert_eq!(api.metric("caas_reports_forged_total").await, 0.0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignoring_car_gets_attempts_probe_ticket_failed_and_withdrawal() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (gw, api) = gateway(dir.path(), &hook).await; // 2 attempts, 1 s each, 0.5 s backoff
    api.register(2).await;
    let car = TestCar::start(2, gw.public_key_hex(), car_opts(&gw, Mode::Ignore)).await;
    car.wait_connected().await;

    let id = api.activate(2, "snow-mode", "snow_mode").await;
    let cb = hook.wait(&id, Duration::from_secs(20)).await;
    assert_eq!(cb.body["status"], "FAILED");
    assert_eq!(cb.body["errorCode"], "NO_CONFIRMATION");
    let (_, r) = api.get(&format!("/ota/requests/{id}")).await;
    assert_eq!(r["status"], "FAILED");
    assert_eq!(r["attempts"], 2);
    let seq = r["seq"].as_u64().unwrap();

    // Exactly the configured attempts, one status probe, then the withdrawal.
    wait_until("withdrawal", Duration::from_secs(5), || {
        car.seen
            .lock()
            .unwrap()
            .set_states
            .last()
            .is_some_and(|c| c.seq == seq + 1)
    })
    .await;
    {
        let seen = car.seen.lock().unwrap();
        let with_grant = seen.set_states.iter().filter(|c| c.seq == seq).count();
        assert_eq!(with_grant, 2, "one command per attempt");
        assert_eq!(seen.queries, 1, "one status query after the last attempt");
        let last = seen.set_states.last().unwrap();
        match &last.body {
            caas_protocol::CommandBody::SetState(d) => {
                assert!(d.grants.is_empty(), "grant withdrawn")
            }
            _ => panic!("not a SetState"),
        }
    }
    let (_, t) = api.get("/support/tickets").await;
    let tickets = t["tickets"].as_array().unwrap();
    assert_eq!(tickets.len(), 1);
    assert_eq!(tickets[0]["requestId"], id.as_str());
    assert_eq!(tickets[0]["attempts"], 2);
    assert_eq!(tickets[0]["probeAnswered"], false);
    // This car never reported: the diagnostics are what it was registered with.
    assert_eq!(tickets[0]["diagnostics"]["firmwareVersion"], "1.0.0");
    let (_, st) = api.get(&format!("/vehicles/{}/status", vin(2))).await;
    assert_eq!(st["activeServices"][0]["status"], "ERROR");

    // A car that answers later does not turn the FAILED into a second final callback.
    car.ignore.store(false, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(hook.for_request(&id).len(), 1);
    assert_eq!(api.metric("caas_support_tickets_total").await, 1.0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_car_back_within_the_budget_is_activated() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let mut c = config(dir.path(), Some(&hook));
    c.retry = caas_gateway::RetryPolicy {
        attempts: 3,
        attempt_timeout: Duration::from_secs(1),
        backoff: vec![Duration::from_secs(1)],
    };
    let gw = caas_gateway::start(c).await.unwrap();
    let api = Api::new(gw.http_addr());
    api.register(3).await;
    let id = api.activate(3, "heated-seats", "heated_seats").await;
    let (_, st) = api.get(&format!("/vehicles/{}/status", vin(3))).await;
    assert_eq!(st["connectivity"], "OFFLINE");
    assert_eq!(st["activeServices"][0]["status"], "PENDING");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let car = TestCar::start(3, gw.public_key_hex(), car_opts(&gw, Mode::Obey)).await;
    let cb = hook.wait(&id, Duration::from_secs(15)).await;
    assert_eq!(cb.body["status"], "ACTIVATED");
    assert_eq!(
        car.seen.lock().unwrap().grants,
        vec!["heated-seats".to_string()]
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_command_fails_with_the_cars_code_and_forged_reports_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (gw, api) = gateway(dir.path(), &hook).await;
    api.register(4).await;
    api.register(5).await;
    let car = TestCar::start(4, gw.public_key_hex(), car_opts(&gw, Mode::Obey)).await;
    car.wait_connected().await;
    let id = api.activate(4, "mystery", "unknown_feature").await;
    let cb = hook.wait(&id, Duration::from_secs(10)).await;
    assert_eq!(cb.body["status"], "FAILED");
    assert_eq!(cb.body["errorCode"], "UNKNOWN_FEATURE");
    assert!(api.metric("caas_reports_refused_total").await >= 1.0);

    // Car 5 is offline with a pending request; car 4 forges car 5's "applied" report (signed
    // with car 4's key) on car 5's report topic (the plain listener has no tenants).
    let id5 = api.activate(5, "power-boost", "power_boost").await;
    let (_, r5) = api.get(&format!("/ota/requests/{id5}")).await;
    let seq5 = r5["seq"].as_u64().unwrap();
    let forged = report(
        &vin(5),
        &car_key(4),
        seq5,
        caas_protocol::Outcome::Applied { seq: seq5 },
    );
    car.client
        .publish(
            caas_protocol::topics::report_topic(&vin(5)).as_str(),
            rumqttc::QoS::AtLeastOnce,
            false,
            forged,
        )
        .await
        .unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while api.metric("caas_reports_forged_total").await < 1.0 {
        assert!(std::time::Instant::now() < end, "forged report not counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, r5) = api.get(&format!("/ota/requests/{id5}")).await;
    assert_ne!(r5["status"], "COMPLETED");
    gw.shutdown().await;
}

/// Registers cars `numbers`, starts each obeying its commands, and waits until all are
/// connected.
async fn obeying_cars(
    gw: &caas_gateway::Gateway,
    api: &Api,
    numbers: std::ops::Range<u32>,
) -> Vec<TestCar> {
    let mut cars = Vec::new();
    for n in numbers {
        api.register(n).await;
        cars.push(TestCar::start(n, gw.public_key_hex(), car_opts(gw, Mode::Obey)).await);
    }
    for c in &cars {
        c.wait_connected().await;
    }
    cars
}

/// `POST /campaigns` activating the autopilot subscription on `vins`: (status, body).
async fn autopilot_campaign(api: &Api, vins: &[String]) -> (u16, serde_json::Value) {
    api.post(
        "/campaigns",
        &json!({"vins": vins, "action": "ACTIVATE", "serviceId": "autopilot",
                "configuration": {"featureFlags": ["highway_autopilot"]}, "duration": {"type": "SUBSCRIPTION", "autoRenewal": true}}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_reaches_every_car_and_counts_states() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (gw, api) = gateway(dir.path(), &hook).await;
    let cars = obeying_cars(&gw, &api, 10..20).await;
    let vins: Vec<String> = (10..20)
        .map(|n| vin(n).to_string())
        .chain([vin(99).to_string()])
        .collect();
    let (s, b) = autopilot_campaign(&api, &vins).await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["accepted"], 10);
    assert_eq!(b["refusedCount"], 1, "vin 99 is not registered");
    let cid = b["campaignId"].as_str().unwrap().to_owned();
    let end = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (s, c) = api.get(&format!("/campaigns/{cid}")).await;
        assert_eq!(s, 200);
        if c["counts"]["COMPLETED"] == 10 {
            assert_eq!(c["total"], 11);
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "campaign not completed: {c}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for c in &cars {
        assert_eq!(c.seen.lock().unwrap().grants, vec!["autopilot".to_string()]);
    }
    gw.shutdown().await;

    // After a restart the live counts are gone: the campaign is counted from the store,
    // where its requests are found by the prefix their ids share with the campaign id.
    let (gw, api) = gateway(dir.path(), &hook).await;
    let (s, c) = api.get(&format!("/campaigns/{cid}")).await;
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["counts"]["COMPLETED"], 10, "{c}");
    assert_eq!(c["counts"]["IN_PROGRESS"], 0, "{c}");
    assert_eq!(c["total"], 11);
    // A request on its own (random id) is not counted in the campaign.
    let single = api.activate(10, "snow-mode", "snow_mode").await;
    assert_ne!(single[..23], cid[..23]);
    let (_, c) = api.get(&format!("/campaigns/{cid}")).await;
    assert_eq!(c["counts"]["IN_PROGRESS"], 0, "{c}");
    assert_eq!(c["counts"]["COMPLETED"], 10, "{c}");
    gw.shutdown().await;
}

/// The nice values of this process's threads named `name` (Linux), from `/proc/self/task`
/// (tests running side by side have a gateway each).
#[cfg(target_os = "linux")]
fn nice_of_threads(name: &str) -> Vec<i64> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut nice = Vec::new();
    for task in tasks.flatten() {
        // A thread may end between the listing and the reads: skip it.
        let dir = task.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        if comm.trim_end() != name {
            continue;
        }
        // Fields after the parenthesised name: state is field 3, nice field 19.
        if let Some(n) = stat
            .rsplit_once(')')
            .and_then(|(_, after)| after.split_whitespace().nth(16))
            .and_then(|n| n.parse().ok())
        {
            nice.push(n);
        }
    }
    nice
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_callbacks_go_out_at_low_priority_and_failed_ones_are_retried() {
    let dir = tempfile::tempdir().unwrap();
    // The first three callbacks (all campaign ones, on the bulk lane) are refused.
    let hook = Webhook::start(3).await;
    let (gw, api) = gateway(dir.path(), &hook).await;
    #[cfg(target_os = "linux")]
    {
        // The bulk thread lowers its own priority as it starts.
        let end = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let bulk = nice_of_threads("gw-webhook-bulk");
            if !bulk.is_empty() && bulk.iter().all(|n| *n == 19) {
                break;
            }
            assert!(
                std::time::Instant::now() < end,
                "bulk senders' nice: {bulk:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let interactive = nice_of_threads("gw-webhook");
        assert!(
            !interactive.is_empty() && interactive.iter().all(|n| *n == 0),
            "{interactive:?}"
        );
    }
    // Held to the end: dropping a car disconnects it.
    let _cars = obeying_cars(&gw, &api, 30..36).await;
    let vins: Vec<String> = (30..36).map(|n| vin(n).to_string()).collect();
    let (s, b) = autopilot_campaign(&api, &vins).await;
    assert_eq!(s, 202, "{b}");
    let cid = b["campaignId"].as_str().unwrap().to_owned();
    let delivered = |hook: &Webhook| -> Vec<Callback> {
        hook.got
            .lock()
            .unwrap()
            .iter()
            .filter(|c| {
                c.body["requestId"]
                    .as_str()
                    .is_some_and(|r| r[..23] == cid[..23])
            })
            .cloned()
            .collect()
    };
    // Under the sender's idle scan (30 s): a filed failure wakes the retrying lane. The
    // bulk lane runs at nice 19, so on a machine busy with the whole test run it may wait
    // its turn for a while (10 s was once too short there).
    let end = std::time::Instant::now() + Duration::from_secs(25);
    while delivered(&hook).len() < vins.len() {
        assert!(
            std::time::Instant::now() < end,
            "campaign callbacks: {:?}",
            delivered(&hook)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing more comes: each request called back once, signed, ACTIVATED.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = delivered(&hook);
    let mut by_vin: Vec<&str> = got.iter().filter_map(|c| c.body["vin"].as_str()).collect();
    by_vin.sort_unstable();
    let mut expected: Vec<&str> = vins.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(by_vin, expected);
    assert!(got
        .iter()
        .all(|c| c.signature_ok && c.body["status"] == "ACTIVATED"));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connected_car_whose_reports_lag_is_limited_then_online_once_caught_up() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let mut c = config(dir.path(), Some(&hook));
    // A long backoff leaves a window, after the first attempt timed out, where the car is
    // online, behind and silent; three attempts leave room for the re-send it obeys.
    c.retry = caas_gateway::RetryPolicy {
        attempts: 3,
        attempt_timeout: Duration::from_secs(1),
        backoff: vec![Duration::from_secs(2)],
    };
    let gw = caas_gateway::start(c).await.unwrap();
    let api = Api::new(gw.http_addr());
    api.register(6).await;
    let car = TestCar::start(6, gw.public_key_hex(), car_opts(&gw, Mode::Ignore)).await;
    car.wait_connected().await;
    // Presence seen first, so the car is ONLINE (not OFFLINE) before it falls behind.
    wait_status(&api, 6, "ONLINE", Duration::from_secs(5), |st| {
        st["connectivity"] == "ONLINE"
    })
    .await;

    let id = api.activate(6, "power-boost", "power_boost").await;
    let st = wait_status(&api, 6, "LIMITED", Duration::from_secs(5), |st| {
        st["connectivity"] == "LIMITED"
    })
    .await;
    assert_eq!(st["activeServices"][0]["serviceId"], "power-boost");
    assert_eq!(st["activeServices"][0]["status"], "PENDING");
    assert!(car.seen.lock().unwrap().grants.is_empty());
    assert!(hook.for_request(&id).is_empty(), "not final yet");

    // The car listens again: the next attempt's re-send is applied and reported.
    car.ignore.store(false, std::sync::atomic::Ordering::SeqCst);
    let cb = hook.wait(&id, Duration::from_secs(10)).await;
    assert_eq!(cb.body["status"], "ACTIVATED");
    let st = wait_status(&api, 6, "ONLINE and ACTIVE", Duration::from_secs(5), |st| {
        st["connectivity"] == "ONLINE" && st["activeServices"][0]["status"] == "ACTIVE"
    })
    .await;
    assert_eq!(st["activeServices"][0]["serviceId"], "power-boost");
    let (_, r) = api.get(&format!("/ota/requests/{id}")).await;
    assert_eq!(r["status"], "COMPLETED");
    assert!(
        r["attempts"].as_u64().unwrap() >= 2,
        "applied on a re-send: {r}"
    );
    assert_eq!(
        car.seen.lock().unwrap().grants,
        vec!["power-boost".to_string()]
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn car_back_online_right_after_a_withdrawal_gets_the_withdrawal() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (gw, api) = gateway(dir.path(), &hook).await; // 2 attempts, 1 s each, 0.5 s backoff
    api.register(7).await;
    let car = TestCar::start(7, gw.public_key_hex(), car_opts(&gw, Mode::Obey)).await;
    // The car applies the grant but its reports are lost: the gateway will give up on it.
    car.mute.store(true, std::sync::atomic::Ordering::SeqCst);
    car.wait_connected().await;

    let id = api.activate(7, "snow-mode", "snow_mode").await;
    wait_until("the status query", Duration::from_secs(10), || {
        car.seen.lock().unwrap().queries >= 1
    })
    .await;
    assert_eq!(
        car.seen.lock().unwrap().grants,
        vec!["snow-mode".to_string()]
    );
    // Then the car goes deaf, so it misses the withdrawal that follows the FAILED.
    car.ignore.store(true, std::sync::atomic::Ordering::SeqCst);
    let (_, r) = api.get(&format!("/ota/requests/{id}")).await;
    let seq = r["seq"].as_u64().unwrap();
    wait_until("the (missed) withdrawal", Duration::from_secs(10), || {
        car.seen
            .lock()
            .unwrap()
            .set_states
            .iter()
            .any(|c| c.seq == seq + 1)
    })
    .await;
    // Right away (well inside any merge window) the car's session resumes: it says online,
    // listens and reports again. Only the gateway's re-send on presence can reach it now.
    car.ignore.store(false, std::sync::atomic::Ordering::SeqCst);
    car.mute.store(false, std::sync::atomic::Ordering::SeqCst);
    car.announce_online().await;

    let cb = hook.wait(&id, Duration::from_secs(10)).await;
    assert_eq!(cb.body["status"], "FAILED");
    assert_eq!(cb.body["errorCode"], "NO_CONFIRMATION");
    wait_until("the withdrawal applied", Duration::from_secs(5), || {
        car.seen.lock().unwrap().applied_seq == seq + 1
    })
    .await;
    assert!(
        car.seen.lock().unwrap().grants.is_empty(),
        "grant withdrawn"
    );
    // The gateway hears the car apply the withdrawal.
    let applied = format!("applied seq {}", seq + 1);
    let end = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, h) = api
            .get(&format!("/vehicles/{}/history?limit=50", vin(7)))
            .await;
        let heard = h["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "REPORT" && e["detail"] == applied.as_str());
        if heard {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "no '{applied}' report: {h}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, st) = api.get(&format!("/vehicles/{}/status", vin(7))).await;
    let services = st["activeServices"].as_array().unwrap();
    assert_eq!(services.len(), 1, "{st}");
    assert_eq!(services[0]["serviceId"], "snow-mode");
    assert_eq!(services[0]["status"], "ERROR");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_callbacks_are_not_repeated_after_a_clean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (gw, api) = gateway(dir.path(), &hook).await;
    let mut ids = Vec::new();
    let mut cars = Vec::new();
    for n in 1..=3 {
        api.register(n).await;
        let car = TestCar::start(n, gw.public_key_hex(), car_opts(&gw, Mode::Obey)).await;
        car.wait_connected().await;
        cars.push(car);
        ids.push(api.activate(n, "power-boost", "power_boost").await);
    }
    for id in &ids {
        assert_eq!(
            hook.wait(id, Duration::from_secs(15)).await.body["status"],
            "ACTIVATED"
        );
    }
    // Straight away: the engine has not yet written that the cars need not keep them.
    gw.shutdown().await;
    drop(cars);
    let (gw, api) = gateway(dir.path(), &hook).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for id in &ids {
        assert_eq!(hook.for_request(id).len(), 1, "{id} called back again");
    }
    // The history the engine held unwritten at the stop was written by it: each request,
    // the report that settled it and its result are there after the restart.
    for (n, id) in (1..=3).zip(&ids) {
        let (s, h) = api.get(&format!("/vehicles/{}/history", vin(n))).await;
        assert_eq!(s, 200, "{h}");
        let newest: Vec<(&str, &str)> = h["entries"]
            .as_array()
            .unwrap()
            .iter()
            .take(3)
            .map(|e| {
                let request = e["requestId"].as_str().unwrap_or("");
                (e["type"].as_str().unwrap(), request)
            })
            .collect();
        let id = id.as_str();
        assert_eq!(
            newest,
            [("RESULT", id), ("REPORT", ""), ("REQUEST", id)],
            "{h}"
        );
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_larger_than_a_chunk_is_accepted_whole_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (gw, api) = gateway(dir.path(), &hook).await;
    // More cars than one shard accepts per chunk (256), even with every car on one shard.
    let n = 600u32;
    for i in 1000..1000 + n {
        api.register(i).await;
    }
    let vins: Vec<String> = (1000..1000 + n).map(|i| vin(i).to_string()).collect();
    let (s, b) = api
        .post(
            "/campaigns",
            &json!({"vins": vins, "action": "ACTIVATE", "serviceId": "snow",
                    "configuration": {"featureFlags": ["snow_mode"]}, "duration": {"type": "PERMANENT"}}),
        )
        .await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["accepted"], n);
    assert_eq!(b["refusedCount"], 0);
    let cid = b["campaignId"].as_str().unwrap().to_owned();
    // The cars are offline: every request is in progress, none lost between chunks.
    let (_, c) = api.get(&format!("/campaigns/{cid}")).await;
    assert_eq!(c["counts"]["IN_PROGRESS"], n, "{c}");
    let (_, st) = api
        .get(&format!("/vehicles/{}/status", vin(1000 + n - 1)))
        .await;
    assert_eq!(st["activeServices"][0]["status"], "PENDING");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_car_with_too_many_requests_in_flight_is_refused_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (_gw, api) = gateway(dir.path(), &hook).await;
    // Registered but never connected: every request stays in flight.
    api.register(1).await;
    let cap = caas_gateway::MAX_IN_FLIGHT_PER_CAR;
    for _ in 0..cap {
        api.activate(1, "power-boost", "power_boost").await;
    }
    let history = |api: &Api| {
        let path = format!("/vehicles/{}/history?limit=100", vin(1));
        let api = api.clone();
        async move { api.get(&path).await.1 }
    };
    let history_before = history(&api).await;
    let in_flight = api.metric("caas_requests_in_flight").await;
    assert_eq!(in_flight, cap as f64);

    let (s, b) = api
        .post(
            "/ota/activate",
            &activation(1, "power-boost", "power_boost"),
        )
        .await;
    assert_eq!(s, 429, "{b}");
    assert_eq!(b["field"], "vin");
    let (s, b) = api
        .post(
            "/ota/deactivate",
            &json!({"vin": vin(1).to_string(), "serviceId": "power-boost"}),
        )
        .await;
    assert_eq!(s, 429, "{b}");
    // A campaign refuses that car and still serves the others.
    api.register(2).await;
    let (s, b) = autopilot_campaign(&api, &[vin(1).to_string(), vin(2).to_string()]).await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["accepted"], 1);
    assert_eq!(b["refusedCount"], 1);
    assert_eq!(b["refused"][0]["vin"], vin(1).to_string());

    assert_eq!(
        api.metric("caas_requests_in_flight").await,
        cap as f64 + 1.0
    );
    assert_eq!(
        history(&api).await,
        history_before,
        "refusals write no history"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temporary_grant_leaves_the_status_at_its_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (gw, api) = gateway(dir.path(), &hook).await;
    let car = obeying_cars(&gw, &api, 1..2).await;
    // Whole seconds: grants end on a second (the commands carry seconds).
    let end = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap()
        + time::Duration::seconds(4);
    let mut body = activation(1, "power-boost", "power_boost");
    body["duration"] = json!({
        "type": "TEMPORARY",
        "expiryDate": end.format(&time::format_description::well_known::Rfc3339).unwrap(),
    });
    let (s, b) = api.post("/ota/activate", &body).await;
    assert_eq!(s, 202, "{b}");
    let id = b["requestId"].as_str().unwrap().to_owned();
    assert_eq!(
        hook.wait(&id, Duration::from_secs(15)).await.body["status"],
        "ACTIVATED"
    );
    let services = |api: &Api| {
        let api = api.clone();
        async move {
            let (_, st) = api.get(&format!("/vehicles/{}/status", vin(1))).await;
            st["activeServices"].clone()
        }
    };
    assert_eq!(services(&api).await[0]["status"], "ACTIVE");

    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while services(&api)
        .await
        .as_array()
        .is_some_and(|s| !s.is_empty())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "an expired grant is still listed: {}",
            services(&api).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        time::OffsetDateTime::now_utc() >= end,
        "left before its end"
    );
    // The next command carries only the live grant.
    let id = api.activate(1, "autopilot", "highway_autopilot").await;
    assert_eq!(
        hook.wait(&id, Duration::from_secs(15)).await.body["status"],
        "ACTIVATED"
    );
    assert_eq!(
        car[0].seen.lock().unwrap().grants,
        vec!["autopilot".to_string()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_records_past_the_retention_are_pruned_and_requests_in_flight_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let retention = Duration::from_secs(2);
    let mut c = config(dir.path(), Some(&hook));
    c.retention = retention;
    // Car 2 never answers: its request stays in flight for ~5.5 s, past the retention.
    c.retry.attempts = 3;
    let gw = caas_gateway::start(c).await.unwrap();
    let api = Api::new(gw.http_addr());
    let _car = obeying_cars(&gw, &api, 1..2).await;
    api.register(2).await;

    let started = std::time::Instant::now();
    let single = api.activate(1, "power-boost", "power_boost").await;
    assert_eq!(
        hook.wait(&single, Duration::from_secs(15)).await.body["status"],
        "ACTIVATED"
    );
    let (s, b) = autopilot_campaign(&api, &[vin(1).to_string()]).await;
    assert_eq!(s, 202, "{b}");
    let campaign = b["campaignId"].as_str().unwrap().to_owned();
    let silent = api.activate(2, "power-boost", "power_boost").await;

    // In flight past the retention, and still there.
    let mut seen_old_in_flight = false;
    let end = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (s, r) = api.get(&format!("/ota/requests/{silent}")).await;
        assert_eq!(s, 200, "a request in flight was pruned: {r}");
        if r["status"] == "FAILED" {
            break;
        }
        if started.elapsed() > retention * 2 {
            seen_old_in_flight = true;
        }
        assert!(
            std::time::Instant::now() < end,
            "car 2's request never ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        seen_old_in_flight,
        "the silent request ended before it outlived the retention"
    );
    hook.wait(&silent, Duration::from_secs(15)).await;

    // Once final and their callbacks delivered, they go, with the campaign and the ticket.
    let end = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let gone = [
            format!("/ota/requests/{single}"),
            format!("/ota/requests/{silent}"),
            format!("/campaigns/{campaign}"),
        ];
        let mut left = Vec::new();
        for path in &gone {
            if api.get(path).await.0 != 404 {
                left.push(path.clone());
            }
        }
        let (_, t) = api.get("/support/tickets").await;
        if !t["tickets"].as_array().unwrap().is_empty() {
            left.push("a support ticket".into());
        }
        if left.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < end, "not pruned: {left:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The campaign's one request, the two single ones, the campaign and the ticket.
    assert!(api.metric("caas_store_pruned_total").await >= 5.0);
    // The cars themselves and their history stay.
    let (s, st) = api.get(&format!("/vehicles/{}/status", vin(1))).await;
    assert_eq!(s, 200);
    assert_eq!(st["activeServices"].as_array().unwrap().len(), 2, "{st}");
    let (s, h) = api.get(&format!("/vehicles/{}/history", vin(2))).await;
    assert_eq!(s, 200);
    assert!(!h["entries"].as_array().unwrap().is_empty());
    gw.shutdown().await;
}

/// The car's current services in `GET /vehicles/{vin}/status`, sorted: (serviceId, status).
async fn services_of(api: &Api, n: u32) -> Vec<(String, String)> {
    let (_, st) = api.get(&format!("/vehicles/{}/status", vin(n))).await;
    services(&st)
}

async fn deactivate(api: &Api, n: u32, service: &str) -> String {
    let (s, b) = api
        .post(
            "/ota/deactivate",
            &json!({"vin": vin(n).to_string(), "serviceId": service}),
        )
        .await;
    assert_eq!(s, 202, "{b}");
    b["requestId"].as_str().unwrap().to_owned()
}

/// A gateway over a fresh data directory with a webhook receiver, and car 1 on it, obeying,
/// with two services activated and confirmed: (data directory, receiver, gateway, API, car).
async fn car_1_with_autopilot_and_heated_seats() -> (
    tempfile::TempDir,
    Webhook,
    caas_gateway::Gateway,
    Api,
    TestCar,
) {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (gw, api) = gateway(dir.path(), &hook).await;
    let car = obeying_cars(&gw, &api, 1..2).await.remove(0);
    for (service, flag) in [
        ("autopilot", "highway_autopilot"),
        ("heated-seats", "heated_seats"),
    ] {
        let id = api.activate(1, service, flag).await;
        assert_eq!(
            hook.wait(&id, Duration::from_secs(15)).await.body["status"],
            "ACTIVATED"
        );
    }
    (dir, hook, gw, api, car)
}

fn pair(service: &str, status: &str) -> (String, String) {
    (service.to_owned(), status.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_renewal_or_deactivation_leaves_the_service_as_it_was() {
    let (_dir, hook, _gw, api, car) = car_1_with_autopilot_and_heated_seats().await;

    // The car stops answering: a renewal and a deactivation run out of attempts.
    car.ignore.store(true, std::sync::atomic::Ordering::SeqCst);
    let renewal = api.activate(1, "autopilot", "highway_autopilot").await;
    let removal = deactivate(&api, 1, "heated-seats").await;
    for id in [&renewal, &removal] {
        let cb = hook.wait(id, Duration::from_secs(30)).await;
        assert_eq!(cb.body["status"], "FAILED");
        assert_eq!(cb.body["errorCode"], "NO_CONFIRMATION");
    }
    // Both services as they were (pending until the car takes the command that says so).
    let names: Vec<String> = services_of(&api, 1)
        .await
        .into_iter()
        .map(|s| s.0)
        .collect();
    assert_eq!(names, ["autopilot", "heated-seats"]);

    // Back, the car takes the newest state: it still has what was paid for.
    car.ignore.store(false, std::sync::atomic::Ordering::SeqCst);
    car.announce_online().await;
    wait_until("the car has caught up", Duration::from_secs(15), || {
        let seen = car.seen.lock().unwrap();
        seen.applied_seq > 4
    })
    .await;
    assert_eq!(car_services(&car), ["autopilot", "heated-seats"]);
    let end = std::time::Instant::now() + Duration::from_secs(15);
    while services_of(&api, 1).await
        != [pair("autopilot", "ACTIVE"), pair("heated-seats", "ACTIVE")]
    {
        assert!(
            std::time::Instant::now() < end,
            "{:?}",
            services_of(&api, 1).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_grant_fails_its_own_request_and_not_the_cars_other_changes() {
    let (_dir, hook, _gw, api, car) = car_1_with_autopilot_and_heated_seats().await;
    let ignore = |on: bool| car.ignore.store(on, std::sync::atomic::Ordering::SeqCst);

    // An activation naming a feature the car does not have, then a deactivation: the car
    // sees them together in one command and refuses it for the unknown feature.
    ignore(true);
    let bad = api.activate(1, "warp", "warp_drive").await;
    let removal = deactivate(&api, 1, "heated-seats").await;
    ignore(false);
    car.announce_online().await;
    let cb = hook.wait(&bad, Duration::from_secs(15)).await;
    assert_eq!(
        (&cb.body["status"], &cb.body["errorCode"]),
        (&json!("FAILED"), &json!("UNKNOWN_FEATURE"))
    );
    let cb = hook.wait(&removal, Duration::from_secs(15)).await;
    assert_eq!(cb.body["status"], "DEACTIVATED", "{}", cb.body);
    assert_eq!(car.seen.lock().unwrap().grants, ["autopilot"]);

    // Three new grants in one refused command. The car names the grant it refuses
    // (GrantsRefused), so the bad one fails and the other two go to it again at once,
    // together: no command carries the bad grant without the others (as when the grants
    // go one at a time, for a car that cannot say which it refused).
    ignore(true);
    let bad = api.activate(1, "warp", "warp_drive").await;
    let renewal = api.activate(1, "autopilot", "highway_autopilot").await;
    let seats = api.activate(1, "heated-seats", "heated_seats").await;
    let from = car.seen.lock().unwrap().set_states.len();
    ignore(false);
    car.announce_online().await;
    let cb = hook.wait(&bad, Duration::from_secs(15)).await;
    assert_eq!(
        (&cb.body["status"], &cb.body["errorCode"]),
        (&json!("FAILED"), &json!("UNKNOWN_FEATURE"))
    );
    wait_activated(&hook, &[&renewal, &seats], Duration::from_secs(15)).await;
    assert_eq!(car_services(&car), ["autopilot", "heated-seats"]);
    let seen = states_seen(&car, from);
    assert!(
        seen.iter()
            .all(|(_, services)| !services.contains(&"warp".to_owned())
                || services.contains(&"heated-seats".to_owned())),
        "a command carried warp without the others: {seen:?}"
    );
    assert_eq!(
        seen.last().map(|(_, services)| services.clone()),
        Some(vec!["autopilot".to_owned(), "heated-seats".to_owned()])
    );
    let (_, history) = api
        .get(&format!("/vehicles/{}/history?limit=50", vin(1)))
        .await;
    assert!(
        history.to_string().contains("UNKNOWN_FEATURE for grants ["),
        "the refusal names its grant: {history}"
    );
    // The refused service shows as ERROR (status after a refusal), the others as ACTIVE.
    assert_eq!(
        services_of(&api, 1).await,
        [
            pair("autopilot", "ACTIVE"),
            pair("heated-seats", "ACTIVE"),
            pair("warp", "ERROR")
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_held_after_a_refusal_are_still_held_after_a_restart() {
    let (dir, hook, gw, api, car) = car_1_with_autopilot_and_heated_seats().await;

    // Three new grants in one command, the oldest one bad, the other two renewals (told
    // from the grants they renew by their expiry); the car, deaf from here on, refuses that
    // command without saying for which grant.
    car.ignore.store(true, std::sync::atomic::Ordering::SeqCst);
    let bad = subscribe(&api, "warp", "warp_drive").await;
    let renewal = subscribe(&api, "autopilot", "highway_autopilot").await;
    let seats = subscribe(&api, "heated-seats", "heated_seats").await;
    let refused = refuse_command_of(&api, &car, &seats).await;
    // The oldest goes alone in a newer command and the other two are held; the gateway
    // stops there, before the car answers it.
    let alone = refused + 1;
    wait_command(&car, "the oldest grant sent alone", |s| s == alone).await;
    // Alone among the new grants: the renewals wait, and meanwhile the car keeps the
    // grants they renew (holding a renewal back does not switch a paid service off).
    let sent = new_and_all_grants(&car, 0);
    assert!(
        sent.iter()
            .all(|(seq, new, all)| *seq != alone || (new == &["warp"] && all.len() == 3)),
        "{sent:?}"
    );
    gw.shutdown().await;
    drop(car);

    // Started again on the same data (with attempts long enough that none runs out while
    // the car comes back), the car comes back and answers.
    let mut c = config(dir.path(), Some(&hook));
    c.retry.attempt_timeout = Duration::from_secs(10);
    let gw = match caas_gateway::start(c).await {
        Ok(gw) => gw,
        Err(e) => panic!("gateway restart: {e:#}"),
    };
    let api = Api::new(gw.http_addr());
    let car = TestCar::start(1, gw.public_key_hex(), car_opts(&gw, Mode::Obey)).await;
    let cb = hook.wait(&bad, Duration::from_secs(15)).await;
    assert_eq!(
        (&cb.body["status"], &cb.body["errorCode"]),
        (&json!("FAILED"), &json!("UNKNOWN_FEATURE"))
    );
    wait_activated(&hook, &[&renewal, &seats], Duration::from_secs(15)).await;
    assert_eq!(car_services(&car), ["autopilot", "heated-seats"]);
    // The isolation went on where it was: the car's first command is the one it missed,
    // the bad grant alone among the new ones (not all three again); no command carried it
    // with another new grant, and none took autopilot or heated seats away.
    let after = new_and_all_grants(&car, 0);
    assert_eq!(
        after.first().map(|(seq, new, _)| (*seq, new.clone())),
        Some((alone, vec!["warp".to_owned()])),
        "{after:?}"
    );
    assert!(
        after
            .iter()
            .all(|(_, new, _)| !new.iter().any(|s| s == "warp") || new.len() == 1),
        "{after:?}"
    );
    assert!(
        after.iter().all(|(_, _, all)| ["autopilot", "heated-seats"]
            .iter()
            .all(|s| all.iter().any(|g| g == s))),
        "{after:?}"
    );
    assert_eq!(
        services_of(&api, 1).await,
        [
            pair("autopilot", "ACTIVE"),
            pair("heated-seats", "ACTIVE"),
            pair("warp", "ERROR")
        ]
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_grants_spend_no_attempt_while_they_wait_and_go_out_when_the_car_goes_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (gw, api) = gateway(dir.path(), &hook).await;
    let car = obeying_cars(&gw, &api, 1..2).await.remove(0);
    // Three new grants refused together, the oldest bad; the car stays quiet, so the bad
    // one, sent alone, runs out of attempts (~3.5 s with the test's retry policy).
    let ([bad, boost, snow], refused) = three_grants_refused_together(&api, &car).await;
    // While the bad one, alone, goes through its attempts to its status query, the two
    // held are where they were: first attempt, no backoff, no query.
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while api.get(&format!("/ota/requests/{bad}")).await.1["phase"] != "PROBING" {
        assert!(
            std::time::Instant::now() < end,
            "the bad grant never reached its query"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for id in [&boost, &snow] {
        let (_, r) = api.get(&format!("/ota/requests/{id}")).await;
        assert_eq!(
            (&r["phase"], &r["attempts"]),
            (&json!("SENDING"), &json!(1)),
            "{r}"
        );
    }
    let cb = hook.wait(&bad, Duration::from_secs(20)).await;
    assert_eq!(
        (&cb.body["status"], &cb.body["errorCode"]),
        (&json!("FAILED"), &json!("NO_CONFIRMATION"))
    );
    // The two held meanwhile spent none of their attempts waiting (they were created with
    // the bad one, so they would have run out with it): with the bad one gone and the car
    // still quiet they go out together, and the car, back now, takes them.
    for id in [&boost, &snow] {
        let (_, r) = api.get(&format!("/ota/requests/{id}")).await;
        assert_eq!(r["status"], "IN_PROGRESS", "{r}");
    }
    wait_until(
        "the held grants sent together",
        Duration::from_secs(10),
        || {
            states_seen(&car, 0).iter().any(|(seq, g)| {
                *seq > refused
                    && g.iter().any(|s| s == "power-boost")
                    && g.iter().any(|s| s == "snow-mode")
            })
        },
    )
    .await;
    car.ignore.store(false, std::sync::atomic::Ordering::SeqCst);
    car.announce_online().await;
    wait_activated(&hook, &[&boost, &snow], Duration::from_secs(15)).await;
    assert_eq!(car_services(&car), ["power-boost", "snow-mode"]);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_deactivated_while_its_renewal_is_held_leaves_the_car() {
    let (_dir, hook, _gw, api, car) = car_1_with_autopilot_and_heated_seats().await;
    // A bad grant and a renewal of autopilot refused together: the renewal is held, and the
    // car keeps the autopilot grant it renews meanwhile.
    car.ignore.store(true, std::sync::atomic::Ordering::SeqCst);
    let bad = subscribe(&api, "warp", "warp_drive").await;
    let renewal = subscribe(&api, "autopilot", "highway_autopilot").await;
    let refused = refuse_command_of(&api, &car, &renewal).await;
    wait_command(&car, "the bad grant sent alone", |s| s > refused).await;
    // Autopilot deactivated while its renewal waits: the car loses it (the grant the
    // renewal renews is not kept for it any more).
    let removal = deactivate(&api, 1, "autopilot").await;
    let (_, r) = api.get(&format!("/ota/requests/{removal}")).await;
    let seq = r["seq"].as_u64().unwrap();
    wait_command(&car, "the deactivation's command", |s| s == seq).await;
    let sent = states_seen(&car, 0);
    assert!(
        sent.iter()
            .all(|(s, g)| *s < seq || !g.iter().any(|x| x == "autopilot")),
        "{sent:?}"
    );
    car.ignore.store(false, std::sync::atomic::Ordering::SeqCst);
    car.announce_online().await;
    let cb = hook.wait(&bad, Duration::from_secs(15)).await;
    assert_eq!(cb.body["status"], "FAILED", "{}", cb.body);
    let cb = hook.wait(&removal, Duration::from_secs(15)).await;
    assert_eq!(cb.body["status"], "DEACTIVATED", "{}", cb.body);
    assert_eq!(car_services(&car), ["heated-seats"]);
}

/// An activation for car 1 until 2099 (its grant carries an expiry, unlike the permanent
/// ones `Api::activate` makes); its request id.
async fn subscribe(api: &Api, service: &str, flag: &str) -> String {
    let mut body = activation(1, service, flag);
    body["duration"] = json!({"type": "SUBSCRIPTION", "expiryDate": "2099-01-01T00:00:00Z"});
    let (s, b) = api.post("/ota/activate", &body).await;
    assert_eq!(s, 202, "{b}");
    b["requestId"].as_str().unwrap().to_owned()
}

/// The state commands `car` saw from the `from`th on: (seq, services of the grants with an
/// expiry, all services).
fn new_and_all_grants(car: &TestCar, from: usize) -> Vec<(u64, Vec<String>, Vec<String>)> {
    car.seen.lock().unwrap().set_states[from..]
        .iter()
        .map(|c| {
            let new = match &c.body {
                caas_protocol::CommandBody::SetState(d) => d
                    .grants
                    .iter()
                    .filter(|g| g.ends_at.is_some())
                    .map(|g| g.service_id.to_string())
                    .collect(),
                caas_protocol::CommandBody::QueryStatus { .. } => Vec::new(),
            };
            (c.seq, new, granted(c))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_callback_key_rotation_each_callback_is_signed_with_both_keys() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let mut c = config(dir.path(), Some(&hook));
    c.webhook_secret_previous = Some(OLD_SECRET.into());
    let gw = caas_gateway::start(c).await.unwrap();
    let api = Api::new(gw.http_addr());
    let _car = obeying_car(&gw, &api, 1).await;
    let id = api.activate(1, "power-boost", "power_boost").await;
    let cb = hook.wait(&id, Duration::from_secs(15)).await;
    // A receiver on the new key and one still on the old key both take it.
    assert!(cb.signature_ok, "X-CaaS-Signature with the new key");
    assert_eq!(
        cb.previous_signature_ok,
        Some(true),
        "X-CaaS-Signature-Previous with the old key"
    );
    gw.shutdown().await;
}

/// Commands and reports of cars spread over several embedded routers reach their cars and
/// their shards both ways the gateway wires them: with as many shards as routers each shard
/// reads its router's link itself, otherwise a task per router hands reports on; either way
/// a flushed batch's commands are split over the routers by VIN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cars_on_several_routers_are_activated_however_shards_and_routers_pair() {
    const CARS: u32 = 6;
    for (shards, routers) in [(2, 2), (1, 3)] {
        let dir = tempfile::tempdir().unwrap();
        let hook = Webhook::start(0).await;
        let mut c = config(dir.path(), Some(&hook));
        c.shards = shards;
        c.broker_shards = routers;
        let gw = caas_gateway::start(c).await.unwrap();
        let api = Api::new(gw.http_addr());
        let cars = obeying_cars(&gw, &api, 1..CARS + 1).await;
        let mut ids = Vec::new();
        for n in 1..=CARS {
            ids.push(api.activate(n, "power-boost", "power_boost").await);
        }
        for (id, car) in ids.iter().zip(&cars) {
            let cb = hook.wait(id, Duration::from_secs(15)).await;
            assert_eq!(
                cb.body["status"], "ACTIVATED",
                "{shards} shards, {routers} routers: {}",
                cb.body
            );
            assert_eq!(car_services(car), vec!["power-boost".to_string()]);
        }
        assert_eq!(api.metric("caas_connected_cars").await, f64::from(CARS));
        gw.shutdown().await;
    }
}

/// A burst of reports far past what the router queues for the gateway's link before it
/// stops and waits to be woken (200 notifications) reaches the cars' shards whole: each one
/// is counted (here as forged: signed with another car's key), none lost, and the link does
/// not stay stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_reports_past_the_links_queue_reaches_the_shards_whole() {
    const CARS: u32 = 8;
    const EACH: u32 = 1_000;
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (gw, api) = gateway(dir.path(), &hook).await;
    let cars = obeying_cars(&gw, &api, 1..CARS + 1).await;
    let forged = "caas_reports_forged_total";
    let before = api.metric(forged).await;
    let frames: Vec<Vec<u8>> = (1..=CARS)
        .map(|n| {
            report(
                &vin(n),
                &car_key(n + CARS),
                1,
                caas_protocol::Outcome::Applied { seq: 1 },
            )
        })
        .collect();
    let bursts: Vec<_> = (1..=CARS)
        .zip(frames)
        .zip(&cars)
        .map(|((n, frame), car)| {
            let client = car.client.clone();
            tokio::spawn(async move {
                let topic = caas_protocol::topics::report_topic(&vin(n)).to_string();
                for _ in 0..EACH {
                    client
                        .publish(
                            topic.as_str(),
                            rumqttc::QoS::AtMostOnce,
                            false,
                            frame.clone(),
                        )
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for b in bursts {
        b.await.unwrap();
    }
    let end = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let counted = api.metric(forged).await - before;
        if counted == f64::from(CARS * EACH) {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "{counted} of {} reports reached the shards",
            CARS * EACH
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.shutdown().await;
}
