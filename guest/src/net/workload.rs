//! The verifying TCP workloads: [`run_stream`] and its [`StreamReport`].

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::{self, RecvError, State};
use tracing::{debug, info, warn};

use super::device::{FrameDevice, PhyStats};
use super::pattern::{Crc32, StreamMismatch, StreamPattern, StreamVerifier};
use super::stack::{NetConfig, NetError, NetStack};
use crate::stats::{LatencyHistogram, LatencySummary};

/// Pause between two connection attempts the peer refused (it may not be
/// listening yet).
const CONNECT_RETRY: Duration = Duration::from_millis(50);
/// Longest single sleep of the loop, so deadlines are checked in time.
const MAX_WAIT: Duration = Duration::from_millis(20);
/// How long a side that has closed keeps its stack running for the close
/// handshake: long enough for two retransmissions of a lost FIN (TCP's
/// minimum retransmission timeout is 1 s), so that the peer, which only
/// finishes on our FIN, gets it. Not a failure when it runs out: every byte
/// was already checked.
const CLOSE_LINGER: Duration = Duration::from_secs(3);
/// Lowest ephemeral port a connecting role picks (IANA's dynamic range).
const EPHEMERAL_BASE: u16 = 49152;
/// How many failure descriptions a report keeps (all are counted).
const MAX_FAILURE_MESSAGES: usize = 10;

/// What one side of a workload does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StreamRole {
    /// Connects and writes `bytes` of the seeded pattern, then closes.
    Sender,
    /// Listens, checks every byte of the stream, and expects exactly
    /// `bytes` before the peer's FIN.
    Receiver,
    /// Connects and sends `requests` requests of `request_bytes` each, one
    /// at a time, checking and timing each echo.
    PingClient,
    /// Listens and echoes what arrives (checking it is the pattern).
    EchoServer,
}

impl StreamRole {
    fn connects(self) -> bool {
        matches!(self, StreamRole::Sender | StreamRole::PingClient)
    }
}

/// Parameters of [`run_stream`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamParams {
    /// The guest interface's addressing.
    pub net: NetConfig,
    /// The peer a connecting role connects to (ignored by listeners).
    pub peer: Ipv4Addr,
    /// The port listeners listen on and connecting roles connect to.
    pub port: u16,
    /// Local port of a connecting role; 0 picks one from the seed.
    pub local_port: u16,
    /// Seed of the stream content (both sides must agree).
    pub seed: u64,
    /// Stream length (sender and receiver).
    pub bytes: u64,
    /// Size of one ping-pong request.
    pub request_bytes: usize,
    /// Number of ping-pong requests.
    pub requests: u64,
    /// TCP receive and send buffer of the socket, each.
    pub socket_buffer: usize,
    /// No progress for this long (including while connecting or waiting
    /// for a connection) ends the run as a timeout.
    pub stall_timeout: Duration,
    /// Called whenever the stream moves (the moments [`StreamReport`]'s
    /// gap is measured between), for an observer in another thread.
    pub on_progress: Option<ProgressHook>,
}

/// A callback told `(when, stream offset)` each time a side's stream
/// moves: new data checked (receiving roles) or newly acknowledged
/// (sender). It runs in the workload's loop, so it must be quick.
#[derive(Clone)]
pub struct ProgressHook(Arc<dyn Fn(Instant, u64) + Send + Sync>);

impl ProgressHook {
    pub fn new(f: impl Fn(Instant, u64) + Send + Sync + 'static) -> Self {
        ProgressHook(Arc::new(f))
    }
}

impl std::fmt::Debug for ProgressHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressHook")
    }
}

