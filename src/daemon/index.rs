//! The index: one append-only log that is both the deduplication index and the republish outbox.
//!
//! Each line is a record with its own CRC-32:
//!
//! ```text
//! S <sha256> <size> <name> <crc>   the image with this content is stored as <name> (republish pending)
//! P <sha256> <crc>                 its republish was confirmed by the broker
//! C <sha256> <size> <name> <crc>   both at once, as compaction writes them
//! ```
//!
//! An `S` record is fsynced *before* the image's temp file is renamed to `<name>`, so after a crash every
//! stored image has its record; a record whose file is missing belongs to a rename that never became durable
//! (its upload was never acknowledged) and is dropped. `P` records are not fsynced: losing one only means a
//! second republish. A torn tail or a corrupted record is skipped with a warning, never trusted.
//! An `S` record without its `P` is the durable outbox entry that lets imaged acknowledge an upload before the
//! broker has confirmed the republish.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::storage::{self, hex, Context, PathError};

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
                confirmed,
            } => {
                format!(
                    "{} {} {size} {name}",
                    if *confirmed { 'C' } else { 'S' },
                    hex(hash)
                )
            }
            Record::Confirmed { hash } => format!("P {}", hex(hash)),
        };
        let crc = crc32fast::hash(body.as_bytes());
        format!("{body} {crc:08x}\n")
    }

    /// Parses one line (without its newline); `None` for anything torn, corrupted or unknown.
    pub fn decode(line: &[u8]) -> Option<Record> {
        let line = std::str::from_utf8(line).ok()?;
        let (body, crc) = line.rsplit_once(' ')?;
        if crc.len() != 8 || u32::from_str_radix(crc, 16).ok()? != crc32fast::hash(body.as_bytes())
        {
            return None;
        }
        let mut fields = body.split(' ');
        let record = match fields.next()? {
            kind @ ("S" | "C") => {
                let hash = parse_hash(fields.next()?)?;
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
                }
            }
            "P" => Record::Confirmed {
                hash: parse_hash(fields.next()?)?,
            },
            _ => return None,
        };
        fields.next().is_none().then_some(record)
    }
}

fn parse_hash(s: &str) -> Option<Hash> {
    if s.len() != 64 {
        return None;
    }
    let mut hash = [0u8; 32];
    for (i, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(hash)
}

/// What the index knows of one stored image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub size: u64,
    pub confirmed: bool,
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
        } => {
            if state
                .entries
                .insert(
                    hash,
                    Entry {
                        name,
                        size,
                        confirmed,
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
            }
        }
    }
}

/// The open index of one storage folder.
pub struct Index {
    path: PathBuf,
    file: File,
    /// Length of the file up to the last complete record we wrote or read.
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
    /// Stored images whose republish was never confirmed, oldest first.
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
        // An unconfirmed record whose file is not there was never acknowledged: forget it.
        let missing: Vec<Hash> = index
            .entries
            .iter()
            .filter(|(_, e)| !e.confirmed && !file_matches(&image_dir.join(&e.name), e.size))
            .map(|(h, _)| *h)
            .collect();
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
    pub fn record_stored(&mut self, stored: &[(Hash, u64, String)]) -> Result<(), PathError> {
        let text: String = stored
            .iter()
            .map(|(hash, size, name)| {
                Record::Stored {
                    hash: *hash,
                    size: *size,
                    name: name.clone(),
                    confirmed: false,
                }
                .encode()
            })
            .collect();
        self.append(text.as_bytes(), true)?;
        for (hash, size, name) in stored {
            let entry = Entry {
                name: name.clone(),
                size: *size,
                confirmed: false,
            };
            if self.entries.insert(*hash, entry).is_none() {
                self.order.push_back(*hash);
            }
        }
        self.records += stored.len();
        self.evict();
        self.maybe_compact()
    }

