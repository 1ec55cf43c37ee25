//! The generic Xen shared ring of `xen/io/ring.h`.
//!
//! Layout of the shared pages: `req_prod, req_event, rsp_prod, rsp_event`
//! (u32 each, free-running), 48 bytes of padding (`pvt` + `__pad`), then the
//! entries — a union of request and response, the entry count the largest
//! power of two that fits the pages. [`FrontRing`] and [`BackRing`] keep the
//! private indices of `struct front_ring`/`struct back_ring`, and their
//! methods mirror the `RING_*` macros; each fence names the macro it
//! implements.
//!
//! Ring pages need not be contiguous in the region: a multi-page ring is
//! given as one frame per page (`ring-ref0..N`), and accesses that straddle
//! a page boundary are split.

use std::marker::PhantomData;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use vm_memory::ByteValued;

use crate::{RingError, SharedRegion, PAGE_SIZE};

/// Byte offset of the first entry (`offsetof(struct X_sring, ring)`).
pub const SRING_HEADER_SIZE: usize = 64;
const REQ_PROD: u64 = 0;
const REQ_EVENT: u64 = 4;
const RSP_PROD: u64 = 8;
const RSP_EVENT: u64 = 12;

/// Largest ring we map: order 8 (256 pages), beyond any protocol's limit.
pub const MAX_RING_PAGES: usize = 256;

/// Request and response types of one ring protocol (blkif, netif tx, …).
pub trait RingProtocol {
    type Request: ByteValued + Default;
    type Response: ByteValued + Default;
    /// `sizeof(union X_sring_entry)`.
    const ENTRY_SIZE: usize = max(
        std::mem::size_of::<Self::Request>(),
        std::mem::size_of::<Self::Response>(),
    );
}

const fn max(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}

/// `__CONST_RING_SIZE`: entries of a ring of `pages` pages.
pub const fn ring_size(pages: usize, entry_size: usize) -> u32 {
    let n = (pages * PAGE_SIZE - SRING_HEADER_SIZE) / entry_size;
    // __RD32: round down to a power of two.
    if n == 0 {
        0
    } else {
        1 << (usize::BITS - 1 - n.leading_zeros())
    }
}

/// The pages of one ring inside a shared region.
#[derive(Debug, Clone)]
pub struct RingPages {
    region: Arc<SharedRegion>,
    /// Byte offset of each page in the region.
    pages: Vec<u64>,
}

impl RingPages {
    /// `page_offsets` are the region byte offsets of the ring's pages, in
    /// ring order (each page-aligned and inside the region).
    pub fn new(region: Arc<SharedRegion>, page_offsets: Vec<u64>) -> Result<Self, RingError> {
        if page_offsets.is_empty() || page_offsets.len() > MAX_RING_PAGES {
            return Err(RingError::BadRingPages {
                got: page_offsets.len(),
                max: MAX_RING_PAGES,
            });
        }
        for &off in &page_offsets {
            if off % PAGE_SIZE as u64 != 0 || off >= region.len() {
                return Err(RingError::FrameOutOfRange {
                    frame: u32::try_from(off / PAGE_SIZE as u64).unwrap_or(u32::MAX),
                    pages: region.pages(),
                });
            }
        }
        Ok(RingPages {
            region,
            pages: page_offsets,
        })
    }

    /// `count` contiguous pages starting at `first_frame`.
    pub fn contiguous(
        region: Arc<SharedRegion>,
        first_frame: u32,
        count: usize,
    ) -> Result<Self, RingError> {
        let offsets = (0..count as u64)
            .map(|i| (u64::from(first_frame) + i) * PAGE_SIZE as u64)
            .collect();
        Self::new(region, offsets)
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Always false: a ring has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The region the ring lives in.
    pub fn region(&self) -> &Arc<SharedRegion> {
        &self.region
    }

    fn header(&self, field: u64) -> u64 {
        self.pages[0] + field
    }

    fn load(&self, field: u64, order: Ordering) -> Result<u32, RingError> {
        self.region.load(self.header(field), order)
    }

    fn store(&self, field: u64, val: u32, order: Ordering) -> Result<(), RingError> {
        self.region.store(val, self.header(field), order)
    }

    /// The pieces of `[off, off + len)` of the ring, split at page
    /// boundaries: `(region offset, range within the caller's buffer)`.
    fn pieces(
        &self,
        off: usize,
        len: usize,
    ) -> impl Iterator<Item = Result<(u64, std::ops::Range<usize>), RingError>> + '_ {
        let mut done = 0;
        std::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let at = off + done;
            let (page, in_page) = (at / PAGE_SIZE, at % PAGE_SIZE);
            let n = (PAGE_SIZE - in_page).min(len - done);
            let piece = self
                .pages
                .get(page)
                .map(|base| (base + in_page as u64, done..done + n))
                .ok_or(RingError::BadRingPages {
                    got: page,
                    max: self.pages.len(),
                });
            done += n;
            Some(piece)
        })
    }

    /// Copies `buf.len()` bytes at ring offset `off`, splitting at pages.
    fn read(&self, off: usize, buf: &mut [u8]) -> Result<(), RingError> {
        for piece in self.pieces(off, buf.len()) {
            let (at, range) = piece?;
            self.region.read(at, &mut buf[range])?;
        }
        Ok(())
    }

    fn write(&self, off: usize, buf: &[u8]) -> Result<(), RingError> {
        for piece in self.pieces(off, buf.len()) {
            let (at, range) = piece?;
            self.region.write(at, &buf[range])?;
        }
        Ok(())
    }
}

