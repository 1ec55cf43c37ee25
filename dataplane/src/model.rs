//! What a device class does with the requests a [`RingSet`] hands over
//! (docs/ARCHITECTURE.md §11.2): parse, execute now or on the engine,
//! complete, answer with an error. It knows the requests' meaning, not the
//! wire: responses are built as the ring's [`RingSet::Response`].

use std::os::fd::RawFd;

use shadowback_shadow::IoCounters;

use crate::event_loop::Token;
use crate::rings::{Detail, RingSet};
use crate::uring::{Engine, EngineError, IoOp};

/// The engine, as one request's ops see it: every op goes in under the
/// request's token; what they move is counted in the process's traffic.
pub struct Submit<'e> {
    engine: &'e mut Engine,
    token: u64,
    traffic: &'e mut Traffic,
}

impl<'e> Submit<'e> {
    pub fn new(engine: &'e mut Engine, token: u64, traffic: &'e mut Traffic) -> Self {
        Submit {
            engine,
            token,
            traffic,
        }
    }

    /// Bytes moved so far (counted by the model).
    pub fn traffic(&mut self) -> &mut Traffic {
        self.traffic
    }

    /// Where the request is started: its ring and slot (what an
    /// [`Answer`] to a held request names).
    pub fn place(&self) -> (usize, u16) {
        match Token::decode(self.token) {
            Some(Token::Io { ring, slot, .. }) => (usize::from(ring), slot),
            _ => (0, 0),
        }
    }

    /// Puts `op` in flight; on failure the op is handed back.
    #[allow(
        clippy::result_large_err,
        reason = "the op is handed back whole, as by `Engine::push`"
    )]
    pub fn push(&mut self, op: IoOp) -> Result<(), (EngineError, IoOp)> {
        self.engine.push(self.token, op)
    }
}

/// How far a started request got.
pub enum Started<P, R> {
    /// Ops are on the engine; completions arrive with the request's
    /// token.
    Pending(P),
    /// Answered at once (refused, or nothing to wait for).
    Done(R),
    /// Kept by the device with no engine op: a posted receive buffer
    /// waiting for a frame, a slot of a packet whose other slots are still
    /// to come. The slot stays taken until the model answers it
    /// ([`DeviceModel::next_answer`]); it is not in flight for a detach, a
    /// serial replay or the metrics (docs/ARCHITECTURE.md §11.2).
    Held(P),
}

/// The model's answer to a request it held ([`Started::Held`]), put and
/// logged by the loop like any answer.
#[derive(Debug)]
pub struct Answer<R> {
    pub ring: usize,
    pub slot: u16,
    pub response: R,
}

/// What a model may do to the log entries of its held requests while it
/// works on them outside the loop's steps ([`DeviceModel::ready`]).
pub trait HeldEntries {
    /// Sets progress `flags` on the entry of the request held in `slot` of
    /// `ring`, at once (a mark a successor must find even if this instance
    /// dies right after it). No entry (no shadow log, an idle slot):
    /// nothing.
    fn mark(&mut self, ring: usize, slot: u16, flags: u32);
}

/// Bytes moved between the guest and the device, counted by the model.
#[derive(Clone, Copy, Debug, Default)]
pub struct Traffic {
    /// Into guest memory (a disk read, a received frame).
    pub to_guest: u64,
    /// Out of guest memory (a disk write, a sent frame).
    pub from_guest: u64,
}

/// What a request may do to the device's data, in bytes of the device:
/// what the hold-back after a takeover compares (docs/ARCHITECTURE.md
/// §7.3). Two requests conflict when their ranges overlap and one of them
/// writes; a flush spans the whole device without writing, so it conflicts
/// with every write and with no read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footprint {
    /// First byte.
    pub start: u64,
    /// One past the last byte (`start` for a request that touches no data).
    pub end: u64,
    /// It changes the data (a write, discard, write-zeroes).
    pub writes: bool,
}

impl Footprint {
    /// Touches no data: refused, answered from memory, a network frame.
    pub const NONE: Footprint = Footprint {
        start: 0,
        end: 0,
        writes: false,
    };
    /// A flush: orders against every write.
    pub const FLUSH: Footprint = Footprint {
        start: 0,
        end: u64::MAX,
        writes: false,
    };
    /// Anything at all: what a request nobody can read may have done.
    pub const ALL: Footprint = Footprint {
        start: 0,
        end: u64::MAX,
        writes: true,
    };

