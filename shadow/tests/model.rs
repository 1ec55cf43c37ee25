//! In-process crash tests against the real log: a simulated ring (indices
//! and slots in plain memory, so it can start anywhere, e.g. just below
//! u32::MAX), a guest that checks every response, and backend instances
//! that crash at chosen crash points (the hook panics and the instance is
//! dropped, leaving shared memory exactly as it was at that store).
//! Each crash is followed by a recovery through `plan_recovery`, itself
//! possibly crashing, and the guest must end with exactly one response per
//! request.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use common::{blkif, check_recovery, crash_hook, request_bytes, CrashAt, GuestView, Rng};
use proptest::prelude::*;
use shadowback_ring::blkif::{BLKIF_RSP_ERROR, BLKIF_RSP_OKAY};
use shadowback_ring::SharedRegion;
use shadowback_shadow::layout::{ENTRY_SIZE, HEADER_SIZE};
use shadowback_shadow::{
    plan_recovery, CorruptAction, CrashPoint, EntryId, ShadowLog, Transition, REQUEST_SIZE,
    RESPONSE_SIZE,
};

/// The shared ring and the guest, which survive every backend crash.
struct World {
    size: u32,
    slots: Vec<[u8; REQUEST_SIZE]>,
    req_prod: u32,
    rsp_prod: u32,
    rsp_cons: u32,
    next_id: u64,
    to_post: u64,
    poison: Option<u64>,
    posted: HashMap<u64, [u8; REQUEST_SIZE]>,
    outstanding: BTreeSet<u64>,
    by_idx: HashMap<u32, u64>,
    status: HashMap<u64, i16>,
}

impl World {
    fn new(size: u32, base: u32, to_post: u64, poison: Option<u64>) -> Self {
        World {
            size,
            slots: vec![[0; REQUEST_SIZE]; size as usize],
            req_prod: base,
            rsp_prod: base,
            rsp_cons: base,
            next_id: 1,
            to_post,
            poison,
            posted: HashMap::new(),
            outstanding: BTreeSet::new(),
            by_idx: HashMap::new(),
            status: HashMap::new(),
        }
    }

    fn slot(&mut self, idx: u32) -> &mut [u8; REQUEST_SIZE] {
        &mut self.slots[(idx & (self.size - 1)) as usize]
    }

    fn post(&mut self, n: u64) {
        for _ in 0..n {
            // RING_FULL from the guest's side.
            if self.to_post == 0 || self.req_prod.wrapping_sub(self.rsp_cons) >= self.size {
                return;
            }
            let id = self.next_id;
            self.next_id += 1;
            self.to_post -= 1;
            let sector = if Some(id) == self.poison {
                common::POISON_SECTOR
            } else {
                id
            };
            let req = request_bytes(id, sector);
            let idx = self.req_prod;
            *self.slot(idx) = req;
            self.posted.insert(id, req);
            self.outstanding.insert(id);
            self.by_idx.insert(idx, id);
            self.req_prod = idx.wrapping_add(1);
        }
    }

    fn drain(&mut self) {
        assert!(self.rsp_prod.wrapping_sub(self.rsp_cons) <= self.size);
        while self.rsp_cons != self.rsp_prod {
            let idx = self.rsp_cons;
            let mut rsp = [0u8; RESPONSE_SIZE];
            rsp.copy_from_slice(&self.slot(idx)[..RESPONSE_SIZE]);
            let (id, status) = blkif::response_id_status(&rsp);
            assert!(
                self.outstanding.remove(&id),
                "response for request {id} that is not outstanding (duplicate or unknown)"
            );
            self.status.insert(id, status);
            self.rsp_cons = idx.wrapping_add(1);
        }
    }

    fn done(&self) -> bool {
        self.to_post == 0 && self.outstanding.is_empty()
    }

    fn view(&self, req_cons: u32) -> GuestView<'_> {
        let n = self.req_prod.wrapping_sub(req_cons);
        let unconsumed = (0..n)
            .map(|k| self.by_idx[&req_cons.wrapping_add(k)])
            .collect();
        GuestView {
            posted: &self.posted,
            outstanding: &self.outstanding,
            unconsumed,
        }
    }
}

struct Pending {
    entry: EntryId,
    request: [u8; REQUEST_SIZE],
    replayed: bool,
}

