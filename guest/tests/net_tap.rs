//! The guest stack against Linux's own TCP: a TAP device in a fresh
//! network namespace, smoltcp on the TAP's fd, plain `std::net` sockets on
//! the kernel side of the same link.
//!
//! Each test runs in its own thread, moved into a new network namespace
//! with `unshare(CLONE_NEWNET)` (which moves only the calling thread), so
//! the tests share no interface or address with each other or the host.
//! Needs root (CAP_NET_ADMIN) and /dev/net/tun, which the test machines
//! have; the interface is configured with ioctls, so no `ip` tool is needed.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::thread;
use std::time::Duration;

use shadowback_guest::net::{
    run_stream, FrameDevice, FrameError, NetConfig, StreamParams, StreamPattern, StreamReport,
    StreamRole, StreamVerifier,
};

const TAP_NAME: &str = "sbtap0";
/// The kernel's side of the link.
const LINUX_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The guest stack's side.
const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const MTU: usize = 1500;
const MIB: u64 = 1 << 20;
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// `struct ifreq`: a 16-byte name and a 24-byte union.
type IfReq = [u8; 40];

fn ifreq(name: &str) -> IfReq {
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    req
}

/// `ioctl(fd, request, &mut req)`, with the errno as an error.
fn ioctl(fd: BorrowedFd<'_>, request: libc::c_ulong, req: &mut IfReq) -> std::io::Result<()> {
    // SAFETY: every request passed here (TUNSETIFF and the SIOC[GS]IF*
    // ones) reads and writes at most a `struct ifreq` (40 bytes on 64-bit
    // Linux), which `req` is, and `fd` is open for the call's duration.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, req.as_mut_ptr()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Moves the calling thread into a new, empty network namespace.
fn enter_fresh_netns() {
    // SAFETY: unshare takes no pointers; CLONE_NEWNET only changes the
    // calling thread's namespace, which nothing else in the test uses.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET) needs root: {}",
        std::io::Error::last_os_error()
    );
}

/// Sets an IPv4 address-type field of an interface (`SIOCSIFADDR`,
/// `SIOCSIFNETMASK`).
fn set_if_addr(sock: &UdpSocket, request: libc::c_ulong, addr: Ipv4Addr) {
    let mut req = ifreq(TAP_NAME);
    // struct sockaddr_in: family (host order), port, address.
    req[16..18].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    req[20..24].copy_from_slice(&addr.octets());
    ioctl(sock.as_fd(), request, &mut req).expect("set interface address");
}

/// A TAP device as a [`FrameDevice`].
struct Tap {
    file: File,
    mac: [u8; 6],
}

impl Tap {
    /// Creates the TAP in the current thread's namespace, gives the kernel
    /// side `LINUX_ADDR/24` and brings it up.
    fn create() -> Tap {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .expect("open /dev/net/tun");
        let mut req = ifreq(TAP_NAME);
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as u16;
        req[16..18].copy_from_slice(&flags.to_ne_bytes());
        ioctl(file.as_fd(), libc::TUNSETIFF as _, &mut req).expect("TUNSETIFF");

        let sock = UdpSocket::bind("0.0.0.0:0").expect("a socket for interface ioctls");
        set_if_addr(&sock, libc::SIOCSIFADDR as _, LINUX_ADDR);
        set_if_addr(
            &sock,
            libc::SIOCSIFNETMASK as _,
            Ipv4Addr::new(255, 255, 255, 0),
        );
        let mut req = ifreq(TAP_NAME);
        ioctl(sock.as_fd(), libc::SIOCGIFFLAGS as _, &mut req).expect("SIOCGIFFLAGS");
        let flags = i16::from_ne_bytes([req[16], req[17]]) | libc::IFF_UP as i16;
        req[16..18].copy_from_slice(&flags.to_ne_bytes());
        ioctl(sock.as_fd(), libc::SIOCSIFFLAGS as _, &mut req).expect("SIOCSIFFLAGS");
        Tap {
            file,
            mac: [0x02, 0, 0, 0x77, 0, 0x02],
        }
    }
}

impl FrameDevice for Tap {
    fn send(&mut self, frame: &[u8]) -> Result<(), FrameError> {
        match self.file.write(frame) {
            Ok(_) => Ok(()),
            // The TAP's queue is full: drop, as a NIC would.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(FrameError::Io(e)),
        }
    }

    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<bool, FrameError> {
        // Room for anything the kernel could write; the stack drops what
        // exceeds the MTU.
        buf.resize(65536, 0);
        match self.file.read(buf) {
            Ok(n) => {
                buf.truncate(n);
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(FrameError::Io(e)),
        }
    }

    fn wait_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }

    fn poll_again_in(&self) -> Option<Duration> {
        None
    }

    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn mtu(&self) -> usize {
        MTU
    }
}

