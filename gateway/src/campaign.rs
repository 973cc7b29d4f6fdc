//! Live counts of each recent campaign's requests by state, for `GET /campaigns/{id}`.
//!
//! A campaign's requests are spread over every shard; counting them from the store on each
//! poll costs a read per request (100,000 reads for a large campaign, polled every few
//! milliseconds while it runs). Instead each accepted request carries its campaign's
//! counters and its shard moves them when the request is accepted and when it ends. The
//! book keeps the newest [`MAX_LIVE_CAMPAIGNS`] campaigns; an older one, or one from before
//! a restart, is counted from the store instead (still correct, only slower).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// Campaigns whose counts are kept live; older ones are counted from the store.
pub(crate) const MAX_LIVE_CAMPAIGNS: usize = 4096;

/// One campaign's requests by state.
#[derive(Debug, Default)]
pub(crate) struct CampaignCounts {
    in_progress: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
}

impl CampaignCounts {
    /// A request of the campaign was accepted.
    pub(crate) fn accepted(&self) {
        self.in_progress.fetch_add(1, Relaxed);
    }

    /// A request of the campaign ended (`ok`: completed, else failed).
    pub(crate) fn ended(&self, ok: bool) {
        // Saturating: a request can only end once, but never let a slip wrap the count.
        let _ = self
            .in_progress
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)));
        if ok {
            self.completed.fetch_add(1, Relaxed);
        } else {
            self.failed.fetch_add(1, Relaxed);
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
}

#[derive(Default)]
struct Book {
    live: HashMap<String, Arc<CampaignCounts>>,
    /// Campaign ids, oldest first (eviction order).
    order: VecDeque<String>,
}

impl CampaignBook {
    /// Starts counting a new campaign; evicts the oldest settled campaign (or, if none is
    /// settled, the oldest) when the book is full.
    pub(crate) fn open(&self, campaign_id: &str) -> Arc<CampaignCounts> {
        let counts = Arc::new(CampaignCounts::default());
        let Ok(mut book) = self.inner.lock() else {
            // A poisoned book only loses the fast path: GET counts from the store.
            return counts;
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
        book.live.insert(campaign_id.to_owned(), counts.clone());
        book.order.push_back(campaign_id.to_owned());
        counts
    }

    /// The live counts of `campaign_id`, if the book still keeps them.
    pub(crate) fn get(&self, campaign_id: &str) -> Option<Arc<CampaignCounts>> {
        self.inner.lock().ok()?.live.get(campaign_id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_requests_and_never_wrap() {
        let c = CampaignCounts::default();
        c.accepted();
        c.accepted();
        c.ended(true);
        assert_eq!(c.snapshot(), (1, 1, 0));
        c.ended(false);
        assert_eq!(c.snapshot(), (0, 1, 1));
        c.ended(false);
        assert_eq!(c.snapshot(), (0, 1, 2));
    }

    #[test]
    fn a_full_book_evicts_a_settled_campaign_first() {
        let book = CampaignBook::default();
        let first = book.open("c0");
        first.accepted(); // c0 still running
        for i in 1..MAX_LIVE_CAMPAIGNS {
            book.open(&format!("c{i}"));
        }
        assert!(book.get("c0").is_some() && book.get("c1").is_some());
        book.open("new");
        assert!(book.get("c0").is_some(), "a running campaign is kept");
        assert!(book.get("c1").is_none(), "the oldest settled one goes");
        assert!(book.get("new").is_some());
    }
}
