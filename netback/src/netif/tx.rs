//! TX request validation, as Linux xen-netback does it.
//!
//! A TX packet on the ring is its first slot, the extra-info slots chained
//! from it (`NETTXF_extra_info`, then `XEN_NETIF_EXTRA_FLAG_MORE`), and the
//! slots following while `NETTXF_more_data` is set. The first slot's `size`
//! is the whole packet's; its own data length is what the other slots leave.
//!
//! [`parse_tx`] takes one packet from a [`TxSlotSource`] and returns either
//! a request to execute ([`TxRequest`]) or a [`TxVerdict`]:
//!
//! * [`TxVerdict::Fatal`] — the frontend broke the protocol: disconnect the
//!   vif (`xenvif_fatal_tx_err`). A slot or extra-info slot promised but not
//!   on the ring, an extra of unknown type, more than [`FATAL_SKB_SLOTS`]
//!   slots after the first, a slot whose data crosses its page, a GSO extra
//!   of size 0 or unknown type.
//! * [`TxVerdict::Error`] — a bad packet from a well-behaved ring: answer
//!   every slot taken with `XEN_NETIF_RSP_ERROR` (`xenvif_tx_err`) and go
//!   on. More than [`LEGACY_SLOTS_MAX`] slots after the first, a slot larger
//!   than what the packet has left, a first slot shorter than [`ETH_HLEN`].
//!
//! A fatal condition found after an error was decided (a later slot crossing
//! its page) is still fatal, as in `xenvif_count_requests`.

use shadowback_ring::grant::GrantRef;
use shadowback_ring::netif::{
    NetifExtraHash, NetifExtraInfo, NetifTxRequest, NetifTxResponse, NETIF_RSP_NULL,
    NETTXF_CSUM_BLANK, NETTXF_DATA_VALIDATED, NETTXF_EXTRA_INFO, NETTXF_MORE_DATA,
    NET_TX_RING_SIZE, XEN_NETIF_EXTRA_FLAG_MORE, XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_EXTRA_TYPE_HASH, XEN_NETIF_EXTRA_TYPE_MAX, XEN_NETIF_EXTRA_TYPE_MCAST_ADD,
    XEN_NETIF_EXTRA_TYPE_MCAST_DEL, XEN_NETIF_NR_SLOTS_MIN,
};
use vm_memory::ByteValued;

use super::{Checksum, Gso, GsoType, XEN_PAGE_SIZE};

/// Smallest first slot: an Ethernet header.
pub const ETH_HLEN: u16 = 14;
/// `XEN_NETBK_LEGACY_SLOTS_MAX`: slots after the first beyond this many
/// make the packet an error (the historical `MAX_SKB_FRAGS`, 18).
pub const LEGACY_SLOTS_MAX: usize = XEN_NETIF_NR_SLOTS_MIN;
/// `FATAL_SKB_SLOTS_DEFAULT`: slots after the first beyond this many are
/// a malicious frontend.
pub const FATAL_SKB_SLOTS: usize = 20;

/// The slots of the TX ring the frontend has published and the backend has
/// not taken yet, each copied out of the ring exactly once when taken
/// (`RING_COPY_REQUEST`), so a frontend rewriting a slot cannot change what
/// was validated.
pub trait TxSlotSource {
    /// The next published slot, copied; `None` when the frontend has
    /// published no further slot.
    fn next_slot(&mut self) -> Option<NetifTxRequest>;
}

impl<I: Iterator<Item = NetifTxRequest>> TxSlotSource for I {
    fn next_slot(&mut self) -> Option<NetifTxRequest> {
        self.next()
    }
}

/// Every slot one packet took from the ring, in ring order: the first slot,
/// `extra_count` extra-info slots, then the data slots that followed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxSlots {
    slots: Vec<NetifTxRequest>,
    extra_count: usize,
}

impl TxSlots {
    fn new(first: NetifTxRequest, mut spare: Vec<NetifTxRequest>) -> Self {
        spare.clear();
        spare.push(first);
        TxSlots {
            slots: spare,
            extra_count: 0,
        }
    }

    /// All slots, as copied, in ring order.
    pub fn all(&self) -> &[NetifTxRequest] {
        &self.slots
    }

    /// Slots consumed from the ring (each gets one response).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Never true: a packet has its first slot.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The first slot.
    pub fn first(&self) -> &NetifTxRequest {
        &self.slots[0]
    }

