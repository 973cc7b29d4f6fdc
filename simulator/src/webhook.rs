//! The webhook receiver: what the CaaS core runs to hear back from the gateway.
//!
//! It accepts `POST` on any path, checks `X-CaaS-Signature: sha256=<hex HMAC-SHA256(secret,
//! X-CaaS-Timestamp + "." + body)>` (or `X-CaaS-Signature-Previous`, the same with the old
//! key while the gateway's key is rotated: a receiver still on the old key keeps working; a
//! bad or missing signature gets 401 and is counted, not recorded), parses `{requestId, vin, status, errorCode?, timestamp}`, and keeps every
//! callback per request id with its arrival time, so a caller can check "exactly one final
//! callback per request" and measure POST-to-callback latency ([`Receiver::expect`] notes
//! when the POST went out).
//!
//! Bounded: at most [`MAX_TRACKED`] request ids are kept and at most
//! [`MAX_CALLBACKS_PER_REQUEST`] callbacks per id; bodies over [`MAX_BODY`] bytes are refused
//! (413), at most [`MAX_CONNECTIONS`] connections are served at once.
//!
//! It is HTTP/1.1 straight on hyper (no router: every path is the webhook, anything but
//! `POST` gets 405), with the HMAC key's pads hashed once: a load run receives a callback for
//! every activation, so the receiver's CPU per callback counts against the gateway it shares
//! the machine with.

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::stats::{new_histogram, record, Percentiles};

/// Most request ids the receiver remembers.
pub const MAX_TRACKED: usize = 2_000_000;
/// Most callbacks kept per request id (more are counted as duplicates only).
pub const MAX_CALLBACKS_PER_REQUEST: usize = 8;
/// Largest callback body accepted.
pub const MAX_BODY: usize = 16 * 1024;
/// How far a callback's timestamp may be from our clock (replay window).
pub const MAX_SKEW_SECS: u64 = 300;
/// Most HTTP connections served at once (the gateway keeps a few alive; more wait to be
/// accepted).
pub const MAX_CONNECTIONS: usize = 1024;

/// One callback as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callback {
    /// The car.
    pub vin: String,
    /// `ACTIVATED`, `DEACTIVATED` or `FAILED`.
    pub status: String,
    /// Why it failed.
    pub error_code: Option<String>,
}

/// A callback's body, borrowed from the request where no JSON escape forces a copy.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    #[serde(borrow)]
    request_id: Cow<'a, str>,
    #[serde(borrow)]
    vin: Cow<'a, str>,
    #[serde(borrow)]
    status: Cow<'a, str>,
    #[serde(default, borrow)]
    error_code: Option<Cow<'a, str>>,
}

#[derive(Default)]
struct Entry {
    posted: Option<Instant>,
    first: Option<Instant>,
    callbacks: Vec<Callback>,
}

struct Inner {
    /// HMAC-SHA256 keyed with the secret, cloned for each callback.
    key: Hmac<Sha256>,
    entries: Mutex<HashMap<String, Entry>>,
    latency: Mutex<Histogram<u64>>,
    received: AtomicU64,
    bad_signature: AtomicU64,
    malformed: AtomicU64,
    duplicates: AtomicU64,
    dropped: AtomicU64,
}

/// A running webhook receiver.
#[derive(Clone)]
pub struct Receiver {
    inner: Arc<Inner>,
    addr: SocketAddr,
}

/// Counts of what the receiver saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReceiverCounts {
    /// Callbacks accepted (signature good).
    pub received: u64,
    /// Refused for a bad or missing signature.
    pub bad_signature: u64,
    /// Refused as unreadable.
    pub malformed: u64,
    /// A second (or later) callback for the same request id.
    pub duplicates: u64,
    /// Not recorded because a bound was reached.
    pub dropped: u64,
}

