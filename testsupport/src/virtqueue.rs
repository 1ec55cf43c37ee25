//! A minimal split-ring virtio-blk driver over memfd "guest memory", for
//! tests that drive a `shadowback blkback` data plane directly
//! ([`BlkbackProcess`]) the way the supervisor does.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use shadowback_ring::{EventChannel, SharedRegion};
use shadowback_shadow::ShadowLog;
use shadowback_xenbus::virtio::{InflightConfig, MemoryRegion, QueueConfig, VirtioAttachRequest};
use shadowback_xenbus::{Message, SeqPacket};

use crate::fd::memfd;
pub use crate::process::BlkbackProcess;

/// Guest memory: 4 MiB at guest-physical 0.
pub const MEM_PAGES: u32 = 1024;
pub const DESC: u64 = 0x0;
pub const AVAIL: u64 = 0x4000;
pub const USED: u64 = 0x8000;
/// Per-head indirect tables (4 descriptors each).
pub const TABLES: u64 = 0x10000;
/// Per-head 16-byte headers.
pub const HEADERS: u64 = 0x20000;
/// Per-head status bytes.
pub const STATUS: u64 = 0x30000;
/// Per-head 4 KiB data buffers.
pub const DATA: u64 = 0x100000;
pub const BLOCK: u64 = 4096;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const FEATURE_EVENT_IDX: u64 = 1 << 29;

/// Everything of one virtio-blk device that outlives backend instances
/// (what the supervisor keeps): memory, eventfds, logs, in-flight region.
pub struct Device {
    pub mem: SharedRegion,
    pub size: u16,
    pub kick: EventChannel,
    pub call: EventChannel,
    pub log: Option<ShadowLog>,
    pub inflight: Option<File>,
    pub features: u64,
    /// Driver state.
    pub avail_idx: u16,
    pub last_used: u16,
}

impl Device {
    pub fn new(size: u16, shadow: bool, inflight: bool, features: u64) -> Self {
        let inflight =
            inflight.then(|| memfd(shadowback_virtio::inflight_mmap_size(1, size).max(4096)));
        Device {
            mem: SharedRegion::create("virtio-test-ram", MEM_PAGES).unwrap(),
            size,
            kick: EventChannel::new().unwrap(),
            call: EventChannel::new().unwrap(),
            log: shadow.then(|| ShadowLog::create(u32::from(size)).unwrap()),
            inflight,
            features,
            avail_idx: 0,
            last_used: 0,
        }
    }

    pub fn request(&self, next_avail: u16) -> VirtioAttachRequest {
        VirtioAttachRequest {
            frontend: "test-vm".into(),
            features: self.features,
            regions: vec![MemoryRegion {
                gpa: 0,
                size: u64::from(MEM_PAGES) * 4096,
                mmap_offset: 0,
            }],
            queues: vec![QueueConfig {
                index: 0,
                size: self.size,
                desc: DESC,
                avail: AVAIL,
                used: USED,
                next_avail,
            }],
            inflight: self.inflight.as_ref().map(|f| InflightConfig {
                mmap_size: f.metadata().unwrap().len(),
                mmap_offset: 0,
                queue_size: self.size,
            }),
            wire: None,
            wire_queues: 0,
            queue_pairs: 1,
            device_state: false,
            shadow: self.log.is_some(),
        }
    }

    /// Sends `attach-virtio` with every descriptor, in the documented order.
    pub fn send_attach(&self, backend: &BlkbackProcess, req: &VirtioAttachRequest, recover: bool) {
        self.send_attach_blaming(backend, req, recover, false);
    }

    /// [`Self::send_attach`] with `blame` (the previous instance's death
    /// counts against its requests: crash-loop breaker, serial replay).
    pub fn send_attach_blaming(
        &self,
        backend: &BlkbackProcess,
        req: &VirtioAttachRequest,
        recover: bool,
        blame: bool,
    ) {
        self.send_attach_on(&backend.control, req, recover, blame);
    }

    /// Sends `attach-virtio` on `control`, the supervisor's end of a
    /// backend's control socket (a process's or one in this process).
    pub fn send_attach_on(
        &self,
        control: &SeqPacket,
        req: &VirtioAttachRequest,
        recover: bool,
        blame: bool,
    ) {
        let mut msg = req.to_message();
        msg.set("recover", u8::from(recover));
        msg.set("blame", u8::from(blame));
        let kick = self.kick.try_clone_fd().unwrap();
        let call = self.call.try_clone_fd().unwrap();
        let mut fds = vec![self.mem.file().as_fd(), kick.as_fd(), call.as_fd()];
        if let Some(f) = &self.inflight {
            fds.push(f.as_fd());
        }
        if let Some(log) = &self.log {
            fds.push(log.file().as_fd());
        }
        control.send(&msg, &fds).unwrap();
    }

