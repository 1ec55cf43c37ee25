//! Cross-process crash tests: a real backend process, SIGKILLed.
//!
//! The parent plays the guest on a real `xen/io/ring.h` ring in a memfd and
//! creates the shadow log, like the supervisor. It re-runs this test binary
//! as the backend (`child_backend`, selected by an environment variable),
//! handing it both memfds by number (a dup with CLOEXEC cleared; the child
//! reopens `/proc/self/fd/N`). The child serves the ring and logs every
//! transition until it is SIGKILLed — at a random moment, or by its own
//! crash hook at a chosen crash point. The parent then checks the log it
//! inherited (every entry in a valid old or new state, holding a request
//! it posted), checks that the recovery plan covers every unanswered
//! request exactly once, recovers as a new instance and serves the ring
//! until every request has exactly one response.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{blkif, check_recovery, ok_response, GuestView, Rng};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::{raise, Signal};
use shadowback_ring::blkif::{Blkif, BlkifRequest, BlkifResponse, BLKIF_OP_WRITE, BLKIF_RSP_OKAY};
use shadowback_ring::sring::{BackRing, FrontRing, RingPages};
use shadowback_ring::SharedRegion;
use shadowback_shadow::{
    plan_recovery, CrashPoint, EntryId, ShadowLog, Transition, REQUEST_SIZE, RESPONSE_SIZE,
};

const CHILD_ENV: &str = "SHADOWBACK_SHADOW_TEST_CHILD";
const RING_FD_ENV: &str = "SHADOWBACK_SHADOW_TEST_RING_FD";
const LOG_FD_ENV: &str = "SHADOWBACK_SHADOW_TEST_LOG_FD";
const SEED_ENV: &str = "SHADOWBACK_SHADOW_TEST_SEED";
const CRASH_ENV: &str = "SHADOWBACK_SHADOW_TEST_CRASH";

/// One ring page: 32 blkif slots.
const RING_SIZE: u32 = 32;
/// Requests whose sector is 3 modulo this "execute" slowly: they stay in
/// flight while the rest of the ring turns over, as out-of-order
/// completion allows.
const SLOW_EVERY: u64 = 7;

// Offsets of the shared indices in the ring page (`xen/io/ring.h`).
const REQ_PROD: u64 = 0;
const RSP_PROD: u64 = 8;

fn request_to_bytes(r: &BlkifRequest) -> [u8; REQUEST_SIZE] {
    let mut b = [0u8; REQUEST_SIZE];
    b[0] = r.operation;
    b[1] = r.nr_segments;
    b[2..4].copy_from_slice(&r.handle.to_ne_bytes());
    b[8..16].copy_from_slice(&r.id.to_ne_bytes());
    b[16..24].copy_from_slice(&r.sector_number.to_ne_bytes());
    for (k, s) in r.seg.iter().enumerate() {
        let o = 24 + 8 * k;
        b[o..o + 4].copy_from_slice(&s.gref.to_ne_bytes());
        b[o + 4] = s.first_sect;
        b[o + 5] = s.last_sect;
    }
    b
}

fn response_from_bytes(b: &[u8; RESPONSE_SIZE]) -> BlkifResponse {
    let (id, status) = blkif::response_id_status(b);
    BlkifResponse {
        id,
        operation: b[8],
        status,
        ..Default::default()
    }
}

/// A backend instance on a real ring.
struct Backend {
    ring: BackRing<Blkif>,
    log: ShadowLog,
    /// (entry, request, replayed, age in steps)
    pending: Vec<(EntryId, [u8; REQUEST_SIZE], bool, u32)>,
    rng: Rng,
}

impl Backend {
    fn step(&mut self) {
        let n = self.ring.unconsumed_requests().unwrap();
        for _ in 0..n {
            if self.log.free_entries().unwrap() == 0 {
                break;
            }
            let (idx, req) = self.ring.take_request().unwrap();
            let bytes = request_to_bytes(&req);
            let entry = self.log.log_consumed(idx, &bytes).unwrap();
            self.pending.push((entry, bytes, false, 0));
        }
        let mut k = 0;
        while k < self.pending.len() {
            let (entry, bytes, replayed, age) = self.pending[k];
            self.pending[k].3 += 1;
            let slow = common::sector(&bytes) % SLOW_EVERY == 3 && age < 40;
            if slow || !self.rng.chance(1, 3) {
                k += 1;
                continue;
            }
            self.pending.swap_remove(k);
            if replayed {
                self.log.mark_replayed(&[entry]).unwrap();
            }
            self.log.set_progress(entry, 1).unwrap();
            self.respond(entry, &ok_response(&bytes));
        }
        if self.rng.chance(1, 2) {
            self.publish();
        }
        self.log.heartbeat().unwrap();
    }

    fn respond(&mut self, entry: EntryId, rsp: &[u8; RESPONSE_SIZE]) {
        let idx = self.ring.put_response(&response_from_bytes(rsp)).unwrap();
        self.log.log_completing(entry, idx, rsp).unwrap();
    }

