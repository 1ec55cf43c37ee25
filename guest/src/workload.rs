//! Workloads that drive a [`BlockDevice`]: the verifying workload used by
//! tests and the demo, and a non-verifying benchmark.
//!
//! [`VerifyWorkload`] keeps a model of every sector's last acknowledged write
//! generation and checks every byte it reads against it: every sector's
//! content is predictable from its last acknowledged write
//! (docs/ARCHITECTURE.md §5). Two
//! rules make that model exact without knowing the backend's ordering:
//!
//! - the model changes only when a write or discard is acknowledged `Ok`;
//! - a write or discard is never in flight together with any request that
//!   overlaps it, so every read sees exactly the model's state.
//!
//! A write or discard that fails leaves its range *unknown* (it may be torn);
//! unknown sectors are not judged until a later write succeeds on them.
//!
//! Two op streams ([`Pattern`]): random ops that keep `queue_depth`
//! requests in flight all the time, and the round pattern of the Linux test
//! guest (`scripts/guest/guest-io.c`, docs/GUEST.md "The guest workload"):
//! one worker per device queue rewrites and re-reads its own share of the
//! region in batches, waiting for each batch to complete, so every queue
//! drains to empty between batches — on its own schedule, while another
//! queue may be busy. A queue that is often empty exercises what a
//! saturated one never does: an instance killed at a moment when nothing
//! of that queue is in flight (docs/ARCHITECTURE.md §5, §7.4).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::device::{
    BlockDevice, BlockOp, BlockRequest, Completion, DeviceError, Status, SECTOR_SIZE,
};
use crate::pattern::{self, SplitMix64};
use crate::stats::{LatencyHistogram, LatencySummary};

/// All verify ops are multiples of this size, at offsets aligned to it.
pub const BLOCK_BYTES: u32 = 4096;
const SECTORS_PER_BLOCK: u64 = BLOCK_BYTES as u64 / SECTOR_SIZE;
/// How often the progress callback runs.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);
/// Upper bound on one `poll_completions` wait, so deadlines and progress
/// ticks are honoured even when the device is idle.
const POLL_TIMEOUT: Duration = Duration::from_millis(50);
/// How many failure descriptions a report keeps (all are counted).
pub const MAX_FAILURE_MESSAGES: usize = 10;
/// Largest region the model covers: 64 GiB, i.e. a 512 MiB model.
pub const MAX_MODEL_SECTORS: u64 = 1 << 27;
/// Model sentinel: the sector's content is not known (failed write/discard).
const GEN_UNKNOWN: u32 = u32::MAX;

/// Configuration of a [`VerifyWorkload`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyConfig {
    /// Seed of the op stream and of the written content.
    pub seed: u64,
    /// Requests kept in flight (capped at the device's `max_in_flight`).
    pub queue_depth: usize,
    /// Smallest request, a multiple of [`BLOCK_BYTES`].
    pub min_bytes: u32,
    /// Largest request, a multiple of [`BLOCK_BYTES`] (capped at the device's
    /// `max_request_sectors` and the region size).
    pub max_bytes: u32,
    /// Share of reads, in percent.
    pub read_percent: u8,
    /// Share of flushes, in percent (writes instead if the device has none).
    pub flush_percent: u8,
    /// Share of discards, in percent (writes instead if the device has none).
    /// The rest are writes.
    pub discard_percent: u8,
    /// Stop issuing new ops after this long.
    pub duration: Option<Duration>,
    /// Stop issuing new ops after this many. At least one of `duration` and
    /// `max_ops` must be set; whichever comes first ends the timed phase.
    pub max_ops: Option<u64>,
    /// After the timed phase, read back and verify the whole region.
    pub final_check: bool,
    /// `(start sector, sectors)`, both multiples of 8; `None` = whole device.
    pub region: Option<(u64, u64)>,
    /// The first run assumes the region reads as zeros (a fresh sparse
    /// image). `false` starts with every sector unknown instead.
    pub assume_zeroed: bool,
    /// A request in flight longer than this counts as a lost completion and
    /// ends the run (checked whenever a poll returns nothing).
    pub stall_timeout: Duration,
    /// What the timed phase issues. [`Pattern::Rounds`] ignores
    /// `queue_depth`, the op sizes and the op mix.
    pub pattern: Pattern,
}

/// The op stream of a [`VerifyWorkload`]'s timed phase.
///
/// Parsed from (and displayed as) `random`, `rounds` or `rounds:BATCH`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pattern {
    /// Reads, writes, flushes and discards of random sizes at random
    /// places, `queue_depth` of them in flight all the time.
    #[default]
    Random,
    /// Rounds, as the Linux test guest does them. The region is split into
    /// one share per device queue ([`BlockDevice::queues`]); a worker per
    /// share issues its requests on its own queue
    /// ([`BlockDevice::submit_to`]) in batches of up to `batch` 4 KiB
    /// requests — every request of a batch submitted before any is
    /// reaped, the next batch only once all of them completed, so the
    /// queue is empty between batches. Round `r` of a worker: for each
    /// batch of its share, read it back and check it holds round `r - 1`
    /// (from round 1 on), then write round `r`; then read the whole share
    /// back, batch by batch, and check it holds round `r`. Workers are
    /// independent: one queue drains while another is busy. A run that
    /// ends mid-round (its duration or `max_ops`, both checked before each
    /// batch) resumes there on the next [`VerifyWorkload::run`].
    Rounds {
        /// Requests per batch, capped at a queue's share of the device's
        /// slots and at the worker's share of the region.
        batch: usize,
    },
}

/// The batch of `--pattern rounds`: as many requests as the Linux test
/// guest's workers keep in flight.
pub const DEFAULT_ROUND_BATCH: usize = 16;

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Random => write!(f, "random"),
            Pattern::Rounds { batch } => write!(f, "rounds:{batch}"),
        }
    }
}

impl FromStr for Pattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            None if s == "random" => Ok(Pattern::Random),
            None if s == "rounds" => Ok(Pattern::Rounds {
                batch: DEFAULT_ROUND_BATCH,
            }),
            Some(("rounds", n)) => match n.parse::<usize>() {
                Ok(batch) if batch > 0 => Ok(Pattern::Rounds { batch }),
                _ => Err(format!("rounds:{n}: the batch is a positive number")),
            },
            _ => Err(format!(
                "unknown pattern {s:?} (random, rounds or rounds:BATCH)"
            )),
        }
    }
}

impl Default for VerifyConfig {
    fn default() -> Self {
        VerifyConfig {
            seed: 1,
            queue_depth: 32,
            min_bytes: BLOCK_BYTES,
            max_bytes: 128 * 1024,
            read_percent: 50,
            flush_percent: 2,
            discard_percent: 5,
            duration: Some(Duration::from_secs(10)),
            max_ops: None,
            final_check: true,
            region: None,
            assume_zeroed: true,
            stall_timeout: Duration::from_secs(30),
            pattern: Pattern::Random,
        }
    }
}

/// Which part of a run a [`Progress`] report is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Random ops (verify) or the benchmark loop, including the final drain.
    Timed,
    /// Sequential read-back of the whole region.
    FinalCheck,
}

/// Periodic progress, passed to the callback about every
/// [`PROGRESS_INTERVAL`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Progress {
    /// Current phase.
    pub phase: Phase,
    /// Time since the run started.
    pub elapsed: Duration,
    /// Requests completed so far (all phases).
    pub ops: u64,
    /// Completions per second over the last interval.
    pub ops_per_s: f64,
    /// Requests that completed with a non-`Ok` status so far.
    pub io_errors: u64,
    /// Verification failures so far.
    pub verify_failures: u64,
    /// Requests in flight now.
    pub in_flight: usize,
}

/// Result of a [`VerifyWorkload`] run.
///
/// `ops` … `bytes`, `lat_us`, `elapsed_s`, `iops` and `mb_per_s` cover the
/// timed phase; `sectors_verified_final` is the final check; the error
/// counters and `failures` cover both.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Requests completed in the timed phase.
    pub ops: u64,
    /// Reads completed.
    pub reads: u64,
    /// Writes completed.
    pub writes: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Discards completed.
    pub discards: u64,
    /// Bytes read and written by requests that completed `Ok`.
    pub bytes: u64,
    /// Reads whose data matched the model (unknown sectors skipped).
    pub reads_verified: u64,
    /// Sectors that matched the model in the final check.
    pub sectors_verified_final: u64,
    /// Mismatching reads, plus lost, duplicate or malformed completions.
    pub verify_failures: u64,
    /// Requests that completed `IoError` or `NotSupported`.
    pub io_errors: u64,
    /// Latency from submit to completion in the timed phase.
    pub lat_us: LatencySummary,
    /// Length of the timed phase in seconds.
    pub elapsed_s: f64,
    /// `ops / elapsed_s`.
    pub iops: f64,
    /// `bytes / elapsed_s`, in units of 10^6 bytes.
    pub mb_per_s: f64,
    /// The first [`MAX_FAILURE_MESSAGES`] failure descriptions.
    pub failures: Vec<String>,
    /// Requests that never completed (counted in `verify_failures` too).
    #[serde(default)]
    pub lost: u64,
    /// Completions for requests not in flight (counted in `verify_failures`
    /// too).
    #[serde(default)]
    pub duplicates: u64,
    /// Reads that found an older generation of the right sector: an
    /// acknowledged write lost, or an older one landing after it (counted
    /// in `verify_failures` too).
    #[serde(default)]
    pub stale_reads: u64,
    /// [`Pattern::Rounds`]: rounds whose read-back completed, summed over
    /// the workers.
    #[serde(default)]
    pub rounds: u64,
}

