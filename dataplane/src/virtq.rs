//! The split virtqueues of one vhost-user device as a [`RingSet`]
//! (docs/ARCHITECTURE.md §8, §11.2), for any device class: guest memory,
//! the queues' 16-bit indices mapped onto the log's 32-bit ones, and the
//! VMM's in-flight region (§7.4, virtio-blk), updated on take and around
//! each publish and recovered here before the shadow log is planned. A
//! head stays the device's until its used entry is written, so a replay
//! walks its chain again. What a class logs of a head and of its used
//! element is its [`VirtioRecords`].

use std::marker::PhantomData;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::control::sanitize;
use crate::recovery::POISON_THRESHOLD;
use crate::rings::{Detail, Record, Recovery, RingSet, Taken};
use shadowback_ring::EventChannel;
use shadowback_shadow::{
    plan_recovery, EntryId, EntryState, LogSnapshot, RecoveryPlan, Repush, ShadowLog, REQUEST_SIZE,
};
use shadowback_virtio::inflight::InflightQueue;
use shadowback_virtio::memory::GuestRam;
use shadowback_virtio::queue::{extend_index, guest_index, Chain, ChainError, SplitQueue};
use shadowback_xenbus::protocol::{key, kind, ErrorCode};
use shadowback_xenbus::virtio::MAX_QUEUES;
use shadowback_xenbus::Message;

/// What a device class keeps in the shadow log of a virtqueue: the record
/// of a head taken and of the used element that answers it.
pub trait VirtioRecords {
    /// A used element as the class answers a head, with what its log
    /// record keeps beside it (a status byte, a frame's extent).
    type Used;
    /// A head made available again while it is out (taken, not used yet)
    /// breaks the queue (a block request: two requests in one status
    /// byte, one in-flight slot). `false`: each time it is taken it is
    /// served with what its buffers then hold (a frame's buffers).
    const ONE_OUT_PER_HEAD: bool = true;
    /// [`RingSet::PUBLISH_EVERY`] of the class's virtqueues.
    const PUBLISH_EVERY: Option<u32> = None;

    /// Whether the loop counts what is left to take on virtqueue `queue`
    /// ([`RingSet::requests_left`]): a queue whose driver waits for room
    /// and is woken early once the queue runs low (a transmit queue).
    fn counts_left(queue: u16) -> bool {
        let _ = queue;
        false
    }

    /// The head `used` answers and the bytes it says were written.
    fn used_elem(used: &Self::Used) -> (u16, u32);
    /// The record of `head`, taken at avail index `avail16` of virtqueue
    /// `queue`; `detail` is the device model's part.
    fn request(head: u16, avail16: u16, queue: u16, detail: &Detail) -> Record;
    /// `(head, avail16)` of a request record; `None` for other bytes.
    fn logged_head(bytes: &[u8]) -> Option<(u16, u16)>;
    /// The record of a used element.
    fn response(used: &Self::Used) -> Record;
    /// `(id, len)` of a response record; `None` for other bytes.
    fn saved_used_elem(response: &[u8]) -> Option<(u32, u32)>;
}

/// Where a request is: its head, and the avail index it was taken at.
#[derive(Clone, Copy, Debug)]
pub struct Head {
    pub head: u16,
    pub avail16: u16,
    /// Read back from the log or the in-flight region (a replay, an
    /// adoption), not taken from the avail ring by this instance.
    pub replayed: bool,
}

/// One started virtqueue.
pub struct VQueue {
    /// Virtqueue index in the device.
    index: u16,
    ring: SplitQueue,
    kick: EventChannel,
    call: EventChannel,
    inflight: Option<InflightQueue>,
    /// Next in-flight region counter.
    counter: u64,
    /// Guest u16 index = log u32 index (low half) + `delta`.
    delta: u16,
    /// Log-space index of the next avail entry to consume.
    next_avail: u32,
    /// `avail->idx` as last read: the heads up to it are taken without
    /// reading it again (the driver's cache line stays with the driver).
    /// Equal to the next head's index when it must be read.
    avail_seen: u16,
    /// Log-space index of the next used entry to write.
    next_used: u32,
    /// Log-space `used->idx` last published.
    published: u32,
    /// Heads taken and not answered yet.
    busy: Vec<bool>,
    /// Heads written to the used ring, not yet published.
    batch: Vec<u16>,
}

