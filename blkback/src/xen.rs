//! The Xen back ring as a [`RingSet`] of one ring (docs/ARCHITECTURE.md
//! §3, §11.2): requests are copied off the ring and logged verbatim, so a
//! replay re-executes the saved bytes (their grants stay the frontend's
//! until answered); slots are the backend's, never the guest's.

use shadowback_dataplane::rings::{Detail, Record, RingSet, Taken};
use shadowback_dataplane::xen;
use shadowback_ring::blkif::{Blkif, BlkifRequest, BlkifResponse};
use shadowback_ring::sring::BackRing;
use shadowback_ring::EventChannel;
use shadowback_shadow::{Repush, REQUEST_SIZE, RESPONSE_SIZE};
use vm_memory::ByteValued;

/// One attached blkif ring and its event channels.
pub struct XenRing {
    ring: xen::XenRing<Blkif>,
    kick: EventChannel,
    notify: EventChannel,
}

impl XenRing {
    pub fn new(ring: BackRing<Blkif>, kick: EventChannel, notify: EventChannel) -> Self {
        XenRing {
            ring: xen::XenRing::new(ring),
            kick,
            notify,
        }
    }
}

/// A blkif response from its 16 saved bytes.
pub fn response_from(bytes: &[u8; RESPONSE_SIZE]) -> BlkifResponse {
    let mut rsp = BlkifResponse::default();
    rsp.as_mut_slice().copy_from_slice(bytes);
    rsp
}

impl RingSet for XenRing {
    type Request = BlkifRequest;
    type Response = BlkifResponse;
    const MAX_RINGS: usize = 1;
    const BREAK_ENDS_ATTACHMENT: bool = true;
    const WAKE_ON_ATTACH: bool = false;

    fn count(&self) -> usize {
        1
    }

    fn size(&self, _ring: usize) -> u32 {
        self.ring.size()
    }

    fn kick(&self, _ring: usize) -> &EventChannel {
        &self.kick
    }

    fn notify(&self, _ring: usize) -> Result<(), String> {
        self.notify.notify().map_err(|e| e.to_string())
    }

    fn notify_channel(&self, _ring: usize) -> &EventChannel {
        &self.notify
    }

    fn label(&self, _ring: usize) -> Option<u16> {
        None
    }

    fn take(&mut self, _ring: usize) -> Result<Option<Taken<BlkifRequest>>, String> {
        Ok(self.ring.take()?.map(|(idx, req)| Taken {
            request: req,
            log_index: idx,
            cost: 1,
        }))
    }

    fn has_requests(&mut self, _ring: usize) -> bool {
        self.ring.has_requests()
    }

    fn peek_requests(&mut self, _ring: usize) -> bool {
        self.ring.peek_requests()
    }

    fn begin(&mut self, _ring: usize, _req: &BlkifRequest) {}

    fn reload(&mut self, _ring: usize, _req: &BlkifRequest) {}

    fn put(&mut self, _ring: usize, rsp: &BlkifResponse) -> Result<u32, String> {
        self.ring.put(rsp)
    }

    fn publish(&mut self, _ring: usize) -> Result<Option<u32>, String> {
        self.ring.publish()
    }

    fn published(&mut self, _ring: usize) -> bool {
        self.ring.published()
    }

    fn unpublished(&self, _ring: usize) -> bool {
        self.ring.unpublished()
    }

    /// The request itself.
    fn request_record(&self, _ring: usize, req: &BlkifRequest, _detail: &Detail) -> Record {
        Record::new(req.as_slice())
    }

    fn response_record(&self, rsp: &BlkifResponse) -> Record {
        Record::new(rsp.as_slice())
    }

    fn locate(&self, _ring: usize, record: &[u8; REQUEST_SIZE]) -> Option<BlkifRequest> {
        let mut req = BlkifRequest::default();
        req.as_mut_slice().copy_from_slice(record);
        Some(req)
    }

    /// Slots are the backend's, not the guest's: nothing to collide.
    fn place(&self, _req: &BlkifRequest) -> Option<u16> {
        None
    }

    fn repush(&mut self, _ring: usize, r: &Repush) -> Result<Option<u16>, String> {
        self.ring.repush(&response_from(&r.response), r.rsp_idx)?;
        Ok(None)
    }

    fn describe(&self, req: &BlkifRequest) -> String {
        format!("id {}", req.id)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use shadowback_ring::sring::{FrontRing, RingPages};
    use shadowback_ring::SharedRegion;

    use super::*;

    /// A one-page ring with its front end.
    fn rings() -> (FrontRing<Blkif>, XenRing) {
        let region = Arc::new(SharedRegion::create("xen-ring-test", 1).unwrap());
        let pages = || RingPages::contiguous(region.clone(), 0, 1).unwrap();
        let front = FrontRing::init(pages()).unwrap();
        let back = BackRing::attach(pages()).unwrap();
        let ch = || EventChannel::new().unwrap();
        (front, XenRing::new(back, ch(), ch()))
    }

    /// Puts one request; whether the frontend must kick for it.
    fn post(front: &mut FrontRing<Blkif>, id: u64) -> bool {
        front
            .put_request(&BlkifRequest {
                id,
                ..Default::default()
            })
            .unwrap();
        front.push_requests().unwrap()
    }

    #[test]
    fn peeking_leaves_req_event_behind_and_only_the_final_check_asks_for_a_kick() {
        let (mut front, mut back) = rings();
        assert!(post(&mut front, 1), "the first request is kicked");
        assert!(back.peek_requests(0));
        assert!(back.take(0).unwrap().is_some());
        assert!(back.take(0).unwrap().is_none());
        // Busy or polling: the backend looks without asking for kicks.
        assert!(!back.peek_requests(0));
        assert!(!post(&mut front, 2), "kicked while the backend polls");
        assert!(back.peek_requests(0));
        assert!(back.take(0).unwrap().is_some());
        // About to sleep: the final check asks for the next one.
        assert!(!back.has_requests(0));
        assert!(post(&mut front, 3), "not kicked while the backend sleeps");
    }
}
