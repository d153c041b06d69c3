//! The SPM engine against an in-memory mailbox: what it reads, which jobs
//! it runs and what it writes, in simulated time.

use std::time::Duration;

use spmbox_core::spm::Job;
use spmbox_core::spm::{JobResult, Spm, SpmConfig, SpmEvent, SpmIo, settle};
use spmbox_core::time::Instant;
use spmbox_core::wire::{
    AREA_SIZE, DOORBELL_OFFSET, Doorbell, Epoch, Generation, Geometry, Hold, HostId, InboxHeader,
    OutboxArea, RECORD_LEN, Reply, ReplyStatus, Request, SPM_HEADER_OFFSET, Slot, SlotState,
    SpmHeader, SpmState, Uuid,
};

const DOMAIN: Uuid = Uuid([0xd0; 16]);

struct Disk {
    geometry: Geometry,
    bytes: Vec<u8>,
}

impl Disk {
    fn new(hosts: u16) -> Disk {
        let geometry = Geometry::new(hosts, 512).unwrap();
        Disk {
            geometry,
            bytes: vec![0; geometry.mailbox_size() as usize],
        }
    }

    fn put(&mut self, offset: u64, record: &[u8; RECORD_LEN]) {
        let o = offset as usize;
        self.bytes[o..o + RECORD_LEN].copy_from_slice(record);
    }

    fn record(&self, offset: u64) -> &[u8] {
        &self.bytes[offset as usize..offset as usize + RECORD_LEN]
    }

    fn host_start(&mut self, host_id: u16, generation: u64) {
        let at = self.geometry.inbox_area(HostId::new(host_id)).unwrap();
        self.put(
            at,
            &InboxHeader {
                domain: DOMAIN,
                host_id: HostId::new(host_id),
                generation: Generation::new(generation),
                owner: 0,
                heartbeat: 0,
                heartbeat_interval_ms: 0,
                release_ack: 0,
            }
            .to_bytes()
            .unwrap(),
        );
    }

    fn send(&mut self, r: &Request) {
        let at = self.geometry.inbox_area(r.host_id).unwrap()
            + u64::from(r.slot.get()) * RECORD_LEN as u64;
        self.put(at, &r.to_bytes().unwrap());
    }

    fn ring(&mut self, r: &Request) {
        self.ring_again(r, 1);
    }

    /// The `rings`-th ring for request `r` since it was written.
    fn ring_again(&mut self, r: &Request, rings: u16) {
        let bell = Doorbell {
            domain: DOMAIN,
            ringer: r.host_id,
            generation: r.generation,
            sequence: r.sequence,
            rings,
        };
        self.put(DOORBELL_OFFSET, &bell.to_bytes().unwrap());
    }

    fn reply(&self, host_id: u16, slot: u16) -> SlotState<Reply> {
        let at = self.geometry.outbox_area(HostId::new(host_id)).unwrap() as usize;
        OutboxArea::new(
            &self.bytes[at..at + AREA_SIZE],
            DOMAIN,
            HostId::new(host_id),
        )
        .unwrap()
        .slot(Slot::new(slot))
        .unwrap()
    }

    fn region(&self, start: u64, first: u16, count: u16) -> &[u8] {
        let from = start as usize + (usize::from(first) - 1) * AREA_SIZE;
        &self.bytes[from..from + usize::from(count) * AREA_SIZE]
    }
}

fn request(host_id: u16, slot: u16, volume: u8, target_gib: u64) -> Request {
    Request {
        domain: DOMAIN,
        host_id: HostId::new(host_id),
        slot: Slot::new(slot),
        generation: Generation::new(1),
        sequence: 1,
        volume: Uuid([volume; 16]),
        target_size: target_gib << 30,
        current_size: 1 << 30,
        paused: false,
    }
}

/// Does one read the engine asked for at `now`.
fn read_one(spm: &mut Spm<64>, disk: &Disk, io: SpmIo, now: Instant) {
    match io {
        SpmIo::ReadDoorbell => spm.handle_doorbell(now, disk.record(DOORBELL_OFFSET)),
        SpmIo::ReadSpmHeader => spm.handle_spm_header(now, disk.record(SPM_HEADER_OFFSET)),
        SpmIo::ReadHosts { first_host, count } => {
            let g = disk.geometry;
            let inbox = disk
                .region(g.inbox_offset(), first_host.get(), count)
                .to_vec();
            let outbox = disk
                .region(g.outbox_offset(), first_host.get(), count)
                .to_vec();
            spm.handle_hosts(now, first_host, &inbox, &outbox);
        }
    }
}

/// Does every read the engine asks for at `now`; whether there was one.
fn read_all(spm: &mut Spm<64>, disk: &Disk, now: Instant) -> bool {
    let mut any = false;
    while let Some(io) = spm.poll_io(now) {
        any = true;
        read_one(spm, disk, io, now);
    }
    any
}

/// Runs the engine's reads, commits and writes at `now` until it has
/// nothing more to do; returns the jobs it handed out.
fn step(spm: &mut Spm<64>, disk: &mut Disk, now: Instant) -> Vec<Job> {
    let mut jobs = Vec::new();
    loop {
        let mut progressed = read_all(spm, disk, now);
        // A commit (of memory: these tests keep no pool on disk), after
        // the fencing read the engine asks for.
        let mut commit = spm.poll_commit();
        if commit.is_none() && spm.commit_pending() && read_all(spm, disk, now) {
            commit = spm.poll_commit();
        }
        if commit.is_some() {
            progressed = true;
            spm.handle_committed(now, 0);
        }
        while let Some(w) = spm.poll_write() {
            progressed = true;
            disk.put(w.offset, &w.record);
        }
        while let Some(job) = spm.poll_job() {
            progressed = true;
            jobs.push(job);
        }
        if !progressed {
            return jobs;
        }
    }
}

/// Runs [`step`] at `now`, extending every job to its target, until the
/// engine has nothing more to do.
fn step_extending(spm: &mut Spm<64>, disk: &mut Disk, now: Instant) {
    let mut jobs = step(spm, disk, now);
    while !jobs.is_empty() {
        for job in jobs {
            spm.handle_job_result(
                now,
                job.volume,
                JobResult::Extended {
                    size: job.target_size,
                },
            );
        }
        jobs = step(spm, disk, now);
    }
}

/// An SPM that started one settle time before `now`, wrote its header,
/// and at `now` reads it back and may act: what the SPM does from then on
/// is what the tests look at.
fn start(disk: &mut Disk, now: Instant) -> Spm<64> {
    start_as(disk, now, 0x5EED)
}

fn start_as(disk: &mut Disk, now: Instant, owner: u64) -> Spm<64> {
    let found = SpmHeader::decode(disk.record(SPM_HEADER_OFFSET)).unwrap();
    let config = SpmConfig::default();
    let born = Instant(now.0 - settle(&config).as_micros() as u64);
    let mut spm = Spm::new(
        born,
        DOMAIN,
        disk.geometry,
        HostId::NONE,
        owner,
        found.as_ref(),
        config,
    )
    .unwrap();
    assert_eq!(
        spm.poll_io(born),
        None,
        "nothing is read before the header is back"
    );
    assert_eq!(spm.poll_job(), None);
    while let Some(w) = spm.poll_write() {
        disk.put(w.offset, &w.record);
    }
    assert!(!spm.is_confirmed());
    assert_eq!(spm.poll_io(now), Some(SpmIo::ReadSpmHeader));
    spm.handle_spm_header(now, disk.record(SPM_HEADER_OFFSET));
    spm
}

/// Test time: `n` ms after the first SPM's settle time.
fn ms(n: u64) -> Instant {
    Instant(settle(&SpmConfig::default()).as_micros() as u64 + n * 1000)
}

#[test]
fn a_starting_spm_writes_its_header_with_the_next_epoch() {
    let mut disk = Disk::new(4);
    let mut spm = start(&mut disk, ms(0));
    step(&mut spm, &mut disk, ms(0));
    let header = SpmHeader::decode(disk.record(SPM_HEADER_OFFSET))
        .unwrap()
        .unwrap();
    assert_eq!(
        (header.epoch, header.state),
        (Epoch::new(1), SpmState::Active)
    );
    let again = start(&mut disk, ms(1));
    assert_eq!(again.epoch(), Epoch::new(2));
}

