//! One behaviour per test, against an in-memory copy of the host's areas.

use std::vec::Vec;

use super::*;
use crate::wire::{AREA_SIZE, Location, OutboxHeader, SpmState};

const DOMAIN: Uuid = Uuid([0xd0; 16]);
const HOST: u16 = 3;
/// The lease owner number of the host under test.
const OWNER: u64 = 0x0123_4567_89ab_cdef;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Virtual size of every test volume; the limit adds 8 MiB of overhead.
const VIRTUAL: u64 = 10 * GIB;
const LIMIT: u64 = VIRTUAL + 8 * MIB;
/// The default watermark: half a 256 MiB chunk.
const WATERMARK: u64 = 128 * MIB;

fn vol(n: u8) -> Uuid {
    Uuid([n; 16])
}

fn geometry() -> Geometry {
    Geometry::new(8, 512).unwrap()
}

fn at(n: u64) -> Instant {
    Instant(n * 1000) // milliseconds
}

/// The host's areas and the doorbell, and everything the engine said.
struct Rig<const V: usize> {
    host: Host<V>,
    inbox: [u8; AREA_SIZE],
    outbox: [u8; AREA_SIZE],
    doorbell: [u8; RECORD_LEN],
    writes: Vec<HostWrite>,
    events: Vec<HostEvent>,
}

impl<const V: usize> Rig<V> {
    fn new() -> Self {
        Self::with_config(HostConfig::default())
    }

    /// A rig with `config`, the builtin lease off (the lease has tests of
    /// its own, with [`Rig::leased`]).
    fn with_config(config: HostConfig) -> Self {
        Self::exact(HostConfig {
            lease_interval: Duration::ZERO,
            ..config
        })
    }

    /// A rig with the builtin lease on (every second).
    fn leased() -> Self {
        Self::exact(HostConfig::default())
    }

    fn exact(config: HostConfig) -> Self {
        Rig {
            host: Host::new(DOMAIN, HostId::new(HOST), geometry(), config).unwrap(),
            inbox: [0; AREA_SIZE],
            outbox: [0; AREA_SIZE],
            doorbell: [0; RECORD_LEN],
            writes: Vec::new(),
            events: Vec::new(),
        }
    }

    /// [`Rig::one`] with the SPM header read only every hour, for tests of
    /// other deadlines.
    fn one_quiet(allocation: u64) -> Self {
        Self::one_with(
            HostConfig {
                spm_header_interval: Duration::from_secs(3600),
                ..HostConfig::default()
            },
            allocation,
        )
    }

    /// One volume of 1 GiB with `allocation` written, started at time 0.
    fn one(allocation: u64) -> Self {
        Self::one_with(HostConfig::default(), allocation)
    }

    fn one_with(config: HostConfig, allocation: u64) -> Self {
        let mut rig = Self::with_config(config);
        rig.host
            .add_volume(vol(1), VIRTUAL, LIMIT, GIB, allocation)
            .unwrap();
        rig.start(at(0));
        rig
    }

    fn start(&mut self, now: Instant) {
        let (inbox, outbox) = (self.inbox, self.outbox);
        let owner = if self.host.config.lease_interval.is_zero() {
            0
        } else {
            OWNER
        };
        self.host.start(now, &inbox, &outbox, owner).unwrap();
        self.flush();
    }

    /// Applies every write and collects every event; returns the writes.
    fn flush(&mut self) -> Vec<HostWrite> {
        let inbox_at = geometry().inbox_area(HostId::new(HOST)).unwrap();
        let mut done = Vec::new();
        while let Some(w) = self.host.poll_write() {
            if w.offset == DOORBELL_OFFSET {
                self.doorbell = w.record;
            } else {
                let o = usize::try_from(w.offset - inbox_at).unwrap();
                assert!(
                    o < AREA_SIZE && o % RECORD_LEN == 0,
                    "write at {}",
                    w.offset
                );
                self.inbox[o..o + RECORD_LEN].copy_from_slice(&w.record);
            }
            done.push(w);
        }
        while let Some(e) = self.host.poll_event() {
            self.events.push(e);
        }
        self.writes.extend_from_slice(&done);
        done
    }

    fn take_events(&mut self) -> Vec<HostEvent> {
        self.flush();
        core::mem::take(&mut self.events)
    }

    fn request(&self, slot: u16) -> Option<Request> {
        match InboxArea::new(&self.inbox, DOMAIN, HostId::new(HOST))
            .unwrap()
            .slot(Slot::new(slot))
        {
            Some(SlotState::Valid(r)) => Some(r),
            _ => None,
        }
    }

    fn hold(&self, slot: u16) -> Option<Hold> {
        match HoldArea::new(&self.inbox, DOMAIN, HostId::new(HOST))
            .unwrap()
            .slot(Slot::new(slot))
        {
            Some(SlotState::Valid(h)) => Some(h),
            _ => None,
        }
    }

    fn slot_empty(&self, slot: u16) -> bool {
        let o = usize::from(slot) * RECORD_LEN;
        self.inbox[o..o + RECORD_LEN] == [0; RECORD_LEN]
    }

    fn put_outbox(&mut self, index: u16, record: [u8; RECORD_LEN]) {
        let o = usize::from(index) * RECORD_LEN;
        self.outbox[o..o + RECORD_LEN].copy_from_slice(&record);
    }

    fn outbox_header(&mut self, epoch: u64, generation: u64) {
        let header = OutboxHeader {
            domain: DOMAIN,
            host_id: HostId::new(HOST),
            epoch: Epoch::new(epoch),
            generation: Generation::new(generation),
        };
        self.put_outbox(0, header.to_bytes().unwrap());
    }

    /// The reply an SPM of `epoch` writes for the request in `slot`, after
    /// the outbox header for the host's generation.
    fn answer(&mut self, slot: u16, epoch: u64, status: ReplyStatus, size: u64) -> Reply {
        let r = self.request(slot).expect("a request to answer");
        let reply = Reply::answering(&r, status, size, Epoch::new(epoch));
        self.outbox_header(epoch, r.generation.get());
        self.put_outbox(slot, reply.to_bytes().unwrap());
        reply
    }

