//! Backend failures under a verifying guest, with the real `shadowback
//! blkback` (docs/ARCHITECTURE.md §7): SIGKILL and SIGSTOP at arbitrary times, a crash
//! point inside the shadow-log stores, a poisoned request. The guest stays
//! Connected, sees no I/O error and no wrong data (every read is checked
//! against the model of acknowledged writes, and the whole region again at
//! the end), and the supervisor's counters account for every failure.
//!
//! The supervisor runs in this process (`shadowback_testsupport::harness`);
//! the guest is the guest crate's `BlkFront`.
#![deny(unsafe_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use shadowback_guest::blkfront::{BlkFront, BlkFrontConfig};
use shadowback_guest::device::{BlockDevice, BlockRequest, Completion, Status};
use shadowback_guest::workload::{Pattern, Report, VerifyConfig, VerifyWorkload};
use shadowback_supervisor::{CacheMode, DiskConfig, Fault};
use shadowback_testsupport::blockio::{assert_clean_report, assert_verified, Bystander};
use shadowback_testsupport::harness::{
    backend_command, default_disks, unique_name, DiskSetup, Harness, STATS_TIMEOUT,
};
use shadowback_testsupport::operator::stats_of;
use shadowback_testsupport::process::share_fd_of;
use shadowback_testsupport::temp::TempDir;
use shadowback_testsupport::wait::wait_for_state;

const IMAGE_MIB: u64 = 32;
/// The workload's region: the first 16 MiB.
const REGION_SECTORS: u64 = 32 * 1024;

/// A supervisor serving one fresh disk, named after `tag`, with real
/// backends.
fn start(tag: &str, edit: impl FnOnce(&mut DiskConfig), first_env: &[(&str, &str)]) -> DiskSetup {
    DiskSetup::start(tag, &unique_name(tag), IMAGE_MIB, edit, first_env)
}

fn attach(setup: &DiskSetup) -> BlkFront {
    let mut cfg = BlkFrontConfig::new(setup.name());
    cfg.max_request_bytes = 64 * 1024;
    BlkFront::attach(setup.socket(), &cfg).expect("guest attaches")
}

fn workload(seed: u64, duration: Duration) -> VerifyWorkload {
    VerifyWorkload::new(VerifyConfig {
        seed,
        queue_depth: 16,
        max_bytes: 64 * 1024,
        duration: Some(duration),
        max_ops: None,
        final_check: true,
        region: Some((0, REGION_SECTORS)),
        assume_zeroed: true,
        stall_timeout: Duration::from_secs(10),
        ..VerifyConfig::default()
    })
}

/// Runs a verifying workload while `inject` is called every `every` on
/// another thread (until the workload ends); returns the report and how
/// many times `inject` ran.
fn under_load(
    setup: &DiskSetup,
    front: &mut BlkFront,
    seed: u64,
    duration: Duration,
    every: Duration,
    inject: impl Fn(&DiskSetup) + Sync,
) -> (Report, u64) {
    let done = AtomicBool::new(false);
    let start = Instant::now();
    // A hung backend is only declared hung while it has work (an idle one
    // costs nothing), so every fault must land well inside the timed phase:
    // one injected as the workload ends would never be recovered and the
    // injector would wait for it in vain (seen once at load 16).
    let last_inject = duration.saturating_sub(Duration::from_secs(1));
    std::thread::scope(|s| {
        let injector = s.spawn(|| {
            let mut n = 0;
            // Let the workload fill the ring first.
            std::thread::sleep(every);
            while !done.load(Ordering::Acquire) && start.elapsed() < last_inject {
                inject(setup);
                n += 1;
                std::thread::sleep(every);
            }
            n
        });
        let report = workload(seed, duration)
            .run(front, &mut |_| {})
            .map_err(|e| e.to_string());
        done.store(true, Ordering::Release);
        let n = injector.join().expect("injector");
        (report.expect("the workload runs to the end"), n)
    })
}

#[test]
fn sigkill_under_load_is_invisible_to_the_guest() {
    let setup = start("kill", |_| {}, &[]);
    let mut front = attach(&setup);
    let (report, kills) = under_load(
        &setup,
        &mut front,
        11,
        Duration::from_secs(4),
        Duration::from_millis(250),
        |setup| {
            setup.fault_and_recover(Fault::Kill);
        },
    );
    assert_verified(&report, "guest under SIGKILLs");
    let s = setup.stats();
    assert!(kills >= 3, "only {kills} kills");
    // A loaded machine may also stall a backend past the hang timeout while
    // it has work: that is recovered too, and counted as a hang.
    assert_eq!(s.crashes, kills, "{s:#?}");
    assert_eq!(s.recoveries, s.crashes + s.hangs, "{s:#?}");
    assert_eq!(s.failed_takeovers, 0, "{s:#?}");
    assert!(s.connected && !s.given_up);
    assert!(s.standby_takeovers >= 1, "{s:#?}");
    let last = s.last_recovery.expect("timings");
    assert!(last.total_us > 0 && last.total_us < 5_000_000, "{last:?}");
    // Still the same connection: a clean detach.
    front.detach().expect("the guest detaches normally");
}

#[test]
fn sigstop_under_load_is_detected_and_recovered() {
    let setup = start("hang", |_| {}, &[]);
    let mut front = attach(&setup);
    let (report, hangs) = under_load(
        &setup,
        &mut front,
        12,
        Duration::from_secs(4),
        Duration::from_millis(300),
        |setup| {
            let before = setup.stats().recoveries;
            setup.sup().fault(setup.name(), Fault::Hang).expect("hang");
            setup.wait_for("the recovery", |s| s.recoveries > before);
        },
    );
    assert_verified(&report, "guest under SIGSTOPs");
    let s = setup.stats();
    assert!(hangs >= 3, "only {hangs} hangs");
    assert!(s.hangs >= hangs, "{s:#?}");
    assert_eq!((s.crashes, s.recoveries), (0, s.hangs), "{s:#?}");
    let last = s.last_recovery.expect("timings");
    // From the later of the heartbeat's last change and the first check
    // that saw work pending: at most the timeout plus a check period or so.
    assert!(last.detect_us < 1_000_000, "{last:?}");
    front.detach().expect("the guest detaches normally");
}

