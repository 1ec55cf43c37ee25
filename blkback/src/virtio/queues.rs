//! virtio-blk's virtqueues: the generic ring set of
//! [`shadowback_dataplane::virtq`] with what virtio-blk logs of a head (its
//! request header as the model's detail) and of a used element (its
//! status byte), docs/ARCHITECTURE.md §8.

use shadowback_dataplane::rings::{Detail, Record};
use shadowback_dataplane::virtq::{self, VirtioRecords};

use crate::record::virtio_blk as vrecord;

pub use shadowback_dataplane::virtq::{Head, VQueue};

/// A used element, and the status byte the log keeps beside it.
#[derive(Clone, Copy, Debug)]
pub struct Used {
    pub head: u16,
    pub len: u32,
    pub status: u8,
}

/// virtio-blk's records ([`vrecord`]).
pub struct BlkRecords;

impl VirtioRecords for BlkRecords {
    type Used = Used;

    fn used_elem(used: &Used) -> (u16, u32) {
        (used.head, used.len)
    }

    fn request(head: u16, avail16: u16, queue: u16, detail: &Detail) -> Record {
        Record::new(&vrecord::request(head, avail16, queue, detail))
    }

    fn logged_head(bytes: &[u8]) -> Option<(u16, u16)> {
        vrecord::logged_head(bytes)
    }

    fn response(used: &Used) -> Record {
        Record::new(&vrecord::response(used.head, used.len, used.status))
    }

    fn saved_used_elem(response: &[u8]) -> Option<(u32, u32)> {
        Some(vrecord::saved_used_elem(response))
    }
}

/// The virtqueues of one virtio-blk device.
pub type VirtQueues = virtq::VirtQueues<BlkRecords>;
