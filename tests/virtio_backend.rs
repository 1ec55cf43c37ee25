//! The virtio-blk data plane end to end: a real `shadowback blkback`
//! process driven through `attach-virtio` by a minimal split-ring driver
//! (`shadowback_testsupport::virtqueue`), killed with SIGKILL mid-workload and recovered from
//! its shadow logs or from the in-flight region alone; hostile chains and
//! attach messages must be answered without killing it.
#![deny(unsafe_code)]

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use shadowback_shadow::ShadowLog;
use shadowback_testsupport::temp::TempImage;
use shadowback_testsupport::virtqueue::*;
use shadowback_testsupport::{wait_for, REPLY_TIMEOUT};

const SECTORS_PER_BLOCK: u64 = BLOCK / 512;

#[derive(Clone, Copy, Debug)]
struct Op {
    block: u64,
    write: bool,
    version: u32,
}

/// A verifying workload: every block's content follows from its last
/// acknowledged write; no two requests on one block are in flight at once.
struct Workload {
    blocks: u64,
    acked: Vec<u32>,
    next_version: Vec<u32>,
    busy: Vec<bool>,
    inflight: HashMap<u16, Op>,
    free_heads: Vec<u16>,
    rng: u64,
    completed: u64,
}

impl Workload {
    fn new(blocks: u64, size: u16) -> Self {
        Workload {
            blocks,
            acked: vec![0; blocks as usize],
            next_version: vec![1; blocks as usize],
            busy: vec![false; blocks as usize],
            inflight: HashMap::new(),
            free_heads: (0..size).rev().collect(),
            rng: 0x1234_5678_9abc_def1,
            completed: 0,
        }
    }

    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Submits requests until `max` are in flight.
    fn fill(&mut self, dev: &mut Device, max: usize) {
        while self.inflight.len() < max {
            let Some(head) = self.free_heads.pop() else {
                return;
            };
            let block = loop {
                let b = self.rand() % self.blocks;
                if !self.busy[b as usize] {
                    break b;
                }
            };
            let write = self.rand().is_multiple_of(2);
            let version = if write {
                let v = self.next_version[block as usize];
                self.next_version[block as usize] += 1;
                dev.mem
                    .write(Device::data_addr(head), &pattern(block, v))
                    .unwrap();
                v
            } else {
                dev.mem
                    .write(Device::data_addr(head), &[0xee; BLOCK as usize])
                    .unwrap();
                0
            };
            self.busy[block as usize] = true;
            self.inflight.insert(
                head,
                Op {
                    block,
                    write,
                    version,
                },
            );
            let t = if write { T_OUT } else { T_IN };
            dev.submit(head, t, block * SECTORS_PER_BLOCK, BLOCK as u32);
        }
    }

    /// Checks used elements: one per head in flight, correct status,
    /// length and data.
    fn complete(&mut self, dev: &Device, used: &[(u32, u32)]) {
        for &(id, len) in used {
            let head = u16::try_from(id).expect("used id fits a head");
            let op = self.inflight.remove(&head).unwrap_or_else(|| {
                panic!("used entry for head {head}, which is not in flight (duplicate?)")
            });
            assert_eq!(dev.status(head), 0, "head {head} {op:?} failed");
            if op.write {
                assert_eq!(len, 1, "write used length");
                self.acked[op.block as usize] = op.version;
            } else {
                assert_eq!(len, BLOCK as u32 + 1, "read used length");
                let mut got = vec![0u8; BLOCK as usize];
                dev.mem.read(Device::data_addr(head), &mut got).unwrap();
                assert!(
                    got == self.expected(op.block),
                    "block {} read back wrong",
                    op.block
                );
            }
            self.busy[op.block as usize] = false;
            self.free_heads.push(head);
            self.completed += 1;
        }
    }

    fn expected(&self, block: u64) -> Vec<u8> {
        match self.acked[block as usize] {
            0 => vec![0; BLOCK as usize],
            v => pattern(block, v),
        }
    }

