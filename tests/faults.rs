//! Fault injection at CI size: every kind of fault on a live imaged under load, against real Mosquitto
//! processes and the real binary. A clean ledger means: every image the sender saw acknowledged is stored
//! exactly once and was republished, and no visible file is partial. `make torture` runs the same scenarios
//! at scale (benches/torture.rs) for docs/RELIABILITY.md.

mod common;

use common::scenarios::{self, Mqtt, Run};

fn report(run: &Run) {
    println!("{}", scenarios::table(std::slice::from_ref(run)));
    run.ledger.assert_clean(run.kind);
}

#[test]
fn imaged_killed_at_random_moments_loses_and_duplicates_nothing() {
    report(&scenarios::imaged_kills(1, 800, 12, Mqtt::V311));
}

#[test]
fn broker_killed_and_restarted_at_random_moments_loses_nothing() {
    report(&scenarios::broker_kills(2, 600, 6, Mqtt::V311));
}

#[test]
fn network_cuts_black_holes_and_trickles_lose_nothing() {
    report(&scenarios::network_faults(3, 600, 4, Mqtt::V311));
}

#[test]
fn a_full_disk_and_a_read_only_remount_hold_acks_and_everything_arrives_afterwards() {
    if !scenarios::can_mount() {
        println!("SKIP: the disk scenario mounts a tmpfs and needs root (CI runs as root)");
        return;
    }
    report(&scenarios::disk_faults(4, 400, 4));
}

#[test]
fn a_full_window_through_a_disk_outage_longer_than_three_keep_alives_keeps_the_connection() {
    if !scenarios::can_mount() {
        println!("SKIP: the disk scenario mounts a tmpfs and needs root (CI runs as root)");
        return;
    }
    let outage = scenarios::disk_outage_with_a_full_window(8, 1, std::time::Duration::from_secs(5));
    assert!(
        outage.broker_dropped.is_empty(),
        "the broker dropped imaged: {:?}",
        outage.broker_dropped
    );
    assert!(
        outage.imaged_lost.is_empty(),
        "imaged lost the connection: {:?}",
        outage.imaged_lost
    );
    outage.ledger.assert_clean("disk outage with a full window");
}

#[test]
fn sigstop_for_longer_than_the_keep_alive_then_sigcont_loses_nothing() {
    report(&scenarios::sigstops(5, 500, 3));
}

#[test]
fn hostile_payloads_and_topics_are_rejected_with_a_reason_and_good_images_stored() {
    report(&scenarios::hostile_input(6, 1200, 200));
}

#[test]
fn memory_stays_within_the_documented_bound_under_a_flood_of_the_largest_images() {
    let (run, peak, bound, after_round) = scenarios::memory_flood(7, 4, 20);
    report(&run);
    println!("peak RSS {peak} bytes, bound {bound}, RSS after each round {after_round:?}");
    assert!(
        peak <= bound,
        "peak RSS {peak} over the documented bound {bound}"
    );
    // Each figure is taken a few idle seconds after a round: nothing may pile up from round to round. The
    // first round warms up the allocator's per-thread arenas, so the comparison starts after it; the MQTT
    // client's read and write buffers keep their last size (up to an image each), hence two images and a bit.
    let (first, last) = (after_round[1], after_round[after_round.len() - 1]);
    assert!(
        last <= first + 10 * 1024 * 1024,
        "RSS grows from round to round: {after_round:?}"
    );
    assert!(
        last <= 48 * 1024 * 1024,
        "RSS stays up when idle: {after_round:?}"
    );
}

/// MQTT 5 numbers republishes within the broker's Receive Maximum (20 in Mosquitto), not within imaged's
/// own packet-id margin, and faults make rumqttc send its publishes again out of order.
#[test]
fn in_mqtt_5_kills_of_imaged_and_broker_and_network_faults_lose_nothing() {
    report(&scenarios::broker_kills(12, 300, 4, Mqtt::V5));
    report(&scenarios::network_faults(13, 300, 3, Mqtt::V5));
    report(&scenarios::imaged_kills(11, 300, 5, Mqtt::V5));
}
