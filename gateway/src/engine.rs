//! The activation engine: per-car desired state, signed commands, retries, results.
//!
//! Cars are split over shards by a hash of the VIN. Each shard is one OS thread that owns
//! its cars outright (no lock is shared between shards or with the HTTP handlers): it
//! signs commands, verifies reports, keeps the retry timers and writes to sled. It handles
//! messages in batches and commits each batch to its flusher thread ([`run_flusher`]),
//! which flushes (batches waiting together share one flush) and only then publishes the
//! batch's commands, answers its HTTP callers and hands callbacks to the webhook sender.
//! The shard meanwhile goes on with the next batch, so a slow disk sync holds back only what
//! was written before it. (An earlier shard flushed itself, to spare a context switch per
//! batch; with the flusher the gateway's CPU per activation measured the same, and 30% fewer
//! activations took over 2 ms.) Signing, verifying and flushing never run on the async
//! executor.
//!
//! A request's life: accepted (seq N, command signed, flushed, published retained, 2xx) →
//! settled when a report verified with the car's key shows `applied_seq >= N` (callback
//! `ACTIVATED`/`DEACTIVATED`) → otherwise after each attempt's timeout a backoff, then the
//! same desired state re-signed and re-sent; after the last attempt a status query and one
//! more wait, then a support ticket, the grant withdrawn by a newer command, and callback
//! `FAILED`. A report refusing the command fails its requests at once with the car's code.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use caas_protocol::{
    open_report, open_reports, refused_places, seal_command, topics, Command, CommandBody,
    DesiredState, FeatureFlag, Grant, Outcome, Param, ParamKey, ParamValue, RejectCode, Report,
    RequestId, ServiceId, SigningKey, TrustedKey, VerifyingKey, Vin, MAX_COMMAND_FRAME_SIZE,
    MAX_GRANTS, MAX_SETTLES,
};
use serde::Serialize;
use serde_json::json;
use tokio::sync::oneshot;

use crate::api::ApiError;
use crate::campaign::{CampaignCounts, Ending};
use crate::config::RetryPolicy;
use crate::idempotency::{self, Claim, IdemKey};
use crate::metrics::Metrics;
use crate::store::{
    cancel_mark, dec, enc, enc_json, iso_ms, next_id, now_ms, CarRec, Continuation, GrantRec,
    HistoryEntry, OutboxEntry, RequestRec, RetiredRec, Store, Ticket, VehicleRec, HISTORY_PER_CAR,
};
use crate::webhook::{Due, Handoff, Lane};

/// Messages queued per shard before senders wait.
pub(crate) const SHARD_QUEUE: usize = 65_536;
/// Messages one shard handles before committing a batch (a bound on how long a request
/// waits behind others in a burst).
const SHARD_BATCH: usize = 1_024;
/// A campaign's requests a shard takes between two looks at its queue: each chunk is
/// committed and its commands go out while the shard signs the next, and the cars' reports
/// are handled in between instead of after the whole campaign.
const CAMPAIGN_CHUNK: usize = 256;
/// Requests one car may have in flight (not yet final). Each is a retry timer, a line in the
/// car's stored record and a scan when its report comes, so a caller that keeps asking for an
/// offline car gets 429 past this instead of growing them until the retry budget runs out.
/// A car holds at most [`MAX_GRANTS`] services, so legitimate changes in flight stay far
/// below it.
pub const MAX_IN_FLIGHT_PER_CAR: usize = 32;
/// Service errors remembered per car for `GET /vehicles/{vin}/status`.
const MAX_ERRORS: usize = 8;
/// Largest applied seq a car's report may show for the gateway to take it up
/// ([`Shard::resync_seq`]): far beyond any real car's commands, far below overflow.
const MAX_SEQ: u64 = 1 << 62;
/// Re-sends of a car's state closer together than this are merged into one.
const RESEND_MERGE: Duration = Duration::from_millis(200);
/// How long a car's record may wait with changes that need not be durable at once (its
/// applied seq, a delivered callback, its history entries): they are written together, at
/// most this late. A crash loses only what the car's next report or a repeated callback
/// restores, and at most this much of the car's history (the requests themselves are durable
/// before they are answered; the history is the technician's log of them).
const LAZY_WRITE_AFTER: Duration = Duration::from_secs(1);
/// Most cars' lazy changes written between two batches of messages.
const LAZY_WRITE_STEP: usize = 64;
/// History entries a car holds unwritten before they are written with the next commit
/// instead of waiting up to [`LAZY_WRITE_AFTER`] (a car that floods reports costs one
/// store write per this many entries, and no more memory).
const MAX_UNWRITTEN_HISTORY: usize = 32;
/// A shard's retry timers stay in its heap after their request settles or is rescheduled,
/// until they fall due (up to an attempt timeout later: at 5,000 activations/s and the
/// default 60 s, 300,000 stale timers). Past twice the shard's pending requests plus this
/// many, the stale ones are swept out, which bounds the heap at that (amortized O(1) a
/// timer: a sweep leaves at most the pending requests' timers).
const TIMER_SLACK: usize = 4_096;

/// A shard's retry timers: when, the generation of the request's timer, the request.
type Timers = BinaryHeap<Reverse<(Instant, u64, RequestId)>>;

/// Sweeps the timers that `is_live` (request, generation) rejects out of `timers` once it
/// holds more than twice `pending` plus [`TIMER_SLACK`].
fn sweep_stale_timers(
    timers: &mut Timers,
    pending: usize,
    is_live: impl Fn(&RequestId, u64) -> bool,
) {
    if timers.len() > 2 * pending + TIMER_SLACK {
        timers.retain(|Reverse((_, gen, id))| is_live(id, *gen));
    }
}

/// A message the engine publishes.
#[derive(Debug, Clone)]
pub(crate) struct Outbound {
    pub(crate) topic: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) retain: bool,
}

/// What a request asks for.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    /// Add (or replace) this grant.
    Activate(GrantRec),
    /// Remove this service.
    Deactivate(String),
}

/// A validated request on its way to the car's shard.
#[derive(Debug, Clone)]
pub(crate) struct NewRequest {
    pub(crate) vin: Vin,
    pub(crate) op: Op,
    pub(crate) request_id: RequestId,
    pub(crate) campaign_id: Option<String>,
    /// The campaign's live counts, moved as this request is accepted and ends.
    pub(crate) campaign: Option<Arc<CampaignCounts>>,
    pub(crate) created_ms: u64,
    /// When the HTTP side received it: the latency histograms count from here.
    pub(crate) received: Instant,
    /// Its `Idempotency-Key`, if it came with one (a campaign's requests never: the key is
    /// the campaign's). Boxed: a campaign carries thousands of requests, none with a key.
    pub(crate) idempotency: Option<Box<IdemKey>>,
}

/// A single request as its shard took it.
pub(crate) struct Accepted {
    pub(crate) rec: RequestRec,
    /// An earlier request with the same idempotency key, not a new one.
    pub(crate) replayed: bool,
}

/// What the HTTP side asks a shard.
pub(crate) enum Msg {
    Register {
        rec: VehicleRec,
        vin: Vin,
        key: VerifyingKey,
        resp: oneshot::Sender<Result<bool, ApiError>>,
    },
    Request {
        req: NewRequest,
        resp: oneshot::Sender<Result<Accepted, ApiError>>,
    },
    /// The car's telematics unit was replaced: only reports signed with `key` are believed
    /// from now on, if `previous` is the key the car has now (a repeat, with `key` already
    /// in place, changes nothing). Answered with the car's record once that is durable.
    ReplaceKey {
        vin: Vin,
        key: VerifyingKey,
        previous: VerifyingKey,
        resp: oneshot::Sender<Result<VehicleRec, ApiError>>,
    },
    /// The car leaves the fleet ([`Shard::decommission`]). Answered with its tombstone once
    /// that is durable; a repeat answers the tombstone with `requests_failed` 0 and changes
    /// nothing.
    Decommission {
        vin: Vin,
        resp: oneshot::Sender<Result<RetiredRec, ApiError>>,
    },
    Batch {
        reqs: Vec<NewRequest>,
        /// The campaign was made before (a repeat with its idempotency key): requests of it
        /// that exist already count as accepted and are not made again, so a repeat after a
        /// crash mid-campaign makes the rest.
        fill_in: bool,
        resp: oneshot::Sender<CampaignPart>,
    },
    Report {
        vin: Vin,
        payload: Vec<u8>,
    },
    Presence {
        vin: Vin,
        online: bool,
    },
    Status {
        vin: Vin,
        resp: oneshot::Sender<Option<serde_json::Value>>,
    },
    /// The status of each of `vins` (cars of this shard), in their order: a page of
    /// `GET /vehicles` (at most [`crate::api::VEHICLE_SCAN_CHUNK`] cars).
    Statuses {
        vins: Vec<Vin>,
        resp: oneshot::Sender<Vec<Option<serde_json::Value>>>,
    },
    /// Write the car's history entries made so far (before `GET /vehicles/{vin}/history`
    /// reads the store).
    WriteHistory {
        vin: Vin,
        resp: oneshot::Sender<()>,
    },
    Load {
        rec: VehicleRec,
        car: Option<CarRec>,
    },
    /// A request not yet final, with its campaign's live counts when its campaign's abort
    /// rule still applies ([`crate::campaign::rearm`]).
    LoadPending {
        rec: RequestRec,
        campaign: Option<Arc<CampaignCounts>>,
    },
    /// The car's held grants as the store has them (request ids, oldest first): sent after
    /// every car and pending request is loaded, since only requests still in flight stay held.
    LoadHeld {
        vin: Vin,
        held: Vec<String>,
    },
    /// A decommissioned car's final requests whose callbacks were under way when it was
    /// decommissioned and are not in the outbox: sent again, as a car's are at start.
    LoadRetired {
        vin: Vin,
        awaiting: Vec<RequestRec>,
    },
    /// These callbacks were delivered, or filed in the outbox: their cars' records need
    /// not keep them any more.
    CallbacksSettled(Vec<(Vin, RequestId)>),
    /// Re-send cars' newest commands: every car's (`only_behind: false`) to an embedded broker
    /// just started, which holds no retained message; to an external broker that (re)connected,
    /// only those of cars that have not confirmed theirs. A car that confirmed its newest
    /// command holds that state already, and a broker with persistent sessions would queue
    /// each copy for every offline car, to be handed over, stale, when it comes back (one per
    /// gateway start or broker reconnect); a car that lost its state says so in its next
    /// report, which then gets it re-sent ([`Shard::on_report`]).
    RepublishAll {
        only_behind: bool,
    },
    /// Ends requests still in flight as a failure does, with [`CANCELLED`]: each one's grant
    /// is withdrawn (what it replaced put back) in a newer command, and its callback says
    /// FAILED, so nothing is charged. Answered, with how many ended, once that is durable.
    Cancel {
        target: CancelTarget,
        resp: oneshot::Sender<Result<usize, ApiError>>,
    },
    Stop(std::sync::mpsc::Sender<()>),
    /// An embedded broker router's gateway link, whose cars are all this shard's: the shard
    /// reads their reports and presence from it itself ([`crate::mqtt::Embedded::attach`]).
    BrokerLink(Box<rumqttd::local::LinkRx>),
}

/// The error code of a cancelled request.
pub(crate) const CANCELLED: &str = "CANCELLED";
/// The error code of a request ended because its car was decommissioned.
pub(crate) const DECOMMISSIONED: &str = "DECOMMISSIONED";

/// Why [`Shard::finish`] fails a request. Told apart where the error code is assigned, not
/// from the code: `UNKNOWN_KEY` is both a car's refusal code and what a request that ran out
/// of attempts gets from a car that does not trust our key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The car's signed report refused the command carrying it (its reject code): counted
    /// as refused by its campaign's abort rule.
    Refused,
    /// It ran out of attempts unconfirmed: a support ticket opens. Says nothing about the
    /// campaign (the car was offline, or does not trust our key).
    Unconfirmed,
    /// Cancelled (by hand, or by its campaign's abort rule).
    Cancelled,
}

/// What a [`Msg::Cancel`] ends.
#[derive(Debug, Clone)]
pub(crate) enum CancelTarget {
    /// This request, if it is still in flight.
    Request(RequestId),
    /// Every request of this campaign still in flight in the shard.
    Campaign(String),
}

/// What every shard shares (read-only or atomics).
pub(crate) struct Shared {
    pub(crate) store: Store,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) retry: RetryPolicy,
    pub(crate) command_ttl: Duration,
    pub(crate) key: SigningKey,
    pub(crate) out: crate::mqtt::Publisher,
    /// Where flushed callbacks go (none without a webhook URL).
    pub(crate) webhook: Option<Handoff>,
    /// Which car each registered public key belongs to, across shards.
    pub(crate) key_owners: KeyOwners,
}

/// The car each registered public key belongs to: every car has a key of its own
/// (DESIGN.md), so a key already registered for another VIN is refused, at registration and
/// at a key replacement. Made from the stored vehicles at start (a car's entry as its shard
/// loads it), so it needs no tree of its own; one entry a car (about 60 bytes).
#[derive(Default)]
pub(crate) struct KeyOwners(std::sync::Mutex<HashMap<[u8; 32], Vin>>);

impl KeyOwners {
    /// Makes `vin` the owner of `key`, unless another car owns it: then that car.
    pub(crate) fn claim(&self, key: &VerifyingKey, vin: &Vin) -> Result<(), Vin> {
        // The map stays whole through a panic elsewhere (one insert or remove at a time).
        let mut owners = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match owners.entry(key.to_bytes()) {
            std::collections::hash_map::Entry::Occupied(e) if e.get() != vin => Err(*e.get()),
            std::collections::hash_map::Entry::Occupied(_) => Ok(()),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(*vin);
                Ok(())
            }
        }
    }

    /// `vin` no longer owns `key` (its key was replaced, its registration failed, or it
    /// was decommissioned).
    pub(crate) fn release(&self, key: &VerifyingKey, vin: &Vin) {
        let mut owners = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if owners.get(&key.to_bytes()) == Some(vin) {
            owners.remove(&key.to_bytes());
        }
    }
}

/// The 409 for a key another car is registered with.
fn key_of_another_car(field: &str, owner: &Vin) -> ApiError {
    ApiError::new(
        409,
        "public key of another car",
        field,
        &format!(
            "{owner} is registered with this key; every car has a key of its own (a key \
             copied from another car?): nothing changed"
        ),
    )
}

/// The handle the HTTP side and the MQTT side use.
#[derive(Clone)]
pub(crate) struct Engine {
    shards: Arc<Vec<flume::Sender<Msg>>>,
    /// The shard threads, joined by [`Engine::stop`].
    threads: Arc<std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>>,
}

/// Which of `n` shards owns `vin` (FNV-1a); the embedded broker splits cars over its
/// routers with it too ([`crate::mqtt::broker_shard`]).
pub(crate) fn shard_of(vin: &Vin, n: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in vin.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % n as u64) as usize
}

