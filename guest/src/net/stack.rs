//! [`NetStack`]: smoltcp's interface, ARP and TCP over a [`FrameDevice`].

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use smoltcp::iface::{
    Config, Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet,
};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, IpEndpoint, Ipv4Cidr};
use thiserror::Error;

use super::device::{FrameDevice, FrameError, PhyAdapter, PhyStats};

/// How long [`NetStack::wait`] sleeps when the device has neither an fd nor
/// a hint: a device that says nothing is polled, not waited on.
const BLIND_POLL: Duration = Duration::from_millis(1);

/// Frames one [`NetStack::poll`] takes in before it sends what the sockets
/// have (ACKs, window updates, data) and lets the application read: a
/// receiver that took a whole ring's worth first answered it with one ACK,
/// and losing that one frame (a backend dying with it, ARCHITECTURE.md
/// §11.6) left the sender waiting for its retransmission timeout (≥ 1 s in
/// smoltcp, which has no tail-loss probe). Linux's NAPI takes up to 64
/// frames per poll and ACKs every second full segment.
const RX_BUDGET: usize = 16;

/// Smallest MTU an IPv4 link may have (RFC 791).
const MIN_IPV4_MTU: usize = 68;

/// What setting up or running a [`NetStack`] can fail with.
#[derive(Debug, Error)]
pub enum NetError {
    /// The device's MAC is a multicast or all-zero address.
    #[error("device MAC {0} is not a unicast address")]
    BadMac(EthernetAddress),
    /// The device's MTU cannot carry IPv4.
    #[error("device MTU {0} is below IPv4's minimum of 68")]
    BadMtu(usize),
    /// The address or prefix cannot be used.
    #[error("bad address {address}/{prefix_len}")]
    BadAddress {
        /// The interface address.
        address: Ipv4Addr,
        /// The prefix length.
        prefix_len: u8,
    },
    /// A TCP socket refused to listen.
    #[error("cannot listen on port {port}: {reason}")]
    Listen {
        /// The port.
        port: u16,
        /// smoltcp's reason.
        reason: tcp::ListenError,
    },
    /// A TCP socket refused to connect.
    #[error("cannot connect to {remote}: {reason}")]
    Connect {
        /// The peer.
        remote: SocketAddrV4,
        /// smoltcp's reason.
        reason: tcp::ConnectError,
    },
    /// The device failed for good.
    #[error("frame device failed")]
    Device(#[source] FrameError),
    /// Waiting on the device's fd failed.
    #[error("poll on the device fd failed")]
    Poll(#[source] nix::Error),
}

/// Addressing of one [`NetStack`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The interface's IPv4 address.
    pub address: Ipv4Addr,
    /// Its prefix length (the on-link subnet, reached through ARP).
    pub prefix_len: u8,
    /// Default route for everything off the subnet.
    pub gateway: Option<Ipv4Addr>,
    /// Seeds smoltcp's initial sequence numbers and ephemeral ports; give
    /// each stack of one test its own.
    pub seed: u64,
}

/// One guest interface with its TCP sockets.
///
/// The stack does nothing on its own: call [`poll`](Self::poll) whenever the
/// device may have frames or a socket was used, and [`wait`](Self::wait)
/// between polls.
pub struct NetStack<'d> {
    iface: Interface,
    sockets: SocketSet<'static>,
    phy: PhyAdapter<'d>,
    /// smoltcp's clock counts from here.
    epoch: Instant,
    /// The last poll stopped at [`RX_BUDGET`] frames: the device may hold
    /// more, so [`wait`](Self::wait) does not sleep.
    rx_more: bool,
}