#[test]
fn a_stopping_spm_vacates_the_mailbox_and_then_does_nothing() {
    let mut disk = Disk::new(4);
    let mut spm = start(&mut disk, ms(0));
    step(&mut spm, &mut disk, ms(0));
    let w = spm.vacate().expect("an active SPM vacates");
    disk.put(w.offset, &w.record);
    let header = SpmHeader::decode(disk.record(SPM_HEADER_OFFSET))
        .unwrap()
        .unwrap();
    assert_eq!(
        (header.epoch, header.state),
        (Epoch::new(1), SpmState::Vacant)
    );
    disk.host_start(1, 1);
    disk.send(&request(1, 1, 7, 2));
    assert!(step(&mut spm, &mut disk, ms(20_000)).is_empty());
    assert_eq!(spm.poll_timeout(), None);
    assert_eq!(spm.vacate(), None, "only once");
    // The next SPM takes the next epoch.
    assert_eq!(start(&mut disk, ms(1)).epoch(), Epoch::new(2));
}

#[test]
fn a_request_is_extended_and_answered_in_its_slot() {
    let mut disk = Disk::new(4);
    disk.host_start(3, 1);
    let r = request(3, 2, 7, 2);
    disk.send(&r);
    let mut spm = start(&mut disk, ms(0));
    let jobs = step(&mut spm, &mut disk, ms(0));
    assert_eq!(
        jobs,
        vec![Job {
            volume: r.volume,
            target_size: r.target_size,
            urgent: false
        }]
    );
    spm.handle_job_result(ms(1), r.volume, JobResult::Extended { size: 2 << 30 });
    step(&mut spm, &mut disk, ms(1));
    let SlotState::Valid(reply) = disk.reply(3, 2) else {
        panic!("no valid reply: {:?}", disk.reply(3, 2))
    };
    assert!(reply.answers(&r));
    assert_eq!(
        (reply.status, reply.size, reply.epoch),
        (ReplyStatus::Extended, 2 << 30, Epoch::new(1))
    );
    assert!(spm.queue_len() == 0);
}

#[test]
fn an_answered_request_is_not_run_again_on_the_next_scan() {
    let mut disk = Disk::new(4);
    disk.host_start(1, 1);
    let r = request(1, 1, 7, 2);
    disk.send(&r);
    let mut spm = start(&mut disk, ms(0));
    assert_eq!(step(&mut spm, &mut disk, ms(0)).len(), 1);
    spm.handle_job_result(ms(1), r.volume, JobResult::Extended { size: 2 << 30 });
    step(&mut spm, &mut disk, ms(1));
    // The host has not consumed the reply yet; a full scan sees both.
    let later = ms(0) + SpmConfig::default().full_scan_interval;
    assert!(step(&mut spm, &mut disk, later).is_empty());
    // A new SPM sees it too and does nothing either.
    let mut next = start(&mut disk, later);
    assert!(step(&mut next, &mut disk, later).is_empty());
}

#[test]
fn the_doorbell_brings_a_request_in_before_the_next_full_scan() {
    let mut disk = Disk::new(8);
    let mut spm = start(&mut disk, ms(0));
    step(&mut spm, &mut disk, ms(0));
    disk.host_start(5, 1);
    let r = request(5, 1, 9, 2);
    disk.send(&r);
    disk.ring(&r);
    let jobs = step(&mut spm, &mut disk, ms(5));
    assert_eq!(
        jobs.len(),
        1,
        "the ring at 5 ms is read by the doorbell poll"
    );
    assert_eq!(spm.stats().targeted_reads, 1);
    assert_eq!(spm.stats().full_scans, 1, "only the scan at start");
}

#[test]
fn without_room_a_request_waits_and_is_completed_when_capacity_arrives() {
    let mut disk = Disk::new(4);
    disk.host_start(2, 1);
    let mut r = request(2, 1, 4, 3);
    r.paused = true;
    disk.send(&r);
    let mut spm = start(&mut disk, ms(0));
    let jobs = step(&mut spm, &mut disk, ms(0));
    assert!(jobs[0].urgent, "a paused guest's job is urgent");
    spm.handle_job_result(ms(1), r.volume, JobResult::NoSpace { size: 1 << 30 });
    step(&mut spm, &mut disk, ms(1));
    let SlotState::Valid(waiting) = disk.reply(2, 1) else {
        panic!()
    };
    assert_eq!(waiting.status, ReplyStatus::WaitingForSpace);

    // A restarted SPM re-offers the parked request; the backend parks it
    // again; no second "waiting" reply is written.
    let mut next = start(&mut disk, ms(10));
    let jobs = step(&mut next, &mut disk, ms(10));
    assert_eq!(jobs.len(), 1);
    next.handle_job_result(ms(11), r.volume, JobResult::NoSpace { size: 1 << 30 });
    let replies = next.stats().replies;
    step(&mut next, &mut disk, ms(11));
    assert_eq!(next.stats().replies, replies);

    next.handle_capacity(ms(20), r.volume, 3 << 30);
    step(&mut next, &mut disk, ms(20));
    let SlotState::Valid(done) = disk.reply(2, 1) else {
        panic!()
    };
    assert_eq!(
        (done.status, done.size, done.epoch),
        (ReplyStatus::Extended, 3 << 30, Epoch::new(2))
    );
}

#[test]
fn requests_for_one_volume_share_one_job_and_its_result() {
    let mut disk = Disk::new(4);
    disk.host_start(1, 1);
    disk.host_start(2, 1);
    let a = request(1, 1, 5, 2);
    let b = request(2, 3, 5, 4);
    disk.send(&a);
    disk.send(&b);
    let mut spm = start(&mut disk, ms(0));
    let jobs = step(&mut spm, &mut disk, ms(0));
    assert_eq!(
        jobs,
        vec![Job {
            volume: a.volume,
            target_size: 4 << 30,
            urgent: false
        }]
    );
    spm.handle_job_result(ms(1), a.volume, JobResult::Extended { size: 4 << 30 });
    step(&mut spm, &mut disk, ms(1));
    assert!(matches!(disk.reply(1, 1), SlotState::Valid(r) if r.answers(&a)));
    assert!(matches!(disk.reply(2, 3), SlotState::Valid(r) if r.answers(&b)));
}

#[test]
fn a_full_queue_leaves_requests_on_disk_for_a_later_scan() {
    let mut disk = Disk::new(200);
    let mut sent = Vec::new();
    for host in 1..=100u16 {
        disk.host_start(host, 1);
        let r = request(host, 1, host as u8, 2);
        disk.send(&r);
        sent.push(r);
    }
    let mut spm = start(&mut disk, ms(0));
    let mut now = ms(0);
    let mut answered = 0;
    for _ in 0..10 {
        step_extending(&mut spm, &mut disk, now);
        answered = sent
            .iter()
            .filter(
                |r| matches!(disk.reply(r.host_id.get(), 1), SlotState::Valid(x) if x.answers(r)),
            )
            .count();
        if answered == sent.len() {
            break;
        }
        now = now + SpmConfig::default().full_scan_interval;
    }
    assert_eq!(
        answered, 100,
        "every request answered within a few scans of a 64-entry window"
    );
    assert!(spm.stats().refused > 0, "the window was full at first");
}

#[test]
fn defective_and_stale_requests_are_never_run() {
    let mut disk = Disk::new(4);
    disk.host_start(1, 2);
    let stale = request(1, 1, 1, 2); // generation 1 < header's 2
    disk.send(&stale);
    let mut bad = request(1, 2, 2, 2);
    bad.generation = Generation::new(2);
    disk.send(&bad);
    let at = disk.geometry.inbox_area(HostId::new(1)).unwrap() as usize + 2 * RECORD_LEN + 50;
    disk.bytes[at] ^= 1;
    let mut spm = start(&mut disk, ms(0));
    assert!(step(&mut spm, &mut disk, ms(0)).is_empty());
    assert_eq!(spm.stats().stale, 1);
    let events: Vec<_> = std::iter::from_fn(|| spm.poll_event()).collect();
    assert!(
        events.iter().any(|e| matches!(
            e,
            SpmEvent::Defective {
                host_id,
                index: 2,
                inbox: true,
                ..
            } if host_id.get() == 1
        )),
        "{events:?}"
    );
}