/// One backend instance: private ring indices and the requests it holds.
struct Instance {
    log: ShadowLog,
    req_cons: u32,
    rsp_prod_pvt: u32,
    pending: Vec<Pending>,
}

impl Instance {
    fn step(&mut self, w: &mut World, rng: &mut Rng) {
        match rng.below(5) {
            0 | 1 => {
                for _ in 0..=rng.below(4) {
                    if self.req_cons == w.req_prod || self.log.free_entries().unwrap() == 0 {
                        break;
                    }
                    let idx = self.req_cons;
                    let request = *w.slot(idx);
                    let entry = self.log.log_consumed(idx, &request).unwrap();
                    self.req_cons = idx.wrapping_add(1);
                    self.pending.push(Pending {
                        entry,
                        request,
                        replayed: false,
                    });
                }
            }
            2 => {
                if self.pending.is_empty() {
                    return;
                }
                // Out-of-order completion.
                let p = self
                    .pending
                    .swap_remove(rng.below(self.pending.len() as u64) as usize);
                if p.replayed {
                    self.log.mark_replayed(&[p.entry]).unwrap();
                }
                self.log.set_progress(p.entry, 1).unwrap();
                if common::sector(&p.request) == common::POISON_SECTOR {
                    std::panic::panic_any(common::Crash);
                }
                self.respond(w, p.entry, &common::ok_response(&p.request));
            }
            3 => self.publish(w),
            _ => self.log.heartbeat().unwrap(),
        }
    }

    fn respond(&mut self, w: &mut World, entry: EntryId, rsp: &[u8; RESPONSE_SIZE]) {
        let idx = self.rsp_prod_pvt;
        assert_ne!(idx, self.req_cons, "response without a consumed request");
        w.slot(idx)[..RESPONSE_SIZE].copy_from_slice(rsp);
        self.log.log_completing(entry, idx, rsp).unwrap();
        self.rsp_prod_pvt = idx.wrapping_add(1);
    }

    fn publish(&mut self, w: &mut World) {
        w.rsp_prod = self.rsp_prod_pvt;
        self.log.log_published(w.rsp_prod).unwrap();
    }
}

struct Run {
    size: u32,
    base: u32,
    requests: u64,
    threshold: u32,
    poison: Option<u64>,
    /// Crash plan of instance k (instances past the end never crash).
    crashes: Vec<CrashAt>,
    /// Scribble a bad state word on a random entry after crash k.
    scribble_after: Option<usize>,
    seen: Option<Arc<Mutex<BTreeSet<u32>>>>,
}

struct Outcome {
    instances: usize,
    status: HashMap<u64, i16>,
    scribbled: Option<u64>,
}

impl Run {
    fn new(size: u32, base: u32, requests: u64) -> Self {
        Run {
            size,
            base,
            requests,
            threshold: 3,
            poison: None,
            crashes: Vec::new(),
            scribble_after: None,
            seen: None,
        }
    }

    fn hook(&self, instance: usize) -> CrashAt {
        self.crashes
            .get(instance)
            .copied()
            .unwrap_or(CrashAt::Never)
    }

    fn open(&self, sup: &ShadowLog, instance: usize) -> ShadowLog {
        let mut log = ShadowLog::open(sup.file().try_clone().unwrap().into()).unwrap();
        log.set_crash_hook(Some(crash_hook(self.hook(instance), self.seen.clone())));
        log
    }

    fn recover(&self, sup: &ShadowLog, w: &mut World, instance: usize) -> Instance {
        let log = self.open(sup, instance);
        log.begin_instance().unwrap();
        let snap = log.snapshot().unwrap();
        w.drain();
        let plan = plan_recovery(&snap, w.rsp_prod, w.req_prod, self.size, self.threshold)
            .expect("a crash never makes the ring inconsistent");
        let scribbled = plan
            .corrupt
            .iter()
            .any(|c| c.action == CorruptAction::Answer);
        if self.scribble_after.is_none() {
            check_recovery(&snap, &plan, &w.view(plan.req_cons));
        } else if !scribbled {
            // The scribble hit a free or published entry, or was answered
            // already: the rest of the log is as clean as ever.
            assert_eq!(plan.lost, 0);
        }
        log.log_recovered(&plan).unwrap();
        let mut inst = Instance {
            log,
            req_cons: plan.req_cons,
            rsp_prod_pvt: plan.rsp_prod,
            pending: Vec::new(),
        };
        for r in &plan.repush {
            assert_eq!(inst.rsp_prod_pvt, r.rsp_idx);
            w.slot(r.rsp_idx)[..RESPONSE_SIZE].copy_from_slice(&r.response);
            inst.log.log_repushed(r.entry, r.rsp_idx).unwrap();
            inst.rsp_prod_pvt = r.rsp_idx.wrapping_add(1);
        }
        for &e in &plan.free {
            inst.log.free(e).unwrap();
        }
        for c in &plan.corrupt {
            match c.action {
                CorruptAction::Answer => {
                    inst.respond(w, c.entry, &blkif::error_response(&c.request))
                }
                CorruptAction::Discard => inst.log.free(c.entry).unwrap(),
            }
        }
        for p in &plan.poisoned {
            inst.respond(w, p.entry, &blkif::error_response(&p.request));
        }
        inst.publish(w);
        inst.pending = plan
            .reexecute
            .iter()
            .map(|e| Pending {
                entry: e.entry,
                request: e.request,
                replayed: true,
            })
            .collect();
        inst
    }

