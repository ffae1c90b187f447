//! Audience snapshots: the whole membership of a split, diffed against the previous one so
//! that only entries and exits are queued.
//!
//! **Why files and not sled.** The memory sled 0.34.7 holds for small keys given to it in bulk
//! grows with their number (BENCHMARKS.md, "Snapshot uploads and sled's memory with small
//! values"), so a member set lives in a sorted file instead: bounded memory, one sequential
//! pass to diff.
//!
//! **On-disk format** (`DATA_DIR/snapshots/<audience>.<split>/`; changing it breaks
//! existing data: add a new file version instead):
//! - `CURRENT`: the name of the current generation's file, e.g. `gen-000012.members`;
//! - `gen-NNNNNN.members`: the members, sorted by their bytes, without duplicates, each as
//!   `[u16 BE length][kind byte e|b][id]`, after a header `AIQSNAP1`.
//!
//! An upload sorts what arrives in runs of bounded size (`RUN_BYTES`), merges the runs into
//! the next generation's file while diffing it, in the same pass, against the current file,
//! queues the differences durably, fsyncs the new file and only then replaces `CURRENT`
//! (write, fsync, rename, fsync the directory). Anything that stops it earlier (a bad line, a
//! dropped connection, a crash) leaves `CURRENT` as it was: the old snapshot stays the
//! reference, and the next upload first removes every file that `CURRENT` does not name.
//! Differences queued by an upload that did not finish are queued again by the next one;
//! memberships are state, so that costs nothing (they coalesce or are skipped as unchanged).
//! One upload per split at a time: a second one is refused while the first runs. This module
//! owns the snapshot files and never touches the queue's own: differences go through
//! `queue::Backend`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::queue::durable::{create_dir_durable, sync_dir, write_atomically};
use crate::queue::{Backend, QueueError, Staged};
use crate::record::{Membership, Record, UserId};

