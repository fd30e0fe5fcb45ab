//! The load generator and the subscriber: publishes unique payloads at QoS 1 with a bounded window of images
//! published and not yet seen back, and checks every payload that comes back byte for byte.
//!
//! The window is end to end (an image leaves it when it is seen on the subscribed topic), not only until the
//! broker's PUBACK: Mosquitto acknowledges a publish as soon as it has it, so a PUBACK window would let the
//! generator pile up gigabytes in the broker's queues at 5 MB per image.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, QoS};
use tokio::runtime::Runtime;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::payload::{Bad, Gen};

/// Largest packet either client accepts: above the largest image with room for the header.
const MAX_PACKET: usize = 64 << 20;

/// When a phase stops publishing.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    Count(u64),
    After(Duration),
}

/// One phase: how many at once, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct Phase {
    pub window: usize,
    pub stop: Stop,
    /// A phase gives up when nothing comes back for this long.
    pub stall: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct PhaseResult {
    pub sent: u64,
    pub received: u64,
    /// From the first publish to the last first receipt.
    pub elapsed: Duration,
    /// Publish → first receipt, in milliseconds, sorted.
    pub latencies_ms: Vec<f64>,
    /// Why the phase ended early, if it did.
    pub failure: Option<String>,
}

impl PhaseResult {
    pub fn rate(&self) -> f64 {
        if self.elapsed.is_zero() {
            0.0
        } else {
            self.received as f64 / self.elapsed.as_secs_f64()
        }
    }

    pub fn lost(&self) -> u64 {
        self.sent - self.received
    }
}

/// Everything the subscriber saw over all phases.
#[derive(Debug, Clone, Default)]
pub struct Totals {
    pub sent: u64,
    pub duplicates: u64,
    pub corrupt: u64,
    pub foreign: u64,
    pub errors: Vec<String>,
}

struct Track {
    sent_at: Vec<Instant>,
    got: Vec<bool>,
    received: u64,
    duplicates: u64,
    corrupt: u64,
    foreign: u64,
    phase_start: usize,
    phase_received: u64,
    last_receipt: Option<Instant>,
    latencies_ms: Vec<f64>,
    window: Arc<Semaphore>,
}

struct Shared {
    gen: Gen,
    probe: Gen,
    track: Mutex<Track>,
    progress: Notify,
    probe_seen: AtomicBool,
    subscribed: Notify,
    connected: Notify,
    errors: Mutex<Vec<String>>,
}

impl Shared {
    fn on_receive(&self, payload: &[u8]) {
        // The byte-for-byte check runs outside the lock: it is the expensive part for big images.
        let checked = self.gen.check(payload);
        let now = Instant::now();
        let mut t = self.track.lock().unwrap();
        match checked {
            Ok(seq) => {
                let i = usize::try_from(seq).unwrap_or(usize::MAX);
                if i >= t.sent_at.len() {
                    t.corrupt += 1; // a sequence number never sent
                } else if t.got[i] {
                    t.duplicates += 1;
                } else {
                    t.got[i] = true;
                    t.received += 1;
                    t.last_receipt = Some(now);
                    if i >= t.phase_start {
                        let ms = (now - t.sent_at[i]).as_secs_f64() * 1e3;
                        t.latencies_ms.push(ms);
                        t.phase_received += 1;
                        t.window.add_permits(1);
                    }
                    drop(t);
                    self.progress.notify_one();
                }
            }
            Err(Bad::Corrupt(_)) => t.corrupt += 1,
            Err(Bad::Foreign) => {
                if self.probe.check(payload).is_ok() {
                    self.probe_seen.store(true, Ordering::SeqCst);
                } else {
                    t.foreign += 1;
                }
            }
        }
    }

    fn error(&self, what: String) {
        let mut errors = self.errors.lock().unwrap();
        if errors.len() < 20 {
            errors.push(what);
        }
    }
}

/// A publisher and a subscriber on one broker.
pub struct LoadGen {
    rt: Arc<Runtime>,
    publisher: AsyncClient,
    subscriber: AsyncClient,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    topic: String,
}

fn options(prefix: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(
        format!("{prefix}-{:016x}", fastrand::u64(..)),
        "127.0.0.1",
        port,
    );
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    o.set_clean_session(true);
    o
}

fn nodelay(el: &mut EventLoop) {
    let mut n = el.network_options();
    n.set_tcp_nodelay(true);
    el.set_network_options(n);
}

