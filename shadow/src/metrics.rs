//! Per-device I/O counters that outlive a backend instance
//! (docs/ARCHITECTURE.md §4.1): a one-page sealed memfd the supervisor
//! creates per device and hands to every instance at exec.
//!
//! The serving instance counts in its own memory on the hot path (plain
//! adds, one clock read per request for the latency) and copies its
//! totals into the page at most every [`PUBLISH_INTERVAL`], from its
//! heartbeat step: no syscall, no lock, no shared cache line per request.
//! An instance that starts serving first reads what the page holds and
//! adds its own counts to that, so the page's counters only grow across
//! crashes and takeovers; what a killed instance counted after its last
//! copy (at most one interval's worth) is lost. The supervisor reads the
//! page whenever it is asked for `status`.
//!
//! Layout (version 1), little-endian `u64` words: magic `SBMETRC1`, then
//! [`IoCounters`] in field order, then [`LATENCY_BUCKETS`] histogram
//! buckets, then a sequence word: odd while a copy is being written, so a
//! reader retries instead of mixing two copies (a seqlock; a reader gives
//! up after [`READ_ATTEMPTS`], since the writer is a backend).

use std::os::fd::OwnedFd;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use shadowback_ring::SharedRegion;

use crate::ShadowError;

/// `SBMETRC1`.
const MAGIC: u64 = u64::from_le_bytes(*b"SBMETRC1");
/// How often an instance copies its counters into the page at most.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(10);
/// Sub-buckets per power of two of the latency histogram.
const SUB_BUCKETS: u32 = 4;
/// Latency histogram buckets, in microseconds: 0..=3 one each, then four
/// per power of two up to 2^26 µs (67 s), then one for anything longer.
/// A bucket's bounds are within 25% of each other.
pub const LATENCY_BUCKETS: usize = 101;
/// The histogram by powers of two (what `status` and Prometheus carry):
/// octave `k` < 27 holds latencies in `[2^(k-1), 2^k)` µs (`k` = 0: 0 µs),
/// octave 27 anything from 2^26 µs on.
pub const OCTAVES: usize = 28;

/// The counters in the page. The `*_to_guest` fields are a disk's reads
/// and a vif's received frames; `*_from_guest` a disk's writes and a vif's
/// sent frames.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoCounters {
    /// Requests taken from the rings (a disk's requests of every kind).
    pub requests: u64,
    /// Requests (or frames) answered with an error.
    pub errors: u64,
    pub bytes_to_guest: u64,
    pub bytes_from_guest: u64,
    /// Frames delivered to / taken from the guest (a vif; 0 for a disk).
    pub packets_to_guest: u64,
    pub packets_from_guest: u64,
    /// Frames dropped (a vif: no RX buffer, a wire that refused).
    pub dropped: u64,
    /// Requests in flight at the last copy (a gauge, not added up).
    pub in_flight: u64,
    /// Completion latency of the requests answered (a disk).
    pub latency: Latency,
}

/// The number of `u64` words of [`IoCounters`] before the histogram.
const SCALARS: usize = 10;
const WORDS: usize = 1 + SCALARS + LATENCY_BUCKETS;
/// Byte offset of the sequence word, after the counters.
const SEQ: u64 = (WORDS * 8) as u64;
/// Reads of a page whose copy keeps changing before one is given up.
pub const READ_ATTEMPTS: usize = 1000;

/// A histogram of request latencies in microseconds, from taking a
/// request off the ring to putting its answer there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Latency {
    pub count: u64,
    pub sum_us: u64,
    pub buckets: [u64; LATENCY_BUCKETS],
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            count: 0,
            sum_us: 0,
            buckets: [0; LATENCY_BUCKETS],
        }
    }
}

/// The bucket of a latency of `us` microseconds.
pub fn bucket_of(us: u64) -> usize {
    if us < u64::from(SUB_BUCKETS) {
        return us as usize;
    }
    let octave = 63 - us.leading_zeros(); // ≥ 2
    let sub = (us >> (octave - 2)) & u64::from(SUB_BUCKETS - 1);
    let idx = (octave as usize - 1) * SUB_BUCKETS as usize + sub as usize;
    idx.min(LATENCY_BUCKETS - 1)
}

