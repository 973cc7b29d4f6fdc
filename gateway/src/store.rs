//! Durable state in sled.
//!
//! sled writes are in memory until `flush`; the gateway answers 2xx only after the flush
//! that covers its writes. Each engine shard flushes once per batch of messages, then runs
//! the batch's continuations (answer the HTTP callers, publish the signed commands, hand
//! over the callbacks), so under load one flush covers hundreds of requests; and a flush
//! writes everything written so far by every shard, so concurrent shards share flushes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use caas_protocol::RequestId;
use serde::{Deserialize, Serialize};

/// History values kept per car (each holds the car's entries from one engine batch, so at
/// least as many entries); older ones are pruned.
pub(crate) const HISTORY_PER_CAR: usize = 256;

/// The sled trees.
#[derive(Clone)]
pub(crate) struct Store {
    pub(crate) db: sled::Db,
    /// VIN → [`VehicleRec`].
    pub(crate) vehicles: sled::Tree,
    /// VIN → [`CarRec`].
    pub(crate) cars: sled::Tree,
    /// request id (16 bytes) → [`RequestRec`].
    pub(crate) requests: sled::Tree,
    /// ticket id (u64 BE) → [`Ticket`].
    pub(crate) tickets: sled::Tree,
    /// due time ms (u64 BE) ++ id (u64 BE) → [`OutboxEntry`].
    pub(crate) outbox: sled::Tree,
    /// VIN ++ id (u64 BE) → the car's [`HistoryEntry`]s from one engine batch, oldest (that
    /// id) first ([`dec_history`]).
    pub(crate) history: sled::Tree,
    /// campaign id (16 bytes) → [`CampaignRec`].
    pub(crate) campaigns: sled::Tree,
    /// request id (16 bytes) → the [`GrantRec`] of the same service that the request, still
    /// in flight, replaced (a renewal) or removed (a deactivation): put back if it fails, so a
    /// failed change changes nothing. Removed once the request is final.
    pub(crate) replaced: sled::Tree,
    /// VIN → the request ids (text, oldest first) of the car's held grants, as [`enc`] of a
    /// `Vec<String>`: activations left out of its commands until their turn after a refusal
    /// (the engine's `Car::held`); no key while none is held. Kept apart from [`CarRec`] so
    /// that records written before it still read. An entry may name requests that have
    /// since ended (the car's write after a request ends may wait): start-up keeps only the
    /// ids still in flight, so such an entry, or one whose requests were pruned, holds
    /// nothing back.
    pub(crate) held: sled::Tree,
    /// campaign id ++ request id → (): the campaign index of stores written before campaign
    /// request ids began with their campaign's id ([`campaign_request_id`]); read only.
    pub(crate) campaign_reqs: sled::Tree,
    /// hash of an `Idempotency-Key` (32 bytes) → the request or campaign it names
    /// ([`crate::idempotency`]); pruned past the retention.
    pub(crate) idempotency: sled::Tree,
    /// when a key was claimed (ms, u64 BE) ++ its hash → (): the order in which
    /// [`crate::idempotency::prune`] reaches keys past the retention.
    pub(crate) idempotency_times: sled::Tree,
    /// VIN → [`RetiredRec`]: the tombstone of a car taken out of the fleet
    /// (`DELETE /vehicles/{vin}`), kept until the VIN is registered again. One small value a
    /// decommissioned car, never pruned: it holds the car's newest seq, which a unit keeps
    /// for good (a command at or below it is refused as a replay).
    pub(crate) retired: sled::Tree,
}

impl Store {
    /// Opens (or creates) the store at `path`, with a page cache of at most `cache_mb` MiB.
    pub(crate) fn open(path: &std::path::Path, cache_mb: u64) -> anyhow::Result<Store> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_mb.saturating_mul(1024 * 1024))
            .flush_every_ms(Some(200))
            .open()?;
        Ok(Store {
            vehicles: db.open_tree("vehicles")?,
            cars: db.open_tree("cars")?,
            requests: db.open_tree("requests")?,
            tickets: db.open_tree("tickets")?,
            outbox: db.open_tree("outbox")?,
            history: db.open_tree("history")?,
            campaigns: db.open_tree("campaigns")?,
            campaign_reqs: db.open_tree("campaign_reqs")?,
            replaced: db.open_tree("replaced")?,
            idempotency: db.open_tree("idempotency")?,
            idempotency_times: db.open_tree("idempotency_times")?,
            held: db.open_tree("held")?,
            retired: db.open_tree("retired")?,
            db,
        })
    }
}

