//! The host engine against a tiny scripted SPM, in simulated time.
//!
//! The mailbox is three in-memory records areas (the host's inbox area, its
//! outbox area and the doorbell). The engine's writes are applied to it as
//! a shell would apply them; the "SPM" is a few lines of test code that
//! read the inbox area with `InboxArea` and write replies into the outbox
//! area with the wire types. Time only moves when the test moves it.

use std::time::Duration;

use spmbox_core::host::{Host, HostConfig, HostEvent, HostRead, HostWrite, Phase, VolumeState};
use spmbox_core::time::Instant;
use spmbox_core::wire::{
    AREA_SIZE, DOORBELL_OFFSET, Doorbell, Epoch, Generation, Geometry, HostId, InboxArea,
    InboxHeader, Location, OutboxArea, OutboxHeader, RECORD_LEN, Reply, ReplyStatus, Request, Slot,
    SlotState, SpmHeader, SpmState, Uuid,
};

const DOMAIN: Uuid = Uuid([0x5d; 16]);
const HOST: u16 = 12;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const CHUNK: u64 = 256 * MIB;
const VIRTUAL: u64 = 20 * GIB;
const LIMIT: u64 = VIRTUAL + 16 * MIB;

fn vol(n: u8) -> Uuid {
    Uuid([n; 16])
}

fn geometry() -> Geometry {
    Geometry::new(16, 512).unwrap()
}

fn ms(n: u64) -> Instant {
    Instant(n * 1000)
}

fn secs(n: u64) -> Instant {
    Instant(n * 1_000_000)
}

/// The parts of the mailbox this host and its SPM touch.
#[derive(Clone)]
struct Mailbox {
    inbox: [u8; AREA_SIZE],
    outbox: [u8; AREA_SIZE],
    doorbell: [u8; RECORD_LEN],
}

impl Mailbox {
    fn new() -> Self {
        Mailbox {
            inbox: [0; AREA_SIZE],
            outbox: [0; AREA_SIZE],
            doorbell: [0; RECORD_LEN],
        }
    }

    /// Applies a write as the shell does: the record lands at its offset,
    /// which must be in the host's own inbox area or the doorbell.
    fn apply(&mut self, w: &HostWrite) {
        if w.offset == DOORBELL_OFFSET {
            self.doorbell = w.record;
            return;
        }
        let area = geometry().inbox_area(HostId::new(HOST)).unwrap();
        assert!(
            (area..area + AREA_SIZE as u64).contains(&w.offset),
            "host wrote outside its inbox area: {}",
            w.offset
        );
        let o = (w.offset - area) as usize;
        assert_eq!(o % RECORD_LEN, 0);
        self.inbox[o..o + RECORD_LEN].copy_from_slice(&w.record);
    }

