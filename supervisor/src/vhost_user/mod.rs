//! vhost-user (docs/ARCHITECTURE.md §8): the supervisor terminates each
//! vhost-user device's unix socket and keeps everything the VMM sends; the
//! data plane gets it in `attach-virtio` from the device task. A
//! data-plane crash is a takeover inside the device task: the VMM's
//! connection stays up and it sees only a stall.
//!
//! One blocking thread per device serves one VMM connection at a time
//! (`vhost`'s [`BackendReqHandler`] driving a [`VhostUserHandler`]). When
//! the connection ends — EOF, a protocol error, or the device giving up —
//! the session is detached and the next connection accepted (the VMM's
//! chardev reconnect, or a VMM reconnecting to a restarted supervisor).
//!
//! Nothing here is specific to a disk but the model: the handler asks the
//! device's [`VirtioModel`] (from its class; [`BlkGeometry`] for a disk)
//! for features, queue count and config space.
mod config_space;
#[doc(hidden)]
pub mod fuzzing;
mod handler;
mod inflight;
pub(crate) mod memory;
mod model;
mod upgrade;

use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
use shadowback_xenbus::virtio::{VirtioAttachRequest, VirtioFds};
use tokio::sync::oneshot::error::TryRecvError;
use vhost::vhost_user::message::MAX_ATTACHED_FD_ENTRIES;
use vhost::vhost_user::{
    BackendListener, BackendReqHandler, Error as VhostError, Listener, VhostUserVirtioFeatures,
};

use crate::admission::PeerKey;
use crate::config::{DiskConfig, NicConfig};
use crate::device::{Attachment, DeviceHandle};
use crate::SupervisorError;

pub use config_space::{BlkGeometry, CONFIG_SPACE_SIZE};
use handler::{DeviceFacts, SessionLink, VhostUserHandler};
pub use inflight::{inflight_mmap_size, queue_region_size};
pub use model::VirtioModel;
pub(crate) use upgrade::PauseSlot;

/// How often the serving thread looks at its stop flag and at the device.
const POLL_PERIOD: Duration = Duration::from_millis(50);
/// A message that has started to arrive must be complete within this (a
/// VMM that stalls mid-message is disconnected, not waited for), and a
/// VMM must have read its earlier replies within this.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a partly arrived header, or a full send buffer, is looked at
/// again.
const RECHECK_PERIOD: Duration = Duration::from_millis(10);
/// Bytes of a vhost-user message header (`request`, `flags`, `size`).
const HEADER_SIZE: usize = 12;

/// What a device's `vhost_user` export is configured with (a disk's or a
/// nic's).
#[derive(Clone, Debug)]
pub struct VhostUserExport {
    pub name: String,
    pub socket: Option<PathBuf>,
    /// Largest `SET_VRING_NUM`.
    pub queue_size: u16,
    pub shadow: bool,
}

impl From<&DiskConfig> for VhostUserExport {
    fn from(cfg: &DiskConfig) -> Self {
        VhostUserExport {
            name: cfg.name.clone(),
            socket: cfg.vhost_user.clone(),
            queue_size: cfg.queue_size,
            shadow: cfg.shadow,
        }
    }
}

impl From<&NicConfig> for VhostUserExport {
    fn from(cfg: &NicConfig) -> Self {
        VhostUserExport {
            name: cfg.name.clone(),
            socket: cfg.vhost_user.clone(),
            queue_size: cfg.queue_size,
            shadow: cfg.shadow,
        }
    }
}

