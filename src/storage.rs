//! The storage folder: what an image is called, what counts as a JPEG, and the durable, atomic,
//! never-replacing write.
//!
//! An image being written has no name: an `O_TMPFILE` inode of the small `.incoming/` folder of `storage.dir`
//! (the same filesystem), written, fsynced, then linked to its final name with `linkat` (which never replaces
//! a name), and the folder is fsynced before anyone is told. A crash leaves nothing behind, and the folder of
//! the final name is the only one locked. Where the filesystem has no `O_TMPFILE` (FUSE, old kernels), the
//! file is `.incoming-XXXXXX.part` in `.incoming/`, renamed with `renameat2(RENAME_NOREPLACE)`; start-up
//! sweeps such leftovers (and those of versions that always wrote them) without listing the image folders.
//! A reader therefore sees either no image or the whole image, and an existing file is never replaced.
//! Every error names the path it is about.

use std::fmt;
use std::fs::{self, File, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use tempfile::TempPath;

use crate::layout::Template;

/// Mode of the folders imaged creates: the service's group may read, nobody else.
pub const DIR_MODE: u32 = 0o750;

/// Prefix of files still being written; readers skip dot-files, and the start-up sweep removes them.
pub const TEMP_PREFIX: &str = ".incoming-";
pub const TEMP_SUFFIX: &str = ".part";

/// The folder of `storage.dir` that images are written in before their rename.
pub const INCOMING_DIR: &str = ".incoming";

pub fn incoming_dir(image_dir: &Path) -> PathBuf {
    image_dir.join(INCOMING_DIR)
}

/// Whether a file name is one of imaged's temp files.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX)
}

/// An I/O error with the operation and the path it failed on.
#[derive(Debug)]
pub struct PathError {
    pub op: &'static str,
    pub path: PathBuf,
    pub source: io::Error,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot {} {}: {}",
            self.op,
            self.path.display(),
            self.source
        )
    }
}

