//! Arbitrary inbox and outbox contents, and arbitrary backend results, fed
//! to the SPM engine.
//!
//! The areas of up to 8 hosts are built from the input: headers and slots
//! hold valid records (of the right or another generation, place or
//! domain), records with one byte flipped, or raw bytes. Checks that the
//! engine never panics and that:
//! - every job is for a volume that some valid, current-generation request
//!   asks for, with the largest target such requests name, and never for a
//!   request whose final reply is already in its outbox slot;
//! - every write is the SPM header or a record of an outbox area, and every
//!   reply it writes decodes as valid and answers a valid request that is
//!   in the inbox at that host and slot.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use spmbox_core::spm::{JobResult, Spm, SpmConfig, SpmIo, settle};
use spmbox_core::time::Instant;
use spmbox_core::wire::{
    AREA_SIZE, Epoch, Generation, Geometry, HostId, InboxArea, InboxHeader, OutboxArea,
    OutboxHeader, RECORD_LEN, Reply, ReplyStatus, Request, SPM_HEADER_OFFSET, SlotState, Uuid,
};

const DOMAIN: Uuid = Uuid([0xd0; 16]);
const HOSTS: u16 = 8;

#[derive(Arbitrary, Debug)]
enum Slot {
    Empty,
    Request {
        generation: u8,
        sequence: u8,
        volume: u8,
        sectors: u16,
        paused: bool,
        misplace: u8,
    },
    Reply {
        generation: u8,
        sequence: u8,
        volume: u8,
        sectors: u16,
        status: u8,
        extra: u16,
    },
    Flipped {
        generation: u8,
        volume: u8,
        byte: u8,
    },
    Raw([u8; 16]),
}

#[derive(Arbitrary, Debug)]
struct Host {
    inbox_generation: u8,
    outbox_generation: u8,
    outbox_epoch: u8,
    inbox: [Slot; 4],
    outbox: [Slot; 4],
}

#[derive(Arbitrary, Debug)]
enum Step {
    Result { pick: u8, kind: u8, extra: u16 },
    Capacity { volume: u8, sectors: u16 },
    Rescan,
}

#[derive(Arbitrary, Debug)]
struct Input {
    hosts: Vec<Host>,
    steps: Vec<Step>,
}

fn request(
    host_id: u16,
    slot: u16,
    generation: u8,
    sequence: u8,
    volume: u8,
    sectors: u16,
    paused: bool,
) -> Request {
    Request {
        domain: DOMAIN,
        host_id: HostId::new(host_id),
        slot: spmbox_core::wire::Slot::new(slot),
        generation: Generation::new(u64::from(generation).max(1)),
        sequence: u64::from(sequence).max(1),
        volume: Uuid([volume % 4 + 1; 16]),
        target_size: u64::from(sectors.max(1)) * 512,
        current_size: 0,
        paused,
    }
}

fn status(code: u8, extra: u16) -> ReplyStatus {
    match code % 4 {
        0 => ReplyStatus::Extended,
        1 => ReplyStatus::WaitingForSpace,
        2 => ReplyStatus::Rejected(spmbox_core::wire::RejectReason::UnknownVolume),
        _ => ReplyStatus::Failed {
            code: u32::from(extra),
        },
    }
}

