//! The frame device interface and its adapter to smoltcp's `phy::Device`.

use std::io;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant as SmolInstant;
use thiserror::Error;
use tracing::warn;

/// Destination MAC, source MAC, EtherType: what a frame carries on top of
/// its MTU-sized payload (no FCS, no VLAN tag).
pub const ETHERNET_HEADER_LEN: usize = 14;

/// What a [`FrameDevice`] can fail with.
#[derive(Debug, Error)]
pub enum FrameError {
    /// The frame is longer than the device's MTU plus the Ethernet header.
    #[error("frame of {len} bytes exceeds the device's {max}-byte limit")]
    TooLong {
        /// Length of the frame handed in.
        len: usize,
        /// MTU plus [`ETHERNET_HEADER_LEN`].
        max: usize,
    },
    /// The other side is gone for good (not a backend restart, which a
    /// device hides as a stall).
    #[error("the link is gone")]
    Disconnected,
    /// The transport failed.
    #[error("device I/O failed")]
    Io(#[source] io::Error),
}

impl FrameError {
    /// True when retrying cannot help: the stack stops on these.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, FrameError::TooLong { .. })
    }
}

/// One Ethernet link as a guest driver sees it.
///
/// Frames are whole Ethernet frames without FCS: destination, source,
/// EtherType, payload. A device may drop frames (a NIC does, TCP resends);
/// it never hands out a frame longer than `mtu() + ETHERNET_HEADER_LEN`.
pub trait FrameDevice {
    /// Hands one frame to the link. A frame the device cannot take right now
    /// (queue full) may be dropped silently, as a NIC would.
    fn send(&mut self, frame: &[u8]) -> Result<(), FrameError>;

    /// Whether [`send`](Self::send) can take a frame now. A device that says
    /// no must later wake [`wait_fd`](Self::wait_fd) or give a
    /// [`poll_again_in`](Self::poll_again_in) hint, or the stack sleeps until
    /// its next TCP timer.
    fn can_send(&mut self) -> bool {
        true
    }

    /// Moves the next received frame into `buf` (replacing its content)
    /// without blocking; `Ok(false)` when none is ready.
    fn recv(&mut self, buf: &mut Vec<u8>) -> Result<bool, FrameError>;

    /// A file descriptor that polls readable when a frame may be ready.
    fn wait_fd(&self) -> Option<BorrowedFd<'_>>;

    /// Call [`recv`](Self::recv) again within this time even if
    /// [`wait_fd`](Self::wait_fd) stays quiet (a device without an fd, or
    /// one holding a frame back until a known moment).
    fn poll_again_in(&self) -> Option<Duration>;

    /// The device's MAC address.
    fn mac(&self) -> [u8; 6];

    /// The largest Ethernet payload (IP packet) the link carries, like
    /// Linux's interface MTU.
    fn mtu(&self) -> usize;

    /// The largest frame [`recv`](Self::recv) may return: a device that
    /// takes TCP super-frames (virtio `GUEST_TSO4`) receives frames
    /// beyond the MTU, which the stack accepts as large segments.
    fn max_rx_frame(&self) -> usize {
        self.mtu().saturating_add(ETHERNET_HEADER_LEN)
    }
}

/// Frame counters of one stack's device, in every report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhyStats {
    /// Frames the device handed to the stack.
    pub rx_frames: u64,
    /// Frames the stack handed to the device.
    pub tx_frames: u64,
    /// Received frames discarded as longer than the MTU allows.
    pub rx_oversized: u64,
    /// Frames the device refused with an error.
    pub tx_errors: u64,
}

/// smoltcp's view of a [`FrameDevice`].
///
/// smoltcp's token API cannot return errors, so the adapter counts them and
/// keeps the first fatal one for [`take_fatal`](Self::take_fatal).
pub(crate) struct PhyAdapter<'d> {
    dev: &'d mut dyn FrameDevice,
    /// The last received frame, reused for every receive.
    rx_buf: Vec<u8>,
    /// The frame being built, reused for every transmit.
    tx_buf: Vec<u8>,
    mtu: usize,
    stats: PhyStats,
    fatal: Option<FrameError>,
}

