//! An in-process Ethernet cable: two [`FrameDevice`] ends joined by bounded
//! queues, with faults to inject, so both ends of a TCP connection run in
//! one test.
//!
//! Each direction is a [`LinkFaults`]-configured link that can drop every
//! Nth frame, delay every frame, and flip one byte of TCP payload at a
//! chosen stream offset (fixing the TCP checksum, so the corruption reaches
//! the receiving application as a backend that corrupts data before the
//! checksum would). [`CableControl::pause`] stops both directions for a
//! while, as a crashed backend does: frames sent meanwhile wait in the
//! queue (as they wait in the TAP queue or the guest's ring) up to its
//! capacity; beyond it they are dropped.
//!
//! Each end has an eventfd that the peer signals when it queues a frame,
//! and a hint for frames held back by a delay or a pause.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};
use smoltcp::wire::{IpAddress, TcpPacket};
use tracing::debug;

use super::device::{FrameDevice, FrameError, ETHERNET_HEADER_LEN};
use super::with_ipv4_tcp;

/// Faults of one direction of a cable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkFaults {
    /// Drop frames number N, 2N, 3N, … (counted from 1 over every frame
    /// sent in this direction, ARP included).
    pub drop_every: Option<u64>,
    /// Hold every frame this long before it can be received.
    pub delay: Duration,
    /// Flip (XOR 0xff) the TCP payload byte at this stream offset the first
    /// time a segment carries it, and fix the TCP checksum. Offsets count
    /// from the first byte after the SYN of the last connection seen in
    /// this direction (streams up to 4 GiB).
    pub corrupt_stream_offset: Option<u64>,
}

/// Shape of a [`cable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CableConfig {
    /// MTU of both ends (the Ethernet payload, as Linux counts it).
    pub mtu: usize,
    /// Frames each direction holds before it drops.
    pub capacity: usize,
    /// MAC of end A and of end B.
    pub macs: [[u8; 6]; 2],
    /// Faults of A → B and of B → A.
    pub faults: [LinkFaults; 2],
}

impl Default for CableConfig {
    fn default() -> Self {
        CableConfig {
            mtu: 1500,
            capacity: 1024,
            macs: [[0x02, 0, 0, 0, 0, 0x0a], [0x02, 0, 0, 0, 0, 0x0b]],
            faults: [LinkFaults::default(); 2],
        }
    }
}

/// Counters of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Frames handed to the link.
    pub sent: u64,
    /// Frames received at the other end.
    pub delivered: u64,
    /// Frames dropped by `drop_every`.
    pub dropped_by_fault: u64,
    /// Frames dropped because the queue was full.
    pub dropped_full: u64,
    /// TCP payload bytes flipped by `corrupt_stream_offset`.
    pub corrupted: u64,
}

/// The two directions of a cable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From end A to end B.
    AToB,
    /// From end B to end A.
    BToA,
}

struct Held {
    frame: Vec<u8>,
    deliver_at: Instant,
}

/// One direction's queue and fault state.
struct Link {
    queue: VecDeque<Held>,
    faults: LinkFaults,
    /// Initial sequence number of the last SYN seen in this direction.
    isn: Option<u32>,
    corruption_done: bool,
    paused_until: Option<Instant>,
    stats: LinkStats,
}

impl Link {
    /// When the head frame may be received, if there is one.
    fn head_ready_at(&self) -> Option<Instant> {
        let head = self.queue.front()?.deliver_at;
        Some(match self.paused_until {
            Some(until) => head.max(until),
            None => head,
        })
    }

    /// Flips the target byte if `frame` is the TCP segment carrying it.
    fn maybe_corrupt(&mut self, frame: &mut [u8]) {
        let Some(target) = self.faults.corrupt_stream_offset else {
            return;
        };
        if self.corruption_done {
            return;
        }
        with_ipv4_tcp(frame, |tcp, src, dst| {
            self.corrupt_segment(target, tcp, src, dst)
        });
    }

