//! Opening and closing the queue: the generation, the event log, the ledger's checks, the
//! state database, and what an unreadable generation leaves when damage is accepted. It never
//! opens on damaged files without `accept_loss`, and never deletes a damaged generation: it
//! is set aside.

use super::*;

impl Queue {
    /// Opens (or creates) the queue under `data_dir`. Fails with `Locked` if another process
    /// has it open.
    pub fn open(data_dir: &Path, settings: QueueSettings) -> Result<Arc<Queue>, QueueError> {
        let dir = data_dir.join("queue");
        // Every directory below is created durably (`store::create_dir_durable`) before
        // anything in it is acknowledged: a power cut must not take back `data_dir`, `queue/`
        // or a generation with the records in them.
        store::create_dir_durable(data_dir)?;
        store::create_dir_durable(&dir)?;
        let generation = match store::read_current(&dir)? {
            Some(g) => {
                store::check_current(&dir, g)?;
                g
            }
            None => {
                store::create_dir_durable(&store::generation_dir(&dir, 1))?;
                store::write_current(&dir, 1)?;
                1
            }
        };
        // What the files must hold, checked before anything below changes them.
        let expected = ledger::read(&dir)?;
        let events_dir = dir.join(EVENTS_DIR);
        let mut findings = Vec::new();
        if let Some(e) = &expected {
            findings.extend(ledger::check_segments(
                e,
                &events_dir,
                eventlog::segment_path,
            ));
        }
        let mut generation = generation;
        let mut generation_dir = store::generation_dir(&dir, generation);
        let mut set_aside = false;
        let st = match open_store(&generation_dir, generation, settings.cache_bytes) {
            // Accepting the loss of a database sled cannot read: it is set aside (kept, out
            // of the way) and a new, empty generation takes its place.
            Err(QueueError::Damaged(why)) if settings.accept_loss => {
                let aside = dir.join(format!("damaged-gen-{generation:06}"));
                std::fs::rename(&generation_dir, &aside)?;
                findings.push(ledger::Finding {
                    file: generation_dir.clone(),
                    what: format!(
                        "could not be read ({why}); set aside as {}: its undelivered attribute \
                         updates and memberships are lost",
                        aside.display()
                    ),
                    records: expected.as_ref().map(|e| e.tree_seq),
                });
                set_aside = true;
                generation += 1;
                generation_dir = store::generation_dir(&dir, generation);
                store::create_dir_durable(&generation_dir)?;
                store::write_current(&dir, generation)?;
                open_store(&generation_dir, generation, settings.cache_bytes)?
            }
            other => other?,
        };
        if let Some(e) = expected.as_ref().filter(|_| !set_aside) {
            findings.extend(ledger::check_tree(
                e,
                &generation_dir,
                next_seq_of(&st.tree)?,
            ));
        }
        let state_cache = (settings.cache_bytes / 4).max(4 << 20);
        // A fact is of use while it can spare a write (sent within the skip window) or guard
        // a dead letter of its attribute against a stale retry.
        let dead_keys = dead_attribute_keys(&st.tree)?;
        let window = settings.skip_unchanged_for;
        let now = now_ms();
        let keep = |key: &[u8], fact: &state::Settled| {
            window.is_some_and(|w| fact.sent_within(w, now)) || dead_keys.contains(key)
        };
        let compacted = state::compact(data_dir, state_cache, settings.compact_min_bytes, keep)?;
        if let Some(c) = compacted {
            tracing::info!(
                from_bytes = c.from_bytes,
                to_bytes = c.to_bytes,
                kept = c.kept,
                dropped = c.dropped,
                "state rebuilt without the facts no longer of use; disk space given back"
            );
        }
        let state = state::State::open(&data_dir.join(state::DIR), state_cache)?;
        // Only after our generation is open (and locked) is it safe to remove the others.
        store::remove_other_generations(&dir, generation)?;

        let counters = Counters::default();
        let (_, attributes, dead) = match st
            .tree
            .get(META_COUNTS)?
            .and_then(|v| format::decode_counts(&v))
        {
            Some(counts) => counts,
            // A database without stored counts (written before they were kept): count once;
            // the next batch writes them.
            None => {
                let count = |lane: u8| lane_records(&st.tree, lane).count() as u64;
                (0, count(LANE_ATTRIBUTES), count(DEAD))
            }
        };
        counters.attributes.store(attributes, Ordering::Relaxed);
        counters.dead.store(dead, Ordering::Relaxed);

        let gone = eventlog::gone_state(&st.tree)?;
        let (mut log, damage) = EventLog::open(&events_dir, &gone)?;
        // Opening cuts off a torn tail: never below what was synced. Segments already
        // found damaged above are not counted twice.
        if let Some(e) = &expected {
            let present: BTreeMap<u64, (u64, u64)> = e
                .segments
                .iter()
                .filter(|(id, _)| {
                    let path = eventlog::segment_path(&events_dir, **id);
                    path.exists() && findings.iter().all(|f| f.file != path)
                })
                .map(|(id, len)| (*id, *len))
                .collect();
            let after = ledger::Entries {
                segments: present,
                ..ledger::Entries::default()
            };
            findings.extend(ledger::check_segments(
                &after,
                &events_dir,
                eventlog::segment_path,
            ));
        }
        let ledger = open_ledger(&dir, &st, &log, expected, findings, settings.accept_loss)?;
        let mut next_seq = next_seq_of(&st.tree)?
            .max(log.end_seq())
            .max(gone.watermark)
            .max(gone.next_seq);
        migrate_sled_events(&st, &mut log)?;
        next_seq = next_seq.max(log.end_seq());
        if !damage.is_empty() {
            set_aside_damage(&st, &counters, damage, &mut next_seq)?;
        }
        counters.events.store(log.live(), Ordering::Relaxed);
        let pending_users = index_pending_users(&st)?;
        counters.disk_bytes.store(
            st.disk_bytes()
                + log.disk_bytes()
                + store::dir_bytes(&data_dir.join("state"))
                + store::dir_bytes(&data_dir.join("snapshots")),
            Ordering::Relaxed,
        );

        let store = Arc::new(RwLock::new(st));
        let log = Arc::new(Mutex::new(log));
        let sled_dirty = Arc::new(AtomicBool::new(false));
        let progress_unsynced = Arc::new(AtomicBool::new(false));
        // Two commit threads, so that an event never waits for a sled sync (which a snapshot
        // or a backfill can make long) and an attribute update never waits for the log's.
        let log_committer = {
            let (log, synced, due) = (Arc::clone(&log), Arc::clone(&ledger), Arc::clone(&ledger));
            let ledger_failing = AtomicBool::new(false);
            Committer::spawn(
                "queue-commit-log",
                move || {
                    let unsynced = log
                        .lock()
                        .expect("event log lock poisoned")
                        .take_unsynced()?;
                    synced.segments_synced(&unsynced.sync()?);
                    Ok(())
                },
                // Between commits: the ledger, when it has something new to say. A failure
                // is logged once per run of failures; the ledger then lags, which at worst
                // lets damage to the newest writes go unnamed.
                move || {
                    match due.write_if_due() {
                        Ok(()) => ledger_failing.store(false, Ordering::Relaxed),
                        Err(e) if !ledger_failing.swap(true, Ordering::Relaxed) => {
                            tracing::warn!(error = %e, "could not rewrite queue/LEDGER");
                        }
                        Err(_) => {}
                    }
                    Ok(())
                },
            )?
        };
        let committer = {
            let (store, sled_dirty, progress, synced_seq) = (
                Arc::clone(&store),
                Arc::clone(&sled_dirty),
                Arc::clone(&progress_unsynced),
                Arc::clone(&ledger),
            );
            let (progress_store, progress_flag) = (Arc::clone(&store), Arc::clone(&progress));
            Committer::spawn(
                "queue-commit",
                move || {
                    if sled_dirty.swap(false, Ordering::AcqRel) {
                        // The same sync carries whatever progress was written before it.
                        let progressed = progress.swap(false, Ordering::AcqRel);
                        let synced = sync_store(&store, &synced_seq);
                        if synced.is_err() {
                            sled_dirty.store(true, Ordering::Release);
                            progress.fetch_or(progressed, Ordering::AcqRel);
                        }
                        synced?;
                    }
                    Ok(())
                },
                move || {
                    if !progress_flag.swap(false, Ordering::AcqRel) {
                        return Ok(());
                    }
                    let synced = progress_store
                        .read()
                        .expect("queue store lock poisoned")
                        .sync();
                    if synced.is_err() {
                        progress_flag.store(true, Ordering::Release);
                    }
                    synced
                },
            )?
        };
        Ok(Arc::new(Queue {
            dir,
            settings,
            store,
            writer: Mutex::new(next_seq),
            leases: Mutex::new(Leases::default()),
            state,
            snapshot_dir: data_dir.join("snapshots"),
            state_dir: data_dir.join("state"),
            committer,
            log_committer,
            ledger,
            counters,
            work: tokio::sync::Notify::new(),
            log,
            sled_dirty,
            progress_unsynced,
            progress_written: Mutex::new(Instant::now()),
            storage_failure: Mutex::new(None),
            pending_users,
        }))
    }
}

