#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! `caasctl local status` and `caasctl vehicle status|history` against small axum servers
//! started here on 127.0.0.1 that serve the contract JSON: stand-ins for the car agent's
//! diagnostic endpoint and the gateway's IoT API.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use common::{caasctl, caasctl_env};
use serde_json::{json, Value};

const VIN: &str = "WVWZZZ1JZXW000001";
const TOKEN: &str = "test-token";

/// Serves `app` on a free loopback port from a thread of its own; lives as long as the test
/// process.
fn serve(app: Router) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    rx.recv().unwrap()
}

fn agent_status() -> Value {
    json!({
        "vin": VIN,
        "appliedSeq": 3,
        "carTime": "2026-11-22T13:00:00Z",
        "connectivity": "ONLINE",
        "firmwareVersion": "2.4.1",
        "activeGrants": [
            {"serviceId": "power-boost", "flags": ["power_boost"],
             "parameters": {"boostPercent": "15"}, "endsAt": "2026-12-22T00:00:00Z"},
            {"serviceId": "heated-seats", "flags": ["heated_seats", "heated_wheel"],
             "parameters": {}, "endsAt": null}
        ],
        "lastRejection": {"seq": 7, "code": "REPLAY"},
        "errorCodes": ["E_BATT_LOW"]
    })
}

#[test]
fn local_status_prints_the_agent_state_as_a_table_and_as_json() {
    let app = Router::new().route("/status", get(|| async { Json(agent_status()) }));
    let addr = serve(app).to_string();

    let out = caasctl(&["local", "status", "--agent", &addr]);
    let t = out.ok();
    for want in [
        format!("VIN             {VIN}"),
        "Applied seq     3".to_owned(),
        "Car time        2026-11-22T13:00:00Z".to_owned(),
        "Connectivity    ONLINE".to_owned(),
        "Firmware        2.4.1".to_owned(),
        "Error codes     E_BATT_LOW".to_owned(),
        "Last rejection  REPLAY (seq 7)".to_owned(),
        "Active grants: 2".to_owned(),
        "SERVICE       FLAGS                       PARAMETERS       ENDS AT".to_owned(),
        "power-boost   power_boost                 boostPercent=15  2026-12-22T00:00:00Z"
            .to_owned(),
        "heated-seats  heated_seats, heated_wheel  -                permanent".to_owned(),
    ] {
        assert!(t.contains(&want), "missing {want:?} in:\n{t}");
    }

    let out = caasctl(&[
        "local",
        "status",
        "--agent",
        &format!("http://{addr}/"),
        "--json",
    ]);
    let v: Value = serde_json::from_str(out.ok()).unwrap();
    assert_eq!(v, agent_status());
}

#[test]
fn local_status_failures_are_one_clear_line() {
    // Nobody listening: take a free port and let it go.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = caasctl(&["local", "status", "--agent", &free.to_string()]);
    let line = out.err();
    assert!(
        line.contains("cannot reach") && line.contains(&free.to_string()),
        "{line}"
    );

    let app = Router::new()
        .route(
            "/wrong/status",
            get(|| async { Json(json!({"hello": "world"})) }),
        )
        .route("/text/status", get(|| async { "plain text" }));
    let addr = serve(app);
    let out = caasctl(&[
        "local",
        "status",
        "--agent",
        &format!("http://{addr}/wrong"),
    ]);
    assert!(
        out.err().contains("not the agent's status shape"),
        "{}",
        out.stderr
    );
    let out = caasctl(&["local", "status", "--agent", &format!("http://{addr}/text")]);
    assert!(out.err().contains("not JSON"), "{}", out.stderr);
    let out = caasctl(&[
        "local",
        "status",
        "--agent",
        &format!("http://{addr}/missing"),
    ]);
    assert!(out.err().contains("HTTP 404"), "{}", out.stderr);
}

/// What the stand-in gateway saw.
#[derive(Default)]
struct Seen {
    requests: Vec<String>,
}

type Shared = Arc<Mutex<Seen>>;

fn authorized(headers: &HeaderMap) -> Result<(), (StatusCode, Json<Value>)> {
    let ok = headers.get("authorization").and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {TOKEN}"));
    if ok {
        Ok(())
    } else {
        Err((
            StatusCode::UNAUTHORIZED,
            Json(
                json!({"error": "unauthorized", "field": "Authorization", "reason": "missing or wrong bearer token"}),
            ),
        ))
    }
}

fn known(vin: &str) -> Result<(), (StatusCode, Json<Value>)> {
    if vin == VIN {
        Ok(())
    } else {
        Err((
            StatusCode::NOT_FOUND,
            Json(json!({"error": "not_found", "field": "vin", "reason": "unknown car"})),
        ))
    }
}

