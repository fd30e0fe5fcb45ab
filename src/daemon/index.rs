//! The index: one append-only log that is both the deduplication index and the republish outbox.
//!
//! Each line is a record with its own CRC-32:
//!
//! ```text
//! I <sha256> <size> <name> <received_ms> <camera> <topic hex> <crc>
//!                                  the image with this content is stored as <name>, from <topic> (its
//!                                  publishes are pending: the republish, and the event when events are on)
//! S <sha256> <size> <name> <crc>   the same without where it came from, as versions before 0.2 wrote it
//! P <sha256> <crc>                 its publishes were confirmed by the broker
//! C <sha256> <size> <name> <crc>   stored and confirmed at once, as compaction writes it
//! ```
//!
//! An `I` record carries what a publish after a restart needs: the camera names its stored topic, and the
//! event names the upload topic and the receive time. One entry stands for all publishes of its image: it is
//! confirmed (`P`) only once the broker has confirmed each of them, so there is one outbox and one rule for
//! it; after a crash every publish of a pending entry goes out again (at least once, as QoS 1 promises). An
//! `S` record of an earlier version is republished with the camera [`layout::DEFAULT_CAMERA`] and no event:
//! where it came from was never recorded.
//!
//! An `S` record is fsynced *before* the image's temp file is renamed to `<name>`, so after a crash every
//! stored image has its record. An unconfirmed record whose file is missing, or holds other bytes (the name
//! was taken, and the crash came before the next name's record), belongs to a rename that never became
//! durable (its upload was never acknowledged) and is dropped. `P` records are not fsynced: losing one only
//! means a second republish. A torn last line (a crash mid-append) or a corrupted record fails its checksum
//! and is skipped with a warning, never trusted; an append never glues a record to the fragment a failed
//! append left behind (see [`Index::append`]). An `S` record without its `P` is the durable outbox entry that
//! lets imaged acknowledge an upload before the broker has confirmed the republish.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::storage::{self, hex, Context, PathError};

/// Where and when a stored image came from: what its publishes need after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Receive time, Unix ms.
    pub at_ms: u64,
    /// As [`crate::layout::camera`] names it: safe levels joined by `/`, never empty.
    pub camera: String,
    /// The upload topic.
    pub topic: String,
}

pub type Hash = [u8; 32];

pub const FILE_NAME: &str = "index.log";

/// One parsed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Stored {
        hash: Hash,
        size: u64,
        name: String,
        confirmed: bool,
        /// Written for pending entries (`I`); `None` for `S` and `C` records.
        origin: Option<Origin>,
    },
    Confirmed {
        hash: Hash,
    },
}

impl Record {
    /// The record as one line, checksum and newline included.
    pub fn encode(&self) -> String {
        let body = match self {
            Record::Stored {
                hash,
                size,
                name,
                confirmed: false,
                origin: Some(o),
            } => format!(
                "I {} {size} {name} {} {} {}",
                hex(hash),
                o.at_ms,
                o.camera,
                hex(o.topic.as_bytes())
            ),
            Record::Stored {
                hash,
                size,
                name,
                confirmed,
                ..
            } => {
                format!(
                    "{} {} {size} {name}",
                    if *confirmed { 'C' } else { 'S' },
                    hex(hash)
                )
            }
            Record::Confirmed { hash } => format!("P {}", hex(hash)),
        };
        storage::checked_line(&body)
    }

    /// Parses one line (without its newline); `None` for anything torn, corrupted or unknown.
    pub fn decode(line: &[u8]) -> Option<Record> {
        let mut fields = storage::checked_body(line)?.split(' ');
        let record = match fields.next()? {
            kind @ ("S" | "C") => {
                let hash = storage::parse_hash(fields.next()?)?;
                let size = fields.next()?.parse().ok()?;
                let name = fields.next()?.to_string();
                if !storage::is_stored_name(&name) {
                    return None;
                }
                Record::Stored {
                    hash,
                    size,
                    name,
                    confirmed: kind == "C",
                    origin: None,
                }
            }
            "I" => {
                let hash = storage::parse_hash(fields.next()?)?;
                let size = fields.next()?.parse().ok()?;
                let name = fields.next()?.to_string();
                let at_ms = fields.next()?.parse().ok()?;
                let camera = fields.next()?.to_string();
                let topic = String::from_utf8(unhex(fields.next()?)?).ok()?;
                if !storage::is_stored_name(&name) || camera.is_empty() {
                    return None;
                }
                Record::Stored {
                    hash,
                    size,
                    name,
                    confirmed: false,
                    origin: Some(Origin {
                        at_ms,
                        camera,
                        topic,
                    }),
                }
            }
            "P" => Record::Confirmed {
                hash: storage::parse_hash(fields.next()?)?,
            },
            _ => return None,
        };
        fields.next().is_none().then_some(record)
    }
}

