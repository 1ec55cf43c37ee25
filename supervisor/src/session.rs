//! What of an attachment must outlive its backend (DESIGN §1): the
//! frontend's descriptors, its attach request and the shadow log(s), and a
//! read-only view of the ring(s) for the watchdog — for a Xen-style shared
//! ring ([`XenSession`]) or a vhost-user device's virtqueues
//! ([`VirtioSession`]). The device task sees only [`Session`].

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use shadowback_ring::blkif::Blkif;
use shadowback_ring::grant::{Access, GrantMapper};
use shadowback_ring::sring::{ring_size, RingProtocol};
use shadowback_ring::SharedRegion;
use shadowback_shadow::ShadowLog;
use shadowback_xenbus::protocol::{key, AttachRequest, DeviceFds, ErrorCode};
use shadowback_xenbus::virtio::{VirtioAttachRequest, VirtioFds};
use shadowback_xenbus::Message;

use crate::vhost_user::memory::{MemoryTable, RegionDesc};

type Refusal = (ErrorCode, String);

/// Offsets of the shared indices in `struct X_sring` (`xen/io/ring.h`).
const REQ_PROD: u64 = 0;
const RSP_PROD: u64 = 8;

/// The shared ring's producer indices, read from the supervisor's own
/// mapping of the guest's region.
#[derive(Debug)]
pub struct RingProbe {
    region: Arc<SharedRegion>,
    /// Byte offset of the first ring page (the `ring.h` header).
    sring: u64,
}

impl RingProbe {
    /// Maps `fds.region` and resolves the first ring page through the grant
    /// table, under the same rules as the backend (read access is enough).
    pub fn new(fds: &DeviceFds, req: &AttachRequest, backend_id: u16) -> Result<Self, String> {
        let fd = fds.region.try_clone().map_err(|e| e.to_string())?;
        let region = Arc::new(SharedRegion::from_fd(fd).map_err(|e| e.to_string())?);
        let grants = GrantMapper::new(region.clone(), req.connect.grant_frames, backend_id)
            .map_err(|e| e.to_string())?;
        let first = *req.connect.ring_refs.first().ok_or("no ring-ref")?;
        let sring = grants
            .map(first, Access::Read)
            .map_err(|e| format!("ring grant: {e}"))?;
        Ok(RingProbe { region, sring })
    }

    /// Shared `(req_prod, rsp_prod)`.
    pub fn indices(&self) -> Option<(u32, u32)> {
        // Acquire pairs with the release stores of RING_PUSH_REQUESTS (guest)
        // and RING_PUSH_RESPONSES (backend): nothing newer is needed, the
        // values only have to be ones the producers published.
        let req_prod = self.region.load(self.sring + REQ_PROD, Ordering::Acquire);
        let rsp_prod = self.region.load(self.sring + RSP_PROD, Ordering::Acquire);
        Some((req_prod.ok()?, rsp_prod.ok()?))
    }

    /// Whether the guest has requests without responses
    /// (`req_prod != rsp_prod`); `None` if the ring cannot be read.
    pub fn pending(&self) -> Option<bool> {
        self.indices().map(|(req, rsp)| req != rsp)
    }
}

/// One attachment with the shadow layer: everything a replacement backend
/// needs to take over without the guest noticing.
#[derive(Debug)]
pub enum Session {
    Xen(XenSession),
    Virtio(VirtioSession),
}

impl Session {
    /// The attach message; `recover` once any instance has seen the log.
    pub fn attach_message(&self, recover: bool) -> Result<Message, Refusal> {
        let msg = match self {
            Session::Xen(s) => s
                .req
                .to_message()
                .map_err(|e| (ErrorCode::Einval, e.to_string()))?,
            Session::Virtio(s) => s.req.to_message(),
        };
        Ok(if recover {
            msg.with(key::RECOVER, 1)
        } else {
            msg
        })
    }

