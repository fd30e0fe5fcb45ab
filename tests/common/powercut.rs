//! The power-cut filesystem (tests/powercut) as a test fixture: mounted over a scratch folder, cut, remounted,
//! stopped; its guard kills the process it started, by PID, and detaches a mount left behind. The integration
//! tests and the library's unit tests (src/storage.rs) share this file.
//!
//! It needs root, /dev/fuse and the powercut-fs binary: `cargo build -p powercut-fs` puts it beside the test
//! binaries' folder (`make test` builds it first), or `POWERCUT_FS=PATH` names it. Without them a test says
//! SKIP and returns.

// Each user (the unit tests, each test binary) takes only part of the fixture.
#![allow(dead_code)]

use std::ffi::CString;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

/// The binary beside this test's own folder (target/<profile>/deps/..), where cargo puts workspace binaries.
pub fn powercut_bin() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("POWERCUT_FS") {
        return Some(bin.into());
    }
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("powercut-fs");
    bin.exists().then_some(bin)
}

pub fn usable() -> Option<PathBuf> {
    if !Path::new("/dev/fuse").exists() {
        println!("SKIP: /dev/fuse is missing: no power-cut filesystem here");
        return None;
    }
    // SAFETY: no arguments, no memory.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP: the power-cut filesystem mounts with allow_other and needs root (CI runs as root)");
        return None;
    }
    let bin = powercut_bin();
    if bin.is_none() {
        println!(
            "SKIP: no powercut-fs binary: `cargo build -p powercut-fs` (make test builds it first)"
        );
    }
    bin
}

/// One running powercut-fs; dropping it kills the process by PID and detaches a mount left behind.
pub struct Power {
    bin: PathBuf,
    /// Options of powercut-fs (`--delay-ms N`), at every mount.
    options: Vec<String>,
    backing: PathBuf,
    mnt: PathBuf,
    child: Option<Child>,
    lines: Option<Receiver<String>>,
    /// The folder of an instance made by [`Power::mount`], removed with it.
    scratch: Option<tempfile::TempDir>,
}

impl Power {
    pub fn on(bin: &Path, backing: &Path, mnt: &Path) -> Power {
        Power::with(bin, &[], backing, mnt)
    }

    /// A fresh instance on a scratch folder of its own, or `None` (SKIP said) where it cannot run. `prepare`
    /// fills the backing folder first: what is there at the mount is durable, as what a disk holds at boot.
    pub fn mount(prepare: impl FnOnce(&Path)) -> Option<Power> {
        let bin = usable()?;
        let scratch = tempfile::tempdir().expect("a scratch folder");
        let (backing, mnt) = (scratch.path().join("backing"), scratch.path().join("mnt"));
        for dir in [&backing, &mnt] {
            fs::create_dir(dir).expect("scratch folders");
        }
        prepare(&backing);
        let mut power = Power::with(&bin, &[], &backing, &mnt);
        power.scratch = Some(scratch);
        Some(power)
    }

    /// The mount point: what the code under test works on.
    pub fn root(&self) -> &Path {
        &self.mnt
    }

    pub fn with(bin: &Path, options: &[&str], backing: &Path, mnt: &Path) -> Power {
        let mut power = Power {
            bin: bin.to_path_buf(),
            options: options.iter().map(|o| o.to_string()).collect(),
            backing: backing.to_path_buf(),
            mnt: mnt.to_path_buf(),
            child: None,
            lines: None,
            scratch: None,
        };
        power.start();
        power
    }

    /// The filesystem stops answering (SIGSTOP): every request on it waits, as on a stuck disk.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: i32) {
        let pid = self.child.as_ref().expect("running").id();
        // SAFETY: signals a process this fixture started and has not reaped.
        unsafe { libc::kill(pid as i32, signal) };
    }

    fn start(&mut self) {
        let mut child = Command::new(&self.bin)
            .args(&self.options)
            .arg(&self.backing)
            .arg(&self.mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start powercut-fs");
        let (send, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = send.send(line);
            }
        });
        self.child = Some(child);
        self.lines = Some(lines);
        let line = self.next_line("the mount");
        assert!(line.starts_with("powercut-fs: mounted"), "{line}");
    }

    fn next_line(&self, what: &str) -> String {
        self.lines
            .as_ref()
            .unwrap()
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("powercut-fs said nothing about {what} within 30 s"))
    }

    /// Cuts the power (the filesystem process exits once the backing folder holds only what was durable),
    /// then mounts what survived: the reboot. Returns the filesystem's report of the cut.
    pub fn cut_and_reboot(&mut self) -> String {
        let pid = self.child.as_ref().expect("running").id();
        // SAFETY: signals a process this test started and has not reaped.
        unsafe { libc::kill(pid as i32, libc::SIGUSR1) };
        let report = self.next_line("the power cut");
        let mut child = self.child.take().unwrap();
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!("powercut-fs did not exit after the cut");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(report.starts_with("powercut-fs: power cut:"), "{report}");
        self.start();
        report
    }
}

impl Drop for Power {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.thaw();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mnt = self.mnt.canonicalize().unwrap_or(self.mnt.clone());
        if mounts.lines().any(|l| l.split(' ').nth(4) == mnt.to_str()) {
            let path = CString::new(mnt.as_os_str().as_bytes()).unwrap();
            // SAFETY: a valid path; a lazy unmount of the mount this guard made.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
}