    /// Runs until `target` requests completed in total.
    fn run_until(&mut self, dev: &mut Device, target: u64, depth: usize) {
        let deadline = Instant::now() + REPLY_TIMEOUT * 3;
        while self.completed < target {
            self.fill(dev, depth);
            let used = dev.wait_used(Duration::from_millis(200));
            self.complete(dev, &used);
            assert!(
                Instant::now() < deadline,
                "workload stalled at {}",
                self.completed
            );
        }
    }

    /// Waits until nothing is in flight: every head got its used entry.
    fn drain(&mut self, dev: &mut Device) {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        while !self.inflight.is_empty() {
            let used = dev.wait_used(Duration::from_millis(200));
            self.complete(dev, &used);
            assert!(
                Instant::now() < deadline,
                "heads never answered: {:?}",
                self.inflight.keys().collect::<Vec<_>>()
            );
        }
    }

    /// Reads every block through the device and from the file.
    fn verify_all(&mut self, dev: &mut Device, disk: &TempImage) {
        for block in 0..self.blocks {
            let mut on_disk = vec![0u8; BLOCK as usize];
            disk.file
                .read_exact_at(&mut on_disk, block * BLOCK)
                .unwrap();
            assert!(
                on_disk == self.expected(block),
                "block {block} on disk is wrong"
            );
        }
        for block in 0..self.blocks {
            let head = self.free_heads.pop().unwrap();
            self.busy[block as usize] = true;
            self.inflight.insert(
                head,
                Op {
                    block,
                    write: false,
                    version: 0,
                },
            );
            dev.submit(head, T_IN, block * SECTORS_PER_BLOCK, BLOCK as u32);
            self.drain(dev);
        }
    }
}

/// SIGKILLs `backend` at a moment its shadow log shows requests INFLIGHT:
/// stop it (SIGSTOP, so the moment holds), look, and kill or let it go on.
fn kill_with_work_in_flight(backend: BlkbackProcess, dev: &mut Device, w: &mut Workload) {
    use nix::sys::signal::{kill, Signal};
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    use nix::unistd::Pid;
    use shadowback_shadow::EntryState;

    let pid = Pid::from_raw(backend.child.id() as i32);
    for attempt in 0..2000u64 {
        w.fill(dev, DEPTH);
        if attempt % 2 == 1 {
            std::thread::sleep(Duration::from_micros(w.rand() % 200));
        }
        kill(pid, Signal::SIGSTOP).unwrap();
        match waitpid(pid, Some(WaitPidFlag::WUNTRACED)).unwrap() {
            WaitStatus::Stopped(..) => {}
            other => panic!("backend not stopped: {other:?}"),
        }
        let snap = dev.log.as_ref().unwrap().snapshot().unwrap();
        let live = snap
            .entries
            .iter()
            .filter(|e| e.state() == Some(EntryState::Inflight))
            .count();
        if live > 0 {
            backend.kill();
            return;
        }
        kill(pid, Signal::SIGCONT).unwrap();
        let used = dev.take_used();
        w.complete(dev, &used);
    }
    panic!("never caught the backend with a request in flight");
}

fn detach_and_exit(backend: BlkbackProcess) {
    backend
        .control
        .send(&shadowback_xenbus::Message::new("detach"), &[])
        .unwrap();
    assert_eq!(backend.recv().kind(), "detached");
    let BlkbackProcess { mut child, control } = backend;
    drop(control);
    let deadline = Instant::now() + REPLY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "backend exited with {status}");
            return;
        }
        assert!(Instant::now() < deadline, "backend did not exit on EOF");
        std::thread::sleep(Duration::from_millis(10));
    }
}

const BLOCKS: u64 = 256;
const DEPTH: usize = 48;

