//! `shadowback bench upgrade`: the guest-visible stall of a live upgrade
//! (docs/ARCHITECTURE.md §4.2), against the gaps of the same workload
//! with no upgrade and, with `--restarts`, against a supervisor restart
//! (SIGKILL, start again, the VMM reconnects) — both measured in the same
//! run.
//!
//! A real `shadowback up` serves one disk; a guest process keeps a
//! verifying QD32 mix running on it (Xen ring or vhost-user) and records
//! the time of every completion. The operator side sends `upgrade` N
//! times (to this same binary). For each upgrade the stall is the largest
//! gap between consecutive completions around it, from the last
//! completion before the request to the first one after the answer; the
//! baseline is the same measure over a window of the same length halfway
//! between two upgrades.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use shadowback_xenbus::protocol::{key, kind};
use shadowback_xenbus::{Message, SeqPacket};

use crate::failover::{Dist, Transport};
use crate::faults;
use crate::out::outln;
use crate::CliError;

#[derive(Args, Debug)]
pub struct UpgradeBenchArgs {
    /// Number of upgrades.
    #[arg(long, default_value_t = 20)]
    count: u32,
    /// Time between upgrades, in ms.
    #[arg(long, default_value_t = 300)]
    interval_ms: u64,
    /// Supervisor restarts measured after the upgrades (SIGKILL, start
    /// again; the vhost-user guest reconnects, a Xen guest cannot).
    #[arg(long, default_value_t = 0)]
    restarts: u32,
    #[arg(long, value_enum, default_value_t = Transport::VhostUser)]
    transport: Transport,
    /// Requests the guest keeps in flight.
    #[arg(long, default_value_t = 32)]
    qd: usize,
    /// Where to put the image, sockets and logs (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// One JSON object on stdout and nothing else.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct UpgradeReport {
    transport: Transport,
    qd: usize,
    upgrades: usize,
    /// The largest completion gap around each upgrade.
    stall_us: Dist,
    /// `upgrade` sent → `upgraded` received.
    upgrade_us: Dist,
    /// The largest completion gap in windows of the same length with no
    /// upgrade.
    baseline_us: Dist,
    restarts: usize,
    /// The largest completion gap around each supervisor restart.
    restart_stall_us: Dist,
    lost: u64,
    duplicates: u64,
    verify_failures: u64,
    io_errors: u64,
    ops: u64,
}

/// The clock of the guest's completion stamps.
use crate::guest_cmd::monotonic_ns as now_ns;

/// The largest gap (µs) between consecutive completions from the last one
/// at or before `start` to the first one at or after `end`; `None` if the
/// workload did not run on both sides. `stamps` is sorted.
fn window_gap_us(stamps: &[u64], start: u64, end: u64) -> Option<u64> {
    let first = stamps.partition_point(|&s| s <= start).checked_sub(1)?;
    let last = stamps.partition_point(|&s| s < end);
    let span = stamps.get(first..=last)?;
    span.windows(2).map(|w| (w[1] - w[0]) / 1000).max()
}

/// A `shadowback up` on `config`, logging to `log`.
fn spawn_up(config: &Path, log: &Path) -> Result<Child, CliError> {
    Ok(Command::new(std::env::current_exe()?)
        .arg("up")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()?)
}