/// `sha256=<hex>` of HMAC-SHA256(secret, timestamp "." body).
pub fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn verify(key: &Hmac<Sha256>, headers: &HeaderMap, body: &[u8]) -> bool {
    let Some(ts) = headers
        .get("x-caas-timestamp")
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Ok(ts_num) = ts.parse::<u64>() else {
        return false;
    };
    if ts_num.abs_diff(crate::unix_now()) > MAX_SKEW_SECS {
        return false;
    }
    // During a rotation of the gateway's key the old key's signature comes beside the new
    // one's; a receiver holds one key and takes whichever header it matches.
    ["x-caas-signature", "x-caas-signature-previous"]
        .iter()
        .filter_map(|name| headers.get(*name)?.to_str().ok())
        .any(|sig| signed_with(key, ts, body, sig))
}

/// Whether `sig` (`sha256=<hex>`) is `key`'s over `ts + "." + body`.
fn signed_with(key: &Hmac<Sha256>, ts: &str, body: &[u8], sig: &str) -> bool {
    let Some(hex_sig) = sig.strip_prefix("sha256=") else {
        return false;
    };
    let mut given = [0u8; 32];
    if hex::decode_to_slice(hex_sig, &mut given).is_err() {
        return false;
    }
    // A copy of the keyed state: the key's pads are hashed once, when the receiver starts.
    let mut mac = key.clone();
    mac.update(ts.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

/// Checks and records one callback; the HTTP status to answer.
fn handle(inner: &Inner, headers: &HeaderMap, body: &[u8]) -> StatusCode {
    let now = Instant::now();
    if !verify(&inner.key, headers, body) {
        inner.bad_signature.fetch_add(1, Ordering::Relaxed);
        return StatusCode::UNAUTHORIZED;
    }
    let Ok(b) = serde_json::from_slice::<Body>(body) else {
        inner.malformed.fetch_add(1, Ordering::Relaxed);
        return StatusCode::BAD_REQUEST;
    };
    inner.received.fetch_add(1, Ordering::Relaxed);
    let Ok(mut entries) = inner.entries.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR;
    };
    // Usually the POST's answer came first and the entry exists: no key to allocate.
    if !entries.contains_key(b.request_id.as_ref()) {
        if entries.len() >= MAX_TRACKED {
            inner.dropped.fetch_add(1, Ordering::Relaxed);
            return StatusCode::OK;
        }
        entries.insert(b.request_id.to_string(), Entry::default());
    }
    let Some(e) = entries.get_mut(b.request_id.as_ref()) else {
        return StatusCode::INTERNAL_SERVER_ERROR;
    };
    if !e.callbacks.is_empty() {
        inner.duplicates.fetch_add(1, Ordering::Relaxed);
    }
    if e.callbacks.len() < MAX_CALLBACKS_PER_REQUEST {
        e.callbacks.push(Callback {
            vin: b.vin.into_owned(),
            status: b.status.into_owned(),
            error_code: b.error_code.map(Cow::into_owned),
        });
    }
    if e.first.is_none() {
        e.first = Some(now);
        if let (Some(posted), Ok(mut h)) = (e.posted, inner.latency.lock()) {
            record(&mut h, now.saturating_duration_since(posted));
        }
    }
    StatusCode::OK
}

fn answer(status: StatusCode) -> Response<Empty<Bytes>> {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = status;
    r
}

/// One HTTP request: a `POST` with a body of at most [`MAX_BODY`] bytes, checked and recorded.
async fn respond(inner: Arc<Inner>, req: Request<Incoming>) -> Response<Empty<Bytes>> {
    if req.method() != Method::POST {
        return answer(StatusCode::METHOD_NOT_ALLOWED);
    }
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => return answer(StatusCode::PAYLOAD_TOO_LARGE),
        Err(_) => return answer(StatusCode::BAD_REQUEST),
    };
    answer(handle(&inner, &parts.headers, &body))
}

/// Accepts connections (at most [`MAX_CONNECTIONS`] open at once) and serves HTTP/1.1 on
/// each until the listener fails.
async fn serve(listener: TcpListener, inner: Arc<Inner>) {
    let open = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = open.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                // Out of file descriptors, or a connection reset before it was accepted:
                // wait a moment rather than spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let inner = inner.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let inner = inner.clone();
                async move { Ok::<_, Infallible>(respond(inner, req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            drop(permit);
        });
    }
}