#[test]
fn an_spm_that_sees_a_newer_epoch_stands_down() {
    let mut disk = Disk::new(4);
    let mut old = start(&mut disk, ms(0));
    step(&mut old, &mut disk, ms(0));
    let mut new = start(&mut disk, ms(100));
    step(&mut new, &mut disk, ms(100));
    // The old SPM reads the header back at its next heartbeat.
    let beat = ms(0) + SpmConfig::default().heartbeat_interval;
    disk.host_start(1, 1);
    disk.send(&request(1, 1, 1, 2));
    step(&mut old, &mut disk, beat);
    assert!(old.is_deposed());
    assert!(old.poll_write().is_none());
    assert!(old.poll_io(beat + Duration::from_secs(60)).is_none());
    let header = SpmHeader::decode(disk.record(SPM_HEADER_OFFSET))
        .unwrap()
        .unwrap();
    assert_eq!(
        header.epoch,
        Epoch::new(2),
        "the old SPM did not overwrite the new header"
    );
}

#[test]
fn the_host_consuming_its_reply_removes_nothing_the_spm_still_owes() {
    let mut disk = Disk::new(4);
    disk.host_start(1, 1);
    let r = request(1, 1, 1, 2);
    disk.send(&r);
    let mut spm = start(&mut disk, ms(0));
    step(&mut spm, &mut disk, ms(0));
    // The host rewrites the slot with a new request before the job ends.
    let mut newer = r;
    newer.sequence = 2;
    newer.target_size = 3 << 30;
    disk.send(&newer);
    let later = ms(0) + SpmConfig::default().full_scan_interval;
    step(&mut spm, &mut disk, later);
    spm.handle_job_result(later, r.volume, JobResult::Extended { size: 2 << 30 });
    let jobs = step(&mut spm, &mut disk, later);
    assert_eq!(jobs.len(), 1, "the newer, larger request gets its own job");
    assert_eq!(jobs[0].target_size, 3 << 30);
}

#[test]
fn rings_that_collide_bring_a_full_scan_forward() {
    let mut disk = Disk::new(8);
    let mut spm = start(&mut disk, ms(0));
    step(&mut spm, &mut disk, ms(0));
    assert_eq!(spm.stats().full_scans, 1);
    // Hosts 2, 3 and 4 ring within one doorbell interval: only the last
    // ring is on disk when the SPM reads it.
    for h in [2u16, 3, 4] {
        disk.host_start(h, 1);
        let r = request(h, 1, h as u8, 2);
        disk.send(&r);
        disk.ring(&r);
    }
    let jobs = step(&mut spm, &mut disk, ms(5));
    assert_eq!(jobs.len(), 1, "one ring seen, one targeted read");
    assert_eq!(
        spm.stats().busy_scans,
        0,
        "one new ring is no sign of collisions"
    );
    // Host 5 rings before the next doorbell read: two reads in a row with
    // a new ring, so the full scan comes at once instead of in 15 s.
    disk.host_start(5, 1);
    let r = request(5, 1, 5, 2);
    disk.send(&r);
    disk.ring(&r);
    let jobs = step(&mut spm, &mut disk, ms(10));
    assert_eq!(
        jobs.len(),
        3,
        "host 5's, and hosts 2 and 3 found by the scan"
    );
    assert_eq!(spm.stats().busy_scans, 1, "{:?}", spm.stats());
    assert_eq!(spm.stats().full_scans, 2, "the scan brought forward ran");
    assert_eq!(
        spm.queue_len(),
        4,
        "the overwritten rings' requests were found by it"
    );
}

#[test]
fn an_idle_spm_reads_the_doorbell_less_often_until_a_ring_comes() {
    fn doorbell_reads(spm: &mut Spm<64>, disk: &Disk, from: u64, to: u64) -> Vec<u64> {
        let mut reads = Vec::new();
        for t in from..to {
            while let Some(io) = spm.poll_io(ms(t)) {
                if io == SpmIo::ReadDoorbell {
                    reads.push(t);
                    spm.handle_doorbell(ms(t), disk.record(DOORBELL_OFFSET));
                }
            }
        }
        reads
    }
    let mut disk = Disk::new(8);
    let mut spm = start(&mut disk, ms(0));
    // Busy for 5 s after start: every 5 ms.
    let early = doorbell_reads(&mut spm, &disk, 100, 130);
    assert_eq!(early, [100, 105, 110, 115, 120, 125]);
    // Idle: every 40 ms.
    let idle = doorbell_reads(&mut spm, &disk, 6000, 6060);
    assert_eq!(idle, [6000, 6040]);
    // A ring: fast again from the next read.
    disk.host_start(2, 1);
    let r = request(2, 1, 2, 2);
    disk.send(&r);
    disk.ring(&r);
    // Rung at 6050: read at the next idle read (6080), then fast (another
    // ring would come soon), backing off to every 5 ms as the quiet lasts.
    let after = doorbell_reads(&mut spm, &disk, 6050, 6130);
    assert_eq!(after[0], 6080, "{after:?}");
    let gaps: Vec<u64> = after.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(gaps[0], 1, "the next read within a millisecond: {after:?}");
    assert!(gaps.windows(2).all(|g| g[0] <= g[1]), "{after:?}");
    assert_eq!(gaps[gaps.len() - 3..], [5, 5, 5], "{after:?}");
    assert!(
        after.len() <= 15,
        "about ten reads more per quiet spell: {after:?}"
    );
}

#[test]
fn a_backlog_on_disk_is_read_again_as_soon_as_the_queue_drains() {
    // 200 requests, a 64-entry window: without bringing scans forward,
    // each window would wait a full scan interval (15 s).
    let mut disk = Disk::new(200);
    let mut sent = Vec::new();
    for host in 1..=200u16 {
        disk.host_start(host, 1);
        let r = request(host, 1, host as u8, 2);
        disk.send(&r);
        sent.push(r);
    }
    let mut spm = start(&mut disk, ms(0));
    let mut t = 0;
    let answered = |disk: &Disk| {
        sent.iter()
            .filter(
                |r| matches!(disk.reply(r.host_id.get(), 1), SlotState::Valid(x) if x.answers(r)),
            )
            .count()
    };
    while answered(&disk) < sent.len() && t < 1000 {
        step_extending(&mut spm, &mut disk, ms(t));
        t += 1;
    }
    assert_eq!(answered(&disk), 200, "{:?}", spm.stats());
    assert!(t < 50, "took {t} ms of simulated time: {:?}", spm.stats());
    let stats = spm.stats();
    assert!(stats.backlog_scans >= 3, "{stats:?}");
    assert!(
        stats.full_scans <= stats.backlog_scans + 1,
        "only the first scan and the backlog's: {stats:?}"
    );
    // Drained: no more scans than the schedule's.
    let scans = stats.full_scans;
    for t in 100..1000 {
        step(&mut spm, &mut disk, ms(t));
    }
    assert_eq!(
        spm.stats().full_scans,
        scans,
        "no backlog left, no early scan"
    );
}

#[test]
fn a_host_using_all_its_slots_has_every_request_answered_without_waiting_for_a_full_scan() {
    // One host, 31 requests for 31 volumes: the queue takes 8 of a host
    // at a time. Each time one of them is answered, the SPM reads that
    // host again and takes the next, instead of leaving the rest for the
    // next full scan, 15 s later.
    let mut disk = Disk::new(4);
    disk.host_start(2, 1);
    let sent: Vec<Request> = (1..=31u16)
        .map(|slot| request(2, slot, slot as u8, 2))
        .collect();
    for r in &sent {
        disk.send(r);
    }
    let mut spm = start(&mut disk, ms(0));
    let answered = |disk: &Disk| {
        sent.iter()
            .filter(|r| matches!(disk.reply(2, r.slot.get()), SlotState::Valid(x) if x.answers(r)))
            .count()
    };
    let mut t = 0;
    while answered(&disk) < sent.len() && t < 1000 {
        step_extending(&mut spm, &mut disk, ms(t));
        t += 1;
    }
    assert_eq!(answered(&disk), 31, "{:?}", spm.stats());
    assert!(t < 100, "took {t} ms of simulated time: {:?}", spm.stats());
    assert_eq!(spm.stats().full_scans, 1, "{:?}", spm.stats());
}

