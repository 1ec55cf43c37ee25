//! The hang watchdog (docs/ARCHITECTURE.md §7.2): a backend is hung when its
//! shadow-log heartbeat has not moved for the timeout while the guest has
//! work pending on the ring. An idle backend is never declared hung, even
//! a stopped one: killing it would gain the guest nothing.
//!
//! Time the backend could not have beaten is not held against it: time it
//! spent runnable but waiting for a CPU, and time it spent blocked in the
//! kernel (`D`, e.g. an io_uring submission waiting for the file system's
//! journal). The scheduler adds a wait to `run_delay` only when the wait
//! ends, so a thread still queued for a CPU shows no delay yet: a check that
//! finds it runnable (`R`) without having run since the previous check
//! credits the whole interval at once, and the `run_delay` that arrives
//! later for that wait is not credited twice. Without this a backend starved
//! by a loaded host was declared hung again and again, and the crash-loop
//! breaker, blaming the requests in flight, failed them. A stopped (`T`) or
//! spinning backend gets no such credit. A thread found runnable is not
//! judged (its current wait shows nowhere yet) until a check finds it not
//! runnable, or until it has used the timeout on a CPU without a beat.
//!
//! Pure logic, fed by the device task every [`CHECK_PERIOD`] with the
//! heartbeat it read from the log, what the ring says and a
//! [`SchedSample`] of the backend's main thread.

use std::time::{Duration, Instant};

/// How often the device task checks a serving backend.
pub const CHECK_PERIOD: Duration = Duration::from_millis(10);

/// Verdict of one check that found the backend hung.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hang {
    /// Start of the detection interval: the later of the heartbeat's last
    /// change and the first check that saw work pending.
    pub since: Instant,
    /// The check's sample found the main thread exiting: the backend died
    /// of a signal of its own and is still tearing down (a crash found
    /// late, not a hang).
    pub exiting: bool,
}

/// What the scheduler says of a backend's main thread at one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedSample {
    /// Total time spent on a CPU (`/proc/PID/task/PID/schedstat`, first
    /// field).
    pub run_time: Duration,
    /// Total time spent runnable, waiting for a CPU, counted when each wait
    /// ends (schedstat, second field).
    pub run_delay: Duration,
    /// Blocked in the kernel, uninterruptibly (state `D`).
    pub blocked: bool,
    /// Runnable (state `R`): on a CPU or queued for one.
    pub runnable: bool,
    /// Exiting: a zombie (`Z`, `X`) or flagged `PF_EXITING`. A process
    /// killed by a signal (`SIGABRT` of a crash point, a fault) has its
    /// main thread in this state while its other threads finish — the
    /// io_uring workers finishing the I/O they hold can take hundreds of
    /// milliseconds on a loaded host, during which its heartbeat does not
    /// move.
    pub exiting: bool,
}

/// `PF_EXITING` of `/proc/PID/stat`'s flags: the task is in `do_exit`.
const PF_EXITING: u64 = 0x4;

impl SchedSample {
    /// Reads `pid`'s main thread; `None` if it is gone or /proc says
    /// something unexpected (no credit is given then).
    pub fn read(pid: u32) -> Option<SchedSample> {
        let schedstat =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/schedstat")).ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/stat")).ok()?;
        Self::parse(&schedstat, &stat)
    }

    fn parse(schedstat: &str, stat: &str) -> Option<SchedSample> {
        let mut fields = schedstat.split_whitespace();
        let run_time: u64 = fields.next()?.parse().ok()?;
        let run_delay: u64 = fields.next()?.parse().ok()?;
        // `pid (comm) S ppid pgrp session tty tpgid flags ...`: comm may
        // hold spaces and parentheses.
        let mut after = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
        let state = after.next()?;
        let flags: u64 = after.nth(5).and_then(|f| f.parse().ok()).unwrap_or(0);
        Some(SchedSample {
            run_time: Duration::from_nanos(run_time),
            run_delay: Duration::from_nanos(run_delay),
            blocked: state == "D",
            runnable: state == "R",
            exiting: matches!(state, "Z" | "X") || flags & PF_EXITING != 0,
        })
    }
}

