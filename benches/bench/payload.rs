//! JPEG-shaped payloads (FF D8 FF … FF D9), unique per image and random in content, that can be checked
//! byte for byte against what was sent without keeping a copy of each one.
//!
//! Layout: `FF D8 FF E0`, the run's 8-byte nonce, the image's 8-byte sequence number, `size - 22` bytes taken
//! from a random pool at an offset derived from the sequence number, `FF D9`. The nonce and sequence number
//! make every image of every run unique (so imaged's deduplication never merges two), and the pool makes the
//! content random without generating megabytes of random bytes per image while imaged is being measured.

use std::sync::Arc;

pub const HEADER: usize = 4 + 8 + 8;
pub const TRAILER: [u8; 2] = [0xFF, 0xD9];
const START: [u8; 4] = [0xFF, 0xD8, 0xFF, 0xE0];

/// Generates and checks the payloads of one run.
#[derive(Clone)]
pub struct Gen {
    pool: Arc<Vec<u8>>,
    nonce: u64,
    size: usize,
}

/// What is wrong with a received payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    /// Not one of this run's payloads (another nonce, or too short to tell).
    Foreign,
    /// This run's header, but the length or content differs from what was sent.
    Corrupt(u64),
}

impl Gen {
    pub fn new(size: usize) -> Gen {
        assert!(
            size >= HEADER + TRAILER.len() + 16,
            "payloads of {size} bytes are too small"
        );
        let mut pool = vec![0u8; size + (1 << 16)];
        fastrand::Rng::new().fill(&mut pool);
        Gen {
            pool: Arc::new(pool),
            nonce: fastrand::u64(..),
            size,
        }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// The same pool and size with another nonce: payloads no check of this one accepts.
    pub fn sibling(&self) -> Gen {
        Gen {
            nonce: self.nonce ^ fastrand::u64(1..),
            ..self.clone()
        }
    }

    fn body_len(&self) -> usize {
        self.size - HEADER - TRAILER.len()
    }

    fn body(&self, seq: u64) -> &[u8] {
        let room = (self.pool.len() - self.body_len() + 1) as u64;
        let at = usize::try_from(mix(seq ^ self.nonce) % room).expect("below the pool's length");
        &self.pool[at..at + self.body_len()]
    }

    fn header(&self, seq: u64) -> [u8; HEADER] {
        let mut h = [0u8; HEADER];
        h[..4].copy_from_slice(&START);
        h[4..12].copy_from_slice(&self.nonce.to_be_bytes());
        h[12..].copy_from_slice(&seq.to_be_bytes());
        h
    }

    /// The payload of image `seq`.
    pub fn make(&self, seq: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.size);
        out.extend_from_slice(&self.header(seq));
        out.extend_from_slice(self.body(seq));
        out.extend_from_slice(&TRAILER);
        out
    }

    /// Writes image `seq` into a buffer that already holds image `other` of this generator with the same
    /// body: only the header changes (used by the disk floor, whose content need not be random per image).
    pub fn stamp(&self, buf: &mut [u8], seq: u64) {
        buf[..HEADER].copy_from_slice(&self.header(seq));
    }

    /// The sequence number of a payload that is exactly what was sent for it.
    pub fn check(&self, payload: &[u8]) -> Result<u64, Bad> {
        if payload.len() < HEADER
            || payload[..4] != START
            || payload[4..12] != self.nonce.to_be_bytes()
        {
            return Err(Bad::Foreign);
        }
        let seq = u64::from_be_bytes(payload[12..HEADER].try_into().expect("8 bytes"));
        let ok = payload.len() == self.size
            && payload[HEADER..self.size - TRAILER.len()] == *self.body(seq)
            && payload[self.size - TRAILER.len()..] == TRAILER;
        if ok {
            Ok(seq)
        } else {
            Err(Bad::Corrupt(seq))
        }
    }
}

/// splitmix64: spreads sequence numbers over the pool.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}