/// A positive multiple of [`BLOCK_BYTES`].
// `u32::is_multiple_of` needs Rust 1.87; the workspace declares 1.80.
#[allow(clippy::manual_is_multiple_of)]
fn is_whole_blocks(bytes: u32) -> bool {
    bytes >= BLOCK_BYTES && bytes % BLOCK_BYTES == 0
}

fn invalid(msg: impl Into<String>) -> DeviceError {
    DeviceError::InvalidRequest(format!("workload config: {}", msg.into()))
}

/// Resolves `region` against the device: `(start, sectors)`, both multiples
/// of 8 sectors. The whole device is rounded down to whole 4 KiB blocks.
fn resolve_region(
    region: Option<(u64, u64)>,
    dev: &dyn BlockDevice,
) -> Result<(u64, u64), DeviceError> {
    let capacity = dev.capacity_sectors();
    let (start, sectors) = match region {
        Some(r) => r,
        None => (0, capacity - capacity % SECTORS_PER_BLOCK),
    };
    if start % SECTORS_PER_BLOCK != 0 || sectors % SECTORS_PER_BLOCK != 0 {
        return Err(invalid(format!(
            "region {start}+{sectors} is not 4 KiB aligned"
        )));
    }
    if sectors == 0 {
        return Err(invalid("empty region (device smaller than 4 KiB?)"));
    }
    if !matches!(start.checked_add(sectors), Some(end) if end <= capacity) {
        return Err(invalid(format!(
            "region {start}+{sectors} beyond device capacity {capacity}"
        )));
    }
    Ok((start, sectors))
}

/// Where and how big the verify ops are, resolved against the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    /// First sector of the region.
    start: u64,
    /// Region length in 4 KiB blocks.
    blocks: u64,
    /// Random op size bounds in blocks.
    min_blocks: u64,
    max_blocks: u64,
    /// Final-check read size in blocks.
    sweep_blocks: u64,
    queue_depth: usize,
}

impl Geometry {
    fn new(cfg: &VerifyConfig, dev: &dyn BlockDevice) -> Result<Self, DeviceError> {
        if cfg.queue_depth == 0 || dev.max_in_flight() == 0 {
            return Err(invalid("queue depth 0"));
        }
        for (name, v) in [("min_bytes", cfg.min_bytes), ("max_bytes", cfg.max_bytes)] {
            if !is_whole_blocks(v) {
                return Err(invalid(format!(
                    "{name} {v} is not a positive multiple of 4096"
                )));
            }
        }
        if cfg.min_bytes > cfg.max_bytes {
            return Err(invalid("min_bytes > max_bytes"));
        }
        let percent = u16::from(cfg.read_percent)
            + u16::from(cfg.flush_percent)
            + u16::from(cfg.discard_percent);
        if percent > 100 {
            return Err(invalid(format!("op percentages add up to {percent}")));
        }
        if cfg.duration.is_none() && cfg.max_ops.is_none() {
            return Err(invalid("needs a duration or max_ops"));
        }
        let (start, sectors) = resolve_region(cfg.region, dev)?;
        if sectors > MAX_MODEL_SECTORS {
            return Err(invalid(format!(
                "region of {sectors} sectors exceeds the model limit {MAX_MODEL_SECTORS}"
            )));
        }
        let blocks = sectors / SECTORS_PER_BLOCK;
        let dev_blocks = u64::from(dev.max_request_sectors()) / SECTORS_PER_BLOCK;
        let min_blocks = u64::from(cfg.min_bytes / BLOCK_BYTES);
        let max_blocks = u64::from(cfg.max_bytes / BLOCK_BYTES)
            .min(dev_blocks)
            .min(blocks);
        if min_blocks > max_blocks {
            return Err(invalid(format!(
                "min_bytes {} does not fit the device (max request {} sectors) or region ({blocks} blocks)",
                cfg.min_bytes,
                dev.max_request_sectors()
            )));
        }
        Ok(Geometry {
            start,
            blocks,
            min_blocks,
            max_blocks,
            sweep_blocks: dev_blocks.min(blocks),
            queue_depth: cfg.queue_depth.min(dev.max_in_flight()),
        })
    }

    fn sectors(&self) -> u64 {
        self.blocks * SECTORS_PER_BLOCK
    }
}

/// The generation of every sector in the region.
#[derive(Clone, Debug)]
struct GenModel {
    start: u64,
    gens: Vec<u32>,
}

impl GenModel {
    fn new(start: u64, sectors: u64, initial: u32) -> Self {
        // Bounded by MAX_MODEL_SECTORS, so it fits usize.
        GenModel {
            start,
            gens: vec![initial; sectors as usize],
        }
    }

    fn slots(&self, sector: u64, sectors: u32) -> std::ops::Range<usize> {
        // Callers only pass ranges generated inside the region.
        let first = (sector - self.start) as usize;
        first..first + sectors as usize
    }

    fn expected(&self, sector: u64) -> Option<u32> {
        let gen = self.gens[(sector - self.start) as usize];
        (gen != GEN_UNKNOWN).then_some(gen)
    }

    fn set(&mut self, sector: u64, sectors: u32, gen: u32) {
        let range = self.slots(sector, sectors);
        self.gens[range].fill(gen);
    }

    /// Sectors of the range whose content is known.
    fn judged(&self, sector: u64, sectors: u32) -> u64 {
        self.gens[self.slots(sector, sectors)]
            .iter()
            .filter(|&&g| g != GEN_UNKNOWN)
            .count() as u64
    }
}

/// State that carries over from one [`VerifyWorkload::run`] to the next, so
/// a second run on the same device keeps verifying what the first wrote.
#[derive(Clone, Debug)]
struct Carried {
    geometry: Geometry,
    model: GenModel,
    rng: SplitMix64,
    next_gen: u32,
    next_tag: u64,
    /// [`Pattern::Rounds`]: one per device queue, made by the first run.
    workers: Vec<Worker>,
}

/// A batch of a [`Pattern::Rounds`] worker: batch `j` of the share is
/// blocks `j * batch ..` of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Read batch `j` back: it must still hold the previous round.
    Check(u64),
    /// Write batch `j` with this round's data.
    Write(u64),
    /// Read batch `j` back: it must hold this round.
    Verify(u64),
}

/// Oldest rounds a worker remembers the first write generation of.
const ROUND_HISTORY: usize = 4;

/// One [`Pattern::Rounds`] worker: its share of the region, its queue and
/// where it is in its rounds.
#[derive(Clone, Debug)]
struct Worker {
    /// The device queue it submits to (= its index).
    queue: usize,
    /// First block of the share, relative to the region start.
    first: u64,
    /// Blocks in the share.
    blocks: u64,
    /// Requests per batch.
    batch: u64,
    round: u64,
    /// The next batch to issue.
    next: Step,
    /// Requests of its batch in flight.
    in_flight: usize,
    /// `(round, first generation written in it)`, newest last: a stale
    /// read's generation tells which round's data came back.
    gens: Vec<(u64, u32)>,
}

impl Worker {
    fn batches(&self) -> u64 {
        self.blocks.div_ceil(self.batch)
    }

    /// Share-relative blocks of batch `j`.
    fn blocks_of(&self, j: u64) -> std::ops::Range<u64> {
        j * self.batch..((j + 1) * self.batch).min(self.blocks)
    }

    /// The step after `step`, moving to the next round after the last
    /// read-back.
    fn advance(&mut self, step: Step) {
        let last = self.batches() - 1;
        self.next = match step {
            Step::Check(j) => Step::Write(j),
            Step::Write(j) if j < last && self.round > 0 => Step::Check(j + 1),
            Step::Write(j) if j < last => Step::Write(j + 1),
            Step::Write(_) => Step::Verify(0),
            Step::Verify(j) if j < last => Step::Verify(j + 1),
            Step::Verify(_) => {
                self.round += 1;
                Step::Check(0)
            }
        };
    }

    /// Which of the remembered rounds generation `gen` was written in.
    fn round_of(&self, gen: u32) -> Option<u64> {
        self.gens
            .iter()
            .rev()
            .find(|&&(_, first)| gen >= first)
            .map(|&(round, _)| round)
    }

    /// `gen` described as a round, for failure messages.
    fn describe(&self, gen: u32) -> String {
        match self.round_of(gen) {
            Some(r) => format!("round {r} (gen {gen})"),
            None if gen == pattern::GEN_ZERO => "zeros".into(),
            None => format!(
                "gen {gen}, from before round {}",
                self.gens.first().map_or(0, |g| g.0)
            ),
        }
    }
}

/// Splits `blocks` into one share per queue (fewer if there are fewer
/// blocks than queues), continuing at round `round`.
fn make_workers(blocks: u64, queues: usize, batch: u64, round: u64) -> Vec<Worker> {
    let n = (queues as u64).clamp(1, blocks);
    (0..n)
        .map(|w| {
            let first = w * blocks / n;
            let share = (w + 1) * blocks / n - first;
            Worker {
                queue: w as usize,
                first,
                blocks: share,
                batch: batch.min(share),
                round,
                next: if round == 0 {
                    Step::Write(0)
                } else {
                    Step::Check(0)
                },
                in_flight: 0,
                gens: Vec::new(),
            }
        })
        .collect()
}

