//! The layer proved both ways: what a careful writer synced survives a cut byte for byte,
//! and what a careless writer did not sync is lost (which a plain passthrough would keep).

mod common;

use std::fs;
use std::path::PathBuf;

use common::{append, list, overwrite, pattern, read, sync_dir, write_file};
use powercut::Mode;

/// Writes a small tree the careful way: every file fsynced, every directory fsynced after
/// its last change, including the parent of each directory created.
fn careful_writer_keeps_everything(mode: Mode) {
    let f = fixture!(mode);
    fs::create_dir(f.path("a")).unwrap();
    fs::create_dir(f.path("a/b")).unwrap();
    let files = [
        ("top", pattern(10, 1)),
        ("a/one", pattern(70_000, 2)),
        ("a/b/two", pattern(4096 * 3 + 17, 3)),
        ("a/b/empty", Vec::new()),
    ];
    for (name, data) in &files {
        write_file(&f.path(name), data, true);
    }
    // Rewrite a synced file in place and extend it, then sync again.
    let mut one = files[1].1.clone();
    overwrite(&f.path("a/one"), 5000, b"rewritten");
    one[5000..5009].copy_from_slice(b"rewritten");
    append(&f.path("a/one"), b"tail");
    one.extend_from_slice(b"tail");
    fs::File::open(f.path("a/one"))
        .unwrap()
        .sync_data()
        .unwrap();
    // A replace-by-rename, synced the careful way.
    write_file(&f.path("a/tmp"), b"new config", true);
    fs::rename(f.path("a/tmp"), f.path("a/config")).unwrap();
    for dir in ["a/b", "a", ""] {
        sync_dir(&f.path(dir));
    }

    let mut f = f;
    let report = f.pc.cut().unwrap();
    assert!(report.files_rolled_back.is_empty(), "{report}");
    assert!(report.entries_dropped.is_empty(), "{report}");
    assert!(report.entries_restored.is_empty(), "{report}");
    assert_eq!(report.inodes_dropped, 0, "{report}");
    assert!(!report.lazy_unmount, "{report}");

    assert_eq!(list(&f.mnt), ["a", "top"]);
    assert_eq!(list(&f.path("a")), ["b", "config", "one"]);
    assert_eq!(list(&f.path("a/b")), ["empty", "two"]);
    assert_eq!(read(&f.path("top")).unwrap(), files[0].1);
    assert_eq!(read(&f.path("a/one")).unwrap(), one);
    assert_eq!(read(&f.path("a/b/two")).unwrap(), files[2].1);
    assert_eq!(read(&f.path("a/b/empty")).unwrap(), b"");
    assert_eq!(read(&f.path("a/config")).unwrap(), b"new config");
    let counters = f.pc.counters();
    assert!(counters.fsyncs >= 6, "{counters:?}");
    assert!(counters.fdatasyncs >= 1, "{counters:?}");
    assert!(counters.fsyncdirs >= 3, "{counters:?}");
}

#[test]
fn careful_writer_keeps_everything_ordered() {
    careful_writer_keeps_everything(Mode::Ordered);
}

#[test]
fn careful_writer_keeps_everything_strict() {
    careful_writer_keeps_everything(Mode::Strict);
}

/// Unsynced appends and overwrites of a durable file are undone.
fn unsynced_data_is_lost(mode: Mode) {
    let mut f = fixture!(mode);
    let path = f.path("log");
    let durable = pattern(10_000, 7);
    write_file(&path, &durable, true);
    sync_dir(&f.mnt);

    overwrite(&path, 100, &[b'B'; 4900]);
    overwrite(&path, 9_990, b"straddles the durable end");
    append(&path, &[b'C'; 3000]);
    let len = fs::metadata(&path).unwrap().len();
    assert_eq!(len, 13_015, "the live file has everything");

    let report = f.pc.cut().unwrap();
    assert_eq!(read(&path).unwrap(), durable, "{report}");
    assert_eq!(report.files_rolled_back, [PathBuf::from("log")], "{report}");
    assert_eq!(report.bytes_truncated, 3015, "{report}");
    assert!(report.bytes_restored >= 4900, "{report}");

    // After the cut the file works as usual, and a second cut keeps a newer sync.
    append(&path, b"synced");
    fs::File::open(&path).unwrap().sync_all().unwrap();
    let report = f.pc.cut().unwrap();
    let mut expected = durable.clone();
    expected.extend_from_slice(b"synced");
    assert_eq!(read(&path).unwrap(), expected, "{report}");
    assert!(report.files_rolled_back.is_empty(), "{report}");
}

