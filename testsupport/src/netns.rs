//! Network namespaces for tests that put a TAP and a Linux TCP socket
//! behind a vif: a fresh namespace (with its own sysfs) for the calling
//! thread, and interface addresses set without the `ip` tool. Root only.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `struct ifreq`: a 16-byte name and a 24-byte union.
type IfReq = [u8; 40];

/// Sets an IPv4 address-type field (`SIOCSIFADDR`, `SIOCSIFNETMASK`) of
/// interface `name`.
#[allow(unsafe_code, reason = "an interface ioctl; the test has no `ip` tool")]
fn set_if_addr(sock: BorrowedFd<'_>, name: &str, request: libc::c_ulong, addr: Ipv4Addr) {
    let mut req: IfReq = [0; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    // struct sockaddr_in: family (host order), port, address.
    req[16..18].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    req[20..24].copy_from_slice(&addr.octets());
    // SAFETY: SIOCSIFADDR and SIOCSIFNETMASK read a `struct ifreq` (40
    // bytes on 64-bit Linux), which `req` is; `sock` is open.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req.as_mut_ptr()) };
    assert_eq!(rc, 0, "ioctl: {}", std::io::Error::last_os_error());
}

/// Moves the calling thread into a new network namespace and a new mount
/// namespace with a sysfs of its own, so that `/sys/class/net` shows the
/// new namespace's interfaces.
#[allow(
    unsafe_code,
    reason = "unshare and mount; no wrapper in the test's dependencies"
)]
pub fn enter_fresh_netns() {
    // SAFETY: unshare takes no pointers; it changes only the calling
    // thread's namespaces (and its fs_struct, a private copy after
    // CLONE_NEWNS), which nothing else in the test uses.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS) };
    assert_eq!(
        rc,
        0,
        "unshare needs root: {}",
        std::io::Error::last_os_error()
    );
    let root = c"/";
    let sys = c"/sys";
    let sysfs = c"sysfs";
    // SAFETY: every pointer is a NUL-terminated literal or null, as
    // mount(2) takes them; the mounts are private to the new namespace.
    unsafe {
        let rc = libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        );
        assert_eq!(
            rc,
            0,
            "mount --make-rprivate /: {}",
            std::io::Error::last_os_error()
        );
        let rc = libc::mount(
            sysfs.as_ptr(),
            sys.as_ptr(),
            sysfs.as_ptr(),
            0,
            std::ptr::null(),
        );
        assert_eq!(rc, 0, "mount sysfs: {}", std::io::Error::last_os_error());
    }
}

/// Gives interface `name` the IPv4 address `addr` in a /24.
pub fn set_ipv4_24(name: &str, addr: Ipv4Addr) {
    use std::os::fd::AsFd;
    let ctl = std::net::UdpSocket::bind("0.0.0.0:0").expect("a socket for interface ioctls");
    set_if_addr(ctl.as_fd(), name, libc::SIOCSIFADDR as _, addr);
    set_if_addr(
        ctl.as_fd(),
        name,
        libc::SIOCSIFNETMASK as _,
        Ipv4Addr::new(255, 255, 255, 0),
    );
}