/// Indices and entry access common to both halves.
#[derive(Debug, Clone)]
struct Shared<P> {
    pages: RingPages,
    size: u32,
    _proto: PhantomData<P>,
}

impl<P: RingProtocol> Shared<P> {
    fn new(pages: RingPages) -> Result<Self, RingError> {
        let size = ring_size(pages.len(), P::ENTRY_SIZE);
        if size == 0 {
            return Err(RingError::BadRingPages {
                got: pages.len(),
                max: MAX_RING_PAGES,
            });
        }
        Ok(Shared {
            pages,
            size,
            _proto: PhantomData,
        })
    }

    fn slot_offset(&self, idx: u32) -> usize {
        SRING_HEADER_SIZE + (idx & (self.size - 1)) as usize * P::ENTRY_SIZE
    }

    fn read_entry<T: ByteValued + Default>(&self, idx: u32) -> Result<T, RingError> {
        let mut val = T::default();
        self.pages.read(self.slot_offset(idx), val.as_mut_slice())?;
        Ok(val)
    }

    fn write_entry<T: ByteValued>(&self, idx: u32, val: &T) -> Result<(), RingError> {
        self.pages.write(self.slot_offset(idx), val.as_slice())
    }
}

/// The frontend's half (`struct front_ring`).
#[derive(Debug)]
pub struct FrontRing<P> {
    ring: Shared<P>,
    req_prod_pvt: u32,
    rsp_cons: u32,
}

impl<P: RingProtocol> FrontRing<P> {
    /// `SHARED_RING_INIT` + `FRONT_RING_INIT`: clears the header and
    /// padding, sets both event indices to 1.
    pub fn init(pages: RingPages) -> Result<Self, RingError> {
        let ring = Shared::<P>::new(pages)?;
        ring.pages.write(0, &[0u8; SRING_HEADER_SIZE])?;
        ring.pages.store(REQ_EVENT, 1, Ordering::Relaxed)?;
        ring.pages.store(RSP_EVENT, 1, Ordering::Relaxed)?;
        // Release: the backend mapping the ring later sees the initialised
        // header (it learns of the ring only through a later syscall anyway).
        fence(Ordering::Release);
        Ok(FrontRing {
            ring,
            req_prod_pvt: 0,
            rsp_cons: 0,
        })
    }

    /// `RING_SIZE`.
    pub fn size(&self) -> u32 {
        self.ring.size
    }

    /// `RING_FREE_REQUESTS`.
    pub fn free_requests(&self) -> u32 {
        self.ring
            .size
            .wrapping_sub(self.req_prod_pvt.wrapping_sub(self.rsp_cons))
    }

    /// Private request producer index.
    pub fn req_prod_pvt(&self) -> u32 {
        self.req_prod_pvt
    }

    /// Writes `req` into the next free slot (not yet visible to the backend
    /// until [`push_requests`](Self::push_requests)). Returns its index.
    pub fn put_request(&mut self, req: &P::Request) -> Result<u32, RingError> {
        if self.free_requests() == 0 {
            return Err(RingError::RingFull);
        }
        let idx = self.req_prod_pvt;
        self.ring.write_entry(idx, req)?;
        self.req_prod_pvt = idx.wrapping_add(1);
        Ok(idx)
    }