#[test]
fn a_defective_doorbell_and_one_naming_an_unknown_host_are_reported_once_each() {
    let mut disk = Disk::new(4);
    let mut spm = start(&mut disk, ms(0));
    let drain = |spm: &mut Spm<64>| {
        let mut found = Vec::new();
        while let Some(e) = spm.poll_event() {
            if let SpmEvent::DoorbellDefective { defect } = e {
                found.push(defect);
            }
        }
        found
    };
    step(&mut spm, &mut disk, ms(0));
    drain(&mut spm);
    // A ring from host 9 of a 4-host mailbox: valid, but nobody to read.
    let bell = Doorbell {
        domain: DOMAIN,
        ringer: HostId::new(9),
        generation: Generation::new(1),
        sequence: 1,
        rings: 1,
    };
    disk.put(DOORBELL_OFFSET, &bell.to_bytes().unwrap());
    for t in 1..20 {
        step(&mut spm, &mut disk, ms(t));
    }
    let found = drain(&mut spm);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].name(), "invalid_field");
    // A flipped byte: reported once as well.
    let mut bytes = bell.to_bytes().unwrap();
    bytes[100] ^= 1;
    disk.put(DOORBELL_OFFSET, &bytes);
    for t in 20..40 {
        step(&mut spm, &mut disk, ms(t));
    }
    let found = drain(&mut spm);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(spm.stats().defective, 2);
}

#[test]
fn a_full_scan_goes_in_steps_and_a_ring_during_it_is_served_before_it_ends() {
    use spmbox_core::spm::SCAN_STEP_HOSTS;
    let mut disk = Disk::new(2000);
    let mut spm = start(&mut disk, ms(0));
    // The first full scan: steps of SCAN_STEP_HOSTS hosts, every host once.
    let mut steps = Vec::new();
    let mut ring_served_at = None;
    let mut t = ms(0);
    disk.host_start(1999, 1);
    let r = request(1999, 1, 9, 2);
    while let Some(io) = spm.poll_io(t) {
        read_one(&mut spm, &disk, io, t);
        if let SpmIo::ReadHosts { first_host, count } = io {
            if count == 1 {
                ring_served_at = Some(steps.len());
            } else {
                steps.push((first_host.get(), count));
            }
            if steps.len() == 3 && ring_served_at.is_none() && !disk_has_ring(&disk) {
                // Host 1999 sends and rings while the scan is at host 193.
                disk.send(&r);
                disk.ring(&r);
            }
        }
        t = t + Duration::from_micros(300);
    }
    assert!(
        steps.iter().all(|&(_, n)| n <= SCAN_STEP_HOSTS),
        "{steps:?}"
    );
    let mut covered: Vec<u16> = steps.iter().flat_map(|&(f, n)| f..f + n).collect();
    covered.sort_unstable();
    assert_eq!(covered, (1..=2000).collect::<Vec<u16>>(), "every host once");
    let served = ring_served_at.expect("the ringer read on its own");
    assert!(
        served < steps.len(),
        "served at step {served} of {}",
        steps.len()
    );
    assert_eq!(spm.queue_len(), 1);
    assert_eq!(spm.stats().full_scans, 1);
}

#[test]
fn a_full_scan_keeps_going_while_rings_come_faster_than_the_doorbell_is_read() {
    use spmbox_core::spm::SCAN_STEP_HOSTS;
    let mut disk = Disk::new(2000);
    let mut spm = start(&mut disk, ms(0));
    // A new ring before every read, each read 300 µs after the last: the
    // doorbell is always due at its fast interval. The scan's steps must
    // still come, one between every two other reads.
    let steps_needed = 2000u16.div_ceil(SCAN_STEP_HOSTS) as usize;
    let (mut steps, mut others) = (0usize, 0usize);
    let mut t = ms(0);
    let mut n = 0u16;
    while steps < steps_needed && others < 4 * steps_needed {
        n += 1;
        let host = 1 + (n % 2000);
        let mut r = request(host, 1, (host % 250) as u8, 2);
        r.sequence = u64::from(n);
        disk.ring(&r);
        let Some(io) = spm.poll_io(t) else {
            t = t + Duration::from_micros(300);
            continue;
        };
        read_one(&mut spm, &disk, io, t);
        match io {
            SpmIo::ReadHosts { count, .. } if count > 1 || steps_needed == 1 => steps += 1,
            SpmIo::ReadHosts { .. } | SpmIo::ReadDoorbell | SpmIo::ReadSpmHeader => others += 1,
        }
        t = t + Duration::from_micros(300);
    }
    assert_eq!(
        steps, steps_needed,
        "the scan finished: {steps} steps among {others} other reads"
    );
    assert!(others <= 2 * steps_needed + 2, "{others} other reads");
}

#[test]
fn colliding_rings_after_a_quiet_spell_are_scanned_for_at_once_and_then_at_the_average_pace() {
    let config = SpmConfig::default();
    let busy = config.busy_scan_interval;
    let mut disk = Disk::new(8);
    let mut spm = start(&mut disk, ms(0));
    step(&mut spm, &mut disk, ms(0));
    assert_eq!(spm.stats().full_scans, 1);
    // Two rings in a row, 10 ms after the first full scan: a burst after
    // a quiet spell is scanned for at once, not `busy` after the last
    // scan.
    let mut t = ms(10);
    let mut seq = 0;
    let mut ring_twice = |spm: &mut Spm<64>, disk: &mut Disk, t: &mut Instant| {
        for h in [2u16, 3] {
            seq += 1;
            let mut r = request(h, 1, h as u8, 2);
            r.sequence = seq;
            disk.ring(&r);
            step(spm, disk, *t);
            *t = *t + Duration::from_micros(250);
        }
    };
    ring_twice(&mut spm, &mut disk, &mut t);
    assert_eq!(spm.stats().busy_scans, 1);
    assert_eq!(
        spm.stats().full_scans,
        2,
        "scanned at once: {:?}",
        spm.stats()
    );
    // A second burst right after it is still within the allowance.
    ring_twice(&mut spm, &mut disk, &mut t);
    assert_eq!(spm.stats().full_scans, 3, "{:?}", spm.stats());
    // A third has to wait for the allowance to refill: one scan per
    // `busy` on average.
    ring_twice(&mut spm, &mut disk, &mut t);
    assert_eq!(spm.stats().full_scans, 3, "{:?}", spm.stats());
    let refilled = ms(10) + busy + busy;
    step(&mut spm, &mut disk, refilled);
    assert_eq!(spm.stats().full_scans, 4, "{:?}", spm.stats());
}

#[test]
fn a_batch_that_opens_during_a_scan_waits_for_its_later_steps_but_not_long() {
    use spmbox_core::spm::SCAN_BATCH_WAIT;
    // Requests of host 10 (the scan's first step) and host 1990 (its last).
    let run = |step_time: Duration| -> Vec<usize> {
        let mut disk = Disk::new(2000);
        for (h, v) in [(10u16, 1u8), (1990, 2)] {
            disk.host_start(h, 1);
            disk.send(&request(h, 1, v, 2));
        }
        let mut spm = start(&mut disk, ms(0));
        let mut t = ms(0);
        let mut commits = Vec::new();
        for _ in 0..200 {
            if let Some(io) = spm.poll_io(t) {
                read_one(&mut spm, &disk, io, t);
            }
            while let Some(job) = spm.poll_job() {
                let size = job.target_size;
                spm.handle_job_result(t, job.volume, JobResult::Extended { size });
            }
            if let Some(c) = spm.poll_commit() {
                commits.push(c.jobs);
                spm.handle_committed(t, 0);
            }
            while let Some(w) = spm.poll_write() {
                disk.put(w.offset, &w.record);
            }
            t = t + step_time;
        }
        commits
    };
    // Steps 50 µs apart: the whole scan fits in the wait, one commit.
    assert_eq!(run(Duration::from_micros(50)), vec![2]);
    // Steps 1 ms apart: the first request does not wait for the last step.
    let slow = run(Duration::from_millis(1));
    assert_eq!(slow, vec![1, 1], "{slow:?}");
    assert!(SCAN_BATCH_WAIT < Duration::from_millis(31));
}

