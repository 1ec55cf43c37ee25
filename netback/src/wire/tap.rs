//! A TAP interface whose fds the supervisor holds (docs/ARCHITECTURE.md
//! §11.5).
//!
//! [`Tap::open`] either creates the interface or adopts one that exists,
//! opens one fd per queue (`IFF_MULTI_QUEUE` when there are several),
//! and applies the device state a backend must never have to redo: the
//! virtio-net header length, little-endian headers, offloads, MTU, MAC,
//! and `IFF_UP`. The supervisor keeps the [`Tap`] for the device's
//! lifetime and hands a backend a duplicate of each queue fd; while no
//! backend runs, the interface keeps its carrier (tun drops carrier only
//! when its last queue fd closes) and frames for the guest wait in the
//! queue (up to `txqueuelen`).
//!
//! Persistence: a created interface is not made persistent, so it lives
//! exactly as long as the supervisor's fds; a supervisor that dies takes
//! it with it instead of leaving a stale interface behind. An adopted
//! interface is the administrator's (typically `ip tuntap add … vnet_hdr`
//! and already in a bridge): its persistence is left as it was set.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
};

use super::sys::{self, IfOp, IfReq, TunIfReqOp, TunIntOp};
use super::{VnetHeaderLen, Wire, WireError, WireKind, MAX_FRAME_LEN, MIN_FRAME_LEN};

/// Linux's limit on a tun device's queues (`MAX_TAP_QUEUES`).
pub const MAX_QUEUES: u16 = 256;
/// The smallest MTU IPv4 allows (`ETH_MIN_MTU`).
pub const MIN_MTU: u32 = 68;
/// The largest MTU whose frames stay within [`MAX_FRAME_LEN`].
pub const MAX_MTU: u32 = (MAX_FRAME_LEN - MIN_FRAME_LEN) as u32;

const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// The offloads the guest accepts on receive, which tell the kernel what
/// it may leave undone in frames it hands to the TAP (`TUNSETOFFLOAD`).
/// Offloads on transmit need no setting: the header of each frame says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offloads {
    /// Partial checksums (`TUN_F_CSUM`; virtio `GUEST_CSUM`).
    pub csum: bool,
    /// TCPv4 segmentation (`TUN_F_TSO4`; `GUEST_TSO4`).
    pub tso4: bool,
    /// TCPv6 segmentation (`TUN_F_TSO6`; `GUEST_TSO6`).
    pub tso6: bool,
    /// TSO with ECN (`TUN_F_TSO_ECN`; `GUEST_ECN`).
    pub ecn: bool,
    /// UDP fragmentation offload (`TUN_F_UFO`; `GUEST_UFO`).
    pub ufo: bool,
}

impl Offloads {
    /// From a virtio-net driver's accepted feature bits.
    pub fn from_virtio_features(features: u64) -> Self {
        let has = |bit: u32| features & (1u64 << bit) != 0;
        Offloads {
            csum: has(VIRTIO_NET_F_GUEST_CSUM),
            tso4: has(VIRTIO_NET_F_GUEST_TSO4),
            tso6: has(VIRTIO_NET_F_GUEST_TSO6),
            ecn: has(VIRTIO_NET_F_GUEST_ECN),
            ufo: has(VIRTIO_NET_F_GUEST_UFO),
        }
    }

    /// The `TUN_F_*` mask, refusing the combinations the virtio spec
    /// forbids (and that tun would silently ignore): segmentation without
    /// checksum offload, ECN without TCP segmentation.
    pub fn tun_flags(&self) -> Result<libc::c_uint, WireError> {
        if (self.tso4 || self.tso6 || self.ufo) && !self.csum {
            return Err(WireError::Config("segmentation offloads need csum"));
        }
        if self.ecn && !(self.tso4 || self.tso6) {
            return Err(WireError::Config("ecn needs tso4 or tso6"));
        }
        let mut flags = 0;
        for (on, bit) in [
            (self.csum, libc::TUN_F_CSUM),
            (self.tso4, libc::TUN_F_TSO4),
            (self.tso6, libc::TUN_F_TSO6),
            (self.ecn, libc::TUN_F_TSO_ECN),
            (self.ufo, libc::TUN_F_UFO),
        ] {
            if on {
                flags |= bit;
            }
        }
        Ok(flags)
    }
}

