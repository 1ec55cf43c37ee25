//! The guest's network stack: TCP over any Ethernet frame device
//! (docs/ARCHITECTURE.md §5).
//!
//! A transport (a Xen netfront, a vhost-user-net client, a TAP device, the
//! in-memory [`cable`]) implements [`FrameDevice`]: send one Ethernet frame,
//! receive frames without blocking, say how to wait for the next one.
//! [`NetStack`] runs smoltcp's interface (static IPv4, ARP, TCP) over it, and
//! [`run_stream`] runs one verifying TCP workload on a stack and returns a
//! [`StreamReport`]:
//!
//! - a **checksummed stream**: the sender writes N bytes whose value is a
//!   function of (seed, stream offset) ([`StreamPattern`]), so the receiver
//!   checks every byte without a copy of the data and catches loss,
//!   duplication, reordering and corruption inside the stream, at the
//!   offset where it happened;
//! - a **ping-pong**: fixed-size requests echoed back, with their latency.
//!
//! Every report carries the longest time the stream made no progress (what
//! a backend crash costs the guest) and the resets and timeouts it saw; a
//! reset is a failure, never hidden.
#![forbid(unsafe_code)]

mod device;
mod pattern;
mod stack;
mod workload;

pub mod cable;

pub use device::{FrameDevice, FrameError, PhyStats, ETHERNET_HEADER_LEN};
pub use pattern::{Crc32, StreamMismatch, StreamPattern, StreamVerifier};
pub use stack::{NetConfig, NetError, NetStack};
pub use workload::{run_stream, run_streams, ProgressHook, StreamParams, StreamReport, StreamRole};

use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, TcpPacket,
};

/// Runs `f` on the TCP segment of an IPv4 Ethernet frame, with the
/// packet's addresses; does nothing for any other frame.
pub(crate) fn with_ipv4_tcp(
    frame: &mut [u8],
    f: impl FnOnce(&mut TcpPacket<&mut [u8]>, IpAddress, IpAddress),
) {
    let Ok(mut eth) = EthernetFrame::new_checked(frame) else {
        return;
    };
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return;
    }
    let Ok(mut ip) = Ipv4Packet::new_checked(eth.payload_mut()) else {
        return;
    };
    if ip.next_header() != IpProtocol::Tcp {
        return;
    }
    let (src, dst) = (
        IpAddress::Ipv4(ip.src_addr()),
        IpAddress::Ipv4(ip.dst_addr()),
    );
    if let Ok(mut tcp) = TcpPacket::new_checked(ip.payload_mut()) {
        f(&mut tcp, src, dst);
    }
}

/// A number for an IPv4 TCP or UDP frame's flow that is the same both
/// ways (the sums of the addresses and of the ports): what a multi-queue
/// device picks a transmit queue by. `None` for anything else.
pub(crate) fn with_ipv4_ports(frame: &[u8]) -> Option<u32> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if !matches!(ip.next_header(), IpProtocol::Tcp | IpProtocol::Udp) {
        return None;
    }
    let ports = ip.payload().get(..4)?;
    let addrs = u32::from(ip.src_addr()).wrapping_add(u32::from(ip.dst_addr()));
    let ports = u32::from(u16::from_be_bytes([ports[0], ports[1]]))
        + u32::from(u16::from_be_bytes([ports[2], ports[3]]));
    Some(addrs.wrapping_add(ports))
}
