//! Live counts of each recent campaign's requests by state, for `GET /campaigns/{id}`, and
//! the campaign's `abortWhen` rule, which those counts drive.
//!
//! A campaign's requests are spread over every shard; counting them from the store on each
//! poll costs a read per request (100,000 reads for a large campaign, polled every few
//! milliseconds while it runs). Instead each accepted request carries its campaign's
//! counters and its shard moves them when the request is accepted and when it ends. The
//! book keeps the newest [`MAX_LIVE_CAMPAIGNS`] campaigns; an older one, or one from before
//! a restart, is counted from the store instead (still correct, only slower). A campaign
//! with an `abortWhen` rule and requests still in flight at a start is counted from the
//! store once then, refusals included ([`rearm`]), so that the rule goes on applying.
//!
//! The abort rule: a campaign stops itself once at least `minFinished` of its requests are
//! final and at least `refusedPercent` of those were refused by their cars. A refusal is a
//! request the engine failed because the car's signed report refused the command carrying
//! it ([`Ending::Refused`], decided where the engine assigns the error code, not from the
//! code's text). A request that ran out of attempts (`NO_CONFIRMATION`, or `UNKNOWN_KEY`
//! when the car refused our commands as signed by a key it does not trust, naming none of
//! them), was cancelled or whose car was decommissioned is not one: a car that is offline
//! says nothing about the campaign, and a fleet is mostly offline. Every final request
//! counts as finished. The check runs on the shard thread where a campaign request ends
//! (a few atomic loads); what it trips is handed over a bounded queue ([`TRIP_QUEUE`]) to
//! one task (`api::run_aborts`) that cancels the campaign the way
//! `POST /campaigns/{id}/cancel` does, so no shard waits for it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering::{AcqRel, Release};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Acquire, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use caas_protocol::{RejectCode, RequestId};
use serde::{Deserialize, Serialize};

use crate::store::{
    abort_when_mark, aborted_mark, cancel_mark, dec, RequestRec, Store, CAMPAIGN_PREFIX,
};

/// Campaigns whose counts are kept live; older ones are counted from the store.
pub(crate) const MAX_LIVE_CAMPAIGNS: usize = 4096;

/// Trips waiting for the abort task at most. A campaign's counts trip at most once per
/// process (unless the task could not act on it), so this many holds one per live campaign;
/// should it still be full, the trip is not lost: the campaign stays armed and the next end
/// of one of its requests trips it again (or the next start does).
pub(crate) const TRIP_QUEUE: usize = MAX_LIVE_CAMPAIGNS;

/// `minFinished` when `abortWhen` leaves it out.
pub(crate) const DEFAULT_MIN_FINISHED: u32 = 20;
/// The largest `minFinished` taken.
pub(crate) const MAX_MIN_FINISHED: u32 = 100_000;

/// A campaign's `abortWhen` rule, as given and as stored (`store::abort_when_mark`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AbortWhen {
    /// 1..=100.
    pub(crate) refused_percent: u32,
    /// 1..=[`MAX_MIN_FINISHED`].
    pub(crate) min_finished: u32,
}

impl AbortWhen {
    /// Whether `refused` refusals among `finished` final requests trip the rule: at least
    /// `min_finished` finished, and `refused / finished >= refused_percent / 100`, in
    /// integers (no rounding puts it a request early or late).
    pub(crate) fn trips(&self, finished: u64, refused: u64) -> bool {
        // In u128: exact for any counts, where u64 products could saturate and agree.
        finished >= u64::from(self.min_finished)
            && u128::from(refused) * 100 >= u128::from(self.refused_percent) * u128::from(finished)
    }

    /// The `abortReason` of a trip at these counts. The percentage is rounded down, which
    /// never shows it below the threshold it passed.
    pub(crate) fn reason(&self, finished: u64, refused: u64) -> String {
        let percent = u128::from(refused) * 100 / u128::from(finished.max(1));
        format!(
            "{refused} of {finished} finished requests refused by their cars ({percent}% \u{2265} {}%)",
            self.refused_percent
        )
    }

    /// As the API shows it.
    pub(crate) fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "refusedPercent": self.refused_percent,
            "minFinished": self.min_finished,
        })
    }
}