    fn inbox(&self) -> InboxArea<'_> {
        InboxArea::new(&self.inbox, DOMAIN, HostId::new(HOST)).unwrap()
    }

    fn request(&self, slot: u16) -> Option<Request> {
        match self.inbox().slot(Slot::new(slot))? {
            SlotState::Valid(r) => Some(r),
            _ => None,
        }
    }

    fn requests(&self) -> Vec<Request> {
        self.inbox()
            .slots()
            .filter_map(|(_, s)| match s {
                SlotState::Valid(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    fn put_outbox(&mut self, index: u16, record: &[u8; RECORD_LEN]) {
        let o = usize::from(index) * RECORD_LEN;
        self.outbox[o..o + RECORD_LEN].copy_from_slice(record);
    }

    fn doorbell(&self) -> Option<Doorbell> {
        let here = Location {
            domain: DOMAIN,
            host_id: HostId::NONE,
            index: 0,
        };
        Doorbell::parse(&self.doorbell, &here).unwrap()
    }
}

/// A scripted SPM: it answers what the test tells it to, with its epoch,
/// following docs/format.md section 8 (outbox header of the request's
/// generation before the first reply; replies echo the request).
struct ScriptedSpm {
    epoch: u64,
}

impl ScriptedSpm {
    fn header(&self) -> SpmHeader {
        SpmHeader {
            domain: DOMAIN,
            epoch: Epoch::new(self.epoch),
            spm_id: HostId::NONE,
            state: SpmState::Active,
            heartbeat_interval_ms: 1000,
            heartbeat: 1,
            owner: 7,
            pool_commit: 0,
            release_commit: 0,
        }
    }

    /// The reply to `r` with `status` and `size`.
    fn reply(&self, r: &Request, status: ReplyStatus, size: u64) -> Reply {
        Reply::answering(r, status, size, Epoch::new(self.epoch))
    }

    /// Writes `reply` (and first the outbox header for its generation, if
    /// the area's header names another generation or epoch).
    fn write(&self, mb: &mut Mailbox, reply: &Reply) {
        let current = OutboxArea::new(&mb.outbox, DOMAIN, HostId::new(HOST))
            .unwrap()
            .header()
            .ok()
            .flatten();
        if current.map(|h| (h.epoch, h.generation))
            != Some((Epoch::new(self.epoch), reply.generation))
        {
            let header = OutboxHeader {
                domain: DOMAIN,
                host_id: HostId::new(HOST),
                epoch: Epoch::new(self.epoch),
                generation: reply.generation,
            };
            mb.put_outbox(0, &header.to_bytes().unwrap());
        }
        mb.put_outbox(reply.slot.get(), &reply.to_bytes().unwrap());
    }

    /// Answers every valid request of the inbox that has no final reply
    /// yet with what `decide` says (`None`: leave it).
    fn serve(&self, mb: &mut Mailbox, decide: impl Fn(&Request) -> Option<(ReplyStatus, u64)>) {
        for r in mb.requests() {
            let done = matches!(
                OutboxArea::new(&mb.outbox, DOMAIN, HostId::new(HOST)).unwrap().slot(r.slot),
                Some(SlotState::Valid(p) | SlotState::Stale(p)) if p.answers(&r) && p.status.is_final()
            );
            if done {
                continue;
            }
            if let Some((status, size)) = decide(&r) {
                let reply = self.reply(&r, status, size);
                self.write(mb, &reply);
            }
        }
    }

    /// Extends every pending request to its target.
    fn extend_all(&self, mb: &mut Mailbox) {
        self.serve(mb, |r| Some((ReplyStatus::Extended, r.target_size)));
    }
}

/// The engine, the mailbox and a log of what happened when.
struct Sim {
    host: Host<8>,
    mb: Mailbox,
    now: Instant,
    writes: Vec<(Instant, HostWrite)>,
    reads: Vec<Instant>,
    /// Reads of the SPM header asked for.
    spm_header_reads: u32,
    events: Vec<(Instant, HostEvent)>,
    /// Answer `Refresh` events at once with the size they name.
    auto_refresh: bool,
}

impl Sim {
    fn new(volumes: &[(Uuid, u64, u64)]) -> Self {
        Self::on(Mailbox::new(), volumes)
    }

    /// A host (re)started on an existing mailbox, at time 0.
    fn on(mb: Mailbox, volumes: &[(Uuid, u64, u64)]) -> Self {
        // These stories count reads at the steady poll interval; the fast
        // first reads after a send are the engine's unit tests' subject.
        let config = HostConfig {
            chunk_size: CHUNK,
            lease_interval: Duration::ZERO,
            fast_poll_interval: HostConfig::default().poll_interval,
            ..HostConfig::default()
        };
        let mut host = Host::new(DOMAIN, HostId::new(HOST), geometry(), config).unwrap();
        for &(id, physical, allocation) in volumes {
            host.add_volume(id, VIRTUAL, LIMIT, physical, allocation)
                .unwrap();
        }
        host.start(Instant::ZERO, &mb.inbox, &mb.outbox, 0).unwrap();
        let mut sim = Sim {
            host,
            mb,
            now: Instant::ZERO,
            writes: Vec::new(),
            reads: Vec::new(),
            spm_header_reads: 0,
            events: Vec::new(),
            auto_refresh: true,
        };
        sim.pump();
        sim
    }

    /// Does everything the engine asks for at `now`.
    fn pump(&mut self) {
        loop {
            let mut busy = false;
            while let Some(w) = self.host.poll_write() {
                busy = true;
                self.mb.apply(&w);
                self.writes.push((self.now, w));
            }
            while let Some(read) = self.host.poll_read(self.now) {
                busy = true;
                match read {
                    HostRead::OutboxArea { offset } => {
                        assert_eq!(offset, geometry().outbox_area(HostId::new(HOST)).unwrap());
                        self.reads.push(self.now);
                        let outbox = self.mb.outbox;
                        self.host.handle_outbox(self.now, &outbox);
                    }
                    HostRead::InboxHeader { offset } => {
                        assert_eq!(offset, geometry().inbox_area(HostId::new(HOST)).unwrap());
                        let inbox = self.mb.inbox;
                        self.host
                            .handle_inbox_header(self.now, &inbox[..RECORD_LEN]);
                    }
                    // This rig keeps no SPM header: the tests hand the
                    // engine the epochs they need.
                    HostRead::SpmHeader => self.spm_header_reads += 1,
                }
            }
            while let Some(e) = self.host.poll_event() {
                busy = true;
                self.events.push((self.now, e));
                if let (true, HostEvent::Refresh { volume, size }) = (self.auto_refresh, e) {
                    self.host.handle_refreshed(self.now, volume, size);
                }
            }
            if !busy {
                return;
            }
        }
    }

    /// Moves time to `until`, waking the engine whenever it asked to be.
    fn run_until(&mut self, until: Instant) {
        while let Some(t) = self.host.poll_timeout() {
            if t > until {
                break;
            }
            self.now = self.now.max(t);
            self.host.handle_timeout(self.now);
            self.pump();
        }
        self.now = self.now.max(until);
    }

    fn allocate(&mut self, volume: Uuid, allocation: u64) {
        self.host.handle_allocation(self.now, volume, allocation);
        self.pump();
    }

    fn volume(&self, id: Uuid) -> VolumeState {
        self.host.volume(id).unwrap()
    }

    fn events(&self) -> Vec<HostEvent> {
        self.events.iter().map(|&(_, e)| e).collect()
    }

    fn events_since(&self, t: Instant) -> Vec<HostEvent> {
        self.events
            .iter()
            .filter(|(at, _)| *at >= t)
            .map(|&(_, e)| e)
            .collect()
    }

    fn reads_between(&self, from: Instant, to: Instant) -> usize {
        self.reads.iter().filter(|&&t| t >= from && t < to).count()
    }
}

#[test]
fn watermark_request_reply_refresh_extended() {
    let spm = ScriptedSpm {
        epoch: (Epoch::new(1)).get(),
    };
    let mut sim = Sim::new(&[(vol(1), GIB, 0)]);
    sim.host
        .handle_spm_header(ms(0), &spm.header().to_bytes().unwrap());
    sim.run_until(ms(10));
    sim.allocate(vol(1), GIB - 100 * MIB); // 100 MiB left < 128 MiB
    let r = sim.mb.request(1).expect("a request in slot 1");
    assert_eq!(
        (r.generation, r.sequence, r.target_size, r.current_size),
        (Generation::new(1), 1, GIB + CHUNK, GIB)
    );
    assert_eq!(sim.mb.doorbell().unwrap().sequence, 1);
    // The SPM answers 5 ms later; the host sees it at its next poll.
    sim.run_until(ms(15));
    spm.extend_all(&mut sim.mb);
    sim.run_until(ms(100));
    assert_eq!(
        sim.events(),
        [
            HostEvent::Refresh {
                volume: vol(1),
                size: GIB + CHUNK
            },
            HostEvent::Extended {
                volume: vol(1),
                size: GIB + CHUNK,
                latency: Duration::from_millis(6)
            }
        ]
    );
    assert_eq!(sim.reads, [ms(12), ms(14), ms(16)]);
    assert_eq!(sim.volume(vol(1)).physical, GIB + CHUNK);
    assert!(sim.mb.requests().is_empty(), "the slot is written empty");
    assert_eq!(sim.host.in_flight(), 0);
    // Idle: only the SPM header, every second.
    assert!(sim.host.poll_timeout().is_some_and(|t| t > ms(16)));
}

#[test]
fn replies_that_do_not_answer_the_exact_request_are_ignored() {
    let spm = ScriptedSpm {
        epoch: (Epoch::new(1)).get(),
    };
    let mut sim = Sim::new(&[(vol(1), GIB, GIB - MIB)]);
    let r = sim.mb.request(1).unwrap();
    let good = spm.reply(&r, ReplyStatus::Extended, 2 * GIB);
    let wrong: [(&str, Reply); 4] = [
        (
            "sequence",
            Reply {
                sequence: r.sequence + 1,
                ..good
            },
        ),
        (
            "volume",
            Reply {
                volume: vol(2),
                ..good
            },
        ),
        (
            "target",
            Reply {
                target_size: r.target_size + 512,
                ..good
            },
        ),
        (
            "generation",
            Reply {
                generation: Generation::new(r.generation.get() + 1),
                ..good
            },
        ),
    ];
    let mut ignored = 0;
    for (what, reply) in wrong {
        spm.write(&mut sim.mb, &reply);
        let t = sim.now + Duration::from_millis(10);
        sim.run_until(t);
        assert!(sim.events().is_empty(), "a reply with the wrong {what}");
        assert!(sim.host.stats().replies_ignored > ignored, "{what}");
        ignored = sim.host.stats().replies_ignored;
    }
    assert_eq!(sim.host.stats().replies_accepted, 0);
    spm.write(&mut sim.mb, &good);
    let t = sim.now + Duration::from_millis(10);
    sim.run_until(t);
    assert_eq!(sim.host.stats().replies_accepted, 1);
    assert!(matches!(sim.events()[0], HostEvent::Refresh { .. }));
}

#[test]
fn a_reply_from_an_older_epoch_than_one_seen_is_ignored() {
    let old = ScriptedSpm {
        epoch: (Epoch::new(4)).get(),
    };
    let new = ScriptedSpm {
        epoch: (Epoch::new(5)).get(),
    };
    let mut sim = Sim::new(&[(vol(1), GIB, GIB - MIB), (vol(2), GIB, 0)]);
    // An accepted reply from epoch 5 teaches the host epoch 5 ...
    new.extend_all(&mut sim.mb);
    sim.run_until(ms(10));
    assert_eq!(sim.host.newest_epoch(), Epoch::new(5));
    // ... so a reply from epoch 4 for the next request is ignored.
    sim.allocate(vol(2), GIB - MIB);
    let t = sim.now;
    old.extend_all(&mut sim.mb);
    sim.run_until(t + Duration::from_millis(500));
    assert!(sim.events_since(t).is_empty());
    assert!(sim.host.stats().replies_ignored > 0);
    assert_eq!(sim.volume(vol(2)).physical, GIB);
    // The deposed SPM's final reply would make any SPM consider the
    // request done, so at its resend deadline the host asks again with a
    // new sequence, which the current SPM answers.
    sim.run_until(t + Duration::from_millis(2000));
    let again = sim.mb.request(2).or_else(|| sim.mb.request(1)).unwrap();
    assert_eq!((again.volume, again.sequence), (vol(2), 3));
    new.extend_all(&mut sim.mb);
    sim.run_until(t + Duration::from_millis(2010));
    assert_eq!(sim.volume(vol(2)).physical, GIB + CHUNK);
}

#[test]
fn a_reply_older_than_the_spm_header_epoch_is_ignored() {
    let old = ScriptedSpm {
        epoch: (Epoch::new(2)).get(),
    };
    let new = ScriptedSpm {
        epoch: (Epoch::new(3)).get(),
    };
    let mut sim = Sim::new(&[(vol(1), GIB, GIB - MIB)]);
    sim.host
        .handle_spm_header(ms(0), &new.header().to_bytes().unwrap());
    old.extend_all(&mut sim.mb);
    sim.run_until(ms(100));
    assert!(sim.events().is_empty());
    assert_eq!(sim.host.stats().replies_accepted, 0);
}

#[test]
fn a_parked_request_is_resent_only_every_remind_interval() {
    let spm = ScriptedSpm {
        epoch: (Epoch::new(1)).get(),
    };
    let mut sim = Sim::new(&[(vol(1), GIB, 0)]);
    sim.run_until(ms(10));
    sim.allocate(vol(1), GIB);
    spm.serve(&mut sim.mb, |_| Some((ReplyStatus::WaitingForSpace, GIB)));
    sim.run_until(secs(9));
    assert_eq!(sim.host.stats().resends, 0);
    sim.run_until(secs(11));
    assert_eq!(sim.host.stats().resends, 1, "one reminder after 10 s");
    // No backoff: the interval stays 10 s, below the SPM's full scan.
    sim.run_until(secs(20));
    assert_eq!(sim.host.stats().resends, 1);
    sim.run_until(secs(21));
    assert_eq!(sim.host.stats().resends, 2);
    sim.run_until(secs(61));
    assert_eq!(sim.host.stats().resends, 6);
}

#[test]
fn waiting_for_space_then_extended_resumes_the_paused_guest() {
    let spm = ScriptedSpm {
        epoch: (Epoch::new(1)).get(),
    };
    let mut sim = Sim::new(&[(vol(1), GIB, 0)]);
    sim.run_until(ms(10));
    sim.allocate(vol(1), GIB); // out of space: paused
    assert!(sim.volume(vol(1)).paused);
    assert!(sim.mb.request(1).unwrap().paused);
    spm.serve(&mut sim.mb, |_| Some((ReplyStatus::WaitingForSpace, GIB)));
    sim.run_until(secs(10));
    assert_eq!(
        sim.events(),
        [
            HostEvent::Paused { volume: vol(1) },
            HostEvent::WaitingForSpace { volume: vol(1) }
        ]
    );
    // Parked: no resends, but the host kept polling all along.
    assert_eq!(sim.host.stats().resends, 0);
    assert_eq!(sim.writes.iter().filter(|(t, _)| *t > ms(10)).count(), 0);
    assert!(sim.reads_between(secs(9), secs(10)) >= 499);
    assert_eq!(
        sim.volume(vol(1)).request.map(|f| f.phase),
        Some(Phase::WaitingForSpace)
    );
    // A LUN joins the VG: the SPM completes the parked request.
    spm.extend_all(&mut sim.mb);
    let t = sim.now;
    sim.run_until(secs(11));
    assert_eq!(
        sim.events_since(t),
        [
            HostEvent::Refresh {
                volume: vol(1),
                size: GIB + CHUNK
            },
            HostEvent::Extended {
                volume: vol(1),
                size: GIB + CHUNK,
                // Sent at 10 ms, answered at 10 s, read at the next poll.
                latency: Duration::from_millis(10_002 - 10)
            },
            HostEvent::Resumed { volume: vol(1) },
        ]
    );
    assert!(!sim.volume(vol(1)).paused);
    // Still 128 MiB short of the watermark? 256 MiB free now: no more asks.
    assert_eq!(sim.host.in_flight(), 0);
}

#[test]
fn restart_recovers_in_flight_requests_with_a_higher_generation() {
    let spm = ScriptedSpm {
        epoch: (Epoch::new(1)).get(),
    };
    let mut first = Sim::new(&[(vol(1), GIB, 0), (vol(2), GIB, 0), (vol(3), GIB, 0)]);
    first.allocate(vol(1), GIB - MIB);
    first.allocate(vol(2), GIB - MIB);
    first.allocate(vol(3), GIB - MIB);
    // The SPM answers volume 1 only; the host dies before reading it.
    spm.serve(&mut first.mb, |r| {
        (r.volume == vol(1)).then_some((ReplyStatus::Extended, r.target_size))
    });
    let old: Vec<Request> = first.mb.requests();
    assert_eq!(old.len(), 3);
    // It comes back knowing volume 1 (refreshed at startup) and volume 2;
    // volume 3's VM is gone.
    let mut second = Sim::on(
        first.mb.clone(),
        &[(vol(1), GIB + CHUNK, GIB - MIB), (vol(2), GIB, GIB - MIB)],
    );
    assert_eq!(second.host.generation(), Generation::new(2));
    let header = InboxHeader {
        domain: DOMAIN,
        host_id: HostId::new(HOST),
        generation: Generation::new(2),
        owner: 0,
        heartbeat: 0,
        heartbeat_interval_ms: 0,
        release_ack: 0,
    };
    assert_eq!(second.writes[0].1.record, header.to_bytes().unwrap());
    assert_eq!(
        second.writes[0].1.offset,
        geometry().inbox_area(HostId::new(HOST)).unwrap()
    );
    let now: Vec<Request> = second.mb.requests();
    assert_eq!(now.len(), 1, "only volume 2's request is still needed");
    let r = now[0];
    let was = old.iter().find(|o| o.volume == vol(2)).unwrap();
    assert_eq!(
        (r.slot, r.generation, r.sequence, r.target_size),
        (was.slot, Generation::new(2), 1, was.target_size)
    );
    assert_eq!(second.mb.doorbell().unwrap().generation, Generation::new(2));
    // The other old slots were written empty, and nothing is stale.
    assert!(
        second
            .mb
            .inbox()
            .slots()
            .all(|(_, s)| matches!(s, SlotState::Empty | SlotState::Valid(_)))
    );
    // The SPM serves the new generation; the host accepts it.
    spm.extend_all(&mut second.mb);
    second.run_until(ms(10));
    assert_eq!(second.volume(vol(2)).physical, GIB + CHUNK);
}

#[test]
fn resend_with_backoff_while_the_spm_is_silent() {
    let spm = ScriptedSpm {
        epoch: (Epoch::new(1)).get(),
    };
    let mut sim = Sim::new(&[(vol(1), GIB, GIB - MIB)]);
    let request = sim.writes.iter().find(|(_, w)| w.record[8] == 5).unwrap().1;
    sim.run_until(secs(100));
    let resent: Vec<Instant> = sim
        .events
        .iter()
        .filter(|(_, e)| matches!(e, HostEvent::Resent { .. }))
        .map(|&(t, _)| t)
        .collect();
    assert_eq!(
        resent,
        [secs(2), secs(6), secs(14), secs(30), secs(60), secs(90)]
    );
    // Each resend is the same record, followed by the doorbell.
    for t in &resent {
        let at: Vec<&HostWrite> = sim
            .writes
            .iter()
            .filter(|(w, _)| w == t)
            .map(|(_, w)| w)
            .collect();
        assert_eq!(at.len(), 2);
        assert_eq!(*at[0], request);
        assert_eq!(at[1].offset, DOORBELL_OFFSET);
    }
    // Polling went on at the poll interval all along.
    assert_eq!(sim.reads_between(secs(1), secs(2)), 500);
    // The SPM wakes up and answers the same sequence.
    spm.extend_all(&mut sim.mb);
    sim.run_until(secs(101));
    assert_eq!(sim.volume(vol(1)).physical, GIB + CHUNK);
    assert_eq!(sim.host.stats().requests_sent, 1);
}

#[test]
fn no_outbox_reads_while_idle() {
    let spm = ScriptedSpm {
        epoch: (Epoch::new(1)).get(),
    };
    let mut sim = Sim::new(&[(vol(1), GIB, 0)]);
    sim.run_until(secs(60));
    assert!(sim.reads.is_empty());
    // Idle: only the SPM header, every second, at this host's phase (host
    // 12 of 16: 11/16 of a second in).
    assert_eq!(
        sim.host.poll_timeout(),
        Some(secs(60) + Duration::from_micros(687_500))
    );
    sim.allocate(vol(1), GIB - MIB);
    sim.run_until(secs(60) + Duration::from_millis(5));
    spm.extend_all(&mut sim.mb);
    sim.run_until(secs(120));
    assert_eq!(sim.reads.len(), 3, "reads at +2, +4 and +6 ms only");
    assert_eq!(sim.host.poll_timeout(), Some(secs(121)));
}

#[test]
fn torn_header_on_start_takes_the_generation_from_the_highest_seen() {
    let spm = ScriptedSpm {
        epoch: (Epoch::new(1)).get(),
    };
    // A host at generation 6 wrote a request, then restarted and its
    // header write for generation 7 was torn.
    let mut mb = Mailbox::new();
    let g6 = InboxHeader {
        domain: DOMAIN,
        host_id: HostId::new(HOST),
        generation: Generation::new(6),
        owner: 0,
        heartbeat: 0,
        heartbeat_interval_ms: 0,
        release_ack: 0,
    }
    .to_bytes()
    .unwrap();
    let g7 = InboxHeader {
        domain: DOMAIN,
        host_id: HostId::new(HOST),
        generation: Generation::new(7),
        owner: 0,
        heartbeat: 0,
        heartbeat_interval_ms: 0,
        release_ack: 0,
    }
    .to_bytes()
    .unwrap();
    // The new CRC landed, the new generation did not.
    let mut torn = g7;
    torn[32..40].copy_from_slice(&g6[32..40]);
    mb.inbox[..RECORD_LEN].copy_from_slice(&torn);
    let stale = Request {
        domain: DOMAIN,
        host_id: HostId::new(HOST),
        slot: Slot::new(4),
        generation: Generation::new(6),
        sequence: 9,
        volume: vol(1),
        target_size: GIB + CHUNK,
        current_size: GIB,
        paused: false,
    };
    mb.inbox[4 * RECORD_LEN..5 * RECORD_LEN].copy_from_slice(&stale.to_bytes().unwrap());
    assert!(mb.inbox().header().is_err(), "the header is defective");
    assert!(matches!(
        mb.inbox().slot(Slot::new(4)),
        Some(SlotState::Stale(_))
    ));

    let mut sim = Sim::on(mb, &[(vol(1), GIB, GIB / 2)]);
    assert_eq!(sim.host.generation(), Generation::new(7));
    assert_eq!(
        sim.writes[0].1.offset,
        geometry().inbox_area(HostId::new(HOST)).unwrap()
    );
    assert_eq!(
        sim.mb.inbox().header().unwrap().unwrap().generation,
        Generation::new(7)
    );
    let r = sim.mb.request(4).expect("the stale request, rewritten");
    assert_eq!(
        (r.generation, r.sequence, r.target_size),
        (Generation::new(7), 1, GIB + CHUNK)
    );
    spm.extend_all(&mut sim.mb);
    sim.run_until(ms(10));
    assert_eq!(sim.volume(vol(1)).physical, GIB + CHUNK);
}

/// Not a script: the project's own SPM engine on a whole in-memory
/// mailbox, with a backend that extends at once. Shows the two engines
/// agree on the protocol end to end.
#[test]
fn interoperates_with_the_spm_engine() {
    use spmbox_core::spm::{JobResult, Spm, SpmConfig, SpmIo};
    use spmbox_core::wire::SPM_HEADER_OFFSET;

    let g = geometry();
    let mut disk = vec![0u8; g.mailbox_size() as usize];
    let record = |disk: &[u8], at: u64| disk[at as usize..at as usize + RECORD_LEN].to_vec();
    let put = |disk: &mut Vec<u8>, at: u64, r: &[u8; RECORD_LEN]| {
        disk[at as usize..at as usize + RECORD_LEN].copy_from_slice(r)
    };
    let mut spm: Spm<64> = Spm::new(
        Instant::ZERO,
        DOMAIN,
        g,
        HostId::NONE,
        1,
        None,
        SpmConfig::default(),
    )
    .unwrap();
    let mut host: Host<8> = Host::new(DOMAIN, HostId::new(HOST), g, HostConfig::default()).unwrap();
    host.add_volume(vol(1), VIRTUAL, LIMIT, GIB, 0).unwrap();
    let inbox_at = g.inbox_area(HostId::new(HOST)).unwrap() as usize;
    let outbox_at = g.outbox_area(HostId::new(HOST)).unwrap() as usize;
    let area = |disk: &[u8], at: usize| disk[at..at + AREA_SIZE].to_vec();
    host.start(
        Instant::ZERO,
        &area(&disk, inbox_at),
        &area(&disk, outbox_at),
        1,
    )
    .unwrap();

    let mut physical = GIB;
    let mut extended = Vec::new();
    let mut now = Instant::ZERO;
    // The SPM acts once it has read its own header back.
    let settled = Instant::ZERO + spmbox_core::spm::settle(&SpmConfig::default());
    let end = settled + Duration::from_secs(2);
    let mut written = false;
    while now < end {
        // The guest writes 1 MiB per millisecond once the SPM acts.
        let allocation = (now.saturating_since(settled).as_micros() as u64 / 1000) * MIB;
        host.handle_allocation(now, vol(1), allocation);
        loop {
            let mut busy = false;
            while let Some(w) = host.poll_write() {
                busy = true;
                put(&mut disk, w.offset, &w.record);
            }
            while let Some(read) = host.poll_read(now) {
                busy = true;
                match read {
                    HostRead::OutboxArea { offset } => {
                        host.handle_outbox(now, &area(&disk, offset as usize))
                    }
                    HostRead::InboxHeader { offset } => {
                        host.handle_inbox_header(now, &record(&disk, offset))
                    }
                    HostRead::SpmHeader => {
                        let bytes = record(&disk, spmbox_core::wire::SPM_HEADER_OFFSET);
                        host.handle_spm_header(now, &bytes);
                    }
                }
            }
            while let Some(e) = host.poll_event() {
                busy = true;
                match e {
                    HostEvent::Refresh { volume, size } => host.handle_refreshed(now, volume, size),
                    HostEvent::Extended { size, latency, .. } => extended.push((size, latency)),
                    HostEvent::Paused { .. } => panic!("the guest paused at {now:?}"),
                    _ => {}
                }
            }
            // The backend is memory: a commit is durable at once. The
            // first call closes the batch; the engine then asks for the
            // fencing read below, and the next call hands the commit out.
            if spm.poll_commit().is_some() {
                busy = true;
                spm.handle_committed(now, 0);
            }
            while let Some(io) = spm.poll_io(now) {
                busy = true;
                match io {
                    SpmIo::ReadDoorbell => {
                        spm.handle_doorbell(now, &record(&disk, DOORBELL_OFFSET))
                    }
                    SpmIo::ReadSpmHeader => {
                        let h = record(&disk, SPM_HEADER_OFFSET);
                        host.handle_spm_header(now, &h);
                        spm.handle_spm_header(now, &h)
                    }
                    SpmIo::ReadHosts { first_host, count } => {
                        let from = (usize::from(first_host.get()) - 1) * AREA_SIZE;
                        let len = count as usize * AREA_SIZE;
                        let inbox = disk[g.inbox_offset() as usize + from..][..len].to_vec();
                        let outbox = disk[g.outbox_offset() as usize + from..][..len].to_vec();
                        spm.handle_hosts(now, first_host, &inbox, &outbox);
                    }
                }
            }
            while let Some(job) = spm.poll_job() {
                busy = true;
                physical = physical.max(job.target_size);
                spm.handle_job_result(now, job.volume, JobResult::Extended { size: physical });
            }
            while let Some(w) = spm.poll_write() {
                busy = true;
                written = true;
                put(&mut disk, w.offset, &w.record);
            }
            if !busy {
                break;
            }
        }
        now = now + Duration::from_millis(1);
    }
    assert!(written);
    // 2 GiB written in 2 s from a 1 GiB volume: several 256 MiB chunks,
    // each in a few milliseconds (doorbell every 5 ms, poll every 2 ms).
    assert!(extended.len() >= 4, "{extended:?}");
    assert!(
        extended
            .iter()
            .all(|(_, l)| *l <= Duration::from_millis(10)),
        "{extended:?}"
    );
    assert_eq!(host.volume(vol(1)).unwrap().physical, physical);
    assert_eq!(host.stats().replies_ignored, 0);
}
