//! Reload on SIGHUP (`systemctl reload imaged`): reads the config file again, applies the keys a reload
//! changes ([`crate::config::reload`]) to the parts that use them, names the keys that wait for a restart,
//! and keeps running on the old config when the new one is broken. systemd hears RELOADING=1 and READY=1
//! around it.

use tokio::signal::unix::Signal;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use super::pipeline::{Inbox, Pipeline, Reloadable};
use super::{retention, session, systemd};
use crate::config::{self, Config};
use crate::logging;

/// The parts a reload changes.
struct Parts {
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
    let parts = Parts {
        level,
        session,
        pipeline: pipeline.inbox.clone(),
        retention: retention.clone(),
    };
    (tokio::spawn(run(hangups, config.clone(), parts)), reloads)
}

async fn run(mut hangups: Signal, mut running: Config, parts: Parts) {
    while hangups.recv().await.is_some() {
        systemd::reloading();
        reload(&mut running, &parts);
        systemd::reloaded();
    }
}

fn reload(running: &mut Config, parts: &Parts) {
    let new = match Config::load(&running.path) {
        Ok(new) => new,
        Err(e) => {
            error!("Reload refused: {e}; imaged keeps running on the configuration it had");
            return;
        }
    };
    let plan = config::reload::plan(running, &new);
    let now = plan.config;
    if !plan.restart.is_empty() {
        warn!(
            "Reload: {} changed and take effect at the next restart (systemctl restart imaged); until then \
             imaged keeps their old values",
            plan.restart.join(", ")
        );
    }
    if plan.applied.is_empty() {
        info!("Reloaded {}: nothing to change now", now.path.display());
        *running = now;
        return;
    }
    let level = parts.level.reload(now.log.level);
    let _ = parts.session.send(session::Reload {
        upload: now.topics.upload.clone(),
        stored: now.topics.stored.clone(),
    });
    let _ = parts.pipeline.send(Inbox::Reload(pipeline_settings(&now)));
    parts
        .retention
        .reload(crate::retention::Policy::new(&now.retention));
    info!(
        "Reloaded {}: {} apply now (uploads '{}', republished on '{}', stored as '{}', log level {})",
        now.path.display(),
        plan.applied.join(", "),
        now.topics.upload,
        now.topics.stored,
        now.storage.path.as_str(),
        level,
    );
    *running = now;
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
