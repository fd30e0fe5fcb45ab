//! The daemon against real Mosquitto brokers: storing, republishing, crashes, bad input, systemd protocol.

mod common;

use std::collections::HashSet;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::*;

const UPLOAD: &str = "image/upload";
const STORED: &str = "image/stored";

#[test]
fn one_image_is_stored_byte_identical_and_republished() {
    let broker = Broker::start();
    let observer = Observer::start(broker.port, STORED);
    let mut daemon = Daemon::start(&broker);
    daemon.wait_ready();

    let image = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/sample.jpg")).unwrap();
    assert!(broker.mosquitto_pub(UPLOAD, &image));
    daemon.wait_stored(1, Duration::from_secs(10));
    observer.wait_for(1, Duration::from_secs(10));

    let stored = daemon.stored();
    let (name, bytes) = stored.iter().next().unwrap();
    assert_eq!(bytes, &image);
    assert!(
        name.starts_with("image_") && name.ends_with(".jpg"),
        "{name}"
    );
    assert!(observer.seen().contains_key(&sha(&image)));
    let log = daemon.log();
    assert!(
        log.contains(&format!(
            "Image saved: {}",
            daemon.images.join(name).display()
        )),
        "{log}"
    );
    common::wait_until("the republish is logged", Duration::from_secs(5), || {
        daemon
            .log()
            .contains("Image re-published on topic 'image/stored'")
    });
}

#[test]
fn a_hundred_images_are_all_stored_and_republished() {
    let broker = Broker::start();
    let observer = Observer::start(broker.port, STORED);
    let mut daemon = Daemon::start(&broker);
    daemon.wait_ready();

    let images: Vec<Vec<u8>> = (0..100usize)
        .map(|i| jpeg(i as u64, 2000 + i * 37))
        .collect();
    for image in &images {
        assert!(broker.mosquitto_pub(UPLOAD, image));
    }
    daemon.wait_stored(100, Duration::from_secs(30));
    observer.wait_for(100, Duration::from_secs(30));
    let stored = hashes_in(&daemon.images);
    for image in &images {
        assert_eq!(stored.get(&sha(image)), Some(&1));
    }
}

#[test]
fn a_20_mb_image_is_stored_byte_identical_and_republished() {
    let broker = Broker::start();
    let observer = Observer::start(broker.port, STORED);
    let mut daemon = Daemon::start(&broker);
    daemon.wait_ready();

    let image = jpeg(20, 20 * 1024 * 1024);
    assert!(broker.mosquitto_pub(UPLOAD, &image));
    daemon.wait_stored(1, Duration::from_secs(30));
    observer.wait_for(1, Duration::from_secs(30));
    assert_eq!(daemon.stored().values().next().unwrap(), &image);
    assert!(observer.seen().contains_key(&sha(&image)));
}

#[test]
fn fifty_images_within_one_second_are_all_kept() {
    let broker = Broker::start();
    let mut daemon = Daemon::start(&broker);
    daemon.wait_ready();

    // Published in parallel so that they land within the same second.
    let images: Vec<Vec<u8>> = (0..50).map(|i| jpeg(1000 + i, 3000)).collect();
    let port = broker.port;
    std::thread::scope(|s| {
        for image in &images {
            s.spawn(move || assert!(mosquitto_pub(port, UPLOAD, image, &[])));
        }
    });
    daemon.wait_stored(50, Duration::from_secs(20));
    let stored = daemon.stored();
    assert_eq!(stored.len(), 50);
    let contents: HashSet<_> = stored.values().map(|b| sha(b)).collect();
    assert_eq!(contents, images.iter().map(|i| sha(i)).collect());
    let seconds: HashSet<_> = stored.keys().map(|n| n[..21].to_string()).collect();
    assert!(
        seconds.len() < 50,
        "the images did land within shared seconds: {seconds:?}"
    );
}

#[test]
fn kill_9_in_the_middle_of_500_images_loses_none_and_stores_each_once() {
    let broker = Broker::persistent();
    let observer = Observer::start(broker.port, STORED);
    let mut daemon = Daemon::start(&broker);
    daemon.wait_ready();

    let images: Vec<Vec<u8>> = (0..500).map(|i| jpeg(5000 + i, 4000)).collect();
    let sender = send_in_background(broker.port, UPLOAD, &images);
    wait_until("some images are stored", Duration::from_secs(30), || {
        daemon.stored_count() >= 150
    });
    daemon.kill9();
    std::thread::sleep(Duration::from_millis(300));
    daemon.spawn();
    daemon.wait_ready_n(2);
    sender.join().unwrap();

    daemon.wait_stored(500, Duration::from_secs(60));
    observer.wait_for(500, Duration::from_secs(60));
    assert_each_stored_once(&daemon.images, &images);
}

