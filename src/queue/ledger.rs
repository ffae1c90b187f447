//! The ledger: a durable record, outside the files it vouches for, of what they must hold.
//!
//! A file cut short, deleted or emptied would otherwise open as a smaller queue, and the
//! records it lost would be gone without a word: sled recovers the prefix of its log that
//! it can read, the event log indexes the segments it finds. `queue/LEDGER` says, as of its
//! last write:
//! - `tree_seq`: the sequence high-water mark (`format::META_NEXT_SEQ`) sled held at its last
//!   sync. Every batch that adds to the attribute lane raises it, and sled recovers a prefix,
//!   so a sled that lost an acknowledged batch opens below it.
//! - one `segment ID LEN` line for each event log segment: LEN bytes of it were synced.
//!   Segments are only ever appended to; one is deleted only after the ledger stops naming it.
//!
//! Only what is already durable is written here (the values are taken before the sync that
//! makes them so, and published after it succeeds), so a crash or power cut can leave the
//! ledger behind the files, never ahead of them: a mismatch at open is damage, not a race.
//! It is rewritten whole (temporary file, fsync, rename, directory fsync) by the log's commit
//! thread between commits, at most every `WRITE_EVERY`, and before any segment is deleted.
//!
//! The text ends with a CRC32 of what precedes it, so the ledger's own damage is found too.
//! The ledger only records and compares; it never repairs a file or drops a record itself:
//! what is done about damage is decided at open (`open.rs`, `run --accept-loss`).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::QueueError;

pub const FILE: &str = "LEDGER";
const HEADER: &str = "aiq-braze-sync ledger 1";

/// How often, at most, the ledger is rewritten while the queue changes.
pub const WRITE_EVERY: Duration = Duration::from_millis(200);

/// What the files must hold, as last recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entries {
    pub tree_seq: u64,
    /// Segment id → bytes and events synced.
    pub segments: BTreeMap<u64, (u64, u64)>,
    /// Records given up for lost so far (`run --accept-loss`), at most: kept for the
    /// operator's count.
    pub lost: u64,
}

impl Entries {
    fn encode(&self) -> String {
        let mut text = format!("{HEADER}\ntree_seq {}\nlost {}\n", self.tree_seq, self.lost);
        for (id, (len, events)) in &self.segments {
            text.push_str(&format!("segment {id} {len} {events}\n"));
        }
        let sum = crc32fast::hash(text.as_bytes());
        text.push_str(&format!("crc32 {sum:08x}\n"));
        text
    }

    fn decode(text: &str) -> Option<Entries> {
        let (body, sum) = text.trim_end().rsplit_once('\n')?;
        let body = format!("{body}\n");
        let sum = u32::from_str_radix(sum.strip_prefix("crc32 ")?, 16).ok()?;
        if crc32fast::hash(body.as_bytes()) != sum {
            return None;
        }
        let mut lines = body.lines();
        if lines.next()? != HEADER {
            return None;
        }
        let mut out = Entries::default();
        for line in lines {
            let words: Vec<&str> = line.split(' ').collect();
            match words[..] {
                ["tree_seq", n] => out.tree_seq = n.parse().ok()?,
                ["lost", n] => out.lost = n.parse().ok()?,
                ["segment", id, len, events] => {
                    let at = (len.parse().ok()?, events.parse().ok()?);
                    out.segments.insert(id.parse().ok()?, at);
                }
                _ => return None,
            }
        }
        Some(out)
    }
}