#[test]
fn a_crash_inside_a_shadow_log_transition_is_recovered() {
    // `published` fires once per instance (its first publication).
    for point in [
        "consume.4@40",
        "complete.2@30",
        "free.1@25",
        "published.1@1",
        "consume.8@90",
    ] {
        // Crashes are seen by the pidfd; a long hang timeout keeps a loaded
        // machine's scheduling delays (a 100 ms stall of the recovered
        // instance was seen with both cores saturated) from adding a
        // watchdog replacement to the one recovery this test counts.
        let setup = start(
            "crashpt",
            |d| d.hang_timeout_ms = 5_000,
            &[("SHADOWBACK_CRASH_AT", point)],
        );
        let mut front = attach(&setup);
        let report = workload(13, Duration::from_secs(2))
            .run(&mut front, &mut |_| {})
            .unwrap_or_else(|e| panic!("{point}: {e}"));
        assert_verified(&report, point);
        let s = setup.stats();
        assert_eq!((s.crashes, s.recoveries), (1, 1), "{point}: {s:#?}");
        // The abort announced itself before the process died
        // (docs/ARCHITECTURE.md §7.2).
        assert_eq!(s.crash_notes, 1, "{point}: {s:#?}");
        // Announcing it does not turn the abort into a seccomp kill.
        assert_ne!(
            s.last_failure.as_deref(),
            Some("killed by SIGSYS"),
            "{point}"
        );
        front.detach().expect("detach");
    }
}

fn complete_one(front: &mut BlkFront, req: &BlockRequest<'_>) -> Completion {
    front.submit(7, req).expect("submit");
    front.kick().expect("kick");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = Vec::new();
    while out.is_empty() {
        assert!(Instant::now() < deadline, "no completion for {:?}", req.op);
        front
            .poll_completions(Duration::from_millis(100), &mut out)
            .expect("poll");
    }
    assert_eq!(out.len(), 1, "{out:?}");
    out.remove(0)
}

/// A `FLUSH_DISKCACHE` with segments (a write, then a flush: PROTOCOL.md
/// §5.3) that the first instance logged and died before executing is
/// re-executed from its saved bytes by the next one: answered once with
/// `BLKIF_RSP_OKAY`, and its data is in the image.
#[test]
fn a_flush_with_data_logged_before_a_crash_is_replayed_as_a_write_and_a_flush() {
    use shadowback_ring::blkif::{
        BlkifRequest, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_RSP_OKAY, BLKIF_SECTOR_SIZE,
    };
    use std::os::unix::fs::FileExt;
    const SECTOR: u64 = 4096;
    // The first request consumed dies right after its last log store
    // (INFLIGHT, req_cons): logged, not executed. The watchdog must not
    // act first.
    let setup = start(
        "flush-replay",
        |d| d.hang_timeout_ms = 5_000,
        &[("SHADOWBACK_CRASH_AT", "consume.8@1")],
    );
    let mut front = attach(&setup);
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + i / 511) as u8).collect();
    for page in 0..2 {
        let off = front.data_offset(0, page).expect("data page");
        let at = page as usize * 4096;
        front
            .region()
            .write(off, &data[at..at + 4096])
            .expect("fill");
    }
    let mut req = BlkifRequest {
        operation: BLKIF_OP_FLUSH_DISKCACHE,
        nr_segments: 2,
        id: 0xf1a5,
        sector_number: SECTOR,
        ..Default::default()
    };
    for page in 0..2 {
        let s = &mut req.seg[page as usize];
        s.gref = front.data_gref(0, page).expect("gref");
        s.last_sect = 7;
    }
    front.submit_raw(req).expect("submit");
    front.kick().expect("kick");
    let rsp = front
        .take_raw_response(Duration::from_secs(30))
        .expect("ring")
        .expect("a response after the recovery");
    assert_eq!(
        (rsp.id, rsp.operation, rsp.status),
        (0xf1a5, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_RSP_OKAY)
    );
    let extra = front.take_raw_response(Duration::from_millis(200));
    assert!(matches!(extra, Ok(None)), "a second response: {extra:?}");
    let s = setup.stats();
    assert_eq!((s.crashes, s.recoveries), (1, 1), "{s:#?}");
    assert!(s.replayed >= 1, "the request was not replayed: {s:#?}");
    let mut image = vec![0u8; data.len()];
    std::fs::File::open(setup.image())
        .and_then(|f| f.read_exact_at(&mut image, SECTOR * BLKIF_SECTOR_SIZE))
        .expect("read image");
    assert!(
        image == data,
        "the replayed FLUSH_DISKCACHE did not write its data to the image"
    );
    front.detach().expect("detach");
}

#[test]
fn a_poisoned_request_is_failed_by_the_crash_loop_breaker_and_the_device_keeps_serving() {
    // Outside the workload's region: a request covering it would kill
    // every instance again.
    const SECTOR: u64 = REGION_SECTORS + 1_000;
    let setup = start("poison", |_| {}, &[]);
    let mut front = attach(&setup);
    let data = vec![0x5au8; 4096];
    let ok = complete_one(&mut front, &BlockRequest::write(SECTOR + 64, &data));
    assert_eq!(ok.status, Status::Ok);

    setup
        .sup()
        .fault(setup.name(), Fault::Poison { sector: SECTOR })
        .expect("poison");
    let poisoned = complete_one(&mut front, &BlockRequest::write(SECTOR, &data));
    assert_eq!(
        poisoned.status,
        Status::IoError,
        "exactly one error response"
    );
    // The instance that gives the verdict reports it when it attaches,
    // which may be after the guest saw the error response.
    let s = setup.wait_for("the poison verdict", |s| s.poisoned >= 1);
    assert_eq!(s.poisoned, 1, "{s:#?}");
    assert!(s.crashes >= 2, "every instance replaying it died: {s:#?}");
    assert!(s.connected && !s.given_up, "{s:#?}");

    // The device still serves everything else, verified.
    let report = workload(14, Duration::from_secs(1))
        .run(&mut front, &mut |_| {})
        .expect("workload after the poison");
    assert_verified(&report, "after the poison");
    front.detach().expect("detach");
}

