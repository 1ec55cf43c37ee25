//! The command-line entry points as a user runs them: `shadowback demo` and
//! `shadowback up CONFIG.toml`, as real processes.
#![deny(unsafe_code)]

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use shadowback_guest::blkfront::{BlkFront, BlkFrontConfig};
use shadowback_testsupport::blockio::{run_clean, verified_io, verify_workload};
use shadowback_testsupport::harness::{cache_for, unique_name};
use shadowback_testsupport::process::{alive, backend_pid_under, shadowback_bin, ChildGuard};
use shadowback_testsupport::temp::{make_image, TempDir};
use shadowback_testsupport::wait_for;

/// Runs `shadowback demo --json` with `args` in `dir`; returns its report
/// and the work directory it used (which must be gone afterwards).
fn run_demo(dir: &TempDir, args: &[&str]) -> (serde_json::Value, std::path::PathBuf) {
    let mut child = ChildGuard::spawn(
        Command::new(shadowback_bin())
            .args(["demo", "--json", "--dir"])
            .arg(dir.path())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let work_dir = dir.path().join(format!("shadowback-demo-{}", child.pid()));
    // The report is small: reading to EOF cannot block the child on a full
    // pipe, and stderr is drained on a thread.
    let mut stderr = child.child().stderr.take().expect("stderr");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut stdout = String::new();
    child
        .child()
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("read stdout");
    let status = child.wait(Duration::from_secs(90), "shadowback demo");
    let stderr = err_reader.join().expect("stderr reader");
    assert!(
        status.success(),
        "demo failed ({status}); stderr:\n{stderr}\nstdout:\n{stdout}"
    );
    let json_line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| {
            panic!("no JSON object on stdout:\n{stdout}\nstderr:\n{stderr}");
        });
    let v = serde_json::from_str(json_line).expect("demo prints valid JSON");
    (v, work_dir)
}

/// `key` of `v` as an integer, or a failure naming it.
fn int(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing or not an integer in {v}"))
}

/// The network pair's report: every byte of the stream verified, no
/// reset, no response a guest did not ask for.
fn assert_clean_net(v: &serde_json::Value, mib: u64) -> &serde_json::Value {
    let net = &v["net"];
    assert_eq!(net["verified"], true, "net stream: {v}");
    assert_eq!(int(net, "bytes"), mib << 20, "net stream: {v}");
    assert_eq!(int(net, "resets"), 0, "net stream: {v}");
    assert_eq!(int(net, "bad_responses"), 0, "net stream: {v}");
    net
}

#[test]
fn demo_reports_a_clean_verified_run() {
    let dir = TempDir::new("demo");
    let (v, work_dir) = run_demo(
        &dir,
        &["--duration", "2", "--image-mib", "64", "--net-mib", "8"],
    );
    let u = |k: &str| int(&v, k);
    assert!(u("ops") > 0, "ops: {v}");
    assert!(u("bytes") > 0, "bytes: {v}");
    assert_eq!(u("verify_failures"), 0, "verify failures: {v}");
    assert_eq!(u("io_errors"), 0, "I/O errors: {v}");
    let p50 = v["lat_us"]["p50"]
        .as_f64()
        .unwrap_or_else(|| panic!("lat_us.p50 missing in {v}"));
    assert!(p50 > 0.0, "lat_us.p50: {v}");
    assert_eq!(
        u("sectors_verified_final"),
        64 * 1024 * 1024 / 512,
        "final check: {v}"
    );
    assert_eq!(u("image_bytes"), 64 * 1024 * 1024, "image size: {v}");
    let net = assert_clean_net(&v, 8);
    assert_eq!(int(net, "faults"), 0, "no faults asked: {v}");
    assert!(
        !work_dir.exists(),
        "the demo left {} behind",
        work_dir.display()
    );
}