impl<'d> PhyAdapter<'d> {
    pub(crate) fn new(dev: &'d mut dyn FrameDevice) -> Self {
        let mtu = dev.mtu();
        PhyAdapter {
            dev,
            rx_buf: Vec::with_capacity(mtu + ETHERNET_HEADER_LEN),
            tx_buf: Vec::with_capacity(mtu + ETHERNET_HEADER_LEN),
            mtu,
            stats: PhyStats::default(),
            fatal: None,
        }
    }

    pub(crate) fn device(&self) -> &dyn FrameDevice {
        &*self.dev
    }

    pub(crate) fn stats(&self) -> PhyStats {
        self.stats
    }

    /// The first fatal device error since the last call.
    pub(crate) fn take_fatal(&mut self) -> Option<FrameError> {
        self.fatal.take()
    }

    fn max_frame(&self) -> usize {
        self.mtu.saturating_add(ETHERNET_HEADER_LEN)
    }
}

/// Records a device error: fatal ones stop the stack, others are counted.
fn note_error(fatal: &mut Option<FrameError>, err: FrameError) {
    if err.is_fatal() {
        if fatal.is_none() {
            *fatal = Some(err);
        }
    } else {
        warn!(error = %err, "frame device error");
    }
}

impl phy::Device for PhyAdapter<'_> {
    type RxToken<'a>
        = RxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = TxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, _now: SmolInstant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        if self.fatal.is_some() {
            return None;
        }
        let max = self.max_frame();
        let max_rx = self.dev.max_rx_frame().max(max);
        loop {
            match self.dev.recv(&mut self.rx_buf) {
                Ok(true) if self.rx_buf.len() > max_rx => {
                    // A device bug or a hostile peer: never hand smoltcp more
                    // than the MTU it was told about.
                    self.stats.rx_oversized += 1;
                    continue;
                }
                Ok(true) => {
                    self.stats.rx_frames += 1;
                    return Some((
                        RxToken {
                            frame: &self.rx_buf,
                        },
                        TxToken {
                            dev: &mut *self.dev,
                            frame: &mut self.tx_buf,
                            stats: &mut self.stats,
                            fatal: &mut self.fatal,
                            max,
                        },
                    ));
                }
                Ok(false) => return None,
                Err(err) => {
                    note_error(&mut self.fatal, err);
                    return None;
                }
            }
        }
    }

    fn transmit(&mut self, _now: SmolInstant) -> Option<TxToken<'_>> {
        if self.fatal.is_some() || !self.dev.can_send() {
            return None;
        }
        let max = self.max_frame();
        Some(TxToken {
            dev: &mut *self.dev,
            frame: &mut self.tx_buf,
            stats: &mut self.stats,
            fatal: &mut self.fatal,
            max,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.max_frame();
        caps
    }
}

/// One received frame, lent to smoltcp.
pub(crate) struct RxToken<'a> {
    frame: &'a [u8],
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(self.frame)
    }
}

