//! The durable queue: the only module that touches sled.
//!
//! # Design
//!
//! **Durability.** `enqueue` appends a request's events to the event log (`eventlog.rs`) and
//! puts its attribute updates in one atomic sled batch, then waits for the group committers
//! (`commit.rs`) of what it wrote: one thread `fdatasync`s the log, another runs sled
//! `flush()` and our own `fdatasync`, each sync shared by every request waiting on that thread
//! at that moment. Only then does ingest answer 2xx. The two threads are apart so that an
//! event never waits for a sled sync a snapshot or backfill made long. Removals (a record Braze took) are not synced; if a crash loses one, the
//! record is sent again (at least once). sled recovers a prefix of its log, so a lost removal
//! can never outlive a later insert.
//!
//! **What each guarantee relies on.** A file's data is durable after its fsync; its name is
//! durable only after an fsync of its directory, and a directory's own name after an fsync
//! of its parent. So:
//!
//! | operation | durable through |
//! |---|---|
//! | the queue existing at all | `store::create_dir_durable` at open: `data_dir` and its parent, `queue/`, the generation, `queue/events/`, `state/` are each synced with their parent before anything is accepted |
//! | acknowledging events | `fdatasync` of the segments written; a new segment's name, an fsync of `queue/events/` in the same commit |
//! | acknowledging attribute updates | sled `flush()` and `fdatasync` of the generation's `db`; new sled blob files `fdatasync`'d and `blobs/` synced; a changed set of sled snapshot files, an fsync of the generation directory (`Store::sync`) |
//! | a sled database's files (`conf`, `db`, `blobs/`) | `store::open_sled_durably`: `conf` and the directory synced once sled has created them |
//! | switching generation | the new one synced (data and directory), `queue/` synced, then `CURRENT` replaced by write, fsync, rename, fsync of `queue/` |
//! | a snapshot becoming the reference | the member file `fdatasync`'d and its directory synced, then `CURRENT` replaced as above; `snapshots/` and the split's directory created durably |
//! | deleting drained segments | the tree saying they drained is synced first; the deletion needs no sync: a segment that comes back is skipped, its chunks below the durable watermark |
//! | removing the old generation | none: `CURRENT` names the new one, and a leftover is removed at the next open |
//! | delivery progress, removals | never waited for: written at most `PROGRESS_EVERY` after a completion, synced by the committer at most `commit::PROGRESS_SYNC_EVERY` later. A cut resends what it lost (at least once) |
//! | `state/` | never synced by us: sled's flusher fsyncs it every second; it may lag, never lead |
//!
//! **Layout.** Events are in `DATA_DIR/queue/events/`, segment files of frames, one frame per
//! request's chunk of events (`eventlog.rs`). `DATA_DIR/queue/CURRENT` names the live
//! generation `DATA_DIR/queue/gen-NNNNNN/`, a sled database with one tree, `queue`, whose keys
//! are:
//!
//! | key | value |
//! |---|---|
//! | `00 'n'` | next sequence number, u64 big-endian (ids never repeat) |
//! | `00 'c'` | records in the attribute lane and the dead letters (the first of 3 × u64 BE, once events, is unused), kept in step by every batch |
//! | `00 'w'` | what has left the event log: its watermark (every chunk whose first seq is below it has left), the next seq, and markers for chunks above the watermark partly or wholly gone (`eventlog::GoneState`) |
//! | `01 seq` | events of a release before the event log, moved into it at open |
//! | `02 seq` | a pending membership update (lane 2, backfills) |
//! | `03 kind len id attribute` | the seq of the newest pending update of that user's attribute, then its object fields |
//! | `04 seq` | a dead-lettered record with Braze's reason |
//! | `05 kind len id seq` | one key per attribute-lane record, by user: an event's lease finds its user's earlier pending updates and carries them in the same request (Braze applies attributes first) |
//! | `00 'u'` | the `05` index is complete (built once at open for a database from before it) |
//! | `00 'p'` | when a storage probe last wrote (`probe_storage`) |
//!
//! `seq` is big-endian so iteration order is acceptance order. Values start with a format
//! version byte (`format.rs`); bincode is not self-describing, so a new record shape gets a
//! new version instead of a changed struct.
//!
//! **Attributes are state, events are a log.** A membership or attribute update with a plain
//! value replaces the pending update of the same user and attribute (the `03` index), so a
//! flip-flopping user costs one Braze write. Operations (`add`/`remove` on arrays, nested
//! `$` operators, `inc`) and updates with different object fields (`_update_existing_only`)
//! are not replaced: several may be pending, and they are leased strictly in acceptance
//! order. Events and purchases are all kept, in the event log, in chunks of up to
//! `CHUNK_BYTES`: appended once, never rewritten. A delivery records which events left (the
//! `00 'w'` key); a segment goes once all of its events have.
//!
//! **Leases** live in memory only. A worker leases records; they stay in sled until the worker
//! completes them: delivered (removed), dead (moved to `04` with the reason) or retry (left in
//! place, in order). A crash drops every lease, so every record not yet removed is pending
//! again at restart. While one update of an attribute is in flight, no newer update of the same
//! user and attribute is leased, so Braze receives them in acceptance order whatever the
//! number of workers and retries.
//!
//! **Giving disk back.** sled never shrinks its files. Long-lived per-attribute state lives in
//! its own database under `DATA_DIR/state/` (`state.rs`), audience snapshots in sorted files
//! under `DATA_DIR/snapshots/` (`crate::snapshot`); the queue holds only what churns. Once a backlog has
//! drained and the generation is large, `maintain` copies the few live keys into the next
//! generation, syncs it, switches `CURRENT` and deletes the old directory. Ingest answers
//! 503 with `Retry-After` for that moment (`QueueError::Busy`).
//!
//! **Operators** list pending and dead records, retry or purge dead ones (`admin.rs`). A
//! retried update goes to the back of its lane with a new sequence number, unless a newer
//! update of the same user and attribute was accepted since: then it is dropped as superseded,
//! so an old `true` never overwrites a newer `false`.