#[test]
fn requests_in_flight_beside_a_poison_request_are_not_failed_with_it() {
    const SECTOR: u64 = REGION_SECTORS + 2_000;
    const POISON_TAG: u64 = 8;
    let setup = start("poison-mix", |_| {}, &[]);
    let mut front = attach(&setup);
    setup
        .sup()
        .fault(setup.name(), Fault::Poison { sector: SECTOR })
        .expect("poison");
    // The poison request and 16 innocent writes, all in flight together.
    let sector_of = |tag: u64| {
        if tag == POISON_TAG {
            SECTOR
        } else {
            SECTOR + 64 + 8 * tag
        }
    };
    let data: Vec<Vec<u8>> = (0..17u8).map(|i| vec![i + 1; 4096]).collect();
    for tag in 0..17u64 {
        front
            .submit(
                tag,
                &BlockRequest::write(sector_of(tag), &data[tag as usize]),
            )
            .expect("submit");
    }
    front.kick().expect("kick");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut done = Vec::new();
    while done.len() < 17 {
        assert!(
            Instant::now() < deadline,
            "only {} of 17 completions",
            done.len()
        );
        front
            .poll_completions(Duration::from_millis(100), &mut done)
            .expect("poll");
    }
    for c in &done {
        let want = if c.tag == POISON_TAG {
            Status::IoError
        } else {
            Status::Ok
        };
        assert_eq!(c.status, want, "tag {}: {done:?}", c.tag);
    }
    let s = setup.wait_for("the poison verdict", |s| s.poisoned >= 1);
    assert_eq!(s.poisoned, 1, "only the poison request is failed: {s:#?}");
    // Every innocent write is on disk as acknowledged.
    for tag in (0..17u64).filter(|&t| t != POISON_TAG) {
        let got = complete_one(&mut front, &BlockRequest::read(sector_of(tag), 8, true));
        assert_eq!(got.status, Status::Ok);
        assert_eq!(
            got.data.as_deref(),
            Some(&data[tag as usize][..]),
            "tag {tag}"
        );
    }
    front.detach().expect("detach");
}

#[test]
fn without_the_shadow_layer_a_crash_disconnects_the_guest() {
    let setup = start("noshadow", |d| d.shadow = false, &[]);
    let mut front = attach(&setup);
    let data = vec![1u8; 4096];
    assert_eq!(
        complete_one(&mut front, &BlockRequest::write(0, &data)).status,
        Status::Ok
    );
    setup.sup().fault(setup.name(), Fault::Kill).expect("kill");
    setup.wait_for("the crash", |s| s.crashes == 1);
    // The next request finds the device gone (the control socket carries
    // `error code=ENODEV`, then closes).
    front
        .submit(9, &BlockRequest::write(16, &data))
        .expect("submit");
    let _ = front.kick();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut out = Vec::new();
    loop {
        assert!(Instant::now() < deadline, "the guest was not disconnected");
        match front.poll_completions(Duration::from_millis(50), &mut out) {
            Err(_) => break,
            Ok(()) => assert!(out.is_empty(), "completed without a backend: {out:?}"),
        }
    }
    let s = setup.wait_for("a fresh backend", |s| s.pid.is_some() && !s.connected);
    assert_eq!((s.crashes, s.recoveries), (1, 0));
    // A new guest gets the new backend.
    let mut again = attach(&setup);
    assert_eq!(
        complete_one(&mut again, &BlockRequest::write(8, &data)).status,
        Status::Ok
    );
}

/// Sets the flag when dropped: a panicking thread still stops the others.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A random workload that keeps running, in one-second segments (the
/// model carries over), until `until` says stop; then a final full check.
fn run_until(front: &mut BlkFront, seed: u64, qd: usize, until: &AtomicBool) -> Report {
    run_segments(front, segments(seed, qd), until)
}

/// The configuration of one segment of [`run_until`].
fn segments(seed: u64, qd: usize) -> VerifyConfig {
    VerifyConfig {
        seed,
        queue_depth: qd,
        max_bytes: 64 * 1024,
        duration: Some(Duration::from_secs(1)),
        final_check: false,
        region: Some((0, REGION_SECTORS)),
        stall_timeout: Duration::from_secs(10),
        ..VerifyConfig::default()
    }
}

/// Runs `cfg` in segments until `until` says stop (or a segment fails);
/// then a final full check.
fn run_segments(front: &mut BlkFront, cfg: VerifyConfig, until: &AtomicBool) -> Report {
    let mut w = VerifyWorkload::new(cfg);
    let mut total = Report::default();
    let mut add = |r: &Report| {
        total.ops += r.ops;
        total.reads += r.reads;
        total.writes += r.writes;
        total.flushes += r.flushes;
        total.discards += r.discards;
        total.verify_failures += r.verify_failures;
        total.io_errors += r.io_errors;
        total.lost += r.lost;
        total.duplicates += r.duplicates;
        total.stale_reads += r.stale_reads;
        total.rounds += r.rounds;
        total.sectors_verified_final += r.sectors_verified_final;
        total.failures.extend(r.failures.iter().cloned());
    };
    while !until.load(Ordering::Acquire) {
        let r = w.run(front, &mut |_| {}).expect("workload segment");
        add(&r);
        if r.verify_failures > 0 {
            break;
        }
    }
    let last = w.verify_all(front, &mut |_| {}).expect("final check");
    add(&last);
    total
}