#[test]
fn a_broker_killed_and_restarted_mid_stream_loses_nothing() {
    let mut broker = Broker::persistent();
    let observer = Observer::start(broker.port, STORED);
    let mut daemon = Daemon::start(&broker);
    daemon.wait_ready();

    let images: Vec<Vec<u8>> = (0..300).map(|i| jpeg(9000 + i, 3000)).collect();
    let sender = send_in_background(broker.port, UPLOAD, &images);
    wait_until("some images are stored", Duration::from_secs(30), || {
        daemon.stored_count() >= 100
    });
    broker.kill9();
    std::thread::sleep(Duration::from_millis(500));
    broker.restart();
    sender.join().unwrap();

    daemon.wait_stored(300, Duration::from_secs(60));
    observer.wait_for(300, Duration::from_secs(60));
    assert_each_stored_once(&daemon.images, &images);
    assert!(
        daemon.log().contains("Lost the connection"),
        "{}",
        daemon.log()
    );
}

#[test]
fn bad_payloads_are_rejected_with_a_reason_while_good_images_keep_flowing() {
    let broker = Broker::start();
    let extra = "[storage]
dir = \"{dir}/images\"
max_image_bytes = 100000
";
    let mut daemon = Daemon::start_with(broker.port, extra, &[]);
    daemon.wait_ready();

    let good: Vec<Vec<u8>> = (0..20).map(|i| jpeg(300 + i, 5000)).collect();
    let truncated = &good[0][..2500];
    let bad: Vec<(&[u8], &str)> = vec![
        (b"hello, not an image", "does not start with FF D8 FF"),
        (truncated, "does not end with FF D9"),
        (b"", "the payload is empty"),
    ];
    let oversize = jpeg(99, 100_001);
    for (i, image) in good.iter().enumerate() {
        assert!(broker.mosquitto_pub(UPLOAD, image));
        if i < bad.len() {
            assert!(broker.mosquitto_pub(UPLOAD, bad[i].0));
        }
        if i == 10 {
            assert!(broker.mosquitto_pub(UPLOAD, &oversize));
        }
    }
    daemon.wait_stored(20, Duration::from_secs(20));
    // A file is visible before its log line: wait for the lines, the oversized one's too.
    wait_until("every rejection is logged", Duration::from_secs(10), || {
        daemon.log_count("rejected from topic") == 3 && daemon.log_count("refused from topic") == 1
    });
    let log = daemon.log();
    for (_, reason) in &bad {
        assert!(log.contains(reason), "missing {reason:?} in\n{log}");
    }
    assert!(
        log.contains("100001 bytes is over storage.max_image_bytes (100000)"),
        "{log}"
    );
    let stored = hashes_in(&daemon.images);
    assert_eq!(stored.len(), 20);
    for image in &good {
        assert!(stored.contains_key(&sha(image)));
    }
    let quarantined = std::fs::read_dir(daemon.images.join(".quarantine"))
        .unwrap()
        .count();
    assert_eq!(quarantined, 3, "non-JPEG payloads are kept in quarantine");
    assert!(daemon.try_wait().is_none(), "imaged keeps running");
}

