use super::*;
use crate::{EntrySnapshot, LogHeader};

// The planner treats records as bytes; these tests store an id in bytes
// 8..16 of a request (where blkif keeps it) and echo it in bytes 0..8 of
// the response.
fn test_request_id(request: &[u8; REQUEST_SIZE]) -> u64 {
    let mut id = [0u8; 8];
    id.copy_from_slice(&request[8..16]);
    u64::from_ne_bytes(id)
}

fn test_response(request: &[u8; REQUEST_SIZE]) -> [u8; RESPONSE_SIZE] {
    let mut rsp = [0u8; RESPONSE_SIZE];
    rsp[0..8].copy_from_slice(&test_request_id(request).to_ne_bytes());
    rsp[8] = request[0];
    rsp
}

/// Bases the scenarios are replayed at: ring indices wrap near u32::MAX
/// and cross 2^31.
const BASES: [u32; 6] = [0, 1000, u32::MAX - 5, u32::MAX, (1 << 31) - 3, 3];

const SIZE: u32 = 8;
const THRESHOLD: u32 = 3;

/// A log snapshot being put together, indices relative to `base`.
struct Scene {
    snap: LogSnapshot,
    base: u32,
    used: u32,
}

impl Scene {
    /// Logged `req_cons` = base + `consumed`, `rsp_prod_pvt` = base +
    /// `produced`, `next_seq` = 100.
    fn new(base: u32, consumed: u32, produced: u32) -> Self {
        let mut snap = LogSnapshot::empty(SIZE);
        snap.header.req_cons = base.wrapping_add(consumed);
        snap.header.rsp_prod_pvt = base.wrapping_add(produced);
        snap.header.next_seq = 100;
        Scene {
            snap,
            base,
            used: 0,
        }
    }

    fn idx(&self, k: u32) -> u32 {
        self.base.wrapping_add(k)
    }

    /// Fills the next entry (in reverse array order, so the planner has to
    /// sort) and returns it.
    fn put(&mut self, state: u32, ring_k: u32, seq: u64) -> EntryId {
        self.used += 1;
        let i = SIZE - self.used;
        let mut request = [0u8; REQUEST_SIZE];
        request[8..16].copy_from_slice(&seq.to_ne_bytes());
        self.snap.entries[i as usize] = EntrySnapshot {
            state,
            ring_idx: self.idx(ring_k),
            seq,
            request,
            response: test_response(&request),
            ..EntrySnapshot::default()
        };
        EntryId(i)
    }

    fn inflight(&mut self, ring_k: u32, seq: u64) -> EntryId {
        self.put(EntryState::Inflight.word(), ring_k, seq)
    }

    fn completing(&mut self, ring_k: u32, seq: u64, rsp_k: u32) -> EntryId {
        let id = self.put(EntryState::Completing.word(), ring_k, seq);
        self.entry(id).rsp_idx = self.idx(rsp_k);
        id
    }

    fn entry(&mut self, id: EntryId) -> &mut EntrySnapshot {
        &mut self.snap.entries[id.0 as usize]
    }

    /// Plans with shared rsp_prod = base + `published`, req_prod = the
    /// logged req_cons + 1.
    fn plan(&self, published: u32) -> Result<RecoveryPlan, ShadowError> {
        let req_prod = self.snap.header.req_cons.wrapping_add(1);
        plan_recovery(&self.snap, self.idx(published), req_prod, SIZE, THRESHOLD)
    }
}

/// Every non-FREE entry appears exactly once in the plan, and the
/// responses the plan produces match what the guest waits for.
fn assert_accounts(snap: &LogSnapshot, plan: &RecoveryPlan) {
    let mut seen: Vec<EntryId> = plan.entries().collect();
    seen.sort();
    let live: Vec<EntryId> = snap
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.state != EntryState::Free.word())
        .map(|(i, _)| EntryId(i as u32))
        .collect();
    assert_eq!(seen, live, "every live entry exactly once");
    let answers = plan.repush.len() + plan.reexecute.len() + plan.poisoned.len();
    let answers = answers + plan.corrupt_to_answer().count() + plan.lost as usize;
    assert_eq!(answers as u32, plan.outstanding());
    assert_eq!(
        plan.rsp_prod_pvt,
        plan.rsp_prod.wrapping_add(plan.repush.len() as u32)
    );
}

