//! Audience snapshots: the whole membership of a split, diffed against the previous one so
//! that only entries and exits are queued.
//!
//! **On-disk format** (state database, tree `snapshots`; changing it breaks databases):
//! - `'h' split` → `[1][generation u64 BE][members u64 BE]`: the current snapshot of a split;
//! - `'m' split generation user` → empty: one member of one generation.
//!
//! `split` is `len audience_id len split_id` (one length byte each; ids are at most 100
//! bytes, checked at ingest); `user` is `kind id` (`e` external, `b` braze), so a generation's
//! members iterate in a stable sorted order and two generations diff in one merged pass,
//! without holding either in memory.
//!
//! An upload writes generation `current + 1` beside the current one, diffs, queues the
//! differences (durably), and only then moves the head, with a sync. Anything that stops it
//! earlier (a bad line, a dropped connection, a crash) leaves the head where it was: the old
//! snapshot stays the reference, and the next upload first clears any generation that is not
//! the head. Differences queued by an upload that did not finish are queued again by the next
//! one; memberships are state, so that costs nothing (they coalesce or are skipped as
//! unchanged). One upload per split at a time: a second one is refused while the first runs.

use std::collections::HashSet;
use std::sync::Mutex;

use serde::Serialize;

use super::{Queue, QueueError};
use crate::record::{Membership, Record, UserId};

const HEAD: u8 = b'h';
const MEMBER: u8 = b'm';
const HEAD_V1: u8 = 1;
/// Members written per sled batch while staging, and updates queued per durable chunk.
const CHUNK: usize = 10_000;

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SnapshotReport {
    pub entered: u64,
    pub exited: u64,
    pub unchanged: u64,
    pub members: u64,
    pub generation: u64,
}

/// Splits with an upload in progress.
#[derive(Default)]
pub struct Uploads(Mutex<HashSet<Vec<u8>>>);

fn split_key(audience: &str, split: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + audience.len() + split.len());
    k.push(audience.len() as u8);
    k.extend_from_slice(audience.as_bytes());
    k.push(split.len() as u8);
    k.extend_from_slice(split.as_bytes());
    k
}

fn generation_prefix(split: &[u8], generation: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + split.len() + 8);
    k.push(MEMBER);
    k.extend_from_slice(split);
    k.extend_from_slice(&generation.to_be_bytes());
    k
}

fn user_bytes(user: &UserId) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + user.value().len());
    k.push(match user {
        UserId::External(_) => b'e',
        UserId::Braze(_) => b'b',
    });
    k.extend_from_slice(user.value().as_bytes());
    k
}

fn user_from(bytes: &[u8]) -> Option<UserId> {
    let (kind, id) = bytes.split_first()?;
    let id = String::from_utf8(id.to_vec()).ok()?;
    match kind {
        b'e' => Some(UserId::External(id)),
        b'b' => Some(UserId::Braze(id)),
        _ => None,
    }
}

/// An upload in progress. Dropping it without `finish` abandons it: the head does not move.
pub struct SnapshotUpload<'a> {
    queue: &'a Queue,
    audience: String,
    split: String,
    key: Vec<u8>,
    current: u64,
    generation: u64,
    prefix: Vec<u8>,
    batch: sled::Batch,
    in_batch: usize,
    members: u64,
}

impl Drop for SnapshotUpload<'_> {
    fn drop(&mut self) {
        self.queue
            .uploads
            .0
            .lock()
            .expect("snapshot upload lock poisoned")
            .remove(&self.key);
    }
}

impl Queue {
    /// Starts an upload of a split's whole membership. Fails with `Conflict` while another
    /// upload of the same split runs.
    pub fn begin_snapshot(
        &self,
        audience: &str,
        split: &str,
    ) -> Result<SnapshotUpload<'_>, QueueError> {
        let key = split_key(audience, split);
        if !self
            .uploads
            .0
            .lock()
            .expect("snapshot upload lock poisoned")
            .insert(key.clone())
        {
            return Err(QueueError::Conflict(format!(
                "a snapshot of audience {audience} split {split} is already being uploaded"
            )));
        }
        let upload = SnapshotUpload {
            queue: self,
            audience: audience.to_string(),
            split: split.to_string(),
            current: 0,
            generation: 0,
            prefix: Vec::new(),
            batch: sled::Batch::default(),
            in_batch: 0,
            members: 0,
            key,
        };
        upload.prepare()
    }
}

impl<'a> SnapshotUpload<'a> {
    fn tree(&self) -> &sled::Tree {
        &self.queue.state.snapshots
    }

