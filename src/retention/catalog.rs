//! The catalog: every stored image, one line each, in the order they were stored (which is the order they
//! arrived in), so that retention deletes the oldest first by reading from the front, and knows how much is
//! stored without listing a folder.
//!
//! It lives in `<state_dir>/catalog/`:
//!
//! ```text
//! 0000000100000000.seg   <received ms> <size> <sha256> <name> <crc32>   one line per stored image
//! 0000000100000001.seg   ... a new segment once one holds 1 MiB
//! checkpoint             how far deletion got (cursor), how far lines are counted (tail), and their totals
//! ```
//!
//! The committer appends a line once an image's rename is durable, and before its upload is acknowledged;
//! the lines are not fsynced one by one: retention fsyncs the segment before a checkpoint names a tail in it,
//! and start-up restores lines a power cut took from the index (which has every stored image's record).
//! Retention reads from the cursor, deletes, fsyncs the folders, and only then writes the checkpoint: a crash
//! in between re-reads lines whose files are gone, which are skipped. Segments wholly behind the cursor are
//! deleted. Start-up reads the checkpoint and the lines after its tail, never the whole catalog.
//!
//! Segments below [`LIVE_BASE`] hold what the one-time catch-up found in the image folders at an upgrade
//! from a version without a catalog; they sort before every image stored since.
//!
//! One process writes the catalog at a time: the daemon holds a lock on `<state_dir>/lock` while it runs,
//! and `imaged prune` takes it to prune on its own.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::storage::{self, hex, Context, PathError};

pub const DIR_NAME: &str = "catalog";
const CHECKPOINT: &str = "checkpoint";
const LOCK: &str = "lock";
const SEGMENT_SUFFIX: &str = ".seg";
/// A segment is closed and the next begun once it holds this much.
pub const SEGMENT_BYTES: u64 = 1 << 20;
/// The first segment of images stored with a catalog; the catch-up's segments count up from 1 below it.
pub const LIVE_BASE: u64 = 1 << 32;
/// Group members may read the catalog (as they may read the images), for `imaged prune --dry-run`.
const MODE: u32 = 0o640;

pub type Hash = [u8; 32];

/// One stored image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// When it arrived, in ms since the Unix epoch (by [`crate::clock`]).
    pub at_ms: u64,
    pub size: u64,
    /// Unknown for images the catch-up found (it does not read them).
    pub hash: Option<Hash>,
    /// Relative to `storage.dir`.
    pub name: String,
}

impl Line {
    /// Whether this line lists the image of that name, size and hash (a line the catch-up made has no hash).
    /// The name alone does not tell: once retention has deleted an image, a later one stored in the same
    /// second may get its name again.
    pub fn lists(&self, name: &str, size: u64, hash: &Hash) -> bool {
        self.name == name && self.size == size && self.hash.is_none_or(|h| h == *hash)
    }

    /// The line, checksum and newline included.
    pub fn encode(&self) -> String {
        let hash = self.hash.map_or_else(|| "-".to_string(), |h| hex(&h));
        let body = format!("{} {} {hash} {}", self.at_ms, self.size, self.name);
        storage::checked_line(&body)
    }

    /// Parses a line without its newline; `None` for anything torn, corrupted or unsafe.
    pub fn decode(line: &[u8]) -> Option<Line> {
        let mut fields = storage::checked_body(line)?.split(' ');
        let at_ms = fields.next()?.parse().ok()?;
        let size = fields.next()?.parse().ok()?;
        let hash = match fields.next()? {
            "-" => None,
            h => Some(storage::parse_hash(h)?),
        };
        let name = fields.next()?.to_string();
        if fields.next().is_some() || !storage::is_stored_name(&name) {
            return None;
        }
        Some(Line {
            at_ms,
            size,
            hash,
            name,
        })
    }
}

/// A place in the catalog: a segment and a byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

impl Position {
    pub fn start_of(segment: u64) -> Position {
        Position { segment, offset: 0 }
    }
}

/// The durable state of retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Lines before it are done with (deleted, or found gone).
    pub cursor: Position,
    /// Lines before it are counted in `images` and `bytes`.
    pub tail: Position,
    /// The images and bytes of the lines from `cursor` to `tail`: what is stored.
    pub images: u64,
    pub bytes: u64,
    /// Everything retention ever deleted, and how many passes wrote this file: `imaged prune` tells what the
    /// daemon did for it by the difference.
    pub deleted_images: u64,
    pub deleted_bytes: u64,
    pub passes: u64,
    /// The catalog began on an install with images it does not list yet: the catch-up has to find them.
    pub catch_up: bool,
    /// When the catalog began (ms).
    pub created_ms: u64,
}

