//! The Xen network frontend (`netfront`): a [`FrameDevice`] over the netif
//! TX and RX rings of `xen/io/netif.h`.
//!
//! [`NetFront::new`] builds everything a vif needs on the guest side — the
//! granted region, both rings, the event channels, the posted RX buffers —
//! and says what to send in `connect` ([`NetFront::connect_request`],
//! [`NetFront::fds`], in the order of `docs/PROTOCOL.md` §4.7), so a test
//! harness acting as the supervisor can hand them to a backend in
//! `attach-net` (§6c) itself. [`NetFront::attach`] does the whole
//! handshake on the supervisor's control socket instead (`probe` →
//! `backend` → `connect` → `connected`), as [`BlkFront`] does for a disk.
//!
//! # Region layout
//!
//! One sealed memfd, in 4 KiB frames ([`NetRegionLayout`]):
//!
//! ```text
//! [0, G)                 grant table (grant-frames = G = 2)
//! G                      TX ring page
//! G+1                    RX ring page
//! [G+2, G+2+256)         TX buffer pages, one per TX request id
//! [G+2+256, G+2+512)     RX buffer pages, one per RX request id
//! ```
//!
//! Every frame after the grant table is granted writable to the backend
//! once, with `gref = FIRST_GREF + (frame - G)` (refs below 8 are left to
//! the toolstack, as in [`BlkFront`]). The RX buffers must be writable (the
//! backend copies frames into them); the TX buffers are granted the same
//! way, which keeps one grant per page for the device's lifetime.
//!
//! # Ids and accounting
//!
//! A TX slot's `id` is the index of its buffer page, taken from a free list;
//! every slot of a packet has its own id and gets its own response. A TX
//! response whose id is out of range or not in flight (never sent, or
//! answered already) is counted in [`NetFrontStats::tx_bad_responses`] and
//! otherwise ignored.
//!
//! An RX request's `id` is the index of the buffer page it posts. netif
//! answers an RX request in the ring slot of the request (Linux netfront
//! relies on it, and shadowback's netback keeps it through recovery), so a
//! response must carry the id of the buffer posted in its slot; anything
//! else is counted in [`NetFrontStats::rx_bad_responses`] and its frame
//! dropped. Either way the buffer posted in that slot is taken back and
//! posted again: consuming a response slot always returns exactly one
//! buffer, so no response, however bogus, can leak or double-post one.
//! Extra-info slots (`NETRXF_extra_info`) carry no id; the buffer of their
//! slot is reposted the same way, as Linux's `xennet_get_extras` does.
//!
//! Every index the backend controls is bounded by the ring size before use;
//! a response producer running past the requests
//! (`RING_RESPONSE_PROD_OVERFLOW`) marks the device broken: every later
//! call fails.
//!
//! [`BlkFront`]: crate::blkfront::BlkFront
#![forbid(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use shadowback_ring::grant::{GrantRef, GrantTable, ENTRIES_PER_FRAME};
use shadowback_ring::netif::{
    NetifRx, NetifRxRequest, NetifRxResponse, NetifTx, NetifTxRequest, NETIF_RSP_OKAY,
    NETRXF_EXTRA_INFO, NETRXF_MORE_DATA, NETTXF_MORE_DATA, NET_RX_RING_SIZE, NET_TX_RING_SIZE,
    XEN_NETIF_EXTRA_FLAG_MORE, XEN_NETIF_EXTRA_TYPE_MAX, XEN_NETIF_EXTRA_TYPE_NONE,
    XEN_NETIF_MAX_TX_SIZE, XEN_NETIF_NR_SLOTS_MIN,
};
use shadowback_ring::sring::{FrontRing, RingPages};
use shadowback_ring::{EventChannel, RingError, SharedRegion, PAGE_SIZE};
use shadowback_xenbus::netif::{
    MacAddr, NetBackendInfo, NetConnectRequest, NetFeatures, MAX_MTU, MIN_MTU,
};
use shadowback_xenbus::{expect_no_fds, kind, Message, SeqPacket, XenbusError};
use thiserror::Error;

use crate::net::{FrameDevice, FrameError, ETHERNET_HEADER_LEN};

/// First grant reference the frontend hands out (Xen reserves 0..8,
/// `GNTTAB_NR_RESERVED_ENTRIES`).
pub const FIRST_GREF: GrantRef = 8;

/// TX buffer pages: one per TX request id, as many as the TX ring holds.
pub const TX_BUFFERS: u32 = NET_TX_RING_SIZE;
/// RX buffer pages: one per RX request id, as many as the RX ring holds.
pub const RX_BUFFERS: u32 = NET_RX_RING_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;
/// Extra-info slots one RX frame may carry: one of each defined type.
const MAX_RX_EXTRAS: u32 = XEN_NETIF_EXTRA_TYPE_MAX as u32 - 1;
/// How long `attach` and `detach` wait for each supervisor reply.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// With split event channels TX completions wake the TX channel, which the
/// stack does not poll: how soon to look again when TX is blocked on them.
const TX_BLOCKED_POLL: Duration = Duration::from_millis(1);

