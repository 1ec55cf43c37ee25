//! Recovery of a device whose backend instance failed
//! (docs/ARCHITECTURE.md §7): fence the instance, then let the standby (or
//! a cold-started instance) take the session over and replay its logs.
//!
//! When the class holds back (a disk) and the dead instance can be
//! proven stopped at once ([`Instance::stop`]), the fence — the exit, the
//! reap, the wait for its last I/O — runs in the background: the next
//! instance attaches with `fence=1`, serves what does not conflict with the
//! dead instance's requests, and is sent `fenced` once every earlier
//! instance's fence is down (§7.3).

use std::time::{Duration, Instant};

use shadowback_xenbus::protocol::{key, kind, ErrorCode};
use shadowback_xenbus::Message;

use super::handle::Lost;
use super::task::{refusal, send_attach, DeviceTask};
use super::Refusal;
use crate::instance::{Fenced, Instance, NoAnswer};
use crate::stats::{micros, RecoveryTimes};
use crate::SupervisorError;

/// Takeovers in a row that may fail (the new instance dies, hangs or
/// refuses) before the guest is disconnected. A request that kills every
/// instance costs two (the crash-loop breaker fails it in the third
/// replaying instance), so five leave room for one more failure.
pub const MAX_FAILED_TAKEOVERS: u32 = 5;
/// An idle instance that dies younger than this died "at start-up".
const STABLE_AGE: Duration = Duration::from_secs(1);
/// Start-up deaths in a row after which the device is given up, rather
/// than forking backends that cannot run in a loop.
const MAX_STARTUP_DEATHS: u32 = 5;

/// How long a given-up device refuses attaches before the next one gets a
/// fresh start: a frontend that makes every backend fail (memory it
/// truncates or seals after connecting) costs at most one round of
/// takeovers per second.
pub const FRESH_START_AFTER: Duration = Duration::from_secs(1);

/// Why and when the supervisor gave up on a device.
#[derive(Debug)]
pub(super) struct GivenUp {
    pub(super) why: String,
    pub(super) at: Instant,
}

impl GivenUp {
    /// How much longer, at `now`, attaches are refused.
    fn hold_off(&self, now: Instant) -> Duration {
        FRESH_START_AFTER.saturating_sub(now.saturating_duration_since(self.at))
    }
}

/// How a failed instance failed.
#[derive(Clone, Copy, Debug)]
pub(super) enum Failure {
    /// It exited or closed its control channel.
    Crashed,
    /// The watchdog (or a request) found it stuck since `since`.
    Hung { since: Instant },
    /// The watchdog found it stuck since `since`, and dying: its main
    /// thread already exiting (killed by a signal of its own, its other
    /// threads still finishing) or its crash note queued. A crash, found
    /// by the watchdog (docs/ARCHITECTURE.md §7.2).
    Died { since: Instant },
}

impl Failure {
    pub(super) fn of(no_answer: &NoAnswer, asked: Instant) -> Self {
        match no_answer {
            NoAnswer::Died(_) => Failure::Crashed,
            NoAnswer::Hung(_) => Failure::Hung { since: asked },
        }
    }
}
/// Keys of a vif's `attached` (docs/PROTOCOL.md §6c).
const KEY_TX_REPLAYED: &str = "tx-replayed";
const KEY_TX_MAYBE_DUPLICATED: &str = "tx-maybe-duplicated";
const KEY_RX_BUFFERS_RECOVERED: &str = "rx-buffers-recovered";
const KEY_RX_DROPPED_IN_CRASH: &str = "rx-dropped-in-crash";

/// The replay report of an `attached` answer.
#[derive(Debug, Default)]
pub(super) struct ReplayReport {
    pub(super) generation: u64,
    pub(super) replayed: u64,
    pub(super) repushed: u64,
    pub(super) poisoned: u64,
    pub(super) corrupt: u64,
    pub(super) replay_us: u64,
    /// A vif's recovery (docs/PROTOCOL.md §6c); 0 for a disk.
    pub(super) tx_replayed: u64,
    pub(super) tx_maybe_duplicated: u64,
    pub(super) rx_buffers_recovered: u64,
    pub(super) rx_dropped_in_crash: u64,
}

