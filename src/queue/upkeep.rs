//! Upkeep: syncing, deleting drained event log segments, and rebuilding a drained generation
//! to give disk space back. It never deletes a segment before the tree that says it drained is
//! synced, and never removes the old generation before `CURRENT` names the new one.

use super::*;

impl Queue {
    /// Makes everything written so far durable (used at shutdown).
    pub async fn sync(&self) -> Result<(), QueueError> {
        self.flush_progress()?;
        self.sled_dirty.store(true, Ordering::Release);
        self.commit_all().await?;
        self.ledger.write()
    }

    /// Makes the log and sled durable, whatever was written.
    pub(super) async fn commit_all(&self) -> Result<(), QueueError> {
        let (log, tree) = tokio::join!(self.log_committer.commit(), self.committer.commit());
        log.and(tree)
    }

    /// Periodic upkeep: deletes drained event log segments, refreshes the disk size that the
    /// bound checks, and rebuilds the database into a new generation once a backlog has
    /// drained and left a large file. Blocking: run it off the async threads.
    pub fn maintain(&self) -> Result<Option<Compaction>, QueueError> {
        self.delete_drained_segments()?;
        let log_bytes = self
            .log
            .lock()
            .expect("event log lock poisoned")
            .disk_bytes();
        let bytes = self.read_store().map(|s| s.disk_bytes()).unwrap_or(0);
        if bytes > 0 {
            // The state and the snapshots are on the same disk and grow with use: they count
            // in `queue.max_disk_bytes` and in what stats show, like the queue itself.
            let others = store::dir_bytes(&self.state_dir) + store::dir_bytes(&self.snapshot_dir);
            self.counters
                .disk_bytes
                .store(bytes + log_bytes + others, Ordering::Relaxed);
        }
        let live = self.pending() + self.counters.dead.load(Ordering::Relaxed);
        let floor = self
            .settings
            .compact_min_bytes
            .max(self.counters.compacted_bytes.load(Ordering::Relaxed) * 4);
        // Rebuild only once what is left is small beside the file (at most one 4 KiB page's
        // worth per record), so the new generation starts near the live size.
        if live > COMPACT_MAX_LIVE.min(bytes / 4096) || bytes < floor {
            return Ok(None);
        }
        self.compact().map(Some)
    }

    /// Deletes event log segments that have drained, once sled (which says they have) is
    /// synced: a drained segment may hold events that went to the dead letters.
    pub fn delete_drained_segments(&self) -> Result<(), QueueError> {
        let ids = {
            let store = self.store.read().expect("queue store lock poisoned");
            let next_seq = self.writer.lock().expect("queue writer lock poisoned");
            let mut log = self.log.lock().expect("event log lock poisoned");
            // What says these segments drained goes into the tree before the sync below.
            self.write_progress(&store, &mut log, *next_seq)?;
            log.take_deletable()
        };
        if ids.is_empty() {
            return Ok(());
        }
        sync_store(&self.store, &self.ledger)?;
        // The ledger stops naming them first: a segment it names must exist.
        self.ledger.forget_segments(&ids)?;
        self.log
            .lock()
            .expect("event log lock poisoned")
            .delete_segments(ids);
        Ok(())
    }

    /// Copies the live keys into a fresh generation and switches to it. Holds the store lock
    /// for writing throughout, so no insert, lease or ack can fall between copy and switch.
    pub fn compact(&self) -> Result<Compaction, QueueError> {
        let started = std::time::Instant::now();
        let mut guard = self.store.write().expect("queue store lock poisoned");
        let from_bytes = guard.disk_bytes();
        let next = guard.generation + 1;
        let new_dir = store::generation_dir(&self.dir, next);
        if new_dir.exists() {
            std::fs::remove_dir_all(&new_dir)?;
        }
        let fresh = Store::open(&new_dir, next, self.settings.cache_bytes)?;
        let mut live_keys = 0u64;
        let mut batch = sled::Batch::default();
        for item in guard.tree.iter() {
            let (k, v) = item?;
            batch.insert(k, v);
            live_keys += 1;
            if live_keys.is_multiple_of(4096) {
                fresh.tree.apply_batch(std::mem::take(&mut batch))?;
            }
        }
        fresh.tree.apply_batch(batch)?;
        fresh.sync()?;
        store::sync_dir(&self.dir)?;
        store::write_current(&self.dir, next)?;
        let old = std::mem::replace(&mut *guard, fresh);
        let to_bytes = guard.disk_bytes();
        drop(guard);
        let pause = started.elapsed();
        let old_dir = old.dir.clone();
        drop(old);
        std::fs::remove_dir_all(&old_dir)?;
        self.counters.compactions.fetch_add(1, Ordering::Relaxed);
        self.counters
            .compacted_bytes
            .store(to_bytes, Ordering::Relaxed);
        self.counters.disk_bytes.store(to_bytes, Ordering::Relaxed);
        Ok(Compaction {
            from_bytes,
            to_bytes,
            live_keys,
            pause,
        })
    }
}
