//! The events lane: an append-only log of segment files under `DATA_DIR/queue/events/`.
//!
//! Events are only ever appended and drained in order, so they need none of sled's page
//! cache, node copies or log buffers. Here a request's events are written once, as frames at
//! the end of the active segment, and the group committer makes them durable with one
//! `fdatasync`. A segment file is deleted once every event in it has left the queue. The log
//! never rewrites an acknowledged frame: it only cuts off what was never acknowledged (a torn
//! tail, a failed append) and seals damaged ranges (`Damage::seal`) once their bytes are in
//! the dead letters.
//!
//! **Frame** (little-endian): `magic u32 | len u32 | count u32 | first_seq u64 | crc32 u32 |
//! payload[len]`. The payload is an event chunk exactly as `format::event_entries` reads it
//! (or a bare envelope for one event whose seq is `first_seq`); the CRC covers `count`,
//! `first_seq` and the payload. `count` lets the log be indexed at open from headers alone.
//!
//! **What has left the queue** is kept in the queue's sled tree, not here, as one value
//! (`format::META_EVENTS_GONE`, rewritten by completions and synced without anyone waiting
//! for it: losing it in a crash only means sending some events again, at least once). It
//! holds the *watermark* (every chunk whose first seq is below it is gone), the queue's next
//! seq, and a *marker* for each chunk above the watermark that is partly or wholly gone.
//! Markers are few: delivery takes chunks in order, so only chunks leased out of order by
//! concurrent workers, and the one a batch ended in, sit above the watermark. One key,
//! because sled's cost is per key written.
//!
//! **At open** the segments are indexed from their frame headers (one `pread` per header).
//! The newest segment's tail is checked: a partial frame, or a last frame whose CRC fails, is
//! a write a crash cut short, never acknowledged (acknowledgement waits for the sync), and is
//! cut off. Where a header cannot be read but a sound frame follows, the bytes between are
//! set aside for the dead letters. Appends always go to a new segment after a restart. A
//! frame whose CRC fails elsewhere is found when it is leased and moved to the dead letters,
//! like any record that no longer decodes.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::format;

const MAGIC: u32 = 0x3145_5141; // "AQE1"
const HEADER: usize = 24;
const EXTENSION: &str = "seg";

/// A segment is closed once it reaches this size. Small enough that a drained backlog gives
/// its disk back in steps, large enough that a 10 million event backlog is a few hundred files.
const SEGMENT_BYTES: u64 = 8 << 20;

/// Payloads kept in memory after an append or a read: a lease then need not read back what
/// ingest has just written, nor re-read the chunk the last lease left half-taken.
const CACHE_BYTES: usize = 4 << 20;

/// A drained active segment at least this large is closed and deleted rather than appended to
/// further, so an idle queue holds little disk.
const RETIRE_BYTES: u64 = 1 << 20;

/// A chunk to append: its first seq, its event count and its payload.
pub type Frame = (u64, u32, Vec<u8>);

/// One frame of the log: a chunk of one request's events.
#[derive(Debug)]
pub struct Chunk {
    segment: u64,
    offset: u64,
    len: u32,
    /// Events in the frame, gone or not.
    pub count: u32,
    /// Seqs already gone (delivered, dead-lettered or moved aside), in no order.
    pub gone: Vec<u64>,
    /// Events of the chunk currently leased to a worker: a lease skips a chunk whose every
    /// remaining event is out, without reading it.
    pub leased: u32,
}

impl Chunk {
    pub fn live(&self) -> u64 {
        u64::from(self.count).saturating_sub(self.gone.len() as u64)
    }

    /// Every event not gone is leased: nothing here for another lease.
    pub fn all_out(&self) -> bool {
        self.live() <= u64::from(self.leased)
    }
}

/// What the queue's sled tree says has left the log (see the module doc).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct GoneState {
    pub watermark: u64,
    /// The queue's next seq when this was written.
    pub next_seq: u64,
    /// Chunk first seq → the seqs gone, or `None` for the whole chunk.
    pub markers: BTreeMap<u64, Option<Vec<u64>>>,
}

/// A marker's count for a wholly gone chunk.
const WHOLE: u32 = u32::MAX;