/// One request the workload wants to issue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PlannedOp {
    op: BlockOp,
    sector: u64,
    sectors: u32,
}

impl PlannedOp {
    fn overlaps(&self, other: &InflightOp) -> bool {
        self.op.has_range()
            && other.op.has_range()
            && (self.op.modifies_data() || other.op.modifies_data())
            && self.sector < other.sector + u64::from(other.sectors)
            && other.sector < self.sector + u64::from(self.sectors)
    }
}

/// A submitted request awaiting its completion.
#[derive(Clone, Copy, Debug)]
struct InflightOp {
    op: BlockOp,
    sector: u64,
    sectors: u32,
    /// Generation a write will set on `Ok`.
    gen: u32,
    submitted_at: Instant,
    phase: Phase,
    /// The [`Pattern::Rounds`] batch it belongs to.
    round: Option<RoundOp>,
}

/// Where a request of a [`Pattern::Rounds`] batch belongs.
#[derive(Clone, Copy, Debug)]
struct RoundOp {
    worker: usize,
    round: u64,
    step: Step,
}

/// Where the next ops come from.
enum Source {
    Timed {
        deadline: Option<Instant>,
        max_ops: Option<u64>,
    },
    Sweep {
        next: u64,
        end: u64,
    },
}

impl Source {
    fn phase(&self) -> Phase {
        match self {
            Source::Timed { .. } => Phase::Timed,
            Source::Sweep { .. } => Phase::FinalCheck,
        }
    }
}

/// The event loop of one verify run.
struct Engine<'c> {
    cfg: &'c VerifyConfig,
    st: Carried,
    discard_enabled: bool,
    flush_enabled: bool,
    in_flight: HashMap<u64, InflightOp>,
    /// Planned but not yet submitted (blocked by an overlap or a full queue).
    pending: Option<PlannedOp>,
    submitted_timed: u64,
    write_buf: Vec<u8>,
    completions: Vec<Completion>,
    hist: LatencyHistogram,
    report: Report,
    started: Instant,
    completed: u64,
    last_tick: (Instant, u64),
    stalled: bool,
}

impl<'c> Engine<'c> {
    fn new(cfg: &'c VerifyConfig, st: Carried, dev: &dyn BlockDevice) -> Self {
        let now = Instant::now();
        let max_bytes = st.geometry.max_blocks * u64::from(BLOCK_BYTES);
        Engine {
            cfg,
            discard_enabled: dev.supports_discard(),
            flush_enabled: dev.supports_flush(),
            in_flight: HashMap::with_capacity(st.geometry.queue_depth),
            pending: None,
            submitted_timed: 0,
            write_buf: vec![0; max_bytes as usize],
            completions: Vec::with_capacity(st.geometry.queue_depth),
            hist: LatencyHistogram::new(),
            report: Report::default(),
            started: now,
            completed: 0,
            last_tick: (now, 0),
            stalled: false,
            st,
        }
    }

    /// The next op of `source`, or `None` when it is exhausted.
    fn plan(&mut self, source: &mut Source, now: Instant) -> Option<PlannedOp> {
        match source {
            Source::Timed { deadline, max_ops } => {
                if deadline.is_some_and(|d| now >= d)
                    || max_ops.is_some_and(|m| self.submitted_timed >= m)
                    || self.st.next_gen == GEN_UNKNOWN
                {
                    return None;
                }
                Some(self.random_op())
            }
            Source::Sweep { next, end } => {
                if *next >= *end {
                    return None;
                }
                let sectors = (self.st.geometry.sweep_blocks * SECTORS_PER_BLOCK).min(*end - *next);
                let op = PlannedOp {
                    op: BlockOp::Read,
                    sector: *next,
                    sectors: sectors as u32,
                };
                *next += sectors;
                Some(op)
            }
        }
    }

    fn random_op(&mut self) -> PlannedOp {
        let cfg = self.cfg;
        let roll = self.st.rng.below(100) as u16;
        let reads = u16::from(cfg.read_percent);
        let flushes = reads + u16::from(cfg.flush_percent);
        let discards = flushes + u16::from(cfg.discard_percent);
        let op = match roll {
            r if r < reads => BlockOp::Read,
            r if r < flushes && self.flush_enabled => BlockOp::Flush,
            r if r >= flushes && r < discards && self.discard_enabled => BlockOp::Discard,
            _ => BlockOp::Write,
        };
        if op == BlockOp::Flush {
            return PlannedOp {
                op,
                sector: 0,
                sectors: 0,
            };
        }
        let geo = self.st.geometry;
        let blocks = self.st.rng.range_inclusive(geo.min_blocks, geo.max_blocks);
        let first = self.st.rng.below(geo.blocks - blocks + 1);
        PlannedOp {
            op,
            sector: geo.start + first * SECTORS_PER_BLOCK,
            // At most max_request_sectors, so it fits u32.
            sectors: (blocks * SECTORS_PER_BLOCK) as u32,
        }
    }

    fn conflicts(&self, op: &PlannedOp) -> bool {
        self.in_flight.values().any(|f| op.overlaps(f))
    }

    fn submit(
        &mut self,
        dev: &mut dyn BlockDevice,
        op: PlannedOp,
        phase: Phase,
        round: Option<RoundOp>,
    ) -> Result<(), DeviceError> {
        let tag = self.st.next_tag;
        let gen = if op.op == BlockOp::Write {
            self.st.next_gen
        } else {
            0
        };
        let req = match op.op {
            BlockOp::Read => BlockRequest::read(op.sector, op.sectors, true),
            BlockOp::Flush => BlockRequest::flush(),
            BlockOp::Discard => BlockRequest::discard(op.sector, op.sectors),
            BlockOp::Write => {
                let buf = &mut self.write_buf[..op.sectors as usize * SECTOR_SIZE as usize];
                pattern::fill(buf, op.sector, |_| gen, self.cfg.seed);
                BlockRequest::write(op.sector, buf)
            }
        };
        let submitted_at = Instant::now();
        match round {
            Some(r) => dev.submit_to(self.st.workers[r.worker].queue, tag, &req)?,
            None => dev.submit(tag, &req)?,
        }
        self.st.next_tag = tag.wrapping_add(1);
        if op.op == BlockOp::Write {
            self.st.next_gen += 1;
        }
        if phase == Phase::Timed {
            self.submitted_timed += 1;
        }
        self.in_flight.insert(
            tag,
            InflightOp {
                op: op.op,
                sector: op.sector,
                sectors: op.sectors,
                gen,
                submitted_at,
                phase,
                round,
            },
        );
        Ok(())
    }