/// Two hooks are equal when they are the same callback.
impl PartialEq for ProgressHook {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ProgressHook {}

impl StreamParams {
    /// The side at `address` (on a /24, no gateway) talking to `peer`, its
    /// stack seeded from the address so that two sides of one test never
    /// pick the same ports; the rest as [`Default`].
    pub fn between(address: Ipv4Addr, peer: Ipv4Addr) -> Self {
        StreamParams {
            net: NetConfig {
                address,
                prefix_len: 24,
                gateway: None,
                seed: u64::from(address.octets()[3]) * 7919,
            },
            peer,
            ..StreamParams::default()
        }
    }
}

impl Default for StreamParams {
    fn default() -> Self {
        StreamParams {
            net: NetConfig {
                address: Ipv4Addr::new(10, 0, 0, 2),
                prefix_len: 24,
                gateway: None,
                seed: 1,
            },
            peer: Ipv4Addr::new(10, 0, 0, 1),
            port: 5001,
            local_port: 0,
            seed: 1,
            bytes: 4 << 20,
            request_bytes: 64,
            requests: 1000,
            socket_buffer: 256 * 1024,
            stall_timeout: Duration::from_secs(10),
            on_progress: None,
        }
    }
}

/// What one side of a workload saw; serialisable for `--json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamReport {
    /// This side's role.
    pub role: StreamRole,
    /// Bytes the role had to move: the stream length, or requests ×
    /// request size.
    pub bytes_expected: u64,
    /// Bytes moved: acknowledged by the peer (sender), or received and
    /// checked (the others).
    pub bytes: u64,
    /// CRC-32 of the bytes written (sender) or checked (the others); the
    /// two ends of a stream must agree.
    pub checksum: u32,
    /// The first byte that was not the pattern.
    pub first_mismatch: Option<StreamMismatch>,
    /// How many checked bytes differed from the pattern at their offset.
    pub mismatched_bytes: u64,
    /// Ping-pong requests whose echo came back whole.
    pub requests_done: u64,
    /// Ping-pong round-trip latency, request written to echo complete.
    pub latency: Option<LatencySummary>,
    /// Longest time between two receptions of new data (receiving roles)
    /// or two advances of the acknowledged offset (sender), in ms: the
    /// stall the guest saw.
    pub max_gap_ms: f64,
    /// Stream offset reached when the longest gap ended.
    pub max_gap_at: u64,
    /// Established connections that ended without an orderly close (a RST
    /// from the peer). Always a failure.
    pub resets: u64,
    /// Times nothing moved for `stall_timeout`. Always a failure.
    pub timeouts: u64,
    /// Connection attempts the peer refused before one succeeded (not a
    /// failure: the listener may start later).
    pub connect_refused: u64,
    /// Whole run, connection setup included, in ms.
    pub elapsed_ms: f64,
    /// From the first to the last byte moved, in MiB/s.
    pub throughput_mib_s: f64,
    /// The device's frame counters.
    pub phy: PhyStats,
    /// Total number of failures.
    pub failure_count: u64,
    /// The first ten of them, in words.
    pub failures: Vec<String>,
}

impl StreamReport {
    fn new(role: StreamRole, bytes_expected: u64) -> Self {
        StreamReport {
            role,
            bytes_expected,
            bytes: 0,
            checksum: 0,
            first_mismatch: None,
            mismatched_bytes: 0,
            requests_done: 0,
            latency: None,
            max_gap_ms: 0.0,
            max_gap_at: 0,
            resets: 0,
            timeouts: 0,
            connect_refused: 0,
            elapsed_ms: 0.0,
            throughput_mib_s: 0.0,
            phy: PhyStats::default(),
            failure_count: 0,
            failures: Vec::new(),
        }
    }

    /// True when every byte arrived intact, in order, and the connection
    /// neither reset nor stalled out.
    pub fn passed(&self) -> bool {
        self.failure_count == 0
    }

    fn fail(&mut self, message: String) {
        warn!(role = ?self.role, "{message}");
        self.failure_count += 1;
        if self.failures.len() < MAX_FAILURE_MESSAGES {
            self.failures.push(message);
        }
    }
}

/// Where a side is in its connection's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// A connecting role waiting for SYN-ACK, or to retry after a refusal.
    Connecting { retry_at: Option<Instant> },
    /// A listener waiting for its peer.
    Listening,
    /// Data moves.
    Open,
    /// This side closed after the peer did; waiting for the last ACK.
    Closing { since: Instant },
    /// Finished, well or not.
    Done,
}

