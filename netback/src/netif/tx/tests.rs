use super::*;
use shadowback_ring::netif::{
    NetifExtraGso, NETIF_RSP_ERROR, NETIF_RSP_OKAY, XEN_NETIF_GSO_TYPE_NONE,
    XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6,
};

fn slot(id: u16, gref: u32, offset: u16, size: u16, flags: u16) -> NetifTxRequest {
    NetifTxRequest {
        gref,
        offset,
        flags,
        id,
        size,
    }
}

fn gso_slot(type_: u8, size: u16, flags: u8) -> NetifTxRequest {
    NetifTxRequest::from_extra(&NetifExtraInfo::from_gso(
        flags,
        &NetifExtraGso {
            size,
            type_,
            ..Default::default()
        },
    ))
}

fn extra_slot(type_: u8, flags: u8) -> NetifTxRequest {
    NetifTxRequest::from_extra(&NetifExtraInfo::from_mcast(
        type_,
        flags,
        [1, 0, 0x5e, 0, 0, 1],
    ))
}

/// A packet of `1 + following` data slots, each following slot 10 bytes.
fn chain(following: usize) -> Vec<NetifTxRequest> {
    let total = 100 + 10 * following as u16;
    let mut v = vec![slot(0, 1, 0, total, NETTXF_MORE_DATA)];
    for i in 1..=following {
        let flags = if i < following { NETTXF_MORE_DATA } else { 0 };
        v.push(slot(i as u16, 1 + i as u32, 0, 10, flags));
    }
    v
}

fn run(slots: &[NetifTxRequest]) -> (Result<TxRequest, TxVerdict>, usize) {
    let mut it = slots.iter().copied();
    let out = parse_tx(&mut it).expect("a first slot");
    (out, slots.len() - it.len())
}

fn packet(slots: &[NetifTxRequest]) -> TxPacket {
    match run(slots).0 {
        Ok(TxRequest::Packet(p)) => p,
        other => panic!("expected a packet, got {other:?}"),
    }
}

fn fatal(slots: &[NetifTxRequest]) -> TxFatal {
    match run(slots).0 {
        Err(TxVerdict::Fatal(f)) => f,
        other => panic!("expected a fatal verdict, got {other:?}"),
    }
}

fn error(slots: &[NetifTxRequest]) -> (TxDrop, usize) {
    match run(slots) {
        (Err(v @ TxVerdict::Error { .. }), taken) => {
            let TxVerdict::Error { reason, .. } = &v else {
                unreachable!()
            };
            assert_eq!(v.consumed_slots(), taken, "consumed slots = slots taken");
            (*reason, taken)
        }
        other => panic!("expected an error verdict, got {other:?}"),
    }
}

#[test]
fn empty_ring_yields_nothing() {
    assert_eq!(parse_tx(&mut std::iter::empty()), None);
}

#[test]
fn single_slot_packet() {
    let p = packet(&[slot(7, 42, 100, 60, NETTXF_CSUM_BLANK)]);
    assert_eq!(p.size, 60);
    assert_eq!(
        p.fragments,
        [TxFragment {
            gref: 42,
            offset: 100,
            len: 60
        }]
    );
    assert_eq!(p.checksum, Checksum::Partial);
    assert_eq!(p.gso, None);
    assert_eq!(
        p.slots.responses(NETIF_RSP_OKAY),
        [NetifTxResponse {
            id: 7,
            status: NETIF_RSP_OKAY
        }]
    );
}

