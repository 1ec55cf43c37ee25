//! The two kernel interfaces the TAP benchmarks need that have no safe
//! wrapper in the workspace: entering a fresh network namespace, and an
//! `AF_PACKET` socket whose kernel counter counts frames for us.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::CliError;

/// Moves the calling thread into a new, empty network namespace (root).
#[allow(
    unsafe_code,
    reason = "unshare(2) has no wrapper with the features enabled"
)]
pub fn unshare_net() -> Result<(), CliError> {
    // SAFETY: unshare takes no pointers; CLONE_NEWNET only changes the
    // calling thread's namespace.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(format!(
            "unshare(CLONE_NEWNET): {} (needs root)",
            std::io::Error::last_os_error()
        )
        .into());
    }
    Ok(())
}

/// A packet socket bound to one interface and one EtherType that nobody
/// reads: its receive buffer is kept small, and the kernel counts every
/// frame delivered to it, queued or dropped (`PACKET_STATISTICS`:
/// `tp_packets` includes `tp_drops`).
pub struct PacketCounter {
    fd: OwnedFd,
    total: u64,
}

impl PacketCounter {
    /// Opens the socket in the calling thread's namespace, where `ifname`
    /// must be.
    #[allow(unsafe_code, reason = "socket(2), bind(2) with a sockaddr_ll")]
    pub fn open(ifname: &str, ethertype: u16) -> Result<Self, CliError> {
        let proto = ethertype.to_be();
        let name = CString::new(ifname)?;
        // SAFETY: `name` is a valid NUL-terminated string for the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(format!("{ifname}: {}", std::io::Error::last_os_error()).into());
        }
        // SAFETY: plain socket(2) call, no pointers.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::c_int::from(proto),
            )
        };
        if raw < 0 {
            return Err(format!("AF_PACKET socket: {}", std::io::Error::last_os_error()).into());
        }
        // SAFETY: `raw` was just returned by socket(2) and is owned by
        // nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as libc::c_ushort;
        addr.sll_protocol = proto;
        addr.sll_ifindex = libc::c_int::try_from(ifindex)?;
        // SAFETY: `addr` is a valid sockaddr_ll and the length says so.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(format!("bind AF_PACKET: {}", std::io::Error::last_os_error()).into());
        }
        // Nobody reads: a small queue, then the kernel drops and counts.
        nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::RcvBuf, &4096)?;
        let mut counter = PacketCounter { fd, total: 0 };
        counter.total()?;
        counter.total = 0;
        Ok(counter)
    }

    /// Frames delivered to the socket since it was opened.
    #[allow(unsafe_code, reason = "getsockopt(2) PACKET_STATISTICS")]
    pub fn total(&mut self) -> Result<u64, CliError> {
        let mut st = libc::tpacket_stats {
            tp_packets: 0,
            tp_drops: 0,
        };
        let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: `st` and `len` are valid for writes and `len` is the
        // size of `st`.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&mut st as *mut libc::tpacket_stats).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(format!("PACKET_STATISTICS: {}", std::io::Error::last_os_error()).into());
        }
        // The kernel resets its counters on every read.
        self.total += u64::from(st.tp_packets);
        Ok(self.total)
    }
}

/// Gives `ifname` (in the calling thread's namespace) the IPv4 address
/// `addr` with a /24 netmask (`SIOCSIFADDR`, `SIOCSIFNETMASK`).
#[allow(unsafe_code, reason = "ioctl(2) with an ifreq")]
pub fn set_ipv4_24(ifname: &str, addr: std::net::Ipv4Addr) -> Result<(), CliError> {
    if ifname.len() >= libc::IFNAMSIZ {
        return Err(format!("interface name {ifname:?} too long").into());
    }
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    for (request, value) in [
        (libc::SIOCSIFADDR, addr),
        (
            libc::SIOCSIFNETMASK,
            std::net::Ipv4Addr::new(255, 255, 255, 0),
        ),
    ] {
        // struct ifreq: the name, then a struct sockaddr_in (family in
        // host order, port, address) in the union.
        let mut req = [0u8; 40];
        req[..ifname.len()].copy_from_slice(ifname.as_bytes());
        req[16..18].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        req[20..24].copy_from_slice(&value.octets());
        // SAFETY: `req` is 40 bytes, the size of struct ifreq, and lives
        // through the call.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req.as_mut_ptr()) };
        if rc != 0 {
            return Err(
                format!("{ifname}: set address: {}", std::io::Error::last_os_error()).into(),
            );
        }
    }
    Ok(())
}
