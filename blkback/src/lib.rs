//! blkback: the block backend, for Xen rings (docs/ARCHITECTURE.md §3)
//! and virtqueues (docs/ARCHITECTURE.md §8).
//!
//! - [`request`]: validation of blkif requests against the disk and the
//!   guest's grants (pure code, table-tested);
//! - [`dataplane`]: what the event loops of both transports share — the
//!   instance's configuration and counters, the completion token, the
//!   loop body, control-channel pieces, opening a shadow log;
//! - [`backend`]: the Xen-ring event loop of one backend process;
//! - [`virtio`]: the virtio-blk data plane the same process switches to on
//!   `attach-virtio`;
//! - [`record`]: what the block model stores in the (device-agnostic)
//!   shadow log, for each transport;
//! - [`uring`]: the io_uring engine, the crate's only `unsafe`;
//! - [`rawbench`]: the same engine driving a file directly, the baseline of
//!   `shadowback bench blk`.

#![deny(unsafe_code)]

pub mod backend;
pub mod dataplane;
pub mod rawbench;
pub mod record;
pub mod request;
// The io_uring engine hands the kernel raw iovecs and buffer addresses;
// it is the crate's only unsafe module (docs/ARCHITECTURE.md §3, "The
// engine"), every block with a `// SAFETY:` line.
#[allow(unsafe_code)]
pub mod uring;
pub mod virtio;
