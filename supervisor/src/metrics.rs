//! The device counters for people and for Prometheus
//! (docs/ARCHITECTURE.md §4.1): the text exposition format, one human
//! line per device, and the optional local listener (`[metrics] listen`).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shadowback_shadow::metrics::{octave_below_us, OCTAVES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::stats::DeviceStats;
use crate::Devices;

/// A scrape must send its request and take the answer within this.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// The most of a request read (the request is not interpreted: any path
/// gets the metrics).
const MAX_REQUEST: usize = 4096;

/// One metric family: name, type, help, and the value of each device.
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: fn(&DeviceStats) -> f64,
}

const fn counter(name: &'static str, help: &'static str, value: fn(&DeviceStats) -> f64) -> Family {
    Family {
        name,
        kind: "counter",
        help,
        value,
    }
}

const fn gauge(name: &'static str, help: &'static str, value: fn(&DeviceStats) -> f64) -> Family {
    Family {
        name,
        kind: "gauge",
        help,
        value,
    }
}

const FAMILIES: &[Family] = &[
    counter(
        "shadowback_requests_total",
        "Requests taken from the rings (a vif: frames sent by the guest).",
        |s| s.io.requests as f64,
    ),
    counter(
        "shadowback_io_errors_total",
        "Requests answered with an error.",
        |s| s.io.errors as f64,
    ),
    counter(
        "shadowback_read_bytes_total",
        "Bytes into guest memory (a disk's reads, a vif's received frames).",
        |s| s.io.bytes_to_guest as f64,
    ),
    counter(
        "shadowback_written_bytes_total",
        "Bytes out of guest memory (a disk's writes, a vif's sent frames).",
        |s| s.io.bytes_from_guest as f64,
    ),
    counter(
        "shadowback_rx_packets_total",
        "Frames delivered to the guest (a vif).",
        |s| s.io.packets_to_guest as f64,
    ),
    counter(
        "shadowback_tx_packets_total",
        "Frames the guest sent (a vif).",
        |s| s.io.packets_from_guest as f64,
    ),
    counter(
        "shadowback_dropped_packets_total",
        "Frames dropped: no receive buffer, a wire that refused (a vif).",
        |s| s.io.dropped as f64,
    ),
    gauge(
        "shadowback_queue_depth",
        "Requests in flight in the serving backend.",
        |s| s.io.in_flight as f64,
    ),
    gauge(
        "shadowback_request_latency_p50_seconds",
        "Median request latency (bucket upper bound, within 25%).",
        |s| s.latency_p50_us.unwrap_or(0) as f64 / 1e6,
    ),
    gauge(
        "shadowback_request_latency_p99_seconds",
        "99th percentile request latency (bucket upper bound, within 25%).",
        |s| s.latency_p99_us.unwrap_or(0) as f64 / 1e6,
    ),
    counter(
        "shadowback_crashes_total",
        "Backend instances that exited unasked.",
        |s| s.crashes as f64,
    ),
    counter(
        "shadowback_hangs_total",
        "Backend instances declared hung and killed.",
        |s| s.hangs as f64,
    ),
    counter(
        "shadowback_recoveries_total",
        "Takeovers that ended with the new instance attached.",
        |s| s.recoveries as f64,
    ),
    counter(
        "shadowback_failed_takeovers_total",
        "Takeovers that failed.",
        |s| s.failed_takeovers as f64,
    ),
    counter(
        "shadowback_stall_seconds_total",
        "Time from each failure being seen to the recovery's attach, added up.",
        |s| s.stall_us as f64 / 1e6,
    ),
    counter(
        "shadowback_replayed_total",
        "Requests re-executed from the shadow log.",
        |s| s.replayed as f64,
    ),
    counter(
        "shadowback_repushed_total",
        "Saved responses re-pushed without re-execution.",
        |s| s.repushed as f64,
    ),
    counter(
        "shadowback_poisoned_total",
        "Requests failed by the crash-loop breaker.",
        |s| s.poisoned as f64,
    ),
    counter(
        "shadowback_corrupt_total",
        "Corrupt shadow log entries answered with an error.",
        |s| s.corrupt as f64,
    ),
    counter(
        "shadowback_tx_replayed_total",
        "A vif's TX packets sent again by recovering instances.",
        |s| s.tx_replayed as f64,
    ),
    counter(
        "shadowback_rx_dropped_in_crash_total",
        "Frames a dying vif instance had taken from the wire.",
        |s| s.rx_dropped_in_crash as f64,
    ),
    counter(
        "shadowback_fresh_starts_total",
        "Attaches that gave a given-up device a fresh start.",
        |s| s.fresh_starts as f64,
    ),
    gauge(
        "shadowback_connected",
        "1 while a guest is attached.",
        |s| f64::from(u8::from(s.connected)),
    ),
    gauge(
        "shadowback_given_up",
        "1 while the supervisor has given up on the device.",
        |s| f64::from(u8::from(s.given_up)),
    ),
];

const LATENCY: &str = "shadowback_request_latency_seconds";