#[test]
fn a_packet_larger_than_the_transport_limit_is_refused_once_without_a_reconnect_loop() {
    let broker = Broker::start();
    let extra = "[storage]
dir = \"{dir}/images\"
max_image_bytes = 10000
";
    let mut daemon = Daemon::start_with(broker.port, extra, &[]);
    daemon.wait_ready();

    // Far over the 10 kB limit plus the 64 KiB allowance for topic and header.
    let huge = jpeg(1, 300_000);
    assert!(broker.mosquitto_pub(UPLOAD, &huge));
    let after = jpeg(2, 5000);
    assert!(broker.mosquitto_pub(UPLOAD, &after));
    daemon.wait_stored(1, Duration::from_secs(20));
    wait_until("the huge one is refused", Duration::from_secs(10), || {
        daemon.log().contains("300000 bytes is over")
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        daemon.log_count("Connected to") <= 3,
        "reconnect loop:\n{}",
        daemon.log()
    );
    assert_eq!(daemon.stored().values().next().unwrap(), &after);
}

#[test]
fn ready_watchdog_and_stopping_are_sent_to_the_notify_socket() {
    let broker = Broker::start();
    let scratch = scratch();
    let socket_path = scratch.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut daemon = Daemon::start_with(
        broker.port,
        "",
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut messages: Vec<String> = Vec::new();
    let mut buf = [0u8; 4096];
    let mut read = |messages: &mut Vec<String>| {
        let n = socket.recv(&mut buf).expect("a notify message within 20s");
        messages.push(String::from_utf8_lossy(&buf[..n]).to_string());
    };
    while !messages.iter().any(|m| m.contains("READY=1")) {
        read(&mut messages);
    }
    let ready = messages.iter().find(|m| m.contains("READY=1")).unwrap();
    assert!(ready.contains("STATUS="), "{ready}");
    let before_ready = messages
        .iter()
        .take_while(|m| !m.contains("READY=1"))
        .count();
    assert!(messages[..before_ready]
        .iter()
        .all(|m| !m.contains("WATCHDOG=1") || !m.contains("READY")));
    // Pings at half of 400 ms: several within a second.
    let start = std::time::Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_millis(1200) {
        read(&mut messages);
        pings += messages.last().unwrap().matches("WATCHDOG=1").count();
    }
    assert!(pings >= 3, "{messages:?}");
    let status = daemon.terminate();
    assert!(status.success(), "{status}");
    let mut stopping = false;
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    while let Ok(n) = socket.recv(&mut buf) {
        stopping |= String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1");
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM: {messages:?}");
}

#[test]
fn sigterm_while_images_flow_exits_zero_and_leaves_no_partial_file() {
    let broker = Broker::persistent();
    let mut daemon = Daemon::start(&broker);
    daemon.wait_ready();
    let images: Vec<Vec<u8>> = (0..200).map(|i| jpeg(7000 + i, 200_000)).collect();
    let port = broker.port;
    let sender = std::thread::spawn({
        let images = images.clone();
        move || {
            for image in &images {
                if !mosquitto_pub(port, UPLOAD, image, &[]) {
                    break;
                }
            }
        }
    });
    wait_until("some images are stored", Duration::from_secs(30), || {
        daemon.stored_count() >= 20
    });
    let status = daemon.terminate();
    assert!(status.success(), "{status}");
    sender.join().unwrap();
    let names: Vec<String> = std::fs::read_dir(&daemon.images)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with(".incoming-")),
        "temp file left: {names:?}"
    );
    let originals: HashSet<_> = images.iter().map(|i| sha(i)).collect();
    for (name, bytes) in daemon.stored() {
        assert!(
            originals.contains(&sha(&bytes)),
            "{name} is not a whole image"
        );
    }
    assert!(daemon.log().contains("Stopped"));
}

#[test]
fn a_changed_upload_filter_stops_the_old_one_in_the_persistent_session() {
    let broker = Broker::start();
    let mut daemon = Daemon::start(&broker);
    daemon.wait_ready();
    assert!(daemon.terminate().success());

    let text =
        std::fs::read_to_string(&daemon.config).unwrap() + "[topics]\nupload = \"cams/+/jpeg\"\n";
    std::fs::write(&daemon.config, text).unwrap();
    daemon.spawn();
    daemon.wait_ready_n(2);
    wait_until(
        "the old filter is unsubscribed",
        Duration::from_secs(5),
        || daemon.log().contains("Unsubscribing from 'image/upload'"),
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(broker.mosquitto_pub(UPLOAD, &jpeg(1, 3000)));
    let new = jpeg(2, 3000);
    assert!(broker.mosquitto_pub("cams/door/jpeg", &new));
    daemon.wait_stored(1, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    let stored = daemon.stored();
    assert_eq!(
        stored.len(),
        1,
        "only the image on the new filter is stored"
    );
    assert_eq!(stored.values().next().unwrap(), &new);
}

const FORGOT: &str = "has no session for imaged although it had one";

/// Waits for the n-th "Connected to" line of the daemon's log.
fn wait_connected_n(daemon: &Daemon, n: usize) {
    wait_until(
        &format!("connection {n} of imaged"),
        Duration::from_secs(30),
        || daemon.log_count("Connected to") >= n,
    );
}

#[test]
fn a_broker_restarted_without_persistence_is_warned_about_once_per_episode_and_across_imaged_restarts(
) {
    forgotten_once_per_episode("");
}

#[test]
fn in_mqtt_5_too_a_broker_restarted_without_persistence_is_warned_about_once_per_episode() {
    forgotten_once_per_episode("[broker]\nprotocol = \"5\"\n");
}

fn forgotten_once_per_episode(extra: &str) {
    let mut broker = Broker::start();
    let mut daemon = Daemon::start_with(broker.port, extra, &[]);
    daemon.wait_ready();
    assert_eq!(daemon.log_count(FORGOT), 0, "a first start forgot nothing");

    broker.restart();
    wait_connected_n(&daemon, 2);
    assert_eq!(daemon.log_count(FORGOT), 1, "{}", daemon.log());
    let warning = daemon.log();
    let warning = warning.lines().find(|l| l.contains(FORGOT)).unwrap();
    assert!(warning.contains("WARN"), "{warning}");
    for words in [
        "may have been dropped",
        "persistence true",
        "broker.session_expiry",
    ] {
        assert!(warning.contains(words), "{warning}");
    }
    // The same episode: the broker forgets again before any connection found a session.
    broker.restart();
    wait_connected_n(&daemon, 3);
    assert_eq!(daemon.log_count(FORGOT), 1, "{}", daemon.log());
    // Images still flow after it.
    assert!(broker.mosquitto_pub(UPLOAD, &jpeg(31, 3000)));
    daemon.wait_stored(1, Duration::from_secs(10));

    // "Had one before" survives imaged's restart: the broker forgets while imaged is down.
    assert!(daemon.terminate().success());
    broker.restart();
    daemon.spawn();
    daemon.wait_ready_n(2);
    assert_eq!(daemon.log_count(FORGOT), 2, "{}", daemon.log());
}

#[test]
fn another_client_id_is_a_new_session_not_a_forgotten_one_and_an_older_state_folder_still_counts() {
    let mut broker = Broker::start();
    let mut daemon = Daemon::start(&broker);
    daemon.wait_ready();
    assert!(daemon.terminate().success());
    daemon.reconfigure("[broker]\nclient_id = \"imaged-another\"\n");
    daemon.spawn();
    daemon.wait_ready_n(2);
    assert_eq!(daemon.log_count(FORGOT), 0, "{}", daemon.log());
    assert!(daemon.terminate().success());

    // An older version remembered only the subscription: the broker forgetting it is still noticed.
    let state = daemon.images.join(".imaged");
    assert!(state.join("subscription").exists());
    std::fs::remove_file(state.join("session")).unwrap();
    broker.restart();
    daemon.spawn();
    daemon.wait_ready_n(3);
    assert_eq!(daemon.log_count(FORGOT), 1, "{}", daemon.log());
}

#[test]
fn a_broker_restarted_with_persistence_kept_the_session_and_is_not_warned_about() {
    let mut broker = Broker::persistent();
    let mut daemon = Daemon::start(&broker);
    daemon.wait_ready();
    // Mosquitto saves its database at most a second after the subscription.
    std::thread::sleep(Duration::from_millis(1500));
    broker.restart();
    wait_connected_n(&daemon, 2);
    assert!(daemon.log().contains("session resumed"), "{}", daemon.log());
    assert!(daemon.terminate().success());
    daemon.spawn();
    daemon.wait_ready_n(2);
    assert_eq!(daemon.log_count(FORGOT), 0, "{}", daemon.log());
}

#[test]
fn cameras_on_a_wildcard_filter_get_folders_of_their_own_and_hostile_levels_stay_inside_and_apart()
{
    let broker = Broker::start();
    let mut daemon = Daemon::start_with(
        broker.port,
        "[topics]\nupload = \"image/upload/+\"\n\
         [storage]\npath = \"{camera}/%Y-%m-%d/image_%Y%m%d-%H%M%S.jpg\"\n",
        &[],
    );
    daemon.wait_ready();
    let long = "x".repeat(60 * 1024);
    let levels = [
        "cam1", "cam2", "cam3", "..", ".", ".hidden", "", "con", "CON", "a b", "100%", "%25",
        "caméra", "a\\b", "~", &long,
    ];
    let topics: Vec<String> = levels.iter().map(|l| format!("image/upload/{l}")).collect();
    let images: Vec<Vec<u8>> = (0..levels.len() as u64)
        .map(|i| jpeg(9000 + i, 3000))
        .collect();
    let acked =
        common::load::publish_each(broker.port, &topics, &images, 8, Duration::from_secs(30));
    assert!(acked.iter().all(|a| *a), "the broker took every image");
    daemon.wait_stored(images.len(), Duration::from_secs(20));

    let stored = daemon.stored();
    assert_eq!(stored.len(), images.len());
    let mut folders = std::collections::HashMap::new();
    for (name, bytes) in &stored {
        let i = images
            .iter()
            .position(|im| im == bytes)
            .expect("a sent image");
        let parts: Vec<&str> = name.split('/').collect();
        // camera/date/file: one folder per camera level, then the date.
        assert_eq!(parts.len(), 3, "{name}");
        assert!(
            parts[2].starts_with("image_") && parts[2].ends_with(".jpg"),
            "{name}"
        );
        for part in &parts {
            assert!(
                !part.is_empty() && !part.starts_with('.') && part.len() <= 255,
                "{name}"
            );
        }
        assert!(
            folders.insert(parts[0].to_string(), levels[i]).is_none(),
            "two topics share the folder {}",
            parts[0]
        );
        assert!(daemon.images.join(name).starts_with(&daemon.images));
    }
    for cam in ["cam1", "cam2", "cam3", "con", "CON"] {
        assert_eq!(folders.get(cam), Some(&cam), "{cam} keeps its name");
    }
    // Nothing was written beside the storage folder.
    let mut beside: Vec<String> = std::fs::read_dir(&daemon.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    beside.sort();
    assert_eq!(beside, ["imaged.log", "imaged.toml", "images"]);
}