impl VQueue {
    pub fn new(
        index: u16,
        ring: SplitQueue,
        kick: EventChannel,
        call: EventChannel,
        inflight: Option<InflightQueue>,
    ) -> Self {
        let size = usize::from(ring.size);
        VQueue {
            index,
            ring,
            kick,
            call,
            inflight,
            counter: 1,
            delta: 0,
            next_avail: 0,
            avail_seen: 0,
            next_used: 0,
            published: 0,
            busy: vec![false; size],
            batch: Vec::with_capacity(size),
        }
    }

    fn size(&self) -> u16 {
        self.ring.size
    }

    /// After recovery moved `next_avail`: `avail->idx` is read again at
    /// the next take.
    fn forget_avail(&mut self) {
        self.avail_seen = guest_index(self.next_avail, self.delta);
    }
}

/// The virtqueues of one device whose class logs `C`.
pub struct VirtQueues<C> {
    mem: Arc<GuestRam>,
    queues: Vec<VQueue>,
    /// Most descriptors a chain may have.
    chain_cap: usize,
    /// The chain taken or reloaded last, and how its walk ended.
    chain: Chain,
    walked: Result<(), ChainError>,
    records: PhantomData<C>,
}

impl<C: VirtioRecords> VirtQueues<C> {
    pub fn new(mem: Arc<GuestRam>, queues: Vec<VQueue>, chain_cap: usize) -> Self {
        VirtQueues {
            mem,
            queues,
            chain_cap,
            chain: Chain::default(),
            walked: Ok(()),
            records: PhantomData,
        }
    }

    /// The guest memory the queues are in.
    pub fn mem(&self) -> &Arc<GuestRam> {
        &self.mem
    }

    /// The virtqueue index of ring `ring` in the device.
    pub fn index(&self, ring: usize) -> u16 {
        self.queues[ring].index
    }

    /// Walks the chain at `head` of ring `ring` again into `chain` (a
    /// model writing into a head it holds: the chain is the driver's
    /// memory, read when it is used).
    pub fn walk_into(&self, ring: usize, head: u16, chain: &mut Chain) -> Result<(), ChainError> {
        let q = &self.queues[ring];
        q.ring.walk(&self.mem, head, self.chain_cap, chain)
    }

    /// The chain taken or reloaded last (or why its walk failed).
    pub fn walked(&self) -> Result<&Chain, ChainError> {
        self.walked.as_ref().map(|()| &self.chain).map_err(|e| *e)
    }

    fn walk(&mut self, ring: usize, head: u16) {
        let q = &self.queues[ring];
        self.walked = q
            .ring
            .walk(&self.mem, head, self.chain_cap, &mut self.chain);
        if let Err(e) = &self.walked {
            tracing::debug!(queue = q.index, head, error = %e, "bad chain");
        }
    }

    /// The reply to `set-call` (docs/PROTOCOL.md): the one fd the message
    /// carries becomes the call eventfd of its virtqueue (`queue`); on
    /// `None`, no device is attached.
    pub fn set_call_reply(
        rings: Option<&mut Self>,
        device: &str,
        msg: &Message,
        fds: &mut Vec<OwnedFd>,
    ) -> Message {
        let result = (|| {
            let index = msg.require_u16(key::QUEUE).map_err(|e| e.to_string())?;
            if fds.len() != 1 {
                return Err(format!("set-call carries {} fds, expected 1", fds.len()));
            }
            let rings = rings.ok_or("no device attached")?;
            let fd = fds.pop().ok_or("no fd")?;
            let call = EventChannel::from_fd(fd).map_err(|e| e.to_string())?;
            rings.set_call(index, call)?;
            tracing::info!(device, queue = index, "call eventfd replaced");
            Ok(())
        })();
        match result {
            Ok(()) => Message::new(kind::OK),
            Err(why) => Message::error(ErrorCode::Einval, &sanitize(&why)),
        }
    }

