//! The loop's handling of requests a model holds ([`Started::Held`]), its
//! event source and its end-of-drain hook, over a two-ring set in memory
//! and a model that holds what a network device holds: buffers answered
//! when its source (an eventfd here) is ready, the slots of a packet until
//! its last one, a batch until the ring is drained.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shadowback_ring::EventChannel;
use shadowback_shadow::{EntryState, LogSnapshot, Repush, ShadowLog, REQUEST_SIZE};
use shadowback_xenbus::protocol::{key, kind, ErrorCode};
use shadowback_xenbus::{Message, SeqPacket};

use super::{AttachKind, Built, Core, DataPlane};
use crate::control::AttachFlags;
use crate::event_loop::BackendError;
use crate::model::{Answer, DeviceModel, HeldEntries, Started, Submit};
use crate::recovery::RecoveryStats;
use crate::rings::{Detail, Record, Recovery, RingSet, Taken, DETAIL_SIZE};
use crate::uring::{Engine, EngineConfig};

const SIZE: u32 = 16;
/// Ring 0: posted buffers, held until the source is ready.
const BUFFERS: usize = 0;
/// Ring 1: packets (`MORE`: more slots follow) and batched frames.
const PACKETS: usize = 1;
const MORE: u32 = 1 << 8;
const BATCH: u32 = 1 << 9;
/// The progress flag `ready` marks every held buffer with.
const UNDER_WAY: u32 = 1;
const KIND: &str = "attach-test";
/// Answers a drain puts before it publishes them.
const PUBLISH_EVERY: u32 = 4;

/// One ring as both sides see it.
#[derive(Default)]
struct Ring {
    requests: VecDeque<u32>,
    taken: u32,
    put: Vec<u32>,
    published: Vec<u32>,
    /// Publications that made answers visible.
    publications: u32,
}

#[derive(Default)]
struct Shared {
    rings: [Ring; 2],
    /// Requests the model started, per ring.
    started: [u32; 2],
    /// `drained` calls, per ring.
    drained: [u32; 2],
    readies: u32,
    /// The rings say how many requests are left to take
    /// ([`RingSet::requests_left`]), and the guest asks for a notification
    /// once (the first publication finds it asking), as a guest waiting
    /// for room does.
    asks_once: bool,
    /// Answers published when the loop notified with `write(2)`
    /// ([`RingSet::notify`]) rather than through its engine.
    written_at: Vec<usize>,
    /// Events of the second source the model read.
    second_readies: u32,
    /// The model does not take from the packet ring.
    gated: bool,
}

type SharedRef = Arc<Mutex<Shared>>;

fn lock(shared: &SharedRef) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap()
}

struct TestRings {
    shared: SharedRef,
    kicks: [EventChannel; 2],
    notify: [EventChannel; 2],
}

impl RingSet for TestRings {
    type Request = u32;
    type Response = u32;
    const MAX_RINGS: usize = 2;
    const BREAK_ENDS_ATTACHMENT: bool = true;
    const WAKE_ON_ATTACH: bool = false;
    const PUBLISH_EVERY: Option<u32> = Some(PUBLISH_EVERY);

