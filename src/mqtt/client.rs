//! One client for MQTT 3.1.1 and MQTT 5: rumqttc's two clients behind one handle, and MQTT 5's events and
//! errors turned into 3.1.1's, so the daemon and the tools are written once.
//!
//! The neutral event is rumqttc's 3.1.1 [`Event`]: what the session and the tools act on (a publish, a
//! ConnAck's session flag, a SubAck's refusal, a PubAck's packet id) is the same in both versions. What only
//! MQTT 5 says (the reason code of a refused subscription or publish) is logged here, in words, where the
//! event is converted.

use std::fmt;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use rumqttc::v5;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck as ConnAck5, PubAckReason, Publish as Publish5, PublishProperties, SubAck as SubAck5,
    SubscribeReasonCode as Reason5, UnsubAckReason,
};
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::{
    ConnAck, ConnectReturnCode, Event, Incoming, PubAck, Publish, QoS, StateError, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use tracing::{debug, warn};

use super::relay::Relay;

/// A handle to put requests into the event loop's channel, in either version.
#[derive(Debug, Clone)]
pub enum Client {
    V4(rumqttc::AsyncClient),
    V5(v5::AsyncClient, PacketIds),
}

/// How many packet ids rumqttc's MQTT 5 client hands out in turn (1 up to it, then 1 again): its
/// outgoing-inflight upper limit, lowered to the broker's Receive Maximum by each CONNACK that has one.
/// The event loop's stream ([`super::events`]) sets it, the publish window reads it.
#[derive(Debug, Clone)]
pub struct PacketIds(Arc<AtomicU16>);

impl PacketIds {
    pub fn new(options: &v5::MqttOptions) -> PacketIds {
        let upper_limit = options.get_outgoing_inflight_upper_limit();
        PacketIds(Arc::new(AtomicU16::new(
            upper_limit.unwrap_or(u16::MAX).max(1),
        )))
    }

    pub fn get(&self) -> u16 {
        self.0.load(Ordering::Relaxed)
    }

    /// What rumqttc does with a CONNACK: a Receive Maximum caps the ids at the upper limit it was built with.
    pub fn connected(&self, options: &v5::MqttOptions, receive_max: Option<u16>) {
        let upper_limit = options.get_outgoing_inflight_upper_limit();
        if let Some(max) = receive_max {
            let max = max.min(upper_limit.unwrap_or(u16::MAX)).max(1);
            self.0.store(max, Ordering::Relaxed);
        }
    }
}

/// The event loop of either version (see [`super::events`]); one lives for the whole run, so its size
/// does not matter. A 3.1.1 loop from [`super::connect`] connects through its [`Relay`].
#[expect(
    clippy::large_enum_variant,
    reason = "one per client, never moved in a loop"
)]
pub enum EventLoop {
    V4(rumqttc::EventLoop, Option<Relay>),
    V5(v5::EventLoop, PacketIds),
}

impl From<rumqttc::EventLoop> for EventLoop {
    fn from(eventloop: rumqttc::EventLoop) -> Self {
        EventLoop::V4(eventloop, None)
    }
}

impl From<rumqttc::AsyncClient> for Client {
    fn from(client: rumqttc::AsyncClient) -> Self {
        Client::V4(client)
    }
}

/// A request did not fit into the event loop's channel (or the loop is gone).
#[derive(Debug)]
pub struct NotQueued;

/// What an MQTT 5 publish says about its payload; a 3.1.1 publish carries none of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub content_type: Option<String>,
    pub user: Vec<(String, String)>,
}

fn qos5(qos: QoS) -> QoS5 {
    match qos {
        QoS::AtMostOnce => QoS5::AtMostOnce,
        QoS::AtLeastOnce => QoS5::AtLeastOnce,
        QoS::ExactlyOnce => QoS5::ExactlyOnce,
    }
}

fn qos4(qos: QoS5) -> QoS {
    match qos {
        QoS5::AtMostOnce => QoS::AtMostOnce,
        QoS5::AtLeastOnce => QoS::AtLeastOnce,
        QoS5::ExactlyOnce => QoS::ExactlyOnce,
    }
}

impl Client {
    /// The packet ids a publish may get, where they wrap soon enough to matter (MQTT 5: the broker's Receive
    /// Maximum); `None` for 3.1.1, whose ids outnumber the window many times ([`super::packet_id_space`]).
    pub fn packet_ids(&self) -> Option<u16> {
        match self {
            Client::V4(_) => None,
            Client::V5(_, ids) => Some(ids.get()),
        }
    }