    /// `len` bytes from `start`; `writes` if it changes them.
    pub fn range(start: u64, len: u64, writes: bool) -> Self {
        Footprint {
            start,
            end: start.saturating_add(len),
            writes,
        }
    }

    /// The smallest footprint covering both.
    pub fn union(self, other: Footprint) -> Self {
        if other.start >= other.end {
            return self;
        }
        if self.start >= self.end {
            return other;
        }
        Footprint {
            start: self.start.min(other.start),
            end: self.end.max(other.end),
            writes: self.writes || other.writes,
        }
    }

    /// Whether the two must not run out of order: their ranges overlap
    /// and one of them writes.
    pub fn conflicts(&self, other: &Footprint) -> bool {
        (self.writes || other.writes) && self.start < other.end && other.start < self.end
    }
}

/// A device class over rings of type `R`.
pub trait DeviceModel<R: RingSet> {
    /// A request as parsed (validated, or refused with what to answer).
    type Request;
    /// A request whose ops are on the engine.
    type Pending;
    /// Most engine ops one request has in flight at once (one per
    /// discard segment); the loop keeps that much engine room.
    const MAX_OPS: usize;

    /// Parses what ring `ring` handed over (after [`RingSet::take`] or
    /// [`RingSet::reload`]). Never fails: a bad request parses to the
    /// error it is answered with.
    fn parse(&mut self, rings: &R, ring: usize, request: &R::Request) -> Self::Request;
    /// The device's part of the request's log record.
    fn detail(&self, request: &Self::Request) -> Detail;
    /// What the request may do to the device's data (the hold-back after
    /// a takeover, docs/ARCHITECTURE.md §7.3). A class whose requests
    /// never conflict keeps the default.
    fn footprint(&self, _request: &Self::Request) -> Footprint {
        Footprint::NONE
    }
    /// Fault injection: whether the request touches a poisoned sector
    /// (`poison` from the supervisor).
    fn poisoned(&self, request: &Self::Request, poison: &[u64]) -> bool;
    /// Executes a parsed request: its ops on the engine, or its answer.
    /// (A model whose rings differ in role keeps the ring in its parsed
    /// request.)
    fn start(
        &mut self,
        request: Self::Request,
        io: &mut Submit<'_>,
    ) -> Started<Self::Pending, R::Response>;
    /// One op of `pending` completed with `result`; `Some` once the
    /// request is answered, `None` while ops are left (a discard's other
    /// segments, the flush after a `FLUSH_DISKCACHE`'s write, submitted
    /// here through `io`).
    fn complete(
        &mut self,
        pending: &mut Self::Pending,
        result: i32,
        io: &mut Submit<'_>,
    ) -> Option<R::Response>;
    /// The error answer to a request recovery does not run (poisoned by
    /// the crash-loop breaker, or corrupt in the log).
    fn fail(&mut self, rings: &R, ring: usize, request: &R::Request) -> R::Response;
    /// Whether `response` reports an error (counted).
    fn is_error(&self, response: &R::Response) -> bool;
    /// The bytes a parsed request moves, as the byte bucket of the
    /// device's QoS charges them (0: not a data request).
    fn cost(&self, _request: &Self::Request) -> u64 {
        0
    }
    /// The device now has `sectors` sectors (`resize`); a model without a
    /// size ignores it.
    fn resize(&mut self, _sectors: u64) {}

