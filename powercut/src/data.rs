//! The data of one regular file: a backing file plus an undo log of what a cut must restore.
//!
//! Every write goes straight to the backing file, so reads always see the live content. What a
//! power cut would keep is described by two things:
//!
//! * `durable_size`: the file's size at its last fsync/fdatasync (0 for a new file);
//! * `undo`: for each [`CHUNK`]-sized, [`CHUNK`]-aligned region that was changed since then and
//!   lies (partly) below `durable_size`, the durable bytes of that region, saved before the
//!   first change touched it.
//!
//! Invariant: the durable content of the file is the backing file with every saved chunk
//! written back over it, cut to `durable_size`. In particular every byte of
//! `[size, durable_size)` (bytes a shrink destroyed) lies in a saved chunk, so a chunk that
//! is not saved yet is always readable from the backing file in full.
//!
//! A sync drops the log, so memory holds only what changed since the last sync, and neither a
//! write nor a sync costs more than the bytes it touches.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Granularity of the undo log, in bytes.
pub(crate) const CHUNK: u64 = 4096;

/// What rolling one file back to its durable state did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rollback {
    /// Whether the live content differed from the durable content at all.
    pub changed: bool,
    /// Bytes of durable content written back.
    pub restored: u64,
    /// Bytes beyond the durable size that were cut off.
    pub truncated: u64,
}

/// One regular file's backing file and undo log. See the module docs for the invariant.
#[derive(Debug)]
pub(crate) struct FileData {
    file: File,
    size: u64,
    durable_size: u64,
    undo: HashMap<u64, Box<[u8]>>,
}

impl FileData {
    /// Creates the (new, empty) backing file at `path`.
    pub(crate) fn create(path: &Path) -> io::Result<FileData> {
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(FileData {
            file,
            size: 0,
            durable_size: 0,
            undo: HashMap::new(),
        })
    }

