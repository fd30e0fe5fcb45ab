//! Load and faults for the fault-injection tests: a publisher that records which images the broker
//! acknowledged, a TCP proxy that cuts, black-holes or trickles a connection, and the ledger that turns what
//! was sent, acknowledged, stored and republished into lost, duplicated and partial counts.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use imaged::mqtt::PublishWindow;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, Outgoing};

use super::{hashes_in, sha, Hash};

/// Publishes `images` at QoS 1 with up to `window` in flight, reconnecting and publishing again whatever was
/// not acknowledged when a connection drops, until every image is acknowledged or `deadline` passes.
/// Returns, per image, whether the broker acknowledged it: the sender's view of "acknowledged".
pub fn publish_all(
    port: u16,
    topic: &str,
    images: &[Vec<u8>],
    window: usize,
    deadline: Duration,
) -> Vec<bool> {
    let topics = vec![topic.to_string(); images.len()];
    publish_each(port, &topics, images, window, deadline)
}

/// As [`publish_all`], with a topic for each image.
pub fn publish_each(
    port: u16,
    topics: &[String],
    images: &[Vec<u8>],
    window: usize,
    deadline: Duration,
) -> Vec<bool> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(publish(port, topics, images, window, deadline))
}

async fn publish(
    port: u16,
    topics: &[String],
    images: &[Vec<u8>],
    window: usize,
    deadline: Duration,
) -> Vec<bool> {
    let mut options = MqttOptions::new(format!("load-{}", fastrand::u64(..)), "127.0.0.1", port);
    options.set_max_packet_size(64 << 20, 64 << 20);
    options.set_keep_alive(Duration::from_secs(5));
    options.set_inflight(imaged::mqtt::packet_id_space(
        u16::try_from(window).unwrap_or(u16::MAX),
    ));
    let (client, eventloop) = AsyncClient::new(options, 64);
    let client = imaged::mqtt::Client::from(client);
    let mut events = imaged::mqtt::events(eventloop);
    let mut acked = vec![false; images.len()];
    let mut queue: VecDeque<usize> = (0..images.len()).collect();
    let mut inflight = PublishWindow::new(window);
    let mut connected = false;
    let start = Instant::now();
    let payloads: Vec<bytes::Bytes> = images
        .iter()
        .map(|i| bytes::Bytes::copy_from_slice(i))
        .collect();
    while (!queue.is_empty() || !inflight.is_empty()) && start.elapsed() < deadline {
        if connected {
            while let Some(i) = queue.pop_front() {
                let payload = payloads[i].clone();
                if let Err(i) = inflight.try_publish(
                    &client,
                    &topics[i],
                    false,
                    payload,
                    &Default::default(),
                    i,
                ) {
                    queue.push_front(i);
                    break;
                }
            }
        }
        let next = tokio::time::timeout(Duration::from_millis(200), events.next()).await;
        let Ok(Some((event, _))) = next else { continue };
        match event {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                connected = true;
                // Clean session: what was not acknowledged is gone; publish it again.
                for i in inflight.take_all().into_iter().rev() {
                    queue.push_front(i);
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                inflight.numbered(pkid);
            }
            Ok(Event::Incoming(Incoming::PubAck(ack))) => {
                if let Some(i) = inflight.acked(ack.pkid) {
                    acked[i] = true;
                }
            }
            Ok(_) => {}
            Err(_) => connected = false,
        }
    }
    acked
}

/// What a fault run adds up to, by content hash (every image sent is unique).
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    pub sent: usize,
    pub acked: usize,
    pub stored: usize,
    /// Acknowledged to the sender but not stored, or stored but never seen on the stored topic.
    pub lost: Vec<String>,
    /// Images stored in more than one file.
    pub duplicated: usize,
    /// Republishes the broker confirmed to imaged but never delivered to the observer: a broker killed with
    /// -9 between its PUBACK and its next database save loses them. The broker's loss, not imaged's.
    pub lost_by_broker: usize,
    /// Visible `.jpg` files that are not byte-identical to any image sent.
    pub partial: usize,
}

