//! The MQTT session: one task that owns the connection to the broker.
//!
//! It polls rumqttc's event loop as a stream (so it can wait on the broker and on the pipeline at once
//! without cancelling `poll()`, which is not cancel-safe), hands uploads to the pipeline, and sends the
//! acknowledgements and republishes the pipeline asks for. It alone writes into rumqttc's request channel,
//! and only with non-blocking calls, so it can never deadlock on a full channel.
//!
//! Rules it keeps:
//! * a connection has a generation; an upload is acknowledged only on the connection it came on (after a
//!   reconnect the same packet id may name another message), otherwise the broker redelivers it and dedup
//!   settles it again;
//! * republishes are matched to their packet ids through rumqttc's `Outgoing::Publish` events, which come in
//!   request order; those a lost broker session dropped go back to the pipeline to be sent again;
//! * it stops reading from the broker while `limits.inflight_*` uploads are unsettled, which bounds memory;
//! * reconnects back off with jitter, and each episode of trouble is logged once, in words.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, Incoming, Outgoing, Publish,
    QoS, StateError, SubscribeReasonCode,
};
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::health::{Beat, Health, Stats};
use crate::index::Hash;
use crate::pipeline::{Inbox, Outcome, Upload};

/// How long a stop waits for the pipeline and the broker before it exits anyway (nothing unacknowledged is
/// lost by that: the broker delivers it again).
const STOP_DEADLINE: Duration = Duration::from_secs(20);
/// How long a stop waits for the broker to confirm republishes already sent.
const STOP_REPUBLISH_GRACE: Duration = Duration::from_secs(3);

pub struct Settings {
    pub broker: String,
    pub upload: String,
    pub stored: String,
    pub max_images: usize,
    pub max_bytes: usize,
    /// The incoming packet limit for normal operation (see [`Poller`]).
    pub max_packet: usize,
    /// Where the upload filter of the persistent session is remembered, so that a changed `topics.upload`
    /// also unsubscribes the old filter (the broker keeps it in the session otherwise).
    pub subscription_file: std::path::PathBuf,
}

/// The filter to unsubscribe: the one remembered from an earlier run, when it is not the configured one.
pub fn stale_filter(remembered: Option<&str>, configured: &str) -> Option<String> {
    remembered
        .map(str::trim)
        .filter(|r| !r.is_empty() && *r != configured)
        .map(str::to_string)
}

/// The decision of whether an upload's ack may go out now.
pub fn ack_allowed(upload_gen: u64, current_gen: u64, connected: bool) -> bool {
    connected && upload_gen == current_gen
}

/// The event loop as a stream that waits out the backoff after an error before polling again.
struct Poller {
    eventloop: EventLoop,
    backoff: Backoff,
    wait: Option<Duration>,
    max_packet: usize,
    raised: bool,
}

/// An event with, after an error, how long until the next attempt.
pub type Polled = (Result<Event, ConnectionError>, Option<Duration>);