/// Bytes from lowercase hex, as [`hex`] writes them.
fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            let pair = s.get(i..i + 2)?;
            // from_str_radix takes a sign and upper case; hex writes neither.
            pair.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                .then(|| u8::from_str_radix(pair, 16).ok())?
        })
        .collect()
}

/// What the index knows of one stored image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub size: u64,
    pub confirmed: bool,
    /// Kept while its publishes are pending (dropped once confirmed: dedup needs only name and size).
    pub origin: Option<Origin>,
}

/// A new image for [`Index::record_stored`].
#[derive(Debug, Clone)]
pub struct NewImage {
    pub hash: Hash,
    pub size: u64,
    pub name: String,
    pub origin: Option<Origin>,
}

/// The state a log describes, rebuilt from its records in order.
#[derive(Debug, Default)]
pub struct Replayed {
    pub entries: HashMap<Hash, Entry>,
    /// Hashes from oldest to newest stored, each once.
    pub order: VecDeque<Hash>,
    pub records: usize,
    pub bad_records: usize,
    /// Bytes of whole lines; anything after is a torn tail.
    pub good_len: u64,
}

/// Reads a log, skipping what does not check out. Never fails on content, only on I/O.
pub fn replay(reader: impl Read) -> io::Result<Replayed> {
    let mut out = Replayed::default();
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            break; // end, or a torn last line
        }
        out.good_len += n as u64;
        match Record::decode(&line[..n - 1]) {
            Some(record) => {
                out.records += 1;
                apply(&mut out, record);
            }
            None => out.bad_records += 1,
        }
    }
    Ok(out)
}

fn apply(state: &mut Replayed, record: Record) {
    match record {
        Record::Stored {
            hash,
            size,
            name,
            confirmed,
            origin,
        } => {
            if state
                .entries
                .insert(
                    hash,
                    Entry {
                        name,
                        size,
                        confirmed,
                        origin,
                    },
                )
                .is_none()
            {
                state.order.push_back(hash);
            }
        }
        Record::Confirmed { hash } => {
            if let Some(entry) = state.entries.get_mut(&hash) {
                entry.confirmed = true;
                entry.origin = None;
            }
        }
    }
}

/// The open index of one storage folder.
pub struct Index {
    path: PathBuf,
    file: File,
    /// Length of the file up to the end of the last record we wrote or read whole: where the next record
    /// goes. The file is longer only after a failed append (see [`Index::append`]).
    len: u64,
    records: usize,
    entries: HashMap<Hash, Entry>,
    order: VecDeque<Hash>,
    window: usize,
}

/// What opening the index found, for the start-up log.
#[derive(Debug, Default)]
pub struct Recovery {
    pub entries: usize,
    pub bad_records: usize,
    pub torn_bytes: u64,
    /// Records whose file is missing: renames a crash undid.
    pub dropped: Vec<String>,
    /// Stored images whose publishes were never confirmed, oldest first.
    pub unconfirmed: Vec<(Hash, String)>,
}

impl Index {
    /// Opens (or creates) the index in `state_dir` for images in `image_dir`, recovering from a crash.
    pub fn open(
        state_dir: &Path,
        image_dir: &Path,
        window: usize,
    ) -> Result<(Index, Recovery), PathError> {
        let path = state_dir.join(FILE_NAME);
        // Only imaged reads its index, whatever the umask.
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .at("open", &path)?;
        // The log's name is durable only once its folder is fsynced: after it was created here, and after a
        // compaction whose run died before its own fsync of the folder. Without this, records fsynced from now
        // on could vanish at a power cut with the name (or come back as the log before the compaction), and
        // with them the dedup index and the outbox of images already acknowledged.
        storage::sync_dir(state_dir)?;
        let replayed = replay(&mut file).at("read", &path)?;
        let file_len = file.metadata().at("stat", &path)?.len();
        let mut recovery = Recovery {
            bad_records: replayed.bad_records,
            torn_bytes: file_len - replayed.good_len,
            ..Recovery::default()
        };
        if recovery.torn_bytes > 0 {
            // A torn last line would glue itself to the next record: cut it off first.
            file.set_len(replayed.good_len)
                .at("truncate the torn end of", &path)?;
        }
        let mut index = Index {
            path,
            file,
            len: replayed.good_len,
            records: replayed.records,
            entries: replayed.entries,
            order: replayed.order,
            window,
        };
        // An unconfirmed record whose file is not there, or is not this image, was never acknowledged:
        // forget it. Content, not size: the record is durable before its rename, and when the name turned out
        // to be taken (the name counter restarts after a restart within the same UTC second, or the clock
        // stepped back) and imaged died before the next name's record, another file of the same size may
        // stand under the name; trusting it would ack the redelivered image as a duplicate and republish the
        // other bytes. Only unconfirmed records can be in that window (a republish is confirmed only after
        // its image was committed), so this reads and hashes the outbox's files once per start: usually the
        // last few hundred images, more when republishes went unconfirmed for long.
        let mut missing = Vec::new();
        for (hash, entry) in &index.entries {
            if !entry.confirmed && !file_holds(&image_dir.join(&entry.name), entry.size, hash)? {
                missing.push(*hash);
            }
        }
        for hash in missing {
            if let Some(entry) = index.entries.remove(&hash) {
                recovery.dropped.push(entry.name);
            }
        }
        index.order.retain(|h| index.entries.contains_key(h));
        index.evict();
        recovery.entries = index.entries.len();
        recovery.unconfirmed = index
            .order
            .iter()
            .filter_map(|h| {
                index
                    .entries
                    .get(h)
                    .filter(|e| !e.confirmed)
                    .map(|e| (*h, e.name.clone()))
            })
            .collect();
        if index.records > 2 * index.entries.len() + 1024
            || recovery.bad_records > 0
            || !recovery.dropped.is_empty()
        {
            index.compact()?;
        }
        Ok((index, recovery))
    }

