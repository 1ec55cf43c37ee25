//! The shadow log in shared memory: the writer (the live backend instance)
//! and the readers (the supervisor's watchdog, the next instance).

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use shadowback_ring::{SharedRegion, PAGE_SIZE};

use crate::crash::{CrashHook, CrashPoint, Transition};
use crate::layout::{self, entry, entry_offset, header, EntryId, EntryState};
use crate::layout::{ENTRY_SIZE, REQUEST_SIZE, RESPONSE_SIZE};
use crate::plan::RecoveryPlan;
use crate::snapshot::{validate_entry_count, LogHeader, LogSnapshot};
use crate::ShadowError;

/// The per-ring shadow log (docs/ARCHITECTURE.md §6), layout in
/// [`crate::layout`].
///
/// The supervisor [`create`](Self::create)s it and keeps the memfd; every
/// backend instance [`open`](Self::open)s the memfd it is handed, and the
/// one taking over calls [`begin_instance`](Self::begin_instance) after
/// the previous one is fenced — only then may it use the writer methods.
/// A hot standby may open the log early; it must not begin before the old
/// instance has fully exited.
///
/// Writer methods take `&self` and serialise on an internal lock, but the
/// protocol has a single writer process: two processes writing the same
/// log is a supervisor bug this type cannot detect.
pub struct ShadowLog {
    region: SharedRegion,
    entries: u32,
    writer: Mutex<Option<Writer>>,
    hook: Option<CrashHook>,
}

/// What the live instance keeps in private memory about the log it owns.
/// Rebuilt from the log by `begin_instance`; shared memory stays the truth.
#[derive(Debug)]
struct Writer {
    next_seq: u64,
    req_cons: u32,
    rsp_prod_pvt: u32,
    /// Entries in state FREE, as a stack; `is_free[i]` says whether entry
    /// `i` is on it, so every operation on it is O(1).
    free: Vec<u32>,
    is_free: Vec<bool>,
    /// Per entry: how many bytes of its request field may be non-zero (the
    /// longest request written there since the instance began), so a
    /// shorter request clears only what is left of a longer one instead of
    /// writing all [`REQUEST_SIZE`] bytes (a netif slot is 25).
    request_len: Vec<u8>,
    /// COMPLETING entries this instance wrote, with their `rsp_idx`, to be
    /// freed once `rsp_prod` covers them.
    completing: Completing,
    /// Whether this instance has published a response yet.
    productive: bool,
}

/// The COMPLETING entries of the live instance with their `rsp_idx`: a
/// set over entry indices with O(1) insert and remove, so answering and
/// freeing an entry costs the same whatever the ring size. Publishing
/// walks only the entries still waiting for `rsp_prod`.
#[derive(Debug)]
struct Completing {
    /// Entries in the set with their `rsp_idx`, in the order they were
    /// answered (until a removal moves the last one into its place).
    members: Vec<(u32, u32)>,
    /// Per entry: its position in `members`, or [`Completing::ABSENT`].
    pos: Vec<u32>,
    /// A spare vector for `take_covered`, so publishing does not allocate.
    spare: Vec<u32>,
}

impl Completing {
    const ABSENT: u32 = u32::MAX;

    fn new(entries: u32) -> Self {
        Completing {
            members: Vec::with_capacity(entries as usize),
            pos: vec![Self::ABSENT; entries as usize],
            spare: Vec::with_capacity(entries as usize),
        }
    }

    /// Adds entry `i` answered at `rsp_idx`, or moves it there (re-push).
    fn insert(&mut self, i: u32, rsp_idx: u32) {
        let Some(pos) = self.pos.get_mut(i as usize) else {
            return;
        };
        match self.members.get_mut(*pos as usize) {
            Some(member) => member.1 = rsp_idx,
            None => {
                *pos = self.members.len() as u32;
                self.members.push((i, rsp_idx));
            }
        }
    }

    fn remove(&mut self, i: u32) {
        let Some(pos) = self.pos.get_mut(i as usize) else {
            return;
        };
        let at = std::mem::replace(pos, Self::ABSENT) as usize;
        if at >= self.members.len() {
            return;
        }
        self.members.swap_remove(at);
        if let Some(&(moved, _)) = self.members.get(at) {
            if let Some(p) = self.pos.get_mut(moved as usize) {
                *p = at as u32;
            }
        }
    }

    /// Takes out the entries whose response `rsp_prod` publishes, in
    /// `members` order: `rsp_idx` in `[rsp_prod - size, rsp_prod)` by
    /// wrapping difference — at most `size` responses are ever
    /// unpublished. Hand the vector back with [`recycle`](Self::recycle).
    fn take_covered(&mut self, rsp_prod: u32, size: u32) -> Vec<u32> {
        let mut out = std::mem::take(&mut self.spare);
        out.clear();
        let covered = |r: u32| {
            let behind = rsp_prod.wrapping_sub(r);
            behind >= 1 && behind <= size
        };
        self.members.retain(|&(i, r)| {
            if covered(r) {
                out.push(i);
                false
            } else {
                true
            }
        });
        for &i in &out {
            if let Some(p) = self.pos.get_mut(i as usize) {
                *p = Self::ABSENT;
            }
        }
        for (at, &(i, _)) in self.members.iter().enumerate() {
            if let Some(p) = self.pos.get_mut(i as usize) {
                *p = at as u32;
            }
        }
        out
    }

    fn recycle(&mut self, v: Vec<u32>) {
        self.spare = v;
    }
}

impl std::fmt::Debug for ShadowLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShadowLog")
            .field("entries", &self.entries)
            .field("pages", &self.region.pages())
            .field("crash_hook", &self.hook.is_some())
            .finish_non_exhaustive()
    }
}

impl ShadowLog {
    /// Creates a zeroed log for a fresh ring of `ring_size` slots
    /// (supervisor side): every entry FREE, every index 0, generation 0.
    pub fn create(ring_size: u32) -> Result<Self, ShadowError> {
        Self::create_at(ring_size, 0)
    }

    /// Creates a log for a ring whose backend attaches at `rsp_prod`
    /// (`BACK_RING_ATTACH`): logged `req_cons` and `rsp_prod_pvt` start
    /// there. Done before any backend sees the log, so it needs no crash
    /// protocol.
    pub fn create_at(ring_size: u32, rsp_prod: u32) -> Result<Self, ShadowError> {
        validate_entry_count(ring_size)?;
        let pages = layout::log_bytes(ring_size).div_ceil(PAGE_SIZE as u64);
        let pages = u32::try_from(pages).map_err(|_| ShadowError::BadEntryCount(ring_size))?;
        let region = SharedRegion::create("shadowback-shadow-log", pages)?;
        region.store(layout::VERSION, header::VERSION, Ordering::Relaxed)?;
        region.store(ring_size, header::ENTRY_COUNT, Ordering::Relaxed)?;
        region.store(ENTRY_SIZE, header::ENTRY_SIZE, Ordering::Relaxed)?;
        region.store(rsp_prod, header::REQ_CONS, Ordering::Relaxed)?;
        region.store(rsp_prod, header::RSP_PROD_PVT, Ordering::Relaxed)?;
        // Release: a reader that sees the magic sees the fields above.
        region.store(layout::MAGIC, header::MAGIC, Ordering::Release)?;
        Ok(Self::with_region(region, ring_size))
    }

