//! `shadowback bench failover`: the guest-visible stall of a backend crash.
//!
//! A guest process keeps a verifying workload running — a saturating QD32
//! random mix, or (`--pattern rounds`) the Linux test guest's rounds, which
//! let every queue drain between batches — while the backend is SIGKILLed
//! N times at random moments. For every kill
//! the stall is measured as the guest saw it — from its last completion
//! before the kill to its first completion after — alongside the
//! supervisor's own breakdown (detect, fence, takeover, replay). The guest
//! checks every read and, at the end, the whole image: lost, duplicate and
//! corrupt completions are reported, not assumed away.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde::Serialize;
use shadowback_guest::vhost_user::VhostUserBlkOptions;
use shadowback_guest::workload::{Pattern, Report};
use shadowback_supervisor::{
    BackendCommand, Config, DiskConfig, SupervisorThread, MAX_VHOST_QUEUE_SIZE,
};

use crate::faults::{self, FaultKind, Injected};
use crate::out::{errln, errout, outln};
use crate::CliError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A standby backend, already started, takes over.
    Hot,
    /// A new backend process is started after each crash.
    Cold,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// Xen-compatible shared ring.
    Xen,
    /// vhost-user-blk through the supervisor's vhost-user socket (the
    /// native client).
    VhostUser,
}

/// The op mix of the verifying guest under `--pattern random`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Reads, writes, flushes and discards of 4 to 64 KiB.
    Mixed,
    /// 4 KiB random reads and writes, half each.
    Rand4k,
}

impl Workload {
    /// The guest's arguments for it.
    fn guest_args(self) -> &'static [&'static str] {
        match self {
            Workload::Mixed => &["--max-kib", "64"],
            Workload::Rand4k => &[
                "--max-kib",
                "4",
                "--read-percent",
                "50",
                "--flush-percent",
                "0",
                "--discard-percent",
                "0",
            ],
        }
    }
}

/// Which kind of device's backend is killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Class {
    /// A disk under a verifying block workload.
    Blk,
    /// A TCP stream between two vifs on a cable (crate::netfailover).
    Net,
}

#[derive(Args, Debug)]
pub struct FailoverArgs {
    /// Kind of device.
    #[arg(long, value_enum, default_value_t = Class::Blk)]
    pub class: Class,
    /// Number of SIGKILLs (default: 1000 for blk, 50 for net).
    #[arg(long)]
    pub kills: Option<u32>,
    /// `--class net`: length of each TCP stream in MiB (streams follow one
    /// another until every kill is done).
    #[arg(long, default_value_t = 64)]
    pub stream_mib: u64,
    #[arg(long, value_enum, default_value_t = Mode::Hot)]
    mode: Mode,
    #[arg(long, value_enum, default_value_t = Transport::Xen)]
    transport: Transport,
    /// Mean time between kills, in ms (each is drawn from 0.5x to 1.5x).
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
    /// Requests the guest keeps in flight (`--pattern random`).
    #[arg(long, default_value_t = 32)]
    qd: usize,
    /// The guest's verifying op stream: `random` or `rounds[:BATCH]` (see
    /// `shadowback guest blk --help`).
    #[arg(long, default_value = "random")]
    pattern: Pattern,
    /// The op mix under `--pattern random`.
    #[arg(long, value_enum, default_value_t = Workload::Mixed)]
    workload: Workload,
    /// The disk's `fast_takeover`: serve at once, holding back only what
    /// conflicts with the dead instance's I/O (docs/ARCHITECTURE.md §7.3).
    /// Off by default, as in a `[[disk]]`: `--fast-takeover` turns it on.
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true",
          action = clap::ArgAction::Set)]
    fast_takeover: bool,
    /// vhost-user: virtqueues, each with its own round worker under
    /// `--pattern rounds`.
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Image size in MiB.
    #[arg(long, default_value_t = 256)]
    image_mib: u64,
    /// Where to put the temporary image and socket.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// p50 / p99 / max of a sample (µs), as the stall benchmarks print it.
