use super::*;
use crate::netif::{parse_tx, TxRequest};
use shadowback_ring::netif::{
    NetifExtraGso, NetifExtraInfo, NetifRxRequest, NetifRxResponse, NetifTxRequest,
    NetifTxResponse, NETIF_RSP_ERROR, NETIF_RSP_NULL, NETTXF_EXTRA_INFO, NETTXF_MORE_DATA,
    XEN_NETIF_GSO_TYPE_TCPV4,
};
use vm_memory::ByteValued;

/// A GSO packet of 1 + 1 extra + 2 following slots.
fn packet_slots() -> Vec<NetifTxRequest> {
    let slot = |id: u16, size: u16, flags: u16| NetifTxRequest {
        gref: 0x100 + u32::from(id),
        offset: 0,
        flags,
        id,
        size,
    };
    vec![
        slot(1, 3000, NETTXF_EXTRA_INFO | NETTXF_MORE_DATA),
        NetifTxRequest::from_extra(&NetifExtraInfo::from_gso(
            0,
            &NetifExtraGso {
                size: 1448,
                type_: XEN_NETIF_GSO_TYPE_TCPV4,
                ..Default::default()
            },
        )),
        slot(2, 1000, NETTXF_MORE_DATA),
        slot(3, 500, 0),
    ]
}

#[test]
fn a_tx_packet_round_trips_through_its_slot_records() {
    let slots = packet_slots();
    let Some(Ok(TxRequest::Packet(packet))) = parse_tx(&mut slots.iter().copied()) else {
        panic!("a valid packet")
    };
    let records: Vec<_> = tx::records(0xFFFF_FFFE, &packet.slots).collect();
    assert_eq!(records.len(), 4);
    assert_eq!(
        records.iter().map(|r| r.kind).collect::<Vec<_>>(),
        [
            tx::SlotKind::First,
            tx::SlotKind::Extra,
            tx::SlotKind::Following,
            tx::SlotKind::Following
        ]
    );
    // As the log stores them: padded to REQUEST_SIZE, replayed in any order.
    let mut logged: Vec<[u8; REQUEST_SIZE]> = records
        .iter()
        .map(|r| {
            let mut entry = [0u8; REQUEST_SIZE];
            entry[..tx::RECORD_LEN].copy_from_slice(&tx::encode(r));
            entry
        })
        .collect();
    logged.reverse();
    let decoded: Vec<_> = logged.iter().map(|e| tx::decode(e).unwrap()).collect();
    assert_eq!(decoded.iter().rev().copied().collect::<Vec<_>>(), records);
    let again = tx::reassemble(&decoded).unwrap();
    assert_eq!(again, slots);
    let Some(Ok(TxRequest::Packet(replayed))) = parse_tx(&mut again.into_iter()) else {
        panic!("the replayed packet parses")
    };
    assert_eq!(replayed, packet);

    let answers: Vec<_> = records.iter().map(tx::error_response).collect();
    assert_eq!(answers, packet.slots.responses(NETIF_RSP_ERROR));
    assert_eq!(answers[1].status, NETIF_RSP_NULL);
}

#[test]
fn incomplete_or_mixed_packets_are_refused() {
    let slots = packet_slots();
    let Some(Ok(req)) = parse_tx(&mut slots.iter().copied()) else {
        panic!("a valid packet")
    };
    let records: Vec<_> = tx::records(7, req.slots()).collect();
    let err = Err(NetifRecordError::IncompletePacket);
    assert_eq!(tx::reassemble(&records[..3]), err);
    assert_eq!(tx::reassemble(&[]), err);
    let mut dup = records.clone();
    dup[3] = dup[2];
    assert_eq!(tx::reassemble(&dup), err);
    let mut mixed = records.clone();
    mixed[2].packet = 8;
    assert_eq!(tx::reassemble(&mixed), err);
    let mut moved_first = records.clone();
    moved_first.swap(0, 1);
    // The extra-info slot claims position 0, the first slot position 1.
    moved_first[0].position = 0;
    moved_first[1].position = 1;
    assert_eq!(tx::reassemble(&moved_first), err);
}

#[test]
fn rx_requests_and_responses_round_trip() {
    let req = NetifRxRequest {
        id: 0xBEEF,
        pad: 0,
        gref: 0xDEAD_0001,
    };
    assert_eq!(rx::decode(&rx::encode(&req)), Ok(req));
    let rsp = NetifRxResponse {
        id: 3,
        offset: 0,
        flags: 5,
        status: 1500,
    };
    assert_eq!(response::decode_rx(&response::encode_rx(&rsp)), Ok(rsp));
    let tx_rsp = NetifTxResponse {
        id: 9,
        status: NETIF_RSP_ERROR,
    };
    assert_eq!(
        response::decode_tx(&response::encode_tx(&tx_rsp)),
        Ok(tx_rsp)
    );
    let mut padded = [0u8; RESPONSE_SIZE];
    padded[..response::TX_RECORD_LEN].copy_from_slice(&response::encode_tx(&tx_rsp));
    assert_eq!(response::decode_tx(&padded), Ok(tx_rsp));
}

#[test]
fn foreign_bytes_are_not_records() {
    let blank = [0u8; REQUEST_SIZE];
    assert_eq!(tx::decode(&blank), Err(NetifRecordError::BadTag("TX slot")));
    assert_eq!(
        rx::decode(&blank),
        Err(NetifRecordError::BadTag("RX request"))
    );
    assert_eq!(
        response::decode_rx(&[0u8; 4]),
        Err(NetifRecordError::Short { got: 4, want: 12 })
    );
    // An RX request record is not a TX slot record, nor a response.
    let req = rx::encode(&NetifRxRequest::default());
    assert!(tx::decode(&req).is_err());
    assert!(response::decode_rx(&req).is_err());
    let mut bad_kind = tx::encode(&tx::TxSlotRecord {
        slot: NetifTxRequest::default(),
        packet: 0,
        position: 0,
        count: 1,
        kind: tx::SlotKind::First,
    });
    bad_kind[24] = 3;
    assert_eq!(tx::decode(&bad_kind), Err(NetifRecordError::BadKind(3)));
}

/// A TX slot record's bytes are the layout of the module's table: the
/// slot verbatim, the tag, the packet's fields little-endian, the kind.
#[test]
fn a_tx_slot_record_is_laid_out_as_documented() {
    let rec = tx::TxSlotRecord {
        slot: NetifTxRequest {
            gref: 0x0102_0304,
            offset: 0x0506,
            flags: 0x0708,
            id: 0x090A,
            size: 0x0B0C,
        },
        packet: 0x1112_1314,
        position: 0x1516,
        count: 0x1718,
        kind: tx::SlotKind::Following,
    };
    let b = tx::encode(&rec);
    assert_eq!(&b[0..12], rec.slot.as_slice());
    assert_eq!(&b[12..16], b"NTXS");
    assert_eq!(b[16..20], 0x1112_1314u32.to_le_bytes());
    assert_eq!(b[20..22], 0x1516u16.to_le_bytes());
    assert_eq!(b[22..24], 0x1718u16.to_le_bytes());
    assert_eq!(b[24], 2);
    assert_eq!(tx::decode(&b), Ok(rec));
}