/// The vhost-user socket of one device and the thread serving it.
pub struct VhostUserServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    /// Where a live upgrade asks the thread to pause.
    pause: Arc<PauseSlot>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl VhostUserServer {
    /// Binds `cfg.socket` (creating its directory, replacing a stale
    /// socket file) — or takes the one `listeners` kept across a restart —
    /// and starts serving it for `device`.
    pub(crate) fn start(
        cfg: impl Into<VhostUserExport>,
        device: DeviceHandle,
        listeners: &crate::fdstore::Listeners,
    ) -> Result<Self, SupervisorError> {
        let cfg: VhostUserExport = cfg.into();
        let Some(path) = cfg.socket.clone() else {
            return Err(SupervisorError::Config(format!(
                "device {:?} has no vhost_user socket",
                cfg.name
            )));
        };
        let err = |reason: String| SupervisorError::Socket {
            path: path.clone(),
            reason,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| err(format!("creating {}: {e}", dir.display())))?;
        }
        let socket = listeners
            .vhost_user(&cfg.name, &path, || {
                remove_stale_socket(&path)?;
                UnixListener::bind(&path).map_err(|e| e.to_string())
            })
            .map_err(err)?;
        Self::serve(cfg, path, socket, device, 0, None)
    }

    /// Serves a socket a previous binary listened on (a live upgrade,
    /// docs/ARCHITECTURE.md §4.2), first the VMM connected to it if any.
    fn serve(
        cfg: VhostUserExport,
        path: PathBuf,
        socket: UnixListener,
        device: DeviceHandle,
        connections: u64,
        adopted: Option<(
            &crate::upgrade::VhostConnState,
            Option<Attachment>,
            &crate::upgrade::Adopted,
        )>,
    ) -> Result<Self, SupervisorError> {
        let err = |reason: String| SupervisorError::Socket {
            path: path.clone(),
            reason,
        };
        let polled = socket
            .try_clone()
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .map_err(|e| err(e.to_string()))?;
        let model = device
            .virtio
            .clone()
            .ok_or_else(|| err("the device has no virtio model".into()))?;
        let facts = DeviceFacts {
            name: cfg.name.clone(),
            model,
            queue_size: cfg.queue_size,
            shadow: cfg.shadow,
            limits: device.limits,
            log: DeviceFacts::new_log(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let pause = Arc::new(PauseSlot::default());
        let slot = pause.clone();
        let adopted = match adopted {
            Some((state, attachment, fds)) => Some(upgrade::connection(
                state, attachment, fds, &facts, &device,
            )?),
            None => None,
        };
        let thread = std::thread::Builder::new()
            .name(format!("vhost-user-{}", cfg.name))
            .spawn(move || {
                let served = Served {
                    facts,
                    device,
                    stop: &flag,
                    pause: &slot,
                };
                serve_socket(polled, &served, connections, adopted)
            })
            .map_err(|e| {
                let _ = std::fs::remove_file(&path);
                err(e.to_string())
            })?;
        tracing::info!(device = %cfg.name, socket = %path.display(), "vhost-user socket listening");
        Ok(VhostUserServer {
            path,
            stop,
            pause,
            thread: Some(thread),
        })
    }

    /// The device's vhost-user socket and connection a previous binary
    /// handed over.
    pub(crate) fn adopt(
        cfg: impl Into<VhostUserExport>,
        device: DeviceHandle,
        state: &crate::upgrade::VhostState,
        attachment: Option<Attachment>,
        fds: &crate::upgrade::Adopted,
    ) -> Result<Self, SupervisorError> {
        let cfg: VhostUserExport = cfg.into();
        let path = cfg.socket.clone().ok_or_else(|| {
            SupervisorError::Config(format!("device {:?} has no vhost_user socket", cfg.name))
        })?;
        let socket = UnixListener::from(fds.fd(state.listener)?);
        let adopted = state
            .connection
            .as_ref()
            .map(|conn| (conn, attachment, fds));
        Self::serve(cfg, path, socket, device, state.connections, adopted)
    }

    /// Where a live upgrade asks the serving thread to pause between two
    /// requests ([`PauseSlot::freeze`]); apart from the server, which
    /// stays in the device registry.
    pub(crate) fn pause_slot(&self) -> Arc<PauseSlot> {
        self.pause.clone()
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes the connection (detaching its session), removes the socket
    /// and waits for the thread. Blocks: call it from a plain thread or
    /// `spawn_blocking`, while the device tasks still run.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // Release pairs with the Acquire loads in the serving loops.
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!(socket = %self.path.display(), "vhost-user thread panicked");
            }
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for VhostUserServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Whether `fd` became readable (or hung up) within `timeout`.
fn wait_readable(fd: &impl std::os::fd::AsFd, timeout: Duration) -> std::io::Result<bool> {
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    let ts = Timespec {
        tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    match poll(&mut fds, Some(&ts)) {
        Ok(n) => Ok(n > 0),
        Err(rustix::io::Errno::INTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn lock(handler: &Mutex<VhostUserHandler>) -> MutexGuard<'_, VhostUserHandler> {
    // The handler's state stays consistent across a panic in one request
    // (it is only ever replaced whole); keep serving.
    handler.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes a socket file left by an earlier run; anything else at `path`
/// is not ours to delete.
fn remove_stale_socket(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| format!("removing the stale socket: {e}"))
        }
        Ok(_) => Err("exists and is not a socket".into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// What a serving thread works with.
struct Served<'a> {
    facts: DeviceFacts,
    device: DeviceHandle,
    stop: &'a AtomicBool,
    pause: &'a PauseSlot,
}

/// A connection being served: `vhost`'s request handler and ours.
type Connection = (
    BackendReqHandler<Mutex<VhostUserHandler>>,
    Arc<Mutex<VhostUserHandler>>,
    String,
);

fn serve_socket(
    polled: UnixListener,
    served: &Served<'_>,
    mut connections: u64,
    mut adopted: Option<Connection>,
) {
    let facts = &served.facts;
    let device = &served.device;
    // `vhost`'s listener accepts on its own descriptor of the socket; the
    // loop polls `polled`. Both are non-blocking.
    let mut listener = match polled.try_clone() {
        Ok(l) => Listener::from(l),
        Err(e) => {
            tracing::error!(device = %facts.name, error = %e, "vhost-user listener");
            return;
        }
    };
    // Acquire pairs with the Release store in `shutdown`.
    while !served.stop.load(Ordering::Acquire) {
        let (conn, handler, frontend) = match adopted.take() {
            Some(conn) => conn,
            None => {
                served
                    .pause
                    .pause_point(|fds| upgrade::listening(&polled, facts, connections, fds));
                match wait_readable(&polled, POLL_PERIOD) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::error!(device = %facts.name, error = %e, "vhost-user listener poll failed");
                        std::thread::sleep(POLL_PERIOD);
                        continue;
                    }
                }
                connections += 1;
                let frontend = format!("vhost-user-{}-{connections}", facts.name);
                let link = DeviceLink {
                    device: device.clone(),
                    attachment: None,
                };
                let handler = Arc::new(Mutex::new(VhostUserHandler::new(
                    facts.clone(),
                    frontend.clone(),
                    Box::new(link),
                )));
                let accepted = BackendListener::new(&mut listener, handler.clone())
                    .and_then(|mut l| l.accept());
                let conn = match accepted {
                    Ok(Some(conn)) => conn,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(device = %facts.name, error = %e, "vhost-user accept failed");
                        continue;
                    }
                };
                if let Err(why) = admitted(&conn, device) {
                    // Dropping the connection closes it: vhost-user has no error
                    // message, the VMM sees EOF.
                    if let Some(suppressed) = facts.log_allowed() {
                        tracing::warn!(device = %facts.name, %why, suppressed, "vhost-user frontend refused");
                    }
                    continue;
                }
                (conn, handler, frontend)
            }
        };
        // A VMM may connect and hang up as fast as it likes: these lines
        // are rate-limited with its refused requests.
        let logged = facts.log_allowed();
        if let Some(suppressed) = logged {
            tracing::info!(device = %facts.name, %frontend, suppressed, "vhost-user frontend connected");
        }
        let served_conn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            serve_connection(conn, &handler, served, &polled, connections)
        }));
        let why = served_conn.unwrap_or_else(|_| "handler panicked".to_string());
        lock(&handler).disconnect();
        if logged.is_some() {
            tracing::info!(device = %facts.name, %frontend, %why, "vhost-user frontend disconnected");
        }
    }
}