impl Receiver {
    /// Starts a receiver on `127.0.0.1:0` checking signatures with `secret`.
    pub async fn start(secret: &str) -> Result<Receiver> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), secret).await
    }

    /// Starts a receiver on `addr`.
    pub async fn start_on(addr: SocketAddr, secret: &str) -> Result<Receiver> {
        let key = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
            .map_err(|e| anyhow::anyhow!("webhook secret: {e}"))?;
        let inner = Arc::new(Inner {
            key,
            entries: Mutex::new(HashMap::new()),
            latency: Mutex::new(new_histogram()),
            received: AtomicU64::new(0),
            bad_signature: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the webhook receiver on {addr}"))?;
        let addr = listener.local_addr()?;
        tokio::spawn(serve(listener, inner.clone()));
        Ok(Receiver { inner, addr })
    }

    /// The URL to give the gateway as `--webhook-url`.
    pub fn url(&self) -> String {
        format!("http://{}/caas/webhooks/ota-status", self.addr)
    }

    /// Notes that request `id` was POSTed at `posted` (for the latency).
    pub fn expect(&self, id: &str, posted: Instant) {
        let Ok(mut entries) = self.inner.entries.lock() else {
            return;
        };
        if !entries.contains_key(id) && entries.len() >= MAX_TRACKED {
            self.inner.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let e = entries.entry(id.to_string()).or_default();
        e.posted = Some(posted);
        if let (Some(first), Ok(mut h)) = (e.first, self.inner.latency.lock()) {
            // The callback beat the POST's answer: latency counts to the callback anyway.
            record(&mut h, first.saturating_duration_since(posted));
        }
    }

    /// The callbacks received for request `id`.
    pub fn callbacks(&self, id: &str) -> Vec<Callback> {
        self.inner
            .entries
            .lock()
            .ok()
            .and_then(|m| m.get(id).map(|e| e.callbacks.clone()))
            .unwrap_or_default()
    }

    /// How many of `ids` have at least one callback.
    pub fn answered(&self, ids: &[String]) -> usize {
        let Ok(m) = self.inner.entries.lock() else {
            return 0;
        };
        ids.iter()
            .filter(|id| m.get(*id).is_some_and(|e| !e.callbacks.is_empty()))
            .count()
    }

    /// Waits until every one of `ids` has a callback, or `timeout`; returns how many have.
    pub async fn wait_for(&self, ids: &[String], timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        // Each pass looks only at the ids still unanswered: a run's tail of late callbacks
        // does not rescan every request a hundred times a second.
        let mut missing: Vec<&String> = ids.iter().collect();
        loop {
            if let Ok(m) = self.inner.entries.lock() {
                missing.retain(|id| m.get(*id).is_none_or(|e| e.callbacks.is_empty()));
            }
            if missing.is_empty() || Instant::now() >= deadline {
                return ids.len() - missing.len();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Every tracked request that was POSTed, oldest first: (request id, when it was
    /// POSTed, how long until its first callback if one came).
    pub fn samples(&self) -> Vec<(String, Instant, Option<Duration>)> {
        let Ok(m) = self.inner.entries.lock() else {
            return Vec::new();
        };
        let mut all: Vec<_> = m
            .iter()
            .filter_map(|(id, e)| {
                let posted = e.posted?;
                let latency = e.first.map(|f| f.saturating_duration_since(posted));
                Some((id.clone(), posted, latency))
            })
            .collect();
        all.sort_by_key(|(_, posted, _)| *posted);
        all
    }

    /// POST-to-first-callback latency percentiles.
    pub fn latency(&self) -> Percentiles {
        self.inner
            .latency
            .lock()
            .map(|h| Percentiles::of(&h))
            .unwrap_or_default()
    }

    /// Clears the latency histogram (between benchmark phases).
    pub fn reset_latency(&self) {
        if let Ok(mut h) = self.inner.latency.lock() {
            h.reset();
        }
    }

    /// What was seen so far.
    pub fn counts(&self) -> ReceiverCounts {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ReceiverCounts {
            received: l(&self.inner.received),
            bad_signature: l(&self.inner.bad_signature),
            malformed: l(&self.inner.malformed),
            duplicates: l(&self.inner.duplicates),
            dropped: l(&self.inner.dropped),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn signed_callbacks_are_kept_and_forged_ones_refused() {
        let rx = Receiver::start("s3cret").await.unwrap();
        let http = reqwest::Client::new();
        let body = r#"{"requestId":"r1","vin":"V","status":"ACTIVATED","timestamp":"x"}"#;
        let ts = crate::unix_now().to_string();
        rx.expect("r1", Instant::now());
        let ok = http
            .post(rx.url())
            .header("X-CaaS-Timestamp", &ts)
            .header("X-CaaS-Signature", sign("s3cret", &ts, body.as_bytes()))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);
        let forged = http
            .post(rx.url())
            .header("X-CaaS-Timestamp", &ts)
            .header("X-CaaS-Signature", sign("wrong", &ts, body.as_bytes()))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(forged.status(), 401);
        let stale = (crate::unix_now() - 3600).to_string();
        let replay = http
            .post(rx.url())
            .header("X-CaaS-Timestamp", &stale)
            .header("X-CaaS-Signature", sign("s3cret", &stale, body.as_bytes()))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(replay.status(), 401);
        let cbs = rx.callbacks("r1");
        assert_eq!(cbs.len(), 1);
        assert_eq!(cbs[0].status, "ACTIVATED");
        assert_eq!(rx.counts().bad_signature, 2);
        assert_eq!(rx.latency().count, 1);
        assert_eq!(rx.answered(&["r1".into(), "r2".into()]), 1);
        let get = http.get(rx.url()).send().await.unwrap();
        assert_eq!(get.status(), 405);
        let big = "x".repeat(MAX_BODY + 1);
        let too_big = http
            .post(rx.url())
            .header("X-CaaS-Timestamp", &ts)
            .header("X-CaaS-Signature", sign("s3cret", &ts, big.as_bytes()))
            .body(big)
            .send()
            .await
            .unwrap();
        assert_eq!(too_big.status(), 413);
        let garbled = "{not json";
        let malformed = http
            .post(rx.url())
            .header("X-CaaS-Timestamp", &ts)
            .header("X-CaaS-Signature", sign("s3cret", &ts, garbled.as_bytes()))
            .body(garbled)
            .send()
            .await
            .unwrap();
        assert_eq!(malformed.status(), 400);
        assert_eq!(rx.counts().malformed, 1);
        assert_eq!(rx.callbacks("r1").len(), 1);
    }

    #[tokio::test]
    async fn during_a_key_rotation_the_old_keys_signature_is_taken_too() {
        // This receiver still holds the old key; the gateway signs with the new one and,
        // while rotating, with the old one beside it.
        let rx = Receiver::start("old-s3cret").await.unwrap();
        let http = reqwest::Client::new();
        let body = r#"{"requestId":"r1","vin":"V","status":"ACTIVATED","timestamp":"x"}"#;
        let ts = crate::unix_now().to_string();
        let send = |previous: Option<&str>| {
            let mut post = http
                .post(rx.url())
                .header("X-CaaS-Timestamp", &ts)
                .header("X-CaaS-Signature", sign("new-s3cret", &ts, body.as_bytes()));
            if let Some(key) = previous {
                post = post.header("X-CaaS-Signature-Previous", sign(key, &ts, body.as_bytes()));
            }
            post.body(body).send()
        };
        assert_eq!(send(None).await.unwrap().status(), 401, "new key only");
        assert_eq!(send(Some("other")).await.unwrap().status(), 401, "neither");
        assert_eq!(send(Some("old-s3cret")).await.unwrap().status(), 200);
        assert_eq!(rx.callbacks("r1").len(), 1);
        assert_eq!(rx.counts().bad_signature, 2);
    }
}
