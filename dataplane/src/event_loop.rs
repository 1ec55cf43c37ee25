//! The event loop every backend process runs, whatever its transport and
//! device class: one completion token for every wait, attachment
//! generations, the loop body [`run`] over [`EventLoop`], and the helpers
//! that arm polls and batch submissions (docs/ARCHITECTURE.md §3 and §11).

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::{Duration, Instant};

use shadowback_ring::EventChannel;
use shadowback_shadow::ShadowLog;
use shadowback_xenbus::{SeqPacket, XenbusError};

use crate::uring::{Completion, Engine, EngineError, IoOp};

/// Errors that end the backend process.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("I/O engine failed")]
    Engine(#[source] EngineError),
    #[error("control channel failed")]
    Control(#[source] XenbusError),
    #[error("the supervisor closed the control channel")]
    SupervisorGone,
}

/// Requests parsed between two submissions to the kernel within a burst.
pub const SUBMIT_BATCH: u64 = 8;

/// The event loop turns at least this often, so the heartbeat in the shadow
/// log moves even when the backend is idle or waiting for the disk.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(20);
/// Longest poll window a device may ask for (`poll_us`): far below the
/// heartbeat interval.
pub const MAX_POLL_WINDOW: Duration = Duration::from_millis(1);
/// What a completion belongs to, packed into the io_uring user data; the
/// one token type of every loop.
///
/// Kick and I/O tokens carry the attachment generation. Generations are
/// numbered per process, across loops ([`Generations`]), so a completion
/// of a frontend that has since detached — including one the loop serving
/// Xen rings left behind when the process switched to virtqueues — is
/// recognised and ignored instead of being credited to its successor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    /// The supervisor's control socket is readable.
    Control,
    /// The guest kicked ring `ring` (0 for a Xen ring; the virtqueue's
    /// position in the device).
    Kick { generation: u32, ring: u8 },
    /// Disk I/O for the request in `slot` of ring `ring` (a Xen in-flight
    /// slot, a virtqueue head).
    Io {
        generation: u32,
        ring: u8,
        slot: u16,
    },
    /// The notification of ring `ring`'s guest was sent
    /// ([`IoOp::AddCounter`]).
    Notify { generation: u32, ring: u8 },
}

impl Token {
    const CONTROL: u64 = 0;
    const KICK: u64 = 1;
    const IO: u64 = 2;
    const NOTIFY: u64 = 3;

    pub fn encode(self) -> u64 {
        match self {
            Token::Control => Self::CONTROL,
            Token::Kick { generation, ring } => {
                Self::KICK | u64::from(ring) << 2 | u64::from(generation) << 32
            }
            Token::Io {
                generation,
                ring,
                slot,
            } => {
                Self::IO | u64::from(ring) << 2 | u64::from(slot) << 8 | u64::from(generation) << 32
            }
            Token::Notify { generation, ring } => {
                Self::NOTIFY | u64::from(ring) << 2 | u64::from(generation) << 32
            }
        }
    }

    /// `None` for a user data no loop produces.
    pub fn decode(token: u64) -> Option<Self> {
        let generation = (token >> 32) as u32;
        let ring = ((token >> 2) & 0x3f) as u8;
        match token & 3 {
            Self::CONTROL => Some(Token::Control),
            Self::KICK => Some(Token::Kick { generation, ring }),
            Self::IO => Some(Token::Io {
                generation,
                ring,
                slot: ((token >> 8) & 0xffff) as u16,
            }),
            Self::NOTIFY if (token >> 8) & 0xff_ffff == 0 => {
                Some(Token::Notify { generation, ring })
            }
            _ => None,
        }
    }
}

/// Where an attachment stands on its way out, the same for every ring
/// type: serving, detaching at the supervisor's request (answer
/// `detached` once idle), or given up because the guest broke the ring
/// (the supervisor was told with `disconnect`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closing {
    No,
    Detach,
    Broken,
}

/// Attachment generations of one process, shared by its loops.
#[derive(Debug)]
pub struct Generations(u32);

impl Default for Generations {
    fn default() -> Self {
        Generations(1)
    }
}

impl Generations {
    /// The generation of a new attachment (never 0).
    pub fn new_attachment(&mut self) -> u32 {
        let g = self.0;
        self.0 = self.0.wrapping_add(1).max(1);
        g
    }
}

