//! The disk floor: the durable write sequence imaged uses for each image (src/storage.rs: an O_TMPFILE file,
//! fchmod, write, fdatasync, fadvise DONTNEED, linkat through /proc/self/fd, fsync of the folder; or with
//! `--disk-named` the one of earlier versions and of filesystems without O_TMPFILE: an O_EXCL temp file and
//! renameat2(RENAME_NOREPLACE) in place of the link), in a tight loop on some threads, with no MQTT. Every
//! image gets its own folder fsync here; imaged may share one among a group of images (and adds one index
//! append + fdatasync per group).

use std::fs::{File, Permissions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::load::Stop;
use crate::payload::Gen;

pub struct DiskResult {
    pub images: u64,
    pub elapsed: Duration,
    /// One durable write each, in milliseconds, sorted.
    pub latencies_ms: Vec<f64>,
}

impl DiskResult {
    pub fn rate(&self) -> f64 {
        self.images as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// How the disk floor writes.
#[derive(Debug, Clone, Copy)]
pub struct Sequence {
    /// Drop the file's pages from the page cache once they are on disk, as imaged does.
    pub dontneed: bool,
    /// A named temp file and a rename, not an O_TMPFILE and a link.
    pub named: bool,
}

/// One image, durably, never replacing a file, as imaged writes it.
pub fn durable_write(dir: &Path, bytes: &[u8], name: &str, seq: Sequence) -> std::io::Result<()> {
    if !seq.named {
        return durable_link(dir, bytes, name, seq.dontneed);
    }
    let dontneed = seq.dontneed;
    let mut file = tempfile::Builder::new()
        .prefix(".incoming-")
        .suffix(".part")
        .tempfile_in(dir)?;
    file.as_file()
        .set_permissions(Permissions::from_mode(0o640))?;
    file.write_all(bytes)?;
    file.as_file().sync_data()?;
    if dontneed {
        // SAFETY: a valid open descriptor; the call only advises the kernel.
        unsafe {
            libc::posix_fadvise(file.as_file().as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
    file.into_temp_path()
        .persist_noclobber(dir.join(name))
        .map_err(|e| e.error)?;
    File::open(dir)?.sync_all()
}

fn durable_link(dir: &Path, bytes: &[u8], name: &str, dontneed: bool) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)?;
    file.set_permissions(Permissions::from_mode(0o640))?;
    file.write_all(bytes)?;
    file.sync_data()?;
    if dontneed {
        // SAFETY: a valid open descriptor; the call only advises the kernel.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
    let from = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let to = CString::new(dir.join(name).as_os_str().as_bytes())?;
    // SAFETY: NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    File::open(dir)?.sync_all()
}

pub fn run(
    dir: &Path,
    gen: &Gen,
    writers: usize,
    stop: Stop,
    sequence: Sequence,
) -> Result<DiskResult, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let last = Arc::new(Mutex::new(Instant::now()));
    let start = Instant::now();
    let threads: Vec<_> = (0..writers.max(1))
        .map(|_| {
            let (dir, gen, next, done, last) = (
                dir.to_path_buf(),
                gen.clone(),
                next.clone(),
                done.clone(),
                last.clone(),
            );
            std::thread::spawn(move || -> Result<Vec<f64>, String> {
                // One buffer per thread; only the header (the image's number) changes between images.
                let mut buf = gen.make(0);
                let mut latencies = Vec::new();
                loop {
                    let seq = next.fetch_add(1, Ordering::SeqCst);
                    let more = match stop {
                        Stop::Count(n) => seq < n,
                        Stop::After(d) => start.elapsed() < d,
                    };
                    if !more {
                        return Ok(latencies);
                    }
                    gen.stamp(&mut buf, seq);
                    let t0 = Instant::now();
                    durable_write(&dir, &buf, &format!("image_{seq:08}.jpg"), sequence)
                        .map_err(|e| format!("durable write in {}: {e}", dir.display()))?;
                    let now = Instant::now();
                    latencies.push((now - t0).as_secs_f64() * 1e3);
                    done.fetch_add(1, Ordering::SeqCst);
                    let mut l = last.lock().unwrap();
                    if now > *l {
                        *l = now;
                    }
                }
            })
        })
        .collect();
    let mut latencies_ms = Vec::new();
    for t in threads {
        latencies_ms.extend(
            t.join()
                .map_err(|_| "a disk writer panicked".to_string())??,
        );
    }
    latencies_ms.sort_by(f64::total_cmp);
    let elapsed = *last.lock().unwrap() - start;
    Ok(DiskResult {
        images: done.load(Ordering::SeqCst),
        elapsed,
        latencies_ms,
    })
}
