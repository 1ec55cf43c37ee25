//! Laying a frame into the RX buffers the frontend posted, as Linux
//! xen-netback's `xenvif_rx_skb` does.
//!
//! Each RX request is one granted page. A frame fills buffers from offset
//! 0, a page each; every buffer but the last carries `NETRXF_more_data`
//! (needs `feature-sg`). The first response carries the checksum flags and,
//! for a GSO frame whose type the frontend negotiated
//! (`feature-gso-tcpv4`/`-tcpv6`), `NETRXF_extra_info`: the GSO extra-info
//! slot then takes the *second* request and is written into its response
//! slot, its buffer unused. Response `i` answers request `i`: a backend that
//! consumes RX requests in order and answers each before taking the next
//! frame's puts every response in the ring slot of its request, which
//! netfront relies on (`xen/io/netif.h`: extra-info responses carry no id).

use std::ops::Range;

use shadowback_ring::grant::GrantRef;
use shadowback_ring::netif::{
    NetifExtraGso, NetifExtraInfo, NetifRxRequest, NetifRxResponse, NETRXF_CSUM_BLANK,
    NETRXF_DATA_VALIDATED, NETRXF_EXTRA_INFO, NETRXF_MORE_DATA, XEN_NETIF_NR_SLOTS_MIN,
};

use super::{Checksum, Gso, GsoType, XEN_PAGE_SIZE};

/// What the frontend negotiated in XenStore.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxFeatures {
    /// `feature-sg`: a frame may span several buffers.
    pub sg: bool,
    /// `feature-gso-tcpv4`.
    pub gso_tcpv4: bool,
    /// `feature-gso-tcpv6`.
    pub gso_tcpv6: bool,
}

impl RxFeatures {
    fn accepts(&self, kind: GsoType) -> bool {
        match kind {
            GsoType::TcpV4 => self.gso_tcpv4,
            GsoType::TcpV6 => self.gso_tcpv6,
        }
    }
}

/// A frame to deliver to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxFrame {
    /// Bytes, Ethernet header included.
    pub len: usize,
    pub checksum: Checksum,
    pub gso: Option<Gso>,
}

/// One copy into a posted buffer: `frame[range]` to offset `offset` of the
/// page granted as `gref`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxCopy {
    /// Which posted request (index into the `posted` slice).
    pub request: usize,
    pub gref: GrantRef,
    pub offset: u16,
    pub range: Range<usize>,
}

/// How a frame is delivered: the copies, then `responses[i]` for
/// `posted[i]`, `i < responses.len()` (the requests consumed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxPlan {
    pub copies: Vec<RxCopy>,
    pub responses: Vec<NetifRxResponse>,
}

/// Why a frame cannot be delivered as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NetifRxError {
    #[error("empty frame")]
    Empty,
    #[error("frame of {len} bytes needs several buffers and the frontend has no feature-sg")]
    NeedsSg { len: usize },
    #[error("frame of {len} bytes needs more than {XEN_NETIF_NR_SLOTS_MIN} buffers")]
    TooLarge { len: usize },
    #[error("GSO frame of a type the frontend did not negotiate: segment it first")]
    GsoNotNegotiated,
    #[error("GSO frame with segment size 0")]
    GsoSizeZero,
    #[error("frame needs {needed} buffers, {posted} posted: wait for more")]
    NotEnoughBuffers { needed: usize, posted: usize },
}

/// The RX requests `frame` consumes (data buffers, plus one for a GSO
/// extra), or why it cannot be delivered. A frame needs at most
/// `XEN_NETIF_NR_SLOTS_MIN` data buffers: netfront rejects more.
pub fn rx_slots_needed(frame: &RxFrame, features: RxFeatures) -> Result<usize, NetifRxError> {
    let page = XEN_PAGE_SIZE as usize;
    if frame.len == 0 {
        return Err(NetifRxError::Empty);
    }
    let data = frame.len.div_ceil(page);
    if data > 1 && !features.sg {
        return Err(NetifRxError::NeedsSg { len: frame.len });
    }
    if data > XEN_NETIF_NR_SLOTS_MIN {
        return Err(NetifRxError::TooLarge { len: frame.len });
    }
    let extra = match frame.gso {
        None => 0,
        Some(g) if g.size == 0 => return Err(NetifRxError::GsoSizeZero),
        Some(g) if !features.accepts(g.kind) => return Err(NetifRxError::GsoNotNegotiated),
        Some(_) => 1,
    };
    Ok(data + extra)
}

/// Lays `frame` into the first buffers of `posted` (RX requests in ring
/// order).
pub fn rx_plan(
    posted: &[NetifRxRequest],
    frame: &RxFrame,
    features: RxFeatures,
) -> Result<RxPlan, NetifRxError> {
    let needed = rx_slots_needed(frame, features)?;
    if posted.len() < needed {
        return Err(NetifRxError::NotEnoughBuffers {
            needed,
            posted: posted.len(),
        });
    }
    let page = XEN_PAGE_SIZE as usize;
    let mut copies = Vec::new();
    let mut responses = Vec::with_capacity(needed);
    let mut done = 0usize;
    for (i, req) in posted.iter().enumerate().take(needed) {
        if i == 1 {
            if let Some(gso) = frame.gso {
                // Extras go after the first data slot.
                let extra = NetifExtraInfo::from_gso(
                    0,
                    &NetifExtraGso {
                        size: gso.size,
                        type_: gso.kind.wire(),
                        pad: 0,
                        features: 0,
                    },
                );
                responses.push(NetifRxResponse::from_extra(&extra));
                continue;
            }
        }
        let len = (frame.len - done).min(page);
        copies.push(RxCopy {
            request: i,
            gref: req.gref,
            offset: 0,
            range: done..done + len,
        });
        done += len;
        let mut flags = 0;
        if done < frame.len {
            flags |= NETRXF_MORE_DATA;
        }
        if i == 0 {
            flags |= match frame.checksum {
                Checksum::Partial => NETRXF_CSUM_BLANK | NETRXF_DATA_VALIDATED,
                Checksum::Validated => NETRXF_DATA_VALIDATED,
                Checksum::Unknown => 0,
            };
            if frame.gso.is_some() {
                flags |= NETRXF_EXTRA_INFO;
            }
        }
        responses.push(NetifRxResponse {
            id: req.id,
            offset: 0,
            flags,
            // At most a page: fits.
            status: i16::try_from(len).unwrap_or(i16::MAX),
        });
    }
    Ok(RxPlan { copies, responses })
}

#[cfg(test)]
mod tests;
