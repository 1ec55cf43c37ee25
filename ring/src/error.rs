use std::io;

use crate::grant::GrantError;

/// Errors of the shared-memory layer.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("creating the shared memory file failed")]
    CreateMemfd(#[source] io::Error),
    #[error("the shared region has an invalid size of {0} bytes")]
    BadRegionSize(u64),
    #[error("the shared region is not sealed against shrinking (F_SEAL_SHRINK)")]
    NotSealed,
    #[error("the shared region is not a shmem memfd (hugetlbfs and other memory that can fault is refused)")]
    NotShmem,
    #[error("mapping the shared region failed: {0}")]
    Map(String),
    #[error("guest memory access at offset {offset:#x} failed: {reason}")]
    Access { offset: u64, reason: String },
    #[error("frame {frame} is outside the shared region of {pages} pages")]
    FrameOutOfRange { frame: u32, pages: u32 },
    #[error("a ring needs 1 to {max} pages, got {got}")]
    BadRingPages { got: usize, max: usize },
    #[error(transparent)]
    Grant(#[from] GrantError),
    #[error("event channel failed")]
    Event(#[source] io::Error),
    /// `req_prod` claims more outstanding requests than the ring can hold:
    /// the frontend is broken or hostile (`RING_REQUEST_PROD_OVERFLOW`).
    #[error(
        "request producer {req_prod} overflows the ring (rsp_prod_pvt {rsp_prod_pvt}, size {size})"
    )]
    RequestOverflow {
        req_prod: u32,
        rsp_prod_pvt: u32,
        size: u32,
    },
    /// `rsp_prod` claims more responses than were requested
    /// (`RING_RESPONSE_PROD_OVERFLOW`): the backend is broken.
    #[error("response producer {rsp_prod} overflows the ring (rsp_cons {rsp_cons}, size {size})")]
    ResponseOverflow {
        rsp_prod: u32,
        rsp_cons: u32,
        size: u32,
    },
    #[error("the ring is full")]
    RingFull,
}
