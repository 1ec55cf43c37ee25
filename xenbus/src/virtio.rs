//! `attach-virtio`: how the supervisor hands a vhost-user device's virtqueues
//! to a backend process (docs/ARCHITECTURE.md §8, docs/PROTOCOL.md §6b).
//!
//! The supervisor terminates the vhost-user socket and keeps everything the
//! VMM sent; a backend instance receives it in one message, re-sent to every
//! instance that takes over:
//!
//! ```text
//! attach-virtio
//! frontend=<name>              for logs
//! features=<hex u64>           virtio features the driver acked
//! regions=<n>                  guest memory regions
//! region-<i>=<gpa>,<size>,<mmap_offset>      (hex)
//! queues=<n>                   started virtqueues
//! queue-<i>=<index>,<size>,<desc>,<avail>,<used>,<next_avail>   (hex)
//! inflight=<mmap_size>,<mmap_offset>,<queue_size>   (hex; absent: none)
//! wire=<tap|cable>             a vif's wire (absent: none)
//! wire-queues=<n>              its descriptors: one per TAP queue (absent: 1)
//! queue-pairs=<n>              a vif's max_virtqueue_pairs (absent: 1)
//! device-state=1               a device state area follows (absent: none)
//! shadow=<0|1>                 one shadow log per queue follows
//! recover=<0|1>, blame=<0|1>   as for `attach`
//! ```
//!
//! Descriptors, in order: one memfd per region, then `kick`, `call` per
//! queue, then the in-flight region (if `inflight`), the wire's (if `wire`),
//! the device state area (if `device-state`), then one shadow log per
//! queue (if `shadow=1`). [`VirtioAttachRequest::fd_count`] gives the total.
//! Addresses are guest-physical; the supervisor translates the VMM's
//! user addresses (`SET_VRING_ADDR`) before sending.

use std::os::fd::OwnedFd;

use crate::protocol::{key, kind};
use crate::{Message, XenbusError};

/// Message kind of the supervisor → backend virtio attach
/// ([`kind::ATTACH_VIRTIO`]).
pub const ATTACH_VIRTIO: &str = kind::ATTACH_VIRTIO;
/// Most memory regions (vhost-user's limit without `CONFIGURE_MEM_SLOTS`).
pub const MAX_REGIONS: usize = 8;
/// Most virtqueues per device.
pub const MAX_QUEUES: usize = 16;
/// Largest split virtqueue.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Most receive/transmit queue pairs of a vif: with its control queue,
/// as many virtqueues as an attach carries.
pub const MAX_QUEUE_PAIRS: u16 = ((MAX_QUEUES - 1) / 2) as u16;

/// One guest memory region: guest-physical `[gpa, gpa + size)` lives at
/// `mmap_offset` in its memfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    pub gpa: u64,
    pub size: u64,
    pub mmap_offset: u64,
}

/// One started split virtqueue; ring addresses are guest-physical.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// Virtqueue index in the device.
    pub index: u16,
    /// Descriptor count (a power of two).
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// `SET_VRING_BASE`: the next avail index to consume when no shadow log
    /// or in-flight region says otherwise.
    pub next_avail: u16,
}

/// The VMM's in-flight region (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`),
/// in QEMU's split-ring layout: one region per queue, `queue_size`
/// descriptor states each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InflightConfig {
    pub mmap_size: u64,
    pub mmap_offset: u64,
    pub queue_size: u16,
}

/// The `attach-virtio` message, without its descriptors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtioAttachRequest {
    pub frontend: String,
    pub features: u64,
    pub regions: Vec<MemoryRegion>,
    pub queues: Vec<QueueConfig>,
    pub inflight: Option<InflightConfig>,
    /// A vif's wire (`wire=tap` or `wire=cable`, docs/PROTOCOL.md §6b):
    /// its descriptor follows the in-flight region's. `None` for a disk.
    pub wire: Option<String>,
    /// Descriptors of the wire: one per queue of a multi-queue TAP
    /// (`wire-queues`), 1 for a cable or a single-queue TAP; 0 without a
    /// wire.
    pub wire_queues: u16,
    /// The vif's `max_virtqueue_pairs` (`queue-pairs`, 1 to
    /// [`MAX_QUEUE_PAIRS`]; 1 for a disk).
    pub queue_pairs: u16,
    /// A device state area follows the wire (`device-state=1`): a memfd
    /// the supervisor keeps for the connection, in which a virtio-net
    /// backend keeps what the driver set on the control queue
    /// (`shadowback_virtio::net_state`).
    pub device_state: bool,
    /// One shadow log per queue follows the other descriptors.
    pub shadow: bool,
}

