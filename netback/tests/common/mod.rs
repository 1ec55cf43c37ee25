//! Helpers shared by the wire tests: a "backend" child process that is
//! handed a wire fd over `SCM_RIGHTS` as a real backend is, hand-built
//! Ethernet/IPv4/UDP frames, and (for the TAP tests) a network namespace.
//!
//! The backend child is the test binary itself, re-executed with the
//! `backend_child_entry` filter and `WIRE_CHILD_SOCK` set: it connects to
//! the parent's socket, receives the fd, and obeys one-line commands.

#![allow(dead_code)] // each test binary uses part of it

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use shadowback_netback::wire::{SendOutcome, VnetHeaderLen, Wire, WireKind};

const SOCK_ENV: &str = "WIRE_CHILD_SOCK";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `prefix`, pid, counter; short
/// enough for an interface name when `prefix` is at most 3 bytes.
pub fn unique(prefix: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 1_000_000)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

// ---------------------------------------------------------------------------
// The backend child.

/// Runs the child side when this process was started as one; never
/// returns then. Otherwise returns at once.
pub fn run_child_if_asked() {
    let Some(path) = std::env::var_os(SOCK_ENV) else {
        return;
    };
    let stream = UnixStream::connect(PathBuf::from(path)).expect("child: connect");
    // The first message: "<tap|cable> <header bytes>" and the wire fd.
    let mut data = [0u8; 64];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [std::io::IoSliceMut::new(&mut data)];
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .expect("child: recvmsg");
    let mut fd = None;
    for c in msg.cmsgs().expect("child: cmsgs") {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: SCM_RIGHTS just installed this fd in this process;
            // nothing else owns it.
            fd = fds.first().map(|&raw| unsafe { OwnedFd::from_raw_fd(raw) });
        }
    }
    let n = msg.bytes;
    let head = String::from_utf8_lossy(&data[..n]).into_owned();
    let mut words = head.split_whitespace();
    let kind = match words.next() {
        Some("tap") => WireKind::Tap,
        Some("cable") => WireKind::Cable,
        other => panic!("child: kind {other:?}"),
    };
    let hdr = words
        .next()
        .and_then(|w| w.parse().ok())
        .and_then(VnetHeaderLen::from_bytes)
        .expect("child: header length");
    let mut wire = Wire::from_fd(kind, fd.expect("child: no fd"), hdr).expect("child: wire");
    let mut out = stream.try_clone().unwrap();
    let mut buf = vec![0u8; wire.recv_buf_len()];
    for line in BufReader::new(stream).lines() {
        let line = line.expect("child: read command");
        let mut words = line.split_whitespace();
        let reply = match words.next() {
            Some("send") => match wire.send(&unhex(words.next().unwrap_or(""))) {
                Ok(SendOutcome::Sent) => "sent".to_owned(),
                Ok(SendOutcome::Dropped(r)) => format!("dropped {r:?}"),
                Err(e) => format!("error {e}"),
            },
            Some("recv") => {
                let ms: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(1000);
                match recv_wait(&mut wire, &mut buf, Duration::from_millis(ms)) {
                    Some(n) => format!("frame {}", hex(&buf[..n])),
                    None => "none".to_owned(),
                }
            }
            Some("hold") => {
                writeln!(out, "holding").unwrap();
                loop {
                    std::thread::sleep(Duration::from_secs(60));
                }
            }
            Some("exit") => std::process::exit(0),
            other => format!("error unknown command {other:?}"),
        };
        writeln!(out, "{reply}").unwrap();
    }
    std::process::exit(0);
}

/// Waits up to `timeout` for one frame.
pub fn recv_wait(wire: &mut Wire, buf: &mut [u8], timeout: Duration) -> Option<usize> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(n) = wire.recv(buf).expect("recv") {
            return Some(n);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let ms = u16::try_from(left.as_millis().min(1000)).unwrap();
        let mut fds = [PollFd::new(wire.fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(ms));
    }
}

/// A backend process holding a duplicate of a wire fd.
pub struct Backend {
    child: Child,
    commands: UnixStream,
    replies: BufReader<UnixStream>,
    path: PathBuf,
}

impl Backend {
    /// Starts a child with the given test binary entry and hands it `fd`
    /// (duplicated by SCM_RIGHTS, as the supervisor does).
    pub fn start(entry: &str, kind: &str, hdr: VnetHeaderLen, fd: BorrowedFd<'_>) -> Self {
        let path = std::env::temp_dir().join(format!("{}.sock", unique("sbwire")));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind child socket");
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                entry,
                "--nocapture",
                "--quiet",
                "--test-threads=1",
            ])
            .env(SOCK_ENV, &path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn backend child");
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "backend child never connected");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let head = format!("{kind} {}", hdr.bytes());
        let raw = [fd.as_raw_fd()];
        sendmsg::<()>(
            stream.as_raw_fd(),
            &[std::io::IoSlice::new(head.as_bytes())],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .expect("pass the wire fd");
        Backend {
            replies: BufReader::new(stream.try_clone().unwrap()),
            commands: stream,
            child,
            path,
        }
    }

    pub fn command(&mut self, line: &str) -> String {
        writeln!(self.commands, "{line}").expect("command to child");
        let mut reply = String::new();
        self.replies
            .read_line(&mut reply)
            .expect("reply from child");
        reply.trim_end().to_owned()
    }

    pub fn send(&mut self, frame: &[u8]) -> String {
        self.command(&format!("send {}", hex(frame)))
    }

    /// The next frame the backend reads, if one comes within `ms`.
    pub fn recv(&mut self, ms: u64) -> Option<Vec<u8>> {
        let reply = self.command(&format!("recv {ms}"));
        reply.strip_prefix("frame ").map(unhex)
    }

    /// Parks the child and kills it with SIGKILL: a backend crash.
    pub fn kill(mut self) -> ExitStatus {
        assert_eq!(self.command("hold"), "holding");
        self.child.kill().expect("SIGKILL the backend");
        let status = self.child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        status
    }

    /// Tells the child to exit by itself, closing its fds.
    pub fn exit(mut self) -> ExitStatus {
        writeln!(self.commands, "exit").unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.path);
    }
}