/// Whether the peer of `conn` (`SO_PEERCRED`) may use `device`
/// (docs/PROTOCOL.md §1.2).
fn admitted(
    conn: &BackendReqHandler<Mutex<VhostUserHandler>>,
    device: &DeviceHandle,
) -> Result<(), String> {
    let sock = conn
        .try_clone_connection()
        .map_err(|e| format!("cloning the socket: {e}"))?;
    let peer = PeerKey::of(&sock).map_err(|e| format!("SO_PEERCRED: {e}"))?;
    if device.access.admits(&peer) {
        Ok(())
    } else {
        Err(format!(
            "{peer} gid {} may not use the device (not in its allow_uids or allow_gids)",
            peer.gid
        ))
    }
}

/// Serves requests until the connection ends; returns why it ended.
fn serve_connection(
    mut conn: BackendReqHandler<Mutex<VhostUserHandler>>,
    handler: &Mutex<VhostUserHandler>,
    served: &Served<'_>,
    polled: &UnixListener,
    connections: u64,
) -> String {
    let stop = served.stop;
    let sock = match conn.try_clone_connection() {
        Ok(s) => s,
        Err(e) => return format!("cloning the socket: {e}"),
    };
    let timeouts = sock
        .set_nonblocking(false)
        .and_then(|()| sock.set_read_timeout(Some(MESSAGE_TIMEOUT)))
        .and_then(|()| sock.set_write_timeout(Some(MESSAGE_TIMEOUT)));
    if let Err(e) = timeouts {
        return format!("socket options: {e}");
    }
    // Acquire pairs with the Release store in `shutdown`.
    while !stop.load(Ordering::Acquire) {
        // Between two requests: where a live upgrade may take the
        // connection over.
        served.pause.pause_point(|fds| {
            let mut state = upgrade::listening(polled, &served.facts, connections, fds);
            state.connection = Some(lock(handler).handover(sock.as_fd(), fds));
            state
        });
        if let Some(why) = lock(handler).lost() {
            // The device gave up: closing the socket is how the VMM learns.
            return format!("device lost: {why}");
        }
        lock(handler).forward_config_change();
        match wait_readable(&sock, POLL_PERIOD) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => return format!("poll: {e}"),
        }
        // `vhost` retries a timed-out read or write for ever: it only gets
        // a request whose header is complete and whose reply fits.
        if let Err(why) = next_request_ready(&sock, stop) {
            return why;
        }
        lock(handler).take_soft_refusal();
        let early_enable = peek_vring_enable(&sock);
        lock(handler).offer_backend_channel(peek_backend_channel(&sock));
        match conn.handle_request() {
            Ok(()) => {}
            Err(VhostError::Disconnected) => return "EOF".into(),
            // QEMU's virtio-net enables (or disables) its first queue pair
            // when the device is realized or reset, before SET_FEATURES;
            // `vhost` refuses that (PROTOCOL_FEATURES not acked yet) after
            // reading the whole message, without a reply, which QEMU does
            // not wait for. QEMU sends the enable again once it starts the
            // device, so the early one is dropped, not a reason to hang up.
            Err(VhostError::InactiveFeature(f))
                if f == VhostUserVirtioFeatures::PROTOCOL_FEATURES =>
            {
                // The ring state it asked for stands (QEMU 7.2 sends it once,
                // right before SET_FEATURES): kept from the peeked message.
                if let Some((index, enable)) = early_enable {
                    use vhost::vhost_user::VhostUserBackendReqHandlerMut;
                    let kept = lock(handler).set_vring_enable(index, enable);
                    tracing::debug!(index, enable, ?kept, "SET_VRING_ENABLE before SET_FEATURES");
                }
            }
            Err(e) if lock(handler).take_soft_refusal() => {
                tracing::debug!(error = %e, "request refused; connection kept");
            }
            Err(e) => return format!("protocol error: {e}"),
        }
    }
    "supervisor stopping".into()
}

