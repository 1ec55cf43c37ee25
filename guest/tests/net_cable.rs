//! Both ends of the TCP workloads over the in-memory cable, one thread per
//! end, with and without injected faults.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use shadowback_guest::net::cable::{cable, CableConfig, CableControl, CableEnd, Direction};
use shadowback_guest::net::{
    run_stream, NetStack, ProgressHook, StreamParams, StreamReport, StreamRole,
};

const A_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const B_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const MIB: u64 = 1 << 20;

/// Parameters of the side at `address` talking to `peer`.
fn params(address: Ipv4Addr, peer: Ipv4Addr, seed: u64) -> StreamParams {
    StreamParams {
        seed,
        stall_timeout: Duration::from_secs(20),
        ..StreamParams::between(address, peer)
    }
}

/// Runs `roles.0` on end A (connecting to B) and `roles.1` on end B, each in
/// its own thread, with the same `tune` applied to both sides' parameters;
/// `during` runs on the test thread meanwhile.
fn run_pair(
    config: CableConfig,
    roles: (StreamRole, StreamRole),
    tune: impl Fn(&mut StreamParams),
    during: impl FnOnce(&CableControl),
) -> (StreamReport, StreamReport, CableControl) {
    run_pair_on(cable(config), roles, (&tune, &tune), during)
}

/// Changes one side's stream parameters.
type Tune<'a> = dyn Fn(&mut StreamParams) + 'a;

/// [`run_pair`] on a cable made by the caller, tuning each side's
/// parameters on their own (`tune.0` end A's, `tune.1` end B's).
fn run_pair_on(
    (a, b, ctl): (CableEnd, CableEnd, CableControl),
    roles: (StreamRole, StreamRole),
    tune: (&Tune<'_>, &Tune<'_>),
    during: impl FnOnce(&CableControl),
) -> (StreamReport, StreamReport, CableControl) {
    let mut pa = params(A_ADDR, B_ADDR, 77);
    let mut pb = params(B_ADDR, A_ADDR, 77);
    (tune.0)(&mut pa);
    (tune.1)(&mut pb);
    let side = |mut end: CableEnd, role, p: StreamParams| {
        thread::spawn(move || run_stream(&mut end, role, &p))
    };
    let tb = side(b, roles.1, pb);
    let ta = side(a, roles.0, pa);
    during(&ctl);
    let ra = ta.join().expect("side A panicked");
    let rb = tb.join().expect("side B panicked");
    (ra, rb, ctl)
}

fn assert_passed(report: &StreamReport) {
    eprintln!("{}", serde_json::to_string(report).unwrap());
    assert!(report.passed(), "{:#?}", report);
}

#[test]
fn a_4_mib_stream_verifies_end_to_end() {
    let (tx, rx, ctl) = run_pair(
        CableConfig::default(),
        (StreamRole::Sender, StreamRole::Receiver),
        |p| p.bytes = 4 * MIB,
        |_| {},
    );
    assert_passed(&tx);
    assert_passed(&rx);
    assert_eq!((tx.bytes, rx.bytes), (4 * MIB, 4 * MIB));
    assert_eq!(tx.checksum, rx.checksum);
    assert_eq!(rx.first_mismatch, None);
    assert!(rx.throughput_mib_s > 0.0, "{rx:?}");
    // Every data frame crossed the cable: 4 MiB in 1460-byte segments.
    assert!(ctl.stats(Direction::AToB).delivered > 4 * MIB / 1460);
    let json = serde_json::to_string(&rx).unwrap();
    let back: StreamReport = serde_json::from_str(&json).unwrap();
    assert_eq!(
        (back.role, back.bytes, back.checksum, back.failures),
        (rx.role, rx.bytes, rx.checksum, rx.failures.clone())
    );
    assert!(json.contains("\"role\":\"receiver\""), "{json}");
}