    /// The next answer to a held request, queued by `start`, `ready` or
    /// `drained`; the loop takes them all after each of those calls, in
    /// the order queued — after `start`, before the started request's own
    /// answer (a packet's first slot is answered first). A request is
    /// answered in its own `start` with [`Started::Done`], never here. A
    /// model that holds nothing keeps the default.
    fn next_answer(&mut self) -> Option<Answer<R::Response>> {
        None
    }
    /// How many event sources of its own the model has (a network wire;
    /// a multi-queue TAP: one per queue). None by default.
    fn sources(&self) -> usize {
        0
    }
    /// Source `n` of [`DeviceModel::sources`], polled by the loop under
    /// the attachment's token as ring `RingSet::count() + n` while this
    /// says `Some`: asked again at the end of every turn, so a model
    /// waiting for nothing (no buffer posted) is not woken.
    fn source(&self, _n: usize) -> Option<RawFd> {
        None
    }
    /// Whether source `n` is polled for room to write (`POLLOUT`: a wire
    /// whose queue was full, that the model waits to send on) rather than
    /// for input.
    fn source_writable(&self, _n: usize) -> bool {
        false
    }
    /// Whether the loop takes from `ring` now: `false` for a ring the
    /// device does not serve at the moment (a virtio-net queue pair beyond
    /// the pairs the driver uses, a queue started without its pair). Such
    /// a ring is not taken from and is not work for the loop; what it
    /// holds waits.
    fn takes(&self, _ring: usize) -> bool {
        true
    }
    /// Source `n` is ready: the model answers what it can of its held
    /// requests (several answers per event), marking their entries
    /// first where a successor must know what was under way. `true`: it
    /// stopped with more to do (a publication's worth of answers, see
    /// [`RingSet::PUBLISH_EVERY`]) and is called again once the loop has
    /// taken them.
    fn ready(&mut self, _n: usize, _rings: &R, _entries: &mut dyn HeldEntries) -> bool {
        false
    }
    /// The loop stops taking from `ring` for this turn (drained, out of
    /// slots or room, closing): work the model gathered across requests
    /// (a batch of frames) is finished now, before the turn publishes.
    /// `true` as for [`DeviceModel::ready`].
    fn drained(&mut self, _rings: &R, _ring: usize, _entries: &mut dyn HeldEntries) -> bool {
        false
    }
    /// The process's counters as the metrics page shows them, from the
    /// loop's (`base`); a model counting its own (frames, drops) replaces
    /// them.
    fn io_counters(&self, base: IoCounters) -> IoCounters {
        base
    }
}

#[cfg(test)]
mod tests {
    use super::Footprint;

    #[test]
    fn requests_conflict_when_they_overlap_and_one_writes() {
        let read = |s, l| Footprint::range(s, l, false);
        let write = |s, l| Footprint::range(s, l, true);
        // Overlap and a write, either way round.
        assert!(write(0, 4096).conflicts(&read(4095, 1)));
        assert!(read(4095, 1).conflicts(&write(0, 4096)));
        assert!(write(0, 4096).conflicts(&write(1024, 512)));
        // Two reads never; adjacent ranges never.
        assert!(!read(0, 4096).conflicts(&read(0, 4096)));
        assert!(!write(0, 4096).conflicts(&write(4096, 4096)));
        assert!(!write(4096, 4096).conflicts(&read(0, 4096)));
        // A flush orders against every write, no read, no flush.
        assert!(Footprint::FLUSH.conflicts(&write(1 << 40, 512)));
        assert!(write(0, 512).conflicts(&Footprint::FLUSH));
        assert!(!Footprint::FLUSH.conflicts(&read(0, 1 << 30)));
        assert!(!Footprint::FLUSH.conflicts(&Footprint::FLUSH));
        // Nothing conflicts with a request that touches no data.
        assert!(!Footprint::NONE.conflicts(&Footprint::ALL));
        assert!(!Footprint::ALL.conflicts(&Footprint::NONE));
        assert!(Footprint::ALL.conflicts(&read(7, 1)));
        // The end saturates rather than wrapping round to a small range.
        assert!(write(u64::MAX - 10, 100).conflicts(&read(u64::MAX - 1, 1)));
    }

    #[test]
    fn a_union_covers_both_and_writes_if_either_does() {
        let a = Footprint::range(4096, 4096, false);
        let b = Footprint::range(65536, 512, true);
        let u = a.union(b);
        assert_eq!(u, Footprint::range(4096, 65536 + 512 - 4096, true));
        assert_eq!(Footprint::NONE.union(a), a);
        assert_eq!(a.union(Footprint::NONE), a);
        assert_eq!(a.union(Footprint::FLUSH), Footprint::FLUSH);
        assert_eq!(b.union(Footprint::FLUSH), Footprint::ALL);
    }
}