    pub fn try_subscribe(&self, filter: String, qos: QoS) -> Result<(), NotQueued> {
        match self {
            Client::V4(c) => c.try_subscribe(filter, qos).map_err(|_| NotQueued),
            Client::V5(c, _) => c.try_subscribe(filter, qos5(qos)).map_err(|_| NotQueued),
        }
    }

    /// Several filters in one SUBSCRIBE: one SubAck, its return codes in the same order.
    pub fn try_subscribe_many(&self, filters: &[(String, QoS)]) -> Result<(), NotQueued> {
        match self {
            Client::V4(c) => c
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|(f, qos)| rumqttc::SubscribeFilter::new(f.clone(), *qos)),
                )
                .map_err(|_| NotQueued),
            Client::V5(c, _) => c
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|(f, qos)| v5::mqttbytes::v5::Filter::new(f.clone(), qos5(*qos))),
                )
                .map_err(|_| NotQueued),
        }
    }

    pub fn try_unsubscribe(&self, filter: String) -> Result<(), NotQueued> {
        match self {
            Client::V4(c) => c.try_unsubscribe(filter).map_err(|_| NotQueued),
            Client::V5(c, _) => c.try_unsubscribe(filter).map_err(|_| NotQueued),
        }
    }

    /// Acknowledges the publish with `pkid` and `qos` (only those two matter to an ack).
    pub fn try_ack(&self, pkid: u16, qos: QoS) -> Result<(), NotQueued> {
        match self {
            Client::V4(c) => {
                let mut publish = Publish::new("", qos, Vec::new());
                publish.pkid = pkid;
                c.try_ack(&publish).map_err(|_| NotQueued)
            }
            Client::V5(c, _) => {
                let mut publish = Publish5::new("", qos5(qos), Vec::new(), None);
                publish.pkid = pkid;
                c.try_ack(&publish).map_err(|_| NotQueued)
            }
        }
    }

    pub fn try_disconnect(&self) -> Result<(), NotQueued> {
        match self {
            Client::V4(c) => c.try_disconnect().map_err(|_| NotQueued),
            Client::V5(c, _) => c.try_disconnect().map_err(|_| NotQueued),
        }
    }

    /// Puts a publish into the channel; `properties` go out with MQTT 5 only.
    pub async fn publish_bytes(
        &self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: Bytes,
        properties: &Properties,
    ) -> Result<(), NotQueued> {
        match self {
            Client::V4(c) => c
                .publish_bytes(topic, qos, retain, payload)
                .await
                .map_err(|_| NotQueued),
            Client::V5(c, _) => {
                let properties = PublishProperties {
                    content_type: properties.content_type.clone(),
                    user_properties: properties.user.clone(),
                    ..PublishProperties::default()
                };
                c.publish_bytes_with_properties(topic, qos5(qos), retain, payload, properties)
                    .await
                    .map_err(|_| NotQueued)
            }
        }
    }
}

/// A connection error of either version. MQTT 5 errors that 3.1.1 has too (I/O, TLS, timeouts, a closed
/// connection) are kept as 3.1.1's, so they are described in the same words.
#[derive(Debug)]
pub enum ConnectionError {
    V4(rumqttc::ConnectionError),
    V5(v5::ConnectionError),
}

impl From<rumqttc::ConnectionError> for ConnectionError {
    fn from(e: rumqttc::ConnectionError) -> Self {
        ConnectionError::V4(e)
    }
}

impl From<v5::ConnectionError> for ConnectionError {
    fn from(e: v5::ConnectionError) -> Self {
        use rumqttc::ConnectionError as E4;
        use v5::StateError as S5;
        ConnectionError::V4(match e {
            v5::ConnectionError::Io(io) => E4::Io(io),
            v5::ConnectionError::Tls(tls) => E4::Tls(tls),
            v5::ConnectionError::Timeout(_) => E4::NetworkTimeout,
            v5::ConnectionError::MqttState(S5::Io(io)) => E4::MqttState(StateError::Io(io)),
            v5::ConnectionError::MqttState(S5::ConnectionAborted) => {
                E4::MqttState(StateError::ConnectionAborted)
            }
            v5::ConnectionError::MqttState(S5::AwaitPingResp) => {
                E4::MqttState(StateError::AwaitPingResp)
            }
            other => return ConnectionError::V5(other),
        })
    }
}

impl fmt::Display for ConnectionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectionError::V4(e) => e.fmt(f),
            ConnectionError::V5(e) => e.fmt(f),
        }
    }
}

