//! rumqttc's event loop as a stream that backs off between reconnects and refuses an oversized packet
//! without a reconnect loop.

use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;
use rumqttc::{ConnectionError, Event, EventLoop, Incoming, StateError};

use crate::backoff::Backoff;

/// The event loop as a stream that waits out the backoff after an error before polling again.
struct Poller {
    eventloop: EventLoop,
    backoff: Backoff,
    /// The wait before the next poll, after an error.
    wait: Option<Duration>,
    /// The normal incoming packet limit.
    max_packet: usize,
    /// The limit was raised to take one oversized packet; back to normal at the next ConnAck.
    raised: bool,
}

/// An event with, after an error, how long until the next attempt.
pub type Polled = (Result<Event, ConnectionError>, Option<Duration>);

/// The stream [`events`] returns.
pub type Events = Pin<Box<dyn Stream<Item = Polled> + Send>>;

/// Turns an event loop into a stream that reconnects with capped, jittered backoff. Waiting on the stream's
/// `next()` in a `select!` is safe: an unfinished poll stays inside the stream, it is not cancelled.
/// `max_packet` is the normal incoming limit; a packet over it is taken once with a larger limit so it can be
/// refused and acknowledged (with a persistent session the broker would otherwise resend it forever).
pub fn events(eventloop: EventLoop, max_packet: usize) -> Events {
    let poller = Poller {
        eventloop,
        backoff: Backoff::broker(),
        wait: None,
        max_packet,
        raised: false,
    };
    Box::pin(futures_util::stream::unfold(poller, |mut p| async move {
        if let Some(wait) = p.wait.take() {
            tokio::time::sleep(wait).await;
        }
        let event = p.eventloop.poll().await;
        match &event {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                p.backoff.reset();
                if p.raised {
                    // The limit only matters when a connection is made; this one keeps the raised one.
                    p.eventloop
                        .mqtt_options
                        .set_max_packet_size(p.max_packet, p.max_packet);
                    p.raised = false;
                }
            }
            Err(e) => {
                if let Some(size) = oversized(e) {
                    // rumqttc cannot skip a packet over its limit: take it once with a larger limit, so the
                    // pipeline can refuse and acknowledge it.
                    p.eventloop
                        .mqtt_options
                        .set_max_packet_size(size.saturating_add(16), p.max_packet);
                    p.raised = true;
                }
                p.wait = Some(p.backoff.next_delay());
            }
            Ok(_) => {}
        }
        let wait = p.wait;
        Some(((event, wait), p))
    }))
}

pub fn oversized(e: &ConnectionError) -> Option<usize> {
    match e {
        ConnectionError::MqttState(StateError::Deserialization(
            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(n),
        )) => Some(*n),
        _ => None,
    }
}