/// SIGKILL mid-workload, four times, 48 requests in flight: every head gets
/// exactly one used entry and every acknowledged write reads back.
#[test]
fn sigkill_mid_workload_every_head_answered_once() {
    let disk = TempImage::new("kill", BLOCKS * BLOCK);
    let mut dev = Device::new(64, true, true, FEATURE_EVENT_IDX);
    let mut w = Workload::new(BLOCKS, 64);
    let mut generation = 0;
    for round in 0..5u64 {
        let backend = BlkbackProcess::spawn(&disk.file, BLOCKS * SECTORS_PER_BLOCK, &[]);
        let reply = dev.attach(&backend, round > 0);
        let g: u64 = reply.get("generation").unwrap().parse().unwrap();
        assert!(g > generation, "generation must grow: {reply}");
        generation = g;
        if round > 0 {
            // Killed with requests in flight: the new instance had work.
            let n = |k: &str| reply.get(k).unwrap().parse::<u64>().unwrap();
            assert!(n("replayed") + n("repushed") > 0, "{reply}");
            assert_eq!(n("poisoned") + n("corrupt"), 0, "{reply}");
        }
        w.run_until(&mut dev, (round + 1) * 400, DEPTH);
        if round == 4 {
            w.drain(&mut dev);
            w.verify_all(&mut dev, &disk);
            detach_and_exit(backend);
            break;
        }
        kill_with_work_in_flight(backend, &mut dev, &mut w);
        // Requests made available while no instance runs: their kicks wait
        // in the eventfd.
        w.fill(&mut dev, 64);
    }
    assert!(w.completed >= 2000);
}

/// A supervisor restart: the VMM's in-flight region survives, the shadow
/// logs do not. The region alone must account for every head.
#[test]
fn inflight_region_alone_recovers_with_fresh_logs() {
    let disk = TempImage::new("region", BLOCKS * BLOCK);
    let mut dev = Device::new(64, true, true, 0);
    let mut w = Workload::new(BLOCKS, 64);
    for round in 0..3u64 {
        let backend = BlkbackProcess::spawn(&disk.file, BLOCKS * SECTORS_PER_BLOCK, &[]);
        let reply = dev.attach(&backend, false);
        if round > 0 {
            let replayed: u64 = reply.get("replayed").unwrap().parse().unwrap();
            assert!(replayed > 0, "the region named no head in flight: {reply}");
        }
        w.run_until(&mut dev, (round + 1) * 300, DEPTH);
        if round == 2 {
            w.drain(&mut dev);
            w.verify_all(&mut dev, &disk);
            detach_and_exit(backend);
            break;
        }
        kill_with_work_in_flight(backend, &mut dev, &mut w);
        // The new supervisor creates new logs.
        dev.log = Some(ShadowLog::create(64).unwrap());
    }
}

/// Direct chains at descriptor `4 * case`; returns the head.
fn chain(dev: &mut Device, case: u16, descs: &[(u64, u32, u16)]) -> u16 {
    let head = 4 * case;
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let i = i as u16;
        let last = usize::from(i) + 1 == descs.len();
        let flags = if last { flags } else { flags | F_NEXT };
        dev.write_desc(DESC, head + i, addr, len, flags, head + i + 1);
    }
    head
}

