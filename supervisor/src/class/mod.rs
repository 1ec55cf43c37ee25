//! Device classes (docs/ARCHITECTURE.md §4): what a device task asks of
//! the kind of device it exports — a disk or a NIC (vif).
//!
//! The device task, the session, recovery and the vhost-user server are
//! the same for every class; a class answers the few questions whose answer
//! depends on the device:
//!
//! - what a Xen frontend probes ([`DeviceClass::backend_info`]): a
//!   disk's `BackendInfo` or a vif's `NetBackendInfo`;
//! - what a vhost-user frontend sees: features, queues, config space
//!   ([`DeviceClass::virtio_model`], a [`VirtioModel`]: virtio-blk or
//!   virtio-net);
//! - how one backend instance is started — the arguments after
//!   `--device`/`--control-fd`, the device fd it inherits — and whether
//!   fencing it must wait for its I/O ([`DeviceClass::prepare_instance`]):
//!   a disk's instance gets an I/O fence (docs/ARCHITECTURE.md §7.3), a
//!   NIC's does not;
//! - what a frontend's attachment is lent besides its own descriptors
//!   ([`DeviceClass::lend_wire`]: a vif's wire).
//!
//! A trait rather than an enum of classes: a class holds state of its own
//! (a disk: the opened image and its locks), the questions are few and all
//! off the data path, and a new class is a new module implementing them,
//! with no arm to add in the task, the session or the handler. The device
//! task holds a `Box<dyn DeviceClass>`; nothing is generic over it.

pub mod block;
pub mod net;

use std::ffi::OsString;
use std::fs::File;
use std::sync::Arc;

use shadowback_xenbus::netif::NetBackendInfo;
use shadowback_xenbus::protocol::{ErrorCode, QosLimits};
use shadowback_xenbus::BackendInfo;

use crate::device::Refusal;

use crate::spawn::IoFence;
use crate::transport::NetWire;
use crate::upgrade::{ClassState, Handover};
use crate::vhost_user::VirtioModel;
use crate::SupervisorError;

pub use block::BlockClass;
pub use net::NetClass;

/// The backend keys a Xen frontend gets in `backend` and `connected`, by
/// class (docs/PROTOCOL.md §4.2, §4.7).
#[derive(Clone, Debug)]
pub enum ClassInfo {
    Disk(BackendInfo),
    Net(NetBackendInfo),
}

/// The kind of device a device task exports.
pub trait DeviceClass: Send + Sync + std::fmt::Debug {
    /// The backend keys a Xen frontend gets in `backend` and `connected`.
    fn backend_info(&self) -> ClassInfo;

    /// What a vhost-user frontend sees of the device; `None` for a class
    /// not served over vhost-user.
    fn virtio_model(&self) -> Option<Arc<dyn VirtioModel>>;

    /// Everything one new backend instance needs from the class.
    fn prepare_instance(&self) -> Result<InstanceSetup, SupervisorError>;

    /// The size in sectors a resize to `bytes` gives (`None`: re-read a
    /// block device's size), checked but not applied yet.
    fn plan_resize(&self, _bytes: Option<u64>) -> Result<u64, Refusal> {
        Err((ErrorCode::Einval, "only a disk can be resized".into()))
    }

    /// Gives the device `sectors` sectors (the image file's new length);
    /// later instances are started with it.
    fn apply_resize(&mut self, _sectors: u64) -> Result<(), Refusal> {
        Err((ErrorCode::Einval, "only a disk can be resized".into()))
    }

    /// The QoS limits later instances are started with.
    fn set_qos(&mut self, _qos: QosLimits) -> Result<(), Refusal> {
        Err((ErrorCode::Einval, "only a disk has QoS limits".into()))
    }

    /// A duplicate of the wire every attachment of a vif is lent (it
    /// travels after the frontend's descriptors, docs/PROTOCOL.md §6c);
    /// `None` for a class without one.
    fn lend_wire(&self) -> Result<Option<NetWire>, SupervisorError> {
        Ok(None)
    }

    /// What the class holds for the device's life, named for the binary
    /// that takes over in a live upgrade (docs/ARCHITECTURE.md §4.2).
    fn handover(&self, fds: &mut Handover) -> ClassState;

    /// Whether a new instance may serve while the last one's fence still
    /// runs, holding back what conflicts with the dead instance's requests
    /// (`fence=1`, docs/ARCHITECTURE.md §7.3). A class without it waits
    /// for the whole fence before the takeover.
    fn holds_back(&self) -> bool {
        false
    }
}

/// One backend instance as its class sets it up.
#[derive(Debug)]
pub struct InstanceSetup {
    /// The class's arguments, after `--device NAME --control-fd 3`: each
    /// `--key value` or a bare `--flag` (a spare is told them as the keys
    /// of `adopt`, docs/PROTOCOL.md §6).
    pub args: Vec<OsString>,
    /// Inherited as fd [`BACKEND_DISK_FD`](crate::BACKEND_DISK_FD); the
    /// supervisor closes its copy once the process is started, so that the
    /// instance holds the only references. `None` for a class without a
    /// device file (a NIC).
    pub device_file: Option<File>,
    /// What fencing the instance must wait for after it is reaped; `None`
    /// when nothing it did can land later (a read-only disk, a NIC).
    pub io_fence: Option<IoFence>,
}