#[test]
fn an_empty_log_plans_nothing() {
    for base in BASES {
        let scene = Scene::new(base, 0, 0);
        let plan = scene.plan(0).unwrap();
        assert_eq!(plan.req_cons, base);
        assert_eq!(plan.rsp_prod_pvt, base);
        assert_eq!(plan.outstanding(), 0);
        assert!(plan.repush.is_empty() && plan.reexecute.is_empty() && plan.corrupt.is_empty());
        assert_accounts(&scene.snap, &plan);
    }
}

#[test]
fn visible_completions_are_freed() {
    for base in BASES {
        // Requests 0..4 consumed and answered at 0..4; 0..3 published,
        // but their entries not freed yet (the crash came first).
        let mut scene = Scene::new(base, 4, 4);
        let old = scene.completing(0, 1, 0);
        let visible = scene.completing(2, 3, 2);
        let visible2 = scene.completing(1, 2, 1);
        let unpublished = scene.completing(3, 4, 3);
        let plan = scene.plan(3).unwrap();
        let mut free = plan.free.clone();
        free.sort();
        let mut expect = vec![old, visible, visible2];
        expect.sort();
        assert_eq!(free, expect);
        assert_eq!(plan.repush.len(), 1);
        assert_eq!(plan.repush[0].entry, unpublished);
        assert_accounts(&scene.snap, &plan);
    }
}

#[test]
fn unpublished_completions_are_repushed_in_rsp_idx_order() {
    for base in BASES {
        // Out-of-order completion: requests 0..6 consumed, responses in
        // slots 0..5 for requests 5, 1, 4, 2, 0; slots 0 and 1 published
        // (slot 0's entry already freed); request 3 still in flight.
        let mut scene = Scene::new(base, 6, 5);
        let c = scene.completing(0, 10, 4);
        let a = scene.completing(4, 14, 2);
        let b = scene.completing(2, 12, 3);
        let published = scene.completing(1, 11, 1);
        scene.inflight(3, 13);
        let plan = scene.plan(2).unwrap();
        let order: Vec<(EntryId, u32, u32)> = plan
            .repush
            .iter()
            .map(|r| (r.entry, r.rsp_idx, r.old_rsp_idx))
            .collect();
        assert_eq!(
            order,
            vec![
                (a, scene.idx(2), scene.idx(2)),
                (b, scene.idx(3), scene.idx(3)),
                (c, scene.idx(4), scene.idx(4)),
            ]
        );
        assert_eq!(
            plan.repush[0].response,
            scene.snap.entries[a.0 as usize].response
        );
        assert_eq!(plan.rsp_prod_pvt, scene.idx(5));
        assert_eq!(plan.free, vec![published]);
        assert_eq!(plan.reexecute.len(), 1);
        assert_accounts(&scene.snap, &plan);
    }
}

#[test]
fn repushed_responses_are_renumbered_from_rsp_prod() {
    for base in BASES {
        // Slot 2's response is lost (its entry scribbled to a bad state):
        // the responses at 3 and 4 move down to 2 and 3, the corrupt entry
        // is answered after them.
        let mut scene = Scene::new(base, 5, 5);
        let x = scene.completing(4, 14, 4);
        let y = scene.completing(3, 13, 3);
        let z = scene.completing(2, 12, 2);
        scene.entry(z).state = 77;
        let plan = scene.plan(2).unwrap();
        let order: Vec<(EntryId, u32)> = plan.repush.iter().map(|r| (r.entry, r.rsp_idx)).collect();
        assert_eq!(order, vec![(y, scene.idx(2)), (x, scene.idx(3))]);
        assert_eq!(plan.rsp_prod_pvt, scene.idx(4));
        assert_eq!(plan.corrupt.len(), 1);
        assert_eq!(plan.corrupt[0].entry, z);
        assert_eq!(plan.corrupt[0].reason, CorruptReason::BadState(77));
        assert_eq!(plan.corrupt[0].action, CorruptAction::Answer);
        assert_eq!(test_request_id(&plan.corrupt[0].request), 12);
        assert_accounts(&scene.snap, &plan);
    }
}