impl Checkpoint {
    fn new(created_ms: u64, catch_up: bool) -> Checkpoint {
        Checkpoint {
            cursor: Position::default(),
            tail: Position::start_of(LIVE_BASE),
            images: 0,
            bytes: 0,
            deleted_images: 0,
            deleted_bytes: 0,
            passes: 0,
            catch_up,
            created_ms,
        }
    }

    pub fn encode(&self) -> String {
        let body = format!(
            "imaged-catalog 1 cursor={}:{} tail={}:{} images={} bytes={} deleted_images={} deleted_bytes={} passes={} catch_up={} created={}",
            self.cursor.segment,
            self.cursor.offset,
            self.tail.segment,
            self.tail.offset,
            self.images,
            self.bytes,
            self.deleted_images,
            self.deleted_bytes,
            self.passes,
            if self.catch_up { "pending" } else { "done" },
            self.created_ms,
        );
        let crc = crc32fast::hash(body.as_bytes());
        format!("{body} {crc:08x}\n")
    }

    pub fn decode(text: &str) -> Option<Checkpoint> {
        let (body, crc) = text.trim_end_matches('\n').rsplit_once(' ')?;
        if u32::from_str_radix(crc, 16).ok()? != crc32fast::hash(body.as_bytes()) {
            return None;
        }
        let mut fields = body.split(' ');
        if fields.next()? != "imaged-catalog" || fields.next()? != "1" {
            return None;
        }
        let mut value = |key: &str| {
            fields
                .next()?
                .strip_prefix(key)?
                .strip_prefix('=')
                .map(str::to_string)
        };
        let position = |v: String| {
            let (s, o) = v.split_once(':')?;
            Some(Position {
                segment: s.parse().ok()?,
                offset: o.parse().ok()?,
            })
        };
        Some(Checkpoint {
            cursor: position(value("cursor")?)?,
            tail: position(value("tail")?)?,
            images: value("images")?.parse().ok()?,
            bytes: value("bytes")?.parse().ok()?,
            deleted_images: value("deleted_images")?.parse().ok()?,
            deleted_bytes: value("deleted_bytes")?.parse().ok()?,
            passes: value("passes")?.parse().ok()?,
            catch_up: match value("catch_up")?.as_str() {
                "pending" => true,
                "done" => false,
                _ => return None,
            },
            created_ms: value("created")?.parse().ok()?,
        })
    }
}

pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join(DIR_NAME)
}

pub fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:016x}{SEGMENT_SUFFIX}"))
}

/// The segments of a catalog folder, in order.
pub fn segments(dir: &Path) -> Result<Vec<u64>, PathError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).at("list", dir)? {
        let entry = entry.at("list", dir)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(id) = name
            .strip_suffix(SEGMENT_SUFFIX)
            .filter(|id| id.len() == 16)
            .and_then(|id| u64::from_str_radix(id, 16).ok())
        {
            out.push(id);
        }
    }
    out.sort_unstable();
    Ok(out)
}

fn load_checkpoint(dir: &Path) -> Result<Option<Result<Checkpoint, ()>>, PathError> {
    let path = dir.join(CHECKPOINT);
    match fs::read_to_string(&path) {
        Ok(text) => Ok(Some(Checkpoint::decode(&text).ok_or(()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).at("read", &path),
    }
}

/// Replaces the checkpoint atomically and durably.
fn save_checkpoint(dir: &Path, checkpoint: &Checkpoint) -> Result<(), PathError> {
    let path = dir.join(CHECKPOINT);
    let temp = storage::write_temp(dir, checkpoint.encode().as_bytes(), MODE)?;
    owned_like_folder(temp.as_ref(), dir);
    temp.persist(&path).map_err(|e| PathError {
        op: "replace",
        path: path.clone(),
        source: e.error,
    })?;
    storage::sync_dir(dir)
}

/// When root runs `imaged prune`, the files it makes get the owner of the folder they are in, so the daemon,
/// which runs as its own user, can still read and replace them.
fn owned_like_folder(path: &Path, dir: &Path) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    if let Ok(meta) = fs::metadata(dir) {
        let _ = std::os::unix::fs::chown(path, Some(meta.uid()), Some(meta.gid()));
    }
}

/// What this process appended: where its last line ends, and how many images and bytes it appended in all.
/// The committer writes it, retention reads it to move the tail without reading the lines again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Appended {
    pub end: Position,
    pub images: u64,
    pub bytes: u64,
}

pub type SharedAppended = Arc<Mutex<Appended>>;

