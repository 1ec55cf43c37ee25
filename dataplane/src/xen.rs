//! One Xen back ring as the generic loop's ring sets use it
//! (docs/ARCHITECTURE.md §11.2), whatever its `sring` protocol (blkif,
//! netif TX, netif RX): taking requests without asking for a kick,
//! `RING_FINAL_CHECK_FOR_REQUESTS` before the loop sleeps, responses put
//! and published with `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`, and a saved
//! response written again at its planned index (§7.5). Requests are
//! copied off the ring: their grants stay the frontend's until answered.

use shadowback_ring::sring::{BackRing, RingPages, RingProtocol};
use shadowback_ring::RingError;
use shadowback_shadow::{plan_recovery, LogSnapshot, RecoveryPlan, ShadowLog};
use shadowback_xenbus::protocol::ErrorCode;

use crate::recovery::POISON_THRESHOLD;

/// A ring's recovery plan and its log as the dead instance left it.
pub type Planned = (RecoveryPlan, LogSnapshot);

/// Attaches a back ring: with `recover` and a shadow log, where the log's
/// recovery plan resumes (docs/ARCHITECTURE.md §7.5; the plan is logged
/// before anything else), else where the shared ring stands.
pub fn attach_ring<P: RingProtocol>(
    log: Option<&ShadowLog>,
    recover: bool,
    pages: RingPages,
) -> Result<(BackRing<P>, Option<Planned>), (ErrorCode, String)> {
    let inval = |e: &dyn std::fmt::Display| (ErrorCode::Einval, e.to_string());
    let ring_err = |e: RingError| inval(&e);
    let Some(log) = log.filter(|_| recover) else {
        return Ok((BackRing::<P>::attach(pages).map_err(ring_err)?, None));
    };
    let probe = BackRing::<P>::attach(pages.clone()).map_err(ring_err)?;
    let rsp_prod = probe.shared_rsp_prod().map_err(ring_err)?;
    let req_prod = probe.shared_req_prod().map_err(ring_err)?;
    let snapshot = log.snapshot().map_err(|e| inval(&e))?;
    let plan = plan_recovery(
        &snapshot,
        rsp_prod,
        req_prod,
        probe.size(),
        POISON_THRESHOLD,
    )
    .map_err(|e| (ErrorCode::Eproto, format!("recovery impossible: {e}")))?;
    log.log_recovered(&plan).map_err(|e| inval(&e))?;
    let ring = BackRing::<P>::attach_at(pages, plan.req_cons, plan.rsp_prod).map_err(ring_err)?;
    Ok((ring, Some((plan, snapshot))))
}

/// One attached back ring and what the loop needs to know of it.
pub struct XenRing<P: RingProtocol> {
    ring: BackRing<P>,
    /// Requests the last look at the ring found, not taken yet.
    pending: u32,
    /// Responses put but not published.
    unpublished: bool,
    /// The last publish asked for a notification.
    notify_due: bool,
}

impl<P: RingProtocol> XenRing<P> {
    pub fn new(ring: BackRing<P>) -> Self {
        XenRing {
            ring,
            pending: 0,
            unpublished: false,
            notify_due: false,
        }
    }

    /// Entries of the ring.
    pub fn size(&self) -> u32 {
        self.ring.size()
    }

    /// Requests published and not taken yet (looks at the ring when the
    /// last look's are all taken); `Err` when the guest broke the ring.
    pub fn available(&mut self) -> Result<u32, String> {
        if self.pending == 0 {
            self.pending = self.ring.unconsumed_requests().map_err(|e| e.to_string())?;
        }
        Ok(self.pending)
    }

    /// The next request and its ring index; `None` when there is none.
    /// Asks for no kick.
    pub fn take(&mut self) -> Result<Option<(u32, P::Request)>, String> {
        if self.available()? == 0 {
            return Ok(None);
        }
        let taken = self.ring.take_request().map_err(|e| e.to_string())?;
        self.pending -= 1;
        Ok(Some(taken))
    }

    /// `RING_FINAL_CHECK_FOR_REQUESTS`; an error is reported by the next
    /// take.
    pub fn has_requests(&mut self) -> bool {
        self.ring.final_check_for_requests().unwrap_or(true)
    }

    /// `RING_HAS_UNCONSUMED_REQUESTS`: `req_event` stays where it is, so a
    /// frontend that checks it does not kick.
    pub fn peek_requests(&mut self) -> bool {
        self.pending > 0 || self.ring.unconsumed_requests().map_or(true, |n| n > 0)
    }

    /// Requests published and not taken yet, looked up afresh (one load
    /// of `req_prod`); 0 when the guest broke the ring (the next take
    /// says so).
    pub fn requests_left(&self) -> u32 {
        self.ring
            .unconsumed_requests()
            .unwrap_or(0)
            .max(self.pending)
    }

    /// Writes a response, unpublished; returns its ring index.
    pub fn put(&mut self, rsp: &P::Response) -> Result<u32, String> {
        let idx = self.ring.put_response(rsp).map_err(|e| e.to_string())?;
        self.unpublished = true;
        Ok(idx)
    }

    /// `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`: the index up to which
    /// responses are visible, `None` when nothing was put.
    pub fn publish(&mut self) -> Result<Option<u32>, String> {
        if !self.unpublished {
            return Ok(None);
        }
        self.unpublished = false;
        self.notify_due = self.ring.push_responses().map_err(|e| e.to_string())?;
        Ok(Some(self.ring.rsp_prod_pvt()))
    }

    /// Whether the last publish found the guest asking for a notification.
    pub fn published(&mut self) -> bool {
        self.notify_due
    }

    pub fn unpublished(&self) -> bool {
        self.unpublished
    }

    /// Writes a saved response again; it must land at `planned`.
    pub fn repush(&mut self, rsp: &P::Response, planned: u32) -> Result<(), String> {
        let idx = self.put(rsp)?;
        if idx != planned {
            return Err(format!("re-push landed at {idx}, planned {planned}"));
        }
        Ok(())
    }
}
