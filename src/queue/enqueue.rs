//! Durable enqueue: records are staged under the writer lock (a newer value of a pending
//! attribute replaces it; a value Braze was lately sent is skipped) and made durable by the
//! committers before the caller hears back. It never reports a request durable before the
//! commit that covers all of its records, and never stages a request that is over the bounds.

use super::*;

impl Queue {
    /// Durably queues every record, or none. Returns once they are on disk.
    pub async fn enqueue(&self, records: Vec<Record>) -> Result<(), QueueError> {
        self.enqueue_with(records, true).await
    }

    /// Since when, and why, writes to the disk have been failing (a full or failing disk);
    /// `None` once one succeeds again. `/readyz` reports it, and the daemon exits for a
    /// restart when it lasts (`commands::STORAGE_GIVE_UP`).
    pub fn storage_failure(&self) -> Option<(Instant, String)> {
        self.storage_failure
            .lock()
            .expect("storage failure lock poisoned")
            .clone()
    }

    /// While `storage_failure` is set: tries a small durable write (sled and the event log
    /// directory), and clears it if that works, so a disk that has room again is noticed
    /// without waiting for the next request. Blocking.
    pub fn probe_storage(&self) {
        if self.storage_failure().is_none() {
            return;
        }
        let probed = self.read_store().and_then(|store| {
            store
                .tree
                .insert(format::META_PROBE, &now_ms().to_be_bytes())?;
            store.sync()?;
            store::sync_dir(&self.dir.join(EVENTS_DIR))?;
            Ok(())
        });
        self.note_storage(&probed);
    }

    /// Records how a write to the disk went (see `storage_failure`).
    pub(super) fn note_storage<T>(&self, result: &Result<T, QueueError>) {
        let failed = match result {
            Err(e @ (QueueError::Sync(_) | QueueError::Storage(_) | QueueError::Io(_))) => {
                Some(e.to_string())
            }
            // Refusals say nothing of the disk.
            Err(_) => return,
            Ok(_) => None,
        };
        let mut state = self
            .storage_failure
            .lock()
            .expect("storage failure lock poisoned");
        match (failed, state.as_ref()) {
            (Some(why), None) => *state = Some((Instant::now(), why)),
            (Some(_), Some(_)) => {}
            (None, _) => *state = None,
        }
    }

    /// `enqueue`, where `skip_unchanged: false` queues every value even if Braze was sent it
    /// lately (a full snapshot, a repair): for when what was sent may not be what Braze holds.
    pub async fn enqueue_with(
        &self,
        records: Vec<Record>,
        skip_unchanged: bool,
    ) -> Result<(), QueueError> {
        if records.is_empty() {
            return Ok(());
        }
        let wrote = self.stage(&records, skip_unchanged)?;
        self.commit(wrote).await
    }

    /// `enqueue_with` for a large request, in two halves: this one stages the records,
    /// blocking, on the caller's thread (not the runtime's), a few hundred at a time so that
    /// the writer lock, which small requests take on the runtime's thread, is never held
    /// long; `commit_staged` then waits for them to be durable. The bounds are checked for
    /// the whole request first, so a request over them queues nothing.
    pub fn stage_blocking(
        &self,
        records: &[Record],
        skip_unchanged: bool,
    ) -> Result<Staged, QueueError> {
        self.check_bounds(records.len() as u64)?;
        let mut wrote = Wrote::default();
        for part in records.chunks(STAGE_AT_ONCE) {
            let inserted = self.insert(part, skip_unchanged);
            self.note_storage(&inserted);
            wrote = wrote.and(inserted?);
        }
        Ok(Staged(wrote))
    }

    /// The second half of `stage_blocking`: every record it staged is durable on return.
    pub async fn commit_staged(&self, staged: Staged) -> Result<(), QueueError> {
        self.commit(staged.0).await
    }

    /// The first half of `enqueue_with`: the records are in the store, not yet durable.
    /// Holds the writer lock while it runs, so callers with many records stage a few hundred
    /// at a time and `commit` once after several.
    pub(super) fn stage(
        &self,
        records: &[Record],
        skip_unchanged: bool,
    ) -> Result<Wrote, QueueError> {
        self.check_bounds(records.len() as u64)?;
        let inserted = self.insert(records, skip_unchanged);
        self.note_storage(&inserted);
        inserted
    }

    /// The second half: what `wrote` says was staged is durable when this returns.
    pub(super) async fn commit(&self, wrote: Wrote) -> Result<(), QueueError> {
        let committed = match (wrote.log, wrote.tree) {
            (true, true) => {
                let (log, tree) =
                    tokio::join!(self.log_committer.commit(), self.committer.commit());
                log.and(tree)
            }
            (true, false) => self.log_committer.commit().await,
            (false, true) => self.committer.commit().await,
            (false, false) => Ok(()),
        };
        self.note_storage(&committed);
        committed?;
        self.work.notify_waiters();
        Ok(())
    }