/// Whether [`Tap::open`] makes the interface or takes an existing one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TapMode {
    /// Fails if the name exists. The name may contain one `%d`, which
    /// the kernel replaces with the first free number.
    Create,
    /// Fails if the name does not exist. An adopted multi-queue
    /// interface must be opened with `queues > 1`, a single-queue one
    /// with `queues == 1` (tun refuses the mismatch).
    Adopt,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapConfig {
    pub name: String,
    pub mode: TapMode,
    /// Queue pairs: one fd each.
    pub queues: u16,
    pub vnet_hdr: VnetHeaderLen,
    pub offloads: Offloads,
    /// Left as it is when `None`.
    pub mtu: Option<u32>,
    /// The interface's own address (the host side, not the guest's);
    /// left as it is when `None`.
    pub mac: Option<[u8; 6]>,
}

impl TapConfig {
    /// One queue, the basic header, no offloads, MTU and MAC untouched.
    pub fn new(name: impl Into<String>, mode: TapMode) -> Self {
        TapConfig {
            name: name.into(),
            mode,
            queues: 1,
            vnet_hdr: VnetHeaderLen::Basic,
            offloads: Offloads::default(),
            mtu: None,
            mac: None,
        }
    }
}

/// An open TAP interface: its queue fds and a socket for interface
/// requests, both in the network namespace the interface was opened in.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: Vec<OwnedFd>,
    vnet_hdr: VnetHeaderLen,
    ctl: OwnedFd,
}