impl ReplayReport {
    pub(super) fn of(reply: &Message) -> Self {
        let n = |k| reply.get_u64(k).ok().flatten().unwrap_or(0);
        ReplayReport {
            generation: n(key::GENERATION),
            replayed: n(key::REPLAYED),
            repushed: n(key::REPUSHED),
            poisoned: n(key::POISONED),
            corrupt: n(key::CORRUPT),
            replay_us: n(key::REPLAY_US),
            tx_replayed: n(KEY_TX_REPLAYED),
            tx_maybe_duplicated: n(KEY_TX_MAYBE_DUPLICATED),
            rx_buffers_recovered: n(KEY_RX_BUFFERS_RECOVERED),
            rx_dropped_in_crash: n(KEY_RX_DROPPED_IN_CRASH),
        }
    }
}
impl DeviceTask {
    /// A spare of the pool, adopted, else a cold-started instance; `true`
    /// when it is a spare.
    pub(super) async fn next_instance(&mut self) -> Result<(Instance, bool), SupervisorError> {
        if let Some(spare) = self.adopt_spare().await {
            return Ok((spare, true));
        }
        Ok((self.start_instance()?, false))
    }

    /// The current instance failed: fence it (docs/ARCHITECTURE.md §7.3), then take
    /// over the attachment, or just replace an idle backend.
    pub(super) async fn on_failure(&mut self, failure: Failure) {
        let seen = Instant::now();
        let Some(old) = self.current.take() else {
            return;
        };
        self.watchdog = None;
        let injected = self.injected_kill.take();
        let injected_hang = std::mem::take(&mut self.injected_hang);
        // The crash-loop breaker (docs/ARCHITECTURE.md §7.5) counts the
        // instances a request killed; a kill or hang we injected ourselves
        // says nothing about the requests in flight.
        self.blame =
            injected.is_none() && !(injected_hang && matches!(failure, Failure::Hung { .. }));
        // An injected SIGKILL explains a stalled heartbeat: the process is
        // still exiting (io_uring teardown waits for its in-flight I/O).
        let failure = if injected.is_some() {
            Failure::Crashed
        } else {
            failure
        };
        let pid = old.pid();
        let age = old.age();
        let held = old.held;
        let detect = match (failure, injected) {
            (Failure::Hung { since } | Failure::Died { since }, _) => {
                seen.saturating_duration_since(since)
            }
            (Failure::Crashed, Some(kill)) => seen.saturating_duration_since(kill),
            (Failure::Crashed, None) => seen.elapsed(),
        };
        match failure {
            Failure::Crashed | Failure::Died { .. } => self.publish_with(|s| s.crashes += 1),
            Failure::Hung { .. } => self.publish_with(|s| s.hangs += 1),
        }
        // One fence in the background at a time: an instance that dies
        // while it still holds requests back is fenced, with the earlier
        // one, before its successor takes over — which then replays at
        // once. Without that, kills coming faster than fences would keep
        // the held requests from ever running. It still holds them when it
        // was never sent `fenced`, also when the fence it waited for is
        // done and its `Event::Fenced` was not handled yet (the kill won
        // the main loop's select): then its successor must not hold them
        // back again either.
        let fence_first = held || self.fencing.as_ref().is_some_and(|f| !f.is_finished());
        if !fence_first {
            self.await_fences().await;
        }
        if !fence_first && self.recoverable() && self.class.holds_back() {
            let stopping = Instant::now();
            if old.stop() {
                // docs/ARCHITECTURE.md §7.3: it runs no more instructions;
                // its I/O is fenced in the background while the next
                // instance serves what does not conflict with it.
                let fence = stopping.elapsed();
                tracing::error!(
                    device = %self.name, pid, ?failure, held,
                    detect_us = micros(detect), stop_us = micros(fence),
                    "backend failed: stopped, I/O fenced in the background"
                );
                self.fence_in_background(old);
                self.take_over(seen, detect, fence).await;
                return;
            }
        }
        let fenced = old.fence().await;
        self.publish_with(|s| s.last_failure = Some(fenced.status.clone()));
        let fence = fenced.io_done.saturating_duration_since(fenced.kill_sent);
        let io_wait = fenced.io_done.saturating_duration_since(fenced.reaped);
        tracing::error!(
            device = %self.name, pid, ?failure, held, status = %fenced.status,
            detect_us = micros(detect), fence_us = micros(fence), io_wait_us = micros(io_wait),
            "backend failed"
        );
        if self.recoverable() {
            // Every earlier fence too: the next instance holds nothing back.
            self.await_fences().await;
            self.take_over(seen, detect, fence).await;
            return;
        }
        if self.attached.as_ref().is_some_and(|a| a.lost.is_some()) {
            // No shadow layer: nothing to replay from.
            self.lose(Lost::BackendDied(format!(
                "backend {pid} {}",
                fenced.status
            )));
        }
        // Nothing to take over (no frontend attached, or no shadow log):
        // the device only gets a new idle backend.
        // A kill we injected says nothing about the backend starting up
        // badly: it must not count towards giving the device up.
        let age = if injected.is_some() { STABLE_AGE } else { age };
        self.replace_idle(age).await;
        // Counted with the new backend in place: counted before it, a
        // `status` read while it started showed the replacement done and
        // no backend (`a_kill_between_two_sessions_replaces_the_idle_backend`
        // under load).
        self.publish_with(|s| s.idle_replacements += 1);
    }

