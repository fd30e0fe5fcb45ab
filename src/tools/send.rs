//! `imaged send`: publish JPEG files on the upload topic with QoS 1, and say whether the broker took them.
//!
//! Up to `--window` publishes wait for their PUBACK at once. One task owns the connection (as in the daemon):
//! it reads the next file, publishes it through the [`PublishWindow`] without ever blocking on rumqttc's
//! channel, and matches PUBACKs to files. When the connection drops, everything not yet acknowledged is
//! published again after the reconnect, so exit 0 means every file was acknowledged.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use rumqttc::{Event, Incoming, Outgoing};

use crate::cli::SendArgs;
use crate::config::{Config, ConfigError};
use crate::exit::Exit;
use crate::mqtt::{self, Properties, PublishWindow, Role};
use crate::storage::{self, Context, PathError, Rejection};
use crate::topic::check_topic_name;

/// How long a connection that was up may stay down before `send` gives up on what is left.
const RECONNECT_PATIENCE: Duration = Duration::from_secs(60);

/// Why `imaged send` did not send everything.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config error: {0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Usage(String),
    #[error("{0} files were not sent (see above)")]
    NotSent(u64),
}

impl Error {
    pub fn exit(&self) -> Exit {
        match self {
            Error::Config(_) => Exit::Config,
            Error::Usage(_) => Exit::Usage,
            Error::NotSent(_) => Exit::Failure,
        }
    }
}

/// The topic to publish on when the config's upload topic is a filter: `image/upload/#` also matches
/// `image/upload`, so that is where a plain sender publishes.
pub fn publish_topic(filter: &str) -> Result<String, String> {
    let topic = filter.strip_suffix("/#").unwrap_or(filter);
    check_topic_name(topic)
        .map(|()| topic.to_string())
        .map_err(|why| format!("cannot publish on {filter:?} ({why}); give a topic with --topic"))
}

pub fn run(mut config: Config, args: SendArgs) -> Result<(), Error> {
    args.target.apply(&mut config);
    let topic = match &args.target.topic {
        Some(topic) => {
            check_topic_name(topic)
                .map_err(|why| Error::Usage(format!("--topic {topic:?}: {why}")))?;
            topic.clone()
        }
        None => publish_topic(&config.topics.upload).map_err(Error::Usage)?,
    };
    let window = mqtt::window(usize::from(args.window));
    let client_id = format!("imaged-send-{}", fastrand::u64(..));
    let (client, eventloop) = mqtt::connect(
        &config.broker,
        &client_id,
        config.max_packet_bytes(),
        Role::Sender { inflight: window },
        None,
    )
    .map_err(|e| config.error(e))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime starts");
    let sender = Sender {
        client,
        topic,
        broker: config.broker_name(),
        max_bytes: config.storage.max_image_bytes,
        queue: VecDeque::new(),
        window: PublishWindow::new(window as usize),
        connected: false,
        ever_connected: false,
        down_since: None,
        last_problem: None,
        sent: 0,
        sent_bytes: 0,
        failed: 0,
        verbose: false,
        progress: None,
    };
    match runtime.block_on(sender.run(eventloop, args)) {
        0 => Ok(()),
        failed => Err(Error::NotSent(failed)),
    }
}

/// What `send` has to do and has done. Only its own task touches it.
struct Sender {
    client: mqtt::Client,
    topic: String,
    broker: String,
    max_bytes: usize,
    /// Files to publish, in order; a file comes back to the front when its publish was lost.
    queue: VecDeque<PathBuf>,
    /// Publishes not yet acknowledged: the file and its size.
    window: PublishWindow<(PathBuf, usize)>,
    connected: bool,
    ever_connected: bool,
    down_since: Option<Instant>,
    last_problem: Option<String>,
    sent: u64,
    sent_bytes: u64,
    failed: u64,
    /// Whether to print a line per image (one file, a camera loop or a watched folder).
    verbose: bool,
    progress: Option<ProgressBar>,
}

/// When the files are sent again: once, every `interval` for `rounds`, or as they appear in a folder.
struct Schedule {
    files: Vec<PathBuf>,
    rounds: u64,
    round: u64,
    interval: Option<Duration>,
    next_round: Instant,
    watcher: Option<Watcher>,
}

impl Schedule {
    fn new(args: &SendArgs, files: Vec<PathBuf>) -> Schedule {
        Schedule {
            files,
            rounds: match (args.interval, args.repeat) {
                (Some(_), Some(n)) => n,
                (Some(_), None) => u64::MAX,
                (None, _) => 1,
            },
            round: 0,
            interval: args.interval.map(Duration::from_secs_f64),
            next_round: Instant::now(),
            watcher: args.watch.as_deref().map(Watcher::new),
        }
    }

    /// The files of the next round when it is due.
    fn due(&mut self, stopping: bool) -> Option<&[PathBuf]> {
        if self.watcher.is_some() || stopping || self.round >= self.rounds {
            return None;
        }
        if Instant::now() < self.next_round {
            return None;
        }
        self.round += 1;
        self.next_round = Instant::now() + self.interval.unwrap_or_default();
        Some(&self.files)
    }

