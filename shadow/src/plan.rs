//! The recovery planner (docs/ARCHITECTURE.md §7.5, replay): pure code from a
//! [`LogSnapshot`] and the ring's shared indices to a [`RecoveryPlan`].
//!
//! # Rules
//!
//! Ring indices are free-running u32 and are only ever compared by
//! wrapping difference. `rsp_prod` is the ring's shared `rsp_prod`, what
//! the guest may have seen.
//!
//! 1. Ring-level checks, whose failure is an error for the whole ring:
//!    `rsp_prod <= logged rsp_prod_pvt <= logged req_cons <= rsp_prod + size`
//!    (the writer logs `rsp_prod_pvt` before publishing, logs a response
//!    only for a consumed request, and at most `size` consumed requests
//!    are unanswered); after recovery `req_cons - rsp_prod <= size` and
//!    `req_prod - req_cons <= size`.
//! 2. Each non-FREE entry is validated on its own; one that fails lands in
//!    `corrupt` and nowhere else:
//!    * a state word other than INFLIGHT/COMPLETING (REWRITING is an answer
//!      to a corrupt entry interrupted by a crash);
//!    * INFLIGHT: `seq < next_seq`, and `ring_idx` not ahead of the logged
//!      `req_cons`: `d = req_cons - ring_idx` is at least 1 and at most
//!      `min(next_seq - seq, 2^31)` (each request consumed after this one
//!      took a later seq, so the consumer cannot have moved further), or
//!      `d = 0` for the one request consumed last (`seq = next_seq - 1`)
//!      whose `req_cons` store the crash cut off. Two INFLIGHT entries with
//!      the same `ring_idx` are both corrupt.
//!    * COMPLETING: `rsp_idx` in `[rsp_prod - size, logged rsp_prod_pvt]`;
//!      two COMPLETING entries with the same `rsp_idx` are both corrupt.
//!      `ring_idx` and `seq` of a COMPLETING entry are not looked at: a
//!      corrupt INFLIGHT entry answered with an error becomes a valid
//!      COMPLETING one.
//!
//!    The window of `ring_idx` is deliberately not `[rsp_prod - size,
//!    req_cons)`: with out-of-order completion a slow request stays in
//!    flight while the guest reuses the other slots any number of times,
//!    so a valid `ring_idx` can be arbitrarily far behind `rsp_prod`.
//! 3. `req_cons` = logged `req_cons`, plus one if a valid INFLIGHT entry
//!    sits exactly at it (= max(logged `req_cons`, highest `ring_idx` + 1)
//!    by wrapping difference, since no valid entry is further ahead).
//! 4. COMPLETING with `rsp_idx` before `rsp_prod`: already visible, `free`.
//!    COMPLETING at or after `rsp_prod`: `repush` its saved response, in
//!    `rsp_idx` order, renumbered `rsp_prod, rsp_prod + 1, …`.
//! 5. INFLIGHT: `reexecute` in `seq` order, unless it is `poisoned`. The
//!    instance that consumed a request executed it once and each replay
//!    once more, so a request has been executed `replays + 1` times, every
//!    time by an instance that then died. It is poisoned — answered with an
//!    error instead of being run again — when
//!    `replays + 1 >= poison_threshold`. With a threshold of 3, a request
//!    in flight in three consecutive instances that all died (the one that
//!    consumed it and two that replayed it) is failed by the fourth.
//!    Thresholds 0 and 1 both mean "never re-execute".
//! 6. Accounting: the guest waits for exactly `req_cons - rsp_prod`
//!    responses to consumed requests. The valid entries account for
//!    `repush + reexecute + poisoned` of them; more than that is a
//!    ring-level error (answering all would overrun the guest). The
//!    shortfall is filled by answering corrupt entries with an error
//!    ([`CorruptAction::Answer`]), those whose state word says they were
//!    live first, then by `seq`; the other corrupt entries are discarded
//!    (freed unanswered) and any remaining shortfall is reported as
//!    `lost` (requests the log no longer knows: they stay unanswered).
//! 7. The new `rsp_prod_pvt` is `rsp_prod + repush.len()`; responses for
//!    poisoned, answered-corrupt and re-executed requests follow. They all
//!    land in slots `[rsp_prod, req_cons)`, which hold consumed requests
//!    only, so no unconsumed request is overwritten.

use std::collections::HashMap;

