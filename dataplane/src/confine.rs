//! Least privilege for a backend process (docs/ARCHITECTURE.md §1.1).
//!
//! Once a backend has its engine set up and its inherited fds open, and
//! before it reads anything a guest wrote, [`confine`] takes away what the
//! data path does not need, in this order:
//!
//! 1. resource limits: at most [`MAX_OPEN_FILES`] fds (soft and hard), no
//!    core dumps (a core would hold guest memory);
//! 2. every capability: effective, permitted, inheritable, ambient and
//!    the bounding set (a root backend keeps its uid, not its powers);
//! 3. `PR_SET_NO_NEW_PRIVS`;
//! 4. a seccomp filter ([`allowed_syscalls`]) whose every other syscall
//!    kills the whole process (`SECCOMP_RET_KILL_PROCESS`): the supervisor
//!    sees a backend killed by SIGSYS and recovers it like any crash.
//!
//! io_uring requests are not syscalls, so seccomp does not see them: the
//! engine's ring is restricted to the opcodes it uses
//! ([`crate::uring`]), and `io_uring_setup` and `io_uring_register` are
//! not in the filter, so no unrestricted ring can be made afterwards.

use std::collections::BTreeMap;
use std::io;

use rustix::process::{setrlimit, Resource, Rlimit};
use rustix::thread::{CapabilitySet, CapabilitySets};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Most fds a confined backend may hold: its rings, eventfds, guest
/// memory regions and logs take a few dozen at most. Past it, the attach
/// that needs more fails in that backend alone.
pub const MAX_OPEN_FILES: u64 = 1024;

/// Why a backend could not confine itself (it then refuses to run).
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("cannot set resource limit {what}")]
    Rlimit {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot drop capabilities")]
    Capabilities(#[source] io::Error),
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] io::Error),
    #[error("cannot build the seccomp filter")]
    Filter(#[source] seccompiler::BackendError),
    #[error("cannot install the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

/// Applies 1–4 above to the whole process; it must still be single-threaded
/// or have every thread it will ever have (the filter is synchronised to
/// all of them).
pub fn confine() -> Result<(), ConfineError> {
    confine_with(&filter()?)
}

/// A spare backend's confinement (docs/ARCHITECTURE.md §1.1, §7.5): 1–4
/// above, with a filter that also lets it do the two things adoption
/// needs — put its disk in its ring's table (`io_uring_register`, that
/// operation only) and install a further filter (`seccomp` and the
/// `prctl` that sets `no_new_privs`, which only ever narrow what it may
/// do). Returns [`Adopted`], which installs the backend's own filter on
/// top once the device is set up: filters stack, the stricter answer
/// wins, so from then on the spare may do exactly what a backend started
/// for the device may.
pub fn confine_spare() -> Result<Adopted, ConfineError> {
    let then = filter()?;
    confine_with(&build(spare_rules().map_err(ConfineError::Filter)?)?)?;
    Ok(Adopted { program: then })
}

/// The backend filter a confined spare installs once it has its device
/// ([`confine_spare`]); built beforehand, so installing it is one syscall.
pub struct Adopted {
    program: BpfProgram,
}

impl Adopted {
    /// Installs the backend's filter over the spare's.
    pub fn tighten(self) -> Result<(), ConfineError> {
        seccompiler::apply_filter_all_threads(&self.program).map_err(ConfineError::Install)
    }
}

fn confine_with(program: &BpfProgram) -> Result<(), ConfineError> {
    limit_resources()?;
    drop_capabilities()?;
    rustix::thread::set_no_new_privs(true).map_err(|e| ConfineError::NoNewPrivs(e.into()))?;
    seccompiler::apply_filter_all_threads(program).map_err(ConfineError::Install)?;
    tracing::debug!(
        syscalls = allowed_syscalls().len(),
        "confined: no capabilities, no_new_privs, seccomp filter"
    );
    Ok(())
}

fn limit_resources() -> Result<(), ConfineError> {
    let current = rustix::process::getrlimit(Resource::Nofile);
    let bound = |limit: Option<u64>| Some(limit.map_or(MAX_OPEN_FILES, |l| l.min(MAX_OPEN_FILES)));
    let nofile = Rlimit {
        current: bound(current.current),
        maximum: bound(current.maximum),
    };
    setrlimit(Resource::Nofile, nofile).map_err(|e| ConfineError::Rlimit {
        what: "RLIMIT_NOFILE",
        source: e.into(),
    })?;
    let none = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    setrlimit(Resource::Core, none).map_err(|e| ConfineError::Rlimit {
        what: "RLIMIT_CORE",
        source: e.into(),
    })
}

/// Empties every capability set. The bounding and ambient sets first:
/// emptying the bounding set needs `CAP_SETPCAP`, which the capset below
/// takes away. An unprivileged backend has nothing to drop; `EPERM` from
/// the bounding set then only means it already lacks `CAP_SETPCAP`.
fn drop_capabilities() -> Result<(), ConfineError> {
    let caps = |e: rustix::io::Errno| ConfineError::Capabilities(e.into());
    rustix::thread::clear_ambient_capability_set().map_err(caps)?;
    for bit in 0..64 {
        let cap = CapabilitySet::from_bits_retain(1 << bit);
        match rustix::thread::capability_is_in_bounding_set(cap) {
            Ok(true) => match rustix::thread::remove_capability_from_bounding_set(cap) {
                Ok(()) | Err(rustix::io::Errno::PERM) => {}
                Err(e) => return Err(caps(e)),
            },
            Ok(false) => {}
            // Past the kernel's last capability.
            Err(rustix::io::Errno::INVAL) => break,
            Err(e) => return Err(caps(e)),
        }
    }
    let empty = CapabilitySets {
        effective: CapabilitySet::empty(),
        permitted: CapabilitySet::empty(),
        inheritable: CapabilitySet::empty(),
    };
    rustix::thread::set_capabilities(None, empty).map_err(caps)
}

/// A syscall allowed only when argument `index` equals one of `values`.
type ArgRule = (i64, u8, &'static [u64]);

/// A rule that holds when argument `index` equals `value`.
fn arg_is(index: u8, value: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value,
    )?])
}