fn guest_params(seed: u64, port: u16) -> StreamParams {
    StreamParams {
        net: NetConfig {
            address: GUEST_ADDR,
            prefix_len: 24,
            gateway: None,
            seed,
        },
        peer: LINUX_ADDR,
        port,
        seed,
        stall_timeout: Duration::from_secs(20),
        ..StreamParams::default()
    }
}

/// Runs `test` in a thread of its own, in a fresh namespace with the TAP.
fn in_netns<T: Send + 'static>(test: impl FnOnce(Tap) -> T + Send + 'static) -> T {
    thread::spawn(move || {
        enter_fresh_netns();
        test(Tap::create())
    })
    .join()
    .expect("the namespace thread panicked")
}

/// Starts the guest side on the TAP in a thread (still inside the namespace).
fn spawn_guest(
    mut tap: Tap,
    role: StreamRole,
    params: StreamParams,
) -> thread::JoinHandle<StreamReport> {
    thread::spawn(move || run_stream(&mut tap, role, &params))
}

fn assert_passed(report: &StreamReport) {
    eprintln!("{}", serde_json::to_string(report).unwrap());
    assert!(report.passed(), "{report:#?}");
}

#[test]
fn guest_stream_to_a_linux_socket_verifies() {
    let (report, linux_bytes, linux_crc, mismatch) = in_netns(|tap| {
        let listener = TcpListener::bind(SocketAddrV4::new(LINUX_ADDR, 5001)).unwrap();
        let params = StreamParams {
            bytes: 4 * MIB,
            ..guest_params(21, 5001)
        };
        let guest = spawn_guest(tap, StreamRole::Sender, params);
        let (mut conn, peer) = listener.accept().unwrap();
        assert_eq!(peer.ip(), std::net::IpAddr::V4(GUEST_ADDR));
        conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut verifier = StreamVerifier::new(21);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = conn.read(&mut buf).expect("read from the guest");
            if n == 0 {
                break;
            }
            verifier.feed(&buf[..n]);
        }
        drop(conn);
        let report = guest.join().unwrap();
        (
            report,
            verifier.bytes(),
            verifier.checksum(),
            verifier.first_mismatch(),
        )
    });
    assert_passed(&report);
    assert_eq!(mismatch, None);
    assert_eq!((report.bytes, linux_bytes), (4 * MIB, 4 * MIB));
    assert_eq!(report.checksum, linux_crc);
}

#[test]
fn linux_stream_to_the_guest_verifies() {
    const BYTES: u64 = 4 * MIB;
    let (report, linux_crc) = in_netns(|tap| {
        let params = StreamParams {
            bytes: BYTES,
            ..guest_params(22, 5002)
        };
        let guest = spawn_guest(tap, StreamRole::Receiver, params);
        // The guest listens once its stack runs; retry until it does.
        let mut conn = None;
        for _ in 0..200 {
            match TcpStream::connect_timeout(
                &SocketAddrV4::new(GUEST_ADDR, 5002).into(),
                Duration::from_secs(2),
            ) {
                Ok(c) => {
                    conn = Some(c);
                    break;
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
        let mut conn = conn.expect("connect to the guest");
        conn.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let pattern = StreamPattern::new(22);
        let mut crc = shadowback_guest::net::Crc32::new();
        let mut chunk = vec![0u8; 50_000];
        let mut at = 0u64;
        while at < BYTES {
            let n = chunk.len().min((BYTES - at) as usize);
            pattern.fill(at, &mut chunk[..n]);
            conn.write_all(&chunk[..n]).expect("write to the guest");
            crc.update(&chunk[..n]);
            at += n as u64;
        }
        conn.shutdown(Shutdown::Write).unwrap();
        // The guest closes its side once it has checked everything.
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).expect("the guest's FIN");
        assert!(rest.is_empty(), "the receiver sends nothing");
        (guest.join().unwrap(), crc.value())
    });
    assert_passed(&report);
    assert_eq!(report.bytes, BYTES);
    assert_eq!(report.checksum, linux_crc);
}

#[test]
fn ping_pong_against_a_linux_echo_server() {
    let report = in_netns(|tap| {
        let listener = TcpListener::bind(SocketAddrV4::new(LINUX_ADDR, 5003)).unwrap();
        let params = StreamParams {
            requests: 200,
            request_bytes: 100,
            ..guest_params(23, 5003)
        };
        let guest = spawn_guest(tap, StreamRole::PingClient, params);
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        conn.set_nodelay(true).unwrap();
        let mut buf = vec![0u8; 4096];
        loop {
            let n = conn.read(&mut buf).expect("read a request");
            if n == 0 {
                break;
            }
            conn.write_all(&buf[..n]).expect("echo it");
        }
        drop(conn);
        guest.join().unwrap()
    });
    assert_passed(&report);
    assert_eq!(report.requests_done, 200);
    let lat = report.latency.expect("latency");
    assert!(lat.p50_us > 0.0 && lat.p50_us <= lat.p99_us, "{lat:?}");
}
