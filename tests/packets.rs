//! The real imaged against a scripted broker: a few lines of MQTT 3.1.1 over a socket, for packet sequences no
//! real broker can be made to send on cue.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;

/// One MQTT connection as the broker sees it.
struct Peer(TcpStream);

/// A control packet: the first byte of its fixed header and its body.
struct Packet {
    header: u8,
    body: Vec<u8>,
}

impl Packet {
    fn kind(&self) -> u8 {
        self.header >> 4
    }

    /// The two-byte number at `at` of the body.
    fn word(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.body[at], self.body[at + 1]])
    }

    /// The packet id, for the packets that start with one (PUBACK, SUBSCRIBE, …).
    fn pkid(&self) -> u16 {
        self.word(0)
    }

    /// The packet id of a QoS 1 PUBLISH: after the topic.
    fn publish_pkid(&self) -> u16 {
        self.word(2 + usize::from(self.word(0)))
    }
}

const CONNECT: u8 = 1;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const SUBSCRIBE: u8 = 8;
const PINGREQ: u8 = 12;

fn packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![header];
    let mut len = body.len();
    loop {
        let byte = u8::try_from(len % 128).unwrap();
        len /= 128;
        out.push(if len > 0 { byte | 0x80 } else { byte });
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn connack() -> Vec<u8> {
    packet(0x20, &[0, 0])
}

/// The SUBACK for a SUBSCRIBE, granting QoS 1.
fn suback(subscribe: &Packet) -> Vec<u8> {
    let mut body = subscribe.pkid().to_be_bytes().to_vec();
    body.push(1);
    packet(0x90, &body)
}

fn publish_qos1(topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = u16::try_from(topic.len()).unwrap().to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&pkid.to_be_bytes());
    body.extend_from_slice(payload);
    packet(0x32, &body)
}

impl Peer {
    fn accept(listener: &TcpListener) -> Peer {
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut peer = Peer(stream);
        let connect = peer.read(Duration::from_secs(10)).expect("a CONNECT");
        assert_eq!(connect.kind(), CONNECT);
        peer
    }

    /// The next packet within `timeout`, or None (also at EOF).
    fn read(&mut self, timeout: Duration) -> Option<Packet> {
        let start = Instant::now();
        let mut header = [0u8; 1];
        loop {
            match self.0.read(&mut header) {
                Ok(0) => return None,
                Ok(_) => break,
                Err(_) if start.elapsed() < timeout => {}
                Err(_) => return None,
            }
        }
        // Once a packet has begun, the rest follows at once.
        self.0.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let (mut len, mut shift) = (0usize, 0);
        loop {
            let mut byte = [0u8; 1];
            self.0.read_exact(&mut byte).ok()?;
            len |= usize::from(byte[0] & 0x7F) << shift;
            shift += 7;
            if byte[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0; len];
        self.0.read_exact(&mut body).ok()?;
        self.0
            .set_read_timeout(Some(Duration::from_millis(200)))
            .ok();
        Some(Packet {
            header: header[0],
            body,
        })
    }

    /// Reads until a SUBSCRIBE and returns the SUBACK for it (granted QoS 1).
    fn suback_for_subscribe(&mut self) -> Vec<u8> {
        loop {
            let p = self
                .read(Duration::from_secs(10))
                .expect("imaged subscribes");
            if p.kind() == SUBSCRIBE {
                return suback(&p);
            }
        }
    }

    /// Answers like a broker (SUBACK, PINGRESP, PUBACK for QoS 1) for `how_long`; returns every packet read.
    fn serve(&mut self, how_long: Duration) -> Vec<Packet> {
        let start = Instant::now();
        let mut seen = Vec::new();
        while start.elapsed() < how_long {
            let Some(p) = self.read(Duration::from_millis(200)) else {
                continue;
            };
            let answer = match p.kind() {
                SUBSCRIBE => suback(&p),
                PINGREQ => packet(0xD0, &[]),
                PUBLISH if (p.header >> 1) & 3 == 1 => {
                    packet(0x40, &p.publish_pkid().to_be_bytes())
                }
                _ => Vec::new(),
            };
            self.0.write_all(&answer).unwrap();
            seen.push(p);
        }
        seen
    }
}

#[test]
fn an_upload_read_just_before_a_connection_died_is_not_acknowledged_on_the_next_one() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut daemon = Daemon::start_with(port, "", &[]);
    let image = jpeg(7, 200);

    // Connection 1: a new session, the subscription, then an upload with id 7 and the end of the connection,
    // in one write: rumqttc parses the upload and meets the end in the same read.
    let mut first = Peer::accept(&listener);
    first.0.write_all(&connack()).unwrap();
    let mut burst = first.suback_for_subscribe();
    burst.extend(publish_qos1("image/upload", 7, &image));
    first.0.write_all(&burst).unwrap();
    first.0.shutdown(std::net::Shutdown::Both).unwrap();
    drop(first);

    // Connection 2: a new session again, so id 7 may name any other message of the broker's.
    let mut second = Peer::accept(&listener);
    second.0.write_all(&connack()).unwrap();
    let seen = second.serve(Duration::from_secs(3));
    daemon.wait_stored(1, Duration::from_secs(10));
    let seen: Vec<Packet> = seen
        .into_iter()
        .chain(second.serve(Duration::from_secs(1)))
        .collect();

    let acks: Vec<u16> = seen
        .iter()
        .filter(|p| p.kind() == PUBACK)
        .map(Packet::pkid)
        .collect();
    assert!(
        !acks.contains(&7),
        "PUBACK 7 of the first connection's upload went out on the second one (acks: {acks:?}); log:\n{}",
        daemon.log()
    );
    assert_eq!(
        daemon.stored().values().next(),
        Some(&image),
        "the upload is stored all the same"
    );
    assert!(daemon.try_wait().is_none(), "imaged is still running");
}
