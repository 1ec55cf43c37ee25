//! The netif model's shadow-log records (docs/ARCHITECTURE.md §6, §11).
//!
//! The shadow log keeps one entry per consumed ring slot — at most
//! [`REQUEST_SIZE`] request bytes and [`RESPONSE_SIZE`] response bytes —
//! and plans recovery from ring indices alone. A TX packet is therefore
//! logged as **one entry per slot**, never packed into one entry: a packet
//! takes up to 1 + extras + 20 slots (≥ 21 × 12 = 252 bytes, more than
//! 112), and every slot gets its own response, so one entry per ring index
//! is what lets the planner match responses to requests. Each TX slot
//! record carries the slot verbatim plus the packet's identity — the ring
//! index of its first slot — and the slot's position and the packet's slot
//! count, so replay can collect a packet's entries ([`tx::reassemble`]) and
//! parse them again with [`crate::netif::parse_tx`], and can answer any
//! single slot on its own ([`tx::error_response`]).
//!
//! Layouts (slot and response bytes verbatim, host byte order like the ring;
//! the other fields little-endian):
//!
//! | record | bytes |
//! |---|---|
//! | TX slot | `0..12` `netif_tx_request`, `12..16` `NTXS`, `16..20` first slot's ring index, `20..22` position, `22..24` slots in packet, `24` kind |
//! | RX request | `0..8` `netif_rx_request`, `8..12` `NRXQ` |
//! | TX response | `0..4` `netif_tx_response`, `4..8` `NTXR` |
//! | RX response | `0..8` `netif_rx_response` (or an extra-info slot), `8..12` `NRXR` |

use shadowback_shadow::{REQUEST_SIZE, RESPONSE_SIZE};

/// Why saved bytes are not a netif record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetifRecordError {
    #[error("record of {got} bytes, {want} expected")]
    Short { got: usize, want: usize },
    #[error("not a {0} record")]
    BadTag(&'static str),
    #[error("TX slot record of unknown kind {0}")]
    BadKind(u8),
    #[error("TX slot records do not make one whole packet")]
    IncompletePacket,
}

fn check(
    bytes: &[u8],
    len: usize,
    tag: &[u8; 4],
    at: usize,
    name: &'static str,
) -> Result<(), NetifRecordError> {
    if bytes.len() < len {
        return Err(NetifRecordError::Short {
            got: bytes.len(),
            want: len,
        });
    }
    if bytes[at..at + 4] != *tag {
        return Err(NetifRecordError::BadTag(name));
    }
    Ok(())
}

/// TX slot records.
pub mod tx {
    use shadowback_ring::netif::{NetifTxRequest, NetifTxResponse, NETIF_RSP_ERROR};
    use vm_memory::ByteValued;

    use super::{check, NetifRecordError, REQUEST_SIZE};
    use crate::netif::tx::slot_response;
    use crate::netif::TxSlots;

    const TAG: [u8; 4] = *b"NTXS";
    /// Bytes of a TX slot record.
    pub const RECORD_LEN: usize = 25;
    const _: () = assert!(RECORD_LEN <= REQUEST_SIZE);

    /// What a slot is in its packet.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum SlotKind {
        First = 0,
        Extra = 1,
        Following = 2,
    }

    /// One logged TX slot.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct TxSlotRecord {
        /// The slot as copied from the ring.
        pub slot: NetifTxRequest,
        /// Ring index of the packet's first slot: the packet's identity.
        pub packet: u32,
        /// Position of this slot in the packet (0 = first slot).
        pub position: u16,
        /// Slots in the packet.
        pub count: u16,
        pub kind: SlotKind,
    }

    /// The records of a packet whose first slot was taken at ring index
    /// `first_index`, one per slot in ring order (slot `i` at index
    /// `first_index + i`).
    pub fn records(
        first_index: u32,
        slots: &TxSlots,
    ) -> impl ExactSizeIterator<Item = TxSlotRecord> + '_ {
        // A packet never takes more than a ring (parse_tx stops there).
        let count = u16::try_from(slots.len()).unwrap_or(u16::MAX);
        slots
            .all()
            .iter()
            .enumerate()
            .map(move |(i, slot)| TxSlotRecord {
                slot: *slot,
                packet: first_index,
                position: u16::try_from(i).unwrap_or(u16::MAX),
                count,
                kind: if i == 0 {
                    SlotKind::First
                } else if slots.is_extra(i) {
                    SlotKind::Extra
                } else {
                    SlotKind::Following
                },
            })
    }

    /// The log bytes of `rec`.
    pub fn encode(rec: &TxSlotRecord) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[0..12].copy_from_slice(rec.slot.as_slice());
        b[12..16].copy_from_slice(&TAG);
        b[16..20].copy_from_slice(&rec.packet.to_le_bytes());
        b[20..22].copy_from_slice(&rec.position.to_le_bytes());
        b[22..24].copy_from_slice(&rec.count.to_le_bytes());
        b[24] = rec.kind as u8;
        b
    }

    /// A TX slot record from log bytes (the log's zero padding after it is
    /// ignored).
    pub fn decode(bytes: &[u8]) -> Result<TxSlotRecord, NetifRecordError> {
        check(bytes, RECORD_LEN, &TAG, 12, "TX slot")?;
        let mut slot = NetifTxRequest::default();
        slot.as_mut_slice().copy_from_slice(&bytes[0..12]);
        let kind = match bytes[24] {
            0 => SlotKind::First,
            1 => SlotKind::Extra,
            2 => SlotKind::Following,
            k => return Err(NetifRecordError::BadKind(k)),
        };
        Ok(TxSlotRecord {
            slot,
            packet: u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]),
            position: u16::from_le_bytes([bytes[20], bytes[21]]),
            count: u16::from_le_bytes([bytes[22], bytes[23]]),
            kind,
        })
    }

    /// The slots of one packet, in ring order, from its records in any
    /// order: all of one packet, every position below its count exactly
    /// once, the first slot at position 0.
    pub fn reassemble(records: &[TxSlotRecord]) -> Result<Vec<NetifTxRequest>, NetifRecordError> {
        let first = records.first().ok_or(NetifRecordError::IncompletePacket)?;
        let count = usize::from(first.count);
        if records.len() != count {
            return Err(NetifRecordError::IncompletePacket);
        }
        let mut out: Vec<Option<NetifTxRequest>> = vec![None; count];
        for r in records {
            let at = usize::from(r.position);
            let first_ok = (at == 0) == (r.kind == SlotKind::First);
            if r.packet != first.packet || usize::from(r.count) != count || !first_ok {
                return Err(NetifRecordError::IncompletePacket);
            }
            match out.get_mut(at) {
                Some(place @ None) => *place = Some(r.slot),
                _ => return Err(NetifRecordError::IncompletePacket),
            }
        }
        out.into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or(NetifRecordError::IncompletePacket)
    }

    /// The answer for a logged slot that is failed on its own (poisoned,
    /// or its packet is incomplete in the log): `XEN_NETIF_RSP_ERROR`, or
    /// `XEN_NETIF_RSP_NULL` for an extra-info slot.
    pub fn error_response(rec: &TxSlotRecord) -> NetifTxResponse {
        slot_response(&rec.slot, rec.kind == SlotKind::Extra, NETIF_RSP_ERROR)
    }
}

