//! Completing leases: what Braze took leaves the queue, what it refused goes to the dead
//! letters with its reason, what is to be retried stays where it was. A completion never
//! moves a retried record from its place in acceptance order.

use super::*;

impl Queue {
    /// Ends leases: removes what Braze took, dead-letters what it refused, and leaves the rest
    /// in place. Waits out a rebuild rather than failing: losing an ack only costs a duplicate,
    /// but there is no reason to.
    pub fn complete(&self, results: Vec<(Leased, Outcome)>) -> Result<(), QueueError> {
        if results.is_empty() {
            return Ok(());
        }
        // Before the writer lock, which ingest waits on: this state's own database, and its
        // facts may lead the queue's removal of the same records (they were delivered), so a
        // concurrent enqueue still sees them pending and queues a new value rather than
        // skipping it as unchanged.
        self.state.record_settled(
            results.iter().filter_map(|(item, outcome)| {
                let lk = item.latest.as_deref()?;
                let (rank, retried) = (item.stored.rank(item.seq), item.stored.origin.is_some());
                match outcome {
                    Outcome::Retry => None,
                    Outcome::Dead(_) => Some((lk, rank, retried, None)),
                    Outcome::Delivered => Some((
                        lk,
                        rank,
                        retried,
                        item.stored.record.plain_value().map(str::as_bytes),
                    )),
                }
            }),
            now_ms(),
        )?;
        self.settle(&results)?;

        let mut leases = self.leases.lock().expect("queue lease lock poisoned");
        let mut released = false;
        for (item, outcome) in results {
            leases.seqs.remove(&item.seq);
            if let Some(lk) = &item.latest {
                leases.attributes.remove(lk);
            }
            if outcome == Outcome::Retry {
                if item.lane == Lane::Attributes {
                    leases.attributes_from = leases.attributes_from.min(item.seq);
                }
                *leases.attempts.entry(item.seq).or_default() += 1;
            } else {
                leases.attempts.remove(&item.seq);
            }
            released |= item.latest.is_some();
        }
        drop(leases);
        if released {
            // A newer update of an attribute that was in flight may now be leased.
            self.work.notify_waiters();
        }
        Ok(())
    }

