//! Fault injection and stall measurement for `demo --faults` and
//! `bench failover`.
//!
//! Faults are sent as `fault` messages on the supervisor's control socket,
//! so they exercise the same path as `shadowback fault`. Times are
//! CLOCK_MONOTONIC nanoseconds, shared by every process on the host, so the
//! guest's completion stamps and the injector's fault times can be compared.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use shadowback_xenbus::{Message, SeqPacket};

use crate::guest_cmd::monotonic_ns;
use crate::out::outln;
use crate::CliError;

/// What to inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// SIGKILL the backend.
    Kill,
    /// SIGSTOP the backend (the watchdog replaces it).
    Hang,
}

impl FaultKind {
    fn action(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Hang => "hang",
        }
    }
}

/// One periodic fault: `kill:every=200ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultSpec {
    pub kind: FaultKind,
    pub every: Duration,
}

/// Parses `kill:every=200ms,hang:every=3s`.
pub fn parse_faults(text: &str) -> Result<Vec<FaultSpec>, String> {
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|item| {
            let (kind, rest) = item
                .trim()
                .split_once(':')
                .ok_or_else(|| format!("{item:?}: expected ACTION:every=DURATION"))?;
            let kind = match kind {
                "kill" => FaultKind::Kill,
                "hang" => FaultKind::Hang,
                other => return Err(format!("unknown fault {other:?} (kill or hang)")),
            };
            let every = rest
                .strip_prefix("every=")
                .ok_or_else(|| format!("{item:?}: expected every=DURATION"))?;
            let every = parse_duration(every)?;
            if every < Duration::from_millis(1) {
                return Err(format!("{item:?}: period below 1 ms"));
            }
            Ok(FaultSpec { kind, every })
        })
        .collect()
}

/// `250ms`, `3s`, `1.5s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (num, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else {
        return Err(format!("{text:?}: use a unit, ms or s"));
    };
    let value: f64 = num.parse().map_err(|_| format!("{text:?}: not a number"))?;
    if !(value.is_finite() && value >= 0.0) {
        return Err(format!("{text:?}: not a duration"));
    }
    Ok(Duration::from_secs_f64(value * scale))
}

/// A fault that was injected.
#[derive(Clone, Copy, Debug)]
pub struct Injected {
    pub kind: FaultKind,
    /// CLOCK_MONOTONIC ns when the supervisor acknowledged it.
    pub at_ns: u64,
}

/// Sends one `fault` and waits for the supervisor's answer.
pub fn inject(socket: &Path, device: &str, kind: FaultKind) -> Result<u64, CliError> {
    let sock = SeqPacket::connect(socket)?;
    let msg = Message::new("fault")
        .with("device", device)
        .with("action", kind.action());
    let before = monotonic_ns();
    sock.send(&msg, &[])?;
    let (reply, _) = sock
        .recv_timeout(Duration::from_secs(10))?
        .ok_or("no answer to fault")?;
    if reply.kind() == "error" {
        return Err(format!("fault refused: {}", reply.get("message").unwrap_or("?")).into());
    }
    Ok(before)
}

/// Injects faults on a thread until stopped.
pub struct Injector {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Injected>>>,
}

