#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! `caasctl request show`, `caasctl campaign show` and `caasctl gateway tickets` against a
//! real gateway started in this process, whose retry policy is tiny (2 attempts of 300 ms,
//! 100 ms apart) and to which no car can connect: an activation and a campaign's requests go
//! unanswered, end FAILED within about a second, and each opens a support ticket, so the
//! commands are seen on requests in flight, on final ones, and on real tickets.

mod common;

use std::time::Duration;

use common::{caasctl, caasctl_env, gateway_config, get, post, register_car, start_gateway};
use serde_json::{json, Value};

use common::{ctl, value_of, OPS_TOKEN as TOKEN};
const VIN1: &str = "WVWZZZ1JZXW000001";
const VIN2: &str = "WVWZZZ1JZXW000002";
const VIN3: &str = "WVWZZZ1JZXW000003";
/// Never registered: the campaign refuses it.
const UNKNOWN_VIN: &str = "WVWZZZ1JZXW000009";

fn gateway(dir: &std::path::Path) -> String {
    gateway_waiting(dir, Duration::from_millis(300))
}

/// A gateway whose requests give up after 2 attempts of `attempt_timeout`.
fn gateway_waiting(dir: &std::path::Path, attempt_timeout: Duration) -> String {
    let mut config = gateway_config(dir.join("gw"), TOKEN);
    config.retry = caas_gateway::RetryPolicy {
        attempts: 2,
        attempt_timeout,
        backoff: vec![Duration::from_millis(100)],
    };
    start_gateway(config)
}

/// A table row's cells (cells are two or more spaces apart; a cell holds at most one).
fn cells(line: &str) -> Vec<&str> {
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect()
}

fn activate(base: &str, vin: &str) -> String {
    let body = json!({
        "vin": vin,
        "serviceId": "power-boost",
        "configuration": {"featureFlags": ["power_boost"]},
        "duration": {"type": "PERMANENT"},
    });
    let (status, answer) = post(base, TOKEN, "/ota/activate", &body, None);
    assert_eq!(status, 202, "{answer}");
    answer["requestId"].as_str().unwrap().to_owned()
}

/// `POST /campaigns` activating snow mode on `vins`: the 202's body.
fn snow_campaign(base: &str, vins: &[&str]) -> Value {
    let body = json!({
        "vins": vins,
        "action": "ACTIVATE",
        "serviceId": "snow-mode",
        "configuration": {"featureFlags": ["snow_mode"]},
        "duration": {"type": "PERMANENT"},
    });
    let (status, answer) = post(base, TOKEN, "/campaigns", &body, None);
    assert_eq!(status, 202, "{answer}");
    answer
}

