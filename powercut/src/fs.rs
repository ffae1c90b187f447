//! The fuser glue: turns FUSE requests into [`Model`] operations.
//!
//! Every request does its work under the one model lock, so each is atomic (a sync held by
//! the trap waits outside the lock, and takes it only once released). Replies
//! carry zero attribute and entry timeouts, so the kernel asks again for every path lookup
//! and `stat` instead of trusting what it saw before; the connection uses no writeback
//! cache, so every `write(2)` reaches [`Filesystem::write`] before it returns and every
//! fsync reaches [`Filesystem::fsync`] / [`Filesystem::fsyncdir`] (never answered ENOSYS,
//! which would make the kernel stop sending them). Lock requests are not claimed, so the
//! kernel handles `flock(2)` and `fcntl(2)` locks locally.
//!
//! A session serves one mount of the model. When the model moves on to a new epoch (a cut
//! or an unmount), a session of an earlier epoch answers EIO to everything, so a mount that
//! had to be detached lazily can never change the state a cut left.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::counters::CounterCells;
use crate::model::{Errno, Meta, Model, NodeKind, RenameMode, Res, SetAttr, Stat};
use crate::trap::{Intercept, SyncCall, SyncKind, TrapSlot};

/// Attribute and entry timeout: none, so the kernel caches nothing about the namespace.
const TTL: Duration = Duration::ZERO;

/// State shared by the [`PowerCut`](crate::PowerCut) handle and every session.
#[derive(Debug)]
pub(crate) struct Shared {
    pub model: Mutex<Model>,
    pub trap: Arc<TrapSlot>,
    pub counters: CounterCells,
    pub backing: PathBuf,
    /// While set, every write is answered ENOSPC, as by a full disk ([`crate::PowerCut::set_full`]).
    pub full: std::sync::atomic::AtomicBool,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One mount's FUSE filesystem.
#[derive(Debug)]
pub(crate) struct PowerFs {
    shared: Arc<Shared>,
    epoch: u64,
    mountpoint: PathBuf,
}

impl PowerFs {
    pub(crate) fn new(shared: Arc<Shared>, epoch: u64, mountpoint: PathBuf) -> PowerFs {
        PowerFs {
            shared,
            epoch,
            mountpoint,
        }
    }

    /// The model, if this session is still current.
    fn model(&self) -> Res<MutexGuard<'_, Model>> {
        let model = self.shared.lock();
        if model.epoch() == self.epoch {
            Ok(model)
        } else {
            Err(Errno(libc::EIO))
        }
    }

    fn with<T>(&self, op: impl FnOnce(&mut Model) -> Res<T>) -> Res<T> {
        op(&mut *self.model()?)
    }

