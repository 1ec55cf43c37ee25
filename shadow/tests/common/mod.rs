//! Shared by the integration tests: a small deterministic RNG, blkif
//! request bytes, the in-process crash marker, and the check that a
//! recovery plan accounts for every outstanding request exactly once.
#![allow(dead_code)]

pub mod blkif;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};

use shadowback_ring::blkif::{BLKIF_OP_WRITE, BLKIF_RSP_OKAY};
use shadowback_shadow::{
    CrashHook, CrashPoint, EntryState, LogSnapshot, RecoveryPlan, REQUEST_SIZE, RESPONSE_SIZE,
};

/// xorshift64*: reproducible from a seed, no dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}

/// Requests with this sector crash every backend that executes them.
pub const POISON_SECTOR: u64 = 0xbad_bad;

/// A blkif WRITE request with no segments, as ring bytes.
pub fn request_bytes(id: u64, sector: u64) -> [u8; REQUEST_SIZE] {
    let mut b = [0u8; REQUEST_SIZE];
    b[0] = BLKIF_OP_WRITE;
    b[8..16].copy_from_slice(&id.to_ne_bytes());
    b[16..24].copy_from_slice(&sector.to_ne_bytes());
    b
}

pub fn sector(request: &[u8; REQUEST_SIZE]) -> u64 {
    let mut s = [0u8; 8];
    s.copy_from_slice(&request[16..24]);
    u64::from_ne_bytes(s)
}

pub fn ok_response(request: &[u8; REQUEST_SIZE]) -> [u8; RESPONSE_SIZE] {
    blkif::response(request, BLKIF_RSP_OKAY)
}

/// Panic payload of a simulated crash.
#[derive(Debug)]
pub struct Crash;

/// Keeps simulated crashes out of the test output.
pub fn quiet_crashes() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<Crash>().is_none() {
                previous(info);
            }
        }));
    });
}

/// When a hook crashes the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashAt {
    Never,
    /// At the n-th (0-based) crash point of any transition.
    Call(u64),
    /// At the n-th (1-based) time this point is reached.
    Point(CrashPoint, u64),
}

/// A hook that panics with [`Crash`] at `at`, and records every point it
/// sees into `seen`.
pub fn crash_hook(at: CrashAt, seen: Option<Arc<std::sync::Mutex<BTreeSet<u32>>>>) -> CrashHook {
    let calls = AtomicU64::new(0);
    let hits = AtomicU64::new(0);
    Box::new(move |p: CrashPoint| {
        if let Some(seen) = &seen {
            seen.lock().unwrap().insert(p.number());
        }
        let n = calls.fetch_add(1, Ordering::Relaxed);
        let crash = match at {
            CrashAt::Never => false,
            CrashAt::Call(k) => n == k,
            CrashAt::Point(q, k) => q == p && hits.fetch_add(1, Ordering::Relaxed) + 1 == k,
        };
        if crash {
            std::panic::panic_any(Crash);
        }
    })
}

/// What the guest knows after draining every published response.
#[derive(Debug)]
pub struct GuestView<'a> {
    /// Every request ever posted, by id.
    pub posted: &'a HashMap<u64, [u8; REQUEST_SIZE]>,
    /// Posted and not yet answered.
    pub outstanding: &'a BTreeSet<u64>,
    /// Ids of the requests in ring slots `[plan.req_cons, req_prod)`.
    pub unconsumed: Vec<u64>,
}

/// The log after a crash is consistent (every entry in a valid old or new
/// state, its payload the request the guest posted) and the plan covers
/// every outstanding request exactly once.
pub fn check_recovery(snap: &LogSnapshot, plan: &RecoveryPlan, guest: &GuestView<'_>) {
    for (i, e) in snap.entries.iter().enumerate() {
        let state = e.state();
        if state == Some(EntryState::Free) {
            continue;
        }
        assert!(
            matches!(state, Some(EntryState::Inflight | EntryState::Completing)),
            "entry {i} in state {:#x}",
            e.state
        );
        let id = blkif::request_id(&e.request);
        assert_eq!(
            guest.posted.get(&id),
            Some(&e.request),
            "entry {i}: request bytes are not a posted request"
        );
        if state == Some(EntryState::Completing) {
            let (rsp_id, _) = blkif::response_id_status(&e.response);
            assert_eq!(rsp_id, id, "entry {i}: response for another request");
        }
    }
    assert!(
        plan.corrupt.is_empty(),
        "corrupt entries: {:?}",
        plan.corrupt
    );
    assert_eq!(plan.lost, 0);
    let mut covered: Vec<u64> = plan
        .repush
        .iter()
        .map(|r| blkif::response_id_status(&r.response).0)
        .chain(plan.reexecute.iter().map(|e| blkif::request_id(&e.request)))
        .chain(plan.poisoned.iter().map(|e| blkif::request_id(&e.request)))
        .chain(guest.unconsumed.iter().copied())
        .collect();
    covered.sort_unstable();
    let expect: Vec<u64> = guest.outstanding.iter().copied().collect();
    assert_eq!(
        covered, expect,
        "plan + unconsumed ring slots != outstanding requests"
    );
    for e in &plan.free {
        let id = blkif::request_id(&snap.entries[e.index() as usize].request);
        assert!(
            !guest.outstanding.contains(&id),
            "freed entry {id} still awaited"
        );
    }
}