/// `attach-virtio`'s key naming a vif's wire descriptor.
pub const KEY_WIRE: &str = "wire";
/// `attach-virtio`'s key counting the wire's descriptors.
pub const KEY_WIRE_QUEUES: &str = "wire-queues";
/// `attach-virtio`'s key giving a vif's `max_virtqueue_pairs`.
pub const KEY_QUEUE_PAIRS: &str = "queue-pairs";
/// `attach-virtio`'s key saying a device state area follows.
pub const KEY_DEVICE_STATE: &str = "device-state";

fn hex_list(msg: &Message, key: &str, n: usize) -> Result<Vec<u64>, XenbusError> {
    let raw = msg.require(key)?;
    let bad = |reason| XenbusError::InvalidValue {
        key: key.to_owned(),
        value: raw.to_owned(),
        reason,
    };
    let vals = raw
        .split(',')
        .map(|v| u64::from_str_radix(v, 16))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad("expected comma-separated hex numbers"))?;
    if vals.len() != n {
        return Err(bad("wrong number of fields"));
    }
    Ok(vals)
}

fn count(msg: &Message, key: &str, max: usize) -> Result<usize, XenbusError> {
    let n = msg.require_u64(key)?;
    usize::try_from(n)
        .ok()
        .filter(|&n| n <= max)
        .ok_or_else(|| XenbusError::InvalidValue {
            key: key.to_owned(),
            value: n.to_string(),
            reason: "too many",
        })
}

fn narrow<T: TryFrom<u64>>(key: &str, v: u64) -> Result<T, XenbusError> {
    T::try_from(v).map_err(|_| XenbusError::InvalidValue {
        key: key.to_owned(),
        value: format!("{v:x}"),
        reason: "field out of range",
    })
}

impl VirtioAttachRequest {
    /// Descriptors that travel with the message.
    pub fn fd_count(&self) -> usize {
        let queues = self.queues.len();
        self.regions.len()
            + 2 * queues
            + usize::from(self.inflight.is_some())
            + usize::from(self.wire_queues)
            + usize::from(self.device_state)
            + if self.shadow { queues } else { 0 }
    }

    /// The message (without `recover`/`blame`, which the caller adds).
    pub fn to_message(&self) -> Message {
        let mut msg = Message::new(ATTACH_VIRTIO)
            .with(key::FRONTEND, &self.frontend)
            .with(key::FEATURES, format!("{:x}", self.features))
            .with(key::REGIONS, self.regions.len())
            .with(key::QUEUES, self.queues.len())
            .with(key::SHADOW, u8::from(self.shadow));
        for (i, r) in self.regions.iter().enumerate() {
            msg.set(
                &key::region(i),
                format!("{:x},{:x},{:x}", r.gpa, r.size, r.mmap_offset),
            );
        }
        for (i, q) in self.queues.iter().enumerate() {
            msg.set(
                &key::queue_at(i),
                format!(
                    "{:x},{:x},{:x},{:x},{:x},{:x}",
                    q.index, q.size, q.desc, q.avail, q.used, q.next_avail
                ),
            );
        }
        if let Some(f) = self.inflight {
            msg.set(
                key::INFLIGHT,
                format!("{:x},{:x},{:x}", f.mmap_size, f.mmap_offset, f.queue_size),
            );
        }
        if let Some(wire) = &self.wire {
            msg.set(KEY_WIRE, wire);
            if self.wire_queues != 1 {
                msg.set(KEY_WIRE_QUEUES, self.wire_queues);
            }
        }
        if self.queue_pairs != 1 {
            msg.set(KEY_QUEUE_PAIRS, self.queue_pairs);
        }
        if self.device_state {
            msg.set(KEY_DEVICE_STATE, 1);
        }
        msg
    }

