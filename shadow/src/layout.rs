//! Byte layout of the shadow log (docs/ARCHITECTURE.md §6).
//!
//! This comment is written to be copied into `docs/` as it stands.
//!
//! # Shadow log layout, version 1
//!
//! The log is a sealed memfd created by the supervisor, one per ring, and
//! mapped by every backend instance that serves the ring. All integers are
//! in host byte order (the memfd never leaves the host) and naturally
//! aligned, so each one is read and written with a single atomic access.
//!
//! ## Header (64 bytes, offset 0)
//!
//! | offset | type | field | written by |
//! |---:|---|---|---|
//! | 0  | u64 | `magic` = `SHDWLOG1` ([`MAGIC`]) | supervisor, at creation |
//! | 8  | u32 | `version` = 1 ([`VERSION`]) | supervisor, at creation |
//! | 12 | u32 | `entry_count` = ring size (power of two) | supervisor, at creation |
//! | 16 | u64 | `generation` of the instance owning the log | each instance, at start |
//! | 24 | u32 | logged `req_cons` | live instance |
//! | 28 | u32 | logged `rsp_prod_pvt` | live instance |
//! | 32 | u64 | `heartbeat`, incremented by the live instance | live instance |
//! | 40 | u32 | `stalled_instances`: instances started since one last published a response (crash-loop counter) | each instance |
//! | 44 | u32 | `entry_size` = 160 ([`ENTRY_SIZE`]) | supervisor, at creation |
//! | 48 | u64 | `next_seq`: the `seq` the next consumed request gets | live instance |
//! | 56 | u32 | `complete`: 1 once the log accounts for every request in flight on its ring; until then an instance taking over must also consult the record the log was started from (the VMM's in-flight region) | the first instance, once it has adopted that record |
//! | 60 | u32 | reserved, zero | — |
//!
//! ## Entries (`entry_count` × 160 bytes, from offset 64)
//!
//! | offset | type | field |
//! |---:|---|---|
//! | 0   | u32 | `state`: FREE = 0, INFLIGHT = 1, COMPLETING = 2, REWRITING = 3 (the commit word) |
//! | 4   | u32 | `ring_idx`: ring index the request was consumed at |
//! | 8   | u64 | `seq`: consumption order, unique over the life of the log |
//! | 16  | u32 | `progress`: per-class flags (net TX "handed to the wire", …) |
//! | 20  | u32 | `rsp_idx`: ring index of the response, when COMPLETING |
//! | 24  | u32 | `replays`: how many instances have re-executed the request |
//! | 28  | u32 | reserved, zero |
//! | 32  | [u8; 112] | `request`: verbatim copy of the ring slot (shorter requests are a prefix) |
//! | 144 | [u8; 16] | `response`: verbatim response, when COMPLETING (shorter ones are a prefix) |
//!
//! The region is rounded up to whole 4 KiB pages.
//!
//! ## Commit protocol
//!
//! There is one writer, the live instance. Every transition first writes
//! the payload with plain (relaxed) stores, then release-stores `state`,
//! then updates the header index it implies. `state` is the commit word: a
//! SIGKILL at any instruction leaves each entry either in its old state with
//! its old meaning, or in its new state with a complete payload. Header
//! indices are only ever updated *after* the entry that justifies them, so
//! recovery can always repair them from the entries
//! (see [`crate::plan_recovery`]).
//!
//! `REWRITING` only appears while an entry the recovery planner declared
//! corrupt is being answered with an error response: it marks the response
//! bytes as being overwritten, and recovery treats it as corrupt again.
//!
//! ## Why entries come from a free list, not `ring_idx & (size - 1)`
//!
//! At most `size` requests are outstanding, but they do not occupy distinct
//! residues of the ring size once completions are out of order: with a
//! 2-slot ring, the guest posts requests 0 and 1, request 1 completes and
//! the guest reuses its slot for request 2, and now requests 0 and 2 are
//! both outstanding and both map to slot 0. So entries are allocated from a
//! free list (rebuilt from the `state` words when an instance starts) and
//! `ring_idx` is a recorded field. Capacity still suffices: a live entry is
//! a request that was consumed and whose response is not yet published,
//! and an honest frontend has at most `size` of those
//! (`req_prod - rsp_prod <= size`, since it only reuses a slot after
//! consuming its response), provided the backend frees the entries of a
//! published batch before it consumes again. A backend that runs out of
//! entries (only a hostile frontend can make it) gets
//! [`ShadowError::LogFull`](crate::ShadowError::LogFull) and stops consuming
//! until it publishes.

