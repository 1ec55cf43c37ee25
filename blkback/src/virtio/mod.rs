//! The virtio-blk data plane (docs/ARCHITECTURE.md §8): the same backend
//! process serves split virtqueues of a vhost-user device after
//! `attach-virtio`, with the same io_uring engine and the same shadow-log
//! recovery as the Xen path. The transport itself (guest memory, split
//! queues, the in-flight region) is the `shadowback-virtio` crate.
//!
//! - [`request`]: virtio-blk request parsing (pure, table-tested);
//! - [`backend`]: the event loop.

pub mod backend;
pub mod request;