#[test]
fn a_batch_does_not_wait_for_a_scan_that_has_found_nothing() {
    // A scan of 2000 empty hosts, one step per millisecond; host 1990
    // sends and rings during it. The scan has found nothing, so its later
    // steps are not waited for: the reply goes out at once, not after
    // SCAN_BATCH_WAIT.
    let mut disk = Disk::new(2000);
    let mut spm = start(&mut disk, ms(0));
    let mut t = ms(0);
    let (mut job_at, mut commit_at) = (None, None);
    for n in 0..60 {
        if n == 3 {
            disk.host_start(1990, 1);
            let r = request(1990, 1, 9, 2);
            disk.send(&r);
            disk.ring(&r);
        }
        if let Some(io) = spm.poll_io(t) {
            read_one(&mut spm, &disk, io, t);
        }
        while let Some(job) = spm.poll_job() {
            job_at = Some(t);
            let size = job.target_size;
            spm.handle_job_result(t, job.volume, JobResult::Extended { size });
        }
        if spm.poll_commit().is_some() {
            commit_at.get_or_insert(t);
            spm.handle_committed(t, 0);
        }
        while let Some(w) = spm.poll_write() {
            disk.put(w.offset, &w.record);
        }
        t = t + Duration::from_millis(1);
    }
    let (job_at, commit_at) = (job_at.expect("a job"), commit_at.expect("a commit"));
    assert!(
        commit_at.saturating_since(job_at) < Duration::from_millis(3),
        "the commit waited {:?}",
        commit_at.saturating_since(job_at)
    );
    assert_eq!(spm.stats().full_scans, 1);
}

fn disk_has_ring(disk: &Disk) -> bool {
    disk.record(DOORBELL_OFFSET).iter().any(|&b| b != 0)
}

#[test]
fn a_busy_full_scan_brings_the_next_forward_and_a_quiet_one_does_not() {
    // 20 requests (a quarter of the 64-entry queue is 16): busy.
    let mut disk = Disk::new(40);
    for host in 1..=20u16 {
        disk.host_start(host, 1);
        disk.send(&request(host, 1, host as u8, 2));
    }
    let mut spm = start(&mut disk, ms(0));
    step_extending(&mut spm, &mut disk, ms(0));
    assert_eq!(spm.stats().full_scans, 1);
    // More arrive without a ring: found by the scan brought forward.
    for host in 21..=25u16 {
        disk.host_start(host, 1);
        disk.send(&request(host, 1, host as u8, 2));
    }
    for t in 1..=10 {
        step_extending(&mut spm, &mut disk, ms(t));
    }
    assert_eq!(spm.stats().full_scans, 2, "{:?}", spm.stats());
    assert_eq!(spm.stats().backlog_scans, 1);
    assert!(matches!(disk.reply(25, 1), SlotState::Valid(_)));
    // That scan found 5: quiet. The next comes on schedule.
    disk.host_start(30, 1);
    disk.send(&request(30, 1, 30, 2));
    for t in 11..1000 {
        step_extending(&mut spm, &mut disk, ms(t));
    }
    assert_eq!(spm.stats().full_scans, 2, "{:?}", spm.stats());
    assert!(matches!(disk.reply(30, 1), SlotState::Empty));
}

#[test]
fn rings_in_two_reads_in_a_row_are_taken_as_collisions_and_one_sender_after_another_is_not() {
    let us = |n: u64| ms(0) + Duration::from_micros(n);
    let mut disk = Disk::new(8);
    let mut spm = start(&mut disk, ms(0));
    step(&mut spm, &mut disk, ms(0));
    let ask = |disk: &mut Disk, h: u16, ring: bool| {
        disk.host_start(h, 1);
        let r = request(h, 1, h as u8, 2);
        disk.send(&r);
        if ring {
            disk.ring(&r);
        }
    };
    // One sender after another: host 2 rings, the read 250 µs later finds
    // nothing new, then host 3 rings. Each ring was read: no collision,
    // however close in time.
    ask(&mut disk, 2, true);
    step(&mut spm, &mut disk, us(100_000));
    step(&mut spm, &mut disk, us(100_250));
    ask(&mut disk, 3, true);
    step(&mut spm, &mut disk, us(100_750));
    assert_eq!(spm.stats().busy_scans, 0, "{:?}", spm.stats());
    assert_eq!(spm.queue_len(), 2);
    // Hosts 4, 5 and 6 ring at once, and the doorbell keeps host 5's ring;
    // host 6 rings right after the next read. Two reads in a row found a
    // new ring: rings were likely lost, and the scan finds host 4's.
    step(&mut spm, &mut disk, us(101_000));
    assert_eq!(spm.stats().busy_scans, 0, "{:?}", spm.stats());
    ask(&mut disk, 4, true);
    ask(&mut disk, 5, true);
    step(&mut spm, &mut disk, us(101_250));
    assert_eq!(spm.stats().busy_scans, 0, "{:?}", spm.stats());
    ask(&mut disk, 6, true);
    step(&mut spm, &mut disk, us(101_500));
    assert_eq!(spm.stats().busy_scans, 1, "{:?}", spm.stats());
    assert_eq!(spm.stats().full_scans, 2);
    assert_eq!(spm.queue_len(), 5, "hosts 2 to 6, host 4 by the scan");
}

#[test]
fn a_ring_rung_again_for_a_request_the_spm_does_not_hold_brings_a_scan_forward() {
    let us = |n: u64| ms(0) + Duration::from_micros(n);
    let mut disk = Disk::new(8);
    let mut spm = start(&mut disk, ms(0));
    step(&mut spm, &mut disk, ms(0));
    let ask = |disk: &mut Disk, h: u16| {
        disk.host_start(h, 1);
        let r = request(h, 1, h as u8, 2);
        disk.send(&r);
        r
    };
    // Hosts 2 and 3 ring at once; the doorbell keeps host 3's ring, which
    // is read and answered. Host 2's ring is lost.
    let two = ask(&mut disk, 2);
    let three = ask(&mut disk, 3);
    disk.ring(&three);
    step(&mut spm, &mut disk, us(100_000));
    step(&mut spm, &mut disk, us(100_250));
    assert_eq!(spm.queue_len(), 1, "host 3 only");
    // 5 ms later host 2 rings again: its second ring for a request the SPM
    // does not hold. Its earlier ring was lost, so others may have been:
    // a full scan comes at once (here it finds nothing more, but the
    // targeted read alone would not have looked at other hosts).
    ask(&mut disk, 4);
    step(&mut spm, &mut disk, us(102_000));
    step(&mut spm, &mut disk, us(104_000));
    assert_eq!(spm.stats().busy_scans, 0, "{:?}", spm.stats());
    disk.ring_again(&two, 2);
    step(&mut spm, &mut disk, us(106_000));
    assert_eq!(spm.stats().busy_scans, 1, "{:?}", spm.stats());
    assert_eq!(spm.stats().full_scans, 2);
    assert_eq!(spm.queue_len(), 3, "hosts 2 and 3, and host 4 by the scan");
    // A ring again for a request the SPM holds (its reply is not yet
    // read, or its job runs) says nothing was lost.
    for t in 0..40 {
        step(&mut spm, &mut disk, us(106_000 + t * 250));
    }
    disk.ring_again(&three, 3);
    step(&mut spm, &mut disk, us(116_250));
    assert_eq!(spm.stats().busy_scans, 1, "{:?}", spm.stats());
    // An SPM that has not read the doorbell for 5 ms (it reads slowly
    // when idle) may have missed the earlier ring only because the ring
    // again overwrote it: nothing is brought forward, the targeted read
    // finds the request.
    let five = ask(&mut disk, 5);
    disk.ring_again(&five, 2);
    step(&mut spm, &mut disk, us(130_000));
    assert_eq!(spm.stats().busy_scans, 1, "{:?}", spm.stats());
    assert_eq!(spm.queue_len(), 4, "host 5 by its ring");
}