/// What setting up or running a [`NetFront`] can fail with.
#[derive(Debug, Error)]
pub enum NetFrontError {
    /// The configuration cannot be served.
    #[error("invalid netfront configuration: {0}")]
    Config(String),
    /// Shared memory, a ring or an event channel failed; a ring error after
    /// connect (a response producer past the requests) means a broken or
    /// hostile backend.
    #[error("shared ring failure")]
    Ring(#[from] RingError),
    /// The control socket failed.
    #[error("control socket: {what}")]
    Control {
        what: String,
        #[source]
        source: XenbusError,
    },
    /// The supervisor answered `error`.
    #[error("supervisor refused {what}: {message} ({code})")]
    Refused {
        what: String,
        message: String,
        code: String,
    },
    /// No reply in time.
    #[error("no reply to {0} within {CONTROL_TIMEOUT:?}")]
    Timeout(String),
    /// The supervisor changed the link between `backend` and `connected`.
    #[error("the backend's {key} changed from {before} to {after} at connect")]
    Renegotiated {
        key: &'static str,
        before: String,
        after: String,
    },
    /// An earlier ring failure made the device unusable.
    #[error("the netfront is broken by an earlier ring failure")]
    Broken,
}

impl From<NetFrontError> for FrameError {
    fn from(err: NetFrontError) -> Self {
        match err {
            NetFrontError::Control {
                source: XenbusError::Closed,
                ..
            } => FrameError::Disconnected,
            NetFrontError::Ring(RingError::Event(io)) => FrameError::Io(io),
            other => FrameError::Io(io::Error::other(other)),
        }
    }
}

/// How to set up a netfront.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetFrontConfig {
    /// Device name (`vif0`).
    pub device: String,
    /// Our domain id (`frontend-id`).
    pub frontend_id: u16,
    /// The domain the region is granted to (`backend-id`). [`NetFront::attach`]
    /// takes it from the backend's keys.
    pub backend_id: u16,
    /// The vif's MAC. [`NetFront::attach`] takes it from the backend's keys.
    pub mac: MacAddr,
    /// Link MTU (IP packet size). Above 4082 bytes a frame spans several
    /// TX slots, which needs `sg`. [`NetFront::attach`] takes it from the
    /// backend's keys.
    pub mtu: u16,
    /// Use `feature-sg` (frames of several slots). [`NetFront::attach`]
    /// uses it only when the backend offers it.
    pub sg: bool,
    /// One event channel for TX and one for RX instead of one for both.
    pub split_event_channels: bool,
    /// RX buffers to keep posted: 1 to [`RX_BUFFERS`].
    pub rx_buffers: u32,
}

impl NetFrontConfig {
    /// Defaults for `device`: frontend 1, backend 0, MAC 02:00:00:00:00:01,
    /// MTU 1500, scatter-gather, one event channel, every RX buffer posted.
    pub fn new(device: impl Into<String>) -> Self {
        NetFrontConfig {
            device: device.into(),
            frontend_id: 1,
            backend_id: 0,
            mac: MacAddr([2, 0, 0, 0, 0, 1]),
            mtu: 1500,
            sg: true,
            split_event_channels: false,
            rx_buffers: RX_BUFFERS,
        }
    }

    /// Largest frame: the MTU plus the Ethernet header.
    fn max_frame(&self) -> usize {
        usize::from(self.mtu) + ETHERNET_HEADER_LEN
    }

    fn validate(&self) -> Result<(), NetFrontError> {
        let bad = |why: String| Err(NetFrontError::Config(why));
        if !self.mac.is_unicast() {
            return bad(format!("MAC {} is not unicast", self.mac));
        }
        if !(MIN_MTU..=MAX_MTU).contains(&self.mtu) {
            return bad(format!("MTU {} is outside {MIN_MTU}..={MAX_MTU}", self.mtu));
        }
        if self.max_frame() > XEN_NETIF_MAX_TX_SIZE as usize {
            return bad(format!("MTU {} does not fit a TX packet", self.mtu));
        }
        if !self.sg && self.max_frame() > PAGE_SIZE {
            return bad(format!(
                "MTU {} needs frames of several slots, which needs feature-sg",
                self.mtu
            ));
        }
        if self.rx_buffers == 0 || self.rx_buffers > RX_BUFFERS {
            return bad(format!(
                "{} RX buffers is not within 1..={RX_BUFFERS}",
                self.rx_buffers
            ));
        }
        Ok(())
    }
}

/// Where everything lives in the granted region, in 4 KiB frames. See the
/// module docs for the picture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetRegionLayout {
    /// Grant-table frames at the start of the region (`grant-frames`).
    pub grant_frames: u32,
}

impl Default for NetRegionLayout {
    fn default() -> Self {
        Self::new()
    }
}

impl NetRegionLayout {
    /// Frames granted to the backend: two rings and the buffers.
    pub const GRANTED_PAGES: u32 = 2 + TX_BUFFERS + RX_BUFFERS;

