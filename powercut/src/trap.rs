//! The sync trap: holds one fsync, fdatasync or fsyncdir inside its handler, so that a test
//! can kill the calling process in the middle of the sync and then decide whether the sync
//! had reached the disk.
//!
//! One slot per mount holds a small state machine:
//! `Idle → Armed → Caught → Released → Idle`. Arming picks the next sync to arrive (after
//! an optional number it lets pass); other syncs, including those arriving while a call is
//! held, pass straight through. The handler that catches its call parks on a condition variable (holding no other lock, so the rest
//! of the filesystem keeps working on fuser's other threads) until the test releases it. A
//! release waits until the handler has applied the outcome and answered the kernel, so that
//! what follows (killing, cutting) sees the outcome in place.
//!
//! A process whose request is already in the filesystem cannot die until the request is
//! answered (the kernel waits for the answer even after SIGKILL), so the test kills first and
//! releases after; the process then exits.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long a release waits for the held handler to answer (it only needs the model lock).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Which sync call was caught.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    /// `fsync(2)` of a regular file.
    Fsync,
    /// `fdatasync(2)` of a regular file.
    Fdatasync,
    /// `fsync(2)` (or `fdatasync(2)`) of a directory.
    Fsyncdir,
}

/// A sync call held by a trap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncCall {
    /// The kind of call.
    pub kind: SyncKind,
    /// The inode number inside the mount.
    pub ino: u64,
    /// A path of the inode under the mountpoint, if it still has a name.
    pub path: Option<PathBuf>,
    /// The id of the calling thread as the kernel reported it (the process id when that is
    /// the process's main thread).
    pub pid: u32,
}

#[derive(Debug)]
enum State {
    Idle,
    Armed {
        id: u64,
        skip: u64,
    },
    Caught {
        id: u64,
        call: SyncCall,
        handed: bool,
    },
    Released {
        id: u64,
        durable: bool,
    },
}

/// What a sync handler must do after asking the trap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Intercept {
    /// No trap took this call: sync as usual.
    Pass,
    /// The call was held and is now released: sync only if `durable`, then call
    /// [`TrapSlot::answered`] with `id`.
    Held { id: u64, durable: bool },
}

/// The trap state of one mount.
#[derive(Debug)]
pub(crate) struct TrapSlot {
    /// The state, and the id of the last trap armed (ids tell a stale handle from the
    /// current one).
    state: Mutex<(State, u64)>,
    changed: Condvar,
}