    /// The extra-info slots, in ring order.
    pub fn extras(&self) -> impl Iterator<Item = NetifExtraInfo> + '_ {
        self.slots[1..1 + self.extra_count]
            .iter()
            .map(NetifTxRequest::as_extra)
    }

    /// The data slots after the first, in ring order.
    pub fn following(&self) -> &[NetifTxRequest] {
        &self.slots[1 + self.extra_count..]
    }

    /// Number of extra-info slots.
    pub fn extra_count(&self) -> usize {
        self.extra_count
    }

    /// Whether slot `i` (in ring order) is an extra-info slot.
    pub fn is_extra(&self, i: usize) -> bool {
        (1..=self.extra_count).contains(&i)
    }

    /// The responses of the packet, one per slot in ring order: `status`
    /// for the first and every data slot, `XEN_NETIF_RSP_NULL` for each
    /// extra-info slot (`make_tx_response`).
    pub fn responses(&self, status: i16) -> Vec<NetifTxResponse> {
        self.responses_iter(status).collect()
    }

    /// [`TxSlots::responses`] without collecting them (the TX hot path
    /// puts each in the ring as it goes).
    pub fn responses_iter(&self, status: i16) -> impl Iterator<Item = NetifTxResponse> + '_ {
        self.slots
            .iter()
            .enumerate()
            .map(move |(i, slot)| slot_response(slot, self.is_extra(i), status))
    }
}

/// The response to one slot. Linux writes only `status` into an extra-info
/// slot's response, leaving as `id` the slot's first two bytes (the extra's
/// `type` and `flags`); this does the same, so the ring reads alike.
pub fn slot_response(slot: &NetifTxRequest, is_extra: bool, status: i16) -> NetifTxResponse {
    if is_extra {
        let b = slot.as_slice();
        NetifTxResponse {
            id: u16::from_ne_bytes([b[0], b[1]]),
            status: NETIF_RSP_NULL,
        }
    } else {
        NetifTxResponse {
            id: slot.id,
            status,
        }
    }
}

/// A piece of the packet's data in a granted page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxFragment {
    pub gref: GrantRef,
    /// Offset in the page; `offset + len <= XEN_PAGE_SIZE`.
    pub offset: u16,
    pub len: u16,
}

/// A valid TX packet, ready to be read from its grants and sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxPacket {
    /// What it took from the ring (logged, and answered once sent).
    pub slots: TxSlots,
    /// Total bytes: the first slot's `size`, the sum of `fragments`.
    pub size: u16,
    /// The data in order: the first slot (at least [`ETH_HLEN`] bytes),
    /// then every following slot that carries data (empty slots are only
    /// answered, as `xenvif_get_requests` does).
    pub fragments: Vec<TxFragment>,
    pub checksum: Checksum,
    pub gso: Option<Gso>,
    /// The frontend's hash of the packet (`XEN_NETIF_EXTRA_TYPE_HASH`),
    /// passed through as given.
    pub hash: Option<NetifExtraHash>,
}

/// A multicast filter change carried by an extra-info slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MulticastOp {
    Add([u8; 6]),
    Del([u8; 6]),
}

/// A request whose extras hold `XEN_NETIF_EXTRA_TYPE_MCAST_ADD` or `_DEL`:
/// a filter change, not a frame. As in Linux, it is the first slot and its
/// extras only (slots after it are the next packet), an ADD wins over a DEL
/// in the same chain, and it is answered `OKAY` (a full list accepts every
/// multicast frame: [`super::MulticastFilter`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxMulticast {
    pub slots: TxSlots,
    pub op: MulticastOp,
}

/// What a valid request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxRequest {
    Packet(TxPacket),
    Multicast(TxMulticast),
}

impl TxRequest {
    /// The slots it took from the ring.
    pub fn slots(&self) -> &TxSlots {
        match self {
            TxRequest::Packet(p) => &p.slots,
            TxRequest::Multicast(m) => &m.slots,
        }
    }
}

/// A protocol violation: the vif is disconnected, nothing is answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxFatal {
    #[error("packet continues after {taken} slots but the ring holds no more")]
    MissingSlot { taken: usize },
    #[error("extra-info slot promised but the ring holds no more")]
    MissingExtra,
    #[error("extra-info slot of invalid type {0}")]
    BadExtraType(u8),
    #[error("more than {FATAL_SKB_SLOTS} slots after the first")]
    TooManySlots,
    #[error("more slots in one packet than the ring holds ({NET_TX_RING_SIZE})")]
    RingOverrun,
    #[error("slot data crosses its page: offset {offset} + size {size} > {XEN_PAGE_SIZE}")]
    CrossesPage { offset: u16, size: u16 },
    #[error("GSO extra with segment size 0")]
    GsoSizeZero,
    #[error("GSO extra of unknown type {0}")]
    BadGsoType(u8),
}