#[test]
fn hostile_chains_are_answered_and_the_backend_survives() {
    let disk = TempImage::new("hostile", 64 * BLOCK);
    let mut dev = Device::new(64, false, false, 0);
    let mut backend = BlkbackProcess::spawn(&disk.file, 64 * SECTORS_PER_BLOCK, &[]);
    dev.attach(&backend, false);
    let hdr = |dev: &Device, case: u16, t: u32, sector: u64| dev.write_header(case, t, sector);
    let st = |case: u16| Device::status_addr(case);
    let data = |case: u16| Device::data_addr(case);

    // (head, expected used length, expected status or None)
    let mut expect: Vec<(u16, u32, Option<u8>)> = Vec::new();
    // Missing status byte: nothing writable at all.
    let h = hdr(&dev, 0, T_OUT, 0);
    let head = chain(&mut dev, 0, &[(h, 16, 0), (data(0), 512, 0)]);
    expect.push((head, 0, None));
    // A loop: 4 → 5 → 4.
    let h = hdr(&dev, 1, T_IN, 0);
    dev.write_desc(DESC, 4, h, 16, F_NEXT, 5);
    dev.write_desc(DESC, 5, data(1), 512, F_NEXT | F_WRITE, 4);
    expect.push((4, 0, None));
    // Read into a read-only buffer.
    let h = hdr(&dev, 2, T_IN, 0);
    let head = chain(
        &mut dev,
        2,
        &[(h, 16, 0), (data(2), 512, 0), (st(2), 1, F_WRITE)],
    );
    expect.push((head, 1, Some(1)));
    // Sector beyond the disk.
    let h = hdr(&dev, 3, T_IN, 64 * SECTORS_PER_BLOCK);
    let head = chain(
        &mut dev,
        3,
        &[(h, 16, 0), (data(3), 512, F_WRITE), (st(3), 1, F_WRITE)],
    );
    expect.push((head, 1, Some(1)));
    // Unknown request type.
    let h = hdr(&dev, 4, 77, 0);
    let head = chain(&mut dev, 4, &[(h, 16, 0), (st(4), 1, F_WRITE)]);
    expect.push((head, 1, Some(2)));
    // Header too short.
    let h = hdr(&dev, 5, T_IN, 0);
    let head = chain(&mut dev, 5, &[(h, 8, 0), (st(5), 1, F_WRITE)]);
    expect.push((head, 1, Some(1)));
    // Indirect inside indirect.
    let t = TABLES + 64 * 6;
    dev.write_desc(t, 0, TABLES + 64 * 7, 16, F_INDIRECT, 0);
    dev.write_desc(DESC, 24, t, 16, F_INDIRECT, 0);
    expect.push((24, 0, None));
    // GET_ID: the device name, NUL padded; then a flush.
    let h = hdr(&dev, 7, T_GET_ID, 0);
    let head = chain(
        &mut dev,
        7,
        &[(h, 16, 0), (data(7), 64, F_WRITE), (st(7), 1, F_WRITE)],
    );
    expect.push((head, 21, Some(0)));
    let h = hdr(&dev, 8, T_FLUSH, 0);
    let head = chain(&mut dev, 8, &[(h, 16, 0), (st(8), 1, F_WRITE)]);
    expect.push((head, 1, Some(0)));

    for &(head, _, _) in &expect {
        dev.mem
            .write(Device::status_addr(head / 4), &[0xff])
            .unwrap();
        dev.make_available(head);
    }
    let mut got = Vec::new();
    let deadline = Instant::now() + REPLY_TIMEOUT;
    while got.len() < expect.len() {
        got.extend(dev.wait_used(Duration::from_millis(200)));
        assert!(Instant::now() < deadline, "answers missing: got {got:?}");
    }
    assert_eq!(got.len(), expect.len(), "{got:?}");
    for (head, len, status) in expect {
        let (_, used_len) = got
            .iter()
            .find(|(id, _)| *id == u32::from(head))
            .unwrap_or_else(|| panic!("no used entry for head {head}: {got:?}"));
        assert_eq!(*used_len, len, "used length of head {head}");
        if let Some(s) = status {
            assert_eq!(dev.status(head / 4), s, "status of head {head}");
        }
    }
    let mut serial = [0u8; 20];
    dev.mem.read(data(7), &mut serial).unwrap();
    assert_eq!(&serial[..4], b"vd0\0");
    assert!(serial[3..].iter().all(|&b| b == 0));

    // A head out of range on the avail ring breaks the queue, not the
    // process: it reports a disconnect and keeps answering.
    dev.make_available(999);
    let msg = backend.recv();
    assert_eq!(msg.kind(), "disconnect", "{msg}");
    backend
        .control
        .send(
            &shadowback_xenbus::Message::new("poison").with("sector", 5),
            &[],
        )
        .unwrap();
    assert_eq!(backend.recv().kind(), "ok");
    assert!(backend.alive());
    detach_and_exit(backend);
}

