//! Long-lived per-attribute state, in its own sled database under `DATA_DIR/state/`. It holds
//! facts about what left the queue, never a record.
//!
//! Kept apart from the queue so that the queue, which churns, can be rebuilt cheaply to give
//! disk space back while the daemon runs. This grows with the number of users and attributes;
//! a fact stops being of use once it is older than the skip window and no dead letter of its
//! attribute is left, and at open `compact` rebuilds the database without such facts when it
//! is mostly those (sled never shrinks a file by itself).
//!
//! **On-disk format** (changing it breaks existing databases; add a version instead):
//! tree `settled`, key = the queue's latest-value key (`03 kind len id attribute`), value =
//! one of
//! - `[1][rank u64 BE]`: the highest rank (`format::Stored::rank`: the seq an update was
//!   first accepted under) among that user's attribute's updates that left the queue;
//! - `[2][rank u64 BE][value]`: the same, and the last to leave was delivered with this value
//!   (JSON text); an empty value means it was dead-lettered, so Braze's value is unknown;
//! - `[3][rank u64 BE][at u64 BE][value]`: as `2`, and it left the queue at `at` (milliseconds
//!   since the epoch). Only `3` is written; a `1` or `2` (from a database an earlier release
//!   wrote) still reads, a `2` as sent at an unknown, long past time.
//!
//! Two uses: `retry-dead` drops a dead update ranked below it (it would overwrite a newer
//! value), and ingest skips an update whose value is the one Braze was last sent, if that was
//! recently enough (`QueueSettings::skip_unchanged_for`; every attribute write is a billed
//! data point: <https://www.braze.com/docs/user_guide/data_and_analytics/data_points/>).
//! Written without a sync, after Braze answered and before the queue records the same
//! completion: after a crash it may lag a little (an update is then sent once more), never
//! claim a value Braze was not sent.

use std::path::Path;

use super::QueueError;

const V1: u8 = 1;
const V2: u8 = 2;
const V3: u8 = 3;

/// What is known of one user's attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// The highest rank that left the queue (see the module doc).
    pub seq: u64,
    /// The value Braze was last sent (JSON text), if the last update was delivered.
    pub delivered: Option<Vec<u8>>,
    /// When the last update left the queue (milliseconds since the epoch), if known.
    pub at_ms: Option<u64>,
}

impl Settled {
    /// Whether the last update left the queue no longer than `window` before `now_ms`.
    pub fn sent_within(&self, window: std::time::Duration, now_ms: u64) -> bool {
        self.at_ms
            .is_some_and(|at| now_ms.saturating_sub(at) <= window.as_millis() as u64)
    }
}

/// `DATA_DIR/state`, and the names a rebuild uses beside it.
pub const DIR: &str = "state";
const NEW: &str = "state.new";
const OLD: &str = "state.old";

/// What a rebuild did: bytes on disk before and after, facts kept and dropped.
#[derive(Debug)]
pub struct Compaction {
    pub from_bytes: u64,
    pub to_bytes: u64,
    pub kept: u64,
    pub dropped: u64,
}

/// Rebuilds `DATA_DIR/state` with only the facts `keep` wants, when it takes at least
/// `min_bytes` on disk and those facts are under a quarter of that. Only at open, before
/// anything else has the database open.
///
/// The new database is written beside it (`state.new`) and synced, then swapped in by two
/// renames and a sync of `data_dir`; a crash at any point leaves either database whole, and
/// the next open finishes or discards the swap. Losing facts is never losing records: a fact
/// only spares Braze a write it already had, or a stale dead letter its retry.
pub fn compact(
    data_dir: &Path,
    cache_bytes: u64,
    min_bytes: u64,
    keep: impl Fn(&[u8], &Settled) -> bool,
) -> Result<Option<Compaction>, QueueError> {
    let (dir, new, old) = (data_dir.join(DIR), data_dir.join(NEW), data_dir.join(OLD));
    // An earlier rebuild cut short: between the renames, the new one is whole.
    if !dir.exists() && new.exists() {
        std::fs::rename(&new, &dir)?;
        super::store::sync_dir(data_dir)?;
    }
    for leftover in [&new, &old] {
        if leftover.exists() {
            std::fs::remove_dir_all(leftover)?;
        }
    }
    let from_bytes = super::store::dir_bytes(&dir);
    if from_bytes < min_bytes.max(1) {
        return Ok(None);
    }
    let state = State::open(&dir, cache_bytes)?;
    let (mut kept, mut kept_bytes, mut dropped) = (0u64, 0u64, 0u64);
    for item in state.settled.iter() {
        let (key, value) = item?;
        match decode(&value) {
            Some(fact) if keep(&key, &fact) => {
                kept += 1;
                kept_bytes += (key.len() + value.len()) as u64;
            }
            _ => dropped += 1,
        }
    }
    if kept_bytes.saturating_mul(4) >= from_bytes {
        return Ok(None);
    }
    {
        let fresh = State::open(&new, cache_bytes)?;
        for item in state.settled.iter() {
            let (key, value) = item?;
            if decode(&value).is_some_and(|fact| keep(&key, &fact)) {
                fresh.settled.insert(key, value)?;
            }
        }
        fresh._db.flush()?;
    }
    drop(state);
    sync_all(&new)?;
    super::store::sync_dir(data_dir)?;
    std::fs::rename(&dir, &old)?;
    std::fs::rename(&new, &dir)?;
    super::store::sync_dir(data_dir)?;
    std::fs::remove_dir_all(&old)?;
    Ok(Some(Compaction {
        from_bytes,
        to_bytes: super::store::dir_bytes(&dir),
        kept,
        dropped,
    }))
}

