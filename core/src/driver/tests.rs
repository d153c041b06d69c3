//! The drivers on an in-memory disk with injected faults.

use core::cell::RefCell;
use core::time::Duration;

use super::*;
use crate::host::{Host, HostConfig, HostEvent};
use crate::spm::{Spm, SpmConfig, SpmWrite, settle};
use crate::testing::{MemDisk, Script, Shared, WriteFault};
use crate::time::Instant;
use crate::wire::{
    AREA_SIZE, DOORBELL_OFFSET, Doorbell, Geometry, HostId, OutboxArea, RECORD_LEN, ReplyStatus,
    SPM_HEADER_OFFSET, Slot, SlotState, SpmHeader, Uuid,
};

const DOMAIN: Uuid = Uuid([0xd0; 16]);
const GIB: u64 = 1 << 30;

type Disk = MemDisk<Vec<u8>, Script>;

fn disk(hosts: u16) -> (Geometry, RefCell<Disk>) {
    let g = Geometry::new(hosts, 512).unwrap();
    let bytes = vec![0u8; g.mailbox_size() as usize];
    (g, RefCell::new(MemDisk::new(bytes, 512, Script::default())))
}

fn poke(d: &RefCell<Disk>, offset: u64, byte: u8) {
    d.borrow_mut().bytes_mut()[offset as usize] = byte;
}

fn peek(d: &RefCell<Disk>, offset: u64, len: usize) -> Vec<u8> {
    d.borrow().bytes()[offset as usize..offset as usize + len].to_vec()
}

fn spm(g: Geometry) -> Spm<64> {
    Spm::new(
        Instant::ZERO,
        DOMAIN,
        g,
        HostId::NONE,
        1,
        None,
        SpmConfig::default(),
    )
    .unwrap()
}

fn write(offset: u64, byte: u8) -> SpmWrite {
    SpmWrite {
        offset,
        record: [byte; RECORD_LEN],
    }
}