    fn count(&self) -> usize {
        2
    }
    fn size(&self, _ring: usize) -> u32 {
        SIZE
    }
    fn kick(&self, ring: usize) -> &EventChannel {
        &self.kicks[ring]
    }
    fn notify(&self, ring: usize) -> Result<(), String> {
        let mut shared = lock(&self.shared);
        let published = shared.rings[ring].published.len();
        shared.written_at.push(published);
        self.notify[ring].notify().map_err(|e| e.to_string())
    }
    fn notify_channel(&self, ring: usize) -> &EventChannel {
        &self.notify[ring]
    }
    fn label(&self, _ring: usize) -> Option<u16> {
        None
    }
    fn take(&mut self, ring: usize) -> Result<Option<Taken<u32>>, String> {
        let mut shared = lock(&self.shared);
        let r = &mut shared.rings[ring];
        let Some(request) = r.requests.pop_front() else {
            return Ok(None);
        };
        let log_index = r.taken;
        r.taken += 1;
        Ok(Some(Taken {
            request,
            log_index,
            cost: 1,
        }))
    }
    fn has_requests(&mut self, ring: usize) -> bool {
        self.peek_requests(ring)
    }
    fn peek_requests(&mut self, ring: usize) -> bool {
        !lock(&self.shared).rings[ring].requests.is_empty()
    }
    fn requests_left(&self, ring: usize) -> Option<u32> {
        let shared = lock(&self.shared);
        shared
            .asks_once
            .then(|| shared.rings[ring].requests.len() as u32)
    }
    fn begin(&mut self, _ring: usize, _request: &u32) {}
    fn reload(&mut self, _ring: usize, _request: &u32) {}
    fn put(&mut self, ring: usize, response: &u32) -> Result<u32, String> {
        let mut shared = lock(&self.shared);
        let r = &mut shared.rings[ring];
        r.put.push(*response);
        Ok((r.published.len() + r.put.len() - 1) as u32)
    }
    fn publish(&mut self, ring: usize) -> Result<Option<u32>, String> {
        let mut shared = lock(&self.shared);
        let r = &mut shared.rings[ring];
        if r.put.is_empty() {
            return Ok(None);
        }
        let put = std::mem::take(&mut r.put);
        r.published.extend(put);
        r.publications += 1;
        Ok(Some(r.published.len() as u32))
    }
    fn published(&mut self, ring: usize) -> bool {
        let shared = lock(&self.shared);
        !shared.asks_once || shared.rings[ring].publications == 1
    }
    fn unpublished(&self, ring: usize) -> bool {
        !lock(&self.shared).rings[ring].put.is_empty()
    }
    fn request_record(&self, _ring: usize, request: &u32, _detail: &Detail) -> Record {
        Record::new(&request.to_le_bytes())
    }
    fn response_record(&self, response: &u32) -> Record {
        Record::new(&response.to_le_bytes())
    }
    fn locate(&self, _ring: usize, record: &[u8; REQUEST_SIZE]) -> Option<u32> {
        Some(u32::from_le_bytes(record[..4].try_into().ok()?))
    }
    fn place(&self, _request: &u32) -> Option<u16> {
        None
    }
    fn repush(&mut self, _ring: usize, _repush: &Repush) -> Result<Option<u16>, String> {
        Err("nothing to repush in these tests".into())
    }
    fn describe(&self, request: &u32) -> String {
        format!("request {request:#x}")
    }
}

/// Holds buffers until its source is ready, a packet's slots until its
/// last slot, batched frames until the ring is drained.
struct TestModel {
    shared: SharedRef,
    source: EventChannel,
    /// A second source: each of its frames answers the oldest buffer with
    /// `value + 2000`.
    second: EventChannel,
    buffers: VecDeque<(u16, u32)>,
    packet: Vec<(u16, u32)>,
    batch: Vec<(u16, u32)>,
    answers: VecDeque<Answer<u32>>,
}

impl DeviceModel<TestRings> for TestModel {
    type Request = (usize, u32);
    type Pending = ();
    const MAX_OPS: usize = 1;

    fn parse(&mut self, _rings: &TestRings, ring: usize, request: &u32) -> (usize, u32) {
        (ring, *request)
    }
    fn detail(&self, _request: &(usize, u32)) -> Detail {
        [0; DETAIL_SIZE]
    }
    fn poisoned(&self, _request: &(usize, u32), _poison: &[u64]) -> bool {
        false
    }
    fn start(&mut self, (ring, value): (usize, u32), io: &mut Submit<'_>) -> Started<(), u32> {
        let (at, slot) = io.place();
        assert_eq!(at, ring, "started in another ring's slot");
        lock(&self.shared).started[ring] += 1;
        if ring == BUFFERS {
            self.buffers.push_back((slot, value));
            return Started::Held(());
        }
        if value & MORE != 0 {
            self.packet.push((slot, value));
            return Started::Held(());
        }
        if value & BATCH != 0 {
            self.batch.push((slot, value));
            return Started::Held(());
        }
        for (slot, response) in self.packet.drain(..) {
            self.answers.push_back(Answer {
                ring: PACKETS,
                slot,
                response,
            });
        }
        Started::Done(value)
    }
    fn complete(&mut self, _pending: &mut (), _result: i32, _io: &mut Submit<'_>) -> Option<u32> {
        panic!("no request of this model has an engine op");
    }
    fn fail(&mut self, _rings: &TestRings, _ring: usize, request: &u32) -> u32 {
        request | 1 << 31
    }
    fn is_error(&self, response: &u32) -> bool {
        response & 1 << 31 != 0
    }
    fn next_answer(&mut self) -> Option<Answer<u32>> {
        self.answers.pop_front()
    }
    fn sources(&self) -> usize {
        2
    }
    fn source(&self, n: usize) -> Option<RawFd> {
        let fd = match n {
            0 => self.source.as_raw_fd(),
            _ => self.second.as_raw_fd(),
        };
        (!self.buffers.is_empty()).then_some(fd)
    }
    fn ready(&mut self, n: usize, rings: &TestRings, entries: &mut dyn HeldEntries) -> bool {
        if n == 0 {
            return self.ready_first(rings, entries);
        }
        let frames = self.second.drain().unwrap_or(0);
        lock(&self.shared).second_readies += 1;
        for _ in 0..frames {
            let Some((slot, value)) = self.buffers.pop_front() else {
                break;
            };
            self.answers.push_back(Answer {
                ring: BUFFERS,
                slot,
                response: value + 2000,
            });
        }
        false
    }
    fn takes(&self, ring: usize) -> bool {
        ring != PACKETS || !lock(&self.shared).gated
    }
    fn drained(&mut self, _rings: &TestRings, ring: usize, _entries: &mut dyn HeldEntries) -> bool {
        lock(&self.shared).drained[ring] += 1;
        if ring == PACKETS {
            for (slot, response) in self.batch.drain(..) {
                self.answers.push_back(Answer {
                    ring: PACKETS,
                    slot,
                    response,
                });
            }
        }
        false
    }
}

