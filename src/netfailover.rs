//! `shadowback bench failover --class net`: what backend crashes cost a
//! TCP stream (docs/ARCHITECTURE.md §11.6).
//!
//! Two guest stacks run a verifying TCP stream (guest A sends, guest B
//! checks every byte) over netfront → netback → cable → netback →
//! netfront, while this process, in the supervisor's place, SIGKILLs
//! netback A and netback B in turn and hands each vif to a fresh instance
//! (`recover=1`). For every kill the gap is the time from the SIGKILL to
//! the next new stream data the receiver checked (a progress hook of the
//! receiver's workload); the next kill comes 30–130 ms after that. Streams
//! of `--stream-mib` follow one another until every kill is done, and no
//! kill lands in the last quarter of a stream, so each gap ends with data
//! of the same stream. Lost, duplicated and corrupt bytes
//! come from the receiver's verifier; a gap above
//! [`RTO_THRESHOLD`] is counted as a retransmission timeout (smoltcp does
//! not count its own; its minimum RTO is far above a crash's stall), and
//! listed with its steps (`long_gaps`): a slow reap or attach is the
//! machine, a wait after `attached` the guests. The ≈ 1 s ones seen before
//! the guest stack took frames in budgets of 16 were the receiver's one
//! ACK per burst, lost with the killed sender-side backend (ARCHITECTURE.md
//! §5, §11.6).
//! Every stall of the receiver over [`RTO_THRESHOLD`], with or without
//! a kill, is listed too (`stalls`), with what each direction of the cable
//! held meanwhile (sampled by [`CableWatch`]): a full A → B direction is
//! where a wire would drop frames (a netif backend holds its TX back
//! instead, ARCHITECTURE.md §11.5); a window's worth in it, the receiving
//! side late to read.
//!
//! `--mode hot` (the default) keeps a standby process per vif, started
//! before the kill (after the previous gap closed, so its start does not
//! compete with the replay for the CPUs), as the supervisor does; `--mode cold` starts the new
//! instance after the kill. What a gap is made of is reported per step
//! (`takeover_us`): the reap of the killed process, the start of the new
//! one (cold only), its `attach-net` (of which its own replay,
//! `replay-us`), and from its `attached` to the next new data (the guests
//! and the new instance getting the stream going again). The kill is
//! this process's own, so there is no detection step (the supervisor's
//! pidfd sees an exit at once, ARCHITECTURE.md §7.2).

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;
use shadowback_guest::net::{run_stream, ProgressHook, StreamReport, StreamRole};
use shadowback_guest::netfront::{NetFront, NetFrontStats};

use crate::faults::percentiles;
use crate::netbench::{cable_vifs, stream_params};
use crate::out::{errln, errout, outln};
use crate::CliError;

const MIB: u64 = 1 << 20;
/// A gap longer than this is a retransmission timeout: a segment was lost
/// with the killed instance and TCP waited for its timer.
const RTO_THRESHOLD: Duration = Duration::from_millis(200);
/// Longest wait for data after a kill before the kill counts as unmeasured.
const GAP_LIMIT: Duration = Duration::from_secs(20);

#[derive(Serialize, Default)]
struct Dist {
    p50: u64,
    p99: u64,
    max: u64,
}

