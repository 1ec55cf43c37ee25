//! The block model's shadow-log records (docs/ARCHITECTURE.md §6, §8).
//!
//! The shadow log stores each request's and response's bytes and never
//! interprets them; these codecs are the only code that knows what the
//! block backend puts there, one per transport.

use shadowback_shadow::{REQUEST_SIZE, RESPONSE_SIZE};

/// Xen rings: the log holds `struct blkif_request` and `struct
/// blkif_response` verbatim (host byte order, like the ring itself).
pub mod blkif {
    use super::{REQUEST_SIZE, RESPONSE_SIZE};
    use shadowback_ring::blkif::{BLKIF_OP_INDIRECT, BLKIF_RSP_ERROR};

    /// `id` of a saved `struct blkif_request` (bytes 8..16, the same in the
    /// discard and indirect views).
    pub fn request_id(request: &[u8; REQUEST_SIZE]) -> u64 {
        let mut id = [0u8; 8];
        id.copy_from_slice(&request[8..16]);
        u64::from_ne_bytes(id)
    }

    /// The `operation` a response to a saved request carries: byte 0, or
    /// for `BLKIF_OP_INDIRECT` its `indirect_op` (byte 1), as the normal
    /// path answers an indirect request (docs/PROTOCOL.md §5.3).
    pub fn response_operation(request: &[u8; REQUEST_SIZE]) -> u8 {
        match request[0] {
            BLKIF_OP_INDIRECT => request[1],
            op => op,
        }
    }

    /// A `struct blkif_response` answering `request` with `status`.
    pub fn response(request: &[u8; REQUEST_SIZE], status: i16) -> [u8; RESPONSE_SIZE] {
        let mut rsp = [0u8; RESPONSE_SIZE];
        rsp[0..8].copy_from_slice(&request_id(request).to_ne_bytes());
        rsp[8] = response_operation(request);
        rsp[10..12].copy_from_slice(&status.to_ne_bytes());
        rsp
    }

    /// The `BLKIF_RSP_ERROR` response for a poisoned or corrupt request,
    /// carrying the id found in its saved bytes.
    pub fn error_response(request: &[u8; REQUEST_SIZE]) -> [u8; RESPONSE_SIZE] {
        response(request, BLKIF_RSP_ERROR)
    }

    /// `id` and `status` of a saved `struct blkif_response`.
    pub fn response_id_status(response: &[u8; RESPONSE_SIZE]) -> (u64, i16) {
        let mut id = [0u8; 8];
        id.copy_from_slice(&response[0..8]);
        (
            u64::from_ne_bytes(id),
            i16::from_ne_bytes([response[10], response[11]]),
        )
    }
}

/// Virtqueues: the request record is the head, the 16-bit avail index it
/// was taken at, a `VBLK` tag, the virtqueue index and the request header;
/// the response record is the used element (id, len) and the status.
pub mod virtio_blk {
    /// Marks the shadow-log request bytes as a virtio-blk request.
    const LOG_MAGIC: [u8; 4] = *b"VBLK";

    /// The shadow log's copy of a request: head, avail index, magic, queue
    /// index, then the header.
    pub fn request(head: u16, avail16: u16, index: u16, header: &[u8; 16]) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..2].copy_from_slice(&head.to_le_bytes());
        b[2..4].copy_from_slice(&avail16.to_le_bytes());
        b[4..8].copy_from_slice(&LOG_MAGIC);
        b[8..10].copy_from_slice(&index.to_le_bytes());
        b[16..32].copy_from_slice(header);
        b
    }

    /// `(head, avail16)` of a logged request, if it is one of ours.
    pub fn logged_head(bytes: &[u8]) -> Option<(u16, u16)> {
        if bytes.len() < 8 || bytes[4..8] != LOG_MAGIC {
            return None;
        }
        Some((
            u16::from_le_bytes([bytes[0], bytes[1]]),
            u16::from_le_bytes([bytes[2], bytes[3]]),
        ))
    }

    /// The shadow log's copy of a used element: id, len, status.
    pub fn response(id: u16, len: u32, status: u8) -> [u8; 9] {
        let mut b = [0u8; 9];
        b[0..4].copy_from_slice(&u32::from(id).to_le_bytes());
        b[4..8].copy_from_slice(&len.to_le_bytes());
        b[8] = status;
        b
    }

    /// `(id, len)` of a used element saved by [`response`].
    pub fn saved_used_elem(response: &[u8]) -> (u32, u32) {
        let word = |i: usize| {
            let mut w = [0u8; 4];
            if let Some(b) = response.get(i..i + 4) {
                w.copy_from_slice(b);
            }
            u32::from_le_bytes(w)
        };
        (word(0), word(4))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadowback_ring::blkif::{BLKIF_OP_WRITE, BLKIF_RSP_ERROR};

    #[test]
    fn blkif_error_response_carries_id_and_operation() {
        let mut req = [0u8; REQUEST_SIZE];
        req[0] = BLKIF_OP_WRITE;
        req[8..16].copy_from_slice(&0xdead_beef_u64.to_ne_bytes());
        let rsp = blkif::error_response(&req);
        assert_eq!(blkif::request_id(&req), 0xdead_beef);
        assert_eq!(
            blkif::response_id_status(&rsp),
            (0xdead_beef, BLKIF_RSP_ERROR)
        );
        assert_eq!(rsp[8], BLKIF_OP_WRITE);
        // An indirect request is answered with its inner operation, as the
        // normal path does.
        req[0] = shadowback_ring::blkif::BLKIF_OP_INDIRECT;
        req[1] = BLKIF_OP_WRITE;
        assert_eq!(blkif::error_response(&req)[8], BLKIF_OP_WRITE);
    }

    #[test]
    fn virtio_blk_records_round_trip() {
        let header = crate::virtio::request::OutHdr {
            req_type: 1,
            ioprio: 0,
            sector: 99,
        };
        let b = virtio_blk::request(513, 0xfffe, 2, &header.to_bytes());
        assert_eq!(virtio_blk::logged_head(&b), Some((513, 0xfffe)));
        assert_eq!(virtio_blk::logged_head(&[0u8; 32]), None);
        assert_eq!(
            &virtio_blk::response(7, 513, 1)[..],
            &[7, 0, 0, 0, 1, 2, 0, 0, 1]
        );
        assert_eq!(
            virtio_blk::saved_used_elem(&virtio_blk::response(7, 513, 1)),
            (7, 513)
        );
    }
}