use crate::layout::{EntryId, EntryState, REQUEST_SIZE, RESPONSE_SIZE};
use crate::snapshot::LogSnapshot;
use crate::ShadowError;

/// A saved response to publish again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repush {
    pub entry: EntryId,
    /// The ring slot to write it to (renumbered from `rsp_prod`).
    pub rsp_idx: u32,
    /// The slot it had in the log.
    pub old_rsp_idx: u32,
    pub response: [u8; RESPONSE_SIZE],
}

/// An INFLIGHT entry, to re-execute or to fail as poison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InflightEntry {
    pub entry: EntryId,
    pub seq: u64,
    pub ring_idx: u32,
    pub progress: u32,
    pub replays: u32,
    pub request: [u8; REQUEST_SIZE],
}

/// Why an entry was found corrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CorruptReason {
    /// A state word no writer stores.
    BadState(u32),
    /// REWRITING: a crash cut off answering an entry already corrupt.
    InterruptedRewrite,
    /// INFLIGHT with a `seq` the log has not handed out yet.
    SeqFromFuture { seq: u64, next_seq: u64 },
    /// INFLIGHT at the logged `req_cons` without being the last consumed.
    RingIdxAhead { ring_idx: u32 },
    /// INFLIGHT ahead of the logged `req_cons`, or further behind it than
    /// the requests consumed since allow.
    RingIdxOutOfWindow { ring_idx: u32 },
    /// Another INFLIGHT entry has the same `ring_idx`.
    DuplicateRingIdx { ring_idx: u32 },
    /// COMPLETING outside `[rsp_prod - size, logged rsp_prod_pvt]`.
    RspIdxOutOfWindow { rsp_idx: u32 },
    /// Another COMPLETING entry has the same `rsp_idx`.
    DuplicateRspIdx { rsp_idx: u32 },
}

/// What recovery does with a corrupt entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CorruptAction {
    /// Answer the request with an error response (the device model
    /// builds it from the saved request), through
    /// [`ShadowLog::log_completing`](crate::ShadowLog::log_completing).
    Answer,
    /// Free the entry without answering: the guest is not waiting for it.
    Discard,
}

/// An entry that failed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CorruptEntry {
    pub entry: EntryId,
    pub reason: CorruptReason,
    pub action: CorruptAction,
    /// The saved request bytes as found, for the id of the error response.
    pub request: [u8; REQUEST_SIZE],
}

/// What a new instance does before taking new work (docs/ARCHITECTURE.md
/// §7.5).
///
/// In order: [`ShadowLog::log_recovered`](crate::ShadowLog::log_recovered);
/// attach the ring at (`req_cons`, `rsp_prod`); write each `repush`
/// response to its `rsp_idx` and
/// [`log_repushed`](crate::ShadowLog::log_repushed) it; [`free`](crate::ShadowLog::free)
/// `free` and the discarded corrupt entries; answer `poisoned` and the
/// answered corrupt entries with errors, and re-execute `reexecute`, all
/// through [`log_completing`](crate::ShadowLog::log_completing); publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryPlan {
    /// The shared `rsp_prod` the plan starts from.
    pub rsp_prod: u32,
    /// Recovered `req_cons`: the next ring index to consume.
    pub req_cons: u32,
    /// `rsp_prod + repush.len()`: the private response producer once the
    /// saved responses are re-pushed.
    pub rsp_prod_pvt: u32,
    pub repush: Vec<Repush>,
    pub free: Vec<EntryId>,
    pub reexecute: Vec<InflightEntry>,
    pub poisoned: Vec<InflightEntry>,
    pub corrupt: Vec<CorruptEntry>,
    /// Responses the guest waits for that no entry accounts for.
    pub lost: u32,
}

impl RecoveryPlan {
    /// Responses the guest waits for: `req_cons - rsp_prod`.
    pub fn outstanding(&self) -> u32 {
        self.req_cons.wrapping_sub(self.rsp_prod)
    }

    /// Every entry the plan names, list by list (each live entry of the
    /// log appears exactly once).
    pub fn entries(&self) -> impl Iterator<Item = EntryId> + '_ {
        self.repush
            .iter()
            .map(|r| r.entry)
            .chain(self.free.iter().copied())
            .chain(self.reexecute.iter().map(|e| e.entry))
            .chain(self.poisoned.iter().map(|e| e.entry))
            .chain(self.corrupt.iter().map(|c| c.entry))
    }

    /// Corrupt entries to answer with an error.
    pub fn corrupt_to_answer(&self) -> impl Iterator<Item = &CorruptEntry> {
        self.corrupt
            .iter()
            .filter(|c| c.action == CorruptAction::Answer)
    }
}

