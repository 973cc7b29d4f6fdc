#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! `caasctl gateway stats` against a real gateway (embedded broker, a store in a temporary
//! directory) started in this process: one car registered and one activation accepted, which
//! stays in flight (no car is connected) until it is cancelled.

mod common;

use common::{caasctl, gateway_config, post, register_car, start_gateway};
use serde_json::{json, Value};

const VIN: &str = "WVWZZZ1JZXW000001";
const TOKEN: &str = "stats-token";

#[test]
fn gateway_stats_shows_the_counts_and_the_stage_times_as_a_table_and_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let base = start_gateway(gateway_config(dir.path().join("gw"), TOKEN));
    register_car(&base, TOKEN, VIN, 7);
    let activation = json!({
        "vin": VIN,
        "serviceId": "power-boost",
        "configuration": {"featureFlags": ["power_boost"]},
        "duration": {"type": "PERMANENT"},
    });
    // Sent twice with one idempotency key: one request, one repeat.
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (status, answer) = post(&base, TOKEN, "/ota/activate", &activation, Some("order-1"));
        assert_eq!(status, 202, "{answer}");
        ids.push(answer["requestId"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids[0], ids[1]);

    let run = caasctl(&["gateway", "stats", "--gateway", &base, "--token", TOKEN]);
    let text = run.ok();
    let line = |start: &str| {
        text.lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no {start:?} line in\n{text}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(line("requests created").last(), Some(&"1"), "{text}");
    assert_eq!(line("requests in flight").last(), Some(&"1"), "{text}");
    assert_eq!(line("  of them cancelled").last(), Some(&"0"), "{text}");
    assert_eq!(line("cars registered").last(), Some(&"1"), "{text}");
    assert_eq!(line("repeats answered").last(), Some(&"1"), "{text}");
    assert_eq!(line("uses of the previous").last(), Some(&"0"), "{text}");
    assert_eq!(line("webhook receiver").last(), Some(&"up"), "{text}");
    // Answered twice (the repeat too), with a mean and bucket bounds; no report yet: a
    // count of 0, no times.
    let answered = line("answered");
    assert!(
        answered.contains(&"2") && answered.contains(&"ms"),
        "{text}"
    );
    assert!(answered.contains(&"≤"), "{text}");
    let report = line("car's report");
    assert!(report.ends_with(&["0", "-", "-", "-"]), "{text}");

    let run = caasctl(&[
        "gateway",
        "stats",
        "--gateway",
        &base,
        "--token",
        TOKEN,
        "--json",
    ]);
    let v: Value = serde_json::from_str(run.ok()).unwrap();
    assert_eq!(v["counts"]["caas_requests_total{state=\"created\"}"], 1.0);
    assert_eq!(v["stages"]["caas_accept_seconds"]["count"], 2.0);
    assert_eq!(v["counts"]["caas_idempotent_replays_total"], 1.0);
    assert!(
        v["stages"]["caas_accept_seconds"]["meanSeconds"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert_eq!(v["stages"]["caas_activation_latency_seconds"]["count"], 0.0);
    assert_eq!(v["webhookReceiverDown"], false);
    assert_eq!(
        v["certificates"]["caas_https_cert_expires_at_seconds"],
        Value::Null,
        "no --https"
    );

    // Cancelled, the request counts as failed and as cancelled, and is no longer in flight.
    let id = &ids[0];
    let (status, answer) = post(
        &base,
        TOKEN,
        &format!("/ota/requests/{id}/cancel"),
        &json!({}),
        None,
    );
    assert_eq!(status, 200, "{answer}");
    let run = caasctl(&["gateway", "stats", "--gateway", &base, "--token", TOKEN]);
    let text = run.ok();
    let last = |start: &str| {
        text.lines()
            .find(|l| l.starts_with(start))
            .and_then(|l| l.split_whitespace().last())
            .unwrap_or_else(|| panic!("no {start:?} line in\n{text}"))
    };
    assert_eq!(last("requests failed"), "1", "{text}");
    assert_eq!(last("  of them cancelled"), "1", "{text}");
    assert_eq!(last("requests in flight"), "0", "{text}");

    // A wrong token: one clear line naming the refusal, and a non-zero exit.
    let run = caasctl(&["gateway", "stats", "--gateway", &base, "--token", "wrong"]);
    let err = run.err();
    assert!(err.contains("401"), "{err}");
    let run = caasctl(&["gateway", "stats", "--gateway", &base, "--token", TOKEN]);
    let refused = run
        .ok()
        .lines()
        .find(|l| l.starts_with("calls refused for a bad token"))
        .and_then(|l| l.split_whitespace().last())
        .map(str::to_owned);
    assert_eq!(
        refused.as_deref(),
        Some("1"),
        "the wrong token's call is counted"
    );
}