    /// Maps a log received from the supervisor (backend side), validating
    /// its header and size. A corrupt header is an error.
    pub fn open(fd: OwnedFd) -> Result<Self, ShadowError> {
        let region = SharedRegion::from_fd(fd)?;
        if region.len() < layout::HEADER_SIZE {
            return Err(ShadowError::TooSmall {
                len: region.len(),
                need: layout::HEADER_SIZE,
            });
        }
        // Acquire pairs with the release store of the magic in `create`.
        let _: u64 = region.load(header::MAGIC, Ordering::Acquire)?;
        let mut raw = [0u8; layout::HEADER_SIZE as usize];
        region.read(0, &mut raw)?;
        let hdr = LogHeader::parse(&raw).ok_or(ShadowError::TooSmall {
            len: region.len(),
            need: layout::HEADER_SIZE,
        })?;
        hdr.validate()?;
        let need = layout::log_bytes(hdr.entry_count);
        if region.len() < need {
            return Err(ShadowError::TooSmall {
                len: region.len(),
                need,
            });
        }
        Ok(Self::with_region(region, hdr.entry_count))
    }

    fn with_region(region: SharedRegion, entries: u32) -> Self {
        ShadowLog {
            region,
            entries,
            writer: Mutex::new(None),
            hook: None,
        }
    }

    /// The memfd, to hand to a backend instance.
    pub fn file(&self) -> &File {
        self.region.file()
    }

    /// Number of entries (the ring size).
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Installs (or removes) the crash-point hook; see [`crate::crash`].
    pub fn set_crash_hook(&mut self, hook: Option<CrashHook>) {
        self.hook = hook;
    }

    /// Generation of the instance owning the log.
    pub fn generation(&self) -> Result<u64, ShadowError> {
        // Acquire: read by the supervisor, written by the backend.
        Ok(self.region.load(header::GENERATION, Ordering::Acquire)?)
    }

    /// The heartbeat counter (the watchdog's, docs/ARCHITECTURE.md §7.2).
    pub fn read_heartbeat(&self) -> Result<u64, ShadowError> {
        // Acquire pairs with the release in `heartbeat`.
        Ok(self.region.load(header::HEARTBEAT, Ordering::Acquire)?)
    }

    /// Instances started since one last published a response: above 1, a
    /// recovering instance suspects a crash loop and replays serially
    /// (docs/ARCHITECTURE.md §7.5).
    pub fn stalled_instances(&self) -> Result<u32, ShadowError> {
        Ok(self
            .region
            .load(header::STALLED_INSTANCES, Ordering::Acquire)?)
    }

    /// Whether the log accounts for every request in flight on its ring.
    ///
    /// A log starts incomplete. For a ring whose previous backend left no
    /// record but the log (a Xen ring, a fresh virtqueue) that changes
    /// nothing. For a virtqueue whose VMM kept its own record of the heads
    /// in flight across a restart of the supervisor (the in-flight region),
    /// the first instance adopts that record into the log and only then
    /// calls [`mark_complete`](Self::mark_complete): an instance that dies
    /// half-way through the adoption leaves the log incomplete, and its
    /// successor adopts again from the record instead of trusting a log
    /// that holds only part of it (docs/ARCHITECTURE.md §7.4).
    pub fn is_complete(&self) -> Result<bool, ShadowError> {
        // Acquire pairs with the release in `mark_complete`.
        let v: u32 = self.region.load(header::COMPLETE, Ordering::Acquire)?;
        Ok(v == 1)
    }

    /// Records that the log now accounts for every request in flight (one
    /// store: no crash point can fall inside it). Needs the writer.
    pub fn mark_complete(&self) -> Result<(), ShadowError> {
        let mut guard = self.lock();
        writer(&mut guard)?;
        // Release: every entry logged before is visible to whoever sees
        // the flag.
        self.region
            .store(1u32, header::COMPLETE, Ordering::Release)?;
        Ok(())
    }

    /// Copies the whole log out. Take it after the previous writer is
    /// fenced (docs/ARCHITECTURE.md §7.3); a copy of a log still being written
    /// may be torn, and the planner then reports corrupt entries instead
    /// of a plan for the real state.
    pub fn snapshot(&self) -> Result<LogSnapshot, ShadowError> {
        // Acquire: everything the (dead) writer stored before its last
        // release store is visible to the copy below.
        fence(Ordering::Acquire);
        let len = layout::log_bytes(self.entries);
        let mut bytes = vec![0u8; len as usize];
        self.region.read(0, &mut bytes)?;
        LogSnapshot::parse(&bytes)
    }

    /// Increments the heartbeat. Called by the live instance from its
    /// event loop; needs no writer lock (one store, one writer).
    pub fn heartbeat(&self) -> Result<(), ShadowError> {
        let beat: u64 = self.region.load(header::HEARTBEAT, Ordering::Relaxed)?;
        // Release: pairs with `read_heartbeat` (watchdog).
        self.region
            .store(beat.wrapping_add(1), header::HEARTBEAT, Ordering::Release)?;
        Ok(())
    }

    /// Takes the log over for a new instance (docs/ARCHITECTURE.md §6): bumps
    /// the generation and the crash-loop counter and rebuilds the private
    /// writer state from the log. Returns the new generation. Call only
    /// once the previous instance has exited.
    pub fn begin_instance(&self) -> Result<u64, ShadowError> {
        let mut guard = self.lock();
        // Acquire: see every store of the fenced previous instance.
        fence(Ordering::Acquire);
        let mut free = Vec::new();
        let mut is_free = vec![false; self.entries as usize];
        for i in (0..self.entries).rev() {
            let state: u32 = self
                .region
                .load(self.field(i, entry::STATE), Ordering::Acquire)?;
            if state == EntryState::Free.word() {
                free.push(i);
                is_free[i as usize] = true;
            }
        }
        let writer = Writer {
            next_seq: self.region.load(header::NEXT_SEQ, Ordering::Relaxed)?,
            req_cons: self.region.load(header::REQ_CONS, Ordering::Relaxed)?,
            rsp_prod_pvt: self.region.load(header::RSP_PROD_PVT, Ordering::Relaxed)?,
            free,
            is_free,
            // Unknown: whatever an earlier instance wrote.
            request_len: vec![REQUEST_SIZE as u8; self.entries as usize],
            completing: Completing::new(self.entries),
            productive: false,
        };
        let generation = self.generation()?.wrapping_add(1);
        let stalled = self.stalled_instances()?.saturating_add(1);
        let t = Transition::Begin;
        self.point(t, 0);
        // Release: the supervisor reading the generation sees the takeover.
        self.region
            .store(generation, header::GENERATION, Ordering::Release)?;
        self.point(t, 1);
        self.region
            .store(stalled, header::STALLED_INSTANCES, Ordering::Release)?;
        self.point(t, 2);
        *guard = Some(writer);
        tracing::debug!(generation, stalled, "shadow log taken over");
        Ok(generation)
    }

