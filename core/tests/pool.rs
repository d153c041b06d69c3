//! The thin pool against a trivial reference model.
//!
//! The model knows only sizes (in extents), the free extent count, the
//! parked set and the completion queue, in plain std collections; it says
//! nothing about where extents live. Random operation sequences (adding
//! LUNs, creating LVs, extending them, polling completions, committing
//! metadata, crashing and reloading, tearing the newest copy) run on both,
//! and after every step the pool must satisfy `check_invariants()` and
//! agree with the model.

use std::collections::{BTreeMap, VecDeque};

use proptest::prelude::*;
use spmbox_core::pool::{
    Completion, CopyDefect, Extend, MIB, Parked, Pool, PoolError, VolumeInfo, next_copy,
};
use spmbox_core::wire::Uuid;

const LUNS: usize = 4;
const LVS: usize = 6;
/// Enough that no LV ever runs out of segment slots in [`MAX_OPS`]
/// operations (each allocation adds at most one segment per LUN), so the
/// model need not know where extents live.
const SEGS: usize = LUNS * (MAX_OPS + 2);
const PARKED: usize = 3;
const MAX_OPS: usize = 40;
const EXT: u64 = MIB;

type P = Pool<LUNS, LVS, SEGS, PARKED>;

fn id(n: u8) -> Uuid {
    Uuid([n; 16])
}

/// The model's own limit formula, in u128 so it cannot overflow.
fn limit(virtual_size: u64) -> Option<u64> {
    let v = u128::from(virtual_size);
    let e = u128::from(EXT);
    let raw = v + v / 10 + e;
    u64::try_from(raw.div_ceil(e) * e).ok()
}

fn extents_for(bytes: u64) -> u64 {
    bytes.div_ceil(EXT)
}

#[derive(Clone, Debug, Default)]
struct Model {
    luns: Vec<(Uuid, u32)>,
    free: u64,
    /// LV -> (virtual size, extents).
    volumes: BTreeMap<Uuid, (u64, u64)>,
    /// In the order first parked.
    parked: Vec<Parked>,
    completed: VecDeque<Completion>,
}

impl Model {
    /// Serves parked requests after capacity arrived, the rule restated
    /// as a prefix: the service order is the parked list sorted (stably)
    /// with urgent requests first; the requests served are the longest
    /// prefix of that order whose needs, added up, fit the free extents
    /// (each LV is parked at most once, so the needs do not interact).
    fn serve_parked(&mut self) {
        let mut order: Vec<(usize, Parked)> = self.parked.iter().copied().enumerate().collect();
        order.sort_by_key(|&(i, p)| (!p.urgent, i));
        let mut total = 0u64;
        let mut served = Vec::new();
        for (i, p) in order {
            let extents = self.volumes[&p.volume].1;
            total += extents_for(p.target_size).saturating_sub(extents);
            if total > self.free {
                break;
            }
            served.push(i);
        }
        for &i in &served {
            let p = self.parked[i];
            let lv = self.volumes.get_mut(&p.volume).unwrap();
            let need = extents_for(p.target_size).saturating_sub(lv.1);
            self.free -= need;
            lv.1 += need;
            self.completed.push_back(Completion {
                volume: p.volume,
                size: lv.1 * EXT,
            });
        }
        let mut index = 0;
        self.parked.retain(|_| {
            index += 1;
            !served.contains(&(index - 1))
        });
    }

    fn add_lun(&mut self, lun: Uuid, extents: u32) -> Result<u16, PoolError> {
        if extents == 0 {
            return Err(PoolError::EmptyLun);
        }
        if self.luns.iter().any(|(l, _)| *l == lun) {
            return Err(PoolError::DuplicateLun);
        }
        if self.luns.len() == LUNS {
            return Err(PoolError::TooManyLuns);
        }
        self.luns.push((lun, extents));
        self.free += u64::from(extents);
        self.serve_parked();
        Ok((self.luns.len() - 1) as u16)
    }

