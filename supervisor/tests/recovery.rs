//! Supervisor-side recovery (docs/ARCHITECTURE.md §7) against a fake backend: crash and
//! hang detection, fencing, hot-standby and cold takeovers, poison replay,
//! giving up, and the `status`/`fault` control messages.
//!
//! The fake backend is this test binary itself, re-executed with the
//! `fake_backend_entry` filter (`shadowback_testsupport::fake_backend`,
//! scripted by [`script`]): it speaks the supervisor ↔
//! backend protocol (`attach` with the shadow log, `poison`, `detach`),
//! beats the log's heartbeat every 5 ms, never serves the ring, and records
//! what it was told in an event file the tests read. The real block backend
//! is exercised by the workspace's `tests/supervisor_recovery.rs`.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use shadowback_shadow::ShadowLog;
use shadowback_supervisor::{CacheMode, DeviceStats, DiskConfig, Fault};
use shadowback_testsupport::fake_backend::{lines_of, EventLog, FakeBackend, FakeSupervisor};
use shadowback_testsupport::raw_guest::RawGuest;
use shadowback_testsupport::temp::TempDir;
use shadowback_xenbus::{key, Message, SeqPacket};

const BACKEND_ID: u16 = 0;

// ---------------------------------------------------------------------------
// The fake backend.

/// Entry point of the fake backend: a no-op in a normal test run; when the
/// supervisor execs this binary as a backend (it then passes
/// `--control-fd`), it becomes one and never returns.
#[test]
fn fake_backend_entry() {
    if let Some(fake) = FakeBackend::from_args() {
        let no_shadow = fake.has_flag("--no-shadow");
        fake.record(&format!("start no-shadow={}", u8::from(no_shadow)));
        fake.serve(script);
    }
}

/// The last other instance that reported `attached`, if any.
fn previous_server(events: &EventLog, me: u32) -> Option<u32> {
    events
        .lines()
        .iter()
        .rev()
        .filter_map(|l| l.strip_suffix(" attached"))
        .filter_map(|pid| pid.parse().ok())
        .find(|&pid| pid != me)
}

/// What the fake answers: `attach` (opening the shadow log unless
/// `--no-shadow`), `poison` and `detach`.
fn script(fake: &mut FakeBackend, msg: Message, mut fds: Vec<OwnedFd>) -> Message {
    let die_on_recover = fake.has_flag("die-on-recover");
    let die_on_attach = std::env::var_os("FAKE_DIE_ON_ATTACH").is_some();
    let no_shadow = fake.has_flag("--no-shadow");
    let me = std::process::id();
    match msg.kind() {
        "attach" => {
            let recover = msg.get(key::RECOVER) == Some("1");
            let prev_alive = previous_server(&fake.events(), me)
                .map(|pid| Path::new(&format!("/proc/{pid}")).exists());
            fake.record(&format!(
                "attach recover={} fds={} prev-alive={prev_alive:?} blame={}",
                u8::from(recover),
                fds.len(),
                msg.get(key::BLAME).unwrap_or("-")
            ));
            if (recover && die_on_recover) || die_on_attach {
                std::process::exit(70);
            }
            let mut generation = 0;
            if fds.len() == 4 && !no_shadow {
                let l = ShadowLog::open(fds.pop().unwrap()).expect("log");
                generation = l.begin_instance().expect("begin");
                fake.heartbeat = Some(l);
            }
            fake.record("attached");
            let n = u64::from(recover);
            Message::new("attached")
                .with("generation", generation)
                .with("replayed", 3 * n)
                .with("repushed", 2 * n)
                .with("poisoned", 0)
                .with("corrupt", 0)
                .with("replay-us", 77 * n)
        }
        "poison" => {
            fake.record(&format!("poison {}", msg.get("sector").unwrap()));
            Message::new("ok")
        }
        "detach" => fake.detach(),
        other => FakeBackend::refuse(other),
    }
}

// ---------------------------------------------------------------------------
// Harness.

/// The fake supervisor serving `disks` on 1 MiB images.
fn start(disks: &[DiskConfig], fake_args: &[&str], first_env: &[(&str, &str)]) -> FakeSupervisor {
    let dir = TempDir::new("sup-recovery");
    let disks = disks
        .iter()
        .map(|d| DiskConfig {
            path: dir.create_image(&format!("{}.img", d.name), 1 << 20),
            cache: CacheMode::Writeback,
            ..d.clone()
        })
        .collect();
    FakeSupervisor::start(dir, disks, fake_args, first_env)
}

