//! A FUSE filesystem that simulates a power cut, for tests that must prove a program
//! fsyncs every file and directory it relies on.
//!
//! A test mounts a [`PowerCut`] on an empty directory, runs the program under test with its
//! data on the mount, kills it (SIGKILL) and calls [`PowerCut::cut`]: everything the program
//! had not made durable is thrown away, and the same mountpoint serves what survived, for the
//! program's restart.
//!
//! # The model
//!
//! File bytes live in a *backing directory*, one backing file per inode named after its
//! inode number; directory entries live only in memory. What a cut keeps:
//!
//! * **File data**: the content as of the file's last `fsync(2)` or `fdatasync(2)` (the two
//!   are the same here, and both include the size). A file never synced is empty. Before a
//!   write, truncation or hole punch first touches a region that was part of the durable
//!   content, the old bytes of that region are saved (in 4 KiB chunks, once per chunk between
//!   two syncs); a cut writes them back and truncates the file to its durable size, and a
//!   sync forgets them. Memory and work are therefore proportional to what changed since the
//!   last sync, never to the size of the file.
//! * **Directory entries** depend on the [`Mode`]:
//!   * [`Mode::Ordered`] (like ext4's default): create, mkdir, link, symlink, rename, unlink
//!     and rmdir are durable at once; only unsynced file data is lost.
//!   * [`Mode::Strict`] (what POSIX allows): a change to a directory is durable only once
//!     that directory is fsynced afterwards. A cut gives every directory the entries it had
//!     at its last fsync: an unsynced create vanishes, an unsynced rename reverts, an
//!     unsynced unlink comes back (with the file's durable content). Syncing a file does not
//!     make its own name durable, and a new directory's entries need a sync of the new
//!     directory while its name needs a sync of its parent.
//! * Inodes that no durable entry reaches from the root any more are deleted at the cut,
//!   with their backing files.
//!
//! After a cut the mount is a new one (unmounted and mounted again), so nothing the kernel
//! cached about the old one survives. While mounted, the kernel is not allowed to cache
//! attributes or entries (zero timeouts) and writes go through to the filesystem at once
//! (no writeback cache), so what a program reads back is what the model holds. Shared
//! writable mappings work too: the kernel writes their pages to the filesystem when it
//! writes them back, and `msync(2)` arrives as an fdatasync.
//!
//! # Limits
//!
//! The model is deliberately all-or-nothing per file, where a real disk is not:
//!
//! * Unsynced writes to one file are all lost together. A real disk may keep any subset of
//!   them, in any order (a later write kept while an earlier one is lost), and may tear a
//!   write within a sector; none of that is simulated, so a format that must survive partial
//!   writes needs other tests as well.
//! * Lost data comes back as the old content, and a file extended without a sync is cut back
//!   to its durable size; a real filesystem may instead show zeros or stale blocks there.
//! * `sync(2)`, `syncfs(2)` and `sync_file_range(2)` do not reach a FUSE filesystem, so
//!   they make nothing durable here. `O_SYNC`/`O_DSYNC` writes do (the kernel sends a sync).
//! * Ordered mode does not model ext4's flush of a file's data when it replaces another by
//!   rename or is truncated and closed: unsynced data is lost then too.
//! * In Strict mode a rename is durable separately in the source and the target directory.
//!   If only the target was synced, a file has both names after the cut; a directory in that
//!   situation keeps only the name found first.
//! * Permissions, owners and times are not part of the model: a cut keeps their latest values.
//! * File locks (`flock(2)`, `fcntl(2)`) are handled by the kernel and end with the
//!   processes that held them.
//!
//! # The sync trap
//!
//! [`PowerCut::arm_sync_trap`] holds the next fsync, fdatasync or fsyncdir inside the
//! filesystem, so a test can kill the caller *during* the sync and then choose whether the
//! sync completed ([`Trapped::release`]). A process whose request is held cannot die until
//! the request is answered (the kernel waits for the answer even after SIGKILL), so kill
//! first and release after. While a call is held, the rest of the mount keeps working on the
//! session's other request threads, except what the kernel itself serializes behind the held
//! call: it holds the synced inode's lock, so writes to a held file, and creating, removing
//! or renaming entries in a held directory, wait for the release.
//!
//! # Example
//!
//! ```no_run
//! use powercut::{Mode, PowerCut};
//! # fn main() -> std::io::Result<()> {
//! # let (backing, mnt) = (std::path::Path::new("/tmp/b"), std::path::Path::new("/tmp/m"));
//! let mut power = PowerCut::mount(backing, mnt, Mode::Strict)?;
//! // ... start the program with its data in `mnt`, let it work, SIGKILL it ...
//! let report = power.cut()?;
//! println!("the cut threw away: {report}");
//! // ... restart the program on what survived, check it lost nothing it acknowledged ...
//! # Ok(())
//! # }
//! ```
//!
//! # Requirements
//!
//! Mounting needs `/dev/fuse` and root (which mounts with `mount(2)` directly) or the
//! `fusermount3` helper. When either is missing, [`PowerCut::mount`] fails with
//! [`io::ErrorKind::Unsupported`] (see [`is_unavailable`]), so a test can tell "FUSE not
//! available here" from a bug.