    fn create(&mut self, lv: Uuid, virtual_size: u64, initial: u64) -> Result<(), PoolError> {
        if virtual_size == 0 || virtual_size % 512 != 0 {
            return Err(PoolError::InvalidSize { size: virtual_size });
        }
        if initial % 512 != 0 {
            return Err(PoolError::InvalidSize { size: initial });
        }
        let Some(limit) = limit(virtual_size) else {
            return Err(PoolError::InvalidSize { size: virtual_size });
        };
        if self.volumes.contains_key(&lv) {
            return Err(PoolError::DuplicateVolume);
        }
        if self.volumes.len() == LVS {
            return Err(PoolError::TooManyVolumes);
        }
        if initial > limit {
            return Err(PoolError::OverLimit { limit });
        }
        let needed = extents_for(initial).max(1);
        if needed > self.free {
            return Err(PoolError::NoSpace {
                needed,
                free: self.free,
            });
        }
        self.free -= needed;
        self.volumes.insert(lv, (virtual_size, needed));
        Ok(())
    }

    fn extend(&mut self, lv: Uuid, target: u64, urgent: bool) -> Result<Extend, PoolError> {
        if target == 0 || target % 512 != 0 {
            return Err(PoolError::InvalidSize { size: target });
        }
        let Some(&(virtual_size, extents)) = self.volumes.get(&lv) else {
            return Err(PoolError::UnknownVolume);
        };
        let size = extents * EXT;
        if target <= size {
            return Ok(Extend::Extended { size });
        }
        let limit = limit(virtual_size).unwrap();
        if target > limit {
            return Err(PoolError::OverLimit { limit });
        }
        let need = extents_for(target) - extents;
        if need <= self.free {
            self.free -= need;
            let new = extents + need;
            self.volumes.get_mut(&lv).unwrap().1 = new;
            if let Some(i) = self
                .parked
                .iter()
                .position(|p| p.volume == lv && p.target_size <= new * EXT)
            {
                self.parked.remove(i);
                self.completed.push_back(Completion {
                    volume: lv,
                    size: new * EXT,
                });
            }
            return Ok(Extend::Extended { size: new * EXT });
        }
        if let Some(p) = self.parked.iter_mut().find(|p| p.volume == lv) {
            p.target_size = p.target_size.max(target);
            p.urgent |= urgent;
        } else if self.parked.len() + self.completed.len() >= PARKED {
            return Err(PoolError::ParkedFull);
        } else {
            self.parked.push(Parked {
                volume: lv,
                target_size: target,
                urgent,
            });
        }
        Ok(Extend::Parked { size })
    }

    /// What a pool decoded from a commit of this model holds.
    fn committed(&self) -> Model {
        Model {
            parked: Vec::new(),
            completed: VecDeque::new(),
            ..self.clone()
        }
    }
}

/// Checks the pool's invariants and its agreement with the model.
fn agree(pool: &P, model: &Model) -> Result<(), TestCaseError> {
    if let Err(broken) = pool.check_invariants() {
        return Err(TestCaseError::fail(format!("invariant: {broken}")));
    }
    prop_assert_eq!(pool.free_extents(), model.free);
    let total: u64 = model.luns.iter().map(|(_, e)| u64::from(*e)).sum();
    prop_assert_eq!(pool.total_extents(), total);
    let luns: Vec<_> = pool.luns().iter().map(|l| (l.id, l.extents)).collect();
    prop_assert_eq!(luns, model.luns.clone());
    let volumes: Vec<VolumeInfo> = pool.volumes().collect();
    let expected: Vec<VolumeInfo> = model
        .volumes
        .iter()
        .map(|(&id, &(virtual_size, extents))| VolumeInfo {
            id,
            virtual_size,
            size: extents * EXT,
            limit: limit(virtual_size).unwrap(),
        })
        .collect();
    prop_assert_eq!(volumes, expected);
    for (&lv, &(_, extents)) in &model.volumes {
        let size = extents * EXT;
        prop_assert!(pool.map(lv, size - 1).is_some());
        prop_assert!(pool.map(lv, size).is_none());
        prop_assert_eq!(pool.volume(lv).map(|v| v.size), Some(size));
    }
    let urgent = model.parked.iter().filter(|p| p.urgent);
    let normal = model.parked.iter().filter(|p| !p.urgent);
    let order: Vec<Parked> = urgent.chain(normal).copied().collect();
    prop_assert_eq!(pool.parked().collect::<Vec<_>>(), order);
    Ok(())
}