#[test]
fn outbox_areas_of_hosts_without_requests_are_not_read_and_given_as_zeros() {
    let (g, d) = disk(8);
    // Host 3 has something in a slot; host 5 has none but something in
    // its outbox.
    poke(
        &d,
        g.inbox_area(HostId::new(3)).unwrap() + RECORD_LEN as u64,
        1,
    );
    poke(&d, g.outbox_area(HostId::new(3)).unwrap() + 7, 3);
    poke(&d, g.outbox_area(HostId::new(5)).unwrap() + 7, 5);
    let buf = vec![0u8; SpmDriver::<Shared<'_, Disk>, Vec<u8>, 64>::buffer_len(&g, 8, true)];
    let mut drv = SpmDriver::new(Shared(&d), spm(g), buf, 8, true).unwrap();
    drv.read_chunk(Instant::ZERO, HostId::new(1), 8).unwrap();
    let view = &drv.buf[drv.parts.view.clone()];
    assert_eq!(view[2 * AREA_SIZE + 7], 3, "host 3's outbox is read");
    assert_eq!(view[4 * AREA_SIZE + 7], 0, "host 5's is not");
    assert_eq!(drv.stats().reads, 2, "the inboxes, then host 3's outbox");
    assert_eq!(drv.stats().read_bytes, 9 * AREA_SIZE as u64);
}

#[test]
fn a_full_scan_in_chunks_reads_every_host_once() {
    let (g, d) = disk(10);
    let buf = vec![0u8; SpmDriver::<Shared<'_, Disk>, Vec<u8>, 64>::buffer_len(&g, 4, false)];
    let mut drv = SpmDriver::new(Shared(&d), spm(g), buf, 4, false).unwrap();
    drv.read_one(
        Instant::ZERO,
        crate::spm::SpmIo::ReadHosts {
            first_host: HostId::new(1),
            count: 10,
        },
    )
    .unwrap();
    assert_eq!(drv.stats().reads, 3, "hosts 1-4, 5-8, 9-10");
    assert_eq!(drv.stats().read_bytes, 10 * AREA_SIZE as u64);
}

#[test]
fn replies_are_written_without_reading_and_merged_only_through_known_areas() {
    let (g, d) = disk(16);
    for h in [1u16, 2, 3, 5] {
        poke(
            &d,
            g.inbox_area(HostId::new(h)).unwrap() + RECORD_LEN as u64,
            1,
        );
    }
    // Host 4's outbox is never read (it has no request), and what it holds
    // must survive writes on both sides of it.
    poke(&d, g.outbox_area(HostId::new(4)).unwrap() + 300, 0x44);
    let buf = vec![0u8; SpmDriver::<Shared<'_, Disk>, Vec<u8>, 64>::buffer_len(&g, 16, true)];
    let mut drv = SpmDriver::new(Shared(&d), spm(g), buf, 16, true).unwrap();
    drv.read_chunk(Instant::ZERO, HostId::new(1), 3).unwrap();
    drv.read_chunk(Instant::ZERO, HostId::new(5), 1).unwrap();
    let reads = drv.stats().reads;
    let slot = |h: u16, s: u64| g.outbox_area(HostId::new(h)).unwrap() + s * RECORD_LEN as u64;
    for w in [
        write(slot(1, 1), 0xa1),
        write(slot(2, 5), 0xa2),
        write(slot(3, 1), 0xa3),
        write(slot(5, 2), 0xa5),
    ] {
        drv.stage(w).unwrap();
    }
    drv.flush_staged().unwrap();
    assert_eq!(drv.stats().reads, reads, "no read before a write");
    assert_eq!(
        drv.stats().writes,
        2,
        "hosts 1 to 3 in one run; host 5 apart, as host 4 is not known"
    );
    for (h, s, b) in [(1, 1, 0xa1), (2, 5, 0xa2), (3, 1, 0xa3), (5, 2, 0xa5)] {
        assert_eq!(peek(&d, slot(h, s), RECORD_LEN), vec![b; RECORD_LEN]);
    }
    assert_eq!(
        peek(&d, g.outbox_area(HostId::new(4)).unwrap() + 300, 1),
        [0x44]
    );
    // A reply to a host never read: its area is read first, once.
    poke(&d, g.outbox_area(HostId::new(9)).unwrap() + 1000, 0x99);
    drv.stage(write(slot(9, 1), 0xb9)).unwrap();
    drv.flush_staged().unwrap();
    assert_eq!(drv.stats().reads, reads + 1);
    assert_eq!(
        peek(&d, g.outbox_area(HostId::new(9)).unwrap() + 1000, 1),
        [0x99]
    );
    assert_eq!(peek(&d, slot(9, 1), RECORD_LEN), vec![0xb9; RECORD_LEN]);
}

#[test]
fn records_outside_the_outboxes_keep_their_neighbours() {
    for mirror in [true, false] {
        let (g, d) = disk(4);
        let neighbour = SPM_HEADER_OFFSET + RECORD_LEN as u64;
        poke(&d, neighbour, 0x77);
        let buf = vec![0u8; SpmDriver::<Shared<'_, Disk>, Vec<u8>, 64>::buffer_len(&g, 4, mirror)];
        let mut drv = SpmDriver::new(Shared(&d), spm(g), buf, 4, mirror).unwrap();
        drv.stage(write(SPM_HEADER_OFFSET, 0x5a)).unwrap();
        drv.flush_staged().unwrap();
        assert_eq!(peek(&d, SPM_HEADER_OFFSET, 4), [0x5a; 4]);
        assert_eq!(peek(&d, neighbour, 1), [0x77]);
    }
}

#[test]
fn a_write_that_failed_is_made_whole_by_the_next_one() {
    for mirror in [true, false] {
        let (g, d) = disk(4);
        let buf = vec![0u8; SpmDriver::<Shared<'_, Disk>, Vec<u8>, 64>::buffer_len(&g, 4, mirror)];
        let mut drv = SpmDriver::new(Shared(&d), spm(g), buf, 4, mirror).unwrap();
        drv.read_chunk(Instant::ZERO, HostId::new(1), 4).unwrap();
        let at = g.outbox_area(HostId::new(2)).unwrap() + RECORD_LEN as u64;
        drv.stage(write(at, 1)).unwrap();
        d.borrow_mut().faults.fail_writes = 1;
        assert!(drv.flush_staged().is_err());
        assert!(drv.writes_pending(), "mirror {mirror}");
        // A newer record for the same slot replaces the one that waits.
        drv.stage(write(at, 2)).unwrap();
        drv.flush_staged().unwrap();
        assert!(!drv.writes_pending());
        assert_eq!(peek(&d, at, RECORD_LEN), vec![2; RECORD_LEN]);
    }
}

#[test]
fn a_read_that_failed_is_done_again_first() {
    let (g, d) = disk(4);
    let buf = vec![0u8; SpmDriver::<Shared<'_, Disk>, Vec<u8>, 64>::buffer_len(&g, 4, true)];
    let mut drv = SpmDriver::new(Shared(&d), spm(g), buf, 4, true).unwrap();
    // Its header, then settle.
    drv.write().unwrap();
    let now = Instant::ZERO + settle(&SpmConfig::default());
    d.borrow_mut().faults.fail_reads = 1;
    assert!(drv.read(now).is_err());
    assert!(!drv.engine().is_confirmed());
    drv.read(now).unwrap();
    assert!(drv.engine().is_confirmed(), "the header read, done again");
}

/// A host and an SPM, each through its driver, on one disk.
struct Pair<'a> {
    host: HostDriver<Shared<'a, Disk>, Vec<u8>, 4>,
    spm: SpmDriver<Shared<'a, Disk>, Vec<u8>, 64>,
    now: Instant,
    physical: u64,
}

const VOLUME: Uuid = Uuid([7; 16]);

impl<'a> Pair<'a> {
    fn new(g: Geometry, d: &'a RefCell<Disk>) -> Pair<'a> {
        let hb = vec![0u8; HostDriver::<Shared<'_, Disk>, Vec<u8>, 4>::BUFFER_LEN];
        let sb = vec![0u8; SpmDriver::<Shared<'_, Disk>, Vec<u8>, 64>::buffer_len(&g, 4, true)];
        let mut host: Host<4> =
            Host::new(DOMAIN, HostId::new(2), g, HostConfig::default()).unwrap();
        host.add_volume(VOLUME, 100 * GIB, 110 * GIB, GIB, 0)
            .unwrap();
        let mut host = HostDriver::new(Shared(d), host, hb).unwrap();
        host.start(Instant::ZERO, 9).unwrap().unwrap();
        let spm = SpmDriver::new(Shared(d), spm(g), sb, 4, true).unwrap();
        Pair {
            host,
            spm,
            now: Instant::ZERO,
            physical: GIB,
        }
    }

    /// One step of each, the SPM extending at once; then time moves 1 ms.
    fn step(&mut self) {
        let now = self.now;
        self.host.step(now).unwrap();
        while let Some(e) = self.host.engine_mut().poll_event() {
            if let HostEvent::Refresh { volume, size } = e {
                self.physical = size;
                self.host.engine_mut().handle_refreshed(now, volume, size);
            }
        }
        self.spm.read(now).unwrap();
        while let Some(job) = self.spm.engine_mut().poll_job() {
            let size = job.target_size;
            self.spm.engine_mut().handle_job_result(
                now,
                job.volume,
                crate::spm::JobResult::Extended { size },
            );
        }
        if self.spm.poll_commit(now).unwrap().is_some() {
            self.spm.engine_mut().handle_committed(now, 1);
        }
        self.spm.write().unwrap();
        self.now = now + Duration::from_millis(1);
    }
}

#[test]
fn a_host_and_an_spm_through_their_drivers_extend_a_volume() {
    let (g, d) = disk(4);
    let mut pair = Pair::new(g, &d);
    for _ in 0..1600 {
        pair.step();
    }
    let now = pair.now;
    pair.host
        .engine_mut()
        .handle_allocation(now, VOLUME, GIB - (1 << 20));
    for _ in 0..50 {
        pair.step();
    }
    assert!(pair.physical > GIB, "extended: {}", pair.physical);
    let outbox = peek(&d, g.outbox_area(HostId::new(2)).unwrap(), AREA_SIZE);
    let area = OutboxArea::new(&outbox, DOMAIN, HostId::new(2)).unwrap();
    assert!(matches!(
        area.slot(Slot::new(1)),
        Some(SlotState::Valid(r)) if r.status == ReplyStatus::Extended
    ));
}

#[test]
fn the_doorbell_is_written_only_after_the_area_it_announces() {
    let (g, d) = disk(4);
    let buf = vec![0u8; HostDriver::<Shared<'_, Disk>, Vec<u8>, 4>::BUFFER_LEN];
    let mut host: Host<4> = Host::new(DOMAIN, HostId::new(2), g, HostConfig::default()).unwrap();
    host.add_volume(VOLUME, 100 * GIB, 110 * GIB, GIB, 0)
        .unwrap();
    let mut drv = HostDriver::new(Shared(&d), host, buf).unwrap();
    drv.start(Instant::ZERO, 9).unwrap().unwrap();
    drv.step(Instant::ZERO).unwrap();
    drv.engine_mut()
        .handle_allocation(Instant::ZERO, VOLUME, GIB - (1 << 20));
    d.borrow_mut().faults.fail_writes = 1;
    assert!(drv.write().is_err());
    let bell = peek(&d, DOORBELL_OFFSET, RECORD_LEN);
    assert!(
        bell.iter().all(|&b| b == 0),
        "no ring for a request not on disk"
    );
    assert!(drv.writes_pending());
    drv.write().unwrap();
    let bell = peek(&d, DOORBELL_OFFSET, RECORD_LEN);
    let ring = Doorbell::decode(&bell).unwrap().unwrap();
    assert_eq!(ring.ringer, HostId::new(2));
    let inbox = peek(&d, g.inbox_area(HostId::new(2)).unwrap(), AREA_SIZE);
    assert!(inbox[RECORD_LEN..].iter().any(|&b| b != 0), "the request");
}

#[test]
fn a_torn_area_write_is_repaired_by_the_next_write_of_the_whole_area() {
    let (g, d) = disk(4);
    let buf = vec![0u8; HostDriver::<Shared<'_, Disk>, Vec<u8>, 4>::BUFFER_LEN];
    let mut host: Host<4> = Host::new(DOMAIN, HostId::new(2), g, HostConfig::default()).unwrap();
    host.add_volume(VOLUME, 100 * GIB, 110 * GIB, GIB, 0)
        .unwrap();
    let mut drv = HostDriver::new(Shared(&d), host, buf).unwrap();
    drv.start(Instant::ZERO, 9).unwrap().unwrap();
    d.borrow_mut().faults.then = WriteFault::Torn { sectors: 0 };
    drv.step(Instant::ZERO).unwrap();
    let at = g.inbox_area(HostId::new(2)).unwrap();
    assert!(
        peek(&d, at, RECORD_LEN).iter().all(|&b| b == 0),
        "torn away"
    );
    d.borrow_mut().faults.then = WriteFault::None;
    drv.engine_mut()
        .handle_allocation(Instant::ZERO, VOLUME, GIB - (1 << 20));
    drv.write().unwrap();
    assert!(
        peek(&d, at, RECORD_LEN).iter().any(|&b| b != 0),
        "the header, written again with the request"
    );
}

#[test]
fn a_buffer_too_small_or_a_sector_size_that_differs_is_refused() {
    let (g, d) = disk(4);
    let small = vec![0u8; 100];
    assert!(matches!(
        SpmDriver::new(Shared(&d), spm(g), small, 4, true),
        Err(DriverError::BufferTooSmall { .. })
    ));
    let g4k = Geometry::new(4, 4096).unwrap();
    let buf = vec![0u8; SpmDriver::<Shared<'_, Disk>, Vec<u8>, 64>::buffer_len(&g4k, 4, true)];
    assert!(matches!(
        SpmDriver::new(Shared(&d), spm(g4k), buf, 4, true),
        Err(DriverError::SectorSize {
            device: 512,
            mailbox: 4096
        })
    ));
}

#[test]
fn a_read_of_an_area_keeps_the_replies_not_yet_written_to_it() {
    let (g, d) = disk(4);
    poke(
        &d,
        g.inbox_area(HostId::new(2)).unwrap() + RECORD_LEN as u64,
        1,
    );
    let buf = vec![0u8; SpmDriver::<Shared<'_, Disk>, Vec<u8>, 64>::buffer_len(&g, 4, true)];
    let mut drv = SpmDriver::new(Shared(&d), spm(g), buf, 4, true).unwrap();
    drv.read_chunk(Instant::ZERO, HostId::new(1), 4).unwrap();
    let at = g.outbox_area(HostId::new(2)).unwrap() + RECORD_LEN as u64;
    drv.stage(write(at, 0xc2)).unwrap();
    d.borrow_mut().faults.fail_writes = 1;
    assert!(drv.flush_staged().is_err());
    // The next scan reads host 2's outbox (still the old bytes on disk)...
    drv.read_chunk(Instant::ZERO, HostId::new(1), 4).unwrap();
    let view = &drv.buf[drv.parts.view.clone()];
    assert_eq!(
        view[AREA_SIZE + RECORD_LEN],
        0xc2,
        "...and the engine sees the reply that waits, not the disk's old slot"
    );
    drv.flush_staged().unwrap();
    assert_eq!(peek(&d, at, RECORD_LEN), vec![0xc2; RECORD_LEN]);
}

#[test]
fn a_stalled_spm_that_stops_reads_the_header_and_leaves_a_newer_spms_alone() {
    let (g, d) = disk(4);
    let buf = vec![0u8; SpmDriver::<Shared<'_, Disk>, Vec<u8>, 64>::buffer_len(&g, 4, true)];
    let mut drv = SpmDriver::new(Shared(&d), spm(g), buf, 4, true).unwrap();
    drv.write().unwrap();
    let now = Instant::ZERO + settle(&SpmConfig::default());
    drv.read(now).unwrap();
    drv.write().unwrap();
    assert!(drv.engine().is_confirmed());
    // The SPM stalls for longer than the fence while another SPM takes
    // over the header.
    let late = now + SpmConfig::default().heartbeat_interval * 3;
    let mut newer =
        SpmHeader::decode(&d.borrow().bytes()[SPM_HEADER_OFFSET as usize..][..RECORD_LEN])
            .unwrap()
            .unwrap();
    newer.epoch = newer.epoch.next().unwrap();
    newer.owner = 0xbeef;
    let record = newer.to_bytes().unwrap();
    d.borrow_mut().bytes_mut()[SPM_HEADER_OFFSET as usize..][..RECORD_LEN].copy_from_slice(&record);
    drv.engine_mut().handle_timeout(late);
    assert!(drv.engine().is_fenced());
    assert!(!drv.stop(late).unwrap(), "deposed: it does not vacate");
    assert_eq!(
        &d.borrow().bytes()[SPM_HEADER_OFFSET as usize..][..RECORD_LEN],
        &record[..],
        "the newer SPM's header stays"
    );
}

#[test]
fn a_new_spm_starts_above_every_epoch_in_the_outbox_read_in_any_run_length() {
    use crate::spm::start_header;
    use crate::wire::{Epoch, Generation, OutboxHeader, Reply, Request};
    let (g, d) = disk(9);
    let request = |host: u16, slot: u16| Request {
        domain: DOMAIN,
        host_id: HostId::new(host),
        slot: Slot::new(slot),
        generation: Generation::new(3),
        sequence: 1,
        volume: Uuid([0x42; 16]),
        target_size: GIB,
        current_size: 0,
        paused: false,
    };
    // Host 2: a header of epoch 4. Host 9 (the last): a stale reply of
    // epoch 7 under no header at all.
    let header = OutboxHeader {
        domain: DOMAIN,
        host_id: HostId::new(2),
        epoch: Epoch::new(4),
        generation: Generation::new(3),
    };
    let at2 = g.outbox_area(HostId::new(2)).unwrap() as usize;
    d.borrow_mut().bytes_mut()[at2..at2 + RECORD_LEN].copy_from_slice(&header.to_bytes().unwrap());
    let reply = Reply::answering(
        &request(9, 31),
        ReplyStatus::Failed { code: 5 },
        0,
        Epoch::new(7),
    );
    let at9 = g.outbox_area(HostId::new(9)).unwrap() as usize + 31 * RECORD_LEN;
    d.borrow_mut().bytes_mut()[at9..at9 + RECORD_LEN].copy_from_slice(&reply.to_bytes().unwrap());
    for areas in [1, 2, 4, 9, 16] {
        let mut buffer = vec![0u8; areas * AREA_SIZE];
        let newest = newest_outbox_epoch(&mut *d.borrow_mut(), &g, DOMAIN, &mut buffer).unwrap();
        assert_eq!(newest, Some(Epoch::new(7)), "{areas} areas per read");
    }
    // The SPM header found says epoch 5: the new SPM runs at 8.
    let found = SpmHeader {
        domain: DOMAIN,
        epoch: Epoch::new(5),
        spm_id: HostId::NONE,
        state: crate::wire::SpmState::Vacant,
        heartbeat_interval_ms: 0,
        heartbeat: 0,
        owner: 0,
        pool_commit: 11,
        release_commit: 0,
    };
    let start = start_header(Some(found), Epoch::new(7), DOMAIN);
    let engine: Spm<64> = Spm::new(
        Instant::ZERO,
        DOMAIN,
        g,
        HostId::NONE,
        1,
        start.as_ref(),
        SpmConfig::default(),
    )
    .unwrap();
    assert_eq!(engine.epoch(), Epoch::new(8));
    assert_eq!(engine.pool_commit(), 11);
    // Nothing found at all: a vacant header at the floor, or none.
    assert_eq!(
        start_header(None, Epoch::new(7), DOMAIN).map(|h| h.epoch),
        Some(Epoch::new(7))
    );
    assert_eq!(start_header(None, Epoch::ZERO, DOMAIN), None);
    // A buffer without room for one area is refused, not read short.
    let mut small = vec![0u8; AREA_SIZE - 512];
    assert!(matches!(
        newest_outbox_epoch(&mut *d.borrow_mut(), &g, DOMAIN, &mut small),
        Err(StartError::Driver(DriverError::BufferTooSmall {
            needed: AREA_SIZE
        }))
    ));
}

#[test]
fn a_clean_stop_releases_the_host_id_and_leaves_no_hold_behind() {
    let (g, d) = disk(4);
    let buf = vec![0u8; HostDriver::<Shared<'_, Disk>, Vec<u8>, 4>::BUFFER_LEN];
    let mut host: Host<4> = Host::new(DOMAIN, HostId::new(2), g, HostConfig::default()).unwrap();
    host.add_volume(VOLUME, 100 * GIB, 110 * GIB, GIB, 0)
        .unwrap();
    let mut drv = HostDriver::new(Shared(&d), host, buf).unwrap();
    drv.start(Instant::ZERO, 9).unwrap().unwrap();
    drv.write().unwrap();
    let at = g.inbox_area(HostId::new(2)).unwrap();
    let holds = |d: &RefCell<Disk>| {
        let area = peek(d, at, AREA_SIZE);
        let view = crate::wire::HoldArea::new(&area, DOMAIN, HostId::new(2)).unwrap();
        view.slots()
            .filter_map(|(_, s)| match s {
                SlotState::Valid(h) => Some(h.held().to_vec()),
                _ => None,
            })
            .flatten()
            .collect::<std::vec::Vec<Uuid>>()
    };
    assert_eq!(holds(&d), [VOLUME], "a running host holds its volume");
    drv.release().unwrap();
    assert!(holds(&d).is_empty(), "a stopped host holds nothing");
    let area = peek(&d, at, AREA_SIZE);
    let header = crate::wire::InboxHeader::decode(&area[..RECORD_LEN])
        .unwrap()
        .unwrap();
    assert_eq!(header.heartbeat_interval_ms, 0, "the host id is released");
}