/// One side of a workload in progress.
struct Run {
    role: StreamRole,
    params: StreamParams,
    handle: SocketHandle,
    phase: Phase,
    report: StreamReport,
    started: Instant,
    /// Last time anything moved, for the stall timeout.
    last_activity: Instant,
    /// First and last data movement, for the gap and the throughput.
    first_progress: Option<Instant>,
    last_progress: Option<Instant>,
    max_gap: Duration,
    /// Sender: bytes written into the socket and their checksum.
    written: u64,
    written_crc: Crc32,
    /// Sender: bytes the peer acknowledged.
    acked: u64,
    closed: bool,
    /// Receiver: more bytes came than the stream has (reported once).
    overrun: bool,
    /// Receiving roles: the checker of what arrives.
    verifier: StreamVerifier,
    /// Ping client: when the request in flight was started, and how much
    /// of it is in the socket.
    request_started: Option<Instant>,
    request_written: usize,
    latency: LatencyHistogram,
    /// Echo server: received bytes not yet sent back.
    echo_pending: Vec<u8>,
}

/// Runs one side of a verifying TCP workload over `device` until it ends,
/// well or not, and says what happened.
///
/// Never panics on anything the peer or the device does: every problem is a
/// failure in the report.
pub fn run_stream(
    device: &mut dyn FrameDevice,
    role: StreamRole,
    params: &StreamParams,
) -> StreamReport {
    let mut reports = run_streams(device, &[(role, params.clone())]);
    reports.pop().unwrap_or_else(|| StreamReport::new(role, 0))
}

/// Runs several workloads at once over one `device` and one stack (the
/// first one's `net` addressing; each needs a port of its own), until
/// every one has ended; a report each, in order. What [`run_stream`]
/// does for one connection, for a device with several queues to spread
/// connections over.
pub fn run_streams(
    device: &mut dyn FrameDevice,
    workloads: &[(StreamRole, StreamParams)],
) -> Vec<StreamReport> {
    let Some((_, first)) = workloads.first() else {
        return Vec::new();
    };
    let mut stack = match NetStack::new(device, &first.net) {
        Ok(stack) => stack,
        Err(err) => {
            return workloads
                .iter()
                .map(|(role, params)| {
                    let mut report = StreamReport::new(*role, expected_bytes(*role, params));
                    report.fail(format!("setting up the stack: {}", chain(&err)));
                    report
                })
                .collect();
        }
    };
    let mut runs: Vec<Run> = workloads
        .iter()
        .map(|(role, params)| Run::start(&mut stack, *role, params))
        .collect();
    while runs.iter().any(|r| r.phase != Phase::Done) {
        let now = Instant::now();
        if let Err(err) = stack.poll(now) {
            for run in runs.iter_mut().filter(|r| r.phase != Phase::Done) {
                run.report.fail(chain(&err));
                run.phase = Phase::Done;
            }
            break;
        }
        let mut acted = false;
        for run in runs.iter_mut().filter(|r| r.phase != Phase::Done) {
            acted |= run.step(&mut stack, now);
        }
        if acted {
            continue;
        }
        let wait = runs
            .iter()
            .filter(|r| r.phase != Phase::Done)
            .map(|r| r.max_wait(now))
            .min()
            .unwrap_or(MAX_WAIT);
        if let Err(err) = stack.wait(now, wait) {
            for run in runs.iter_mut().filter(|r| r.phase != Phase::Done) {
                run.report.fail(chain(&err));
                run.phase = Phase::Done;
            }
            break;
        }
    }
    runs.into_iter().map(|run| run.finish(&stack)).collect()
}

fn expected_bytes(role: StreamRole, params: &StreamParams) -> u64 {
    match role {
        StreamRole::Sender | StreamRole::Receiver => params.bytes,
        StreamRole::PingClient | StreamRole::EchoServer => {
            params.requests.saturating_mul(params.request_bytes as u64)
        }
    }
}

