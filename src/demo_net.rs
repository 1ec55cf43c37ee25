//! The network half of `shadowback demo`: two vifs on a cable, a guest on
//! each (netfront and the userspace TCP/IP stack), and one verified TCP
//! stream from guest A to guest B while the disk's faults are injected
//! into both vifs' backends too.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::Serialize;
use shadowback_guest::net::{run_stream, ProgressHook, StreamParams, StreamReport, StreamRole};
use shadowback_guest::netfront::{NetFront, NetFrontConfig, NetFrontStats};
use shadowback_supervisor::NicConfig;

use crate::faults::{self, FaultSpec, Injected, Injector};
use crate::guest_cmd::monotonic_ns;
use crate::out::outln;
use crate::CliError;

/// The two vifs of the demo's cable: guest A sends, guest B receives.
pub const VIF_A: &str = "vifa";
pub const VIF_B: &str = "vifb";
const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);
const PORT: u16 = 5001;
/// No progress for this long fails the stream (a reset or a lost
/// connection, not a stall a recovery causes).
const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The `[[nic]]`s of the demo: a cable between [`VIF_A`] and [`VIF_B`].
pub fn nics() -> Vec<NicConfig> {
    vec![
        NicConfig::cable(VIF_A, VIF_B),
        NicConfig::cable(VIF_B, VIF_A),
    ]
}

/// What the network pair did.
pub struct NetOutcome {
    pub sender: StreamReport,
    pub receiver: StreamReport,
    pub sender_front: NetFrontStats,
    pub receiver_front: NetFrontStats,
    /// Faults injected into either vif, in time order.
    pub faults: Vec<Injected>,
    /// CLOCK_MONOTONIC ns of every advance of the receiver's stream.
    pub stamps: Vec<u64>,
}

/// The stream running on its own thread.
pub struct NetPair {
    thread: JoinHandle<Result<NetOutcome, String>>,
}

impl NetPair {
    /// Attaches both guests through the supervisor at `socket` and starts
    /// a stream of `bytes`; `specs` are injected into both vifs until the
    /// stream ends.
    pub fn start(
        socket: &Path,
        bytes: u64,
        seed: u64,
        specs: &[FaultSpec],
    ) -> Result<Self, CliError> {
        let receiver = NetFront::attach(socket, &NetFrontConfig::new(VIF_B))?;
        let sender = NetFront::attach(socket, &NetFrontConfig::new(VIF_A))?;
        let stamps = Arc::new(Mutex::new(Vec::new()));
        let hook = {
            let stamps = stamps.clone();
            // Instant is CLOCK_MONOTONIC on Linux: one anchor converts.
            let (anchor, anchor_ns) = (Instant::now(), monotonic_ns());
            ProgressHook::new(move |at: Instant, _offset| {
                let ns = anchor_ns + at.saturating_duration_since(anchor).as_nanos() as u64;
                if let Ok(mut s) = stamps.lock() {
                    s.push(ns);
                }
            })
        };
        let params = |address, peer| StreamParams {
            port: PORT,
            seed,
            bytes,
            stall_timeout: STALL_TIMEOUT,
            ..StreamParams::between(address, peer)
        };
        let rx_params = StreamParams {
            on_progress: Some(hook),
            ..params(ADDR_B, ADDR_A)
        };
        let tx_params = params(ADDR_A, ADDR_B);
        let injectors: Vec<Injector> = if specs.is_empty() {
            Vec::new()
        } else {
            [VIF_A, VIF_B]
                .into_iter()
                .map(|vif| Injector::start(socket.to_path_buf(), vif.into(), specs.to_vec()))
                .collect()
        };
        let thread = thread::spawn(move || {
            let side = |mut front: NetFront, role, p: StreamParams| {
                thread::spawn(move || {
                    let report = run_stream(&mut front, role, &p);
                    (report, front)
                })
            };
            let rx = side(receiver, StreamRole::Receiver, rx_params);
            let tx = side(sender, StreamRole::Sender, tx_params);
            let (sender, sender_front) = tx.join().map_err(|_| "the sending guest panicked")?;
            let (receiver, receiver_front) =
                rx.join().map_err(|_| "the receiving guest panicked")?;
            // Faults stop with the stream; the guests detach from live
            // backends.
            let mut faults: Vec<Injected> =
                injectors.into_iter().flat_map(Injector::finish).collect();
            faults.sort_by_key(|f| f.at_ns);
            let outcome = NetOutcome {
                sender,
                receiver,
                sender_front: sender_front.stats(),
                receiver_front: receiver_front.stats(),
                faults,
                stamps: std::mem::take(&mut *stamps.lock().map_err(|_| "stamps poisoned")?),
            };
            for front in [sender_front, receiver_front] {
                front.detach().map_err(|e| e.to_string())?;
            }
            Ok(outcome)
        });
        Ok(NetPair { thread })
    }

    /// Waits for the stream to end.
    pub fn finish(self) -> Result<NetOutcome, CliError> {
        Ok(self
            .thread
            .join()
            .map_err(|_| "the network pair panicked")??)
    }
}

