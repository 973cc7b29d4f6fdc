//! A campaign's `abortWhen` rule: once enough of its finished requests were refused by
//! their cars, the campaign cancels itself through the cancel path (requests still in
//! flight end FAILED CANCELLED, one callback each, grants withdrawn), records why, and keeps
//! that record across a restart; offline cars running out of attempts do not count; bad
//! rules are refused and change nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// A model without the autopilot: its agent refuses a grant of `highway_autopilot` with
/// `UNKNOWN_FEATURE`.
const NO_AUTOPILOT: caas_agent::Catalog<'static> = caas_agent::Catalog {
    optional: &["power_boost", "snow_mode", "heated_seats"],
    base: &["base_abs"],
};

/// Retries long enough that no request of a test runs out of attempts while it runs: the
/// offline cars' requests stay in flight until something ends them.
fn patient(dir: &std::path::Path, hook: &Webhook) -> caas_gateway::Config {
    let mut c = config(dir, Some(hook));
    c.retry = caas_gateway::RetryPolicy {
        attempts: 3,
        attempt_timeout: Duration::from_secs(60),
        backoff: vec![Duration::from_secs(60)],
    };
    c
}

async fn start(config: caas_gateway::Config) -> (caas_gateway::Gateway, Api) {
    let gw = caas_gateway::start(config).await.unwrap();
    let api = Api::new(gw.http_addr());
    (gw, api)
}

/// Registers car `n`, a model without the autopilot, and connects it.
/// Cars `refusing` (connected, refusing the autopilot), `obeying` (connected) and `offline`
/// (registered, never connected), all registered; the connected ones, to keep alive.
async fn fleet(
    gw: &caas_gateway::Gateway,
    api: &Api,
    refusing: std::ops::RangeInclusive<u32>,
    obeying: std::ops::RangeInclusive<u32>,
    offline: std::ops::RangeInclusive<u32>,
) -> Vec<TestCar> {
    let mut cars = Vec::new();
    for n in refusing {
        cars.push(refusing_car(gw, api, n).await);
    }
    for n in obeying {
        cars.push(obeying_car(gw, api, n).await);
    }
    for n in offline {
        api.register(n).await;
    }
    cars
}

async fn refusing_car(gw: &caas_gateway::Gateway, api: &Api, n: u32) -> TestCar {
    api.register(n).await;
    online_without_autopilot(gw, n).await
}

async fn online_without_autopilot(gw: &caas_gateway::Gateway, n: u32) -> TestCar {
    let car = TestCar::start_on_platform(
        n,
        car_key(n),
        gw.public_key_hex(),
        CarOpts::plain(gw, Mode::Obey),
        None,
        NO_AUTOPILOT,
    )
    .await;
    car.wait_connected().await;
    car
}

fn autopilot_campaign(vins: impl IntoIterator<Item = u32>, abort_when: Value) -> Value {
    json!({"vins": vins.into_iter().map(|n| vin(n).to_string()).collect::<Vec<_>>(),
        "action": "ACTIVATE", "serviceId": "autopilot",
        "configuration": {"featureFlags": ["highway_autopilot"]},
        "duration": {"type": "PERMANENT"},
        "abortWhen": abort_when})
}

/// (COMPLETED, IN_PROGRESS, FAILED) of a campaign.
fn counts(c: &Value) -> (u64, u64, u64) {
    let n = |s: &str| c["counts"][s].as_u64().unwrap();
    (n("COMPLETED"), n("IN_PROGRESS"), n("FAILED"))
}