/// The network pair next to the disk takes the same kills: both vifs'
/// backends are killed and recovered while the stream runs, and its
/// report and timeline say so.
#[test]
fn demo_kills_the_network_pair_like_the_disk() {
    let dir = TempDir::new("demo-net-faults");
    let plot = dir.path().join("timeline.svg");
    let (v, _) = run_demo(
        &dir,
        &[
            "--duration",
            "3",
            "--image-mib",
            "32",
            "--net-mib",
            "8",
            "--faults",
            "kill:every=150ms",
            "--plot",
            plot.to_str().expect("a UTF-8 temp path"),
        ],
    );
    assert_eq!(int(&v, "verify_failures"), 0, "{v}");
    let net = assert_clean_net(&v, 8);
    let faults = int(net, "faults");
    // A kill that lands while the previous one is being recovered finds
    // no process to kill: crashes may be fewer than the faults sent. On a
    // loaded machine the hang watchdog may also catch a slow instance
    // (a recovery too), and the last kill of each vif may still be being
    // recovered when the stream ends and status is read.
    let crashes = int(net, "crashes");
    let failures = crashes + int(net, "hangs");
    let recoveries = int(net, "recoveries");
    assert!(crashes >= 2 && crashes <= faults, "{v}");
    assert!(
        recoveries <= failures && recoveries + 2 >= failures,
        "{recoveries} recoveries for {failures} failures: {v}"
    );
    assert!(int(net, "rx_buffers_recovered") > 0, "{v}");
    assert!(int(&net["stall_us"], "max") > 0, "{v}");
    let net_plot = dir.path().join("timeline-net.svg");
    assert_eq!(net["plot"].as_str(), net_plot.to_str(), "{v}");
    let svg = std::fs::read_to_string(&net_plot).expect("the network timeline");
    assert!(
        svg.contains("<svg") && svg.contains("stroke=\"red\""),
        "{svg}"
    );
}

/// Waits until `path` exists while `child` runs.
fn wait_for_socket(child: &mut ChildGuard, path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        if let Some(status) = child.child().try_wait().expect("try_wait") {
            panic!("shadowback up exited early: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn up_serves_guests_until_sigterm() {
    let dir = TempDir::new("up");
    let image = dir.path().join("disk0.img");
    make_image(&image, 16 << 20);
    let socket = dir.path().join("control.sock");
    let name = unique_name("up-disk");
    let cache = match cache_for(&image) {
        shadowback_supervisor::CacheMode::None => "none",
        shadowback_supervisor::CacheMode::Writeback => "writeback",
    };
    let config = dir.path().join("shadowback.toml");
    std::fs::write(
        &config,
        format!(
            "socket = {socket:?}\n\n[[disk]]\nname = {name:?}\npath = {image:?}\ncache = {cache:?}\nbackend_id = 2\nstandby = false\n",
        ),
    )
    .expect("write config");
    let log = std::fs::File::create(dir.path().join("up.log")).expect("log file");
    let mut up = ChildGuard::spawn(
        Command::new(shadowback_bin())
            .arg("up")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log),
    );
    wait_for_socket(&mut up, &socket);

    let mut first = BlkFront::attach(&socket, &BlkFrontConfig::new(&name)).expect("attach");
    assert_eq!(first.backend().backend_id, 2);
    let backend = backend_pid_under(&name, up.pid());
    let mut work = verify_workload(21, 0, 4096);
    run_clean(&mut work, &mut first, "guest of `shadowback up`");
    first.detach().expect("detach");

    // A second guest sees the first one's data, and stays attached across
    // the SIGTERM.
    let mut second = BlkFront::attach(&socket, &BlkFrontConfig::new(&name)).expect("second attach");
    work.verify_all(&mut second, &mut |_| {})
        .expect("second guest re-verifies the disk");
    verified_io(&mut second, 8192, 4).expect("verified I/O");

    kill(Pid::from_raw(up.pid() as i32), Signal::SIGTERM).expect("SIGTERM");
    let status = up.wait(Duration::from_secs(20), "shadowback up");
    let log = std::fs::read_to_string(dir.path().join("up.log")).unwrap_or_default();
    assert_eq!(
        status.code(),
        Some(0),
        "`shadowback up` after SIGTERM: {status}; log:\n{log}"
    );
    assert!(!socket.exists(), "`shadowback up` left its socket behind");
    wait_for(
        Duration::from_secs(10),
        &format!("backend {backend} to die with the supervisor"),
        || !alive(backend),
    );
    assert!(
        second.detach().is_err(),
        "the device must be gone once the supervisor exited"
    );
}
