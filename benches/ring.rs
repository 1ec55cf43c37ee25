//! Microbenchmarks of the data-plane pieces the guest does not see:
//!
//! - `ring/round_trip`: `batch` requests through a blkif ring and their
//!   responses back (put + push → take + respond + push → take), all in one
//!   thread, so this is the cost of the shared-memory protocol itself;
//! - `parse/*`: validating a typical 11-segment request and a 32-segment
//!   indirect one against the grant table, as blkback does per request;
//! - `shadow/slot_lifecycle`: what the shadow log adds per request, as a
//!   netif TX drain pays it: `batch` slots logged on consume, each answer
//!   logged COMPLETING, then one publication freeing them all; and
//!   `shadow/slot_lifecycle_one_writer`, the same through one
//!   `ShadowLog::writer` per batch (one lock instead of one per step);
//!   `shadow/slot_lifecycle_built_records`, the same with each slot's
//!   record and answer built on the stack just before it is logged, field
//!   by field, as the netif backend's records are (what the log then
//!   reads was just written by narrower stores).
//!   The `shadow/` groups are timed in the thread's CPU time, which other
//!   jobs on the machine hardly move; the others in wall time.
//!
//! Run with `cargo bench --bench ring`.
#![deny(unsafe_code)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nix::time::{clock_gettime, ClockId};
use shadowback_blkback::request::{parse, DiskGeometry, DEFAULT_MAX_INDIRECT_SEGMENTS};
use shadowback_ring::blkif::{
    Blkif, BlkifRequest, BlkifRequestIndirect, BlkifRequestSegment, BlkifResponse,
    BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_OP_INDIRECT, BLKIF_OP_READ, BLKIF_OP_WRITE,
    BLKIF_RSP_OKAY,
};
use shadowback_ring::grant::{DomId, GrantMapper, GrantRef, GrantTable};
use shadowback_ring::sring::{BackRing, FrontRing, RingPages};
use shadowback_ring::SharedRegion;
use shadowback_shadow::ShadowLog;

const BACKEND: DomId = 0;
/// Region layout: frame 0 grant table, 1..=16 ring, 20 indirect page,
/// data frames from 32 on.
const REGION_PAGES: u32 = 128;
const RING_FIRST_FRAME: u32 = 1;
/// `ring-page-order` 4: 16 pages, 512 blkif slots.
const RING_PAGES: usize = 16;
const INDIRECT_FRAME: u32 = 20;
const INDIRECT_GREF: GrantRef = 100;
const FIRST_DATA_FRAME: u32 = 32;

fn region() -> Arc<SharedRegion> {
    Arc::new(SharedRegion::create("bench", REGION_PAGES).expect("memfd region"))
}

fn ring_round_trip(c: &mut Criterion) {
    let region = region();
    let pages =
        || RingPages::contiguous(region.clone(), RING_FIRST_FRAME, RING_PAGES).expect("ring pages");
    let mut front = FrontRing::<Blkif>::init(pages()).expect("front ring");
    let mut back = BackRing::<Blkif>::attach(pages()).expect("back ring");
    let size = front.size();
    let mut group = c.benchmark_group("ring/round_trip");
    for batch in [1u32, 32, size] {
        group.throughput(Throughput::Elements(u64::from(batch)));
        group.bench_function(BenchmarkId::from_parameter(batch), |b| {
            let mut req = BlkifRequest {
                operation: BLKIF_OP_READ,
                nr_segments: 1,
                ..Default::default()
            };
            b.iter(|| {
                for i in 0..batch {
                    req.id = u64::from(i);
                    req.sector_number = u64::from(i) * 8;
                    front.put_request(&req).expect("room on the ring");
                }
                black_box(front.push_requests().expect("push requests"));
                let n = back.unconsumed_requests().expect("requests");
                for _ in 0..n {
                    let (_, r) = back.take_request().expect("take request");
                    let rsp = BlkifResponse {
                        id: r.id,
                        operation: r.operation,
                        status: BLKIF_RSP_OKAY,
                        ..Default::default()
                    };
                    back.put_response(&rsp).expect("put response");
                }
                black_box(back.push_responses().expect("push responses"));
                let mut seen = 0u32;
                while let Some(rsp) = front.take_response().expect("take response") {
                    black_box(rsp);
                    seen += 1;
                }
                assert_eq!(seen, batch);
                // Re-arm both event indices, as the two sides do before sleeping.
                black_box(back.final_check_for_requests().expect("final check"));
                black_box(front.final_check_for_responses().expect("final check"));
            });
        });
    }
    group.finish();
}

