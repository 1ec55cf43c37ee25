//! A `virtio_drivers::transport::Transport` over a vhost-user socket: we are
//! the VMM side ("front-end") of the protocol, speaking it with the `vhost`
//! crate's [`Frontend`].
//!
//! # Set-up sequence
//!
//! The order follows QEMU's vhost-user-blk, so a backend that works with
//! QEMU works with us:
//!
//! ```text
//! connect:     GET_FEATURES, GET/SET_PROTOCOL_FEATURES (MQ, REPLY_ACK,
//!              CONFIG, INFLIGHT_SHMFD as offered), GET_QUEUE_NUM (MQ),
//!              SET_OWNER, GET_CONFIG (CONFIG)
//! first queue: GET_INFLIGHT_FD (kept for reconnects) + SET_INFLIGHT_FD,
//!              SET_FEATURES, SET_MEM_TABLE
//! each queue:  SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR,
//!              SET_VRING_CALL, SET_VRING_KICK, SET_VRING_ENABLE
//! ```
//!
//! With `REPLY_ACK` every request asks for an acknowledgement, so a failure
//! is noticed at the request that caused it.
//!
//! # Reconnect
//!
//! [`VhostUserTransport::reconnect`] replays that sequence on a new
//! connection the way QEMU does after a chardev reconnect: the kept in-flight
//! fd goes back with `SET_INFLIGHT_FD` (no `GET_INFLIGHT_FD`), and each
//! queue restarts at `SET_VRING_BASE` = the used index in guest memory, so
//! the backend resubmits what its in-flight region says it had popped.
//!
//! `Transport`'s methods cannot fail, so failures inside them are kept
//! ([`VhostUserTransport::take_error`]) and reported by the caller.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, MsgFlags};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::hal::borrow_eventfd;
use super::memory::GuestRam;
use crate::device::DeviceError;

/// Largest virtqueue we offer to set up (QEMU's `VIRTQUEUE_MAX_SIZE`).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Most virtqueues (the `attach-virtio` limit).
pub const MAX_QUEUES: u16 = 16;
/// Bytes of config space read with `GET_CONFIG`: `virtio_blk_config` up to
/// and including `write_zeroes_may_unmap` and its padding.
pub const CONFIG_BYTES: u32 = 60;
/// How long we wait for the backend's replies in one set-up step (the
/// default of [`TransportOptions::reply_timeout`]).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Protocol features we use when the backend offers them.
pub const WANTED_PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
const PROTOCOL_FEATURES_BIT: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// How to reach the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportOptions {
    /// Virtqueues the driver will start (all of the same size).
    pub queues: u16,
    /// Their size, for `GET_INFLIGHT_FD`.
    pub queue_size: u16,
    /// Keep retrying a refused or missing socket this long when connecting.
    pub connect_timeout: Duration,
    /// A set-up step (handshake, memory table, one vring, a reset) whose
    /// replies take longer than this fails as a disconnect.
    pub reply_timeout: Duration,
    /// Bytes of config space read with `GET_CONFIG` (the device's config
    /// struct: [`CONFIG_BYTES`] for virtio-blk).
    pub config_bytes: u32,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            queues: 1,
            queue_size: 256,
            connect_timeout: Duration::from_secs(2),
            reply_timeout: REPLY_TIMEOUT,
            config_bytes: CONFIG_BYTES,
        }
    }
}

/// One virtqueue as the driver set it up (guest-physical ring addresses).
#[derive(Debug)]
struct Vring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
    call: EventFd,
    /// Set up on the current connection.
    ready: bool,
    /// Set up by the driver (survives reconnects).
    configured: bool,
}

/// The in-flight region the backend gave us, kept like QEMU keeps it.
struct Inflight {
    file: File,
    info: VhostUserInflight,
}

impl std::fmt::Debug for Inflight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflight")
            .field("mmap_size", &self.info.mmap_size)
            .field("queue_size", &self.info.queue_size)
            .finish()
    }
}