#[test]
fn drops_and_a_300_ms_pause_stall_the_stream_but_it_verifies() {
    const PAUSE: Duration = Duration::from_millis(300);
    let mut config = CableConfig::default();
    config.faults[0].drop_every = Some(97);
    config.faults[1].drop_every = Some(89);
    let (tx, rx, ctl) = run_pair(
        config,
        (StreamRole::Sender, StreamRole::Receiver),
        |p| p.bytes = 4 * MIB,
        |ctl| {
            // Pause once a good part of the stream has crossed, as a
            // backend killed under load would.
            let deadline = Instant::now() + Duration::from_secs(20);
            while ctl.stats(Direction::AToB).delivered < 800 && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(1));
            }
            ctl.pause(PAUSE);
        },
    );
    assert_passed(&tx);
    assert_passed(&rx);
    assert_eq!(rx.bytes, 4 * MIB);
    assert_eq!(tx.checksum, rx.checksum);
    let stats = ctl.stats(Direction::AToB);
    assert!(stats.dropped_by_fault > 10, "{stats:?}");
    assert!(
        rx.max_gap_ms >= PAUSE.as_secs_f64() * 1e3,
        "receiver gap {} ms < pause",
        rx.max_gap_ms
    );
    // Not necessarily the pause: with drops, a lost last segment waits for
    // a retransmission timeout (no later segment to trigger a fast
    // retransmit), which can be the longest gap, at the stream's end. The
    // pause alone is measured by the next test.
    assert!(rx.max_gap_at > 0 && rx.max_gap_at <= 4 * MIB, "{rx:?}");
    assert!(tx.max_gap_ms >= PAUSE.as_secs_f64() * 1e3, "{tx:?}");
    assert_eq!(
        (rx.resets, rx.timeouts, tx.resets, tx.timeouts),
        (0, 0, 0, 0)
    );
}

#[test]
fn the_longest_gap_is_the_pause_and_ends_after_it() {
    // No drops: the pause is the only reason to stall, so the longest gap
    // must be the one it caused, ending just past where it began. The
    // receiver pauses the cable itself, from its progress hook, once
    // PAUSE_AT bytes arrived: a pause from another thread, waiting for a
    // count, could come after the whole stream (a few milliseconds) on a
    // loaded machine, and then no gap is the pause's.
    const PAUSE: Duration = Duration::from_millis(600);
    const PAUSE_AT: u64 = 512 * 1024;
    let (a, b, ctl) = cable(CableConfig::default());
    let paused_at = Arc::new(Mutex::new(None::<u64>));
    let hook = {
        let (ctl, paused_at) = (ctl.clone(), paused_at.clone());
        ProgressHook::new(move |_, offset| {
            let mut at = paused_at.lock().unwrap();
            if at.is_none() && offset >= PAUSE_AT {
                ctl.pause(PAUSE);
                *at = Some(offset);
            }
        })
    };
    let (tx, rx, _ctl) = run_pair_on(
        (a, b, ctl),
        (StreamRole::Sender, StreamRole::Receiver),
        (&|p| p.bytes = 2 * MIB, &|p| {
            p.bytes = 2 * MIB;
            p.on_progress = Some(hook.clone());
        }),
        |_| {},
    );
    assert_passed(&tx);
    assert_passed(&rx);
    let at = paused_at
        .lock()
        .unwrap()
        .expect("the receiver paused the cable");
    let pause_ms = PAUSE.as_secs_f64() * 1e3;
    assert!(rx.max_gap_ms >= pause_ms, "{rx:?}");
    // The gap ends with the first segment after the pause: past where it
    // began, by at most what the sender had in flight.
    assert!(
        rx.max_gap_at > at && rx.max_gap_at <= at + 256 * 1024,
        "gap ended at {}, the pause began at {at}",
        rx.max_gap_at
    );
}

#[test]
fn a_corrupted_byte_is_found_at_its_stream_offset() {
    const AT: u64 = 1_234_567;
    let mut config = CableConfig::default();
    config.faults[0].corrupt_stream_offset = Some(AT);
    let (tx, rx, ctl) = run_pair(
        config,
        (StreamRole::Sender, StreamRole::Receiver),
        |p| p.bytes = 2 * MIB,
        |_| {},
    );
    assert_eq!(ctl.stats(Direction::AToB).corrupted, 1);
    // The sender did its part; the receiver must not pass.
    assert_passed(&tx);
    assert!(!rx.passed());
    let m = rx.first_mismatch.expect("corruption detected");
    assert_eq!(m.offset, AT);
    assert_eq!(m.found, m.expected ^ 0xff);
    assert_eq!(m.belongs_at, None);
    assert_eq!(rx.mismatched_bytes, 1);
    assert_eq!(rx.bytes, 2 * MIB, "the rest of the stream still arrived");
    assert_ne!(tx.checksum, rx.checksum);
    assert!(
        rx.failures.iter().any(|f| f.contains("offset 1234567")),
        "{:?}",
        rx.failures
    );
}