    /// Parses and bounds-checks the message (counts, field widths, queue
    /// sizes); it does not check addresses against memory.
    pub fn from_message(msg: &Message) -> Result<Self, XenbusError> {
        msg.expect_kind(ATTACH_VIRTIO)?;
        let features_raw = msg.require(key::FEATURES)?;
        let features =
            u64::from_str_radix(features_raw, 16).map_err(|_| XenbusError::InvalidValue {
                key: key::FEATURES.into(),
                value: features_raw.to_owned(),
                reason: "expected a hex number",
            })?;
        let mut regions = Vec::new();
        for i in 0..count(msg, key::REGIONS, MAX_REGIONS)? {
            let v = hex_list(msg, &key::region(i), 3)?;
            regions.push(MemoryRegion {
                gpa: v[0],
                size: v[1],
                mmap_offset: v[2],
            });
        }
        let mut queues = Vec::new();
        for i in 0..count(msg, key::QUEUES, MAX_QUEUES)? {
            let name = key::queue_at(i);
            let v = hex_list(msg, &name, 6)?;
            let size: u16 = narrow(&name, v[1])?;
            if !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
                return Err(XenbusError::InvalidValue {
                    key: name,
                    value: size.to_string(),
                    reason: "queue size must be a power of two up to 32768",
                });
            }
            queues.push(QueueConfig {
                index: narrow(&name, v[0])?,
                size,
                desc: v[2],
                avail: v[3],
                used: v[4],
                next_avail: narrow(&name, v[5])?,
            });
        }
        let inflight = match msg.get(key::INFLIGHT) {
            None => None,
            Some(_) => {
                let v = hex_list(msg, key::INFLIGHT, 3)?;
                Some(InflightConfig {
                    mmap_size: v[0],
                    mmap_offset: v[1],
                    queue_size: narrow(key::INFLIGHT, v[2])?,
                })
            }
        };
        let wire = msg.get(KEY_WIRE).map(str::to_owned);
        let pairs = |key: &str, default: u16| -> Result<u16, XenbusError> {
            let n = match msg.get(key) {
                None => return Ok(default),
                Some(_) => msg.require_u64(key)?,
            };
            u16::try_from(n)
                .ok()
                .filter(|n| (1..=MAX_QUEUE_PAIRS).contains(n))
                .ok_or_else(|| XenbusError::InvalidValue {
                    key: key.to_owned(),
                    value: n.to_string(),
                    reason: "1 to 7",
                })
        };
        let wire_queues = match wire {
            Some(_) => pairs(KEY_WIRE_QUEUES, 1)?,
            None => 0,
        };
        Ok(Self {
            frontend: msg.require(key::FRONTEND)?.to_owned(),
            features,
            regions,
            queues,
            inflight,
            wire,
            wire_queues,
            queue_pairs: pairs(KEY_QUEUE_PAIRS, 1)?,
            device_state: msg.get_flag(KEY_DEVICE_STATE)?.unwrap_or(false),
            shadow: msg.require_flag(key::SHADOW)?,
        })
    }
}

/// The descriptors of an `attach-virtio`, split by role.
#[derive(Debug)]
pub struct VirtioFds {
    /// One memfd per [`VirtioAttachRequest::regions`] entry.
    pub regions: Vec<OwnedFd>,
    /// Per queue: `(kick, call)` eventfds.
    pub queues: Vec<(OwnedFd, OwnedFd)>,
    pub inflight: Option<OwnedFd>,
    /// A vif's wire: [`VirtioAttachRequest::wire_queues`] descriptors.
    pub wire: Vec<OwnedFd>,
    /// The device state area, when [`VirtioAttachRequest::device_state`].
    pub device_state: Option<OwnedFd>,
    /// Per queue, when `shadow`.
    pub logs: Vec<OwnedFd>,
}

