//! The durable queue: the only module that touches sled.
//!
//! It owns every byte under `DATA_DIR/queue/` and `DATA_DIR/state/`, and never acknowledges a
//! record before it is durable.
//!
//! # Design
//!
//! **Durability.** `enqueue` appends a request's events to the event log (`eventlog.rs`) and
//! puts its attribute updates in one atomic sled batch, then waits for the group committers
//! (`commit.rs`) of what it wrote: one thread `fdatasync`s the log, another runs sled
//! `flush()` and our own `fdatasync`, each sync shared by every request waiting on that thread
//! at that moment. Only then does ingest answer 2xx. The two threads are apart so that an
//! event never waits for a sled sync a snapshot or backfill made long. Removals (a record
//! Braze took) are not waited for; if a crash loses one, the record is sent again (at least
//! once). sled recovers a prefix of its log, so a lost removal can never outlive a later
//! insert.
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
//! | `00 'c'` | records in the attribute lane and the dead letters (3 × u64 BE; the first, events, is written but not read at open: the event log counts its own), kept in step by every batch |
//! | `00 'w'` | what has left the event log: its watermark (every chunk whose first seq is below it has left), the next seq, and markers for chunks above the watermark partly or wholly gone (`eventlog::GoneState`) |
//! | `01 seq` | events kept in sled, as databases from before the event log hold them; moved into the log at open (`migrate.rs`) |
//! | `02 seq` | a pending attribute update, memberships included (the attribute lane) |
//! | `03 kind len id attribute` | the seq of the newest pending update of that user's attribute, then its object fields |
//! | `04 seq` | a dead-lettered record with Braze's reason |
//! | `05 kind len id seq` | one key per attribute-lane record, by user: an event's lease finds its user's earlier pending updates and carries them in the same request (Braze applies attributes first) |
//! | `00 'u'` | the `05` index is complete (built once at open for a database that lacks it) |
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
//! under `DATA_DIR/snapshots/` (`crate::snapshot`); the queue holds only what churns. Once
//! a backlog has drained and the generation is large, `maintain` copies the few live keys into
//! the next generation, syncs it, switches `CURRENT` and deletes the old directory. Ingest
//! answers 503 with `Retry-After` for that moment (`QueueError::Busy`).
//!
//! # Files
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | this design, the public types, the `Queue` and its read-only views (`stats`, `pending`) |
//! | `backend.rs` | the seam: the `Backend` trait and its implementation by `Queue` |
//! | `open.rs` | opening (generation, event log, ledger checks, state) and closing |
//! | `enqueue.rs` | durable enqueue: staging under the writer lock, then the group commit |
//! | `lease.rs` | leasing a request's worth, and setting aside values that do not decode |
//! | `complete.rs` | completing leases: removal, dead letters, retries, the log's progress |
//! | `admin.rs` | peek, dead letters, retry and purge for the operator |
//! | `upkeep.rs` | sync, drained segments, rebuilding a drained generation |
//! | `migrate.rs` | what earlier releases wrote in forms no longer written (events in sled, whole chunks in the dead letters): read, never written |
//! | `format.rs` | the bytes of keys and values |
//! | `eventlog.rs`, `store.rs`, `state.rs`, `ledger.rs`, `commit.rs`, `pending_users.rs` | the event log, a sled generation, the state database, the checksummed ledger, the commit threads, the counting filter of users with pending updates |
//!
//! # Lock order
//!
//! `store` (read; written only by a rebuild), then `writer` *or* `leases` (never both at
//! once), then `log`. All are std locks held for one synchronous step, never across an
//! await or a sync. Completing delivered events only tries `writer` (`complete.rs`): a large
//! staging may hold it for a while, and what they would write under it may wait.
//!
//! # Glossary
//!
//! - **seq**: a record's sequence number, given at acceptance, never reused: acceptance
//!   order, and the key of its value.
//! - **origin**: for an update an operator retried from the dead letters, the seq it was
//!   first accepted under.
//! - **rank**: where an update stands among its attribute's updates: its origin, else its
//!   seq. A retry never overwrites an update of a higher rank.
//! - **latest**: the index (`03`) from a user's attribute to the seq of its newest pending
//!   update, which a newer plain value replaces.
//! - **settled**: what Braze was last sent (or refused) for a user's attribute, in `state/`:
//!   it spares resending an unchanged value and guards dead letters against stale retries.
//! - **lane**: events (the event log) or attribute updates (sled); the public `Lane`.
//!
//! # The seam
//!
//! What is above the queue (ingest, delivery, snapshots, the commands) uses it through the
//! `Backend` trait (`backend.rs`), which `Queue` implements; none of it names sled, a key or
//! a lane byte. Opening, syncing and upkeep are the daemon's, with the `Queue` it opened.
//!
//! **Operators** list pending and dead records, retry or purge dead ones (`admin.rs`). A
//! retried update goes to the back of its lane with a new sequence number, unless a newer
//! update of the same user and attribute was accepted since: then it is dropped as superseded,
//! so an old `true` never overwrites a newer `false`.

mod admin;
mod backend;
mod complete;
mod enqueue;
mod lease;
mod migrate;
mod open;
mod upkeep;

pub use admin::{PurgeReport, RecordView, RetryReport, Selection};
pub use backend::{Backend, BoxFuture};
pub use enqueue::Staged;
use enqueue::*;
use migrate::*;
use open::*;
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
/// upkeep and every other write to the tree carry it in between. No one waits for it to be
/// synced anyway, so this only widens a crash's resend window by as much, and it spares a
/// sled write for every delivered request.
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
    /// The bounds (`queue.max_records`, `queue.max_disk_bytes`): past them ingest gets 503.
    pub max_records: u64,
    pub max_disk_bytes: u64,
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
    /// from its start, so it does not walk sled past the batches other workers hold. Only a
    /// lease moves it up, over records it finds leased or takes itself; an update handed back
    /// for a retry moves it down.
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Queue {
    fn read_store(&self) -> Result<std::sync::RwLockReadGuard<'_, Store>, QueueError> {
        match self.store.try_read() {
            Ok(guard) => Ok(guard),
            Err(std::sync::TryLockError::WouldBlock) => Err(QueueError::Busy),
            Err(std::sync::TryLockError::Poisoned(_)) => panic!("queue store lock poisoned"),
        }
    }

    /// Completes once new work may be there (an enqueue or a released attribute) after this
    /// call. Take it *before* looking for work: one taken after an empty lease misses an
    /// enqueue that fell between the two, and the events of that enqueue then wait for the
    /// worker's idle timeout.
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
            max_records: self.settings.max_records,
            max_disk_bytes: self.settings.max_disk_bytes,
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
}

/// The lane-1 value for events stored under `first`: a bare envelope when it is the only one
/// and has that very seq (the form from before chunks, which `format::event_entries` still
/// reads), else a chunk.
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
/// missing (a database written before the mark existed). Events still in sled (lane `01`,
/// not yet moved to the log) count here; those already in the event log are the caller's.
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
