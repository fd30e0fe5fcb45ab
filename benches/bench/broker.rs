//! The benchmark's broker: the tests' Mosquitto launcher (tests/common/mosquitto.rs) on a free loopback
//! port, with the settings a flood needs.

use crate::common::{Broker, BrokerOptions};

/// Unacknowledged QoS 1 deliveries per client (Mosquitto's default is 20). Above imaged's own window
/// (`limits.inflight_images`, 256 by default) so that imaged's window, not the broker's, is what is measured.
/// The harness queues up to 1,000,000 messages per client with no byte limit, so nothing is dropped in a run.
pub const MAX_INFLIGHT: u32 = 1000;

pub fn start() -> Broker {
    Broker::with(BrokerOptions {
        max_inflight: MAX_INFLIGHT,
        quiet: true,
        ..BrokerOptions::default()
    })
}