    /// Whether anything may still come: more rounds, or a folder to watch.
    fn more(&self, stopping: bool) -> bool {
        !stopping && (self.watcher.is_some() || self.round < self.rounds)
    }
}

impl Sender {
    /// Sends everything the arguments ask for; returns how many files were not sent.
    async fn run(mut self, eventloop: mqtt::EventLoop, args: SendArgs) -> u64 {
        let mut events = mqtt::events(eventloop);
        let files = expand(&args.files, &mut self.failed);
        let mut schedule = Schedule::new(&args, files);
        self.verbose =
            schedule.files.len() == 1 || schedule.interval.is_some() || schedule.watcher.is_some();
        if !self.verbose && std::io::stderr().is_terminal() {
            self.progress = Some(progress_bar(schedule.files.len()));
        }
        let started = Instant::now();
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut stop = false;
        loop {
            if self.queue.is_empty() {
                if let Some(files) = schedule.due(stop) {
                    self.queue.extend(files.iter().cloned());
                }
            }
            self.fill();
            if self.queue.is_empty() && self.window.is_empty() && !schedule.more(stop) {
                break;
            }
            if self.gave_up() {
                break;
            }
            tokio::select! {
                Some((event, _retry)) = events.next() => self.event(event),
                _ = &mut ctrl_c, if !stop => {
                    stop = true;
                    // Finish what is in flight; start nothing new.
                    self.queue.clear();
                }
                _ = tick.tick() => {
                    if let (Some(w), false) = (schedule.watcher.as_mut(), stop) {
                        self.queue.extend(w.complete_files());
                    }
                }
            }
        }
        if let Some(bar) = self.progress.take() {
            bar.finish_and_clear();
        }
        println!(
            "sent {} images, {} bytes, in {:.2} s",
            self.sent,
            self.sent_bytes,
            started.elapsed().as_secs_f64()
        );
        let _ = self.client.try_disconnect();
        self.failed
    }

    /// Whether the broker has been away too long; the first connection gets no second try: an unreachable
    /// broker is an error, not a wait.
    fn gave_up(&mut self) -> bool {
        let Some(down) = self.down_since else {
            return false;
        };
        if self.ever_connected && down.elapsed() <= RECONNECT_PATIENCE {
            return false;
        }
        let left = self.queue.len() + self.window.len();
        eprintln!(
            "imaged send: giving up: {}; {left} images not acknowledged",
            self.last_problem
                .as_deref()
                .unwrap_or("no connection to the broker")
        );
        self.failed += left as u64;
        true
    }

    /// Publishes the next files while the window and rumqttc's channel have room.
    fn fill(&mut self) {
        while self.connected && self.window.has_room() {
            let Some(path) = self.queue.pop_front() else {
                return;
            };
            let payload = match read_image(&path, self.max_bytes) {
                Ok(payload) => payload,
                Err(e) => {
                    eprintln!("imaged send: {e}");
                    self.failed += 1;
                    continue;
                }
            };
            let len = payload.len();
            let properties = Properties {
                content_type: Some("image/jpeg".to_string()),
                user: Vec::new(),
            };
            if let Err((path, _)) = self.window.try_publish(
                &self.client,
                &self.topic,
                false,
                payload,
                &properties,
                (path, len),
            ) {
                self.queue.push_front(path);
                return;
            }
        }
    }

    fn event(&mut self, event: Result<Event, mqtt::ConnectionError>) {
        match event {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                self.connected = true;
                self.ever_connected = true;
                self.down_since = None;
                self.last_problem = None;
                // A clean session: whatever was not acknowledged is gone from the broker and from rumqttc.
                for (path, _) in self.window.take_all().into_iter().rev() {
                    self.queue.push_front(path);
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                self.window.numbered(pkid);
            }
            Ok(Event::Incoming(Incoming::PubAck(ack))) => {
                if let Some((path, len)) = self.window.acked(ack.pkid) {
                    self.acknowledged(&path, len);
                }
            }
            Ok(_) => {}
            Err(e) => {
                self.connected = false;
                self.down_since.get_or_insert_with(Instant::now);
                let problem = mqtt::describe(&e, &self.broker);
                if self.last_problem.as_deref() != Some(&problem) {
                    eprintln!("imaged send: {problem}");
                    self.last_problem = Some(problem);
                }
            }
        }
    }

    fn acknowledged(&mut self, path: &Path, len: usize) {
        self.sent += 1;
        self.sent_bytes += len as u64;
        if self.verbose {
            println!(
                "Image sent: {} ({len} bytes) on topic '{}'",
                path.display(),
                self.topic
            );
        }
        if let Some(bar) = &self.progress {
            bar.inc(1);
            bar.set_message(format!("{} MB", self.sent_bytes / 1_000_000));
        }
    }
}

