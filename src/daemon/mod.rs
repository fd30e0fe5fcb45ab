//! The daemon: opens the storage, starts the pipeline and the MQTT session, reports to systemd, and stops
//! cleanly on SIGTERM.
//!
//! [`session`] owns the broker connection and hands uploads to the [`pipeline`], whose threads write them
//! and settle them against the [`index`] and list them in the retention catalog; [`retention`] deletes the
//! oldest as `[retention]` says; [`health`] holds what the parts share about themselves, which [`systemd`]
//! turns into READY, STATUS and watchdog pings; [`shutdown`] is the stop signal.

mod health;
mod index;
mod pipeline;
mod retention;
mod session;
mod shutdown;
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

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<(), Error> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> Result<(), Error> {
    let broker_name = config.broker_name();
    info!(
        "imaged {} starting: broker {broker_name} as '{}', uploads '{}', storage {}",
        env!("CARGO_PKG_VERSION"),
        config.client_id(),
        config.topics.upload,
        config.storage.dir.display()
    );
    // Before the state folder's lock, which tells `imaged prune` whom to signal: SIGUSR1 would end a
    // process without a handler.
    let prune_signals =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
            .map_err(Error::Runtime)?;
    let limits = &config.limits;
    let inflight = u16::try_from(limits.inflight_images.min(usize::from(u16::MAX) - 16))
        .expect("bounded to fit");
    let (client, eventloop) = mqtt::connect(
        &config.broker,
        config.client_id(),
        config.max_packet_bytes(),
        Role::Daemon {
            inflight: inflight + 16,
        },
    )
    .map_err(|e| config.error(e))?;
    for warning in mqtt::local_broker_warnings(&config.broker.host, config.broker.port) {
        warn!("{warning}");
    }
    if crate::clock::offset_secs() != 0 {
        warn!(
            "The clock is offset by {}s ({}): for tests only",
            crate::clock::offset_secs(),
            crate::clock::OFFSET_ENV
        );
    }
    let health = Arc::new(Health::default());
    let (outcomes_tx, outcomes_rx) = tokio::sync::mpsc::unbounded_channel();
    let storage = start_storage(&config, inflight as usize, outcomes_tx, &health)?;
    let (pipeline, retention) = (storage.pipeline, storage.retention);
    let session = Session::new(
        session::Settings {
            broker: broker_name.clone(),
            upload: config.topics.upload.clone(),
            stored: config.topics.stored.clone(),
            max_images: limits.inflight_images,
            max_bytes: limits.inflight_bytes,
            max_packet: config.max_packet_bytes(),
            subscription_file: config.state_dir().join("subscription"),
        },
        client,
        pipeline.inbox.clone(),
        health.clone(),
    );
    let supervisor = tokio::spawn(systemd::supervise(health.clone(), broker_name.clone()));
    let trimmer = tokio::spawn(trim_memory(health.clone()));
    let prune_requests = tokio::spawn(prune_requests(prune_signals, retention.clone()));
    let ready_status = format!("connected to {broker_name}; ready");
    let result = session
        .run(eventloop, outcomes_rx, shutdown::requested(), || {
            systemd::ready(&ready_status);
            retention.ready();
        })
        .await;
    supervisor.abort();
    trimmer.abort();
    prune_requests.abort();

    // A thread stuck in the kernel must not keep the process from exiting: nothing unacknowledged is lost.
    let joined = tokio::task::spawn_blocking(move || pipeline.join());
    if tokio::time::timeout(Duration::from_secs(5), joined)
        .await
        .is_err()
    {
        warn!("the storage threads did not stop within 5s; exiting without them");
    }
    retention.shutdown();
    let retention_thread = storage.retention_thread;
    let joined = tokio::task::spawn_blocking(move || retention_thread.join());
    if tokio::time::timeout(Duration::from_secs(10), joined)
        .await
        .is_err()
    {
        warn!("the retention thread did not stop within 10s; exiting without it");
    }
    drop(storage.lock);
    result?;
    info!("Stopped");
    Ok(())
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
        path: config.storage.path.clone(),
        upload_filter: config.topics.upload.clone(),
        quarantine_dir: config.quarantine_dir(),
        file_mode: config.storage.file_mode.0,
        max_image_bytes: config.storage.max_image_bytes,
        writers: config.storage.writers,
        republish_images: inflight,
        republish_bytes: config.limits.inflight_bytes,
        min_free: policy.watches_free_space().then_some(policy.min_free),
        max_size: policy.max_bytes,
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

/// Creates the folders, removes temp files a crash left behind, proves the folders writable, and opens the
/// index (recovering it after a crash). The image folders themselves are not listed: they may hold millions
/// of files (temp files are written in the small `.incoming/` folder; an older version's among the images
/// are removed by the catalog's catch-up, after READY).
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
            info!("Removed {removed} unfinished temp files from {} (writes cut short, never acknowledged)", dir.display());
        }
        // Writable now, or say so before READY.
        drop(storage::write_temp(dir, b"", config.storage.file_mode.0)?);
    }
    Index::open(&state, images, config.storage.dedup_window)
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
