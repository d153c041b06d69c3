//! Arbitrary operation sequences on the reference pool (add a LUN, create a
//! volume, extend, delete, reduce, relocate a segment off a draining LUN,
//! drop a LUN, name a volume as moving or clear it, collect completions,
//! commit, reclaim released extents, reload the metadata, tear a commit),
//! checked after every step against a plain model.
//!
//! Checks: `check_invariants` always holds (no extent in two volumes or
//! released twice, every segment below its LUN's high-water mark, no volume
//! past its limit); a volume shrinks only when reduced (to the extents
//! asked) and disappears only when deleted; extents held by volumes plus
//! free plus released equal the pool's total; released extents become free
//! only through a reclaim at or after the commit that released them; an
//! extension either reaches its target (rounded to extents), parks with
//! nothing allocated, or is refused with nothing changed; a reload from the
//! metadata gives the same volumes, and a damaged newest copy gives the
//! previous commit's; `moving` is only ever nil or a volume of the pool
//! (naming an unknown one is refused with nothing changed, deleting the
//! moving volume clears it), each commit writes it in header bytes 48..64
//! and a reload gives the committed one.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use spmbox_core::pool::{Extend, Pool, PoolError, next_copy};
use spmbox_core::wire::Uuid;

type P = Pool<3, 6, 8, 4>;
const EXTENT: u64 = 1 << 20;
const COPY: usize = P::MAX_COPY_LEN.next_multiple_of(4096);

#[derive(Arbitrary, Debug)]
enum Op {
    AddLun {
        extents: u8,
    },
    Create {
        volume: u8,
        virtual_mib: u8,
        initial_mib: u8,
    },
    Extend {
        volume: u8,
        target_mib: u8,
        urgent: bool,
    },
    Complete,
    Commit,
    Delete {
        volume: u8,
    },
    Reduce {
        volume: u8,
        target_mib: u8,
    },
    /// Reclaim what commits up to `back` before the newest released.
    Reclaim {
        back: u8,
    },
    /// Drain a LUN, move its next segment where the pool proposes, end
    /// the drain.
    Relocate {
        lun: u8,
    },
    DropLun {
        lun: u8,
    },
    TearAndReload {
        byte: u16,
    },
    /// Name a volume as moving (`clear`: name none).
    SetMoving {
        volume: u8,
        clear: bool,
    },
}

fn sizes(pool: &P) -> Vec<(Uuid, u64)> {
    let mut v: Vec<_> = pool.volumes().map(|v| (v.id, v.size)).collect();
    v.sort();
    v
}