    /// `set-call`: the VMM replaced the call eventfd of virtqueue `index`.
    pub fn set_call(&mut self, index: u16, call: EventChannel) -> Result<(), String> {
        let q = self
            .queues
            .iter_mut()
            .find(|q| q.index == index)
            .ok_or_else(|| format!("no queue {index}"))?;
        q.call = call;
        // A notification may have gone to the old eventfd while the VMM was
        // switching: one spurious interrupt is harmless, a lost one hangs.
        let _ = q.call.notify();
        Ok(())
    }

    /// Decides where queue `ring` resumes and what it must replay, and
    /// rewrites the in-flight region to match (docs/ARCHITECTURE.md §7.4):
    ///
    /// - a *complete* shadow log is the only authority: its live entries are
    ///   planned (re-push, re-execute, fail), and without any the queue
    ///   resumes at `used->idx` with nothing in flight. The in-flight region
    ///   is never read then: it lags the driver by up to a batch (cleared one
    ///   head at a time after `used->idx` moves), and resubmitting from it
    ///   re-executes heads the driver has already seen answered and reused;
    /// - a log that is not complete yet, beside an in-flight region (the
    ///   first instance after a restart of the supervisor, or its successor
    ///   if it died before it was done): the region says what is in flight;
    ///   whatever a dead instance half-adopted into the log is dropped and the
    ///   region adopted again, then the log is marked complete;
    /// - a log without a region: the log, as for a complete one;
    /// - a region without a log (`shadow = false`): the region;
    /// - neither: nothing is in flight; resume at `SET_VRING_BASE` on a first
    ///   attach, else at `used->idx`.
    pub fn recover(
        &mut self,
        ring: usize,
        log: Option<&ShadowLog>,
        vring_base: u16,
        recover: bool,
        fresh_log: bool,
    ) -> Result<Recovery<Head>, (ErrorCode, String)> {
        let proto = |s: String| (ErrorCode::Eproto, s);
        let mem = &self.mem;
        let q = &mut self.queues[ring];
        let size = q.size();
        let used16 = q.ring.used_idx(mem).map_err(|e| proto(e.to_string()))?;
        let avail16 = q.ring.avail_idx(mem).map_err(|e| proto(e.to_string()))?;
        let snapshot = match log {
            Some(log) => Some(log.snapshot().map_err(|e| proto(e.to_string()))?),
            None => None,
        };
        let live = |snap: &LogSnapshot| {
            snap.entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.state() != Some(EntryState::Free))
                .map(|(i, _)| EntryId(i as u32))
                .collect::<Vec<_>>()
        };
        let adopt_region =
            q.inflight.is_some() && snapshot.as_ref().is_some_and(|s| !s.header.complete);
        if let (Some(log), Some(snap), false) = (log, snapshot.as_ref(), adopt_region) {
            if !live(snap).is_empty() {
                let plan = plan_from_log::<C>(q, log, snap, used16, avail16)?;
                q.forget_avail();
                return Ok(Recovery::Plan(plan));
            }
        }
        let mut resubmit = Vec::new();
        let mut first16 = if fresh_log && !recover {
            vring_base
        } else {
            used16
        };
        if let Some(iq) = q.inflight.as_ref() {
            if log.is_none() || adopt_region {
                if let (Some(log), Some(snap)) = (log, snapshot.as_ref()) {
                    let partial = live(snap);
                    if !partial.is_empty() {
                        tracing::warn!(
                            queue = q.index,
                            entries = partial.len(),
                            "an instance died adopting the in-flight region: adopting it again"
                        );
                    }
                    for entry in partial {
                        log.free(entry).map_err(|e| proto(e.to_string()))?;
                    }
                }
                let rec = iq
                    .recover(used16, avail16)
                    .map_err(|e| proto(e.to_string()))?;
                q.counter = rec.next_counter;
                if !rec.fresh {
                    first16 = used16;
                    resubmit = rec.heads;
                }
            } else {
                // The complete log holds nothing in flight: neither may the
                // region.
                q.counter = iq
                    .reset_to(used16, &[], 1)
                    .map_err(|e| proto(e.to_string()))?;
            }
        }
        let gap = first16.wrapping_sub(used16);
        if gap > size {
            return Err((
                ErrorCode::Einval,
                format!("next avail {first16} is more than a ring ahead of used {used16}"),
            ));
        }
        if gap > 0 {
            tracing::warn!(
                queue = q.index,
                gap,
                "requests consumed before attach will not be answered"
            );
        }
        let base = snapshot.as_ref().map_or(0, |s| s.header.req_cons);
        q.delta = first16.wrapping_sub(base as u16);
        q.next_avail = base;
        q.next_used = base.wrapping_sub(u32::from(gap));
        q.published = q.next_used;
        q.forget_avail();
        if resubmit.is_empty() {
            // Nothing to adopt: the log accounts for everything from here on.
            if let Some(log) = log {
                log.mark_complete().map_err(|e| proto(e.to_string()))?;
            }
            return Ok(Recovery::Nothing);
        }
        // Each head is adopted at the next avail position.
        let adopted = resubmit
            .into_iter()
            .map(|head| {
                let at = q.next_avail;
                q.next_avail = at.wrapping_add(1);
                let avail16 = guest_index(at, q.delta);
                let replayed = true;
                (
                    at,
                    Head {
                        head,
                        avail16,
                        replayed,
                    },
                )
            })
            .collect();
        q.forget_avail();
        Ok(Recovery::Adopt(adopted))
    }
}

