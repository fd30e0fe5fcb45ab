//! The retention thread: a pass over the catalog every few seconds (sooner when the committer sees a limit
//! broken), the bound on the quarantine, and the one-time catch-up after an upgrade.
//!
//! It runs beside the pipeline and never blocks it: the committer appends to the catalog and counts, this
//! thread deletes from its other end. What it must never delete, images whose republish the broker has not
//! confirmed, the committer names in [`Pending`] before their files exist. When free space cannot be made
//! (nothing left to delete), the committer stops acknowledging by itself (it checks the free space before
//! every write); this thread says why, once.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::health::{Beat, Health};
use super::index::{Entry, Hash};
use crate::config::Size;
use crate::retention::{self, Blocked, Limit, Policy, Report, Store};
use crate::storage;

/// Time between passes when nothing asks for one sooner.
pub const PASS_INTERVAL: Duration = Duration::from_secs(5);
/// The least time between two passes the committer asked for: a steady pace, not a pass per image.
const MIN_SPACING: Duration = Duration::from_millis(200);
/// At most this many deletions in one pass; the next pass follows at once.
const MAX_DELETIONS: u64 = 10_000;

/// Names of stored images whose republish is not confirmed yet: retention keeps them. The committer adds a
/// name before its file is renamed into place and removes it once the broker confirmed the republish. A
/// name is counted: after a restart a new upload may be given, for a moment, the name of an older image
/// still waiting, and giving that name up must not give up the older image.
#[derive(Debug, Default)]
pub struct Pending(Mutex<HashMap<String, u32>>);

impl Pending {
    pub fn new(names: impl IntoIterator<Item = String>) -> Pending {
        let pending = Pending::default();
        for name in names {
            pending.insert(&name);
        }
        pending
    }

    fn names(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn insert(&self, name: &str) {
        *self.names().entry(name.to_string()).or_insert(0) += 1;
    }

    pub fn remove(&self, name: &str) {
        let mut names = self.names();
        if let Some(count) = names.get_mut(name) {
            *count -= 1;
            if *count == 0 {
                names.remove(name);
            }
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names().contains_key(name)
    }
}

enum Msg {
    /// A limit looks broken: a pass soon.
    Wake,
    /// `imaged prune` asked (SIGUSR1): a pass now, and a checkpoint written whatever it does.
    Request,
    /// A rejected payload was kept in the quarantine folder.
    Quarantined {
        name: String,
        size: u64,
    },
    /// The daemon is ready: the catch-up may begin.
    Ready,
    /// A reload changed `[retention]`: a pass under the new policy now.
    Policy(Policy),
    Shutdown,
}

/// How the other parts talk to the retention thread.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Msg>,
    woken: Arc<AtomicBool>,
    stopping: Arc<AtomicBool>,
}

impl Handle {
    /// Asks for a pass soon; many asks before it make one.
    pub fn wake(&self) {
        if !self.woken.swap(true, Ordering::Relaxed) {
            let _ = self.tx.send(Msg::Wake);
        }
    }

    pub fn request(&self) {
        let _ = self.tx.send(Msg::Request);
    }

    pub fn quarantined(&self, name: &str, size: u64) {
        let _ = self.tx.send(Msg::Quarantined {
            name: name.to_string(),
            size,
        });
    }

    pub fn ready(&self) {
        let _ = self.tx.send(Msg::Ready);
    }

    pub fn reload(&self, policy: Policy) {
        let _ = self.tx.send(Msg::Policy(policy));
    }

    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        let _ = self.tx.send(Msg::Shutdown);
    }
}

pub struct Settings {
    pub image_dir: PathBuf,
    pub quarantine_dir: PathBuf,
    /// Folders inside `image_dir` that hold no images (the quarantine and state folders, when configured
    /// there under plain names).
    pub skip: Vec<PathBuf>,
    pub policy: Policy,
    /// `storage.quarantine_max_size`; 0: no bound.
    pub quarantine_max: u64,
}

/// Starts the thread.
pub fn start(
    settings: Settings,
    store: Store,
    pending: Arc<Pending>,
    health: Arc<Health>,
) -> (Handle, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let handle = Handle {
        tx,
        woken: Arc::new(AtomicBool::new(false)),
        stopping: Arc::new(AtomicBool::new(false)),
    };
    let thread = Retention {
        beat: health.register("retention"),
        quarantine: Quarantine::new(settings.quarantine_max),
        settings,
        store,
        pending,
        health,
        handle: handle.clone(),
        rx,
        ready: false,
        episode: None,
        headroom: 0,
        last_pass: Instant::now(),
        quarantine_deleted: 0,
        failing: false,
        tidied: false,
    };
    thread.publish_totals();
    let join = std::thread::Builder::new()
        .name("retention".into())
        .spawn(move || thread.run())
        .expect("threads can be spawned at start-up");
    (handle, join)
}

