//! The virtio-blk data plane (DESIGN §8): the same backend process serves
//! split virtqueues of a vhost-user device after `attach-virtio`, with the
//! same io_uring engine and the same shadow-log recovery as the Xen path.
//!
//! - [`memory`]: guest memory mapped from the VMM's memfds;
//! - [`queue`]: split-ring access, bounded descriptor-chain walks,
//!   EVENT_IDX arithmetic;
//! - [`request`]: virtio-blk request parsing (pure, table-tested);
//! - [`inflight`]: QEMU's in-flight region, and the sizing the supervisor
//!   uses for `GET_INFLIGHT_FD`;
//! - [`backend`]: the event loop.

pub mod backend;
pub mod inflight;
pub mod memory;
pub mod queue;
pub mod request;

pub use inflight::{
    fresh_inflight_region, inflight_mmap_size, inflight_queue_offset, inflight_queue_region_size,
    init_inflight_region,
};
pub use request::{MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SEG, SEG_MAX};