/// How a campaign request ended, as its campaign's counts and abort rule see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    Completed,
    /// FAILED because the car's signed report refused the command carrying it.
    Refused,
    /// FAILED otherwise: out of attempts, cancelled, the car decommissioned.
    Failed,
}

/// A campaign whose abort rule tripped, for the abort task.
#[derive(Debug, Clone)]
pub(crate) struct Trip {
    pub(crate) campaign_id: String,
    pub(crate) when: AbortWhen,
    /// The counts it tripped at (for `abortReason`).
    pub(crate) finished: u64,
    pub(crate) refused: u64,
}

/// The abort rule of a campaign's live counts.
#[derive(Debug)]
struct Armed {
    campaign_id: String,
    when: AbortWhen,
    /// Set once it tripped (or the campaign was cancelled by hand): it trips at most once.
    fired: AtomicBool,
    trips: tokio::sync::mpsc::Sender<Trip>,
}

/// One campaign's requests by state.
#[derive(Debug, Default)]
pub(crate) struct CampaignCounts {
    in_progress: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    /// Of `failed`, those its cars refused. Written after `failed` (Release) and read before
    /// it (Acquire), so a reader never sees a refusal that `failed` does not count yet.
    refused: AtomicU64,
    armed: Option<Armed>,
}

/// A campaign's requests as counted from the store.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tally {
    pub(crate) in_progress: u64,
    pub(crate) completed: u64,
    pub(crate) failed: u64,
    pub(crate) refused: u64,
}

impl CampaignCounts {
    /// A request of the campaign was accepted.
    pub(crate) fn accepted(&self) {
        self.in_progress.fetch_add(1, Relaxed);
    }

    /// A request of the campaign ended; trips the campaign's abort rule if this end makes it
    /// hold.
    pub(crate) fn ended(&self, how: Ending) {
        // Saturating: a request can only end once, but never let a slip wrap the count.
        let _ = self
            .in_progress
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)));
        match how {
            Ending::Completed => {
                self.completed.fetch_add(1, Relaxed);
            }
            Ending::Refused => {
                self.failed.fetch_add(1, Relaxed);
                self.refused.fetch_add(1, Release);
            }
            Ending::Failed => {
                self.failed.fetch_add(1, Relaxed);
            }
        }
        self.check();
    }

    /// Hands the campaign to the abort task if its rule holds and has not tripped yet.
    pub(crate) fn check(&self) {
        let Some(armed) = &self.armed else {
            return;
        };
        if armed.fired.load(Acquire) {
            return;
        }
        let refused = self.refused.load(Acquire);
        let finished = self.completed.load(Relaxed) + self.failed.load(Relaxed);
        if armed.when.trips(finished, refused) {
            self.fire(armed, finished, refused);
        }
    }

    /// Hands the campaign to the abort task whatever its counts: at a start, for a campaign
    /// whose abort was recorded but whose cancel may not have been.
    fn force(&self) {
        if let Some(armed) = &self.armed {
            let refused = self.refused.load(Acquire);
            let finished = self.completed.load(Relaxed) + self.failed.load(Relaxed);
            self.fire(armed, finished, refused);
        }
    }

    fn fire(&self, armed: &Armed, finished: u64, refused: u64) {
        if armed.fired.swap(true, AcqRel) {
            return;
        }
        let trip = Trip {
            campaign_id: armed.campaign_id.clone(),
            when: armed.when,
            finished,
            refused,
        };
        if armed.trips.try_send(trip).is_err() {
            // Full (or the gateway is stopping): the next request end tries again.
            armed.fired.store(false, Release);
        }
    }

    /// The campaign was cancelled (by hand, or by this rule): the rule trips no more.
    pub(crate) fn disarm(&self) {
        if let Some(armed) = &self.armed {
            armed.fired.store(true, Release);
        }
    }

    /// The abort task could not act on a trip (a storage failure): the next request end
    /// tries again.
    pub(crate) fn rearm(&self) {
        if let Some(armed) = &self.armed {
            armed.fired.store(false, Release);
        }
    }

    /// `(IN_PROGRESS, COMPLETED, FAILED)`.
    pub(crate) fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.in_progress.load(Relaxed),
            self.completed.load(Relaxed),
            self.failed.load(Relaxed),
        )
    }

    fn settled(&self) -> bool {
        self.in_progress.load(Relaxed) == 0
    }
}

