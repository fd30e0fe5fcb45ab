//! The test of the test: the power-cut filesystem mounted on a scratch folder, writers that do and do not
//! follow the durable sequence, a cut, and what survives. Each test mounts its own instance; its guard kills
//! the process it started (by PID) and detaches the mount if it is still there. Skipped, with one line,
//! without /dev/fuse or root.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

fn fuse_usable() -> bool {
    if !Path::new("/dev/fuse").exists() {
        println!("SKIP: /dev/fuse is missing: the power-cut filesystem cannot mount here");
        return false;
    }
    // SAFETY: no arguments, no memory.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP: the power-cut filesystem tests mount with allow_other and need root (CI runs as root)");
        return false;
    }
    true
}

macro_rules! require_fuse {
    () => {
        if !fuse_usable() {
            return;
        }
    };
}

/// One running powercut-fs. Dropping it kills the process by PID and detaches a mount left behind.
struct PowerCutFs {
    child: Option<Child>,
    lines: Receiver<String>,
    backing: PathBuf,
    mnt: PathBuf,
    args: Vec<&'static str>,
}

impl PowerCutFs {
    fn mount(scratch: &Path, args: &[&'static str]) -> PowerCutFs {
        let (backing, mnt) = (scratch.join("backing"), scratch.join("mnt"));
        for dir in [&backing, &mnt] {
            fs::create_dir_all(dir).unwrap();
        }
        PowerCutFs::start(backing, mnt, args.to_vec())
    }

    fn start(backing: PathBuf, mnt: PathBuf, args: Vec<&'static str>) -> PowerCutFs {
        let mut child = Command::new(env!("CARGO_BIN_EXE_powercut-fs"))
            .args(&args)
            .arg(&backing)
            .arg(&mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start powercut-fs");
        // A thread reads the output, so that a hung process fails the test by a timeout instead of
        // blocking it.
        let (send, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = send.send(line);
            }
        });
        let fs = PowerCutFs {
            child: Some(child),
            lines,
            backing,
            mnt,
            args,
        };
        let line = fs.next_line("the mount");
        assert!(line.starts_with("powercut-fs: mounted"), "{line}");
        fs
    }

    fn next_line(&self, what: &str) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("powercut-fs said nothing about {what} within 30 s"))
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// Cuts the power and waits for the process to exit; returns its report.
    fn cut(mut self) -> (PathBuf, PathBuf, Vec<&'static str>, String) {
        let pid = self.child.as_ref().unwrap().id();
        // SAFETY: signals a process this test started and has not reaped.
        unsafe { libc::kill(pid as i32, libc::SIGUSR1) };
        let report = self.next_line("the power cut");
        let child = self.child.as_mut().unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "powercut-fs did not exit after its cut"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        self.child = None;
        assert!(status.success(), "powercut-fs exited with {status}");
        assert!(report.starts_with("powercut-fs: power cut:"), "{report}");
        assert!(!is_mounted(&self.mnt), "the cut leaves no mount behind");
        (
            self.backing.clone(),
            self.mnt.clone(),
            self.args.clone(),
            report,
        )
    }

    /// A cut, then a mount of what survived: the reboot.
    fn reboot(self) -> PowerCutFs {
        let (backing, mnt, args, _) = self.cut();
        PowerCutFs::start(backing, mnt, args)
    }
}

impl Drop for PowerCutFs {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.mnt) {
            let path = CString::new(self.mnt.as_os_str().as_bytes()).unwrap();
            // SAFETY: a valid path; a lazy unmount of the mount this guard made.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

fn is_mounted(mnt: &Path) -> bool {
    let Ok(mnt) = mnt.canonicalize() else {
        return false;
    };
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(mnt.to_str().unwrap()))
}

fn fsync_dir(dir: &Path) {
    File::open(dir).unwrap().sync_all().unwrap();
}