impl Tap {
    /// Opens (creates or adopts) the interface in the calling thread's
    /// network namespace and applies `cfg`; the interface is up on
    /// return. The fds are close-on-exec and non-blocking.
    pub fn open(cfg: &TapConfig) -> Result<Self, WireError> {
        check_name(&cfg.name, cfg.mode)?;
        if cfg.queues == 0 || cfg.queues > MAX_QUEUES {
            return Err(WireError::Config("queues must be 1..=256"));
        }
        let offload_flags = cfg.offloads.tun_flags()?;
        if let Some(mtu) = cfg.mtu {
            if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
                return Err(WireError::Config("mtu out of 68..=65521"));
            }
        }
        if let Some(mac) = cfg.mac {
            check_mac(mac)?;
        }
        let ctl = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| WireError::Io {
            op: "socket",
            source: e.into(),
        })?;

        // Create vs adopt: tun's TUNSETIFF does either, depending on
        // whether the name exists, so ask first. (Racy against another
        // program making the name in between; then the error comes from
        // tun, or the interface is adopted, which is what the other
        // program asked for.)
        if !cfg.name.contains('%') {
            let mut req = IfReq::new(&cfg.name);
            let exists = match sys::if_ioctl(ctl.as_fd(), IfOp::GetIndex, &mut req) {
                Ok(()) => true,
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => false,
                Err(source) => return Err(ioctl_error("SIOCGIFINDEX", &cfg.name, source)),
            };
            match (cfg.mode, exists) {
                (TapMode::Create, true) => return Err(WireError::AlreadyExists(cfg.name.clone())),
                (TapMode::Adopt, false) => return Err(WireError::NotFound(cfg.name.clone())),
                _ => {}
            }
        }

        let mut flags = TAP_FLAGS;
        if cfg.queues > 1 {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let mut name = cfg.name.clone();
        let mut queues = Vec::with_capacity(usize::from(cfg.queues));
        for _ in 0..cfg.queues {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/net/tun")
                .map_err(WireError::OpenTun)?;
            let fd = OwnedFd::from(file);
            let mut req = IfReq::new(&name);
            // Every flag fits the 16-bit ifr_flags.
            req.set_short(flags as i16);
            sys::tun_ifreq(fd.as_fd(), TunIfReqOp::SetIff, &mut req)
                .map_err(|e| ioctl_error("TUNSETIFF", &name, e))?;
            // The kernel's name (for `%d`); later queues attach to it.
            name = req.name();
            queues.push(fd);
        }
        let tap = Tap {
            name,
            queues,
            vnet_hdr: cfg.vnet_hdr,
            ctl,
        };

        // Device state, set once through the first queue: it belongs to
        // the interface, not to the fd, so every queue and every later
        // holder of a duplicate sees it.
        let first = tap.queues[0].as_fd();
        // Little-endian headers on any host, as virtio 1.x has them.
        let mut le: libc::c_int = 1;
        sys::tun_int(first, TunIntOp::SetVnetLe, &mut le)
            .map_err(|e| ioctl_error("TUNSETVNETLE", &tap.name, e))?;
        let mut hdr_sz = cfg.vnet_hdr.bytes() as libc::c_int;
        sys::tun_int(first, TunIntOp::SetVnetHdrSz, &mut hdr_sz)
            .map_err(|e| ioctl_error("TUNSETVNETHDRSZ", &tap.name, e))?;
        sys::tun_set_offload(first, offload_flags)
            .map_err(|e| ioctl_error("TUNSETOFFLOAD", &tap.name, e))?;
        if let Some(mtu) = cfg.mtu {
            tap.set_mtu(mtu)?;
        }
        if let Some(mac) = cfg.mac {
            tap.set_mac(mac)?;
        }
        tap.set_up()?;
        tracing::info!(
            name = %tap.name,
            mode = ?cfg.mode,
            queues = cfg.queues,
            vnet_hdr = cfg.vnet_hdr.bytes(),
            "tap open"
        );
        Ok(tap)
    }

    /// The interface's name (as the kernel chose it, for `%d`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue fds, in queue order: what the supervisor duplicates and
    /// passes to each backend instance.
    pub fn queue_fds(&self) -> &[OwnedFd] {
        &self.queues
    }

    pub fn vnet_hdr(&self) -> VnetHeaderLen {
        self.vnet_hdr
    }

    /// The socket interface requests go through (MTU, MAC, up), for a
    /// supervisor that hands the interface to its successor across
    /// `execve` (a live upgrade).
    pub fn ctl_fd(&self) -> &OwnedFd {
        &self.ctl
    }

    /// The interface a predecessor process opened: its name, queue fds,
    /// header layout and request socket, as [`Tap::name`],
    /// [`Tap::queue_fds`], [`Tap::vnet_hdr`] and [`Tap::ctl_fd`] gave them.
    /// Nothing is configured again: the interface is as it was left.
    pub fn from_parts(
        name: String,
        queues: Vec<OwnedFd>,
        vnet_hdr: VnetHeaderLen,
        ctl: OwnedFd,
    ) -> Result<Self, WireError> {
        if queues.is_empty() || queues.len() > usize::from(MAX_QUEUES) {
            return Err(WireError::Config("queues must be 1..=256"));
        }
        Ok(Tap {
            name,
            queues,
            vnet_hdr,
            ctl,
        })
    }

    /// A [`Wire`] on a duplicate of queue `queue`'s fd, as a backend
    /// builds it from the fd it receives.
    pub fn wire(&self, queue: usize) -> Result<Wire, WireError> {
        let fd = self
            .queues
            .get(queue)
            .ok_or(WireError::Config("no such queue"))?
            .try_clone()
            .map_err(|source| WireError::Io { op: "dup", source })?;
        Wire::from_fd(WireKind::Tap, fd, self.vnet_hdr)
    }

    /// Applies the offloads a guest accepted (again, after a feature
    /// renegotiation); the interface keeps them across backend restarts.
    pub fn set_offloads(&self, offloads: Offloads) -> Result<(), WireError> {
        sys::tun_set_offload(self.queues[0].as_fd(), offloads.tun_flags()?)
            .map_err(|e| ioctl_error("TUNSETOFFLOAD", &self.name, e))
    }

    pub fn set_mtu(&self, mtu: u32) -> Result<(), WireError> {
        if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
            return Err(WireError::Config("mtu out of 68..=65521"));
        }
        let mut req = IfReq::new(&self.name);
        // In range of i32 by the check above.
        req.set_int(mtu as i32);
        sys::if_ioctl(self.ctl.as_fd(), IfOp::SetMtu, &mut req)
            .map_err(|e| ioctl_error("SIOCSIFMTU", &self.name, e))
    }

    pub fn set_mac(&self, mac: [u8; 6]) -> Result<(), WireError> {
        check_mac(mac)?;
        let mut req = IfReq::new(&self.name);
        req.set_hwaddr(mac);
        sys::if_ioctl(self.ctl.as_fd(), IfOp::SetHwAddr, &mut req)
            .map_err(|e| ioctl_error("SIOCSIFHWADDR", &self.name, e))
    }

    /// Sets `IFF_UP`, keeping the interface's other flags.
    pub fn set_up(&self) -> Result<(), WireError> {
        let mut req = IfReq::new(&self.name);
        sys::if_ioctl(self.ctl.as_fd(), IfOp::GetFlags, &mut req)
            .map_err(|e| ioctl_error("SIOCGIFFLAGS", &self.name, e))?;
        // IFF_UP is bit 0 of the 16-bit ifr_flags.
        req.set_short(req.short() | libc::IFF_UP as i16);
        sys::if_ioctl(self.ctl.as_fd(), IfOp::SetFlags, &mut req)
            .map_err(|e| ioctl_error("SIOCSIFFLAGS", &self.name, e))
    }
}

