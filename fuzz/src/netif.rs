//! netif: TX slots a frontend published, taken packet by packet with
//! [`parse_tx`] as netback's TX loop does; RX buffers it posted, filled by
//! [`rx_plan`] with a frame of any length.

use arbitrary::{Result, Unstructured};
use shadowback_netback::netif::{
    parse_tx, rx_plan, Checksum, Gso, GsoType, RxFeatures, RxFrame, TxRequest, TxSlotSource,
    TxVerdict, ETH_HLEN, XEN_PAGE_SIZE,
};
use shadowback_ring::netif::{
    NetifRxRequest, NetifTxRequest, NETIF_RSP_NULL, NETIF_RSP_OKAY, NETRXF_MORE_DATA,
    NETTXF_CSUM_BLANK, NETTXF_DATA_VALIDATED, NETTXF_EXTRA_INFO, NETTXF_MORE_DATA,
    NET_TX_RING_SIZE, XEN_NETIF_EXTRA_FLAG_MORE, XEN_NETIF_NR_SLOTS_MIN,
};
use vm_memory::ByteValued;

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let _ = if u.arbitrary().unwrap_or(false) {
        tx(&mut u)
    } else {
        rx(&mut u)
    };
}

/// Hands out the slots and counts what was taken.
struct Slots {
    slots: Vec<NetifTxRequest>,
    next: usize,
}

impl TxSlotSource for Slots {
    fn next_slot(&mut self) -> Option<NetifTxRequest> {
        let slot = self.slots.get(self.next).copied();
        self.next += usize::from(slot.is_some());
        slot
    }
}

fn tx(u: &mut Unstructured) -> Result<()> {
    let count = u.int_in_range(0..=NET_TX_RING_SIZE as usize)?;
    let mut slots = Vec::with_capacity(count);
    for _ in 0..count {
        slots.push(tx_slot(u)?);
    }
    let mut src = Slots { slots, next: 0 };
    loop {
        let before = src.next;
        let Some(parsed) = parse_tx(&mut src) else {
            return Ok(());
        };
        let taken = src.next - before;
        assert!(taken >= 1);
        match parsed {
            Ok(TxRequest::Packet(p)) => {
                assert_eq!(p.slots.len(), taken, "slots kept ≠ slots taken");
                assert!(p.slots.len() <= NET_TX_RING_SIZE as usize);
                let first = p.fragments.first().expect("a packet has data");
                assert!(first.len >= ETH_HLEN, "runt accepted: {p:?}");
                let sum: u32 = p.fragments.iter().map(|f| u32::from(f.len)).sum();
                assert_eq!(sum, u32::from(p.size), "fragments ≠ size: {p:?}");
                for f in &p.fragments {
                    assert!(
                        u32::from(f.offset) + u32::from(f.len) <= XEN_PAGE_SIZE,
                        "fragment crosses its page: {f:?}"
                    );
                }
                if let Some(g) = p.gso {
                    assert!(g.size > 0);
                }
                check_responses(&p.slots.responses(NETIF_RSP_OKAY), &p.slots);
            }
            Ok(TxRequest::Multicast(m)) => {
                assert_eq!(m.slots.len(), taken, "slots kept ≠ slots taken");
                assert!(m.slots.extra_count() >= 1);
                check_responses(&m.slots.responses(NETIF_RSP_OKAY), &m.slots);
            }
            Err(TxVerdict::Error { slots, .. }) => {
                assert_eq!(slots.len(), taken, "slots answered ≠ slots taken");
            }
            Err(TxVerdict::Fatal(_)) => return Ok(()),
        }
    }
}

fn check_responses(
    rsps: &[shadowback_ring::netif::NetifTxResponse],
    slots: &shadowback_netback::netif::TxSlots,
) {
    assert_eq!(rsps.len(), slots.len());
    for (i, r) in rsps.iter().enumerate() {
        assert_eq!(slots.is_extra(i), r.status == NETIF_RSP_NULL);
    }
}

fn tx_slot(u: &mut Unstructured) -> Result<NetifTxRequest> {
    if u.ratio(1, 8)? {
        let mut raw = [0u8; 12];
        u.fill_buffer(&mut raw)?;
        let mut slot = NetifTxRequest::default();
        slot.as_mut_slice().copy_from_slice(&raw);
        return Ok(slot);
    }
    if u.ratio(1, 6)? {
        // An extra-info slot: type, flags, then the union.
        let mut raw = [0u8; 12];
        u.fill_buffer(&mut raw)?;
        raw[0] = u.int_in_range(0..=6)?;
        raw[1] = if u.arbitrary()? {
            XEN_NETIF_EXTRA_FLAG_MORE
        } else {
            0
        };
        let mut slot = NetifTxRequest::default();
        slot.as_mut_slice().copy_from_slice(&raw);
        return Ok(slot);
    }
    let mut flags = 0;
    for (bit, ratio) in [
        (NETTXF_MORE_DATA, 2),
        (NETTXF_EXTRA_INFO, 6),
        (NETTXF_CSUM_BLANK, 4),
        (NETTXF_DATA_VALIDATED, 4),
    ] {
        if u.ratio(1, ratio)? {
            flags |= bit;
        }
    }
    Ok(NetifTxRequest {
        gref: u.int_in_range(0..=64)?,
        offset: u.int_in_range(0..=4200)?,
        flags,
        id: u.arbitrary()?,
        size: if u.ratio(3, 4)? {
            u.int_in_range(0..=4200)?
        } else {
            u.arbitrary()?
        },
    })
}

fn rx(u: &mut Unstructured) -> Result<()> {
    let posted: Vec<NetifRxRequest> = (0..u.int_in_range(0..=24)?)
        .map(|_| {
            Ok(NetifRxRequest {
                id: u.arbitrary()?,
                pad: u.arbitrary()?,
                gref: u.arbitrary()?,
            })
        })
        .collect::<Result<_>>()?;
    let features = RxFeatures {
        sg: u.arbitrary()?,
        gso_tcpv4: u.arbitrary()?,
        gso_tcpv6: u.arbitrary()?,
    };
    let frame = RxFrame {
        len: u.int_in_range(0..=70_000)?,
        checksum: *u.choose(&[Checksum::Unknown, Checksum::Partial, Checksum::Validated])?,
        gso: if u.arbitrary()? {
            Some(Gso {
                kind: *u.choose(&[GsoType::TcpV4, GsoType::TcpV6])?,
                size: u.arbitrary()?,
            })
        } else {
            None
        },
    };
    let Ok(plan) = rx_plan(&posted, &frame, features) else {
        return Ok(());
    };
    assert!(plan.responses.len() <= posted.len());
    assert!(plan.responses.len() <= XEN_NETIF_NR_SLOTS_MIN + 1);
    // The copies cover the frame exactly, in order, a page at most each.
    let mut done = 0;
    for c in &plan.copies {
        assert_eq!(c.range.start, done, "gap or overlap in {:?}", plan.copies);
        assert!(c.range.len() <= XEN_PAGE_SIZE as usize);
        assert!(usize::from(c.offset) + c.range.len() <= XEN_PAGE_SIZE as usize);
        assert!(c.request < plan.responses.len());
        assert_eq!(c.gref, posted[c.request].gref);
        done = c.range.end;
    }
    assert_eq!(done, frame.len, "the frame is not delivered whole");
    let last_data = plan.copies.last().map(|c| c.request);
    for c in &plan.copies {
        let more = plan.responses[c.request].flags & NETRXF_MORE_DATA != 0;
        assert_eq!(more, Some(c.request) != last_data);
    }
    Ok(())
}