/// Plans recovery from `log` (docs/ARCHITECTURE.md §7.5); the rules are in the
/// [module documentation](crate::plan). `rsp_prod` and `req_prod` are the ring's
/// shared indices, `ring_size` its slot count.
///
/// Never panics: anything inconsistent in a single entry lands in
/// `corrupt`; only ring-level inconsistencies are errors.
pub fn plan_recovery(
    log: &LogSnapshot,
    rsp_prod: u32,
    req_prod: u32,
    ring_size: u32,
    poison_threshold: u32,
) -> Result<RecoveryPlan, ShadowError> {
    let h = &log.header;
    h.validate()?;
    let count = u32::try_from(log.entries.len()).unwrap_or(u32::MAX);
    if h.entry_count != ring_size || count != ring_size {
        return Err(ShadowError::SizeMismatch {
            log: count,
            ring: ring_size,
        });
    }
    let size = ring_size;
    let bad_indices = || ShadowError::BadIndices {
        rsp_prod,
        rsp_prod_pvt: h.rsp_prod_pvt,
        req_cons: h.req_cons,
        size,
    };
    // Offsets from rsp_prod: 0 <= pvt <= req_cons <= size.
    let pvt_off = h.rsp_prod_pvt.wrapping_sub(rsp_prod);
    let cons_off = h.req_cons.wrapping_sub(rsp_prod);
    if pvt_off > cons_off || cons_off > size {
        return Err(bad_indices());
    }

    let mut corrupt: Vec<(EntryId, CorruptReason, &crate::EntrySnapshot)> = Vec::new();
    let mut inflight = Vec::new();
    let mut completing = Vec::new();
    for (i, e) in log.entries.iter().enumerate() {
        // `count` fits u32, checked above.
        let id = EntryId(i as u32);
        let reason = match e.state() {
            Some(EntryState::Free) => continue,
            Some(EntryState::Inflight) => match check_inflight(e, h.req_cons, h.next_seq) {
                Ok(()) => {
                    inflight.push((id, e));
                    continue;
                }
                Err(reason) => reason,
            },
            Some(EntryState::Completing) => {
                // rsp_idx in [rsp_prod - size, logged rsp_prod_pvt].
                let from_oldest = e.rsp_idx.wrapping_sub(rsp_prod.wrapping_sub(size));
                if from_oldest <= size.saturating_add(pvt_off) {
                    completing.push((id, e));
                    continue;
                }
                CorruptReason::RspIdxOutOfWindow { rsp_idx: e.rsp_idx }
            }
            Some(EntryState::Rewriting) => CorruptReason::InterruptedRewrite,
            None => CorruptReason::BadState(e.state),
        };
        corrupt.push((id, reason, e));
    }

    let inflight = split_duplicates(
        inflight,
        |e| e.ring_idx,
        &mut corrupt,
        |ring_idx| CorruptReason::DuplicateRingIdx { ring_idx },
    );
    let completing = split_duplicates(
        completing,
        |e| e.rsp_idx,
        &mut corrupt,
        |rsp_idx| CorruptReason::DuplicateRspIdx { rsp_idx },
    );

    // Rule 3: only the entry consumed last may sit at the logged req_cons.
    let caught_up = inflight.iter().any(|(_, e)| e.ring_idx == h.req_cons);
    let req_cons = h.req_cons.wrapping_add(u32::from(caught_up));
    let expected = req_cons.wrapping_sub(rsp_prod);
    if expected > size {
        return Err(bad_indices());
    }
    if req_prod.wrapping_sub(req_cons) > size {
        return Err(ShadowError::RequestOverflow {
            req_prod,
            req_cons,
            size,
        });
    }

    // Rule 4.
    let mut free = Vec::new();
    let mut unpublished = Vec::new();
    for (id, e) in completing {
        let from_oldest = e.rsp_idx.wrapping_sub(rsp_prod.wrapping_sub(size));
        if from_oldest < size {
            free.push(id);
        } else {
            unpublished.push((id, e));
        }
    }
    unpublished.sort_by_key(|(id, e)| (e.rsp_idx.wrapping_sub(rsp_prod), *id));
    let repush: Vec<Repush> = unpublished
        .iter()
        .zip(0u32..)
        .map(|((id, e), k)| Repush {
            entry: *id,
            rsp_idx: rsp_prod.wrapping_add(k),
            old_rsp_idx: e.rsp_idx,
            response: e.response,
        })
        .collect();

    // Rule 5.
    let mut inflight: Vec<InflightEntry> = inflight
        .into_iter()
        .map(|(entry, e)| InflightEntry {
            entry,
            seq: e.seq,
            ring_idx: e.ring_idx,
            progress: e.progress,
            replays: e.replays,
            request: e.request,
        })
        .collect();
    inflight.sort_by_key(|e| (e.seq, e.entry));
    let (poisoned, reexecute): (Vec<_>, Vec<_>) = inflight
        .into_iter()
        .partition(|e| e.replays.saturating_add(1) >= poison_threshold);

    // Rule 6.
    let found = repush.len() + reexecute.len() + poisoned.len();
    let found = u32::try_from(found).unwrap_or(u32::MAX);
    if found > expected {
        return Err(ShadowError::TooManyOutstanding { expected, found });
    }
    let mut deficit = expected - found;
    corrupt.sort_by_key(|(id, _, e)| {
        let claimed_live = matches!(
            e.state(),
            Some(EntryState::Inflight | EntryState::Completing | EntryState::Rewriting)
        );
        (!claimed_live, e.seq, *id)
    });
    let corrupt: Vec<CorruptEntry> = corrupt
        .into_iter()
        .map(|(entry, reason, e)| {
            let action = if deficit > 0 {
                deficit -= 1;
                CorruptAction::Answer
            } else {
                CorruptAction::Discard
            };
            tracing::warn!(%entry, ?reason, ?action, "corrupt shadow log entry");
            CorruptEntry {
                entry,
                reason,
                action,
                request: e.request,
            }
        })
        .collect();
    if deficit > 0 {
        tracing::error!(lost = deficit, "requests missing from the shadow log");
    }

    let rsp_prod_pvt = rsp_prod.wrapping_add(u32::try_from(repush.len()).unwrap_or(0));
    Ok(RecoveryPlan {
        rsp_prod,
        req_cons,
        rsp_prod_pvt,
        repush,
        free,
        reexecute,
        poisoned,
        corrupt,
        lost: deficit,
    })
}