    /// The disk bound (`queue.max_disk_bytes`).
    pub fn max_disk_bytes(&self) -> u64 {
        self.settings.max_disk_bytes
    }

    /// Whether `incoming` more records fit the queue's bounds (records, disk, free-disk
    /// reserve); `Full` with the bound that does not hold if not.
    pub fn check_bounds(&self, incoming: u64) -> Result<(), QueueError> {
        let pending = self.pending();
        if pending + incoming > self.settings.max_records {
            return Err(QueueError::Full(format!(
                "{pending} records pending, bound is {} (queue.max_records)",
                self.settings.max_records
            )));
        }
        let bytes = self.counters.disk_bytes.load(Ordering::Relaxed);
        if bytes > self.settings.max_disk_bytes {
            return Err(QueueError::Full(format!(
                "{bytes} bytes on disk, bound is {} (queue.max_disk_bytes)",
                self.settings.max_disk_bytes
            )));
        }
        if self.settings.min_free_bytes > 0 {
            let free = store::free_bytes(&self.dir)?;
            if free < self.settings.min_free_bytes {
                return Err(QueueError::Full(format!(
                    "the disk holding the queue has {} MiB free, below the {} MiB reserve (queue.min_free_disk_mb)",
                    free >> 20,
                    self.settings.min_free_bytes >> 20
                )));
            }
        }
        Ok(())
    }

    pub(super) fn insert(
        &self,
        records: &[Record],
        skip_unchanged: bool,
    ) -> Result<Wrote, QueueError> {
        let store = self.read_store()?;
        let mut next_seq = self.writer.lock().expect("queue writer lock poisoned");
        let accepted_at = now_ms();
        let mut staging = Staging::new(self, &store.tree, &mut next_seq);
        if !skip_unchanged {
            staging.skip_unchanged_for = None;
        }
        let mut by_kind = [0u64; Kind::ALL.len()];
        for record in records {
            by_kind[record.kind() as usize] += 1;
            staging.add(record, encode(record, accepted_at))?;
        }
        let wrote = staging.apply()?;
        self.counters
            .accepted
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        for (kind, n) in Kind::ALL.into_iter().zip(by_kind) {
            self.counters.accepted_by_kind.add(kind, n);
        }
        Ok(wrote)
    }
}

/// What the latest-value index says of one user's attribute (`format::latest_value`).
#[derive(Debug, Clone)]
pub(super) struct Pending {
    /// The newest pending update.
    pub(super) seq: u64,
    /// The highest rank (`Stored::rank`) among the attribute's pending updates.
    pub(super) rank: u64,
    /// The newest pending update's object fields.
    pub(super) fields: Vec<u8>,
}

/// One atomic batch of new pending records. Plain values coalesce: a plain value replaces the
/// pending update of the same user and attribute (with the same object fields), whether that
/// is in the tree or earlier in this same batch.
pub(super) struct Staging<'a> {
    pub(super) tree: &'a sled::Tree,
    /// `Queue::pending_users`, counted up as records enter the attribute lane.
    pub(super) pending_users: &'a pending_users::PendingUsers,
    pub(super) log: &'a Mutex<EventLog>,
    pub(super) sled_dirty: &'a AtomicBool,
    /// The batch holds writes that an acknowledgement depends on (not only the high-water
    /// mark): it must be applied, and the commit must sync sled.
    pub(super) tree_writes: bool,
    pub(super) counters: &'a Counters,
    /// The queue's next sequence number (behind the writer lock), moved forward as each
    /// sub-batch lands, so numbers already written are never handed out again.
    pub(super) applied_seq: &'a mut u64,
    /// Records in `batch` not yet applied.
    pub(super) staged: usize,
    /// Consulted to skip an update whose value Braze was sent lately.
    pub(super) state: &'a state::State,
    /// `QueueSettings::skip_unchanged_for`.
    pub(super) skip_unchanged_for: Option<std::time::Duration>,
    pub(super) batch: sled::Batch,
    /// Events not yet framed: they go to the log as one chunk (`format::encode_event_chunk`).
    pub(super) chunk: Vec<(u64, Vec<u8>)>,
    pub(super) chunk_bytes: usize,
    /// Chunks for the event log: first seq, event count, payload.
    pub(super) frames: Vec<eventlog::Frame>,
    /// Latest-index entries this batch already set, so later records see them.
    pub(super) latest_here: HashMap<Vec<u8>, Pending>,
    pub(super) next_seq: u64,
    pub(super) events: u64,
    pub(super) attributes: u64,
    pub(super) coalesced: u64,
    pub(super) unchanged: u64,
    /// Dead letters this batch removes (a retry puts them back in a lane).
    pub(super) dead_removed: u64,
    /// What the commit must make durable.
    pub(super) wrote: Wrote,
}