/// Completes the `USER_PENDING` index of a database that lacks it (once, then marked), and
/// counts every user in it.
pub(super) fn index_pending_users(st: &Store) -> Result<pending_users::PendingUsers, QueueError> {
    if st.tree.get(format::META_USER_INDEX)?.is_none() {
        let mut batch = sled::Batch::default();
        let mut n = 0usize;
        for item in lane_records(&st.tree, LANE_ATTRIBUTES) {
            let (seq, value) = item?;
            // An undecodable record is set aside by the lease that meets it.
            if let Ok(stored) = decode(&value) {
                batch.insert(format::user_pending_key(stored.record.user(), seq), &[]);
                n += 1;
                if n.is_multiple_of(4096) {
                    st.tree.apply_batch(std::mem::take(&mut batch))?;
                }
            }
        }
        batch.insert(format::META_USER_INDEX, &[]);
        st.tree.apply_batch(batch)?;
        st.sync()?;
        if n > 0 {
            tracing::info!(records = n, "indexed the pending attribute updates by user");
        }
    }
    let users = pending_users::PendingUsers::default();
    for item in st.tree.scan_prefix([format::USER_PENDING]) {
        let (key, _) = item?;
        users.add(&key[..key.len().saturating_sub(8)]);
    }
    Ok(users)
}