impl Store {
    /// The tombstone of `vin` if the car was decommissioned (and not registered since); an
    /// unreadable one reads as none.
    pub(crate) fn retired_car(&self, vin: &[u8]) -> sled::Result<Option<RetiredRec>> {
        Ok(self.retired.get(vin)?.and_then(|v| dec(&v)))
    }

    /// Makes every write so far durable (sled's flush); `Err` says why not.
    pub(crate) fn flush(&self, metrics: &crate::metrics::Metrics) -> Result<(), String> {
        metrics
            .flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = std::time::Instant::now();
        let r = self.db.flush().map(|_| ()).map_err(|e| e.to_string());
        metrics.observe_flush(started.elapsed().as_secs_f64());
        if let Err(e) = &r {
            tracing::error!(error = %e, "flush failed");
        }
        metrics
            .store_failing
            .store(u64::from(r.is_err()), std::sync::atomic::Ordering::Relaxed);
        r
    }
}

/// The first byte of a record in the compact encoding (a tag, then postcard). Records are
/// written compactly because a campaign writes each car's request, car and history records
/// several times, and their size drives the store's copying, page writes and memory.
/// JSON records (from stores written before, and tickets, whose diagnostics are free-form
/// JSON that postcard cannot read back) never start with this byte, so [`dec`] reads both.
const COMPACT: u8 = 0x01;

/// Serialises a record for sled, compactly.
pub(crate) fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    // Our own records always serialise; an empty value would read back as an error, not a panic.
    postcard::to_extend(v, vec![COMPACT]).unwrap_or_default()
}

/// Serialises a record for sled as JSON (for records holding free-form JSON).
pub(crate) fn enc_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// Reads a record from sled, in either encoding.
pub(crate) fn dec<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Option<T> {
    match bytes.split_first() {
        Some((&COMPACT, rest)) => postcard::from_bytes(rest).ok(),
        _ => serde_json::from_slice(bytes).ok(),
    }
}

/// Reads a value of the history tree: the entries, oldest first.
pub(crate) fn dec_history(bytes: &[u8]) -> Option<Vec<HistoryEntry>> {
    match bytes.split_first() {
        Some((&COMPACT, rest)) => postcard::from_bytes(rest).ok(),
        _ => serde_json::from_slice::<HistoryEntries>(bytes)
            .ok()
            .map(HistoryEntries::into_vec),
    }
}

/// Where the time a campaign was cancelled is kept: its key in the campaigns tree with a
/// suffix, so the mark goes when the campaign is pruned.
pub(crate) fn cancel_mark(cid: &RequestId) -> Vec<u8> {
    [&cid.0[..], b"/cancelled"].concat()
}

/// Where a campaign's `abortWhen` rule is kept ([`crate::campaign::AbortWhen`]): like the
/// cancel mark, beside the campaign's record rather than in it, so that campaign records
/// written before it still read (the compact encoding has no optional trailing fields), and
/// it goes when the campaign is pruned.
pub(crate) fn abort_when_mark(cid: &RequestId) -> Vec<u8> {
    [&cid.0[..], b"/abortWhen"].concat()
}

/// Where a campaign's abort by its rule is recorded ([`AbortedRec`]).
pub(crate) fn aborted_mark(cid: &RequestId) -> Vec<u8> {
    [&cid.0[..], b"/aborted"].concat()
}

/// A campaign stopped by its `abortWhen` rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AbortedRec {
    pub(crate) aborted_at: String,
    pub(crate) abort_reason: String,
}

