//! The virtio-blk transport side (docs/ARCHITECTURE.md §8): the same
//! backend process serves split virtqueues of a vhost-user device after
//! `attach-virtio`, with the same engine, loop and shadow-log recovery as
//! the Xen path. The transport itself (guest memory, split queues, the
//! in-flight region) is the `shadowback-virtio` crate.
//!
//! - [`request`]: virtio-blk request parsing (pure, table-tested);
//! - [`queues`]: the virtqueues as a ring set, with the in-flight region
//!   and their recovery;
//! - [`attach`]: `attach-virtio`, building both for the generic loop.

pub mod attach;
pub mod queues;
pub mod request;