impl Engine {
    /// Starts `n` shard threads.
    pub(crate) fn start(shared: Arc<Shared>, n: usize) -> std::io::Result<Engine> {
        let mut senders = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = flume::bounded(SHARD_QUEUE);
            let (flush_tx, flush_rx) = flume::bounded(FLUSH_QUEUE);
            let sh = shared.clone();
            let flusher = std::thread::Builder::new()
                .name(format!("gw-flush-{i}"))
                .spawn(move || run_flusher(&sh, &flush_rx))?;
            let shard = Shard::new(shared.clone(), flush_tx, flusher);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("gw-shard-{i}"))
                    .spawn(move || shard.run(rx))?,
            );
            senders.push(tx);
        }
        Ok(Engine {
            shards: Arc::new(senders),
            threads: Arc::new(std::sync::Mutex::new(threads)),
        })
    }

    /// The shard sender for `vin`.
    pub(crate) fn shard(&self, vin: &Vin) -> &flume::Sender<Msg> {
        &self.shards[shard_of(vin, self.shards.len())]
    }

    /// Number of shards.
    pub(crate) fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Shard `i`'s sender.
    pub(crate) fn shard_at(&self, i: usize) -> &flume::Sender<Msg> {
        &self.shards[i % self.shards.len()]
    }

    /// Index of the shard owning `vin`.
    pub(crate) fn shard_index(&self, vin: &Vin) -> usize {
        shard_of(vin, self.shards.len())
    }

    /// Sends `msg` to every shard built by `f`.
    pub(crate) fn broadcast(&self, f: impl Fn() -> Msg) {
        for s in self.shards.iter() {
            let _ = s.send(f());
        }
    }

    /// Sends `msg` to every shard built by `f`, waiting without blocking the thread; `false`
    /// once a shard is gone.
    pub(crate) async fn broadcast_async(&self, f: impl Fn() -> Msg) -> bool {
        for s in self.shards.iter() {
            if s.send_async(f()).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Stops every shard after its last batch is committed (blocking).
    /// Each stopped thread is joined, so that what it held (the store) is released on return.
    /// `true` if every shard stopped and was joined.
    pub(crate) fn stop(&self) -> bool {
        let mut acks = Vec::new();
        for s in self.shards.iter() {
            let (tx, rx) = std::sync::mpsc::channel();
            if s.send(Msg::Stop(tx)).is_ok() {
                acks.push(Some(rx));
            } else {
                acks.push(None);
            }
        }
        let stopped: Vec<bool> = acks
            .into_iter()
            .map(|rx| rx.is_some_and(|rx| rx.recv_timeout(Duration::from_secs(10)).is_ok()))
            .collect();
        let Ok(mut threads) = self.threads.lock() else {
            return false;
        };
        let mut all = true;
        for (thread, ok) in std::mem::take(&mut *threads).into_iter().zip(stopped) {
            // A shard that did not answer within the bound is left behind rather than
            // hanging the shutdown.
            if ok {
                all &= thread.join().is_ok();
            } else {
                all = false;
            }
        }
        all
    }
}

/// Where each request's grant stood in a car's newest command, so that a refusal naming
/// grants by place ([`Outcome::GrantsRefused`]) names requests.
#[derive(Debug, Clone)]
struct GrantPlaces {
    /// The car's seq when this process loaded or registered it: commands up to it were
    /// signed before, in an order not known here.
    loaded_seq: u64,
    /// The newest command this process signed.
    signed: Option<SignedGrants>,
}

/// The requests of the grants of one command, in the order the command lists them (at
/// most [`MAX_GRANTS`]).
#[derive(Debug, Clone)]
struct SignedGrants {
    seq: u64,
    /// `None` for a grant whose request id does not parse (never for the gateway's own).
    requests: Vec<Option<RequestId>>,
    /// `false` when the places are not known for sure: the seq was first signed by an
    /// earlier process (whose order is not known here), or two signings of it listed
    /// different grants (one ran out between them). A refusal of it is then taken as one
    /// that names no grant.
    certain: bool,
}

/// A service whose last request failed, shown as `ERROR` in the car's status.
#[derive(Debug, Clone)]
struct ServiceError {
    service_id: String,
    at: String,
}

/// What the newest report said.
#[derive(Debug, Clone)]
struct LastReport {
    error_codes: Vec<String>,
    firmware_version: String,
    signal: u8,
}

/// One car, as its shard holds it.
struct Car {
    key: TrustedKey,
    vehicle: VehicleRec,
    rec: CarRec,
    online: bool,
    last_seen_ms: Option<u64>,
    last_report: Option<LastReport>,
    last_sent_ms: Option<u64>,
    last_resend: Option<Instant>,
    pending: Vec<RequestId>,
    /// Final requests whose callback is in its first try (the record keeps them listed, so
    /// a restart sends them again).
    awaiting: Vec<RequestId>,
    /// Activations whose grants are left out of the car's commands for now: the car refused
    /// a command for a grant and could not say which, so the unconfirmed ones go to it one
    /// at a time ([`Shard::refused_by`]). Oldest first; a subset of `pending`, so at most
    /// [`MAX_IN_FLIGHT_PER_CAR`]. Stored (the `held` tree) with the car's record, so that
    /// after a restart the grants still held stay out of its commands and the isolation
    /// goes on where it was; every change marks the car dirty (a grant held or released:
    /// written with the command that follows) or lazy (a held request ended). While held, a
    /// request spends no attempt (its attempts start at its release), and a held renewal's
    /// car keeps the grant it renews. If a request of the car runs out of attempts, all go
    /// out together: a car that answers nothing cannot tell one grant from another.
    held: Vec<RequestId>,
    /// What the `held` tree holds for this car: written again only when `held` differs, so a
    /// car that never had a refusal costs no store write for it.
    held_written: Vec<RequestId>,
    /// The requests of the grants of its newest command, by place.
    places: GrantPlaces,
    errors: Vec<ServiceError>,
    history_written: usize,
    /// History entries not yet in the store, oldest first, with their ids: written with
    /// the car's lazy changes, so that a request, the report that settles it and its
    /// result cost one store write together (at most [`MAX_UNWRITTEN_HISTORY`]).
    unwritten_history: Vec<(u64, HistoryEntry)>,
    /// Queued in the shard's lazy cars for its unwritten history.
    history_queued: bool,
    probe_answered: bool,
    /// Commands the car refused as signed with a key it does not trust, since it last took
    /// one of ours.
    unknown_key_refusals: u32,
    /// Changed since the last commit: written once in the next one.
    dirty: bool,
    /// Changed in ways that may wait up to [`LAZY_WRITE_AFTER`].
    lazy: bool,
}

impl GrantPlaces {
    /// Keeps the places of a command's grants as signed (`requests`, in its order).
    fn note_signed(&mut self, seq: u64, requests: Vec<Option<RequestId>>) {
        match &mut self.signed {
            Some(signed) if signed.seq == seq => {
                if signed.requests != requests {
                    signed.certain = false;
                }
            }
            slot => {
                *slot = Some(SignedGrants {
                    seq,
                    requests,
                    certain: seq > self.loaded_seq,
                })
            }
        }
    }

    /// The requests whose grants a refusal of command `seq` names by place (`grants`), or
    /// `None` when the places are not known for sure.
    fn named_by(&self, seq: u64, grants: u8) -> Option<Vec<RequestId>> {
        let signed = self.signed.as_ref().filter(|s| s.seq == seq && s.certain)?;
        Some(
            refused_places(grants)
                .filter_map(|i| signed.requests.get(i).copied().flatten())
                .collect(),
        )
    }
}

/// A request not yet final.
struct Pending {
    rec: RequestRec,
    gen: u64,
    campaign: Option<Arc<CampaignCounts>>,
    /// When the HTTP side received it (`None`: loaded from the store at start, where only
    /// its creation time in milliseconds is known).
    received: Option<Instant>,
    /// The grant of the same service this request replaced or removed (the `replaced` tree):
    /// put back if the request fails.
    replaced: Option<GrantRec>,
}

/// The effects of one batch, run after its flush.
#[derive(Default)]
struct Batch {
    publishes: Vec<Outbound>,
    after: Vec<Continuation>,
    /// Outbox entries to hand to the webhook sender once flushed.
    callbacks: Vec<Due>,
    /// Callbacks parked in the outbox in this batch (its lane was crowded), released once
    /// flushed.
    parked: Vec<OutboxEntry>,
    /// Cars whose record changed in this batch, written once at its commit.
    dirty_cars: Vec<Vin>,
    /// History entries of this batch, written at its commit as one value per car (a
    /// report and the result it settles cost one store write, not two).
    history: Vec<(Vin, u64, HistoryEntry)>,
}

struct Shard {
    sh: Arc<Shared>,
    cars: HashMap<Vin, Car>,
    pending: HashMap<RequestId, Pending>,
    /// At most twice the pending requests plus [`TIMER_SLACK`] (+1 while one is pushed).
    timers: Timers,
    gen: u64,
    batch: Batch,
    buf: Box<[u8; MAX_COMMAND_FRAME_SIZE]>,
    /// Cars with lazy changes or unwritten history, oldest first, with when the first of
    /// their changes was made.
    lazy_cars: std::collections::VecDeque<(Instant, Vin)>,
    /// Campaign batches being worked through, [`CAMPAIGN_CHUNK`] requests at a time.
    jobs: std::collections::VecDeque<CampaignJob>,
    /// Where commits go to be flushed ([`run_flusher`]); `None` once the shard has stopped.
    flusher: Option<flume::Sender<Flushed>>,
    /// The flusher's thread, joined when the shard stops, so that every commit's answers
    /// have gone out and the store is let go.
    flusher_thread: Option<std::thread::JoinHandle<()>>,
    /// Decommissioned cars with callbacks still in their first try, which their tombstone
    /// lists ([`RetiredRec::awaiting`]) until each is delivered or filed in the outbox. A car
    /// leaves it once none is left, so it holds only the cars of the last moments' callbacks.
    retired_awaiting: HashMap<Vin, Vec<RequestId>>,
    /// Embedded broker links read by this shard itself ([`Msg::BrokerLink`]): at most one
    /// per router, in practice one.
    broker_links: Vec<rumqttd::local::LinkRx>,
    /// Reports and presence taken from [`Shard::broker_links`], waiting for their turn
    /// ([`SHARD_BATCH`] a turn): at most [`SHARD_QUEUE`], as a task handing them on would
    /// have queued; past that they wait in the router, whose log keeps them. The links are
    /// emptied into it every turn, so a shard busy with a campaign or waiting for a slow
    /// flush leaves the router's log its whole slack.
    broker_inbox: std::collections::VecDeque<Msg>,
}

/// What woke a waiting shard.
// Returned once per wait and moved straight into the turn's batch: boxing the message would
// cost an allocation per message for nothing.
#[allow(clippy::large_enum_variant)]
enum Woke {
    /// A message on its queue.
    Msg(Msg),
    /// A signal from a broker link, or a deadline, or nothing (it did not wait).
    Look,
    /// Broker link `i` is closed (its router is gone).
    LinkGone(usize),
    /// Its queue is closed: the engine is gone.
    Closed,
}

/// Commits waiting for a shard's flusher at most; past it the shard waits (it is then as
/// far ahead of the disk as it may get).
const FLUSH_QUEUE: usize = 64;

/// What a commit does once its writes are durable.
struct Flushed {
    publishes: Vec<Outbound>,
    callbacks: Vec<Due>,
    parked: Vec<OutboxEntry>,
    after: Vec<Continuation>,
}

/// A shard's flusher: makes each commit handed to it durable (the commits waiting share one
/// flush) and then does what they waited for (publishes, callbacks, answers), in commit
/// order. The shard meanwhile goes on with its next batch instead of waiting for the disk:
/// a slow sync (4-20 ms on this machine's disk, every second or so) then holds back only
/// what was written before it, not the work behind it.
fn run_flusher(sh: &Shared, rx: &flume::Receiver<Flushed>) {
    // Callbacks parked in a commit whose flush failed: released after the next flush that
    // completes (or at the next start), never before the final states they report.
    let mut parked_left: Vec<OutboxEntry> = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut commits = vec![first];
        commits.extend(rx.try_iter().take(FLUSH_QUEUE));
        let r = sh.store.flush(&sh.metrics);
        for c in commits {
            if r.is_ok() {
                if !c.publishes.is_empty() {
                    sh.out.publish(c.publishes, &sh.metrics);
                }
                if let Some(w) = &sh.webhook {
                    for due in c.callbacks {
                        w.send(due);
                    }
                    parked_left.extend(c.parked);
                    w.release(&std::mem::take(&mut parked_left));
                }
            } else {
                parked_left.extend(c.parked);
            }
            for k in c.after {
                k(r.clone());
            }
        }
    }
}

/// A shard's part of a campaign, not yet all accepted.
struct CampaignJob {
    /// The campaign's id text (every request of a job is of one campaign).
    campaign: Option<String>,
    reqs: std::vec::IntoIter<NewRequest>,
    fill_in: bool,
    /// The campaign was cancelled: what is left of it is not made.
    cancelled: bool,
    part: CampaignPart,
    /// Set by the commit of any chunk that failed to flush.
    failed: Arc<std::sync::atomic::AtomicBool>,
    resp: oneshot::Sender<CampaignPart>,
}

/// What a shard did with its part of a campaign ([`Msg::Batch`]).
#[derive(Debug, Default)]
pub(crate) struct CampaignPart {
    /// Requests made (or, in a repeat, found made before).
    pub(crate) accepted: usize,
    /// Cars refused, with why.
    pub(crate) refused: Vec<(String, String)>,
    /// Requests not made because the campaign was cancelled before their turn came.
    pub(crate) not_made: usize,
}

fn rid_text(id: &RequestId) -> String {
    id.to_string()
}

fn to_grant(g: &GrantRec) -> Option<Grant> {
    let mut grant = Grant::new(ServiceId::new(&g.service_id).ok()?);
    for f in &g.flags {
        grant.flags.push(FeatureFlag::new(f).ok()?).ok()?;
    }
    for (k, v) in &g.params {
        grant
            .params
            .push(Param {
                key: ParamKey::new(k).ok()?,
                value: ParamValue::new(v).ok()?,
            })
            .ok()?;
    }
    grant.ends_at = g.ends_at;
    Some(grant)
}

impl Shard {
    fn new(
        sh: Arc<Shared>,
        flusher: flume::Sender<Flushed>,
        flusher_thread: std::thread::JoinHandle<()>,
    ) -> Shard {
        Shard {
            sh,
            flusher: Some(flusher),
            flusher_thread: Some(flusher_thread),
            cars: HashMap::new(),
            pending: HashMap::new(),
            timers: BinaryHeap::new(),
            gen: 0,
            batch: Batch::default(),
            buf: Box::new([0u8; MAX_COMMAND_FRAME_SIZE]),
            lazy_cars: std::collections::VecDeque::new(),
            jobs: std::collections::VecDeque::new(),
            retired_awaiting: HashMap::new(),
            broker_links: Vec::new(),
            broker_inbox: std::collections::VecDeque::new(),
        }
    }

    /// Waits for a message on `rx` or a signal from a broker link, until `deadline`; with
    /// campaign work or broker messages left, only looks.
    fn wait(&self, rx: &flume::Receiver<Msg>, deadline: Option<Instant>) -> Woke {
        let from_queue = |r: Result<Msg, flume::RecvError>| r.map_or(Woke::Closed, Woke::Msg);
        if !self.jobs.is_empty() || !self.broker_inbox.is_empty() {
            return match rx.try_recv() {
                Ok(m) => Woke::Msg(m),
                Err(flume::TryRecvError::Empty) => Woke::Look,
                Err(flume::TryRecvError::Disconnected) => Woke::Closed,
            };
        }
        if self.broker_links.is_empty() {
            return match deadline {
                Some(at) => match rx.recv_deadline(at) {
                    Ok(m) => Woke::Msg(m),
                    Err(flume::RecvTimeoutError::Timeout) => Woke::Look,
                    Err(flume::RecvTimeoutError::Disconnected) => Woke::Closed,
                },
                None => from_queue(rx.recv()),
            };
        }
        let mut select = flume::Selector::new().recv(rx, from_queue);
        for (i, link) in self.broker_links.iter().enumerate() {
            select = select.recv(link.signals(), move |r| match r {
                Ok(()) => Woke::Look,
                Err(_) => Woke::LinkGone(i),
            });
        }
        match deadline {
            Some(at) => select.wait_deadline(at).unwrap_or(Woke::Look),
            None => select.wait(),
        }
    }