/// Heartbeat progress of one backend instance.
#[derive(Clone, Debug)]
pub struct Watchdog {
    timeout: Duration,
    last_beat: u64,
    last_change: Instant,
    pending_since: Option<Instant>,
    /// The previous check's time and sample.
    last_sample: Option<(Instant, SchedSample)>,
    /// Time since `last_change` the backend could not have beaten.
    excused: Duration,
    /// Waits credited while still in progress (runnable, not running),
    /// which `run_delay` has not counted yet.
    credited_ahead: Duration,
    /// CPU time the backend has used since `last_change`, as sampled.
    cpu: Duration,
}

impl Watchdog {
    /// Starts watching an instance whose heartbeat reads `beat` at `now`.
    pub fn new(timeout: Duration, now: Instant, beat: u64) -> Self {
        Watchdog {
            timeout,
            last_beat: beat,
            last_change: now,
            pending_since: None,
            last_sample: None,
            excused: Duration::ZERO,
            credited_ahead: Duration::ZERO,
            cpu: Duration::ZERO,
        }
    }

    /// One check at `now`: `beat` is the log's heartbeat, `pending` whether
    /// the shared ring has unanswered requests (`req_prod != rsp_prod`), or
    /// `None` when the ring cannot be read (never hung then); `sample` the
    /// backend's scheduling state now (`None`: no credit).
    pub fn check(
        &mut self,
        now: Instant,
        beat: u64,
        pending: Option<bool>,
        sample: Option<SchedSample>,
    ) -> Option<Hang> {
        // Since the last check: all of it if the thread is blocked in the
        // kernel now, or runnable and has not run (queued for a CPU all
        // along); otherwise the waits for a CPU that ended, less what was
        // credited while they were still going on. Waits credited ahead
        // are settled at every check, a beat's too: the wait that ends as
        // the thread gets the CPU to beat arrives in `run_delay` at that
        // check, and one left unsettled there would later swallow the
        // credit of as much real waiting.
        let mut ran = Duration::ZERO;
        let credit = match (self.last_sample, sample) {
            (Some((then, before)), Some(sample)) => {
                ran = sample.run_time.saturating_sub(before.run_time);
                let elapsed = now.saturating_duration_since(then);
                let waited = sample.run_delay.saturating_sub(before.run_delay);
                let settled = waited.min(self.credited_ahead);
                self.credited_ahead -= settled;
                if sample.blocked {
                    elapsed
                } else if sample.runnable && sample.run_time == before.run_time {
                    self.credited_ahead += elapsed;
                    elapsed
                } else {
                    // A wait that ended now may have begun before the last
                    // check, one that found the thread queued again after
                    // running (nothing credited then): bounded by the time
                    // not yet excused, not by this interval.
                    let unexcused = now
                        .saturating_duration_since(self.last_change)
                        .saturating_sub(self.excused);
                    (waited - settled).min(unexcused)
                }
            }
            _ => Duration::ZERO,
        };
        if beat != self.last_beat {
            self.last_beat = beat;
            self.last_change = now;
            self.excused = Duration::ZERO;
            self.cpu = Duration::ZERO;
        } else {
            self.excused += credit;
            self.cpu += ran;
        }
        self.last_sample = sample.map(|s| (now, s));
        if pending != Some(true) {
            self.pending_since = None;
            return None;
        }
        let pending_since = *self.pending_since.get_or_insert(now);
        let stalled = now.saturating_duration_since(self.last_change);
        // A thread found runnable is waiting for a CPU now, a wait that
        // began after it last ran and is not credited until it ends: it is
        // judged once it has had the CPU (sleeping, stopped or beating at a
        // later check), or once it has spent the timeout on a CPU without
        // beating (spinning).
        let judged = sample.is_none_or(|s| !s.runnable) || self.cpu >= self.timeout;
        (judged && stalled.saturating_sub(self.excused) >= self.timeout).then(|| Hang {
            since: self.last_change.max(pending_since),
            exiting: sample.is_some_and(|s| s.exiting),
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
            assert_eq!(
                w.check(ms(t0, t), beat, Some(true), None),
                None,
                "at {t} ms"
            );
        }
    }

    #[test]
    fn an_idle_stopped_backend_is_never_hung() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(TIMEOUT, t0, 1);
        for t in (10..10_000).step_by(10) {
            assert_eq!(w.check(ms(t0, t), 1, Some(false), None), None);
        }
        // Unreadable ring: cannot tell, so never hung either.
        assert_eq!(w.check(ms(t0, 20_000), 1, None, None), None);
    }