/// One transport's event loop, as [`run`] drives it. Every wait is an
/// io_uring op told apart by [`Token`]; one turn runs the steps below in
/// this order, then sleeps in `io_uring_enter` unless
/// [`EventLoop::has_work`], and dispatches what completed.
pub trait EventLoop {
    fn engine(&mut self) -> &mut Engine;
    fn control(&self) -> &SeqPacket;
    /// Scratch space for reaped completions.
    fn completions(&mut self) -> &mut Vec<Completion>;
    /// Starts the next request of a serial replay once the previous one
    /// completed (docs/ARCHITECTURE.md §7.5).
    fn advance_serial_replay(&mut self) -> Result<(), BackendError>;
    /// Takes what the rings hold, logs it, and submits its I/O.
    fn consume(&mut self) -> Result<(), BackendError>;
    /// Makes the responses put since the last turn visible, notifying at
    /// most once per ring.
    fn publish(&mut self);
    /// Drops a detaching frontend once nothing is in flight.
    fn finish_detach(&mut self) -> Result<(), BackendError>;
    /// Moves the heartbeat of every shadow log.
    fn heartbeat(&mut self);
    /// Whether to go round again without sleeping; asks the guest to kick
    /// the rings it finds empty (called just before sleeping).
    fn has_work(&mut self) -> bool;
    /// [`EventLoop::has_work`] without asking for kicks: what a polling
    /// loop checks. A loop that does not poll may leave it false.
    fn peek_work(&mut self) -> bool {
        false
    }
    /// How long to keep polling after the last activity before sleeping
    /// (zero, the default: sleep at once).
    fn poll_window(&self) -> Duration {
        Duration::ZERO
    }
    /// How soon the loop must wake without an event (QoS throttling: when
    /// the buckets allow the next request); `None`: at the heartbeat.
    fn wake_in(&self) -> Option<Duration> {
        None
    }
    /// The control socket is readable.
    fn on_control(&mut self) -> Result<(), BackendError>;
    /// A kick's wait on ring `ring` completed with `result`: a `poll`
    /// mask where the loop waits with [`arm`], [`COUNTER_OK`] (or the
    /// read's error) where it waits with [`arm_kick`].
    fn on_kick(&mut self, generation: u32, ring: u8, result: i32) -> Result<(), BackendError>;
    fn on_io(&mut self, generation: u32, ring: u8, slot: u16, result: i32);
    /// A notification queued on the engine ([`IoOp::AddCounter`])
    /// completed with `result` (8, or `-errno`). By default nothing: loops
    /// that notify with `write(2)` queue none.
    fn on_notified(&mut self, generation: u32, ring: u8, result: i32) {
        let _ = (generation, ring, result);
    }
}

/// Serves until the supervisor closes the control channel.
///
/// Adaptive polling (docs/ARCHITECTURE.md §11.2): with a poll window, a
/// loop that has nothing to do within the window after its last activity
/// (a completion: a kick, a disk op, a control message) watches the rings
/// and the completion queue instead of sleeping, without asking the guest
/// to kick; once the window has passed it asks for kicks and sleeps.
pub fn run<L: EventLoop>(lp: &mut L) -> Result<(), BackendError> {
    arm_control(lp)?;
    let window = lp.poll_window();
    let mut last_active = Instant::now();
    loop {
        lp.advance_serial_replay()?;
        lp.consume()?;
        lp.publish();
        lp.finish_detach()?;
        lp.heartbeat();
        let mut more = lp.peek_work();
        if !more && !window.is_zero() {
            more = poll(lp, last_active + window)?;
        }
        if !more {
            more = lp.has_work();
        }
        let sleep = lp
            .wake_in()
            .map_or(HEARTBEAT_INTERVAL, |w| w.min(HEARTBEAT_INTERVAL));
        lp.engine()
            .submit_and_wait_timeout(usize::from(!more), sleep)
            .map_err(BackendError::Engine)?;
        let mut completions = std::mem::take(lp.completions());
        lp.engine().drain(&mut completions);
        if !completions.is_empty() {
            last_active = Instant::now();
        }
        for c in completions.drain(..) {
            match Token::decode(c.token) {
                Some(Token::Control) => {
                    lp.on_control()?;
                    arm_control(lp)?;
                }
                Some(Token::Kick { generation, ring }) => {
                    lp.on_kick(generation, ring, c.result)?;
                }
                Some(Token::Io {
                    generation,
                    ring,
                    slot,
                }) => lp.on_io(generation, ring, slot, c.result),
                Some(Token::Notify { generation, ring }) => {
                    lp.on_notified(generation, ring, c.result);
                }
                None => {}
            }
        }
        *lp.completions() = completions;
    }
}