    /// Notes confirmed republishes. Not fsynced: a lost `P` costs one more republish after a crash.
    pub fn record_confirmed(&mut self, hashes: &[Hash]) -> Result<(), PathError> {
        let mut text = String::new();
        for hash in hashes {
            if let Some(entry) = self.entries.get_mut(hash) {
                if !entry.confirmed {
                    entry.confirmed = true;
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

    fn append(&mut self, bytes: &[u8], sync: bool) -> Result<(), PathError> {
        let result =
            self.file
                .write_all(bytes)
                .and_then(|()| if sync { self.file.sync_data() } else { Ok(()) });
        match result {
            Ok(()) => {
                self.len += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Best effort: a partial record left behind is caught by its checksum anyway.
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
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let mut text = String::new();
        for hash in &self.order {
            if let Some(e) = self.entries.get(hash) {
                let record = Record::Stored {
                    hash: *hash,
                    size: e.size,
                    name: e.name.clone(),
                    confirmed: e.confirmed,
                };
                text.push_str(&record.encode());
            }
        }
        let records = self.entries.len();
        let mut temp = tempfile::Builder::new()
            .prefix(".index-")
            .tempfile_in(dir)
            .at("create a temp file in", dir)?;
        temp.write_all(text.as_bytes()).at("write", temp.path())?;
        temp.as_file().sync_data().at("fsync", temp.path())?;
        temp.persist(&self.path).map_err(|e| PathError {
            op: "replace",
            path: self.path.clone(),
            source: e.error,
        })?;
        storage::sync_dir(dir)?;
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

fn file_matches(path: &Path, size: u64) -> bool {
    fs::metadata(path)
        .map(|m| m.is_file() && m.len() == size)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u8) -> Hash {
        [n; 32]
    }

    #[test]
    fn records_round_trip_through_their_encoding() {
        let records = [
            Record::Stored {
                hash: h(7),
                size: 1234,
                name: "image_20261125-165005-2.jpg".into(),
                confirmed: false,
            },
            Record::Confirmed { hash: h(9) },
            Record::Stored {
                hash: h(8),
                size: 1,
                name: "a.jpg".into(),
                confirmed: true,
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
        }
        .encode();
        log += "S garbage that is not a record\n";
        log += &Record::Stored {
            hash: h(2),
            size: 2,
            name: "b.jpg".into(),
            confirmed: false,
        }
        .encode();
        log += &Record::Confirmed { hash: h(1) }.encode();
        let whole = log.len() as u64;
        log += &Record::Stored {
            hash: h(3),
            size: 3,
            name: "c.jpg".into(),
            confirmed: false,
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
                .map(|i| Record::Stored { hash: [u8::try_from(i).unwrap(); 32], size: i as u64, name: format!("{i}.jpg"), confirmed: false })
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
                    (h(1), 2, "a.jpg".into()),
                    (h(2), 2, "b.jpg".into()),
                    (h(3), 3, "c.jpg".into()),
                ])
                .unwrap();
            index.record_confirmed(&[h(3)]).unwrap();
        }
        let mut raw = fs::OpenOptions::new()
            .append(true)
            .open(state.path().join(FILE_NAME))
            .unwrap();
        raw.write_all(b"S 0102 torn").unwrap();
        drop(raw);

        let (index, recovery) = Index::open(state.path(), images.path(), 100).unwrap();
        assert_eq!(recovery.dropped, vec!["b.jpg".to_string()]);
        assert_eq!(recovery.unconfirmed, vec![(h(1), "a.jpg".to_string())]);
        assert_eq!(recovery.torn_bytes, 11);
        assert!(index.get(&h(3)).unwrap().confirmed);
        assert!(index.get(&h(2)).is_none());

        // What recovery decided is what the next start reads.
        drop(index);
        let (_, again) = Index::open(state.path(), images.path(), 100).unwrap();
        assert!(again.dropped.is_empty());
        assert_eq!(again.bad_records, 0);
        assert_eq!(again.unconfirmed.len(), 1);
    }

    #[test]
    fn the_window_forgets_old_confirmed_images_but_never_the_outbox() {
        let images = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let (mut index, _) = Index::open(state.path(), images.path(), 3).unwrap();
        for n in 0..10u8 {
            index
                .record_stored(&[(h(n), 1, format!("{n}.jpg"))])
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
                .record_stored(&[(hash, 1, format!("{n}.jpg"))])
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
}