/// Appends lines to the newest segment; the committer's.
pub struct Writer {
    dir: PathBuf,
    segment: u64,
    file: File,
    len: u64,
    appended: SharedAppended,
}

impl Writer {
    fn open(dir: &Path, segment: u64, appended: Appended) -> Result<Writer, PathError> {
        let path = segment_path(dir, segment);
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(MODE)
            .open(&path)
            .at("open", &path)?;
        owned_like_folder(&path, dir);
        let len = file.metadata().at("stat", &path)?.len();
        let mut appended = appended;
        appended.end = Position {
            segment,
            offset: len,
        };
        Ok(Writer {
            dir: dir.to_path_buf(),
            segment,
            file,
            len,
            appended: Arc::new(Mutex::new(appended)),
        })
    }

    /// Where this writer's appends are counted.
    pub fn appended(&self) -> SharedAppended {
        self.appended.clone()
    }

    /// What this writer appended so far.
    pub fn counts(&self) -> Appended {
        *self.appended.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `lines` with one write. On error nothing is appended (the file is cut back), so the caller
    /// can try the same lines again.
    pub fn append(&mut self, lines: &[Line]) -> Result<(), PathError> {
        if lines.is_empty() {
            return Ok(());
        }
        let text: String = lines.iter().map(Line::encode).collect();
        let path = segment_path(&self.dir, self.segment);
        if let Err(e) = self.file.write_all(text.as_bytes()) {
            // Best effort: a torn line left behind is caught by its checksum anyway.
            let _ = self.file.set_len(self.len);
            return Err(e).at("write", &path);
        }
        self.len += text.len() as u64;
        {
            let mut appended = self.appended.lock().unwrap_or_else(|e| e.into_inner());
            appended.end = Position {
                segment: self.segment,
                offset: self.len,
            };
            appended.images += lines.len() as u64;
            appended.bytes += lines.iter().map(|l| l.size).sum::<u64>();
        }
        // The lines are in: a segment that cannot be closed now is tried again at the next append, and the
        // caller must not append these lines twice.
        if self.len >= SEGMENT_BYTES {
            let _ = self.roll();
        }
        Ok(())
    }

    /// Closes the full segment (durably: retention only ever fsyncs the newest) and begins the next.
    fn roll(&mut self) -> Result<(), PathError> {
        let path = segment_path(&self.dir, self.segment);
        self.file.sync_data().at("fsync", &path)?;
        let next = Writer::open(&self.dir, self.segment + 1, Appended::default())?;
        // Readers take a newer segment as proof that the older is complete: once it exists, it is the one.
        self.segment = next.segment;
        self.file = next.file;
        self.len = next.len;
        self.appended.lock().unwrap_or_else(|e| e.into_inner()).end =
            Position::start_of(self.segment);
        // Should the new name not survive a power cut, its lines are restored from the index at start-up.
        let _ = storage::sync_dir(&self.dir);
        Ok(())
    }

    /// The last line appended, if the newest segments have one (read from their end only).
    pub fn last_line(&self) -> Result<Option<Line>, PathError> {
        for segment in [self.segment, self.segment.saturating_sub(1)] {
            let path = segment_path(&self.dir, segment);
            let mut file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).at("open", &path),
            };
            let len = file.metadata().at("stat", &path)?.len();
            let from = len.saturating_sub(8192);
            file.seek(SeekFrom::Start(from)).at("seek", &path)?;
            let mut tail = Vec::new();
            file.read_to_end(&mut tail).at("read", &path)?;
            let complete = tail.iter().rposition(|b| *b == b'\n');
            if let Some(end) = complete {
                let start = tail[..end]
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(0, |p| p + 1);
                if start > 0 || from == 0 {
                    if let Some(line) = Line::decode(&tail[start..end]) {
                        return Ok(Some(line));
                    }
                }
            }
        }
        Ok(None)
    }

    /// The lines of the newest two segments by name: what start-up compares the index's newest records with.
    pub fn recent_lines(&self) -> Result<std::collections::HashMap<String, Vec<Line>>, PathError> {
        let mut names: std::collections::HashMap<String, Vec<Line>> =
            std::collections::HashMap::new();
        for segment in [self.segment.saturating_sub(1), self.segment] {
            let path = segment_path(&self.dir, segment);
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).at("open", &path),
            };
            for line in BufReader::new(file).split(b'\n') {
                if let Some(line) = Line::decode(&line.at("read", &path)?) {
                    names.entry(line.name.clone()).or_default().push(line);
                }
            }
        }
        Ok(names)
    }
}