fn check_inflight(
    e: &crate::EntrySnapshot,
    req_cons: u32,
    next_seq: u64,
) -> Result<(), CorruptReason> {
    if e.seq >= next_seq {
        return Err(CorruptReason::SeqFromFuture {
            seq: e.seq,
            next_seq,
        });
    }
    let behind = req_cons.wrapping_sub(e.ring_idx);
    if behind == 0 {
        // The last request consumed, its req_cons store cut off.
        if e.seq + 1 != next_seq {
            return Err(CorruptReason::RingIdxAhead {
                ring_idx: e.ring_idx,
            });
        }
        return Ok(());
    }
    // Requests consumed after this one each took a later seq.
    let max_behind = (next_seq - e.seq).min(1 << 31);
    if u64::from(behind) > max_behind {
        return Err(CorruptReason::RingIdxOutOfWindow {
            ring_idx: e.ring_idx,
        });
    }
    Ok(())
}

/// Moves every entry whose `key` is shared with another into `corrupt`.
fn split_duplicates<'a>(
    entries: Vec<(EntryId, &'a crate::EntrySnapshot)>,
    key: impl Fn(&crate::EntrySnapshot) -> u32,
    corrupt: &mut Vec<(EntryId, CorruptReason, &'a crate::EntrySnapshot)>,
    reason: impl Fn(u32) -> CorruptReason,
) -> Vec<(EntryId, &'a crate::EntrySnapshot)> {
    let mut seen: HashMap<u32, usize> = HashMap::new();
    for (_, e) in &entries {
        *seen.entry(key(e)).or_default() += 1;
    }
    let (dups, unique): (Vec<_>, Vec<_>) = entries
        .into_iter()
        .partition(|(_, e)| seen.get(&key(e)).copied().unwrap_or(0) > 1);
    corrupt.extend(dups.into_iter().map(|(id, e)| (id, reason(key(e)), e)));
    unique
}

#[cfg(test)]
mod tests;
