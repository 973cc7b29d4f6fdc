//! The IoT API over TLS (`--https`): an activation driven over it completes with its callback
//! sent to an HTTPS receiver trusted through `--webhook-ca`; clients that do not trust the
//! certificate, or speak plain HTTP to the TLS port, get nothing; sockets that never finish
//! a handshake stall no one; `--https-client-ca` asks for a client certificate as well as
//! the token; and a changed certificate is used for new connections without a restart,
//! while a broken one leaves the one in force. Both listeners speak HTTP/2 (h2 by ALPN, h2c
//! with prior knowledge) beside HTTP/1.1.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Long enough for anything here on a loaded machine: the files are polled every 2 s.
const SETTLED_WITHIN: Duration = Duration::from_secs(15);

/// A gateway config serving the IoT API over TLS with the PKI's `server` certificate.
fn https_config(dir: &std::path::Path, pki: &Pki, hook: Option<&Webhook>) -> caas_gateway::Config {
    let mut c = config(&dir.join("gw"), hook);
    c.https = Some("127.0.0.1:0".parse().unwrap());
    c.https_files = Some(caas_gateway::HttpsFiles {
        cert: pki.dir.join("server.pem"),
        key: pki.dir.join("server.key"),
        client_ca: None,
    });
    c
}

/// A client trusting the PKI's CA (only it), presenting `{identity}.pem` when given.
fn client(pki: &Pki, identity: Option<&str>) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca =
        reqwest::Certificate::from_pem(&std::fs::read(pki.dir.join("ca.pem")).unwrap()).unwrap();
    let mut b = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(10));
    if let Some(name) = identity {
        let mut pem = std::fs::read(pki.dir.join(format!("{name}.pem"))).unwrap();
        pem.extend(std::fs::read(pki.dir.join(format!("{name}.key"))).unwrap());
        b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    b.build().unwrap()
}

/// A gateway serving the IoT API on both listeners, and its TLS port.
async fn start_https(dir: &std::path::Path, pki: &Pki) -> (caas_gateway::Gateway, u16) {
    let gw = caas_gateway::start(https_config(dir, pki, None))
        .await
        .unwrap();
    let port = gw.https_addr().unwrap().port();
    (gw, port)
}

fn https_api(gw: &caas_gateway::Gateway, http: reqwest::Client) -> Api {
    let port = gw.https_addr().unwrap().port();
    Api::with_client(format!("https://127.0.0.1:{port}"), http)
}