/// `virtio_drivers` transport over a vhost-user socket. See the module docs.
pub struct VhostUserTransport {
    path: PathBuf,
    opts: TransportOptions,
    /// Our handle on the socket, to notice the backend hanging up.
    sock: UnixStream,
    frontend: Frontend,
    ram: &'static GuestRam,
    /// `GET_FEATURES`, including `VHOST_USER_F_PROTOCOL_FEATURES`.
    device_features: u64,
    /// What the driver acked (virtio bits only).
    driver_features: u64,
    protocol: VhostUserProtocolFeatures,
    max_queues: u16,
    config: Vec<u8>,
    status: DeviceStatus,
    vrings: Vec<Vring>,
    inflight: Option<Inflight>,
    /// `SET_FEATURES`/`SET_MEM_TABLE` sent on this connection.
    started: bool,
    error: Option<DeviceError>,
}

impl std::fmt::Debug for VhostUserTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserTransport")
            .field("path", &self.path)
            .field(
                "device_features",
                &format_args!("{:#x}", self.device_features),
            )
            .field("protocol", &self.protocol)
            .field("queues", &self.vrings.len())
            .finish()
    }
}

fn is_disconnect(e: &vhost::Error) -> bool {
    use vhost::vhost_user::Error as U;
    match e {
        vhost::Error::VhostUserProtocol(u) => matches!(
            u,
            U::Disconnected | U::SocketBroken(_) | U::SocketError(_) | U::PartialMessage
        ),
        vhost::Error::IOError(_) => true,
        _ => false,
    }
}

/// Maps a vhost-user failure of request `what` to the device error.
fn vu_err(what: &str) -> impl FnOnce(vhost::Error) -> DeviceError + '_ {
    move |e| {
        if is_disconnect(&e) {
            DeviceError::Disconnected
        } else {
            DeviceError::Transport(format!("vhost-user {what}: {e}"))
        }
    }
}

/// `timeout` from now; a timeout too long for `Instant` (such as
/// `Duration::MAX`) means a century, not a panic.
pub(crate) fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

fn connect_socket(path: &Path, timeout: Duration) -> Result<UnixStream, DeviceError> {
    let deadline = deadline_after(timeout);
    loop {
        match UnixStream::connect(path) {
            // No SO_RCVTIMEO: the vhost crate retries a receive timeout
            // forever; `VhostUserTransport::bounded` ends a wait instead.
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(DeviceError::Io(e)),
        }
    }
}

impl VhostUserTransport {
    /// Connects to the vhost-user backend at `path` and negotiates the
    /// protocol (everything up to `GET_CONFIG`; see the module docs).
    pub fn connect(
        path: impl AsRef<Path>,
        opts: TransportOptions,
        ram: &'static GuestRam,
    ) -> Result<Self, DeviceError> {
        if opts.queues == 0 || opts.queues > MAX_QUEUES {
            return Err(DeviceError::InvalidRequest(format!(
                "{} virtqueues (1..={MAX_QUEUES})",
                opts.queues
            )));
        }
        if !opts.queue_size.is_power_of_two() || opts.queue_size > MAX_QUEUE_SIZE {
            return Err(DeviceError::InvalidRequest(format!(
                "queue size {} is not a power of two up to {MAX_QUEUE_SIZE}",
                opts.queue_size
            )));
        }
        let path = path.as_ref().to_path_buf();
        let sock = connect_socket(&path, opts.connect_timeout)?;
        let frontend = Frontend::from_stream(sock.try_clone().map_err(DeviceError::Io)?, 1);
        let mut vrings = Vec::with_capacity(opts.queues.into());
        for _ in 0..opts.queues {
            vrings.push(Vring {
                size: 0,
                desc: 0,
                avail: 0,
                used: 0,
                kick: EventFd::new(EFD_NONBLOCK).map_err(DeviceError::Io)?,
                call: EventFd::new(EFD_NONBLOCK).map_err(DeviceError::Io)?,
                ready: false,
                configured: false,
            });
        }
        let mut t = VhostUserTransport {
            path,
            opts,
            sock,
            frontend,
            ram,
            device_features: 0,
            driver_features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            max_queues: 1,
            config: Vec::new(),
            status: DeviceStatus::empty(),
            vrings,
            inflight: None,
            started: false,
            error: None,
        };
        t.bounded(Self::handshake)?;
        Ok(t)
    }

