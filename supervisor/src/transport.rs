//! How a frontend reaches a device — the transport — as the device task
//! sees it: the attach request and descriptors a frontend arrives with, the
//! rings they describe, and the attach message every backend instance gets
//! (docs/ARCHITECTURE.md §4, §8).
//!
//! Three frontends exist — a blkif ring, a netif ring pair and
//! virtqueues — and all are built, so [`Frontend`] is an enum and every
//! per-transport difference is a `match` in this module; the device task,
//! the session and recovery never look at the transport. What a device
//! class changes (the Xen keys, the virtio model) is not here but in
//! `class/`.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use shadowback_ring::blkif::Blkif;
use shadowback_ring::grant::{Access, GrantMapper};
use shadowback_ring::netif::{NET_RX_RING_SIZE, NET_TX_RING_SIZE};
use shadowback_ring::sring::{ring_size, RingProtocol};
use shadowback_ring::{SharedRegion, MAX_REGION_PAGES, PAGE_SIZE};
use shadowback_xenbus::netif::{NetAttachRequest, NetFds};
use shadowback_xenbus::protocol::{key, AttachRequest, DeviceFds, ErrorCode};
use shadowback_xenbus::virtio::{VirtioAttachRequest, VirtioFds};
use shadowback_xenbus::Message;

use crate::device::Refusal;
use crate::vhost_user::memory::{MemoryTable, RegionDesc};

/// `attach-net`'s key naming what the wire descriptor is
/// (docs/PROTOCOL.md §6c).
const KEY_WIRE: &str = "wire";
/// `attach-net`'s key saying a device state area follows the wire.
const KEY_DEVICE_STATE: &str = "device-state";

/// A vif's wire as one attachment holds it: duplicates of the fds the
/// supervisor keeps (a cable end, or every queue of a TAP), what they are
/// (`wire=cable` or `wire=tap`), and the vif's queue pairs.
#[derive(Debug)]
pub struct NetWire {
    pub kind: &'static str,
    pub fds: Vec<OwnedFd>,
    /// `max_virtqueue_pairs` of the vif (`[[nic]] queues`).
    pub pairs: u16,
}

impl NetWire {
    /// The one fd of a netif attachment (one TX/RX ring pair): the first
    /// TAP queue, attached, the others detached so that the kernel steers
    /// no flow to a queue nobody reads (docs/ARCHITECTURE.md §11.5).
    fn single(self) -> Result<OwnedFd, String> {
        let mut fds = self.fds.into_iter();
        let first = fds.next().ok_or("a wire without descriptor")?;
        let rest: Vec<OwnedFd> = fds.collect();
        if !rest.is_empty() {
            use shadowback_netback::wire::tap::set_queue_attached;
            set_queue_attached(first.as_fd(), true).map_err(|e| e.to_string())?;
            for fd in &rest {
                set_queue_attached(fd.as_fd(), false).map_err(|e| e.to_string())?;
            }
        }
        Ok(first)
    }
}

/// What a frontend attaches with.
#[derive(Debug)]
pub enum Frontend {
    /// A guest's Xen-style shared ring (the control socket's `connect`).
    Xen { req: AttachRequest, fds: DeviceFds },
    /// A guest's netif TX and RX rings (`connect` for a vif); `wire` is
    /// the device's, lent by its class before the session is made.
    Net {
        req: NetAttachRequest,
        fds: NetFds,
        wire: Option<NetWire>,
        /// The device state area of this attachment (the guest's
        /// multicast list), made with the wire and handed to every
        /// instance that serves it.
        state: Option<OwnedFd>,
        shadow: bool,
    },
    /// A VMM's virtqueues (the device's vhost-user socket); `fds.logs` is
    /// ignored: shadow logs are the session's. A vif's wire is lent into
    /// `req.wire` and `fds.wire` ([`Frontend::set_wire`]).
    Virtio {
        req: VirtioAttachRequest,
        fds: VirtioFds,
    },
}