    fn publish(&mut self) {
        self.ring.push_responses().unwrap();
        self.log.log_published(self.ring.rsp_prod_pvt()).unwrap();
    }
}

/// The guest: a front ring plus what it posted and what it got back.
struct Guest {
    region: Arc<SharedRegion>,
    front: FrontRing<Blkif>,
    next_id: u64,
    posted: HashMap<u64, [u8; REQUEST_SIZE]>,
    outstanding: BTreeSet<u64>,
    by_idx: HashMap<u32, u64>,
    answered: u64,
}

impl Guest {
    fn new() -> Self {
        let region = Arc::new(SharedRegion::create("guest-ring", 1).unwrap());
        let front = FrontRing::init(RingPages::contiguous(region.clone(), 0, 1).unwrap()).unwrap();
        assert_eq!(front.size(), RING_SIZE);
        Guest {
            region,
            front,
            next_id: 1,
            posted: HashMap::new(),
            outstanding: BTreeSet::new(),
            by_idx: HashMap::new(),
            answered: 0,
        }
    }

    fn post(&mut self) {
        while self.front.free_requests() > 0 {
            let id = self.next_id;
            self.next_id += 1;
            let req = BlkifRequest {
                operation: BLKIF_OP_WRITE,
                id,
                sector_number: id,
                ..Default::default()
            };
            let idx = self.front.put_request(&req).unwrap();
            self.posted.insert(id, request_to_bytes(&req));
            self.outstanding.insert(id);
            self.by_idx.insert(idx, id);
        }
        self.front.push_requests().unwrap();
    }

    fn drain(&mut self) {
        while let Some(rsp) = self.front.take_response().unwrap() {
            assert!(
                self.outstanding.remove(&rsp.id),
                "response for request {} that is not outstanding (duplicate or unknown)",
                rsp.id
            );
            assert_eq!(rsp.status, BLKIF_RSP_OKAY);
            self.answered += 1;
        }
    }

    fn shared(&self, field: u64) -> u32 {
        // Acquire: the backend is dead, this only orders our own reads.
        self.region.load(field, Ordering::Acquire).unwrap()
    }
}

/// Re-opens an fd number inherited from the parent (no unsafe needed).
fn inherited(var: &str) -> File {
    let n: i32 = std::env::var(var).unwrap().parse().unwrap();
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{n}"))
        .unwrap()
}

/// The backend process. A no-op when run as an ordinary test.
#[test]
fn child_backend() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let region = Arc::new(SharedRegion::from_fd(inherited(RING_FD_ENV).into()).unwrap());
    let mut log = ShadowLog::open(inherited(LOG_FD_ENV).into()).unwrap();
    let seed: u64 = std::env::var(SEED_ENV).unwrap().parse().unwrap();
    if let Ok(spec) = std::env::var(CRASH_ENV) {
        let (point, nth) = spec.split_once('@').unwrap();
        let point: CrashPoint = point.parse().unwrap();
        let nth: u64 = nth.parse().unwrap();
        let hits = std::sync::atomic::AtomicU64::new(0);
        log.set_crash_hook(Some(Box::new(move |p| {
            if p == point && hits.fetch_add(1, Ordering::Relaxed) + 1 == nth {
                // Die exactly here, like any other SIGKILL.
                let _ = raise(Signal::SIGKILL);
            }
        })));
    }
    let ring = BackRing::attach(RingPages::contiguous(region, 0, 1).unwrap()).unwrap();
    log.begin_instance().unwrap();
    let mut backend = Backend {
        ring,
        log,
        pending: Vec::new(),
        rng: Rng::new(seed),
    };
    // Never outlive a parent that forgot us.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        backend.step();
        std::thread::yield_now();
    }
    std::process::exit(3);
}

/// Spawns the backend process on `guest`'s ring and `log`.
fn spawn_backend(guest: &Guest, log: &ShadowLog, seed: u64, crash: Option<String>) -> Child {
    let pass = |f: &File| {
        let dup = f.try_clone().unwrap();
        fcntl(dup.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
        dup
    };
    let ring_fd = pass(guest.region.file());
    let log_fd = pass(log.file());
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "child_backend",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, "1")
    .env(RING_FD_ENV, ring_fd.as_raw_fd().to_string())
    .env(LOG_FD_ENV, log_fd.as_raw_fd().to_string())
    .env(SEED_ENV, seed.to_string())
    .stdout(Stdio::null());
    if let Some(c) = crash {
        cmd.env(CRASH_ENV, c);
    }
    let child = cmd.spawn().unwrap();
    // The child has its copies; ours close here.
    drop((ring_fd, log_fd));
    child
}

