//! The one-time catch-up after an upgrade from a version without a catalog: the images already stored are
//! found by walking the image folders once, in the background after READY, and listed in the catalog
//! oldest first (by their files' modification time), before every image stored since. The same walk removes
//! the temp files (`.incoming-*.part`) that older versions wrote among the images.
//!
//! Memory stays bounded however many images there are: the walk sorts runs of [`RUN_LINES`] lines into temp
//! files in the catalog folder, which are then merged.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use super::catalog::{Line, Store};
use crate::storage::{self, Context, PathError};

/// Lines sorted in memory at once.
const RUN_LINES: usize = 65_536;

/// What the catch-up found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CaughtUp {
    pub images: u64,
    pub bytes: u64,
    /// Temp files of older versions removed.
    pub temp_files: u64,
}

fn is_image_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.ends_with(".jpg") || lower.ends_with(".jpeg")
}

fn modified_ms(meta: &fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Walks `image_dir` (not its hidden folders, nor the folders in `skip`), lists every image in the catalog
/// and marks the catch-up done. `None` when `keep_going` said stop (the next start does it again).
pub fn catch_up(
    store: &mut Store,
    image_dir: &Path,
    skip: &[PathBuf],
    keep_going: &dyn Fn() -> bool,
) -> Result<Option<CaughtUp>, PathError> {
    let mut found = CaughtUp::default();
    let mut runs = Runs::new(store.dir());
    let mut recent = false;
    let recent_from = store.checkpoint.created_ms.saturating_sub(1000);
    let mut folders = vec![image_dir.to_path_buf()];
    let mut seen = 0u64;
    while let Some(folder) = folders.pop() {
        for entry in fs::read_dir(&folder).at("list", &folder)? {
            seen += 1;
            if seen % 1000 == 0 && !keep_going() {
                runs.remove();
                return Ok(None);
            }
            let entry = entry.at("list", &folder)?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            let kind = entry.file_type().at("stat", &path)?;
            if name.starts_with('.') {
                if kind.is_file() && storage::is_temp_name(&name) {
                    storage::remove_if_present(&path)?;
                    found.temp_files += 1;
                }
                continue;
            }
            if skip.iter().any(|s| s == &path) {
                continue;
            }
            if kind.is_dir() {
                folders.push(path);
                continue;
            }
            let Some(rel) = path.strip_prefix(image_dir).ok().and_then(|r| r.to_str()) else {
                continue;
            };
            if !kind.is_file() || !is_image_name(&name) || !storage::is_stored_name(rel) {
                continue;
            }
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).at("stat", &path),
            };
            let line = Line {
                at_ms: modified_ms(&meta),
                size: meta.len(),
                hash: None,
                name: rel.to_string(),
            };
            recent |= line.at_ms >= recent_from;
            runs.push(line)?;
        }
    }
    // Files as new as the catalog may be images stored since the upgrade, which it lists already.
    let live = if recent {
        store.live_names()?
    } else {
        HashSet::new()
    };
    let mut written = 0u64;
    let mut merged = runs
        .merge()?
        .filter(|l| match l {
            Ok(line) => line.at_ms < recent_from || !live.contains(&line.name),
            Err(_) => true,
        })
        .inspect(|_| {
            // Writing a million lines takes a while: signs of life for the watchdog.
            written += 1;
            if written % 1000 == 0 {
                keep_going();
            }
        });
    let (images, bytes) = store.add_caught_up(&mut merged)?;
    drop(merged);
    found.images = images;
    found.bytes = bytes;
    Ok(Some(found))
}

/// Sorted runs of lines: in memory until there are too many, then in temp files.
struct Runs {
    dir: PathBuf,
    lines: Vec<Line>,
    files: Vec<PathBuf>,
}

fn order(line: &Line) -> (u64, String) {
    (line.at_ms, line.name.clone())
}

impl Runs {
    fn new(dir: &Path) -> Runs {
        Runs {
            dir: dir.to_path_buf(),
            lines: Vec::new(),
            files: Vec::new(),
        }
    }

    fn push(&mut self, line: Line) -> Result<(), PathError> {
        self.lines.push(line);
        if self.lines.len() >= RUN_LINES {
            self.spill()?;
        }
        Ok(())
    }

    fn spill(&mut self) -> Result<(), PathError> {
        self.lines.sort_by_key(order);
        // A dot-file: start-up sweeps whatever a crash left of it.
        let path = self.dir.join(format!(".catchup-{}", self.files.len()));
        let mut file = std::io::BufWriter::new(File::create(&path).at("create", &path)?);
        for line in self.lines.drain(..) {
            file.write_all(line.encode().as_bytes())
                .at("write", &path)?;
        }
        file.flush().at("write", &path)?;
        self.files.push(path);
        Ok(())
    }

    fn remove(&self) {
        for file in &self.files {
            let _ = fs::remove_file(file);
        }
    }