fuzz_target!(|ops: Vec<Op>| {
    let mut pool = P::new(EXTENT).unwrap();
    let mut copies = [vec![0u8; COPY], vec![0u8; COPY]];
    let mut seq = 0u64;
    let mut committed: Option<Vec<(Uuid, u64)>> = None;
    let mut previous: Option<Vec<(Uuid, u64)>> = None;
    let mut luns = 0u8;
    // The model's `moving`, and that of the newest and previous commits.
    let mut moving = Uuid::NIL;
    let mut committed_moving = Uuid::NIL;
    let mut previous_moving = Uuid::NIL;
    for op in ops.iter().take(200) {
        let before = sizes(&pool);
        let released_before = pool.released_extents();
        let mut reclaimed = false;
        let mut shrunk: Option<(Uuid, u64)> = None;
        let mut deleted: Option<Uuid> = None;
        match *op {
            Op::AddLun { extents } => {
                luns = luns.wrapping_add(1);
                let _ = pool.add_lun(Uuid([luns; 16]), u32::from(extents));
            }
            Op::Create {
                volume,
                virtual_mib,
                initial_mib,
            } => {
                let id = Uuid([volume % 6 + 1; 16]);
                let _ = pool.create_volume(
                    id,
                    u64::from(virtual_mib) * EXTENT,
                    u64::from(initial_mib) * EXTENT,
                );
            }
            Op::Extend {
                volume,
                target_mib,
                urgent,
            } => {
                let id = Uuid([volume % 6 + 1; 16]);
                let target = u64::from(target_mib) * EXTENT;
                let used_before = pool.total_extents() - pool.free_extents();
                match pool.extend(id, target, urgent) {
                    Ok(Extend::Extended { size }) => {
                        assert!(size >= target, "extended to {size} < {target}")
                    }
                    Ok(Extend::Parked { size }) => {
                        assert_eq!(
                            pool.total_extents() - pool.free_extents(),
                            used_before,
                            "a park allocated"
                        );
                        assert_eq!(Some(size), pool.volume(id).map(|v| v.size));
                    }
                    Err(_) => assert_eq!(
                        sizes(&pool),
                        before,
                        "a refused extension changed something"
                    ),
                }
            }
            Op::Complete => while pool.poll_completed().is_some() {},
            Op::Commit => {
                seq += 1;
                let copy = &mut copies[next_copy(seq)];
                copy.fill(0);
                let release_seq = pool.release_seq_for(seq);
                pool.encode(seq, copy).unwrap();
                assert_eq!(copy[40..48], release_seq.to_le_bytes());
                assert_eq!(copy[48..64], moving.0, "moving not written");
                let stamped = pool.stamp_released(seq);
                assert_eq!(stamped, release_seq == seq);
                assert_eq!(pool.release_seq(), release_seq);
                previous = committed.take();
                committed = Some(sizes(&pool));
                previous_moving = committed_moving;
                committed_moving = moving;
            }
            Op::Delete { volume } => {
                let id = Uuid([volume % 6 + 1; 16]);
                match pool.delete_volume(id) {
                    Ok(extents) => {
                        let had = before.iter().find(|(v, _)| *v == id).map(|(_, s)| *s);
                        assert_eq!(Some(extents * EXTENT), had);
                        deleted = Some(id);
                        if moving == id {
                            moving = Uuid::NIL;
                        }
                    }
                    Err(_) => {
                        assert_eq!(sizes(&pool), before, "a refused delete changed something")
                    }
                }
            }
            Op::Reduce { volume, target_mib } => {
                let id = Uuid([volume % 6 + 1; 16]);
                let target = u64::from(target_mib) * EXTENT;
                match pool.reduce_volume(id, target) {
                    Ok(size) => {
                        assert_eq!(size, target);
                        shrunk = Some((id, size));
                    }
                    Err(_) => {
                        assert_eq!(sizes(&pool), before, "a refused reduce changed something")
                    }
                }
            }
            Op::Reclaim { back } => {
                let acked = pool.release_seq().saturating_sub(u64::from(back % 3));
                let free = pool.free_extents();
                let freed = pool.reclaim(acked);
                reclaimed = true;
                // Parked requests may take some of what was freed.
                assert!(pool.free_extents() <= free + freed);
            }
            Op::Relocate { lun } => {
                let lun = u16::from(lun) % 3;
                if pool.set_draining(lun, true).is_ok() {
                    if let Ok(Some(plan)) = pool.plan_relocation(lun) {
                        pool.relocate(plan.volume, plan.segment, plan.to.lun, plan.to.first_extent)
                            .unwrap();
                        assert!(pool.segments(plan.volume).unwrap().iter().any(|s| {
                            s.lun == plan.to.lun
                                && s.first_extent <= plan.to.first_extent
                                && s.end() >= plan.to.end()
                        }));
                    }
                    pool.set_draining(lun, false).unwrap();
                }
                assert_eq!(sizes(&pool), before, "a relocation changed a size");
            }
            Op::DropLun { lun } => {
                let lun = u16::from(lun) % 3;
                let total = pool.total_extents();
                let count = pool.luns().len();
                let extents = pool.luns().get(usize::from(lun)).map(|l| l.extents);
                match pool.drop_lun(lun) {
                    Ok(()) => {
                        assert_eq!(pool.luns().len(), count - 1);
                        assert_eq!(pool.total_extents(), total - u64::from(extents.unwrap()));
                    }
                    Err(_) => assert_eq!(pool.luns().len(), count),
                }
                assert_eq!(sizes(&pool), before, "dropping a LUN changed a size");
            }
            Op::TearAndReload { byte } => {
                if seq > 0 {
                    let copy = &mut copies[next_copy(seq)];
                    // A byte the copy's checksum must cover: the magic.
                    let at = 4 + usize::from(byte) % 4;
                    copy[at] ^= 0x5a;
                    match P::decode(&copies[0], &copies[1]) {
                        Ok((reloaded, _)) => {
                            assert!(reloaded.check_invariants().is_ok());
                            assert_eq!(reloaded.moving(), previous_moving);
                            assert_eq!(
                                Some(sizes(&reloaded)),
                                previous.clone(),
                                "a torn commit did not fall back"
                            );
                        }
                        Err(_) => assert!(previous.is_none(), "the previous commit was lost"),
                    }
                    copies[next_copy(seq)][at] ^= 0x5a;
                    let (reloaded, s) = P::decode(&copies[0], &copies[1]).unwrap();
                    assert_eq!(s, seq);
                    assert_eq!(reloaded.moving(), committed_moving);
                    assert_eq!(
                        Some(sizes(&reloaded)),
                        committed.clone(),
                        "reload differs from the commit"
                    );
                }
            }
            Op::SetMoving { volume, clear } => {
                let id = if clear {
                    Uuid::NIL
                } else {
                    Uuid([volume % 6 + 1; 16])
                };
                let known = id == Uuid::NIL || before.iter().any(|(v, _)| *v == id);
                match pool.set_moving(id) {
                    Ok(()) => {
                        assert!(known, "an unknown volume named as moving");
                        moving = id;
                    }
                    Err(e) => {
                        assert!(!known, "a known volume refused: {e}");
                        assert_eq!(e, PoolError::UnknownVolume);
                    }
                }
                assert_eq!(
                    sizes(&pool),
                    before,
                    "naming a moving volume changed a size"
                );
            }
        }
        assert_eq!(pool.check_invariants(), Ok(()));
        assert_eq!(pool.moving(), moving);
        assert!(
            moving == Uuid::NIL || pool.volume(moving).is_some(),
            "moving names a volume the pool lacks"
        );
        for (id, size) in &before {
            let now = pool.volume(*id).map_or(0, |v| v.size);
            match (shrunk, deleted) {
                (Some((v, to)), _) if v == *id => assert_eq!(now, to),
                (_, Some(v)) if v == *id => assert_eq!(now, 0),
                _ => assert!(now >= *size, "volume shrank from {size} to {now}"),
            }
        }
        if !reclaimed {
            assert!(
                pool.released_extents() >= released_before,
                "released extents freed without a reclaim"
            );
        }
        let used: u64 = pool.volumes().map(|v| v.size / EXTENT).sum();
        assert_eq!(
            used + pool.free_extents() + pool.released_extents(),
            pool.total_extents()
        );
    }
});