mod admin;
pub use admin::{PurgeReport, RecordView, RetryReport, Selection};
mod commit;
mod eventlog;
pub mod format;
mod ledger;
mod pending_users;
mod state;
mod store;

/// Making files durable (sync a directory, create one durably, replace a file atomically):
/// shared with the snapshots, which keep their files beside the queue.
pub mod durable {
    pub use super::store::{create_dir_durable, sync_dir, write_atomically};
}

pub use store::dir_bytes;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::record::{Kind, PerKind, Record, UserId};
use commit::Committer;
use eventlog::EventLog;
use format::{
    decode, encode, encode_dead, latest_key, record_key, seq_of, Dead, Stored, DEAD,
    LANE_ATTRIBUTES, LANE_EVENTS, META_COUNTS, META_NEXT_SEQ,
};
use rustc_hash::{FxHashMap, FxHashSet};
use store::Store;

/// Records per sled batch within one enqueue; see `Staging::flush`.
const SUB_BATCH: usize = 1000;

/// An event chunk (one frame of the event log) is closed once its envelopes reach this size:
/// about a Braze request's worth of events, so a lease reads little beyond what it takes,
/// while the index of a 10 million event backlog stays a few hundred thousand entries.
const CHUNK_BYTES: usize = 7 << 10;

/// A rebuild copies the live keys with ingest paused, so it waits until at most this many are
/// left (a few milliseconds of copying).
const COMPACT_MAX_LIVE: u64 = 10_000;

/// A completion of events alone writes what has left the log at most this often; the daemon's
/// upkeep and every other write to the tree carry it in between. Never synced anyway, so this
/// only widens a crash's resend window by as much, and a write per delivered request was a
/// twentieth of the daemon's CPU end to end.
const PROGRESS_EVERY: Duration = Duration::from_millis(20);

/// The event log's directory under `DATA_DIR/queue/`, beside the sled generations.
const EVENTS_DIR: &str = "events";

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The queue is at its configured bound. Ingest answers 503; nothing accepted is lost.
    #[error("queue is full: {0}")]
    Full(String),
    /// The queue is being rebuilt to give disk space back; try again in a moment.
    #[error("queue is being compacted; try again in a moment")]
    Busy,
    /// Another process holds the database (sled locks its directory exclusively).
    #[error("the queue database at {path} is locked by another process{}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Locked { path: PathBuf, pid: Option<u32> },
    /// Making writes durable failed: the disk is full or failing. Nothing was acknowledged.
    #[error("could not make the queue durable: {0}")]
    Sync(String),
    #[error("the queue is closed")]
    Closed,
    #[error("queue database is corrupt: {0}")]
    Corrupt(String),
    /// Files do not hold what the ledger says was stored in them, or cannot be read.
    #[error("the queue's files are damaged: {0}")]
    Damaged(String),
    #[error("queue storage error: {0}")]
    Storage(#[from] sled::Error),
    #[error("queue I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl QueueError {
    fn from_sled_open(dir: &Path, e: sled::Error) -> QueueError {
        match e {
            sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                let pid = dir
                    .ancestors()
                    .nth(2)
                    .and_then(|data_dir| std::fs::read_to_string(data_dir.join(PID_FILE)).ok())
                    .and_then(|s| s.trim().parse().ok());
                QueueError::Locked {
                    path: dir.to_path_buf(),
                    pid,
                }
            }
            other => QueueError::Storage(other),
        }
    }
}

/// The daemon writes its pid here so that a second process can say who holds the lock.
pub const PID_FILE: &str = "daemon.pid";

/// Bounds and tuning that the configuration decides.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    pub max_records: u64,
    pub max_disk_bytes: u64,
    pub cache_bytes: u64,
    pub compact_min_bytes: u64,
    /// Ingest is refused while the filesystem holding the queue has less than this free, so
    /// that sled never meets a full disk mid-write: sled 0.34 treats a failed write as fatal
    /// for the open database, which would stop delivery too. Removals and rebuilds (which give
    /// space back) use the reserve.
    pub min_free_bytes: u64,
    /// An update whose value is the one Braze was last sent is skipped only if that was sent
    /// within this long; `None` never skips. A 201 does not prove Braze holds the value (an
    /// update-only write for a profile it does not have changes nothing, and other writers
    /// change profiles too), so what was sent is a cache that expires, not the truth.
    pub skip_unchanged_for: Option<std::time::Duration>,
    /// Open even if files are damaged (`run --accept-loss`): what is lost is logged and
    /// counted (`Stats::lost_total`), and the ledger starts over from what is there.
    pub accept_loss: bool,
}

/// How much one Braze request may carry.
#[derive(Debug, Clone)]
pub struct BatchLimits {
    pub max_objects: usize,
    /// Legacy accounts: `max_objects` per array instead of in total.
    pub per_array: bool,
    pub max_bytes: usize,
}

/// The queue's two lanes. Events are real time: they live in the event log and every one is
/// delivered. Attribute updates (memberships included) are state: they live in sled, and a
/// newer value of a user's attribute replaces a pending one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    Events,
    Attributes,
}

impl Lane {
    /// The first byte of the lane's keys in sled (`format.rs`).
    fn key_prefix(self) -> u8 {
        match self {
            Lane::Events => LANE_EVENTS,
            Lane::Attributes => LANE_ATTRIBUTES,
        }
    }
}

impl AsRef<Record> for Leased {
    fn as_ref(&self) -> &Record {
        &self.stored.record
    }
}

/// A record handed to a worker. It stays in the queue until `complete` says otherwise.
#[derive(Debug, Clone)]
pub struct Leased {
    pub seq: u64,
    pub lane: Lane,
    /// The sequence number in the key of the value that holds it: its own, or its event
    /// chunk's first.
    key_seq: u64,
    pub stored: Stored,
    /// Deliveries tried since this daemon started.
    pub attempts: u32,
    /// The envelope as stored, kept for the dead-letter entry. `None` for an event: it is
    /// written again from the record (`EVENT_V3` has one encoding), which spares every
    /// delivered event a copy.
    raw: Option<Vec<u8>>,
    latest: Option<Vec<u8>>,
}