#[test]
fn ping_pong_echoes_every_request_with_sane_latency() {
    let (client, server, _ctl) = run_pair(
        CableConfig::default(),
        (StreamRole::PingClient, StreamRole::EchoServer),
        |p| {
            p.requests = 300;
            p.request_bytes = 200;
        },
        |_| {},
    );
    assert_passed(&client);
    assert_passed(&server);
    assert_eq!(client.requests_done, 300);
    assert_eq!((client.bytes, server.bytes), (60_000, 60_000));
    assert_eq!(client.checksum, server.checksum);
    let lat = client.latency.expect("latency of a ping client");
    assert!(lat.p50_us > 0.0, "{lat:?}");
    assert!(
        lat.p50_us <= lat.p99_us && lat.p99_us <= lat.max_us,
        "{lat:?}"
    );
    // In-process, no delays: well under the 10 ms delayed-ACK timer a
    // stack that sat on small segments would add to every round trip.
    assert!(lat.p50_us < 5_000.0, "{lat:?}");
    assert_eq!(server.latency, None);
}

#[test]
fn requests_larger_than_the_socket_buffers_are_written_in_pieces() {
    let (client, server, _ctl) = run_pair(
        CableConfig::default(),
        (StreamRole::PingClient, StreamRole::EchoServer),
        |p| {
            p.requests = 20;
            p.request_bytes = 10_000;
            p.socket_buffer = 4096;
        },
        |_| {},
    );
    assert_passed(&client);
    assert_passed(&server);
    assert_eq!(client.requests_done, 20);
    assert_eq!(client.bytes, 200_000);
    assert_eq!(client.checksum, server.checksum);
}

#[test]
fn ping_pong_latency_includes_the_cable_delay() {
    let mut config = CableConfig::default();
    config.faults[0].delay = Duration::from_millis(3);
    config.faults[1].delay = Duration::from_millis(3);
    let (client, server, _ctl) = run_pair(
        config,
        (StreamRole::PingClient, StreamRole::EchoServer),
        |p| p.requests = 20,
        |_| {},
    );
    assert_passed(&client);
    assert_passed(&server);
    let lat = client.latency.expect("latency");
    assert!(lat.p50_us >= 6_000.0, "{lat:?}");
    assert!(lat.p50_us < 100_000.0, "{lat:?}");
}

#[test]
fn a_peer_that_never_listens_is_a_timeout_not_a_pass() {
    let (mut a, _b, _ctl) = cable(CableConfig::default());
    let mut p = params(A_ADDR, B_ADDR, 1);
    p.stall_timeout = Duration::from_millis(300);
    // Nobody runs a stack on end B: the ARP request is never answered.
    let report = run_stream(&mut a, StreamRole::Sender, &p);
    assert!(!report.passed());
    assert_eq!(report.timeouts, 1, "{report:?}");
    assert!(report.failures[0].contains("connecting"), "{report:?}");
}

#[test]
fn a_connection_refused_at_first_is_retried() {
    let (a, b, _ctl) = cable(CableConfig::default());
    let mut pa = params(A_ADDR, B_ADDR, 5);
    let mut pb = params(B_ADDR, A_ADDR, 5);
    pa.bytes = 100_000;
    pb.bytes = 100_000;
    // B's stack answers the first SYNs with RST (port closed) ...
    let mut refuse = StreamParams {
        port: pb.port + 1,
        stall_timeout: Duration::from_millis(400),
        ..pb.clone()
    };
    refuse.bytes = 0;
    let tb = thread::spawn(move || {
        let mut b = b;
        let refused = run_stream(&mut b, StreamRole::Receiver, &refuse);
        // ... then listens on the right port.
        let report = run_stream(&mut b, StreamRole::Receiver, &pb);
        (refused, report)
    });
    let ta = thread::spawn(move || {
        let mut a = a;
        run_stream(&mut a, StreamRole::Sender, &pa)
    });
    let tx = ta.join().unwrap();
    let (refused, rx) = tb.join().unwrap();
    assert_eq!(refused.timeouts, 1, "{refused:?}");
    assert_passed(&tx);
    assert_passed(&rx);
    assert!(tx.connect_refused >= 1, "{tx:?}");
    assert_eq!(rx.bytes, 100_000);
}