    /// Runs `source` to exhaustion and drains everything in flight, or stops
    /// early on a lost completion (`self.stalled`).
    fn pump(
        &mut self,
        dev: &mut dyn BlockDevice,
        mut source: Source,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(), DeviceError> {
        let phase = source.phase();
        loop {
            let now = Instant::now();
            if let Source::Timed {
                deadline: Some(d), ..
            } = source
            {
                if now >= d {
                    self.pending = None;
                }
            }
            let mut batch = 0usize;
            while self.in_flight.len() < self.st.geometry.queue_depth {
                if self.pending.is_none() {
                    self.pending = self.plan(&mut source, now);
                }
                let Some(op) = self.pending else { break };
                if self.conflicts(&op) {
                    break;
                }
                match self.submit(dev, op, phase, None) {
                    Ok(()) => {
                        self.pending = None;
                        batch += 1;
                    }
                    Err(DeviceError::QueueFull) => break,
                    Err(e) => return Err(e),
                }
            }
            if batch > 0 {
                dev.kick()?;
            }
            if self.in_flight.is_empty() {
                if self.pending.is_none() {
                    return Ok(());
                }
                // Only a full queue blocks an op when nothing is in flight.
                return Err(DeviceError::Transport(
                    "device reports a full queue with no request in flight".into(),
                ));
            }

            if self.wait_and_complete(dev, phase, progress)? {
                return Ok(());
            }
        }
    }

    /// [`Pattern::Rounds`]: one worker per device queue, carried over from
    /// the previous run unless the queues or the batch changed (then a new
    /// round starts on the new layout).
    fn prepare_workers(&mut self, batch: usize, dev: &dyn BlockDevice) -> Result<(), DeviceError> {
        if batch == 0 {
            return Err(invalid("round batch 0"));
        }
        let queues = dev.queues().max(1);
        let per_queue = (dev.max_in_flight() / queues).max(1);
        let batch = batch.min(per_queue) as u64;
        let blocks = self.st.geometry.blocks;
        let same = self.st.workers.len() as u64 == (queues as u64).clamp(1, blocks)
            && self
                .st
                .workers
                .iter()
                .all(|w| w.batch == batch.min(w.blocks));
        if !same {
            let round = self
                .st
                .workers
                .iter()
                .map(|w| w.round + 1)
                .max()
                .unwrap_or(0);
            self.st.workers = make_workers(blocks, queues, batch, round);
        }
        Ok(())
    }

    /// [`Pattern::Rounds`]: every worker whose queue is empty issues its
    /// next batch, until `deadline` or `max_ops`; then drains. Stops early
    /// on a lost completion (`self.stalled`).
    fn pump_rounds(
        &mut self,
        dev: &mut dyn BlockDevice,
        deadline: Option<Instant>,
        max_ops: Option<u64>,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(), DeviceError> {
        loop {
            let now = Instant::now();
            let timed_out = deadline.is_some_and(|d| now >= d);
            let mut issued = false;
            for w in 0..self.st.workers.len() {
                if timed_out || max_ops.is_some_and(|m| self.submitted_timed >= m) {
                    break;
                }
                if self.st.workers[w].in_flight == 0 {
                    issued |= self.issue_batch(dev, w)?;
                }
            }
            if issued {
                dev.kick()?;
            }
            if self.in_flight.is_empty() {
                return Ok(());
            }
            if self.wait_and_complete(dev, Phase::Timed, progress)? {
                return Ok(());
            }
        }
    }

    /// Submits worker `w`'s next batch on its queue (not kicked). False
    /// if the generations ran out.
    fn issue_batch(&mut self, dev: &mut dyn BlockDevice, w: usize) -> Result<bool, DeviceError> {
        let worker = &self.st.workers[w];
        let step = worker.next;
        let round = worker.round;
        let (Step::Check(j) | Step::Write(j) | Step::Verify(j)) = step;
        let blocks = worker.blocks_of(j);
        let n = blocks.end - blocks.start;
        let first = self.st.geometry.start + worker.first * SECTORS_PER_BLOCK;
        let op = if let Step::Write(_) = step {
            // Bounded by the region's blocks, far below u32::MAX.
            if u64::from(self.st.next_gen) + n >= u64::from(GEN_UNKNOWN) {
                return Ok(false);
            }
            if j == 0 {
                let gens = &mut self.st.workers[w].gens;
                if gens.len() == ROUND_HISTORY {
                    gens.remove(0);
                }
                gens.push((round, self.st.next_gen));
            }
            BlockOp::Write
        } else {
            BlockOp::Read
        };
        let tagged = RoundOp {
            worker: w,
            round,
            step,
        };
        for (i, block) in blocks.enumerate() {
            let planned = PlannedOp {
                op,
                sector: first + block * SECTORS_PER_BLOCK,
                sectors: SECTORS_PER_BLOCK as u32,
            };
            match self.submit(dev, planned, Phase::Timed, Some(tagged)) {
                Ok(()) => self.st.workers[w].in_flight += 1,
                Err(DeviceError::QueueFull) => {
                    return Err(DeviceError::Transport(format!(
                        "queue {} full with {i} of a batch of {n} in flight",
                        self.st.workers[w].queue
                    )))
                }
                Err(e) => return Err(e),
            }
        }
        self.st.workers[w].advance(step);
        Ok(true)
    }

    /// Declares the run stalled if the oldest request waited too long.
    /// Waits for completions (at most [`POLL_TIMEOUT`]) and applies them;
    /// `Ok(true)` when the run must end (the device stalled).
    fn wait_and_complete(
        &mut self,
        dev: &mut dyn BlockDevice,
        phase: Phase,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<bool, DeviceError> {
        self.completions.clear();
        dev.poll_completions(POLL_TIMEOUT, &mut self.completions)?;
        let now = Instant::now();
        let completions = std::mem::take(&mut self.completions);
        if completions.is_empty() && self.check_stall(now) {
            return Ok(true);
        }
        for c in &completions {
            self.complete(c, now);
        }
        self.completions = completions;
        self.tick(now, phase, progress);
        Ok(false)
    }

    fn check_stall(&mut self, now: Instant) -> bool {
        let Some((tag, oldest)) = self
            .in_flight
            .iter()
            .min_by_key(|(_, f)| f.submitted_at)
            .map(|(t, f)| (*t, *f))
        else {
            return false;
        };
        let waited = now.saturating_duration_since(oldest.submitted_at);
        if waited < self.cfg.stall_timeout {
            return false;
        }
        let lost = self.in_flight.len() as u64;
        self.fail(format!(
            "lost completion: {lost} request(s) in flight with no completion, oldest tag {tag} \
             ({:?} of sectors {}+{}) waited {waited:?}",
            oldest.op, oldest.sector, oldest.sectors
        ));
        self.report.verify_failures += lost - 1;
        self.report.lost += lost;
        self.stalled = true;
        true
    }

    fn complete(&mut self, c: &Completion, now: Instant) {
        let Some(op) = self.in_flight.remove(&c.tag) else {
            self.report.duplicates += 1;
            self.fail(format!(
                "completion for tag {} ({:?}) that is not in flight: duplicate or spurious",
                c.tag, c.status
            ));
            return;
        };
        self.completed += 1;
        if let Some(r) = op.round {
            let worker = &mut self.st.workers[r.worker];
            worker.in_flight -= 1;
            if worker.in_flight == 0 && r.step == Step::Verify(worker.batches() - 1) {
                self.report.rounds += 1;
            }
        }
        let timed = op.phase == Phase::Timed;
        let ok = c.status == Status::Ok;
        if timed {
            self.hist
                .record_duration(now.saturating_duration_since(op.submitted_at));
            self.report.ops += 1;
            if ok && matches!(op.op, BlockOp::Read | BlockOp::Write) {
                self.report.bytes += u64::from(op.sectors) * SECTOR_SIZE;
            }
        }
        if !ok {
            self.report.io_errors += 1;
            debug!(tag = c.tag, op = ?op.op, sector = op.sector, sectors = op.sectors,
                   status = ?c.status, "request failed");
        }
        match op.op {
            BlockOp::Read => {
                self.report.reads += u64::from(timed);
                if ok {
                    self.verify_read(&op, c.data.as_deref());
                }
            }
            BlockOp::Write => {
                self.report.writes += 1;
                let gen = if ok { op.gen } else { GEN_UNKNOWN };
                self.st.model.set(op.sector, op.sectors, gen);
            }
            BlockOp::Discard => {
                self.report.discards += 1;
                let gen = if ok { pattern::GEN_ZERO } else { GEN_UNKNOWN };
                self.st.model.set(op.sector, op.sectors, gen);
                if c.status == Status::NotSupported {
                    self.discard_enabled = false;
                }
            }
            BlockOp::Flush => {
                self.report.flushes += 1;
                if c.status == Status::NotSupported {
                    self.flush_enabled = false;
                }
            }
        }
    }

    fn verify_read(&mut self, op: &InflightOp, data: Option<&[u8]>) {
        let what = match (op.phase, op.round) {
            (Phase::FinalCheck, _) => "final-check read".to_string(),
            (Phase::Timed, None) => "read".to_string(),
            (Phase::Timed, Some(r)) => {
                let kind = match r.step {
                    Step::Check(_) => "check read (before rewriting)",
                    _ => "read-back",
                };
                format!(
                    "round {} {kind} (worker {w}, queue {q})",
                    r.round,
                    w = r.worker,
                    q = self.st.workers[r.worker].queue
                )
            }
        };
        let Some(data) = data else {
            self.fail(format!(
                "{what} of sectors {}+{} completed Ok without data",
                op.sector, op.sectors
            ));
            return;
        };
        let want = u64::from(op.sectors) * SECTOR_SIZE;
        if data.len() as u64 != want {
            self.fail(format!(
                "{what} of sectors {}+{} returned {} bytes, expected {want}",
                op.sector,
                op.sectors,
                data.len()
            ));
            return;
        }
        let judged = self.st.model.judged(op.sector, op.sectors);
        let model = &self.st.model;
        let result = pattern::check(data, op.sector, |s| model.expected(s), self.cfg.seed);
        let bad = match result {
            Ok(()) => 0,
            Err(m) => {
                let msg = match self.stale(&m) {
                    Some(stale) => {
                        self.report.stale_reads += 1;
                        format!(
                            "stale read: {what} of sectors {}+{}: {stale}",
                            op.sector, op.sectors
                        )
                    }
                    None => format!("{what} of sectors {}+{}: {m}", op.sector, op.sectors),
                };
                self.fail(msg);
                m.bad_sectors
            }
        };
        match op.phase {
            Phase::Timed => self.report.reads_verified += u64::from(bad == 0),
            Phase::FinalCheck => self.report.sectors_verified_final += judged - bad,
        }
    }

    /// If `m` is a stale read — the right sector of this run, at a
    /// generation older than the acknowledged one — what it found, in
    /// rounds when the sector belongs to a round worker.
    fn stale(&self, m: &pattern::Mismatch) -> Option<String> {
        let pattern::Found::Written { sector, gen, seed } = m.found else {
            return None;
        };
        if sector != m.sector || seed != self.cfg.seed || gen >= m.expected_gen {
            return None;
        }
        // The round worker whose share holds the sector, if any (the final
        // check after rounds is not a round read, but the share tells).
        let block = (sector - self.st.geometry.start) / SECTORS_PER_BLOCK;
        let Some(worker) = self
            .st
            .workers
            .iter()
            .find(|w| (w.first..w.first + w.blocks).contains(&block))
        else {
            return Some(m.to_string());
        };
        let mut msg = format!(
            "sector {sector} holds {} instead of {}, which was acknowledged before the read: \
             an acknowledged write was lost, or an older write landed after it",
            worker.describe(gen),
            worker.describe(m.expected_gen)
        );
        if m.bad_sectors > 1 {
            msg.push_str(&format!(" ({} bad sectors in this buffer)", m.bad_sectors));
        }
        Some(msg)
    }

    fn fail(&mut self, msg: String) {
        self.report.verify_failures += 1;
        if self.report.failures.len() < MAX_FAILURE_MESSAGES {
            warn!("verify failure: {msg}");
            self.report.failures.push(msg);
        }
    }

    fn tick(&mut self, now: Instant, phase: Phase, progress: &mut dyn FnMut(&Progress)) {
        let (last_at, last_ops) = self.last_tick;
        let interval = now.saturating_duration_since(last_at);
        if interval < PROGRESS_INTERVAL {
            return;
        }
        let p = Progress {
            phase,
            elapsed: now.saturating_duration_since(self.started),
            ops: self.completed,
            ops_per_s: (self.completed - last_ops) as f64 / interval.as_secs_f64(),
            io_errors: self.report.io_errors,
            verify_failures: self.report.verify_failures,
            in_flight: self.in_flight.len(),
        };
        debug!(?p, "verify progress");
        progress(&p);
        self.last_tick = (now, self.completed);
    }

    /// Gives up on everything in flight: their outcome is unknown, so later
    /// runs must not judge the ranges of writes and discards among them.
    fn abandon_in_flight(&mut self) {
        for op in std::mem::take(&mut self.in_flight).into_values() {
            if op.op.modifies_data() {
                self.st.model.set(op.sector, op.sectors, GEN_UNKNOWN);
            }
        }
        for worker in &mut self.st.workers {
            worker.in_flight = 0;
        }
        self.pending = None;
    }

    fn finish(mut self, elapsed: Duration) -> (Report, Carried) {
        let secs = elapsed.as_secs_f64();
        let per_s = |v: f64| if secs > 0.0 { v / secs } else { 0.0 };
        self.report.lat_us = self.hist.summary();
        self.report.elapsed_s = secs;
        self.report.iops = per_s(self.report.ops as f64);
        self.report.mb_per_s = per_s(self.report.bytes as f64 / 1e6);
        (self.report, self.st)
    }
}

/// The verifying workload. See the module docs for the rules it follows.
///
/// The model survives between calls to [`run`](Self::run): a second run on
/// the same device (e.g. after a backend restart) keeps verifying everything
/// the first one wrote. The first run assumes the region starts zeroed unless
/// [`VerifyConfig::assume_zeroed`] is false.
#[derive(Debug)]
pub struct VerifyWorkload {
    config: VerifyConfig,
    carried: Option<Carried>,
}

impl VerifyWorkload {
    /// A workload with a fresh model.
    pub fn new(config: VerifyConfig) -> Self {
        VerifyWorkload {
            config,
            carried: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &VerifyConfig {
        &self.config
    }

    /// Runs the timed phase, drains, then (if configured) verifies the whole
    /// region.
    ///
    /// Configuration errors are reported as [`DeviceError::InvalidRequest`].
    /// Any other device error aborts the run; the model then treats the
    /// ranges of writes and discards still in flight as unknown, and a later
    /// run should use a fresh device handle (completions of the aborted
    /// requests would count as spurious).
    pub fn run(
        &mut self,
        dev: &mut dyn BlockDevice,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Report, DeviceError> {
        self.run_passes(dev, progress, Passes::Configured)
    }

    /// Only reads back and verifies the whole region against the model, e.g.
    /// after a backend restart; ignores `duration`, `max_ops` and
    /// `final_check`. The report's timed-phase fields are zero.
    pub fn verify_all(
        &mut self,
        dev: &mut dyn BlockDevice,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Report, DeviceError> {
        self.run_passes(dev, progress, Passes::FinalCheckOnly)
    }

    fn run_passes(
        &mut self,
        dev: &mut dyn BlockDevice,
        progress: &mut dyn FnMut(&Progress),
        passes: Passes,
    ) -> Result<Report, DeviceError> {
        let geometry = Geometry::new(&self.config, dev)?;
        let carried = match self.carried.take() {
            Some(c)
                if (c.geometry.start, c.geometry.blocks) == (geometry.start, geometry.blocks) =>
            {
                // Op sizes and queue depth may differ on another device handle.
                Carried { geometry, ..c }
            }
            Some(c) => {
                self.carried = Some(c);
                return Err(invalid(
                    "device or region size changed since the previous run",
                ));
            }
            None => Carried {
                geometry,
                model: GenModel::new(
                    geometry.start,
                    geometry.sectors(),
                    if self.config.assume_zeroed {
                        pattern::GEN_ZERO
                    } else {
                        GEN_UNKNOWN
                    },
                ),
                rng: SplitMix64::new(self.config.seed),
                next_gen: 1,
                next_tag: 0,
                workers: Vec::new(),
            },
        };
        let mut engine = Engine::new(&self.config, carried, dev);
        let result = Self::phases(&mut engine, &self.config, dev, progress, passes);
        if result.is_err() || engine.stalled {
            engine.abandon_in_flight();
        }
        let (report, carried) = engine.finish(*result.as_ref().unwrap_or(&Duration::ZERO));
        self.carried = Some(carried);
        result.map(|_| report)
    }

    /// The timed phase then the final check; returns the timed phase length.
    fn phases(
        engine: &mut Engine<'_>,
        cfg: &VerifyConfig,
        dev: &mut dyn BlockDevice,
        progress: &mut dyn FnMut(&Progress),
        passes: Passes,
    ) -> Result<Duration, DeviceError> {
        let mut elapsed = Duration::ZERO;
        if passes == Passes::Configured {
            let deadline = cfg.duration.map(|d| engine.started + d);
            match cfg.pattern {
                Pattern::Random => {
                    let timed = Source::Timed {
                        deadline,
                        max_ops: cfg.max_ops,
                    };
                    engine.pump(dev, timed, progress)?;
                }
                Pattern::Rounds { batch } => {
                    engine.prepare_workers(batch, dev)?;
                    engine.pump_rounds(dev, deadline, cfg.max_ops, progress)?;
                }
            }
            elapsed = engine.started.elapsed();
        }
        if (cfg.final_check || passes == Passes::FinalCheckOnly) && !engine.stalled {
            let geo = engine.st.geometry;
            let sweep = Source::Sweep {
                next: geo.start,
                end: geo.start + geo.sectors(),
            };
            engine.pump(dev, sweep, progress)?;
        }
        Ok(elapsed)
    }
}

/// Which parts of a verify run to execute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Passes {
    /// The timed phase, then the final check if the config asks for it.
    Configured,
    /// Only the final check.
    FinalCheckOnly,
}

/// What a [`BenchWorkload`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BenchOp {
    /// Random reads; the data is not copied back.
    RandomRead,
    /// Random writes of a fixed pattern.
    RandomWrite,
}

/// Configuration of a [`BenchWorkload`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchConfig {
    /// Seed of the offsets.
    pub seed: u64,
    /// Requests kept in flight (capped at the device's `max_in_flight`).
    pub queue_depth: usize,
    /// Reads or writes.
    pub op: BenchOp,
    /// Request size and alignment, a multiple of 4096.
    pub block_bytes: u32,
    /// How long to issue requests.
    pub duration: Duration,
    /// `(start sector, sectors)`, 4 KiB aligned; `None` = whole device.
    pub region: Option<(u64, u64)>,
    /// A request in flight longer than this aborts the run with
    /// [`DeviceError::Transport`].
    pub stall_timeout: Duration,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            seed: 1,
            queue_depth: 32,
            op: BenchOp::RandomRead,
            block_bytes: BLOCK_BYTES,
            duration: Duration::from_secs(10),
            region: None,
            stall_timeout: Duration::from_secs(30),
        }
    }
}

/// Result of a [`BenchWorkload`] run.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchReport {
    /// Requests completed.
    pub ops: u64,
    /// Requests that completed with a non-`Ok` status.
    pub io_errors: u64,
    /// Bytes moved by requests that completed `Ok`.
    pub bytes: u64,
    /// From the first submission until the last completion.
    pub elapsed: Duration,
    /// Submit-to-completion latency of every request, in ns.
    pub latency: LatencyHistogram,
}

impl BenchReport {
    /// Completed requests per second.
    pub fn iops(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.ops as f64 / secs
        } else {
            0.0
        }
    }

