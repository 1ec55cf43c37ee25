//! Who may hold a control-socket connection, and how the accept loop
//! survives running out of descriptors (docs/PROTOCOL.md §1.1).
//!
//! Every accepted connection that is not attached holds a slot. A peer
//! process (`SO_PEERCRED` pid and uid) holds at most `per_peer` slots and
//! the socket at most `max` — never more than half the soft
//! `RLIMIT_NOFILE`, so that devices and takeovers always find descriptors.
//! When the socket is full, a newcomer takes the oldest slot of the peer
//! holding the most, as long as that peer would still hold at least as many
//! as the newcomer's: one client opening connections from many processes
//! cannot lock out `status` from another. An attached guest gives its slot
//! back (there is one attached connection per disk at most).

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::config::ControlConfig;

/// A peer process: its uid, primary gid and pid as `SO_PEERCRED` reported
/// them at `connect` time (pid 0 when the peer is outside our pid
/// namespace).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PeerKey {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
}

impl PeerKey {
    /// The peer of a connected unix socket.
    pub(crate) fn of(sock: &impl AsFd) -> std::io::Result<Self> {
        use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
        let cred = getsockopt(sock, PeerCredentials).map_err(std::io::Error::from)?;
        Ok(PeerKey {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
        })
    }
}

impl std::fmt::Display for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} uid {}", self.pid, self.uid)
    }
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AdmissionError {
    #[error("peer already holds {held} connections (max_connections_per_peer)")]
    PeerFull { held: usize },
    #[error("the control socket holds {held} connections (max_connections)")]
    SocketFull { held: usize },
}

/// The limits in force: the configured ones, the socket's capped by the
/// descriptor budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    pub max: usize,
    pub per_peer: usize,
}

impl Limits {
    /// `cfg`'s limits with `max` capped at half of `fd_limit` (the soft
    /// `RLIMIT_NOFILE`; `None` when unlimited).
    pub(crate) fn new(cfg: &ControlConfig, fd_limit: Option<u64>) -> Self {
        let configured = usize::try_from(cfg.max_connections).unwrap_or(usize::MAX);
        let budget = fd_limit
            .map(|n| usize::try_from(n / 2).unwrap_or(usize::MAX).max(1))
            .unwrap_or(usize::MAX);
        let max = configured.min(budget);
        let per_peer = usize::try_from(cfg.max_connections_per_peer)
            .unwrap_or(usize::MAX)
            .min(max);
        Limits { max, per_peer }
    }
}

/// The soft `RLIMIT_NOFILE` of this process (`None`: unlimited or unknown).
pub(crate) fn fd_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

#[derive(Debug)]
struct Slot {
    peer: PeerKey,
    evict: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    /// By admission order: the first slot of a peer is its oldest.
    slots: BTreeMap<u64, Slot>,
    held: HashMap<PeerKey, usize>,
}

impl Table {
    fn remove(&mut self, id: u64) -> Option<Slot> {
        let slot = self.slots.remove(&id)?;
        if let Some(n) = self.held.get_mut(&slot.peer) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(&slot.peer);
            }
        }
        Some(slot)
    }

    /// The oldest slot of the peer holding the most, if it holds at least
    /// two more than `held` (after the move it still holds as many as the
    /// newcomer).
    fn victim(&self, held: usize) -> Option<u64> {
        let (&top, &most) = self.held.iter().max_by_key(|(_, n)| **n)?;
        if most < held + 2 {
            return None;
        }
        self.slots
            .iter()
            .find(|(_, s)| s.peer == top)
            .map(|(&id, _)| id)
    }
}

/// The slots of one control socket.
#[derive(Debug)]
pub(crate) struct Admission {
    limits: Limits,
    table: Mutex<Table>,
    /// Shared by the connections' rate-limited log lines.
    log: Mutex<LogLimiter>,
}