/// An MQTT 5 reason code in words: rumqttc's name of it, `NotAuthorized` as "not authorized".
pub fn reason_words(code: &impl fmt::Debug) -> String {
    let name = format!("{code:?}");
    let mut words = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            words.push(' ');
        }
        words.push(c.to_ascii_lowercase());
    }
    words.replace("qo s", "QoS").replace("pkid", "packet id")
}

/// An MQTT 5 event as 3.1.1's; `None` for what 3.1.1 has no use for (QoS 2's packets, which imaged never
/// asks for).
pub fn from_v5(event: v5::Event) -> Option<Event> {
    use v5::mqttbytes::v5::Packet as P5;
    let incoming = match event {
        v5::Event::Outgoing(outgoing) => return Some(Event::Outgoing(outgoing)),
        v5::Event::Incoming(incoming) => incoming,
    };
    let packet = match incoming {
        P5::ConnAck(ConnAck5 {
            session_present, ..
        }) => Incoming::ConnAck(ConnAck::new(ConnectReturnCode::Success, session_present)),
        P5::Publish(p) => Incoming::Publish(Publish {
            dup: p.dup,
            qos: qos4(p.qos),
            retain: p.retain,
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            pkid: p.pkid,
            payload: p.payload,
        }),
        P5::SubAck(ack) => Incoming::SubAck(suback(&ack)),
        P5::PubAck(ack) => {
            match ack.reason {
                PubAckReason::Success => {}
                // Nobody subscribed to the topic: a republish nobody waits for is no trouble.
                PubAckReason::NoMatchingSubscribers => {
                    debug!(
                        pkid = ack.pkid,
                        "the broker took a publish nobody subscribed to"
                    );
                }
                reason => warn!(
                    pkid = ack.pkid,
                    "The broker did not take a publish: {}{}",
                    reason_words(&reason),
                    ack.properties
                        .and_then(|p| p.reason_string)
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                ),
            }
            Incoming::PubAck(PubAck::new(ack.pkid))
        }
        P5::UnsubAck(ack) => {
            for reason in ack
                .reasons
                .iter()
                .filter(|r| **r != UnsubAckReason::Success)
            {
                warn!(
                    pkid = ack.pkid,
                    "The broker did not take an unsubscribe: {}",
                    reason_words(reason)
                );
            }
            Incoming::UnsubAck(UnsubAck::new(ack.pkid))
        }
        P5::PingResp(_) => Incoming::PingResp,
        _ => return None,
    };
    Some(Event::Incoming(packet))
}

/// A SubAck as 3.1.1's, every refusal logged with its reason.
fn suback(ack: &SubAck5) -> SubAck {
    let codes = ack
        .return_codes
        .iter()
        .map(|code| match code {
            Reason5::Success(qos) => SubscribeReasonCode::Success(qos4(*qos)),
            refused => {
                warn!(
                    "The broker refused a subscription: {}{}",
                    reason_words(refused),
                    ack.properties
                        .as_ref()
                        .and_then(|p| p.reason_string.as_deref())
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                );
                SubscribeReasonCode::Failure
            }
        })
        .collect();
    SubAck::new(ack.pkid, codes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as Code5, DisconnectReasonCode};

    #[test]
    fn reason_codes_read_as_words() {
        assert_eq!(reason_words(&Code5::NotAuthorized), "not authorized");
        assert_eq!(
            reason_words(&DisconnectReasonCode::SessionTakenOver),
            "session taken over"
        );
        assert_eq!(reason_words(&Code5::QoSNotSupported), "QoS not supported");
    }

    #[test]
    fn an_mqtt_5_publish_reads_as_a_3_1_1_publish() {
        let mut p = Publish5::new("cams/a", QoS5::AtLeastOnce, vec![0xFF, 0xD8], None);
        p.pkid = 9;
        let event = from_v5(v5::Event::Incoming(v5::mqttbytes::v5::Packet::Publish(p)));
        let Some(Event::Incoming(Incoming::Publish(p))) = event else {
            panic!("{event:?}");
        };
        assert_eq!(
            (p.topic.as_str(), p.pkid, p.qos, &p.payload[..]),
            ("cams/a", 9, QoS::AtLeastOnce, &[0xFF, 0xD8][..])
        );
    }

    #[test]
    fn a_refused_mqtt_5_subscription_reads_as_a_3_1_1_failure() {
        let ack = SubAck5 {
            pkid: 1,
            return_codes: vec![Reason5::NotAuthorized],
            properties: None,
        };
        assert_eq!(suback(&ack).return_codes, [SubscribeReasonCode::Failure]);
    }
}
