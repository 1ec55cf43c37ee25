//! Offloads to the wire (docs/ARCHITECTURE.md §11.6): a raw netif
//! frontend's GSO TCP super-frame and blank-checksum frame go through a
//! `shadowback netback` process into a TAP, which gets them as the
//! kernel's own offloads — a virtio-net header with `NEEDS_CSUM` and the
//! segmentation asked for — as an `AF_PACKET` socket with
//! `PACKET_VNET_HDR` on the TAP sees. Each test runs in a thread moved into
//! a fresh network namespace. Needs root and /dev/net/tun.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shadowback_netback::wire::{Tap, TapConfig, TapMode};
use shadowback_ring::grant::GrantTable;
use shadowback_ring::netif::{
    NetifExtraGso, NetifExtraInfo, NetifTx, NetifTxRequest, NETIF_RSP_NULL, NETIF_RSP_OKAY,
    NETTXF_CSUM_BLANK, NETTXF_EXTRA_INFO, NETTXF_MORE_DATA, XEN_NETIF_GSO_TYPE_TCPV4,
};
use shadowback_ring::sring::{FrontRing, RingPages};
use shadowback_ring::{EventChannel, SharedRegion};
use shadowback_xenbus::netif::NetFeatures;

mod netback_common;
use netback_common::{attach_message_on, packet_socket, test_connect, NetbackProcess};

const PAGE: u64 = 4096;
const GRANT_FRAMES: u32 = 1;
const TX_RING_FRAME: u32 = 1;
const RX_RING_FRAME: u32 = 2;
const BUF_FRAME: u32 = 3;
const TX_RING_GREF: u32 = 8;
const RX_RING_GREF: u32 = 9;
const BUF_GREF: u32 = 10;
const BUFS: u32 = 4;
const TAP_NAME: &str = "sbgso0";
const MSS: u16 = 1448;
/// The id an extra-info slot is answered with (its bytes read as a
/// request's `id`): the GSO type and pad, here 1 and 0.
const EXTRA_ID: u16 = 0x0001;
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;

/// Runs `f` on a thread in a new network namespace.
#[allow(unsafe_code, reason = "unshare; no wrapper in the test's dependencies")]
fn in_fresh_netns(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        // SAFETY: unshare takes no pointers and moves only this thread.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare needs root: {}",
            std::io::Error::last_os_error()
        );
        f();
    })
    .join()
    .expect("the test thread");
}

/// The next IPv4 TCP frame on the socket (the kernel's own IPv6 chatter
/// on a fresh link is skipped): its virtio-net header fields and bytes.
fn next_tcp_frame(sock: &OwnedFd) -> (VnetFields, Vec<u8>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 70_000];
    loop {
        assert!(Instant::now() < deadline, "no TCP frame on the TAP");
        let n = match nix::sys::socket::recv(
            sock.as_raw_fd(),
            &mut buf,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN) => {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(e) => panic!("recv: {e}"),
        };
        let (hdr, frame) = buf[..n].split_at(10);
        if frame.len() > 23 && frame[12..14] == [0x08, 0x00] && frame[23] == 6 {
            let u16_at = |at: usize| u16::from_le_bytes([hdr[at], hdr[at + 1]]);
            let fields = VnetFields {
                flags: hdr[0],
                gso_type: hdr[1],
                hdr_len: u16_at(2),
                gso_size: u16_at(4),
                csum_start: u16_at(6),
                csum_offset: u16_at(8),
            };
            return (fields, frame.to_vec());
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct VnetFields {
    flags: u8,
    gso_type: u8,
    hdr_len: u16,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
}

/// Ethernet + IPv4 + TCP (no options) + `payload`, the TCP checksum field
/// holding `0xdead` (garbage: the backend must set the pseudo-header sum).
fn tcp4_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 14];
    f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 0x99]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let total = (20 + 20 + payload.len()) as u16;
    let mut ip = vec![
        0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 79, 0, 2, 10, 79, 0, 1,
    ];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    f.extend(ip);
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&4000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5001u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH, ACK
    tcp[16..18].copy_from_slice(&0xdeadu16.to_be_bytes());
    f.extend(tcp);
    f.extend(payload);
    f
}