    fn corrupt_segment(
        &mut self,
        target: u64,
        tcp: &mut TcpPacket<&mut [u8]>,
        src: IpAddress,
        dst: IpAddress,
    ) {
        let seq = tcp.seq_number().0 as u32;
        if tcp.syn() {
            self.isn = Some(seq);
            return;
        }
        let Some(isn) = self.isn else {
            return;
        };
        let first = u64::from(seq.wrapping_sub(isn).wrapping_sub(1));
        let len = tcp.payload_mut().len() as u64;
        if target < first || target - first >= len {
            return;
        }
        tcp.payload_mut()[(target - first) as usize] ^= 0xff;
        tcp.fill_checksum(&src, &dst);
        self.corruption_done = true;
        self.stats.corrupted += 1;
        debug!(offset = target, "cable corrupted a stream byte");
    }
}

struct Shared {
    /// Index 0: A → B, index 1: B → A.
    links: [Mutex<Link>; 2],
    /// Index 0: A's wakeup, index 1: B's.
    wakes: [EventFd; 2],
    config: CableConfig,
}

impl Shared {
    fn link(&self, index: usize) -> MutexGuard<'_, Link> {
        // A panic while holding the lock leaves the queue consistent (every
        // update is a single push or pop), so a poisoned lock is still used.
        self.links[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One end of a [`cable`].
pub struct CableEnd {
    /// 0 for A, 1 for B: sends on `links[me]`, receives on `links[1 - me]`.
    me: usize,
    shared: Arc<Shared>,
}

/// Fault control and counters of a [`cable`], usable from any thread.
#[derive(Clone)]
pub struct CableControl {
    shared: Arc<Shared>,
}

/// A new cable: end A, end B, and its control.
///
/// # Panics
/// If the kernel refuses an eventfd (out of file descriptors).
pub fn cable(config: CableConfig) -> (CableEnd, CableEnd, CableControl) {
    let link = |faults| {
        Mutex::new(Link {
            queue: VecDeque::new(),
            faults,
            isn: None,
            corruption_done: false,
            paused_until: None,
            stats: LinkStats::default(),
        })
    };
    let wake = || {
        EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .expect("eventfd for a test cable")
    };
    let shared = Arc::new(Shared {
        links: [link(config.faults[0]), link(config.faults[1])],
        wakes: [wake(), wake()],
        config,
    });
    (
        CableEnd {
            me: 0,
            shared: Arc::clone(&shared),
        },
        CableEnd {
            me: 1,
            shared: Arc::clone(&shared),
        },
        CableControl { shared },
    )
}

impl CableControl {
    /// Stops delivery in both directions for `duration` from now, as a
    /// backend crash and restart would.
    pub fn pause(&self, duration: Duration) {
        let until = Instant::now() + duration;
        for index in 0..2 {
            self.shared.link(index).paused_until = Some(until);
        }
        debug!(?duration, "cable paused");
    }

    /// The counters of one direction.
    pub fn stats(&self, direction: Direction) -> LinkStats {
        let index = match direction {
            Direction::AToB => 0,
            Direction::BToA => 1,
        };
        self.shared.link(index).stats
    }
}

impl CableEnd {
    /// Pops the head of the incoming link if it may be received now.
    fn pop_ready(&self, buf: &mut Vec<u8>) -> bool {
        let mut link = self.shared.link(1 - self.me);
        let now = Instant::now();
        match link.head_ready_at() {
            Some(at) if at <= now => {}
            _ => return false,
        }
        if link.paused_until.is_some_and(|until| until <= now) {
            link.paused_until = None;
        }
        let Some(held) = link.queue.pop_front() else {
            return false;
        };
        link.stats.delivered += 1;
        *buf = held.frame;
        true
    }
}

impl FrameDevice for CableEnd {
    fn send(&mut self, frame: &[u8]) -> Result<(), FrameError> {
        let max = self.shared.config.mtu + ETHERNET_HEADER_LEN;
        if frame.len() > max {
            return Err(FrameError::TooLong {
                len: frame.len(),
                max,
            });
        }
        let mut link = self.shared.link(self.me);
        link.stats.sent += 1;
        let n = link.stats.sent;
        if link
            .faults
            .drop_every
            .is_some_and(|k| k > 0 && n.is_multiple_of(k))
        {
            link.stats.dropped_by_fault += 1;
            return Ok(());
        }
        if link.queue.len() >= self.shared.config.capacity {
            link.stats.dropped_full += 1;
            return Ok(());
        }
        let mut frame = frame.to_vec();
        link.maybe_corrupt(&mut frame);
        let deliver_at = Instant::now() + link.faults.delay;
        link.queue.push_back(Held { frame, deliver_at });
        drop(link);
        // The only possible failure is an overflowing counter (2^64 - 2
        // wakeups nobody read), which still leaves the fd readable.
        let _ = self.shared.wakes[1 - self.me].write(1);
        Ok(())
    }

    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<bool, FrameError> {
        if self.pop_ready(buf) {
            return Ok(true);
        }
        // Clear the wakeup, then look again: a frame queued after this
        // read signals the fd anew, so no wakeup is lost.
        let _ = self.shared.wakes[self.me].read();
        Ok(self.pop_ready(buf))
    }

    fn wait_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.shared.wakes[self.me].as_fd())
    }

