//! The storage pipeline: from a received upload to "durable, may be acknowledged", and the republish queue.
//!
//! Threads, not async tasks, because every step here is a blocking syscall:
//!
//! * **writers** (`storage.writers` of them) hash a payload, report the hash, then write it to a file without
//!   a name (or a temp file where the filesystem has no `O_TMPFILE`, see storage), fsynced, in parallel;
//! * the **committer** takes the uploads in the order they arrived. As soon as an image's hash is known it
//!   decides (a duplicate of a stored image, or the next free name) and makes the index records of the new
//!   names durable with one write + fsync for all of them, while the writers are still writing. Once the
//!   images at the front are written it renames them, fsyncs the folder once, and only then lets the session
//!   acknowledge them. Acks therefore go out in receive order (as MQTT 3.1.1 asks), and a group never waits
//!   for uploads still being written behind it.
//!
//! The committer also feeds republishes to the session, bounded in count and bytes; what does not fit in
//! memory waits as an outbox entry in the index and is read back from the stored file when its turn comes.
//! When the disk fails, uploads are held (not acknowledged) and retried with backoff; the broker keeps them.
//! So are they when writing one would leave less free space than `retention.min_free`: the committer checks
//! before every write and wakes the retention thread, which deletes the oldest images if it may.
//!
//! Once a group is durable, the committer lists its images in the retention catalog, and it names each image
//! in [`Pending`] from the moment its name is recorded until its republish is confirmed, so that retention
//! never deletes an image the broker has not confirmed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use rumqttc::QoS;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, error, info, warn};

use super::consumers::{self, ImagePublishes};
use super::health::{Beat, Health, Stats};
use super::index::{Hash, Index, NewImage, Origin};
use super::retention::{self, Pending};
use crate::backoff::Backoff;
use crate::config::FreeSpace;
use crate::layout::{self, Template};
use crate::retention::catalog::{self, Line};
use crate::storage::{self, hex, Namer, PathError, Persisted, Rejection};
use crate::topic::topic_matches;

/// An upload as the session hands it over. `gen` names the broker connection it came on.
#[derive(Debug)]
pub struct Upload {
    pub seq: u64,
    pub gen: u64,
    pub pkid: u16,
    pub qos: QoS,
    pub topic: String,
    pub payload: Bytes,
    pub at: DateTime<Utc>,
}

/// What the committer hears.
#[derive(Debug)]
pub enum Inbox {
    Upload(Upload),
    /// A writer hashed upload `seq` and starts writing it.
    Hashed {
        seq: u64,
        hash: Hash,
    },
    /// A writer finished (or failed) writing upload `seq`, of `bytes`.
    Written {
        seq: u64,
        bytes: usize,
        result: Result<storage::Written, PathError>,
    },
    /// The broker acknowledged one publish of this image (its republish or its event).
    Confirmed(Hash),
    /// These republishes were lost with the broker session and must be sent again.
    Lost(Vec<(Hash, String)>),
    /// A reload changed what the committer names images by, or its limits.
    Reload(Reloadable),
    Shutdown,
}

/// What the committer tells the session.
#[derive(Debug)]
pub enum Outcome {
    /// The upload is settled (stored, a duplicate, quarantined or refused): acknowledge it.
    Settled {
        gen: u64,
        pkid: u16,
        qos: QoS,
        bytes: usize,
    },
    /// Publish this stored image on its stored topic, and its event. Each publish's PUBACK comes back as
    /// [`Inbox::Confirmed`].
    Republish {
        hash: Hash,
        name: String,
        payload: Bytes,
        publishes: ImagePublishes,
        /// Its camera and receive time (none for an entry an earlier version left in the outbox).
        origin: Option<Origin>,
    },
    /// A new image of `camera`, received at `at_ms` (Unix ms), is stored: for the status and Home Assistant.
    Stored { camera: String, at_ms: u64 },
}

/// The settings a reload changes (see [`crate::config::reload`]).
#[derive(Debug, Clone)]
pub struct Reloadable {
    /// Where an image goes under `image_dir`, and the upload filter whose wildcards name its camera.
    pub path: Template,
    pub upload_filter: String,
    /// Free space to keep on the storage filesystem (`None`: none); `retention.max_size` (0: none).
    pub min_free: Option<FreeSpace>,
    pub max_size: u64,
    /// What is published for each stored image.
    pub consumers: consumers::Settings,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub image_dir: PathBuf,
    /// Changed by [`Inbox::Reload`] while the committer runs.
    pub now: Reloadable,
    pub quarantine_dir: PathBuf,
    pub file_mode: u32,
    pub max_image_bytes: usize,
    pub writers: usize,
    /// Bounds on republishes handed to the session and not yet confirmed.
    pub republish_images: usize,
    pub republish_bytes: usize,
    /// `storage.accept_base64`.
    pub accept_base64: bool,
}

