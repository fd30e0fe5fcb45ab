//! The power cut: work out the durable tree, build it beside the live one, and put it in its place.
//!
//! The tree is built in `BACKING/.powercut-reboot` while the live tree is still whole, because untouched
//! files and files whose bytes are all durable are hard-linked from it rather than copied (a cut costs a
//! link per file, not a copy of the disk). Only then is the live tree removed and the durable one moved up.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, Metadata, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use fuser::FileType;

use crate::fs::{fd_path, link_follow, Key, Node, State, Tail, STAGING};

/// What a cut kept and threw away, for the log line.
#[derive(Debug, Default)]
pub struct Report {
    pub folders: usize,
    pub files: usize,
    /// Names whose change since their folder's last fsync was undone.
    pub names_undone: usize,
    /// Files whose bytes were not all durable.
    pub files_rolled_back: usize,
    pub skipped: usize,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "kept {} folders and {} files; undid {} name changes, rolled back {} files' data; skipped {} \
             unsupported or doubled entries",
            self.folders, self.files, self.names_undone, self.files_rolled_back, self.skipped
        )
    }
}

/// Where a file's durable bytes come from.
enum Bytes {
    /// The inode at this path holds exactly the durable bytes: link it.
    Link(PathBuf),
    /// The first `len` bytes of the file at this path, then zeros up to `zeros_to`.
    Prefix {
        from: PathBuf,
        len: u64,
        zeros_to: u64,
    },
    /// A copy taken before the durable bytes were overwritten, then zeros up to `zeros_to`.
    Saved { bytes: Vec<u8>, zeros_to: u64 },
}

enum Item {
    Folder {
        meta: Metadata,
        children: Vec<(OsString, Item)>,
    },
    File {
        key: Key,
        meta: Metadata,
        bytes: Bytes,
    },
}

/// What a durable folder entry names.
enum Binding {
    Node(u64),
    /// Never seen by the kernel since the mount: durable as it is.
    Untouched(PathBuf, Metadata),
}

impl State {
    /// Cuts the power: from now on every request fails, and the backing folder holds what was durable.
    pub fn power_cut(&mut self) -> io::Result<Report> {
        self.cut = true;
        let mut report = Report {
            names_undone: self.nodes.values().map(|n| n.overrides.len()).sum(),
            ..Report::default()
        };
        let root = &self.nodes[&fuser::INodeNo::ROOT.0];
        let mut seen = HashSet::from([root.key]);
        let tree = self.plan(
            &fd_path(&root.fd),
            Some(&root.overrides),
            true,
            &mut seen,
            &mut report,
        )?;
        let staging = self.backing.join(STAGING);
        fs::create_dir(&staging)?;
        build(&staging, &tree, &mut HashMap::new())?;
        for entry in fs::read_dir(&self.backing)? {
            let entry = entry?;
            if entry.file_name() == STAGING {
                continue;
            }
            if entry.file_type()?.is_dir() {
                fs::remove_dir_all(entry.path())?;
            } else {
                fs::remove_file(entry.path())?;
            }
        }
        for entry in fs::read_dir(&staging)? {
            let entry = entry?;
            fs::rename(entry.path(), self.backing.join(entry.file_name()))?;
        }
        fs::remove_dir(&staging)?;
        count(&tree, &mut report);
        Ok(report)
    }