/// Sends one control request on a fresh socket; returns every answer up
/// to the last (`ok`, `error` or `status-end`).
fn control(setup: &FakeSupervisor, msg: &Message) -> Vec<Message> {
    let sock = SeqPacket::connect(setup.socket()).unwrap();
    sock.send(msg, &[]).unwrap();
    let mut out = Vec::new();
    loop {
        let (m, _) = sock
            .recv_timeout(Duration::from_secs(15))
            .unwrap()
            .expect("an answer");
        let last = m.kind() != "status";
        out.push(m);
        if last {
            return out;
        }
    }
}

fn fault(setup: &FakeSupervisor, device: &str, fault: Fault) {
    let answer = control(setup, &fault.to_message(device));
    assert_eq!(answer[0].kind(), "ok", "{answer:?}");
}

fn disk(name: &str) -> DiskConfig {
    DiskConfig::new(name, "/unused")
}

/// The raw guest, attached without a probe.
fn connect(socket: &Path, device: &str) -> Result<RawGuest, Message> {
    RawGuest::connect(socket, device, BACKEND_ID)
}

// ---------------------------------------------------------------------------
// Tests.

#[test]
fn a_killed_backend_is_replaced_by_the_standby_without_the_guest_noticing() {
    let setup = start(&[disk("d0")], &[], &[]);
    let guest = connect(setup.socket(), "d0").unwrap();
    let before = setup.wait_for("d0", "a standby", |s| s.standby_pid.is_some());
    assert!(before.connected);
    let (old, standby) = (before.pid.unwrap(), before.standby_pid.unwrap());

    fault(&setup, "d0", Fault::Kill);
    let after = setup.wait_for("d0", "a recovery", |s| s.recoveries == 1);
    assert_eq!(after.crashes, 1);
    assert_eq!(after.hangs, 0);
    assert_eq!(after.standby_takeovers, 1);
    assert_eq!(after.pid, Some(standby), "the standby took over");
    assert_eq!((after.replayed, after.repushed), (3, 2));
    let last = after.last_recovery.expect("timings");
    assert_eq!(last.replay_us, 77);
    assert!(last.total_us >= last.takeover_us, "{last:?}");
    assert!(after.connected);
    // A new standby is started after the takeover.
    let later = setup.wait_for("d0", "a new standby", |s| s.standby_pid.is_some());
    assert_ne!(later.standby_pid, Some(standby));
    assert_ne!(later.standby_pid, Some(old));
    guest.assert_undisturbed(Duration::from_millis(200));

    let events = setup.events.lines();
    let new = lines_of(&events, standby);
    assert!(
        new.contains(&"attach recover=1 fds=4 prev-alive=Some(false) blame=0".to_string()),
        "the standby replayed only after the old instance was reaped, and an operator's \
         kill is not blamed on the requests: {events:#?}"
    );
    assert!(!Path::new(&format!("/proc/{old}")).exists());

    // The guest leaves normally: the new instance is detached.
    guest.control.send(&Message::new("close"), &[]).unwrap();
    assert_eq!(guest.next_message().kind(), "closed");
    assert!(lines_of(&setup.events.lines(), standby).contains(&"detach".to_string()));
    assert!(!setup.stats("d0").connected);
}

#[test]
fn a_stopped_backend_with_pending_work_is_declared_hung_and_replaced() {
    // Twice the default timeout: the fake must not look hung on a loaded
    // two-CPU test machine while it still beats.
    let setup = start(
        &[DiskConfig {
            hang_timeout_ms: 200,
            ..disk("d0")
        }],
        &[],
        &[],
    );
    let guest = connect(setup.socket(), "d0").unwrap();
    let before = setup.wait_for("d0", "a standby", |s| s.standby_pid.is_some());
    guest.post(1);
    // Beating (the fake heartbeats every 5 ms): pending work alone is no hang.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(setup.stats("d0").hangs, 0);

    fault(&setup, "d0", Fault::Hang);
    let after = setup.wait_for("d0", "a recovery", |s| s.recoveries == 1);
    assert_eq!((after.hangs, after.crashes), (1, 0));
    assert_eq!(after.pid, before.standby_pid);
    let last = after.last_recovery.unwrap();
    assert!(
        (200_000..2_000_000).contains(&last.detect_us),
        "detect ≈ hang_timeout_ms: {last:?}"
    );
    assert!(!Path::new(&format!("/proc/{}", before.pid.unwrap())).exists());
    guest.assert_undisturbed(Duration::from_millis(100));
}

