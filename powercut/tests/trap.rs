//! The sync trap: a process killed while its fsync is held inside the filesystem, with the
//! sync then counted as having reached the disk or not.
//!
//! The killed process is this test binary run again with `POWERCUT_TEST_CHILD` set, which
//! makes its ignored `child_process` test do one write-and-sync.

mod common;

use std::env;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

use common::{read, sync_dir, write_file};
use powercut::{Mode, SyncKind};

const CHILD_ENV: &str = "POWERCUT_TEST_CHILD";
const PAYLOAD: &[u8] = b"payload";
const CATCH_TIMEOUT: Duration = Duration::from_secs(60);

/// Not a test of its own: the body of the child process. `POWERCUT_TEST_CHILD` is
/// `OP:PATH`; the child appends [`PAYLOAD`] to PATH and syncs it (`fsync`, `fdatasync`),
/// appends and syncs three times (`three-fsyncs`), or creates PATH without syncing it and
/// syncs its directory (`fsyncdir`).
#[test]
#[ignore = "the body of the child process of the other tests"]
fn child_process() {
    let Ok(spec) = env::var(CHILD_ENV) else {
        return;
    };
    let (op, path) = spec.split_once(':').expect("OP:PATH");
    let path = Path::new(path);
    match op {
        "fsync" | "fdatasync" => {
            let mut file = OpenOptions::new().append(true).open(path).unwrap();
            file.write_all(PAYLOAD).unwrap();
            if op == "fsync" {
                file.sync_all().unwrap();
            } else {
                file.sync_data().unwrap();
            }
        }
        "three-fsyncs" => {
            let mut file = OpenOptions::new().append(true).open(path).unwrap();
            for step in [b"1", b"2", b"3"] {
                file.write_all(step).unwrap();
                file.sync_all().unwrap();
            }
        }
        "fsyncdir" => {
            File::create(path).unwrap().write_all(PAYLOAD).unwrap();
            File::open(path.parent().unwrap())
                .unwrap()
                .sync_all()
                .unwrap();
        }
        _ => panic!("unknown op {op}"),
    }
}