    /// Empties the broker links into [`Shard::broker_inbox`] (as [`crate::mqtt::route`]
    /// makes their messages) and appends its oldest [`SHARD_BATCH`] to `msgs`.
    fn take_broker_messages(&mut self, msgs: &mut Vec<Msg>) {
        for link in &mut self.broker_links {
            while self.broker_inbox.len() < SHARD_QUEUE {
                let Some(n) = link.try_next() else {
                    break;
                };
                match n {
                    rumqttd::Notification::Forward(f) => {
                        if let Some((_, msg)) = crate::mqtt::route_forward(&self.sh.metrics, &f) {
                            self.broker_inbox.push_back(msg);
                        }
                    }
                    // The router stopped forwarding with the link's queue full; what it held
                    // is taken, so it may go on.
                    rumqttd::Notification::Unschedule => {
                        if let Err(e) = link.wake_blocking() {
                            tracing::error!(error = %e, "embedded broker link closed");
                        }
                    }
                    _ => {}
                }
            }
        }
        let turn = self.broker_inbox.len().min(SHARD_BATCH);
        msgs.extend(self.broker_inbox.drain(..turn));
        // A burst's room is given back once it is through (a full inbox holds ~28 MiB).
        if self.broker_inbox.is_empty() && self.broker_inbox.capacity() > SHARD_BATCH {
            self.broker_inbox.shrink_to(SHARD_BATCH);
        }
    }

    fn run(mut self, rx: flume::Receiver<Msg>) {
        loop {
            let timer = self.timers.peek().map(|Reverse((at, _, _))| *at);
            let lazy = self.lazy_cars.front().map(|(t, _)| *t + LAZY_WRITE_AFTER);
            let deadline = match (timer, lazy) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let mut msgs = Vec::with_capacity(64);
            match self.wait(&rx, deadline) {
                Woke::Msg(m) => msgs.push(m),
                Woke::Look => {}
                Woke::LinkGone(i) => {
                    tracing::error!("embedded broker link closed");
                    self.broker_links.swap_remove(i);
                }
                Woke::Closed => break,
            }
            msgs.extend(rx.try_iter().take(SHARD_BATCH));
            self.take_broker_messages(&mut msgs);
            if !msgs.is_empty() {
                let verified = self.verify_reports(&msgs);
                for (m, pre) in msgs.into_iter().zip(verified) {
                    if let Some(stop) = self.handle(m, pre) {
                        // Campaigns already begun are finished, so their answers hold.
                        while !self.jobs.is_empty() {
                            self.work_campaigns();
                        }
                        self.write_lazy();
                        self.commit();
                        self.stop_flusher();
                        let _ = stop.send(());
                        return;
                    }
                }
            }
            self.work_campaigns();
            self.fire_timers();
            self.write_due_lazy();
            self.commit();
        }
        self.write_lazy();
        self.commit();
        self.stop_flusher();
    }

    /// Lets the flusher finish what was handed to it, and waits for it.
    fn stop_flusher(&mut self) {
        self.flusher = None;
        if let Some(t) = self.flusher_thread.take() {
            let _ = t.join();
        }
    }

    /// Accepts the next [`CAMPAIGN_CHUNK`] requests of the oldest campaign job; once a job is
    /// through, its answer goes out after the flush of its last chunk.
    fn work_campaigns(&mut self) {
        let Some(mut job) = self.jobs.pop_front() else {
            return;
        };
        // What is left of a cancelled campaign costs a lookup a car: all of it at once.
        let chunk = if job.cancelled {
            usize::MAX
        } else {
            CAMPAIGN_CHUNK
        };
        for r in job.reqs.by_ref().take(chunk) {
            if job.fill_in && self.find_request(&r.request_id).is_some() {
                job.part.accepted += 1;
                continue;
            }
            if job.cancelled {
                job.part.not_made += 1;
                continue;
            }
            let vin = r.vin.to_string();
            match self.new_request(r) {
                Ok(_) => job.part.accepted += 1,
                Err(e) => job.part.refused.push((vin, e.reason)),
            }
        }
        let failed = job.failed.clone();
        if job.reqs.len() > 0 {
            self.batch.after.push(Box::new(move |f| {
                if f.is_err() {
                    failed.store(true, Relaxed);
                }
            }));
            self.jobs.push_front(job);
            return;
        }
        let CampaignJob { mut part, resp, .. } = job;
        self.batch.after.push(Box::new(move |f| {
            if f.is_err() || failed.load(Relaxed) {
                part.accepted = 0;
            }
            let _ = resp.send(part);
        }));
    }

    /// Writes every car with lazy changes (in the next commit's flush, or sled's own).
    fn write_lazy(&mut self) {
        for (_, vin) in std::mem::take(&mut self.lazy_cars) {
            self.write_car_lazily(&vin);
        }
    }

    /// Writes the cars whose lazy changes are [`LAZY_WRITE_AFTER`] old, at most
    /// [`LAZY_WRITE_STEP`] at a time, so that a burst of them (a campaign's cars a second
    /// later) is spread over several batches instead of stalling one.
    fn write_due_lazy(&mut self) {
        for _ in 0..LAZY_WRITE_STEP {
            match self.lazy_cars.front() {
                Some((t, _)) if t.elapsed() >= LAZY_WRITE_AFTER => {}
                _ => return,
            }
            if let Some((_, vin)) = self.lazy_cars.pop_front() {
                self.write_car_lazily(&vin);
            }
        }
    }

    fn commit(&mut self) {
        let mut batch = std::mem::take(&mut self.batch);
        self.write_history(std::mem::take(&mut batch.history));
        for vin in std::mem::take(&mut batch.dirty_cars) {
            if self.cars.get(&vin).is_some_and(|c| c.dirty) {
                self.save_car(&vin);
            }
        }
        if batch.publishes.is_empty()
            && batch.after.is_empty()
            && batch.callbacks.is_empty()
            && batch.parked.is_empty()
        {
            return;
        }
        let commit = Flushed {
            publishes: batch.publishes,
            callbacks: batch.callbacks,
            parked: batch.parked,
            after: batch.after,
        };
        // The writes above happen before the flusher's flush is called, so that flush makes
        // them durable; nothing of this batch leaves the process before it has.
        let unsent = match &self.flusher {
            Some(f) => f.send(commit).err().map(|e| e.into_inner()),
            None => Some(commit),
        };
        if let Some(commit) = unsent {
            for k in commit.after {
                k(Err("the store's flusher has stopped".into()));
            }
        }
    }

    fn schedule(&mut self, id: RequestId, after: Duration) {
        self.gen += 1;
        if let Some(p) = self.pending.get_mut(&id) {
            p.gen = self.gen;
        }
        self.timers
            .push(Reverse((Instant::now() + after, self.gen, id)));
        let pending = &self.pending;
        sweep_stale_timers(&mut self.timers, pending.len(), |id, gen| {
            pending.get(id).is_some_and(|p| p.gen == gen)
        });
    }

