//! netback: the network backend (docs/ARCHITECTURE.md §11).
//!
//! - [`backend`]: the Xen netif backend of one backend process, on the
//!   data plane's generic loop (`attach-net`: the ring set and the device
//!   model);
//! - [`checksum`]: completing a blank TCP/UDP checksum in software;
//! - [`netif`]: validation of netif TX requests as Linux xen-netback does
//!   it, and the RX buffer plan (pure code, table-tested);
//! - [`record`]: what a vif stores in the (device-agnostic) shadow log;
//! - [`tapbatch`]: netif TX frames written to a TAP in batches through
//!   io_uring, straight from the guest's pages;
//! - [`vnet`]: vhost-user-net on the same generic loop and wires
//!   (`attach-virtio`: the virtqueue ring set and the device model);
//! - [`wire`]: the TAP device and the cable the supervisor holds, and the
//!   virtio-net header both carry; the crate's only `unsafe` is the ioctls
//!   in `wire::sys`.

#![deny(unsafe_code)]

pub mod backend;
pub mod checksum;
pub mod netif;
pub mod record;
pub mod tapbatch;
pub mod vnet;
pub mod wire;