impl<'d> NetStack<'d> {
    /// An interface over `device` with `config`'s static address.
    pub fn new(device: &'d mut dyn FrameDevice, config: &NetConfig) -> Result<Self, NetError> {
        let mac = EthernetAddress(device.mac());
        if !mac.is_unicast() {
            return Err(NetError::BadMac(mac));
        }
        let mtu = device.mtu();
        if mtu < MIN_IPV4_MTU {
            return Err(NetError::BadMtu(mtu));
        }
        let bad_address = NetError::BadAddress {
            address: config.address,
            prefix_len: config.prefix_len,
        };
        if config.prefix_len > 32
            || config.address.is_unspecified()
            || config.address.is_broadcast()
            || config.address.is_multicast()
        {
            return Err(bad_address);
        }
        let mut phy = PhyAdapter::new(device);
        let epoch = Instant::now();
        let mut iface_config = Config::new(HardwareAddress::Ethernet(mac));
        iface_config.random_seed = config.seed;
        let mut iface = Interface::new(iface_config, &mut phy, SmolInstant::ZERO);
        let mut full = false;
        iface.update_ip_addrs(|addrs| {
            full = addrs
                .push(IpCidr::Ipv4(Ipv4Cidr::new(
                    config.address,
                    config.prefix_len,
                )))
                .is_err();
        });
        if full {
            return Err(bad_address);
        }
        if let Some(gateway) = config.gateway {
            iface
                .routes_mut()
                .add_default_ipv4_route(gateway)
                .map_err(|_| bad_address)?;
        }
        Ok(NetStack {
            iface,
            sockets: SocketSet::new(Vec::new()),
            phy,
            epoch,
            rx_more: false,
        })
    }

    fn smol_now(&self, now: Instant) -> SmolInstant {
        let micros = now.saturating_duration_since(self.epoch).as_micros();
        SmolInstant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
    }

