//! Verified block I/O through any [`BlockDevice`]: deterministic data,
//! one request at a time, and short verifying workloads.

use std::time::{Duration, Instant};

use shadowback_guest::device::{BlockDevice, BlockRequest, Completion, Status};
use shadowback_guest::workload::{Report, VerifyConfig, VerifyWorkload};

use crate::REPLY_TIMEOUT;

/// Deterministic bytes for a seed (splitmix64).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Submits one request and waits for its completion.
pub fn complete_one(
    dev: &mut dyn BlockDevice,
    req: &BlockRequest<'_>,
) -> Result<Completion, String> {
    const TAG: u64 = 0x7e57;
    dev.submit(TAG, req)
        .map_err(|e| format!("submit {:?}: {e}", req.op))?;
    dev.kick().map_err(|e| format!("kick: {e}"))?;
    let deadline = Instant::now() + REPLY_TIMEOUT;
    let mut out = Vec::new();
    while out.is_empty() {
        if Instant::now() > deadline {
            return Err(format!(
                "{:?} at sector {} not completed within {REPLY_TIMEOUT:?}",
                req.op, req.sector
            ));
        }
        dev.poll_completions(Duration::from_millis(100), &mut out)
            .map_err(|e| format!("poll for {:?}: {e}", req.op))?;
    }
    if out.len() != 1 || out[0].tag != TAG {
        return Err(format!(
            "expected one completion with tag {TAG}, got {out:?}"
        ));
    }
    Ok(out.remove(0))
}

/// Writes `data` at `sector`.
pub fn write(dev: &mut dyn BlockDevice, sector: u64, data: &[u8]) -> Result<(), String> {
    let c = complete_one(dev, &BlockRequest::write(sector, data))?;
    if c.status != Status::Ok {
        return Err(format!(
            "write of {} bytes at sector {sector}: {:?}",
            data.len(),
            c.status
        ));
    }
    Ok(())
}

/// Reads `sectors` at `sector` and returns the data.
pub fn read(dev: &mut dyn BlockDevice, sector: u64, sectors: u32) -> Result<Vec<u8>, String> {
    let c = complete_one(dev, &BlockRequest::read(sector, sectors, true))?;
    match (c.status, c.data) {
        (Status::Ok, Some(data)) => Ok(data),
        (status, _) => Err(format!("read of {sectors} sectors at {sector}: {status:?}")),
    }
}

/// Reads back `expected.len()` bytes at `sector` and compares.
pub fn check(dev: &mut dyn BlockDevice, sector: u64, expected: &[u8]) -> Result<(), String> {
    let sectors = u32::try_from(expected.len() / 512).expect("small request");
    let got = read(dev, sector, sectors)?;
    match got.iter().zip(expected).position(|(a, b)| a != b) {
        None if got.len() == expected.len() => Ok(()),
        None => Err(format!(
            "read {} bytes at sector {sector}, expected {}",
            got.len(),
            expected.len()
        )),
        Some(i) => Err(format!(
            "data at sector {sector} differs at byte {i}: got {:#04x}, expected {:#04x}",
            got[i], expected[i]
        )),
    }
}

/// A normal verified write and read: one 4 KiB request and one 64 KiB
/// request (indirect when the device uses indirect descriptors).
pub fn verified_io(dev: &mut dyn BlockDevice, sector: u64, seed: u64) -> Result<(), String> {
    let small = pattern(seed, 4096);
    write(dev, sector, &small)?;
    check(dev, sector, &small)?;
    let big = pattern(seed ^ 0xb16, 64 * 1024);
    write(dev, sector + 8, &big)?;
    check(dev, sector + 8, &big)
}

/// A short [`VerifyWorkload`] run on `[start, start + sectors)`; keep the
/// workload to verify across runs.
pub fn verify_workload(seed: u64, start: u64, sectors: u64) -> VerifyWorkload {
    VerifyWorkload::new(VerifyConfig {
        seed,
        queue_depth: 8,
        max_bytes: 64 * 1024,
        duration: Some(Duration::from_secs(5)),
        max_ops: Some(150),
        final_check: true,
        region: Some((start, sectors)),
        assume_zeroed: true,
        stall_timeout: REPLY_TIMEOUT,
        ..VerifyConfig::default()
    })
}