impl GoneState {
    /// `[watermark u64][next_seq u64]` then per marker `[first u64][n u32][n × seq u64]`, with
    /// `n` = `u32::MAX` for a wholly gone chunk; big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.markers.len() * 12);
        out.extend_from_slice(&self.watermark.to_be_bytes());
        out.extend_from_slice(&self.next_seq.to_be_bytes());
        for (first, seqs) in &self.markers {
            out.extend_from_slice(&first.to_be_bytes());
            match seqs {
                None => out.extend_from_slice(&WHOLE.to_be_bytes()),
                Some(seqs) => {
                    out.extend_from_slice(&(seqs.len() as u32).to_be_bytes());
                    for seq in seqs {
                        out.extend_from_slice(&seq.to_be_bytes());
                    }
                }
            }
        }
        out
    }

    /// `None` if the value is damaged; the caller then starts from nothing gone, which only
    /// resends.
    pub fn decode(v: &[u8]) -> Option<GoneState> {
        let u64_at = |at: usize| Some(u64::from_be_bytes(v.get(at..at + 8)?.try_into().ok()?));
        let mut state = GoneState {
            watermark: u64_at(0)?,
            next_seq: u64_at(8)?,
            markers: BTreeMap::new(),
        };
        let mut at = 16;
        while at < v.len() {
            let first = u64_at(at)?;
            let n = u32::from_be_bytes(v.get(at + 8..at + 12)?.try_into().ok()?);
            at += 12;
            let seqs = if n == WHOLE {
                None
            } else {
                let seqs = (0..n as usize)
                    .map(|i| u64_at(at + 8 * i))
                    .collect::<Option<Vec<u64>>>()?;
                at += 8 * n as usize;
                Some(seqs)
            };
            state.markers.insert(first, seqs);
        }
        Some(state)
    }
}

/// Part of a segment that cannot be indexed: its bytes go to the dead letters.
#[derive(Debug)]
pub struct Damage {
    pub segment: PathBuf,
    pub offset: u64,
    pub bytes: Vec<u8>,
    pub why: String,
}

impl Damage {
    /// The bytes of `range` in a segment, set aside for `why`.
    fn read(
        file: &File,
        segment: &Path,
        range: std::ops::Range<u64>,
        why: &str,
    ) -> io::Result<Damage> {
        let mut bytes = vec![0u8; (range.end - range.start) as usize];
        file.read_exact_at(&mut bytes, range.start)?;
        Ok(Damage {
            segment: segment.to_path_buf(),
            offset: range.start,
            bytes,
            why: format!("event log segment damaged at byte {}: {why}", range.start),
        })
    }

    /// Once the damaged bytes are safe in the dead letters: makes the next open pass over
    /// them. A range that sound frames follow becomes a frame of no events (it is at least a
    /// header long: it began with a frame header); a range at the end is cut off.
    pub fn seal(&self) -> io::Result<()> {
        let file = OpenOptions::new().write(true).open(&self.segment)?;
        let size = file.metadata()?.len();
        let len = self.bytes.len();
        if self.offset + len as u64 >= size || len < HEADER {
            file.set_len(self.offset)?;
        } else {
            let mut frame = Vec::with_capacity(len);
            encode_frame(&mut frame, 0, 0, &vec![0u8; len - HEADER]);
            file.write_all_at(&frame, self.offset)?;
        }
        file.sync_data()
    }
}

pub struct EventLog {
    dir: PathBuf,
    chunks: BTreeMap<u64, Chunk>,
    /// Segment id → chunks still indexed in it.
    segments: BTreeMap<u64, usize>,
    active: Option<(u64, File, u64)>,
    /// The last segment read from, kept open: leases read the same one over and over.
    reader: Option<(u64, File)>,
    /// Written since the last sync: closed segments' ids, lengths, event counts and handles,
    /// whether the active one was written to, and whether a new file was created.
    unsynced: Vec<(u64, u64, u64, File)>,
    /// Events appended to the active segment.
    active_events: u64,
    active_unsynced: bool,
    dir_unsynced: bool,
    /// One past the highest seq ever appended or found.
    end_seq: u64,
    live: u64,
    /// Indexed chunks with some events gone: each has a marker.
    partial: BTreeSet<u64>,
    /// Chunks wholly gone that may sit above the watermark: each has a marker until the
    /// watermark passes it.
    whole: BTreeSet<u64>,
    /// Something left since `gone_value` last ran.
    changed: bool,
    /// Drained segments, deleted only once the tree that says so is synced (`maintain`):
    /// a segment may hold events that went to the dead letters, which must be durable first.
    deletable: Vec<u64>,
    next_id: u64,
    cache: HashMap<u64, Arc<Vec<u8>>>,
    /// Cached chunks, oldest first (some may have left the cache already).
    cache_order: VecDeque<u64>,
    cache_bytes: usize,
}

/// Makes the log's writes since the last `take_unsynced` durable.
pub struct Unsynced {
    /// Segment id, its length and events written when taken, its handle.
    files: Vec<(u64, u64, u64, File)>,
    dir: Option<PathBuf>,
}