    /// Logs the request consumed at ring index `ring_idx` (docs/ARCHITECTURE.md
    /// §7.1, consume): copies it into a FREE entry with a new `seq`, commits the
    /// entry as INFLIGHT, then advances the logged `req_cons` to
    /// `ring_idx + 1`. Requests must be logged in ring order; `request` is
    /// the slot's bytes (at most 112, zero-padded).
    pub fn log_consumed(&self, ring_idx: u32, request: &[u8]) -> Result<EntryId, ShadowError> {
        let mut guard = self.lock();
        let w = writer(&mut guard)?;
        self.consumed(&self.words()?, w, ring_idx, request)
    }

    /// The `consume` transition, compiled with crash points if the log
    /// has a hook (see [`point_if`](Self::point_if)).
    fn consumed(
        &self,
        words: &LogWords<'_>,
        w: &mut Writer,
        ring_idx: u32,
        request: &[u8],
    ) -> Result<EntryId, ShadowError> {
        if self.hook.is_some() {
            self.consumed_locked::<true>(words, w, ring_idx, request)
        } else {
            self.consumed_locked::<false>(words, w, ring_idx, request)
        }
    }

    fn consumed_locked<const HOOKED: bool>(
        &self,
        words: &LogWords<'_>,
        w: &mut Writer,
        ring_idx: u32,
        request: &[u8],
    ) -> Result<EntryId, ShadowError> {
        if ring_idx != w.req_cons {
            return Err(ShadowError::OutOfOrder {
                expected: w.req_cons,
                got: ring_idx,
            });
        }
        if request.len() > REQUEST_SIZE {
            return Err(ShadowError::PayloadTooLong {
                len: request.len(),
                max: REQUEST_SIZE,
            });
        }
        let seq = w.next_seq;
        let next_seq = seq.checked_add(1).ok_or(ShadowError::SeqExhausted)?;
        let i = *w.free.last().ok_or(ShadowError::LogFull)?;
        let e = words.entry(i)?;
        let t = Transition::Consume;
        self.point_if::<HOOKED>(t, 0);
        // The seq is burnt before it is used: a crash from here on leaves a
        // gap in seq order, never a duplicate.
        words.next_seq.store(next_seq, Ordering::Relaxed);
        w.next_seq = next_seq;
        w.free.pop();
        if let Some(f) = w.is_free.get_mut(i as usize) {
            *f = false;
        }
        self.point_if::<HOOKED>(t, 1);
        // The field ends up as `request`, zero-padded, as if written whole.
        let field = e.request();
        let written = store_bytes(field, request);
        if let Some(stale) = w.request_len.get_mut(i as usize) {
            for word in field
                .iter()
                .take(usize::from(*stale).div_ceil(4))
                .skip(written)
            {
                word.store(0, Ordering::Relaxed);
            }
            // At most REQUEST_SIZE (checked above), which fits a u8.
            *stale = request.len() as u8;
        }
        self.point_if::<HOOKED>(t, 2);
        e.store_payload(E_RING_IDX, ring_idx);
        self.point_if::<HOOKED>(t, 3);
        // Relaxed: payload, published by the release store of `state`.
        e.w64[E_SEQ].store(seq, Ordering::Relaxed);
        self.point_if::<HOOKED>(t, 4);
        e.store_payload(E_PROGRESS, 0);
        self.point_if::<HOOKED>(t, 5);
        e.store_payload(E_REPLAYS, 0);
        self.point_if::<HOOKED>(t, 6);
        // Release = the commit of §7.1: the payload above is complete
        // before the entry reads INFLIGHT.
        e.commit(EntryState::Inflight);
        self.point_if::<HOOKED>(t, 7);
        let req_cons = ring_idx.wrapping_add(1);
        // Release: logged req_cons never runs ahead of the entry for it.
        words.req_cons.store(req_cons, Ordering::Release);
        w.req_cons = req_cons;
        self.point_if::<HOOKED>(t, 8);
        Ok(EntryId(i))
    }

    /// Logs the response written to ring slot `rsp_idx` for `entry`
    /// (docs/ARCHITECTURE.md §7.1, complete): saves it and `rsp_idx`, commits the
    /// entry as COMPLETING, then raises the logged `rsp_prod_pvt` to
    /// `rsp_idx + 1`. Call after writing the ring slot and before
    /// publishing `rsp_prod`. `response` is at most 16 bytes.
    ///
    /// An INFLIGHT entry takes the `complete` transition. Any other non-FREE
    /// entry — one the recovery plan called corrupt, being answered with an
    /// error — takes `rewrite`, which first marks it REWRITING so a crash
    /// while its response bytes change leaves it corrupt, not half-answered.
    pub fn log_completing(
        &self,
        entry: EntryId,
        rsp_idx: u32,
        response: &[u8],
    ) -> Result<(), ShadowError> {
        let mut guard = self.lock();
        let w = writer(&mut guard)?;
        self.completing(&self.words()?, w, entry, rsp_idx, response)
    }

    /// The `complete` or `rewrite` transition; as
    /// [`consumed`](Self::consumed).
    fn completing(
        &self,
        words: &LogWords<'_>,
        w: &mut Writer,
        entry: EntryId,
        rsp_idx: u32,
        response: &[u8],
    ) -> Result<(), ShadowError> {
        if self.hook.is_some() {
            self.completing_locked::<true>(words, w, entry, rsp_idx, response)
        } else {
            self.completing_locked::<false>(words, w, entry, rsp_idx, response)
        }
    }

    fn completing_locked<const HOOKED: bool>(
        &self,
        words: &LogWords<'_>,
        w: &mut Writer,
        entry: EntryId,
        rsp_idx: u32,
        response: &[u8],
    ) -> Result<(), ShadowError> {
        let i = self.check(entry)?;
        if response.len() > RESPONSE_SIZE {
            return Err(ShadowError::PayloadTooLong {
                len: response.len(),
                max: RESPONSE_SIZE,
            });
        }
        let e = words.entry(i)?;
        let state = e.w32[E_STATE].load(Ordering::Relaxed);
        let (t, mut step) = match EntryState::from_word(state) {
            Some(EntryState::Free) => return Err(ShadowError::WrongState { entry: i, state }),
            Some(EntryState::Inflight) => {
                self.point_if::<HOOKED>(Transition::Complete, 0);
                (Transition::Complete, 0)
            }
            _ => {
                let t = Transition::Rewrite;
                self.point_if::<HOOKED>(t, 0);
                // Release: the entry reads REWRITING before its response
                // bytes start to change.
                e.commit(EntryState::Rewriting);
                self.point_if::<HOOKED>(t, 1);
                (t, 1)
            }
        };
        // The whole field, zero-padded.
        let field = e.response();
        let written = store_bytes(field, response);
        for word in field.iter().skip(written) {
            word.store(0, Ordering::Relaxed);
        }
        step += 1;
        self.point_if::<HOOKED>(t, step);
        e.store_payload(E_RSP_IDX, rsp_idx);
        step += 1;
        self.point_if::<HOOKED>(t, step);
        // Release = the commit of §7.1: response and rsp_idx are complete
        // before the entry reads COMPLETING.
        e.commit(EntryState::Completing);
        step += 1;
        self.point_if::<HOOKED>(t, step);
        raise_rsp_prod_pvt(words.rsp_prod_pvt, w, rsp_idx);
        step += 1;
        self.point_if::<HOOKED>(t, step);
        w.completing.insert(i, rsp_idx);
        Ok(())
    }