/// What became of a leased record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Braze took it: remove it.
    Delivered,
    /// Braze refused this record for itself: move it to the dead letters with the reason.
    Dead(String),
    /// Not delivered this time: leave it where it is, in order.
    Retry,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Stats {
    pub pending: u64,
    pub pending_events: u64,
    pub pending_attributes: u64,
    pub in_flight: u64,
    pub dead: u64,
    pub oldest_pending_age_ms: Option<u64>,
    pub disk_bytes: u64,
    pub generation: u64,
    pub accepted_total: u64,
    pub coalesced_total: u64,
    pub skipped_unchanged_total: u64,
    pub compactions_total: u64,
    /// Records given up for lost when damaged files were accepted (`run --accept-loss`), at
    /// most; kept in the ledger across restarts.
    pub lost_total: u64,
    /// Per kind (membership, attribute, event, purchase), since the daemon started.
    pub accepted_by_kind: std::collections::BTreeMap<String, u64>,
    pub skipped_unchanged_by_kind: std::collections::BTreeMap<String, u64>,
}

/// What one rebuild did, for the log.
#[derive(Debug, Clone)]
pub struct Compaction {
    pub from_bytes: u64,
    pub to_bytes: u64,
    pub live_keys: u64,
    pub pause: Duration,
}

#[derive(Default)]
struct Leases {
    seqs: FxHashSet<u64>,
    attributes: HashSet<Vec<u8>>,
    attempts: FxHashMap<u64, u32>,
    /// Every attribute update below this seq is leased: a lease scans the lane from here, not
    /// from its start. Walking sled past the batches other workers hold was two thirds of a
    /// membership lease. Only a lease moves it up, over records it finds leased or takes
    /// itself; an update handed back for a retry moves it down.
    attributes_from: u64,
}

#[derive(Default)]
struct Counters {
    events: AtomicU64,
    attributes: AtomicU64,
    dead: AtomicU64,
    accepted: AtomicU64,
    coalesced: AtomicU64,
    /// Attribute updates not queued: Braze already had that value.
    unchanged: AtomicU64,
    accepted_by_kind: PerKind,
    unchanged_by_kind: PerKind,
    compactions: AtomicU64,
    disk_bytes: AtomicU64,
    /// Size right after the last rebuild; the next one waits until the file has grown well
    /// past it, so a queue that is small but busy is not rebuilt over and over.
    compacted_bytes: AtomicU64,
}

/// A change in how many records each lane and the dead letters hold.
#[derive(Clone, Copy, Default)]
struct CountChange {
    events: i64,
    attributes: i64,
    dead: i64,
}

impl Counters {
    /// Puts the counts as they will be once `batch` is applied into `batch` itself, so the
    /// stored counts always match what sled holds. Call with the writer lock held.
    fn stage(&self, batch: &mut sled::Batch, change: CountChange) {
        let after = |c: &AtomicU64, d: i64| c.load(Ordering::Relaxed).saturating_add_signed(d);
        batch.insert(
            META_COUNTS,
            &format::encode_counts(
                after(&self.events, change.events),
                after(&self.attributes, change.attributes),
                after(&self.dead, change.dead),
            ),
        );
    }

    /// The same change, in memory, once the batch is applied.
    fn apply(&self, change: CountChange) {
        let add = |c: &AtomicU64, d: i64| {
            if d >= 0 {
                c.fetch_add(d as u64, Ordering::Relaxed);
            } else {
                c.fetch_sub(d.unsigned_abs(), Ordering::Relaxed);
            }
        };
        add(&self.events, change.events);
        add(&self.attributes, change.attributes);
        add(&self.dead, change.dead);
    }
}