/// `magic`: the bytes `SHDWLOG1` read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"SHDWLOG1");
/// Layout version described above.
pub const VERSION: u32 = 1;
/// Bytes of the header.
pub const HEADER_SIZE: u64 = 64;
/// Bytes of one entry.
pub const ENTRY_SIZE: u32 = 160;
/// Largest ring the log serves (netif with a 256-page ring is 2^17).
pub const MAX_ENTRIES: u32 = 1 << 18;
/// Size of the saved request: `sizeof(struct blkif_request)`, the largest
/// request of any ring class.
pub const REQUEST_SIZE: usize = 112;
/// Size of the saved response: `sizeof(struct blkif_response)`.
pub const RESPONSE_SIZE: usize = 16;

pub(crate) mod header {
    pub const MAGIC: u64 = 0;
    pub const VERSION: u64 = 8;
    pub const ENTRY_COUNT: u64 = 12;
    pub const GENERATION: u64 = 16;
    pub const REQ_CONS: u64 = 24;
    pub const RSP_PROD_PVT: u64 = 28;
    pub const HEARTBEAT: u64 = 32;
    pub const STALLED_INSTANCES: u64 = 40;
    pub const ENTRY_SIZE: u64 = 44;
    pub const NEXT_SEQ: u64 = 48;
    pub const COMPLETE: u64 = 56;
}

pub(crate) mod entry {
    pub const STATE: u64 = 0;
    pub const RING_IDX: u64 = 4;
    pub const SEQ: u64 = 8;
    pub const PROGRESS: u64 = 16;
    pub const RSP_IDX: u64 = 20;
    pub const REPLAYS: u64 = 24;
    pub const REQUEST: u64 = 32;
    pub const RESPONSE: u64 = 144;
}

/// The `state` word of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum EntryState {
    /// Unused; every other field is stale.
    Free = 0,
    /// Consumed from the ring, response not yet written.
    Inflight = 1,
    /// Response written to ring slot `rsp_idx` and saved in `response`;
    /// freed once `sring.rsp_prod` covers it.
    Completing = 2,
    /// An error response for a corrupt entry is being written.
    Rewriting = 3,
}

impl EntryState {
    /// Decodes a state word; `None` for a word no writer ever stores.
    pub fn from_word(word: u32) -> Option<Self> {
        match word {
            0 => Some(EntryState::Free),
            1 => Some(EntryState::Inflight),
            2 => Some(EntryState::Completing),
            3 => Some(EntryState::Rewriting),
            _ => None,
        }
    }

    /// The word stored in the log.
    pub fn word(self) -> u32 {
        self as u32
    }
}

/// Index of an entry in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId(pub u32);

impl EntryId {
    /// The entry's position, `0..entry_count`.
    pub fn index(self) -> u32 {
        self.0
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "entry {}", self.0)
    }
}

/// Byte offset of entry `index`.
pub(crate) fn entry_offset(index: u32) -> u64 {
    HEADER_SIZE + u64::from(index) * u64::from(ENTRY_SIZE)
}

/// Bytes needed for a log of `entries` entries (before page rounding).
pub(crate) fn log_bytes(entries: u32) -> u64 {
    entry_offset(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_fit_and_are_aligned() {
        assert_eq!(
            entry::RESPONSE + RESPONSE_SIZE as u64,
            u64::from(ENTRY_SIZE)
        );
        assert_eq!(entry::REQUEST + REQUEST_SIZE as u64, entry::RESPONSE);
        assert_eq!(ENTRY_SIZE % 8, 0);
        assert_eq!(HEADER_SIZE % 8, 0);
        assert_eq!(entry::SEQ % 8, 0);
        assert_eq!(header::NEXT_SEQ + 16, HEADER_SIZE);
        assert_eq!(&MAGIC.to_le_bytes(), b"SHDWLOG1");
        // The largest log still fits a region.
        let pages = log_bytes(MAX_ENTRIES).div_ceil(4096);
        assert!(pages <= u64::from(shadowback_ring::MAX_REGION_PAGES));
    }

    #[test]
    fn state_words_round_trip() {
        for s in [
            EntryState::Free,
            EntryState::Inflight,
            EntryState::Completing,
            EntryState::Rewriting,
        ] {
            assert_eq!(EntryState::from_word(s.word()), Some(s));
        }
        assert_eq!(EntryState::from_word(4), None);
        assert_eq!(EntryState::from_word(u32::MAX), None);
    }
}
