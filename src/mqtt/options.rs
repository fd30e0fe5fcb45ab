//! The MQTT options of a client: protocol, session, packet limits, packet ids, credentials and TLS, by role.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    v5, AsyncClient, LastWill, MqttOptions, NetworkOptions, QoS, TlsConfiguration, Transport,
};

use super::client::{Client, EventLoop, PacketIds};
use super::credentials::password;
use super::relay::Relay;
use super::tls::tls_config;
use crate::config::{Broker, KeyError, Protocol};

/// How a client uses its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The daemon: a persistent session (the broker queues uploads while imaged is down), manual acks,
    /// `inflight` republishes waiting for their PUBACK; with MQTT 5 the broker sends at most `receive`
    /// uploads not yet acknowledged (Receive Maximum).
    Daemon { inflight: u16, receive: u16 },
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

/// Builds a client and its event loop for `broker`, in its `broker.protocol`. `max_packet` bounds packets
/// both ways; with MQTT 5 the broker is told it (Maximum Packet Size) and drops a larger message itself.
pub fn connect(
    broker: &Broker,
    client_id: &str,
    max_packet: usize,
    role: Role,
    will: Option<&Will>,
) -> Result<(Client, EventLoop), KeyError> {
    let login = match &broker.username {
        Some(user) => Some((user.clone(), password(broker)?.unwrap_or_default())),
        None => None,
    };
    let tls_config = match broker.tls.as_ref().filter(|t| t.enabled) {
        Some(tls) => Some(Arc::new(tls_config(tls)?)),
        None => None,
    };
    let keep_alive = Duration::from_secs(broker.keep_alive_secs);
    let mut network = NetworkOptions::new();
    // Nagle's algorithm alone adds tens of milliseconds to every small image at low load.
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(broker.connect_timeout_secs);
    Ok(match broker.protocol {
        Protocol::V311 => {
            let relay = Relay::new(
                broker.host.clone(),
                broker.port,
                tls_config,
                max_packet,
                Duration::from_secs(broker.connect_timeout_secs),
            );
            // rumqttc talks to the relay, the relay (with TLS, when configured) to the broker.
            let mut options = MqttOptions::new(client_id, relay.name.clone(), 0);
            options.set_transport(Transport::Unix);
            options.set_keep_alive(keep_alive);
            options.set_max_packet_size(max_packet, max_packet);
            if let Some(w) = will {
                options.set_last_will(LastWill::new(
                    &w.topic,
                    w.payload.as_bytes(),
                    QoS::AtLeastOnce,
                    true,
                ));
            }
            match role {
                Role::Daemon { inflight, .. } => {
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
            if let Some((user, password)) = login {
                options.set_credentials(user, password);
            }
            let (client, mut eventloop) = AsyncClient::new(options, 256);
            eventloop.set_network_options(network);
            (Client::V4(client), EventLoop::V4(eventloop, Some(relay)))
        }
        Protocol::V5 => {
            let mut options = v5::MqttOptions::new(client_id, broker.host.clone(), broker.port);
            options.set_keep_alive(keep_alive);
            options.set_connection_timeout(broker.connect_timeout_secs);
            options.set_max_packet_size(Some(u32::try_from(max_packet).unwrap_or(u32::MAX)));
            if let Some(w) = will {
                let qos = v5::mqttbytes::QoS::AtLeastOnce;
                let payload = w.payload.as_bytes();
                options.set_last_will(v5::mqttbytes::v5::LastWill::new(
                    &w.topic, payload, qos, true, None,
                ));
            }
            // A persistent session lasts session_expiry after a disconnect; a clean one ends with it.
            let expiry = u32::try_from(broker.session_expiry.0.as_secs()).unwrap_or(u32::MAX);
            match role {
                Role::Daemon { inflight, receive } => {
                    options.set_clean_start(false);
                    options.set_session_expiry_interval(Some(expiry));
                    options.set_manual_acks(true);
                    options.set_receive_maximum(Some(receive.max(1)));
                    options.set_outgoing_inflight_upper_limit(packet_id_space(inflight));
                }
                Role::Sender { inflight } => {
                    options.set_clean_start(true);
                    options.set_outgoing_inflight_upper_limit(packet_id_space(inflight));
                }
                Role::Receiver { persistent } => {
                    options.set_clean_start(!persistent);
                    if persistent {
                        options.set_session_expiry_interval(Some(expiry));
                    }
                }
            }
            if let Some((user, password)) = login {
                options.set_credentials(user, password);
            }
            if let Some(config) = tls_config {
                options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
            }
            options.set_network_options(network);
            let ids = PacketIds::new(&options);
            let (client, events) = v5::AsyncClient::new(options, 256);
            (Client::V5(client, ids.clone()), EventLoop::V5(events, ids))
        }
    })
}

/// rumqttc's "inflight" for up to `window` publishes waiting for their PUBACK. rumqttc hands out packet ids
/// from 1 up to its inflight setting and wraps; a new id still in use is a "collision", and rumqttc keeps
/// only one colliding publish aside: a second one replaces it, and that publish is gone without a trace
/// (found by the broker-kill fault test, where retransmissions after each reconnect keep old ids in use).
/// Our own window bounds what is in flight, so rumqttc gets 16 times as many ids (subscribes and unsubscribes
/// take theirs from the same counter, among the spare ones), and the ids cannot wrap onto one still in use.
/// Ids are 16 bits: the margin holds for windows up to [`MAX_WINDOW`], which is why every publish window is
/// capped there ([`window`]).
/// With MQTT 5 rumqttc's ids wrap at the broker's Receive Maximum instead (20 in Mosquitto), so there is no
/// margin: the window itself waits until the ids its publishes will get are free ([`super::PublishWindow`]).
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

    /// The properties of the first MQTT 5 CONNECT a client sends to a scripted broker: (id, value).
    fn connect_properties(role: Role, max_packet: usize) -> Vec<(u8, u32)> {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let broker = Broker {
            host: "127.0.0.1".into(),
            port: listener.local_addr().unwrap().port(),
            protocol: Protocol::V5,
            session_expiry: crate::config::Span(Duration::from_secs(3600)),
            ..Broker::default()
        };
        let (_client, eventloop) = connect(&broker, "t", max_packet, role, None).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let poller = std::thread::spawn(move || {
            runtime.block_on(async {
                let mut events = super::super::events(eventloop);
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    futures_util::StreamExt::next(&mut events),
                )
                .await;
            });
        });
        let (mut s, _) = listener.accept().unwrap();
        let mut packet = vec![0u8; 512];
        let n = s.read(&mut packet).unwrap();
        drop(s);
        poller.join().unwrap();
        // Fixed header (2), "MQTT" (6), level, flags, keep-alive (4), then the properties' length.
        let body = &packet[2..n];
        assert_eq!(&body[..7], b"\0\x04MQTT\x05");
        let (len, mut at) = (usize::from(body[10]), 11);
        let mut found = Vec::new();
        while at < 11 + len {
            let id = body[at];
            let width = match id {
                0x11 | 0x27 => 4,
                0x21 | 0x22 => 2,
                0x17 | 0x19 => 1,
                other => panic!("property {other:#x}"),
            };
            let value = body[at + 1..at + 1 + width]
                .iter()
                .fold(0u32, |v, b| (v << 8) | u32::from(*b));
            found.push((id, value));
            at += 1 + width;
        }
        found.sort_unstable();
        found
    }

    #[test]
    fn an_mqtt_5_daemon_asks_for_its_packet_size_its_window_and_its_session_expiry() {
        let found = connect_properties(
            Role::Daemon {
                inflight: 8,
                receive: 3,
            },
            1_000_000,
        );
        assert_eq!(found, [(0x11, 3600), (0x21, 3), (0x27, 1_000_000)]);
    }

    #[test]
    fn an_mqtt_5_sender_asks_for_a_session_that_ends_with_the_connection() {
        let found = connect_properties(Role::Sender { inflight: 8 }, 1_000_000);
        assert_eq!(found, [(0x27, 1_000_000)]);
    }

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
