//! `shadowback bench blk --devices N,…`: the scale curve (issue 12,
//! item 6). For each N, one supervisor exports N disks (the defaults: a
//! shadow log each, the block standby pool of one spare); first, idle, the
//! backends' memory is summed from /proc; then N guest processes (the
//! project's blkfront, one per disk) run the same 4 KiB random workload at
//! once, and the run reports their aggregate IOPS, the worst and the
//! median of their p99 latencies, and the CPU of the supervisor and of
//! the backends, per device.
//!
//! All N disks export one preallocated, fully written image (as the other
//! rows of `bench blk` export one image several times): the devices are
//! what scales, not the storage.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use shadowback_supervisor::{BackendCommand, Config, DiskConfig, SupervisorThread};

use crate::bench::{prepare_image, BlkBenchArgs, ChildGuard, Op, ProcCpu};
use crate::out::{errln, outln};
use crate::scratch::TempDir;
use crate::CliError;

/// Most devices one step may ask for.
pub const MAX_DEVICES: usize = 256;

/// One line of the curve (and of the JSON output).
#[derive(Serialize)]
struct ScaleRow {
    devices: usize,
    op: &'static str,
    qd: usize,
    /// Sum over the guests of their IOPS.
    iops: f64,
    iops_per_device: f64,
    /// The worst and the median of the guests' p99 latencies.
    p99_worst_us: f64,
    p99_median_us: f64,
    /// CPU of the supervisor (this process) and of every backend process,
    /// in % of one core over the run, and the backends' per device.
    supervisor_cpu_pct: f64,
    backends_cpu_pct: f64,
    backends_cpu_pct_per_device: f64,
    /// Backend processes (serving instances and spares) and their memory
    /// per device: idle (before any guest), and at the end of the run.
    backend_processes: usize,
    idle_rss_kib_per_device: u64,
    idle_pss_kib_per_device: u64,
    loaded_rss_kib_per_device: u64,
    supervisor_rss_kib: u64,
}

#[derive(Serialize)]
struct JsonReport<'a> {
    rows: &'a [ScaleRow],
}

/// What /proc says of the backend processes (children of this process
/// running `blkback`) at one instant.
struct Backends {
    /// `(pid, CPU time)`.
    cpu: Vec<(u32, Duration)>,
    rss_kib: u64,
    pss_kib: u64,
}

impl Backends {
    fn now() -> Self {
        let me = std::process::id();
        let mut b = Backends {
            cpu: Vec::new(),
            rss_kib: 0,
            pss_kib: 0,
        };
        for pid in proc_pids() {
            let Some(p) = ProcCpu::of(pid).filter(|p| p.ppid == me) else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if !cmdline.split(|&b| b == 0).any(|a| a == b"blkback") {
                continue;
            }
            b.cpu.push((pid, p.own));
            b.rss_kib += status_kib(pid, "/status", "VmRSS:").unwrap_or(0);
            b.pss_kib += status_kib(pid, "/smaps_rollup", "Pss:").unwrap_or(0);
        }
        b
    }

    /// CPU the backends used since `self` (processes started since count
    /// from zero).
    fn cpu_since(&self, now: &Backends) -> Duration {
        now.cpu
            .iter()
            .map(|&(pid, cpu)| {
                let before = self.cpu.iter().find(|&&(p, _)| p == pid);
                cpu.saturating_sub(before.map_or(Duration::ZERO, |&(_, c)| c))
            })
            .sum()
    }
}

fn proc_pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
}

/// A `Key:   1234 kB` line of `/proc/PID/<file>`, in KiB.
fn status_kib(pid: u32, file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}{file}")).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line.get(key.len()..)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Runs the curve for each of `devices`.
pub fn run(args: &BlkBenchArgs, devices: &[usize]) -> Result<(), CliError> {
    if devices.iter().any(|&n| n == 0 || n > MAX_DEVICES) {
        return Err(format!("--devices: each count must be within 1..={MAX_DEVICES}").into());
    }
    let image_bytes = args
        .image_mib
        .checked_mul(1024 * 1024)
        .ok_or("--image-mib too large")?;
    let dir = TempDir::new(args.dir.as_deref(), "bench-scale")?;
    let image = dir.0.join("disk.img");
    prepare_image(&image, image_bytes, args.cache)?;
    let duration = Duration::from_secs_f64(args.duration);
    let mut rows = Vec::new();
    for &n in devices {
        rows.extend(one_step(args, &dir.0, &image, n, duration)?);
    }
    if args.json {
        outln!("{}", serde_json::to_string(&JsonReport { rows: &rows })?);
    } else {
        print_curve(&rows, args);
    }
    Ok(())
}

