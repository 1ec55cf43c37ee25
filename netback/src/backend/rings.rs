//! A vif's two rings as the generic loop's ring set (docs/ARCHITECTURE.md
//! §11.3): TX (0) and RX (1), each a Xen back ring
//! ([`shadowback_dataplane::xen::XenRing`]) and its event channel (one
//! for both unless split).
//!
//! A TX request is one slot, but a packet is taken from the ring whole and
//! validated as Linux netback does ([`parse_tx_reusing`]) when its first
//! slot is taken: a fatal verdict breaks the vif there, before anything of
//! the packet is logged; otherwise its slots are handed out one at a time,
//! each with its place in the packet ([`TxSlotRecord`], the slot's log
//! record), and the parsed packet waits for the model
//! ([`NetifRings::take_parsed`]). After a crash the rest of a packet the
//! dead instance was still logging is taken slot by slot, unparsed
//! ([`NetifRings::resume`]): the model reassembles it from the records.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

use shadowback_dataplane::rings::{Detail, Record, RingSet, Taken};
use shadowback_dataplane::xen::XenRing;
use shadowback_ring::netif::{NetifRx, NetifRxRequest, NetifRxResponse, NetifTx, NetifTxResponse};
use shadowback_ring::EventChannel;
use shadowback_shadow::{Repush, REQUEST_SIZE};

use super::PUBLISH_EVERY;
use crate::netif::tx::{parse_tx_reusing, TxRequest, TxSlots, TxSpares, TxVerdict};
use crate::record::response;
use crate::record::rx as rxrec;
use crate::record::tx::{self as txrec, SlotKind, TxSlotRecord};

/// Ring positions in the set (and the token's ring byte).
pub const TX: usize = 0;
pub const RX: usize = 1;

/// One ring's event channel, shared by both rings unless split.
pub struct Channel {
    pub kick: EventChannel,
    pub notify: EventChannel,
}

/// Where a request is: a TX slot with its place in its packet, or a posted
/// RX buffer. `replayed`: read back from the log by recovery, not taken
/// from the ring by this instance.
#[derive(Clone, Copy, Debug)]
pub enum NetifSlot {
    Tx { rec: TxSlotRecord, replayed: bool },
    Rx { req: NetifRxRequest, replayed: bool },
}

/// A response, for the ring it answers.
#[derive(Clone, Copy, Debug)]
pub enum NetifAnswer {
    Tx(NetifTxResponse),
    Rx(NetifRxResponse),
}

/// A packet as validated when its first slot was taken.
pub enum TxParsed {
    Request(TxRequest),
    /// Answered `XEN_NETIF_RSP_ERROR` in every slot (`NULL` in extras).
    Refused(TxSlots),
}

/// The rest of a packet a dead instance was still logging: its slots
/// after the logged ones are still on the ring.
#[derive(Clone, Copy, Debug)]
pub struct Resume {
    /// Ring index of the packet's first slot.
    pub packet: u32,
    /// Slots logged (or answered) already: the next slot's position.
    pub next: u16,
    pub count: u16,
    /// Extra-info slots among those logged.
    pub extras: u16,
}

pub struct NetifRings {
    tx: XenRing<NetifTx>,
    rx: XenRing<NetifRx>,
    tx_chan: Channel,
    /// The RX ring's own channel (`split-event-channels=1`).
    rx_chan: Option<Channel>,
    /// Slots of the packet being handed out, in ring order.
    tx_queue: VecDeque<TxSlotRecord>,
    /// The packet being handed out, until the model takes it, with its
    /// first slot's ring index.
    parsed: Cell<Option<(u32, TxParsed)>>,
    resume: Option<Resume>,
    /// Emptied slot and fragment lists, reused by the parser; the model
    /// gives back those of the packets it answered.
    spares: RefCell<TxSpares>,
}

impl NetifRings {
    pub fn new(
        tx: XenRing<NetifTx>,
        rx: XenRing<NetifRx>,
        tx_chan: Channel,
        rx_chan: Option<Channel>,
    ) -> Self {
        NetifRings {
            tx,
            rx,
            tx_chan,
            rx_chan,
            tx_queue: VecDeque::with_capacity(txrec_capacity()),
            parsed: Cell::new(None),
            resume: None,
            spares: RefCell::new(TxSpares::default()),
        }
    }

    /// The next TX takes finish a packet the dead instance was logging.
    pub fn resume(&mut self, resume: Resume) {
        self.resume = (resume.next < resume.count).then_some(resume);
    }