#[test]
fn a_collision_during_a_full_scan_starts_it_over_where_it_is() {
    let mut disk = Disk::new(256);
    let mut spm = start(&mut disk, ms(0));
    step(&mut spm, &mut disk, ms(0));
    assert_eq!(spm.stats().full_scans, 1);
    // The regular full scan 15 s later, in steps of 64 hosts; this one
    // starts at host 65. Host 200 rang just before, so the SPM reads the
    // doorbell often. Stop after the scan's first step.
    let t0 = ms(0) + SpmConfig::default().full_scan_interval;
    disk.host_start(200, 1);
    let r = request(200, 1, 200, 2);
    disk.send(&r);
    disk.ring(&r);
    assert_eq!(
        step(&mut spm, &mut disk, t0 - Duration::from_millis(1)).len(),
        1
    );
    let mut steps = 0;
    while steps < 1 {
        let io = spm.poll_io(t0).expect("the scan is due");
        if matches!(io, SpmIo::ReadHosts { count, .. } if count > 1) {
            assert_eq!(
                io,
                SpmIo::ReadHosts {
                    first_host: HostId::new(65),
                    count: 64
                }
            );
            steps += 1;
        }
        read_one(&mut spm, &disk, io, t0);
    }
    // Behind the scan, host 70 writes a request and its ring is lost;
    // host 100 does the same and rings again.
    for h in [70u16, 100] {
        disk.host_start(h, 1);
        disk.send(&request(h, 1, h as u8, 2));
    }
    disk.ring_again(&request(100, 1, 100, 2), 2);
    // The ring again says rings were lost: the scan starts over where it
    // is, so host 70 is read within one lap of 4 steps, not after the
    // rest of this scan and most of the next (7 steps).
    let t1 = t0 + Duration::from_millis(1);
    steps = 0;
    for _ in 0..100 {
        if spm.queue_len() == 3 {
            break;
        }
        let Some(io) = spm.poll_io(t1) else {
            panic!(
                "no read at {steps} steps: {:?} queue {}",
                spm.stats(),
                spm.queue_len()
            );
        };
        if matches!(io, SpmIo::ReadHosts { count, .. } if count > 1) {
            steps += 1;
        }
        read_one(&mut spm, &disk, io, t1);
    }
    assert_eq!(spm.queue_len(), 3, "{:?}", spm.stats());
    assert!(steps <= 4, "{steps} steps");
    assert_eq!(spm.stats().busy_scans, 1, "{:?}", spm.stats());
}

// ---------------------------------------------------------- owners and settle

#[test]
fn two_spms_that_start_at_once_take_one_epoch_and_only_the_last_writer_acts() {
    let mut disk = Disk::new(4);
    disk.host_start(1, 1);
    disk.send(&request(1, 1, 7, 2));
    let found = SpmHeader::decode(disk.record(SPM_HEADER_OFFSET)).unwrap();
    let config = SpmConfig::default();
    let mut a: Spm<64> = Spm::new(
        ms(0),
        DOMAIN,
        disk.geometry,
        HostId::NONE,
        0xA,
        found.as_ref(),
        config,
    )
    .unwrap();
    let mut b: Spm<64> = Spm::new(
        ms(0),
        DOMAIN,
        disk.geometry,
        HostId::NONE,
        0xB,
        found.as_ref(),
        config,
    )
    .unwrap();
    assert_eq!(a.epoch(), b.epoch(), "both saw the same header");
    for spm in [&mut a, &mut b] {
        while let Some(w) = spm.poll_write() {
            disk.put(w.offset, &w.record);
        }
    }
    // Until the header is read back, neither reads hosts or runs jobs.
    for spm in [&mut a, &mut b] {
        assert_eq!(spm.poll_io(ms(1000)), None);
        assert_eq!(spm.poll_job(), None);
    }
    let back = ms(0) + settle(&config);
    let a_jobs = step(&mut a, &mut disk, back);
    let b_jobs = step(&mut b, &mut disk, back);
    assert!(a.is_deposed(), "A's owner is no longer in the header");
    assert!(a_jobs.is_empty(), "A never acted");
    assert!(!b.is_deposed());
    assert_eq!(b_jobs.len(), 1, "B acts");
}

#[test]
fn a_lost_header_write_is_written_again_and_the_spm_waits_again() {
    let mut disk = Disk::new(4);
    disk.host_start(1, 1);
    disk.send(&request(1, 1, 7, 2));
    let config = SpmConfig::default();
    let mut spm: Spm<64> = Spm::new(
        ms(0),
        DOMAIN,
        disk.geometry,
        HostId::NONE,
        0xA,
        None,
        config,
    )
    .unwrap();
    // The header write is lost.
    while spm.poll_write().is_some() {}
    let back = ms(0) + settle(&config);
    assert!(step(&mut spm, &mut disk, back).is_empty());
    assert!(!spm.is_deposed() && !spm.is_confirmed());
    let header = SpmHeader::decode(disk.record(SPM_HEADER_OFFSET))
        .unwrap()
        .unwrap();
    assert_eq!(header.owner, 0xA, "written again");
    let jobs = step(&mut spm, &mut disk, back + settle(&config));
    assert!(spm.is_confirmed());
    assert_eq!(jobs.len(), 1);
}

#[test]
fn an_spm_needs_a_nonzero_owner_and_its_header_carries_it_and_the_pool_commit() {
    let mut disk = Disk::new(4);
    let g = disk.geometry;
    assert!(
        Spm::<64>::new(
            ms(0),
            DOMAIN,
            g,
            HostId::NONE,
            0,
            None,
            SpmConfig::default()
        )
        .is_err()
    );
    let mut spm = start_as(&mut disk, ms(0), 0xFEED);
    spm.set_pool_commit(41);
    step(&mut spm, &mut disk, ms(0));
    let h = SpmHeader::decode(disk.record(SPM_HEADER_OFFSET))
        .unwrap()
        .unwrap();
    assert_eq!((h.owner, h.pool_commit), (0xFEED, 41));
    // The next SPM starts from the pool commit it finds.
    let next = start(&mut disk, ms(5000));
    assert_eq!(next.pool_commit(), 41);
}

// --- withdrawn requests --------------------------------------------------

/// The pool of the withdrawal stories: 1 GiB extents.
type StoryPool = spmbox_core::pool::Pool<4, 8, 8, 8>;

const GIB: u64 = 1 << 30;

/// Runs the engine's jobs on `pool` (committing nothing: the pool is
/// memory), then hands the pool what still waits whenever a request left
/// the disk, as the daemon does.
fn step_on(spm: &mut Spm<64>, pool: &mut StoryPool, seen: &mut u64, disk: &mut Disk, now: Instant) {
    loop {
        let jobs = step(spm, disk, now);
        if *seen != spm.withdrawn() {
            *seen = spm.withdrawn();
            pool.withdraw_parked(|v| spm.waiting(v));
        }
        while let Some(c) = pool.poll_completed() {
            spm.handle_capacity(now, c.volume, c.size);
        }
        if jobs.is_empty() {
            step(spm, disk, now);
            return;
        }
        for job in jobs {
            let result = match pool.extend(job.volume, job.target_size, job.urgent) {
                Ok(spmbox_core::pool::Extend::Extended { size }) => JobResult::Extended { size },
                Ok(spmbox_core::pool::Extend::Parked { size }) => JobResult::NoSpace { size },
                Err(e) => panic!("extend: {e:?}"),
            };
            spm.handle_job_result(now, job.volume, result);
        }
    }
}

