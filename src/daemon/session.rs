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
//!   settles it again. What rumqttc had parsed on a connection that failed comes after that connection's
//!   error and before the next ConnAck ([`mqtt::after_failure`]), so it is never taken for the new one's;
//! * republishes are matched to their packet ids through rumqttc's `Outgoing::Publish` events, which come in
//!   request order; those a lost broker session dropped go back to the pipeline to be sent again. The window
//!   follows subscribes' packet ids too, to know which ids its publishes will get (MQTT 5 wraps them soon);
//! * it stops reading from the broker while `limits.inflight_*` uploads are unsettled, which bounds memory,
//!   and meanwhile keeps the connection alive with pings that read nothing ([`mqtt::events_holding`]);
//! * reconnects back off with jitter, and each episode of trouble is logged once, in words;
//! * what it says about imaged ([`Status`]: online, stats, Home Assistant's discovery) goes out through the
//!   same publish window as the republishes, ahead of them, so every `Outgoing::Publish` names its publish.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use rumqttc::{ConnAck, Event, Incoming, Outgoing, Publish, QoS, SubAck, SubscribeReasonCode};
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{debug, error, info, warn};

use super::health::{Beat, Health, Stats};
use super::index::Hash;
use super::index::Origin;
use super::pipeline::{Inbox, Outcome, Upload};
use super::status::{self, Status};
use crate::mqtt::{self, Client, ConnectionError, EventLoop, Numbered, Properties, PublishWindow};
use crate::storage;

/// How long a stop waits for the pipeline and the broker before it exits anyway (nothing unacknowledged is
/// lost by that: the broker delivers it again).
const STOP_DEADLINE: Duration = Duration::from_secs(20);
/// How long a stop waits for the broker to confirm republishes already sent.
const STOP_REPUBLISH_GRACE: Duration = Duration::from_secs(3);

/// What the session needs from the config.
pub struct Settings {
    /// `host:port`, for log lines.
    pub broker: String,
    pub upload: String,
    /// `topics.stored`, for log lines.
    pub stored: String,
    /// Status, stats and Home Assistant.
    pub status: status::Settings,
    pub max_images: usize,
    pub max_bytes: usize,
    /// Republishes in flight at once (see [`mqtt::window`]).
    pub republish_window: usize,
    /// `broker.keep_alive_secs`: how often rumqttc pings; the session pings twice as often while it holds back
    /// reading ([`ping_due`]).
    pub keep_alive: Duration,
    /// Where the upload filter of the persistent session is remembered, so that a changed `topics.upload`
    /// also unsubscribes the old filter (the broker keeps it in the session otherwise). Beside it, `session`
    /// names the broker and client id of the session imaged had, for the warning about a broker that forgot
    /// it ([`broker_forgot`]).
    pub subscription_file: PathBuf,
    /// `client_id@host:port`: whose session, on which broker.
    pub identity: String,
}

/// What a reload changes in the session.
#[derive(Debug)]
pub struct Reload {
    pub upload: String,
    pub stored: String,
    /// Told (or dropped) once the reload is done here: a new upload filter is acknowledged by the broker,
    /// or will be subscribed at the next connection.
    pub done: tokio::sync::oneshot::Sender<()>,
}

/// The filter to unsubscribe: the one remembered from an earlier run, when it is not the configured one.
pub fn stale_filter(remembered: Option<&str>, configured: &str) -> Option<String> {
    remembered
        .map(str::trim)
        .filter(|r| !r.is_empty() && *r != configured)
        .map(str::to_string)
}

/// Whether imaged had a session on this broker under this client id before: as the `session` file remembers
/// (`remembered`), or, written by a version without it, as a remembered subscription says. Another broker
/// or client id starts a new session, which is nothing the broker forgot.
pub fn had_session(remembered: Option<&str>, subscribed_before: bool, identity: &str) -> bool {
    match remembered {
        Some(who) => who.trim() == identity,
        None => subscribed_before,
    }
}

/// Whether a ConnAck with `session_present` begins an episode of a broker that forgot imaged, to warn about
/// once, and whether the episode goes on. `had_session`: imaged subscribed in a persistent session before,
/// in this run or an earlier one. The episode ends at a connection that finds the session again, so a
/// broker that keeps no session at all, or one restarted again meanwhile, is not warned about at every
/// reconnect.
pub fn broker_forgot(had_session: bool, session_present: bool, in_episode: bool) -> (bool, bool) {
    let forgot = had_session && !session_present;
    (forgot && !in_episode, forgot)
}

