//! `imaged prune`: the `[retention]` policy on demand. `--dry-run` says what it would delete now and
//! deletes nothing; without it, one pass runs.
//!
//! Both are safe while the daemon runs. A dry run only reads (the catalog, the index's outbox, the free
//! space). A pass needs the state folder's lock, which the daemon holds while it runs: then `prune` asks the
//! daemon (SIGUSR1) to run the pass itself, waits for its checkpoint, and reports what it deleted; so only
//! one process ever deletes, and the daemon's own view of what waits for a republish decides.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::cli::PruneArgs;
use crate::clock;
use crate::config::{Config, ConfigError, Size};
use crate::exit::Exit;
use crate::retention::catalog::{self, Locked};
use crate::retention::{self, Blocked, Policy, Report};
use crate::storage::PathError;

/// How long `prune` waits for the running daemon to do the pass it asked for.
const DAEMON_WAIT: Duration = Duration::from_secs(15);

/// Why `imaged prune` failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config error: {0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Storage(#[from] PathError),
    /// The running daemon could not be asked, or did not answer.
    #[error("{0}")]
    Daemon(String),
}

impl Error {
    pub fn exit(&self) -> Exit {
        match self {
            Error::Config(_) => Exit::Config,
            Error::Storage(_) | Error::Daemon(_) => Exit::Failure,
        }
    }
}

/// Reads the names of the images whose republish is not confirmed from a state folder (the daemon's
/// index; `main` hands it in, as the tools do not use the daemon's parts).
pub type Outbox = fn(&Path) -> Result<Vec<String>, PathError>;

pub fn run(config: &Config, args: &PruneArgs, outbox: Outbox) -> Result<(), Error> {
    let state = config.state_dir();
    let policy = Policy::new(&config.retention);
    if !catalog::dir(&state).is_dir() {
        println!(
            "No catalog in {} yet: imaged makes one at its next start",
            catalog::dir(&state).display()
        );
        return Ok(());
    }
    println!("{}", describe_policy(config));
    if args.dry_run {
        return dry_run(config, &policy, outbox);
    }
    // Another `imaged prune` that finds this one holding the lock asks it as it would ask the daemon, and
    // sees its pass in the checkpoint: the signal must not end this one.
    // SAFETY: ignoring a signal has no preconditions.
    unsafe {
        libc::signal(libc::SIGUSR1, libc::SIG_IGN);
    }
    match catalog::try_lock(&state)? {
        Locked::Held(lock) => {
            let result = prune_here(config, &policy, outbox);
            drop(lock);
            result
        }
        Locked::Busy(pid) => ask_daemon(&state, pid),
    }
}

fn options<'a>(dry_run: bool, is_pending: &'a dyn Fn(&str) -> bool) -> retention::Options<'a> {
    retention::Options {
        dry_run,
        now_ms: clock::now_ms(),
        headroom: 0,
        max_deletions: u64::MAX,
        is_pending,
        beat: &|| {},
        save_always: true,
        tidy_front: true,
    }
}

fn dry_run(config: &Config, policy: &Policy, outbox: Outbox) -> Result<(), Error> {
    let state = config.state_dir();
    let Some((mut store, _)) = catalog::open_read_only(&state)? else {
        println!("The catalog in {} is empty", catalog::dir(&state).display());
        return Ok(());
    };
    if let Some(pid) = catalog::lock_holder(&state) {
        println!("imaged (process {pid}) is running and applies this policy every few seconds");
    }
    let pending: HashSet<String> = outbox(&state)?.into_iter().collect();
    let is_pending = |name: &str| pending.contains(name);
    println!(
        "Stored: {} images, {} in {}",
        store.checkpoint.images,
        Size(store.checkpoint.bytes),
        config.storage.dir.display()
    );
    let report = retention::pass(
        &mut store,
        &config.storage.dir,
        policy,
        &options(true, &is_pending),
    )?;
    print!("{}", describe(&report, true));
    Ok(())
}

fn prune_here(config: &Config, policy: &Policy, outbox: Outbox) -> Result<(), Error> {
    let state = config.state_dir();
    let (mut store, _, _) = catalog::open(&state, clock::now_ms(), || {
        catalog::has_images(&config.storage.dir)
    })?;
    if store.checkpoint.catch_up {
        println!(
            "imaged has not yet listed the images stored before its catalog existed (it does once, at its \
             next start); nothing is pruned before that"
        );
        return Ok(());
    }
    let pending: HashSet<String> = outbox(&state)?.into_iter().collect();
    let is_pending = |name: &str| pending.contains(name);
    let report = retention::pass(
        &mut store,
        &config.storage.dir,
        policy,
        &options(false, &is_pending),
    )?;
    print!("{}", describe(&report, false));
    Ok(())
}

