//! Helpers shared by the CLI tests: run the real binary and look at what it did.
#![allow(dead_code, unreachable_pub)]

use std::io::Write;
use std::process::{Command, Output, Stdio};

/// What one run of `caasctl` did.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Self {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Asserts success and returns stdout.
    #[track_caller]
    pub fn ok(&self) -> &str {
        assert_eq!(
            self.code, 0,
            "caasctl failed:\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        &self.stdout
    }

    /// Asserts exit status 1 with exactly one `error: ` line on stderr and returns it.
    #[track_caller]
    pub fn err(&self) -> &str {
        assert_eq!(
            self.code, 1,
            "expected failure:\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "expected one line on stderr, got: {}",
            self.stderr
        );
        assert!(lines[0].starts_with("error: "), "{}", self.stderr);
        lines[0]
    }
}

fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_caasctl"));
    cmd.args(args)
        .env_remove("CAAS_GATEWAY_URL")
        .env_remove("CAAS_API_TOKEN")
        .env_remove("CAAS_GATEWAY_CA")
        .env_remove("CAAS_CLIENT_CERT")
        .env_remove("CAAS_CLIENT_KEY")
        .stdin(Stdio::null());
    cmd
}

/// Runs `caasctl ARGS`.
pub fn caasctl(args: &[&str]) -> Run {
    Run::from(command(args).output().expect("run caasctl"))
}

/// Runs `caasctl ARGS` with extra environment variables.
pub fn caasctl_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = command(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Run::from(cmd.output().expect("run caasctl"))
}

/// Runs `caasctl ARGS` with `input` on standard input.
pub fn caasctl_stdin(args: &[&str], input: &[u8]) -> Run {
    let mut child = command(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn caasctl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write stdin");
    Run::from(child.wait_with_output().expect("wait caasctl"))
}

/// A path as &str.
pub fn s(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// A gateway's settings for a test: HTTP on a free loopback port, the embedded broker with no
/// listener (so no car ever connects: every command goes unanswered), its store in `data`.
pub fn gateway_config(data: std::path::PathBuf, token: &str) -> caas_gateway::Config {
    caas_gateway::Config {
        http: "127.0.0.1:0".parse().expect("address"),
        mqtt: None,
        data,
        api_token: token.into(),
        heap_reserve_mb: Some(0),
        ..Default::default()
    }
}

/// Starts a gateway from a thread of its own and returns its base URL; it lives as long as
/// the test process.
pub fn start_gateway(config: caas_gateway::Config) -> String {
    format!("http://{}", start_gateway_listening(config).0)
}

/// [`start_gateway`], returning the IoT API's addresses: plain (or the TLS one with
/// `no_http`), and the TLS one when it has one.
pub fn start_gateway_listening(
    config: caas_gateway::Config,
) -> (std::net::SocketAddr, Option<std::net::SocketAddr>) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let gw = caas_gateway::start(config).await.expect("gateway starts");
            tx.send((gw.http_addr(), gw.https_addr()))
                .expect("send address");
            std::future::pending::<()>().await;
        });
    });
    rx.recv().expect("gateway address")
}

/// `POST base+path` with the token (and an idempotency key): the status and the JSON answer
/// (`null` when the body is not JSON).
pub fn post(
    base: &str,
    token: &str,
    path: &str,
    body: &serde_json::Value,
    key: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut req = reqwest::blocking::Client::new()
        .post(format!("{base}{path}"))
        .bearer_auth(token)
        .json(body);
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    let resp = req.send().expect("POST");
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(serde_json::Value::Null))
}

/// `GET base+path` with the token: the JSON of a 200 answer.
pub fn get(base: &str, token: &str, path: &str) -> serde_json::Value {
    let resp = reqwest::blocking::Client::new()
        .get(format!("{base}{path}"))
        .bearer_auth(token)
        .send()
        .expect("GET");
    assert_eq!(resp.status().as_u16(), 200, "GET {path}");
    resp.json().expect("JSON answer")
}

/// Registers car `vin` (platform mqb-evo, firmware 1.0.0) with a device key made from `seed`.
pub fn register_car(base: &str, token: &str, vin: &str, seed: u8) {
    let key = caas_protocol::SigningKey::from_bytes(&[seed; 32]).verifying_key();
    let car = serde_json::json!({
        "vin": vin,
        "publicKey": caas_protocol::verifying_key_to_hex(&key).as_str(),
        "platform": "mqb-evo",
        "firmwareVersion": "1.0.0",
    });
    let (status, answer) = post(base, token, "/vehicles", &car, None);
    assert_eq!(status, 201, "register {vin}: {answer}");
}

/// Polls `done` until it holds; panics naming `what` if it has not after a minute (far more
/// than the tiny retry settings the tests use need, so only a stuck gateway reaches it).
#[track_caller]
pub fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The API token of the gateways the `ctl` tests start.
pub const OPS_TOKEN: &str = "ops-token";

/// `caasctl ARGS --gateway BASE --token OPS_TOKEN`.
pub fn ctl(base: &str, args: &[&str]) -> Run {
    let mut all = args.to_vec();
    all.extend(["--gateway", base, "--token", OPS_TOKEN]);
    caasctl(&all)
}

/// The value after `label` on its key/value line (labels and values are two or more spaces
/// apart).
pub fn value_of<'t>(text: &'t str, label: &str) -> &'t str {
    text.lines()
        .find_map(|l| l.strip_prefix(label).filter(|rest| rest.starts_with("  ")))
        .unwrap_or_else(|| panic!("no {label:?} line in\n{text}"))
        .trim()
}