#[test]
fn inflight_requests_are_reexecuted_in_seq_order() {
    for base in BASES {
        let mut scene = Scene::new(base, 3, 0);
        let third = scene.inflight(2, 7);
        let first = scene.inflight(0, 5);
        let second = scene.inflight(1, 6);
        scene.entry(second).progress = 9;
        let plan = scene.plan(0).unwrap();
        let order: Vec<EntryId> = plan.reexecute.iter().map(|e| e.entry).collect();
        assert_eq!(order, vec![first, second, third]);
        assert_eq!(plan.reexecute[1].progress, 9);
        assert_eq!(
            plan.reexecute[0].request,
            scene.snap.entries[first.0 as usize].request
        );
        assert_eq!(plan.req_cons, scene.idx(3));
        assert_accounts(&scene.snap, &plan);
    }
}

#[test]
fn a_slow_request_far_behind_rsp_prod_is_valid() {
    for base in BASES {
        // Request 0 is still in flight while the guest went around the
        // ring 50 times with the other slots.
        let mut scene = Scene::new(base, 401, 400);
        scene.snap.header.next_seq = 1000;
        let slow = scene.inflight(0, 599);
        let plan = scene.plan(400).unwrap();
        assert_eq!(plan.reexecute.len(), 1);
        assert_eq!(plan.reexecute[0].entry, slow);
        assert_accounts(&scene.snap, &plan);
    }
}

#[test]
fn req_cons_covers_a_request_consumed_without_its_req_cons_store() {
    for base in BASES {
        // Crash between "state = INFLIGHT" and "req_cons = i + 1".
        let mut scene = Scene::new(base, 2, 0);
        scene.inflight(0, 97);
        scene.inflight(1, 98);
        let last = scene.inflight(2, 99);
        let plan = scene.plan(0).unwrap();
        assert_eq!(plan.req_cons, scene.idx(3));
        assert_eq!(plan.reexecute.last().unwrap().entry, last);
        assert_accounts(&scene.snap, &plan);

        // Without that entry, the logged req_cons stands.
        scene.entry(last).state = 0;
        let plan = scene.plan(0).unwrap();
        assert_eq!(plan.req_cons, scene.idx(2));
    }
}

#[test]
fn poison_counts_executions() {
    for base in BASES {
        let mut scene = Scene::new(base, 4, 0);
        let fresh = scene.inflight(0, 1);
        let once = scene.inflight(1, 2);
        let twice = scene.inflight(2, 3);
        let many = scene.inflight(3, 4);
        scene.entry(once).replays = 1;
        scene.entry(twice).replays = 2;
        scene.entry(many).replays = u32::MAX;
        // Threshold 3: executed by 3 instances (replays = 2) is poison.
        let plan = scene.plan(0).unwrap();
        let re: Vec<EntryId> = plan.reexecute.iter().map(|e| e.entry).collect();
        let po: Vec<EntryId> = plan.poisoned.iter().map(|e| e.entry).collect();
        assert_eq!(re, vec![fresh, once]);
        assert_eq!(po, vec![twice, many]);
        assert_accounts(&scene.snap, &plan);

        for threshold in [0, 1] {
            let plan = plan_recovery(&scene.snap, base, scene.idx(4), SIZE, threshold).unwrap();
            assert!(plan.reexecute.is_empty());
            assert_eq!(plan.poisoned.len(), 4);
        }
        let plan = plan_recovery(&scene.snap, base, scene.idx(4), SIZE, u32::MAX).unwrap();
        assert_eq!(plan.poisoned.len(), 1, "only the saturated counter");
    }
}

#[test]
fn completing_entries_are_never_poisoned() {
    let mut scene = Scene::new(0, 1, 1);
    let c = scene.completing(0, 1, 0);
    scene.entry(c).replays = 50;
    let plan = scene.plan(0).unwrap();
    assert_eq!(plan.repush.len(), 1);
    assert!(plan.poisoned.is_empty());
}

#[test]
fn a_bad_state_word_is_corrupt_alone() {
    for base in BASES {
        let mut scene = Scene::new(base, 3, 0);
        let good = scene.inflight(0, 10);
        let bad = scene.inflight(1, 11);
        let good2 = scene.inflight(2, 12);
        scene.entry(bad).state = 0xffff_ffff;
        let plan = scene.plan(0).unwrap();
        let re: Vec<EntryId> = plan.reexecute.iter().map(|e| e.entry).collect();
        assert_eq!(re, vec![good, good2]);
        assert_eq!(plan.corrupt.len(), 1);
        assert_eq!(plan.corrupt[0].entry, bad);
        assert_eq!(plan.corrupt[0].action, CorruptAction::Answer);
        assert_accounts(&scene.snap, &plan);
    }
}