impl std::error::Error for PathError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Attaches the operation and path to an io::Result.
pub trait Context<T> {
    fn at(self, op: &'static str, path: &Path) -> Result<T, PathError>;
}

impl<T> Context<T> for io::Result<T> {
    fn at(self, op: &'static str, path: &Path) -> Result<T, PathError> {
        self.map_err(|source| PathError {
            op,
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Why a payload is not stored as an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    Empty,
    TooLarge { bytes: usize, max: usize },
    NoJpegStart,
    NoJpegEnd,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Empty => write!(f, "the payload is empty"),
            Rejection::TooLarge { bytes, max } => {
                write!(f, "{bytes} bytes is over storage.max_image_bytes ({max})")
            }
            Rejection::NoJpegStart => write!(f, "not a JPEG: it does not start with FF D8 FF"),
            Rejection::NoJpegEnd => {
                write!(f, "not a JPEG: it does not end with FF D9 (truncated?)")
            }
        }
    }
}

/// Decides whether a payload is stored as an image. Oversize is checked first: it is refused without
/// being written anywhere, while other bad payloads go to the quarantine folder for a look.
pub fn check_image(payload: &[u8], max_bytes: usize) -> Result<(), Rejection> {
    if payload.len() > max_bytes {
        return Err(Rejection::TooLarge {
            bytes: payload.len(),
            max: max_bytes,
        });
    }
    if payload.is_empty() {
        return Err(Rejection::Empty);
    }
    if !payload.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Err(Rejection::NoJpegStart);
    }
    if !payload.ends_with(&[0xFF, 0xD9]) {
        return Err(Rejection::NoJpegEnd);
    }
    Ok(())
}

/// What a data URI puts before the base64 text of a JPEG (a browser's canvas, Node-RED's examples).
const DATA_URI_PREFIX: &[u8] = b"data:image/jpeg;base64,";

/// The largest upload `storage.accept_base64` lets in: the base64 text of a `max_bytes` image, with a data
/// URI's prefix and a little room for a trailing newline.
pub fn base64_limit(max_bytes: usize) -> usize {
    max_bytes.div_ceil(3).saturating_mul(4) + DATA_URI_PREFIX.len() + 8
}

/// The JPEG that a base64 text stands for (`storage.accept_base64`): standard alphabet, padding optional,
/// optionally after `data:image/jpeg;base64,`, whitespace around it ignored. `Ok(None)` when the payload is
/// raw bytes, not base64, or base64 of something that is not a JPEG: it is then judged as it is (and
/// quarantined). An image over `max_bytes` once decoded is refused before anything is decoded.
pub fn decode_base64_image(payload: &[u8], max_bytes: usize) -> Result<Option<Vec<u8>>, Rejection> {
    use base64::Engine as _;
    const ENGINE: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    if payload.starts_with(&[0xFF, 0xD8]) {
        return Ok(None);
    }
    let text = payload.trim_ascii();
    let text = match text.get(..DATA_URI_PREFIX.len()) {
        Some(p) if p.eq_ignore_ascii_case(DATA_URI_PREFIX) => &text[DATA_URI_PREFIX.len()..],
        _ => text,
    };
    // The decoded size of valid text, known before a byte is decoded.
    let unpadded = text.len() - text.iter().rev().take_while(|b| **b == b'=').count();
    let decoded = unpadded / 4 * 3 + (unpadded % 4).saturating_sub(1);
    if decoded > max_bytes {
        return Err(Rejection::TooLarge {
            bytes: decoded,
            max: max_bytes,
        });
    }
    let Ok(jpeg) = ENGINE.decode(text) else {
        return Ok(None);
    };
    Ok(check_image(&jpeg, max_bytes).is_ok().then_some(jpeg))
}

/// Hands out names from a template: within a second (when the template names the second) or for good
/// (when it does not) it counts up, so a burst costs one rename each instead of a probe through every taken
/// name. `RENAME_NOREPLACE` stays the guard against files it does not know of.
#[derive(Debug)]
pub struct Namer {
    template: Template,
    per_second: bool,
    second: i64,
    /// The next suffix for each name the template gave.
    next_suffix: HashMap<String, u32>,
}

/// How many names a namer remembers when the template does not name the second; past that it starts over
/// (and probes past the names already taken).
const NAMES_REMEMBERED: usize = 10_000;

impl Namer {
    pub fn new(template: Template) -> Namer {
        Namer {
            per_second: template.names_the_second(),
            template,
            second: i64::MIN,
            next_suffix: HashMap::new(),
        }
    }

    /// Names of rejected payloads, `rejected_YYYYMMDD-HHMMSS[-N].bin`: `.bin` because they are no images.
    pub fn quarantine() -> Namer {
        Namer::new(Template::fixed("rejected_%Y%m%d-%H%M%S.bin"))
    }

    /// The next name to try for an image from `camera` that arrived at `at`.
    pub fn next(&mut self, at: DateTime<Utc>, camera: &str) -> String {
        if self.per_second && at.timestamp() != self.second {
            self.second = at.timestamp();
            self.next_suffix.clear();
        }
        if self.next_suffix.len() >= NAMES_REMEMBERED {
            self.next_suffix.clear();
        }
        let base = self.template.render(at, camera, 0);
        let suffix = self.next_suffix.entry(base).or_insert(0);
        let name = self.template.render(at, camera, *suffix);
        *suffix += 1;
        name
    }
}

/// Whether `name` is one imaged could have given a stored image: a relative path of plain names (no empty
/// part, none hidden, no `..`), without spaces or control characters (the index separates fields by spaces).
pub fn is_stored_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 4096
        && name.split('/').all(|part| {
            !part.is_empty()
                && part.len() <= 255
                && !part.starts_with('.')
                && !part.contains('\0')
                && part.chars().all(|c| !c.is_whitespace() && !c.is_control())
        })
}

