//! Arbitrary operation sequences on the SPM's request queue, checked after
//! every step against a plain model of what the queue must hold.
//!
//! Checks: the queue never holds more than its window or more than the
//! per-host cap for one host; `offer` says New, Known, Replaced, Full or
//! HostCap exactly when the model does; `next_job` picks a volume with no
//! job running, asks for the largest target queued for it, is urgent when
//! any of its requests is paused, and prefers a paused request's volume
//! whenever one is eligible.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use spmbox_core::spm::queue::{EntryState, Offered, Refused, RequestQueue};
use spmbox_core::wire::{Generation, HostId, Request, Slot, Uuid};

const WINDOW: usize = 6;
const CAP: usize = 3;

#[derive(Arbitrary, Debug)]
enum Op {
    Offer {
        host: u8,
        slot: u8,
        volume: u8,
        target: u8,
        sequence: u8,
        paused: bool,
    },
    NextJob,
    Remove {
        host: u8,
        slot: u8,
    },
}

#[derive(Clone, Copy, Debug)]
struct ModelEntry {
    request: Request,
    running: bool,
}

fn request(host: u8, slot: u8, volume: u8, target: u8, sequence: u8, paused: bool) -> Request {
    Request {
        domain: Uuid([1; 16]),
        host_id: HostId::new(u16::from(host % 4) + 1),
        slot: Slot::new(u16::from(slot % 4) + 1),
        generation: Generation::new(1),
        sequence: u64::from(sequence % 3) + 1,
        volume: Uuid([volume % 3 + 1; 16]),
        target_size: (u64::from(target % 4) + 1) << 20,
        current_size: 0,
        paused,
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut queue: RequestQueue<WINDOW> = RequestQueue::new(CAP);
    let mut model: Vec<ModelEntry> = Vec::new();
    for op in ops.iter().take(256) {
        match *op {
            Op::Offer {
                host,
                slot,
                volume,
                target,
                sequence,
                paused,
            } => {
                let r = request(host, slot, volume, target, sequence, paused);
                let same_slot = model
                    .iter()
                    .position(|e| e.request.host_id == r.host_id && e.request.slot == r.slot);
                let expected = match same_slot {
                    Some(i) => {
                        let e = model[i].request;
                        if e.sequence == r.sequence
                            && e.volume == r.volume
                            && e.target_size == r.target_size
                        {
                            model[i].request.paused |= r.paused;
                            Ok(Offered::Known)
                        } else {
                            model.swap_remove(i);
                            model.push(ModelEntry {
                                request: r,
                                running: false,
                            });
                            Ok(Offered::Replaced)
                        }
                    }
                    None if model
                        .iter()
                        .filter(|e| e.request.host_id == r.host_id)
                        .count()
                        >= CAP =>
                    {
                        Err(Refused::HostCap)
                    }
                    None if model.len() >= WINDOW => Err(Refused::Full),
                    None => {
                        model.push(ModelEntry {
                            request: r,
                            running: false,
                        });
                        Ok(Offered::New)
                    }
                };
                assert_eq!(queue.offer(r), expected, "offer {r:?}");
            }
            Op::NextJob => {
                let eligible: Vec<&ModelEntry> = model
                    .iter()
                    .filter(|e| {
                        !e.running
                            && !model
                                .iter()
                                .any(|o| o.running && o.request.volume == e.request.volume)
                    })
                    .collect();
                let any_paused = eligible.iter().any(|e| e.request.paused);
                match queue.next_job() {
                    None => assert!(
                        eligible.is_empty(),
                        "no job but {} eligible",
                        eligible.len()
                    ),
                    Some(job) => {
                        let of_volume: Vec<&&ModelEntry> = eligible
                            .iter()
                            .filter(|e| e.request.volume == job.volume)
                            .collect();
                        assert!(!of_volume.is_empty(), "job {job:?} for no eligible entry");
                        let max = of_volume
                            .iter()
                            .map(|e| e.request.target_size)
                            .max()
                            .unwrap();
                        assert_eq!(job.target_size, max);
                        assert_eq!(job.urgent, of_volume.iter().any(|e| e.request.paused));
                        if any_paused {
                            assert!(
                                job.urgent,
                                "a paused request was eligible but not served first"
                            );
                        }
                        for e in model
                            .iter_mut()
                            .filter(|e| e.request.volume == job.volume && !e.running)
                        {
                            e.running = true;
                        }
                    }
                }
            }
            Op::Remove { host, slot } => {
                let (host_id, slot) = (u16::from(host % 4) + 1, u16::from(slot % 4) + 1);
                let i = model.iter().position(|e| {
                    e.request.host_id == HostId::new(host_id) && e.request.slot == Slot::new(slot)
                });
                let removed = queue.remove(HostId::new(host_id), Slot::new(slot));
                assert_eq!(removed.is_some(), i.is_some());
                if let Some(i) = i {
                    model.swap_remove(i);
                }
            }
        }
        assert_eq!(queue.len(), model.len());
        assert!(queue.len() <= WINDOW);
        for h in 1..=4u16 {
            assert!(
                queue
                    .entries()
                    .iter()
                    .filter(|e| e.request.host_id == HostId::new(h))
                    .count()
                    <= CAP
            );
        }
        for e in &model {
            let q = queue
                .find(e.request.host_id, e.request.slot)
                .expect("entry in the model but not the queue");
            assert_eq!(q.request, e.request);
            assert_eq!(q.state == EntryState::Running, e.running);
        }
    }
});