    /// The one layout: every ring page and buffer page granted once.
    pub const fn new() -> Self {
        NetRegionLayout {
            grant_frames: (FIRST_GREF + Self::GRANTED_PAGES).div_ceil(ENTRIES_PER_FRAME),
        }
    }

    /// Frames in the region.
    pub fn total_pages(&self) -> u32 {
        self.grant_frames + Self::GRANTED_PAGES
    }

    /// The TX ring page.
    pub fn tx_ring_frame(&self) -> u32 {
        self.grant_frames
    }

    /// The RX ring page.
    pub fn rx_ring_frame(&self) -> u32 {
        self.grant_frames + 1
    }

    /// The page of TX request id `id`.
    pub fn tx_buffer_frame(&self, id: u16) -> Option<u32> {
        (u32::from(id) < TX_BUFFERS).then(|| self.grant_frames + 2 + u32::from(id))
    }

    /// The page of RX request id `id`.
    pub fn rx_buffer_frame(&self, id: u16) -> Option<u32> {
        (u32::from(id) < RX_BUFFERS).then(|| self.grant_frames + 2 + TX_BUFFERS + u32::from(id))
    }

    /// The grant reference of a granted frame.
    pub fn gref_of_frame(&self, frame: u32) -> Option<GrantRef> {
        (frame >= self.grant_frames && frame < self.total_pages())
            .then(|| frame - self.grant_frames + FIRST_GREF)
    }
}

/// What the frontend has seen, per device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetFrontStats {
    /// Frames put on the TX ring.
    pub tx_packets: u64,
    /// TX slots answered with a status other than `NETIF_RSP_OKAY`.
    pub tx_errors: u64,
    /// TX responses naming an id out of range or not in flight (never sent,
    /// or answered already): protocol violations of the backend.
    pub tx_bad_responses: u64,
    /// Frames dropped by `send` because the TX ring had no room.
    pub tx_dropped: u64,
    /// Frames received whole and handed to the stack.
    pub rx_packets: u64,
    /// Frames dropped for an error status, a slot outside its page, an
    /// invalid extra-info slot, too many slots or more than the MTU.
    pub rx_errors: u64,
    /// RX responses whose id is not the buffer posted in their slot; their
    /// frame is dropped.
    pub rx_bad_responses: u64,
    /// TX slots on the ring without a response yet.
    pub tx_in_flight: u32,
    /// RX buffers posted and not yet answered.
    pub rx_posted: u32,
}

/// One event channel: `kick` frontend → backend, `notify` backend →
/// frontend.
#[derive(Debug)]
struct Channel {
    kick: EventChannel,
    notify: EventChannel,
}

impl Channel {
    fn new() -> Result<Self, NetFrontError> {
        Ok(Channel {
            kick: EventChannel::new()?,
            notify: EventChannel::new()?,
        })
    }
}

/// The RX frame being assembled from response slots; it survives between
/// `recv` calls when the backend has not published all of its slots yet.
#[derive(Debug, Default)]
struct RxFrame {
    data: Vec<u8>,
    /// Data slots taken so far.
    slots: u32,
    /// Extra-info slots still to skip before the next data slot.
    extras_pending: bool,
    extras: u32,
    /// The last data slot had `NETRXF_more_data`.
    more_data: bool,
    /// Something was wrong: consume the rest of the frame, deliver nothing.
    dropped: bool,
}

/// What one RX response slot did to the frame being assembled.
enum RxStep {
    /// The frame needs more slots.
    Continue,
    /// The frame is complete (delivered or dropped).
    Done,
}

/// A Xen network frontend. See the module docs.
#[derive(Debug)]
pub struct NetFront {
    /// The device connection when attached through the supervisor: closing
    /// it detaches.
    control: Option<SeqPacket>,
    cfg: NetFrontConfig,
    region: Arc<SharedRegion>,
    /// Kept for the device's lifetime: every grant stays made.
    _grants: GrantTable,
    layout: NetRegionLayout,
    tx_ring: FrontRing<NetifTx>,
    rx_ring: FrontRing<NetifRx>,
    tx_channel: Channel,
    /// The RX ring's own channel with split event channels.
    rx_channel: Option<Channel>,
    /// `tx_in_flight[id]`: TX slot `id` has a request without a response.
    tx_in_flight: Vec<bool>,
    tx_free: Vec<u16>,
    /// `rx_slot[i]`: the buffer id posted in RX ring slot `i` (ring index
    /// modulo the ring size), until its response is consumed.
    rx_slot: Vec<Option<u16>>,
    /// Buffers to post again.
    rx_free: Vec<u16>,
    /// Our copy of the RX ring's `rsp_cons`: the slot of the next response.
    rx_rsp_cons: u32,
    rx_frame: RxFrame,
    /// TX slots a frame of `mtu + 14` bytes needs.
    max_frame_slots: u32,
    broken: bool,
    stats: NetFrontStats,
}

