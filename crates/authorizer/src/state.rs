//! What the follower fills and checks read: the index, where it stands in the feed, how limits
//! are shared, and the check counters. Shared by reference between the feed follower, the
//! checks, the shared-limits sync and the usage writer; it depends on none of them.

use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::index::Index;
use crate::limits::Sharing;
use crate::model::Outcome;

/// The index and where it stands in the feed.
#[derive(Debug, Default)]
pub struct Shared {
    pub index: RwLock<Index>,
    /// Sequence of the last applied change or complete snapshot.
    pub sequence: AtomicI64,
    pub connected: AtomicBool,
    /// Whether a first snapshot has been loaded.
    pub loaded: AtomicBool,
    /// Told once the first snapshot is loaded (a permit waits if nobody is listening yet).
    pub loaded_notify: tokio::sync::Notify,
    /// Whether the quota counts stored in the database have been added to the index.
    pub quotas_restored: AtomicBool,
    pub quotas_restored_notify: tokio::sync::Notify,
    /// How limits are shared with other replicas (off without a shared store).
    pub sharing: Sharing,
    /// Checks answered, by outcome (in [`Outcome::ALL`] order).
    pub outcomes: [AtomicU64; Outcome::ALL.len()],
    /// When the feed was lost, while it is lost.
    lost_at: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Shared {
    pub fn count(&self, outcome: Outcome) {
        self.outcomes[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
        let mut lost_at = self.lost_at.lock().unwrap_or_else(|p| p.into_inner());
        match (connected, *lost_at) {
            (true, _) => *lost_at = None,
            (false, None) => *lost_at = Some(std::time::Instant::now()),
            (false, Some(_)) => {}
        }
    }

    /// How long the index has gone without the feed since it was lost; zero while connected
    /// (and before the first connection, while health says NOT_SERVING).
    pub fn stale_for(&self) -> Duration {
        if self.connected.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        self.lost_at.lock().unwrap_or_else(|p| p.into_inner()).map_or(Duration::ZERO, |at| at.elapsed())
    }
}