impl Admission {
    pub(crate) fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Admission {
            limits,
            table: Mutex::new(Table::default()),
            log: Mutex::new(LogLimiter::new(LOG_INTERVAL)),
        })
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // The table stays consistent at every await-free step; a panic
        // elsewhere must not stop admissions.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Slots held now.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.table().slots.len()
    }

    /// Gives `peer` a slot, taking one from the largest holder if the
    /// socket is full and that is fair (see the module comment).
    pub(crate) fn admit(self: &Arc<Self>, peer: PeerKey) -> Result<Ticket, AdmissionError> {
        let mut t = self.table();
        let held = t.held.get(&peer).copied().unwrap_or(0);
        if held >= self.limits.per_peer {
            return Err(AdmissionError::PeerFull { held });
        }
        if t.slots.len() >= self.limits.max {
            let Some(id) = t.victim(held) else {
                return Err(AdmissionError::SocketFull {
                    held: t.slots.len(),
                });
            };
            if let Some(slot) = t.remove(id) {
                tracing::debug!(victim = %slot.peer, newcomer = %peer, "control connection evicted");
                slot.evict.notify_one();
            }
        }
        let id = t.next_id;
        t.next_id += 1;
        let evict = Arc::new(Notify::new());
        t.slots.insert(
            id,
            Slot {
                peer,
                evict: evict.clone(),
            },
        );
        *t.held.entry(peer).or_insert(0) += 1;
        Ok(Ticket {
            admission: self.clone(),
            id,
            evict,
        })
    }

    /// Whether a rate-limited log line may be written now; `Some(n)`: yes,
    /// and `n` lines were suppressed since the last one.
    pub(crate) fn log_allowed(&self) -> Option<u64> {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allow(Instant::now())
    }
}

/// A connection's slot; given back on drop or by [`release`](Self::release).
#[derive(Debug)]
pub(crate) struct Ticket {
    admission: Arc<Admission>,
    id: u64,
    evict: Arc<Notify>,
}

impl Ticket {
    /// Resolves once the slot was taken for a newcomer: the connection
    /// must close.
    pub(crate) async fn evicted(&self) {
        self.evict.notified().await;
    }

    /// Gives the slot back while the connection stays open (it is
    /// attached).
    pub(crate) fn release(&self) {
        self.admission.table().remove(self.id);
    }

    pub(crate) fn admission(&self) -> &Admission {
        &self.admission
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.release();
    }
}

/// How often a rate-limited log line may be written.
pub(crate) const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Lines written per interval before suppressing.
const LOG_BURST: u32 = 5;

/// Rate limit of a repeated log line: `LOG_BURST` lines per interval,
/// then one line when the next interval starts, saying how many were
/// suppressed.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    interval: Duration,
    window: Option<Instant>,
    written: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub(crate) fn new(interval: Duration) -> Self {
        LogLimiter {
            interval,
            window: None,
            written: 0,
            suppressed: 0,
        }
    }

    /// `Some(suppressed since the last line)` if a line may be written at
    /// `now`.
    pub(crate) fn allow(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .window
            .is_none_or(|start| now.saturating_duration_since(start) >= self.interval);
        if fresh {
            self.window = Some(now);
            self.written = 0;
        }
        if self.written < LOG_BURST {
            self.written += 1;
            return Some(std::mem::take(&mut self.suppressed));
        }
        self.suppressed += 1;
        None
    }
}

/// First and largest pause after a failed `accept`.
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(10);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// The accept loop's back-off: a failed `accept` (`EMFILE`, `ENFILE`,
/// `ENOBUFS`, `ENOMEM`, …) leaves the connection in the backlog and the
/// listener readable, so accepting again at once would spin; the loop
/// pauses instead, longer after each failure, and starts afresh after a
/// success.
#[derive(Debug, Default)]
pub(crate) struct AcceptPacer {
    pause: Option<Duration>,
}

impl AcceptPacer {
    /// The pause to take before the next `accept`.
    pub(crate) fn pause(&self) -> Option<Duration> {
        self.pause
    }

    /// An `accept` failed: returns the pause before the next.
    pub(crate) fn failed(&mut self) -> Duration {
        let next = self
            .pause
            .map_or(ACCEPT_PAUSE_MIN, |p| (p * 2).min(ACCEPT_PAUSE_MAX));
        self.pause = Some(next);
        next
    }