/// Runs `w` on `dev` and checks the report with [`assert_verified`].
pub fn run_clean(w: &mut VerifyWorkload, dev: &mut dyn BlockDevice, what: &str) -> Report {
    let report = w
        .run(dev, &mut |_| {})
        .unwrap_or_else(|e| panic!("{what}: verify workload failed: {e}"));
    assert_verified(&report, what);
    report
}

/// Checks a verifying run: operations done, no wrong data, no I/O error,
/// and a final check that verified something.
pub fn assert_verified(report: &Report, what: &str) {
    assert!(report.ops > 0, "{what}: no ops completed: {report:?}");
    assert_eq!(
        report.verify_failures, 0,
        "{what}: verify failures: {:?}",
        report.failures
    );
    assert_eq!(report.io_errors, 0, "{what}: I/O errors: {report:?}");
    assert!(
        report.sectors_verified_final > 0,
        "{what}: final check verified nothing"
    );
}

/// [`assert_verified`], and nothing lost or completed twice.
pub fn assert_clean_report(report: &Report, what: &str) {
    assert_eq!(report.lost, 0, "{what}: lost: {:?}", report.failures);
    assert_eq!(
        report.duplicates, 0,
        "{what}: duplicates: {:?}",
        report.failures
    );
    assert_verified(report, what);
}

/// A verifying guest on a disk of its own that runs for the whole of a
/// test while another client misbehaves (issue 11's "Done when"): rounds
/// of [`verified_io`] on sectors it cycles through, in a thread, from
/// [`start`](Self::start) to [`finish`](Self::finish). Any error or wrong
/// data ends it, and `finish` fails the test with it.
pub struct Bystander<D: BlockDevice + Send + 'static> {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    rounds: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<(D, Result<u64, String>)>>,
}

impl<D: BlockDevice + Send + 'static> Bystander<D> {
    /// Starts verified I/O on `dev` (seeds from `seed` on; sectors below
    /// 4096).
    pub fn start(mut dev: D, seed: u64) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let rounds = std::sync::Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, rounds) = (stop.clone(), rounds.clone());
            std::thread::spawn(move || {
                let mut done = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let sector = 256 * (done % 16);
                    if let Err(e) = verified_io(&mut dev, sector, seed.wrapping_add(done)) {
                        return (dev, Err(format!("round {done}: {e}")));
                    }
                    done += 1;
                    rounds.store(done, Ordering::Relaxed);
                }
                (dev, Ok(done))
            })
        };
        Bystander {
            stop,
            rounds,
            thread: Some(thread),
        }
    }

    /// Waits (at most [`REPLY_TIMEOUT`]) for one more round to complete
    /// after this call: the guest is making progress now, not only before
    /// and after. Fails the test otherwise.
    pub fn progressing(&self, what: &str) {
        use std::sync::atomic::Ordering;
        let from = self.rounds.load(Ordering::Relaxed);
        let deadline = Instant::now() + REPLY_TIMEOUT;
        // Two more: the round running now may have started before.
        while self.rounds.load(Ordering::Relaxed) < from + 2 {
            let ended = self.thread.as_ref().is_none_or(|t| t.is_finished());
            assert!(
                !ended && Instant::now() < deadline,
                "{what}: the bystander made no progress (stopped after {from} rounds{})",
                if ended { ", it failed" } else { "" }
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the I/O; returns the device and the rounds done, failing the
    /// test on any error or wrong data, or if no round completed.
    pub fn finish(mut self, what: &str) -> (D, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let thread = self.thread.take().expect("running");
        let (dev, result) = thread.join().expect("the bystander thread panicked");
        match result {
            Ok(rounds) if rounds > 0 => (dev, rounds),
            Ok(_) => panic!("{what}: the bystander completed no round"),
            Err(e) => panic!("{what}: the bystander's verified I/O failed: {e}"),
        }
    }
}

impl<D: BlockDevice + Send + 'static> Drop for Bystander<D> {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
