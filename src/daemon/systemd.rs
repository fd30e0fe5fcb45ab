//! Talking to systemd: READY once storage is writable and the first subscription is acknowledged, a STATUS
//! line kept current, WATCHDOG pings only while every part of the pipeline shows signs of life, RELOADING and
//! READY around a reload, STOPPING at shutdown. Every call is a no-op when not run by systemd (no `NOTIFY_SOCKET`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sd_notify::NotifyState;

use super::health::{Health, Stats};

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("cannot notify systemd: {e}");
    }
}

pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Before a reload: systemd waits for READY=1. It asks for the monotonic clock's time with RELOADING=1, to
/// tell this reload from an earlier one.
pub fn reloading() {
    // No STATUS: the supervisor sends it only when it changes, so one set here would stay after the reload.
    let mut states = vec![NotifyState::Reloading];
    states.extend(NotifyState::monotonic_usec_now().ok());
    notify(&states);
}

/// After a reload, whether it applied the new config or kept the old one.
pub fn reloaded() {
    notify(&[NotifyState::Ready]);
}

pub fn stopping() {
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: finishing the images in flight"),
    ]);
}

pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// The status line: broker state, counters, age of the last image.
pub fn status_line(stats: &Stats, broker: &str, now_ms: u64) -> String {
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let state = if stats.connected.load(Ordering::Relaxed) {
        "connected to"
    } else {
        "connecting to"
    };
    let last = match get(&stats.last_image_ms) {
        0 => "no image yet".to_string(),
        at => format!("last image {}s ago", now_ms.saturating_sub(at) / 1000),
    };
    let disk = if stats.disk_trouble.load(Ordering::Relaxed) {
        "; DISK FAILING, acks held back"
    } else if stats.space_low.load(Ordering::Relaxed) {
        "; FREE SPACE BELOW retention.min_free, acks held back"
    } else {
        ""
    };
    let (images, bytes) = stats.stored_totals();
    format!(
        "{state} {broker}; stored {}, duplicates {}, rejected {}, republished {}; {last}; keeping {images} images, {}{disk}",
        get(&stats.stored),
        get(&stats.duplicates),
        get(&stats.rejected),
        get(&stats.republished),
        crate::config::Size(bytes),
    )
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Pings the watchdog at half of `WATCHDOG_USEC` while no part has stalled for longer than that half, and
/// refreshes the status line. Runs until the task is dropped.
pub async fn supervise(health: Arc<Health>, broker: String) {
    let watchdog = sd_notify::watchdog_enabled();
    let limit = watchdog.map(|wd| wd / 2).unwrap_or(Duration::MAX);
    // Without a watchdog the ping timer never fires (an hour, then checked again).
    let mut ping = tokio::time::interval(
        watchdog
            .map(|wd| wd / 2)
            .unwrap_or(Duration::from_secs(3600)),
    );
    let mut refresh = tokio::time::interval(Duration::from_secs(1));
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_status = String::new();
    let mut stalled_before = false;
    loop {
        tokio::select! {
            _ = refresh.tick() => {
                let status = status_line(&health.stats, &broker, unix_ms());
                if status != last_status {
                    self::status(&status);
                    last_status = status;
                }
            }
            _ = ping.tick(), if watchdog.is_some() => match health.stalled(limit) {
                None => {
                    stalled_before = false;
                    notify(&[NotifyState::Watchdog]);
                }
                Some((part, age)) => {
                    if !stalled_before {
                        tracing::error!(
                            "The {part} has shown no sign of life for {:.1}s: watchdog pings stop, systemd will restart imaged",
                            age.as_secs_f64()
                        );
                    }
                    stalled_before = true;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_names_the_broker_state_counters_and_last_image_age() {
        let stats = Stats::default();
        assert_eq!(
            status_line(&stats, "localhost:1883", 10_000),
            "connecting to localhost:1883; stored 0, duplicates 0, rejected 0, republished 0; no image yet; keeping 0 images, 0 bytes"
        );
        stats.connected.store(true, Ordering::Relaxed);
        stats.stored.store(5, Ordering::Relaxed);
        stats.last_image_ms.store(4_000, Ordering::Relaxed);
        stats.disk_trouble.store(true, Ordering::Relaxed);
        stats.set_kept(1200, 3_400_000_000, 0, 0);
        let line = status_line(&stats, "b:1", 10_000);
        assert!(line.starts_with("connected to b:1; stored 5,"), "{line}");
        assert!(
            line.contains("last image 6s ago; keeping 1200 images, 3.4 GB; DISK FAILING"),
            "{line}"
        );
    }
}
