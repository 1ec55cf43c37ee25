//! Transport-generic virtio for the data plane (docs/ARCHITECTURE.md §8):
//! nothing here knows which device class a queue serves.
//!
//! - [`memory`]: guest memory mapped from the VMM's memfds;
//! - [`queue`]: split-ring access, bounded descriptor-chain walks,
//!   EVENT_IDX arithmetic;
//! - [`inflight`]: QEMU's in-flight region, and the sizing the supervisor
//!   uses for `GET_INFLIGHT_FD`;
//! - [`blk`]: the virtio-blk limits that the config space the supervisor
//!   advertises and the request parser in blkback must agree on;
//! - [`net`]: the virtio-net features and config space the supervisor
//!   advertises and netback's virtqueue loop serves;
//! - [`net_state`]: what a virtio-net driver sets on the control queue,
//!   and the area that keeps it across backend crashes.
//!
//! The supervisor depends on this crate (for the in-flight layout and the
//! advertised limits), not on blkback and its io_uring engine.

#![deny(unsafe_code)]

pub mod blk;
pub mod inflight;
pub mod memory;
pub mod net;
pub mod net_state;
pub mod queue;

pub use inflight::{
    fresh_inflight_region, inflight_mmap_size, inflight_queue_offset, inflight_queue_region_size,
    init_inflight_region,
};
