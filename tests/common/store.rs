//! A store as a long-running imaged leaves it, made quickly: sparse image files (their size without their
//! blocks), the retention catalog written with imaged's own catalog code, and the index of the newest
//! images in its own format; and imaged started on it. For the start-up test and the million-image benchmark.

use std::fs::{self, File, FileTimes};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use imaged::retention::catalog;
use imaged::retention::Line;
use sha2::{Digest, Sha256};

use super::{wait_until, Broker, Daemon};

/// What [`prepare`] made.
pub struct Prepared {
    /// Each image's name and size, oldest first.
    pub names: Vec<String>,
    pub size: u64,
    pub segments: Vec<PathBuf>,
}

/// The name an image received at `at_secs` (Unix time) gets with the default `storage.path`.
pub fn default_name(at_secs: i64) -> String {
    chrono::DateTime::from_timestamp(at_secs, 0)
        .unwrap()
        .format("image_%Y%m%d-%H%M%S.jpg")
        .to_string()
}

/// `n` images of `size` bytes (sparse), one a second up to a minute ago, in `images`; their catalog and
/// their index (the newest `window` records, confirmed but for those in `waiting`) in `state`.
pub fn prepare(
    images: &Path,
    state: &Path,
    n: usize,
    size: u64,
    window: usize,
    waiting: std::ops::Range<usize>,
) -> Prepared {
    fs::create_dir_all(images).unwrap();
    fs::create_dir_all(state).unwrap();
    let now = chrono::Utc::now().timestamp() - 60;
    let first = now - i64::try_from(n).unwrap();
    let mut names = Vec::with_capacity(n);
    let mut lines = Vec::with_capacity(4096);
    let (_, mut writer, _) = catalog::open(state, 0, || false).unwrap();
    let mut index = BufWriter::new(File::create(state.join("index.log")).unwrap());
    for i in 0..n {
        let at = first + i64::try_from(i).unwrap();
        let name = default_name(at);
        let mut file = File::create(images.join(&name)).unwrap();
        // An image waiting for its republish is checked by content at start-up: it gets bytes of its own (its
        // name, then zeros) and their real hash. The others are only sized (sparse) and named by a stand-in.
        let hash: [u8; 32] = if waiting.contains(&i) {
            file.write_all(name.as_bytes()).unwrap();
            let zeros = vec![0u8; usize::try_from(size).unwrap() - name.len()];
            Sha256::new()
                .chain_update(name.as_bytes())
                .chain_update(&zeros)
                .finalize()
                .into()
        } else {
            Sha256::digest(name.as_bytes()).into()
        };
        file.set_len(size).unwrap();
        if i + window >= n || waiting.contains(&i) {
            let kind = if waiting.contains(&i) { 'S' } else { 'C' };
            let body = format!("{kind} {} {size} {name}", hex(&hash));
            writeln!(index, "{body} {:08x}", crc32fast::hash(body.as_bytes())).unwrap();
        }
        lines.push(Line {
            at_ms: u64::try_from(at).unwrap() * 1000,
            size,
            hash: Some(hash),
            name: name.clone(),
        });
        if lines.len() == 4096 {
            writer.append(&lines).unwrap();
            lines.clear();
        }
        names.push(name);
    }
    writer.append(&lines).unwrap();
    index.flush().unwrap();
    drop(writer);
    // What the daemon's last pass left: a checkpoint at the end, so the next start reads no line.
    let (mut store, _, _) = catalog::open(state, 0, || false).unwrap();
    store.advance_tail().unwrap();
    store.save().unwrap();
    let segments = catalog::segments(&catalog::dir(state))
        .unwrap()
        .into_iter()
        .map(|s| catalog::segment_path(&catalog::dir(state), s))
        .collect();
    Prepared {
        names,
        size,
        segments,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sets a file's access time a day before its modification time: reading it moves the access time (with
/// `relatime`, the default, and `strictatime`), so an unchanged one means it was not read.
pub fn mark_unread(path: &Path) {
    let modified = fs::metadata(path).unwrap().modified().unwrap();
    let earlier = modified - Duration::from_secs(86_400);
    File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_times(
            FileTimes::new()
                .set_accessed(earlier)
                .set_modified(modified),
        )
        .unwrap();
}

pub fn accessed(path: &Path) -> SystemTime {
    fs::metadata(path).unwrap().accessed().unwrap()
}

/// Whether reading a file on the filesystem of `dir` moves its access time (not with `noatime`).
pub fn reads_show_in_atime(dir: &Path) -> bool {
    let canary = dir.join("atime-canary");
    fs::write(&canary, b"x").unwrap();
    mark_unread(&canary);
    let before = accessed(&canary);
    let _ = fs::read(&canary).unwrap();
    let moved = accessed(&canary) != before;
    fs::remove_file(&canary).unwrap();
    moved
}

/// A prepared store of `n` images, imaged started on it: how long until READY, and the first pass, which
/// must delete the oldest 1,000 and read nothing else.
pub fn start_on_a_prepared_store(n: usize) -> (Duration, u64, u64) {
    const SIZE: u64 = 10_000;
    let broker = Broker::start();
    let total = n as u64 * SIZE;
    let mut daemon = Daemon::prepare(
        broker.port,
        &format!("[retention]\nmax_size = \"{}\"\n", total - 1000 * SIZE),
        &[],
    );
    let state = daemon.images.join(".imaged");
    let made = Instant::now();
    let prepared = prepare(&daemon.images, &state, n, SIZE, n.min(100_000), 0..0);
    println!(
        "prepared {n} images in {:.1}s",
        made.elapsed().as_secs_f64()
    );
    let atime = reads_show_in_atime(&state);
    for segment in &prepared.segments {
        mark_unread(segment);
    }
    let before: Vec<_> = prepared.segments.iter().map(|s| accessed(s)).collect();
    let started = Instant::now();
    daemon.spawn();
    daemon.wait_ready();
    let ready = started.elapsed();
    wait_until("the first pass", Duration::from_secs(60), || {
        daemon.log().contains("Retention: deleted")
    });
    let log = daemon.log();
    let line = log
        .lines()
        .find(|l| l.contains("Retention: deleted"))
        .unwrap()
        .to_string();
    let field = |name: &str| -> u64 {
        line.split(&format!("{name}="))
            .nth(1)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {line}"))
    };
    assert_eq!(field("deleted"), 1000, "{line}");
    let read = field("catalog_bytes_read");
    let elapsed_ms = field("elapsed_ms");
    let first = &prepared.segments[0];
    let line_bytes = fs::metadata(first).unwrap().len() / lines_in(first);
    // The 1,000 lines it deleted, the line of the oldest kept, and what one read of the reader takes.
    assert!(
        read <= 1001 * line_bytes + 16 * 1024,
        "a pass deleting 1000 read {read} bytes of catalog ({line_bytes} a line)"
    );
    assert!(!daemon.images.join(&prepared.names[999]).exists());
    assert!(daemon.images.join(&prepared.names[1000]).exists());
    if atime {
        // The first segment is where the pass read, the newest where start-up looked at the last line.
        let middle = 1..prepared.segments.len().saturating_sub(1);
        for i in middle {
            assert_eq!(
                accessed(&prepared.segments[i]),
                before[i],
                "segment {i} of {} was read",
                prepared.segments.len()
            );
        }
    } else {
        println!("the filesystem does not record reads (noatime): only the byte count is checked");
    }
    assert!(daemon.terminate().success());
    if std::env::var("IMAGED_TEST_SHOW_LOG").is_ok() {
        println!("{}", daemon.log());
    }
    (ready, read, elapsed_ms)
}

fn lines_in(path: &Path) -> u64 {
    fs::read(path)
        .unwrap()
        .iter()
        .filter(|b| **b == b'\n')
        .count() as u64
}
