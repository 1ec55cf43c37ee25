//! [`VhostUserNet`]: a virtio-net driver over vhost-user, implementing
//! [`FrameDevice`], so the smoltcp stack of [`crate::net`] runs over a
//! vhost-user-net backend exactly as over netfront.
//!
//! One receive and one transmit virtqueue (`virtio_drivers`' `VirtQueue`
//! through [`RequestQueue`]); every buffer is one descriptor in a
//! per-queue area of guest RAM, big enough for the 12-byte header and a
//! whole frame, so the device needs one receive buffer per frame (it may
//! still merge several, `VIRTIO_NET_F_MRG_RXBUF`, and this driver joins
//! them). Features: VERSION_1, MAC, MTU, STATUS, MRG_RXBUF; checksums are
//! the stack's own, so neither CSUM nor GUEST_CSUM is acked. With
//! [`VhostUserNetOptions::control_queue`] it also acks CTRL_VQ, CTRL_RX,
//! CTRL_MAC_ADDR and CTRL_GUEST_OFFLOADS and starts the control queue,
//! for [`VhostUserNet::control`]: one command at a time, as Linux sends
//! them. With [`VhostUserNetOptions::offloads`] it acks CSUM, GUEST_CSUM,
//! HOST_TSO4 and GUEST_TSO4 where offered, so a TAP hands it TCP
//! super-frames (up to 64 KiB over merged buffers, counted in
//! [`VhostUserNetStats::rx_gso`]); their partial checksums are completed
//! here, as the stack checks every checksum.
//!
//! With [`VhostUserNetOptions::queue_pairs`] above 1 it acks MQ, sets up
//! every receive/transmit pair the device has (`max_virtqueue_pairs`)
//! and the control queue after them, and asks for that many pairs with
//! `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`: a frame goes out on the pair its
//! flow hashes to (so a TAP, which steers a flow's replies to the queue
//! it last came from, answers on the same pair), and every receive queue
//! in use is read in turn; the receive queues share one call eventfd, as
//! do the transmit queues, so the stack waits on one fd.
//!
//! Notifications follow Linux's virtio-net: with
//! `VIRTIO_RING_F_EVENT_IDX` (acked by default,
//! [`VhostUserNetOptions::event_idx`]) a kick goes out only when the device
//! asked for one (it does when it finds the ring empty, so a busy device
//! gets none); transmit calls stay off while a buffer is free and, with
//! every buffer in flight, are asked for once three quarters are answered
//! ([`FrameDevice::can_send`] saying no arms it: the caller sleeps on
//! [`VhostUserNet::tx_wait_fd`]); reposted receive buffers are kicked per
//! quarter ring or at the end of a receive burst.
//!
//! Every used element is checked before it is trusted: its id must be a
//! buffer this driver made available and not yet got back, else it is
//! counted ([`VhostUserNetStats::bad_used`]) — the recovery tests assert
//! every transmit head is answered exactly once.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, VIRTIO_NET_F_CTRL_MAC_ADDR,
    VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_net::{VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_OK};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VRING_USED_F_NO_NOTIFY};
use virtio_drivers::transport::{DeviceStatus, Transport};

use super::hal::{need_event, ChainBuf, RequestQueue};
use super::memory::{DmaBuffer, GuestRam};
use super::transport::{TransportOptions, VhostUserTransport, REPLY_TIMEOUT};
use crate::device::DeviceError;
use crate::net::{FrameDevice, FrameError, ETHERNET_HEADER_LEN};

/// Bytes of the virtio-net header with VERSION_1.
pub const HEADER_BYTES: usize = 12;
/// Bytes of `virtio_net_config` read: mac, status, max_virtqueue_pairs,
/// mtu.
const CONFIG_BYTES: u32 = 12;
/// How long to look again for transmit completions while every transmit
/// buffer is in flight (the stack waits on the receive call only).
const TX_BLOCKED_POLL: Duration = Duration::from_millis(1);