#[test]
fn unsynced_data_is_lost_ordered() {
    unsynced_data_is_lost(Mode::Ordered);
}

#[test]
fn unsynced_data_is_lost_strict() {
    unsynced_data_is_lost(Mode::Strict);
}

/// A truncation without a sync comes back too.
#[test]
fn unsynced_truncate_is_lost() {
    let mut f = fixture!(Mode::Ordered);
    let path = f.path("t");
    let durable = pattern(50_000, 9);
    write_file(&path, &durable, true);
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(1234)
        .unwrap();
    overwrite(&path, 20_000, b"after the hole");
    let report = f.pc.cut().unwrap();
    assert_eq!(read(&path).unwrap(), durable, "{report}");
    // The same through O_TRUNC.
    write_file(&path, b"replaced", false);
    assert_eq!(read(&path).unwrap(), b"replaced");
    let report = f.pc.cut().unwrap();
    assert_eq!(read(&path).unwrap(), durable, "{report}");
}

/// Directory changes after the last directory sync: Strict loses them all, Ordered keeps
/// them all but still loses unsynced data.
fn unsynced_namespace_changes(mode: Mode) {
    let mut f = fixture!(mode);
    for (name, data) in [("keep", "K"), ("old", "O"), ("gone", "G")] {
        write_file(&f.path(name), data.as_bytes(), true);
    }
    sync_dir(&f.mnt);

    write_file(&f.path("new-synced"), b"N", true);
    write_file(&f.path("new-unsynced"), b"U", false);
    fs::create_dir(f.path("newdir")).unwrap();
    write_file(&f.path("newdir/inner"), b"I", true);
    sync_dir(&f.path("newdir"));
    fs::rename(f.path("old"), f.path("renamed")).unwrap();
    fs::remove_file(f.path("gone")).unwrap();

    let report = f.pc.cut().unwrap();
    match mode {
        Mode::Strict => {
            assert_eq!(list(&f.mnt), ["gone", "keep", "old"], "{report}");
            assert_eq!(read(&f.path("old")).unwrap(), b"O");
            assert_eq!(read(&f.path("gone")).unwrap(), b"G");
            let paths = |names: &[&str]| names.iter().map(PathBuf::from).collect::<Vec<_>>();
            let dropped = ["new-synced", "new-unsynced", "newdir", "renamed"];
            assert_eq!(report.entries_dropped, paths(&dropped), "{report}");
            assert_eq!(report.entries_restored, paths(&["gone", "old"]), "{report}");
            assert_eq!(report.inodes_dropped, 4, "{report}");
        }
        Mode::Ordered => {
            let names = ["keep", "new-synced", "new-unsynced", "newdir", "renamed"];
            assert_eq!(list(&f.mnt), names, "{report}");
            assert_eq!(read(&f.path("renamed")).unwrap(), b"O");
            assert_eq!(read(&f.path("new-synced")).unwrap(), b"N");
            assert_eq!(
                read(&f.path("new-unsynced")).unwrap(),
                b"",
                "data was not synced"
            );
            assert_eq!(read(&f.path("newdir/inner")).unwrap(), b"I");
            assert!(report.entries_dropped.is_empty(), "{report}");
            assert!(report.entries_restored.is_empty(), "{report}");
            assert_eq!(report.files_rolled_back, [PathBuf::from("new-unsynced")]);
            assert_eq!(report.inodes_dropped, 0, "{report}");
        }
    }
    assert_eq!(read(&f.path("keep")).unwrap(), b"K");
    let surviving_files = if mode == Mode::Strict { 3 } else { 5 };
    assert_eq!(
        fs::read_dir(&f.backing).unwrap().count(),
        surviving_files,
        "one backing file per surviving regular file"
    );
}