struct Retention {
    settings: Settings,
    store: Store,
    pending: Arc<Pending>,
    health: Arc<Health>,
    beat: Arc<Beat>,
    handle: Handle,
    rx: mpsc::Receiver<Msg>,
    ready: bool,
    /// The limit that did not hold at the last pass, and why, as logged: one line per episode.
    episode: Option<(Limit, Blocked)>,
    /// Free space kept beyond min_free: what arrived during the last pass interval.
    headroom: u64,
    last_pass: Instant,
    quarantine: Quarantine,
    quarantine_deleted: u64,
    /// The last pass failed (logged once until one works again).
    failing: bool,
    /// The first pass took the lines of files a crash deleted off the front.
    tidied: bool,
}

impl Retention {
    fn run(mut self) {
        let started = Instant::now();
        self.load_quarantine();
        let mut next_pass = Instant::now();
        let mut requested = false;
        let mut catch_up_at = Instant::now();
        loop {
            self.beat.idle();
            let wait = next_pass
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(1));
            let received = self.rx.recv_timeout(wait);
            self.beat.beat();
            match received {
                Ok(Msg::Wake) => {
                    self.handle.woken.store(false, Ordering::Relaxed);
                    next_pass = next_pass.min(self.last_pass + MIN_SPACING);
                }
                Ok(Msg::Request) => {
                    requested = true;
                    next_pass = Instant::now();
                }
                Ok(Msg::Quarantined { name, size }) => {
                    let doomed = self.quarantine.admit(retention_now(), name, size);
                    self.delete_quarantined(&doomed);
                }
                Ok(Msg::Ready) => self.ready = true,
                Ok(Msg::Policy(policy)) => {
                    self.settings.policy = policy;
                    next_pass = Instant::now();
                }
                Ok(Msg::Shutdown) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if self.store.checkpoint.catch_up {
                // Passes wait: the images not listed yet are older than every listed one.
                if (self.ready || started.elapsed() > Duration::from_secs(30))
                    && Instant::now() >= catch_up_at
                    && !self.catch_up()
                {
                    catch_up_at = Instant::now() + Duration::from_secs(60);
                }
                continue;
            }
            if Instant::now() >= next_pass {
                let budget_hit = self.pass(requested);
                requested = false;
                self.last_pass = Instant::now();
                next_pass = self.last_pass
                    + if budget_hit {
                        MIN_SPACING
                    } else {
                        PASS_INTERVAL
                    };
                self.log_quarantine();
            }
        }
        // The next start then has no lines to count.
        if let Err(e) = self.store.advance_tail().and_then(|()| self.store.save()) {
            warn!("Retention: cannot save the catalog's checkpoint at shutdown: {e}");
        }
    }