/// A provisioned car.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct VehicleRec {
    pub(crate) vin: String,
    pub(crate) public_key: String,
    pub(crate) platform: String,
    pub(crate) firmware_version: Option<String>,
    pub(crate) registered_at: String,
}

/// One grant of a car's desired state, with where it came from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct GrantRec {
    pub(crate) service_id: String,
    pub(crate) flags: Vec<String>,
    pub(crate) params: Vec<(String, String)>,
    pub(crate) ends_at: Option<u64>,
    pub(crate) request_id: String,
    /// The seq of the command that first carried it.
    pub(crate) seq: u64,
    pub(crate) activation_date: String,
}

/// A car's desired state and sequence numbers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CarRec {
    /// The newest seq issued (0: none yet).
    pub(crate) seq: u64,
    /// The newest seq the car reported applied.
    pub(crate) applied_seq: u64,
    pub(crate) grants: Vec<GrantRec>,
    /// Request ids the newest command settles.
    pub(crate) settles: Vec<String>,
    /// Requests of this car not yet final (loaded and resumed on start), oldest first.
    #[serde(default)]
    pub(crate) pending: Vec<String>,
}

/// An IoT API request, as `GET /ota/requests/{id}` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RequestRec {
    pub(crate) request_id: String,
    pub(crate) vin: String,
    /// `ACTIVATE` or `DEACTIVATE`.
    pub(crate) action: String,
    pub(crate) service_id: String,
    pub(crate) seq: u64,
    /// `QUEUED`, `IN_PROGRESS`, `COMPLETED` or `FAILED`.
    pub(crate) status: String,
    /// `SENDING`, `BACKOFF`, `PROBING` or `DONE`.
    pub(crate) phase: String,
    pub(crate) attempts: u32,
    pub(crate) error_code: Option<String>,
    pub(crate) created_at: String,
    pub(crate) updated_at: String,
    pub(crate) completed_at: Option<String>,
    pub(crate) campaign_id: Option<String>,
    /// The grant an activation adds (kept to rebuild the desired state).
    #[serde(default)]
    pub(crate) grant: Option<GrantRec>,
    /// Milliseconds since the epoch when the request was accepted.
    pub(crate) created_ms: u64,
}

/// A support ticket opened after a request ran out of attempts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Ticket {
    pub(crate) ticket_id: String,
    pub(crate) request_id: String,
    pub(crate) vin: String,
    pub(crate) service_id: String,
    pub(crate) action: String,
    pub(crate) created_at: String,
    pub(crate) reason: String,
    pub(crate) attempts: u32,
    pub(crate) connectivity: String,
    pub(crate) last_seen: Option<String>,
    pub(crate) probe_answered: bool,
    pub(crate) expected_seq: u64,
    pub(crate) applied_seq: u64,
    pub(crate) diagnostics: Option<serde_json::Value>,
}

/// A callback waiting to be delivered.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct OutboxEntry {
    pub(crate) id: u64,
    pub(crate) request_id: String,
    pub(crate) body: String,
    pub(crate) tries: u32,
}

/// What outlives a car's registration once it is decommissioned (the `retired` tree).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RetiredRec {
    pub(crate) vin: String,
    pub(crate) decommissioned_at: String,
    /// The seq of the command that withdrew its grants, the newest it was sent: a
    /// registration of the VIN again starts above it, so that a unit that applied it (the
    /// same unit back in the programme) takes the commands that follow instead of refusing
    /// them as replays.
    pub(crate) seq: u64,
    /// The key it was registered with (no longer its: free for another car).
    pub(crate) public_key: String,
    /// The requests its decommissioning ended (0 in the answer to a repeat).
    pub(crate) requests_failed: usize,
    /// Final requests whose callback's first try was under way when the car was
    /// decommissioned (the car's record, which kept them until delivered, is gone): sent
    /// again at the next start unless delivered first. Bounded by the webhook sender's
    /// queues: past half of them a callback is filed in the outbox instead of kept here.
    pub(crate) awaiting: Vec<String>,
}

