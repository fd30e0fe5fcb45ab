//! What imaged says about itself over MQTT: `online`/`offline` on the status topic (retained; `offline` is
//! also the last will), the counters of the STATUS line as retained JSON on `<status>/stats`, and Home
//! Assistant's discovery ([`super::homeassistant`]) for the cameras seen.
//!
//! The session owns one [`Status`] and sends what its methods return. The cameras seen are remembered in the
//! state folder, so that discovery can be sent again for all of them after a restart.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use tracing::warn;

use super::consumers::rfc3339_ms;
use super::health::Stats;
use super::homeassistant;
use crate::config::Config;
use crate::storage;

pub const ONLINE: &str = "online";
pub const OFFLINE: &str = "offline";

/// How often the stats go out even when nothing changed.
pub const STATS_PERIOD: Duration = Duration::from_secs(30);
/// The shortest time between two stats messages on change: a burst of images makes one a second.
pub const STATS_MIN_GAP: Duration = Duration::from_secs(1);
/// The most cameras remembered (and announced): topics come from clients, memory is bounded by config.
pub const MAX_CAMERAS: usize = 1000;

/// The status keys of the config. A value of its own, so a reloaded config can be handed over whole.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `topics.status` with the client id; `None` when off.
    pub status: Option<String>,
    /// `homeassistant.discovery_prefix` when discovery is on.
    pub discovery_prefix: Option<String>,
    pub client_id: String,
    /// `topics.stored`, `{camera}` not yet replaced (the image entities' topics).
    pub stored: String,
    /// `host:port`, for the stats.
    pub broker: String,
    /// Where the cameras seen are remembered.
    pub cameras_file: PathBuf,
}

impl Settings {
    pub fn new(config: &Config) -> Settings {
        Settings {
            status: config.status_topic(),
            discovery_prefix: config
                .homeassistant
                .enabled
                .then(|| config.homeassistant.discovery_prefix.clone()),
            client_id: config.client_id().to_string(),
            stored: config.topics.stored.clone(),
            broker: config.broker_name(),
            cameras_file: config.state_dir().join("cameras"),
        }
    }

    /// `<status>/stats`.
    pub fn stats_topic(&self) -> Option<String> {
        self.status.as_ref().map(|s| format!("{s}/stats"))
    }

    /// The topic Home Assistant announces itself on (its birth message).
    pub fn birth_topic(&self) -> Option<String> {
        self.discovery_prefix
            .as_ref()
            .map(|p| format!("{p}/status"))
    }

    /// Whether `topic` is [`Settings::birth_topic`]; asked of every incoming publish, so it builds no string.
    pub fn is_birth(&self, topic: &str) -> bool {
        self.discovery_prefix
            .as_deref()
            .is_some_and(|p| topic.strip_suffix("/status") == Some(p))
    }
}

/// One message to publish: QoS 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
}

impl Message {
    fn retained(topic: &str, payload: impl Into<Bytes>) -> Message {
        Message {
            topic: topic.to_string(),
            payload: payload.into(),
            retain: true,
        }
    }
}

/// The stats message (README, "Consumers"): the STATUS line's counters.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StatsJson {
    /// Since start: images stored, duplicates, payloads rejected, republishes confirmed.
    pub stored: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub republished: u64,
    /// In the storage folder now.
    pub images_kept: u64,
    pub bytes_kept: u64,
    /// RFC 3339, UTC; `null` before the first image since start.
    pub last_image: Option<String>,
    pub last_image_age_secs: Option<u64>,
    pub disk_trouble: bool,
    pub space_low: bool,
    pub broker: String,
    pub connected: bool,
    /// Each camera seen: the time of its last image (`null` when not seen since start).
    pub cameras: BTreeMap<String, CameraJson>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CameraJson {
    pub last_image: Option<String>,
}

/// The stats now. `cameras` maps each camera to the Unix ms of its last image (0: unknown).
pub fn stats_json(
    stats: &Stats,
    broker: &str,
    cameras: &BTreeMap<String, u64>,
    now_ms: u64,
) -> StatsJson {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let flag = |f: &AtomicBool| f.load(Ordering::Relaxed);
    let last = get(&stats.last_image_ms);
    let (images_kept, bytes_kept) = stats.stored_totals();
    let time = |ms: u64| (ms > 0).then(|| rfc3339_ms(ms));
    StatsJson {
        stored: get(&stats.stored),
        duplicates: get(&stats.duplicates),
        rejected: get(&stats.rejected),
        republished: get(&stats.republished),
        images_kept,
        bytes_kept,
        last_image: time(last),
        last_image_age_secs: (last > 0).then(|| now_ms.saturating_sub(last) / 1000),
        disk_trouble: flag(&stats.disk_trouble),
        space_low: flag(&stats.space_low),
        broker: broker.to_string(),
        connected: flag(&stats.connected),
        cameras: cameras
            .iter()
            .map(|(name, &ms)| {
                (
                    name.clone(),
                    CameraJson {
                        last_image: time(ms),
                    },
                )
            })
            .collect(),
    }
}