/// Attaches (`true`) or detaches a queue of a multi-queue TAP
/// (`TUNSETQUEUE`): the kernel steers flows only to attached queues and
/// purges a queue it detaches. The state belongs to the open file, so
/// the supervisor's copy and every backend's duplicate share it. A queue
/// already in that state is left as it is (tun answers `EINVAL`).
pub fn set_queue_attached(fd: BorrowedFd<'_>, attached: bool) -> Result<(), WireError> {
    let mut req = IfReq::new("");
    let flag = if attached {
        libc::IFF_ATTACH_QUEUE
    } else {
        libc::IFF_DETACH_QUEUE
    };
    // Both flags fit the 16-bit ifr_flags.
    req.set_short(flag as i16);
    match sys::tun_ifreq(fd, TunIfReqOp::SetQueue, &mut req) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        Err(e) => return Err(ioctl_error("TUNSETQUEUE", "", e)),
    }
    Ok(())
}

/// Checks that `fd` is a TAP queue as [`Tap::open`] leaves it: a
/// backend must not frame with one header length while the kernel uses
/// another. A detached queue of a multi-queue TAP answers nothing
/// (`EBADFD`) and is taken as it is: [`set_queue_attached`] checks it
/// when it is attached.
pub(super) fn check_queue_fd(fd: BorrowedFd<'_>, hdr: VnetHeaderLen) -> Result<(), WireError> {
    let wrong = WireError::WrongFd {
        expected: "TAP queue with IFF_NO_PI and IFF_VNET_HDR",
    };
    let mut req = IfReq::new("");
    match sys::tun_ifreq(fd, TunIfReqOp::GetIff, &mut req) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EBADFD) => return Ok(()),
        Err(_) => return Err(wrong),
    }
    let flags = libc::c_int::from(req.short()) & 0xffff;
    if flags & TAP_FLAGS != TAP_FLAGS {
        return Err(wrong);
    }
    let mut size: libc::c_int = 0;
    sys::tun_int(fd, TunIntOp::GetVnetHdrSz, &mut size)
        .map_err(|e| ioctl_error("TUNGETVNETHDRSZ", &req.name(), e))?;
    if usize::try_from(size).ok() != Some(hdr.bytes()) {
        return Err(WireError::WrongFd {
            expected: "TAP queue with this virtio-net header length",
        });
    }
    Ok(())
}

fn ioctl_error(op: &'static str, name: &str, source: std::io::Error) -> WireError {
    WireError::Ioctl {
        op,
        name: name.to_owned(),
        source,
    }
}

