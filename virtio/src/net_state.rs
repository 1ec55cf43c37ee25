//! The state a virtio-net driver sets through the control virtqueue —
//! MAC, receive mode, MAC filter tables, guest offloads — and the area
//! that keeps it across backend crashes (docs/ARCHITECTURE.md §8.1).
//!
//! The area is a memfd the supervisor creates per vhost-user connection
//! (written with the vif's MAC and the driver's offloads) and hands to
//! every backend instance with `attach-virtio` (`device-state=1`,
//! docs/PROTOCOL.md §6b). A backend writes it before it answers a control
//! command, so the next instance serves with what the driver was told
//! took effect. Two slots, written alternately: a slot's sequence number
//! is cleared first and written last, so a backend that dies in the
//! middle of a write leaves the other slot, the previous state, valid (and
//! its command unanswered: the next instance executes it again).
//!
//! | slot bytes (little-endian) | |
//! |---|---|
//! | `0..8` | sequence number (0: empty or being written) |
//! | `8..12` | `NVST` |
//! | `12..14` | payload length |
//! | `16..` | payload: mac\[6\], rx mode (u8 bits), offloads (u64), unicast count (u8), multicast count (u8), the unicast then the multicast MACs, queue pairs in use (u16; absent in a slot written before multiqueue: 1) |

use std::fs::File;
use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
};

/// Entries each MAC filter table keeps; a driver that sends more gets
/// that kind of address accepted wholesale (as QEMU does).
pub const MAC_TABLE_ENTRIES: usize = 64;
/// Bytes of one slot, and of the whole area.
const SLOT_BYTES: u64 = 2048;
pub const AREA_BYTES: u64 = 2 * SLOT_BYTES;
const SLOT_HEADER: usize = 16;
const TAG: [u8; 4] = *b"NVST";
const FIXED_PAYLOAD: usize = 6 + 1 + 8 + 2;
const _: () =
    assert!(SLOT_HEADER + FIXED_PAYLOAD + 2 * MAC_TABLE_ENTRIES * 6 + 2 <= SLOT_BYTES as usize);

/// The guest offloads a driver may switch with
/// `VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET` (virtio 1.2 §5.1.6.5.6.1): the
/// receive offload features, by feature bit.
pub const GUEST_OFFLOAD_BITS: u64 = (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_ECN)
    | (1 << VIRTIO_NET_F_GUEST_UFO);

/// Receive mode bits (`VIRTIO_NET_CTRL_RX_*` commands).
pub mod rx_mode {
    /// Every frame.
    pub const PROMISC: u8 = 1 << 0;
    /// Every multicast frame.
    pub const ALLMULTI: u8 = 1 << 1;
    /// The unicast table overflowed: every unicast frame.
    pub const UNI_OVERFLOW: u8 = 1 << 6;
    /// The multicast table overflowed: every multicast frame.
    pub const MULTI_OVERFLOW: u8 = 1 << 7;
    /// Bits a valid state may hold.
    pub const KNOWN: u8 = PROMISC | ALLMULTI | UNI_OVERFLOW | MULTI_OVERFLOW;
}

/// What a driver set. A device starts promiscuous, as QEMU's does: a
/// driver without `VIRTIO_NET_F_CTRL_RX` can never ask for a filter, and
/// Linux turns promiscuity off itself when it programs the tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetDeviceState {
    pub mac: [u8; 6],
    /// [`rx_mode`] bits.
    pub rx_mode: u8,
    /// Guest offloads in force, as feature bits (a subset of
    /// [`GUEST_OFFLOAD_BITS`] and of what the driver negotiated).
    pub offloads: u64,
    pub unicast: Vec<[u8; 6]>,
    pub multicast: Vec<[u8; 6]>,
    /// Receive/transmit queue pairs the driver uses
    /// (`VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`; 1 after a reset).
    pub pairs: u16,
}

