use super::*;
use shadowback_ring::netif::{XEN_NETIF_EXTRA_TYPE_GSO, XEN_NETIF_GSO_TYPE_TCPV4};

fn posted(n: usize) -> Vec<NetifRxRequest> {
    (0..n)
        .map(|i| NetifRxRequest {
            id: 100 + i as u16,
            pad: 0,
            gref: 0x6000 + i as u32,
        })
        .collect()
}

const SG: RxFeatures = RxFeatures {
    sg: true,
    gso_tcpv4: true,
    gso_tcpv6: false,
};

fn frame(len: usize) -> RxFrame {
    RxFrame {
        len,
        checksum: Checksum::Unknown,
        gso: None,
    }
}

#[test]
fn small_frame_takes_one_buffer() {
    let plan = rx_plan(
        &posted(4),
        &RxFrame {
            checksum: Checksum::Partial,
            ..frame(60)
        },
        RxFeatures::default(),
    )
    .unwrap();
    assert_eq!(
        plan.copies,
        [RxCopy {
            request: 0,
            gref: 0x6000,
            offset: 0,
            range: 0..60
        }]
    );
    assert_eq!(
        plan.responses,
        [NetifRxResponse {
            id: 100,
            offset: 0,
            flags: NETRXF_CSUM_BLANK | NETRXF_DATA_VALIDATED,
            status: 60
        }]
    );
}

#[test]
fn multi_buffer_frame_sets_more_data_on_all_but_the_last() {
    let plan = rx_plan(&posted(4), &frame(9000), SG).unwrap();
    let got: Vec<(u16, u16, i16)> = plan
        .responses
        .iter()
        .map(|r| (r.id, r.flags, r.status))
        .collect();
    assert_eq!(
        got,
        [
            (100, NETRXF_MORE_DATA, 4096),
            (101, NETRXF_MORE_DATA, 4096),
            (102, 0, 808)
        ]
    );
    let ranges: Vec<_> = plan.copies.iter().map(|c| c.range.clone()).collect();
    assert_eq!(ranges, [0..4096, 4096..8192, 8192..9000]);
    // Exactly a page: one buffer, no more_data.
    let plan = rx_plan(&posted(4), &frame(4096), SG).unwrap();
    assert_eq!(plan.responses.len(), 1);
    assert_eq!(plan.responses[0].flags, 0);
}

#[test]
fn gso_extra_takes_the_second_request_slot() {
    let f = RxFrame {
        len: 5000,
        checksum: Checksum::Partial,
        gso: Some(Gso {
            kind: GsoType::TcpV4,
            size: 1448,
        }),
    };
    assert_eq!(rx_slots_needed(&f, SG), Ok(3));
    let plan = rx_plan(&posted(3), &f, SG).unwrap();
    assert_eq!(plan.responses.len(), 3);
    let first = plan.responses[0];
    assert_eq!(
        first.flags,
        NETRXF_EXTRA_INFO | NETRXF_MORE_DATA | NETRXF_CSUM_BLANK | NETRXF_DATA_VALIDATED
    );
    assert_eq!((first.id, first.status), (100, 4096));
    let extra = plan.responses[1].as_extra();
    assert_eq!(extra.type_, XEN_NETIF_EXTRA_TYPE_GSO);
    assert_eq!(extra.flags, 0);
    assert_eq!(extra.gso().size, 1448);
    assert_eq!(extra.gso().type_, XEN_NETIF_GSO_TYPE_TCPV4);
    let last = plan.responses[2];
    assert_eq!((last.id, last.flags, last.status), (102, 0, 904));
    // No data lands in the extra slot's buffer.
    assert_eq!(
        plan.copies.iter().map(|c| c.request).collect::<Vec<_>>(),
        [0, 2]
    );
    assert_eq!(plan.copies[1].range, 4096..5000);
}

#[test]
fn refusals() {
    let gso6 = RxFrame {
        gso: Some(Gso {
            kind: GsoType::TcpV6,
            size: 1400,
        }),
        ..frame(3000)
    };
    let gso0 = RxFrame {
        gso: Some(Gso {
            kind: GsoType::TcpV4,
            size: 0,
        }),
        ..frame(3000)
    };
    let cases = [
        (frame(0), SG, NetifRxError::Empty),
        (
            frame(4097),
            RxFeatures::default(),
            NetifRxError::NeedsSg { len: 4097 },
        ),
        (
            frame(18 * 4096 + 1),
            SG,
            NetifRxError::TooLarge { len: 18 * 4096 + 1 },
        ),
        (gso6, SG, NetifRxError::GsoNotNegotiated),
        (gso0, SG, NetifRxError::GsoSizeZero),
    ];
    for (f, feat, want) in cases {
        assert_eq!(rx_plan(&posted(32), &f, feat), Err(want), "{f:?}");
    }
    assert_eq!(
        rx_plan(&posted(2), &frame(9000), SG),
        Err(NetifRxError::NotEnoughBuffers {
            needed: 3,
            posted: 2
        })
    );
    assert!(rx_plan(&posted(18), &frame(18 * 4096), SG).is_ok());
}

proptest::proptest! {
    #[test]
    fn copies_cover_the_frame_once(len in 1usize..80_000, n in 0usize..24, sg: bool, gso: bool) {
        let f = RxFrame {
            len,
            checksum: Checksum::Unknown,
            gso: gso.then_some(Gso { kind: GsoType::TcpV4, size: 1400 }),
        };
        let features = RxFeatures { sg, gso_tcpv4: true, gso_tcpv6: true };
        if let Ok(plan) = rx_plan(&posted(n), &f, features) {
            let mut at = 0;
            for c in &plan.copies {
                proptest::prop_assert_eq!(c.range.start, at);
                proptest::prop_assert!(c.range.len() <= XEN_PAGE_SIZE as usize);
                at = c.range.end;
            }
            proptest::prop_assert_eq!(at, len);
            proptest::prop_assert!(plan.responses.len() <= n);
            let data: usize = plan.responses.iter().enumerate()
                .filter(|(i, _)| !(gso && *i == 1))
                .map(|(_, r)| r.status as usize).sum();
            proptest::prop_assert_eq!(data, len);
        }
    }
}
