//! A hostile publish near MQTT's largest packet (the remaining length tops out at 268,435,455 bytes, 256 MiB)
//! against real Mosquitto without a `message_size_limit`: in 3.1.1 imaged refuses it unread, within its
//! memory bound and without a reconnect loop; in MQTT 5 the broker drops it and imaged never sees it.

mod common;

use std::time::Duration;

use common::scenarios::{memory_bound, rss};
use common::*;

const UPLOAD: &str = "image/upload";
/// The largest publish is 256 MiB; a little less leaves the topic and headers room.
const HOSTILE: usize = 250_000_000;
const MAX_IMAGE: u64 = 1 << 20;
const INFLIGHT: u64 = 8 << 20;

fn hostile_then_good(protocol: &str) -> (Daemon, Broker, Vec<Vec<u8>>) {
    let broker = Broker::with(BrokerOptions {
        extra: "log_type debug\n".into(),
        ..BrokerOptions::default()
    });
    let mut daemon = Daemon::start_with(
        broker.port,
        &format!(
            "[broker]\nprotocol = \"{protocol}\"\n[storage]\nmax_image_bytes = {MAX_IMAGE}\n\
             [limits]\ninflight_bytes = {INFLIGHT}\n"
        ),
        &[],
    );
    daemon.wait_ready();
    let before = [jpeg(1, 50_000), jpeg(2, 60_000)];
    for image in &before {
        assert!(broker.mosquitto_pub(UPLOAD, image));
    }
    // Accepted by the broker from the camera (QoS 1), then on its way to imaged.
    let mut hostile = vec![0xAB; HOSTILE];
    hostile[..3].copy_from_slice(&[0xFF, 0xD8, 0xFF]);
    assert!(broker.mosquitto_pub(UPLOAD, &hostile));
    drop(hostile);
    let after = [jpeg(3, 70_000), jpeg(4, 80_000)];
    for image in &after {
        assert!(broker.mosquitto_pub(UPLOAD, image));
    }
    let good: Vec<Vec<u8>> = before.into_iter().chain(after).collect();
    daemon.wait_stored(good.len(), Duration::from_secs(60));
    (daemon, broker, good)
}

#[test]
fn in_3_1_1_a_250_mb_publish_is_refused_unread_within_the_memory_bound_and_without_a_reconnect_loop(
) {
    let (daemon, _broker, good) = hostile_then_good("3.1.1");
    // Long enough for a redelivery loop to show.
    std::thread::sleep(Duration::from_secs(3));
    assert_each_stored_once(&daemon.images, &good);
    let (_, peak) = rss(daemon.pid());
    let bound = memory_bound(INFLIGHT, MAX_IMAGE);
    eprintln!(
        "peak RSS {} MiB with a {} MB publish; bound {} MiB",
        peak >> 20,
        HOSTILE / 1_000_000,
        bound >> 20
    );
    assert!(peak <= bound, "peak RSS {peak} over the bound {bound}");
    let log = daemon.log();
    let refused = format!("Image refused from topic '{UPLOAD}': {HOSTILE} bytes is over");
    assert_eq!(
        log.matches(&refused).count(),
        1,
        "refused once, by its real size:\n{log}"
    );
    assert!(!log.contains("Lost the connection"), "{log}");
    assert_eq!(log.matches("Connected to").count(), 1, "{log}");
    // Refused, not kept: nothing of it in the quarantine.
    let quarantine = daemon.images.join(".quarantine");
    let kept = std::fs::read_dir(&quarantine).map_or(0, |d| d.count());
    assert_eq!(kept, 0, "{}", quarantine.display());
}

#[test]
fn in_mqtt_5_a_250_mb_publish_is_dropped_by_the_broker_and_imaged_never_sees_it() {
    let (daemon, broker, good) = hostile_then_good("5");
    assert_each_stored_once(&daemon.images, &good);
    let log = daemon.log();
    assert!(!log.contains("over storage.max_image_bytes"), "{log}");
    assert!(!log.contains("Lost the connection"), "{log}");
    let (_, peak) = rss(daemon.pid());
    assert!(peak <= memory_bound(INFLIGHT, MAX_IMAGE), "peak RSS {peak}");
    assert!(
        broker.log().contains("Dropping too large outgoing PUBLISH"),
        "the broker dropped it"
    );
}
