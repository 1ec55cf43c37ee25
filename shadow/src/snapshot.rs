//! A copy of the log taken out of shared memory, for the recovery planner.
//!
//! Recovery reads the log once, into a [`LogSnapshot`], and plans on that
//! copy: the planner is pure code, testable without shared memory, and
//! nothing it looks at can change under it.

use crate::layout::{self, entry, header, EntryState, ENTRY_SIZE, HEADER_SIZE, MAX_ENTRIES};
use crate::layout::{REQUEST_SIZE, RESPONSE_SIZE};
use crate::ShadowError;

/// The header fields, as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogHeader {
    pub magic: u64,
    pub version: u32,
    pub entry_count: u32,
    pub entry_size: u32,
    pub generation: u64,
    pub req_cons: u32,
    pub rsp_prod_pvt: u32,
    pub heartbeat: u64,
    pub stalled_instances: u32,
    pub next_seq: u64,
    /// The log accounts for every request in flight on its ring
    /// ([`ShadowLog::mark_complete`](crate::ShadowLog::mark_complete)).
    pub complete: bool,
}

impl LogHeader {
    /// A valid header for a fresh log of `entry_count` entries.
    pub fn new(entry_count: u32) -> Self {
        LogHeader {
            magic: layout::MAGIC,
            version: layout::VERSION,
            entry_count,
            entry_size: ENTRY_SIZE,
            ..Default::default()
        }
    }

    /// Checks the constant fields: magic, version, entry size, and an entry
    /// count that is a power of two no larger than [`MAX_ENTRIES`].
    pub fn validate(&self) -> Result<(), ShadowError> {
        if self.magic != layout::MAGIC {
            return Err(ShadowError::BadMagic(self.magic));
        }
        if self.version != layout::VERSION {
            return Err(ShadowError::BadVersion(self.version));
        }
        if self.entry_size != ENTRY_SIZE {
            return Err(ShadowError::BadEntrySize(self.entry_size));
        }
        validate_entry_count(self.entry_count)
    }

    /// Decodes the first [`HEADER_SIZE`] bytes of `bytes` (no validation).
    pub(crate) fn parse(bytes: &[u8]) -> Option<Self> {
        let b = bytes.get(..HEADER_SIZE as usize)?;
        Some(LogHeader {
            magic: u64_at(b, header::MAGIC),
            version: u32_at(b, header::VERSION),
            entry_count: u32_at(b, header::ENTRY_COUNT),
            entry_size: u32_at(b, header::ENTRY_SIZE),
            generation: u64_at(b, header::GENERATION),
            req_cons: u32_at(b, header::REQ_CONS),
            rsp_prod_pvt: u32_at(b, header::RSP_PROD_PVT),
            heartbeat: u64_at(b, header::HEARTBEAT),
            stalled_instances: u32_at(b, header::STALLED_INSTANCES),
            next_seq: u64_at(b, header::NEXT_SEQ),
            complete: u32_at(b, header::COMPLETE) == 1,
        })
    }
}

pub(crate) fn validate_entry_count(count: u32) -> Result<(), ShadowError> {
    if count == 0 || !count.is_power_of_two() || count > MAX_ENTRIES {
        return Err(ShadowError::BadEntryCount(count));
    }
    Ok(())
}

/// One entry, as read. `state` is the raw word, so a corrupt value is
/// representable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntrySnapshot {
    pub state: u32,
    pub ring_idx: u32,
    pub seq: u64,
    pub progress: u32,
    pub rsp_idx: u32,
    pub replays: u32,
    pub request: [u8; REQUEST_SIZE],
    pub response: [u8; RESPONSE_SIZE],
}

impl Default for EntrySnapshot {
    fn default() -> Self {
        EntrySnapshot {
            state: EntryState::Free.word(),
            ring_idx: 0,
            seq: 0,
            progress: 0,
            rsp_idx: 0,
            replays: 0,
            request: [0; REQUEST_SIZE],
            response: [0; RESPONSE_SIZE],
        }
    }
}

impl EntrySnapshot {
    /// The decoded state, `None` for a corrupt word.
    pub fn state(&self) -> Option<EntryState> {
        EntryState::from_word(self.state)
    }

