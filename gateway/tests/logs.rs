//! `caas-gateway serve --log-format json` (the real binary): every log line on standard error
//! is one JSON object a log collector can read, with the level, the target and the event's
//! fields; the default stays readable text, without colour codes when not on a terminal.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Starts the gateway with `extra` flags and returns its log lines up to the one saying it
/// started (20 s at most), then kills it.
fn lines_until_started(extra: &[&str]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_caas-gateway"))
        .args(["serve", "--http", "127.0.0.1:0", "--mqtt", "127.0.0.1:0"])
        .args(["--heap-reserve-mb", "0", "--data"])
        .arg(dir.path())
        .args(extra)
        .env_clear()
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let end = Instant::now() + Duration::from_secs(20);
    let mut lines = Vec::new();
    while !lines
        .last()
        .is_some_and(|l: &String| l.contains("gateway started"))
    {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => panic!("no start line within 20 s: {lines:?}"),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    lines
}

#[test]
fn json_logs_are_one_object_a_line_and_text_is_the_default() {
    let lines = lines_until_started(&["--log-format", "json"]);
    for line in &lines {
        // The warning about the development token is printed before logging starts.
        if line.starts_with("caas-gateway: ") {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string(), "{v}");
    }
    let started: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(started["level"], "INFO", "{started}");
    assert_eq!(started["target"], "caas_gateway", "{started}");
    assert_eq!(started["fields"]["message"], "gateway started", "{started}");
    let http = started["fields"]["http_addr"].as_str().unwrap();
    assert!(http.starts_with("127.0.0.1:"), "{started}");

    let text = lines_until_started(&[]);
    let last = text.last().unwrap();
    assert!(
        serde_json::from_str::<serde_json::Value>(last).is_err(),
        "text by default: {last}"
    );
    assert!(
        last.contains(" INFO caas_gateway: gateway started http_addr=127.0.0.1:"),
        "plain text, no colour codes when not a terminal: {last:?}"
    );
}
