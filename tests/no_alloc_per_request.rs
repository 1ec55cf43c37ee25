//! The block data plane allocates nothing per request once warm
//! (docs/ARCHITECTURE.md §11.2): a backend runs in a thread of this test,
//! under a global allocator that counts what that thread allocates, and a
//! Xen frontend or a virtio driver in the test's own thread pushes reads
//! and writes through it, one at a time and in bursts. After a warm-up,
//! the steady state must not allocate at all.
//!
//! One test function per transport, each with its own backend thread;
//! only the backend thread's allocations are counted, so the tests may run
//! in parallel.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shadowback_blkback::backend::Backend;
use shadowback_blkback::instance::BackendConfig;
use shadowback_blkback::request::{DiskGeometry, DEFAULT_MAX_INDIRECT_SEGMENTS};
use shadowback_dataplane::uring::EngineConfig;
use shadowback_ring::blkif::{
    BlkifRequest, BlkifRequestSegment, BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_OKAY,
};
use shadowback_shadow::ShadowLog;
use shadowback_testsupport::raw_guest::{raw_data_gref, RawRegion, RAW_PAGES, RAW_RING_REF};
use shadowback_testsupport::temp::TempImage;
use shadowback_testsupport::virtqueue::{Device, FEATURE_EVENT_IDX, T_IN, T_OUT};
use shadowback_testsupport::REPLY_TIMEOUT;
use shadowback_xenbus::{kind, AttachRequest, ConnectRequest, SeqPacket};

/// Counts the allocations (and reallocations) of the threads that ask for it.
struct CountingAlloc;

/// The allocations of each test's backend thread.
static XEN_BACKEND: AtomicU64 = AtomicU64::new(0);
static VIRTIO_BACKEND: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Where this thread's allocations are counted, if they are.
    static COUNTER: Cell<Option<&'static AtomicU64>> = const { Cell::new(None) };
}

