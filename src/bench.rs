//! `shadowback bench blk`: the Xen-ring path against raw io_uring, in one
//! run, on one image.
//!
//! The image is preallocated and fully written once before anything is
//! measured, so reads hit allocated blocks, never holes. Then, for every
//! op and queue depth, the [`IoPath`]s take turns on the same file, a slice
//! of the row's time each, round after round (see `--rounds`):
//!
//! - `raw-uring`: [`raw_random_io`] in this process, with the file opened
//!   the way the supervisor opens it for the backend, on a plain ring as
//!   the backends' are; `raw-uring-deferred` the same on a ring set up as
//!   fio sets up its own (one issuer, deferred task work), so the two show
//!   what that setup is worth;
//! - `xen-ring`: a guest process → shared ring → blkback process, with the
//!   supervisor running in-process as in `demo`;
//! - `vhost-user` (with `--transport vhost-user`): a guest process with the
//!   native vhost-user-blk client → the supervisor's vhost-user socket →
//!   the same blkback process serving a virtqueue; `vhost-user-noshadow` the
//!   same without the shadow log; `qsd`: qemu-storage-daemon's
//!   vhost-user-blk export of the same file driven by the same client, where
//!   qemu-storage-daemon is installed;
//! - `fio`: fio's io_uring engine on the same file, where fio is installed.
//!
//! fio is the yardstick: every row shows its IOPS as a ratio to the `fio`
//! row of the same op and queue depth, and to the `raw-uring` row beside
//! it, and the CPU time it cost per I/O: the CPU of every process of this
//! process tree (this one with its supervisor thread, the backends, the
//! guest or fio, qemu-storage-daemon) over the slices, divided by the I/Os
//! (see [`TreeCpu`]). `--compare-poll-us` adds rows of exports with
//! another adaptive polling window (`poll_us`).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use shadowback_blkback::rawbench::{raw_random_io, RawJob};
use shadowback_supervisor::{
    BackendCommand, CacheMode, Config, DiskConfig, SupervisorThread, DEFAULT_POLL_US, MAX_POLL_US,
};

use crate::out::{errln, errout, outln};
use crate::scratch::TempDir;
use crate::CliError;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Block I/O: raw io_uring vs. the Xen-ring path (and fio), in one run.
    Blk(BlkBenchArgs),
    /// Guest-visible stall of backend crashes under load (hot or cold).
    Failover(crate::failover::FailoverArgs),
    /// Network: frames and TCP through netfront → netback → cable or TAP
    /// vs. the raw wire, in one run.
    Net(crate::netbench::NetBenchArgs),
    /// Guest-visible stall of a live upgrade (vs. no upgrade and a restart).
    Upgrade(crate::upgradebench::UpgradeBenchArgs),
}

#[derive(Args, Debug)]
pub struct BlkBenchArgs {
    /// Print `{"rows":[…]}` on stdout and nothing else.
    #[arg(long)]
    pub(crate) json: bool,
    /// Seconds per row.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) duration: f64,
    /// Size of the image in MiB (the random offsets span all of it).
    #[arg(long, default_value_t = 1024)]
    pub(crate) image_mib: u64,
    /// Where to put the temporary image and socket (default: the system temp dir).
    #[arg(long)]
    pub(crate) dir: Option<PathBuf>,
    /// How every path opens the image.
    #[arg(long, value_enum, default_value_t = BenchCache::None)]
    pub(crate) cache: BenchCache,
    /// Queue depths, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub(crate) qd: Vec<usize>,
    /// The scale curve instead (crate::scalebench): for each count, that
    /// many disks with one guest each, all at once; aggregate IOPS, p99,
    /// supervisor and backend CPU and memory per device. E.g. `1,4,16,64`.
    #[arg(long, value_delimiter = ',')]
    pub(crate) devices: Vec<usize>,
    /// Slices per row: each row's time is split into this many slices and
    /// the paths of one op and QD take turns slice by slice, so a disturbance
    /// of the machine (another job, a device stall) hits them alike.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Guest transports to measure, comma-separated. `vhost-user` adds the
    /// vhost-user rows (and a qemu-storage-daemon row where it is
    /// installed) next to the Xen-ring rows, which always run.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "xen")]
    transport: Vec<BenchTransport>,
    /// `poll_us` of the exports (adaptive polling window in µs; default:
    /// the supervisor's default).
    #[arg(long, default_value_t = DEFAULT_POLL_US, value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_POLL_US)))]
    pub(crate) poll_us: u32,
    /// Also measure exports with this `poll_us` (rows `xen-ring-poll`,
    /// `vhost-user-poll`), e.g. 50 beside the default 0.
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_POLL_US)))]
    compare_poll_us: Option<u32>,
    /// Also measure an export limited to this many IOPS (`iops_limit`,
    /// default burst; row `xen-ring-qos`), printed beside the limit.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    qos_iops: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BenchTransport {
    /// Xen-compatible shared ring.
    Xen,
    /// vhost-user-blk.
    VhostUser,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum BenchCache {
    /// O_DIRECT, as the backend opens `cache = "none"` disks.
    None,
    /// Through the host page cache.
    Writeback,
}