/// The recovery plan of a queue whose shadow log holds live entries; sets
/// the queue's indices and rewrites the in-flight region to the heads the
/// driver still waits for.
fn plan_from_log<C: VirtioRecords>(
    q: &mut VQueue,
    log: &ShadowLog,
    snap: &LogSnapshot,
    used16: u16,
    avail16: u16,
) -> Result<RecoveryPlan, (ErrorCode, String)> {
    let proto = |s: String| (ErrorCode::Eproto, s);
    let size = q.size();
    // The mapping between log and guest indices, from the entry consumed
    // last.
    let delta = snap
        .entries
        .iter()
        .filter(|e| {
            matches!(
                e.state(),
                Some(EntryState::Inflight | EntryState::Completing)
            )
        })
        .filter_map(|e| C::logged_head(&e.request).map(|(_, a)| (e.seq, a, e.ring_idx)))
        .max_by_key(|&(seq, _, _)| seq)
        .map(|(_, avail16, ring_idx)| avail16.wrapping_sub(ring_idx as u16))
        .ok_or_else(|| proto("no live entry tells the ring position".into()))?;
    let h = &snap.header;
    let rsp_prod = extend_index(h.rsp_prod_pvt, delta, used16);
    let req_prod = extend_index(h.req_cons, delta, avail16);
    let plan = plan_recovery(snap, rsp_prod, req_prod, u32::from(size), POISON_THRESHOLD)
        .map_err(|e| proto(format!("recovery impossible: {e}")))?;
    log.log_recovered(&plan).map_err(|e| proto(e.to_string()))?;
    log.mark_complete().map_err(|e| proto(e.to_string()))?;
    q.delta = delta;
    q.next_avail = plan.req_cons;
    q.next_used = plan.rsp_prod;
    q.published = plan.rsp_prod;
    if let Some(iq) = q.inflight.as_ref() {
        // Every head the guest still waits for is in flight.
        let mut heads: Vec<u16> = plan
            .repush
            .iter()
            .filter_map(|r| C::saved_used_elem(&r.response))
            .filter_map(|(id, _)| u16::try_from(id).ok())
            .collect();
        heads.extend(
            plan.poisoned
                .iter()
                .chain(&plan.reexecute)
                .filter_map(|e| C::logged_head(&e.request).map(|(h, _)| h)),
        );
        heads.extend(
            plan.corrupt_to_answer()
                .filter_map(|c| C::logged_head(&c.request).map(|(h, _)| h)),
        );
        heads.retain(|&h| h < size);
        heads.sort_unstable();
        heads.dedup();
        q.counter = iq
            .reset_to(used16, &heads, 1)
            .map_err(|e| proto(e.to_string()))?;
    }
    Ok(plan)
}