#[derive(Clone, Debug)]
enum Op {
    AddLun {
        lun: u8,
        extents: u32,
    },
    Create {
        lv: u8,
        virtual_size: u64,
        initial: u64,
    },
    Extend {
        lv: u8,
        target: u64,
        urgent: bool,
    },
    Poll,
    /// Encode with the next sequence number into its copy.
    Commit,
    /// Crash and restart: decode both copies.
    Reload,
    /// Crash in the middle of the newest commit: one byte of the newest
    /// copy differs, then restart.
    Tear {
        at: usize,
        flip: u8,
    },
}

/// A size in bytes: mostly whole sectors up to `max_mib` MiB (LVs are a few
/// MiB and LUNs a few 1 MiB extents, so space runs out and requests park),
/// sometimes whole MiB, sometimes any value at all.
fn size(max_mib: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        10 => (1..=max_mib * 2048).prop_map(|sectors| sectors * 512),
        3 => (1..=max_mib).prop_map(|mib| mib * MIB),
        1 => any::<u64>(),
    ]
}

/// An LV id: mostly one of the three the setup creates.
fn lv() -> impl Strategy<Value = u8> {
    prop_oneof![4 => 1u8..=3, 1 => 1u8..=7]
}

fn op() -> impl Strategy<Value = Op> {
    let extents = prop_oneof![1 => Just(0u32), 12 => 1u32..8];
    let initial = prop_oneof![4 => Just(0u64), 4 => size(3), 1 => Just(1)];
    prop_oneof![
        2 => (1u8..=6, extents).prop_map(|(lun, extents)| Op::AddLun { lun, extents }),
        3 => (lv(), size(8), initial).prop_map(|(lv, virtual_size, initial)| {
            Op::Create {
                lv,
                virtual_size,
                initial,
            }
        }),
        10 => (lv(), size(10), any::<bool>()).prop_map(|(lv, target, urgent)| Op::Extend {
            lv,
            target,
            urgent
        }),
        3 => Just(Op::Poll),
        2 => Just(Op::Commit),
        1 => Just(Op::Reload),
        1 => (any::<usize>(), 1u8..=255).prop_map(|(at, flip)| Op::Tear { at, flip }),
    ]
}

/// A case: a LUN and up to three LVs to start with (so most operations
/// act on something), then random operations.
fn ops() -> impl Strategy<Value = Vec<Op>> {
    (
        1u32..10,
        1u8..=3,
        prop::collection::vec(op(), 1..=MAX_OPS - 4),
    )
        .prop_map(|(extents, lvs, rest)| {
            let mut ops = vec![Op::AddLun { lun: 1, extents }];
            ops.extend((1..=lvs).map(|lv| Op::Create {
                lv,
                virtual_size: 8 * MIB,
                initial: 0,
            }));
            ops.extend(rest);
            ops
        })
}

/// The simulated metadata area: two copies, and what each holds.
struct Disk {
    copies: [Vec<u8>; 2],
    /// The committed sequence number and model state of each copy, `None`
    /// when the copy is known torn.
    holds: [Option<(u64, Model)>; 2],
    /// Encoded length of each copy.
    lens: [usize; 2],
    /// The sequence number of the newest valid commit.
    newest: u64,
}