impl Injector {
    pub fn start(socket: PathBuf, device: String, specs: Vec<FaultSpec>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let start = std::time::Instant::now();
            // Stagger the schedules so that faults of different kinds never
            // fire at the same instant (a hang sent to an instance being
            // killed would be lost).
            let mut next: Vec<Duration> = specs
                .iter()
                .enumerate()
                .map(|(i, s)| s.every + Duration::from_millis(37 * i as u64))
                .collect();
            let mut done = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let Some((i, due)) = next.iter().copied().enumerate().min_by_key(|(_, d)| *d)
                else {
                    break;
                };
                let now = start.elapsed();
                if due > now {
                    std::thread::sleep((due - now).min(Duration::from_millis(5)));
                    continue;
                }
                next[i] += specs[i].every;
                match inject(&socket, &device, specs[i].kind) {
                    Ok(at_ns) => done.push(Injected {
                        kind: specs[i].kind,
                        at_ns,
                    }),
                    Err(e) => tracing::warn!(error = %e, "fault injection failed"),
                }
            }
            done
        });
        Injector {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops injecting; returns what was injected.
    pub fn finish(mut self) -> Vec<Injected> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

/// The first lines of a report's recovery table: what was injected and
/// what the supervisor counted.
pub fn print_recovery_head(title: &str, injected: &[Injected], counted: [u64; 3]) {
    let [crashes, hangs, recoveries] = counted;
    let kills = injected
        .iter()
        .filter(|f| f.kind == FaultKind::Kill)
        .count();
    outln!("{title}");
    outln!(
        "  faults injected   {:>10}  ({kills} kills, {} hangs)",
        injected.len(),
        injected.len() - kills
    );
    outln!("  crashes / hangs   {:>10} / {hangs}", crashes);
    outln!("  recoveries        {:>10}", recoveries);
}

/// Reads the guest's completion stamps (u64 LE ns).
pub fn read_stamps(path: &Path) -> Result<Vec<u64>, CliError> {
    let bytes = std::fs::read(path)?;
    Ok(bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
}

/// The guest-visible stall of each fault: from the last completion before
/// it to the first completion after it, in µs. Faults with no completion
/// on either side (e.g. after the workload ended) are skipped. `stamps`
/// must be sorted.
pub fn stalls_us(faults: &[Injected], stamps: &[u64]) -> Vec<u64> {
    faults
        .iter()
        .filter_map(|f| {
            let after = stamps.partition_point(|&s| s <= f.at_ns);
            let before = after.checked_sub(1)?;
            let next = *stamps.get(after)?;
            Some((next - stamps[before]) / 1000)
        })
        .collect()
}

/// p50 / p99 / max of a sample (0s when empty).
pub fn percentiles(values: &[u64]) -> (u64, u64, u64) {
    if values.is_empty() {
        return (0, 0, 0);
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    (at(0.5), at(0.99), v[v.len() - 1])
}

/// Writes an SVG timeline: completions per 10 ms, with a red line at each
/// kill, an orange one at each hang, and a green tick where completions
/// resumed after it.
pub fn write_timeline_svg(
    path: &Path,
    stamps: &[u64],
    faults: &[Injected],
) -> Result<(), CliError> {
    const BUCKET_NS: u64 = 10_000_000;
    let (Some(&first), Some(&last)) = (stamps.first(), stamps.last()) else {
        return Err("no completions to plot".into());
    };
    let buckets = ((last - first) / BUCKET_NS + 1) as usize;
    let mut counts = vec![0u32; buckets];
    for &s in stamps {
        counts[((s - first) / BUCKET_NS) as usize] += 1;
    }
    let (w, h, pad) = (1200.0f64, 300.0f64, 40.0f64);
    let max = f64::from(*counts.iter().max().unwrap_or(&1)).max(1.0);
    let x = |i: f64| pad + i / buckets as f64 * (w - 2.0 * pad);
    let y = |c: f64| h - pad - c / max * (h - 2.0 * pad);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{pad}\" y=\"20\">completions per 10 ms ({} total, {} faults; red = kill, orange = hang, green = first completion after)</text>\n\
         <line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{pad}\" y=\"{}\">0 s</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.2} s</text>\n\
         <text x=\"5\" y=\"{}\">{}</text>\n",
        stamps.len(),
        faults.len(),
        h - pad,
        w - pad,
        h - pad,
        h - pad + 15.0,
        w - pad,
        h - pad + 15.0,
        (last - first) as f64 / 1e9,
        pad + 4.0,
        max
    );
    let points: Vec<String> = counts
        .iter()
        .enumerate()
        .map(|(i, &c)| format!("{:.1},{:.1}", x(i as f64 + 0.5), y(f64::from(c))))
        .collect();
    svg.push_str(&format!(
        "<polyline fill=\"none\" stroke=\"steelblue\" stroke-width=\"1\" points=\"{}\"/>\n",
        points.join(" ")
    ));
    for f in faults {
        if f.at_ns < first || f.at_ns > last {
            continue;
        }
        let fx = x((f.at_ns - first) as f64 / BUCKET_NS as f64);
        let colour = match f.kind {
            FaultKind::Kill => "red",
            FaultKind::Hang => "orange",
        };
        svg.push_str(&format!(
            "<line x1=\"{fx:.1}\" y1=\"{pad}\" x2=\"{fx:.1}\" y2=\"{}\" stroke=\"{colour}\" stroke-width=\"0.7\" opacity=\"0.7\"/>\n",
            h - pad
        ));
        let after = stamps.partition_point(|&s| s <= f.at_ns);
        if let Some(&next) = stamps.get(after) {
            let rx = x((next - first) as f64 / BUCKET_NS as f64);
            svg.push_str(&format!(
                "<line x1=\"{rx:.1}\" y1=\"{}\" x2=\"{rx:.1}\" y2=\"{}\" stroke=\"green\" stroke-width=\"1\"/>\n",
                h - pad,
                h - pad + 6.0
            ));
        }
    }
    svg.push_str("</svg>\n");
    std::fs::write(path, svg)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_specs_parse() {
        let specs = parse_faults("kill:every=200ms,hang:every=3s").unwrap();
        assert_eq!(
            specs,
            vec![
                FaultSpec {
                    kind: FaultKind::Kill,
                    every: Duration::from_millis(200)
                },
                FaultSpec {
                    kind: FaultKind::Hang,
                    every: Duration::from_secs(3)
                },
            ]
        );
        for bad in [
            "kill",
            "kill:200ms",
            "boom:every=1s",
            "kill:every=5",
            "kill:every=0ms",
            "kill:every=-1s",
        ] {
            assert!(parse_faults(bad).is_err(), "accepted {bad}");
        }
    }

    #[test]
    fn stalls_span_the_gap_around_each_fault() {
        let stamps = [10, 20, 30, 1_000_030, 1_000_040, 5_000_000];
        let faults = [
            Injected {
                kind: FaultKind::Kill,
                at_ns: 35,
            },
            Injected {
                kind: FaultKind::Kill,
                at_ns: 1_000_040,
            },
            Injected {
                kind: FaultKind::Kill,
                at_ns: 9_000_000,
            },
        ];
        // 30 → 1_000_030 is 1000 µs; 1_000_040 → 5_000_000 is 3999 µs; the
        // last fault has no completion after it.
        assert_eq!(stalls_us(&faults, &stamps), vec![1000, 3999]);
        assert_eq!(percentiles(&[5, 1, 3]), (3, 5, 5));
        assert_eq!(percentiles(&[]), (0, 0, 0));
    }
}