pub struct Queue {
    dir: PathBuf,
    settings: QueueSettings,
    /// Readers hold it for one short synchronous operation; the rebuild holds it for writing
    /// while it swaps generations. A std lock: it is never held across an await.
    store: Arc<RwLock<Store>>,
    /// Serialises every change to the tree (enqueue, complete, quarantine) so that the
    /// read-modify-write of the latest-value index and the sequence numbers stay consistent.
    writer: Mutex<u64>,
    leases: Mutex<Leases>,
    /// Per-attribute facts that outlive the queue; see `state.rs`.
    state: state::State,
    /// `DATA_DIR/snapshots` (`crate::snapshot`), counted in the disk bound.
    snapshot_dir: PathBuf,
    /// `DATA_DIR/state`: `state.rs`'s database, counted in the disk bound.
    state_dir: PathBuf,
    /// Makes sled durable (attribute updates, dead letters, delivery progress).
    committer: Committer,
    /// Makes the event log durable.
    log_committer: Committer,
    /// What the files must hold (`ledger.rs`), kept by both commit threads.
    ledger: Arc<ledger::Ledger>,
    counters: Counters,
    work: tokio::sync::Notify,
    /// The events lane (`eventlog.rs`). Locked inside `writer` and `leases`, never around
    /// them, and never across a sync.
    log: Arc<Mutex<EventLog>>,
    /// sled holds writes that an acknowledgement depends on (attribute updates, dead letters
    /// moved back): the next commit must sync sled too, not only the event log.
    sled_dirty: Arc<AtomicBool>,
    /// Delivery progress (removals, what left the log) was written to sled and not yet
    /// synced: the committer syncs it within `commit::PROGRESS_SYNC_EVERY`.
    progress_unsynced: Arc<AtomicBool>,
    /// When a completion last wrote the log's progress (`PROGRESS_EVERY`).
    progress_written: Mutex<Instant>,
    /// `storage_failure`.
    storage_failure: Mutex<Option<(Instant, String)>>,
    /// Users that may have attribute updates pending (`pending_users.rs`).
    pending_users: pending_users::PendingUsers,
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
fn sync_store(store: &RwLock<Store>, ledger: &ledger::Ledger) -> Result<(), QueueError> {
    let store = store.read().expect("queue store lock poisoned");
    let seq = next_seq_of(&store.tree)?;
    store.sync()?;
    ledger.tree_synced(seq);
    Ok(())
}

/// Opens a generation; a panic inside sled (a damaged file can cause one) becomes the same
/// clear error as any other damage.
fn open_store(dir: &Path, generation: u64, cache_bytes: u64) -> Result<Store, QueueError> {
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
const DAMAGE_CHOICES: &str = "Restore data_dir from a backup and start again; or start \
    anyway, giving up what is lost: `aiq-braze-sync run --accept-loss` once (or \
    AIQ_SYNC_ACCEPT_LOSS=1 in the service's environment), which logs each loss, counts it in \
    aiq_queue_lost_total, and starts.";

/// Settles the ledger at open: refuses damage unless `accept_loss`, and starts the ledger
/// from what it said (for files still there) or, after accepting a loss, from what is there.
fn open_ledger(
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

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
            // A database from before the counts were kept: count once; the next batch
            // writes them.
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

    fn read_store(&self) -> Result<std::sync::RwLockReadGuard<'_, Store>, QueueError> {
        match self.store.try_read() {
            Ok(guard) => Ok(guard),
            Err(std::sync::TryLockError::WouldBlock) => Err(QueueError::Busy),
            Err(std::sync::TryLockError::Poisoned(_)) => panic!("queue store lock poisoned"),
        }
    }

    /// Durably queues every record, or none. Returns once they are on disk.
    pub async fn enqueue(&self, records: Vec<Record>) -> Result<(), QueueError> {
        self.enqueue_with(records, true).await
    }

    /// Since when, and why, writes to the disk have been failing (a full or failing disk);
    /// `None` once one succeeds again. `/readyz` reports it, and the daemon exits for a
    /// restart when it lasts (`daemon::STORAGE_GIVE_UP`).
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
    fn note_storage<T>(&self, result: &Result<T, QueueError>) {
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
    fn stage(&self, records: &[Record], skip_unchanged: bool) -> Result<Wrote, QueueError> {
        self.check_bounds(records.len() as u64)?;
        let inserted = self.insert(records, skip_unchanged);
        self.note_storage(&inserted);
        inserted
    }

    /// The second half: what `wrote` says was staged is durable when this returns.
    async fn commit(&self, wrote: Wrote) -> Result<(), QueueError> {
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

    fn insert(&self, records: &[Record], skip_unchanged: bool) -> Result<Wrote, QueueError> {
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

    /// Leases the oldest pending records that fit in one Braze request: events first (they are
    /// real time), then membership updates, skipping any attribute whose earlier update is in
    /// flight. Reads lazily from sled; never loads the whole queue.
    pub fn lease(&self, limits: &BatchLimits) -> Result<Vec<Leased>, QueueError> {
        self.lease_lanes(limits, true)
    }

    /// As `lease`, but with `memberships: false` only events are taken: delivery keeps a
    /// worker for events this way, so a backfill never makes an event wait behind it.
    pub fn lease_lanes(
        &self,
        limits: &BatchLimits,
        memberships: bool,
    ) -> Result<Vec<Leased>, QueueError> {
        let store = self.read_store()?;
        let mut leases = self.leases.lock().expect("queue lease lock poisoned");
        let mut out = Vec::with_capacity(limits.max_objects);
        let mut undecodable = Vec::new();
        let mut bytes = 0usize;

        let max_events = limits.max_objects;
        let mut events = 0usize;
        // Braze objects for attribute updates in this request (carried ones first), keyed as
        // the request builder groups them; see the attribute lane below.
        let mut users: HashSet<(UserId, bool, String)> = HashSet::new();
        // Users whose events wait for a later lease: an earlier update of theirs could not be
        // carried in this one.
        let mut held: HashSet<UserId> = HashSet::new();
        // Objects counted against the limit besides events (none on per-array accounts).
        let others = |users: &HashSet<(UserId, bool, String)>| {
            if limits.per_array {
                0
            } else {
                users.len()
            }
        };
        let mut log = self.log.lock().expect("event log lock poisoned");
        let mut cursor = 0u64;
        'chunks: while events + others(&users) < max_events {
            // Chunks whose every remaining event is out with a worker are passed without a read.
            let Some(first) = log
                .chunks_from(cursor)
                .find(|(_, c)| !c.all_out())
                .map(|(f, _)| *f)
            else {
                break;
            };
            cursor = first + 1;
            let payload = match log.read(first) {
                Ok(payload) => payload,
                Err((why, bytes)) => {
                    undecodable.push(Undecodable {
                        lane: Lane::Events,
                        key_seq: first,
                        entry: None,
                        value: bytes,
                        why,
                    });
                    continue;
                }
            };
            let entries = match format::event_entries(first, &payload) {
                Ok(entries) => entries,
                Err(e) => {
                    undecodable.push(Undecodable {
                        lane: Lane::Events,
                        key_seq: first,
                        entry: None,
                        value: payload.to_vec(),
                        why: e.to_string(),
                    });
                    continue;
                }
            };
            let chunk = log.chunk_mut(first).expect("indexed above");
            for (seq, envelope) in entries {
                if events + others(&users) >= max_events {
                    break 'chunks;
                }
                if leases.seqs.contains(&seq) || chunk.gone.contains(&seq) {
                    continue;
                }
                let stored = match decode(envelope) {
                    Ok(stored) => stored,
                    Err(e) => {
                        undecodable.push(Undecodable {
                            lane: Lane::Events,
                            key_seq: first,
                            entry: Some(seq),
                            value: envelope.to_vec(),
                            why: e.to_string(),
                        });
                        continue;
                    }
                };
                // Braze applies a request's attributes before its events, and clients rely on
                // "set the attribute, then fire the trigger": an event goes only with, or
                // after, every update of its user accepted before it. Those still pending are
                // carried in this request; if one cannot be, the user's events wait.
                let user = stored.record.user();
                if held.contains(user) {
                    continue;
                }
                let carried = self.carry_earlier(
                    &store,
                    &mut leases,
                    user,
                    seq,
                    (limits, events, &mut bytes),
                    &mut users,
                    &mut out,
                )?;
                if !carried || events + 1 + others(&users) > max_events {
                    // What was carried goes now; the event follows in a later request.
                    held.insert(user.clone());
                    continue;
                }
                let size = envelope.len() + 96;
                if bytes + size > limits.max_bytes && !out.is_empty() {
                    break 'chunks;
                }
                bytes += size;
                events += 1;
                chunk.leased += 1;
                leases.seqs.insert(seq);
                out.push(Leased {
                    seq,
                    lane: Lane::Events,
                    key_seq: first,
                    attempts: leases.attempts.get(&seq).copied().unwrap_or(0),
                    stored,
                    raw: None,
                    latest: None,
                });
            }
        }
        drop(log);

        let max_user_objects = if limits.per_array {
            limits.max_objects
        } else {
            limits.max_objects - events
        };
        if memberships && max_user_objects > 0 && bytes < limits.max_bytes {
            let from = record_key(LANE_ATTRIBUTES, leases.attributes_from);
            let to = record_key(LANE_ATTRIBUTES, u64::MAX);
            // Until the scan passes a record it leaves for later, everything it has passed is
            // leased, and the next scan may start after it.
            let mut floor = Some(leases.attributes_from);
            for item in store.tree.range(from..=to) {
                let leased = match &item {
                    Ok((key, _)) => seq_of(key).filter(|s| leases.seqs.contains(s)),
                    Err(_) => None,
                };
                if let Some(seq) = leased {
                    floor = floor.map(|_| seq + 1);
                    continue;
                }
                let Some((seq, value, stored)) = candidate(item, &leases, &mut undecodable)? else {
                    floor = None;
                    continue;
                };
                // Taken below, or left for a later lease.
                let passed = floor.take();
                let Some(attribute) = stored.record.attribute_name() else {
                    undecodable.push(Undecodable {
                        lane: Lane::Attributes,
                        key_seq: seq,
                        entry: None,
                        value: value.to_vec(),
                        why: "a log entry in the attribute lane".to_string(),
                    });
                    continue;
                };
                let user = stored.record.user();
                let lk = latest_key(user, &attribute);
                if leases.attributes.contains(&lk) {
                    continue;
                }
                // Updates of one user travel as one Braze object only when their
                // object-level fields agree; each distinct set is its own object. A
                // membership's and a `/v1` attribute's fields are set at send time by
                // separate policies, so the two kinds are counted apart: never fewer objects
                // than the request will hold, whatever the policies.
                let object = (
                    user.clone(),
                    matches!(stored.record, Record::Membership(_)),
                    stored.record.object_fields().to_string(),
                );
                let new_user = !users.contains(&object);
                let size = value.len()
                    + if new_user {
                        64 + user.value().len() + object.2.len()
                    } else {
                        16
                    };
                if new_user && users.len() >= max_user_objects
                    || bytes + size > limits.max_bytes && !out.is_empty()
                {
                    floor = passed;
                    break;
                }
                bytes += size;
                if new_user {
                    users.insert(object);
                }
                floor = passed.map(|_| seq + 1);
                lease_attribute(&mut leases, &mut out, seq, stored, value.to_vec(), lk);
            }
            if let Some(floor) = floor {
                leases.attributes_from = floor;
            }
        }
        drop(leases);
        drop(store);
        if !undecodable.is_empty() {
            self.quarantine(undecodable)?;
        }
        Ok(out)
    }

    /// Leases into `out` the pending attribute updates of `user` accepted before `event_seq`
    /// that this request does not hold yet: the oldest pending update of each attribute, as
    /// long as none of the attribute's updates is in flight elsewhere and the request has room
    /// for it (`limits`, with `events` events in it). Returns whether every such update is now
    /// in the request, so the event may follow it there if it fits too. An update taken when
    /// the event then does not fit still goes: the event's next lease finds one update less.
    #[allow(clippy::too_many_arguments)]
    fn carry_earlier(
        &self,
        store: &Store,
        leases: &mut Leases,
        user: &UserId,
        event_seq: u64,
        (limits, events, bytes): (&BatchLimits, usize, &mut usize),
        users: &mut HashSet<(UserId, bool, String)>,
        out: &mut Vec<Leased>,
    ) -> Result<bool, QueueError> {
        let prefix = format::user_pending_prefix(user);
        if !self.pending_users.maybe(&prefix) {
            return Ok(true);
        }
        let mut end = prefix.clone();
        end.extend_from_slice(&event_seq.to_be_bytes());
        for item in store.tree.range(prefix.as_slice()..end.as_slice()) {
            let (key, _) = item?;
            let Some(seq) = key
                .len()
                .checked_sub(8)
                .and_then(|at| key[at..].try_into().ok())
                .map(u64::from_be_bytes)
            else {
                continue;
            };
            if out
                .iter()
                .any(|l| l.lane == Lane::Attributes && l.seq == seq)
            {
                continue; // carried already, for an earlier event of this user
            }
            if leases.seqs.contains(&seq) {
                return Ok(false); // in flight in another request: wait for its answer
            }
            let Some(value) = store.tree.get(record_key(LANE_ATTRIBUTES, seq))? else {
                continue; // its record left the queue (set aside as undecodable)
            };
            let Ok(stored) = decode(&value) else {
                return Ok(false); // the attribute lane's scan sets it aside
            };
            let Some(attribute) = stored.record.attribute_name() else {
                return Ok(false);
            };
            let lk = latest_key(user, &attribute);
            if leases.attributes.contains(&lk) {
                // An older update of this attribute is in flight, or carried here already:
                // this one goes in a later request, and so does the event.
                return Ok(false);
            }
            let object = (
                user.clone(),
                matches!(stored.record, Record::Membership(_)),
                stored.record.object_fields().to_string(),
            );
            let new_object = !users.contains(&object);
            let objects = users.len() + usize::from(new_object);
            let fits = if limits.per_array {
                objects <= limits.max_objects
            } else {
                events + objects <= limits.max_objects
            };
            // (`events` excludes the event being leased: an update may go without it.)
            let size = value.len() + 64 + user.value().len();
            if !fits || *bytes + size > limits.max_bytes {
                return Ok(false);
            }
            *bytes += size;
            users.insert(object);
            lease_attribute(leases, out, seq, stored, value.to_vec(), lk);
        }
        Ok(true)
    }

    /// Moves stored values that no longer decode to the dead letters, loudly, so that one bad
    /// value cannot wedge the queue.
    fn quarantine(&self, items: Vec<Undecodable>) -> Result<(), QueueError> {
        let store = self.store.read().expect("queue store lock poisoned");
        let next_seq = self.writer.lock().expect("queue writer lock poisoned");
        let mut batch = sled::Batch::default();
        let mut change = CountChange::default();
        let mut seen = HashSet::new();
        let mut log = self.log.lock().expect("event log lock poisoned");
        for item in items {
            // Two leases may have found the same bad value; move it (and count it) once.
            if !seen.insert((item.lane, item.key_seq, item.entry)) {
                continue;
            }
            let moved = match (item.lane, item.entry) {
                (Lane::Events, Some(seq)) => log.mark_gone(item.key_seq, &[seq]).len() as i64,
                (Lane::Events, None) => log.drop_chunk(item.key_seq) as i64,
                (_, _) => {
                    let key = record_key(item.lane.key_prefix(), item.key_seq);
                    if store.tree.get(key)?.is_none() {
                        continue;
                    }
                    batch.remove(&key);
                    change.attributes -= 1;
                    0
                }
            };
            if item.lane == Lane::Events {
                if moved == 0 {
                    continue;
                }
                change.events -= moved;
            }
            let seq = item.entry.unwrap_or(item.key_seq);
            tracing::error!(seq, error = %item.why, "a stored record no longer decodes; moved to the dead letters");
            let entry = Dead {
                dead_at_ms: now_ms(),
                attempts: 0,
                reason: format!("undecodable stored record: {}", item.why),
                stored: item.value,
            };
            batch.insert(&format::dead_key(seq), encode_dead(&entry));
            change.dead += 1;
        }
        if let Some(gone) = log.gone_value(*next_seq) {
            batch.insert(format::META_EVENTS_GONE, gone);
        }
        drop(log);
        self.counters.stage(&mut batch, change);
        store.tree.apply_batch(batch)?;
        self.counters.apply(change);
        Ok(())
    }

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
    fn settle(&self, results: &[(Leased, Outcome)]) -> Result<(), QueueError> {
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
            // A membership update may have been superseded (removed) while in flight.
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
            // (one write and one sync_file_range each), a quarter of the daemon's CPU when
            // every delivered request was one.
            store.tree.insert(format::META_EVENTS_GONE, gone)?;
            self.progress_unsynced.store(true, Ordering::Release);
        }
        self.counters.apply(change);
        Ok(())
    }

    /// Whether a completion of events alone should write the log's progress now.
    fn progress_due(&self) -> bool {
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
    fn write_progress(
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
    fn flush_progress(&self) -> Result<(), QueueError> {
        let store = self.store.read().expect("queue store lock poisoned");
        let next_seq = self.writer.lock().expect("queue writer lock poisoned");
        let mut log = self.log.lock().expect("event log lock poisoned");
        self.write_progress(&store, &mut log, *next_seq)
    }

    /// Completes once new work may be there (an enqueue or a released attribute) after this
    /// call. Take it *before* looking for work: one taken after an empty lease misses an
    /// enqueue that fell between the two, and events then waited for the idle timeout (a
    /// p99 of 175 ms while a backfill kept the lease busy).
    pub fn work_signal(&self) -> tokio::sync::futures::Notified<'_> {
        self.work.notified()
    }

    pub fn pending(&self) -> u64 {
        self.counters.events.load(Ordering::Relaxed)
            + self.counters.attributes.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> Result<Stats, QueueError> {
        let store = self.store.read().expect("queue store lock poisoned");
        let oldest_event = log_records(&mut self.log.lock().expect("event log lock poisoned"), 1)
            .into_iter()
            .next()
            .and_then(|(_, v)| v.ok());
        let oldest = lane_records(&store.tree, LANE_ATTRIBUTES)
            .next()
            .and_then(Result::ok)
            .map(|(_, v)| v)
            .into_iter()
            .chain(oldest_event)
            .filter_map(|v| decode(&v).ok())
            .map(|s| s.accepted_at_ms)
            .min();
        let c = &self.counters;
        let events = c.events.load(Ordering::Relaxed);
        let attributes = c.attributes.load(Ordering::Relaxed);
        Ok(Stats {
            pending: events + attributes,
            pending_events: events,
            pending_attributes: attributes,
            in_flight: self.leases.lock().expect("lease lock").seqs.len() as u64,
            dead: c.dead.load(Ordering::Relaxed),
            oldest_pending_age_ms: oldest.map(|t| now_ms().saturating_sub(t)),
            // Measured by `maintain` every second (and at open): stats and /metrics are
            // polled, and walking the directory on every call is I/O for nothing.
            disk_bytes: c.disk_bytes.load(Ordering::Relaxed),
            generation: store.generation,
            accepted_total: c.accepted.load(Ordering::Relaxed),
            coalesced_total: c.coalesced.load(Ordering::Relaxed),
            skipped_unchanged_total: c.unchanged.load(Ordering::Relaxed),
            accepted_by_kind: by_name(&c.accepted_by_kind),
            skipped_unchanged_by_kind: by_name(&c.unchanged_by_kind),
            compactions_total: c.compactions.load(Ordering::Relaxed),
            lost_total: self.ledger.lost(),
        })
    }

    /// Makes everything written so far durable (used at shutdown).
    pub async fn sync(&self) -> Result<(), QueueError> {
        self.flush_progress()?;
        self.sled_dirty.store(true, Ordering::Release);
        self.commit_all().await?;
        self.ledger.write()
    }

    /// Makes the log and sled durable, whatever was written.
    async fn commit_all(&self) -> Result<(), QueueError> {
        let (log, tree) = tokio::join!(self.log_committer.commit(), self.committer.commit());
        log.and(tree)
    }

    /// Periodic upkeep: refreshes the disk size that the bound checks, and rebuilds the
    /// database into a new generation once a backlog has drained and left a large file.
    /// Blocking: run it off the async threads.
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

/// What the latest-value index says of one user's attribute (`format::latest_value`).
#[derive(Debug, Clone)]
struct Pending {
    /// The newest pending update.
    seq: u64,
    /// The highest rank (`Stored::rank`) among the attribute's pending updates.
    rank: u64,
    /// The newest pending update's object fields.
    fields: Vec<u8>,
}

/// One atomic batch of new pending records. Memberships coalesce: a record replaces the
/// pending update of the same user and attribute, whether that is in the tree or earlier in
/// this same batch.
struct Staging<'a> {
    tree: &'a sled::Tree,
    /// `Queue::pending_users`, counted up as records enter the attribute lane.
    pending_users: &'a pending_users::PendingUsers,
    log: &'a Mutex<EventLog>,
    sled_dirty: &'a AtomicBool,
    /// The batch holds writes that an acknowledgement depends on (not only the high-water
    /// mark): it must be applied, and the commit must sync sled.
    tree_writes: bool,
    counters: &'a Counters,
    /// The queue's next sequence number (behind the writer lock), moved forward as each
    /// sub-batch lands, so numbers already written are never handed out again.
    applied_seq: &'a mut u64,
    /// Records in `batch` not yet applied.
    staged: usize,
    /// Consulted to skip an update whose value Braze was sent lately.
    state: &'a state::State,
    /// `QueueSettings::skip_unchanged_for`.
    skip_unchanged_for: Option<std::time::Duration>,
    batch: sled::Batch,
    /// Events not yet framed: they go to the log as one chunk (`format::encode_event_chunk`).
    chunk: Vec<(u64, Vec<u8>)>,
    chunk_bytes: usize,
    /// Chunks for the event log: first seq, event count, payload.
    frames: Vec<eventlog::Frame>,
    /// Latest-index entries this batch already set, so later records see them.
    latest_here: HashMap<Vec<u8>, Pending>,
    next_seq: u64,
    events: u64,
    attributes: u64,
    coalesced: u64,
    unchanged: u64,
    /// Dead letters this batch removes (a retry puts them back in a lane).
    dead_removed: u64,
    /// What the commit must make durable.
    wrote: Wrote,
}

/// Records a large request stages under the writer lock at a time (`stage_blocking`).
const STAGE_AT_ONCE: usize = 500;

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
struct Wrote {
    log: bool,
    tree: bool,
}

impl Wrote {
    fn and(self, other: Wrote) -> Wrote {
        Wrote {
            log: self.log || other.log,
            tree: self.tree || other.tree,
        }
    }
}

impl<'a> Staging<'a> {
    fn new(queue: &'a Queue, tree: &'a sled::Tree, applied_seq: &'a mut u64) -> Staging<'a> {
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
    fn remove_dead(&mut self, id: u64) {
        self.tree_writes = true;
        self.batch.remove(&format::dead_key(id));
        self.dead_removed += 1;
    }

    /// The pending updates of this user's attribute, if any.
    fn pending(&self, latest: &[u8]) -> Result<Option<Pending>, QueueError> {
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
    /// and Braze was last sent this very value (Braze bills every attribute write).
    fn add(&mut self, record: &Record, value: Vec<u8>) -> Result<bool, QueueError> {
        self.add_ranked(record, value, None)
    }

    /// `add`, for an update `retry-dead` puts back: `origin` is the seq it was first
    /// accepted under, and the stored envelope is marked with it (`format::with_origin`).
    fn add_ranked(
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
    /// in sub-batches: sled 0.34.7 holds several KB of memory per small value given to it in
    /// one huge batch. Nothing is acknowledged before the commit that follows, so a crash
    /// between sub-batches only means the client's retry sends some records twice (at least
    /// once), never a loss.
    fn flush(&mut self) -> Result<(), QueueError> {
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
    fn close_chunk(&mut self) {
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
    fn apply(mut self) -> Result<Wrote, QueueError> {
        self.flush()?;
        Ok(self.wrote)
    }
}

/// A stored value that could not be read back, and where it is.
struct Undecodable {
    lane: Lane,
    /// The sequence number in its key.
    key_seq: u64,
    /// One event inside an event chunk; `None` for the whole value.
    entry: Option<u64>,
    value: Vec<u8>,
    why: String,
}

/// One attribute-lane entry as a lease candidate: `None` if it is leased already or does not
/// decode (then it is set aside in `undecodable` for `quarantine`).
fn candidate(
    item: sled::Result<(sled::IVec, sled::IVec)>,
    leases: &Leases,
    undecodable: &mut Vec<Undecodable>,
) -> Result<Option<(u64, sled::IVec, Stored)>, QueueError> {
    let (key, value) = item?;
    let Some(seq) = seq_of(&key).filter(|s| !leases.seqs.contains(s)) else {
        return Ok(None);
    };
    match decode(&value) {
        Ok(stored) => Ok(Some((seq, value, stored))),
        Err(e) => {
            undecodable.push(Undecodable {
                lane: Lane::Attributes,
                key_seq: seq,
                entry: None,
                value: value.to_vec(),
                why: e.to_string(),
            });
            Ok(None)
        }
    }
}

fn dead_entry(item: &Leased, reason: &str) -> Vec<u8> {
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

/// The lane-1 value for events stored under `first`: a bare envelope when it is the only one
/// and has that very seq (as values were before chunks), else a chunk.
fn event_value(first: u64, entries: &[(u64, &[u8])]) -> Vec<u8> {
    match entries {
        [(seq, envelope)] if *seq == first => envelope.to_vec(),
        _ => format::encode_event_chunk(first, entries.iter().copied()),
    }
}

/// The latest-value keys of the attributes with a dead letter: their facts in `state/` must
/// stay, or a retry could send a value older than one Braze already has.
fn dead_attribute_keys(tree: &sled::Tree) -> Result<HashSet<Vec<u8>>, QueueError> {
    let mut keys = HashSet::new();
    for item in lane_records(tree, DEAD) {
        let (_, value) = item?;
        let stored = format::decode_dead(&value).and_then(|d| decode(&d.stored));
        if let Ok(stored) = stored {
            if let Some(attribute) = stored.record.attribute_name() {
                keys.insert(latest_key(stored.record.user(), &attribute));
            }
        }
    }
    Ok(keys)
}

/// Every record of a sled lane (attribute updates, dead letters) in acceptance order, as its
/// seq and stored value. Events live in the event log: see `log_records`.
fn lane_records(
    tree: &sled::Tree,
    lane: u8,
) -> impl DoubleEndedIterator<Item = Result<(u64, Vec<u8>), QueueError>> + '_ {
    tree.scan_prefix([lane]).map(|item| {
        let (key, value) = item?;
        Ok((seq_of(&key).unwrap_or(0), value.to_vec()))
    })
}

/// The first `limit` pending events in acceptance order, each as its seq and envelope; a chunk
/// that no longer reads is one item: its first seq and why.
fn log_records(log: &mut EventLog, limit: usize) -> Vec<(u64, Result<Vec<u8>, String>)> {
    let mut out = Vec::new();
    let mut cursor = 0;
    while out.len() < limit {
        // One chunk at a time from a cursor: `stats` asks for one record of a backlog that
        // may hold hundreds of thousands of chunks.
        let Some((first, gone)) = log
            .chunks_from(cursor)
            .next()
            .map(|(f, c)| (*f, c.gone.clone()))
        else {
            break;
        };
        cursor = first + 1;
        let payload = match log.read(first) {
            Ok(p) => p,
            Err((why, _)) => {
                out.push((first, Err(why)));
                continue;
            }
        };
        match format::event_entries(first, &payload) {
            Ok(entries) => out.extend(
                entries
                    .into_iter()
                    .filter(|(seq, _)| !gone.contains(seq))
                    .take(limit - out.len())
                    .map(|(seq, e)| (seq, Ok(e.to_vec()))),
            ),
            Err(e) => out.push((first, Err(e.to_string()))),
        }
    }
    out
}

/// Moves events that an older release kept in sled (lane `01`) into the event log: append,
/// sync the log, then remove them from sled. A crash in between leaves them in both; the next
/// open skips the chunks the log already holds.
/// Marks an attribute-lane record leased (it and its attribute: no other update of the
/// attribute is leased until it completes) and adds it to `out`.
fn lease_attribute(
    leases: &mut Leases,
    out: &mut Vec<Leased>,
    seq: u64,
    stored: Stored,
    raw: Vec<u8>,
    latest: Vec<u8>,
) {
    leases.seqs.insert(seq);
    leases.attributes.insert(latest.clone());
    out.push(Leased {
        seq,
        lane: Lane::Attributes,
        key_seq: seq,
        attempts: leases.attempts.get(&seq).copied().unwrap_or(0),
        stored,
        raw: Some(raw),
        latest: Some(latest),
    });
}

/// Completes the `USER_PENDING` index of a database from before it (once, then marked), and
/// counts every user in it.
fn index_pending_users(st: &Store) -> Result<pending_users::PendingUsers, QueueError> {
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

fn migrate_sled_events(st: &Store, log: &mut EventLog) -> Result<(), QueueError> {
    let mut moved = 0usize;
    loop {
        let mut frames = Vec::new();
        let mut keys = Vec::new();
        for item in st.tree.scan_prefix([LANE_EVENTS]).take(4096) {
            let (key, value) = item?;
            if let Some(first) = seq_of(&key).filter(|f| !log.contains(*f)) {
                frames.push((first, format::event_count(&value) as u32, value.to_vec()));
            }
            keys.push(key);
        }
        if keys.is_empty() {
            break;
        }
        moved += frames.len();
        log.append(frames)?;
        log.take_unsynced()?.sync()?;
        let mut batch = sled::Batch::default();
        for key in keys {
            batch.remove(key);
        }
        st.tree.apply_batch(batch)?;
    }
    if moved > 0 {
        st.sync()?;
        tracing::info!(
            chunks = moved,
            "moved pending events from the sled queue into the event log"
        );
    }
    Ok(())
}

/// Puts parts of the event log that can no longer be indexed into the dead letters (synced),
/// then seals them in their segments so the next open does not find them again.
fn set_aside_damage(
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

fn by_name(counters: &PerKind) -> std::collections::BTreeMap<String, u64> {
    counters
        .by_name()
        .into_iter()
        .map(|(k, n)| (k.to_string(), n))
        .collect()
}

/// The seq at the start of a latest-index value (or the sequence high-water mark). An index
/// value goes on with a rank and object fields (`format::latest_value`).
fn seq_of_value(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.get(..8)?.try_into().ok()?))
}

/// The next sequence number: the stored high-water mark, or past the largest key if that is
/// missing (a database written before the mark existed). Events of an older release still in
/// sled count here; those already in the event log are the caller's.
fn next_seq_of(tree: &sled::Tree) -> Result<u64, QueueError> {
    let mut next = match tree.get(META_NEXT_SEQ)? {
        Some(v) => seq_of_value(&v).unwrap_or(1),
        None => 1,
    };
    for lane in [LANE_EVENTS, LANE_ATTRIBUTES, DEAD] {
        if let Some((key, value)) = tree.scan_prefix([lane]).next_back().transpose()? {
            let first = seq_of(&key).unwrap_or(0);
            let last = match format::event_entries(first, &value) {
                Ok(entries) if lane == LANE_EVENTS => entries.last().map_or(first, |e| e.0),
                _ => first,
            };
            next = next.max(last + 1);
        }
    }
    Ok(next.max(1))
}
