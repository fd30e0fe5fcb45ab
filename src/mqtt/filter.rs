//! The framing filter on what an MQTT 3.1.1 broker sends: every packet passes through, except a PUBLISH over
//! the packet limit, whose payload is dropped as it streams in. rumqttc gets the publish with its topic, QoS
//! and packet id and a small marker for a payload ([`cut_size`] reads it), so the session refuses it and
//! acknowledges it, and the broker does not deliver it again, while memory holds only the filter's buffer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// What a cut payload is replaced by: this, then the payload's size as 8 bytes, big-endian. A camera cannot
/// harm anything by sending it: such a payload is refused as oversized, as a JPEG never starts like this.
pub(super) const MARKER: &[u8] =
    b"\0imaged: payload over the packet limit, dropped unread; bytes: ";

/// The size of the payload a marker stands for, when `payload` is one.
pub fn cut_size(payload: &[u8]) -> Option<usize> {
    let size = payload.strip_prefix(MARKER)?;
    let size: [u8; 8] = size.try_into().ok()?;
    usize::try_from(u64::from_be_bytes(size)).ok()
}

const SCRATCH: usize = 64 * 1024;
/// A packet body over this is worth a splice of its own; a read of the next header takes this much.
const SMALL: usize = 16 * 1024;
const HEADER_READ: usize = 16;

enum State {
    /// Reading a fixed header: its bytes so far.
    Header(Vec<u8>),
    /// Passing this many more bytes of a packet's body.
    Pass(usize),
    /// Collecting the topic and packet id of a publish over the limit: first byte, remaining length, the
    /// variable header so far.
    Cut(u8, usize, Vec<u8>),
    /// Dropping this many more bytes of a cut payload.
    Drop(usize),
}

pub struct Filter<S> {
    inner: S,
    /// Packets whose remaining length is over this are cut.
    limit: usize,
    state: State,
    /// Bytes read from `inner`, from `at` on not yet looked at.
    scratch: Box<[u8]>,
    filled: usize,
    at: usize,
    /// Bytes made by the filter, to hand out before anything else.
    made: Vec<u8>,
    made_at: usize,
    /// The reader splices bodies past the filter ([`Filter::passing`]): after a large packet, read only
    /// the next header's first bytes, so that its body too is left in the socket for the splice.
    splicing: bool,
    /// The last header read was of a packet over [`SMALL`].
    large: bool,
}

impl<S> Filter<S> {
    pub fn new(inner: S, limit: usize) -> Filter<S> {
        Filter {
            inner,
            limit,
            state: State::Header(Vec::with_capacity(5)),
            scratch: vec![0; SCRATCH].into_boxed_slice(),
            filled: 0,
            at: 0,
            made: Vec::new(),
            made_at: 0,
            splicing: false,
            large: false,
        }
    }

    /// For a reader that moves bodies itself while [`Filter::passing`] says it may.
    pub fn splicing(mut self) -> Filter<S> {
        self.splicing = true;
        self
    }

    /// How much of a packet's body may go by without the filter looking at it: nothing of it is buffered
    /// here, and what the filter made is handed out.
    pub fn passing(&self) -> Option<usize> {
        match self.state {
            State::Pass(left) if self.at == self.filled && self.made_at == self.made.len() => {
                Some(left)
            }
            _ => None,
        }
    }

