//! Cancels: `POST /ota/requests/{id}/cancel` and `POST /campaigns/{id}/cancel` end requests
//! still in flight as a failure does (FAILED with `CANCELLED`, the grant withdrawn, one
//! callback, no charge), leave final ones alone, and a cancelled campaign's keyed repeat
//! makes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

async fn start(dir: &std::path::Path, hook: &Webhook) -> (caas_gateway::Gateway, Api) {
    let gw = caas_gateway::start(config(dir, Some(hook))).await.unwrap();
    let api = Api::new(gw.http_addr());
    (gw, api)
}

/// The car applied the newest state command it saw.
fn caught_up(car: &TestCar) -> bool {
    let newest = states_seen(car, 0).last().map_or(0, |(seq, _)| *seq);
    car.seen.lock().unwrap().applied_seq >= newest
}

async fn cancel(api: &Api, path: &str) -> (u16, Value) {
    api.post(path, &json!({})).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_request_ends_failed_and_the_car_does_not_keep_its_grant() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (gw, api) = start(dir.path(), &hook).await;
    let car = obeying_car(&gw, &api, 1).await;
    let seats = api.activate(1, "heated-seats", "heated_seats").await;
    wait_activated(&hook, &[&seats], Duration::from_secs(10)).await;

    // The car sees the boost's command but does not take it: the request stays in flight.
    car.ignore.store(true, Ordering::SeqCst);
    let boost = api.activate(1, "power-boost", "power_boost").await;
    let (s, r) = api.get(&format!("/ota/requests/{boost}")).await;
    assert_eq!((s, r["status"].as_str()), (200, Some("IN_PROGRESS")), "{r}");
    let (s, r) = cancel(&api, &format!("/ota/requests/{boost}/cancel")).await;
    assert_eq!(
        (s, r["status"].as_str(), r["errorCode"].as_str()),
        (200, Some("FAILED"), Some("CANCELLED")),
        "{r}"
    );
    let cb = hook.wait(&boost, Duration::from_secs(10)).await;
    assert_eq!(
        (&cb.body["status"], &cb.body["errorCode"]),
        (&json!("FAILED"), &json!("CANCELLED"))
    );
    // Again: the same answer, nothing more.
    let (s, again) = cancel(&api, &format!("/ota/requests/{boost}/cancel")).await;
    assert_eq!((s, &again), (200, &r));

    // Back, the car gets the newer command, which withdraws the boost: it keeps the seats
    // only, and the cancelled request is not settled by anything it reports.
    car.ignore.store(false, Ordering::SeqCst);
    car.announce_online().await;
    wait_until("the car catches up", Duration::from_secs(10), || {
        car_services(&car) == ["heated-seats"] && caught_up(&car)
    })
    .await;
    assert!(states_seen(&car, 0)
        .last()
        .is_some_and(|(_, services)| services == &["heated-seats"]));
    let (_, r) = api.get(&format!("/ota/requests/{boost}")).await;
    assert_eq!(r["errorCode"], "CANCELLED", "{r}");
    // The status shows the seats, and no ERROR for the cancelled boost: the car did
    // nothing wrong.
    let (_, st) = api.get(&format!("/vehicles/{}/status", vin(1))).await;
    let services: Vec<(&str, &str)> = st["activeServices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["serviceId"].as_str().unwrap(),
                s["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(services, [("heated-seats", "ACTIVE")], "{st}");
    assert_eq!(hook.for_request(&boost).len(), 1, "one callback");
    assert_eq!(api.metric("caas_requests_cancelled_total").await, 1.0);

    // A request the car confirmed is not cancelled afterwards, nor is an unknown one.
    let (s, e) = cancel(&api, &format!("/ota/requests/{seats}/cancel")).await;
    assert_eq!((s, e["field"].as_str()), (409, Some("requestId")), "{e}");
    let (_, r) = api.get(&format!("/ota/requests/{seats}")).await;
    assert_eq!(r["status"], "COMPLETED", "{r}");
    let unknown = "01900000-0000-7000-8000-000000000000";
    let (s, e) = cancel(&api, &format!("/ota/requests/{unknown}/cancel")).await;
    assert_eq!((s, e["field"].as_str()), (404, Some("requestId")), "{e}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_campaign_ends_what_is_in_flight_and_its_keyed_repeat_makes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (gw, api) = start(dir.path(), &hook).await;
    let mut cars = Vec::new();
    for n in 1..=4 {
        cars.push(obeying_car(&gw, &api, n).await);
    }
    // Cars 3 and 4 do not take their commands: their requests stay in flight.
    for car in &cars[2..] {
        car.ignore.store(true, Ordering::SeqCst);
    }
    // Car 5 is not registered yet: the campaign refuses it.
    let body = json!({"vins": (1..=5).map(|n| vin(n).to_string()).collect::<Vec<_>>(),
        "action": "ACTIVATE", "serviceId": "autopilot",
        "configuration": {"featureFlags": ["highway_autopilot"]},
        "duration": {"type": "SUBSCRIPTION", "autoRenewal": true}});
    let (s, b, _) = post_keyed(&api, "/campaigns", "campaign-7", &body).await;
    assert_eq!(
        (s, b["accepted"].as_u64(), b["refusedCount"].as_u64()),
        (202, Some(4), Some(1)),
        "{b}"
    );
    let cid = b["campaignId"].as_str().unwrap().to_owned();
    let counts = |c: &Value| {
        (
            c["counts"]["COMPLETED"].as_u64(),
            c["counts"]["IN_PROGRESS"].as_u64(),
            c["counts"]["FAILED"].as_u64(),
        )
    };
    let end = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (_, c) = api.get(&format!("/campaigns/{cid}")).await;
        if counts(&c) == (Some(2), Some(2), Some(0)) {
            assert_eq!(c["cancelledAt"], Value::Null, "{c}");
            break;
        }
        assert!(std::time::Instant::now() < end, "{c}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (s, c) = cancel(&api, &format!("/campaigns/{cid}/cancel")).await;
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["cancelledNow"], 2, "{c}");
    assert_eq!(counts(&c), (Some(2), Some(0), Some(2)), "{c}");
    let cancelled_at = c["cancelledAt"].as_str().unwrap().to_owned();
    // The two cars that took it keep it; the two that did not get FAILED CANCELLED.
    wait_until(
        "the campaign's 4 callbacks",
        Duration::from_secs(10),
        || hook.got.lock().unwrap().len() >= 4,
    )
    .await;
    let callbacks: Vec<(String, Value, Value)> = hook
        .got
        .lock()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c.body["vin"].as_str().unwrap().to_owned(),
                c.body["status"].clone(),
                c.body["errorCode"].clone(),
            )
        })
        .collect();
    for n in 1..=4 {
        let of_car: Vec<_> = callbacks
            .iter()
            .filter(|(v, _, _)| *v == vin(n).to_string())
            .map(|(_, s, e)| (s.clone(), e.clone()))
            .collect();
        let want = if n <= 2 {
            (json!("ACTIVATED"), Value::Null)
        } else {
            (json!("FAILED"), json!("CANCELLED"))
        };
        assert_eq!(of_car, [want], "car {n}");
    }

    // Its requests, in the order of its VINs: one per page, all four; the failed ones are
    // the two cancelled.
    let mut vins_paged = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(a) => format!("/campaigns/{cid}/requests?limit=1&after={a}"),
            None => format!("/campaigns/{cid}/requests?limit=1"),
        };
        let (s, p) = api.get(&path).await;
        assert_eq!(s, 200, "{p}");
        for r in p["requests"].as_array().unwrap() {
            vins_paged.push(r["vin"].as_str().unwrap().to_owned());
        }
        after = p["nextAfter"].as_str().map(str::to_owned);
        if after.is_none() {
            break;
        }
        assert!(vins_paged.len() <= 4, "pages repeat: {vins_paged:?}");
    }
    let want: Vec<String> = (1..=4).map(|n| vin(n).to_string()).collect();
    assert_eq!(vins_paged, want);
    let (_, failed) = api
        .get(&format!("/campaigns/{cid}/requests?status=FAILED"))
        .await;
    let failed: Vec<(&str, &str)> = failed["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["vin"].as_str().unwrap(), r["errorCode"].as_str().unwrap()))
        .collect();
    let (v3, v4) = (vin(3).to_string(), vin(4).to_string());
    assert_eq!(
        failed,
        [(v3.as_str(), "CANCELLED"), (v4.as_str(), "CANCELLED")]
    );

    // Cancelling again ends nothing more. The repeat of the campaign's POST is answered as
    // a repeat and makes no request: not even car 5's, registered since (a repeat of a
    // campaign not cancelled makes the requests it lacks).
    api.register(5).await;
    let (s, c) = cancel(&api, &format!("/campaigns/{cid}/cancel")).await;
    assert_eq!((s, &c["cancelledNow"]), (200, &json!(0)), "{c}");
    assert_eq!(c["cancelledAt"], cancelled_at.as_str());
    let created = api.metric("caas_requests_total{state=\"created\"}").await;
    let (s, b, replayed) = post_keyed(&api, "/campaigns", "campaign-7", &body).await;
    assert_eq!(
        (s, replayed, &b["campaignId"]),
        (202, true, &json!(cid)),
        "{b}"
    );
    // The four made before count as accepted; car 5's is not made.
    assert_eq!(
        (&b["accepted"], &b["notMade"]),
        (&json!(4), &json!(1)),
        "{b}"
    );
    assert_eq!(
        api.metric("caas_requests_total{state=\"created\"}").await,
        created
    );
    let (_, c) = api.get(&format!("/campaigns/{cid}")).await;
    assert_eq!(counts(&c), (Some(2), Some(0), Some(2)), "{c}");

    // Back, cars 3 and 4 end without the autopilot; cars 1 and 2 keep it.
    for car in &cars[2..] {
        car.ignore.store(false, Ordering::SeqCst);
        car.announce_online().await;
    }
    for (i, car) in cars.iter().enumerate() {
        let want: &[&str] = if i < 2 { &["autopilot"] } else { &[] };
        wait_until(
            "the car holds what it should",
            Duration::from_secs(10),
            || car_services(car) == want && caught_up(car),
        )
        .await;
    }
    // The cancel is kept across a restart.
    gw.shutdown().await;
    let (gw, api) = start(dir.path(), &hook).await;
    let (_, c) = api.get(&format!("/campaigns/{cid}")).await;
    assert_eq!(c["cancelledAt"], cancelled_at.as_str(), "{c}");
    assert_eq!(counts(&c), (Some(2), Some(0), Some(2)), "{c}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_cancelled_while_it_is_accepted_makes_none_of_the_rest() {
    // Without the shards' check, a campaign's requests made after its cancel stayed in
    // flight, and were sent.
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (gw, api) = start(dir.path(), &hook).await;
    // Enough cars that the shard makes a campaign's requests over ten chunks (256 a chunk),
    // each its own flush. The cars are offline, so every request made stays in flight until
    // a cancel ends it.
    let n = 3_000u32;
    let mut registering = tokio::task::JoinSet::new();
    for first in (1..=n).step_by(100) {
        let api = api.clone();
        registering.spawn(async move {
            for i in first..first + 100 {
                api.register(i).await;
            }
        });
    }
    while let Some(r) = registering.join_next().await {
        r.unwrap();
    }
    // Cancelled as soon as it is listed: the cancel mostly reaches the shard before the
    // campaign does, which then makes nothing (the keyed repeat above is the case that
    // always does).
    cancel_while_accepted(&api, n, "snow", "snow_mode", false).await;
    // Cancelled once its first requests are made: the shard stops making the rest.
    let (accepted, not_made) =
        cancel_while_accepted(&api, n, "offroad", "offroad_mode", true).await;
    assert!(
        accepted > 0 && not_made > 0,
        "{accepted} made, {not_made} not"
    );
    assert_eq!(api.metric("caas_requests_in_flight").await, 0.0);
    gw.shutdown().await;
}

/// Posts a campaign of `service` to cars 1..=n and cancels it while its POST is still
/// being answered (`after_first`: once some of its requests are made, else as soon as it
/// is stored). Checks that every car is made or not made, that what was made ended
/// CANCELLED and that nothing of it is left in flight; returns (made, not made).
async fn cancel_while_accepted(
    api: &Api,
    n: u32,
    service: &str,
    flag: &str,
    after_first: bool,
) -> (u64, u64) {
    let created = api.metric("caas_requests_total{state=\"created\"}").await;
    let body = json!({"vins": (1..=n).map(|i| vin(i).to_string()).collect::<Vec<_>>(),
        "action": "ACTIVATE", "serviceId": service,
        "configuration": {"featureFlags": [flag]}, "duration": {"type": "PERMANENT"}});
    let posting = {
        let api = api.clone();
        tokio::spawn(async move { api.post("/campaigns", &body).await })
    };
    // A campaign is listed as soon as it is stored, before its requests are made.
    let cid = loop {
        let (_, page) = api.get("/campaigns?limit=1").await;
        let newest = &page["campaigns"][0];
        if newest["serviceId"] == service {
            let cid = newest["campaignId"].as_str().unwrap().to_owned();
            if !after_first {
                break cid;
            }
            let (_, c) = api.get(&format!("/campaigns/{cid}")).await;
            if c["counts"]["IN_PROGRESS"].as_u64() > Some(0) {
                break cid;
            }
        }
        assert!(
            !posting.is_finished(),
            "answered before it could be cancelled"
        );
    };
    let (s, c) = cancel(api, &format!("/campaigns/{cid}/cancel")).await;
    assert_eq!(s, 200, "{c}");
    let (s, b) = posting.await.unwrap();
    assert_eq!(
        (s, b["campaignId"].as_str()),
        (202, Some(cid.as_str())),
        "{b}"
    );
    let accepted = b["accepted"].as_u64().unwrap();
    let not_made = b["notMade"].as_u64().unwrap();
    assert_eq!(
        (accepted + not_made, b["refusedCount"].as_u64()),
        (u64::from(n), Some(0)),
        "{b}"
    );
    // The cancel ended what was made before it; nothing made after it is in flight.
    assert_eq!(c["cancelledNow"].as_u64(), Some(accepted), "{c}");
    let (_, c) = api.get(&format!("/campaigns/{cid}")).await;
    assert_eq!(
        (
            c["counts"]["IN_PROGRESS"].as_u64(),
            c["counts"]["FAILED"].as_u64()
        ),
        (Some(0), Some(accepted)),
        "{c}"
    );
    assert_eq!(
        api.metric("caas_requests_total{state=\"created\"}").await - created,
        accepted as f64
    );
    let (_, failed) = api
        .get(&format!(
            "/campaigns/{cid}/requests?status=FAILED&limit=500"
        ))
        .await;
    let codes: Vec<&str> = failed["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["errorCode"].as_str().unwrap())
        .collect();
    assert_eq!(codes.len() as u64, accepted.min(500));
    assert!(codes.iter().all(|c| *c == "CANCELLED"), "{codes:?}");
    (accepted, not_made)
}