impl LoadGen {
    /// Connects a subscriber on `sub_topic` (and waits for its SUBACK) and a publisher on `pub_topic`.
    pub fn connect(
        rt: &Arc<Runtime>,
        port: u16,
        pub_topic: &str,
        sub_topic: &str,
        gen: Gen,
    ) -> Result<LoadGen, String> {
        let shared = Arc::new(Shared {
            probe: gen.sibling(),
            gen,
            track: Mutex::new(Track {
                sent_at: Vec::new(),
                got: Vec::new(),
                received: 0,
                duplicates: 0,
                corrupt: 0,
                foreign: 0,
                phase_start: 0,
                phase_received: 0,
                last_receipt: None,
                latencies_ms: Vec::new(),
                window: Arc::new(Semaphore::new(0)),
            }),
            progress: Notify::new(),
            probe_seen: AtomicBool::new(false),
            subscribed: Notify::new(),
            connected: Notify::new(),
            errors: Mutex::new(Vec::new()),
        });
        let _guard = rt.enter();
        let (subscriber, mut sub_el) = AsyncClient::new(options("bench-sub", port), 64);
        nodelay(&mut sub_el);
        let (s, c, topic) = (shared.clone(), subscriber.clone(), sub_topic.to_string());
        let sub_task = rt.spawn(async move {
            loop {
                match sub_el.poll().await {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        let _ = c.try_subscribe(topic.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => s.subscribed.notify_one(),
                    Ok(Event::Incoming(Incoming::Publish(p))) => s.on_receive(&p.payload),
                    Ok(_) => {}
                    Err(e) => {
                        s.error(format!("subscriber: {e}"));
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        let mut popts = options("bench-pub", port);
        popts.set_inflight(1024);
        let (publisher, mut pub_el) = AsyncClient::new(popts, 16);
        nodelay(&mut pub_el);
        let s = shared.clone();
        let pub_task = rt.spawn(async move {
            loop {
                match pub_el.poll().await {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => s.connected.notify_one(),
                    Ok(_) => {}
                    Err(e) => {
                        s.error(format!("publisher: {e}"));
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        let gen = LoadGen {
            rt: rt.clone(),
            publisher,
            subscriber,
            shared: shared.clone(),
            tasks: vec![sub_task, pub_task],
            topic: pub_topic.to_string(),
        };
        let ready = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), async {
                shared.subscribed.notified().await;
                shared.connected.notified().await;
            })
            .await
        });
        match ready {
            Ok(()) => Ok(gen),
            Err(_) => Err(format!(
                "the load generator could not connect and subscribe within 10s: {:?}",
                shared.errors.lock().unwrap()
            )),
        }
    }

    /// Publishes a probe image every 100 ms until one comes back: the subject is subscribed and working.
    /// Probe images carry another nonce; they are not counted and the file check ignores them.
    pub fn probe(&self, timeout: Duration) -> bool {
        let start = Instant::now();
        let mut n = 0u64;
        self.rt.block_on(async {
            while !self.shared.probe_seen.load(Ordering::SeqCst) {
                if start.elapsed() > timeout {
                    return false;
                }
                let payload = Bytes::from(self.shared.probe.make(n));
                n += 1;
                if self
                    .publisher
                    .publish_bytes(self.topic.clone(), QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // Let the other probes in flight come back before measuring.
            tokio::time::sleep(Duration::from_millis(300)).await;
            true
        })
    }

    pub fn run(&self, phase: Phase) -> PhaseResult {
        self.rt.block_on(self.run_async(phase))
    }

    async fn run_async(&self, phase: Phase) -> PhaseResult {
        let window = Arc::new(Semaphore::new(phase.window));
        let mut seq = {
            let mut t = self.shared.track.lock().unwrap();
            t.phase_start = t.sent_at.len();
            t.phase_received = 0;
            t.latencies_ms.clear();
            t.window = window.clone();
            t.sent_at.len() as u64
        };
        let start = Instant::now();
        let mut sent = 0u64;
        let mut failure = None;
        loop {
            let more = match phase.stop {
                Stop::Count(n) => sent < n,
                Stop::After(d) => start.elapsed() < d,
            };
            if !more {
                break;
            }
            match tokio::time::timeout(phase.stall, window.acquire()).await {
                Ok(Ok(permit)) => permit.forget(),
                _ => {
                    failure = Some(format!(
                        "stalled: the window of {} stayed full for {:?}",
                        phase.window, phase.stall
                    ));
                    break;
                }
            }
            let payload = Bytes::from(self.shared.gen.make(seq));
            {
                let mut t = self.shared.track.lock().unwrap();
                t.sent_at.push(Instant::now());
                t.got.push(false);
            }
            if let Err(e) = self
                .publisher
                .publish_bytes(self.topic.clone(), QoS::AtLeastOnce, false, payload)
                .await
            {
                failure = Some(format!("publish failed: {e}"));
                break;
            }
            seq += 1;
            sent += 1;
        }
        // Drain: wait for this phase's images to come back while they keep coming.
        loop {
            let received = self.shared.track.lock().unwrap().phase_received;
            if received >= sent {
                break;
            }
            let waited = tokio::time::timeout(phase.stall, self.shared.progress.notified()).await;
            if waited.is_err() {
                break;
            }
        }
        let t = self.shared.track.lock().unwrap();
        let elapsed = t
            .last_receipt
            .filter(|&at| at > start)
            .map(|at| at - start)
            .unwrap_or_default();
        let mut latencies_ms = t.latencies_ms.clone();
        latencies_ms.sort_by(f64::total_cmp);
        PhaseResult {
            sent,
            received: t.phase_received,
            elapsed,
            latencies_ms,
            failure,
        }
    }

    /// Waits `d` for late duplicates, then says what the subscriber saw in all.
    pub fn totals(&self, settle: Duration) -> Totals {
        std::thread::sleep(settle);
        let t = self.shared.track.lock().unwrap();
        Totals {
            sent: t.sent_at.len() as u64,
            duplicates: t.duplicates,
            corrupt: t.corrupt,
            foreign: t.foreign,
            errors: self.shared.errors.lock().unwrap().clone(),
        }
    }

    /// Disconnects both clients; dropping the generator then stops their tasks.
    pub fn close(self) {
        let _ = self.publisher.try_disconnect();
        let _ = self.subscriber.try_disconnect();
        self.rt.block_on(async {
            tokio::time::sleep(Duration::from_millis(50)).await;
        });
    }
}

impl Drop for LoadGen {
    fn drop(&mut self) {
        // Their poll loops would otherwise keep reconnecting to a broker that is gone.
        for task in &self.tasks {
            task.abort();
        }
    }
}