/// Polls `GET /campaigns/{cid}` (bounded) until `done` holds; returns that answer.
async fn wait_campaign(api: &Api, cid: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let end = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (s, c) = api.get(&format!("/campaigns/{cid}")).await;
        assert_eq!(s, 200, "{c}");
        if done(&c) {
            return c;
        }
        assert!(
            std::time::Instant::now() < end,
            "timed out waiting for {what}: {c}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The campaign's requests: VIN number → (status, errorCode).
async fn outcomes(api: &Api, cid: &str) -> BTreeMap<u32, (String, Value)> {
    let (s, p) = api
        .get(&format!("/campaigns/{cid}/requests?limit=500"))
        .await;
    assert_eq!(s, 200, "{p}");
    p["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let v = r["vin"].as_str().unwrap();
            let n: u32 = v[v.len() - 6..].parse().unwrap();
            (
                n,
                (
                    r["status"].as_str().unwrap().to_owned(),
                    r["errorCode"].clone(),
                ),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_its_cars_refuse_aborts_itself_once_through_the_cancel_path() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (gw, api) = start(patient(dir.path(), &hook)).await;
    // Cars 1-6 are a model without the autopilot, 7-10 have it, 11-30 are registered but
    // offline (their requests stay in flight); car 31 is not registered yet.
    let cars = fleet(&gw, &api, 1..=6, 7..=10, 11..=30).await;
    // 50% of at least 10: the online cars' 10 answers (6 refusals) trip it, whatever their
    // order, and nothing before them can.
    let body = autopilot_campaign(1..=31, json!({"refusedPercent": 50, "minFinished": 10}));
    let (s, b, _) = post_keyed(&api, "/campaigns", "abort-1", &body).await;
    assert_eq!(
        (s, b["accepted"].as_u64(), b["refusedCount"].as_u64()),
        (202, Some(30), Some(1)),
        "{b}"
    );
    let cid = b["campaignId"].as_str().unwrap().to_owned();

    let c = wait_campaign(&api, &cid, "the abort", |c| {
        !c["abortedAt"].is_null() && counts(c).1 == 0
    })
    .await;
    assert_eq!(counts(&c), (4, 0, 26), "{c}");
    assert_eq!(
        c["abortReason"], "6 of 10 finished requests refused by their cars (60% \u{2265} 50%)",
        "{c}"
    );
    assert_eq!(
        c["abortWhen"],
        json!({"refusedPercent": 50, "minFinished": 10})
    );
    assert!(c["cancelledAt"].is_string(), "cancelled as by hand: {c}");
    let aborted_at = c["abortedAt"].as_str().unwrap().to_owned();
    let cancelled_at = c["cancelledAt"].as_str().unwrap().to_owned();

    // The refusing cars' requests failed with their refusal, the accepting cars' stay
    // COMPLETED, the offline cars' were cancelled.
    let got = outcomes(&api, &cid).await;
    assert_eq!(got.len(), 30);
    for (n, (status, code)) in &got {
        let want = match n {
            1..=6 => ("FAILED", json!("UNKNOWN_FEATURE")),
            7..=10 => ("COMPLETED", Value::Null),
            _ => ("FAILED", json!("CANCELLED")),
        };
        assert_eq!((status.as_str(), code), (want.0, &want.1), "car {n}");
    }
    // Exactly one callback per request, the offline cars' saying FAILED CANCELLED.
    wait_until("30 callbacks", Duration::from_secs(15), || {
        hook.got.lock().unwrap().len() >= 30
    })
    .await;
    let (_, page) = api
        .get(&format!("/campaigns/{cid}/requests?limit=500"))
        .await;
    for r in page["requests"].as_array().unwrap() {
        let id = r["requestId"].as_str().unwrap();
        let cbs = hook.for_request(id);
        assert_eq!(cbs.len(), 1, "one callback for {r}");
        assert_eq!(
            cbs[0].body["status"],
            r["status"].as_str().map_or("?", |s| {
                if s == "COMPLETED" {
                    "ACTIVATED"
                } else {
                    "FAILED"
                }
            })
        );
        assert_eq!(cbs[0].body["errorCode"], r["errorCode"], "{r}");
    }
    // An offline car's pending grant was withdrawn: it shows no autopilot.
    let (_, st) = api.get(&format!("/vehicles/{}/status", vin(11))).await;
    assert!(services(&st).is_empty(), "{st}");
    assert_eq!(api.metric("caas_campaigns_aborted_total").await, 1.0);
    assert_eq!(api.metric("caas_requests_cancelled_total").await, 20.0);
    // The list shows it too.
    let (_, page) = api.get("/campaigns?limit=1").await;
    let listed = &page["campaigns"][0];
    assert_eq!(
        (
            &listed["campaignId"],
            &listed["abortedAt"],
            &listed["abortReason"]
        ),
        (&json!(cid), &json!(aborted_at), &c["abortReason"]),
        "{page}"
    );

    // Like a cancelled campaign, a keyed repeat of its POST makes nothing, not even car 31's,
    // registered since.
    api.register(31).await;
    let (s, b, replayed) = post_keyed(&api, "/campaigns", "abort-1", &body).await;
    assert_eq!(
        (s, replayed, &b["accepted"], &b["notMade"]),
        (202, true, &json!(30), &json!(1)),
        "{b}"
    );
    // A cancel by hand afterwards keeps the abort as it was.
    let (s, again) = api
        .post(&format!("/campaigns/{cid}/cancel"), &json!({}))
        .await;
    assert_eq!((s, &again["cancelledNow"]), (200, &json!(0)), "{again}");
    assert_eq!(again["abortedAt"], aborted_at.as_str());
    assert_eq!(api.metric("caas_campaigns_aborted_total").await, 1.0);

    // Kept across a restart, and not tripped again.
    gw.shutdown().await;
    let (gw, api) = start(patient(dir.path(), &hook)).await;
    let (_, after) = api.get(&format!("/campaigns/{cid}")).await;
    for k in [
        "abortedAt",
        "abortReason",
        "abortWhen",
        "cancelledAt",
        "counts",
    ] {
        assert_eq!(after[k], c[k], "{k}: {after}");
    }
    assert_eq!(after["cancelledAt"], cancelled_at.as_str());
    assert_eq!(api.metric("caas_campaigns_aborted_total").await, 0.0);
    assert_eq!(hook.got.lock().unwrap().len(), 30, "no callback more");
    drop(cars);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_below_the_rule_and_cars_out_of_attempts_do_not_abort_a_campaign() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    // The tests' short retry policy: an offline car's request fails NO_CONFIRMATION within
    // a few seconds.
    let (gw, api) = start(config(dir.path(), Some(&hook))).await;
    let cars = fleet(&gw, &api, 1..=2, 3..=6, 7..=12).await;
    // 2 refusals can never make 50% of 5 or more; counted as refusals, the 6 offline cars'
    // NO_CONFIRMATION would (8 of 12).
    let body = autopilot_campaign(1..=12, json!({"refusedPercent": 50, "minFinished": 5}));
    let (s, b) = api.post("/campaigns", &body).await;
    assert_eq!((s, b["accepted"].as_u64()), (202, Some(12)), "{b}");
    let cid = b["campaignId"].as_str().unwrap().to_owned();
    let c = wait_campaign(&api, &cid, "every request final", |c| counts(c).1 == 0).await;
    assert_eq!(counts(&c), (4, 0, 8), "{c}");
    assert_eq!(
        (&c["abortedAt"], &c["abortReason"], &c["cancelledAt"]),
        (&Value::Null, &Value::Null, &Value::Null),
        "{c}"
    );
    assert_eq!(
        c["abortWhen"],
        json!({"refusedPercent": 50, "minFinished": 5})
    );
    let got = outcomes(&api, &cid).await;
    let codes: Vec<Value> = got.values().map(|(_, code)| code.clone()).collect();
    let count = |code: &str| codes.iter().filter(|c| **c == json!(code)).count();
    assert_eq!(
        (count("UNKNOWN_FEATURE"), count("NO_CONFIRMATION")),
        (2, 6),
        "{got:?}"
    );
    assert_eq!(api.metric("caas_campaigns_aborted_total").await, 0.0);
    assert_eq!(api.metric("caas_requests_cancelled_total").await, 0.0);
    drop(cars);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_rule_counts_the_refusals_made_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let (gw, api) = start(patient(dir.path(), &hook)).await;
    let refuser = refusing_car(&gw, &api, 1).await;
    let taker = obeying_car(&gw, &api, 2).await;
    for n in 3..=6 {
        api.register(n).await;
    }
    // 60% of at least 4. Before the restart: 1 refusal of 2 finished. After it, cars 3 and 4
    // come online and refuse too: 3 of 4 trips it. Counting only what ended after the
    // restart (2 of 2 finished... and below minFinished), or not counting the refusal made
    // before it (2 of 4, 50%), would not.
    let body = autopilot_campaign(1..=6, json!({"refusedPercent": 60, "minFinished": 4}));
    let (s, b) = api.post("/campaigns", &body).await;
    assert_eq!((s, b["accepted"].as_u64()), (202, Some(6)), "{b}");
    let cid = b["campaignId"].as_str().unwrap().to_owned();
    wait_campaign(&api, &cid, "the online cars' answers", |c| {
        counts(c) == (1, 4, 1)
    })
    .await;
    drop((refuser, taker));
    gw.shutdown().await;

    let (gw, api) = start(patient(dir.path(), &hook)).await;
    let (_, c) = api.get(&format!("/campaigns/{cid}")).await;
    assert_eq!(
        (counts(&c), &c["abortedAt"]),
        ((1, 4, 1), &Value::Null),
        "{c}"
    );
    let late = [
        online_without_autopilot(&gw, 3).await,
        online_without_autopilot(&gw, 4).await,
    ];
    let c = wait_campaign(&api, &cid, "the abort", |c| {
        !c["abortedAt"].is_null() && counts(c).1 == 0
    })
    .await;
    assert_eq!(
        c["abortReason"], "3 of 4 finished requests refused by their cars (75% \u{2265} 60%)",
        "{c}"
    );
    assert_eq!(counts(&c), (1, 0, 5), "{c}");
    let got = outcomes(&api, &cid).await;
    assert_eq!(got[&5], ("FAILED".to_owned(), json!("CANCELLED")));
    assert_eq!(got[&6], ("FAILED".to_owned(), json!("CANCELLED")));
    assert_eq!(got[&3], ("FAILED".to_owned(), json!("UNKNOWN_FEATURE")));
    assert_eq!(api.metric("caas_campaigns_aborted_total").await, 1.0);
    drop(late);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_abort_rule_is_refused_naming_its_field_and_makes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, api) = start(config(dir.path(), None)).await;
    api.register(1).await;
    for (rule, field) in [
        (json!(30), "abortWhen"),
        (json!([30]), "abortWhen"),
        (json!("30%"), "abortWhen"),
        (json!({}), "abortWhen.refusedPercent"),
        (json!({"minFinished": 5}), "abortWhen.refusedPercent"),
        (json!({"refusedPercent": 0}), "abortWhen.refusedPercent"),
        (json!({"refusedPercent": 101}), "abortWhen.refusedPercent"),
        (json!({"refusedPercent": -5}), "abortWhen.refusedPercent"),
        (json!({"refusedPercent": 30.5}), "abortWhen.refusedPercent"),
        (json!({"refusedPercent": "30"}), "abortWhen.refusedPercent"),
        (
            json!({"refusedPercent": 30, "minFinished": 0}),
            "abortWhen.minFinished",
        ),
        (
            json!({"refusedPercent": 30, "minFinished": 100_001}),
            "abortWhen.minFinished",
        ),
        (
            json!({"refusedPercent": 30, "minFinished": 2.5}),
            "abortWhen.minFinished",
        ),
        (
            json!({"refusedPercent": 30, "minFinished": true}),
            "abortWhen.minFinished",
        ),
        (
            json!({"refusedPercent": 30, "percent": 30}),
            "abortWhen.percent",
        ),
    ] {
        let (s, e) = api
            .post("/campaigns", &autopilot_campaign([1], rule.clone()))
            .await;
        assert_eq!((s, e["field"].as_str()), (400, Some(field)), "{rule}: {e}");
    }
    // Nothing was made: no campaign, no request.
    let (_, page) = api.get("/campaigns").await;
    assert_eq!(page["campaigns"], json!([]), "{page}");
    assert_eq!(
        api.metric("caas_requests_total{state=\"created\"}").await,
        0.0
    );

    // minFinished defaults to 20; a null rule is no rule; the bounds are taken.
    let (s, b) = api
        .post(
            "/campaigns",
            &autopilot_campaign([1], json!({"refusedPercent": 100})),
        )
        .await;
    assert_eq!(s, 202, "{b}");
    let (_, c) = api
        .get(&format!("/campaigns/{}", b["campaignId"].as_str().unwrap()))
        .await;
    assert_eq!(
        c["abortWhen"],
        json!({"refusedPercent": 100, "minFinished": 20})
    );
    let (s, b) = api
        .post("/campaigns", &autopilot_campaign([1], Value::Null))
        .await;
    assert_eq!(s, 202, "{b}");
    let (_, c) = api
        .get(&format!("/campaigns/{}", b["campaignId"].as_str().unwrap()))
        .await;
    assert_eq!(
        (&c["abortWhen"], &c["abortedAt"], &c["abortReason"]),
        (&Value::Null, &Value::Null, &Value::Null),
        "{c}"
    );
    let edge = json!({"refusedPercent": 1, "minFinished": 100_000});
    let (s, b, _) = post_keyed(
        &api,
        "/campaigns",
        "k-1",
        &autopilot_campaign([1], edge.clone()),
    )
    .await;
    assert_eq!(s, 202, "{b}");
    let cid = b["campaignId"].clone();
    // A keyed repeat with another rule is another request: 422, as for any changed body;
    // with the same rule it is the same campaign.
    let other = json!({"refusedPercent": 2, "minFinished": 100_000});
    let (s, e, _) = post_keyed(&api, "/campaigns", "k-1", &autopilot_campaign([1], other)).await;
    assert_eq!(
        (s, e["field"].as_str()),
        (422, Some("Idempotency-Key")),
        "{e}"
    );
    let (s, b, replayed) = post_keyed(
        &api,
        "/campaigns",
        "k-1",
        &autopilot_campaign([1], edge.clone()),
    )
    .await;
    assert_eq!((s, replayed, &b["campaignId"]), (202, true, &cid), "{b}");
    let (_, c) = api
        .get(&format!("/campaigns/{}", cid.as_str().unwrap()))
        .await;
    assert_eq!(c["abortWhen"], edge);
    let (_, page) = api.get("/campaigns").await;
    assert_eq!(page["campaigns"].as_array().unwrap().len(), 3, "{page}");
    gw.shutdown().await;
}
