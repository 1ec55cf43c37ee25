//! Shared memory, grant tables, event channels and Xen-compatible shared
//! rings.
//!
//! This crate gives typed, range-checked access (through `vm-memory`) to a
//! Xen-style guest's granted region: the grant table, the shared ring and
//! the wire structs, each copied out and validated before it is used. It is
//! not the only code that touches memory shared with a guest (see
//! docs/ARCHITECTURE.md §2, §3, §8): blkback's I/O engine hands the kernel
//! iovecs that point into granted pages (the data of reads and writes goes
//! there without a copy), blkback's virtio data plane maps a VMM's guest
//! RAM itself, the supervisor reads ring indices (through this crate for
//! Xen rings, with `pread` for virtqueues), and `guest/` is the other side
//! of every ring.
//!
//! Its only `unsafe` is `unsafe impl ByteValued` for the `#[repr(C)]` wire
//! structs and the two atomics of [`SharedRegion::atomic_u32`] /
//! [`SharedRegion::atomic_u64`], each allowed on its own below the
//! crate-wide deny.
//!
//! * [`SharedRegion`] — a memfd mapped with `vm-memory`: the guest's granted
//!   memory. Guest addresses are byte offsets into the memfd.
//! * [`grant`] — the Xen grant table v1 living in the first frames of the
//!   region, and the access rules a backend must obey.
//! * [`EventChannel`] — an eventfd standing in for a Xen event channel.
//! * [`sring`] — the generic `xen/io/ring.h` shared ring, front and back.
//! * [`blkif`], [`netif`] — the wire structs of `xen/io/blkif.h` and
//!   `xen/io/netif.h`.

#![deny(unsafe_code)]

mod error;
mod event;
mod region;

pub mod blkif;
pub mod grant;
pub mod netif;
pub mod sring;

pub use error::RingError;
pub use event::EventChannel;
pub use region::{SharedRegion, MAX_REGION_PAGES, PAGE_SIZE};