impl BenchCache {
    pub(crate) fn mode(self) -> CacheMode {
        match self {
            BenchCache::None => CacheMode::None,
            BenchCache::Writeback => CacheMode::Writeback,
        }
    }

    fn direct(self) -> bool {
        self == BenchCache::None
    }
}

/// Request size of every row.
const BLOCK: usize = 4096;
/// Offset seed of the first slice (slice `n` uses `SEED + n`, on every path).
const SEED: u64 = 1;
/// Device name the supervisor exports the image as.
const DEVICE: &str = "disk0";
/// The same image exported without the shadow log.
const DEVICE_NOSHADOW: &str = "disk0-noshadow";
/// The vhost-user exports of the image (with and without the shadow log).
const DEVICE_VU: &str = "disk0-vu";
const DEVICE_VU_NOSHADOW: &str = "disk0-vu-noshadow";
/// The export with an IOPS limit (`--qos-iops`).
const DEVICE_QOS: &str = "disk0-qos";
/// The exports with the other polling window (`--compare-poll-us`).
const DEVICE_POLL: &str = "disk0-poll";
const DEVICE_VU_POLL: &str = "disk0-vu-poll";
/// Largest queue depth accepted (a ring of order 4 holds 512 requests).
const MAX_QD: usize = 512;
/// Virtqueue size of the vhost-user rows: three descriptors per request,
/// so 1024 descriptors hold 341 requests.
const VU_QUEUE_SIZE: u16 = 1024;
/// Largest queue depth of the vhost-user rows (one virtqueue of
/// [`VU_QUEUE_SIZE`]); the client caps a deeper one silently.
const VU_MAX_QD: usize = VU_QUEUE_SIZE as usize / 3;

/// One way of getting 4 KiB random I/O to the image. A later path (say
/// `xen-ring-noshadow`) is one more variant, a name, and an arm in
/// [`Bench::run_slice`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IoPath {
    /// io_uring on the file from this process: what the others are divided by.
    RawUring,
    /// The same on a ring set up as fio sets up its own (one issuer,
    /// deferred task work), which the backends do not use by default.
    RawUringDeferred,
    /// Guest process → ring → blkback process (with the shadow log).
    XenRing,
    /// The same with the shadow log off (`shadow = false`): the cost of
    /// crash recovery is the ratio of the two.
    XenRingNoShadow,
    /// Guest process (native vhost-user-blk client) → vhost-user socket →
    /// blkback process serving a virtqueue, with the shadow log.
    VhostUser,
    /// The same without the shadow log.
    VhostUserNoShadow,
    /// `XenRing` with the other polling window.
    XenRingPoll,
    /// `VhostUser` with the other polling window.
    VhostUserPoll,
    /// `XenRing` on the export limited by `--qos-iops`.
    XenRingQos,
    /// qemu-storage-daemon's vhost-user-blk export, same client.
    Qsd,
    /// fio's io_uring engine: the yardstick (only where fio is installed).
    Fio,
}

impl IoPath {
    /// Run order within one op and queue depth: the baselines first, the
    /// rest right after them, so slow drift of the device hits them alike.
    const ALL: [IoPath; 11] = [
        IoPath::Fio,
        IoPath::RawUring,
        IoPath::RawUringDeferred,
        IoPath::XenRing,
        IoPath::XenRingNoShadow,
        IoPath::XenRingPoll,
        IoPath::XenRingQos,
        IoPath::VhostUser,
        IoPath::VhostUserNoShadow,
        IoPath::VhostUserPoll,
        IoPath::Qsd,
    ];

    fn name(self) -> &'static str {
        match self {
            IoPath::RawUring => "raw-uring",
            IoPath::RawUringDeferred => "raw-uring-deferred",
            IoPath::XenRing => "xen-ring",
            IoPath::XenRingNoShadow => "xen-ring-noshadow",
            IoPath::VhostUser => "vhost-user",
            IoPath::VhostUserNoShadow => "vhost-user-noshadow",
            IoPath::XenRingPoll => "xen-ring-poll",
            IoPath::VhostUserPoll => "vhost-user-poll",
            IoPath::XenRingQos => "xen-ring-qos",
            IoPath::Qsd => "qsd",
            IoPath::Fio => "fio",
        }
    }

    fn is_vhost_user(self) -> bool {
        matches!(
            self,
            IoPath::VhostUser | IoPath::VhostUserNoShadow | IoPath::VhostUserPoll | IoPath::Qsd
        )
    }

    fn is_poll_comparison(self) -> bool {
        matches!(self, IoPath::XenRingPoll | IoPath::VhostUserPoll)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    RandRead,
    RandWrite,
}

impl Op {
    pub(crate) const ALL: [Op; 2] = [Op::RandRead, Op::RandWrite];

    /// Name in the table, the guest's `--bench` value and fio's `--rw`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Op::RandRead => "randread",
            Op::RandWrite => "randwrite",
        }
    }

    fn is_write(self) -> bool {
        self == Op::RandWrite
    }
}

/// What one path measured in one slice.
struct Sample {
    ops: u64,
    elapsed: Duration,
    p50_us: f64,
    p99_us: f64,
    /// CPU time of the whole process tree during the slice.
    cpu: Duration,
}