/// One supervisor with `n` disks: the idle figures, then every op and QD.
fn one_step(
    args: &BlkBenchArgs,
    dir: &Path,
    image: &Path,
    n: usize,
    duration: Duration,
) -> Result<Vec<ScaleRow>, CliError> {
    let names: Vec<String> = (0..n).map(|i| format!("disk{i}")).collect();
    let cfg = Config {
        socket: dir.join(format!("control-{n}.sock")),
        control: Default::default(),
        backend: Default::default(),
        standby: Default::default(),
        limits: Default::default(),
        metrics: Default::default(),
        disks: names
            .iter()
            .map(|name| DiskConfig {
                cache: args.cache.mode(),
                discard: false,
                poll_us: args.poll_us,
                ..DiskConfig::new(name, image)
            })
            .collect(),
        nics: Vec::new(),
    };
    let supervisor = SupervisorThread::start(cfg.clone(), BackendCommand::current_exe()?)?;
    // Idle: every disk has its backend and the pool its spares (started
    // processes settle their memory within a few ms of exec).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = supervisor.status();
        let ready = status.iter().all(|(_, s)| s.pid.is_some())
            && status.iter().all(|(_, s)| s.pool_spares == s.pool_size);
        let expected = n + status.first().map_or(0, |(_, s)| s.pool_size);
        if ready && Backends::now().cpu.len() == expected {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("{n} disks: the backends did not all start in 30 s").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let idle = Backends::now();
    if !args.json {
        errln!(
            "  {n} disks idle: {} backend processes, {} KiB RSS ({} KiB PSS) in all",
            idle.cpu.len(),
            idle.rss_kib,
            idle.pss_kib
        );
    }
    let per = |kib: u64| kib / n as u64;
    let mut rows = Vec::new();
    for op in Op::ALL {
        for &qd in &args.qd {
            let before = Backends::now();
            let sup_before = ProcCpu::of(std::process::id()).map_or(Duration::ZERO, |p| p.own);
            let started = Instant::now();
            let results = run_guests(&cfg.socket, &names, op, qd, duration)?;
            let wall = started.elapsed().as_secs_f64();
            let after = Backends::now();
            let sup_cpu = ProcCpu::of(std::process::id())
                .map_or(Duration::ZERO, |p| p.own)
                .saturating_sub(sup_before);
            let backends_cpu = before.cpu_since(&after);
            let iops: f64 = results.iter().map(|r| r.iops).sum();
            let mut p99: Vec<f64> = results.iter().map(|r| r.p99_us).collect();
            p99.sort_by(f64::total_cmp);
            let pct = |d: Duration| d.as_secs_f64() * 100.0 / wall;
            let row = ScaleRow {
                devices: n,
                op: op.name(),
                qd,
                iops,
                iops_per_device: iops / n as f64,
                p99_worst_us: p99.last().copied().unwrap_or(0.0),
                p99_median_us: p99.get(p99.len() / 2).copied().unwrap_or(0.0),
                supervisor_cpu_pct: pct(sup_cpu),
                backends_cpu_pct: pct(backends_cpu),
                backends_cpu_pct_per_device: pct(backends_cpu) / n as f64,
                backend_processes: idle.cpu.len(),
                idle_rss_kib_per_device: per(idle.rss_kib),
                idle_pss_kib_per_device: per(idle.pss_kib),
                loaded_rss_kib_per_device: per(after.rss_kib),
                supervisor_rss_kib: status_kib(std::process::id(), "/status", "VmRSS:")
                    .unwrap_or(0),
            };
            if !args.json {
                errln!(
                    "  {n} disks {} QD{qd}: {:.0} IOPS, p99 worst {:.0} µs",
                    op.name(),
                    row.iops,
                    row.p99_worst_us
                );
            }
            rows.push(row);
        }
    }
    supervisor.stop()?;
    Ok(rows)
}

/// What one guest measured.
struct GuestResult {
    iops: f64,
    p99_us: f64,
}

/// One `guest blk --bench` process per disk, all at once; their results.
fn run_guests(
    socket: &Path,
    names: &[String],
    op: Op,
    qd: usize,
    duration: Duration,
) -> Result<Vec<GuestResult>, CliError> {
    let exe = std::env::current_exe()?;
    let mut guests = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let child = Command::new(&exe)
            .args(["guest", "blk", "--device", name, "--socket"])
            .arg(socket)
            .args(["--bench", op.name()])
            .args(["--qd", &qd.to_string()])
            .args(["--duration", &duration.as_secs_f64().to_string()])
            .args(["--seed", &(i + 1).to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start guest {i}: {e}"))?;
        guests.push(ChildGuard(Some(child)));
    }
    let mut results = Vec::with_capacity(guests.len());
    for (mut guest, name) in guests.into_iter().zip(names) {
        let stdout = guest
            .0
            .as_mut()
            .and_then(|c| c.stdout.take())
            .ok_or("guest stdout missing")?;
        let mut bench = None;
        for line in BufReader::new(stdout).lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line?) else {
                continue;
            };
            match v["event"].as_str() {
                Some("bench") => bench = Some(v),
                Some("error") => return Err(format!("guest of {name}: {}", v["message"]).into()),
                _ => {}
            }
        }
        let status = guest.wait()?;
        let v = bench.ok_or_else(|| format!("guest of {name} ({status}): no bench line"))?;
        if v["io_errors"].as_u64() != Some(0) {
            return Err(format!("guest of {name}: I/O errors: {v}").into());
        }
        let f = |k: &str| {
            v[k].as_f64()
                .ok_or_else(|| format!("guest line lacks {k}: {v}"))
        };
        let elapsed = f("elapsed_s")?;
        let ops = v["ops"].as_u64().ok_or("guest line lacks ops")? as f64;
        results.push(GuestResult {
            iops: if elapsed > 0.0 { ops / elapsed } else { 0.0 },
            p99_us: f("p99_us")?,
        });
    }
    Ok(results)
}

