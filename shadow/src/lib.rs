//! The shadow log: a per-ring record of every in-flight request, kept in
//! supervisor-owned shared memory, from which a fresh backend instance
//! recovers after a crash (docs/ARCHITECTURE.md §6 and §7).
//!
//! * [`ShadowLog`] — the log in a sealed memfd: created by the supervisor,
//!   written by the live backend instance with a commit protocol that
//!   survives SIGKILL at any instruction. Byte layout in [`layout`].
//! * [`plan_recovery`] ([`plan`]) — pure code from a [`LogSnapshot`] and the ring's
//!   shared indices to a [`RecoveryPlan`]: what to re-push, re-execute,
//!   free, fail as poison, or fail as corrupt.
//! * [`crash`] — numbered crash points between every pair of log stores,
//!   for fault-injection tests.
//!
//! The log is device-agnostic: it stores each request's and response's
//! bytes and never interprets them. What they mean (the blkif and
//! virtio-blk records) is the device model's business, in blkback.
//!
//! All shared-memory access goes through [`shadowback_ring::SharedRegion`];
//! this crate has no `unsafe`.

#![forbid(unsafe_code)]

pub mod crash;
mod error;
pub mod layout;
mod log;
pub mod metrics;
pub mod plan;
mod snapshot;

pub use crash::{CrashHook, CrashPoint, Transition};
pub use error::ShadowError;
pub use layout::{EntryId, EntryState, REQUEST_SIZE, RESPONSE_SIZE};
pub use log::{LogWriter, ShadowLog};
pub use metrics::{IoCounters, Latency, MetricsPage, MetricsWriter};
pub use plan::{
    plan_recovery, CorruptAction, CorruptEntry, CorruptReason, InflightEntry, RecoveryPlan, Repush,
};
pub use snapshot::{EntrySnapshot, LogHeader, LogSnapshot};
