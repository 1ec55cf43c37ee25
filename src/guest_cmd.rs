//! `shadowback guest blk`: a guest process. It attaches a Xen blkfront
//! through the supervisor's control socket (`--transport xen`, the default)
//! or connects a vhost-user-blk client to a vhost-user socket
//! (`--transport vhost-user`), runs a verifying (or benchmark) workload and
//! reports on stdout as JSON lines:
//!
//! - `{"event":"progress", "elapsed_s", "ops", "ops_per_s", "io_errors", "verify_failures", "phase"}`
//! - `{"event":"report", "report": {…}}` (verify) or `{"event":"bench", …}`
//! - `{"event":"error", "message"}`

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use shadowback_guest::blkfront::{BlkFront, BlkFrontConfig};
use shadowback_guest::device::{BlockDevice, BlockRequest, Completion, DeviceError};
use shadowback_guest::vhost_user::blk::MAX_REQUEST_BYTES;
use shadowback_guest::vhost_user::{VhostUserBlk, VhostUserBlkOptions};
use shadowback_guest::workload::{
    BenchConfig, BenchOp, BenchWorkload, Pattern, Progress, Report, VerifyConfig, VerifyWorkload,
};

use crate::CliError;

#[derive(Subcommand)]
pub enum GuestCommand {
    /// Block frontend + workload.
    Blk(GuestBlkArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BenchMode {
    Randread,
    Randwrite,
}

/// How the guest reaches its disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum GuestTransport {
    /// Xen blkfront through the supervisor's control socket.
    #[default]
    Xen,
    /// virtio-blk over a vhost-user socket.
    VhostUser,
}

#[derive(Args, Debug, Clone)]
pub struct GuestBlkArgs {
    /// Supervisor control socket (xen) or vhost-user socket (vhost-user).
    #[arg(long)]
    pub socket: PathBuf,
    /// Transport to the backend.
    #[arg(long, value_enum, default_value_t = GuestTransport::Xen)]
    pub transport: GuestTransport,
    /// vhost-user: virtqueues (the backend must offer that many).
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// vhost-user: descriptors per virtqueue (64..1024, a power of two);
    /// each holds a third as many requests.
    #[arg(long, default_value_t = 256)]
    pub queue_size: u16,
    /// vhost-user: when the socket hangs up, reconnect to the same path and
    /// replay the set-up instead of failing.
    #[arg(long)]
    pub reconnect: bool,
    /// Device name (xen).
    #[arg(long, default_value = "disk0")]
    pub device: String,
    /// Seconds of workload.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Requests in flight (`--pattern random`).
    #[arg(long, default_value_t = 32)]
    pub qd: usize,
    /// The verifying op stream: `random` (a mix of random ops, `--qd` in
    /// flight all the time) or `rounds[:BATCH]` (the Linux test guest's
    /// pattern: a worker per queue rewrites and re-reads its share of the
    /// disk in batches of BATCH 4 KiB requests, default 16, waiting for
    /// each batch, so every queue drains between batches).
    #[arg(long, default_value = "random")]
    pub pattern: Pattern,
    /// Workload seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Skip the final full-image check.
    #[arg(long)]
    pub no_final_check: bool,
    /// Instead of verifying: a 4 KiB random read or write benchmark.
    #[arg(long, value_enum)]
    pub bench: Option<BenchMode>,
    /// Ring page order (xen; default: the backend's maximum, up to 4).
    #[arg(long)]
    pub ring_page_order: Option<u32>,
    /// Write the CLOCK_MONOTONIC time (ns, u64 little-endian) of every
    /// completion to this file, for stall measurements.
    #[arg(long)]
    pub completions_file: Option<PathBuf>,
    /// Percent of reads / flushes / discards in the verifying mix.
    #[arg(long, default_value_t = 50)]
    pub read_percent: u8,
    #[arg(long, default_value_t = 2)]
    pub flush_percent: u8,
    #[arg(long, default_value_t = 5)]
    pub discard_percent: u8,
    /// Largest request in KiB (4 KiB multiples).
    #[arg(long, default_value_t = 128)]
    pub max_kib: u32,
    /// Keep going (in `--duration` segments) until this file exists, then
    /// do the final check: for runs whose length another process decides.
    #[arg(long)]
    pub stop_file: Option<PathBuf>,
}

/// Adds the counters of one segment of a run to the total.
fn merge(total: &mut Report, r: &Report) {
    total.ops += r.ops;
    total.reads += r.reads;
    total.writes += r.writes;
    total.flushes += r.flushes;
    total.discards += r.discards;
    total.bytes += r.bytes;
    total.reads_verified += r.reads_verified;
    total.sectors_verified_final += r.sectors_verified_final;
    total.verify_failures += r.verify_failures;
    total.io_errors += r.io_errors;
    total.lost += r.lost;
    total.duplicates += r.duplicates;
    total.stale_reads += r.stale_reads;
    total.rounds += r.rounds;
    total.elapsed_s += r.elapsed_s;
    // Percentiles do not add up: keep the worst segment's.
    if r.lat_us.p99_us > total.lat_us.p99_us {
        total.lat_us = r.lat_us;
    }
    total.failures.extend(r.failures.iter().cloned());
}

/// CLOCK_MONOTONIC in ns: comparable across processes, unlike `Instant`.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// A `BlockDevice` that records when every completion arrived.
struct Timed<'a> {
    dev: &'a mut dyn BlockDevice,
    stamps: Option<Vec<u64>>,
}