#[test]
fn an_interrupted_rewrite_is_answered_again() {
    let mut scene = Scene::new(0, 1, 0);
    let e = scene.inflight(0, 10);
    scene.entry(e).state = EntryState::Rewriting.word();
    let plan = scene.plan(0).unwrap();
    assert_eq!(plan.corrupt[0].reason, CorruptReason::InterruptedRewrite);
    assert_eq!(plan.corrupt[0].action, CorruptAction::Answer);
    assert_accounts(&scene.snap, &plan);
}

#[test]
fn inflight_field_checks() {
    for base in BASES {
        let mut scene = Scene::new(base, 3, 0);
        let ahead = scene.inflight(7, 10);
        let future_seq = scene.inflight(0, 100);
        let at_cons_not_last = scene.inflight(3, 50);
        let too_old = scene.inflight(0u32.wrapping_sub(200), 98);
        let ok = scene.inflight(1, 97);
        let plan = scene.plan(0).unwrap();
        let reasons: HashMap<EntryId, CorruptReason> =
            plan.corrupt.iter().map(|c| (c.entry, c.reason)).collect();
        assert_eq!(
            reasons[&ahead],
            CorruptReason::RingIdxOutOfWindow {
                ring_idx: scene.idx(7)
            }
        );
        assert_eq!(
            reasons[&future_seq],
            CorruptReason::SeqFromFuture {
                seq: 100,
                next_seq: 100
            }
        );
        assert_eq!(
            reasons[&at_cons_not_last],
            CorruptReason::RingIdxAhead {
                ring_idx: scene.idx(3)
            }
        );
        assert!(matches!(
            reasons[&too_old],
            CorruptReason::RingIdxOutOfWindow { .. }
        ));
        assert_eq!(plan.reexecute.len(), 1);
        assert_eq!(plan.reexecute[0].entry, ok);
        // 3 responses owed, 1 valid: two corrupt ones answered (those that
        // claimed to be live, lowest seq first), the rest discarded.
        let answered: Vec<EntryId> = plan.corrupt_to_answer().map(|c| c.entry).collect();
        assert_eq!(answered, vec![ahead, at_cons_not_last]);
        assert_eq!(plan.lost, 0);
        assert_accounts(&scene.snap, &plan);
    }
}

#[test]
fn duplicates_are_corrupt() {
    for base in BASES {
        let mut scene = Scene::new(base, 4, 4);
        let d1 = scene.inflight(1, 11);
        let d2 = scene.inflight(1, 12);
        let c1 = scene.completing(0, 10, 3);
        let c2 = scene.completing(2, 13, 3);
        let ok = scene.completing(3, 14, 2);
        let plan = scene.plan(2).unwrap();
        let mut corrupt: Vec<(EntryId, CorruptReason)> =
            plan.corrupt.iter().map(|c| (c.entry, c.reason)).collect();
        corrupt.sort_by_key(|c| c.0);
        let ring_idx = scene.idx(1);
        let rsp_idx = scene.idx(3);
        let mut expect = vec![
            (d1, CorruptReason::DuplicateRingIdx { ring_idx }),
            (d2, CorruptReason::DuplicateRingIdx { ring_idx }),
            (c1, CorruptReason::DuplicateRspIdx { rsp_idx }),
            (c2, CorruptReason::DuplicateRspIdx { rsp_idx }),
        ];
        expect.sort_by_key(|c| c.0);
        assert_eq!(corrupt, expect);
        assert_eq!(plan.repush.len(), 1);
        assert_eq!(plan.repush[0].entry, ok);
        // 2 owed, 1 valid: one corrupt entry answered.
        assert_eq!(plan.corrupt_to_answer().count(), 1);
        assert_accounts(&scene.snap, &plan);
    }
}

#[test]
fn completing_outside_the_window_is_corrupt() {
    for base in BASES {
        let mut scene = Scene::new(base, 3, 2);
        let beyond_pvt = scene.completing(0, 10, 3);
        let too_old = scene.completing(1, 11, 0u32.wrapping_sub(SIZE + 1));
        let oldest_ok = scene.completing(2, 12, 0u32.wrapping_sub(SIZE));
        let plan = scene.plan(0).unwrap();
        let reasons: HashMap<EntryId, CorruptReason> =
            plan.corrupt.iter().map(|c| (c.entry, c.reason)).collect();
        assert!(matches!(
            reasons[&beyond_pvt],
            CorruptReason::RspIdxOutOfWindow { .. }
        ));
        assert!(matches!(
            reasons[&too_old],
            CorruptReason::RspIdxOutOfWindow { .. }
        ));
        assert_eq!(plan.free, vec![oldest_ok]);
        assert_accounts(&scene.snap, &plan);
    }
}

