//! blkback: the block backend, for Xen rings (DESIGN §6) and virtqueues
//! (DESIGN §8).
//!
//! - [`request`]: validation of blkif requests against the disk and the
//!   guest's grants (pure code, table-tested);
//! - [`backend`]: the event loop of one backend process;
//! - [`virtio`]: the virtio-blk data plane the same process switches to on
//!   `attach-virtio`;
//! - [`uring`]: the io_uring engine, the crate's only `unsafe`;
//! - [`rawbench`]: the same engine driving a file directly, the baseline of
//!   `shadowback bench blk`.

pub mod backend;
pub mod rawbench;
pub mod request;
pub mod uring;
pub mod virtio;