    /// Runs a pass and logs what it did; true when it stopped at its deletion budget.
    fn pass(&mut self, requested: bool) -> bool {
        let before = self.store.appended_at_tail();
        let started = Instant::now();
        let pending = self.pending.clone();
        let is_pending = move |name: &str| pending.contains(name);
        let beat = self.beat.clone();
        let beat = move || beat.beat();
        let result = retention::pass(
            &mut self.store,
            &self.settings.image_dir,
            &self.settings.policy,
            &retention::Options {
                dry_run: false,
                now_ms: retention_now(),
                headroom: self.headroom,
                max_deletions: MAX_DELETIONS,
                is_pending: &is_pending,
                beat: &beat,
                save_always: requested,
                tidy_front: !self.tidied,
            },
        );
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                if !self.failing {
                    warn!(
                        "Retention: the pass failed: {e}; trying again in {}s",
                        PASS_INTERVAL.as_secs()
                    );
                }
                self.failing = true;
                return false;
            }
        };
        if self.failing {
            info!("Retention works again");
            self.failing = false;
        }
        self.tidied = true;
        let after = self.store.appended_at_tail();
        self.headroom = headroom(
            after.bytes - before.bytes,
            self.last_pass.elapsed(),
            report.space.map_or(0, |s| s.total),
        );
        self.publish_totals();
        self.log(&report, started.elapsed());
        matches!(report.unmet, Some((_, Blocked::Budget)))
    }

    fn publish_totals(&self) {
        let stats = &self.health.stats;
        let at_tail = self.store.appended_at_tail();
        stats.set_kept(
            self.store.checkpoint.images,
            self.store.checkpoint.bytes,
            at_tail.images,
            at_tail.bytes,
        );
    }

    fn log(&mut self, report: &Report, elapsed: Duration) {
        if report.deleted > 0 {
            let limits: Vec<String> = report.limits.iter().map(ToString::to_string).collect();
            let limits = limits.join(", ");
            let (oldest_kept, kept) = report.kept.as_ref().map_or_else(
                || (String::new(), "no image is left".to_string()),
                |l| {
                    let path = self.settings.image_dir.join(&l.name).display().to_string();
                    let kept = format!(
                        "the oldest image kept is {path} (received {})",
                        crate::clock::format_ms(l.at_ms)
                    );
                    (path, kept)
                },
            );
            info!(
                deleted = report.deleted,
                bytes = report.bytes,
                oldest_kept = %oldest_kept,
                limits = %limits,
                catalog_bytes_read = report.catalog_bytes_read,
                elapsed_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
                "Retention: deleted {} images ({}) for {limits}; {kept}; {} images, {} stored",
                report.deleted,
                Size(report.bytes),
                report.images,
                Size(report.stored_bytes),
            );
        } else {
            debug!(
                catalog_bytes_read = report.catalog_bytes_read,
                "retention pass: nothing to delete ({} images, {} stored)",
                report.images,
                Size(report.stored_bytes)
            );
        }
        for why in &report.undeletable {
            warn!("Retention: {why}; leaving it");
        }
        let floor = report
            .space
            .map_or(0, |s| self.settings.policy.min_free_bytes(&s));
        // Short of the headroom but above min_free itself, the committer still writes: no episode.
        let unmet = report.unmet.clone().filter(|(limit, why)| {
            !matches!(why, Blocked::Budget) && (*limit != Limit::Free || report.free_after < floor)
        });
        if unmet == self.episode {
            return;
        }
        match &unmet {
            Some((Limit::Free, Blocked::Nothing)) => {
                let space = report.space.unwrap_or(storage::Space {
                    available: 0,
                    total: 0,
                    block: 1,
                });
                warn!(
                    "Free space on the filesystem of {} is {} of {}, below {} ({}), and no image is left to delete: \
                     holding back acknowledgements (the broker keeps the images) until there is room",
                    self.settings.image_dir.display(),
                    Size(report.free_after),
                    Size(space.total),
                    Limit::Free,
                    Size(floor),
                );
            }
            Some((limit, Blocked::Unconfirmed(name))) => warn!(
                "Retention: {limit} does not hold, but the oldest image, {}, waits for the broker to confirm its \
                 republish; it and the newer ones are kept until then",
                self.settings.image_dir.join(name).display()
            ),
            Some((limit, _)) => warn!("Retention: {limit} does not hold and no image is left to delete"),
            None => info!("Retention: every limit holds again"),
        }
        self.episode = unmet;
    }

    /// The one-time catch-up; false when it failed (tried again later).
    fn catch_up(&mut self) -> bool {
        info!(
            "Catalog: listing the images stored before it existed (once, after an upgrade) under {}",
            self.settings.image_dir.display()
        );
        let started = Instant::now();
        let beat = self.beat.clone();
        let stopping = self.handle.stopping.clone();
        let keep_going = move || {
            beat.beat();
            !stopping.load(Ordering::Relaxed)
        };
        match retention::catch_up(
            &mut self.store,
            &self.settings.image_dir,
            &self.settings.skip,
            &keep_going,
        ) {
            Ok(Some(found)) => {
                info!(
                    "Catalog: found {} images ({}) in {:.1}s, now under retention; removed {} temp files of an older version",
                    found.images,
                    Size(found.bytes),
                    started.elapsed().as_secs_f64(),
                    found.temp_files
                );
                self.publish_totals();
                true
            }
            Ok(None) => true,
            Err(e) => {
                warn!("Catalog: the catch-up failed: {e}; trying again in a minute");
                false
            }
        }
    }

    /// Lists the quarantine folder once (in the background), keeping the newest within the bound.
    fn load_quarantine(&mut self) {
        if self.quarantine.budget == 0 {
            return;
        }
        let dir = self.settings.quarantine_dir.clone();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        let mut doomed = Vec::new();
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().to_string();
            let Ok(meta) = entry.metadata() else { continue };
            if name.starts_with('.') || !meta.is_file() {
                continue;
            }
            let at = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
            doomed.extend(self.quarantine.admit(at, name, meta.len()));
        }
        self.delete_quarantined(&doomed);
        self.log_quarantine();
    }

    fn delete_quarantined(&mut self, names: &[String]) {
        for name in names {
            let path = self.settings.quarantine_dir.join(name);
            match storage::remove_if_present(&path) {
                Ok(_) => self.quarantine_deleted += 1,
                Err(e) => debug!("cannot delete a rejected payload: {e}"),
            }
        }
    }

    fn log_quarantine(&mut self) {
        if self.quarantine_deleted > 0 {
            info!(
                deleted = self.quarantine_deleted,
                "Quarantine: deleted the {} oldest rejected payloads to stay within storage.quarantine_max_size ({})",
                self.quarantine_deleted,
                Size(self.quarantine.budget)
            );
            self.quarantine_deleted = 0;
        }
    }
}