    /// Records that the saved response of a COMPLETING entry was re-pushed
    /// at ring slot `rsp_idx` (re-push renumbering, docs/ARCHITECTURE.md §7.5). Only
    /// `rsp_idx` changes: a single store, so the entry is never torn.
    pub fn log_repushed(&self, entry: EntryId, rsp_idx: u32) -> Result<(), ShadowError> {
        let mut guard = self.lock();
        let w = writer(&mut guard)?;
        let i = self.check(entry)?;
        let state: u32 = self
            .region
            .load(self.field(i, entry::STATE), Ordering::Relaxed)?;
        if state != EntryState::Completing.word() {
            return Err(ShadowError::WrongState { entry: i, state });
        }
        let t = Transition::Repush;
        self.point(t, 0);
        // Release: ordered after the ring slot written by the caller.
        self.region
            .store(rsp_idx, self.field(i, entry::RSP_IDX), Ordering::Release)?;
        self.point(t, 1);
        raise_rsp_prod_pvt(self.region.atomic_u32(header::RSP_PROD_PVT)?, w, rsp_idx);
        self.point(t, 2);
        w.completing.insert(i, rsp_idx);
        Ok(())
    }

    /// Frees `entry`, whatever its state: after its response is published,
    /// or when the recovery plan says to (`free`, discarded corrupt
    /// entries).
    pub fn free(&self, entry: EntryId) -> Result<(), ShadowError> {
        let mut guard = self.lock();
        let w = writer(&mut guard)?;
        let i = self.check(entry)?;
        w.completing.remove(i);
        self.free_locked::<true>(&self.words()?, w, i)
    }

    /// The `free` transition of entry `i`, already out of the COMPLETING
    /// set.
    fn free_locked<const HOOKED: bool>(
        &self,
        words: &LogWords<'_>,
        w: &mut Writer,
        i: u32,
    ) -> Result<(), ShadowError> {
        let e = words.entry(i)?;
        let t = Transition::Free;
        self.point_if::<HOOKED>(t, 0);
        // Release = §7.1, freeing the published batch:
        // ordered after the caller's release store of sring.rsp_prod.
        e.commit(EntryState::Free);
        self.point_if::<HOOKED>(t, 1);
        if let Some(f) = w.is_free.get_mut(i as usize) {
            if !std::mem::replace(f, true) {
                w.free.push(i);
            }
        }
        Ok(())
    }

    /// Frees every COMPLETING entry this instance logged whose response is
    /// covered by the just-published `rsp_prod` (docs/ARCHITECTURE.md §7.1,
    /// last step of complete). The first publication of an instance also clears the
    /// crash-loop counter. Returns how many entries were freed.
    pub fn log_published(&self, rsp_prod: u32) -> Result<usize, ShadowError> {
        let mut guard = self.lock();
        let w = writer(&mut guard)?;
        self.published(&self.words()?, w, rsp_prod)
    }

    /// The `free` transitions of a publication, then `published`; as
    /// [`consumed`](Self::consumed).
    fn published(
        &self,
        words: &LogWords<'_>,
        w: &mut Writer,
        rsp_prod: u32,
    ) -> Result<usize, ShadowError> {
        if self.hook.is_some() {
            self.published_locked::<true>(words, w, rsp_prod)
        } else {
            self.published_locked::<false>(words, w, rsp_prod)
        }
    }

    fn published_locked<const HOOKED: bool>(
        &self,
        words: &LogWords<'_>,
        w: &mut Writer,
        rsp_prod: u32,
    ) -> Result<usize, ShadowError> {
        let published = w.completing.take_covered(rsp_prod, self.entries);
        let mut result = Ok(());
        for &i in &published {
            result = self.free_locked::<HOOKED>(words, w, i);
            if result.is_err() {
                break;
            }
        }
        let freed = published.len();
        w.completing.recycle(published);
        result?;
        if freed != 0 && !w.productive {
            let t = Transition::Published;
            self.point_if::<HOOKED>(t, 0);
            self.region
                .store(0u32, header::STALLED_INSTANCES, Ordering::Release)?;
            self.point_if::<HOOKED>(t, 1);
            w.productive = true;
        }
        Ok(freed)
    }

    /// Persists the recovered `req_cons` of `plan` (docs/ARCHITECTURE.md §7.5),
    /// before anything else is replayed: from here on the request the last
    /// instance consumed without logging `req_cons` is accounted for even
    /// once its entry leaves INFLIGHT.
    pub fn log_recovered(&self, plan: &RecoveryPlan) -> Result<(), ShadowError> {
        let mut guard = self.lock();
        let w = writer(&mut guard)?;
        let t = Transition::Recover;
        self.point(t, 0);
        // Release: the entries the plan was computed from are older.
        self.region
            .store(plan.req_cons, header::REQ_CONS, Ordering::Release)?;
        self.point(t, 1);
        w.req_cons = plan.req_cons;
        Ok(())
    }

    /// Counts one more replay of each entry (the crash-loop breaker,
    /// docs/ARCHITECTURE.md §7.5). Call
    /// just before re-submitting each one, not for the whole plan at once,
    /// so requests queued behind a poison request are not charged for the
    /// crashes it causes.
    pub fn mark_replayed(&self, entries: &[EntryId]) -> Result<(), ShadowError> {
        let mut guard = self.lock();
        writer(&mut guard)?;
        for &entry in entries {
            let i = self.check(entry)?;
            let field = self.field(i, entry::REPLAYS);
            let replays: u32 = self.region.load(field, Ordering::Relaxed)?;
            let t = Transition::Replay;
            self.point(t, 0);
            // Release: counted before the caller re-submits the request.
            self.region
                .store(replays.saturating_add(1), field, Ordering::Release)?;
            self.point(t, 1);
        }
        Ok(())
    }

    /// Stores per-class progress flags of `entry` (e.g. net TX "handed to
    /// the wire"), after the step they record has happened.
    pub fn set_progress(&self, entry: EntryId, flags: u32) -> Result<(), ShadowError> {
        let mut guard = self.lock();
        writer(&mut guard)?;
        self.progress(entry, flags)
    }

    /// [`set_progress`](Self::set_progress) under the writer's lock.
    fn progress(&self, entry: EntryId, flags: u32) -> Result<(), ShadowError> {
        let i = self.check(entry)?;
        let t = Transition::Progress;
        self.point(t, 0);
        // Release: ordered after the step the flag records.
        self.region
            .store(flags, self.field(i, entry::PROGRESS), Ordering::Release)?;
        self.point(t, 1);
        Ok(())
    }

    /// FREE entries left, as the writer sees them.
    pub fn free_entries(&self) -> Result<usize, ShadowError> {
        let mut guard = self.lock();
        Ok(writer(&mut guard)?.free.len())
    }

