//! blkback: the block backend, for Xen rings (docs/ARCHITECTURE.md §3)
//! and virtqueues (docs/ARCHITECTURE.md §8).
//!
//! - [`request`]: validation of blkif requests against the disk and the
//!   guest's grants (pure code, table-tested);
//! - [`instance`]: the configuration and counters of a backend instance;
//! - [`backend`]: the backend process: the generic data-plane loop with
//!   the block model, attached over a Xen ring or virtqueues;
//! - [`model`]: the block model (blkif and virtio-blk requests on the
//!   disk);
//! - [`xen`]: the Xen back ring as a ring set;
//! - [`virtio`]: virtio-blk parsing, the virtqueues as a ring set, and
//!   `attach-virtio`;
//! - [`record`]: what the block model stores in the (device-agnostic)
//!   shadow log, for each transport;
//! - [`rawbench`]: the same engine driving a file directly, the baseline of
//!   `shadowback bench blk`.

#![forbid(unsafe_code)]

pub mod backend;
pub mod instance;
pub mod model;
pub mod rawbench;
pub mod record;
pub mod request;
pub mod virtio;
pub mod xen;
