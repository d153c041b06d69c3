//! Arbitrary operation sequences on the reference pool (add a LUN, create a
//! volume, extend, collect completions, commit and reload the metadata, tear
//! a commit), checked after every step against a plain model.
//!
//! Checks: `check_invariants` always holds (no extent in two volumes, every
//! segment inside its LUN's used extents, no volume past its limit); a
//! volume never shrinks; used plus free extents equal the pool's total, and
//! used extents equal the sum of the volumes' sizes; an extension either
//! reaches its target (rounded to extents), parks with nothing allocated,
//! or is refused with nothing changed; a reload from the metadata gives the
//! same volumes, and a damaged newest copy gives the previous commit's.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use spmbox_core::pool::{Extend, Pool, next_copy};
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
    TearAndReload {
        byte: u16,
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
    for op in ops.iter().take(200) {
        let before = sizes(&pool);
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
                pool.encode(seq, copy).unwrap();
                previous = committed.take();
                committed = Some(sizes(&pool));
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
                    assert_eq!(
                        Some(sizes(&reloaded)),
                        committed.clone(),
                        "reload differs from the commit"
                    );
                }
            }
        }
        assert_eq!(pool.check_invariants(), Ok(()));
        for (id, size) in &before {
            let now = pool.volume(*id).map_or(0, |v| v.size);
            assert!(now >= *size, "volume shrank from {size} to {now}");
        }
        let used: u64 = pool.volumes().map(|v| v.size / EXTENT).sum();
        assert_eq!(used + pool.free_extents(), pool.total_extents());
    }
});