impl NetFront {
    /// Sets up the region, rings, event channels and RX buffers for `cfg`,
    /// without talking to anyone: hand [`connect_request`](Self::connect_request)
    /// and [`fds`](Self::fds) to a backend.
    pub fn new(cfg: NetFrontConfig) -> Result<Self, NetFrontError> {
        cfg.validate()?;
        let layout = NetRegionLayout::new();
        let region = Arc::new(SharedRegion::create(
            &format!("netfront-{}", cfg.device),
            layout.total_pages(),
        )?);
        let grants = GrantTable::new(region.clone(), layout.grant_frames)?;
        for frame in layout.grant_frames..layout.total_pages() {
            let gref = layout.gref_of_frame(frame).ok_or_else(|| {
                NetFrontError::Config(format!("frame {frame} has no grant reference"))
            })?;
            grants.grant(gref, cfg.backend_id, frame, false)?;
        }
        // SHARED_RING_INIT + FRONT_RING_INIT on each ring.
        let tx_ring = FrontRing::<NetifTx>::init(RingPages::contiguous(
            region.clone(),
            layout.tx_ring_frame(),
            1,
        )?)?;
        let rx_ring = FrontRing::<NetifRx>::init(RingPages::contiguous(
            region.clone(),
            layout.rx_ring_frame(),
            1,
        )?)?;
        let tx_channel = Channel::new()?;
        let rx_channel = if cfg.split_event_channels {
            Some(Channel::new()?)
        } else {
            None
        };
        let max_frame_slots = u32::try_from(cfg.max_frame().div_ceil(PAGE_SIZE))
            .map_err(|_| NetFrontError::Config(format!("MTU {} is too large", cfg.mtu)))?;
        // Ids are u16 on the wire; both pools are 256 entries.
        let tx_free = (0..TX_BUFFERS as u16).rev().collect();
        // rx_buffers <= RX_BUFFERS (validated).
        let rx_free = (0..cfg.rx_buffers as u16).rev().collect();
        let mut front = NetFront {
            control: None,
            region,
            _grants: grants,
            layout,
            tx_ring,
            rx_ring,
            tx_channel,
            rx_channel,
            tx_in_flight: vec![false; TX_BUFFERS as usize],
            tx_free,
            rx_slot: vec![None; RX_BUFFERS as usize],
            rx_free,
            rx_rsp_cons: 0,
            rx_frame: RxFrame::default(),
            max_frame_slots,
            broken: false,
            stats: NetFrontStats::default(),
            cfg,
        };
        front.refill_rx()?;
        tracing::debug!(
            device = %front.cfg.device,
            mtu = front.cfg.mtu,
            sg = front.cfg.sg,
            split = front.cfg.split_event_channels,
            rx_posted = front.stats.rx_posted,
            "netfront set up"
        );
        Ok(front)
    }

    /// Probes `cfg.device` on the supervisor's control socket at `socket`,
    /// sets up the frontend with the backend's `backend-id`, MAC, MTU and
    /// `feature-sg`, and connects. The socket stays open as the device
    /// connection; dropping the frontend detaches.
    pub fn attach(socket: &Path, cfg: &NetFrontConfig) -> Result<Self, NetFrontError> {
        let control = SeqPacket::connect(socket)
            .map_err(|e| control_err("connecting to the supervisor", e))?;
        control
            .send(&Message::probe(&cfg.device), &[])
            .map_err(|e| control_err("sending probe", e))?;
        let reply = recv_reply(&control, kind::BACKEND, "probe")?;
        let backend = NetBackendInfo::from_message(&reply)
            .map_err(|e| control_err("parsing the backend keys", e))?;
        let mut front = NetFront::new(NetFrontConfig {
            backend_id: backend.backend_id,
            mac: backend.mac,
            mtu: backend.mtu,
            sg: cfg.sg && backend.features.sg,
            ..cfg.clone()
        })?;
        let fds = front.borrowed_fds();
        control
            .send(&front.connect_request().to_message(), &fds)
            .map_err(|e| control_err("sending connect", e))?;
        let reply = recv_reply(&control, kind::CONNECTED, "connect")?;
        let connected = NetBackendInfo::from_message(&reply)
            .map_err(|e| control_err("parsing the connected keys", e))?;
        // The region and the stack were sized for the probed link.
        if connected.mtu != backend.mtu {
            return Err(NetFrontError::Renegotiated {
                key: "mtu",
                before: backend.mtu.to_string(),
                after: connected.mtu.to_string(),
            });
        }
        if connected.mac != backend.mac {
            return Err(NetFrontError::Renegotiated {
                key: "mac",
                before: backend.mac.to_string(),
                after: connected.mac.to_string(),
            });
        }
        tracing::info!(
            device = %front.cfg.device,
            backend_id = backend.backend_id,
            mac = %backend.mac,
            mtu = backend.mtu,
            sg = front.cfg.sg,
            "netfront connected"
        );
        front.control = Some(control);
        Ok(front)
    }