/// Whether to ping now while reading is held back: half a keep-alive after the last ping, so that the broker,
/// which gives up after one and a half keep-alives of silence, always hears from imaged in time.
pub fn ping_due(last_ping: Instant, keep_alive: Duration, now: Instant) -> bool {
    now >= last_ping + keep_alive / 2
}

/// Whether a stop has nothing more to wait for from the pipeline: every ack is out, and no upload is in
/// flight, or those that are wait for the disk (free space below `retention.min_free`, or writes refused),
/// which a stop cannot wait out. Unacknowledged, they come again from the broker at the next start.
pub fn stop_settled(inflight_images: usize, acks_pending: bool, disk_waits: bool) -> bool {
    !acks_pending && (inflight_images == 0 || disk_waits)
}

/// The decision of whether an upload's ack may go out now.
pub fn ack_allowed(upload_gen: u64, current_gen: u64, connected: bool) -> bool {
    connected && upload_gen == current_gen
}

/// What a publish in the window is, for its PUBACK.
#[derive(Debug)]
enum Sent {
    /// A stored image's republish, on `topic`.
    Image {
        hash: Hash,
        name: String,
        topic: String,
    },
    /// A stored image's event.
    Event { hash: Hash, name: String },
    /// What imaged says about itself: not kept when a broker session is lost (it is said again at the next
    /// subscription).
    Status,
}

/// A publish of a stored image waiting for room in the window.
struct Out {
    topic: String,
    retain: bool,
    payload: Bytes,
    sent: Sent,
    properties: Properties,
}

/// What an MQTT 5 republish says about its image (3.1.1 sends none of it): its content type and, as user
/// properties, its name, hash and, when still known, camera and receive time.
pub fn republish_properties(name: &str, hash: &Hash, origin: Option<&Origin>) -> Properties {
    let mut user = vec![
        ("name".to_string(), name.to_string()),
        ("sha256".to_string(), storage::hex(hash)),
    ];
    if let Some(origin) = origin {
        user.push(("camera".to_string(), origin.camera.clone()));
        user.push((
            "received_at".to_string(),
            super::consumers::rfc3339_ms(origin.at_ms),
        ));
    }
    Properties {
        content_type: Some("image/jpeg".to_string()),
        user,
    }
}

/// The connection's state. Only the session's own task touches it; the pipeline hears from it over
/// [`Inbox`] and answers over [`Outcome`].
pub struct Session {
    settings: Settings,
    client: Client,
    pipeline: mpsc::Sender<Inbox>,
    health: Arc<Health>,
    beat: Arc<Beat>,
    /// The connection's generation: one more at every ConnAck and every connection error.
    gen: u64,
    connected: bool,
    /// Set while the window is full: the event stream then pings instead of polling.
    holding: mqtt::Holding,
    /// The last ping on the connection (rumqttc's or the stream's), or the ConnAck.
    last_ping: Instant,
    /// The arrival number of the last upload handed to the pipeline (the pipeline settles in this order).
    seq: u64,
    /// Uploads handed to the pipeline and not yet settled, in count and bytes: the read window.
    inflight_images: usize,
    inflight_bytes: usize,
    /// Acks for the current connection that did not fit in the request channel yet.
    acks: VecDeque<(u16, QoS)>,
    /// Republishes and events from the pipeline not yet in the request channel.
    to_send: VecDeque<Out>,
    /// Status messages not yet in the request channel; they go first.
    announce: VecDeque<status::Message>,
    status: Status,
    /// The upload subscription was acknowledged on this connection: status messages may go out.
    online: bool,
    /// `offline` was queued for the stop.
    offline_queued: bool,
    /// Publishes in the request channel or on the wire, until the broker's PUBACK.
    republishes: PublishWindow<Sent>,
    need_subscribe: bool,
    /// The broker acknowledged a subscription on this connection since the filter last changed.
    subscribed: bool,
    /// The reload waiting for the broker's acknowledgement of its new upload filter.
    reload_done: Option<tokio::sync::oneshot::Sender<()>>,
    /// Old upload filters still in the persistent session, to unsubscribe once the current one is
    /// subscribed (so that nothing published meanwhile matches neither).
    unsubscribe: Vec<String>,
    /// The upload filter in the subscription file.
    remembered: Option<String>,
    /// When to try a refused subscription again.
    resubscribe_at: Option<Instant>,
    /// imaged had a session on this broker under this client id: in this run or, as the `session` file
    /// says, an earlier one ([`had_session`]).
    had_session: bool,
    /// The `session` file names this broker and client id.
    session_remembered: bool,
    /// In an episode of connections that found no session although imaged had one ([`broker_forgot`]).
    forgotten: bool,
    /// The first subscription was acknowledged.
    ready: bool,
    /// The words of the last connection problem logged, so one cause makes one line.
    last_problem: Option<String>,
    /// When the stop began.
    stopping: Option<Instant>,
    disconnect_sent: bool,
    disconnected: bool,
}