/// Why a snapshot upload (or reading a snapshot) failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Another upload of the same split is running.
    #[error("{0}")]
    Conflict(String),
    /// Well-formed but refused as it stands: empty without `allow_empty`, or too big.
    #[error("{0}")]
    Refused(String),
    /// A snapshot file does not read as one.
    #[error("snapshot files damaged: {0}")]
    Corrupt(String),
    #[error("snapshot files: {0}")]
    Io(#[from] io::Error),
    /// Queueing the differences failed (the queue's bounds, its disk).
    #[error(transparent)]
    Queue(#[from] QueueError),
}

const MAGIC: &[u8; 8] = b"AIQSNAP1";
const CURRENT: &str = "CURRENT";
/// Bytes of member ids sorted in memory at a time; the rest waits in sorted run files.
const RUN_BYTES: usize = 32 << 20;
/// Updates staged at a time. Staging holds the queue's writer lock, which ingest takes on the
/// runtime's thread: a stage is kept small so that an event posted meanwhile waits for one
/// short stage, not for the staging of a whole snapshot (BENCHMARKS.md, "Events during a
/// snapshot upload").
const STAGE: usize = 100;
/// Updates made durable per commit.
const CHUNK: usize = 5_000;

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SnapshotReport {
    pub entered: u64,
    pub exited: u64,
    pub unchanged: u64,
    pub members: u64,
    pub generation: u64,
    /// Members queued again although unchanged (`SnapshotUpload::full`).
    pub resent: u64,
}

/// The snapshots of every split under `DATA_DIR/snapshots/`, and which are being uploaded.
pub struct Snapshots {
    dir: PathBuf,
    queue: Arc<dyn Backend>,
    /// Splits with an upload in progress.
    uploads: Mutex<HashSet<PathBuf>>,
}

impl Snapshots {
    /// Cleans every split's directory of what interrupted uploads left (`clean_split_dir`),
    /// so their spill files do not hold disk until that split's next upload. Differences go
    /// to `queue`.
    pub fn open(data_dir: &Path, queue: Arc<dyn Backend>) -> Result<Arc<Snapshots>, SnapshotError> {
        let dir = data_dir.join("snapshots");
        clean_snapshot_dirs(&dir)?;
        Ok(Arc::new(Snapshots {
            dir,
            queue,
            uploads: Mutex::default(),
        }))
    }

    /// Starts an upload of a split's whole membership. Fails with `Conflict` while another
    /// upload of the same split runs.
    pub fn begin(
        self: &Arc<Self>,
        audience: &str,
        split: &str,
    ) -> Result<SnapshotUpload, SnapshotError> {
        // Audience and split ids are letters, digits, '-' and '_' (checked at ingest), so
        // they are safe in a file name and '.' cannot be part of either.
        let dir = self.dir.join(format!("{audience}.{split}"));
        if !self
            .uploads
            .lock()
            .expect("snapshot upload lock poisoned")
            .insert(dir.clone())
        {
            return Err(SnapshotError::Conflict(format!(
                "a snapshot of audience {audience} split {split} is already being uploaded"
            )));
        }
        let mut upload = SnapshotUpload {
            snapshots: Arc::clone(self),
            audience: audience.to_string(),
            split: split.to_string(),
            dir,
            current: None,
            buffer: Vec::new(),
            buffered_bytes: 0,
            run_bytes: RUN_BYTES,
            full: false,
            spilled_bytes: 0,
            unfinished: None,
            runs: Vec::new(),
        };
        upload.prepare()?;
        Ok(upload)
    }
}

/// A member's bytes in a member file: a kind byte, then the id. Snapshots address users by
/// `external_id` or `braze_id` (`members.rs`); the other forms are encoded so the mapping
/// stays total, with the alias name length-prefixed so it cannot run into the label.
fn user_bytes(user: &UserId) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + user.value().len());
    match user {
        UserId::External(id) => {
            k.push(b'e');
            k.extend_from_slice(id.as_bytes());
        }
        UserId::Braze(id) => {
            k.push(b'b');
            k.extend_from_slice(id.as_bytes());
        }
        UserId::Email(id) => {
            k.push(b'm');
            k.extend_from_slice(id.as_bytes());
        }
        UserId::Phone(id) => {
            k.push(b'p');
            k.extend_from_slice(id.as_bytes());
        }
        UserId::Alias { name, label } => {
            k.push(b'a');
            k.extend_from_slice(&(name.len().min(u16::MAX as usize) as u16).to_be_bytes());
            k.extend_from_slice(name.as_bytes());
            k.extend_from_slice(label.as_bytes());
        }
    }
    k
}

fn user_from(bytes: &[u8]) -> Option<UserId> {
    let (kind, rest) = bytes.split_first()?;
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).ok();
    match kind {
        b'e' => Some(UserId::External(text(rest)?)),
        b'b' => Some(UserId::Braze(text(rest)?)),
        b'm' => Some(UserId::Email(text(rest)?)),
        b'p' => Some(UserId::Phone(text(rest)?)),
        b'a' => {
            let len = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
            let name = text(rest.get(2..2 + len)?)?;
            let label = text(rest.get(2 + len..)?)?;
            Some(UserId::Alias { name, label })
        }
        _ => None,
    }
}

