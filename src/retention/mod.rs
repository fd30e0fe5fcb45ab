//! Retention: which stored images go, oldest first, so that `[retention]`'s limits hold, and the pass that
//! deletes them. The daemon runs a pass every few seconds (`daemon::retention`), `imaged prune` runs one on
//! demand; both use [`pass`].
//!
//! The images are listed in the [`catalog`], in the order they were stored. A pass reads from its front:
//! while the stored bytes are over `max_size`, the free space under `min_free`, or the oldest image older
//! than `max_age`, the oldest image goes. It stops at the first image whose republish the broker has not
//! confirmed yet: republishes go out oldest first, so the images behind it are (nearly all) unconfirmed too,
//! and keeping them all is simpler and safer than picking confirmed ones from among them. What a pass reads
//! is what it deletes and one line more, whatever is stored.

pub mod catalog;
mod catch_up;

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::config::{FreeSpace, Retention};
use crate::storage::{self, PathError, Space};
use catalog::Position;
pub use catalog::{Line, Store};
pub use catch_up::{catch_up, CaughtUp};

/// `[retention]` as numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// 0: no limit.
    pub max_bytes: u64,
    /// 0: keep forever.
    pub max_age_ms: u64,
    pub min_free: FreeSpace,
}

impl Policy {
    pub fn new(config: &Retention) -> Policy {
        Policy {
            max_bytes: config.max_size.0,
            max_age_ms: u64::try_from(config.max_age.0.as_millis()).unwrap_or(u64::MAX),
            min_free: config.min_free,
        }
    }

    /// Whether free space is a limit at all.
    pub fn watches_free_space(&self) -> bool {
        self.min_free.bytes_of(u64::MAX) > 0
    }

    /// The free space to keep on a filesystem (0 when none).
    pub fn min_free_bytes(&self, space: &Space) -> u64 {
        self.min_free.bytes_of(space.total)
    }
}

/// A limit of `[retention]`, by its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Limit {
    Size,
    Free,
    Age,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limit::Size => "retention.max_size",
            Limit::Free => "retention.min_free",
            Limit::Age => "retention.max_age",
        })
    }
}

/// The limit the stored images break as a whole, if any: too many bytes, or too little free space
/// (`free` is the space available and the space to keep).
pub fn over(policy: &Policy, stored_bytes: u64, free: Option<(u64, u64)>) -> Option<Limit> {
    if policy.max_bytes > 0 && stored_bytes > policy.max_bytes {
        return Some(Limit::Size);
    }
    match free {
        Some((available, keep)) if available < keep => Some(Limit::Free),
        _ => None,
    }
}

/// Whether an image received at `at_ms` is older than `max_age` at `now_ms`.
pub fn too_old(policy: &Policy, now_ms: u64, at_ms: u64) -> bool {
    policy.max_age_ms > 0 && now_ms.saturating_sub(at_ms) > policy.max_age_ms
}

/// Why the oldest image, received at `at_ms`, must go now, if it must.
pub fn must_go(
    policy: &Policy,
    stored_bytes: u64,
    free: Option<(u64, u64)>,
    now_ms: u64,
    at_ms: u64,
) -> Option<Limit> {
    over(policy, stored_bytes, free).or(too_old(policy, now_ms, at_ms).then_some(Limit::Age))
}

/// What a deleted file gives back: its size in whole blocks.
pub fn blocks_of(size: u64, block: u64) -> u64 {
    size.div_ceil(block.max(1)) * block.max(1)
}

/// How a pass is run.
pub struct Options<'a> {
    /// Decide and report, delete nothing, write nothing.
    pub dry_run: bool,
    pub now_ms: u64,
    /// Free space to keep beyond `min_free`: room for what arrives before the next pass.
    pub headroom: u64,
    /// At most this many deletions in one pass, so that a pass stays short; the next goes on.
    pub max_deletions: u64,
    /// Whether the image of this name waits for its republish to be confirmed.
    pub is_pending: &'a dyn Fn(&str) -> bool,
    /// Called every thousand deletions: a sign of life for the watchdog.
    pub beat: &'a dyn Fn(),
    /// Write the checkpoint even when nothing changed (`imaged prune` waits for it).
    pub save_always: bool,
    /// First take off the front the lines whose files are gone, whatever the limits: after a crash in the
    /// middle of a pass, those the pass deleted before its checkpoint (one stat each, and one more).
    pub tidy_front: bool,
}

/// Why a limit still does not hold after a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocked {
    /// The oldest image left waits for its republish to be confirmed.
    Unconfirmed(String),
    /// No image is left to delete.
    Nothing,
    /// The pass deleted as many as one pass may; the next goes on.
    Budget,
}