impl Session {
    pub fn new(
        settings: Settings,
        client: Client,
        pipeline: mpsc::Sender<Inbox>,
        health: Arc<Health>,
    ) -> Session {
        let remembered = std::fs::read_to_string(&settings.subscription_file).ok();
        let identity = std::fs::read_to_string(session_file(&settings)).ok();
        let had_session = had_session(
            identity.as_deref(),
            remembered.is_some(),
            &settings.identity,
        );
        let session_remembered = identity.as_deref().map(str::trim) == Some(&settings.identity);
        let unsubscribe = stale_filter(remembered.as_deref(), &settings.upload)
            .into_iter()
            .collect();
        Session {
            beat: health.register("MQTT event loop"),
            republishes: PublishWindow::new(settings.republish_window),
            status: Status::new(settings.status.clone()),
            announce: VecDeque::new(),
            online: false,
            offline_queued: false,
            settings,
            client,
            pipeline,
            health,
            gen: 0,
            connected: false,
            holding: mqtt::Holding::default(),
            last_ping: Instant::now(),
            seq: 0,
            inflight_images: 0,
            inflight_bytes: 0,
            acks: VecDeque::new(),
            to_send: VecDeque::new(),
            need_subscribe: false,
            subscribed: false,
            reload_done: None,
            unsubscribe,
            resubscribe_at: None,
            had_session,
            session_remembered,
            remembered,
            forgotten: false,
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
        mut reloads: UnboundedReceiver<Reload>,
        shutdown: impl std::future::Future<Output = ()>,
        on_ready: impl FnOnce(),
    ) -> Result<(), PipelineStopped> {
        let mut events = mqtt::events_holding(eventloop, self.holding.clone());
        let mut on_ready = Some(on_ready);
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(super::health::tick_period());
        loop {
            self.beat.beat();
            let holding = self.holding_back();
            self.holding.set(holding);
            let poll = self.admitting()
                || (holding && ping_due(self.last_ping, self.settings.keep_alive, Instant::now()));
            // Wakes the loop when the next ping is due (a tick may be later than that).
            let ping_at = self.last_ping + self.settings.keep_alive / 2;
            tokio::select! {
                biased;
                _ = &mut shutdown, if self.stopping.is_none() => self.stop(),
                outcome = outcomes.recv() => match outcome {
                    Some(outcome) => self.outcome(outcome),
                    None => return Err(PipelineStopped),
                },
                Some(reload) = reloads.recv() => self.reload(reload),
                Some((event, retry)) = events.next(), if poll => {
                    self.event(event, retry)?;
                    if self.ready {
                        if let Some(f) = on_ready.take() {
                            f();
                        }
                    }
                }
                () = tokio::time::sleep_until(ping_at.into()), if holding => {}
                _ = tick.tick() => {}
            }
            if self.online && self.stopping.is_none() {
                let stats = self
                    .status
                    .tick(&self.health.stats, super::systemd::unix_ms());
                self.announce.extend(stats);
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

    /// Whether reading is held back on a live connection (the window is full): then only pings go out, each
    /// when [`ping_due`], so the broker keeps the connection through a long disk outage. A poll would read
    /// more uploads (up to nine a time) into memory that the window says is used up; a ping reads nothing.
    fn holding_back(&self) -> bool {
        !self.admitting() && self.connected && !self.disconnect_sent
    }

    /// Republishes from now on go to the new stored topic; a new upload filter is subscribed, and the old
    /// one unsubscribed after it. Uploads in flight are settled and acknowledged as before.
    fn reload(&mut self, reload: Reload) {
        if reload.stored != self.settings.stored && self.online {
            // Home Assistant's image entities name the stored topics.
            let announce = self.status.restored(&reload.stored, &self.health.stats);
            self.announce.extend(announce);
        }
        self.settings.stored = reload.stored;
        if reload.upload != self.settings.upload {
            let old = std::mem::replace(&mut self.settings.upload, reload.upload);
            self.unsubscribe.retain(|f| *f != self.settings.upload);
            self.unsubscribe.push(old);
            self.need_subscribe = true;
            self.subscribed = false;
            if self.connected {
                self.reload_done = Some(reload.done);
            }
        }
    }

    fn stop(&mut self) {
        self.stopping = Some(Instant::now());
        super::systemd::stopping();
        info!(
            "Stopping: finishing {} images in flight",
            self.inflight_images
        );
        // What is not sent yet stays in the outbox and goes out at the next start.
        self.to_send.clear();
        self.announce.clear();
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
        let stats = &self.health.stats;
        let disk_waits =
            stats.space_low.load(Ordering::Relaxed) || stats.disk_trouble.load(Ordering::Relaxed);
        if !stop_settled(self.inflight_images, !self.acks.is_empty(), disk_waits) {
            return false;
        }
        if !self.connected || self.disconnected {
            return true;
        }
        let republished = self.republishes.is_empty();
        if !self.disconnect_sent && (republished || since.elapsed() > STOP_REPUBLISH_GRACE) {
            // `offline` before the DISCONNECT, which makes the broker drop the will.
            if !self.offline_queued {
                self.offline_queued = true;
                if let Some(offline) = self.status.stopping().filter(|_| self.online) {
                    self.announce.push_back(offline);
                    return false;
                }
            }
            if !self.announce.is_empty() {
                return false;
            }
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
                self.count_inflight();
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
                publishes,
                origin,
            } => {
                if self.stopping.is_some() {
                    return;
                }
                self.to_send.push_back(Out {
                    topic: publishes.stored_topic.clone(),
                    retain: publishes.retain,
                    payload,
                    properties: republish_properties(&name, &hash, origin.as_ref()),
                    sent: Sent::Image {
                        hash,
                        name: name.clone(),
                        topic: publishes.stored_topic,
                    },
                });
                if let Some((topic, event)) = publishes.event {
                    self.to_send.push_back(Out {
                        topic,
                        retain: false,
                        payload: event,
                        properties: Properties {
                            content_type: Some("application/json".into()),
                            user: Vec::new(),
                        },
                        sent: Sent::Event { hash, name },
                    });
                }
            }
            Outcome::Stored { camera, at_ms } => {
                let announce = self.status.stored(&camera, at_ms);
                if self.online {
                    self.announce.extend(announce);
                }
            }
        }
    }

    fn event(
        &mut self,
        event: Result<Event, ConnectionError>,
        retry: Option<Duration>,
    ) -> Result<(), PipelineStopped> {
        match event {
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => self.connected(&ack)?,
            Ok(Event::Incoming(Incoming::SubAck(ack))) => self.subscribed(&ack),
            Ok(Event::Incoming(Incoming::Publish(publish))) => self.received(publish)?,
            Ok(Event::Incoming(Incoming::PubAck(ack))) => match self.republishes.acked(ack.pkid) {
                None => debug!(pkid = ack.pkid, "a PUBACK for no publish waiting for one"),
                Some(Sent::Image { hash, name, topic }) => {
                    info!(name = %name, topic = %topic, "Image re-published on topic '{topic}'");
                    Stats::count(&self.health.stats.republished);
                    self.to_pipeline(Inbox::Confirmed(hash))?;
                }
                Some(Sent::Event { hash, name }) => {
                    debug!(name = %name, "image event published");
                    self.to_pipeline(Inbox::Confirmed(hash))?;
                }
                Some(Sent::Status) => {}
            },
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => match self.republishes.numbered(pkid) {
                Numbered::New => {}
                Numbered::Again => debug!(pkid, "republish sent again"),
                Numbered::Unknown => debug!(
                    pkid,
                    "a publish went out that is no republish waiting for a packet id"
                ),
            },
            Ok(Event::Outgoing(Outgoing::Subscribe(pkid) | Outgoing::Unsubscribe(pkid))) => {
                self.republishes.id_taken(pkid)
            }
            // The window keeps the ids a publish will get free; a second such publish would replace this one.
            Ok(Event::Outgoing(Outgoing::AwaitAck(pkid))) => {
                warn!(
                    pkid,
                    "a publish got a packet id still in use; rumqttc holds it back"
                )
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => self.disconnected = true,
            Ok(Event::Outgoing(Outgoing::PingReq)) => self.last_ping = Instant::now(),
            Ok(_) => {}
            Err(e) => self.connection_lost(&e, retry),
        }
        Ok(())
    }

    fn connected(&mut self, ack: &ConnAck) -> Result<(), PipelineStopped> {
        self.gen += 1;
        self.connected = true;
        // rumqttc's keep-alive timer starts with the connection.
        self.last_ping = Instant::now();
        self.health.stats.connected.store(true, Ordering::Relaxed);
        self.need_subscribe = true;
        // Said again once subscribed.
        self.announce.clear();
        self.subscribed = false;
        let session = if ack.session_present {
            "session resumed"
        } else {
            "new session"
        };
        info!(broker = %self.settings.broker, "Connected to {} ({session})", self.settings.broker);
        let (warn_now, forgotten) =
            broker_forgot(self.had_session, ack.session_present, self.forgotten);
        self.forgotten = forgotten;
        if warn_now {
            warn!(
                "The broker {} has no session for imaged although it had one: uploads published while imaged \
                 was away may have been dropped by the broker (it restarted without persistence, the session \
                 expired, or it keeps none). To keep them, configure the broker to keep sessions: \
                 `persistence true` in mosquitto.conf (and a persistent_client_expiration longer than imaged \
                 may be away), or broker.session_expiry with MQTT 5",
                self.settings.broker
            );
        }
        let (unnumbered, on_wire) = self.republishes.stages();
        debug!(
            packet_ids = self.client.packet_ids(),
            "republishes: {unnumbered} waiting for a packet id, {on_wire} for their PUBACK, {} not sent yet",
            self.to_send.len()
        );
        self.last_problem = None;
        if !ack.session_present {
            // rumqttc dropped the republishes it still had; send them again.
            let lost: Vec<(Hash, String)> = self
                .republishes
                .take_all()
                .into_iter()
                .filter_map(|sent| match sent {
                    Sent::Image { hash, name, .. } | Sent::Event { hash, name } => {
                        Some((hash, name))
                    }
                    Sent::Status => None,
                })
                .collect();
            if !lost.is_empty() {
                debug!(
                    "{} republishes lost with the broker session; sending them again",
                    lost.len()
                );
                self.to_pipeline(Inbox::Lost(lost))?;
            }
        }
        Ok(())
    }

    fn subscribed(&mut self, ack: &SubAck) {
        let refused =
            |i: usize| matches!(ack.return_codes.get(i), Some(SubscribeReasonCode::Failure));
        if refused(1) {
            warn!(
                "The broker {} refused the subscription to '{}': discovery is not sent again when Home Assistant restarts",
                self.settings.broker,
                self.status.birth_topic().unwrap_or_default()
            );
        }
        if refused(0) {
            error!(
                "The broker {} refused the subscription to '{}': check its ACL for this user; trying again in 30s",
                self.settings.broker, self.settings.upload
            );
            self.resubscribe_at = Some(Instant::now() + Duration::from_secs(30));
        } else {
            self.subscribed = true;
            if !self.ready {
                self.ready = true;
                self.remember_session();
                info!(
                    "Ready: subscribed to '{}', republishing on '{}'",
                    self.settings.upload, self.settings.stored
                );
            } else if self.remembered.as_deref() != Some(self.settings.upload.as_str()) {
                info!("Subscribed to '{}'", self.settings.upload);
            }
            self.remember_subscription();
        }
        // A refused filter is logged above; the reload itself is done.
        if let Some(done) = self.reload_done.take() {
            let _ = done.send(());
        }
        if !refused(0) {
            self.online = true;
            let now = super::systemd::unix_ms();
            let announce = self.status.ready(&self.health.stats, now);
            self.announce.extend(announce);
        }
    }

    fn connection_lost(&mut self, e: &ConnectionError, retry: Option<Duration>) {
        let was_connected = self.connected;
        self.connected = false;
        self.online = false;
        self.health.stats.connected.store(false, Ordering::Relaxed);
        self.gen += 1;
        self.acks.clear();
        // The new filter is subscribed at the next connection.
        self.reload_done = None;
        if self.stopping.is_some() && self.disconnect_sent {
            self.disconnected = true;
            return;
        }
        let problem = mqtt::describe(e, &self.settings.broker);
        let retry = retry
            .map(|d| format!("; retrying in {:.1}s", d.as_secs_f64()))
            .unwrap_or_default();
        if self.last_problem.as_deref() != Some(problem.as_str()) {
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

    fn received(&mut self, publish: Publish) -> Result<(), PipelineStopped> {
        if self.status.is_birth(&publish.topic) {
            self.birth(&publish);
            return Ok(());
        }
        if self.stopping.is_some() {
            debug!(
                pkid = publish.pkid,
                "stopping: not taking a new upload; the broker will deliver it again"
            );
            return Ok(());
        }
        self.seq += 1;
        if self.inflight_images == 0 {
            // Work starts waiting now: the pipeline has until the watchdog's limit to move it.
            self.health.progress.beat();
        }
        self.inflight_images += 1;
        self.count_inflight();
        self.inflight_bytes += publish.payload.len();
        debug!(
            pkid = publish.pkid,
            "upload received; {} unsettled", self.inflight_images
        );
        self.to_pipeline(Inbox::Upload(Upload {
            seq: self.seq,
            gen: self.gen,
            pkid: publish.pkid,
            qos: publish.qos,
            topic: publish.topic,
            payload: publish.payload,
            at: crate::clock::now(),
        }))
    }

    /// Home Assistant's birth message (the config keeps the upload filter from matching its topic).
    fn birth(&mut self, publish: &Publish) {
        if self.online && self.stopping.is_none() {
            let now = super::systemd::unix_ms();
            let announce = self.status.birth(&publish.payload, &self.health.stats, now);
            if !announce.is_empty() {
                info!("Home Assistant is online: sending its discovery again");
            }
            self.announce.extend(announce);
        }
        // Subscribed at QoS 0; a QoS 1 copy comes from a subscription of an earlier configuration.
        if publish.qos != QoS::AtMostOnce {
            self.acks.push_back((publish.pkid, publish.qos));
        }
    }

    /// For the watchdog: how many uploads wait for the pipeline.
    fn count_inflight(&self) {
        let n = u64::try_from(self.inflight_images).unwrap_or(u64::MAX);
        self.health.stats.inflight.store(n, Ordering::Relaxed);
    }

    fn to_pipeline(&self, msg: Inbox) -> Result<(), PipelineStopped> {
        self.pipeline.send(msg).map_err(|_| PipelineStopped)
    }

    /// Notes whose session the broker now keeps, once.
    fn remember_session(&mut self) {
        self.had_session = true;
        if self.session_remembered {
            return;
        }
        let file = session_file(&self.settings);
        match storage::replace_file(&file, self.settings.identity.as_bytes(), 0o600) {
            Ok(()) => self.session_remembered = true,
            Err(e) => warn!(
                "{e}; if the broker forgets imaged's session while imaged restarts, imaged cannot tell"
            ),
        }
    }

    fn remember_subscription(&mut self) {
        if self.remembered.as_deref() == Some(self.settings.upload.as_str()) {
            return;
        }
        let file = &self.settings.subscription_file;
        match storage::replace_file(file, self.settings.upload.as_bytes(), 0o600) {
            Ok(()) => self.remembered = Some(self.settings.upload.clone()),
            Err(e) => {
                warn!("{e}; a later change of topics.upload will not unsubscribe this filter");
            }
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
        if self.need_subscribe {
            let mut filters = vec![(self.settings.upload.clone(), QoS::AtLeastOnce)];
            // Home Assistant's birth message, at QoS 0: nothing to acknowledge, nothing stored.
            if let Some(birth) = self.status.birth_topic() {
                filters.push((birth, QoS::AtMostOnce));
            }
            if self.client.try_subscribe_many(&filters).is_ok() {
                self.need_subscribe = false;
            }
        }
        // The broker takes requests in order: queued behind the new subscription, an unsubscription of the
        // old filter cannot leave a moment without either.
        while self.subscribed && !self.need_subscribe {
            let Some(old) = self.unsubscribe.last() else {
                break;
            };
            if self.client.try_unsubscribe(old.clone()).is_err() {
                break;
            }
            info!("Unsubscribing from '{old}', the upload filter of an earlier configuration");
            self.unsubscribe.pop();
        }
        while let Some(&(pkid, qos)) = self.acks.front() {
            if self.client.try_ack(pkid, qos).is_err() {
                break;
            }
            self.acks.pop_front();
        }
        while let Some(message) = self.announce.pop_front() {
            let payload = message.payload.clone();
            if self
                .republishes
                .try_publish(
                    &self.client,
                    &message.topic,
                    message.retain,
                    payload,
                    &Properties::default(),
                    Sent::Status,
                )
                .is_err()
            {
                self.announce.push_front(message);
                return;
            }
        }
        while let Some(out) = self.to_send.pop_front() {
            let Out {
                topic,
                retain,
                payload,
                properties,
                sent,
            } = out;
            if let Err(sent) = self.republishes.try_publish(
                &self.client,
                &topic,
                retain,
                payload.clone(),
                &properties,
                sent,
            ) {
                self.to_send.push_front(Out {
                    topic,
                    retain,
                    payload,
                    properties,
                    sent,
                });
                break;
            }
        }
    }
}

fn session_file(settings: &Settings) -> PathBuf {
    settings.subscription_file.with_file_name("session")
}

/// The storage pipeline is gone: the daemon cannot go on.
#[derive(Debug, thiserror::Error)]
#[error("the storage pipeline stopped")]
pub struct PipelineStopped;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_waits_for_uploads_being_stored_but_not_for_those_waiting_for_the_disk_and_never_for_unsent_acks(
    ) {
        assert!(stop_settled(0, false, false));
        assert!(!stop_settled(3, false, false));
        assert!(stop_settled(3, false, true));
        assert!(!stop_settled(0, true, false));
        assert!(!stop_settled(3, true, true));
    }

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
    fn a_broker_that_forgot_imaged_is_warned_about_once_until_a_connection_finds_the_session_again()
    {
        // A first start: no session before, nothing forgotten.
        assert_eq!(broker_forgot(false, false, false), (false, false));
        // Resumed, as it should be.
        assert_eq!(broker_forgot(true, true, false), (false, false));
        // The broker restarted without persistence: one warning, and an episode begins.
        assert_eq!(broker_forgot(true, false, false), (true, true));
        // Further connections without a session are the same episode.
        assert_eq!(broker_forgot(true, false, true), (false, true));
        // A connection that finds the session ends it.
        assert_eq!(broker_forgot(true, true, true), (false, false));
    }

    #[test]
    fn a_session_was_had_on_the_same_broker_and_client_id_or_as_an_older_version_remembered_it() {
        let me = "imaged-1@broker:1883";
        assert!(had_session(Some("imaged-1@broker:1883\n"), true, me));
        assert!(!had_session(Some("imaged-1@other:1883"), true, me));
        assert!(!had_session(Some("imaged-2@broker:1883"), true, me));
        // Written by a version that remembered only the subscription.
        assert!(had_session(None, true, me));
        assert!(!had_session(None, false, me));
    }

    #[test]
    fn while_reading_is_held_back_a_ping_is_due_every_half_keep_alive() {
        let start = Instant::now();
        let keep_alive = Duration::from_secs(2);
        assert!(!ping_due(start, keep_alive, start));
        assert!(!ping_due(
            start,
            keep_alive,
            start + Duration::from_millis(999)
        ));
        assert!(ping_due(start, keep_alive, start + Duration::from_secs(1)));
        assert!(ping_due(start, keep_alive, start + Duration::from_secs(5)));
    }

    #[test]
    fn an_ack_goes_out_only_on_the_connection_its_upload_came_on() {
        assert!(ack_allowed(3, 3, true));
        assert!(!ack_allowed(3, 3, false));
        assert!(!ack_allowed(2, 3, true));
    }
}