    /// Reads the head and clears what earlier uploads left behind (any generation but it).
    fn prepare(mut self) -> Result<SnapshotUpload<'a>, QueueError> {
        let mut head_key = vec![HEAD];
        head_key.extend_from_slice(&self.key);
        self.current = match self.tree().get(&head_key)? {
            Some(v) if v.first() == Some(&HEAD_V1) && v.len() >= 9 => {
                u64::from_be_bytes(v[1..9].try_into().expect("8 bytes"))
            }
            _ => 0,
        };
        let mut all = vec![MEMBER];
        all.extend_from_slice(&self.key);
        let keep = generation_prefix(&self.key, self.current);
        let mut batch = sled::Batch::default();
        for item in self.tree().scan_prefix(&all).keys() {
            let k = item?;
            if !k.starts_with(&keep) {
                batch.remove(k);
            }
        }
        self.tree().apply_batch(batch)?;
        self.generation = self.current + 1;
        self.prefix = generation_prefix(&self.key, self.generation);
        Ok(self)
    }

    /// Adds members (duplicates count once).
    pub fn add(&mut self, user: &UserId) -> Result<(), QueueError> {
        let mut k = self.prefix.clone();
        k.extend_from_slice(&user_bytes(user));
        self.batch.insert(k, &[]);
        self.in_batch += 1;
        if self.in_batch >= CHUNK {
            self.flush_batch()?;
        }
        Ok(())
    }

    fn flush_batch(&mut self) -> Result<(), QueueError> {
        let batch = std::mem::take(&mut self.batch);
        self.in_batch = 0;
        self.queue.state.snapshots.apply_batch(batch)?;
        Ok(())
    }

    /// Diffs against the current snapshot, queues `true` for users who entered and `false`
    /// for those who left (durably), then makes this snapshot the current one.
    pub async fn finish(mut self, allow_empty: bool) -> Result<SnapshotReport, QueueError> {
        self.flush_batch()?;
        self.members = self.tree().scan_prefix(&self.prefix).keys().count() as u64;
        if self.members == 0 && !allow_empty {
            return Err(QueueError::Refused(
                "the snapshot is empty; an empty export is more often a broken export than an \
                 emptied audience. To really empty the split, send it again with ?allow_empty=true"
                    .into(),
            ));
        }
        let mut report = SnapshotReport {
            members: self.members,
            generation: self.generation,
            ..SnapshotReport::default()
        };
        let old_prefix = generation_prefix(&self.key, self.current);
        let mut old = self.tree().scan_prefix(&old_prefix);
        let mut new = self.tree().scan_prefix(&self.prefix);
        let next = |it: &mut sled::Iter, skip: usize| -> Result<Option<Vec<u8>>, QueueError> {
            Ok(it.next().transpose()?.map(|(k, _)| k[skip..].to_vec()))
        };
        let (mut a, mut b) = (
            next(&mut old, old_prefix.len())?,
            next(&mut new, self.prefix.len())?,
        );
        let mut chunk = Vec::with_capacity(CHUNK);
        // Both generations iterate in the same sorted order: one merged pass finds the users
        // only in the old one (exited) and only in the new one (entered).
        loop {
            let (user, member) = match (&a, &b) {
                (None, None) => break,
                (Some(x), Some(y)) if x == y => {
                    report.unchanged += 1;
                    a = next(&mut old, old_prefix.len())?;
                    b = next(&mut new, self.prefix.len())?;
                    continue;
                }
                (Some(x), Some(y)) if x < y => {
                    let user = x.clone();
                    a = next(&mut old, old_prefix.len())?;
                    (user, false)
                }
                (Some(x), None) => {
                    let user = x.clone();
                    a = next(&mut old, old_prefix.len())?;
                    (user, false)
                }
                (_, Some(y)) => {
                    let user = y.clone();
                    b = next(&mut new, self.prefix.len())?;
                    (user, true)
                }
            };
            let Some(user) = user_from(&user) else {
                continue;
            };
            if member {
                report.entered += 1;
            } else {
                report.exited += 1;
            }
            chunk.push(Record::Membership(Membership {
                user,
                audience_id: self.audience.clone(),
                split_id: self.split.clone(),
                member,
                time: None,
            }));
            if chunk.len() >= CHUNK {
                self.queue.enqueue(std::mem::take(&mut chunk)).await?;
            }
        }
        self.queue.enqueue(chunk).await?;

        // Only now, with every difference durable, does this snapshot become the reference.
        let mut head_key = vec![HEAD];
        head_key.extend_from_slice(&self.key);
        let mut head = vec![HEAD_V1];
        head.extend_from_slice(&self.generation.to_be_bytes());
        head.extend_from_slice(&self.members.to_be_bytes());
        self.tree().insert(head_key, head)?;
        self.queue.state.sync()?;
        // The old generation is garbage now; the next upload would clear it anyway.
        let mut batch = sled::Batch::default();
        for k in self.tree().scan_prefix(&old_prefix).keys() {
            batch.remove(k?);
        }
        self.tree().apply_batch(batch)?;
        Ok(report)
    }
}
