//! netback: the network backend (docs/ARCHITECTURE.md §11).
//!
//! - [`netif`]: validation of netif TX requests as Linux xen-netback does
//!   it, and the RX buffer plan (pure code, table-tested);
//! - [`record`]: what a vif stores in the (device-agnostic) shadow log;
//! - [`wire`]: the TAP device and the cable the supervisor holds, and the
//!   virtio-net header both carry; the crate's only `unsafe` is the ioctls
//!   in `wire::sys`.

#![deny(unsafe_code)]

pub mod netif;
pub mod record;
pub mod wire;