/// The octave of bucket `idx` (see [`OCTAVES`]).
pub fn octave_of_bucket(idx: usize) -> usize {
    match idx {
        0 | 1 => idx,
        2 | 3 => 2,
        i if i >= LATENCY_BUCKETS - 1 => OCTAVES - 1,
        i => i / SUB_BUCKETS as usize + 2,
    }
}

/// The exclusive upper bound (µs) of octave `k`; `None` for the last.
pub fn octave_below_us(k: usize) -> Option<u64> {
    (k < OCTAVES - 1).then(|| 1u64 << k)
}

/// The largest latency (µs) bucket `idx` holds (`u64::MAX` for the last).
pub fn bucket_upper_us(idx: usize) -> u64 {
    if idx >= LATENCY_BUCKETS - 1 {
        return u64::MAX;
    }
    if idx < SUB_BUCKETS as usize {
        return idx as u64;
    }
    let octave = idx as u32 / SUB_BUCKETS + 1;
    let sub = idx as u64 % u64::from(SUB_BUCKETS);
    ((u64::from(SUB_BUCKETS) + sub + 1) << (octave - 2)) - 1
}

impl Latency {
    /// Counts one request that took `took`.
    pub fn record(&mut self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.count += 1;
        self.sum_us = self.sum_us.saturating_add(us);
        self.buckets[bucket_of(us)] += 1;
    }

    /// The upper bound (µs) of the bucket holding quantile `q` (0..=1);
    /// `None` with nothing recorded. Exact to the bucket (within 25%).
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        // Saturating: the page is written by a backend, which may lie.
        let total = self.buckets.iter().fold(0u64, |a, &n| a.saturating_add(n));
        if total == 0 {
            return None;
        }
        // The rank of the q-th request, 1-based: ceil(q * total), at least 1.
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen = n.saturating_add(seen);
            if seen >= rank {
                return Some(bucket_upper_us(i));
            }
        }
        Some(bucket_upper_us(LATENCY_BUCKETS - 1))
    }

    /// Requests that took less than `us` microseconds, if `us` is a bucket
    /// boundary (a power of two ≥ 4, or 1..=4); the count of every
    /// bucket below it.
    pub fn below_us(&self, us: u64) -> u64 {
        self.buckets
            .iter()
            .enumerate()
            .take_while(|&(i, _)| bucket_upper_us(i) < us)
            .fold(0u64, |a, (_, &n)| a.saturating_add(n))
    }

    /// The histogram by octaves.
    pub fn octaves(&self) -> [u64; OCTAVES] {
        let mut out = [0u64; OCTAVES];
        for (i, &n) in self.buckets.iter().enumerate() {
            let k = octave_of_bucket(i);
            out[k] = out[k].saturating_add(n);
        }
        out
    }

    /// A histogram with `octaves`' counts, each in its octave's top bucket
    /// (so [`Self::below_us`] at octave bounds and [`Self::octaves`] give
    /// them back; quantiles are the octaves' upper bounds).
    pub fn from_octaves(count: u64, sum_us: u64, octaves: &[u64; OCTAVES]) -> Latency {
        let mut l = Latency {
            count,
            sum_us,
            ..Latency::default()
        };
        for (k, &n) in octaves.iter().enumerate() {
            let idx = match octave_below_us(k) {
                Some(below) => bucket_of(below - 1),
                None => LATENCY_BUCKETS - 1,
            };
            l.buckets[idx] = l.buckets[idx].saturating_add(n);
        }
        l
    }
}

impl IoCounters {
    fn to_words(self) -> [u64; WORDS] {
        let mut w = [0u64; WORDS];
        w[0] = MAGIC;
        w[1..=SCALARS].copy_from_slice(&[
            self.requests,
            self.errors,
            self.bytes_to_guest,
            self.bytes_from_guest,
            self.packets_to_guest,
            self.packets_from_guest,
            self.dropped,
            self.in_flight,
            self.latency.count,
            self.latency.sum_us,
        ]);
        w[1 + SCALARS..].copy_from_slice(&self.latency.buckets);
        w
    }

