//! One generation of the queue database on disk, and the pointer that says which is current.
//!
//! sled never gives space back, so the queue lives in `queue/gen-NNNNNN/` and is rebuilt into
//! the next generation after a backlog drains. `queue/CURRENT` names the live generation; it is
//! replaced atomically (write, fsync, rename, fsync the directory), so a crash mid-rebuild
//! leaves either the old generation current or the new one complete and synced. Any other
//! generation directory found at open is a leftover and is removed; the one `CURRENT` names
//! never is, and when that one holds no database while another does, the open stops rather
//! than remove the other (`check_current`).

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::QueueError;

const CURRENT: &str = "CURRENT";
const GEN_PREFIX: &str = "gen-";

/// An open generation: the sled database plus what is needed to make its writes durable.
pub struct Store {
    pub db: sled::Db,
    pub tree: sled::Tree,
    pub generation: u64,
    pub dir: PathBuf,
    /// sled's log file, opened by us: `flush()` in sled 0.34.7 only calls `sync_file_range`,
    /// which persists neither the device cache nor metadata, so we `fdatasync` it ourselves.
    log_file: File,
    /// Blob files (values too big for a log segment) that we have already synced. sled writes
    /// them without any fsync.
    synced_blobs: Mutex<std::collections::HashSet<std::ffi::OsString>>,
    /// sled's snapshot files as of the last sync of this directory.
    synced_snapshots: Mutex<Vec<std::ffi::OsString>>,
}

impl Store {
    pub fn open(dir: &Path, generation: u64, cache_bytes: u64) -> Result<Store, QueueError> {
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            // The background flusher persists what no one waits for: delivery progress (a
            // crash sends again whatever it had not yet written) and deletes. Acknowledged
            // inserts never rely on it. Each round ends with an fsync of sled's file, so its
            // interval bounds those resends; the committer's progress sync
            // (`commit::PROGRESS_SYNC_EVERY`) usually makes them durable sooner.
            .flush_every_ms(Some(100));
        let db = open_sled_durably(&config, dir)?;
        let tree = db.open_tree("queue")?;
        let log_file = File::open(dir.join("db"))?;
        let snapshots = Mutex::new(sled_snapshots(dir)?);
        Ok(Store {
            db,
            tree,
            generation,
            dir: dir.to_path_buf(),
            log_file,
            synced_blobs: Mutex::new(Default::default()),
            synced_snapshots: snapshots,
        })
    }

    /// Makes every write done before the call durable: sled's flush, then a real fdatasync,
    /// then the directory entries sled changed without syncing them (blobs, snapshots).
    pub fn sync(&self) -> Result<(), QueueError> {
        self.db.flush()?;
        self.log_file.sync_data()?;
        self.sync_new_blobs()?;
        self.sync_snapshot_entries()?;
        Ok(())
    }

    /// sled replaces its snapshot file (`snap.<lsn>`) by a rename and removes the old one,
    /// syncing neither in the directory. Once the set of names differs from the one last
    /// synced, the directory is synced, so a power cut cannot bring back a snapshot older
    /// than the log it was written against while the new one vanishes.
    fn sync_snapshot_entries(&self) -> io::Result<()> {
        let now = sled_snapshots(&self.dir)?;
        let mut synced = self
            .synced_snapshots
            .lock()
            .expect("snapshot set lock poisoned");
        if *synced != now {
            sync_dir(&self.dir)?;
            *synced = now;
        }
        Ok(())
    }