/// Records a large request stages under the writer lock at a time (`stage_blocking`).
pub(super) const STAGE_AT_ONCE: usize = 500;

/// Records staged by `stage_blocking`, not yet durable: hand to `commit_staged`. Several
/// stagings combine (`and`) into one commit.
#[must_use = "staged records are not durable until commit_staged"]
#[derive(Default)]
pub struct Staged(Wrote);

impl Staged {
    pub fn and(self, other: Staged) -> Staged {
        Staged(self.0.and(other.0))
    }
}

/// Which stores a staging wrote to, so that its commit syncs those and only those.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Wrote {
    pub(super) log: bool,
    pub(super) tree: bool,
}

impl Wrote {
    pub(super) fn and(self, other: Wrote) -> Wrote {
        Wrote {
            log: self.log || other.log,
            tree: self.tree || other.tree,
        }
    }
}

impl<'a> Staging<'a> {
    pub(super) fn new(
        queue: &'a Queue,
        tree: &'a sled::Tree,
        applied_seq: &'a mut u64,
    ) -> Staging<'a> {
        let next_seq = *applied_seq;
        let (state, counters) = (&queue.state, &queue.counters);
        Staging {
            tree,
            pending_users: &queue.pending_users,
            log: &queue.log,
            sled_dirty: &queue.sled_dirty,
            tree_writes: false,
            frames: Vec::new(),
            counters,
            applied_seq,
            staged: 0,
            state,
            skip_unchanged_for: queue.settings.skip_unchanged_for,
            batch: sled::Batch::default(),
            chunk: Vec::new(),
            chunk_bytes: 0,
            latest_here: HashMap::new(),
            next_seq,
            events: 0,
            attributes: 0,
            coalesced: 0,
            unchanged: 0,
            dead_removed: 0,
            wrote: Wrote::default(),
        }
    }

    /// Removes a dead letter in this batch (a retry, or a retry found superseded).
    pub(super) fn remove_dead(&mut self, id: u64) {
        self.tree_writes = true;
        self.batch.remove(&format::dead_key(id));
        self.dead_removed += 1;
    }

    /// The pending updates of this user's attribute, if any.
    pub(super) fn pending(&self, latest: &[u8]) -> Result<Option<Pending>, QueueError> {
        Ok(match self.latest_here.get(latest) {
            Some(p) => Some(p.clone()),
            None => self.tree.get(latest)?.and_then(|v| {
                let (seq, rank, fields) = format::decode_latest(&v)?;
                Some(Pending {
                    seq,
                    rank,
                    fields: fields.to_vec(),
                })
            }),
        })
    }

    /// Adds a record (already encoded as `value`) under the next sequence number. Returns
    /// `false` when it changes nothing: no update of that attribute is pending or in flight,
    /// and Braze was last sent this very value (every attribute write is a billed data point:
    /// <https://www.braze.com/docs/user_guide/data_and_analytics/data_points/>).
    pub(super) fn add(&mut self, record: &Record, value: Vec<u8>) -> Result<bool, QueueError> {
        self.add_ranked(record, value, None)
    }

    /// `add`, for an update `retry-dead` puts back: `origin` is the seq it was first
    /// accepted under, and the stored envelope is marked with it (`format::with_origin`).
    pub(super) fn add_ranked(
        &mut self,
        record: &Record,
        value: Vec<u8>,
        origin: Option<u64>,
    ) -> Result<bool, QueueError> {
        let value = match origin {
            Some(origin) => format::with_origin(&value, origin),
            None => value,
        };
        let seq = self.next_seq;
        match record.attribute_name() {
            None => {
                self.chunk_bytes += value.len();
                self.chunk.push((seq, value));
                self.events += 1;
                if self.chunk_bytes >= CHUNK_BYTES {
                    self.close_chunk();
                }
            }
            Some(attribute) => {
                let lk = latest_key(record.user(), &attribute);
                let fields = record.object_fields().as_bytes();
                let plain = record.plain_value();
                let pending = self.pending(&lk)?;
                let unchanged = match (&pending, plain, self.skip_unchanged_for) {
                    (None, Some(p), Some(window)) => self
                        .state
                        .settled(&lk)?
                        .filter(|s| s.sent_within(window, now_ms()))
                        .and_then(|s| s.delivered)
                        .is_some_and(|d| d == p.as_bytes()),
                    _ => false,
                };
                // The highest rank pending for the attribute once this is added. A fresh update
                // is the newest; a retried one may sit behind updates accepted after it.
                let rank = match (origin, &pending) {
                    (None, _) => seq,
                    (Some(origin), Some(p)) => origin.max(p.rank),
                    (Some(origin), None) => origin,
                };
                match &pending {
                    // A plain value replaces whatever is pending before it, operations
                    // included, as long as both travel with the same object fields (an
                    // update-only write must not swallow one that creates the profile).
                    Some(p) if plain.is_some() && p.fields == fields => {
                        self.batch.remove(&record_key(LANE_ATTRIBUTES, p.seq));
                        // Its count stays: counts err high (`pending_users.rs`).
                        self.batch
                            .remove(format::user_pending_key(record.user(), p.seq));
                        self.coalesced += 1;
                    }
                    // Otherwise both stay, in order: the lease never takes a newer update
                    // of an attribute while an older one is pending or in flight.
                    Some(_) => self.attributes += 1,
                    None if unchanged => {
                        self.unchanged += 1;
                        self.counters.unchanged_by_kind.add(record.kind(), 1);
                        return Ok(false);
                    }
                    None => self.attributes += 1,
                }
                self.tree_writes = true;
                self.batch.insert(&record_key(LANE_ATTRIBUTES, seq), value);
                let user = format::user_pending_prefix(record.user());
                self.pending_users.add(&user);
                self.batch
                    .insert(format::user_pending_key(record.user(), seq), &[]);
                self.batch
                    .insert(lk.as_slice(), format::latest_value(seq, rank, fields));
                self.latest_here.insert(
                    lk,
                    Pending {
                        seq,
                        rank,
                        fields: fields.to_vec(),
                    },
                );
            }
        }
        self.next_seq += 1;
        self.staged += 1;
        if self.staged >= SUB_BATCH {
            self.flush()?;
        }
        Ok(true)
    }

    /// Applies what is staged: events to the log, the rest to sled. Big requests go to sled
    /// in sub-batches of `SUB_BATCH`: the memory sled 0.34.7 holds for small values given to
    /// it in one batch grows with the batch (BENCHMARKS.md, "Snapshot uploads and sled's
    /// memory with small values"). Nothing is acknowledged before the commit that follows, so
    /// a crash between sub-batches only means the client's retry sends some records twice (at
    /// least once), never a loss.
    pub(super) fn flush(&mut self) -> Result<(), QueueError> {
        self.close_chunk();
        if !self.frames.is_empty() {
            let frames = std::mem::take(&mut self.frames);
            let mut log = self.log.lock().expect("event log lock poisoned");
            log.append(frames)?;
            self.wrote.log = true;
            if self.dead_removed > 0 {
                // Dead letters moving back: their events must be durable before sled forgets
                // the dead letters, or a power cut between the two could lose both. Synced
                // under the lock, so no commit answers for these writes before they are.
                log.take_unsynced()?.sync()?;
            }
        }
        let change = CountChange {
            events: std::mem::take(&mut self.events) as i64,
            attributes: std::mem::take(&mut self.attributes) as i64,
            dead: -(std::mem::take(&mut self.dead_removed) as i64),
        };
        if std::mem::take(&mut self.tree_writes) {
            let mut batch = std::mem::take(&mut self.batch);
            batch.insert(META_NEXT_SEQ, &self.next_seq.to_be_bytes());
            self.counters.stage(&mut batch, change);
            self.tree.apply_batch(batch)?;
            self.sled_dirty.store(true, Ordering::Release);
            self.wrote.tree = true;
        }
        *self.applied_seq = self.next_seq;
        // Applied: later records find these in the tree.
        self.latest_here.clear();
        self.staged = 0;
        let c = self.counters;
        c.apply(change);
        c.coalesced
            .fetch_add(std::mem::take(&mut self.coalesced), Ordering::Relaxed);
        c.unchanged
            .fetch_add(std::mem::take(&mut self.unchanged), Ordering::Relaxed);
        Ok(())
    }

    /// Frames the events staged so far as one chunk under the first one's seq.
    pub(super) fn close_chunk(&mut self) {
        let Some(&(first, _)) = self.chunk.first() else {
            return;
        };
        let entries: Vec<(u64, &[u8])> = self.chunk.iter().map(|(s, e)| (*s, &e[..])).collect();
        self.frames
            .push((first, entries.len() as u32, event_value(first, &entries)));
        self.chunk.clear();
        self.chunk_bytes = 0;
    }

    /// Applies the batch atomically with the new sequence high-water mark; says what the
    /// commit must sync.
    pub(super) fn apply(mut self) -> Result<Wrote, QueueError> {
        self.flush()?;
        Ok(self.wrote)
    }
}