/// Runs `cfg` in segments on `front` while up to `n` SIGKILLs are injected,
/// each `pause(rng)` after the previous recovery; returns the report and
/// the number of kills. A failing segment ends the run (and the kills).
fn kill_soak(
    setup: &DiskSetup,
    front: &mut BlkFront,
    cfg: VerifyConfig,
    n: u64,
    pause: impl Fn(u64) -> Duration + Sync,
) -> (Report, u64) {
    fault_soak(setup, front, cfg, n, Fault::Kill, pause)
}

/// [`kill_soak`] with another fault.
fn fault_soak(
    setup: &DiskSetup,
    front: &mut BlkFront,
    cfg: VerifyConfig,
    n: u64,
    fault: Fault,
    pause: impl Fn(u64) -> Duration + Sync,
) -> (Report, u64) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let killer = s.spawn(|| {
            let _stop_guard = StopOnDrop(&stop);
            let mut rng = 0x9e37_79b9_7f4a_7c15u64;
            let mut kills = 0;
            let mut longest = Duration::ZERO;
            std::thread::sleep(Duration::from_millis(100));
            while kills < n && !stop.load(Ordering::Acquire) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                std::thread::sleep(pause(rng));
                let injected = Instant::now();
                setup.fault_and_recover(fault);
                longest = longest.max(injected.elapsed());
                kills += 1;
            }
            stop.store(true, Ordering::Release);
            eprintln!(
                "{kills} {fault:?} faults, the longest from injection to recovery {:.1} ms",
                longest.as_secs_f64() * 1e3
            );
            kills
        });
        let report = run_segments(front, cfg, &stop);
        stop.store(true, Ordering::Release);
        (report, killer.join().expect("killer"))
    })
}

/// The soak of docs/ARCHITECTURE.md §7.6: at least 300 SIGKILLs at random moments under a QD32
/// workload of reads, writes, flushes and discards; no request lost or
/// answered twice, no wrong data, the whole region verified at the end.
#[test]
fn random_sigkill_soak() {
    const KILLS: u64 = 300;
    let setup = start("soak", |_| {}, &[]);
    let mut front = attach(&setup);
    let (report, kills) = kill_soak(&setup, &mut front, segments(21, 32), KILLS, |rng| {
        Duration::from_micros(3_000 + rng % 20_000)
    });
    assert_eq!(report.lost, 0, "{:?}", report.failures);
    assert_eq!(report.duplicates, 0, "{:?}", report.failures);
    assert_eq!(report.verify_failures, 0, "{:?}", report.failures);
    // After the verdicts: a failing segment ends the kills early.
    assert_eq!(kills, KILLS);
    assert_eq!(report.io_errors, 0, "{report:?}");
    assert!(
        report.flushes > 0 && report.discards > 0 && report.reads > 0,
        "{report:?}"
    );
    assert_eq!(
        report.sectors_verified_final, REGION_SECTORS,
        "whole region verified"
    );
    let s = setup.stats();
    // Every accepted kill ends an instance (one still being replaced is
    // refused with EBUSY and tried again), but an instance the watchdog
    // found hung at the same moment (a starved instance on a saturated
    // machine) is counted as a hang. So each kill is a crash or a hang.
    assert!(s.crashes + s.hangs >= KILLS, "{s:#?}");
    assert!(s.crashes > 0 && s.connected && !s.given_up, "{s:#?}");
    assert!(
        s.replayed > 0,
        "kills landed with requests in flight: {s:#?}"
    );
    front
        .detach()
        .expect("the same connection detaches normally");
}

/// The soak above with the Linux test guest's round pattern (issue 8):
/// batches of 16 writes, each waited for before the next, every round read
/// back, so the ring drains to empty between batches and kills find it
/// empty as often as busy. They come 0.3 to 2.3 ms after the previous
/// recovery, while the new instance answers what piled up meanwhile. No
/// request lost or answered twice, no stale or wrong data, the whole
/// region verified at the end.
#[test]
fn sigkill_soak_with_the_ring_draining_in_rounds() {
    const KILLS: u64 = 500;
    /// 2 MiB: a round is about 1500 requests.
    const REGION: u64 = 4096;
    let setup = start("soak-rounds", |_| {}, &[]);
    let mut front = attach(&setup);
    let cfg = VerifyConfig {
        pattern: Pattern::Rounds { batch: 16 },
        region: Some((0, REGION)),
        ..segments(23, 32)
    };
    let (report, kills) = kill_soak(&setup, &mut front, cfg, KILLS, |rng| {
        Duration::from_micros(300 + rng % 2_000)
    });
    assert_eq!(report.verify_failures, 0, "{:?}", report.failures);
    assert_eq!(
        (report.lost, report.duplicates),
        (0, 0),
        "{:?}",
        report.failures
    );
    assert_eq!(report.io_errors, 0, "{report:?}");
    assert_eq!(kills, KILLS);
    assert!(report.rounds >= 2, "{report:?}");
    assert!(report.reads > 0 && report.writes > 0, "{report:?}");
    assert_eq!((report.flushes, report.discards), (0, 0), "{report:?}");
    assert_eq!(
        report.sectors_verified_final, REGION,
        "whole region verified"
    );
    let s = setup.stats();
    // A loaded machine may stall an instance past the hang timeout around
    // a kill: the watchdog replaces it first, and that counts as a hang.
    assert!(s.crashes + s.hangs >= KILLS, "{s:#?}");
    assert_eq!(s.recoveries, s.crashes + s.hangs, "{s:#?}");
    assert!(s.connected && !s.given_up, "{s:#?}");
    front
        .detach()
        .expect("the same connection detaches normally");
}