/// RX request records.
pub mod rx {
    use shadowback_ring::netif::NetifRxRequest;
    use vm_memory::ByteValued;

    use super::{check, NetifRecordError, REQUEST_SIZE};

    const TAG: [u8; 4] = *b"NRXQ";
    /// Bytes of an RX request record.
    pub const RECORD_LEN: usize = 12;
    const _: () = assert!(RECORD_LEN <= REQUEST_SIZE);

    pub fn encode(req: &NetifRxRequest) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[0..8].copy_from_slice(req.as_slice());
        b[8..12].copy_from_slice(&TAG);
        b
    }

    pub fn decode(bytes: &[u8]) -> Result<NetifRxRequest, NetifRecordError> {
        check(bytes, RECORD_LEN, &TAG, 8, "RX request")?;
        let mut req = NetifRxRequest::default();
        req.as_mut_slice().copy_from_slice(&bytes[0..8]);
        Ok(req)
    }
}

/// Response records of both rings.
pub mod response {
    use shadowback_ring::netif::{NetifRxResponse, NetifTxResponse};
    use vm_memory::ByteValued;

    use super::{check, NetifRecordError, RESPONSE_SIZE};

    const TX_TAG: [u8; 4] = *b"NTXR";
    const RX_TAG: [u8; 4] = *b"NRXR";
    /// Bytes of a TX response record.
    pub const TX_RECORD_LEN: usize = 8;
    /// Bytes of an RX response record.
    pub const RX_RECORD_LEN: usize = 12;
    const _: () = assert!(TX_RECORD_LEN <= RESPONSE_SIZE && RX_RECORD_LEN <= RESPONSE_SIZE);

    pub fn encode_tx(rsp: &NetifTxResponse) -> [u8; TX_RECORD_LEN] {
        let mut b = [0u8; TX_RECORD_LEN];
        b[0..4].copy_from_slice(rsp.as_slice());
        b[4..8].copy_from_slice(&TX_TAG);
        b
    }

    pub fn decode_tx(bytes: &[u8]) -> Result<NetifTxResponse, NetifRecordError> {
        check(bytes, TX_RECORD_LEN, &TX_TAG, 4, "TX response")?;
        let mut rsp = NetifTxResponse::default();
        rsp.as_mut_slice().copy_from_slice(&bytes[0..4]);
        Ok(rsp)
    }

    /// An RX response, or an extra-info slot written as one
    /// ([`NetifRxResponse::from_extra`]).
    pub fn encode_rx(rsp: &NetifRxResponse) -> [u8; RX_RECORD_LEN] {
        let mut b = [0u8; RX_RECORD_LEN];
        b[0..8].copy_from_slice(rsp.as_slice());
        b[8..12].copy_from_slice(&RX_TAG);
        b
    }

    pub fn decode_rx(bytes: &[u8]) -> Result<NetifRxResponse, NetifRecordError> {
        check(bytes, RX_RECORD_LEN, &RX_TAG, 8, "RX response")?;
        let mut rsp = NetifRxResponse::default();
        rsp.as_mut_slice().copy_from_slice(&bytes[0..8]);
        Ok(rsp)
    }
}

#[cfg(test)]
mod tests;