    fn go(&self, seed: u64) -> Outcome {
        common::quiet_crashes();
        let mut rng = Rng::new(seed);
        let sup = ShadowLog::create_at(self.size, self.base).unwrap();
        let mut w = World::new(self.size, self.base, self.requests, self.poison);
        let mut instance = 0;
        let mut scribbled = None;
        let first = catch_unwind(AssertUnwindSafe(|| {
            let log = self.open(&sup, 0);
            log.begin_instance().unwrap();
            Instance {
                log,
                req_cons: self.base,
                rsp_prod_pvt: self.base,
                pending: Vec::new(),
            }
        }));
        let mut inst = survived(first);
        for _ in 0..200_000 {
            let alive = match inst.as_mut() {
                Some(i) => {
                    if rng.chance(1, 2) {
                        w.post(rng.below(4));
                    }
                    if rng.chance(1, 2) {
                        w.drain();
                    }
                    survived(catch_unwind(AssertUnwindSafe(|| i.step(&mut w, &mut rng)))).is_some()
                }
                None => false,
            };
            if !alive {
                instance += 1;
                assert!(instance < 50, "crash loop");
                if self.scribble_after == Some(instance - 1) {
                    scribbled = scribble(&sup, &mut rng);
                }
                inst = survived(catch_unwind(AssertUnwindSafe(|| {
                    self.recover(&sup, &mut w, instance)
                })));
            }
            if w.done() {
                return Outcome {
                    instances: instance + 1,
                    status: w.status,
                    scribbled,
                };
            }
        }
        panic!(
            "requests never answered: {:?} (instance {instance})",
            w.outstanding
        );
    }
}

/// The value if the closure returned, `None` if the instance crashed at a
/// crash point; any other panic is a test failure and goes on unwinding.
fn survived<T>(r: std::thread::Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(payload) if payload.is::<common::Crash>() => None,
        Err(payload) => std::panic::resume_unwind(payload),
    }
}

/// Writes a bad state word on a random live entry, as a stray store
/// would. Returns the id in its saved request.
fn scribble(sup: &ShadowLog, rng: &mut Rng) -> Option<u64> {
    let snap = sup.snapshot().unwrap();
    let live: Vec<usize> = (0..snap.entries.len())
        .filter(|&i| snap.entries[i].state != 0)
        .collect();
    if live.is_empty() {
        return None;
    }
    let i = live[rng.below(live.len() as u64) as usize];
    let region = SharedRegion::from_fd(sup.file().try_clone().unwrap().into()).unwrap();
    let off = HEADER_SIZE + i as u64 * u64::from(ENTRY_SIZE);
    region.store(0xdead_u32, off, Ordering::Release).unwrap();
    Some(blkif::request_id(&snap.entries[i].request))
}

const BASES: [u32; 4] = [0, u32::MAX - 20, (1 << 31) - 7, 12345];

#[test]
fn without_crashes_every_request_gets_one_ok() {
    for (k, base) in BASES.into_iter().enumerate() {
        let out = Run::new(8, base, 300).go(k as u64);
        assert_eq!(out.instances, 1);
        assert_eq!(out.status.len(), 300);
        assert!(out.status.values().all(|&s| s == BLKIF_RSP_OKAY));
    }
}