/// The TCP pseudo-header sum of a [`tcp4_frame`], folded, not
/// complemented: what a partial checksum field holds.
fn pseudo_sum(frame: &[u8]) -> u16 {
    let mut sum = 0u32;
    for w in frame[26..34].chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    sum += 6 + (frame.len() - 34) as u32;
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// A raw netif frontend: TX ring and data pages, an RX ring left empty.
struct Guest {
    region: Arc<SharedRegion>,
    tx: FrontRing<NetifTx>,
    kick: EventChannel,
    notify: EventChannel,
}

impl Guest {
    fn new() -> Self {
        let region = Arc::new(SharedRegion::create("nb-offload", BUF_FRAME + BUFS).unwrap());
        let gt = GrantTable::new(region.clone(), GRANT_FRAMES).unwrap();
        gt.grant(TX_RING_GREF, 0, TX_RING_FRAME, false).unwrap();
        gt.grant(RX_RING_GREF, 0, RX_RING_FRAME, false).unwrap();
        for i in 0..BUFS {
            gt.grant(BUF_GREF + i, 0, BUF_FRAME + i, true).unwrap();
        }
        let pages =
            |frame: u32| RingPages::new(region.clone(), vec![u64::from(frame) * PAGE]).unwrap();
        let tx = FrontRing::<NetifTx>::init(pages(TX_RING_FRAME)).unwrap();
        // The RX ring is initialised for the backend's attach, then unused.
        let _ = shadowback_ring::sring::FrontRing::<shadowback_ring::netif::NetifRx>::init(pages(
            RX_RING_FRAME,
        ))
        .unwrap();
        Guest {
            region,
            tx,
            kick: EventChannel::new().unwrap(),
            notify: EventChannel::new().unwrap(),
        }
    }

    /// Posts `frame` in data slots of at most 2 KiB (buffers from 0 on),
    /// the GSO extra-info slot after the first when `gso` is set; waits
    /// for every answer.
    fn send(&mut self, frame: &[u8], flags: u16, gso: Option<NetifExtraGso>) {
        let chunks: Vec<&[u8]> = frame.chunks(2048).collect();
        assert!(chunks.len() <= BUFS as usize);
        let extra = if gso.is_some() { NETTXF_EXTRA_INFO } else { 0 };
        for (i, chunk) in chunks.iter().enumerate() {
            let buf = i as u32;
            self.region
                .write(u64::from(BUF_FRAME + buf) * PAGE, chunk)
                .unwrap();
            let more = if i + 1 < chunks.len() {
                NETTXF_MORE_DATA
            } else {
                0
            };
            let req = NetifTxRequest {
                gref: BUF_GREF + buf,
                offset: 0,
                flags: if i == 0 { flags | extra | more } else { more },
                // Clear of EXTRA_ID.
                id: 16 + buf as u16,
                // The first slot's size is the whole packet's.
                size: if i == 0 { frame.len() } else { chunk.len() } as u16,
            };
            self.tx.put_request(&req).unwrap();
            if let (0, Some(g)) = (i, &gso) {
                self.tx
                    .put_request(&NetifTxRequest::from_extra(&NetifExtraInfo::from_gso(0, g)))
                    .unwrap();
            }
        }
        if self.tx.push_requests().unwrap() {
            self.kick.notify().unwrap();
        }
        let slots = chunks.len() + usize::from(gso.is_some());
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut answers = Vec::new();
        while answers.len() < slots {
            assert!(Instant::now() < deadline, "TX slots never answered");
            let _ = self.notify.drain();
            while let Some(rsp) = self.tx.take_response().unwrap() {
                answers.push(rsp);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // The data slots OKAY, the extra-info slot NULL.
        for rsp in &answers {
            let want = if rsp.id == EXTRA_ID {
                NETIF_RSP_NULL
            } else {
                NETIF_RSP_OKAY
            };
            assert_eq!(rsp.status, want, "{answers:?}");
        }
    }
}

#[test]
fn gso_and_blank_checksums_reach_the_tap_as_offloads() {
    in_fresh_netns(|| {
        let tap = Tap::open(&TapConfig::new(TAP_NAME, TapMode::Create)).expect("a TAP");
        let sock = packet_socket(TAP_NAME);
        let mut guest = Guest::new();
        let mut backend = NetbackProcess::spawn(&[]);
        let features = NetFeatures {
            sg: true,
            gso_tcpv4: true,
            ..NetFeatures::default()
        };
        let connect = test_connect(GRANT_FRAMES, TX_RING_GREF, RX_RING_GREF, features);
        let msg = attach_message_on(connect, "tap", false, false, false);
        let wire = tap.queue_fds()[0].as_fd();
        backend.attach(
            &msg,
            &[
                guest.region.file().as_fd(),
                guest.kick.as_fd(),
                guest.notify.as_fd(),
                wire,
            ],
        );

        // A super-frame of three segments' worth, GSO TCPv4.
        let payload: Vec<u8> = (0..3 * u32::from(MSS)).map(|i| (i * 7) as u8).collect();
        let sent = tcp4_frame(&payload);
        let gso = NetifExtraGso {
            size: MSS,
            type_: XEN_NETIF_GSO_TYPE_TCPV4,
            pad: 0,
            features: 0,
        };
        guest.send(&sent, NETTXF_CSUM_BLANK, Some(gso));
        let (hdr, got) = next_tcp_frame(&sock);
        // hdr_len is the kernel's linear part here, not ours: not compared.
        assert_eq!(
            hdr,
            VnetFields {
                flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
                gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
                gso_size: MSS,
                csum_start: 34,
                csum_offset: 16,
                ..hdr
            }
        );
        assert_eq!(got.len(), sent.len(), "one super-frame, not segments");
        assert_eq!(&got[54..], &payload[..], "payload changed");
        assert_eq!(
            u16::from_be_bytes([got[50], got[51]]),
            pseudo_sum(&sent),
            "the checksum field must hold the pseudo-header sum"
        );

        // A blank checksum, no segmentation: left to the kernel too.
        let small = tcp4_frame(b"blank checksum");
        guest.send(&small, NETTXF_CSUM_BLANK, None);
        let (hdr, got) = next_tcp_frame(&sock);
        assert_eq!(hdr.flags, VIRTIO_NET_HDR_F_NEEDS_CSUM, "{hdr:?}");
        assert_eq!(hdr.gso_type, VIRTIO_NET_HDR_GSO_NONE, "{hdr:?}");
        assert_eq!((hdr.csum_start, hdr.csum_offset), (34, 16));
        assert_eq!(&got[54..], b"blank checksum");
        backend.kill_in_place();
    });
}
