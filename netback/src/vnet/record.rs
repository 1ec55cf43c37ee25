//! What a virtio-net queue stores in the shadow log (docs/ARCHITECTURE.md
//! §8.1): one entry per consumed head, on both queues.
//!
//! | record | bytes (little-endian) |
//! |---|---|
//! | request | `0..2` head, `2..4` the 16-bit avail index it was taken at, `4..8` `VNET`, `8..10` virtqueue index |
//! | response | `0..4` used id, `4..8` used len, `8..10` the head's position in its frame, `10..12` heads in the frame, `12..16` `VNRS` |
//!
//! A receive frame may fill several heads (`VIRTIO_NET_F_MRG_RXBUF`):
//! position and count let a recovery tell a frame whose used entries were
//! not all written before a crash (such a frame is never shown whole).

use crate::backend::PUBLISH_EVERY;
use shadowback_dataplane::rings::{Detail, Record};
use shadowback_dataplane::virtq::VirtioRecords;

const REQUEST_TAG: [u8; 4] = *b"VNET";
const RESPONSE_TAG: [u8; 4] = *b"VNRS";

/// Bytes of a request record.
pub const REQUEST_LEN: usize = 10;
/// Bytes of a response record.
pub const RESPONSE_LEN: usize = 16;
const _: () = assert!(
    REQUEST_LEN <= shadowback_shadow::REQUEST_SIZE
        && RESPONSE_LEN <= shadowback_shadow::RESPONSE_SIZE
);

/// The request record of `head`, taken at avail index `avail16` of
/// virtqueue `queue`.
pub fn request(head: u16, avail16: u16, queue: u16) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..2].copy_from_slice(&head.to_le_bytes());
    b[2..4].copy_from_slice(&avail16.to_le_bytes());
    b[4..8].copy_from_slice(&REQUEST_TAG);
    b[8..10].copy_from_slice(&queue.to_le_bytes());
    b
}

/// `(head, avail16)` of a request record; `None` for other bytes.
pub fn logged_head(bytes: &[u8]) -> Option<(u16, u16)> {
    if bytes.get(4..8)? != REQUEST_TAG {
        return None;
    }
    Some((
        u16::from_le_bytes([bytes[0], bytes[1]]),
        u16::from_le_bytes([bytes[2], bytes[3]]),
    ))
}

/// A used element as logged: the element, and where its head sits in
/// its frame (`position` of `count`; 0 of 1 for a transmit head).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedRecord {
    pub id: u32,
    pub len: u32,
    pub position: u16,
    pub count: u16,
}

impl UsedRecord {
    /// A used element that is a frame of its own.
    pub fn single(head: u16, len: u32) -> Self {
        UsedRecord {
            id: u32::from(head),
            len,
            position: 0,
            count: 1,
        }
    }

    pub fn encode(&self) -> [u8; RESPONSE_LEN] {
        let mut b = [0u8; RESPONSE_LEN];
        b[0..4].copy_from_slice(&self.id.to_le_bytes());
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..10].copy_from_slice(&self.position.to_le_bytes());
        b[10..12].copy_from_slice(&self.count.to_le_bytes());
        b[12..16].copy_from_slice(&RESPONSE_TAG);
        b
    }

    /// `None` for bytes that are not a response record.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.get(12..16)? != RESPONSE_TAG {
            return None;
        }
        let u32_at = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        Some(UsedRecord {
            id: u32_at(0),
            len: u32_at(4),
            position: u16_at(8),
            count: u16_at(10),
        })
    }
}

/// virtio-net's records, for its virtqueues
/// ([`shadowback_dataplane::virtq::VirtQueues`]); the model adds no
/// detail to a request record.
pub struct VnetRecords;

impl VirtioRecords for VnetRecords {
    type Used = UsedRecord;
    /// A receive head made available twice is used twice, each time with
    /// the frame it then holds; a transmit head, sent twice.
    const ONE_OUT_PER_HEAD: bool = false;
    /// Published every [`PUBLISH_EVERY`] answers in a long drain, as a
    /// netif ring (docs/ARCHITECTURE.md §8.1, §11.2).
    const PUBLISH_EVERY: Option<u32> = Some(PUBLISH_EVERY);

    /// Transmit queues (odd indices; the control queue's is even): a
    /// driver out of room is woken once half the queue is left to take,
    /// so it refills while the backend still has frames.
    fn counts_left(queue: u16) -> bool {
        queue % 2 == 1
    }

    fn used_elem(used: &UsedRecord) -> (u16, u32) {
        // A used element names a head the ring set handed over (< 2^15).
        (used.id as u16, used.len)
    }

    fn request(head: u16, avail16: u16, queue: u16, _detail: &Detail) -> Record {
        Record::new(&request(head, avail16, queue))
    }

    fn logged_head(bytes: &[u8]) -> Option<(u16, u16)> {
        logged_head(bytes)
    }

    fn response(used: &UsedRecord) -> Record {
        Record::new(&used.encode())
    }

    fn saved_used_elem(response: &[u8]) -> Option<(u32, u32)> {
        UsedRecord::decode(response).map(|u| (u.id, u.len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadowback_shadow::{REQUEST_SIZE, RESPONSE_SIZE};

    #[test]
    fn records_round_trip_and_fit_the_log() {
        let mut saved = [0u8; REQUEST_SIZE];
        saved[..REQUEST_LEN].copy_from_slice(&request(255, 65535, 1));
        assert_eq!(logged_head(&saved), Some((255, 65535)));
        assert_eq!(logged_head(&[0u8; REQUEST_SIZE]), None);
        let used = UsedRecord {
            id: 7,
            len: 1526,
            position: 1,
            count: 3,
        };
        let mut rsp = [0u8; RESPONSE_SIZE];
        rsp.copy_from_slice(&used.encode());
        assert_eq!(UsedRecord::decode(&rsp), Some(used));
        assert_eq!(UsedRecord::decode(&[0u8; RESPONSE_SIZE]), None);
        assert_eq!(UsedRecord::decode(&rsp[..8]), None);
    }
}