impl VirtioFds {
    /// Splits the received descriptors; a wrong count is
    /// [`XenbusError::FdCount`].
    pub fn from_received(
        req: &VirtioAttachRequest,
        fds: Vec<OwnedFd>,
    ) -> Result<Self, XenbusError> {
        if fds.len() != req.fd_count() {
            return Err(XenbusError::FdCount {
                kind: ATTACH_VIRTIO.to_owned(),
                expected: req.fd_count(),
                got: fds.len(),
            });
        }
        let mut it = fds.into_iter();
        let regions = it.by_ref().take(req.regions.len()).collect();
        let mut queues = Vec::with_capacity(req.queues.len());
        for _ in 0..req.queues.len() {
            let (Some(kick), Some(call)) = (it.next(), it.next()) else {
                unreachable!("count checked above");
            };
            queues.push((kick, call));
        }
        let inflight = if req.inflight.is_some() {
            it.next()
        } else {
            None
        };
        let wire = it.by_ref().take(usize::from(req.wire_queues)).collect();
        let device_state = if req.device_state { it.next() } else { None };
        let logs = it.collect();
        Ok(Self {
            regions,
            queues,
            inflight,
            wire,
            device_state,
            logs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VirtioAttachRequest {
        VirtioAttachRequest {
            frontend: "qemu".into(),
            features: 0x1_3000_0a54,
            regions: vec![
                MemoryRegion {
                    gpa: 0,
                    size: 0xa0000,
                    mmap_offset: 0,
                },
                MemoryRegion {
                    gpa: 0x10_0000,
                    size: 0x3ff0_0000,
                    mmap_offset: 0x10_0000,
                },
            ],
            queues: (0..MAX_QUEUES as u16)
                .map(|i| QueueConfig {
                    index: i,
                    size: 256,
                    desc: 0x1000 * u64::from(i),
                    avail: 0x2000,
                    used: 0x3000,
                    next_avail: 65535 - i,
                })
                .collect(),
            inflight: Some(InflightConfig {
                mmap_size: 0x4000,
                mmap_offset: 0,
                queue_size: 256,
            }),
            wire: Some("tap".into()),
            wire_queues: 4,
            queue_pairs: 4,
            device_state: true,
            shadow: true,
        }
    }

    #[test]
    fn round_trips_and_counts_fds() {
        let req = sample();
        let msg = req.to_message();
        msg.encode().expect("fits one datagram");
        assert_eq!(VirtioAttachRequest::from_message(&msg).unwrap(), req);
        assert_eq!(req.fd_count(), 2 + 32 + 1 + 4 + 1 + 16);
        let mut plain = req.clone();
        plain.device_state = false;
        let msg = plain.to_message();
        assert_eq!(msg.get(KEY_DEVICE_STATE), None);
        assert_eq!(VirtioAttachRequest::from_message(&msg).unwrap(), plain);
    }

    #[test]
    fn rejects_bad_fields() {
        let mut msg = sample().to_message();
        msg.set("queue-3", "3,300,0,0,0,0");
        assert!(VirtioAttachRequest::from_message(&msg).is_err());
        let mut msg = sample().to_message();
        msg.set("queue-3", "3,100,0,0,0");
        assert!(VirtioAttachRequest::from_message(&msg).is_err());
        let mut msg = sample().to_message();
        msg.set("queue-3", "10000,100,0,0,0,0");
        assert!(VirtioAttachRequest::from_message(&msg).is_err());
        let mut msg = sample().to_message();
        msg.set("queues", 17);
        assert!(VirtioAttachRequest::from_message(&msg).is_err());
        let mut msg = sample().to_message();
        msg.set("region-1", "zz,0,0");
        assert!(VirtioAttachRequest::from_message(&msg).is_err());
        for (key, value) in [
            ("wire-queues", "0"),
            ("wire-queues", "8"),
            ("queue-pairs", "0"),
        ] {
            let mut msg = sample().to_message();
            msg.set(key, value);
            assert!(
                VirtioAttachRequest::from_message(&msg).is_err(),
                "{key}={value}"
            );
        }
    }
}