    /// Opens the reports among `msgs` whose car is known in one batch verification (about
    /// half the work of one by one); the answer for message `i` is at `i` (`None`: not a
    /// report of a known car, opened when handled).
    fn verify_reports(&self, msgs: &[Msg]) -> Vec<Option<Result<Report, RejectCode>>> {
        let mut out: Vec<Option<Result<Report, RejectCode>>> = Vec::with_capacity(msgs.len());
        out.resize_with(msgs.len(), || None);
        let mut at = Vec::new();
        let mut frames: Vec<(&[u8], &TrustedKey)> = Vec::new();
        // A report behind its car's key replacement in the same batch must be opened with
        // the new key: it is left to be opened when handled, after the replacement.
        let mut rekeyed: Vec<Vin> = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            match m {
                // A decommissioned car's reports are no longer believed; one registered again
                // after it in the batch may have a new key.
                Msg::ReplaceKey { vin, .. } | Msg::Decommission { vin, .. } => rekeyed.push(*vin),
                Msg::Report { vin, payload } if !rekeyed.contains(vin) => {
                    if let Some(car) = self.cars.get(vin) {
                        at.push(i);
                        frames.push((payload.as_slice(), &car.key));
                    }
                }
                _ => {}
            }
        }
        if frames.len() < caas_protocol::MIN_BATCH {
            return out;
        }
        for (i, r) in at.into_iter().zip(open_reports(&frames)) {
            out[i] = Some(r);
        }
        out
    }

    /// Handles one message (`pre`: its report, already opened); `Some` means stop.
    fn handle(
        &mut self,
        msg: Msg,
        pre: Option<Result<Report, RejectCode>>,
    ) -> Option<std::sync::mpsc::Sender<()>> {
        match msg {
            Msg::Register {
                rec,
                vin,
                key,
                resp,
            } => {
                let r = self.register(rec, vin, key);
                match r {
                    Ok(created) => self.batch.after.push(Box::new(move |f| {
                        let _ = resp.send(f.map(|_| created).map_err(ApiError::storage));
                    })),
                    Err(e) => {
                        let _ = resp.send(Err(e));
                    }
                }
            }
            Msg::Request { req, resp } => match self.accept(req) {
                // A repeat too is answered once this batch is durable: the request it names
                // may have been taken in this very batch.
                Ok(a) => self.batch.after.push(Box::new(move |f| {
                    let _ = resp.send(f.map(|_| a).map_err(ApiError::storage));
                })),
                Err(e) => {
                    let _ = resp.send(Err(e));
                }
            },
            Msg::ReplaceKey {
                vin,
                key,
                previous,
                resp,
            } => match self.replace_key(&vin, key, &previous) {
                // A repeat too waits for the flush: the replacement it repeats may be in
                // this very batch.
                Ok(rec) => self.batch.after.push(Box::new(move |f| {
                    let _ = resp.send(f.map(|_| rec).map_err(ApiError::storage));
                })),
                Err(e) => {
                    let _ = resp.send(Err(e));
                }
            },
            Msg::Decommission { vin, resp } => match self.decommission(&vin) {
                // A repeat too waits for the flush: the decommissioning it repeats may be in
                // this very batch.
                Ok(rec) => self.batch.after.push(Box::new(move |f| {
                    let _ = resp.send(f.map(|_| rec).map_err(ApiError::storage));
                })),
                Err(e) => {
                    let _ = resp.send(Err(e));
                }
            },
            Msg::Batch {
                reqs,
                fill_in,
                resp,
            } => {
                let campaign = reqs.first().and_then(|r| r.campaign_id.clone());
                // A cancel sets its mark before it reaches the shards, so a part that
                // finds it came too late for that cancel to end its requests: make none.
                let cancelled = campaign
                    .as_deref()
                    .is_some_and(|c| self.campaign_cancelled(c));
                self.jobs.push_back(CampaignJob {
                    campaign,
                    reqs: reqs.into_iter(),
                    fill_in,
                    cancelled,
                    part: CampaignPart::default(),
                    failed: Arc::default(),
                    resp,
                })
            }
            Msg::Report { vin, payload } => self.on_report(vin, &payload, pre),
            Msg::Presence { vin, online } => self.on_presence(vin, online),
            Msg::Status { vin, resp } => {
                let _ = resp.send(self.status(&vin));
            }
            Msg::Statuses { vins, resp } => {
                let _ = resp.send(vins.iter().map(|v| self.status(v)).collect());
            }
            Msg::Cancel { target, resp } => {
                let ended = self.cancel(&target);
                self.batch.after.push(Box::new(move |f| {
                    let _ = resp.send(f.map(|_| ended).map_err(ApiError::storage));
                }));
            }
            Msg::WriteHistory { vin, resp } => {
                self.write_history_now(&vin);
                let _ = resp.send(());
            }
            Msg::Load { rec, car } => self.load(rec, car),
            Msg::LoadPending { rec, campaign } => self.load_pending(rec, campaign),
            Msg::LoadHeld { vin, held } => self.load_held(vin, &held),
            Msg::LoadRetired { vin, awaiting } => self.load_retired(vin, &awaiting),
            Msg::CallbacksSettled(list) => {
                for (vin, request_id) in list {
                    if let Some(car) = self.cars.get_mut(&vin) {
                        car.awaiting.retain(|x| *x != request_id);
                    } else {
                        self.retired_callback_settled(&vin, request_id);
                    }
                    self.mark_lazy(&vin);
                }
            }
            Msg::RepublishAll { only_behind } => {
                let vins: Vec<Vin> = self
                    .cars
                    .iter()
                    .filter(|(_, c)| c.rec.seq > 0)
                    .filter(|(_, c)| !only_behind || c.rec.seq > c.rec.applied_seq)
                    .map(|(v, _)| *v)
                    .collect();
                for vin in vins {
                    self.send_state(&vin, false);
                }
            }
            Msg::Stop(tx) => return Some(tx),
            Msg::BrokerLink(link) => self.broker_links.push(*link),
        }
        None
    }

    fn load(&mut self, rec: VehicleRec, car: Option<CarRec>) {
        let (Ok(vin), Ok(key)) = (
            rec.vin.parse::<Vin>(),
            caas_protocol::verifying_key_from_hex(&rec.public_key),
        ) else {
            tracing::warn!(vin = %rec.vin, "stored vehicle is unreadable; skipped");
            return;
        };
        if let Err(owner) = self.sh.key_owners.claim(&key, &vin) {
            // Stored before keys were checked: both cars are served, and neither's key is
            // given to a third.
            tracing::warn!(%vin, %owner, "two stored cars have the same public key");
        }
        let known = self
            .cars
            .insert(vin, new_car(key, rec, car.unwrap_or_default()));
        if known.is_none() {
            self.sh.metrics.cars_registered.fetch_add(1, Relaxed);
        }
    }

    fn load_pending(&mut self, rec: RequestRec, campaign: Option<Arc<CampaignCounts>>) {
        let Ok(id) = rec.request_id.parse::<RequestId>() else {
            return;
        };
        let Ok(vin) = rec.vin.parse::<Vin>() else {
            return;
        };
        if !self.cars.contains_key(&vin) {
            return;
        }
        if rec.phase == "DONE" {
            // Final, but its callback was not known delivered: send it again.
            self.queue_callback(vin, id, &rec);
            self.mark_lazy(&vin);
            return;
        }
        let Some(car) = self.cars.get_mut(&vin) else {
            return;
        };
        car.pending.push(id);
        let wait = match rec.phase.as_str() {
            "BACKOFF" => self.sh.retry.backoff_after(rec.attempts),
            _ => self.sh.retry.attempt_timeout,
        };
        self.sh.metrics.requests_in_flight.fetch_add(1, Relaxed);
        self.pending.insert(
            id,
            Pending {
                replaced: self
                    .sh
                    .store
                    .replaced
                    .get(id.0)
                    .ok()
                    .flatten()
                    .and_then(|v| dec(&v)),
                rec,
                gen: 0,
                campaign,
                received: None,
            },
        );
        self.schedule(id, wait);
    }

    /// Restores `vin`'s held grants from the store: those of `stored` (request ids, oldest
    /// first) still in flight, in order. One that ended after the list was last written is
    /// dropped, and the stored list is written again with the car's next write.
    fn load_held(&mut self, vin: Vin, stored: &[String]) {
        let Some(car) = self.cars.get_mut(&vin) else {
            return;
        };
        let stored: Vec<RequestId> = stored.iter().filter_map(|s| s.parse().ok()).collect();
        let mut held: Vec<RequestId> = Vec::new();
        for id in &stored {
            if car.pending.contains(id) && self.pending.contains_key(id) && !held.contains(id) {
                held.push(*id);
            }
        }
        car.held = held;
        car.held_written = stored;
        if car.held != car.held_written {
            self.mark_lazy(&vin);
        }
    }

    fn register(&mut self, rec: VehicleRec, vin: Vin, key: VerifyingKey) -> Result<bool, ApiError> {
        if let Some(car) = self.cars.get(&vin) {
            if car.key.key == key {
                return Ok(false);
            }
            return Err(ApiError::new(
                409,
                "vehicle already registered with another key",
                "publicKey",
                "this VIN is registered with a different public key",
            ));
        }
        // Registrations are rare: reading the tombstone costs nothing that matters.
        let retired = self
            .sh
            .store
            .retired_car(vin.as_bytes())
            .map_err(ApiError::storage)?;
        self.sh
            .key_owners
            .claim(&key, &vin)
            .map_err(|owner| key_of_another_car("publicKey", &owner))?;
        // The callbacks still under way for a decommissioned car are those this process
        // keeps for it (its start queued again those its tombstone listed).
        let awaiting = match retired {
            Some(_) => self.retired_awaiting.get(&vin).cloned().unwrap_or_default(),
            None => Vec::new(),
        };
        // A decommissioned car's seq goes on from its tombstone. Its record is written
        // before the registration: sled keeps the order of writes, so whatever a crash leaves
        // of this never has the car registered with a seq that starts again at 0.
        let mut car_rec = CarRec::default();
        if let Some(r) = &retired {
            car_rec.seq = r.seq;
            car_rec.pending = awaiting.iter().map(rid_text).collect();
            if let Err(e) = self.sh.store.cars.insert(vin.as_bytes(), enc(&car_rec)) {
                self.sh.key_owners.release(&key, &vin);
                return Err(ApiError::storage(e));
            }
        }
        if let Err(e) = self.sh.store.vehicles.insert(vin.as_bytes(), enc(&rec)) {
            self.sh.key_owners.release(&key, &vin);
            return Err(ApiError::storage(e));
        }
        self.cars.insert(vin, new_car(key, rec, car_rec));
        self.sh.metrics.cars_registered.fetch_add(1, Relaxed);
        if let Some(r) = retired {
            // The tombstone's work is done: the car's record holds the seq again, and the
            // callbacks still under way (if any) are the car's to keep.
            let _ = self.sh.store.retired.remove(vin.as_bytes());
            self.retired_awaiting.remove(&vin);
            if let Some(car) = self.cars.get_mut(&vin) {
                car.awaiting = awaiting;
            }
            self.mark_dirty(&vin);
            self.history(
                &vin,
                "REGISTERED",
                Some(r.seq),
                None,
                format!(
                    "registered again after its decommissioning at {}: seq goes on above {}",
                    r.decommissioned_at, r.seq
                ),
            );
            self.move_history_to_batch(&vin);
            // Its unit may have stayed connected all along, saying nothing the shard took in
            // (its presence and reports went unheard while the car was retired): a status
            // query makes it report, so the car shows ONLINE and its applied seq is known.
            self.query_status(&vin);
        }
        Ok(true)
    }

    /// Takes `vin` out of the fleet ([`Msg::Decommission`]): every request of it not yet
    /// final ends FAILED with [`DECOMMISSIONED`] (its callback filed in the outbox, so the
    /// backend charges nothing), one last command with the next seq withdraws every grant
    /// (retained, so a unit that comes online later drops its features; the base platform
    /// is in no grant), and its registration ends: the shard forgets it (no re-sends; its
    /// reports count as an unknown car's), its key is free for another car, and a
    /// tombstone keeps its seq and when. Its history stays. Everything is written in this
    /// batch, answered after its flush.
    fn decommission(&mut self, vin: &Vin) -> Result<RetiredRec, ApiError> {
        if !self.cars.contains_key(vin) {
            // A repeat (a script that retries) answers what the first did and changes
            // nothing; a VIN never registered is unknown.
            return match self.sh.store.retired_car(vin.as_bytes()) {
                Ok(Some(rec)) => Ok(RetiredRec {
                    requests_failed: 0,
                    ..rec
                }),
                Ok(None) => Err(crate::api::unknown_car()),
                Err(e) => Err(ApiError::storage(e)),
            };
        }
        let now = now_ms();
        let at = iso_ms(now);
        let ids: Vec<RequestId> = self
            .cars
            .get(vin)
            .map(|c| c.pending.clone())
            .unwrap_or_default();
        let mut failed = 0;
        for id in ids {
            if self.fail_decommissioned(vin, id, &at) {
                failed += 1;
            }
        }
        let Some(car) = self.cars.get_mut(vin) else {
            return Err(crate::api::unknown_car());
        };
        car.pending.clear();
        car.held.clear();
        car.rec.grants.clear();
        car.rec.settles.clear();
        car.rec.seq += 1;
        let seq = car.rec.seq;
        let key = car.key.key;
        let key_hex = caas_protocol::verifying_key_to_hex(&key).to_string();
        self.send_state(vin, false);
        self.history(
            vin,
            "COMMAND",
            Some(seq),
            None,
            "every grant withdrawn: the car is decommissioned".into(),
        );
        self.history(
            vin,
            "DECOMMISSIONED",
            Some(seq),
            None,
            format!(
                "taken out of the fleet: {failed} requests in flight failed, grants withdrawn \
                 with seq {seq}, key {}... released",
                &key_hex[..16]
            ),
        );
        let Some(car) = self.cars.remove(vin) else {
            return Err(crate::api::unknown_car());
        };
        // Written in the order a crash must find them (sled keeps the order of writes, and
        // only what a flush covered counts): the ended requests and their callbacks (above),
        // the history, the car's last record, the tombstone, and last the end of its
        // registration. Whatever part of this survives a crash is a car still registered
        // (with fewer requests in flight), or a decommissioned one; never one registered with
        // its seq lost.
        let history: Vec<(Vin, u64, HistoryEntry)> = car
            .unwritten_history
            .iter()
            .map(|(id, e)| (*vin, *id, e.clone()))
            .collect();
        let (mine, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.batch.history)
            .into_iter()
            .partition(|(v, _, _)| v == vin);
        self.batch.history = others;
        self.write_history(mine.into_iter().chain(history).collect());
        let store = &self.sh.store;
        let last = CarRec {
            pending: car.awaiting.iter().map(rid_text).collect(),
            ..car.rec.clone()
        };
        let tomb = RetiredRec {
            vin: vin.to_string(),
            decommissioned_at: at,
            seq,
            public_key: key_hex,
            requests_failed: failed,
            awaiting: last.pending.clone(),
        };
        let written = store
            .held
            .remove(vin.as_bytes())
            .and_then(|_| store.cars.insert(vin.as_bytes(), enc(&last)))
            .and_then(|_| store.retired.insert(vin.as_bytes(), enc(&tomb)))
            .and_then(|_| store.vehicles.remove(vin.as_bytes()))
            // Once the registration is gone the record is only a leftover: the tombstone
            // has its seq and callbacks (a crash before this is tidied at the next start).
            .and_then(|_| store.cars.remove(vin.as_bytes()));
        self.sh.key_owners.release(&key, vin);
        let m = &self.sh.metrics;
        m.cars_registered.fetch_sub(1, Relaxed);
        if car.online {
            m.connected_cars.fetch_sub(1, Relaxed);
        }
        m.vehicles_decommissioned.fetch_add(1, Relaxed);
        if !car.awaiting.is_empty() {
            self.retired_awaiting.insert(*vin, car.awaiting.clone());
        }
        written.map_err(ApiError::storage)?;
        Ok(tomb)
    }

    /// Ends request `id` of `vin`, being decommissioned, FAILED with [`DECOMMISSIONED`]
    /// (`at`: now); `false` if it was not in flight. Unlike [`Shard::finish`] it sends no
    /// command and puts no grant back: the car's one last command withdraws them all. Its
    /// callback is parked in the outbox (released after this batch's flush, or at the next
    /// start), since the car's record, which keeps first tries, goes.
    fn fail_decommissioned(&mut self, vin: &Vin, id: RequestId, at: &str) -> bool {
        let Some(p) = self.pending.remove(&id) else {
            return false;
        };
        if let Some(c) = &p.campaign {
            c.ended(Ending::Failed);
        }
        let m = &self.sh.metrics;
        m.requests_in_flight.fetch_sub(1, Relaxed);
        m.requests_failed.fetch_add(1, Relaxed);
        if p.replaced.is_some() {
            let _ = self.sh.store.replaced.remove(id.0);
        }
        let mut rec = p.rec;
        rec.phase = "DONE".into();
        rec.status = "FAILED".into();
        rec.error_code = Some(DECOMMISSIONED.into());
        rec.updated_at = at.to_owned();
        rec.completed_at = Some(at.to_owned());
        self.save_request(&rec);
        self.history(
            vin,
            "RESULT",
            Some(rec.seq),
            Some(rec.request_id.clone()),
            format!("FAILED {DECOMMISSIONED}"),
        );
        if let (Some(webhook), Some(body)) = (&self.sh.webhook, callback_body(&rec)) {
            let lane = match rec.campaign_id {
                Some(_) => Lane::Bulk,
                None => Lane::Interactive,
            };
            let due = Due::first(*vin, id, body, lane);
            webhook.park(&due.entry);
            self.batch.parked.push(due.entry);
        }
        true
    }

    /// Queues again the callbacks of decommissioned `vin` that were under way when the car
    /// was decommissioned ([`Msg::LoadRetired`]); the tombstone lists them until each is
    /// delivered or filed.
    fn load_retired(&mut self, vin: Vin, awaiting: &[RequestRec]) {
        self.retired_awaiting.insert(vin, Vec::new());
        for rec in awaiting {
            if let Ok(id) = rec.request_id.parse::<RequestId>() {
                self.queue_callback(vin, id, rec);
            }
        }
        // The tombstone lists what is kept here (not the callbacks already in the outbox).
        let kept = self.retired_awaiting.get(&vin).cloned().unwrap_or_default();
        if kept.is_empty() {
            self.retired_awaiting.remove(&vin);
        }
        self.write_retired_awaiting(&vin, &kept);
    }

    /// A decommissioned car's callback was delivered or filed: its tombstone stops listing
    /// it (a lost write only repeats the callback after a restart, as for a car's record).
    fn retired_callback_settled(&mut self, vin: &Vin, id: RequestId) {
        let Some(list) = self.retired_awaiting.get_mut(vin) else {
            return;
        };
        list.retain(|x| *x != id);
        let left = list.clone();
        if left.is_empty() {
            self.retired_awaiting.remove(vin);
        }
        self.write_retired_awaiting(vin, &left);
    }

    /// Rewrites the callbacks `vin`'s tombstone lists as under way.
    fn write_retired_awaiting(&self, vin: &Vin, left: &[RequestId]) {
        let store = &self.sh.store;
        if let Ok(Some(mut tomb)) = store.retired_car(vin.as_bytes()) {
            tomb.awaiting = left.iter().map(rid_text).collect();
            let _ = store.retired.insert(vin.as_bytes(), enc(&tomb));
        }
    }

    /// Makes `key` the car's key ([`Msg::ReplaceKey`]); the car's record as it is then.
    fn replace_key(
        &mut self,
        vin: &Vin,
        key: VerifyingKey,
        previous: &VerifyingKey,
    ) -> Result<VehicleRec, ApiError> {
        let Some(car) = self.cars.get(vin) else {
            return Err(crate::api::unknown_car());
        };
        if car.key.key == key {
            return Ok(car.vehicle.clone());
        }
        if car.key.key != *previous {
            return Err(ApiError::new(
                409,
                "previous key does not match",
                "previousPublicKey",
                "the car is registered with another public key (a mistyped VIN, or its key \
                 was replaced meanwhile): nothing changed",
            ));
        }
        let old_key = car.key.key;
        let old_hex = caas_protocol::verifying_key_to_hex(&old_key);
        let new_hex = caas_protocol::verifying_key_to_hex(&key);
        let vehicle = VehicleRec {
            public_key: new_hex.to_string(),
            ..car.vehicle.clone()
        };
        self.sh
            .key_owners
            .claim(&key, vin)
            .map_err(|owner| key_of_another_car("publicKey", &owner))?;
        if let Err(e) = self.sh.store.vehicles.insert(vin.as_bytes(), enc(&vehicle)) {
            self.sh.key_owners.release(&key, vin);
            return Err(ApiError::storage(e));
        }
        self.sh.key_owners.release(&old_key, vin);
        let Some(car) = self.cars.get_mut(vin) else {
            return Err(crate::api::unknown_car());
        };
        car.key = TrustedKey::new(key);
        car.vehicle = vehicle.clone();
        // The new unit starts with an empty store: it holds nothing the old one applied,
        // so every grant is pending again until it confirms, and it is behind when it
        // comes online (its state is then sent to it).
        car.rec.applied_seq = 0;
        let online_with_state = car.online && car.rec.seq > 0;
        self.mark_dirty(vin);
        self.history(
            vin,
            "KEY_REPLACED",
            None,
            None,
            format!(
                "public key {}... replaced by {}...",
                &old_hex[..16],
                &new_hex[..16]
            ),
        );
        // Written with this batch, so the entry is as durable as the replacement's answer.
        self.move_history_to_batch(vin);
        self.sh.metrics.keys_replaced.fetch_add(1, Relaxed);
        if online_with_state {
            // A new unit already online had its reports refused until now: its state goes
            // to it again, and its answer (signed with the new key) settles what it holds.
            self.send_state(vin, false);
        }
        Ok(vehicle)
    }

    fn history(
        &mut self,
        vin: &Vin,
        kind: &str,
        seq: Option<u64>,
        request_id: Option<String>,
        detail: String,
    ) {
        let id = next_id();
        let entry = HistoryEntry {
            id: id.to_string(),
            timestamp: iso_ms(id / 1000),
            kind: kind.to_owned(),
            seq,
            request_id,
            detail,
        };
        let Some(car) = self.cars.get_mut(vin) else {
            self.batch.history.push((*vin, id, entry));
            return;
        };
        car.unwritten_history.push((id, entry));
        if car.unwritten_history.len() >= MAX_UNWRITTEN_HISTORY {
            self.move_history_to_batch(vin);
        } else if !car.history_queued {
            car.history_queued = true;
            self.lazy_cars.push_back((Instant::now(), *vin));
        }
    }

    /// Moves `vin`'s unwritten history entries into this batch, to be written at its commit.
    /// The car stays queued if it was (only [`Shard::write_car_lazily`] takes it off), so
    /// its history adds at most one entry to the lazy cars between two of its lazy writes.
    fn move_history_to_batch(&mut self, vin: &Vin) {
        if let Some(car) = self.cars.get_mut(vin) {
            let vin = *vin;
            self.batch.history.extend(
                car.unwritten_history
                    .drain(..)
                    .map(|(id, entry)| (vin, id, entry)),
            );
        }
    }

    /// Writes what waits to be written of `vin`: its record's lazy changes and its
    /// unwritten history (the history with this batch's commit).
    fn write_car_lazily(&mut self, vin: &Vin) {
        if let Some(car) = self.cars.get_mut(vin) {
            car.history_queued = false;
        }
        self.move_history_to_batch(vin);
        if self.cars.get(vin).is_some_and(|c| c.lazy) {
            self.save_car(vin);
        }
    }

    /// Writes `vin`'s history now, the entries waiting in the car and in this batch, so
    /// that a read of the store sees every entry made so far.
    fn write_history_now(&mut self, vin: &Vin) {
        self.move_history_to_batch(vin);
        let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.batch.history)
            .into_iter()
            .partition(|(v, _, _)| v == vin);
        self.batch.history = later;
        self.write_history(now);
    }

    /// Writes the batch's history entries, one value per car (keyed by its oldest entry's
    /// id), and prunes the cars that wrote [`HISTORY_PER_CAR`] values since their last pruning.
    fn write_history(&mut self, mut entries: Vec<(Vin, u64, HistoryEntry)>) {
        // Stable: a car's entries stay in the order they happened (their ids grow).
        entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        for group in entries.chunk_by(|a, b| a.0 == b.0) {
            let (vin, first, _) = &group[0];
            let mut key = Vec::with_capacity(25);
            key.extend_from_slice(vin.as_bytes());
            key.extend_from_slice(&first.to_be_bytes());
            let value = enc(&group.iter().map(|(_, _, e)| e).collect::<Vec<_>>());
            let _ = self.sh.store.history.insert(key, value);
            if let Some(car) = self.cars.get_mut(vin) {
                car.history_written += 1;
                if car.history_written >= HISTORY_PER_CAR {
                    car.history_written = 0;
                    prune_history(&self.sh.store.history, vin);
                }
            }
        }
    }

    fn sign_state(&mut self, vin: &Vin) -> Option<Vec<u8>> {
        let car = self.cars.get(vin)?;
        let mut desired = DesiredState::default();
        for s in car.rec.settles.iter().rev().take(MAX_SETTLES) {
            if let Ok(id) = s.parse::<RequestId>() {
                let _ = desired.settles.push(id);
            }
        }
        let now = now_ms() / 1000;
        // An expired grant would only be dropped by the car; leaving it out keeps the
        // command small and the car's view the same as the status answer's.
        let held = |g: &GrantRec| car.held.iter().any(|id| rid_text(id) == g.request_id);
        // A held renewal's car keeps the grant it renews meanwhile (it took that one before,
        // so it is no suspect): holding it back must not switch off a paid service. Only
        // while the renewal is still the service's grant: a later deactivation or
        // activation of the service decides what the car has instead.
        let renewed = car
            .rec
            .grants
            .iter()
            .filter(|g| held(g))
            .filter_map(|g| g.request_id.parse::<RequestId>().ok())
            .filter_map(|id| self.pending.get(&id)?.replaced.as_ref());
        let mut requests = Vec::new();
        for g in car
            .rec
            .grants
            .iter()
            .filter(|g| !held(g))
            .chain(renewed)
            .filter(|g| unexpired(g, now))
        {
            if let Some(grant) = to_grant(g) {
                if desired.grants.push(grant).is_ok() {
                    requests.push(g.request_id.parse::<RequestId>().ok());
                }
            }
        }
        let seq = car.rec.seq;
        if let Some(car) = self.cars.get_mut(vin) {
            car.places.note_signed(seq, requests);
        }
        let cmd = Command {
            vin: *vin,
            seq,
            issued_at: now,
            not_after: now + self.sh.command_ttl.as_secs(),
            body: CommandBody::SetState(desired),
        };
        match seal_command(&cmd, &self.sh.key, &mut self.buf[..]) {
            Ok(frame) => Some(frame.to_vec()),
            Err(e) => {
                tracing::error!(%vin, error = %e, "cannot seal command");
                None
            }
        }
    }

    /// Asks the car for a status report: a signed query at its newest seq (not retained: a
    /// query answered late says nothing).
    fn query_status(&mut self, vin: &Vin) {
        let Some(car) = self.cars.get(vin) else {
            return;
        };
        let now = now_ms() / 1000;
        let cmd = Command {
            vin: *vin,
            seq: car.rec.seq,
            issued_at: now,
            not_after: now + self.sh.command_ttl.as_secs(),
            body: CommandBody::QueryStatus {
                nonce: rand::random(),
            },
        };
        if let Ok(frame) = seal_command(&cmd, &self.sh.key, &mut self.buf[..]) {
            self.batch.publishes.push(Outbound {
                topic: topics::command_topic(vin).to_string(),
                payload: frame.to_vec(),
                retain: topics::QUERY_RETAIN,
            });
        }
    }

    /// A decommissioned car's unit came online: its withdrawal (the tombstone's seq, no
    /// grant) is signed afresh and published. The one sent at the decommissioning is gone
    /// from an embedded broker after a restart, and past `--command-ttl` a unit refuses it
    /// as expired, so a unit away through either would otherwise keep the features it had
    /// for good. A unit that took it already refuses the repeat as a replay and changes
    /// nothing. Costs a store read per presence of a VIN this shard does not hold.
    fn withdraw_again(&mut self, vin: &Vin) {
        let Ok(Some(tomb)) = self.sh.store.retired_car(vin.as_bytes()) else {
            return;
        };
        let now = now_ms() / 1000;
        let cmd = Command {
            vin: *vin,
            seq: tomb.seq,
            issued_at: now,
            not_after: now + self.sh.command_ttl.as_secs(),
            body: CommandBody::SetState(DesiredState::default()),
        };
        match seal_command(&cmd, &self.sh.key, &mut self.buf[..]) {
            Ok(frame) => {
                tracing::info!(%vin, seq = tomb.seq, "decommissioned car online: withdrawal sent again");
                self.batch.publishes.push(Outbound {
                    topic: topics::command_topic(vin).to_string(),
                    payload: frame.to_vec(),
                    retain: topics::COMMAND_RETAIN,
                });
            }
            Err(e) => tracing::error!(%vin, error = %e, "cannot seal a withdrawal"),
        }
    }

    /// Signs the car's current desired state afresh and queues it for publishing.
    fn send_state(&mut self, vin: &Vin, merge: bool) {
        if merge {
            if let Some(car) = self.cars.get(vin) {
                if car.last_resend.is_some_and(|t| t.elapsed() < RESEND_MERGE) {
                    return;
                }
            }
        }
        let Some(frame) = self.sign_state(vin) else {
            return;
        };
        let Some(car) = self.cars.get_mut(vin) else {
            return;
        };
        car.last_sent_ms = Some(now_ms());
        car.last_resend = Some(Instant::now());
        self.batch.publishes.push(Outbound {
            topic: topics::command_topic(vin).to_string(),
            payload: frame,
            retain: topics::COMMAND_RETAIN,
        });
    }

    /// Marks `vin`'s record to be written at the end of this batch (once, however often
    /// it changes within the batch).
    fn mark_dirty(&mut self, vin: &Vin) {
        if let Some(car) = self.cars.get_mut(vin) {
            if !car.dirty {
                car.dirty = true;
                self.batch.dirty_cars.push(*vin);
            }
        }
    }

    /// Marks `vin`'s record to be written within [`LAZY_WRITE_AFTER`], with other cars'.
    fn mark_lazy(&mut self, vin: &Vin) {
        if let Some(car) = self.cars.get_mut(vin) {
            if !car.lazy && !car.dirty {
                car.lazy = true;
                self.lazy_cars.push_back((Instant::now(), *vin));
            }
        }
    }

    fn save_car(&mut self, vin: &Vin) {
        if let Some(car) = self.cars.get_mut(vin) {
            car.dirty = false;
            car.lazy = false;
            car.rec.pending = car
                .pending
                .iter()
                .chain(&car.awaiting)
                .map(rid_text)
                .collect();
            let _ = self.sh.store.cars.insert(vin.as_bytes(), enc(&car.rec));
            if car.held != car.held_written {
                let held = &self.sh.store.held;
                let written = if car.held.is_empty() {
                    held.remove(vin.as_bytes()).map(|_| ())
                } else {
                    let ids: Vec<String> = car.held.iter().map(rid_text).collect();
                    held.insert(vin.as_bytes(), enc(&ids)).map(|_| ())
                };
                // On an error the next write of the car tries again.
                if written.is_ok() {
                    car.held_written.clone_from(&car.held);
                }
            }
        }
    }

    fn save_request(&self, rec: &RequestRec) {
        if let Ok(id) = rec.request_id.parse::<RequestId>() {
            let _ = self.sh.store.requests.insert(id.0, enc(rec));
        }
    }

    /// A request in flight or in the store.
    fn find_request(&self, id: &RequestId) -> Option<RequestRec> {
        if let Some(p) = self.pending.get(id) {
            return Some(p.rec.clone());
        }
        self.sh
            .store
            .requests
            .get(id.0)
            .ok()
            .flatten()
            .and_then(|v| dec(&v))
    }

    /// Takes a single request: a new one, or, for an idempotency key already used, the
    /// request that key names ([`crate::idempotency`]).
    fn accept(&mut self, nr: NewRequest) -> Result<Accepted, ApiError> {
        let Some(key) = nr.idempotency.as_deref().copied() else {
            return self.new_request(nr).map(|rec| Accepted {
                rec,
                replayed: false,
            });
        };
        let sh = self.sh.clone();
        let store = &sh.store;
        let written = match idempotency::claim(store, &key, nr.request_id.0, nr.created_ms)? {
            Claim::New { written } => written,
            Claim::Mismatch => return Err(idempotency::mismatch()),
            Claim::Repeat { target, current } => {
                if let Some(rec) = self.find_request(&RequestId(target)) {
                    self.sh.metrics.idempotent_replays.fetch_add(1, Relaxed);
                    return Ok(Accepted {
                        rec,
                        replayed: true,
                    });
                }
                idempotency::take_over(store, &key, &current, nr.request_id.0, nr.created_ms)?
            }
        };
        self.new_request(nr)
            .map(|rec| Accepted {
                rec,
                replayed: false,
            })
            .inspect_err(|_| idempotency::release(store, &key, &written))
    }

    fn new_request(&mut self, nr: NewRequest) -> Result<RequestRec, ApiError> {
        let now = now_ms();
        let now_iso = iso_ms(now);
        let rid = rid_text(&nr.request_id);
        let car = self.cars.get_mut(&nr.vin).ok_or_else(|| {
            ApiError::new(
                404,
                "unknown car",
                "vin",
                "no vehicle with this VIN is registered (POST /vehicles)",
            )
        })?;
        if car.pending.len() >= MAX_IN_FLIGHT_PER_CAR {
            return Err(ApiError::new(
                429,
                "too many requests in flight",
                "vin",
                &format!(
                    "this car has {MAX_IN_FLIGHT_PER_CAR} requests not yet final; retry after some complete"
                ),
            ));
        }
        let seq = car.rec.seq + 1;
        let replaced;
        let (action, service_id, grant) = match nr.op {
            Op::Activate(mut g) => {
                let now_s = now / 1000;
                replaced = car
                    .rec
                    .grants
                    .iter()
                    .find(|x| x.service_id == g.service_id && unexpired(x, now_s))
                    .cloned();
                car.rec
                    .grants
                    .retain(|x| x.service_id != g.service_id && unexpired(x, now_s));
                if car.rec.grants.len() >= MAX_GRANTS {
                    return Err(ApiError::new(
                        409,
                        "too many services",
                        "serviceId",
                        &format!("a car holds at most {MAX_GRANTS} services at once"),
                    ));
                }
                g.seq = seq;
                g.request_id = rid.clone();
                g.activation_date = now_iso.clone();
                car.rec.grants.push(g.clone());
                ("ACTIVATE", g.service_id.clone(), Some(g))
            }
            Op::Deactivate(service) => {
                replaced = car
                    .rec
                    .grants
                    .iter()
                    .find(|x| x.service_id == service)
                    .cloned();
                let before = car.rec.grants.len();
                car.rec.grants.retain(|x| x.service_id != service);
                if car.rec.grants.len() == before {
                    return Err(ApiError::new(
                        409,
                        "service not active",
                        "serviceId",
                        "this car has no such service to deactivate",
                    ));
                }
                ("DEACTIVATE", service, None)
            }
        };
        car.rec.seq = seq;
        car.pending.push(nr.request_id);
        car.rec.settles = car
            .pending
            .iter()
            .rev()
            .take(MAX_SETTLES)
            .rev()
            .map(rid_text)
            .collect();
        car.errors.retain(|e| e.service_id != service_id);
        let rec = RequestRec {
            request_id: rid.clone(),
            vin: nr.vin.to_string(),
            action: action.to_owned(),
            service_id: service_id.clone(),
            seq,
            status: "IN_PROGRESS".into(),
            phase: "SENDING".into(),
            attempts: 1,
            error_code: None,
            created_at: iso_ms(nr.created_ms),
            updated_at: now_iso,
            completed_at: None,
            campaign_id: nr.campaign_id.clone(),
            grant,
            created_ms: nr.created_ms,
        };
        self.save_request(&rec);
        if let Some(g) = &replaced {
            let _ = self.sh.store.replaced.insert(nr.request_id.0, enc(g));
        }
        self.mark_dirty(&nr.vin);
        if let Some(c) = &nr.campaign {
            c.accepted();
        }
        self.history(
            &nr.vin,
            "REQUEST",
            Some(seq),
            Some(rid.clone()),
            format!("{action} {service_id}"),
        );
        self.send_state(&nr.vin, false);
        let m = &self.sh.metrics;
        m.requests_created.fetch_add(1, Relaxed);
        m.requests_in_flight.fetch_add(1, Relaxed);
        m.attempts.fetch_add(1, Relaxed);
        self.pending.insert(
            nr.request_id,
            Pending {
                replaced,
                rec: rec.clone(),
                gen: 0,
                campaign: nr.campaign,
                received: Some(nr.received),
            },
        );
        self.schedule(nr.request_id, self.sh.retry.attempt_timeout);
        Ok(rec)
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, gen, id))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(p) = self.pending.get(&id) else {
                continue;
            };
            if p.gen != gen {
                continue;
            }
            let vin = match p.rec.vin.parse::<Vin>() {
                Ok(v) => v,
                Err(_) => continue,
            };
            let retry = self.sh.retry.clone();
            if let Some(wait) = broker_grace(&self.sh.metrics, &p.rec.phase, retry.attempt_timeout)
            {
                self.schedule(id, wait);
                continue;
            }
            // A held grant is in no command yet: its attempts start when its turn comes
            // (`release_held`), not while it waits.
            if self.cars.get(&vin).is_some_and(|c| c.held.contains(&id)) {
                self.schedule(id, retry.attempt_timeout);
                continue;
            }
            let Some(p) = self.pending.get_mut(&id) else {
                continue;
            };
            match p.rec.phase.as_str() {
                "SENDING" if p.rec.attempts < retry.attempts => {
                    p.rec.phase = "BACKOFF".into();
                    let wait = retry.backoff_after(p.rec.attempts);
                    p.rec.updated_at = iso_ms(now_ms());
                    let rec = p.rec.clone();
                    self.save_request(&rec);
                    self.schedule(id, wait);
                }
                "SENDING" => {
                    p.rec.phase = "PROBING".into();
                    p.rec.updated_at = iso_ms(now_ms());
                    let rec = p.rec.clone();
                    self.save_request(&rec);
                    self.probe(&vin, &rec);
                    self.schedule(id, retry.attempt_timeout);
                }
                "BACKOFF" => {
                    p.rec.phase = "SENDING".into();
                    p.rec.attempts += 1;
                    p.rec.updated_at = iso_ms(now_ms());
                    let rec = p.rec.clone();
                    self.save_request(&rec);
                    self.sh.metrics.attempts.fetch_add(1, Relaxed);
                    self.history(
                        &vin,
                        "COMMAND",
                        Some(rec.seq),
                        Some(rec.request_id.clone()),
                        format!("attempt {} (re-sent)", rec.attempts),
                    );
                    self.send_state(&vin, true);
                    self.schedule(id, retry.attempt_timeout);
                }
                _ => {
                    let code = self.no_confirmation_code(&vin);
                    self.finish(id, Err((code.into(), Failure::Unconfirmed)));
                    // The car answers nothing, so holding grants back to tell which one it
                    // refuses learns nothing: they go out together and each runs its own
                    // attempts (a new refusal, once it answers, isolates them again).
                    self.release_held(&vin, usize::MAX);
                }
            }
        }
    }

    fn probe(&mut self, vin: &Vin, rec: &RequestRec) {
        self.sh.metrics.probes.fetch_add(1, Relaxed);
        let Some(car) = self.cars.get_mut(vin) else {
            return;
        };
        car.probe_answered = false;
        self.query_status(vin);
        self.history(
            vin,
            "COMMAND",
            Some(rec.seq),
            Some(rec.request_id.clone()),
            "status query after the last attempt".into(),
        );
    }

    /// Makes a request final: `Ok` settled, `Err((code, why))` failed.
    fn finish(&mut self, id: RequestId, result: Result<(), (String, Failure)>) {
        let Some(p) = self.pending.remove(&id) else {
            return;
        };
        if let Some(c) = &p.campaign {
            c.ended(match &result {
                Ok(()) => Ending::Completed,
                Err((_, Failure::Refused)) => Ending::Refused,
                Err(_) => Ending::Failed,
            });
        }
        let mut rec = p.rec;
        let Ok(vin) = rec.vin.parse::<Vin>() else {
            return;
        };
        let now = now_ms();
        rec.phase = "DONE".into();
        rec.updated_at = iso_ms(now);
        rec.completed_at = Some(iso_ms(now));
        let m = self.sh.metrics.clone();
        m.requests_in_flight.fetch_sub(1, Relaxed);
        let callback_status;
        match &result {
            Ok(()) => {
                rec.status = "COMPLETED".into();
                callback_status = if rec.action == "ACTIVATE" {
                    "ACTIVATED"
                } else {
                    "DEACTIVATED"
                };
                m.requests_completed.fetch_add(1, Relaxed);
                m.observe_latency(match p.received {
                    Some(received) => received.elapsed().as_secs_f64(),
                    None => now.saturating_sub(rec.created_ms) as f64 / 1000.0,
                });
            }
            Err((code, why)) => {
                rec.status = "FAILED".into();
                rec.error_code = Some(code.clone());
                callback_status = "FAILED";
                m.requests_failed.fetch_add(1, Relaxed);
                if *why == Failure::Unconfirmed {
                    self.open_ticket(&vin, &rec, code);
                }
            }
        }
        // The request moves from the car's pending list to its awaiting list (or leaves
        // it when no callback is due): the same set on disk, so the write may wait.
        self.mark_lazy(&vin);
        if p.replaced.is_some() {
            let _ = self.sh.store.replaced.remove(id.0);
        }
        // A failed change changes nothing: the grant it replaced or removed comes back, or,
        // when a later request on the same service is still in flight, becomes what that
        // one puts back if it fails too.
        let mut put_back = None;
        if result.is_err() {
            let successor = self.cars.get(&vin).and_then(|car| {
                car.pending
                    .iter()
                    .filter(|x| **x != id)
                    .filter_map(|x| {
                        self.pending
                            .get(x)
                            .map(|q| (*x, q.rec.seq, &q.rec.service_id))
                    })
                    .filter(|(_, seq, service)| *seq > rec.seq && **service == rec.service_id)
                    .min_by_key(|(_, seq, _)| *seq)
                    .map(|(x, _, _)| x)
            });
            match successor {
                Some(next) => {
                    if let Some(q) = self.pending.get_mut(&next) {
                        q.replaced = p.replaced.clone();
                        let _ = match &q.replaced {
                            Some(g) => self.sh.store.replaced.insert(next.0, enc(g)).map(|_| ()),
                            None => self.sh.store.replaced.remove(next.0).map(|_| ()),
                        };
                    }
                }
                None => put_back = p.replaced.clone(),
            }
        }
        if let Some(car) = self.cars.get_mut(&vin) {
            car.pending.retain(|x| *x != id);
            car.held.retain(|x| *x != id);
            // A cancel is the customer's doing, not the car's: its service shows no ERROR.
            if result.is_err() && rec.error_code.as_deref() != Some(CANCELLED) {
                if car.errors.len() >= MAX_ERRORS {
                    car.errors.remove(0);
                }
                car.errors.retain(|e| e.service_id != rec.service_id);
                car.errors.push(ServiceError {
                    service_id: rec.service_id.clone(),
                    at: rec.created_at.clone(),
                });
            }
            if result.is_err() {
                // Withdraw what this request granted, so a car that comes back later does
                // not keep a feature nobody paid for, and put back what it replaced.
                let before = car.rec.grants.len();
                car.rec.grants.retain(|g| {
                    !(g.service_id == rec.service_id && g.request_id == rec.request_id)
                });
                let withdrawn = car.rec.grants.len() != before;
                let restored = match put_back {
                    Some(mut g) if !car.rec.grants.iter().any(|x| x.service_id == g.service_id) => {
                        // Pending (not ACTIVE) until the car confirms the command carrying it.
                        g.seq = car.rec.seq + 1;
                        car.rec.grants.push(g);
                        true
                    }
                    _ => false,
                };
                if withdrawn || restored {
                    car.rec.seq += 1;
                    car.rec.settles = car.pending.iter().map(rid_text).collect();
                    let seq = car.rec.seq;
                    // A new seq and grant set: durable before the command goes out.
                    self.mark_dirty(&vin);
                    let what = match (withdrawn, restored) {
                        (true, true) => "withdraw {s}, restore the grant it replaced",
                        (false, true) => "restore {s} as it was before",
                        _ => "withdraw {s}",
                    };
                    self.history(
                        &vin,
                        "COMMAND",
                        Some(seq),
                        Some(rec.request_id.clone()),
                        what.replace("{s}", &rec.service_id),
                    );
                    self.send_state(&vin, false);
                }
            }
        }
        self.history(
            &vin,
            "RESULT",
            Some(rec.seq),
            Some(rec.request_id.clone()),
            match &rec.error_code {
                Some(c) => format!("{callback_status} {c}"),
                None => callback_status.to_owned(),
            },
        );
        self.save_request(&rec);
        self.queue_callback(vin, id, &rec);
    }

    /// Queues the callback of the final request `rec` to leave after this batch's flush.
    /// Its car keeps it listed until it is delivered; if the sender is far behind, it is
    /// filed in the outbox instead (in this same flush).
    fn queue_callback(&mut self, vin: Vin, id: RequestId, rec: &RequestRec) {
        let Some(webhook) = &self.sh.webhook else {
            return;
        };
        let Some(body) = callback_body(rec) else {
            return;
        };
        let lane = match rec.campaign_id {
            Some(_) => Lane::Bulk,
            None => Lane::Interactive,
        };
        let due = Due::first(vin, id, body, lane);
        if webhook.crowded(lane, self.batch.callbacks.len() + 1) {
            webhook.park(&due.entry);
            self.batch.parked.push(due.entry);
            return;
        }
        if let Some(car) = self.cars.get_mut(&vin) {
            car.awaiting.push(id);
        } else if let Some(list) = self.retired_awaiting.get_mut(&vin) {
            list.push(id);
        }
        self.batch.callbacks.push(due);
    }

    /// The error code of a request of `vin` that ran out of attempts: `UNKNOWN_KEY` when the
    /// car refused at least as many commands as a request has attempts as signed with a key
    /// it does not trust, and took none since; else `NO_CONFIRMATION`.
    fn no_confirmation_code(&self, vin: &Vin) -> &'static str {
        if self
            .cars
            .get(vin)
            .is_some_and(|car| car.unknown_key_refusals >= self.sh.retry.attempts)
        {
            RejectCode::UnknownKey.as_str()
        } else {
            "NO_CONFIRMATION"
        }
    }

    /// Whether campaign `campaign` (its id text) was cancelled. A store that cannot be read
    /// says no: a cancel that follows still ends what this shard makes of it.
    fn campaign_cancelled(&self, campaign: &str) -> bool {
        let Ok(cid) = campaign.parse::<RequestId>() else {
            return false;
        };
        self.sh
            .store
            .campaigns
            .contains_key(cancel_mark(&cid))
            .unwrap_or(false)
    }

    /// Ends what `target` names that is still in flight in this shard ([`Msg::Cancel`]);
    /// how many requests that was.
    fn cancel(&mut self, target: &CancelTarget) -> usize {
        let ids: Vec<RequestId> = match target {
            CancelTarget::Request(id) => self
                .pending
                .contains_key(id)
                .then_some(*id)
                .into_iter()
                .collect(),
            CancelTarget::Campaign(campaign) => {
                // Parts of it still being made stop here: their requests made so far are
                // ended below with the rest.
                for job in &mut self.jobs {
                    if job.campaign.as_ref() == Some(campaign) {
                        job.cancelled = true;
                    }
                }
                self.pending
                    .iter()
                    .filter(|(_, p)| p.rec.campaign_id.as_ref() == Some(campaign))
                    .map(|(id, _)| *id)
                    .collect()
            }
        };
        for id in &ids {
            self.finish(*id, Err((CANCELLED.to_owned(), Failure::Cancelled)));
        }
        self.sh
            .metrics
            .requests_cancelled
            .fetch_add(ids.len() as u64, Relaxed);
        ids.len()
    }

    fn open_ticket(&mut self, vin: &Vin, rec: &RequestRec, code: &str) {
        let Some(car) = self.cars.get(vin) else {
            return;
        };
        let id = next_id();
        let ticket = Ticket {
            ticket_id: format!("T-{id}"),
            request_id: rec.request_id.clone(),
            vin: rec.vin.clone(),
            service_id: rec.service_id.clone(),
            action: rec.action.clone(),
            created_at: iso_ms(id / 1000),
            reason: format!(
                "{code}: no confirmation after {} attempts and a status query",
                rec.attempts
            ),
            attempts: rec.attempts,
            connectivity: self.connectivity(car).to_owned(),
            last_seen: car.last_seen_ms.map(iso_ms),
            probe_answered: car.probe_answered,
            expected_seq: rec.seq,
            applied_seq: car.rec.applied_seq,
            // A car that never reported still has what it was registered with.
            diagnostics: Some(diagnostics_json(car.last_report.as_ref(), &car.vehicle)),
        };
        let _ = self
            .sh
            .store
            .tickets
            .insert(id.to_be_bytes(), enc_json(&ticket));
        self.sh.metrics.tickets.fetch_add(1, Relaxed);
        tracing::warn!(vin = %vin, request = %rec.request_id, "support ticket opened");
    }

    fn on_report(&mut self, vin: Vin, payload: &[u8], pre: Option<Result<Report, RejectCode>>) {
        let m = self.sh.metrics.clone();
        let Some(car) = self.cars.get_mut(&vin) else {
            m.reports_forged.fetch_add(1, Relaxed);
            return;
        };
        let opened = match pre {
            Some(r) => r,
            None => open_report(payload, &car.key),
        };
        let report = match opened {
            Ok(r) if r.vin == vin => r,
            _ => {
                m.reports_forged.fetch_add(1, Relaxed);
                tracing::debug!(%vin, "report failed verification; ignored");
                return;
            }
        };
        m.reports_verified.fetch_add(1, Relaxed);
        let now = now_ms();
        car.last_seen_ms = Some(now);
        if !car.online {
            car.online = true;
            m.connected_cars.fetch_add(1, Relaxed);
        }
        // A car cannot read the seq of a command signed with a key it does not trust, so it
        // refuses it as seq 0, naming no command; a frame corrupted on its way can look the
        // same. Such a refusal fails nothing by itself (the next attempt may get through),
        // but a car that refuses as many of them in a row as a request has attempts, taking
        // none of our commands in between, names the error code of its requests that run
        // out of attempts: after the signing key rolled over, the cars not given the new key
        // ([`Shard::no_confirmation_code`]).
        if matches!(
            report.outcome,
            Outcome::Rejected {
                seq: 0,
                code: RejectCode::UnknownKey
            }
        ) {
            car.unknown_key_refusals = car.unknown_key_refusals.saturating_add(1);
        }
        car.last_report = Some(LastReport {
            error_codes: report
                .diagnostics
                .error_codes
                .iter()
                .map(|c| c.to_string())
                .collect(),
            firmware_version: report.diagnostics.firmware_version.to_string(),
            signal: report.diagnostics.signal_strength,
        });
        if report.applied_seq > car.rec.seq {
            self.resync_seq(&vin, report.applied_seq);
            return;
        }
        let advanced = report.applied_seq > car.rec.applied_seq;
        if advanced {
            car.unknown_key_refusals = 0;
            car.rec.applied_seq = report.applied_seq;
        }
        let applied = car.rec.applied_seq;
        let latest = car.rec.seq;
        let detail = match report.outcome {
            Outcome::Applied { seq } => format!("applied seq {seq}"),
            Outcome::Rejected { seq, code } => format!("rejected seq {seq}: {}", code.as_str()),
            Outcome::GrantsRefused { seq, code, grants } => format!(
                "rejected seq {seq}: {} for grants {:?} (from 0)",
                code.as_str(),
                refused_places(grants).collect::<Vec<_>>()
            ),
            Outcome::Status { .. } => {
                car.probe_answered = true;
                format!("status (applied seq {})", report.applied_seq)
            }
            Outcome::Periodic { counter } => {
                format!("periodic #{counter} (applied seq {})", report.applied_seq)
            }
        };
        let last_sent = car.last_sent_ms;
        if advanced {
            self.mark_lazy(&vin);
        }
        let Some(car) = self.cars.get(&vin) else {
            return;
        };
        let settled: Vec<RequestId> = car
            .pending
            .iter()
            .filter(|id| !car.held.contains(id))
            .filter(|id| self.pending.get(id).is_some_and(|p| p.rec.seq <= applied))
            .copied()
            .collect();
        self.history(&vin, "REPORT", Some(report.applied_seq), None, detail);
        for id in settled {
            self.finish(id, Ok(()));
        }
        if let Some((seq, code)) = report.outcome.refusal() {
            m.reports_refused.fetch_add(1, Relaxed);
            if seq > applied {
                let named = match report.outcome {
                    Outcome::GrantsRefused { grants, .. } => self
                        .cars
                        .get(&vin)
                        .and_then(|car| car.places.named_by(seq, grants)),
                    _ => None,
                };
                match self.refused_by(&vin, seq, code, named.as_deref()) {
                    // The suspects went out one at a time: wait for that command's answer.
                    None => {}
                    Some(refused) => {
                        let failed = !refused.is_empty();
                        for id in refused {
                            // The one place a car's refusal fails a request: what a
                            // campaign's abort rule counts as refused.
                            self.finish(id, Err((code.as_str().to_owned(), Failure::Refused)));
                        }
                        // What the refusal did not fail waits for a newer command (a failure
                        // above sent one if it changed the grants), with the next held grant.
                        let released = failed && self.release_held(&vin, 1);
                        if !failed
                            && !released
                            && self.cars.get(&vin).is_some_and(|c| !c.pending.is_empty())
                        {
                            self.send_state(&vin, true);
                        }
                    }
                }
            }
        } else if latest <= applied && report.applied_seq >= latest {
            // Caught up: the next held grant, if any, goes out.
            self.release_held(&vin, 1);
        } else if last_sent.is_none_or(|t| now.saturating_sub(t) > 5_000) {
            // The car is behind and nothing went out recently (e.g. the gateway restarted),
            // or it went back to an older state than it confirmed (its store was wiped, or
            // it was replaced): send it its state again, freshly signed.
            self.send_state(&vin, true);
        }
    }

    /// The requests the car's refusal of command `seq` fails (`None`: none yet, the grants
    /// in question go to the car one at a time). A command carries the car's whole grant
    /// set, so one bad grant gets every later command refused too:
    /// - a refusal of a command already superseded fails nothing (the newest one decides);
    /// - a refusal for what a grant holds (an unknown or base-platform feature) blames only
    ///   the activations whose grants the car has not yet taken (carried since its last
    ///   applied command); deactivations and requests whose grants it took before wait for
    ///   the next command. One such activation fails; of several, the oldest goes alone in a
    ///   newer command and the others are held ([`Car::held`]) and follow one at a time, so
    ///   each refusal then names its own request. A car that names the refused grants
    ///   (`named`: their requests, from [`Outcome::GrantsRefused`]) fails just those of the
    ///   activations, and the others go again at once; if it names none of them, the
    ///   refusal is taken as one that names no grant;
    /// - any other refusal fails every request the command carries.
    fn refused_by(
        &mut self,
        vin: &Vin,
        seq: u64,
        code: RejectCode,
        named: Option<&[RequestId]>,
    ) -> Option<Vec<RequestId>> {
        let Some(car) = self.cars.get(vin) else {
            return Some(Vec::new());
        };
        // Only the newest command's refusal speaks of the grants the car would have now.
        if seq < car.rec.seq {
            return Some(Vec::new());
        }
        let in_flight_at_seq: Vec<(RequestId, &RequestRec)> = car
            .pending
            .iter()
            .filter(|id| !car.held.contains(id))
            .filter_map(|id| self.pending.get(id).map(|p| (*id, &p.rec)))
            .filter(|(_, rec)| rec.seq <= seq)
            .collect();
        let every = || Some(in_flight_at_seq.iter().map(|(id, _)| *id).collect());
        if !matches!(
            code,
            RejectCode::UnknownFeature | RejectCode::BasePlatformFeature
        ) {
            return every();
        }
        let mut suspects: Vec<(RequestId, u64)> = in_flight_at_seq
            .iter()
            .filter(|(_, rec)| {
                rec.action == "ACTIVATE"
                    && car
                        .rec
                        .grants
                        .iter()
                        .any(|g| g.request_id == rec.request_id && g.seq > car.rec.applied_seq)
            })
            .map(|(id, rec)| (*id, rec.seq))
            .collect();
        suspects.sort_by_key(|(_, seq)| *seq);
        let blamed: Vec<RequestId> = suspects
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| named.is_some_and(|named| named.contains(id)))
            .collect();
        if !blamed.is_empty() {
            return Some(blamed);
        }
        if suspects.is_empty() {
            // A grant the car took before is refused now (its platform changed?): no new
            // grant to blame, and sending the same set again would only be refused again.
            return every();
        }
        if suspects.len() == 1 {
            return Some(suspects.into_iter().map(|(id, _)| id).collect());
        }
        // Several new grants, and the car cannot say which it refused: the oldest goes
        // alone in the next command, the others wait (held) and follow one at a time.
        let Some(car) = self.cars.get_mut(vin) else {
            return Some(Vec::new());
        };
        car.held.extend(suspects.iter().skip(1).map(|(id, _)| *id));
        car.rec.seq += 1;
        let next = car.rec.seq;
        self.history(
            vin,
            "COMMAND",
            Some(next),
            None,
            format!(
                "refused for a grant: {} new grants go to the car one at a time",
                suspects.len()
            ),
        );
        self.mark_dirty(vin);
        self.send_state(vin, false);
        None
    }

    /// Puts the oldest `count` held grants back into the car's commands, in one newer
    /// command (their requests then settle only when the car takes it, and their attempts
    /// start now); `true` if any was.
    fn release_held(&mut self, vin: &Vin, count: usize) -> bool {
        let Some(car) = self.cars.get_mut(vin) else {
            return false;
        };
        let live = |id: &RequestId| self.pending.contains_key(id);
        let before = car.held.len();
        car.held.retain(live);
        if car.held.is_empty() {
            if car.held.len() != before {
                self.mark_lazy(vin);
            }
            return false;
        }
        let released: Vec<RequestId> = car.held.drain(..count.min(car.held.len())).collect();
        car.rec.seq += 1;
        let next = car.rec.seq;
        let now_iso = iso_ms(now_ms());
        for id in &released {
            let rid = rid_text(id);
            for g in car.rec.grants.iter_mut().filter(|g| g.request_id == rid) {
                g.seq = next;
            }
        }
        for id in &released {
            if let Some(p) = self.pending.get_mut(id) {
                p.rec.seq = next;
                p.rec.phase = "SENDING".into();
                p.rec.updated_at.clone_from(&now_iso);
                let rec = p.rec.clone();
                self.save_request(&rec);
                self.schedule(*id, self.sh.retry.attempt_timeout);
            }
        }
        self.mark_dirty(vin);
        let (rid, detail) = match released.as_slice() {
            [one] => (Some(rid_text(one)), "held grant sent".to_owned()),
            many => (None, format!("{} held grants sent", many.len())),
        };
        self.history(vin, "COMMAND", Some(next), rid, detail);
        self.send_state(vin, false);
        true
    }

    /// The car says it applied `car_applied`, above the newest seq this gateway has issued
    /// to it: the commands it applied are ones this store has no record of (the store was
    /// restored from an older backup, or lost and the car registered again; or a command
    /// went out just before a crash that lost its record). Nothing the car applied can
    /// settle a request here, whose seq may be one the car took for something else, and the
    /// car refuses every seq up to its own as a replay. So the seq jumps above the car's,
    /// every grant counts as unconfirmed, and the whole state as this store has it goes to
    /// the car again; the requests in flight complete when the car applies that.
    fn resync_seq(&mut self, vin: &Vin, car_applied: u64) {
        // A seq this large never comes from our own commands; taking it would bring the
        // seq to overflow (a car key in the wrong hands could sign anything).
        if car_applied >= MAX_SEQ {
            tracing::error!(%vin, car_applied, "report with an impossible applied seq; ignored");
            return;
        }
        let Some(car) = self.cars.get_mut(vin) else {
            return;
        };
        let ours = car.rec.seq;
        let next = car_applied + 1;
        car.rec.seq = next;
        car.rec.applied_seq = car_applied;
        for g in &mut car.rec.grants {
            g.seq = next;
        }
        let now_iso = iso_ms(now_ms());
        let in_flight: Vec<RequestId> = car
            .pending
            .iter()
            .filter(|id| !car.held.contains(id))
            .copied()
            .collect();
        for id in &in_flight {
            if let Some(p) = self.pending.get_mut(id) {
                p.rec.seq = next;
                p.rec.updated_at.clone_from(&now_iso);
                let rec = p.rec.clone();
                self.save_request(&rec);
            }
        }
        self.sh.metrics.seq_resyncs.fetch_add(1, Relaxed);
        tracing::warn!(%vin, car_applied, ours, next,
            "car is ahead of the store's seq (restored or lost store); its state goes again");
        self.mark_dirty(vin);
        self.history(
            vin,
            "COMMAND",
            Some(next),
            None,
            format!(
                "the car applied seq {car_applied}, above the newest this store issued \
                 ({ours}): the store was restored or lost; the whole state goes again"
            ),
        );
        self.send_state(vin, false);
    }

    fn on_presence(&mut self, vin: Vin, online: bool) {
        let m = self.sh.metrics.clone();
        let Some(car) = self.cars.get_mut(&vin) else {
            if online {
                self.withdraw_again(&vin);
            }
            return;
        };
        let behind = car.rec.seq > car.rec.applied_seq;
        if online {
            car.last_seen_ms = Some(now_ms());
            if !car.online {
                car.online = true;
                m.connected_cars.fetch_add(1, Relaxed);
            }
        } else if car.online {
            car.online = false;
            m.connected_cars.fetch_sub(1, Relaxed);
        }
        self.history(
            &vin,
            "PRESENCE",
            None,
            None,
            if online { "online" } else { "offline" }.into(),
        );
        if online && behind {
            // The retained command may have expired while the car was away, and a broker
            // need not redeliver it to a resumed session: re-sign it. Never merged with a
            // send just before (e.g. a withdrawal), or a car back within the merge window
            // would keep its old state.
            self.send_state(&vin, false);
        }
    }

    fn connectivity(&self, car: &Car) -> &'static str {
        if !car.online {
            return "OFFLINE";
        }
        let timeout = self.sh.retry.attempt_timeout.as_millis() as u64;
        let lagging = car.rec.seq > car.rec.applied_seq
            && car
                .last_sent_ms
                .is_some_and(|t| now_ms().saturating_sub(t) > timeout)
            && car
                .last_seen_ms
                .is_none_or(|s| car.last_sent_ms.is_some_and(|t| s < t));
        if lagging {
            "LIMITED"
        } else {
            "ONLINE"
        }
    }

    fn status(&self, vin: &Vin) -> Option<serde_json::Value> {
        let car = self.cars.get(vin)?;
        let mut services = Vec::new();
        let now_s = now_ms() / 1000;
        // A temporary grant past its end is over on the car too (it enforces the end itself).
        for g in car.rec.grants.iter().filter(|g| unexpired(g, now_s)) {
            let active = car.rec.applied_seq >= g.seq;
            services.push(json!({
                "serviceId": g.service_id,
                "activationDate": g.activation_date,
                "status": if active { "ACTIVE" } else { "PENDING" },
            }));
        }
        for id in &car.pending {
            if let Some(p) = self.pending.get(id) {
                if p.rec.action == "DEACTIVATE"
                    && !car
                        .rec
                        .grants
                        .iter()
                        .any(|g| g.service_id == p.rec.service_id)
                {
                    services.push(json!({
                        "serviceId": p.rec.service_id,
                        "activationDate": p.rec.created_at,
                        "status": "PENDING",
                    }));
                }
            }
        }
        for e in &car.errors {
            if !car.rec.grants.iter().any(|g| g.service_id == e.service_id) {
                services.push(
                    json!({ "serviceId": e.service_id, "activationDate": e.at, "status": "ERROR" }),
                );
            }
        }
        Some(json!({
            "vin": vin.to_string(),
            "connectivity": self.connectivity(car),
            "lastSeen": car.last_seen_ms.map(iso_ms),
            "activeServices": services,
            "diagnostics": diagnostics_json(car.last_report.as_ref(), &car.vehicle),
        }))
    }
}