fn seg(gref: GrantRef) -> BlkifRequestSegment {
    BlkifRequestSegment {
        gref,
        first_sect: 0,
        last_sect: 7,
        _pad: [0; 2],
    }
}

/// Grants `count` data frames (refs 1..=count) on every other frame, as a
/// guest's scattered pages would be, so no two segments merge into one iovec.
fn grant_data_frames(table: &GrantTable, count: u32) {
    for g in 1..=count {
        table
            .grant(g, BACKEND, FIRST_DATA_FRAME + 2 * g, false)
            .expect("grant data frame");
    }
}

fn parse_requests(c: &mut Criterion) {
    let region = region();
    let table = GrantTable::new(region.clone(), 1).expect("grant table");
    let grants = GrantMapper::new(region.clone(), 1, BACKEND).expect("grant mapper");
    let disk = DiskGeometry {
        sectors: 1 << 21, // 1 GiB
        readonly: false,
        discard: true,
        max_indirect_segments: DEFAULT_MAX_INDIRECT_SEGMENTS,
    };
    const INDIRECT_SEGMENTS: u16 = 32;
    grant_data_frames(&table, u32::from(INDIRECT_SEGMENTS));

    // 11 full pages: the largest request without indirect descriptors.
    let mut direct = BlkifRequest {
        operation: BLKIF_OP_WRITE,
        nr_segments: BLKIF_MAX_SEGMENTS_PER_REQUEST as u8,
        id: 7,
        sector_number: 4096,
        ..Default::default()
    };
    for (i, s) in direct.seg.iter_mut().enumerate() {
        *s = seg(i as GrantRef + 1);
    }

    // 32 pages described by one read-only indirect page.
    table
        .grant(INDIRECT_GREF, BACKEND, INDIRECT_FRAME, true)
        .expect("grant indirect page");
    let indirect_base = u64::from(INDIRECT_FRAME) * 4096;
    for i in 0..u32::from(INDIRECT_SEGMENTS) {
        region
            .write_obj(seg(i + 1), indirect_base + u64::from(i) * 8)
            .expect("write indirect segment");
    }
    let mut ind = BlkifRequestIndirect {
        operation: BLKIF_OP_INDIRECT,
        indirect_op: BLKIF_OP_READ,
        nr_segments: INDIRECT_SEGMENTS,
        id: 9,
        sector_number: 8192,
        ..Default::default()
    };
    ind.indirect_grefs[0] = INDIRECT_GREF;
    let indirect = BlkifRequest::from_indirect(&ind);

    let mut group = c.benchmark_group("parse");
    for (name, req, segments) in [
        ("direct_11_segments", &direct, u32::from(direct.nr_segments)),
        (
            "indirect_32_segments",
            &indirect,
            u32::from(INDIRECT_SEGMENTS),
        ),
    ] {
        let op = parse(req, &disk, &grants).expect("a valid request");
        assert_eq!(op.data_bytes(), u64::from(segments) * 4096, "{name}");
        group.throughput(Throughput::Elements(1));
        group.bench_function(name, |b| {
            b.iter(|| parse(black_box(req), &disk, &grants).expect("a valid request"))
        });
    }
    group.finish();
}

/// Criterion's measurement as the calling thread's CPU time
/// (`CLOCK_THREAD_CPUTIME_ID`) instead of wall time: on a machine other
/// jobs load, wall time counts the time the loop waited for a CPU, its CPU
/// time does not.
struct ThreadCpuTime;

/// Formats values as durations, as wall time does.
static WALL_TIME: WallTime = WallTime;

fn thread_cpu() -> Duration {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .expect("thread CPU clock")
}

impl Measurement for ThreadCpuTime {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        thread_cpu()
    }

    fn end(&self, started: Duration) -> Duration {
        thread_cpu().saturating_sub(started)
    }

    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }

    fn zero(&self) -> Duration {
        Duration::ZERO
    }

    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }

    fn formatter(&self) -> &dyn ValueFormatter {
        WALL_TIME.formatter()
    }
}