/// The slices of one row, summed: IOPS over the total time, latency
/// percentiles as the median of the slices' (the slices' samples are not
/// all available as histograms, so they cannot be merged exactly).
#[derive(Default)]
struct Slices(Vec<Sample>);

impl Slices {
    fn iops(&self) -> f64 {
        let ops: u64 = self.0.iter().map(|s| s.ops).sum();
        let secs: f64 = self.0.iter().map(|s| s.elapsed.as_secs_f64()).sum();
        if secs > 0.0 {
            ops as f64 / secs
        } else {
            0.0
        }
    }

    /// CPU time per I/O over all slices, in µs.
    fn cpu_us_per_io(&self) -> f64 {
        let ops: u64 = self.0.iter().map(|s| s.ops).sum();
        let cpu: f64 = self.0.iter().map(|s| s.cpu.as_secs_f64()).sum();
        if ops > 0 {
            cpu * 1e6 / ops as f64
        } else {
            0.0
        }
    }

    fn median(&self, field: impl Fn(&Sample) -> f64) -> f64 {
        let mut v: Vec<f64> = self.0.iter().map(field).collect();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }
}

/// One line of the table and of the JSON output.
#[derive(Serialize)]
struct Row {
    path: &'static str,
    op: &'static str,
    qd: usize,
    iops: f64,
    p50_us: f64,
    p99_us: f64,
    /// CPU time of the whole process tree per I/O, in µs.
    cpu_us_per_io: f64,
    /// IOPS over the `fio` row of the same op and queue depth (absent for
    /// fio itself, or without fio).
    #[serde(skip_serializing_if = "Option::is_none")]
    vs_fio: Option<f64>,
    /// IOPS over the `raw-uring` row of the same op and queue depth.
    #[serde(skip_serializing_if = "Option::is_none")]
    vs_raw: Option<f64>,
    /// The export's `iops_limit` (the `xen-ring-qos` row).
    #[serde(skip_serializing_if = "Option::is_none")]
    limit_iops: Option<u64>,
}

#[derive(Serialize)]
struct JsonReport<'a> {
    rows: &'a [Row],
}

/// A child process killed and reaped if it is dropped before it exits.
pub(crate) struct ChildGuard(pub(crate) Option<Child>);

