//! `shadowback bench net`: frames and a TCP stream through netfront →
//! netback → wire, against the same wire driven directly, in one run.
//!
//! Paths (docs/ARCHITECTURE.md §11.5–§11.6), each row measured for
//! `--seconds`, split into `--rounds` slices in which the paths of one
//! frame size take turns (each slice after a short warm-up, on a fresh
//! set-up; the row is the mean of its slices):
//!
//! - `raw-cable`: this process writes frames straight into one end of a
//!   cable and reads them from the other: the baseline of the cable rows;
//! - `netif-cable`: guest A's netfront TX ring → netback A → cable →
//!   netback B → guest B's RX ring, counted by guest B;
//! - `raw-tap`: this process writes frames straight into a TAP fd; the
//!   baseline of the TAP rows;
//! - `netif-tap`: guest A's netfront TX ring → netback A → the TAP;
//! - `vhost-user-net-tap`: guest A's virtio-net driver over vhost-user
//!   (`VhostUserNet`) → a supervisor's `[[nic]]` with `vhost_user` (threads
//!   of this process; the TAP is the supervisor's) → its netback → the TAP.
//!
//! `-noshadow` rows run the same backends with `--no-shadow`. TAP rows
//! open the TAP in a fresh network namespace (root only) and count the
//! frames arriving there with an `AF_PACKET` socket bound to the TAP and to
//! the frames' EtherType: the kernel counts each frame delivered to the
//! socket (`PACKET_STATISTICS`, drops from its deliberately small receive
//! buffer included), so nothing has to read them. Frames are Ethernet
//! frames of 64 and 1514 bytes (the 1500-byte MTU plus the header, "1500"
//! in the table) with the local experimental EtherType 0x88b5, which no
//! protocol handler takes. Gbit/s counts the Ethernet frame (no FCS,
//! preamble or gap).
//!
//! TCP rows run a verified stream ([`run_stream`], smoltcp) from guest A:
//! on the cable to guest B's stack (`raw-cable`: both stacks straight on
//! the cable's ends), on the TAP to a Linux socket in the namespace that
//! checks every byte (`raw-tap`: the guest stack straight on the TAP fd).
//! Each slice runs a 2 MiB stream to calibrate, then one sized to last
//! the slice; Gbit/s is the verified payload, pps the frames the receiving
//! guest took in (cable) or the sending guest sent (TAP). On the TAP the
//! CPU time of the second stream is the row's CPU per frame.

use std::collections::HashMap;
use std::io::IoSlice;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Args;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, sendmsg, MsgFlags};
use serde::Serialize;
use shadowback_guest::net::{
    run_stream, FrameDevice, FrameError, NetConfig, StreamParams, StreamReport, StreamRole,
    StreamVerifier,
};
use shadowback_guest::netfront::{NetFront, NetFrontConfig};
use shadowback_guest::vhost_user::{VhostUserNet, VhostUserNetOptions};
use shadowback_netback::wire::{cable_pair, CableConfig, Tap, TapConfig, TapMode, VNET_HDR_LEN};
use shadowback_supervisor::{BackendCommand, Config, SupervisorThread};
use shadowback_xenbus::netif::MacAddr;

use crate::netvif::{BenchVif, WireType};
use crate::out::{errln, errout, outln};
use crate::CliError;

#[derive(Args, Debug)]
pub struct NetBenchArgs {
    /// Print `{"rows":[…]}` on stdout and nothing else.
    #[arg(long)]
    json: bool,
    /// Seconds each row is measured (after a warm-up of a fifth of it).
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Only these paths (comma-separated names from the table), e.g. to
    /// profile one; a ratio needs its raw row in the same run.
    #[arg(long, value_delimiter = ',')]
    paths: Vec<String>,
    /// Slices per row: the paths of one frame size take turns slice by
    /// slice, so a disturbance of the machine (another job) hits them alike.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Only these frames: 64, 1500, tcp (comma-separated).
    #[arg(long, value_delimiter = ',')]
    frames: Vec<String>,
    /// Adaptive polling window of every backend row's backends, in µs
    /// (`[[nic]] poll_us`, `netback --poll-us`; 0: they never poll).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1000))]
    poll_us: u32,
}

/// How a row's backends run: with shadow logs or not, and their polling
/// window (`--poll-us`).
#[derive(Clone, Copy, Debug)]
struct Backends {
    shadow: bool,
    poll_us: u32,
}

/// EtherType of the benchmark frames: IEEE 802 local experimental.
pub const BENCH_ETHERTYPE: u16 = 0x88b5;
/// Largest Ethernet frame at a 1500-byte MTU.
const MTU_FRAME: usize = 1514;
/// How long the Linux end of a TCP row waits for a connection or data.
const LINUX_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a raw cable device waits for room in the cable's queue.
const RAW_SEND_PATIENCE: Duration = Duration::from_millis(50);
/// Where an idle loop sleeps at most before looking at its stop flag.
const IDLE_WAIT_MS: u16 = 10;
/// MAC of guest A (the sender) and guest B.
const MAC_A: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
const MAC_B: MacAddr = MacAddr([2, 0, 0, 0, 0, 2]);
/// Destination of the TAP frames: nobody in the namespace.
const MAC_NOBODY: [u8; 6] = [2, 0, 0, 0, 0, 0x99];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frame {
    Small,
    Mtu,
    Tcp,
}

impl Frame {
    fn name(self) -> &'static str {
        match self {
            Frame::Small => "64",
            Frame::Mtu => "1500",
            Frame::Tcp => "tcp",
        }
    }

    fn len(self) -> usize {
        match self {
            Frame::Small => 64,
            Frame::Mtu | Frame::Tcp => MTU_FRAME,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NetPath {
    RawCable,
    NetifCable,
    NetifCableNoShadow,
    RawTap,
    NetifTap,
    NetifTapNoShadow,
    VhostTap,
    VhostTapNoShadow,
}

/// Run order within a frame size: each raw row right before the rows
/// divided by it.
const ALL_PATHS: [NetPath; 8] = [
    NetPath::RawCable,
    NetPath::NetifCable,
    NetPath::NetifCableNoShadow,
    NetPath::RawTap,
    NetPath::NetifTap,
    NetPath::NetifTapNoShadow,
    NetPath::VhostTap,
    NetPath::VhostTapNoShadow,
];

impl NetPath {
    fn name(self) -> &'static str {
        match self {
            NetPath::RawCable => "raw-cable",
            NetPath::NetifCable => "netif-cable",
            NetPath::NetifCableNoShadow => "netif-cable-noshadow",
            NetPath::RawTap => "raw-tap",
            NetPath::NetifTap => "netif-tap",
            NetPath::NetifTapNoShadow => "netif-tap-noshadow",
            NetPath::VhostTap => "vhost-user-net-tap",
            NetPath::VhostTapNoShadow => "vhost-user-net-tap-noshadow",
        }
    }

    fn is_tap(self) -> bool {
        matches!(
            self,
            NetPath::RawTap
                | NetPath::NetifTap
                | NetPath::NetifTapNoShadow
                | NetPath::VhostTap
                | NetPath::VhostTapNoShadow
        )
    }

    /// The raw path of the same wire.
    fn baseline(self) -> NetPath {
        if self.is_tap() {
            NetPath::RawTap
        } else {
            NetPath::RawCable
        }
    }

    fn shadow(self) -> bool {
        !matches!(
            self,
            NetPath::NetifCableNoShadow | NetPath::NetifTapNoShadow | NetPath::VhostTapNoShadow
        )
    }
}

/// A stream's thread panicked: the run fails and says which.
#[derive(Debug)]
struct StreamPanicked(&'static str);

impl std::fmt::Display for StreamPanicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the {} thread panicked", self.0)
    }
}