/// Waits (bounded by [`MESSAGE_TIMEOUT`]) until `vhost` can handle the next
/// request without blocking on the VMM; `Err(why)` closes the connection.
///
/// `vhost`'s `handle_request` retries a read or write that timed out for
/// ever, and it reads a header with room for [`MAX_ATTACHED_FD_ENTRIES`]
/// fds: with more, the kernel drops them all, the header bytes are gone
/// and `vhost` goes on reading the stream from the middle of the message.
/// So the header must have fully arrived, with at most that many fds (both
/// checked with a peek, which leaves the message in the socket), and the
/// VMM must have read its replies: a socket that polls writable has at
/// least three quarters of its send buffer free, room for any reply.
fn next_request_ready(sock: &UnixStream, stop: &AtomicBool) -> Result<(), String> {
    let deadline = Instant::now() + MESSAGE_TIMEOUT;
    loop {
        match peek_header(sock)? {
            Peek::Incomplete => {}
            Peek::Closed => return Ok(()),
            Peek::Header => {
                let mut fds = [PollFd::new(sock, PollFlags::OUT)];
                let writable = match poll(&mut fds, Some(&Timespec::default())) {
                    Ok(n) => n > 0,
                    Err(rustix::io::Errno::INTR) => false,
                    Err(e) => return Err(format!("poll: {e}")),
                };
                if writable {
                    return Ok(());
                }
            }
        }
        // Acquire pairs with the Release store in `shutdown`.
        if stop.load(Ordering::Acquire) {
            return Err("supervisor stopping".into());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no complete request, or unread replies, for {MESSAGE_TIMEOUT:?}"
            ));
        }
        std::thread::sleep(RECHECK_PERIOD);
    }
}

