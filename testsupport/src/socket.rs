//! Stream sockets a test plays the hostile peer on.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Reads (and discards whatever comes) until the peer hangs up; fails,
/// naming `what`, if it has not within `timeout` of silence.
pub fn expect_hangup(sock: &mut UnixStream, timeout: Duration, what: &str) {
    sock.set_nonblocking(false).expect("blocking socket");
    sock.set_read_timeout(Some(timeout)).expect("read timeout");
    let mut buf = [0u8; 4096];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            // A signal for this process (SIGCHLD of some test's backend,
            // whose handler tokio installs) landed on this thread: a read
            // with SO_RCVTIMEO is not restarted after a handler, SA_RESTART
            // or not (signal(7)).
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("{what}: the peer did not hang up: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_peer_that_writes_then_closes_has_hung_up() {
        let (mut ours, mut theirs) = UnixStream::pair().unwrap();
        theirs.write_all(b"bye").unwrap();
        drop(theirs);
        expect_hangup(&mut ours, Duration::from_secs(5), "closed peer");
    }

    #[test]
    #[should_panic(expected = "silent peer: the peer did not hang up")]
    fn a_silent_open_peer_has_not() {
        let (mut ours, _theirs) = UnixStream::pair().unwrap();
        expect_hangup(&mut ours, Duration::from_millis(20), "silent peer");
    }
}