/// How much longer a request's timer in `phase` must wait because no command could
/// reach a car: while the external broker is disconnected nothing the gateway publishes
/// leaves (re-sending would only spend the attempt), and after it reconnects every state
/// not yet confirmed is re-sent at once ([`Msg::RepublishAll`]), so an attempt or a status
/// query counts as unanswered only once the broker has been up for a whole attempt timeout.
/// Without this a broker outage longer than the retry budget failed (and withdrew) every
/// request in flight, though none of its commands had left. `None`: carry on.
fn broker_grace(m: &Metrics, phase: &str, attempt_timeout: Duration) -> Option<Duration> {
    if m.broker_disconnected.load(Relaxed) != 0 {
        return Some(attempt_timeout);
    }
    let up_at = m.broker_connected_at_ms.load(Relaxed);
    if up_at == 0 || phase == "BACKOFF" {
        return None;
    }
    let up_for = Duration::from_millis(now_ms().saturating_sub(up_at));
    attempt_timeout
        .checked_sub(up_for)
        .filter(|left| !left.is_zero())
}

/// `false` once a temporary grant's end (seconds since the epoch) has passed.
fn unexpired(g: &GrantRec, now_s: u64) -> bool {
    g.ends_at.is_none_or(|end| end > now_s)
}

fn diagnostics_json(r: Option<&LastReport>, v: &VehicleRec) -> serde_json::Value {
    match r {
        Some(r) => json!({
            "errorCodes": r.error_codes,
            "firmwareVersion": r.firmware_version,
            "networkSignalStrength": r.signal,
        }),
        None => json!({
            "errorCodes": [],
            "firmwareVersion": v.firmware_version,
            "networkSignalStrength": null,
        }),
    }
}