fn fill(area: &mut [u8], host_id: u16, slots: &[Slot; 4]) {
    for (i, slot) in slots.iter().enumerate() {
        let index = i as u16 + 1;
        let at = usize::from(index) * RECORD_LEN;
        let record: Option<[u8; RECORD_LEN]> = match *slot {
            Slot::Empty => None,
            Slot::Request {
                generation,
                sequence,
                volume,
                sectors,
                paused,
                misplace,
            } => {
                let mut r = request(
                    host_id, index, generation, sequence, volume, sectors, paused,
                );
                match misplace % 8 {
                    0 => r.host_id = HostId::new(host_id % HOSTS + 1),
                    1 => r.domain = Uuid([0xee; 16]),
                    _ => {}
                }
                r.to_bytes().ok()
            }
            Slot::Reply {
                generation,
                sequence,
                volume,
                sectors,
                status: code,
                extra,
            } => {
                let r = request(host_id, index, generation, sequence, volume, sectors, false);
                Reply {
                    domain: DOMAIN,
                    host_id: HostId::new(host_id),
                    slot: spmbox_core::wire::Slot::new(index),
                    generation: r.generation,
                    sequence: r.sequence,
                    volume: r.volume,
                    target_size: r.target_size,
                    size: r.target_size + u64::from(extra) * 512,
                    epoch: Epoch::new(1),
                    status: status(code, extra),
                }
                .to_bytes()
                .ok()
            }
            Slot::Flipped {
                generation,
                volume,
                byte,
            } => {
                let mut bytes = request(host_id, index, generation, 1, volume, 8, false)
                    .to_bytes()
                    .ok();
                if let Some(b) = bytes.as_mut() {
                    b[usize::from(byte) % RECORD_LEN] ^= 0x40;
                }
                bytes
            }
            Slot::Raw(head) => {
                let mut b = [0u8; RECORD_LEN];
                b[..16].copy_from_slice(&head);
                Some(b)
            }
        };
        if let Some(record) = record {
            area[at..at + RECORD_LEN].copy_from_slice(&record);
        }
    }
}