impl std::error::Error for StreamPanicked {}

/// One line of the table and of the JSON output.
#[derive(Serialize)]
struct Row {
    path: &'static str,
    frame: &'static str,
    pps: f64,
    gbps: f64,
    /// CPU time per frame, summed over this process's threads and the
    /// backends (frame rows): a cost the other jobs of a shared machine
    /// do not change, unlike pps.
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_us_per_frame: Option<f64>,
    /// Of that, the backend processes' (the guest's share is the rest).
    #[serde(skip_serializing_if = "Option::is_none")]
    backend_cpu_us_per_frame: Option<f64>,
    /// pps over the raw row of the same wire and frame.
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio: Option<f64>,
}

#[derive(Serialize)]
struct JsonReport<'a> {
    rows: &'a [Row],
    /// The shadow log's cost by slice, for each pair of rows with and
    /// without it.
    shadow_cost: &'a [ShadowCost],
    /// The backends' polling window (`--poll-us`).
    poll_us: u32,
    /// Rows not run, and why.
    skipped: &'a [String],
}

/// The rows with a shadow log and the same paths without.
const SHADOW_PAIRS: [(NetPath, NetPath); 3] = [
    (NetPath::NetifCable, NetPath::NetifCableNoShadow),
    (NetPath::NetifTap, NetPath::NetifTapNoShadow),
    (NetPath::VhostTap, NetPath::VhostTapNoShadow),
];

/// What the shadow log costs a path, slice by slice: slice `i` of the row
/// with the log against slice `i` of the row without it, measured in the
/// same round (only the other paths' slices between them), so a
/// disturbance of the machine that lasts a slice moves one pair, and the
/// median, unlike the ratio of the rows' means, does not follow it.
/// Positive: the log costs. A median is `null` without pairs.
#[derive(Serialize, Debug, PartialEq)]
struct ShadowCost {
    path: &'static str,
    baseline: &'static str,
    frame: &'static str,
    /// Per slice, pps without the log over pps with it, less 1.
    pps_cost: Vec<f64>,
    pps_cost_median: Option<f64>,
    /// Per slice, the backends' CPU per frame with the log over without,
    /// less 1 (slices where both rows have one).
    backend_cpu_cost: Vec<f64>,
    backend_cpu_cost_median: Option<f64>,
}