impl Frontend {
    /// The frontend an attach message and its descriptors describe, as
    /// [`attach_message`](Self::attach_message) and
    /// [`attach_fds`](Self::attach_fds) made them (a live upgrade hands a
    /// session over in that form).
    pub fn from_attach(msg: &Message, mut fds: Vec<OwnedFd>) -> Result<Self, String> {
        use shadowback_xenbus::netif::ATTACH_NET;
        use shadowback_xenbus::protocol::kind;
        use shadowback_xenbus::virtio::ATTACH_VIRTIO;
        let text = |e: shadowback_xenbus::XenbusError| e.to_string();
        match msg.kind() {
            kind::ATTACH => Ok(Frontend::Xen {
                req: AttachRequest::from_message(msg).map_err(text)?,
                fds: DeviceFds::from_received(msg, fds).map_err(text)?,
            }),
            ATTACH_NET => {
                let req = NetAttachRequest::from_message(msg).map_err(text)?;
                // The device state area follows the wire, which follows
                // the rings' descriptors.
                let state = match msg.get_flag(KEY_DEVICE_STATE).map_err(text)? {
                    Some(true) => Some(fds.pop().ok_or("no device state area")?),
                    _ => None,
                };
                let wire_fd = fds.pop().ok_or("no wire descriptor")?;
                let kind = match msg.get(KEY_WIRE) {
                    Some(k) if k == crate::class::net::WIRE_CABLE => crate::class::net::WIRE_CABLE,
                    Some(k) if k == crate::class::net::WIRE_TAP => crate::class::net::WIRE_TAP,
                    other => return Err(format!("wire {other:?}")),
                };
                let fds = NetFds::from_received(msg, &req.connect, fds).map_err(text)?;
                Ok(Frontend::Net {
                    req,
                    fds,
                    wire: Some(NetWire {
                        kind,
                        fds: vec![wire_fd],
                        pairs: 1,
                    }),
                    state,
                    shadow: msg.get_flag(key::SHADOW).map_err(text)?.unwrap_or(true),
                })
            }
            ATTACH_VIRTIO => {
                let mut req = VirtioAttachRequest::from_message(msg).map_err(text)?;
                // The shadow logs are the session's, not among `fds`.
                let shadow = std::mem::replace(&mut req.shadow, false);
                let fds = VirtioFds::from_received(&req, fds).map_err(text)?;
                req.shadow = shadow;
                Ok(Frontend::Virtio { req, fds })
            }
            other => Err(format!("not an attach message: {other:?}")),
        }
    }

    /// Checks that the descriptors match the request.
    pub fn check(&self) -> Result<(), Refusal> {
        match self {
            // `DeviceFds::check` ran on the control socket already.
            Frontend::Xen { .. } => Ok(()),
            // So did `check_net_fds`; the wire must have been lent.
            Frontend::Net { wire, .. } => match wire {
                Some(_) => Ok(()),
                None => Err((ErrorCode::Enodev, "the vif has no wire".into())),
            },
            Frontend::Virtio { req, fds } => {
                let einval = |why: &str| Err((ErrorCode::Einval, why.to_string()));
                if req.queues.is_empty() {
                    return einval("no started virtqueue");
                }
                if fds.regions.len() != req.regions.len()
                    || fds.queues.len() != req.queues.len()
                    || fds.inflight.is_some() != req.inflight.is_some()
                    || fds.wire.len() != usize::from(req.wire_queues)
                    || fds.device_state.is_some() != req.device_state
                {
                    return einval("descriptors do not match the request");
                }
                Ok(())
            }
        }
    }

    /// Whether shadow logs travel with the attach message. Only
    /// `attach-virtio` says so in a key; a Xen backend started without
    /// `--no-shadow` always expects its log as the fourth descriptor.
    pub fn set_shadow(&mut self, shadow: bool) {
        match self {
            Frontend::Virtio { req, .. } => req.shadow = shadow,
            Frontend::Net { shadow: s, .. } => *s = shadow,
            Frontend::Xen { .. } => {}
        }
    }

    /// Gives a vif's attachment its wire, over netif rings (the first
    /// queue) or virtqueues (every queue); a no-op for a disk, whose class
    /// lends none.
    pub fn set_wire(&mut self, lent: Option<NetWire>) -> Result<(), Refusal> {
        let Some(lent) = lent else {
            return Ok(());
        };
        match self {
            Frontend::Net { wire, state, .. } => {
                *state = Some(net_state_area().map_err(|e| (ErrorCode::Enodev, e))?);
                let kind = lent.kind;
                let fd = lent.single().map_err(|e| (ErrorCode::Enodev, e))?;
                *wire = Some(NetWire {
                    kind,
                    fds: vec![fd],
                    pairs: 1,
                });
            }
            Frontend::Virtio { req, fds } => {
                req.wire = Some(lent.kind.to_string());
                req.wire_queues = u16::try_from(lent.fds.len())
                    .map_err(|_| (ErrorCode::Enodev, "too many wire queues".to_string()))?;
                req.queue_pairs = lent.pairs;
                fds.wire = lent.fds;
            }
            Frontend::Xen { .. } => {}
        }
        Ok(())
    }

