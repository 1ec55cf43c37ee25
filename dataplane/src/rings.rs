//! The rings of one attachment as the generic loop ([`crate::serve`]) sees
//! them, whatever the transport: one Xen ring, the virtqueues of a device,
//! netif's tx and rx rings (docs/ARCHITECTURE.md §11.2).
//!
//! Indices are the shadow log's 32-bit counters; an adapter maps them onto
//! the wire (virtqueues: 16 bits, §8). What is not a ring but belongs to
//! the transport — the VMM's in-flight region of §7.4, guest memory, the
//! grant table — is the adapter's too.

use std::os::fd::RawFd;

use shadowback_ring::EventChannel;
use shadowback_shadow::{RecoveryPlan, Repush, REQUEST_SIZE};

/// Bytes a device model adds to a request's log record (a virtio-blk
/// header); the rest of the record is the transport's.
pub const DETAIL_SIZE: usize = 16;

/// The device model's part of a request's log record.
pub type Detail = [u8; DETAIL_SIZE];

/// A shadow-log record (a request's, or a response's), as a transport
/// lays it out.
#[derive(Clone, Copy)]
pub struct Record {
    bytes: [u8; REQUEST_SIZE],
    len: usize,
}

impl Record {
    /// The first `REQUEST_SIZE` bytes of `bytes`. Inlined across crates
    /// (a record is built per request): the copy of a short record is
    /// then a few stores, not a call.
    #[inline]
    pub fn new(bytes: &[u8]) -> Self {
        let len = bytes.len().min(REQUEST_SIZE);
        let mut record = Record {
            bytes: [0; REQUEST_SIZE],
            len,
        };
        record.bytes[..len].copy_from_slice(&bytes[..len]);
        record
    }

    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// What [`RingSet::take`] handed over.
#[derive(Debug)]
pub struct Taken<T> {
    /// The request's place: a copy of it, or where to find it.
    pub request: T,
    /// Its index in the shadow log's index space.
    pub log_index: u32,
    /// Ring entries or descriptors read to take it (at least 1), charged
    /// against the loop's per-turn budget ([`TAKE_BUDGET`]).
    pub cost: u32,
}

/// Ring entries and descriptors one ring may read per loop turn. Requests
/// answered at once take no engine slot, so without it a full ring of long
/// hostile virtqueue chains (each up to 64Ki descriptors) would keep the
/// loop from its heartbeat and the control socket for minutes. Far above
/// what engine room lets legitimate requests use.
pub const TAKE_BUDGET: u32 = 1 << 16;

/// What recovery left a ring to do once the attachment is set up
/// (docs/ARCHITECTURE.md §7.5).
pub enum Recovery<T> {
    /// Nothing was in flight.
    Nothing,
    /// A plan from the ring's shadow log, applied by
    /// [`crate::recovery::apply_plan`].
    Plan(RecoveryPlan),
    /// Requests a transport record says are in flight that the log lacks
    /// (the VMM's in-flight region, §7.4): logged now, at the given log
    /// indices, then re-executed; the log is marked complete in between.
    Adopt(Vec<(u32, T)>),
}

/// The rings of one attachment. `ring` arguments are positions in the set
/// (`0..count()`), the ring byte of [`crate::event_loop::Token`].
pub trait RingSet {
    /// Where a request is: a copy of a blkif request (Xen rings: its
    /// grants stay the frontend's until answered) or a virtqueue head (the
    /// chain stays the device's until its used entry is written).
    type Request;
    /// A response as the ring takes it: a blkif response, a used element.
    type Response;
    /// Most rings a set of this transport can have (engine room is kept
    /// for one kick poll each).
    const MAX_RINGS: usize;
    /// A ring the guest broke ends the whole attachment (a Xen ring: the
    /// supervisor disconnects the frontend) rather than only that ring (a
    /// virtqueue: the others keep serving).
    const BREAK_ENDS_ATTACHMENT: bool;
    /// The guest is notified on every ring once attached, recovered or
    /// not (virtqueues: a driver of a restarted VMM may be waiting),
    /// rather than only after a recovery.
    const WAKE_ON_ATTACH: bool;
    /// Answers a ring may have put before the loop publishes them in the
    /// middle of a drain, between two takes (and between two calls of the
    /// model's `ready`/`drained`): the guest refills those slots while the
    /// backend works through the rest. A notification such a publication
    /// finds asked for is owed, sent at the end of the turn, or at once
    /// when the ring is running low ([`RingSet::requests_left`]). `None`:
    /// published at the end of the turn only.
    const PUBLISH_EVERY: Option<u32> = None;