    /// The descriptors that travel with the attach message, in its order.
    pub fn attach_fds(&self) -> Vec<BorrowedFd<'_>> {
        match self {
            Session::Xen(s) => s.attach_fds().to_vec(),
            Session::Virtio(s) => s.attach_fds(),
        }
    }

    /// The log whose heartbeat the watchdog reads (a virtio device's
    /// queue 0).
    pub fn log(&self) -> &ShadowLog {
        match self {
            Session::Xen(s) => &s.log,
            Session::Virtio(s) => &s.logs[0],
        }
    }

    /// Whether the frontend has requests without responses; `None` if
    /// the ring(s) cannot be read.
    pub fn pending(&self) -> Option<bool> {
        match self {
            Session::Xen(s) => s.probe.as_ref().and_then(RingProbe::pending),
            Session::Virtio(s) => s.pending(),
        }
    }
}

/// A Xen-style shared ring's attachment.
#[derive(Debug)]
pub struct XenSession {
    /// The validated request, re-sent to every instance.
    pub req: AttachRequest,
    /// The supervisor's own copies of the guest's region and eventfds.
    pub fds: DeviceFds,
    /// The ring's shadow log, created before the first `attach`.
    pub log: ShadowLog,
    /// For the watchdog; `None` if the ring cannot be resolved (then the
    /// backend refuses the attach anyway, or no hang is ever declared).
    pub probe: Option<RingProbe>,
}

impl XenSession {
    /// Creates the shadow log sized for the request's ring.
    pub fn new(
        req: AttachRequest,
        fds: DeviceFds,
        backend_id: u16,
    ) -> Result<Self, (ErrorCode, String)> {
        let order = req
            .connect
            .ring_page_order()
            .ok_or((ErrorCode::Einval, "bad ring page count".to_string()))?;
        let slots = ring_size(1 << order, <Blkif as RingProtocol>::ENTRY_SIZE);
        let log = ShadowLog::create(slots)
            .map_err(|e| (ErrorCode::Enodev, format!("creating the shadow log: {e}")))?;
        let probe = match RingProbe::new(&fds, &req, backend_id) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(frontend = %req.frontend, error = %e, "ring not readable: no hang detection");
                None
            }
        };
        Ok(XenSession {
            req,
            fds,
            log,
            probe,
        })
    }

    /// `[region, kick, notify, log]`, the descriptors of `attach`.
    pub fn attach_fds(&self) -> [BorrowedFd<'_>; 4] {
        let [region, kick, notify] = self.fds.as_borrowed();
        [region, kick, notify, self.log.file().as_fd()]
    }
}

/// Offsets of `idx` in `struct vring_avail` and `struct vring_used`.
const AVAIL_IDX: u64 = 2;
const USED_IDX: u64 = 2;

/// A vhost-user device's attachment: the VMM's memory and eventfds as the
/// vhost-user handler passed them on, one shadow log per queue.
#[derive(Debug)]
pub struct VirtioSession {
    /// Re-sent to every instance; `shadow` is set.
    pub req: VirtioAttachRequest,
    /// The supervisor's own copies; `fds.logs` is unused (see `logs`).
    fds: VirtioFds,
    /// One per queue, in `req.queues` order, created with the session.
    logs: Vec<ShadowLog>,
    /// The guest memory, read with `pread` for the watchdog; `None` if it
    /// could not be set up (then no hang is ever declared).
    memory: Option<MemoryTable>,
}

impl VirtioSession {
    /// Checks that the descriptors match the request and creates one shadow
    /// log per queue, sized for its ring.
    pub fn new(mut req: VirtioAttachRequest, fds: VirtioFds) -> Result<Self, Refusal> {
        let einval = |why: String| (ErrorCode::Einval, why);
        if req.queues.is_empty() {
            return Err(einval("no started virtqueue".into()));
        }
        if fds.regions.len() != req.regions.len()
            || fds.queues.len() != req.queues.len()
            || fds.inflight.is_some() != req.inflight.is_some()
        {
            return Err(einval("descriptors do not match the request".into()));
        }
        req.shadow = true;
        let logs = req
            .queues
            .iter()
            .map(|q| ShadowLog::create(u32::from(q.size)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| (ErrorCode::Enodev, format!("creating a shadow log: {e}")))?;
        let memory = fds
            .regions
            .iter()
            .map(|fd| fd.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())
            .and_then(|dups| {
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
                MemoryTable::new(regions, dups).map_err(|e| e.to_string())
            });
        let memory = match memory {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(frontend = %req.frontend, error = %e, "guest memory not readable: no hang detection");
                None
            }
        };
        Ok(VirtioSession {
            req,
            fds,
            logs,
            memory,
        })
    }