    /// The durable entries of the folder at `path` whose changed names are `overrides`.
    fn plan(
        &self,
        path: &Path,
        overrides: Option<&HashMap<OsString, Option<u64>>>,
        top: bool,
        seen: &mut HashSet<Key>,
        report: &mut Report,
    ) -> io::Result<Vec<(OsString, Item)>> {
        let mut names = BTreeMap::new();
        let listing = match fs::read_dir(path) {
            Ok(listing) => Some(listing),
            // A folder removed since its last durable moment lists nothing now; its overrides still tell.
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        for entry in listing.into_iter().flatten() {
            let entry = entry?;
            let name = entry.file_name();
            if top && name == STAGING {
                continue;
            }
            let child = path.join(&name);
            let meta = fs::symlink_metadata(&child)?;
            let binding = match self.by_key.get(&(meta.dev(), meta.ino())) {
                Some(&id) => Binding::Node(id),
                None => Binding::Untouched(child, meta),
            };
            names.insert(name, binding);
        }
        for (name, binding) in overrides.into_iter().flatten() {
            match binding {
                Some(id) => names.insert(name.clone(), Binding::Node(*id)),
                None => names.remove(name),
            };
        }
        let mut items = Vec::new();
        for (name, binding) in names {
            let (key, kind, meta, path, node) = match binding {
                Binding::Node(id) => {
                    let node = &self.nodes[&id];
                    let meta = node.fd.metadata()?;
                    (node.key, node.kind, meta, fd_path(&node.fd), Some(node))
                }
                Binding::Untouched(path, meta) => {
                    let kind = FileType::from_std(meta.file_type());
                    let kind = kind.unwrap_or(FileType::NamedPipe);
                    ((meta.dev(), meta.ino()), kind, meta, path, None)
                }
            };
            let item = match kind {
                FileType::Directory => {
                    if !seen.insert(key) {
                        eprintln!(
                            "powercut-fs: a folder is durable under two names; {name:?} is dropped"
                        );
                        report.skipped += 1;
                        continue;
                    }
                    let overrides = node.map(|n| &n.overrides);
                    let children = self.plan(&path, overrides, false, seen, report)?;
                    Item::Folder { meta, children }
                }
                FileType::RegularFile => {
                    let bytes = match node {
                        Some(node) => self.durable_bytes(node, &meta, report),
                        None => Bytes::Link(path),
                    };
                    Item::File { key, meta, bytes }
                }
                _ => {
                    eprintln!("powercut-fs: {name:?} is neither a file nor a folder: dropped");
                    report.skipped += 1;
                    continue;
                }
            };
            items.push((name, item));
        }
        Ok(items)
    }

    fn durable_bytes(&self, node: &Node, meta: &Metadata, report: &mut Report) -> Bytes {
        let (live, durable) = (meta.len(), node.durable_len);
        let zeros_to = match self.tail {
            Tail::Truncate => 0,
            Tail::Zero => live.max(durable),
        };
        if node.snapshot.is_some() || live != durable {
            report.files_rolled_back += 1;
        }
        match &node.snapshot {
            Some(bytes) => Bytes::Saved {
                bytes: bytes.clone(),
                zeros_to,
            },
            // nlink 0: unlinked since, and a link to it cannot be made again.
            None if live == durable && meta.nlink() > 0 => Bytes::Link(fd_path(&node.fd)),
            None => Bytes::Prefix {
                from: fd_path(&node.fd),
                len: durable,
                zeros_to,
            },
        }
    }
}

fn count(items: &[(OsString, Item)], report: &mut Report) {
    for (_, item) in items {
        match item {
            Item::Folder { children, .. } => {
                report.folders += 1;
                count(children, report);
            }
            Item::File { .. } => report.files += 1,
        }
    }
}

/// Creates `items` in `dir`; `linked` maps an inode already created to its new path, for hard links.
fn build(
    dir: &Path,
    items: &[(OsString, Item)],
    linked: &mut HashMap<Key, PathBuf>,
) -> io::Result<()> {
    for (name, item) in items {
        let path = dir.join(name);
        match item {
            Item::Folder { meta, children } => {
                fs::create_dir(&path)?;
                own(&path, meta)?;
                build(&path, children, linked)?;
            }
            Item::File { key, meta, bytes } => {
                if let Some(first) = linked.get(key) {
                    fs::hard_link(first, &path)?;
                    continue;
                }
                match bytes {
                    Bytes::Link(from) => {
                        if link_follow(from, &path).is_err() {
                            write_file(&path, meta, &mut File::open(from)?, meta.len(), 0)?;
                        }
                    }
                    Bytes::Prefix {
                        from,
                        len,
                        zeros_to,
                    } => write_file(&path, meta, &mut File::open(from)?, *len, *zeros_to)?,
                    Bytes::Saved { bytes, zeros_to } => {
                        write_file(&path, meta, &mut &bytes[..], bytes.len() as u64, *zeros_to)?
                    }
                }
                linked.insert(*key, path);
            }
        }
    }
    Ok(())
}

fn write_file(
    path: &Path,
    meta: &Metadata,
    from: &mut impl Read,
    len: u64,
    zeros_to: u64,
) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    io::copy(&mut from.take(len), &mut file)?;
    file.flush()?;
    if zeros_to > len {
        file.set_len(zeros_to)?;
    }
    drop(file);
    own(path, meta)
}

/// Mode and owner as they were at the cut.
fn own(path: &Path, meta: &Metadata) -> io::Result<()> {
    std::os::unix::fs::chown(path, Some(meta.uid()), Some(meta.gid()))?;
    fs::set_permissions(path, Permissions::from_mode(meta.mode() & 0o7777))
}