/// Puts parts of the event log that can no longer be indexed into the dead letters (synced),
/// then seals them in their segments so the next open does not find them again.
pub(super) fn set_aside_damage(
    st: &Store,
    counters: &Counters,
    damage: Vec<eventlog::Damage>,
    next_seq: &mut u64,
) -> Result<(), QueueError> {
    let mut batch = sled::Batch::default();
    let change = CountChange {
        dead: damage.len() as i64,
        ..Default::default()
    };
    for d in &damage {
        let id = *next_seq;
        *next_seq += 1;
        tracing::error!(id, segment = %d.segment.display(), offset = d.offset, bytes = d.bytes.len(),
            error = %d.why, "part of the event log no longer reads; moved to the dead letters");
        let entry = Dead {
            dead_at_ms: now_ms(),
            attempts: 0,
            reason: format!("undecodable stored record: {}", d.why),
            stored: d.bytes.clone(),
        };
        batch.insert(&format::dead_key(id), encode_dead(&entry));
    }
    batch.insert(META_NEXT_SEQ, &next_seq.to_be_bytes());
    counters.stage(&mut batch, change);
    st.tree.apply_batch(batch)?;
    counters.apply(change);
    st.sync()?;
    for d in damage {
        d.seal()?;
    }
    Ok(())
}

impl Drop for Queue {
    /// A queue closed without `sync` (tests, commands) still records what left the log, so
    /// the next open does not send it again; sled flushes it as the database closes.
    fn drop(&mut self) {
        // A panic may have poisoned the locks this takes; a resend beats an abort.
        if std::thread::panicking() {
            return;
        }
        if let Err(e) = self.flush_progress() {
            tracing::warn!(error = %e, "could not record delivery progress at close");
        }
    }
}