/// How to connect a [`VhostUserNet`].
#[derive(Clone, Debug)]
pub struct VhostUserNetOptions {
    /// Descriptors per virtqueue (one of [`RequestQueue::SIZES`]).
    pub queue_size: u16,
    pub connect_timeout: Duration,
    pub reply_timeout: Duration,
    /// Guest RAM, if this process has none yet.
    pub ram_bytes: u64,
    /// Start the control queue (virtqueue 2) if the device offers
    /// `VIRTIO_NET_F_CTRL_VQ`.
    pub control_queue: bool,
    /// Take partial checksums and TCP super-frames on receive (and allow
    /// them on transmit) where the device offers it.
    pub offloads: bool,
    /// Receive/transmit pairs to use (above 1: MQ and the control queue
    /// are required, every pair of the device is set up, this many are
    /// enabled).
    pub queue_pairs: u16,
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX` when offered.
    pub event_idx: bool,
}

/// Most queue pairs this driver sets up.
pub const MAX_PAIRS: usize = 8;

impl Default for VhostUserNetOptions {
    fn default() -> Self {
        VhostUserNetOptions {
            queue_size: 256,
            connect_timeout: Duration::from_secs(5),
            reply_timeout: REPLY_TIMEOUT,
            ram_bytes: 64 << 20,
            control_queue: false,
            offloads: false,
            queue_pairs: 1,
            event_idx: true,
        }
    }
}

/// Counters of one device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VhostUserNetStats {
    pub tx_frames: u64,
    pub rx_frames: u64,
    /// Transmit frames dropped because every transmit buffer was in
    /// flight.
    pub tx_full: u64,
    /// Receive buffers shorter than a header and an Ethernet header (the
    /// device's way to give back a buffer without a frame).
    pub rx_runts: u64,
    /// Used elements naming no buffer in flight (answered twice, or
    /// never made available).
    pub bad_used: u64,
    /// Transmit buffers made available and not answered yet.
    pub tx_in_flight: u64,
    /// Frames received as TCP super-frames (a `gso_type` in the header).
    pub rx_gso: u64,
    /// Frames received with a partial checksum, completed here.
    pub rx_partial_csum: u64,
    /// Frames sent and received per queue pair.
    pub pair_tx: [u64; MAX_PAIRS],
    pub pair_rx: [u64; MAX_PAIRS],
    /// Kicks sent (all queues): with EVENT_IDX only those the device
    /// asked for.
    pub kicks: u64,
}

/// One virtqueue: fixed-size buffers, one descriptor each.
struct NetQueue {
    index: u16,
    size: u16,
    queue: RequestQueue,
    bufs: DmaBuffer,
    stride: u64,
    used_gpa: u64,
    /// `used_event` (EVENT_IDX): the word after the avail ring.
    used_event_gpa: u64,
    last_used: u16,
    /// `avail->idx` as published, and when the last kick was decided.
    avail_idx: u16,
    notified_idx: u16,
    event_idx: bool,
    /// Head (token) → buffer slot and the chain made available.
    by_token: Vec<Option<(u16, ChainBuf)>>,
    free: Vec<u16>,
}

impl NetQueue {
    fn new(
        t: &mut VhostUserTransport,
        ram: &'static GuestRam,
        index: u16,
        size: u16,
        stride: u64,
        event_idx: bool,
    ) -> Result<Self, DeviceError> {
        let queue = RequestQueue::new(t, ram, index, size, event_idx)
            .map_err(|e| DeviceError::Transport(format!("virtqueue {index}: {e}")))?;
        t.take_error()?;
        let bufs = ram
            .alloc(u64::from(size) * stride)
            .ok_or_else(|| DeviceError::Transport("guest RAM exhausted".into()))?;
        let used_gpa = t
            .used_ring(index)
            .ok_or_else(|| DeviceError::Transport(format!("no used ring for queue {index}")))?;
        let avail_gpa = t
            .avail_ring(index)
            .ok_or_else(|| DeviceError::Transport(format!("no avail ring for queue {index}")))?;
        Ok(NetQueue {
            index,
            size,
            queue,
            bufs,
            stride,
            used_gpa,
            used_event_gpa: avail_gpa + 4 + 2 * u64::from(size),
            last_used: 0,
            avail_idx: 0,
            notified_idx: 0,
            event_idx,
            by_token: vec![None; usize::from(size)],
            free: (0..size).rev().collect(),
        })
    }

    fn in_flight(&self) -> usize {
        usize::from(self.size) - self.free.len()
    }

    /// Makes buffer `slot` available with `len` bytes.
    fn add(&mut self, slot: u16, len: u32, device_writes: bool) -> Result<(), DeviceError> {
        let gpa = self
            .bufs
            .sub(u64::from(slot) * self.stride, u64::from(len))
            .ok_or_else(|| DeviceError::Transport("buffer outside its area".into()))?;
        let chain = ChainBuf {
            gpa,
            len,
            device_writes,
        };
        let token = self
            .queue
            .add(&[chain])
            .map_err(|e| DeviceError::Transport(format!("virtqueue add: {e}")))?;
        let entry = self
            .by_token
            .get_mut(usize::from(token))
            .ok_or_else(|| DeviceError::Transport(format!("token {token} out of range")))?;
        *entry = Some((slot, chain));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(())
    }

    /// Buffers made available since the last kick decision.
    fn unnotified(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.notified_idx)
    }

    /// Kicks the device for the buffers made available since the last
    /// decision if it asked for a kick (virtio 1.2 §2.7.13.4): with
    /// EVENT_IDX if `avail->idx` passed its `avail_event`, else unless it
    /// set `VRING_USED_F_NO_NOTIFY`. A busy device asks for none. Returns
    /// whether it kicked.
    fn notify(&mut self, t: &VhostUserTransport, ram: &GuestRam) -> Result<bool, DeviceError> {
        if self.unnotified() == 0 {
            return Ok(false);
        }
        // Full barrier between publishing avail->idx (in `add`) and
        // reading the device's suppression field.
        fence(Ordering::SeqCst);
        let need = if self.event_idx {
            let avail_event = self.used_gpa + 4 + 8 * u64::from(self.size);
            let event: u16 = ram
                .load(avail_event, Ordering::Relaxed)
                .map_err(DeviceError::Io)?;
            need_event(event, self.avail_idx, self.notified_idx)
        } else {
            let flags: u16 = ram
                .load(self.used_gpa, Ordering::Relaxed)
                .map_err(DeviceError::Io)?;
            u32::from(flags) & VRING_USED_F_NO_NOTIFY == 0
        };
        self.notified_idx = self.avail_idx;
        if need {
            t.kick(self.index)?;
        }
        Ok(need)
    }

    /// Sets `used_event` (EVENT_IDX): the device calls once it publishes
    /// the used element at index `idx`. (`VirtQueue` sets it to the next
    /// used index on every pop: "call at the next one".)
    fn set_used_event(&self, ram: &GuestRam, idx: u16) -> Result<(), DeviceError> {
        ram.store(self.used_event_gpa, idx, Ordering::Relaxed)
            .map_err(DeviceError::Io)
    }

    /// The next used element, checked: `(slot, len)`; `Ok(None)` when
    /// the device has published no more; `Err` for a used element naming
    /// no buffer in flight (its index is consumed).
    fn next_used(
        &mut self,
        t: &VhostUserTransport,
        ram: &GuestRam,
    ) -> Result<Option<(u16, u32)>, DeviceError> {
        let used_idx = t.used_idx(self.index)?;
        if used_idx == self.last_used {
            return Ok(None);
        }
        let pos = u64::from(self.last_used % self.size);
        let elem = self.used_gpa + 4 + 8 * pos;
        // Relaxed: ordered after the Acquire load of used->idx above.
        let id: u32 = ram.load(elem, Ordering::Relaxed).map_err(DeviceError::Io)?;
        let len: u32 = ram
            .load(elem + 4, Ordering::Relaxed)
            .map_err(DeviceError::Io)?;
        self.last_used = self.last_used.wrapping_add(1);
        let found = u16::try_from(id)
            .ok()
            .and_then(|token| Some((token, self.by_token.get_mut(usize::from(token))?.take()?)));
        let Some((token, (slot, chain))) = found else {
            return Err(DeviceError::Transport(format!(
                "queue {}: used id {id} is not a buffer in flight",
                self.index
            )));
        };
        self.queue
            .pop(token, &[chain])
            .map_err(|e| DeviceError::Transport(format!("virtqueue pop: {e}")))?;
        Ok(Some((slot, len.min(chain.len))))
    }
}

/// What the virtio-net header of a received frame said.
#[derive(Clone, Copy, Debug)]
struct RxHeader {
    /// The L4 checksum is partial (`VIRTIO_NET_HDR_F_NEEDS_CSUM`).
    needs_csum: bool,
    /// A TCP super-frame (`gso_type` other than NONE).
    gso: bool,
}

/// Completes the TCP checksum of an IPv4 frame whose header said it is
/// partial; anything else is left as it is (the stack drops it if wrong).
fn complete_checksum(frame: &mut [u8]) {
    crate::net::with_ipv4_tcp(frame, |tcp, src, dst| tcp.fill_checksum(&src, &dst));
}

/// Bytes of a control command (class, command, data) this driver sends.
const CTRL_COMMAND_BYTES: u64 = 4096;
/// How long a control command may wait for its answer: long enough for a
/// backend takeover.
const CTRL_TIMEOUT: Duration = Duration::from_secs(10);

/// The control queue: one command in flight at a time.
struct CtrlQueue {
    index: u16,
    queue: RequestQueue,
    /// Command bytes, then the ack byte.
    buf: DmaBuffer,
    /// `used->idx` after the last answered command.
    last_used: u16,
}

/// A virtio-net device over vhost-user. See the module docs.
pub struct VhostUserNet {
    ram: &'static GuestRam,
    mac: [u8; 6],
    mtu: usize,
    link_up: bool,
    /// Receive and transmit queue of each pair the device has.
    rx: Vec<NetQueue>,
    tx: Vec<NetQueue>,
    /// Pairs in use: the first `active`.
    active: usize,
    /// The receive queue to look at first.
    next_rx: usize,
    ctrl: Option<CtrlQueue>,
    /// `GUEST_TSO4` was acked: TCP super-frames may arrive.
    guest_tso: bool,
    /// Per receive queue: buffers of a merged frame so far, and how many
    /// are left.
    merging: Vec<Option<(Vec<u8>, u16, RxHeader)>>,
    stats: VhostUserNetStats,
    /// Last: the rings are stopped before the buffers' memory is freed.
    transport: VhostUserTransport,
}

impl std::fmt::Debug for VhostUserNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserNet")
            .field("mac", &self.mac)
            .field("mtu", &self.mtu)
            .field("stats", &self.stats)
            .finish()
    }
}

const fn bit(n: u32) -> u64 {
    1 << n
}

impl VhostUserNet {
    /// Connects to the vhost-user-net backend at `socket_path`, negotiates
    /// features and starts both queues with every receive buffer posted.
    pub fn connect(
        socket_path: impl AsRef<std::path::Path>,
        opts: &VhostUserNetOptions,
    ) -> Result<Self, DeviceError> {
        if !RequestQueue::SIZES.contains(&opts.queue_size) {
            return Err(DeviceError::InvalidRequest(format!(
                "queue size {} (one of {:?})",
                opts.queue_size,
                RequestQueue::SIZES
            )));
        }
        let wanted_pairs = usize::from(opts.queue_pairs);
        if !(1..=MAX_PAIRS).contains(&wanted_pairs) {
            return Err(DeviceError::InvalidRequest(format!(
                "{wanted_pairs} queue pairs (1..={MAX_PAIRS})"
            )));
        }
        let ram = GuestRam::global(opts.ram_bytes).map_err(DeviceError::Io)?;
        // With several pairs every queue of the device is set up: the
        // control queue comes after the last pair. How many that is, the
        // config space says; a first connection asks for one pair and its
        // control queue only to read it.
        let mq = wanted_pairs > 1;
        let transport = |queues| TransportOptions {
            queues,
            queue_size: opts.queue_size,
            connect_timeout: opts.connect_timeout,
            reply_timeout: opts.reply_timeout,
            config_bytes: CONFIG_BYTES,
        };
        let device_pairs = if mq {
            let probe = VhostUserTransport::connect(socket_path.as_ref(), transport(1), ram)?;
            let cfg = probe.config();
            let n = cfg
                .get(8..10)
                .map_or(1, |b| u16::from_le_bytes([b[0], b[1]]));
            usize::from(n).clamp(1, MAX_PAIRS)
        } else {
            1
        };
        if device_pairs < wanted_pairs {
            return Err(DeviceError::Transport(format!(
                "the device has {device_pairs} queue pairs, {wanted_pairs} wanted"
            )));
        }
        let with_ctrl = opts.control_queue || mq;
        let queues = 2 * device_pairs as u16 + u16::from(with_ctrl);
        let mut t = VhostUserTransport::connect(socket_path, transport(queues), ram)?;
        // virtio 1.2 §3.1.1: reset, ACKNOWLEDGE|DRIVER, features, FEATURES_OK.
        t.set_status(DeviceStatus::empty());
        t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let offered = t.read_device_features();
        if offered & bit(VIRTIO_F_VERSION_1) == 0 {
            return Err(DeviceError::Transport(
                "device does not offer VIRTIO_F_VERSION_1".into(),
            ));
        }
        let wanted = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_MTU)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_MRG_RXBUF);
        let control = bit(VIRTIO_NET_F_CTRL_VQ)
            | bit(VIRTIO_NET_F_CTRL_RX)
            | bit(VIRTIO_NET_F_CTRL_MAC_ADDR)
            | bit(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS);
        let wanted = if with_ctrl { wanted | control } else { wanted };
        let wanted = if mq {
            wanted | bit(VIRTIO_NET_F_MQ)
        } else {
            wanted
        };
        let offloads = bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_HOST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO4);
        let wanted = if opts.offloads {
            wanted | offloads
        } else {
            wanted
        };
        let wanted = if opts.event_idx {
            wanted | bit(VIRTIO_RING_F_EVENT_IDX)
        } else {
            wanted
        };
        let acked = offered & wanted;
        let event_idx = acked & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
        if mq
            && acked & (bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_CTRL_VQ))
                != bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_CTRL_VQ)
        {
            return Err(DeviceError::Transport(
                "device does not offer VIRTIO_NET_F_MQ and a control queue".into(),
            ));
        }
        t.write_driver_features(acked);
        t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
        t.take_error()?;
        let cfg = t.config().to_vec();
        if cfg.len() < CONFIG_BYTES as usize {
            return Err(DeviceError::Transport(
                "backend does not offer VHOST_USER_PROTOCOL_F_CONFIG".into(),
            ));
        }
        let le16 = |at: usize| u16::from_le_bytes([cfg[at], cfg[at + 1]]);
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&cfg[..6]);
        let link_up =
            acked & bit(VIRTIO_NET_F_STATUS) == 0 || u32::from(le16(6)) & VIRTIO_NET_S_LINK_UP != 0;
        let mtu = if acked & bit(VIRTIO_NET_F_MTU) != 0 {
            usize::from(le16(10))
        } else {
            1500
        };
        if !(68..=65521).contains(&mtu) {
            return Err(DeviceError::Transport(format!("device MTU {mtu}")));
        }
        let stride = ((HEADER_BYTES + ETHERNET_HEADER_LEN + mtu) as u64)
            .next_multiple_of(64)
            .max(2048);
        let mut rx = Vec::with_capacity(device_pairs);
        let mut tx = Vec::with_capacity(device_pairs);
        for pair in 0..device_pairs as u16 {
            if pair > 0 {
                t.share_call(0, 2 * pair)?;
                t.share_call(1, 2 * pair + 1)?;
            }
            rx.push(NetQueue::new(
                &mut t,
                ram,
                2 * pair,
                opts.queue_size,
                stride,
                event_idx,
            )?);
            tx.push(NetQueue::new(
                &mut t,
                ram,
                2 * pair + 1,
                opts.queue_size,
                stride,
                event_idx,
            )?);
        }
        let ctrl_index = 2 * device_pairs as u16;
        let ctrl = if acked & bit(VIRTIO_NET_F_CTRL_VQ) != 0 {
            let queue = RequestQueue::new(&mut t, ram, ctrl_index, opts.queue_size, false)
                .map_err(|e| DeviceError::Transport(format!("control virtqueue: {e}")))?;
            t.take_error()?;
            let buf = ram
                .alloc(CTRL_COMMAND_BYTES + 1)
                .ok_or_else(|| DeviceError::Transport("guest RAM exhausted".into()))?;
            Some(CtrlQueue {
                index: ctrl_index,
                queue,
                buf,
                last_used: 0,
            })
        } else {
            None
        };
        t.set_status(
            DeviceStatus::ACKNOWLEDGE
                | DeviceStatus::DRIVER
                | DeviceStatus::FEATURES_OK
                | DeviceStatus::DRIVER_OK,
        );
        t.take_error()?;
        let mut dev = VhostUserNet {
            ram,
            mac,
            mtu,
            link_up,
            rx,
            tx,
            active: 1,
            next_rx: 0,
            ctrl,
            guest_tso: acked & bit(VIRTIO_NET_F_GUEST_TSO4) != 0,
            merging: (0..device_pairs).map(|_| None).collect(),
            stats: VhostUserNetStats::default(),
            transport: t,
        };
        for q in &mut dev.rx {
            while let Some(slot) = q.free.pop() {
                q.add(slot, stride as u32, true)?;
            }
        }
        for q in &mut dev.rx {
            dev.transport.kick(q.index)?;
            q.notified_idx = q.avail_idx;
        }
        if mq {
            let pairs = wanted_pairs as u16;
            // class MQ (4), VQ_PAIRS_SET (0).
            if !dev.control(4, 0, &pairs.to_le_bytes())? {
                return Err(DeviceError::Transport(format!(
                    "the device refused {pairs} queue pairs"
                )));
            }
            dev.active = wanted_pairs;
        }
        tracing::debug!(
            ?mac,
            mtu,
            link_up,
            event_idx,
            pairs = dev.active,
            "vhost-user-net connected"
        );
        Ok(dev)
    }

    /// Counters so far.
    pub fn stats(&self) -> VhostUserNetStats {
        VhostUserNetStats {
            tx_in_flight: self.tx.iter().map(|q| q.in_flight() as u64).sum(),
            ..self.stats
        }
    }

    /// Queue pairs in use.
    pub fn pairs(&self) -> usize {
        self.active
    }

    /// The MAC the config space shows now (`GET_CONFIG` again).
    pub fn config_mac(&mut self) -> Result<[u8; 6], DeviceError> {
        let cfg = self.transport.read_config()?;
        cfg.get(..6)
            .and_then(|m| m.try_into().ok())
            .ok_or_else(|| DeviceError::Transport("config space without a MAC".into()))
    }

    /// Sends control command `class`/`cmd` with `data` (virtio 1.2
    /// §5.1.6.5) and waits for its ack: `Ok(true)` for `VIRTIO_NET_OK`,
    /// `Ok(false)` for an error ack.
    pub fn control(&mut self, class: u8, cmd: u8, data: &[u8]) -> Result<bool, DeviceError> {
        let ctrl = self
            .ctrl
            .as_mut()
            .ok_or_else(|| DeviceError::InvalidRequest("no control queue".into()))?;
        let len = 2 + data.len() as u64;
        if len > CTRL_COMMAND_BYTES {
            return Err(DeviceError::InvalidRequest(format!("{len} command bytes")));
        }
        ctrl.buf.write(0, &[class, cmd]).map_err(DeviceError::Io)?;
        ctrl.buf.write(2, data).map_err(DeviceError::Io)?;
        ctrl.buf
            .write(CTRL_COMMAND_BYTES, &[0xff])
            .map_err(DeviceError::Io)?;
        let chain = [
            ChainBuf {
                gpa: ctrl.buf.gpa(),
                len: len as u32,
                device_writes: false,
            },
            ChainBuf {
                gpa: ctrl.buf.gpa() + CTRL_COMMAND_BYTES,
                len: 1,
                device_writes: true,
            },
        ];
        let token = ctrl
            .queue
            .add(&chain)
            .map_err(|e| DeviceError::Transport(format!("control add: {e}")))?;
        self.transport.kick(ctrl.index)?;
        let deadline = Instant::now() + CTRL_TIMEOUT;
        // Linux spins on the control queue too (virtnet_send_command).
        while self.transport.used_idx(ctrl.index)? == ctrl.last_used {
            if Instant::now() >= deadline {
                return Err(DeviceError::Transport(
                    "control command never answered".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let used = ctrl
            .queue
            .pop(token, &chain)
            .map_err(|e| DeviceError::Transport(format!("control pop: {e}")))?;
        ctrl.last_used = ctrl.last_used.wrapping_add(1);
        let mut ack = [0u8; 1];
        ctrl.buf
            .read(CTRL_COMMAND_BYTES, &mut ack)
            .map_err(DeviceError::Io)?;
        Ok(used == 1 && u32::from(ack[0]) == VIRTIO_NET_OK)
    }

    /// The fd the transmit queue's completions wake (the stack waits on
    /// the receive queue's, [`FrameDevice::wait_fd`]): a sender that only
    /// transmits sleeps on it while every transmit buffer is in flight.
    pub fn tx_wait_fd(&self) -> Option<BorrowedFd<'_>> {
        self.transport.call_fd(self.tx[0].index)
    }

    /// Whether the config space said the link is up.
    pub fn link_up(&self) -> bool {
        self.link_up
    }

    /// Waits up to `timeout` for every transmit buffer to be answered;
    /// returns how many are still in flight.
    pub fn settle(&mut self, timeout: Duration) -> Result<usize, DeviceError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.reap_tx()?;
            let in_flight: usize = self.tx.iter().map(NetQueue::in_flight).sum();
            if in_flight == 0 || Instant::now() >= deadline {
                return Ok(in_flight);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Takes back every transmit buffer the device answered.
    ///
    /// With EVENT_IDX transmit calls are off while a buffer is free, as
    /// Linux's virtio-net keeps them (`virtqueue_disable_cb`): the sender
    /// reaps as it sends, and asks for a call only when it has to wait
    /// ([`Self::arm_tx_calls`]). `used_event` one behind the next used
    /// index is never reached: the device publishes at most a ring ahead.
    fn reap_tx(&mut self) -> Result<(), DeviceError> {
        for q in &mut self.tx {
            let before = q.last_used;
            loop {
                match q.next_used(&self.transport, self.ram) {
                    Ok(Some((slot, _))) => q.free.push(slot),
                    Ok(None) => break,
                    Err(e) => {
                        self.stats.bad_used += 1;
                        tracing::warn!(error = %e, "transmit used element rejected");
                    }
                }
            }
            if q.event_idx && q.last_used != before {
                q.set_used_event(self.ram, q.last_used.wrapping_sub(1))?;
            }
        }
        Ok(())
    }

    /// Whether every transmit queue in use has a free buffer.
    fn tx_room(&self) -> bool {
        self.tx[..self.active].iter().all(|q| !q.free.is_empty())
    }

    /// Asks for a call on each transmit queue in use with every buffer in
    /// flight, once three quarters of them are answered (Linux's
    /// `virtqueue_enable_cb_delayed`): the sender then refills the ring
    /// in one burst instead of waking for each answer. Without EVENT_IDX
    /// every answer calls.
    fn arm_tx_calls(&mut self) -> Result<(), DeviceError> {
        for q in &self.tx[..self.active] {
            if q.event_idx && q.free.is_empty() {
                let later = (q.in_flight() * 3 / 4) as u16;
                q.set_used_event(self.ram, q.last_used.wrapping_add(later))?;
            }
        }
        // Full barrier between publishing used_event and reading used->idx
        // again (virtio 1.2 §2.7.10): an answer racing with it is either
        // seen by the caller's next reap or called.
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// The pair a frame goes out on: by its flow, among the pairs in use.
    fn tx_pair(&self, frame: &[u8]) -> usize {
        if self.active == 1 {
            return 0;
        }
        // Addresses and ports (IPv4 TCP/UDP), summed so both directions
        // agree; anything else on pair 0.
        let flow = crate::net::with_ipv4_ports(frame).unwrap_or(0);
        flow as usize % self.active
    }

    fn io(e: DeviceError) -> FrameError {
        match e {
            DeviceError::Io(e) => FrameError::Io(e),
            other => FrameError::Io(std::io::Error::other(other.to_string())),
        }
    }

    /// Hands a receive buffer back to the device. The kick waits for a
    /// quarter of the ring or the end of the receive burst
    /// ([`Self::notify_rx`]), as Linux refills in batches.
    fn repost(&mut self, pair: usize, slot: u16) -> Result<(), DeviceError> {
        let q = &mut self.rx[pair];
        q.add(slot, q.stride as u32, true)?;
        if q.unnotified() >= q.size / 4 {
            self.stats.kicks += u64::from(q.notify(&self.transport, self.ram)?);
        }
        Ok(())
    }

    /// Kicks each receive queue in use for its reposted buffers, if the
    /// device asked.
    fn notify_rx(&mut self) -> Result<(), DeviceError> {
        for q in &mut self.rx[..self.active] {
            self.stats.kicks += u64::from(q.notify(&self.transport, self.ram)?);
        }
        Ok(())
    }

    /// The next used element of a receive queue in use, looking at each
    /// in turn from the one after the last that had one.
    fn next_rx_used(&mut self) -> Result<Option<(usize, u16, u32)>, DeviceError> {
        for k in 0..self.active {
            let pair = (self.next_rx + k) % self.active;
            if let Some((slot, len)) = self.rx[pair].next_used(&self.transport, self.ram)? {
                self.next_rx = (pair + 1) % self.active;
                return Ok(Some((pair, slot, len)));
            }
        }
        Ok(None)
    }
}

impl FrameDevice for VhostUserNet {
    fn send(&mut self, frame: &[u8]) -> Result<(), FrameError> {
        let max = self.mtu + ETHERNET_HEADER_LEN;
        if frame.len() > max {
            return Err(FrameError::TooLong {
                len: frame.len(),
                max,
            });
        }
        self.reap_tx().map_err(Self::io)?;
        let pair = self.tx_pair(frame);
        let q = &mut self.tx[pair];
        let Some(slot) = q.free.pop() else {
            self.stats.tx_full += 1;
            return Ok(());
        };
        let off = u64::from(slot) * q.stride;
        let written = q
            .bufs
            .write(off, &[0u8; HEADER_BYTES])
            .and_then(|()| q.bufs.write(off + HEADER_BYTES as u64, frame));
        if let Err(e) = written {
            q.free.push(slot);
            return Err(FrameError::Io(e));
        }
        let len = (HEADER_BYTES + frame.len()) as u32;
        if let Err(e) = q.add(slot, len, false) {
            q.free.push(slot);
            return Err(Self::io(e));
        }
        self.stats.kicks += u64::from(q.notify(&self.transport, self.ram).map_err(Self::io)?);
        self.stats.tx_frames += 1;
        self.stats.pair_tx[pair] += 1;
        Ok(())
    }

    fn can_send(&mut self) -> bool {
        let _ = self.reap_tx();
        if self.tx_room() {
            return true;
        }
        // The caller waits for room next: ask for a call, then look again.
        if self.arm_tx_calls().is_err() {
            return false;
        }
        let _ = self.reap_tx();
        self.tx_room()
    }

    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<bool, FrameError> {
        loop {
            let used = match self.next_rx_used() {
                Ok(Some(u)) => u,
                Ok(None) => {
                    self.notify_rx().map_err(Self::io)?;
                    self.transport.drain_calls();
                    // A used element published between the check and the
                    // drain would have no call left: look once more. The
                    // full barrier orders `used_event` (set by the last
                    // pop) before that look (virtio 1.2 §2.7.10), so the
                    // device either calls or is seen.
                    fence(Ordering::SeqCst);
                    match self.next_rx_used() {
                        Ok(Some(u)) => u,
                        Ok(None) => return Ok(false),
                        Err(e) => {
                            self.stats.bad_used += 1;
                            return Err(Self::io(e));
                        }
                    }
                }
                Err(e) => {
                    self.stats.bad_used += 1;
                    return Err(Self::io(e));
                }
            };
            let (pair, slot, len) = used;
            let mut data = vec![0u8; len as usize];
            let q = &self.rx[pair];
            let read = q.bufs.read(u64::from(slot) * q.stride, &mut data);
            self.repost(pair, slot).map_err(Self::io)?;
            read.map_err(FrameError::Io)?;
            let (mut frame, header) = match self.merging[pair].take() {
                Some((mut so_far, left, header)) => {
                    so_far.extend_from_slice(&data);
                    if left > 1 {
                        self.merging[pair] = Some((so_far, left - 1, header));
                        // The rest of this frame is on this queue.
                        self.next_rx = pair;
                        continue;
                    }
                    (so_far, header)
                }
                None => {
                    if data.len() < HEADER_BYTES + ETHERNET_HEADER_LEN {
                        self.stats.rx_runts += 1;
                        continue;
                    }
                    let buffers = u16::from_le_bytes([data[10], data[11]]);
                    let header = RxHeader {
                        needs_csum: data[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0,
                        gso: data[1] != 0,
                    };
                    let mut so_far = data.split_off(HEADER_BYTES);
                    if buffers > 1 {
                        so_far.reserve(self.mtu + ETHERNET_HEADER_LEN);
                        self.merging[pair] = Some((so_far, buffers - 1, header));
                        self.next_rx = pair;
                        continue;
                    }
                    (so_far, header)
                }
            };
            if header.gso {
                self.stats.rx_gso += 1;
            }
            if header.needs_csum {
                self.stats.rx_partial_csum += 1;
                complete_checksum(&mut frame);
            }
            self.stats.rx_frames += 1;
            self.stats.pair_rx[pair] += 1;
            *buf = frame;
            return Ok(true);
        }
    }

    fn wait_fd(&self) -> Option<BorrowedFd<'_>> {
        self.transport.call_fd(self.rx[0].index)
    }

    fn poll_again_in(&self) -> Option<Duration> {
        self.tx[..self.active]
            .iter()
            .any(|q| q.free.is_empty())
            .then_some(TX_BLOCKED_POLL)
    }

    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn mtu(&self) -> usize {
        self.mtu
    }

    fn max_rx_frame(&self) -> usize {
        if self.guest_tso {
            ETHERNET_HEADER_LEN + usize::from(u16::MAX)
        } else {
            self.mtu + ETHERNET_HEADER_LEN
        }
    }
}