#[test]
fn bad_attach_is_refused_without_crashing() {
    let disk = TempImage::new("attach", 16 * BLOCK);
    let dev = Device::new(64, true, false, 0);
    let mut backend = BlkbackProcess::spawn(&disk.file, 16 * SECTORS_PER_BLOCK, &[]);
    type Edit = Box<dyn Fn(&mut shadowback_xenbus::virtio::VirtioAttachRequest)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "misaligned used ring",
            Box::new(|r| r.queues[0].used = USED + 2),
        ),
        (
            "descriptors outside memory",
            Box::new(|r| r.queues[0].desc = u64::from(MEM_PAGES) * 4096 - 16),
        ),
        (
            "unaligned region",
            Box::new(|r| r.regions[0].mmap_offset = 100),
        ),
        (
            "region beyond the file",
            Box::new(|r| r.regions[0].size *= 2),
        ),
        (
            "queue index too large",
            Box::new(|r| r.queues[0].index = 40),
        ),
    ];
    for (name, edit) in cases {
        let mut req = dev.request(0);
        edit(&mut req);
        dev.send_attach(&backend, &req, false);
        let reply = backend.recv();
        assert_eq!(reply.kind(), "error", "{name}: {reply}");
        assert!(backend.alive(), "{name} killed the backend");
    }
    // Then a good one works, and a second is refused as busy.
    dev.attach(&backend, false);
    dev.send_attach(&backend, &dev.request(0), false);
    assert_eq!(backend.recv().kind(), "error");
    detach_and_exit(backend);
}

/// A full ring of the largest size, each chain a descriptor looping on
/// itself: every request is answered at once (no engine slot bounds the
/// burst) after a walk of the whole table. The loop must still go round
/// between such requests, so control messages are answered (and the
/// heartbeat beats) while the burst is being consumed.
#[test]
fn a_burst_of_looping_chains_does_not_starve_the_loop() {
    const SIZE: u16 = 32768;
    const BIG_DESC: u64 = 0x200000;
    const BIG_AVAIL: u64 = 0x280000;
    const BIG_USED: u64 = 0x2a0000;
    let disk = TempImage::new("loops", 16 * BLOCK);
    let dev = Device::new(SIZE, false, false, 0);
    let backend = BlkbackProcess::spawn(&disk.file, 16 * SECTORS_PER_BLOCK, &[]);
    let mut req = dev.request(0);
    req.queues[0].desc = BIG_DESC;
    req.queues[0].avail = BIG_AVAIL;
    req.queues[0].used = BIG_USED;
    dev.send_attach(&backend, &req, false);
    let reply = backend.recv();
    assert_eq!(reply.kind(), "attached", "{reply}");

    let mut table = Vec::with_capacity(16 * usize::from(SIZE));
    let mut ring = Vec::with_capacity(2 * usize::from(SIZE));
    for head in 0..SIZE {
        table.extend_from_slice(&HEADERS.to_le_bytes());
        table.extend_from_slice(&16u32.to_le_bytes());
        table.extend_from_slice(&F_NEXT.to_le_bytes());
        table.extend_from_slice(&head.to_le_bytes());
        ring.extend_from_slice(&head.to_le_bytes());
    }
    dev.mem.write(BIG_DESC, &table).unwrap();
    dev.mem.write(BIG_AVAIL + 4, &ring).unwrap();
    // Release: the ring entries are visible before the index (§2.7.13).
    // SIZE itself wraps to 0 in a u16 index: publish one short of a lap.
    dev.mem
        .store((SIZE - 1).to_le(), BIG_AVAIL + 2, Ordering::Release)
        .unwrap();
    dev.kick.notify().unwrap();

    // The backend is now busy with the burst; it must still answer.
    backend
        .control
        .send(
            &shadowback_xenbus::Message::new("poison").with("sector", 1),
            &[],
        )
        .unwrap();
    assert_eq!(backend.recv().kind(), "ok");
    detach_and_exit(backend);
}

/// How [`crash_then_reuse_heads`] replaces the instance that crashed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Restart {
    /// A data-plane crash: the same shadow log, `recover=1`.
    Takeover,
    /// A restart of the supervisor: fresh shadow logs beside the VMM's
    /// in-flight region.
    Supervisor,
    /// `shadow = false`: the in-flight region alone.
    NoShadow,
}

/// Waits until `backend` has died at its crash point.
fn wait_dead(mut backend: BlkbackProcess, point: &str) {
    wait_for(
        REPLY_TIMEOUT,
        &format!("crash point {point} to fire"),
        || !backend.alive(),
    );
}

