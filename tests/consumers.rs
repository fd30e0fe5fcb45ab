//! What imaged publishes for its consumers, against real Mosquitto, the real binary and real clients
//! (mosquitto_sub, imaged receive): per-camera stored topics and retained images, image events, status and
//! last will, stats, Home Assistant discovery, base64 uploads.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use common::load::{Mode, Proxy};
use common::*;
use serde_json::Value;

const STATUS: &str = "imaged/test/status";

/// A mosquitto_sub on `filters` printing `topic payload` lines, collected as they come. Started before
/// what it watches: `start` returns once a probe message of its own has come through.
struct Sub {
    child: Child,
    lines: Arc<Mutex<Vec<(String, String)>>>,
}

impl Sub {
    fn start(port: u16, filters: &[&str]) -> Sub {
        let probe = format!("probe/{}", fastrand::u64(..));
        let mut cmd = Command::new("mosquitto_sub");
        cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-v"]);
        for filter in filters.iter().chain([&probe.as_str()]) {
            cmd.args(["-t", filter]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_sub runs");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (out, seen) = (child.stdout.take().unwrap(), lines.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let (topic, payload) = line.split_once(' ').unwrap_or((&line, ""));
                seen.lock()
                    .unwrap()
                    .push((topic.to_string(), payload.to_string()));
            }
        });
        let sub = Sub { child, lines };
        wait_until(
            "mosquitto_sub is subscribed",
            Duration::from_secs(10),
            || {
                mosquitto_pub(port, &probe, b"probe", &[]);
                sub.lines().iter().any(|(t, _)| *t == probe)
            },
        );
        sub
    }

    fn lines(&self) -> Vec<(String, String)> {
        self.lines.lock().unwrap().clone()
    }

    fn on(&self, topic: &str) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, p)| p)
            .collect()
    }

    fn wait_on(&self, topic: &str, n: usize) -> Vec<String> {
        wait_until(
            &format!("{n} messages on {topic}"),
            Duration::from_secs(20),
            || self.on(topic).len() >= n,
        );
        self.on(topic)
    }

    fn clear(&self) {
        self.lines.lock().unwrap().clear();
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a late subscriber gets on `topic` at once: its retained message (raw bytes), if any.
fn retained(port: u16, topic: &str) -> Option<Vec<u8>> {
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic])
        .args(["-C", "1", "-W", "3", "-N", "--retained-only"])
        .output()
        .unwrap();
    (out.status.success() && !out.stdout.is_empty()).then_some(out.stdout)
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"))
}

#[test]
fn each_camera_gets_its_own_stored_topic_and_a_late_viewer_sees_its_latest_image_at_once() {
    let broker = Broker::start();
    let mut daemon = Daemon::start_with(
        broker.port,
        "[topics]\nupload = \"image/upload/+\"\nstored = \"image/stored/{camera}\"\nretain_stored = true\n",
        &[],
    );
    daemon.wait_ready();
    let images: Vec<Vec<u8>> = (0..4).map(|i| jpeg(1200 + i, 3000)).collect();
    let cameras = ["cam1", "cam1", "cam2", "caf\u{e9} 3"];
    for (image, camera) in images.iter().zip(cameras) {
        assert!(broker.mosquitto_pub(&format!("image/upload/{camera}"), image));
    }
    wait_until("all are republished", Duration::from_secs(20), || {
        daemon.log_count("Image re-published on topic 'image/stored/") == 4
    });
    assert_eq!(
        retained(broker.port, "image/stored/cam1"),
        Some(images[1].clone()),
        "cam1's latest"
    );
    assert_eq!(
        retained(broker.port, "image/stored/cam2"),
        Some(images[2].clone())
    );
    // A camera's name from its topic, made safe as for the storage folder: a topic without wildcards.
    assert_eq!(
        retained(broker.port, "image/stored/caf%C3%A93"),
        None,
        "no other spelling"
    );
    assert_eq!(
        retained(broker.port, "image/stored/caf%C3%A9%203"),
        Some(images[3].clone())
    );
    // imaged receive on the per-camera filter gets the retained images, into the daemon's camera folders.
    let dir = scratch();
    let port = broker.port.to_string();
    let out = Command::new(imaged_bin())
        .args([
            "--config",
            "/dev/null",
            "receive",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
        ])
        .args([
            "--topic",
            "image/stored/+",
            "--count",
            "3",
            "--path",
            "{camera}/x.jpg",
            "--dir",
        ])
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = stored_in(dir.path());
    let folders: std::collections::BTreeSet<&str> =
        got.keys().map(|n| n.split('/').next().unwrap()).collect();
    assert_eq!(
        folders.into_iter().collect::<Vec<_>>(),
        ["caf%C3%A9%203", "cam1", "cam2"]
    );
}