/// Rules that need more than a list of values: no executable memory,
/// signals only to this process (a panic's abort).
fn special_rules() -> Result<Vec<(i64, Vec<SeccompRule>)>, seccompiler::BackendError> {
    let no_exec = || {
        let prot = SeccompCondition::new(
            2,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )?;
        SeccompRule::new(vec![prot]).map(|r| vec![r])
    };
    let me = u64::from(std::process::id());
    Ok(vec![
        (libc::SYS_mmap, no_exec()?),
        (libc::SYS_mprotect, no_exec()?),
        (libc::SYS_tgkill, vec![arg_is(0, me)?]),
    ])
}

/// The syscalls a running backend makes, found with `strace -f` on every
/// path (Xen rings and vhost-user, block and net, recovery and replay,
/// standby promotion, detach and attach, kills, hangs and aborts), plus a
/// few the allocator and the standard library make on rarer paths.
pub fn allowed_syscalls() -> &'static [(i64, &'static str)] {
    &[
        // Guest memory and shadow logs (mapped per attach), the allocator;
        // `mmap` and `mprotect` only without PROT_EXEC (`argument_rules`).
        (libc::SYS_munmap, "munmap"),
        (libc::SYS_mremap, "mremap"),
        (libc::SYS_madvise, "madvise"),
        (libc::SYS_brk, "brk"),
        // The control channel, with fds (SCM_RIGHTS); eventfds; the wires.
        (libc::SYS_recvmsg, "recvmsg"),
        (libc::SYS_sendmsg, "sendmsg"),
        (libc::SYS_read, "read"),
        (libc::SYS_write, "write"),
        (libc::SYS_readv, "readv"),
        (libc::SYS_writev, "writev"),
        // A vif's device state area (a memfd the supervisor hands over).
        (libc::SYS_pread64, "pread64"),
        (libc::SYS_pwrite64, "pwrite64"),
        (libc::SYS_close, "close"),
        // Checks of what the supervisor hands over: region size and file
        // system, fd kind (`/proc/self/fd/N`), socket type.
        (libc::SYS_fstat, "fstat"),
        (libc::SYS_statx, "statx"),
        (libc::SYS_fstatfs, "fstatfs"),
        (libc::SYS_lseek, "lseek"),
        #[cfg(target_arch = "x86_64")]
        (libc::SYS_readlink, "readlink"),
        (libc::SYS_readlinkat, "readlinkat"),
        (libc::SYS_getsockopt, "getsockopt"),
        // Waiting: disk I/O and polls go through the (restricted) ring.
        (libc::SYS_io_uring_enter, "io_uring_enter"),
        #[cfg(target_arch = "x86_64")]
        (libc::SYS_poll, "poll"),
        (libc::SYS_ppoll, "ppoll"),
        (libc::SYS_futex, "futex"),
        (libc::SYS_clock_gettime, "clock_gettime"),
        (libc::SYS_sched_yield, "sched_yield"),
        // `HashMap` keys.
        (libc::SYS_getrandom, "getrandom"),
        // Signals, a panic's abort, the end.
        (libc::SYS_getpid, "getpid"),
        (libc::SYS_gettid, "gettid"),
        (libc::SYS_rt_sigreturn, "rt_sigreturn"),
        (libc::SYS_rt_sigprocmask, "rt_sigprocmask"),
        // A thread's exit takes down its stack-overflow handler stack.
        (libc::SYS_sigaltstack, "sigaltstack"),
        (libc::SYS_exit, "exit"),
        (libc::SYS_exit_group, "exit_group"),
    ]
}