/// A crash between every pair of shadow-log stores of the request
/// lifecycle (instance start, consume, complete, free, first publication)
/// in the first instance, under load: recovered with every request
/// answered exactly once and the data verified. Crash points that only a
/// recovering instance reaches (repush, rewrite, recover, replay) are
/// swept by the shadow crate's own model tests.
#[test]
fn every_crash_point_of_the_request_lifecycle_is_recovered() {
    use shadowback_shadow::{CrashPoint, Transition};
    let lifecycle = [
        Transition::Begin,
        Transition::Consume,
        Transition::Complete,
        Transition::Free,
        Transition::Published,
    ];
    let points: Vec<CrashPoint> = CrashPoint::all()
        .filter(|p| lifecycle.contains(&p.transition))
        .collect();
    assert!(points.len() >= 20, "{points:?}");
    for point in points {
        // Begin and the first publication happen once per instance.
        let nth = match point.transition {
            Transition::Begin | Transition::Published => 1,
            _ => 29,
        };
        let spec = format!("{point}@{nth}");
        // Only the crash point may end the first instance: on a loaded
        // machine the 100 ms watchdog could replace it before it fires.
        let setup = start(
            "sweep",
            |d| d.hang_timeout_ms = 5_000,
            &[("SHADOWBACK_CRASH_AT", &spec)],
        );
        let mut front = attach(&setup);
        let report = workload(31, Duration::from_millis(600))
            .run(&mut front, &mut |_| {})
            .unwrap_or_else(|e| panic!("{spec}: {e}"));
        assert_verified(&report, &spec);
        assert_eq!((report.lost, report.duplicates), (0, 0), "{spec}");
        let s = setup.stats();
        assert_eq!(s.crashes, 1, "{spec}: the crash point fired once: {s:#?}");
        assert_eq!(s.recoveries, 1, "{spec}: {s:#?}");
        front.detach().expect("detach");
    }
}

/// Spinning backends (no heartbeat, a CPU burnt) under a verifying
/// workload, each spin 400 ms after the previous recovery: the watchdog
/// replaces each, and the guest sees nothing. The workload runs until the
/// last spin is recovered, not for a fixed time: the watchdog calls a
/// runnable thread hung only once it has spent `hang_timeout_ms` on a CPU
/// (docs/ARCHITECTURE.md §7.2), which at load 20 on two cores is over a
/// second of wall time, and a fixed 3 s run then had room for only one
/// spin.
#[test]
fn a_spinning_backend_with_work_is_replaced() {
    const SPINS: u64 = 3;
    let setup = start("spin", |_| {}, &[]);
    let mut front = attach(&setup);
    let (report, spins) = fault_soak(
        &setup,
        &mut front,
        segments(41, 16),
        SPINS,
        Fault::Spin,
        |_| Duration::from_millis(400),
    );
    assert_clean_report(&report, "guest with spinning backends");
    // After the verdicts: a failing segment ends the spins early.
    assert_eq!(spins, SPINS);
    let s = setup.stats();
    assert!(s.hangs >= spins, "spinning backends count as hangs: {s:#?}");
    assert_eq!(s.recoveries, s.crashes + s.hangs, "{s:#?}");
    front.detach().expect("detach");
}

/// A backend that breaks its seccomp filter is killed by SIGSYS (the
/// `syscall` fault makes it call `socket`): the supervisor says so and
/// recovers it like any crash, and the guest sees nothing.
#[test]
fn a_backend_killed_by_its_seccomp_filter_is_recovered_like_any_crash() {
    // Only the filter may end an instance here: on a loaded machine the
    // 100 ms watchdog once declared a fresh instance hung, and its SIGKILL
    // became the last failure.
    let setup = start("sigsys", |d| d.hang_timeout_ms = 5_000, &[]);
    let mut front = attach(&setup);
    let (report, faults) = under_load(
        &setup,
        &mut front,
        43,
        Duration::from_secs(3),
        Duration::from_millis(400),
        |setup| {
            let before = setup.stats().recoveries;
            setup
                .sup()
                .fault(setup.name(), Fault::Syscall)
                .expect("syscall");
            setup.wait_for("the recovery", |s| s.recoveries > before);
        },
    );
    assert_verified(&report, "guest with backends killed by SIGSYS");
    let s = setup.stats();
    assert!(faults >= 2, "only {faults} faults");
    assert_eq!(
        (s.crashes, s.hangs),
        (faults, 0),
        "SIGSYS is a crash: {s:#?}"
    );
    assert_eq!(
        s.last_failure.as_deref(),
        Some("killed by SIGSYS"),
        "{s:#?}"
    );
    front.detach().expect("detach");
}

/// The fields of `/proc/PID/status` that say how confined `pid` is.
fn confinement_of(pid: u32) -> (String, String, String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("no {name} in {status}"))
    };
    (
        field("Seccomp:"),
        field("NoNewPrivs:"),
        field("CapEff:"),
        field("CapBnd:"),
    )
}

/// Serving and standby instances run confined (seccomp filter mode, no
/// new privileges, no capabilities, bounded fds, no core dumps), whatever
/// the supervisor's privileges; `[backend] confine = false` leaves them as
/// they were started, and then the forbidden syscall is survived.
#[test]
fn backends_are_confined_unless_configured_otherwise() {
    let setup = start("confined", |_| {}, &[]);
    let mut front = attach(&setup);
    let s = setup.wait_for("a standby", |s| s.pid.is_some() && s.standby_pid.is_some());
    let zero = "0000000000000000".to_owned();
    for pid in [s.pid.unwrap(), s.standby_pid.unwrap()] {
        // A standby is listed from its spawn on; the filter comes last in
        // its start-up.
        let confined = wait_for_state(
            Duration::from_secs(10),
            "a confined instance",
            || confinement_of(pid),
            |c| c.0 == "2",
        );
        assert_eq!(
            confined,
            ("2".into(), "1".into(), zero.clone(), zero.clone()),
            "instance {pid}"
        );
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let limit = |name: &str| {
            let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
            line.split_whitespace()
                .rev()
                .skip(1)
                .take(2)
                .collect::<Vec<_>>()
        };
        assert_eq!(limit("Max open files"), ["1024", "1024"], "{limits}");
        assert_eq!(limit("Max core file size"), ["0", "0"], "{limits}");
    }
    // Still serving.
    let data = vec![0x3cu8; 4096];
    assert_eq!(
        complete_one(&mut front, &BlockRequest::write(8, &data)).status,
        Status::Ok
    );
    front.detach().expect("detach");
    drop(setup);

    let dir = TempDir::new("unconfined");
    let image = dir.create_image("unconfined.img", IMAGE_MIB << 20);
    let disk = DiskConfig::new("unconfined", &image);
    let harness = Harness::start_with(dir, vec![disk], backend_command().unconfined());
    let s = harness.wait_for("unconfined", "a backend", |s| s.pid.is_some());
    let pid = s.pid.unwrap();
    let (seccomp, no_new_privs, ..) = confinement_of(pid);
    assert_eq!((seccomp.as_str(), no_new_privs.as_str()), ("0", "0"));
    harness
        .sup()
        .fault("unconfined", Fault::Syscall)
        .expect("syscall");
    std::thread::sleep(Duration::from_millis(300));
    let s = harness.stats("unconfined");
    assert_eq!((s.crashes, s.pid), (0, Some(pid)), "{s:#?}");
}