/// One line of a car's history.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct HistoryEntry {
    pub(crate) id: String,
    pub(crate) timestamp: String,
    /// `REQUEST`, `COMMAND`, `REPORT`, `RESULT`, `PRESENCE`, `KEY_REPLACED`,
    /// `DECOMMISSIONED`, `REGISTERED` (only when a decommissioned VIN is registered again).
    #[serde(rename = "type")]
    pub(crate) kind: String,
    #[serde(default)]
    pub(crate) seq: Option<u64>,
    #[serde(default)]
    pub(crate) request_id: Option<String>,
    pub(crate) detail: String,
}

/// One JSON value of the history tree (stores before the compact encoding): a single entry
/// (as stores before grouping wrote them) or the entries one batch wrote for one car, oldest
/// first. Compact values are always the list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum HistoryEntries {
    Many(Vec<HistoryEntry>),
    One(HistoryEntry),
}

impl HistoryEntries {
    /// The entries, oldest first.
    fn into_vec(self) -> Vec<HistoryEntry> {
        match self {
            HistoryEntries::Many(v) => v,
            HistoryEntries::One(e) => vec![e],
        }
    }
}

/// A fleet campaign.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CampaignRec {
    pub(crate) campaign_id: String,
    pub(crate) action: String,
    pub(crate) service_id: String,
    pub(crate) total: usize,
    pub(crate) created_at: String,
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// ISO-8601 UTC text of a Unix time in milliseconds.
pub(crate) fn iso_ms(ms: u64) -> String {
    // The engine stamps each request several times within the same millisecond as the rest
    // of its batch; formatting was a visible share of its CPU, so each thread keeps its last.
    thread_local! {
        static LAST: std::cell::RefCell<(u64, String)> = const {
            std::cell::RefCell::new((u64::MAX, String::new()))
        };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if last.0 != ms {
            let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            let text = t
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            *last = (ms, text);
        }
        last.1.clone()
    })
}

/// ISO-8601 UTC text of now.
pub(crate) fn iso_now() -> String {
    iso_ms(now_ms())
}

/// Unique, growing ids (microseconds since the epoch, bumped on collision).
pub(crate) fn next_id() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = now_ms() * 1000;
    let mut prev = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(prev + 1);
        match LAST.compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(p) => prev = p,
        }
    }
}

/// A fresh UUID (version 7, RFC 9562) as 16 bytes: 48 bits of Unix milliseconds, a 12-bit
/// counter within the millisecond, 62 random bits. Ids sort by creation time, so the stored
/// requests and campaigns are pruned by one range scan from the oldest ([`prune`]), and two
/// ids made in one millisecond by this process still differ in their first 10 bytes (the
/// campaign prefix, [`CAMPAIGN_PREFIX`]). Past 4,096 ids in a millisecond the counter carries
/// into the time, which runs ahead by as much.
pub(crate) fn new_uuid() -> [u8; 16] {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = now_ms() << 12;
    let mut prev = LAST.load(Ordering::Relaxed);
    let stamp = loop {
        let next = now.max(prev + 1);
        match LAST.compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => break next,
            Err(p) => prev = p,
        }
    };
    let (ms, counter) = (stamp >> 12, stamp & 0xfff);
    let mut b: [u8; 16] = rand::random();
    b[..6].copy_from_slice(&uuid_time_prefix(ms));
    b[6] = 0x70 | (counter >> 8) as u8;
    b[7] = counter as u8;
    b[8] = (b[8] & 0x3f) | 0x80;
    b
}

/// The first 6 bytes of a [`new_uuid`] made at `ms`: every id made before `ms` sorts below.
pub(crate) fn uuid_time_prefix(ms: u64) -> [u8; 6] {
    let be = ms.to_be_bytes();
    [be[2], be[3], be[4], be[5], be[6], be[7]]
}

/// The kinds of records [`prune`] removes once they are older than the retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prunable {
    /// Final requests (COMPLETED or FAILED) no longer listed in their car's record (where a
    /// request waits until its callback is delivered); requests in flight stay whatever
    /// their age. The `held` tree is not looked at: a held grant's request is in flight,
    /// and an entry naming one pruned since is dropped at start.
    Requests,
    Campaigns,
    SupportTickets,
    /// Idempotency keys claimed before the cutoff (through their time index).
    IdempotencyKeys,
}