#[derive(Serialize)]
struct NetFailoverReport {
    kills: u32,
    /// Stream bytes that never arrived.
    lost: u64,
    /// Stream bytes beyond a stream's length.
    duplicates: u64,
    /// Stream bytes that arrived different from what was sent.
    corrupt: u64,
    /// Per kill: SIGKILL to the next new data at the receiver.
    gap_us: Dist,
    /// Gaps longer than 200 ms.
    retransmission_timeouts: u64,
    /// Each of those gaps with its steps, to tell the machine (a slow reap
    /// or attach) from the guests waiting after `attached` (a TCP
    /// retransmission timeout, ≥ 1 s in smoltcp).
    long_gaps: Vec<LongGap>,
    /// The steps of the takeovers.
    takeover_us: Steps,
    /// `hot` or `cold`.
    mode: &'static str,
    /// Summed over the takeovers' `attached` replies: TX packets sent
    /// again, of which the dead instance may have sent one already, and
    /// frames it had taken from the cable and not delivered (TCP resends
    /// them, as after any loss).
    tx_replayed: u64,
    tx_maybe_duplicated: u64,
    rx_dropped_in_crash: u64,
    /// Kills after which no data came within 20 s (not in `gap_us`).
    unmeasured: u64,
    /// The longest stall either side saw in any stream, in µs.
    max_stall_us: u64,
    streams: u32,
    bytes: u64,
    /// Connections that reset or timed out (must be 0).
    failed_streams: u64,
    /// TX or RX responses the guests found answered twice or never asked for.
    bad_responses: u64,
    /// Every time the receiver checked no new data for longer than
    /// [`RTO_THRESHOLD`], inside a kill's gap or not, with what the cable
    /// held meanwhile.
    stalls: Vec<Stall>,
    /// What a cable end may hold unread (`SO_SNDBUF`, in the kernel's
    /// accounting: data and per-message overhead).
    cable_queue_bytes: u64,
}

/// A time the receiver checked no new data for longer than
/// [`RTO_THRESHOLD`].
#[derive(Serialize)]
struct Stall {
    /// From the start of the run.
    at_ms: u64,
    ms: u64,
    /// The kill (its number, from 1) that began the stall: its SIGKILL
    /// came within [`STALL_FROM_KILL`] of the receiver's last data before
    /// it; 0: none, the stall is outside every kill's gap.
    kill: u32,
    /// The kills whose SIGKILL fell in the stall: their number and when,
    /// from the stall's start.
    kills_in_ms: Vec<(u32, u64)>,
    /// The most each direction of the cable held unread during the stall
    /// and the 100 ms before it, in percent of `cable_queue_bytes`:
    /// A → B (the data) and B → A (the ACKs). Near 100 the sender's
    /// messages met a full queue.
    queued_max_pct: [u64; 2],
    /// The least each direction held during the stall: high in A → B,
    /// the receiving side read nothing for the whole stall.
    queued_min_pct: [u64; 2],
}

/// One gap longer than [`RTO_THRESHOLD`].
#[derive(Serialize)]
struct LongGap {
    /// The kill's number, from 1.
    kill: u32,
    /// 0 (A, the sender's) or 1 (B, the receiver's).
    vif: u32,
    gap_us: u64,
    reap_us: u64,
    attach_us: u64,
    /// `attached` to the next new data.
    first_data_us: u64,
    rx_dropped_in_crash: u64,
}

/// Per takeover step, its distribution.
#[derive(Serialize, Default)]
struct Steps {
    /// SIGKILL to the reaped exit.
    reap: Dist,
    /// Starting the new process (0 with a standby).
    spawn: Dist,
    /// `attach-net recover=1` to `attached`: the replay, and getting the
    /// message to the standby and its answer back.
    attach: Dist,
    /// Of `attach`, the instance's own replay (`replay-us` of `attached`).
    replay: Dist,
    /// `attached` to the next new data at the receiver: the guests and
    /// the new instance getting the stream going again.
    first_data: Dist,
}