fn vehicle_status() -> Value {
    json!({
        "vin": VIN,
        "connectivity": "LIMITED",
        "lastSeen": "2026-11-22T12:59:30Z",
        "activeServices": [
            {"serviceId": "power-boost", "activationDate": "2026-11-01T10:00:00Z", "status": "ACTIVE"},
            {"serviceId": "snow-mode", "activationDate": "2026-11-22T12:59:00Z", "status": "PENDING"}
        ],
        "diagnostics": {"errorCodes": ["E_BATT_LOW", "E_TPMS"], "firmwareVersion": "2.4.1", "networkSignalStrength": 63}
    })
}

/// A car's history in the gateway's shape, newest first: for seq 5 down to 1, the car's
/// report and the request that asked for it, with ids that only grow.
fn history_entries() -> Vec<Value> {
    (1..=5u64)
        .rev()
        .flat_map(|seq| {
            [
                json!({"id": (seq * 2).to_string(), "timestamp": format!("2026-11-22T12:0{seq}:01Z"),
                       "type": "REPORT", "seq": seq, "detail": format!("applied seq {seq}")}),
                json!({"id": (seq * 2 - 1).to_string(), "timestamp": format!("2026-11-22T12:0{seq}:00Z"),
                       "type": "REQUEST", "seq": seq, "requestId": format!("r-{seq}"),
                       "detail": "ACTIVATE power-boost"}),
            ]
        })
        .collect()
}

fn gateway() -> (SocketAddr, Shared) {
    let seen: Shared = Arc::default();
    let app = Router::new()
        .route(
            "/vehicles/{vin}/status",
            get(|State(seen): State<Shared>, Path(vin): Path<String>, headers: HeaderMap| async move {
                seen.lock().unwrap().requests.push(format!("status {vin}"));
                authorized(&headers)?;
                known(&vin)?;
                Ok::<_, (StatusCode, Json<Value>)>(Json(vehicle_status()))
            }),
        )
        .route(
            "/vehicles/{vin}/history",
            get(
                |State(seen): State<Shared>,
                 Path(vin): Path<String>,
                 Query(q): Query<HashMap<String, String>>,
                 headers: HeaderMap| async move {
                    let mut keys: Vec<_> = q.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    keys.sort();
                    seen.lock().unwrap().requests.push(format!("history {vin} {}", keys.join("&")));
                    authorized(&headers)?;
                    known(&vin)?;
                    // As the gateway pages: entries below the `before` id, the next cursor the
                    // last entry's id while a full page came back.
                    let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(50);
                    let before: u64 = q.get("before").and_then(|b| b.parse().ok()).unwrap_or(u64::MAX);
                    let page: Vec<Value> = history_entries()
                        .into_iter()
                        .filter(|e| e["id"].as_str().and_then(|id| id.parse::<u64>().ok()).is_some_and(|id| id < before))
                        .take(limit)
                        .collect();
                    let next = if page.len() == limit { page[limit - 1]["id"].clone() } else { Value::Null };
                    Ok::<_, (StatusCode, Json<Value>)>(Json(json!({"vin": vin, "entries": page, "nextBefore": next})))
                },
            ),
        )
        .with_state(seen.clone());
    (serve(app), seen)
}