/// The status of `GET path` with the token, or the transport error's text.
async fn try_get(http: &reqwest::Client, url: String) -> Result<u16, String> {
    match http.get(url).bearer_auth(TOKEN).send().await {
        Ok(r) => Ok(r.status().as_u16()),
        Err(e) => Err(format!("{e:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_only_an_activation_completes_and_its_callback_goes_out_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let hook = Webhook::start_tls(pki.server_config("server")).await;
    assert!(hook.url.starts_with("https://"));
    let mut c = https_config(dir.path(), &pki, Some(&hook));
    c.no_http = true;
    c.webhook_ca = Some(pki.dir.join("ca.pem"));
    let gw = caas_gateway::start(c).await.unwrap();
    assert_eq!(
        gw.https_addr(),
        Some(gw.http_addr()),
        "with --no-http the API's address is the TLS one"
    );
    let port = gw.https_addr().unwrap().port();
    let api = https_api(&gw, client(&pki, None));

    let _car = obeying_car(&gw, &api, 1).await;
    let id = api.activate(1, "power-boost", "power_boost").await;
    let cb = hook.wait(&id, Duration::from_secs(20)).await;
    assert_eq!(cb.body["status"], "ACTIVATED", "{}", cb.body);
    assert!(cb.signature_ok, "the callback is signed as over plain HTTP");
    let (s, status) = api.get(&format!("/vehicles/{}/status", vin(1))).await;
    assert_eq!(s, 200);
    assert_eq!(
        services(&status),
        vec![("power-boost".to_owned(), "ACTIVE".to_owned())]
    );

    // Plain HTTP to the TLS port, and a client that trusts only the public roots: no answer.
    let plain = try_get(
        &reqwest::Client::new(),
        format!("http://127.0.0.1:{port}/healthz"),
    )
    .await;
    assert!(plain.is_err(), "plain HTTP on the TLS port: {plain:?}");
    let untrusting = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let r = try_get(&untrusting, format!("https://127.0.0.1:{port}/healthz")).await;
    let e = r.expect_err("a certificate from an unknown CA is refused by the client");
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    // Counted once the server's side of each handshake has ended, a moment after the client's.
    let end = Instant::now() + SETTLED_WITHIN;
    loop {
        let failures = api.metric("caas_https_handshake_failures_total").await;
        if failures >= 2.0 {
            break;
        }
        assert!(
            Instant::now() < end,
            "handshake failures counted: {failures}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_that_never_finish_a_handshake_stall_no_other_client() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (gw, port) = start_https(dir.path(), &pki).await;
    assert_ne!(gw.https_addr(), Some(gw.http_addr()), "both listeners");
    // Connected, silent, kept open for the whole test (the handshake timeout is 10 s).
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for round in 0..3 {
        // A new client each time: a new connection and handshake.
        let started = Instant::now();
        let r = try_get(
            &client(&pki, None),
            format!("https://127.0.0.1:{port}/vehicles/{}/status", vin(9)),
        )
        .await;
        assert_eq!(r, Ok(404), "round {round}: the unknown car's answer");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "round {round} took {:?}: stalled behind the silent sockets",
            started.elapsed()
        );
    }
    // Without the token: refused as on the plain listener.
    let r = client(&pki, None)
        .get(format!("https://127.0.0.1:{port}/keys"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    drop(idle);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_client_ca_callers_need_its_certificate_and_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    pki.issue("backend", &[], "caas-core", None, false);
    let other = tempfile::tempdir().unwrap();
    let other_pki = Pki::new(other.path());
    other_pki.issue("backend", &[], "caas-core", None, false);
    // The other CA's client certificate, beside this PKI's files for `client()`.
    for ext in ["pem", "key"] {
        std::fs::copy(
            other.path().join(format!("backend.{ext}")),
            dir.path().join(format!("stranger.{ext}")),
        )
        .unwrap();
    }
    let mut c = https_config(dir.path(), &pki, None);
    if let Some(files) = c.https_files.as_mut() {
        files.client_ca = Some(pki.dir.join("ca.pem"));
    }
    let gw = caas_gateway::start(c).await.unwrap();
    let port = gw.https_addr().unwrap().port();
    let url = format!("https://127.0.0.1:{port}/keys");

    assert_eq!(
        try_get(&client(&pki, Some("backend")), url.clone()).await,
        Ok(200)
    );
    let none = try_get(&client(&pki, None), url.clone()).await;
    assert!(none.is_err(), "no client certificate: {none:?}");
    let stranger = try_get(&client(&pki, Some("stranger")), url.clone()).await;
    assert!(stranger.is_err(), "another CA's certificate: {stranger:?}");
    let no_token = client(&pki, Some("backend"))
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status().as_u16(), 401, "the token is still needed");
    // The plain listener (loopback) is unchanged.
    let api = Api::new(gw.http_addr());
    assert_eq!(api.get("/keys").await.0, 200);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_used_without_a_restart_and_a_broken_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (gw, port) = start_https(dir.path(), &pki).await;
    let api = Api::new(gw.http_addr());
    let first = pki.cert_der("server");
    assert_eq!(presented_cert(port, pki.server_only_client()).await, first);

    // Renewed by renames; the mismatched pair between them is refused, the next one taken.
    let renewed = renew_server_cert(&pki, "server").await;
    assert_ne!(renewed, first);
    wait_presented(port, pki.server_only_client(), &first, &renewed).await;
    assert!(api.metric("caas_https_cert_reloads_total").await >= 1.0);

    // A key file that is not a key: refused, the renewed pair stays in force.
    let failures_before = api.metric("caas_https_cert_reload_failures_total").await;
    std::fs::write(pki.dir.join("server.key"), b"not a key\n").unwrap();
    let end = Instant::now() + SETTLED_WITHIN;
    while api.metric("caas_https_cert_reload_failures_total").await <= failures_before {
        assert!(Instant::now() < end, "the broken key was never looked at");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        presented_cert(port, pki.server_only_client()).await,
        renewed
    );
    let r = try_get(
        &client(&pki, None),
        format!("https://127.0.0.1:{port}/keys"),
    )
    .await;
    assert_eq!(r, Ok(200));
    gw.shutdown().await;
}

#[tokio::test]
async fn a_certificate_that_does_not_load_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    pki.issue("other", &["127.0.0.1"], "other", None, true);
    let mut c = https_config(dir.path(), &pki, None);
    if let Some(files) = c.https_files.as_mut() {
        files.key = pki.dir.join("other.key");
    }
    let e = caas_gateway::start(c)
        .await
        .err()
        .expect("a key not the certificate's");
    let text = format!("{e:#}");
    assert!(text.contains("--https-cert"), "{text}");
    assert!(
        !dir.path().join("gw").join("db").exists(),
        "stopped before the store was opened"
    );

    let mut c = https_config(dir.path(), &pki, None);
    c.webhook_url = Some("https://127.0.0.1:9/hook".into());
    c.webhook_ca = Some(pki.dir.join("server.key"));
    let e = caas_gateway::start(c)
        .await
        .err()
        .expect("a CA file with no certificate");
    assert!(format!("{e:#}").contains("--webhook-ca"), "{e:#}");
}

/// The HTTP version and status of `GET /keys` with the token through `http` at `base`.
async fn keys_version(http: &reqwest::Client, base: &str) -> (reqwest::Version, u16) {
    let r = http
        .get(format!("{base}/keys"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    (r.version(), r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_listeners_speak_http2_and_http1_and_an_activation_completes_over_http2() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let hook = Webhook::start(0).await;
    let gw = caas_gateway::start(https_config(dir.path(), &pki, Some(&hook)))
        .await
        .unwrap();
    let tls = format!("https://127.0.0.1:{}", gw.https_addr().unwrap().port());
    let plain = format!("http://{}", gw.http_addr());

    // TLS: h2 by ALPN when the client offers it, HTTP/1.1 when that is all it speaks.
    let h2 = client(&pki, None);
    assert_eq!(
        keys_version(&h2, &tls).await,
        (reqwest::Version::HTTP_2, 200)
    );
    let h1 = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(pki.dir.join("ca.pem")).unwrap())
                .unwrap(),
        )
        .http1_only()
        .build()
        .unwrap();
    assert_eq!(
        keys_version(&h1, &tls).await,
        (reqwest::Version::HTTP_11, 200)
    );
    // Plain: h2c with prior knowledge, and HTTP/1.1 as before.
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    assert_eq!(
        keys_version(&h2c, &plain).await,
        (reqwest::Version::HTTP_2, 200)
    );
    assert_eq!(
        keys_version(&reqwest::Client::new(), &plain).await,
        (reqwest::Version::HTTP_11, 200)
    );

    // The same API over h2c: a refusal names the field, an activation completes, and calls
    // in flight together on the one connection are each answered.
    let api = Api::with_client(plain.clone(), h2c.clone());
    let (s, body) = api
        .post("/ota/activate", &serde_json::json!({"vin": "nope"}))
        .await;
    assert_eq!(s, 400, "{body}");
    assert!(body.to_string().contains("vin"), "{body}");
    let _car = obeying_car(&gw, &api, 1).await;
    let id = api.activate(1, "power-boost", "power_boost").await;
    let cb = hook.wait(&id, Duration::from_secs(20)).await;
    assert_eq!(cb.body["status"], "ACTIVATED", "{}", cb.body);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (h2c, plain) = (h2c.clone(), plain.clone());
        calls.spawn(async move { keys_version(&h2c, &plain).await });
    }
    let answers = calls.join_all().await;
    assert!(
        answers
            .iter()
            .all(|a| *a == (reqwest::Version::HTTP_2, 200)),
        "{answers:?}"
    );
    gw.shutdown().await;
}