/// Whether an image folder holds anything but imaged's own hidden folders (reading its first entries only):
/// then a new catalog has images to catch up with.
pub fn has_images(image_dir: &Path) -> bool {
    fs::read_dir(image_dir).is_ok_and(|mut entries| {
        entries.any(|entry| {
            entry.is_ok_and(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                !name.starts_with('.') || storage::is_temp_name(&name)
            })
        })
    })
}

/// The checkpoint of a state folder's catalog, as saved (`None` without one).
pub fn read_checkpoint(state_dir: &Path) -> Result<Option<Checkpoint>, PathError> {
    Ok(load_checkpoint(&dir(state_dir))?.and_then(Result::ok))
}

/// A lock on `<state_dir>/lock`, held until dropped. A POSIX record lock, so whoever finds it taken can
/// learn the PID of the process that holds it, and it goes away with that process however it ends.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

/// What [`try_lock`] found.
#[derive(Debug)]
pub enum Locked {
    Held(Lock),
    /// Another process holds it (its PID, when the kernel says).
    Busy(Option<u32>),
}

fn lock_request(kind: libc::c_int) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value that the fields below complete.
    let mut request: libc::flock = unsafe { std::mem::zeroed() };
    request.l_type = libc::c_short::try_from(kind).unwrap_or(0);
    request.l_whence = libc::c_short::try_from(libc::SEEK_SET).unwrap_or(0);
    request
}

/// Takes the lock of a state folder, or says who holds it.
pub fn try_lock(state_dir: &Path) -> Result<Locked, PathError> {
    use std::os::fd::AsRawFd;
    let path = state_dir.join(LOCK);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(MODE)
        .open(&path)
        .at("open", &path)?;
    owned_like_folder(&path, state_dir);
    let request = lock_request(libc::F_WRLCK);
    // SAFETY: a valid descriptor and a valid flock request.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &request) } == 0 {
        return Ok(Locked::Held(Lock { _file: file }));
    }
    let error = io::Error::last_os_error();
    if !matches!(error.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
        return Err(error).at("lock", &path);
    }
    Ok(Locked::Busy(holder(&path)))
}

/// The PID of the process holding the lock of a state folder, if any (without taking it).
pub fn lock_holder(state_dir: &Path) -> Option<u32> {
    holder(&state_dir.join(LOCK))
}

fn holder(path: &Path) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let file = File::open(path).ok()?;
    let mut request = lock_request(libc::F_WRLCK);
    // SAFETY: a valid descriptor and a valid flock request, which F_GETLK fills in.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut request) } != 0 {
        return None;
    }
    if request.l_type == libc::c_short::try_from(libc::F_UNLCK).unwrap_or(-1) {
        return None;
    }
    u32::try_from(request.l_pid).ok()
}

/// What opening the catalog found, for the start-up log.
#[derive(Debug, Default)]
pub struct Opened {
    /// The catalog was made just now.
    pub created: bool,
    /// Lines found after the checkpoint's tail (written since the last checkpoint).
    pub new_lines: u64,
    pub bad_lines: u64,
    pub torn_bytes: u64,
    /// The checkpoint was missing or unreadable, so the lines were counted from the start.
    pub rebuilt: bool,
}

/// The catalog as retention sees it: the checkpoint, and the segments it reads from.
pub struct Store {
    dir: PathBuf,
    pub checkpoint: Checkpoint,
    /// The writer's counters as of `checkpoint.tail` (in this process).
    appended_at_tail: Appended,
    appended: Option<SharedAppended>,
    /// The tail whose segment was last fsynced.
    synced_tail: Position,
    /// The checkpoint as last saved.
    saved: Option<Checkpoint>,
}

