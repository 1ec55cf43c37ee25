//! One split virtqueue of a virtio-net device as netback drives it: take
//! a head (logged in the queue's shadow log), write a used element
//! (logged COMPLETING), publish, and recover from the log
//! (docs/ARCHITECTURE.md §8.1).
//!
//! Nothing here is specific to virtio-net but the record codec: this is
//! the virtqueue half of the `RingSet` adapter of §11.2.

use std::sync::Arc;

use shadowback_ring::EventChannel;
use shadowback_shadow::{
    plan_recovery, EntryId, EntryState, LogSnapshot, LogWriter, RecoveryPlan, ShadowLog,
};
use shadowback_virtio::memory::GuestRam;
use shadowback_virtio::queue::{extend_index, guest_index, SplitQueue};
use shadowback_xenbus::protocol::ErrorCode;

use shadowback_dataplane::recovery::{log_failed, POISON_THRESHOLD};

use super::record::{self, UsedRecord};

/// A head taken from the avail ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Taken {
    pub head: u16,
    pub entry: Option<EntryId>,
}

/// One started virtqueue.
pub struct VQueue {
    /// Virtqueue index in the device.
    pub index: u16,
    pub ring: SplitQueue,
    pub kick: EventChannel,
    pub call: EventChannel,
    /// Shared so a caller can hold its [`LogWriter`] (one lock for a
    /// whole transmit drain) while it drives the queue.
    pub log: Option<Arc<ShadowLog>>,
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
    /// The driver broke the ring: consume nothing more.
    pub broken: bool,
}

impl VQueue {
    pub fn new(
        index: u16,
        ring: SplitQueue,
        kick: EventChannel,
        call: EventChannel,
        log: Option<ShadowLog>,
    ) -> Self {
        VQueue {
            index,
            ring,
            kick,
            call,
            log: log.map(Arc::new),
            delta: 0,
            next_avail: 0,
            avail_seen: 0,
            next_used: 0,
            published: 0,
            broken: false,
        }
    }

    pub fn size(&self) -> u16 {
        self.ring.size
    }

    /// Whether the avail ring holds a head not taken yet.
    pub fn has_avail(&self, mem: &GuestRam) -> bool {
        let next16 = guest_index(self.next_avail, self.delta);
        !self.broken
            && (self.avail_seen != next16 || self.ring.avail_idx(mem).is_ok_and(|a| a != next16))
    }

    /// Takes the next head and logs it; `Ok(None)` when the ring is empty
    /// (with EVENT_IDX, after asking for a kick at the next index and
    /// checking again). `Err` when the driver broke the ring.
    pub fn take(&mut self, mem: &GuestRam, device: &str) -> Result<Option<Taken>, String> {
        self.take_with(mem, device, None)
    }

    /// [`Self::take`], logged through `writer` if given: the locked
    /// writer of this queue's log (the same transition, one lock for many).
    pub fn take_with(
        &mut self,
        mem: &GuestRam,
        device: &str,
        writer: Option<&mut LogWriter<'_>>,
    ) -> Result<Option<Taken>, String> {
        let next16 = guest_index(self.next_avail, self.delta);
        let avail16 = if self.avail_seen != next16 {
            self.avail_seen
        } else {
            let avail16 = self.read_avail(mem, next16)?;
            if avail16 == next16 {
                return Ok(None);
            }
            self.avail_seen = avail16;
            avail16
        };
        // Heads out (taken and not used yet: receive heads in the pool)
        // and heads newly made available are all distinct descriptors,
        // so together at most a ring: counted from the used index, not
        // from the next head to take.
        let used16 = guest_index(self.next_used, self.delta);
        if avail16.wrapping_sub(used16) > self.size() {
            return Err(format!(
                "avail index {avail16} is more than a ring ahead of used index {used16}"
            ));
        }
        let head = self
            .ring
            .avail_head(mem, next16)
            .map_err(|e| e.to_string())?;
        if head >= self.size() {
            return Err(format!("avail head {head} out of range"));
        }
        // docs/ARCHITECTURE.md §7.1: logged before any of it is executed.
        let bytes = record::request(head, next16, self.index);
        let logged = match (writer, self.log.as_ref()) {
            (Some(w), _) => Some(w.log_consumed(self.next_avail, &bytes)),
            (None, Some(log)) => Some(log.log_consumed(self.next_avail, &bytes)),
            (None, None) => None,
        };
        let entry = logged.map(|r| r.unwrap_or_else(|e| log_failed(device, e)));
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(Some(Taken { head, entry }))
    }