/// `(index, enable)` of the next message if it is a whole
/// `SET_VRING_ENABLE` (peeked, left in the socket): `vhost` refuses one
/// that comes before SET_FEATURES without telling what it asked.
fn peek_vring_enable(sock: &UnixStream) -> Option<(u32, bool)> {
    const SET_VRING_ENABLE: u32 = 18;
    let mut msg = [0u8; HEADER_SIZE + 8];
    let got = rustix::net::recv(sock, &mut msg, RecvFlags::PEEK | RecvFlags::DONTWAIT).ok()?;
    let u32_at = |at: usize| u32::from_le_bytes([msg[at], msg[at + 1], msg[at + 2], msg[at + 3]]);
    if got.0 < msg.len() || u32_at(0) != SET_VRING_ENABLE || u32_at(8) != 8 {
        return None;
    }
    match u32_at(16) {
        0 => Some((u32_at(12), false)),
        1 => Some((u32_at(12), true)),
        _ => None,
    }
}

/// The descriptor of the next message if it is a `SET_BACKEND_REQ_FD`
/// (peeked: a copy, the message stays in the socket for `vhost`).
fn peek_backend_channel(sock: &UnixStream) -> Option<OwnedFd> {
    const SET_BACKEND_REQ_FD: u32 = 21;
    let (got, header, mut fds) = peek_raw(sock);
    let request = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    if got.ok()?.bytes < HEADER_SIZE || request != SET_BACKEND_REQ_FD || fds.len() != 1 {
        return None;
    }
    fds.pop()
}