    fn count(&self) -> usize;
    /// Entries of `ring`: the most requests it can have in flight.
    fn size(&self, ring: usize) -> u32;
    /// The eventfd the guest kicks `ring` with.
    fn kick(&self, ring: usize) -> &EventChannel;
    fn kick_fd(&self, ring: usize) -> RawFd {
        use std::os::fd::AsRawFd;
        self.kick(ring).as_raw_fd()
    }
    /// Whether `ring` is kicked through the same eventfd as an earlier ring
    /// of the set (netif without split event channels): the loop waits on
    /// that eventfd once.
    fn shares_kick(&self, _ring: usize) -> bool {
        false
    }
    /// Signals the guest that `ring` has responses, with a guarded
    /// `write(2)`.
    fn notify(&self, ring: usize) -> Result<(), String>;
    /// The eventfd [`RingSet::notify`] writes, for a loop that sends the
    /// notification through its engine instead.
    fn notify_channel(&self, ring: usize) -> &EventChannel;
    /// The ring's name in a `disconnect` (`queue=`), if the transport
    /// has several.
    fn label(&self, ring: usize) -> Option<u16>;

    /// The next request of `ring`; `None` when there is none; `Err` when
    /// the guest broke the ring. Asks for no kick
    /// ([`RingSet::has_requests`] does).
    fn take(&mut self, ring: usize) -> Result<Option<Taken<Self::Request>>, String>;
    /// Whether `ring` holds requests not taken yet; sets what makes the
    /// guest kick when it adds one (`req_event`, EVENT_IDX `avail_event`).
    /// Called before the loop sleeps, and only then: while the loop is
    /// busy or polling the guest is not asked to kick (docs/ARCHITECTURE.md
    /// §11.2).
    fn has_requests(&mut self, ring: usize) -> bool;
    /// Whether `ring` holds requests not taken yet, without asking the
    /// guest for a kick: what the loop polls.
    fn peek_requests(&mut self, ring: usize) -> bool;
    /// Requests the guest has put on `ring` and the loop not taken yet,
    /// where the transport can tell cheaply (a Xen ring: `req_prod -
    /// req_cons`). With [`RingSet::PUBLISH_EVERY`], a publication that
    /// finds the guest asking for a notification while at most half the
    /// ring is left sends it at once (docs/ARCHITECTURE.md §11.2); `None`
    /// (the default): it waits for the end of the turn.
    fn requests_left(&self, _ring: usize) -> Option<u32> {
        None
    }
    /// Marks `request` started, just before the log records it consumed (the in-flight region's first store, §7.4).
    fn begin(&mut self, ring: usize, request: &Self::Request);
    /// Makes what the device model parses for `request` available again
    /// for a replay (a virtqueue walks the chain again, §7.4; a Xen
    /// request is its own copy: its grants stay the frontend's until it
    /// is answered).
    fn reload(&mut self, ring: usize, request: &Self::Request);

    /// Writes a response, unpublished; returns its log index.
    fn put(&mut self, ring: usize, response: &Self::Response) -> Result<u32, String>;
    /// Publishes what was put since the last call (one release store of
    /// `rsp_prod` / `used->idx`); returns the log index up to which
    /// responses are now visible, `None` when nothing was put.
    fn publish(&mut self, ring: usize) -> Result<Option<u32>, String>;
    /// After the log recorded a publish: the transport's own bookkeeping,
    /// and whether the guest wants a notification.
    fn published(&mut self, ring: usize) -> bool;
    /// Responses put but not published yet (a publish that failed).
    fn unpublished(&self, ring: usize) -> bool;

    /// The transport's log record of a request; `detail` is the device
    /// model's part.
    fn request_record(&self, ring: usize, request: &Self::Request, detail: &Detail) -> Record;
    /// The log record of a response (at most `RESPONSE_SIZE` bytes).
    fn response_record(&self, response: &Self::Response) -> Record;
    /// The request a logged record names; `None` when it names nothing
    /// usable.
    fn locate(&self, ring: usize, record: &[u8; REQUEST_SIZE]) -> Option<Self::Request>;
    /// The guest-visible place a request holds (a virtqueue head), where
    /// the guest expects exactly one answer; `None` when places are the
    /// backend's (Xen slots).
    fn place(&self, request: &Self::Request) -> Option<u16>;
    /// Writes a saved response again at its planned log index,
    /// unpublished; returns the place it answers.
    fn repush(&mut self, ring: usize, repush: &Repush) -> Result<Option<u16>, String>;
    /// A name for `request` in logs.
    fn describe(&self, request: &Self::Request) -> String;
}