fn retention_now() -> u64 {
    crate::clock::now_ms()
}

/// Free space to keep beyond min_free: what arrived in `elapsed`, as much as would arrive in a pass
/// interval at that rate, and never more than a tenth of the filesystem.
pub fn headroom(arrived: u64, elapsed: Duration, total: u64) -> u64 {
    let elapsed = elapsed.max(MIN_SPACING).as_secs_f64();
    #[expect(
        clippy::cast_possible_truncation,
        reason = "a float to integer `as` saturates, and the result is capped below"
    )]
    let per_interval = (arrived as f64 * PASS_INTERVAL.as_secs_f64() / elapsed) as u64;
    per_interval.min(total / 10)
}

/// The rejected payloads kept, within a budget: the oldest go first. Each counts with the disk space it
/// takes (whole 4 KiB blocks, one at least), so a spray of tiny payloads cannot use up the inodes either.
#[derive(Debug)]
pub struct Quarantine {
    budget: u64,
    kept: BinaryHeap<Reverse<(u64, String, u64)>>,
    names: HashSet<String>,
    total: u64,
}

impl Quarantine {
    pub fn new(budget: u64) -> Quarantine {
        Quarantine {
            budget,
            kept: BinaryHeap::new(),
            names: HashSet::new(),
            total: 0,
        }
    }

    /// Takes a payload kept at `at_ms`; returns the names to delete so that the rest fits (the newest
    /// are kept; one payload alone over the budget is deleted at once).
    pub fn admit(&mut self, at_ms: u64, name: String, size: u64) -> Vec<String> {
        if self.budget == 0 || !self.names.insert(name.clone()) {
            return Vec::new();
        }
        let cost = retention::blocks_of(size.max(1), 4096);
        self.total += cost;
        self.kept.push(Reverse((at_ms, name, cost)));
        let mut doomed = Vec::new();
        while self.total > self.budget {
            let Some(Reverse((_, name, cost))) = self.kept.pop() else {
                break;
            };
            self.total -= cost;
            self.names.remove(&name);
            doomed.push(name);
        }
        doomed
    }
}