impl TestModel {
    /// Answers as many buffers, oldest first, as the source's counter
    /// says, after marking every held buffer under way.
    fn ready_first(&mut self, _rings: &TestRings, entries: &mut dyn HeldEntries) -> bool {
        let frames = self.source.drain().unwrap_or(0);
        lock(&self.shared).readies += 1;
        for &(slot, _) in &self.buffers {
            entries.mark(BUFFERS, slot, UNDER_WAY);
        }
        for _ in 0..frames {
            let Some((slot, value)) = self.buffers.pop_front() else {
                break;
            };
            self.answers.push_back(Answer {
                ring: BUFFERS,
                slot,
                response: value + 1000,
            });
        }
        false
    }
}

/// Builds the prepared rings, model and logs on the first attach.
struct TestKind {
    parts: Option<(TestRings, TestModel, Vec<Option<ShadowLog>>)>,
}

impl AttachKind for TestKind {
    type Rings = TestRings;
    type Model = TestModel;
    const KIND: &'static str = KIND;
    const WHAT: &'static str = "test device";

    fn build(
        &mut self,
        _core: &mut Core,
        _msg: &Message,
        _fds: Vec<OwnedFd>,
        _flags: AttachFlags,
    ) -> Result<Built<TestRings, TestModel>, (ErrorCode, String)> {
        let (rings, model, logs) = self
            .parts
            .take()
            .ok_or((ErrorCode::Ebusy, "built once".to_string()))?;
        Ok(Built {
            name: "guest".into(),
            rings,
            model,
            logs,
            recoveries: vec![Recovery::Nothing, Recovery::Nothing],
            stats: RecoveryStats::default(),
            started: Instant::now(),
        })
    }

    fn on_other(
        &mut self,
        _core: &mut Core,
        _rings: Option<&mut TestRings>,
        _msg: &Message,
        _fds: Vec<OwnedFd>,
    ) -> Option<Result<(), BackendError>> {
        None
    }
}

/// The test's side: the supervisor's end of the control socket, the
/// guest's end of the rings, the device's source, second handles on the
/// logs, and the loop's thread.
struct Harness {
    control: SeqPacket,
    shared: SharedRef,
    kicks: [EventChannel; 2],
    notify: [EventChannel; 2],
    source: EventChannel,
    second: EventChannel,
    logs: [ShadowLog; 2],
    thread: Option<JoinHandle<Result<(), BackendError>>>,
}

fn clone(channel: &EventChannel) -> EventChannel {
    EventChannel::from_fd(channel.try_clone_fd().unwrap()).unwrap()
}

fn reopen(log: &ShadowLog) -> ShadowLog {
    ShadowLog::open(OwnedFd::from(log.file().try_clone().unwrap())).unwrap()
}