/// Host 1 asks for 6 GiB of a 1 GiB volume in a full pool and is told to
/// wait; then `withdraw` changes its inbox; then (after an SPM restart if
/// `restart`) a LUN of 8 extents is added. Returns the volume's size.
fn parked_story(withdraw: impl Fn(&mut Disk), restart: bool) -> u64 {
    let mut disk = Disk::new(4);
    disk.host_start(1, 1);
    let r = request(1, 1, 7, 6);
    disk.send(&r);
    let mut committed = StoryPool::new(GIB).unwrap();
    committed.add_lun(Uuid([0x10; 16]), 1).unwrap();
    committed.create_volume(r.volume, 16 * GIB, GIB).unwrap();
    let mut pool = committed.clone();
    let mut seen = 0;
    let mut spm = start(&mut disk, ms(0));
    step_on(&mut spm, &mut pool, &mut seen, &mut disk, ms(0));
    assert!(
        matches!(disk.reply(1, 1), SlotState::Valid(w) if w.status == ReplyStatus::WaitingForSpace)
    );
    assert_eq!(pool.parked().count(), 1);

    withdraw(&mut disk);
    let scan = ms(0) + SpmConfig::default().full_scan_interval;
    if restart {
        // The parked list is memory only: the new SPM starts from the
        // committed pool.
        pool = committed;
        seen = 0;
        spm = start(&mut disk, scan);
    }
    step_on(&mut spm, &mut pool, &mut seen, &mut disk, scan);
    pool.add_lun(Uuid([0x20; 16]), 8).unwrap();
    step_on(
        &mut spm,
        &mut pool,
        &mut seen,
        &mut disk,
        scan + Duration::from_millis(1),
    );
    pool.volume(r.volume).unwrap().size
}

/// The host restarted: a new generation, the slot empty.
fn host_restarts(disk: &mut Disk) {
    disk.host_start(1, 2);
    let at = disk.geometry.inbox_area(HostId::new(1)).unwrap() + RECORD_LEN as u64;
    disk.put(at, &[0; RECORD_LEN]);
}

/// The host restarted and asks for 3 GiB under its new generation.
fn host_asks_for_less(disk: &mut Disk) {
    disk.host_start(1, 2);
    let mut r = request(1, 1, 7, 3);
    r.generation = Generation::new(2);
    disk.send(&r);
}

#[test]
fn a_parked_request_whose_host_restarted_is_never_carried_out() {
    assert_eq!(parked_story(host_restarts, false), GIB);
}

#[test]
fn a_parked_request_whose_host_restarted_is_not_carried_out_after_an_spm_restart_either() {
    assert_eq!(parked_story(host_restarts, true), GIB);
}

#[test]
fn a_host_that_asks_for_less_while_parked_gets_what_it_asks_now() {
    assert_eq!(parked_story(host_asks_for_less, false), 3 * GIB);
}

#[test]
fn a_host_that_asks_for_less_gets_the_same_after_an_spm_restart() {
    assert_eq!(parked_story(host_asks_for_less, true), 3 * GIB);
}

#[test]
fn a_host_that_keeps_its_request_still_gets_it() {
    assert_eq!(parked_story(|_| {}, false), 6 * GIB);
    assert_eq!(parked_story(|_| {}, true), 6 * GIB);
}

#[test]
fn a_withdrawn_parked_request_no_longer_waits_and_is_counted() {
    let mut disk = Disk::new(4);
    disk.host_start(1, 1);
    let r = request(1, 1, 7, 6);
    disk.send(&r);
    let mut spm = start(&mut disk, ms(0));
    step(&mut spm, &mut disk, ms(0));
    spm.handle_job_result(ms(1), r.volume, JobResult::NoSpace { size: GIB });
    step(&mut spm, &mut disk, ms(1));
    assert_eq!(spm.waiting(r.volume), Some((6 * GIB, false)));
    let before = spm.withdrawn();
    host_restarts(&mut disk);
    step(
        &mut spm,
        &mut disk,
        ms(0) + SpmConfig::default().full_scan_interval,
    );
    assert_eq!(spm.waiting(r.volume), None);
    assert_ne!(spm.withdrawn(), before);
}

#[test]
fn waiting_is_the_largest_target_still_parked_for_the_volume() {
    let mut disk = Disk::new(4);
    disk.host_start(1, 1);
    disk.host_start(2, 1);
    let a = request(1, 1, 7, 6);
    let mut b = request(2, 1, 7, 4);
    b.paused = true;
    disk.send(&a);
    disk.send(&b);
    let mut spm = start(&mut disk, ms(0));
    step(&mut spm, &mut disk, ms(0));
    spm.handle_job_result(ms(1), a.volume, JobResult::NoSpace { size: GIB });
    step(&mut spm, &mut disk, ms(1));
    assert_eq!(spm.waiting(a.volume), Some((6 * GIB, true)));
    host_restarts(&mut disk);
    step(
        &mut spm,
        &mut disk,
        ms(0) + SpmConfig::default().full_scan_interval,
    );
    assert_eq!(spm.waiting(a.volume), Some((4 * GIB, true)));
}

#[test]
fn a_no_space_result_for_requests_already_withdrawn_is_counted() {
    let mut disk = Disk::new(4);
    disk.host_start(1, 1);
    let r = request(1, 1, 7, 6);
    disk.send(&r);
    let mut spm = start(&mut disk, ms(0));
    step(&mut spm, &mut disk, ms(0));
    // The job runs while the host restarts and the SPM rescans.
    host_restarts(&mut disk);
    let scan = ms(0) + SpmConfig::default().full_scan_interval;
    step(&mut spm, &mut disk, scan);
    let before = spm.withdrawn();
    spm.handle_job_result(scan, r.volume, JobResult::NoSpace { size: GIB });
    assert_ne!(
        spm.withdrawn(),
        before,
        "the backend parked what nobody asks for"
    );
    assert_eq!(spm.waiting(r.volume), None);
}

// ------------------------------------------------ commits and fencing

/// The engine's next write that is not its SPM header (which it writes
/// whatever the batch).
fn next_reply_write(spm: &mut Spm<64>) -> Option<spmbox_core::spm::SpmWrite> {
    std::iter::from_fn(|| spm.poll_write()).find(|w| w.offset != SPM_HEADER_OFFSET)
}

/// Host 3 asks for 2 GiB of volume 7; the SPM ran the job and the result
/// is in. Returns the engine and the request.
fn result_in(disk: &mut Disk) -> (Spm<64>, Request) {
    disk.host_start(3, 1);
    let r = request(3, 2, 7, 2);
    disk.send(&r);
    let mut spm = start(disk, ms(0));
    let jobs = step(&mut spm, disk, ms(0));
    assert_eq!(jobs.len(), 1);
    spm.handle_job_result(ms(1), r.volume, JobResult::Extended { size: 2 << 30 });
    (spm, r)
}

#[test]
fn no_reply_is_written_before_its_batch_is_committed() {
    let mut disk = Disk::new(4);
    let (mut spm, _) = result_in(&mut disk);
    assert!(spm.commit_pending());
    assert_eq!(
        next_reply_write(&mut spm),
        None,
        "the result is not answered yet"
    );
    assert_eq!(spm.poll_job(), None, "no new job joins a closed batch");
    // The batch closes; the engine asks to read its header back first.
    assert_eq!(spm.poll_commit(), None);
    assert_eq!(spm.poll_io(ms(1)), Some(SpmIo::ReadSpmHeader));
    spm.handle_spm_header(ms(1), disk.record(SPM_HEADER_OFFSET));
    let commit = spm
        .poll_commit()
        .expect("the commit, once the header is ours");
    assert_eq!(commit.jobs, 1);
    assert_eq!(
        next_reply_write(&mut spm),
        None,
        "still not before the commit is durable"
    );
    spm.handle_committed(ms(2), 17);
    let w = next_reply_write(&mut spm).expect("the outbox header, then the reply");
    assert_eq!(w.offset, disk.geometry.outbox_area(HostId::new(3)).unwrap());
    assert!(spm.poll_write().is_some());
    assert_eq!(
        spm.pool_commit(),
        17,
        "the header carries the commit from now on"
    );
}

#[test]
fn an_spm_whose_header_was_taken_before_its_commit_commits_nothing() {
    let mut disk = Disk::new(4);
    let (mut spm, _) = result_in(&mut disk);
    // Another SPM took over while the job ran.
    let mut newer = SpmHeader::decode(disk.record(SPM_HEADER_OFFSET))
        .unwrap()
        .unwrap();
    newer.epoch = newer.epoch.next().unwrap();
    newer.owner = 0xbeef;
    disk.put(SPM_HEADER_OFFSET, &newer.to_bytes().unwrap());
    assert_eq!(spm.poll_commit(), None);
    assert_eq!(spm.poll_io(ms(1)), Some(SpmIo::ReadSpmHeader));
    spm.handle_spm_header(ms(1), disk.record(SPM_HEADER_OFFSET));
    assert!(spm.is_deposed());
    assert_eq!(spm.poll_commit(), None);
    assert_eq!(spm.poll_write(), None);
}