impl BlockDevice for Timed<'_> {
    fn capacity_sectors(&self) -> u64 {
        self.dev.capacity_sectors()
    }
    fn max_in_flight(&self) -> usize {
        self.dev.max_in_flight()
    }
    fn max_request_sectors(&self) -> u32 {
        self.dev.max_request_sectors()
    }
    fn supports_discard(&self) -> bool {
        self.dev.supports_discard()
    }
    fn supports_flush(&self) -> bool {
        self.dev.supports_flush()
    }
    fn submit(&mut self, tag: u64, req: &BlockRequest<'_>) -> Result<(), DeviceError> {
        self.dev.submit(tag, req)
    }
    fn queues(&self) -> usize {
        self.dev.queues()
    }
    fn submit_to(
        &mut self,
        queue: usize,
        tag: u64,
        req: &BlockRequest<'_>,
    ) -> Result<(), DeviceError> {
        self.dev.submit_to(queue, tag, req)
    }
    fn kick(&mut self) -> Result<(), DeviceError> {
        self.dev.kick()
    }
    fn poll_completions(
        &mut self,
        timeout: Duration,
        out: &mut Vec<Completion>,
    ) -> Result<(), DeviceError> {
        let before = out.len();
        self.dev.poll_completions(timeout, out)?;
        if let Some(stamps) = self.stamps.as_mut() {
            if out.len() > before {
                let now = monotonic_ns();
                stamps.extend(std::iter::repeat_n(now, out.len() - before));
            }
        }
        Ok(())
    }
}

fn write_stamps(path: &std::path::Path, stamps: &[u64]) -> Result<(), CliError> {
    let mut bytes = Vec::with_capacity(stamps.len() * 8);
    for s in stamps {
        bytes.extend_from_slice(&s.to_le_bytes());
    }
    std::fs::write(path, bytes)?;
    Ok(())
}

#[derive(Serialize)]
struct ProgressLine {
    event: &'static str,
    phase: String,
    elapsed_s: f64,
    ops: u64,
    ops_per_s: f64,
    io_errors: u64,
    verify_failures: u64,
}