/// Takes the lock of the state folder, waiting up to `wait` for an `imaged prune` that holds it.
pub fn lock_state(state_dir: &Path, wait: Duration) -> Result<retention::catalog::Lock, LockError> {
    use retention::catalog::{try_lock, Locked};
    let started = Instant::now();
    let mut said = false;
    loop {
        match try_lock(state_dir).map_err(LockError::Storage)? {
            Locked::Held(lock) => return Ok(lock),
            Locked::Busy(pid) => {
                let who =
                    pid.map_or_else(|| "another process".to_string(), |p| format!("process {p}"));
                if started.elapsed() > wait {
                    return Err(LockError::Busy(format!(
                        "{who} holds {}: another imaged uses the same storage.state_dir",
                        state_dir.join("lock").display()
                    )));
                }
                if !said {
                    info!(
                        "Waiting for {who}, which holds {} (imaged prune?)",
                        state_dir.join("lock").display()
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Lists in the catalog the images the index knows as stored whose lines are missing at its end: a kill
/// between a group's rename and its catalog line, or a power cut that took lines not yet fsynced. Walks the
/// index from its newest record back to the first one the catalog's newest segments list (at once, when
/// nothing was lost). Returns how many it listed.
pub fn restore_lost_lines<'a>(
    writer: &mut retention::catalog::Writer,
    newest: impl Iterator<Item = (&'a Hash, &'a Entry)>,
    image_dir: &Path,
) -> Result<usize, storage::PathError> {
    let last = writer.last_line()?;
    let mut listed: Option<HashMap<String, Vec<retention::Line>>> = None;
    let mut lost = Vec::new();
    for (hash, entry) in newest.take(100_000) {
        if last
            .as_ref()
            .is_some_and(|l| l.lists(&entry.name, entry.size, hash))
        {
            break;
        }
        if listed.is_none() {
            listed = Some(writer.recent_lines()?);
        }
        let lists = |lines: &Vec<retention::Line>| {
            lines.iter().any(|l| l.lists(&entry.name, entry.size, hash))
        };
        if listed
            .as_ref()
            .and_then(|names| names.get(&entry.name))
            .is_some_and(lists)
        {
            break;
        }
        let Ok(meta) = std::fs::metadata(image_dir.join(&entry.name)) else {
            continue;
        };
        if !meta.is_file() || meta.len() != entry.size {
            continue;
        }
        let at_ms = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
        lost.push(retention::Line {
            at_ms,
            size: entry.size,
            hash: Some(*hash),
            name: entry.name.clone(),
        });
    }
    lost.reverse();
    writer.append(&lost)?;
    Ok(lost.len())
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{0}")]
    Storage(storage::PathError),
    #[error("{0}")]
    Busy(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_line_is_restored_when_an_earlier_image_deleted_by_retention_had_the_same_name() {
        let state = tempfile::tempdir().unwrap();
        let images = tempfile::tempdir().unwrap();
        let (_, mut writer, _) = retention::catalog::open(state.path(), 0, || false).unwrap();
        let name = "cam0/2026-12-01/123555/image_20261201-123555-21.jpg";
        // The earlier image's line, still in the newest segment after retention deleted its file.
        writer
            .append(&[retention::Line {
                at_ms: 1,
                size: 7365,
                hash: Some([1; 32]),
                name: name.into(),
            }])
            .unwrap();
        // The later image under the freed name, whose line a kill took.
        let file = images.path().join(name);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, vec![0; 6604]).unwrap();
        let later = Entry {
            name: name.into(),
            size: 6604,
            confirmed: true,
            origin: None,
        };
        let restored =
            restore_lost_lines(&mut writer, [(&[2; 32], &later)].into_iter(), images.path());
        assert_eq!(restored.unwrap(), 1);
        // And the image that is listed stops the walk.
        let restored =
            restore_lost_lines(&mut writer, [(&[2; 32], &later)].into_iter(), images.path());
        assert_eq!(restored.unwrap(), 0);
    }

    #[test]
    fn a_name_given_twice_stays_pending_until_both_are_given_up() {
        let pending = Pending::new(["a.jpg".to_string()]);
        pending.insert("a.jpg");
        pending.remove("a.jpg");
        assert!(pending.contains("a.jpg"));
        pending.remove("a.jpg");
        assert!(!pending.contains("a.jpg"));
        pending.remove("a.jpg");
        assert!(!pending.contains("a.jpg"));
    }

    #[test]
    fn the_quarantine_keeps_the_newest_within_its_budget_counting_whole_blocks() {
        let mut q = Quarantine::new(3 * 4096);
        assert!(q.admit(1, "a".into(), 10).is_empty());
        assert!(q.admit(3, "c".into(), 0).is_empty());
        // Listed out of order: the oldest goes, whichever came last.
        assert!(q.admit(2, "b".into(), 4096).is_empty());
        assert_eq!(q.admit(4, "d".into(), 1), vec!["a".to_string()]);
        assert_eq!(q.admit(5, "e".into(), 8193), vec!["b", "c", "d"]);
        // Too big on its own: it goes at once.
        assert_eq!(q.admit(6, "f".into(), 20_000), vec!["e", "f"]);
        assert!(Quarantine::new(0).admit(1, "x".into(), u64::MAX).is_empty());
    }

    #[test]
    fn the_same_payload_listed_and_announced_counts_once() {
        let mut q = Quarantine::new(2 * 4096);
        assert!(q.admit(1, "a".into(), 1).is_empty());
        assert!(q.admit(1, "a".into(), 1).is_empty());
        assert!(q.admit(2, "b".into(), 1).is_empty());
    }

    #[test]
    fn headroom_is_a_pass_interval_of_arrivals_and_at_most_a_tenth_of_the_disk() {
        assert_eq!(headroom(1000, PASS_INTERVAL, 1_000_000), 1000);
        assert_eq!(headroom(1000, PASS_INTERVAL / 2, 1_000_000), 2000);
        assert_eq!(headroom(10_000_000, PASS_INTERVAL, 1_000_000), 100_000);
        assert_eq!(headroom(0, Duration::ZERO, 0), 0);
    }
}