#[test]
fn multi_slot_packet_first_slot_gets_the_remainder() {
    // The following slots hold 4096 of a 3000-byte packet: dropped, and
    // the next packet stays on the ring.
    let slots = [
        slot(1, 10, 0, 3000, NETTXF_MORE_DATA),
        slot(2, 11, 96, 4000, NETTXF_MORE_DATA),
        slot(3, 12, 0, 0, NETTXF_MORE_DATA),
        slot(4, 13, 4000, 96, 0),
        slot(9, 99, 0, 60, 0),
    ];
    assert_eq!(
        error(&slots),
        (
            TxDrop::SlotTooLarge {
                size: 4000,
                remaining: 3000
            },
            4
        )
    );
    let slots = [
        slot(1, 10, 0, 5000, NETTXF_MORE_DATA | NETTXF_DATA_VALIDATED),
        slot(2, 11, 96, 4000, NETTXF_MORE_DATA),
        slot(3, 12, 0, 0, NETTXF_MORE_DATA), // empty: answered, no fragment
        slot(4, 13, 4000, 96, 0),
        slot(9, 99, 0, 60, 0), // the next packet
    ];
    let (_, taken) = run(&slots);
    assert_eq!(taken, 4, "the next packet stays on the ring");
    let p = packet(&slots);
    assert_eq!(p.size, 5000);
    assert_eq!(p.checksum, Checksum::Validated);
    assert_eq!(
        p.fragments,
        [
            TxFragment {
                gref: 10,
                offset: 0,
                len: 904
            },
            TxFragment {
                gref: 11,
                offset: 96,
                len: 4000
            },
            TxFragment {
                gref: 13,
                offset: 4000,
                len: 96
            },
        ]
    );
    let ids: Vec<u16> = p
        .slots
        .responses(NETIF_RSP_OKAY)
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, [1, 2, 3, 4]);
}

#[test]
fn gso_packet_with_extra_and_hash() {
    let hash = NetifExtraHash {
        type_: 1,
        algorithm: 1,
        value: [1, 2, 3, 4],
    };
    let slots = [
        slot(
            5,
            20,
            0,
            3000,
            NETTXF_EXTRA_INFO | NETTXF_MORE_DATA | NETTXF_CSUM_BLANK,
        ),
        gso_slot(XEN_NETIF_GSO_TYPE_TCPV6, 1440, XEN_NETIF_EXTRA_FLAG_MORE),
        NetifTxRequest::from_extra(&NetifExtraInfo::from_hash(0, &hash)),
        slot(6, 21, 0, 2000, 0),
    ];
    let p = packet(&slots);
    assert_eq!(
        p.gso,
        Some(Gso {
            kind: GsoType::TcpV6,
            size: 1440
        })
    );
    assert_eq!(p.hash, Some(hash));
    assert_eq!(p.slots.extra_count(), 2);
    assert_eq!(p.fragments.len(), 2);
    assert_eq!(p.fragments[0].len, 1000);
    let rsp = p.slots.responses(NETIF_RSP_OKAY);
    assert_eq!(rsp.len(), 4);
    assert_eq!(
        rsp.iter().map(|r| r.status).collect::<Vec<_>>(),
        [
            NETIF_RSP_OKAY,
            NETIF_RSP_NULL,
            NETIF_RSP_NULL,
            NETIF_RSP_OKAY
        ]
    );
    assert_eq!((rsp[0].id, rsp[3].id), (5, 6));
    // An extra slot's response keeps its first two bytes, as Linux leaves them.
    assert_eq!(
        rsp[1].id,
        u16::from_ne_bytes([XEN_NETIF_EXTRA_TYPE_GSO, XEN_NETIF_EXTRA_FLAG_MORE])
    );
}

#[test]
fn gso_tcpv4() {
    let p = packet(&[
        slot(1, 1, 0, 1000, NETTXF_EXTRA_INFO),
        gso_slot(XEN_NETIF_GSO_TYPE_TCPV4, 536, 0),
    ]);
    assert_eq!(
        p.gso,
        Some(Gso {
            kind: GsoType::TcpV4,
            size: 536
        })
    );
}