/// Turns an event loop into a stream that reconnects with capped, jittered backoff. Waiting on the stream's
/// `next()` in a `select!` is safe: an unfinished poll stays inside the stream, it is not cancelled.
/// `max_packet` is the normal incoming limit; a packet over it is taken once with a larger limit so it can be
/// refused and acknowledged (with a persistent session the broker would otherwise resend it forever).
pub fn events(
    eventloop: EventLoop,
    max_packet: usize,
) -> Pin<Box<dyn Stream<Item = Polled> + Send>> {
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

/// Says in words what went wrong with the connection, for the one log line per episode. The words do not
/// depend on timing or attempt, so one cause makes one line however often it repeats.
pub fn describe(e: &ConnectionError, broker: &str) -> String {
    use rumqttc::mqttbytes::Error as Bytes;
    use std::io::ErrorKind;
    if let Some(tls) = crate::broker::rustls_error(e) {
        return crate::broker::describe_rustls(tls, broker);
    }
    match e {
        ConnectionError::ConnectionRefused(code) => match code {
            ConnectReturnCode::BadUserNamePassword => {
                format!("the broker {broker} refused the login: wrong user name or password (broker.username, and broker.password_file or the systemd credential mqtt-password)")
            }
            // What Mosquitto answers to a wrong password, and to a missing one when it requires one.
            ConnectReturnCode::NotAuthorized => {
                format!("the broker {broker} refused the login (not authorized): wrong or missing user name or password (broker.username, and broker.password_file or the systemd credential mqtt-password)")
            }
            ConnectReturnCode::BadClientId => {
                format!("the broker {broker} refused the client id (broker.client_id)")
            }
            ConnectReturnCode::ServiceUnavailable => format!("the broker {broker} is unavailable"),
            ConnectReturnCode::RefusedProtocolVersion => {
                format!("the broker {broker} does not speak MQTT 3.1.1")
            }
            ConnectReturnCode::Success => format!("the broker {broker} answered oddly"),
        },
        ConnectionError::Tls(tls) => crate::broker::describe_tls(tls, broker),
        ConnectionError::NetworkTimeout => {
            format!("no answer from {broker} within broker.connect_timeout_secs")
        }
        ConnectionError::MqttState(StateError::ConnectionAborted) => {
            format!("the broker {broker} closed the connection")
        }
        ConnectionError::MqttState(StateError::AwaitPingResp) => {
            format!("the broker {broker} stopped answering (no reply to a keep-alive ping)")
        }
        ConnectionError::MqttState(StateError::Deserialization(Bytes::OutgoingPacketTooLarge {
            pkt_size,
            max,
        })) => format!(
            "a message of {pkt_size} bytes is larger than the {max} bytes this client may send to {broker}"
        ),
        // A TLS broker's answer to a plain CONNECT, read as MQTT.
        ConnectionError::MqttState(StateError::Deserialization(bytes))
            if !matches!(bytes, Bytes::Io(_)) =>
        {
            format!("{broker} sent something that is not MQTT ({bytes}): is it a TLS port? (then imaged needs [broker.tls]; 8883 is the usual TLS port)")
        }
        ConnectionError::NotConnAck(_) => {
            format!("{broker} did not answer like an MQTT broker: is it a TLS port? (then imaged needs [broker.tls]; 8883 is the usual TLS port)")
        }
        other => match crate::broker::io_error(other) {
            Some(io) if io.kind() == ErrorKind::ConnectionRefused => {
                format!("nothing accepts connections at {broker} (is the broker running? broker.host, broker.port)")
            }
            // A TLS listener resets a plain client at its first bytes (a CONNECT is no ClientHello).
            Some(io) if io.kind() == ErrorKind::ConnectionReset => {
                format!("{broker} reset the connection (if it does so at every connect: is it a TLS port? then imaged needs [broker.tls]; 8883 is the usual TLS port)")
            }
            Some(io) => format!("the connection to {broker} failed: {io}"),
            None => format!("the connection to {broker} failed: {other}"),
        },
    }
}

struct Republish {
    hash: Hash,
    name: String,
    payload: Bytes,
}

pub struct Session {
    settings: Settings,
    client: AsyncClient,
    pipeline: mpsc::Sender<Inbox>,
    health: Arc<Health>,
    beat: Arc<Beat>,
    gen: u64,
    connected: bool,
    seq: u64,
    inflight_images: usize,
    inflight_bytes: usize,
    /// Acks for the current connection that did not fit in the request channel yet.
    acks: VecDeque<(u16, QoS)>,
    to_send: VecDeque<Republish>,
    /// Republishes in the request channel, waiting for their packet id.
    unnumbered: VecDeque<(Hash, String)>,
    /// Republishes on the wire, waiting for the broker's PUBACK.
    by_pkid: HashMap<u16, (Hash, String)>,
    need_subscribe: bool,
    /// An old upload filter still in the persistent session, to unsubscribe.
    unsubscribe: Option<String>,
    resubscribe_at: Option<Instant>,
    ready: bool,
    last_problem: Option<String>,
    stopping: Option<Instant>,
    disconnect_sent: bool,
    disconnected: bool,
}

impl Session {
    pub fn new(
        settings: Settings,
        client: AsyncClient,
        pipeline: mpsc::Sender<Inbox>,
        health: Arc<Health>,
    ) -> Session {
        let remembered = std::fs::read_to_string(&settings.subscription_file).ok();
        let unsubscribe = stale_filter(remembered.as_deref(), &settings.upload);
        Session {
            beat: health.register("MQTT event loop"),
            settings,
            client,
            pipeline,
            health,
            gen: 0,
            connected: false,
            seq: 0,
            inflight_images: 0,
            inflight_bytes: 0,
            acks: VecDeque::new(),
            to_send: VecDeque::new(),
            unnumbered: VecDeque::new(),
            by_pkid: HashMap::new(),
            need_subscribe: false,
            unsubscribe,
            resubscribe_at: None,
            ready: false,
            last_problem: None,
            stopping: None,
            disconnect_sent: false,
            disconnected: false,
        }
    }

    /// Runs until `shutdown` resolves and the images in flight are settled (or the stop deadline passes).
    /// `on_ready` runs once, at the first acknowledged subscription. Errs only if the pipeline died.
    pub async fn run(
        mut self,
        eventloop: EventLoop,
        mut outcomes: UnboundedReceiver<Outcome>,
        shutdown: impl std::future::Future<Output = ()>,
        on_ready: impl FnOnce(),
    ) -> Result<(), String> {
        let mut events = events(eventloop, self.settings.max_packet);
        let mut on_ready = Some(on_ready);
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(crate::health::tick_period());
        loop {
            self.beat.beat();
            tokio::select! {
                biased;
                _ = &mut shutdown, if self.stopping.is_none() => self.stop(),
                outcome = outcomes.recv() => match outcome {
                    Some(outcome) => self.outcome(outcome),
                    None => return Err("the storage pipeline stopped".into()),
                },
                Some((event, retry)) = events.next(), if self.admitting() => {
                    self.event(event, retry)?;
                    if self.ready {
                        if let Some(f) = on_ready.take() {
                            f();
                        }
                    }
                }
                _ = tick.tick() => {}
            }
            self.flush();
            if self.stopping.is_some() && self.stop_done() {
                let _ = self.pipeline.send(Inbox::Shutdown);
                return Ok(());
            }
        }
    }

    /// Whether to read more from the broker: not while the settle window is full (a stop drops what comes).
    fn admitting(&self) -> bool {
        self.stopping.is_some()
            || (self.inflight_images < self.settings.max_images
                && self.inflight_bytes < self.settings.max_bytes)
    }

    fn stop(&mut self) {
        self.stopping = Some(Instant::now());
        crate::systemd::stopping();
        info!(
            "Stopping: finishing {} images in flight",
            self.inflight_images
        );
        // What is not sent yet stays in the outbox and goes out at the next start.
        self.to_send.clear();
    }

    fn stop_done(&mut self) -> bool {
        let Some(since) = self.stopping else {
            return false;
        };
        if since.elapsed() > STOP_DEADLINE {
            warn!(
                "Stopping without waiting longer for {} images in flight; the broker will deliver them again",
                self.inflight_images
            );
            return true;
        }
        let settled = self.inflight_images == 0 && self.acks.is_empty();
        if !settled {
            return false;
        }
        if !self.connected || self.disconnected {
            return true;
        }
        let republished = self.unnumbered.is_empty() && self.by_pkid.is_empty();
        if !self.disconnect_sent && (republished || since.elapsed() > STOP_REPUBLISH_GRACE) {
            // Queued behind the acks: once it is written, so are they.
            self.disconnect_sent = self.client.try_disconnect().is_ok();
        }
        false
    }

    fn outcome(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Settled {
                gen,
                pkid,
                qos,
                bytes,
            } => {
                self.inflight_images -= 1;
                self.inflight_bytes -= bytes;
                if qos == QoS::AtMostOnce {
                    return;
                }
                if ack_allowed(gen, self.gen, self.connected) {
                    self.acks.push_back((pkid, qos));
                } else {
                    debug!(
                        pkid,
                        "not acknowledging on a newer connection; the broker will deliver it again"
                    );
                }
            }
            Outcome::Republish {
                hash,
                name,
                payload,
            } => {
                if self.stopping.is_none() {
                    self.to_send.push_back(Republish {
                        hash,
                        name,
                        payload,
                    });
                }
            }
        }
    }

    fn event(
        &mut self,
        event: Result<Event, ConnectionError>,
        retry: Option<Duration>,
    ) -> Result<(), String> {
        match event {
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                self.gen += 1;
                self.connected = true;
                self.health.stats.connected.store(true, Ordering::Relaxed);
                self.need_subscribe = true;
                let session = if ack.session_present {
                    "session resumed"
                } else {
                    "new session"
                };
                info!(broker = %self.settings.broker, "Connected to {} ({session})", self.settings.broker);
                debug!(
                    "republishes: {} waiting for a packet id, {} for their PUBACK, {} not sent yet",
                    self.unnumbered.len(),
                    self.by_pkid.len(),
                    self.to_send.len()
                );
                self.last_problem = None;
                if !ack.session_present {
                    // rumqttc dropped the republishes it still had; send them again.
                    let lost: Vec<(Hash, String)> = self
                        .unnumbered
                        .drain(..)
                        .chain(self.by_pkid.drain().map(|(_, v)| v))
                        .collect();
                    if !lost.is_empty() {
                        debug!(
                            "{} republishes lost with the broker session; sending them again",
                            lost.len()
                        );
                        self.to_pipeline(Inbox::Lost(lost))?;
                    }
                }
            }
            Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure))
                {
                    error!(
                        "The broker {} refused the subscription to '{}': check its ACL for this user; trying again in 30s",
                        self.settings.broker, self.settings.upload
                    );
                    self.resubscribe_at = Some(Instant::now() + Duration::from_secs(30));
                } else if !self.ready {
                    self.ready = true;
                    info!(
                        "Ready: subscribed to '{}', republishing on '{}'",
                        self.settings.upload, self.settings.stored
                    );
                    self.remember_subscription();
                }
            }
            Ok(Event::Incoming(Incoming::Publish(publish))) => self.received(publish)?,
            Ok(Event::Incoming(Incoming::PubAck(ack))) => {
                let Some((hash, name)) = self.by_pkid.remove(&ack.pkid) else {
                    debug!(pkid = ack.pkid, "a PUBACK for no republish waiting for one");
                    return Ok(());
                };
                info!(
                    name = %name, topic = %self.settings.stored,
                    "Image re-published on topic '{}'", self.settings.stored
                );
                Stats::count(&self.health.stats.republished);
                self.to_pipeline(Inbox::Confirmed(hash))?;
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                // A packet id already waiting for its PUBACK is a retransmission; a new one is the oldest
                // republish still in the channel.
                if !self.by_pkid.contains_key(&pkid) {
                    match self.unnumbered.pop_front() {
                        Some(item) => {
                            self.by_pkid.insert(pkid, item);
                        }
                        None => debug!(
                            pkid,
                            "a publish went out that is no republish waiting for a packet id"
                        ),
                    }
                } else {
                    debug!(pkid, "republish sent again");
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => self.disconnected = true,
            Ok(_) => {}
            Err(e) => {
                let was_connected = self.connected;
                self.connected = false;
                self.health.stats.connected.store(false, Ordering::Relaxed);
                self.gen += 1;
                self.acks.clear();
                if self.stopping.is_some() && self.disconnect_sent {
                    self.disconnected = true;
                    return Ok(());
                }
                let problem = describe(&e, &self.settings.broker);
                let retry = retry
                    .map(|d| format!("; retrying in {:.1}s", d.as_secs_f64()))
                    .unwrap_or_default();
                if oversized(&e).is_some() {
                    warn!("A message on '{}' is larger than this client accepts ({e}); receiving it once more to refuse it", self.settings.upload);
                } else if self.last_problem.as_deref() != Some(problem.as_str()) {
                    if was_connected {
                        warn!("Lost the connection: {problem}{retry}");
                    } else {
                        warn!("Cannot connect: {problem}{retry}");
                    }
                    self.last_problem = Some(problem);
                } else {
                    debug!("still cannot connect: {problem}{retry}");
                }
            }
        }
        Ok(())
    }

    fn received(&mut self, publish: Publish) -> Result<(), String> {
        if self.stopping.is_some() {
            debug!(
                pkid = publish.pkid,
                "stopping: not taking a new upload; the broker will deliver it again"
            );
            return Ok(());
        }
        self.seq += 1;
        self.inflight_images += 1;
        self.inflight_bytes += publish.payload.len();
        self.to_pipeline(Inbox::Upload(Upload {
            seq: self.seq,
            gen: self.gen,
            pkid: publish.pkid,
            qos: publish.qos,
            topic: publish.topic,
            payload: publish.payload,
            at: chrono::Utc::now(),
        }))
    }

    fn to_pipeline(&self, msg: Inbox) -> Result<(), String> {
        self.pipeline
            .send(msg)
            .map_err(|_| "the storage pipeline stopped".to_string())
    }

    fn remember_subscription(&self) {
        let file = &self.settings.subscription_file;
        let dir = file.parent().unwrap_or(std::path::Path::new("."));
        let written = crate::storage::write_temp(dir, self.settings.upload.as_bytes(), 0o600)
            .and_then(|temp| {
                temp.persist(file).map_err(|e| crate::storage::PathError {
                    op: "replace",
                    path: file.clone(),
                    source: e.error,
                })
            });
        if let Err(e) = written {
            warn!("{e}; a later change of topics.upload will not unsubscribe this filter");
        }
    }

    /// Moves what is waiting into rumqttc's request channel, as far as it has room; never waits.
    fn flush(&mut self) {
        if !self.connected || self.disconnect_sent {
            return;
        }
        if self.resubscribe_at.is_some_and(|at| at <= Instant::now()) {
            self.resubscribe_at = None;
            self.need_subscribe = true;
        }
        if let Some(old) = &self.unsubscribe {
            if self.client.try_unsubscribe(old.clone()).is_ok() {
                info!("Unsubscribing from '{old}', the upload filter of an earlier configuration");
                self.unsubscribe = None;
            }
        }
        if self.need_subscribe
            && self
                .client
                .try_subscribe(self.settings.upload.clone(), QoS::AtLeastOnce)
                .is_ok()
        {
            self.need_subscribe = false;
        }
        while let Some(&(pkid, qos)) = self.acks.front() {
            let mut publish = Publish::new("", qos, Vec::new());
            publish.pkid = pkid;
            if self.client.try_ack(&publish).is_err() {
                break;
            }
            self.acks.pop_front();
        }
        while let Some(item) = self.to_send.front() {
            // The request channel's receiver runs only inside this task, so a send that is not done at the first
            // poll has not happened and will not: dropping it is safe.
            let send = self.client.publish_bytes(
                self.settings.stored.clone(),
                QoS::AtLeastOnce,
                false,
                item.payload.clone(),
            );
            match send.now_or_never() {
                Some(Ok(())) => {
                    let item = self.to_send.pop_front().expect("front exists");
                    self.unnumbered.push_back((item.hash, item.name));
                }
                Some(Err(_)) | None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_remembered_filter_other_than_the_configured_one_is_unsubscribed() {
        assert_eq!(stale_filter(None, "image/upload"), None);
        assert_eq!(stale_filter(Some("image/upload\n"), "image/upload"), None);
        assert_eq!(stale_filter(Some(""), "image/upload"), None);
        assert_eq!(
            stale_filter(Some("cams/#"), "image/upload").as_deref(),
            Some("cams/#")
        );
    }

    #[test]
    fn an_ack_goes_out_only_on_the_connection_its_upload_came_on() {
        assert!(ack_allowed(3, 3, true));
        assert!(!ack_allowed(3, 3, false));
        assert!(!ack_allowed(2, 3, true));
    }

    #[test]
    fn connection_problems_are_described_in_words() {
        let refused = ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword);
        assert!(describe(&refused, "b:1").contains("wrong user name or password"));
        let closed =
            ConnectionError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(describe(&closed, "b:1").contains("is the broker running?"));
    }
}