    fn sync_new_blobs(&self) -> io::Result<()> {
        let blobs = self.dir.join("blobs");
        let mut fresh = Vec::new();
        // The lock only guards a set of names; it is never held across I/O that can block long.
        let known = self.synced_blobs.lock().expect("blob set lock poisoned");
        for entry in fs::read_dir(&blobs)? {
            let entry = entry?;
            if !known.contains(&entry.file_name()) {
                fresh.push(entry.file_name());
            }
        }
        drop(known);
        if fresh.is_empty() {
            return Ok(());
        }
        for name in &fresh {
            match File::open(blobs.join(name)) {
                Ok(f) => f.sync_data()?,
                // sled removes blobs it no longer needs; one gone since read_dir needs no sync.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        sync_dir(&blobs)?;
        self.synced_blobs
            .lock()
            .expect("blob set lock poisoned")
            .extend(fresh);
        Ok(())
    }

    /// Bytes this generation occupies on disk (allocated blocks, not apparent sizes).
    pub fn disk_bytes(&self) -> u64 {
        dir_bytes(&self.dir)
    }
}

/// Bytes allocated under a directory, recursively; unreadable entries count as zero.
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// Opens a sled database, waiting up to a second for its lock. sled writes sealed log buffers
/// from its own threads, which keep the database file, and its lock, open until they finish:
/// a database dropped in this process (a queue closed and opened again) can still be locked
/// for a moment after the drop returns. Another process holding it is reported after the wait.
pub fn open_sled(config: &sled::Config, dir: &Path) -> Result<sled::Db, QueueError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        match config
            .open()
            .map_err(|e| QueueError::from_sled_open(dir, e))
        {
            Err(QueueError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Opens a sled database in `dir` so that a power cut cannot take its files away: the
/// directory is created durably first, and once sled has created its files (which it does
/// without syncing their directory entries or its `conf`), `conf` and the directory are
/// synced. Writes into the files are the caller's to sync.
pub fn open_sled_durably(config: &sled::Config, dir: &Path) -> Result<sled::Db, QueueError> {
    create_dir_durable(dir)?;
    let db = open_sled(config, dir)?;
    File::open(dir.join("conf"))?.sync_all()?;
    sync_dir(dir)?;
    Ok(db)
}

/// The names of sled's snapshot files in a database directory, sorted.
fn sled_snapshots(dir: &Path) -> io::Result<Vec<std::ffi::OsString>> {
    let mut names: Vec<_> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .filter(|n| n.as_encoded_bytes().starts_with(b"snap."))
        .collect();
    names.sort_unstable();
    Ok(names)
}

/// fsyncs a directory: its entries (files created, renamed or removed in it) become durable.
/// A new file is only durable once both its data and its entry are.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and any missing ancestors, and makes the path durable: `dir` is synced, and
/// so is the parent of every directory on the way that had to be created, or `dir`'s parent
/// if none had. A directory that already existed is synced too: the run that created it may
/// have been cut off before it could.
pub fn create_dir_durable(dir: &Path) -> io::Result<()> {
    let mut created = Vec::new();
    let mut p = dir;
    while !p.as_os_str().is_empty() && fs::symlink_metadata(p).is_err() {
        created.push(p);
        match p.parent() {
            Some(parent) => p = parent,
            None => break,
        }
    }
    fs::create_dir_all(dir)?;
    sync_dir(dir)?;
    if created.is_empty() {
        created.push(dir);
    }
    for d in created {
        match d.parent() {
            Some(parent) if parent.as_os_str().is_empty() => sync_dir(Path::new("."))?,
            Some(parent) => sync_dir(parent)?,
            None => {}
        }
    }
    Ok(())
}

pub fn generation_dir(queue_dir: &Path, generation: u64) -> PathBuf {
    queue_dir.join(format!("{GEN_PREFIX}{generation:06}"))
}

/// The current generation number, if the queue directory has one.
pub fn read_current(queue_dir: &Path) -> Result<Option<u64>, QueueError> {
    match fs::read_to_string(queue_dir.join(CURRENT)) {
        Ok(text) => {
            let name = text.trim();
            name.strip_prefix(GEN_PREFIX)
                .and_then(|n| n.parse().ok())
                .map(Some)
                .ok_or_else(|| {
                    QueueError::Corrupt(format!(
                        "{} names {name:?}, not a generation",
                        queue_dir.join(CURRENT).display()
                    ))
                })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Refuses to go on when `CURRENT` names a generation that is not there: opening it would
/// create an empty one, and removing the others as leftovers would then delete the real
/// queue. Names the file, what it expected, and what is there instead.
pub fn check_current(queue_dir: &Path, generation: u64) -> Result<(), QueueError> {
    let named = generation_dir(queue_dir, generation);
    if named.join("db").exists() {
        return Ok(());
    }
    let others: Vec<String> = fs::read_dir(queue_dir)?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let n: u64 = name.strip_prefix(GEN_PREFIX)?.parse().ok()?;
            (n != generation && e.path().join("db").exists())
                .then(|| format!("{name} ({} bytes)", dir_bytes(&e.path())))
        })
        .collect();
    if others.is_empty() {
        // A first start cut off between writing CURRENT and creating the database: there is
        // nothing else it could mean, and nothing to lose.
        return Ok(());
    }
    Err(QueueError::Corrupt(format!(
        "{} names {}, which holds no queue database, while {} {}. Refusing to start rather          than open an empty queue and remove the others. If {} is the queue, write its name          into {} (as `gen-NNNNNN`); otherwise restore the data directory from a backup",
        queue_dir.join(CURRENT).display(),
        named.display(),
        others.join(", "),
        if others.len() == 1 { "exists" } else { "exist" },
        if others.len() == 1 { "that one" } else { "one of them" },
        queue_dir.join(CURRENT).display(),
    )))
}

/// Points CURRENT at a generation, atomically and durably.
pub fn write_current(queue_dir: &Path, generation: u64) -> io::Result<()> {
    write_atomically(
        &queue_dir.join(CURRENT),
        format!("{GEN_PREFIX}{generation:06}\n").as_bytes(),
    )
}

/// Replaces a small file so that a crash leaves the old or the new contents, never a mix:
/// write a temporary beside it, fsync, rename over it, fsync the directory.
pub fn write_atomically(path: &Path, contents: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// Removes every generation directory except the current one: leftovers of a rebuild that
/// crashed before switching (the new one) or before cleaning up (the old one).
pub fn remove_other_generations(queue_dir: &Path, keep: u64) -> io::Result<()> {
    for entry in fs::read_dir(queue_dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_prefix(GEN_PREFIX))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if n != keep {
            tracing::info!(generation = n, "removing a leftover queue generation");
            fs::remove_dir_all(entry.path())?;
        }
    }
    Ok(())
}

/// Bytes an unprivileged process can still write on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}