/// Reads `queue/LEDGER`: `None` for a queue that has none yet (new, or written by a release
/// that kept no ledger), an error naming the file if it cannot be read back whole.
pub fn read(queue_dir: &Path) -> Result<Option<Entries>, QueueError> {
    let path = queue_dir.join(FILE);
    match fs::read_to_string(&path) {
        Ok(text) => Entries::decode(&text).map(Some).ok_or_else(|| {
            QueueError::Damaged(format!(
                "{} is damaged (its checksum or format is wrong), so the queue's files cannot \
                 be checked against it",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Err(QueueError::Damaged(format!(
            "{} is damaged (not text)",
            path.display()
        ))),
        Err(e) => Err(e.into()),
    }
}

/// The durable state as the commit threads publish it, and the file it is written to.
pub struct Ledger {
    path: PathBuf,
    tree_seq: AtomicU64,
    segments: Mutex<BTreeMap<u64, (u64, u64)>>,
    lost: AtomicU64,
    /// What was last written, and when.
    written: Mutex<(Entries, Instant)>,
}

impl Ledger {
    pub fn new(queue_dir: &Path, start: Entries) -> Arc<Ledger> {
        Arc::new(Ledger {
            path: queue_dir.join(FILE),
            tree_seq: AtomicU64::new(start.tree_seq),
            segments: Mutex::new(start.segments.clone()),
            lost: AtomicU64::new(start.lost),
            written: Mutex::new((Entries::default(), Instant::now())),
        })
    }

    /// Sled holds `seq` durably (read before a sync that has now succeeded).
    pub fn tree_synced(&self, seq: u64) {
        self.tree_seq.fetch_max(seq, Ordering::AcqRel);
    }

    /// These segments hold at least these lengths and events durably (a log sync
    /// succeeded).
    pub fn segments_synced(&self, synced: &[(u64, u64, u64)]) {
        let mut segments = self.segments.lock().expect("ledger lock poisoned");
        for &(id, len, events) in synced {
            let at = segments.entry(id).or_default();
            *at = (at.0.max(len), at.1.max(events));
        }
    }

    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    fn entries(&self) -> Entries {
        Entries {
            tree_seq: self.tree_seq.load(Ordering::Acquire),
            segments: self.segments.lock().expect("ledger lock poisoned").clone(),
            lost: self.lost.load(Ordering::Relaxed),
        }
    }

    /// Rewrites the file if what it says changed and `WRITE_EVERY` has passed.
    pub fn write_if_due(&self) -> Result<(), QueueError> {
        let due = {
            let written = self.written.lock().expect("ledger lock poisoned");
            written.1.elapsed() >= WRITE_EVERY && written.0 != self.entries()
        };
        if due {
            self.write()?;
        }
        Ok(())
    }

    /// Rewrites the file now, durably.
    pub fn write(&self) -> Result<(), QueueError> {
        let mut written = self.written.lock().expect("ledger lock poisoned");
        let entries = self.entries();
        let tmp = self.path.with_extension("tmp");
        let mut file = fs::File::create(&tmp)?;
        file.write_all(entries.encode().as_bytes())?;
        file.sync_data()?;
        fs::rename(&tmp, &self.path)?;
        super::store::sync_dir(self.path.parent().expect("the ledger is in queue/"))?;
        *written = (entries, Instant::now());
        Ok(())
    }

    /// Stops naming these segments, durably: call before deleting them.
    pub fn forget_segments(&self, ids: &[u64]) -> Result<(), QueueError> {
        {
            let mut segments = self.segments.lock().expect("ledger lock poisoned");
            for id in ids {
                segments.remove(id);
            }
        }
        self.write()
    }

    /// Starts over from what the files hold now, counting `lost` more records as given up
    /// (`run --accept-loss`).
    pub fn accept(&self, now: Entries, lost: u64) -> Result<(), QueueError> {
        self.tree_seq.store(now.tree_seq, Ordering::Release);
        *self.segments.lock().expect("ledger lock poisoned") = now.segments;
        self.lost.fetch_add(lost, Ordering::Relaxed);
        self.write()
    }
}

/// One file that does not hold what the ledger says it must.
#[derive(Debug, Clone)]
pub struct Finding {
    pub file: PathBuf,
    pub what: String,
    /// Records lost, at most, when that can be told.
    pub records: Option<u64>,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.what)
    }
}

/// The segments the ledger names that are missing or shorter than it says, in `events_dir`.
pub fn check_segments(
    expected: &Entries,
    events_dir: &Path,
    segment_path: impl Fn(&Path, u64) -> PathBuf,
) -> Vec<Finding> {
    let mut out = Vec::new();
    for (&id, &(len, events)) in &expected.segments {
        let path = segment_path(events_dir, id);
        match fs::metadata(&path) {
            Ok(m) if m.len() >= len => {}
            Ok(m) => out.push(Finding {
                what: format!(
                    "is {} bytes, but {len} bytes ({events} events) were stored in it: the \
                     undelivered events in the missing {} bytes are lost",
                    m.len(),
                    len - m.len()
                ),
                file: path,
                records: Some(events),
            }),
            Err(_) => out.push(Finding {
                what: format!(
                    "is missing, but {len} bytes ({events} events) were stored in it: its \
                     undelivered events are lost"
                ),
                file: path,
                records: Some(events),
            }),
        }
    }
    out
}

/// The sled generation, if it holds a lower high-water mark than the ledger says it stored.
pub fn check_tree(expected: &Entries, generation_dir: &Path, tree_seq: u64) -> Option<Finding> {
    (tree_seq < expected.tree_seq).then(|| Finding {
        file: generation_dir.to_path_buf(),
        what: format!(
            "holds records up to seq {tree_seq}, but records up to seq {} were stored in it: \
             the attribute updates and memberships accepted in between and not yet delivered \
             (at most {}) are lost",
            expected.tree_seq,
            expected.tree_seq - tree_seq
        ),
        records: Some(expected.tree_seq - tree_seq),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_a_changed_byte_is_caught() {
        let e = Entries {
            tree_seq: 12_345,
            segments: [(3, (8 << 20, 900)), (4, (1234, 7))].into_iter().collect(),
            lost: 7,
        };
        let text = e.encode();
        assert_eq!(Entries::decode(&text), Some(e));
        let changed = text.replace("1234 7\n", "1235 7\n");
        assert_eq!(Entries::decode(&changed), None);
        assert_eq!(Entries::decode(&text[..text.len() / 2]), None);
    }
}