#[test]
fn an_event_for_each_stored_image_names_its_file_camera_size_hash_time_and_topic() {
    let broker = Broker::start();
    let events = Sub::start(broker.port, &["imaged/events"]);
    let mut daemon = Daemon::start_with(
        broker.port,
        "[topics]\nupload = \"image/upload/+\"\nevents = \"imaged/events\"\n[storage]\npath = \"{camera}/%Y/image_%H%M%S.jpg\"\n",
        &[],
    );
    daemon.wait_ready();
    let before = chrono::Utc::now() - chrono::Duration::seconds(1);
    let images: Vec<Vec<u8>> = (0..3)
        .map(|i: usize| jpeg(1300 + i as u64, 2000 + 100 * i))
        .collect();
    for (i, image) in images.iter().enumerate() {
        assert!(broker.mosquitto_pub(&format!("image/upload/cam{}", i % 2), image));
    }
    // A duplicate is not stored again, and gets no event.
    assert!(broker.mosquitto_pub("image/upload/cam0", &images[0]));
    let got = events.wait_on("imaged/events", 3);
    let after = chrono::Utc::now() + chrono::Duration::seconds(1);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        events.on("imaged/events").len(),
        3,
        "one event per stored image"
    );
    let images_dir = std::fs::canonicalize(&daemon.images).unwrap();
    for (i, text) in got.iter().enumerate() {
        let event = json(text);
        let fields: Vec<&str> = event
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            fields.len(),
            8,
            "path name camera bytes sha256 received_at topic duplicate: {fields:?}"
        );
        let path = std::path::PathBuf::from(event["path"].as_str().unwrap());
        assert!(path.is_absolute(), "{path:?}");
        let name = event["name"].as_str().unwrap();
        assert_eq!(std::fs::canonicalize(&path).unwrap(), images_dir.join(name));
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes, images[i], "in the order stored");
        assert_eq!(event["bytes"], bytes.len());
        assert_eq!(event["sha256"], hex(&sha(&bytes)));
        let camera = format!("cam{}", i % 2);
        assert_eq!(event["camera"], camera.as_str());
        assert!(name.starts_with(&format!("{camera}/")), "{name}");
        assert_eq!(event["topic"], format!("image/upload/{camera}"));
        assert_eq!(event["duplicate"], false);
        let at = event["received_at"].as_str().unwrap();
        assert!(at.ends_with('Z'), "UTC: {at}");
        let at = chrono::DateTime::parse_from_rfc3339(at).unwrap();
        assert!(before <= at && at <= after, "{at}");
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_kill_between_storing_an_image_and_publishing_its_event_loses_no_event() {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port);
    let events = Sub::start(broker.port, &["imaged/events"]);
    let mut daemon = Daemon::start_with(proxy.port, "[topics]\nevents = \"imaged/events\"\n", &[]);
    daemon.wait_ready();
    // imaged gets the upload and stores it, but nothing it sends reaches the broker: no ack, no republish,
    // no event. Then kill -9.
    proxy.set(Mode::ToClientOnly);
    let image = jpeg(1400, 5000);
    assert!(broker.mosquitto_pub("image/upload", &image));
    daemon.wait_stored(1, Duration::from_secs(10));
    daemon.kill9();
    proxy.cut();
    proxy.set(Mode::Pass);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        events.on("imaged/events").is_empty(),
        "the event never left"
    );

    daemon.spawn();
    daemon.wait_ready_n(2);
    assert!(
        daemon.log().contains("1 republishes to send"),
        "from the outbox"
    );
    let got = events.wait_on("imaged/events", 1);
    let event = json(&got[0]);
    assert_eq!(event["sha256"], hex(&sha(&image)));
    assert_eq!(event["topic"], "image/upload");
    assert_eq!(
        daemon.stored().len(),
        1,
        "the redelivered upload is a duplicate"
    );
    // Confirmed now: a clean restart sends it no more.
    wait_until("the outbox is empty", Duration::from_secs(10), || {
        daemon.log_count("Image re-published") >= 1
    });
    assert!(daemon.terminate().success());
    events.clear();
    daemon.spawn();
    daemon.wait_ready_n(3);
    std::thread::sleep(Duration::from_millis(500));
    assert!(events.on("imaged/events").is_empty());
}

