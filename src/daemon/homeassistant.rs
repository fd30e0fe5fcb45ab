//! Home Assistant's MQTT discovery: the retained config messages that make imaged appear as one device with
//! an image entity per camera and sensors for what it stores.
//!
//! Home Assistant's documented schema (integrations/mqtt, "MQTT Discovery", and the image and sensor
//! platforms), and the keys used here:
//! * topic `<discovery_prefix>/<component>/[<node_id>/]<object_id>/config`; `node_id` and `object_id`
//!   consist of `[a-zA-Z0-9_-]` only; the payload is a JSON object, retained so a restarted Home Assistant
//!   finds it, and sent again when Home Assistant publishes `online` on `<discovery_prefix>/status`;
//! * every entity: `name`, `unique_id` (required for the device registry), `device` (`identifiers`,
//!   `name`, `manufacturer`, `model`, `sw_version`), `origin` (`name`, `sw_version`, `support_url`),
//!   `availability_topic` with `payload_available` / `payload_not_available`;
//! * `image`: `image_topic` (required unless `url_topic`: the raw image bytes) and `content_type`
//!   (`image/jpeg`);
//! * `sensor`: `state_topic` (required), `value_template`, `unit_of_measurement`, `device_class`
//!   (`data_size`, `timestamp`: an ISO 8601 time with its zone) and `state_class` (`total_increasing`,
//!   `measurement`). A template that renders `None` (a JSON `null`) makes the state unknown.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::consumers::stored_topic;
use crate::config::CAMERA;

/// The device imaged is in Home Assistant, and where its state comes from.
pub struct Device<'a> {
    pub prefix: &'a str,
    pub client_id: &'a str,
    /// The status topic: availability, and `<status>/stats` for the sensors.
    pub status: &'a str,
    /// What the status topic says while imaged is up, and when it is not.
    pub online: &'a str,
    pub offline: &'a str,
    /// `topics.stored`, `{camera}` not yet replaced.
    pub stored: &'a str,
}

impl Device<'_> {
    /// The device's own sensors: images stored, bytes stored.
    pub fn sensors(&self) -> Vec<(String, Vec<u8>)> {
        let stats = format!("{}/stats", self.status);
        vec![
            self.config(
                "sensor",
                "images_stored",
                json!({
                    "name": "Images stored",
                    "state_topic": stats,
                    "value_template": "{{ value_json.stored }}",
                    "state_class": "total_increasing",
                    "icon": "mdi:image-multiple",
                }),
            ),
            self.config(
                "sensor",
                "bytes_stored",
                json!({
                    "name": "Bytes stored",
                    "state_topic": stats,
                    "value_template": "{{ value_json.bytes_kept }}",
                    "unit_of_measurement": "B",
                    "device_class": "data_size",
                    "state_class": "measurement",
                }),
            ),
        ]
    }

    /// A camera's entities: its image (on its stored topic) and the time of its last image.
    pub fn camera(&self, camera: &str) -> Vec<(String, Vec<u8>)> {
        let id = object_id(camera);
        // Without {camera} every camera's images share one topic: one image entity shows them all.
        let image = if self.stored.contains(CAMERA) {
            self.config(
                "image",
                &format!("image_{id}"),
                json!({
                    "name": camera,
                    "image_topic": stored_topic(self.stored, camera),
                    "content_type": "image/jpeg",
                }),
            )
        } else {
            self.config(
                "image",
                "image",
                json!({
                    "name": "Latest image",
                    "image_topic": self.stored,
                    "content_type": "image/jpeg",
                }),
            )
        };
        let last = self.config(
            "sensor",
            &format!("last_image_{id}"),
            json!({
                "name": format!("{camera} last image"),
                "state_topic": format!("{}/stats", self.status),
                // A camera name is made of safe characters only: no quote ends the string early.
                "value_template": format!("{{{{ value_json.cameras['{camera}'].last_image }}}}"),
                "device_class": "timestamp",
            }),
        );
        vec![image, last]
    }

    /// A config message: the topic, and the entity's keys with those every entity has.
    fn config(&self, component: &str, object: &str, mut entity: Value) -> (String, Vec<u8>) {
        let node = object_id(self.client_id);
        let version = env!("CARGO_PKG_VERSION");
        let fields = entity.as_object_mut().expect("an entity is an object");
        fields.insert("unique_id".into(), json!(format!("{node}_{object}")));
        fields.insert("availability_topic".into(), json!(self.status));
        fields.insert("payload_available".into(), json!(self.online));
        fields.insert("payload_not_available".into(), json!(self.offline));
        fields.insert(
            "device".into(),
            json!({
                "identifiers": [node],
                "name": "imaged",
                "manufacturer": "imaged",
                "model": "imaged camera image store",
                "sw_version": version,
            }),
        );
        fields.insert(
            "origin".into(),
            json!({ "name": "imaged", "sw_version": version }),
        );
        let topic = format!("{}/{component}/{node}/{object}/config", self.prefix);
        (topic, serde_json::to_vec(&entity).expect("JSON serializes"))
    }
}