impl ShadowCost {
    fn paired(
        with: NetPath,
        without: NetPath,
        frame: Frame,
        with_slices: &[Rate],
        without_slices: &[Rate],
    ) -> Self {
        let pairs = || with_slices.iter().zip(without_slices);
        let pps_cost: Vec<f64> = pairs()
            .filter(|(w, _)| w.pps > 0.0)
            .map(|(w, n)| n.pps / w.pps - 1.0)
            .collect();
        let backend_cpu_cost: Vec<f64> = pairs()
            .filter_map(|(w, n)| match (w.cpu_us, n.cpu_us) {
                (Some((_, w)), Some((_, n))) if n > 0.0 => Some(w / n - 1.0),
                _ => None,
            })
            .collect();
        Self {
            path: with.name(),
            baseline: without.name(),
            frame: frame.name(),
            pps_cost_median: median(&pps_cost),
            backend_cpu_cost_median: median(&backend_cpu_cost),
            pps_cost,
            backend_cpu_cost,
        }
    }
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// `median (n slice pairs, min to max; means m)` of fractions, as
/// percentages, with `means` the same cost of the rows' means.
fn spread(values: &[f64], means: f64) -> String {
    let Some(m) = median(values) else {
        return format!("- (no slice pairs; means {:+.1}%)", means * 100.0);
    };
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(
        "{:+.1}% (median of {} slice pairs, {:+.1}% to {:+.1}%; means {:+.1}%)",
        m * 100.0,
        values.len(),
        min * 100.0,
        max * 100.0,
        means * 100.0
    )
}

/// What one row measured.
struct Rate {
    pps: f64,
    gbps: f64,
    /// CPU time per frame of every process of the path, and of the
    /// backends alone (frame rows).
    cpu_us: Option<(f64, f64)>,
}

pub fn run(args: &NetBenchArgs) -> Result<ExitCode, CliError> {
    if !(args.seconds > 0.0 && args.seconds.is_finite() && args.seconds <= 3600.0) {
        return Err("--seconds must be a positive number of seconds, at most 3600".into());
    }
    if !(1..=100).contains(&args.rounds) {
        return Err("--rounds must be within 1..=100".into());
    }
    let secs = Duration::from_secs_f64(args.seconds);
    // /proc/self belongs to the process's effective user.
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    });
    let mut skipped = Vec::new();
    if !root {
        let why = "raw-tap and netif-tap rows: a TAP in a fresh network namespace needs root";
        errln!("shadowback bench net: skipping {why}");
        skipped.push(why.to_string());
    }
    let mut plan: Vec<(NetPath, Frame)> = Vec::new();
    for frame in [Frame::Small, Frame::Mtu] {
        for path in ALL_PATHS {
            if root || !path.is_tap() {
                plan.push((path, frame));
            }
        }
    }
    for path in ALL_PATHS {
        if root || !path.is_tap() {
            plan.push((path, Frame::Tcp));
        }
    }
    for (given, known) in [
        (&args.paths, ALL_PATHS.map(NetPath::name).to_vec()),
        (&args.frames, vec!["64", "1500", "tcp"]),
    ] {
        if let Some(bad) = given.iter().find(|g| !known.contains(&g.as_str())) {
            return Err(format!("{bad:?}: not one of {}", known.join(", ")).into());
        }
    }
    plan.retain(|(p, f)| {
        (args.paths.is_empty() || args.paths.iter().any(|n| n == p.name()))
            && (args.frames.is_empty() || args.frames.iter().any(|n| n == f.name()))
    });
    let slice = secs / args.rounds;
    let mut rows: Vec<Row> = Vec::new();
    let mut costs: Vec<ShadowCost> = Vec::new();
    for frame in [Frame::Small, Frame::Mtu, Frame::Tcp] {
        let paths: Vec<NetPath> = plan
            .iter()
            .filter(|(_, f)| *f == frame)
            .map(|&(p, _)| p)
            .collect();
        // Sums of the slices' rates (the slices are equally long), and of
        // their CPU times per frame with how many slices had one; and each
        // slice's rate, for the paired shadow costs.
        let mut sums = vec![(0.0f64, 0.0f64, (0.0f64, 0.0f64), 0u32); paths.len()];
        let mut slices: Vec<Vec<Rate>> = paths.iter().map(|_| Vec::new()).collect();
        for round in 0..args.rounds {
            // Odd rounds take the paths in the reverse order, so neither row
            // of a pair always runs right after the other.
            let order: Vec<usize> = if round % 2 == 0 {
                (0..paths.len()).collect()
            } else {
                (0..paths.len()).rev().collect()
            };
            for i in order {
                let path = paths[i];
                let rate = measure_row(path, frame, slice, args.poll_us)
                    .map_err(|e| format!("{} {}: {e}", path.name(), frame.name()))?;
                let sum = &mut sums[i];
                sum.0 += rate.pps;
                sum.1 += rate.gbps;
                if let Some((all, backends)) = rate.cpu_us {
                    sum.2 .0 += all;
                    sum.2 .1 += backends;
                    sum.3 += 1;
                }
                slices[i].push(rate);
                if !args.json {
                    errout!(".");
                }
            }
        }
        for (with, without) in SHADOW_PAIRS {
            let find = |p: NetPath| paths.iter().position(|&q| q == p);
            if let (Some(w), Some(n)) = (find(with), find(without)) {
                costs.push(ShadowCost::paired(
                    with, without, frame, &slices[w], &slices[n],
                ));
            }
        }
        for (&path, &(pps, gbps, cpu, cpu_slices)) in paths.iter().zip(&sums) {
            let (pps, gbps) = (pps / f64::from(args.rounds), gbps / f64::from(args.rounds));
            let ratio = rows
                .iter()
                .find(|r| r.path == path.baseline().name() && r.frame == frame.name())
                .filter(|_| path != path.baseline())
                .map(|b| if b.pps > 0.0 { pps / b.pps } else { 0.0 });
            rows.push(Row {
                path: path.name(),
                frame: frame.name(),
                pps,
                gbps,
                cpu_us_per_frame: (cpu_slices > 0).then(|| cpu.0 / f64::from(cpu_slices)),
                backend_cpu_us_per_frame: (cpu_slices > 0 && path != path.baseline())
                    .then(|| cpu.1 / f64::from(cpu_slices)),
                ratio,
            });
        }
    }
    if !args.json {
        errln!();
    }
    if args.json {
        outln!(
            "{}",
            serde_json::to_string(&JsonReport {
                rows: &rows,
                shadow_cost: &costs,
                poll_us: args.poll_us,
                skipped: &skipped,
            })?
        );
    } else {
        print_table(&rows, &costs, &skipped, args);
    }
    Ok(ExitCode::SUCCESS)
}

fn measure_row(
    path: NetPath,
    frame: Frame,
    secs: Duration,
    poll_us: u32,
) -> Result<Rate, CliError> {
    let how = Backends {
        shadow: path.shadow(),
        poll_us,
    };
    match (path, frame) {
        (NetPath::RawCable, Frame::Tcp) => tcp_raw_cable(secs),
        (NetPath::NetifCable | NetPath::NetifCableNoShadow, Frame::Tcp) => {
            tcp_netif_cable(how, secs)
        }
        (NetPath::RawTap, Frame::Tcp) => tcp_raw_tap(secs),
        (NetPath::NetifTap | NetPath::NetifTapNoShadow, Frame::Tcp) => tcp_netif_tap(how, secs),
        (NetPath::VhostTap | NetPath::VhostTapNoShadow, Frame::Tcp) => tcp_vhost_tap(how, secs),
        (NetPath::RawCable, _) => raw_cable(frame.len(), secs),
        (NetPath::NetifCable | NetPath::NetifCableNoShadow, _) => {
            netif_cable(frame.len(), how, secs)
        }
        (NetPath::RawTap, _) => raw_tap(frame.len(), secs),
        (NetPath::NetifTap | NetPath::NetifTapNoShadow, _) => netif_tap(frame.len(), how, secs),
        (NetPath::VhostTap | NetPath::VhostTapNoShadow, _) => vhost_tap(frame.len(), how, secs),
    }
}

/// An Ethernet frame of `len` bytes from guest A to `dst`.
fn bench_frame(len: usize, dst: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&MAC_A.0);
    f[12..14].copy_from_slice(&BENCH_ETHERTYPE.to_be_bytes());
    for (i, b) in f[14..].iter_mut().enumerate() {
        *b = i as u8;
    }
    f
}

fn is_bench_frame(f: &[u8], len: usize) -> bool {
    f.len() == len && f.get(12..14) == Some(&BENCH_ETHERTYPE.to_be_bytes()[..])
}

/// Runs `senders` until the window closes: a warm-up of a fifth of
/// `secs` (at least 100 ms), then `secs` between two reads of `count`.
fn timed_window(
    secs: Duration,
    stop: &AtomicBool,
    mut count: impl FnMut() -> Result<u64, CliError>,
    frame_len: usize,
) -> Result<Rate, CliError> {
    thread::sleep((secs / 5).max(Duration::from_millis(100)));
    let (c0, (own0, kids0)) = (count()?, cpu_ns()?);
    let t0 = Instant::now();
    thread::sleep(secs);
    let (c1, (own1, kids1)) = (count()?, cpu_ns()?);
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let frames = c1.saturating_sub(c0);
    let pps = frames as f64 / elapsed;
    Ok(Rate {
        pps,
        gbps: pps * frame_len as f64 * 8.0 / 1e9,
        cpu_us: (frames > 0).then(|| {
            let per_frame = |ns: u64| ns as f64 / 1e3 / frames as f64;
            let kids = kids_since(&kids1, &kids0);
            (per_frame(own1.saturating_sub(own0) + kids), per_frame(kids))
        }),
    })
}