/// What a pass did (or, dry, would do).
#[derive(Debug, Default)]
pub struct Report {
    pub deleted: u64,
    pub bytes: u64,
    /// Lines whose file was already gone (deleted by hand, or by another pass).
    pub vanished: u64,
    /// Lines that do not check out, and files that could not be deleted (left where they are).
    pub bad_lines: u64,
    pub undeletable: Vec<String>,
    pub oldest: Option<Line>,
    pub newest: Option<Line>,
    /// The oldest image kept, when the pass read it.
    pub kept: Option<Line>,
    /// The limits that made it delete.
    pub limits: BTreeSet<Limit>,
    /// A limit that still does not hold, and why.
    pub unmet: Option<(Limit, Blocked)>,
    pub catalog_bytes_read: u64,
    /// What is stored after the pass.
    pub images: u64,
    pub stored_bytes: u64,
    /// The filesystem before the pass, and the free space it aims for (min_free and the headroom).
    pub space: Option<Space>,
    pub free_target: u64,
    /// The free space after the pass, as its deletions give it back (an estimate: other writers).
    pub free_after: u64,
    pub folders_removed: usize,
}

/// Runs one pass over the catalog of the images in `image_dir`.
pub fn pass(
    store: &mut Store,
    image_dir: &Path,
    policy: &Policy,
    options: &Options,
) -> Result<Report, PathError> {
    store.advance_tail()?;
    let mut report = Report::default();
    let space = if policy.watches_free_space() {
        Some(storage::space(image_dir)?)
    } else {
        None
    };
    report.space = space;
    report.free_target = space.map_or(0, |s| policy.min_free_bytes(&s) + options.headroom);
    let mut tally = Tally {
        available: space.map_or(0, |s| s.available),
        block: space.map_or(4096, |s| s.block),
        stored: store.checkpoint.bytes,
        images: store.checkpoint.images,
        cursor: store.checkpoint.cursor,
        folders: BTreeSet::new(),
    };
    let mut reader = store.reader()?;
    let mut tidying = options.tidy_front;
    loop {
        let free = space.map(|_| (tally.available, report.free_target));
        let broken = over(policy, tally.stored, free);
        if !tidying && broken.is_none() && policy.max_age_ms == 0 {
            break;
        }
        if report.deleted >= options.max_deletions {
            report.unmet = broken.map(|l| (l, Blocked::Budget));
            break;
        }
        let Some(item) = reader.next_item()? else {
            report.unmet = broken.map(|l| (l, Blocked::Nothing));
            break;
        };
        let (line, next) = match item {
            catalog::Item::Bad(next) => {
                report.bad_lines += 1;
                tally.cursor = next;
                continue;
            }
            catalog::Item::Line(line, next) => (line, next),
        };
        if tidying {
            if !holds(&image_dir.join(&line.name), &line) {
                report.vanished += 1;
                tally.stored = tally.stored.saturating_sub(line.size);
                tally.images = tally.images.saturating_sub(1);
                tally.cursor = next;
                continue;
            }
            tidying = false;
        }
        let Some(limit) = must_go(policy, tally.stored, free, options.now_ms, line.at_ms) else {
            report.kept = Some(line);
            break;
        };
        if (options.is_pending)(&line.name) {
            report.unmet = Some((limit, Blocked::Unconfirmed(line.name.clone())));
            report.kept = Some(line);
            break;
        }
        tally.cursor = next;
        if delete(image_dir, line, limit, options, &mut tally, &mut report)?
            && report.deleted % 1000 == 0
        {
            (options.beat)();
        }
    }
    if report.deleted > 0 && report.kept.is_none() {
        // For the log line: one more line, whatever is stored.
        while let Some(item) = reader.next_item()? {
            if let catalog::Item::Line(line, _) = item {
                report.kept = Some(line);
                break;
            }
        }
    }
    report.catalog_bytes_read = reader.total_read();
    report.free_after = tally.available;
    report.images = tally.images;
    report.stored_bytes = tally.stored;
    if !options.dry_run {
        finish(store, image_dir, tally, &mut report, options.save_always)?;
    }
    Ok(report)
}

/// Where a pass got.
struct Tally {
    /// Free space, as the deletions so far give it back.
    available: u64,
    block: u64,
    stored: u64,
    images: u64,
    cursor: Position,
    /// Folders deletions were made in.
    folders: BTreeSet<PathBuf>,
}