    pub(crate) fn succeeded(&mut self) {
        self.pause = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(pid: i32) -> PeerKey {
        PeerKey {
            uid: 0,
            gid: 0,
            pid,
        }
    }

    fn admission(max: usize, per_peer: usize) -> Arc<Admission> {
        Admission::new(Limits { max, per_peer })
    }

    #[test]
    fn a_peer_holds_at_most_per_peer_slots() {
        let a = admission(10, 2);
        let t1 = a.admit(peer(1)).unwrap();
        let _t2 = a.admit(peer(1)).unwrap();
        assert_eq!(
            a.admit(peer(1)).unwrap_err(),
            AdmissionError::PeerFull { held: 2 }
        );
        let _other = a.admit(peer(2)).unwrap();
        drop(t1);
        let _t3 = a.admit(peer(1)).unwrap();
        assert_eq!(a.held(), 3);
    }

    #[test]
    fn a_full_socket_takes_the_largest_holders_oldest_slot() {
        let a = admission(4, 4);
        let hog: Vec<Ticket> = (0..4).map(|_| a.admit(peer(1)).unwrap()).collect();
        let newcomer = a.admit(peer(2)).unwrap();
        assert_eq!(a.held(), 4);
        // The oldest of the hog's slots was told to close, and only it.
        let notified = |t: &Ticket| {
            let n = t.evict.notified();
            tokio::pin!(n);
            n.as_mut().enable()
        };
        assert!(notified(&hog[0]));
        assert!(hog[1..].iter().all(|t| !notified(t)));
        // Dropping the evicted ticket later changes nothing.
        let mut hog = hog.into_iter();
        drop(hog.next());
        assert_eq!(a.held(), 4);
        // Fair share reached (hog 3, newcomer 1 → 2 each after one more).
        let second = a.admit(peer(2)).unwrap();
        assert_eq!(
            a.admit(peer(2)).unwrap_err(),
            AdmissionError::SocketFull { held: 4 }
        );
        drop((newcomer, second));
        assert_eq!(a.held(), 2);
    }

    #[test]
    fn an_equal_share_is_not_taken() {
        let a = admission(2, 2);
        let _t1 = a.admit(peer(1)).unwrap();
        let _t2 = a.admit(peer(2)).unwrap();
        assert_eq!(
            a.admit(peer(3)).unwrap_err(),
            AdmissionError::SocketFull { held: 2 }
        );
    }

    #[test]
    fn a_released_slot_is_free_while_the_ticket_lives() {
        let a = admission(1, 1);
        let attached = a.admit(peer(1)).unwrap();
        attached.release();
        let _next = a.admit(peer(1)).unwrap();
        drop(attached);
        assert_eq!(a.held(), 1);
    }

    #[test]
    fn limits_leave_half_the_descriptors_to_the_devices() {
        let cfg = ControlConfig::default();
        assert_eq!(
            Limits::new(&cfg, Some(1024)),
            Limits {
                max: 256,
                per_peer: 32
            }
        );
        assert_eq!(
            Limits::new(&cfg, Some(64)),
            Limits {
                max: 32,
                per_peer: 32
            }
        );
        assert_eq!(Limits::new(&cfg, Some(40)).per_peer, 20);
        assert_eq!(Limits::new(&cfg, None).max, 256);
        assert_eq!(Limits::new(&cfg, Some(1)).max, 1);
    }

    #[test]
    fn log_lines_are_limited_per_interval() {
        let mut l = LogLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..LOG_BURST {
            assert_eq!(l.allow(t0), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(l.allow(t0 + Duration::from_secs(5)), None);
        }
        assert_eq!(l.allow(t0 + Duration::from_secs(10)), Some(1000));
        assert_eq!(l.allow(t0 + Duration::from_secs(10)), Some(0));
    }

    #[test]
    fn accept_pauses_grow_to_a_bound_and_reset() {
        let mut p = AcceptPacer::default();
        assert_eq!(p.pause(), None);
        let pauses: Vec<Duration> = (0..12).map(|_| p.failed()).collect();
        assert_eq!(pauses[0], ACCEPT_PAUSE_MIN);
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*pauses.last().unwrap(), ACCEPT_PAUSE_MAX);
        p.succeeded();
        assert_eq!(p.pause(), None);
    }
}