    /// The writer of the live instance, locked once for as many
    /// transitions as the caller logs in a row (a TX batch): see
    /// [`LogWriter`]. Needs [`begin_instance`](Self::begin_instance).
    pub fn writer(&self) -> Result<LogWriter<'_>, ShadowError> {
        let mut guard = self.lock();
        writer(&mut guard)?;
        Ok(LogWriter {
            log: self,
            words: self.words()?,
            guard,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<Writer>> {
        // A panicking crash hook (in-process crash tests) poisons the lock;
        // the writer state is then abandoned with the instance anyway.
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn point(&self, transition: Transition, step: u32) {
        if let Some(hook) = &self.hook {
            hook(CrashPoint { transition, step });
        }
    }

    /// [`point`](Self::point) in a transition compiled for a log with a
    /// crash hook (`HOOKED`) or for one without: the two are the same
    /// code, the stores and their order included, but the one without a
    /// hook has no call between its stores (the hot path; the crash-point
    /// sweeps run the other).
    #[inline(always)]
    fn point_if<const HOOKED: bool>(&self, transition: Transition, step: u32) {
        if HOOKED {
            self.point(transition, step);
        }
    }

    /// The log's words, checked against the region once, for the hot
    /// transitions (one [`LogWriter`] or one call).
    #[inline]
    fn words(&self) -> Result<LogWords<'_>, ShadowError> {
        let bytes = layout::log_bytes(self.entries) as usize;
        let w32 = self.region.atomic_u32_slice(0, bytes / 4)?;
        let w64 = self.region.atomic_u64_slice(0, bytes / 8)?;
        // A log has a header (`open` checked its length).
        let short = || ShadowError::TooSmall {
            len: bytes as u64,
            need: layout::HEADER_SIZE,
        };
        Ok(LogWords {
            w32,
            w64,
            next_seq: w64.get(header::NEXT_SEQ as usize / 8).ok_or_else(short)?,
            req_cons: w32.get(header::REQ_CONS as usize / 4).ok_or_else(short)?,
            rsp_prod_pvt: w32
                .get(header::RSP_PROD_PVT as usize / 4)
                .ok_or_else(short)?,
        })
    }

    fn check(&self, entry: EntryId) -> Result<u32, ShadowError> {
        if entry.0 >= self.entries {
            return Err(ShadowError::NoSuchEntry(entry.0));
        }
        Ok(entry.0)
    }

    fn field(&self, i: u32, off: u64) -> u64 {
        entry_offset(i) + off
    }
}

/// The whole log as atomics, checked against the region once per
/// [`LogWriter`], with the header words the hot transitions store.
struct LogWords<'a> {
    w32: &'a [AtomicU32],
    w64: &'a [AtomicU64],
    next_seq: &'a AtomicU64,
    req_cons: &'a AtomicU32,
    rsp_prod_pvt: &'a AtomicU32,
}

impl<'a> LogWords<'a> {
    /// Entry `i`'s words.
    #[inline(always)]
    fn entry(&self, i: u32) -> Result<EntryView<'a>, ShadowError> {
        let at = entry_offset(i) as usize;
        let w32 = self
            .w32
            .get(at / 4..at / 4 + ENTRY_WORDS)
            .and_then(|w| w.try_into().ok());
        let w64 = self
            .w64
            .get(at / 8..at / 8 + ENTRY_WORDS / 2)
            .and_then(|w| w.try_into().ok());
        match (w32, w64) {
            (Some(w32), Some(w64)) => Ok(EntryView { w32, w64 }),
            _ => Err(ShadowError::NoSuchEntry(i)),
        }
    }
}

/// One entry's words (layout in [`crate::layout`]), checked once per
/// transition: its fields are then fixed indices, and a transition's
/// dozen stores carry no check each (docs/ARCHITECTURE.md §11.6, what the
/// log costs per TX slot).
struct EntryView<'a> {
    w32: &'a [AtomicU32; ENTRY_WORDS],
    w64: &'a [AtomicU64; ENTRY_WORDS / 2],
}

const ENTRY_WORDS: usize = ENTRY_SIZE as usize / 4;
const E_STATE: usize = entry::STATE as usize / 4;
const E_RING_IDX: usize = entry::RING_IDX as usize / 4;
const E_SEQ: usize = entry::SEQ as usize / 8;
const E_PROGRESS: usize = entry::PROGRESS as usize / 4;
const E_RSP_IDX: usize = entry::RSP_IDX as usize / 4;
const E_REPLAYS: usize = entry::REPLAYS as usize / 4;
const E_REQUEST: usize = entry::REQUEST as usize / 4;
const E_RESPONSE: usize = entry::RESPONSE as usize / 4;
const _: () = assert!(
    ENTRY_SIZE.is_multiple_of(8)
        && layout::HEADER_SIZE.is_multiple_of(8)
        && entry::SEQ.is_multiple_of(8)
        && entry::REQUEST.is_multiple_of(8)
        && entry::RESPONSE.is_multiple_of(8)
        && REQUEST_SIZE.is_multiple_of(8)
        && RESPONSE_SIZE.is_multiple_of(8)
        && entry::RESPONSE as usize + RESPONSE_SIZE == ENTRY_SIZE as usize
);

impl EntryView<'_> {
    /// Stores a payload word.
    #[inline(always)]
    fn store_payload(&self, field: usize, val: u32) {
        // Relaxed: payload, published by the release store of `state`.
        self.w32[field].store(val, Ordering::Relaxed);
    }

    /// Release-stores the `state` word: the commit of a transition.
    #[inline(always)]
    fn commit(&self, state: EntryState) {
        self.w32[E_STATE].store(state.word(), Ordering::Release);
    }

    /// The request field, as 32-bit words (see [`store_bytes`]).
    #[inline(always)]
    fn request(&self) -> &[AtomicU32] {
        &self.w32[E_REQUEST..E_RESPONSE]
    }

    /// The response field, as 32-bit words.
    #[inline(always)]
    fn response(&self) -> &[AtomicU32] {
        &self.w32[E_RESPONSE..]
    }
}

/// Stores `bytes` at the start of `words` as a byte copy would leave them,
/// the last word zero-padded; returns how many words it stored. `bytes`
/// must fit (the callers check it). Relaxed: payload, published by the
/// release store of `state`.
///
/// 32-bit words, not 64: a record is built on the caller's stack just
/// before, by stores of its fields (netif's TX slot record: 8, 4, 4, 4, 4
/// and 1 bytes), and a 64-bit load spanning two of those stores cannot
/// take its bytes from the store buffer: it waits until both reach the
/// cache. A 32-bit load inside one store does not wait.
#[inline(always)]
fn store_bytes(words: &[AtomicU32], bytes: &[u8]) -> usize {
    let mut chunks = bytes.chunks_exact(4);
    let mut stored = 0;
    for (word, chunk) in words.iter().zip(&mut chunks) {
        let chunk: [u8; 4] = chunk.try_into().unwrap_or_default();
        word.store(u32::from_ne_bytes(chunk), Ordering::Relaxed);
        stored += 1;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        if let Some(word) = words.get(stored) {
            // Assembled in a register: copying the tail into a zeroed
            // array and loading that as a word stalls the load behind the
            // narrower stores, as above.
            let last = rest.iter().enumerate().fold(0u32, |acc, (k, &b)| {
                let shift = if cfg!(target_endian = "little") {
                    8 * k
                } else {
                    24 - 8 * k
                };
                acc | u32::from(b) << shift
            });
            word.store(last, Ordering::Relaxed);
            stored += 1;
        }
    }
    stored
}

