#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! `caasctl vehicle list` against a real gateway started in this process, to which no car can
//! connect (every car is OFFLINE) and whose retry policy is tiny (2 attempts of 300 ms), so
//! that an activation fails within about a second and leaves its car a service in ERROR:
//! paging by the tool's own next-page commands, the filters, the JSON, and the refusals.

mod common;

use std::time::Duration;

use common::{caasctl, gateway_config, get, post, register_car, start_gateway};
use serde_json::{json, Value};

use common::{ctl, OPS_TOKEN as TOKEN};
/// In VIN order; registered in another order, so that the listing's order is the gateway's.
const VINS: [&str; 5] = [
    "WVWZZZ1JZXW000001",
    "WVWZZZ1JZXW000002",
    "WVWZZZ1JZXW000003",
    "WVWZZZ1JZXW000004",
    "WVWZZZ1JZXW000005",
];
const REGISTRATION_ORDER: [usize; 5] = [3, 0, 4, 1, 2];

fn gateway(dir: &std::path::Path) -> String {
    let mut config = gateway_config(dir.join("gw"), TOKEN);
    config.retry = caas_gateway::RetryPolicy {
        attempts: 2,
        attempt_timeout: Duration::from_millis(300),
        backoff: vec![Duration::from_millis(100)],
    };
    let base = start_gateway(config);
    for (seed, i) in (10u8..).zip(REGISTRATION_ORDER) {
        register_car(&base, TOKEN, VINS[i], seed);
    }
    base
}

/// A table row's cells (cells are two or more spaces apart; a cell holds at most one).
fn cells(line: &str) -> Vec<&str> {
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect()
}

/// Runs `caasctl vehicle list ARGS`, then each next-page command the tool prints, to the
/// end: the VINs of the pages' rows in the order shown, and the pages' texts.
fn follow_pages(base: &str, args: &[&str]) -> (Vec<String>, Vec<String>) {
    let mut argv: Vec<String> = ["vehicle", "list"]
        .iter()
        .chain(args)
        .map(|a| (*a).to_owned())
        .collect();
    let (mut vins, mut pages) = (Vec::new(), Vec::new());
    loop {
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        let t = ctl(base, &refs).ok().to_owned();
        vins.extend(
            t.lines()
                .filter_map(|l| cells(l).first().copied())
                .filter(|first| VINS.contains(first))
                .map(str::to_owned),
        );
        let next = t
            .lines()
            .last()
            .and_then(|l| l.strip_prefix("More vehicles: caasctl "))
            .map(|next| next.split(' ').map(str::to_owned).collect());
        pages.push(t);
        match next {
            Some(next) => argv = next,
            None => break,
        }
        assert!(pages.len() <= VINS.len() + 1, "pages repeat: {pages:?}");
    }
    (vins, pages)
}