/// Waits until the supervisor answers `status` with a backend running.
fn wait_serving(socket: &Path) -> Result<(), CliError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(devices) = crate::control_cmd::query_status(socket) {
            if devices
                .iter()
                .all(|d| d.get(key::PID).is_some_and(|p| p != "0"))
            {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err("the supervisor did not come up".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn upgrade(socket: &Path) -> Result<(), CliError> {
    let sock = SeqPacket::connect(socket)?;
    sock.send(&Message::new(kind::UPGRADE), &[])?;
    let (reply, _) = sock
        .recv_timeout(Duration::from_secs(60))?
        .ok_or("no answer to upgrade")?;
    if reply.kind() != kind::UPGRADED {
        return Err(format!("upgrade refused: {reply}").into());
    }
    Ok(())
}

pub fn run(args: UpgradeBenchArgs) -> Result<ExitCode, CliError> {
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("shadowback-upgrade-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(&args, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(args: &UpgradeBenchArgs, dir: &Path) -> Result<ExitCode, CliError> {
    if args.restarts > 0 && args.transport == Transport::Xen {
        return Err(
            "--restarts needs --transport vhost-user (a Xen guest cannot reconnect)".into(),
        );
    }
    let image = dir.join("disk.img");
    std::fs::File::create(&image)?.set_len(256 << 20)?;
    let control = dir.join("control.sock");
    let vhost = dir.join("disk.vhost.sock");
    let config = dir.join("shadowback.toml");
    std::fs::write(
        &config,
        format!(
            "socket = {control:?}\n[[disk]]\nname = \"disk0\"\npath = {image:?}\n\
             standby = true\nvhost_user = {vhost:?}\nqueue_size = 256\n"
        ),
    )?;
    let mut up = spawn_up(&config, &dir.join("up-0.log"))?;
    let result = measure(args, dir, &config, &control, &vhost, &mut up);
    let _ = up.kill();
    let _ = up.wait();
    result
}

fn measure(
    args: &UpgradeBenchArgs,
    dir: &Path,
    config: &Path,
    control: &Path,
    vhost: &Path,
    up: &mut Child,
) -> Result<ExitCode, CliError> {
    wait_serving(control)?;
    let stamps_path = dir.join("completions.bin");
    let stop = dir.join("stop");
    let mut guest = Command::new(std::env::current_exe()?);
    // Segments of a second, each ending with a check of the stop file.
    guest.args(["guest", "blk", "--duration", "1", "--max-kib", "64"]);
    match args.transport {
        Transport::Xen => guest.arg("--socket").arg(control),
        Transport::VhostUser => guest
            .args(["--transport", "vhost-user", "--reconnect", "--socket"])
            .arg(vhost),
    };
    let mut guest = guest
        .args(["--qd", &args.qd.to_string()])
        .arg("--completions-file")
        .arg(&stamps_path)
        .arg("--stop-file")
        .arg(&stop)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    let reader = crate::failover::read_guest(&mut guest)?;
    std::thread::sleep(Duration::from_millis(500));
    let interval = Duration::from_millis(args.interval_ms.max(10));
    let mut upgrades = Vec::new();
    for _ in 0..args.count {
        std::thread::sleep(interval);
        let start = now_ns();
        upgrade(control)?;
        upgrades.push((start, now_ns()));
    }
    std::thread::sleep(interval);
    let mut restarts = Vec::new();
    for n in 0..args.restarts {
        let start = now_ns();
        up.kill()?;
        up.wait()?;
        *up = spawn_up(config, &dir.join(format!("up-{}.log", n + 1)))?;
        wait_serving(control)?;
        restarts.push((start, now_ns()));
        // The guest reconnects within QEMU's period-like back-off.
        std::thread::sleep(Duration::from_secs(2));
    }
    std::fs::write(&stop, b"")?;
    let status = guest.wait()?;
    let (report, error) = reader.join().map_err(|_| "reader thread panicked")?;
    let report = report.ok_or_else(|| {
        format!(
            "the guest gave no report ({status}): {}",
            error.unwrap_or_default()
        )
    })?;
    let mut stamps = faults::read_stamps(&stamps_path)?;
    stamps.sort_unstable();
    let gaps = |windows: &[(u64, u64)]| -> Vec<u64> {
        windows
            .iter()
            .filter_map(|&(s, e)| window_gap_us(&stamps, s, e))
            .collect()
    };
    let half = u64::try_from(interval.as_nanos() / 2).unwrap_or(u64::MAX);
    let baseline: Vec<(u64, u64)> = upgrades
        .iter()
        .map(|&(s, e)| (s.saturating_sub(half), e.saturating_sub(half)))
        .collect();
    let stalls = gaps(&upgrades);
    let out = UpgradeReport {
        transport: args.transport,
        qd: args.qd,
        upgrades: stalls.len(),
        stall_us: Dist::of(&stalls),
        upgrade_us: Dist::of(
            &upgrades
                .iter()
                .map(|(s, e)| (e - s) / 1000)
                .collect::<Vec<_>>(),
        ),
        baseline_us: Dist::of(&gaps(&baseline)),
        restarts: restarts.len(),
        restart_stall_us: Dist::of(&gaps(&restarts)),
        lost: report.lost,
        duplicates: report.duplicates,
        verify_failures: report.verify_failures,
        io_errors: report.io_errors,
        ops: report.ops,
    };
    crate::failover::conclude(&out, &report, args.json, print)
}

fn print(r: &UpgradeReport) {
    let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
    outln!(
        "live upgrade under a QD{} {:?} guest: {} upgrades, {} ops",
        r.qd,
        r.transport,
        r.upgrades,
        r.ops
    );
    outln!("                       p50 µs     p99 µs     max µs");
    for (what, d) in [
        ("stall (upgrade)", r.stall_us),
        ("gap (no upgrade)", r.baseline_us),
        ("upgrade request", r.upgrade_us),
    ] {
        outln!("  {what:<18} {:>9} {:>10} {:>10}", d.p50, d.p99, d.max);
    }
    if r.restarts > 0 {
        let d = r.restart_stall_us;
        outln!(
            "  {:<18} {:>9} {:>10} {:>10}   ({} restarts)",
            "stall (restart)",
            d.p50,
            d.p99,
            d.max,
            r.restarts
        );
        outln!(
            "  restart / upgrade stall, p50: {:.0}x",
            ratio(d.p50, r.stall_us.p50)
        );
    }
    outln!(
        "  upgrade stall / no-upgrade gap, p99: {:.2}x",
        ratio(r.stall_us.p99, r.baseline_us.p99)
    );
    outln!(
        "  lost {}  duplicates {}  verify failures {}  I/O errors {}",
        r.lost,
        r.duplicates,
        r.verify_failures,
        r.io_errors
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gap_spans_the_completions_around_the_window() {
        let stamps = [1_000, 2_000, 10_000, 11_000, 50_000, 51_000];
        // From 2_000 (last ≤ 5_000) to 50_000 (first ≥ 20_000): 39 µs.
        assert_eq!(window_gap_us(&stamps, 5_000, 20_000), Some(39));
        assert_eq!(window_gap_us(&stamps, 2_500, 3_000), Some(8));
        assert_eq!(window_gap_us(&stamps, 500, 3_000), None, "nothing before");
        assert_eq!(
            window_gap_us(&stamps, 50_500, 60_000),
            None,
            "nothing after"
        );
    }
}
