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

#[test]
fn demo_reports_a_clean_verified_run() {
    let dir = TempDir::new("demo");
    let mut child = ChildGuard::spawn(
        Command::new(shadowback_bin())
            .args([
                "demo",
                "--duration",
                "2",
                "--json",
                "--image-mib",
                "64",
                "--dir",
            ])
            .arg(dir.path())
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
    let status = child.wait(Duration::from_secs(60), "shadowback demo");
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
    let v: serde_json::Value = serde_json::from_str(json_line).expect("demo prints valid JSON");
    let u = |k: &str| {
        v[k].as_u64()
            .unwrap_or_else(|| panic!("{k} missing or not an integer in {v}"))
    };
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
    assert!(
        !work_dir.exists(),
        "the demo left {} behind",
        work_dir.display()
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