/// The live campaigns, by campaign id text.
#[derive(Default)]
pub(crate) struct CampaignBook {
    inner: Mutex<Book>,
    /// Where tripped abort rules go (`None`: rules are not armed, as in unit tests).
    trips: Option<tokio::sync::mpsc::Sender<Trip>>,
}

#[derive(Default)]
struct Book {
    live: HashMap<String, Arc<CampaignCounts>>,
    /// Campaign ids, oldest first (eviction order).
    order: VecDeque<String>,
}

impl CampaignBook {
    /// A book whose campaigns' abort rules trip into `trips`.
    pub(crate) fn new(trips: tokio::sync::mpsc::Sender<Trip>) -> CampaignBook {
        CampaignBook {
            inner: Mutex::default(),
            trips: Some(trips),
        }
    }

    fn counts(&self, campaign_id: &str, abort: Option<AbortWhen>, tally: Tally) -> CampaignCounts {
        CampaignCounts {
            in_progress: AtomicU64::new(tally.in_progress),
            completed: AtomicU64::new(tally.completed),
            failed: AtomicU64::new(tally.failed),
            refused: AtomicU64::new(tally.refused),
            armed: abort.zip(self.trips.clone()).map(|(when, trips)| Armed {
                campaign_id: campaign_id.to_owned(),
                when,
                fired: AtomicBool::new(false),
                trips,
            }),
        }
    }

    /// Starts counting a new campaign (armed with its abort rule, if any); evicts the oldest
    /// settled campaign (or, if none is settled, the oldest) when the book is full.
    pub(crate) fn open(&self, campaign_id: &str, abort: Option<AbortWhen>) -> Arc<CampaignCounts> {
        let counts = Arc::new(self.counts(campaign_id, abort, Tally::default()));
        self.insert(campaign_id, counts.clone());
        counts
    }

    /// Counts a campaign again from `tally` (its requests as the store has them), unless the
    /// book keeps it already.
    fn restore(&self, campaign_id: &str, abort: AbortWhen, tally: Tally) -> Arc<CampaignCounts> {
        if let Some(kept) = self.get(campaign_id) {
            return kept;
        }
        let counts = Arc::new(self.counts(campaign_id, Some(abort), tally));
        self.insert(campaign_id, counts.clone());
        counts
    }

    fn insert(&self, campaign_id: &str, counts: Arc<CampaignCounts>) {
        let Ok(mut book) = self.inner.lock() else {
            // A poisoned book only loses the fast path: GET counts from the store.
            return;
        };
        if book.live.len() >= MAX_LIVE_CAMPAIGNS {
            let victim = book
                .order
                .iter()
                .position(|id| book.live.get(id).is_none_or(|c| c.settled()))
                .unwrap_or(0);
            if let Some(id) = book.order.remove(victim) {
                book.live.remove(&id);
            }
        }
        book.live.insert(campaign_id.to_owned(), counts);
        book.order.push_back(campaign_id.to_owned());
    }

    /// The live counts of `campaign_id`, if the book still keeps them.
    pub(crate) fn get(&self, campaign_id: &str) -> Option<Arc<CampaignCounts>> {
        self.inner.lock().ok()?.live.get(campaign_id).cloned()
    }
}

/// Whether a stored request's error code is its car's refusal, for counts rebuilt from the
/// store, where only the code is left. The engine assigns a car's refusal code
/// ([`RejectCode`]) only on the car's refusal of the request's command, and to a request
/// that ran out of attempts only `NO_CONFIRMATION` or `UNKNOWN_KEY` (a car that does not
/// trust our key refuses a command as seq 0, naming none, so that refusal never fails a
/// request by itself): every other reject code is a refusal, `UNKNOWN_KEY` is not. A car
/// that signed a refusal with `UNKNOWN_KEY` naming a seq would count as refused live but
/// not after a restart; no agent reports that.
pub(crate) fn refused_code(code: &str) -> bool {
    RejectCode::ALL
        .iter()
        .any(|c| *c != RejectCode::UnknownKey && c.as_str() == code)
}