/// An id of `[a-zA-Z0-9_-]` for a camera or client id: the name with other characters made `_`, and, when
/// any was, a short hash of the name, so two cameras never share an id.
pub fn object_id(name: &str) -> String {
    let plain: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if plain == name {
        return plain;
    }
    let digest = Sha256::digest(name.as_bytes());
    let hash: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("{plain}_{hash}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the schema needs of every entity here, and of each platform.
    const REQUIRED_KEYS: &[&str] = &["name", "unique_id", "device", "availability_topic"];
    const IMAGE_KEYS: &[&str] = &["image_topic", "content_type"];
    const SENSOR_KEYS: &[&str] = &["state_topic", "value_template"];

    fn device(stored: &str) -> Device<'_> {
        Device {
            prefix: "homeassistant",
            client_id: "imaged-1a2b",
            status: "imaged/imaged-1a2b/status",
            online: "online",
            offline: "offline",
            stored,
        }
    }

    fn parse(config: &(String, Vec<u8>)) -> Value {
        serde_json::from_slice(&config.1).unwrap()
    }

    #[test]
    fn a_camera_gets_an_image_entity_on_its_stored_topic_and_a_last_image_sensor() {
        let d = device("image/stored/{camera}");
        let configs = d.camera("cam%20one");
        let id = object_id("cam%20one");
        assert!(id.starts_with("cam_20one_"), "{id}");
        assert_eq!(
            configs[0].0,
            format!("homeassistant/image/imaged-1a2b/image_{id}/config")
        );
        let image = parse(&configs[0]);
        for key in REQUIRED_KEYS.iter().chain(IMAGE_KEYS) {
            assert!(image.get(key).is_some(), "{key}");
        }
        assert_eq!(image["image_topic"], "image/stored/cam%20one");
        assert_eq!(image["content_type"], "image/jpeg");
        assert_eq!(image["availability_topic"], "imaged/imaged-1a2b/status");
        assert_eq!(image["device"]["identifiers"][0], "imaged-1a2b");
        let sensor = parse(&configs[1]);
        for key in REQUIRED_KEYS.iter().chain(SENSOR_KEYS) {
            assert!(sensor.get(key).is_some(), "{key}");
        }
        assert_eq!(sensor["device_class"], "timestamp");
        assert_eq!(
            sensor["value_template"],
            "{{ value_json.cameras['cam%20one'].last_image }}"
        );
    }

    #[test]
    fn without_a_camera_in_the_stored_topic_there_is_one_image_entity() {
        let d = device("image/stored");
        let a = d.camera("a");
        let b = d.camera("b");
        assert_eq!(a[0], b[0]);
        assert_eq!(parse(&a[0])["image_topic"], "image/stored");
        assert_ne!(a[1].0, b[1].0);
    }

    #[test]
    fn object_ids_are_home_assistants_characters_and_distinct() {
        assert_eq!(object_id("cam1"), "cam1");
        let ids = [object_id("a/b"), object_id("a_b"), object_id("a.b")];
        assert!(ids.iter().all(|id| id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')));
        assert_ne!(ids[0], ids[1]);
        assert_ne!(ids[0], ids[2]);
    }
}