#[test]
fn a_missing_request_is_reported_lost() {
    let mut scene = Scene::new(5, 3, 0);
    scene.inflight(0, 1);
    scene.inflight(2, 3);
    let plan = scene.plan(0).unwrap();
    assert_eq!(plan.lost, 1);
    assert_accounts(&scene.snap, &plan);
}

#[test]
fn ring_level_inconsistencies_are_errors() {
    for base in BASES {
        // The guest moved rsp_prod past what the backend logged.
        let scene = Scene::new(base, 2, 2);
        assert!(matches!(scene.plan(3), Err(ShadowError::BadIndices { .. })));
        // rsp_prod_pvt ahead of req_cons.
        let scene = Scene::new(base, 2, 3);
        assert!(matches!(scene.plan(0), Err(ShadowError::BadIndices { .. })));
        // More than a ring of unanswered requests.
        let scene = Scene::new(base, SIZE + 1, 0);
        assert!(matches!(scene.plan(0), Err(ShadowError::BadIndices { .. })));
        // A ring's worth plus the request whose req_cons store was cut off.
        let mut scene = Scene::new(base, SIZE, 0);
        scene.snap.header.next_seq = 100;
        scene.inflight(SIZE, 99);
        assert!(matches!(scene.plan(0), Err(ShadowError::BadIndices { .. })));
        // req_prod more than a ring ahead.
        let scene = Scene::new(base, 1, 1);
        let r = plan_recovery(&scene.snap, scene.idx(1), scene.idx(1 + SIZE + 1), SIZE, 3);
        assert!(matches!(r, Err(ShadowError::RequestOverflow { .. })));
        let r = plan_recovery(&scene.snap, scene.idx(1), scene.idx(1 + SIZE), SIZE, 3);
        assert!(r.is_ok());
        // req_prod behind req_cons is a (huge) wrapping difference too.
        let r = plan_recovery(&scene.snap, scene.idx(1), scene.idx(0), SIZE, 3);
        assert!(matches!(r, Err(ShadowError::RequestOverflow { .. })));
    }
}

#[test]
fn more_valid_entries_than_owed_is_an_error() {
    let mut scene = Scene::new(0, 2, 0);
    scene.inflight(0, 1);
    scene.inflight(1, 2);
    // A third live entry for two consumed requests.
    scene.completing(1, 3, 0);
    assert!(matches!(
        scene.plan(0),
        Err(ShadowError::TooManyOutstanding {
            expected: 2,
            found: 3
        })
    ));
}

#[test]
fn header_and_size_are_checked() {
    let scene = Scene::new(0, 0, 0);
    assert!(matches!(
        plan_recovery(&scene.snap, 0, 0, SIZE * 2, 3),
        Err(ShadowError::SizeMismatch { .. })
    ));
    let mut snap = scene.snap.clone();
    snap.entries.pop();
    assert!(matches!(
        plan_recovery(&snap, 0, 0, SIZE, 3),
        Err(ShadowError::SizeMismatch { .. })
    ));
    let mut snap = scene.snap.clone();
    snap.header.magic = 1;
    assert!(matches!(
        plan_recovery(&snap, 0, 0, SIZE, 3),
        Err(ShadowError::BadMagic(1))
    ));
}

mod props {
    use super::*;
    use proptest::prelude::*;

    /// An offset that is mostly in `0..max`, sometimes anything.
    fn near(max: u32) -> impl Strategy<Value = u32> {
        prop_oneof![6 => 0..max, 1 => any::<u32>()]
    }

    /// Entries whose fields mostly fall near the indices of the scenario:
    /// `ring_idx` a little behind `req_cons`, `rsp_idx` around `rsp_prod`,
    /// `seq` a little below `next_seq`.
    fn entry(size: u32) -> impl Strategy<Value = (EntrySnapshot, u32, u32, u64)> {
        let state = prop_oneof![8 => 0u32..3, 1 => 3u32..5, 1 => any::<u32>()];
        let seq_back = prop_oneof![6 => 0u64..16, 1 => any::<u64>()];
        (
            state,
            near(2 * size + 2),
            near(2 * size + 2),
            seq_back,
            0u32..5,
            any::<u64>(),
        )
            .prop_map(|(state, ring_back, rsp_off, seq_back, replays, id)| {
                let mut request = [0u8; REQUEST_SIZE];
                request[8..16].copy_from_slice(&id.to_ne_bytes());
                let e = EntrySnapshot {
                    state,
                    replays,
                    request,
                    ..EntrySnapshot::default()
                };
                (e, ring_back, rsp_off, seq_back)
            })
    }