/// Why an area holds no usable state.
#[derive(Debug, thiserror::Error)]
pub enum NetStateError {
    #[error("device state area: {0}")]
    Io(#[from] std::io::Error),
    #[error("device state area holds no valid slot")]
    Empty,
}

impl NetDeviceState {
    /// A device reset: the vif's MAC, promiscuous, every negotiated guest
    /// offload on, empty tables.
    pub fn initial(mac: [u8; 6], features: u64) -> Self {
        NetDeviceState {
            mac,
            rx_mode: rx_mode::PROMISC,
            offloads: features & GUEST_OFFLOAD_BITS,
            unicast: Vec::new(),
            multicast: Vec::new(),
            pairs: 1,
        }
    }

    /// A netif attachment's state: nothing but its multicast list, empty
    /// (a Xen guest has no receive mode to set; docs/ARCHITECTURE.md
    /// §11.6).
    pub fn netif() -> Self {
        NetDeviceState {
            rx_mode: 0,
            ..Self::initial([0; 6], 0)
        }
    }

    /// Whether a frame for Ethernet destination `dst` reaches the driver
    /// (virtio 1.2 §5.1.6.5.1, the receive filter QEMU implements).
    pub fn accepts(&self, dst: &[u8; 6]) -> bool {
        if self.rx_mode & rx_mode::PROMISC != 0 {
            return true;
        }
        if dst == &[0xff; 6] {
            return true;
        }
        if dst[0] & 1 != 0 {
            self.rx_mode & (rx_mode::ALLMULTI | rx_mode::MULTI_OVERFLOW) != 0
                || self.multicast.contains(dst)
        } else {
            self.rx_mode & rx_mode::UNI_OVERFLOW != 0
                || dst == &self.mac
                || self.unicast.contains(dst)
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(FIXED_PAYLOAD + 6 * MAC_TABLE_ENTRIES);
        p.extend_from_slice(&self.mac);
        p.push(self.rx_mode);
        p.extend_from_slice(&self.offloads.to_le_bytes());
        let uc = &self.unicast[..self.unicast.len().min(MAC_TABLE_ENTRIES)];
        let mc = &self.multicast[..self.multicast.len().min(MAC_TABLE_ENTRIES)];
        p.push(uc.len() as u8);
        p.push(mc.len() as u8);
        for m in uc.iter().chain(mc) {
            p.extend_from_slice(m);
        }
        p.extend_from_slice(&self.pairs.to_le_bytes());
        p
    }

    /// Parses a payload; `None` for anything a backend never writes.
    fn decode(p: &[u8]) -> Option<Self> {
        let fixed = p.get(..FIXED_PAYLOAD)?;
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&fixed[..6]);
        let rx_mode = fixed[6];
        let offloads = u64::from_le_bytes(fixed[7..15].try_into().ok()?);
        let (nu, nm) = (usize::from(fixed[15]), usize::from(fixed[16]));
        let tables = FIXED_PAYLOAD + 6 * (nu + nm);
        // A slot written before multiqueue ends with the tables.
        let pairs = match p.get(tables..) {
            Some([]) => 1,
            Some([a, b]) => u16::from_le_bytes([*a, *b]),
            _ => return None,
        };
        if rx_mode & !rx_mode::KNOWN != 0
            || offloads & !GUEST_OFFLOAD_BITS != 0
            || nu > MAC_TABLE_ENTRIES
            || nm > MAC_TABLE_ENTRIES
            || pairs == 0
        {
            return None;
        }
        let macs: Vec<[u8; 6]> = p[FIXED_PAYLOAD..tables]
            .chunks_exact(6)
            .map(|c| [c[0], c[1], c[2], c[3], c[4], c[5]])
            .collect();
        Some(NetDeviceState {
            mac,
            rx_mode,
            offloads,
            unicast: macs[..nu].to_vec(),
            multicast: macs[nu..].to_vec(),
            pairs,
        })
    }
}

/// The two-slot area in a memfd (see the module docs).
#[derive(Debug)]
pub struct NetStateArea {
    file: File,
    /// Sequence number of the newest valid slot.
    seq: u64,
}

impl NetStateArea {
    /// Sizes `file` (a fresh or reset memfd) and writes `state` as the
    /// only valid slot.
    pub fn create(file: File, state: &NetDeviceState) -> Result<Self, NetStateError> {
        file.set_len(0)?;
        file.set_len(AREA_BYTES)?;
        let mut area = NetStateArea { file, seq: 0 };
        area.store(state)?;
        Ok(area)
    }

