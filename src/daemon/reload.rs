//! Reload on SIGHUP (`systemctl reload imaged`): reads the config file again, applies the keys a reload
//! changes ([`crate::config::reload`]) to the parts that use them, names the keys that wait for a restart,
//! and keeps running on the old config when the new one is broken. systemd hears RELOADING=1 and READY=1
//! around it, and `imaged reload` (the unit's ExecReload=) finds the outcome in the answer file
//! ([`config::reload::Answer`]).

use tokio::signal::unix::Signal;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use super::pipeline::{Inbox, Pipeline, Reloadable};
use super::{retention, session, systemd};
use crate::config::reload::{answer_file, monotonic_usec, Answer};
use crate::config::{self, Config};
use crate::{logging, storage};

/// The parts a reload changes.
struct Parts {
    /// Where each reload's [`Answer`] is left.
    answer_file: std::path::PathBuf,
    level: logging::Level,
    session: UnboundedSender<session::Reload>,
    pipeline: std::sync::mpsc::Sender<Inbox>,
    retention: retention::Handle,
}

/// Starts the task that reloads at every SIGHUP, from the config the daemon started with; the session reads
/// its part from the receiver.
pub fn start(
    hangups: Signal,
    config: &Config,
    level: logging::Level,
    pipeline: &Pipeline,
    retention: &retention::Handle,
) -> (JoinHandle<()>, UnboundedReceiver<session::Reload>) {
    let (session, reloads) = tokio::sync::mpsc::unbounded_channel();
    let answer_file = answer_file(
        std::env::var("RUNTIME_DIRECTORY").ok().as_deref(),
        &config.state_dir(),
    );
    // An answer left by an earlier run may carry this process id again (after a reboot, on another boot's
    // clock): `imaged reload` must not take it for an answer.
    if let Err(e) = storage::remove_if_present(&answer_file) {
        warn!("{e}; `imaged reload` may not hear the outcome of a reload");
    }
    let parts = Parts {
        answer_file,
        level,
        session,
        pipeline: pipeline.inbox.clone(),
        retention: retention.clone(),
    };
    (tokio::spawn(run(hangups, config.clone(), parts)), reloads)
}

async fn run(mut hangups: Signal, mut running: Config, parts: Parts) {
    while hangups.recv().await.is_some() {
        let started = monotonic_usec();
        systemd::reloading();
        let (applied, line) = match reload(&mut running, &parts).await {
            Ok(line) => (true, line),
            Err(line) => (false, line),
        };
        let answer = Answer {
            pid: std::process::id(),
            started,
            applied,
            line,
        };
        if let Err(e) =
            storage::replace_file(&parts.answer_file, answer.to_line().as_bytes(), 0o644)
        {
            warn!("{e}; `imaged reload` does not hear the outcome of this reload");
        }
        systemd::reloaded();
    }
}

/// Reloads, and logs what it did; the log line is what `imaged reload` prints. Done once the session has
/// the new upload filter subscribed, so that an upload on it sent after `imaged reload` returned is taken.
async fn reload(running: &mut Config, parts: &Parts) -> Result<String, String> {
    let new = match Config::load(&running.path) {
        Ok(new) => new,
        Err(e) => {
            let line =
                format!("Reload refused: {e}; imaged keeps running on the configuration it had");
            error!("{line}");
            return Err(line);
        }
    };
    let plan = config::reload::plan(running, &new);
    let now = plan.config;
    // For `imaged reload`'s answer, which is one line.
    let mut later = String::new();
    if !plan.restart.is_empty() {
        let keys = plan.restart.join(", ");
        warn!(
            "Reload: {keys} changed and take effect at the next restart (systemctl restart imaged); until then \
             imaged keeps their old values"
        );
        later = format!("; {keys} wait for a restart");
    }
    if plan.applied.is_empty() {
        let line = format!("Reloaded {}: nothing to change now", now.path.display());
        info!("{line}");
        *running = now;
        return Ok(line + &later);
    }
    let level = parts.level.reload(now.log.level);
    let (done, subscribed) = tokio::sync::oneshot::channel();
    let _ = parts.session.send(session::Reload {
        upload: now.topics.upload.clone(),
        stored: now.topics.stored.clone(),
        done,
    });
    let _ = parts.pipeline.send(Inbox::Reload(pipeline_settings(&now)));
    parts
        .retention
        .reload(crate::retention::Policy::new(&now.retention));
    let _ = subscribed.await;
    let line = format!(
        "Reloaded {}: {} apply now (uploads '{}', republished on '{}', stored as '{}', log level {})",
        now.path.display(),
        plan.applied.join(", "),
        now.topics.upload,
        now.topics.stored,
        now.storage.path.as_str(),
        level,
    );
    info!("{line}");
    *running = now;
    Ok(line + &later)
}

/// What [`Reloadable`] the pipeline runs with under `config`.
pub fn pipeline_settings(config: &Config) -> Reloadable {
    let policy = crate::retention::Policy::new(&config.retention);
    Reloadable {
        path: config.storage.path.clone(),
        upload_filter: config.topics.upload.clone(),
        min_free: policy.watches_free_space().then_some(policy.min_free),
        max_size: policy.max_bytes,
        consumers: super::consumers::Settings::new(config),
    }
}
