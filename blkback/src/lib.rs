//! blkback: the block backend, for Xen rings (docs/ARCHITECTURE.md §3)
//! and virtqueues (docs/ARCHITECTURE.md §8).
//!
//! - [`request`]: validation of blkif requests against the disk and the
//!   guest's grants (pure code, table-tested);
//! - [`instance`]: the configuration and counters of a backend instance;
//! - [`backend`]: the Xen-ring event loop of one backend process;
//! - [`virtio`]: the virtio-blk data plane the same process switches to on
//!   `attach-virtio`;
//! - [`record`]: what the block model stores in the (device-agnostic)
//!   shadow log, for each transport;
//! - [`rawbench`]: the same engine driving a file directly, the baseline of
//!   `shadowback bench blk`.

#![forbid(unsafe_code)]

pub mod backend;
pub mod instance;
pub mod rawbench;
pub mod record;
pub mod request;
pub mod virtio;