/// What the committer shares with retention.
pub struct Retention {
    pub catalog: catalog::Writer,
    pub pending: Arc<Pending>,
    pub handle: retention::Handle,
}

/// The running pipeline.
pub struct Pipeline {
    /// To the committer, from the session (uploads, confirmations) and the writers.
    pub inbox: mpsc::Sender<Inbox>,
    threads: Vec<JoinHandle<()>>,
}

impl Pipeline {
    /// Starts the writers and the committer. `replay` lists stored images whose republish is pending.
    pub fn start(
        settings: Settings,
        index: Index,
        replay: Vec<(Hash, String)>,
        retention: Retention,
        outcomes: UnboundedSender<Outcome>,
        health: Arc<Health>,
    ) -> Pipeline {
        let (inbox_tx, inbox_rx) = mpsc::channel();
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let mut threads = Vec::new();
        for n in 0..settings.writers {
            let writer = Writer {
                jobs: job_rx.clone(),
                inbox: inbox_tx.clone(),
                beat: health.register(&format!("storage writer {n}")),
                health: health.clone(),
                incoming_dir: storage::incoming_dir(&settings.image_dir),
                quarantine_dir: settings.quarantine_dir.clone(),
                mode: settings.file_mode,
            };
            threads.push(spawn(format!("writer-{n}"), move || writer.run()));
        }
        let committer = Committer {
            beat: health.register("storage committer"),
            health,
            index,
            jobs: job_tx,
            outcomes,
            slots: BTreeMap::new(),
            deciding: HashSet::new(),
            names: Namer::new(settings.now.path.clone()),
            quarantine_names: Namer::quarantine(),
            old_filter: None,
            dirty: BTreeSet::new(),
            folders: HashSet::new(),
            trouble: None,
            retry_at: None,
            catalog: retention.catalog,
            pending: retention.pending,
            retention: retention.handle,
            writing_bytes: 0,
            space_hold: None,
            republishes: Republishes {
                queue: replay
                    .into_iter()
                    .map(|(hash, name)| Republish {
                        hash,
                        name,
                        payload: None,
                    })
                    .collect(),
                ..Republishes::default()
            },
            settings,
        };
        threads.push(spawn("committer".into(), move || committer.run(inbox_rx)));
        Pipeline {
            inbox: inbox_tx,
            threads,
        }
    }

    /// Waits for every thread after [`Inbox::Shutdown`] was sent.
    pub fn join(self) {
        drop(self.inbox);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .expect("threads can be spawned at start-up")
}

struct Job {
    seq: u64,
    payload: Bytes,
    quarantine: bool,
}

/// A writer thread's own state.
struct Writer {
    /// Shared by all writers: whoever is free takes the next job.
    jobs: Arc<Mutex<mpsc::Receiver<Job>>>,
    /// To the committer: hashed, then written.
    inbox: mpsc::Sender<Inbox>,
    beat: Arc<Beat>,
    /// For the pipeline's progress: every chunk written counts.
    health: Arc<Health>,
    /// Images are written here, then renamed into their folders (the same filesystem).
    incoming_dir: PathBuf,
    quarantine_dir: PathBuf,
    mode: u32,
}

impl Writer {
    fn run(self) {
        loop {
            self.beat.idle();
            let job = match self.jobs.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                Ok(job) => job,
                Err(_) => return,
            };
            self.beat.beat();
            let hash: Hash = Sha256::digest(&job.payload).into();
            if self
                .inbox
                .send(Inbox::Hashed { seq: job.seq, hash })
                .is_err()
            {
                return;
            }
            let dir = if job.quarantine {
                &self.quarantine_dir
            } else {
                &self.incoming_dir
            };
            let moved = || {
                self.beat.beat();
                self.health.progress.beat();
            };
            let result = storage::write_image(dir, &job.payload, self.mode, &moved);
            if self
                .inbox
                .send(Inbox::Written {
                    seq: job.seq,
                    bytes: job.payload.len(),
                    result,
                })
                .is_err()
            {
                return;
            }
        }
    }
}

/// What an upload is, decided when it arrives.
enum Kind {
    Image,
    /// Not a JPEG: written into the quarantine folder.
    Quarantine(Rejection),
    /// Over the size limit: nothing is written.
    Refused(Rejection),
}