impl Ledger {
    /// `republished` is what the observer saw on the stored topic; `confirmed`, the republishes the broker
    /// acknowledged to imaged.
    pub fn count(
        images: &[Vec<u8>],
        acked: &[bool],
        storage: &Path,
        republished: &HashMap<Hash, usize>,
        confirmed: &HashSet<Hash>,
    ) -> Ledger {
        let stored = hashes_in(storage);
        let sent: HashSet<Hash> = images.iter().map(|i| sha(i)).collect();
        let mut ledger = Ledger {
            sent: images.len(),
            acked: acked.iter().filter(|a| **a).count(),
            stored: stored.values().sum(),
            ..Ledger::default()
        };
        for (i, image) in images.iter().enumerate() {
            let hash = sha(image);
            if acked[i] && !stored.contains_key(&hash) {
                ledger
                    .lost
                    .push(format!("image {i}: acknowledged, not stored"));
            } else if stored.contains_key(&hash) && !republished.contains_key(&hash) {
                if confirmed.contains(&hash) {
                    ledger.lost_by_broker += 1;
                } else {
                    ledger
                        .lost
                        .push(format!("image {i}: stored, never republished"));
                }
            }
        }
        ledger.duplicated = stored.values().filter(|&&n| n > 1).map(|n| n - 1).sum();
        ledger.partial = stored.keys().filter(|h| !sent.contains(*h)).count();
        ledger
    }

    pub fn assert_clean(&self, what: &str) {
        assert!(
            self.lost.is_empty() && self.duplicated == 0 && self.partial == 0,
            "{what}: lost {} {:?}, duplicated {}, partial {}",
            self.lost.len(),
            self.lost.iter().take(10).collect::<Vec<_>>(),
            self.duplicated,
            self.partial
        );
    }
}

/// How the proxy treats the bytes of its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    Pass = 0,
    /// Keep the connections open but forward nothing: a stalled network.
    BlackHole = 1,
    /// Forward a few bytes at a time, slowly.
    Trickle = 2,
    /// Forward what the broker sends, hold what the client sends: the client gets its messages, and its
    /// acks and publishes never arrive.
    ToClientOnly = 3,
}

/// A TCP proxy on a free loopback port in front of the broker, for network faults.
pub struct Proxy {
    pub port: u16,
    mode: Arc<AtomicU8>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let mode = Arc::new(AtomicU8::new(Mode::Pass as u8));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, c, s) = (mode.clone(), conns.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                            continue;
                        };
                        let _ = client.set_nonblocking(false);
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        c.lock()
                            .unwrap()
                            .extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                        pump(
                            client.try_clone().unwrap(),
                            server.try_clone().unwrap(),
                            m.clone(),
                            true,
                        );
                        pump(server, client, m.clone(), false);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy {
            port,
            mode,
            conns,
            stop,
        }
    }

    pub fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// Cuts every open connection (both sides see a reset or EOF).
    pub fn cut(&self) {
        for conn in self.conns.lock().unwrap().drain(..) {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, mode: Arc<AtomicU8>, to_broker: bool) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let held = || {
            let m = mode.load(Ordering::SeqCst);
            m == Mode::BlackHole as u8 || (to_broker && m == Mode::ToClientOnly as u8)
        };
        loop {
            while held() {
                std::thread::sleep(Duration::from_millis(10));
            }
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                while held() {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let chunk = if mode.load(Ordering::SeqCst) == Mode::Trickle as u8 {
                    std::thread::sleep(Duration::from_millis(20));
                    rest.len().min(64)
                } else {
                    rest.len()
                };
                if to.write_all(&rest[..chunk]).is_err() {
                    let _ = from.shutdown(Shutdown::Both);
                    return;
                }
                rest = &rest[chunk..];
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    });
}