    /// The validated packet whose first slot was taken at `packet`, once.
    pub fn take_parsed(&self, packet: u32) -> Option<TxParsed> {
        match self.parsed.take() {
            Some((first, parsed)) if first == packet => Some(parsed),
            other => {
                self.parsed.set(other);
                None
            }
        }
    }

    /// Gives an answered packet's lists back to the parser.
    pub fn keep(&self, slots: TxSlots, fragments: Option<Vec<crate::netif::TxFragment>>) {
        let mut spares = self.spares.borrow_mut();
        spares.keep_slots(slots);
        if let Some(f) = fragments {
            spares.keep_fragments(f);
        }
    }

    fn chan(&self, ring: usize) -> &Channel {
        match (ring, &self.rx_chan) {
            (RX, Some(rx)) => rx,
            _ => &self.tx_chan,
        }
    }

    fn take_tx(&mut self) -> Result<Option<Taken<NetifSlot>>, String> {
        if let Some(rec) = self.tx_queue.pop_front() {
            return Ok(Some(tx_taken(rec, false)));
        }
        if let Some(mut r) = self.resume {
            let Some((_, slot)) = self.tx.take()? else {
                return Err("a half-logged packet's slots are no longer on the ring".into());
            };
            let rec = TxSlotRecord {
                slot,
                packet: r.packet,
                position: r.next,
                count: r.count,
                kind: if r.next <= r.extras {
                    SlotKind::Extra
                } else {
                    SlotKind::Following
                },
            };
            r.next += 1;
            self.resume = (r.next < r.count).then_some(r);
            return Ok(Some(tx_taken(rec, false)));
        }
        let mut first_index = None;
        let mut ring_err = None;
        let tx = &mut self.tx;
        let mut source = std::iter::from_fn(|| {
            if ring_err.is_some() {
                return None;
            }
            match tx.take() {
                Ok(Some((idx, slot))) => {
                    first_index.get_or_insert(idx);
                    Some(slot)
                }
                Ok(None) => None,
                Err(e) => {
                    ring_err = Some(e);
                    None
                }
            }
        });
        let verdict = parse_tx_reusing(&mut source, self.spares.get_mut());
        if let Some(e) = ring_err {
            return Err(e);
        }
        let Some(first_index) = first_index else {
            return Ok(None);
        };
        // Built where it is kept: a packet is a few hundred bytes, moved
        // as little as possible.
        let parsed = self.parsed.get_mut();
        *parsed = match verdict {
            None => return Ok(None),
            Some(Ok(request)) => Some((first_index, TxParsed::Request(request))),
            Some(Err(TxVerdict::Fatal(f))) => return Err(f.to_string()),
            Some(Err(TxVerdict::Error { slots, reason })) => {
                tracing::debug!(%reason, "TX packet refused");
                Some((first_index, TxParsed::Refused(slots)))
            }
        };
        let slots = match parsed {
            Some((_, TxParsed::Request(r))) => r.slots(),
            Some((_, TxParsed::Refused(s))) => s,
            None => return Ok(None),
        };
        let mut records = txrec::records(first_index, slots);
        let first = records.next();
        self.tx_queue.extend(records);
        Ok(first.map(|rec| tx_taken(rec, false)))
    }
}

/// Room for the longest packet's records.
fn txrec_capacity() -> usize {
    TxSpares::LONGEST_KEPT
}

fn tx_taken(rec: TxSlotRecord, replayed: bool) -> Taken<NetifSlot> {
    Taken {
        log_index: rec.packet.wrapping_add(u32::from(rec.position)),
        request: NetifSlot::Tx { rec, replayed },
        cost: 1,
    }
}

impl RingSet for NetifRings {
    type Request = NetifSlot;
    type Response = NetifAnswer;
    const MAX_RINGS: usize = 2;
    /// A fatal TX verdict disconnects the vif.
    const BREAK_ENDS_ATTACHMENT: bool = true;
    /// The guest may be asleep waiting for what a dead instance owed it,
    /// recovered or not (a vif without a shadow log).
    const WAKE_ON_ATTACH: bool = true;
    const PUBLISH_EVERY: Option<u32> = Some(PUBLISH_EVERY);

    fn count(&self) -> usize {
        2
    }

    fn size(&self, ring: usize) -> u32 {
        match ring {
            TX => self.tx.size(),
            _ => self.rx.size(),
        }
    }

    fn kick(&self, ring: usize) -> &EventChannel {
        &self.chan(ring).kick
    }

    fn shares_kick(&self, ring: usize) -> bool {
        ring == RX && self.rx_chan.is_none()
    }