    /// The sizes of the guest memory regions the frontend hands over, as
    /// a backend may map them: each vhost-user region's, or a Xen
    /// region's file size — which only `F_SEAL_GROW` keeps: a backend
    /// maps the whole file when it attaches, a takeover's included, so an
    /// unsealed region counts as the most a Xen region may be.
    pub fn guest_memory(&self) -> Result<Vec<u64>, Refusal> {
        use rustix::fs::{fcntl_get_seals, fstat, SealFlags};
        let most = u64::from(MAX_REGION_PAGES) * PAGE_SIZE as u64;
        let xen_region = |fd: &OwnedFd| {
            let grows = fcntl_get_seals(fd).map_or(true, |s| !s.contains(SealFlags::GROW));
            if grows {
                return Ok(most);
            }
            fstat(fd)
                .ok()
                .and_then(|st| u64::try_from(st.st_size).ok())
                .ok_or((ErrorCode::Einval, "region size unknown".to_string()))
        };
        match self {
            Frontend::Xen { fds, .. } => Ok(vec![xen_region(&fds.region)?]),
            Frontend::Net { fds, .. } => Ok(vec![xen_region(&fds.region)?]),
            Frontend::Virtio { req, .. } => Ok(req.regions.iter().map(|r| r.size).collect()),
        }
    }

    /// Slots of each ring's shadow log, in ring order (the order of the
    /// logs in the attach message).
    pub fn ring_slots(&self) -> Result<Vec<u32>, Refusal> {
        match self {
            Frontend::Xen { req, .. } => {
                let order = req
                    .connect
                    .ring_page_order()
                    .ok_or((ErrorCode::Einval, "bad ring page count".to_string()))?;
                Ok(vec![ring_size(
                    1 << order,
                    <Blkif as RingProtocol>::ENTRY_SIZE,
                )])
            }
            Frontend::Virtio { req, .. } => {
                Ok(req.queues.iter().map(|q| u32::from(q.size)).collect())
            }
            // One log per ring, TX then RX (docs/PROTOCOL.md §6c).
            Frontend::Net { .. } => Ok(vec![NET_TX_RING_SIZE, NET_RX_RING_SIZE]),
        }
    }

    /// A read-only view of each ring for the watchdog, in ring order; a
    /// ring that cannot be read gets `None` (then no hang is ever declared
    /// on it, and a Xen backend refuses such a ring anyway).
    pub fn ring_probes(&self, backend_id: u16) -> Vec<Option<RingProbe>> {
        match self {
            // Only TX says whether the guest waits for the backend: RX
            // requests are buffers posted for frames that may never come,
            // so unanswered ones are the idle state, not pending work.
            Frontend::Net { req, fds, .. } => {
                let tx = RingProbe::granted(
                    &fds.region,
                    req.connect.grant_frames,
                    req.connect.tx_ring_ref,
                    backend_id,
                );
                match tx {
                    Ok(p) => vec![Some(p), None],
                    Err(e) => {
                        tracing::warn!(frontend = %req.frontend, error = %e, "TX ring not readable: no hang detection");
                        vec![None, None]
                    }
                }
            }
            Frontend::Xen { req, fds } => match RingProbe::shared(fds, req, backend_id) {
                Ok(p) => vec![Some(p)],
                Err(e) => {
                    tracing::warn!(frontend = %req.frontend, error = %e, "ring not readable: no hang detection");
                    vec![None]
                }
            },
            // A virtio-net receive queue (even index) holds buffers posted
            // for frames that may never come: as for netif RX, not pending
            // work.
            Frontend::Virtio { req, fds } => match guest_memory(req, fds) {
                Ok(memory) => req
                    .queues
                    .iter()
                    .map(|q| {
                        let receive = req.wire.is_some() && q.index % 2 == 0;
                        (!receive).then(|| RingProbe::Split {
                            memory: memory.clone(),
                            avail: q.avail,
                            used: q.used,
                        })
                    })
                    .collect(),
                Err(e) => {
                    tracing::warn!(frontend = %req.frontend, error = %e, "guest memory not readable: no hang detection");
                    req.queues.iter().map(|_| None).collect()
                }
            },
        }
    }

    /// The attach message, without `recover` and `blame`.
    pub fn attach_message(&self) -> Result<Message, Refusal> {
        match self {
            Frontend::Xen { req, .. } => req
                .to_message()
                .map_err(|e| (ErrorCode::Einval, e.to_string())),
            Frontend::Virtio { req, .. } => Ok(req.to_message()),
            Frontend::Net {
                req,
                wire,
                state,
                shadow,
                ..
            } => {
                let wire = wire
                    .as_ref()
                    .ok_or((ErrorCode::Enodev, "the vif has no wire".to_string()))?;
                let mut msg = req
                    .to_message()
                    .with(KEY_WIRE, wire.kind)
                    .with(key::SHADOW, u8::from(*shadow));
                if state.is_some() {
                    msg.set(KEY_DEVICE_STATE, 1);
                }
                Ok(msg)
            }
        }
    }