    pub fn get(&self, hash: &Hash) -> Option<&Entry> {
        self.entries.get(hash)
    }

    /// The remembered images, newest first.
    pub fn newest(&self) -> impl Iterator<Item = (&Hash, &Entry)> {
        self.order
            .iter()
            .rev()
            .filter_map(|h| self.entries.get(h).map(|e| (h, e)))
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Makes `Stored` records durable (one write, one fsync), then remembers them. On error nothing is
    /// remembered and the file is cut back, so a retry starts clean.
    pub fn record_stored(&mut self, stored: &[NewImage]) -> Result<(), PathError> {
        let text: String = stored
            .iter()
            .map(|image| {
                Record::Stored {
                    hash: image.hash,
                    size: image.size,
                    name: image.name.clone(),
                    confirmed: false,
                    origin: image.origin.clone(),
                }
                .encode()
            })
            .collect();
        self.append(text.as_bytes(), true)?;
        for image in stored {
            let entry = Entry {
                name: image.name.clone(),
                size: image.size,
                confirmed: false,
                origin: image.origin.clone(),
            };
            if self.entries.insert(image.hash, entry).is_none() {
                self.order.push_back(image.hash);
            }
        }
        self.records += stored.len();
        self.evict();
        self.maybe_compact()
    }

    /// Notes images whose publishes are all confirmed. Not fsynced: a lost `P` costs one more republish (and
    /// event) after a crash.
    pub fn record_confirmed(&mut self, hashes: &[Hash]) -> Result<(), PathError> {
        let mut text = String::new();
        for hash in hashes {
            if let Some(entry) = self.entries.get_mut(hash) {
                if !entry.confirmed {
                    entry.confirmed = true;
                    entry.origin = None;
                    text.push_str(&Record::Confirmed { hash: *hash }.encode());
                    self.records += 1;
                }
            }
        }
        if text.is_empty() {
            return Ok(());
        }
        self.append(text.as_bytes(), false)?;
        self.evict();
        self.maybe_compact()
    }

    /// Appends whole records. A record must start a line: one written after the fragment of an append that
    /// failed part-way would be glued to it, fail its checksum on replay and be lost. A failed append cuts
    /// its fragment off, but that can fail too; so before each append the file's end is checked against
    /// `len`, and a stray tail is cut off, or, when even that fails, the records start on a new line, which
    /// leaves the fragment a line of its own that replay skips as corrupt.
    fn append(&mut self, records: &[u8], sync: bool) -> Result<(), PathError> {
        let end = self.file.metadata().at("stat", &self.path)?.len();
        let new_line = match tail_before_append(self.len, end) {
            Tail::Clean => false,
            Tail::CutBack => self.file.set_len(self.len).is_err(),
            Tail::NewLine => true,
        };
        let bytes = if new_line {
            // The file ends at `end`, whatever `len` said: where this append goes.
            self.len = end;
            Cow::Owned([&b"\n"[..], records].concat())
        } else {
            Cow::Borrowed(records)
        };
        let result =
            self.file
                .write_all(&bytes)
                .and_then(|()| if sync { self.file.sync_data() } else { Ok(()) });
        match result {
            Ok(()) => {
                self.len += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Best effort: the next append checks the end again.
                let _ = self.file.set_len(self.len);
                Err(e).at(if sync { "write and fsync" } else { "write" }, &self.path)
            }
        }
    }

    /// Forgets the oldest confirmed entries beyond the dedup window. Unconfirmed ones are the outbox and stay.
    fn evict(&mut self) {
        let mut skipped = 0;
        while self.entries.len() > self.window && skipped < self.order.len() {
            let Some(hash) = self.order.pop_front() else {
                break;
            };
            match self.entries.get(&hash) {
                Some(e) if e.confirmed => {
                    self.entries.remove(&hash);
                }
                Some(_) => {
                    self.order.push_back(hash);
                    skipped += 1;
                }
                None => {}
            }
        }
    }

    fn maybe_compact(&mut self) -> Result<(), PathError> {
        if self.records > 2 * self.entries.len() + 1024 {
            self.compact()?;
        }
        Ok(())
    }

    /// Rewrites the log with only what is remembered: temp file, fsync, rename over, fsync the folder.
    fn compact(&mut self) -> Result<(), PathError> {
        let mut text = String::new();
        for hash in &self.order {
            if let Some(e) = self.entries.get(hash) {
                let record = Record::Stored {
                    hash: *hash,
                    size: e.size,
                    name: e.name.clone(),
                    confirmed: e.confirmed,
                    origin: e.origin.clone(),
                };
                text.push_str(&record.encode());
            }
        }
        let records = self.entries.len();
        storage::replace_file(&self.path, text.as_bytes(), 0o600)?;
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&self.path)
            .at("open", &self.path)?;
        self.len = file.seek(SeekFrom::End(0)).at("seek", &self.path)?;
        self.file = file;
        self.records = records;
        Ok(())
    }
}

