//! What of an attachment must outlive its backend (docs/ARCHITECTURE.md
//! §1, §7): the frontend's request and descriptors ([`Frontend`]), and per
//! ring — one for a blkif, two for a netif, one per started virtqueue — its
//! shadow log and a read-only probe of its indices for the watchdog.
//!
//! The session does not know its transport: everything that differs
//! between a Xen ring and virtqueues is asked of the [`Frontend`].

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use shadowback_shadow::ShadowLog;
use shadowback_xenbus::protocol::{key, ErrorCode};
use shadowback_xenbus::Message;

use crate::device::Refusal;
use crate::transport::{Frontend, RingProbe};
use crate::upgrade::{Adopted, Handover, SessionState};
use crate::SupervisorError;

/// One ring of a session.
#[derive(Debug)]
pub struct Ring {
    /// Created with the session, handed to every instance.
    pub log: ShadowLog,
    /// `None` if the ring cannot be read (no hang is declared on it).
    pub probe: Option<RingProbe>,
}

/// One attachment with the shadow layer: everything a replacement backend
/// needs to take over without the frontend noticing.
#[derive(Debug)]
pub struct Session {
    /// Re-sent to every instance; the supervisor's own copies of the
    /// descriptors.
    frontend: Frontend,
    /// In the order of the attach message's logs; never empty.
    rings: Vec<Ring>,
}