    /// `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`: publishes queued requests and
    /// returns whether the backend asked to be notified.
    pub fn push_requests(&mut self) -> Result<bool, RingError> {
        let old = self.ring.pages.load(REQ_PROD, Ordering::Relaxed)?;
        let new = self.req_prod_pvt;
        // Release = xen_wmb(): the backend sees requests before req_prod.
        self.ring.pages.store(REQ_PROD, new, Ordering::Release)?;
        // xen_mb(): the backend sees the new req_prod before we read req_event.
        fence(Ordering::SeqCst);
        let event = self.ring.pages.load(REQ_EVENT, Ordering::Relaxed)?;
        Ok(new.wrapping_sub(event) < new.wrapping_sub(old))
    }

    /// `RING_HAS_UNCONSUMED_RESPONSES`, validated with
    /// `RING_RESPONSE_PROD_OVERFLOW`.
    pub fn unconsumed_responses(&self) -> Result<u32, RingError> {
        // Acquire = the xen_rmb() after reading rsp_prod: responses are read
        // only after the index that published them.
        let rsp_prod = self.ring.pages.load(RSP_PROD, Ordering::Acquire)?;
        let n = rsp_prod.wrapping_sub(self.rsp_cons);
        if n > self.req_prod_pvt.wrapping_sub(self.rsp_cons) || n > self.ring.size {
            return Err(RingError::ResponseOverflow {
                rsp_prod,
                rsp_cons: self.rsp_cons,
                size: self.ring.size,
            });
        }
        Ok(n)
    }

    /// Takes the next response (`RING_COPY_RESPONSE`), if one is published.
    pub fn take_response(&mut self) -> Result<Option<P::Response>, RingError> {
        if self.unconsumed_responses()? == 0 {
            return Ok(None);
        }
        let rsp = self.ring.read_entry(self.rsp_cons)?;
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        Ok(Some(rsp))
    }

    /// `RING_FINAL_CHECK_FOR_RESPONSES`: before sleeping, ask to be notified
    /// of the next response and re-check. True means work is pending.
    pub fn final_check_for_responses(&mut self) -> Result<bool, RingError> {
        if self.unconsumed_responses()? > 0 {
            return Ok(true);
        }
        self.ring
            .pages
            .store(RSP_EVENT, self.rsp_cons.wrapping_add(1), Ordering::Relaxed)?;
        // xen_mb(): rsp_event is visible before we re-read rsp_prod.
        fence(Ordering::SeqCst);
        Ok(self.unconsumed_responses()? > 0)
    }
}

/// The backend's half (`struct back_ring`).
#[derive(Debug)]
pub struct BackRing<P> {
    ring: Shared<P>,
    req_cons: u32,
    rsp_prod_pvt: u32,
}

impl<P: RingProtocol> BackRing<P> {
    /// `BACK_RING_ATTACH` at the shared `rsp_prod`: what a backend does on
    /// connect (0 for a fresh ring) — every request the guest published
    /// after that point is unconsumed.
    pub fn attach(pages: RingPages) -> Result<Self, RingError> {
        let ring = Shared::<P>::new(pages)?;
        let rsp_prod = ring.pages.load(RSP_PROD, Ordering::Acquire)?;
        Ok(BackRing {
            ring,
            req_cons: rsp_prod,
            rsp_prod_pvt: rsp_prod,
        })
    }

    /// `BACK_RING_ATTACH` at explicit indices (recovery from a shadow log).
    pub fn attach_at(
        pages: RingPages,
        req_cons: u32,
        rsp_prod_pvt: u32,
    ) -> Result<Self, RingError> {
        let ring = Shared::<P>::new(pages)?;
        if req_cons.wrapping_sub(rsp_prod_pvt) > ring.size {
            return Err(RingError::RequestOverflow {
                req_prod: req_cons,
                rsp_prod_pvt,
                size: ring.size,
            });
        }
        Ok(BackRing {
            ring,
            req_cons,
            rsp_prod_pvt,
        })
    }

    /// `RING_SIZE`.
    pub fn size(&self) -> u32 {
        self.ring.size
    }

    /// Private consumer index.
    pub fn req_cons(&self) -> u32 {
        self.req_cons
    }

    /// Private response producer index.
    pub fn rsp_prod_pvt(&self) -> u32 {
        self.rsp_prod_pvt
    }

    /// The shared `rsp_prod`: the responses the guest may have seen.
    pub fn shared_rsp_prod(&self) -> Result<u32, RingError> {
        self.ring.pages.load(RSP_PROD, Ordering::Acquire)
    }

    /// The shared `req_prod`: what the guest has published (recovery).
    pub fn shared_req_prod(&self) -> Result<u32, RingError> {
        self.ring.pages.load(REQ_PROD, Ordering::Acquire)
    }