    /// `avail->idx`, read while the ring looks empty at `next16`: with
    /// EVENT_IDX, when it is, the driver is asked for a kick at `next16`
    /// and the index read once more.
    fn read_avail(&self, mem: &GuestRam, next16: u16) -> Result<u16, String> {
        let avail16 = self.ring.avail_idx(mem).map_err(|e| e.to_string())?;
        if avail16 != next16 || !self.ring.event_idx {
            return Ok(avail16);
        }
        self.ring
            .set_avail_event(mem, next16)
            .map_err(|e| e.to_string())?;
        // SeqCst fence: avail_event is visible before avail->idx is
        // read again (virtio 1.2 §2.7.10, the device-side mb()).
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.ring.avail_idx(mem).map_err(|e| e.to_string())
    }

    /// Writes a used element, unpublished, and logs it COMPLETING,
    /// through `writer` if given (see [`Self::take_with`]).
    pub fn put_used(
        &mut self,
        mem: &GuestRam,
        entry: Option<EntryId>,
        used: &UsedRecord,
        device: &str,
        writer: Option<&mut LogWriter<'_>>,
    ) -> Result<(), String> {
        let idx = self.next_used;
        self.ring
            .write_used(mem, guest_index(idx, self.delta), used.id, used.len)
            .map_err(|e| e.to_string())?;
        if let Some(entry) = entry {
            let response = used.encode();
            let logged = match (writer, self.log.as_ref()) {
                (Some(w), _) => Some(w.log_completing(entry, idx, &response)),
                (None, Some(log)) => Some(log.log_completing(entry, idx, &response)),
                (None, None) => None,
            };
            if let Some(Err(e)) = logged {
                log_failed(device, e);
            }
        }
        self.next_used = idx.wrapping_add(1);
        Ok(())
    }

    /// Writes a saved used element again at `rsp_idx` (recovery), logged
    /// re-pushed.
    pub fn repush(
        &mut self,
        mem: &GuestRam,
        entry: EntryId,
        rsp_idx: u32,
        used: &UsedRecord,
    ) -> Result<(), String> {
        if rsp_idx != self.next_used {
            return Err(format!("re-push at {rsp_idx}, expected {}", self.next_used));
        }
        self.ring
            .write_used(mem, guest_index(rsp_idx, self.delta), used.id, used.len)
            .map_err(|e| e.to_string())?;
        self.log
            .as_ref()
            .ok_or("no shadow log")?
            .log_repushed(entry, rsp_idx)
            .map_err(|e| e.to_string())?;
        self.next_used = rsp_idx.wrapping_add(1);
        Ok(())
    }

    /// Publishes the used elements written since the last call (one
    /// release store of `used->idx`), frees their log entries and says
    /// whether the driver wants an interrupt.
    pub fn publish(&mut self, mem: &GuestRam, device: &str) -> Result<bool, String> {
        if self.published == self.next_used {
            return Ok(false);
        }
        let old = guest_index(self.published, self.delta);
        let new = guest_index(self.next_used, self.delta);
        self.ring
            .publish_used(mem, new)
            .map_err(|e| e.to_string())?;
        // docs/ARCHITECTURE.md §7.1, last step: free what is now visible.
        if let Some(log) = self.log.as_ref() {
            if let Err(e) = log.log_published(self.next_used) {
                log_failed(device, e);
            }
        }
        self.published = self.next_used;
        Ok(self.ring.needs_notify(mem, old, new).unwrap_or(true))
    }