    /// (snapshot, rsp_prod, req_prod): a scenario whose ring indices are
    /// mostly consistent, so that plans (not just errors) get checked.
    fn scenario() -> impl Strategy<Value = (LogSnapshot, u32, u32)> {
        (0u32..4).prop_flat_map(|order| {
            let size = 1u32 << order;
            (
                proptest::collection::vec(entry(size), size as usize),
                any::<u32>(),
                near(size + 1),
                near(size + 1),
                near(size + 1),
                prop_oneof![4 => 0u64..64, 1 => any::<u64>()],
            )
                .prop_map(
                    move |(entries, rsp_prod, pvt_off, cons_gap, prod_gap, next_seq)| {
                        let mut snap = LogSnapshot::empty(size);
                        let pvt = rsp_prod.wrapping_add(pvt_off);
                        let req_cons = pvt.wrapping_add(cons_gap);
                        snap.header.rsp_prod_pvt = pvt;
                        snap.header.req_cons = req_cons;
                        snap.header.next_seq = next_seq;
                        snap.entries = entries
                            .into_iter()
                            .map(|(mut e, ring_back, rsp_off, seq_back)| {
                                e.ring_idx = req_cons.wrapping_sub(ring_back);
                                e.rsp_idx = rsp_prod.wrapping_sub(size).wrapping_add(rsp_off);
                                e.seq = next_seq.wrapping_sub(seq_back);
                                e
                            })
                            .collect();
                        (snap, rsp_prod, req_cons.wrapping_add(prod_gap))
                    },
                )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// Arbitrary snapshots and indices: a plan or an error, never a
        /// panic; a plan accounts for every live entry once, and every entry
        /// with an invalid state word is in `corrupt`.
        #[test]
        fn planner_never_panics(
            (snap, rsp_prod, req_prod) in scenario(),
            threshold in 0u32..5,
        ) {
            let size = snap.header.entry_count;
            if let Ok(plan) = plan_recovery(&snap, rsp_prod, req_prod, size, threshold) {
                assert_accounts(&snap, &plan);
                for (i, e) in snap.entries.iter().enumerate() {
                    if !matches!(e.state, 0..=2) {
                        prop_assert!(plan.corrupt.iter().any(|c| c.entry == EntryId(i as u32)));
                    }
                }
                prop_assert!(plan.outstanding() <= size);
                prop_assert!(req_prod.wrapping_sub(plan.req_cons) <= size);
                for (k, r) in plan.repush.iter().enumerate() {
                    prop_assert_eq!(r.rsp_idx, rsp_prod.wrapping_add(k as u32));
                }
                for w in plan.reexecute.windows(2) {
                    prop_assert!(w[0].seq <= w[1].seq);
                }
            }
        }

        /// Arbitrary bytes: parsing and planning never panic.
        #[test]
        fn arbitrary_bytes_never_panic(
            mut bytes in proptest::collection::vec(any::<u8>(), 0..2000),
            header_ok in any::<bool>(),
            order in 0u32..4,
            rsp_prod in any::<u32>(),
            req_prod in any::<u32>(),
        ) {
            if header_ok && bytes.len() >= 64 {
                let h = LogHeader::new(1 << order);
                bytes[0..8].copy_from_slice(&h.magic.to_ne_bytes());
                bytes[8..12].copy_from_slice(&h.version.to_ne_bytes());
                bytes[12..16].copy_from_slice(&h.entry_count.to_ne_bytes());
                bytes[44..48].copy_from_slice(&h.entry_size.to_ne_bytes());
            }
            if let Ok(snap) = LogSnapshot::parse(&bytes) {
                let size = snap.header.entry_count;
                let _ = plan_recovery(&snap, rsp_prod, req_prod, size, 3);
                let _ = plan_recovery(&snap, snap.header.rsp_prod_pvt, req_prod, size, 3);
            }
        }
    }
}