#[test]
fn an_idle_stopped_backend_is_left_alone_until_work_arrives() {
    let setup = start("idle", |_| {}, &[]);
    let mut front = attach(&setup);
    let data = vec![0xa5u8; 4096];
    assert_eq!(
        complete_one(&mut front, &BlockRequest::write(64, &data)).status,
        Status::Ok
    );
    let pid = setup.stats().pid.expect("a backend serves the device");
    setup.sup().fault(setup.name(), Fault::Hang).expect("hang");
    // Far beyond the 100 ms hang timeout, with nothing pending.
    std::thread::sleep(Duration::from_millis(600));
    let s = setup.stats();
    assert_eq!(
        (s.hangs, s.crashes, s.pid),
        (0, 0, Some(pid)),
        "idle backend left alone: {s:#?}"
    );
    // Now the guest wants something: the stopped backend is replaced.
    let got = complete_one(&mut front, &BlockRequest::read(64, 8, true));
    assert_eq!(got.status, Status::Ok);
    assert_eq!(got.data.as_deref(), Some(&data[..]));
    let s = setup.stats();
    assert_eq!(s.hangs, 1, "{s:#?}");
    assert_ne!(s.pid, Some(pid), "{s:#?}");
    front.detach().expect("detach");
}

/// No write of a killed instance lands after the replay: big direct writes
/// are in flight when the backend is killed; once they are acknowledged
/// (replayed), overlapping newer writes are issued, and after a pause for
/// any stray I/O every range must hold the newer data.
#[test]
fn writes_of_a_killed_instance_never_land_after_the_replay() {
    let setup = start("zombie", |_| {}, &[]);
    killed_instances_writes_never_land_late(&setup);
}

/// The same on a block device (a loop device over the image, with direct
/// I/O): a block device has no direct-I/O count to wait for, so only the
/// fence on the dead instance's own open file description orders its
/// writes before the replay (docs/ARCHITECTURE.md §7.3).
#[test]
fn writes_of_a_killed_instance_never_land_after_the_replay_on_a_block_device() {
    let mut loop_dev = None;
    let setup = start(
        "zombie-blk",
        |d| {
            let dev = LoopDevice::attach(&d.path);
            d.path = dev.path.clone();
            d.cache = CacheMode::None;
            d.fast_takeover = true;
            loop_dev = Some(dev);
        },
        &[],
    );
    killed_instances_writes_never_land_late(&setup);
    drop(setup);
    drop(loop_dev);
}

/// One disk's dead backend held in the kernel stalls only that disk
/// (docs/ARCHITECTURE.md §7.3): its fence waits in a thread of the blocking
/// pool, not on the supervisor's runtime. The killed instance's io_uring
/// — whose registered-file table holds its description of the block
/// device, and so its fence lock — is kept alive by the test, as the
/// kernel keeps it while the ring's teardown waits for a CPU; another disk
/// killed at the same moment recovers and its guest keeps verifying, the
/// control socket answers, and the held disk recovers once the ring goes.
#[test]
fn a_fence_held_in_the_kernel_stalls_only_its_own_disk() {
    let dir = TempDir::new("held-fence");
    let names = [unique_name("held"), unique_name("free")];
    let mut disks = default_disks(&dir, &names, IMAGE_MIB);
    let dev = LoopDevice::attach(&disks[0].path);
    disks[0].path = dev.path.clone();
    disks[0].cache = CacheMode::None;
    // The fence before the takeover: the wait this test is about stalls the
    // takeover itself (with `fast_takeover` it runs beside the next
    // instance, `a_request_overlapping_a_dead_instances_write_waits_for_the_fence`).
    disks[0].fast_takeover = false;
    let harness = Harness::start_with(dir, disks, backend_command());
    let attach = |name: &str| {
        let mut cfg = BlkFrontConfig::new(name);
        cfg.max_request_bytes = 64 * 1024;
        BlkFront::attach(harness.socket(), &cfg).expect("attach")
    };
    let mut held = attach(&names[0]);
    let bystander = Bystander::start(attach(&names[1]), 90);
    let data = vec![0x5au8; 4096];
    assert_eq!(
        complete_one(&mut held, &BlockRequest::write(8, &data)).status,
        Status::Ok
    );
    let pid = harness.stats(&names[0]).pid.expect("a backend");
    let ring = share_fd_of(pid, std::path::Path::new("anon_inode:[io_uring]"));
    bystander.progressing("before the kills");

    held.submit(1, &BlockRequest::write(16, &data))
        .expect("submit");
    held.kick().expect("kick");
    let sup = harness.sup();
    sup.fault(&names[0], Fault::Kill)
        .expect("kill the held disk's backend");
    sup.fault(&names[1], Fault::Kill)
        .expect("kill the free disk's backend");
    harness.wait_for(&names[1], "the free disk's recovery", |s| s.recoveries == 1);
    bystander.progressing("while the other disk's fence is held");
    let s = stats_of(harness.socket(), &names[0]);
    assert_eq!(
        (s.crashes, s.recoveries),
        (1, 0),
        "the held disk is still fencing: {s:#?}"
    );

    drop(ring);
    harness.wait_for(&names[0], "the held disk's recovery", |s| s.recoveries == 1);
    let mut out = Vec::new();
    let deadline = Instant::now() + STATS_TIMEOUT;
    while out.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the pending write was never answered"
        );
        held.poll_completions(Duration::from_millis(50), &mut out)
            .expect("poll");
    }
    assert_eq!(out[0].status, Status::Ok);
    let got = complete_one(&mut held, &BlockRequest::read(16, 8, true));
    assert_eq!(got.data.as_deref(), Some(&data[..]));
    let (free, _) = bystander.finish("the free disk");
    held.detach().expect("detach");
    free.detach().expect("detach");
    drop(harness);
    drop(dev);
}