    /// `n` bytes of the body being passed went by, here or past the filter ([`Filter::passing`]).
    pub fn passed(&mut self, n: usize) {
        if let State::Pass(left) = &mut self.state {
            *left -= n;
            if *left == 0 {
                self.state = State::Header(Vec::with_capacity(5));
            }
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Looks at the bytes read and not yet looked at, as far as the state takes them; what rumqttc is to get
    /// goes into `made`, or straight into `out` while a body passes.
    fn advance(&mut self, out: &mut ReadBuf<'_>) {
        let input = &self.scratch[self.at..self.filled];
        match &mut self.state {
            State::Header(header) => {
                let mut used = 0;
                let mut done = None;
                for &byte in input {
                    used += 1;
                    header.push(byte);
                    if header.len() >= 2 {
                        if byte & 0x80 == 0 {
                            done = Some(remaining_length(&header[1..]));
                            break;
                        }
                        if header.len() == 5 {
                            // Not MQTT: let rumqttc see the bytes and fail on them.
                            done = Some(usize::MAX);
                            break;
                        }
                    }
                }
                self.at += used;
                if let Some(remaining) = done {
                    self.large = remaining > SMALL;
                    let header = std::mem::take(header);
                    if header[0] >> 4 == 3 && remaining > self.limit && remaining != usize::MAX {
                        self.state = State::Cut(header[0], remaining, Vec::new());
                    } else {
                        self.made.extend_from_slice(&header);
                        self.state = match remaining {
                            0 => State::Header(Vec::with_capacity(5)),
                            n => State::Pass(n),
                        };
                    }
                }
            }
            State::Pass(left) => {
                let n = input.len().min(*left).min(out.remaining());
                out.put_slice(&input[..n]);
                self.at += n;
                *left -= n;
                if *left == 0 {
                    self.state = State::Header(Vec::with_capacity(5));
                }
            }
            State::Cut(first, remaining, head) => {
                let mut used = 0;
                while used < input.len() && head.len() < head_len(*first, head) {
                    head.push(input[used]);
                    used += 1;
                }
                self.at += used;
                if head.len() >= head_len(*first, head) {
                    let payload = remaining.saturating_sub(head.len());
                    self.made = marker_publish(*first, head, payload);
                    self.made_at = 0;
                    self.state = State::Drop(payload);
                }
            }
            State::Drop(left) => {
                let n = input.len().min(*left);
                self.at += n;
                *left -= n;
                if *left == 0 {
                    self.state = State::Header(Vec::with_capacity(5));
                }
            }
        }
    }
}

/// How long the topic and packet id of a publish are, as far as `head` tells yet.
fn head_len(first: u8, head: &[u8]) -> usize {
    if head.len() < 2 {
        return 2;
    }
    let packet_id = if (first >> 1) & 3 != 0 { 2 } else { 0 };
    2 + usize::from(u16::from_be_bytes([head[0], head[1]])) + packet_id
}

/// A remaining length from its 1 to 4 bytes.
fn remaining_length(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .rev()
        .fold(0usize, |n, b| (n << 7) | usize::from(b & 0x7F))
}

/// The PUBLISH rumqttc gets instead of one cut: the same first byte, topic and packet id, and the marker.
fn marker_publish(first: u8, head: &[u8], payload: usize) -> Vec<u8> {
    let mut body = head.to_vec();
    body.extend_from_slice(MARKER);
    body.extend_from_slice(&u64::try_from(payload).unwrap_or(u64::MAX).to_be_bytes());
    packet(first, &body)
}

/// A packet of `body` with the first byte `first`.
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut packet = vec![first];
    let mut len = body.len();
    loop {
        let byte = u8::try_from(len & 0x7F).expect("seven bits");
        len >>= 7;
        if len == 0 {
            packet.push(byte);
            break;
        }
        packet.push(byte | 0x80);
    }
    packet.extend_from_slice(body);
    packet
}

impl<S: AsyncRead + Unpin> AsyncRead for Filter<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.made_at < this.made.len() {
                let n = (this.made.len() - this.made_at).min(out.remaining());
                out.put_slice(&this.made[this.made_at..this.made_at + n]);
                this.made_at += n;
                if this.made_at == this.made.len() {
                    this.made.clear();
                    this.made_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.at < this.filled {
                let before = out.filled().len();
                this.advance(out);
                if out.filled().len() > before {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            if let State::Pass(left) = this.state {
                // A body with nothing buffered goes straight into `out`: one copy less of every image.
                let room = out.initialize_unfilled_to(out.remaining().min(left));
                let mut read = ReadBuf::new(room);
                return match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) => {
                        let n = read.filled().len();
                        out.advance(n);
                        this.passed(n);
                        Poll::Ready(Ok(()))
                    }
                    other => other,
                };
            }
            let ahead = if this.splicing && this.large && matches!(this.state, State::Header(_)) {
                HEADER_READ
            } else {
                SCRATCH
            };
            let mut read = ReadBuf::new(&mut this.scratch[..ahead]);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    this.filled = n;
                    this.at = 0;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A PUBLISH packet; a QoS 0 one has no packet id.
    pub(in crate::mqtt) fn publish(qos: u8, topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
        let mut body = u16::try_from(topic.len()).unwrap().to_be_bytes().to_vec();
        body.extend_from_slice(topic.as_bytes());
        if qos > 0 {
            body.extend_from_slice(&pkid.to_be_bytes());
        }
        body.extend_from_slice(payload);
        packet(0x30 | (qos << 1), &body)
    }

    /// What comes out of a filter with `limit` when `input` goes in, in writes of `chunk` bytes.
    async fn through(input: Vec<u8>, limit: usize, chunk: usize) -> Vec<u8> {
        let (mut broker, client) = tokio::io::duplex(4096);
        let mut filter = Filter::new(client, limit);
        let writer = tokio::spawn(async move {
            for part in input.chunks(chunk) {
                broker.write_all(part).await.unwrap();
            }
        });
        let mut out = Vec::new();
        let mut buf = vec![0u8; 777];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(5), filter.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        writer.await.unwrap();
        out
    }

    #[tokio::test]
    async fn packets_within_the_limit_pass_unchanged_however_they_are_split() {
        let mut input = vec![0x20, 2, 0, 0, 0xD0, 0];
        input.extend(publish(1, "image/upload", 7, &vec![0xAB; 5000]));
        input.extend(publish(0, "t", 0, b""));
        for chunk in [1, 3, 4096] {
            assert_eq!(
                through(input.clone(), 10_000, chunk).await,
                input,
                "{chunk}"
            );
        }
    }

    #[tokio::test]
    async fn a_publish_over_the_limit_keeps_topic_qos_and_packet_id_and_its_payload_becomes_a_marker(
    ) {
        let big = vec![0xFF; 300_000];
        let mut input = publish(1, "cams/a", 9, &big);
        let after = publish(1, "cams/b", 10, &[1, 2, 3]);
        input.extend(&after);
        for chunk in [1000, 65536] {
            let out = through(input.clone(), 1000, chunk).await;
            let mut marker = MARKER.to_vec();
            marker.extend_from_slice(&(300_000u64).to_be_bytes());
            let mut expected = publish(1, "cams/a", 9, &marker);
            expected.extend(&after);
            assert_eq!(out, expected);
            assert_eq!(cut_size(&marker), Some(300_000));
        }
    }

    #[test]
    fn an_ordinary_payload_is_no_marker() {
        assert_eq!(cut_size(&[0xFF, 0xD8, 0xFF, 0xD9]), None);
        assert_eq!(cut_size(MARKER), None);
    }
}