/// Opens the catalog of a state folder for writing (the caller holds its [`Lock`]): makes it when missing,
/// cuts off a torn last line, counts the lines written since the last checkpoint and saves a new one.
/// `has_images` says whether the image folders already hold something (then a new catalog must catch up).
pub fn open(
    state_dir: &Path,
    now_ms: u64,
    has_images: impl FnOnce() -> bool,
) -> Result<(Store, Writer, Opened), PathError> {
    let dir = dir(state_dir);
    storage::create_dir(&dir, storage::DIR_MODE)?;
    let mut opened = Opened::default();
    let mut segments = segments(&dir)?;
    let checkpoint = match load_checkpoint(&dir)? {
        Some(Ok(checkpoint)) => checkpoint,
        found if segments.is_empty() => {
            opened.created = true;
            opened.rebuilt = found.is_some();
            Checkpoint::new(now_ms, has_images())
        }
        _ => {
            // The lines are all there; only the sums are lost. Count them once from the first.
            opened.rebuilt = true;
            let mut checkpoint = Checkpoint::new(now_ms, false);
            checkpoint.cursor = Position::start_of(segments[0]);
            checkpoint.tail = Position::start_of(segments[0]);
            checkpoint
        }
    };
    let mut store = Store {
        dir: dir.clone(),
        checkpoint,
        appended_at_tail: Appended::default(),
        appended: None,
        synced_tail: Position::default(),
        saved: None,
    };
    let scanned = store.scan_tail(true)?;
    opened.new_lines = scanned.lines;
    opened.bad_lines = scanned.bad;
    opened.torn_bytes = scanned.torn;
    if scanned.inconsistent {
        // The checkpoint names more lines than the segments hold: trust the lines, count them again.
        opened.rebuilt = true;
        segments = self::segments(&dir)?;
        let first = segments.first().copied().unwrap_or(LIVE_BASE);
        let keep = store.checkpoint.clone();
        store.checkpoint = Checkpoint {
            cursor: Position::start_of(first),
            tail: Position::start_of(first),
            images: 0,
            bytes: 0,
            ..keep
        };
        let again = store.scan_tail(true)?;
        opened.new_lines = again.lines;
        opened.bad_lines += again.bad;
    }
    segments = self::segments(&dir)?;
    let newest = segments
        .last()
        .copied()
        .filter(|s| *s >= LIVE_BASE)
        .unwrap_or(LIVE_BASE);
    let writer = Writer::open(&dir, newest, Appended::default())?;
    if segments.is_empty() {
        storage::sync_dir(&dir)?;
    }
    let appended = *writer.appended.lock().unwrap_or_else(|e| e.into_inner());
    // Past every line counted: the end of the newest segment, or the start of the one just begun.
    store.checkpoint.tail = store.checkpoint.tail.max(appended.end);
    store.appended_at_tail = appended;
    store.appended = Some(writer.appended());
    store.save()?;
    Ok((store, writer, opened))
}

/// Opens the catalog of a state folder to look, writing nothing: `None` when there is none yet.
pub fn open_read_only(state_dir: &Path) -> Result<Option<(Store, Opened)>, PathError> {
    let dir = dir(state_dir);
    if !dir.is_dir() {
        return Ok(None);
    }
    let segments = segments(&dir)?;
    let mut opened = Opened::default();
    let checkpoint = match load_checkpoint(&dir)? {
        Some(Ok(checkpoint)) => checkpoint,
        _ if segments.is_empty() => return Ok(None),
        _ => {
            opened.rebuilt = true;
            let mut checkpoint = Checkpoint::new(0, false);
            checkpoint.cursor = Position::start_of(segments[0]);
            checkpoint.tail = Position::start_of(segments[0]);
            checkpoint
        }
    };
    let mut store = Store {
        dir,
        checkpoint,
        appended_at_tail: Appended::default(),
        appended: None,
        synced_tail: Position::default(),
        saved: None,
    };
    let scanned = store.scan_tail(false)?;
    opened.new_lines = scanned.lines;
    opened.bad_lines = scanned.bad;
    Ok(Some((store, opened)))
}

#[derive(Debug, Default)]
struct Scanned {
    lines: u64,
    bad: u64,
    torn: u64,
    inconsistent: bool,
}

