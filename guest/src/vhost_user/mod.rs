//! Native vhost-user-blk and vhost-user-net clients: this process plays the VMM *and* the
//! guest driver, with no VM in between (docs/ARCHITECTURE.md §8).
//!
//! - [`memory`]: guest RAM, one sealed memfd at guest-physical address 0,
//!   and its DMA allocator.
//! - [`hal`]: `virtio_drivers::Hal` over that RAM, and a virtqueue wrapper
//!   whose buffers are guest-physical ranges (the crate's only `unsafe`).
//! - [`transport`]: `virtio_drivers::transport::Transport` over a vhost-user
//!   socket (the `vhost` crate's frontend), with QEMU-style reconnect.
//! - [`net`]: [`VhostUserNet`], a virtio-net
//!   [`crate::net::FrameDevice`] for the smoltcp stack.
//! - [`blk`]: [`VhostUserBlk`], a high-queue-depth virtio-blk
//!   [`crate::device::BlockDevice`], and [`connect_simple`], `virtio-drivers`'
//!   own `VirtIOBlk` over the same transport for cross-checks.

pub mod hal;

pub mod blk;
pub mod memory;
pub mod net;
pub mod transport;

pub use blk::{connect_simple, Limits, SimpleVirtioBlk, VhostUserBlk, VhostUserBlkOptions};
pub use memory::GuestRam;
pub use net::{VhostUserNet, VhostUserNetOptions, VhostUserNetStats};
pub use transport::{TransportOptions, VhostUserTransport};
