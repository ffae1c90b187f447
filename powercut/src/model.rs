//! The in-memory namespace and inode table, with what a power cut would keep of them.
//!
//! Inodes live in a table keyed by inode number (never reused; 1 is the root). Regular files
//! keep their bytes in a backing file named after the inode number, with an undo log
//! ([`FileData`]). Directory entries exist only here:
//!
//! * `live`: what the running system sees;
//! * `durable` (Strict mode only): a copy of `live` taken at the directory's last fsync, i.e.
//!   what a cut keeps. In Ordered mode there is no copy: entries are durable as soon as made.
//!
//! Each inode counts what keeps it alive: live entries naming it (`links`), durable entries
//! naming it (`durable_links`), kernel lookups not yet forgotten and open handles. When all
//! four reach zero the inode and its backing file are deleted at once; a directory deleted
//! that way releases the durable entries it still held. (A cycle of such references, which
//! only odd sequences of directory renames in Strict mode can make, is collected at the next
//! cut instead.) A cut rolls everything back to the durable state and then keeps exactly the
//! inodes reachable from the root.
//!
//! Every operation here is what one FUSE request does, made atomic by the caller's lock.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::data::FileData;
use crate::{CutReport, Mode};

/// Inode number of the root directory.
pub(crate) const ROOT: u64 = 1;
/// Longest name a directory entry may have.
const NAME_MAX: usize = 255;

/// An errno value to answer a request with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Errno(pub i32);

impl From<io::Error> for Errno {
    fn from(err: io::Error) -> Errno {
        Errno(err.raw_os_error().unwrap_or(libc::EIO))
    }
}

pub(crate) type Res<T> = Result<T, Errno>;

const ENOENT: Errno = Errno(libc::ENOENT);
const EEXIST: Errno = Errno(libc::EEXIST);
const ENOTDIR: Errno = Errno(libc::ENOTDIR);
const EISDIR: Errno = Errno(libc::EISDIR);
const ENOTEMPTY: Errno = Errno(libc::ENOTEMPTY);
const EINVAL: Errno = Errno(libc::EINVAL);
const EPERM: Errno = Errno(libc::EPERM);

/// What kind of node an inode is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NodeKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

/// Attributes other than size and kind. Not part of the durability model: a cut keeps them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Meta {
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

impl Meta {
    pub(crate) fn new(perm: u16, uid: u32, gid: u32) -> Meta {
        let now = SystemTime::now();
        Meta {
            perm,
            uid,
            gid,
            rdev: 0,
            atime: now,
            mtime: now,
            ctime: now,
        }
    }
}

/// The attributes of an inode as `stat` shows them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stat {
    pub ino: u64,
    pub kind: NodeKind,
    pub size: u64,
    pub nlink: u32,
    pub meta: Meta,
}

/// The changes a `setattr` asks for.
#[derive(Debug, Default)]
pub(crate) struct SetAttr {
    pub perm: Option<u16>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
    pub ctime: Option<SystemTime>,
}

/// How a rename treats an existing target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RenameMode {
    /// Replace it (plain `rename`).
    Replace,
    /// Fail with EEXIST (`RENAME_NOREPLACE`).
    NoReplace,
    /// Swap the two entries (`RENAME_EXCHANGE`).
    Exchange,
}

/// One entry of a directory listing.
#[derive(Debug, Clone)]
pub(crate) struct DirEntry {
    pub ino: u64,
    pub kind: NodeKind,
    pub name: OsString,
}

#[derive(Debug)]
struct Dir {
    /// The directory holding this one's live entry (itself for the root).
    parent: u64,
    live: BTreeMap<OsString, u64>,
    /// Strict mode: the entries as of the last fsync of this directory.
    durable: Option<BTreeMap<OsString, u64>>,
}

#[derive(Debug)]
enum Body {
    File(FileData),
    Dir(Dir),
    Symlink(OsString),
    Special(NodeKind),
}

#[derive(Debug)]
struct Inode {
    meta: Meta,
    links: u32,
    durable_links: u32,
    lookups: u64,
    opens: u32,
    body: Body,
}

