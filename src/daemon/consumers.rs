//! What imaged publishes about each stored image: the republish on its stored topic (per camera with
//! `{camera}`, retained with `topics.retain_stored`) and, with `topics.events` set, the image event, a
//! small JSON "claim check" naming the stored file.
//!
//! Both come from the outbox ([`super::index`]): the committer builds them when an entry's turn comes, from
//! the entry's [`Origin`], so after a crash they are built again exactly as before.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use super::index::{Hash, Origin};
use crate::config::{Config, CAMERA};
use crate::layout::DEFAULT_CAMERA;
use crate::storage::hex;

/// The consumer keys of the config the committer needs. A value of its own, so a reloaded config can be
/// handed over whole.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `topics.stored`, `{camera}` not yet replaced.
    pub stored: String,
    pub retain_stored: bool,
    /// `topics.events`; `None` when off.
    pub events: Option<String>,
    /// `storage.dir`, absolute: events name absolute paths.
    pub image_dir: PathBuf,
}

impl Settings {
    pub fn new(config: &Config) -> Settings {
        let dir = &config.storage.dir;
        Settings {
            stored: config.topics.stored.clone(),
            retain_stored: config.topics.retain_stored,
            events: (!config.topics.events.is_empty()).then(|| config.topics.events.clone()),
            image_dir: std::path::absolute(dir).unwrap_or_else(|_| dir.clone()),
        }
    }
}

/// The stored topic of a camera: `{camera}` replaced by its name (safe levels, so the topic has no
/// wildcard and no empty level).
pub fn stored_topic(template: &str, camera: &str) -> String {
    template.replace(CAMERA, camera)
}

/// The publishes of one stored image, besides its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePublishes {
    pub stored_topic: String,
    pub retain: bool,
    /// The event's topic and JSON.
    pub event: Option<(String, Bytes)>,
}

/// What to publish for the image `name` (of `size` bytes, content `hash`). An entry an earlier version
/// recorded has no origin: its camera is [`DEFAULT_CAMERA`], and it gets no event (its upload topic and
/// receive time were never recorded).
pub fn publishes(
    settings: &Settings,
    hash: &Hash,
    name: &str,
    size: u64,
    origin: Option<&Origin>,
) -> ImagePublishes {
    let camera = origin.map_or(DEFAULT_CAMERA, |o| o.camera.as_str());
    let event = settings.events.as_ref().zip(origin).map(|(topic, origin)| {
        let json = event_json(&settings.image_dir, hash, name, size, origin);
        (topic.clone(), Bytes::from(json))
    });
    ImagePublishes {
        stored_topic: stored_topic(&settings.stored, camera),
        retain: settings.retain_stored,
        event,
    }
}

/// The image event (README, "Consumers"). Field order is the documented one.
#[derive(Debug, Serialize)]
struct Event<'a> {
    path: String,
    name: &'a str,
    camera: &'a str,
    bytes: u64,
    sha256: String,
    received_at: String,
    topic: &'a str,
    /// Always false: an event is published for a newly stored image only. The key is there so a consumer
    /// can keep its check when duplicates are reported too.
    duplicate: bool,
}

fn event_json(image_dir: &Path, hash: &Hash, name: &str, size: u64, origin: &Origin) -> Vec<u8> {
    let event = Event {
        path: image_dir.join(name).to_string_lossy().into_owned(),
        name,
        camera: &origin.camera,
        bytes: size,
        sha256: hex(hash),
        received_at: rfc3339_ms(origin.at_ms),
        topic: &origin.topic,
        duplicate: false,
    };
    serde_json::to_vec(&event).expect("an event serializes")
}

/// Unix ms as RFC 3339 in UTC, to the millisecond (`2026-12-01T11:13:49.123Z`).
pub fn rfc3339_ms(ms: u64) -> String {
    DateTime::<Utc>::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX))
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(stored: &str, events: Option<&str>) -> Settings {
        Settings {
            stored: stored.into(),
            retain_stored: true,
            events: events.map(str::to_string),
            image_dir: "/srv/images".into(),
        }
    }

    fn origin() -> Origin {
        Origin {
            at_ms: 1_795_000_000_123,
            camera: "cam%20one".into(),
            topic: "image/upload/cam one".into(),
        }
    }

    #[test]
    fn each_camera_gets_its_stored_topic_and_an_old_outbox_entry_the_default_one() {
        let s = settings("image/stored/{camera}", None);
        let p = publishes(&s, &[1; 32], "a.jpg", 3, Some(&origin()));
        assert_eq!(p.stored_topic, "image/stored/cam%20one");
        assert!(p.retain);
        assert_eq!(p.event, None, "events are off");
        let old = publishes(&s, &[1; 32], "a.jpg", 3, None);
        assert_eq!(old.stored_topic, "image/stored/default");
        assert_eq!(
            publishes(&settings("image/stored", None), &[1; 32], "a", 3, None).stored_topic,
            "image/stored"
        );
    }

    #[test]
    fn an_event_names_the_file_its_camera_size_hash_time_and_upload_topic() {
        let s = settings("image/stored", Some("imaged/events"));
        let p = publishes(&s, &[0xab; 32], "cam%20one/x.jpg", 3, Some(&origin()));
        let (topic, json) = p.event.unwrap();
        assert_eq!(topic, "imaged/events");
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["path"], "/srv/images/cam%20one/x.jpg");
        assert_eq!(v["name"], "cam%20one/x.jpg");
        assert_eq!(v["camera"], "cam%20one");
        assert_eq!(v["bytes"], 3);
        assert_eq!(v["sha256"], "ab".repeat(32));
        assert_eq!(v["received_at"], "2026-11-18T11:06:40.123Z");
        assert_eq!(v["topic"], "image/upload/cam one");
        assert_eq!(v["duplicate"], false);
        assert_eq!(v.as_object().unwrap().len(), 8);
        assert!(
            publishes(&s, &[0xab; 32], "x.jpg", 3, None).event.is_none(),
            "no event without an origin"
        );
    }
}