impl Unsynced {
    /// Syncs; returns each segment synced with the length and event count now durable (for
    /// the ledger).
    pub fn sync(self) -> io::Result<Vec<(u64, u64, u64)>> {
        for (_, _, _, f) in &self.files {
            f.sync_data()?;
        }
        if let Some(dir) = self.dir {
            super::store::sync_dir(&dir)?;
        }
        Ok(self
            .files
            .iter()
            .map(|(id, len, events, _)| (*id, *len, *events))
            .collect())
    }
}

pub fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:010}.{EXTENSION}"))
}

fn crc(count: u32, first: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&count.to_le_bytes());
    h.update(&first.to_le_bytes());
    h.update(payload);
    h.finalize()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Appends one frame to `out`.
pub fn encode_frame(out: &mut Vec<u8>, first: u64, count: u32, payload: &[u8]) {
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&first.to_le_bytes());
    out.extend_from_slice(&crc(count, first, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Cuts a segment back to `len` bytes (what follows was never acknowledged, or is safe in the
/// dead letters).
fn cut(path: &Path, len: u64) -> io::Result<()> {
    OpenOptions::new().write(true).open(path)?.set_len(len)
}

/// The frame header at `offset` if there is one whose payload fits in the file.
fn header_at(file: &File, offset: u64, size: u64) -> Option<(u32, u32, u64, u32)> {
    let mut header = [0u8; HEADER];
    if offset + HEADER as u64 > size || file.read_exact_at(&mut header, offset).is_err() {
        return None;
    }
    parse_header(&header).filter(|(len, ..)| offset + (HEADER as u64) + u64::from(*len) <= size)
}

/// The offset of the next sound frame (header and checksum) at or after `from`, if any. Only
/// run on damage, so it may read the rest of the segment.
fn resync(file: &File, from: u64, size: u64) -> io::Result<Option<u64>> {
    if from >= size {
        return Ok(None);
    }
    let mut rest = vec![0u8; (size - from) as usize];
    file.read_exact_at(&mut rest, from)?;
    let magic = MAGIC.to_le_bytes();
    for at in 0..rest.len().saturating_sub(HEADER - 1) {
        if rest[at..at + 4] != magic {
            continue;
        }
        let header: &[u8; HEADER] = rest[at..at + HEADER].try_into().expect("header");
        let Some((len, count, first, sum)) = parse_header(header) else {
            continue;
        };
        let Some(payload) = rest.get(at + HEADER..at + HEADER + len as usize) else {
            continue;
        };
        if crc(count, first, payload) == sum {
            return Ok(Some(from + at as u64));
        }
    }
    Ok(None)
}

/// No queue hands out seqs this high (at a million records a second, 146,000 years). Headers
/// are indexed at open without their checksum (that would read every payload), so a damaged
/// one can claim any first seq; one up here would overflow the seq arithmetic that follows.
const MAX_SEQ: u64 = 1 << 62;

/// A frame header: payload length, event count, first seq, CRC. `None` if it is not one.
fn parse_header(h: &[u8; HEADER]) -> Option<(u32, u32, u64, u32)> {
    if u32_at(h, 0) != MAGIC {
        return None;
    }
    let first = u64::from_le_bytes(h[12..20].try_into().expect("8 bytes"));
    let count = u32_at(h, 8);
    if first.saturating_add(u64::from(count)) > MAX_SEQ {
        return None;
    }
    Some((u32_at(h, 4), count, first, u32_at(h, 20)))
}

impl EventLog {
    /// Indexes the segments under `dir`, skipping what `gone` says has left. Returns the log
    /// and any part of a segment that could not be indexed.
    pub fn open(dir: &Path, gone: &GoneState) -> io::Result<(EventLog, Vec<Damage>)> {
        // The directory's own entry, or a power cut could lose every segment with it.
        super::store::create_dir_durable(dir)?;
        let mut ids: Vec<u64> = fs::read_dir(dir)?
            .filter_map(|e| {
                let name = e.ok()?.file_name();
                let name = name.to_str()?;
                name.strip_suffix(&format!(".{EXTENSION}"))?.parse().ok()
            })
            .collect();
        ids.sort_unstable();
        let mut log = EventLog {
            dir: dir.to_path_buf(),
            chunks: BTreeMap::new(),
            segments: BTreeMap::new(),
            active: None,
            reader: None,
            unsynced: Vec::new(),
            active_events: 0,
            active_unsynced: false,
            dir_unsynced: false,
            end_seq: 0,
            live: 0,
            partial: BTreeSet::new(),
            whole: gone
                .markers
                .iter()
                .filter(|(f, seqs)| seqs.is_none() && **f >= gone.watermark)
                .map(|(f, _)| *f)
                .collect(),
            changed: false,
            deletable: Vec::new(),
            next_id: ids.last().map_or(1, |l| l + 1),
            cache: HashMap::new(),
            cache_order: VecDeque::new(),
            cache_bytes: 0,
        };
        let mut damage = Vec::new();
        // The newest segment with anything in it: the only one a crash can have cut short.
        let last = ids
            .iter()
            .rev()
            .find(|id| fs::metadata(segment_path(dir, **id)).is_ok_and(|m| m.len() > 0))
            .copied();
        for id in ids {
            let path = segment_path(dir, id);
            let file = File::open(&path)?;
            let size = file.metadata()?.len();
            let newest = Some(id) == last;
            let mut offset = 0u64;
            let mut indexed = 0usize;
            let damaged = damage.len();
            while offset < size {
                let Some((len, count, first, sum)) = header_at(&file, offset, size) else {
                    // No frame here. If a sound one follows, this is damage: set the bytes
                    // in between aside. If none does and this is the newest segment, it is a
                    // write a crash cut short, never acknowledged: cut it off.
                    let next = resync(&file, offset + 1, size)?;
                    if next.is_none() && newest {
                        tracing::warn!(segment = %path.display(), offset, "event log ends in a partial frame (a crash mid-write); cutting it off");
                        cut(&path, offset)?;
                        break;
                    }
                    let to = next.unwrap_or(size);
                    damage.push(Damage::read(&file, &path, offset..to, "no frame header")?);
                    offset = to;
                    continue;
                };
                let end = offset + HEADER as u64 + u64::from(len);
                if newest && end == size {
                    // The newest segment's last frame is checked: a torn one is cut off.
                    let mut payload = vec![0u8; len as usize];
                    file.read_exact_at(&mut payload, offset + HEADER as u64)?;
                    if crc(count, first, &payload) != sum {
                        tracing::warn!(segment = %path.display(), offset, "event log ends in a torn frame (a crash mid-write); cutting it off");
                        cut(&path, offset)?;
                        break;
                    }
                }
                // The seqs of every acknowledged event must count, sled may know none of them
                // (Braze down since they came); a damaged header can only push the next seq
                // higher than needed.
                let past = first.checked_add(u64::from(count.max(1))).unwrap_or(0);
                log.end_seq = log.end_seq.max(past);
                let gone_here = match gone.markers.get(&first) {
                    _ if first < gone.watermark => None,
                    Some(None) => None,
                    Some(Some(seqs)) => Some(seqs.clone()),
                    None => Some(Vec::new()),
                };
                if gone_here.is_some() && log.chunks.contains_key(&first) {
                    // Seqs only grow, so two frames never share a first seq: one of these
                    // headers is damaged, and which one cannot be told without reading both.
                    // The first stays; this one goes to the dead letters whole, not lost.
                    let why =
                        format!("a frame claims first seq {first}, which an earlier frame has");
                    damage.push(Damage::read(&file, &path, offset..end, &why)?);
                    offset = end;
                    continue;
                }
                if let Some(gone_seqs) = gone_here {
                    let chunk = Chunk {
                        segment: id,
                        offset,
                        len,
                        count,
                        gone: gone_seqs,
                        leased: 0,
                    };
                    if chunk.live() > 0 {
                        if !chunk.gone.is_empty() {
                            log.partial.insert(first);
                        }
                        log.live += chunk.live();
                        log.chunks.insert(first, chunk);
                        indexed += 1;
                    } else if first >= gone.watermark {
                        log.whole.insert(first);
                    }
                }
                offset = end;
            }
            // A segment with damage stays: its damaged bytes go to the dead letters, then
            // `Damage::seal` makes the next open pass over them.
            if indexed == 0 && damage.len() == damaged {
                fs::remove_file(&path)?;
                log.dir_unsynced = true;
            } else {
                log.segments.insert(id, indexed);
            }
        }
        Ok((log, damage))
    }

    /// Events not yet gone.
    pub fn live(&self) -> u64 {
        self.live
    }

    /// One past the highest seq the log has held (read from frame headers at open).
    pub fn end_seq(&self) -> u64 {
        self.end_seq
    }

    /// Chunks whose first seq is `from` or later, in order.
    pub fn chunks_from(&self, from: u64) -> impl Iterator<Item = (&u64, &Chunk)> {
        self.chunks.range(from..)
    }

    pub fn contains(&self, first: u64) -> bool {
        self.chunks.contains_key(&first)
    }

    pub fn chunk_mut(&mut self, first: u64) -> Option<&mut Chunk> {
        self.chunks.get_mut(&first)
    }

    /// Appends chunks (first seq, event count, payload) as frames, in one write. Nothing is
    /// durable until the next `take_unsynced().sync()`. On failure the segment is cut back,
    /// so a half-written frame never sits before later ones.
    pub fn append(&mut self, frames: Vec<Frame>) -> io::Result<()> {
        if frames.is_empty() {
            return Ok(());
        }
        // Seqs never repeat; if one ever did, refusing the request beats overwriting the index
        // entry of events still pending.
        if let Some((first, ..)) = frames.iter().find(|f| self.chunks.contains_key(&f.0)) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("event log already holds a chunk at seq {first}"),
            ));
        }
        if self
            .active
            .as_ref()
            .is_none_or(|(_, _, len)| *len >= SEGMENT_BYTES)
        {
            self.rotate()?;
        }
        let (id, file, len) = self.active.as_mut().expect("an active segment");
        let mut buf = Vec::with_capacity(frames.iter().map(|f| f.2.len() + HEADER).sum());
        let mut at = Vec::with_capacity(frames.len());
        for (first, count, payload) in &frames {
            at.push(*len + buf.len() as u64);
            encode_frame(&mut buf, *first, *count, payload);
        }
        if let Err(e) = file.write_all(&buf) {
            let _ = file.set_len(*len);
            return Err(e);
        }
        *len += buf.len() as u64;
        let id = *id;
        self.active_unsynced = true;
        self.active_events += frames.iter().map(|f| u64::from(f.1)).sum::<u64>();
        *self.segments.entry(id).or_default() += frames.len();
        for ((first, count, payload), offset) in frames.into_iter().zip(at) {
            self.chunks.insert(
                first,
                Chunk {
                    segment: id,
                    offset,
                    len: payload.len() as u32,
                    count,
                    gone: Vec::new(),
                    leased: 0,
                },
            );
            self.live += u64::from(count);
            self.end_seq = self.end_seq.max(first + u64::from(count.max(1)));
            self.remember(first, Arc::new(payload));
        }
        Ok(())
    }

    fn remember(&mut self, first: u64, payload: Arc<Vec<u8>>) {
        self.cache_bytes += payload.len();
        if let Some(old) = self.cache.insert(first, payload) {
            self.cache_bytes -= old.len();
        }
        self.cache_order.push_back(first);
        while self.cache_bytes > CACHE_BYTES {
            let Some(oldest) = self.cache_order.pop_front() else {
                break;
            };
            self.forget(oldest);
        }
        // Chunks that left the cache early (delivered) still have a place in the order: drop
        // those places now and then, or a busy idle-cache log would grow it for ever.
        if self.cache_order.len() > 2 * self.cache.len() + 64 {
            let cache = &self.cache;
            self.cache_order.retain(|f| cache.contains_key(f));
        }
    }

    fn forget(&mut self, first: u64) {
        if let Some(old) = self.cache.remove(&first) {
            self.cache_bytes -= old.len();
        }
    }

    fn rotate(&mut self) -> io::Result<()> {
        let id = self.next_id;
        self.next_id += 1;
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .read(true)
            .open(segment_path(&self.dir, id))?;
        let old_events = std::mem::take(&mut self.active_events);
        if let Some((old, old_file, old_len)) = self.active.take() {
            if std::mem::take(&mut self.active_unsynced) {
                self.unsynced.push((old, old_len, old_events, old_file));
            }
            if self.segments.get(&old).is_none_or(|n| *n == 0) {
                self.segments.remove(&old);
                self.deletable.push(old);
            }
        }
        self.dir_unsynced = true;
        self.segments.entry(id).or_default();
        self.active = Some((id, file, 0));
        Ok(())
    }

    /// The handles to sync for everything written so far; the sync itself runs without the
    /// log's lock.
    pub fn take_unsynced(&mut self) -> io::Result<Unsynced> {
        let mut files = std::mem::take(&mut self.unsynced);
        if self.active_unsynced {
            if let Some((id, file, len)) = &self.active {
                files.push((*id, *len, self.active_events, file.try_clone()?));
            }
            self.active_unsynced = false;
        }
        Ok(Unsynced {
            files,
            dir: std::mem::take(&mut self.dir_unsynced).then(|| self.dir.clone()),
        })
    }

    /// A chunk's payload, checked against its CRC. On failure, why, and whatever bytes could
    /// be read (for the dead letter).
    pub fn read(&mut self, first: u64) -> Result<Arc<Vec<u8>>, (String, Vec<u8>)> {
        if let Some(payload) = self.cache.get(&first) {
            return Ok(Arc::clone(payload));
        }
        let Some(chunk) = self.chunks.get(&first) else {
            return Err(("no such chunk".into(), Vec::new()));
        };
        let (segment, offset, len) = (chunk.segment, chunk.offset, chunk.len);
        let at = |what: String| format!("event log segment {segment} at byte {offset}: {what}");
        let mut buf = vec![0u8; HEADER + len as usize];
        let result = match &self.active {
            Some((id, file, _)) if *id == segment => file.read_exact_at(&mut buf, offset),
            _ => {
                if self.reader.as_ref().is_none_or(|(id, _)| *id != segment) {
                    let file = File::open(segment_path(&self.dir, segment))
                        .map_err(|e| (at(e.to_string()), Vec::new()))?;
                    self.reader = Some((segment, file));
                }
                let (_, file) = self.reader.as_ref().expect("just opened");
                file.read_exact_at(&mut buf, offset)
            }
        };
        result.map_err(|e| (at(e.to_string()), Vec::new()))?;
        let header: &[u8; HEADER] = buf[..HEADER].try_into().expect("header");
        let parsed = parse_header(header);
        let payload = buf.split_off(HEADER);
        match parsed {
            Some((l, count, f, sum)) if l == len && f == first => {
                if crc(count, f, &payload) == sum {
                    let payload = Arc::new(payload);
                    self.remember(first, Arc::clone(&payload));
                    Ok(payload)
                } else {
                    Err((at("checksum mismatch".into()), payload))
                }
            }
            _ => Err((at("frame header damaged".into()), payload)),
        }
    }

    /// Marks seqs of a chunk gone. Returns those that were not gone before; the chunk leaves
    /// the index once all are, and its segment becomes deletable (`take_deletable`) once it
    /// holds none.
    pub fn mark_gone(&mut self, first: u64, seqs: &[u64]) -> Vec<u64> {
        let Some(chunk) = self.chunks.get_mut(&first) else {
            return Vec::new();
        };
        let fresh: Vec<u64> = seqs
            .iter()
            .copied()
            .filter(|s| !chunk.gone.contains(s))
            .collect();
        if fresh.is_empty() {
            return fresh;
        }
        chunk.gone.extend(&fresh);
        self.live = self.live.saturating_sub(fresh.len() as u64);
        self.changed = true;
        if chunk.live() == 0 {
            self.remove_chunk(first);
        } else {
            self.partial.insert(first);
        }
        fresh
    }

    /// Takes a whole chunk out (a frame that no longer reads). Returns the events it held.
    pub fn drop_chunk(&mut self, first: u64) -> u64 {
        let Some(live) = self.chunks.get(&first).map(Chunk::live) else {
            return 0;
        };
        self.live = self.live.saturating_sub(live);
        self.changed = true;
        self.remove_chunk(first);
        live
    }

    fn remove_chunk(&mut self, first: u64) {
        let Some(chunk) = self.chunks.remove(&first) else {
            return;
        };
        self.partial.remove(&first);
        self.whole.insert(first);
        self.forget(first);
        let left = self.segments.entry(chunk.segment).or_default();
        *left = left.saturating_sub(1);
        if *left > 0 {
            return;
        }
        match &self.active {
            // The segment being appended to stays, unless a backlog drained out of it: then
            // the next append starts a new one and this one's disk comes back.
            Some((id, _, len)) if *id == chunk.segment => {
                if *len >= RETIRE_BYTES {
                    self.active = None;
                    self.segments.remove(&chunk.segment);
                    self.deletable.push(chunk.segment);
                }
            }
            _ => {
                self.segments.remove(&chunk.segment);
                self.deletable.push(chunk.segment);
            }
        }
    }

    /// Drained segments, handed over for `delete_segments`. Take them with the queue's writer
    /// lock held, so that the tree writes that drained them are all applied.
    pub fn take_deletable(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.deletable)
    }

    /// Deletes drained segments. Call only once the tree is synced after `take_deletable`.
    /// The deletes are not synced: a file a crash brings back holds only events below the
    /// watermark or marked gone.
    pub fn delete_segments(&mut self, ids: Vec<u64>) {
        for id in ids {
            if self.reader.as_ref().is_some_and(|(r, _)| *r == id) {
                self.reader = None;
            }
            if let Err(e) = fs::remove_file(segment_path(&self.dir, id)) {
                tracing::warn!(segment = id, error = %e, "could not delete a drained event log segment");
            }
        }
    }

    /// What has left the log, encoded for `format::META_EVENTS_GONE`, if anything left since
    /// the last call.
    pub fn gone_value(&mut self, next_seq: u64) -> Option<Vec<u8>> {
        if !std::mem::take(&mut self.changed) {
            return None;
        }
        let watermark = self.chunks.keys().next().copied().unwrap_or(self.end_seq);
        self.whole = self.whole.split_off(&watermark);
        let mut markers = BTreeMap::new();
        for first in &self.whole {
            markers.insert(*first, None);
        }
        for first in &self.partial {
            if let Some(chunk) = self.chunks.get(first) {
                markers.insert(*first, Some(chunk.gone.clone()));
            }
        }
        let state = GoneState {
            watermark,
            next_seq,
            markers,
        };
        Some(state.encode())
    }

    /// The segment files there are.
    pub fn segment_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.segments.keys().copied()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes the segments take on disk.
    pub fn disk_bytes(&self) -> u64 {
        super::store::dir_bytes(&self.dir)
    }
}