fn spawn_child(op: &str, path: &Path) -> Child {
    Command::new(env::current_exe().unwrap())
        .args(["--exact", "child_process", "--ignored", "--test-threads=1"])
        .env(CHILD_ENV, format!("{op}:{}", path.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Arms the trap, lets a child run `op` on `path`, kills it inside the held sync, releases
/// the sync as `durable` and cuts the power.
fn kill_inside_sync(
    f: &mut common::Fixture,
    op: &str,
    path: &Path,
    kind: SyncKind,
    durable: bool,
) -> powercut::CutReport {
    let trap = f.pc.arm_sync_trap();
    let mut child = spawn_child(op, path);
    let held = trap
        .wait(CATCH_TIMEOUT)
        .unwrap_or_else(|| panic!("the child's {op} was not caught"));
    assert_eq!(held.call().kind, kind);
    let synced = if kind == SyncKind::Fsyncdir {
        path.parent().unwrap()
    } else {
        path
    };
    assert_eq!(held.path(), Some(synced));
    assert_ne!(held.call().pid, 0);
    let shown = format!("{held:?}");
    assert!(shown.contains(&synced.display().to_string()), "{shown}");

    child.kill().unwrap(); // SIGKILL
    thread::sleep(Duration::from_millis(200));
    assert!(
        child.try_wait().unwrap().is_none(),
        "a process whose request is held cannot finish dying"
    );
    // The rest of the mount keeps working meanwhile.
    assert!(
        read(path).unwrap().ends_with(PAYLOAD),
        "the live file has the write"
    );

    held.release(durable);
    let status = child.wait().unwrap();
    assert!(!status.success(), "the child was killed, not finished");
    f.pc.cut().unwrap()
}

fn killed_inside_fsync(mode: Mode, op: &str, kind: SyncKind, durable: bool) {
    let mut f = fixture!(mode);
    let path = f.path("data");
    write_file(&path, b"durable;", true);
    sync_dir(&f.mnt);
    let before = f.pc.counters();

    let report = kill_inside_sync(&mut f, op, &path, kind, durable);

    let expected: &[u8] = if durable {
        b"durable;payload"
    } else {
        b"durable;"
    };
    assert_eq!(read(&path).unwrap(), expected, "{report}");
    let counters = f.pc.counters();
    assert_eq!(counters.fsyncs, before.fsyncs + 1, "{counters:?}");
    let datasync = u64::from(kind == SyncKind::Fdatasync);
    assert_eq!(counters.fdatasyncs, before.fdatasyncs + datasync);
}

#[test]
fn fsync_released_not_durable_loses_the_write_ordered() {
    killed_inside_fsync(Mode::Ordered, "fsync", SyncKind::Fsync, false);
}

#[test]
fn fsync_released_durable_keeps_the_write_ordered() {
    killed_inside_fsync(Mode::Ordered, "fsync", SyncKind::Fsync, true);
}

#[test]
fn fsync_released_not_durable_loses_the_write_strict() {
    killed_inside_fsync(Mode::Strict, "fsync", SyncKind::Fsync, false);
}

#[test]
fn fsync_released_durable_keeps_the_write_strict() {
    killed_inside_fsync(Mode::Strict, "fsync", SyncKind::Fsync, true);
}

#[test]
fn fdatasync_is_trapped_as_fdatasync() {
    killed_inside_fsync(Mode::Ordered, "fdatasync", SyncKind::Fdatasync, false);
    killed_inside_fsync(Mode::Strict, "fdatasync", SyncKind::Fdatasync, true);
}

/// Strict: the child creates a file and syncs the directory (not the file): released as
/// durable, the (empty) file exists after the cut; released as not durable, it does not.
#[test]
fn fsyncdir_released_either_way_strict() {
    for durable in [false, true] {
        let mut f = fixture!(Mode::Strict);
        let path = f.path("created");
        let report = kill_inside_sync(&mut f, "fsyncdir", &path, SyncKind::Fsyncdir, durable);
        let expected: Option<&[u8]> = durable.then_some(b"");
        assert_eq!(
            read(&path).as_deref(),
            expected,
            "durable={durable}: {report}"
        );
        assert_eq!(f.pc.counters().fsyncdirs, 1);
    }
}

/// A cut answers a sync still held as not durable; the child can then die.
#[test]
fn cut_releases_a_held_sync() {
    let mut f = fixture!(Mode::Ordered);
    let path = f.path("data");
    write_file(&path, b"durable;", true);
    let trap = f.pc.arm_sync_trap();
    let mut child = spawn_child("fsync", &path);
    let held = trap.wait(CATCH_TIMEOUT).expect("caught");
    child.kill().unwrap();
    let report = f.pc.cut().unwrap();
    child.wait().unwrap();
    drop(held); // already answered by the cut: a no-op
    assert_eq!(read(&path).unwrap(), b"durable;", "{report}");
}

/// A trap that timed out and is dropped holds nothing afterwards.
#[test]
fn dropped_trap_is_disarmed() {
    let mut f = fixture!(Mode::Ordered);
    let trap = f.pc.arm_sync_trap();
    assert!(trap.wait(Duration::from_millis(50)).is_none());
    drop(trap);
    write_file(&f.path("x"), b"kept", true);
    f.pc.cut().unwrap();
    assert_eq!(read(&f.path("x")).unwrap(), b"kept");
}

/// Skipping syncs moves the kill point: held at the second of three syncs, the first one's
/// write survives and the second one's does not.
#[test]
fn trap_after_skips_syncs() {
    let mut f = fixture!(Mode::Strict);
    let path = f.path("data");
    write_file(&path, b"durable;", true);
    sync_dir(&f.mnt);
    let trap = f.pc.arm_sync_trap_after(1);
    let mut child = spawn_child("three-fsyncs", &path);
    let held = trap
        .wait(CATCH_TIMEOUT)
        .expect("the second fsync was caught");
    assert_eq!(read(&path).unwrap(), b"durable;12");
    child.kill().unwrap();
    held.release(false);
    child.wait().unwrap();
    let report = f.pc.cut().unwrap();
    assert_eq!(read(&path).unwrap(), b"durable;1", "{report}");
}
