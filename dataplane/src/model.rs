//! What a device class does with the requests a [`RingSet`] hands over
//! (docs/ARCHITECTURE.md §11.2): parse, execute now or on the engine,
//! complete, answer with an error. It knows the requests' meaning, not the
//! wire: responses are built as the ring's [`RingSet::Response`].

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
}

/// Bytes moved between the guest and the device, counted by the model.
#[derive(Clone, Copy, Debug, Default)]
pub struct Traffic {
    /// Into guest memory (a disk read, a received frame).
    pub to_guest: u64,
    /// Out of guest memory (a disk write, a sent frame).
    pub from_guest: u64,
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
}