/// Reads `GoneState` from the queue tree. A damaged value counts as nothing gone, loudly: the
/// events it described are sent again, none is lost.
pub fn gone_state(tree: &sled::Tree) -> Result<GoneState, super::QueueError> {
    let Some(v) = tree.get(format::META_EVENTS_GONE)? else {
        return Ok(GoneState::default());
    };
    Ok(GoneState::decode(&v).unwrap_or_else(|| {
        tracing::error!(
            "the event log's progress record no longer decodes; pending events may be sent again"
        );
        GoneState::default()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_a_flipped_byte_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, damage) = EventLog::open(dir.path(), &GoneState::default()).unwrap();
        assert!(damage.is_empty());
        log.append(vec![
            (1, 1, b"one".to_vec()),
            (2, 2, b"two and three".to_vec()),
            (4, 1, b"four".to_vec()),
        ])
        .unwrap();
        log.take_unsynced().unwrap().sync().unwrap();
        assert_eq!(log.read(2).unwrap().as_slice(), b"two and three");
        assert_eq!(log.live(), 4);
        assert_eq!(log.end_seq(), 5);

        // The last byte of the middle frame's payload.
        let path = segment_path(dir.path(), 1);
        let mut bytes = fs::read(&path).unwrap();
        bytes[2 * HEADER + 3 + 13 - 1] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        // A fresh open: what was appended is no longer in memory.
        drop(log);
        let (mut log, _) = EventLog::open(dir.path(), &GoneState::default()).unwrap();
        assert!(log.read(2).unwrap_err().0.contains("checksum"));
        assert_eq!(log.read(4).unwrap().as_slice(), b"four");
    }

    /// Found by the `event_log` fuzz target: a header claiming a first seq near 2^64 (its
    /// checksum even sound) overflowed the lease's seq arithmetic. It is damage: set aside,
    /// and the frames around it still read.
    #[test]
    fn a_header_claiming_an_impossible_seq_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = Vec::new();
        encode_frame(&mut bytes, 1, 1, b"one");
        encode_frame(&mut bytes, u64::MAX - 1, 1, b"bogus");
        encode_frame(&mut bytes, 2, 1, b"two");
        fs::write(segment_path(dir.path(), 1), &bytes).unwrap();
        let (mut log, damage) = EventLog::open(dir.path(), &GoneState::default()).unwrap();
        assert_eq!(damage.len(), 1, "{damage:?}");
        assert_eq!(damage[0].bytes.len(), HEADER + 5);
        assert_eq!(log.read(1).unwrap().as_slice(), b"one");
        assert_eq!(log.read(2).unwrap().as_slice(), b"two");
        assert_eq!(log.end_seq(), 3);
    }

    /// A damaged header can also claim a plausible seq that an earlier frame has: that
    /// frame's events must reach the dead letters, not vanish at open.
    #[test]
    fn a_frame_repeating_a_first_seq_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = Vec::new();
        encode_frame(&mut bytes, 1, 1, b"one");
        encode_frame(&mut bytes, 1, 2, b"two and three");
        encode_frame(&mut bytes, 4, 1, b"four");
        fs::write(segment_path(dir.path(), 1), &bytes).unwrap();
        let (mut log, damage) = EventLog::open(dir.path(), &GoneState::default()).unwrap();
        assert_eq!(damage.len(), 1, "{damage:?}");
        assert_eq!(damage[0].bytes, bytes[HEADER + 3..2 * HEADER + 16]);
        assert_eq!(log.read(1).unwrap().as_slice(), b"one");
        assert_eq!(log.read(4).unwrap().as_slice(), b"four");
        assert_eq!(log.live(), 2);

        // Sealed once the dead letters hold it: the next open passes over it.
        damage[0].seal().unwrap();
        drop(log);
        let (log, damage) = EventLog::open(dir.path(), &GoneState::default()).unwrap();
        assert!(damage.is_empty(), "{damage:?}");
        assert_eq!(log.live(), 2);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_what_is_gone_stays_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = EventLog::open(dir.path(), &GoneState::default()).unwrap();
        log.append(vec![(1, 1, b"a".to_vec()), (2, 3, b"bcd".to_vec())])
            .unwrap();
        log.append(vec![(5, 1, b"e".to_vec())]).unwrap();
        assert_eq!(log.mark_gone(2, &[2, 3]), vec![2, 3]);
        let tree_state = GoneState::decode(&log.gone_value(9).unwrap()).unwrap();
        assert_eq!(log.gone_value(9), None, "nothing left since");
        assert_eq!(tree_state.next_seq, 9);
        assert_eq!(tree_state.markers.get(&2), Some(&Some(vec![2, 3])));
        assert_eq!(tree_state.watermark, 1);
        drop(log);
        // Half a frame at the end, as a crash mid-write leaves it.
        let path = segment_path(dir.path(), 1);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&MAGIC.to_le_bytes()).unwrap();
        f.write_all(&[9, 0, 0]).unwrap();
        drop(f);

        let (log, damage) = EventLog::open(dir.path(), &tree_state).unwrap();
        assert!(damage.is_empty());
        let live: Vec<(u64, u64)> = log.chunks_from(0).map(|(f, c)| (*f, c.live())).collect();
        assert_eq!(live, vec![(1, 1), (2, 1), (5, 1)]);
        assert_eq!(log.live(), 3);
        assert_eq!(fs::metadata(&path).unwrap().len() as usize, 3 * HEADER + 5);
    }

    use proptest::prelude::*;

    /// Frames (first seq, count, payload) written to a fresh log, and where each begins.
    fn written(dir: &Path, sizes: &[usize]) -> (Vec<Frame>, Vec<u64>) {
        let (mut log, _) = EventLog::open(dir, &GoneState::default()).unwrap();
        let mut frames = Vec::new();
        let mut starts = Vec::new();
        let mut at = 0u64;
        for (i, &size) in sizes.iter().enumerate() {
            let payload: Vec<u8> = (0..size).map(|b| (b * 7 + i) as u8).collect();
            frames.push((10 * i as u64 + 1, 1 + (i % 3) as u32, payload));
            starts.push(at);
            at += (HEADER + size) as u64;
        }
        for frame in &frames {
            log.append(vec![frame.clone()]).unwrap();
        }
        log.take_unsynced().unwrap().sync().unwrap();
        (frames, starts)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// A crash can cut the newest segment anywhere: every frame wholly before the cut
        /// comes back intact, nothing after it does, and nothing is reported damaged.
        #[test]
        fn a_cut_anywhere_keeps_every_whole_frame_before_it(
            sizes in proptest::collection::vec(1usize..300, 1..12),
            cut in any::<prop::sample::Index>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (frames, starts) = written(dir.path(), &sizes);
            let path = segment_path(dir.path(), 1);
            let size = fs::metadata(&path).unwrap().len();
            let cut = cut.index(size as usize + 1) as u64;
            OpenOptions::new().write(true).open(&path).unwrap().set_len(cut).unwrap();
            let (mut log, damage) = EventLog::open(dir.path(), &GoneState::default()).unwrap();
            prop_assert!(damage.is_empty());
            for (i, (first, _, payload)) in frames.iter().enumerate() {
                let whole = starts[i] + (HEADER + payload.len()) as u64 <= cut;
                prop_assert_eq!(log.contains(*first), whole);
                if whole {
                    let read = log.read(*first).unwrap();
                    prop_assert_eq!(read.as_slice(), &payload[..]);
                }
            }
        }

        /// A flipped bit anywhere never makes a frame read back wrong; one in a payload costs
        /// only the frame it is in.
        #[test]
        fn a_flipped_bit_never_reads_back_wrong(
            sizes in proptest::collection::vec(1usize..300, 2..12),
            at in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (frames, starts) = written(dir.path(), &sizes);
            let path = segment_path(dir.path(), 1);
            let mut bytes = fs::read(&path).unwrap();
            let at = at.index(bytes.len());
            bytes[at] ^= 1 << bit;
            fs::write(&path, &bytes).unwrap();
            let (mut log, _) = EventLog::open(dir.path(), &GoneState::default()).unwrap();
            let hit = starts.iter().rposition(|s| *s as usize <= at).unwrap();
            let in_payload = at >= starts[hit] as usize + HEADER;
            for (i, (first, _, payload)) in frames.iter().enumerate() {
                match log.read(*first) {
                    Ok(read) => prop_assert_eq!(read.as_slice(), &payload[..]),
                    Err(_) => prop_assert!(i == hit || !in_payload, "frame {} lost to a flip in frame {}", i, hit),
                }
                if in_payload && i != hit {
                    prop_assert!(log.contains(*first), "frame {} not indexed after a flip in frame {}", i, hit);
                }
            }
        }
    }
}