/// Calls `each` with every request of campaign `cid` in the store (a read per request).
pub(crate) fn for_each_request(store: &Store, cid: RequestId, mut each: impl FnMut(RequestRec)) {
    let mut legacy = false;
    // Campaigns of older stores list their requests in a tree of their own.
    for item in store.campaign_reqs.scan_prefix(cid.0).keys() {
        legacy = true;
        let Ok(k) = item else { continue };
        if let Some(r) = k
            .get(16..32)
            .and_then(|rid| store.requests.get(rid).ok().flatten())
            .and_then(|v| dec::<RequestRec>(&v))
        {
            each(r);
        }
    }
    if !legacy {
        let campaign_id = cid.to_string();
        for item in store.requests.scan_prefix(&cid.0[..CAMPAIGN_PREFIX]) {
            let Ok((_, v)) = item else { continue };
            match dec::<RequestRec>(&v) {
                Some(r) if r.campaign_id.as_deref() == Some(campaign_id.as_str()) => each(r),
                _ => {}
            }
        }
    }
}

/// Campaign `cid`'s requests by state, refusals apart, as the store has them.
pub(crate) fn tally(store: &Store, cid: RequestId) -> Tally {
    let mut t = Tally::default();
    for_each_request(store, cid, |r| match r.status.as_str() {
        "COMPLETED" => t.completed += 1,
        "FAILED" => {
            t.failed += 1;
            if r.error_code.as_deref().is_some_and(refused_code) {
                t.refused += 1;
            }
        }
        _ => t.in_progress += 1,
    });
    t
}