impl Inode {
    fn kind(&self) -> NodeKind {
        match &self.body {
            Body::File(_) => NodeKind::File,
            Body::Dir(_) => NodeKind::Dir,
            Body::Symlink(_) => NodeKind::Symlink,
            Body::Special(kind) => *kind,
        }
    }

    fn is_dir(&self) -> bool {
        matches!(self.body, Body::Dir(_))
    }

    fn changed(&mut self) {
        self.meta.ctime = SystemTime::now();
    }

    fn modified(&mut self) {
        let now = SystemTime::now();
        self.meta.mtime = now;
        self.meta.ctime = now;
    }
}

#[derive(Debug)]
enum Handle {
    File(u64),
    Dir { ino: u64, entries: Vec<DirEntry> },
}

/// What a new inode is made of.
enum New {
    File,
    Dir,
    Symlink(OsString),
    Special(NodeKind),
}

/// The whole filesystem state. See the module docs.
#[derive(Debug)]
pub(crate) struct Model {
    backing: PathBuf,
    strict: bool,
    /// Bumped by every cut and by unmount; a session answers only while its epoch is current.
    epoch: u64,
    next_ino: u64,
    next_fh: u64,
    inodes: HashMap<u64, Inode>,
    handles: HashMap<u64, Handle>,
}

impl Model {
    /// An empty filesystem whose backing files go to `backing` (which must be empty).
    pub(crate) fn new(backing: PathBuf, mode: Mode, root: Meta) -> Model {
        let strict = mode == Mode::Strict;
        let root_dir = Dir {
            parent: ROOT,
            live: BTreeMap::new(),
            durable: strict.then(BTreeMap::new),
        };
        let inode = Inode {
            meta: root,
            links: 1,
            durable_links: u32::from(strict),
            lookups: 0,
            opens: 0,
            body: Body::Dir(root_dir),
        };
        Model {
            backing,
            strict,
            epoch: 0,
            next_ino: ROOT + 1,
            next_fh: 1,
            inodes: HashMap::from([(ROOT, inode)]),
            handles: HashMap::new(),
        }
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Makes every session mounted so far stale (their requests then fail with EIO).
    pub(crate) fn retire(&mut self) {
        self.epoch += 1;
        self.handles.clear();
    }

    // ----- lookups and attributes -----

    pub(crate) fn lookup(&mut self, parent: u64, name: &OsStr) -> Res<Stat> {
        let ino = match name.as_bytes() {
            b"." => self.dir(parent).map(|_| parent)?,
            b".." => self.dir(parent)?.parent,
            _ => self.child(parent, name)?,
        };
        if ino != ROOT {
            self.node_mut(ino)?.lookups += 1;
        }
        self.stat(ino)
    }

    pub(crate) fn forget(&mut self, ino: u64, nlookup: u64) {
        if let Some(node) = self.inodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(nlookup);
            self.maybe_free(ino);
        }
    }

    pub(crate) fn stat(&self, ino: u64) -> Res<Stat> {
        let node = self.node(ino)?;
        let size = match &node.body {
            Body::File(data) => data.size(),
            Body::Symlink(target) => target.len() as u64,
            Body::Dir(_) | Body::Special(_) => 0,
        };
        // A directory reports 1 ("unknown"), as btrfs does, rather than a subdirectory count.
        let nlink = match &node.body {
            Body::Dir(_) => u32::from(node.links > 0),
            _ => node.links,
        };
        Ok(Stat {
            ino,
            kind: node.kind(),
            size,
            nlink,
            meta: node.meta,
        })
    }