    /// The frontend's descriptors in message order; shadow logs, if any,
    /// follow them.
    pub fn attach_fds(&self) -> Vec<BorrowedFd<'_>> {
        match self {
            Frontend::Xen { fds, .. } => fds.as_borrowed().to_vec(),
            Frontend::Net {
                fds, wire, state, ..
            } => {
                let mut v = fds.as_borrowed();
                v.extend(wire.iter().flat_map(|w| w.fds.iter().map(AsFd::as_fd)));
                v.extend(state.as_ref().map(AsFd::as_fd));
                v
            }
            Frontend::Virtio { fds, .. } => {
                let mut v: Vec<BorrowedFd<'_>> = fds.regions.iter().map(AsFd::as_fd).collect();
                for (kick, call) in &fds.queues {
                    v.push(kick.as_fd());
                    v.push(call.as_fd());
                }
                v.extend(fds.inflight.as_ref().map(AsFd::as_fd));
                v.extend(fds.wire.iter().map(AsFd::as_fd));
                v.extend(fds.device_state.as_ref().map(AsFd::as_fd));
                v
            }
        }
    }

    /// The descriptors of [`attach_fds`](Self::attach_fds), owned.
    pub fn into_fds(self) -> Vec<OwnedFd> {
        match self {
            Frontend::Xen { fds, .. } => vec![fds.region, fds.kick, fds.notify],
            Frontend::Net {
                fds, wire, state, ..
            } => {
                let mut v = vec![fds.region, fds.tx.kick, fds.tx.notify];
                if let Some(rx) = fds.rx {
                    v.extend([rx.kick, rx.notify]);
                }
                v.extend(wire.into_iter().flat_map(|w| w.fds));
                v.extend(state);
                v
            }
            Frontend::Virtio { fds, .. } => {
                let mut v = fds.regions;
                for (kick, call) in fds.queues {
                    v.push(kick);
                    v.push(call);
                }
                v.extend(fds.inflight);
                v.extend(fds.wire);
                v.extend(fds.device_state);
                v
            }
        }
    }

    /// Keeps a duplicate of `fd` as virtqueue `index`'s call eventfd, for
    /// every later instance.
    pub fn set_call(&mut self, index: u16, fd: &OwnedFd) -> Result<(), Refusal> {
        let Frontend::Virtio { req, fds } = self else {
            return Err((ErrorCode::Einval, "not a virtio session".into()));
        };
        let copy = fd
            .try_clone()
            .map_err(|e| (ErrorCode::Enodev, format!("dup: {e}")))?;
        let pos = req.queues.iter().position(|q| q.index == index).ok_or((
            ErrorCode::Einval,
            format!("virtqueue {index} is not running"),
        ))?;
        fds.queues[pos].1 = copy;
        Ok(())
    }

    /// Whether the frontend goes on with the rings after a detach: a
    /// vhost-user VMM does (`GET_VRING_BASE`, a new memory table; it
    /// resumes at `used->idx`), so what a backend consumed must be
    /// answered before the detach completes (docs/ARCHITECTURE.md §8).
    pub fn resumes_after_detach(&self) -> bool {
        matches!(self, Frontend::Virtio { .. })
    }
}

/// A netif attachment's device state area (docs/PROTOCOL.md §6c): the
/// layout of `shadowback_virtio::net_state`, an empty multicast list, made
/// once per guest connection so every backend instance serving it filters
/// by the same list.
fn net_state_area() -> Result<OwnedFd, String> {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    use shadowback_virtio::net_state::{NetDeviceState, NetStateArea};
    let fd = memfd_create(c"shadowback-vif-state", MemFdCreateFlag::MFD_CLOEXEC)
        .map_err(|e| format!("device state memfd: {e}"))?;
    let file = std::fs::File::from(fd);
    let copy = file.try_clone().map_err(|e| format!("dup: {e}"))?;
    NetStateArea::create(copy, &NetDeviceState::netif()).map_err(|e| e.to_string())?;
    Ok(OwnedFd::from(file))
}