    /// Detaches cleanly when attached through the supervisor: `close`, then
    /// waits for `closed`. Without a control socket this just drops.
    pub fn detach(self) -> Result<(), NetFrontError> {
        let Some(control) = &self.control else {
            return Ok(());
        };
        control
            .send(&Message::new(kind::CLOSE), &[])
            .map_err(|e| control_err("sending close", e))?;
        recv_reply(control, kind::CLOSED, "close").map(drop)
    }

    /// The keys of `connect` for this frontend (and of `attach-net`, with
    /// the supervisor's additions).
    pub fn connect_request(&self) -> NetConnectRequest {
        let tx_ring_ref = self.layout.gref_of_frame(self.layout.tx_ring_frame());
        let rx_ring_ref = self.layout.gref_of_frame(self.layout.rx_ring_frame());
        NetConnectRequest {
            device: self.cfg.device.clone(),
            frontend_id: self.cfg.frontend_id,
            grant_frames: self.layout.grant_frames,
            // Both frames are granted by construction of the layout.
            tx_ring_ref: tx_ring_ref.unwrap_or(FIRST_GREF),
            rx_ring_ref: rx_ring_ref.unwrap_or(FIRST_GREF + 1),
            features: NetFeatures {
                sg: self.cfg.sg,
                ..NetFeatures::default()
            },
            // smoltcp verifies every checksum and cannot complete a blank one.
            no_csum_offload: true,
            split_event_channels: self.cfg.split_event_channels,
            multicast_control: false,
        }
    }

    /// Duplicates of the descriptors of `connect`, in wire order: region,
    /// TX kick, TX notify, and with split event channels RX kick, RX notify.
    pub fn fds(&self) -> Result<Vec<OwnedFd>, NetFrontError> {
        self.borrowed_fds()
            .into_iter()
            .map(|fd| fd.try_clone_to_owned().map_err(RingError::Event))
            .collect::<Result<_, _>>()
            .map_err(NetFrontError::from)
    }