impl<C: VirtioRecords> RingSet for VirtQueues<C> {
    type Request = Head;
    type Response = C::Used;
    const MAX_RINGS: usize = MAX_QUEUES;
    const BREAK_ENDS_ATTACHMENT: bool = false;
    const WAKE_ON_ATTACH: bool = true;
    const PUBLISH_EVERY: Option<u32> = C::PUBLISH_EVERY;

    fn count(&self) -> usize {
        self.queues.len()
    }

    /// `avail->idx` read afresh, less the next head to take, on the
    /// queues the class counts ([`VirtioRecords::counts_left`]).
    fn requests_left(&self, ring: usize) -> Option<u32> {
        let q = &self.queues[ring];
        if !C::counts_left(q.index) {
            return None;
        }
        let avail16 = q.ring.avail_idx(&self.mem).ok()?;
        Some(u32::from(
            avail16.wrapping_sub(guest_index(q.next_avail, q.delta)),
        ))
    }

    fn size(&self, ring: usize) -> u32 {
        u32::from(self.queues[ring].size())
    }

    fn kick(&self, ring: usize) -> &EventChannel {
        &self.queues[ring].kick
    }

    fn notify(&self, ring: usize) -> Result<(), String> {
        self.queues[ring].call.notify().map_err(|e| e.to_string())
    }

    fn notify_channel(&self, ring: usize) -> &EventChannel {
        &self.queues[ring].call
    }

    fn label(&self, ring: usize) -> Option<u16> {
        Some(self.queues[ring].index)
    }

    fn take(&mut self, ring: usize) -> Result<Option<Taken<Head>>, String> {
        let mem = &self.mem;
        let q = &mut self.queues[ring];
        let next16 = guest_index(q.next_avail, q.delta);
        if q.avail_seen == next16 {
            let avail16 = q.ring.avail_idx(mem).map_err(|e| e.to_string())?;
            if avail16 == next16 {
                return Ok(None);
            }
            // Heads out (taken and not used yet: a network model's posted
            // receive heads) and heads newly made available are all
            // distinct descriptors, so together at most a ring: counted
            // from the used index, not from the next head to take.
            let used16 = guest_index(q.next_used, q.delta);
            if avail16.wrapping_sub(used16) > q.size() {
                return Err(format!(
                    "avail index {avail16} is more than a ring ahead of used index {used16}"
                ));
            }
            q.avail_seen = avail16;
        }
        let head = q.ring.avail_head(mem, next16).map_err(|e| e.to_string())?;
        if head >= q.size() {
            return Err(format!("avail head {head} out of range"));
        }
        if std::mem::replace(&mut q.busy[usize::from(head)], true) && C::ONE_OUT_PER_HEAD {
            return Err(format!("head {head} made available twice"));
        }
        let log_index = q.next_avail;
        q.next_avail = log_index.wrapping_add(1);
        self.walk(ring, head);
        Ok(Some(Taken {
            request: Head {
                head,
                avail16: next16,
                replayed: false,
            },
            log_index,
            cost: self.chain.descriptors_read,
        }))
    }