#![warn(missing_docs)]

mod counters;
mod data;
mod fs;
mod model;
mod session;
mod trap;

use std::fmt;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use counters::Counters;
pub use trap::{SyncCall, SyncKind, SyncTrap, Trapped};

use counters::CounterCells;
use fs::{PowerFs, Shared};
use model::{Meta, Model};
use session::Mounted;
use trap::TrapSlot;

/// What a cut keeps of directory entries. See the crate docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Directory changes are durable at once; only unsynced file data is lost.
    Ordered,
    /// Directory changes are durable only once their directory is fsynced.
    Strict,
}

/// What a [`PowerCut::cut`] threw away. Paths are relative to the mountpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Surviving files whose content or size was rolled back.
    pub files_rolled_back: Vec<PathBuf>,
    /// Bytes of old (durable) content written back over unsynced changes.
    pub bytes_restored: u64,
    /// Bytes past the durable size of a file that were cut off.
    pub bytes_truncated: u64,
    /// Directory entries that existed but were not durable, as they were named before the
    /// cut (Strict mode).
    pub entries_dropped: Vec<PathBuf>,
    /// Durable directory entries that had been removed or replaced and came back, as they
    /// are named after the cut (Strict mode).
    pub entries_restored: Vec<PathBuf>,
    /// Inodes deleted because no durable entry reached them any more.
    pub inodes_dropped: u64,
    /// Whether the old mount was still busy and had to be detached lazily.
    pub lazy_unmount: bool,
}

impl fmt::Display for CutReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// Lists at most this many paths of each kind.
        const SHOWN: usize = 8;
        let list = |f: &mut fmt::Formatter<'_>, what: &str, paths: &[PathBuf]| {
            write!(f, "{} {what}", paths.len())?;
            if !paths.is_empty() {
                let shown: Vec<_> = paths.iter().take(SHOWN).map(|p| p.display()).collect();
                let more = if paths.len() > SHOWN { ", ..." } else { "" };
                write!(f, " (")?;
                for (i, path) in shown.iter().enumerate() {
                    write!(f, "{}{path}", if i == 0 { "" } else { ", " })?;
                }
                write!(f, "{more})")?;
            }
            Ok(())
        };
        list(f, "files rolled back", &self.files_rolled_back)?;
        write!(
            f,
            ", {} bytes restored, {} bytes truncated, ",
            self.bytes_restored, self.bytes_truncated
        )?;
        list(f, "entries dropped", &self.entries_dropped)?;
        write!(f, ", ")?;
        list(f, "entries restored", &self.entries_restored)?;
        write!(f, ", {} inodes dropped", self.inodes_dropped)?;
        if self.lazy_unmount {
            write!(f, ", old mount detached lazily")?;
        }
        Ok(())
    }
}

/// Whether `err`, from [`PowerCut::mount`], means FUSE cannot be mounted on this machine
/// (no `/dev/fuse`, or no permission to mount) rather than a bug.
pub fn is_unavailable(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::Unsupported
}

/// A mounted power-cut filesystem. Dropping it unmounts it (best effort).
#[derive(Debug)]
pub struct PowerCut {
    shared: Arc<Shared>,
    mountpoint: PathBuf,
    mode: Mode,
    mounted: Option<Mounted>,
}

impl PowerCut {
    /// Mounts an empty filesystem at `mountpoint` whose file data goes to `backing`, an empty
    /// directory outside the mount. The root directory takes the mountpoint's permissions and
    /// owner.
    pub fn mount(backing: &Path, mountpoint: &Path, mode: Mode) -> io::Result<PowerCut> {
        session::check_available()?;
        let mountpoint = mountpoint.canonicalize()?;
        let backing = backing.canonicalize()?;
        let root = std::fs::metadata(&mountpoint)?;
        if !root.is_dir() || !backing.is_dir() {
            return Err(invalid(
                "the mountpoint and the backing path must be directories",
            ));
        }
        if std::fs::read_dir(&backing)?.next().is_some() {
            return Err(invalid("the backing directory must be empty"));
        }
        if backing.starts_with(&mountpoint) {
            return Err(invalid(
                "the backing directory must be outside the mountpoint",
            ));
        }
        let root = Meta::new((root.mode() & 0o7777) as u16, root.uid(), root.gid());
        let shared = Arc::new(Shared {
            model: Mutex::new(Model::new(backing.clone(), mode, root)),
            trap: Arc::new(TrapSlot::new()),
            counters: CounterCells::default(),
            backing,
            full: Default::default(),
        });
        let mut powercut = PowerCut {
            shared,
            mountpoint,
            mode,
            mounted: None,
        };
        powercut.mount_session()?;
        Ok(powercut)
    }