    /// Latency summary in microseconds.
    pub fn summary(&self) -> LatencySummary {
        self.latency.summary()
    }
}

/// A non-verifying benchmark: random fixed-size reads or writes at a queue
/// depth for a duration, with no model and no data copied back.
#[derive(Debug)]
pub struct BenchWorkload {
    config: BenchConfig,
}

impl BenchWorkload {
    /// A benchmark with this configuration.
    pub fn new(config: BenchConfig) -> Self {
        BenchWorkload { config }
    }

    /// The configuration.
    pub fn config(&self) -> &BenchConfig {
        &self.config
    }

    /// Runs the benchmark. Requests may overlap each other, as on a real
    /// disk under a benchmark; an unknown completion tag or a stall is a
    /// [`DeviceError::Transport`] error.
    pub fn run(
        &mut self,
        dev: &mut dyn BlockDevice,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<BenchReport, DeviceError> {
        let cfg = &self.config;
        if cfg.queue_depth == 0 || dev.max_in_flight() == 0 {
            return Err(invalid("queue depth 0"));
        }
        if !is_whole_blocks(cfg.block_bytes)
            || u64::from(cfg.block_bytes) > u64::from(dev.max_request_sectors()) * SECTOR_SIZE
        {
            return Err(invalid(format!(
                "block_bytes {} is not a multiple of 4096 within the device's max request",
                cfg.block_bytes
            )));
        }
        let (start, sectors) = resolve_region(cfg.region, dev)?;
        let block_sectors = u64::from(cfg.block_bytes) / SECTOR_SIZE;
        let slots = sectors / block_sectors;
        if slots == 0 {
            return Err(invalid("region smaller than one block"));
        }
        let queue_depth = cfg.queue_depth.min(dev.max_in_flight());
        let mut payload = vec![0u8; cfg.block_bytes as usize];
        pattern::fill(&mut payload, 0, |_| 1, cfg.seed);

        let mut rng = SplitMix64::new(cfg.seed);
        let mut in_flight: HashMap<u64, Instant> = HashMap::with_capacity(queue_depth);
        let mut completions = Vec::with_capacity(queue_depth);
        let mut report = BenchReport {
            ops: 0,
            io_errors: 0,
            bytes: 0,
            elapsed: Duration::ZERO,
            latency: LatencyHistogram::new(),
        };
        let started = Instant::now();
        let deadline = started + cfg.duration;
        let mut next_tag = 0u64;
        let mut last_tick = (started, 0u64);
        loop {
            let now = Instant::now();
            let mut batch = 0usize;
            while now < deadline && in_flight.len() < queue_depth {
                let sector = start + rng.below(slots) * block_sectors;
                let req = match cfg.op {
                    BenchOp::RandomRead => BlockRequest::read(sector, block_sectors as u32, false),
                    BenchOp::RandomWrite => BlockRequest::write(sector, &payload),
                };
                let submitted_at = Instant::now();
                match dev.submit(next_tag, &req) {
                    Ok(()) => {
                        in_flight.insert(next_tag, submitted_at);
                        next_tag = next_tag.wrapping_add(1);
                        batch += 1;
                    }
                    Err(DeviceError::QueueFull) if !in_flight.is_empty() => break,
                    Err(DeviceError::QueueFull) => {
                        return Err(DeviceError::Transport(
                            "device reports a full queue with no request in flight".into(),
                        ))
                    }
                    Err(e) => return Err(e),
                }
            }
            if batch > 0 {
                dev.kick()?;
            }
            if in_flight.is_empty() {
                break;
            }
            completions.clear();
            dev.poll_completions(POLL_TIMEOUT, &mut completions)?;
            let now = Instant::now();
            for c in &completions {
                let Some(submitted_at) = in_flight.remove(&c.tag) else {
                    return Err(DeviceError::Transport(format!(
                        "completion for tag {} that is not in flight",
                        c.tag
                    )));
                };
                report
                    .latency
                    .record_duration(now.saturating_duration_since(submitted_at));
                report.ops += 1;
                if c.status == Status::Ok {
                    report.bytes += u64::from(cfg.block_bytes);
                } else {
                    report.io_errors += 1;
                }
            }
            if completions.is_empty() {
                let oldest = in_flight.values().min().copied();
                if oldest.is_some_and(|t| now.saturating_duration_since(t) >= cfg.stall_timeout) {
                    return Err(DeviceError::Transport(format!(
                        "{} request(s) in flight with no completion for {:?}",
                        in_flight.len(),
                        cfg.stall_timeout
                    )));
                }
            }
            let interval = now.saturating_duration_since(last_tick.0);
            if interval >= PROGRESS_INTERVAL {
                progress(&Progress {
                    phase: Phase::Timed,
                    elapsed: now.saturating_duration_since(started),
                    ops: report.ops,
                    ops_per_s: (report.ops - last_tick.1) as f64 / interval.as_secs_f64(),
                    io_errors: report.io_errors,
                    verify_failures: 0,
                    in_flight: in_flight.len(),
                });
                last_tick = (now, report.ops);
            }
        }
        report.elapsed = started.elapsed();
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memdisk::{CompletionOrder, MemDisk};

    const MIB_SECTORS: u64 = 1024 * 1024 / SECTOR_SIZE;

    fn config(max_ops: u64) -> VerifyConfig {
        VerifyConfig {
            seed: 0x5eed,
            queue_depth: 16,
            duration: None,
            max_ops: Some(max_ops),
            ..VerifyConfig::default()
        }
    }

    /// Writes only, so the first request is the write a fault hits.
    fn writes_only(max_ops: u64) -> VerifyConfig {
        VerifyConfig {
            read_percent: 0,
            flush_percent: 0,
            discard_percent: 0,
            ..config(max_ops)
        }
    }

    fn run(cfg: VerifyConfig, disk: &mut MemDisk) -> Report {
        VerifyWorkload::new(cfg)
            .run(disk, &mut |_| {})
            .expect("run")
    }

    fn assert_failure_mentions(report: &Report, needle: &str) {
        assert!(
            report.failures.iter().any(|f| f.contains(needle)),
            "no failure mentions {needle:?}: {:#?}",
            report.failures
        );
    }

    #[test]
    fn clean_run_verifies_reads_and_final_image() {
        for order in [
            CompletionOrder::InOrder,
            CompletionOrder::Shuffled { seed: 9 },
        ] {
            let mut disk = MemDisk::new(4 * MIB_SECTORS).with_order(order);
            let r = run(config(1000), &mut disk);
            assert_eq!(r.verify_failures, 0, "{order:?}: {:#?}", r.failures);
            assert_eq!(r.io_errors, 0);
            assert_eq!(r.ops, 1000);
            assert_eq!(r.reads + r.writes + r.flushes + r.discards, r.ops);
            assert!(r.reads > 300 && r.writes > 300 && r.flushes > 0 && r.discards > 0);
            assert_eq!(r.reads_verified, r.reads);
            assert_eq!(r.sectors_verified_final, 4 * MIB_SECTORS);
            assert!(r.lat_us.max_us > 0.0);
            assert!(disk.stats().max_in_flight_seen > 1);
            assert_eq!(disk.in_flight(), 0);
        }
    }

    #[test]
    fn no_overlapping_mutations_in_flight_on_a_tiny_region() {
        // 64 KiB region at queue depth 32 with up to 32 KiB ops: nearly every
        // op conflicts with something; the strict MemDisk rejects any overlap.
        let mut disk = MemDisk::new(MIB_SECTORS).with_order(CompletionOrder::Shuffled { seed: 1 });
        let cfg = VerifyConfig {
            queue_depth: 32,
            max_bytes: 32 * 1024,
            region: Some((256, 128)),
            read_percent: 40,
            discard_percent: 20,
            ..config(5000)
        };
        let r = run(cfg, &mut disk);
        assert_eq!(r.verify_failures, 0, "{:#?}", r.failures);
        assert_eq!(disk.stats().overlap_violations, 0);
        assert_eq!(r.sectors_verified_final, 128);
        assert!(
            disk.stats().max_in_flight_seen > 1,
            "reads still run in parallel"
        );
        assert!(
            disk.image()[..256 * 512].iter().all(|&b| b == 0),
            "stays in region"
        );
        assert!(
            disk.image()[384 * 512..].iter().all(|&b| b == 0),
            "stays in region"
        );
    }

    #[test]
    fn dropped_write_is_caught_as_lost() {
        let mut disk = MemDisk::new(64 * MIB_SECTORS);
        disk.drop_write(1);
        let r = run(writes_only(20), &mut disk);
        assert!(r.verify_failures > 0);
        assert_failure_mentions(&r, "found zeros");
        assert_failure_mentions(&r, "lost write");
    }

    #[test]
    fn corrupted_read_is_caught() {
        let mut disk = MemDisk::new(16 * MIB_SECTORS);
        disk.corrupt_next_read();
        let r = run(config(200), &mut disk);
        assert_eq!(r.verify_failures, 1, "{:#?}", r.failures);
        assert_eq!(r.reads_verified, r.reads - 1);
        assert!(
            r.failures[0].contains("garbage") || r.failures[0].contains("corrupt"),
            "{}",
            r.failures[0]
        );
    }

    #[test]
    fn misdirected_write_is_caught() {
        let mut disk = MemDisk::new(64 * MIB_SECTORS);
        disk.misdirect_next_write(8 * MIB_SECTORS);
        let r = run(writes_only(20), &mut disk);
        assert!(r.verify_failures >= 2, "{:#?}", r.failures);
        assert_failure_mentions(&r, "misdirected");
        assert_failure_mentions(&r, "lost write");
    }

    #[test]
    fn discards_read_back_as_zeros() {
        let mut disk = MemDisk::new(MIB_SECTORS);
        let cfg = VerifyConfig {
            region: Some((0, 512)),
            read_percent: 30,
            discard_percent: 30,
            ..config(2000)
        };
        let r = run(cfg.clone(), &mut disk);
        assert_eq!(r.verify_failures, 0, "{:#?}", r.failures);
        assert!(r.discards > 300);

        // The same run against a disk that ignores discards must fail.
        let mut disk = MemDisk::new(MIB_SECTORS);
        disk.drop_discard(u64::MAX);
        let r = run(cfg, &mut disk);
        assert!(r.verify_failures > 0);
        assert_failure_mentions(&r, "discard not applied");
    }

    #[test]
    fn unsupported_discard_and_flush_turn_into_writes() {
        let mut disk = MemDisk::new(4 * MIB_SECTORS)
            .with_discard(false)
            .with_flush(false);
        let r = run(config(1000), &mut disk);
        assert_eq!((r.discards, r.flushes, r.io_errors), (0, 0, 0));
        assert_eq!(r.verify_failures, 0);
    }

    #[test]
    fn failed_write_counts_as_io_error_not_verify_failure() {
        let mut disk = MemDisk::new(64 * MIB_SECTORS);
        disk.fail_next(1);
        // Force at least 2 blocks so the failed write is torn.
        let cfg = VerifyConfig {
            min_bytes: 8192,
            ..writes_only(20)
        };
        let r = run(cfg, &mut disk);
        assert_eq!(r.io_errors, 1);
        assert_eq!(disk.stats().torn_writes, 1);
        assert_eq!(r.verify_failures, 0, "{:#?}", r.failures);
        assert!(
            r.sectors_verified_final < 64 * MIB_SECTORS,
            "torn range not judged"
        );

        // Later reads of the unknown range are skipped, not failed.
        let mut disk = MemDisk::new(MIB_SECTORS);
        disk.fail_next(3);
        let cfg = VerifyConfig {
            region: Some((0, 256)),
            read_percent: 60,
            discard_percent: 0,
            ..config(500)
        };
        let r = run(cfg, &mut disk);
        assert_eq!(r.io_errors, 3);
        assert_eq!(r.verify_failures, 0, "{:#?}", r.failures);
    }

    #[test]
    fn lost_completion_ends_the_run_with_a_failure() {
        let mut disk = MemDisk::new(4 * MIB_SECTORS);
        disk.swallow_next(1);
        let cfg = VerifyConfig {
            stall_timeout: Duration::from_millis(100),
            ..config(100)
        };
        let r = run(cfg, &mut disk);
        assert_eq!(r.verify_failures, 1);
        assert_eq!(r.lost, 1);
        assert_eq!(r.duplicates, 0);
        assert_failure_mentions(&r, "lost completion");
        assert_eq!(r.sectors_verified_final, 0, "final check skipped");
    }

    #[test]
    fn duplicate_completion_is_a_failure() {
        let mut disk = MemDisk::new(4 * MIB_SECTORS);
        disk.duplicate_next_completion(1);
        let r = run(config(100), &mut disk);
        assert_eq!(r.verify_failures, 1);
        assert_eq!(r.duplicates, 1);
        assert_eq!(r.lost, 0);
        assert_failure_mentions(&r, "duplicate");
    }

    #[test]
    fn second_run_keeps_verifying_the_first_runs_data() {
        let mut disk = MemDisk::new(64 * MIB_SECTORS);
        let mut w = VerifyWorkload::new(writes_only(30));
        let first = w.run(&mut disk, &mut |_| {}).unwrap();
        assert_eq!(first.verify_failures, 0);
        // Damage one written sector behind the workload's back.
        let hit = disk
            .image()
            .chunks(512)
            .position(|s| s.iter().any(|&b| b != 0))
            .unwrap();
        disk.image_mut()[hit * 512 + 100] ^= 1;
        let second = w.run(&mut disk, &mut |_| {}).unwrap();
        assert!(second.verify_failures >= 1, "{:#?}", second.failures);
        assert_failure_mentions(&second, "corrupt");
    }

    #[test]
    fn verify_all_checks_the_carried_model_only() {
        let mut disk = MemDisk::new(8 * MIB_SECTORS);
        let mut w = VerifyWorkload::new(VerifyConfig {
            final_check: false,
            ..writes_only(30)
        });
        let first = w.run(&mut disk, &mut |_| {}).unwrap();
        assert_eq!(first.sectors_verified_final, 0);
        let clean = w.verify_all(&mut disk, &mut |_| {}).unwrap();
        assert_eq!((clean.ops, clean.verify_failures), (0, 0));
        assert_eq!(clean.sectors_verified_final, 8 * MIB_SECTORS);

        // A fresh workload that does not assume a zeroed disk judges nothing.
        let mut blind = VerifyWorkload::new(VerifyConfig {
            assume_zeroed: false,
            ..writes_only(0)
        });
        let r = blind.verify_all(&mut disk, &mut |_| {}).unwrap();
        assert_eq!((r.sectors_verified_final, r.verify_failures), (0, 0));

        let mut smaller = MemDisk::new(4 * MIB_SECTORS);
        assert!(w.verify_all(&mut smaller, &mut |_| {}).is_err());
        assert!(w.verify_all(&mut disk, &mut |_| {}).is_ok(), "model kept");
    }

    /// Executes everything it was given, then "crashes" on the Nth kick
    /// without delivering the completions of the last batch.
    struct DiesOnKick {
        disk: MemDisk,
        kicks_left: u32,
    }

    impl BlockDevice for DiesOnKick {
        fn capacity_sectors(&self) -> u64 {
            self.disk.capacity_sectors()
        }
        fn max_in_flight(&self) -> usize {
            self.disk.max_in_flight()
        }
        fn max_request_sectors(&self) -> u32 {
            self.disk.max_request_sectors()
        }
        fn supports_discard(&self) -> bool {
            self.disk.supports_discard()
        }
        fn supports_flush(&self) -> bool {
            self.disk.supports_flush()
        }
        fn submit(&mut self, tag: u64, req: &BlockRequest<'_>) -> Result<(), DeviceError> {
            self.disk.submit(tag, req)
        }
        fn queues(&self) -> usize {
            self.disk.queues()
        }
        fn submit_to(
            &mut self,
            queue: usize,
            tag: u64,
            req: &BlockRequest<'_>,
        ) -> Result<(), DeviceError> {
            self.disk.submit_to(queue, tag, req)
        }
        fn kick(&mut self) -> Result<(), DeviceError> {
            self.disk.kick()?;
            if self.kicks_left == 0 {
                let mut lost = Vec::new();
                self.disk.poll_completions(Duration::ZERO, &mut lost)?;
                return Err(DeviceError::Disconnected);
            }
            self.kicks_left -= 1;
            Ok(())
        }
        fn poll_completions(
            &mut self,
            timeout: Duration,
            out: &mut Vec<Completion>,
        ) -> Result<(), DeviceError> {
            self.disk.poll_completions(timeout, out)
        }
    }

    #[test]
    fn device_error_keeps_the_model_and_forgets_in_flight_writes() {
        let mut dev = DiesOnKick {
            disk: MemDisk::new(8 * MIB_SECTORS),
            kicks_left: 20,
        };
        let mut w = VerifyWorkload::new(writes_only(1000));
        let err = w.run(&mut dev, &mut |_| {}).unwrap_err();
        assert!(matches!(err, DeviceError::Disconnected), "{err:?}");
        // The last batch was written but never acknowledged: its ranges are
        // unknown, not "newer than acknowledged".
        let r = w.verify_all(&mut dev.disk, &mut |_| {}).unwrap();
        assert_eq!(r.verify_failures, 0, "{:#?}", r.failures);
        assert!(r.sectors_verified_final < 8 * MIB_SECTORS);
        assert!(r.sectors_verified_final > 0);
    }

    #[test]
    fn progress_is_reported_during_timed_runs() {
        let mut disk = MemDisk::new(4 * MIB_SECTORS);
        let cfg = VerifyConfig {
            duration: Some(Duration::from_millis(1200)),
            max_ops: None,
            final_check: false,
            ..config(0)
        };
        let mut ticks = Vec::new();
        let r = VerifyWorkload::new(cfg)
            .run(&mut disk, &mut |p| ticks.push(*p))
            .unwrap();
        assert!(ticks.len() >= 2, "{ticks:?}");
        assert!(ticks.windows(2).all(|w| w[0].ops <= w[1].ops));
        assert!(ticks[0].ops_per_s > 0.0);
        assert!(r.elapsed_s >= 1.2 && r.iops > 0.0 && r.mb_per_s > 0.0);
        assert_eq!(r.verify_failures, 0);
    }

    #[test]
    fn report_round_trips_through_json() {
        let mut disk = MemDisk::new(MIB_SECTORS);
        let r = run(config(100), &mut disk);
        let json = serde_json::to_string(&r).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        // serde_json may round the last bit of an f64; compare those loosely.
        let close = |a: f64, b: f64| (a - b).abs() <= a.abs() * 1e-12;
        assert!(close(back.lat_us.mean_us, r.lat_us.mean_us));
        assert!(close(back.iops, r.iops) && close(back.mb_per_s, r.mb_per_s));
        let exact = Report {
            lat_us: r.lat_us,
            iops: r.iops,
            mb_per_s: r.mb_per_s,
            elapsed_s: r.elapsed_s,
            ..back
        };
        assert_eq!(exact, r);
        assert!(json.contains("\"lat_us\":{\"p50_us\""));
    }

    #[test]
    fn bad_configs_are_rejected() {
        let bad = [
            VerifyConfig {
                min_bytes: 1000,
                ..config(1)
            },
            VerifyConfig {
                min_bytes: 8192,
                max_bytes: 4096,
                ..config(1)
            },
            VerifyConfig {
                read_percent: 90,
                discard_percent: 20,
                ..config(1)
            },
            VerifyConfig {
                queue_depth: 0,
                ..config(1)
            },
            VerifyConfig {
                duration: None,
                max_ops: None,
                ..config(1)
            },
            VerifyConfig {
                region: Some((4, 64)),
                ..config(1)
            },
            VerifyConfig {
                region: Some((0, MIB_SECTORS + 8)),
                ..config(1)
            },
            VerifyConfig {
                min_bytes: 256 * 1024,
                max_bytes: 256 * 1024,
                ..config(1)
            },
        ];
        for cfg in bad {
            let mut disk = MemDisk::new(MIB_SECTORS);
            let err = VerifyWorkload::new(cfg.clone()).run(&mut disk, &mut |_| {});
            assert!(
                matches!(err, Err(DeviceError::InvalidRequest(_))),
                "{cfg:?} gave {err:?}"
            );
        }
    }

    fn rounds(batch: usize, max_ops: u64) -> VerifyConfig {
        VerifyConfig {
            pattern: Pattern::Rounds { batch },
            final_check: false,
            ..config(max_ops)
        }
    }

    #[test]
    fn patterns_parse_and_display() {
        assert_eq!("random".parse(), Ok(Pattern::Random));
        assert_eq!(
            "rounds".parse(),
            Ok(Pattern::Rounds {
                batch: DEFAULT_ROUND_BATCH
            })
        );
        assert_eq!("rounds:4".parse(), Ok(Pattern::Rounds { batch: 4 }));
        for bad in ["rounds:0", "rounds:", "rounds:x", "round", "random:3", ""] {
            assert!(bad.parse::<Pattern>().is_err(), "{bad:?}");
        }
        for p in [Pattern::Random, Pattern::Rounds { batch: 7 }] {
            assert_eq!(p.to_string().parse(), Ok(p));
        }
    }

    #[test]
    fn rounds_drain_each_queue_on_its_own_and_verify_every_block() {
        // 1 MiB = 256 blocks over two queues: 128 blocks, 8 batches of 16
        // per worker. Round 0 writes and reads back every block (256 ops
        // per worker), later rounds also check the previous round first
        // (384). The workers go at their own pace: 2048 ops are about three
        // rounds each.
        let mut disk = MemDisk::new(MIB_SECTORS)
            .with_queues(2)
            .with_order(CompletionOrder::Shuffled { seed: 4 });
        let mut w = VerifyWorkload::new(rounds(16, 1024));
        let first = w.run(&mut disk, &mut |_| {}).unwrap();
        // Resumes mid-round where the first run stopped.
        let second = w.run(&mut disk, &mut |_| {}).unwrap();
        for r in [&first, &second] {
            assert_eq!(
                (r.verify_failures, r.io_errors),
                (0, 0),
                "{:#?}",
                r.failures
            );
            assert_eq!(r.ops, 1024);
            assert_eq!(r.reads_verified, r.reads);
            assert_eq!((r.flushes, r.discards), (0, 0));
        }
        let rounds = first.rounds + second.rounds;
        assert!((5..=7).contains(&rounds), "{rounds} rounds");
        let s = disk.stats();
        assert_eq!(s.overlap_violations, 0);
        let per_queue = &s.submitted_per_queue[..2];
        assert_eq!(per_queue.iter().sum::<u64>(), 2048, "a worker per queue");
        assert!(per_queue.iter().all(|&n| n >= 768), "{per_queue:?}");
        assert_eq!(
            s.max_queue_in_flight_seen, 16,
            "a batch at a time per queue"
        );
        assert_eq!(
            s.queue_drains,
            2048 / 16,
            "each queue drains after every batch"
        );
        assert!(
            s.drained_beside_busy > 0,
            "a queue drains while the other is busy: {s:?}"
        );
        let all = w.verify_all(&mut disk, &mut |_| {}).unwrap();
        assert_eq!(all.verify_failures, 0, "{:#?}", all.failures);
        assert_eq!(all.sectors_verified_final, MIB_SECTORS);
        // Every block was rewritten after round 0 (generations 1..=256).
        assert!(disk
            .image()
            .chunks(512)
            .all(|s| u32::from_le_bytes(s[8..12].try_into().unwrap()) > 256));
    }

    #[test]
    fn rounds_cap_the_batch_at_a_queue_and_a_share() {
        // 64 slots over 4 queues: 16 per queue; a share of 10 blocks.
        let mut disk = MemDisk::new(40 * SECTORS_PER_BLOCK).with_queues(4);
        let r = run(rounds(100, 80), &mut disk);
        assert_eq!(r.verify_failures, 0, "{:#?}", r.failures);
        assert_eq!(r.rounds, 4);
        assert_eq!(disk.stats().max_queue_in_flight_seen, 10);
        let mut disk = MemDisk::new(MIB_SECTORS).with_queues(4);
        run(rounds(100, 64), &mut disk);
        assert_eq!(disk.stats().max_queue_in_flight_seen, 16);
    }

    #[test]
    fn a_lost_write_is_a_stale_read_of_the_previous_round() {
        // One queue, 64 blocks: round 0 is 64 writes and 64 reads.
        // Runs of 64 ops (four batches) at a time.
        let mut disk = MemDisk::new(64 * SECTORS_PER_BLOCK);
        let mut w = VerifyWorkload::new(rounds(16, 64));
        let mut run_n = |disk: &mut MemDisk, n: usize| {
            let mut total = Report::default();
            for _ in 0..n {
                let r = w.run(disk, &mut |_| {}).unwrap();
                total.rounds += r.rounds;
                total.verify_failures += r.verify_failures;
                total.stale_reads += r.stale_reads;
                total.failures.extend(r.failures);
            }
            total
        };
        let r0 = run_n(&mut disk, 2);
        assert_eq!(
            (r0.rounds, r0.verify_failures),
            (1, 0),
            "{:#?}",
            r0.failures
        );
        // Round 1's first write is acknowledged but never stored; round 1
        // checks round 0 and writes (2 runs), then reads back (1 run).
        disk.drop_write(1);
        let r1 = run_n(&mut disk, 3);
        assert_eq!(r1.rounds, 1);
        assert_eq!(r1.verify_failures, 1, "{:#?}", r1.failures);
        assert_eq!(r1.stale_reads, 1);
        let msg = &r1.failures[0];
        assert!(
            msg.starts_with("stale read: round 1 read-back (worker 0, queue 0) of sectors 0+8")
                && msg.contains("holds round 0 (gen 1) instead of round 1 (gen 65)"),
            "{msg}"
        );
        // The final check is no round read, but the sector's share names
        // the rounds all the same.
        let all = w.verify_all(&mut disk, &mut |_| {}).unwrap();
        assert_eq!((all.verify_failures, all.stale_reads), (1, 1));
        let msg = &all.failures[0];
        assert!(
            msg.starts_with("stale read: final-check read of sectors 0+")
                && msg.contains("holds round 0 (gen 1) instead of round 1 (gen 65)"),
            "{msg}"
        );
    }

    #[test]
    fn an_acknowledged_write_landing_again_later_is_a_stale_read() {
        // The bug class of a restarted backend resubmitting a request the
        // guest saw completed: round 0's write lands again after round 1's.
        let mut disk = MemDisk::new(MIB_SECTORS)
            .with_queues(2)
            .with_order(CompletionOrder::Shuffled { seed: 8 });
        disk.replay_next_write_late();
        // Rounds 0 and 1 (512 + 768 ops), then the final check.
        let r = run(
            VerifyConfig {
                final_check: true,
                ..rounds(16, 1280)
            },
            &mut disk,
        );
        assert!(r.stale_reads >= 1, "{r:?}");
        assert_eq!(r.verify_failures, r.stale_reads, "{:#?}", r.failures);
        let msg = &r.failures[0];
        assert!(
            msg.starts_with("stale read: round 1 read-back")
                && msg.contains("holds round 0 (gen ")
                && msg.contains("instead of round 1 (gen "),
            "{msg}"
        );
    }

    #[test]
    fn rounds_never_overlap_and_keep_carried_state_across_a_device_error() {
        let mut dev = DiesOnKick {
            disk: MemDisk::new(MIB_SECTORS).with_queues(2),
            kicks_left: 30,
        };
        let mut w = VerifyWorkload::new(rounds(8, 10_000));
        let err = w.run(&mut dev, &mut |_| {}).unwrap_err();
        assert!(matches!(err, DeviceError::Disconnected), "{err:?}");
        // The abandoned batch's ranges are unknown; the rest verifies, and
        // rounds carry on on the same disk.
        let r = w.run(&mut dev.disk, &mut |_| {}).unwrap();
        assert_eq!(r.verify_failures, 0, "{:#?}", r.failures);
        assert_eq!(dev.disk.stats().overlap_violations, 0);
        assert!(r.rounds > 0);
    }

    #[test]
    fn bench_runs_reads_and_overlapping_writes() {
        for op in [BenchOp::RandomRead, BenchOp::RandomWrite] {
            let mut disk = MemDisk::new(MIB_SECTORS)
                .with_strict_overlap(false)
                .with_order(CompletionOrder::Shuffled { seed: 5 });
            let cfg = BenchConfig {
                op,
                duration: Duration::from_millis(100),
                ..BenchConfig::default()
            };
            let r = BenchWorkload::new(cfg).run(&mut disk, &mut |_| {}).unwrap();
            assert!(r.ops > 0);
            assert_eq!(r.latency.count(), r.ops);
            assert_eq!(r.bytes, r.ops * 4096);
            assert_eq!(r.io_errors, 0);
            assert!(r.iops() > 0.0);
            assert_eq!(disk.in_flight(), 0);
            let written = disk.image().iter().any(|&b| b != 0);
            assert_eq!(written, op == BenchOp::RandomWrite);
        }
    }
}