/// The generation and file `CURRENT` names in a split's directory, if it has one.
fn current_file(dir: &Path) -> Result<Option<(u64, PathBuf)>, SnapshotError> {
    match fs::read_to_string(dir.join(CURRENT)) {
        Ok(name) => {
            let name = name.trim().to_string();
            let generation = name
                .strip_prefix("gen-")
                .and_then(|n| n.strip_suffix(".members"))
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| {
                    SnapshotError::Corrupt(format!(
                        "{} names {name:?}",
                        dir.join(CURRENT).display()
                    ))
                })?;
            Ok(Some((generation, dir.join(name))))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The members of a split's last complete snapshot, read from its file, in file order.
/// Needs no database, so it runs beside a running daemon (a file an upload replaces meanwhile
/// stays readable while open).
pub struct SnapshotMembers {
    members: Members,
    /// Members counted in the file, for progress (`len` of the iteration).
    pub count: u64,
}

impl SnapshotMembers {
    /// `None` if the split has no snapshot under `data_dir`.
    pub fn open(
        data_dir: &Path,
        audience: &str,
        split: &str,
    ) -> Result<Option<SnapshotMembers>, SnapshotError> {
        let dir = data_dir
            .join("snapshots")
            .join(format!("{audience}.{split}"));
        let Some((_, path)) = current_file(&dir)? else {
            return Ok(None);
        };
        let mut counting = Members::open(&path)?;
        let mut count = 0;
        while counting.next()?.is_some() {
            count += 1;
        }
        let members = Members::open(&path)?;
        Ok(Some(SnapshotMembers { members, count }))
    }
}

impl Iterator for SnapshotMembers {
    type Item = io::Result<UserId>;

    fn next(&mut self) -> Option<io::Result<UserId>> {
        loop {
            match self.members.next() {
                Ok(Some(bytes)) => match user_from(&bytes) {
                    Some(user) => return Some(Ok(user)),
                    None => continue,
                },
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// Reads a member file (or a run) in order.
struct Members(BufReader<File>);

impl Members {
    fn open(path: &Path) -> io::Result<Members> {
        let mut r = BufReader::with_capacity(1 << 16, File::open(path)?);
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a member file", path.display()),
            ));
        }
        Ok(Members(r))
    }

    fn next(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut len = [0u8; 2];
        match self.0.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let mut m = vec![0u8; u16::from_be_bytes(len) as usize];
        self.0.read_exact(&mut m)?;
        Ok(Some(m))
    }
}

fn write_members<'m>(path: &Path, members: impl Iterator<Item = &'m Vec<u8>>) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(1 << 16, File::create(path)?);
    w.write_all(MAGIC)?;
    for m in members {
        write_member(&mut w, m)?;
    }
    w.into_inner().map_err(|e| e.into_error())?.sync_data()
}

fn write_member(w: &mut impl Write, m: &[u8]) -> io::Result<()> {
    // Ids are at most 987 bytes (checked at ingest): the length fits in two bytes.
    w.write_all(&(m.len() as u16).to_be_bytes())?;
    w.write_all(m)
}

/// An upload in progress. Dropping it without `finish` abandons it: `CURRENT` does not move.
pub struct SnapshotUpload {
    snapshots: Arc<Snapshots>,
    audience: String,
    split: String,
    dir: PathBuf,
    current: Option<(u64, PathBuf)>,
    buffer: Vec<Vec<u8>>,
    buffered_bytes: usize,
    /// Spill to a sorted run past this many buffered bytes.
    run_bytes: usize,
    /// Queue every member, past the skip of unchanged values (`full`).
    full: bool,
    /// Bytes written to runs so far.
    spilled_bytes: u64,
    /// The next generation's file while `finish` writes it; removed if the upload fails.
    unfinished: Option<PathBuf>,
    runs: Vec<PathBuf>,
}

impl Drop for SnapshotUpload {
    /// Frees the split, and removes what an upload that did not finish left: its sorted runs
    /// and a generation file `CURRENT` does not name. (After `finish`, the runs are gone.)
    fn drop(&mut self) {
        for run in self.runs.drain(..) {
            let _ = fs::remove_file(run);
        }
        if let Some(path) = self.unfinished.take() {
            let _ = fs::remove_file(path);
        }
        self.snapshots
            .uploads
            .lock()
            .expect("snapshot upload lock poisoned")
            .remove(&self.dir);
    }
}

impl SnapshotUpload {
    /// Reads `CURRENT` and removes what earlier uploads left behind.
    fn prepare(&mut self) -> Result<(), SnapshotError> {
        // `snapshots/` and the split's directory are synced into their parents: `CURRENT`
        // and the member file are only durable with them.
        create_dir_durable(&self.dir)?;
        let current = clean_split_dir(&self.dir)?;
        self.current = current;
        Ok(())
    }
}

/// Removes from a split's directory every file but `CURRENT` and the generation it names:
/// what uploads that never finished left (runs, an unfinished generation). Returns the
/// current generation.
fn clean_split_dir(dir: &Path) -> Result<Option<(u64, PathBuf)>, SnapshotError> {
    let current = current_file(dir)?;
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let keep = path.file_name() == Some(CURRENT.as_ref())
            || current.as_ref().is_some_and(|(_, p)| *p == path);
        if !keep {
            fs::remove_file(&path)?;
        }
    }
    Ok(current)
}

