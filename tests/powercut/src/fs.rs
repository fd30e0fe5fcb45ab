//! The live filesystem: every operation is done on the backing folder at once, and the record of what is
//! durable is kept beside it.
//!
//! Each inode the kernel has seen (a *node*) holds an `O_PATH` descriptor of its backing inode. Operations
//! reach the backing file through `/proc/self/fd/N`, so a rename never leaves a stale path behind, and the
//! descriptor keeps an unlinked file's bytes alive for as long as a folder's durable entries may still name
//! it. What is durable is recorded by exception, so a write or a rename costs O(1) bookkeeping:
//!
//! - a file node keeps its durable length, and a copy of its durable bytes only once a write or a truncate
//!   reaches below that length (appends need no copy: the cut just drops what lies past it);
//! - a folder node keeps, for each name changed since its last fsync, what that name was bound to at that
//!   fsync (a node, or nothing). Every other name is bound now as it was then. An fsync of the folder
//!   forgets the list.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, FileTimes, Metadata, OpenOptions, Permissions};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::fs::{DirBuilderExt, DirEntryExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// Where a cut builds the durable tree before it replaces the backing folder's contents.
pub const STAGING: &str = ".powercut-reboot";

/// Nothing but this process changes the backing folder, so the kernel may cache what it was told.
const TTL: Duration = Duration::from_secs(1);

/// What a cut does to the bytes of a file past its durable length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tail {
    /// Gone: the file is as long as at its last fsync.
    Truncate,
    /// Zeroed: the length survives, the bytes do not.
    Zero,
}

pub type Key = (u64, u64);

pub struct Node {
    /// `O_PATH`: names the backing inode without opening its data, and keeps it alive when unlinked.
    pub fd: File,
    pub key: Key,
    pub kind: FileType,
    /// References the kernel holds (lookups minus forgets).
    lookups: u64,
    /// Open file handles.
    handles: u32,
    /// Folder entries' durable bindings that name this node.
    refs: u32,
    /// Files: how many bytes were made durable.
    pub durable_len: u64,
    /// Files: the durable bytes, once something overwrote or cut them.
    pub snapshot: Option<Vec<u8>>,
    /// Folders: the durable binding of each name changed since the last fsync.
    pub overrides: HashMap<OsString, Option<u64>>,
}

struct Handle {
    file: File,
    node: u64,
    append: bool,
}

struct DirEntry {
    ino: u64,
    kind: FileType,
    name: OsString,
}

pub struct State {
    pub backing: PathBuf,
    pub tail: Tail,
    pub nodes: HashMap<u64, Node>,
    pub by_key: HashMap<Key, u64>,
    next_ino: u64,
    handles: HashMap<u64, Handle>,
    /// Open folders: their folder node, and the listing once read.
    listings: HashMap<u64, (u64, Option<Vec<DirEntry>>)>,
    next_fh: u64,
    /// Set by a power cut: from then on every request fails.
    pub cut: bool,
}

pub fn fd_path(file: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

pub fn open_path(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)
}

fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// open(2) with the caller's flags as they are: std's OpenOptions refuses some combinations the kernel
/// accepts (O_RDONLY | O_CREAT).
fn open_raw(path: &Path, flags: i32, mode: u32) -> io::Result<File> {
    let path = cstr(path)?;
    // SAFETY: a valid path; the descriptor returned is owned by the File alone.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Hard-links what `from` names; `/proc/self/fd/N` paths are followed to their inode.
pub fn link_follow(from: &Path, to: &Path) -> io::Result<()> {
    let (from, to) = (cstr(from)?, cstr(to)?);
    // SAFETY: valid paths, not kept by the call.
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

fn kind_of(meta: &Metadata) -> FileType {
    FileType::from_std(meta.file_type()).unwrap_or(FileType::RegularFile)
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::new(secs.unsigned_abs(), 0) + Duration::new(0, nsecs as u32)
    }
}

fn to_attr(ino: u64, m: &Metadata) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: m.size(),
        blocks: m.blocks(),
        atime: time(m.atime(), m.atime_nsec()),
        mtime: time(m.mtime(), m.mtime_nsec()),
        ctime: time(m.ctime(), m.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind: kind_of(m),
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        blksize: m.blksize() as u32,
        flags: 0,
    }
}