    /// Region memfds, `kick`, `call` per queue, the in-flight region, one
    /// log per queue: the descriptors of `attach-virtio`.
    pub fn attach_fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut v: Vec<BorrowedFd<'_>> = self.fds.regions.iter().map(AsFd::as_fd).collect();
        for (kick, call) in &self.fds.queues {
            v.push(kick.as_fd());
            v.push(call.as_fd());
        }
        v.extend(self.fds.inflight.as_ref().map(AsFd::as_fd));
        v.extend(self.logs.iter().map(|l| l.file().as_fd()));
        v
    }

    /// Keeps `fd` as virtqueue `index`'s call eventfd, for every later
    /// instance.
    pub fn set_call(&mut self, index: u16, fd: OwnedFd) -> Result<(), Refusal> {
        let pos = self
            .req
            .queues
            .iter()
            .position(|q| q.index == index)
            .ok_or((
                ErrorCode::Einval,
                format!("virtqueue {index} is not running"),
            ))?;
        self.fds.queues[pos].1 = fd;
        Ok(())
    }

    /// Some queue has `avail->idx != used->idx`; `None` if no queue can be
    /// read.
    pub fn pending(&self) -> Option<bool> {
        let memory = self.memory.as_ref()?;
        let mut readable = false;
        for q in &self.req.queues {
            let idx =
                |gpa: u64, off: u64| gpa.checked_add(off).and_then(|a| memory.read_u16(a).ok());
            if let (Some(avail), Some(used)) = (idx(q.avail, AVAIL_IDX), idx(q.used, USED_IDX)) {
                if avail != used {
                    return Some(true);
                }
                readable = true;
            }
        }
        readable.then_some(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadowback_ring::grant::GrantTable;
    use shadowback_xenbus::ConnectRequest;

    const BACKEND: u16 = 3;

    fn eventfd() -> std::os::fd::OwnedFd {
        nix::sys::eventfd::EventFd::from_value_and_flags(
            0,
            nix::sys::eventfd::EfdFlags::EFD_CLOEXEC,
        )
        .unwrap()
        .into()
    }

    /// A guest region of 4 pages: grant table, ring page at frame 1 (ref 8).
    fn guest() -> (Arc<SharedRegion>, AttachRequest, DeviceFds) {
        let region = Arc::new(SharedRegion::create("test-guest", 4).unwrap());
        let table = GrantTable::new(region.clone(), 1).unwrap();
        table.grant(8, BACKEND, 1, false).unwrap();
        let req = AttachRequest {
            frontend: "fe1".into(),
            connect: ConnectRequest {
                device: "xvda".into(),
                frontend_id: 1,
                ring_refs: vec![8],
                grant_frames: 1,
                feature_persistent: false,
            },
        };
        let fds = DeviceFds {
            region: region.file().try_clone().unwrap().into(),
            kick: eventfd(),
            notify: eventfd(),
        };
        (region, req, fds)
    }

    #[test]
    fn probe_reads_the_shared_indices() {
        let (region, req, fds) = guest();
        let xen = XenSession::new(req, fds, BACKEND).unwrap();
        assert_eq!(xen.log.entries(), 32, "one ring page holds 32 slots");
        let session = Session::Xen(xen);
        let Session::Xen(xen) = &session else {
            unreachable!()
        };
        let probe = xen.probe.as_ref().expect("ring resolved");
        assert_eq!(probe.pending(), Some(false));
        region.store(5u32, 4096, Ordering::Release).unwrap();
        assert_eq!(probe.indices(), Some((5, 0)));
        assert_eq!(probe.pending(), Some(true));
        region.store(5u32, 4096 + 8, Ordering::Release).unwrap();
        assert_eq!(probe.pending(), Some(false));
        assert_eq!(session.pending(), Some(false));
        let msg = session.attach_message(true).unwrap();
        assert_eq!(msg.get(key::RECOVER), Some("1"));
        assert_eq!(
            session.attach_message(false).unwrap().get(key::RECOVER),
            None
        );
        assert_eq!(session.attach_fds().len(), 4);
    }

    #[test]
    fn probe_obeys_the_grant_rules() {
        let (_region, req, fds) = guest();
        // Granted to another domain: no probe, but the session still works.
        let session = XenSession::new(req, fds, BACKEND + 1).unwrap();
        assert!(session.probe.is_none());
    }

    mod virtio {
        use super::*;
        use crate::vhost_user::memory::tests::memfd;
        use shadowback_xenbus::virtio::{MemoryRegion, QueueConfig, ATTACH_VIRTIO};
        use std::fs::File;
        use std::os::unix::fs::FileExt;

        /// Two queues of 128 and 256 in one region at gpa 0x10000 (file
        /// offset 0x1000).
        fn session() -> (Session, File) {
            let guest = File::from(memfd(0x20000));
            let queue = |index: u16, size, base: u64| QueueConfig {
                index,
                size,
                desc: base,
                avail: base + 0x1000,
                used: base + 0x2000,
                next_avail: 0,
            };
            let req = VirtioAttachRequest {
                frontend: "vmm".into(),
                features: 1 << 32,
                regions: vec![MemoryRegion {
                    gpa: 0x10000,
                    size: 0x10000,
                    mmap_offset: 0x1000,
                }],
                queues: vec![queue(0, 128, 0x10000), queue(1, 256, 0x18000)],
                inflight: None,
                shadow: false,
            };
            let fds = VirtioFds {
                regions: vec![guest.try_clone().unwrap().into()],
                queues: vec![(eventfd(), eventfd()), (eventfd(), eventfd())],
                inflight: None,
                logs: Vec::new(),
            };
            let session = Session::Virtio(VirtioSession::new(req, fds).unwrap());
            (session, guest)
        }

        #[test]
        fn pending_compares_avail_and_used_of_every_queue() {
            let (session, guest) = session();
            let put = |gpa: u64, v: u16| {
                guest
                    .write_all_at(&v.to_le_bytes(), gpa - 0x10000 + 0x1000)
                    .unwrap()
            };
            assert_eq!(session.pending(), Some(false));
            put(0x18000 + 0x1000 + 2, 3); // queue 1 avail->idx
            assert_eq!(session.pending(), Some(true));
            put(0x18000 + 0x2000 + 2, 3); // queue 1 used->idx
            assert_eq!(session.pending(), Some(false));
            // The VMM truncated its memory: unknown, not a crash.
            guest.set_len(0).unwrap();
            assert_eq!(session.pending(), None);
        }

        #[test]
        fn logs_fds_and_message_follow_the_wire_order() {
            let (mut session, _guest) = session();
            let Session::Virtio(v) = &session else {
                unreachable!()
            };
            assert_eq!(v.logs.len(), 2);
            assert_eq!((v.logs[0].entries(), v.logs[1].entries()), (128, 256));
            assert_eq!(session.log().entries(), 128, "heartbeat of queue 0");
            assert_eq!(session.attach_fds().len(), v.req.fd_count());
            assert_eq!(session.attach_fds().len(), 1 + 4 + 2);
            let msg = session.attach_message(true).unwrap();
            assert_eq!(msg.kind(), ATTACH_VIRTIO);
            assert_eq!(msg.get(key::SHADOW), Some("1"));
            assert_eq!(msg.get(key::RECOVER), Some("1"));
            let Session::Virtio(v) = &mut session else {
                unreachable!()
            };
            assert!(v.set_call(1, eventfd()).is_ok());
            assert!(v.set_call(2, eventfd()).is_err());
        }

        #[test]
        fn mismatched_descriptors_are_refused() {
            let req = VirtioAttachRequest {
                frontend: "vmm".into(),
                features: 0,
                regions: Vec::new(),
                queues: Vec::new(),
                inflight: None,
                shadow: true,
            };
            let fds = || VirtioFds {
                regions: Vec::new(),
                queues: Vec::new(),
                inflight: None,
                logs: Vec::new(),
            };
            assert!(VirtioSession::new(req.clone(), fds()).is_err(), "no queue");
            let mut one = req;
            one.queues.push(QueueConfig {
                index: 0,
                size: 8,
                desc: 0,
                avail: 0,
                used: 0,
                next_avail: 0,
            });
            assert!(VirtioSession::new(one, fds()).is_err(), "no kick/call");
        }
    }
}