/// Syncs every file and directory under `dir`, and `dir` itself.
fn sync_all(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_all(&entry.path())?;
        } else {
            std::fs::File::open(entry.path())?.sync_all()?;
        }
    }
    super::store::sync_dir(dir)
}

/// A stored fact, or `None` if it does not read.
fn decode(v: &[u8]) -> Option<Settled> {
    let u64_at = |at: usize| {
        v.get(at..at + 8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_be_bytes)
    };
    let delivered = |from: usize| v.get(from..).map(<[u8]>::to_vec).filter(|d| !d.is_empty());
    match v.first() {
        Some(&V1) => u64_at(1).map(|seq| Settled {
            seq,
            delivered: None,
            at_ms: None,
        }),
        Some(&V2) => u64_at(1).map(|seq| Settled {
            seq,
            delivered: delivered(9),
            at_ms: None,
        }),
        Some(&V3) => u64_at(1).zip(u64_at(9)).map(|(seq, at)| Settled {
            seq,
            delivered: delivered(17),
            at_ms: Some(at),
        }),
        _ => None,
    }
}

pub struct State {
    /// Held so the database stays open; `settled` is a tree inside it.
    _db: sled::Db,
    settled: sled::Tree,
}

impl State {
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<State, QueueError> {
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .flush_every_ms(Some(1000));
        let db = super::store::open_sled_durably(&config, dir)?;
        let settled = db.open_tree("settled")?;
        Ok(State { _db: db, settled })
    }

    pub fn settled(&self, latest_key: &[u8]) -> Result<Option<Settled>, QueueError> {
        Ok(self.settled.get(latest_key)?.and_then(|v| decode(&v)))
    }

    /// The highest rank of this attribute's updates that left the queue, if any.
    pub fn settled_seq(&self, latest_key: &[u8]) -> Result<Option<u64>, QueueError> {
        Ok(self.settled(latest_key)?.map(|s| s.seq))
    }

    /// Records that these updates left the queue: `(key, rank, retried, value Braze was
    /// sent)`, the value `None` when dead-lettered, at `now_ms`. Per attribute they settle in
    /// order (the queue never has two of one attribute in flight), so the last write holds the
    /// value Braze has. Its rank is the highest too, except for a retried update (`retried`),
    /// which may leave after updates accepted later than it: its rank never lowers what is
    /// there.
    pub fn record_settled<'a>(
        &self,
        settled: impl IntoIterator<Item = (&'a [u8], u64, bool, Option<&'a [u8]>)>,
        now_ms: u64,
    ) -> Result<(), QueueError> {
        // One key at a time, not a batch: sled 0.34 seals and writes its log buffer for every
        // batch (an I/O per delivered request), and these facts need no atomicity: each one
        // stands alone, and after a crash any of them may lag, never lead.
        for (key, rank, retried, delivered) in settled {
            let seq = match retried {
                true => self.settled_seq(key)?.map_or(rank, |s| s.max(rank)),
                false => rank,
            };
            let delivered = delivered.unwrap_or_default();
            let mut value = Vec::with_capacity(17 + delivered.len());
            value.push(V3);
            value.extend_from_slice(&seq.to_be_bytes());
            value.extend_from_slice(&now_ms.to_be_bytes());
            value.extend_from_slice(delivered);
            self.settled.insert(key, value)?;
        }
        Ok(())
    }
}