    fn parse(b: &[u8]) -> Self {
        let mut request = [0; REQUEST_SIZE];
        let mut response = [0; RESPONSE_SIZE];
        let req = entry::REQUEST as usize;
        let rsp = entry::RESPONSE as usize;
        request.copy_from_slice(&b[req..req + REQUEST_SIZE]);
        response.copy_from_slice(&b[rsp..rsp + RESPONSE_SIZE]);
        EntrySnapshot {
            state: u32_at(b, entry::STATE),
            ring_idx: u32_at(b, entry::RING_IDX),
            seq: u64_at(b, entry::SEQ),
            progress: u32_at(b, entry::PROGRESS),
            rsp_idx: u32_at(b, entry::RSP_IDX),
            replays: u32_at(b, entry::REPLAYS),
            request,
            response,
        }
    }
}

/// The whole log, copied out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSnapshot {
    pub header: LogHeader,
    pub entries: Vec<EntrySnapshot>,
}

impl LogSnapshot {
    /// A fresh, empty log of `entry_count` entries (for tests and tools).
    pub fn empty(entry_count: u32) -> Self {
        LogSnapshot {
            header: LogHeader::new(entry_count),
            entries: vec![EntrySnapshot::default(); entry_count as usize],
        }
    }

    /// Decodes a log from its bytes (the start of the memfd). The header is
    /// validated; entries are copied as they are, for the planner to judge.
    pub fn parse(bytes: &[u8]) -> Result<Self, ShadowError> {
        let len = bytes.len() as u64;
        let header = LogHeader::parse(bytes).ok_or(ShadowError::TooSmall {
            len,
            need: HEADER_SIZE,
        })?;
        header.validate()?;
        let need = layout::log_bytes(header.entry_count);
        if len < need {
            return Err(ShadowError::TooSmall { len, need });
        }
        let body = &bytes[HEADER_SIZE as usize..need as usize];
        let entries = body
            .chunks_exact(ENTRY_SIZE as usize)
            .map(EntrySnapshot::parse)
            .collect();
        Ok(LogSnapshot { header, entries })
    }
}

// Callers pass slices at least as long as the layout says, checked above.
fn u32_at(b: &[u8], off: u64) -> u32 {
    let off = off as usize;
    let mut v = [0; 4];
    v.copy_from_slice(&b[off..off + 4]);
    u32::from_ne_bytes(v)
}

fn u64_at(b: &[u8], off: u64) -> u64 {
    let off = off as usize;
    let mut v = [0; 8];
    v.copy_from_slice(&b[off..off + 8]);
    u64::from_ne_bytes(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh_bytes(count: u32) -> Vec<u8> {
        let mut b = vec![0u8; layout::log_bytes(count) as usize];
        b[0..8].copy_from_slice(&layout::MAGIC.to_ne_bytes());
        b[8..12].copy_from_slice(&layout::VERSION.to_ne_bytes());
        b[12..16].copy_from_slice(&count.to_ne_bytes());
        b[44..48].copy_from_slice(&ENTRY_SIZE.to_ne_bytes());
        b
    }

    #[test]
    fn parses_a_fresh_log() {
        let snap = LogSnapshot::parse(&fresh_bytes(8)).unwrap();
        assert_eq!(snap, LogSnapshot::empty(8));
    }

    #[test]
    fn rejects_bad_headers() {
        let good = fresh_bytes(8);
        assert!(matches!(
            LogSnapshot::parse(&good[..10]),
            Err(ShadowError::TooSmall { .. })
        ));
        assert!(matches!(
            LogSnapshot::parse(&good[..good.len() - 1]),
            Err(ShadowError::TooSmall { .. })
        ));
        let mut b = good.clone();
        b[0] ^= 1;
        assert!(matches!(
            LogSnapshot::parse(&b),
            Err(ShadowError::BadMagic(_))
        ));
        let mut b = good.clone();
        b[8] = 2;
        assert!(matches!(
            LogSnapshot::parse(&b),
            Err(ShadowError::BadVersion(2))
        ));
        for count in [0u32, 3, MAX_ENTRIES * 2, u32::MAX] {
            let mut b = good.clone();
            b[12..16].copy_from_slice(&count.to_ne_bytes());
            assert!(matches!(
                LogSnapshot::parse(&b),
                Err(ShadowError::BadEntryCount(_))
            ));
        }
        let mut b = good;
        b[44] = 1;
        assert!(matches!(
            LogSnapshot::parse(&b),
            Err(ShadowError::BadEntrySize(_))
        ));
    }
}