/// imaged's write, step by step: temp file, write, fdatasync, rename without replacing, folder fsync.
fn durable_write(dir: &Path, name: &str, bytes: &[u8]) {
    let mut temp = tempfile::Builder::new()
        .prefix(".incoming-")
        .suffix(".part")
        .tempfile_in(dir)
        .unwrap();
    temp.write_all(bytes).unwrap();
    temp.as_file().sync_data().unwrap();
    temp.into_temp_path()
        .persist_noclobber(dir.join(name))
        .unwrap();
    fsync_dir(dir);
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn image(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn a_writer_that_syncs_data_renames_and_syncs_the_folder_keeps_its_file_whole_after_a_cut() {
    require_fuse!();
    let scratch = tempfile::tempdir().unwrap();
    let fs = PowerCutFs::mount(scratch.path(), &[]);
    let bytes = image(1, 100_000);
    durable_write(&fs.mnt, "a.jpg", &bytes);
    let fs = fs.reboot();
    assert_eq!(names(&fs.mnt), ["a.jpg"], "no temp file is left either");
    assert_eq!(fs::read(fs.path("a.jpg")).unwrap(), bytes);
}

#[test]
fn the_link_and_unlink_fallback_of_a_filesystem_without_rename2_also_keeps_the_file_whole() {
    require_fuse!();
    let scratch = tempfile::tempdir().unwrap();
    let fs = PowerCutFs::mount(scratch.path(), &["--no-rename2"]);
    fs::write(fs.path("x"), b"x").unwrap();
    let err = renameat2(&fs.path("x"), &fs.path("y"), libc::RENAME_NOREPLACE).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "as on libfuse 2");
    fs::remove_file(fs.path("x")).unwrap();
    let bytes = image(2, 50_000);
    durable_write(&fs.mnt, "a.jpg", &bytes);
    let (backing, ..) = fs.cut();
    assert_eq!(names(&backing), ["a.jpg"]);
    assert_eq!(fs::read(backing.join("a.jpg")).unwrap(), bytes);
}

#[test]
fn a_rename_without_a_folder_fsync_is_lost_at_a_power_cut() {
    require_fuse!();
    let scratch = tempfile::tempdir().unwrap();
    let fs = PowerCutFs::mount(scratch.path(), &[]);
    let mut temp = tempfile::Builder::new()
        .prefix(".incoming-")
        .tempfile_in(&fs.mnt)
        .unwrap();
    temp.write_all(&image(3, 10_000)).unwrap();
    temp.as_file().sync_data().unwrap();
    temp.into_temp_path()
        .persist_noclobber(fs.path("b.jpg"))
        .unwrap();
    let (backing, ..) = fs.cut();
    assert_eq!(
        names(&backing),
        Vec::<String>::new(),
        "neither the name nor the temp name was durable"
    );
}

#[test]
fn a_rename_before_the_data_is_synced_leaves_an_empty_file_after_a_power_cut() {
    require_fuse!();
    let scratch = tempfile::tempdir().unwrap();
    let fs = PowerCutFs::mount(scratch.path(), &[]);
    rename_then_sync_only_the_folder(&fs.mnt, &image(4, 30_000));
    let (backing, ..) = fs.cut();
    assert_eq!(names(&backing), ["c.jpg"], "the name was made durable");
    assert_eq!(
        fs::read(backing.join("c.jpg")).unwrap(),
        b"",
        "its data was not"
    );
}

#[test]
fn with_tail_zero_a_rename_before_the_data_is_synced_leaves_a_file_of_zeros_at_its_full_length() {
    require_fuse!();
    let scratch = tempfile::tempdir().unwrap();
    let fs = PowerCutFs::mount(scratch.path(), &["--tail", "zero"]);
    rename_then_sync_only_the_folder(&fs.mnt, &image(5, 30_000));
    let (backing, ..) = fs.cut();
    assert_eq!(fs::read(backing.join("c.jpg")).unwrap(), vec![0; 30_000]);
}

fn rename_then_sync_only_the_folder(dir: &Path, bytes: &[u8]) {
    let mut temp = tempfile::Builder::new()
        .prefix(".incoming-")
        .tempfile_in(dir)
        .unwrap();
    temp.write_all(bytes).unwrap();
    temp.into_temp_path()
        .persist_noclobber(dir.join("c.jpg"))
        .unwrap();
    fsync_dir(dir);
}

#[test]
fn a_synced_append_to_a_log_survives_a_power_cut_and_an_unsynced_one_is_lost() {
    require_fuse!();
    let scratch = tempfile::tempdir().unwrap();
    let fs = PowerCutFs::mount(scratch.path(), &[]);
    let mut log = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(fs.path("index.log"))
        .unwrap();
    log.write_all(b"S first\n").unwrap();
    log.sync_data().unwrap();
    fsync_dir(&fs.mnt);
    log.write_all(b"S second\n").unwrap();
    log.sync_data().unwrap();
    log.write_all(b"P never synced\n").unwrap();
    drop(log);
    let fs = fs.reboot();
    assert_eq!(
        fs::read_to_string(fs.path("index.log")).unwrap(),
        "S first\nS second\n"
    );
    // Appending after the reboot starts from the durable end.
    let mut log = OpenOptions::new()
        .append(true)
        .open(fs.path("index.log"))
        .unwrap();
    log.write_all(b"S third\n").unwrap();
    log.sync_data().unwrap();
    drop(log);
    let (backing, ..) = fs.cut();
    assert_eq!(
        fs::read_to_string(backing.join("index.log")).unwrap(),
        "S first\nS second\nS third\n"
    );
}

#[test]
fn a_log_created_but_whose_folder_was_never_synced_vanishes_with_all_its_synced_records() {
    require_fuse!();
    let scratch = tempfile::tempdir().unwrap();
    let fs = PowerCutFs::mount(scratch.path(), &[]);
    fs::create_dir(fs.path(".imaged")).unwrap();
    fsync_dir(&fs.mnt);
    let mut log = OpenOptions::new()
        .append(true)
        .create(true)
        .open(fs.path(".imaged/index.log"))
        .unwrap();
    log.write_all(b"S synced\n").unwrap();
    log.sync_data().unwrap();
    drop(log);
    let (backing, ..) = fs.cut();
    assert!(
        backing.join(".imaged").is_dir(),
        "its folder was synced in its parent"
    );
    assert_eq!(names(&backing.join(".imaged")), Vec::<String>::new());
}

#[test]
fn a_file_in_a_new_folder_whose_parent_was_not_fsynced_disappears_with_its_folder() {
    require_fuse!();
    let scratch = tempfile::tempdir().unwrap();
    let fs = PowerCutFs::mount(scratch.path(), &[]);
    fs::create_dir(fs.path("kept")).unwrap();
    fsync_dir(&fs.mnt);
    durable_write(&fs.path("kept"), "a.jpg", &image(6, 20_000));
    fs::create_dir(fs.path("lost")).unwrap();
    // The file and its name in the new folder are durable; the new folder's own name never is.
    durable_write(&fs.path("lost"), "b.jpg", &image(7, 20_000));
    let (backing, ..) = fs.cut();
    assert_eq!(names(&backing), ["kept"]);
    assert_eq!(names(&backing.join("kept")), ["a.jpg"]);
}

#[test]
fn an_unlink_or_a_rename_over_a_durable_file_without_a_folder_fsync_is_undone_at_a_power_cut() {
    require_fuse!();
    let scratch = tempfile::tempdir().unwrap();
    let fs = PowerCutFs::mount(scratch.path(), &[]);
    durable_write(&fs.mnt, "old.jpg", b"old image");
    durable_write(&fs.mnt, "index.log", b"S old\n");
    // A compaction: a new log by temp file, fsync and rename over the old one; and a removal.
    let mut temp = tempfile::Builder::new().tempfile_in(&fs.mnt).unwrap();
    temp.write_all(b"C compacted\n").unwrap();
    temp.as_file().sync_data().unwrap();
    temp.persist(fs.path("index.log")).unwrap();
    fs::remove_file(fs.path("old.jpg")).unwrap();
    assert_eq!(names(&fs.mnt), ["index.log"]);
    let fs = fs.reboot();
    assert_eq!(names(&fs.mnt), ["index.log", "old.jpg"]);
    assert_eq!(fs::read(fs.path("old.jpg")).unwrap(), b"old image");
    assert_eq!(fs::read(fs.path("index.log")).unwrap(), b"S old\n");

    // The same, with the folder fsync: now both changes hold.
    let mut temp = tempfile::Builder::new().tempfile_in(&fs.mnt).unwrap();
    temp.write_all(b"C compacted\n").unwrap();
    temp.as_file().sync_data().unwrap();
    temp.persist(fs.path("index.log")).unwrap();
    fs::remove_file(fs.path("old.jpg")).unwrap();
    fsync_dir(&fs.mnt);
    let (backing, ..) = fs.cut();
    assert_eq!(names(&backing), ["index.log"]);
    assert_eq!(
        fs::read(backing.join("index.log")).unwrap(),
        b"C compacted\n"
    );
}

#[test]
fn an_unsynced_truncate_or_overwrite_of_durable_bytes_is_undone_at_a_power_cut() {
    require_fuse!();
    let scratch = tempfile::tempdir().unwrap();
    fs::create_dir_all(scratch.path().join("backing")).unwrap();
    // Whatever the folder held at the mount is what the disk held: durable.
    fs::write(scratch.path().join("backing/index.log"), b"S one\nS tw").unwrap();
    let fs = PowerCutFs::mount(scratch.path(), &[]);
    let log = OpenOptions::new()
        .write(true)
        .open(fs.path("index.log"))
        .unwrap();
    log.set_len(6).unwrap();
    log.write_all_at(b"P", 0).unwrap();
    drop(log);
    assert_eq!(fs::read(fs.path("index.log")).unwrap(), b"P one\n");
    let (backing, ..) = fs.cut();
    assert_eq!(fs::read(backing.join("index.log")).unwrap(), b"S one\nS tw");
}

#[test]
fn a_rename_between_folders_is_whole_only_once_both_folders_are_fsynced() {
    require_fuse!();
    let scratch = tempfile::tempdir().unwrap();
    let fs = PowerCutFs::mount(scratch.path(), &[]);
    for dir in ["from", "to"] {
        fs::create_dir(fs.path(dir)).unwrap();
    }
    fsync_dir(&fs.mnt);
    durable_write(&fs.path("from"), "a.jpg", b"a");
    fs::rename(fs.path("from/a.jpg"), fs.path("to/a.jpg")).unwrap();
    fsync_dir(&fs.path("to"));
    let fs = fs.reboot();
    assert_eq!(names(&fs.path("to")), ["a.jpg"]);
    assert_eq!(
        names(&fs.path("from")),
        ["a.jpg"],
        "the old folder was not fsynced: its name is still there"
    );
    assert_eq!(fs::read(fs.path("from/a.jpg")).unwrap(), b"a");

    durable_write(&fs.path("from"), "b.jpg", b"b");
    fs::rename(fs.path("from/b.jpg"), fs.path("to/b.jpg")).unwrap();
    fsync_dir(&fs.path("to"));
    fsync_dir(&fs.path("from"));
    let (backing, ..) = fs.cut();
    assert_eq!(names(&backing.join("to")), ["a.jpg", "b.jpg"]);
    assert_eq!(names(&backing.join("from")), ["a.jpg"]);
}

#[test]
fn rename_noreplace_refuses_an_existing_name_and_replaces_nothing() {
    require_fuse!();
    let scratch = tempfile::tempdir().unwrap();
    let fs = PowerCutFs::mount(scratch.path(), &[]);
    fs::write(fs.path("a"), b"first").unwrap();
    fs::write(fs.path("b"), b"second").unwrap();
    let err = renameat2(&fs.path("b"), &fs.path("a"), libc::RENAME_NOREPLACE).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
    let mut temp = tempfile::NamedTempFile::new_in(&fs.mnt).unwrap();
    temp.write_all(b"third").unwrap();
    let err = temp.persist_noclobber(fs.path("a")).unwrap_err();
    assert_eq!(err.error.kind(), std::io::ErrorKind::AlreadyExists);
    assert_eq!(fs::read(fs.path("a")).unwrap(), b"first");
    let stat = fs::metadata(fs.path("b")).unwrap();
    assert!(stat.is_file());
    assert!(fs::read_dir(&fs.mnt).unwrap().count() >= 2);
    // O_EXCL too.
    let err = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(fs.path("a"))
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
}

#[test]
fn files_still_open_at_the_cut_do_not_stop_it_and_fail_afterwards() {
    require_fuse!();
    let scratch = tempfile::tempdir().unwrap();
    let fs = PowerCutFs::mount(scratch.path(), &[]);
    let mut file = File::create(fs.path("open.log")).unwrap();
    fsync_dir(&fs.mnt);
    file.write_all(b"synced\n").unwrap();
    file.sync_data().unwrap();
    file.write_all(b"not synced\n").unwrap();
    let dir = File::open(&fs.mnt).unwrap();
    let (backing, ..) = fs.cut();
    assert!(
        file.write_all(b"after the cut\n").is_err(),
        "no power, no write"
    );
    assert!(dir.sync_all().is_err());
    drop(file);
    assert_eq!(fs::read(backing.join("open.log")).unwrap(), b"synced\n");
}

#[test]
fn a_clean_stop_by_sigterm_keeps_everything_durable_or_not() {
    require_fuse!();
    let scratch = tempfile::tempdir().unwrap();
    let mut fs = PowerCutFs::mount(scratch.path(), &[]);
    fs::create_dir(fs.path("d")).unwrap();
    fs::write(fs.path("d/f"), b"never synced").unwrap();
    let mut child = fs.child.take().unwrap();
    // SAFETY: signals a process this test started and has not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert!(!is_mounted(&fs.mnt));
    assert_eq!(fs::read(fs.backing.join("d/f")).unwrap(), b"never synced");
}

#[test]
fn reads_stat_readdir_chmod_hard_links_and_statfs_pass_through() {
    require_fuse!();
    let scratch = tempfile::tempdir().unwrap();
    let fs = PowerCutFs::mount(scratch.path(), &[]);
    let bytes = image(9, 300_000);
    fs::write(fs.path("a"), &bytes).unwrap();
    assert_eq!(fs::read(fs.path("a")).unwrap(), bytes);
    fs::set_permissions(
        fs.path("a"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
    let meta = fs::metadata(fs.path("a")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o640
    );
    assert_eq!(meta.len(), 300_000);
    fs::hard_link(fs.path("a"), fs.path("b")).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::nlink(&fs::metadata(fs.path("b")).unwrap()),
        2
    );
    assert_eq!(names(&fs.mnt), ["a", "b"]);
    File::open(fs.path("a")).unwrap().sync_all().unwrap();
    fsync_dir(&fs.mnt);
    let path = CString::new(fs.mnt.as_os_str().as_bytes()).unwrap();
    // SAFETY: statvfs is plain data, filled by the kernel from a valid path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut st) }, 0);
    assert!(st.f_blocks > 0);
    let (backing, ..) = fs.cut();
    assert_eq!(names(&backing), ["a", "b"]);
    let (a, b) = (
        fs::metadata(backing.join("a")).unwrap(),
        fs::metadata(backing.join("b")).unwrap(),
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(a.ino(), b.ino(), "still one inode under two names");
    assert_eq!(a.mode() & 0o777, 0o640);
}

#[test]
fn a_large_folder_lists_whole_across_many_readdir_calls() {
    require_fuse!();
    let scratch = tempfile::tempdir().unwrap();
    let fs = PowerCutFs::mount(scratch.path(), &[]);
    fs::create_dir(fs.path("many")).unwrap();
    let expected: Vec<String> = (0..1500).map(|i| format!("image-{i:05}.jpg")).collect();
    for name in &expected {
        File::create(fs.path("many").join(name)).unwrap();
    }
    assert_eq!(names(&fs.path("many")), expected);
    fsync_dir(&fs.path("many"));
    fsync_dir(&fs.mnt);
    let (backing, ..) = fs.cut();
    assert_eq!(names(&backing.join("many")), expected);
}

fn renameat2(from: &Path, to: &Path, flags: u32) -> std::io::Result<()> {
    let (from, to) = (
        CString::new(from.as_os_str().as_bytes()).unwrap(),
        CString::new(to.as_os_str().as_bytes()).unwrap(),
    );
    // SAFETY: valid paths, not kept by the call.
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
        Err(std::io::Error::last_os_error())
    }
}