    fn from_words(w: &[u64; WORDS]) -> Self {
        let mut buckets = [0u64; LATENCY_BUCKETS];
        buckets.copy_from_slice(&w[1 + SCALARS..]);
        IoCounters {
            requests: w[1],
            errors: w[2],
            bytes_to_guest: w[3],
            bytes_from_guest: w[4],
            packets_to_guest: w[5],
            packets_from_guest: w[6],
            dropped: w[7],
            in_flight: w[8],
            latency: Latency {
                count: w[9],
                sum_us: w[10],
                buckets,
            },
        }
    }

    /// `op` applied word by word (the counters and the histogram).
    fn combine(&self, other: &IoCounters, op: fn(u64, u64) -> u64) -> IoCounters {
        let (a, b) = (self.to_words(), other.to_words());
        let mut w = [0u64; WORDS];
        for (out, (x, y)) in w.iter_mut().zip(a.iter().zip(b.iter())) {
            *out = op(*x, *y);
        }
        IoCounters::from_words(&w)
    }

    /// `self + other` for every counter; the gauge is `other`'s.
    fn added(&self, other: &IoCounters) -> IoCounters {
        IoCounters {
            in_flight: other.in_flight,
            ..self.combine(other, u64::wrapping_add)
        }
    }

    /// `self - other` for every counter; the gauge is `self`'s.
    fn minus(&self, other: &IoCounters) -> IoCounters {
        IoCounters {
            in_flight: self.in_flight,
            ..self.combine(other, u64::wrapping_sub)
        }
    }
}

/// The page (module docs).
#[derive(Debug)]
pub struct MetricsPage {
    region: SharedRegion,
}

impl MetricsPage {
    /// A zeroed page (supervisor side).
    pub fn create() -> Result<Self, ShadowError> {
        let region = SharedRegion::create("shadowback-metrics", 1)?;
        let page = MetricsPage { region };
        page.write(&IoCounters::default())?;
        Ok(page)
    }

    /// Maps a page received at exec (backend side). A page without the
    /// magic is refused.
    pub fn open(fd: OwnedFd) -> Result<Self, ShadowError> {
        let region = SharedRegion::from_fd(fd)?;
        // Acquire pairs with the release store of the magic in `write`.
        let magic: u64 = region.load(0, Ordering::Acquire)?;
        if magic != MAGIC {
            return Err(ShadowError::NotMetricsPage(magic));
        }
        Ok(MetricsPage { region })
    }

    /// The memfd, to hand to a backend instance.
    pub fn file(&self) -> &std::fs::File {
        self.region.file()
    }

    /// Stores every word inside an odd sequence number, so that a reader
    /// sees one copy whole, never `requests` of one copy with the bytes of
    /// the previous one. One writer at a time (the serving instance).
    fn write(&self, c: &IoCounters) -> Result<(), ShadowError> {
        let seq: u64 = self.region.load(SEQ, Ordering::Relaxed)?;
        let odd = seq | 1;
        self.region.store(odd, SEQ, Ordering::Relaxed)?;
        // The odd number is visible before any word below changes.
        fence(Ordering::Release);
        for (i, w) in c.to_words().iter().enumerate().skip(1) {
            self.region.store(*w, (i * 8) as u64, Ordering::Relaxed)?;
        }
        // Release: a reader that checks the magic sees the words above.
        self.region.store(MAGIC, 0, Ordering::Release)?;
        self.region
            .store(odd.wrapping_add(1), SEQ, Ordering::Release)?;
        Ok(())
    }

