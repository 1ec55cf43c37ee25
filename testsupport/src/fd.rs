//! eventfds and memfds, as a guest or VMM hands them over.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};

pub use nix::fcntl::SealFlag;
use nix::fcntl::{fcntl, FcntlArg};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

/// A close-on-exec eventfd with counter 0.
pub fn eventfd() -> OwnedFd {
    eventfd_with(EfdFlags::EFD_CLOEXEC)
}

/// A close-on-exec, non-blocking eventfd with counter 0.
pub fn nonblocking_eventfd() -> OwnedFd {
    eventfd_with(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
}

fn eventfd_with(flags: EfdFlags) -> OwnedFd {
    EventFd::from_value_and_flags(0, flags)
        .expect("eventfd")
        .into()
}

/// A close-on-exec memfd of `bytes` bytes that refuses seals.
pub fn memfd(bytes: u64) -> File {
    sealable_memfd(bytes, false)
}

/// A close-on-exec memfd of `bytes` bytes; `allow_sealing` sets
/// `MFD_ALLOW_SEALING`, so [`add_seals`] can seal it once it is filled.
pub fn sealable_memfd(bytes: u64, allow_sealing: bool) -> File {
    let mut flags = MemFdCreateFlag::MFD_CLOEXEC;
    if allow_sealing {
        flags |= MemFdCreateFlag::MFD_ALLOW_SEALING;
    }
    let file = File::from(memfd_create(c"shadowback-test", flags).expect("memfd_create"));
    file.set_len(bytes).expect("size memfd");
    file
}

/// A close-on-exec `MFD_HUGETLB` memfd of `bytes` bytes (a multiple of the
/// huge page size) with `seals`: creating and sizing it takes no huge page,
/// touching a page the pool cannot supply is `SIGBUS`.
pub fn hugetlbfs_memfd(bytes: u64, seals: SealFlag) -> File {
    let flags = MemFdCreateFlag::MFD_CLOEXEC
        | MemFdCreateFlag::MFD_ALLOW_SEALING
        | MemFdCreateFlag::MFD_HUGETLB;
    let file = File::from(memfd_create(c"shadowback-test-huge", flags).expect("MFD_HUGETLB"));
    file.set_len(bytes).expect("size hugetlbfs memfd");
    add_seals(&file, seals);
    file
}

/// Adds `seals` to a memfd made with `allow_sealing` (nothing when empty).
pub fn add_seals(file: &File, seals: SealFlag) {
    if !seals.is_empty() {
        fcntl(file.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals)).expect("seal memfd");
    }
}

/// A duplicate of fd `target` of process `pid` (`pidfd_getfd`): a
/// reference to its open file description that outlives the process, as
/// an in-flight io_uring request's does. Needs ptrace rights over it (the
/// tests run as root).
pub fn steal_fd(pid: u32, target: i32) -> OwnedFd {
    use rustix::process::{pidfd_getfd, pidfd_open, Pid, PidfdFlags, PidfdGetfdFlags};
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .expect("a process id");
    let pidfd = pidfd_open(pid, PidfdFlags::empty()).expect("pidfd_open");
    pidfd_getfd(&pidfd, target, PidfdGetfdFlags::empty()).expect("pidfd_getfd")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_counter(fd: &OwnedFd) -> nix::Result<u64> {
        let mut buf = [0u8; 8];
        nix::unistd::read(fd.as_raw_fd(), &mut buf)?;
        Ok(u64::from_ne_bytes(buf))
    }

    #[test]
    fn the_nonblocking_eventfd_does_not_block_when_empty() {
        let fd = nonblocking_eventfd();
        assert_eq!(read_counter(&fd), Err(nix::errno::Errno::EAGAIN));
    }

    #[test]
    fn the_eventfd_counts_what_is_written() {
        let fd = eventfd();
        nix::unistd::write(&fd, &2u64.to_ne_bytes()).unwrap();
        nix::unistd::write(&fd, &3u64.to_ne_bytes()).unwrap();
        assert_eq!(read_counter(&fd), Ok(5));
    }

    #[test]
    fn a_sealed_memfd_carries_its_seals_and_size() {
        let f = sealable_memfd(8192, true);
        add_seals(&f, SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW);
        assert_eq!(f.metadata().unwrap().len(), 8192);
        let seals =
            SealFlag::from_bits_truncate(fcntl(f.as_raw_fd(), FcntlArg::F_GET_SEALS).unwrap());
        assert!(seals.contains(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW));
        assert!(f.set_len(4096).is_err(), "shrinking a sealed memfd");
    }

    #[test]
    fn a_plain_memfd_refuses_seals() {
        let f = memfd(4096);
        assert!(fcntl(f.as_raw_fd(), FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_GROW)).is_err());
    }
}