/// docs/ARCHITECTURE.md §7.3: after a takeover the new instance serves at
/// once what does not conflict with the dead instance's requests, and holds
/// back — until the dead instance's I/O is gone — the requests it logged
/// and every new request overlapping one of them. The first instance dies
/// right after logging the second request it takes (a crash point), so that
/// write is in its log, unanswered. On a block device the fence waits for
/// the last reference to the dead instance's own open file description;
/// the test holds one (taken with `pidfd_getfd`, as an in-flight request
/// would), so the fence stays up until it lets go: reads of other sectors
/// are answered meanwhile, a write overlapping the logged one is not, nor
/// is the logged one's replay. Nothing here depends on timing: the fence is
/// up until the test drops its reference.
#[test]
fn a_request_overlapping_a_dead_instances_write_waits_for_the_fence() {
    let mut loop_dev = None;
    let setup = start(
        "holdback",
        |d| {
            let dev = LoopDevice::attach(&d.path);
            d.path = dev.path.clone();
            d.cache = CacheMode::None;
            d.hang_timeout_ms = 60_000;
            d.fast_takeover = true;
            loop_dev = Some(dev);
        },
        &[("SHADOWBACK_CRASH_AT", "consume.8@2")],
    );
    let mut front = attach(&setup);
    // The first request is answered (an instance that published nothing
    // before dying is suspected of a crash loop, and its successor replays
    // one request at a time, serving nothing new meanwhile, §7.5).
    complete_one(&mut front, &BlockRequest::read(4096, 8, false));
    let pid = setup.stats().pid.expect("a backend serves");
    // A reference to the instance's ring, whose registered-file table holds
    // its description of the disk (the backend closes the fd it was given
    // once the file is registered), as the kernel keeps the ring while the
    // dead instance's I/O is in flight: its fence waits for it.
    let reference = share_fd_of(pid, std::path::Path::new("anon_inode:[io_uring]"));
    let logged = vec![0x11u8; 64 * 1024];
    let newer = vec![0x22u8; 64 * 1024];
    front
        .submit(1, &BlockRequest::write(0, &logged))
        .expect("submit");
    front.kick().expect("kick");
    // Polls until `tag` has completed.
    let until = |front: &mut BlkFront, done: &mut Vec<Completion>, tag: u64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done.iter().any(|c| c.tag == tag) {
            assert!(Instant::now() < deadline, "request {tag} never answered");
            front
                .poll_completions(Duration::from_millis(10), done)
                .expect("poll");
        }
    };
    // Once the next instance answers a read elsewhere, it has taken over;
    // then a write overlapping the logged one, and another read: once that
    // is answered, the write has been taken too (requests are taken in
    // ring order).
    let mut done = Vec::new();
    front
        .submit(2, &BlockRequest::read(8192, 8, false))
        .expect("submit");
    front.kick().expect("kick");
    until(&mut front, &mut done, 2);
    // The supervisor counts the takeover once it has read `attached`,
    // which the new instance may answer requests before.
    let counted = Instant::now() + Duration::from_secs(60);
    while setup.stats().recoveries == 0 {
        assert!(Instant::now() < counted, "{:#?}", setup.stats());
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(setup.stats().recoveries, 1, "{:#?}", setup.stats());
    front
        .submit(3, &BlockRequest::write(64, &newer))
        .expect("submit");
    front
        .submit(4, &BlockRequest::read(16384, 8, false))
        .expect("submit");
    front.kick().expect("kick");
    until(&mut front, &mut done, 4);
    let settle = Instant::now() + Duration::from_millis(100);
    while Instant::now() < settle {
        front
            .poll_completions(Duration::from_millis(10), &mut done)
            .expect("poll");
    }
    let tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
    assert!(
        !tags.contains(&1) && !tags.contains(&3),
        "the logged write or one overlapping it was answered before the dead instance's \
         I/O was fenced ({tags:?})"
    );
    // The fence goes down: both run, in the order they were held.
    drop(reference);
    until(&mut front, &mut done, 1);
    until(&mut front, &mut done, 3);
    assert!(done.iter().all(|c| c.status == Status::Ok), "{done:?}");
    // Both landed: the overlap holds one of them (the guest had both in
    // flight at once, so either order is right).
    let head = complete_one(&mut front, &BlockRequest::read(0, 128, true));
    let head = head.data.expect("read data");
    assert_eq!(&head[..32 * 1024], &logged[..32 * 1024]);
    assert!(
        head[32 * 1024..] == newer[..32 * 1024] || head[32 * 1024..] == logged[32 * 1024..],
        "the overlap holds neither write"
    );
    let tail = complete_one(&mut front, &BlockRequest::read(128, 64, true));
    assert_eq!(tail.data.as_deref(), Some(&newer[32 * 1024..]));
    front.detach().expect("detach");
    drop(setup);
    drop(loop_dev);
}

/// A loop device over a file, detached on drop.
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    fn attach(file: &std::path::Path) -> Self {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(file)
            .output()
            .expect("losetup runs (util-linux; the tests run as root)");
        assert!(
            out.status.success(),
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Detached on drop even if the check below fails.
        let dev = LoopDevice {
            path: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        };
        assert!(
            dev.path.to_string_lossy().starts_with("/dev/loop"),
            "losetup printed {:?}",
            dev.path
        );
        dev
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.path)
            .status();
    }
}

