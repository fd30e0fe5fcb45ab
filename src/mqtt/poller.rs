//! rumqttc's event loop as a stream that backs off between reconnects, opens a 3.1.1 client's relay before
//! each connect, keeps the events of a connection that failed with that connection, and keeps a connection
//! alive with pings alone while its user reads nothing.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use rumqttc::{v5, Event, Incoming, Outgoing, Packet};

use super::client::{from_v5, ConnectionError, EventLoop};
use super::relay::Relay;
use crate::backoff::Backoff;

/// The event loop as a stream that waits out the backoff after an error before polling again.
struct Poller {
    eventloop: EventLoop,
    backoff: Backoff,
    /// The wait before the next poll, after an error.
    wait: Option<Duration>,
    /// A failed connection's last events, to hand out before polling again (see [`after_failure`]).
    queued: VecDeque<Polled>,
    holding: Holding,
    /// Pings went out while holding, since the last poll.
    pinged: bool,
}

/// An event with, after an error, how long until the next attempt.
pub type Polled = (Result<Event, ConnectionError>, Option<Duration>);

/// The stream [`events`] returns.
pub type Events = Pin<Box<dyn Stream<Item = Polled> + Send>>;

/// Tells a stream from [`events_holding`] that its user holds back reading from the broker.
#[derive(Debug, Clone, Default)]
pub struct Holding(Arc<AtomicBool>);

impl Holding {
    /// While set, the next item the stream is asked for is a keep-alive ping instead of a poll.
    pub fn set(&self, holding: bool) {
        self.0.store(holding, Ordering::Relaxed);
    }

    fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Turns an event loop into a stream that reconnects with capped, jittered backoff. Waiting on the stream's
/// `next()` in a `select!` is safe: an unfinished poll stays inside the stream, it is not cancelled.
/// Events rumqttc had parsed on a connection that then failed come right after that connection's error and
/// before the next ConnAck ([`after_failure`]).
pub fn events(eventloop: impl Into<EventLoop>) -> Events {
    events_holding(eventloop, Holding::default())
}

/// [`events`] for a user that at times stops reading from the broker to bound its memory (the daemon, while
/// its window of unsettled uploads is full). While `holding` is set, asking the stream for its next item
/// writes a PINGREQ and yields `Outgoing::PingReq`, and reads nothing: the broker hears from the client
/// and keeps the connection, and nothing more comes into memory. rumqttc pings only from inside a poll, and
/// a poll also reads (up to nine packets at a time); a user that stops polling altogether is dropped by the
/// broker after one and a half keep-alives without knowing it.
///
/// The user asks for an item while holding only when a ping is due; a write that fails is a connection
/// error like any other.
///
/// rumqttc's MQTT 5 client keeps its connection to itself, so there a stream that is holding reads nothing
/// and pings nothing until the hold ends: the broker should send no more than imaged's Receive Maximum
/// anyway, but Mosquitto 2.0.11 does not keep to it. A hold longer than one and a half keep-alives then
/// costs the connection (the broker delivers the unacknowledged uploads again; dedup stores them once).
pub fn events_holding(eventloop: impl Into<EventLoop>, holding: Holding) -> Events {
    let poller = Poller {
        eventloop: eventloop.into(),
        backoff: Backoff::broker(),
        wait: None,
        queued: VecDeque::new(),
        holding,
        pinged: false,
    };
    Box::pin(futures_util::stream::unfold(poller, |mut p| async move {
        let next = p.next().await;
        Some((next, p))
    }))
}

impl Poller {
    async fn next(&mut self) -> Polled {
        if let Some(queued) = self.queued.pop_front() {
            return queued;
        }
        if let EventLoop::V4(eventloop, _) = &mut self.eventloop {
            if self.holding.get() && eventloop.network.is_some() {
                return match ping(eventloop).await {
                    Ok(()) => {
                        self.pinged = true;
                        (Ok(Event::Outgoing(Outgoing::PingReq)), None)
                    }
                    Err(e) => {
                        // What rumqttc does at a failed write of its own: the next poll reconnects.
                        eventloop.clean();
                        self.failed(e.into())
                    }
                };
            }
        }
        if let EventLoop::V5(..) = self.eventloop {
            while self.holding.get() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if let Some(wait) = self.wait.take() {
            tokio::time::sleep(wait).await;
        }
        if std::mem::take(&mut self.pinged) {
            // rumqttc waits for the PINGRESP of its own last ping before it pings again, or takes the
            // connection for dead. Nothing was read while holding, so that PINGRESP may still wait behind
            // uploads the broker sent first; the pings of the hold are answered after it.
            if let EventLoop::V4(eventloop, _) = &mut self.eventloop {
                eventloop.state.await_pingresp = false;
            }
        }
        let polled = match &mut self.eventloop {
            EventLoop::V4(eventloop, relay) => {
                if let (None, Some(relay)) = (&eventloop.network, relay.as_mut()) {
                    if let Err(e) = relay.open().await {
                        return self.failed(e.into());
                    }
                }
                eventloop.poll().await.map_err(|e| {
                    // rumqttc saw the relay close; what the broker's side did is the cause.
                    match relay.as_ref().and_then(Relay::failure) {
                        Some(io) => rumqttc::ConnectionError::Io(io).into(),
                        None => e.into(),
                    }
                })
            }
            EventLoop::V5(eventloop, ids) => loop {
                match eventloop.poll().await {
                    Ok(event) => {
                        if let v5::Event::Incoming(v5::Incoming::ConnAck(ack)) = &event {
                            let receive_max = ack.properties.as_ref().and_then(|p| p.receive_max);
                            ids.connected(&eventloop.options, receive_max);
                        }
                        if let Some(event) = from_v5(event) {
                            break Ok(event);
                        }
                    }
                    Err(e) => break Err(ConnectionError::from(e)),
                }
            },
        };
        match polled {
            Ok(event) => {
                if let Event::Incoming(Incoming::ConnAck(_)) = event {
                    self.connected();
                }
                (Ok(event), None)
            }
            Err(e) => self.failed(e),
        }
    }

    fn connected(&mut self) {
        self.backoff.reset();
    }

    fn failed(&mut self, error: ConnectionError) -> Polled {
        let wait = self.backoff.next_delay();
        self.wait = Some(wait);
        let parsed: Vec<Event> = match &mut self.eventloop {
            EventLoop::V4(eventloop, _) => eventloop.state.events.drain(..).collect(),
            EventLoop::V5(eventloop, _) => eventloop
                .state
                .events
                .drain(..)
                .filter_map(from_v5)
                .collect(),
        };
        self.queued = after_failure(error, Some(wait), parsed);
        self.queued.pop_front().expect("the error is queued")
    }
}

/// Writes a PINGREQ on the connection, as rumqttc's own keep-alive does, but without its state: rumqttc does
/// not wait for the answer (see [`Poller::next`]), and its PINGRESP is harmless whenever it is read.
async fn ping(eventloop: &mut rumqttc::EventLoop) -> Result<(), rumqttc::ConnectionError> {
    let timeout = Duration::from_secs(eventloop.network_options.connection_timeout());
    let network = eventloop.network.as_mut().expect("connected");
    network.write(Packet::PingReq).await?;
    tokio::time::timeout(timeout, network.flush())
        .await
        .map_err(|_| rumqttc::ConnectionError::FlushTimeout)??;
    Ok(())
}

/// What the stream yields for a failed connection: its error, then the events rumqttc had already parsed or
/// numbered on it, all before the next connection is tried.
///
/// rumqttc keeps those events (a PUBLISH read together with the end of the connection; an
/// `Outgoing::Publish` whose write then failed) in `state.events` and would hand them out after the next
/// ConnAck, as if they were the new connection's. Yielded here, they meet the session while it is between
/// connections: the error has already bumped its generation and marked it disconnected, and the next ConnAck
/// has not reset anything yet. For each kind, whether the next session is resumed or new:
/// * `Incoming::Publish`: stored under the between-connections generation, so its ack never goes out. Resumed:
///   the broker delivers it again and dedup acks it on the connection it came on. New: the broker forgot it;
///   its packet id may already name another message there, which a stray ack would delete unstored.
/// * `Incoming::PubAck`: the broker confirmed that republish; it is settled now, so a new session does not
///   give it back to be published again.
/// * `Outgoing::Publish`: numbers the republish it was written for, the oldest waiting for a number, while the
///   window still holds it. Resumed: rumqttc sends it again with the same id (`Numbered::Again`). New: the
///   window hands it back with the rest. Left for after the ConnAck it would number the next new republish.
/// * `Incoming::SubAck`: the broker took the subscription; every ConnAck subscribes again anyway.
/// * `Incoming::ConnAck`: only a broker's protocol error puts one here (rumqttc queues the packet, then
///   refuses it); it names no connection, so it is dropped.
/// * the rest (PingReq/PingResp, our own PubAck, Subscribe, Disconnect): nothing that a connection changes.
///
/// The error goes first, not last: while stale events are handed out the session may settle uploads, and an
/// ack put into rumqttc's request channel after its error (rumqttc drops acks from the channel only at the
/// error itself) would be written on the next connection.
pub fn after_failure(
    error: ConnectionError,
    wait: Option<Duration>,
    parsed: impl IntoIterator<Item = Event>,
) -> VecDeque<Polled> {
    std::iter::once((Err(error), wait))
        .chain(
            parsed
                .into_iter()
                .filter(|event| !matches!(event, Event::Incoming(Incoming::ConnAck(_))))
                .map(|event| (Ok(event), None)),
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    use futures_util::StreamExt;
    use rumqttc::{AsyncClient, MqttOptions, Outgoing, QoS};

    use super::*;

    /// Reads one MQTT packet: (first header byte, body).
    fn read_packet(s: &mut TcpStream) -> (u8, Vec<u8>) {
        let mut byte = [0u8; 1];
        s.read_exact(&mut byte).unwrap();
        let header = byte[0];
        let (mut len, mut shift) = (0usize, 0);
        loop {
            s.read_exact(&mut byte).unwrap();
            len |= usize::from(byte[0] & 0x7F) << shift;
            shift += 7;
            if byte[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0; len];
        s.read_exact(&mut body).unwrap();
        (header, body)
    }

    /// A scripted broker for one connection: `script` runs after its CONNECT, then the connection is held open
    /// until the client goes.
    fn broker_once(script: impl FnOnce(&mut TcpStream) + Send + 'static) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut one, _) = listener.accept().unwrap();
            read_packet(&mut one);
            script(&mut one);
            while one.read(&mut [0; 4096]).is_ok_and(|n| n > 0) {}
        });
        port
    }

    async fn next_event(events: &mut Events) -> Result<Event, ConnectionError> {
        tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("the next event")
            .expect("the stream goes on")
            .0
    }

    /// A scripted broker: `first` runs on the first connection after its CONNECT; the second connection gets a
    /// CONNACK (no session) and is held open until the client goes.
    fn broker(first: impl FnOnce(&mut TcpStream) + Send + 'static) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut one, _) = listener.accept().unwrap();
            read_packet(&mut one);
            first(&mut one);
            let (mut two, _) = listener.accept().unwrap();
            read_packet(&mut two);
            two.write_all(&[0x20, 2, 0, 0]).unwrap();
            drop(one);
            while two.read(&mut [0; 4096]).is_ok_and(|n| n > 0) {}
        });
        port
    }