/// Asks the running daemon for a pass and reports it by the difference of its checkpoints.
fn ask_daemon(state: &Path, pid: Option<u32>) -> Result<(), Error> {
    let Some(pid) = pid else {
        return Err(Error::Daemon(format!(
            "another process holds {} but does not say which: try again in a moment",
            state.join("lock").display()
        )));
    };
    let before = catalog::read_checkpoint(state)?;
    if before.as_ref().is_some_and(|c| c.catch_up) {
        println!(
            "imaged (process {pid}) is listing the images stored before its catalog existed (once, after an \
             upgrade); it prunes by itself once that is done"
        );
        return Ok(());
    }
    let target = i32::try_from(pid).map_err(|_| Error::Daemon(format!("process id {pid}?")))?;
    // SAFETY: kill only sends a signal.
    if unsafe { libc::kill(target, libc::SIGUSR1) } != 0 {
        return Err(Error::Daemon(format!(
            "imaged (process {pid}) is running and prunes by itself every few seconds; cannot ask it to \
             prune now: {} (run this as root or as imaged's user)",
            std::io::Error::last_os_error()
        )));
    }
    println!("Asked imaged (process {pid}) to run the pass");
    let started = Instant::now();
    let passes = before.as_ref().map_or(0, |c| c.passes);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = catalog::read_checkpoint(state)?;
        if let Some(now) = now.filter(|c| c.passes > passes) {
            let (images, bytes) = before.map_or((0, 0), |b| (b.deleted_images, b.deleted_bytes));
            println!(
                "imaged deleted {} images ({}); {} images, {} stored",
                now.deleted_images - images,
                Size(now.deleted_bytes - bytes),
                now.images,
                Size(now.bytes)
            );
            return Ok(());
        }
        if started.elapsed() > DAEMON_WAIT {
            return Err(Error::Daemon(format!(
                "imaged (process {pid}) did not run the pass within {}s; see its log",
                DAEMON_WAIT.as_secs()
            )));
        }
    }
}

/// The policy in force, and how much free space it keeps on the storage filesystem.
fn describe_policy(config: &Config) -> String {
    let r = &config.retention;
    let size = if r.max_size.0 == 0 {
        "no limit".to_string()
    } else {
        r.max_size.to_string()
    };
    let age = if r.max_age.is_zero() {
        "forever".to_string()
    } else {
        r.max_age.to_string()
    };
    let mut free = r.min_free.to_string();
    if let Ok(space) = crate::storage::space(&config.storage.dir) {
        let _ = write!(
            free,
            " ({} of {}; {} free now)",
            Size(r.min_free.bytes_of(space.total)),
            Size(space.total),
            Size(space.available)
        );
    }
    format!("Policy: retention.max_size {size}, retention.max_age {age}, retention.min_free {free}")
}

/// What a pass did, or (`dry`) would do, in words.
pub fn describe(report: &Report, dry: bool) -> String {
    let mut out = String::new();
    let verb = if dry { "Would delete" } else { "Deleted" };
    if report.deleted == 0 {
        let _ = writeln!(
            out,
            "{verb} nothing{}",
            if report.unmet.is_none() {
                ": every limit holds"
            } else {
                ""
            }
        );
    } else {
        let limits: Vec<String> = report.limits.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "{verb} {} images, {} (for {}):",
            report.deleted,
            Size(report.bytes),
            limits.join(", ")
        );
        for (which, line) in [("oldest", &report.oldest), ("newest", &report.newest)] {
            if let Some(line) = line {
                let _ = writeln!(
                    out,
                    "  {which} {}, received {}",
                    line.name,
                    clock::format_ms(line.at_ms)
                );
            }
        }
    }
    if report.vanished > 0 {
        let _ = writeln!(out, "{} listed images were already gone", report.vanished);
    }
    for why in &report.undeletable {
        let _ = writeln!(out, "Left in place: {why}");
    }
    let then = if dry { "Then" } else { "Now" };
    let kept = report.kept.as_ref().map_or_else(String::new, |l| {
        format!(
            "; the oldest kept is {}, received {}",
            l.name,
            clock::format_ms(l.at_ms)
        )
    });
    let _ = writeln!(
        out,
        "{then}: {} images, {}{kept}",
        report.images,
        Size(report.stored_bytes)
    );
    match &report.unmet {
        Some((limit, Blocked::Unconfirmed(name))) => {
            let _ = writeln!(
                out,
                "{limit} still does not hold: the oldest image, {name}, waits for the broker to confirm its republish"
            );
        }
        Some((limit, _)) => {
            let _ = writeln!(
                out,
                "{limit} still does not hold: no image is left to delete"
            );
        }
        None => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retention::{Limit, Line};

    fn line(name: &str, at_ms: u64) -> Line {
        Line {
            at_ms,
            size: 1,
            hash: None,
            name: name.into(),
        }
    }

    #[test]
    fn a_report_names_the_count_bytes_oldest_newest_and_what_stays() {
        let mut report = Report {
            deleted: 2,
            bytes: 1500,
            oldest: Some(line("a.jpg", 1_796_112_900_000)),
            newest: Some(line("b.jpg", 1_796_112_901_000)),
            kept: Some(line("c.jpg", 1_796_112_902_000)),
            images: 7,
            stored_bytes: 7000,
            ..Report::default()
        };
        report.limits.insert(Limit::Size);
        let text = describe(&report, true);
        assert_eq!(
            text,
            "Would delete 2 images, 1.5 KB (for retention.max_size):\n  \
             oldest a.jpg, received 2026-12-01 08:15:00 UTC\n  \
             newest b.jpg, received 2026-12-01 08:15:01 UTC\n\
             Then: 7 images, 7 KB; the oldest kept is c.jpg, received 2026-12-01 08:15:02 UTC\n"
        );
        report.deleted = 0;
        report.unmet = Some((Limit::Size, Blocked::Unconfirmed("c.jpg".into())));
        assert!(describe(&report, false).contains("Deleted nothing\n"));
        assert!(describe(&report, false)
            .contains("retention.max_size still does not hold: the oldest image, c.jpg, waits"));
    }
}