impl Store {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Counts the lines from the tail to the end of the newest segment into the totals and moves the tail
    /// there. With `repair`, a torn last line (a crash mid-append) is cut off.
    fn scan_tail(&mut self, repair: bool) -> Result<Scanned, PathError> {
        let mut scanned = Scanned::default();
        let segments: Vec<u64> = segments(&self.dir)?
            .into_iter()
            .filter(|s| *s >= self.checkpoint.tail.segment)
            .collect();
        if segments.first() != Some(&self.checkpoint.tail.segment)
            && self.checkpoint.tail.offset > 0
        {
            scanned.inconsistent = true;
            return Ok(scanned);
        }
        let last = segments.last().copied();
        for segment in segments {
            let path = segment_path(&self.dir, segment);
            let from = if segment == self.checkpoint.tail.segment {
                self.checkpoint.tail.offset
            } else {
                0
            };
            let mut file = OpenOptions::new()
                .read(true)
                .write(repair)
                .open(&path)
                .at("open", &path)?;
            let len = file.metadata().at("stat", &path)?.len();
            if from > len {
                scanned.inconsistent = true;
                return Ok(scanned);
            }
            file.seek(SeekFrom::Start(from)).at("seek", &path)?;
            let mut reader = BufReader::with_capacity(64 * 1024, &mut file);
            let mut offset = from;
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = reader.read_until(b'\n', &mut line).at("read", &path)?;
                if n == 0 || line.last() != Some(&b'\n') {
                    if n > 0 && Some(segment) == last && repair {
                        scanned.torn = n as u64;
                    }
                    break;
                }
                offset += n as u64;
                match Line::decode(&line[..n - 1]) {
                    Some(l) => {
                        scanned.lines += 1;
                        self.checkpoint.images += 1;
                        self.checkpoint.bytes += l.size;
                    }
                    None => scanned.bad += 1,
                }
            }
            drop(reader);
            if scanned.torn > 0 {
                file.set_len(offset).at("truncate the torn end of", &path)?;
            }
            self.checkpoint.tail = Position { segment, offset };
        }
        Ok(scanned)
    }

    /// Moves the tail to what the writer of this process appended (no reading), or, without one in this
    /// process, to the end of the newest segment (reading only the lines after the tail).
    pub fn advance_tail(&mut self) -> Result<(), PathError> {
        match &self.appended {
            Some(shared) => {
                let now = *shared.lock().unwrap_or_else(|e| e.into_inner());
                self.checkpoint.images += now.images - self.appended_at_tail.images;
                self.checkpoint.bytes += now.bytes - self.appended_at_tail.bytes;
                if now.end > self.checkpoint.tail {
                    self.checkpoint.tail = now.end;
                }
                self.appended_at_tail = now;
            }
            None => {
                self.scan_tail(false)?;
            }
        }
        Ok(())
    }

    /// The writer's counters as of the tail: what the status line adds the newer appends to.
    pub fn appended_at_tail(&self) -> Appended {
        self.appended_at_tail
    }

    /// Reads lines from the cursor up to the tail.
    pub fn reader(&self) -> Result<Reader, PathError> {
        self.reader_from(self.checkpoint.cursor)
    }

    /// Reads lines from `at` (a line's start) up to the tail.
    pub fn reader_from(&self, at: Position) -> Result<Reader, PathError> {
        Ok(Reader {
            dir: self.dir.clone(),
            at,
            end: self.checkpoint.tail,
            segments: segments(&self.dir)?,
            file: None,
            bytes_read: 0,
        })
    }

    /// Makes the lines up to the tail durable, then the checkpoint.
    pub fn save(&mut self) -> Result<(), PathError> {
        let tail = self.checkpoint.tail;
        if tail != self.synced_tail && tail.offset > 0 {
            let path = segment_path(&self.dir, tail.segment);
            match File::open(&path) {
                Ok(file) => file.sync_data().at("fsync", &path)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).at("open", &path),
            }
        }
        save_checkpoint(&self.dir, &self.checkpoint)?;
        self.synced_tail = tail;
        self.saved = Some(self.checkpoint.clone());
        Ok(())
    }

    /// Whether the checkpoint changed since it was saved.
    pub fn unsaved(&self) -> bool {
        self.saved.as_ref() != Some(&self.checkpoint)
    }

    /// Deletes the segments wholly behind the cursor (once a saved checkpoint says so).
    pub fn remove_consumed(&self) -> Result<usize, PathError> {
        let mut removed = 0;
        for segment in segments(&self.dir)? {
            if segment >= self.checkpoint.cursor.segment || segment >= self.checkpoint.tail.segment
            {
                break;
            }
            if storage::remove_if_present(&segment_path(&self.dir, segment))? {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Writes the lines of a catch-up (oldest first, all older than any line stored since) into the
    /// segments below [`LIVE_BASE`], counts them in, and marks the catch-up done.
    pub fn add_caught_up(
        &mut self,
        lines: &mut dyn Iterator<Item = Result<Line, PathError>>,
    ) -> Result<(u64, u64), PathError> {
        for old in segments(&self.dir)?.into_iter().filter(|s| *s < LIVE_BASE) {
            storage::remove_if_present(&segment_path(&self.dir, old))?;
        }
        let (mut images, mut bytes) = (0u64, 0u64);
        let mut segment = 1u64;
        let mut text = String::new();
        let flush = |segment: u64, text: &str| -> Result<(), PathError> {
            let path = segment_path(&self.dir, segment);
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(MODE)
                .open(&path)
                .at("create", &path)?;
            file.write_all(text.as_bytes()).at("write", &path)?;
            file.sync_data().at("fsync", &path)
        };
        for line in lines {
            let line = line?;
            images += 1;
            bytes += line.size;
            text.push_str(&line.encode());
            if text.len() as u64 >= SEGMENT_BYTES {
                flush(segment, &text)?;
                text.clear();
                segment += 1;
            }
        }
        if !text.is_empty() {
            flush(segment, &text)?;
        }
        storage::sync_dir(&self.dir)?;
        self.checkpoint.images += images;
        self.checkpoint.bytes += bytes;
        self.checkpoint.catch_up = false;
        self.checkpoint.cursor = Position::default();
        self.save()?;
        Ok((images, bytes))
    }

    /// The names of the lines stored since the catalog began (segments from [`LIVE_BASE`]).
    pub fn live_names(&self) -> Result<std::collections::HashSet<String>, PathError> {
        let mut names = std::collections::HashSet::new();
        for segment in segments(&self.dir)?.into_iter().filter(|s| *s >= LIVE_BASE) {
            let path = segment_path(&self.dir, segment);
            let file = File::open(&path).at("open", &path)?;
            for line in BufReader::new(file).split(b'\n') {
                if let Some(line) = Line::decode(&line.at("read", &path)?) {
                    names.insert(line.name);
                }
            }
        }
        Ok(names)
    }
}

/// What a [`Reader`] found next.
#[derive(Debug)]
pub enum Item {
    /// A line, and where the line after it begins.
    Line(Line, Position),
    /// A line that does not check out (its image cannot be known), and where the next begins.
    Bad(Position),
}

/// Reads catalog lines from a position up to an end, segment after segment.
pub struct Reader {
    dir: PathBuf,
    at: Position,
    end: Position,
    segments: Vec<u64>,
    file: Option<BufReader<Counted>>,
    /// Bytes read from segment files so far.
    pub bytes_read: u64,
}

/// A file that counts what is read from it: the evidence that a pass reads only what it deletes.
struct Counted {
    file: File,
    read: u64,
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

impl Reader {
    /// Where the next line begins.
    pub fn position(&self) -> Position {
        self.at
    }

    pub fn next_item(&mut self) -> Result<Option<Item>, PathError> {
        let mut line = Vec::new();
        loop {
            if self.at >= self.end {
                return Ok(None);
            }
            if self.file.is_none() {
                let Some(&segment) = self.segments.iter().find(|s| **s >= self.at.segment) else {
                    return Ok(None);
                };
                if segment != self.at.segment {
                    self.at = Position::start_of(segment);
                    if self.at >= self.end {
                        return Ok(None);
                    }
                }
                let path = segment_path(&self.dir, segment);
                let mut file = match File::open(&path) {
                    Ok(file) => file,
                    // Another process's pass took it since it was listed: go on with the next.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        self.segments.retain(|s| *s != segment);
                        self.at = Position::start_of(segment + 1);
                        continue;
                    }
                    Err(e) => return Err(e).at("open", &path),
                };
                file.seek(SeekFrom::Start(self.at.offset))
                    .at("seek", &path)?;
                // Small: what a pass reads beyond the lines it deletes is at most this.
                self.file = Some(BufReader::with_capacity(
                    16 * 1024,
                    Counted { file, read: 0 },
                ));
            }
            let reader = self.file.as_mut().expect("opened above");
            line.clear();
            let path = segment_path(&self.dir, self.at.segment);
            let n = reader.read_until(b'\n', &mut line).at("read", &path)?;
            if n == 0 || line.last() != Some(&b'\n') {
                // The end of this segment: go on with the next, if the end is not in this one.
                self.bytes_read += reader.get_ref().read;
                self.file = None;
                if self.at.segment >= self.end.segment {
                    return Ok(None);
                }
                self.at = Position::start_of(self.at.segment + 1);
                continue;
            }
            let next = Position {
                segment: self.at.segment,
                offset: self.at.offset + n as u64,
            };
            self.at = next;
            return Ok(Some(match Line::decode(&line[..n - 1]) {
                Some(l) => Item::Line(l, next),
                None => Item::Bad(next),
            }));
        }
    }

    /// Bytes read from segment files, the open one included.
    pub fn total_read(&self) -> u64 {
        self.bytes_read + self.file.as_ref().map_or(0, |f| f.get_ref().read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(n: u64) -> Line {
        Line {
            at_ms: 1_800_000_000_000 + n,
            size: 100 + n,
            hash: Some([u8::try_from(n % 256).unwrap(); 32]),
            name: format!("cam/2027-01-15/image_{n}.jpg"),
        }
    }

    #[test]
    fn lines_and_checkpoints_round_trip_through_their_encoding() {
        for l in [
            line(1),
            Line {
                hash: None,
                ..line(2)
            },
        ] {
            let text = l.encode();
            assert_eq!(Line::decode(text.trim_end().as_bytes()), Some(l));
        }
        let mut c = Checkpoint::new(5, true);
        c.cursor = Position {
            segment: 3,
            offset: 77,
        };
        c.images = 9;
        assert_eq!(Checkpoint::decode(&c.encode()), Some(c));
    }

    #[test]
    fn a_flipped_bit_or_an_unsafe_name_makes_a_line_unreadable() {
        let text = line(1).encode();
        let mut bytes = text.trim_end().as_bytes().to_vec();
        for i in 0..bytes.len() {
            bytes[i] ^= 0x01;
            assert_eq!(Line::decode(&bytes), None, "flip at {i}");
            bytes[i] ^= 0x01;
        }
        let evil = Line {
            name: "../../etc/passwd".into(),
            ..line(1)
        };
        assert_eq!(Line::decode(evil.encode().trim_end().as_bytes()), None);
    }

    fn read_all(store: &Store) -> Vec<Line> {
        let mut reader = store.reader().unwrap();
        let mut out = Vec::new();
        while let Some(item) = reader.next_item().unwrap() {
            if let Item::Line(l, _) = item {
                out.push(l);
            }
        }
        out
    }

    #[test]
    fn appended_lines_are_counted_across_segments_and_a_restart() {
        let state = tempfile::tempdir().unwrap();
        let (mut store, mut writer, opened) = open(state.path(), 1, || false).unwrap();
        assert!(opened.created && !store.checkpoint.catch_up);
        let per_segment = usize::try_from(SEGMENT_BYTES).unwrap() / line(1).encode().len() + 1;
        let n = per_segment * 2 + 10;
        for i in 0..n {
            writer.append(&[line(i as u64)]).unwrap();
        }
        assert!(segments(&dir(state.path())).unwrap().len() >= 3);
        store.advance_tail().unwrap();
        assert_eq!(store.checkpoint.images, n as u64);
        assert_eq!(read_all(&store).len(), n);
        store.save().unwrap();
        // The lines since the last checkpoint are counted again at the next start, the others are not read.
        writer.append(&[line(9999)]).unwrap();
        drop((store, writer));
        let (store, _, opened) = open(state.path(), 2, || false).unwrap();
        assert_eq!(opened.new_lines, 1);
        assert_eq!(store.checkpoint.images, n as u64 + 1);
    }

    #[test]
    fn a_torn_last_line_is_cut_off_and_never_counted() {
        let state = tempfile::tempdir().unwrap();
        let (_, mut writer, _) = open(state.path(), 1, || false).unwrap();
        writer.append(&[line(1), line(2)]).unwrap();
        let path = segment_path(&dir(state.path()), LIVE_BASE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&line(3).encode().as_bytes()[..20]).unwrap();
        drop((f, writer));
        let (store, mut writer, opened) = open(state.path(), 2, || false).unwrap();
        assert_eq!((opened.new_lines, opened.torn_bytes), (2, 20));
        writer.append(&[line(4)]).unwrap();
        let names: Vec<String> = read_all(&store).into_iter().map(|l| l.name).collect();
        assert_eq!(names, [line(1).name, line(2).name]);
        assert_eq!(writer.last_line().unwrap(), Some(line(4)));
    }

    #[test]
    fn a_lost_checkpoint_is_rebuilt_from_the_lines() {
        let state = tempfile::tempdir().unwrap();
        let (_, mut writer, _) = open(state.path(), 1, || true).unwrap();
        writer.append(&[line(1), line(2), line(3)]).unwrap();
        drop(writer);
        fs::remove_file(dir(state.path()).join(CHECKPOINT)).unwrap();
        let (store, _, opened) = open(state.path(), 2, || true).unwrap();
        assert!(opened.rebuilt && !opened.created);
        assert_eq!(store.checkpoint.images, 3);
        assert_eq!(store.checkpoint.bytes, 101 + 102 + 103);
    }

    #[test]
    fn a_new_catalog_on_an_install_with_images_waits_for_its_catch_up_which_sorts_first() {
        let state = tempfile::tempdir().unwrap();
        let (mut store, mut writer, _) = open(state.path(), 1, || true).unwrap();
        assert!(store.checkpoint.catch_up);
        writer.append(&[line(100)]).unwrap();
        store.advance_tail().unwrap();
        let old = [line(1), line(2)];
        let (images, _) = store
            .add_caught_up(&mut old.iter().cloned().map(Ok))
            .unwrap();
        assert_eq!(images, 2);
        assert!(!store.checkpoint.catch_up);
        let all: Vec<String> = read_all(&store).into_iter().map(|l| l.name).collect();
        assert_eq!(all, [line(1).name, line(2).name, line(100).name]);
        assert_eq!(store.checkpoint.images, 3);
    }
}
