//! Guest-side drivers and verifying workloads for shadowback
//! (docs/ARCHITECTURE.md §5).
//!
//! Everything here runs in a separate process, like a real guest: a
//! transport-neutral [`device::BlockDevice`] interface, predictable sector
//! content ([`pattern`]), the verifying and benchmark workloads
//! ([`workload`]), latency statistics ([`stats`]) and an in-memory device for
//! tests ([`memdisk`]), and the vhost-user-blk client ([`vhost_user`]).
//!
//! `unsafe` is denied crate-wide and allowed item by item only in
//! [`vhost_user::hal`], where `virtio-drivers`' pointer-based `Hal` and
//! virtqueue API meet guest RAM. (`forbid` is not possible: `Hal` is an
//! unsafe trait.)
#![deny(unsafe_code)]

pub mod blkfront;
pub mod device;
pub mod memdisk;
pub mod net;
pub mod netfront;
pub mod pattern;
pub mod stats;
pub mod vhost_user;
pub mod workload;
