//! A backend's death, visible and final at once (docs/ARCHITECTURE.md
//! §7.2).
//!
//! - [`announce_crashes`]: a panic, or a fatal signal the process can
//!   catch (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGTRAP), first
//!   sends the supervisor one `dying` message on the control socket, with
//!   one `write` (async-signal-safe, nothing allocated), then dies as it
//!   would have. The supervisor kills the instance and takes over without
//!   waiting for the kernel to finish the process's exit. SIGKILL and a
//!   seccomp violation (`SECCOMP_RET_KILL_PROCESS`) cannot be caught: those
//!   are seen when the process is gone, or at once when the supervisor sent
//!   the SIGKILL itself.
//! - [`register_for_fencing`]: registers the process for
//!   `MEMBARRIER_CMD_GLOBAL_EXPEDITED`, which lets the supervisor prove,
//!   right after it sent a SIGKILL, that the process runs no more
//!   instructions of its own: the barrier interrupts every CPU running it,
//!   and the return from that interrupt delivers the pending SIGKILL
//!   before any user instruction. `attached` says whether it worked
//!   ([`fencing_registered`]).

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::OnceLock;

use rustix::thread::{membarrier, membarrier_query, MembarrierCommand};
use shadowback_xenbus::protocol::kind;
use shadowback_xenbus::Message;

/// The control socket the note goes to; -1 until [`announce_crashes`].
static CONTROL_FD: AtomicI32 = AtomicI32::new(-1);
/// The encoded `dying` message, made before any handler can run.
static NOTE: OnceLock<Vec<u8>> = OnceLock::new();
/// Set once a note was sent: a panic that aborts sends one, not two.
static SENT: AtomicBool = AtomicBool::new(false);
/// [`register_for_fencing`] succeeded.
static REGISTERED: AtomicBool = AtomicBool::new(false);

/// The signals a crash raises that a handler can see.
const FATAL: [libc::c_int; 6] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGABRT,
    libc::SIGTRAP,
];

/// Sends the `dying` note once. Async-signal-safe: atomics and one
/// `write` of bytes encoded beforehand.
fn send_note() {
    if SENT.swap(true, Ordering::AcqRel) {
        return;
    }
    let fd = CONTROL_FD.load(Ordering::Acquire);
    let Some(note) = NOTE.get() else {
        return;
    };
    if fd < 0 {
        return;
    }
    // One datagram on the SOCK_SEQPACKET control socket; a full socket
    // or a closed peer only loses the note (the exit is seen anyway).
    // SAFETY: `note` is a live, immutable buffer of `note.len()` bytes
    // (a `OnceLock` is never cleared); `write` does not keep the pointer.
    #[allow(unsafe_code)]
    unsafe {
        libc::write(fd, note.as_ptr().cast(), note.len());
    }
}

extern "C" fn on_fatal_signal(sig: libc::c_int) {
    send_note();
    // SA_RESETHAND made the action the default again; the signal raised
    // here is blocked until the handler returns and then kills the
    // process as the first one would have. (Returning into `abort`
    // instead would make it call `rt_sigaction`, which the seccomp filter
    // answers with SIGSYS.) `raise` is `tgkill` on this process.
    // SAFETY: async-signal-safe; no memory is passed.
    #[allow(unsafe_code)]
    unsafe {
        libc::raise(sig);
    }
}

/// Makes a panic or a catchable fatal signal send the supervisor a
/// `dying` note on `control` before the process dies (module docs). Call
/// once, before the process serves anything.
pub fn announce_crashes(control: RawFd) {
    let Ok(note) = Message::new(kind::DYING).encode() else {
        return;
    };
    if NOTE.set(note).is_err() {
        return;
    }
    CONTROL_FD.store(control, Ordering::Release);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        send_note();
        previous(info);
    }));
    for sig in FATAL {
        // SAFETY: a zeroed `sigaction` is a valid value (empty mask, no
        // flags); the handler only calls async-signal-safe code
        // (`send_note`); SA_RESETHAND restores the default action before
        // it runs, so a second fault kills the process.
        #[allow(unsafe_code)]
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_fatal_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESETHAND;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(sig, &action, std::ptr::null_mut()) != 0 {
                tracing::warn!(sig, "cannot install the crash note's handler");
            }
        }
    }
}

/// Registers the process for the supervisor's
/// `MEMBARRIER_CMD_GLOBAL_EXPEDITED` (module docs); whether it did. Call
/// before the seccomp filter is applied.
pub fn register_for_fencing() -> bool {
    let supported = membarrier_query().contains_command(MembarrierCommand::GlobalExpedited);
    let ok = supported && membarrier(MembarrierCommand::RegisterGlobalExpedited).is_ok();
    REGISTERED.store(ok, Ordering::Release);
    ok
}

/// Whether [`register_for_fencing`] succeeded in this process.
pub fn fencing_registered() -> bool {
    REGISTERED.load(Ordering::Acquire)
}