/// At open: cleans every split's directory (`clean_split_dir`), so spill files of an upload
/// a crash interrupted do not hold disk until that split's next upload.
fn clean_snapshot_dirs(snapshot_dir: &Path) -> Result<(), SnapshotError> {
    let entries = match fs::read_dir(snapshot_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            clean_split_dir(&entry.path())?;
        }
    }
    Ok(())
}

impl SnapshotUpload {
    /// Sorts in runs of this many bytes instead of `RUN_BYTES` (tests use tiny runs to
    /// exercise the merge).
    pub fn with_run_bytes(mut self, bytes: usize) -> Self {
        self.run_bytes = bytes.max(1);
        self
    }

    /// Queues every member's value, not only the differences, and past the skip of unchanged
    /// values (`QueueSettings::skip_unchanged_for`): for when Braze may not hold what was sent
    /// (profiles created since, values changed out of band).
    pub fn full(mut self) -> Self {
        self.full = true;
        self
    }

    /// Adds a member (duplicates count once).
    pub fn add(&mut self, user: &UserId) -> Result<(), SnapshotError> {
        let m = user_bytes(user);
        self.buffered_bytes += m.len() + 24;
        self.buffer.push(m);
        if self.buffered_bytes >= self.run_bytes {
            self.spill()?;
        }
        Ok(())
    }

    /// Sorts what is buffered into a run file, within the queue's bounds: the free-disk
    /// reserve (a full disk would stop the queue) and `queue.max_disk_bytes` for what the
    /// upload has spilled (a snapshot bigger than that is refused).
    fn spill(&mut self) -> Result<(), SnapshotError> {
        let queue = &self.snapshots.queue;
        queue.check_bounds(0)?;
        self.spilled_bytes += self.buffered_bytes as u64;
        if self.spilled_bytes > queue.max_disk_bytes() {
            return Err(SnapshotError::Refused(format!(
                "the snapshot is over {} bytes (queue.max_disk_bytes) once sorted; split the \
                 audience or raise the bound",
                queue.max_disk_bytes()
            )));
        }
        self.buffer.sort_unstable();
        self.buffer.dedup();
        let path = self.dir.join(format!("run-{:04}.tmp", self.runs.len()));
        write_members(&path, self.buffer.iter())?;
        self.buffer.clear();
        self.buffered_bytes = 0;
        self.runs.push(path);
        Ok(())
    }

