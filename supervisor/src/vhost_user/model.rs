//! What a vhost-user frontend sees of a device — its virtio model — as
//! the device's class defines it (docs/ARCHITECTURE.md §8). The handler
//! keeps the vhost-user protocol (memory, vrings, in-flight region,
//! start/stop); the model answers the few requests whose answer is the
//! device's: features, queue count, config space.

use std::fs::File;

use vhost::vhost_user::VhostUserProtocolFeatures;

/// A virtio device model: virtio-blk ([`BlkGeometry`]) or virtio-net
/// (`class::net::NetModel`).
///
/// [`BlkGeometry`]: super::BlkGeometry
pub trait VirtioModel: Send + Sync + std::fmt::Debug {
    /// Virtio features offered in `GET_FEATURES`, including
    /// `VHOST_USER_F_PROTOCOL_FEATURES`.
    fn features(&self) -> u64;
    /// Protocol features offered in `GET_PROTOCOL_FEATURES`.
    fn protocol_features(&self) -> VhostUserProtocolFeatures;
    /// Virtqueues the device has (`GET_QUEUE_NUM`, the vrings a frontend
    /// may configure, the in-flight region's limit).
    fn num_queues(&self) -> u16;
    /// `GET_CONFIG`: `size` bytes of the config space from `offset`;
    /// `None` for a range outside it.
    fn read_config(&self, offset: u32, size: u32) -> Option<Vec<u8>>;
    /// `GET_CONFIG` in a driver session with device state area `state`
    /// (a model that [keeps one](Self::keeps_device_state)): a config
    /// field the driver may change (a vif's MAC) is read from it.
    fn read_config_in(&self, offset: u32, size: u32, _state: &File) -> Option<Vec<u8>> {
        self.read_config(offset, size)
    }
    /// The fewest started queues a session runs with: one for a disk;
    /// virtio-net needs its receive and its transmit queue, and a VMM
    /// (or our test client) may start them one after the other.
    fn min_queues(&self) -> u16 {
        1
    }
    /// Whether a queue the VMM set up but disabled (`SET_VRING_ENABLE 0`)
    /// may stay out of the session, which then starts without it: a
    /// vif's queue pairs beyond the first (QEMU enables only the pairs
    /// its driver uses) and its control queue. For a disk every queue
    /// the VMM set up is waited for.
    fn may_stay_disabled(&self, _index: u16) -> bool {
        false
    }
    /// Whether the device keeps what a driver sets at run time (a NIC's
    /// control-queue state) in an area that outlives its backends; the
    /// handler then creates one per driver session with
    /// [`reset_device_state`](Self::reset_device_state).
    fn keeps_device_state(&self) -> bool {
        false
    }
    /// Writes the device's state after a reset, for a driver that acked
    /// `features`, into the fresh memfd `file`.
    fn reset_device_state(&self, _file: File, _features: u64) -> Result<(), String> {
        Ok(())
    }
}