impl Prunable {
    pub(crate) const ALL: [Prunable; 4] = [
        Prunable::Requests,
        Prunable::Campaigns,
        Prunable::SupportTickets,
        Prunable::IdempotencyKeys,
    ];
}

/// One step of pruning `kind`: looks at up to `budget` records made before `cutoff_ms`,
/// from key `from` on, and removes those that may go. Returns how many it removed and the
/// key to go on from, `None` once it reached the cutoff. Ids of stores from before version
/// 7 ids are random: those that sort below the cutoff go by their creation time, the
/// others are kept.
pub(crate) fn prune(
    store: &Store,
    kind: Prunable,
    cutoff_ms: u64,
    from: &[u8],
    budget: usize,
) -> sled::Result<(usize, Option<Vec<u8>>)> {
    let requests_bound = uuid_time_prefix(cutoff_ms);
    let tickets_bound = cutoff_ms.saturating_mul(1000).to_be_bytes();
    let (tree, bound): (&sled::Tree, &[u8]) = match kind {
        Prunable::Requests => (&store.requests, &requests_bound),
        Prunable::Campaigns => (&store.campaigns, &requests_bound),
        Prunable::SupportTickets => (&store.tickets, &tickets_bound),
        Prunable::IdempotencyKeys => {
            return crate::idempotency::prune(store, cutoff_ms, from, budget)
        }
    };
    let mut removed = 0;
    for (seen, item) in tree.range(from..bound).enumerate() {
        let (key, value) = item?;
        if seen == budget {
            return Ok((removed, Some(key.to_vec())));
        }
        let goes = match kind {
            Prunable::Requests => match dec::<RequestRec>(&value) {
                Some(rec) => {
                    matches!(rec.status.as_str(), "COMPLETED" | "FAILED")
                        && rec.created_ms < cutoff_ms
                        && !listed_in_its_car(store, &rec)?
                }
                None => false,
            },
            // Only a version 7 id tells when the campaign was made.
            // A campaign and its marks (its id with a suffix: cancel, abort rule, abort) go
            // together.
            Prunable::Campaigns => key.len() >= 16 && key[6] >> 4 == 7,
            Prunable::SupportTickets => true,
            // Pruned through its time index above.
            Prunable::IdempotencyKeys => false,
        };
        if goes {
            tree.remove(&key)?;
            if kind == Prunable::Requests {
                // Normally gone when the request became final; a crash could leave it.
                store.replaced.remove(&key)?;
            }
            removed += 1;
        }
    }
    Ok((removed, None))
}

fn listed_in_its_car(store: &Store, rec: &RequestRec) -> sled::Result<bool> {
    Ok(store
        .cars
        .get(rec.vin.as_bytes())?
        .and_then(|v| dec::<CarRec>(&v))
        .is_some_and(|car| car.pending.contains(&rec.request_id)))
}

/// How many leading bytes a campaign's request ids share with the campaign id (80 bits: two
/// campaigns sharing them, or a single request's random id matching them, is negligible).
pub(crate) const CAMPAIGN_PREFIX: usize = 10;

/// The id of the `index`th request of campaign `campaign`: the campaign id's first
/// [`CAMPAIGN_PREFIX`] bytes (which keep the UUID's version and variant bits) and the index
/// (48 bits, big-endian). The requests tree then indexes a campaign by itself (a prefix
/// scan), with no index entry to write per request.
pub(crate) fn campaign_request_id(campaign: &[u8; 16], index: u64) -> [u8; 16] {
    let mut id = *campaign;
    id[CAMPAIGN_PREFIX..].copy_from_slice(&index.to_be_bytes()[8 - (16 - CAMPAIGN_PREFIX)..]);
    id
}

