//! The system's promises, checked end to end with real processes (see the crate docs).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use caas_sim::api::Lasting;
use caas_sim::scenario::{run_scenario, Scenario, ServiceMix};
use caas_tests::{Env, Retry};

const CARS: u64 = 200;

fn sim() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_caas-e2e-sim"))
}

fn service(id: &str, flag: &str, lasting: &str) -> ServiceMix {
    ServiceMix {
        service_id: id.to_string(),
        flags: vec![flag.to_string()],
        lasting: lasting.to_string(),
        expires_in: (lasting == "temporary").then(|| "1h".to_string()),
        weight: 1,
    }
}

/// Activates `service` on every car once, concurrently; returns (vin, request id) pairs.
async fn activate_all(env: &Env, svc: &str, flag: &str) -> Vec<(String, String)> {
    let mut set = tokio::task::JoinSet::new();
    for vin in env.vins.clone() {
        let api = env.api.clone();
        let (svc, flag) = (svc.to_string(), flag.to_string());
        set.spawn(async move {
            let id = api
                .activate(
                    &vin,
                    &svc,
                    &[flag],
                    &serde_json::Map::new(),
                    &Lasting::Permanent,
                )
                .await
                .unwrap();
            (vin, id)
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.unwrap());
    }
    out
}

fn status_of(env: &Env, id: &str) -> Vec<String> {
    env.receiver
        .callbacks(id)
        .into_iter()
        .map(|c| c.status)
        .collect()
}

async fn service_state(env: &Env, vin: &str, svc: &str) -> Option<String> {
    let v = env.api.vehicle_status(vin).await.unwrap();
    v["activeServices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["serviceId"] == svc)
        .map(|s| s["status"].as_str().unwrap_or("").to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_run_gets_exactly_one_final_callback_per_request() {
    let retry = Retry {
        attempts: 4,
        attempt_timeout: "1s",
        backoff: "500ms",
    };
    // 5% of command frames arrive corrupted: those attempts fail and are retried.
    let env = Env::start(sim(), CARS, retry, &["--corrupt", "0.05"])
        .await
        .unwrap();
    let mut sc = Scenario {
        rate: 100.0,
        duration: "4s".to_string(),
        deactivate_share: 0.2,
        settle: "40s".to_string(),
        services: vec![
            service("power-boost", "power_boost", "temporary"),
            service("heated-seats", "heated_seats", "permanent"),
            service("streaming", "streaming", "subscription"),
            service("snow-mode", "snow_mode", "subscription"),
        ],
        ..Scenario::default()
    };
    sc.validate().unwrap();
    let report = run_scenario(&env.api, &env.receiver, &env.vins, &sc)
        .await
        .unwrap();
    assert!(report.sent >= 300, "{}", report.text());
    assert_eq!(report.http_errors, 0, "{}", report.text());
    assert_eq!(report.accepted, report.sent, "{}", report.text());
    assert_eq!(report.no_callback, 0, "{}", report.text());
    assert_eq!(report.several_callbacks, 0, "{}", report.text());
    assert_eq!(report.exactly_one_callback, report.accepted);
    assert_eq!(report.bad_signatures, 0);
    let settled = report.by_status.get("ACTIVATED").copied().unwrap_or(0)
        + report.by_status.get("DEACTIVATED").copied().unwrap_or(0);
    assert_eq!(settled, report.accepted, "{}", report.text());
    let mut env = env;
    let fleet = env.stop_fleet().unwrap();
    assert!(fleet.counters.frames_corrupted > 0, "{}", fleet.text());
    assert!(
        fleet
            .counters
            .rejected
            .get("BAD_SIGNATURE")
            .copied()
            .unwrap_or(0)
            > 0,
        "{}",
        fleet.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_thirty_percent_dropping_commands_for_a_while_all_activate_within_the_budget() {
    // Budget: 4 attempts of 2 s with 1 s pauses, about 11 s; the cars drop for 6 s from start.
    let retry = Retry {
        attempts: 4,
        attempt_timeout: "2s",
        backoff: "1s",
    };
    let mut env = Env::start(
        sim(),
        CARS,
        retry,
        &["--drop-commands", "0.3", "--drop-for", "6s"],
    )
    .await
    .unwrap();
    let droppers: HashSet<String> = env.with_fault("drop").into_iter().collect();
    assert!(
        (30..=90).contains(&droppers.len()),
        "{} droppers",
        droppers.len()
    );
    let started = Instant::now();
    let reqs = activate_all(&env, "lane-keeping", "lane_keeping").await;
    let ids: Vec<String> = reqs.iter().map(|(_, id)| id.clone()).collect();
    let n = env.receiver.wait_for(&ids, Duration::from_secs(40)).await;
    assert_eq!(n, ids.len(), "callbacks missing");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (vin, id) in &reqs {
        assert_eq!(status_of(&env, id), vec!["ACTIVATED"], "{vin}");
        assert_eq!(
            service_state(&env, vin, "lane-keeping").await.as_deref(),
            Some("ACTIVE"),
            "{vin}"
        );
    }
    let fleet = env.stop_fleet().unwrap();
    assert!(
        fleet.counters.commands_dropped >= droppers.len() as u64,
        "{}",
        fleet.text()
    );
    eprintln!(
        "all {} activated within {:.1} s",
        reqs.len(),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cars_that_never_answer_end_failed_with_their_grants_withdrawn() {
    let retry = Retry {
        attempts: 2,
        attempt_timeout: "1s",
        backoff: "500ms",
    };
    let env = Env::start(sim(), CARS, retry, &["--drop-commands", "0.1"])
        .await
        .unwrap();
    let silent: HashSet<String> = env.with_fault("silent").into_iter().collect();
    assert!(
        (5..=40).contains(&silent.len()),
        "{} silent cars",
        silent.len()
    );
    let reqs = activate_all(&env, "offroad-mode", "offroad_mode").await;
    let ids: Vec<String> = reqs.iter().map(|(_, id)| id.clone()).collect();
    let n = env.receiver.wait_for(&ids, Duration::from_secs(40)).await;
    assert_eq!(n, ids.len(), "callbacks missing");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut failed = HashSet::new();
    for (vin, id) in &reqs {
        let cbs = env.receiver.callbacks(id);
        assert_eq!(cbs.len(), 1, "{vin}: {cbs:?}");
        match cbs[0].status.as_str() {
            "FAILED" => {
                assert!(cbs[0].error_code.is_some(), "{vin}: FAILED without a code");
                failed.insert(vin.clone());
            }
            "ACTIVATED" => {}
            other => panic!("{vin}: {other}"),
        }
    }
    assert_eq!(failed, silent, "exactly the silent cars fail");
    for vin in &silent {
        // Withdrawn: never ACTIVE, and a newer command without the grant went out.
        let state = service_state(&env, vin, "offroad-mode").await;
        assert_ne!(state.as_deref(), Some("ACTIVE"), "{vin}");
        let h = env.api.history(vin).await.unwrap();
        assert!(
            h["entries"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["detail"].as_str().unwrap_or("").contains("withdraw")),
            "{vin}: no withdrawal in {h}"
        );
    }
    for (vin, _) in reqs.iter().filter(|(v, _)| !silent.contains(v)).take(20) {
        assert_eq!(
            service_state(&env, vin, "offroad-mode").await.as_deref(),
            Some("ACTIVE"),
            "{vin}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_loses_nothing() {
    let retry = Retry {
        attempts: 6,
        attempt_timeout: "1s",
        backoff: "500ms",
    };
    let mut env = Env::start(
        sim(),
        CARS,
        retry,
        &["--storm", "0.3", "--storm-every", "1s"],
    )
    .await
    .unwrap();
    let stormy = env.with_fault("storm");
    assert!(!stormy.is_empty());
    let mut sc = Scenario {
        rate: 100.0,
        duration: "4s".to_string(),
        settle: "40s".to_string(),
        services: vec![
            service("sport-mode", "sport_mode", "permanent"),
            service("premium-audio", "premium_audio", "subscription"),
        ],
        ..Scenario::default()
    };
    sc.validate().unwrap();
    let report = run_scenario(&env.api, &env.receiver, &env.vins, &sc)
        .await
        .unwrap();
    assert_eq!(report.accepted, report.sent, "{}", report.text());
    assert_eq!(
        report.exactly_one_callback,
        report.accepted,
        "{}",
        report.text()
    );
    assert_eq!(
        report.by_status.get("ACTIVATED").copied().unwrap_or(0),
        report.accepted,
        "{}",
        report.text()
    );
    // Every car's desired state reached it: nothing is left PENDING at the gateway.
    for vin in &stormy {
        let v = env.api.vehicle_status(vin).await.unwrap();
        for s in v["activeServices"].as_array().unwrap() {
            assert_eq!(s["status"], "ACTIVE", "{vin}: {v}");
        }
    }
    let fleet = env.stop_fleet().unwrap();
    assert!(fleet.counters.storm_drops > 0, "{}", fleet.text());
    assert!(
        fleet.counters.connects > CARS,
        "cars reconnected: {}",
        fleet.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusing_cars_fail_with_their_code_and_late_cars_still_activate() {
    let retry = Retry {
        attempts: 4,
        attempt_timeout: "1s",
        backoff: "1s",
    };
    // 10% of cars fail their store (STORAGE_FAILED); 20% connect only 3 s after the rest.
    let env = Env::start(
        sim(),
        CARS,
        retry,
        &[
            "--refuse",
            "0.1",
            "--offline-at-start",
            "0.2",
            "--offline-for",
            "3s",
            "--net-delay",
            "20ms",
        ],
    )
    .await
    .unwrap();
    let refusing: HashSet<String> = env.with_fault("refuse").into_iter().collect();
    let late: HashSet<String> = env.with_fault("offline").into_iter().collect();
    assert!(!refusing.is_empty() && !late.is_empty());
    let reqs = activate_all(&env, "seat-cooling", "seat_cooling").await;
    let ids: Vec<String> = reqs.iter().map(|(_, id)| id.clone()).collect();
    let n = env.receiver.wait_for(&ids, Duration::from_secs(40)).await;
    assert_eq!(n, ids.len(), "callbacks missing");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (vin, id) in &reqs {
        let cbs = env.receiver.callbacks(id);
        assert_eq!(cbs.len(), 1, "{vin}: {cbs:?}");
        if refusing.contains(vin) {
            assert_eq!(cbs[0].status, "FAILED", "{vin}");
            assert_eq!(
                cbs[0].error_code.as_deref(),
                Some("STORAGE_FAILED"),
                "{vin}"
            );
            assert_ne!(
                service_state(&env, vin, "seat-cooling").await.as_deref(),
                Some("ACTIVE"),
                "{vin}"
            );
        } else {
            assert_eq!(
                cbs[0].status,
                "ACTIVATED",
                "{vin} (late: {})",
                late.contains(vin)
            );
        }
    }
}

/// Waits up to 20 s for the fleet workers of `prefix` to be gone; how many are left.
fn workers_left_after_wait(prefix: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = caas_tests::fleet_workers(prefix);
        if n == 0 || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A 40-car fleet in two worker processes, its VINs starting with `prefix`.
async fn fleet_of_two_workers(prefix: &str) -> Env {
    let retry = Retry {
        attempts: 2,
        attempt_timeout: "1s",
        backoff: "500ms",
    };
    let env = Env::start(
        sim(),
        40,
        retry,
        &["--workers", "2", "--vin-prefix", prefix],
    )
    .await
    .unwrap();
    assert_eq!(caas_tests::fleet_workers(prefix), 2);
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_workers_stop_with_their_parent_however_it_ends() {
    // Asked to stop: the parent tells its workers, and its report covers all their cars.
    let mut env = fleet_of_two_workers("SMVWKA").await;
    let report = env.stop_fleet().unwrap();
    assert_eq!((report.cars, report.workers), (40, 2), "{}", report.text());
    assert_eq!(report.cars_connected, 40, "{}", report.text());
    assert_eq!(workers_left_after_wait("SMVWKA"), 0);

    // Killed outright: the workers see their standard input close and end too.
    let mut env = fleet_of_two_workers("SMVWKB").await;
    env.kill_fleet().unwrap();
    assert_eq!(workers_left_after_wait("SMVWKB"), 0);
}

/// The benchmark end to end on a small fleet: its gateway, its fleet process and its
/// load all work together, and what it measures adds up; with `--baseline`, a second
/// gateway binary gets its own column right after, and the ratios close the table.
#[test]
fn a_small_bench_fills_its_table_without_errors() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("table.md");
    // The baseline gateway: this same build, started as a `caas-gateway` binary would be
    // (`BIN serve ...`).
    let baseline = dir.path().join("baseline-gateway");
    std::fs::write(
        &baseline,
        format!("#!/bin/sh\nexec '{}' gateway \"$@\"\n", sim().display()),
    )
    .unwrap();
    std::fs::set_permissions(
        &baseline,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = std::process::Command::new(sim())
        .args(["bench", "--cars", "100", "--rates", "200", "--step", "1s"])
        .args(["--latency-rate", "200", "--latency-duration", "1s"])
        .args(["--only", "embedded", "--no-progress", "--out"])
        .arg(&table)
        .arg("--samples")
        .arg(dir.path())
        .arg("--baseline")
        .arg(&baseline)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    for tag in ["embedded", "embedded-baseline"] {
        for campaign in ["campaign 1", "campaign 2"] {
            assert!(
                log.lines()
                    .any(|l| l.starts_with(&format!("bench[{tag}]: {campaign} "))
                        && l.contains("(100 COMPLETED, 0 FAILED")),
                "{tag}: {campaign} did not complete every car:\n{log}"
            );
        }
    }
    let table = std::fs::read_to_string(&table).unwrap();
    for row in [
        "| | embedded rumqttd | embedded rumqttd, baseline gateway |",
        "| cars connected | 100 | 100 |",
        "| callbacks missing or repeated | 0 | 0 |",
        "| requests refused or failed in HTTP (all rates) | 0 | 0 |",
    ] {
        assert!(table.contains(row), "{row} missing in\n{table}");
    }
    assert!(!table.contains("| errors |"), "{table}");
    let stages = table
        .lines()
        .find(|l| l.starts_with("| mean per stage at 200/s"))
        .unwrap_or_else(|| panic!("no stage row in\n{table}"));
    assert!(stages.ends_with(" ms |"), "{stages}");
    // The floor: bare MQTT and HTTP round trips and disk flushes timed, none lost or skipped.
    let floor = table
        .lines()
        .find(|l| l.starts_with("| floor at 200/s, p50 / p99:"))
        .unwrap_or_else(|| panic!("no floor row in\n{table}"));
    let cells: Vec<&str> = floor.split(" | ").skip(1).collect();
    assert_eq!(cells.len(), 2, "{floor}");
    for cell in cells {
        let cell = cell.trim_end_matches(" |");
        assert!(
            cell.matches(" ms").count() == 3 && !cell.contains('(') && !cell.contains('-'),
            "{floor}"
        );
    }
    let campaigns = table
        .lines()
        .find(|l| l.starts_with("| this build ÷ baseline: campaign first / repeat |"))
        .unwrap_or_else(|| panic!("no ratio row in\n{table}"));
    assert!(campaigns.ends_with("× | - |"), "{campaigns}");
    // The latency rows' requests, one line each, every one with its callback's latency.
    for file in ["latency-embedded.csv", "latency-embedded-baseline.csv"] {
        let samples = std::fs::read_to_string(dir.path().join(file)).unwrap();
        let mut lines = samples.lines();
        assert_eq!(lines.next(), Some("posted_ms,callback_ms,request_id"));
        let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
        assert!(
            rows.len() >= 150,
            "{file}: {} latency-row requests:\n{samples}",
            rows.len()
        );
        for row in &rows {
            assert_eq!(row.len(), 3, "{row:?}");
            assert!(row[1].parse::<f64>().is_ok_and(|ms| ms > 0.0), "{row:?}");
        }
    }
}