/// What an append must do first, given where the index believes the log ends and where it does end.
#[derive(Debug, PartialEq, Eq)]
enum Tail {
    Clean,
    /// A failed append left bytes after the last record: cut them off (and start a new line if that fails).
    CutBack,
    /// Shorter than believed, so it may end inside a record: start a new line.
    NewLine,
}

fn tail_before_append(believed: u64, end: u64) -> Tail {
    match end.cmp(&believed) {
        std::cmp::Ordering::Equal => Tail::Clean,
        std::cmp::Ordering::Greater => Tail::CutBack,
        std::cmp::Ordering::Less => Tail::NewLine,
    }
}

/// Whether `path` is a file of `size` bytes with SHA-256 `hash`. A missing file is `false`; one that cannot
/// be read is an error, not a verdict: dropping an acknowledged image's record on a read error would lose its
/// republish.
fn file_holds(path: &Path, size: u64, hash: &Hash) -> Result<bool, PathError> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).at("stat", path),
    };
    // Size first: it settles a missing or cut file without reading it.
    if !meta.is_file() || meta.len() != size {
        return Ok(false);
    }
    let mut file = File::open(path).at("open", path)?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher).at("read", path)?;
    Ok(hasher.finalize()[..] == hash[..])
}

/// The names of the stored images whose republish is not confirmed, read from the index of `state_dir`
/// without changing it (for `imaged prune` while no daemon runs).
pub fn outbox_names(state_dir: &Path) -> Result<Vec<String>, PathError> {
    let path = state_dir.join(FILE_NAME);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).at("open", &path),
    };
    let replayed = replay(file).at("read", &path)?;
    Ok(replayed
        .entries
        .into_values()
        .filter(|e| !e.confirmed)
        .map(|e| e.name)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u8) -> Hash {
        [n; 32]
    }

    /// An image as an earlier version recorded it: no origin.
    fn img(hash: Hash, size: u64, name: impl Into<String>) -> NewImage {
        NewImage {
            hash,
            size,
            name: name.into(),
            origin: None,
        }
    }

    fn sha(bytes: &[u8]) -> Hash {
        Sha256::digest(bytes).into()
    }

    /// Appends bytes without a newline through a handle of its own, as an append that failed part-way and
    /// could not be cut back leaves them.
    fn leave_fragment(state: &Path, fragment: &[u8]) {
        let mut raw = fs::OpenOptions::new()
            .append(true)
            .open(state.join(FILE_NAME))
            .unwrap();
        raw.write_all(fragment).unwrap();
    }

    #[test]
    fn records_round_trip_through_their_encoding() {
        let records = [
            Record::Stored {
                hash: h(7),
                size: 1234,
                name: "image_20261125-165005-2.jpg".into(),
                confirmed: false,
                origin: None,
            },
            Record::Confirmed { hash: h(9) },
            Record::Stored {
                hash: h(8),
                size: 1,
                name: "a.jpg".into(),
                confirmed: true,
                origin: None,
            },
        ];
        for record in records {
            let line = record.encode();
            assert!(line.ends_with('\n'));
            assert_eq!(Record::decode(line.trim_end().as_bytes()), Some(record));
        }
    }

    #[test]
    fn a_flipped_bit_makes_a_record_unreadable() {
        let line = Record::Stored {
            hash: h(1),
            size: 5,
            name: "a.jpg".into(),
            confirmed: false,
            origin: None,
        }
        .encode();
        let mut bytes = line.trim_end().as_bytes().to_vec();
        for i in 0..bytes.len() {
            bytes[i] ^= 0x01;
            assert_eq!(Record::decode(&bytes), None, "flip at {i}");
            bytes[i] ^= 0x01;
        }
    }

    #[test]
    fn a_torn_tail_and_a_corrupt_record_are_skipped_and_the_rest_is_kept() {
        let mut log = String::new();
        log += &Record::Stored {
            hash: h(1),
            size: 1,
            name: "a.jpg".into(),
            confirmed: false,
            origin: None,
        }
        .encode();
        log += "S garbage that is not a record\n";
        log += &Record::Stored {
            hash: h(2),
            size: 2,
            name: "b.jpg".into(),
            confirmed: false,
            origin: None,
        }
        .encode();
        log += &Record::Confirmed { hash: h(1) }.encode();
        let whole = log.len() as u64;
        log += &Record::Stored {
            hash: h(3),
            size: 3,
            name: "c.jpg".into(),
            confirmed: false,
            origin: None,
        }
        .encode()[..20];
        let replayed = replay(log.as_bytes()).unwrap();
        assert_eq!(replayed.records, 3);
        assert_eq!(replayed.bad_records, 1);
        assert_eq!(replayed.good_len, whole);
        assert!(replayed.entries[&h(1)].confirmed);
        assert!(!replayed.entries[&h(2)].confirmed);
        assert!(!replayed.entries.contains_key(&h(3)));
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_replay_without_panic_and_every_accepted_record_round_trips(log in proptest::collection::vec(proptest::num::u8::ANY, 0..2000)) {
            let replayed = replay(&log[..]).unwrap();
            proptest::prop_assert!(replayed.good_len <= log.len() as u64);
            for line in log[..usize::try_from(replayed.good_len).unwrap()].split(|b| *b == b'\n') {
                if let Some(record) = Record::decode(line) {
                    let encoded = record.encode();
                    proptest::prop_assert_eq!(encoded.trim_end().as_bytes(), line);
                }
            }
        }

        #[test]
        fn a_valid_log_cut_or_corrupted_anywhere_loses_only_the_damaged_records(
            n in 1usize..20, cut in proptest::num::usize::ANY, flip in proptest::num::usize::ANY,
        ) {
            let records: Vec<Record> = (0..n)
                .map(|i| Record::Stored { hash: [u8::try_from(i).unwrap(); 32], size: i as u64, name: format!("{i}.jpg"), confirmed: false, origin: None })
                .collect();
            let mut log: Vec<u8> = records.iter().flat_map(|r| r.encode().into_bytes()).collect();
            log.truncate(cut % (log.len() + 1));
            if !log.is_empty() {
                let at = flip % log.len();
                log[at] ^= 0x20;
            }
            let replayed = replay(&log[..]).unwrap();
            // At most the flipped record and the torn one are missing, and nothing that was not written appears.
            proptest::prop_assert!(replayed.entries.len() + 2 >= log.iter().filter(|b| **b == b'\n').count().min(n));
            for (hash, entry) in &replayed.entries {
                let i = hash[0] as usize;
                let expected = format!("{i}.jpg");
                proptest::prop_assert!(i < n && *hash == [hash[0]; 32] && entry.name == expected);
            }
        }
    }

    #[test]
    fn a_name_that_leaves_the_storage_folder_is_not_trusted() {
        let line = Record::Stored {
            hash: h(1),
            size: 1,
            name: "../../etc/passwd".into(),
            confirmed: false,
            origin: None,
        }
        .encode();
        assert_eq!(Record::decode(line.trim_end().as_bytes()), None);
    }

    #[test]
    fn recovery_drops_records_whose_file_never_appeared_and_lists_the_outbox() {
        let images = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        fs::write(images.path().join("a.jpg"), b"aa").unwrap();
        fs::write(images.path().join("c.jpg"), b"ccc").unwrap();
        {
            let (mut index, _) = Index::open(state.path(), images.path(), 100).unwrap();
            index
                .record_stored(&[
                    img(sha(b"aa"), 2, "a.jpg"),
                    img(sha(b"bb"), 2, "b.jpg"),
                    img(sha(b"ccc"), 3, "c.jpg"),
                ])
                .unwrap();
            index.record_confirmed(&[sha(b"ccc")]).unwrap();
        }
        leave_fragment(state.path(), b"S 0102 torn");

        let (index, recovery) = Index::open(state.path(), images.path(), 100).unwrap();
        assert_eq!(recovery.dropped, vec!["b.jpg".to_string()]);
        assert_eq!(
            recovery.unconfirmed,
            vec![(sha(b"aa"), "a.jpg".to_string())]
        );
        assert_eq!(recovery.torn_bytes, 11);
        assert!(index.get(&sha(b"ccc")).unwrap().confirmed);
        assert!(index.get(&sha(b"bb")).is_none());

        // What recovery decided is what the next start reads.
        drop(index);
        let (_, again) = Index::open(state.path(), images.path(), 100).unwrap();
        assert!(again.dropped.is_empty());
        assert_eq!(again.bad_records, 0);
        assert_eq!(again.unconfirmed.len(), 1);
    }

    fn origin(camera: &str) -> Origin {
        Origin {
            at_ms: 1_795_000_000_123,
            camera: camera.into(),
            topic: format!("image/upload/{camera} with spaces\nand a newline"),
        }
    }

    #[test]
    fn an_image_records_where_it_came_from_until_its_publishes_are_confirmed() {
        let record = Record::Stored {
            hash: h(4),
            size: 9,
            name: "cam1/a.jpg".into(),
            confirmed: false,
            origin: Some(origin("cam1")),
        };
        let line = record.encode();
        assert!(line.starts_with("I "), "{line}");
        assert_eq!(line.matches('\n').count(), 1, "the topic is hex: one line");
        assert_eq!(Record::decode(line.trim_end().as_bytes()), Some(record));
        for bad in ["I x", "I 00 1 a.jpg 5 cam 6", "I 00 1 a.jpg 5 cam 6g"] {
            assert_eq!(
                Record::decode(storage::checked_line(bad).trim_end().as_bytes()),
                None
            );
        }
        assert_eq!(unhex("41Aa"), None, "only lower-case hex");
        assert_eq!(unhex("+1"), None);
    }

    #[test]
    fn an_outbox_an_earlier_version_wrote_still_recovers_beside_new_records() {
        let images = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        fs::write(images.path().join("old.jpg"), b"old").unwrap();
        fs::write(images.path().join("new.jpg"), b"new").unwrap();
        // What the version before origins wrote: S and C records.
        let old = Record::Stored {
            hash: sha(b"old"),
            size: 3,
            name: "old.jpg".into(),
            confirmed: false,
            origin: None,
        }
        .encode();
        assert!(old.starts_with("S "));
        fs::write(state.path().join(FILE_NAME), &old).unwrap();
        {
            let (mut index, recovery) = Index::open(state.path(), images.path(), 100).unwrap();
            assert_eq!(
                recovery.unconfirmed,
                vec![(sha(b"old"), "old.jpg".to_string())]
            );
            assert_eq!(index.get(&sha(b"old")).unwrap().origin, None);
            index
                .record_stored(&[NewImage {
                    hash: sha(b"new"),
                    size: 3,
                    name: "new.jpg".into(),
                    origin: Some(origin("cam1")),
                }])
                .unwrap();
            // Compaction keeps a pending entry's origin.
            index.compact().unwrap();
        }
        let (mut index, recovery) = Index::open(state.path(), images.path(), 100).unwrap();
        assert_eq!(recovery.unconfirmed.len(), 2);
        assert_eq!(index.get(&sha(b"old")).unwrap().origin, None);
        assert_eq!(
            index.get(&sha(b"new")).unwrap().origin,
            Some(origin("cam1"))
        );
        // Once confirmed, dedup needs only name and size.
        index.record_confirmed(&[sha(b"new")]).unwrap();
        assert_eq!(index.get(&sha(b"new")).unwrap().origin, None);
        drop(index);
        let (index, _) = Index::open(state.path(), images.path(), 100).unwrap();
        assert!(index.get(&sha(b"new")).unwrap().confirmed);
    }

    #[test]
    fn the_window_forgets_old_confirmed_images_but_never_the_outbox() {
        let images = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let (mut index, _) = Index::open(state.path(), images.path(), 3).unwrap();
        for n in 0..10u8 {
            index
                .record_stored(&[img(h(n), 1, format!("{n}.jpg"))])
                .unwrap();
            if n % 2 == 0 {
                index.record_confirmed(&[h(n)]).unwrap();
            }
        }
        for n in (1..10u8).step_by(2) {
            assert!(index.get(&h(n)).is_some(), "unconfirmed {n} must stay");
        }
        assert!(index.get(&h(0)).is_none());
        assert!(index.len() <= 6);
    }

    #[test]
    fn compaction_keeps_what_is_remembered() {
        let images = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let (mut index, _) = Index::open(state.path(), images.path(), 10).unwrap();
        for n in 0..200u16 {
            let mut hash = [0u8; 32];
            hash[..2].copy_from_slice(&n.to_be_bytes());
            fs::write(images.path().join(format!("{n}.jpg")), b"x").unwrap();
            index
                .record_stored(&[img(hash, 1, format!("{n}.jpg"))])
                .unwrap();
            index.record_confirmed(&[hash]).unwrap();
        }
        index.compact().unwrap();
        drop(index);
        let (index, recovery) = Index::open(state.path(), images.path(), 10).unwrap();
        assert_eq!(recovery.bad_records, 0);
        assert_eq!(index.len(), 10);
        let size = fs::metadata(state.path().join(FILE_NAME)).unwrap().len();
        assert!(size < 3000, "compacted log is {size} bytes");
    }

    #[test]
    fn recovery_drops_a_record_whose_name_holds_other_bytes_of_the_same_size() {
        let images = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        // An earlier run stored this under the name; after a restart within the same second the counter
        // handed the name out again, and imaged died between the new record and the next name's.
        fs::write(images.path().join("image_1.jpg"), b"earlier").unwrap();
        {
            let (mut index, _) = Index::open(state.path(), images.path(), 100).unwrap();
            index
                .record_stored(&[img(sha(b"the new"), 7, "image_1.jpg")])
                .unwrap();
        }
        let (index, recovery) = Index::open(state.path(), images.path(), 100).unwrap();
        assert_eq!(recovery.dropped, vec!["image_1.jpg".to_string()]);
        assert!(recovery.unconfirmed.is_empty(), "nothing to republish");
        assert!(
            index.get(&sha(b"the new")).is_none(),
            "a redelivery is stored, not taken for a duplicate"
        );
    }

    #[test]
    fn an_append_cuts_off_what_follows_the_last_record_and_starts_a_new_line_after_a_short_log() {
        assert_eq!(tail_before_append(100, 100), Tail::Clean);
        assert_eq!(tail_before_append(100, 111), Tail::CutBack);
        assert_eq!(tail_before_append(100, 90), Tail::NewLine);
    }

    #[test]
    fn a_fragment_left_by_a_failed_append_never_swallows_the_next_record() {
        let images = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        for (name, bytes) in [("a.jpg", b"aaaa"), ("b.jpg", b"bbbb")] {
            fs::write(images.path().join(name), bytes).unwrap();
        }
        let (mut index, _) = Index::open(state.path(), images.path(), 100).unwrap();
        index
            .record_stored(&[img(sha(b"aaaa"), 4, "a.jpg")])
            .unwrap();
        leave_fragment(state.path(), b"S 0102 torn");
        index
            .record_stored(&[img(sha(b"bbbb"), 4, "b.jpg")])
            .unwrap();
        index.record_confirmed(&[sha(b"aaaa")]).unwrap();
        drop(index);

        let (index, recovery) = Index::open(state.path(), images.path(), 100).unwrap();
        assert!(index.get(&sha(b"aaaa")).unwrap().confirmed);
        assert!(
            index.get(&sha(b"bbbb")).is_some(),
            "the record after the fragment"
        );
        assert!(recovery.dropped.is_empty());
        assert_eq!(recovery.bad_records, 0, "the fragment was cut off");
    }

    /// Sets or clears the append-only attribute (`chattr +a`): the file still takes appends but refuses to be
    /// cut, so an append's attempt to cut back fails as it can on a failing disk. `Err` where that needs what
    /// this machine lacks (root, a filesystem with the attribute).
    fn set_append_only(path: &Path, on: bool) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        const FS_APPEND_FL: libc::c_int = 0x20;
        let file = File::open(path)?;
        let mut flags: libc::c_int = 0;
        // SAFETY: FS_IOC_GETFLAGS and FS_IOC_SETFLAGS read and write one int, which lives in this frame.
        unsafe {
            if libc::ioctl(file.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) != 0 {
                return Err(io::Error::last_os_error());
            }
            flags = if on {
                flags | FS_APPEND_FL
            } else {
                flags & !FS_APPEND_FL
            };
            if libc::ioctl(file.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Clears the append-only attribute again, so that the reopen can compact and the folder be removed.
    struct AppendOnly(PathBuf);

    impl Drop for AppendOnly {
        fn drop(&mut self) {
            let _ = set_append_only(&self.0, false);
        }
    }

    #[test]
    fn a_fragment_that_cannot_be_cut_off_is_left_on_a_line_of_its_own() {
        let images = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        for (name, bytes) in [("a.jpg", b"aaaa"), ("b.jpg", b"bbbb"), ("c.jpg", b"cccc")] {
            fs::write(images.path().join(name), bytes).unwrap();
        }
        let log = state.path().join(FILE_NAME);
        let (mut index, _) = Index::open(state.path(), images.path(), 100).unwrap();
        index
            .record_stored(&[img(sha(b"aaaa"), 4, "a.jpg")])
            .unwrap();
        leave_fragment(state.path(), b"S 0102 torn");
        if let Err(e) = set_append_only(&log, true) {
            println!("SKIP: cannot make {} append-only here: {e}", log.display());
            return;
        }
        let guard = AppendOnly(log);
        index
            .record_stored(&[img(sha(b"bbbb"), 4, "b.jpg")])
            .unwrap();
        // Cutting works again: an append that trusted a stale length would now cut b's record off.
        drop(guard);
        index
            .record_stored(&[img(sha(b"cccc"), 4, "c.jpg")])
            .unwrap();
        drop(index);

        let (index, recovery) = Index::open(state.path(), images.path(), 100).unwrap();
        for bytes in [b"aaaa", b"bbbb", b"cccc"] {
            assert!(
                index.get(&sha(bytes)).is_some(),
                "{:?}",
                std::str::from_utf8(bytes)
            );
        }
        assert_eq!(recovery.bad_records, 1, "the fragment, on its own line");
        assert!(recovery.dropped.is_empty());
    }

    #[test]
    fn the_index_keeps_its_records_through_a_power_cut_after_the_start_that_created_it() {
        let Some(mut power) = storage::power_cut::Power::mount(|backing| {
            fs::create_dir_all(backing.join("images/.imaged")).unwrap();
        }) else {
            return;
        };
        let images = power.root().join("images");
        let state = images.join(".imaged");
        let (mut index, _) = Index::open(&state, &images, 100).unwrap();
        index
            .record_stored(&[img(sha(b"aaaa"), 4, "a.jpg")])
            .unwrap();
        // The committer's rename, and the folder's fsync before the ack.
        let temp = storage::write_temp(&images, b"aaaa", 0o640).unwrap();
        storage::persist(temp, &images, "a.jpg").unwrap();
        storage::sync_dir(&images).unwrap();
        drop(index);
        power.cut_and_reboot();

        let (index, recovery) = Index::open(&state, &images, 100).unwrap();
        assert_eq!(
            recovery.unconfirmed,
            vec![(sha(b"aaaa"), "a.jpg".to_string())]
        );
        assert!(index.get(&sha(b"aaaa")).is_some());
    }

    #[test]
    fn records_appended_after_a_compaction_whose_folder_fsync_never_came_survive_a_power_cut() {
        let old = Record::Stored {
            hash: sha(b"aaaa"),
            size: 4,
            name: "a.jpg".into(),
            confirmed: false,
            origin: None,
        };
        let Some(mut power) = storage::power_cut::Power::mount(|backing| {
            fs::create_dir_all(backing.join("images/.imaged")).unwrap();
            fs::write(backing.join("images/a.jpg"), b"aaaa").unwrap();
            fs::write(backing.join("images/.imaged").join(FILE_NAME), old.encode()).unwrap();
        }) else {
            return;
        };
        let images = power.root().join("images");
        let state = images.join(".imaged");
        // A compaction renamed its log over the old one, and imaged died before it fsynced the folder.
        let compacted = Record::Stored {
            hash: sha(b"aaaa"),
            size: 4,
            name: "a.jpg".into(),
            confirmed: true,
            origin: None,
        };
        let temp = storage::write_temp(&state, compacted.encode().as_bytes(), 0o600).unwrap();
        temp.persist(state.join(FILE_NAME)).unwrap();

        // The restart, and an image stored after it.
        let (mut index, _) = Index::open(&state, &images, 100).unwrap();
        index
            .record_stored(&[img(sha(b"bbbb"), 4, "b.jpg")])
            .unwrap();
        let temp = storage::write_temp(&images, b"bbbb", 0o640).unwrap();
        storage::persist(temp, &images, "b.jpg").unwrap();
        storage::sync_dir(&images).unwrap();
        drop(index);
        power.cut_and_reboot();

        let (index, recovery) = Index::open(&state, &images, 100).unwrap();
        assert_eq!(
            recovery.unconfirmed,
            vec![(sha(b"bbbb"), "b.jpg".to_string())],
            "the outbox entry of the image stored after the restart"
        );
        assert!(index.get(&sha(b"aaaa")).unwrap().confirmed);
    }
}