/// A label value, escaped as the text format wants.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Every device's counters in the Prometheus text exposition format
/// (version 0.0.4), one `device` label per sample.
pub fn prometheus(devices: &[(String, DeviceStats)]) -> String {
    let mut out = String::new();
    for f in FAMILIES {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        for (name, s) in devices {
            let _ = writeln!(
                out,
                "{}{{device=\"{}\"}} {}",
                f.name,
                label(name),
                (f.value)(s)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP {LATENCY} Request latency, from taking a request off the ring to putting its answer there."
    );
    let _ = writeln!(out, "# TYPE {LATENCY} histogram");
    for (name, s) in devices {
        let name = label(name);
        let octaves = s.io.latency.octaves();
        let mut below = 0u64;
        for (k, &n) in octaves.iter().enumerate().take(OCTAVES - 1) {
            below = below.saturating_add(n);
            let le = octave_below_us(k).unwrap_or(u64::MAX) as f64 / 1e6;
            let _ = writeln!(
                out,
                "{LATENCY}_bucket{{device=\"{name}\",le=\"{le}\"}} {below}"
            );
        }
        let total = below.saturating_add(octaves[OCTAVES - 1]);
        let _ = writeln!(
            out,
            "{LATENCY}_bucket{{device=\"{name}\",le=\"+Inf\"}} {total}"
        );
        let _ = writeln!(
            out,
            "{LATENCY}_sum{{device=\"{name}\"}} {}",
            s.io.latency.sum_us as f64 / 1e6
        );
        let _ = writeln!(out, "{LATENCY}_count{{device=\"{name}\"}} {total}");
    }
    out
}

/// `n` bytes with a binary unit.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn micros(us: Option<u64>) -> String {
    match us {
        None => "-".into(),
        Some(us) if us < 1000 => format!("{us}µs"),
        Some(us) => format!("{:.1}ms", us as f64 / 1000.0),
    }
}

/// One line a person can read: state, traffic, depth, latency, failures.
pub fn human_line(name: &str, s: &DeviceStats) -> String {
    let state = if s.given_up {
        "GIVEN UP"
    } else if s.connected {
        "connected"
    } else {
        "idle"
    };
    let io = &s.io;
    let traffic = if io.packets_to_guest + io.packets_from_guest > 0 {
        format!(
            "tx {} pkts ({}), rx {} pkts ({}), {} dropped",
            io.packets_from_guest,
            bytes(io.bytes_from_guest),
            io.packets_to_guest,
            bytes(io.bytes_to_guest),
            io.dropped
        )
    } else {
        format!(
            "{} req ({} read, {} written), {} errors, depth {}, p50 {} p99 {}",
            io.requests,
            bytes(io.bytes_to_guest),
            bytes(io.bytes_from_guest),
            io.errors,
            io.in_flight,
            micros(s.latency_p50_us),
            micros(s.latency_p99_us)
        )
    };
    format!(
        "{name}: {state}; {traffic}; {} recoveries (stall {}), {} crashes, {} hangs, {} replayed, {} poisoned",
        s.recoveries,
        micros(Some(s.stall_us)),
        s.crashes,
        s.hangs,
        s.replayed,
        s.poisoned
    )
}

/// Binds the listener (so a bad address fails the start).
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener, crate::SupervisorError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| crate::SupervisorError::Config(format!("[metrics] listen {addr}: {e}")))
}

/// Serves the text format to one scraper at a time until `shutdown`: a
/// client that does not send a request head within [`SCRAPE_TIMEOUT`] is
/// dropped, so none can hold the listener.
pub(crate) async fn serve(
    listener: TcpListener,
    devices: Arc<Devices>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let conn = tokio::select! {
            conn = listener.accept() => conn,
            _ = shutdown.changed() => return,
        };
        let (mut stream, peer) = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "metrics accept failed");
                // EMFILE and the like: do not spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let scrape = async {
            let mut head = Vec::with_capacity(512);
            let mut buf = [0u8; 512];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            let body = prometheus(&devices.status());
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(reply.as_bytes()).await?;
            stream.shutdown().await
        };
        match tokio::time::timeout(SCRAPE_TIMEOUT, scrape).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics scrape failed"),
            Err(_) => tracing::debug!(%peer, "metrics scrape timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadowback_shadow::{IoCounters, Latency};

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_the_count() {
        let mut latency = Latency::default();
        for us in [0, 5, 5, 700, 1 << 27] {
            latency.record(Duration::from_micros(us));
        }
        let stats = DeviceStats {
            io: IoCounters {
                requests: 5,
                latency,
                ..IoCounters::default()
            },
            ..DeviceStats::default()
        };
        let text = prometheus(&[("d0".into(), stats)]);
        assert!(
            text.contains("shadowback_requests_total{device=\"d0\"} 5\n"),
            "{text}"
        );
        let bucket = |le: &str| -> u64 {
            let prefix = format!("{LATENCY}_bucket{{device=\"d0\",le=\"{le}\"}} ");
            let line = text.lines().find(|l| l.starts_with(&prefix)).expect(le);
            line[prefix.len()..].parse().unwrap()
        };
        assert_eq!(bucket("0.000001"), 1, "0 µs < 1 µs");
        assert_eq!(bucket("0.000008"), 3);
        assert_eq!(bucket("0.001024"), 4);
        assert_eq!(bucket("67.108864"), 4);
        assert_eq!(bucket("+Inf"), 5);
        assert!(text.contains(&format!("{LATENCY}_count{{device=\"d0\"}} 5\n")));
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn the_human_line_says_what_matters() {
        let stats = DeviceStats {
            connected: true,
            recoveries: 2,
            stall_us: 1500,
            io: IoCounters {
                requests: 10,
                bytes_to_guest: 3 << 20,
                in_flight: 4,
                ..IoCounters::default()
            },
            latency_p50_us: Some(120),
            latency_p99_us: Some(2300),
            ..DeviceStats::default()
        };
        let line = human_line("d0", &stats);
        for part in [
            "d0: connected",
            "10 req (3.0 MiB read, 0 B written)",
            "depth 4",
            "p50 120µs p99 2.3ms",
            "2 recoveries (stall 1.5ms)",
        ] {
            assert!(line.contains(part), "{part:?} not in {line:?}");
        }
    }
}
