//! Callback delivery: first tries straight from the engine, retries from the durable outbox.
//!
//! A request's final state is flushed before its callback leaves, and until the callback is
//! delivered the request stays listed in its car's record, so a restart finds it and sends
//! it again. The engine therefore hands each flushed result to this task through a bounded
//! queue ([`FRESH_QUEUE`]; [`BULK_QUEUE`] for campaigns) without writing anything more:
//! on a healthy receiver a callback costs no store write at all. The task POSTs,
//! [`CONCURRENCY`] at a time, signed with HMAC-SHA256 over `timestamp + "." + body`
//! (headers `X-CaaS-Timestamp` and `X-CaaS-Signature: sha256=<hex>`; while the key is being
//! rotated, also `X-CaaS-Signature-Previous` with the old key). On a 2xx it tells
//! the car's shard, which drops the request from the car's list. On a failure the callback is filed in the sled `outbox`
//! tree (keyed by due time) and retried with exponential backoff (1 s doubling, at most
//! [`MAX_BACKOFF`]), holding up to [`RETRY_HELD`] retries in memory; once filed, the car's
//! list lets go of it. On start, and whenever an entry could not be held in memory, the
//! task scans the outbox for due entries. A crash between a 2xx and the bookkeeping, or a
//! scan racing a handover, repeats a callback with the same requestId and status, which
//! the receiver can ignore.
//!
//! After [`DOWN_AFTER`] failures in a row the receiver counts as down: one callback at a
//! time is tried, every [`PROBE_EVERY`], until one is answered (gauge
//! `caas_webhook_receiver_down`), instead of failing and refiling the whole backlog.
//!
//! First tries start before retries, and retries never take the last [`FRESH_RESERVED`]
//! in-flight slots: when a receiver comes back after an outage, thousands of retries fall
//! due at once, and fresh callbacks do not wait behind them. The task runs on its own
//! thread ([`spawn`]), so such a burst does not hold the IoT API's runtime either.
//!
//! Two senders run, one per [`Lane`]: single requests' first tries and every retry on one,
//! campaign requests' first tries on the other, whose thread runs at the lowest CPU
//! priority (nice [`BULK_NICE`]). A campaign's tens of thousands of callbacks then use the
//! CPU the gateway and its cars leave over, instead of taking a share of it while the
//! campaign's commands and reports are still in flight, and they never delay a single
//! request's callback. On a busy machine they trickle until the load eases; nothing is
//! dropped (each is still listed in its car's record until delivered), and a failed one
//! is filed in the outbox, due at once, for the first lane to retry.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use caas_protocol::{RequestId, Vin};

use crate::engine::{Engine, Msg};
use crate::metrics::Metrics;
use crate::store::{dec, enc, next_id, now_ms, OutboxEntry, Store};

/// Callbacks in flight at once, per lane.
pub(crate) const CONCURRENCY: usize = 64;
/// The nice value of the [`Lane::Bulk`] sender's thread (Linux; 19 is the lowest priority).
pub(crate) const BULK_NICE: i32 = 19;
/// Failures in a row (no success between them) that mark the receiver as down.
pub(crate) const DOWN_AFTER: u32 = 8;
/// While the receiver is down: one callback at a time, at most one per this interval.
pub(crate) const PROBE_EVERY: Duration = Duration::from_secs(1);
/// In-flight slots that retries may not take: after a receiver outage, thousands of retries
/// fall due at once, and fresh callbacks must not queue behind them.
pub(crate) const FRESH_RESERVED: usize = 16;
/// Single requests' callbacks handed over by the engine and not yet taken by their sender.
pub(crate) const FRESH_QUEUE: usize = 65_536;
/// Campaign callbacks handed over and not yet taken by the bulk sender. Its thread yields to
/// everything else, so a campaign's callbacks pile up here while the campaign runs: half of
/// this (where the engine starts filing them in the outbox instead, a store write each)
/// holds a 100,000-car campaign's. At ~300 bytes a callback that is ~80 MB at most.
pub(crate) const BULK_QUEUE: usize = 262_144;
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
/// Settled first tries told to one shard in one message (a wake-up per callback would cost
/// a context switch each), and the longest they wait to be told.
const SETTLE_BATCH: usize = 256;
const SETTLE_EVERY: Duration = Duration::from_millis(200);

/// Who keeps a callback until it is delivered.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Keeper {
    /// The car's record lists the request (its first try).
    Car(Vin, RequestId),
    /// The outbox, under this key (a retry, or found by a scan).
    Outbox(Vec<u8>),
}

