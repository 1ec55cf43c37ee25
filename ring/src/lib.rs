//! Shared memory, grant tables, event channels and Xen-compatible shared
//! rings.
//!
//! This is the only crate of shadowback that touches memory shared with a
//! guest. Everything a guest controls is read through typed, range-checked
//! accessors from `vm-memory`; other crates see validated values.
//!
//! * [`SharedRegion`] — a memfd mapped with `vm-memory`: the guest's granted
//!   memory. Guest addresses are byte offsets into the memfd.
//! * [`grant`] — the Xen grant table v1 living in the first frames of the
//!   region, and the access rules a backend must obey.
//! * [`EventChannel`] — an eventfd standing in for a Xen event channel.
//! * [`sring`] — the generic `xen/io/ring.h` shared ring, front and back.
//! * [`blkif`], [`netif`] — the wire structs of `xen/io/blkif.h` and
//!   `xen/io/netif.h`.

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