/// What runs after the flush that made a batch durable: `Ok` if it is durable.
pub(crate) type Continuation = Box<dyn FnOnce(Result<(), String>) + Send>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_text_is_rfc3339_utc_and_the_kept_text_follows_the_time() {
        assert_eq!(iso_ms(1_764_936_000_123), "2025-12-05T12:00:00.123Z");
        assert_eq!(iso_ms(1_764_936_000_123), "2025-12-05T12:00:00.123Z");
        assert_eq!(iso_ms(1_764_936_001_000), "2025-12-05T12:00:01Z");
        assert_eq!(iso_ms(0), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn campaign_request_ids_share_the_campaign_prefix_and_differ_by_index() {
        let campaign = new_uuid();
        let a = campaign_request_id(&campaign, 0);
        let b = campaign_request_id(&campaign, 99_999);
        assert_eq!(a[..CAMPAIGN_PREFIX], campaign[..CAMPAIGN_PREFIX]);
        assert_eq!(b[..CAMPAIGN_PREFIX], campaign[..CAMPAIGN_PREFIX]);
        assert_ne!(a, b);
        assert_eq!(b[CAMPAIGN_PREFIX..], [0, 0, 0, 1, 0x86, 0x9f]);
        // Still a version 7 UUID: its text parses back to the same bytes.
        let text = caas_protocol::RequestId(b).to_string();
        assert_eq!(&text[14..15], "7");
        assert_eq!(text.parse::<caas_protocol::RequestId>().map(|r| r.0), Ok(b));
    }

    #[test]
    fn ids_are_version_7_and_sort_by_the_time_they_were_made() {
        let before = uuid_time_prefix(now_ms());
        let ids: Vec<[u8; 16]> = (0..10_000).map(|_| new_uuid()).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "made in order, sorted in order"
        );
        for id in &ids {
            assert_eq!(id[6] >> 4, 7, "version");
            assert_eq!(id[8] >> 6, 0b10, "variant");
            assert!(id[..6] >= before[..]);
        }
        // Within a millisecond the counter keeps the campaign prefix apart.
        assert!(ids
            .windows(2)
            .all(|w| w[0][..CAMPAIGN_PREFIX] != w[1][..CAMPAIGN_PREFIX]));
    }

    fn request_rec(id: &[u8; 16], vin: &str, status: &str, created_ms: u64) -> RequestRec {
        RequestRec {
            request_id: caas_protocol::RequestId(*id).to_string(),
            vin: vin.into(),
            action: "ACTIVATE".into(),
            service_id: "s".into(),
            seq: 1,
            status: status.into(),
            phase: "DONE".into(),
            attempts: 1,
            error_code: None,
            created_at: iso_ms(created_ms),
            updated_at: iso_ms(created_ms),
            completed_at: None,
            campaign_id: None,
            grant: None,
            created_ms,
        }
    }

    #[test]
    fn pruning_goes_in_steps_and_keeps_what_is_in_flight_or_awaits_its_callback() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8).unwrap();
        let cutoff = now_ms();
        let old = cutoff - 60_000;
        // Ids made a minute ago: the same layout as new_uuid's, at that time.
        let id = |n: u8| {
            let mut b = [n; 16];
            b[..6].copy_from_slice(&uuid_time_prefix(old));
            b[6] = 0x70;
            b
        };
        let mut gone = Vec::new();
        for n in 0..5 {
            let rec = request_rec(&id(n), "CAR", "COMPLETED", old);
            store.requests.insert(id(n), enc(&rec)).unwrap();
            gone.push(id(n));
        }
        let in_flight = request_rec(&id(10), "CAR", "IN_PROGRESS", old);
        store.requests.insert(id(10), enc(&in_flight)).unwrap();
        let awaiting = request_rec(&id(11), "CAR", "FAILED", old);
        store.requests.insert(id(11), enc(&awaiting)).unwrap();
        let car = CarRec {
            pending: vec![awaiting.request_id.clone()],
            ..CarRec::default()
        };
        store.cars.insert("CAR", enc(&car)).unwrap();
        let recent = new_uuid();
        let rec = request_rec(&recent, "CAR", "COMPLETED", cutoff + 1);
        store.requests.insert(recent, enc(&rec)).unwrap();

        let mut from = Vec::new();
        let mut steps = 0;
        let mut removed = 0;
        loop {
            let (n, next) = prune(&store, Prunable::Requests, cutoff, &from, 2).unwrap();
            removed += n;
            steps += 1;
            match next {
                Some(k) => from = k,
                None => break,
            }
        }
        assert_eq!(removed, 5);
        assert_eq!(steps, 4, "7 records past the cutoff, 2 a step");
        for k in gone {
            assert!(store.requests.get(k).unwrap().is_none());
        }
        for kept in [id(10), id(11), recent] {
            assert!(store.requests.get(kept).unwrap().is_some());
        }

        let old_ticket = (old * 1000).to_be_bytes();
        let new_ticket = ((cutoff + 1) * 1000).to_be_bytes();
        store.tickets.insert(old_ticket, b"t".to_vec()).unwrap();
        store.tickets.insert(new_ticket, b"t".to_vec()).unwrap();
        let (n, next) = prune(&store, Prunable::SupportTickets, cutoff, &[], 100).unwrap();
        assert_eq!((n, next), (1, None));
        assert!(store.tickets.get(new_ticket).unwrap().is_some());
    }

    fn entry(id: u64, seq: Option<u64>) -> HistoryEntry {
        HistoryEntry {
            id: id.to_string(),
            timestamp: iso_ms(id / 1000),
            kind: "COMMAND".into(),
            seq,
            request_id: None,
            detail: "d".into(),
        }
    }

    fn ids(entries: Option<Vec<HistoryEntry>>) -> Vec<(String, Option<u64>)> {
        entries
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.id, e.seq))
            .collect()
    }

    #[test]
    fn history_values_read_as_a_json_entry_a_json_batch_or_a_compact_batch() {
        let one = r#"{"id":"7","timestamp":"t","type":"REPORT","detail":"d"}"#;
        assert_eq!(ids(dec_history(one.as_bytes())), vec![("7".into(), None)]);
        let many = r#"[{"id":"1","timestamp":"t","type":"COMMAND","seq":3,"detail":"d"},
                       {"id":"2","timestamp":"t","type":"REPORT","detail":"d"}]"#;
        assert_eq!(
            ids(dec_history(many.as_bytes())),
            vec![("1".into(), Some(3)), ("2".into(), None)]
        );
        let compact = enc(&vec![entry(5, Some(9)), entry(6, None)]);
        assert_eq!(compact[0], COMPACT);
        assert_eq!(
            ids(dec_history(&compact)),
            vec![("5".into(), Some(9)), ("6".into(), None)]
        );
        assert!(dec_history(&[COMPACT, 0xff]).is_none());
    }

    #[test]
    fn records_round_trip_compactly_and_json_records_of_older_stores_still_read() {
        let grant = GrantRec {
            service_id: "s".into(),
            flags: vec!["power_boost".into()],
            params: vec![("k".into(), "v".into())],
            ends_at: Some(10),
            request_id: "r".into(),
            seq: 2,
            activation_date: "a".into(),
        };
        let car = CarRec {
            seq: 2,
            applied_seq: 1,
            grants: vec![grant.clone()],
            settles: vec!["r".into()],
            pending: vec!["q".into()],
        };
        let json = enc_json(&car);
        let compact = enc(&car);
        assert!(
            compact.len() * 2 < json.len(),
            "{} vs {}",
            compact.len(),
            json.len()
        );
        for bytes in [json, compact] {
            let back: Option<CarRec> = dec(&bytes);
            let back = back.unwrap_or_default();
            assert_eq!((back.seq, back.applied_seq), (2, 1));
            assert_eq!(back.grants, vec![grant.clone()]);
            assert_eq!(
                (back.settles, back.pending),
                (vec!["r".into()], vec!["q".into()])
            );
        }
        // A request of an older store: JSON, and no `grant` key for a deactivation.
        let old = r#"{"requestId":"r","vin":"V","action":"DEACTIVATE","serviceId":"s","seq":3,
            "status":"COMPLETED","phase":"DONE","attempts":1,"errorCode":null,"createdAt":"c",
            "updatedAt":"u","completedAt":"u","campaignId":null,"createdMs":5}"#;
        let rec: Option<RequestRec> = dec(old.as_bytes());
        let rec = rec.map(|r| (r.action, r.seq, r.grant.is_none(), r.created_ms));
        assert_eq!(rec, Some(("DEACTIVATE".into(), 3, true, 5)));
    }

    /// Copies a directory tree: a copy of a store's files taken right after a flush is what
    /// a crash at that moment leaves on disk.
    fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }

    /// The 4 KiB value [`fill`] writes under key `k`.
    fn value_for(k: u32) -> Vec<u8> {
        vec![(k % 251) as u8; 4096]
    }

    fn fill(store: &Store, keys: std::ops::Range<u32>) {
        for k in keys {
            store.history.insert(k.to_be_bytes(), value_for(k)).unwrap();
            if k % 256 == 0 {
                store.db.flush().unwrap();
            }
        }
        store.db.flush().unwrap();
    }

    fn assert_holds(store: &Store, keys: std::ops::Range<u32>) {
        assert_eq!(store.history.len(), keys.len());
        for k in keys {
            let value = store.history.get(k.to_be_bytes()).unwrap();
            assert_eq!(value.as_deref(), Some(&value_for(k)[..]), "key {k}");
        }
    }

    /// The log file is written out (allocated, and inside the file's size) at least 4
    /// segments of 512 KiB beyond the log's end (vendor/sled/PATCHES.md item 7), so that a
    /// flush's `fdatasync` writes only the data, not the inode and allocation metadata too.
    #[test]
    fn the_log_file_is_written_out_ahead_of_the_log() {
        use std::io::Read;
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8).unwrap();
        // 1,000 values of 4 KiB: several segments of log.
        fill(&store, 0..1_000);
        // The last fill runs on a thread of its own, which no flush waits for, so wait until
        // its sync has given the file its blocks.
        let file = dir.path().join("db");
        let ahead = 4 * 512 * 1024;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let tail_is_filler = || {
            let meta = std::fs::metadata(&file).unwrap();
            let mut f = std::fs::File::open(&file).unwrap();
            let mut all = Vec::new();
            f.read_to_end(&mut all).unwrap();
            let len = all.len();
            len >= ahead
                && all[len - ahead..].iter().all(|b| *b == 0)
                && meta.blocks() * 512 >= meta.len()
        };
        while !tail_is_filler() {
            assert!(
                std::time::Instant::now() < deadline,
                "the log file's last 2 MiB are not written out ahead"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_holds(&store, 0..1_000);
    }

    /// A store of many segments recovers every flushed write, from a crash copy and after
    /// reopening, and keeps working after a reopen.
    #[test]
    fn a_store_of_many_segments_recovers_every_flushed_write() {
        let dir = tempfile::tempdir().unwrap();
        let (live, crashed) = (dir.path().join("live"), dir.path().join("crashed"));
        let store = Store::open(&live, 8).unwrap();
        // 4,000 values of 4 KiB: a log of over 16 MiB, many 512 KiB segments.
        fill(&store, 0..4_000);
        copy_dir(&live, &crashed);
        drop(store);

        let store = reopen(&live);
        assert_holds(&store, 0..4_000);
        fill(&store, 4_000..6_000);
        drop(store);
        let store = reopen(&live);
        assert_holds(&store, 0..6_000);
        drop(store);

        let store = reopen(&crashed);
        assert_holds(&store, 0..4_000);
    }

    /// Opens the store at `path` again once the store dropped just before has let go of its
    /// file lock (its background threads hold the database a moment after the drop).
    fn reopen(path: &std::path::Path) -> Store {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Store::open(path, 8) {
                Ok(store) => return store,
                Err(e)
                    if std::time::Instant::now() < deadline && e.to_string().contains("lock") =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("reopening {}: {e}", path.display()),
            }
        }
    }
}
