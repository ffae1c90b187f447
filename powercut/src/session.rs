//! Mounting and unmounting one session of the filesystem.
//!
//! As root, fuser mounts with `mount(2)` itself (no helper, no libfuse); otherwise it runs the
//! `fusermount3` helper. A mounted session runs fuser's request loop on [`THREADS`] threads
//! (so a sync held by the trap stops only one of them), all started from one thread of
//! ours that owns the session.
//!
//! Unmounting first tries a plain `umount2(2)`, retried while the mount is busy (a killed
//! process may not have finished exiting, and its open files keep the mount busy until it
//! has). If it stays busy it is detached lazily; the kernel keeps serving the detached mount
//! to whoever still uses it, so its connection is also aborted through the fuse control
//! filesystem when that is mounted. The model's epoch check makes a detached session inert
//! either way.

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, Session, SessionACL, SessionUnmounter};

use crate::fs::PowerFs;

/// Request loop threads per session.
const THREADS: usize = 4;
/// How long an unmount waits for a busy mount to become idle before detaching it.
const BUSY_PATIENCE: Duration = Duration::from_secs(2);
/// How long an unmount waits for the session's threads to finish.
const JOIN_PATIENCE: Duration = Duration::from_secs(5);
/// The same after a lazy detach, which leaves them running until the mount's last user goes.
const DETACHED_JOIN_PATIENCE: Duration = Duration::from_millis(200);

/// The error for "this machine cannot mount FUSE here": [`io::ErrorKind::Unsupported`].
pub(crate) fn unavailable(detail: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("FUSE is not available here: {detail}"),
    )
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn fusermount() -> Option<&'static str> {
    let path = std::env::var_os("PATH")?;
    ["fusermount3", "fusermount"]
        .into_iter()
        .find(|name| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
}

/// Checks what mounting needs: `/dev/fuse` usable, and root or the `fusermount3` helper.
pub(crate) fn check_available() -> io::Result<()> {
    if let Err(err) = OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        return Err(unavailable(format!("cannot open /dev/fuse: {err}")));
    }
    if !is_root() && fusermount().is_none() {
        return Err(unavailable("not root, and no fusermount3 helper on PATH"));
    }
    Ok(())
}

/// A mount failure that means "not permitted here" rather than a bug.
fn classify(err: io::Error) -> io::Error {
    let text = err.to_string();
    let denied = matches!(
        err.kind(),
        io::ErrorKind::PermissionDenied | io::ErrorKind::NotFound
    ) || err.raw_os_error() == Some(libc::EPERM)
        || text.contains("not permitted")
        || text.contains("Permission denied")
        || text.contains("fusermount");
    if denied {
        unavailable(format!("mount failed: {text}"))
    } else {
        err
    }
}

/// A mounted session.
#[derive(Debug)]
pub(crate) struct Mounted {
    thread: JoinHandle<io::Result<()>>,
    /// fuser's own handle on the mount. Left in the session, it would unmount the
    /// mountpoint *by path* when the session's threads end, which after a lazy detach can be
    /// long after a new mount took the path; so it is taken out at the first unmount.
    unmounter: Option<SessionUnmounter>,
    /// The fuse control filesystem's name for the connection (the mount's device number).
    connection: Option<u64>,
}

/// Mounts `fs` at `mountpoint` and starts serving it.
pub(crate) fn mount(fs: PowerFs, mountpoint: &Path) -> io::Result<Mounted> {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("powercut".into()),
        MountOption::Subtype("powercut".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    config.acl = if is_root() {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(THREADS);
    let mut session = Session::new(fs, mountpoint, &config).map_err(classify)?;
    let unmounter = Some(session.unmount_callable());
    let thread = thread::Builder::new()
        .name("powercut".into())
        .spawn(move || session.run())?;
    let connection = fs::metadata(mountpoint).ok().map(|meta| {
        let dev = meta.dev();
        (u64::from(libc::major(dev)) << 20) | u64::from(libc::minor(dev))
    });
    Ok(Mounted {
        thread,
        unmounter,
        connection,
    })
}

impl Mounted {
    /// Unmounts; returns whether the mount had to be detached lazily. On error the session
    /// is still mounted.
    pub(crate) fn unmount(&mut self, mountpoint: &Path) -> io::Result<bool> {
        // fuser's handle makes one plain attempt (a lazy one through the helper when not
        // root) and is gone afterwards whatever the outcome; a busy mount is then handled
        // below.
        if let Some(mut unmounter) = self.unmounter.take() {
            if unmounter.unmount().is_ok() {
                return Ok(false);
            }
        }
        let path = CString::new(mountpoint.as_os_str().as_bytes())?;
        let deadline = Instant::now() + BUSY_PATIENCE;
        loop {
            // SAFETY: `path` is a valid C string.
            if unsafe { libc::umount2(path.as_ptr(), 0) } == 0 {
                return Ok(false);
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EBUSY) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(10));
                }
                Some(libc::EBUSY) => {
                    // SAFETY: as above.
                    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    self.abort();
                    return Ok(true);
                }
                // Not a mount point any more: someone else unmounted it.
                Some(libc::EINVAL) => return Ok(false),
                Some(libc::EPERM) if !is_root() => return fusermount_unmount(mountpoint),
                _ => return Err(err),
            }
        }
    }

    /// Aborts the kernel connection of a detached mount, if the control filesystem is there.
    fn abort(&self) {
        if let Some(connection) = self.connection {
            let abort = format!("/sys/fs/fuse/connections/{connection}/abort");
            let _ = fs::write(abort, "1");
        }
    }

    /// Waits a while for the session's threads to end; leaves them running (detached) if
    /// a lazily detached mount is still in use.
    pub(crate) fn join(self, detached: bool) {
        let patience = if detached {
            DETACHED_JOIN_PATIENCE
        } else {
            JOIN_PATIENCE
        };
        let deadline = Instant::now() + patience;
        while !self.thread.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        if self.thread.is_finished() {
            let _ = self.thread.join();
        }
    }
}

/// Unmounting without root: through the helper, lazily if the mount stays busy.
fn fusermount_unmount(mountpoint: &Path) -> io::Result<bool> {
    let helper = fusermount().ok_or_else(|| unavailable("no fusermount3 helper on PATH"))?;
    let deadline = Instant::now() + BUSY_PATIENCE;
    loop {
        let status = Command::new(helper)
            .args(["-u", "-q", "--"])
            .arg(mountpoint)
            .status()?;
        if status.success() {
            return Ok(false);
        }
        if Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let status = Command::new(helper)
        .args(["-u", "-q", "-z", "--"])
        .arg(mountpoint)
        .status()?;
    if status.success() {
        Ok(true)
    } else {
        Err(io::Error::other(format!(
            "{helper} -u -z {} failed: {status}",
            mountpoint.display()
        )))
    }
}