/// The network pair's part of the demo's JSON report.
#[derive(Serialize)]
pub struct NetReport {
    pub bytes: u64,
    pub mib_per_s: f64,
    /// The receiver checked every byte and both ends' CRC-32 agree.
    pub verified: bool,
    pub resets: u64,
    pub failures: Vec<String>,
    /// Longest time the receiver saw no new data.
    pub max_gap_ms: f64,
    /// TX or RX responses a guest found answered twice or for nothing.
    pub bad_responses: u64,
    pub faults: usize,
    pub crashes: u64,
    pub hangs: u64,
    pub recoveries: u64,
    pub tx_replayed: u64,
    pub tx_maybe_duplicated: u64,
    pub rx_buffers_recovered: u64,
    pub rx_dropped_in_crash: u64,
    /// From the receiver's last advance before a fault to its first after.
    pub stall_us: crate::demo::StallUs,
    pub plot: Option<PathBuf>,
}

impl NetReport {
    /// Sums the vifs' `status` counters (`count(key)`, both vifs) over
    /// the outcome; writes the timeline next to `disk_plot`.
    pub fn new(o: &NetOutcome, count: impl Fn(&str) -> u64, disk_plot: &Path) -> Self {
        let (p50, p99, max) = faults::percentiles(&faults::stalls_us(&o.faults, &o.stamps));
        let plot = (!o.faults.is_empty())
            .then(|| net_plot_path(disk_plot))
            .filter(|p| faults::write_timeline_svg(p, &o.stamps, &o.faults).is_ok());
        let mut failures = o.sender.failures.clone();
        failures.extend(o.receiver.failures.iter().cloned());
        NetReport {
            bytes: o.receiver.bytes,
            mib_per_s: o.receiver.throughput_mib_s,
            verified: o.sender.passed()
                && o.receiver.passed()
                && o.sender.checksum == o.receiver.checksum
                && o.receiver.first_mismatch.is_none(),
            resets: o.sender.resets + o.receiver.resets,
            failures,
            max_gap_ms: o.receiver.max_gap_ms,
            bad_responses: o.sender_front.tx_bad_responses
                + o.sender_front.rx_bad_responses
                + o.receiver_front.tx_bad_responses
                + o.receiver_front.rx_bad_responses,
            faults: o.faults.len(),
            crashes: count("crashes"),
            hangs: count("hangs"),
            recoveries: count("recoveries"),
            tx_replayed: count("tx-replayed"),
            tx_maybe_duplicated: count("tx-maybe-duplicated"),
            rx_buffers_recovered: count("rx-buffers-recovered"),
            rx_dropped_in_crash: count("rx-dropped-in-crash"),
            stall_us: crate::demo::StallUs { p50, p99, max },
            plot,
        }
    }

    pub fn passed(&self) -> bool {
        self.verified && self.resets == 0 && self.bad_responses == 0
    }

    /// The text report's lines for the network pair.
    pub fn print(&self, faults: &[Injected]) {
        outln!("network pair ({VIF_A} -> cable -> {VIF_B}, one TCP stream)");
        outln!(
            "  stream            {:>10}  bytes verified, {:.1} MiB/s, CRC-32 {}",
            self.bytes,
            self.mib_per_s,
            if self.verified { "match" } else { "MISMATCH" }
        );
        outln!(
            "  resets            {:>10}  (answered twice / never asked: {})",
            self.resets,
            self.bad_responses
        );
        outln!("  longest gap       {:>10.1}  ms", self.max_gap_ms);
        for f in &self.failures {
            outln!("    ! {f}");
        }
        if faults.is_empty() {
            return;
        }
        faults::print_recovery_head(
            "recovery (both vifs)",
            faults,
            [self.crashes, self.hangs, self.recoveries],
        );
        outln!(
            "  TX replayed       {:>10}  packets sent again ({} recoveries may have sent one twice)",
            self.tx_replayed, self.tx_maybe_duplicated
        );
        outln!(
            "  RX recovered      {:>10}  posted buffers handed over; {} frames dropped in a crash",
            self.rx_buffers_recovered,
            self.rx_dropped_in_crash
        );
        outln!(
            "  stream stall per fault: p50 {} us, p99 {} us, max {} us",
            self.stall_us.p50,
            self.stall_us.p99,
            self.stall_us.max
        );
        if let Some(p) = &self.plot {
            outln!("  timeline plot     {}", p.display());
        }
    }
}

/// `demo-timeline.svg` → `demo-timeline-net.svg`.
fn net_plot_path(disk_plot: &Path) -> PathBuf {
    let stem = disk_plot
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "shadowback-demo-timeline".into());
    disk_plot.with_file_name(format!("{stem}-net.svg"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_net_plot_sits_next_to_the_disk_plot() {
        assert_eq!(
            net_plot_path(Path::new("/x/demo.svg")),
            Path::new("/x/demo-net.svg")
        );
        assert_eq!(
            net_plot_path(Path::new("timeline.svg")),
            Path::new("timeline-net.svg")
        );
    }
}