fn killed_instances_writes_never_land_late(setup: &DiskSetup) {
    const RANGES: u64 = 32;
    const SECTORS: u32 = 128; // 64 KiB each
    let mut front = attach(setup);
    let wait_all = |front: &mut BlkFront, n: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut out = Vec::new();
        while out.len() < n {
            assert!(
                Instant::now() < deadline,
                "{} of {n} completions",
                out.len()
            );
            front
                .poll_completions(Duration::from_millis(50), &mut out)
                .expect("poll");
        }
        out
    };
    for round in 0..20u8 {
        let old: Vec<u8> = vec![round.wrapping_mul(2).wrapping_add(1); SECTORS as usize * 512];
        let new: Vec<u8> = vec![round.wrapping_mul(2).wrapping_add(2); SECTORS as usize * 512];
        for r in 0..RANGES {
            front
                .submit(r, &BlockRequest::write(r * u64::from(SECTORS), &old))
                .expect("submit");
        }
        front.kick().expect("kick");
        setup.sup().fault(setup.name(), Fault::Kill).expect("kill");
        for c in wait_all(&mut front, RANGES as usize) {
            assert_eq!(c.status, Status::Ok, "round {round}");
        }
        for r in 0..RANGES {
            front
                .submit(r, &BlockRequest::write(r * u64::from(SECTORS), &new))
                .expect("submit");
        }
        front.kick().expect("kick");
        for c in wait_all(&mut front, RANGES as usize) {
            assert_eq!(c.status, Status::Ok, "round {round}");
        }
        std::thread::sleep(Duration::from_millis(20));
        for r in 0..RANGES {
            let got = complete_one(
                &mut front,
                &BlockRequest::read(r * u64::from(SECTORS), SECTORS, true),
            );
            assert_eq!(got.status, Status::Ok);
            assert!(
                got.data.as_deref() == Some(&new[..]),
                "round {round}, range {r}: an older write landed after the newer one"
            );
        }
    }
    let s = setup.stats();
    assert!(s.crashes >= 20, "{s:#?}");
    front.detach().expect("detach");
}

/// Two guests on two disks of one supervisor: faults injected on one disk
/// never disturb the other (its backend keeps its pid, its counters stay
/// zero, its workload stays clean).
#[test]
fn faults_on_one_disk_do_not_disturb_another() {
    let dir = TempDir::new("two");
    let names = [
        format!("a-{}", std::process::id()),
        format!("b-{}", std::process::id()),
    ];
    let disks = default_disks(&dir, &names, IMAGE_MIB);
    // The neighbour is never faulted: a long hang timeout keeps a busy CI
    // machine's scheduling delays from being taken for a hang there.
    let mut disks = disks;
    disks[1].hang_timeout_ms = 2_000;
    let harness = Harness::start_with(dir, disks, backend_command());
    let sup = harness.sup();
    let attach = |name: &str| {
        let mut cfg = BlkFrontConfig::new(name);
        cfg.max_request_bytes = 64 * 1024;
        BlkFront::attach(harness.socket(), &cfg).expect("attach")
    };
    let stats = |name: &str| harness.stats(name);
    let mut a = attach(&names[0]);
    let mut b = attach(&names[1]);
    let b_pid = stats(&names[1]).pid;
    let stop = AtomicBool::new(false);
    let (ra, rb) = std::thread::scope(|s| {
        let killer = s.spawn(|| {
            let _stop_guard = StopOnDrop(&stop);
            for i in 0..20 {
                std::thread::sleep(Duration::from_millis(60));
                let before = stats(&names[0]).recoveries;
                let fault = if i % 4 == 3 { Fault::Hang } else { Fault::Kill };
                sup.fault(&names[0], fault).expect("fault");
                harness.wait_for(&names[0], "a recovery", |s| s.recoveries > before);
            }
            stop.store(true, Ordering::Release);
        });
        let guest_b = s.spawn(|| run_until(&mut b, 52, 16, &stop));
        let ra = run_until(&mut a, 51, 16, &stop);
        killer.join().expect("killer");
        (ra, guest_b.join().expect("guest b"))
    });
    assert_verified(&ra, "faulted disk");
    assert_verified(&rb, "neighbour disk");
    let (sa, sb) = (stats(&names[0]), stats(&names[1]));
    assert!(sa.recoveries >= 20, "{sa:#?}");
    assert_eq!((sb.crashes, sb.hangs, sb.recoveries), (0, 0, 0), "{sb:#?}");
    assert_eq!(sb.pid, b_pid, "the neighbour's backend was never replaced");
    a.detach().expect("detach a");
    b.detach().expect("detach b");
}

/// Guests attach, work, detach and re-attach to the same disk while its
/// backend is being killed: every attachment sees only verified data and
/// the data written by earlier attachments.
#[test]
fn attach_detach_reattach_while_faults_are_injected() {
    let setup = start("reattach", |_| {}, &[]);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        // Stops the killer even when an assertion below fails.
        let _stop_guard = StopOnDrop(&stop);
        let killer = s.spawn(|| {
            let mut n = 0u32;
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(35));
                // The device may be between guests; a kill then replaces an
                // idle backend.
                if setup.sup().fault(setup.name(), Fault::Kill).is_ok() {
                    n += 1;
                }
            }
            n
        });
        let mut w = workload(61, Duration::from_millis(400));
        for round in 0..6 {
            let mut front = attach(&setup);
            let r = w
                .run(&mut front, &mut |_| {})
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_verified(&r, &format!("attachment {round}"));
            front
                .detach()
                .unwrap_or_else(|e| panic!("round {round}: detach: {e}"));
        }
        stop.store(true, Ordering::Release);
        let kills = killer.join().expect("killer");
        assert!(kills >= 10, "only {kills} kills");
    });
    let s = setup.stats();
    assert!(!s.given_up, "{s:#?}");
}