    /// Runs one set-up step `f`, shutting the socket down if it has not
    /// finished within `reply_timeout`: the vhost crate waits for a reply
    /// forever (it retries `EAGAIN`), so a hung backend would hang us. The
    /// shutdown makes the pending receive see EOF, so `f` fails as
    /// [`DeviceError::Disconnected`].
    fn bounded<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, DeviceError>,
    ) -> Result<T, DeviceError> {
        let watched = self.sock.try_clone().map_err(DeviceError::Io)?;
        let timeout = self.opts.reply_timeout;
        let done = (std::sync::Mutex::new(false), std::sync::Condvar::new());
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let (lock, cv) = &done;
                let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
                let (finished, _) = cv
                    .wait_timeout_while(guard, timeout, |finished| !*finished)
                    .unwrap_or_else(|e| e.into_inner());
                if !*finished {
                    tracing::warn!(?timeout, "vhost-user backend does not answer; hanging up");
                    let _ = watched.shutdown(std::net::Shutdown::Both);
                }
            });
            let result = f(self);
            *done.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
            done.1.notify_one();
            result
        })
    }

    /// Features, protocol features, queue count, owner, config.
    fn handshake(&mut self) -> Result<(), DeviceError> {
        let features = self
            .frontend
            .get_features()
            .map_err(vu_err("GET_FEATURES"))?;
        if self.driver_features & !features != 0 {
            return Err(DeviceError::Transport(format!(
                "backend no longer offers acked features {:#x}",
                self.driver_features & !features
            )));
        }
        self.device_features = features;
        self.protocol = VhostUserProtocolFeatures::empty();
        if features & PROTOCOL_FEATURES_BIT != 0 {
            // SET_PROTOCOL_FEATURES is only valid after the backend saw
            // the bit in SET_FEATURES or GET_FEATURES (vhost-user spec).
            let offered = self
                .frontend
                .get_protocol_features()
                .map_err(vu_err("GET_PROTOCOL_FEATURES"))?;
            let acked = offered & WANTED_PROTOCOL_FEATURES;
            self.frontend
                .set_protocol_features(acked)
                .map_err(vu_err("SET_PROTOCOL_FEATURES"))?;
            self.protocol = acked;
        }
        if self.inflight.is_some()
            && !self
                .protocol
                .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            return Err(DeviceError::Transport(
                "backend no longer offers INFLIGHT_SHMFD".into(),
            ));
        }
        self.frontend.set_hdr_flags(
            if self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                VhostUserHeaderFlag::NEED_REPLY
            } else {
                VhostUserHeaderFlag::empty()
            },
        );
        self.max_queues = if self.protocol.contains(VhostUserProtocolFeatures::MQ) {
            let n = self
                .frontend
                .get_queue_num()
                .map_err(vu_err("GET_QUEUE_NUM"))?;
            u16::try_from(n).unwrap_or(u16::MAX)
        } else {
            1
        };
        if self.max_queues < self.opts.queues {
            return Err(DeviceError::Transport(format!(
                "backend has {} virtqueues, {} wanted",
                self.max_queues, self.opts.queues
            )));
        }
        self.frontend.set_owner().map_err(vu_err("SET_OWNER"))?;
        if self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            let bytes = self.opts.config_bytes;
            let buf = vec![0u8; bytes as usize];
            let (_, payload) = self
                .frontend
                .get_config(0, bytes, VhostUserConfigFlags::empty(), &buf)
                .map_err(vu_err("GET_CONFIG"))?;
            if payload.len() != bytes as usize {
                return Err(DeviceError::Transport(format!(
                    "GET_CONFIG returned {} bytes, {bytes} asked",
                    payload.len()
                )));
            }
            self.config = payload;
        }
        Ok(())
    }

    /// In-flight region, features and memory table: once per connection,
    /// before the first vring.
    fn start(&mut self) -> Result<(), DeviceError> {
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            if self.inflight.is_none() {
                let ask = VhostUserInflight::new(0, 0, self.opts.queues, self.opts.queue_size);
                let (info, file) = self
                    .frontend
                    .get_inflight_fd(&ask)
                    .map_err(vu_err("GET_INFLIGHT_FD"))?;
                if info.mmap_size == 0 {
                    return Err(DeviceError::Transport(
                        "GET_INFLIGHT_FD returned an empty region".into(),
                    ));
                }
                self.inflight = Some(Inflight { file, info });
            }
            if let Some(inf) = &self.inflight {
                self.frontend
                    .set_inflight_fd(&inf.info, inf.file.as_raw_fd())
                    .map_err(vu_err("SET_INFLIGHT_FD"))?;
            }
        }
        let features = self.driver_features | (self.device_features & PROTOCOL_FEATURES_BIT);
        self.frontend
            .set_features(features)
            .map_err(vu_err("SET_FEATURES"))?;
        let base = self
            .ram
            .host_addr(0)
            .ok_or_else(|| DeviceError::Transport("guest RAM not mapped".into()))?;
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: self.ram.size(),
            userspace_addr: base as u64,
            mmap_offset: 0,
            mmap_handle: self.ram.file().as_raw_fd(),
        };
        self.frontend
            .set_mem_table(&[region])
            .map_err(vu_err("SET_MEM_TABLE"))?;
        self.started = true;
        Ok(())
    }

    fn user_addr(&self, gpa: u64) -> Result<u64, DeviceError> {
        self.ram
            .host_addr(gpa)
            .map(|p| p as u64)
            .ok_or_else(|| DeviceError::Transport(format!("ring address {gpa:#x} not in RAM")))
    }

    /// Sends one vring's set-up, starting at the used index in guest memory.
    fn setup_vring(&mut self, q: u16) -> Result<(), DeviceError> {
        let idx = usize::from(q);
        let vr = &self.vrings[idx];
        let config = VringConfigData {
            queue_max_size: vr.size,
            queue_size: vr.size,
            flags: 0,
            desc_table_addr: self.user_addr(vr.desc)?,
            used_ring_addr: self.user_addr(vr.used)?,
            avail_ring_addr: self.user_addr(vr.avail)?,
            log_addr: None,
        };
        let base = self.used_idx(q)?;
        let f = &mut self.frontend;
        f.set_vring_num(idx, vr.size)
            .map_err(vu_err("SET_VRING_NUM"))?;
        f.set_vring_base(idx, base)
            .map_err(vu_err("SET_VRING_BASE"))?;
        f.set_vring_addr(idx, &config)
            .map_err(vu_err("SET_VRING_ADDR"))?;
        // CALL before KICK: a backend starts the ring at SET_VRING_KICK
        // (vhost-user spec, "Starting and stopping rings"), and a kick left
        // pending from before a reconnect makes it complete requests at
        // once. libvhost-user (qemu-storage-daemon) then signals a call fd
        // it does not have yet, panics with EBADF and drops the session
        // half-done: requests it completed out of order are then behind a
        // used index no resumed session can start from.
        f.set_vring_call(idx, &vr.call)
            .map_err(vu_err("SET_VRING_CALL"))?;
        f.set_vring_kick(idx, &vr.kick)
            .map_err(vu_err("SET_VRING_KICK"))?;
        if self.device_features & PROTOCOL_FEATURES_BIT != 0 {
            f.set_vring_enable(idx, true)
                .map_err(vu_err("SET_VRING_ENABLE"))?;
        }
        self.vrings[idx].ready = true;
        Ok(())
    }

    /// The device's used index of queue `q`, from guest memory.
    pub fn used_idx(&self, q: u16) -> Result<u16, DeviceError> {
        let vr = self
            .vrings
            .get(usize::from(q))
            .ok_or_else(|| DeviceError::Transport(format!("no virtqueue {q}")))?;
        // Acquire: pairs with the device's barrier before publishing used->idx.
        self.ram
            .load::<u16>(vr.used + 2, Ordering::Acquire)
            .map_err(DeviceError::Io)
    }

    /// Replays the whole set-up on a new connection to the same path,
    /// retrying until `timeout` passes. Only queues the driver configured
    /// are restarted; each is kicked afterwards.
    pub fn reconnect(&mut self, timeout: Duration) -> Result<(), DeviceError> {
        let deadline = deadline_after(timeout);
        loop {
            match self.try_reconnect(deadline) {
                Ok(()) => {
                    tracing::info!(path = %self.path.display(), "vhost-user reconnected");
                    return Ok(());
                }
                // The backend is not (or no longer) there: try again.
                Err(DeviceError::Disconnected | DeviceError::Io(_))
                    if Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(DeviceError::Io(_)) => return Err(DeviceError::Disconnected),
                Err(e) => return Err(e),
            }
        }
    }

    fn try_reconnect(&mut self, deadline: Instant) -> Result<(), DeviceError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let sock = connect_socket(&self.path, left)?;
        self.frontend = Frontend::from_stream(sock.try_clone().map_err(DeviceError::Io)?, 1);
        self.sock = sock;
        self.started = false;
        for vr in &mut self.vrings {
            vr.ready = false;
        }
        self.bounded(Self::replay_setup)
    }

    /// The set-up sequence again, on a fresh connection.
    fn replay_setup(&mut self) -> Result<(), DeviceError> {
        self.handshake()?;
        if !self.vrings.iter().any(|v| v.configured) {
            return Ok(());
        }
        self.start()?;
        for q in 0..self.vrings.len() as u16 {
            if self.vrings[usize::from(q)].configured {
                self.setup_vring(q)?;
                // In case a request was published while nobody listened.
                self.vrings[usize::from(q)]
                    .kick
                    .write(1)
                    .map_err(DeviceError::Io)?;
            }
        }
        Ok(())
    }

    /// Stops the rings the backend runs (`GET_VRING_BASE`); after the
    /// first disconnect the others are only marked stopped.
    fn stop_vrings(&mut self, queues: std::ops::Range<usize>) -> Result<(), DeviceError> {
        let mut first_error = None;
        for q in queues {
            if self.vrings[q].ready && first_error.is_none() {
                if let Err(e) = self.frontend.get_vring_base(q) {
                    first_error = Some(vu_err("GET_VRING_BASE")(e));
                }
            }
            self.vrings[q].ready = false;
            self.vrings[q].configured = false;
        }
        first_error.map_or(Ok(()), Err)
    }

    /// True if the backend closed the connection. An unsolicited message
    /// (the backend never speaks first on this channel) is a protocol error.
    pub fn peer_gone(&self) -> Result<bool, DeviceError> {
        let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(0) => return Ok(false),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(false),
            Err(e) => return Err(DeviceError::Io(e.into())),
        }
        let mut byte = [0u8; 1];
        match recv(
            self.sock.as_raw_fd(),
            &mut byte,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(0) => Ok(true),
            Ok(_) => Err(DeviceError::Transport(
                "backend sent an unsolicited message".into(),
            )),
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => Ok(false),
            Err(_) => Ok(true),
        }
    }

    /// The socket, to wait on together with the call eventfds.
    pub fn socket_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// The call eventfd of queue `q`.
    pub fn call_fd(&self, q: u16) -> Option<BorrowedFd<'_>> {
        self.vrings
            .get(usize::from(q))
            .map(|v| borrow_eventfd(&v.call))
    }

    /// Makes queue `to` signal the call eventfd of queue `from` (before
    /// `to` is set up): a driver that waits for several queues at once
    /// (a NIC's receive queues) waits on one fd. vhost-user lets queues
    /// share a call eventfd.
    pub fn share_call(&mut self, from: u16, to: u16) -> Result<(), DeviceError> {
        let call = self
            .vrings
            .get(usize::from(from))
            .ok_or_else(|| DeviceError::Transport(format!("no virtqueue {from}")))?
            .call
            .try_clone()
            .map_err(DeviceError::Io)?;
        let vr = self
            .vrings
            .get_mut(usize::from(to))
            .ok_or_else(|| DeviceError::Transport(format!("no virtqueue {to}")))?;
        vr.call = call;
        Ok(())
    }

    /// Reads the config space again (`GET_CONFIG`): what the device shows
    /// now.
    pub fn read_config(&mut self) -> Result<Vec<u8>, DeviceError> {
        let bytes = self.opts.config_bytes;
        self.bounded(|t| {
            let buf = vec![0u8; bytes as usize];
            let (_, payload) = t
                .frontend
                .get_config(0, bytes, VhostUserConfigFlags::empty(), &buf)
                .map_err(vu_err("GET_CONFIG"))?;
            Ok(payload)
        })
    }

    /// Reads (resets) every call eventfd; true if any was signalled.
    pub fn drain_calls(&self) -> bool {
        // Every fd is read, not just up to the first signalled one.
        let mut any = false;
        for v in &self.vrings {
            any |= v.call.read().is_ok();
        }
        any
    }

    /// Kicks queue `q`.
    pub fn kick(&self, q: u16) -> Result<(), DeviceError> {
        let vr = self
            .vrings
            .get(usize::from(q))
            .ok_or_else(|| DeviceError::Transport(format!("no virtqueue {q}")))?;
        vr.kick.write(1).map_err(DeviceError::Io)
    }

    /// The guest-physical address of queue `q`'s avail ring.
    pub fn avail_ring(&self, q: u16) -> Option<u64> {
        self.vrings.get(usize::from(q)).map(|v| v.avail)
    }

    /// The guest-physical address of queue `q`'s used ring.
    pub fn used_ring(&self, q: u16) -> Option<u64> {
        self.vrings.get(usize::from(q)).map(|v| v.used)
    }

    /// The first failure inside a `Transport` method, if any.
    pub fn take_error(&mut self) -> Result<(), DeviceError> {
        self.error.take().map_or(Ok(()), Err)
    }

    fn fail(&mut self, e: DeviceError) {
        tracing::warn!("vhost-user transport: {e}");
        if self.error.is_none() {
            self.error = Some(e);
        }
    }

    /// Virtio feature bits the backend offers (without the vhost-user bit).
    pub fn device_features(&self) -> u64 {
        self.device_features & !PROTOCOL_FEATURES_BIT
    }

    /// Negotiated protocol features.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    /// Virtqueues the backend has.
    pub fn max_queues(&self) -> u16 {
        self.max_queues
    }

    /// Config space as read by `GET_CONFIG` (empty without `CONFIG`).
    pub fn config(&self) -> &[u8] {
        &self.config
    }

    /// Whether we hold an in-flight region (`INFLIGHT_SHMFD`).
    pub fn has_inflight(&self) -> bool {
        self.inflight.is_some()
    }
}