/// The callback of a final request: `{requestId, vin, status, errorCode?, timestamp}`.
fn callback_body(rec: &RequestRec) -> Option<String> {
    let status = match (rec.status.as_str(), rec.action.as_str()) {
        ("COMPLETED", "ACTIVATE") => "ACTIVATED",
        ("COMPLETED", _) => "DEACTIVATED",
        ("FAILED", _) => "FAILED",
        _ => return None,
    };
    serde_json::to_string(&CallbackBody {
        error_code: rec.error_code.as_deref(),
        request_id: &rec.request_id,
        status,
        timestamp: rec.completed_at.as_deref().unwrap_or(&rec.updated_at),
        vin: &rec.vin,
    })
    .ok()
}

/// The callback's JSON body (DESIGN.md §4). Serialised straight from borrowed fields, which
/// costs less than building a `serde_json::Value` per callback; the keys are in the order
/// that map gave them (sorted), so bodies read the same as before.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CallbackBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<&'a str>,
    request_id: &'a str,
    status: &'a str,
    timestamp: &'a str,
    vin: &'a str,
}

fn new_car(key: VerifyingKey, vehicle: VehicleRec, rec: CarRec) -> Car {
    Car {
        places: GrantPlaces {
            loaded_seq: rec.seq,
            signed: None,
        },
        key: TrustedKey::new(key),
        vehicle,
        rec,
        online: false,
        last_seen_ms: None,
        last_report: None,
        last_sent_ms: None,
        last_resend: None,
        pending: Vec::new(),
        errors: Vec::new(),
        history_written: 0,
        unwritten_history: Vec::new(),
        history_queued: false,
        probe_answered: false,
        unknown_key_refusals: 0,
        dirty: false,
        lazy: false,
        awaiting: Vec::new(),
        held: Vec::new(),
        held_written: Vec::new(),
    }
}