/// Whether the stats go out now: on change (the age of the last image aside, it changes every second) at
/// most every [`STATS_MIN_GAP`], and every [`STATS_PERIOD`] anyway.
pub fn stats_due(changed: bool, since_last: Option<Duration>) -> bool {
    match since_last {
        None => true,
        Some(since) => since >= STATS_PERIOD || (changed && since >= STATS_MIN_GAP),
    }
}

/// The session's view of what it says about imaged.
pub struct Status {
    settings: Settings,
    /// Each camera seen and the Unix ms of its last image (0: not seen since start).
    cameras: BTreeMap<String, u64>,
    /// The last stats sent (the age of the last image aside), and when.
    last_stats: Option<(StatsJson, Instant)>,
    warned_full: bool,
}

impl Status {
    /// Reads the cameras remembered from an earlier run.
    pub fn new(settings: Settings) -> Status {
        let cameras = std::fs::read_to_string(&settings.cameras_file)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.is_empty())
            .take(MAX_CAMERAS)
            .map(|l| (l.to_string(), 0))
            .collect();
        Status {
            settings,
            cameras,
            last_stats: None,
            warned_full: false,
        }
    }

    /// The last will for the connection: `offline`, retained.
    pub fn will(settings: &Settings) -> Option<crate::mqtt::Will> {
        settings.status.as_ref().map(|topic| crate::mqtt::Will {
            topic: topic.clone(),
            payload: OFFLINE.into(),
        })
    }

    pub fn birth_topic(&self) -> Option<String> {
        self.settings.birth_topic()
    }

    pub fn is_birth(&self, topic: &str) -> bool {
        self.settings.is_birth(topic)
    }

    /// Subscribed on a new connection: `online`, the stats, and discovery of every camera.
    pub fn ready(&mut self, stats: &Stats, now_ms: u64) -> Vec<Message> {
        let Some(status) = &self.settings.status else {
            return Vec::new();
        };
        let mut out = vec![Message::retained(status, ONLINE)];
        out.extend(self.discovery(None));
        self.last_stats = None;
        out.extend(self.tick(stats, now_ms));
        out
    }

    /// Home Assistant (re)started: it needs the discovery again, and the state it shows.
    pub fn birth(&mut self, payload: &[u8], stats: &Stats, now_ms: u64) -> Vec<Message> {
        if payload.trim_ascii() != ONLINE.as_bytes() {
            return Vec::new();
        }
        self.ready(stats, now_ms)
    }

    /// A reload changed `topics.stored`: the image entities' topics change with it.
    pub fn restored(&mut self, stored: &str, stats: &Stats) -> Vec<Message> {
        stored.clone_into(&mut self.settings.stored);
        self.ready(stats, super::systemd::unix_ms())
    }

    /// A clean stop: `offline`, before the DISCONNECT (which makes the broker drop the will).
    pub fn stopping(&self) -> Option<Message> {
        let status = self.settings.status.as_ref()?;
        Some(Message::retained(status, OFFLINE))
    }

    /// A new image of `camera`: remembered, and announced when it is the first.
    pub fn stored(&mut self, camera: &str, at_ms: u64) -> Vec<Message> {
        if let Some(last) = self.cameras.get_mut(camera) {
            *last = (*last).max(at_ms);
            return Vec::new();
        }
        if self.cameras.len() >= MAX_CAMERAS {
            if !self.warned_full {
                warn!(
                    "{MAX_CAMERAS} cameras seen: more are stored, but not announced in the status"
                );
                self.warned_full = true;
            }
            return Vec::new();
        }
        self.cameras.insert(camera.to_string(), at_ms);
        if self.settings.status.is_none() {
            return Vec::new();
        }
        self.save_cameras();
        self.discovery(Some(camera))
    }

    /// The stats, when they are due.
    pub fn tick(&mut self, stats: &Stats, now_ms: u64) -> Vec<Message> {
        let Some(topic) = self.settings.stats_topic() else {
            return Vec::new();
        };
        // Called at every turn of the session's loop: nothing is built between two possible sends.
        if self
            .last_stats
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() < STATS_MIN_GAP)
        {
            return Vec::new();
        }
        let json = stats_json(stats, &self.settings.broker, &self.cameras, now_ms);
        // The age changes every second by itself: not a change.
        let without_age = |j: &StatsJson| StatsJson {
            last_image_age_secs: None,
            ..j.clone()
        };
        let (changed, since) = match &self.last_stats {
            Some((old, at)) => (without_age(old) != without_age(&json), Some(at.elapsed())),
            None => (true, None),
        };
        if !stats_due(changed, since) {
            return Vec::new();
        }
        let payload = serde_json::to_vec(&json).expect("stats serialize");
        self.last_stats = Some((json, Instant::now()));
        vec![Message::retained(&topic, payload)]
    }

    /// Home Assistant's discovery of one new camera, or of everything (`None`).
    fn discovery(&self, new_camera: Option<&str>) -> Vec<Message> {
        let (Some(prefix), Some(status)) = (&self.settings.discovery_prefix, &self.settings.status)
        else {
            return Vec::new();
        };
        let device = homeassistant::Device {
            prefix,
            client_id: &self.settings.client_id,
            status,
            online: ONLINE,
            offline: OFFLINE,
            stored: &self.settings.stored,
        };
        let configs = match new_camera {
            Some(camera) => device.camera(camera),
            None => {
                let mut all = device.sensors();
                for camera in self.cameras.keys() {
                    all.extend(device.camera(camera));
                }
                all
            }
        };
        configs
            .into_iter()
            .map(|(topic, json)| Message::retained(&topic, json))
            .collect()
    }

    fn save_cameras(&self) {
        let text: String = self.cameras.keys().map(|c| format!("{c}\n")).collect();
        if let Err(e) = storage::replace_file(&self.settings.cameras_file, text.as_bytes(), 0o600) {
            warn!("{e}; after a restart, a camera is announced again once it sends an image");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &std::path::Path, homeassistant: bool) -> Settings {
        Settings {
            status: Some("imaged/x/status".into()),
            discovery_prefix: homeassistant.then(|| "homeassistant".to_string()),
            client_id: "x".into(),
            stored: "image/stored/{camera}".into(),
            broker: "localhost:1883".into(),
            cameras_file: dir.join("cameras"),
        }
    }

    #[test]
    fn only_home_assistants_status_topic_is_its_birth_message() {
        let dir = tempfile::tempdir().unwrap();
        let on = settings(dir.path(), true);
        assert!(on.is_birth("homeassistant/status"));
        assert!(!on.is_birth("homeassistant/status/x"));
        assert!(!on.is_birth("xhomeassistant/status"));
        assert!(!on.is_birth("image/upload"));
        assert!(!settings(dir.path(), false).is_birth("homeassistant/status"));
    }

    #[test]
    fn stats_go_out_on_change_at_most_once_a_second_and_every_thirty_seconds_anyway() {
        assert!(stats_due(false, None), "the first");
        assert!(!stats_due(false, Some(Duration::from_secs(29))));
        assert!(stats_due(false, Some(STATS_PERIOD)));
        assert!(!stats_due(true, Some(Duration::from_millis(500))));
        assert!(stats_due(true, Some(STATS_MIN_GAP)));
    }

    #[test]
    fn ready_says_online_and_the_stats_and_a_new_camera_is_announced_once_and_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Stats::default();
        let mut status = Status::new(settings(dir.path(), true));
        let ready = status.ready(&stats, 1000);
        assert_eq!(ready[0], Message::retained("imaged/x/status", ONLINE));
        assert!(ready.iter().any(|m| m.topic == "imaged/x/status/stats"));
        assert_eq!(
            ready
                .iter()
                .filter(|m| m.topic.ends_with("/config"))
                .count(),
            2,
            "the sensors"
        );
        let first = status.stored("cam1", 5000);
        assert_eq!(first.len(), 2, "its image and its last-image sensor");
        assert!(first.iter().all(|m| m.retain));
        assert!(status.stored("cam1", 6000).is_empty());
        // Restarted: the cameras come back, and Home Assistant's birth gets them all.
        let mut again = Status::new(settings(dir.path(), true));
        assert!(again.birth(b"offline", &stats, 1000).is_empty());
        let birth = again.birth(b"online", &stats, 1000);
        assert_eq!(
            birth
                .iter()
                .filter(|m| m.topic.ends_with("/config"))
                .count(),
            4
        );
        assert_eq!(
            again.stopping(),
            Some(Message::retained("imaged/x/status", OFFLINE))
        );
    }

    #[test]
    fn the_stats_name_each_camera_and_the_counters_and_a_changed_age_alone_is_no_change() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Stats::default();
        let mut status = Status::new(settings(dir.path(), false));
        assert!(
            status.stored("cam1", 1_795_000_000_123).is_empty(),
            "no discovery"
        );
        Stats::count(&stats.stored);
        stats
            .last_image_ms
            .store(1_795_000_000_123, Ordering::Relaxed);
        let sent = status.tick(&stats, 1_795_000_001_000);
        let json: serde_json::Value = serde_json::from_slice(&sent[0].payload).unwrap();
        assert_eq!(json["stored"], 1);
        assert_eq!(json["last_image"], "2026-11-18T11:06:40.123Z");
        assert_eq!(
            json["cameras"]["cam1"]["last_image"],
            "2026-11-18T11:06:40.123Z"
        );
        std::thread::sleep(STATS_MIN_GAP);
        assert!(
            status.tick(&stats, 1_795_000_009_000).is_empty(),
            "only the age changed"
        );
        Stats::count(&stats.rejected);
        assert_eq!(status.tick(&stats, 1_795_000_009_000).len(), 1);
    }

    #[test]
    fn cameras_beyond_the_bound_are_stored_but_not_announced() {
        let dir = tempfile::tempdir().unwrap();
        let mut status = Status::new(settings(dir.path(), true));
        for n in 0..MAX_CAMERAS {
            status.stored(&format!("cam{n}"), 1);
        }
        assert!(status.stored("one-more", 1).is_empty());
        assert_eq!(status.cameras.len(), MAX_CAMERAS);
    }
}