/// Issue 8's reproducer, deterministic: the first instance answers a burst
/// of 16 requests in one batch and dies at `point` (a store of the shadow
/// log or of the VMM's in-flight region, before, inside or after the
/// publication of that batch). The driver takes whatever answers were
/// published and at once reuses those heads, most recently answered first
/// (as Linux's free list does), for writes of new data. Then `restart`
/// brings a new instance — itself dying at `adopt_point` if given, for a
/// third to finish. Every request must be answered exactly once, with
/// success, and every write must be on the disk: a head the driver has seen
/// answered must never be resubmitted from stale state.
fn crash_then_reuse_heads(point: &str, restart: Restart, adopt_point: Option<&str>) {
    const BURST: u16 = 16;
    let disk = TempImage::new("reuse", BLOCKS * BLOCK);
    let sectors = BLOCKS * SECTORS_PER_BLOCK;
    let mut dev = Device::new(64, restart != Restart::NoShadow, true, 0);
    let first = BlkbackProcess::spawn(&disk.file, sectors, &[("SHADOWBACK_CRASH_AT", point)]);
    dev.attach(&first, false);
    let burst: Vec<(u16, u32, u64, u32)> = (0..BURST).map(|h| (h, T_GET_ID, 0, 20)).collect();
    dev.submit_all(&burst);
    wait_dead(first, point);

    // What the driver waits for: head → the block it writes (None: GET_ID).
    let mut outstanding: HashMap<u16, Option<u64>> = (0..BURST).map(|h| (h, None)).collect();
    let published = dev.take_used();
    for &(id, _) in &published {
        let head = id as u16;
        assert!(
            outstanding.remove(&head).is_some(),
            "{point}: head {head} answered twice before the crash"
        );
        assert_eq!(dev.status(head), 0, "{point}: GET_ID failed");
    }
    let writes: Vec<(u16, u32, u64, u32)> = published
        .iter()
        .rev()
        .take(8)
        .enumerate()
        .map(|(block, &(id, _))| {
            let head = id as u16;
            let block = block as u64;
            dev.mem
                .write(Device::data_addr(head), &pattern(block, 7))
                .unwrap();
            outstanding.insert(head, Some(block));
            (head, T_OUT, block * SECTORS_PER_BLOCK, BLOCK as u32)
        })
        .collect();
    if !writes.is_empty() {
        dev.submit_all(&writes);
    }

    let recover = match restart {
        Restart::Takeover => true,
        Restart::Supervisor => {
            dev.log = Some(ShadowLog::create(64).unwrap());
            false
        }
        Restart::NoShadow => false,
    };
    let env: Vec<(&str, &str)> = adopt_point
        .map(|p| vec![("SHADOWBACK_CRASH_AT", p)])
        .unwrap_or_default();
    let second = BlkbackProcess::spawn(&disk.file, sectors, &env);
    let last = match adopt_point {
        None => {
            dev.attach(&second, recover);
            second
        }
        Some(p) => {
            // It dies adopting the region: a third instance finishes.
            dev.send_attach(&second, &dev.request(dev.avail_idx), recover);
            wait_dead(second, p);
            let third = BlkbackProcess::spawn(&disk.file, sectors, &[]);
            dev.attach(&third, true);
            third
        }
    };
    let deadline = Instant::now() + REPLY_TIMEOUT;
    while !outstanding.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{point} {restart:?}: never answered: {outstanding:?}"
        );
        for (id, _) in dev.wait_used(Duration::from_millis(50)) {
            let head = id as u16;
            assert!(
                outstanding.remove(&head).is_some(),
                "{point} {restart:?}: head {head} answered although nothing was outstanding on it"
            );
            assert_eq!(
                dev.status(head),
                0,
                "{point} {restart:?}: head {head} failed"
            );
        }
    }
    let extra = dev.wait_used(Duration::from_millis(100));
    assert!(
        extra.is_empty(),
        "{point} {restart:?}: extra answers {extra:?}"
    );
    for block in 0..writes.len() as u64 {
        let mut got = vec![0u8; BLOCK as usize];
        disk.file.read_exact_at(&mut got, block * BLOCK).unwrap();
        assert!(
            got == pattern(block, 7),
            "{point} {restart:?}: acknowledged write of block {block} is not on the disk"
        );
    }
    detach_and_exit(last);
}

