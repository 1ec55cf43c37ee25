//! blkback: the Xen block backend (DESIGN §6).
//!
//! - [`request`]: validation of blkif requests against the disk and the
//!   guest's grants (pure code, table-tested);
//! - [`backend`]: the event loop of one backend process;
//! - [`uring`]: the io_uring engine, the crate's only `unsafe`;
//! - [`rawbench`]: the same engine driving a file directly, the baseline of
//!   `shadowback bench blk`.

pub mod backend;
pub mod rawbench;
pub mod request;
pub mod uring;
