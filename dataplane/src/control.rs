//! The control-channel pieces every loop answers alike: receiving a
//! message, the attach flags and the `attached` reply, fault injection
//! (docs/PROTOCOL.md).

use std::os::fd::OwnedFd;

use shadowback_xenbus::protocol::{key, kind, ErrorCode};
use shadowback_xenbus::{Message, SeqPacket, XenbusError};

use crate::event_loop::BackendError;
use crate::recovery::RecoveryStats;

/// The next control message; a closed channel means the supervisor is gone.
pub fn recv_control(control: &SeqPacket) -> Result<(Message, Vec<OwnedFd>), BackendError> {
    match control.recv() {
        Ok(m) => Ok(m),
        Err(XenbusError::Closed) => Err(BackendError::SupervisorGone),
        Err(e) => Err(control_err(e)),
    }
}

/// The flags of an `attach` or `attach-virtio`.
#[derive(Clone, Copy, Debug)]
pub struct AttachFlags {
    /// `recover=1`: a previous instance served this frontend; replay.
    pub recover: bool,
    /// `blame=0`: the previous instance was killed from outside (an
    /// operator fault), so this replay does not count against the requests
    /// in flight (the crash-loop breaker).
    pub blame: bool,
    /// `fence=1`: I/O of an earlier instance may still be in the kernel:
    /// hold back what it logged, and what conflicts with that, until
    /// `fenced` (docs/ARCHITECTURE.md §7.3).
    pub fence: bool,
}

impl AttachFlags {
    pub fn from_message(msg: &Message) -> Result<Self, (ErrorCode, String)> {
        let inval = |e: &dyn std::fmt::Display| (ErrorCode::Einval, e.to_string());
        Ok(AttachFlags {
            recover: msg
                .get_flag(key::RECOVER)
                .map_err(|e| inval(&e))?
                .unwrap_or(false),
            blame: msg
                .get_flag(key::BLAME)
                .map_err(|e| inval(&e))?
                .unwrap_or(true),
            fence: msg
                .get_flag(key::FENCE)
                .map_err(|e| inval(&e))?
                .unwrap_or(false),
        })
    }
}

/// The reply to an attach: `attached` with the recovery counters, or the
/// error.
pub fn attach_reply(result: Result<RecoveryStats, (ErrorCode, String)>) -> Message {
    match result {
        Ok(r) => Message::new(kind::ATTACHED)
            .with(key::GENERATION, r.generation)
            .with(key::REPLAYED, r.replayed)
            .with(key::REPUSHED, r.repushed)
            .with(key::POISONED, r.poisoned)
            .with(key::CORRUPT, r.corrupt)
            .with(key::REPLAY_US, r.replay_us)
            .with(
                key::MEMBARRIER,
                u8::from(crate::death::fencing_registered()),
            ),
        Err((code, why)) => Message::error(code, &sanitize(&why)),
    }
}

/// Fault-injection messages, answered alike by every loop; `None` for any
/// other message.
pub fn fault_injection(
    msg: &Message,
    device: &str,
    poison: &mut Vec<u64>,
    control: &SeqPacket,
) -> Option<Result<(), BackendError>> {
    match msg.kind() {
        kind::SPIN => {
            // A backend stuck in a busy loop, for the hang watchdog (it
            // stops the heartbeat like SIGSTOP, but burns a CPU while doing
            // so). No answer: the supervisor does not wait for one.
            tracing::warn!(device, "spinning forever (fault injection)");
            loop {
                std::hint::spin_loop();
            }
        }
        kind::SYSCALL => {
            // A confined backend does not return from this: the kernel
            // kills it with SIGSYS. No answer either way.
            tracing::warn!(device, "making a forbidden syscall (fault injection)");
            match crate::confine::forbidden_syscall() {
                Ok(()) => tracing::error!(device, "forbidden syscall allowed: not confined"),
                Err(e) => tracing::error!(device, error = %e, "forbidden syscall failed"),
            }
            Some(Ok(()))
        }
        kind::POISON => {
            let reply = match msg.require_u64(key::SECTOR) {
                Ok(sector) => {
                    tracing::warn!(device, sector, "sector poisoned (fault injection)");
                    poison.push(sector);
                    Message::new(kind::OK)
                }
                Err(e) => Message::error(ErrorCode::Einval, &sanitize(&e.to_string())),
            };
            Some(control.send(&reply, &[]).map_err(control_err))
        }
        _ => None,
    }
}

/// Fault injection: whether `[start, start + sectors)` covers a poisoned
/// sector.
pub fn poisoned(poison: &[u64], start: u64, sectors: u64) -> bool {
    poison
        .iter()
        .any(|&p| p >= start && p < start.saturating_add(sectors))
}

/// A closed control channel means the supervisor is gone: exit quietly.
pub fn control_err(e: XenbusError) -> BackendError {
    match e {
        XenbusError::Closed => BackendError::SupervisorGone,
        e => BackendError::Control(e),
    }
}

/// Message values are printable ASCII without newlines.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { ' ' })
        .take(200)
        .collect()
}

/// The answer to a control message this loop does not take: `EPROTO`,
/// logged.
pub fn refuse_unexpected(control: &SeqPacket, kind: &str) -> Result<(), BackendError> {
    tracing::warn!(kind, "unexpected control message");
    let reply = Message::error(ErrorCode::Eproto, "unexpected message");
    control.send(&reply, &[]).map_err(control_err)
}

/// `detached`, for a detach with nothing attached (`frontend` absent) or
/// once an attachment has let go of everything (`frontend` named).
pub fn send_detached(control: &SeqPacket, frontend: Option<&str>) -> Result<(), BackendError> {
    let mut msg = Message::new(kind::DETACHED);
    if let Some(name) = frontend {
        msg.set(key::FRONTEND, name);
    }
    control.send(&msg, &[]).map_err(control_err)
}
