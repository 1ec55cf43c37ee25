//! The tests' record codec: they drive the log with blkif-shaped records
//! (`struct blkif_request`: operation at byte 0, id at 8..16; `struct
//! blkif_response`: id, operation, status at 10..12; host byte order). The
//! log itself keeps records as bytes and knows no device class; the block
//! backend's own codec is `shadowback_blkback::record`.

use shadowback_ring::blkif::BLKIF_RSP_ERROR;
use shadowback_shadow::{REQUEST_SIZE, RESPONSE_SIZE};

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_ne_bytes(word)
}

pub fn request_id(request: &[u8; REQUEST_SIZE]) -> u64 {
    u64_at(request, 8)
}

/// The response to `request` with `status`: its id and operation echoed.
pub fn response(request: &[u8; REQUEST_SIZE], status: i16) -> [u8; RESPONSE_SIZE] {
    let mut rsp = [0u8; RESPONSE_SIZE];
    rsp[..8].copy_from_slice(&request[8..16]);
    rsp[8] = request[0];
    rsp[10..12].copy_from_slice(&status.to_ne_bytes());
    rsp
}

pub fn error_response(request: &[u8; REQUEST_SIZE]) -> [u8; RESPONSE_SIZE] {
    response(request, BLKIF_RSP_ERROR)
}

pub fn response_id_status(response: &[u8; RESPONSE_SIZE]) -> (u64, i16) {
    (
        u64_at(response, 0),
        i16::from_ne_bytes([response[10], response[11]]),
    )
}