/// Peeks the next header and copies of the fds that come with it (room
/// for one more than `vhost` takes, so that too many show).
fn peek_raw(
    sock: &UnixStream,
) -> (
    rustix::io::Result<rustix::net::RecvMsg>,
    [u8; HEADER_SIZE],
    Vec<OwnedFd>,
) {
    let mut header = [0u8; HEADER_SIZE];
    let mut space =
        [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_ATTACHED_FD_ENTRIES + 1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut header)],
        &mut control,
        RecvFlags::PEEK | RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
    );
    let fds = control
        .drain()
        .flat_map(|m| match m {
            RecvAncillaryMessage::ScmRights(fds) => fds.collect::<Vec<_>>(),
            _ => Vec::new(),
        })
        .collect();
    (got, header, fds)
}

/// What [`peek_header`] found.
enum Peek {
    /// A whole header, with few enough fds.
    Header,
    /// Part of a header so far.
    Incomplete,
    /// The VMM closed its end after part of a header (or nothing): `vhost`
    /// reads that as a partial message or EOF without blocking.
    Closed,
}

/// Looks at the next header without consuming it; `Err` if it carries more
/// fds than `vhost` takes. The peeked fds are copies, closed here.
fn peek_header(sock: &UnixStream) -> Result<Peek, String> {
    let (got, _, fds) = peek_raw(sock);
    let fds = fds.len();
    let bytes = match got {
        Ok(m) if m.flags.contains(ReturnFlags::CTRUNC) || fds > MAX_ATTACHED_FD_ENTRIES => {
            return Err(format!(
                "a message with more than {MAX_ATTACHED_FD_ENTRIES} fds"
            ))
        }
        Ok(m) => m.bytes,
        Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => 0,
        Err(e) => return Err(format!("peek: {e}")),
    };
    if bytes >= HEADER_SIZE {
        return Ok(Peek::Header);
    }
    // Less than a header: complete later, or never if the VMM hung up.
    let mut fds = [PollFd::new(sock, PollFlags::RDHUP)];
    match poll(&mut fds, Some(&Timespec::default())) {
        Ok(_)
            if fds[0]
                .revents()
                .intersects(PollFlags::RDHUP | PollFlags::HUP) =>
        {
            Ok(Peek::Closed)
        }
        Ok(_) | Err(rustix::io::Errno::INTR) => Ok(Peek::Incomplete),
        Err(e) => Err(format!("poll: {e}")),
    }
}

/// [`SessionLink`] to a device task, from the blocking serving thread.
struct DeviceLink {
    device: DeviceHandle,
    attachment: Option<Attachment>,
}

impl SessionLink for DeviceLink {
    fn attach(&mut self, req: VirtioAttachRequest, fds: VirtioFds) -> Result<(), String> {
        self.detach();
        let attachment = self
            .device
            .attach_virtio_blocking(req, fds)
            .map_err(|(code, why)| format!("{code}: {why}"))?;
        self.attachment = Some(attachment);
        Ok(())
    }

    fn detach(&mut self) {
        if let Some(a) = self.attachment.take() {
            self.device.detach_blocking(a.id);
        }
    }

    fn set_call(&mut self, queue: u16, fd: OwnedFd) -> Result<(), String> {
        let id = self.attachment.as_ref().ok_or("no session")?.id;
        self.device
            .set_call_blocking(id, queue, fd)
            .map_err(|(code, why)| format!("{code}: {why}"))
    }

    fn config_changed(&mut self) -> bool {
        let changed = self.device.info.has_changed().unwrap_or(false);
        if changed {
            self.device.info.borrow_and_update();
        }
        changed
    }

    fn attachment(&self) -> Option<u64> {
        self.attachment.as_ref().map(|a| a.id)
    }

    fn lost(&mut self) -> Option<String> {
        match self.attachment.as_mut()?.lost.try_recv() {
            Ok(why) => Some(format!("{why:?}")),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Closed) => Some("device stopped".into()),
        }
    }
}

impl Drop for DeviceLink {
    fn drop(&mut self) {
        // Exactly one detach per attachment, even after a panic.
        self.detach();
    }
}
