//! The data plane every shadowback backend process runs, whatever its
//! device class (docs/ARCHITECTURE.md §3 and §11):
//!
//! - [`event_loop`]: the one completion token, attachment generations and
//!   the loop body, driving any transport through [`event_loop::EventLoop`];
//! - [`confine`]: what a backend gives up before it serves a guest
//!   (limits, capabilities, seccomp);
//! - [`death`]: a backend's death made visible and final at once (the
//!   `dying` note, membarrier registration);
//! - [`control`]: the control-channel pieces every loop answers alike
//!   (attach flags and reply, fault injection);
//! - [`rings`] and [`model`]: the two traits a device class implements,
//!   a set of rings per transport and a device model;
//! - [`serve`]: the one loop over any rings and model (consume, start,
//!   complete, respond, publish, attach, recovery, serial replay);
//! - [`qos`]: a device's IOPS and bandwidth limits (token buckets);
//! - [`recovery`]: opening a shadow log, recovery counters, freeing what the
//!   guest has seen, and the crash-loop breaker's serial replay;
//! - [`uring`]: the io_uring engine, the crate's only `unsafe`;
//! - [`virtq`]: the split virtqueues of a vhost-user device, generic over
//!   what its class logs, the ring set of virtio-blk and virtio-net;
//! - [`xen`]: one Xen back ring, generic over its `sring` protocol, for
//!   the ring sets of blkif and netif.

#![deny(unsafe_code)]

pub mod confine;
pub mod control;
pub mod death;
pub mod event_loop;
pub mod model;
pub mod qos;
pub mod recovery;
pub mod rings;
pub mod serve;
// The io_uring engine hands the kernel raw iovecs and buffer addresses;
// its `unsafe` is documented at the top of the module.
#[allow(unsafe_code)]
pub mod uring;
pub mod virtq;
pub mod xen;
