//! Deterministic crash points for fault injection (docs/ARCHITECTURE.md
//! §7.4, §7.6).
//!
//! Every writer operation of [`ShadowLog`](crate::ShadowLog) is a
//! [`Transition`] made of a fixed sequence of stores to shared memory. A
//! test installs a hook with
//! [`ShadowLog::set_crash_hook`](crate::ShadowLog::set_crash_hook); the log
//! calls it at step `k` after exactly `k` of the transition's stores are
//! done, for `k = 0..=stores()`. Step 0 is before the first store, step
//! `stores()` after the last, every other step sits between a pair of
//! stores. A hook that kills the process there (`raise(SIGKILL)`) leaves
//! the log exactly as a crash at that instruction would.
//!
//! | transition | stores, in order | points |
//! |---|---|---|
//! | `begin` | 1 `generation += 1`, 2 `stalled_instances += 1` | 3 |
//! | `consume` | 1 header `next_seq`, 2 `request`, 3 `ring_idx`, 4 `seq`, 5 `progress = 0`, 6 `replays = 0`, 7 **`state = INFLIGHT`**, 8 header `req_cons = ring_idx + 1` | 9 |
//! | `complete` | 1 `response`, 2 `rsp_idx`, 3 **`state = COMPLETING`**, 4 header `rsp_prod_pvt` | 5 |
//! | `rewrite` | 1 **`state = REWRITING`**, 2 `response`, 3 `rsp_idx`, 4 **`state = COMPLETING`**, 5 header `rsp_prod_pvt` | 6 |
//! | `repush` | 1 `rsp_idx`, 2 header `rsp_prod_pvt` | 3 |
//! | `free` | 1 **`state = FREE`** | 2 |
//! | `published` | 1 `stalled_instances = 0` (first publication of an instance only) | 2 |
//! | `recover` | 1 header `req_cons` | 2 |
//! | `replay` | 1 `replays += 1` | 2 |
//! | `progress` | 1 `progress` | 2 |
//!
//! The transitions of a slot's life (`consume`, `complete` or
//! `rewrite`, `free`, `published`) are compiled twice from the same code:
//! with the hook's calls between the stores, taken when a hook is set,
//! and without them for a log with no hook, so a backend's stores carry
//! no call between them; the stores and their order are the same in both.
//!
//! A header `rsp_prod_pvt` store that would not raise the value is skipped,
//! but its crash points are still reported, so the numbering is fixed.
//! The heartbeat is a single store outside any transition and has no
//! crash point.

use std::fmt;
use std::str::FromStr;

/// A writer operation on the log, for crash-point numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transition {
    /// [`ShadowLog::begin_instance`](crate::ShadowLog::begin_instance).
    Begin,
    /// [`ShadowLog::log_consumed`](crate::ShadowLog::log_consumed).
    Consume,
    /// [`ShadowLog::log_completing`](crate::ShadowLog::log_completing) of an
    /// INFLIGHT entry.
    Complete,
    /// [`ShadowLog::log_completing`](crate::ShadowLog::log_completing) of an
    /// entry in any other state (a corrupt entry being answered).
    Rewrite,
    /// [`ShadowLog::log_repushed`](crate::ShadowLog::log_repushed).
    Repush,
    /// [`ShadowLog::free`](crate::ShadowLog::free), also once per entry
    /// freed by [`ShadowLog::log_published`](crate::ShadowLog::log_published).
    Free,
    /// The end of [`ShadowLog::log_published`](crate::ShadowLog::log_published).
    Published,
    /// [`ShadowLog::log_recovered`](crate::ShadowLog::log_recovered).
    Recover,
    /// [`ShadowLog::mark_replayed`](crate::ShadowLog::mark_replayed), once
    /// per entry.
    Replay,
    /// [`ShadowLog::set_progress`](crate::ShadowLog::set_progress).
    Progress,
}

impl Transition {
    /// Every transition, in the order of the table above.
    pub const ALL: [Transition; 10] = [
        Transition::Begin,
        Transition::Consume,
        Transition::Complete,
        Transition::Rewrite,
        Transition::Repush,
        Transition::Free,
        Transition::Published,
        Transition::Recover,
        Transition::Replay,
        Transition::Progress,
    ];

    /// Number of shared-memory stores the transition makes.
    pub const fn stores(self) -> u32 {
        match self {
            Transition::Begin => 2,
            Transition::Consume => 8,
            Transition::Complete => 4,
            Transition::Rewrite => 5,
            Transition::Repush => 2,
            Transition::Free => 1,
            Transition::Published => 1,
            Transition::Recover => 1,
            Transition::Replay => 1,
            Transition::Progress => 1,
        }
    }

    /// Number of crash points: `stores() + 1` (before, between, after).
    pub const fn crash_points(self) -> u32 {
        self.stores() + 1
    }

    /// Lower-case name used by `Display` and `FromStr`.
    pub const fn name(self) -> &'static str {
        match self {
            Transition::Begin => "begin",
            Transition::Consume => "consume",
            Transition::Complete => "complete",
            Transition::Rewrite => "rewrite",
            Transition::Repush => "repush",
            Transition::Free => "free",
            Transition::Published => "published",
            Transition::Recover => "recover",
            Transition::Replay => "replay",
            Transition::Progress => "progress",
        }
    }
}

/// A point inside a transition: `step` of its stores are done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CrashPoint {
    pub transition: Transition,
    pub step: u32,
}

impl CrashPoint {
    /// Every crash point of every transition, in table order.
    pub fn all() -> impl Iterator<Item = CrashPoint> {
        Transition::ALL.into_iter().flat_map(|transition| {
            (0..transition.crash_points()).map(move |step| CrashPoint { transition, step })
        })
    }

    /// Position of this point in [`CrashPoint::all`]: a single number per
    /// point, stable as long as the table is.
    pub fn number(self) -> u32 {
        let before: u32 = Transition::ALL
            .iter()
            .take_while(|t| **t != self.transition)
            .map(|t| t.crash_points())
            .sum();
        before + self.step
    }
}

impl fmt::Display for CrashPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.transition.name(), self.step)
    }
}

/// A string that is not `transition.step` with a known transition and an
/// existing step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a crash point: {0:?}")]
pub struct BadCrashPoint(pub String);

impl FromStr for CrashPoint {
    type Err = BadCrashPoint;

    /// Parses `consume.3`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadCrashPoint(s.to_string());
        let (name, step) = s.split_once('.').ok_or_else(bad)?;
        let transition = Transition::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or_else(bad)?;
        let step: u32 = step.parse().map_err(|_| bad())?;
        if step >= transition.crash_points() {
            return Err(bad());
        }
        Ok(CrashPoint { transition, step })
    }
}

/// The hook called at each crash point.
pub type CrashHook = Box<dyn Fn(CrashPoint) + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbering_is_dense_and_round_trips() {
        for (i, p) in CrashPoint::all().enumerate() {
            assert_eq!(p.number() as usize, i);
            assert_eq!(p.to_string().parse::<CrashPoint>(), Ok(p));
        }
        let total: u32 = Transition::ALL.iter().map(|t| t.crash_points()).sum();
        assert_eq!(CrashPoint::all().count() as u32, total);
        assert!("consume.9".parse::<CrashPoint>().is_err());
        assert!("nope.0".parse::<CrashPoint>().is_err());
        assert!("consume".parse::<CrashPoint>().is_err());
    }
}