/// CPU time of this process's children over a window, in ns: each child
/// alive at its end, less what it had at the start (a child started in
/// the window counts whole). A child gone by the end — a backend replaced
/// in the window, by a hang verdict on a loaded machine — takes its part
/// with it: the figure is then low, never the difference of two sums of
/// different processes (which could be anything, or nothing).
fn kids_since(now: &HashMap<u32, u64>, then: &HashMap<u32, u64>) -> u64 {
    now.iter()
        .map(|(pid, ns)| ns.saturating_sub(then.get(pid).copied().unwrap_or(0)))
        .fold(0u64, u64::saturating_add)
}

/// CPU time so far, in ns, of this process (every thread) and of each of
/// its children by pid (the backends, started here or by a supervisor
/// thread here): `/proc/PID/schedstat` of each process whose parent is
/// this one.
fn cpu_ns() -> Result<(u64, HashMap<u32, u64>), CliError> {
    let own = nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID)?;
    let own = u64::try_from(Duration::from(own).as_nanos()).unwrap_or(u64::MAX);
    let mut kids = HashMap::new();
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // A process may exit between the listing and the reads.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The fields after the command's closing parenthesis: state, ppid.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(me) {
            continue;
        }
        if let Ok(sched) = std::fs::read_to_string(format!("/proc/{pid}/schedstat")) {
            let on_cpu = sched
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok());
            kids.insert(pid, on_cpu.unwrap_or(0));
        }
    }
    Ok((own, kids))
}

/// Joins a worker, turning its panic or error into this row's error.
fn join<T>(h: thread::JoinHandle<Result<T, CliError>>) -> Result<T, CliError> {
    h.join().map_err(|_| "a worker thread panicked")?
}

