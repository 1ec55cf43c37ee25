//! Scaffolding shared by the shadowback test suites (docs/ARCHITECTURE.md
//! §7.6): one temporary directory and image type, one polling helper,
//! eventfd/memfd helpers, the raw Xen guest, the virtqueue driver, the
//! scriptable fake backend, and the harness that starts the supervisor,
//! backend and guest processes.
//!
//! A dev-dependency only. The always-built modules need nothing of the
//! workspace; the others sit behind features (`xen`, `virtio`,
//! `fake-backend`, `harness`) so that each crate's tests build only the
//! crates they drive.
#![deny(unsafe_code)]

pub mod fd;
pub mod netns;
pub mod socket;
pub mod temp;
pub mod wait;

#[cfg(feature = "xen")]
pub mod raw_guest;

#[cfg(feature = "virtio")]
pub mod virtqueue;

#[cfg(feature = "fake-backend")]
pub mod fake_backend;

#[cfg(feature = "harness")]
pub mod blockio;
#[cfg(feature = "harness")]
pub mod harness;
#[cfg(feature = "harness")]
pub mod operator;
#[cfg(feature = "harness")]
pub mod process;

pub use fd::{eventfd, memfd};
pub use temp::{TempDir, TempImage};
pub use wait::{wait_for, wait_for_state};

use std::time::Duration;

/// How long any single control-socket answer or block request may take.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