    /// Gives the device a new, unattached backend.
    async fn replace_idle(&mut self, dead_age: Duration) {
        if dead_age >= STABLE_AGE {
            self.startup_deaths = 0;
        } else {
            self.startup_deaths += 1;
        }
        if self.startup_deaths >= MAX_STARTUP_DEATHS {
            self.give_up(format!(
                "{} backends in a row died at start-up",
                self.startup_deaths
            ))
            .await;
            return;
        }
        match self.next_instance().await {
            Ok((instance, _)) => self.current = Some(instance),
            Err(e) => tracing::error!(device = %self.name, error = %e, "cannot start a backend"),
        }
        self.ensure_standby();
    }

    /// docs/ARCHITECTURE.md §7.5: a fresh instance attaches with `recover=1` and
    /// replays the log; on failure, fence it and try the next, up to
    /// [`MAX_FAILED_TAKEOVERS`].
    async fn take_over(&mut self, first_seen: Instant, mut detect: Duration, mut fence: Duration) {
        let mut failures = 0;
        let mut aside = Vec::new();
        while self.recoverable() {
            let chosen = Instant::now();
            let attempt = self.next_instance().await;
            let (mut instance, from_standby) = match attempt {
                Ok(x) => x,
                Err(e) => {
                    tracing::error!(device = %self.name, error = %e, "cannot start a backend");
                    failures += 1;
                    self.publish_with(|s| s.failed_takeovers += 1);
                    if failures >= MAX_FAILED_TAKEOVERS {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(session) = self.attached.as_ref().and_then(|a| a.session.as_ref()) else {
                // Cannot happen (`recoverable` checked it); keep the
                // instance as an idle backend rather than dropping it.
                self.current = Some(instance);
                return;
            };
            let blame = std::mem::replace(&mut self.blame, true);
            // An earlier instance's I/O may still be in the kernel: the
            // new one holds back what conflicts with it until `fenced`.
            let held = self.fencing.as_ref().is_some_and(|f| !f.is_finished());
            let result = match session.attach_message(true) {
                Ok(msg) => {
                    let msg = msg
                        .with(key::BLAME, u8::from(blame))
                        .with(key::FENCE, u8::from(held));
                    send_attach(
                        &mut instance,
                        &self.poisons,
                        &msg,
                        &session.attach_fds(),
                        &mut aside,
                    )
                    .await
                }
                Err((_, why)) => Err(NoAnswer::Died(why)),
            };
            for msg in aside.drain(..) {
                self.unsolicited(msg);
            }
            let (failure, why) = match result {
                Ok((reply, answered)) if reply.kind() == kind::ATTACHED => {
                    instance.held = held;
                    self.took_over(
                        instance,
                        from_standby,
                        &reply,
                        RecoveryTimes {
                            detect_us: micros(detect),
                            fence_us: micros(fence),
                            // Until the answer; `took_over` takes the
                            // instance's own replay time out of it.
                            takeover_us: micros(answered.saturating_duration_since(chosen)),
                            replay_us: 0,
                            total_us: micros(first_seen.elapsed()),
                        },
                    );
                    return;
                }
                Ok((reply, _)) => (None, format!("refused: {:?}", refusal(&reply))),
                Err(e) => (Some(Failure::of(&e, chosen)), e.to_string()),
            };
            let seen = Instant::now();
            failures += 1;
            self.publish_with(|s| {
                s.failed_takeovers += 1;
                match failure {
                    Some(Failure::Crashed | Failure::Died { .. }) => s.crashes += 1,
                    Some(Failure::Hung { .. }) => s.hangs += 1,
                    None => {}
                }
            });
            let pid = instance.pid();
            let fenced = instance.fence().await;
            detect = match failure {
                Some(Failure::Hung { since }) => seen.saturating_duration_since(since),
                _ => seen.elapsed(),
            };
            fence = fenced.io_done.saturating_duration_since(fenced.kill_sent);
            tracing::error!(device = %self.name, pid, failures, %why, status = %fenced.status, "takeover failed");
            if failures >= MAX_FAILED_TAKEOVERS {
                break;
            }
        }
        if self.recoverable() {
            self.give_up(format!("{failures} takeovers in a row failed"))
                .await;
        } else {
            // The guest went away (ring corrupt) while we were at it.
            self.replace_idle(STABLE_AGE).await;
        }
    }

    /// An attach to a given-up device (docs/ARCHITECTURE.md §7.5): refused
    /// within [`FRESH_START_AFTER`] of the give-up, else the device starts
    /// afresh — no instance, no session (the guest given up on was told
    /// and its requests stay unanswered; its log went with its session),
    /// no count of start-up deaths. The attach that follows starts a new
    /// instance and creates new shadow logs. Poisoned sectors stay: they
    /// are the operator's.
    pub(super) fn fresh_start(&mut self) -> Result<(), Refusal> {
        let Some(given_up) = &self.given_up else {
            return Ok(());
        };
        let wait = given_up.hold_off(Instant::now());
        if !wait.is_zero() {
            return Err((
                ErrorCode::Enodev,
                format!(
                    "{}; the device starts afresh in {} ms",
                    given_up.why,
                    wait.as_millis()
                ),
            ));
        }
        tracing::info!(device = %self.name, given_up = %given_up.why, "fresh start after giving up");
        self.given_up = None;
        self.startup_deaths = 0;
        self.injected_kill = None;
        self.injected_hang = false;
        self.blame = true;
        self.publish_with(|s| s.fresh_starts += 1);
        Ok(())
    }

    /// Bookkeeping of a successful takeover.
    fn took_over(
        &mut self,
        mut instance: Instance,
        from_standby: bool,
        reply: &Message,
        mut times: RecoveryTimes,
    ) {
        let report = ReplayReport::of(reply);
        times.replay_us = report.replay_us;
        // What the new instance spent replaying is `replay_us`; the rest of
        // the wait for its answer — a spare setting itself up (`adopt`),
        // mapping the rings, opening the logs — is the takeover's. Both lie
        // inside `total_us`, however the spare's set-up overlapped the
        // supervisor's own steps.
        times.takeover_us = times.takeover_us.saturating_sub(times.replay_us);
        instance.serving = true;
        instance.membarrier = reply.get_flag(key::MEMBARRIER).ok().flatten() == Some(true);
        tracing::info!(
            device = %self.name, pid = instance.pid(), from_standby, held = instance.held,
            generation = report.generation, replayed = report.replayed,
            repushed = report.repushed, poisoned = report.poisoned, corrupt = report.corrupt,
            tx_replayed = report.tx_replayed, rx_buffers_recovered = report.rx_buffers_recovered,
            rx_dropped_in_crash = report.rx_dropped_in_crash,
            detect_us = times.detect_us, fence_us = times.fence_us,
            takeover_us = times.takeover_us, adopt_us = instance.adopt_us(),
            replay_us = times.replay_us,
            total_us = times.total_us,
            "backend recovered"
        );
        self.current = Some(instance);
        self.startup_deaths = 0;
        self.watch_current();
        // docs/ARCHITECTURE.md §7.5: the pool replaces the spare taken,
        // off the critical path (the guest is already being served).
        self.ensure_standby();
        self.publish_with(|s| {
            s.recoveries += 1;
            if from_standby {
                s.standby_takeovers += 1;
            } else {
                s.cold_takeovers += 1;
            }
            s.replayed += report.replayed;
            s.repushed += report.repushed;
            s.poisoned += report.poisoned;
            s.corrupt += report.corrupt;
            s.tx_replayed += report.tx_replayed;
            s.tx_maybe_duplicated += report.tx_maybe_duplicated;
            s.rx_buffers_recovered += report.rx_buffers_recovered;
            s.rx_dropped_in_crash += report.rx_dropped_in_crash;
            s.last_recovery = Some(times);
            s.stall_us = s.stall_us.saturating_add(times.total_us);
        });
    }

    /// Fences `old` (stopped already) in the background, after every
    /// earlier instance still being fenced: [`DeviceTask::fencing`] is
    /// done once all are.
    fn fence_in_background(&mut self, old: Instance) {
        let earlier = self.fencing.take();
        let device = self.name.clone();
        self.fencing = Some(tokio::spawn(async move {
            if let Some(earlier) = earlier {
                if let Err(e) = earlier.await {
                    tracing::error!(%device, error = %e, "an earlier fence task failed");
                }
            }
            let pid = old.pid();
            let fenced = old.fence().await;
            tracing::info!(
                %device, pid, status = %fenced.status,
                reap_us = micros(fenced.reaped.saturating_duration_since(fenced.kill_sent)),
                io_wait_us = micros(fenced.io_done.saturating_duration_since(fenced.reaped)),
                "dead backend fenced"
            );
            fenced
        }));
    }

    /// Every dead instance's fence is down: the serving instance, if it
    /// holds requests back, runs them now (`fenced`).
    pub(super) async fn fence_down(&mut self, fenced: Result<Fenced, tokio::task::JoinError>) {
        match fenced {
            Ok(f) => {
                let fence_us = micros(f.io_done.saturating_duration_since(f.kill_sent));
                self.publish_with(|s| {
                    s.last_failure = Some(f.status.clone());
                    s.background_fence_us = Some(fence_us);
                });
            }
            // The instance went with the task (killed on drop): nothing
            // it did can still be waited for here.
            Err(e) => tracing::error!(device = %self.name, error = %e, "fence task failed"),
        }
        if let Some(instance) = self.current.as_mut().filter(|i| i.held) {
            instance.held = false;
            if let Err(e) = instance.send(&Message::new(kind::FENCED), &[]).await {
                // It died: the main loop replaces it.
                tracing::warn!(device = %self.name, error = %e, "cannot send fenced");
            }
        }
    }

    /// Waits for the fences still running and sends `fenced`.
    pub(super) async fn await_fences(&mut self) {
        if let Some(fencing) = self.fencing.take() {
            let fenced = fencing.await;
            self.fence_down(fenced).await;
        }
    }

    /// No backend can serve the device: the guest is told, and attaches
    /// fail with `ENODEV` for [`FRESH_START_AFTER`].
    pub(super) async fn give_up(&mut self, why: String) {
        tracing::error!(device = %self.name, %why, "giving up on the device");
        self.lose(Lost::BackendDied(why.clone()));
        self.given_up = Some(GivenUp {
            why,
            at: Instant::now(),
        });
        // A fresh start must not meet a dead instance's late I/O.
        self.await_fences().await;
        self.watchdog = None;
        if let Some(instance) = self.current.take() {
            instance.fence().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_up_device_refuses_attaches_for_a_second() {
        let at = Instant::now();
        let g = GivenUp {
            why: "test".into(),
            at,
        };
        assert_eq!(g.hold_off(at), FRESH_START_AFTER);
        assert_eq!(
            g.hold_off(at + Duration::from_millis(400)),
            FRESH_START_AFTER - Duration::from_millis(400)
        );
        assert_eq!(g.hold_off(at + FRESH_START_AFTER), Duration::ZERO);
        assert_eq!(g.hold_off(at + 2 * FRESH_START_AFTER), Duration::ZERO);
    }
}