/// Watches the completion queue and the rings until one has something or
/// `until` has passed; whether one had. What is queued is submitted first.
/// Bounded by the poll window, so the heartbeat still moves.
fn poll<L: EventLoop>(lp: &mut L, until: Instant) -> Result<bool, BackendError> {
    lp.engine().submit_queued().map_err(BackendError::Engine)?;
    loop {
        if lp.engine().has_completions() || lp.peek_work() {
            return Ok(true);
        }
        if Instant::now() >= until {
            return Ok(false);
        }
        std::hint::spin_loop();
    }
}

fn arm_control<L: EventLoop>(lp: &mut L) -> Result<(), BackendError> {
    let fd = lp.control().as_fd().as_raw_fd();
    arm(lp.engine(), Token::Control, fd)
}

/// A one-shot poll for input on `fd`, completing with `token`.
pub fn arm(engine: &mut Engine, token: Token, fd: RawFd) -> Result<(), BackendError> {
    engine
        .push(token.encode(), IoOp::PollIn { fd })
        .map_err(|(e, _)| BackendError::Engine(e))
}

/// Polls `fd` for room to write ([`IoOp::PollOut`]), completing with
/// `token`.
pub fn arm_writable(engine: &mut Engine, token: Token, fd: RawFd) -> Result<(), BackendError> {
    engine
        .push(token.encode(), IoOp::PollOut { fd })
        .map_err(|(e, _)| BackendError::Engine(e))
}

/// The result of an [`IoOp::ReadCounter`] that took an eventfd's counter,
/// or of an [`IoOp::AddCounter`] that added to it: the 8 bytes.
pub const COUNTER_OK: i32 = 8;

/// Waits for the next kick on `channel` with a read of its counter
/// ([`IoOp::ReadCounter`]), completing with `token`: the wake-up and the
/// read in one completion, where a poll needs a `poll` and a `read` after
/// it (docs/ARCHITECTURE.md §11.2, "Kicks and adaptive polling").
pub fn arm_kick(
    engine: &mut Engine,
    token: Token,
    channel: &EventChannel,
) -> Result<(), BackendError> {
    engine
        .push(token.encode(), IoOp::read_counter(channel.as_raw_fd()))
        .map_err(|(e, _)| BackendError::Engine(e))
}

/// Waits for the next kick after one completed with `result`. A read that
/// took the counter ([`COUNTER_OK`]) is armed again; anything else (a poll
/// mask, or a read the fd refused: it is not an eventfd) is drained with
/// `read(2)` behind a guard and answered by a poll, so a fd that fails
/// every read cannot make the loop spin: each poll waits for input.
pub fn rearm_kick(
    engine: &mut Engine,
    token: Token,
    channel: &EventChannel,
    result: i32,
) -> Result<(), BackendError> {
    if result == COUNTER_OK {
        return arm_kick(engine, token, channel);
    }
    let _ = channel.drain();
    arm(engine, token, channel.as_raw_fd())
}

/// Hands the device the first requests of a burst while the rest are
/// still being parsed: a submission every [`SUBMIT_BATCH`] requests.
pub fn submit_burst(engine: &mut Engine, requests: u64) -> Result<(), BackendError> {
    if requests.is_multiple_of(SUBMIT_BATCH) {
        engine.submit_and_wait(0).map_err(BackendError::Engine)?;
    }
    Ok(())
}