/// Where an upload's bytes are on their way to the disk.
enum Stage {
    /// Waiting for the disk to work again before it is written.
    Held,
    Writing,
    Temp(storage::Written),
    /// Under its final name (the folder is not fsynced yet).
    Renamed,
}

/// What the commit does with an image, decided in arrival order once its hash is known.
enum Decision {
    /// The next free name; `recorded` once its index record is durable, which must come before the rename.
    Store { name: String, recorded: bool },
    /// The same content is already stored (or is being stored by an earlier upload).
    Duplicate,
}

/// One upload on its way through the committer.
struct Slot {
    /// The connection it came on: its ack is only valid there.
    gen: u64,
    pkid: u16,
    qos: QoS,
    /// The folder its topic names (see [`layout::camera`]).
    camera: String,
    topic: String,
    at: DateTime<Utc>,
    /// The image (decoded, for a base64 upload).
    payload: Bytes,
    /// What the upload took in the session's read window: its payload as received.
    received_bytes: usize,
    kind: Kind,
    /// Known once a writer has hashed it.
    hash: Option<Hash>,
    bytes: Stage,
    decision: Option<Decision>,
    quarantine_name: Option<String>,
}

impl Slot {
    /// The index record of this upload stored as `name`.
    fn new_image(&self, hash: Hash, name: String) -> NewImage {
        NewImage {
            hash,
            size: self.payload.len() as u64,
            name,
            origin: Some(Origin {
                at_ms: u64::try_from(self.at.timestamp_millis()).unwrap_or(0),
                camera: self.camera.clone(),
                topic: self.topic.clone(),
            }),
        }
    }

    /// Whether the commit can take it: written and, for a new image, recorded. A duplicate need not wait
    /// for its own copy, which is removed when its writer is done.
    fn ready(&self) -> bool {
        let written = matches!(self.bytes, Stage::Temp(_) | Stage::Renamed);
        match (&self.kind, &self.decision) {
            (Kind::Refused(_), _) | (Kind::Image, Some(Decision::Duplicate)) => true,
            (Kind::Quarantine(_), _) => written,
            (Kind::Image, Some(Decision::Store { recorded, .. })) => written && *recorded,
            (Kind::Image, None) => false,
        }
    }
}

struct Republish {
    hash: Hash,
    name: String,
    /// `None` once it no longer fits in memory: read back from the stored file.
    payload: Option<Bytes>,
}

struct Trouble {
    since: Instant,
    backoff: Backoff,
}

/// Republishes on their way from the committer to the session, within one memory budget; what does not fit
/// waits as an outbox entry in the index and is read back from its file when its turn comes.
#[derive(Default)]
struct Republishes {
    /// Stored images not yet handed to the session, oldest first.
    queue: VecDeque<Republish>,
    /// Bytes of the payloads `queue` holds in memory.
    queued_bytes: usize,
    /// Handed to the session and not yet confirmed or lost: size, and how many of its publishes (republish,
    /// event) the broker has yet to confirm.
    outstanding: HashMap<Hash, (usize, u8)>,
    outstanding_bytes: usize,
    /// Confirmed by the broker, not yet noted in the index.
    confirmed: Vec<Hash>,
}

/// The committer's state; only its own thread touches it. Writers report over the inbox.
struct Committer {
    settings: Settings,
    health: Arc<Health>,
    beat: Arc<Beat>,
    index: Index,
    /// Work for the writers.
    jobs: mpsc::Sender<Job>,
    /// To the session: acks and republishes.
    outcomes: UnboundedSender<Outcome>,
    /// Uploads not yet settled, by arrival number: settled in this order.
    slots: BTreeMap<u64, Slot>,
    /// Images named but not yet settled, so an identical upload right behind is a duplicate.
    deciding: HashSet<Hash>,
    names: Namer,
    quarantine_names: Namer,
    /// The upload filter before the last reload that changed it, for the cameras of what it still delivers.
    old_filter: Option<String>,
    /// Folders with renames not fsynced yet.
    dirty: BTreeSet<PathBuf>,
    /// Image folders known to exist, so a burst into one folder does not look it up for every image.
    folders: HashSet<PathBuf>,
    /// Since when the disk has been failing.
    trouble: Option<Trouble>,
    /// When to write the held uploads again; no commit is tried before.
    retry_at: Option<Instant>,
    republishes: Republishes,
    /// Where committed images are listed for retention.
    catalog: catalog::Writer,
    /// Images retention must keep: named from their record until their republish is confirmed.
    pending: Arc<Pending>,
    retention: retention::Handle,
    /// Bytes handed to the writers and not written yet: the free space they will take.
    writing_bytes: u64,
    /// Since when uploads are held for lack of free space (last checked then).
    space_hold: Option<(Instant, Instant)>,
}