/// Raises the logged `rsp_prod_pvt` (`word`) to `rsp_idx + 1`.
fn raise_rsp_prod_pvt(word: &AtomicU32, w: &mut Writer, rsp_idx: u32) {
    let new = rsp_idx.wrapping_add(1);
    // Only raise it (by wrapping difference): renumbered responses
    // during recovery go below the old value, and the logged value must
    // stay an upper bound of every rsp_idx in the log.
    if is_after(new, w.rsp_prod_pvt) {
        // Release: never ahead of the COMPLETING entry justifying it.
        word.store(new, Ordering::Release);
        w.rsp_prod_pvt = new;
    }
}

/// The live instance's writer, locked: the transitions of
/// [`ShadowLog::log_consumed`], [`ShadowLog::log_completing`] and
/// [`ShadowLog::log_published`] — the same stores in the same order, the
/// same crash points — for a caller logging many of them in a row, which
/// then takes the writer's lock once instead of once per transition (two
/// locked instructions each, per TX slot twice: a measurable part of what
/// the log costs a netif TX frame, issue 10). Drop it before another
/// thread needs the log.
pub struct LogWriter<'a> {
    log: &'a ShadowLog,
    words: LogWords<'a>,
    guard: MutexGuard<'a, Option<Writer>>,
}

impl std::fmt::Debug for LogWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogWriter").field("log", self.log).finish()
    }
}

impl LogWriter<'_> {
    /// [`ShadowLog::log_consumed`].
    pub fn log_consumed(&mut self, ring_idx: u32, request: &[u8]) -> Result<EntryId, ShadowError> {
        let w = writer(&mut self.guard)?;
        self.log.consumed(&self.words, w, ring_idx, request)
    }

    /// [`ShadowLog::log_completing`].
    pub fn log_completing(
        &mut self,
        entry: EntryId,
        rsp_idx: u32,
        response: &[u8],
    ) -> Result<(), ShadowError> {
        let w = writer(&mut self.guard)?;
        self.log
            .completing(&self.words, w, entry, rsp_idx, response)
    }

    /// [`ShadowLog::log_published`].
    pub fn log_published(&mut self, rsp_prod: u32) -> Result<usize, ShadowError> {
        let w = writer(&mut self.guard)?;
        self.log.published(&self.words, w, rsp_prod)
    }

    /// [`ShadowLog::set_progress`].
    pub fn set_progress(&mut self, entry: EntryId, flags: u32) -> Result<(), ShadowError> {
        writer(&mut self.guard)?;
        self.log.progress(entry, flags)
    }
}

impl AsFd for ShadowLog {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.region.as_fd()
    }
}

fn writer<'a>(
    guard: &'a mut MutexGuard<'_, Option<Writer>>,
) -> Result<&'a mut Writer, ShadowError> {
    guard.as_mut().ok_or(ShadowError::NotBegun)
}

const _: () = assert!(REQUEST_SIZE <= u8::MAX as usize);

