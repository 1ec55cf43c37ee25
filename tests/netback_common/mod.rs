//! What the netback tests share: a `shadowback netback` process started
//! the way the supervisor will start it, and the `attach-net` a
//! supervisor sends it (docs/PROTOCOL.md §6c).

#![allow(dead_code)]

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::Duration;

use shadowback_xenbus::netif::{MacAddr, NetAttachRequest, NetConnectRequest, NetFeatures};
use shadowback_xenbus::{Message, SeqPacket};

pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// One `shadowback netback` process and our end of its control socket.
pub struct NetbackProcess {
    pub child: Child,
    pub control: SeqPacket,
}

impl NetbackProcess {
    /// Starts `shadowback netback` with a fresh control socket as fd 3.
    pub fn spawn(env: &[(&str, String)]) -> Self {
        Self::spawn_with(env, false)
    }

    /// Like [`NetbackProcess::spawn`], with the process's log (stderr) on a
    /// pipe the test reads through `child.stderr` once it has killed it.
    pub fn spawn_logging(env: &[(&str, String)]) -> Self {
        Self::spawn_with(env, true)
    }

    #[allow(unsafe_code, reason = "`pre_exec`: fd set-up between fork and exec")]
    fn spawn_with(env: &[(&str, String)], log_to_pipe: bool) -> Self {
        let (ours, theirs) = SeqPacket::pair().unwrap();
        let theirs: OwnedFd = theirs.into_fd();
        let src = theirs.as_raw_fd();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shadowback"));
        cmd.args(["netback", "--device", "vif0", "--control-fd", "3"])
            .envs(env.iter().map(|(k, v)| (k, v)));
        // SAFETY: runs in the forked child before exec and calls only fcntl
        // and dup2 (async-signal-safe) on an fd open in the parent.
        unsafe {
            cmd.pre_exec(move || {
                let c = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, 10);
                if c < 0 || libc::dup2(c, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        if log_to_pipe {
            cmd.stderr(std::process::Stdio::piped());
        }
        let child = cmd.spawn().expect("spawn shadowback netback");
        drop(theirs);
        NetbackProcess {
            child,
            control: ours,
        }
    }

    /// Sends `attach-net` and returns the `attached` answer.
    pub fn attach(&self, msg: &Message, fds: &[BorrowedFd<'_>]) -> Message {
        self.control.send(msg, fds).unwrap();
        let (msg, _) = self
            .control
            .recv_timeout(REPLY_TIMEOUT)
            .expect("control socket")
            .expect("backend answered in time");
        assert_eq!(msg.kind(), "attached", "{msg:?}");
        msg
    }

    /// SIGKILL (if still running) and reap.
    pub fn kill_in_place(&mut self) {
        let _ = self.child.kill();
        self.child.wait().unwrap();
    }
}

/// The `connect` of the test guest's `vif0` (frontend 1, one event
/// channel, checksum offload accepted).
pub fn test_connect(
    grant_frames: u32,
    tx_ring_ref: u32,
    rx_ring_ref: u32,
    features: NetFeatures,
) -> NetConnectRequest {
    NetConnectRequest {
        device: "vif0".into(),
        frontend_id: 1,
        grant_frames,
        tx_ring_ref,
        rx_ring_ref,
        features,
        no_csum_offload: false,
        split_event_channels: false,
        multicast_control: false,
    }
}

/// The `attach-net` of a vif on a cable, with both shadow logs.
pub fn attach_message(connect: NetConnectRequest, recover: bool, blame: bool) -> Message {
    attach_message_on(connect, "cable", true, recover, blame)
}

/// The `attach-net` of a vif on `wire` (`cable` or `tap`), with both
/// shadow logs or none.
pub fn attach_message_on(
    connect: NetConnectRequest,
    wire: &str,
    shadow: bool,
    recover: bool,
    blame: bool,
) -> Message {
    NetAttachRequest {
        frontend: "test-guest".into(),
        connect,
        mac: MacAddr([2, 0, 0, 0, 0, 1]),
        mtu: 1500,
    }
    .to_message()
    .with("wire", wire)
    .with("shadow", u8::from(shadow))
    .with("recover", u8::from(recover))
    // 0: killed from outside, not the requests' fault.
    .with("blame", u8::from(blame))
}

const ETHERTYPE_TEST: u16 = 0x88b5;

/// A test frame: Ethernet header, the sequence number, then a pattern of
/// both.
pub fn frame(seq: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f[12..14].copy_from_slice(&ETHERTYPE_TEST.to_be_bytes());
    f[14..18].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in f[18..].iter_mut().enumerate() {
        *b = (seq as usize).wrapping_mul(31).wrapping_add(i) as u8;
    }
    f
}

/// The sequence number of a frame built by [`frame`], after checking
/// every byte of it.
pub fn check_frame(f: &[u8]) -> u32 {
    assert!(f.len() >= 18, "short frame of {} bytes", f.len());
    let seq = u32::from_le_bytes(f[14..18].try_into().unwrap());
    assert_eq!(f, &frame(seq, f.len())[..], "frame {seq} corrupted");
    seq
}

/// An `AF_PACKET` socket on interface `ifname` that gets every frame with
/// the kernel's virtio-net header in front (`PACKET_VNET_HDR`).
#[allow(
    unsafe_code,
    reason = "packet sockets; no wrapper in the test's dependencies"
)]
pub fn packet_socket(ifname: &str) -> OwnedFd {
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket takes no pointers; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(all)) };
    assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
    // SAFETY: fd was just opened and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: PACKET_VNET_HDR reads an int, which `one` is, for its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_VNET_HDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "PACKET_VNET_HDR: {}",
        std::io::Error::last_os_error()
    );
    let name = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "no interface {ifname}");
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = all;
    addr.sll_ifindex = index as i32;
    // SAFETY: `addr` is a sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    fd
}

/// Frames a packet socket dropped (its receive buffer was full) since the
/// previous call (`PACKET_STATISTICS` resets the kernel's counts).
pub fn packet_drops(sock: &OwnedFd) -> u32 {
    // SAFETY: tpacket_stats is plain data; all-zero is a valid value.
    let mut stats: libc::tpacket_stats = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: PACKET_STATISTICS writes a tpacket_stats of at most `len`
    // bytes into `stats`, which is that big.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            (&mut stats as *mut libc::tpacket_stats).cast(),
            &mut len,
        )
    };
    assert_eq!(
        rc,
        0,
        "PACKET_STATISTICS: {}",
        std::io::Error::last_os_error()
    );
    stats.tp_drops
}