impl Transport for VhostUserTransport {
    fn device_type(&self) -> DeviceType {
        DeviceType::Block
    }

    fn read_device_features(&mut self) -> u64 {
        self.device_features()
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.driver_features = driver_features & self.device_features();
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        if queue < self.opts.queues {
            MAX_QUEUE_SIZE.into()
        } else {
            0
        }
    }

    fn notify(&mut self, queue: u16) {
        if let Err(e) = self.kick(queue) {
            self.fail(e);
        }
    }

    fn get_status(&self) -> DeviceStatus {
        self.status
    }

    fn set_status(&mut self, status: DeviceStatus) {
        if status.is_empty() {
            // Reset: stop every ring the backend runs.
            let all = 0..self.vrings.len();
            if let Err(e) = self.bounded(|t| t.stop_vrings(all)) {
                self.fail(e);
            }
        }
        self.status = status;
    }

    fn set_guest_page_size(&mut self, _guest_page_size: u32) {}

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: u64,
        driver_area: u64,
        device_area: u64,
    ) {
        let result = (|| {
            let q = usize::from(queue);
            let size = u16::try_from(size)
                .ok()
                .filter(|&s| s == self.opts.queue_size)
                .ok_or_else(|| {
                    DeviceError::Transport(format!(
                        "queue {queue} size {size}, transport set up for {}",
                        self.opts.queue_size
                    ))
                })?;
            let vr = self
                .vrings
                .get_mut(q)
                .ok_or_else(|| DeviceError::Transport(format!("no virtqueue {queue}")))?;
            vr.size = size;
            vr.desc = descriptors;
            vr.avail = driver_area;
            vr.used = device_area;
            vr.configured = true;
            self.bounded(|this| {
                if !this.started {
                    this.start()?;
                }
                this.setup_vring(queue)
            })
        })();
        if let Err(e) = result {
            self.fail(e);
        }
    }

    fn queue_unset(&mut self, queue: u16) {
        let q = usize::from(queue);
        if q < self.vrings.len() {
            if let Err(e) = self.bounded(|t| t.stop_vrings(q..q + 1)) {
                self.fail(e);
            }
        }
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.vrings
            .get(usize::from(queue))
            .is_some_and(|v| v.configured)
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        if self.drain_calls() {
            InterruptStatus::QUEUE_INTERRUPT
        } else {
            InterruptStatus::empty()
        }
    }

    fn read_config_generation(&self) -> u32 {
        0 // the config is read once, at connect
    }

    fn read_config_space<T: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<T> {
        if self.config.is_empty() {
            return Err(virtio_drivers::Error::ConfigSpaceMissing);
        }
        let end = offset
            .checked_add(std::mem::size_of::<T>())
            .ok_or(virtio_drivers::Error::ConfigSpaceTooSmall)?;
        let bytes = self
            .config
            .get(offset..end)
            .ok_or(virtio_drivers::Error::ConfigSpaceTooSmall)?;
        T::read_from_bytes(bytes).map_err(|_| virtio_drivers::Error::ConfigSpaceTooSmall)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        _offset: usize,
        _value: T,
    ) -> virtio_drivers::Result<()> {
        Err(virtio_drivers::Error::Unsupported)
    }
}