impl ChildGuard {
    pub(crate) fn wait(mut self) -> Result<std::process::ExitStatus, CliError> {
        match self.0.take() {
            Some(mut child) => Ok(child.wait()?),
            None => Err("child already reaped".into()),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn run(cmd: BenchCommand) -> Result<ExitCode, CliError> {
    match cmd {
        BenchCommand::Blk(args) => run_blk(&args),
        BenchCommand::Failover(args) => crate::failover::run(args),
        BenchCommand::Net(args) => crate::netbench::run(&args),
        BenchCommand::Upgrade(args) => crate::upgradebench::run(args),
    }
}

fn run_blk(args: &BlkBenchArgs) -> Result<ExitCode, CliError> {
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        return Err("--duration must be a positive number of seconds".into());
    }
    if args.qd.is_empty() || args.qd.iter().any(|&qd| qd == 0 || qd > MAX_QD) {
        return Err(format!("--qd: every queue depth must be within 1..={MAX_QD}").into());
    }
    let image_bytes = args
        .image_mib
        .checked_mul(1024 * 1024)
        .filter(|&b| b >= BLOCK as u64)
        .ok_or("--image-mib must be at least 1 and fit in 64 bits")?;
    if args.rounds == 0 {
        return Err("--rounds must be at least 1".into());
    }
    if !args.devices.is_empty() {
        crate::scalebench::run(args, &args.devices)?;
        return Ok(ExitCode::SUCCESS);
    }
    let slice = Duration::from_secs_f64(args.duration / f64::from(args.rounds));
    let fio = find_in_path("fio");
    let vhost_user = args.transport.contains(&BenchTransport::VhostUser);
    if vhost_user && args.qd.iter().any(|&qd| qd > VU_MAX_QD) {
        return Err(format!(
            "--qd: the vhost-user rows run one virtqueue of {VU_QUEUE_SIZE} descriptors, which holds {VU_MAX_QD} requests"
        )
        .into());
    }
    let qsd_bin = find_in_path("qemu-storage-daemon").filter(|_| vhost_user);
    let log = |msg: String| {
        if !args.json {
            errln!("{msg}");
        }
    };

    let load_before = load_average();
    let dir = TempDir::new(args.dir.as_deref(), "bench")?;
    let image = dir.0.join("disk0.img");
    let t0 = Instant::now();
    prepare_image(&image, image_bytes, args.cache)?;
    log(format!(
        "shadowback bench blk: {} MiB image at {}, preallocated and fully written in {:.1} s (reads hit written blocks, not holes); cache {}",
        args.image_mib,
        image.display(),
        t0.elapsed().as_secs_f64(),
        match args.cache {
            BenchCache::None => "none (O_DIRECT on every path)",
            BenchCache::Writeback => "writeback (page cache, left warm after the fill)",
        },
    ));

    let cfg = Config {
        socket: dir.0.join("control.sock"),
        control: Default::default(),
        backend: Default::default(),
        standby: Default::default(),
        limits: Default::default(),
        metrics: Default::default(),
        // Everything else at its default, as a production disk would run.
        // Exports of the one image: with and without the shadow log, and
        // with the other polling window (only one is driven at a time).
        disks: [
            (DEVICE, true, args.poll_us),
            (DEVICE_NOSHADOW, false, args.poll_us),
        ]
        .into_iter()
        .chain(args.compare_poll_us.map(|p| (DEVICE_POLL, true, p)))
        .chain(args.qos_iops.map(|_| (DEVICE_QOS, true, args.poll_us)))
        .map(|(name, shadow, poll_us)| DiskConfig {
            cache: args.cache.mode(),
            max_ring_page_order: 4,
            discard: false,
            shadow,
            poll_us,
            iops_limit: args.qos_iops.filter(|_| name == DEVICE_QOS).unwrap_or(0),
            ..DiskConfig::new(name, image.clone())
        })
        .chain(
            [
                (DEVICE_VU, true, args.poll_us),
                (DEVICE_VU_NOSHADOW, false, args.poll_us),
            ]
            .into_iter()
            .chain(args.compare_poll_us.map(|p| (DEVICE_VU_POLL, true, p)))
            .filter(|_| vhost_user)
            .map(|(name, shadow, poll_us)| DiskConfig {
                cache: args.cache.mode(),
                discard: false,
                shadow,
                poll_us,
                queue_size: VU_QUEUE_SIZE,
                vhost_user: Some(dir.0.join(format!("{name}.sock"))),
                ..DiskConfig::new(name, image.clone())
            }),
        )
        .collect(),
        nics: Vec::new(),
    };
    let supervisor = SupervisorThread::start(cfg.clone(), BackendCommand::current_exe()?)?;
    let qsd = match &qsd_bin {
        Some(bin) => Some(Qsd::start(
            bin,
            &image,
            &dir.0.join("qsd.sock"),
            args.cache,
        )?),
        None => None,
    };
    let bench = Bench {
        image: &image,
        image_bytes,
        cache: args.cache,
        slice,
        socket: &cfg.socket,
        exe: std::env::current_exe()?,
        fio,
        vu_socket: |name: &str| dir.0.join(format!("{name}.sock")),
        qsd_socket: qsd.as_ref().map(|q| q.socket.clone()),
    };
    let paths: Vec<IoPath> = IoPath::ALL
        .into_iter()
        .filter(|&p| p != IoPath::Fio || bench.fio.is_some())
        .filter(|&p| !p.is_vhost_user() || vhost_user)
        .filter(|&p| p != IoPath::Qsd || bench.qsd_socket.is_some())
        .filter(|&p| !p.is_poll_comparison() || args.compare_poll_us.is_some())
        .filter(|&p| p != IoPath::XenRingQos || args.qos_iops.is_some())
        .collect();
    if bench.fio.is_none() {
        log("  fio not found in PATH: no fio rows".into());
    }
    if vhost_user && qsd_bin.is_none() {
        log("  qemu-storage-daemon not found in PATH: no qsd rows".into());
    }
    log(format!(
        "  {} rows of {:.1} s, 4 KiB random I/O over the whole image; per op and QD the paths take turns in {} slices of {:.2} s",
        Op::ALL.len() * args.qd.len() * paths.len(),
        args.duration,
        args.rounds,
        slice.as_secs_f64(),
    ));

    let mut rows: Vec<Row> = Vec::new();
    for op in Op::ALL {
        for &qd in &args.qd {
            let mut slices: Vec<Slices> = paths.iter().map(|_| Slices::default()).collect();
            if !args.json {
                errout!("  {:<9} QD{:<3}", op.name(), qd);
            }
            for round in 0..args.rounds {
                // The same offsets for every path within a slice, new ones
                // for the next slice.
                let seed = SEED + u64::from(round);
                for (&path, acc) in paths.iter().zip(&mut slices) {
                    let cpu = TreeCpu::now();
                    let mut s = bench
                        .run_slice(path, op, qd, seed)
                        .map_err(|e| format!("{} {} QD{qd}: {e}", path.name(), op.name()))?;
                    s.cpu = cpu.since();
                    acc.0.push(s);
                    if !args.json {
                        errout!(" .");
                        let _ = std::io::stderr().flush();
                    }
                }
            }
            let iops_of = |which: IoPath| {
                paths
                    .iter()
                    .zip(&slices)
                    .find(|(&p, _)| p == which)
                    .map(|(_, s)| s.iops())
                    .filter(|&iops| iops > 0.0)
            };
            let (fio_iops, raw_iops) = (iops_of(IoPath::Fio), iops_of(IoPath::RawUring));
            for (&path, s) in paths.iter().zip(&slices) {
                let iops = s.iops();
                let ratio = |base: Option<f64>, base_path: IoPath| {
                    base.filter(|_| path != base_path).map(|b| iops / b)
                };
                if !args.json {
                    errout!("  {} {iops:.0}", path.name());
                }
                rows.push(Row {
                    path: path.name(),
                    op: op.name(),
                    qd,
                    iops,
                    p50_us: s.median(|x| x.p50_us),
                    p99_us: s.median(|x| x.p99_us),
                    cpu_us_per_io: s.cpu_us_per_io(),
                    vs_fio: ratio(fio_iops, IoPath::Fio),
                    vs_raw: ratio(raw_iops, IoPath::RawUring),
                    limit_iops: args.qos_iops.filter(|_| path == IoPath::XenRingQos),
                });
            }
            if !args.json {
                errln!();
            }
        }
    }
    drop(qsd);
    supervisor.stop()?;
    drop(dir);

    if args.json {
        outln!("{}", serde_json::to_string(&JsonReport { rows: &rows })?);
    } else {
        print_table(&rows, args, paths.contains(&IoPath::Fio));
        for r in rows.iter().filter(|r| r.limit_iops.is_some()) {
            let limit = r.limit_iops.unwrap_or(0);
            // The bucket refills while the other paths run: every slice
            // may start with a full burst (a tenth of a second's worth).
            let burst = (limit / 10).max(1);
            let most = limit as f64 + burst as f64 / slice.as_secs_f64();
            outln!(
                "  {} {} QD{}: {:.0} IOPS against a limit of {limit} ({:.3} of it; at most {most:.0} with \
                 a burst of {burst} per {:.2} s slice)",
                r.path,
                r.op,
                r.qd,
                r.iops,
                r.iops / limit as f64,
                slice.as_secs_f64()
            );
        }
        print_load_note(load_before, load_average());
    }
    Ok(ExitCode::SUCCESS)
}

/// qemu-storage-daemon exporting the image as vhost-user-blk, for the
/// `qsd` rows; killed on drop.
struct Qsd {
    child: ChildGuard,
    socket: PathBuf,
}

impl Qsd {
    /// Starts it with the same cache mode as every other path and io_uring
    /// (its fastest AIO engine), then waits for its socket.
    fn start(bin: &Path, image: &Path, socket: &Path, cache: BenchCache) -> Result<Self, CliError> {
        let direct = if cache.direct() { "on" } else { "off" };
        let child = Command::new(bin)
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=disk,filename={},cache.direct={direct},aio=io_uring",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},writable=on",
                socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut qsd = Qsd {
            child: ChildGuard(Some(child)),
            socket: socket.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Some(Ok(Some(status))) = qsd.child.0.as_mut().map(|c| c.try_wait()) {
                return Err(format!("qemu-storage-daemon exited at start-up: {status}").into());
            }
            if Instant::now() > deadline {
                return Err("qemu-storage-daemon did not create its socket within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(qsd)
    }
}

/// What every row shares.
struct Bench<'a, F: Fn(&str) -> PathBuf> {
    image: &'a Path,
    image_bytes: u64,
    cache: BenchCache,
    /// How long each path runs per slice.
    slice: Duration,
    socket: &'a Path,
    exe: PathBuf,
    fio: Option<PathBuf>,
    /// The vhost-user socket of an export.
    vu_socket: F,
    qsd_socket: Option<PathBuf>,
}

impl<F: Fn(&str) -> PathBuf> Bench<'_, F> {
    fn run_slice(&self, path: IoPath, op: Op, qd: usize, seed: u64) -> Result<Sample, CliError> {
        match path {
            IoPath::RawUring => self.raw_uring(op, qd, seed, false),
            IoPath::RawUringDeferred => self.raw_uring(op, qd, seed, true),
            IoPath::XenRing => self.xen_ring(DEVICE, op, qd, seed),
            IoPath::XenRingNoShadow => self.xen_ring(DEVICE_NOSHADOW, op, qd, seed),
            IoPath::XenRingPoll => self.xen_ring(DEVICE_POLL, op, qd, seed),
            IoPath::XenRingQos => self.xen_ring(DEVICE_QOS, op, qd, seed),
            IoPath::VhostUserPoll => {
                self.vhost_user(&(self.vu_socket)(DEVICE_VU_POLL), op, qd, seed)
            }
            IoPath::VhostUser => self.vhost_user(&(self.vu_socket)(DEVICE_VU), op, qd, seed),
            IoPath::VhostUserNoShadow => {
                self.vhost_user(&(self.vu_socket)(DEVICE_VU_NOSHADOW), op, qd, seed)
            }
            IoPath::Qsd => {
                let socket = self.qsd_socket.clone().ok_or("no qemu-storage-daemon")?;
                self.vhost_user(&socket, op, qd, seed)
            }
            IoPath::Fio => self.fio(op, qd),
        }
    }

    /// The file opened as `supervisor::spawn::open_disk` opens it; the
    /// ring plain, as the backends' is, or as fio's (`deferred`).
    fn raw_uring(&self, op: Op, qd: usize, seed: u64, deferred: bool) -> Result<Sample, CliError> {
        let file = open_image(self.image, self.cache)?;
        let stats = raw_random_io(
            &file,
            &RawJob {
                write: op.is_write(),
                qd,
                block: BLOCK,
                span_bytes: self.image_bytes,
                duration: self.slice,
                seed,
                deferred,
            },
        )?;
        Ok(Sample {
            ops: stats.ops,
            elapsed: stats.elapsed,
            p50_us: ns_to_us(stats.latency.percentile(50.0)),
            p99_us: ns_to_us(stats.latency.percentile(99.0)),
            cpu: Duration::ZERO,
        })
    }

    /// One guest process attached to the running supervisor.
    fn xen_ring(&self, device: &str, op: Op, qd: usize, seed: u64) -> Result<Sample, CliError> {
        let mut cmd = Command::new(&self.exe);
        cmd.args(["guest", "blk", "--device", device, "--socket"])
            .arg(self.socket);
        self.guest_bench(cmd, op, qd, seed)
    }

    /// One guest process on a vhost-user socket (the native client).
    fn vhost_user(&self, socket: &Path, op: Op, qd: usize, seed: u64) -> Result<Sample, CliError> {
        let mut cmd = Command::new(&self.exe);
        cmd.args(["guest", "blk", "--transport", "vhost-user", "--socket"])
            .arg(socket)
            .args(["--queue-size", &VU_QUEUE_SIZE.to_string()]);
        self.guest_bench(cmd, op, qd, seed)
    }

    /// Runs a `guest blk --bench` process and reads its result line.
    fn guest_bench(
        &self,
        mut cmd: Command,
        op: Op,
        qd: usize,
        seed: u64,
    ) -> Result<Sample, CliError> {
        let child = cmd
            .args(["--bench", op.name()])
            .args(["--qd", &qd.to_string()])
            .args(["--duration", &self.slice.as_secs_f64().to_string()])
            .args(["--seed", &seed.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the guest: {e}"))?;
        let mut child = ChildGuard(Some(child));
        let stdout = child
            .0
            .as_mut()
            .and_then(|c| c.stdout.take())
            .ok_or("guest stdout missing")?;
        let mut result: Option<serde_json::Value> = None;
        let mut guest_error: Option<String> = None;
        for line in BufReader::new(stdout).lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line?) else {
                continue;
            };
            match v["event"].as_str() {
                Some("bench") => result = Some(v),
                Some("error") => guest_error = v["message"].as_str().map(str::to_string),
                _ => {}
            }
        }
        let status = child.wait()?;
        let Some(v) = result else {
            return Err(format!(
                "the guest failed ({status}): {}",
                guest_error.unwrap_or_else(|| "no bench line on its stdout".into())
            )
            .into());
        };
        let io_errors = v["io_errors"].as_u64().unwrap_or(u64::MAX);
        if io_errors != 0 {
            return Err(format!(
                "{io_errors} of {} requests completed with an I/O error (see the backend's log on stderr)",
                v["ops"].as_u64().unwrap_or(0)
            )
            .into());
        }
        if !status.success() {
            return Err(format!("the guest exited with {status}").into());
        }
        let field = |name: &str| {
            v[name]
                .as_f64()
                .ok_or_else(|| format!("guest bench line lacks {name:?}: {v}"))
        };
        Ok(Sample {
            ops: v["ops"].as_u64().ok_or("guest bench line lacks \"ops\"")?,
            elapsed: Duration::from_secs_f64(field("elapsed_s")?.max(0.0)),
            p50_us: field("p50_us")?,
            p99_us: field("p99_us")?,
            cpu: Duration::ZERO,
        })
    }

    /// fio's io_uring engine; latencies are its completion latency (clat).
    fn fio(&self, op: Op, qd: usize) -> Result<Sample, CliError> {
        let fio = self.fio.as_deref().ok_or("fio is not installed")?;
        let mut runtime_arg = std::ffi::OsString::from("--runtime=");
        runtime_arg.push(format!("{}ms", self.slice.as_millis().max(1)));
        let mut filename_arg = std::ffi::OsString::from("--filename=");
        filename_arg.push(self.image);
        let out = Command::new(fio)
            .args([
                "--name=shadowback",
                "--ioengine=io_uring",
                if self.cache.direct() {
                    "--direct=1"
                } else {
                    "--direct=0"
                },
                &format!("--rw={}", op.name()),
                "--bs=4k",
                &format!("--iodepth={qd}"),
                // Plain random offsets, as the other paths draw them.
                "--norandommap",
                "--randrepeat=0",
                "--time_based",
                "--output-format=json",
            ])
            .arg(runtime_arg)
            .arg(filename_arg)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", fio.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "fio exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .into());
        }
        // fio may print notes before the JSON document.
        let json = stdout
            .find('{')
            .map(|i| &stdout[i..])
            .ok_or("fio printed no JSON")?;
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("fio JSON: {e}"))?;
        let job = &v["jobs"][0];
        let error = job["error"].as_i64().unwrap_or(-1);
        if error != 0 {
            return Err(
                format!("fio reports error {error} (the errno of its first failed I/O)").into(),
            );
        }
        let dir = &job[if op.is_write() { "write" } else { "read" }];
        let pct = |p: &str| dir["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
        let ops = dir["total_ios"]
            .as_u64()
            .ok_or("fio JSON lacks total_ios")?;
        let runtime_ms = dir["runtime"].as_u64().ok_or("fio JSON lacks runtime")?;
        Ok(Sample {
            ops,
            elapsed: Duration::from_millis(runtime_ms),
            p50_us: pct("50.000000"),
            p99_us: pct("99.000000"),
            cpu: Duration::ZERO,
        })
    }
}

/// CPU time of this process tree at one instant: this process (all its
/// threads: the bench and the supervisor), its live children (backends,
/// standbys, qemu-storage-daemon), and the children it has reaped (guest
/// clients, fio with the job processes it reaped), all from
/// `/proc/PID/stat`. Idle processes add nothing, so the difference over a
/// slice is the CPU that slice's path cost.
struct TreeCpu {
    own: Duration,
    live: Vec<(u32, Duration)>,
    reaped: Duration,
}

impl TreeCpu {
    fn now() -> Self {
        let me = std::process::id();
        let (mut own, mut reaped) = (Duration::ZERO, Duration::ZERO);
        let mut live = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            match ProcCpu::of(pid) {
                Some(p) if pid == me => (own, reaped) = (p.own, p.reaped),
                Some(p) if p.ppid == me => live.push((pid, p.own)),
                _ => {}
            }
        }
        TreeCpu { own, live, reaped }
    }

