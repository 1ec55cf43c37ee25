//! vhost-user: a VMM's messages, with the fds it may attach, decoded by
//! `vhost` and handled by the supervisor's per-connection handler
//! (supervisor/src/vhost_user/handler.rs), under the serving loop's rules.
//!
//! Messages are mostly built from templates of the requests QEMU sends
//! (memory table, vring setup, features, in-flight region, config), with
//! fields perturbed, so that sessions get set up, attached and torn down;
//! some are raw bytes.

use std::io::{IoSlice, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use arbitrary::{Result, Unstructured};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use shadowback_supervisor::vhost_user_fuzzing::serve_stream;

/// Bytes of guest memory behind the memfd a `SET_MEM_TABLE` carries.
const GUEST: u64 = 0x10_0000;
/// The VMM's address of guest-physical 0.
const USER: u64 = 0x7f00_0000_0000;
/// Messages per input: bounds the replies the drain thread reads.
const MAX_MESSAGES: usize = 48;
const VERSION: u32 = 0x1;
const NEED_REPLY: u32 = 0x8;

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok((vmm, backend)) = UnixStream::pair() else {
        return;
    };
    let num_queues = u.int_in_range(1..=4).unwrap_or(1);
    let queue_size = *u.choose(&[1u16, 64, 256, 1024]).unwrap_or(&256);
    let mut sent = 0;
    while sent < MAX_MESSAGES && !u.is_empty() {
        let Ok((bytes, fds)) = message(&mut u) else {
            break;
        };
        let raw: Vec<_> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
        if sendmsg::<()>(
            vmm.as_raw_fd(),
            &[IoSlice::new(&bytes)],
            cmsgs,
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .is_err()
        {
            break;
        }
        sent += 1;
    }
    // The VMM hangs up after its last message; replies are drained (and
    // dropped) so that the handler never blocks writing them.
    let _ = vmm.shutdown(std::net::Shutdown::Write);
    let drain = std::thread::spawn(move || {
        let mut vmm = vmm;
        let mut buf = [0u8; 4096];
        while matches!(vmm.read(&mut buf), Ok(n) if n > 0) {}
    });
    serve_stream(backend, num_queues, queue_size, 4 * MAX_MESSAGES);
    let _ = drain.join();
}

fn eventfd() -> Option<OwnedFd> {
    EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .ok()
        .map(OwnedFd::from)
}

fn guest_memfd() -> Option<OwnedFd> {
    let fd = memfd_create(c"fuzz-guest", MemFdCreateFlag::MFD_CLOEXEC).ok()?;
    nix::unistd::ftruncate(&fd, GUEST as i64).ok()?;
    Some(fd)
}

fn header(request: u32, flags: u32, size: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(12 + size);
    b.extend_from_slice(&request.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&(size as u32).to_le_bytes());
    b
}

fn u32s(b: &mut Vec<u8>, vals: &[u32]) {
    for v in vals {
        b.extend_from_slice(&v.to_le_bytes());
    }
}

fn u64s(b: &mut Vec<u8>, vals: &[u64]) {
    for v in vals {
        b.extend_from_slice(&v.to_le_bytes());
    }
}

/// A small value most of the time, anything sometimes.
fn near(u: &mut Unstructured, usual: u64) -> Result<u64> {
    Ok(match u.int_in_range(0..=7)? {
        0 => u.arbitrary()?,
        1 => usual.wrapping_add(u.int_in_range(0..=0x1000)?),
        _ => usual,
    })
}

/// One message and the fds to attach to it.
fn message(u: &mut Unstructured) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut fds = Vec::new();
    let flags = VERSION | if u.ratio(1, 4)? { NEED_REPLY } else { 0 };
    let queue: u32 = u.int_in_range(0..=4)?;
    let q = u64::from(queue);
    let template = u.int_in_range(0..=16)?;
    let mut b = match template {
        // GET_FEATURES, SET_OWNER, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
        // GET_MAX_MEM_SLOTS, RESET_OWNER.
        0 => header(*u.choose(&[1, 3, 15, 17, 36, 4])?, flags, 0),
        // SET_FEATURES: VERSION_1, EVENT_IDX, PROTOCOL_FEATURES, …
        1 => {
            let mut b = header(2, flags, 8);
            let usual = (1u64 << 32) | (1 << 29) | (1 << 30) | (1 << 28);
            u64s(&mut b, &[near(u, usual)?]);
            b
        }
        // SET_PROTOCOL_FEATURES: MQ, REPLY_ACK, CONFIG, INFLIGHT, …
        2 => {
            let mut b = header(16, flags, 8);
            u64s(&mut b, &[near(u, 0x1 | 0x8 | 0x200 | 0x1000)?]);
            b
        }
        // SET_MEM_TABLE with one region backed by a memfd.
        3 => {
            let regions = u.int_in_range(0..=2)?;
            let mut b = header(5, flags, 8 + 32 * regions as usize);
            u32s(&mut b, &[regions, 0]);
            for r in 0..regions {
                let gpa = u64::from(r) * GUEST;
                u64s(
                    &mut b,
                    &[
                        near(u, gpa)?,
                        near(u, GUEST)?,
                        near(u, USER + gpa)?,
                        near(u, 0)?,
                    ],
                );
                fds.extend(guest_memfd());
            }
            b
        }
        // SET_VRING_NUM, SET_VRING_BASE, GET_VRING_BASE, SET_VRING_ENABLE.
        4 => {
            let (req, usual) = *u.choose(&[(8u32, 256u64), (10, 0), (11, 0), (18, 1)])?;
            let mut b = header(req, flags, 8);
            u32s(&mut b, &[queue, near(u, usual)? as u32]);
            b
        }
        // SET_VRING_ADDR inside the memory table.
        5 => {
            let base = USER + 0x1_0000 + q * 0x4000;
            let mut b = header(9, flags, 40);
            u32s(&mut b, &[queue, 0]);
            u64s(
                &mut b,
                &[
                    near(u, base)?,
                    near(u, base + 0x2000)?,
                    near(u, base + 0x1000)?,
                    0,
                ],
            );
            b
        }
        // SET_VRING_KICK / SET_VRING_CALL / SET_VRING_ERR with an eventfd
        // (or the "no fd" bit).
        6 => {
            let req = *u.choose(&[12u32, 13, 14])?;
            let nofd = u.ratio(1, 6)?;
            let mut b = header(req, flags, 8);
            u64s(&mut b, &[q | if nofd { 0x100 } else { 0 }]);
            if !nofd {
                fds.extend(eventfd());
            }
            b
        }
        // GET_CONFIG / SET_CONFIG: offset, size, flags, payload.
        7 => {
            let req = *u.choose(&[24u32, 25])?;
            let offset = near(u, 0)? as u32;
            let size = u.int_in_range(0..=64)?;
            let mut b = header(req, flags, 12 + size as usize);
            u32s(&mut b, &[offset, size, 0]);
            b.extend((0..size).map(|i| i as u8));
            b
        }
        // GET_INFLIGHT_FD / SET_INFLIGHT_FD: mmap_size, offset, queues, size.
        8 => {
            let req = *u.choose(&[31u32, 32])?;
            let mut b = header(req, flags, 24);
            u64s(&mut b, &[near(u, 0x1000)?, near(u, 0)?]);
            let nq = near(u, 1)? as u16;
            let qs = near(u, 256)? as u16;
            b.extend_from_slice(&nq.to_le_bytes());
            b.extend_from_slice(&qs.to_le_bytes());
            b.extend_from_slice(&[0; 4]);
            if req == 32 {
                fds.extend(guest_memfd());
            }
            b
        }
        // ADD_MEM_REG / REM_MEM_REG, SET_LOG_BASE, anything else.
        9 => {
            let req = *u.choose(&[37u32, 38, 6, 7, 20, 21, 22, 33, 35, 40, 41, 42])?;
            let size = u.int_in_range(0..=48)?;
            let mut b = header(req, flags, size);
            let mut body = vec![0u8; size];
            u.fill_buffer(&mut body)?;
            b.extend(body);
            if u.arbitrary()? {
                fds.extend(guest_memfd());
            }
            b
        }
        // A header whose size does not match its body, or raw bytes.
        10 => {
            let mut b = header(
                u.int_in_range(0..=45)?,
                u.arbitrary()?,
                u.arbitrary::<u16>()?.into(),
            );
            let n = u.int_in_range(0..=64)?;
            let mut body = vec![0u8; n];
            u.fill_buffer(&mut body)?;
            b.extend(body);
            b
        }
        _ => {
            let n = u.int_in_range(0..=96)?;
            let mut b = vec![0u8; n];
            u.fill_buffer(&mut b)?;
            if u.ratio(1, 4)? {
                fds.extend(eventfd());
            }
            b
        }
    };
    if b.is_empty() {
        b.push(0);
    }
    Ok((b, fds))
}
