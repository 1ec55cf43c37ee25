//! The recovery planner fed arbitrary shadow logs: a dead instance (or
//! memory corruption) may have left anything in the log. Either a raw byte
//! image through [`LogSnapshot::parse`], or a structured one (valid header,
//! entries near the ring's indices) so that most inputs reach the
//! per-entry rules; then [`plan_recovery`] and the device models' record
//! decoders on every saved request and response, as a takeover does.

use std::collections::HashSet;

use arbitrary::{Result, Unstructured};
use shadowback_blkback::record::{blkif as blkif_rec, virtio_blk as vblk_rec};
use shadowback_netback::record::{response as net_rsp, rx as rx_rec, tx as tx_rec};
use shadowback_shadow::{
    plan_recovery, CorruptAction, EntryState, LogSnapshot, RecoveryPlan, REQUEST_SIZE,
    RESPONSE_SIZE,
};

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let _ = run_input(&mut u, data);
}

fn run_input(u: &mut Unstructured, data: &[u8]) -> Result<()> {
    let raw = u.ratio(1, 8)?;
    let log = if raw {
        match LogSnapshot::parse(data) {
            Ok(log) => log,
            Err(_) => return Ok(()),
        }
    } else {
        structured(u)?
    };
    let size = if raw {
        log.header.entry_count
    } else {
        log.entries.len() as u32
    };
    let rsp_prod: u32 = if u.ratio(1, 2)? {
        log.header.rsp_prod_pvt.wrapping_sub(u.int_in_range(0..=4)?)
    } else {
        u.arbitrary()?
    };
    let req_prod = log
        .header
        .req_cons
        .wrapping_add(u.int_in_range(0..=size + 1)?);
    let threshold = u.int_in_range(0..=4)?;
    for entry in &log.entries {
        decode_records(&entry.request, &entry.response);
    }
    if let Ok(plan) = plan_recovery(&log, rsp_prod, req_prod, size, threshold) {
        check(&plan, &log, size);
    }
    Ok(())
}

fn structured(u: &mut Unstructured) -> Result<LogSnapshot> {
    let size = 1u32 << u.int_in_range(0..=6)?;
    let mut log = LogSnapshot::empty(size);
    let base: u32 = u.arbitrary()?;
    let h = &mut log.header;
    h.rsp_prod_pvt = base;
    h.req_cons = base.wrapping_add(u.int_in_range(0..=size + 1)?);
    h.next_seq = u.int_in_range(0..=3 * u64::from(size))?;
    h.generation = u.arbitrary()?;
    h.complete = u.arbitrary()?;
    let (req_cons, next_seq) = (h.req_cons, h.next_seq);
    for e in log.entries.iter_mut() {
        if u.ratio(1, 3)? {
            continue;
        }
        e.state = match u.int_in_range(0..=8)? {
            0..=3 => EntryState::Inflight.word(),
            4..=6 => EntryState::Completing.word(),
            7 => EntryState::Rewriting.word(),
            _ => u.arbitrary()?,
        };
        e.ring_idx = req_cons.wrapping_sub(u.int_in_range(0..=size + 1)?);
        e.seq = next_seq.wrapping_sub(u.int_in_range(0..=u64::from(size) + 1)?);
        e.rsp_idx = base
            .wrapping_add(u.int_in_range(0..=2 * size)?)
            .wrapping_sub(size);
        e.replays = u.int_in_range(0..=4)?;
        e.progress = u.arbitrary()?;
        u.fill_buffer(&mut e.request)?;
        u.fill_buffer(&mut e.response)?;
    }
    Ok(log)
}

/// What takeover decodes from saved bytes: never a panic.
fn decode_records(request: &[u8; REQUEST_SIZE], response: &[u8; RESPONSE_SIZE]) {
    let _ = blkif_rec::request_id(request);
    let _ = blkif_rec::response_operation(request);
    let _ = blkif_rec::error_response(request);
    let _ = blkif_rec::response_id_status(response);
    let _ = vblk_rec::logged_head(request);
    let _ = vblk_rec::saved_used_elem(response);
    if let Ok(rec) = tx_rec::decode(request) {
        let _ = tx_rec::error_response(&rec);
        let _ = tx_rec::reassemble(&[rec]);
    }
    let _ = rx_rec::decode(request);
    let _ = net_rsp::decode_tx(response);
    let _ = net_rsp::decode_rx(response);
}

/// The plan's promises (shadow/src/plan.rs, rules 1–7).
fn check(plan: &RecoveryPlan, log: &LogSnapshot, size: u32) {
    let mut seen = HashSet::new();
    for id in plan.entries() {
        assert!(id.index() < size, "{id:?} beyond the log");
        assert!(seen.insert(id), "{id:?} planned twice: {plan:#?}");
        let state = log.entries[id.index() as usize].state();
        assert_ne!(state, Some(EntryState::Free), "a free entry planned");
    }
    // Every live entry is accounted for.
    let live = log
        .entries
        .iter()
        .filter(|e| e.state() != Some(EntryState::Free))
        .count();
    assert_eq!(seen.len(), live, "live entries left out of the plan");
    let outstanding = plan.outstanding();
    assert!(outstanding <= size);
    assert_eq!(
        plan.rsp_prod_pvt,
        plan.rsp_prod.wrapping_add(plan.repush.len() as u32)
    );
    for (k, r) in plan.repush.iter().enumerate() {
        assert_eq!(r.rsp_idx, plan.rsp_prod.wrapping_add(k as u32));
    }
    let answered = plan.repush.len()
        + plan.reexecute.len()
        + plan.poisoned.len()
        + plan.corrupt_to_answer().count();
    assert_eq!(
        answered as u64 + u64::from(plan.lost),
        u64::from(outstanding),
        "answers do not add up to the requests the guest waits for"
    );
    assert!(plan
        .corrupt
        .iter()
        .all(|c| c.action == CorruptAction::Answer || c.action == CorruptAction::Discard));
    assert!(plan.reexecute.windows(2).all(|w| w[0].seq <= w[1].seq));
}