/// Crash points around the publication of one batch of 16: inside the
/// in-flight region's `begin` (consumption), `link_batch` (before
/// `used->idx` moves) and `finish_batch` (after it: the driver has seen the
/// batch), and the shadow log's frees and first publication.
const BATCH_POINTS: [&str; 17] = [
    "region-begin.0@5",
    "region-begin.1@5",
    "region-begin.2@16",
    "region-link.0",
    "region-link.1",
    "region-link.16",
    "region-finish.0",
    "region-finish.1",
    "region-finish.2",
    "region-finish.8",
    "region-finish.15",
    "region-finish.16",
    "region-finish.17",
    "free.0",
    "free.1@9",
    "published.0",
    "published.1",
];

#[test]
fn a_data_plane_crash_never_resubmits_a_head_the_driver_reused() {
    for point in BATCH_POINTS {
        crash_then_reuse_heads(point, Restart::Takeover, None);
    }
}

#[test]
fn a_supervisor_restart_never_resubmits_a_head_the_driver_reused() {
    for point in BATCH_POINTS.iter().filter(|p| p.starts_with("region-")) {
        crash_then_reuse_heads(point, Restart::Supervisor, None);
    }
}

#[test]
fn the_region_alone_never_resubmits_a_head_the_driver_reused() {
    for point in BATCH_POINTS.iter().filter(|p| p.starts_with("region-")) {
        crash_then_reuse_heads(point, Restart::NoShadow, None);
    }
}

/// After a restart of the supervisor the first instance adopts the
/// region's heads into its fresh shadow log; dying half-way (at any store
/// of the k-th adopted request) must leave the next instance adopting the
/// region again, not trusting a log that holds part of it.
#[test]
fn an_instance_dying_while_adopting_the_region_is_recovered() {
    for adopt in [
        "consume.0@1",
        "consume.3@1",
        "consume.7@6",
        "consume.8@6",
        "consume.8@16",
    ] {
        crash_then_reuse_heads("region-link.1", Restart::Supervisor, Some(adopt));
        crash_then_reuse_heads("region-begin.2@12", Restart::Supervisor, Some(adopt));
    }
}

/// A detach that arrives while a suspected crash loop is replayed one
/// request at a time: every consumed request is answered before
/// `detached` (the VMM restarts the ring at `used->idx` after it, so an
/// unanswered consumed head would be lost).
#[test]
fn a_detach_during_serial_replay_answers_every_consumed_request() {
    const N: u16 = 48;
    let disk = TempImage::new("serial-detach", BLOCKS * BLOCK);
    let sectors = BLOCKS * SECTORS_PER_BLOCK;
    let mut dev = Device::new(64, true, true, 0);
    // The first instance dies before it answers anything: the next one
    // suspects a crash loop and replays serially.
    let first = BlkbackProcess::spawn(
        &disk.file,
        sectors,
        &[("SHADOWBACK_CRASH_AT", "complete.0")],
    );
    dev.attach(&first, false);
    let reads: Vec<(u16, u32, u64, u32)> = (0..N)
        .map(|h| (h, T_IN, u64::from(h) * SECTORS_PER_BLOCK, BLOCK as u32))
        .collect();
    dev.submit_all(&reads);
    wait_dead(first, "complete.0");
    assert!(dev.take_used().is_empty(), "answered before the crash");

    let second = BlkbackProcess::spawn(&disk.file, sectors, &[]);
    dev.send_attach_blaming(&second, &dev.request(dev.avail_idx), true, true);
    let reply = second.recv();
    assert_eq!(reply.kind(), "attached", "{reply}");
    second
        .control
        .send(&shadowback_xenbus::Message::new("detach"), &[])
        .unwrap();
    assert_eq!(second.recv().kind(), "detached");
    let mut answered = std::collections::HashSet::new();
    for (id, _) in dev.take_used() {
        assert!(answered.insert(id), "head {id} answered twice");
        assert_eq!(dev.status(id as u16), 0, "head {id} failed");
    }
    assert_eq!(
        answered.len(),
        usize::from(N),
        "detached with consumed requests unanswered"
    );
    detach_and_exit(second);
}