/// How many messages one turn of the loop takes before it commits; bounds the latency of a group.
const MAX_DRAIN: usize = 4096;

/// How often held uploads look for free space again (retention is woken at once).
const SPACE_RECHECK: Duration = Duration::from_millis(100);

impl Committer {
    #[expect(
        clippy::needless_pass_by_value,
        reason = "the committer's thread owns its inbox"
    )]
    fn run(mut self, inbox: mpsc::Receiver<Inbox>) {
        loop {
            let mut wait = self.retry_at.map_or(Duration::from_secs(1), |t| {
                t.saturating_duration_since(Instant::now())
            });
            if self.space_hold.is_some() {
                wait = wait.min(SPACE_RECHECK);
            }
            let mut shutdown = false;
            // Waiting for work is healthy however long it lasts; only the work itself must not hang.
            self.beat.idle();
            let received = inbox.recv_timeout(wait.min(Duration::from_secs(1)));
            self.beat.beat();
            match received {
                Ok(msg) => shutdown |= self.handle(msg),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => shutdown = true,
            }
            for msg in inbox.try_iter().take(MAX_DRAIN) {
                shutdown |= self.handle(msg);
            }
            if self.retry_at.is_some_and(|t| t <= Instant::now()) {
                self.retry_at = None;
                self.release_held();
            } else if self.trouble.is_none()
                && self
                    .space_hold
                    .is_some_and(|(_, checked)| checked.elapsed() >= SPACE_RECHECK)
            {
                self.release_held();
            }
            if self.retry_at.is_none() {
                self.commit_or_hold();
            }
            self.pump_republish();
            self.flush_confirmed();
            if shutdown {
                if !self.slots.is_empty() {
                    warn!("Stopping with {} images not yet stored; the broker will deliver them again", self.slots.len());
                }
                return;
            }
        }
    }

    /// Takes one message; true at shutdown.
    fn handle(&mut self, msg: Inbox) -> bool {
        match msg {
            Inbox::Upload(upload) => self.accept(upload),
            Inbox::Hashed { seq, hash } => {
                if let Some(slot) = self.slots.get_mut(&seq) {
                    slot.hash = Some(hash);
                }
            }
            Inbox::Written { seq, bytes, result } => {
                self.writing_bytes = self.writing_bytes.saturating_sub(on_disk(bytes));
                // A duplicate may be settled before its writer is done: its copy is dropped (removed) here.
                let Some(slot) = self.slots.get_mut(&seq) else {
                    return false;
                };
                match result {
                    Ok(temp) => slot.bytes = Stage::Temp(temp),
                    Err(e) => {
                        slot.bytes = Stage::Held;
                        self.failed(&e);
                    }
                }
            }
            Inbox::Confirmed(hash) => {
                // The entry is done once every publish of it is confirmed.
                if let Some((bytes, left)) = self.republishes.outstanding.get_mut(&hash) {
                    *left = left.saturating_sub(1);
                    if *left > 0 {
                        return false;
                    }
                    self.republishes.outstanding_bytes -= *bytes;
                    self.republishes.outstanding.remove(&hash);
                }
                self.republishes.confirmed.push(hash);
            }
            Inbox::Lost(lost) => {
                // All publishes of an image go out again, also one already confirmed: one outbox entry.
                for (hash, name) in lost.into_iter().rev() {
                    let Some((bytes, _)) = self.republishes.outstanding.remove(&hash) else {
                        continue; // its other publish was lost too
                    };
                    self.republishes.outstanding_bytes -= bytes;
                    self.republishes.queue.push_front(Republish {
                        hash,
                        name,
                        payload: None,
                    });
                }
            }
            Inbox::Reload(now) => self.reload(now),
            Inbox::Shutdown => return true,
        }
        false
    }

    fn reload(&mut self, now: Reloadable) {
        if now.path != self.settings.now.path {
            self.names = Namer::new(now.path.clone());
        }
        if now.upload_filter != self.settings.now.upload_filter {
            self.old_filter = Some(std::mem::take(&mut self.settings.now.upload_filter));
        }
        self.settings.now = now;
    }

    /// The upload filter `topic` came by: the current one, or the one a reload replaced while it may still
    /// deliver (its unsubscription waits for the new subscription).
    fn filter_of(&self, topic: &str) -> &str {
        match &self.old_filter {
            Some(old) if !topic_matches(&self.settings.now.upload_filter, topic) => old,
            _ => &self.settings.now.upload_filter,
        }
    }

    fn accept(&mut self, mut upload: Upload) {
        let received_bytes = upload.payload.len();
        let max = self.settings.max_image_bytes;
        let decoded = if let Some(bytes) = crate::mqtt::cut_size(&upload.payload) {
            // A payload the 3.1.1 relay dropped unread: refused as oversized, by its real size.
            Err(Rejection::TooLarge { bytes, max })
        } else if self.settings.accept_base64 {
            storage::decode_base64_image(&upload.payload, max)
        } else {
            Ok(None)
        };
        let kind = match decoded {
            Ok(Some(jpeg)) => {
                upload.payload = Bytes::from(jpeg);
                Kind::Image
            }
            Ok(None) => match storage::check_image(&upload.payload, max) {
                Ok(()) => Kind::Image,
                Err(why @ Rejection::TooLarge { .. }) => Kind::Refused(why),
                Err(why) => Kind::Quarantine(why),
            },
            Err(why) => Kind::Refused(why),
        };
        let slot = Slot {
            gen: upload.gen,
            pkid: upload.pkid,
            qos: upload.qos,
            camera: layout::camera(self.filter_of(&upload.topic), &upload.topic),
            topic: upload.topic,
            at: upload.at,
            payload: upload.payload,
            received_bytes,
            kind,
            hash: None,
            bytes: Stage::Held,
            decision: None,
            quarantine_name: None,
        };
        let seq = upload.seq;
        self.slots.insert(seq, slot);
        if self.trouble.is_none() && self.space_hold.is_none() {
            self.write(seq);
        }
    }

    /// Hands a slot to the writers (a refused one has nothing to write), if writing it leaves the free
    /// space `retention.min_free` asks for; otherwise it stays held. False when it was held.
    fn write(&mut self, seq: u64) -> bool {
        let slot = self.slots.get(&seq).expect("a slot being written exists");
        let quarantine = match slot.kind {
            Kind::Refused(_) => return true,
            Kind::Quarantine(_) => true,
            Kind::Image => false,
        };
        let bytes = on_disk(slot.payload.len());
        if !self.room_for(bytes) {
            let now = Instant::now();
            let since = self.space_hold.map_or(now, |(since, _)| since);
            if self.space_hold.is_none() {
                debug!("holding uploads: writing them would leave less free space than retention.min_free");
                self.health.stats.space_low.store(true, Ordering::Relaxed);
            }
            self.space_hold = Some((since, now));
            self.retention.wake();
            return false;
        }
        let slot = self
            .slots
            .get_mut(&seq)
            .expect("a slot being written exists");
        let _ = self.jobs.send(Job {
            seq,
            payload: slot.payload.clone(),
            quarantine,
        });
        slot.bytes = Stage::Writing;
        self.writing_bytes += bytes;
        true
    }

    /// Whether `bytes` more can be written and still leave `retention.min_free` free. A filesystem that
    /// cannot tell is no reason to hold: the write itself will say what is wrong.
    fn room_for(&self, bytes: u64) -> bool {
        let Some(min_free) = self.settings.now.min_free else {
            return true;
        };
        match storage::space(&self.settings.image_dir) {
            Ok(space) => {
                space.available.saturating_sub(self.writing_bytes)
                    >= min_free.bytes_of(space.total) + bytes
            }
            Err(e) => {
                debug!("{e}");
                true
            }
        }
    }

    /// After a disk failure's backoff, or once there may be room again: write the held uploads, in their
    /// order, as far as there is room.
    fn release_held(&mut self) {
        let held: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, slot)| matches!(slot.bytes, Stage::Held))
            .map(|(&seq, _)| seq)
            .collect();
        let was_held = self.space_hold.take();
        for seq in held {
            if !self.write(seq) {
                // Keeps the episode's start.
                if let (Some((since, _)), Some((_, checked))) = (was_held, self.space_hold) {
                    self.space_hold = Some((since, checked));
                }
                return;
            }
        }
        if let Some((since, _)) = was_held {
            self.health.stats.space_low.store(false, Ordering::Relaxed);
            debug!(
                "free space is back: writing the uploads held for {:.1}s",
                since.elapsed().as_secs_f64()
            );
        }
    }

    fn failed(&mut self, e: &PathError) {
        if self.trouble.is_none() {
            error!("Storage is failing: {e}. Holding back acknowledgements (the broker keeps the images) and retrying");
            self.health
                .stats
                .disk_trouble
                .store(true, Ordering::Relaxed);
        } else {
            debug!("storage still failing: {e}");
        }
        let trouble = self.trouble.get_or_insert_with(|| Trouble {
            since: Instant::now(),
            backoff: Backoff::disk(),
        });
        let retry_at = Instant::now() + trouble.backoff.next_delay();
        self.retry_at.get_or_insert(retry_at);
    }

    fn commit_or_hold(&mut self) {
        match self.decide().and_then(|()| self.commit()) {
            Ok(0) => {}
            Ok(_) => {
                if let Some(trouble) = self.trouble.take() {
                    info!(
                        "Storage works again after {:.1}s; storing the images held back",
                        trouble.since.elapsed().as_secs_f64()
                    );
                    self.health
                        .stats
                        .disk_trouble
                        .store(false, Ordering::Relaxed);
                    self.release_held();
                }
            }
            Err(e) => self.failed(&e),
        }
    }

    /// Decides, in arrival order, every image whose hash is known: a duplicate (of a stored image whose file
    /// is still there, or of an earlier upload being stored) or the next free name. Then makes the index
    /// records of the new names durable (one write + fsync), while their images are still being written.
    fn decide(&mut self) -> Result<(), PathError> {
        for slot in self.slots.values_mut() {
            if !matches!(slot.kind, Kind::Image) || slot.decision.is_some() {
                continue;
            }
            let Some(hash) = slot.hash else { break };
            let stored = self
                .index
                .get(&hash)
                .filter(|e| file_has_size(&self.settings.image_dir.join(&e.name), e.size));
            slot.decision = Some(if self.deciding.contains(&hash) || stored.is_some() {
                Decision::Duplicate
            } else {
                let name = self.names.next(slot.at, &slot.camera);
                self.deciding.insert(hash);
                Decision::Store {
                    name,
                    recorded: false,
                }
            });
        }
        self.record()
    }

    /// Makes the index records of decided but unrecorded names durable.
    fn record(&mut self) -> Result<(), PathError> {
        let records: Vec<NewImage> = self
            .slots
            .values()
            .filter_map(|slot| match (&slot.decision, slot.hash) {
                (
                    Some(Decision::Store {
                        name,
                        recorded: false,
                    }),
                    Some(hash),
                ) => Some(slot.new_image(hash, name.clone())),
                _ => None,
            })
            .collect();
        if records.is_empty() {
            return Ok(());
        }
        self.index.record_stored(&records)?;
        // Before the name can exist on disk (its rename comes later): retention never sees it unprotected.
        // Not before the record: a record that failed is made again, and would count the name twice.
        for image in &records {
            self.pending.insert(&image.name);
        }
        for slot in self.slots.values_mut() {
            if let Some(Decision::Store { recorded, .. }) = &mut slot.decision {
                *recorded = true;
            }
        }
        Ok(())
    }

    /// Commits the longest run of ready uploads at the front, as one group: renames, one fsync per folder,
    /// then the outcomes. Returns how many were settled. On error the slots keep how far they got, and the
    /// next call goes on from there.
    fn commit(&mut self) -> Result<usize, PathError> {
        let ready: Vec<u64> = self
            .slots
            .iter()
            .take_while(|(_, s)| s.ready())
            .map(|(&k, _)| k)
            .collect();
        if ready.is_empty() {
            return Ok(0);
        }
        for seq in &ready {
            self.rename(*seq)?;
        }
        while let Some(dir) = self.dirty.first() {
            storage::sync_dir(dir)?;
            self.dirty.pop_first();
        }
        self.list_in_catalog(&ready)?;
        for seq in &ready {
            let slot = self.slots.remove(seq).expect("ready slots exist");
            self.settle(&slot);
        }
        Ok(ready.len())
    }

    /// Lists the stored images of a durable group in the catalog, before any of them is acknowledged. On
    /// error nothing is listed, and the next commit lists the same again.
    fn list_in_catalog(&mut self, ready: &[u64]) -> Result<(), PathError> {
        let lines: Vec<Line> = ready
            .iter()
            .filter_map(|seq| {
                let slot = &self.slots[seq];
                match (&slot.kind, &slot.decision, slot.hash) {
                    (Kind::Image, Some(Decision::Store { name, .. }), Some(hash)) => Some(Line {
                        at_ms: u64::try_from(slot.at.timestamp_millis()).unwrap_or(0),
                        size: slot.payload.len() as u64,
                        hash: Some(hash),
                        name: name.clone(),
                    }),
                    _ => None,
                }
            })
            .collect();
        self.catalog.append(&lines)?;
        let stats = &self.health.stats;
        let counts = self.catalog.counts();
        stats.set_appended(counts.images, counts.bytes);
        if self.settings.now.max_size > 0 && stats.stored_totals().1 > self.settings.now.max_size {
            self.retention.wake();
        }
        Ok(())
    }

    /// Renames a written image or quarantined payload to its final name, never replacing a file: a taken
    /// name gets the next one (an image's with a new durable index record first).
    fn rename(&mut self, seq: u64) -> Result<(), PathError> {
        let slot = self.slots.get_mut(&seq).expect("ready slots exist");
        let Stage::Temp(_) = slot.bytes else {
            return Ok(());
        };
        let Stage::Temp(mut temp) = std::mem::replace(&mut slot.bytes, Stage::Held) else {
            unreachable!()
        };
        loop {
            let slot = self.slots.get_mut(&seq).expect("ready slots exist");
            let (dir, name) = match (&slot.kind, &slot.decision) {
                (Kind::Image, Some(Decision::Store { name, .. })) => {
                    (&self.settings.image_dir, name.clone())
                }
                (Kind::Quarantine(_), _) => {
                    let name = self.quarantine_names.next(slot.at, "");
                    slot.quarantine_name = Some(name.clone());
                    (&self.settings.quarantine_dir, name)
                }
                _ => return Ok(()), // a duplicate: its copy goes with `temp`
            };
            let target = dir.join(&name);
            let folder = target.parent().unwrap_or(dir).to_path_buf();
            if !self.folders.contains(&folder) {
                // A new folder's own name is made durable by create_dir (it fsyncs the parent).
                storage::create_dir(&folder, storage::DIR_MODE)?;
                if self.folders.len() >= 10_000 {
                    self.folders.clear();
                }
                self.folders.insert(folder.clone());
            }
            // On an error the temp file is gone: the slot stays Held and is written again.
            match storage::persist(temp, dir, &name)? {
                Persisted::Done => {
                    slot.bytes = Stage::Renamed;
                    self.dirty.insert(folder);
                    return Ok(());
                }
                // Retention removed the folder it emptied: make it again.
                Persisted::NoFolder(back) => {
                    temp = back;
                    self.folders.remove(&folder);
                }
                Persisted::Taken(back) => {
                    temp = back;
                    if let (Kind::Image, Some(hash)) = (&slot.kind, slot.hash) {
                        let old = name;
                        let name = self.names.next(slot.at, &slot.camera);
                        // Like the first name's, the new name's record is durable before its rename.
                        self.index
                            .record_stored(&[slot.new_image(hash, name.clone())])?;
                        self.deciding.insert(hash);
                        self.pending.insert(&name);
                        self.pending.remove(&old);
                        slot.decision = Some(Decision::Store {
                            name,
                            recorded: true,
                        });
                    }
                }
            }
        }
    }

    /// Logs the outcome of one upload, queues its republish, and lets the session acknowledge it.
    fn settle(&mut self, slot: &Slot) {
        self.health.progress.beat();
        let stats = &self.health.stats;
        let bytes = slot.payload.len();
        let topic = crate::topic::topic_for_log(&slot.topic);
        match (&slot.kind, &slot.decision, slot.hash) {
            (Kind::Image, Some(Decision::Store { name, .. }), Some(hash)) => {
                self.deciding.remove(&hash);
                let path = self.settings.image_dir.join(name);
                info!(
                    path = %path.display(), bytes, sha256 = %hex(&hash), topic = %topic,
                    "Image saved: {}", path.display()
                );
                Stats::count(&stats.stored);
                stats
                    .last_image_ms
                    .store(super::systemd::unix_ms(), Ordering::Relaxed);
                let _ = self.outcomes.send(Outcome::Stored {
                    camera: slot.camera.clone(),
                    at_ms: u64::try_from(slot.at.timestamp_millis()).unwrap_or(0),
                });
                // Queued and outstanding republishes share one memory budget; beyond it, the outbox on disk.
                let fits =
                    self.republishes.queued_bytes + self.republishes.outstanding_bytes + bytes
                        <= self.settings.republish_bytes;
                if fits {
                    self.republishes.queued_bytes += bytes;
                }
                let payload = fits.then(|| slot.payload.clone());
                self.republishes.queue.push_back(Republish {
                    hash,
                    name: name.clone(),
                    payload,
                });
            }
            (Kind::Image, _, hash) => {
                let name = hash
                    .and_then(|h| self.index.get(&h))
                    .map(|e| e.name.clone())
                    .unwrap_or_default();
                let path = self.settings.image_dir.join(name);
                info!(
                    path = %path.display(), bytes, topic = %topic,
                    "Image already stored as {}; not stored again", path.display()
                );
                Stats::count(&stats.duplicates);
            }
            (Kind::Quarantine(why), _, _) => {
                let name = slot.quarantine_name.as_deref().unwrap_or_default();
                self.retention.quarantined(name, bytes as u64);
                let path = self.settings.quarantine_dir.join(name);
                warn!(
                    path = %path.display(), bytes, topic = %topic, reason = %why,
                    "Image rejected from topic '{}': {why}; kept as {}", topic, path.display()
                );
                Stats::count(&stats.rejected);
            }
            (Kind::Refused(why), _, _) => {
                // The size published, also of a payload the relay dropped unread.
                let bytes = match why {
                    Rejection::TooLarge { bytes, .. } => *bytes,
                    _ => bytes,
                };
                warn!(bytes, topic = %topic, reason = %why, "Image refused from topic '{}': {why}", topic);
                Stats::count(&stats.rejected);
            }
        }
        let _ = self.outcomes.send(Outcome::Settled {
            gen: slot.gen,
            pkid: slot.pkid,
            qos: slot.qos,
            bytes: slot.received_bytes,
        });
    }

    /// Hands queued republishes to the session while the bounds allow.
    fn pump_republish(&mut self) {
        while self.republishes.outstanding.len() < self.settings.republish_images
            && self.republishes.outstanding_bytes < self.settings.republish_bytes
        {
            let Some(item) = self.republishes.queue.pop_front() else {
                return;
            };
            if let Some(payload) = &item.payload {
                self.republishes.queued_bytes -= payload.len();
            }
            if self.republishes.outstanding.contains_key(&item.hash) {
                continue;
            }
            let payload = match item.payload {
                Some(payload) => payload,
                None => {
                    // A turn may read back many large files: each one read is a sign of life.
                    self.beat.beat();
                    let path = self.settings.image_dir.join(&item.name);
                    match std::fs::read(&path) {
                        Ok(bytes) => Bytes::from(bytes),
                        Err(e) => {
                            warn!(
                                "Cannot republish {}: {e}; it is no longer in the store",
                                path.display()
                            );
                            self.republishes.confirmed.push(item.hash);
                            continue;
                        }
                    }
                }
            };
            let origin = self.index.get(&item.hash).and_then(|e| e.origin.clone());
            let publishes = consumers::publishes(
                &self.settings.now.consumers,
                &item.hash,
                &item.name,
                payload.len() as u64,
                origin.as_ref(),
            );
            let count = if publishes.event.is_some() { 2 } else { 1 };
            self.republishes.outstanding_bytes += payload.len();
            self.republishes
                .outstanding
                .insert(item.hash, (payload.len(), count));
            let _ = self.outcomes.send(Outcome::Republish {
                hash: item.hash,
                name: item.name,
                payload,
                publishes,
                origin,
            });
        }
    }

    fn flush_confirmed(&mut self) {
        if self.republishes.confirmed.is_empty() {
            return;
        }
        // Once per image: a republish sent twice may be confirmed twice.
        let mut given_up = HashSet::new();
        for hash in &self.republishes.confirmed {
            if let Some(entry) = self.index.get(hash).filter(|e| !e.confirmed) {
                if given_up.insert(*hash) {
                    self.pending.remove(&entry.name);
                }
            }
        }
        if let Err(e) = self.index.record_confirmed(&self.republishes.confirmed) {
            // Only costs a second republish of these after a restart.
            debug!("cannot note confirmed republishes: {e}");
        }
        self.republishes.confirmed.clear();
    }
}

/// What a file of `bytes` takes on disk, as the free space counts it: whole blocks (4 KiB on the usual
/// filesystems; a little more room than needed on others).
fn on_disk(bytes: usize) -> u64 {
    crate::retention::blocks_of(bytes as u64, 4096)
}

/// The dedup guard: whether a remembered image's file is still there. Size, not content, and that is enough:
/// an entry gets here only as one recovery checked by content (an unconfirmed one), as one whose republish
/// was confirmed (only ever sent after its image was committed), or as one recorded in this run, whose
/// upload is in `deciding` until it is committed, so that a copy arriving first is a duplicate of an image
/// still being stored whatever its entry says. Once committed a file is never replaced by imaged, so what
/// this catches is a file someone removed; hashing it at every redelivery would read each image again.
fn file_has_size(path: &Path, size: u64) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.len() == size)
        .unwrap_or(false)
}
