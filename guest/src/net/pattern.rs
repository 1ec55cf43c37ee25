//! Predictable stream content, its checker, and the stream checksum.
//!
//! Byte `i` of a stream under seed `s` is byte `i % 8` (little-endian) of
//! the 64-bit word `splitmix64(s ^ (i / 8) * K)`: a pure function of the
//! position, so a receiver checks every byte as it arrives, and bytes
//! that are lost, repeated or swapped inside the stream fail at the first
//! offset where what came is not what belongs there.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::pattern::SplitMix64;

/// Spreads word indices over the seed space (an odd constant: `w * K` is a
/// bijection on u64, so no two words of one stream share a generator seed).
const WORD_SPREAD: u64 = 0xd6e8_feb8_6659_fd93;

/// How far around the expected offset [`StreamVerifier`] looks for where
/// mismatching data really belongs.
const LOCATE_RADIUS: u64 = 256 * 1024;
/// Bytes that must match for a located position to count.
const LOCATE_WINDOW: usize = 16;

/// The content of a seeded byte stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamPattern {
    seed: u64,
}

impl StreamPattern {
    /// The stream of `seed`.
    pub fn new(seed: u64) -> Self {
        StreamPattern { seed }
    }

    fn word(&self, index: u64) -> [u8; 8] {
        SplitMix64::new(self.seed ^ index.wrapping_mul(WORD_SPREAD))
            .next_u64()
            .to_le_bytes()
    }

    /// Byte `offset` of the stream.
    pub fn byte_at(&self, offset: u64) -> u8 {
        self.word(offset / 8)[(offset % 8) as usize]
    }

    /// Fills `buf` with the stream from `offset` on.
    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        let mut at = offset;
        let mut rest = buf;
        while !rest.is_empty() {
            let word = self.word(at / 8);
            let from = (at % 8) as usize;
            let n = (8 - from).min(rest.len());
            let (head, tail) = rest.split_at_mut(n);
            head.copy_from_slice(&word[from..from + n]);
            rest = tail;
            at += n as u64;
        }
    }

    /// The first index of `data` that does not hold the stream from
    /// `offset` on.
    pub fn first_difference(&self, offset: u64, data: &[u8]) -> Option<usize> {
        let mut want = [0u8; 256];
        let mut done = 0;
        while done < data.len() {
            let n = (data.len() - done).min(want.len());
            self.fill(offset + done as u64, &mut want[..n]);
            if let Some(i) = data[done..done + n]
                .iter()
                .zip(&want[..n])
                .position(|(a, b)| a != b)
            {
                return Some(done + i);
            }
            done += n;
        }
        None
    }
}

/// CRC-32 (IEEE 802.3, reflected, as zlib's `crc32`), incremental.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Crc32 {
    /// The inverted running register (0 before any byte).
    state: u32,
}

const CRC32_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut bit = 0;
        while bit < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            bit += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

impl Crc32 {
    /// A checksum of nothing.
    pub fn new() -> Self {
        Crc32::default()
    }

    /// Adds `data` to the checksum.
    pub fn update(&mut self, data: &[u8]) {
        let mut c = !self.state;
        for &b in data {
            c = CRC32_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
        }
        self.state = !c;
    }

    /// The checksum of everything added so far.
    pub fn value(&self) -> u32 {
        self.state
    }
}

/// The first byte of a stream that did not hold the pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamMismatch {
    /// Stream offset of the first wrong byte.
    pub offset: u64,
    /// What belonged there.
    pub expected: u8,
    /// What came.
    pub found: u8,
    /// The stream offset the data arriving at `offset` belongs to, when it
    /// matches the pattern somewhere near: later means bytes were lost (or
    /// reordered), earlier means bytes came twice. `None`: corrupt bytes.
    pub belongs_at: Option<u64>,
}

impl StreamMismatch {
    /// A short guess at the failure class, for humans reading a report.
    pub fn diagnosis(&self) -> String {
        match self.belongs_at {
            None => "corrupted data (matches the stream nowhere near)".to_string(),
            Some(at) if at > self.offset => format!(
                "{} bytes missing (data from offset {at} arrived at {})",
                at - self.offset,
                self.offset
            ),
            Some(at) => format!(
                "{} bytes repeated (data from offset {at} arrived again at {})",
                self.offset - at,
                self.offset
            ),
        }
    }
}

impl fmt::Display for StreamMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stream offset {}: expected {:#04x}, found {:#04x} — {}",
            self.offset,
            self.expected,
            self.found,
            self.diagnosis()
        )
    }
}

/// Checks a stream as it arrives, chunk by chunk, keeping its length, its
/// CRC-32 and its first mismatch.
#[derive(Clone, Debug)]
pub struct StreamVerifier {
    pattern: StreamPattern,
    offset: u64,
    crc: Crc32,
    first_mismatch: Option<StreamMismatch>,
    mismatched_bytes: u64,
}

impl StreamVerifier {
    /// A checker for the stream of `seed`, from offset 0.
    pub fn new(seed: u64) -> Self {
        StreamVerifier {
            pattern: StreamPattern::new(seed),
            offset: 0,
            crc: Crc32::new(),
            first_mismatch: None,
            mismatched_bytes: 0,
        }
    }