#[test]
fn multicast_takes_only_the_first_slot_and_its_extras() {
    let slots = [
        slot(3, 0, 0, 0, NETTXF_EXTRA_INFO | NETTXF_MORE_DATA),
        extra_slot(XEN_NETIF_EXTRA_TYPE_MCAST_DEL, XEN_NETIF_EXTRA_FLAG_MORE),
        extra_slot(XEN_NETIF_EXTRA_TYPE_MCAST_ADD, 0),
        slot(4, 1, 0, 60, 0),
    ];
    let (out, taken) = run(&slots);
    assert_eq!(taken, 3);
    let Ok(TxRequest::Multicast(m)) = out else {
        panic!("{out:?}")
    };
    assert_eq!(m.op, MulticastOp::Add([1, 0, 0x5e, 0, 0, 1]));
    assert_eq!(
        m.slots
            .responses(NETIF_RSP_OKAY)
            .iter()
            .map(|r| r.status)
            .collect::<Vec<_>>(),
        [NETIF_RSP_OKAY, NETIF_RSP_NULL, NETIF_RSP_NULL]
    );
    let (out, _) = run(&[
        slot(3, 0, 0, 0, NETTXF_EXTRA_INFO),
        extra_slot(XEN_NETIF_EXTRA_TYPE_MCAST_DEL, 0),
    ]);
    assert!(matches!(
        out,
        Ok(TxRequest::Multicast(TxMulticast {
            op: MulticastOp::Del(_),
            ..
        }))
    ));
}

#[test]
fn largest_legal_packet_has_18_following_slots() {
    let p = packet(&chain(LEGACY_SLOTS_MAX));
    assert_eq!(p.slots.len(), 1 + LEGACY_SLOTS_MAX);
    assert_eq!(p.fragments.len(), 1 + LEGACY_SLOTS_MAX);
    let sum: u32 = p.fragments.iter().map(|f| u32::from(f.len)).sum();
    assert_eq!(sum, u32::from(p.size));
}

// ---------------------------------------------------------- error verdicts

#[test]
fn errors_answer_every_slot_taken() {
    // 19 and 20 following slots: dropped, all consumed.
    for following in [LEGACY_SLOTS_MAX + 1, FATAL_SKB_SLOTS] {
        let slots = chain(following);
        assert_eq!(
            error(&slots),
            (TxDrop::TooManySlots, 1 + following),
            "{following} following slots"
        );
    }
    // A following slot larger than what is left; the rest still consumed.
    let slots = [
        slot(1, 1, 0, 100, NETTXF_MORE_DATA),
        slot(2, 2, 0, 50, NETTXF_MORE_DATA),
        slot(3, 3, 0, 60, NETTXF_MORE_DATA),
        slot(4, 4, 0, 10, 0),
        slot(5, 5, 0, 60, 0),
    ];
    assert_eq!(
        error(&slots),
        (
            TxDrop::SlotTooLarge {
                size: 60,
                remaining: 50
            },
            4
        )
    );
    // Runts: a short single slot, or a first slot left with 13 bytes.
    assert_eq!(error(&[slot(1, 1, 0, 13, 0)]), (TxDrop::Runt(13), 1));
    assert_eq!(error(&[slot(1, 1, 0, 0, 0)]), (TxDrop::Runt(0), 1));
    let slots = [
        slot(1, 1, 0, 100, NETTXF_MORE_DATA | NETTXF_EXTRA_INFO),
        gso_slot(XEN_NETIF_GSO_TYPE_TCPV4, 1000, 0),
        slot(2, 2, 0, 87, 0),
    ];
    assert_eq!(error(&slots), (TxDrop::Runt(13), 3));
    assert_eq!(packet(&[slot(1, 1, 0, 14, 0)]).size, 14);
}

#[test]
fn error_responses_are_error_and_null() {
    let slots = [
        slot(1, 1, 0, 10, NETTXF_EXTRA_INFO | NETTXF_MORE_DATA),
        gso_slot(XEN_NETIF_GSO_TYPE_TCPV4, 1000, 0),
        slot(2, 2, 0, 5, 0),
    ];
    let (Err(TxVerdict::Error { slots, .. }), _) = run(&slots) else {
        panic!("expected an error")
    };
    let rsp = slots.responses(NETIF_RSP_ERROR);
    assert_eq!(
        rsp.iter().map(|r| (r.id, r.status)).collect::<Vec<_>>()[..],
        [
            (1, NETIF_RSP_ERROR),
            (rsp[1].id, NETIF_RSP_NULL),
            (2, NETIF_RSP_ERROR)
        ]
    );
}

// ---------------------------------------------------------- fatal verdicts