fn shadow_slot_lifecycle(c: &mut Criterion<ThreadCpuTime>) {
    let log = ShadowLog::create(256).expect("shadow log");
    log.begin_instance().expect("begin");
    let request = [7u8; 25];
    let response = [3u8; 8];
    let mut idx = 0u32;
    let mut group = c.benchmark_group("shadow/slot_lifecycle");
    for batch in [1u32, 32] {
        group.throughput(Throughput::Elements(u64::from(batch)));
        group.bench_function(BenchmarkId::from_parameter(batch), |b| {
            let mut entries = Vec::with_capacity(batch as usize);
            b.iter(|| {
                entries.clear();
                for i in 0..batch {
                    let e = log
                        .log_consumed(idx.wrapping_add(i), black_box(&request))
                        .expect("consume");
                    entries.push(e);
                }
                for (i, &e) in entries.iter().enumerate() {
                    log.log_completing(e, idx.wrapping_add(i as u32), black_box(&response))
                        .expect("complete");
                }
                idx = idx.wrapping_add(batch);
                assert_eq!(log.log_published(idx).expect("publish"), batch as usize);
            });
        });
    }
    group.finish();
    // The same transitions through one writer per batch, as the generic
    // loop logs a ring's drain (netif's rings, virtqueues).
    let mut group = c.benchmark_group("shadow/slot_lifecycle_one_writer");
    for batch in [1u32, 32] {
        group.throughput(Throughput::Elements(u64::from(batch)));
        group.bench_function(BenchmarkId::from_parameter(batch), |b| {
            let mut entries = Vec::with_capacity(batch as usize);
            b.iter(|| {
                entries.clear();
                let mut w = log.writer().expect("writer");
                for i in 0..batch {
                    let e = w
                        .log_consumed(idx.wrapping_add(i), black_box(&request))
                        .expect("consume");
                    entries.push(e);
                }
                for (i, &e) in entries.iter().enumerate() {
                    w.log_completing(e, idx.wrapping_add(i as u32), black_box(&response))
                        .expect("complete");
                }
                idx = idx.wrapping_add(batch);
                assert_eq!(w.log_published(idx).expect("publish"), batch as usize);
            });
        });
    }
    group.finish();
    let mut group = c.benchmark_group("shadow/slot_lifecycle_built_records");
    for batch in [1u32, 32] {
        group.throughput(Throughput::Elements(u64::from(batch)));
        group.bench_function(BenchmarkId::from_parameter(batch), |b| {
            let mut entries = Vec::with_capacity(batch as usize);
            b.iter(|| {
                entries.clear();
                let mut w = log.writer().expect("writer");
                for i in 0..batch {
                    let at = idx.wrapping_add(i);
                    let record = slot_record(black_box(u64::from(at)), black_box(at), at);
                    let e = w.log_consumed(at, &record).expect("consume");
                    entries.push(e);
                }
                for (i, &e) in entries.iter().enumerate() {
                    let at = idx.wrapping_add(i as u32);
                    let mut answer = [0u8; 8];
                    answer_record(black_box(at as u16), &mut answer);
                    w.log_completing(e, at, &answer).expect("complete");
                }
                idx = idx.wrapping_add(batch);
                assert_eq!(w.log_published(idx).expect("publish"), batch as usize);
            });
        });
    }
    group.finish();
}

/// A netif TX slot's log record (netback's `record::tx`): the 12-byte
/// slot, a tag, the packet's first index, position, count and kind.
#[inline(never)]
fn slot_record(slot: u64, tail: u32, packet: u32) -> [u8; 25] {
    let mut b = [0u8; 25];
    b[0..8].copy_from_slice(&slot.to_le_bytes());
    b[8..12].copy_from_slice(&tail.to_le_bytes());
    b[12..16].copy_from_slice(b"NTXS");
    b[16..20].copy_from_slice(&packet.to_le_bytes());
    b[20..22].copy_from_slice(&0u16.to_le_bytes());
    b[22..24].copy_from_slice(&1u16.to_le_bytes());
    b[24] = 0;
    b
}

/// A netif TX answer's record: the 4-byte response and a tag.
#[inline(never)]
fn answer_record(id: u16, b: &mut [u8; 8]) {
    b[0..2].copy_from_slice(&id.to_le_bytes());
    b[2..4].copy_from_slice(&0i16.to_le_bytes());
    b[4..8].copy_from_slice(b"NTXR");
}

criterion_group!(benches, ring_round_trip, parse_requests);
criterion_group! {
    name = cpu_time_benches;
    config = Criterion::default().with_measurement(ThreadCpuTime);
    targets = shadow_slot_lifecycle
}
criterion_main!(benches, cpu_time_benches);