    fn deliver(&mut self, now: Instant) {
        let outbox = self.outbox;
        self.host.handle_outbox(now, &outbox);
        self.flush();
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

fn inbox_slot_offset(slot: u16) -> u64 {
    geometry().inbox_area(HostId::new(HOST)).unwrap() + u64::from(slot) * RECORD_LEN as u64
}

fn request_record(slot: u16, generation: u64, sequence: u64, volume: Uuid, target: u64) -> Request {
    Request {
        domain: DOMAIN,
        host_id: HostId::new(HOST),
        slot: Slot::new(slot),
        generation: Generation::new(generation),
        sequence,
        volume,
        target_size: target,
        current_size: GIB,
        paused: false,
    }
}

fn put(area: &mut [u8; AREA_SIZE], index: u16, record: [u8; RECORD_LEN]) {
    let o = usize::from(index) * RECORD_LEN;
    area[o..o + RECORD_LEN].copy_from_slice(&record);
}

fn inbox_header(generation: u64) -> [u8; RECORD_LEN] {
    InboxHeader {
        domain: DOMAIN,
        host_id: HostId::new(HOST),
        generation: Generation::new(generation),
        owner: 0,
        heartbeat: 0,
        heartbeat_interval_ms: 0,
        release_ack: 0,
    }
    .to_bytes()
    .unwrap()
}

// ------------------------------------------------------------ construction

#[test]
fn new_refuses_a_nil_domain_and_host_ids_outside_the_geometry() {
    let c = HostConfig::default();
    let g = geometry();
    assert_eq!(
        Host::<4>::new(Uuid::NIL, HostId::new(1), g, c).err(),
        Some(HostError::NilDomain)
    );
    assert_eq!(
        Host::<4>::new(DOMAIN, HostId::NONE, g, c).err(),
        Some(HostError::HostId)
    );
    assert_eq!(
        Host::<4>::new(DOMAIN, HostId::new(9), g, c).err(),
        Some(HostError::HostId)
    );
    assert!(Host::<4>::new(DOMAIN, HostId::new(8), g, c).is_ok());
}

#[test]
fn new_refuses_a_config_that_makes_no_sense() {
    let ok = HostConfig::default();
    let cases = [
        (
            HostConfig {
                chunk_size: 0,
                ..ok
            },
            HostError::ChunkSize,
        ),
        (
            HostConfig {
                utilization_percent: 101,
                ..ok
            },
            HostError::UtilizationPercent,
        ),
        (
            HostConfig {
                poll_interval: Duration::ZERO,
                ..ok
            },
            HostError::PollInterval,
        ),
        (
            HostConfig {
                resend_timeout: Duration::ZERO,
                ..ok
            },
            HostError::ResendTimeout,
        ),
        (
            HostConfig {
                max_resend_timeout: Duration::from_secs(1),
                ..ok
            },
            HostError::ResendTimeout,
        ),
        (
            HostConfig {
                remind_interval: Duration::ZERO,
                ..ok
            },
            HostError::RemindInterval,
        ),
    ];
    for (config, error) in cases {
        assert_eq!(
            Host::<4>::new(DOMAIN, HostId::new(HOST), geometry(), config).err(),
            Some(error)
        );
    }
}

#[test]
fn default_config_is_256_mib_chunks_at_50_percent() {
    let c = HostConfig::default();
    assert_eq!(c.chunk_size, 256 * MIB);
    assert_eq!(c.utilization_percent, 50);
    assert_eq!(c.poll_interval, Duration::from_millis(2));
    assert_eq!(c.resend_timeout, Duration::from_secs(2));
    assert_eq!(c.max_resend_timeout, Duration::from_secs(30));
    assert_eq!(c.remind_interval, Duration::from_secs(10));
    assert_eq!(
        volume::threshold(c.chunk_size, c.utilization_percent),
        WATERMARK
    );
}

#[test]
fn add_volume_refuses_nil_duplicates_and_one_too_many() {
    let mut host =
        Host::<2>::new(DOMAIN, HostId::new(HOST), geometry(), HostConfig::default()).unwrap();
    assert_eq!(
        host.add_volume(Uuid::NIL, VIRTUAL, LIMIT, GIB, 0),
        Err(HostError::NilVolume)
    );
    host.add_volume(vol(1), VIRTUAL, LIMIT, GIB, 0).unwrap();
    assert_eq!(
        host.add_volume(vol(1), VIRTUAL, LIMIT, GIB, 0),
        Err(HostError::DuplicateVolume)
    );
    host.add_volume(vol(2), VIRTUAL, LIMIT, GIB, 0).unwrap();
    assert_eq!(
        host.add_volume(vol(3), VIRTUAL, LIMIT, GIB, 0),
        Err(HostError::TooManyVolumes)
    );
}

#[test]
fn add_volume_refuses_inconsistent_sizes() {
    let mut host =
        Host::<4>::new(DOMAIN, HostId::new(HOST), geometry(), HostConfig::default()).unwrap();
    for (virtual_size, limit) in [(0, LIMIT), (VIRTUAL, VIRTUAL - 512), (VIRTUAL, LIMIT + 1)] {
        assert_eq!(
            host.add_volume(vol(1), virtual_size, limit, GIB, 0),
            Err(HostError::InconsistentSizes)
        );
    }
    assert!(host.volume(vol(1)).is_none());
}

// ------------------------------------------------------------------- start

#[test]
fn nothing_is_written_before_start() {
    let mut host =
        Host::<4>::new(DOMAIN, HostId::new(HOST), geometry(), HostConfig::default()).unwrap();
    host.add_volume(vol(1), VIRTUAL, LIMIT, GIB, GIB - MIB)
        .unwrap();
    host.handle_allocation(at(1), vol(1), GIB - 1);
    host.handle_timeout(at(2));
    assert_eq!(host.generation(), Generation::new(0));
    assert_eq!(host.poll_write(), None);
    assert_eq!(host.poll_read(at(3)), None);
}

#[test]
fn start_on_an_empty_area_writes_the_generation_1_header_then_the_holds() {
    let rig = Rig::<4>::one(0);
    assert_eq!(rig.host.generation(), Generation::new(1));
    assert_eq!(rig.writes.len(), 2);
    assert_eq!(
        rig.writes[0].offset,
        geometry().inbox_area(HostId::new(HOST)).unwrap()
    );
    assert_eq!(rig.writes[0].record, inbox_header(1));
    assert_eq!(rig.writes[1].offset, inbox_slot_offset(31));
    assert_eq!(rig.hold(31).unwrap().held(), &[vol(1)]);
}

#[test]
fn start_writes_the_header_before_any_request() {
    // The volume is past its watermark: a request follows the header.
    let rig = Rig::<4>::one(GIB - MIB);
    assert_eq!(rig.writes[0].record, inbox_header(1));
    assert_eq!(rig.writes[1].offset, inbox_slot_offset(31));
    assert_eq!(rig.writes[2].offset, inbox_slot_offset(1));
    assert_eq!(rig.writes[3].offset, DOORBELL_OFFSET);
    assert_eq!(rig.writes.len(), 4);
}

#[test]
fn start_is_refused_twice_and_for_areas_that_are_not_4096_bytes() {
    let mut rig = Rig::<4>::one(0);
    let area = [0u8; AREA_SIZE];
    assert_eq!(
        rig.host.start(at(1), &area, &area, 1),
        Err(HostError::AlreadyStarted)
    );
    let mut fresh =
        Host::<4>::new(DOMAIN, HostId::new(HOST), geometry(), HostConfig::default()).unwrap();
    assert_eq!(
        fresh.start(at(0), &area[..4095], &area, 1),
        Err(HostError::AreaLength)
    );
    assert_eq!(
        fresh.start(at(0), &area, &[0; 4097], 1),
        Err(HostError::AreaLength)
    );
    assert_eq!(fresh.generation(), Generation::new(0));
    assert_eq!(fresh.poll_write(), None);
}

#[test]
fn start_takes_a_generation_above_every_generation_in_either_area() {
    let mut rig = Rig::<4>::new();
    put(&mut rig.inbox, 0, inbox_header(5));
    // A stale request ahead of its header (whose write was lost).
    let r = request_record(2, 7, 1, vol(9), 2 * GIB);
    put(&mut rig.inbox, 2, r.to_bytes().unwrap());
    rig.start(at(0));
    assert_eq!(rig.host.generation(), Generation::new(8));

    // The outbox counts too: a reply to generation 11 rules out 8..=11.
    let mut rig = Rig::<4>::new();
    put(&mut rig.inbox, 0, inbox_header(5));
    rig.outbox_header(3, 11);
    rig.start(at(0));
    assert_eq!(rig.host.generation(), Generation::new(12));
}

#[test]
fn start_with_a_torn_header_takes_the_generation_from_the_slots() {
    let mut rig = Rig::<4>::new();
    let mut header = inbox_header(9);
    header[40] ^= 0xff; // torn: fails its checksum
    put(&mut rig.inbox, 0, header);
    put(
        &mut rig.inbox,
        4,
        request_record(4, 9, 3, vol(9), 2 * GIB).to_bytes().unwrap(),
    );
    rig.start(at(0));
    assert_eq!(rig.host.generation(), Generation::new(10));
    assert_eq!(rig.writes[0].record, inbox_header(10));
}

#[test]
fn start_refuses_a_generation_that_cannot_be_raised() {
    let mut rig = Rig::<4>::new();
    put(&mut rig.inbox, 0, inbox_header(u64::MAX));
    let (inbox, outbox) = (rig.inbox, rig.outbox);
    assert_eq!(
        rig.host.start(at(0), &inbox, &outbox, 1),
        Err(HostError::GenerationExhausted)
    );
}

#[test]
fn start_rewrites_unanswered_requests_in_their_slots_with_fresh_sequences() {
    let mut rig = Rig::<4>::new();
    rig.host.add_volume(vol(1), VIRTUAL, LIMIT, GIB, 0).unwrap();
    rig.host.add_volume(vol(2), VIRTUAL, LIMIT, GIB, 0).unwrap();
    put(&mut rig.inbox, 0, inbox_header(4));
    let a = request_record(5, 4, 17, vol(1), GIB + 256 * MIB);
    let b = request_record(9, 4, 18, vol(2), GIB + 256 * MIB);
    put(&mut rig.inbox, 5, a.to_bytes().unwrap());
    put(&mut rig.inbox, 9, b.to_bytes().unwrap());
    rig.start(at(0));
    assert_eq!(rig.host.generation(), Generation::new(5));
    let offsets: Vec<u64> = rig.writes.iter().map(|w| w.offset).collect();
    assert_eq!(
        offsets,
        [
            geometry().inbox_area(HostId::new(HOST)).unwrap(),
            inbox_slot_offset(31),
            inbox_slot_offset(5),
            inbox_slot_offset(9),
            DOORBELL_OFFSET
        ]
    );
    let a2 = rig.request(5).unwrap();
    assert_eq!(
        (a2.generation, a2.sequence, a2.volume, a2.target_size),
        (Generation::new(5), 1, vol(1), a.target_size)
    );
    let b2 = rig.request(9).unwrap();
    assert_eq!(
        (b2.generation, b2.sequence, b2.volume),
        (Generation::new(5), 2, vol(2))
    );
    assert_eq!(rig.doorbell().unwrap().sequence, 2);
    assert_eq!(rig.host.in_flight(), 2);
}

#[test]
fn start_clears_requests_for_volumes_the_host_no_longer_has() {
    let mut rig = Rig::<4>::new();
    put(&mut rig.inbox, 0, inbox_header(4));
    put(
        &mut rig.inbox,
        6,
        request_record(6, 4, 2, vol(7), 2 * GIB).to_bytes().unwrap(),
    );
    rig.start(at(0));
    assert!(rig.slot_empty(6));
    assert_eq!(rig.writes[1].offset, inbox_slot_offset(31));
    assert_eq!(rig.writes[1].record, [0; RECORD_LEN]);
    assert_eq!(rig.writes[2].offset, inbox_slot_offset(6));
    assert_eq!(rig.writes[2].record, [0; RECORD_LEN]);
    assert_eq!(rig.host.in_flight(), 0);
}

#[test]
fn start_clears_requests_that_have_a_final_reply() {
    let mut rig = Rig::<4>::new();
    rig.host.add_volume(vol(1), VIRTUAL, LIMIT, GIB, 0).unwrap();
    put(&mut rig.inbox, 0, inbox_header(4));
    let r = request_record(2, 4, 5, vol(1), 2 * GIB);
    put(&mut rig.inbox, 2, r.to_bytes().unwrap());
    rig.outbox_header(1, 4);
    let reply = Reply {
        domain: DOMAIN,
        host_id: HostId::new(HOST),
        slot: Slot::new(2),
        generation: Generation::new(4),
        sequence: 5,
        volume: vol(1),
        target_size: 2 * GIB,
        size: 0,
        epoch: Epoch::new(1),
        status: ReplyStatus::Failed { code: 5 },
    };
    rig.put_outbox(2, reply.to_bytes().unwrap());
    rig.start(at(0));
    assert!(rig.slot_empty(2));
    assert_eq!(rig.host.in_flight(), 0);
}

#[test]
fn start_keeps_a_request_whose_reply_is_only_waiting_for_space() {
    let mut rig = Rig::<4>::new();
    rig.host.add_volume(vol(1), VIRTUAL, LIMIT, GIB, 0).unwrap();
    put(&mut rig.inbox, 0, inbox_header(4));
    let r = request_record(2, 4, 5, vol(1), 2 * GIB);
    put(&mut rig.inbox, 2, r.to_bytes().unwrap());
    rig.outbox_header(1, 4);
    let reply = Reply {
        domain: DOMAIN,
        host_id: HostId::new(HOST),
        slot: Slot::new(2),
        generation: Generation::new(4),
        sequence: 5,
        volume: vol(1),
        target_size: 2 * GIB,
        size: GIB,
        epoch: Epoch::new(1),
        status: ReplyStatus::WaitingForSpace,
    };
    rig.put_outbox(2, reply.to_bytes().unwrap());
    rig.start(at(0));
    assert_eq!(
        rig.request(2).map(|r| (r.generation, r.sequence)),
        Some((Generation::new(5), 1))
    );
}

#[test]
fn start_drops_recovered_requests_the_volume_no_longer_needs() {
    let mut rig = Rig::<4>::new();
    // Already 2 GiB: a request for 2 GiB is met.
    rig.host
        .add_volume(vol(1), VIRTUAL, LIMIT, 2 * GIB, 0)
        .unwrap();
    put(&mut rig.inbox, 0, inbox_header(4));
    put(
        &mut rig.inbox,
        3,
        request_record(3, 4, 1, vol(1), 2 * GIB).to_bytes().unwrap(),
    );
    rig.start(at(0));
    assert!(rig.slot_empty(3));
    assert_eq!(rig.host.in_flight(), 0);
}

#[test]
fn start_clears_defective_slots() {
    let mut rig = Rig::<4>::new();
    put(&mut rig.inbox, 0, inbox_header(4));
    rig.inbox[8 * RECORD_LEN + 5] = 0x77; // garbage in slot 8
    rig.start(at(0));
    assert!(rig.slot_empty(8));
}

#[test]
fn start_keeps_only_the_largest_of_two_requests_for_one_volume() {
    let mut rig = Rig::<4>::new();
    rig.host.add_volume(vol(1), VIRTUAL, LIMIT, GIB, 0).unwrap();
    put(&mut rig.inbox, 0, inbox_header(4));
    put(
        &mut rig.inbox,
        1,
        request_record(1, 4, 1, vol(1), 2 * GIB).to_bytes().unwrap(),
    );
    put(
        &mut rig.inbox,
        2,
        request_record(2, 4, 2, vol(1), 3 * GIB).to_bytes().unwrap(),
    );
    rig.start(at(0));
    assert!(rig.slot_empty(1));
    assert_eq!(rig.request(2).map(|r| r.target_size), Some(3 * GIB));
}

#[test]
fn start_checks_every_volume_and_pauses_a_full_one() {
    let mut rig = Rig::<4>::new();
    rig.host
        .add_volume(vol(1), VIRTUAL, LIMIT, GIB, GIB)
        .unwrap();
    rig.start(at(0));
    assert_eq!(rig.take_events(), [HostEvent::Paused { volume: vol(1) }]);
    let r = rig.request(1).unwrap();
    assert!(r.paused);
}

// --------------------------------------------------------------- watermark

#[test]
fn below_the_watermark_nothing_is_sent() {
    let mut rig = Rig::<4>::one(0);
    rig.writes.clear();
    rig.host.handle_allocation(at(1), vol(1), GIB - WATERMARK);
    assert!(rig.flush().is_empty());
    // Only the SPM header is read, every second (its release_commit), at
    // this host's phase.
    assert_eq!(rig.host.poll_timeout(), Some(at(1000 + PHASE)));
}

#[test]
fn the_write_threshold_is_the_last_allocation_that_asks_for_nothing() {
    let mut rig = Rig::<4>::one(0);
    let threshold = rig.host.write_threshold(vol(1)).unwrap();
    assert_eq!(threshold, GIB - WATERMARK);
    rig.writes.clear();
    rig.host.handle_allocation(at(1), vol(1), threshold);
    assert!(rig.flush().is_empty());
    rig.host.handle_allocation(at(1), vol(1), threshold + 1);
    assert!(!rig.flush().is_empty());
    assert!(rig.request(1).is_some());
    assert_eq!(rig.host.write_threshold(vol(9)), None);
}

#[test]
fn a_volume_at_its_limit_has_no_write_threshold() {
    let mut rig = Rig::<4>::new();
    rig.host
        .add_volume(vol(1), VIRTUAL, LIMIT, LIMIT, 0)
        .unwrap();
    assert_eq!(rig.host.write_threshold(vol(1)), None);
}

#[test]
fn crossing_the_watermark_writes_one_request_then_rings() {
    let mut rig = Rig::<4>::one(0);
    rig.writes.clear();
    rig.host
        .handle_allocation(at(1), vol(1), GIB - WATERMARK + 1);
    let writes = rig.flush();
    assert_eq!(writes.len(), 2);
    assert_eq!(writes[0].offset, inbox_slot_offset(1));
    assert_eq!(writes[1].offset, DOORBELL_OFFSET);
    let r = rig.request(1).unwrap();
    assert_eq!(
        r,
        Request {
            domain: DOMAIN,
            host_id: HostId::new(HOST),
            slot: Slot::new(1),
            generation: Generation::new(1),
            sequence: 1,
            volume: vol(1),
            target_size: GIB + 256 * MIB,
            current_size: GIB,
            paused: false,
        }
    );
    assert_eq!(
        rig.doorbell(),
        Some(Doorbell {
            domain: DOMAIN,
            ringer: HostId::new(HOST),
            generation: Generation::new(1),
            sequence: 1,
            rings: 1,
        })
    );
    assert_eq!(rig.host.stats().requests_sent, 1);
}

#[test]
fn the_target_is_one_chunk_more_capped_at_the_limit_and_rounded_up_to_512() {
    let mut rig = Rig::<4>::new();
    let odd = GIB + 100; // not a multiple of 512
    rig.host
        .add_volume(vol(1), VIRTUAL, LIMIT, odd, odd)
        .unwrap();
    rig.host
        .add_volume(vol(2), VIRTUAL, LIMIT, LIMIT - MIB, LIMIT - MIB)
        .unwrap();
    rig.start(at(0));
    let a = rig.request(1).unwrap();
    assert_eq!(a.target_size, (odd + 256 * MIB).div_ceil(512) * 512);
    let b = rig.request(2).unwrap();
    assert_eq!(b.target_size, LIMIT);
}

#[test]
fn a_volume_at_its_limit_never_asks_even_when_paused() {
    let mut rig = Rig::<4>::new();
    rig.host
        .add_volume(vol(1), VIRTUAL, LIMIT, LIMIT, LIMIT)
        .unwrap();
    rig.start(at(0));
    assert_eq!(rig.host.in_flight(), 0);
    assert_eq!(rig.take_events(), [HostEvent::Paused { volume: vol(1) }]);
}

#[test]
fn one_request_per_volume_at_a_time() {
    let mut rig = Rig::<4>::one(GIB - MIB);
    rig.writes.clear();
    rig.host.handle_allocation(at(1), vol(1), GIB - 1000);
    rig.host.handle_allocation(at(2), vol(1), GIB - 10);
    assert!(rig.flush().is_empty());
    assert_eq!(rig.host.in_flight(), 1);
}

#[test]
fn sequence_numbers_start_at_1_and_grow_by_one_per_new_request() {
    let mut rig = Rig::<4>::new();
    for n in 1..=3 {
        rig.host.add_volume(vol(n), VIRTUAL, LIMIT, GIB, 0).unwrap();
    }
    rig.start(at(0));
    for n in 1..=3 {
        rig.host.handle_allocation(at(1), vol(n), GIB - MIB);
    }
    rig.flush();
    let seqs: Vec<u64> = (1..=3).map(|s| rig.request(s).unwrap().sequence).collect();
    assert_eq!(seqs, [1, 2, 3]);
}

#[test]
fn allocation_is_only_ever_raised() {
    let mut rig = Rig::<4>::one(GIB / 2);
    rig.host.handle_allocation(at(1), vol(1), 10);
    assert_eq!(rig.host.volume(vol(1)).unwrap().allocation, GIB / 2);
}

#[test]
fn without_a_free_slot_a_volume_waits_and_takes_the_next_freed_slot() {
    let mut rig = Rig::<32>::new();
    for n in 1..=32 {
        rig.host.add_volume(vol(n), VIRTUAL, LIMIT, GIB, 0).unwrap();
    }
    rig.start(at(0));
    for n in 1..=32 {
        rig.host.handle_allocation(at(1), vol(n), GIB - MIB);
    }
    // 32 volumes fill 8 hold slots (24..=31); 23 slots take requests.
    assert_eq!(rig.host.request_slots(), 23);
    assert_eq!(rig.host.in_flight(), 23);
    assert!(rig.host.volume(vol(24)).unwrap().pending);
    assert!(rig.take_events().contains(&HostEvent::SlotsExhausted));
    // Slot 7's request fails: the first waiting volume takes slot 7 at
    // once (its empty write is replaced by the new request).
    rig.answer(7, 1, ReplyStatus::Failed { code: 5 }, 0);
    rig.writes.clear();
    rig.deliver(at(2));
    let r = rig.request(7).unwrap();
    assert_eq!((r.volume, r.sequence), (vol(24), 24));
    assert_eq!(
        rig.writes.len(),
        2,
        "one write for slot 7, then the doorbell"
    );
    assert!(!rig.host.volume(vol(24)).unwrap().pending);
}

#[test]
fn a_waiting_paused_guest_gets_the_next_slot_before_earlier_ones() {
    let mut rig = Rig::<33>::new();
    for n in 1..=33 {
        rig.host.add_volume(vol(n), VIRTUAL, LIMIT, GIB, 0).unwrap();
    }
    rig.start(at(0));
    for n in 1..=33 {
        rig.host.handle_allocation(at(1), vol(n), GIB - MIB);
    }
    rig.host.handle_allocation(at(1), vol(33), GIB);
    rig.flush();
    rig.answer(1, 1, ReplyStatus::Failed { code: 5 }, 0);
    rig.deliver(at(2));
    assert_eq!(
        rig.request(1).map(|r| (r.volume, r.paused)),
        Some((vol(33), true))
    );
    assert!(rig.host.volume(vol(32)).unwrap().pending);
}

// ------------------------------------------------------------ pause/resume

#[test]
fn paused_is_reported_once_and_resends_the_request_with_the_paused_flag() {
    let mut rig = Rig::<4>::one(GIB - MIB);
    rig.take_events();
    rig.writes.clear();
    rig.host.handle_allocation(at(1), vol(1), GIB);
    rig.host.handle_allocation(at(2), vol(1), GIB + 4096);
    rig.flush();
    let r = rig.request(1).unwrap();
    assert!(r.paused);
    assert_eq!(r.sequence, 1, "a resend keeps the sequence");
    assert_eq!(rig.writes.len(), 2);
    assert_eq!(rig.writes[1].offset, DOORBELL_OFFSET);
    assert_eq!(
        rig.take_events(),
        [
            HostEvent::Paused { volume: vol(1) },
            HostEvent::Resent {
                volume: vol(1),
                sequence: 1
            }
        ]
    );
    assert!(rig.host.volume(vol(1)).unwrap().paused);
}

#[test]
fn a_paused_guest_resumes_when_the_refresh_gives_it_room() {
    let mut rig = Rig::<4>::one(GIB);
    rig.take_events();
    rig.answer(1, 1, ReplyStatus::Extended, GIB + 256 * MIB);
    rig.deliver(at(1));
    rig.host.handle_refreshed(at(2), vol(1), GIB + 256 * MIB);
    let events = rig.take_events();
    assert!(events.contains(&HostEvent::Resumed { volume: vol(1) }));
    assert!(!rig.host.volume(vol(1)).unwrap().paused);
}

// ----------------------------------------------------------------- replies

#[test]
fn an_extended_reply_asks_for_a_refresh_and_physical_waits_for_it() {
    let mut rig = Rig::<4>::one(GIB - MIB);
    rig.take_events();
    rig.answer(1, 1, ReplyStatus::Extended, GIB + 256 * MIB);
    rig.deliver(at(1));
    assert_eq!(
        rig.take_events(),
        [HostEvent::Refresh {
            volume: vol(1),
            size: GIB + 256 * MIB
        }]
    );
    let v = rig.host.volume(vol(1)).unwrap();
    assert_eq!(v.physical, GIB);
    assert_eq!(
        v.request.map(|f| f.phase),
        Some(Phase::Extended {
            size: GIB + 256 * MIB
        })
    );
    assert_eq!(rig.host.stats().replies_accepted, 1);
    assert!(!rig.slot_empty(1), "the slot is kept until refreshed");
}

#[test]
fn the_refresh_completes_the_extension_with_its_latency_and_frees_the_slot() {
    let mut rig = Rig::<4>::one(0);
    rig.host.handle_allocation(at(10), vol(1), GIB - MIB);
    rig.flush();
    rig.answer(1, 1, ReplyStatus::Extended, GIB + 256 * MIB);
    rig.deliver(at(12));
    rig.take_events();
    rig.writes.clear();
    rig.host.handle_refreshed(at(13), vol(1), GIB + 256 * MIB);
    assert_eq!(
        rig.take_events(),
        [HostEvent::Extended {
            volume: vol(1),
            size: GIB + 256 * MIB,
            latency: Duration::from_millis(3)
        }]
    );
    assert_eq!(rig.host.volume(vol(1)).unwrap().physical, GIB + 256 * MIB);
    assert_eq!(rig.writes.len(), 1);
    assert!(rig.slot_empty(1));
    assert_eq!(rig.host.in_flight(), 0);
}

#[test]
fn the_watermark_is_checked_again_after_a_refresh() {
    let mut rig = Rig::<4>::one(GIB - MIB);
    rig.host.handle_allocation(at(1), vol(1), GIB + 200 * MIB);
    rig.answer(1, 1, ReplyStatus::Extended, GIB + 256 * MIB);
    rig.deliver(at(2));
    rig.host.handle_refreshed(at(3), vol(1), GIB + 256 * MIB);
    rig.flush();
    // Slot 1 is being emptied; an empty slot is taken first.
    assert!(rig.slot_empty(1));
    let r = rig.request(2).unwrap();
    assert_eq!((r.sequence, r.target_size), (2, GIB + 512 * MIB));
}

#[test]
fn physical_is_never_lowered() {
    let mut rig = Rig::<4>::one(0);
    rig.host.handle_refreshed(at(1), vol(1), GIB / 2);
    assert_eq!(rig.host.volume(vol(1)).unwrap().physical, GIB);
    rig.host.handle_refreshed(at(1), vol(1), 2 * GIB);
    assert_eq!(rig.host.volume(vol(1)).unwrap().physical, 2 * GIB);
    assert!(rig.take_events().is_empty(), "no extension was asked for");
}

#[test]
fn the_refresh_is_asked_for_again_until_it_is_done() {
    let mut rig = Rig::<4>::one_quiet(GIB - MIB);
    rig.answer(1, 1, ReplyStatus::Extended, GIB + 256 * MIB);
    rig.deliver(at(1));
    rig.take_events();
    assert_eq!(rig.host.poll_read(at(1)), Some(HostRead::SpmHeader));
    assert_eq!(
        rig.host.poll_timeout(),
        Some(at(1) + Duration::from_secs(2))
    );
    rig.host.handle_timeout(at(2001));
    assert_eq!(
        rig.take_events(),
        [HostEvent::Refresh {
            volume: vol(1),
            size: GIB + 256 * MIB
        }]
    );
}

#[test]
fn waiting_for_space_slows_resends_but_not_polling() {
    let mut rig = Rig::<4>::one(GIB - MIB);
    rig.take_events();
    rig.answer(1, 1, ReplyStatus::WaitingForSpace, GIB);
    rig.deliver(at(1));
    assert_eq!(
        rig.take_events(),
        [HostEvent::WaitingForSpace { volume: vol(1) }]
    );
    // Seen again: not a new event, not counted again.
    rig.deliver(at(2));
    assert!(rig.take_events().is_empty());
    assert_eq!(rig.host.stats().replies_accepted, 1);
    // Polling goes on, at most a poll interval apart (the SPM header at
    // its own); nothing is resent.
    assert_eq!(rig.host.poll_read(at(2)), Some(HostRead::SpmHeader));
    let next = rig.host.poll_timeout().expect("polling goes on");
    assert!(
        next <= at(2) + HostConfig::default().poll_interval,
        "{next:?}"
    );
    rig.writes.clear();
    rig.host.handle_timeout(at(9_000));
    assert!(rig.flush().is_empty());
    assert!(rig.host.poll_read(at(9_000)).is_some());
    assert_eq!(rig.host.stats().resends, 0);
    // Only every remind_interval, a reminder with the same sequence.
    rig.host.handle_timeout(at(11_000));
    assert!(!rig.flush().is_empty());
    assert_eq!(rig.host.stats().resends, 1);
    assert_eq!(rig.request(1).map(|r| r.sequence), Some(1));
}

#[test]
fn rejected_frees_the_slot_and_the_volume_asks_no_more() {
    let mut rig = Rig::<4>::one(GIB - MIB);
    rig.take_events();
    rig.answer(1, 1, ReplyStatus::Rejected(RejectReason::OverLimit), GIB);
    rig.deliver(at(1));
    assert_eq!(
        rig.take_events(),
        [HostEvent::Rejected {
            volume: vol(1),
            reason: RejectReason::OverLimit
        }]
    );
    assert!(rig.slot_empty(1));
    rig.host.handle_allocation(at(2), vol(1), GIB);
    rig.host.handle_timeout(at(100_000));
    rig.flush();
    assert_eq!(rig.host.in_flight(), 0);
    assert!(rig.host.volume(vol(1)).unwrap().rejected);
}

#[test]
fn failed_frees_the_slot_and_asks_again_after_the_resend_timeout() {
    let mut rig = Rig::<4>::one_quiet(GIB - MIB);
    assert_eq!(rig.host.poll_read(at(0)), Some(HostRead::SpmHeader));
    rig.take_events();
    rig.answer(1, 1, ReplyStatus::Failed { code: 5 }, 0);
    rig.deliver(at(1));
    assert_eq!(
        rig.take_events(),
        [HostEvent::Failed {
            volume: vol(1),
            code: 5
        }]
    );
    assert!(rig.slot_empty(1));
    rig.host.handle_allocation(at(2), vol(1), GIB - 1000);
    assert_eq!(rig.host.in_flight(), 0, "not before the resend timeout");
    assert_eq!(rig.host.poll_timeout(), Some(at(2001)));
    rig.host.handle_timeout(at(2001));
    rig.flush();
    assert_eq!(rig.request(1).map(|r| r.sequence), Some(2));
}

#[test]
fn replies_that_do_not_answer_the_exact_request_are_ignored() {
    type Change = fn(&mut Reply);
    let changes: [Change; 4] = [
        |r| r.sequence += 1,
        |r| r.generation = r.generation.next().unwrap(),
        |r| r.volume = vol(9),
        |r| r.target_size += 512,
    ];
    for (n, change) in changes.into_iter().enumerate() {
        let mut rig = Rig::<4>::one(GIB - MIB);
        rig.take_events();
        let mut reply = rig.answer(1, 1, ReplyStatus::Extended, 2 * GIB);
        change(&mut reply);
        rig.outbox_header(1, reply.generation.get());
        rig.put_outbox(1, reply.to_bytes().unwrap());
        rig.deliver(at(1));
        assert!(rig.take_events().is_empty(), "change {n}");
        assert_eq!(rig.host.stats().replies_ignored, 1, "change {n}");
        assert_eq!(rig.host.stats().replies_accepted, 0, "change {n}");
        assert_eq!(
            rig.host.volume(vol(1)).unwrap().request.map(|f| f.phase),
            Some(Phase::Sent)
        );
    }
}

#[test]
fn a_reply_stale_under_its_outbox_header_is_ignored() {
    let mut rig = Rig::<4>::one(GIB - MIB);
    rig.take_events();
    rig.answer(1, 1, ReplyStatus::Extended, 2 * GIB);
    rig.outbox_header(1, 7); // the header names another generation
    rig.deliver(at(1));
    assert!(rig.take_events().is_empty());
    assert_eq!(rig.host.stats().replies_ignored, 1);
}

/// The record of an active SPM's header of `domain` at `epoch`.
fn active_spm_header(domain: Uuid, epoch: u64) -> [u8; RECORD_LEN] {
    SpmHeader {
        domain,
        epoch: Epoch::new(epoch),
        spm_id: HostId::NONE,
        state: SpmState::Active,
        heartbeat_interval_ms: 1000,
        heartbeat: 1,
        owner: 7,
        pool_commit: 0,
        release_commit: 0,
    }
    .to_bytes()
    .unwrap()
}

#[test]
fn a_reply_from_an_older_epoch_than_the_spm_header_is_ignored() {
    let mut rig = Rig::<4>::one(GIB - MIB);
    rig.take_events();
    rig.host
        .handle_spm_header(Instant::ZERO, &active_spm_header(DOMAIN, 5));
    rig.answer(1, 4, ReplyStatus::Extended, 2 * GIB);
    rig.deliver(at(1));
    assert!(rig.take_events().is_empty());
    rig.answer(1, 5, ReplyStatus::Extended, 2 * GIB);
    rig.deliver(at(2));
    assert_eq!(rig.take_events().len(), 1);
}

#[test]
fn an_spm_header_of_another_domain_teaches_nothing() {
    let mut rig = Rig::<4>::one(0);
    rig.host
        .handle_spm_header(Instant::ZERO, &active_spm_header(Uuid([1; 16]), 5));
    assert_eq!(rig.host.newest_epoch(), Epoch::ZERO);
}

#[test]
fn the_newest_epoch_in_one_read_wins_whatever_the_slot_order() {
    let mut rig = Rig::<4>::new();
    rig.host
        .add_volume(vol(1), VIRTUAL, LIMIT, GIB, GIB - MIB)
        .unwrap();
    rig.host
        .add_volume(vol(2), VIRTUAL, LIMIT, GIB, GIB - MIB)
        .unwrap();
    rig.start(at(0));
    rig.answer(1, 3, ReplyStatus::Extended, 2 * GIB);
    rig.answer(2, 4, ReplyStatus::Extended, 2 * GIB);
    rig.outbox_header(4, 1);
    rig.deliver(at(1));
    assert_eq!(rig.host.newest_epoch(), Epoch::new(4));
    assert_eq!(
        rig.take_events(),
        [HostEvent::Refresh {
            volume: vol(2),
            size: 2 * GIB
        }]
    );
}

#[test]
fn an_old_epoch_final_answer_is_replaced_by_a_new_request_at_the_deadline() {
    let mut rig = Rig::<4>::one(GIB - MIB);
    rig.host
        .handle_spm_header(Instant::ZERO, &active_spm_header(DOMAIN, 5));
    // The old SPM answered; a new SPM sees that final reply and will not
    // answer the same sequence again.
    rig.answer(1, 4, ReplyStatus::Extended, 2 * GIB);
    rig.deliver(at(1));
    assert!(rig.host.volume(vol(1)).unwrap().request.unwrap().renew);
    rig.host.handle_timeout(at(2000));
    rig.flush();
    let r = rig.request(1).unwrap();
    assert_eq!((r.sequence, r.target_size), (2, GIB + 256 * MIB));
    assert_eq!(rig.doorbell().unwrap().sequence, 2);
}

// ----------------------------------------------------- timing and polling

#[test]
fn resends_back_off_doubling_up_to_the_maximum() {
    let mut rig = Rig::<4>::one(GIB - MIB);
    let mut resends = Vec::new();
    let mut now = at(0);
    while now < at(200_000) {
        now = rig.host.poll_timeout().unwrap();
        rig.host.handle_timeout(now);
        while rig.host.poll_read(now).is_some() {}
        for e in rig.take_events() {
            if matches!(e, HostEvent::Resent { .. }) {
                resends.push(now.as_micros() / 1_000_000);
            }
        }
    }
    assert_eq!(resends, [2, 6, 14, 30, 60, 90, 120, 150, 180]);
    assert_eq!(rig.request(1).unwrap().sequence, 1);
    assert_eq!(rig.host.stats().resends, 9);
}

#[test]
fn a_resend_rewrites_the_same_record_and_rings_again() {
    let mut rig = Rig::<4>::one(GIB - MIB);
    let first = rig.writes[2];
    rig.writes.clear();
    rig.host.handle_timeout(at(2000));
    let writes = rig.flush();
    assert_eq!(writes.len(), 2);
    assert_eq!(writes[0], first);
    assert_eq!(writes[1].offset, DOORBELL_OFFSET);
}

#[test]
fn the_outbox_is_read_only_while_requests_await_a_reply() {
    let mut rig = Rig::<4>::one(0);
    assert_eq!(rig.host.poll_read(at(100)), None);
    // Idle, only the SPM header is read, every second.
    assert_eq!(rig.host.poll_timeout(), Some(at(1000 + PHASE)));
    rig.host.handle_allocation(at(100), vol(1), GIB - MIB);
    rig.flush();
    let read = HostRead::OutboxArea {
        offset: geometry().outbox_area(HostId::new(HOST)).unwrap(),
    };
    let t = at(100);
    assert_eq!(
        rig.host.poll_read(t),
        Some(HostRead::SpmHeader),
        "the SPM header first: the newest epoch, below which replies are ignored"
    );
    assert_eq!(rig.host.poll_read(t), None, "not before a poll interval");
    // The first read comes fast, and the reads back off as the wait lasts:
    // half the time waited, up to the poll interval.
    let fast = HostConfig::default().fast_poll_interval;
    let slow = HostConfig::default().poll_interval;
    let t2 = t + fast;
    assert_eq!(rig.host.poll_timeout(), Some(t2));
    assert_eq!(rig.host.poll_read(t2), Some(read));
    assert_eq!(rig.host.poll_read(t2), None, "one read per interval");
    assert_eq!(rig.host.poll_timeout(), Some(t2 + fast));
    let t_mid = t + Duration::from_millis(2);
    assert_eq!(rig.host.poll_read(t_mid), Some(read));
    assert_eq!(
        rig.host.poll_timeout(),
        Some(t_mid + Duration::from_millis(1))
    );
    let t_late = t + Duration::from_millis(100);
    assert_eq!(rig.host.poll_read(t_late), Some(read));
    let just_before = t_late + slow - Duration::from_micros(1);
    assert_eq!(rig.host.poll_read(just_before), None);
    assert_eq!(
        rig.host.poll_read(t_late + slow),
        Some(read),
        "backed off to the poll interval"
    );
    let t3 = t + Duration::from_secs(1);
    assert_eq!(
        rig.host.poll_read(t3),
        Some(HostRead::SpmHeader),
        "the SPM header again a second later"
    );
    rig.answer(1, 1, ReplyStatus::Extended, 2 * GIB);
    rig.deliver(t2);
    assert_eq!(
        rig.host.poll_read(at(1000)),
        None,
        "awaiting a refresh only"
    );
}

#[test]
fn a_volume_added_after_start_is_checked_at_the_next_timeout() {
    let mut rig = Rig::<4>::one(0);
    rig.host.handle_timeout(at(50));
    rig.host
        .add_volume(vol(2), VIRTUAL, LIMIT, GIB, GIB - MIB)
        .unwrap();
    assert_eq!(rig.host.poll_timeout(), Some(at(50)));
    rig.host.handle_timeout(at(51));
    rig.flush();
    assert_eq!(rig.request(1).map(|r| r.volume), Some(vol(2)));
}

#[test]
fn removing_a_volume_abandons_its_request_and_empties_its_slot() {
    let mut rig = Rig::<4>::one(GIB - MIB);
    rig.host.remove_volume(at(1), vol(1)).unwrap();
    rig.flush();
    assert!(rig.slot_empty(1));
    assert_eq!(rig.host.in_flight(), 0);
    assert_eq!(
        rig.host.remove_volume(at(1), vol(1)),
        Err(HostError::UnknownVolume)
    );
}

// ------------------------------------------------------------- robustness

#[test]
fn the_event_queue_drops_the_oldest_and_counts() {
    let mut rig = Rig::<4>::one(GIB - MIB);
    for n in 1..=(EVENTS as u64 + 5) {
        rig.host.handle_timeout(at(n * 100_000));
    }
    let mut got = 0;
    while rig.host.poll_event().is_some() {
        got += 1;
    }
    assert_eq!(got, EVENTS);
    assert!(rig.host.stats().events_dropped >= 5);
}

#[test]
fn spurious_calls_are_harmless() {
    let mut rig = Rig::<4>::one(0);
    rig.host.handle_allocation(at(1), vol(9), GIB);
    rig.host.handle_refreshed(at(1), vol(9), GIB);
    rig.host.handle_outbox(at(1), &[0; 100]);
    rig.host.handle_outbox(at(1), &[0; AREA_SIZE]);
    rig.host.handle_timeout(at(1));
    rig.host.handle_timeout(at(0));
    assert!(rig.take_events().is_empty());
    assert_eq!(rig.host.poll_write(), None);
    assert_eq!(rig.host.poll_read(at(5)), None);
}

#[test]
fn arbitrary_outbox_bytes_never_panic_or_get_accepted() {
    let mut rig = Rig::<4>::one(GIB - MIB);
    rig.take_events();
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut area = [0u8; AREA_SIZE];
    for round in 0..200 {
        for b in area.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *b = seed as u8;
        }
        if round % 2 == 0 {
            // Keep a valid header so the slots get parsed past it.
            area[..RECORD_LEN].copy_from_slice(
                &OutboxHeader {
                    domain: DOMAIN,
                    host_id: HostId::new(HOST),
                    epoch: Epoch::new(1),
                    generation: Generation::new(1),
                }
                .to_bytes()
                .unwrap(),
            );
        }
        rig.host.handle_outbox(at(round), &area);
    }
    assert!(rig.take_events().is_empty());
    assert_eq!(rig.host.stats().replies_accepted, 0);
}

#[test]
fn host_64_stays_within_16_kib() {
    // 13720 bytes on x86_64 when written: 64 volumes of 168 bytes, 64
    // events of 40 bytes, the write queue and counters.
    let size = core::mem::size_of::<Host<64>>();
    assert!(size <= 16 * 1024, "Host<64> is {size} bytes");
}

#[test]
fn a_parked_request_whose_slot_gets_an_old_epoch_final_answer_is_renewed() {
    let mut rig = Rig::<4>::one(GIB - MIB);
    rig.answer(1, 5, ReplyStatus::WaitingForSpace, GIB);
    rig.deliver(at(1));
    // A deposed SPM of epoch 4 completes it late: final, but too old.
    rig.answer(1, 4, ReplyStatus::Extended, 2 * GIB);
    rig.deliver(at(2));
    let flight = rig.host.volume(vol(1)).unwrap().request.unwrap();
    assert!(flight.renew);
    assert_eq!(flight.phase, Phase::Sent, "a deadline runs again");
    // Renewed one resend timeout after the unusable answer was seen.
    rig.host.handle_timeout(at(2001));
    rig.flush();
    assert_eq!(rig.request(1).map(|r| r.sequence), Some(1));
    rig.host.handle_timeout(at(2002));
    rig.flush();
    assert_eq!(rig.request(1).map(|r| r.sequence), Some(2));
}

#[test]
fn the_left_over_reply_of_a_slots_previous_request_is_not_counted() {
    let mut rig = Rig::<4>::one(GIB - MIB);
    rig.answer(1, 1, ReplyStatus::Failed { code: 5 }, 0);
    rig.deliver(at(1));
    rig.host.handle_timeout(at(2001));
    rig.flush();
    assert_eq!(rig.request(1).map(|r| r.sequence), Some(2));
    // Slot 1 still holds the reply to sequence 1 until the SPM answers.
    rig.deliver(at(2010));
    assert_eq!(rig.host.stats().replies_ignored, 0);
}

#[test]
fn the_doorbell_is_rung_again_doubling_until_a_reply_comes() {
    let mut rig = Rig::<4>::one(GIB - MIB);
    rig.writes.clear();
    let mut rings = Vec::new();
    let mut now = at(0);
    while now < at(1_500) {
        now = rig.host.poll_timeout().unwrap();
        rig.host.handle_timeout(now);
        while rig.host.poll_read(now).is_some() {}
        for w in rig.flush() {
            assert_eq!(
                w.offset, DOORBELL_OFFSET,
                "a ring again writes the doorbell only"
            );
            rings.push(now.as_micros());
        }
    }
    // 5 ms after the request, then doubling, each wait stretched by up
    // to 15/16; the resend at 2 s rings by itself.
    let mut last = 0;
    let mut base = 5_000;
    for &t in &rings {
        let wait = t - last;
        assert!(
            (base..base + base * 15 / 16 + 1_000).contains(&wait),
            "waited {wait} us for a base of {base} us: {rings:?}"
        );
        last = t;
        base *= 2;
    }
    assert!(rings.len() >= 7, "{rings:?}");
    let repeated = rig.host.stats().rings_repeated;
    assert_eq!(repeated, rings.len() as u64);
    assert_eq!(rig.doorbell().map(|d| d.sequence), Some(1));
    // A reply ends it: parked requests are known to the SPM.
    rig.answer(1, 1, ReplyStatus::WaitingForSpace, GIB);
    rig.deliver(now);
    rig.take_events();
    rig.host.handle_timeout(at(1_900));
    assert!(rig.flush().is_empty(), "no ring while parked");
    assert_eq!(rig.host.stats().rings_repeated, repeated);
}

#[test]
fn each_ring_again_counts_one_more_ring_and_a_rewritten_request_starts_at_one() {
    let mut rig = Rig::<4>::one(GIB - MIB);
    assert_eq!(rig.doorbell().map(|d| d.rings), Some(1));
    rig.writes.clear();
    // (time, the ring's count, whether the request record was rewritten
    // in the same flush)
    let mut rings = Vec::new();
    let mut now = at(0);
    while now < at(2_500) {
        now = rig.host.poll_timeout().unwrap();
        rig.host.handle_timeout(now);
        while rig.host.poll_read(now).is_some() {}
        let writes = rig.flush();
        let rewrote = writes.iter().any(|w| w.offset == inbox_slot_offset(1));
        for w in &writes {
            if w.offset == DOORBELL_OFFSET {
                let bell = Doorbell::decode(&w.record).unwrap().unwrap();
                rings.push((now.as_micros(), bell.rings, rewrote));
            }
        }
    }
    let resend = rings
        .iter()
        .position(|&(_, _, rewrote)| rewrote)
        .expect("the request is resent within 2.5 s");
    assert!(resend >= 7, "{rings:?}");
    // Rings again before the resend: 2, 3, 4, ...
    for (k, &(_, n, _)) in rings[..resend].iter().enumerate() {
        assert_eq!(usize::from(n), k + 2, "{rings:?}");
    }
    // The resend wrote the request again: its ring counts from 1.
    assert_eq!(rings[resend].1, 1, "{rings:?}");
    if let Some(&(_, n, _)) = rings.get(resend + 1) {
        assert_eq!(n, 2, "{rings:?}");
    }
}

#[test]
fn hosts_that_rang_together_ring_again_apart() {
    // Hosts 1..=8 ring at the same moment for their first request: their
    // first rings again are spread over 5 to 9.7 ms, not in step.
    let mut firsts = Vec::new();
    for host_id in 1..=8u16 {
        let mut host: Host<4> = Host::new(
            DOMAIN,
            HostId::new(host_id),
            geometry(),
            HostConfig::default(),
        )
        .unwrap();
        host.add_volume(vol(1), VIRTUAL, LIMIT, GIB, GIB - MIB)
            .unwrap();
        host.start(at(0), &[0; AREA_SIZE], &[0; AREA_SIZE], 1)
            .unwrap();
        let mut rings = 0;
        let mut now = at(0);
        while rings < 2 {
            while let Some(w) = host.poll_write() {
                if w.offset == DOORBELL_OFFSET {
                    rings += 1;
                    if rings == 2 {
                        firsts.push(now.as_micros());
                    }
                }
            }
            now = host.poll_timeout().unwrap();
            host.handle_timeout(now);
            while host.poll_read(now).is_some() {}
        }
    }
    assert!(
        firsts.iter().all(|&t| (5_000..10_000).contains(&t)),
        "{firsts:?}"
    );
    let mut distinct = firsts.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(distinct.len() >= 5, "rings again in step: {firsts:?}");
}

#[test]
fn a_zero_ring_retry_rings_once_per_write() {
    let mut rig = Rig::<4>::with_config(HostConfig {
        ring_retry: Duration::ZERO,
        ..HostConfig::default()
    });
    rig.host
        .add_volume(vol(1), VIRTUAL, LIMIT, GIB, GIB - MIB)
        .unwrap();
    rig.start(at(0));
    rig.writes.clear();
    rig.host.handle_timeout(at(1_000));
    assert!(rig.flush().is_empty());
    assert_eq!(rig.host.stats().rings_repeated, 0);
}

// ------------------------------------------------------------ builtin lease

fn header_of(record: &[u8]) -> InboxHeader {
    let at = Location {
        domain: DOMAIN,
        host_id: HostId::new(HOST),
        index: 0,
    };
    InboxHeader::parse(record, &at).unwrap().unwrap()
}

#[test]
fn a_leased_host_writes_its_owner_and_heartbeat_interval_in_the_inbox_header() {
    let mut rig = Rig::<4>::leased();
    rig.start(at(0));
    let h = header_of(&rig.inbox[..RECORD_LEN]);
    assert_eq!(h.owner, OWNER);
    assert_eq!(h.heartbeat_interval_ms, 1000);
    assert_eq!(h.heartbeat, 0);
    assert_eq!(h.generation, Generation::new(1));
}

#[test]
fn a_leased_host_reads_its_header_back_every_interval_and_raises_the_heartbeat() {
    let mut rig = Rig::<4>::leased();
    rig.start(at(0));
    assert_eq!(rig.host.poll_timeout(), Some(at(1000)));
    assert_eq!(rig.host.poll_read(at(999)), None);
    assert_eq!(
        rig.host.poll_read(at(1000)),
        Some(HostRead::InboxHeader {
            offset: geometry().inbox_area(HostId::new(HOST)).unwrap(),
        })
    );
    let inbox = rig.inbox;
    rig.host.handle_inbox_header(at(1000), &inbox[..RECORD_LEN]);
    rig.flush();
    assert_eq!(header_of(&rig.inbox[..RECORD_LEN]).heartbeat, 1);
    assert!(!rig.host.is_evicted());
}

#[test]
fn another_owner_in_the_header_evicts_the_host_and_it_writes_nothing_more() {
    let mut rig = Rig::<4>::leased();
    rig.host.add_volume(vol(1), VIRTUAL, LIMIT, GIB, 0).unwrap();
    rig.start(at(0));
    let mut other = header_of(&rig.inbox[..RECORD_LEN]);
    other.owner = 42;
    let record = other.to_bytes().unwrap();
    let _ = rig.host.poll_read(at(1000));
    rig.host.handle_inbox_header(at(1000), &record);
    assert!(rig.host.is_evicted());
    assert!(
        rig.host
            .poll_event()
            .into_iter()
            .any(|e| e == HostEvent::Evicted { owner: 42 })
    );
    rig.host.handle_allocation(at(1001), vol(1), GIB);
    assert_eq!(rig.host.poll_write(), None);
    assert_eq!(rig.host.poll_read(at(5000)), None);
    assert_eq!(rig.host.poll_timeout(), None);
    assert_eq!(rig.host.release(), None);
}

#[test]
fn a_damaged_header_read_back_is_written_again_not_taken_as_another_owner() {
    let mut rig = Rig::<4>::leased();
    rig.start(at(0));
    let mut record = [0u8; RECORD_LEN];
    record.copy_from_slice(&rig.inbox[..RECORD_LEN]);
    record[50] ^= 1;
    let _ = rig.host.poll_read(at(1000));
    rig.host.handle_inbox_header(at(1000), &record);
    assert!(!rig.host.is_evicted());
    let w = rig.host.poll_write().unwrap();
    assert_eq!(w.offset, geometry().inbox_area(HostId::new(HOST)).unwrap());
    assert_eq!(header_of(&w.record).owner, OWNER);
}

#[test]
fn release_writes_a_header_with_no_heartbeat_interval() {
    let mut rig = Rig::<4>::leased();
    rig.start(at(0));
    let w = rig.host.release().unwrap();
    let h = header_of(&w.record);
    assert_eq!(h.heartbeat_interval_ms, 0);
    assert_eq!(h.owner, OWNER);
    assert_eq!(h.generation, Generation::new(1));
}

#[test]
fn the_lease_needs_an_owner() {
    let mut rig = Rig::<4>::leased();
    let (inbox, outbox) = (rig.inbox, rig.outbox);
    assert_eq!(
        rig.host.start(at(0), &inbox, &outbox, 0),
        Err(HostError::Owner)
    );
}

// ------------------------------------------------- holds and release acks

fn spm_header_releasing(release_commit: u64) -> [u8; RECORD_LEN] {
    SpmHeader {
        release_commit,
        ..SpmHeader::vacant(DOMAIN, Epoch::new(1))
    }
    .to_bytes()
    .unwrap()
}

#[test]
fn holds_fill_the_highest_slots_and_follow_add_and_remove() {
    let mut rig = Rig::<8>::new();
    for n in 1..=5 {
        rig.host.add_volume(vol(n), VIRTUAL, LIMIT, GIB, 0).unwrap();
    }
    rig.start(at(0));
    assert_eq!(rig.host.request_slots(), 29);
    assert_eq!(
        rig.hold(31).unwrap().held(),
        &[vol(1), vol(2), vol(3), vol(4)]
    );
    assert_eq!(rig.hold(30).unwrap().held(), &[vol(5)]);
    // Holds and requests share the area: requests read the holds as empty.
    assert_eq!(rig.request(31), None);
    rig.writes.clear();
    rig.host.add_volume(vol(6), VIRTUAL, LIMIT, GIB, 0).unwrap();
    assert!(rig.host.holds_pending());
    let writes = rig.flush();
    assert!(!rig.host.holds_pending());
    assert_eq!(writes.len(), 1);
    assert_eq!(writes[0].offset, inbox_slot_offset(30));
    assert_eq!(rig.hold(30).unwrap().held(), &[vol(5), vol(6)]);
    // Removing the first moves every later volume up, highest slot first.
    rig.host.remove_volume(at(1), vol(1)).unwrap();
    let offsets: Vec<u64> = rig.flush().iter().map(|w| w.offset).collect();
    assert_eq!(offsets, [inbox_slot_offset(31), inbox_slot_offset(30)]);
    assert_eq!(
        rig.hold(31).unwrap().held(),
        &[vol(2), vol(3), vol(4), vol(5)]
    );
    assert_eq!(rig.hold(30).unwrap().held(), &[vol(6)]);
    rig.host.remove_volume(at(2), vol(6)).unwrap();
    rig.flush();
    assert!(rig.slot_empty(30));
    assert_eq!(rig.hold(31).unwrap().generation, Generation::new(1));
}

#[test]
fn start_replaces_old_holds_and_keeps_the_release_ack() {
    let mut rig = Rig::<8>::new();
    rig.host.add_volume(vol(1), VIRTUAL, LIMIT, GIB, 0).unwrap();
    let old = InboxHeader {
        domain: DOMAIN,
        host_id: HostId::new(HOST),
        generation: Generation::new(4),
        owner: 0,
        heartbeat: 0,
        heartbeat_interval_ms: 0,
        release_ack: 9,
    };
    put(&mut rig.inbox, 0, old.to_bytes().unwrap());
    let stale = |slot: u16, held: &[Uuid]| {
        Hold::listing(
            DOMAIN,
            HostId::new(HOST),
            Slot::new(slot),
            Generation::new(6),
            held,
        )
        .to_bytes()
        .unwrap()
    };
    put(&mut rig.inbox, 30, stale(30, &[vol(7)]));
    put(&mut rig.inbox, 3, stale(3, &[vol(8)]));
    rig.start(at(0));
    // The stale holds name generation 6: the new one is above it.
    assert_eq!(rig.host.generation(), Generation::new(7));
    assert_eq!(rig.host.release_ack(), 9);
    let header = InboxHeader::parse(
        &rig.inbox[..RECORD_LEN],
        &Location {
            domain: DOMAIN,
            host_id: HostId::new(HOST),
            index: 0,
        },
    )
    .unwrap()
    .unwrap();
    assert_eq!(header.release_ack, 9);
    assert_eq!(rig.hold(31).unwrap().held(), &[vol(1)]);
    assert!(rig.slot_empty(30));
    assert!(rig.slot_empty(3));
}

#[test]
fn a_newer_release_commit_asks_once_for_a_refresh_of_every_map_then_is_acked() {
    let mut rig = Rig::<4>::one(0);
    rig.take_events();
    rig.host.handle_spm_header(at(1), &spm_header_releasing(0));
    assert!(rig.take_events().is_empty(), "nothing released yet");
    rig.host.handle_spm_header(at(2), &spm_header_releasing(5));
    assert_eq!(
        rig.take_events(),
        [HostEvent::RefreshAll { release_commit: 5 }]
    );
    rig.host.handle_spm_header(at(3), &spm_header_releasing(5));
    assert!(rig.take_events().is_empty(), "said once");
    rig.writes.clear();
    rig.host.handle_all_refreshed(at(4), 5);
    let writes = rig.flush();
    assert_eq!(writes.len(), 1);
    let header = InboxHeader::decode(&writes[0].record).unwrap().unwrap();
    assert_eq!(header.release_ack, 5);
    assert_eq!(rig.host.release_ack(), 5);
    rig.host.handle_spm_header(at(5), &spm_header_releasing(5));
    assert!(rig.take_events().is_empty());
    // Not done in time: said again after max_resend_timeout.
    rig.host.handle_spm_header(at(6), &spm_header_releasing(8));
    assert_eq!(
        rig.take_events(),
        [HostEvent::RefreshAll { release_commit: 8 }]
    );
    rig.host.handle_spm_header(at(7), &spm_header_releasing(8));
    assert!(rig.take_events().is_empty());
    rig.host
        .handle_spm_header(at(6 + 30_000), &spm_header_releasing(8));
    assert_eq!(
        rig.take_events(),
        [HostEvent::RefreshAll { release_commit: 8 }]
    );
}

/// Where in the interval host `HOST` of 8 reads the SPM header, in ms:
/// `(HOST - 1) / 8` of 1 s.
const PHASE: u64 = 1000 * (HOST as u64 - 1) / 8;

#[test]
fn the_spm_header_is_read_every_interval_even_when_idle() {
    let mut rig = Rig::<4>::one(0);
    assert_eq!(rig.host.poll_read(at(999 + PHASE)), None);
    assert_eq!(
        rig.host.poll_read(at(1000 + PHASE)),
        Some(HostRead::SpmHeader)
    );
    assert_eq!(rig.host.poll_timeout(), Some(at(2000 + PHASE)));
}

#[test]
fn hosts_started_together_read_the_spm_header_spread_over_the_interval() {
    let config = HostConfig {
        lease_interval: Duration::ZERO,
        ..HostConfig::default()
    };
    let mut first_reads = Vec::new();
    for id in 1..=8u16 {
        let mut host = Host::<4>::new(DOMAIN, HostId::new(id), geometry(), config).unwrap();
        host.start(at(0), &[0; AREA_SIZE], &[0; AREA_SIZE], 0)
            .unwrap();
        first_reads.push(host.poll_timeout().unwrap());
    }
    let expected: Vec<_> = (0..8u64).map(|i| at(1000 + 125 * i)).collect();
    assert_eq!(first_reads, expected);
}

#[test]
fn segments_full_is_final_until_a_refresh_changes_the_size() {
    let mut rig = Rig::<4>::one_quiet(GIB - MIB);
    rig.take_events();
    rig.answer(1, 1, ReplyStatus::Rejected(RejectReason::SegmentsFull), GIB);
    rig.deliver(at(1));
    assert_eq!(
        rig.take_events(),
        [HostEvent::SegmentsFull {
            volume: vol(1),
            size: GIB
        }]
    );
    assert!(rig.slot_empty(1));
    let v = rig.host.volume(vol(1)).unwrap();
    assert!(v.segments_full && !v.rejected);
    // No resend, no new request, however long and however full.
    rig.writes.clear();
    rig.host.handle_allocation(at(2), vol(1), GIB);
    rig.host.handle_timeout(at(100_000));
    rig.flush();
    assert!(rig.writes.is_empty(), "{:?}", rig.writes);
    assert_eq!(rig.host.in_flight(), 0);
    assert_eq!(
        rig.take_events(),
        [HostEvent::Paused { volume: vol(1) }],
        "the guest stays paused"
    );
    // The size changed (reduced and grown by another way, or moved): the
    // volume may ask again.
    rig.host
        .handle_refreshed(at(100_001), vol(1), GIB + 64 * MIB);
    rig.flush();
    assert_eq!(rig.host.in_flight(), 1);
}