    /// `RING_HAS_UNCONSUMED_REQUESTS`, checked first with
    /// `RING_REQUEST_PROD_OVERFLOW`: a `req_prod` more than a ring ahead of
    /// what we answered is ring-level corruption.
    pub fn unconsumed_requests(&self) -> Result<u32, RingError> {
        // Acquire = the xen_rmb() between reading req_prod and the requests.
        let req_prod = self.ring.pages.load(REQ_PROD, Ordering::Acquire)?;
        if req_prod.wrapping_sub(self.rsp_prod_pvt) > self.ring.size {
            return Err(RingError::RequestOverflow {
                req_prod,
                rsp_prod_pvt: self.rsp_prod_pvt,
                size: self.ring.size,
            });
        }
        let requests = req_prod.wrapping_sub(self.req_cons);
        let room = self
            .ring
            .size
            .wrapping_sub(self.req_cons.wrapping_sub(self.rsp_prod_pvt));
        Ok(requests.min(room))
    }

    /// Copies the request at `req_cons` out of the ring
    /// (`RING_COPY_REQUEST`) and advances `req_cons`. The caller has checked
    /// [`unconsumed_requests`](Self::unconsumed_requests).
    pub fn take_request(&mut self) -> Result<(u32, P::Request), RingError> {
        let idx = self.req_cons;
        // RING_REQUEST_CONS_OVERFLOW: never consume a slot whose response
        // has not been produced yet.
        if idx.wrapping_sub(self.rsp_prod_pvt) >= self.ring.size {
            return Err(RingError::RingFull);
        }
        let req = self.ring.read_entry(idx)?;
        self.req_cons = idx.wrapping_add(1);
        Ok((idx, req))
    }

    /// Writes a response into slot `rsp_prod_pvt` (not yet visible until
    /// [`push_responses`](Self::push_responses)). Returns the slot index.
    pub fn put_response(&mut self, rsp: &P::Response) -> Result<u32, RingError> {
        let idx = self.rsp_prod_pvt;
        // A response for a request we never consumed is a backend bug.
        if idx == self.req_cons {
            return Err(RingError::RingFull);
        }
        self.ring.write_entry(idx, rsp)?;
        self.rsp_prod_pvt = idx.wrapping_add(1);
        Ok(idx)
    }

    /// `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`: publishes produced responses
    /// and returns whether the frontend asked to be notified.
    pub fn push_responses(&mut self) -> Result<bool, RingError> {
        let old = self.ring.pages.load(RSP_PROD, Ordering::Relaxed)?;
        let new = self.rsp_prod_pvt;
        // Release = xen_wmb(): the frontend sees responses before rsp_prod.
        self.ring.pages.store(RSP_PROD, new, Ordering::Release)?;
        // xen_mb(): the frontend sees rsp_prod before we read rsp_event.
        fence(Ordering::SeqCst);
        let event = self.ring.pages.load(RSP_EVENT, Ordering::Relaxed)?;
        Ok(new.wrapping_sub(event) < new.wrapping_sub(old))
    }

    /// `RING_FINAL_CHECK_FOR_REQUESTS`: before sleeping, ask to be notified
    /// of the next request and re-check. True means work is pending.
    pub fn final_check_for_requests(&mut self) -> Result<bool, RingError> {
        if self.unconsumed_requests()? > 0 {
            return Ok(true);
        }
        self.ring
            .pages
            .store(REQ_EVENT, self.req_cons.wrapping_add(1), Ordering::Relaxed)?;
        // xen_mb(): req_event is visible before we re-read req_prod.
        fence(Ordering::SeqCst);
        Ok(self.unconsumed_requests()? > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C)]
    #[derive(Clone, Copy, Default, Debug, PartialEq)]
    struct Req {
        id: u64,
        pad: [u64; 13],
    }
    #[allow(unsafe_code, reason = "a wire struct vm-memory copies as plain bytes")]
    // SAFETY: plain integers, no padding.
    unsafe impl ByteValued for Req {}
    #[repr(C)]
    #[derive(Clone, Copy, Default, Debug, PartialEq)]
    struct Rsp {
        id: u64,
        status: u64,
    }
    #[allow(unsafe_code, reason = "a wire struct vm-memory copies as plain bytes")]
    // SAFETY: plain integers, no padding.
    unsafe impl ByteValued for Rsp {}
    struct Proto;
    impl RingProtocol for Proto {
        type Request = Req;
        type Response = Rsp;
    }

