//! Which users may have updates pending in the attribute lane: a counting filter over hashes
//! of users, so that leasing an event of a user with nothing pending reads no index.
//!
//! Invariant: a user with a record in the attribute lane counts above zero. A record adds one
//! when it is staged, before it can be leased; it takes one away only once its removal is in
//! the tree. Records replaced by a newer value, set aside as undecodable, or staged in a batch
//! that failed are never taken away: counts only ever err high, which costs an index read and
//! never an event sent ahead of its user's earlier update. Rebuilt from the index at open.
//! It owns counts only, never records: "none" is certain, "maybe" means read the index.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};

/// Slots: 4 MiB of counters. Past a million users with pending updates most slots are in use
/// and most events read the index, as they must during such a backfill.
const SLOTS: usize = 1 << 20;

pub struct PendingUsers {
    counts: Box<[AtomicU32]>,
}

impl Default for PendingUsers {
    fn default() -> Self {
        PendingUsers {
            counts: (0..SLOTS).map(|_| AtomicU32::new(0)).collect(),
        }
    }
}

impl PendingUsers {
    /// `user` is a user's `USER_PENDING` prefix (`format::user_pending_prefix`).
    fn slot(&self, user: &[u8]) -> &AtomicU32 {
        let mut h = rustc_hash::FxHasher::default();
        user.hash(&mut h);
        &self.counts[(h.finish() as usize) & (SLOTS - 1)]
    }

    pub fn add(&self, user: &[u8]) {
        self.slot(user).fetch_add(1, Ordering::AcqRel);
    }

    pub fn remove(&self, user: &[u8]) {
        let _ = self
            .slot(user)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Whether `user` may have a pending update (false: certainly none).
    pub fn maybe(&self, user: &[u8]) -> bool {
        self.slot(user).load(Ordering::Acquire) > 0
    }
}