impl Harness {
    /// A loop serving the test device, attached.
    fn attached() -> Self {
        let (control, backend) = SeqPacket::pair().unwrap();
        let shared = SharedRef::default();
        let kicks = [EventChannel::new().unwrap(), EventChannel::new().unwrap()];
        let source = EventChannel::new().unwrap();
        let second = EventChannel::new().unwrap();
        let logs = [
            ShadowLog::create(SIZE).unwrap(),
            ShadowLog::create(SIZE).unwrap(),
        ];
        for log in &logs {
            log.begin_instance().unwrap();
        }
        let mine = [reopen(&logs[0]), reopen(&logs[1])];
        let notify = [EventChannel::new().unwrap(), EventChannel::new().unwrap()];
        let rings = TestRings {
            shared: shared.clone(),
            kicks: [clone(&kicks[0]), clone(&kicks[1])],
            notify: [clone(&notify[0]), clone(&notify[1])],
        };
        let model = TestModel {
            shared: shared.clone(),
            source: clone(&source),
            second: clone(&second),
            buffers: VecDeque::new(),
            packet: Vec::new(),
            batch: Vec::new(),
            answers: VecDeque::new(),
        };
        let [log0, log1] = logs;
        let parts = Some((rings, model, vec![Some(log0), Some(log1)]));
        let thread = std::thread::spawn(move || {
            let engine = Engine::for_polls(&EngineConfig::default()).unwrap();
            let mut core = Core::new("test".into(), engine, backend);
            DataPlane::new(&mut core, TestKind { parts }).run()
        });
        let harness = Harness {
            control,
            shared,
            kicks,
            notify,
            source,
            second,
            logs: mine,
            thread: Some(thread),
        };
        let reply = harness.request(&Message::new(KIND));
        assert_eq!(reply.kind(), kind::ATTACHED, "{reply:?}");
        harness
    }

    fn request(&self, msg: &Message) -> Message {
        self.control.send(msg, &[]).unwrap();
        let (reply, _) = self
            .control
            .recv_timeout(Duration::from_secs(30))
            .unwrap()
            .expect("no reply from the loop");
        reply
    }

    /// Adds requests to `ring` and kicks it.
    fn post(&self, ring: usize, requests: &[u32]) {
        lock(&self.shared).rings[ring]
            .requests
            .extend(requests.iter().copied());
        self.kicks[ring].notify().unwrap();
    }

    /// `n` frames arrive at the device's source, in one event.
    fn frames(&self, n: u64) {
        nix::unistd::write(&self.source, &n.to_ne_bytes()).unwrap();
    }

