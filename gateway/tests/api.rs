//! The IoT API's refusals: every bad input answers 4xx naming the field and changes nothing;
//! the OpenAPI document lists every route and exactly the answers the server gives.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let gw = caas_gateway::start(config(dir.path(), None)).await.unwrap();
    let api = Api::new(gw.http_addr());
    api.register(1).await;
    let v = vin(1).to_string();
    let good = activation(1, "power-boost", "power_boost");
    let with = |f: &dyn Fn(&mut Value)| {
        let mut b = good.clone();
        f(&mut b);
        b
    };
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "invalid VIN",
            with(&|b| b["vin"] = json!("IHGCM82633A004352")),
            400,
            "vin",
        ),
        (
            "VIN too short",
            with(&|b| b["vin"] = json!("123")),
            400,
            "vin",
        ),
        (
            "VIN not a string",
            with(&|b| b["vin"] = json!(5)),
            400,
            "vin",
        ),
        (
            "missing VIN",
            with(&|b| {
                b.as_object_mut().unwrap().remove("vin");
            }),
            400,
            "vin",
        ),
        (
            "unknown car",
            with(&|b| b["vin"] = json!(vin(77).to_string())),
            404,
            "vin",
        ),
        (
            "unknown field",
            with(&|b| b["colour"] = json!("red")),
            400,
            "colour",
        ),
        (
            "unknown nested field",
            with(&|b| b["duration"]["x"] = json!(1)),
            400,
            "duration.x",
        ),
        (
            "bad service id",
            with(&|b| b["serviceId"] = json!("a b")),
            400,
            "serviceId",
        ),
        (
            "no flags",
            with(&|b| b["configuration"]["featureFlags"] = json!([])),
            400,
            "configuration.featureFlags",
        ),
        (
            "bad flag",
            with(&|b| b["configuration"]["featureFlags"] = json!(["Power"])),
            400,
            "configuration.featureFlags[0]",
        ),
        (
            "bad parameter",
            with(&|b| b["configuration"]["parameters"] = json!({"a%": "1"})),
            400,
            "configuration.parameters.a%",
        ),
        (
            "bad duration type",
            with(&|b| b["duration"]["type"] = json!("FOREVER")),
            400,
            "duration.type",
        ),
        (
            "temporary without expiry",
            with(&|b| b["duration"] = json!({"type": "TEMPORARY"})),
            400,
            "duration.expiryDate",
        ),
        (
            "expiry not a date",
            with(&|b| b["duration"] = json!({"type": "TEMPORARY", "expiryDate": "tomorrow"})),
            400,
            "duration.expiryDate",
        ),
        (
            "expiry in the past",
            with(&|b| {
                b["duration"] = json!({"type": "TEMPORARY", "expiryDate": "2020-01-01T00:00:00Z"})
            }),
            400,
            "duration.expiryDate",
        ),
        (
            "autoRenewal not bool",
            with(&|b| b["duration"] = json!({"type": "SUBSCRIPTION", "autoRenewal": "yes"})),
            400,
            "duration.autoRenewal",
        ),
        (
            "missing duration",
            with(&|b| {
                b.as_object_mut().unwrap().remove("duration");
            }),
            400,
            "duration",
        ),
    ];
    for (what, body, status, field) in cases {
        let (s, b) = api.post("/ota/activate", &body).await;
        assert_eq!(s, status, "{what}: {b}");
        assert_eq!(b["field"], field, "{what}: {b}");
        assert!(
            b["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{what}: {b}"
        );
        assert!(b["error"].is_string(), "{what}");
    }
    let (s, b) = api.post_raw("/ota/activate", b"{not json".to_vec()).await;
    assert_eq!((s, b["field"].as_str()), (400, Some("body")));
    let (s, b) = api.post_raw("/ota/activate", b"[1]".to_vec()).await;
    assert_eq!((s, b["field"].as_str()), (400, Some("body")));
    let big = format!(
        "{{\"vin\":\"{}\"}}",
        "x".repeat(caas_gateway::api::MAX_BODY_BYTES)
    );
    let (s, b) = api.post_raw("/ota/activate", big.into_bytes()).await;
    assert_eq!((s, b["field"].as_str()), (413, Some("body")));
    let (s, b) = api
        .post(
            "/ota/deactivate",
            &json!({"vin": v, "serviceId": "never-active"}),
        )
        .await;
    assert_eq!((s, b["field"].as_str()), (409, Some("serviceId")));

    // Provisioning.
    let key1 = caas_protocol::verifying_key_to_hex(&car_key(1).verifying_key()).to_string();
    let key2 = caas_protocol::verifying_key_to_hex(&car_key(2).verifying_key()).to_string();
    let (s, b) = api
        .post(
            "/vehicles",
            &json!({"vin": v, "publicKey": key2, "platform": "mqb-evo"}),
        )
        .await;
    assert_eq!((s, b["field"].as_str()), (409, Some("publicKey")));
    let (s, _) = api
        .post(
            "/vehicles",
            &json!({"vin": v, "publicKey": key1, "platform": "mqb-evo"}),
        )
        .await;
    assert_eq!(s, 200, "same key is idempotent");
    let (s, b) = api
        .post(
            "/vehicles",
            &json!({"vin": vin(2).to_string(), "publicKey": "zz", "platform": "p"}),
        )
        .await;
    assert_eq!((s, b["field"].as_str()), (400, Some("publicKey")));
    let (s, b) = api
        .post(
            "/vehicles",
            &json!({"vin": vin(2).to_string(), "publicKey": key2, "platform": ""}),
        )
        .await;
    assert_eq!((s, b["field"].as_str()), (400, Some("platform")));

    // Reads.
    let (s, b) = api.get("/ota/requests/not-a-uuid").await;
    assert_eq!((s, b["field"].as_str()), (400, Some("requestId")));
    let (s, b) = api
        .get("/ota/requests/00000000-0000-4000-8000-000000000000")
        .await;
    assert_eq!((s, b["field"].as_str()), (404, Some("requestId")));
    let (s, b) = api.get("/vehicles/BAD/status").await;
    assert_eq!((s, b["field"].as_str()), (400, Some("vin")));
    let (s, b) = api.get(&format!("/vehicles/{}/status", vin(8))).await;
    assert_eq!((s, b["field"].as_str()), (404, Some("vin")));
    let (s, b) = api.get(&format!("/vehicles/{v}/history?limit=0")).await;
    assert_eq!((s, b["field"].as_str()), (400, Some("limit")));
    let (s, b) = api.get(&format!("/vehicles/{v}/history?before=x")).await;
    assert_eq!((s, b["field"].as_str()), (400, Some("before")));
    let (s, b) = api
        .post(
            "/campaigns",
            &json!({"vins": [v, "BAD"], "action": "DEACTIVATE", "serviceId": "x"}),
        )
        .await;
    assert_eq!((s, b["field"].as_str()), (400, Some("vins[1]")));
    let (s, b) = api
        .post(
            "/campaigns",
            &json!({"vins": [v, v], "action": "DEACTIVATE", "serviceId": "x"}),
        )
        .await;
    assert_eq!((s, b["field"].as_str()), (400, Some("vins[1]")));
    let (s, b) = api
        .post(
            "/campaigns",
            &json!({"vins": [v], "action": "DELETE", "serviceId": "x"}),
        )
        .await;
    assert_eq!((s, b["field"].as_str()), (400, Some("action")));

    // Nothing above changed anything: no request, no grant.
    assert_eq!(
        api.metric("caas_requests_total{state=\"created\"}").await,
        0.0
    );
    let (_, st) = api.get(&format!("/vehicles/{v}/status")).await;
    assert!(st["activeServices"].as_array().unwrap().is_empty());

    // Auth.
    let r = api
        .http
        .get(format!("{}/keys", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["field"], "Authorization");
    let r = api
        .http
        .get(format!("{}/healthz", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (s, k) = api.get("/keys").await;
    assert_eq!(s, 200);
    assert_eq!(k["keys"][0]["publicKey"], gw.public_key_hex());
    assert_eq!(k["keys"][0]["keyId"], gw.key_id());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_token_rotation_both_tokens_work_and_the_old_ones_uses_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), None);
    c.api_token = "new-token".into();
    c.api_token_previous = Some(TOKEN.into());
    let gw = caas_gateway::start(c).await.unwrap();
    let old = Api::new(gw.http_addr());
    let get = |token: &'static str, path: &'static str| {
        let (http, base) = (old.http.clone(), old.base.clone());
        async move {
            let r = http
                .get(format!("{base}{path}"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let uses = || async {
        let (s, text) = get("new-token", "/metrics").await;
        assert_eq!(s, 200);
        text.lines()
            .find_map(|l| l.strip_prefix("caas_api_previous_token_uses_total "))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap()
    };
    assert_eq!(uses().await, 0);
    old.register(1).await;
    assert_eq!(old.get("/keys").await.0, 200);
    assert_eq!(get("new-token", "/keys").await.0, 200);
    let (s, b) = get("neither-token", "/keys").await;
    assert_eq!(s, 401, "{b}");
    assert_eq!(
        uses().await,
        2,
        "the old token's two uses, not the new one's"
    );
    gw.shutdown().await;
}

/// A body of `n` bytes: `json` padded with spaces, still valid JSON.
fn padded(json: &Value, n: usize) -> Vec<u8> {
    let mut b = serde_json::to_vec(json).unwrap();
    assert!(b.len() <= n);
    b.resize(n, b' ');
    b
}

fn key_hex(n: u32) -> String {
    caas_protocol::verifying_key_to_hex(&car_key(n).verifying_key()).to_string()
}

/// What a refusal must change nothing of: the car's status and history, the request, and
/// how many requests were ever created.
async fn snapshot(api: &Api, n: u32, request_id: &str) -> (Value, Value, Value, f64) {
    let (s, status) = api.get(&format!("/vehicles/{}/status", vin(n))).await;
    assert_eq!(s, 200, "{status}");
    let (s, history) = api
        .get(&format!("/vehicles/{}/history?limit=500", vin(n)))
        .await;
    assert_eq!(s, 200, "{history}");
    let (s, request) = api.get(&format!("/ota/requests/{request_id}")).await;
    assert_eq!(s, 200, "{request}");
    let created = api.metric("caas_requests_total{state=\"created\"}").await;
    (status, history, request, created)
}

/// A gateway whose requests stay in flight for the whole test (no car connects, and the
/// first attempt waits a minute), so that nothing moves unless a request changes it.
async fn still_gateway(dir: &std::path::Path) -> (caas_gateway::Gateway, Api) {
    let mut cfg = config(dir, None);
    cfg.retry.attempt_timeout = Duration::from_secs(60);
    let gw = caas_gateway::start(cfg).await.unwrap();
    let api = Api::new(gw.http_addr());
    (gw, api)
}

/// The value of `caas_http_responses_total` for `route` and `code`.
async fn responses(api: &Api, route: &str, code: &str) -> f64 {
    api.metric(&format!(
        "caas_http_responses_total{{route=\"{route}\",code=\"{code}\"}}"
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_counted_by_route_and_status_class_and_bad_tokens_apart() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, api) = still_gateway(dir.path()).await;
    api.register(1).await;
    api.activate(1, "power-boost", "power_boost").await;
    api.activate(1, "snow-mode", "snow_mode").await;
    let (s, _) = api.post("/ota/activate", &json!({"vin": "nope"})).await;
    assert_eq!(s, 400);
    let (s, _) = api.get(&format!("/vehicles/{}/status", vin(2))).await;
    assert_eq!(s, 404);
    for token in ["wrong", ""] {
        let r = api
            .http
            .get(format!("{}/keys", api.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401);
    }

    assert_eq!(responses(&api, "/ota/activate", "2xx").await, 2.0);
    assert_eq!(responses(&api, "/ota/activate", "4xx").await, 1.0);
    assert_eq!(responses(&api, "/ota/activate", "5xx").await, 0.0);
    assert_eq!(responses(&api, "/vehicles", "2xx").await, 1.0);
    assert_eq!(responses(&api, "/vehicles/{vin}/status", "4xx").await, 1.0);
    assert_eq!(responses(&api, "/keys", "4xx").await, 2.0);
    assert_eq!(api.metric("caas_api_unauthorized_total").await, 2.0);
    // The seven scrapes above; this one's own answer is counted once it is sent.
    assert_eq!(responses(&api, "/metrics", "2xx").await, 7.0);
    assert_eq!(responses(&api, "other", "2xx").await, 0.0);
    gw.shutdown().await;
}

fn assert_refusal(what: &str, got: (u16, Value), status: u16, field: &str) {
    let (s, b) = got;
    assert_eq!(s, status, "{what}: {b}");
    assert_eq!(b["field"], field, "{what}: {b}");
    assert!(
        b["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what}: {b}"
    );
    assert!(
        b["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{what}: {b}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deactivation_and_provisioning_refusals_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, api) = still_gateway(dir.path()).await;
    api.register(1).await;
    let rid = api.activate(1, "power-boost", "power_boost").await;
    let v = vin(1).to_string();
    let before = snapshot(&api, 1, &rid).await;
    assert_eq!(before.0["activeServices"][0]["serviceId"], "power-boost");
    assert_eq!(before.3, 1.0);

    let raw: Vec<(&str, &[u8], &str)> = vec![
        ("malformed JSON", b"{\"vin\": ", "body"),
        ("not an object", b"[\"vin\"]", "body"),
        ("empty body", b"", "body"),
    ];
    for (what, body, field) in raw {
        let got = api.post_raw("/ota/deactivate", body.to_vec()).await;
        assert_refusal(what, got, 400, field);
        assert_eq!(
            snapshot(&api, 1, &rid).await,
            before,
            "{what} changed something"
        );
    }
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "unknown field",
            json!({"vin": v, "serviceId": "power-boost", "force": true}),
            400,
            "force",
        ),
        (
            "invalid VIN",
            json!({"vin": "IHGCM82633A004352", "serviceId": "power-boost"}),
            400,
            "vin",
        ),
        (
            "VIN not a string",
            json!({"vin": 17, "serviceId": "power-boost"}),
            400,
            "vin",
        ),
        (
            "missing VIN",
            json!({"serviceId": "power-boost"}),
            400,
            "vin",
        ),
        (
            "unknown car",
            json!({"vin": vin(77).to_string(), "serviceId": "power-boost"}),
            404,
            "vin",
        ),
        ("missing service", json!({"vin": v}), 400, "serviceId"),
        (
            "bad service id",
            json!({"vin": v, "serviceId": "power boost"}),
            400,
            "serviceId",
        ),
        (
            "service not active",
            json!({"vin": v, "serviceId": "snow-mode"}),
            409,
            "serviceId",
        ),
    ];
    for (what, body, status, field) in cases {
        assert_refusal(
            what,
            api.post("/ota/deactivate", &body).await,
            status,
            field,
        );
        assert_eq!(
            snapshot(&api, 1, &rid).await,
            before,
            "{what} changed something"
        );
    }
    let big = padded(
        &json!({"vin": v, "serviceId": "power-boost"}),
        caas_gateway::api::MAX_BODY_BYTES + 1,
    );
    assert_refusal(
        "deactivation body over the limit",
        api.post_raw("/ota/deactivate", big).await,
        413,
        "body",
    );
    assert_eq!(snapshot(&api, 1, &rid).await, before);

    // Provisioning: an unknown field refuses the whole car, new or known.
    let v2 = vin(2).to_string();
    let vehicle_cases: Vec<(&str, Value, &str)> = vec![
        (
            "unknown field",
            json!({"vin": v2, "publicKey": key_hex(2), "platform": "mqb-evo", "colour": "red"}),
            "colour",
        ),
        (
            "unknown field on a known car with another key",
            json!({"vin": v, "publicKey": key_hex(2), "platform": "mqb-evo", "colour": "red"}),
            "colour",
        ),
        (
            "firmware version not a string",
            json!({"vin": v2, "publicKey": key_hex(2), "platform": "mqb-evo", "firmwareVersion": 3}),
            "firmwareVersion",
        ),
    ];
    for (what, body, field) in vehicle_cases {
        assert_refusal(what, api.post("/vehicles", &body).await, 400, field);
    }
    assert_refusal(
        "malformed vehicle",
        api.post_raw("/vehicles", b"{\"vin\"".to_vec()).await,
        400,
        "body",
    );
    let (s, b) = api.get(&format!("/vehicles/{v2}/status")).await;
    assert_eq!((s, b["field"].as_str()), (404, Some("vin")), "car 2 got in");
    // Car 1 still has its own key: registering it again with that key is a no-op (200).
    let (s, b) = api
        .post(
            "/vehicles",
            &json!({"vin": v, "publicKey": key_hex(1), "platform": "mqb-evo", "firmwareVersion": "1.0.0"}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["publicKey"], key_hex(1));
    assert_eq!(snapshot(&api, 1, &rid).await, before);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_body_over_its_limit_is_refused_and_100000_vins_fit_in_one_call() {
    use caas_gateway::api::MAX_CAMPAIGN_BODY_BYTES;
    let dir = tempfile::tempdir().unwrap();
    let (gw, api) = still_gateway(dir.path()).await;
    for n in 1..=3 {
        api.register(n).await;
    }
    let rid = api.activate(1, "power-boost", "power_boost").await;
    let before = snapshot(&api, 1, &rid).await;
    let small = json!({
        "vins": [vin(1).to_string(), vin(2).to_string(), vin(3).to_string()],
        "action": "ACTIVATE",
        "serviceId": "snow-mode",
        "configuration": {"featureFlags": ["snow_mode"]},
        "duration": {"type": "PERMANENT"}
    });

    // A valid campaign one byte over the limit: refused for its size alone.
    let (s, b) = api
        .post_raw("/campaigns", padded(&small, MAX_CAMPAIGN_BODY_BYTES + 1))
        .await;
    assert_refusal("campaign over the limit", (s, b.clone()), 413, "body");
    assert!(
        b["reason"]
            .as_str()
            .unwrap()
            .contains(&MAX_CAMPAIGN_BODY_BYTES.to_string()),
        "{b}"
    );
    assert_eq!(
        snapshot(&api, 1, &rid).await,
        before,
        "the 413 changed car 1"
    );
    for n in 2..=3 {
        let (_, st) = api.get(&format!("/vehicles/{}/status", vin(n))).await;
        assert_eq!(st["activeServices"], json!([]), "the 413 changed car {n}");
    }
    // The same campaign at exactly the limit is taken.
    let (s, b) = api
        .post_raw("/campaigns", padded(&small, MAX_CAMPAIGN_BODY_BYTES))
        .await;
    assert_eq!((s, b["accepted"].as_u64()), (202, Some(3)), "{b}");

    // 100,000 VINs in one call. Only cars 1-3 are registered: the others are refused one by
    // one (counted, the first 100 listed) without refusing the campaign, and get nothing.
    let total = 100_000u32;
    let vins: Vec<String> = (1..=total).map(|n| vin(n).to_string()).collect();
    let body = json!({"vins": vins, "action": "DEACTIVATE", "serviceId": "snow-mode"});
    let started = Instant::now();
    let (s, b) = api.post("/campaigns", &body).await;
    let took = started.elapsed();
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["total"], total);
    assert_eq!(b["accepted"], 3);
    assert_eq!(b["refusedCount"], total - 3);
    let refused = b["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 100);
    let registered: Vec<String> = (1..=3).map(|n| vin(n).to_string()).collect();
    let listed: BTreeSet<&str> = refused.iter().filter_map(|r| r["vin"].as_str()).collect();
    assert_eq!(listed.len(), 100, "{refused:?}");
    assert!(listed.iter().all(|v| !registered.iter().any(|r| r == v)));
    assert!(refused.iter().all(|r| r["reason"]
        .as_str()
        .is_some_and(|r| r.contains("no vehicle"))));
    assert!(took < Duration::from_secs(20), "took {took:?}");
    let id = b["campaignId"].as_str().unwrap();
    let (s, c) = api.get(&format!("/campaigns/{id}")).await;
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["total"], total);
    assert_eq!(c["action"], "DEACTIVATE");
    assert_eq!(
        c["counts"],
        json!({"QUEUED": 0, "IN_PROGRESS": 3, "COMPLETED": 0, "FAILED": 0})
    );
    // One request per registered car in each campaign and none for the rest.
    assert_eq!(
        api.metric("caas_requests_total{state=\"created\"}").await,
        1.0 + 3.0 + 3.0
    );
    let (s, _) = api.get(&format!("/vehicles/{}/status", vin(50_000))).await;
    assert_eq!(s, 404);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_refusals_are_json_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, api) = still_gateway(dir.path()).await;
    api.register(1).await;
    let rid = api.activate(1, "power-boost", "power_boost").await;
    let before = snapshot(&api, 1, &rid).await;
    let v = vin(1).to_string();
    let send = |method: reqwest::Method, path: String| {
        let api = api.clone();
        async move {
            let r = api
                .http
                .request(method, format!("{}{path}", api.base))
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let ctype = r.headers().get("content-type").cloned();
            let allow = r
                .headers()
                .get("allow")
                .map(|a| a.to_str().unwrap().to_owned());
            let body: Value = r.json().await.unwrap_or(Value::Null);
            assert_eq!(
                ctype.as_ref().map(|c| c.to_str().unwrap()),
                Some("application/json"),
                "{path}: {body}"
            );
            (status, body, allow)
        }
    };
    use reqwest::Method as M;
    for (method, path, status, field, allow) in [
        (M::GET, "/nowhere".to_owned(), 404, "path", None),
        (M::POST, "/ota/activate/".to_owned(), 404, "path", None),
        (
            M::GET,
            "/ota/activate".to_owned(),
            405,
            "method",
            Some("POST"),
        ),
        (
            M::DELETE,
            format!("/vehicles/{v}/status"),
            405,
            "method",
            Some("GET,HEAD"),
        ),
        (
            M::PUT,
            "/vehicles".to_owned(),
            405,
            "method",
            Some("POST,GET,HEAD"),
        ),
        (
            M::POST,
            format!("/ota/requests/{rid}"),
            405,
            "method",
            Some("GET,HEAD"),
        ),
        (M::POST, "/keys".to_owned(), 405, "method", Some("GET,HEAD")),
        // Not UTF-8 once percent-decoded: axum's own rejection, in our shape.
        (M::GET, "/vehicles/%FF/status".to_owned(), 400, "vin", None),
        (M::GET, "/vehicles/%FF/history".to_owned(), 400, "vin", None),
        (
            M::GET,
            "/ota/requests/%FF".to_owned(),
            400,
            "requestId",
            None,
        ),
        (
            M::GET,
            "/campaigns/%C3%28".to_owned(),
            400,
            "campaignId",
            None,
        ),
    ] {
        let what = format!("{method} {path}");
        let (s, b, a) = send(method, path.clone()).await;
        assert_refusal(&what, (s, b.clone()), status, field);
        assert_eq!(a.as_deref(), allow, "{what}: Allow");
        if status == 404 {
            assert!(b["reason"].as_str().unwrap().contains(&path), "{what}: {b}");
        }
        assert_eq!(
            snapshot(&api, 1, &rid).await,
            before,
            "{what} changed something"
        );
    }
    // A wrong method is refused before the token is asked for, but never served.
    let r = api
        .http
        .delete(format!("{}/vehicles/{v}/status", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    gw.shutdown().await;
}

// ---------- the OpenAPI document, checked against the server's real answers ----------

/// Every documented route and method (the README's table).
const ROUTES: [(&str, &str); 20] = [
    ("/healthz", "get"),
    ("/ota/activate", "post"),
    ("/ota/deactivate", "post"),
    ("/ota/requests/{requestId}", "get"),
    ("/ota/requests/{requestId}/cancel", "post"),
    ("/vehicles", "post"),
    ("/vehicles", "get"),
    ("/vehicles/{vin}", "delete"),
    ("/vehicles/{vin}/status", "get"),
    ("/vehicles/{vin}/history", "get"),
    ("/vehicles/{vin}/key", "post"),
    ("/campaigns", "post"),
    ("/campaigns", "get"),
    ("/campaigns/{campaignId}", "get"),
    ("/campaigns/{campaignId}/cancel", "post"),
    ("/campaigns/{campaignId}/requests", "get"),
    ("/support/tickets", "get"),
    ("/keys", "get"),
    ("/metrics", "get"),
    ("/openapi.json", "get"),
];

/// Documented statuses this in-process test does not bring about: a storage failure (500;
/// `tests/brokers.rs` drives one in a gateway process under a file-size limit), an engine
/// stopping under a request (503), or a campaign whose idempotency key another copy is
/// taking over at that moment (409; `tests/idempotency.rs` races copies).
fn not_driven(route: &str, status: &str) -> bool {
    matches!(status, "500" | "503") || (route, status) == ("/campaigns", "409")
}

/// Checks answers against the document and keeps which (route, method, status) it saw.
struct Contract {
    doc: Value,
    seen: BTreeSet<(String, String, String)>,
    /// Sent as `Idempotency-Key` while set.
    key: Option<String>,
}

impl Contract {
    /// Sends `body` as JSON with the token to `path`, a concrete form of `route`; when the
    /// server takes the body, the documented request schema must take it too.
    async fn call(
        &mut self,
        api: &Api,
        method: &str,
        route: &str,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let raw = body.map(|b| serde_json::to_vec(b).unwrap());
        let (s, answer) = self.exchange(api, method, route, path, raw, true).await;
        if let (true, Some(b)) = ((200..300).contains(&s), body) {
            let schema = &self.doc["paths"][route][method]["requestBody"]["content"]
                ["application/json"]["schema"];
            assert!(schema.is_object(), "{method} {route}: no request schema");
            if let Err(e) = validate(&self.doc, schema, b, "request") {
                panic!("{method} {route} took a body its documented schema refuses: {e}\n{b}");
            }
        }
        (s, answer)
    }

    /// One exchange: the status must be documented for `route` and the answer must validate
    /// against that status's schema.
    async fn exchange(
        &mut self,
        api: &Api,
        method: &str,
        route: &str,
        path: &str,
        body: Option<Vec<u8>>,
        token: bool,
    ) -> (u16, Value) {
        let url = format!("{}{path}", api.base);
        let mut req = match method {
            "get" => api.http.get(url),
            "post" => api.http.post(url),
            "delete" => api.http.delete(url),
            _ => panic!("no {method} route is documented"),
        };
        if token {
            req = req.bearer_auth(TOKEN);
        }
        if let Some(k) = &self.key {
            req = req.header("Idempotency-Key", k);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let ctype = r
            .headers()
            .get("content-type")
            .map(|c| c.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let bytes = r.bytes().await.unwrap();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let what = format!("{method} {path} ({route}) answered {status}");
        let documented = &self.doc["paths"][route][method]["responses"][status.to_string()];
        assert!(
            documented.is_object(),
            "{what}, which the document does not list: {text:.300}"
        );
        let content = documented["content"].as_object().unwrap();
        let answer = if let Some(json) = content.get("application/json") {
            assert!(ctype.starts_with("application/json"), "{what} as {ctype}");
            let v: Value = serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text:.300}"));
            if let Err(e) = validate(&self.doc, &json["schema"], &v, "answer") {
                panic!("{what}, not as documented: {e}\n{v}");
            }
            v
        } else {
            assert!(
                content.contains_key("text/plain"),
                "{what}: no content type"
            );
            assert!(ctype.starts_with("text/plain"), "{what} as {ctype}");
            Value::String(text)
        };
        self.seen
            .insert((route.to_owned(), method.to_owned(), status.to_string()));
        (status, answer)
    }

    fn assert_every_documented_status_seen(&self) {
        let mut missing = Vec::new();
        for (route, method) in ROUTES {
            let responses = self.doc["paths"][route][method]["responses"]
                .as_object()
                .unwrap();
            for status in responses.keys() {
                let key = (route.to_owned(), method.to_owned(), status.clone());
                if !self.seen.contains(&key) && !not_driven(route, status) {
                    missing.push(format!("{method} {route} {status}"));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "documented but never answered: {missing:?}"
        );
    }
}

/// The subset of OpenAPI 3.0 schemas the document uses: `$ref`, `nullable`, `type`, `enum`,
/// `oneOf`, `required`, `properties`, `additionalProperties`, `items` and the bounds, the
/// `date-time` and `uuid` formats and patterns of the form `^[class]{m,n}$`.
fn validate(doc: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r
            .strip_prefix("#/components/schemas/")
            .ok_or_else(|| format!("{at}: unknown reference {r}"))?;
        let target = &doc["components"]["schemas"][name];
        if !target.is_object() {
            return Err(format!("{at}: dangling reference {r}"));
        }
        return validate(doc, target, v, at);
    }
    if v.is_null() {
        return if schema["nullable"] == true {
            Ok(())
        } else {
            Err(format!("{at}: null, which the schema does not allow"))
        };
    }
    if let Some(alts) = schema.get("oneOf").and_then(Value::as_array) {
        let n = alts
            .iter()
            .filter(|s| validate(doc, s, v, at).is_ok())
            .count();
        if n != 1 {
            return Err(format!("{at}: {v} matches {n} of oneOf, not one"));
        }
    }
    if let Some(t) = schema.get("type").and_then(Value::as_str) {
        let ok = match t {
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "object" => v.is_object(),
            "array" => v.is_array(),
            _ => return Err(format!("{at}: unknown type {t}")),
        };
        if !ok {
            return Err(format!("{at}: {v} is not of type {t}"));
        }
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return Err(format!("{at}: {v} is not one of {e:?}"));
        }
    }
    let bound = |k: &str| schema.get(k).and_then(Value::as_u64);
    match v {
        Value::String(s) => {
            if bound("maxLength").is_some_and(|m| s.chars().count() as u64 > m) {
                return Err(format!("{at}: {s:?} is too long"));
            }
            if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
                if !matches_pattern(p, s) {
                    return Err(format!("{at}: {s:?} does not match {p}"));
                }
            }
            let format_ok = match schema.get("format").and_then(Value::as_str) {
                Some("date-time") => {
                    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                        .is_ok()
                }
                Some("uuid") => caas_gateway::parse_request_id(s).is_some(),
                _ => true,
            };
            if !format_ok {
                return Err(format!("{at}: {s:?} is not a {}", schema["format"]));
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().unwrap();
            if schema["minimum"].as_f64().is_some_and(|m| x < m)
                || schema["maximum"].as_f64().is_some_and(|m| x > m)
            {
                return Err(format!("{at}: {x} is out of bounds"));
            }
        }
        Value::Array(a) => {
            if bound("minItems").is_some_and(|m| (a.len() as u64) < m)
                || bound("maxItems").is_some_and(|m| a.len() as u64 > m)
            {
                return Err(format!("{at}: {} items is out of bounds", a.len()));
            }
            if schema["uniqueItems"] == true
                && a.iter().enumerate().any(|(i, x)| a[..i].contains(x))
            {
                return Err(format!("{at}: items repeat"));
            }
            if let Some(items) = schema.get("items") {
                for (i, x) in a.iter().enumerate() {
                    validate(doc, items, x, &format!("{at}[{i}]"))?;
                }
            }
        }
        Value::Object(m) => {
            if bound("maxProperties").is_some_and(|n| m.len() as u64 > n) {
                return Err(format!("{at}: too many properties"));
            }
            for r in schema["required"].as_array().into_iter().flatten() {
                let r = r.as_str().unwrap();
                if !m.contains_key(r) {
                    return Err(format!("{at}: required {r} is missing"));
                }
            }
            let props = schema["properties"].as_object();
            for (k, x) in m {
                let at = format!("{at}.{k}");
                match (
                    props.and_then(|p| p.get(k)),
                    &schema["additionalProperties"],
                ) {
                    (Some(s), _) => validate(doc, s, x, &at)?,
                    (None, Value::Bool(false)) => {
                        return Err(format!("{at}: not a documented property"))
                    }
                    (None, extra @ Value::Object(_)) => validate(doc, extra, x, &at)?,
                    (None, _) => {}
                }
            }
        }
        Value::Bool(_) | Value::Null => {}
    }
    Ok(())
}

/// `^[class]{n}$`, `^[class]{m,n}$` or `^[class]+$`, with ranges and single characters in
/// the class; any other form fails the test, so the document cannot outgrow the check.
fn matches_pattern(pattern: &str, s: &str) -> bool {
    let inner = pattern
        .strip_prefix("^[")
        .and_then(|p| p.strip_suffix('$'))
        .unwrap_or_else(|| panic!("pattern form not understood: {pattern}"));
    let (class, repeat) = inner.rsplit_once(']').unwrap();
    let (min, max) = if repeat == "+" {
        (1, usize::MAX)
    } else {
        let r = repeat
            .strip_prefix('{')
            .and_then(|r| r.strip_suffix('}'))
            .unwrap_or_else(|| panic!("pattern form not understood: {pattern}"));
        match r.split_once(',') {
            Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
            None => (r.parse().unwrap(), r.parse().unwrap()),
        }
    };
    let c: Vec<char> = class.chars().collect();
    let in_class = |ch: char| {
        let mut i = 0;
        while i < c.len() {
            if i + 2 < c.len() && c[i + 1] == '-' {
                if (c[i]..=c[i + 2]).contains(&ch) {
                    return true;
                }
                i += 3;
            } else {
                if c[i] == ch {
                    return true;
                }
                i += 1;
            }
        }
        false
    };
    let n = s.chars().count();
    (min..=max).contains(&n) && s.chars().all(in_class)
}

#[test]
fn the_schema_check_catches_what_it_should() {
    let doc = json!({ "components": { "schemas": { "E": { "type": "object", "required": ["a"],
        "additionalProperties": false, "properties": {
            "a": { "type": "string", "pattern": "^[A-HJ-NPR-Z0-9]{17}$" },
            "b": { "type": "integer", "nullable": true },
            "c": { "type": "object", "additionalProperties": { "oneOf": [{ "type": "string" }, { "type": "number" }] } } } } } } });
    let e = json!({ "$ref": "#/components/schemas/E" });
    let ok = |v: Value| validate(&doc, &e, &v, "x");
    assert!(ok(json!({"a": "WVWZZZ1JZXW000001", "b": null, "c": {"k": 1, "l": "s"}})).is_ok());
    assert!(
        ok(json!({"a": "WVWZZZ1JZXW00000I"})).is_err(),
        "I is not a VIN letter"
    );
    assert!(
        ok(json!({"a": "WVWZZZ1JZXW00001"})).is_err(),
        "16 characters"
    );
    assert!(ok(json!({})).is_err(), "required a");
    assert!(
        ok(json!({"a": "WVWZZZ1JZXW000001", "z": 1})).is_err(),
        "unknown z"
    );
    assert!(
        ok(json!({"a": "WVWZZZ1JZXW000001", "b": "1"})).is_err(),
        "b a string"
    );
    assert!(
        ok(json!({"a": "WVWZZZ1JZXW000001", "c": {"k": true}})).is_err(),
        "no alternative"
    );
    assert!(matches_pattern("^[A-Za-z0-9_.:-]{1,32}$", "a-b.c:d_E"));
    assert!(!matches_pattern("^[A-Za-z0-9_.:-]{1,32}$", "a b"));
    assert!(matches_pattern("^[0-9]+$", "123") && !matches_pattern("^[0-9]+$", ""));
}

/// Waits (bounded) until request `id` completes, checking every answer on the way.
async fn wait_completed(c: &mut Contract, api: &Api, id: &str) -> Value {
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let path = format!("/ota/requests/{id}");
        let (s, r) = c
            .call(api, "get", "/ota/requests/{requestId}", &path, None)
            .await;
        assert_eq!(s, 200, "{r}");
        match r["status"].as_str().unwrap() {
            "COMPLETED" => return r,
            "FAILED" => panic!("request {id} failed: {r}"),
            _ => {}
        }
        assert!(Instant::now() < end, "request {id} did not complete: {r}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_matches_what_the_server_answers() {
    use caas_gateway::api::{MAX_BODY_BYTES, MAX_CAMPAIGN_BODY_BYTES};
    let dir = tempfile::tempdir().unwrap();
    let gw = caas_gateway::start(config(dir.path(), None)).await.unwrap();
    let api = Api::new(gw.http_addr());
    let (s, doc) = api.get("/openapi.json").await;
    assert_eq!(s, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.0."));
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(p, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(|m| (p.clone(), m.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    let expected: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(p, m)| (p.to_string(), m.to_string()))
        .collect();
    assert_eq!(documented, expected);
    let mut c = Contract {
        doc,
        seen: BTreeSet::new(),
        key: None,
    };
    let zero = "00000000-0000-4000-8000-000000000000";
    let (v1, v2, unknown) = (vin(1).to_string(), vin(2).to_string(), vin(9).to_string());

    // Each route exists (a path nothing serves answers 404 without asking for the token)
    // and all but /healthz need the token.
    for (route, method) in ROUTES {
        let path = route
            .replace("{vin}", &v1)
            .replace("{requestId}", zero)
            .replace("{campaignId}", zero);
        let body = (method == "post").then(|| b"{}".to_vec());
        let (s, b) = c.exchange(&api, method, route, &path, body, false).await;
        let want = if route == "/healthz" { 200 } else { 401 };
        assert_eq!(s, want, "{method} {route}: {b}");
        if s == 401 {
            assert_eq!(b["field"], "Authorization");
        }
    }
    for route in ["/healthz", "/openapi.json", "/keys", "/metrics"] {
        let (s, b) = c.call(&api, "get", route, route, None).await;
        assert_eq!(s, 200, "{route}: {b}");
    }
    let (_, keys) = c.call(&api, "get", "/keys", "/keys", None).await;
    assert_eq!(keys["keys"][0]["publicKey"], gw.public_key_hex());
    let (_, text) = c.call(&api, "get", "/metrics", "/metrics", None).await;
    for name in [
        "caas_requests_total",
        "caas_attempts_total",
        "caas_activation_latency_seconds_bucket",
        "caas_accept_seconds_bucket",
        "caas_callback_delivery_seconds_bucket",
        "caas_store_flush_seconds_bucket",
        "caas_connected_cars",
        "caas_reports_refused_total",
        "caas_reports_forged_total",
        "caas_webhook_deliveries_total",
        "caas_webhook_failures_total",
    ] {
        assert!(text.as_str().unwrap().contains(name), "{name} missing");
    }

    // Provisioning; car 1 gives no firmware version, so the answer carries a null one.
    let car1 = json!({"vin": v1, "publicKey": key_hex(1), "platform": "mqb-evo"});
    let (s, b) = c
        .call(&api, "post", "/vehicles", "/vehicles", Some(&car1))
        .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["firmwareVersion"], Value::Null);
    let (s, _) = c
        .call(&api, "post", "/vehicles", "/vehicles", Some(&car1))
        .await;
    assert_eq!(s, 200);
    let car2 = json!({"vin": v2, "publicKey": key_hex(2), "platform": "mqb-evo", "firmwareVersion": "2.1.0"});
    let (s, _) = c
        .call(&api, "post", "/vehicles", "/vehicles", Some(&car2))
        .await;
    assert_eq!(s, 201);
    let other_key = json!({"vin": v1, "publicKey": key_hex(2), "platform": "mqb-evo"});
    let (s, _) = c
        .call(&api, "post", "/vehicles", "/vehicles", Some(&other_key))
        .await;
    assert_eq!(s, 409);
    let bad = json!({"vin": v1, "publicKey": key_hex(1), "platform": ""});
    let (s, _) = c
        .call(&api, "post", "/vehicles", "/vehicles", Some(&bad))
        .await;
    assert_eq!(s, 400);
    let big = padded(&car1, MAX_BODY_BYTES + 1);
    let (s, _) = c
        .exchange(&api, "post", "/vehicles", "/vehicles", Some(big), true)
        .await;
    assert_eq!(s, 413);

    // Car 2's telematics unit is replaced (no unit of it connects in this test).
    let rekey = "/vehicles/{vin}/key";
    let car2_key = format!("/vehicles/{v2}/key");
    let replacement = json!({"publicKey": key_hex(12), "previousPublicKey": key_hex(2)});
    for (path, body, want, field) in [
        (car2_key.clone(), replacement.clone(), 200, None),
        (car2_key.clone(), replacement.clone(), 200, None),
        (
            car2_key.clone(),
            json!({"publicKey": key_hex(13), "previousPublicKey": key_hex(2)}),
            409,
            Some("previousPublicKey"),
        ),
        (
            car2_key.clone(),
            json!({"publicKey": "beef", "previousPublicKey": key_hex(12)}),
            400,
            Some("publicKey"),
        ),
        (
            "/vehicles/BAD/key".to_owned(),
            replacement.clone(),
            400,
            Some("vin"),
        ),
        (
            format!("/vehicles/{unknown}/key"),
            replacement.clone(),
            404,
            Some("vin"),
        ),
    ] {
        let (s, b) = c.call(&api, "post", rekey, &path, Some(&body)).await;
        assert_eq!(
            (s, b["field"].as_str()),
            (want, field),
            "{path} {body}: {b}"
        );
        if s == 200 {
            assert_eq!(b["publicKey"], key_hex(12), "{b}");
        }
    }
    let big = padded(&replacement, MAX_BODY_BYTES + 1);
    let (s, _) = c
        .exchange(&api, "post", rekey, &car2_key, Some(big), true)
        .await;
    assert_eq!(s, 413);

    // Activations, with parameter values of every kind the server takes, until the car
    // holds as many services as it can; each completes before the next.
    let car = TestCar::start(1, gw.public_key_hex(), CarOpts::plain(&gw, Mode::Obey)).await;
    car.wait_connected().await;
    let act = |v: &str, service: &str| {
        json!({
            "vin": v,
            "serviceId": service,
            "configuration": {"featureFlags": ["power_boost"],
                "parameters": {"boostPercent": 15, "launch": true, "mode": "eco", "ratio": 0.5}},
            "duration": {"type": "SUBSCRIPTION", "expiryDate": "2099-01-01T00:00:00Z", "autoRenewal": true}
        })
    };
    let activate = "/ota/activate";
    let mut completed = String::new();
    for i in 0..caas_protocol::MAX_GRANTS {
        let body = act(&v1, &format!("svc-{i}"));
        // The first with an idempotency key: its repeat answers the same, documented 202.
        c.key = (i == 0).then(|| "contract-key".to_owned());
        let (s, b) = c.call(&api, "post", activate, activate, Some(&body)).await;
        assert_eq!(s, 202, "{b}");
        completed = b["requestId"].as_str().unwrap().to_owned();
        wait_completed(&mut c, &api, &completed).await;
        if i == 0 {
            let (s, again) = c.call(&api, "post", activate, activate, Some(&body)).await;
            assert_eq!((s, &again["requestId"]), (202, &b["requestId"]), "{again}");
            c.key = None;
        }
    }
    // The key on other requests of each route.
    c.key = Some("contract-key".to_owned());
    for (route, body) in [
        (activate, act(&v1, "svc-1")),
        ("/ota/deactivate", json!({"vin": v1, "serviceId": "svc-0"})),
        (
            "/campaigns",
            json!({"vins": [v1], "action": "DEACTIVATE", "serviceId": "svc-0"}),
        ),
    ] {
        let (s, b) = c.call(&api, "post", route, route, Some(&body)).await;
        assert_eq!(
            (s, b["field"].as_str()),
            (422, Some("Idempotency-Key")),
            "{b}"
        );
    }
    c.key = None;
    let (s, b) = c
        .call(
            &api,
            "post",
            activate,
            activate,
            Some(&act(&v1, "one-more")),
        )
        .await;
    assert_eq!((s, b["field"].as_str()), (409, Some("serviceId")), "{b}");
    let (s, _) = c
        .call(&api, "post", activate, activate, Some(&act("BAD", "svc-0")))
        .await;
    assert_eq!(s, 400);
    let (s, _) = c
        .call(
            &api,
            "post",
            activate,
            activate,
            Some(&act(&unknown, "svc-0")),
        )
        .await;
    assert_eq!(s, 404);
    let big = padded(&act(&v1, "svc-0"), MAX_BODY_BYTES + 1);
    let (s, _) = c
        .exchange(&api, "post", activate, activate, Some(big), true)
        .await;
    assert_eq!(s, 413);

    // The car's state, history and requests.
    let status = "/vehicles/{vin}/status";
    let (s, st) = c
        .call(&api, "get", status, &format!("/vehicles/{v1}/status"), None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        st["activeServices"].as_array().unwrap().len(),
        caas_protocol::MAX_GRANTS
    );
    for (path, want) in [
        ("/vehicles/BAD/status".to_owned(), 400),
        ("/vehicles/%FF/status".to_owned(), 400),
        (format!("/vehicles/{unknown}/status"), 404),
    ] {
        let (s, b) = c.call(&api, "get", status, &path, None).await;
        assert_eq!(s, want, "{path}: {b}");
    }
    let history = "/vehicles/{vin}/history";
    for (path, want) in [
        (format!("/vehicles/{v1}/history?limit=3"), 200),
        (format!("/vehicles/{v1}/history?limit=0"), 400),
        (format!("/vehicles/{v1}/history?colour=red"), 400),
        ("/vehicles/%FF/history".to_owned(), 400),
        (format!("/vehicles/{unknown}/history"), 404),
    ] {
        let (s, b) = c.call(&api, "get", history, &path, None).await;
        assert_eq!(s, want, "{path}: {b}");
    }
    let request = "/ota/requests/{requestId}";
    for (path, want) in [
        (format!("/ota/requests/{completed}"), 200),
        ("/ota/requests/not-a-uuid".to_owned(), 400),
        ("/ota/requests/%FF".to_owned(), 400),
        (format!("/ota/requests/{zero}"), 404),
    ] {
        let (s, b) = c.call(&api, "get", request, &path, None).await;
        assert_eq!(s, want, "{path}: {b}");
    }

    // Deactivations.
    let deactivate = "/ota/deactivate";
    for (body, want) in [
        (json!({"vin": v1, "serviceId": "svc-0"}), 202),
        (json!({"vin": v1, "serviceId": "never-active"}), 409),
        (json!({"vin": v1, "serviceId": "svc-1", "now": true}), 400),
        (json!({"vin": unknown, "serviceId": "svc-1"}), 404),
    ] {
        let (s, b) = c
            .call(&api, "post", deactivate, deactivate, Some(&body))
            .await;
        assert_eq!(s, want, "{body}: {b}");
    }
    let big = padded(
        &json!({"vin": v1, "serviceId": "svc-1"}),
        MAX_BODY_BYTES + 1,
    );
    let (s, _) = c
        .exchange(&api, "post", deactivate, deactivate, Some(big), true)
        .await;
    assert_eq!(s, 413);

    // Campaigns: an unknown car is refused within an accepted campaign.
    let campaigns = "/campaigns";
    let body = json!({"vins": [v1, unknown], "action": "DEACTIVATE", "serviceId": "svc-1"});
    let (s, b) = c
        .call(&api, "post", campaigns, campaigns, Some(&body))
        .await;
    assert_eq!((s, b["accepted"].as_u64()), (202, Some(1)), "{b}");
    assert_eq!(b["refused"][0]["vin"], unknown);
    let cid = b["campaignId"].as_str().unwrap().to_owned();
    let (s, _) = c
        .call(
            &api,
            "post",
            campaigns,
            campaigns,
            Some(&json!({"vins": [v1], "action": "DELETE", "serviceId": "svc-1"})),
        )
        .await;
    assert_eq!(s, 400);
    let big = padded(&body, MAX_CAMPAIGN_BODY_BYTES + 1);
    let (s, _) = c
        .exchange(&api, "post", campaigns, campaigns, Some(big), true)
        .await;
    assert_eq!(s, 413);
    let campaign = "/campaigns/{campaignId}";
    for (path, want) in [
        (format!("/campaigns/{cid}"), 200),
        ("/campaigns/not-a-uuid".to_owned(), 400),
        (format!("/campaigns/{zero}"), 404),
    ] {
        let (s, b) = c.call(&api, "get", campaign, &path, None).await;
        assert_eq!(s, want, "{path}: {b}");
    }
    let cancel_campaign = "/campaigns/{campaignId}/cancel";
    for (path, want) in [
        (format!("/campaigns/{cid}/cancel"), 200),
        ("/campaigns/not-a-uuid/cancel".to_owned(), 400),
        (format!("/campaigns/{zero}/cancel"), 404),
    ] {
        let (s, b) = c.call(&api, "post", cancel_campaign, &path, None).await;
        assert_eq!(s, want, "{path}: {b}");
    }
    let (_, b) = c
        .call(&api, "get", campaign, &format!("/campaigns/{cid}"), None)
        .await;
    assert!(b["cancelledAt"].is_string(), "{b}");
    // The list: a second campaign, newest first, pages of one; the cancelled one says so.
    let (s, b) = c
        .call(&api, "post", campaigns, campaigns, Some(&body))
        .await;
    assert_eq!(s, 202, "{b}");
    let newer = b["campaignId"].as_str().unwrap().to_owned();
    let (s, p1) = c
        .call(&api, "get", campaigns, "/campaigns?limit=1", None)
        .await;
    assert_eq!(s, 200, "{p1}");
    assert_eq!(p1["campaigns"][0]["campaignId"], newer.as_str(), "{p1}");
    assert_eq!(p1["campaigns"][0]["cancelledAt"], Value::Null, "{p1}");
    assert_eq!(p1["nextBefore"], newer.as_str(), "{p1}");
    let (_, p2) = c
        .call(
            &api,
            "get",
            campaigns,
            &format!("/campaigns?limit=1&before={newer}"),
            None,
        )
        .await;
    assert_eq!(p2["campaigns"][0]["campaignId"], cid.as_str(), "{p2}");
    assert!(p2["campaigns"][0]["cancelledAt"].is_string(), "{p2}");
    assert_eq!(p2["nextBefore"], Value::Null, "{p2}");
    // Its requests: the one car it was accepted for, cancelled; none in flight.
    let requests = "/campaigns/{campaignId}/requests";
    let (s, b) = c
        .call(
            &api,
            "get",
            requests,
            &format!("/campaigns/{cid}/requests"),
            None,
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["requests"].as_array().map(Vec::len), Some(1), "{b}");
    assert_eq!(b["requests"][0]["vin"], v1.as_str(), "{b}");
    assert_eq!(b["nextAfter"], Value::Null, "{b}");
    let (_, b) = c
        .call(
            &api,
            "get",
            requests,
            &format!("/campaigns/{cid}/requests?status=IN_PROGRESS"),
            None,
        )
        .await;
    assert_eq!(b["requests"], json!([]), "{b}");
    for (path, want) in [
        (format!("/campaigns/{cid}/requests?status=LOST"), 400),
        (format!("/campaigns/{cid}/requests?after={zero}"), 400),
        ("/campaigns/nope/requests".to_owned(), 400),
        (format!("/campaigns/{zero}/requests"), 404),
    ] {
        let (s, b) = c.call(&api, "get", requests, &path, None).await;
        assert_eq!(s, want, "{path}: {b}");
    }
    for (path, field) in [
        ("/campaigns?before=nope", "before"),
        ("/campaigns?limit=0", "limit"),
        ("/campaigns?state=open", "state"),
    ] {
        let (s, b) = c.call(&api, "get", campaigns, path, None).await;
        assert_eq!((s, b["field"].as_str()), (400, Some(field)), "{path}: {b}");
    }

    // A car that never connects: the first refusal of many quick activations is 409 (no
    // room for another service) or 429 (too many in flight), and the requests end FAILED
    // with a support ticket after the retries.
    let mut first = None;
    let mut refused = None;
    for i in 0..=caas_protocol::MAX_GRANTS {
        let body = act(&v2, &format!("svc-{i}"));
        let (s, b) = c.call(&api, "post", activate, activate, Some(&body)).await;
        if s != 202 {
            refused = Some(s);
            assert!(s == 409 || s == 429, "{b}");
            break;
        }
        first.get_or_insert(b["requestId"].as_str().unwrap().to_owned());
    }
    assert!(
        refused.is_some(),
        "car 2 took more services than it can hold"
    );
    // Car 3 never connects either: repeated activations of one service (each replaces the
    // last, so no 409) reach the per-car cap of requests in flight; past it both OTA routes
    // answer 429.
    let v3 = vin(3).to_string();
    let car3 = json!({"vin": v3, "publicKey": key_hex(3), "platform": "mqb-evo"});
    let (s, _) = c
        .call(&api, "post", "/vehicles", "/vehicles", Some(&car3))
        .await;
    assert_eq!(s, 201);
    let mut last_v3 = None;
    for _ in 0..caas_gateway::MAX_IN_FLIGHT_PER_CAR {
        let (s, b) = c
            .call(&api, "post", activate, activate, Some(&act(&v3, "svc-0")))
            .await;
        assert_eq!(s, 202, "{b}");
        last_v3 = b["requestId"].as_str().map(str::to_owned);
    }
    let (s, b) = c
        .call(&api, "post", activate, activate, Some(&act(&v3, "svc-0")))
        .await;
    assert_eq!((s, b["field"].as_str()), (429, Some("vin")), "{b}");
    let body = json!({"vin": v3, "serviceId": "svc-0"});
    let (s, b) = c
        .call(&api, "post", deactivate, deactivate, Some(&body))
        .await;
    assert_eq!((s, b["field"].as_str()), (429, Some("vin")), "{b}");
    // A cancel ends one of car 3's requests (again: the same answer); then there is room.
    let cancel = "/ota/requests/{requestId}/cancel";
    let in_flight = last_v3.unwrap();
    for _ in 0..2 {
        let (s, b) = c
            .call(
                &api,
                "post",
                cancel,
                &format!("/ota/requests/{in_flight}/cancel"),
                None,
            )
            .await;
        assert_eq!(
            (s, b["status"].as_str(), b["errorCode"].as_str()),
            (200, Some("FAILED"), Some("CANCELLED")),
            "{b}"
        );
    }
    for (path, want) in [
        ("/ota/requests/not-a-uuid/cancel".to_owned(), 400),
        (format!("/ota/requests/{zero}/cancel"), 404),
    ] {
        let (s, b) = c.call(&api, "post", cancel, &path, None).await;
        assert_eq!(s, want, "{path}: {b}");
    }
    let (s, b) = c
        .call(&api, "post", activate, activate, Some(&act(&v3, "svc-0")))
        .await;
    assert_eq!(s, 202, "{b}");

    let tickets = "/support/tickets";
    let (s, _) = c
        .call(&api, "get", tickets, "/support/tickets?limit=0", None)
        .await;
    assert_eq!(s, 400);
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, b) = c
            .call(&api, "get", tickets, "/support/tickets?limit=5", None)
            .await;
        assert_eq!(s, 200);
        if b["tickets"].as_array().unwrap().len() >= 3 {
            break;
        }
        assert!(Instant::now() < end, "fewer than 3 support tickets: {b}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Paging, pinned below the newest ticket seen so that tickets opened meanwhile (newer)
    // do not shift the pages: pages of 2 give the same tickets in the same order, none
    // twice, and the last page says it is the last. `vin` keeps one car's.
    let (_, all) = c
        .call(&api, "get", tickets, "/support/tickets?limit=500", None)
        .await;
    let ids_of = |b: &Value| -> Vec<String> {
        b["tickets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["ticketId"].as_str().unwrap().to_owned())
            .collect()
    };
    let all_ids = ids_of(&all);
    assert_eq!(all["nextBefore"], Value::Null, "{all}");
    let newest: u64 = all_ids[0].strip_prefix("T-").unwrap().parse().unwrap();
    let mut paged = Vec::new();
    let mut next = Some((newest + 1).to_string());
    while let Some(before) = next {
        let (s, p) = c
            .call(
                &api,
                "get",
                tickets,
                &format!("/support/tickets?limit=2&before={before}"),
                None,
            )
            .await;
        assert_eq!(s, 200, "{p}");
        let ids = ids_of(&p);
        next = p["nextBefore"].as_str().map(str::to_owned);
        // Every page is full but the last, which is not empty: no page that only says
        // there is nothing more.
        assert!(ids.len() == 2 || (next.is_none() && !ids.is_empty()), "{p}");
        paged.extend(ids);
        assert!(paged.len() <= all_ids.len(), "pages repeat: {paged:?}");
    }
    assert_eq!(paged, all_ids);
    let one = all["tickets"][0]["vin"].as_str().unwrap();
    let (_, only) = c
        .call(
            &api,
            "get",
            tickets,
            &format!("/support/tickets?limit=500&vin={one}&before={}", newest + 1),
            None,
        )
        .await;
    let of_one: Vec<&Value> = all["tickets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["vin"] == one)
        .collect();
    assert_eq!(
        only["tickets"]
            .as_array()
            .unwrap()
            .iter()
            .collect::<Vec<_>>(),
        of_one
    );
    for (path, want, field) in [
        ("/support/tickets?page=2", 400, "page"),
        ("/support/tickets?before=yesterday", 400, "before"),
        ("/support/tickets?vin=NOT-A-VIN", 400, "vin"),
        ("/support/tickets?vin=WVWZZZ1JZXW999999", 404, "vin"),
    ] {
        let (s, b) = c.call(&api, "get", tickets, path, None).await;
        assert_eq!((s, b["field"].as_str()), (want, Some(field)), "{path}: {b}");
    }
    let first = first.unwrap();
    let (s, r) = c
        .call(
            &api,
            "get",
            request,
            &format!("/ota/requests/{first}"),
            None,
        )
        .await;
    assert_eq!((s, r["status"].as_str()), (200, Some("FAILED")), "{r}");
    // A request that ended on its own is not cancelled afterwards.
    let (s, b) = c
        .call(
            &api,
            "post",
            "/ota/requests/{requestId}/cancel",
            &format!("/ota/requests/{first}/cancel"),
            None,
        )
        .await;
    assert_eq!((s, b["field"].as_str()), (409, Some("requestId")), "{b}");
    let (s, st) = c
        .call(&api, "get", status, &format!("/vehicles/{v2}/status"), None)
        .await;
    assert_eq!(
        (s, st["diagnostics"]["firmwareVersion"].as_str()),
        (200, Some("2.1.0"))
    );

    // The fleet, a page at a time: one car a page gives every car once, in VIN order, the
    // same as one page of all; each as its status shows it, with its registration (its key
    // too: the one a key replacement must name as the previous). Once no
    // request is in flight, so that no car's status changes meanwhile.
    let end = Instant::now() + Duration::from_secs(30);
    while api.metric("caas_requests_in_flight").await != 0.0 {
        assert!(Instant::now() < end, "requests still in flight");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let vehicles = "/vehicles";
    let (_, all) = c
        .call(&api, "get", vehicles, "/vehicles?limit=500", None)
        .await;
    assert_eq!(all["nextAfter"], Value::Null, "{all}");
    let vins_of = |b: &Value| -> Vec<String> {
        b["vehicles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["vin"].as_str().unwrap().to_owned())
            .collect()
    };
    let all_vins = vins_of(&all);
    assert!(all_vins.windows(2).all(|w| w[0] < w[1]), "{all_vins:?}");
    assert!(
        all_vins.contains(&v1) && all_vins.contains(&v2),
        "{all_vins:?}"
    );
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(a) => format!("/vehicles?limit=1&after={a}"),
            None => "/vehicles?limit=1".to_owned(),
        };
        let (s, p) = c.call(&api, "get", vehicles, &path, None).await;
        assert_eq!(s, 200, "{p}");
        let vins = vins_of(&p);
        assert_eq!(vins.len(), 1, "{p}");
        paged.extend(vins);
        after = p["nextAfter"].as_str().map(str::to_owned);
        if after.is_none() {
            break;
        }
        assert!(paged.len() < all_vins.len(), "pages repeat: {paged:?}");
    }
    assert_eq!(paged, all_vins);
    for listed in all["vehicles"].as_array().unwrap() {
        let vin = listed["vin"].as_str().unwrap();
        let (_, mut own) = c
            .call(
                &api,
                "get",
                status,
                &format!("/vehicles/{vin}/status"),
                None,
            )
            .await;
        own["platform"] = json!("mqb-evo");
        // Car 2's unit was replaced above; car n was registered with key n.
        let n: u32 = vin[vin.len() - 6..].parse().unwrap();
        own["publicKey"] = json!(key_hex(if vin == v2 { 12 } else { n }));
        own["registeredAt"] = listed["registeredAt"].clone();
        assert_eq!(listed, &own);
    }
    // Filters keep exactly the cars whose status says so (car 1 is connected, the others
    // are not; their services are in several states by now).
    let mut kept_some = 0;
    for (param, state) in [
        ("connectivity", "ONLINE"),
        ("connectivity", "OFFLINE"),
        ("serviceStatus", "ACTIVE"),
        ("serviceStatus", "PENDING"),
        ("serviceStatus", "ERROR"),
    ] {
        let query = format!("{param}={state}");
        let (s, p) = c
            .call(&api, "get", vehicles, &format!("/vehicles?{query}"), None)
            .await;
        assert_eq!((s, &p["nextAfter"]), (200, &Value::Null), "{query}: {p}");
        let want: Vec<String> = all["vehicles"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| match param {
                "connectivity" => v["connectivity"] == state,
                _ => v["activeServices"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s["status"] == state),
            })
            .map(|v| v["vin"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(vins_of(&p), want, "{query}");
        if !want.is_empty() && want.len() < all_vins.len() {
            kept_some += 1;
        }
    }
    // At least two of the filters kept some cars and left others.
    assert!(kept_some >= 2, "{all}");
    for (query, field) in [
        ("limit=0", "limit"),
        ("after=BAD", "after"),
        ("connectivity=ASLEEP", "connectivity"),
        ("serviceStatus=EXPIRED", "serviceStatus"),
        ("vin=x", "vin"),
    ] {
        let (s, b) = c
            .call(&api, "get", vehicles, &format!("/vehicles?{query}"), None)
            .await;
        assert_eq!((s, b["field"].as_str()), (400, Some(field)), "{query}: {b}");
    }

    // Car 3 taken out of the fleet; a repeat answers the same time and fails nothing more.
    let retire = "/vehicles/{vin}";
    let car3_path = format!("/vehicles/{v3}");
    let (s, first) = c.call(&api, "delete", retire, &car3_path, None).await;
    assert_eq!(
        (s, first["vin"].as_str()),
        (200, Some(v3.as_str())),
        "{first}"
    );
    let (s, again) = c.call(&api, "delete", retire, &car3_path, None).await;
    assert_eq!(
        (s, &again["decommissionedAt"], &again["requestsFailed"]),
        (200, &first["decommissionedAt"], &json!(0)),
        "{again}"
    );
    assert_eq!(again["withdrawalSeq"], first["withdrawalSeq"], "{again}");
    for (path, want) in [
        ("/vehicles/BAD".to_owned(), 400),
        ("/vehicles/%FF".to_owned(), 400),
        (format!("/vehicles/{unknown}"), 404),
    ] {
        let (s, b) = c.call(&api, "delete", retire, &path, None).await;
        assert_eq!((s, b["field"].as_str()), (want, Some("vin")), "{path}: {b}");
    }
    let (s, b) = c
        .call(&api, "get", status, &format!("/vehicles/{v3}/status"), None)
        .await;
    assert_eq!((s, b["field"].as_str()), (404, Some("vin")), "{b}");
    assert!(
        b["reason"].as_str().unwrap().contains("decommissioned"),
        "{b}"
    );

    // An abort rule: taken as documented, shown by GET; a bad one refused naming its field.
    // A car the gateway does not know: the campaign makes no request.
    let mut ruled = json!({"vins": [unknown], "action": "DEACTIVATE", "serviceId": "svc-1",
        "abortWhen": {"refusedPercent": 30, "minFinished": 5}});
    let (s, b) = c
        .call(&api, "post", "/campaigns", "/campaigns", Some(&ruled))
        .await;
    assert_eq!(s, 202, "{b}");
    let ruled_id = b["campaignId"].as_str().unwrap().to_owned();
    let (s, r) = c
        .call(
            &api,
            "get",
            "/campaigns/{campaignId}",
            &format!("/campaigns/{ruled_id}"),
            None,
        )
        .await;
    assert_eq!(
        (s, &r["abortWhen"], &r["abortedAt"]),
        (200, &ruled["abortWhen"], &Value::Null),
        "{r}"
    );
    for (rule, field) in [
        (json!({"refusedPercent": 0}), "abortWhen.refusedPercent"),
        (json!({"minFinished": 5}), "abortWhen.refusedPercent"),
        (
            json!({"refusedPercent": 30, "minFinished": 100_001}),
            "abortWhen.minFinished",
        ),
        (json!({"refusedPercent": 30, "when": 1}), "abortWhen.when"),
        (json!(true), "abortWhen"),
    ] {
        ruled["abortWhen"] = rule;
        let (s, e) = c
            .call(&api, "post", "/campaigns", "/campaigns", Some(&ruled))
            .await;
        assert_eq!((s, e["field"].as_str()), (400, Some(field)), "{e}");
    }
    c.assert_every_documented_status_seen();
    // Every route was called: each has its own responses counter, none fell into `other`.
    for code in ["2xx", "4xx", "5xx"] {
        assert_eq!(responses(&api, "other", code).await, 0.0, "{code}");
    }
    for (route, _) in ROUTES.iter().filter(|(r, _)| *r != "/healthz") {
        let answered = responses(&api, route, "2xx").await + responses(&api, route, "4xx").await;
        assert!(answered > 0.0, "{route} has no responses counter");
    }
    drop(car);
    gw.shutdown().await;
}