fn progress_bar(files: usize) -> ProgressBar {
    let bar = ProgressBar::new(files as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} images, {msg} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// The files to send: each argument, or the files of a folder argument (sorted, hidden ones skipped).
fn expand(args: &[PathBuf], failed: &mut u64) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for arg in args {
        if arg.is_dir() {
            match std::fs::read_dir(arg) {
                Ok(entries) => {
                    let mut found: Vec<PathBuf> = entries
                        .filter_map(Result::ok)
                        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                        .map(|e| e.path())
                        .filter(|p| p.is_file())
                        .collect();
                    found.sort();
                    files.extend(found);
                }
                Err(e) => {
                    eprintln!("imaged send: cannot list {}: {e}", arg.display());
                    *failed += 1;
                }
            }
        } else {
            files.push(arg.clone());
        }
    }
    files
}

/// Why a file was not sent.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    Read(#[from] PathError),
    #[error("{} is {bytes} bytes, over the limit of {max} (storage.max_image_bytes)", path.display())]
    TooLarge {
        path: PathBuf,
        bytes: u64,
        max: usize,
    },
    #[error("{}: {why}", path.display())]
    NotAnImage { path: PathBuf, why: Rejection },
}

/// Reads a file and checks it the way imaged will: a JPEG within the size limit.
pub fn read_image(path: &Path, max_bytes: usize) -> Result<Bytes, FileError> {
    let bytes = std::fs::metadata(path).at("read", path)?.len();
    if bytes > max_bytes as u64 {
        return Err(FileError::TooLarge {
            path: path.into(),
            bytes,
            max: max_bytes,
        });
    }
    let payload = std::fs::read(path).at("read", path)?;
    storage::check_image(&payload, max_bytes).map_err(|why| FileError::NotAnImage {
        path: path.into(),
        why,
    })?;
    Ok(Bytes::from(payload))
}

/// Finds new JPEG files in a camera's drop folder, each once, when it is complete: its size and mtime held
/// still between two looks, or it is renamed into place (hidden names are skipped as in-progress).
struct Watcher {
    dir: PathBuf,
    seen: HashSet<PathBuf>,
    growing: HashMap<PathBuf, (u64, SystemTime)>,
}

impl Watcher {
    fn new(dir: &Path) -> Watcher {
        // Files already there are not new.
        let seen = list(dir).into_iter().map(|(p, _)| p).collect();
        Watcher {
            dir: dir.to_path_buf(),
            seen,
            growing: HashMap::new(),
        }
    }

    fn complete_files(&mut self) -> Vec<PathBuf> {
        let mut ready = Vec::new();
        for (path, stamp) in list(&self.dir) {
            if self.seen.contains(&path) {
                continue;
            }
            match self.growing.insert(path.clone(), stamp) {
                Some(before) if before == stamp => {
                    self.growing.remove(&path);
                    self.seen.insert(path.clone());
                    ready.push(path);
                }
                _ => {}
            }
        }
        ready.sort();
        ready
    }
}

fn list(dir: &Path) -> Vec<(PathBuf, (u64, SystemTime))> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name().to_string_lossy().to_lowercase();
            !name.starts_with('.') && (name.ends_with(".jpg") || name.ends_with(".jpeg"))
        })
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            meta.is_file().then(|| {
                (
                    e.path(),
                    (
                        meta.len(),
                        meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    ),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_publishes_on_the_parent_of_a_trailing_multi_level_wildcard() {
        assert_eq!(publish_topic("image/upload").unwrap(), "image/upload");
        assert_eq!(publish_topic("image/upload/#").unwrap(), "image/upload");
        assert!(publish_topic("image/+/jpeg").is_err());
    }

    #[test]
    fn a_watched_file_is_sent_once_when_it_stopped_changing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("old.jpg"), b"x").unwrap();
        let mut watcher = Watcher::new(dir.path());
        std::fs::write(dir.path().join("new.jpg"), b"partial").unwrap();
        std::fs::write(dir.path().join(".tmp.jpg"), b"hidden").unwrap();
        assert!(
            watcher.complete_files().is_empty(),
            "seen once: maybe still being written"
        );
        assert_eq!(watcher.complete_files(), vec![dir.path().join("new.jpg")]);
        assert!(watcher.complete_files().is_empty(), "sent once only");
    }

    #[test]
    fn files_that_are_not_jpegs_or_too_large_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, b"hello").unwrap();
        assert!(read_image(&text, 100)
            .unwrap_err()
            .to_string()
            .contains("notes.txt: not a JPEG"));
        let big = dir.path().join("big.jpg");
        std::fs::write(&big, [0xFF, 0xD8, 0xFF, 0, 0, 0xFF, 0xD9]).unwrap();
        assert!(read_image(&big, 5)
            .unwrap_err()
            .to_string()
            .contains("big.jpg is 7 bytes, over the limit of 5"));
        assert!(read_image(&dir.path().join("missing.jpg"), 5)
            .unwrap_err()
            .to_string()
            .contains("cannot read"));
    }
}