    /// Waits until `done` holds of the shared state (the loop runs in its
    /// own thread); fails after 30 s.
    fn until(&self, what: &str, done: impl Fn(&Shared) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done(&lock(&self.shared)) {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn published(&self, ring: usize) -> Vec<u32> {
        lock(&self.shared).rings[ring].published.clone()
    }

    fn entries(&self, ring: usize, state: EntryState) -> Vec<(u32, u32)> {
        let snap: LogSnapshot = self.logs[ring].snapshot().unwrap();
        snap.entries
            .iter()
            .filter(|e| e.state() == Some(state))
            .map(|e| {
                (
                    u32::from_le_bytes(e.request[..4].try_into().unwrap()),
                    e.progress,
                )
            })
            .collect()
    }

    /// Closes the control channel and waits for the loop to end.
    fn stop(mut self) {
        let thread = self.thread.take().unwrap();
        drop(self.control);
        let ended = thread.join().unwrap();
        assert!(
            matches!(ended, Err(BackendError::SupervisorGone)),
            "{ended:?}"
        );
    }
}

#[test]
fn held_buffers_are_answered_when_the_source_is_ready_and_do_not_hold_up_a_detach() {
    let h = Harness::attached();
    h.post(BUFFERS, &[1, 2, 3, 4]);
    h.until("the buffers are started", |s| s.started[BUFFERS] == 4);
    // A few more turns: held, nothing answers them.
    let turns = lock(&h.shared).drained[BUFFERS];
    h.post(PACKETS, &[7]);
    h.until("two more turns", |s| s.drained[BUFFERS] >= turns + 2);
    assert_eq!(h.published(PACKETS), [7]);
    assert!(
        h.published(BUFFERS).is_empty(),
        "a held buffer was answered"
    );
    assert_eq!(lock(&h.shared).readies, 0, "ready without an event");
    let inflight = h.entries(BUFFERS, EntryState::Inflight);
    assert_eq!(
        inflight.len(),
        4,
        "every held buffer is logged: {inflight:?}"
    );

    // Three frames in one event: three answers, oldest buffers first, each
    // logged and published; the last buffer is marked and still held.
    h.frames(3);
    h.until("three buffers are answered", |s| {
        s.rings[BUFFERS].published.len() == 3
    });
    assert_eq!(h.published(BUFFERS), [1001, 1002, 1003]);
    assert_eq!(lock(&h.shared).readies, 1, "one event, several answers");
    assert_eq!(
        h.entries(BUFFERS, EntryState::Inflight),
        [(4, UNDER_WAY)],
        "the held buffer's entry carries the model's mark"
    );

    // A held buffer is not in flight: the detach is answered at once.
    let reply = h.request(&Message::new(kind::DETACH));
    assert_eq!(reply.kind(), kind::DETACHED, "{reply:?}");
    assert_eq!(reply.get(key::FRONTEND), Some("guest"));
    // Its entry stays for a successor to recover.
    assert_eq!(h.entries(BUFFERS, EntryState::Inflight), [(4, UNDER_WAY)]);
    h.stop();
}

#[test]
fn a_packet_is_answered_with_its_last_slot_first_slot_first_and_a_batch_when_drained() {
    let h = Harness::attached();
    h.post(PACKETS, &[MORE | 1, MORE | 2]);
    h.until("two slots are started", |s| s.started[PACKETS] == 2);
    let turns = lock(&h.shared).drained[PACKETS];
    h.until("two more turns", |s| s.drained[PACKETS] >= turns + 2);
    assert!(
        h.published(PACKETS).is_empty(),
        "a slot of an unfinished packet was answered"
    );

    // The last slot: every slot answered, in ring order.
    h.post(PACKETS, &[3]);
    h.until("the packet is answered", |s| {
        s.rings[PACKETS].published.len() == 3
    });
    assert_eq!(h.published(PACKETS), [MORE | 1, MORE | 2, 3]);

    // A batch is answered once the ring is drained, in the same turn's
    // publication as the packet after it.
    h.post(PACKETS, &[BATCH | 4, BATCH | 5, 6]);
    h.until("the batch is answered", |s| {
        s.rings[PACKETS].published.len() == 6
    });
    assert_eq!(
        h.published(PACKETS)[3..],
        [6, BATCH | 4, BATCH | 5],
        "the batch is answered when the ring is drained"
    );
    // Every answer was logged before it was published.
    assert!(h.entries(PACKETS, EntryState::Inflight).is_empty());
    h.stop();
}

#[test]
fn the_source_is_not_polled_while_the_model_holds_nothing() {
    let h = Harness::attached();
    h.post(BUFFERS, &[1]);
    h.until("the buffer is started", |s| s.started[BUFFERS] == 1);
    h.frames(1);
    h.until("the buffer is answered", |s| {
        s.rings[BUFFERS].published.len() == 1
    });
    // The source is not polled with no buffer held: a second event is not
    // read.
    h.frames(1);
    let turns = lock(&h.shared).drained[BUFFERS];
    h.post(PACKETS, &[9]);
    h.until("two more turns", |s| s.drained[BUFFERS] >= turns + 2);
    assert_eq!(
        lock(&h.shared).readies,
        1,
        "the source was polled with nothing held"
    );
    assert_eq!(h.published(BUFFERS), [1001]);
    h.stop();
}

#[test]
fn a_long_drain_publishes_as_it_goes_and_notifies_once_at_the_end() {
    let h = Harness::attached();
    // Two publications' worth, taken in one turn: published in the middle
    // of the drain (before the fifth take) and after it; the end of the
    // turn has nothing left to publish and still sends the notification
    // the guest asked for.
    let _ = h.notify[PACKETS].drain();
    h.post(PACKETS, &[10, 11, 12, 13, 14, 15, 16, 17]);
    h.until("the drain is published", |s| {
        s.rings[PACKETS].published.len() == 8
    });
    let turns = lock(&h.shared).drained[PACKETS];
    h.until("two more turns", |s| s.drained[PACKETS] >= turns + 2);
    assert_eq!(h.published(PACKETS), [10, 11, 12, 13, 14, 15, 16, 17]);
    assert_eq!(lock(&h.shared).rings[PACKETS].publications, 2);
    assert_eq!(
        h.notify[PACKETS].drain().unwrap(),
        1,
        "one notification for the drain, none lost"
    );
    h.stop();
}

#[test]
fn a_drain_notifies_at_once_when_at_most_half_the_ring_is_left() {
    let h = Harness::attached();
    lock(&h.shared).asks_once = true;
    let _ = h.notify[PACKETS].drain();
    // A whole ring in one turn, published every 4 answers. The first
    // publication finds the guest asking, with 12 requests left: owed.
    // The second leaves 8, half the ring: the notification goes at once,
    // not at the end of the turn, and only once.
    let requests: Vec<u32> = (20..20 + SIZE).collect();
    h.post(PACKETS, &requests);
    h.until("the drain is published", |s| {
        s.rings[PACKETS].published.len() == SIZE as usize
    });
    let turns = lock(&h.shared).drained[PACKETS];
    h.until("two more turns", |s| s.drained[PACKETS] >= turns + 2);
    assert_eq!(h.published(PACKETS), requests);
    assert_eq!(lock(&h.shared).rings[PACKETS].publications, 4);
    assert_eq!(lock(&h.shared).written_at, [8], "sent once, at once");
    assert_eq!(h.notify[PACKETS].drain().unwrap(), 1, "one notification");
    h.stop();
}

#[test]
fn each_source_is_polled_on_its_own() {
    let h = Harness::attached();
    h.post(BUFFERS, &[1, 2, 3]);
    h.until("the buffers are started", |s| s.started[BUFFERS] == 3);
    // A frame on the second source: answered by it, the first one not read.
    nix::unistd::write(&h.second, &1u64.to_ne_bytes()).unwrap();
    h.until("a buffer is answered", |s| {
        s.rings[BUFFERS].published.len() == 1
    });
    assert_eq!(h.published(BUFFERS), [2001]);
    assert_eq!(lock(&h.shared).readies, 0, "the first source was read");
    // Then one on the first: both stay polled while buffers are held.
    h.frames(1);
    h.until("a second buffer is answered", |s| {
        s.rings[BUFFERS].published.len() == 2
    });
    nix::unistd::write(&h.second, &1u64.to_ne_bytes()).unwrap();
    h.until("the third buffer is answered", |s| {
        s.rings[BUFFERS].published.len() == 3
    });
    assert_eq!(h.published(BUFFERS), [2001, 1002, 2003]);
    let s = lock(&h.shared);
    assert_eq!((s.readies, s.second_readies), (1, 2));
    drop(s);
    h.stop();
}

#[test]
fn a_ring_the_model_does_not_take_from_keeps_its_requests_and_is_not_work() {
    let h = Harness::attached();
    lock(&h.shared).gated = true;
    h.post(PACKETS, &[5, 6]);
    // Another ring's kick makes turns; the gated ring is not taken from.
    h.post(BUFFERS, &[1]);
    h.until("the buffer is started", |s| s.started[BUFFERS] == 1);
    let turns = lock(&h.shared).drained[BUFFERS];
    h.post(BUFFERS, &[2]);
    h.until("two more turns", |s| s.drained[BUFFERS] >= turns + 2);
    assert_eq!(
        lock(&h.shared).started[PACKETS],
        0,
        "a gated ring was taken from"
    );
    // Waiting requests on a gated ring are not work: the loop sleeps,
    // woken by its heartbeat only (every 20 ms; a loop that took them for
    // work would turn thousands of times).
    let turns = lock(&h.shared).drained[BUFFERS];
    std::thread::sleep(Duration::from_millis(200));
    let idle_turns = lock(&h.shared).drained[BUFFERS] - turns;
    assert!(
        idle_turns <= 40,
        "{idle_turns} turns in 200 ms with nothing to take"
    );
    // Served again: what waited is taken at the next turn.
    lock(&h.shared).gated = false;
    h.post(BUFFERS, &[3]);
    h.until("the packets are answered", |s| {
        s.rings[PACKETS].published.len() == 2
    });
    assert_eq!(h.published(PACKETS), [5, 6]);
    h.stop();
}

#[test]
fn a_request_beyond_a_ring_whose_every_slot_is_held_breaks_the_ring() {
    let h = Harness::attached();
    // As many held buffers as the ring has entries: the ring is full,
    // nothing is wrong yet.
    let full: Vec<u32> = (0..SIZE).collect();
    h.post(BUFFERS, &full);
    h.until("every buffer is started", |s| s.started[BUFFERS] == SIZE);
    let turns = lock(&h.shared).drained[BUFFERS];
    h.post(PACKETS, &[7]);
    h.until("two more turns", |s| s.drained[BUFFERS] >= turns + 2);
    // One more: more requests out than the ring has entries.
    h.post(BUFFERS, &[SIZE]);
    let (msg, _) = h
        .control
        .recv_timeout(Duration::from_secs(30))
        .unwrap()
        .expect("no disconnect from the loop");
    assert_eq!(msg.kind(), kind::DISCONNECT, "{msg:?}");
    assert!(
        msg.get(key::REASON)
            .is_some_and(|r| r.contains("more requests")),
        "{msg:?}"
    );
    assert_eq!(lock(&h.shared).started[BUFFERS], SIZE);
    h.stop();
}