    /// Merges the runs into the next generation while diffing it against the current one,
    /// queues `true` for users who entered and `false` for those who left (durably), then
    /// makes the new generation current.
    pub async fn finish(mut self, allow_empty: bool) -> Result<SnapshotReport, SnapshotError> {
        self.spill()?;
        let generation = self.current.as_ref().map_or(1, |(g, _)| g + 1);
        let name = format!("gen-{generation:06}.members");
        let new_path = self.dir.join(&name);
        self.unfinished = Some(new_path.clone());
        let mut out = BufWriter::with_capacity(1 << 16, File::create(&new_path)?);
        out.write_all(MAGIC)?;

        // The new members, in order, without duplicates: a k-way merge of the runs.
        let mut runs = self
            .runs
            .iter()
            .map(|p| Members::open(p))
            .collect::<io::Result<Vec<_>>>()?;
        let mut heap = BinaryHeap::new();
        for (i, run) in runs.iter_mut().enumerate() {
            if let Some(m) = run.next()? {
                heap.push(Reverse((m, i)));
            }
        }
        let mut next_new = |heap: &mut BinaryHeap<Reverse<(Vec<u8>, usize)>>,
                            last: &mut Option<Vec<u8>>|
         -> io::Result<Option<Vec<u8>>> {
            while let Some(Reverse((m, i))) = heap.pop() {
                if let Some(n) = runs[i].next()? {
                    heap.push(Reverse((n, i)));
                }
                if last.as_ref() != Some(&m) {
                    *last = Some(m.clone());
                    return Ok(Some(m));
                }
            }
            Ok(None)
        };
        let mut old = match &self.current {
            Some((_, path)) => Some(Members::open(path)?),
            None => None,
        };
        let next_old = |old: &mut Option<Members>| -> io::Result<Option<Vec<u8>>> {
            match old {
                Some(o) => o.next(),
                None => Ok(None),
            }
        };

        let mut report = SnapshotReport {
            generation,
            ..SnapshotReport::default()
        };
        let mut last = None;
        let (mut a, mut b) = (next_old(&mut old)?, next_new(&mut heap, &mut last)?);
        if b.is_none() && !allow_empty {
            return Err(SnapshotError::Refused(
                "the snapshot is empty; an empty export is more often a broken export than an \
                 emptied audience. To really empty the split, send it again with ?allow_empty=true"
                    .into(),
            ));
        }
        let mut chunk = Vec::with_capacity(STAGE);
        let mut staged = 0;
        let queue = Arc::clone(&self.snapshots.queue);
        let mut staged_all = Staged::default();
        loop {
            let (user, member, resent) = match (&a, &b) {
                (None, None) => break,
                (Some(x), Some(y)) if x == y => {
                    write_member(&mut out, y)?;
                    report.members += 1;
                    report.unchanged += 1;
                    let user = y.clone();
                    a = next_old(&mut old)?;
                    b = next_new(&mut heap, &mut last)?;
                    if !self.full {
                        continue;
                    }
                    report.resent += 1;
                    (user, true, true)
                }
                (Some(x), Some(y)) if x < y => {
                    let user = x.clone();
                    a = next_old(&mut old)?;
                    (user, false, false)
                }
                (Some(x), None) => {
                    let user = x.clone();
                    a = next_old(&mut old)?;
                    (user, false, false)
                }
                (_, Some(y)) => {
                    write_member(&mut out, y)?;
                    report.members += 1;
                    let user = y.clone();
                    b = next_new(&mut heap, &mut last)?;
                    (user, true, false)
                }
            };
            match (member, resent) {
                (_, true) => {}
                (true, false) => report.entered += 1,
                (false, false) => report.exited += 1,
            }
            let Some(user) = user_from(&user) else {
                continue;
            };
            chunk.push(Record::Membership(Membership {
                user,
                audience_id: self.audience.clone(),
                split_id: self.split.clone(),
                member,
                time: None,
            }));
            if chunk.len() >= STAGE {
                staged_all = staged_all.and(queue.stage_blocking(&chunk, !self.full)?);
                staged += chunk.len();
                chunk.clear();
                if staged >= CHUNK {
                    queue.commit_staged(std::mem::take(&mut staged_all)).await?;
                    staged = 0;
                }
            }
        }
        if !chunk.is_empty() {
            staged_all = staged_all.and(queue.stage_blocking(&chunk, !self.full)?);
        }
        queue.commit_staged(staged_all).await?;

        // Only now, with every difference durable, does this snapshot become the reference.
        // The new file's data and entry are durable before `CURRENT` names it.
        out.into_inner().map_err(|e| e.into_error())?.sync_data()?;
        sync_dir(&self.dir)?;
        write_atomically(&self.dir.join(CURRENT), name.as_bytes())?;
        if let Some((_, path)) = &self.current {
            fs::remove_file(path)?;
        }
        for run in self.runs.drain(..) {
            let _ = fs::remove_file(run);
        }
        self.unfinished = None;
        Ok(report)
    }
}