    /// Checks the next `data` of the stream.
    pub fn feed(&mut self, data: &[u8]) {
        self.crc.update(data);
        let start = self.offset;
        self.offset += data.len() as u64;
        if self.first_mismatch.is_some() {
            // Past the first mismatch the stream is out of step; count what
            // still differs, for the report.
            self.mismatched_bytes += self.count_differences(start, data);
            return;
        }
        let Some(i) = self.pattern.first_difference(start, data) else {
            return;
        };
        let offset = start + i as u64;
        let rest = &data[i..];
        self.first_mismatch = Some(StreamMismatch {
            offset,
            expected: self.pattern.byte_at(offset),
            found: data[i],
            belongs_at: self.locate(offset, rest),
        });
        self.mismatched_bytes += self.count_differences(offset, rest);
    }

    fn count_differences(&self, offset: u64, data: &[u8]) -> u64 {
        data.iter()
            .zip(offset..)
            .filter(|&(&b, at)| b != self.pattern.byte_at(at))
            .count() as u64
    }

    /// Where `data` (arriving at `offset`) belongs in the stream, searching
    /// [`LOCATE_RADIUS`] bytes either way; needs [`LOCATE_WINDOW`] bytes.
    fn locate(&self, offset: u64, data: &[u8]) -> Option<u64> {
        let window = data.get(..LOCATE_WINDOW)?;
        let lo = offset.saturating_sub(LOCATE_RADIUS);
        let hi = offset.saturating_add(LOCATE_RADIUS);
        // Nearest candidates first, so the smallest shift wins.
        (1..=hi - offset)
            .flat_map(|d| [offset.checked_add(d), offset.checked_sub(d)])
            .flatten()
            .filter(|&at| at >= lo)
            .find(|&at| {
                self.pattern.byte_at(at) == window[0]
                    && self.pattern.first_difference(at, window).is_none()
            })
    }

    /// Bytes checked so far.
    pub fn bytes(&self) -> u64 {
        self.offset
    }

    /// CRC-32 of the bytes checked so far.
    pub fn checksum(&self) -> u32 {
        self.crc.value()
    }

    /// The first wrong byte, if any.
    pub fn first_mismatch(&self) -> Option<StreamMismatch> {
        self.first_mismatch
    }

    /// How many bytes differed from the pattern at their offset.
    pub fn mismatched_bytes(&self) -> u64 {
        self.mismatched_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stream(seed: u64, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        StreamPattern::new(seed).fill(offset, &mut buf);
        buf
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        let mut crc = Crc32::new();
        crc.update(b"1234");
        crc.update(b"56789");
        assert_eq!(crc.value(), 0xcbf4_3926);
        assert_eq!(Crc32::new().value(), 0);
    }

    #[test]
    fn fill_agrees_with_byte_at_at_any_alignment() {
        let p = StreamPattern::new(9);
        for offset in 0..17u64 {
            let buf = stream(9, offset, 37);
            for (i, &b) in buf.iter().enumerate() {
                assert_eq!(b, p.byte_at(offset + i as u64), "offset {offset} + {i}");
            }
        }
        assert_ne!(stream(9, 0, 64), stream(10, 0, 64));
    }

    #[test]
    fn a_whole_stream_in_odd_chunks_verifies() {
        let data = stream(3, 0, 100_000);
        let mut v = StreamVerifier::new(3);
        for chunk in data.chunks(997) {
            v.feed(chunk);
        }
        assert_eq!(v.bytes(), 100_000);
        assert_eq!(v.first_mismatch(), None);
        let mut crc = Crc32::new();
        crc.update(&data);
        assert_eq!(v.checksum(), crc.value());
    }

    #[test]
    fn lost_bytes_are_located() {
        let data = stream(5, 0, 10_000);
        let mut v = StreamVerifier::new(5);
        v.feed(&data[..4000]);
        v.feed(&data[5460..]);
        let m = v.first_mismatch().expect("a gap");
        assert_eq!(m.offset, 4000);
        assert_eq!(m.belongs_at, Some(5460));
        assert!(m.diagnosis().contains("1460 bytes missing"), "{m}");
    }

    #[test]
    fn repeated_bytes_are_located() {
        let data = stream(5, 0, 10_000);
        let mut v = StreamVerifier::new(5);
        v.feed(&data[..3000]);
        v.feed(&data[2000..]);
        let m = v.first_mismatch().expect("a repeat");
        assert_eq!((m.offset, m.belongs_at), (3000, Some(2000)));
        assert!(m.diagnosis().contains("1000 bytes repeated"), "{m}");
    }

    #[test]
    fn a_corrupt_byte_is_reported_at_its_offset() {
        let mut data = stream(5, 0, 10_000);
        data[7777] ^= 0x40;
        let mut v = StreamVerifier::new(5);
        data.chunks(1000).for_each(|c| v.feed(c));
        let m = v.first_mismatch().expect("corruption");
        assert_eq!(m.offset, 7777);
        assert_eq!(m.found, m.expected ^ 0x40);
        assert_eq!(m.belongs_at, None);
        assert_eq!(v.mismatched_bytes(), 1);
        assert!(m.to_string().contains("corrupted"), "{m}");
    }

    proptest! {
        #[test]
        fn any_swap_of_two_chunks_is_caught_at_the_first(
            a in 0usize..5000, len in 1usize..500, gap in 1usize..500,
        ) {
            let data = stream(11, 0, 6000);
            let b = a + len + gap;
            prop_assume!(b + len <= data.len());
            let mut swapped = data.clone();
            swapped[a..a + len].copy_from_slice(&data[b..b + len]);
            swapped[b..b + len].copy_from_slice(&data[a..a + len]);
            let mut v = StreamVerifier::new(11);
            v.feed(&swapped);
            let m = v.first_mismatch().expect("reordering caught");
            // The chunks may share a prefix by chance; never past a + len.
            prop_assert!(m.offset >= a as u64 && m.offset < (a + len) as u64);
        }
    }
}