/// Deletes the image of one line (dry: checks it is there), and counts it; true when a file went.
fn delete(
    image_dir: &Path,
    line: Line,
    limit: Limit,
    options: &Options,
    tally: &mut Tally,
    report: &mut Report,
) -> Result<bool, PathError> {
    let path = image_dir.join(&line.name);
    let existed = if !holds(&path, &line) {
        false
    } else if options.dry_run {
        true
    } else {
        match storage::remove_if_present(&path) {
            Ok(existed) => existed,
            // A file imaged may not delete (put there by someone else) stays; the others go on.
            Err(e) if left_alone(&e.source) => {
                report.undeletable.push(e.to_string());
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
    };
    tally.stored = tally.stored.saturating_sub(line.size);
    tally.images = tally.images.saturating_sub(1);
    if !existed {
        report.vanished += 1;
        return Ok(false);
    }
    report.deleted += 1;
    report.bytes += line.size;
    tally.available += blocks_of(line.size, tally.block);
    report.limits.insert(limit);
    if let Some(parent) = path.parent() {
        tally.folders.insert(parent.to_path_buf());
    }
    if report.oldest.is_none() {
        report.oldest = Some(line.clone());
    }
    report.newest = Some(line);
    Ok(true)
}

/// Whether `path` still holds the image `line` lists. A pass killed before its checkpoint runs again from the
/// one before, over lines whose files it had deleted; meanwhile a later image stored in the same second may
/// have been given one of those names again, and its size tells it apart.
fn holds(path: &Path, line: &Line) -> bool {
    path.symlink_metadata().is_ok_and(|m| m.len() == line.size)
}

/// Makes the deletions durable, then the checkpoint that says they are done.
fn finish(
    store: &mut Store,
    image_dir: &Path,
    tally: Tally,
    report: &mut Report,
    save_always: bool,
) -> Result<(), PathError> {
    report.folders_removed = settle_folders(image_dir, tally.folders)?;
    let changed = tally.cursor != store.checkpoint.cursor || store.unsaved();
    let checkpoint = &mut store.checkpoint;
    checkpoint.cursor = tally.cursor;
    checkpoint.images = tally.images;
    checkpoint.bytes = tally.stored;
    checkpoint.deleted_images += report.deleted;
    checkpoint.deleted_bytes += report.bytes;
    if changed || save_always {
        checkpoint.passes += 1;
        store.save()?;
        store.remove_consumed()?;
    }
    Ok(())
}

/// Errors that leave one file where it is rather than stop retention: not imaged's to delete.
fn left_alone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EACCES | libc::EPERM | libc::EISDIR | libc::ENOTDIR | libc::EBUSY)
    )
}

