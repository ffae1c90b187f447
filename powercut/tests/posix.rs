//! What a real program needs from the mount besides durability: locks, statfs, appends,
//! holes, renames, links, open-but-unlinked files, and a mount that keeps serving after cuts.

mod common;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::{list, pattern, read, sync_dir, write_file};
use powercut::Mode;

fn cstr(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    // SAFETY: a plain syscall on an open descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[test]
fn flock_works() {
    let f = fixture!(Mode::Ordered);
    let path = f.path("db");
    write_file(&path, b"", false);
    let a = File::open(&path).unwrap();
    let b = File::open(&path).unwrap();
    flock(&a, libc::LOCK_EX | libc::LOCK_NB).unwrap();
    let err = flock(&b, libc::LOCK_EX | libc::LOCK_NB).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EWOULDBLOCK));
    flock(&a, libc::LOCK_UN).unwrap();
    flock(&b, libc::LOCK_EX | libc::LOCK_NB).unwrap();
}

#[test]
fn statfs_passes_the_backing_filesystem_through() {
    let f = fixture!(Mode::Ordered);
    let statvfs = |path: &Path| {
        // SAFETY: `st` is a plain struct the call fills in.
        unsafe {
            let mut st: libc::statvfs = std::mem::zeroed();
            assert_eq!(libc::statvfs(cstr(path).as_ptr(), &mut st), 0);
            st
        }
    };
    let (mnt, backing) = (statvfs(&f.mnt), statvfs(&f.backing));
    assert_eq!(mnt.f_bsize, backing.f_bsize);
    assert_eq!(mnt.f_frsize, backing.f_frsize);
    assert_eq!(mnt.f_blocks, backing.f_blocks);
    assert!(mnt.f_blocks > 0 && mnt.f_bavail <= mnt.f_bfree && mnt.f_bfree <= mnt.f_blocks);
    let slack = backing.f_blocks / 100;
    assert!(
        mnt.f_bavail.abs_diff(backing.f_bavail) <= slack,
        "free space differs"
    );
    assert!(mnt.f_namemax >= 255);
}

#[test]
fn appends_holes_and_pwrites() {
    let f = fixture!(Mode::Ordered);
    let path = f.path("f");
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(&path)
        .unwrap();
    file.write_all(b"one").unwrap();
    let other = OpenOptions::new().append(true).open(&path).unwrap();
    (&other).write_all(b"two").unwrap();
    file.write_all(b"three").unwrap();
    assert_eq!(
        read(&path).unwrap(),
        b"onetwothree",
        "O_APPEND writes at the end"
    );

    let rw = OpenOptions::new().write(true).open(&path).unwrap();
    rw.write_all_at(b"X", 20).unwrap();
    let data = read(&path).unwrap();
    assert_eq!(data.len(), 21);
    assert_eq!(&data[11..20], &[0; 9], "a write past the end leaves zeros");
    rw.write_all_at(b"W", 1).unwrap();
    rw.set_len(5).unwrap();
    assert_eq!(read(&path).unwrap(), b"oWetw");

    file.seek(SeekFrom::Start(2)).unwrap();
    let mut buf = String::new();
    file.read_to_string(&mut buf).unwrap();
    assert_eq!(buf, "etw");

    let counters = f.pc.counters();
    assert!(
        counters.writes >= 5 && counters.bytes_written >= 13,
        "{counters:?}"
    );
}

#[test]
fn fallocate_extends_and_punches() {
    let mut f = fixture!(Mode::Ordered);
    let path = f.path("f");
    let durable = pattern(20_000, 4);
    write_file(&path, &durable, true);
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    let fallocate = |mode, offset, len| {
        // SAFETY: a plain syscall on an open descriptor.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
        assert_eq!(rc, 0, "fallocate: {}", io::Error::last_os_error());
    };
    fallocate(0, 0, 40_000);
    assert_eq!(fs::metadata(&path).unwrap().len(), 40_000);
    fallocate(
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        4096,
        8192,
    );
    assert_eq!(read(&path).unwrap()[4096..12288], [0; 8192]);
    drop(file);
    let report = f.pc.cut().unwrap();
    assert_eq!(read(&path).unwrap(), durable, "{report}");
}