/// Live counts armed with campaign `campaign_id`'s abort rule, counted from the store, when
/// the book lost them (a restart; a keyed repeat of its POST after one): `None` when the
/// campaign has no rule, was cancelled by hand, or the store cannot be read (the rule then
/// waits for the next start). Checked at once: a trip that a crash cut off before its
/// cancel was durable trips again here, and a campaign whose abort was recorded is
/// cancelled again whatever its counts (its cancel mark may be durable while a kill cut
/// its shards' work short; a cancel that finished ends nothing more). Costs a read per
/// request of the campaign, once per campaign and start.
pub(crate) fn rearm(
    store: &Store,
    book: &CampaignBook,
    campaign_id: &str,
) -> Option<Arc<CampaignCounts>> {
    let cid = campaign_id.parse::<RequestId>().ok()?;
    let read = |key: Vec<u8>| match store.campaigns.get(key) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(campaign = campaign_id, error = %e, "campaign's abort rule not read; not applied until the next start");
            None
        }
    };
    let when: AbortWhen = dec(&read(abort_when_mark(&cid))??)?;
    let cancelled = read(cancel_mark(&cid))?.is_some();
    let aborted = read(aborted_mark(&cid))?.is_some();
    if cancelled && !aborted {
        return None;
    }
    let counts = book.restore(campaign_id, when, tally(store, cid));
    if aborted {
        counts.force();
    } else {
        counts.check();
    }
    Some(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_requests_and_never_wrap() {
        let c = CampaignCounts::default();
        c.accepted();
        c.accepted();
        c.ended(Ending::Completed);
        assert_eq!(c.snapshot(), (1, 1, 0));
        c.ended(Ending::Refused);
        assert_eq!(c.snapshot(), (0, 1, 1));
        c.ended(Ending::Failed);
        assert_eq!(c.snapshot(), (0, 1, 2));
    }

    #[test]
    fn a_full_book_evicts_a_settled_campaign_first() {
        let book = CampaignBook::default();
        let first = book.open("c0", None);
        first.accepted(); // c0 still running
        for i in 1..MAX_LIVE_CAMPAIGNS {
            book.open(&format!("c{i}"), None);
        }
        assert!(book.get("c0").is_some() && book.get("c1").is_some());
        book.open("new", None);
        assert!(book.get("c0").is_some(), "a running campaign is kept");
        assert!(book.get("c1").is_none(), "the oldest settled one goes");
        assert!(book.get("new").is_some());
    }

    fn rule(p: u32, m: u32) -> AbortWhen {
        AbortWhen {
            refused_percent: p,
            min_finished: m,
        }
    }

    #[test]
    fn the_rule_trips_at_the_threshold_and_not_before_min_finished() {
        let r = rule(30, 20);
        // Exactly at the percentage: 6 of 20 is 30%.
        assert!(r.trips(20, 6));
        assert!(!r.trips(20, 5), "29.99..% is below");
        // 3 of 10 is 30% but only 10 finished: M not reached.
        assert!(!r.trips(10, 3));
        assert!(!r.trips(19, 19), "every one refused, still below M");
        assert!(r.trips(19 + 1, 20));
        // Integer arithmetic: 1 of 3 is 33.3..%, at or above 33 and below 34.
        assert!(rule(33, 1).trips(3, 1));
        assert!(!rule(34, 1).trips(3, 1));
        // Nothing finished trips nothing, even with M = 1.
        assert!(!rule(1, 1).trips(0, 0));
        assert!(rule(1, 1).trips(1, 1));
        assert!(!rule(1, 1).trips(1, 0), "no refusal is never 1%");
    }

    #[test]
    fn at_100_percent_only_all_refused_trips() {
        let r = rule(100, 5);
        assert!(r.trips(5, 5));
        assert!(!r.trips(5, 4));
        assert!(r.trips(100_000, 100_000));
        assert!(!r.trips(100_000, 99_999));
        // Counts far past any campaign do not overflow.
        assert!(!r.trips(u64::MAX, u64::MAX - 1));
        assert!(r.trips(u64::MAX / 100, u64::MAX / 100));
    }

    #[test]
    fn the_reason_names_the_counts_and_never_rounds_below_the_threshold() {
        assert_eq!(
            rule(30, 20).reason(20, 7),
            "7 of 20 finished requests refused by their cars (35% \u{2265} 30%)"
        );
        assert_eq!(
            rule(33, 1).reason(3, 1),
            "1 of 3 finished requests refused by their cars (33% \u{2265} 33%)"
        );
    }

    #[test]
    fn armed_counts_trip_once_and_not_when_disarmed() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let book = CampaignBook::new(tx);
        let c = book.open("c", Some(rule(50, 4)));
        for _ in 0..6 {
            c.accepted();
        }
        c.ended(Ending::Refused);
        c.ended(Ending::Completed);
        c.ended(Ending::Failed);
        assert!(rx.try_recv().is_err(), "3 finished: below M");
        c.ended(Ending::Refused);
        let trip = rx.try_recv().expect("2 of 4 refused trips 50%");
        assert_eq!(
            (trip.campaign_id.as_str(), trip.finished, trip.refused),
            ("c", 4, 2)
        );
        c.ended(Ending::Refused);
        c.ended(Ending::Refused);
        assert!(rx.try_recv().is_err(), "trips at most once");

        let hand = book.open("hand", Some(rule(50, 1)));
        hand.accepted();
        hand.disarm();
        hand.ended(Ending::Refused);
        assert!(rx.try_recv().is_err(), "cancelled by hand: no trip");

        // A full queue loses no trip: the next end tries again.
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let book = CampaignBook::new(tx);
        let a = book.open("a", Some(rule(1, 1)));
        let b = book.open("b", Some(rule(1, 1)));
        a.ended(Ending::Refused);
        b.ended(Ending::Refused);
        assert_eq!(rx.try_recv().unwrap().campaign_id, "a");
        assert!(rx.try_recv().is_err());
        b.ended(Ending::Completed);
        assert_eq!(rx.try_recv().unwrap().campaign_id, "b");
    }

    #[test]
    fn only_car_refusal_codes_count_as_refused_in_the_store() {
        for code in [
            "UNKNOWN_FEATURE",
            "BASE_PLATFORM_FEATURE",
            "APPLY_FAILED",
            "EXPIRED",
        ] {
            assert!(refused_code(code), "{code}");
        }
        for code in [
            "NO_CONFIRMATION",
            "UNKNOWN_KEY",
            "CANCELLED",
            "DECOMMISSIONED",
            "",
        ] {
            assert!(!refused_code(code), "{code}");
        }
    }

    /// A store holding campaign `cid` with `rule` and requests ending as `ends` says
    /// (`None`: in flight; else the error code, `""` for COMPLETED).
    fn stored_campaign(store: &Store, rule: AbortWhen, ends: &[Option<&str>]) -> RequestId {
        use crate::store::{campaign_request_id, enc, new_uuid, CampaignRec};
        let cid = RequestId(new_uuid());
        let campaign_id = cid.to_string();
        let rec = CampaignRec {
            campaign_id: campaign_id.clone(),
            action: "ACTIVATE".into(),
            service_id: "autopilot".into(),
            total: ends.len(),
            created_at: "2026-12-07T00:00:00Z".into(),
        };
        store
            .campaigns
            .insert(abort_when_mark(&cid), enc(&rule))
            .unwrap();
        store.campaigns.insert(cid.0, enc(&rec)).unwrap();
        for (i, end) in (0u64..).zip(ends) {
            let rid = RequestId(campaign_request_id(&cid.0, i));
            let (status, code) = match end {
                None => ("IN_PROGRESS", None),
                Some("") => ("COMPLETED", None),
                Some(code) => ("FAILED", Some((*code).to_owned())),
            };
            let r = RequestRec {
                request_id: rid.to_string(),
                vin: format!("WVWZZZ1JZXW{i:06}"),
                action: "ACTIVATE".into(),
                service_id: "autopilot".into(),
                seq: 1,
                status: status.into(),
                phase: if end.is_some() { "DONE" } else { "SENDING" }.into(),
                attempts: 1,
                error_code: code,
                created_at: rec.created_at.clone(),
                updated_at: rec.created_at.clone(),
                completed_at: None,
                campaign_id: Some(campaign_id.clone()),
                grant: None,
                created_ms: 0,
            };
            store.requests.insert(rid.0, enc(&r)).unwrap();
        }
        cid
    }

    #[test]
    fn a_start_counts_refusals_again_and_trips_what_a_kill_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let book = CampaignBook::new(tx);
        let refused = Some("UNKNOWN_FEATURE");
        let offline = Some("NO_CONFIRMATION");
        let done = Some("");
        // 2 refusals, 1 completed, 2 out of attempts, 2 in flight: 2 of 5 finished.
        let ends = [refused, refused, done, offline, offline, None, None];
        let below = stored_campaign(&store, rule(50, 5), &ends);
        let c = rearm(&store, &book, &below.to_string()).expect("armed");
        assert_eq!(c.snapshot(), (2, 1, 4));
        assert!(rx.try_recv().is_err(), "40% < 50%: no trip");
        // Counted as refusals, the unconfirmed would trip it: they are not. One more
        // refusal does (3 of 6).
        c.ended(Ending::Refused);
        assert_eq!(rx.try_recv().unwrap().refused, 3);

        // A trip a kill cut off before its cancel was durable: at the start it trips again.
        let cut = stored_campaign(&store, rule(40, 5), &ends);
        rearm(&store, &book, &cut.to_string()).expect("armed");
        let trip = rx.try_recv().expect("trips at start");
        assert_eq!(
            (trip.campaign_id, trip.finished, trip.refused),
            (cut.to_string(), 5, 2)
        );

        // Its abort recorded, its cancel maybe cut short: handed over again, whatever the
        // counts.
        let recorded = stored_campaign(&store, rule(100, 5), &ends);
        store
            .campaigns
            .insert(aborted_mark(&recorded), vec![])
            .unwrap();
        store
            .campaigns
            .insert(cancel_mark(&recorded), vec![])
            .unwrap();
        rearm(&store, &book, &recorded.to_string()).expect("armed");
        assert_eq!(rx.try_recv().unwrap().campaign_id, recorded.to_string());

        // Cancelled by hand, or no rule: not armed.
        let by_hand = stored_campaign(&store, rule(1, 1), &ends);
        store
            .campaigns
            .insert(cancel_mark(&by_hand), vec![])
            .unwrap();
        assert!(rearm(&store, &book, &by_hand.to_string()).is_none());
        let ruleless = stored_campaign(&store, rule(1, 1), &ends);
        store.campaigns.remove(abort_when_mark(&ruleless)).unwrap();
        assert!(rearm(&store, &book, &ruleless.to_string()).is_none());
        assert!(rx.try_recv().is_err());
    }
}
