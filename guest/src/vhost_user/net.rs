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
//! the stack's own, so neither CSUM nor GUEST_CSUM is acked.
//!
//! Every used element is checked before it is trusted: its id must be a
//! buffer this driver made available and not yet got back, else it is
//! counted ([`VhostUserNetStats::bad_used`]) — the recovery tests assert
//! every transmit head is answered exactly once.

use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_drivers::transport::{DeviceStatus, Transport};

use super::hal::{ChainBuf, RequestQueue};
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
}

impl Default for VhostUserNetOptions {
    fn default() -> Self {
        VhostUserNetOptions {
            queue_size: 256,
            connect_timeout: Duration::from_secs(5),
            reply_timeout: REPLY_TIMEOUT,
            ram_bytes: 64 << 20,
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
}

/// One virtqueue: fixed-size buffers, one descriptor each.
struct NetQueue {
    index: u16,
    size: u16,
    queue: RequestQueue,
    bufs: DmaBuffer,
    stride: u64,
    used_gpa: u64,
    last_used: u16,
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
    ) -> Result<Self, DeviceError> {
        let queue = RequestQueue::new(t, ram, index, size, false)
            .map_err(|e| DeviceError::Transport(format!("virtqueue {index}: {e}")))?;
        t.take_error()?;
        let bufs = ram
            .alloc(u64::from(size) * stride)
            .ok_or_else(|| DeviceError::Transport("guest RAM exhausted".into()))?;
        let used_gpa = t
            .used_ring(index)
            .ok_or_else(|| DeviceError::Transport(format!("no used ring for queue {index}")))?;
        Ok(NetQueue {
            index,
            size,
            queue,
            bufs,
            stride,
            used_gpa,
            last_used: 0,
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
        Ok(())
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

/// A virtio-net device over vhost-user. See the module docs.
pub struct VhostUserNet {
    ram: &'static GuestRam,
    mac: [u8; 6],
    mtu: usize,
    link_up: bool,
    rx: NetQueue,
    tx: NetQueue,
    /// Buffers of a merged receive frame so far, and how many are left.
    merging: Option<(Vec<u8>, u16)>,
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
        let ram = GuestRam::global(opts.ram_bytes).map_err(DeviceError::Io)?;
        let mut t = VhostUserTransport::connect(
            socket_path,
            TransportOptions {
                queues: 2,
                queue_size: opts.queue_size,
                connect_timeout: opts.connect_timeout,
                reply_timeout: opts.reply_timeout,
                config_bytes: CONFIG_BYTES,
            },
            ram,
        )?;
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
        let acked = offered & wanted;
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
        let rx = NetQueue::new(&mut t, ram, 0, opts.queue_size, stride)?;
        let tx = NetQueue::new(&mut t, ram, 1, opts.queue_size, stride)?;
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
            merging: None,
            stats: VhostUserNetStats::default(),
            transport: t,
        };
        while let Some(slot) = dev.rx.free.pop() {
            dev.rx.add(slot, stride as u32, true)?;
        }
        dev.transport.kick(dev.rx.index)?;
        tracing::debug!(?mac, mtu, link_up, "vhost-user-net connected");
        Ok(dev)
    }

    /// Counters so far.
    pub fn stats(&self) -> VhostUserNetStats {
        VhostUserNetStats {
            tx_in_flight: self.tx.in_flight() as u64,
            ..self.stats
        }
    }

    /// The fd the transmit queue's completions wake (the stack waits on
    /// the receive queue's, [`FrameDevice::wait_fd`]): a sender that only
    /// transmits sleeps on it while every transmit buffer is in flight.
    pub fn tx_wait_fd(&self) -> Option<BorrowedFd<'_>> {
        self.transport.call_fd(self.tx.index)
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
            if self.tx.in_flight() == 0 || Instant::now() >= deadline {
                return Ok(self.tx.in_flight());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Takes back every transmit buffer the device answered.
    fn reap_tx(&mut self) -> Result<(), DeviceError> {
        loop {
            match self.tx.next_used(&self.transport, self.ram) {
                Ok(Some((slot, _))) => self.tx.free.push(slot),
                Ok(None) => return Ok(()),
                Err(e) => {
                    self.stats.bad_used += 1;
                    tracing::warn!(error = %e, "transmit used element rejected");
                }
            }
        }
    }

    fn io(e: DeviceError) -> FrameError {
        match e {
            DeviceError::Io(e) => FrameError::Io(e),
            other => FrameError::Io(std::io::Error::other(other.to_string())),
        }
    }

    /// Hands a receive buffer back to the device.
    fn repost(&mut self, slot: u16) -> Result<(), DeviceError> {
        self.rx.add(slot, self.rx.stride as u32, true)?;
        self.transport.kick(self.rx.index)
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
        let Some(slot) = self.tx.free.pop() else {
            self.stats.tx_full += 1;
            return Ok(());
        };
        let off = u64::from(slot) * self.tx.stride;
        let written = self
            .tx
            .bufs
            .write(off, &[0u8; HEADER_BYTES])
            .and_then(|()| self.tx.bufs.write(off + HEADER_BYTES as u64, frame));
        if let Err(e) = written {
            self.tx.free.push(slot);
            return Err(FrameError::Io(e));
        }
        let len = (HEADER_BYTES + frame.len()) as u32;
        if let Err(e) = self.tx.add(slot, len, false) {
            self.tx.free.push(slot);
            return Err(Self::io(e));
        }
        self.transport.kick(self.tx.index).map_err(Self::io)?;
        self.stats.tx_frames += 1;
        Ok(())
    }

    fn can_send(&mut self) -> bool {
        let _ = self.reap_tx();
        !self.tx.free.is_empty()
    }

    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<bool, FrameError> {
        loop {
            let used = match self.rx.next_used(&self.transport, self.ram) {
                Ok(Some(u)) => u,
                Ok(None) => {
                    self.transport.drain_calls();
                    // A used element published between the check and the
                    // drain would have no call left: look once more.
                    match self.rx.next_used(&self.transport, self.ram) {
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
            let (slot, len) = used;
            let mut data = vec![0u8; len as usize];
            let read = self
                .rx
                .bufs
                .read(u64::from(slot) * self.rx.stride, &mut data);
            self.repost(slot).map_err(Self::io)?;
            read.map_err(FrameError::Io)?;
            let frame = match self.merging.take() {
                Some((mut so_far, left)) => {
                    so_far.extend_from_slice(&data);
                    if left > 1 {
                        self.merging = Some((so_far, left - 1));
                        continue;
                    }
                    so_far
                }
                None => {
                    if data.len() < HEADER_BYTES + ETHERNET_HEADER_LEN {
                        self.stats.rx_runts += 1;
                        continue;
                    }
                    let buffers = u16::from_le_bytes([data[10], data[11]]);
                    let mut so_far = data.split_off(HEADER_BYTES);
                    if buffers > 1 {
                        so_far.reserve(self.mtu + ETHERNET_HEADER_LEN);
                        self.merging = Some((so_far, buffers - 1));
                        continue;
                    }
                    so_far
                }
            };
            self.stats.rx_frames += 1;
            *buf = frame;
            return Ok(true);
        }
    }

    fn wait_fd(&self) -> Option<BorrowedFd<'_>> {
        self.transport.call_fd(self.rx.index)
    }

    fn poll_again_in(&self) -> Option<Duration> {
        self.tx.free.is_empty().then_some(TX_BLOCKED_POLL)
    }

    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn mtu(&self) -> usize {
        self.mtu
    }
}