#[test]
fn request_campaign_and_tickets_show_what_the_gateway_did_with_unanswered_requests() {
    let dir = tempfile::tempdir().unwrap();
    let base = gateway(dir.path());
    for (i, vin) in [VIN1, VIN2, VIN3].into_iter().enumerate() {
        register_car(&base, TOKEN, vin, 10 + u8::try_from(i).unwrap());
    }

    // An activation for a car that never answers, seen while the gateway may still be on it.
    let id = activate(&base, VIN1);
    let t = ctl(&base, &["request", "show", &id]).ok().to_owned();
    assert_eq!(value_of(&t, "Request"), id, "{t}");
    assert_eq!(value_of(&t, "VIN"), VIN1, "{t}");
    assert_eq!(value_of(&t, "Action"), "ACTIVATE", "{t}");
    assert_eq!(value_of(&t, "Service"), "power-boost", "{t}");
    assert_eq!(value_of(&t, "Campaign"), "-", "{t}");
    assert!(
        ["QUEUED", "IN_PROGRESS", "FAILED"].contains(&value_of(&t, "Status")),
        "{t}"
    );

    // Once its retries are spent it is FAILED, with the attempts and the code that say why.
    let path = format!("/ota/requests/{id}");
    common::wait_for("the activation to fail", || {
        get(&base, TOKEN, &path)["status"] == "FAILED"
    });
    let t = ctl(&base, &["request", "show", &id]).ok().to_owned();
    assert_eq!(value_of(&t, "Status"), "FAILED", "{t}");
    assert_eq!(value_of(&t, "Phase"), "DONE", "{t}");
    assert_eq!(value_of(&t, "Attempts"), "2", "{t}");
    assert_eq!(value_of(&t, "Error code"), "NO_CONFIRMATION", "{t}");
    assert_ne!(value_of(&t, "Completed"), "-", "{t}");
    let gw: Value = get(&base, TOKEN, &path);
    assert_eq!(value_of(&t, "Seq"), gw["seq"].to_string(), "{t}");
    assert_eq!(value_of(&t, "Created"), gw["createdAt"].as_str().unwrap());
    // --json is the gateway's own answer; the environment gives the gateway and the token.
    let run = caasctl_env(
        &["request", "show", &id, "--json"],
        &[("CAAS_GATEWAY_URL", &base), ("CAAS_API_TOKEN", TOKEN)],
    );
    let v: Value = serde_json::from_str(run.ok()).unwrap();
    assert_eq!(v["requestId"], id.as_str());
    assert_eq!(v["status"], "FAILED");
    assert_eq!(v["attempts"], 2);
    assert_eq!(v["errorCode"], "NO_CONFIRMATION");

    // A campaign of two cars and one the gateway does not know.
    let answer = snow_campaign(&base, &[VIN2, VIN3, UNKNOWN_VIN]);
    assert_eq!(answer["accepted"], 2, "{answer}");
    let cid = answer["campaignId"].as_str().unwrap().to_owned();
    let cpath = format!("/campaigns/{cid}");
    common::wait_for("the campaign's two requests to fail", || {
        get(&base, TOKEN, &cpath)["counts"]["FAILED"] == 2
    });
    let t = ctl(&base, &["campaign", "show", &cid]).ok().to_owned();
    assert_eq!(value_of(&t, "Campaign"), cid, "{t}");
    assert_eq!(value_of(&t, "Action"), "ACTIVATE", "{t}");
    assert_eq!(value_of(&t, "Service"), "snow-mode", "{t}");
    assert_eq!(
        value_of(&t, "Total VINs"),
        answer["total"].to_string(),
        "{t}"
    );
    let counts: Vec<Vec<&str>> = t
        .lines()
        .skip_while(|l| *l != "Requests by state:")
        .skip(1)
        .map(cells)
        .collect();
    assert_eq!(
        counts,
        [
            vec!["STATE", "COUNT"],
            vec!["QUEUED", "0"],
            vec!["IN_PROGRESS", "0"],
            vec!["COMPLETED", "0"],
            vec!["FAILED", "2"],
        ],
        "{t}"
    );
    let run = ctl(&base, &["campaign", "show", &cid, "--json"]);
    let v: Value = serde_json::from_str(run.ok()).unwrap();
    assert_eq!(v["campaignId"], cid.as_str());
    assert_eq!(v["counts"]["FAILED"], 2);

    // Three requests failed unanswered: three tickets, the activation's among them, with the
    // car's diagnostics (what it was registered with, as it never reported).
    common::wait_for("three tickets", || {
        get(&base, TOKEN, "/support/tickets")["tickets"]
            .as_array()
            .is_some_and(|t| t.len() == 3)
    });
    let t = ctl(&base, &["gateway", "tickets"]).ok().to_owned();
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines[0], "Support tickets: 3, newest first", "{t}");
    let header = cells(lines[1]);
    let column = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("no {name} column in\n{t}"))
    };
    let row = cells(
        lines
            .iter()
            .find(|l| l.contains(&id))
            .unwrap_or_else(|| panic!("no ticket of {id} in\n{t}")),
    );
    assert_eq!(row.len(), header.len(), "{t}");
    assert_eq!(row[column("VIN")], VIN1, "{t}");
    assert_eq!(row[column("SERVICE")], "power-boost", "{t}");
    assert_eq!(row[column("ACTION")], "ACTIVATE", "{t}");
    assert_eq!(row[column("ATTEMPTS")], "2", "{t}");
    assert_eq!(row[column("PROBE ANSWERED")], "false", "{t}");
    assert_eq!(row[column("FIRMWARE")], "1.0.0", "{t}");
    assert!(row[column("REASON")].starts_with("NO_CONFIRMATION"), "{t}");
    let campaign_rows = lines[2..]
        .iter()
        .filter(|l| (l.contains(VIN2) || l.contains(VIN3)) && l.contains("snow-mode"))
        .count();
    assert_eq!(campaign_rows, 2, "{t}");
    assert_eq!(lines.len(), 5, "a page that is not full has no hint:\n{t}");

    // Pages of one: each names the command for the next, which shows the next older
    // ticket, down to the last; together they are the three, newest first.
    let all = get(&base, TOKEN, "/support/tickets");
    let all_ids: Vec<&str> = all["tickets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["ticketId"].as_str().unwrap())
        .collect();
    let mut args = vec![
        "gateway".to_owned(),
        "tickets".into(),
        "--limit".into(),
        "1".into(),
    ];
    let mut shown = Vec::new();
    loop {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let t = ctl(&base, &argv).ok().to_owned();
        let ids: Vec<&str> = all_ids
            .iter()
            .copied()
            .filter(|id| t.contains(id))
            .collect();
        assert_eq!(ids.len(), 1, "{argv:?}: {t}");
        shown.push(ids[0]);
        match t
            .lines()
            .last()
            .and_then(|l| l.strip_prefix("Older tickets: caasctl "))
        {
            Some(next) => args = next.split(' ').map(str::to_owned).collect(),
            None => break,
        }
        assert!(shown.len() <= all_ids.len(), "pages repeat: {shown:?}");
    }
    assert_eq!(shown, all_ids);
    // One car's: only the activation's ticket is car 1's.
    let t = ctl(&base, &["gateway", "tickets", "--vin", VIN1])
        .ok()
        .to_owned();
    assert!(t.starts_with("Support tickets: 1, newest first\n"), "{t}");
    let run = ctl(&base, &["gateway", "tickets", "--limit", "2", "--json"]);
    let v: Value = serde_json::from_str(run.ok()).unwrap();
    assert_eq!(v["tickets"].as_array().unwrap().len(), 2, "{v}");
    let all = get(&base, TOKEN, "/support/tickets");
    assert_eq!(v["tickets"][0], all["tickets"][0]);
}