/// Why a packet is answered with `XEN_NETIF_RSP_ERROR` and dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxDrop {
    #[error("more than {LEGACY_SLOTS_MAX} slots after the first")]
    TooManySlots,
    #[error("slot of {size} bytes exceeds the {remaining} the packet has left")]
    SlotTooLarge { size: u16, remaining: u16 },
    #[error("first slot holds {0} bytes, less than an Ethernet header")]
    Runt(u16),
}

/// A packet that is not executed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxVerdict {
    /// Disconnect the vif.
    Fatal(TxFatal),
    /// Answer every slot of `slots` (`slots.responses(XEN_NETIF_RSP_ERROR)`)
    /// and carry on with the next packet.
    Error { slots: TxSlots, reason: TxDrop },
}

impl TxVerdict {
    /// Slots the erroneous packet consumed; 0 for a fatal one.
    pub fn consumed_slots(&self) -> usize {
        match self {
            TxVerdict::Fatal(_) => 0,
            TxVerdict::Error { slots, .. } => slots.len(),
        }
    }
}

/// Takes one packet from `src` and validates it; `None` if the ring holds
/// no slot. Never takes more than the packet's slots, and never more than
/// a ring's worth.
pub fn parse_tx(src: &mut impl TxSlotSource) -> Option<Result<TxRequest, TxVerdict>> {
    parse_tx_reusing(src, &mut TxSpares::default())
}

/// [`parse_tx`], building the packet in vectors of packets already
/// answered (the TX hot path allocates nothing per packet then).
pub fn parse_tx_reusing(
    src: &mut impl TxSlotSource,
    spares: &mut TxSpares,
) -> Option<Result<TxRequest, TxVerdict>> {
    let first = src.next_slot()?;
    Some(parse_from(first, src, spares))
}

/// Emptied vectors of answered packets, for [`parse_tx_reusing`]. It keeps
/// at most [`TxSpares::KEPT`] of each kind, none longer than
/// [`TxSpares::LONGEST_KEPT`]: a guest chaining the longest packets it may
/// cannot make it hold more than a few KiB.
#[derive(Debug, Default)]
pub struct TxSpares {
    slots: Vec<Vec<NetifTxRequest>>,
    fragments: Vec<Vec<TxFragment>>,
}

impl TxSpares {
    /// Spare vectors kept of each kind: two TAP batches of packets.
    pub const KEPT: usize = 64;
    /// Longest vector kept: a packet's first slot and every slot after it
    /// a legal packet may have, plus room for extras.
    pub const LONGEST_KEPT: usize = 1 + FATAL_SKB_SLOTS + 4;

    /// Keeps the vector of an answered packet's slots.
    pub fn keep_slots(&mut self, slots: TxSlots) {
        if self.slots.len() < Self::KEPT && slots.slots.capacity() <= Self::LONGEST_KEPT {
            self.slots.push(slots.slots);
        }
    }

    /// Keeps the vector of a sent packet's fragments.
    pub fn keep_fragments(&mut self, fragments: Vec<TxFragment>) {
        if self.fragments.len() < Self::KEPT && fragments.capacity() <= Self::LONGEST_KEPT {
            self.fragments.push(fragments);
        }
    }
}