    /// Opens an area and reads its newest valid slot.
    pub fn open(file: File) -> Result<(Self, NetDeviceState), NetStateError> {
        let (seq, state) = newest(&file)?;
        Ok((NetStateArea { file, seq }, state))
    }

    /// The newest valid state in an area another process writes (the
    /// supervisor reads the MAC a driver set this way, for `GET_CONFIG`).
    /// A backend writes the slot it does not point at and only then its
    /// sequence number, so a read sees a whole state: the newest, or,
    /// during a write, the one before it.
    pub fn read(file: &File) -> Result<NetDeviceState, NetStateError> {
        newest(file).map(|(_, state)| state)
    }

    /// Writes `state` into the older slot and makes it the newest.
    pub fn store(&mut self, state: &NetDeviceState) -> Result<(), NetStateError> {
        let seq = self.seq + 1;
        let at = (seq % 2) * SLOT_BYTES;
        let payload = state.encode();
        let mut header = [0u8; SLOT_HEADER];
        header[8..12].copy_from_slice(&TAG);
        header[12..14].copy_from_slice(&(payload.len() as u16).to_le_bytes());
        // Sequence cleared, body, then the sequence: each a completed
        // pwrite, so a death between two leaves this slot invalid and
        // the other one whole.
        self.file.write_all_at(&header, at)?;
        self.file.write_all_at(&payload, at + SLOT_HEADER as u64)?;
        self.file.write_all_at(&seq.to_le_bytes(), at)?;
        self.seq = seq;
        Ok(())
    }
}

fn newest(file: &File) -> Result<(u64, NetDeviceState), NetStateError> {
    let mut best: Option<(u64, NetDeviceState)> = None;
    for slot in 0..2 {
        if let Some((seq, state)) = read_slot(file, slot)? {
            if best.as_ref().is_none_or(|(s, _)| seq > *s) {
                best = Some((seq, state));
            }
        }
    }
    best.ok_or(NetStateError::Empty)
}

fn read_slot(file: &File, slot: u64) -> Result<Option<(u64, NetDeviceState)>, NetStateError> {
    let mut buf = vec![0u8; SLOT_BYTES as usize];
    let n = file.read_at(&mut buf, slot * SLOT_BYTES)?;
    let buf = &buf[..n];
    let Some(header) = buf.get(..SLOT_HEADER) else {
        return Ok(None);
    };
    let seq = u64::from_le_bytes(header[..8].try_into().unwrap_or_default());
    let len = usize::from(u16::from_le_bytes([header[12], header[13]]));
    if seq == 0 || header[8..12] != TAG {
        return Ok(None);
    }
    let state = buf
        .get(SLOT_HEADER..SLOT_HEADER + len)
        .and_then(NetDeviceState::decode);
    Ok(state.map(|s| (seq, s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd() -> File {
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        File::from(memfd_create(c"net-state-test", MemFdCreateFlag::MFD_CLOEXEC).unwrap())
    }

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

    fn sample() -> NetDeviceState {
        NetDeviceState {
            mac: [2, 0, 0, 0, 0, 9],
            rx_mode: rx_mode::ALLMULTI,
            offloads: 1 << VIRTIO_NET_F_GUEST_CSUM,
            unicast: vec![[2, 1, 1, 1, 1, 1]],
            multicast: vec![[0x33, 0x33, 0, 0, 0, 1], [1, 0, 0x5e, 0, 0, 1]],
            pairs: 3,
        }
    }

    #[test]
    fn the_newest_slot_wins_and_a_torn_write_keeps_the_previous_state() {
        let file = memfd();
        let copy = file.try_clone().unwrap();
        let first = NetDeviceState::initial(MAC, 1 << VIRTIO_NET_F_GUEST_CSUM);
        let mut area = NetStateArea::create(file, &first).unwrap();
        assert_eq!(
            NetStateArea::open(copy.try_clone().unwrap()).unwrap().1,
            first
        );
        area.store(&sample()).unwrap();
        let (mut reopened, state) = NetStateArea::open(copy.try_clone().unwrap()).unwrap();
        assert_eq!(state, sample());
        // A backend that dies after clearing the next slot's sequence:
        // the state it was writing is not seen, the previous one is.
        let next = (reopened.seq + 1) % 2 * SLOT_BYTES;
        copy.write_all_at(&[0u8; 8], next).unwrap();
        copy.write_all_at(b"garbage", next + 16).unwrap();
        assert_eq!(
            NetStateArea::open(copy.try_clone().unwrap()).unwrap().1,
            sample()
        );
        // And the next store after a reopen goes on from the newest.
        let mut third = sample();
        third.rx_mode = rx_mode::PROMISC;
        reopened.store(&third).unwrap();
        assert_eq!(NetStateArea::open(copy).unwrap().1, third);
    }

    #[test]
    fn an_empty_or_corrupt_area_is_refused() {
        let file = memfd();
        file.set_len(AREA_BYTES).unwrap();
        assert!(matches!(
            NetStateArea::open(file.try_clone().unwrap()),
            Err(NetStateError::Empty)
        ));
        NetStateArea::create(file.try_clone().unwrap(), &sample()).unwrap();
        // Counts beyond the table size, unknown mode bits, offloads that
        // are not guest offloads: never written by a backend, refused.
        for (at, byte) in [(16 + 15, 65u8), (16 + 6, 0x10), (16 + 7 + 7, 0x80)] {
            let f = memfd();
            NetStateArea::create(f.try_clone().unwrap(), &sample()).unwrap();
            f.write_all_at(&[byte], SLOT_BYTES + at).unwrap();
            assert!(NetStateArea::open(f).is_err(), "byte {at} = {byte:#x}");
        }
        let tiny = memfd();
        tiny.set_len(10).unwrap();
        assert!(NetStateArea::open(tiny).is_err());
        // Zero queue pairs: never written, refused.
        let f = memfd();
        let state = sample();
        NetStateArea::create(f.try_clone().unwrap(), &state).unwrap();
        let pairs_at = SLOT_BYTES + 16 + (FIXED_PAYLOAD + 6 * 3) as u64;
        f.write_all_at(&[0, 0], pairs_at).unwrap();
        assert!(NetStateArea::read(&f).is_err());
    }

    /// A slot written before multiqueue (no pairs field) is one pair.
    #[test]
    fn a_slot_without_queue_pairs_is_one_pair() {
        let f = memfd();
        let mut state = sample();
        NetStateArea::create(f.try_clone().unwrap(), &state).unwrap();
        assert_eq!(NetStateArea::read(&f).unwrap().pairs, 3);
        let len_at = SLOT_BYTES + 12;
        let mut len = [0u8; 2];
        f.read_exact_at(&mut len, len_at).unwrap();
        let shorter = u16::from_le_bytes(len) - 2;
        f.write_all_at(&shorter.to_le_bytes(), len_at).unwrap();
        state.pairs = 1;
        assert_eq!(NetStateArea::read(&f).unwrap(), state);
    }

    #[test]
    fn the_receive_filter_follows_the_mode_and_tables() {
        let mut s = NetDeviceState::initial(MAC, 0);
        let other = [2, 9, 9, 9, 9, 9];
        let mc = [0x33, 0x33, 0, 0, 0, 1];
        assert!(s.accepts(&other) && s.accepts(&mc), "promiscuous at reset");
        s.rx_mode = 0;
        assert!(s.accepts(&MAC) && s.accepts(&[0xff; 6]));
        assert!(!s.accepts(&other) && !s.accepts(&mc));
        s.unicast.push(other);
        s.multicast.push(mc);
        assert!(s.accepts(&other) && s.accepts(&mc));
        assert!(!s.accepts(&[1, 0, 0x5e, 0, 0, 1]));
        s.rx_mode = rx_mode::ALLMULTI;
        assert!(s.accepts(&[1, 0, 0x5e, 0, 0, 1]));
        assert!(!s.accepts(&[2, 8, 8, 8, 8, 8]));
        s.rx_mode = rx_mode::UNI_OVERFLOW;
        assert!(s.accepts(&[2, 8, 8, 8, 8, 8]));
        assert!(!s.accepts(&[1, 0, 0x5e, 0, 0, 2]));
    }
}