    /// All lines, oldest first; the temp files go when the merge is dropped.
    fn merge(mut self) -> Result<Merge, PathError> {
        if !self.files.is_empty() && !self.lines.is_empty() {
            self.spill()?;
        }
        self.lines.sort_by_key(order);
        let mut merge = Merge {
            memory: std::mem::take(&mut self.lines).into_iter(),
            readers: Vec::new(),
            heads: BinaryHeap::new(),
            files: std::mem::take(&mut self.files),
            failed: None,
        };
        for path in &merge.files {
            let file = File::open(path).at("open", path)?;
            merge
                .readers
                .push((path.clone(), BufReader::new(file).split(b'\n')));
        }
        for i in 0..merge.readers.len() {
            merge.refill(i);
        }
        Ok(merge)
    }
}

/// The next line of run `usize`, by its sort key.
type Head = Reverse<((u64, String), usize, LineBox)>;

/// A k-way merge of sorted runs.
struct Merge {
    memory: std::vec::IntoIter<Line>,
    readers: Vec<(PathBuf, std::io::Split<BufReader<File>>)>,
    heads: BinaryHeap<Head>,
    files: Vec<PathBuf>,
    failed: Option<PathError>,
}

/// A line in the heap, compared only by the key beside it.
#[derive(Debug)]
struct LineBox(Line);

impl PartialEq for LineBox {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for LineBox {}
impl PartialOrd for LineBox {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for LineBox {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

impl Merge {
    fn refill(&mut self, i: usize) {
        let (path, reader) = &mut self.readers[i];
        for bytes in reader.by_ref() {
            match bytes {
                Ok(bytes) => {
                    if let Some(line) = Line::decode(&bytes) {
                        self.heads.push(Reverse((order(&line), i, LineBox(line))));
                        return;
                    }
                }
                Err(e) => {
                    self.failed = Some(PathError {
                        op: "read",
                        path: path.clone(),
                        source: e,
                    });
                    return;
                }
            }
        }
    }
}

impl Iterator for Merge {
    type Item = Result<Line, PathError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.failed.take() {
            return Some(Err(e));
        }
        if self.readers.is_empty() {
            return self.memory.next().map(Ok);
        }
        let Reverse((_, i, LineBox(line))) = self.heads.pop()?;
        self.refill(i);
        Some(Ok(line))
    }
}

impl Drop for Merge {
    fn drop(&mut self) {
        for file in &self.files {
            let _ = fs::remove_file(file);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retention::catalog;

    #[test]
    fn many_lines_come_out_of_the_runs_in_time_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut runs = Runs::new(dir.path());
        let n = RUN_LINES * 2 + 7;
        let mut rng = fastrand::Rng::with_seed(3);
        for i in 0..n {
            runs.push(Line {
                at_ms: rng.u64(0..1_000_000),
                size: 1,
                hash: None,
                name: format!("{i}.jpg"),
            })
            .unwrap();
        }
        assert_eq!(runs.files.len(), 2);
        let merged: Vec<Line> = runs.merge().unwrap().map(Result::unwrap).collect();
        assert_eq!(merged.len(), n);
        assert!(merged.windows(2).all(|w| order(&w[0]) <= order(&w[1])));
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "the runs are gone"
        );
    }

    #[test]
    fn the_catch_up_lists_old_images_oldest_first_and_removes_old_temp_files() {
        let state = tempfile::tempdir().unwrap();
        let images = tempfile::tempdir().unwrap();
        let quarantine = images.path().join("quarantine");
        fs::create_dir_all(images.path().join("cam/2026-01-01")).unwrap();
        fs::create_dir_all(&quarantine).unwrap();
        fs::create_dir_all(images.path().join(".imaged")).unwrap();
        let file = |name: &str, secs: u64| {
            let path = images.path().join(name);
            fs::write(&path, b"jpeg").unwrap();
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(t)
                .unwrap();
        };
        file("image_2.jpg", 2_000);
        file("cam/2026-01-01/image_1.jpg", 1_000);
        file("notes.txt", 500);
        file(".incoming-abc.part", 10);
        file("quarantine/rejected_1.bin", 1);
        file(".imaged/index.log", 1);
        let (mut store, _, _) = catalog::open(state.path(), 9_000_000, || true).unwrap();
        let found = catch_up(&mut store, images.path(), &[quarantine], &|| true)
            .unwrap()
            .unwrap();
        assert_eq!((found.images, found.bytes, found.temp_files), (2, 8, 1));
        assert!(!images.path().join(".incoming-abc.part").exists());
        assert!(!store.checkpoint.catch_up);
        let mut reader = store.reader().unwrap();
        let mut names = Vec::new();
        while let Some(catalog::Item::Line(line, _)) = reader.next_item().unwrap() {
            names.push(line.name);
        }
        assert_eq!(names, ["cam/2026-01-01/image_1.jpg", "image_2.jpg"]);
    }
}