/// Creates `dir` (and its parents) with `mode` where missing, and makes the new entries durable.
pub fn create_dir(dir: &Path, mode: u32) -> Result<(), PathError> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    if dir.is_dir() {
        sync_found_dir(parent);
        return Ok(());
    }
    if let Some(parent) = parent {
        create_dir(parent, mode)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            sync_found_dir(parent);
            return Ok(());
        }
        Err(e) => return Err(e).at("create folder", dir),
    }
    // Explicit, so the umask does not decide who may read the images.
    fs::set_permissions(dir, Permissions::from_mode(mode)).at("set the mode of", dir)?;
    if let Some(parent) = parent {
        sync_dir(parent)?;
    }
    Ok(())
}

/// A folder that is already there may come from a run that died between its `mkdir` and the fsync of its
/// parent, so its name may still be only in the page cache, and with it everything stored in it later. Best
/// effort: a parent that imaged may not read (mode 0711, say) worked before and must not stop it from starting.
fn sync_found_dir(parent: Option<&Path>) {
    if let Some(parent) = parent {
        let _ = sync_dir(parent);
    }
}

pub fn open_dir(dir: &Path) -> Result<File, PathError> {
    File::open(dir).at("open folder", dir)
}

pub fn sync_dir(dir: &Path) -> Result<(), PathError> {
    open_dir(dir)?.sync_all().at("fsync folder", dir)
}

/// Writes `bytes` to a new temp file in `dir` with `mode`, and fsyncs it. The temp file is removed again
/// if the returned path is dropped before [`persist`].
pub fn write_temp(dir: &Path, bytes: &[u8], mode: u32) -> Result<TempPath, PathError> {
    write_temp_reporting(dir, bytes, mode, &|| {})
}

/// How much of a large image goes to the disk at a time: each chunk's write-back is started as soon as it is
/// written and waited for before the next, so a slow card shows progress every chunk instead of one long
/// silent fsync at the end (which then has little left to do).
const CHUNK: usize = 1 << 20;

/// [`write_temp`], calling `progress` after every chunk that reached the disk.
fn write_temp_reporting(
    dir: &Path,
    bytes: &[u8],
    mode: u32,
    progress: &dyn Fn(),
) -> Result<TempPath, PathError> {
    let mut file = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .suffix(TEMP_SUFFIX)
        .tempfile_in(dir)
        .at("create a temp file in", dir)?;
    let path = file.path().to_path_buf();
    // Through the File, not the NamedTempFile, whose errors repeat the path we add ourselves.
    fill(file.as_file_mut(), bytes, mode, progress).at("write", &path)?;
    Ok(file.into_temp_path())
}

/// A written and fsynced file that has no final name yet; dropping it removes it.
#[derive(Debug)]
pub enum Written {
    /// An `O_TMPFILE` inode, in no folder until [`persist`] links it.
    Unnamed(File),
    /// A temp file in the incoming folder, where the filesystem has no `O_TMPFILE`.
    Named(TempPath),
}

impl From<TempPath> for Written {
    fn from(temp: TempPath) -> Written {
        Written::Named(temp)
    }
}

/// Writes an image of `bytes` with `mode` for [`persist`], fsynced, calling `progress` after every chunk that
/// reached the disk: unnamed in `dir` where the filesystem can, else as a temp file in `dir`.
pub fn write_image(
    dir: &Path,
    bytes: &[u8],
    mode: u32,
    progress: &dyn Fn(),
) -> Result<Written, PathError> {
    match open_unnamed(dir).at("create an unnamed file in", dir)? {
        Some(mut file) => {
            fill(&mut file, bytes, mode, progress).at("write an unnamed file in", dir)?;
            Ok(Written::Unnamed(file))
        }
        None => write_temp_reporting(dir, bytes, mode, progress).map(Written::Named),
    }
}