    fn notify(&self, ring: usize) -> Result<(), String> {
        self.chan(ring).notify.notify().map_err(|e| e.to_string())
    }

    fn notify_channel(&self, ring: usize) -> &EventChannel {
        &self.chan(ring).notify
    }

    fn label(&self, _ring: usize) -> Option<u16> {
        None
    }

    fn take(&mut self, ring: usize) -> Result<Option<Taken<NetifSlot>>, String> {
        if ring == TX {
            return self.take_tx();
        }
        Ok(self.rx.take()?.map(|(idx, req)| Taken {
            request: NetifSlot::Rx {
                req,
                replayed: false,
            },
            log_index: idx,
            cost: 1,
        }))
    }

    fn has_requests(&mut self, ring: usize) -> bool {
        match ring {
            TX => !self.tx_queue.is_empty() || self.tx.has_requests(),
            _ => self.rx.has_requests(),
        }
    }

    fn peek_requests(&mut self, ring: usize) -> bool {
        match ring {
            TX => !self.tx_queue.is_empty() || self.tx.peek_requests(),
            _ => self.rx.peek_requests(),
        }
    }

    /// TX only: a guest waits for TX answers when its ring is full, so
    /// the backend is about to run dry when few requests are left. RX
    /// buffers are taken into the pool as soon as posted (nearly none are
    /// ever left), so RX notifications stay owed to the end of the turn.
    fn requests_left(&self, ring: usize) -> Option<u32> {
        (ring == TX).then(|| self.tx.requests_left())
    }

    fn begin(&mut self, _ring: usize, _request: &NetifSlot) {}

    fn reload(&mut self, _ring: usize, _request: &NetifSlot) {}

    fn put(&mut self, ring: usize, answer: &NetifAnswer) -> Result<u32, String> {
        match (ring, answer) {
            (TX, NetifAnswer::Tx(rsp)) => self.tx.put(rsp),
            (RX, NetifAnswer::Rx(rsp)) => self.rx.put(rsp),
            _ => Err(format!("an answer for another ring than {ring}")),
        }
    }

    fn publish(&mut self, ring: usize) -> Result<Option<u32>, String> {
        match ring {
            TX => self.tx.publish(),
            _ => self.rx.publish(),
        }
    }

    fn published(&mut self, ring: usize) -> bool {
        match ring {
            TX => self.tx.published(),
            _ => self.rx.published(),
        }
    }

    fn unpublished(&self, ring: usize) -> bool {
        match ring {
            TX => self.tx.unpublished(),
            _ => self.rx.unpublished(),
        }
    }

    fn request_record(&self, _ring: usize, request: &NetifSlot, _detail: &Detail) -> Record {
        match request {
            NetifSlot::Tx { rec, .. } => Record::new(&txrec::encode(rec)),
            NetifSlot::Rx { req, .. } => Record::new(&rxrec::encode(req)),
        }
    }

    fn response_record(&self, answer: &NetifAnswer) -> Record {
        match answer {
            NetifAnswer::Tx(rsp) => Record::new(&response::encode_tx(rsp)),
            NetifAnswer::Rx(rsp) => Record::new(&response::encode_rx(rsp)),
        }
    }

    fn locate(&self, ring: usize, record: &[u8; REQUEST_SIZE]) -> Option<NetifSlot> {
        match ring {
            TX => txrec::decode(record).ok().map(|rec| NetifSlot::Tx {
                rec,
                replayed: true,
            }),
            _ => rxrec::decode(record).ok().map(|req| NetifSlot::Rx {
                req,
                replayed: true,
            }),
        }
    }

    /// Slots are the backend's, not the guest's.
    fn place(&self, _request: &NetifSlot) -> Option<u16> {
        None
    }

    fn repush(&mut self, ring: usize, r: &Repush) -> Result<Option<u16>, String> {
        match ring {
            TX => {
                let rsp = response::decode_tx(&r.response).map_err(|e| e.to_string())?;
                self.tx.repush(&rsp, r.rsp_idx)?;
            }
            _ => {
                let rsp = response::decode_rx(&r.response).map_err(|e| e.to_string())?;
                self.rx.repush(&rsp, r.rsp_idx)?;
            }
        }
        Ok(None)
    }

    fn describe(&self, request: &NetifSlot) -> String {
        match request {
            NetifSlot::Tx { rec, .. } => format!("TX slot id {}", rec.slot.id),
            NetifSlot::Rx { req, .. } => format!("RX buffer id {}", req.id),
        }
    }
}