#[test]
fn a_killed_imaged_is_offline_by_its_last_will_online_again_after_a_restart_and_offline_after_a_clean_stop(
) {
    will_online_and_clean_stop("3.1.1");
}

#[test]
fn under_mqtt_5_the_last_will_online_and_offline_work_alike() {
    will_online_and_clean_stop("5");
}

fn will_online_and_clean_stop(protocol: &str) {
    let broker = Broker::start();
    let status = Sub::start(broker.port, &[STATUS]);
    let config = format!("[broker]\nprotocol = \"{protocol}\"\n[topics]\nstatus = \"{STATUS}\"\n");
    let mut daemon = Daemon::start_with(broker.port, &config, &[]);
    daemon.wait_ready();
    assert_eq!(status.wait_on(STATUS, 1), ["online"]);
    daemon.kill9();
    assert_eq!(status.wait_on(STATUS, 2), ["online", "offline"], "the will");
    daemon.spawn();
    assert_eq!(status.wait_on(STATUS, 3)[2], "online");
    assert!(daemon.terminate().success());
    assert_eq!(
        status.wait_on(STATUS, 4)[3],
        "offline",
        "a clean stop says so"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(status.on(STATUS).len(), 4, "no will after a clean stop");
    assert_eq!(
        retained(broker.port, STATUS).as_deref(),
        Some(&b"offline"[..])
    );
}

#[test]
fn the_stats_are_retained_json_with_the_status_lines_counters_and_follow_each_change() {
    let broker = Broker::start();
    let stats_topic = format!("{STATUS}/stats");
    let stats = Sub::start(broker.port, &[&stats_topic]);
    let config = format!("[topics]\nstatus = \"{STATUS}\"\nupload = \"image/upload/+\"\n");
    let mut daemon = Daemon::start_with(broker.port, &config, &[]);
    daemon.wait_ready();
    let first = json(&stats.wait_on(&stats_topic, 1)[0]);
    for key in [
        "stored",
        "duplicates",
        "rejected",
        "republished",
        "images_kept",
        "bytes_kept",
        "last_image",
        "last_image_age_secs",
        "disk_trouble",
        "space_low",
        "broker",
        "connected",
        "cameras",
    ] {
        assert!(first.get(key).is_some(), "{key} in {first}");
    }
    assert_eq!(first["stored"], 0);
    assert_eq!(first["last_image"], Value::Null);
    let image = jpeg(1500, 4000);
    assert!(broker.mosquitto_pub("image/upload/cam7", &image));
    assert!(broker.mosquitto_pub("image/upload/cam7", &image));
    assert!(broker.mosquitto_pub("image/upload/cam7", b"not a jpeg"));
    wait_until("the stats show them", Duration::from_secs(10), || {
        let last = stats.on(&stats_topic).last().map(|t| json(t));
        last.is_some_and(|s| s["rejected"] == 1 && s["duplicates"] == 1 && s["republished"] == 1)
    });
    let now = json(&String::from_utf8(retained(broker.port, &stats_topic).unwrap()).unwrap());
    assert_eq!(now["stored"], 1);
    assert_eq!(now["bytes_kept"], 4000);
    assert_eq!(now["images_kept"], 1);
    assert_eq!(now["connected"], true);
    assert!(now["last_image"].as_str().unwrap().ends_with('Z'));
    assert!(now["cameras"]["cam7"]["last_image"].is_string(), "{now}");
    assert_eq!(now["disk_trouble"], false);
}

/// The discovery configs seen, by topic (the latest of each).
fn configs(sub: &Sub) -> HashMap<String, Value> {
    sub.lines()
        .into_iter()
        .filter(|(t, _)| t.ends_with("/config"))
        .map(|(t, p)| (t, json(&p)))
        .collect()
}

/// Checks a discovery config against Home Assistant's schema (the keys its MQTT discovery requires of
/// every entity imaged announces, and of the image and sensor platforms), and that every topic it names
/// is one imaged really publishes: a late subscriber finds a retained message there.
fn check_config(port: u16, topic: &str, config: &Value, stats: &Value) {
    let component = topic.split('/').nth(1).unwrap();
    let mut required = vec![
        "name",
        "unique_id",
        "device",
        "availability_topic",
        "origin",
    ];
    match component {
        "image" => required.extend(["image_topic", "content_type"]),
        "sensor" => required.extend(["state_topic", "value_template"]),
        other => panic!("an unexpected component {other}"),
    }
    for key in required {
        assert!(config.get(key).is_some(), "{topic}: no {key} in {config}");
    }
    for level in &topic.split('/').collect::<Vec<_>>()[2..4] {
        assert!(
            level
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "{topic}: node and object ids are [a-zA-Z0-9_-]"
        );
    }
    assert!(config["device"]["identifiers"]
        .as_array()
        .is_some_and(|a| !a.is_empty()));
    assert_eq!(config["availability_topic"], STATUS);
    assert_eq!(config["payload_available"], "online");
    for key in ["image_topic", "state_topic", "availability_topic"] {
        if let Some(named) = config.get(key).and_then(Value::as_str) {
            assert!(
                retained(port, named).is_some(),
                "{topic}: {key} {named} is not a topic imaged publishes"
            );
        }
    }
    if component == "image" {
        assert_eq!(config["content_type"], "image/jpeg");
    }
    if let Some(template) = config.get("value_template").and_then(Value::as_str) {
        // `{{ value_json.a }}` or `{{ value_json.cameras['x'].last_image }}`: the path must be in the stats.
        let path = template
            .trim_start_matches("{{ value_json.")
            .trim_end_matches(" }}");
        let mut value = stats;
        for part in path.split('.') {
            value = match part.split_once("['") {
                Some((map, key)) => &value[map][key.trim_end_matches("']")],
                None => &value[part],
            };
            assert!(
                !value.is_null() || part == "last_image",
                "{template} in {stats}"
            );
        }
    }
}

#[test]
fn home_assistant_discovers_two_cameras_a_third_that_comes_later_and_all_again_after_its_birth_message(
) {
    let broker = Broker::persistent();
    let discovery = Sub::start(broker.port, &["homeassistant/#"]);
    let config = format!(
        "[topics]\nupload = \"image/upload/+\"\nstored = \"image/stored/{{camera}}\"\nretain_stored = true\nstatus = \"{STATUS}\"\n[homeassistant]\nenabled = true\n"
    );
    let mut daemon = Daemon::start_with(broker.port, &config, &[]);
    daemon.wait_ready();
    for (i, camera) in ["front", "back"].iter().enumerate() {
        assert!(broker.mosquitto_pub(
            &format!("image/upload/{camera}"),
            &jpeg(1600 + i as u64, 2000)
        ));
    }
    let image_of = |camera: &str| {
        let topic = format!("image/stored/{camera}");
        move |configs: &HashMap<String, Value>| {
            configs.values().any(|c| c["image_topic"] == topic.as_str())
        }
    };
    wait_until(
        "both cameras are announced",
        Duration::from_secs(20),
        || {
            let seen = configs(&discovery);
            image_of("front")(&seen) && image_of("back")(&seen)
        },
    );
    std::thread::sleep(Duration::from_millis(1500));
    let stats = json(
        &String::from_utf8(retained(broker.port, &format!("{STATUS}/stats")).unwrap()).unwrap(),
    );
    let seen = configs(&discovery);
    // The device's two sensors, and an image and a last-image sensor per camera.
    assert_eq!(seen.len(), 6, "{:?}", seen.keys());
    for (topic, config) in &seen {
        check_config(broker.port, topic, config, &stats);
        assert_eq!(
            retained(broker.port, topic)
                .map(|b| json(&String::from_utf8(b).unwrap()))
                .as_ref(),
            Some(config),
            "retained"
        );
    }
    let devices: std::collections::HashSet<String> = seen
        .values()
        .map(|c| c["device"]["identifiers"][0].to_string())
        .collect();
    assert_eq!(devices.len(), 1, "one device");

    // A camera that appears later.
    assert!(broker.mosquitto_pub("image/upload/side", &jpeg(1610, 2000)));
    wait_until(
        "the third camera is announced",
        Duration::from_secs(20),
        || {
            let seen = configs(&discovery);
            image_of("side")(&seen) && seen.len() == 8
        },
    );

    // Home Assistant restarts: its birth message asks for everything again, also after imaged restarted.
    assert!(daemon.terminate().success());
    daemon.spawn();
    daemon.wait_ready_n(2);
    std::thread::sleep(Duration::from_millis(500));
    discovery.clear();
    assert!(mosquitto_pub_qos0(
        broker.port,
        "homeassistant/status",
        b"online"
    ));
    wait_until("all is announced again", Duration::from_secs(20), || {
        configs(&discovery).len() == 8
    });
    // And the broker's restart keeps what is retained (Mosquitto saves after it acknowledges: give it the
    // moment, as the broker-kill scenario does).
    std::thread::sleep(Duration::from_secs(2));
    let mut broker = broker;
    broker.restart();
    for topic in configs(&discovery).keys() {
        assert!(
            retained(broker.port, topic).is_some(),
            "{topic} survives the broker's restart"
        );
    }
    assert_eq!(
        daemon.stored().len(),
        3,
        "Home Assistant's messages are no uploads"
    );
}

fn mosquitto_pub_qos0(port: u16, topic: &str, payload: &[u8]) -> bool {
    Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            topic,
            "-m",
        ])
        .arg(String::from_utf8_lossy(payload).as_ref())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn base64_text_and_data_uris_are_stored_as_their_jpeg_and_base64_of_anything_else_is_quarantined() {
    let broker = Broker::start();
    let mut daemon = Daemon::start_with(broker.port, "[storage]\naccept_base64 = true\n", &[]);
    daemon.wait_ready();
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let plain = jpeg(1700, 3000);
    let uri = jpeg(1701, 3001);
    let raw = jpeg(1702, 3002);
    assert!(broker.mosquitto_pub("image/upload", b64(&plain).as_bytes()));
    assert!(broker.mosquitto_pub(
        "image/upload",
        format!("data:image/jpeg;base64,{}", b64(&uri)).as_bytes()
    ));
    assert!(broker.mosquitto_pub("image/upload", &raw));
    let not_jpeg = b64(b"GIF89a: not a JPEG at all");
    assert!(broker.mosquitto_pub("image/upload", not_jpeg.as_bytes()));
    daemon.wait_stored(3, Duration::from_secs(10));
    wait_until("the other is quarantined", Duration::from_secs(10), || {
        daemon.log_count("Image rejected") == 1
    });
    let stored = hashes_in(&daemon.images);
    for image in [&plain, &uri, &raw] {
        assert_eq!(stored.get(&sha(image)), Some(&1));
    }
    assert_eq!(stored.len(), 3);
    let quarantined: Vec<Vec<u8>> = std::fs::read_dir(daemon.images.join(".quarantine"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    assert_eq!(quarantined, vec![not_jpeg.into_bytes()], "kept as it came");
}