    #[test]
    fn a_stalled_busy_backend_is_hung_after_the_timeout() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(TIMEOUT, t0, 1);
        assert_eq!(w.check(ms(t0, 10), 2, Some(true), None), None);
        // Heartbeat last moved at 10 ms; work pending throughout.
        for t in (20..110).step_by(10) {
            assert_eq!(w.check(ms(t0, t), 2, Some(true), None), None, "at {t} ms");
        }
        let hang = w
            .check(ms(t0, 110), 2, Some(true), None)
            .expect("hung at 110 ms");
        assert_eq!(hang.since, ms(t0, 10));
    }

    #[test]
    fn work_arriving_at_a_long_stopped_backend_is_declared_at_once() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(TIMEOUT, t0, 5);
        for t in (10..5_000).step_by(10) {
            assert_eq!(w.check(ms(t0, t), 5, Some(false), None), None);
        }
        // The heartbeat stalled long ago; detection counts from the work.
        let hang = w.check(ms(t0, 5_000), 5, Some(true), None).expect("hung");
        assert_eq!(hang.since, ms(t0, 5_000));
    }

    #[test]
    fn pending_work_that_drains_resets_nothing_but_pending() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(TIMEOUT, t0, 0);
        assert_eq!(w.check(ms(t0, 50), 0, Some(true), None), None);
        assert_eq!(w.check(ms(t0, 60), 0, Some(false), None), None);
        // Stalled since 0, pending again from 120: hung, counted from 120.
        let hang = w.check(ms(t0, 120), 0, Some(true), None).expect("hung");
        assert_eq!(hang.since, ms(t0, 120));
        // A beat clears it.
        assert_eq!(w.check(ms(t0, 130), 1, Some(true), None), None);
    }

    #[test]
    fn a_wrapping_heartbeat_still_counts_as_progress() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(TIMEOUT, t0, u64::MAX);
        assert_eq!(w.check(ms(t0, 90), 0, Some(true), None), None);
        assert_eq!(w.check(ms(t0, 180), 0, Some(true), None), None);
        assert!(w.check(ms(t0, 190), 0, Some(true), None).is_some());
    }

    fn sample(run_delay_ms: u64, blocked: bool) -> Option<SchedSample> {
        Some(SchedSample {
            run_time: Duration::ZERO,
            run_delay: Duration::from_millis(run_delay_ms),
            blocked,
            runnable: false,
            exiting: false,
        })
    }

    /// Runnable (`R`), having run `run_time_ms` and waited `run_delay_ms`.
    fn runnable(run_time_ms: u64, run_delay_ms: u64) -> Option<SchedSample> {
        Some(SchedSample {
            run_time: Duration::from_millis(run_time_ms),
            run_delay: Duration::from_millis(run_delay_ms),
            blocked: false,
            runnable: true,
            exiting: false,
        })
    }

    #[test]
    fn a_thread_still_queued_for_a_cpu_is_not_hung_and_its_wait_counts_once() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(TIMEOUT, t0, 1);
        assert_eq!(w.check(ms(t0, 10), 1, Some(true), runnable(5, 0)), None);
        // Queued for 300 ms: it has not run, and `run_delay` shows nothing
        // until the wait ends.
        for t in (20..=310).step_by(10) {
            assert_eq!(
                w.check(ms(t0, t), 1, Some(true), runnable(5, 0)),
                None,
                "at {t} ms"
            );
        }
        // It runs, and the scheduler adds the 300 ms wait at once: credited
        // already, so not again. Spinning from here without a beat, and
        // runnable at every check, it is hung once it has spent 100 ms on
        // a CPU as sampled: 5 ms by 320 ms, then 10 ms in every 10.
        let mut t = 320;
        let mut run = 10;
        while w
            .check(ms(t0, t), 1, Some(true), runnable(run, 300))
            .is_none()
        {
            t += 10;
            run += 10;
            assert!(t < 1_000, "never declared hung");
        }
        assert_eq!(t, 420, "hung at {t} ms");
    }

    /// No credit, and hung once its sampled CPU time reaches the timeout:
    /// the first 10 ms come before the first sample.
    #[test]
    fn a_spinning_backend_gets_no_credit() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(TIMEOUT, t0, 1);
        for t in (10..=100).step_by(10) {
            assert_eq!(w.check(ms(t0, t), 1, Some(true), runnable(t, 0)), None);
        }
        assert!(w
            .check(ms(t0, 110), 1, Some(true), runnable(110, 0))
            .is_some());
    }

    /// Seen at load 30 once the credit was settled: 100 ms after the last
    /// check (the supervisor starved too), the thread has run 0.3 ms, 20
    /// ms of waiting ended, and it is runnable again — queued since it
    /// last ran, a wait no counter shows yet. Not judged while queued; it
    /// is once found asleep without a beat.
    #[test]
    fn a_thread_queued_again_since_it_last_ran_is_judged_once_it_has_run() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(TIMEOUT, t0, 1);
        assert_eq!(
            w.check(ms(t0, 10), 2, Some(true), runnable(50, 6_000)),
            None
        );
        let queued = |run_us: u64, delay_ms: u64| {
            Some(SchedSample {
                run_time: Duration::from_micros(50_000 + run_us),
                ..runnable(0, delay_ms).unwrap()
            })
        };
        assert_eq!(w.check(ms(t0, 20), 2, Some(true), queued(0, 6_000)), None);
        assert_eq!(
            w.check(ms(t0, 120), 2, Some(true), queued(300, 6_020)),
            None
        );
        assert_eq!(
            w.check(ms(t0, 200), 2, Some(true), queued(600, 6_040)),
            None
        );
        // Asleep with work pending and no beat: its own time counts now.
        let asleep = Some(SchedSample {
            runnable: false,
            ..queued(900, 6_060).unwrap()
        });
        assert!(w.check(ms(t0, 210), 2, Some(true), asleep).is_some());
    }

    #[test]
    fn time_spent_waiting_for_a_cpu_is_not_a_hang() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(TIMEOUT, t0, 1);
        // Starved: of every 10 ms, 8 are spent runnable but not running.
        for (i, t) in (10..300).step_by(10).enumerate() {
            let delay = 8 * (i as u64 + 1);
            assert_eq!(
                w.check(ms(t0, t), 1, Some(true), sample(delay, false)),
                None,
                "at {t} ms"
            );
        }
        // The first 10 ms (no sample before them) and 2 ms of every 10
        // after count: hung once 100 ms of them have passed, at 460 ms.
        let mut t = 300;
        let mut delay = 8 * 30;
        while w
            .check(ms(t0, t), 1, Some(true), sample(delay, false))
            .is_none()
        {
            t += 10;
            delay += 8;
            assert!(t < 600, "never declared hung");
        }
        assert_eq!(t, 460, "hung at {t} ms");
    }

    #[test]
    fn time_blocked_in_the_kernel_is_not_a_hang_but_a_stopped_backend_is() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(TIMEOUT, t0, 1);
        for t in (10..1_000).step_by(10) {
            assert_eq!(
                w.check(ms(t0, t), 1, Some(true), sample(0, true)),
                None,
                "at {t} ms"
            );
        }
        // Out of the kernel at 1 s, still no beat: hung once 100 ms count
        // (the first 10 ms, unsampled, and everything from 990 ms on).
        for t in (1_000..1_080).step_by(10) {
            assert_eq!(
                w.check(ms(t0, t), 1, Some(true), sample(0, false)),
                None,
                "at {t} ms"
            );
        }
        assert!(w
            .check(ms(t0, 1_100), 1, Some(true), sample(0, false))
            .is_some());
        // A stopped (or spinning) one gets no credit.
        let mut w = Watchdog::new(TIMEOUT, t0, 1);
        for t in (10..100).step_by(10) {
            assert_eq!(w.check(ms(t0, t), 1, Some(true), sample(0, false)), None);
        }
        assert!(w
            .check(ms(t0, 100), 1, Some(true), sample(0, false))
            .is_some());
    }

    #[test]
    fn a_beat_clears_the_credit() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(TIMEOUT, t0, 1);
        assert_eq!(w.check(ms(t0, 10), 1, Some(true), sample(0, false)), None);
        assert_eq!(w.check(ms(t0, 90), 1, Some(true), sample(80, false)), None);
        // A beat at 100 ms; credit earned before it does not carry over.
        assert_eq!(w.check(ms(t0, 100), 2, Some(true), sample(80, false)), None);
        assert!(w
            .check(ms(t0, 200), 2, Some(true), sample(80, false))
            .is_some());
    }

    /// Seen at load 30: a starved backend, its waits for a CPU credited
    /// ahead, beats; the `run_delay` reporting those waits arrives at the
    /// check that sees the beat. Settled there, it leaves nothing to
    /// swallow the waits that follow: a backend that gets 1 ms of CPU in
    /// every 10 and beats no more is hung only once 100 ms of its own time
    /// have passed.
    #[test]
    fn waits_credited_ahead_are_settled_by_the_check_that_sees_a_beat() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(TIMEOUT, t0, 1);
        assert_eq!(w.check(ms(t0, 10), 1, Some(true), runnable(5, 0)), None);
        // Queued for a CPU from 10 to 90 ms, credited as it goes.
        for t in (20..=90).step_by(10) {
            assert_eq!(w.check(ms(t0, t), 1, Some(true), runnable(5, 0)), None);
        }
        // It ran and beat: the 80 ms wait shows up now.
        assert_eq!(w.check(ms(t0, 100), 2, Some(true), runnable(6, 80)), None);
        // Then 1 ms on a CPU and 9 ms waiting for one, every 10 ms.
        let (mut t, mut run, mut delay) = (100, 6, 80);
        loop {
            t += 10;
            run += 1;
            delay += 9;
            if w.check(ms(t0, t), 2, Some(true), runnable(run, delay))
                .is_some()
            {
                break;
            }
            assert!(t < 2_000, "never declared hung");
        }
        // 1 ms of every 10 counts: 100 ms of them after 1 s.
        assert_eq!(t, 1_100, "hung at {t} ms");
    }

    /// A check 100 ms after the last finds the thread queued again after
    /// running, 80 ms into a wait; 10 ms later the wait has ended (89 ms in
    /// all), it ran and sleeps. The whole wait counts, not the 10 ms since
    /// the last check.
    #[test]
    fn a_wait_that_began_before_the_last_check_counts_whole() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(TIMEOUT, t0, 1);
        assert_eq!(w.check(ms(t0, 10), 2, Some(true), runnable(10, 0)), None);
        assert_eq!(w.check(ms(t0, 110), 2, Some(true), runnable(30, 0)), None);
        let asleep = Some(SchedSample {
            runnable: false,
            ..runnable(31, 89).unwrap()
        });
        assert_eq!(w.check(ms(t0, 120), 2, Some(true), asleep), None);
    }

    #[test]
    fn a_hang_verdict_says_whether_the_backend_was_exiting() {
        let t0 = Instant::now();
        let at = |exiting| {
            let mut w = Watchdog::new(TIMEOUT, t0, 1);
            let s = Some(SchedSample {
                exiting,
                ..sample(0, false).unwrap()
            });
            assert_eq!(w.check(ms(t0, 10), 1, Some(true), s), None);
            w.check(ms(t0, 120), 1, Some(true), s)
        };
        assert_eq!(at(false).map(|h| h.exiting), Some(false));
        assert_eq!(at(true).map(|h| h.exiting), Some(true));
    }

    #[test]
    fn proc_samples_parse() {
        let s = SchedSample::parse(
            "123 456000000 7\n",
            "42 (shadow (x) y) D 1 42 42 0 -1 4194560",
        )
        .unwrap();
        assert_eq!(
            s,
            SchedSample {
                run_time: Duration::from_nanos(123),
                run_delay: Duration::from_millis(456),
                blocked: true,
                runnable: false,
                // 4194560 = PF_SUPERPRIV | PF_RANDOMIZE: not exiting.
                exiting: false,
            }
        );
        let s = SchedSample::parse("1 2 3", "42 (b) S 1").unwrap();
        assert!(!s.blocked && !s.runnable);
        assert!(SchedSample::parse("1 2 3", "42 (b) R 1").unwrap().runnable);
        // A zombie main thread, or one in do_exit (PF_EXITING), is exiting.
        assert!(SchedSample::parse("1 2 3", "42 (b) Z 1").unwrap().exiting);
        let dying = SchedSample::parse("1 2 3", "42 (b) S 1 42 42 0 -1 4194372").unwrap();
        assert!(dying.exiting && !dying.runnable);
        assert!(!SchedSample::parse("1 2 3", "42 (b) S 1").unwrap().exiting);
        assert_eq!(SchedSample::parse("1", "42 (b) S 1"), None);
        assert_eq!(SchedSample::parse("1 2", "42 b S"), None);
        // This process, for real.
        let me = SchedSample::read(std::process::id()).expect("own schedstat");
        assert!(!me.blocked && !me.exiting);
    }
}