    /// With EVENT_IDX, asks for a kick at the next index, then checks
    /// again (the driver may have added one before seeing it).
    fn has_requests(&mut self, ring: usize) -> bool {
        let q = &self.queues[ring];
        if q.ring.event_idx {
            let next16 = guest_index(q.next_avail, q.delta);
            // Cannot fail: the used ring, event word included, was found
            // mapped when the queue was set up.
            if let Err(e) = q.ring.set_avail_event(&self.mem, next16) {
                tracing::warn!(queue = q.index, error = %e, "avail_event not writable");
            }
            // SeqCst fence: avail_event is visible before avail->idx is
            // re-read (§2.7.10, the device-side mb()).
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        }
        self.peek_requests(ring)
    }

    /// `avail_event` is left behind, so an EVENT_IDX driver does not kick
    /// (event-index suppression while the loop is busy or polling).
    fn peek_requests(&mut self, ring: usize) -> bool {
        let q = &self.queues[ring];
        q.ring
            .avail_idx(&self.mem)
            .map_or(true, |a| a != guest_index(q.next_avail, q.delta))
    }

    /// The in-flight region first: a head it marks but the shadow log
    /// lacks is consumed again from the avail ring by a log-driven
    /// recovery, while region-only recovery counts it.
    fn begin(&mut self, ring: usize, req: &Head) {
        let q = &mut self.queues[ring];
        if let Some(iq) = q.inflight.as_ref() {
            if let Err(e) = iq.begin(req.head, q.counter) {
                tracing::warn!(queue = q.index, error = %e, "in-flight region update failed");
            }
            q.counter += 1;
        }
    }

    fn reload(&mut self, ring: usize, req: &Head) {
        if let Some(busy) = self.queues[ring].busy.get_mut(usize::from(req.head)) {
            *busy = true;
        }
        self.walk(ring, req.head);
    }

    fn put(&mut self, ring: usize, used: &C::Used) -> Result<u32, String> {
        let q = &mut self.queues[ring];
        let idx = q.next_used;
        let (head, len) = C::used_elem(used);
        q.ring
            .write_used(&self.mem, guest_index(idx, q.delta), u32::from(head), len)
            .map_err(|e| e.to_string())?;
        q.next_used = idx.wrapping_add(1);
        q.batch.push(head);
        if let Some(busy) = q.busy.get_mut(usize::from(head)) {
            *busy = false;
        }
        Ok(idx)
    }

    /// Links the batch in the in-flight region, then one release store of
    /// `used->idx`.
    fn publish(&mut self, ring: usize) -> Result<Option<u32>, String> {
        let q = &mut self.queues[ring];
        if q.batch.is_empty() {
            return Ok(None);
        }
        if let Some(iq) = q.inflight.as_ref() {
            if let Err(e) = iq.link_batch(&q.batch) {
                tracing::warn!(queue = q.index, error = %e, "in-flight region update failed");
            }
        }
        let new = guest_index(q.next_used, q.delta);
        q.ring
            .publish_used(&self.mem, new)
            .map_err(|e| e.to_string())?;
        Ok(Some(q.next_used))
    }

    /// Finishes the batch in the in-flight region; notifies unless
    /// EVENT_IDX says the driver does not want it.
    fn published(&mut self, ring: usize) -> bool {
        let q = &mut self.queues[ring];
        let old = guest_index(q.published, q.delta);
        let new = guest_index(q.next_used, q.delta);
        if let Some(iq) = q.inflight.as_ref() {
            if let Err(e) = iq.finish_batch(&q.batch, new) {
                tracing::warn!(queue = q.index, error = %e, "in-flight region update failed");
            }
        }
        q.batch.clear();
        q.published = q.next_used;
        q.ring.needs_notify(&self.mem, old, new).unwrap_or(true)
    }

