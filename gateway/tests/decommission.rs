//! A car taken out of the fleet: `DELETE /vehicles/{vin}` against a real gateway with its
//! embedded broker, a real webhook receiver and test cars (the real agent core) on real MQTT
//! connections, then the same data after a restart.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use caas_protocol::{verifying_key_to_hex, Outcome, SigningKey};
use common::*;
use serde_json::{json, Value};

/// A gateway whose requests stay in flight for the whole test (no attempt runs out while a
/// car does not answer), its MQTT listener on `mqtt_port` so that a car's connection comes
/// back to the same port after a restart.
async fn patient_gateway(
    dir: &std::path::Path,
    hook: &Webhook,
    mqtt_port: u16,
) -> (caas_gateway::Gateway, Api) {
    let mut c = config(dir, Some(hook));
    c.retry.attempts = 30;
    c.retry.attempt_timeout = Duration::from_secs(2);
    c.mqtt = Some(format!("127.0.0.1:{mqtt_port}").parse().unwrap());
    let gw = match caas_gateway::start(c).await {
        Ok(gw) => gw,
        Err(e) => panic!("gateway start: {e:#}"),
    };
    let api = Api::new(gw.http_addr());
    (gw, api)
}

fn hex(key: &SigningKey) -> String {
    verifying_key_to_hex(&key.verifying_key()).to_string()
}

/// Registers car `n` with `key`: the status and the answer.
async fn register_with(api: &Api, n: u32, key: &SigningKey) -> (u16, Value) {
    api.post(
        "/vehicles",
        &json!({"vin": vin(n).to_string(), "publicKey": hex(key), "platform": "mqb-evo"}),
    )
    .await
}

async fn decommission(api: &Api, n: u32) -> (u16, Value) {
    api.delete(&format!("/vehicles/{}", vin(n))).await
}

async fn request(api: &Api, id: &str) -> Value {
    let (s, r) = api.get(&format!("/ota/requests/{id}")).await;
    assert_eq!(s, 200, "{r}");
    r
}