fn parse_from(
    first: NetifTxRequest,
    src: &mut impl TxSlotSource,
    spares: &mut TxSpares,
) -> Result<TxRequest, TxVerdict> {
    let mut slots = TxSlots::new(first, spares.slots.pop().unwrap_or_default());
    // The latest extra of each type (`extras[type - 1]` in Linux).
    let mut extras: [Option<NetifExtraInfo>; XEN_NETIF_EXTRA_TYPE_MAX as usize - 1] =
        [None; XEN_NETIF_EXTRA_TYPE_MAX as usize - 1];

    if first.flags & NETTXF_EXTRA_INFO != 0 {
        loop {
            let slot = take(src, &slots, TxFatal::MissingExtra)?;
            slots.slots.push(slot);
            slots.extra_count += 1;
            let extra = slot.as_extra();
            if extra.type_ == 0 || extra.type_ >= XEN_NETIF_EXTRA_TYPE_MAX {
                return Err(TxVerdict::Fatal(TxFatal::BadExtraType(extra.type_)));
            }
            extras[usize::from(extra.type_ - 1)] = Some(extra);
            if extra.flags & XEN_NETIF_EXTRA_FLAG_MORE == 0 {
                break;
            }
        }
    }

    let extra_of = |t: u8| extras[usize::from(t - 1)];
    if let Some(e) = extra_of(XEN_NETIF_EXTRA_TYPE_MCAST_ADD) {
        let op = MulticastOp::Add(e.mcast_addr());
        return Ok(TxRequest::Multicast(TxMulticast { slots, op }));
    }
    if let Some(e) = extra_of(XEN_NETIF_EXTRA_TYPE_MCAST_DEL) {
        let op = MulticastOp::Del(e.mcast_addr());
        return Ok(TxRequest::Multicast(TxMulticast { slots, op }));
    }

    // xenvif_count_requests: the first slot's own length is what the
    // following slots leave of the packet's size.
    let mut first_len = first.size;
    let mut drop: Option<TxDrop> = None;
    let mut more = first.flags & NETTXF_MORE_DATA != 0;
    let mut following = 0usize;
    while more {
        let slot = take(src, &slots, TxFatal::MissingSlot { taken: slots.len() })?;
        if following >= FATAL_SKB_SLOTS {
            return Err(TxVerdict::Fatal(TxFatal::TooManySlots));
        }
        if drop.is_none() && following >= LEGACY_SLOTS_MAX {
            drop = Some(TxDrop::TooManySlots);
        }
        slots.slots.push(slot);
        if drop.is_none() && slot.size > first_len {
            drop = Some(TxDrop::SlotTooLarge {
                size: slot.size,
                remaining: first_len,
            });
        }
        // Linux subtracts in 16 bits whatever was decided; only a dropped
        // packet can wrap, and its length is not used.
        first_len = first_len.wrapping_sub(slot.size);
        following += 1;
        check_page(&slot, slot.size)?;
        more = slot.flags & NETTXF_MORE_DATA != 0;
    }
    if let Some(reason) = drop {
        return Err(TxVerdict::Error { slots, reason });
    }
    if first_len < ETH_HLEN {
        return Err(TxVerdict::Error {
            slots,
            reason: TxDrop::Runt(first_len),
        });
    }
    check_page(&first, first_len)?;

    let gso = match extra_of(XEN_NETIF_EXTRA_TYPE_GSO) {
        None => None,
        Some(e) => {
            let g = e.gso();
            if g.size == 0 {
                return Err(TxVerdict::Fatal(TxFatal::GsoSizeZero));
            }
            let kind = GsoType::from_wire(g.type_)
                .ok_or(TxVerdict::Fatal(TxFatal::BadGsoType(g.type_)))?;
            Some(Gso { kind, size: g.size })
        }
    };
    let checksum = if first.flags & NETTXF_CSUM_BLANK != 0 {
        Checksum::Partial
    } else if first.flags & NETTXF_DATA_VALIDATED != 0 {
        Checksum::Validated
    } else {
        Checksum::Unknown
    };
    let mut fragments = spares.fragments.pop().unwrap_or_default();
    fragments.clear();
    fragments.push(TxFragment {
        gref: first.gref,
        offset: first.offset,
        len: first_len,
    });
    fragments.extend(
        slots
            .following()
            .iter()
            .filter(|s| s.size > 0)
            .map(|s| TxFragment {
                gref: s.gref,
                offset: s.offset,
                len: s.size,
            }),
    );
    Ok(TxRequest::Packet(TxPacket {
        size: first.size,
        fragments,
        checksum,
        gso,
        hash: extra_of(XEN_NETIF_EXTRA_TYPE_HASH).map(|e| e.hash()),
        slots,
    }))
}

/// The next slot, or the fatal verdict `missing` if the ring has none. A
/// packet longer than the ring cannot come from a real ring.
fn take(
    src: &mut impl TxSlotSource,
    slots: &TxSlots,
    missing: TxFatal,
) -> Result<NetifTxRequest, TxVerdict> {
    if slots.len() >= NET_TX_RING_SIZE as usize {
        return Err(TxVerdict::Fatal(TxFatal::RingOverrun));
    }
    src.next_slot().ok_or(TxVerdict::Fatal(missing))
}

/// "No crossing a page as the payload mustn't fragment."
fn check_page(slot: &NetifTxRequest, len: u16) -> Result<(), TxVerdict> {
    if u32::from(slot.offset) + u32::from(len) > XEN_PAGE_SIZE {
        return Err(TxVerdict::Fatal(TxFatal::CrossesPage {
            offset: slot.offset,
            size: len,
        }));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