    /// Loads one whole copy: again while a copy is being written or one
    /// was written meanwhile, up to [`READ_ATTEMPTS`] times
    /// ([`ShadowError::MetricsBusy`] then: a writer that never finishes).
    pub fn read(&self) -> Result<IoCounters, ShadowError> {
        let mut w = [0u64; WORDS];
        for attempt in 0..READ_ATTEMPTS {
            let before: u64 = self.region.load(SEQ, Ordering::Acquire)?;
            if before & 1 == 0 {
                for (i, slot) in w.iter_mut().enumerate() {
                    *slot = self.region.load((i * 8) as u64, Ordering::Relaxed)?;
                }
                // The words are read before the sequence is read again.
                fence(Ordering::Acquire);
                let after: u64 = self.region.load(SEQ, Ordering::Relaxed)?;
                if after == before {
                    return Ok(IoCounters::from_words(&w));
                }
            }
            if attempt % 16 == 15 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        Err(ShadowError::MetricsBusy)
    }

    /// Loads the page as its only writer may: the previous instance is
    /// fenced (it runs no more), so an odd sequence number is a copy it
    /// left half written, not one in progress. Each word of such a copy is
    /// the old or the new value of a counter that only grows, so the
    /// next instance may count on from it; its first copy makes the
    /// sequence even again.
    pub fn read_as_only_writer(&self) -> Result<IoCounters, ShadowError> {
        let mut w = [0u64; WORDS];
        for (i, slot) in w.iter_mut().enumerate() {
            *slot = self.region.load((i * 8) as u64, Ordering::Acquire)?;
        }
        Ok(IoCounters::from_words(&w))
    }
}

/// The serving instance's side: its own totals, added to what the page
/// held when it started serving.
#[derive(Debug)]
pub struct MetricsWriter {
    page: MetricsPage,
    /// The page when this instance started serving, and its own totals
    /// then; `None` until it serves.
    base: Option<(IoCounters, IoCounters)>,
    last: Option<Instant>,
}

impl MetricsWriter {
    pub fn new(page: MetricsPage) -> Self {
        MetricsWriter {
            page,
            base: None,
            last: None,
        }
    }

    /// This instance serves from now on (an attach succeeded): it was
    /// fenced before, or is the only one. `local`: its totals now.
    pub fn take_over(&mut self, local: &IoCounters) {
        // Not `read`: a predecessor killed inside a copy left the sequence
        // odd for good, and this instance would never publish.
        match self.page.read_as_only_writer() {
            Ok(page) => self.base = Some((page, *local)),
            Err(e) => tracing::warn!(error = %e, "metrics page unreadable"),
        }
        self.last = None;
    }