#[test]
fn fatal_cases() {
    let cases: Vec<(&str, Vec<NetifTxRequest>, TxFatal)> = vec![
        (
            "more_data on the last published slot",
            vec![slot(1, 1, 0, 100, NETTXF_MORE_DATA)],
            TxFatal::MissingSlot { taken: 1 },
        ),
        (
            "more_data chain runs off the ring",
            vec![
                slot(1, 1, 0, 100, NETTXF_MORE_DATA),
                slot(2, 2, 0, 10, NETTXF_MORE_DATA),
            ],
            TxFatal::MissingSlot { taken: 2 },
        ),
        (
            "extra_info on the last published slot",
            vec![slot(1, 1, 0, 100, NETTXF_EXTRA_INFO)],
            TxFatal::MissingExtra,
        ),
        (
            "extra chain runs off the ring",
            vec![
                slot(1, 1, 0, 100, NETTXF_EXTRA_INFO),
                gso_slot(XEN_NETIF_GSO_TYPE_TCPV4, 1000, XEN_NETIF_EXTRA_FLAG_MORE),
            ],
            TxFatal::MissingExtra,
        ),
        (
            "extra of type NONE",
            vec![
                slot(1, 1, 0, 100, NETTXF_EXTRA_INFO),
                extra_slot(XEN_NETIF_EXTRA_TYPE_NONE_FOR_TEST, 0),
            ],
            TxFatal::BadExtraType(0),
        ),
        (
            "extra of type MAX",
            vec![
                slot(1, 1, 0, 100, NETTXF_EXTRA_INFO),
                extra_slot(XEN_NETIF_EXTRA_TYPE_MAX, 0),
            ],
            TxFatal::BadExtraType(XEN_NETIF_EXTRA_TYPE_MAX),
        ),
        (
            "21 following slots",
            chain(FATAL_SKB_SLOTS + 1),
            TxFatal::TooManySlots,
        ),
        (
            "first slot crosses its page",
            vec![slot(1, 1, 4000, 100, 0)],
            TxFatal::CrossesPage {
                offset: 4000,
                size: 100,
            },
        ),
        (
            "first slot's own part crosses its page",
            vec![
                slot(1, 1, 4000, 200, NETTXF_MORE_DATA),
                slot(2, 2, 0, 100, 0),
            ],
            TxFatal::CrossesPage {
                offset: 4000,
                size: 100,
            },
        ),
        (
            "following slot crosses its page",
            vec![
                slot(1, 1, 0, 200, NETTXF_MORE_DATA),
                slot(2, 2, 4090, 100, 0),
            ],
            TxFatal::CrossesPage {
                offset: 4090,
                size: 100,
            },
        ),
        (
            "a crossing slot after the packet was already dropped",
            vec![
                slot(1, 1, 0, 100, NETTXF_MORE_DATA),
                slot(2, 2, 0, 200, NETTXF_MORE_DATA),
                slot(3, 3, 4095, 2, 0),
            ],
            TxFatal::CrossesPage {
                offset: 4095,
                size: 2,
            },
        ),
        (
            "GSO size 0",
            vec![
                slot(1, 1, 0, 100, NETTXF_EXTRA_INFO),
                gso_slot(XEN_NETIF_GSO_TYPE_TCPV4, 0, 0),
            ],
            TxFatal::GsoSizeZero,
        ),
        (
            "GSO type NONE",
            vec![
                slot(1, 1, 0, 100, NETTXF_EXTRA_INFO),
                gso_slot(XEN_NETIF_GSO_TYPE_NONE, 1000, 0),
            ],
            TxFatal::BadGsoType(XEN_NETIF_GSO_TYPE_NONE),
        ),
        (
            "GSO type 3",
            vec![slot(1, 1, 0, 100, NETTXF_EXTRA_INFO), gso_slot(3, 1000, 0)],
            TxFatal::BadGsoType(3),
        ),
    ];
    for (name, slots, want) in cases {
        assert_eq!(fatal(&slots), want, "{name}");
    }
}

const XEN_NETIF_EXTRA_TYPE_NONE_FOR_TEST: u8 = shadowback_ring::netif::XEN_NETIF_EXTRA_TYPE_NONE;