fn count_one() {
    // `try_with`: no panic while a thread's locals are being torn down.
    if let Ok(Some(counter)) = COUNTER.try_with(Cell::get) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counting touches only an atomic and a const-initialised thread-local
// without destructor, neither of which allocates.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        // SAFETY: the caller's contract for `realloc`, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc`, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Requests before counting starts (scratch vectors reach their size).
const WARM_UP: usize = 256;
/// Requests counted.
const COUNTED_REQUESTS: usize = 1024;
/// Disk size: 8 MiB.
const SECTORS: u64 = 16 * 1024;

/// A backend serving `image` in a thread of this process, whose
/// allocations are counted in `counter`; `control` is the supervisor's end.
struct InProcessBackend {
    control: SeqPacket,
    counter: &'static AtomicU64,
    thread: JoinHandle<()>,
}

impl InProcessBackend {
    fn start(image: &TempImage, counter: &'static AtomicU64) -> Self {
        let (ours, theirs) = SeqPacket::pair().expect("socketpair");
        let disk = image.file.try_clone().expect("dup image");
        let cfg = BackendConfig {
            device: "vd0".into(),
            backend_id: 0,
            disk: DiskGeometry {
                sectors: SECTORS,
                readonly: false,
                discard: true,
                max_indirect_segments: DEFAULT_MAX_INDIRECT_SEGMENTS,
            },
            max_ring_page_order: 4,
            engine: EngineConfig {
                entries: 512,
                ..EngineConfig::default()
            },
            shadow: true,
            crash_at: Default::default(),
            poll_us: 0,
            qos: Default::default(),
        };
        let thread = std::thread::spawn(move || {
            COUNTER.with(|c| c.set(Some(counter)));
            let mut backend = Backend::new(cfg, theirs, &disk).expect("backend");
            // Ends when the test closes its end of the control socket.
            let _ = backend.run();
        });
        InProcessBackend {
            control: ours,
            counter,
            thread,
        }
    }

    fn expect_attached(&self) {
        let (reply, _) = self
            .control
            .recv_timeout(REPLY_TIMEOUT)
            .expect("control socket")
            .expect("an answer to attach");
        assert_eq!(reply.kind(), kind::ATTACHED, "{reply}");
    }

    /// Closes the control socket: the backend's loop ends.
    fn stop(self) {
        let InProcessBackend {
            control, thread, ..
        } = self;
        drop(control);
        thread.join().expect("backend thread");
    }

    /// Runs requests through `one` (which returns how many it completed),
    /// the first [`WARM_UP`] uncounted; returns the allocations of the
    /// backend thread during the next [`COUNTED_REQUESTS`].
    fn allocations_in_steady_state(&self, mut one: impl FnMut(usize) -> usize) -> u64 {
        let mut done = 0;
        while done < WARM_UP {
            done += one(done);
        }
        let before = self.counter.load(Ordering::SeqCst);
        let mut counted = 0;
        while counted < COUNTED_REQUESTS {
            counted += one(done + counted);
        }
        self.counter.load(Ordering::SeqCst) - before
    }
}

#[test]
fn a_xen_ring_request_allocates_nothing_in_steady_state() {
    let image = TempImage::new("noalloc-xen", SECTORS * 512);
    let backend = InProcessBackend::start(&image, &XEN_BACKEND);
    let mut mem = RawRegion::new(0);
    let log = ShadowLog::create(mem.ring.size()).expect("shadow log");
    let req = AttachRequest {
        frontend: "test-vm".into(),
        connect: ConnectRequest {
            device: "vd0".into(),
            frontend_id: 1,
            ring_refs: vec![RAW_RING_REF],
            grant_frames: 1,
            feature_persistent: false,
        },
    };
    let fds = [
        mem.region.file().as_fd(),
        mem.kick.as_fd(),
        mem.notify.as_fd(),
        log.file().as_fd(),
    ];
    backend
        .control
        .send(&req.to_message().expect("attach message"), &fds)
        .expect("send attach");
    backend.expect_attached();

    let data_pages = RAW_PAGES - 2;
    let allocs = backend.allocations_in_steady_state(|n| {
        // One request alone, then a burst of one per data page, in turn.
        let burst = if n.is_multiple_of(2) { 1 } else { data_pages };
        for i in 0..burst {
            let mut r = BlkifRequest {
                operation: if (n + i as usize).is_multiple_of(3) {
                    BLKIF_OP_WRITE
                } else {
                    BLKIF_OP_READ
                },
                nr_segments: 1,
                id: (n as u64) << 8 | u64::from(i),
                sector_number: (n as u64 * 8 + u64::from(i) * 8) % (SECTORS - 8),
                ..Default::default()
            };
            r.seg[0] = BlkifRequestSegment {
                gref: raw_data_gref(i),
                first_sect: 0,
                last_sect: 7,
                _pad: [0; 2],
            };
            mem.ring.put_request(&r).expect("put request");
        }
        if mem.ring.push_requests().expect("push") {
            mem.kick.notify().expect("kick");
        }
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let mut got = 0;
        while got < burst {
            if let Some(rsp) = mem.ring.take_response().expect("take response") {
                assert_eq!(rsp.status, BLKIF_RSP_OKAY, "{rsp:?}");
                got += 1;
                continue;
            }
            if mem.ring.final_check_for_responses().expect("final check") {
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no response within {REPLY_TIMEOUT:?}");
            mem.notify.wait(left).expect("wait");
        }
        burst as usize
    });
    backend.stop();
    assert_eq!(
        allocs, 0,
        "the backend allocated {allocs} times over {COUNTED_REQUESTS} Xen-ring requests in steady state"
    );
}

#[test]
fn a_virtio_request_allocates_nothing_in_steady_state() {
    let image = TempImage::new("noalloc-virtio", SECTORS * 512);
    let backend = InProcessBackend::start(&image, &VIRTIO_BACKEND);
    let mut dev = Device::new(64, true, true, FEATURE_EVENT_IDX);
    let req = dev.request(0);
    dev.send_attach_on(&backend.control, &req, false, false);
    backend.expect_attached();

    const BURST: u16 = 8;
    let allocs = backend.allocations_in_steady_state(|n| {
        let burst = if n.is_multiple_of(2) { 1 } else { BURST };
        let reqs: Vec<(u16, u32, u64, u32)> = (0..burst)
            .map(|head| {
                let t = if (n + usize::from(head)).is_multiple_of(3) {
                    T_OUT
                } else {
                    T_IN
                };
                let sector = (n as u64 * 8 + u64::from(head) * 8) % (SECTORS - 8);
                (head, t, sector, 4096)
            })
            .collect();
        dev.submit_all(&reqs);
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let mut got = 0;
        while got < usize::from(burst) {
            let used = dev.wait_used(Duration::from_millis(100));
            for &(head, _) in &used {
                assert_eq!(dev.status(head as u16), 0, "head {head} failed");
            }
            got += used.len();
            assert!(
                Instant::now() < deadline,
                "no used element within {REPLY_TIMEOUT:?}"
            );
        }
        usize::from(burst)
    });
    backend.stop();
    assert_eq!(
        allocs, 0,
        "the backend allocated {allocs} times over {COUNTED_REQUESTS} virtio requests in steady state"
    );
}