#[test]
fn an_idle_stopped_backend_is_left_alone_until_work_arrives() {
    let setup = start(&[disk("d0")], &[], &[]);
    let guest = connect(setup.socket(), "d0").unwrap();
    let before = setup.stats("d0");
    fault(&setup, "d0", Fault::Hang);
    std::thread::sleep(Duration::from_millis(500));
    let idle = setup.stats("d0");
    assert_eq!((idle.hangs, idle.recoveries), (0, 0));
    assert_eq!(idle.pid, before.pid);

    guest.post(4);
    let t0 = Instant::now();
    let after = setup.wait_for("d0", "a recovery", |s| s.recoveries == 1);
    assert_eq!(after.hangs, 1);
    // Stalled long ago: declared on the first check that sees the work.
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(after.last_recovery.unwrap().detect_us < 100_000);
    guest.assert_undisturbed(Duration::from_millis(100));
}

#[test]
fn without_a_standby_the_takeover_is_a_cold_restart() {
    let setup = start(
        &[DiskConfig {
            standby: false,
            ..disk("d0")
        }],
        &[],
        &[],
    );
    let guest = connect(setup.socket(), "d0").unwrap();
    let before = setup.stats("d0");
    assert_eq!(before.standby_pid, None);
    fault(&setup, "d0", Fault::Kill);
    let after = setup.wait_for("d0", "a recovery", |s| s.recoveries == 1);
    assert_eq!((after.cold_takeovers, after.standby_takeovers), (1, 0));
    assert_ne!(after.pid, before.pid);
    assert_eq!(after.standby_pid, None);
    guest.assert_undisturbed(Duration::from_millis(100));
}

#[test]
fn poisoned_sectors_are_told_to_every_later_instance_before_its_attach() {
    let setup = start(&[disk("d0")], &[], &[]);
    let guest = connect(setup.socket(), "d0").unwrap();
    let first = setup.stats("d0").pid.unwrap();
    fault(&setup, "d0", Fault::Poison { sector: 77 });
    fault(&setup, "d0", Fault::Poison { sector: 78 });
    fault(&setup, "d0", Fault::Kill);
    let second = setup
        .wait_for("d0", "a recovery", |s| s.recoveries == 1)
        .pid
        .unwrap();
    fault(&setup, "d0", Fault::Kill);
    let third = setup
        .wait_for("d0", "a second recovery", |s| s.recoveries == 2)
        .pid
        .unwrap();
    let events = setup.events.lines();
    assert_eq!(lines_of(&events, first)[3..5], ["poison 77", "poison 78"]);
    for pid in [second, third] {
        // A spare of the pool is told its device first.
        let mut lines = lines_of(&events, pid);
        lines.retain(|l| l != "adopt");
        assert_eq!(
            lines[1..4],
            [
                "poison 77",
                "poison 78",
                "attach recover=1 fds=4 prev-alive=Some(false) blame=0"
            ],
            "{pid}: {events:#?}"
        );
    }
    guest.assert_undisturbed(Duration::from_millis(100));
}

#[test]
fn a_backend_dying_during_the_first_attach_is_recovered_before_connected() {
    // Only the first instance gets the environment: it dies on `attach`.
    let setup = start(&[disk("d0")], &[], &[("FAKE_DIE_ON_ATTACH", "1")]);
    let guest = connect(setup.socket(), "d0").expect("connected after a takeover");
    let s = setup.stats("d0");
    assert_eq!((s.crashes, s.recoveries), (1, 1));
    assert!(s.connected);
    // A death nobody injected counts against the requests in flight.
    let events = setup.events.lines();
    assert!(
        events
            .iter()
            .any(|l| l.contains("attach recover=1 fds=4") && l.ends_with("blame=1")),
        "{events:#?}"
    );
    drop(guest);
}

#[test]
fn the_guest_is_told_only_when_every_takeover_fails() {
    let setup = start(&[disk("d0")], &["die-on-recover"], &[]);
    let guest = connect(setup.socket(), "d0").unwrap();
    fault(&setup, "d0", Fault::Kill);
    let msg = guest.next_message();
    assert_eq!(msg.kind(), "error");
    assert_eq!(msg.get("code"), Some("ENODEV"));
    let s = setup.wait_for("d0", "giving up", |s| s.given_up);
    assert_eq!(
        s.failed_takeovers,
        u64::from(shadowback_supervisor::MAX_FAILED_TAKEOVERS)
    );
    assert_eq!(s.crashes, 1 + s.failed_takeovers);
    assert_eq!(s.recoveries, 0);
    assert_eq!((s.pid, s.standby_pid), (None, None));
    // A later guest, once the hold-off has passed, gets a fresh start: a
    // new instance, attached without recovery.
    let attaches = setup.events.count("recover=0");
    std::thread::sleep(shadowback_supervisor::FRESH_START_AFTER);
    let _later = connect(setup.socket(), "d0").expect("a fresh start");
    let s = setup.stats("d0");
    assert!(!s.given_up && s.connected && s.pid.is_some(), "{s:#?}");
    assert_eq!((s.fresh_starts, s.recoveries), (1, 0));
    assert_eq!(setup.events.count("recover=0"), attaches + 1);
}