    fn borrowed_fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = vec![
            self.region.file().as_fd(),
            self.tx_channel.kick.as_fd(),
            self.tx_channel.notify.as_fd(),
        ];
        if let Some(rx) = &self.rx_channel {
            fds.extend([rx.kick.as_fd(), rx.notify.as_fd()]);
        }
        fds
    }

    /// The configuration in use (after `attach`, with the backend's keys).
    pub fn config(&self) -> &NetFrontConfig {
        &self.cfg
    }

    /// Where everything lives in the granted region.
    pub fn layout(&self) -> &NetRegionLayout {
        &self.layout
    }

    /// Counters, and what is on the rings right now.
    pub fn stats(&self) -> NetFrontStats {
        self.stats
    }

    /// The TX ring has room for a frame of the MTU (after reclaiming what
    /// the backend answered).
    fn tx_room(&self) -> bool {
        let free = (self.tx_free.len() as u32).min(self.tx_ring.free_requests());
        free >= self.max_frame_slots
    }

    fn rx_kick(&self) -> &EventChannel {
        self.rx_channel
            .as_ref()
            .map_or(&self.tx_channel.kick, |c| &c.kick)
    }

    fn rx_notify(&self) -> &EventChannel {
        self.rx_channel
            .as_ref()
            .map_or(&self.tx_channel.notify, |c| &c.notify)
    }

    fn check_broken(&self) -> Result<(), NetFrontError> {
        if self.broken {
            Err(NetFrontError::Broken)
        } else {
            Ok(())
        }
    }

    /// Marks the device broken on a ring failure: after a response
    /// producer overflow nothing on the ring can be trusted.
    fn fail<T>(&mut self, err: NetFrontError) -> Result<T, NetFrontError> {
        if matches!(err, NetFrontError::Ring(_)) {
            tracing::error!(device = %self.cfg.device, error = %err, "netfront ring failure; device broken");
            self.broken = true;
        }
        Err(err)
    }

    /// Takes every TX response, then re-arms `rsp_event`.
    fn reclaim_tx(&mut self) -> Result<(), NetFrontError> {
        loop {
            while let Some(rsp) = self.tx_ring.take_response()? {
                let slot = usize::from(rsp.id);
                if self.tx_in_flight.get(slot) != Some(&true) {
                    self.stats.tx_bad_responses += 1;
                    tracing::warn!(
                        device = %self.cfg.device,
                        id = rsp.id,
                        status = rsp.status,
                        "TX response for an id not in flight"
                    );
                    continue;
                }
                self.tx_in_flight[slot] = false;
                self.tx_free.push(rsp.id);
                self.stats.tx_in_flight -= 1;
                if rsp.status != NETIF_RSP_OKAY {
                    self.stats.tx_errors += 1;
                }
            }
            // RING_FINAL_CHECK_FOR_RESPONSES, as xennet_tx_buf_gc: ask to be
            // notified of the next response, then re-check.
            if !self.tx_ring.final_check_for_responses()? {
                return Ok(());
            }
        }
    }

    fn send_frame(&mut self, frame: &[u8]) -> Result<(), FrameError> {
        let max = self.cfg.max_frame();
        if frame.len() > max {
            return Err(FrameError::TooLong {
                len: frame.len(),
                max,
            });
        }
        self.check_broken()?;
        if let Err(e) = self.reclaim_tx() {
            return Ok(self.fail(e)?);
        }
        let slots = frame.len().div_ceil(PAGE_SIZE).max(1);
        let free = self
            .tx_free
            .len()
            .min(self.tx_ring.free_requests() as usize);
        if slots > free {
            // A full NIC queue drops; TCP sends again.
            self.stats.tx_dropped += 1;
            return Ok(());
        }
        if let Err(e) = self.put_tx(frame) {
            return Ok(self.fail(e)?);
        }
        self.stats.tx_packets += 1;
        // RING_PUSH_REQUESTS_AND_CHECK_NOTIFY.
        match self.tx_ring.push_requests() {
            Ok(true) => self.tx_channel.kick.notify().map_err(NetFrontError::from)?,
            Ok(false) => {}
            Err(e) => return Ok(self.fail(e.into())?),
        }
        Ok(())
    }

    /// Copies `frame` into TX buffer pages, one slot per page; the first
    /// slot's `size` is the whole frame (netif.h), the others their own.
    /// The caller checked there is room for every slot.
    fn put_tx(&mut self, frame: &[u8]) -> Result<(), NetFrontError> {
        let total = u16::try_from(frame.len())
            .map_err(|_| NetFrontError::Config(format!("frame of {} bytes", frame.len())))?;
        let mut chunks = frame.chunks(PAGE_SIZE).peekable();
        let mut first = true;
        // A zero-length frame still takes one slot.
        let empty: &[u8] = &[];
        if chunks.peek().is_none() {
            return self.put_tx_slot(empty, total, 0);
        }
        while let Some(chunk) = chunks.next() {
            let flags = if chunks.peek().is_some() {
                NETTXF_MORE_DATA
            } else {
                0
            };
            // chunk.len() <= PAGE_SIZE.
            let size = if first { total } else { chunk.len() as u16 };
            first = false;
            self.put_tx_slot(chunk, size, flags)?;
        }
        Ok(())
    }

    fn put_tx_slot(&mut self, data: &[u8], size: u16, flags: u16) -> Result<(), NetFrontError> {
        let id = self.tx_free.pop().ok_or(RingError::RingFull)?;
        let frame = self.layout.tx_buffer_frame(id);
        let gref = frame.and_then(|f| self.layout.gref_of_frame(f));
        let (Some(frame), Some(gref)) = (frame, gref) else {
            self.tx_free.push(id);
            return Err(NetFrontError::Config(format!("TX id {id} has no buffer")));
        };
        let request = NetifTxRequest {
            gref,
            offset: 0,
            flags,
            id,
            size,
        };
        let put = self
            .region
            .write(u64::from(frame) * PAGE, data)
            .and_then(|()| self.tx_ring.put_request(&request));
        if let Err(e) = put {
            self.tx_free.push(id);
            return Err(e.into());
        }
        self.tx_in_flight[usize::from(id)] = true;
        self.stats.tx_in_flight += 1;
        Ok(())
    }

    /// Posts every free RX buffer the ring has room for, and kicks the
    /// backend if it asked (`RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`, as
    /// `xennet_alloc_rx_buffers`).
    fn refill_rx(&mut self) -> Result<(), NetFrontError> {
        let mut posted = false;
        while self.rx_ring.free_requests() > 0 {
            let Some(id) = self.rx_free.pop() else { break };
            let gref = self
                .layout
                .rx_buffer_frame(id)
                .and_then(|f| self.layout.gref_of_frame(f))
                .ok_or_else(|| NetFrontError::Config(format!("RX id {id} has no buffer")))?;
            let idx = match self
                .rx_ring
                .put_request(&NetifRxRequest { id, pad: 0, gref })
            {
                Ok(idx) => idx,
                Err(e) => {
                    self.rx_free.push(id);
                    return Err(e.into());
                }
            };
            let slot = self.rx_slot_index(idx);
            if let Some(stale) = self.rx_slot[slot].replace(id) {
                // Cannot happen: the ring had room, so that slot's response
                // was consumed. Keep the buffer rather than lose it.
                self.rx_free.push(stale);
            } else {
                self.stats.rx_posted += 1;
            }
            posted = true;
        }
        if posted && self.rx_ring.push_requests()? {
            self.rx_kick().notify()?;
        }
        Ok(())
    }

    fn rx_slot_index(&self, ring_index: u32) -> usize {
        (ring_index & (RX_BUFFERS - 1)) as usize
    }

    /// Takes the buffer posted in the slot of the next response back.
    fn take_rx_slot(&mut self) -> Option<u16> {
        let slot = self.rx_slot_index(self.rx_rsp_cons);
        self.rx_rsp_cons = self.rx_rsp_cons.wrapping_add(1);
        let id = self.rx_slot[slot].take()?;
        self.stats.rx_posted -= 1;
        self.rx_free.push(id);
        Some(id)
    }

    /// Consumes RX responses until a frame is complete and good (returned
    /// in `buf`) or none is left.
    fn recv_frame(&mut self, buf: &mut Vec<u8>) -> Result<bool, NetFrontError> {
        self.check_broken()?;
        // Drain before looking at the ring: a notification sent after the
        // look is then still pending for the next wait.
        self.rx_notify().drain()?;
        if let Some(tx_notify) = self.rx_channel.as_ref().map(|_| &self.tx_channel.notify) {
            // Split channels: nobody waits on the TX one; keep it drained.
            tx_notify.drain()?;
        }
        self.reclaim_tx()?;
        let got = self.take_rx_frames(buf);
        let refilled = self.refill_rx();
        let got = got?;
        refilled?;
        Ok(got)
    }

    fn take_rx_frames(&mut self, buf: &mut Vec<u8>) -> Result<bool, NetFrontError> {
        loop {
            while let Some(rsp) = self.rx_ring.take_response()? {
                if let RxStep::Done = self.rx_step(&rsp)? {
                    let frame = std::mem::take(&mut self.rx_frame);
                    if !frame.dropped {
                        self.stats.rx_packets += 1;
                        *buf = frame.data;
                        return Ok(true);
                    }
                }
            }
            // RING_FINAL_CHECK_FOR_RESPONSES before telling the stack there
            // is nothing: re-arm rsp_event, then re-check.
            if !self.rx_ring.final_check_for_responses()? {
                return Ok(false);
            }
        }
    }

    /// Applies one RX response slot to the frame being assembled.
    fn rx_step(&mut self, rsp: &NetifRxResponse) -> Result<RxStep, NetFrontError> {
        let posted = self.take_rx_slot();
        if self.rx_frame.extras_pending {
            // An extra-info slot: no id, no data; its slot's buffer was
            // only used to carry it (xennet_get_extras).
            let extra = rsp.as_extra();
            self.rx_frame.extras = self.rx_frame.extras.saturating_add(1);
            if extra.type_ == XEN_NETIF_EXTRA_TYPE_NONE
                || extra.type_ >= XEN_NETIF_EXTRA_TYPE_MAX
                || self.rx_frame.extras > MAX_RX_EXTRAS
            {
                self.drop_rx_frame("invalid or too many extra-info slots");
            }
            self.rx_frame.extras_pending = extra.flags & XEN_NETIF_EXTRA_FLAG_MORE != 0;
            return Ok(self.rx_frame_step());
        }
        self.rx_frame.slots = self.rx_frame.slots.saturating_add(1);
        self.rx_frame.more_data = rsp.flags & NETRXF_MORE_DATA != 0;
        self.rx_frame.extras_pending = rsp.flags & NETRXF_EXTRA_INFO != 0;
        if posted != Some(rsp.id) {
            if !self.rx_frame.dropped {
                self.stats.rx_bad_responses += 1;
                self.rx_frame.dropped = true;
            }
            tracing::warn!(
                device = %self.cfg.device,
                id = rsp.id,
                posted = ?posted,
                "RX response for a buffer not posted in its slot"
            );
            return Ok(self.rx_frame_step());
        }
        if self.rx_frame.slots > XEN_NETIF_NR_SLOTS_MIN as u32 {
            self.drop_rx_frame("more slots than a frame may have");
        }
        if rsp.status < 0 {
            self.drop_rx_frame("error status");
            return Ok(self.rx_frame_step());
        }
        // status >= 0 is the slot's byte count.
        let size = rsp.status as u16 as usize;
        let offset = usize::from(rsp.offset);
        if offset + size > PAGE_SIZE {
            self.drop_rx_frame("slot data crosses its page");
            return Ok(self.rx_frame_step());
        }
        if self.rx_frame.data.len() + size > self.cfg.max_frame() {
            self.drop_rx_frame("frame longer than the MTU");
            return Ok(self.rx_frame_step());
        }
        if !self.rx_frame.dropped {
            // posted == Some(rsp.id), a buffer id < RX_BUFFERS.
            let frame = self
                .layout
                .rx_buffer_frame(rsp.id)
                .ok_or_else(|| NetFrontError::Config(format!("RX id {} has no buffer", rsp.id)))?;
            let start = self.rx_frame.data.len();
            self.rx_frame.data.resize(start + size, 0);
            self.region.read(
                u64::from(frame) * PAGE + offset as u64,
                &mut self.rx_frame.data[start..],
            )?;
        }
        Ok(self.rx_frame_step())
    }

    /// Whether the frame is complete after the slot just applied.
    fn rx_frame_step(&self) -> RxStep {
        if self.rx_frame.extras_pending || self.rx_frame.more_data {
            RxStep::Continue
        } else {
            RxStep::Done
        }
    }

    fn drop_rx_frame(&mut self, why: &'static str) {
        if !self.rx_frame.dropped {
            self.rx_frame.dropped = true;
            self.stats.rx_errors += 1;
            tracing::debug!(device = %self.cfg.device, why, "RX frame dropped");
        }
        self.rx_frame.data.clear();
    }
}