/// The VINs `GET /vehicles` lists.
async fn listed(api: &Api) -> Vec<String> {
    let (s, b) = api.get("/vehicles?limit=500").await;
    assert_eq!(s, 200, "{b}");
    b["vehicles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["vin"].as_str().unwrap().to_owned())
        .collect()
}

/// Asserts that car `n` is gone from the registered fleet: status 404 naming `vin` and
/// saying it was decommissioned, not listed, an activation refused as for an unknown car.
async fn assert_not_registered(api: &Api, n: u32) {
    let (s, b) = api.get(&format!("/vehicles/{}/status", vin(n))).await;
    assert_eq!((s, b["field"].as_str()), (404, Some("vin")), "{b}");
    assert!(
        b["reason"]
            .as_str()
            .unwrap()
            .contains("decommissioned at 20"),
        "{b}"
    );
    assert!(!listed(api).await.contains(&vin(n).to_string()));
    let (s, b) = api
        .post("/ota/activate", &activation(n, "snow-mode", "snow_mode"))
        .await;
    assert_eq!((s, b["field"].as_str()), (404, Some("vin")), "{b}");
}

/// Waits (bounded) for request `id`'s callback and checks it says FAILED DECOMMISSIONED.
async fn wait_decommissioned(hook: &Webhook, id: &str) {
    let cb = hook.wait(id, Duration::from_secs(10)).await;
    assert_eq!(
        (&cb.body["status"], &cb.body["errorCode"]),
        (&json!("FAILED"), &json!("DECOMMISSIONED")),
        "{}",
        cb.body
    );
    assert!(cb.signature_ok);
}

/// Waits (bounded) until `car` holds exactly `services`.
async fn wait_services(car: &TestCar, services: &[&str]) {
    let end = Instant::now() + Duration::from_secs(10);
    while car_services(car) != services {
        assert!(
            Instant::now() < end,
            "the car holds {:?}, not {services:?}",
            car_services(car)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decommissioned_car_ends_its_requests_drops_its_grants_and_comes_back_above_its_seq() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let port = free_port();
    let (gw, api) = patient_gateway(dir.path(), &hook, port).await;

    // Car 1 is connected and holds a service; its reports are then lost, so a second
    // activation stays in flight though the car applies it.
    let car1 = obeying_car(&gw, &api, 1).await;
    let boost = api.activate(1, "power-boost", "power_boost").await;
    wait_activated(&hook, &[&boost], Duration::from_secs(10)).await;
    car1.mute.store(true, Ordering::SeqCst);
    let seats = api.activate(1, "heated-seats", "heated_seats").await;
    wait_services(&car1, &["heated-seats", "power-boost"]).await;
    let seats_seq = request(&api, &seats).await["seq"].as_u64().unwrap();
    // Car 2 never connects: an activation of its own and one of a campaign are in flight.
    api.register(2).await;
    let snow = api.activate(2, "snow-mode", "snow_mode").await;
    let (s, camp) = api
        .post(
            "/campaigns",
            &json!({"vins": [vin(2).to_string()], "action": "ACTIVATE", "serviceId": "highway",
                "configuration": {"featureFlags": ["highway_autopilot"]},
                "duration": {"type": "PERMANENT"}}),
        )
        .await;
    assert_eq!((s, camp["accepted"].as_u64()), (202, Some(1)), "{camp}");
    let cid = camp["campaignId"].as_str().unwrap().to_owned();
    let (_, reqs) = api.get(&format!("/campaigns/{cid}/requests")).await;
    let highway = reqs["requests"][0]["requestId"]
        .as_str()
        .unwrap()
        .to_owned();
    for id in [&seats, &snow, &highway] {
        assert_eq!(request(&api, id).await["status"], "IN_PROGRESS");
    }

    // Car 1 decommissioned: its request in flight ends, and the connected unit gets one
    // last command, the next seq, with no grant; the agent drops its services.
    let (s, first) = decommission(&api, 1).await;
    assert_eq!(s, 200, "{first}");
    assert_eq!(first["vin"], vin(1).to_string());
    assert_eq!(first["requestsFailed"], 1, "{first}");
    let withdrawal = first["withdrawalSeq"].as_u64().unwrap();
    assert_eq!(withdrawal, seats_seq + 1);
    assert!(first["decommissionedAt"]
        .as_str()
        .unwrap()
        .starts_with("20"));
    wait_services(&car1, &[]).await;
    let last = car1
        .seen
        .lock()
        .unwrap()
        .set_states
        .last()
        .cloned()
        .unwrap();
    assert_eq!((last.seq, granted(&last)), (withdrawal, vec![]));
    assert_eq!(car1.seen.lock().unwrap().applied_seq, withdrawal);
    let r = request(&api, &seats).await;
    assert_eq!(
        (&r["status"], &r["errorCode"]),
        (&json!("FAILED"), &json!("DECOMMISSIONED"))
    );
    wait_decommissioned(&hook, &seats).await;
    // The request that completed before stays as it was.
    assert_eq!(request(&api, &boost).await["status"], "COMPLETED");

    // Car 2: both its requests end, the campaign counts it failed.
    let (s, second) = decommission(&api, 2).await;
    assert_eq!((s, &second["requestsFailed"]), (200, &json!(2)), "{second}");
    for id in [&snow, &highway] {
        wait_decommissioned(&hook, id).await;
        assert_eq!(request(&api, id).await["errorCode"], "DECOMMISSIONED");
    }
    // A unit of car 2 that comes online only now gets the withdrawal (the retained one,
    // and the one its coming online has signed afresh), and nothing else: the car is no
    // longer sent anything but that.
    let w2 = second["withdrawalSeq"].as_u64().unwrap();
    let late = TestCar::start(2, gw.public_key_hex(), CarOpts::plain(&gw, Mode::Obey)).await;
    wait_command(&late, "the retained withdrawal", |seq| seq == w2).await;
    let seen = states_seen(&late, 0);
    assert!(
        !seen.is_empty() && seen.iter().all(|s| *s == (w2, vec![])),
        "{seen:?}"
    );
    drop(late);
    let (_, c) = api.get(&format!("/campaigns/{cid}")).await;
    assert_eq!(
        (&c["counts"]["FAILED"], &c["counts"]["IN_PROGRESS"]),
        (&json!(1), &json!(0)),
        "{c}"
    );
    assert_eq!(api.metric("caas_vehicles_decommissioned_total").await, 2.0);
    assert_eq!(api.metric("caas_requests_in_flight").await, 0.0);

    // Neither is registered any more; a campaign refuses them as unknown cars.
    for n in [1, 2] {
        assert_not_registered(&api, n).await;
    }
    let (s, b) = api
        .post(
            "/campaigns",
            &json!({"vins": [vin(1).to_string()], "action": "DEACTIVATE", "serviceId": "power-boost"}),
        )
        .await;
    assert_eq!(
        (s, &b["accepted"], &b["refusedCount"]),
        (202, &json!(0), &json!(1)),
        "{b}"
    );
    // The history is kept, with the entry.
    let entries = history_of(&api, 1, "DECOMMISSIONED").await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["seq"], withdrawal);
    let results = history_of(&api, 1, "RESULT").await;
    assert!(
        results
            .iter()
            .any(|e| e["requestId"] == seats.as_str() && e["detail"] == "FAILED DECOMMISSIONED"),
        "{results:?}"
    );

    // A repeat answers the same and changes nothing.
    let (s, again) = decommission(&api, 1).await;
    assert_eq!(s, 200, "{again}");
    assert_eq!(
        (
            &again["vin"],
            &again["decommissionedAt"],
            &again["withdrawalSeq"]
        ),
        (
            &first["vin"],
            &first["decommissionedAt"],
            &first["withdrawalSeq"]
        )
    );
    assert_eq!(again["requestsFailed"], 0);
    assert_eq!(api.metric("caas_vehicles_decommissioned_total").await, 2.0);
    assert_eq!(history_of(&api, 1, "DECOMMISSIONED").await.len(), 1);

    // The unit's reports count as an unknown car's.
    car1.mute.store(false, Ordering::SeqCst);
    let forged = api.metric("caas_reports_forged_total").await;
    send_report(&car1, 1, withdrawal, Outcome::Periodic { counter: 7 }).await;
    let end = Instant::now() + Duration::from_secs(10);
    while api.metric("caas_reports_forged_total").await <= forged {
        assert!(Instant::now() < end, "the report was not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Their keys are free: car 3 is registered with car 2's, then decommissioned too
    // (never sent anything, its withdrawal is seq 1).
    let (s, b) = register_with(&api, 3, &car_key(2)).await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = decommission(&api, 3).await;
    assert_eq!((s, &b["withdrawalSeq"]), (200, &json!(1)), "{b}");

    // Car 1 comes back into the programme with the same unit, which kept the seq it applied:
    // the next activation goes on above it and completes.
    let (s, b) = register_with(&api, 1, &car_key(1)).await;
    assert_eq!(s, 201, "{b}");
    let registered = history_of(&api, 1, "REGISTERED").await;
    assert_eq!(registered.len(), 1, "{registered:?}");
    let (s, st) = api.get(&format!("/vehicles/{}/status", vin(1))).await;
    assert_eq!((s, services(&st)), (200, vec![]), "{st}");
    let boost2 = api.activate(1, "power-boost", "power_boost").await;
    assert_eq!(request(&api, &boost2).await["seq"], withdrawal + 1);
    wait_activated(&hook, &[&boost2], Duration::from_secs(10)).await;
    wait_services(&car1, &["power-boost"]).await;

    // Decommissioned again, the unit applies the withdrawal; then a restart.
    let (s, b) = decommission(&api, 1).await;
    assert_eq!((s, &b["requestsFailed"]), (200, &json!(0)), "{b}");
    let withdrawal2 = b["withdrawalSeq"].as_u64().unwrap();
    assert_eq!(withdrawal2, withdrawal + 2);
    wait_services(&car1, &[]).await;
    wait_until(
        "the unit applies the withdrawal",
        Duration::from_secs(10),
        || car1.seen.lock().unwrap().applied_seq == withdrawal2,
    )
    .await;
    let states_before = car1.seen.lock().unwrap().set_states.len();
    gw.shutdown().await;

    let (gw, api) = patient_gateway(dir.path(), &hook, port).await;
    for n in [1, 2, 3] {
        assert_not_registered(&api, n).await;
        assert_eq!(
            history_of(&api, n, "DECOMMISSIONED").await.len(),
            if n == 1 { 2 } else { 1 }
        );
    }
    let (s, again) = decommission(&api, 2).await;
    assert_eq!(
        (s, &again["decommissionedAt"], &again["requestsFailed"]),
        (200, &second["decommissionedAt"], &json!(0)),
        "{again}"
    );
    // Car 2's key stays free (car 3 had it, and was decommissioned): car 4 takes it.
    let (s, b) = register_with(&api, 4, &car_key(2)).await;
    assert_eq!(s, 201, "{b}");
    // Car 3 registered again goes on above its seq 1.
    let (s, b) = register_with(&api, 3, &car_key(3)).await;
    assert_eq!(s, 201, "{b}");
    let seats3 = api.activate(3, "heated-seats", "heated_seats").await;
    assert_eq!(request(&api, &seats3).await["seq"], 2);

    // Car 1's unit connects again, to the restarted gateway's broker (its session with the
    // first one's is dropped by the unit itself: that broker's threads outlive a shutdown
    // inside this test process, where a real gateway process would have ended them). It
    // gets nothing until the car is registered again; then the next activation goes on
    // above the seq it kept.
    car1.client.disconnect().await.unwrap();
    wait_until("the unit reconnects", Duration::from_secs(10), || {
        car1.errors.load(Ordering::SeqCst) > 0 && car1.connected.load(Ordering::SeqCst)
    })
    .await;
    let (s, b) = register_with(&api, 1, &car_key(1)).await;
    assert_eq!(s, 201, "{b}");
    let seats1 = api.activate(1, "heated-seats", "heated_seats").await;
    assert_eq!(request(&api, &seats1).await["seq"], withdrawal2 + 1);
    wait_activated(&hook, &[&seats1], Duration::from_secs(20)).await;
    wait_services(&car1, &["heated-seats"]).await;
    // The withdrawal was not published at start; the unit coming online while the car was
    // still decommissioned got it signed afresh (it had it already: refused as a replay,
    // nothing changed), and then only the new command above it.
    let since = states_seen(&car1, states_before);
    assert!(
        since.iter().any(|(seq, _)| *seq > withdrawal2)
            && since
                .iter()
                .all(|(seq, grants)| *seq > withdrawal2
                    || (*seq == withdrawal2 && grants.is_empty())),
        "{since:?}"
    );

    // Exactly one callback for each request a decommissioning ended, restart included.
    for id in [&seats, &snow, &highway] {
        assert_eq!(hook.for_request(id).len(), 1, "{id}");
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_decommissionings_are_refused_naming_the_field_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (gw, api) = patient_gateway(dir.path(), &hook, free_port()).await;
    api.register(1).await;
    let boost = api.activate(1, "power-boost", "power_boost").await;
    let car1 = format!("{}/vehicles/{}", api.base, vin(1));
    let refusals = [
        (
            format!("{}/vehicles/NOT-A-VIN", api.base),
            Some(TOKEN),
            400,
            "vin",
        ),
        (
            format!("{}/vehicles/{}", api.base, vin(9)),
            Some(TOKEN),
            404,
            "vin",
        ),
        (car1.clone(), None, 401, "Authorization"),
        (car1.clone(), Some("wrong-token"), 401, "Authorization"),
    ];
    for (url, token, status, field) in refusals {
        let mut req = api.http.delete(&url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        let s = r.status().as_u16();
        let b: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(
            (s, b["field"].as_str()),
            (status, Some(field)),
            "{url}: {b}"
        );
    }
    // A VIN never registered is not decommissioned by the attempt: it stays unknown.
    let (s, b) = api.get(&format!("/vehicles/{}/status", vin(9))).await;
    assert_eq!(s, 404, "{b}");
    assert!(
        !b["reason"].as_str().unwrap().contains("decommissioned"),
        "{b}"
    );
    let (s, _) = api.get(&format!("/vehicles/{}/history", vin(9))).await;
    assert_eq!(s, 404);
    // Car 1 is untouched.
    let (s, st) = api.get(&format!("/vehicles/{}/status", vin(1))).await;
    assert_eq!(s, 200, "{st}");
    assert_eq!(request(&api, &boost).await["status"], "IN_PROGRESS");
    assert!(listed(&api).await.contains(&vin(1).to_string()));
    assert_eq!(api.metric("caas_vehicles_decommissioned_total").await, 0.0);
    assert!(history_of(&api, 1, "DECOMMISSIONED").await.is_empty());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_away_through_the_decommissioning_and_a_restart_still_drops_its_features() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let port = free_port();
    let (gw, api) = patient_gateway(dir.path(), &hook, port).await;
    api.register(1).await;
    let gateway_key = gw.public_key_hex().to_owned();
    let plain = |gw: &caas_gateway::Gateway| CarOpts::plain(gw, Mode::Obey);
    let car = TestCar::start_with_flash(1, car_key(1), &gateway_key, plain(&gw), None).await;
    car.wait_connected().await;
    let boost = api.activate(1, "power-boost", "power_boost").await;
    wait_activated(&hook, &[&boost], Duration::from_secs(10)).await;
    // The unit goes away with its flash (and the feature in it) before the decommissioning.
    let flash = car.flash.lock().unwrap().clone();
    drop(car);
    wait_status(&api, 1, "car 1 offline", Duration::from_secs(10), |st| {
        st["connectivity"] == "OFFLINE"
    })
    .await;
    let (s, retired) = decommission(&api, 1).await;
    assert_eq!(s, 200, "{retired}");
    let withdrawal = retired["withdrawalSeq"].as_u64().unwrap();
    // The embedded broker's retained withdrawal goes with the restart.
    gw.shutdown().await;
    let (gw, _api) = patient_gateway(dir.path(), &hook, port).await;

    let car = TestCar::start_with_flash(1, car_key(1), &gateway_key, plain(&gw), flash).await;
    car.wait_connected().await;
    // What the test car shows is what its agent held after the last command it handled.
    wait_until(
        "the unit applied the withdrawal",
        Duration::from_secs(10),
        || car.seen.lock().unwrap().applied_seq == withdrawal,
    )
    .await;
    assert_eq!(car_services(&car), Vec::<String>::new());
    drop(car);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_car_registered_again_with_its_unit_connected_shows_online_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (gw, api) = patient_gateway(dir.path(), &hook, free_port()).await;
    api.register(1).await;
    let car = TestCar::start(1, gw.public_key_hex(), CarOpts::plain(&gw, Mode::Obey)).await;
    car.wait_connected().await;
    let boost = api.activate(1, "power-boost", "power_boost").await;
    wait_activated(&hook, &[&boost], Duration::from_secs(10)).await;
    let (s, retired) = decommission(&api, 1).await;
    assert_eq!(s, 200, "{retired}");
    let withdrawal = retired["withdrawalSeq"].as_u64().unwrap();
    wait_services(&car, &[]).await;
    // The unit stays connected through it all, and says nothing of its own accord (no
    // periodic reports): registered again, the car is asked for its status.
    let (s, b) = register_with(&api, 1, &car_key(1)).await;
    assert_eq!(s, 201, "{b}");
    let st = wait_status(&api, 1, "car 1 online", Duration::from_secs(10), |st| {
        st["connectivity"] == "ONLINE"
    })
    .await;
    assert!(st["activeServices"].as_array().unwrap().is_empty(), "{st}");
    assert_eq!(car.seen.lock().unwrap().applied_seq, withdrawal);
    // The car may show ONLINE before the query reaches it: its report of the withdrawal,
    // sent before it was registered again, can arrive after.
    wait_until(
        "the unit was asked for its status",
        Duration::from_secs(10),
        || car.seen.lock().unwrap().queries >= 1,
    )
    .await;
    drop(car);
    gw.shutdown().await;
}