/// Room for one frame to send.
pub(crate) struct TxToken<'a> {
    dev: &'a mut dyn FrameDevice,
    frame: &'a mut Vec<u8>,
    stats: &'a mut PhyStats,
    fatal: &'a mut Option<FrameError>,
    max: usize,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        // smoltcp sizes frames from `capabilities()`, so `len <= max`; a
        // longer one is still built (the closure must run) but refused below.
        self.frame.clear();
        self.frame.resize(len, 0);
        let result = f(self.frame);
        let sent = if len > self.max {
            Err(FrameError::TooLong { len, max: self.max })
        } else {
            self.dev.send(self.frame)
        };
        match sent {
            Ok(()) => self.stats.tx_frames += 1,
            Err(err) => {
                self.stats.tx_errors += 1;
                note_error(self.fatal, err);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::{Device, RxToken as _, TxToken as _};
    use std::collections::VecDeque;

    /// A device that replays scripted receive results and records sends.
    struct Scripted {
        rx: VecDeque<Result<Vec<u8>, FrameError>>,
        sent: Vec<Vec<u8>>,
        send_error: Option<FrameError>,
    }

    impl FrameDevice for Scripted {
        fn send(&mut self, frame: &[u8]) -> Result<(), FrameError> {
            if let Some(err) = self.send_error.take() {
                return Err(err);
            }
            self.sent.push(frame.to_vec());
            Ok(())
        }
        fn recv(&mut self, buf: &mut Vec<u8>) -> Result<bool, FrameError> {
            match self.rx.pop_front() {
                None => Ok(false),
                Some(Ok(frame)) => {
                    *buf = frame;
                    Ok(true)
                }
                Some(Err(err)) => Err(err),
            }
        }
        fn wait_fd(&self) -> Option<BorrowedFd<'_>> {
            None
        }
        fn poll_again_in(&self) -> Option<Duration> {
            None
        }
        fn mac(&self) -> [u8; 6] {
            [2, 0, 0, 0, 0, 1]
        }
        fn mtu(&self) -> usize {
            100
        }
    }

    fn scripted(rx: Vec<Result<Vec<u8>, FrameError>>) -> Scripted {
        Scripted {
            rx: rx.into(),
            sent: Vec::new(),
            send_error: None,
        }
    }

    #[test]
    fn oversized_frames_are_skipped_and_counted() {
        let mut dev = scripted(vec![Ok(vec![1; 115]), Ok(vec![2; 114])]);
        let mut phy = PhyAdapter::new(&mut dev);
        assert_eq!(phy.capabilities().max_transmission_unit, 114);
        let (rx, _tx) = phy.receive(SmolInstant::ZERO).expect("a frame");
        assert_eq!(rx.consume(|f| (f.len(), f[0])), (114, 2));
        assert!(phy.receive(SmolInstant::ZERO).is_none());
        let stats = phy.stats();
        assert_eq!((stats.rx_frames, stats.rx_oversized), (1, 1));
    }

    #[test]
    fn a_fatal_receive_error_stops_the_adapter_until_taken() {
        let mut dev = scripted(vec![Err(FrameError::Disconnected), Ok(vec![0; 60])]);
        let mut phy = PhyAdapter::new(&mut dev);
        assert!(phy.receive(SmolInstant::ZERO).is_none());
        assert!(phy.receive(SmolInstant::ZERO).is_none());
        assert!(phy.transmit(SmolInstant::ZERO).is_none());
        assert!(matches!(phy.take_fatal(), Some(FrameError::Disconnected)));
        assert!(phy.receive(SmolInstant::ZERO).is_some());
    }

    #[test]
    fn transmit_hands_the_built_frame_to_the_device() {
        let mut dev = scripted(vec![]);
        {
            let mut phy = PhyAdapter::new(&mut dev);
            let tx = phy.transmit(SmolInstant::ZERO).expect("room");
            tx.consume(60, |buf| buf.fill(7));
            let tx = phy.transmit(SmolInstant::ZERO).expect("room");
            tx.consume(200, |buf| buf.fill(8));
            let stats = phy.stats();
            assert_eq!((stats.tx_frames, stats.tx_errors), (1, 1));
            // TooLong is the stack's bug, not the link's: not fatal.
            assert!(phy.take_fatal().is_none());
        }
        assert_eq!(dev.sent, vec![vec![7u8; 60]]);
    }

    #[test]
    fn a_failed_send_is_recorded_as_fatal() {
        let mut dev = scripted(vec![]);
        dev.send_error = Some(FrameError::Io(io::Error::other("gone")));
        let mut phy = PhyAdapter::new(&mut dev);
        phy.transmit(SmolInstant::ZERO)
            .expect("room")
            .consume(60, |_| ());
        assert!(matches!(phy.take_fatal(), Some(FrameError::Io(_))));
        assert_eq!(phy.stats().tx_errors, 1);
    }
}