fn stale() -> Errno {
    Errno::from_i32(libc::ESTALE)
}

impl State {
    pub fn mount(backing: &Path, tail: Tail) -> io::Result<State> {
        let backing = backing.canonicalize()?;
        if backing.join(STAGING).exists() {
            return Err(io::Error::other(format!(
                "{} exists: an earlier power cut did not finish, the folder is in no defined state",
                backing.join(STAGING).display()
            )));
        }
        let fd = open_path(&backing)?;
        let meta = fd.metadata()?;
        if !meta.is_dir() {
            return Err(io::Error::other(format!(
                "{} is not a folder",
                backing.display()
            )));
        }
        let mut state = State {
            backing,
            tail,
            nodes: HashMap::new(),
            by_key: HashMap::new(),
            next_ino: INodeNo::ROOT.0,
            handles: HashMap::new(),
            listings: HashMap::new(),
            next_fh: 1,
            cut: false,
        };
        state.insert(fd, &meta);
        Ok(state)
    }

    fn insert(&mut self, fd: File, meta: &Metadata) -> u64 {
        let id = self.next_ino;
        self.next_ino += 1;
        let key = (meta.dev(), meta.ino());
        self.nodes.insert(
            id,
            Node {
                fd,
                key,
                kind: kind_of(meta),
                lookups: 0,
                handles: 0,
                refs: 0,
                // Unknown until now means untouched since the mount: all of it is durable.
                durable_len: meta.len(),
                snapshot: None,
                overrides: HashMap::new(),
            },
        );
        self.by_key.insert(key, id);
        id
    }

    fn node(&self, id: u64) -> Result<&Node, Errno> {
        self.nodes.get(&id).ok_or_else(stale)
    }

    fn node_mut(&mut self, id: u64) -> Result<&mut Node, Errno> {
        self.nodes.get_mut(&id).ok_or_else(stale)
    }