    /// The (canonical) mountpoint.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The mode given at mount.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Cuts the power: unmounts, rolls everything back to its durable state and mounts
    /// again at the same mountpoint.
    ///
    /// The caller must have killed every process using the mount (and may have reaped it or
    /// not: a busy mount is retried for up to two seconds). A sync held by a trap is answered
    /// as not durable first. If the mount stays busy (say, a shell still has its working
    /// directory in it) it is detached lazily: whoever still uses it gets errors from then on
    /// (EIO, or ENOTCONN where the fuse control filesystem is mounted and lets the old
    /// connection be aborted), and changes nothing.
    ///
    /// On error the filesystem may be left unmounted; a later `cut` mounts it again.
    pub fn cut(&mut self) -> io::Result<CutReport> {
        self.shared.trap.force_release();
        let lazy = self.unmount_session()?;
        let mut report = self.shared.lock().cut()?;
        report.lazy_unmount = lazy;
        CounterCells::bump(&self.shared.counters.cuts, 1);
        self.mount_session()?;
        Ok(report)
    }

    /// Arms a trap that holds the next fsync, fdatasync or fsyncdir on this mount. See
    /// [`SyncTrap`] and the crate docs. Arming again replaces a trap that has not caught
    /// anything yet (the older one then catches nothing).
    ///
    /// # Panics
    /// If a call caught by an earlier trap is still held.
    pub fn arm_sync_trap(&self) -> SyncTrap {
        TrapSlot::arm(&self.shared.trap, 0)
    }

    /// Like [`arm_sync_trap`](PowerCut::arm_sync_trap), but lets the next `skip` sync calls
    /// through and holds the one after them: a test can sweep the kill point through a
    /// program's syncs.
    ///
    /// # Panics
    /// If a call caught by an earlier trap is still held.
    pub fn arm_sync_trap_after(&self, skip: u64) -> SyncTrap {
        TrapSlot::arm(&self.shared.trap, skip)
    }

    /// While `full`, every write is answered `ENOSPC`, as when the disk has filled behind
    /// the writer's back (its free-space checks saw room); nothing else changes.
    pub fn set_full(&self, full: bool) {
        self.shared
            .full
            .store(full, std::sync::atomic::Ordering::Relaxed);
    }

    /// What the mount has seen so far.
    pub fn counters(&self) -> Counters {
        self.shared.counters.snapshot()
    }

    /// Unmounts. Unsynced state is simply abandoned (the backing directory is not a
    /// filesystem image that could be mounted again).
    pub fn unmount(mut self) -> io::Result<()> {
        self.shutdown()
    }

    fn mount_session(&mut self) -> io::Result<()> {
        let epoch = self.shared.lock().epoch();
        let fs = PowerFs::new(Arc::clone(&self.shared), epoch, self.mountpoint.clone());
        self.mounted = Some(session::mount(fs, &self.mountpoint)?);
        Ok(())
    }

    /// Unmounts the current session, if any; returns whether it was detached lazily.
    fn unmount_session(&mut self) -> io::Result<bool> {
        let Some(mut mounted) = self.mounted.take() else {
            return Ok(false);
        };
        match mounted.unmount(&self.mountpoint) {
            Ok(lazy) => {
                mounted.join(lazy);
                Ok(lazy)
            }
            Err(err) => {
                self.mounted = Some(mounted);
                Err(err)
            }
        }
    }

    fn shutdown(&mut self) -> io::Result<()> {
        self.shared.trap.force_release();
        self.unmount_session()?;
        self.shared.lock().retire();
        Ok(())
    }
}

impl Drop for PowerCut {
    fn drop(&mut self) {
        if self.mounted.is_some() {
            let _ = self.shutdown();
        }
    }
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_can_move_between_threads() {
        fn send<T: Send>() {}
        send::<PowerCut>();
        send::<SyncTrap>();
        send::<Trapped>();
        send::<CutReport>();
    }

    #[test]
    fn report_lists_paths() {
        let report = CutReport {
            files_rolled_back: vec!["a/log".into()],
            entries_dropped: (0..10).map(|i| PathBuf::from(format!("n{i}"))).collect(),
            lazy_unmount: true,
            ..CutReport::default()
        };
        assert_eq!(
            report.to_string(),
            "1 files rolled back (a/log), 0 bytes restored, 0 bytes truncated, \
             10 entries dropped (n0, n1, n2, n3, n4, n5, n6, n7, ...), 0 entries restored, \
             0 inodes dropped, old mount detached lazily"
        );
    }
}
