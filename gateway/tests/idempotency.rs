//! `Idempotency-Key` on the POSTs that start work: a repeat (a client that lost the answer)
//! gets the first request or campaign back and makes nothing new, across a restart and
//! when copies race; the key on another request is refused (422) and changes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

async fn created(api: &Api) -> f64 {
    api.metric("caas_requests_total{state=\"created\"}").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_request_with_its_key_is_the_first_one_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let gw = caas_gateway::start(config(dir.path(), Some(&hook)))
        .await
        .unwrap();
    let api = Api::new(gw.http_addr());
    let car = obeying_car(&gw, &api, 1).await;

    let body = activation(1, "power-boost", "power_boost");
    let (s, first, replayed) = post_keyed(&api, "/ota/activate", "order-17/line-1", &body).await;
    assert_eq!((s, replayed), (202, false), "{first}");
    let id = first["requestId"].as_str().unwrap().to_owned();

    // The same request again, its JSON laid out differently (a quoted key is the same key):
    // the first request, nothing new.
    let reordered: Value = json!({
        "duration": body["duration"],
        "configuration": body["configuration"],
        "serviceId": body["serviceId"],
        "vin": body["vin"],
    });
    let (s, again, replayed) =
        post_keyed(&api, "/ota/activate", "\"order-17/line-1\"", &reordered).await;
    assert_eq!((s, replayed), (202, true), "{again}");
    assert_eq!(again["requestId"], id.as_str());
    assert_eq!(again["timestamp"], first["timestamp"]);
    assert_eq!(created(&api).await, 1.0);

    let cb = hook.wait(&id, Duration::from_secs(15)).await;
    assert_eq!(cb.body["status"], "ACTIVATED");
    // Once final, a repeat says so.
    let (s, done, replayed) = post_keyed(&api, "/ota/activate", "order-17/line-1", &body).await;
    assert_eq!((s, replayed), (202, true), "{done}");
    assert_eq!(
        (&done["requestId"], &done["status"]),
        (&json!(id), &json!("COMPLETED"))
    );

    // The key on another request (another service, another route): 422 naming the header,
    // and nothing is made.
    let other = activation(1, "heated-seats", "heated_seats");
    let deactivation = json!({"vin": vin(1).to_string(), "serviceId": "power-boost"});
    for (path, b) in [
        ("/ota/activate", &other),
        ("/ota/deactivate", &deactivation),
    ] {
        let (s, e, _) = post_keyed(&api, path, "order-17/line-1", b).await;
        assert_eq!((s, &e["field"]), (422, &json!("Idempotency-Key")), "{e}");
    }
    // A malformed key: 400 naming the header.
    for bad in [String::new(), "k".repeat(256)] {
        let (s, e, _) = post_keyed(&api, "/ota/activate", &bad, &other).await;
        assert_eq!((s, &e["field"]), (400, &json!("Idempotency-Key")), "{e}");
    }
    assert_eq!(created(&api).await, 1.0);
    assert_eq!(
        car.seen.lock().unwrap().grants,
        ["power-boost"],
        "the refusals changed nothing"
    );

    // A request refused (unknown car) leaves its key free: once the car is known, the same
    // POST with the same key makes the request.
    let unknown = activation(9, "power-boost", "power_boost");
    let (s, e, _) = post_keyed(&api, "/ota/activate", "order-18", &unknown).await;
    assert_eq!((s, &e["field"]), (404, &json!("vin")), "{e}");
    api.register(9).await;
    let (s, made, replayed) = post_keyed(&api, "/ota/activate", "order-18", &unknown).await;
    assert_eq!((s, replayed), (202, false), "{made}");
    assert_eq!(created(&api).await, 2.0);
    assert_eq!(api.metric("caas_idempotent_replays_total").await, 2.0);

    // The key is durable with its request: after a restart a repeat still gets it.
    gw.shutdown().await;
    drop(car);
    let gw = caas_gateway::start(config(dir.path(), Some(&hook)))
        .await
        .unwrap();
    let api = Api::new(gw.http_addr());
    let (s, after, replayed) = post_keyed(&api, "/ota/activate", "order-17/line-1", &body).await;
    assert_eq!((s, replayed), (202, true), "{after}");
    assert_eq!(
        (&after["requestId"], &after["status"]),
        (&json!(id), &json!("COMPLETED"))
    );
    assert_eq!(created(&api).await, 0.0, "nothing made since the restart");
    assert_eq!(
        hook.for_request(&id).len(),
        1,
        "one callback for the request"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_a_keyed_post_racing_make_one_request_or_campaign() {
    let dir = tempfile::tempdir().unwrap();
    let gw = caas_gateway::start(config(dir.path(), None)).await.unwrap();
    let api = Api::new(gw.http_addr());
    let cars = 1..=40u32;
    for n in cars.clone() {
        api.register(n).await;
    }

    // Eight copies of one activation at once: one request.
    let body = activation(1, "power-boost", "power_boost");
    let answers = at_once(&api, 8, "/ota/activate", "a-1", &body).await;
    let ids: std::collections::BTreeSet<String> = answers
        .iter()
        .map(|(s, b, _)| {
            assert_eq!(*s, 202, "{b}");
            b["requestId"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1, "{answers:?}");
    assert_eq!(answers.iter().filter(|(_, _, r)| !r).count(), 1);
    assert_eq!(created(&api).await, 1.0);

    // Four copies of one campaign at once: one campaign, each car's request made once.
    let vins: Vec<String> = cars.clone().map(|n| vin(n).to_string()).collect();
    let campaign = json!({
        "vins": vins,
        "action": "ACTIVATE",
        "serviceId": "heated-seats",
        "configuration": {"featureFlags": ["heated_seats"], "parameters": {}},
        "duration": {"type": "PERMANENT"}
    });
    let answers = at_once(&api, 4, "/campaigns", "campaign-7", &campaign).await;
    let ids: std::collections::BTreeSet<String> = answers
        .iter()
        .map(|(s, b, _)| {
            assert_eq!(*s, 202, "{b}");
            assert_eq!(
                (b["total"].as_u64(), b["accepted"].as_u64()),
                (Some(40), Some(40)),
                "{b}"
            );
            b["campaignId"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1, "{answers:?}");
    assert_eq!(answers.iter().filter(|(_, _, r)| !r).count(), 1);
    assert_eq!(created(&api).await, 41.0);
    let cid = ids.into_iter().next().unwrap();
    let (s, c) = api.get(&format!("/campaigns/{cid}")).await;
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["counts"]["IN_PROGRESS"], 40, "{c}");
    let (s, again, replayed) = post_keyed(&api, "/campaigns", "campaign-7", &campaign).await;
    assert_eq!(
        (s, replayed, &again["campaignId"]),
        (202, true, &json!(cid))
    );

    // The campaign's key on a different campaign: refused, nothing made.
    let mut fewer = campaign.clone();
    fewer["vins"] = json!(&vins[..10]);
    let (s, e, _) = post_keyed(&api, "/campaigns", "campaign-7", &fewer).await;
    assert_eq!((s, &e["field"]), (422, &json!("Idempotency-Key")), "{e}");
    assert_eq!(created(&api).await, 41.0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_kept_as_long_as_requests_and_then_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Webhook::start(0).await;
    let mut c = config(dir.path(), Some(&hook));
    c.retention = Duration::from_secs(2);
    let gw = caas_gateway::start(c).await.unwrap();
    let api = Api::new(gw.http_addr());
    let _car = obeying_car(&gw, &api, 1).await;
    let (s, first, _) = post_keyed(
        &api,
        "/ota/activate",
        "k",
        &activation(1, "power-boost", "power_boost"),
    )
    .await;
    assert_eq!(s, 202, "{first}");
    hook.wait(
        first["requestId"].as_str().unwrap(),
        Duration::from_secs(15),
    )
    .await;

    // While kept, the key refuses another request; once pruned, it is free for one.
    let other = activation(1, "heated-seats", "heated_seats");
    let (s, e, _) = post_keyed(&api, "/ota/activate", "k", &other).await;
    assert_eq!((s, &e["field"]), (422, &json!("Idempotency-Key")), "{e}");
    let end = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (s, b, replayed) = post_keyed(&api, "/ota/activate", "k", &other).await;
        if s == 202 {
            assert!(!replayed, "{b}");
            assert_ne!(b["requestId"], first["requestId"]);
            break;
        }
        assert_eq!(s, 422, "{b}");
        assert!(std::time::Instant::now() < end, "the key was never pruned");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    gw.shutdown().await;
}

/// Sends `copies` copies of one keyed POST at once, each on its own task.
async fn at_once(
    api: &Api,
    copies: usize,
    path: &str,
    key: &str,
    body: &Value,
) -> Vec<(u16, Value, bool)> {
    let tasks: Vec<_> = (0..copies)
        .map(|_| {
            let (api, path, key, body) =
                (api.clone(), path.to_owned(), key.to_owned(), body.clone());
            tokio::spawn(async move { post_keyed(&api, &path, &key, &body).await })
        })
        .collect();
    let mut out = Vec::with_capacity(copies);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}