impl FrameDevice for NetFront {
    fn send(&mut self, frame: &[u8]) -> Result<(), FrameError> {
        self.send_frame(frame)
    }

    fn can_send(&mut self) -> bool {
        if self.broken {
            // Let `send` report the failure.
            return true;
        }
        if let Err(e) = self.reclaim_tx() {
            let _ = self.fail::<()>(e);
            return true;
        }
        self.tx_room()
    }

    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<bool, FrameError> {
        match self.recv_frame(buf) {
            Ok(got) => Ok(got),
            Err(e) => Ok(self.fail(e)?),
        }
    }

    fn wait_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.rx_notify().as_fd())
    }

    fn poll_again_in(&self) -> Option<Duration> {
        if self.broken {
            return None;
        }
        // Responses already published (recv returned a frame and left the
        // rest, whose notification it drained): look again at once.
        let rx_pending = self.rx_ring.unconsumed_responses().map_or(true, |n| n > 0);
        let tx_pending = self.tx_ring.unconsumed_responses().map_or(true, |n| n > 0);
        if rx_pending || (tx_pending && !self.tx_room()) {
            return Some(Duration::ZERO);
        }
        // With split channels TX completions wake an fd the stack does not
        // wait on.
        if self.cfg.split_event_channels && !self.tx_room() {
            return Some(TX_BLOCKED_POLL);
        }
        None
    }

    fn mac(&self) -> [u8; 6] {
        self.cfg.mac.0
    }

    fn mtu(&self) -> usize {
        usize::from(self.cfg.mtu)
    }
}

