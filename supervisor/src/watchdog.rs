//! The hang watchdog (docs/ARCHITECTURE.md §7.2): a backend is hung when its
//! shadow-log heartbeat has not moved for the timeout while the guest has
//! work pending on the ring. An idle backend is never declared hung, even
//! a stopped one: killing it would gain the guest nothing.
//!
//! Pure logic, fed by the device task every [`CHECK_PERIOD`] with the
//! heartbeat it read from the log and what the ring says.

use std::time::{Duration, Instant};

/// How often the device task checks a serving backend.
pub const CHECK_PERIOD: Duration = Duration::from_millis(10);

/// Verdict of one check that found the backend hung.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hang {
    /// Start of the detection interval: the later of the heartbeat's last
    /// change and the first check that saw work pending.
    pub since: Instant,
}

/// Heartbeat progress of one backend instance.
#[derive(Clone, Debug)]
pub struct Watchdog {
    timeout: Duration,
    last_beat: u64,
    last_change: Instant,
    pending_since: Option<Instant>,
}

impl Watchdog {
    /// Starts watching an instance whose heartbeat reads `beat` at `now`.
    pub fn new(timeout: Duration, now: Instant, beat: u64) -> Self {
        Watchdog {
            timeout,
            last_beat: beat,
            last_change: now,
            pending_since: None,
        }
    }

    /// One check at `now`: `beat` is the log's heartbeat, `pending` whether
    /// the shared ring has unanswered requests (`req_prod != rsp_prod`), or
    /// `None` when the ring cannot be read (never hung then).
    pub fn check(&mut self, now: Instant, beat: u64, pending: Option<bool>) -> Option<Hang> {
        if beat != self.last_beat {
            self.last_beat = beat;
            self.last_change = now;
        }
        if pending != Some(true) {
            self.pending_since = None;
            return None;
        }
        let pending_since = *self.pending_since.get_or_insert(now);
        (now.saturating_duration_since(self.last_change) >= self.timeout).then(|| Hang {
            since: self.last_change.max(pending_since),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(100);

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    #[test]
    fn a_beating_backend_is_never_hung() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(TIMEOUT, t0, 7);
        for (i, t) in (10..2_000).step_by(10).enumerate() {
            // Beats every 20 ms, always busy.
            let beat = 7 + (i as u64) / 2;
            assert_eq!(w.check(ms(t0, t), beat, Some(true)), None, "at {t} ms");
        }
    }

    #[test]
    fn an_idle_stopped_backend_is_never_hung() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(TIMEOUT, t0, 1);
        for t in (10..10_000).step_by(10) {
            assert_eq!(w.check(ms(t0, t), 1, Some(false)), None);
        }
        // Unreadable ring: cannot tell, so never hung either.
        assert_eq!(w.check(ms(t0, 20_000), 1, None), None);
    }

    #[test]
    fn a_stalled_busy_backend_is_hung_after_the_timeout() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(TIMEOUT, t0, 1);
        assert_eq!(w.check(ms(t0, 10), 2, Some(true)), None);
        // Heartbeat last moved at 10 ms; work pending throughout.
        for t in (20..110).step_by(10) {
            assert_eq!(w.check(ms(t0, t), 2, Some(true)), None, "at {t} ms");
        }
        let hang = w.check(ms(t0, 110), 2, Some(true)).expect("hung at 110 ms");
        assert_eq!(hang.since, ms(t0, 10));
    }

    #[test]
    fn work_arriving_at_a_long_stopped_backend_is_declared_at_once() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(TIMEOUT, t0, 5);
        for t in (10..5_000).step_by(10) {
            assert_eq!(w.check(ms(t0, t), 5, Some(false)), None);
        }
        // The heartbeat stalled long ago; detection counts from the work.
        let hang = w.check(ms(t0, 5_000), 5, Some(true)).expect("hung");
        assert_eq!(hang.since, ms(t0, 5_000));
    }

    #[test]
    fn pending_work_that_drains_resets_nothing_but_pending() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(TIMEOUT, t0, 0);
        assert_eq!(w.check(ms(t0, 50), 0, Some(true)), None);
        assert_eq!(w.check(ms(t0, 60), 0, Some(false)), None);
        // Stalled since 0, pending again from 120: hung, counted from 120.
        let hang = w.check(ms(t0, 120), 0, Some(true)).expect("hung");
        assert_eq!(hang.since, ms(t0, 120));
        // A beat clears it.
        assert_eq!(w.check(ms(t0, 130), 1, Some(true)), None);
    }

    #[test]
    fn a_wrapping_heartbeat_still_counts_as_progress() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(TIMEOUT, t0, u64::MAX);
        assert_eq!(w.check(ms(t0, 90), 0, Some(true)), None);
        assert_eq!(w.check(ms(t0, 180), 0, Some(true)), None);
        assert!(w.check(ms(t0, 190), 0, Some(true)).is_some());
    }
}
