//! Polling until something a test cannot be notified of holds.

use std::fmt::Debug;
use std::time::{Duration, Instant};

/// How often the helpers look again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Polls `predicate` until it holds; panics naming `what` after `timeout`.
pub fn wait_for(timeout: Duration, what: &str, mut predicate: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !predicate() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Samples with `sample` until `accept` holds for a sample, and returns
/// that one; panics after `timeout` showing `what` and the last sample.
pub fn wait_for_state<T: Debug>(
    timeout: Duration,
    what: &str,
    mut sample: impl FnMut() -> T,
    accept: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let s = sample();
        if accept(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s:#?}"
        );
        std::thread::sleep(POLL_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_for_returns_once_the_predicate_holds() {
        let mut calls = 0;
        wait_for(Duration::from_secs(5), "the third call", || {
            calls += 1;
            calls == 3
        });
        assert_eq!(calls, 3);
    }

    #[test]
    #[should_panic(expected = "timed out after")]
    fn wait_for_panics_after_the_timeout() {
        wait_for(Duration::from_millis(20), "never", || false);
    }

    #[test]
    fn wait_for_state_returns_the_accepted_sample() {
        let mut n = 0u32;
        let got = wait_for_state(
            Duration::from_secs(5),
            "n > 4",
            || {
                n += 1;
                n
            },
            |&n| n > 4,
        );
        assert_eq!(got, 5);
    }

    #[test]
    #[should_panic(expected = "timed out waiting for a miracle: 7")]
    fn wait_for_state_shows_the_last_sample() {
        wait_for_state(Duration::from_millis(20), "a miracle", || 7, |_| false);
    }
}