#[test]
fn an_endless_extra_chain_stops_at_the_ring_size() {
    let mut src = std::iter::once(slot(1, 1, 0, 100, NETTXF_EXTRA_INFO)).chain(std::iter::repeat(
        gso_slot(XEN_NETIF_GSO_TYPE_TCPV4, 1000, XEN_NETIF_EXTRA_FLAG_MORE),
    ));
    assert_eq!(
        parse_tx(&mut src),
        Some(Err(TxVerdict::Fatal(TxFatal::RingOverrun)))
    );
}

// ----------------------------------------------------------------- proptest

fn any_slot() -> impl proptest::strategy::Strategy<Value = NetifTxRequest> {
    use proptest::prelude::*;
    // Small values often, so chains, extras and sizes interact.
    (
        any::<u32>(),
        prop_oneof![0u16..64, 3990u16..4200, any::<u16>()],
        0u16..16,
        any::<u16>(),
        prop_oneof![0u16..40, 1000u16..5000, any::<u16>()],
    )
        .prop_map(|(gref, offset, flags, id, size)| NetifTxRequest {
            gref,
            offset,
            flags,
            id,
            size,
        })
}

proptest::proptest! {
    #[test]
    fn arbitrary_slots_never_panic(slots in proptest::collection::vec(any_slot(), 1..64)) {
        let mut it = slots.iter().copied();
        let out = parse_tx(&mut it).expect("a first slot");
        let taken = slots.len() - it.len();
        match out {
            Ok(TxRequest::Packet(p)) => {
                proptest::prop_assert_eq!(p.slots.len(), taken);
                let sum: u32 = p.fragments.iter().map(|f| u32::from(f.len)).sum();
                proptest::prop_assert_eq!(sum, u32::from(p.size));
                for f in &p.fragments {
                    proptest::prop_assert!(u32::from(f.offset) + u32::from(f.len) <= XEN_PAGE_SIZE);
                }
                proptest::prop_assert!(p.fragments[0].len >= ETH_HLEN);
                proptest::prop_assert!(p.slots.following().len() <= LEGACY_SLOTS_MAX);
                proptest::prop_assert_eq!(p.slots.responses(0).len(), taken);
            }
            Ok(TxRequest::Multicast(m)) => {
                proptest::prop_assert_eq!(m.slots.len(), taken);
                proptest::prop_assert_eq!(m.slots.len(), 1 + m.slots.extra_count());
            }
            Err(v @ TxVerdict::Error { .. }) => {
                proptest::prop_assert_eq!(v.consumed_slots(), taken);
            }
            Err(TxVerdict::Fatal(_)) => {}
        }
    }
}

proptest::proptest! {
    /// Parsing into the vectors of earlier packets gives exactly what a
    /// fresh parse gives: nothing of an earlier packet shows through.
    #[test]
    fn reused_vectors_parse_like_fresh_ones(
        rings in proptest::collection::vec(proptest::collection::vec(any_slot(), 1..40), 1..8),
    ) {
        let mut spares = TxSpares::default();
        for slots in &rings {
            let mut fresh_src = slots.iter().copied();
            let mut reused_src = slots.iter().copied();
            loop {
                let fresh = parse_tx(&mut fresh_src);
                let reused = parse_tx_reusing(&mut reused_src, &mut spares);
                proptest::prop_assert_eq!(&fresh, &reused);
                proptest::prop_assert_eq!(fresh_src.len(), reused_src.len());
                match reused {
                    Some(Ok(TxRequest::Packet(p))) => {
                        spares.keep_fragments(p.fragments);
                        spares.keep_slots(p.slots);
                    }
                    Some(Ok(TxRequest::Multicast(m))) => spares.keep_slots(m.slots),
                    Some(Err(TxVerdict::Error { slots, .. })) => spares.keep_slots(slots),
                    Some(Err(TxVerdict::Fatal(_))) | None => break,
                }
            }
        }
        proptest::prop_assert!(spares.slots.len() <= TxSpares::KEPT);
        proptest::prop_assert!(spares
            .slots
            .iter()
            .all(|v| v.capacity() <= TxSpares::LONGEST_KEPT));
    }
}