/// Moves the heartbeat of each log (docs/ARCHITECTURE.md §7.2).
pub fn heartbeat<'a>(device: &str, logs: impl IntoIterator<Item = &'a ShadowLog>) {
    for log in logs {
        if let Err(e) = log.heartbeat() {
            tracing::warn!(device, error = %e, "heartbeat failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uring::EngineConfig;

    /// A loop whose rings get a request after `work_after` looks, and
    /// that stops on its second turn; it counts the looks and the kick
    /// requests (`has_work`).
    struct PollProbe {
        engine: Engine,
        control: SeqPacket,
        _peer: SeqPacket,
        completions: Vec<Completion>,
        window: Duration,
        work_after: u32,
        turns: u32,
        peeks: u32,
        armed: u32,
    }

    impl PollProbe {
        fn run(window: Duration, work_after: u32) -> Self {
            let (control, peer) = SeqPacket::pair().unwrap();
            let mut probe = PollProbe {
                engine: Engine::for_polls(&EngineConfig::default()).unwrap(),
                control,
                _peer: peer,
                completions: Vec::new(),
                window,
                work_after,
                turns: 0,
                peeks: 0,
                armed: 0,
            };
            assert!(matches!(run(&mut probe), Err(BackendError::SupervisorGone)));
            probe
        }
    }

    impl EventLoop for PollProbe {
        fn engine(&mut self) -> &mut Engine {
            &mut self.engine
        }
        fn control(&self) -> &SeqPacket {
            &self.control
        }
        fn completions(&mut self) -> &mut Vec<Completion> {
            &mut self.completions
        }
        fn advance_serial_replay(&mut self) -> Result<(), BackendError> {
            Ok(())
        }
        fn consume(&mut self) -> Result<(), BackendError> {
            self.turns += 1;
            if self.turns == 2 {
                return Err(BackendError::SupervisorGone);
            }
            Ok(())
        }
        fn publish(&mut self) {}
        fn finish_detach(&mut self) -> Result<(), BackendError> {
            Ok(())
        }
        fn heartbeat(&mut self) {}
        /// Asking for kicks; "work" so the turn does not sleep.
        fn has_work(&mut self) -> bool {
            self.armed += 1;
            true
        }
        fn peek_work(&mut self) -> bool {
            self.peeks += 1;
            self.peeks > self.work_after
        }
        fn poll_window(&self) -> Duration {
            self.window
        }
        fn on_control(&mut self) -> Result<(), BackendError> {
            Ok(())
        }
        fn on_kick(
            &mut self,
            _generation: u32,
            _ring: u8,
            _result: i32,
        ) -> Result<(), BackendError> {
            Ok(())
        }
        fn on_io(&mut self, _generation: u32, _ring: u8, _slot: u16, _result: i32) {}
    }

    #[test]
    fn a_polling_loop_finds_work_without_asking_for_kicks() {
        // Work shows up on the 50th look, well within the window.
        let probe = PollProbe::run(Duration::from_secs(30), 50);
        assert_eq!(probe.peeks, 51, "polled until the work showed up");
        assert_eq!(probe.armed, 0, "asked for a kick while polling");
    }

    #[test]
    fn without_a_window_the_loop_asks_for_kicks_at_once() {
        let probe = PollProbe::run(Duration::ZERO, 50);
        assert_eq!(probe.peeks, 1);
        assert_eq!(probe.armed, 1);
    }

    #[test]
    fn once_the_window_has_passed_the_loop_asks_for_kicks() {
        let t0 = Instant::now();
        let probe = PollProbe::run(Duration::from_millis(5), u32::MAX);
        assert!(t0.elapsed() >= Duration::from_millis(5));
        assert!(probe.peeks > 1, "did not poll");
        assert_eq!(probe.armed, 1);
    }

    #[test]
    fn tokens_round_trip() {
        for t in [
            Token::Control,
            Token::Kick {
                generation: 7,
                ring: 15,
            },
            Token::Kick {
                generation: 1,
                ring: 0,
            },
            Token::Io {
                generation: u32::MAX,
                ring: 3,
                slot: 32767,
            },
            Token::Io {
                generation: 1,
                ring: 0,
                slot: 511,
            },
            Token::Io {
                generation: 1,
                ring: 0,
                slot: 0,
            },
            Token::Notify {
                generation: u32::MAX,
                ring: 63,
            },
            Token::Notify {
                generation: 1,
                ring: 0,
            },
        ] {
            assert_eq!(Token::decode(t.encode()), Some(t));
        }
        // A notification has no slot.
        assert_eq!(Token::decode(3 | 1 << 8), None);
    }

    #[test]
    fn generations_are_never_zero_and_never_repeat_soon() {
        let mut g = Generations(u32::MAX);
        assert_eq!(g.new_attachment(), u32::MAX);
        assert_eq!(g.new_attachment(), 1);
        assert_eq!(g.new_attachment(), 2);
    }
}