    /// Decides where the queue resumes and returns the recovery plan of
    /// its log, if it holds live entries. The log is the only authority
    /// (docs/ARCHITECTURE.md §7.4): no in-flight region is offered for
    /// virtio-net. Without live entries the queue resumes at
    /// `SET_VRING_BASE` on a first attach, else at `used->idx`.
    pub fn recover(
        &mut self,
        mem: &GuestRam,
        vring_base: u16,
        first_attach: bool,
    ) -> Result<Option<RecoveryPlan>, (ErrorCode, String)> {
        let proto = |s: String| (ErrorCode::Eproto, s);
        let used16 = self.ring.used_idx(mem).map_err(|e| proto(e.to_string()))?;
        let avail16 = self.ring.avail_idx(mem).map_err(|e| proto(e.to_string()))?;
        let snapshot = match self.log.as_ref() {
            Some(log) => Some(log.snapshot().map_err(|e| proto(e.to_string()))?),
            None => None,
        };
        if let Some(snap) = &snapshot {
            if let Some(plan) = self.plan_from_log(snap, used16, avail16)? {
                return Ok(Some(plan));
            }
        }
        let first16 = if first_attach { vring_base } else { used16 };
        let gap = first16.wrapping_sub(used16);
        if gap > self.size() {
            return Err((
                ErrorCode::Einval,
                format!("next avail {first16} is more than a ring ahead of used {used16}"),
            ));
        }
        let base = snapshot.as_ref().map_or(0, |s| s.header.req_cons);
        self.delta = first16.wrapping_sub(base as u16);
        self.next_avail = base;
        self.next_used = base.wrapping_sub(u32::from(gap));
        self.published = self.next_used;
        self.avail_seen = first16;
        if let Some(log) = self.log.as_ref() {
            log.mark_complete().map_err(|e| proto(e.to_string()))?;
        }
        Ok(None)
    }

    /// The plan of a log with live entries, indices mapped through the
    /// avail index saved with the newest one; `None` without live entries.
    fn plan_from_log(
        &mut self,
        snap: &LogSnapshot,
        used16: u16,
        avail16: u16,
    ) -> Result<Option<RecoveryPlan>, (ErrorCode, String)> {
        let proto = |s: String| (ErrorCode::Eproto, s);
        let newest = snap
            .entries
            .iter()
            .filter(|e| {
                matches!(
                    e.state(),
                    Some(EntryState::Inflight | EntryState::Completing)
                )
            })
            .filter_map(|e| record::logged_head(&e.request).map(|(_, a)| (e.seq, a, e.ring_idx)))
            .max_by_key(|&(seq, _, _)| seq);
        let Some((_, saved16, ring_idx)) = newest else {
            return Ok(None);
        };
        let delta = saved16.wrapping_sub(ring_idx as u16);
        let h = &snap.header;
        let rsp_prod = extend_index(h.rsp_prod_pvt, delta, used16);
        let req_prod = extend_index(h.req_cons, delta, avail16);
        let plan = plan_recovery(
            snap,
            rsp_prod,
            req_prod,
            u32::from(self.size()),
            POISON_THRESHOLD,
        )
        .map_err(|e| proto(format!("recovery impossible: {e}")))?;
        let log = self
            .log
            .as_ref()
            .ok_or_else(|| proto("no shadow log".into()))?;
        log.log_recovered(&plan).map_err(|e| proto(e.to_string()))?;
        log.mark_complete().map_err(|e| proto(e.to_string()))?;
        self.delta = delta;
        self.next_avail = plan.req_cons;
        self.next_used = plan.rsp_prod;
        self.published = plan.rsp_prod;
        self.avail_seen = guest_index(self.next_avail, self.delta);
        Ok(Some(plan))
    }
}