#[test]
fn renames_links_and_symlinks() {
    let f = fixture!(Mode::Strict);
    write_file(&f.path("a"), b"A", false);
    write_file(&f.path("b"), b"B", false);
    let renameat2 = |from: &str, to: &str, flags| {
        let (from, to) = (cstr(&f.path(from)), cstr(&f.path(to)));
        // SAFETY: valid C strings.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                flags,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    let err = renameat2("a", "b", libc::RENAME_NOREPLACE).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
    renameat2("a", "c", libc::RENAME_NOREPLACE).unwrap();
    renameat2("b", "c", libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(read(&f.path("b")).unwrap(), b"A");
    assert_eq!(read(&f.path("c")).unwrap(), b"B");
    fs::rename(f.path("b"), f.path("c")).unwrap();
    assert_eq!(list(&f.mnt), ["c"]);
    assert_eq!(
        read(&f.path("c")).unwrap(),
        b"A",
        "rename replaced the target"
    );

    fs::create_dir(f.path("d")).unwrap();
    fs::create_dir(f.path("e")).unwrap();
    write_file(&f.path("e/x"), b"", false);
    let err = fs::rename(f.path("d"), f.path("e")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTEMPTY));
    fs::remove_file(f.path("e/x")).unwrap();
    fs::rename(f.path("d"), f.path("e")).unwrap();
    let err = fs::remove_dir(f.path("d")).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);

    fs::hard_link(f.path("c"), f.path("e/hard")).unwrap();
    std::os::unix::fs::symlink("../c", f.path("e/soft")).unwrap();
    assert_eq!(fs::metadata(f.path("c")).unwrap().len(), 1);
    assert_eq!(read(&f.path("e/soft")).unwrap(), b"A");
    assert_eq!(fs::read_link(f.path("e/soft")).unwrap(), Path::new("../c"));
    use std::os::unix::fs::MetadataExt;
    assert_eq!(fs::metadata(f.path("c")).unwrap().nlink(), 2);
    fs::set_permissions(f.path("c"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        fs::metadata(f.path("e/hard")).unwrap().mode() & 0o777,
        0o600
    );
}

#[test]
fn unlinked_open_file_stays_readable_until_closed() {
    let f = fixture!(Mode::Ordered);
    let path = f.path("f");
    write_file(&path, b"still here", false);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    fs::remove_file(&path).unwrap();
    assert!(read(&path).is_none());
    file.write_all_at(b"STILL", 0).unwrap();
    let mut buf = String::new();
    file.read_to_string(&mut buf).unwrap();
    assert_eq!(buf, "STILL here");
    assert_eq!(fs::read_dir(&f.backing).unwrap().count(), 1);
    drop(file);
    // The kernel sends the release and its forget asynchronously after close(2).
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    while fs::read_dir(&f.backing).unwrap().count() != 0 {
        assert!(
            Instant::now() < deadline,
            "not deleted after the last close"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// After cuts, the same mountpoint serves the survivors to a new process.
#[test]
fn remount_serves_survivors_to_new_processes() {
    let mut f = fixture!(Mode::Strict);
    fs::create_dir(f.path("dir")).unwrap();
    write_file(&f.path("dir/file"), b"survivor\n", true);
    sync_dir(&f.path("dir"));
    sync_dir(&f.mnt);
    for _ in 0..3 {
        write_file(&f.path("dir/lost"), b"lost", false);
        f.pc.cut().unwrap();
        let out = Command::new("cat")
            .arg(f.path("dir/file"))
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, b"survivor\n");
        assert_eq!(list(&f.path("dir")), ["file"]);
    }
    assert_eq!(f.pc.counters().cuts, 3);
    f.pc.unmount().unwrap();
}

/// A mount still in use at a cut is detached lazily: its users get errors, the new mount is
/// clean.
#[test]
fn busy_mount_is_detached_lazily() {
    let mut f = fixture!(Mode::Ordered);
    let path = f.path("f");
    write_file(&path, b"durable", true);
    let open = File::open(&path).unwrap();
    let report = f.pc.cut().unwrap();
    assert!(report.lazy_unmount, "{report}");
    let mut buf = [0; 4];
    let err = open.read_at(&mut buf, 0).unwrap_err();
    // EIO from the stale session, or ENOTCONN once its connection was aborted (when the
    // fuse control filesystem is mounted).
    let errno = err.raw_os_error();
    assert!(
        errno == Some(libc::EIO) || errno == Some(libc::ENOTCONN),
        "{err}"
    );
    drop(open);
    assert_eq!(read(&path).unwrap(), b"durable");
    // The detached session ends once its last user is gone, and leaves the new mount alone.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(read(&path).unwrap(), b"durable");
}

/// A killed process that was not reaped yet still holds its files open for a moment; the
/// cut waits for it instead of detaching.
#[test]
fn cut_right_after_kill_without_reaping() {
    let mut f = fixture!(Mode::Ordered);
    let path = f.path("f");
    write_file(&path, b"", true);
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#"exec 3>>"$1"; printf unsynced >&3; echo ready; exec sleep 60"#)
        .arg("sh")
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = [0; 6];
    child.stdout.take().unwrap().read_exact(&mut ready).unwrap();
    assert_eq!(read(&path).unwrap(), b"unsynced");
    child.kill().unwrap();
    let report = f.pc.cut().unwrap();
    child.wait().unwrap();
    assert!(!report.lazy_unmount, "{report}");
    assert_eq!(read(&path).unwrap(), b"", "{report}");
}

/// Many small writes and syncs, as the daemon does, stay fast and exact.
#[test]
fn many_small_writes_and_syncs() {
    let mut f = fixture!(Mode::Strict);
    let path = f.path("log");
    let mut file = File::create(&path).unwrap();
    sync_dir(&f.mnt);
    let started = Instant::now();
    let mut expected = Vec::new();
    for i in 0..5000u32 {
        let record = format!("record {i:06} {}\n", "x".repeat((i % 50) as usize));
        file.write_all(record.as_bytes()).unwrap();
        expected.extend_from_slice(record.as_bytes());
        if i % 10 == 9 {
            file.sync_data().unwrap();
        }
        if i % 100 == 0 {
            // An in-place header update, as a log might do.
            file.write_all_at(&i.to_le_bytes(), 0).unwrap();
        }
    }
    file.sync_data().unwrap();
    let header_at_sync = 4900u32.to_le_bytes();
    expected[..4].copy_from_slice(&header_at_sync);
    file.write_all(b"unsynced tail").unwrap();
    drop(file);
    let elapsed = started.elapsed();
    eprintln!("5000 writes and 500 fdatasyncs took {elapsed:?}");
    let report = f.pc.cut().unwrap();
    assert_eq!(read(&path).unwrap(), expected, "{report}");
    assert_eq!(report.bytes_truncated, 13, "{report}");
}