    fn unpublished(&self, ring: usize) -> bool {
        !self.queues[ring].batch.is_empty()
    }

    /// Where the request is (head, avail index, queue), then the detail.
    fn request_record(&self, ring: usize, req: &Head, detail: &Detail) -> Record {
        let index = self.queues[ring].index;
        C::request(req.head, req.avail16, index, detail)
    }

    fn response_record(&self, used: &C::Used) -> Record {
        C::response(used)
    }

    fn locate(&self, ring: usize, record: &[u8; REQUEST_SIZE]) -> Option<Head> {
        let size = self.queues[ring].size();
        C::logged_head(record)
            .map(|(head, avail16)| Head {
                head,
                avail16,
                replayed: true,
            })
            .filter(|h| h.head < size)
    }

    /// Heads are the driver's.
    fn place(&self, req: &Head) -> Option<u16> {
        Some(req.head)
    }

    fn repush(&mut self, ring: usize, r: &Repush) -> Result<Option<u16>, String> {
        let q = &mut self.queues[ring];
        let (id, len) = C::saved_used_elem(&r.response).ok_or("not a used element")?;
        let at = r.rsp_idx;
        let Some(head) = u16::try_from(id).ok().filter(|&h| h < q.size()) else {
            return Err(format!("saved used element names head {id}"));
        };
        if at != q.next_used {
            return Err(format!("re-push at {at}, expected {}", q.next_used));
        }
        q.ring
            .write_used(&self.mem, guest_index(at, q.delta), id, len)
            .map_err(|e| e.to_string())?;
        q.next_used = at.wrapping_add(1);
        q.batch.push(head);
        Ok(Some(head))
    }

    fn describe(&self, req: &Head) -> String {
        format!("head {}", req.head)
    }
}

#[cfg(test)]
mod tests {
    use shadowback_virtio::queue::vring_need_event;
    use shadowback_xenbus::virtio::QueueConfig;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;

    const CHAIN_CAP: usize = 16;

    /// Records of a class that logs the bare used element; `COUNTS`: its
    /// queues count what is left to take.
    struct Bare<const COUNTS: bool = false>;

    impl<const COUNTS: bool> VirtioRecords for Bare<COUNTS> {
        type Used = (u16, u32);
        fn counts_left(_queue: u16) -> bool {
            COUNTS
        }
        fn used_elem(used: &(u16, u32)) -> (u16, u32) {
            *used
        }
        fn request(head: u16, avail16: u16, _queue: u16, _detail: &Detail) -> Record {
            let mut b = [0u8; 8];
            b[0..2].copy_from_slice(&head.to_le_bytes());
            b[2..4].copy_from_slice(&avail16.to_le_bytes());
            b[4..8].copy_from_slice(b"TEST");
            Record::new(&b)
        }
        fn logged_head(bytes: &[u8]) -> Option<(u16, u16)> {
            (bytes.get(4..8)? == b"TEST").then(|| {
                (
                    u16::from_le_bytes([bytes[0], bytes[1]]),
                    u16::from_le_bytes([bytes[2], bytes[3]]),
                )
            })
        }
        fn response(used: &(u16, u32)) -> Record {
            let mut b = [0u8; 8];
            b[0..4].copy_from_slice(&u32::from(used.0).to_le_bytes());
            b[4..8].copy_from_slice(&used.1.to_le_bytes());
            Record::new(&b)
        }
        fn saved_used_elem(response: &[u8]) -> Option<(u32, u32)> {
            let word = |at: usize| {
                Some(u32::from_le_bytes(
                    response.get(at..at + 4)?.try_into().ok()?,
                ))
            };
            Some((word(0)?, word(4)?))
        }
    }

    const SIZE: u16 = 8;
    const DESC: u64 = 0;
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;