/// Plays the guest until `stop` says so or the child exits. Returns
/// whether the child exited on its own.
fn serve_guest(guest: &mut Guest, child: &mut Child, mut stop: impl FnMut(&Guest) -> bool) -> bool {
    loop {
        guest.drain();
        guest.post();
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        if stop(guest) {
            return false;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// After the backend died: check the log, recover in this process, serve
/// until every request has exactly one response.
fn recover_and_finish(guest: &mut Guest, sup: &ShadowLog, seed: u64) {
    guest.drain();
    let log = ShadowLog::open(sup.file().try_clone().unwrap().into()).unwrap();
    log.begin_instance().unwrap();
    let snap = log.snapshot().unwrap();
    let rsp_prod = guest.shared(RSP_PROD);
    let req_prod = guest.shared(REQ_PROD);
    let plan = plan_recovery(&snap, rsp_prod, req_prod, RING_SIZE, 3).unwrap();
    let unconsumed = (0..req_prod.wrapping_sub(plan.req_cons))
        .map(|k| guest.by_idx[&plan.req_cons.wrapping_add(k)])
        .collect();
    check_recovery(
        &snap,
        &plan,
        &GuestView {
            posted: &guest.posted,
            outstanding: &guest.outstanding,
            unconsumed,
        },
    );
    assert!(plan.poisoned.is_empty());

    log.log_recovered(&plan).unwrap();
    let pages = RingPages::contiguous(guest.region.clone(), 0, 1).unwrap();
    let ring = BackRing::attach_at(pages, plan.req_cons, plan.rsp_prod).unwrap();
    let mut backend = Backend {
        ring,
        log,
        pending: Vec::new(),
        rng: Rng::new(seed ^ 0x5eed),
    };
    for r in &plan.repush {
        let idx = backend
            .ring
            .put_response(&response_from_bytes(&r.response))
            .unwrap();
        assert_eq!(idx, r.rsp_idx);
        backend.log.log_repushed(r.entry, idx).unwrap();
    }
    for &e in &plan.free {
        backend.log.free(e).unwrap();
    }
    backend.publish();
    backend.pending = plan
        .reexecute
        .iter()
        .map(|e| (e.entry, e.request, true, 1000))
        .collect();
    for _ in 0..100_000 {
        guest.drain();
        if guest.outstanding.is_empty() {
            assert_eq!(guest.answered, guest.next_id - 1);
            assert_eq!(backend.log.free_entries().unwrap(), RING_SIZE as usize);
            return;
        }
        backend.step();
    }
    panic!("requests never answered: {:?}", guest.outstanding);
}

/// Waits until the child has taken the log over (generation 1).
fn wait_ready(guest: &mut Guest, child: &mut Child, log: &ShadowLog) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    let exited = serve_guest(guest, child, |_| {
        log.generation().unwrap() >= 1 || Instant::now() > deadline
    });
    assert!(Instant::now() <= deadline, "backend process never started");
    exited
}

#[test]
fn sigkill_at_random_moments() {
    let mut rng = Rng::new(0x51_61_4b_11);
    let mut progressed = 0;
    for round in 0..16u64 {
        let mut guest = Guest::new();
        let sup = ShadowLog::create(RING_SIZE).unwrap();
        let seed = rng.next_u64();
        let mut child = spawn_backend(&guest, &sup, seed, None);
        assert!(
            !wait_ready(&mut guest, &mut child, &sup),
            "backend exited early"
        );
        // Let it serve for a while: a number of answers, then a random delay.
        let want = 20 + rng.below(400);
        let start = Instant::now();
        let exited = serve_guest(&mut guest, &mut child, |g| {
            g.answered >= want || start.elapsed() > Duration::from_secs(20)
        });
        assert!(!exited, "backend exited on its own");
        let extra = Duration::from_micros(rng.below(3000));
        let t = Instant::now();
        serve_guest(&mut guest, &mut child, |_| t.elapsed() >= extra);
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(Signal::SIGKILL as i32),
            "round {round}"
        );
        if guest.answered >= want {
            progressed += 1;
        }
        recover_and_finish(&mut guest, &sup, seed);
    }
    assert!(
        progressed >= 8,
        "the backend rarely made progress before the kill"
    );
}

#[test]
fn sigkill_at_every_crash_point() {
    // The transitions a serving backend goes through; the recovery ones
    // (recover, repush, replay, rewrite) are covered in-process (model.rs).
    let serving = [
        Transition::Begin,
        Transition::Consume,
        Transition::Complete,
        Transition::Free,
        Transition::Published,
        Transition::Progress,
    ];
    let mut rng = Rng::new(7);
    for p in CrashPoint::all().filter(|p| serving.contains(&p.transition)) {
        let repeats: &[u64] = match p.transition {
            Transition::Begin | Transition::Published => &[1],
            _ => &[1, 9, 60],
        };
        for &nth in repeats {
            let mut guest = Guest::new();
            let sup = ShadowLog::create(RING_SIZE).unwrap();
            let seed = rng.next_u64();
            let mut child = spawn_backend(&guest, &sup, seed, Some(format!("{p}@{nth}")));
            let deadline = Instant::now() + Duration::from_secs(60);
            let exited = serve_guest(&mut guest, &mut child, |_| Instant::now() > deadline);
            assert!(exited, "backend never reached {p}@{nth}");
            let status = child.wait().unwrap();
            assert_eq!(status.signal(), Some(Signal::SIGKILL as i32), "{p}@{nth}");
            recover_and_finish(&mut guest, &sup, seed);
        }
    }
}
