//! The daemon: opens the storage, starts the pipeline and the MQTT session, reports to systemd, reloads its
//! config on SIGHUP, and stops cleanly on SIGTERM.
//!
//! [`session`] owns the broker connection and hands uploads to the [`pipeline`], whose threads write them
//! and settle them against the [`index`] and list them in the retention catalog; [`retention`] deletes the
//! oldest as `[retention]` says; [`health`] holds what the parts share about themselves, which [`systemd`]
//! turns into READY, STATUS and watchdog pings, and [`status`] into MQTT status, stats and Home Assistant
//! discovery ([`homeassistant`]); [`consumers`] decides what is published per stored image; [`reload`]
//! hands the parts what a new config changes; [`shutdown`] is the stop signal.

mod consumers;
mod health;
mod homeassistant;
mod index;
mod pipeline;
mod reload;
mod retention;
mod session;
mod shutdown;
mod status;
mod systemd;

pub use index::outbox_names;

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::config::{Config, ConfigError};
use crate::exit::Exit;
use crate::mqtt::{self, Role};
use crate::retention::catalog;
use crate::storage::{self, PathError};
use health::Health;
use index::{Index, Recovery};
use pipeline::Pipeline;
use session::{PipelineStopped, Session};

/// Why the daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config error: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("Storage cannot be used: {0}")]
    Storage(#[from] PathError),
    #[error("Stopping on an internal error: {0}")]
    Internal(#[from] PipelineStopped),
    #[error("Storage cannot be used: {0}")]
    Locked(String),
}

impl Error {
    pub fn exit(&self) -> Exit {
        match self {
            Error::Config(_) => Exit::Config,
            _ => Exit::Failure,
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT; `level` is the log level a reload changes.
pub fn run(config: Config, level: crate::logging::Level) -> Result<(), Error> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    let result = runtime.block_on(serve(config, level));
    // Dropping the runtime would wait for every blocking task, the join of a writer stuck in the kernel
    // among them: a stop must not hang on a stuck disk (nothing unacknowledged is lost by leaving).
    runtime.shutdown_timeout(Duration::from_millis(500));
    result
}

async fn serve(config: Config, level: crate::logging::Level) -> Result<(), Error> {
    let broker_name = config.broker_name();
    info!(
        "imaged {} starting: broker {broker_name} as '{}', uploads '{}', storage {}",
        env!("CARGO_PKG_VERSION"),
        config.client_id(),
        config.topics.upload,
        config.storage.dir.display()
    );
    // Before the state folder's lock, which tells `imaged prune` whom to signal: SIGUSR1 would end a
    // process without a handler (and so would SIGHUP, a reload).
    let signal = |kind| tokio::signal::unix::signal(kind).map_err(Error::Runtime);
    let prune_signals = signal(tokio::signal::unix::SignalKind::user_defined1())?;
    let hangups = signal(tokio::signal::unix::SignalKind::hangup())?;
    let limits = &config.limits;
    // Uploads are numbered by the broker, and up to inflight_images of them are stored at once; republishes
    // are numbered by imaged, so their window keeps rumqttc's packet-id margin (the rest wait in the outbox).
    let inflight = mqtt::window(limits.inflight_images);
    if usize::from(inflight) < limits.inflight_images {
        info!(
            "limits.inflight_images is {}: that many uploads are stored at once, but at most {inflight} \
             republishes are in flight (the MQTT client's packet ids); the rest wait in the outbox",
            limits.inflight_images
        );
    }
    let status = status::Settings::new(&config);
    let (client, eventloop) = mqtt::connect(
        &config.broker,
        config.client_id(),
        config.max_packet_bytes(),
        Role::Daemon {
            inflight,
            receive: u16::try_from(limits.inflight_images).unwrap_or(u16::MAX),
        },
        status::Status::will(&status).as_ref(),
    )
    .map_err(|e| config.error(e))?;
    for warning in mqtt::local_broker_warnings(&config.broker.host, config.broker.port) {
        warn!("{warning}");
    }
    warn_of_a_test_clock();
    let health = Arc::new(Health::default());
    let (outcomes_tx, outcomes_rx) = tokio::sync::mpsc::unbounded_channel();
    let storage = start_storage(&config, usize::from(inflight), outcomes_tx, &health)?;
    let (pipeline, retention) = (storage.pipeline, storage.retention);
    let session = Session::new(
        session::Settings {
            broker: broker_name.clone(),
            upload: config.topics.upload.clone(),
            stored: config.topics.stored.clone(),
            status,
            max_images: limits.inflight_images,
            max_bytes: limits.inflight_bytes,
            republish_window: usize::from(inflight),
            keep_alive: Duration::from_secs(config.broker.keep_alive_secs),
            subscription_file: config.state_dir().join("subscription"),
            identity: format!("{}@{broker_name}", config.client_id()),
        },
        client,
        pipeline.inbox.clone(),
        health.clone(),
    );
    let supervisor = tokio::spawn(systemd::supervise(health.clone(), broker_name.clone()));
    let trimmer = tokio::spawn(trim_memory(health.clone()));
    let prune_requests = tokio::spawn(prune_requests(prune_signals, retention.clone()));
    let (reloader, reloads) = reload::start(hangups, &config, level, &pipeline, &retention);
    let ready_status = format!("connected to {broker_name}; ready");
    let result = session
        .run(
            eventloop,
            outcomes_rx,
            reloads,
            shutdown::requested(),
            || {
                systemd::ready(&ready_status);
                retention.ready();
            },
        )
        .await;
    for task in [supervisor, trimmer, prune_requests, reloader] {
        task.abort();
    }

    // A thread stuck in the kernel must not keep the process from exiting: nothing unacknowledged is lost.
    // The storage and the retention threads stop together, within one deadline, so a stop stays well inside
    // systemd's TimeoutStopSec even on a disk that answers nothing.
    retention.shutdown();
    let retention_thread = storage.retention_thread;
    let storage_joined = tokio::task::spawn_blocking(move || pipeline.join());
    let retention_joined = tokio::task::spawn_blocking(move || retention_thread.join());
    let both = async {
        let _ = storage_joined.await;
        let _ = retention_joined.await;
    };
    if tokio::time::timeout(Duration::from_secs(5), both)
        .await
        .is_err()
    {
        warn!("the storage and retention threads did not stop within 5s; exiting without them");
    }
    // The lock goes with the process: closing its file here would wait on a disk that may answer nothing.
    std::mem::forget(storage.lock);
    result?;
    info!("Stopped");
    Ok(())
}

fn warn_of_a_test_clock() {
    if crate::clock::offset_secs() != 0 {
        warn!(
            "The clock is offset by {}s ({}): for tests only",
            crate::clock::offset_secs(),
            crate::clock::OFFSET_ENV
        );
    }
}

/// The storage side, running.
struct Storage {
    pipeline: Pipeline,
    retention: retention::Handle,
    retention_thread: std::thread::JoinHandle<()>,
    /// The state folder's lock, held while the daemon runs.
    lock: catalog::Lock,
}

/// Locks and opens the storage (index, catalog), and starts the pipeline and the retention thread.
fn start_storage(
    config: &Config,
    inflight: usize,
    outcomes: tokio::sync::mpsc::UnboundedSender<pipeline::Outcome>,
    health: &Arc<Health>,
) -> Result<Storage, Error> {
    storage::create_dir(&config.state_dir(), storage::DIR_MODE)?;
    // One process at a time changes the state folder: `imaged prune` takes the same lock.
    let lock = retention::lock_state(&config.state_dir(), Duration::from_secs(60)).map_err(
        |e| match e {
            retention::LockError::Storage(e) => Error::Storage(e),
            retention::LockError::Busy(why) => Error::Locked(why),
        },
    )?;
    let (index, recovery) = open_storage(config)?;
    log_recovery(&recovery);
    let (store, catalog) = open_catalog(config, &index)?;
    let counts = catalog.counts();
    health.stats.set_appended(counts.images, counts.bytes);
    let policy = crate::retention::Policy::new(&config.retention);
    let pending = Arc::new(retention::Pending::new(
        recovery.unconfirmed.iter().map(|(_, name)| name.clone()),
    ));
    let (retention, retention_thread) = retention::start(
        retention::Settings {
            image_dir: config.storage.dir.clone(),
            quarantine_dir: config.quarantine_dir(),
            skip: vec![config.quarantine_dir(), config.state_dir()],
            policy,
            quarantine_max: config.storage.quarantine_max_size.0,
        },
        store,
        pending.clone(),
        health.clone(),
    );
    let settings = pipeline::Settings {
        image_dir: config.storage.dir.clone(),
        now: reload::pipeline_settings(config),
        quarantine_dir: config.quarantine_dir(),
        file_mode: config.storage.file_mode.0,
        max_image_bytes: config.storage.max_image_bytes,
        writers: config.storage.writers,
        republish_images: inflight,
        republish_bytes: config.limits.inflight_bytes,
        accept_base64: config.storage.accept_base64,
    };
    let pipeline = Pipeline::start(
        settings,
        index,
        recovery.unconfirmed,
        pipeline::Retention {
            catalog,
            pending,
            handle: retention.clone(),
        },
        outcomes,
        health.clone(),
    );
    Ok(Storage {
        pipeline,
        retention,
        retention_thread,
        lock,
    })
}

/// Gives memory freed by finished images back to the operating system every second while images are
/// stored, republished or rejected (and once more when that stops), so RSS follows the live images rather
/// than the heap's high-water mark. A republish frees its payload only at the broker's PUBACK, often after
/// the last image was stored, so the republishes count too. (A low mmap threshold would do it at every
/// free, but costs a page fault per page of every image: about a fifth more CPU for large images.)
async fn trim_memory(health: Arc<Health>) {
    let finished = || {
        let s = &health.stats;
        [&s.stored, &s.duplicates, &s.rejected, &s.republished]
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
    };
    let mut trimmed_at = finished();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = finished();
        if now != trimmed_at {
            trimmed_at = now;
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim only returns free heap pages to the kernel.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}

/// `imaged prune` asks for a pass now with SIGUSR1.
async fn prune_requests(mut requests: tokio::signal::unix::Signal, retention: retention::Handle) {
    while requests.recv().await.is_some() {
        info!("Asked for a retention pass now (SIGUSR1, as imaged prune sends)");
        retention.request();
    }
}

/// Creates the folders, removes temp files a crash left behind, makes what the folders hold durable, proves
/// them writable, and opens the index (recovering it after a crash). The image folders themselves are not
/// listed: they may hold millions of files (temp files are written in the small `.incoming/` folder; an
/// older version's among the images are removed by the catalog's catch-up, after READY).
fn open_storage(config: &Config) -> Result<(Index, Recovery), PathError> {
    let images = &config.storage.dir;
    let incoming = storage::incoming_dir(images);
    let quarantine = config.quarantine_dir();
    let state = config.state_dir();
    for dir in [images, &incoming, &quarantine, &state] {
        storage::create_dir(dir, storage::DIR_MODE)?;
    }
    let catalog = catalog::dir(&state);
    for dir in [&state, &catalog] {
        if dir.is_dir() {
            let removed = storage::sweep_hidden_files(dir)?;
            if removed > 0 {
                info!(
                    "Removed {removed} temp files of imaged's own from {}",
                    dir.display()
                );
            }
        }
    }
    for dir in [&incoming, &quarantine] {
        let removed = storage::sweep_temp_files(dir)?;
        if removed > 0 {
            info!("Removed {removed} unfinished temp files from {} (writes a crash cut short, never acknowledged)", dir.display());
        }
        // Writable now, or say so before READY.
        drop(storage::write_temp(dir, b"", config.storage.file_mode.0)?);
    }
    for dir in [images, &quarantine] {
        // A run killed between its renames and the folder's fsync leaves names that are only in the page
        // cache. The index recovery below would take such an image as stored and its redelivery would be
        // acknowledged as a duplicate, while a power cut could still take the file away: so the folder is made
        // durable as it is before anything in it is trusted (an fsync, not a listing).
        storage::sync_dir(dir)?;
    }
    // The state folder is fsynced by Index::open, after it may have created the log there.
    let (index, recovery) = Index::open(&state, images, config.storage.dedup_window)?;
    // Images in camera and date folders: the folders of the outbox's images are the ones a killed run may
    // not have fsynced yet (an acknowledged image's folder was), so they too are made durable now.
    let folders: std::collections::BTreeSet<_> = recovery
        .unconfirmed
        .iter()
        .filter_map(|(_, name)| images.join(name).parent().map(std::path::Path::to_path_buf))
        .filter(|folder| folder != images)
        .collect();
    for folder in folders {
        storage::sync_dir(&folder)?;
    }
    Ok((index, recovery))
}

/// Opens the retention catalog, and lists in it what a crash kept from it.
fn open_catalog(
    config: &Config,
    index: &Index,
) -> Result<(crate::retention::Store, catalog::Writer), PathError> {
    let images = &config.storage.dir;
    let (store, mut writer, opened) =
        catalog::open(&config.state_dir(), crate::clock::now_ms(), || {
            catalog::has_images(images)
        })?;
    if opened.created && store.checkpoint.catch_up {
        info!("Catalog: new; the images stored before it are listed once imaged is ready");
    }
    if opened.rebuilt && !opened.created {
        warn!("Catalog: its checkpoint was missing or damaged; the lines were counted again");
    }
    if opened.bad_lines > 0 || opened.torn_bytes > 0 {
        warn!(
            "Catalog: skipped {} corrupted lines and {} bytes of a torn last line (a crash mid-write)",
            opened.bad_lines, opened.torn_bytes
        );
    }
    let restored = if store.checkpoint.catch_up {
        0
    } else {
        retention::restore_lost_lines(&mut writer, index.newest(), images)?
    };
    if restored > 0 {
        info!("Catalog: listed {restored} images stored just before imaged stopped, whose lines it had lost");
    }
    info!(
        "Catalog: {} images, {} stored",
        store.checkpoint.images + restored as u64,
        crate::config::Size(store.checkpoint.bytes)
    );
    Ok((store, writer))
}

fn log_recovery(r: &Recovery) {
    if r.bad_records > 0 || r.torn_bytes > 0 {
        warn!(
            "Index: skipped {} corrupted records and {} bytes of a torn last record (a crash mid-write); rebuilt",
            r.bad_records, r.torn_bytes
        );
    }
    for name in &r.dropped {
        info!("Index: {name} was being stored when imaged stopped and never finished; the broker delivers it again");
    }
    info!(
        "Index: {} images remembered for dedup, {} republishes to send",
        r.entries,
        r.unconfirmed.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use storage::power_cut::Power;

    #[test]
    fn start_up_makes_an_image_a_crash_left_unsynced_durable_before_the_index_trusts_it() {
        let Some(mut power) = Power::mount(|_| {}) else {
            return;
        };
        let mut config = Config::default();
        config.storage.dir = power.root().join("images");
        let images = config.storage.dir.clone();
        let image = b"\xFF\xD8\xFF an image \xFF\xD9";
        let hash: index::Hash = Sha256::digest(image).into();
        {
            let (mut index, _) = open_storage(&config).unwrap();
            // The committer's record and rename, then kill -9 before its fsync of the folder.
            index
                .record_stored(&[index::NewImage {
                    hash,
                    size: image.len() as u64,
                    name: "image_1.jpg".into(),
                    origin: None,
                }])
                .unwrap();
            let temp = storage::write_temp(&images, image, 0o640).unwrap();
            assert!(matches!(
                storage::persist(temp, &images, "image_1.jpg").unwrap(),
                storage::Persisted::Done
            ));
        }
        // The restart: the image counts as stored, so its redelivery will be acknowledged as a duplicate.
        let (index, recovery) = open_storage(&config).unwrap();
        assert_eq!(
            recovery.unconfirmed,
            vec![(hash, "image_1.jpg".to_string())]
        );
        assert!(index.get(&hash).is_some());
        drop(index);
        power.cut_and_reboot();
        assert_eq!(
            std::fs::read(images.join("image_1.jpg")).unwrap(),
            image,
            "the image acknowledged as stored is still there"
        );
    }
}
