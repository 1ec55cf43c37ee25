//! The "raw-uring" baseline of the block benchmark: random I/O straight on
//! a file with [`Engine`], from one thread, with no backend in between.
//!
//! Per-op work is kept to what any engine user pays: refills are pushed in
//! one batch, one `submit_and_wait(1)` per loop, one clock read per batch.

#![forbid(unsafe_code)]

use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shadowback_dataplane::uring::{
    AlignedBuf, Completion, Engine, EngineConfig, EngineError, IoBuffers, IoOp,
};

/// What one run measured.
#[derive(Debug, Clone)]
pub struct RawStats {
    /// Ops completed (all full transfers).
    pub ops: u64,
    /// From the first submission to the last completion.
    pub elapsed: Duration,
    /// Submission-to-reap latency of every op.
    pub latency: LatencyHistogram,
}

impl RawStats {
    /// Ops per second over the run.
    pub fn iops(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.ops as f64 / secs
        } else {
            0.0
        }
    }
}

/// Log-linear latency histogram: exact below 32 ns, then 32 buckets per
/// power of two (at most ~3 % relative error), fixed 15 KiB of counters.
#[derive(Clone)]
pub struct LatencyHistogram {
    counts: Box<[u64]>,
    total: u64,
    sum_ns: u128,
    min_ns: u64,
    max_ns: u64,
}

const SUB_BITS: u32 = 5;
const SUB_BUCKETS: usize = 1 << SUB_BITS;
/// Groups: one exact group for values below `SUB_BUCKETS`, then one per
/// exponent from `SUB_BITS` to 63.
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * SUB_BUCKETS;

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
            sum_ns: 0,
            min_ns: u64::MAX,
            max_ns: 0,
        }
    }
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("count", &self.total)
            .field("min_ns", &self.min_ns())
            .field("p50_ns", &self.percentile(50.0))
            .field("p99_ns", &self.percentile(99.0))
            .field("max_ns", &self.max_ns)
            .finish()
    }
}

impl LatencyHistogram {
    fn bucket(ns: u64) -> usize {
        if ns < SUB_BUCKETS as u64 {
            return ns as usize;
        }
        let exp = 63 - ns.leading_zeros(); // >= SUB_BITS
        let shift = exp - SUB_BITS;
        let mantissa = (ns >> shift) as usize & (SUB_BUCKETS - 1);
        (shift as usize + 1) * SUB_BUCKETS + mantissa
    }

    /// Smallest value that lands in `bucket`.
    fn bucket_floor(bucket: usize) -> u64 {
        if bucket < SUB_BUCKETS {
            return bucket as u64;
        }
        let shift = (bucket / SUB_BUCKETS - 1) as u32;
        ((SUB_BUCKETS + bucket % SUB_BUCKETS) as u64) << shift
    }

    /// Adds one sample.
    pub fn record(&mut self, ns: u64) {
        self.counts[Self::bucket(ns)] += 1;
        self.total += 1;
        self.sum_ns += u128::from(ns);
        self.min_ns = self.min_ns.min(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Smallest sample (0 when empty).
    pub fn min_ns(&self) -> u64 {
        if self.total == 0 {
            0
        } else {
            self.min_ns
        }
    }

    /// Largest sample (0 when empty).
    pub fn max_ns(&self) -> u64 {
        self.max_ns
    }

    /// Mean of the samples (0 when empty).
    pub fn mean_ns(&self) -> u64 {
        if self.total == 0 {
            0
        } else {
            u64::try_from(self.sum_ns / u128::from(self.total)).unwrap_or(u64::MAX)
        }
    }

    /// The `p`-th percentile (0..=100), as the lower edge of its bucket
    /// clamped to the observed min/max (0 when empty).
    pub fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((p.clamp(0.0, 100.0) / 100.0) * self.total as f64)
            .ceil()
            .max(1.0) as u64;
        let mut seen = 0u64;
        for (bucket, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Self::bucket_floor(bucket).clamp(self.min_ns, self.max_ns);
            }
        }
        self.max_ns
    }
}

/// SplitMix64: cheap, seedable, good enough to scatter offsets.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// One run of [`raw_random_io`].
#[derive(Debug, Clone)]
pub struct RawJob {
    /// Writes, else reads.
    pub write: bool,
    /// Ops kept in flight.
    pub qd: usize,
    /// Bytes per op.
    pub block: usize,
    /// Offsets lie in the first `span_bytes` of the file.
    pub span_bytes: u64,
    /// How long to submit.
    pub duration: Duration,
    /// Seeds the offsets (and the written data).
    pub seed: u64,
    /// The ring set up as fio's ([`EngineConfig::deferred`]), else plain.
    pub deferred: bool,
}