#[test]
fn the_next_page_commands_list_every_car_once_in_vin_order_and_the_filters_keep_theirs() {
    let dir = tempfile::tempdir().unwrap();
    let base = gateway(dir.path());

    // One page: a row per car, registered with firmware 1.0.0 and never connected.
    let t = ctl(&base, &["vehicle", "list"]).ok().to_owned();
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines[0], "Vehicles: 5, in VIN order", "{t}");
    assert_eq!(
        cells(lines[1]),
        [
            "VIN",
            "CONNECTIVITY",
            "LAST SEEN",
            "SERVICES",
            "FIRMWARE",
            "PLATFORM"
        ],
        "{t}"
    );
    assert_eq!(
        cells(lines[2]),
        [VINS[0], "OFFLINE", "-", "none", "1.0.0", "mqb-evo"],
        "{t}"
    );
    assert_eq!(lines.len(), 7, "the last page names no next one:\n{t}");

    // Pages of one and of two, by the tool's own next-page commands: every car once, in
    // VIN order.
    for limit in ["1", "2"] {
        let (vins, pages) = follow_pages(&base, &["--limit", limit]);
        assert_eq!(vins, VINS, "--limit {limit}: {pages:#?}");
        let expected_pages = if limit == "1" { 5 } else { 3 };
        assert_eq!(pages.len(), expected_pages, "{pages:#?}");
    }

    // No car connects: none is ONLINE, all are OFFLINE, and the filter stays on every page.
    assert_eq!(
        ctl(&base, &["vehicle", "list", "--connectivity", "ONLINE"]).ok(),
        "Vehicles ONLINE: 0, in VIN order\n"
    );
    let (vins, pages) = follow_pages(&base, &["--connectivity", "OFFLINE", "--limit", "2"]);
    assert_eq!(vins, VINS, "{pages:#?}");
    assert!(
        pages[..pages.len() - 1]
            .iter()
            .all(|p| p.contains("--connectivity OFFLINE --after")),
        "{pages:#?}"
    );

    // An activation car 3 never answers fails and leaves it a service in ERROR: the one car
    // --service-status ERROR keeps.
    let body = json!({
        "vin": VINS[2],
        "serviceId": "power-boost",
        "configuration": {"featureFlags": ["power_boost"]},
        "duration": {"type": "PERMANENT"},
    });
    let (status, answer) = post(&base, TOKEN, "/ota/activate", &body, None);
    assert_eq!(status, 202, "{answer}");
    let request = format!("/ota/requests/{}", answer["requestId"].as_str().unwrap());
    common::wait_for("the activation to fail", || {
        get(&base, TOKEN, &request)["status"] == "FAILED"
    });
    let t = ctl(&base, &["vehicle", "list", "--service-status", "ERROR"])
        .ok()
        .to_owned();
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(
        lines[0], "Vehicles with a service ERROR: 1, in VIN order",
        "{t}"
    );
    assert_eq!(
        cells(lines[2]),
        [VINS[2], "OFFLINE", "-", "1 error", "1.0.0", "mqb-evo"],
        "{t}"
    );
    assert_eq!(lines.len(), 3, "{t}");
    let t = ctl(
        &base,
        &[
            "vehicle",
            "list",
            "--service-status",
            "ACTIVE",
            "--connectivity",
            "OFFLINE",
        ],
    )
    .ok()
    .to_owned();
    assert_eq!(
        t,
        "Vehicles OFFLINE with a service ACTIVE: 0, in VIN order\n"
    );

    // --json is the gateway's page as it came.
    let run = ctl(
        &base,
        &[
            "vehicle", "list", "--limit", "2", "--after", VINS[1], "--json",
        ],
    );
    let v: Value = serde_json::from_str(run.ok()).unwrap();
    let gw = get(
        &base,
        TOKEN,
        &format!("/vehicles?limit=2&after={}", VINS[1]),
    );
    assert_eq!(v, gw);
    assert_eq!(v["vehicles"][0]["vin"], VINS[2], "{v}");
    assert_eq!(v["nextAfter"], VINS[3], "{v}");
}

#[test]
fn bad_flags_are_refused_before_sending_and_a_wrong_token_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let base = gateway(dir.path());

    // A bad cursor VIN: one line, exit 1, without asking the gateway (none listens here).
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let nobody = format!("http://{free}");
    let run = caasctl(&[
        "vehicle",
        "list",
        "--after",
        "NOT-A-VIN",
        "--gateway",
        &nobody,
    ]);
    let line = run.err();
    assert!(
        line.contains(r#"invalid VIN "NOT-A-VIN""#) && !line.contains("cannot reach"),
        "{line}"
    );
    // Values outside the gateway's lists and limits outside 1..=500 are usage errors, as
    // for every listing command (clap: exit 2, its error line names the flag and value).
    for (flag, bad) in [
        ("--connectivity", "online"),
        ("--connectivity", "PARKED"),
        ("--service-status", "FAILED"),
        ("--limit", "0"),
        ("--limit", "501"),
    ] {
        let run = caasctl(&["vehicle", "list", flag, bad, "--gateway", &nobody]);
        assert_eq!(run.code, 2, "{flag} {bad}: {}", run.stderr);
        let errors: Vec<&str> = run
            .stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .collect();
        assert_eq!(errors.len(), 1, "{}", run.stderr);
        assert!(
            errors[0].contains(&format!("'{bad}'")) && errors[0].contains(flag),
            "{}",
            run.stderr
        );
    }

    let run = caasctl(&["vehicle", "list", "--gateway", &base, "--token", "wrong"]);
    assert!(run.err().contains("HTTP 401"), "{}", run.stderr);
    let run = caasctl(&["vehicle", "list", "--gateway", &nobody, "--token", TOKEN]);
    assert!(run.err().contains("cannot reach"), "{}", run.stderr);
}