    /// Attaches and expects `attached`.
    pub fn attach(&self, backend: &BlkbackProcess, recover: bool) -> Message {
        self.send_attach(backend, &self.request(self.avail_idx), recover);
        let reply = backend.recv();
        assert_eq!(reply.kind(), "attached", "{reply}");
        for key in [
            "generation",
            "replayed",
            "repushed",
            "poisoned",
            "corrupt",
            "replay-us",
        ] {
            assert!(reply.get(key).is_some(), "attached lacks {key}: {reply}");
        }
        reply
    }

    pub fn write_desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.mem.write(table + 16 * u64::from(i), &d).unwrap();
    }

    pub fn write_header(&self, head: u16, req_type: u32, sector: u64) -> u64 {
        let at = HEADERS + 16 * u64::from(head);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write(at, &h).unwrap();
        at
    }

    pub fn data_addr(head: u16) -> u64 {
        DATA + BLOCK * u64::from(head)
    }

    pub fn status_addr(head: u16) -> u64 {
        STATUS + u64::from(head)
    }

    /// Builds a block request for `head` as an indirect table
    /// header / data / status, and makes it available.
    pub fn submit(&mut self, head: u16, req_type: u32, sector: u64, data_len: u32) {
        self.build(head, req_type, sector, data_len);
        self.make_available(head);
    }

    /// Builds requests `(head, type, sector, data_len)` and makes them all
    /// available with one store of `avail->idx` and one kick, so the
    /// backend consumes them as one burst.
    pub fn submit_all(&mut self, reqs: &[(u16, u32, u64, u32)]) {
        for (i, &(head, req_type, sector, data_len)) in reqs.iter().enumerate() {
            self.build(head, req_type, sector, data_len);
            let slot = u64::from(self.avail_idx.wrapping_add(i as u16) % self.size);
            self.mem
                .write(AVAIL + 4 + 2 * slot, &head.to_le_bytes())
                .unwrap();
        }
        self.avail_idx = self.avail_idx.wrapping_add(reqs.len() as u16);
        // Release: the ring entries are visible before the index (§2.7.13).
        self.mem
            .store(self.avail_idx.to_le(), AVAIL + 2, Ordering::Release)
            .unwrap();
        self.kick.notify().unwrap();
    }

    /// Writes the chain of a block request for `head` (indirect table
    /// header / data / status) without making it available.
    pub fn build(&mut self, head: u16, req_type: u32, sector: u64, data_len: u32) {
        let hdr = self.write_header(head, req_type, sector);
        let table = TABLES + 64 * u64::from(head);
        let mut n = 0;
        self.write_desc(table, n, hdr, 16, F_NEXT, n + 1);
        n += 1;
        if data_len > 0 {
            let flags = if req_type == T_OUT {
                F_NEXT
            } else {
                F_NEXT | F_WRITE
            };
            self.write_desc(table, n, Self::data_addr(head), data_len, flags, n + 1);
            n += 1;
        }
        self.write_desc(table, n, Self::status_addr(head), 1, F_WRITE, 0);
        self.mem.write(Self::status_addr(head), &[0xff]).unwrap();
        self.write_desc(DESC, head, table, 16 * (u32::from(n) + 1), F_INDIRECT, 0);
    }

    /// Puts `head` on the avail ring and kicks.
    pub fn make_available(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write(AVAIL + 4 + 2 * slot, &head.to_le_bytes())
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // Release: the ring entry is visible before the index (§2.7.13).
        self.mem
            .store(self.avail_idx.to_le(), AVAIL + 2, Ordering::Release)
            .unwrap();
        self.kick.notify().unwrap();
    }

    /// Used elements published since the last call.
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        // Acquire: the elements are visible once the index is.
        let used: u16 = u16::from_le(self.mem.load(USED + 2, Ordering::Acquire).unwrap());
        let mut out = Vec::new();
        while self.last_used != used {
            let slot = u64::from(self.last_used % self.size);
            let mut e = [0u8; 8];
            self.mem.read(USED + 4 + 8 * slot, &mut e).unwrap();
            out.push((
                u32::from_le_bytes([e[0], e[1], e[2], e[3]]),
                u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            ));
            self.last_used = self.last_used.wrapping_add(1);
        }
        // used_event: interrupt for the next one (EVENT_IDX).
        let used_event = AVAIL + 4 + 2 * u64::from(self.size);
        self.mem
            .write(used_event, &self.last_used.to_le_bytes())
            .unwrap();
        out
    }

    /// Waits up to `timeout` for at least one used element.
    pub fn wait_used(&mut self, timeout: Duration) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.take_used();
            if !got.is_empty() || Instant::now() >= deadline {
                return got;
            }
            let _ = self.call.wait(Duration::from_millis(20));
        }
    }

    pub fn status(&self, head: u16) -> u8 {
        let mut b = [0u8; 1];
        self.mem.read(Self::status_addr(head), &mut b).unwrap();
        b[0]
    }
}

/// Content of `block` after its write number `version`.
pub fn pattern(block: u64, version: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(BLOCK as usize);
    let mut x = block.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ u64::from(version).wrapping_mul(0xff51_afd7_ed55_8ccd)
        ^ 1;
    while out.len() < BLOCK as usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}