    fn entry(&self, reply: ReplyEntry, op: impl FnOnce(&mut Model) -> Res<Stat>) {
        match self.with(op) {
            Ok(stat) => reply.entry(&TTL, &attr(&stat), Generation(0)),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn empty(&self, reply: ReplyEmpty, op: impl FnOnce(&mut Model) -> Res<()>) {
        match self.with(op) {
            Ok(()) => reply.ok(),
            Err(err) => reply.error(errno(err)),
        }
    }

    /// fsync, fdatasync and fsyncdir: count, let the trap take it, then sync (or not).
    fn sync(&self, req: &Request, ino: INodeNo, kind: SyncKind, reply: ReplyEmpty) {
        let counters = &self.shared.counters;
        match kind {
            SyncKind::Fsync => CounterCells::bump(&counters.fsyncs, 1),
            SyncKind::Fdatasync => {
                CounterCells::bump(&counters.fsyncs, 1);
                CounterCells::bump(&counters.fdatasyncs, 1);
            }
            SyncKind::Fsyncdir => CounterCells::bump(&counters.fsyncdirs, 1),
        }
        let verdict = self.shared.trap.intercept(|| SyncCall {
            kind,
            ino: ino.0,
            path: self.model().ok().and_then(|model| {
                let path = model.path_of(ino.0)?;
                Some(self.mountpoint.join(path))
            }),
            pid: req.pid(),
        });
        let (apply, held) = match verdict {
            Intercept::Pass => (true, None),
            Intercept::Held { id, durable } => (durable, Some(id)),
        };
        let result = if !apply {
            Err(Errno(libc::EIO))
        } else if kind == SyncKind::Fsyncdir {
            self.with(|model| model.fsyncdir(ino.0))
        } else {
            self.with(|model| model.fsync(ino.0))
        };
        match result {
            Ok(()) => reply.ok(),
            Err(err) => reply.error(errno(err)),
        }
        if let Some(id) = held {
            self.shared.trap.answered(id);
        }
    }
}

fn errno(err: Errno) -> fuser::Errno {
    fuser::Errno::from_i32(err.0)
}

fn file_type(kind: NodeKind) -> FileType {
    match kind {
        NodeKind::File => FileType::RegularFile,
        NodeKind::Dir => FileType::Directory,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::Fifo => FileType::NamedPipe,
        NodeKind::Socket => FileType::Socket,
        NodeKind::CharDevice => FileType::CharDevice,
        NodeKind::BlockDevice => FileType::BlockDevice,
    }
}

fn attr(stat: &Stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(stat.ino),
        size: stat.size,
        blocks: stat.size.div_ceil(512),
        atime: stat.meta.atime,
        mtime: stat.meta.mtime,
        ctime: stat.meta.ctime,
        crtime: stat.meta.ctime,
        kind: file_type(stat.kind),
        perm: stat.meta.perm,
        nlink: stat.nlink,
        uid: stat.meta.uid,
        gid: stat.meta.gid,
        rdev: stat.meta.rdev,
        blksize: 4096,
        flags: 0,
    }
}

fn meta(req: &Request, mode: u32) -> Meta {
    Meta::new((mode & 0o7777) as u16, req.uid(), req.gid())
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

/// `statvfs(3)` of the backing directory.
fn statvfs(path: &Path) -> io::Result<libc::statvfs> {
    let path = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: `path` is a valid C string; `st` is a plain struct the call fills in.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut st) == 0 {
            Ok(st)
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Filesystem for PowerFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(reply, |model| model.lookup(parent.0, name));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if let Ok(mut model) = self.model() {
            model.forget(ino.0, nlookup);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.with(|model| model.stat(ino.0)) {
            Ok(stat) => reply.attr(&TTL, &attr(&stat)),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let change = SetAttr {
            perm: mode.map(|mode| (mode & 0o7777) as u16),
            uid,
            gid,
            size,
            atime: atime.map(time),
            mtime: mtime.map(time),
            ctime,
        };
        match self.with(|model| model.setattr(ino.0, change)) {
            Ok(stat) => reply.attr(&TTL, &attr(&stat)),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.with(|model| model.readlink(ino.0)) {
            Ok(target) => reply.data(&target),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let kind = match mode & libc::S_IFMT {
            0 | libc::S_IFREG => NodeKind::File,
            libc::S_IFIFO => NodeKind::Fifo,
            libc::S_IFSOCK => NodeKind::Socket,
            libc::S_IFCHR => NodeKind::CharDevice,
            libc::S_IFBLK => NodeKind::BlockDevice,
            _ => return reply.error(fuser::Errno::EINVAL),
        };
        let mut meta = meta(req, mode);
        meta.rdev = rdev;
        self.entry(reply, |model| model.mknod(parent.0, name, kind, meta));
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let meta = meta(req, mode);
        self.entry(reply, |model| model.mkdir(parent.0, name, meta));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(reply, |model| model.unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(reply, |model| model.rmdir(parent.0, name));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let meta = meta(req, 0o777);
        self.entry(reply, |model| {
            model.symlink(parent.0, link_name, target.as_os_str(), meta)
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mode = if flags.is_empty() {
            RenameMode::Replace
        } else if flags == RenameFlags::RENAME_NOREPLACE {
            RenameMode::NoReplace
        } else if flags == RenameFlags::RENAME_EXCHANGE {
            RenameMode::Exchange
        } else {
            return reply.error(fuser::Errno::EINVAL);
        };
        self.empty(reply, |model| {
            model.rename(parent.0, name, newparent.0, newname, mode)
        });
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.entry(reply, |model| model.link(ino.0, newparent.0, newname));
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.with(|model| model.open(ino.0)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.with(|model| model.read(ino.0, offset, size)) {
            Ok(data) => reply.data(&data),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let counters = &self.shared.counters;
        CounterCells::bump(&counters.writes, 1);
        CounterCells::bump(&counters.bytes_written, data.len() as u64);
        if self.shared.full.load(std::sync::atomic::Ordering::Relaxed) {
            return reply.error(errno(Errno(libc::ENOSPC)));
        }
        // The kernel has already turned O_APPEND into the offset of the end of the file.
        match self.with(|model| model.write(ino.0, offset, data)) {
            Ok(()) => reply.written(data.len() as u32),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.empty(reply, |model| {
            model.release(fh.0);
            Ok(())
        });
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let kind = if datasync {
            SyncKind::Fdatasync
        } else {
            SyncKind::Fsync
        };
        self.sync(req, ino, kind, reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.with(|model| model.opendir(ino.0)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let model = match self.model() {
            Ok(model) => model,
            Err(err) => return reply.error(errno(err)),
        };
        let entries = match model.readdir(fh.0, offset) {
            Ok(entries) => entries,
            Err(err) => return reply.error(errno(err)),
        };
        for (i, entry) in entries.iter().enumerate() {
            // An entry's offset is where the listing resumes after it.
            let next = offset + i as u64 + 1;
            if reply.add(INodeNo(entry.ino), next, file_type(entry.kind), &entry.name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.empty(reply, |model| {
            model.release(fh.0);
            Ok(())
        });
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.sync(req, ino, SyncKind::Fsyncdir, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match statvfs(&self.shared.backing) {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                st.f_bsize as u32,
                st.f_namemax as u32,
                st.f_frsize as u32,
            ),
            Err(err) => reply.error(err.into()),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permissions are checked by the kernel (`default_permissions`); this only answers
        // whether the inode exists.
        self.empty(reply, |model| model.stat(ino.0).map(drop));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let meta = meta(req, mode);
        match self.with(|model| model.create(parent.0, name, meta)) {
            Ok((stat, fh)) => reply.created(
                &TTL,
                &attr(&stat),
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.empty(reply, |model| model.fallocate(ino.0, offset, length, mode));
    }
}