    fn poll_again_in(&self) -> Option<Duration> {
        let at = self.shared.link(1 - self.me).head_ready_at()?;
        Some(at.saturating_duration_since(Instant::now()))
    }

    fn mac(&self) -> [u8; 6] {
        self.shared.config.macs[self.me]
    }

    fn mtu(&self) -> usize {
        self.shared.config.mtu
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{
        EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Address, Ipv4Packet, TcpSeqNumber,
    };

    /// An Ethernet/IPv4/TCP frame with `payload` at sequence `seq`.
    fn tcp_frame(seq: u32, syn: bool, payload: &[u8]) -> Vec<u8> {
        let ip_len = 20 + 20 + payload.len();
        let mut frame = vec![0u8; ETHERNET_HEADER_LEN + ip_len];
        let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
        eth.set_ethertype(EthernetProtocol::Ipv4);
        let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
        ip.set_version(4);
        ip.set_header_len(20);
        ip.set_total_len(ip_len as u16);
        ip.set_hop_limit(64);
        ip.set_next_header(IpProtocol::Tcp);
        ip.set_src_addr(Ipv4Address::new(10, 0, 0, 1));
        ip.set_dst_addr(Ipv4Address::new(10, 0, 0, 2));
        ip.fill_checksum();
        let mut tcp = TcpPacket::new_unchecked(ip.payload_mut());
        tcp.set_header_len(20);
        tcp.set_seq_number(TcpSeqNumber(seq as i32));
        tcp.set_syn(syn);
        tcp.payload_mut().copy_from_slice(payload);
        let (src, dst) = (IpAddress::v4(10, 0, 0, 1), IpAddress::v4(10, 0, 0, 2));
        tcp.fill_checksum(&src, &dst);
        frame
    }

    fn tcp_payload_checked(frame: &[u8]) -> (Vec<u8>, bool) {
        let eth = EthernetFrame::new_checked(frame).unwrap();
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        let ok = tcp.verify_checksum(
            &IpAddress::Ipv4(ip.src_addr()),
            &IpAddress::Ipv4(ip.dst_addr()),
        );
        (tcp.payload().to_vec(), ok)
    }

    #[test]
    fn frames_cross_in_order_and_wake_the_peer() {
        let (mut a, mut b, ctl) = cable(CableConfig::default());
        a.send(&[1; 60]).unwrap();
        a.send(&[2; 61]).unwrap();
        let mut fds = [nix::poll::PollFd::new(
            b.wait_fd().unwrap(),
            nix::poll::PollFlags::POLLIN,
        )];
        assert_eq!(nix::poll::poll(&mut fds, 0u8).unwrap(), 1);
        let mut buf = Vec::new();
        assert!(b.recv(&mut buf).unwrap());
        assert_eq!(buf, vec![1; 60]);
        assert!(b.recv(&mut buf).unwrap());
        assert_eq!(buf, vec![2; 61]);
        assert!(!b.recv(&mut buf).unwrap());
        let mut fds = [nix::poll::PollFd::new(
            b.wait_fd().unwrap(),
            nix::poll::PollFlags::POLLIN,
        )];
        assert_eq!(nix::poll::poll(&mut fds, 0u8).unwrap(), 0, "drained");
        assert!(!a.recv(&mut buf).unwrap());
        assert_eq!(ctl.stats(Direction::AToB).delivered, 2);
        assert!(a.send(&[0; 1515]).is_err());
    }

    #[test]
    fn every_nth_frame_is_dropped_and_a_full_queue_drops() {
        let mut config = CableConfig {
            capacity: 4,
            ..CableConfig::default()
        };
        config.faults[0].drop_every = Some(3);
        let (mut a, mut b, ctl) = cable(config);
        for i in 1..=7u8 {
            a.send(&[i; 60]).unwrap();
        }
        let mut got = Vec::new();
        let mut buf = Vec::new();
        while b.recv(&mut buf).unwrap() {
            got.push(buf[0]);
        }
        // 3 and 6 dropped by the fault; 1, 2, 4, 5 fill the queue; 7 overflows.
        assert_eq!(got, vec![1, 2, 4, 5]);
        let stats = ctl.stats(Direction::AToB);
        assert_eq!((stats.dropped_by_fault, stats.dropped_full), (2, 1));
    }

    #[test]
    fn delay_and_pause_hold_frames_with_a_hint() {
        let mut config = CableConfig::default();
        config.faults[1].delay = Duration::from_millis(30);
        let (mut a, mut b, ctl) = cable(config);
        let mut buf = Vec::new();
        b.send(&[9; 60]).unwrap();
        assert!(!a.recv(&mut buf).unwrap());
        let hint = a.poll_again_in().expect("a held frame");
        assert!(hint > Duration::from_millis(10) && hint <= Duration::from_millis(30));
        std::thread::sleep(hint);
        assert!(a.recv(&mut buf).unwrap());

        ctl.pause(Duration::from_millis(50));
        a.send(&[8; 60]).unwrap();
        assert!(!b.recv(&mut buf).unwrap());
        assert!(b.poll_again_in().unwrap() > Duration::from_millis(30));
        std::thread::sleep(Duration::from_millis(55));
        assert!(b.recv(&mut buf).unwrap());
        assert_eq!(buf, vec![8; 60]);
    }

    #[test]
    fn corruption_hits_the_chosen_stream_offset_with_a_valid_checksum() {
        let mut config = CableConfig::default();
        config.faults[0].corrupt_stream_offset = Some(105);
        let (mut a, mut b, ctl) = cable(config);
        let isn = u32::MAX - 50; // the stream offsets wrap the sequence space
        a.send(&tcp_frame(isn, true, &[])).unwrap();
        a.send(&tcp_frame(isn.wrapping_add(1), false, &[0u8; 100]))
            .unwrap();
        a.send(&tcp_frame(isn.wrapping_add(101), false, &[0u8; 100]))
            .unwrap();
        // A retransmission of the same bytes is left alone: one flip only.
        a.send(&tcp_frame(isn.wrapping_add(101), false, &[0u8; 100]))
            .unwrap();
        let mut buf = Vec::new();
        let mut payloads = Vec::new();
        while b.recv(&mut buf).unwrap() {
            payloads.push(tcp_payload_checked(&buf));
        }
        assert_eq!(payloads.len(), 4);
        assert!(payloads.iter().all(|(_, ok)| *ok), "checksums stay valid");
        assert!(payloads[1].0.iter().all(|&b| b == 0));
        let flipped: Vec<usize> = (0..100).filter(|&i| payloads[2].0[i] != 0).collect();
        assert_eq!(flipped, vec![5]);
        assert_eq!(payloads[2].0[5], 0xff);
        assert!(payloads[3].0.iter().all(|&b| b == 0));
        assert_eq!(ctl.stats(Direction::AToB).corrupted, 1);
    }
}