/// An `O_TMPFILE` file in `dir`, or None where the filesystem (or kernel) has none, or where it could not be
/// linked: without `CAP_DAC_READ_SEARCH` (the service has no capabilities) the link goes through
/// `/proc/self/fd`.
fn open_unnamed(dir: &Path) -> io::Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    static PROC_FDS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*PROC_FDS.get_or_init(|| Path::new("/proc/self/fd").is_dir()) {
        return Ok(None);
    }
    match fs::OpenOptions::new()
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
    {
        Ok(file) => Ok(Some(file)),
        // EISDIR: a kernel older than O_TMPFILE takes it for O_DIRECTORY.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EISDIR | libc::ENOSYS | libc::EINVAL)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Gives `file` its mode and `bytes`, and makes them durable.
fn fill(file: &mut File, bytes: &[u8], mode: u32, progress: &dyn Fn()) -> io::Result<()> {
    // fchmod, not the create mode: the umask must not narrow or widen what readers get.
    file.set_permissions(Permissions::from_mode(mode))?;
    let mut written = 0;
    for chunk in bytes.chunks(CHUNK) {
        file.write_all(chunk)?;
        if bytes.len() > CHUNK {
            write_back(file, written, chunk.len())?;
            progress();
        }
        written += chunk.len();
    }
    file.sync_data()?;
    drop_from_page_cache(file);
    Ok(())
}

/// Writes `len` bytes at `offset` back to the disk and waits for them (`sync_file_range`); the final fdatasync
/// still makes the file durable, with its size.
fn write_back(file: &File, offset: usize, len: usize) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    let (offset, len) = (
        libc::off64_t::try_from(offset).unwrap_or(libc::off64_t::MAX),
        libc::off64_t::try_from(len).unwrap_or(libc::off64_t::MAX),
    );
    // SAFETY: the descriptor is open for the whole call; the range is within what was written.
    match unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) } {
        0 => Ok(()),
        _ => match io::Error::last_os_error() {
            // Filesystems without it (some FUSE ones), or a system call filter that refuses it, get their data to
            // the disk at the fdatasync.
            e if matches!(
                e.raw_os_error(),
                Some(libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP | libc::EPERM)
            ) =>
            {
                Ok(())
            }
            e => Err(e),
        },
    }
}

/// Once written and fsynced, an image's pages are clean: letting the kernel drop them at once recycles them
/// for the next image, which is much cheaper than page cache growing through fresh pages (measured: about a
/// quarter less CPU per image at 1 MB and more). Readers then read the file from disk.
fn drop_from_page_cache(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: advice only; the descriptor is open for the whole call.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

/// Replaces the file at `path` with one holding `bytes`, atomically and durably: a temp file beside it,
/// fsynced, renamed over it, and the folder fsynced, without which a power cut can bring back the old file, or
/// none. A crash leaves at worst a temp file, which the start-up sweep removes.
pub fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PathError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let temp = write_temp(dir, bytes, mode)?;
    temp.persist(path).map_err(|e| PathError {
        op: "replace",
        path: path.to_path_buf(),
        source: e.error,
    })?;
    sync_dir(dir)
}

/// What [`persist`] did.
#[derive(Debug)]
pub enum Persisted {
    Done,
    /// The name exists: nothing was replaced; the file is handed back to try another name.
    Taken(Written),
    /// The target's folder is gone (retention removes folders it emptied): the file is handed back to try
    /// again once the folder is made anew.
    NoFolder(Written),
}

/// Gives a written file the name `dir/name` without replacing anything. The caller fsyncs the folder.
pub fn persist(temp: impl Into<Written>, dir: &Path, name: &str) -> Result<Persisted, PathError> {
    let target = dir.join(name);
    let (result, back) = match temp.into() {
        Written::Unnamed(file) => (link_unnamed(&file, &target), Written::Unnamed(file)),
        Written::Named(temp) => match temp.persist_noclobber(&target) {
            Ok(()) => return Ok(Persisted::Done),
            Err(e) => (Err(e.error), Written::Named(e.path)),
        },
    };
    match result {
        Ok(()) => Ok(Persisted::Done),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(Persisted::Taken(back)),
        // The file itself is in place (the caller holds it), so a missing path is the target's folder.
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                && !target.parent().is_some_and(Path::exists) =>
        {
            Ok(Persisted::NoFolder(back))
        }
        Err(e) => Err(PathError {
            op: "name a written file",
            path: target,
            source: e,
        }),
    }
}