/// Keeps the newest [`HISTORY_PER_CAR`] values of `vin` (at least as many entries).
fn prune_history(tree: &sled::Tree, vin: &Vin) {
    let keys: Vec<sled::IVec> = tree
        .scan_prefix(vin.as_bytes())
        .keys()
        .filter_map(Result::ok)
        .collect();
    if keys.len() > HISTORY_PER_CAR {
        for k in &keys[..keys.len() - HISTORY_PER_CAR] {
            let _ = tree.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registration of `vin` with `key`'s public key, as `POST /vehicles` makes one.
    fn test_vehicle(vin: &Vin, key: &SigningKey) -> VehicleRec {
        VehicleRec {
            vin: vin.to_string(),
            public_key: caas_protocol::verifying_key_to_hex(&key.verifying_key()).to_string(),
            platform: "mqb-evo".into(),
            firmware_version: None,
            registered_at: String::new(),
        }
    }

    #[test]
    fn a_refusal_names_requests_only_for_commands_whose_places_are_known_for_sure() {
        let id = |n: u8| RequestId([n; 16]);
        let mut places = GrantPlaces {
            loaded_seq: 4,
            signed: None,
        };
        // Seq 4 was signed by an earlier process: its order is not known here.
        places.note_signed(4, vec![Some(id(1)), Some(id(2))]);
        assert_eq!(places.named_by(4, 0b01), None);
        // Seq 5 is this process's own: places map to requests, signed again the same way.
        places.note_signed(5, vec![Some(id(1)), None, Some(id(3))]);
        places.note_signed(5, vec![Some(id(1)), None, Some(id(3))]);
        assert_eq!(places.named_by(5, 0b101), Some(vec![id(1), id(3)]));
        assert_eq!(places.named_by(5, 0b010), Some(vec![]));
        // Places past the command, or a refusal of another seq, name nothing.
        assert_eq!(places.named_by(5, 0b1000_0000), Some(vec![]));
        assert_eq!(places.named_by(6, 0b001), None);
        // Signed again with other grants (one ran out): which signing was refused is not
        // known, so neither are the places, even if it is signed a third time.
        places.note_signed(5, vec![Some(id(1)), Some(id(3))]);
        assert_eq!(places.named_by(5, 0b001), None);
        places.note_signed(5, vec![Some(id(1)), Some(id(3))]);
        assert_eq!(places.named_by(5, 0b001), None);
        // A newer seq starts afresh.
        places.note_signed(6, vec![Some(id(3))]);
        assert_eq!(places.named_by(6, 0b001), Some(vec![id(3)]));
    }

    /// A report of car `vin` signed with `key`.
    fn signed_report(vin: Vin, key: &SigningKey) -> Msg {
        report_of(vin, key, Outcome::Periodic { counter: 1 })
    }

    /// A report of `vin`, signed with `key`, that has applied nothing yet.
    fn report_of(vin: Vin, key: &SigningKey, outcome: Outcome) -> Msg {
        report_applied(vin, key, 0, outcome)
    }

    /// A report of `vin`, signed with `key`, that has applied seq `applied`.
    fn report_applied(vin: Vin, key: &SigningKey, applied: u64, outcome: Outcome) -> Msg {
        let report = Report {
            vin,
            applied_seq: applied,
            car_time: now_ms() / 1000,
            outcome,
            active: heapless::Vec::new(),
            diagnostics: caas_protocol::Diagnostics {
                firmware_version: "1.0.0".parse().unwrap(),
                error_codes: heapless::Vec::new(),
                signal_strength: 80,
            },
        };
        let mut buf = [0u8; caas_protocol::MAX_REPORT_FRAME_SIZE];
        let payload = caas_protocol::seal_report(&report, key, &mut buf)
            .unwrap()
            .to_vec();
        Msg::Report { vin, payload }
    }

    /// A shard on a store in `dir` (its flusher never runs) with car 1 registered with
    /// `car_key`, and what it shares.
    fn shard_with_a_car(
        dir: &std::path::Path,
        car_key: &SigningKey,
    ) -> (Shard, Arc<Shared>, Vin, flume::Receiver<Flushed>) {
        shard_with_a_car_and_webhook(dir, car_key, false)
    }

    /// [`shard_with_a_car`], with a webhook handoff over the store's outbox if `webhook`
    /// (its senders never run: callbacks stay in the shard's batch or the outbox).
    fn shard_with_a_car_and_webhook(
        dir: &std::path::Path,
        car_key: &SigningKey,
        webhook: bool,
    ) -> (Shard, Arc<Shared>, Vin, flume::Receiver<Flushed>) {
        let (out, _published) = flume::unbounded();
        let out = rumqttc::Client::from_sender(out);
        let store = Store::open(dir, 8).unwrap();
        let webhook = webhook.then(|| crate::webhook::handoff(&store).0);
        let sh = Arc::new(Shared {
            store,
            metrics: Arc::default(),
            retry: RetryPolicy::default(),
            command_ttl: Duration::from_secs(60),
            key: SigningKey::from_bytes(&[1; 32]),
            out: crate::mqtt::Publisher::Client(out),
            webhook,
            key_owners: KeyOwners::default(),
        });
        let (flusher, commits) = flume::bounded(1);
        let mut shard = Shard::new(sh.clone(), flusher, std::thread::spawn(|| ()));
        let vin: Vin = "WVWZZZ1JZXW000001".parse().unwrap();
        let rec = test_vehicle(&vin, car_key);
        shard.register(rec, vin, car_key.verifying_key()).unwrap();
        (shard, sh, vin, commits)
    }

    #[test]
    fn reports_behind_a_key_replacement_in_the_same_batch_are_opened_with_the_new_key() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (
            SigningKey::from_bytes(&[2; 32]),
            SigningKey::from_bytes(&[3; 32]),
        );
        let (mut shard, sh, vin, _commits) = shard_with_a_car(dir.path(), &old);
        let (resp, _answer) = oneshot::channel();
        let msgs = vec![
            signed_report(vin, &old),
            signed_report(vin, &old),
            Msg::ReplaceKey {
                vin,
                key: new.verifying_key(),
                previous: old.verifying_key(),
                resp,
            },
            signed_report(vin, &old),
            signed_report(vin, &new),
        ];
        let pre = shard.verify_reports(&msgs);
        // The two before the replacement are verified together with the old key; those
        // behind it are left for when they are handled.
        assert!(pre[0].as_ref().is_some_and(Result::is_ok));
        assert!(pre[1].as_ref().is_some_and(Result::is_ok));
        assert!(pre[3].is_none() && pre[4].is_none());
        for (m, p) in msgs.into_iter().zip(pre) {
            assert!(shard.handle(m, p).is_none());
        }
        let m = &sh.metrics;
        assert_eq!(m.reports_verified.load(Relaxed), 3);
        assert_eq!(m.reports_forged.load(Relaxed), 1);
        assert_eq!(m.keys_replaced.load(Relaxed), 1);
    }

    #[test]
    fn unknown_key_refusals_name_the_error_only_when_as_many_as_the_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let car = SigningKey::from_bytes(&[2; 32]);
        let (mut shard, _sh, vin, _commits) = shard_with_a_car(dir.path(), &car);
        let id = RequestId([7; 16]);
        let boost = GrantRec {
            service_id: "power-boost".into(),
            flags: vec!["power_boost".into()],
            params: Vec::new(),
            ends_at: None,
            request_id: String::new(),
            seq: 0,
            activation_date: String::new(),
        };
        shard
            .new_request(NewRequest {
                vin,
                op: Op::Activate(boost),
                request_id: id,
                campaign_id: None,
                campaign: None,
                created_ms: now_ms(),
                received: Instant::now(),
                idempotency: None,
            })
            .unwrap();
        shard.send_state(&vin, false);
        let refusal = |code| report_of(vin, &car, Outcome::Rejected { seq: 0, code });
        let attempts = RetryPolicy::default().attempts;
        // A refusal that names no command fails nothing: a frame corrupted on its way is
        // refused the same way, and the next attempt may get through.
        for code in [RejectCode::BadSignature, RejectCode::Malformed] {
            assert!(shard.handle(refusal(code), None).is_none());
            assert!(shard.pending.contains_key(&id), "{code:?}");
        }
        for _ in 1..attempts {
            assert!(shard
                .handle(refusal(RejectCode::UnknownKey), None)
                .is_none());
            // Periodic reports between them change nothing.
            assert!(shard.handle(signed_report(vin, &car), None).is_none());
        }
        assert!(shard.pending.contains_key(&id));
        assert_eq!(shard.no_confirmation_code(&vin), "NO_CONFIRMATION");
        // As many as a request has attempts, none of our commands taken in between: the
        // code a request that runs out of attempts ends with.
        assert!(shard
            .handle(refusal(RejectCode::UnknownKey), None)
            .is_none());
        assert!(shard.pending.contains_key(&id));
        assert_eq!(shard.no_confirmation_code(&vin), "UNKNOWN_KEY");
        // Once the car takes a command of ours, the count starts again.
        let applied = report_applied(vin, &car, 1, Outcome::Periodic { counter: 2 });
        assert!(shard.handle(applied, None).is_none());
        assert_eq!(shard.no_confirmation_code(&vin), "NO_CONFIRMATION");
    }

    #[test]
    fn decommissioning_ends_every_request_in_any_phase_withdraws_all_and_keeps_the_seq() {
        let dir = tempfile::tempdir().unwrap();
        let car = SigningKey::from_bytes(&[2; 32]);
        let (mut shard, sh, vin, _commits) = shard_with_a_car(dir.path(), &car);
        let grant = |service: &str| GrantRec {
            service_id: service.into(),
            flags: vec!["power_boost".into()],
            params: Vec::new(),
            ends_at: None,
            request_id: String::new(),
            seq: 0,
            activation_date: String::new(),
        };
        let ids = [RequestId([7; 16]), RequestId([8; 16]), RequestId([9; 16])];
        for (i, id) in ids.iter().enumerate() {
            shard
                .new_request(NewRequest {
                    vin,
                    op: Op::Activate(grant(&format!("svc-{i}"))),
                    request_id: *id,
                    campaign_id: None,
                    campaign: None,
                    created_ms: now_ms(),
                    received: Instant::now(),
                    idempotency: None,
                })
                .unwrap();
        }
        // One backing off, one probing, one held after a refusal.
        shard.pending.get_mut(&ids[0]).unwrap().rec.phase = "BACKOFF".into();
        shard.pending.get_mut(&ids[1]).unwrap().rec.phase = "PROBING".into();
        shard.cars.get_mut(&vin).unwrap().held.push(ids[2]);
        let seq = shard.cars[&vin].rec.seq;
        assert_eq!(seq, 3);

        let tomb = shard.decommission(&vin).unwrap();
        assert_eq!((tomb.requests_failed, tomb.seq), (3, seq + 1));
        assert!(shard.pending.is_empty() && !shard.cars.contains_key(&vin));
        for id in ids {
            let rec: RequestRec = dec(&sh.store.requests.get(id.0).unwrap().unwrap()).unwrap();
            assert_eq!(
                (
                    rec.status.as_str(),
                    rec.phase.as_str(),
                    rec.error_code.as_deref()
                ),
                ("FAILED", "DONE", Some(DECOMMISSIONED))
            );
        }
        // The last command: the next seq, retained, no grant at all.
        let last = shard.batch.publishes.last().unwrap();
        let gateway = TrustedKey::new(sh.key.verifying_key());
        let cmd = caas_protocol::open_command(&last.payload, &[gateway]).unwrap();
        assert_eq!((cmd.seq, last.retain), (seq + 1, topics::COMMAND_RETAIN));
        match cmd.body {
            CommandBody::SetState(d) => assert!(d.grants.is_empty()),
            CommandBody::QueryStatus { .. } => panic!("not a state"),
        }
        // The registration is gone, the tombstone kept, the key free.
        assert!(sh.store.vehicles.get(vin.as_bytes()).unwrap().is_none());
        assert!(sh.store.cars.get(vin.as_bytes()).unwrap().is_none());
        assert_eq!(
            sh.store.retired_car(vin.as_bytes()).unwrap(),
            Some(tomb.clone())
        );
        let other: Vin = "WVWZZZ1JZXW000002".parse().unwrap();
        assert!(sh.key_owners.claim(&car.verifying_key(), &other).is_ok());
        sh.key_owners.release(&car.verifying_key(), &other);
        let m = &sh.metrics;
        assert_eq!(m.requests_in_flight.load(Relaxed), 0);
        assert_eq!(m.requests_failed.load(Relaxed), 3);
        assert_eq!(m.cars_registered.load(Relaxed), 0);
        // Its timers, when they fall due, find nothing; its reports are an unknown car's.
        let published = shard.batch.publishes.len();
        shard.fire_timers();
        assert!(shard.handle(signed_report(vin, &car), None).is_none());
        assert_eq!(shard.batch.publishes.len(), published);
        assert_eq!(m.reports_forged.load(Relaxed), 1);

        // A repeat answers the same tombstone with nothing failed, and changes nothing.
        let again = shard.decommission(&vin).unwrap();
        assert_eq!(
            again,
            RetiredRec {
                requests_failed: 0,
                ..tomb.clone()
            }
        );
        assert_eq!(shard.batch.publishes.len(), published);
        assert_eq!(m.vehicles_decommissioned.load(Relaxed), 1);

        // Registered again, the car's seq goes on above the withdrawal, on disk too.
        let rec = test_vehicle(&vin, &car);
        assert!(shard.register(rec, vin, car.verifying_key()).unwrap());
        assert_eq!(shard.cars[&vin].rec.seq, seq + 1);
        let stored: CarRec = dec(&sh.store.cars.get(vin.as_bytes()).unwrap().unwrap()).unwrap();
        assert_eq!(stored.seq, seq + 1);
        assert!(sh.store.retired_car(vin.as_bytes()).unwrap().is_none());
        let next = shard
            .new_request(NewRequest {
                vin,
                op: Op::Activate(grant("svc-0")),
                request_id: RequestId([10; 16]),
                campaign_id: None,
                campaign: None,
                created_ms: now_ms(),
                received: Instant::now(),
                idempotency: None,
            })
            .unwrap();
        assert_eq!(next.seq, seq + 2);
    }

    #[test]
    fn callbacks_under_way_at_a_decommissioning_are_kept_by_the_tombstone_until_settled() {
        let dir = tempfile::tempdir().unwrap();
        let car = SigningKey::from_bytes(&[2; 32]);
        let (mut shard, sh, vin, _commits) = shard_with_a_car_and_webhook(dir.path(), &car, true);
        let boost = GrantRec {
            service_id: "power-boost".into(),
            flags: vec!["power_boost".into()],
            params: Vec::new(),
            ends_at: None,
            request_id: String::new(),
            seq: 0,
            activation_date: String::new(),
        };
        let (done, open) = (RequestId([7; 16]), RequestId([8; 16]));
        for (id, service) in [(done, "power-boost"), (open, "snow-mode")] {
            let grant = GrantRec {
                service_id: service.into(),
                ..boost.clone()
            };
            shard
                .new_request(NewRequest {
                    vin,
                    op: Op::Activate(grant),
                    request_id: id,
                    campaign_id: None,
                    campaign: None,
                    created_ms: now_ms(),
                    received: Instant::now(),
                    idempotency: None,
                })
                .unwrap();
        }
        // One completed, its callback in its first try (kept by the car's record).
        shard.finish(done, Ok(()));
        assert_eq!(shard.cars[&vin].awaiting, vec![done]);
        let first_tries = shard.batch.callbacks.len();

        let tomb = shard.decommission(&vin).unwrap();
        assert_eq!(tomb.requests_failed, 1);
        assert_eq!(tomb.awaiting, vec![rid_text(&done)]);
        assert_eq!(shard.retired_awaiting[&vin], vec![done]);
        // The one it ended has its callback parked in the outbox, not a first try.
        assert_eq!(shard.batch.callbacks.len(), first_tries);
        assert_eq!(shard.batch.parked.len(), 1);
        assert_eq!(shard.batch.parked[0].request_id, rid_text(&open));
        assert!(shard.batch.parked[0].body.contains(DECOMMISSIONED));
        assert_eq!(sh.store.outbox.len(), 1);

        // Delivered: the tombstone stops listing it.
        let settled = Msg::CallbacksSettled(vec![(vin, done)]);
        assert!(shard.handle(settled, None).is_none());
        assert!(!shard.retired_awaiting.contains_key(&vin));
        let stored = sh.store.retired_car(vin.as_bytes()).unwrap().unwrap();
        assert!(stored.awaiting.is_empty());

        // As a restart finds it when the delivery was not known: sent again, and listed
        // until it is settled.
        let rec = shard.find_request(&done).unwrap();
        let load = Msg::LoadRetired {
            vin,
            awaiting: vec![rec],
        };
        assert!(shard.handle(load, None).is_none());
        assert_eq!(shard.batch.callbacks.len(), first_tries + 1);
        assert_eq!(shard.retired_awaiting[&vin], vec![done]);
        // Registered again meanwhile, the car keeps it, on disk too.
        let rec = test_vehicle(&vin, &car);
        assert!(shard.register(rec, vin, car.verifying_key()).unwrap());
        assert_eq!(shard.cars[&vin].awaiting, vec![done]);
        assert!(shard.retired_awaiting.is_empty());
        let stored: CarRec = dec(&sh.store.cars.get(vin.as_bytes()).unwrap().unwrap()).unwrap();
        assert_eq!(
            (stored.seq, stored.pending),
            (tomb.seq, vec![rid_text(&done)])
        );
    }

    #[test]
    fn stale_timers_are_swept_once_they_outgrow_the_pending_requests() {
        let now = Instant::now();
        let id = |n: u64| {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&n.to_be_bytes());
            RequestId(b)
        };
        // 10 pending requests (ids 0-9, generation 1 live); every other timer is stale.
        let is_live = |r: &RequestId, gen: u64| {
            u64::from_be_bytes(r.0[..8].try_into().unwrap()) < 10 && gen == 1
        };
        let mut timers = Timers::new();
        for n in 0..10 {
            timers.push(Reverse((now, 1, id(n))));
            timers.push(Reverse((now, 0, id(n)))); // rescheduled since
        }
        // Up to the bound nothing is swept.
        let mut settled = 1_000;
        let mut push_settled = |timers: &mut Timers| {
            timers.push(Reverse((now, 1, id(settled))));
            settled += 1;
        };
        while timers.len() < 2 * 10 + TIMER_SLACK {
            push_settled(&mut timers);
            sweep_stale_timers(&mut timers, 10, is_live);
        }
        assert_eq!(timers.len(), 2 * 10 + TIMER_SLACK);
        // One past it, and only the pending requests' live timers are left.
        push_settled(&mut timers);
        sweep_stale_timers(&mut timers, 10, is_live);
        let mut left: Vec<(u64, RequestId)> = timers
            .into_iter()
            .map(|Reverse((_, g, r))| (g, r))
            .collect();
        left.sort();
        assert_eq!(left, (0..10).map(|n| (1, id(n))).collect::<Vec<_>>());
    }

    fn request(status: &str, action: &str, error_code: Option<&str>) -> RequestRec {
        RequestRec {
            request_id: "0b7c9a4e-8f1d-4c2a-9e3b-5d6f7a8b9c0d".into(),
            vin: "WVWZZZ1JZXW000001".into(),
            action: action.into(),
            service_id: "power-boost".into(),
            seq: 3,
            status: status.into(),
            phase: "DONE".into(),
            attempts: 1,
            error_code: error_code.map(str::to_owned),
            created_at: "2026-12-05T12:00:00Z".into(),
            updated_at: "2026-12-05T12:00:01Z".into(),
            completed_at: Some("2026-12-05T12:00:02Z".into()),
            campaign_id: None,
            grant: None,
            created_ms: 0,
        }
    }

    #[test]
    fn callback_bodies_name_the_final_status_and_read_as_the_seed_shape() {
        let body = callback_body(&request("COMPLETED", "ACTIVATE", None));
        assert_eq!(
            body.as_deref(),
            Some(
                r#"{"requestId":"0b7c9a4e-8f1d-4c2a-9e3b-5d6f7a8b9c0d","status":"ACTIVATED","timestamp":"2026-12-05T12:00:02Z","vin":"WVWZZZ1JZXW000001"}"#
            )
        );
        let body = callback_body(&request("FAILED", "ACTIVATE", Some("NO_CONFIRMATION")));
        let v: Option<serde_json::Value> = body.and_then(|b| serde_json::from_str(&b).ok());
        let v = v.unwrap_or_default();
        assert_eq!(v["status"], "FAILED");
        assert_eq!(v["errorCode"], "NO_CONFIRMATION");
        let body = callback_body(&request("COMPLETED", "DEACTIVATE", None));
        assert!(body.is_some_and(|b| b.contains(r#""status":"DEACTIVATED""#)));
        assert_eq!(
            callback_body(&request("IN_PROGRESS", "ACTIVATE", None)),
            None
        );
    }
}