    /// A new TCP socket with buffers of the given sizes.
    pub fn add_tcp_socket(&mut self, rx_bytes: usize, tx_bytes: usize) -> SocketHandle {
        let socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; rx_bytes]),
            tcp::SocketBuffer::new(vec![0u8; tx_bytes]),
        );
        self.sockets.add(socket)
    }

    /// The TCP socket of `handle`.
    ///
    /// # Panics
    /// If `handle` is not a TCP socket of this stack (a caller bug).
    pub fn tcp(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut(handle)
    }

    /// Puts `handle` in the listening state on `port` (any local address).
    pub fn listen(&mut self, handle: SocketHandle, port: u16) -> Result<(), NetError> {
        self.tcp(handle)
            .listen(port)
            .map_err(|reason| NetError::Listen { port, reason })
    }

    /// Opens a connection from `local_port` to `remote`.
    pub fn connect(
        &mut self,
        handle: SocketHandle,
        remote: SocketAddrV4,
        local_port: u16,
    ) -> Result<(), NetError> {
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        socket
            .connect(
                self.iface.context(),
                IpEndpoint::new((*remote.ip()).into(), remote.port()),
                local_port,
            )
            .map_err(|reason| NetError::Connect { remote, reason })
    }

    /// Takes in up to [`RX_BUDGET`] frames, then sends what the sockets
    /// have and runs the TCP timers; true when a socket's state may have
    /// changed. What is left on the device waits for the next call, which
    /// [`wait`](Self::wait) then does not delay: between two calls the
    /// application reads, so the window stays open, and ACKs go out every
    /// few frames instead of one per burst.
    pub fn poll(&mut self, now: Instant) -> Result<bool, NetError> {
        let at = self.smol_now(now);
        self.iface.poll_maintenance(at);
        let mut changed = false;
        self.rx_more = false;
        for taken in 1..=RX_BUDGET {
            match self
                .iface
                .poll_ingress_single(at, &mut self.phy, &mut self.sockets)
            {
                PollIngressSingleResult::None => break,
                PollIngressSingleResult::PacketProcessed => {}
                PollIngressSingleResult::SocketStateChanged => changed = true,
            }
            self.rx_more = taken == RX_BUDGET;
        }
        while self.iface.poll_egress(at, &mut self.phy, &mut self.sockets)
            == PollResult::SocketStateChanged
        {
            changed = true;
        }
        match self.phy.take_fatal() {
            Some(err) => Err(NetError::Device(err)),
            None => Ok(changed),
        }
    }

    /// How soon the stack wants [`poll`](Self::poll) again for its own
    /// timers (retransmission, delayed ACK, ARP); `None` = not until a frame
    /// arrives or a socket is used.
    pub fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        let at = self.smol_now(now);
        self.iface
            .poll_delay(at, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
    }

    /// Sleeps until a frame may have arrived, a stack timer is due, or `max`
    /// passed, whichever comes first.
    pub fn wait(&mut self, now: Instant, max: Duration) -> Result<(), NetError> {
        if self.rx_more {
            return Ok(());
        }
        let mut timeout = max;
        if let Some(d) = self.poll_delay(now) {
            timeout = timeout.min(d);
        }
        let device = self.phy.device();
        if let Some(d) = device.poll_again_in() {
            timeout = timeout.min(d);
        }
        if timeout.is_zero() {
            return Ok(());
        }
        match device.wait_fd() {
            Some(fd) => {
                // Round up: a sub-millisecond timer must not become a spin.
                let ms = timeout.as_micros().div_ceil(1000);
                let ms = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
                let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
                match poll(&mut fds, ms) {
                    Ok(_) | Err(nix::Error::EINTR) => Ok(()),
                    Err(err) => Err(NetError::Poll(err)),
                }
            }
            None => {
                std::thread::sleep(timeout.min(BLIND_POLL));
                Ok(())
            }
        }
    }

    /// The device's frame counters.
    pub fn phy_stats(&self) -> PhyStats {
        self.phy.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::cable::{cable, CableConfig};

    fn config(address: Ipv4Addr, prefix_len: u8) -> NetConfig {
        NetConfig {
            address,
            prefix_len,
            gateway: None,
            seed: 1,
        }
    }

    #[test]
    fn bad_addresses_are_refused() {
        let (mut a, _b, _ctl) = cable(CableConfig::default());
        for (addr, prefix) in [
            (Ipv4Addr::UNSPECIFIED, 24),
            (Ipv4Addr::BROADCAST, 24),
            (Ipv4Addr::new(224, 0, 0, 1), 24),
            (Ipv4Addr::new(10, 0, 0, 1), 33),
        ] {
            let err = NetStack::new(&mut a, &config(addr, prefix)).err();
            assert!(
                matches!(err, Some(NetError::BadAddress { .. })),
                "{addr}/{prefix}: {err:?}"
            );
        }
    }

    #[test]
    fn a_multicast_mac_or_tiny_mtu_is_refused() {
        let (mut a, _b, _ctl) = cable(CableConfig {
            macs: [[1, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]],
            ..CableConfig::default()
        });
        let err = NetStack::new(&mut a, &config(Ipv4Addr::new(10, 0, 0, 1), 24)).err();
        assert!(matches!(err, Some(NetError::BadMac(_))), "{err:?}");
        let (mut a, _b, _ctl) = cable(CableConfig {
            mtu: 60,
            ..CableConfig::default()
        });
        let err = NetStack::new(&mut a, &config(Ipv4Addr::new(10, 0, 0, 1), 24)).err();
        assert!(matches!(err, Some(NetError::BadMtu(60))), "{err:?}");
    }

    #[test]
    fn two_stacks_connect_through_arp_and_a_gateway_route() {
        // B is on A's subnet; A reaches B's second address only through
        // its gateway route, so the SYN must be sent to the gateway's MAC.
        let (mut a, mut b, _ctl) = cable(CableConfig::default());
        let mut sa = NetStack::new(
            &mut a,
            &NetConfig {
                gateway: Some(Ipv4Addr::new(10, 0, 0, 2)),
                ..config(Ipv4Addr::new(10, 0, 0, 1), 24)
            },
        )
        .unwrap();
        let mut sb = NetStack::new(&mut b, &config(Ipv4Addr::new(10, 0, 0, 2), 24)).unwrap();
        sb.iface.update_ip_addrs(|addrs| {
            addrs
                .push(IpCidr::Ipv4(Ipv4Cidr::new(Ipv4Addr::new(192, 0, 2, 9), 32)))
                .unwrap();
        });
        let la = sa.add_tcp_socket(4096, 4096);
        let lb = sb.add_tcp_socket(4096, 4096);
        sb.listen(lb, 80).unwrap();
        sa.connect(
            la,
            SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 9), 80),
            40000,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let now = Instant::now();
            sa.poll(now).unwrap();
            sb.poll(now).unwrap();
            if sa.tcp(la).state() == tcp::State::Established
                && sb.tcp(lb).state() == tcp::State::Established
            {
                break;
            }
            sa.wait(now, Duration::from_millis(1)).unwrap();
        }
        assert_eq!(sa.tcp(la).state(), tcp::State::Established);
        assert_eq!(sb.tcp(lb).state(), tcp::State::Established);
        assert!(sa.phy_stats().tx_frames >= 2, "ARP and SYN");
    }
}