/// Syscalls allowed only with some argument values.
fn argument_rules() -> &'static [ArgRule] {
    &[
        // Descriptor flags, and the seals of a guest region.
        (
            libc::SYS_fcntl,
            1,
            &[
                libc::F_GETFD as u64,
                libc::F_GETFL as u64,
                libc::F_SETFL as u64,
                libc::F_GET_SEALS as u64,
            ],
        ),
        // The checks that a wire fd is a TAP queue as the supervisor set
        // it up, the offloads the guest negotiated (TUNSETOFFLOAD, on
        // the vif's own TAP: it changes nothing of another interface),
        // and which of its queues the kernel may steer to (TUNSETQUEUE,
        // the queue pairs a virtio-net driver uses).
        (
            libc::SYS_ioctl,
            1,
            &[
                libc::TUNGETIFF,
                libc::TUNGETVNETHDRSZ,
                libc::TUNSETOFFLOAD,
                libc::TUNSETQUEUE,
                libc::FIONBIO,
            ],
        ),
    ]
}

/// The BPF program: [`allowed_syscalls`], [`argument_rules`] and
/// `special_rules` allowed, anything else kills the process. Built in the
/// process it will confine (`tgkill` names its pid).
pub fn filter() -> Result<BpfProgram, ConfineError> {
    build(rules().map_err(ConfineError::Filter)?)
}

/// A spare's rules: a backend's, and what adoption needs
/// ([`confine_spare`]).
fn spare_rules() -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut rules = rules()?;
    rules.insert(
        libc::SYS_io_uring_register,
        vec![arg_is(1, u64::from(crate::uring::SPARE_REGISTER_OP))?],
    );
    rules.insert(
        libc::SYS_seccomp,
        vec![arg_is(0, u64::from(libc::SECCOMP_SET_MODE_FILTER))?],
    );
    rules.insert(
        libc::SYS_prctl,
        vec![arg_is(0, libc::PR_SET_NO_NEW_PRIVS as u64)?],
    );
    Ok(rules)
}

fn rules() -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed_syscalls()
        .iter()
        .map(|&(nr, _)| (nr, Vec::new()))
        .collect();
    for &(nr, index, values) in argument_rules() {
        let alternatives = values
            .iter()
            .map(|&v| arg_is(index, v))
            .collect::<Result<Vec<_>, _>>()?;
        rules.insert(nr, alternatives);
    }
    rules.extend(special_rules()?);
    Ok(rules)
}

fn build(rules: BTreeMap<i64, Vec<SeccompRule>>) -> Result<BpfProgram, ConfineError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(ConfineError::Filter)?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )
    .map_err(ConfineError::Filter)?;
    BpfProgram::try_from(filter).map_err(ConfineError::Filter)
}

/// Makes a syscall no backend needs (`socket(AF_INET, SOCK_DGRAM)`), for
/// the `syscall` fault: a confined backend is killed by SIGSYS before it
/// returns; an unconfined one gets its socket, closes it and returns.
pub fn forbidden_syscall() -> io::Result<()> {
    let sock = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::DGRAM,
        None,
    )?;
    drop(sock);
    Ok(())
}