impl Disk {
    /// Formats: seq 0 of the empty pool in A, B zeroed.
    fn format(pool: &P) -> Disk {
        let mut a = vec![0; P::MAX_COPY_LEN];
        let len = pool.encode(0, &mut a).unwrap();
        Disk {
            copies: [a, vec![0; P::MAX_COPY_LEN]],
            holds: [Some((0, Model::default())), None],
            lens: [len, 0],
            newest: 0,
        }
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut pool = P::new(EXT).unwrap();
    let mut model = Model::default();
    let mut disk = Disk::format(&pool);
    for op in ops {
        match op {
            Op::AddLun { lun, extents } => {
                prop_assert_eq!(
                    pool.add_lun(id(lun), extents),
                    model.add_lun(id(lun), extents)
                );
            }
            Op::Create {
                lv,
                virtual_size,
                initial,
            } => {
                prop_assert_eq!(
                    pool.create_volume(id(lv), virtual_size, initial),
                    model.create(id(lv), virtual_size, initial)
                );
            }
            Op::Extend { lv, target, urgent } => {
                let before = pool.volume(id(lv));
                let got = pool.extend(id(lv), target, urgent);
                prop_assert_eq!(got, model.extend(id(lv), target, urgent));
                // Asking again is idempotent (for an extended request).
                if let Ok(Extend::Extended { size }) = got {
                    let free = pool.free_extents();
                    prop_assert_eq!(
                        pool.extend(id(lv), target, urgent),
                        Ok(Extend::Extended { size })
                    );
                    prop_assert_eq!(pool.free_extents(), free);
                    prop_assert!(before.is_none_or(|b| b.size <= size));
                }
            }
            Op::Poll => {
                prop_assert_eq!(pool.poll_completed(), model.completed.pop_front());
            }
            Op::Commit => {
                let seq = disk.newest + 1;
                let place = next_copy(seq);
                disk.lens[place] = pool.encode(seq, &mut disk.copies[place]).unwrap();
                disk.holds[place] = Some((seq, model.committed()));
                disk.newest = seq;
            }
            Op::Reload => match (
                P::decode(&disk.copies[0], &disk.copies[1]),
                &disk.holds[next_copy(disk.newest)],
            ) {
                (Ok((decoded, seq)), Some((newest, state))) => {
                    prop_assert_eq!(seq, *newest);
                    pool = decoded;
                    model = state.clone();
                }
                // Both copies torn: nothing loads; the pool carries on.
                (Err(PoolError::NoValidCopy { .. }), None) => {}
                (got, expected) => {
                    return Err(TestCaseError::fail(format!(
                        "reload gave {got:?}, expected {expected:?}"
                    )));
                }
            },
            Op::Tear { at, flip } => {
                let place = next_copy(disk.newest);
                let at = at % disk.lens[place];
                disk.copies[place][at] ^= flip;
                disk.holds[place] = None;
                let other = 1 - place;
                match (
                    P::decode(&disk.copies[0], &disk.copies[1]),
                    &disk.holds[other],
                ) {
                    (Ok((decoded, seq)), Some((older, state))) => {
                        prop_assert_eq!(seq, *older);
                        pool = decoded;
                        model = state.clone();
                        disk.newest = seq;
                    }
                    (Err(PoolError::NoValidCopy { a, b }), None) => {
                        // Both torn (or B never written): nothing loads,
                        // the running pool carries on.
                        let torn = if place == 0 { a } else { b };
                        prop_assert!(
                            !matches!(torn, CopyDefect::Empty),
                            "torn copy reported as {:?}",
                            torn
                        );
                    }
                    (got, expected) => {
                        return Err(TestCaseError::fail(format!(
                            "decode after tear gave {got:?}, expected {expected:?}"
                        )));
                    }
                }
            }
        }
        agree(&pool, &model)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn the_pool_agrees_with_the_model(ops in ops()) {
        run(ops)?;
    }

    #[test]
    fn decoding_any_bytes_never_panics(
        a in prop::collection::vec(any::<u8>(), 0..300),
        b in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        if let Ok((pool, _)) = P::decode(&a, &b) {
            prop_assert!(pool.check_invariants().is_ok());
        }
    }

    #[test]
    fn decoding_a_damaged_valid_copy_never_panics(
        ops in ops(),
        damage in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        reseal in any::<bool>(),
    ) {
        // Build some state, then overwrite a few bytes of its copy (and
        // perhaps fix the CRC so that the payload parser is exercised).
        damaged_copy_decodes_safely(ops, damage, reseal)?;
    }
}

/// Builds some state with `ops`, overwrites a few bytes of its metadata
/// copy (perhaps fixing the CRC so that the payload parser and the
/// invariant checks are exercised) and decodes it.
fn damaged_copy_decodes_safely(
    ops: Vec<Op>,
    damage: Vec<(usize, u8)>,
    reseal: bool,
) -> Result<(), TestCaseError> {
    let mut pool = P::new(EXT).unwrap();
    for op in ops {
        let _ = match op {
            Op::AddLun { lun, extents } => pool.add_lun(id(lun), extents).map(drop),
            Op::Create {
                lv,
                virtual_size,
                initial,
            } => pool.create_volume(id(lv), virtual_size, initial),
            Op::Extend { lv, target, urgent } => pool.extend(id(lv), target, urgent).map(drop),
            _ => Ok(()),
        };
    }
    let mut copy = vec![0; P::MAX_COPY_LEN];
    let len = pool.encode(0, &mut copy).unwrap();
    for (at, value) in damage {
        copy[at % len] = value;
    }
    if reseal {
        let payload_len = u32::from_le_bytes(copy[24..28].try_into().unwrap()) as usize;
        let end = (64 + payload_len).min(copy.len());
        let crc = spmbox_core::wire::CRC32C.checksum(&copy[4..end]);
        copy[..4].copy_from_slice(&crc.to_le_bytes());
    }
    if let Ok((decoded, _)) = P::decode(&copy, &[]) {
        prop_assert!(decoded.check_invariants().is_ok());
    }
    Ok(())
}

// --- the scenarios of the pool's contract, through the public API ---------

type Small = Pool<4, 8, 8, 4>;

fn small(extents: u32) -> Small {
    let mut p = Small::new(EXT).unwrap();
    p.add_lun(id(100), extents).unwrap();
    p
}

#[test]
fn a_torn_commit_decodes_to_the_previous_state() {
    let mut p = small(10);
    p.create_volume(id(1), 8 * MIB, 0).unwrap();
    let mut a = vec![0; Small::MAX_COPY_LEN];
    let mut b = vec![0; Small::MAX_COPY_LEN];
    p.encode(0, &mut a).unwrap();
    p.extend(id(1), 5 * MIB, false).unwrap();
    let len = p.encode(1, &mut b).unwrap();
    for at in 0..len {
        let mut torn = b.clone();
        torn[at] ^= 0x5A;
        let (q, seq) = Small::decode(&a, &torn).unwrap();
        assert_eq!(seq, 0);
        assert_eq!(q.volume(id(1)).unwrap().size, MIB, "byte {at}");
    }
}

#[test]
fn both_copies_corrupt_is_an_error() {
    let p = small(10);
    let mut a = vec![0; Small::MAX_COPY_LEN];
    let mut b = vec![0; Small::MAX_COPY_LEN];
    p.encode(0, &mut a).unwrap();
    p.encode(1, &mut b).unwrap();
    a[64] ^= 1;
    b[0] ^= 1;
    let err = Small::decode(&a, &b).unwrap_err();
    assert!(matches!(
        err,
        PoolError::NoValidCopy {
            a: CopyDefect::Checksum { .. },
            b: CopyDefect::Checksum { .. }
        }
    ));
    assert!(err.to_string().contains("copy A"));
}

#[test]
fn parked_urgent_completes_before_parked_non_urgent() {
    let mut p = small(2);
    p.create_volume(id(1), 8 * MIB, 0).unwrap();
    p.create_volume(id(2), 8 * MIB, 0).unwrap();
    assert!(matches!(
        p.extend(id(1), 2 * MIB, false),
        Ok(Extend::Parked { .. })
    ));
    assert!(matches!(
        p.extend(id(2), 2 * MIB, true),
        Ok(Extend::Parked { .. })
    ));
    p.add_lun(id(101), 2).unwrap();
    let done: Vec<_> = std::iter::from_fn(|| p.poll_completed()).collect();
    assert_eq!(
        done,
        [
            Completion {
                volume: id(2),
                size: 2 * MIB
            },
            Completion {
                volume: id(1),
                size: 2 * MIB
            },
        ]
    );
}

#[test]
fn a_parked_request_larger_than_new_capacity_blocks_later_ones() {
    let mut p = small(2);
    p.create_volume(id(1), 32 * MIB, 0).unwrap();
    p.create_volume(id(2), 32 * MIB, 0).unwrap();
    p.extend(id(1), 16 * MIB, false).unwrap();
    p.extend(id(2), 2 * MIB, false).unwrap();
    p.add_lun(id(101), 4).unwrap();
    assert_eq!(p.poll_completed(), None);
    assert_eq!(p.parked().count(), 2);
    p.add_lun(id(102), 12).unwrap();
    let order: Vec<_> = std::iter::from_fn(|| p.poll_completed())
        .map(|c| c.volume)
        .collect();
    assert_eq!(order, [id(1), id(2)]);
}

#[test]
fn extending_is_idempotent() {
    let mut p = small(10);
    p.create_volume(id(1), 8 * MIB, 0).unwrap();
    let first = p.extend(id(1), 3 * MIB, false).unwrap();
    let segments = p.segments(id(1)).unwrap().to_vec();
    for _ in 0..3 {
        assert_eq!(p.extend(id(1), 3 * MIB, false).unwrap(), first);
        assert_eq!(p.extend(id(1), 2 * MIB, true).unwrap(), first);
    }
    assert_eq!(p.segments(id(1)).unwrap(), segments.as_slice());
    assert_eq!(p.free_extents(), 7);
}
