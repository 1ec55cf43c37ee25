//! Metrics as a monitoring system sees them (docs/ARCHITECTURE.md §4.1):
//! `shadowback status --format prometheus` and the `[metrics] listen`
//! page, scraped and parsed as the text exposition format, against a
//! supervisor whose real `shadowback blkback` serves a guest doing I/O and
//! is killed and taken over in between.
#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use shadowback_guest::blkfront::{BlkFront, BlkFrontConfig};
use shadowback_supervisor::{Config, DiskConfig, Fault, MetricsConfig, SupervisorThread};
use shadowback_testsupport::blockio::{check, pattern, write};
use shadowback_testsupport::harness::{backend_command, cache_for};
use shadowback_testsupport::temp::TempDir;

const EXE: &str = env!("CARGO_BIN_EXE_shadowback");
const DEVICE: &str = "m0";
const WAIT: Duration = Duration::from_secs(30);
/// Bytes of each request the guest makes.
const CHUNK: usize = 64 * 1024;

/// Samples of one scrape: `name{labels}` → value, after checking every
/// line is a comment or a well-formed sample of a declared family.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut declared = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            declared.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "{line:?}"
            );
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| declared.get(*f).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(name);
        assert!(declared.contains_key(family), "{name} has no # TYPE");
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value of {line:?}"));
        assert!(
            samples.insert(series.to_owned(), v).is_none(),
            "{series} twice"
        );
    }
    samples
}

fn get(samples: &BTreeMap<String, f64>, name: &str) -> f64 {
    *samples
        .get(&format!("{name}{{device=\"{DEVICE}\"}}"))
        .unwrap_or_else(|| panic!("no {name} for {DEVICE}"))
}

/// The latency histogram's buckets in `le` order, checked cumulative and
/// ending at `_count`.
fn check_histogram(samples: &BTreeMap<String, f64>) -> f64 {
    let name = "shadowback_request_latency_seconds";
    let prefix = format!("{name}_bucket{{device=\"{DEVICE}\",le=\"");
    let mut buckets: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|(k, v)| {
            let le = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            Some((le, *v))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(buckets.len() > 10, "{buckets:?}");
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "not cumulative: {buckets:?}"
    );
    let (last_le, total) = *buckets.last().unwrap();
    assert!(last_le.is_infinite());
    assert_eq!(total, get(samples, &format!("{name}_count")));
    total
}

fn scrape_cli(socket: &Path) -> BTreeMap<String, f64> {
    let out = Command::new(EXE)
        .args(["status", "--format", "prometheus", "--socket"])
        .arg(socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse(&String::from_utf8(out.stdout).unwrap())
}

fn scrape_http(addr: SocketAddr) -> BTreeMap<String, f64> {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(WAIT)).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    parse(body)
}

/// Scrapes until `pred` holds (the serving instance copies its counters
/// every few milliseconds).
fn wait_scrape(
    socket: &Path,
    what: &str,
    pred: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = scrape_cli(socket);
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "never saw {what}: {s:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free loopback port (bound, then released for the supervisor).
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[test]
fn counters_and_latency_move_with_io_and_survive_a_takeover() {
    let dir = TempDir::new("metrics");
    let path = dir.create_image("m0.img", 16 << 20);
    let socket = dir.join("control.sock");
    let listen = free_port();
    let cfg = Config {
        socket: socket.clone(),
        control: Default::default(),
        backend: Default::default(),
        standby: Default::default(),
        limits: Default::default(),
        disks: vec![DiskConfig {
            cache: cache_for(&path),
            path,
            ..DiskConfig::new(DEVICE.to_string(), "")
        }],
        nics: Vec::new(),
        metrics: MetricsConfig {
            listen: Some(listen),
        },
    };
    let sup = SupervisorThread::start(cfg, backend_command()).expect("supervisor");

    let idle = scrape_cli(&socket);
    assert_eq!(get(&idle, "shadowback_requests_total"), 0.0);
    assert_eq!(check_histogram(&idle), 0.0);

    let mut guest = BlkFront::attach(&socket, &BlkFrontConfig::new(DEVICE)).expect("attach");
    let writes = 32u64;
    for i in 0..writes {
        write(&mut guest, i * 128, &pattern(i, CHUNK)).unwrap();
    }
    for i in 0..writes {
        check(&mut guest, i * 128, &pattern(i, CHUNK)).unwrap();
    }
    let moved = CHUNK as f64 * writes as f64;
    let busy = wait_scrape(&socket, "the guest's 64 requests", |s| {
        get(s, "shadowback_request_latency_seconds_count") >= 2.0 * writes as f64
    });
    let requests = get(&busy, "shadowback_requests_total");
    assert!(requests >= 2.0 * writes as f64, "{requests}");
    assert!(get(&busy, "shadowback_written_bytes_total") >= moved);
    assert!(get(&busy, "shadowback_read_bytes_total") >= moved);
    assert_eq!(get(&busy, "shadowback_io_errors_total"), 0.0);
    assert_eq!(get(&busy, "shadowback_connected"), 1.0);
    assert_eq!(
        get(&busy, "shadowback_queue_depth"),
        0.0,
        "one request at a time, all done"
    );
    assert_eq!(check_histogram(&busy), requests);
    assert!(get(&busy, "shadowback_request_latency_seconds_sum") > 0.0);
    let p50 = get(&busy, "shadowback_request_latency_p50_seconds");
    let p99 = get(&busy, "shadowback_request_latency_p99_seconds");
    assert!(p50 <= p99 && p99 > 0.0, "p50 {p50} p99 {p99}");

    // The local listener serves the same page.
    let http = scrape_http(listen);
    assert_eq!(get(&http, "shadowback_requests_total"), requests);
    check_histogram(&http);
    // A client that connects and says nothing does not block the next one.
    let silent = TcpStream::connect(listen).unwrap();
    let http = scrape_http(listen);
    assert_eq!(get(&http, "shadowback_requests_total"), requests);
    drop(silent);

    // Kill the serving backend: the next instance adds to the counts.
    sup.fault(DEVICE, Fault::Kill).expect("fault kill");
    let deadline = Instant::now() + WAIT;
    while sup.status()[0].1.recoveries == 0 {
        assert!(Instant::now() < deadline, "no recovery");
        std::thread::sleep(Duration::from_millis(20));
    }
    for i in 0..8 {
        write(&mut guest, 8192 + i * 128, &pattern(100 + i, CHUNK)).unwrap();
    }
    // Answered, not only taken: `requests` counts a request when it is
    // taken, its bytes and latency when it is answered, and a copy can
    // fall between the two.
    let after = wait_scrape(&socket, "the requests after the takeover", |s| {
        get(s, "shadowback_request_latency_seconds_count") >= requests + 8.0
    });
    assert_eq!(get(&after, "shadowback_recoveries_total"), 1.0);
    assert!(get(&after, "shadowback_stall_seconds_total") > 0.0);
    let written = get(&after, "shadowback_written_bytes_total");
    assert!(
        written >= moved + 8.0 * CHUNK as f64,
        "written {written} < {moved} + 8 × {CHUNK}; before the kill: {busy:?}\nafter: {after:?}"
    );
    assert!(check_histogram(&after) >= requests + 8.0);

    // The human line says the same.
    let out = Command::new(EXE)
        .args(["status", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(
        line.starts_with(&format!("{DEVICE}: connected; ")),
        "{line}"
    );
    assert!(line.contains("1 recoveries"), "{line}");
    drop(guest);
    drop(sup);
}