    /// CPU the tree used since `self` was taken.
    fn since(&self) -> Duration {
        let now = TreeCpu::now();
        let live: Duration = now
            .live
            .iter()
            .map(|&(pid, cpu)| {
                let before = self.live.iter().find(|&&(p, _)| p == pid);
                cpu.saturating_sub(before.map_or(Duration::ZERO, |&(_, c)| c))
            })
            .sum();
        now.own.saturating_sub(self.own) + live + now.reaped.saturating_sub(self.reaped)
    }
}

/// What `/proc/PID/stat` says of a process's CPU time.
pub(crate) struct ProcCpu {
    pub(crate) ppid: u32,
    /// utime + stime.
    pub(crate) own: Duration,
    /// cutime + cstime: the children it waited for.
    reaped: Duration,
}

impl ProcCpu {
    /// `/proc` counts in USER_HZ, 100 on every Linux architecture.
    const USER_HZ: u64 = 100;

    pub(crate) fn of(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces and parentheses: fields are
        // counted from the last ')'. After it come state, ppid, … and
        // utime, stime, cutime, cstime (fields 14–17 of the line).
        let fields: Vec<&str> = stat
            .get(stat.rfind(')')? + 1..)?
            .split_whitespace()
            .collect();
        let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
        let time = |t: u64| Duration::from_millis(t * 1000 / Self::USER_HZ);
        Some(ProcCpu {
            ppid: fields.get(1)?.parse().ok()?,
            own: time(ticks(11)? + ticks(12)?),
            reaped: time(ticks(13)? + ticks(14)?),
        })
    }
}