impl Dist {
    fn of(samples: &[u64]) -> Dist {
        let (p50, p99, max) = percentiles(samples);
        Dist { p50, p99, max }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// What the receiver's progress hook shares with the killing loop.
#[derive(Default)]
struct Probe {
    offset: u64,
    kill_at: Option<Instant>,
    first_after: Option<Instant>,
}

pub fn run(kills: u32, stream_mib: u64, hot: bool, json: bool) -> Result<ExitCode, CliError> {
    if !(1..=1 << 20).contains(&stream_mib) {
        return Err("--stream-mib must be within 1..=1048576".into());
    }
    let stream_bytes = stream_mib * MIB;
    // No kill once the receiver is this close to the end of a stream.
    let quiet_tail = stream_bytes / 4;
    let (mut a, mut b, mut vifs) = cable_vifs(true, hot)?;
    let probe = Arc::new(Mutex::new(Probe::default()));
    let mut rng = 0x2545_f491_4f6c_dd1du64 ^ u64::from(std::process::id());
    let mut gaps: Vec<u64> = Vec::new();
    let mut steps: [Vec<u64>; 4] = Default::default();
    let mut first_data: Vec<u64> = Vec::new();
    let mut report = NetFailoverReport {
        kills: 0,
        lost: 0,
        duplicates: 0,
        corrupt: 0,
        gap_us: Dist::default(),
        retransmission_timeouts: 0,
        long_gaps: Vec::new(),
        takeover_us: Steps::default(),
        mode: if hot { "hot" } else { "cold" },
        tx_replayed: 0,
        tx_maybe_duplicated: 0,
        rx_dropped_in_crash: 0,
        unmeasured: 0,
        max_stall_us: 0,
        streams: 0,
        bytes: 0,
        failed_streams: 0,
        bad_responses: 0,
        stalls: Vec::new(),
        cable_queue_bytes: 0,
    };
    let started = Instant::now();
    let progress = Arc::new(AtomicU64::new(0));
    let watch = CableWatch::start(
        [
            vifs[0].wire().try_clone_to_owned()?,
            vifs[1].wire().try_clone_to_owned()?,
        ],
        progress.clone(),
    )?;
    report.cable_queue_bytes = watch.queue_bytes;
    let mut kill_times: Vec<Instant> = Vec::new();
    // Streams in a row that ended before a kill could land in them.
    let mut idle_streams = 0u32;
    while report.kills < kills {
        if idle_streams == 3 {
            return Err("three streams ended before a kill could land: raise --stream-mib".into());
        }
        let kills_before = report.kills;
        let local_port = 50000 + (report.streams % 10000) as u16;
        let (pa, mut pb) = stream_params(stream_bytes, local_port);
        *probe.lock().map_err(|_| "probe poisoned")? = Probe::default();
        let hook_probe = probe.clone();
        let hook_progress = progress.clone();
        pb.on_progress = Some(ProgressHook::new(move |now, offset| {
            hook_progress.fetch_add(1, Ordering::Relaxed);
            let Ok(mut p) = hook_probe.lock() else { return };
            p.offset = offset;
            if p.first_after.is_none() && p.kill_at.is_some_and(|k| now >= k) {
                p.first_after = Some(now);
            }
        }));
        let done = Arc::new(AtomicBool::new(false));
        let side = |front: NetFront, role, p, done: Arc<AtomicBool>| {
            thread::spawn(move || -> (NetFront, StreamReport) {
                let mut front = front;
                let r = run_stream(&mut front, role, &p);
                done.store(true, Ordering::Release);
                (front, r)
            })
        };
        let rx = side(b, StreamRole::Receiver, pb, done.clone());
        let tx = side(a, StreamRole::Sender, pa, done.clone());
        let mut kill_error = None;
        while report.kills < kills {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            thread::sleep(Duration::from_millis(30 + rng % 100));
            let offset = probe.lock().map_err(|_| "probe poisoned")?.offset;
            if done.load(Ordering::Acquire) || offset + quiet_tail > stream_bytes {
                break;
            }
            {
                let mut p = probe.lock().map_err(|_| "probe poisoned")?;
                p.kill_at = Some(Instant::now());
                p.first_after = None;
            }
            let kill_at = Instant::now();
            kill_times.push(kill_at);
            let vif = report.kills % 2;
            let t = match vifs[vif as usize].kill_and_replace() {
                Ok(t) => t,
                Err(e) => {
                    kill_error = Some(e);
                    break;
                }
            };
            report.tx_replayed += t.counts.tx_replayed;
            report.tx_maybe_duplicated += t.counts.tx_maybe_duplicated;
            report.rx_dropped_in_crash += t.counts.rx_dropped_in_crash;
            for (s, d) in steps
                .iter_mut()
                .zip([t.reap, t.spawn, t.attach, t.counts.replay])
            {
                s.push(micros(d));
            }
            let attached_at = kill_at + t.reap + t.spawn + t.attach;
            report.kills += 1;
            let gap = loop {
                let p = probe.lock().map_err(|_| "probe poisoned")?;
                if let (Some(k), Some(t)) = (p.kill_at, p.first_after) {
                    first_data.push(micros(t.saturating_duration_since(attached_at)));
                    break Some(t.saturating_duration_since(k));
                }
                drop(p);
                if done.load(Ordering::Acquire) || kill_at.elapsed() > GAP_LIMIT {
                    break None;
                }
                thread::sleep(Duration::from_micros(200));
            };
            match gap {
                Some(g) => {
                    if g > RTO_THRESHOLD {
                        report.retransmission_timeouts += 1;
                        report.long_gaps.push(LongGap {
                            kill: report.kills,
                            vif,
                            gap_us: micros(g),
                            reap_us: micros(t.reap),
                            attach_us: micros(t.spawn + t.attach),
                            first_data_us: first_data.last().copied().unwrap_or_default(),
                            rx_dropped_in_crash: t.counts.rx_dropped_in_crash,
                        });
                    }
                    gaps.push(micros(g));
                }
                None => report.unmeasured += 1,
            }
            for v in &mut vifs {
                v.refill_standby()?;
            }
            if !json && report.kills.is_multiple_of(10) {
                errout!(
                    "\r  {} kills in {:.1} s   ",
                    report.kills,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        if let Some(e) = kill_error {
            // The stream cannot end without a backend: stop it by killing
            // both, then report the error.
            for v in &mut vifs {
                v.kill();
            }
            let _ = (tx.join(), rx.join());
            return Err(e);
        }
        idle_streams = if report.kills == kills_before {
            idle_streams + 1
        } else {
            0
        };
        let (front_a, tr) = tx.join().map_err(|_| "the sender panicked")?;
        let (front_b, rr) = rx.join().map_err(|_| "the receiver panicked")?;
        report.streams += 1;
        report.bytes += rr.bytes;
        report.lost += stream_bytes.saturating_sub(rr.bytes);
        report.duplicates += rr.bytes.saturating_sub(stream_bytes);
        report.corrupt += rr.mismatched_bytes;
        if rr.checksum != tr.checksum && rr.mismatched_bytes == 0 && rr.bytes == stream_bytes {
            // Cannot happen with a position-checked stream; never hide it.
            report.corrupt += 1;
        }
        report.failed_streams += tr.resets + tr.timeouts + rr.resets + rr.timeouts;
        let stall = tr.max_gap_ms.max(rr.max_gap_ms) * 1e3;
        report.max_stall_us = report.max_stall_us.max(stall as u64);
        report.bad_responses += bad(&front_a.stats()) + bad(&front_b.stats());
        let passed = tr.passed() && rr.passed();
        if !passed && !json {
            errln!(
                "\n  stream {} failed: {:?} {:?}",
                report.streams,
                tr.failures,
                rr.failures
            );
        }
        (a, b) = (front_a, front_b);
    }
    report.stalls = watch.stalls(started, &kill_times)?;
    report.gap_us = Dist::of(&gaps);
    let [reap, spawn, attach, replay] = &steps;
    report.takeover_us = Steps {
        reap: Dist::of(reap),
        spawn: Dist::of(spawn),
        attach: Dist::of(attach),
        replay: Dist::of(replay),
        first_data: Dist::of(&first_data),
    };
    let clean = report.lost == 0
        && report.duplicates == 0
        && report.corrupt == 0
        && report.failed_streams == 0
        && report.bad_responses == 0;
    if json {
        outln!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report, gaps.len(), started.elapsed());
    }
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn bad(s: &NetFrontStats) -> u64 {
    s.tx_bad_responses + s.rx_bad_responses
}

fn print_report(r: &NetFailoverReport, measured: usize, took: Duration) {
    outln!();
    outln!(
        "shadowback bench failover --class net — a TCP stream between two vifs on a cable, netback A and B SIGKILLed in turn ({} standby)",
        r.mode
    );
    outln!(
        "  {} kills in {:.1} s over {} streams ({} MiB verified)",
        r.kills,
        took.as_secs_f64(),
        r.streams,
        r.bytes / MIB
    );
    outln!(
        "  lost {} B, duplicated {} B, corrupt {} B, failed streams {}, bad ring responses {}",
        r.lost,
        r.duplicates,
        r.corrupt,
        r.failed_streams,
        r.bad_responses
    );
    outln!(
        "  gap (kill → next new data at the receiver)   p50 {} us, p99 {} us, max {} us   ({measured} kills measured, {} not)",
        r.gap_us.p50, r.gap_us.p99, r.gap_us.max, r.unmeasured
    );
    outln!(
        "  TX packets replayed {} (maybe duplicated {}), RX frames dropped in a crash {}",
        r.tx_replayed,
        r.tx_maybe_duplicated,
        r.rx_dropped_in_crash
    );
    let t = &r.takeover_us;
    outln!(
        "  gap steps p50/p99 in us: reap {}/{}, start {}/{}, attach {}/{} (of which replay {}/{}), attached → first new data {}/{}",
        t.reap.p50,
        t.reap.p99,
        t.spawn.p50,
        t.spawn.p99,
        t.attach.p50,
        t.attach.p99,
        t.replay.p50,
        t.replay.p99,
        t.first_data.p50,
        t.first_data.p99
    );
    outln!(
        "  retransmission timeouts (gaps > 200 ms): {}; longest stall either side saw: {} us",
        r.retransmission_timeouts,
        r.max_stall_us
    );
    for g in &r.long_gaps {
        outln!(
            "    kill {} (vif {}): gap {} us; reap {}, start and attach {}, attached → first new data {} us; RX frames dropped in that crash {}",
            g.kill,
            ["A", "B"][g.vif as usize & 1],
            g.gap_us,
            g.reap_us,
            g.attach_us,
            g.first_data_us,
            g.rx_dropped_in_crash
        );
    }
    for s in &r.stalls {
        let mut kill = match s.kill {
            0 => "outside every kill's gap".to_string(),
            k => format!("in kill {k}'s gap"),
        };
        for (k, at) in s.kills_in_ms.iter().filter(|(k, _)| *k != s.kill) {
            kill += &format!(", kill {k} at +{at} ms");
        }
        outln!(
            "    stall at {} ms: {} ms, {kill}; cable held {}–{}% (A → B), {}–{}% (B → A) of its {} B",
            s.at_ms,
            s.ms,
            s.queued_min_pct[0],
            s.queued_max_pct[0],
            s.queued_min_pct[1],
            s.queued_max_pct[1],
            r.cable_queue_bytes
        );
    }
}

/// One look at the cable and the receiver.
#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    /// The receiver's progress calls so far.
    progress: u64,
    /// Bytes each end has sent that the other has not read (`SIOCOUTQ`).
    queued: [u64; 2],
}

/// Samples, every millisecond or so, what each end of the cable holds
/// unread and whether the receiver moves, to place every stall and tell
/// a full cable (its sender's messages dropped) from one nobody fed.
struct CableWatch {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<Vec<Sample>>>,
    queue_bytes: u64,
}

/// A stall began with a kill if the SIGKILL came this soon after the
/// receiver's last data (or up to 5 ms before it: the data was in flight).
const STALL_FROM_KILL: Duration = Duration::from_millis(20);

/// How often [`CableWatch`] samples.
const WATCH_EVERY: Duration = Duration::from_millis(1);

impl CableWatch {
    fn start(ends: [OwnedFd; 2], progress: Arc<AtomicU64>) -> Result<Self, CliError> {
        let queue_bytes =
            nix::sys::socket::getsockopt(&ends[0], nix::sys::socket::sockopt::SndBuf)? as u64;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut samples = Vec::with_capacity(1 << 14);
                while !stop.load(Ordering::Relaxed) {
                    samples.push(Sample {
                        at: Instant::now(),
                        progress: progress.load(Ordering::Relaxed),
                        queued: [outq(&ends[0]), outq(&ends[1])],
                    });
                    thread::sleep(WATCH_EVERY);
                }
                samples
            })
        };
        Ok(CableWatch {
            stop,
            thread: Some(thread),
            queue_bytes,
        })
    }

    /// Stops sampling and lists the stalls longer than [`RTO_THRESHOLD`]:
    /// stretches of samples in which the receiver did not move.
    fn stalls(mut self, started: Instant, kills: &[Instant]) -> Result<Vec<Stall>, CliError> {
        self.stop.store(true, Ordering::Relaxed);
        let samples = self
            .thread
            .take()
            .map(thread::JoinHandle::join)
            .transpose()
            .map_err(|_| "the cable watcher panicked")?
            .unwrap_or_default();
        let mut stalls = Vec::new();
        let mut from = 0;
        for i in 1..=samples.len() {
            if i < samples.len() && samples[i].progress == samples[from].progress {
                continue;
            }
            let (s, e) = (&samples[from], &samples[i - 1]);
            let took = e.at - s.at;
            if took > RTO_THRESHOLD {
                // The window the kill's SIGKILL may fall in: a kill just
                // before the stall's first sample caused it too.
                let lead = s.at.checked_sub(Duration::from_millis(100)).unwrap_or(s.at);
                let early = s.at.checked_sub(WATCH_EVERY * 5).unwrap_or(s.at);
                let kill = kills
                    .iter()
                    .position(|&k| k >= early && k <= s.at + STALL_FROM_KILL)
                    .map_or(0, |n| n as u32 + 1);
                let kills_in_ms = (1..)
                    .zip(kills)
                    .filter(|(_, &k)| k >= early && k <= e.at)
                    .map(|(n, &k)| (n, micros(k.saturating_duration_since(s.at)) / 1000))
                    .collect();
                let mut max = [0u64; 2];
                let mut min = [u64::MAX; 2];
                for x in samples.iter().filter(|x| x.at >= lead && x.at <= e.at) {
                    for d in 0..2 {
                        max[d] = max[d].max(x.queued[d]);
                        if x.at >= s.at {
                            min[d] = min[d].min(x.queued[d]);
                        }
                    }
                }
                let pct = |b: u64| b * 100 / self.queue_bytes.max(1);
                stalls.push(Stall {
                    at_ms: micros(s.at.saturating_duration_since(started)) / 1000,
                    ms: micros(took) / 1000,
                    kill,
                    kills_in_ms,
                    queued_max_pct: [pct(max[0]), pct(max[1])],
                    queued_min_pct: [pct(min[0]), pct(min[1])],
                });
            }
            from = i;
        }
        Ok(stalls)
    }
}

impl Drop for CableWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The bytes `end` has sent and its peer not yet read (`SIOCOUTQ` of a
/// unix socket: what its queued messages are charged); 0 if unknown.
#[allow(unsafe_code, reason = "ioctl(2) SIOCOUTQ")]
fn outq(end: &OwnedFd) -> u64 {
    let mut n: libc::c_int = 0;
    // SAFETY: `end` is an open socket and `n` an int the ioctl writes.
    let r = unsafe { libc::ioctl(end.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if r < 0 {
        0
    } else {
        n.max(0) as u64
    }
}
