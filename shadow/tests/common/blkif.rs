//! The tests' record codec: they drive the log with blkif-shaped records
//! (`struct blkif_request` and `struct blkif_response`, host byte order).
//! The log itself keeps records as bytes and knows no device class; the
//! block backend's own codec is `shadowback_blkback::record`.

use shadowback_ring::blkif::BLKIF_RSP_ERROR;
use shadowback_shadow::{REQUEST_SIZE, RESPONSE_SIZE};

/// `id` of a saved `struct blkif_request` (bytes 8..16, the same in the
/// discard and indirect views).
pub fn request_id(request: &[u8; REQUEST_SIZE]) -> u64 {
    let mut id = [0u8; 8];
    id.copy_from_slice(&request[8..16]);
    u64::from_ne_bytes(id)
}

/// `operation` of a saved request (byte 0).
pub fn request_operation(request: &[u8; REQUEST_SIZE]) -> u8 {
    request[0]
}

/// A `struct blkif_response` answering `request` with `status`.
pub fn response(request: &[u8; REQUEST_SIZE], status: i16) -> [u8; RESPONSE_SIZE] {
    let mut rsp = [0u8; RESPONSE_SIZE];
    rsp[0..8].copy_from_slice(&request_id(request).to_ne_bytes());
    rsp[8] = request_operation(request);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_carries_id_and_operation() {
        let mut req = [0u8; REQUEST_SIZE];
        req[0] = shadowback_ring::blkif::BLKIF_OP_WRITE;
        req[8..16].copy_from_slice(&0xdead_beef_u64.to_ne_bytes());
        let rsp = error_response(&req);
        assert_eq!(request_id(&req), 0xdead_beef);
        assert_eq!(response_id_status(&rsp), (0xdead_beef, BLKIF_RSP_ERROR));
        assert_eq!(rsp[8], shadowback_ring::blkif::BLKIF_OP_WRITE);
    }
}
