//! The standby pool (docs/ARCHITECTURE.md §7.5) with real `shadowback
//! blkback` spares, real guests and real signals: a spare takes over any
//! disk of its class, two disks failing at once share a pool of one (one
//! gets the spare, the other a cold start, both keep their data), and
//! the pool refills after a takeover and replaces a spare that died.
#![deny(unsafe_code)]

use shadowback_guest::blkfront::{BlkFront, BlkFrontConfig};
use shadowback_supervisor::{DeviceStats, Fault};
use shadowback_testsupport::blockio::Bystander;
use shadowback_testsupport::harness::{backend_command, default_disks, Harness};
use shadowback_testsupport::temp::TempDir;

const IMAGE_MIB: u64 = 16;

/// A supervisor with `n` disks of the default configuration (a block pool
/// of one spare), each with a verifying guest running.
fn disks(tag: &str, n: usize) -> (Harness, Vec<String>, Vec<Bystander<BlkFront>>) {
    let dir = TempDir::new(tag);
    let names: Vec<String> = (0..n)
        .map(|i| format!("{tag}{i}-{}", std::process::id()))
        .collect();
    let cfgs = default_disks(&dir, &names, IMAGE_MIB);
    let harness = Harness::start_with(dir, cfgs, backend_command());
    let guests = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let front = BlkFront::attach(harness.socket(), &BlkFrontConfig::new(name))
                .expect("the guest attaches");
            Bystander::start(front, 1000 * i as u64)
        })
        .collect();
    (harness, names, guests)
}

fn spare_ready(s: &DeviceStats) -> bool {
    s.pool_size == 1 && s.pool_spares == 1 && s.standby_pid.is_some()
}

/// `Seccomp_filters:` of `/proc/PID/status`: how many filters are stacked.
fn seccomp_filters(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp_filters:"))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no Seccomp_filters in {status}"))
}

/// Waits until spare `pid` has confined itself: a spare is in the pool
/// from its fork on, and installs its filter once its engine is set up,
/// before it reads its first control message (so before any `adopt`).
fn wait_confined(pid: u32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while seccomp_filters(pid) == "0" {
        assert!(
            std::time::Instant::now() < deadline,
            "spare {pid} never confined itself"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid"));
    nix::sys::signal::kill(pid, sig).expect("signal the spare");
}

/// Two disks fail at once with one spare between them: one takes the
/// spare, the other starts a backend cold, and both guests' verified I/O
/// goes on. The spare is held stopped until the cold takeover is done, so
/// the order is fixed: without the stop, a fast takeover could refill the
/// pool before the other disk looked, and both would go warm.
#[test]
fn two_disks_failing_at_once_share_a_pool_of_one() {
    let (harness, names, guests) = disks("pair", 2);
    let spare = harness
        .wait_for(&names[0], "a spare", spare_ready)
        .standby_pid
        .expect("spare");
    // Both disks would take the same spare: the pool is one.
    assert_eq!(harness.stats(&names[1]).standby_pid, Some(spare));
    let pids: Vec<_> = names.iter().map(|n| harness.stats(n).pid).collect();
    signal(spare, nix::sys::signal::Signal::SIGSTOP);
    for name in &names {
        harness.sup().fault(name, Fault::Kill).expect("kill");
    }
    // The disk that did not get the (stopped) spare recovers cold.
    let cold = harness.wait_for_any(&names, "a cold takeover", |s| s.cold_takeovers == 1);
    assert_eq!(harness.stats(&names[1 - cold]).recoveries, 0);
    signal(spare, nix::sys::signal::Signal::SIGCONT);
    let warm = 1 - cold;
    let s = harness.wait_for(&names[warm], "the warm takeover", |s| s.recoveries == 1);
    assert_eq!((s.standby_takeovers, s.cold_takeovers), (1, 0), "{s:#?}");
    assert_eq!(s.pid, Some(spare), "the spare serves the disk now");
    // The spare's `adopt` is part of the takeover, and the takeover and
    // the replay both lie inside the stall, however they overlapped.
    let t = s.last_recovery.expect("the warm takeover's times");
    assert!(t.total_us >= t.takeover_us + t.replay_us, "{t:?}");
    let c = harness.stats(&names[cold]);
    assert_eq!((c.standby_takeovers, c.cold_takeovers), (0, 1), "{c:#?}");
    assert!(c.pid.is_some() && c.pid != Some(spare) && c.pid != pids[cold]);
    for (guest, name) in guests.iter().zip(&names) {
        guest.progressing(name);
    }
    for (guest, name) in guests.into_iter().zip(&names) {
        // Still attached (the front detaches when dropped).
        let (_front, _rounds) = guest.finish(name);
        let s = harness.stats(name);
        assert_eq!((s.crashes, s.failed_takeovers), (1, 0), "{name}: {s:#?}");
        assert!(s.connected && !s.given_up, "{name}: {s:#?}");
    }
    // The warm takeover asked for a new spare.
    harness.wait_for(&names[0], "the pool refilled", |s| {
        spare_ready(s) && s.standby_pid != Some(spare)
    });
}

/// After a takeover the pool starts a new spare, which the next takeover
/// uses; a spare that dies is replaced without any takeover.
#[test]
fn the_pool_refills_after_a_takeover_and_replaces_a_dead_spare() {
    let (harness, names, mut guests) = disks("refill", 1);
    let name = &names[0];
    let mut used = Vec::new();
    for round in 1..=2 {
        let spare = harness
            .wait_for(name, "a spare", |s| {
                spare_ready(s) && !used.contains(&s.standby_pid)
            })
            .standby_pid;
        used.push(spare);
        let pid = spare.expect("spare");
        // A spare waits under its own filter (docs/ARCHITECTURE.md §1.1)…
        wait_confined(pid);
        assert_eq!(seccomp_filters(pid), "1", "spare {pid}");
        harness.sup().fault(name, Fault::Kill).expect("kill");
        let s = harness.wait_for(name, "the takeover", |s| s.recoveries == round);
        assert_eq!(s.standby_takeovers, round, "round {round}: {s:#?}");
        assert_eq!(s.pid, spare, "round {round}: the spare serves the disk");
        // …and serves under a backend's on top of it.
        assert_eq!(seccomp_filters(pid), "2", "adopted spare {pid}");
        guests[0].progressing(name);
    }
    let spare = harness
        .wait_for(name, "a third spare", |s| {
            spare_ready(s) && !used.contains(&s.standby_pid)
        })
        .standby_pid
        .expect("spare");
    signal(spare, nix::sys::signal::Signal::SIGKILL);
    let s = harness.wait_for(name, "the dead spare replaced", |s| {
        spare_ready(s) && s.standby_pid != Some(spare)
    });
    assert_eq!(s.recoveries, 2, "{s:#?}");
    guests.pop().expect("guest").finish(name);
}