/// Syncs sled and tells the ledger which high-water mark is now durable: read before the
/// sync, so that it is covered by it.
pub(super) fn sync_store(store: &RwLock<Store>, ledger: &ledger::Ledger) -> Result<(), QueueError> {
    let store = store.read().expect("queue store lock poisoned");
    let seq = next_seq_of(&store.tree)?;
    store.sync()?;
    ledger.tree_synced(seq);
    Ok(())
}

/// Opens a generation; a panic inside sled (a damaged file can cause one) becomes the same
/// clear error as any other damage.
pub(super) fn open_store(
    dir: &Path,
    generation: u64,
    cache_bytes: u64,
) -> Result<Store, QueueError> {
    // The default hook would print the panic as if the program had crashed; its message is
    // in the payload, and goes into the error. Only while opening, before anything else runs.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(|| Store::open(dir, generation, cache_bytes));
    std::panic::set_hook(hook);
    match opened {
        Ok(Err(QueueError::Storage(e))) => Err(QueueError::Damaged(format!(
            "{} cannot be opened ({e}). {}",
            dir.display(),
            DAMAGE_CHOICES
        ))),
        Ok(opened) => opened,
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            Err(QueueError::Damaged(format!(
                "{} cannot be read ({why}). {}",
                dir.display(),
                DAMAGE_CHOICES
            )))
        }
    }
}

/// What an operator can do about damaged files.
pub(super) const DAMAGE_CHOICES: &str = "Restore data_dir from a backup and start again; or start \
    anyway, giving up what is lost: `aiq-braze-sync run --accept-loss` once (or \
    AIQ_SYNC_ACCEPT_LOSS=1 in the service's environment), which logs each loss, counts it in \
    aiq_braze_sync_queue_lost_total, and starts.";

/// Settles the ledger at open: refuses damage unless `accept_loss`, and starts the ledger
/// from what it said (for files still there) or, after accepting a loss, from what is there.
pub(super) fn open_ledger(
    dir: &Path,
    st: &Store,
    log: &EventLog,
    expected: Option<ledger::Entries>,
    findings: Vec<ledger::Finding>,
    accept_loss: bool,
) -> Result<Arc<ledger::Ledger>, QueueError> {
    let present = |e: &ledger::Entries| -> BTreeMap<u64, (u64, u64)> {
        e.segments
            .iter()
            .filter(|(id, _)| eventlog::segment_path(log.dir(), **id).exists())
            .map(|(id, len)| (*id, *len))
            .collect()
    };
    if findings.is_empty() {
        let start = match &expected {
            Some(e) => ledger::Entries {
                segments: present(e),
                ..e.clone()
            },
            None => ledger::Entries::default(),
        };
        let ledger = ledger::Ledger::new(dir, start);
        ledger.write()?;
        return Ok(ledger);
    }
    if !accept_loss {
        let list: Vec<String> = findings.iter().map(|f| format!("- {f}")).collect();
        return Err(QueueError::Damaged(format!(
            "refusing to start: files do not hold what was stored in them (the record is {}):\n{}\n{}",
            dir.join(ledger::FILE).display(),
            list.join("\n"),
            DAMAGE_CHOICES
        )));
    }
    let mut lost = 0;
    for f in &findings {
        lost += f.records.unwrap_or(0);
        tracing::error!(file = %f.file.display(), loss = %f.what,
            "damaged queue file accepted (--accept-loss): what it lost will not be delivered");
    }
    // From what the files hold now, made durable first, so that the new record is true.
    st.sync()?;
    let expected = expected.unwrap_or_default();
    let mut segments = BTreeMap::new();
    for id in log.segment_ids() {
        if let Some(&(len, events)) = expected.segments.get(&id) {
            let now =
                std::fs::metadata(eventlog::segment_path(log.dir(), id)).map_or(0, |m| m.len());
            segments.insert(id, (len.min(now), events));
        }
    }
    let now = ledger::Entries {
        tree_seq: next_seq_of(&st.tree)?,
        segments,
        lost: expected.lost,
    };
    let ledger = ledger::Ledger::new(dir, now.clone());
    ledger.accept(now, lost)?;
    tracing::warn!(
        files = findings.len(),
        records_at_most = lost,
        "started on damaged files; the ledger now vouches for what is there"
    );
    Ok(ledger)
}