    pub(crate) fn setattr(&mut self, ino: u64, attr: SetAttr) -> Res<Stat> {
        if let Some(size) = attr.size {
            self.file_mut(ino)?.set_len(size)?;
            self.node_mut(ino)?.modified();
        }
        let node = self.node_mut(ino)?;
        let meta = &mut node.meta;
        if let Some(perm) = attr.perm {
            meta.perm = perm & 0o7777;
        }
        if let Some(uid) = attr.uid {
            meta.uid = uid;
        }
        if let Some(gid) = attr.gid {
            meta.gid = gid;
        }
        if let Some(atime) = attr.atime {
            meta.atime = atime;
        }
        if let Some(mtime) = attr.mtime {
            meta.mtime = mtime;
        }
        meta.ctime = attr.ctime.unwrap_or_else(SystemTime::now);
        self.stat(ino)
    }

    pub(crate) fn readlink(&self, ino: u64) -> Res<Vec<u8>> {
        match &self.node(ino)?.body {
            Body::Symlink(target) => Ok(target.as_bytes().to_vec()),
            _ => Err(EINVAL),
        }
    }

    // ----- namespace changes -----

    /// Creates a regular file or a special node (`kind` other than Dir and Symlink).
    pub(crate) fn mknod(
        &mut self,
        parent: u64,
        name: &OsStr,
        kind: NodeKind,
        meta: Meta,
    ) -> Res<Stat> {
        let new = match kind {
            NodeKind::File => New::File,
            NodeKind::Dir | NodeKind::Symlink => return Err(EINVAL),
            special => New::Special(special),
        };
        self.add(parent, name, meta, new)
    }

    pub(crate) fn mkdir(&mut self, parent: u64, name: &OsStr, meta: Meta) -> Res<Stat> {
        self.add(parent, name, meta, New::Dir)
    }

    pub(crate) fn symlink(
        &mut self,
        parent: u64,
        name: &OsStr,
        target: &OsStr,
        meta: Meta,
    ) -> Res<Stat> {
        self.add(parent, name, meta, New::Symlink(target.to_owned()))
    }

    /// Creates and opens a regular file; returns its attributes and the handle.
    pub(crate) fn create(&mut self, parent: u64, name: &OsStr, meta: Meta) -> Res<(Stat, u64)> {
        let stat = self.add(parent, name, meta, New::File)?;
        let fh = self.open(stat.ino)?;
        Ok((stat, fh))
    }

    pub(crate) fn link(&mut self, ino: u64, parent: u64, name: &OsStr) -> Res<Stat> {
        check_name(name)?;
        if self.node(ino)?.is_dir() {
            return Err(EPERM);
        }
        if self.dir(parent)?.live.contains_key(name) {
            return Err(EEXIST);
        }
        self.dir_mut(parent)?.live.insert(name.to_owned(), ino);
        self.node_mut(parent)?.modified();
        let node = self.node_mut(ino)?;
        node.links += 1;
        node.lookups += 1;
        node.changed();
        self.stat(ino)
    }

    pub(crate) fn unlink(&mut self, parent: u64, name: &OsStr) -> Res<()> {
        let ino = self.child(parent, name)?;
        if self.node(ino)?.is_dir() {
            return Err(EISDIR);
        }
        self.dir_mut(parent)?.live.remove(name);
        self.node_mut(parent)?.modified();
        self.drop_link(ino);
        Ok(())
    }

    pub(crate) fn rmdir(&mut self, parent: u64, name: &OsStr) -> Res<()> {
        let ino = self.child(parent, name)?;
        if !self.dir(ino)?.live.is_empty() {
            return Err(ENOTEMPTY);
        }
        self.dir_mut(parent)?.live.remove(name);
        self.node_mut(parent)?.modified();
        self.drop_link(ino);
        Ok(())
    }