// ---------------------------------------------------------------------------
// Frames.

pub const ETH_IPV4: u16 = 0x0800;
pub const IPPROTO_UDP: u8 = 17;
/// Offsets in an Ethernet + IPv4 (no options) + UDP frame.
pub const IP_AT: usize = 14;
pub const UDP_AT: usize = 34;
pub const PAYLOAD_AT: usize = 42;

/// The Internet checksum (RFC 1071) of `parts`, concatenated.
pub fn inet_checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for part in parts {
        for &b in *part {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn udp_pseudo_header(src: [u8; 4], dst: [u8; 4], udp_len: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&[0, IPPROTO_UDP]);
    p.extend_from_slice(&udp_len.to_be_bytes());
    p
}

pub struct Udp {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_ip: [u8; 4],
    pub dst_ip: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
}

/// An Ethernet + IPv4 + UDP frame with correct checksums.
pub fn udp_frame(u: &Udp, payload: &[u8]) -> Vec<u8> {
    let udp_len = u16::try_from(8 + payload.len()).unwrap();
    let ip_len = 20 + udp_len;
    let mut f = Vec::with_capacity(14 + usize::from(ip_len));
    f.extend_from_slice(&u.dst_mac);
    f.extend_from_slice(&u.src_mac);
    f.extend_from_slice(&ETH_IPV4.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = IPPROTO_UDP;
    ip[12..16].copy_from_slice(&u.src_ip);
    ip[16..20].copy_from_slice(&u.dst_ip);
    let c = inet_checksum(&[&ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut udp = Vec::with_capacity(usize::from(udp_len));
    udp.extend_from_slice(&u.src_port.to_be_bytes());
    udp.extend_from_slice(&u.dst_port.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let c = inet_checksum(&[&udp_pseudo_header(u.src_ip, u.dst_ip, udp_len), &udp]);
    udp[6..8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
    f.extend_from_slice(&udp);
    f
}

/// A UDP datagram found in a frame.
#[derive(Debug)]
pub struct ParsedUdp {
    pub dst_mac: [u8; 6],
    pub src_ip: [u8; 4],
    pub dst_ip: [u8; 4],
    pub dst_port: u16,
    pub payload: Vec<u8>,
    pub ip_checksum_ok: bool,
    /// The UDP checksum field as sent.
    pub udp_checksum: u16,
    /// Whether the UDP checksum verifies.
    pub udp_checksum_ok: bool,
}

/// Parses an Ethernet + IPv4 + UDP frame; `None` for anything else.
pub fn parse_udp(frame: &[u8]) -> Option<ParsedUdp> {
    if frame.len() < PAYLOAD_AT || frame[12..14] != ETH_IPV4.to_be_bytes() {
        return None;
    }
    let ip = &frame[IP_AT..UDP_AT];
    if ip[0] != 0x45 || ip[9] != IPPROTO_UDP {
        return None;
    }
    let udp_len = usize::from(u16::from_be_bytes([frame[UDP_AT + 4], frame[UDP_AT + 5]]));
    let udp = frame.get(UDP_AT..UDP_AT + udp_len)?;
    let src_ip: [u8; 4] = ip[12..16].try_into().unwrap();
    let dst_ip: [u8; 4] = ip[16..20].try_into().unwrap();
    let udp_checksum = u16::from_be_bytes([udp[6], udp[7]]);
    let pseudo = udp_pseudo_header(src_ip, dst_ip, u16::try_from(udp_len).ok()?);
    Some(ParsedUdp {
        dst_mac: frame[..6].try_into().unwrap(),
        src_ip,
        dst_ip,
        dst_port: u16::from_be_bytes([udp[2], udp[3]]),
        payload: udp[8..].to_vec(),
        ip_checksum_ok: inet_checksum(&[ip]) == 0,
        udp_checksum,
        udp_checksum_ok: inet_checksum(&[&pseudo, udp]) == 0,
    })
}

/// The one's-complement sum of the UDP pseudo-header, not inverted: what
/// a sender that leaves the checksum to the other side puts in the
/// checksum field (VIRTIO_NET_HDR_F_NEEDS_CSUM).
pub fn udp_partial_checksum(src: [u8; 4], dst: [u8; 4], udp_len: u16) -> u16 {
    !inet_checksum(&[&udp_pseudo_header(src, dst, udp_len)])
}