/// Makes the deletions in `folders` durable, and removes the folders they emptied (and the parents those
/// empty in turn), never `image_dir` itself. Returns how many folders went.
fn settle_folders(image_dir: &Path, folders: BTreeSet<PathBuf>) -> Result<usize, PathError> {
    // Deepest first, so a parent is tried once its children are gone.
    let mut todo: BTreeSet<(std::cmp::Reverse<usize>, PathBuf)> = folders
        .into_iter()
        .map(|f| (std::cmp::Reverse(f.components().count()), f))
        .collect();
    let mut sync = BTreeSet::new();
    let mut removed = 0;
    while let Some((_, folder)) = todo.pop_first() {
        if folder == image_dir || !folder.starts_with(image_dir) {
            sync.insert(folder);
            continue;
        }
        // Fails while the folder holds anything: a cheap test for "empty", and no race with a new file.
        match std::fs::remove_dir(&folder) {
            Ok(()) => {
                removed += 1;
                if let Some(parent) = folder.parent() {
                    todo.insert((
                        std::cmp::Reverse(parent.components().count()),
                        parent.to_path_buf(),
                    ));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => {
                sync.insert(folder);
            }
        }
    }
    for folder in sync {
        match storage::sync_dir(&folder) {
            Err(e) if e.source.kind() == std::io::ErrorKind::NotFound => {}
            other => other?,
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Size;

    fn policy(max_bytes: u64, max_age_ms: u64, min_free: FreeSpace) -> Policy {
        Policy {
            max_bytes,
            max_age_ms,
            min_free,
        }
    }

    #[test]
    fn each_limit_decides_on_its_own_and_zero_means_none() {
        let none = policy(0, 0, FreeSpace::Bytes(Size(0)));
        assert_eq!(must_go(&none, u64::MAX, Some((0, 0)), u64::MAX, 0), None);
        assert!(!none.watches_free_space());
        let size = policy(1000, 0, FreeSpace::Bytes(Size(0)));
        assert_eq!(over(&size, 1000, None), None);
        assert_eq!(over(&size, 1001, None), Some(Limit::Size));
        let free = policy(0, 0, FreeSpace::Percent(5.0));
        assert!(free.watches_free_space());
        assert_eq!(over(&free, 0, Some((49, 50))), Some(Limit::Free));
        assert_eq!(over(&free, 0, Some((50, 50))), None);
        let age = policy(0, 60_000, FreeSpace::Bytes(Size(0)));
        assert_eq!(must_go(&age, 0, None, 100_000, 40_000), None);
        assert_eq!(must_go(&age, 0, None, 100_001, 40_000), Some(Limit::Age));
        // An image stamped in the future (a clock set back) is not old.
        assert_eq!(must_go(&age, 0, None, 0, 40_000), None);
    }

    #[test]
    fn a_deleted_file_gives_back_whole_blocks() {
        assert_eq!(blocks_of(0, 4096), 0);
        assert_eq!(blocks_of(1, 4096), 4096);
        assert_eq!(blocks_of(4097, 4096), 8192);
    }

    fn stored(image_dir: &Path, store_lines: &[(u64, u64, &str)]) -> Vec<Line> {
        store_lines
            .iter()
            .map(|&(at_ms, size, name)| {
                let path = image_dir.join(name);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, vec![0u8; usize::try_from(size).unwrap()]).unwrap();
                Line {
                    at_ms,
                    size,
                    hash: None,
                    name: name.to_string(),
                }
            })
            .collect()
    }

    fn run(store: &mut Store, images: &Path, policy: &Policy, pending: &[&str]) -> Report {
        let is_pending = |n: &str| pending.contains(&n);
        pass(
            store,
            images,
            policy,
            &Options {
                dry_run: false,
                now_ms: 10_000,
                headroom: 0,
                max_deletions: 1000,
                is_pending: &is_pending,
                beat: &|| {},
                save_always: false,
                tidy_front: false,
            },
        )
        .unwrap()
    }

    #[test]
    fn a_pass_deletes_the_oldest_until_the_size_fits_stops_at_an_unconfirmed_one_and_empties_folders(
    ) {
        let state = tempfile::tempdir().unwrap();
        let images = tempfile::tempdir().unwrap();
        let (mut store, mut writer, _) = catalog::open(state.path(), 1, || false).unwrap();
        let lines = stored(
            images.path(),
            &[
                (1, 100, "a/d1/1.jpg"),
                (2, 100, "a/d1/2.jpg"),
                (3, 100, "a/d2/3.jpg"),
                (4, 100, "b/d2/4.jpg"),
                (5, 100, "b/d2/5.jpg"),
            ],
        );
        writer.append(&lines).unwrap();
        let size = policy(250, 0, FreeSpace::Bytes(Size(0)));
        let report = run(&mut store, images.path(), &size, &["a/d2/3.jpg"]);
        assert_eq!((report.deleted, report.bytes), (2, 200));
        assert_eq!(
            report.unmet,
            Some((Limit::Size, Blocked::Unconfirmed("a/d2/3.jpg".into())))
        );
        assert!(
            !images.path().join("a/d1").exists(),
            "an emptied folder goes"
        );
        assert!(images.path().join("a/d2/3.jpg").exists());
        // Once confirmed, it goes too, and the limit holds with the newest kept.
        let report = run(&mut store, images.path(), &size, &[]);
        assert_eq!(report.deleted, 1);
        assert_eq!(report.unmet, None);
        assert_eq!(report.kept.unwrap().name, "b/d2/4.jpg");
        assert!(!images.path().join("a").exists() && images.path().exists());
        assert_eq!((store.checkpoint.images, store.checkpoint.bytes), (2, 200));
        // What a restart finds is what the pass left.
        drop((store, writer));
        let (store, _, opened) = catalog::open(state.path(), 2, || false).unwrap();
        assert_eq!(opened.new_lines, 0);
        assert_eq!((store.checkpoint.images, store.checkpoint.bytes), (2, 200));
    }

    #[test]
    fn files_already_gone_are_skipped_and_a_dry_run_deletes_nothing() {
        let state = tempfile::tempdir().unwrap();
        let images = tempfile::tempdir().unwrap();
        let (mut store, mut writer, _) = catalog::open(state.path(), 1, || false).unwrap();
        let lines = stored(
            images.path(),
            &[(1, 10, "1.jpg"), (2, 10, "2.jpg"), (3, 10, "3.jpg")],
        );
        writer.append(&lines).unwrap();
        std::fs::remove_file(images.path().join("1.jpg")).unwrap();
        let size = policy(10, 0, FreeSpace::Bytes(Size(0)));
        let is_pending = |_: &str| false;
        let dry = pass(
            &mut store,
            images.path(),
            &size,
            &Options {
                dry_run: true,
                now_ms: 0,
                headroom: 0,
                max_deletions: 100,
                is_pending: &is_pending,
                beat: &|| {},
                save_always: false,
                tidy_front: false,
            },
        )
        .unwrap();
        assert_eq!((dry.deleted, dry.vanished), (1, 1));
        assert!(images.path().join("2.jpg").exists());
        let report = run(&mut store, images.path(), &size, &[]);
        assert_eq!((report.deleted, report.vanished), (1, 1));
        assert_eq!(store.checkpoint.bytes, 10);
    }

    #[test]
    fn age_reads_only_the_oldest_line_when_nothing_is_old() {
        let state = tempfile::tempdir().unwrap();
        let images = tempfile::tempdir().unwrap();
        let (mut store, mut writer, _) = catalog::open(state.path(), 1, || false).unwrap();
        let names: Vec<String> = (0..2000).map(|i| format!("{i}.jpg")).collect();
        let spec: Vec<(u64, u64, &str)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (9_000 + i as u64, 1, n.as_str()))
            .collect();
        writer.append(&stored(images.path(), &spec)).unwrap();
        let age = policy(0, 5_000, FreeSpace::Bytes(Size(0)));
        let report = run(&mut store, images.path(), &age, &[]);
        assert_eq!(report.deleted, 0);
        assert_eq!(report.kept.unwrap().name, "0.jpg");
        // One buffer of the reader, not the whole catalog.
        assert!(
            report.catalog_bytes_read <= 16 * 1024,
            "{}",
            report.catalog_bytes_read
        );
    }

    #[test]
    fn after_a_crash_mid_pass_the_lines_of_files_already_deleted_are_counted_off_first() {
        let state = tempfile::tempdir().unwrap();
        let images = tempfile::tempdir().unwrap();
        let (mut store, mut writer, _) = catalog::open(state.path(), 1, || false).unwrap();
        let lines = stored(
            images.path(),
            &[(1, 10, "1.jpg"), (2, 10, "2.jpg"), (3, 10, "3.jpg")],
        );
        writer.append(&lines).unwrap();
        // A pass deleted these, and was killed before its checkpoint.
        std::fs::remove_file(images.path().join("1.jpg")).unwrap();
        std::fs::remove_file(images.path().join("2.jpg")).unwrap();
        let no_limits = policy(0, 0, FreeSpace::Bytes(Size(0)));
        let is_pending = |_: &str| false;
        let report = pass(
            &mut store,
            images.path(),
            &no_limits,
            &Options {
                dry_run: false,
                now_ms: 0,
                headroom: 0,
                max_deletions: 100,
                is_pending: &is_pending,
                beat: &|| {},
                save_always: false,
                tidy_front: true,
            },
        )
        .unwrap();
        assert_eq!((report.deleted, report.vanished), (0, 2));
        assert_eq!((store.checkpoint.images, store.checkpoint.bytes), (1, 10));
    }

    #[test]
    fn a_pass_run_again_after_a_crash_keeps_a_later_image_that_was_given_a_deleted_images_name() {
        let state = tempfile::tempdir().unwrap();
        let images = tempfile::tempdir().unwrap();
        let (mut store, mut writer, _) = catalog::open(state.path(), 1, || false).unwrap();
        let mut lines = stored(images.path(), &[(1, 10, "a.jpg"), (2, 10, "b.jpg")]);
        writer.append(&lines).unwrap();
        // A pass deleted a.jpg and was killed before its checkpoint; a later image then got the name again.
        std::fs::remove_file(images.path().join("a.jpg")).unwrap();
        lines = stored(images.path(), &[(3, 25, "a.jpg")]);
        writer.append(&lines).unwrap();
        let room_for_the_newest = policy(25, 0, FreeSpace::Bytes(Size(0)));
        let report = run(&mut store, images.path(), &room_for_the_newest, &[]);
        // The first line's image is gone already; b.jpg goes, and then the later a.jpg fits.
        assert_eq!((report.deleted, report.vanished), (1, 1));
        assert!(!images.path().join("b.jpg").exists());
        assert_eq!(
            std::fs::read(images.path().join("a.jpg")).unwrap().len(),
            25
        );
        assert_eq!((store.checkpoint.images, store.checkpoint.bytes), (1, 25));
    }
}