    /// The live size.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Reads up to `len` bytes at `offset` of the live content (short at end of file).
    pub(crate) fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        if offset >= self.size {
            return Ok(Vec::new());
        }
        let len = (self.size - offset).min(u64::from(len)) as usize;
        let mut buf = vec![0; len];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    /// Writes `data` at `offset`; a write past the end leaves a hole of zeros.
    pub(crate) fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        if data.is_empty() {
            return Ok(());
        }
        self.preserve(offset, end)?;
        let written = self.file.write_all_at(data, offset);
        self.settle(written, end)
    }

    /// Sets the live size (truncate or extend with zeros).
    pub(crate) fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.preserve(len.min(self.size), len.max(self.size))?;
        self.file.set_len(len)?;
        self.size = len;
        Ok(())
    }

    /// `fallocate(2)` on the backing file. Every mode that only allocates, zeroes or punches
    /// `[offset, offset + len)` is accepted; modes that shift data (collapse, insert) are not.
    pub(crate) fn fallocate(&mut self, offset: u64, len: u64, mode: i32) -> io::Result<()> {
        let known =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        let end = offset
            .checked_add(len)
            .filter(|end| i64::try_from(*end).is_ok())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        self.preserve(offset, end)?;
        // SAFETY: plain syscall on a descriptor this struct owns; both values fit in off_t.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        let result = if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        };
        let new_end = if mode & libc::FALLOC_FL_KEEP_SIZE == 0 {
            end
        } else {
            0
        };
        self.settle(result, new_end)
    }

    /// fsync/fdatasync: the live content becomes the durable content.
    pub(crate) fn sync(&mut self) {
        self.undo = HashMap::new();
        self.durable_size = self.size;
    }

    /// Restores the durable content (the power cut) and returns what that took.
    pub(crate) fn rollback(&mut self) -> io::Result<Rollback> {
        let mut report = Rollback {
            changed: !self.undo.is_empty() || self.size != self.durable_size,
            restored: 0,
            truncated: self.size.saturating_sub(self.durable_size),
        };
        for (chunk, bytes) in std::mem::take(&mut self.undo) {
            self.file.write_all_at(&bytes, chunk * CHUNK)?;
            report.restored += bytes.len() as u64;
        }
        self.file.set_len(self.durable_size)?;
        self.size = self.durable_size;
        Ok(report)
    }

    /// Saves the durable bytes of every chunk meeting `[start, end)` below the durable size
    /// that is not saved yet in this sync epoch.
    fn preserve(&mut self, start: u64, end: u64) -> io::Result<()> {
        let end = end.min(self.durable_size);
        if start >= end {
            return Ok(());
        }
        for chunk in start / CHUNK..=(end - 1) / CHUNK {
            if self.undo.contains_key(&chunk) {
                continue;
            }
            let from = chunk * CHUNK;
            let to = (from + CHUNK).min(self.durable_size);
            let mut bytes = vec![0; (to - from) as usize].into_boxed_slice();
            self.file.read_exact_at(&mut bytes, from)?;
            self.undo.insert(chunk, bytes);
        }
        Ok(())
    }

    /// Updates the live size after an operation that may have extended the file to `end`.
    /// On failure the backing file may have changed partly, so its size is read back.
    fn settle(&mut self, result: io::Result<()>, end: u64) -> io::Result<()> {
        match result {
            Ok(()) => {
                self.size = self.size.max(end);
                Ok(())
            }
            Err(err) => {
                if let Ok(meta) = self.file.metadata() {
                    self.size = meta.len();
                }
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator, so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn write_ref(buf: &mut Vec<u8>, offset: u64, data: &[u8]) {
        let end = offset as usize + data.len();
        if buf.len() < end {
            buf.resize(end, 0);
        }
        buf[offset as usize..end].copy_from_slice(data);
    }

    fn contents(f: &FileData) -> Vec<u8> {
        f.read(0, u32::MAX).unwrap()
    }

    /// Random writes, truncations, extensions, hole punches and syncs; after each rollback the
    /// file must equal a plain in-memory copy taken at the last sync.
    #[test]
    fn rollback_restores_last_synced_content() {
        let dir = tempfile::tempdir().unwrap();
        for seed in 1..=40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let mut f = FileData::create(&dir.path().join(seed.to_string())).unwrap();
            let mut live = Vec::new();
            let mut durable = Vec::new();
            for _ in 0..300 {
                match rng.below(20) {
                    0..=10 => {
                        let offset = rng.below(5 * CHUNK);
                        let len = 1 + rng.below(2 * CHUNK) as usize;
                        let byte = rng.next() as u8;
                        let data = vec![byte; len];
                        f.write(offset, &data).unwrap();
                        write_ref(&mut live, offset, &data);
                    }
                    11..=12 => {
                        let len = rng.below(6 * CHUNK);
                        f.set_len(len).unwrap();
                        live.resize(len as usize, 0);
                    }
                    13 => {
                        let offset = rng.below(5 * CHUNK);
                        let len = 1 + rng.below(2 * CHUNK);
                        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                        f.fallocate(offset, len, mode).unwrap();
                        let end = ((offset + len) as usize).min(live.len());
                        if (offset as usize) < end {
                            live[offset as usize..end].fill(0);
                        }
                    }
                    14..=16 => {
                        f.sync();
                        durable = live.clone();
                    }
                    17 => {
                        f.rollback().unwrap();
                        live = durable.clone();
                    }
                    _ => {
                        assert_eq!(contents(&f), live, "seed {seed}: live content");
                    }
                }
            }
            f.rollback().unwrap();
            assert_eq!(contents(&f), durable, "seed {seed}: durable content");
        }
    }

    #[test]
    fn sync_bounds_the_log_to_changes_since() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = FileData::create(&dir.path().join("f")).unwrap();
        f.write(0, &vec![1; 10 * CHUNK as usize]).unwrap();
        assert!(
            f.undo.is_empty(),
            "appends past the durable size need no undo"
        );
        f.sync();
        f.write(3, b"xy").unwrap();
        f.write(CHUNK - 1, b"ab").unwrap();
        assert_eq!(f.undo.len(), 2, "one saved chunk per chunk touched");
        f.sync();
        assert!(f.undo.is_empty());
        f.write(5 * CHUNK, b"z").unwrap();
        let report = f.rollback().unwrap();
        assert_eq!(
            report,
            Rollback {
                changed: true,
                restored: CHUNK,
                truncated: 0
            }
        );
        assert_eq!(contents(&f)[5 * CHUNK as usize], 1);
    }
}