    /// One EVENT_IDX queue of 8 in 64 KiB of memory.
    fn queues() -> VirtQueues<Bare> {
        queues_of()
    }

    fn queues_of<C: VirtioRecords>() -> VirtQueues<C> {
        let mem = GuestRam::from_memory(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap(),
        );
        let cfg = QueueConfig {
            index: 0,
            size: SIZE,
            desc: DESC,
            avail: AVAIL,
            used: USED,
            next_avail: 0,
        };
        let ring = SplitQueue::new(&cfg, &mem, true).unwrap();
        let ch = || EventChannel::new().unwrap();
        let q = VQueue::new(0, ring, ch(), ch(), None);
        VirtQueues::new(Arc::new(mem), vec![q], CHAIN_CAP)
    }

    /// Makes head `n` (one 16-byte descriptor) available as avail index
    /// `n`; whether the driver must kick for it (§2.7.10).
    fn post<C: VirtioRecords>(vq: &VirtQueues<C>, n: u16) -> bool {
        let mut desc = [0u8; 16];
        desc[..8].copy_from_slice(&0x3000u64.to_le_bytes());
        desc[8..12].copy_from_slice(&16u32.to_le_bytes());
        vq.mem.write(DESC + 16 * u64::from(n), &desc).unwrap();
        vq.mem
            .write(AVAIL + 4 + 2 * u64::from(n % SIZE), &n.to_le_bytes())
            .unwrap();
        vq.mem.write(AVAIL + 2, &(n + 1).to_le_bytes()).unwrap();
        let mut event = [0u8; 2];
        vq.mem
            .read(USED + 4 + 8 * u64::from(SIZE), &mut event)
            .unwrap();
        vring_need_event(u16::from_le_bytes(event), n + 1, n)
    }

    #[test]
    fn taking_and_peeking_leave_avail_event_behind_and_only_the_final_check_asks_for_a_kick() {
        let mut vq = queues();
        assert!(post(&vq, 0), "the first request is kicked");
        assert!(vq.take(0).unwrap().is_some());
        // An empty ring found by a busy or polling loop asks for no kick.
        assert!(vq.take(0).unwrap().is_none());
        assert!(!vq.peek_requests(0));
        assert!(!post(&vq, 1), "kicked while the backend polls");
        assert!(vq.peek_requests(0));
        assert!(vq.take(0).unwrap().is_some());
        // About to sleep: the final check asks for the next one.
        assert!(!vq.has_requests(0));
        assert!(post(&vq, 2), "not kicked while the backend sleeps");
    }

    #[test]
    fn heads_up_to_the_avail_index_read_last_are_taken_without_reading_it_again() {
        let mut vq = queues();
        post(&vq, 0);
        post(&vq, 1);
        assert_eq!(vq.take(0).unwrap().unwrap().request.head, 0);
        // A driver scribbling on avail->idx is not seen until the heads
        // read with it are taken: then the index is read, and refused.
        vq.mem.write(AVAIL + 2, &100u16.to_le_bytes()).unwrap();
        let second = vq.take(0).unwrap().unwrap();
        assert_eq!((second.request.head, second.request.replayed), (1, false));
        assert!(vq.take(0).is_err(), "an avail index a ring ahead was taken");
    }

    #[test]
    fn what_is_left_to_take_is_counted_on_the_queues_the_class_counts() {
        let mut vq = queues_of::<Bare<true>>();
        assert_eq!(vq.requests_left(0), Some(0));
        for n in 0..3 {
            post(&vq, n);
        }
        assert_eq!(vq.requests_left(0), Some(3));
        assert!(vq.take(0).unwrap().is_some());
        assert_eq!(vq.requests_left(0), Some(2), "avail->idx read afresh");
        post(&vq, 3);
        assert_eq!(vq.requests_left(0), Some(3));
        let plain = queues();
        post(&plain, 0);
        assert_eq!(plain.requests_left(0), None, "a queue not counted");
    }
}