#[test]
fn a_failed_commit_answers_nothing_and_the_next_attempt_reads_the_header_again() {
    let mut disk = Disk::new(4);
    let (mut spm, _) = result_in(&mut disk);
    assert_eq!(spm.poll_commit(), None);
    assert_eq!(spm.poll_io(ms(1)), Some(SpmIo::ReadSpmHeader));
    spm.handle_spm_header(ms(1), disk.record(SPM_HEADER_OFFSET));
    assert!(spm.poll_commit().is_some());
    spm.handle_commit_failed(ms(2));
    assert_eq!(next_reply_write(&mut spm), None);
    assert_eq!(spm.poll_job(), None);
    assert_eq!(spm.poll_commit(), None, "not without a fresh read");
    assert_eq!(spm.poll_io(ms(500)), Some(SpmIo::ReadSpmHeader));
    spm.handle_spm_header(ms(500), disk.record(SPM_HEADER_OFFSET));
    assert!(spm.poll_commit().is_some());
    spm.handle_committed(ms(501), 1);
    assert!(next_reply_write(&mut spm).is_some());
}

#[test]
fn a_batch_holds_at_most_max_jobs_jobs() {
    let mut disk = Disk::new(8);
    for h in 1..=4u16 {
        disk.host_start(h, 1);
        disk.send(&request(h, 1, h as u8, 2));
    }
    let found = SpmHeader::decode(disk.record(SPM_HEADER_OFFSET)).unwrap();
    let config = SpmConfig {
        max_jobs: 2,
        ..SpmConfig::default()
    };
    let born = Instant(0);
    let mut spm: Spm<64> = Spm::new(
        born,
        DOMAIN,
        disk.geometry,
        HostId::NONE,
        1,
        found.as_ref(),
        config,
    )
    .unwrap();
    while let Some(w) = spm.poll_write() {
        disk.put(w.offset, &w.record);
    }
    let now = ms(0);
    read_all(&mut spm, &disk, now);
    let mut jobs = Vec::new();
    while let Some(job) = spm.poll_job() {
        spm.handle_job_result(
            now,
            job.volume,
            JobResult::Extended {
                size: job.target_size,
            },
        );
        jobs.push(job);
    }
    assert_eq!(jobs.len(), 2, "the batch closed at max_jobs");
    let more = step(&mut spm, &mut disk, now);
    assert_eq!(more.len(), 2, "the next batch starts after the commit");
}

#[test]
fn a_stalled_spm_reads_its_header_before_it_writes_anything() {
    let mut disk = Disk::new(4);
    let mut spm = start(&mut disk, ms(0));
    step(&mut spm, &mut disk, ms(0));
    // A heartbeat read is due and handled, so a header write is due...
    let beat = ms(0) + SpmConfig::default().heartbeat_interval;
    assert_eq!(spm.poll_io(beat), Some(SpmIo::ReadSpmHeader));
    spm.handle_spm_header(beat, disk.record(SPM_HEADER_OFFSET));
    // ...but the process stalls before writing it, for longer than the
    // fence, while another SPM takes over.
    let late = beat + SpmConfig::default().heartbeat_interval * 3;
    let mut newer = SpmHeader::decode(disk.record(SPM_HEADER_OFFSET))
        .unwrap()
        .unwrap();
    newer.epoch = newer.epoch.next().unwrap();
    newer.owner = 0xbeef;
    disk.put(SPM_HEADER_OFFSET, &newer.to_bytes().unwrap());
    spm.handle_timeout(late);
    assert_eq!(spm.poll_write(), None, "fenced: not even its header");
    assert_eq!(spm.poll_io(late), Some(SpmIo::ReadSpmHeader));
    spm.handle_spm_header(late, disk.record(SPM_HEADER_OFFSET));
    assert!(spm.is_deposed());
    assert_eq!(spm.poll_write(), None);
    assert_eq!(
        SpmHeader::decode(disk.record(SPM_HEADER_OFFSET))
            .unwrap()
            .unwrap()
            .epoch,
        newer.epoch
    );
}

#[test]
fn one_mapping_from_the_pool_to_job_results_with_named_error_codes() {
    use spmbox_core::pool::{Extend, PoolError};
    use spmbox_core::spm::errno;
    assert_eq!(
        JobResult::from_pool(Ok(Extend::Parked { size: 5 }), 5),
        JobResult::NoSpace { size: 5 }
    );
    assert_eq!(
        JobResult::from_pool(Err(PoolError::OverLimit { limit: 9 }), 4),
        JobResult::OverLimit { size: 4 }
    );
    assert_eq!(
        JobResult::from_pool(Err(PoolError::ParkedFull), 4),
        JobResult::Failed {
            code: errno::EAGAIN
        }
    );
    assert_eq!(
        JobResult::from_pool(Err(PoolError::NilId), 4),
        JobResult::Failed { code: errno::EIO }
    );
    assert_eq!(
        JobResult::from_pool(Err(PoolError::SegmentsFull), 4),
        JobResult::SegmentsFull { size: 4 }
    );
}

#[test]
fn hold_records_are_neither_requests_nor_defects() {
    let mut disk = Disk::new(4);
    disk.host_start(1, 2);
    let inbox = disk.geometry.inbox_area(HostId::new(1)).unwrap();
    let hold = |slot: u16, generation: u64| {
        Hold::listing(
            DOMAIN,
            HostId::new(1),
            Slot::new(slot),
            Generation::new(generation),
            &[Uuid([7; 16]), Uuid([8; 16])],
        )
        .to_bytes()
        .unwrap()
    };
    disk.put(inbox + 31 * RECORD_LEN as u64, &hold(31, 2));
    disk.put(inbox + 30 * RECORD_LEN as u64, &hold(30, 1)); // stale
    let mut r = request(1, 1, 1, 2);
    r.generation = Generation::new(2);
    disk.send(&r);
    let mut spm = start(&mut disk, ms(0));
    let jobs = step(&mut spm, &mut disk, ms(0));
    assert_eq!(jobs.len(), 1, "the request beside the holds is served");
    assert_eq!(spm.stats().defective, 0);
    assert_eq!(spm.stats().stale, 0, "a stale hold counts for nothing");
    let events: Vec<_> = std::iter::from_fn(|| spm.poll_event()).collect();
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, SpmEvent::Defective { .. })),
        "{events:?}"
    );
}

#[test]
fn the_release_commit_is_carried_in_the_header_and_only_rises() {
    let mut disk = Disk::new(4);
    let found = SpmHeader {
        release_commit: 7,
        ..SpmHeader::vacant(DOMAIN, Epoch::new(3))
    };
    disk.put(SPM_HEADER_OFFSET, &found.to_bytes().unwrap());
    let mut spm = start(&mut disk, ms(0));
    assert_eq!(spm.release_commit(), 7, "the header found is the floor");
    spm.set_release_commit(5);
    assert_eq!(spm.release_commit(), 7);
    spm.set_release_commit(12);
    step(&mut spm, &mut disk, ms(0));
    let header = SpmHeader::decode(disk.record(SPM_HEADER_OFFSET))
        .unwrap()
        .unwrap();
    assert_eq!(header.release_commit, 12);
}

#[test]
fn a_full_segment_table_is_answered_rejected_segments_full() {
    let mut disk = Disk::new(4);
    disk.host_start(1, 1);
    let r = request(1, 1, 1, 2);
    disk.send(&r);
    let mut spm = start(&mut disk, ms(0));
    let jobs = step(&mut spm, &mut disk, ms(0));
    assert_eq!(jobs.len(), 1);
    spm.handle_job_result(ms(1), r.volume, JobResult::SegmentsFull { size: 1 << 30 });
    step(&mut spm, &mut disk, ms(1));
    match disk.reply(1, 1) {
        SlotState::Valid(reply) => {
            assert_eq!(
                reply.status,
                ReplyStatus::Rejected(spmbox_core::wire::RejectReason::SegmentsFull)
            );
            assert_eq!(reply.size, 1 << 30);
        }
        other => panic!("{other:?}"),
    }
}