/// Receives the reply to `what`: `expected`, or an `error` turned into
/// [`NetFrontError::Refused`].
fn recv_reply(
    control: &SeqPacket,
    expected: &'static str,
    what: &str,
) -> Result<Message, NetFrontError> {
    let (msg, fds) = control
        .recv_timeout(CONTROL_TIMEOUT)
        .map_err(|e| control_err(what, e))?
        .ok_or_else(|| NetFrontError::Timeout(what.to_owned()))?;
    expect_no_fds(&msg, fds).map_err(|e| control_err(what, e))?;
    if msg.kind() == kind::ERROR {
        return Err(NetFrontError::Refused {
            what: what.to_owned(),
            message: msg
                .get(shadowback_xenbus::key::MESSAGE)
                .unwrap_or("no message")
                .to_owned(),
            code: msg
                .get(shadowback_xenbus::key::CODE)
                .unwrap_or("no code")
                .to_owned(),
        });
    }
    msg.expect_kind(expected)
        .map_err(|e| control_err(what, e))?;
    Ok(msg)
}

fn control_err(what: &str, source: XenbusError) -> NetFrontError {
    NetFrontError::Control {
        what: what.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_the_region() {
        let l = NetRegionLayout::new();
        // 8 reserved + 2 rings + 512 buffers = 522 entries: two frames.
        assert_eq!(l.grant_frames, 2);
        assert_eq!(l.total_pages(), 2 + 2 + 256 + 256);
        assert_eq!(l.tx_ring_frame(), 2);
        assert_eq!(l.rx_ring_frame(), 3);
        assert_eq!(l.tx_buffer_frame(0), Some(4));
        assert_eq!(l.tx_buffer_frame(255), Some(259));
        assert_eq!(l.tx_buffer_frame(256), None);
        assert_eq!(l.rx_buffer_frame(0), Some(260));
        assert_eq!(l.rx_buffer_frame(255), Some(l.total_pages() - 1));
        assert_eq!(l.rx_buffer_frame(256), None);
        assert_eq!(l.gref_of_frame(1), None);
        assert_eq!(l.gref_of_frame(2), Some(8));
        assert_eq!(l.gref_of_frame(l.total_pages() - 1), Some(8 + 513));
        assert_eq!(l.gref_of_frame(l.total_pages()), None);
        assert!(8 + 513 < l.grant_frames * ENTRIES_PER_FRAME);
    }

    #[test]
    fn configurations_are_validated() {
        let ok = NetFrontConfig::new("vif0");
        assert!(ok.validate().is_ok());
        let cases = [
            NetFrontConfig {
                mac: MacAddr([1, 0, 0, 0, 0, 1]),
                ..ok.clone()
            },
            NetFrontConfig {
                mtu: 67,
                ..ok.clone()
            },
            NetFrontConfig {
                mtu: 9000,
                sg: false,
                ..ok.clone()
            },
            NetFrontConfig {
                rx_buffers: 0,
                ..ok.clone()
            },
            NetFrontConfig {
                rx_buffers: 257,
                ..ok.clone()
            },
        ];
        for cfg in cases {
            assert!(
                matches!(cfg.validate(), Err(NetFrontError::Config(_))),
                "{cfg:?}"
            );
        }
        let jumbo = NetFrontConfig { mtu: 9000, ..ok };
        assert!(jumbo.validate().is_ok());
        assert_eq!(jumbo.max_frame().div_ceil(PAGE_SIZE), 3);
    }
}
