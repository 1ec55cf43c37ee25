//! The entry point of the `vhost_user` fuzz target (shadowback-fuzz,
//! docs/FUZZING.md): one VMM connection served by `vhost`'s request
//! decoder and [`VhostUserHandler`], with a device link that accepts every
//! session, under the rules of the real serving loop (a soft refusal keeps
//! the connection, any other error ends it). Not part of the supervisor's
//! API.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use shadowback_xenbus::virtio::{VirtioAttachRequest, VirtioFds};
use vhost::vhost_user::{BackendReqHandler, Error as VhostError};

use super::handler::{DeviceFacts, SessionLink, VhostUserHandler};
use super::{lock, BlkGeometry};
use crate::config::LimitsConfig;
use crate::limits::DeviceLimits;

/// A device that accepts every session and call fd.
struct AcceptAll;

impl SessionLink for AcceptAll {
    fn attach(&mut self, _req: VirtioAttachRequest, _fds: VirtioFds) -> Result<(), String> {
        Ok(())
    }
    fn detach(&mut self) {}
    fn set_call(&mut self, _queue: u16, _fd: OwnedFd) -> Result<(), String> {
        Ok(())
    }
    fn lost(&mut self) -> Option<String> {
        None
    }
}

/// Serves the VMM end `stream` until the connection ends (EOF or an error
/// that closes it) or `max_requests` requests were handled. The caller
/// writes the messages (and their fds) into the other end, closes it, and
/// drains the replies.
pub fn serve_stream(stream: UnixStream, num_queues: u16, queue_size: u16, max_requests: usize) {
    let facts = DeviceFacts {
        name: "fuzz".into(),
        model: Arc::new(BlkGeometry {
            sectors: 2048,
            readonly: false,
            discard: true,
            num_queues,
        }),
        queue_size,
        shadow: true,
        limits: DeviceLimits::new(&LimitsConfig::default()),
        log: DeviceFacts::new_log(),
    };
    let handler = Arc::new(Mutex::new(VhostUserHandler::new(
        facts,
        "fuzz-vmm".into(),
        Box::new(AcceptAll),
    )));
    let mut conn = BackendReqHandler::from_stream(stream, handler.clone());
    for _ in 0..max_requests {
        lock(&handler).take_soft_refusal();
        match conn.handle_request() {
            Ok(()) => {}
            Err(VhostError::Disconnected) => break,
            Err(_) if lock(&handler).take_soft_refusal() => {}
            Err(_) => break,
        }
    }
    lock(&handler).disconnect();
}