fn emit(value: &impl Serialize) {
    let mut out = std::io::stdout().lock();
    if let Ok(line) = serde_json::to_string(value) {
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

fn on_progress(p: &Progress) {
    emit(&ProgressLine {
        event: "progress",
        phase: format!("{:?}", p.phase),
        elapsed_s: p.elapsed.as_secs_f64(),
        ops: p.ops,
        ops_per_s: p.ops_per_s,
        io_errors: p.io_errors,
        verify_failures: p.verify_failures,
    });
}

pub fn run(cmd: GuestCommand) -> Result<ExitCode, CliError> {
    let GuestCommand::Blk(args) = cmd;
    match run_blk(&args) {
        Ok(code) => Ok(code),
        Err(e) => {
            emit(&serde_json::json!({"event": "error", "message": e.to_string()}));
            Err(e)
        }
    }
}

/// The attached device, whatever its transport.
enum Front {
    Xen(BlkFront),
    VhostUser(VhostUserBlk),
}

impl Front {
    fn open(args: &GuestBlkArgs) -> Result<Self, CliError> {
        Ok(match args.transport {
            GuestTransport::Xen => {
                let mut cfg = BlkFrontConfig::new(args.device.clone());
                cfg.queue_depth = args.qd.max(1);
                cfg.ring_page_order = args.ring_page_order;
                Front::Xen(BlkFront::attach(&args.socket, &cfg)?)
            }
            GuestTransport::VhostUser => Front::VhostUser(VhostUserBlk::connect(
                &args.socket,
                VhostUserBlkOptions {
                    queues: args.queues,
                    queue_size: args.queue_size,
                    max_request_bytes: args
                        .max_kib
                        .max(128)
                        .div_ceil(4)
                        .saturating_mul(4096)
                        .min(MAX_REQUEST_BYTES),
                    reconnect: args.reconnect,
                    ..VhostUserBlkOptions::default()
                },
            )?),
        })
    }

    fn dev(&mut self) -> &mut dyn BlockDevice {
        match self {
            Front::Xen(f) => f,
            Front::VhostUser(d) => d,
        }
    }

    /// Detaches (xen) or disconnects (vhost-user, which has no detach).
    fn close(self) -> Result<(), CliError> {
        match self {
            Front::Xen(f) => f.detach()?,
            Front::VhostUser(d) => drop(d),
        }
        Ok(())
    }
}

fn run_blk(args: &GuestBlkArgs) -> Result<ExitCode, CliError> {
    let mut front = Front::open(args)?;
    let mut dev = Timed {
        dev: front.dev(),
        stamps: args
            .completions_file
            .as_ref()
            .map(|_| Vec::with_capacity(1 << 20)),
    };
    let duration = Duration::from_secs_f64(args.duration.max(0.0));
    if let Some(mode) = args.bench {
        let mut bench = BenchWorkload::new(BenchConfig {
            seed: args.seed,
            queue_depth: args.qd.max(1),
            op: match mode {
                BenchMode::Randread => BenchOp::RandomRead,
                BenchMode::Randwrite => BenchOp::RandomWrite,
            },
            duration,
            ..BenchConfig::default()
        });
        let report = bench.run(&mut dev, &mut |_| {})?;
        if let (Some(path), Some(stamps)) = (&args.completions_file, &dev.stamps) {
            write_stamps(path, stamps)?;
        }
        let lat = report.summary();
        emit(&serde_json::json!({
            "event": "bench",
            "ops": report.ops,
            "io_errors": report.io_errors,
            "elapsed_s": report.elapsed.as_secs_f64(),
            "iops": report.iops(),
            "p50_us": lat.p50_us,
            "p99_us": lat.p99_us,
        }));
        front.close()?;
        return Ok(if report.io_errors == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let mut work = VerifyWorkload::new(VerifyConfig {
        seed: args.seed,
        queue_depth: args.qd.max(1),
        duration: Some(duration),
        final_check: !args.no_final_check,
        read_percent: args.read_percent,
        flush_percent: args.flush_percent,
        discard_percent: args.discard_percent,
        max_bytes: args.max_kib.max(4) * 1024,
        pattern: args.pattern,
        ..VerifyConfig::default()
    });
    let report = match &args.stop_file {
        None => work.run(&mut dev, &mut on_progress)?,
        Some(stop) => {
            let mut total = Report::default();
            loop {
                let seg = work.run(&mut dev, &mut on_progress)?;
                let failed = seg.verify_failures > 0;
                merge(&mut total, &seg);
                if failed || stop.exists() {
                    break;
                }
            }
            if !args.no_final_check {
                let last = work.verify_all(&mut dev, &mut on_progress)?;
                merge(&mut total, &last);
            }
            total.iops = if total.elapsed_s > 0.0 {
                total.ops as f64 / total.elapsed_s
            } else {
                0.0
            };
            total.mb_per_s = if total.elapsed_s > 0.0 {
                total.bytes as f64 / total.elapsed_s / 1e6
            } else {
                0.0
            };
            total
        }
    };
    if let (Some(path), Some(stamps)) = (&args.completions_file, &dev.stamps) {
        write_stamps(path, stamps)?;
    }
    let ok = report.verify_failures == 0 && report.io_errors == 0;
    emit(&serde_json::json!({"event": "report", "report": report}));
    front.close()?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
