//! The IoT API's refusals: every bad input answers 4xx naming the field and changes nothing;
//! the OpenAPI document lists every route.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

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
async fn openapi_lists_every_route_and_metrics_are_prometheus_text() {
    let dir = tempfile::tempdir().unwrap();
    let gw = caas_gateway::start(config(dir.path(), None)).await.unwrap();
    let api = Api::new(gw.http_addr());
    let (s, doc) = api.get("/openapi.json").await;
    assert_eq!(s, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let routes = [
        ("/ota/activate", "post", "202"),
        ("/ota/deactivate", "post", "202"),
        ("/ota/requests/{requestId}", "get", "200"),
        ("/vehicles", "post", "201"),
        ("/vehicles/{vin}/status", "get", "200"),
        ("/vehicles/{vin}/history", "get", "200"),
        ("/campaigns", "post", "202"),
        ("/campaigns/{campaignId}", "get", "200"),
        ("/support/tickets", "get", "200"),
        ("/keys", "get", "200"),
        ("/metrics", "get", "200"),
        ("/openapi.json", "get", "200"),
        ("/healthz", "get", "200"),
    ];
    for (path, method, code) in routes {
        assert!(
            doc["paths"][path][method]["responses"][code].is_object(),
            "{method} {path} {code} missing"
        );
        // The route really exists (no 404 "no such route").
        let url = format!(
            "{}{}",
            api.base,
            path.replace("{requestId}", "x")
                .replace("{vin}", "x")
                .replace("{campaignId}", "x")
        );
        let req = if method == "post" {
            api.http.post(url).json(&json!({}))
        } else {
            api.http.get(url)
        };
        let r = req.bearer_auth(TOKEN).send().await.unwrap();
        let b: Value = r.json().await.unwrap_or(Value::Null);
        assert_ne!(b["error"], "no such route", "{method} {path}");
    }
    assert_eq!(doc["paths"].as_object().unwrap().len(), routes.len());
    let text = api.get_text("/metrics").await;
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
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    gw.shutdown().await;
}