/// What is wrong with `params` for `role`, if anything.
fn check_params(role: StreamRole, params: &StreamParams) -> Option<String> {
    if params.port == 0 {
        return Some("port 0".to_string());
    }
    if params.socket_buffer == 0 {
        return Some("zero-sized socket buffers".to_string());
    }
    if matches!(role, StreamRole::PingClient | StreamRole::EchoServer) && params.request_bytes == 0
    {
        return Some("zero-sized requests".to_string());
    }
    None
}

/// An error and its causes on one line.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl Run {
    /// A workload on `stack`, its socket opened (listening or connecting);
    /// a bad parameter or a refused open ends it at once, as a failure.
    fn start(stack: &mut NetStack<'_>, role: StreamRole, params: &StreamParams) -> Run {
        let mut report = StreamReport::new(role, expected_bytes(role, params));
        let problem = check_params(role, params);
        if let Some(problem) = &problem {
            report.fail(problem.clone());
        }
        let now = Instant::now();
        let handle = stack.add_tcp_socket(params.socket_buffer.max(1), params.socket_buffer.max(1));
        if matches!(role, StreamRole::PingClient | StreamRole::EchoServer) {
            // One small request at a time: neither side may sit on it.
            let socket = stack.tcp(handle);
            socket.set_nagle_enabled(false);
            socket.set_ack_delay(None);
        }
        let mut run = Run {
            role,
            params: params.clone(),
            handle,
            phase: Phase::Listening,
            report,
            started: now,
            last_activity: now,
            first_progress: None,
            last_progress: None,
            max_gap: Duration::ZERO,
            written: 0,
            written_crc: Crc32::new(),
            acked: 0,
            closed: false,
            overrun: false,
            verifier: StreamVerifier::new(params.seed),
            request_started: None,
            request_written: 0,
            latency: LatencyHistogram::new(),
            echo_pending: Vec::new(),
        };
        if problem.is_some() {
            run.phase = Phase::Done;
        } else if let Err(err) = run.open(stack) {
            run.report.fail(chain(&err));
            run.phase = Phase::Done;
        }
        run
    }

    fn open(&mut self, stack: &mut NetStack<'_>) -> Result<(), NetError> {
        if self.role.connects() {
            self.phase = Phase::Connecting { retry_at: None };
            self.connect(stack)
        } else {
            self.phase = Phase::Listening;
            stack.listen(self.handle, self.params.port)
        }
    }

    fn connect(&mut self, stack: &mut NetStack<'_>) -> Result<(), NetError> {
        let local_port = match self.params.local_port {
            0 => EPHEMERAL_BASE + (self.params.net.seed % 16384) as u16,
            port => port,
        };
        let remote = SocketAddrV4::new(self.params.peer, self.params.port);
        debug!(%remote, local_port, "connecting");
        stack.connect(self.handle, remote, local_port)
    }

    /// Longest sleep before the next deadline of this side.
    fn max_wait(&self, now: Instant) -> Duration {
        let mut wait = MAX_WAIT;
        if let Phase::Connecting {
            retry_at: Some(retry_at),
        } = self.phase
        {
            wait = wait.min(retry_at.saturating_duration_since(now));
        }
        wait
    }

    /// Data moved at `now`; `offset` is where the stream got to.
    fn progress(&mut self, now: Instant, offset: u64) {
        if let Some(last) = self.last_progress {
            let gap = now.saturating_duration_since(last);
            if gap > self.max_gap {
                self.max_gap = gap;
                self.report.max_gap_at = offset;
            }
        }
        self.first_progress.get_or_insert(now);
        self.last_progress = Some(now);
        self.last_activity = now;
        if let Some(hook) = &self.params.on_progress {
            (hook.0)(now, offset);
        }
    }

    /// One step of this side's state machine after a poll; true when it
    /// gave the stack something to send (poll again before sleeping).
    fn step(&mut self, stack: &mut NetStack<'_>, now: Instant) -> bool {
        let acted = match self.phase {
            Phase::Connecting { retry_at } => self.step_connecting(stack, now, retry_at),
            Phase::Listening => {
                let state = stack.tcp(self.handle).state();
                if !matches!(state, State::Listen | State::SynReceived) {
                    info!(role = ?self.role, ?state, "connection accepted");
                    self.phase = Phase::Open;
                    self.last_activity = now;
                    true
                } else {
                    false
                }
            }
            Phase::Open => match self.role {
                StreamRole::Sender => self.step_sender(stack.tcp(self.handle), now),
                StreamRole::Receiver => self.step_receiver(stack.tcp(self.handle), now),
                StreamRole::PingClient => self.step_ping(stack.tcp(self.handle), now),
                StreamRole::EchoServer => self.step_echo(stack.tcp(self.handle), now),
            },
            Phase::Closing { since } => {
                let state = stack.tcp(self.handle).state();
                if matches!(state, State::Closed | State::TimeWait) {
                    self.phase = Phase::Done;
                } else if now.saturating_duration_since(since) > CLOSE_LINGER {
                    debug!(?state, "the peer did not acknowledge our FIN in time");
                    self.phase = Phase::Done;
                }
                false
            }
            Phase::Done => false,
        };
        if self.phase != Phase::Done
            && !matches!(self.phase, Phase::Closing { .. })
            && now.saturating_duration_since(self.last_activity) > self.params.stall_timeout
        {
            self.report.timeouts += 1;
            let at = match self.phase {
                Phase::Connecting { .. } => "connecting",
                Phase::Listening => "waiting for a connection",
                _ => "with the connection open",
            };
            self.report.fail(format!(
                "timeout: nothing moved for {:?} {at} (at stream offset {})",
                self.params.stall_timeout,
                self.offset()
            ));
            self.phase = Phase::Done;
        }
        acted
    }

    fn offset(&self) -> u64 {
        match self.role {
            StreamRole::Sender => self.acked,
            _ => self.verifier.bytes(),
        }
    }

    fn step_connecting(
        &mut self,
        stack: &mut NetStack<'_>,
        now: Instant,
        retry_at: Option<Instant>,
    ) -> bool {
        if let Some(at) = retry_at {
            if now < at {
                return false;
            }
            if let Err(err) = self.connect(stack) {
                self.report.fail(chain(&err));
                self.phase = Phase::Done;
                return false;
            }
            self.phase = Phase::Connecting { retry_at: None };
            return true;
        }
        match stack.tcp(self.handle).state() {
            State::SynSent => false,
            State::Closed => {
                // Refused (RST to our SYN): the peer is not listening yet.
                self.report.connect_refused += 1;
                self.phase = Phase::Connecting {
                    retry_at: Some(now + CONNECT_RETRY),
                };
                false
            }
            state => {
                info!(role = ?self.role, ?state, "connected");
                self.phase = Phase::Open;
                self.last_activity = now;
                true
            }
        }
    }

    /// The connection ended without an orderly close.
    fn reset(&mut self, state: State) {
        self.report.resets += 1;
        self.report.fail(format!(
            "connection reset ({state}) at stream offset {}",
            self.offset()
        ));
        self.phase = Phase::Done;
    }

    fn step_sender(&mut self, socket: &mut tcp::Socket<'static>, now: Instant) -> bool {
        let mut acted = false;
        let pattern = StreamPattern::new(self.params.seed);
        while self.written < self.params.bytes && socket.can_send() {
            let start = self.written;
            let want = self.params.bytes - start;
            let crc = &mut self.written_crc;
            let sent = socket.send(|buf| {
                let n = buf.len().min(usize::try_from(want).unwrap_or(usize::MAX));
                pattern.fill(start, &mut buf[..n]);
                crc.update(&buf[..n]);
                (n, n)
            });
            match sent {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    self.written += n as u64;
                    acted = true;
                }
            }
        }
        let acked = self.written - socket.send_queue() as u64;
        if acked > self.acked {
            self.acked = acked;
            self.progress(now, acked);
        }
        if self.written == self.params.bytes && !self.closed {
            socket.close();
            self.closed = true;
            acted = true;
        }
        let state = socket.state();
        let all_acked = self.acked == self.params.bytes;
        match state {
            // Both FINs exchanged: the receiver saw the whole stream.
            State::TimeWait => self.phase = Phase::Done,
            State::Closed if all_acked && self.closed => self.phase = Phase::Done,
            State::Closed | State::Listen | State::SynSent | State::SynReceived => {
                self.reset(state)
            }
            // Every byte is acknowledged and our FIN is out: the stream is
            // delivered. The rest of the close is best effort, as for the
            // other roles: on a lossy link the receiver's FIN may be lost
            // after it has stopped, and waiting for it would turn a
            // delivered stream into a stall (seen once on a fresh clone).
            _ if all_acked && self.closed => self.phase = Phase::Closing { since: now },
            _ => {}
        }
        acted
    }

    fn step_receiver(&mut self, socket: &mut tcp::Socket<'static>, now: Instant) -> bool {
        // Reading opens the window: poll again so the update goes out now,
        // not at the next timer.
        let mut acted = false;
        loop {
            let verifier = &mut self.verifier;
            match socket.recv(|data| {
                verifier.feed(data);
                (data.len(), data.len())
            }) {
                Ok(0) => break,
                Ok(_) => {
                    acted = true;
                    let offset = self.verifier.bytes();
                    self.progress(now, offset);
                    if offset > self.params.bytes && !self.overrun {
                        self.overrun = true;
                        self.report.fail(format!(
                            "the stream runs past its {} bytes",
                            self.params.bytes
                        ));
                    }
                }
                Err(RecvError::Finished) => {
                    let got = self.verifier.bytes();
                    if got != self.params.bytes {
                        self.report.fail(format!(
                            "stream ended after {got} of {} bytes",
                            self.params.bytes
                        ));
                    }
                    socket.close();
                    self.phase = Phase::Closing { since: now };
                    return true;
                }
                Err(RecvError::InvalidState) => {
                    self.reset(socket.state());
                    return false;
                }
            }
        }
        if self.verifier.bytes() == self.params.bytes {
            // Every byte is in and verified: the stream is delivered. The
            // close is best effort (the sender's FIN may be lost on a lossy
            // link after the sender has stopped), as on the sender's side.
            socket.close();
            self.phase = Phase::Closing { since: now };
            return true;
        }
        if !socket.is_active() {
            self.reset(socket.state());
        }
        acted
    }

    fn step_ping(&mut self, socket: &mut tcp::Socket<'static>, now: Instant) -> bool {
        let size = self.params.request_bytes as u64;
        let pattern = StreamPattern::new(self.params.seed);
        let mut acted = false;
        // Start the next request once the previous echo is complete.
        if self.request_started.is_none() && self.report.requests_done < self.params.requests {
            self.request_started = Some(now);
            self.request_written = 0;
        }
        if self.request_started.is_some() && self.request_written < self.params.request_bytes {
            let start = self.report.requests_done * size + self.request_written as u64;
            let rest = self.params.request_bytes - self.request_written;
            match socket.send(|buf| {
                let n = buf.len().min(rest);
                pattern.fill(start, &mut buf[..n]);
                (n, n)
            }) {
                Ok(n) => {
                    self.request_written += n;
                    acted |= n > 0;
                }
                Err(_) => {
                    self.reset(socket.state());
                    return false;
                }
            }
        }
        loop {
            let verifier = &mut self.verifier;
            match socket.recv(|data| {
                verifier.feed(data);
                (data.len(), data.len())
            }) {
                Ok(0) => break,
                Ok(_) => {
                    acted = true;
                    let offset = self.verifier.bytes();
                    self.progress(now, offset);
                    let in_flight = u64::from(self.request_started.is_some());
                    let written = (self.report.requests_done + in_flight).saturating_mul(size);
                    if offset > written {
                        self.report.fail(format!(
                            "echo ran ahead of the requests: {offset} bytes back, {written} written"
                        ));
                        self.phase = Phase::Done;
                        return false;
                    }
                    if in_flight == 1 && offset == written {
                        if let Some(started) = self.request_started.take() {
                            self.latency
                                .record_duration(now.saturating_duration_since(started));
                        }
                        self.report.requests_done += 1;
                        acted = true;
                    }
                }
                Err(RecvError::Finished) => {
                    // The echo server closes only after our FIN.
                    if self.report.requests_done < self.params.requests {
                        self.report.fail(format!(
                            "the echo server closed after {} of {} requests",
                            self.report.requests_done, self.params.requests
                        ));
                    }
                    self.phase = Phase::Closing { since: now };
                    return true;
                }
                Err(RecvError::InvalidState) => {
                    self.reset(socket.state());
                    return false;
                }
            }
        }
        if self.report.requests_done == self.params.requests && !self.closed {
            socket.close();
            self.closed = true;
            acted = true;
        }
        if !socket.is_active() {
            self.reset(socket.state());
        }
        acted
    }

    fn step_echo(&mut self, socket: &mut tcp::Socket<'static>, now: Instant) -> bool {
        let mut acted = false;
        let room = self
            .params
            .socket_buffer
            .saturating_sub(self.echo_pending.len());
        let mut finished = false;
        if room > 0 {
            let verifier = &mut self.verifier;
            let pending = &mut self.echo_pending;
            match socket.recv(|data| {
                let n = data.len().min(room);
                verifier.feed(&data[..n]);
                pending.extend_from_slice(&data[..n]);
                (n, n)
            }) {
                Ok(0) => {}
                Ok(_) => {
                    acted = true;
                    let offset = self.verifier.bytes();
                    self.progress(now, offset);
                }
                Err(RecvError::Finished) => finished = true,
                Err(RecvError::InvalidState) => {
                    self.reset(socket.state());
                    return false;
                }
            }
        }
        if !self.echo_pending.is_empty() && socket.can_send() {
            match socket.send_slice(&self.echo_pending) {
                Ok(n) if n > 0 => {
                    self.echo_pending.drain(..n);
                    acted = true;
                }
                Ok(_) => {}
                Err(_) => {
                    self.reset(socket.state());
                    return false;
                }
            }
        }
        if finished && self.echo_pending.is_empty() {
            let got = self.verifier.bytes();
            if got != self.report.bytes_expected {
                self.report.fail(format!(
                    "the client sent {got} bytes, not {}",
                    self.report.bytes_expected
                ));
            }
            socket.close();
            self.phase = Phase::Closing { since: now };
            return true;
        }
        if !socket.is_active() {
            self.reset(socket.state());
        }
        acted
    }

    fn finish(mut self, stack: &NetStack<'_>) -> StreamReport {
        let now = Instant::now();
        let report = &mut self.report;
        match self.role {
            StreamRole::Sender => {
                report.bytes = self.acked;
                report.checksum = self.written_crc.value();
            }
            _ => {
                report.bytes = self.verifier.bytes();
                report.checksum = self.verifier.checksum();
                report.first_mismatch = self.verifier.first_mismatch();
                report.mismatched_bytes = self.verifier.mismatched_bytes();
            }
        }
        if self.role == StreamRole::PingClient {
            report.latency = Some(self.latency.summary());
        }
        report.max_gap_ms = self.max_gap.as_secs_f64() * 1e3;
        report.elapsed_ms = now.saturating_duration_since(self.started).as_secs_f64() * 1e3;
        if let (Some(first), Some(last)) = (self.first_progress, self.last_progress) {
            let secs = last.saturating_duration_since(first).as_secs_f64();
            if secs > 0.0 {
                report.throughput_mib_s = report.bytes as f64 / secs / f64::from(1u32 << 20);
            }
        }
        report.phy = stack.phy_stats();
        if let Some(m) = report.first_mismatch {
            report.fail(format!("data mismatch: {m}"));
        }
        info!(
            role = ?report.role,
            bytes = report.bytes,
            checksum = format_args!("{:#010x}", report.checksum),
            max_gap_ms = report.max_gap_ms,
            failures = report.failure_count,
            "stream workload finished"
        );
        self.report
    }
}
