//! Shared test helpers: a mounted fixture that skips when FUSE is unavailable, and small
//! file operations that say what they sync.

#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use powercut::{Mode, PowerCut};

/// A mounted filesystem in a temporary directory (`backing/` and `mnt/`).
pub struct Fixture {
    // Declared first so it is dropped (unmounted) before the directory is removed.
    pub pc: PowerCut,
    pub mnt: PathBuf,
    pub backing: PathBuf,
    _dir: tempfile::TempDir,
}

impl Fixture {
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }
}

/// Mounts a fixture, or returns `None` (after saying why) when FUSE is not available here
/// and `POWERCUT_REQUIRED` is not set.
pub fn mount(mode: Mode) -> Option<Fixture> {
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("backing");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    match PowerCut::mount(&backing, &mnt, mode) {
        Ok(pc) => Some(Fixture {
            mnt: pc.mountpoint().to_owned(),
            pc,
            backing,
            _dir: dir,
        }),
        Err(err)
            if powercut::is_unavailable(&err)
                && std::env::var_os("POWERCUT_REQUIRED").is_none() =>
        {
            eprintln!("skipping: {err} (set POWERCUT_REQUIRED=1 to fail instead)");
            None
        }
        Err(err) => panic!("mounting powercut failed: {err}"),
    }
}

/// `let f = fixture!(Mode::Strict);` returns from the test when FUSE is unavailable.
#[macro_export]
macro_rules! fixture {
    ($mode:expr) => {
        match common::mount($mode) {
            Some(fixture) => fixture,
            None => return,
        }
    };
}

/// Creates (or replaces) a file with `data`; fsyncs it if `sync`.
pub fn write_file(path: &Path, data: &[u8], sync: bool) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data).unwrap();
    if sync {
        f.sync_all().unwrap();
    }
}

/// Writes `data` at `offset` of an existing file, without syncing.
pub fn overwrite(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
}

/// Appends `data` to an existing file, without syncing.
pub fn append(path: &Path, data: &[u8]) {
    let mut f = OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(data).unwrap();
}

/// fsyncs a directory.
pub fn sync_dir(path: &Path) {
    File::open(path)
        .and_then(|d| d.sync_all())
        .unwrap_or_else(|e| panic!("fsync dir {}: {e}", path.display()));
}

/// A file's content, or `None` if it does not exist.
pub fn read(path: &Path) -> Option<Vec<u8>> {
    match fs::read(path) {
        Ok(data) => Some(data),
        Err(err) if err.kind() == io::ErrorKind::NotFound => None,
        Err(err) => panic!("read {}: {err}", path.display()),
    }
}

/// The names in a directory, sorted.
pub fn list(path: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Deterministic, position-dependent bytes, so a misplaced chunk shows.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2] ^ seed)
        .collect()
}