fn ns_to_us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn open_image(path: &Path, cache: BenchCache) -> Result<File, CliError> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true);
    if cache.direct() {
        opts.custom_flags(libc::O_DIRECT);
    }
    opts.open(path).map_err(|e| {
        let hint = if cache.direct() {
            " (does the file system support O_DIRECT? try --dir on another one, or --cache writeback)"
        } else {
            ""
        };
        format!("{}: {e}{hint}", path.display()).into()
    })
}

/// Allocates the whole image and writes every block with non-zero data,
/// then makes it durable so no writeback runs during the measurements. With
/// `cache none` the page cache is dropped too; with `writeback` it is left
/// warm, so every path starts from a fully cached image.
pub(crate) fn prepare_image(path: &Path, bytes: u64, cache: BenchCache) -> Result<(), CliError> {
    let ctx = |what: &str, e: &dyn std::fmt::Display| format!("{}: {what}: {e}", path.display());
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| ctx("create", &e))?;
    let len = libc::off_t::try_from(bytes).map_err(|e| ctx("size", &e))?;
    if let Err(e) = nix::fcntl::fallocate(
        file.as_raw_fd(),
        nix::fcntl::FallocateFlags::empty(),
        0,
        len,
    ) {
        // Not every file system can preallocate; the full write below still
        // allocates every block.
        tracing::debug!(error = %e, "fallocate failed, writing the image without it");
        file.set_len(bytes).map_err(|e| ctx("set_len", &e))?;
    }
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK];
    let mut state = 0x5348_4144_4f57_424bu64; // "SHADOWBK"
    let mut offset = 0u64;
    while offset < bytes {
        for word in buf.chunks_exact_mut(8) {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let z = (state ^ (state >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            word.copy_from_slice(&(z | 1).to_le_bytes());
        }
        let n = usize::try_from(bytes - offset).map_or(CHUNK, |left| left.min(CHUNK));
        file.write_all_at(&buf[..n], offset)
            .map_err(|e| ctx("write", &e))?;
        offset += n as u64;
    }
    file.sync_all().map_err(|e| ctx("fsync", &e))?;
    if cache.direct() {
        let _ = nix::fcntl::posix_fadvise(
            file.as_raw_fd(),
            0,
            len,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }
    // Fail here, with a hint, rather than in the middle of the rows.
    open_image(path, cache)?;
    Ok(())
}

/// The 1-minute load average (`/proc/loadavg`), if readable.
fn load_average() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Other jobs on the machine delay the wakeups the xen-ring path depends
/// on far more than the single-threaded baseline: say how busy it was.
fn print_load_note(before: Option<f64>, after: Option<f64>) {
    let (Some(before), Some(after)) = (before, after) else {
        return;
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    outln!("  - load average {before:.2} before, {after:.2} after the run ({cpus} CPUs).");
    // This run itself adds about 1 to the figure after it.
    if before > 0.5 {
        outln!(
            "    Other jobs were competing for the CPUs: ratios swing far more than ±15%; rerun on a quiet machine."
        );
    }
}

/// The first executable called `name` in `PATH`.
fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

fn print_table(rows: &[Row], args: &BlkBenchArgs, with_fio: bool) {
    outln!(
        "shadowback bench blk — 4 KiB random I/O, {:.1} s per row, {} MiB preallocated and fully written image, cache {}, poll_us {}{}",
        args.duration,
        args.image_mib,
        match args.cache {
            BenchCache::None => "none (O_DIRECT)",
            BenchCache::Writeback => "writeback",
        },
        args.poll_us,
        match args.compare_poll_us {
            Some(p) => format!(" (the -poll rows: {p})"),
            None => String::new(),
        }
    );
    outln!();
    outln!(
        "{:<20} {:<9} {:>3} {:>10} {:>9} {:>9} {:>9} {:>7} {:>7}",
        "path",
        "op",
        "qd",
        "IOPS",
        "p50 µs",
        "p99 µs",
        "CPU µs/IO",
        "vs fio",
        "vs raw"
    );
    let mut last_group: Option<(&str, usize)> = None;
    for r in rows {
        if last_group.is_some_and(|g| g != (r.op, r.qd)) {
            outln!();
        }
        last_group = Some((r.op, r.qd));
        let ratio = |x: Option<f64>, base: IoPath| match x {
            Some(x) => format!("{x:.2}"),
            None if r.path == base.name() => "base".into(),
            None => "-".into(),
        };
        outln!(
            "{:<20} {:<9} {:>3} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>7} {:>7}",
            r.path,
            r.op,
            r.qd,
            r.iops,
            r.p50_us,
            r.p99_us,
            r.cpu_us_per_io,
            ratio(r.vs_fio, IoPath::Fio),
            ratio(r.vs_raw, IoPath::RawUring)
        );
    }
    outln!();
    let pairs = [
        (IoPath::XenRing, IoPath::XenRingNoShadow, "shadow log cost"),
        (
            IoPath::VhostUser,
            IoPath::VhostUserNoShadow,
            "shadow log cost",
        ),
        (IoPath::XenRingPoll, IoPath::XenRing, "polling"),
        (IoPath::VhostUserPoll, IoPath::VhostUser, "polling"),
        (IoPath::VhostUser, IoPath::XenRing, "transports"),
        (
            IoPath::RawUringDeferred,
            IoPath::RawUring,
            "ring setup as fio's",
        ),
        (
            IoPath::VhostUser,
            IoPath::Qsd,
            "against qemu-storage-daemon",
        ),
    ];
    for (this, other, what) in pairs {
        for r in rows.iter().filter(|r| r.path == this.name()) {
            let o = rows
                .iter()
                .find(|o| o.path == other.name() && o.op == r.op && o.qd == r.qd);
            if let Some(o) = o.filter(|o| o.iops > 0.0) {
                outln!(
                    "{what}, {} QD{}: {} / {} = {:.3} ({:+.1}% IOPS, CPU per I/O {:.1} vs {:.1} µs)",
                    r.op,
                    r.qd,
                    this.name(),
                    other.name(),
                    r.iops / o.iops,
                    (r.iops / o.iops - 1.0) * 100.0,
                    r.cpu_us_per_io,
                    o.cpu_us_per_io,
                );
            }
        }
    }
    if with_fio {
        outln!();
        outln!("targets (issue 12): QD32 ≥ 0.95× fio, QD1 ≥ 0.85× fio");
        let targeted = [
            IoPath::XenRing,
            IoPath::XenRingPoll,
            IoPath::VhostUser,
            IoPath::VhostUserPoll,
        ];
        for r in rows
            .iter()
            .filter(|r| targeted.iter().any(|p| p.name() == r.path))
        {
            let (Some(x), target) = (r.vs_fio, if r.qd >= 32 { 0.95 } else { 0.85 }) else {
                continue;
            };
            outln!(
                "  {:<16} {:<9} QD{:<3} {x:.2}× fio: {}",
                r.path,
                r.op,
                r.qd,
                if x >= target { "met" } else { "missed" }
            );
        }
    }
    outln!();
    outln!("notes:");
    outln!(
        "  - `vs fio` = IOPS / the fio row of the same op and QD (the yardstick); `vs raw` = / the raw-uring row;"
    );
    outln!(
        "    the paths took turns in {} slices of {:.2} s (IOPS = all ops / all time; p50 and p99 = the median of the slices' percentiles).",
        args.rounds,
        args.duration / f64::from(args.rounds)
    );
    outln!(
        "  - CPU µs/IO = CPU time of the whole process tree during the row's slices (this process with its supervisor thread,"
    );
    outln!(
        "    backends, guest client or fio, qemu-storage-daemon; /proc/PID/stat, 10 ms ticks) / I/Os."
    );
    outln!("  - figures vary by about ±15% between runs on a quiet machine; compare ratios within one run, not across runs.");
    outln!(
        "  - latency: raw-uring = submission to reap in one thread; xen-ring, vhost-user, qsd = the guest's submit to completion"
    );
    if with_fio {
        outln!("    (ring + kick + backend + notify/call); fio = its completion latency (clat).");
    } else {
        outln!(
            "    (ring + kick + backend + notify/call). fio was not found, so there are no fio rows and no `vs fio`."
        );
    }
}