    /// The events up to the second ConnAck, in words.
    async fn until_second_connack(mut events: Events) -> Vec<String> {
        let mut seen = Vec::new();
        let mut connacks = 0;
        while connacks < 2 {
            let (event, _) = tokio::time::timeout(Duration::from_secs(20), events.next())
                .await
                .expect("the next event")
                .expect("the stream goes on");
            seen.push(match event {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    connacks += 1;
                    "ConnAck".to_string()
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => format!("Publish({})", p.pkid),
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    format!("Outgoing::Publish({pkid})")
                }
                Ok(e) => format!("{e:?}"),
                Err(_) => "Err".to_string(),
            });
        }
        seen
    }

    fn options(port: u16) -> MqttOptions {
        let mut options = MqttOptions::new("poller-test", "127.0.0.1", port);
        options.set_manual_acks(true);
        options.set_keep_alive(Duration::from_secs(60));
        options.set_max_packet_size(8 << 20, 8 << 20);
        options
    }

    #[tokio::test]
    async fn packets_read_together_with_the_failure_of_a_connection_come_after_its_error_and_before_the_next_connack(
    ) {
        let port = broker(|s| {
            // CONNACK, SUBACK 1, PUBLISH 7 (QoS 1) and a packet of the reserved type 0, in one write: rumqttc
            // parses the first three and fails at the fourth in the same read. (The end of the connection
            // instead of the bad packet does the same, but only when the FIN is in by the time rumqttc reads
            // again: tests/packets.rs shows that one against the daemon.)
            let mut burst = vec![0x20, 2, 0, 0, 0x90, 3, 0, 1, 1];
            burst.extend([0x32, 8, 0, 1, b't', 0, 7, 0xFF, 0xD8, 0xFF]);
            burst.extend([0x00, 0x00]);
            s.write_all(&burst).unwrap();
        });
        let (_client, eventloop) = AsyncClient::new(options(port), 10);
        let seen = until_second_connack(events(eventloop)).await;
        assert_eq!(
            seen,
            [
                "ConnAck",
                "Err",
                "Incoming(SubAck(SubAck { pkid: 1, return_codes: [Success(AtLeastOnce)] }))",
                "Publish(7)",
                "ConnAck"
            ]
        );
    }

    #[test]
    fn a_failed_connection_yields_its_error_first_and_drops_a_stray_connack() {
        let parsed = [
            Event::Incoming(Incoming::PingResp),
            Event::Incoming(Incoming::ConnAck(rumqttc::ConnAck::new(
                rumqttc::ConnectReturnCode::Success,
                false,
            ))),
            Event::Outgoing(Outgoing::Publish(3)),
        ];
        let queued = after_failure(
            rumqttc::ConnectionError::NetworkTimeout.into(),
            Some(Duration::from_secs(1)),
            parsed,
        );
        let kinds: Vec<String> = queued
            .iter()
            .map(|(event, wait)| match event {
                Ok(e) => format!("{e:?} {wait:?}"),
                Err(e) => format!("Err({e}) {wait:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "Err(Network timeout) Some(1s)",
                "Incoming(PingResp) None",
                "Outgoing(Publish(3)) None"
            ]
        );
    }

    #[tokio::test]
    async fn a_publish_numbered_just_before_a_failed_write_comes_after_the_error_and_before_the_next_connack(
    ) {
        // The broker reads nothing after the CONNECT, so the write of a large publish never finishes.
        let port = broker(|s| {
            s.write_all(&[0x20, 2, 0, 0]).unwrap();
        });
        let (client, mut eventloop) = AsyncClient::new(options(port), 10);
        let mut network = eventloop.network_options();
        network.set_connection_timeout(1);
        network.set_tcp_send_buffer_size(4096);
        eventloop.set_network_options(network);
        client
            .try_publish("t", QoS::AtLeastOnce, false, vec![0u8; 4 << 20])
            .unwrap();
        let seen = until_second_connack(events(eventloop)).await;
        assert_eq!(seen[..2], ["ConnAck", "Err"]);
        assert_eq!(seen[2..], ["Outgoing::Publish(1)", "ConnAck"]);
    }

    #[tokio::test]
    async fn while_holding_the_stream_pings_and_reads_nothing() {
        let (sent, received) = std::sync::mpsc::channel();
        let port = broker_once(move |s| {
            // CONNACK and PUBLISH 7 at once: the upload waits in the client's buffer.
            let mut burst = vec![0x20, 2, 0, 0];
            burst.extend([0x32, 8, 0, 1, b't', 0, 7, 0xFF, 0xD8, 0xFF]);
            s.write_all(&burst).unwrap();
            sent.send(read_packet(s).0).unwrap();
        });
        let (_client, eventloop) = AsyncClient::new(options(port), 10);
        let holding = Holding::default();
        let mut events = events_holding(eventloop, holding.clone());
        assert!(matches!(
            next_event(&mut events).await,
            Ok(Event::Incoming(Incoming::ConnAck(_)))
        ));
        holding.set(true);
        assert!(matches!(
            next_event(&mut events).await,
            Ok(Event::Outgoing(Outgoing::PingReq))
        ));
        let first_packet = received.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(first_packet, 0xC0, "a PINGREQ reached the broker");
        holding.set(false);
        assert!(matches!(
            next_event(&mut events).await,
            Ok(Event::Incoming(Incoming::Publish(p))) if p.pkid == 7
        ));
    }

    #[tokio::test]
    async fn after_a_hold_rumqttc_does_not_take_its_last_unanswered_ping_for_a_dead_connection() {
        // The broker answers no ping, as when its PINGRESP waits behind uploads the client has not read.
        let port = broker_once(|s| s.write_all(&[0x20, 2, 0, 0]).unwrap());
        let mut options = options(port);
        options.set_keep_alive(Duration::from_secs(1));
        let (_client, eventloop) = AsyncClient::new(options, 10);
        let holding = Holding::default();
        let mut events = events_holding(eventloop, holding.clone());
        assert!(matches!(
            next_event(&mut events).await,
            Ok(Event::Incoming(Incoming::ConnAck(_)))
        ));
        assert!(matches!(
            next_event(&mut events).await,
            Ok(Event::Outgoing(Outgoing::PingReq))
        ));
        holding.set(true);
        assert!(matches!(
            next_event(&mut events).await,
            Ok(Event::Outgoing(Outgoing::PingReq))
        ));
        holding.set(false);
        let after = next_event(&mut events).await;
        assert!(
            matches!(after, Ok(Event::Outgoing(Outgoing::PingReq))),
            "rumqttc's next ping after the hold: {after:?}"
        );
    }
}