/// Drives `block`-sized random reads or writes at queue depth `qd` on
/// `file` for `duration`, then waits for the stragglers.
///
/// Offsets are multiples of `block` inside the first `span_bytes` of the
/// file; buffers are page-aligned, so a file opened with `O_DIRECT` works
/// when `block` is a multiple of its logical block size. Any op that
/// fails or transfers less than `block` ends the run with
/// [`EngineError::OpFailed`].
pub fn raw_random_io(file: &File, job: &RawJob) -> Result<RawStats, EngineError> {
    let RawJob {
        write,
        qd,
        block,
        span_bytes,
        duration,
        seed,
        deferred,
    } = *job;
    if qd == 0 || block == 0 {
        return Err(EngineError::InvalidOp(
            "queue depth and block size must be non-zero",
        ));
    }
    let blocks = span_bytes / block as u64;
    if blocks == 0 {
        return Err(EngineError::InvalidOp("span smaller than one block"));
    }
    let entries = u32::try_from(qd.next_power_of_two())
        .map_err(|_| EngineError::InvalidOp("queue depth too large"))?;
    let mut engine = Engine::new(
        file,
        &EngineConfig {
            entries,
            sqpoll: false,
            deferred,
        },
    )?;
    if engine.capacity() < qd {
        return Err(EngineError::InvalidOp(
            "queue depth above the engine's capacity",
        ));
    }
    let buf_len = qd
        .checked_mul(block)
        .ok_or(EngineError::InvalidOp("qd * block overflows"))?;
    let mut buf = AlignedBuf::new(buf_len)?;
    let mut rng = SplitMix64(seed);
    if write {
        // Non-zero data, so nothing below can shortcut zero pages.
        for chunk in buf.as_mut_slice().chunks_mut(8) {
            let bytes = rng.next().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
    let buf = Arc::new(buf);

    let mut free: Vec<usize> = (0..qd).rev().collect();
    let mut started = vec![Instant::now(); qd];
    let mut done: Vec<Completion> = Vec::with_capacity(qd);
    let mut latency = LatencyHistogram::default();
    let mut ops = 0u64;
    let t0 = Instant::now();
    let mut stopping = false;
    loop {
        if !stopping && !free.is_empty() {
            let now = Instant::now();
            while let Some(slot) = free.pop() {
                let offset = (rng.next() % blocks) * block as u64;
                let bufs = IoBuffers::from_ranges(buf.clone(), &[((slot * block) as u64, block)])?;
                let op = if write {
                    IoOp::Writev { offset, bufs }
                } else {
                    IoOp::Readv { offset, bufs }
                };
                engine.push(slot as u64, op).map_err(|(e, _op)| e)?;
                started[slot] = now;
            }
        }
        if engine.in_flight() == 0 {
            break;
        }
        engine.submit_and_wait(1)?;
        engine.drain(&mut done);
        let now = Instant::now();
        for c in done.drain(..) {
            if usize::try_from(c.result).ok() != Some(block) {
                return Err(EngineError::OpFailed {
                    result: c.result,
                    expected: block,
                });
            }
            let slot = c.token as usize;
            let ns = now.duration_since(started[slot]).as_nanos();
            latency.record(u64::try_from(ns).unwrap_or(u64::MAX));
            ops += 1;
            free.push(slot);
        }
        stopping = stopping || now.duration_since(t0) >= duration;
    }
    let elapsed = t0.elapsed();
    tracing::debug!(ops, ?elapsed, qd, block, write, "raw uring run done");
    Ok(RawStats {
        ops,
        elapsed,
        latency,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn histogram_buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for ns in (0..5000u64).chain([1 << 20, (1 << 40) + 12345, u64::MAX]) {
            let b = LatencyHistogram::bucket(ns);
            assert!(b < BUCKETS);
            assert!(b >= last, "bucket went down at {ns}");
            last = b;
            let floor = LatencyHistogram::bucket_floor(b);
            assert!(floor <= ns, "floor {floor} > {ns}");
            assert!(
                ns - floor <= ns / SUB_BUCKETS as u64,
                "bucket too wide at {ns}"
            );
        }
        let mut h = LatencyHistogram::default();
        for ns in 1..=1000 {
            h.record(ns * 1000);
        }
        assert_eq!(h.count(), 1000);
        assert_eq!(h.min_ns(), 1000);
        assert_eq!(h.max_ns(), 1_000_000);
        let p50 = h.percentile(50.0);
        assert!((485_000..=500_000).contains(&p50), "p50 {p50}");
        assert_eq!(
            h.percentile(100.0),
            LatencyHistogram::bucket_floor(LatencyHistogram::bucket(1_000_000))
        );
        assert_eq!(h.mean_ns(), 500_500);
    }

    #[test]
    fn small_runs_complete_ops() {
        let path = std::env::temp_dir().join(format!("shadowback-rawbench-{}", std::process::id()));
        std::fs::File::create(&path)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        for direct in [false, true] {
            let mut opts = OpenOptions::new();
            opts.read(true).write(true);
            if direct {
                opts.custom_flags(libc::O_DIRECT);
            }
            let file = opts.open(&path).unwrap();
            for write in [true, false] {
                let stats = raw_random_io(
                    &file,
                    &RawJob {
                        write,
                        qd: 4,
                        block: 4096,
                        span_bytes: 4 << 20,
                        duration: Duration::from_millis(200),
                        seed: 1,
                        deferred: direct,
                    },
                )
                .unwrap();
                assert!(stats.ops > 0, "direct={direct} write={write}: {stats:?}");
                assert_eq!(stats.latency.count(), stats.ops);
                assert!(stats.elapsed >= Duration::from_millis(200));
                assert!(stats.iops() > 0.0);
            }
        }
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn bad_parameters_are_refused() {
        let path =
            std::env::temp_dir().join(format!("shadowback-rawbench-bad-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        for (qd, block, span) in [(0, 4096, 1 << 20), (4, 0, 1 << 20), (4, 4096, 100)] {
            let job = RawJob {
                write: false,
                qd,
                block,
                span_bytes: span,
                duration: Duration::ZERO,
                seed: 0,
                deferred: true,
            };
            assert!(matches!(
                raw_random_io(&file, &job),
                Err(EngineError::InvalidOp(_))
            ));
        }
        let _ = std::fs::remove_file(&path);
    }
}