    /// Removes what left the queue among `results` and dead-letters what Braze refused, in
    /// one batch under the writer lock.
    pub(super) fn settle(&self, results: &[(Leased, Outcome)]) -> Result<(), QueueError> {
        let store = self.store.read().expect("queue store lock poisoned");
        // Events delivered (or to retry) change the tree only through the log's progress,
        // which may wait: they do not wait for the writer lock, which a large request's
        // staging can hold for a while, and write progress only when it is free.
        let events_only = results
            .iter()
            .all(|(item, o)| item.lane == Lane::Events && !matches!(o, Outcome::Dead(_)));
        let next_seq = if events_only {
            match self.writer.try_lock() {
                Ok(guard) => Some(guard),
                Err(std::sync::TryLockError::WouldBlock) => None,
                Err(std::sync::TryLockError::Poisoned(_)) => panic!("queue writer lock poisoned"),
            }
        } else {
            Some(self.writer.lock().expect("queue writer lock poisoned"))
        };
        let mut batch = sled::Batch::default();
        let mut change = CountChange::default();
        // Events leave their chunks together, one index update per chunk.
        let mut events: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        // Only event progress to record: no batch needed (see below).
        let mut tree_ops = false;
        // Users whose attribute-lane records this batch removes: their counts go down once
        // it is applied.
        let mut users_done = Vec::new();
        let mut log = self.log.lock().expect("event log lock poisoned");
        for (item, outcome) in results {
            if item.lane == Lane::Events {
                if let Some(chunk) = log.chunk_mut(item.key_seq) {
                    chunk.leased = chunk.leased.saturating_sub(1);
                }
                if *outcome != Outcome::Retry {
                    events.entry(item.key_seq).or_default().push(item.seq);
                }
                continue;
            }
            if *outcome == Outcome::Retry {
                continue;
            }
            let key = record_key(item.lane.key_prefix(), item.seq);
            tree_ops = true;
            // An attribute update may have been superseded (removed) while in flight.
            if store.tree.contains_key(key)? {
                batch.remove(&key);
                let user = item.stored.record.user();
                batch.remove(format::user_pending_key(user, item.seq));
                users_done.push(format::user_pending_prefix(user));
                change.attributes -= 1;
                if let Outcome::Dead(reason) = outcome {
                    batch.insert(&format::dead_key(item.seq), dead_entry(item, reason));
                    change.dead += 1;
                }
            }
            if let Some(lk) = &item.latest {
                if store.tree.get(lk)?.and_then(|v| seq_of_value(&v)) == Some(item.seq) {
                    batch.remove(lk.as_slice());
                }
            }
        }
        let mut removed = FxHashSet::default();
        for (first, seqs) in events {
            removed.extend(log.mark_gone(first, &seqs));
        }
        change.events -= removed.len() as i64;
        for (item, outcome) in results {
            if let (Lane::Events, Outcome::Dead(reason)) = (item.lane, outcome) {
                if removed.contains(&item.seq) {
                    batch.insert(&format::dead_key(item.seq), dead_entry(item, reason));
                    change.dead += 1;
                    tree_ops = true;
                }
            }
        }
        // A batch goes to the tree anyway: progress rides along. Otherwise it waits for
        // `PROGRESS_EVERY`.
        let gone = match &next_seq {
            Some(next_seq) if tree_ops || self.progress_due() => log.gone_value(**next_seq),
            _ => None,
        };
        drop(log);
        if tree_ops {
            if let Some(gone) = gone {
                batch.insert(format::META_EVENTS_GONE, gone);
            }
            self.counters.stage(&mut batch, change);
            store.tree.apply_batch(batch)?;
            for user in &users_done {
                self.pending_users.remove(user);
            }
            self.progress_unsynced.store(true, Ordering::Release);
        } else if let Some(gone) = gone {
            // One key, not a batch: sled 0.34 seals its log buffer for every multi-key batch
            // (one write and one sync_file_range each), which a single insert does not, and
            // this runs for every delivered request of events.
            store.tree.insert(format::META_EVENTS_GONE, gone)?;
            self.progress_unsynced.store(true, Ordering::Release);
        }
        self.counters.apply(change);
        Ok(())
    }

    /// Whether a completion of events alone should write the log's progress now.
    pub(super) fn progress_due(&self) -> bool {
        let mut last = self
            .progress_written
            .lock()
            .expect("progress time lock poisoned");
        let due = last.elapsed() >= PROGRESS_EVERY;
        if due {
            *last = Instant::now();
        }
        due
    }

    /// Writes what has left the log, if anything has since it was last written. Call with the
    /// writer lock held (`next_seq` is its value).
    pub(super) fn write_progress(
        &self,
        store: &Store,
        log: &mut EventLog,
        next_seq: u64,
    ) -> Result<(), QueueError> {
        if let Some(gone) = log.gone_value(next_seq) {
            store.tree.insert(format::META_EVENTS_GONE, gone)?;
            self.progress_unsynced.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Writes the log's progress now (at shutdown and close).
    pub(super) fn flush_progress(&self) -> Result<(), QueueError> {
        let store = self.store.read().expect("queue store lock poisoned");
        let next_seq = self.writer.lock().expect("queue writer lock poisoned");
        let mut log = self.log.lock().expect("event log lock poisoned");
        self.write_progress(&store, &mut log, *next_seq)
    }
}

pub(super) fn dead_entry(item: &Leased, reason: &str) -> Vec<u8> {
    encode_dead(&Dead {
        dead_at_ms: now_ms(),
        attempts: item.attempts + 1,
        reason: reason.to_string(),
        stored: item
            .raw
            .clone()
            .unwrap_or_else(|| encode(&item.stored.record, item.stored.accepted_at_ms)),
    })
}
