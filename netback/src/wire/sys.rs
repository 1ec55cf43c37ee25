//! The ioctls a TAP needs: `/dev/net/tun`'s `TUN*` requests and the
//! interface requests (`SIOC*IF*`) on an `AF_INET` socket. This is the one
//! module of netback that uses `unsafe`: `ioctl(2)` takes a pointer, and
//! neither `nix` nor `libc` offers these requests as safe calls. Each
//! request is named by an enum, so no caller can pair a request with an
//! argument of the wrong type.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `struct ifreq`: the interface name, then a 24-byte union read here as
/// plain bytes (flags, MTU, index or a `struct sockaddr`), so that reading
/// what the kernel wrote back touches no union.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct IfReq {
    pub name: [u8; libc::IFNAMSIZ],
    pub data: [u8; 24],
}

const _: () = assert!(std::mem::size_of::<IfReq>() == std::mem::size_of::<libc::ifreq>());

impl IfReq {
    /// A request for the interface `name` (at most `IFNAMSIZ - 1` bytes:
    /// checked by the caller; longer names are cut, never overflow).
    pub fn new(name: &str) -> Self {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        let n = name.len().min(libc::IFNAMSIZ - 1);
        req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        req
    }

    /// The name the kernel wrote back (TUNSETIFF fills in `%d`).
    pub fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }

    pub fn short(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    pub fn set_short(&mut self, v: i16) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }

    pub fn set_int(&mut self, v: i32) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }

    /// A `struct sockaddr` of family `ARPHRD_ETHER` carrying a MAC address.
    pub fn set_hwaddr(&mut self, mac: [u8; 6]) {
        self.data[..2].copy_from_slice(&libc::ARPHRD_ETHER.to_ne_bytes());
        self.data[2..8].copy_from_slice(&mac);
    }
}

/// `/dev/net/tun` requests whose argument is a `struct ifreq *`.
#[derive(Clone, Copy, Debug)]
pub(super) enum TunIfReqOp {
    SetIff,
    GetIff,
    /// `TUNSETQUEUE`: attach or detach a queue of a multi-queue TAP.
    SetQueue,
}

/// `/dev/net/tun` requests whose argument is an `int *`.
#[derive(Clone, Copy, Debug)]
pub(super) enum TunIntOp {
    SetVnetHdrSz,
    GetVnetHdrSz,
    SetVnetLe,
}

/// Interface requests on a socket; each takes a `struct ifreq *`.
#[derive(Clone, Copy, Debug)]
pub(super) enum IfOp {
    GetIndex,
    SetMtu,
    SetHwAddr,
    GetFlags,
    SetFlags,
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub(super) fn tun_ifreq(fd: BorrowedFd<'_>, op: TunIfReqOp, req: &mut IfReq) -> io::Result<()> {
    let request = match op {
        TunIfReqOp::SetIff => libc::TUNSETIFF,
        TunIfReqOp::GetIff => libc::TUNGETIFF,
        TunIfReqOp::SetQueue => libc::TUNSETQUEUE,
    };
    // SAFETY: these requests read and/or write one `struct ifreq`; `req`
    // is an exclusive borrow of an `IfReq`, which has its size (checked
    // at compile time above), and lives across the call. `fd` is open.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), request, std::ptr::from_mut(req)) })
}

pub(super) fn tun_int(fd: BorrowedFd<'_>, op: TunIntOp, value: &mut libc::c_int) -> io::Result<()> {
    let request = match op {
        TunIntOp::SetVnetHdrSz => libc::TUNSETVNETHDRSZ,
        TunIntOp::GetVnetHdrSz => libc::TUNGETVNETHDRSZ,
        TunIntOp::SetVnetLe => libc::TUNSETVNETLE,
    };
    // SAFETY: each request reads or writes one `int` through the pointer,
    // which is an exclusive borrow alive across the call. `fd` is open.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), request, std::ptr::from_mut(value)) })
}

/// `TUNSETOFFLOAD`, whose argument is the `TUN_F_*` mask itself.
pub(super) fn tun_set_offload(fd: BorrowedFd<'_>, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned
    // long); the kernel dereferences nothing. `fd` is open.
    check(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    })
}

pub(super) fn if_ioctl(sock: BorrowedFd<'_>, op: IfOp, req: &mut IfReq) -> io::Result<()> {
    let request = match op {
        IfOp::GetIndex => libc::SIOCGIFINDEX,
        IfOp::SetMtu => libc::SIOCSIFMTU,
        IfOp::SetHwAddr => libc::SIOCSIFHWADDR,
        IfOp::GetFlags => libc::SIOCGIFFLAGS,
        IfOp::SetFlags => libc::SIOCSIFFLAGS,
    };
    // SAFETY: each of these requests reads and/or writes one
    // `struct ifreq`; `req` is an exclusive borrow of an `IfReq` of that
    // size, alive across the call. `sock` is an open socket.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), request, std::ptr::from_mut(req)) })
}