/// `a` is after `b` on the free-running index circle.
fn is_after(a: u32, b: u32) -> bool {
    let d = a.wrapping_sub(b);
    d != 0 && d < 1 << 31
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::sync::Arc;

    fn begun(size: u32) -> ShadowLog {
        let log = ShadowLog::create(size).unwrap();
        assert_eq!(log.begin_instance().unwrap(), 1);
        log
    }

    #[test]
    fn create_at_starts_the_indices() {
        let log = ShadowLog::create_at(4, u32::MAX).unwrap();
        let snap = log.snapshot().unwrap();
        assert_eq!(
            (snap.header.req_cons, snap.header.rsp_prod_pvt),
            (u32::MAX, u32::MAX)
        );
        log.begin_instance().unwrap();
        log.log_consumed(u32::MAX, &[0; 112]).unwrap();
        log.log_consumed(0, &[0; 112]).unwrap();
        assert_eq!(log.snapshot().unwrap().header.req_cons, 1);
    }

    /// A request shorter than the one an entry held before is saved
    /// zero-padded, as if the whole field were written, in this instance
    /// and in the next (which does not know what the last one wrote).
    #[test]
    fn a_short_request_in_a_reused_entry_is_zero_padded() {
        let log = begun(4);
        let entry_of = |log: &ShadowLog, ring_idx: u32| {
            let snap = log.snapshot().unwrap();
            let e = snap
                .entries
                .iter()
                .find(|e| e.ring_idx == ring_idx && e.state == EntryState::Inflight.word());
            e.unwrap().request
        };
        let serve = |log: &ShadowLog, idx: u32, request: &[u8]| {
            let e = log.log_consumed(idx, request).unwrap();
            let saved = entry_of(log, idx);
            log.log_completing(e, idx, &[1]).unwrap();
            assert_eq!(log.log_published(idx + 1).unwrap(), 1);
            saved
        };
        let mut want = [0u8; REQUEST_SIZE];
        want[..3].copy_from_slice(&[1, 2, 3]);
        assert_eq!(serve(&log, 0, &[0xAB; REQUEST_SIZE]), [0xAB; REQUEST_SIZE]);
        // The free stack hands the same entry out again.
        assert_eq!(serve(&log, 1, &[1, 2, 3]), want);
        assert_eq!(serve(&log, 2, &[0xCD; 40])[..40], [0xCD; 40]);
        assert_eq!(serve(&log, 3, &[1, 2, 3]), want);
        assert_eq!(serve(&log, 4, &[0xEF; REQUEST_SIZE]), [0xEF; REQUEST_SIZE]);
        // A netif TX slot's record: whole words, then a one-byte tail.
        let slot: Vec<u8> = (1..=25).collect();
        let mut want_slot = [0u8; REQUEST_SIZE];
        want_slot[..25].copy_from_slice(&slot);
        assert_eq!(serve(&log, 5, &slot), want_slot);
        assert_eq!(serve(&log, 6, &[0xEF; REQUEST_SIZE]), [0xEF; REQUEST_SIZE]);
        let next = ShadowLog::open(log.file().try_clone().unwrap().into()).unwrap();
        drop(log);
        next.begin_instance().unwrap();
        assert_eq!(serve(&next, 7, &[1, 2, 3]), want);
    }

    #[test]
    fn create_open_round_trip() {
        let log = ShadowLog::create(32).unwrap();
        let other = ShadowLog::open(log.file().try_clone().unwrap().into()).unwrap();
        assert_eq!(other.entries(), 32);
        assert_eq!(other.snapshot().unwrap(), LogSnapshot::empty(32));
        assert!(matches!(
            ShadowLog::create(3),
            Err(ShadowError::BadEntryCount(3))
        ));
        assert!(matches!(
            ShadowLog::create(0),
            Err(ShadowError::BadEntryCount(0))
        ));
    }

    #[test]
    fn open_rejects_a_corrupt_header() {
        let log = ShadowLog::create(32).unwrap();
        let fd = || log.file().try_clone().unwrap().into();
        log.region
            .store(64u32, header::ENTRY_COUNT, Ordering::Relaxed)
            .unwrap();
        assert!(matches!(
            ShadowLog::open(fd()),
            Err(ShadowError::TooSmall { .. })
        ));
        log.region
            .store(33u32, header::ENTRY_COUNT, Ordering::Relaxed)
            .unwrap();
        assert!(matches!(
            ShadowLog::open(fd()),
            Err(ShadowError::BadEntryCount(33))
        ));
        log.region
            .store(32u32, header::ENTRY_COUNT, Ordering::Relaxed)
            .unwrap();
        log.region
            .store(7u32, header::VERSION, Ordering::Relaxed)
            .unwrap();
        assert!(matches!(
            ShadowLog::open(fd()),
            Err(ShadowError::BadVersion(7))
        ));
        log.region
            .store(0u64, header::MAGIC, Ordering::Relaxed)
            .unwrap();
        assert!(matches!(
            ShadowLog::open(fd()),
            Err(ShadowError::BadMagic(0))
        ));
    }

    #[test]
    fn writer_methods_need_begin() {
        let log = ShadowLog::create(4).unwrap();
        assert!(matches!(
            log.log_consumed(0, &[0; 112]),
            Err(ShadowError::NotBegun)
        ));
        assert!(matches!(log.free(EntryId(0)), Err(ShadowError::NotBegun)));
        assert!(matches!(log.writer(), Err(ShadowError::NotBegun)));
    }

    /// A batch logged through one [`LogWriter`] passes the same crash
    /// points and leaves the same log as the same transitions made one
    /// call at a time; a misuse is refused the same way.
    #[test]
    fn one_writer_for_a_batch_logs_what_single_calls_log() {
        type Seen = Arc<Mutex<Vec<CrashPoint>>>;
        let hooked = || {
            let mut log = ShadowLog::create(8).unwrap();
            let seen: Seen = Arc::default();
            let s = seen.clone();
            log.set_crash_hook(Some(Box::new(move |p| s.lock().unwrap().push(p))));
            log.begin_instance().unwrap();
            (log, seen)
        };
        let request = |i: u32| [i as u8 + 1; 25];
        let response = |i: u32| [i as u8 + 0x40; 4];
        let (single, single_seen) = hooked();
        let (batched, batched_seen) = hooked();
        for round in 0..3u32 {
            let first = round * 5;
            let ids: Vec<EntryId> = (first..first + 5)
                .map(|i| single.log_consumed(i, &request(i)).unwrap())
                .collect();
            single.set_progress(ids[1], round + 1).unwrap();
            // Answered out of order, published in two steps.
            for (k, &e) in ids.iter().enumerate().rev() {
                let at = first + 4 - k as u32;
                single.log_completing(e, at, &response(at)).unwrap();
            }
            assert_eq!(single.log_published(first + 2).unwrap(), 2);
            assert_eq!(single.log_published(first + 5).unwrap(), 3);

            let mut w = batched.writer().unwrap();
            let ids: Vec<EntryId> = (first..first + 5)
                .map(|i| w.log_consumed(i, &request(i)).unwrap())
                .collect();
            w.set_progress(ids[1], round + 1).unwrap();
            for (k, &e) in ids.iter().enumerate().rev() {
                let at = first + 4 - k as u32;
                w.log_completing(e, at, &response(at)).unwrap();
            }
            assert_eq!(w.log_published(first + 2).unwrap(), 2);
            assert_eq!(w.log_published(first + 5).unwrap(), 3);
            assert!(matches!(
                w.log_consumed(first, &request(0)),
                Err(ShadowError::OutOfOrder { .. })
            ));
            assert!(matches!(
                w.log_completing(ids[0], 0, &[0; 17]),
                Err(ShadowError::PayloadTooLong { .. })
            ));
            assert!(w.set_progress(EntryId(8), 1).is_err());
        }
        assert_eq!(single.snapshot().unwrap(), batched.snapshot().unwrap());
        assert_eq!(*single_seen.lock().unwrap(), *batched_seen.lock().unwrap());
        assert!(single_seen.lock().unwrap().len() > 3 * 5 * 2);
    }

    #[test]
    fn a_request_goes_through_every_state() {
        let log = begun(4);
        let mut req = [0u8; 112];
        req[8] = 42;
        let e = log.log_consumed(0, &req).unwrap();
        let snap = log.snapshot().unwrap();
        let s = snap.entries[e.index() as usize];
        assert_eq!(s.state(), Some(EntryState::Inflight));
        assert_eq!((s.ring_idx, s.seq, s.replays), (0, 0, 0));
        assert_eq!(s.request, req);
        assert_eq!((snap.header.req_cons, snap.header.next_seq), (1, 1));

        log.set_progress(e, 5).unwrap();
        log.log_completing(e, 0, &[7; 16]).unwrap();
        let snap = log.snapshot().unwrap();
        let s = snap.entries[e.index() as usize];
        assert_eq!(s.state(), Some(EntryState::Completing));
        assert_eq!((s.rsp_idx, s.response, s.progress), (0, [7; 16], 5));
        assert_eq!(snap.header.rsp_prod_pvt, 1);
        assert_eq!(snap.header.stalled_instances, 1);

        assert_eq!(log.log_published(0).unwrap(), 0);
        assert_eq!(log.log_published(1).unwrap(), 1);
        let snap = log.snapshot().unwrap();
        assert_eq!(
            snap.entries[e.index() as usize].state(),
            Some(EntryState::Free)
        );
        assert_eq!(snap.header.stalled_instances, 0);
        assert_eq!(log.free_entries().unwrap(), 4);

        // The same entry again, with a shorter response (netif's TX
        // answer, 8 bytes; then one with a tail): zero-padded.
        for (idx, rsp) in [
            (1u32, &[1u8, 2, 3, 4, 5, 6, 7, 8][..]),
            (2, &[9, 8, 7, 6, 5][..]),
        ] {
            let again = log.log_consumed(idx, &[1; 25]).unwrap();
            assert_eq!(again, e);
            log.log_completing(again, idx, rsp).unwrap();
            let s = log.snapshot().unwrap().entries[e.index() as usize];
            let mut want = [0u8; 16];
            want[..rsp.len()].copy_from_slice(rsp);
            assert_eq!(s.response, want);
            assert_eq!(log.log_published(idx + 1).unwrap(), 1);
        }
    }

    #[test]
    fn misuse_is_an_error() {
        let log = begun(2);
        assert!(matches!(
            log.log_consumed(5, &[0; 112]),
            Err(ShadowError::OutOfOrder {
                expected: 0,
                got: 5
            })
        ));
        assert!(matches!(
            log.log_consumed(0, &[0; 113]),
            Err(ShadowError::PayloadTooLong { .. })
        ));
        assert!(matches!(
            log.log_completing(EntryId(0), 0, &[0; 16]),
            Err(ShadowError::WrongState { .. })
        ));
        assert!(matches!(
            log.free(EntryId(2)),
            Err(ShadowError::NoSuchEntry(2))
        ));
        log.log_consumed(0, &[0; 12]).unwrap();
        log.log_consumed(1, &[0; 12]).unwrap();
        assert!(matches!(
            log.log_consumed(2, &[0; 12]),
            Err(ShadowError::LogFull)
        ));
        assert!(matches!(
            log.log_repushed(EntryId(0), 0),
            Err(ShadowError::WrongState { .. })
        ));
    }

    #[test]
    fn generation_heartbeat_and_crash_loop_counter() {
        let log = ShadowLog::create(2).unwrap();
        assert_eq!(log.generation().unwrap(), 0);
        log.begin_instance().unwrap();
        log.begin_instance().unwrap();
        assert_eq!(log.generation().unwrap(), 2);
        assert_eq!(log.stalled_instances().unwrap(), 2);
        log.heartbeat().unwrap();
        log.heartbeat().unwrap();
        assert_eq!(log.read_heartbeat().unwrap(), 2);
    }

    #[test]
    fn hook_sees_every_step_in_order() {
        let mut log = ShadowLog::create(4).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        log.set_crash_hook(Some(Box::new(move |p| s.lock().unwrap().push(p))));
        log.begin_instance().unwrap();
        let e = log.log_consumed(0, &[1; 112]).unwrap();
        log.log_completing(e, 0, &[2; 16]).unwrap();
        log.log_published(1).unwrap();
        let seen = seen.lock().unwrap().clone();
        let mut expect = Vec::new();
        for t in [
            Transition::Begin,
            Transition::Consume,
            Transition::Complete,
            Transition::Free,
            Transition::Published,
        ] {
            expect.extend((0..t.crash_points()).map(|step| CrashPoint {
                transition: t,
                step,
            }));
        }
        assert_eq!(seen, expect);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

        /// A memfd with arbitrary contents (a plausible header or not):
        /// `open` gives a log or an error, and a log that opens can be
        /// snapshotted, planned and taken over without a panic.
        #[test]
        fn open_never_panics(
            pages in 1u32..4,
            order in 0u32..6,
            plausible in proptest::bool::ANY,
            fields in proptest::collection::vec(proptest::num::u8::ANY, 64),
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..3 * 4096),
            rsp_prod in proptest::num::u32::ANY,
            req_prod in proptest::num::u32::ANY,
        ) {
            let region = SharedRegion::create("t", pages).unwrap();
            let mut bytes = fields;
            bytes.extend_from_slice(&body);
            bytes.truncate(region.len() as usize);
            if plausible {
                bytes[0..8].copy_from_slice(&layout::MAGIC.to_ne_bytes());
                bytes[8..12].copy_from_slice(&layout::VERSION.to_ne_bytes());
                bytes[12..16].copy_from_slice(&(1u32 << order).to_ne_bytes());
                bytes[44..48].copy_from_slice(&ENTRY_SIZE.to_ne_bytes());
            }
            region.write(0, &bytes).unwrap();
            let Ok(log) = ShadowLog::open(region.file().try_clone().unwrap().into()) else {
                return Ok(());
            };
            let snap = log.snapshot().unwrap();
            let size = log.entries();
            let _ = crate::plan_recovery(&snap, rsp_prod, req_prod, size, 3);
            let hdr = snap.header;
            let _ = crate::plan_recovery(&snap, hdr.rsp_prod_pvt, hdr.req_cons, size, 3);
            log.begin_instance().unwrap();
            let _ = log.log_consumed(hdr.req_cons, &[1; 112]);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        /// The writer's O(1) free and COMPLETING sets against a plain
        /// model: a ring served in order, responses answered out of order
        /// and published in batches; every count the writer reports and
        /// every entry state in the log match the model.
        #[test]
        fn bookkeeping_matches_a_model(
            ops in proptest::collection::vec((0u8..4, proptest::num::u8::ANY), 1..400),
        ) {
            const SIZE: u32 = 8;
            let log = begun(SIZE);
            let (mut req_cons, mut rsp_prod_pvt, mut rsp_prod) = (0u32, 0u32, 0u32);
            let mut inflight: Vec<EntryId> = Vec::new();
            let mut completing: Vec<(EntryId, u32)> = Vec::new();
            for (op, pick) in ops {
                match op {
                    0 if req_cons.wrapping_sub(rsp_prod) < SIZE => {
                        inflight.push(log.log_consumed(req_cons, &[op; 12]).unwrap());
                        req_cons = req_cons.wrapping_add(1);
                    }
                    1 if !inflight.is_empty() => {
                        let e = inflight.swap_remove(usize::from(pick) % inflight.len());
                        log.log_completing(e, rsp_prod_pvt, &[1; 16]).unwrap();
                        completing.push((e, rsp_prod_pvt));
                        rsp_prod_pvt = rsp_prod_pvt.wrapping_add(1);
                    }
                    2 => {
                        let to = rsp_prod.wrapping_add(u32::from(pick) % 3).min(rsp_prod_pvt);
                        let (gone, kept): (Vec<_>, Vec<_>) =
                            completing.iter().partition(|&&(_, r)| r < to);
                        completing = kept;
                        rsp_prod = to;
                        proptest::prop_assert_eq!(log.log_published(to).unwrap(), gone.len());
                    }
                    _ => {
                        // Freeing a FREE entry again changes nothing.
                        let free_before = log.free_entries().unwrap();
                        let snap = log.snapshot().unwrap();
                        if let Some(i) = snap.entries.iter().position(|e| e.state() == Some(EntryState::Free)) {
                            log.free(EntryId(i as u32)).unwrap();
                        }
                        proptest::prop_assert_eq!(log.free_entries().unwrap(), free_before);
                    }
                }
                let live = inflight.len() + completing.len();
                proptest::prop_assert_eq!(log.free_entries().unwrap(), SIZE as usize - live);
                let snap = log.snapshot().unwrap();
                for e in &inflight {
                    proptest::prop_assert_eq!(snap.entries[e.index() as usize].state(), Some(EntryState::Inflight));
                }
                for (e, r) in &completing {
                    let s = snap.entries[e.index() as usize];
                    proptest::prop_assert_eq!((s.state(), s.rsp_idx), (Some(EntryState::Completing), *r));
                }
            }
        }
    }

    #[test]
    fn rewrite_marks_the_entry_first() {
        let mut log = ShadowLog::create(4).unwrap();
        let at = Arc::new(AtomicU32::new(u32::MAX));
        let a = at.clone();
        log.set_crash_hook(Some(Box::new(move |p| {
            if p.transition == Transition::Rewrite && p.step == a.load(Ordering::Relaxed) {
                panic!("crash");
            }
        })));
        log.begin_instance().unwrap();
        let e = log.log_consumed(0, &[1; 112]).unwrap();
        log.log_completing(e, 0, &[2; 16]).unwrap();
        // Completing a COMPLETING entry again rewrites it.
        at.store(2, Ordering::Relaxed);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            log.log_completing(e, 0, &[3; 16])
        }));
        assert!(r.is_err());
        let snap = log.snapshot().unwrap();
        assert_eq!(snap.entries[0].state(), Some(EntryState::Rewriting));
    }
}