#[test]
fn unsynced_namespace_changes_ordered() {
    unsynced_namespace_changes(Mode::Ordered);
}

#[test]
fn unsynced_namespace_changes_strict() {
    unsynced_namespace_changes(Mode::Strict);
}

/// Strict: syncing a file does not make its name durable; its parent's sync does.
#[test]
fn strict_file_fsync_without_dir_fsync_is_lost() {
    let mut f = fixture!(Mode::Strict);
    write_file(&f.path("synced-data-only"), b"data", true);
    fs::create_dir(f.path("d")).unwrap();
    sync_dir(&f.mnt);
    write_file(&f.path("d/in-unsynced-dir"), b"data", true);
    fs::create_dir(f.path("d/sub")).unwrap();
    write_file(&f.path("d/sub/deep"), b"deep", true);
    sync_dir(&f.path("d/sub")); // the new directory's entries, but not its own name in d

    let report = f.pc.cut().unwrap();
    assert_eq!(list(&f.mnt), ["d", "synced-data-only"], "{report}");
    assert_eq!(list(&f.path("d")), Vec::<String>::new(), "{report}");
    assert_eq!(
        read(&f.path("synced-data-only")).unwrap(),
        b"data",
        "named by the root's sync, which came after the file's creation"
    );

    // Once the parents are synced too, everything stays.
    write_file(&f.path("d/in-unsynced-dir"), b"data", true);
    fs::create_dir(f.path("d/sub")).unwrap();
    write_file(&f.path("d/sub/deep"), b"deep", true);
    sync_dir(&f.path("d/sub"));
    sync_dir(&f.path("d"));
    let report = f.pc.cut().unwrap();
    assert_eq!(list(&f.path("d")), ["in-unsynced-dir", "sub"], "{report}");
    assert_eq!(read(&f.path("d/sub/deep")).unwrap(), b"deep");
    assert_eq!(report.inodes_dropped, 0, "{report}");
}

/// Strict: a file created without a directory sync vanishes even though it was synced, and
/// a file unlinked and replaced comes back with its durable content.
#[test]
fn strict_replace_by_rename_needs_the_dir_sync() {
    let mut f = fixture!(Mode::Strict);
    write_file(&f.path("current"), b"version 1", true);
    sync_dir(&f.mnt);
    write_file(&f.path("current.tmp"), b"version 2", true);
    fs::rename(f.path("current.tmp"), f.path("current")).unwrap();
    assert_eq!(read(&f.path("current")).unwrap(), b"version 2");
    let report = f.pc.cut().unwrap();
    assert_eq!(list(&f.mnt), ["current"], "{report}");
    assert_eq!(read(&f.path("current")).unwrap(), b"version 1", "{report}");

    // The same with the directory sync keeps version 2; the old inode is gone.
    write_file(&f.path("current.tmp"), b"version 2", true);
    fs::rename(f.path("current.tmp"), f.path("current")).unwrap();
    sync_dir(&f.mnt);
    let report = f.pc.cut().unwrap();
    assert_eq!(read(&f.path("current")).unwrap(), b"version 2", "{report}");
    assert_eq!(fs::read_dir(&f.backing).unwrap().count(), 1);
}

/// Ordered: the replaced file's unsynced data is lost, so a replace-by-rename without an
/// fsync of the new file leaves an empty file (ext4 would flush it; this layer does not).
#[test]
fn ordered_rename_of_unsynced_file_leaves_it_empty() {
    let mut f = fixture!(Mode::Ordered);
    write_file(&f.path("current"), b"version 1", true);
    write_file(&f.path("current.tmp"), b"version 2", false);
    fs::rename(f.path("current.tmp"), f.path("current")).unwrap();
    let report = f.pc.cut().unwrap();
    assert_eq!(read(&f.path("current")).unwrap(), b"", "{report}");
}