/// `linkat` of an `O_TMPFILE` file to `target`; fails with EEXIST rather than replace it.
fn link_unnamed(file: &File, target: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let from = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let to = std::ffi::CString::new(target.as_os_str().as_bytes())?;
    // SAFETY: both paths are NUL-terminated strings that outlive the call; the descriptor is open.
    let rc = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Removes temp files left by writes that a crash cut short; they were never acknowledged.
pub fn sweep_temp_files(dir: &Path) -> Result<usize, PathError> {
    sweep(dir, is_temp_name)
}

/// Removes every dot-file of a folder of imaged's state: all its temp files start with a dot (`.index-*` of
/// the index compaction, `.incoming-*.part` of a replaced file, `.catchup-*` of the catalog's catch-up).
pub fn sweep_hidden_files(dir: &Path) -> Result<usize, PathError> {
    sweep(dir, |name| name.starts_with('.'))
}

fn sweep(dir: &Path, remove: impl Fn(&str) -> bool) -> Result<usize, PathError> {
    let mut removed = 0;
    for entry in fs::read_dir(dir).at("list", dir)? {
        let entry = entry.at("list", dir)?;
        let name = entry.file_name();
        if remove(&name.to_string_lossy()) && !entry.file_type().at("stat", &entry.path())?.is_dir()
        {
            let path = entry.path();
            fs::remove_file(&path).at("remove the leftover temp file", &path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Removes a file; false when it was not there (which is no error: another pass took it first).
pub fn remove_if_present(path: &Path) -> Result<bool, PathError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).at("delete", path),
    }
}

/// Space on the filesystem holding `dir`: what an unprivileged writer may still use, and the whole size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    pub available: u64,
    pub total: u64,
    /// The filesystem's allocation unit: what a file of one byte takes.
    pub block: u64,
}

pub fn space(dir: &Path) -> Result<Space, PathError> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
        .at("check the free space of", dir)?;
    // SAFETY: statvfs writes into the zeroed struct it is given; the path is a valid C string.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error()).at("check the free space of", dir);
    }
    let (block, available, blocks) = counts(&stat);
    let block = block.max(1);
    Ok(Space {
        available: available.saturating_mul(block),
        total: blocks.saturating_mul(block),
        block,
    })
}

#[expect(
    clippy::useless_conversion,
    reason = "u64 on 64-bit targets, but c_ulong is u32 on 32-bit ones such as a Raspberry Pi's armhf"
)]
fn counts(stat: &libc::statvfs) -> (u64, u64, u64) {
    (
        u64::from(stat.f_frsize),
        u64::from(stat.f_bavail),
        u64::from(stat.f_blocks),
    )
}

/// A line of imaged's own logs (the index, the catalog): `body`, its CRC-32 and a newline, so that a torn or
/// corrupted line is detected, never trusted.
pub fn checked_line(body: &str) -> String {
    let crc = crc32fast::hash(body.as_bytes());
    format!("{body} {crc:08x}\n")
}

/// The body of a line from [`checked_line`] (without its newline), when its checksum holds.
pub fn checked_body(line: &[u8]) -> Option<&str> {
    let line = std::str::from_utf8(line).ok()?;
    let (body, crc) = line.rsplit_once(' ')?;
    let matches =
        crc.len() == 8 && u32::from_str_radix(crc, 16).ok()? == crc32fast::hash(body.as_bytes());
    matches.then_some(body)
}

