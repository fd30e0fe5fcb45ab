//! powercut-fs: a FUSE filesystem for tests that passes every read and write through to a backing folder,
//! remembers what was made durable, and on a simulated power cut throws away everything that was not.
//!
//! # The durability model
//!
//! It is POSIX's, read strictly, with nothing a particular disk filesystem adds on top:
//!
//! - A file's **data** (its bytes and its length) is durable up to the last `fsync` or `fdatasync` of that
//!   file, through any handle. Nothing else makes it durable: not `close`, not a rename, not an `fsync` of
//!   its folder.
//! - A **name** (what `create`, `mkdir`, `rename`, `link`, `unlink` and `rmdir` change) is durable once its
//!   folder has been fsynced (opendir + `fsync`, i.e. FUSE `fsyncdir`) after the change. Each folder stands
//!   alone: a rename between two folders is whole only when both were fsynced. Fsyncing a file does not make
//!   its name durable, and fsyncing a folder does not make the data of its files durable.
//! - Whatever was in the backing folder when the filesystem was mounted is durable: it is what the disk held
//!   at boot.
//!
//! # The power cut, and the worst order chosen
//!
//! At a cut, *everything* that was not durable is lost, as if the disk had written nothing since the last
//! flush of each file and each folder. That is the strongest adversary the rules allow without inventing
//! states that never existed on a real disk, and one order for every run, so a failure always reproduces:
//!
//! - every folder gets back the entries it had at its last fsync (a file created since is gone, a removed
//!   one is back with its durable bytes, a rename is undone, a file renamed over an old one brings the old
//!   one back); a folder that is gone takes everything in it along, however durable that was;
//! - every file gets back its bytes and length of its last fsync: with `--tail truncate` (the default) an
//!   unsynced tail is gone and a never-synced file is empty; with `--tail zero` the length survives but
//!   every unsynced byte reads as zero (the "right size, garbage inside" of a filesystem that journals sizes
//!   before data);
//! - a cross-folder rename that only one side fsynced leaves a file under both names (hard links to the
//!   same bytes), or a folder only under the first name found: a tree has no room for a folder twice.
//!
//! Mode, owner and times are taken as they are at the cut (imaged's durability does not hang on them).
//! Symlinks, devices and FIFOs are not supported.
//!
//! # Interface
//!
//! `powercut-fs [--tail truncate|zero] [--no-rename2] BACKING MOUNTPOINT` mounts and serves in the
//! foreground; once mounted it prints one line starting with `powercut-fs: mounted`. Then:
//!
//! - `SIGUSR1`: **power cut**. Every request from then on fails with EIO; the backing folder is rewritten to
//!   the durable state; one line `powercut-fs: power cut: …` says what was kept; the mount is detached and
//!   the process exits 0. Mounting again on the same backing folder is the reboot. Files still open at the
//!   cut just fail from then on (ENOTCONN), as on a machine without power.
//! - `SIGTERM` or `SIGINT`, or `umount`/`fusermount3 -u` of the mountpoint: a clean stop, nothing lost.
//! - Exit 1: it could not mount; exit 3: the cut failed (the backing folder is then in no defined state).
//!
//! `--delay-ms N` makes every write and fsync take N ms more: a slow SD card, for the watchdog's tests.
//! A filesystem whose process is stopped (SIGSTOP) is a stuck disk: every request waits.
//!
//! `--no-rename2` refuses `renameat2` flags with EINVAL, as a libfuse 2 filesystem does, so that callers
//! take their fallback (tempfile's `persist_noclobber`: link + unlink).
//!
//! It mounts with `allow_other` and `default_permissions`, so processes of any user (root in the tests) use
//! it with the kernel checking permissions. Requests are served one at a time: slow, but the record of what
//! is durable needs no finer locking than one mutex.

mod cut;
mod fs;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use fuser::{Config, MountOption, Session, SessionACL};
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

use crate::fs::{PowercutFs, State, Tail};

const USAGE: &str =
    "usage: powercut-fs [--tail truncate|zero] [--no-rename2] [--delay-ms N] BACKING MOUNTPOINT";