/// The guest memory of a virtio frontend, for reading ring indices.
fn guest_memory(req: &VirtioAttachRequest, fds: &VirtioFds) -> Result<Arc<MemoryTable>, String> {
    let dups = fds
        .regions
        .iter()
        .map(|fd| fd.try_clone())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let regions = req
        .regions
        .iter()
        .map(|r| RegionDesc {
            gpa: r.gpa,
            size: r.size,
            user_addr: r.gpa,
            mmap_offset: r.mmap_offset,
        })
        .collect();
    MemoryTable::new(regions, dups)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// Offsets of the shared indices in `struct X_sring` (`xen/io/ring.h`).
const REQ_PROD: u64 = 0;
const RSP_PROD: u64 = 8;
/// Offsets of `idx` in `struct vring_avail` and `struct vring_used`.
const AVAIL_IDX: u64 = 2;
const USED_IDX: u64 = 2;

/// One ring's producer indices, read from the supervisor's own view of the
/// frontend's memory: whether the frontend waits for answers.
#[derive(Debug)]
pub enum RingProbe {
    /// A `ring.h` shared ring in the guest's region: `req_prod` and
    /// `rsp_prod`, through the supervisor's mapping.
    Shared {
        region: Arc<SharedRegion>,
        /// Byte offset of the ring page (the `ring.h` header).
        sring: u64,
    },
    /// A split virtqueue: `avail->idx` and `used->idx` at guest-physical
    /// addresses, read with `pread` (a VMM that truncates its memfd costs
    /// an error, not a SIGBUS).
    Split {
        memory: Arc<MemoryTable>,
        avail: u64,
        used: u64,
    },
}

impl RingProbe {
    /// Maps `fds.region` and resolves the first ring page through the grant
    /// table, under the same rules as the backend (read access is enough).
    pub fn shared(fds: &DeviceFds, req: &AttachRequest, backend_id: u16) -> Result<Self, String> {
        let first = *req.connect.ring_refs.first().ok_or("no ring-ref")?;
        Self::granted(&fds.region, req.connect.grant_frames, first, backend_id)
    }

    /// Maps `region` and resolves ring page `gref` through its grant
    /// table of `grant_frames` frames (read access is enough).
    pub fn granted(
        region: &OwnedFd,
        grant_frames: u32,
        gref: u32,
        backend_id: u16,
    ) -> Result<Self, String> {
        let fd = region.try_clone().map_err(|e| e.to_string())?;
        let region = Arc::new(SharedRegion::from_fd(fd).map_err(|e| e.to_string())?);
        let grants = GrantMapper::new(region.clone(), grant_frames, backend_id)
            .map_err(|e| e.to_string())?;
        let sring = grants
            .map(gref, Access::Read)
            .map_err(|e| format!("ring grant: {e}"))?;
        Ok(RingProbe::Shared { region, sring })
    }

    /// The producer indices `(requests, responses)`; `None` if the ring
    /// cannot be read.
    pub fn indices(&self) -> Option<(u32, u32)> {
        match self {
            RingProbe::Shared { region, sring } => {
                // Acquire pairs with the release stores of
                // RING_PUSH_REQUESTS (guest) and RING_PUSH_RESPONSES
                // (backend): nothing newer is needed, the values only have
                // to be ones the producers published.
                let req_prod = region.load(sring + REQ_PROD, Ordering::Acquire);
                let rsp_prod = region.load(sring + RSP_PROD, Ordering::Acquire);
                Some((req_prod.ok()?, rsp_prod.ok()?))
            }
            RingProbe::Split {
                memory,
                avail,
                used,
            } => {
                let idx =
                    |gpa: u64, off: u64| gpa.checked_add(off).and_then(|a| memory.read_u16(a).ok());
                let (avail, used) = (idx(*avail, AVAIL_IDX)?, idx(*used, USED_IDX)?);
                Some((u32::from(avail), u32::from(used)))
            }
        }
    }

    /// Whether the frontend has requests without responses; `None` if
    /// the ring cannot be read.
    pub fn pending(&self) -> Option<bool> {
        self.indices().map(|(req, rsp)| req != rsp)
    }
}

/// Checks a vif's `connect` descriptors as `DeviceFds::check` does a
/// disk's (docs/ARCHITECTURE.md §4): the region as
/// [`check_region`](shadowback_xenbus::protocol::check_region) wants it,
/// every other descriptor an eventfd.
pub fn check_net_fds(fds: &NetFds, grant_frames: u32) -> Result<(), Refusal> {
    use shadowback_xenbus::protocol::{check_region, is_eventfd};

    check_region(fds.region.as_fd(), grant_frames)
        .map_err(|e| (ErrorCode::Einval, e.to_string()))?;
    for (index, fd) in fds.as_borrowed().into_iter().enumerate().skip(1) {
        if !is_eventfd(fd).unwrap_or(false) {
            return Err((ErrorCode::Einval, format!("fd {index}: not an eventfd")));
        }
    }
    Ok(())
}