#[test]
fn a_reset_mid_stream_is_a_failure() {
    let (a, b, _ctl) = cable(CableConfig::default());
    let pa = StreamParams {
        bytes: 4 * MIB,
        ..params(A_ADDR, B_ADDR, 9)
    };
    let pb = params(B_ADDR, A_ADDR, 9);
    // B is a peer that accepts, reads 100 KiB and aborts (sends RST).
    let tb = thread::spawn(move || {
        let mut b = b;
        let mut stack = NetStack::new(&mut b, &pb.net).unwrap();
        let h = stack.add_tcp_socket(64 * 1024, 64 * 1024);
        stack.listen(h, pb.port).unwrap();
        let mut read = 0usize;
        let deadline = Instant::now() + Duration::from_secs(20);
        while read < 100 * 1024 && Instant::now() < deadline {
            let now = Instant::now();
            stack.poll(now).unwrap();
            let socket = stack.tcp(h);
            if socket.can_recv() {
                read += socket.recv(|d| (d.len(), d.len())).unwrap();
            }
            stack.wait(now, Duration::from_millis(5)).unwrap();
        }
        stack.tcp(h).abort();
        for _ in 0..10 {
            stack.poll(Instant::now()).unwrap();
        }
        read
    });
    let mut a = a;
    let tx = run_stream(&mut a, StreamRole::Sender, &pa);
    let read = tb.join().unwrap();
    assert!(read >= 100 * 1024);
    assert!(!tx.passed(), "{tx:?}");
    assert_eq!(tx.resets, 1, "{tx:?}");
    assert!(tx.failures[0].contains("reset"), "{tx:?}");
    // Acknowledged: most of what B read (its last ACK may lose to the RST).
    assert!(tx.bytes >= 64 * 1024 && tx.bytes < 4 * MIB, "{tx:?}");
}

#[test]
fn the_progress_hook_sees_every_advance_of_the_receiver() {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(Instant, u64)>::new()));
    let log = seen.clone();
    let hook = ProgressHook::new(move |at, offset| log.lock().unwrap().push((at, offset)));
    let (tx, rx, _) = run_pair(
        CableConfig::default(),
        (StreamRole::Sender, StreamRole::Receiver),
        |p| {
            p.bytes = 2 * MIB;
            // Only the receiver (B) reports.
            if p.net.address == B_ADDR {
                p.on_progress = Some(hook.clone());
            }
        },
        |_| {},
    );
    assert_passed(&tx);
    assert_passed(&rx);
    let seen = seen.lock().unwrap();
    assert!(seen.len() > 1, "{} calls", seen.len());
    assert!(seen.windows(2).all(|w| w[0].1 < w[1].1 && w[0].0 <= w[1].0));
    assert_eq!(seen.last().map(|s| s.1), Some(2 * MIB));
}

/// Losing one of the receiver's ACKs must not cost the stream a
/// retransmission timeout (smoltcp's is at least 1 s) while more data is
/// coming: a backend dying with a frame loses it (docs/ARCHITECTURE.md
/// §11.6), and on a vif carrying a stream's ACKs that frame is an ACK.
/// Every 5th frame from the receiver is dropped here. When a stack took
/// every frame its device held before sending anything, the receiver
/// answered a whole burst with one ACK, the sender waited for exactly
/// that one, and losing it stalled the stream ≈ 1 s (`bench failover
/// --class net`'s occasional retransmission timeout).
#[test]
fn lost_acks_cost_no_retransmission_timeout() {
    let mut config = CableConfig::default();
    config.faults[1].drop_every = Some(5);
    let (tx, rx, ctl) = run_pair(
        config,
        (StreamRole::Sender, StreamRole::Receiver),
        |p| p.bytes = 8 * MIB,
        |_| {},
    );
    assert_passed(&tx);
    assert_passed(&rx);
    assert_eq!(tx.checksum, rx.checksum);
    let acks = ctl.stats(Direction::BToA);
    assert!(acks.dropped_by_fault >= 10, "{acks:?}");
    // The receiver's gaps: the sender's last one can be a lost ACK of
    // the stream's last data, which nothing follows.
    assert!(
        rx.max_gap_ms < 500.0,
        "the receiver waited {:.0} ms at offset {} ({acks:?})",
        rx.max_gap_ms,
        rx.max_gap_at
    );
}
