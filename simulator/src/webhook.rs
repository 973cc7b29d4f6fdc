//! The webhook receiver: what the CaaS core runs to hear back from the gateway.
//!
//! It accepts `POST` on any path, checks `X-CaaS-Signature: sha256=<hex HMAC-SHA256(secret,
//! X-CaaS-Timestamp + "." + body)>` (a bad or missing signature gets 401 and is counted, not
//! recorded), parses `{requestId, vin, status, errorCode?, timestamp}`, and keeps every
//! callback per request id with its arrival time, so a caller can check "exactly one final
//! callback per request" and measure POST-to-callback latency ([`Receiver::expect`] notes
//! when the POST went out).
//!
//! Bounded: at most [`MAX_TRACKED`] request ids are kept and at most
//! [`MAX_CALLBACKS_PER_REQUEST`] callbacks per id; bodies over [`MAX_BODY`] bytes are refused.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use hdrhistogram::Histogram;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use crate::stats::{new_histogram, record, Percentiles};

/// Most request ids the receiver remembers.
pub const MAX_TRACKED: usize = 2_000_000;
/// Most callbacks kept per request id (more are counted as duplicates only).
pub const MAX_CALLBACKS_PER_REQUEST: usize = 8;
/// Largest callback body accepted.
pub const MAX_BODY: usize = 16 * 1024;
/// How far a callback's timestamp may be from our clock (replay window).
pub const MAX_SKEW_SECS: u64 = 300;

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

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Body {
    request_id: String,
    vin: String,
    status: String,
    #[serde(default)]
    error_code: Option<String>,
}

#[derive(Default)]
struct Entry {
    posted: Option<Instant>,
    first: Option<Instant>,
    callbacks: Vec<Callback>,
}

struct Inner {
    secret: String,
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

fn verify(secret: &str, headers: &HeaderMap, body: &[u8]) -> bool {
    let Some(ts) = headers
        .get("x-caas-timestamp")
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(sig) = headers
        .get("x-caas-signature")
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(hex_sig) = sig.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(given) = hex::decode(hex_sig) else {
        return false;
    };
    let Ok(ts_num) = ts.parse::<u64>() else {
        return false;
    };
    if ts_num.abs_diff(crate::unix_now()) > MAX_SKEW_SECS {
        return false;
    }
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(ts.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

async fn handle(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let now = Instant::now();
    if !verify(&inner.secret, &headers, &body) {
        inner.bad_signature.fetch_add(1, Ordering::Relaxed);
        return StatusCode::UNAUTHORIZED;
    }
    let Ok(b) = serde_json::from_slice::<Body>(&body) else {
        inner.malformed.fetch_add(1, Ordering::Relaxed);
        return StatusCode::BAD_REQUEST;
    };
    inner.received.fetch_add(1, Ordering::Relaxed);
    let Ok(mut entries) = inner.entries.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR;
    };
    if !entries.contains_key(&b.request_id) && entries.len() >= MAX_TRACKED {
        inner.dropped.fetch_add(1, Ordering::Relaxed);
        return StatusCode::OK;
    }
    let e = entries.entry(b.request_id).or_default();
    if !e.callbacks.is_empty() {
        inner.duplicates.fetch_add(1, Ordering::Relaxed);
    }
    if e.callbacks.len() < MAX_CALLBACKS_PER_REQUEST {
        e.callbacks.push(Callback {
            vin: b.vin,
            status: b.status,
            error_code: b.error_code,
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

impl Receiver {
    /// Starts a receiver on `127.0.0.1:0` checking signatures with `secret`.
    pub async fn start(secret: &str) -> Result<Receiver> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), secret).await
    }

    /// Starts a receiver on `addr`.
    pub async fn start_on(addr: SocketAddr, secret: &str) -> Result<Receiver> {
        let inner = Arc::new(Inner {
            secret: secret.to_string(),
            entries: Mutex::new(HashMap::new()),
            latency: Mutex::new(new_histogram()),
            received: AtomicU64::new(0),
            bad_signature: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        let app = axum::Router::new()
            .fallback(axum::routing::post(handle))
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the webhook receiver on {addr}"))?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
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
        loop {
            let n = self.answered(ids);
            if n == ids.len() || Instant::now() >= deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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
    }
}