#[test]
fn without_the_shadow_layer_a_crash_disconnects_the_guest() {
    let setup = start(
        &[DiskConfig {
            shadow: false,
            ..disk("d0")
        }],
        &[],
        &[],
    );
    let guest = connect(setup.socket(), "d0").unwrap();
    let first = setup.stats("d0").pid.unwrap();
    fault(&setup, "d0", Fault::Kill);
    let msg = guest.next_message();
    assert_eq!(msg.get("code"), Some("ENODEV"), "{msg}");
    let events = setup.events.lines();
    assert!(lines_of(&events, first).contains(&"start no-shadow=1".to_string()));
    assert!(lines_of(&events, first)
        .iter()
        .any(|l| l.starts_with("attach recover=0 fds=3")));
    // The device gets a fresh backend for the next guest.
    let s = setup.wait_for("d0", "a replacement", |s| {
        s.pid.is_some() && s.pid != Some(first)
    });
    assert_eq!((s.crashes, s.recoveries), (1, 0));
    drop(guest);
    let again = setup.wait_for("d0", "the detach", |s| !s.connected);
    assert!(!again.given_up);
    connect(setup.socket(), "d0").expect("a new guest attaches");
}

#[test]
fn an_unattached_backend_that_dies_is_replaced() {
    let setup = start(&[disk("d0")], &[], &[]);
    let before = setup.wait_for("d0", "a standby", |s| s.standby_pid.is_some());
    fault(&setup, "d0", Fault::Kill);
    let after = setup.wait_for("d0", "a replacement", |s| {
        s.pid != before.pid && s.pid.is_some()
    });
    assert_eq!((after.crashes, after.recoveries), (1, 0));
    connect(setup.socket(), "d0").expect("attaches to the replacement");
}

#[test]
fn every_kill_answered_ok_is_one_crash() {
    let setup = start(&[disk("d0")], &[], &[]);
    setup.wait_for("d0", "a backend", |s| s.pid.is_some());
    // Kills back to back: one that arrives before the last one's death has
    // been seen would hit the same dying process, and is refused.
    let (mut ok, mut busy) = (0u64, 0u64);
    for _ in 0..12 {
        let answer = control(&setup, &Fault::Kill.to_message("d0"));
        match (answer[0].kind(), answer[0].get("code")) {
            ("ok", _) => ok += 1,
            ("error", Some("EBUSY")) => busy += 1,
            other => panic!("fault kill answered {other:?}: {answer:?}"),
        }
    }
    eprintln!("{ok} kills, {busy} refused as already dying");
    let s = setup.wait_for("d0", "a backend after the kills", |s| {
        s.crashes >= ok && s.pid.is_some()
    });
    assert_eq!(s.crashes, ok, "{s:?}");
}

#[test]
fn status_lists_every_device_in_order_and_fault_checks_its_arguments() {
    let setup = start(&[disk("b"), disk("a")], &[], &[]);
    let answers = control(&setup, &Message::new("status"));
    assert_eq!(answers.len(), 3, "{answers:?}");
    assert_eq!(answers[2].kind(), "status-end");
    let names: Vec<String> = answers[..2]
        .iter()
        .map(|m| DeviceStats::from_message(m).unwrap().0)
        .collect();
    assert_eq!(names, ["b", "a"]);
    for m in &answers[..2] {
        for k in [
            "crashes",
            "hangs",
            "recoveries",
            "replayed",
            "repushed",
            "poisoned",
            "connected",
            "pid",
            "standby-pid",
            "last-detect-us",
            "last-fence-us",
            "last-takeover-us",
            "last-replay-us",
            "last-total-us",
        ] {
            assert!(m.contains(k), "{k} missing in {m}");
        }
        assert_ne!(m.get("pid"), Some("0"));
    }
    let bad = [
        (
            Message::new("fault")
                .with("device", "zz")
                .with("action", "kill"),
            "ENOENT",
        ),
        (
            Message::new("fault")
                .with("device", "a")
                .with("action", "melt"),
            "EINVAL",
        ),
        (
            Message::new("fault")
                .with("device", "a")
                .with("action", "poison"),
            "EINVAL",
        ),
        (Message::new("fault").with("action", "kill"), "EINVAL"),
    ];
    for (msg, code) in bad {
        let answer = control(&setup, &msg);
        assert_eq!(answer[0].get("code"), Some(code), "{msg}: {answer:?}");
    }
    // The in-process API reaches the same device task.
    setup.sup().fault("a", Fault::Kill).unwrap();
    setup.wait_for("a", "a crash", |s| s.crashes == 1);
    assert!(setup.sup().fault("zz", Fault::Kill).is_err());
}