/// Sleeps until `fd` polls `flags`, or for `IDLE_WAIT_MS`.
fn wait_fd(fd: BorrowedFd<'_>, flags: PollFlags) -> Result<(), CliError> {
    match poll(
        &mut [PollFd::new(fd, flags)],
        PollTimeout::from(IDLE_WAIT_MS),
    ) {
        Ok(_) | Err(Errno::EINTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// One frame on a cable: the 10-byte virtio-net header, zero, and the frame.
fn cable_send(fd: BorrowedFd<'_>, frame: &[u8]) -> Result<bool, CliError> {
    let hdr = [0u8; VNET_HDR_LEN];
    match sendmsg::<()>(
        fd.as_raw_fd(),
        &[IoSlice::new(&hdr), IoSlice::new(frame)],
        &[],
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    ) {
        Ok(_) => Ok(true),
        Err(Errno::EAGAIN | Errno::ENOBUFS | Errno::EINTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// One message from a cable into `buf`; its length, or `None` if none.
fn cable_recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<Option<usize>, CliError> {
    match recv(fd.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
        Ok(0) => Err("the cable's other end closed".into()),
        Ok(n) => Ok(Some(n)),
        Err(Errno::EAGAIN | Errno::EINTR) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn raw_cable(len: usize, secs: Duration) -> Result<Rate, CliError> {
    let [a, b] = cable_pair(CableConfig::default())?;
    let stop = Arc::new(AtomicBool::new(false));
    let frame = bench_frame(len, MAC_B.0);
    let count = Arc::new(AtomicU64::new(0));
    let tx = {
        let stop = stop.clone();
        thread::spawn(move || -> Result<(), CliError> {
            while !stop.load(Ordering::Relaxed) {
                match cable_send(a.as_fd(), &frame) {
                    Ok(true) => {}
                    Ok(false) => wait_fd(a.as_fd(), PollFlags::POLLOUT)?,
                    // The receiver may see `stop` first and close its end
                    // (ECONNRESET): the window is over, not an error.
                    Err(_) if stop.load(Ordering::Relaxed) => break,
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
    };
    let rx = {
        let (stop, count) = (stop.clone(), count.clone());
        thread::spawn(move || -> Result<(), CliError> {
            let mut buf = vec![0u8; VNET_HDR_LEN + MTU_FRAME + 1];
            while !stop.load(Ordering::Relaxed) {
                let got = match cable_recv(b.as_fd(), &mut buf) {
                    Ok(got) => got,
                    // The sender may see `stop` first and close its end.
                    Err(_) if stop.load(Ordering::Relaxed) => break,
                    Err(e) => return Err(e),
                };
                match got {
                    Some(n) if n >= VNET_HDR_LEN && is_bench_frame(&buf[VNET_HDR_LEN..n], len) => {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(_) => {}
                    None => wait_fd(b.as_fd(), PollFlags::POLLIN)?,
                }
            }
            Ok(())
        })
    };
    let rate = timed_window(secs, &stop, || Ok(count.load(Ordering::Relaxed)), len);
    stop.store(true, Ordering::Relaxed);
    join(tx)?;
    join(rx)?;
    rate
}

fn guest(mac: MacAddr) -> Result<NetFront, CliError> {
    let mut cfg = NetFrontConfig::new("vif0");
    cfg.mac = mac;
    Ok(NetFront::new(cfg)?)
}

/// Puts `frame` on `front`'s TX ring as fast as the backend answers.
fn netfront_sender(
    front: NetFront,
    frame: Vec<u8>,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Result<NetFront, CliError>> {
    // TX completions share the channel the stack waits on.
    frame_sender(front, frame, stop, |f| f.wait_fd())
}

/// Sends `frame` on `dev` as fast as its backend takes it, sleeping on
/// `tx_fd(dev)` while every transmit buffer is in flight; returns the
/// device when `stop` is set.
fn frame_sender<D: FrameDevice + Send + 'static>(
    mut dev: D,
    frame: Vec<u8>,
    stop: Arc<AtomicBool>,
    tx_fd: for<'a> fn(&'a D) -> Option<BorrowedFd<'a>>,
) -> thread::JoinHandle<Result<D, CliError>> {
    thread::spawn(move || {
        let mut sink = Vec::with_capacity(MTU_FRAME);
        while !stop.load(Ordering::Relaxed) {
            if dev.can_send() {
                dev.send(&frame)?;
                continue;
            }
            // Drains the notifications (and whatever arrived), then looks
            // again before sleeping.
            while dev.recv(&mut sink)? {}
            if !dev.can_send() {
                wait_fd(tx_fd(&dev).ok_or("no wait fd")?, PollFlags::POLLIN)?;
            }
        }
        Ok(dev)
    })
}

/// Counts the benchmark frames of `len` bytes arriving on `front`.
fn netfront_counter(
    mut front: NetFront,
    len: usize,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
) -> thread::JoinHandle<Result<(), CliError>> {
    thread::spawn(move || {
        let mut buf = Vec::with_capacity(MTU_FRAME);
        while !stop.load(Ordering::Relaxed) {
            if front.recv(&mut buf)? {
                if is_bench_frame(&buf, len) {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
            if front.poll_again_in() != Some(Duration::ZERO) {
                wait_fd(front.wait_fd().ok_or("no wait fd")?, PollFlags::POLLIN)?;
            }
        }
        Ok(())
    })
}

/// Guests A and B, each with its backend (and with `hot` a standby), on
/// the two ends of a cable.
pub(crate) fn cable_vifs(
    shadow: bool,
    hot: bool,
) -> Result<(NetFront, NetFront, [BenchVif; 2]), CliError> {
    polling_cable_vifs(shadow, hot, 0)
}

/// [`cable_vifs`] with backends that poll for `poll_us` after activity.
fn polling_cable_vifs(
    shadow: bool,
    hot: bool,
    poll_us: u32,
) -> Result<(NetFront, NetFront, [BenchVif; 2]), CliError> {
    let [ca, cb] = cable_pair(CableConfig::default())?;
    let (a, b) = (guest(MAC_A)?, guest(MAC_B)?);
    let how = (shadow, hot, poll_us);
    let va = BenchVif::start_as(&a, ca, WireType::Cable, how)?;
    let vb = BenchVif::start_as(&b, cb, WireType::Cable, how)?;
    Ok((a, b, [va, vb]))
}

fn netif_cable(len: usize, how: Backends, secs: Duration) -> Result<Rate, CliError> {
    let (a, b, vifs) = polling_cable_vifs(how.shadow, false, how.poll_us)?;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let tx = netfront_sender(a, bench_frame(len, MAC_B.0), stop.clone());
    let rx = netfront_counter(b, len, stop.clone(), count.clone());
    let rate = timed_window(secs, &stop, || Ok(count.load(Ordering::Relaxed)), len);
    stop.store(true, Ordering::Relaxed);
    join(tx)?;
    join(rx)?;
    drop(vifs);
    rate
}

fn raw_tap(len: usize, secs: Duration) -> Result<Rate, CliError> {
    let (tap, mut counter) = tap_in_fresh_netns()?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut msg = vec![0u8; VNET_HDR_LEN];
    msg.extend(bench_frame(len, MAC_NOBODY));
    let fd = tap.queue_fds()[0].try_clone()?;
    let tx = {
        let stop = stop.clone();
        thread::spawn(move || -> Result<(), CliError> {
            while !stop.load(Ordering::Relaxed) {
                match nix::unistd::write(&fd, &msg) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(Errno::EAGAIN) => wait_fd(fd.as_fd(), PollFlags::POLLOUT)?,
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        })
    };
    let rate = timed_window(secs, &stop, || counter.total(), len);
    stop.store(true, Ordering::Relaxed);
    join(tx)?;
    rate
}

fn netif_tap(len: usize, how: Backends, secs: Duration) -> Result<Rate, CliError> {
    let (tap, mut counter) = tap_in_fresh_netns()?;
    let a = guest(MAC_A)?;
    let wire = tap.queue_fds()[0].try_clone()?;
    let vif = BenchVif::start_as(&a, wire, WireType::Tap, (how.shadow, false, how.poll_us))?;
    let stop = Arc::new(AtomicBool::new(false));
    let tx = netfront_sender(a, bench_frame(len, MAC_NOBODY), stop.clone());
    let rate = timed_window(secs, &stop, || counter.total(), len);
    stop.store(true, Ordering::Relaxed);
    join(tx)?;
    drop(vif);
    rate
}

/// What a vhost-user-net row runs on: a supervisor serving one vif over
/// vhost-user on a TAP it creates, both in a fresh network namespace (its
/// threads and backends start there), and a counter of the benchmark
/// frames arriving on the TAP. Dropped, the supervisor stops and the
/// namespace goes with the TAP.
struct VhostTap {
    supervisor: Option<SupervisorThread>,
    counter: crate::netns::PacketCounter,
    socket: PathBuf,
    _dir: crate::scratch::TempDir,
}

/// The benchmark TAP of the vhost-user-net rows.
const VHOST_TAP: &str = "sbbench0";

impl VhostTap {
    /// With `linux`, the TAP gets the receiver's address and a listener
    /// (the TCP rows).
    fn start(how: Backends, linux: bool) -> Result<(Self, Option<TcpListener>), CliError> {
        let dir = crate::scratch::TempDir::new(None, "bench-net")?;
        let socket = dir.0.join("vnet.sock");
        let toml = format!(
            "socket = {:?}\n[[nic]]\nname = \"vnet\"\ntap = \"{VHOST_TAP}\"\nmtu = 1500\nvhost_user = {:?}\nshadow = {}\nstandby = false\npoll_us = {}\n",
            dir.0.join("control.sock").display().to_string(),
            socket.display().to_string(),
            how.shadow,
            how.poll_us,
        );
        let cfg = Config::parse(&toml)?;
        let (supervisor, counter, listener) = thread::spawn(move || -> Result<_, CliError> {
            crate::netns::unshare_net()?;
            // Started from this thread, the supervisor's threads and the
            // backends they start are in its namespace, and so is the TAP.
            let supervisor = SupervisorThread::start(cfg, BackendCommand::current_exe()?)?;
            let counter = crate::netns::PacketCounter::open(VHOST_TAP, BENCH_ETHERTYPE)?;
            let listener = if linux {
                let (_, receiver) = stream_params(0, 0);
                crate::netns::set_ipv4_24(VHOST_TAP, receiver.net.address)?;
                let l = TcpListener::bind((receiver.net.address, receiver.port))?;
                l.set_nonblocking(true)?;
                Some(l)
            } else {
                None
            };
            Ok((supervisor, counter, listener))
        })
        .join()
        .map_err(|_| "the namespace thread panicked")??;
        Ok((
            VhostTap {
                supervisor: Some(supervisor),
                counter,
                socket,
                _dir: dir,
            },
            listener,
        ))
    }

    fn connect(&self) -> Result<VhostUserNet, CliError> {
        Ok(VhostUserNet::connect(
            &self.socket,
            &VhostUserNetOptions::default(),
        )?)
    }
}

impl Drop for VhostTap {
    fn drop(&mut self) {
        if let Some(s) = self.supervisor.take() {
            if let Err(e) = s.stop() {
                tracing::warn!(error = %e, "benchmark supervisor did not stop cleanly");
            }
        }
    }
}

fn vhost_tap(len: usize, how: Backends, secs: Duration) -> Result<Rate, CliError> {
    let (mut vt, _) = VhostTap::start(how, false)?;
    let dev = vt.connect()?;
    let stop = Arc::new(AtomicBool::new(false));
    let tx = frame_sender(
        dev,
        bench_frame(len, MAC_NOBODY),
        stop.clone(),
        VhostUserNet::tx_wait_fd,
    );
    let rate = timed_window(secs, &stop, || vt.counter.total(), len);
    stop.store(true, Ordering::Relaxed);
    // The device goes before the supervisor, as a VMM's would.
    drop(join(tx)?);
    drop(vt);
    rate
}

fn tcp_vhost_tap(how: Backends, secs: Duration) -> Result<Rate, CliError> {
    let (vt, listener) = VhostTap::start(how, true)?;
    let listener = listener.ok_or("no listener")?;
    let dev = vt.connect()?;
    let rate = tcp_to_linux_rate(dev, &listener, secs);
    drop(vt);
    rate
}

/// A TAP (`sbbench0`, MTU 1500) in a new network namespace, and a counter
/// of the benchmark frames arriving on it there. The namespace lives as
/// long as the TAP's fd and the counter's socket.
fn tap_in_fresh_netns() -> Result<(Tap, crate::netns::PacketCounter), CliError> {
    thread::spawn(|| -> Result<_, CliError> {
        let tap = open_netns_tap()?;
        let counter = crate::netns::PacketCounter::open(tap.name(), BENCH_ETHERTYPE)?;
        Ok((tap, counter))
    })
    .join()
    .map_err(|_| "the namespace thread panicked")?
}

fn open_netns_tap() -> Result<Tap, CliError> {
    crate::netns::unshare_net()?;
    let mut cfg = TapConfig::new("sbbench%d", TapMode::Create);
    cfg.mtu = Some(1500);
    Ok(Tap::open(&cfg)?)
}

/// The Linux end of a TCP row: a TAP in a fresh namespace with the
/// receiver's address (10.9.0.2/24), and a listener on it.
fn tap_with_listener() -> Result<(Tap, TcpListener), CliError> {
    thread::spawn(|| -> Result<_, CliError> {
        let tap = open_netns_tap()?;
        let (_, receiver) = stream_params(0, 0);
        crate::netns::set_ipv4_24(tap.name(), receiver.net.address)?;
        let listener = TcpListener::bind((receiver.net.address, receiver.port))?;
        listener.set_nonblocking(true)?;
        Ok((tap, listener))
    })
    .join()
    .map_err(|_| "the namespace thread panicked")?
}

/// A guest stack's frame device straight on a cable end or a TAP fd: the
/// TCP baselines. Either way a frame is the 10-byte virtio-net header,
/// zero, and the Ethernet frame.
struct RawWireDevice {
    fd: OwnedFd,
    tap: bool,
    mac: MacAddr,
    buf: Vec<u8>,
}

impl RawWireDevice {
    fn new(fd: OwnedFd, tap: bool, mac: MacAddr) -> Self {
        RawWireDevice {
            fd,
            tap,
            mac,
            buf: vec![0u8; VNET_HDR_LEN + MTU_FRAME + 1],
        }
    }

    /// One attempt; false when the queue is full.
    fn try_send(&self, frame: &[u8]) -> Result<bool, CliError> {
        if !self.tap {
            return cable_send(self.fd.as_fd(), frame);
        }
        let hdr = [0u8; VNET_HDR_LEN];
        match nix::sys::uio::writev(&self.fd, &[IoSlice::new(&hdr), IoSlice::new(frame)]) {
            Ok(_) => Ok(true),
            Err(Errno::EAGAIN | Errno::EINTR) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn try_recv(&mut self) -> Result<Option<usize>, CliError> {
        if !self.tap {
            return cable_recv(self.fd.as_fd(), &mut self.buf);
        }
        match nix::unistd::read(self.fd.as_raw_fd(), &mut self.buf) {
            Ok(n) => Ok(Some(n)),
            Err(Errno::EAGAIN | Errno::EINTR) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

impl FrameDevice for RawWireDevice {
    /// Waits for room (up to [`RAW_SEND_PATIENCE`]) as a qdisc in front
    /// of a NIC holds a packet back, rather than dropping: the baseline is
    /// the wire's capacity, not TCP's loss recovery.
    fn send(&mut self, frame: &[u8]) -> Result<(), FrameError> {
        let io = |e| FrameError::Io(std::io::Error::other(e));
        let deadline = Instant::now() + RAW_SEND_PATIENCE;
        while !self.try_send(frame).map_err(io)? {
            if Instant::now() >= deadline {
                break;
            }
            wait_fd(self.fd.as_fd(), PollFlags::POLLOUT).map_err(io)?;
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<bool, FrameError> {
        let io = |e| FrameError::Io(std::io::Error::other(e));
        match self.try_recv().map_err(io)? {
            Some(n) if n >= VNET_HDR_LEN => {
                buf.clear();
                buf.extend_from_slice(&self.buf[VNET_HDR_LEN..n]);
                Ok(true)
            }
            Some(_) | None => Ok(false),
        }
    }

    fn wait_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.fd.as_fd())
    }

    fn poll_again_in(&self) -> Option<Duration> {
        None
    }

    fn mac(&self) -> [u8; 6] {
        self.mac.0
    }

    fn mtu(&self) -> usize {
        1500
    }
}

/// Both sides of a TCP stream between guest stacks at 10.9.0.1 (sender)
/// and 10.9.0.2 (receiver); `local_port` tells successive streams apart.
pub fn stream_params(bytes: u64, local_port: u16) -> (StreamParams, StreamParams) {
    let side = |me: u8, peer: u8| StreamParams {
        net: NetConfig {
            address: std::net::Ipv4Addr::new(10, 9, 0, me),
            prefix_len: 24,
            gateway: None,
            seed: u64::from(me) * 7919,
        },
        peer: std::net::Ipv4Addr::new(10, 9, 0, peer),
        local_port,
        seed: 4242,
        bytes,
        stall_timeout: Duration::from_secs(30),
        ..StreamParams::default()
    };
    (side(1, 2), side(2, 1))
}

/// Runs one stream of `bytes` from `a` to `b`; returns the devices and the
/// two reports, failing unless both passed.
fn stream<D: FrameDevice + Send + 'static>(
    a: D,
    b: D,
    bytes: u64,
    local_port: u16,
) -> Result<(D, D, StreamReport), CliError> {
    let (pa, pb) = stream_params(bytes, local_port);
    let rx = thread::spawn(move || {
        let mut b = b;
        let r = run_stream(&mut b, StreamRole::Receiver, &pb);
        (b, r)
    });
    let tx = thread::spawn(move || {
        let mut a = a;
        let r = run_stream(&mut a, StreamRole::Sender, &pa);
        (a, r)
    });
    let tx = tx.join().map_err(|_| StreamPanicked("sender"));
    let rx = rx.join().map_err(|_| StreamPanicked("receiver"));
    let ((a, tr), (b, rr)) = (tx?, rx?);
    for r in [&tr, &rr] {
        if !r.passed() {
            return Err(format!("the stream failed: {:?}", r.failures).into());
        }
    }
    if tr.checksum != rr.checksum || rr.bytes != bytes {
        return Err("the stream arrived different from what was sent".into());
    }
    Ok((a, b, rr))
}

/// A calibration stream of 2 MiB, then one sized to last about `secs`.
fn tcp_rate<D: FrameDevice + Send + 'static>(a: D, b: D, secs: Duration) -> Result<Rate, CliError> {
    const MIB: f64 = (1u64 << 20) as f64;
    let (a, b, cal) = stream(a, b, 8 << 20, 50001)?;
    let bytes =
        (cal.throughput_mib_s * MIB * secs.as_secs_f64()).clamp(8.0 * MIB, 64.0 * 1024.0 * MIB);
    let (_, _, r) = stream(a, b, bytes as u64, 50002)?;
    let bytes_per_s = r.throughput_mib_s * MIB;
    if bytes_per_s <= 0.0 {
        return Err("the stream measured no throughput".into());
    }
    let secs = r.bytes as f64 / bytes_per_s;
    Ok(Rate {
        pps: r.phy.rx_frames as f64 / secs,
        gbps: bytes_per_s * 8.0 / 1e9,
        cpu_us: None,
    })
}

fn tcp_raw_cable(secs: Duration) -> Result<Rate, CliError> {
    let [ca, cb] = cable_pair(CableConfig::default())?;
    tcp_rate(
        RawWireDevice::new(ca, false, MAC_A),
        RawWireDevice::new(cb, false, MAC_B),
        secs,
    )
}

fn tcp_raw_tap(secs: Duration) -> Result<Rate, CliError> {
    let (tap, listener) = tap_with_listener()?;
    let dev = RawWireDevice::new(tap.queue_fds()[0].try_clone()?, true, MAC_A);
    tcp_to_linux_rate(dev, &listener, secs)
}

fn tcp_netif_tap(how: Backends, secs: Duration) -> Result<Rate, CliError> {
    let (tap, listener) = tap_with_listener()?;
    let a = guest(MAC_A)?;
    let wire = tap.queue_fds()[0].try_clone()?;
    let vif = BenchVif::start_as(&a, wire, WireType::Tap, (how.shadow, false, how.poll_us))?;
    let rate = tcp_to_linux_rate(a, &listener, secs);
    drop(vif);
    rate
}

/// Accepts one connection on `listener` (non-blocking) and reads it to the
/// end, checking every byte against the stream's pattern; returns the bytes
/// and their CRC, or fails on a mismatch.
fn linux_receiver(listener: &TcpListener, seed: u64) -> Result<(u64, u32), CliError> {
    let deadline = Instant::now() + LINUX_TIMEOUT;
    let mut conn = loop {
        match listener.accept() {
            Ok((conn, _)) => break conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err("the guest did not connect to the Linux listener".into());
                }
                thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e.into()),
        }
    };
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(LINUX_TIMEOUT))?;
    let mut verifier = StreamVerifier::new(seed);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = std::io::Read::read(&mut conn, &mut buf)?;
        if n == 0 {
            break;
        }
        verifier.feed(&buf[..n]);
    }
    if let Some(m) = verifier.first_mismatch() {
        return Err(format!("the Linux side read a corrupt stream: {m}").into());
    }
    Ok((verifier.bytes(), verifier.checksum()))
}

/// [`tcp_rate`] towards a Linux socket: the guest on `dev` sends, Linux
/// reads and checks; the rate is the sender's (acknowledged bytes).
fn tcp_to_linux_rate<D: FrameDevice + Send + 'static>(
    dev: D,
    listener: &TcpListener,
    secs: Duration,
) -> Result<Rate, CliError> {
    const MIB: f64 = (1u64 << 20) as f64;
    let one = |mut dev: D, bytes: u64, local_port: u16| -> Result<(D, StreamReport), CliError> {
        let (pa, _) = stream_params(bytes, local_port);
        let seed = pa.seed;
        let tx = thread::spawn(move || {
            let r = run_stream(&mut dev, StreamRole::Sender, &pa);
            (dev, r)
        });
        let linux = linux_receiver(listener, seed);
        let (dev, r) = tx.join().map_err(|_| StreamPanicked("sender"))?;
        let (got, crc) = linux?;
        if !r.passed() {
            return Err(format!("the stream failed: {:?}", r.failures).into());
        }
        if got != bytes || crc != r.checksum {
            return Err("the stream arrived different from what was sent".into());
        }
        Ok((dev, r))
    };
    let (dev, cal) = one(dev, 2 << 20, 50001)?;
    let bytes =
        (cal.throughput_mib_s * MIB * secs.as_secs_f64()).clamp(2.0 * MIB, 64.0 * 1024.0 * MIB);
    let (own0, kids0) = cpu_ns()?;
    let (_, r) = one(dev, bytes as u64, 50002)?;
    let (own1, kids1) = cpu_ns()?;
    let bytes_per_s = r.throughput_mib_s * MIB;
    if bytes_per_s <= 0.0 {
        return Err("the stream measured no throughput".into());
    }
    let secs = r.bytes as f64 / bytes_per_s;
    // The whole stream, its set-up and close included, per frame sent:
    // the sending stack, the Linux receiver and the kernel's TCP are in
    // every row alike.
    let frames = r.phy.tx_frames;
    Ok(Rate {
        pps: frames as f64 / secs,
        gbps: bytes_per_s * 8.0 / 1e9,
        cpu_us: (frames > 0).then(|| {
            let per_frame = |ns: u64| ns as f64 / 1e3 / frames as f64;
            let kids = kids_since(&kids1, &kids0);
            (per_frame(own1.saturating_sub(own0) + kids), per_frame(kids))
        }),
    })
}

fn tcp_netif_cable(how: Backends, secs: Duration) -> Result<Rate, CliError> {
    let (a, b, vifs) = polling_cable_vifs(how.shadow, false, how.poll_us)?;
    let rate = tcp_rate(a, b, secs);
    drop(vifs);
    rate
}

fn print_table(rows: &[Row], costs: &[ShadowCost], skipped: &[String], args: &NetBenchArgs) {
    outln!(
        "shadowback bench net — {:.1} s per row in {} slices (the paths of a frame size take turns); frames of 64 and 1514 bytes (\"1500\"), TCP = a verified stream between two guest stacks; backends' poll_us {}",
        args.seconds, args.rounds, args.poll_us
    );
    outln!();
    outln!(
        "{:<28} {:<5} {:>12} {:>9} {:>8} {:>12} {:>8}",
        "path",
        "frame",
        "pps",
        "Gbit/s",
        "vs raw",
        "CPU us/frame",
        "backend"
    );
    let mut last: Option<&str> = None;
    for r in rows {
        if last.is_some_and(|f| f != r.frame) {
            outln!();
        }
        last = Some(r.frame);
        let ratio = r.ratio.map_or("base".to_string(), |x| format!("{x:.2}"));
        let cpu = r
            .cpu_us_per_frame
            .map_or("-".to_string(), |c| format!("{c:.2}"));
        let backend = r
            .backend_cpu_us_per_frame
            .map_or("-".to_string(), |c| format!("{c:.2}"));
        outln!(
            "{:<28} {:<5} {:>12.0} {:>9.3} {:>8} {:>12} {:>8}",
            r.path,
            r.frame,
            r.pps,
            r.gbps,
            ratio,
            cpu,
            backend
        );
    }
    outln!();
    for c in costs {
        let means = rows
            .iter()
            .find(|r| r.path == c.path && r.frame == c.frame)
            .zip(
                rows.iter()
                    .find(|o| o.path == c.baseline && o.frame == c.frame),
            );
        let Some((r, o)) = means.filter(|(r, _)| r.pps > 0.0) else {
            continue;
        };
        let cpu = match (r.backend_cpu_us_per_frame, o.backend_cpu_us_per_frame) {
            (Some(w), Some(n)) if n > 0.0 => format!(
                "; backend CPU per frame {}",
                spread(&c.backend_cpu_cost, w / n - 1.0)
            ),
            _ => String::new(),
        };
        outln!(
            "shadow log cost, {} {}: pps {}{cpu}",
            c.path,
            c.frame,
            spread(&c.pps_cost, o.pps / r.pps - 1.0)
        );
    }
    outln!();
    outln!("notes:");
    outln!("  - `vs raw` = pps / the raw row of the same wire and frame (raw-cable: this process on both cable ends; raw-tap: this process writing the TAP fd).");
    outln!("  - TAP rows count frames arriving in the TAP's namespace (an AF_PACKET socket's kernel counter); cable rows count frames the far guest (or cable end) received.");
    outln!("  - Gbit/s: Ethernet frames without FCS; TCP: verified payload. Every process shares the same CPUs: compare ratios within one run.");
    outln!(
        "  - poll_us {}: {}",
        args.poll_us,
        if args.poll_us == 0 {
            "the backends sleep as soon as they find nothing to do (the default; `--poll-us N` to measure polling).".to_string()
        } else {
            format!("every backend polls its rings for {} µs after activity before sleeping, taking CPU from the rest (`netback --poll-us`; the vhost-user-net rows' nic has that `poll_us`).", args.poll_us)
        }
    );
    outln!("  - shadow log cost: what the row with the log costs against the same path without it (positive: the log costs): pps without / with − 1 and the backends' CPU per frame with / without − 1, computed per pair of slices of the same round (odd rounds take the paths in reverse order), then the median of the pairs, their range, and the same cost of the rows' means. Read the median: a slice disturbed by another job moves one pair, and the means with it.");
    outln!("  - CPU us/frame: CPU time of this process's threads and of the backend processes over the window, per frame counted (`backend`: the backends' part; TCP rows on the TAP: over the measured stream, per frame the guest sent, the Linux receiver included); other jobs on the machine change pps much more than this.");
    for s in skipped {
        outln!("  - skipped: {s}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_replaced_in_the_window_leaves_the_others_cpu_counted() {
        // Backend 1 died in the window after 100 ns, backend 3 replaced it;
        // backend 2 ran throughout. The sums' difference (110 - 150) is
        // nothing; per child: 2 ran 30 ns, 3 ran 30 ns.
        let then = HashMap::from([(1, 100), (2, 50)]);
        let now = HashMap::from([(2, 80), (3, 30)]);
        assert_eq!(kids_since(&now, &then), 60);
        assert_eq!(kids_since(&then, &then), 0);
    }

    fn rate(pps: f64, backend_us: Option<f64>) -> Rate {
        Rate {
            pps,
            gbps: 0.0,
            cpu_us: backend_us.map(|b| (b + 1.0, b)),
        }
    }

    #[test]
    fn the_shadow_cost_is_the_median_of_the_slices_pairs() {
        // Slice 2 was disturbed (the row with the log lost half its rate):
        // the ratio of the means says +35%, the pairs' median +5%.
        let with = [
            rate(95.0, Some(1.05)),
            rate(50.0, Some(2.0)),
            rate(100.0, None),
        ];
        let without = [
            rate(100.0, Some(1.0)),
            rate(100.0, Some(1.0)),
            rate(104.0, Some(1.0)),
        ];
        let c = ShadowCost::paired(
            NetPath::NetifTap,
            NetPath::NetifTapNoShadow,
            Frame::Mtu,
            &with,
            &without,
        );
        assert_eq!(
            (c.path, c.baseline, c.frame),
            ("netif-tap", "netif-tap-noshadow", "1500")
        );
        let pps: Vec<f64> = c.pps_cost.iter().map(|x| (x * 1e4).round() / 1e4).collect();
        assert_eq!(pps, [0.0526, 1.0, 0.04]);
        assert_eq!(c.pps_cost_median, Some(100.0 / 95.0 - 1.0));
        // The slice without CPU figures is left out, not counted as 0.
        let cpu: Vec<f64> = c
            .backend_cpu_cost
            .iter()
            .map(|x| (x * 1e4).round() / 1e4)
            .collect();
        assert_eq!(cpu, [0.05, 1.0]);
        assert!((c.backend_cpu_cost_median.unwrap() - 0.525).abs() < 1e-9);
        assert_eq!(
            spread(&c.pps_cost, 0.35),
            "+5.3% (median of 3 slice pairs, +4.0% to +100.0%; means +35.0%)"
        );
    }

    #[test]
    fn a_median_of_nothing_is_none() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(spread(&[], 0.01), "- (no slice pairs; means +1.0%)");
    }
}