fn print_curve(rows: &[ScaleRow], args: &BlkBenchArgs) {
    outln!(
        "shadowback bench blk --devices — N disks on one supervisor, one guest (blkfront) per disk, all running at once; 4 KiB random I/O, {:.1} s per row, one {} MiB image",
        args.duration,
        args.image_mib
    );
    outln!();
    outln!(
        "{:>4} {:<9} {:>3} {:>9} {:>9} {:>9} {:>9} {:>7} {:>8} {:>8} {:>5} {:>9} {:>9} {:>9}",
        "N",
        "op",
        "qd",
        "IOPS",
        "IOPS/dev",
        "p99 max",
        "p99 med",
        "sup CPU",
        "be CPU",
        "be/dev",
        "procs",
        "idle RSS",
        "idle PSS",
        "load RSS"
    );
    for r in rows {
        outln!(
            "{:>4} {:<9} {:>3} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>6.1}% {:>7.1}% {:>7.2}% {:>5} {:>9} {:>9} {:>9}",
            r.devices,
            r.op,
            r.qd,
            r.iops,
            r.iops_per_device,
            r.p99_worst_us,
            r.p99_median_us,
            r.supervisor_cpu_pct,
            r.backends_cpu_pct,
            r.backends_cpu_pct_per_device,
            r.backend_processes,
            r.idle_rss_kib_per_device,
            r.idle_pss_kib_per_device,
            r.loaded_rss_kib_per_device,
        );
    }
    outln!();
    outln!("notes:");
    outln!("  - IOPS = the sum of the guests' IOPS; p99 max / med = the worst and the median of the guests' p99 (µs).");
    outln!("  - sup CPU = this process (the supervisor thread; the bench thread only waits), be CPU = every backend process,");
    outln!("    in % of one core over the row; be/dev = be CPU / N. /proc/PID/stat, 10 ms ticks.");
    outln!("  - procs = backend processes (one per disk and the spares of the block pool); idle RSS / PSS / load RSS =");
    outln!("    their VmRSS / Pss (smaps_rollup; shared pages split among sharers) summed and divided by N, in KiB,");
    outln!("    before any guest attached and after the row.");
}