impl TrapSlot {
    pub(crate) fn new() -> TrapSlot {
        TrapSlot {
            state: Mutex::new((State::Idle, 0)),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, (State, u64)> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(
        &self,
        guard: MutexGuard<'a, (State, u64)>,
        deadline: Instant,
    ) -> Option<MutexGuard<'a, (State, u64)>> {
        let left = deadline.checked_duration_since(Instant::now())?;
        let (guard, _) = self
            .changed
            .wait_timeout(guard, left)
            .unwrap_or_else(PoisonError::into_inner);
        Some(guard)
    }

    /// Arms the trap for the sync call after the next `skip` ones, replacing an armed trap.
    ///
    /// # Panics
    /// If a call caught by an earlier trap is still held.
    pub(crate) fn arm(slot: &Arc<TrapSlot>, skip: u64) -> SyncTrap {
        let mut guard = slot.lock();
        let (state, next_id) = &mut *guard;
        assert!(
            matches!(state, State::Idle | State::Armed { .. }),
            "a sync call caught by an earlier trap is still held: release it first"
        );
        *next_id += 1;
        *state = State::Armed { id: *next_id, skip };
        SyncTrap {
            slot: Arc::clone(slot),
            id: *next_id,
        }
    }

    /// Called by every sync handler before it syncs. `describe` runs only if the trap is
    /// armed; the call blocks until the caught call is released.
    pub(crate) fn intercept(&self, describe: impl FnOnce() -> SyncCall) -> Intercept {
        let mut guard = self.lock();
        let id = match &mut guard.0 {
            State::Armed { skip, .. } if *skip > 0 => {
                *skip -= 1;
                return Intercept::Pass;
            }
            State::Armed { id, .. } => *id,
            _ => return Intercept::Pass,
        };
        guard.0 = State::Caught {
            id,
            call: describe(),
            handed: false,
        };
        self.changed.notify_all();
        loop {
            match guard.0 {
                State::Caught { id: held, .. } if held == id => {}
                State::Released { id: held, durable } if held == id => {
                    return Intercept::Held { id, durable };
                }
                _ => return Intercept::Held { id, durable: false },
            }
            guard = self
                .changed
                .wait(guard)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Called by a handler once it has answered the held call `id`.
    pub(crate) fn answered(&self, id: u64) {
        let mut guard = self.lock();
        if matches!(guard.0, State::Released { id: held, .. } if held == id) {
            guard.0 = State::Idle;
        }
        self.changed.notify_all();
    }

    /// Disarms the trap and answers any held call as not durable (the power is gone); waits
    /// for that answer.
    pub(crate) fn force_release(&self) {
        let mut guard = self.lock();
        match guard.0 {
            State::Idle => return,
            State::Armed { .. } => {
                guard.0 = State::Idle;
                return;
            }
            State::Caught { id, .. } => guard.0 = State::Released { id, durable: false },
            State::Released { .. } => {}
        }
        self.changed.notify_all();
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        while matches!(guard.0, State::Released { .. }) {
            match self.wait(guard, deadline) {
                Some(g) => guard = g,
                None => return,
            }
        }
    }

    /// Releases the held call `id` (if it is still held) and waits until it is answered.
    fn release(&self, id: u64, durable: bool) {
        let mut guard = self.lock();
        if !matches!(guard.0, State::Caught { id: held, .. } if held == id) {
            return;
        }
        guard.0 = State::Released { id, durable };
        self.changed.notify_all();
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        while matches!(guard.0, State::Released { id: held, .. } if held == id) {
            match self.wait(guard, deadline) {
                Some(g) => guard = g,
                None => return,
            }
        }
    }
}

/// An armed trap, from [`PowerCut::arm_sync_trap`](crate::PowerCut::arm_sync_trap).
///
/// Dropping it disarms it; a call it caught that [`wait`](SyncTrap::wait) did not hand out
/// yet is then answered as not durable.
#[derive(Debug)]
pub struct SyncTrap {
    slot: Arc<TrapSlot>,
    id: u64,
}

impl SyncTrap {
    /// Waits up to `timeout` for the trap to catch a call. `None` on timeout (the trap stays
    /// armed), or if the trap was disarmed by a cut or its call was already handed out.
    pub fn wait(&self, timeout: Duration) -> Option<Trapped> {
        let deadline = Instant::now() + timeout;
        let mut guard = self.slot.lock();
        loop {
            match &mut guard.0 {
                State::Caught { id, call, handed } if *id == self.id && !*handed => {
                    *handed = true;
                    return Some(Trapped {
                        slot: Arc::clone(&self.slot),
                        id: self.id,
                        call: call.clone(),
                        released: false,
                    });
                }
                State::Armed { id, .. } if *id == self.id => {}
                _ => return None,
            }
            guard = self.slot.wait(guard, deadline)?;
        }
    }
}

impl Drop for SyncTrap {
    fn drop(&mut self) {
        let mut guard = self.slot.lock();
        match guard.0 {
            State::Armed { id, .. } if id == self.id => guard.0 = State::Idle,
            State::Caught {
                id, handed: false, ..
            } if id == self.id => guard.0 = State::Released { id, durable: false },
            _ => return,
        }
        self.slot.changed.notify_all();
    }
}

impl fmt::Display for SyncCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            SyncKind::Fsync => "fsync",
            SyncKind::Fdatasync => "fdatasync",
            SyncKind::Fsyncdir => "fsync of the directory",
        };
        match &self.path {
            Some(path) => write!(f, "{kind} {}", path.display())?,
            None => write!(f, "{kind} (unlinked)")?,
        }
        write!(f, " (inode {}, thread {})", self.ino, self.pid)
    }
}

/// A sync call held inside the filesystem. Release it with [`release`](Trapped::release);
/// dropping it releases it as not durable.
pub struct Trapped {
    slot: Arc<TrapSlot>,
    id: u64,
    call: SyncCall,
    released: bool,
}

impl Trapped {
    /// The call that is held.
    pub fn call(&self) -> &SyncCall {
        &self.call
    }

    /// A path of the synced inode under the mountpoint, if it has a name.
    pub fn path(&self) -> Option<&Path> {
        self.call.path.as_deref()
    }

    /// Answers the held call and returns once it is answered. With `durable` the sync takes
    /// effect and the call succeeds; without, nothing becomes durable and the call fails
    /// with EIO (which a process that was killed meanwhile never sees).
    pub fn release(mut self, durable: bool) {
        self.released = true;
        self.slot.release(self.id, durable);
    }
}

impl fmt::Debug for Trapped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Trapped({})", self.call)
    }
}

impl Drop for Trapped {
    fn drop(&mut self) {
        if !self.released {
            self.slot.release(self.id, false);
        }
    }
}