/// A SHA-256 from its lowercase hex, as [`hex`] writes it.
pub fn parse_hash(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut hash = [0u8; 32];
    for (i, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(hash)
}

/// Lowercase hex of a digest, for names in logs and the index.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The power-cut filesystem (tests/powercut) for the unit tests of what survives a power cut: the same fixture
/// the integration tests use.
#[cfg(test)]
#[path = "../tests/common/powercut.rs"]
pub(crate) mod power_cut;

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(secs: i64, nanos: u32) -> DateTime<Utc> {
        Utc.timestamp_opt(secs, nanos).unwrap()
    }

    fn images() -> Namer {
        Namer::new(Template::default())
    }

    #[test]
    fn base64_text_and_a_data_uri_decode_to_their_jpeg_and_anything_else_is_judged_as_it_is() {
        use base64::Engine as _;
        let jpeg = b"\xFF\xD8\xFF\xE0 a small image \xFF\xD9".to_vec();
        let text = base64::engine::general_purpose::STANDARD.encode(&jpeg);
        let unpadded = text.trim_end_matches('=').to_string();
        for payload in [
            text.clone(),
            format!("{text}\n"),
            unpadded,
            format!("data:image/jpeg;base64,{text}"),
            format!("DATA:image/JPEG;base64,{text}"),
        ] {
            assert_eq!(
                decode_base64_image(payload.as_bytes(), 1000),
                Ok(Some(jpeg.clone())),
                "{payload:?}"
            );
        }
        let not_jpeg = base64::engine::general_purpose::STANDARD.encode(b"GIF89a, not a JPEG");
        assert_eq!(decode_base64_image(not_jpeg.as_bytes(), 1000), Ok(None));
        assert_eq!(decode_base64_image(b"not base64 at all!", 1000), Ok(None));
        assert_eq!(decode_base64_image(&jpeg, 1000), Ok(None), "raw JPEG bytes");
        assert_eq!(
            decode_base64_image(text.as_bytes(), jpeg.len()),
            Ok(Some(jpeg.clone())),
            "exactly at the limit"
        );
        assert_eq!(
            decode_base64_image(text.as_bytes(), jpeg.len() - 1),
            Err(Rejection::TooLarge {
                bytes: jpeg.len(),
                max: jpeg.len() - 1
            }),
            "over it once decoded, refused before decoding"
        );
        assert!(base64_limit(jpeg.len()) >= format!("data:image/jpeg;base64,{text}\n").len());
    }

    #[test]
    fn names_follow_the_original_pattern_in_utc() {
        let t = Utc.with_ymd_and_hms(2026, 11, 25, 16, 50, 5).unwrap();
        let mut namer = images();
        assert_eq!(namer.next(t, "cam"), "image_20261125-165005.jpg");
        assert_eq!(namer.next(t, "cam"), "image_20261125-165005-1.jpg");
        assert_eq!(
            Namer::quarantine().next(t, "cam"),
            "rejected_20261125-165005.bin"
        );
    }

    #[test]
    fn images_in_the_same_second_get_distinct_names() {
        let mut namer = images();
        let names: Vec<String> = (0..50)
            .map(|i| namer.next(at(1_800_000_000, i * 1000), "cam"))
            .collect();
        let unique: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), 50);
    }

    #[test]
    fn a_new_second_starts_without_a_suffix() {
        let mut namer = images();
        namer.next(at(1_800_000_000, 0), "cam");
        namer.next(at(1_800_000_000, 5), "cam");
        assert!(!namer.next(at(1_800_000_001, 0), "cam").ends_with("-1.jpg"));
    }

    #[test]
    fn each_camera_counts_on_its_own() {
        let mut namer = Namer::new(Template::parse("{camera}/%Y-%m-%d/image_%H%M%S.jpg").unwrap());
        let t = at(1_800_000_000, 0);
        let a = namer.next(t, "a");
        let b = namer.next(t, "b");
        assert!(
            a.starts_with("a/") && b.starts_with("b/") && !b.ends_with("-1.jpg"),
            "{a} {b}"
        );
        assert!(namer.next(t, "a").ends_with("-1.jpg"));
    }

    #[test]
    fn a_template_without_seconds_keeps_counting_across_seconds() {
        let mut namer = Namer::new(Template::parse("{camera}/%Y-%m-%d.jpg").unwrap());
        let first = namer.next(at(1_800_000_000, 0), "a");
        let second = namer.next(at(1_800_000_001, 0), "a");
        assert_ne!(first, second);
    }

    #[test]
    fn jpeg_markers_decide_what_is_an_image() {
        let good = [0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 3, 0xFF, 0xD9];
        assert_eq!(check_image(&good, 100), Ok(()));
        assert_eq!(check_image(&[], 100), Err(Rejection::Empty));
        assert_eq!(check_image(b"GIF89a", 100), Err(Rejection::NoJpegStart));
        assert_eq!(check_image(&good[..6], 100), Err(Rejection::NoJpegEnd));
        assert_eq!(
            check_image(&good, 8),
            Err(Rejection::TooLarge { bytes: 9, max: 8 })
        );
        assert_eq!(check_image(&[0xFF, 0xD8, 0xFF, 0xD9], 100), Ok(()));
    }

    proptest::proptest! {
        #[test]
        fn the_jpeg_check_never_panics_and_follows_the_markers(payload in proptest::collection::vec(proptest::num::u8::ANY, 0..64), max in 0usize..80) {
            let verdict = check_image(&payload, max);
            let markers = payload.len() >= 3 && payload.starts_with(&[0xFF, 0xD8, 0xFF]) && payload.ends_with(&[0xFF, 0xD9]);
            proptest::prop_assert_eq!(verdict.is_ok(), markers && payload.len() <= max);
        }

        #[test]
        fn names_never_repeat_for_any_sequence_of_arrival_times(steps in proptest::collection::vec(0i64..3, 1..300)) {
            let mut namer = images();
            let mut t = 1_800_000_000i64;
            let mut seen = std::collections::HashSet::new();
            for step in steps {
                t += step;
                let name = namer.next(at(t, 0), "cam");
                proptest::prop_assert!(is_stored_name(&name));
                proptest::prop_assert!(seen.insert(name));
            }
        }
    }

    #[test]
    fn only_relative_paths_of_plain_names_are_accepted_from_the_index() {
        assert!(is_stored_name("image_20261125-165005.jpg"));
        assert!(is_stored_name(
            "garden/cam%201/2026-11-25/image_20261125-165005.jpg"
        ));
        for bad in [
            "",
            ".hidden",
            "../x.jpg",
            "a/../b.jpg",
            "/a.jpg",
            "a//b.jpg",
            "a/.b.jpg",
            "a b.jpg",
            "a\nb",
        ] {
            assert!(!is_stored_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_persisted_file_never_replaces_an_existing_one() {
        let dir = tempfile::tempdir().unwrap();
        let first = write_temp(dir.path(), b"first", 0o640).unwrap();
        assert!(matches!(
            persist(first, dir.path(), "a.jpg").unwrap(),
            Persisted::Done
        ));
        let second = write_temp(dir.path(), b"second", 0o640).unwrap();
        let Persisted::Taken(second) = persist(second, dir.path(), "a.jpg").unwrap() else {
            panic!("the name was free")
        };
        assert_eq!(fs::read(dir.path().join("a.jpg")).unwrap(), b"first");
        assert!(matches!(
            persist(second, dir.path(), "b.jpg").unwrap(),
            Persisted::Done
        ));
        assert_eq!(fs::read(dir.path().join("b.jpg")).unwrap(), b"second");
    }

    #[test]
    fn an_image_has_no_name_in_any_folder_until_it_is_persisted_and_never_replaces_one() {
        let dir = tempfile::tempdir().unwrap();
        let incoming = dir.path().join(INCOMING_DIR);
        fs::create_dir(&incoming).unwrap();
        let first = write_image(&incoming, b"first", 0o640, &|| {}).unwrap();
        // tmpfs and ext4 have O_TMPFILE: nothing for a reader to see, nothing for a crash to leave behind.
        assert!(matches!(first, Written::Unnamed(_)));
        assert_eq!(fs::read_dir(&incoming).unwrap().count(), 0);
        assert!(matches!(
            persist(first, dir.path(), "a.jpg").unwrap(),
            Persisted::Done
        ));
        let second = write_image(&incoming, b"second", 0o640, &|| {}).unwrap();
        let Persisted::Taken(second) = persist(second, dir.path(), "a.jpg").unwrap() else {
            panic!("the name was free")
        };
        assert_eq!(fs::read(dir.path().join("a.jpg")).unwrap(), b"first");
        let Persisted::NoFolder(second) = persist(second, dir.path(), "gone/b.jpg").unwrap() else {
            panic!("the folder is missing")
        };
        assert!(matches!(
            persist(second, dir.path(), "b.jpg").unwrap(),
            Persisted::Done
        ));
        assert_eq!(fs::read(dir.path().join("b.jpg")).unwrap(), b"second");
        let mode = fs::metadata(dir.path().join("b.jpg"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
        assert_eq!(fs::read_dir(&incoming).unwrap().count(), 0);
    }

    #[test]
    fn files_get_the_configured_mode_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let temp = write_temp(dir.path(), b"x", 0o604).unwrap();
        persist(temp, dir.path(), "m.jpg").unwrap();
        let mode = fs::metadata(dir.path().join("m.jpg"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o604);
    }

    #[test]
    fn a_replaced_file_has_its_new_bytes_after_a_power_cut() {
        let Some(mut power) = power_cut::Power::mount(|backing| {
            fs::write(backing.join("subscription"), b"old/topic").unwrap();
        }) else {
            return;
        };
        let file = power.root().join("subscription");
        replace_file(&file, b"new/topic", 0o600).unwrap();
        power.cut_and_reboot();
        assert_eq!(fs::read(&file).unwrap(), b"new/topic");
        let names: Vec<_> = fs::read_dir(power.root()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temp file is left: {names:?}");
    }

    #[test]
    fn created_folders_and_their_parents_survive_a_power_cut() {
        let Some(mut power) = power_cut::Power::mount(|_| {}) else {
            return;
        };
        let dir = power.root().join("images/.imaged");
        create_dir(&dir, 0o750).unwrap();
        power.cut_and_reboot();
        assert!(dir.is_dir());
    }

    #[test]
    fn a_folder_that_a_crash_left_unsynced_survives_a_power_cut_once_create_dir_has_found_it() {
        let Some(mut power) = power_cut::Power::mount(|_| {}) else {
            return;
        };
        // An earlier run died between its mkdir and the fsync of the parent.
        let dir = power.root().join("images");
        fs::create_dir(&dir).unwrap();
        create_dir(&dir, 0o750).unwrap();
        power.cut_and_reboot();
        assert!(dir.is_dir());
    }

    #[test]
    fn a_rename_into_a_folder_that_vanished_hands_the_temp_file_back() {
        let dir = tempfile::tempdir().unwrap();
        let temp = write_temp(dir.path(), b"x", 0o640).unwrap();
        let Persisted::NoFolder(temp) = persist(temp, dir.path(), "gone/a.jpg").unwrap() else {
            panic!("the folder does not exist")
        };
        fs::create_dir(dir.path().join("gone")).unwrap();
        assert!(matches!(
            persist(temp, dir.path(), "gone/a.jpg").unwrap(),
            Persisted::Done
        ));
    }

    #[test]
    fn the_free_space_of_a_folder_is_within_its_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let found = space(dir.path()).unwrap();
        assert!(found.available <= found.total && found.total > 0 && found.block > 0);
        assert!(space(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn the_sweep_removes_only_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let temp = write_temp(dir.path(), b"partial", 0o640).unwrap();
        let kept = temp.keep().unwrap();
        fs::write(dir.path().join("image_1.jpg"), b"x").unwrap();
        assert_eq!(sweep_temp_files(dir.path()).unwrap(), 1);
        assert!(!kept.exists());
        assert!(dir.path().join("image_1.jpg").exists());
    }
}