/// Every crash point, at its 1st, 2nd and 7th occurrence, in the first
/// instance or in a recovering one (after a crash at some other moment):
/// the guest still gets exactly one OK per request. Also checks that the
/// harness crashed at every point but `rewrite` ones, which only answering
/// a corrupt entry reaches (see `a_corrupt_entry_fails_only_its_request`).
#[test]
fn a_crash_at_every_point_is_recovered() {
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let mut crashed = BTreeSet::new();
    for p in CrashPoint::all() {
        for (k, nth) in [1u64, 2, 7].into_iter().enumerate() {
            for (j, first) in [None, Some(31), Some(77), Some(150)]
                .into_iter()
                .enumerate()
            {
                let base = if j % 2 == 0 { 0 } else { u32::MAX - 3 };
                let mut run = Run::new(4, base, 60);
                run.crashes = match first {
                    None => vec![CrashAt::Point(p, nth)],
                    Some(c) => vec![CrashAt::Call(c), CrashAt::Point(p, nth)],
                };
                run.seen = Some(seen.clone());
                let out = run.go(u64::from(p.number()) * 100 + k as u64 * 10 + j as u64);
                assert_eq!(out.status.len(), 60, "{p}");
                assert!(out.status.values().all(|&s| s == BLKIF_RSP_OKAY), "{p}");
                if out.instances > 1 {
                    crashed.insert(p.number());
                }
            }
        }
    }
    let seen = seen.lock().unwrap();
    for p in CrashPoint::all() {
        if p.transition != Transition::Rewrite {
            assert!(seen.contains(&p.number()), "crash point {p} never reached");
            assert!(crashed.contains(&p.number()), "never crashed at {p}");
        }
    }
}

#[test]
fn a_poison_request_fails_after_three_instances_die_on_it() {
    for base in BASES {
        let mut run = Run::new(8, base, 100);
        run.poison = Some(37);
        let out = run.go(u64::from(base));
        // The instance that consumed it and two replaying ones died on it;
        // the fourth answered it with an error and kept serving.
        assert_eq!(out.instances, 4);
        assert_eq!(out.status[&37], BLKIF_RSP_ERROR);
        assert_eq!(out.status.len(), 100);
        let ok = out
            .status
            .values()
            .filter(|&&s| s == BLKIF_RSP_OKAY)
            .count();
        assert_eq!(ok, 99);
    }
}

#[test]
fn a_corrupt_entry_fails_only_its_request() {
    let mut hit = 0;
    for seed in 0..300u64 {
        let mut run = Run::new(8, BASES[seed as usize % BASES.len()], 80);
        run.crashes = vec![
            CrashAt::Call(20 + seed % 150),
            // Crash the recovery itself, sometimes while rewriting.
            if seed % 2 == 0 {
                CrashAt::Point(
                    CrashPoint {
                        transition: Transition::Rewrite,
                        step: (seed / 2 % 6) as u32,
                    },
                    1,
                )
            } else {
                CrashAt::Call(seed % 40)
            },
        ];
        run.scribble_after = Some(0);
        let out = run.go(seed);
        assert_eq!(out.status.len(), 80);
        let failed: Vec<u64> = out
            .status
            .iter()
            .filter(|(_, &s)| s != BLKIF_RSP_OKAY)
            .map(|(&id, _)| id)
            .collect();
        // At most the scribbled request fails.
        assert!(failed.len() <= 1, "{failed:?}");
        if let Some(&id) = failed.first() {
            assert_eq!(Some(id), out.scribbled);
            hit += 1;
        }
    }
    assert!(
        hit > 10,
        "the scribble rarely hit a request in flight ({hit})"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Random schedules, ring sizes, start indices and up to four crashes
    /// (recoveries crash too): every request answered exactly once, OK.
    #[test]
    fn random_crashes_lose_and_duplicate_nothing(
        seed in any::<u64>(),
        order in 0u32..4,
        base in prop_oneof![Just(0u32), Just(u32::MAX - 10), any::<u32>()],
        crashes in proptest::collection::vec(0u64..300, 0..5),
    ) {
        let mut run = Run::new(1 << order, base, 120);
        run.crashes = crashes.into_iter().map(CrashAt::Call).collect();
        // Replays can be cut short by crashes: do not let an innocent
        // request be poisoned by bad luck.
        run.threshold = 100;
        let out = run.go(seed);
        prop_assert_eq!(out.status.len(), 120);
        prop_assert!(out.status.values().all(|&s| s == BLKIF_RSP_OKAY));
    }
}