#[test]
fn vehicle_status_prints_the_gateway_view_and_its_errors() {
    let (addr, seen) = gateway();
    let url = format!("http://{addr}");

    let out = caasctl(&[
        "vehicle",
        "status",
        VIN,
        "--gateway",
        &url,
        "--token",
        TOKEN,
    ]);
    let t = out.ok();
    for want in [
        format!("VIN           {VIN}"),
        "Connectivity  LIMITED".to_owned(),
        "Last seen     2026-11-22T12:59:30Z".to_owned(),
        "Firmware      2.4.1".to_owned(),
        "Signal        63%".to_owned(),
        "Error codes   E_BATT_LOW, E_TPMS".to_owned(),
        "Active services: 2".to_owned(),
        "SERVICE      STATUS   ACTIVATED".to_owned(),
        "power-boost  ACTIVE   2026-11-01T10:00:00Z".to_owned(),
        "snow-mode    PENDING  2026-11-22T12:59:00Z".to_owned(),
    ] {
        assert!(t.contains(&want), "missing {want:?} in:\n{t}");
    }

    // The environment gives the gateway and the token; --json passes the answer through.
    let out = caasctl_env(
        &["vehicle", "status", VIN, "--json"],
        &[
            ("CAAS_GATEWAY_URL", &format!("{url}/")),
            ("CAAS_API_TOKEN", TOKEN),
        ],
    );
    let v: Value = serde_json::from_str(out.ok()).unwrap();
    assert_eq!(v, vehicle_status());

    // The gateway's JSON error is shown as it is, on one line, with a non-zero exit.
    let out = caasctl(&[
        "vehicle",
        "status",
        VIN,
        "--gateway",
        &url,
        "--token",
        "wrong",
    ]);
    let line = out.err();
    assert!(line.contains("HTTP 401"), "{line}");
    assert!(line.contains(r#""field":"Authorization""#), "{line}");
    let out = caasctl(&[
        "vehicle",
        "status",
        "1HGCM82633A004352",
        "--gateway",
        &url,
        "--token",
        TOKEN,
    ]);
    let line = out.err();
    assert!(line.contains("HTTP 404"), "{line}");
    assert!(
        line.contains(r#"{"error":"not_found","field":"vin","reason":"unknown car"}"#),
        "{line}"
    );
    // The default token is the development one, which this gateway does not accept.
    assert!(caasctl(&["vehicle", "status", VIN, "--gateway", &url])
        .err()
        .contains("HTTP 401"));

    // A malformed VIN never reaches the gateway.
    let before = seen.lock().unwrap().requests.len();
    let out = caasctl(&[
        "vehicle",
        "status",
        "NOT-A-VIN",
        "--gateway",
        &url,
        "--token",
        TOKEN,
    ]);
    assert!(
        out.err().contains("invalid VIN \"NOT-A-VIN\""),
        "{}",
        out.stderr
    );
    assert_eq!(seen.lock().unwrap().requests.len(), before);
}

#[test]
fn vehicle_history_pages_newest_first() {
    let (addr, seen) = gateway();
    let url = format!("http://{addr}");

    let out = caasctl(&[
        "vehicle",
        "history",
        VIN,
        "--limit",
        "3",
        "--gateway",
        &url,
        "--token",
        TOKEN,
    ]);
    let t = out.ok();
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(
        lines[0],
        format!("History of {VIN}: 3 entries, newest first"),
        "{t}"
    );
    assert_eq!(
        lines[1],
        "TIME                  TYPE     SEQ  REQUEST  DETAIL                ID"
    );
    assert_eq!(
        lines[2],
        "2026-11-22T12:05:01Z  REPORT   5    -        applied seq 5         10"
    );
    assert_eq!(
        lines[3],
        "2026-11-22T12:05:00Z  REQUEST  5    r-5      ACTIVATE power-boost  9"
    );
    assert_eq!(
        lines[4],
        "2026-11-22T12:04:01Z  REPORT   4    -        applied seq 4         8"
    );
    assert_eq!(
        lines[5],
        format!("Older entries: caasctl vehicle history {VIN} --limit 3 --before 8")
    );
    assert_eq!(
        seen.lock().unwrap().requests.last().unwrap(),
        &format!("history {VIN} limit=3")
    );

    // The hint's cursor gives the next page; --json passes the answer through.
    let out = caasctl(&[
        "vehicle",
        "history",
        VIN,
        "--limit",
        "50",
        "--before",
        "8",
        "--gateway",
        &url,
        "--token",
        TOKEN,
        "--json",
    ]);
    let v: Value = serde_json::from_str(out.ok()).unwrap();
    let ids: Vec<&str> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["7", "6", "5", "4", "3", "2", "1"]);
    assert_eq!(v["nextBefore"], Value::Null);
    assert_eq!(
        seen.lock().unwrap().requests.last().unwrap(),
        &format!("history {VIN} before=8&limit=50")
    );

    // Out-of-range limits are usage errors (clap, exit 2) and send nothing.
    let before = seen.lock().unwrap().requests.len();
    for bad in ["0", "501", "x"] {
        let out = caasctl(&["vehicle", "history", VIN, "--limit", bad, "--gateway", &url]);
        assert_eq!(out.code, 2, "--limit {bad}: {}", out.stderr);
    }
    assert_eq!(seen.lock().unwrap().requests.len(), before);
}

#[test]
fn every_command_has_help() {
    for args in [
        vec!["--help"],
        vec!["keys", "gen", "--help"],
        vec!["keys", "show", "--help"],
        vec!["certs", "init", "--help"],
        vec!["certs", "car", "--help"],
        vec!["certs", "client", "--help"],
        vec!["frame", "inspect", "--help"],
        vec!["local", "status", "--help"],
        vec!["vehicle", "status", "--help"],
        vec!["vehicle", "history", "--help"],
        vec!["gateway", "stats", "--help"],
        vec!["gateway", "tickets", "--help"],
        vec!["request", "show", "--help"],
        vec!["campaign", "show", "--help"],
    ] {
        let out = caasctl(&args);
        assert!(
            out.ok().contains("Usage: caasctl"),
            "{args:?}: {}",
            out.stdout
        );
    }
    for cmd in [
        ["vehicle", "status"],
        ["request", "show"],
        ["campaign", "show"],
        ["gateway", "tickets"],
    ] {
        let help = caasctl(&[cmd[0], cmd[1], "--help"]);
        assert!(
            help.stdout.contains("CAAS_GATEWAY_URL") && help.stdout.contains("CAAS_API_TOKEN"),
            "{cmd:?}: {}",
            help.stdout
        );
    }
}