#[derive(Serialize, Default, Clone, Copy)]
pub struct Dist {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

impl Dist {
    pub fn of(values: &[u64]) -> Self {
        let (p50, p99, max) = faults::percentiles(values);
        Dist { p50, p99, max }
    }
}

#[derive(Serialize)]
struct Breakdown {
    detect: Dist,
    fence: Dist,
    takeover: Dist,
    replay: Dist,
    total: Dist,
    /// From the SIGKILL to the dead instance's last I/O being gone, for
    /// fences run in the background while the next instance served (what
    /// its held-back requests waited): one sample per fence seen between
    /// kills.
    background_fence: Dist,
}

#[derive(Serialize)]
struct FailoverReport {
    mode: Mode,
    transport: Transport,
    pattern: String,
    workload: Workload,
    queues: u16,
    qd: usize,
    kills: u32,
    lost: u64,
    duplicates: u64,
    verify_failures: u64,
    stale_reads: u64,
    io_errors: u64,
    stall_us: Dist,
    supervisor_us: Breakdown,
    standby_takeovers: u64,
    cold_takeovers: u64,
    replayed: u64,
    repushed: u64,
    ops: u64,
    rounds: u64,
    sectors_verified_final: u64,
    /// The guest's first failure descriptions.
    failures: Vec<String>,
}

pub fn run(args: FailoverArgs) -> Result<ExitCode, CliError> {
    if args.class == Class::Net {
        return crate::netfailover::run(
            args.kills.unwrap_or(50),
            args.stream_mib,
            args.mode == Mode::Hot,
            args.json,
        );
    }
    let dir = crate::scratch::TempDir::new(args.dir.as_deref(), "failover")?;
    run_in(&args, &dir.0)
}

fn run_in(args: &FailoverArgs, dir: &std::path::Path) -> Result<ExitCode, CliError> {
    let kills = args.kills.unwrap_or(1000);
    if args.queues != 1 && args.transport != Transport::VhostUser {
        return Err("--queues is for --transport vhost-user".into());
    }
    // A vhost-user request takes three descriptors: size the virtqueue for
    // the queue depth, or the client would cap the depth silently.
    let vu_queue_size = args
        .qd
        .max(1)
        .saturating_mul(3)
        .next_power_of_two()
        .max(usize::from(VhostUserBlkOptions::default().queue_size));
    let vu_queue_size = match u16::try_from(vu_queue_size) {
        Ok(size) if size <= MAX_VHOST_QUEUE_SIZE => size,
        _ if args.transport == Transport::VhostUser => {
            return Err(format!(
                "--qd {}: a virtqueue holds at most {} requests",
                args.qd,
                MAX_VHOST_QUEUE_SIZE / 3
            )
            .into())
        }
        _ => MAX_VHOST_QUEUE_SIZE,
    };
    let image = dir.join("disk0.img");
    std::fs::File::create(&image)?.set_len(args.image_mib.max(16) << 20)?;
    let cache = shadowback_supervisor::CacheMode::best_for(&image);
    let vhost_socket = dir.join("disk0.vhost.sock");
    let cfg = Config {
        socket: dir.join("control.sock"),
        control: Default::default(),
        backend: Default::default(),
        standby: Default::default(),
        limits: Default::default(),
        metrics: Default::default(),
        disks: vec![DiskConfig {
            cache,
            standby: args.mode == Mode::Hot,
            vhost_user: (args.transport == Transport::VhostUser).then(|| vhost_socket.clone()),
            queue_size: vu_queue_size,
            num_queues: args.queues,
            fast_takeover: args.fast_takeover,
            ..DiskConfig::new("disk0", image)
        }],
        nics: Vec::new(),
    };
    let sup = SupervisorThread::start(cfg.clone(), BackendCommand::current_exe()?)?;
    let stamps_path = dir.join("completions.bin");
    let stop_path = dir.join("stop");
    let mut guest = Command::new(std::env::current_exe()?);
    match args.transport {
        Transport::Xen => guest
            .args(["guest", "blk", "--device", "disk0", "--socket"])
            .arg(&cfg.socket),
        Transport::VhostUser => guest
            .args(["guest", "blk", "--transport", "vhost-user", "--socket"])
            .arg(&vhost_socket)
            .args(["--queue-size", &vu_queue_size.to_string()])
            .args(["--queues", &args.queues.to_string()]),
    };
    let mut guest = guest
        .arg("--completions-file")
        .arg(&stamps_path)
        .arg("--stop-file")
        .arg(&stop_path)
        .args([
            "--duration",
            "0.5",
            "--qd",
            &args.qd.to_string(),
            "--pattern",
            &args.pattern.to_string(),
        ])
        .args(args.workload.guest_args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    let reader = read_guest(&mut guest)?;

    let stats = |sup: &SupervisorThread| {
        sup.status()
            .into_iter()
            .next()
            .map(|(_, s)| s)
            .unwrap_or_default()
    };
    // Let the workload reach its queue depth first.
    std::thread::sleep(Duration::from_millis(300));
    let mut injected: Vec<Injected> = Vec::new();
    let (mut detect, mut fence, mut takeover, mut replay, mut total) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut background = Vec::new();
    let mut last_background = None;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let started = Instant::now();
    for i in 0..kills {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let mean = args.interval_ms.max(1) * 1000;
        std::thread::sleep(Duration::from_micros(mean / 2 + rng % mean.max(1)));
        let now = stats(&sup);
        if now.background_fence_us != last_background {
            last_background = now.background_fence_us;
            background.extend(now.background_fence_us);
        }
        let before = now.recoveries;
        let at_ns = faults::inject(&cfg.socket, "disk0", FaultKind::Kill)?;
        injected.push(Injected {
            kind: FaultKind::Kill,
            at_ns,
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let s = loop {
            let s = stats(&sup);
            if s.recoveries > before {
                break s;
            }
            if s.given_up || Instant::now() > deadline {
                return Err(format!("kill {i}: no recovery: {s:?}").into());
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        if let Some(t) = s.last_recovery {
            detect.push(t.detect_us);
            fence.push(t.fence_us);
            takeover.push(t.takeover_us);
            replay.push(t.replay_us);
            total.push(t.total_us);
        }
        if !args.json && (i + 1) % 50 == 0 {
            errout!(
                "\r  {} kills in {:.1} s   ",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    if !args.json {
        errln!();
    }
    std::fs::write(&stop_path, b"")?;
    let status = guest.wait()?;
    let (report, error) = reader.join().map_err(|_| "reader thread panicked")?;
    let final_stats = stats(&sup);
    sup.stop()?;
    let Some(report) = report else {
        return Err(format!("the guest failed ({status}): {}", error.unwrap_or_default()).into());
    };
    let mut stamps = faults::read_stamps(&stamps_path)?;
    stamps.sort_unstable();
    let stalls = faults::stalls_us(&injected, &stamps);
    let out = FailoverReport {
        mode: args.mode,
        transport: args.transport,
        pattern: args.pattern.to_string(),
        workload: args.workload,
        queues: args.queues,
        qd: args.qd,
        kills,
        lost: report.lost,
        duplicates: report.duplicates,
        verify_failures: report.verify_failures,
        stale_reads: report.stale_reads,
        io_errors: report.io_errors,
        stall_us: Dist::of(&stalls),
        supervisor_us: Breakdown {
            detect: Dist::of(&detect),
            fence: Dist::of(&fence),
            takeover: Dist::of(&takeover),
            replay: Dist::of(&replay),
            total: Dist::of(&total),
            background_fence: Dist::of(&background),
        },
        standby_takeovers: final_stats.standby_takeovers,
        cold_takeovers: final_stats.cold_takeovers,
        replayed: final_stats.replayed,
        repushed: final_stats.repushed,
        ops: report.ops,
        rounds: report.rounds,
        sectors_verified_final: report.sectors_verified_final,
        failures: report.failures.clone(),
    };
    let measured = stalls.len();
    conclude(&out, &report, args.json, |r| print(r, measured))
}

/// What a guest process printed: its `report`, and the message of its
/// `error` line if it failed.
pub type GuestOutcome = (Option<Report>, Option<String>);

/// Reads a guest process's JSON lines on a thread.
pub fn read_guest(
    guest: &mut std::process::Child,
) -> Result<std::thread::JoinHandle<GuestOutcome>, CliError> {
    let stdout = guest.stdout.take().ok_or("guest stdout missing")?;
    Ok(std::thread::spawn(move || {
        let mut report: Option<Report> = None;
        let mut error = None;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            match v["event"].as_str() {
                Some("report") => report = serde_json::from_value(v["report"].clone()).ok(),
                Some("error") => error = v["message"].as_str().map(str::to_string),
                _ => {}
            }
        }
        (report, error)
    }))
}

/// Prints a stall benchmark's report `out` (one JSON object with `json`,
/// else by `print`); fails the command if the guest's `report` saw a lost,
/// duplicate, wrong or failed completion.
pub fn conclude<T: Serialize>(
    out: &T,
    report: &Report,
    json: bool,
    print: impl FnOnce(&T),
) -> Result<ExitCode, CliError> {
    if json {
        outln!("{}", serde_json::to_string(out)?);
    } else {
        print(out);
    }
    let clean = report.lost == 0
        && report.duplicates == 0
        && report.verify_failures == 0
        && report.io_errors == 0;
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print(r: &FailoverReport, measured: usize) {
    let mode = match r.mode {
        Mode::Hot => "hot standby",
        Mode::Cold => "cold restart",
    };
    let transport = match r.transport {
        Transport::Xen => "Xen ring",
        Transport::VhostUser => "vhost-user",
    };
    let workload = if r.pattern == "random" {
        let mix = match r.workload {
            Workload::Mixed => "mixed 4-64 KiB read/write/flush/discard",
            Workload::Rand4k => "4 KiB random read/write",
        };
        format!("QD{} verifying workload ({mix})", r.qd)
    } else {
        format!(
            "verifying workload in rounds ({}: batches per queue, each drained before the next)",
            r.pattern
        )
    };
    let queues = if r.queues > 1 {
        format!(", {} queues", r.queues)
    } else {
        String::new()
    };
    outln!(
        "shadowback bench failover — {} SIGKILLs, {mode}, {transport}{queues}, {workload}",
        r.kills
    );
    outln!(
        "  guest-visible stall   p50 {} us, p99 {} us, max {} us   ({measured} kills measured)",
        r.stall_us.p50,
        r.stall_us.p99,
        r.stall_us.max
    );
    let row = |name: &str, d: &Dist| {
        outln!(
            "  {name:<21} p50 {} us, p99 {} us, max {} us",
            d.p50,
            d.p99,
            d.max
        );
    };
    outln!("  supervisor breakdown:");
    row("  detect", &r.supervisor_us.detect);
    row("  fence", &r.supervisor_us.fence);
    row("  takeover", &r.supervisor_us.takeover);
    row("  replay", &r.supervisor_us.replay);
    row("  total", &r.supervisor_us.total);
    row("  fence (background)", &r.supervisor_us.background_fence);
    outln!(
        "  takeovers             {} from a standby, {} cold; {} requests replayed, {} responses re-pushed",
        r.standby_takeovers, r.cold_takeovers, r.replayed, r.repushed
    );
    outln!(
        "  guest                 {} ops; lost {}, duplicates {}, verify failures {} ({} stale reads), I/O errors {}; {} sectors verified at the end",
        r.ops, r.lost, r.duplicates, r.verify_failures, r.stale_reads, r.io_errors, r.sectors_verified_final
    );
    if r.pattern != "random" {
        outln!(
            "  rounds                {} completed (summed over the queues)",
            r.rounds
        );
    }
    for f in &r.failures {
        outln!("  FAILURE: {f}");
    }
    outln!("  (stall = last completion before a kill → first completion after it, CLOCK_MONOTONIC in both processes;");
    outln!("   with requests in flight the stall includes the replayed requests' own I/O time)");
}