    pub(crate) fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        mode: RenameMode,
    ) -> Res<()> {
        check_name(new_name)?;
        let src = self.child(parent, name)?;
        let dst = self.dir(new_parent)?.live.get(new_name).copied();
        if mode == RenameMode::Exchange {
            let dst = dst.ok_or(ENOENT)?;
            self.dir_mut(parent)?.live.insert(name.to_owned(), dst);
            self.dir_mut(new_parent)?
                .live
                .insert(new_name.to_owned(), src);
            self.set_parent(src, new_parent);
            self.set_parent(dst, parent);
            for ino in [src, dst] {
                self.node_mut(ino)?.changed();
            }
            for ino in [parent, new_parent] {
                self.node_mut(ino)?.modified();
            }
            return Ok(());
        }
        if let Some(dst) = dst {
            if mode == RenameMode::NoReplace {
                return Err(EEXIST);
            }
            if dst == src {
                return Ok(());
            }
            let src_is_dir = self.node(src)?.is_dir();
            match &self.node(dst)?.body {
                Body::Dir(dir) if !src_is_dir => return Err(EISDIR),
                Body::Dir(dir) if !dir.live.is_empty() => return Err(ENOTEMPTY),
                Body::Dir(_) => {}
                _ if src_is_dir => return Err(ENOTDIR),
                _ => {}
            }
        }
        self.dir_mut(parent)?.live.remove(name);
        self.dir_mut(new_parent)?
            .live
            .insert(new_name.to_owned(), src);
        self.set_parent(src, new_parent);
        self.node_mut(src)?.changed();
        for ino in [parent, new_parent] {
            self.node_mut(ino)?.modified();
        }
        if let Some(dst) = dst {
            self.drop_link(dst);
        }
        Ok(())
    }

    // ----- open files -----

    pub(crate) fn open(&mut self, ino: u64) -> Res<u64> {
        let node = self.node_mut(ino)?;
        match node.body {
            Body::File(_) => {}
            Body::Dir(_) => return Err(EISDIR),
            _ => return Err(EINVAL),
        }
        node.opens += 1;
        Ok(self.new_handle(Handle::File(ino)))
    }

    pub(crate) fn read(&self, ino: u64, offset: u64, len: u32) -> Res<Vec<u8>> {
        match &self.node(ino)?.body {
            Body::File(data) => Ok(data.read(offset, len)?),
            Body::Dir(_) => Err(EISDIR),
            _ => Err(EINVAL),
        }
    }

    pub(crate) fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> Res<()> {
        self.file_mut(ino)?.write(offset, data)?;
        self.node_mut(ino)?.modified();
        Ok(())
    }

    pub(crate) fn fallocate(&mut self, ino: u64, offset: u64, len: u64, mode: i32) -> Res<()> {
        self.file_mut(ino)?.fallocate(offset, len, mode)?;
        self.node_mut(ino)?.modified();
        Ok(())
    }

    /// Closes a file or directory handle.
    pub(crate) fn release(&mut self, fh: u64) {
        let ino = match self.handles.remove(&fh) {
            Some(Handle::File(ino)) | Some(Handle::Dir { ino, .. }) => ino,
            None => return,
        };
        if let Some(node) = self.inodes.get_mut(&ino) {
            node.opens = node.opens.saturating_sub(1);
            self.maybe_free(ino);
        }
    }

    /// Opens a directory: the listing is taken now, so readdir offsets stay stable.
    pub(crate) fn opendir(&mut self, ino: u64) -> Res<u64> {
        let dir = self.dir(ino)?;
        let mut entries = vec![
            DirEntry {
                ino,
                kind: NodeKind::Dir,
                name: ".".into(),
            },
            DirEntry {
                ino: dir.parent,
                kind: NodeKind::Dir,
                name: "..".into(),
            },
        ];
        for (name, &child) in &dir.live {
            entries.push(DirEntry {
                ino: child,
                kind: self.node(child)?.kind(),
                name: name.clone(),
            });
        }
        self.node_mut(ino)?.opens += 1;
        Ok(self.new_handle(Handle::Dir { ino, entries }))
    }

    /// The entries of an open directory from position `offset` on.
    pub(crate) fn readdir(&self, fh: u64, offset: u64) -> Res<&[DirEntry]> {
        match self.handles.get(&fh) {
            Some(Handle::Dir { entries, .. }) => {
                let from = usize::try_from(offset).unwrap_or(usize::MAX);
                Ok(entries.get(from..).unwrap_or_default())
            }
            _ => Err(Errno(libc::EBADF)),
        }
    }

    // ----- durability -----

    /// fsync or fdatasync of a file: its data becomes durable (its name does not).
    pub(crate) fn fsync(&mut self, ino: u64) -> Res<()> {
        match &mut self.node_mut(ino)?.body {
            Body::File(data) => data.sync(),
            Body::Dir(_) => return self.fsyncdir(ino),
            Body::Symlink(_) | Body::Special(_) => {}
        }
        Ok(())
    }

    /// fsync of a directory: in Strict mode its live entries become its durable entries.
    pub(crate) fn fsyncdir(&mut self, ino: u64) -> Res<()> {
        let dir = self.dir_mut(ino)?;
        if dir.durable.is_none() || dir.durable.as_ref() == Some(&dir.live) {
            return Ok(());
        }
        let new = dir.live.clone();
        let old = dir.durable.replace(new.clone()).unwrap_or_default();
        for child in new.values() {
            self.node_mut(*child)?.durable_links += 1;
        }
        for child in old.values() {
            if let Some(node) = self.inodes.get_mut(child) {
                node.durable_links = node.durable_links.saturating_sub(1);
            }
        }
        for child in old.values() {
            self.maybe_free(*child);
        }
        Ok(())
    }

    /// The power cut: every open handle and kernel reference is gone, every directory gets its
    /// durable entries back, inodes no longer reachable from the root are deleted and every
    /// surviving file gets its durable content back.
    pub(crate) fn cut(&mut self) -> io::Result<CutReport> {
        self.retire();
        let mut report = CutReport::default();
        let live_paths = self.dir_paths();
        let mut restored = Vec::new();
        for (&ino, node) in &mut self.inodes {
            node.lookups = 0;
            node.opens = 0;
            let Body::Dir(dir) = &mut node.body else {
                continue;
            };
            let Some(durable) = &dir.durable else {
                continue;
            };
            for (name, child) in &dir.live {
                if durable.get(name) != Some(child) {
                    let path = match live_paths.get(&ino) {
                        Some(path) => path.join(name),
                        None => Path::new(&format!("(removed directory {ino})")).join(name),
                    };
                    report.entries_dropped.push(path);
                }
            }
            for (name, child) in durable {
                if dir.live.get(name) != Some(child) {
                    restored.push((ino, name.clone()));
                }
            }
            dir.live = durable.clone();
        }

        // Keep what the root reaches, noting the first path of each inode; a directory
        // reached under a second name (a rename durable in both its old and its new parent)
        // keeps only the first.
        let mut paths = HashMap::from([(ROOT, PathBuf::new())]);
        let mut queue = VecDeque::from([ROOT]);
        while let Some(dir_ino) = queue.pop_front() {
            let entries: Vec<(OsString, u64)> = match &self.inodes[&dir_ino].body {
                Body::Dir(dir) => dir.live.iter().map(|(n, i)| (n.clone(), *i)).collect(),
                _ => continue,
            };
            for (name, child) in entries {
                let path = paths[&dir_ino].join(&name);
                let child_is_dir = self.inodes[&child].is_dir();
                if paths.contains_key(&child) {
                    if child_is_dir {
                        if let Some(Body::Dir(dir)) =
                            self.inodes.get_mut(&dir_ino).map(|n| &mut n.body)
                        {
                            dir.live.remove(&name);
                            if let Some(durable) = &mut dir.durable {
                                durable.remove(&name);
                            }
                        }
                        report.entries_dropped.push(path);
                    }
                    continue;
                }
                paths.insert(child, path);
                if child_is_dir {
                    self.set_parent(child, dir_ino);
                    queue.push_back(child);
                }
            }
        }
        report.entries_restored = restored
            .into_iter()
            .filter_map(|(dir, name)| Some(paths.get(&dir)?.join(name)))
            .collect();
        let unreached: Vec<u64> = self
            .inodes
            .keys()
            .copied()
            .filter(|ino| !paths.contains_key(ino))
            .collect();
        for ino in unreached {
            if let Some(node) = self.inodes.remove(&ino) {
                if let Body::File(data) = node.body {
                    drop(data);
                    remove_backing(&self.backing, ino)?;
                }
                report.inodes_dropped += 1;
            }
        }

        let mut links: HashMap<u64, u32> = HashMap::new();
        for node in self.inodes.values() {
            if let Body::Dir(dir) = &node.body {
                for child in dir.live.values() {
                    *links.entry(*child).or_default() += 1;
                }
            }
        }
        for (ino, node) in &mut self.inodes {
            let count = if *ino == ROOT {
                1
            } else {
                links.get(ino).copied().unwrap_or(0)
            };
            node.links = count;
            node.durable_links = if self.strict { count } else { 0 };
            if let Body::File(data) = &mut node.body {
                let rollback = data.rollback()?;
                if rollback.changed {
                    report.files_rolled_back.push(paths[ino].clone());
                }
                report.bytes_restored += rollback.restored;
                report.bytes_truncated += rollback.truncated;
            }
        }
        report.files_rolled_back.sort();
        report.entries_dropped.sort();
        report.entries_restored.sort();
        Ok(report)
    }

    /// The path of every directory reachable through live entries, relative to the root.
    fn dir_paths(&self) -> HashMap<u64, PathBuf> {
        let mut paths = HashMap::from([(ROOT, PathBuf::new())]);
        let mut queue = VecDeque::from([ROOT]);
        while let Some(dir_ino) = queue.pop_front() {
            let Some(Body::Dir(dir)) = self.inodes.get(&dir_ino).map(|n| &n.body) else {
                continue;
            };
            let base = paths[&dir_ino].clone();
            for (name, &child) in &dir.live {
                if self.inodes.get(&child).is_some_and(Inode::is_dir) && !paths.contains_key(&child)
                {
                    paths.insert(child, base.join(name));
                    queue.push_back(child);
                }
            }
        }
        paths
    }

    /// A path of `ino` relative to the root through live entries, if it has one.
    pub(crate) fn path_of(&self, ino: u64) -> Option<PathBuf> {
        let mut queue = VecDeque::from([(ROOT, PathBuf::new())]);
        if ino == ROOT {
            return Some(PathBuf::new());
        }
        while let Some((dir_ino, path)) = queue.pop_front() {
            let Some(Body::Dir(dir)) = self.inodes.get(&dir_ino).map(|n| &n.body) else {
                continue;
            };
            for (name, &child) in &dir.live {
                if child == ino {
                    return Some(path.join(name));
                }
                if self.inodes.get(&child).is_some_and(Inode::is_dir) {
                    queue.push_back((child, path.join(name)));
                }
            }
        }
        None
    }

    // ----- helpers -----

    fn node(&self, ino: u64) -> Res<&Inode> {
        self.inodes.get(&ino).ok_or(ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Res<&mut Inode> {
        self.inodes.get_mut(&ino).ok_or(ENOENT)
    }

    fn dir(&self, ino: u64) -> Res<&Dir> {
        match &self.node(ino)?.body {
            Body::Dir(dir) => Ok(dir),
            _ => Err(ENOTDIR),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Res<&mut Dir> {
        match &mut self.node_mut(ino)?.body {
            Body::Dir(dir) => Ok(dir),
            _ => Err(ENOTDIR),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Res<&mut FileData> {
        match &mut self.node_mut(ino)?.body {
            Body::File(data) => Ok(data),
            Body::Dir(_) => Err(EISDIR),
            _ => Err(EINVAL),
        }
    }

    fn child(&self, parent: u64, name: &OsStr) -> Res<u64> {
        self.dir(parent)?.live.get(name).copied().ok_or(ENOENT)
    }

    fn set_parent(&mut self, ino: u64, parent: u64) {
        if let Some(Inode {
            body: Body::Dir(dir),
            ..
        }) = self.inodes.get_mut(&ino)
        {
            dir.parent = parent;
        }
    }

    fn new_handle(&mut self, handle: Handle) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, handle);
        fh
    }

    /// Adds a new inode under `parent/name`, counting one kernel lookup for the reply.
    fn add(&mut self, parent: u64, name: &OsStr, meta: Meta, new: New) -> Res<Stat> {
        check_name(name)?;
        if self.dir(parent)?.live.contains_key(name) {
            return Err(EEXIST);
        }
        let ino = self.next_ino;
        let body = match new {
            New::File => Body::File(FileData::create(&self.backing.join(ino.to_string()))?),
            New::Dir => Body::Dir(Dir {
                parent,
                live: BTreeMap::new(),
                durable: self.strict.then(BTreeMap::new),
            }),
            New::Symlink(target) => Body::Symlink(target),
            New::Special(kind) => Body::Special(kind),
        };
        self.next_ino += 1;
        let inode = Inode {
            meta,
            links: 1,
            durable_links: 0,
            lookups: 1,
            opens: 0,
            body,
        };
        self.inodes.insert(ino, inode);
        self.dir_mut(parent)?.live.insert(name.to_owned(), ino);
        self.node_mut(parent)?.modified();
        self.stat(ino)
    }

    /// Removes one live entry's reference to `ino`.
    fn drop_link(&mut self, ino: u64) {
        if let Some(node) = self.inodes.get_mut(&ino) {
            node.links = node.links.saturating_sub(1);
            node.changed();
            self.maybe_free(ino);
        }
    }

    /// Deletes `ino` if nothing keeps it alive any more, and whatever that releases.
    fn maybe_free(&mut self, ino: u64) {
        let mut pending = vec![ino];
        while let Some(ino) = pending.pop() {
            let Some(node) = self.inodes.get(&ino) else {
                continue;
            };
            if ino == ROOT
                || node.links > 0
                || node.durable_links > 0
                || node.lookups > 0
                || node.opens > 0
            {
                continue;
            }
            let Some(node) = self.inodes.remove(&ino) else {
                continue;
            };
            match node.body {
                Body::File(data) => {
                    drop(data);
                    // The inode is gone either way; a leftover backing file only costs space.
                    let _ = remove_backing(&self.backing, ino);
                }
                Body::Dir(dir) => {
                    for child in dir.live.values() {
                        if let Some(c) = self.inodes.get_mut(child) {
                            c.links = c.links.saturating_sub(1);
                            pending.push(*child);
                        }
                    }
                    for child in dir.durable.unwrap_or_default().values() {
                        if let Some(c) = self.inodes.get_mut(child) {
                            c.durable_links = c.durable_links.saturating_sub(1);
                            pending.push(*child);
                        }
                    }
                }
                Body::Symlink(_) | Body::Special(_) => {}
            }
        }
    }
}

fn check_name(name: &OsStr) -> Res<()> {
    let bytes = name.as_bytes();
    if bytes.len() > NAME_MAX {
        return Err(Errno(libc::ENAMETOOLONG));
    }
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(EINVAL);
    }
    Ok(())
}

fn remove_backing(backing: &Path, ino: u64) -> io::Result<()> {
    match fs::remove_file(backing.join(ino.to_string())) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta::new(0o644, 0, 0)
    }

    fn model(mode: Mode) -> (tempfile::TempDir, Model) {
        let dir = tempfile::tempdir().unwrap();
        let m = Model::new(dir.path().to_owned(), mode, Meta::new(0o755, 0, 0));
        (dir, m)
    }

    fn names(m: &mut Model, dir: u64) -> Vec<String> {
        let fh = m.opendir(dir).unwrap();
        let out = m.readdir(fh, 2).unwrap().iter();
        let out = out.map(|e| e.name.to_string_lossy().into_owned()).collect();
        m.release(fh);
        out
    }

    fn backing_files(dir: &tempfile::TempDir) -> usize {
        fs::read_dir(dir.path()).unwrap().count()
    }

    #[test]
    fn strict_keeps_only_what_fsyncdir_made_durable() {
        let (tmp, mut m) = model(Mode::Strict);
        let a = m.create(ROOT, "a".as_ref(), meta()).unwrap().0.ino;
        m.fsyncdir(ROOT).unwrap();
        let sub = m.mkdir(ROOT, "sub".as_ref(), meta()).unwrap().ino;
        m.create(sub, "b".as_ref(), meta()).unwrap();
        m.rename(ROOT, "a".as_ref(), ROOT, "c".as_ref(), RenameMode::Replace)
            .unwrap();
        let report = m.cut().unwrap();
        assert_eq!(names(&mut m, ROOT), ["a"]);
        assert_eq!(m.lookup(ROOT, "a".as_ref()).unwrap().ino, a);
        assert_eq!(report.inodes_dropped, 2, "{report:?}");
        assert_eq!(backing_files(&tmp), 1);
    }

    #[test]
    fn unlinked_file_lives_while_open_and_comes_back_if_durable() {
        let (tmp, mut m) = model(Mode::Strict);
        let (stat, fh) = m.create(ROOT, "a".as_ref(), meta()).unwrap();
        m.write(stat.ino, 0, b"hello").unwrap();
        m.fsync(stat.ino).unwrap();
        m.fsyncdir(ROOT).unwrap();
        m.unlink(ROOT, "a".as_ref()).unwrap();
        m.forget(stat.ino, 1);
        m.release(fh);
        assert_eq!(m.read(stat.ino, 0, 10).unwrap(), b"hello", "durably named");
        let report = m.cut().unwrap();
        assert_eq!(report.entries_restored, [PathBuf::from("a")]);
        assert_eq!(names(&mut m, ROOT), ["a"]);
        m.unlink(ROOT, "a".as_ref()).unwrap();
        m.fsyncdir(ROOT).unwrap();
        assert_eq!(backing_files(&tmp), 0, "freed once nothing names it");
    }

    #[test]
    fn ordered_frees_unlinked_files_at_last_close() {
        let (tmp, mut m) = model(Mode::Ordered);
        let (stat, fh) = m.create(ROOT, "a".as_ref(), meta()).unwrap();
        m.unlink(ROOT, "a".as_ref()).unwrap();
        m.forget(stat.ino, 1);
        assert_eq!(backing_files(&tmp), 1, "still open");
        m.write(stat.ino, 0, b"x").unwrap();
        m.release(fh);
        assert_eq!(backing_files(&tmp), 0);
    }

    #[test]
    fn rename_rules() {
        let (_tmp, mut m) = model(Mode::Ordered);
        m.mkdir(ROOT, "d".as_ref(), meta()).unwrap();
        m.mkdir(ROOT, "e".as_ref(), meta()).unwrap();
        let f = m.create(ROOT, "f".as_ref(), meta()).unwrap().0.ino;
        m.create(ROOT, "g".as_ref(), meta()).unwrap();
        let rename = |m: &mut Model, a: &str, b: &str, mode| {
            m.rename(ROOT, a.as_ref(), ROOT, b.as_ref(), mode)
        };
        assert_eq!(rename(&mut m, "f", "d", RenameMode::Replace), Err(EISDIR));
        assert_eq!(rename(&mut m, "d", "f", RenameMode::Replace), Err(ENOTDIR));
        assert_eq!(rename(&mut m, "f", "g", RenameMode::NoReplace), Err(EEXIST));
        rename(&mut m, "f", "g", RenameMode::Replace).unwrap();
        assert_eq!(m.lookup(ROOT, "g".as_ref()).unwrap().ino, f);
        rename(&mut m, "d", "g", RenameMode::Exchange).unwrap();
        assert_eq!(m.lookup(ROOT, "d".as_ref()).unwrap().ino, f);
        m.create(3, "x".as_ref(), meta()).unwrap(); // e is inode 3
        assert_eq!(
            rename(&mut m, "g", "e", RenameMode::Replace),
            Err(ENOTEMPTY)
        );
        assert_eq!(names(&mut m, ROOT), ["d", "e", "g"]);
        assert_eq!(m.path_of(f), Some(PathBuf::from("d")));
    }
}