    /// Copies `local` into the page if it serves and the last copy is
    /// [`PUBLISH_INTERVAL`] old (`force`: now).
    pub fn publish(&mut self, now: Instant, local: &IoCounters, force: bool) {
        let Some((page, at_start)) = &self.base else {
            return;
        };
        if !force
            && self
                .last
                .is_some_and(|t| now.duration_since(t) < PUBLISH_INTERVAL)
        {
            return;
        }
        self.last = Some(now);
        let total = page.added(&local.minus(at_start));
        if let Err(e) = self.page.write(&total) {
            tracing::warn!(error = %e, "metrics page write failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_latency_in_order() {
        let mut prev = 0;
        for us in (0..5000u64).chain([1 << 20, (1 << 26) - 1, 1 << 26, u64::MAX]) {
            let b = bucket_of(us);
            assert!(b >= prev, "{us}");
            prev = b;
            assert!(b < LATENCY_BUCKETS);
            assert!(us <= bucket_upper_us(b), "{us} above bucket {b}");
            if b > 0 && b < LATENCY_BUCKETS - 1 {
                assert!(us > bucket_upper_us(b - 1), "{us} below bucket {b}");
            }
        }
        // Within 25%: four sub-buckets per power of two.
        assert_eq!(bucket_upper_us(bucket_of(1000)), 1023);
        assert_eq!(bucket_upper_us(bucket_of(1024)), 1279);
        assert_eq!(bucket_of(u64::MAX), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn a_lying_page_saturates_instead_of_panicking() {
        let l = Latency {
            count: u64::MAX,
            sum_us: u64::MAX,
            buckets: [u64::MAX; LATENCY_BUCKETS],
        };
        assert_eq!(l.quantile_us(0.5), Some(0));
        assert_eq!(l.quantile_us(1.0), Some(0));
        assert_eq!(l.below_us(1024), u64::MAX);
        assert_eq!(l.octaves()[2], u64::MAX);
    }

    #[test]
    fn octaves_round_trip() {
        for us in [
            0u64,
            1,
            2,
            3,
            4,
            7,
            8,
            1000,
            1 << 25,
            (1 << 26) - 1,
            1 << 26,
            u64::MAX,
        ] {
            let k = octave_of_bucket(bucket_of(us));
            match octave_below_us(k) {
                Some(below) => {
                    assert!(us < below, "{us} in octave {k}");
                    assert!(k == 0 || us >= below / 2, "{us} in octave {k}");
                }
                None => assert!(us >= 1 << 26, "{us}"),
            }
        }
        let mut l = Latency::default();
        for us in [0, 3, 5, 900, 1 << 27] {
            l.record(Duration::from_micros(us));
        }
        let back = Latency::from_octaves(l.count, l.sum_us, &l.octaves());
        assert_eq!(back.octaves(), l.octaves());
        assert_eq!(back.below_us(1024), 4);
    }

    #[test]
    fn quantiles_and_boundaries() {
        let mut l = Latency::default();
        assert_eq!(l.quantile_us(0.5), None);
        for _ in 0..98 {
            l.record(Duration::from_micros(100));
        }
        l.record(Duration::from_millis(5));
        l.record(Duration::from_millis(5));
        assert_eq!(l.count, 100);
        assert_eq!(l.quantile_us(0.5), Some(111)); // 96..=111
        assert_eq!(l.quantile_us(0.98), Some(111));
        assert_eq!(l.quantile_us(0.99), Some(5119)); // 4096..=5119
        assert_eq!(l.below_us(128), 98);
        assert_eq!(l.below_us(4096), 98);
        assert_eq!(l.below_us(8192), 100);
        assert_eq!(l.sum_us, 98 * 100 + 2 * 5000);
    }

    #[test]
    fn page_counts_only_grow_across_instances() {
        let page = MetricsPage::create().unwrap();
        let fd = || -> OwnedFd { page.file().try_clone().unwrap().into() };
        let mut first = MetricsWriter::new(MetricsPage::open(fd()).unwrap());
        // A standby that never served writes nothing.
        let mut standby = MetricsWriter::new(MetricsPage::open(fd()).unwrap());
        let now = Instant::now();
        let mut local = IoCounters::default();
        first.take_over(&local);
        local.requests = 10;
        local.bytes_to_guest = 4096;
        local.in_flight = 3;
        local.latency.record(Duration::from_micros(50));
        standby.publish(now, &IoCounters::default(), true);
        first.publish(now, &local, true);
        let seen = page.read().unwrap();
        assert_eq!(seen, local);
        // Throttled: a copy within the interval is skipped.
        local.requests = 11;
        first.publish(now, &local, false);
        assert_eq!(page.read().unwrap().requests, 10);
        first.publish(now + PUBLISH_INTERVAL, &local, false);
        assert_eq!(page.read().unwrap().requests, 11);
        // The first instance dies; the standby (which counted 5 before as
        // a process, say on an earlier attachment elsewhere) takes over.
        let mut second_local = IoCounters {
            requests: 5,
            ..IoCounters::default()
        };
        standby.take_over(&second_local);
        second_local.requests = 7;
        second_local.in_flight = 1;
        second_local.latency.record(Duration::from_micros(900));
        standby.publish(now, &second_local, true);
        let seen = page.read().unwrap();
        assert_eq!(seen.requests, 13);
        assert_eq!(seen.bytes_to_guest, 4096);
        assert_eq!(seen.in_flight, 1, "the gauge is the serving instance's");
        assert_eq!(seen.latency.count, 2);
        assert_eq!(seen.latency.below_us(64), 1);
    }

    #[test]
    fn a_reader_never_mixes_two_copies() {
        let page = MetricsPage::create().unwrap();
        let fd: OwnedFd = page.file().try_clone().unwrap().into();
        let writer = MetricsPage::open(fd).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                // Every copy has as many requests as bytes and errors.
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let c = IoCounters {
                        requests: n,
                        errors: n,
                        bytes_to_guest: n,
                        bytes_from_guest: n,
                        ..IoCounters::default()
                    };
                    writer.write(&c).unwrap();
                    // A real writer copies every 10 ms; this one leaves a
                    // reader room to finish, yet still races it.
                    std::thread::sleep(Duration::from_micros(20));
                }
            });
            // Stops the writer even if an assertion below fails.
            struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
            impl Drop for Stop<'_> {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::Relaxed);
                }
            }
            let _stop = Stop(&stop);
            let mut changed = 0;
            let mut last = 0;
            let mut busy = 0;
            for _ in 0..20_000 {
                // Busy (the writer was preempted inside a copy for all of
                // the reader's attempts, seen at load 30) is no copy, and
                // never a mixed one.
                let c = match page.read() {
                    Ok(c) => c,
                    Err(ShadowError::MetricsBusy) => {
                        busy += 1;
                        continue;
                    }
                    Err(e) => panic!("{e}"),
                };
                assert_eq!(
                    (c.errors, c.bytes_to_guest, c.bytes_from_guest),
                    (c.requests, c.requests, c.requests),
                    "two copies mixed"
                );
                assert!(c.requests >= last, "went back: {} after {last}", c.requests);
                changed += usize::from(c.requests != last);
                last = c.requests;
            }
            stop.store(true, Ordering::Relaxed);
            assert!(
                changed > 10,
                "the writer barely ran ({changed} copies seen, {busy} reads busy)"
            );
        });
    }

    #[test]
    fn a_copy_that_never_finishes_is_given_up_on() {
        let page = MetricsPage::create().unwrap();
        page.region.store(7u64, SEQ, Ordering::Relaxed).unwrap();
        assert!(matches!(page.read(), Err(ShadowError::MetricsBusy)));
        page.region.store(8u64, SEQ, Ordering::Relaxed).unwrap();
        assert_eq!(page.read().unwrap(), IoCounters::default());
    }

    /// An instance killed inside a copy leaves the sequence odd; the next
    /// one counts on from the half-written copy and its first copy makes
    /// the page readable again (with `read` it never published at all).
    #[test]
    fn an_instance_takes_over_a_copy_its_predecessor_left_half_written() {
        let page = MetricsPage::create().unwrap();
        let open = || {
            let fd: OwnedFd = page.file().try_clone().unwrap().into();
            MetricsWriter::new(MetricsPage::open(fd).unwrap())
        };
        let mut first = open();
        first.take_over(&IoCounters::default());
        let five = IoCounters {
            requests: 5,
            ..IoCounters::default()
        };
        first.publish(Instant::now(), &five, true);
        // Killed inside its next copy: odd sequence, `requests` written.
        let seq: u64 = page.region.load(SEQ, Ordering::Relaxed).unwrap();
        page.region.store(seq | 1, SEQ, Ordering::Relaxed).unwrap();
        page.region.store(7u64, 8, Ordering::Relaxed).unwrap();
        assert!(matches!(page.read(), Err(ShadowError::MetricsBusy)));
        let mut next = open();
        next.take_over(&IoCounters::default());
        let two = IoCounters {
            requests: 2,
            ..IoCounters::default()
        };
        next.publish(Instant::now(), &two, true);
        assert_eq!(page.read().unwrap().requests, 9);
    }

    #[test]
    fn a_foreign_page_is_refused() {
        let region = SharedRegion::create("not-metrics", 1).unwrap();
        let fd: OwnedFd = region.file().try_clone().unwrap().into();
        assert!(matches!(
            MetricsPage::open(fd),
            Err(ShadowError::NotMetricsPage(0))
        ));
    }
}
