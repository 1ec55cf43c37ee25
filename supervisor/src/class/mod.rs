//! Device classes (docs/ARCHITECTURE.md §4): what a device task asks of
//! the kind of device it exports — a disk today, a NIC next.
//!
//! The device task, the session, recovery and the vhost-user server are
//! the same for every class; a class answers the few questions whose answer
//! depends on the device:
//!
//! - what a Xen frontend probes ([`DeviceClass::backend_info`]);
//! - what a vhost-user frontend sees: features, queues, config space
//!   ([`DeviceClass::virtio_model`], a [`VirtioModel`]);
//! - how one backend instance is started — the arguments after
//!   `--device`/`--control-fd`, the device fd it inherits — and whether
//!   fencing it must wait for its I/O ([`DeviceClass::prepare_instance`]):
//!   a disk's instance gets an I/O fence (docs/ARCHITECTURE.md §7.3), a
//!   NIC's would not.
//!
//! A trait rather than an enum of classes: a class holds state of its own
//! (a disk: the opened image and its locks), the questions are few and all
//! off the data path, and a new class is a new module implementing them,
//! with no arm to add in the task, the session or the handler. The device
//! task holds a `Box<dyn DeviceClass>`; nothing is generic over it.

pub mod block;

use std::ffi::OsString;
use std::fs::File;
use std::sync::Arc;

use shadowback_xenbus::BackendInfo;

use crate::spawn::IoFence;
use crate::vhost_user::VirtioModel;
use crate::SupervisorError;

pub use block::BlockClass;

/// The kind of device a device task exports.
pub trait DeviceClass: Send + Sync + std::fmt::Debug {
    /// The backend keys a Xen frontend gets in `backend` and `connected`.
    fn backend_info(&self) -> BackendInfo;

    /// What a vhost-user frontend sees of the device.
    fn virtio_model(&self) -> Arc<dyn VirtioModel>;

    /// Everything one new backend instance needs from the class.
    fn prepare_instance(&self) -> Result<InstanceSetup, SupervisorError>;
}

/// One backend instance as its class sets it up.
#[derive(Debug)]
pub struct InstanceSetup {
    /// The class's arguments, after `--device NAME --control-fd 3`.
    pub args: Vec<OsString>,
    /// Inherited as fd [`BACKEND_DISK_FD`](crate::BACKEND_DISK_FD); the
    /// supervisor closes its copy once the process is started, so that the
    /// instance holds the only references.
    pub device_file: File,
    /// What fencing the instance must wait for after it is reaped; `None`
    /// when nothing it did can land later (a read-only disk, a NIC).
    pub io_fence: Option<IoFence>,
}
