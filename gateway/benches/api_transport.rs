//! What serving the IoT API over TLS (`--https`) and over HTTP/2 costs the gateway, side by
//! side with plain HTTP/1.1 in one run: the real `caas-gateway` binary serving both
//! listeners, driven with the same keep-alive load (8 concurrent callers) over each of four
//! transports in turn (HTTP/1.1 and h2c on the plain listener, HTTP/1.1 and h2 on the TLS
//! one; over HTTP/2 the 8 callers share one connection, as a core's client would), the order
//! rotated each round. Per transport: requests a second, the gateway process's CPU per
//! request (from `/proc/PID/stat`, so the clients' own TLS work is not in it) and latency
//! percentiles; then TLS ÷ plain and HTTP/2 ÷ HTTP/1.1. Prints a table; no assertions.
//!
//! Two routes: `GET /keys` (the transport and the API's layers alone) and `POST /ota/activate`
//! of an unregistered car (refused 404 after parsing and checking the JSON body, nothing
//! written): both leave the engine and the store out, so the difference is the transport's.
//!
//! Run: `cargo bench -p caas-gateway --bench api_transport` (`CAAS_BENCH_REQUESTS=20000`,
//! `CAAS_BENCH_ROUNDS=3`; `CAAS_BENCH_GATEWAY=PATH` runs another `caas-gateway` binary, say
//! the previous commit's, to set beside this one's; a binary without HTTP/2 gets only the
//! HTTP/1.1 rows).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "bench";
const CLIENTS: usize = 8;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The process's user + system CPU time so far.
fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A development CA and a server certificate for 127.0.0.1 in `dir`; returns the CA's PEM.
fn pki(dir: &std::path::Path) -> Vec<u8> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "bench CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let mut server = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    server.distinguished_name.push(DnType::CommonName, "bench");
    let key = KeyPair::generate().unwrap();
    let cert = server.signed_by(&key, &ca_cert, &ca_key).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    ca_cert.pem().into_bytes()
}

struct Run {
    rate: f64,
    cpu_per_request: Duration,
    p50: Duration,
    p99: Duration,
}