fuzz_target!(|input: Input| {
    let geometry = Geometry::new(HOSTS, 512).unwrap();
    let n = usize::from(HOSTS) * AREA_SIZE;
    let mut inbox = vec![0u8; n];
    let mut outbox = vec![0u8; n];
    for (i, host) in input.hosts.iter().take(usize::from(HOSTS)).enumerate() {
        let host_id = i as u16 + 1;
        let area = &mut inbox[i * AREA_SIZE..(i + 1) * AREA_SIZE];
        if host.inbox_generation > 0 {
            let h = InboxHeader {
                domain: DOMAIN,
                host_id: HostId::new(host_id),
                generation: Generation::new(u64::from(host.inbox_generation)),
                owner: 0,
                heartbeat: 0,
                heartbeat_interval_ms: 0,
                release_ack: 0,
            };
            area[..RECORD_LEN].copy_from_slice(&h.to_bytes().unwrap());
        }
        fill(area, host_id, &host.inbox);
        let area = &mut outbox[i * AREA_SIZE..(i + 1) * AREA_SIZE];
        if host.outbox_generation > 0 && host.outbox_epoch > 0 {
            let h = OutboxHeader {
                domain: DOMAIN,
                host_id: HostId::new(host_id),
                epoch: Epoch::new(u64::from(host.outbox_epoch)),
                generation: Generation::new(u64::from(host.outbox_generation)),
            };
            area[..RECORD_LEN].copy_from_slice(&h.to_bytes().unwrap());
        }
        fill(area, host_id, &host.outbox);
    }

    // What the engine may act on: valid, current requests without a final
    // reply that answers them.
    let mut actionable: Vec<Request> = Vec::new();
    let mut valid: Vec<Request> = Vec::new();
    for i in 0..usize::from(HOSTS) {
        let host_id = i as u16 + 1;
        let ia = InboxArea::new(
            &inbox[i * AREA_SIZE..(i + 1) * AREA_SIZE],
            DOMAIN,
            HostId::new(host_id),
        )
        .unwrap();
        let oa = OutboxArea::new(
            &outbox[i * AREA_SIZE..(i + 1) * AREA_SIZE],
            DOMAIN,
            HostId::new(host_id),
        )
        .unwrap();
        for (slot, state) in ia.slots() {
            if let SlotState::Valid(r) = state {
                valid.push(r);
                let done = match oa.slot(slot) {
                    Some(SlotState::Valid(reply)) | Some(SlotState::Stale(reply)) => {
                        reply.answers(&r) && reply.status.is_final()
                    }
                    _ => false,
                };
                if !done {
                    actionable.push(r);
                }
            }
        }
    }

    let config = SpmConfig::default();
    let mut spm: Spm<16> =
        Spm::new(Instant(0), DOMAIN, geometry, HostId::NONE, 1, None, config).unwrap();
    // The SPM acts once it has read its own header back.
    let mut header = [0u8; RECORD_LEN];
    while let Some(w) = spm.poll_write() {
        assert_eq!(
            w.offset, SPM_HEADER_OFFSET,
            "a write before the SPM settled"
        );
        header = w.record;
    }
    assert_eq!(spm.poll_job(), None);
    let settled = Instant(0) + settle(&config);
    assert_eq!(spm.poll_io(settled), Some(SpmIo::ReadSpmHeader));
    spm.handle_spm_header(settled, &header);
    assert!(spm.is_confirmed());
    spm.handle_hosts(settled, HostId::new(1), &inbox, &outbox);
    let mut jobs = Vec::new();
    let mut steps = input.steps.iter();
    for round in 0..64u64 {
        let now = Instant(settled.0 + round);
        while let Some(job) = spm.poll_job() {
            let asked: Vec<&Request> = actionable
                .iter()
                .filter(|r| r.volume == job.volume)
                .collect();
            assert!(
                !asked.is_empty(),
                "job {job:?} for a volume nobody asks for"
            );
            let max = asked.iter().map(|r| r.target_size).max().unwrap_or(0);
            assert!(
                job.target_size <= max,
                "job {job:?} beyond every request ({max})"
            );
            assert!(
                asked.iter().any(|r| r.target_size == job.target_size),
                "job {job:?} matches no request"
            );
            jobs.push(job);
        }
        // Commits: the batch closes, the engine reads its header back
        // (the harness's disk holds what it last wrote), then hands the
        // commit out; no reply of a batch is written before that.
        if spm.poll_commit().is_none() && spm.commit_pending() {
            while let Some(io) = spm.poll_io(now) {
                if io == SpmIo::ReadSpmHeader {
                    spm.handle_spm_header(now, &header);
                }
            }
        }
        if spm.poll_commit().is_some() {
            while let Some(w) = spm.poll_write() {
                assert_eq!(
                    w.offset, SPM_HEADER_OFFSET,
                    "a reply before its batch was committed"
                );
                header = w.record;
            }
            spm.handle_committed(now, round);
        }
        while let Some(w) = spm.poll_write() {
            if w.offset == SPM_HEADER_OFFSET {
                header = w.record;
                continue;
            }
            assert!(
                w.offset >= geometry.outbox_offset() && w.offset < geometry.mailbox_size(),
                "write at {}",
                w.offset
            );
            let area = (w.offset - geometry.outbox_offset()) / AREA_SIZE as u64;
            let index =
                ((w.offset - geometry.outbox_offset()) % AREA_SIZE as u64) / RECORD_LEN as u64;
            let host_id = area as u16 + 1;
            if index == 0 {
                let h = OutboxHeader::decode(&w.record).unwrap().unwrap();
                assert_eq!(h.host_id, HostId::new(host_id));
                continue;
            }
            let reply = Reply::decode(&w.record).unwrap().unwrap();
            assert!(
                valid.iter().any(|r| r.host_id == HostId::new(host_id)
                    && r.slot == spmbox_core::wire::Slot::new(index as u16)
                    && reply.answers(r)),
                "reply {reply:?} answers no request in the inbox"
            );
        }
        match steps.next() {
            Some(Step::Result { pick, kind, extra }) => {
                if !jobs.is_empty() {
                    let job = jobs.remove(usize::from(*pick) % jobs.len());
                    let size = job.target_size + u64::from(*extra) * 512;
                    let result = match kind % 6 {
                        0 | 1 => JobResult::Extended { size },
                        2 => JobResult::NoSpace { size: 0 },
                        3 => JobResult::UnknownVolume,
                        4 => JobResult::OverLimit { size: 0 },
                        _ => JobResult::Failed {
                            code: u32::from(*extra),
                        },
                    };
                    spm.handle_job_result(now, job.volume, result);
                }
            }
            Some(Step::Capacity { volume, sectors }) => {
                spm.handle_capacity(now, Uuid([volume % 4 + 1; 16]), u64::from(*sectors) * 512);
            }
            Some(Step::Rescan) => spm.handle_hosts(now, HostId::new(1), &inbox, &outbox),
            None => break,
        }
    }
});