/// Linux's rules for an interface name (`dev_valid_name`), plus: `%` only
/// as one `%d` and only when creating.
fn check_name(name: &str, mode: TapMode) -> Result<(), WireError> {
    let bad = |reason| {
        Err(WireError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return bad("must be 1 to 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("reserved");
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        return bad("no '/', ':', NUL or whitespace");
    }
    let percents = name.matches('%').count();
    if percents > 0 && (mode == TapMode::Adopt || percents > 1 || !name.contains("%d")) {
        return bad("'%' only as one %d, and only when creating");
    }
    Ok(())
}

fn check_mac(mac: [u8; 6]) -> Result<(), WireError> {
    if mac[0] & 1 != 0 || mac == [0; 6] {
        return Err(WireError::Config("mac must be a non-zero unicast address"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offload_flags_follow_the_fields() {
        assert_eq!(Offloads::default().tun_flags().unwrap(), 0);
        let all = Offloads {
            csum: true,
            tso4: true,
            tso6: true,
            ecn: true,
            ufo: true,
        };
        assert_eq!(all.tun_flags().unwrap(), 0x1f);
        let tso4 = Offloads {
            csum: true,
            tso4: true,
            ..Offloads::default()
        };
        assert_eq!(
            tso4.tun_flags().unwrap(),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4
        );
        let no_csum = Offloads {
            tso6: true,
            ..Offloads::default()
        };
        assert!(no_csum.tun_flags().is_err());
        let ecn_alone = Offloads {
            csum: true,
            ecn: true,
            ..Offloads::default()
        };
        assert!(ecn_alone.tun_flags().is_err());
    }

    #[test]
    fn offloads_from_virtio_feature_bits() {
        // GUEST_CSUM is bit 1, GUEST_TSO4 7, GUEST_TSO6 8, GUEST_ECN 9,
        // GUEST_UFO 10 (virtio spec 5.1.3).
        let f = (1 << 1) | (1 << 7) | (1 << 9);
        assert_eq!(
            Offloads::from_virtio_features(f),
            Offloads {
                csum: true,
                tso4: true,
                ecn: true,
                ..Offloads::default()
            }
        );
        assert!(Offloads::from_virtio_features(1 << 10).ufo);
        assert_eq!(Offloads::from_virtio_features(1 << 0), Offloads::default());
    }

    #[test]
    fn interface_names_are_checked() {
        for good in ["tap0", "a", "sb-vif.1_x", "fifteen-bytes15"] {
            assert!(check_name(good, TapMode::Adopt).is_ok(), "{good}");
        }
        assert!(check_name("sbtap%d", TapMode::Create).is_ok());
        for bad in [
            "",
            "sixteen-bytes-16",
            ".",
            "..",
            "a/b",
            "a b",
            "a:1",
            "a\0b",
            "%d%d",
            "x%s",
        ] {
            assert!(check_name(bad, TapMode::Create).is_err(), "{bad:?}");
        }
        assert!(check_name("sbtap%d", TapMode::Adopt).is_err());
    }

    #[test]
    fn macs_are_checked() {
        assert!(check_mac([0x02, 0, 0, 0, 0, 1]).is_ok());
        assert!(check_mac([0x01, 0, 0x5e, 0, 0, 1]).is_err());
        assert!(check_mac([0xff; 6]).is_err());
        assert!(check_mac([0; 6]).is_err());
    }

    #[test]
    fn bad_config_is_refused_before_anything_is_opened() {
        let mut cfg = TapConfig::new("sbcfg0", TapMode::Create);
        cfg.queues = 0;
        assert!(matches!(Tap::open(&cfg), Err(WireError::Config(_))));
        cfg.queues = 257;
        assert!(matches!(Tap::open(&cfg), Err(WireError::Config(_))));
        cfg.queues = 1;
        cfg.mtu = Some(67);
        assert!(matches!(Tap::open(&cfg), Err(WireError::Config(_))));
        cfg.mtu = Some(MAX_MTU + 1);
        assert!(matches!(Tap::open(&cfg), Err(WireError::Config(_))));
        cfg.mtu = None;
        cfg.offloads.ecn = true;
        assert!(matches!(Tap::open(&cfg), Err(WireError::Config(_))));
    }
}