    fn pair(pages: usize) -> (FrontRing<Proto>, BackRing<Proto>) {
        let region = Arc::new(SharedRegion::create("r", 64).unwrap());
        // Deliberately scattered, descending frames.
        let offs: Vec<u64> = (0..pages as u64).map(|i| (40 - 2 * i) * 4096).collect();
        let front = FrontRing::init(RingPages::new(region.clone(), offs.clone()).unwrap()).unwrap();
        let back = BackRing::attach(RingPages::new(region, offs).unwrap()).unwrap();
        (front, back)
    }

    #[test]
    fn sizes_match_ring_h() {
        assert_eq!(ring_size(1, 112), 32);
        assert_eq!(ring_size(16, 112), 512);
        assert_eq!(ring_size(1, 12), 256);
        assert_eq!(ring_size(1, 8), 256);
    }

    #[test]
    fn round_trip_across_wrap_and_pages() {
        let (mut front, mut back) = pair(4);
        let size = front.size();
        assert_eq!(size, 128);
        let mut next_id = 0u64;
        let mut expect = 0u64;
        for _round in 0..10 {
            while front.free_requests() > 3 {
                front
                    .put_request(&Req {
                        id: next_id,
                        pad: [next_id; 13],
                    })
                    .unwrap();
                next_id += 1;
            }
            front.push_requests().unwrap();
            let n = back.unconsumed_requests().unwrap();
            for _ in 0..n {
                let (_, req) = back.take_request().unwrap();
                assert_eq!(req.pad, [req.id; 13]);
                back.put_response(&Rsp {
                    id: req.id,
                    status: 0,
                })
                .unwrap();
            }
            back.push_responses().unwrap();
            while let Some(rsp) = front.take_response().unwrap() {
                assert_eq!(rsp.id, expect);
                expect += 1;
            }
        }
        assert_eq!(expect, next_id);
    }

    #[test]
    fn notification_suppression() {
        let (mut front, mut back) = pair(1);
        front.put_request(&Req::default()).unwrap();
        // req_event starts at 1: the first request needs a notification.
        assert!(front.push_requests().unwrap());
        front.put_request(&Req::default()).unwrap();
        // The backend has not asked again: no notification.
        assert!(!front.push_requests().unwrap());
        for _ in 0..2 {
            back.take_request().unwrap();
        }
        assert!(!back.final_check_for_requests().unwrap());
        front.put_request(&Req::default()).unwrap();
        assert!(front.push_requests().unwrap());
        back.take_request().unwrap();
        for _ in 0..3 {
            back.put_response(&Rsp::default()).unwrap();
        }
        // rsp_event is 1: the first push crossing it notifies.
        assert!(back.push_responses().unwrap());
        assert!(front.final_check_for_responses().unwrap());
    }

    #[test]
    fn hostile_producer_index_is_detected() {
        let (front, back) = pair(1);
        drop(front);
        back.ring
            .pages
            .store(REQ_PROD, 33, Ordering::Release)
            .unwrap();
        assert!(matches!(
            back.unconsumed_requests(),
            Err(RingError::RequestOverflow { .. })
        ));
        back.ring
            .pages
            .store(REQ_PROD, 32, Ordering::Release)
            .unwrap();
        assert_eq!(back.unconsumed_requests().unwrap(), 32);
    }

    #[test]
    fn backend_cannot_overrun() {
        let (mut front, mut back) = pair(1);
        assert!(back.put_response(&Rsp::default()).is_err());
        for _ in 0..32 {
            front.put_request(&Req::default()).unwrap();
        }
        assert!(matches!(
            front.put_request(&Req::default()),
            Err(RingError::RingFull)
        ));
        front.push_requests().unwrap();
        for _ in 0..32 {
            back.take_request().unwrap();
        }
        assert!(back.take_request().is_err());
    }

    #[test]
    fn response_overflow_is_detected() {
        let (mut front, back) = pair(1);
        back.ring
            .pages
            .store(RSP_PROD, 5, Ordering::Release)
            .unwrap();
        assert!(matches!(
            front.take_response(),
            Err(RingError::ResponseOverflow { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn indices_wrap_like_u32(start in proptest::num::u32::ANY, n in 0u32..32) {
            let region = Arc::new(SharedRegion::create("r", 2).unwrap());
            let pages = RingPages::contiguous(region, 1, 1).unwrap();
            pages.store(REQ_PROD, start.wrapping_add(n), Ordering::Release).unwrap();
            let back = BackRing::<Proto>::attach_at(pages, start, start).unwrap();
            proptest::prop_assert_eq!(back.unconsumed_requests().unwrap(), n);
        }
    }
}
