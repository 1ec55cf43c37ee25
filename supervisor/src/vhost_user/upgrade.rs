//! A vhost-user socket's part of a live upgrade (docs/ARCHITECTURE.md
//! §4.2): the serving thread parks between two requests and describes
//! the listening socket and the VMM's connection; the binary that takes
//! over rebuilds both, `vhost`'s request handler included.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shadowback_xenbus::virtio::{VirtioAttachRequest, VirtioFds};
use tokio::sync::oneshot;
use vhost::vhost_user::BackendReqHandler;

use super::handler::{DeviceFacts, SessionLink, VhostUserHandler};
use super::{lock, Connection, DeviceLink};
use crate::device::{Attachment, DeviceHandle};
use crate::upgrade::{Adopted, Handover, VhostConnState, VhostState, WireFeatures};
use crate::SupervisorError;

/// A serving thread paused for an upgrade: what it serves, the
/// descriptors that names, and what resumes it.
pub(crate) struct FrozenVhost {
    pub state: VhostState,
    pub fds: Handover,
    /// Send (or drop) to resume the thread.
    pub resume: std::sync::mpsc::Sender<()>,
}

/// A pause asked of a serving thread.
struct PauseRequest {
    reply: oneshot::Sender<(VhostState, Handover)>,
    resume: std::sync::mpsc::Receiver<()>,
}

/// Where the upgrade asks a serving thread to pause; the thread looks at
/// every [`pause_point`](Self::pause_point) (at least every poll period).
#[derive(Default)]
pub(crate) struct PauseSlot {
    request: Mutex<Option<PauseRequest>>,
}

impl PauseSlot {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<PauseRequest>> {
        // An Option moved in and out whole: never torn.
        self.request.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the thread to pause and waits up to `timeout` for it.
    pub(crate) async fn freeze(&self, timeout: Duration) -> Result<FrozenVhost, String> {
        let (reply, paused) = oneshot::channel();
        let (resume, resumed) = std::sync::mpsc::channel();
        *self.slot() = Some(PauseRequest {
            reply,
            resume: resumed,
        });
        match tokio::time::timeout(timeout, paused).await {
            Ok(Ok((state, fds))) => Ok(FrozenVhost { state, fds, resume }),
            _ => {
                self.slot().take();
                Err(format!(
                    "the vhost-user thread did not pause within {timeout:?}"
                ))
            }
        }
    }

    /// If a pause was asked: describe what the thread serves and park
    /// until resumed (this process is gone by then if the upgrade
    /// succeeded).
    pub(super) fn pause_point(&self, describe: impl FnOnce(&mut Handover) -> VhostState) {
        let Some(request) = self.slot().take() else {
            return;
        };
        let mut fds = Handover::default();
        let state = describe(&mut fds);
        if request.reply.send((state, fds)).is_ok() {
            let _ = request.resume.recv();
            tracing::info!("vhost-user thread resumed after a failed upgrade");
        }
    }
}

/// The listening socket's part of the state.
pub(super) fn listening(
    polled: &UnixListener,
    facts: &DeviceFacts,
    connections: u64,
    fds: &mut Handover,
) -> VhostState {
    VhostState {
        device: facts.name.clone(),
        listener: fds.fd(polled),
        connections,
        connection: None,
    }
}

/// A link that does nothing: the handler `vhost` is replayed into before
/// the real one replaces it.
struct NoLink;

impl SessionLink for NoLink {
    fn attach(&mut self, _: VirtioAttachRequest, _: VirtioFds) -> Result<(), String> {
        Err("replaying the negotiation".into())
    }
    fn detach(&mut self) {}
    fn set_call(&mut self, _: u16, _: OwnedFd) -> Result<(), String> {
        Err("replaying the negotiation".into())
    }
    fn lost(&mut self) -> Option<String> {
        None
    }
}

/// `vhost`'s `FrontendReq` codes replayed.
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_PROTOCOL_FEATURES: u32 = 16;
/// Header flags: protocol version 1, no reply wanted.
const VERSION_1: u32 = 1;

/// The connection a previous binary served, rebuilt: our handler from the
/// state, `vhost`'s with the negotiation replayed into it over a private
/// socket, whose descriptor number then takes the VMM's socket (`dup2`),
/// so the VMM's next request reaches a handler in the state it left.
/// `attachment` is the device's session of this connection, if any.
pub(super) fn connection(
    state: &VhostConnState,
    attachment: Option<Attachment>,
    fds: &Adopted,
    facts: &DeviceFacts,
    device: &DeviceHandle,
) -> Result<Connection, SupervisorError> {
    let err = |why: String| SupervisorError::Runtime(format!("vhost-user connection: {why}"));
    let attached = attachment.is_some();
    let link = DeviceLink {
        device: device.clone(),
        attachment,
    };
    let adopted = VhostUserHandler::adopt(facts.clone(), state, fds, Box::new(link), attached)?;
    let handler = Arc::new(Mutex::new(VhostUserHandler::new(
        facts.clone(),
        state.frontend.clone(),
        Box::new(NoLink),
    )));
    let conn = replay(&handler, state.wire).map_err(err)?;
    *lock(&handler) = adopted;
    let vmm = fds.fd(state.socket)?;
    let at = conn.as_raw_fd();
    nix::unistd::dup2(vmm.as_raw_fd(), at).map_err(|e| err(format!("dup2: {e}")))?;
    // dup2 clears FD_CLOEXEC.
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(at, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|e| err(format!("cloexec: {e}")))?;
    Ok((conn, handler, state.frontend.clone()))
}

/// A `vhost` request handler on a private socket, told the negotiation
/// `wire` records (`GET_FEATURES`, `SET_FEATURES`,
/// `SET_PROTOCOL_FEATURES`, in that order: what it keeps of them is
/// recomputed from the last values at each).
fn replay(
    handler: &Arc<Mutex<VhostUserHandler>>,
    wire: WireFeatures,
) -> Result<BackendReqHandler<Mutex<VhostUserHandler>>, String> {
    let (ours, mut theirs) = UnixStream::pair().map_err(|e| e.to_string())?;
    let mut conn = BackendReqHandler::from_stream(ours, handler.clone());
    let mut request = |code: u32, value: Option<u64>| -> Result<(), String> {
        let size: u32 = if value.is_some() { 8 } else { 0 };
        let mut msg = Vec::with_capacity(20);
        msg.extend_from_slice(&code.to_le_bytes());
        msg.extend_from_slice(&VERSION_1.to_le_bytes());
        msg.extend_from_slice(&size.to_le_bytes());
        if let Some(v) = value {
            msg.extend_from_slice(&v.to_le_bytes());
        }
        theirs.write_all(&msg).map_err(|e| e.to_string())?;
        conn.handle_request()
            .map_err(|e| format!("replaying request {code}: {e}"))
    };
    if wire.features_asked {
        request(GET_FEATURES, None)?;
    }
    if let Some(features) = wire.acked {
        request(SET_FEATURES, Some(features))?;
    }
    if let Some(features) = wire.protocol {
        request(SET_PROTOCOL_FEATURES, Some(features))?;
    }
    Ok(conn)
}