#[test]
fn cancel_ends_a_request_and_a_campaign_still_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    // Attempts of a minute: nothing ends on its own during the test.
    let base = gateway_waiting(dir.path(), Duration::from_secs(60));
    for (i, vin) in [VIN1, VIN2, VIN3].into_iter().enumerate() {
        register_car(&base, TOKEN, vin, 10 + u8::try_from(i).unwrap());
    }
    let id = activate(&base, VIN1);
    let t = ctl(&base, &["request", "show", &id]).ok().to_owned();
    assert_eq!(value_of(&t, "Status"), "IN_PROGRESS", "{t}");
    for _ in 0..2 {
        // The same answer again for a request already cancelled.
        let t = ctl(&base, &["request", "cancel", &id]).ok().to_owned();
        assert_eq!(value_of(&t, "Status"), "FAILED", "{t}");
        assert_eq!(value_of(&t, "Error code"), "CANCELLED", "{t}");
    }
    assert_eq!(
        get(&base, TOKEN, &format!("/ota/requests/{id}"))["errorCode"],
        "CANCELLED"
    );

    let answer = snow_campaign(&base, &[VIN2, VIN3]);
    let cid = answer["campaignId"].as_str().unwrap().to_owned();
    let t = ctl(&base, &["campaign", "show", &cid]).ok().to_owned();
    assert_eq!(value_of(&t, "Cancelled"), "-", "{t}");
    // Its requests, one per page in the order of its VINs, following the tool's own
    // next-page commands.
    let mut args: Vec<String> = ["campaign", "requests", &cid, "--limit", "1"]
        .map(str::to_owned)
        .to_vec();
    let mut vins_seen = Vec::new();
    loop {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let t = ctl(&base, &argv).ok().to_owned();
        assert!(
            t.starts_with(&format!("Requests of campaign {cid}: 1, ")),
            "{t}"
        );
        vins_seen.extend([VIN2, VIN3].into_iter().filter(|v| t.contains(v)));
        match t
            .lines()
            .last()
            .and_then(|l| l.strip_prefix("More requests: caasctl "))
        {
            Some(next) => args = next.split(' ').map(str::to_owned).collect(),
            None => break,
        }
        assert!(vins_seen.len() <= 2, "pages repeat: {vins_seen:?}");
    }
    assert_eq!(vins_seen, [VIN2, VIN3]);
    // Listed newest first: one per page, the next page's command ends the first.
    let newest = snow_campaign(&base, &[VIN2]);
    let newest_id = newest["campaignId"].as_str().unwrap();
    let t = ctl(&base, &["campaign", "list"]).ok().to_owned();
    assert!(t.starts_with("Campaigns: 2, newest first\n"), "{t}");
    let first = ctl(&base, &["campaign", "list", "--limit", "1"])
        .ok()
        .to_owned();
    assert!(
        first.contains(newest_id) && !first.contains(&cid),
        "{first}"
    );
    let next = first
        .lines()
        .last()
        .and_then(|l| l.strip_prefix("Older campaigns: caasctl "))
        .unwrap_or_else(|| panic!("no next page in {first}"));
    let args: Vec<&str> = next.split(' ').collect();
    let second = ctl(&base, &args).ok().to_owned();
    assert!(
        second.contains(&cid) && !second.contains("Older campaigns"),
        "{second}"
    );
    // Without --yes nothing is sent: the campaign is not cancelled.
    let line = ctl(&base, &["campaign", "cancel", &cid]).err().to_owned();
    assert!(line.contains("--yes"), "{line}");
    assert_eq!(
        get(&base, TOKEN, &format!("/campaigns/{cid}"))["cancelledAt"],
        Value::Null
    );
    let t = ctl(&base, &["campaign", "cancel", &cid, "--yes"])
        .ok()
        .to_owned();
    assert_ne!(value_of(&t, "Cancelled"), "-", "{t}");
    assert_eq!(value_of(&t, "cancelledNow"), "2", "{t}");
    let t = ctl(&base, &["campaign", "requests", &cid, "--status", "FAILED"])
        .ok()
        .to_owned();
    assert!(
        t.contains("CANCELLED") && t.contains(VIN2) && t.contains(VIN3),
        "{t}"
    );
    let t = ctl(
        &base,
        &["campaign", "requests", &cid, "--status", "IN_PROGRESS"],
    )
    .ok()
    .to_owned();
    assert!(
        t.starts_with(&format!("Requests of campaign {cid}: 0, ")),
        "{t}"
    );
    let run = ctl(&base, &["campaign", "cancel", &cid, "--yes", "--json"]);
    let v: Value = serde_json::from_str(run.ok()).unwrap();
    assert_eq!(
        (&v["cancelledNow"], &v["counts"]["FAILED"]),
        (&json!(0), &json!(2)),
        "{v}"
    );

    // An unknown request and a malformed id: exit 1 and one clear line.
    let unknown = "0b6f3a52-9c1e-4d2a-8f00-1234567890ab";
    let line = ctl(&base, &["request", "cancel", unknown]).err().to_owned();
    assert!(
        line.contains("HTTP 404") && line.contains("unknown request"),
        "{line}"
    );
    let line = ctl(&base, &["campaign", "cancel", "1234", "--yes"])
        .err()
        .to_owned();
    assert!(line.contains(r#"invalid campaign id "1234""#), "{line}");
}

#[test]
fn unknown_and_malformed_ids_a_wrong_token_and_no_gateway_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let base = gateway(dir.path());
    let unknown = "0b6f3a52-9c1e-4d2a-8f00-1234567890ab";

    let line = ctl(&base, &["request", "show", unknown]).err().to_owned();
    assert!(line.contains("HTTP 404"), "{line}");
    assert!(
        line.contains(r#""error":"unknown request""#) && line.contains(unknown),
        "{line}"
    );
    let line = ctl(&base, &["campaign", "show", unknown]).err().to_owned();
    assert!(
        line.contains("HTTP 404") && line.contains(r#""error":"unknown campaign""#),
        "{line}"
    );

    let line = ctl(&base, &["request", "show", "not-a-uuid"])
        .err()
        .to_owned();
    assert!(
        line.contains(r#"invalid request id "not-a-uuid""#),
        "{line}"
    );
    let line = ctl(&base, &["campaign", "show", "1234"]).err().to_owned();
    assert!(line.contains(r#"invalid campaign id "1234""#), "{line}");

    let run = caasctl(&["gateway", "tickets", "--gateway", &base, "--token", "wrong"]);
    assert!(run.err().contains("HTTP 401"), "{}", run.stderr);
    // No tickets yet: an empty list, not an error.
    assert_eq!(
        ctl(&base, &["gateway", "tickets"]).ok(),
        "Support tickets: 0, newest first\n"
    );
    // A bad VIN is refused before anything is sent; the gateway names a bad cursor and an
    // unknown car.
    let line = ctl(&base, &["gateway", "tickets", "--vin", "NOT-A-VIN"])
        .err()
        .to_owned();
    assert!(line.contains("NOT-A-VIN"), "{line}");
    let line = ctl(&base, &["gateway", "tickets", "--before", "yesterday"])
        .err()
        .to_owned();
    assert!(
        line.contains("HTTP 400") && line.contains(r#""field":"before""#),
        "{line}"
    );
    let line = ctl(&base, &["gateway", "tickets", "--vin", UNKNOWN_VIN])
        .err()
        .to_owned();
    assert!(
        line.contains("HTTP 404") && line.contains(r#""field":"vin""#),
        "{line}"
    );

    // Nobody listening: take a free port and let it go.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let nobody = format!("http://{free}");
    for args in [
        vec!["request", "show", unknown],
        vec!["campaign", "show", unknown],
        vec!["gateway", "tickets"],
    ] {
        let run = caasctl(&[args.as_slice(), &["--gateway", &nobody, "--token", TOKEN]].concat());
        let line = run.err();
        assert!(
            line.contains("cannot reach") && line.contains(&free.to_string()),
            "{args:?}: {line}"
        );
    }

    // Out-of-range limits are usage errors (clap, exit 2).
    for bad in ["0", "501", "x"] {
        let run = ctl(&base, &["gateway", "tickets", "--limit", bad]);
        assert_eq!(run.code, 2, "--limit {bad}: {}", run.stderr);
    }
}

#[test]
fn campaign_show_and_list_show_an_abort_rule_from_a_real_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let base = gateway_waiting(dir.path(), Duration::from_secs(60));
    register_car(&base, TOKEN, VIN1, 10);
    let body = json!({
        "vins": [VIN1],
        "action": "ACTIVATE",
        "serviceId": "snow-mode",
        "configuration": {"featureFlags": ["snow_mode"]},
        "duration": {"type": "PERMANENT"},
        "abortWhen": {"refusedPercent": 40},
    });
    let (status, answer) = post(&base, TOKEN, "/campaigns", &body, None);
    assert_eq!(status, 202, "{answer}");
    let cid = answer["campaignId"].as_str().unwrap().to_owned();
    let t = ctl(&base, &["campaign", "show", &cid]).ok().to_owned();
    assert_eq!(
        value_of(&t, "Abort when"),
        "40% of at least 20 finished requests refused by their cars",
        "{t}"
    );
    // Not aborted: no abort lines.
    assert!(!t.contains("Aborted") && !t.contains("Abort reason"), "{t}");
    let run = ctl(&base, &["campaign", "show", &cid, "--json"]);
    let v: Value = serde_json::from_str(run.ok()).unwrap();
    assert_eq!(
        v["abortWhen"],
        json!({"refusedPercent": 40, "minFinished": 20})
    );
    assert_eq!(
        (&v["abortedAt"], &v["abortReason"]),
        (&Value::Null, &Value::Null)
    );
    // A campaign without a rule shows none, and the list keeps its columns.
    let plain = snow_campaign(&base, &[VIN1]);
    let t = ctl(
        &base,
        &["campaign", "show", plain["campaignId"].as_str().unwrap()],
    )
    .ok()
    .to_owned();
    assert!(!t.contains("bort"), "{t}");
    let t = ctl(&base, &["campaign", "list"]).ok().to_owned();
    assert!(t.starts_with("Campaigns: 2, newest first\n"), "{t}");
    assert_eq!(
        cells(t.lines().nth(1).unwrap()),
        [
            "CAMPAIGN",
            "CREATED",
            "ACTION",
            "SERVICE",
            "VINS",
            "CANCELLED"
        ],
        "{t}"
    );
}