struct Options {
    backing: PathBuf,
    mountpoint: PathBuf,
    tail: Tail,
    rename2: bool,
    delay: std::time::Duration,
}

fn parse_args() -> Result<Options, String> {
    let mut tail = Tail::Truncate;
    let mut rename2 = true;
    let mut delay = std::time::Duration::ZERO;
    let mut paths = Vec::new();
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--tail") => {
                tail = match args.next().as_ref().and_then(|a| a.to_str()) {
                    Some("truncate") => Tail::Truncate,
                    Some("zero") => Tail::Zero,
                    _ => return Err("--tail takes truncate or zero".into()),
                }
            }
            Some("--no-rename2") => rename2 = false,
            Some("--delay-ms") => {
                let ms = args.next().and_then(|a| a.to_str()?.parse().ok());
                delay = std::time::Duration::from_millis(ms.ok_or("--delay-ms takes a number")?);
            }
            Some("-h" | "--help") => return Err(String::new()),
            Some(a) if a.starts_with('-') => return Err(format!("unknown option {a}")),
            _ => paths.push(PathBuf::from(arg)),
        }
    }
    let [backing, mountpoint]: [PathBuf; 2] = paths
        .try_into()
        .map_err(|_| "BACKING and MOUNTPOINT are required".to_string())?;
    Ok(Options {
        backing,
        mountpoint,
        tail,
        rename2,
        delay,
    })
}

fn main() {
    let options = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("powercut-fs: {e}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(options) {
        eprintln!("powercut-fs: {e}");
        std::process::exit(1);
    }
}

fn run(options: Options) -> std::io::Result<()> {
    // Every file the cut may still need keeps an O_PATH descriptor open (that is what keeps an unlinked
    // file's durable bytes alive), so a long run needs more than the default soft limit.
    raise_open_file_limit();
    let state = Arc::new(Mutex::new(State::mount(&options.backing, options.tail)?));
    let filesystem = PowercutFs::new(state.clone(), options.rename2, options.delay);
    let mut config = Config::default();
    // No AutoUnmount: its fusermount3 helper unmounts after this process exits, and could take down the
    // next mount on the same mountpoint (the remount after a cut). A cut detaches the mount itself.
    config.mount_options = vec![
        MountOption::FSName("powercut".into()),
        MountOption::Subtype("powercut".into()),
        MountOption::DefaultPermissions,
    ];
    config.acl = SessionACL::All;
    // Registered before the mount, so a signal sent right after the "mounted" line is never lost.
    let signals = Signals::new([SIGUSR1, SIGTERM, SIGINT])?;
    let session = Session::new(filesystem, &options.mountpoint, &config)?;
    let mountpoint = options.mountpoint.canonicalize()?;
    println!(
        "powercut-fs: mounted {} on {} (pid {})",
        options.backing.display(),
        mountpoint.display(),
        std::process::id()
    );
    let _ = std::io::stdout().flush();
    std::thread::spawn(move || control(signals, state, mountpoint));
    session.run()
}

/// Waits for the signals that cut the power or stop the filesystem, and never returns.
fn control(mut signals: Signals, state: Arc<Mutex<State>>, mountpoint: PathBuf) {
    let signal = signals.forever().next();
    if signal == Some(SIGUSR1) {
        // Holding the lock until exit: no request can slip in between the rewrite and the detach.
        let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
        match state.power_cut() {
            Ok(report) => println!("powercut-fs: power cut: {report}"),
            Err(e) => {
                eprintln!("powercut-fs: the power cut failed: {e}");
                detach(&mountpoint);
                std::process::exit(3);
            }
        }
    }
    detach(&mountpoint);
    std::process::exit(0);
}

/// A lazy unmount: it works with files still open (they fail from then on) and waits for no request.
fn detach(mountpoint: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(mountpoint.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: a valid NUL-terminated path; umount2 keeps no pointer to it.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
        eprintln!(
            "powercut-fs: cannot unmount {}: {}",
            mountpoint.display(),
            std::io::Error::last_os_error()
        );
    }
}

fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain out/in structs, owned by this frame.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