    /// The node of the backing inode at `path`, made on first sight.
    fn node_for(&mut self, path: &Path, meta: &Metadata) -> io::Result<u64> {
        let key = (meta.dev(), meta.ino());
        if let Some(&id) = self.by_key.get(&key) {
            return Ok(id);
        }
        let fd = open_path(path)?;
        let meta = fd.metadata()?;
        if (meta.dev(), meta.ino()) != key {
            return Err(io::Error::from_raw_os_error(libc::ESTALE));
        }
        Ok(self.insert(fd, &meta))
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<PathBuf, Errno> {
        let node = self.node(parent)?;
        if node.kind != FileType::Directory {
            return Err(Errno::ENOTDIR);
        }
        Ok(fd_path(&node.fd).join(name))
    }

    fn attr(&self, id: u64) -> Result<FileAttr, Errno> {
        Ok(to_attr(id, &self.node(id)?.fd.metadata()?))
    }

    /// Called before `name` in `dir` changes: remembers its durable binding unless already remembered.
    fn note_name_change(&mut self, dir: u64, name: &OsStr) -> Result<(), Errno> {
        if self.node(dir)?.overrides.contains_key(name) {
            return Ok(());
        }
        let path = self.child(dir, name)?;
        let binding = match fs::symlink_metadata(&path) {
            Ok(meta) => Some(self.node_for(&path, &meta)?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        if let Some(id) = binding {
            self.node_mut(id)?.refs += 1;
        }
        self.node_mut(dir)?
            .overrides
            .insert(name.to_owned(), binding);
        Ok(())
    }

    /// Called before bytes from `from` on change: keeps a copy of the durable bytes if any are hit.
    fn preserve(&mut self, id: u64, from: u64) -> Result<(), Errno> {
        let node = self.node_mut(id)?;
        if node.kind != FileType::RegularFile || node.snapshot.is_some() || from >= node.durable_len
        {
            return Ok(());
        }
        let mut bytes = Vec::with_capacity(node.durable_len as usize);
        File::open(fd_path(&node.fd))?
            .take(node.durable_len)
            .read_to_end(&mut bytes)?;
        node.snapshot = Some(bytes);
        Ok(())
    }

    /// Drops a node the cut cannot need: a file nobody holds whose bytes are all durable and that no durable
    /// folder entry names. A later lookup makes a new, equally clean one.
    fn maybe_forget(&mut self, id: u64) {
        let Some(node) = self.nodes.get(&id) else {
            return;
        };
        let clean = node.snapshot.is_none()
            && node
                .fd
                .metadata()
                .is_ok_and(|m| m.len() == node.durable_len);
        if id != INodeNo::ROOT.0
            && node.kind == FileType::RegularFile
            && node.lookups == 0
            && node.handles == 0
            && node.refs == 0
            && clean
        {
            let key = node.key;
            self.nodes.remove(&id);
            self.by_key.remove(&key);
        }
    }

    fn new_handle(&mut self, file: File, node: u64, flags: i32) -> Result<u64, Errno> {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(
            fh,
            Handle {
                file,
                node,
                append: flags & libc::O_APPEND != 0,
            },
        );
        self.node_mut(node)?.handles += 1;
        Ok(fh)
    }

    fn lookup(&mut self, parent: u64, name: &OsStr) -> Result<FileAttr, Errno> {
        let path = self.child(parent, name)?;
        let meta = fs::symlink_metadata(&path)?;
        let id = self.node_for(&path, &meta)?;
        self.node_mut(id)?.lookups += 1;
        Ok(to_attr(id, &meta))
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &mut self,
        id: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
    ) -> Result<FileAttr, Errno> {
        let path = fd_path(&self.node(id)?.fd);
        if let Some(mode) = mode {
            fs::set_permissions(&path, Permissions::from_mode(mode & 0o7777))?;
        }
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::chown(&path, uid, gid)?;
        }
        if let Some(size) = size {
            self.preserve(id, size)?;
            OpenOptions::new().write(true).open(&path)?.set_len(size)?;
        }
        if atime.is_some() || mtime.is_some() {
            let at = |t: TimeOrNow| match t {
                TimeOrNow::SpecificTime(t) => t,
                TimeOrNow::Now => SystemTime::now(),
            };
            let mut times = FileTimes::new();
            if let Some(t) = atime {
                times = times.set_accessed(at(t));
            }
            if let Some(t) = mtime {
                times = times.set_modified(at(t));
            }
            File::open(&path)?.set_times(times)?;
        }
        self.attr(id)
    }

    fn open(&mut self, id: u64, flags: i32) -> Result<u64, Errno> {
        let path = fd_path(&self.node(id)?.fd);
        let passed = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_TRUNC);
        let file = open_raw(&path, passed, 0)?;
        if flags & libc::O_TRUNC != 0 && flags & libc::O_ACCMODE != libc::O_RDONLY {
            self.preserve(id, 0)?;
            file.set_len(0)?;
        }
        self.new_handle(file, id, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        uid: u32,
        gid: u32,
    ) -> Result<(FileAttr, u64), Errno> {
        let path = self.child(parent, name)?;
        self.note_name_change(parent, name)?;
        let passed = (flags | libc::O_CREAT) & !(libc::O_TRUNC | libc::O_NOCTTY);
        let file = open_raw(&path, passed, mode & !umask & 0o7777)?;
        let meta = file.metadata()?;
        let id = self.node_for(&path, &meta)?;
        if uid != 0 && meta.uid() != uid {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
        }
        if flags & libc::O_TRUNC != 0 && meta.len() > 0 {
            self.preserve(id, 0)?;
            file.set_len(0)?;
        }
        self.node_mut(id)?.lookups += 1;
        let fh = self.new_handle(file, id, flags)?;
        Ok((self.attr(id)?, fh))
    }

    fn mkdir(
        &mut self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        uid: u32,
        gid: u32,
    ) -> Result<FileAttr, Errno> {
        let path = self.child(parent, name)?;
        self.note_name_change(parent, name)?;
        fs::DirBuilder::new()
            .mode(mode & !umask & 0o7777)
            .create(&path)?;
        if uid != 0 {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
        }
        let meta = fs::symlink_metadata(&path)?;
        let id = self.node_for(&path, &meta)?;
        self.node_mut(id)?.lookups += 1;
        Ok(to_attr(id, &meta))
    }

    fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let path = self.child(parent, name)?;
        self.note_name_change(parent, name)?;
        if dir {
            fs::remove_dir(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
        Ok(())
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<(), Errno> {
        let from = self.child(parent, name)?;
        let to = self.child(newparent, newname)?;
        self.note_name_change(parent, name)?;
        self.note_name_change(newparent, newname)?;
        let (from, to) = (cstr(&from)?, cstr(&to)?);
        // SAFETY: valid paths, not kept by the call.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                flags as libc::c_uint,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(())
    }

    fn link(&mut self, id: u64, newparent: u64, newname: &OsStr) -> Result<FileAttr, Errno> {
        let to = self.child(newparent, newname)?;
        self.note_name_change(newparent, newname)?;
        link_follow(&fd_path(&self.node(id)?.fd), &to)?;
        self.node_mut(id)?.lookups += 1;
        self.attr(id)
    }

    fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let handle = self.handles.get(&fh).ok_or(Errno::EBADF)?;
        let mut buf = vec![0; size as usize];
        let mut filled = 0;
        while filled < buf.len() {
            match handle
                .file
                .read_at(&mut buf[filled..], offset + filled as u64)
            {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        buf.truncate(filled);
        Ok(buf)
    }

    fn write(&mut self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let handle = self.handles.get(&fh).ok_or(Errno::EBADF)?;
        let node = handle.node;
        // O_APPEND writes land at the end whatever the offset says (pwrite on Linux).
        let at = if handle.append {
            handle.file.metadata()?.len()
        } else {
            offset
        };
        self.preserve(node, at)?;
        let handle = self.handles.get(&fh).ok_or(Errno::EBADF)?;
        handle.file.write_all_at(data, offset)?;
        Ok(data.len() as u32)
    }

    fn release(&mut self, fh: u64) {
        if let Some(handle) = self.handles.remove(&fh) {
            if let Some(node) = self.nodes.get_mut(&handle.node) {
                node.handles = node.handles.saturating_sub(1);
            }
            self.maybe_forget(handle.node);
        }
    }

    /// fsync and fdatasync alike: the length is part of what fdatasync must make readable.
    fn fsync(&mut self, id: u64) -> Result<(), Errno> {
        let node = self.node_mut(id)?;
        if node.kind == FileType::RegularFile {
            node.durable_len = node.fd.metadata()?.len();
            node.snapshot = None;
        }
        Ok(())
    }

    fn fsyncdir(&mut self, id: u64) -> Result<(), Errno> {
        let bound: Vec<u64> = self
            .node_mut(id)?
            .overrides
            .drain()
            .filter_map(|(_, b)| b)
            .collect();
        for child in bound {
            if let Some(node) = self.nodes.get_mut(&child) {
                node.refs = node.refs.saturating_sub(1);
            }
            self.maybe_forget(child);
        }
        Ok(())
    }

    fn opendir(&mut self, id: u64) -> Result<u64, Errno> {
        if self.node(id)?.kind != FileType::Directory {
            return Err(Errno::ENOTDIR);
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        // Not listed yet: most opens of a folder are for an fsync, and the image folder is large.
        self.listings.insert(fh, (id, None));
        Ok(fh)
    }

    fn readdir(&mut self, fh: u64, offset: u64) -> Result<&[DirEntry], Errno> {
        let &(id, ref listed) = self.listings.get(&fh).ok_or(Errno::EBADF)?;
        if listed.is_none() || offset == 0 {
            // The whole listing at once, read again from the start (rewinddir): offsets into it stay valid
            // while the folder changes.
            let mut entries = vec![
                DirEntry {
                    ino: id,
                    kind: FileType::Directory,
                    name: ".".into(),
                },
                DirEntry {
                    ino: id,
                    kind: FileType::Directory,
                    name: "..".into(),
                },
            ];
            for entry in fs::read_dir(fd_path(&self.node(id)?.fd))? {
                let entry = entry?;
                let kind = entry
                    .file_type()
                    .ok()
                    .and_then(FileType::from_std)
                    .unwrap_or(FileType::RegularFile);
                // readdir's inode numbers are informational; only lookup's are used by the kernel.
                entries.push(DirEntry {
                    ino: entry.ino(),
                    kind,
                    name: entry.file_name(),
                });
            }
            self.listings.insert(fh, (id, Some(entries)));
        }
        let (_, listed) = &self.listings[&fh];
        Ok(listed.as_deref().unwrap_or_default())
    }

    fn statfs(&self) -> Result<libc::statvfs, Errno> {
        let path = cstr(&self.backing)?;
        // SAFETY: statvfs is plain data; the kernel fills it.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid path and a struct owned by this frame.
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(st)
    }
}

/// The FUSE side: each request takes the state's lock, fails with EIO after a cut, and replies.
pub struct PowercutFs {
    state: Arc<Mutex<State>>,
    rename2: bool,
    /// How long each write and fsync takes: a slow card.
    delay: std::time::Duration,
}

impl PowercutFs {
    pub fn new(state: Arc<Mutex<State>>, rename2: bool, delay: std::time::Duration) -> PowercutFs {
        PowercutFs {
            state,
            rename2,
            delay,
        }
    }

    /// Waits like a slow disk, outside the lock, so a cut still gets through.
    fn slow(&self) {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
    }

    fn state(&self) -> Result<MutexGuard<'_, State>, Errno> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.cut {
            Err(Errno::EIO)
        } else {
            Ok(state)
        }
    }
}

fn reply_empty(reply: ReplyEmpty, result: Result<(), Errno>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn reply_entry(reply: ReplyEntry, result: Result<FileAttr, Errno>) {
    match result {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for PowercutFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(
            reply,
            self.state().and_then(|mut s| s.lookup(parent.0, name)),
        );
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(node) = state.nodes.get_mut(&ino.0) {
            node.lookups = node.lookups.saturating_sub(nlookup);
            state.maybe_forget(ino.0);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.state().and_then(|s| s.attr(ino.0)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result = self
            .state()
            .and_then(|mut s| s.setattr(ino.0, mode, uid, gid, size, atime, mtime));
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let result = self
            .state()
            .and_then(|mut s| s.mkdir(parent.0, name, mode, umask, req.uid(), req.gid()));
        reply_entry(reply, result);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(
            reply,
            self.state()
                .and_then(|mut s| s.remove(parent.0, name, false)),
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(
            reply,
            self.state()
                .and_then(|mut s| s.remove(parent.0, name, true)),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let supported = RenameFlags::RENAME_NOREPLACE | RenameFlags::RENAME_EXCHANGE;
        let result = if !flags.is_empty() && (!self.rename2 || !supported.contains(flags)) {
            Err(Errno::EINVAL)
        } else {
            self.state()
                .and_then(|mut s| s.rename(parent.0, name, newparent.0, newname, flags.bits()))
        };
        reply_empty(reply, result);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply_entry(
            reply,
            self.state()
                .and_then(|mut s| s.link(ino.0, newparent.0, newname)),
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.state().and_then(|mut s| s.open(ino.0, flags.0)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.state().and_then(|s| s.read(fh.0, offset, size)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.slow();
        match self.state().and_then(|mut s| s.write(fh.0, offset, data)) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Also after a cut: closing must always succeed.
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.slow();
        reply_empty(reply, self.state().and_then(|mut s| s.fsync(ino.0)));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.state().and_then(|mut s| s.opendir(ino.0)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut state = match self.state() {
            Ok(s) => s,
            Err(e) => return reply.error(e),
        };
        let entries = match state.readdir(fh.0, offset) {
            Ok(entries) => entries,
            Err(e) => return reply.error(e),
        };
        for (i, entry) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(entry.ino), i as u64 + 1, entry.kind, &entry.name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .listings
            .remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.state().and_then(|mut s| s.fsyncdir(ino.0)));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.state().and_then(|s| s.statfs()) {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                st.f_bsize as u32,
                st.f_namemax as u32,
                st.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let result = self
            .state()
            .and_then(|mut s| s.create(parent.0, name, mode, umask, flags, req.uid(), req.gid()));
        match result {
            Ok((attr, fh)) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }
}