async fn drive(
    client: &reqwest::Client,
    base: &str,
    route: &str,
    requests: usize,
    pid: u32,
) -> Run {
    let body = serde_json::json!({
        "vin": "WVWZZZ1JZXW000009",
        "serviceId": "power-boost",
        "configuration": {"featureFlags": ["power_boost"], "parameters": {}},
        "duration": {"type": "PERMANENT"},
    });
    let url = format!("{base}{route}");
    let is_get = route == "/keys";
    let send = move |client: reqwest::Client| {
        let (url, body) = (url.clone(), body.clone());
        async move {
            let started = Instant::now();
            let req = if is_get {
                client.get(&url)
            } else {
                client.post(&url).json(&body)
            };
            let status = req.bearer_auth(TOKEN).send().await.unwrap().status();
            assert!(status == 200 || status == 404, "{url}: {status}");
            started.elapsed()
        }
    };
    // Warm the connections.
    for _ in 0..CLIENTS * 4 {
        send(client.clone()).await;
    }
    let per_client = requests / CLIENTS;
    let cpu_before = cpu_of(pid);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (client, send) = (client.clone(), send.clone());
        tasks.push(tokio::spawn(async move {
            let mut took = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                took.push(send(client.clone()).await);
            }
            took
        }));
    }
    let mut took = Vec::new();
    for t in tasks {
        took.extend(t.await.unwrap());
    }
    let wall = started.elapsed();
    let cpu = cpu_of(pid) - cpu_before;
    took.sort();
    let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
    Run {
        rate: took.len() as f64 / wall.as_secs_f64(),
        cpu_per_request: cpu / took.len() as u32,
        p50: at(0.5),
        p99: at(0.99),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let requests = env_or("CAAS_BENCH_REQUESTS", 20_000);
    let rounds = env_or("CAAS_BENCH_ROUNDS", 3);
    let dir = tempfile::tempdir().unwrap();
    let ca = pki(dir.path());
    let (http, https, mqtt) = (free_port(), free_port(), free_port());
    let binary = std::env::var_os("CAAS_BENCH_GATEWAY")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_caas-gateway").into());
    let child = Command::new(&binary)
        .args(["serve", "--api-token", TOKEN, "--heap-reserve-mb", "0"])
        .args(["--http", &format!("127.0.0.1:{http}")])
        .args(["--mqtt", &format!("127.0.0.1:{mqtt}")])
        .args(["--https", &format!("127.0.0.1:{https}")])
        .arg("--https-cert")
        .arg(dir.path().join("server.pem"))
        .arg("--https-key")
        .arg(dir.path().join("server.key"))
        .arg("--data")
        .arg(dir.path().join("gw"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let _gateway = Gateway(child);
    let client = |tls: bool, h2: bool| {
        let mut b = reqwest::Client::builder()
            .pool_max_idle_per_host(CLIENTS)
            .tcp_nodelay(true);
        if tls {
            b = b
                .tls_built_in_root_certs(false)
                .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap());
        }
        b = match (tls, h2) {
            (_, false) => b.http1_only(),
            (false, true) => b.http2_prior_knowledge(),
            // h2 by ALPN.
            (true, true) => b,
        };
        b.build().unwrap()
    };
    let plain = client(false, false);
    let plain_base = format!("http://127.0.0.1:{http}");
    let tls_base = format!("https://127.0.0.1:{https}");
    let end = Instant::now() + Duration::from_secs(30);
    while plain
        .get(format!("{plain_base}/healthz"))
        .send()
        .await
        .is_err()
    {
        assert!(Instant::now() < end, "the gateway did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let transports: [(&str, reqwest::Client, &str); 4] = [
        ("HTTP/1.1", plain, &plain_base),
        ("h2c", client(false, true), &plain_base),
        ("TLS HTTP/1.1", client(true, false), &tls_base),
        ("TLS h2", client(true, true), &tls_base),
    ];
    // A gateway without HTTP/2 answers no h2c request: only the HTTP/1.1 transports then.
    let speaks_h2 = transports[1]
        .1
        .get(format!("{plain_base}/healthz"))
        .send()
        .await
        .is_ok();
    let transports: Vec<_> = transports
        .into_iter()
        .filter(|t| speaks_h2 || !t.0.contains("h2"))
        .collect();
    let n = transports.len();
    println!("gateway: {}\n", std::path::Path::new(&binary).display());
    println!(
        "IoT API transport, {requests} requests a run, {CLIENTS} keep-alive clients, {rounds} \
         rounds, the order rotated each round (medians)\n"
    );
    println!("| route | transport | requests/s | gateway CPU per request | p50 | p99 |");
    println!("|---|---|---|---|---|---|");
    for route in ["/keys", "/ota/activate"] {
        let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); n];
        let mut rows: Vec<Vec<Run>> = (0..n).map(|_| Vec::new()).collect();
        for round in 0..rounds {
            // Rotate which goes first: the first of a round runs on a cooler machine.
            for k in 0..n {
                let i = (round + k) % n;
                let (_, client, base) = &transports[i];
                let run = drive(client, base, route, requests, pid).await;
                cpu[i].push(run.cpu_per_request.as_secs_f64() * 1e6);
                rows[i].push(run);
            }
        }
        let medians: Vec<f64> = cpu.iter().map(|c| median(c.clone())).collect();
        for (i, runs) in rows.iter().enumerate() {
            let rate = median(runs.iter().map(|r| r.rate).collect());
            let p50 = median(runs.iter().map(|r| r.p50.as_secs_f64() * 1e3).collect());
            let p99 = median(runs.iter().map(|r| r.p99.as_secs_f64() * 1e3).collect());
            println!(
                "| {route} | {} | {rate:.0} | {:.1} µs | {p50:.2} ms | {p99:.2} ms |",
                transports[i].0, medians[i]
            );
        }
        let ratios = if speaks_h2 {
            vec![
                ("TLS ÷ HTTP (HTTP/1.1)", 2, 0),
                ("HTTP/2 ÷ HTTP/1.1 (plain)", 1, 0),
                ("HTTP/2 ÷ HTTP/1.1 (TLS)", 3, 2),
            ]
        } else {
            vec![("TLS ÷ HTTP (HTTP/1.1)", 1, 0)]
        };
        for (label, a, b) in ratios {
            println!(
                "| {route} | {label} | | {:.2}× | | |",
                medians[a] / medians[b]
            );
        }
    }
}
