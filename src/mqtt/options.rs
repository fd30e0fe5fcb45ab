//! The MQTT options of a client: session, packet limits, packet ids, credentials and TLS, by role.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, EventLoop, LastWill, MqttOptions, QoS, TlsConfiguration, Transport};

use super::credentials::password;
use super::tls::tls_config;
use crate::config::{Broker, KeyError};

/// How a client uses its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The daemon: a persistent session (the broker queues uploads while imaged is down), manual acks.
    Daemon { inflight: u16 },
    /// `imaged send`: a clean session, up to `inflight` publishes waiting for their PUBACK.
    Sender { inflight: u16 },
    /// `imaged receive`: a clean session unless a client id is asked for.
    Receiver { persistent: bool },
}

/// A last will: published by the broker, retained at QoS 1, when the connection ends without a DISCONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: String,
}

/// Builds a client and its event loop for `broker`. `max_packet` bounds packets both ways.
pub fn connect(
    broker: &Broker,
    client_id: &str,
    max_packet: usize,
    role: Role,
    will: Option<&Will>,
) -> Result<(AsyncClient, EventLoop), KeyError> {
    let mut options = MqttOptions::new(client_id, broker.host.clone(), broker.port);
    if let Some(will) = will {
        let payload = will.payload.as_bytes();
        options.set_last_will(LastWill::new(&will.topic, payload, QoS::AtLeastOnce, true));
    }
    options.set_keep_alive(Duration::from_secs(broker.keep_alive_secs));
    options.set_max_packet_size(max_packet, max_packet);
    match role {
        Role::Daemon { inflight } => {
            options.set_clean_session(false);
            options.set_manual_acks(true);
            options.set_inflight(packet_id_space(inflight));
        }
        Role::Sender { inflight } => {
            options.set_clean_session(true);
            options.set_inflight(packet_id_space(inflight));
        }
        Role::Receiver { persistent } => {
            options.set_clean_session(!persistent);
        }
    }
    if let Some(user) = &broker.username {
        options.set_credentials(user.clone(), password(broker)?.unwrap_or_default());
    }
    if let Some(tls) = broker.tls.as_ref().filter(|t| t.enabled) {
        let config = tls_config(tls)?;
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(config),
        )));
    }
    let (client, mut eventloop) = AsyncClient::new(options, 256);
    let mut network = eventloop.network_options();
    // Nagle's algorithm alone adds tens of milliseconds to every small image at low load.
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(broker.connect_timeout_secs);
    eventloop.set_network_options(network);
    Ok((client, eventloop))
}

/// rumqttc's "inflight" for up to `window` publishes waiting for their PUBACK. rumqttc hands out packet ids
/// from 1 up to its inflight setting and wraps; a new id still in use is a "collision", and rumqttc keeps
/// only one colliding publish aside: a second one replaces it, and that publish is gone without a trace
/// (found by the broker-kill fault test, where retransmissions after each reconnect keep old ids in use).
/// Our own window bounds what is in flight, so rumqttc gets 16 times as many ids (subscribes and unsubscribes
/// take theirs from the same counter, among the spare ones), and the ids cannot wrap onto one still in use.
/// Ids are 16 bits: the margin holds for windows up to [`MAX_WINDOW`], which is why every publish window is
/// capped there ([`window`]).
pub fn packet_id_space(window: u16) -> u16 {
    u16::try_from((u32::from(window.max(1)) * 16).max(1024)).unwrap_or(u16::MAX)
}

/// The largest publish window that keeps rumqttc's 16-fold margin of packet ids.
pub const MAX_WINDOW: u16 = 4095;

/// A publish window of `wanted`, between 1 and [`MAX_WINDOW`].
pub fn window(wanted: usize) -> u16 {
    u16::try_from(wanted.clamp(1, usize::from(MAX_WINDOW))).expect("bounded to fit")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_window_allowed_gets_at_least_sixteen_packet_ids_per_publish_in_flight() {
        for wanted in 1..=usize::from(u16::MAX) {
            let w = window(wanted);
            assert!(
                u32::from(packet_id_space(w)) >= 16 * u32::from(w),
                "{wanted}"
            );
        }
        assert_eq!(window(0), 1);
        assert_eq!(window(256), 256);
        assert_eq!(window(65535), MAX_WINDOW);
    }

    #[test]
    fn packet_ids_outnumber_the_window_many_times() {
        assert_eq!(packet_id_space(32), 1024);
        assert_eq!(packet_id_space(272), 4352);
        assert_eq!(packet_id_space(u16::MAX), u16::MAX);
    }
}