impl Session {
    /// Checks the frontend's descriptors and creates one shadow log per
    /// ring, sized for it. `backend_id` is the domain a Xen ring's grants
    /// must name.
    pub fn new(mut frontend: Frontend, backend_id: u16) -> Result<Self, Refusal> {
        frontend.check()?;
        frontend.set_shadow(true);
        let logs = frontend
            .ring_slots()?
            .into_iter()
            .map(ShadowLog::create)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| (ErrorCode::Enodev, format!("creating a shadow log: {e}")))?;
        Self::with_logs(frontend, logs, backend_id)
            .ok_or((ErrorCode::Einval, "no ring".to_string()))
    }

    /// The session of `frontend` with `logs`, one per ring; `None` without
    /// a ring.
    fn with_logs(frontend: Frontend, logs: Vec<ShadowLog>, backend_id: u16) -> Option<Self> {
        let rings = logs
            .into_iter()
            .zip(frontend.ring_probes(backend_id))
            .map(|(log, probe)| Ring { log, probe })
            .collect::<Vec<_>>();
        (!rings.is_empty()).then_some(Session { frontend, rings })
    }

    /// The session for a live upgrade: its attach message (without
    /// `recover`), the frontend's descriptors and the logs.
    pub fn handover(&self, fds: &mut Handover) -> Result<SessionState, String> {
        let message = self
            .frontend
            .attach_message()
            .map_err(|(_, why)| why)
            .and_then(|m| m.encode().map_err(|e| e.to_string()))?;
        Ok(SessionState {
            message: String::from_utf8(message).map_err(|e| e.to_string())?,
            fds: self
                .frontend
                .attach_fds()
                .into_iter()
                .map(|fd| fds.fd(fd))
                .collect(),
            logs: self.rings.iter().map(|r| fds.fd(r.log.file())).collect(),
        })
    }

    /// The session a previous binary handed over (its checks passed when
    /// it was made); the probes are made again.
    pub fn adopt(
        state: &SessionState,
        fds: &Adopted,
        backend_id: u16,
    ) -> Result<Self, SupervisorError> {
        let err = |why: String| SupervisorError::Runtime(format!("upgrade state: session: {why}"));
        let msg = shadowback_xenbus::Message::decode(state.message.as_bytes())
            .map_err(|e| err(e.to_string()))?;
        let frontend_fds = state
            .fds
            .iter()
            .map(|&fd| fds.fd(fd))
            .collect::<Result<Vec<_>, _>>()?;
        let frontend = Frontend::from_attach(&msg, frontend_fds).map_err(err)?;
        let logs = state
            .logs
            .iter()
            .map(|&fd| {
                fds.fd(fd)
                    .and_then(|fd| ShadowLog::open(fd).map_err(|e| err(e.to_string())))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::with_logs(frontend, logs, backend_id).ok_or_else(|| err("no ring".into()))
    }

    /// The rings, in message order.
    #[cfg(test)]
    pub fn rings(&self) -> &[Ring] {
        &self.rings
    }

    /// The attach message; `recover` once any instance has seen the logs.
    pub fn attach_message(&self, recover: bool) -> Result<Message, Refusal> {
        let msg = self.frontend.attach_message()?;
        Ok(if recover {
            msg.with(key::RECOVER, 1)
        } else {
            msg
        })
    }

    /// The descriptors that travel with the attach message, in its order:
    /// the frontend's, then one log per ring.
    pub fn attach_fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = self.frontend.attach_fds();
        fds.extend(self.rings.iter().map(|r| r.log.file().as_fd()));
        fds
    }

    /// The log whose heartbeat the watchdog reads (the first ring's: one
    /// backend process serves them all and beats in each).
    pub fn log(&self) -> &ShadowLog {
        &self.rings[0].log
    }

    /// Whether some ring has requests without responses; `None` if no ring
    /// can be read.
    pub fn pending(&self) -> Option<bool> {
        let mut readable = false;
        for ring in &self.rings {
            match ring.probe.as_ref().and_then(RingProbe::pending) {
                Some(true) => return Some(true),
                Some(false) => readable = true,
                None => {}
            }
        }
        readable.then_some(false)
    }

    /// Keeps `fd` (duplicated) as virtqueue `queue`'s call eventfd for
    /// every later instance; refused for a transport without one.
    pub fn set_call(&mut self, queue: u16, fd: &OwnedFd) -> Result<(), Refusal> {
        self.frontend.set_call(queue, fd)
    }

    /// See [`Frontend::resumes_after_detach`].
    pub fn resumes_after_detach(&self) -> bool {
        self.frontend.resumes_after_detach()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadowback_ring::grant::GrantTable;
    use shadowback_ring::SharedRegion;
    use shadowback_xenbus::protocol::{AttachRequest, DeviceFds};
    use shadowback_xenbus::ConnectRequest;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

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
    fn guest() -> (Arc<SharedRegion>, Frontend) {
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
        (region, Frontend::Xen { req, fds })
    }

    #[test]
    fn probe_reads_the_shared_indices() {
        let (region, frontend) = guest();
        let session = Session::new(frontend, BACKEND).unwrap();
        assert_eq!(session.rings().len(), 1);
        assert_eq!(session.log().entries(), 32, "one ring page holds 32 slots");
        let probe = session.rings()[0].probe.as_ref().expect("ring resolved");
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
        let (_region, frontend) = guest();
        // Granted to another domain: no probe, but the session still works.
        let mut session = Session::new(frontend, BACKEND + 1).unwrap();
        assert!(session.rings()[0].probe.is_none());
        assert_eq!(session.pending(), None);
        assert!(!session.resumes_after_detach());
        assert!(
            session.set_call(0, &eventfd()).is_err(),
            "a Xen ring has no call fd"
        );
    }

    mod virtio {
        use super::*;
        use crate::vhost_user::memory::tests::memfd;
        use shadowback_xenbus::virtio::{
            MemoryRegion, QueueConfig, VirtioAttachRequest, VirtioFds, ATTACH_VIRTIO,
        };
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
                wire: None,
                wire_queues: 0,
                queue_pairs: 1,
                device_state: false,
                shadow: false,
            };
            let fds = VirtioFds {
                regions: vec![guest.try_clone().unwrap().into()],
                queues: vec![(eventfd(), eventfd()), (eventfd(), eventfd())],
                inflight: None,
                wire: Vec::new(),
                device_state: None,
                logs: Vec::new(),
            };
            let session = Session::new(Frontend::Virtio { req, fds }, 0).unwrap();
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
            let rings = session.rings();
            assert_eq!(rings.len(), 2);
            assert_eq!((rings[0].log.entries(), rings[1].log.entries()), (128, 256));
            assert_eq!(session.log().entries(), 128, "heartbeat of queue 0");
            assert_eq!(session.attach_fds().len(), 1 + 4 + 2);
            let req =
                VirtioAttachRequest::from_message(&session.attach_message(false).unwrap()).unwrap();
            assert_eq!(session.attach_fds().len(), req.fd_count());
            assert!(session.resumes_after_detach());
            let msg = session.attach_message(true).unwrap();
            assert_eq!(msg.kind(), ATTACH_VIRTIO);
            assert_eq!(msg.get(key::SHADOW), Some("1"));
            assert_eq!(msg.get(key::RECOVER), Some("1"));
            assert!(session.set_call(1, &eventfd()).is_ok());
            assert!(session.set_call(2, &eventfd()).is_err());
        }

        #[test]
        fn mismatched_descriptors_are_refused() {
            let req = VirtioAttachRequest {
                frontend: "vmm".into(),
                features: 0,
                regions: Vec::new(),
                queues: Vec::new(),
                inflight: None,
                wire: None,
                wire_queues: 0,
                queue_pairs: 1,
                device_state: false,
                shadow: true,
            };
            let fds = || VirtioFds {
                regions: Vec::new(),
                queues: Vec::new(),
                inflight: None,
                wire: Vec::new(),
                device_state: None,
                logs: Vec::new(),
            };
            let session = |req, fds| Session::new(Frontend::Virtio { req, fds }, 0);
            assert!(session(req.clone(), fds()).is_err(), "no queue");
            let mut one = req;
            one.queues.push(QueueConfig {
                index: 0,
                size: 8,
                desc: 0,
                avail: 0,
                used: 0,
                next_avail: 0,
            });
            assert!(session(one, fds()).is_err(), "no kick/call");
        }
    }
}