/// Which sender delivers a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lane {
    /// Single requests' first tries, and every retry: the only lane that scans the outbox.
    Interactive,
    /// Campaign requests' first tries, at the lowest CPU priority.
    Bulk,
}

/// A callback to deliver.
#[derive(Debug, Clone)]
pub(crate) struct Due {
    pub(crate) keeper: Keeper,
    pub(crate) entry: OutboxEntry,
    pub(crate) lane: Lane,
    /// When its request became final, if this process saw it (not for one read back from
    /// the outbox): `caas_callback_delivery_seconds` counts from here.
    pub(crate) final_at: Option<Instant>,
}

impl Due {
    /// A first try, kept by the car's record.
    pub(crate) fn first(vin: Vin, request_id: RequestId, body: String, lane: Lane) -> Due {
        Due {
            lane,
            keeper: Keeper::Car(vin, request_id),
            entry: OutboxEntry {
                id: next_id(),
                request_id: request_id.to_string(),
                body,
                tries: 0,
            },
            final_at: Some(Instant::now()),
        }
    }
}

/// The outbox key of an entry due at `due_ms`.
pub(crate) fn outbox_key(due_ms: u64, id: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(16);
    key.extend_from_slice(&due_ms.to_be_bytes());
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// The due time of outbox key `key` (0 for a key too short to hold one).
fn key_due(key: &[u8]) -> u64 {
    key.get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// The engine's side: hands flushed entries to the senders.
#[derive(Clone)]
pub(crate) struct Handoff {
    interactive: flume::Sender<Due>,
    bulk: flume::Sender<Due>,
    /// Set when an entry went to the outbox instead: the interactive sender scans it.
    missed: Arc<Missed>,
    outbox: sled::Tree,
}

impl Handoff {
    fn queue(&self, lane: Lane) -> (&flume::Sender<Due>, usize) {
        match lane {
            Lane::Interactive => (&self.interactive, FRESH_QUEUE),
            Lane::Bulk => (&self.bulk, BULK_QUEUE),
        }
    }

    /// Hands `due` to its lane's sender; if that queue is full the entry is filed in the
    /// outbox, where the interactive sender's next scan finds it.
    pub(crate) fn send(&self, due: Due) {
        if let Err(flume::TrySendError::Full(due) | flume::TrySendError::Disconnected(due)) =
            self.queue(due.lane).0.try_send(due)
        {
            self.file(&due.entry);
        }
    }

    /// Whether `n` more first tries would crowd `lane`'s queue (more than half full): the
    /// engine then files results in the outbox instead of handing them over.
    pub(crate) fn crowded(&self, lane: Lane, n: usize) -> bool {
        let (queue, bound) = self.queue(lane);
        queue.len() + n > bound / 2
    }

    /// Files `entry` in the outbox, due now, and has the interactive sender scan for it.
    pub(crate) fn file(&self, entry: &OutboxEntry) {
        file_due_now(&self.outbox, &self.missed, entry);
    }

    /// Parks `entry` in the outbox from inside an engine batch, before the flush that makes
    /// its request's final state durable: under a key no scan takes ([`PARKED_DUE`]), so it
    /// cannot leave before that flush (a callback sent before its final state is durable
    /// could be contradicted by another after a crash), yet it is written in that same
    /// flush, after the request's record in the store's log, so whatever survives a crash
    /// with it also holds that final state. Once the flush is done, [`Handoff::release`]
    /// makes it due; one a crash left parked is released at the next start ([`handoff`]).
    pub(crate) fn park(&self, entry: &OutboxEntry) {
        let _ = self
            .outbox
            .insert(outbox_key(PARKED_DUE, entry.id), enc(entry));
    }

    /// Makes entries parked before a flush that has now completed due at once, and has the
    /// interactive sender scan for them.
    pub(crate) fn release(&self, parked: &[OutboxEntry]) {
        if parked.is_empty() {
            return;
        }
        let now = now_ms();
        let mut moves = sled::Batch::default();
        for entry in parked {
            moves.remove(outbox_key(PARKED_DUE, entry.id));
            moves.insert(outbox_key(now, entry.id), enc(entry));
        }
        // One batch: a crash leaves each entry either parked or due, never both.
        let _ = self.outbox.apply_batch(moves);
        self.missed.set();
    }
}

/// The due time of a parked outbox entry (see [`Handoff::park`]): later than any real one,
/// so scans, which stop at the first entry not yet due, never reach it.
pub(crate) const PARKED_DUE: u64 = u64::MAX;

/// Makes every entry parked in `outbox` due now: run at start, when no batch of this
/// process can have parked one, so each was parked before a flush of an earlier run that
/// either completed (it is durable, and so is its final state) or did not (and it is gone).
fn release_parked(outbox: &sled::Tree) {
    let now = now_ms();
    let mut moves = sled::Batch::default();
    for item in outbox.range(outbox_key(PARKED_DUE, 0)..) {
        let Ok((key, value)) = item else { break };
        let Some(entry) = dec::<OutboxEntry>(&value) else {
            moves.remove(key);
            continue;
        };
        moves.remove(key);
        moves.insert(outbox_key(now, entry.id), value);
    }
    let _ = outbox.apply_batch(moves);
}

/// One sender's side of a [`Handoff`].
pub(crate) struct Inbox {
    lane: Lane,
    rx: flume::Receiver<Due>,
    missed: Arc<Missed>,
}

/// Entries were filed in the outbox, due now, for the interactive sender's next scan to
/// find: the flag says so, and the wake-up ends its wait at once (instead of at the next
/// retry or [`IDLE_SCAN`]).
struct Missed {
    flag: AtomicBool,
    wake: tokio::sync::Notify,
}

/// Files `entry` in `outbox`, due now, and wakes the interactive sender to scan for it.
fn file_due_now(outbox: &sled::Tree, missed: &Missed, entry: &OutboxEntry) {
    let _ = outbox.insert(outbox_key(now_ms(), entry.id), enc(entry));
    missed.set();
}

impl Missed {
    fn set(&self) {
        self.flag.store(true, Relaxed);
        self.wake.notify_one();
    }

    fn take(&self) -> bool {
        self.flag.swap(false, Relaxed)
    }
}

impl Inbox {
    /// The lane this inbox receives.
    pub(crate) fn lane(&self) -> Lane {
        self.lane
    }
}

/// A handoff over `store`'s outbox and its two inboxes, interactive then bulk. Entries a
/// crash left parked are released first (made due now).
pub(crate) fn handoff(store: &Store) -> (Handoff, [Inbox; 2]) {
    release_parked(&store.outbox);
    let (interactive, interactive_rx) = flume::bounded(FRESH_QUEUE);
    let (bulk, bulk_rx) = flume::bounded(BULK_QUEUE);
    let missed = Arc::new(Missed {
        flag: AtomicBool::new(true), // scan once at start
        wake: tokio::sync::Notify::new(),
    });
    (
        Handoff {
            interactive,
            bulk,
            missed: missed.clone(),
            outbox: store.outbox.clone(),
        },
        [
            Inbox {
                lane: Lane::Interactive,
                rx: interactive_rx,
                missed: missed.clone(),
            },
            Inbox {
                lane: Lane::Bulk,
                rx: bulk_rx,
                missed,
            },
        ],
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

/// Callbacks waiting for an in-flight slot: first tries before retries, and retries never in
/// the last [`FRESH_RESERVED`] slots.
#[derive(Default)]
struct Queues {
    /// First tries from the engine (the run loop takes at most [`CONCURRENCY`] of them).
    fresh: VecDeque<Due>,
    /// Retries: due ones from memory, or found by an outbox scan (at most [`RETRY_HELD`]
    /// plus one scan pass).
    retrying: VecDeque<Due>,
    /// Retries started and not yet ended.
    retries_in_flight: usize,
}

impl Queues {
    fn push(&mut self, due: Due) {
        match due.keeper {
            Keeper::Car(..) => self.fresh.push_back(due),
            Keeper::Outbox(_) => self.retrying.push_back(due),
        }
    }

    /// The callback to start in a free slot, if any may start.
    fn next(&mut self) -> Option<Due> {
        if let Some(due) = self.fresh.pop_front() {
            return Some(due);
        }
        if self.retries_in_flight >= CONCURRENCY - FRESH_RESERVED {
            return None;
        }
        let due = self.retrying.pop_front()?;
        self.retries_in_flight += 1;
        Some(due)
    }

    /// A started callback ended (either way).
    fn ended(&mut self, keeper: &Keeper) {
        if matches!(keeper, Keeper::Outbox(_)) {
            self.retries_in_flight = self.retries_in_flight.saturating_sub(1);
        }
    }
}

/// Whether the receiver looks down, and when to probe it. While it is down, every callback
/// would fail at once and be filed again: at [`CONCURRENCY`] in flight that spins through
/// thousands of store writes a second for nothing. So after [`DOWN_AFTER`] failures in a row
/// one callback at a time is tried, every [`PROBE_EVERY`], until one is answered.
#[derive(Default)]
struct Breaker {
    failures_in_a_row: u32,
    down_since: Option<Instant>,
    next_probe: Option<Instant>,
}

impl Breaker {
    /// A callback failed; `true` if that marks the receiver down.
    fn failed(&mut self, now: Instant) -> bool {
        self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
        if self.down_since.is_some() {
            self.next_probe = Some(now + PROBE_EVERY);
            return false;
        }
        if self.failures_in_a_row < DOWN_AFTER {
            return false;
        }
        self.down_since = Some(now);
        self.next_probe = Some(now + PROBE_EVERY);
        true
    }

    /// A callback was answered; how long the receiver had been down, if it was.
    fn delivered(&mut self, now: Instant) -> Option<Duration> {
        self.failures_in_a_row = 0;
        self.next_probe = None;
        self.down_since
            .take()
            .map(|t| now.saturating_duration_since(t))
    }

    /// Whether one more callback may start, with `in_flight` started and not ended.
    fn may_start(&self, in_flight: usize, now: Instant) -> bool {
        match self.down_since {
            None => in_flight < CONCURRENCY,
            Some(_) => in_flight == 0 && self.next_probe.is_none_or(|t| now >= t),
        }
    }

    /// A callback started (while down, it is the probe).
    fn started(&mut self, now: Instant) {
        if self.down_since.is_some() {
            self.next_probe = Some(now + PROBE_EVERY);
        }
    }

    /// How long until a probe may start (while down).
    fn probe_in(&self, now: Instant) -> Option<Duration> {
        self.down_since
            .and(self.next_probe)
            .map(|t| t.saturating_duration_since(now))
    }
}

struct Sender {
    lane: Lane,
    store: Store,
    metrics: Arc<Metrics>,
    client: reqwest::Client,
    /// Parsed once: parsing it per callback (host name normalisation included) was a
    /// visible share of the sender's CPU.
    url: reqwest::Url,
    secret: Arc<str>,
    /// The old key during a rotation ([`crate::Config::webhook_secret_previous`]).
    previous_secret: Option<Arc<str>>,
    /// Callbacks taken but not yet started.
    queues: Queues,
    breaker: Breaker,
    /// Callbacks queued or in flight, so a scan does not take them twice.
    taken: HashSet<Keeper>,
    /// Failed entries by next due time, by outbox key.
    retries: BinaryHeap<Reverse<(u64, Vec<u8>)>>,
    retry_entries: std::collections::HashMap<Vec<u8>, (OutboxEntry, Option<Instant>)>,
    /// The due time of the first outbox entry the last scan found not yet due (a retry
    /// filed for later): the sender scans again then.
    outbox_next: Option<u64>,
    in_flight: tokio::task::JoinSet<(Due, bool)>,
    /// Tells a car's shard that its record need not keep a callback any more.
    engine: Engine,
    /// Settled first tries not yet told, by shard (each at most [`SETTLE_BATCH`]).
    settled: Vec<Vec<(Vin, RequestId)>>,
    settled_since: Option<tokio::time::Instant>,
}

impl Sender {
    fn take(&mut self, due: Due) {
        if self.taken.insert(due.keeper.clone()) {
            self.queues.push(due);
        }
    }

    /// The car's record no longer needs to keep this callback (delivered, or filed).
    fn release_car(&mut self, keeper: &Keeper) {
        if let Keeper::Car(vin, request_id) = keeper {
            let i = self.engine.shard_index(vin);
            let Some(list) = self.settled.get_mut(i) else {
                return;
            };
            list.push((*vin, *request_id));
            self.settled_since
                .get_or_insert_with(tokio::time::Instant::now);
            if list.len() >= SETTLE_BATCH {
                self.tell_settled(i);
            }
        }
    }

    fn tell_settled(&mut self, shard: usize) {
        let Some(list) = self.settled.get_mut(shard) else {
            return;
        };
        if list.is_empty() {
            return;
        }
        let list = std::mem::take(list);
        // Best effort: if the shard's queue is full these stay listed and a restart
        // repeats their callbacks, which the receiver may ignore.
        let _ = self
            .engine
            .shard_at(shard)
            .try_send(Msg::CallbacksSettled(list));
    }

    /// Tells every shard its settled callbacks once the oldest has waited long enough.
    fn tell_settled_if_due(&mut self) {
        if self
            .settled_since
            .is_some_and(|t| t.elapsed() >= SETTLE_EVERY)
        {
            self.settled_since = None;
            for i in 0..self.settled.len() {
                self.tell_settled(i);
            }
        }
    }

    fn start_some(&mut self) {
        let now = Instant::now();
        while self.breaker.may_start(self.in_flight.len(), now) {
            let Some(due) = self.queues.next() else {
                return;
            };
            self.breaker.started(now);
            let client = self.client.clone();
            let url = self.url.clone();
            let secret = self.secret.clone();
            let previous = self.previous_secret.clone();
            self.in_flight.spawn(async move {
                let ts = (now_ms() / 1000).to_string();
                let sig = signature(&secret, &ts, &due.entry.body);
                let mut post = client
                    .post(url)
                    .header("content-type", "application/json")
                    .header("X-CaaS-Timestamp", &ts)
                    .header("X-CaaS-Signature", sig);
                if let Some(previous) = previous {
                    let old = signature(&previous, &ts, &due.entry.body);
                    post = post.header("X-CaaS-Signature-Previous", old);
                }
                let r = post.body(due.entry.body.clone()).send().await;
                let ok = matches!(&r, Ok(resp) if resp.status().is_success());
                (due, ok)
            });
        }
    }

    fn finished(&mut self, due: Due, ok: bool, missed: &Missed) {
        self.taken.remove(&due.keeper);
        self.queues.ended(&due.keeper);
        if ok {
            self.metrics.webhook_deliveries.fetch_add(1, Relaxed);
            if let Some(final_at) = due.final_at {
                self.metrics
                    .observe_callback(final_at.elapsed().as_secs_f64());
            }
            if let Some(down) = self.breaker.delivered(Instant::now()) {
                self.metrics.webhook_receiver_down.store(0, Relaxed);
                tracing::info!(
                    down_secs = down.as_secs_f64(),
                    "webhook receiver answers again"
                );
            }
            match &due.keeper {
                Keeper::Outbox(key) => {
                    let _ = self.store.outbox.remove(key);
                }
                car => self.release_car(car),
            }
            return;
        }
        tracing::debug!(request = %due.entry.request_id, "callback failed; will retry");
        self.metrics.webhook_failures.fetch_add(1, Relaxed);
        if self.breaker.failed(Instant::now()) {
            self.metrics.webhook_receiver_down.store(1, Relaxed);
            tracing::warn!(
                failures = DOWN_AFTER,
                "webhook receiver looks down; trying one callback every {PROBE_EVERY:?}"
            );
        }
        let mut entry = due.entry;
        entry.tries += 1;
        if self.lane == Lane::Bulk {
            // Retries are the interactive lane's: filed due now, its next scan takes it.
            file_due_now(&self.store.outbox, missed, &entry);
            self.release_car(&due.keeper);
            return;
        }
        let backoff = Duration::from_secs(1u64 << entry.tries.min(6)).min(MAX_BACKOFF);
        let at = now_ms() + backoff.as_millis() as u64;
        let key = outbox_key(at, entry.id);
        // File before letting go of the old keeper: a crash in between repeats the
        // callback, never loses it.
        let _ = self.store.outbox.insert(key.clone(), enc(&entry));
        match &due.keeper {
            Keeper::Outbox(old) => {
                let _ = self.store.outbox.remove(old);
            }
            car => self.release_car(car),
        }
        if self.retries.len() < RETRY_HELD {
            self.retries.push(Reverse((at, key.clone())));
            self.retry_entries.insert(key, (entry, due.final_at));
        } else {
            missed.set();
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
            if let Some((entry, final_at)) = self.retry_entries.remove(&key) {
                self.take(Due {
                    keeper: Keeper::Outbox(key),
                    entry,
                    lane: Lane::Interactive,
                    final_at,
                });
            }
        }
    }

    /// Takes every due outbox entry not already taken or held for a retry; `true` if the
    /// pass stopped at [`PASS`] entries (more may be due).
    fn scan(&mut self) -> bool {
        let now = now_ms();
        self.outbox_next = None;
        let mut taken = 0;
        for item in self.store.outbox.iter() {
            let Ok((k, v)) = item else { break };
            let at = key_due(&k);
            if at > now {
                // A parked entry is released by a wake-up, not by time.
                self.outbox_next = (at != PARKED_DUE).then_some(at);
                return false;
            }
            let key = k.to_vec();
            if self.retry_entries.contains_key(&key) {
                continue;
            }
            let keeper = Keeper::Outbox(key);
            if self.taken.contains(&keeper) {
                continue;
            }
            match dec::<OutboxEntry>(&v) {
                Some(entry) => {
                    self.take(Due {
                        keeper,
                        entry,
                        lane: Lane::Interactive,
                        final_at: None,
                    });
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
        let retry = match self.retries.peek() {
            Some(Reverse((at, _))) => Duration::from_millis(at.saturating_sub(now_ms())),
            None => IDLE_SCAN,
        };
        let wait = match self.settled_since {
            Some(t) => retry.min(SETTLE_EVERY.saturating_sub(t.elapsed())),
            None => retry,
        };
        // Only a time ahead: one already past is scanned as soon as the lane may scan (no
        // retry in progress), and waking for it before then would spin.
        let now = now_ms();
        let wait = match self.outbox_next {
            Some(at) if at > now => wait.min(Duration::from_millis(at - now)),
            _ => wait,
        };
        match self.breaker.probe_in(Instant::now()) {
            Some(probe) => wait.min(probe),
            None => wait,
        }
    }
}

/// Runs a sender (`run`) on its own thread with its own single-threaded runtime, so that a
/// burst of deliveries (thousands of retries when a receiver comes back, a campaign's
/// callbacks) shares the CPU with the IoT API and the MQTT links through the OS scheduler
/// instead of holding the API's runtime threads; the [`Lane::Bulk`] thread at the lowest
/// priority. The handle ends when the sender does.
pub(crate) fn spawn(
    lane: Lane,
    run: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let name = match lane {
        Lane::Interactive => "gw-webhook",
        Lane::Bulk => "gw-webhook-bulk",
    };
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if lane == Lane::Bulk {
                lower_this_threads_priority();
            }
            runtime.block_on(run);
            let _ = done_tx.send(());
        })?;
    Ok(tokio::spawn(async move {
        let _ = done_rx.await;
    }))
}

/// Sets the calling thread's nice value to [`BULK_NICE`]. On Linux a nice value belongs to a
/// thread (`setpriority` with a thread id); elsewhere it would lower the whole process, so
/// it is left alone there.
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), BULK_NICE)
    {
        tracing::warn!(error = %e, "cannot lower the bulk webhook sender's priority");
    }
}

/// Where callbacks go and the keys they are signed with.
pub(crate) struct Receiver {
    pub(crate) url: String,
    pub(crate) secret: String,
    /// The old key during a rotation ([`crate::Config::webhook_secret_previous`]).
    pub(crate) previous_secret: Option<String>,
    /// CA certificates trusted besides the public roots ([`crate::Config::webhook_ca`]).
    pub(crate) roots: Vec<reqwest::Certificate>,
}

/// Largest `--webhook-ca` file read (a bundle of a few hundred certificates).
const MAX_CA_FILE: u64 = 1024 * 1024;

/// Reads the CA certificates of `--webhook-ca` (PEM, at least one).
pub(crate) fn read_roots(path: &std::path::Path) -> anyhow::Result<Vec<reqwest::Certificate>> {
    use anyhow::Context;
    let len = std::fs::metadata(path)
        .with_context(|| format!("--webhook-ca {}", path.display()))?
        .len();
    if len > MAX_CA_FILE {
        anyhow::bail!(
            "--webhook-ca {}: {len} bytes, more than the {MAX_CA_FILE} a CA bundle may have",
            path.display()
        );
    }
    let pem = std::fs::read(path).with_context(|| format!("--webhook-ca {}", path.display()))?;
    let roots = reqwest::Certificate::from_pem_bundle(&pem)
        .with_context(|| format!("--webhook-ca {}: not PEM certificates", path.display()))?;
    if roots.is_empty() {
        anyhow::bail!("--webhook-ca {}: no certificate in it", path.display());
    }
    Ok(roots)
}

/// Runs the delivery loop until `stop` fires (then tells the engine what it delivered and
/// returns; what is in flight is sent again after a restart) or the task is aborted.
pub(crate) async fn run(
    store: Store,
    metrics: Arc<Metrics>,
    engine: Engine,
    to: Receiver,
    inbox: Inbox,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let url = match reqwest::Url::parse(&to.url) {
        Ok(u) => u,
        Err(e) => {
            tracing::error!(error = %e, "webhook URL");
            return;
        }
    };
    let mut builder = reqwest::Client::builder()
        .timeout(POST_TIMEOUT)
        .tcp_nodelay(true)
        .pool_max_idle_per_host(CONCURRENCY);
    for root in &to.roots {
        builder = builder.add_root_certificate(root.clone());
    }
    let client = match builder.build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "webhook client");
            return;
        }
    };
    let mut s = Sender {
        lane: inbox.lane,
        store,
        metrics,
        client,
        url,
        secret: to.secret.into(),
        previous_secret: to.previous_secret.map(Into::into),
        queues: Queues::default(),
        breaker: Breaker::default(),
        taken: HashSet::new(),
        retries: BinaryHeap::new(),
        retry_entries: std::collections::HashMap::new(),
        outbox_next: None,
        in_flight: tokio::task::JoinSet::new(),
        settled: vec![Vec::new(); engine.shard_count()],
        settled_since: None,
        engine,
    };
    let Inbox { rx, missed, .. } = inbox;
    let mut last_scan = tokio::time::Instant::now();
    loop {
        // Only take from the handoff queue what can start soon: the queue is the bound.
        while s.queues.fresh.len() < CONCURRENCY {
            match rx.try_recv() {
                Ok(due) => s.take(due),
                Err(_) => break,
            }
        }
        s.take_due_retries();
        s.tell_settled_if_due();
        if s.outbox_next.is_some_and(|at| at <= now_ms()) {
            missed.flag.store(true, Relaxed);
        }
        if s.lane == Lane::Interactive
            && s.queues.retrying.is_empty()
            && (missed.take() || last_scan.elapsed() >= IDLE_SCAN)
        {
            last_scan = tokio::time::Instant::now();
            if s.scan() {
                missed.flag.store(true, Relaxed);
            }
        }
        s.start_some();
        let room = s.queues.fresh.len() < CONCURRENCY;
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
            _ = missed.wake.notified(), if s.lane == Lane::Interactive => {}
            _ = tokio::time::sleep(idle) => {}
            _ = &mut stop => {
                for i in 0..s.settled.len() {
                    s.tell_settled(i);
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn due(keeper: Keeper) -> Due {
        Due {
            lane: Lane::Interactive,
            keeper,
            entry: OutboxEntry {
                id: 1,
                request_id: String::new(),
                body: String::new(),
                tries: 0,
            },
            final_at: None,
        }
    }

    #[test]
    fn first_tries_start_before_retries_and_keep_reserved_slots() {
        let mut q = Queues::default();
        for i in 0..CONCURRENCY as u64 {
            q.push(due(Keeper::Outbox(i.to_be_bytes().to_vec())));
        }
        let vin: Vin = "WVWZZZ1JZ3W386752"
            .parse()
            .unwrap_or_else(|_| unreachable!());
        q.push(due(Keeper::Car(vin, RequestId([7; 16]))));
        let first = q.next().map(|d| d.keeper);
        assert_eq!(first, Some(Keeper::Car(vin, RequestId([7; 16]))));
        let mut started = Vec::new();
        while let Some(d) = q.next() {
            started.push(d.keeper);
        }
        // Retries stop short of the reserved slots, oldest first.
        assert_eq!(started.len(), CONCURRENCY - FRESH_RESERVED);
        assert_eq!(started[0], Keeper::Outbox(0u64.to_be_bytes().to_vec()));
        // A retry that ends frees a slot for the next retry; a fresh one needs none.
        q.ended(&started[0]);
        assert!(matches!(
            q.next().map(|d| d.keeper),
            Some(Keeper::Outbox(_))
        ));
        assert!(q.next().is_none());
        q.push(due(Keeper::Car(vin, RequestId([8; 16]))));
        assert!(matches!(q.next().map(|d| d.keeper), Some(Keeper::Car(..))));
    }

    #[test]
    fn a_receiver_failing_in_a_row_is_probed_one_callback_a_second() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        // Scattered failures with successes between them never mark it down.
        for _ in 0..3 {
            for _ in 0..DOWN_AFTER - 1 {
                assert!(!b.failed(t0));
            }
            assert_eq!(b.delivered(t0), None);
        }
        assert!(b.may_start(CONCURRENCY - 1, t0));
        assert!(!b.may_start(CONCURRENCY, t0));
        // DOWN_AFTER in a row do.
        for _ in 0..DOWN_AFTER - 1 {
            assert!(!b.failed(t0));
        }
        assert!(b.failed(t0));
        assert!(!b.may_start(0, t0), "no probe before PROBE_EVERY");
        assert_eq!(b.probe_in(t0), Some(PROBE_EVERY));
        let t1 = t0 + PROBE_EVERY;
        assert!(b.may_start(0, t1));
        b.started(t1);
        assert!(!b.may_start(0, t1), "one probe at a time");
        assert!(!b.failed(t1), "already down");
        let t2 = t1 + PROBE_EVERY;
        assert!(b.may_start(0, t2));
        assert!(!b.may_start(1, t2));
        // The first answer ends it: full concurrency again.
        assert_eq!(b.delivered(t2), Some(t2 - t0));
        assert!(b.may_start(CONCURRENCY - 1, t2));
        assert_eq!(b.probe_in(t2), None);
    }

    #[test]
    fn the_bulk_lane_holds_a_100000_car_campaign_before_filing_in_the_outbox() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = Store::open(dir.path(), 16).unwrap_or_else(|e| panic!("{e}"));
        let (handoff, _inboxes) = handoff(&store);
        let vin: Vin = "WVWZZZ1JZ3W386752"
            .parse()
            .unwrap_or_else(|_| unreachable!());
        let first = |i: u64, lane| {
            let mut id = [0; 16];
            id[8..].copy_from_slice(&i.to_be_bytes());
            Due::first(vin, RequestId(id), String::new(), lane)
        };
        for i in 0..100_000 {
            assert!(!handoff.crowded(Lane::Bulk, 1), "crowded at {i}");
            handoff.send(first(i, Lane::Bulk));
        }
        assert_eq!(store.outbox.len(), 0, "nothing filed");
        // Single requests' lane is separate, and crowded at half its own bound.
        assert!(!handoff.crowded(Lane::Interactive, FRESH_QUEUE / 2));
        assert!(handoff.crowded(Lane::Interactive, FRESH_QUEUE / 2 + 1));
        assert!(handoff.crowded(Lane::Bulk, BULK_QUEUE / 2 - 100_000 + 1));
    }

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
    fn a_parked_entry_is_due_only_once_released_after_its_flush_or_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8).unwrap();
        let (handoff, _inboxes) = handoff(&store);
        // A fresh handoff asks for a first scan (entries left from before a restart).
        handoff.missed.take();
        let entry = |id| OutboxEntry {
            id,
            ..due(Keeper::Outbox(Vec::new())).entry
        };
        let (a, b) = (entry(1), entry(2));
        handoff.park(&a);
        handoff.park(&b);
        handoff.file(&entry(3));
        handoff.missed.take();
        // A scan stops at the first entry not yet due: the parked ones sort after any
        // real due time, behind the one filed due now.
        let dues: Vec<u64> = store
            .outbox
            .iter()
            .map(|kv| key_due(&kv.unwrap().0))
            .collect();
        assert!(dues[0] <= now_ms());
        assert_eq!(&dues[1..], &[PARKED_DUE, PARKED_DUE]);

        let before = now_ms();
        handoff.release(std::slice::from_ref(&a));
        assert!(handoff.missed.take(), "the release wakes a scan");
        let due_ids = |store: &Store| -> Vec<(bool, u64)> {
            store
                .outbox
                .iter()
                .map(|kv| {
                    let (k, v) = kv.unwrap();
                    let id = dec::<OutboxEntry>(&v).unwrap().id;
                    (key_due(&k) == PARKED_DUE, id)
                })
                .collect()
        };
        let now = due_ids(&store);
        assert!(
            now.contains(&(false, 1)) && !now.contains(&(true, 1)),
            "{now:?}"
        );
        assert!(now.contains(&(true, 2)), "b is still parked: {now:?}");
        let released_at = store
            .outbox
            .iter()
            .map(|kv| kv.unwrap())
            .find(|(_, v)| dec::<OutboxEntry>(v).unwrap().id == 1)
            .map(|(k, _)| key_due(&k))
            .unwrap();
        assert!(released_at >= before && released_at <= now_ms());

        // A crash before b's release: the next start makes it due.
        drop(handoff);
        let (_again, _inboxes) = super::handoff(&store);
        let after = due_ids(&store);
        assert_eq!(after.len(), 3, "{after:?}");
        assert!(after.iter().all(|(parked, _)| !parked), "{after:?}");
    }

    #[test]
    fn outbox_keys_sort_by_due_time_then_id() {
        assert!(outbox_key(1, 9) < outbox_key(2, 0));
        assert!(outbox_key(5, 1) < outbox_key(5, 2));
        assert_eq!(outbox_key(7, 3).len(), 16);
    }
}
