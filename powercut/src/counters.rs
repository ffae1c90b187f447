//! Operation counters, for test messages ("the daemon fsynced N times").

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of what the mount has seen since [`PowerCut::mount`](crate::PowerCut::mount),
/// across cuts. Calls are counted when they arrive, including failed and trapped ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// File syncs: `fsync(2)` and `fdatasync(2)` of regular files (and `O_SYNC`/`O_DSYNC`
    /// writes, which the kernel turns into syncs).
    pub fsyncs: u64,
    /// The part of `fsyncs` that asked for data only (`fdatasync(2)`, `O_DSYNC`).
    pub fdatasyncs: u64,
    /// Directory syncs: `fsync(2)` of a directory.
    pub fsyncdirs: u64,
    /// Write requests.
    pub writes: u64,
    /// Bytes in write requests.
    pub bytes_written: u64,
    /// Power cuts.
    pub cuts: u64,
}

#[derive(Debug, Default)]
pub(crate) struct CounterCells {
    pub fsyncs: AtomicU64,
    pub fdatasyncs: AtomicU64,
    pub fsyncdirs: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_written: AtomicU64,
    pub cuts: AtomicU64,
}

impl CounterCells {
    pub(crate) fn bump(cell: &AtomicU64, by: u64) {
        cell.fetch_add(by, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Counters {
        let get = |cell: &AtomicU64| cell.load(Ordering::Relaxed);
        Counters {
            fsyncs: get(&self.fsyncs),
            fdatasyncs: get(&self.fdatasyncs),
            fsyncdirs: get(&self.fsyncdirs),
            writes: get(&self.writes),
            bytes_written: get(&self.bytes_written),
            cuts: get(&self.cuts),
        }
    }
}
