//! The system's promises, checked end to end with real processes (see the crate docs).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use caas_protocol::CommandBody;
use caas_sim::api::Lasting;
use caas_sim::gateway_proc::{mosquitto_binary, Mosquitto};
use caas_sim::scenario::{run_scenario, Scenario, ServiceMix};
use caas_tests::{CommandWatch, Env, Retry};
use serde_json::Value;

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
    const ATTEMPTS: u32 = 3;
    let retry = Retry {
        attempts: ATTEMPTS,
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
    // What the silent cars are sent, counted where they receive it.
    let key = env.api.gateway_key().await.unwrap();
    let watched: Vec<String> = silent.iter().cloned().collect();
    let watch = CommandWatch::start(&env.gateway.mqtt, key, &watched)
        .await
        .unwrap();
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
    let tickets = env.gateway.get("/support/tickets").await.unwrap();
    let tickets = tickets["tickets"].as_array().unwrap();
    assert_eq!(
        tickets.len(),
        silent.len(),
        "one ticket per silent car, none for the others: {tickets:?}"
    );
    for (vin, id) in reqs.iter().filter(|(v, _)| silent.contains(v)) {
        let req = env.api.request(id).await.unwrap();
        assert_eq!(req["status"], "FAILED", "{vin}: {req}");
        assert_eq!(req["attempts"], ATTEMPTS, "{vin}: {req}");
        let code = req["errorCode"].as_str().unwrap();
        assert_eq!(
            env.receiver.callbacks(id)[0].error_code.as_deref(),
            Some(code),
            "{vin}"
        );
        let seq = req["seq"].as_u64().unwrap();

        // The gateway's account, oldest first: the request (attempt 1), the re-sends, one
        // status query, then the withdrawal and the result.
        let h = env.api.history(vin).await.unwrap();
        let mut steps: Vec<(String, String)> = h["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["requestId"] == id.as_str())
            .map(|e| {
                (
                    e["type"].as_str().unwrap_or("").to_string(),
                    e["detail"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        steps.reverse();
        let mut expected = vec![("REQUEST".to_string(), "ACTIVATE offroad-mode".to_string())];
        for attempt in 2..=ATTEMPTS {
            expected.push(("COMMAND".into(), format!("attempt {attempt} (re-sent)")));
        }
        expected.push((
            "COMMAND".into(),
            "status query after the last attempt".into(),
        ));
        expected.push(("COMMAND".into(), "withdraw offroad-mode".into()));
        expected.push(("RESULT".into(), format!("FAILED {code}")));
        assert_eq!(steps, expected, "{vin}: {h}");

        // The car's side: the grant arrived exactly once per attempt, then one status query,
        // then a newer state without it.
        let cmds = watch.commands(vin);
        let granted = |c: &caas_protocol::Command| match &c.body {
            CommandBody::SetState(s) => s
                .grants
                .iter()
                .any(|g| g.service_id.as_str() == "offroad-mode"),
            CommandBody::QueryStatus { .. } => false,
        };
        let attempts = cmds.iter().filter(|c| c.seq == seq && granted(c)).count();
        assert_eq!(attempts, ATTEMPTS as usize, "{vin}: {cmds:?}");
        let queries = cmds
            .iter()
            .filter(|c| matches!(c.body, CommandBody::QueryStatus { .. }))
            .count();
        assert_eq!(queries, 1, "{vin}: {cmds:?}");
        let last = cmds.last().unwrap();
        assert!(
            matches!(last.body, CommandBody::SetState(_)) && last.seq > seq && !granted(last),
            "{vin}: the last command does not withdraw the grant: {cmds:?}"
        );

        // Withdrawn: never ACTIVE at the gateway either.
        let state = service_state(&env, vin, "offroad-mode").await;
        assert_ne!(state.as_deref(), Some("ACTIVE"), "{vin}");

        // The support ticket, with what support needs to look into it.
        let t = tickets
            .iter()
            .find(|t| t["requestId"] == id.as_str())
            .unwrap_or_else(|| panic!("{vin}: no ticket for {id} in {tickets:?}"));
        assert_eq!(t["vin"], vin.as_str(), "{t}");
        assert_eq!(t["serviceId"], "offroad-mode", "{t}");
        assert_eq!(t["attempts"], ATTEMPTS, "{t}");
        assert_eq!(t["probeAnswered"], false, "{t}");
        assert_eq!(t["expectedSeq"], seq, "{t}");
        assert!(t["reason"].as_str().unwrap().contains(code), "{t}");
        assert!(t["lastSeen"].is_string(), "{t}");
        let diag = &t["diagnostics"];
        assert!(
            diag["firmwareVersion"]
                .as_str()
                .is_some_and(|v| !v.is_empty())
                && diag["errorCodes"].is_array(),
            "{vin}: ticket without the car's diagnostics: {t}"
        );
    }
    assert_eq!(watch.unreadable(), 0, "frames that did not verify");
    assert_eq!(
        watch.connects(),
        silent.len() as u64,
        "a watcher reconnected: a retained command may have been counted twice"
    );
    for (vin, _) in reqs.iter().filter(|(v, _)| !silent.contains(v)).take(20) {
        assert_eq!(
            service_state(&env, vin, "offroad-mode").await.as_deref(),
            Some("ACTIVE"),
            "{vin}"
        );
    }
}

/// Activates a service on every car of `env` and, at once after the last 2xx, SIGKILLs the
/// gateway and starts it again on its data: every request still completes, with one
/// ACTIVATED callback each.
async fn requests_survive_kill_9_after_their_2xx(broker: Option<&str>) {
    let retry = Retry {
        attempts: 4,
        attempt_timeout: "2s",
        backoff: "500ms",
    };
    // Each car handles a command 2 s after it arrives, so none can be confirmed before the
    // kill: what the cars report reaches a gateway that is dead or has just restarted.
    let mut env = Env::start_on(sim(), broker, 8, retry, &["--net-delay", "2s"])
        .await
        .unwrap();
    let reqs = activate_all(&env, "power-boost", "power_boost").await;
    env.gateway.kill_9().unwrap();
    let ids: Vec<String> = reqs.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(
        env.receiver.answered(&ids),
        0,
        "a request completed before the kill, so the test would show nothing"
    );
    env.restart_gateway().await.unwrap();
    for id in &ids {
        // Durable at its 2xx: the restarted gateway knows it.
        let r = env.api.request(id).await.unwrap();
        assert!(
            matches!(r["status"].as_str(), Some("IN_PROGRESS" | "COMPLETED")),
            "{r}"
        );
    }
    let n = env.receiver.wait_for(&ids, Duration::from_secs(60)).await;
    assert_eq!(
        n,
        ids.len(),
        "callbacks missing; gateway log:\n{}",
        env.gateway.log_text()
    );
    // Time for a repeated callback to show.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (vin, id) in &reqs {
        assert_eq!(status_of(&env, id), vec!["ACTIVATED"], "{vin}");
        assert_eq!(env.api.request(id).await.unwrap()["status"], "COMPLETED");
        assert_eq!(
            service_state(&env, vin, "power-boost").await.as_deref(),
            Some("ACTIVE"),
            "{vin}"
        );
    }
    assert_eq!(env.receiver.counts().bad_signature, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_survive_kill_9_of_the_gateway_after_their_2xx() {
    requests_survive_kill_9_after_their_2xx(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_survive_kill_9_of_the_gateway_with_mosquitto_as_the_broker() {
    if mosquitto_binary().is_none() {
        eprintln!(
            "\n*** SKIPPED: mosquitto is not installed (scripts/install-deps.sh installs it) ***\n"
        );
        return;
    }
    // Mosquitto keeps running through the gateway's kill and restart; the cars stay
    // connected to it.
    let mosquitto = Mosquitto::start().await.unwrap();
    requests_survive_kill_9_after_their_2xx(Some(&format!("mqtt://{}", mosquitto.addr))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_sigint_stop_the_gateway_cleanly_and_lose_no_request() {
    let retry = Retry {
        attempts: 4,
        attempt_timeout: "2s",
        backoff: "500ms",
    };
    // Each car handles a command 1 s after it arrives: the requests accepted just before
    // the signal are still in flight when it comes.
    let mut env = Env::start(sim(), 5, retry, &["--net-delay", "1s"])
        .await
        .unwrap();
    for (signal, svc, flag) in [
        ("TERM", "snow-mode", "snow_mode"),
        ("INT", "sport-mode", "sport_mode"),
    ] {
        let reqs = activate_all(&env, svc, flag).await;
        let ids: Vec<String> = reqs.iter().map(|(_, id)| id.clone()).collect();
        let stops = env.gateway.log_text().matches("gateway stopped").count();
        let sent = Instant::now();
        let status = env.gateway.signal(signal, Duration::from_secs(30)).unwrap();
        let took = sent.elapsed();
        assert_eq!(
            status.code(),
            Some(0),
            "SIG{signal}: {status}; log:\n{}",
            env.gateway.log_text()
        );
        assert_eq!(
            env.gateway.log_text().matches("gateway stopped").count(),
            stops + 1,
            "SIG{signal}: the log does not show a clean stop:\n{}",
            env.gateway.log_text()
        );
        let before = env.receiver.answered(&ids);
        env.restart_gateway().await.unwrap();
        let n = env.receiver.wait_for(&ids, Duration::from_secs(60)).await;
        assert_eq!(n, ids.len(), "SIG{signal}: callbacks missing");
        // Time for a repeated callback to show.
        tokio::time::sleep(Duration::from_secs(1)).await;
        for (vin, id) in &reqs {
            assert_eq!(status_of(&env, id), vec!["ACTIVATED"], "SIG{signal}: {vin}");
            assert_eq!(env.api.request(id).await.unwrap()["status"], "COMPLETED");
        }
        eprintln!(
            "SIG{signal}: exit 0 after {:.2} s; {before} of {} requests had completed before, \
             the rest after the restart",
            took.as_secs_f64(),
            ids.len()
        );
    }
}

/// Kills the child when dropped.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `caas-gateway serve` with no flags (and no `CAAS_GATEWAY_*` settings) in an empty
/// directory serves the IoT API on 127.0.0.1:8080 and the broker on 127.0.0.1:1883, keeps
/// its data under ./data/gateway and takes the development token. No other test here uses
/// those fixed ports, but any program on this machine may hold them: the test then checks
/// that the gateway refused to start naming the loopback default it could not bind, and
/// says on stderr that this is all it checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_flags_the_gateway_serves_on_loopback() {
    let cwd = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let log_path = logs.path().join("gateway.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = Command::new(sim());
    cmd.args(["gateway", "serve"]).current_dir(cwd.path());
    for (k, _) in std::env::vars() {
        if k.starts_with("CAAS_GATEWAY_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    let mut gw = Reap(
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let pid = gw.0.id();
    let http: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let mqtt: SocketAddr = "127.0.0.1:1883".parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    // The HTTP listener is bound last: once it is there, so is everything else.
    let served = loop {
        if let Some(status) = gw.0.try_wait().unwrap() {
            break Err(status);
        }
        let addrs = caas_tests::listening_addrs(pid);
        if addrs.contains(&http) {
            break Ok(addrs);
        }
        assert!(
            Instant::now() < deadline,
            "not listening on {http} after 60 s; log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let addrs = match served {
        Ok(addrs) => addrs,
        Err(status) => {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            assert!(!status.success(), "{status}: {text}");
            assert!(
                (text.contains(&http.to_string()) || text.contains(&mqtt.to_string()))
                    && text.contains("in use"),
                "the gateway did not start, and not for a default port in use: {text}"
            );
            eprintln!(
                "\n*** another program holds {http} or {mqtt}: only checked that the \
                 defaults are these loopback addresses ***\n{text}"
            );
            return;
        }
    };
    assert!(addrs.contains(&mqtt), "{addrs:?}");
    assert!(
        addrs.iter().all(|a| a.ip().is_loopback()),
        "listening beyond loopback: {addrs:?}"
    );
    let client = reqwest::Client::new();
    let health = client
        .get(format!("http://{http}/healthz"))
        .send()
        .await
        .unwrap();
    assert!(health.status().is_success(), "{health:?}");
    let keys: Value = client
        .get(format!("http://{http}/keys"))
        .bearer_auth("dev-token")
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    let key_file = cwd.path().join("data/gateway/signing.key");
    let key = caas_protocol::files::read_signing_key(&key_file).unwrap();
    assert_eq!(
        keys["keys"][0]["publicKey"],
        caas_protocol::verifying_key_to_hex(&key.verifying_key()).as_str(),
        "{keys}"
    );
    let sent = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = gw.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit 30 s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0), "{status}");
}

/// caasctl, built as this package's `caas-e2e-ctl`.
fn ctl() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_caas-e2e-ctl"))
}

/// Its stdout, after checking it succeeded.
fn stdout_of(out: &Output) -> String {
    caas_tests::stdout_of(out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caasctl_shows_a_real_cars_services_and_history() {
    let retry = Retry {
        attempts: 4,
        attempt_timeout: "2s",
        backoff: "500ms",
    };
    let env = Env::start(sim(), 2, retry, &[]).await.unwrap();
    let vin = env.vins[0].clone();
    let id = env
        .api
        .activate(
            &vin,
            "heated-seats",
            &["heated_seats".to_string()],
            &serde_json::Map::new(),
            &Lasting::Permanent,
        )
        .await
        .unwrap();
    let n = env
        .receiver
        .wait_for(std::slice::from_ref(&id), Duration::from_secs(30))
        .await;
    assert_eq!(n, 1, "no callback");
    assert_eq!(status_of(&env, &id), vec!["ACTIVATED"]);
    let seq = env.api.request(&id).await.unwrap()["seq"].as_u64().unwrap();
    let gw = env.gateway.http.clone();
    let token = env.gateway.token.clone();
    let target = ["--gateway", gw.as_str(), "--token", token.as_str()];
    let with = |args: &[&str]| -> Vec<String> {
        args.iter()
            .chain(target.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let run = |args: Vec<String>| async move {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        caas_tests::caasctl(ctl(), &refs).await.unwrap()
    };

    // The status table: the car, online, with the service active.
    let t = stdout_of(&run(with(&["vehicle", "status", &vin])).await);
    let lines: Vec<&str> = t.lines().collect();
    let row = |key: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(key))
            .map(|l| l[key.len()..].trim().to_string())
            .unwrap_or_else(|| panic!("no {key} line in:\n{t}"))
    };
    assert_eq!(row("VIN"), vin, "{t}");
    assert_eq!(row("Connectivity"), "ONLINE", "{t}");
    assert_eq!(row("Active services:"), "1", "{t}");
    let service: Vec<&str> = lines
        .iter()
        .find(|l| l.starts_with("heated-seats "))
        .unwrap_or_else(|| panic!("no service row in:\n{t}"))
        .split_whitespace()
        .collect();
    assert_eq!(service[..2], ["heated-seats", "ACTIVE"], "{t}");

    // The same as JSON.
    let out = run(with(&["vehicle", "status", &vin, "--json"])).await;
    let v: Value = serde_json::from_str(&stdout_of(&out)).unwrap();
    assert_eq!(v["vin"], vin.as_str(), "{v}");
    assert_eq!(v["activeServices"][0]["serviceId"], "heated-seats", "{v}");
    assert_eq!(v["activeServices"][0]["status"], "ACTIVE", "{v}");

    // The history table, newest first: the request, the car's report of its seq, the
    // result.
    let t = stdout_of(&run(with(&["vehicle", "history", &vin])).await);
    let lines: Vec<&str> = t.lines().collect();
    assert!(lines[0].starts_with(&format!("History of {vin}: ")), "{t}");
    let header: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        header,
        ["TIME", "TYPE", "SEQ", "REQUEST", "DETAIL", "ID"],
        "{t}"
    );
    let has = |kind: &str, request: &str, detail: &str| {
        lines.iter().any(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            cells.len() > 4 && cells[1] == kind && cells[3] == request && l.contains(detail)
        })
    };
    assert!(has("REQUEST", &id, "ACTIVATE heated-seats"), "{t}");
    assert!(has("RESULT", &id, "ACTIVATED"), "{t}");
    assert!(has("REPORT", "-", &format!("applied seq {seq}")), "{t}");

    // Paging with the cursor the table offers: the entries below it.
    let t = stdout_of(&run(with(&["vehicle", "history", &vin, "--limit", "2"])).await);
    let hint = t
        .lines()
        .find_map(|l| l.strip_prefix("Older entries: caasctl "))
        .unwrap_or_else(|| panic!("no next-page hint in:\n{t}"));
    let mut next: Vec<&str> = hint.split_whitespace().collect();
    let cursor: u64 = next.last().unwrap().parse().unwrap();
    next.push("--json");
    let out = run(with(&next)).await;
    let page: Value = serde_json::from_str(&stdout_of(&out)).unwrap();

    // As JSON: the gateway's entries, newest first.
    let out = run(with(&["vehicle", "history", &vin, "--json"])).await;
    let h: Value = serde_json::from_str(&stdout_of(&out)).unwrap();
    let entries = h["entries"].as_array().unwrap();
    let id_of = |e: &Value| -> u64 { e["id"].as_str().unwrap().parse().unwrap() };
    let ids: Vec<u64> = entries.iter().map(id_of).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "not newest first: {h}");
    let result = entries
        .iter()
        .position(|e| e["type"] == "RESULT" && e["requestId"] == id.as_str())
        .unwrap_or_else(|| panic!("no result in {h}"));
    let request = entries
        .iter()
        .position(|e| e["type"] == "REQUEST" && e["requestId"] == id.as_str())
        .unwrap_or_else(|| panic!("no request in {h}"));
    assert!(result < request, "{h}");
    assert_eq!(entries[result]["detail"], "ACTIVATED", "{h}");
    // Entries only ever join at the top, so those below the cursor are the same now.
    let below: Vec<&Value> = entries
        .iter()
        .filter(|e| id_of(e) < cursor)
        .take(2)
        .collect();
    assert_eq!(below.len(), 2, "{h}");
    assert_eq!(
        page["entries"]
            .as_array()
            .unwrap()
            .iter()
            .collect::<Vec<_>>(),
        below,
        "the second page is not the two entries below the cursor {cursor}: {page}"
    );

    // The real gateway's refusals, each on one line with the exit status 1.
    let out = run(vec![
        "vehicle".into(),
        "status".into(),
        vin.clone(),
        "--gateway".into(),
        gw.clone(),
        "--token".into(),
        "wrong-token".into(),
    ])
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("HTTP 401"), "{err}");
    let out = run(with(&["vehicle", "history", "1HGCM82633A004352"])).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("HTTP 404") && err.contains(r#""field":"vin""#),
        "{err}"
    );
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
