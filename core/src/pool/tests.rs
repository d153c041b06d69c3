//! Unit tests of the pool, one behaviour each.

use super::*;

/// Small limits so that every limit is easy to reach.
type Small = Pool<4, 8, 4, 4>;

const EXT: u64 = MIB;

fn id(n: u8) -> Uuid {
    Uuid([n; 16])
}

fn pool() -> Small {
    Small::new(EXT).unwrap()
}

/// A pool with one LUN of `extents` extents.
fn pool_with(extents: u32) -> Small {
    let mut p = pool();
    p.add_lun(id(100), extents).unwrap();
    p
}

fn size(p: &Small, volume: Uuid) -> u64 {
    p.volume(volume).unwrap().size
}

fn completions(p: &mut Small) -> std::vec::Vec<Completion> {
    core::iter::from_fn(|| p.poll_completed()).collect()
}

/// Recomputes the CRC of an encoded copy after its bytes were edited.
fn reseal(copy: &mut [u8]) {
    let payload_len = u32::from_le_bytes(copy[24..28].try_into().unwrap()) as usize;
    let end = (METADATA_HEADER_LEN + payload_len).min(copy.len());
    let crc = crate::wire::CRC32C.checksum(&copy[4..end]);
    copy[..4].copy_from_slice(&crc.to_le_bytes());
}

fn buffer() -> std::vec::Vec<u8> {
    std::vec![0; Small::MAX_COPY_LEN]
}

// --- construction and limits -------------------------------------------

#[test]
fn default_extent_size_is_128_mib() {
    assert_eq!(DEFAULT_EXTENT_SIZE, 128 << 20);
    assert_eq!(
        Small::new(DEFAULT_EXTENT_SIZE).unwrap().extent_size(),
        128 << 20
    );
}

#[test]
fn extent_sizes_that_are_not_powers_of_two_are_refused() {
    let e = 3 * MIB;
    assert_eq!(
        Small::new(e).unwrap_err(),
        PoolError::InvalidExtentSize { extent_size: e }
    );
}

#[test]
fn extent_sizes_outside_1_mib_to_16_gib_are_refused() {
    for e in [0, 512, MIB / 2, MAX_EXTENT_SIZE * 2] {
        assert!(Small::new(e).is_err(), "{e}");
    }
    assert!(Small::new(MIN_EXTENT_SIZE).is_ok());
    assert!(Small::new(MAX_EXTENT_SIZE).is_ok());
}

#[test]
fn max_size_adds_a_tenth_and_one_extent_rounded_up_to_whole_extents() {
    let e = 128 * MIB;
    // 10 GiB + 1 GiB + 128 MiB = 89 extents exactly.
    assert_eq!(max_size(10 << 30, e), Some(89 * e));
    // 1 GiB + 102.4 MiB + 128 MiB rounds up to 10 extents.
    assert_eq!(max_size(1 << 30, e), Some(10 * e));
}

#[test]
fn max_size_is_none_on_overflow_or_a_bad_extent_size() {
    assert_eq!(max_size(u64::MAX - 512, MIB), None);
    assert_eq!(max_size(1 << 30, 3 * MIB), None);
}

// --- LUNs ----------------------------------------------------------------

#[test]
fn adding_a_lun_grows_free_and_total_extents() {
    let mut p = pool();
    p.add_lun(id(100), 10).unwrap();
    p.add_lun(id(101), 5).unwrap();
    assert_eq!((p.total_extents(), p.free_extents()), (15, 15));
}

#[test]
fn lun_indexes_follow_the_order_luns_were_added() {
    let mut p = pool();
    assert_eq!(p.add_lun(id(101), 1), Ok(0));
    assert_eq!(p.add_lun(id(100), 1), Ok(1));
    assert_eq!(p.luns()[1].id, id(100));
}

#[test]
fn adding_a_lun_twice_is_refused() {
    let mut p = pool_with(4);
    assert_eq!(p.add_lun(id(100), 4), Err(PoolError::DuplicateLun));
    assert_eq!(p.total_extents(), 4);
}

#[test]
fn a_lun_without_extents_is_refused() {
    assert_eq!(pool().add_lun(id(100), 0), Err(PoolError::EmptyLun));
}

#[test]
fn more_than_luns_luns_are_refused() {
    let mut p = pool();
    for n in 0..4 {
        p.add_lun(id(100 + n), 1).unwrap();
    }
    assert_eq!(p.add_lun(id(120), 1), Err(PoolError::TooManyLuns));
}

#[test]
fn a_lun_larger_than_u64_bytes_is_refused() {
    let mut p = Small::new(MAX_EXTENT_SIZE).unwrap();
    assert_eq!(p.add_lun(id(100), u32::MAX), Err(PoolError::LunTooLarge));
}

#[test]
fn nil_ids_are_refused() {
    let mut p = pool_with(4);
    assert_eq!(p.add_lun(Uuid::NIL, 1), Err(PoolError::NilId));
    assert_eq!(p.create_volume(Uuid::NIL, EXT, 0), Err(PoolError::NilId));
}

// --- creating volumes ----------------------------------------------------

#[test]
fn creating_a_volume_allocates_its_initial_size_in_whole_extents() {
    let mut p = pool_with(10);
    p.create_volume(id(1), 8 * EXT, EXT + 512).unwrap();
    let info = p.volume(id(1)).unwrap();
    assert_eq!(info.size, 2 * EXT);
    assert_eq!(info.virtual_size, 8 * EXT);
    assert_eq!(info.limit, max_size(8 * EXT, EXT).unwrap());
    assert_eq!(p.free_extents(), 8);
}

#[test]
fn creating_a_volume_with_no_initial_size_allocates_one_extent() {
    let mut p = pool_with(10);
    p.create_volume(id(1), 8 * EXT, 0).unwrap();
    assert_eq!(size(&p, id(1)), EXT);
}

#[test]
fn creating_a_volume_twice_is_refused() {
    let mut p = pool_with(10);
    p.create_volume(id(1), 8 * EXT, 0).unwrap();
    assert_eq!(
        p.create_volume(id(1), 8 * EXT, 0),
        Err(PoolError::DuplicateVolume)
    );
    assert_eq!(p.free_extents(), 9);
}

#[test]
fn more_than_lvs_volumes_are_refused() {
    let mut p = pool_with(20);
    for n in 1..=8 {
        p.create_volume(id(n), EXT, 0).unwrap();
    }
    assert_eq!(
        p.create_volume(id(9), EXT, 0),
        Err(PoolError::TooManyVolumes)
    );
}

#[test]
fn creating_a_volume_without_space_is_refused_and_changes_nothing() {
    let mut p = pool_with(2);
    assert_eq!(
        p.create_volume(id(1), 8 * EXT, 3 * EXT),
        Err(PoolError::NoSpace { needed: 3, free: 2 })
    );
    assert_eq!(p.free_extents(), 2);
    assert!(p.volume(id(1)).is_none());
    assert_eq!(p.parked().count(), 0);
}

#[test]
fn creating_a_volume_larger_than_its_limit_is_refused() {
    let mut p = pool_with(100);
    let limit = max_size(2 * EXT, EXT).unwrap();
    assert_eq!(
        p.create_volume(id(1), 2 * EXT, limit + EXT),
        Err(PoolError::OverLimit { limit })
    );
}

#[test]
fn sizes_must_be_whole_sectors() {
    let mut p = pool_with(10);
    assert_eq!(
        p.create_volume(id(1), EXT + 1, 0),
        Err(PoolError::InvalidSize { size: EXT + 1 })
    );
    assert_eq!(
        p.create_volume(id(1), 0, 0),
        Err(PoolError::InvalidSize { size: 0 })
    );
    assert_eq!(
        p.create_volume(id(1), EXT, 100),
        Err(PoolError::InvalidSize { size: 100 })
    );
}

// --- extending -------------------------------------------------------------

#[test]
fn extending_grows_the_last_segment_when_it_ends_at_the_high_water_mark() {
    let mut p = pool_with(10);
    p.create_volume(id(1), 8 * EXT, 0).unwrap();
    assert_eq!(
        p.extend(id(1), 3 * EXT, false),
        Ok(Extend::Extended { size: 3 * EXT })
    );
    let segments = p.segments(id(1)).unwrap();
    assert_eq!(
        segments,
        &[Segment {
            lun: 0,
            first_extent: 0,
            extents: 3
        }]
    );
}

#[test]
fn a_new_lv_starts_mid_run_after_another_lvs_last_segment_which_then_grows_in_place() {
    let mut p = pool_with(10);
    p.create_volume(id(1), 8 * EXT, 0).unwrap();
    // The free run 1..10 follows id(1)'s last segment: id(2) starts at
    // 1 + min(9 / 2, 9 - 1) = 5.
    p.create_volume(id(2), 8 * EXT, 0).unwrap();
    p.extend(id(1), 2 * EXT, false).unwrap();
    let one = |first_extent, extents| Segment {
        lun: 0,
        first_extent,
        extents,
    };
    assert_eq!(p.segments(id(1)).unwrap(), &[one(0, 2)]);
    assert_eq!(p.segments(id(2)).unwrap(), &[one(5, 1)]);
}

#[test]
fn extending_spans_luns_in_lun_order() {
    let mut p = pool_with(2);
    p.add_lun(id(101), 2).unwrap();
    p.add_lun(id(102), 2).unwrap();
    p.create_volume(id(1), 8 * EXT, 0).unwrap();
    p.extend(id(1), 5 * EXT, false).unwrap();
    assert_eq!(
        p.segments(id(1)).unwrap(),
        &[
            Segment {
                lun: 0,
                first_extent: 0,
                extents: 2
            },
            Segment {
                lun: 1,
                first_extent: 0,
                extents: 2
            },
            Segment {
                lun: 2,
                first_extent: 0,
                extents: 1
            },
        ]
    );
    assert_eq!(p.free_extents(), 1);
}

#[test]
fn extending_to_a_size_already_reached_changes_nothing() {
    let mut p = pool_with(10);
    p.create_volume(id(1), 8 * EXT, 2 * EXT).unwrap();
    let before = p.clone();
    for target in [512, EXT, 2 * EXT] {
        assert_eq!(
            p.extend(id(1), target, true),
            Ok(Extend::Extended { size: 2 * EXT })
        );
    }
    assert_eq!(p.segments(id(1)), before.segments(id(1)));
    assert_eq!(p.free_extents(), before.free_extents());
}

#[test]
fn extending_twice_to_the_same_target_is_idempotent() {
    let mut p = pool_with(10);
    p.create_volume(id(1), 8 * EXT, 0).unwrap();
    let first = p.extend(id(1), 3 * EXT, false).unwrap();
    let free = p.free_extents();
    assert_eq!(p.extend(id(1), 3 * EXT, false).unwrap(), first);
    assert_eq!(p.free_extents(), free);
}

#[test]
fn extending_rounds_up_to_whole_extents() {
    let mut p = pool_with(10);
    p.create_volume(id(1), 8 * EXT, 0).unwrap();
    assert_eq!(
        p.extend(id(1), EXT + 512, false),
        Ok(Extend::Extended { size: 2 * EXT })
    );
}

#[test]
fn extending_an_unknown_volume_is_refused() {
    let mut p = pool_with(10);
    assert_eq!(p.extend(id(1), EXT, false), Err(PoolError::UnknownVolume));
}

#[test]
fn extending_beyond_the_limit_is_refused_with_the_limit() {
    let mut p = pool_with(100);
    p.create_volume(id(1), 8 * EXT, 0).unwrap();
    let limit = max_size(8 * EXT, EXT).unwrap();
    assert_eq!(
        p.extend(id(1), limit + 512, false),
        Err(PoolError::OverLimit { limit })
    );
    assert_eq!(
        p.extend(id(1), limit, false),
        Ok(Extend::Extended { size: limit })
    );
}

#[test]
fn targets_must_be_nonzero_whole_sectors() {
    let mut p = pool_with(10);
    p.create_volume(id(1), 8 * EXT, 0).unwrap();
    assert_eq!(
        p.extend(id(1), 0, false),
        Err(PoolError::InvalidSize { size: 0 })
    );
    assert_eq!(
        p.extend(id(1), EXT + 1, false),
        Err(PoolError::InvalidSize { size: EXT + 1 })
    );
}

/// Gives `id(1)` four one-extent segments on LUN 0, interleaved with
/// `id(2)`'s, and leaves `free` extents free on LUN 0.
fn fragmented(free: u32) -> Small {
    let mut p = pool_with(8 + free);
    p.create_volume(id(1), 64 * EXT, 0).unwrap();
    p.create_volume(id(2), 64 * EXT, 0).unwrap();
    // The allocation rule keeps LVs apart; lay them out by hand.
    for (v, lv) in p.volumes.iter_mut().enumerate() {
        lv.segments.clear();
        for n in 0..4 {
            let segment = Segment {
                lun: 0,
                first_extent: 2 * n + v as u32,
                extents: 1,
            };
            lv.segments.push(segment).unwrap();
        }
    }
    p.luns[0].used = 8;
    p.rebuild_order();
    p.check_invariants().unwrap();
    assert_eq!(p.free_extents(), u64::from(free));
    p
}

#[test]
fn extending_without_a_free_segment_slot_is_refused_and_changes_nothing() {
    let mut p = fragmented(4);
    let free = p.free_extents();
    assert_eq!(
        p.extend(id(1), 5 * EXT, false),
        Err(PoolError::SegmentsFull)
    );
    assert_eq!(p.free_extents(), free);
    assert_eq!(size(&p, id(1)), 4 * EXT);
    p.check_invariants().unwrap();
}

#[test]
fn a_contiguous_extension_needs_no_free_segment_slot() {
    // id(2) allocated last on LUN 0: its last segment ends at the mark.
    let mut p = fragmented(4);
    assert_eq!(
        p.extend(id(2), 6 * EXT, false),
        Ok(Extend::Extended { size: 6 * EXT })
    );
    assert_eq!(p.segments(id(2)).unwrap().len(), 4);
}

// --- parking -----------------------------------------------------------------

#[test]
fn extending_without_space_parks_and_allocates_nothing() {
    let mut p = pool_with(3);
    p.create_volume(id(1), 8 * EXT, 0).unwrap();
    assert_eq!(
        p.extend(id(1), 4 * EXT, true),
        Ok(Extend::Parked { size: EXT })
    );
    assert_eq!(p.free_extents(), 2);
    assert_eq!(size(&p, id(1)), EXT);
    assert_eq!(
        p.parked().collect::<std::vec::Vec<_>>(),
        [Parked {
            volume: id(1),
            target_size: 4 * EXT,
            urgent: true
        }]
    );
    p.check_invariants().unwrap();
}

#[test]
fn parking_twice_keeps_the_larger_target_and_ors_urgency() {
    let mut p = pool_with(2);
    p.create_volume(id(1), 8 * EXT, 0).unwrap();
    p.extend(id(1), 6 * EXT, true).unwrap();
    p.extend(id(1), 5 * EXT, false).unwrap();
    let parked: std::vec::Vec<_> = p.parked().collect();
    assert_eq!(
        parked,
        [Parked {
            volume: id(1),
            target_size: 6 * EXT,
            urgent: true
        }]
    );
}

#[test]
fn parking_when_all_places_are_taken_is_refused_and_changes_nothing() {
    let mut p = pool_with(5);
    for n in 1..=5 {
        p.create_volume(id(n), 8 * EXT, 0).unwrap();
    }
    for n in 1..=4 {
        assert!(matches!(
            p.extend(id(n), 8 * EXT, false),
            Ok(Extend::Parked { .. })
        ));
    }
    assert_eq!(p.extend(id(5), 8 * EXT, false), Err(PoolError::ParkedFull));
    // A second park for an LV already parked still merges.
    assert!(p.extend(id(1), 8 * EXT, true).is_ok());
    assert_eq!(p.parked().count(), 4);
}

#[test]
fn unpolled_completions_take_parked_places() {
    let mut p = pool_with(4);
    for n in 1..=4 {
        p.create_volume(id(n), 8 * EXT, 0).unwrap();
    }
    for n in 1..=4 {
        p.extend(id(n), 2 * EXT, false).unwrap();
    }
    p.add_lun(id(101), 4).unwrap();
    assert_eq!(p.parked().count(), 0);
    assert_eq!(p.extend(id(1), 8 * EXT, false), Err(PoolError::ParkedFull));
    assert!(p.poll_completed().is_some());
    assert_eq!(
        p.extend(id(1), 8 * EXT, false),
        Ok(Extend::Parked { size: 2 * EXT })
    );
}

#[test]
fn a_parked_request_completes_when_a_lun_is_added() {
    let mut p = pool_with(2);
    p.create_volume(id(1), 8 * EXT, 0).unwrap();
    p.extend(id(1), 4 * EXT, false).unwrap();
    assert_eq!(p.poll_completed(), None);
    p.add_lun(id(101), 2).unwrap();
    assert_eq!(
        completions(&mut p),
        [Completion {
            volume: id(1),
            size: 4 * EXT
        }]
    );
    assert_eq!(size(&p, id(1)), 4 * EXT);
    assert_eq!(p.parked().count(), 0);
    p.check_invariants().unwrap();
}

#[test]
fn parked_urgent_requests_complete_before_earlier_non_urgent_ones() {
    let mut p = pool_with(2);
    p.create_volume(id(1), 8 * EXT, 0).unwrap();
    p.create_volume(id(2), 8 * EXT, 0).unwrap();
    p.extend(id(1), 3 * EXT, false).unwrap();
    p.extend(id(2), 3 * EXT, true).unwrap();
    // Room for one of them only.
    p.add_lun(id(101), 2).unwrap();
    assert_eq!(
        completions(&mut p),
        [Completion {
            volume: id(2),
            size: 3 * EXT
        }]
    );
    assert_eq!(
        p.parked().map(|q| q.volume).collect::<std::vec::Vec<_>>(),
        [id(1)]
    );
}

#[test]
fn parked_requests_of_equal_urgency_complete_in_the_order_they_were_parked() {
    let mut p = pool_with(3);
    for n in 1..=3 {
        p.create_volume(id(n), 8 * EXT, 0).unwrap();
    }
    for n in [3, 1, 2] {
        p.extend(id(n), 2 * EXT, false).unwrap();
    }
    p.add_lun(id(101), 3).unwrap();
    let order: std::vec::Vec<_> = completions(&mut p).iter().map(|c| c.volume).collect();
    assert_eq!(order, [id(3), id(1), id(2)]);
}

#[test]
fn a_parked_request_too_large_for_new_capacity_blocks_later_ones() {
    let mut p = pool_with(2);
    p.create_volume(id(1), 64 * EXT, 0).unwrap();
    p.create_volume(id(2), 64 * EXT, 0).unwrap();
    p.extend(id(1), 20 * EXT, true).unwrap();
    p.extend(id(2), 2 * EXT, false).unwrap();
    // 2 extents would serve id(2), but id(1) comes first and needs 19.
    p.add_lun(id(101), 2).unwrap();
    assert_eq!(p.poll_completed(), None);
    assert_eq!(p.parked().count(), 2);
    assert_eq!(p.free_extents(), 2);
    // Enough for both: served in order.
    p.add_lun(id(102), 18).unwrap();
    let order: std::vec::Vec<_> = completions(&mut p).iter().map(|c| c.volume).collect();
    assert_eq!(order, [id(1), id(2)]);
    p.check_invariants().unwrap();
}

#[test]
fn parked_lists_urgent_requests_first_then_in_parking_order() {
    let mut p = pool_with(4);
    for n in 1..=4 {
        p.create_volume(id(n), 8 * EXT, 0).unwrap();
    }
    for (n, urgent) in [(1, false), (2, true), (3, false), (4, true)] {
        p.extend(id(n), 4 * EXT, urgent).unwrap();
    }
    let order: std::vec::Vec<_> = p.parked().map(|q| q.volume).collect();
    assert_eq!(order, [id(2), id(4), id(1), id(3)]);
}

#[test]
fn a_new_request_that_fits_is_served_while_others_are_parked() {
    let mut p = pool_with(3);
    p.create_volume(id(1), 64 * EXT, 0).unwrap();
    p.create_volume(id(2), 64 * EXT, 0).unwrap();
    p.extend(id(1), 10 * EXT, true).unwrap();
    assert_eq!(
        p.extend(id(2), 2 * EXT, false),
        Ok(Extend::Extended { size: 2 * EXT })
    );
    assert_eq!(p.parked().count(), 1);
}

#[test]
fn a_smaller_direct_extension_leaves_the_parked_request_waiting() {
    let mut p = pool_with(3);
    p.create_volume(id(1), 64 * EXT, 0).unwrap();
    p.extend(id(1), 4 * EXT, false).unwrap(); // needs 3, 2 free: parked
    assert_eq!(
        p.extend(id(1), 2 * EXT, false),
        Ok(Extend::Extended { size: 2 * EXT })
    );
    assert_eq!(
        p.parked()
            .map(|q| q.target_size)
            .collect::<std::vec::Vec<_>>(),
        [4 * EXT]
    );
    assert_eq!(p.poll_completed(), None);
    p.add_lun(id(101), 10).unwrap();
    assert_eq!(
        completions(&mut p),
        [Completion {
            volume: id(1),
            size: 4 * EXT
        }]
    );
}

#[test]
fn a_direct_extension_that_satisfies_a_parked_request_completes_it() {
    let mut p = pool_with(2);
    p.create_volume(id(1), 64 * EXT, 0).unwrap();
    p.create_volume(id(2), 64 * EXT, 0).unwrap();
    p.extend(id(2), 30 * EXT, true).unwrap();
    p.extend(id(1), 4 * EXT, false).unwrap();
    // id(2) blocks id(1) at capacity arrival (strict order) ...
    p.add_lun(id(101), 5).unwrap();
    assert_eq!(p.parked().count(), 2);
    // ... but a direct request for id(1) fits and completes its park.
    assert_eq!(
        p.extend(id(1), 4 * EXT, false),
        Ok(Extend::Extended { size: 4 * EXT })
    );
    assert_eq!(
        completions(&mut p),
        [Completion {
            volume: id(1),
            size: 4 * EXT
        }]
    );
    assert_eq!(
        p.parked().map(|q| q.volume).collect::<std::vec::Vec<_>>(),
        [id(2)]
    );
    p.check_invariants().unwrap();
}

#[test]
fn a_parked_request_whose_lv_has_no_segment_slot_left_is_dropped_with_its_size() {
    let mut p = fragmented(0);
    // Make LUN 0's last allocation someone else's, then park id(1).
    assert!(matches!(
        p.extend(id(1), 5 * EXT, true),
        Ok(Extend::Parked { .. })
    ));
    p.add_lun(id(101), 10).unwrap();
    assert_eq!(
        completions(&mut p),
        [Completion {
            volume: id(1),
            size: 4 * EXT
        }]
    );
    assert_eq!(p.parked().count(), 0);
    p.check_invariants().unwrap();
}

// --- withdrawing parked requests ----------------------------------------------

#[test]
fn a_parked_request_nobody_waits_for_is_removed_without_a_completion() {
    let mut p = pool_with(2);
    p.create_volume(id(1), 8 * EXT, 0).unwrap();
    p.extend(id(1), 4 * EXT, false).unwrap();
    assert_eq!(p.withdraw_parked(|_| None), 1);
    assert_eq!(p.parked().count(), 0);
    p.add_lun(id(101), 8).unwrap();
    assert_eq!(completions(&mut p), []);
    assert_eq!(size(&p, id(1)), EXT, "capacity serves only what waits");
    p.check_invariants().unwrap();
}

#[test]
fn a_parked_request_is_lowered_to_what_still_waits_and_keeps_its_place() {
    let mut p = pool_with(3);
    p.create_volume(id(1), 8 * EXT, 0).unwrap();
    p.create_volume(id(2), 8 * EXT, 0).unwrap();
    p.extend(id(1), 6 * EXT, true).unwrap();
    p.extend(id(2), 3 * EXT, true).unwrap();
    let changed = p.withdraw_parked(|v| {
        Some(if v == id(1) {
            (4 * EXT, true)
        } else {
            (3 * EXT, true)
        })
    });
    assert_eq!(changed, 1);
    assert_eq!(
        p.parked().collect::<std::vec::Vec<_>>(),
        [
            Parked {
                volume: id(1),
                target_size: 4 * EXT,
                urgent: true
            },
            Parked {
                volume: id(2),
                target_size: 3 * EXT,
                urgent: true
            }
        ]
    );
    p.check_invariants().unwrap();
}

#[test]
fn withdrawing_never_raises_a_target_or_makes_a_request_urgent() {
    let mut p = pool_with(2);
    p.create_volume(id(1), 8 * EXT, 0).unwrap();
    p.extend(id(1), 4 * EXT, false).unwrap();
    assert_eq!(p.withdraw_parked(|_| Some((8 * EXT, true))), 0);
    assert_eq!(
        p.parked().collect::<std::vec::Vec<_>>(),
        [Parked {
            volume: id(1),
            target_size: 4 * EXT,
            urgent: false
        }]
    );
}

#[test]
fn a_parked_request_whose_paused_guests_left_is_no_longer_urgent() {
    let mut p = pool_with(3);
    p.create_volume(id(1), 8 * EXT, 0).unwrap();
    p.create_volume(id(2), 8 * EXT, 0).unwrap();
    p.extend(id(1), 3 * EXT, false).unwrap();
    p.extend(id(2), 3 * EXT, true).unwrap();
    p.withdraw_parked(|_| Some((3 * EXT, false)));
    // Room for one: the first parked now, as neither is urgent.
    p.add_lun(id(101), 2).unwrap();
    let order: std::vec::Vec<_> = completions(&mut p).iter().map(|c| c.volume).collect();
    assert_eq!(order, [id(1)]);
}

#[test]
fn a_parked_request_lowered_to_what_the_volume_has_completes_at_once() {
    let mut p = pool_with(3);
    p.create_volume(id(1), 8 * EXT, 2 * EXT).unwrap();
    p.extend(id(1), 6 * EXT, false).unwrap();
    assert_eq!(p.withdraw_parked(|_| Some((2 * EXT, false))), 1);
    assert_eq!(p.parked().count(), 0);
    assert_eq!(
        completions(&mut p),
        [Completion {
            volume: id(1),
            size: 2 * EXT
        }]
    );
    p.check_invariants().unwrap();
}

#[test]
fn a_withdrawn_large_urgent_request_no_longer_holds_back_smaller_ones() {
    let mut p = pool_with(2);
    p.create_volume(id(1), 64 * EXT, 0).unwrap();
    p.create_volume(id(2), 64 * EXT, 0).unwrap();
    p.extend(id(1), 20 * EXT, true).unwrap();
    p.extend(id(2), 2 * EXT, false).unwrap();
    p.withdraw_parked(|v| (v == id(2)).then_some((2 * EXT, false)));
    p.add_lun(id(101), 2).unwrap();
    let order: std::vec::Vec<_> = completions(&mut p).iter().map(|c| c.volume).collect();
    assert_eq!(order, [id(2)]);
    assert_eq!(size(&p, id(1)), EXT);
}

// --- queries -----------------------------------------------------------------

#[test]
fn map_translates_offsets_through_segments() {
    let mut p = pool_with(2);
    p.add_lun(id(101), 4).unwrap();
    p.create_volume(id(2), 8 * EXT, 0).unwrap(); // LUN 1 extent 0
    p.create_volume(id(1), 8 * EXT, 0).unwrap(); // LUN 1 extent 2
    p.extend(id(1), 3 * EXT, false).unwrap(); // LUN 1 extent 3, LUN 0 extent 0
    assert_eq!(p.map(id(1), 0), Some((1, 2 * EXT)));
    assert_eq!(p.map(id(1), 2 * EXT - 1), Some((1, 4 * EXT - 1)));
    assert_eq!(p.map(id(1), 2 * EXT), Some((0, 0)));
    assert_eq!(p.map(id(1), 2 * EXT + 7), Some((0, 7)));
    assert_eq!(p.map(id(1), 3 * EXT), None);
}

#[test]
fn map_is_none_beyond_the_lv_or_for_an_unknown_lv() {
    let mut p = pool_with(2);
    p.create_volume(id(1), 8 * EXT, 0).unwrap();
    assert_eq!(p.map(id(1), EXT), None);
    assert_eq!(p.map(id(1), u64::MAX), None);
    assert_eq!(p.map(id(9), 0), None);
}

#[test]
fn volumes_are_listed_in_uuid_order() {
    let mut p = pool_with(5);
    for n in [3, 1, 2] {
        p.create_volume(id(n), 8 * EXT, 0).unwrap();
    }
    let ids: std::vec::Vec<_> = p.volumes().map(|v| v.id).collect();
    assert_eq!(ids, [id(1), id(2), id(3)]);
}

// --- invariants --------------------------------------------------------------

/// id(1) on extents 0..2 of LUN 0, id(2) on 6..8.
fn two_volumes() -> Small {
    let mut p = pool_with(10);
    p.create_volume(id(1), 8 * EXT, 2 * EXT).unwrap();
    p.create_volume(id(2), 8 * EXT, 2 * EXT).unwrap();
    p
}

#[test]
fn a_pool_built_through_its_api_satisfies_its_invariants() {
    two_volumes().check_invariants().unwrap();
}

#[test]
fn check_invariants_finds_overlapping_segments() {
    let mut p = two_volumes();
    p.volumes[1].segments[0].first_extent = 1;
    // The high-water mark still matches the sum, so only overlap is wrong.
    assert_eq!(
        p.check_invariants(),
        Err(Invariant::Overlap {
            a: id(1),
            b: id(2),
            lun: 0
        })
    );
}

#[test]
fn a_high_water_mark_above_the_extents_lvs_hold_is_valid() {
    // Extents below the mark that no LV holds are free (or released).
    let mut p = two_volumes();
    p.luns[0].used = 9;
    assert_eq!(p.check_invariants(), Ok(()));
}

#[test]
fn check_invariants_finds_segments_above_the_high_water_mark() {
    let mut p = two_volumes();
    p.luns[0].used = 3;
    assert_eq!(
        p.check_invariants(),
        Err(Invariant::SegmentBounds {
            volume: id(2),
            segment: 0
        })
    );
}

#[test]
fn check_invariants_finds_an_lv_over_its_limit() {
    let mut p = pool_with(10);
    p.create_volume(id(1), 8 * EXT, 3 * EXT).unwrap();
    p.volumes[0].virtual_size = 512; // limit: 2 extents
    assert_eq!(
        p.check_invariants(),
        Err(Invariant::OverLimit { volume: id(1) })
    );
}

#[test]
fn check_invariants_finds_unsorted_lvs() {
    let mut p = two_volumes();
    p.volumes.swap(0, 1);
    assert_eq!(
        p.check_invariants(),
        Err(Invariant::VolumeOrder { volume: id(1) })
    );
}

#[test]
fn the_overlap_check_walks_many_segments_per_lun_in_batches() {
    // More segments on one LUN than one batch holds, interleaved between
    // two LVs so that the LUN's segments are out of order in the list.
    let mut p = Pool::<1, 2, 512, 1>::new(EXT).unwrap();
    p.add_lun(id(100), 1000).unwrap();
    p.create_volume(id(1), 1000 * EXT, EXT).unwrap();
    p.create_volume(id(2), 1000 * EXT, EXT).unwrap();
    for (v, lv) in p.volumes.iter_mut().enumerate() {
        lv.segments.clear();
        for n in 0..400 {
            let first = 2 * n + v as u32;
            lv.segments
                .push(Segment {
                    lun: 0,
                    first_extent: first,
                    extents: 1,
                })
                .unwrap();
        }
    }
    p.luns[0].used = 800;
    p.rebuild_order();
    assert_eq!(p.segments(id(1)).unwrap().len(), 400);
    p.check_invariants().unwrap();
    assert!(p.disjoint_on(0), "a valid pool needs no pairwise search");
    // The last segment of id(2) moved one extent down, onto id(1)'s last
    // extent.
    let last = p.volumes[1].segments.last_mut().unwrap();
    last.first_extent -= 1;
    assert!(!p.disjoint_on(0));
    assert_eq!(
        p.check_invariants(),
        Err(Invariant::Overlap {
            a: id(1),
            b: id(2),
            lun: 0
        })
    );
    // Two segments that start at the same extent, far apart in the list.
    let mut p2 = p.clone();
    p2.volumes[1].segments.last_mut().unwrap().first_extent += 1;
    p2.check_invariants().unwrap();
    let first = p2.volumes[0].segments[0];
    assert_eq!(p2.volumes[1].segments[300].extents, first.extents);
    p2.volumes[1].segments[300] = first;
    assert_eq!(
        p2.check_invariants(),
        Err(Invariant::Overlap {
            a: id(1),
            b: id(2),
            lun: 0
        })
    );
}

#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "pool invariant broken")]
fn debug_builds_assert_the_invariants_after_a_change() {
    let mut p = two_volumes();
    // A segment above the high-water mark, behind the pool's back...
    p.luns[0].used = 3;
    // ...are caught by the next change.
    let _ = p.add_lun(id(101), 10);
}

#[test]
fn encode_refuses_a_pool_that_breaks_an_invariant_and_writes_nothing() {
    let mut p = two_volumes();
    p.luns[0].used = 3;
    let mut out = std::vec![0xA5; Small::MAX_COPY_LEN];
    assert_eq!(
        p.encode(0, &mut out),
        Err(PoolError::Invariant(Invariant::SegmentBounds {
            volume: id(2),
            segment: 0
        }))
    );
    assert!(out.iter().all(|&b| b == 0xA5), "nothing written");
}

// --- metadata ------------------------------------------------------------------

fn state(
    p: &Small,
) -> (
    std::vec::Vec<Lun>,
    std::vec::Vec<(VolumeInfo, std::vec::Vec<Segment>)>,
) {
    let volumes = p
        .volumes()
        .map(|v| (v, p.segments(v.id).unwrap().to_vec()))
        .collect();
    (p.luns().to_vec(), volumes)
}

#[test]
fn next_copy_alternates_between_a_and_b() {
    assert_eq!([0, 1, 2, 3, u64::MAX].map(next_copy), [0, 1, 0, 1, 1]);
}

#[test]
fn copies_follow_the_mailbox_at_the_next_mib_in_whole_blocks() {
    let g = crate::wire::Geometry::new(250, 512).unwrap();
    let at = metadata_offset(&g);
    assert_eq!(at % METADATA_ALIGN, 0);
    assert!(at >= g.mailbox_size() && at - g.mailbox_size() < METADATA_ALIGN);
    assert_eq!(commit_place(&g, 4, 1), (at, 4096));
    assert_eq!(
        commit_place(&g, 5, 4096),
        (at + METADATA_COPY_SIZE as u64, 4096)
    );
    assert_eq!(commit_place(&g, 7, 4097).1, 8192);
    assert_eq!(commit_place(&g, 8, usize::MAX).1, METADATA_COPY_SIZE);
    let largest = crate::wire::Geometry::new(crate::wire::MAX_HOSTS, 4096).unwrap();
    assert_eq!(metadata_offset(&largest) % METADATA_ALIGN, 0);
}

#[test]
fn encode_then_decode_round_trips_the_state() {
    let mut p = two_volumes();
    p.add_lun(id(101), 7).unwrap();
    p.extend(id(1), 9 * EXT, false).unwrap();
    let mut a = buffer();
    let len = p.encode(4, &mut a).unwrap();
    assert!(len <= Small::MAX_COPY_LEN);
    let (q, seq) = Small::decode(&a, &[]).unwrap();
    assert_eq!(seq, 4);
    assert_eq!(q.extent_size(), EXT);
    assert_eq!(state(&q), state(&p));
}

#[test]
fn the_header_is_laid_out_as_documented() {
    let p = two_volumes();
    let mut a = buffer();
    let len = p.encode(0x0102_0304_0506_0708, &mut a).unwrap();
    assert_eq!(&a[4..8], b"SPMP");
    assert_eq!(a[8], 3);
    assert_eq!(&a[9..16], &[0; 7]);
    assert_eq!(a[16..24], 0x0102_0304_0506_0708u64.to_le_bytes());
    assert_eq!(
        u32::from_le_bytes(a[24..28].try_into().unwrap()) as usize,
        len - 64
    );
    assert_eq!(a[32..40], EXT.to_le_bytes());
    assert_eq!(
        a[40..48],
        0u64.to_le_bytes(),
        "release_seq: nothing released"
    );
    assert_eq!(&a[48..64], &[0; 16], "moving: nil");
    let crc = crate::wire::CRC32C.checksum(&a[4..len]);
    assert_eq!(a[..4], crc.to_le_bytes());
}

#[test]
fn encode_zeroes_the_rest_of_the_buffer() {
    let mut a = std::vec![0xAA; Small::MAX_COPY_LEN];
    let len = two_volumes().encode(0, &mut a).unwrap();
    assert!(a[len..].iter().all(|&b| b == 0));
}

#[test]
fn encode_into_a_small_buffer_fails_with_the_size_needed() {
    let p = two_volumes();
    let mut a = buffer();
    let len = p.encode(0, &mut a).unwrap();
    for short in [0, 10, 64, len - 1] {
        let mut out = std::vec![0; short];
        assert_eq!(
            p.encode(0, &mut out),
            Err(PoolError::BufferTooSmall {
                needed: len as u64,
                available: short as u64
            })
        );
    }
    let mut exact = std::vec![0; len];
    assert_eq!(p.encode(0, &mut exact), Ok(len));
}

#[test]
fn decode_takes_the_copy_with_the_higher_sequence_number() {
    let mut p = two_volumes();
    let (mut a, mut b) = (buffer(), buffer());
    p.encode(2, &mut a).unwrap();
    p.extend(id(1), 5 * EXT, false).unwrap();
    p.encode(3, &mut b).unwrap();
    let (q, seq) = Small::decode(&a, &b).unwrap();
    assert_eq!((seq, size(&q, id(1))), (3, 5 * EXT));
    p.extend(id(1), 6 * EXT, false).unwrap();
    p.encode(4, &mut a).unwrap();
    let (q, seq) = Small::decode(&a, &b).unwrap();
    assert_eq!((seq, size(&q, id(1))), (4, 6 * EXT));
}

#[test]
fn a_torn_commit_in_any_single_byte_decodes_to_the_previous_state() {
    let mut p = two_volumes();
    let (mut a, mut b) = (buffer(), buffer());
    p.encode(6, &mut a).unwrap();
    let previous = state(&p);
    p.extend(id(2), 7 * EXT, false).unwrap();
    let len = p.encode(7, &mut b).unwrap();
    for at in 0..len {
        for flip in [0x01, 0x80, 0xFF] {
            let mut torn = b.clone();
            torn[at] ^= flip;
            let (q, seq) = Small::decode(&a, &torn).unwrap();
            assert_eq!((seq, state(&q)), (6, previous.clone()), "byte {at}");
        }
    }
}

#[test]
fn a_commit_torn_short_decodes_to_the_previous_state() {
    let mut p = two_volumes();
    let (mut a, mut b) = (buffer(), buffer());
    p.encode(0, &mut a).unwrap();
    p.extend(id(1), 4 * EXT, false).unwrap();
    let len = p.encode(1, &mut b).unwrap();
    for cut in 0..len {
        // The tail of the new copy never made it: old zeros remain.
        let mut torn = b.clone();
        torn[cut..].fill(0);
        let (_, seq) = Small::decode(&a, &torn).unwrap();
        assert_eq!(seq, 0, "cut at {cut}");
    }
}

#[test]
fn both_copies_corrupt_is_an_error_naming_each_defect() {
    let p = two_volumes();
    let (mut a, mut b) = (buffer(), buffer());
    p.encode(0, &mut a).unwrap();
    p.encode(1, &mut b).unwrap();
    a[70] ^= 1;
    b[4] = b'X';
    match Small::decode(&a, &b) {
        Err(PoolError::NoValidCopy {
            a: CopyDefect::Checksum { .. },
            b: CopyDefect::BadMagic,
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn two_empty_copies_are_reported_as_empty() {
    let zeros = buffer();
    assert_eq!(
        Small::decode(&zeros, &zeros).unwrap_err(),
        PoolError::NoValidCopy {
            a: CopyDefect::Empty,
            b: CopyDefect::Empty
        }
    );
    assert_eq!(
        Small::decode(&[], &[1, 2]).unwrap_err(),
        PoolError::NoValidCopy {
            a: CopyDefect::TooShort { len: 0 },
            b: CopyDefect::TooShort { len: 2 }
        }
    );
}

#[test]
fn a_copy_in_the_wrong_place_is_refused() {
    let p = two_volumes();
    let mut a = buffer();
    p.encode(1, &mut a).unwrap(); // seq 1 belongs in B
    assert_eq!(
        Small::decode(&a, &[]).unwrap_err(),
        PoolError::NoValidCopy {
            a: CopyDefect::Misplaced { seq: 1 },
            b: CopyDefect::TooShort { len: 0 }
        }
    );
}

#[test]
fn header_defects_are_reported_even_under_a_valid_checksum() {
    let p = two_volumes();
    let mut good = buffer();
    p.encode(0, &mut good).unwrap();
    let cases: [(usize, u8, CopyDefect); 5] = [
        (8, 4, CopyDefect::UnsupportedVersion { version: 4 }),
        (8, 0, CopyDefect::UnsupportedVersion { version: 0 }),
        (12, 1, CopyDefect::ReservedNotZero { offset: 12 }),
        (30, 1, CopyDefect::ReservedNotZero { offset: 30 }),
        (
            33,
            0x11,
            CopyDefect::ExtentSize {
                extent_size: EXT | 0x11 << 8,
            },
        ),
    ];
    for (at, value, defect) in cases {
        let mut a = good.clone();
        a[at] = value;
        reseal(&mut a);
        assert_eq!(
            Small::decode(&a, &[]).unwrap_err(),
            PoolError::NoValidCopy {
                a: defect,
                b: CopyDefect::TooShort { len: 0 }
            }
        );
    }
}

#[test]
fn a_payload_length_past_the_copy_is_refused() {
    let p = two_volumes();
    let mut a = buffer();
    let len = p.encode(0, &mut a).unwrap();
    a.truncate(len - 1);
    assert!(matches!(
        Small::decode(&a, &[]),
        Err(PoolError::NoValidCopy {
            a: CopyDefect::PayloadLength { .. },
            ..
        })
    ));
}

#[test]
fn trailing_payload_bytes_are_refused() {
    let p = two_volumes();
    let mut a = buffer();
    let len = p.encode(0, &mut a).unwrap();
    let payload_len = (len - 64 + 1) as u32;
    a[24..28].copy_from_slice(&payload_len.to_le_bytes());
    reseal(&mut a);
    assert!(matches!(
        Small::decode(&a, &[]),
        Err(PoolError::NoValidCopy {
            a: CopyDefect::Payload,
            ..
        })
    ));
}

#[test]
fn a_varint_longer_than_its_shortest_form_is_refused() {
    // An empty pool: payload [0, 0]. Its LUN count written as 0x80 0x00
    // (two bytes for 0), and as six bytes (more than a 32-bit usize takes).
    let p = Small::new(EXT).unwrap();
    for count in [&[0x80, 0x00][..], &[0x80, 0x80, 0x80, 0x80, 0x80, 0x00]] {
        let mut a = buffer();
        p.encode(0, &mut a).unwrap();
        let payload: std::vec::Vec<u8> = count.iter().copied().chain([0]).collect();
        a[64..64 + payload.len()].copy_from_slice(&payload);
        a[24..28].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        reseal(&mut a);
        assert_eq!(
            Small::decode(&a, &[]).unwrap_err(),
            PoolError::NoValidCopy {
                a: CopyDefect::Payload,
                b: CopyDefect::TooShort { len: 0 }
            },
            "LUN count {count:02x?}"
        );
    }
}

#[test]
fn a_checksummed_copy_that_breaks_an_invariant_loses_to_the_older_copy() {
    let p = two_volumes();
    let (mut a, mut b) = (buffer(), buffer());
    p.encode(0, &mut a).unwrap();
    p.encode(1, &mut b).unwrap();
    // The encoder refuses to write a broken pool, so break the copy: id(2)'s
    // one segment (lun 0, first extent 6, 2 extents) moves to extent 1 and
    // overlaps id(1).
    let at = b.windows(16).position(|w| w == [2; 16]).unwrap();
    let seg = at + b[at..].windows(4).position(|w| w == [1, 0, 6, 2]).unwrap();
    b[seg + 2] = 1;
    reseal(&mut b);
    let (q, seq) = Small::decode(&a, &b).unwrap();
    assert_eq!(seq, 0);
    q.check_invariants().unwrap();
    assert!(matches!(
        Small::decode(&[], &b),
        Err(PoolError::NoValidCopy {
            b: CopyDefect::Inconsistent(Invariant::Overlap { .. }),
            ..
        })
    ));
}

#[test]
fn a_copy_beyond_the_pool_types_limits_is_refused() {
    let mut big = Pool::<4, 16, 4, 4>::new(EXT).unwrap();
    big.add_lun(id(100), 100).unwrap();
    for n in 1..=9 {
        big.create_volume(id(n), 8 * EXT, 0).unwrap();
    }
    let mut a = std::vec![0; Pool::<4, 16, 4, 4>::MAX_COPY_LEN];
    big.encode(0, &mut a).unwrap();
    assert!(matches!(
        Small::decode(&a, &[]),
        Err(PoolError::NoValidCopy {
            a: CopyDefect::Payload,
            ..
        })
    ));
}

#[test]
fn decoding_does_not_restore_parked_requests_or_completions() {
    let mut p = pool_with(2);
    p.create_volume(id(1), 8 * EXT, 0).unwrap();
    p.extend(id(1), 4 * EXT, true).unwrap();
    let mut a = buffer();
    p.encode(0, &mut a).unwrap();
    let (mut q, _) = Small::decode(&a, &[]).unwrap();
    assert_eq!(q.parked().count(), 0);
    assert_eq!(q.poll_completed(), None);
}

#[test]
fn decode_into_a_pool_replaces_everything_and_empties_it_on_error() {
    let p = two_volumes();
    let mut a = buffer();
    p.encode(0, &mut a).unwrap();
    let mut q = pool_with(3);
    q.create_volume(id(7), 8 * EXT, 0).unwrap();
    assert_eq!(q.decode_into(&a, &[]), Ok(0));
    assert_eq!(state(&q), state(&p));
    assert!(q.decode_into(&[], &[]).is_err());
    assert_eq!((q.luns().len(), q.volumes().count()), (0, 0));
}

#[test]
fn decoding_arbitrary_bytes_never_panics() {
    let p = two_volumes();
    let mut good = buffer();
    let len = p.encode(0, &mut good).unwrap();
    // Every byte of a valid copy set to every value, resealed so the
    // parser gets past the checksum.
    for at in 0..len {
        for value in [0u8, 1, 0x7F, 0x80, 0xFF] {
            let mut a = good.clone();
            a[at] = value;
            if at >= 4 {
                reseal(&mut a);
            }
            if let Ok((q, _)) = Small::decode(&a, &[]) {
                q.check_invariants().unwrap();
            }
        }
    }
}

// --- the default configuration --------------------------------------------------

#[test]
fn metadata_copy_size_is_the_default_pools_worst_case_in_whole_blocks() {
    assert_eq!(DefaultPool::MAX_COPY_LEN, 454_115);
    assert_eq!(METADATA_COPY_SIZE, 454_656);
    assert_eq!(METADATA_COPY_SIZE % 4096, 0);
}

/// Runs `f` on a thread with a stack large enough for a few
/// `DefaultPool`s.
fn with_big_stack(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn a_default_pool_filled_to_its_limits_fits_in_metadata_copy_size() {
    with_big_stack(|| {
        let mut p = std::boxed::Box::new(DefaultPool::new(MIB).unwrap());
        // Each round grows every LV by `grow` extents; LUN 0 holds the
        // first extents, the others six rounds each (extent numbers up to
        // 3 * 2^30: five-byte varints), so no extension straddles LUNs.
        let grow: u64 = 1 << 19;
        let lun_extents = u32::try_from(6 * 1024 * grow).unwrap();
        for n in 0..16u32 {
            let mut lun = [0xF0; 16];
            lun[..4].copy_from_slice(&n.to_be_bytes());
            p.add_lun(Uuid(lun), if n == 0 { 1024 } else { lun_extents })
                .unwrap();
        }
        let lv = |n: u32| {
            let mut b = [0x0F; 16];
            b[..4].copy_from_slice(&n.to_be_bytes());
            Uuid(b)
        };
        let virtual_size = 1u64 << 62;
        for n in 0..1024 {
            p.create_volume(lv(n), virtual_size, 0).unwrap();
        }
        // Interleaved growth, as the allocation rule never lays LVs out:
        // LUN 0 holds each LV's first extent, then every round gives every
        // LV a new segment of `grow` extents.
        for (n, v) in p.volumes.iter_mut().enumerate() {
            let n = u32::try_from(n).unwrap();
            v.segments.clear();
            v.segments
                .push(Segment {
                    lun: 0,
                    first_extent: n,
                    extents: 1,
                })
                .unwrap();
            for round in 1..32u32 {
                let r = round - 1;
                let first = u64::from(r % 6) * 1024 * grow + u64::from(n) * grow;
                v.segments
                    .push(Segment {
                        lun: u16::try_from(1 + r / 6).unwrap(),
                        first_extent: u32::try_from(first).unwrap(),
                        extents: u32::try_from(grow).unwrap(),
                    })
                    .unwrap();
            }
        }
        for (i, l) in p.luns.iter_mut().enumerate() {
            let rounds = 31u32
                .saturating_sub(6 * (i as u32).saturating_sub(1))
                .min(6);
            l.used = if i == 0 {
                1024
            } else {
                rounds * 1024 * u32::try_from(grow).unwrap()
            };
        }
        p.rebuild_order();
        p.check_invariants().unwrap();
        assert!(p.volumes().all(|v| p.segments(v.id).unwrap().len() == 32));
        let mut a = std::vec![0; METADATA_COPY_SIZE];
        let len = p.encode(0, &mut a).unwrap();
        assert!(len <= DefaultPool::MAX_COPY_LEN);
        let mut q = std::boxed::Box::new(DefaultPool::new(MIB).unwrap());
        assert_eq!(q.decode_into(&a, &[]), Ok(0));
        assert_eq!(q.volumes().count(), 1024);
        assert_eq!(q.free_extents(), p.free_extents());
    });
}

#[test]
fn default_pool_size() {
    let size = core::mem::size_of::<DefaultPool>();
    std::println!("size_of::<DefaultPool>() = {size}");
    // 580 144 bytes: the LVs' segments (32 × 12 bytes each) and the
    // free-run index (32 × 4 bytes each) dominate.
    assert!(size < 640 * 1024);
}

// --- allocation that keeps LVs in few segments ---------------------------------

/// One LUN, 1 MiB extents, room for 32 segments per LV.
type Wide = Pool<2, 8, 32, 4>;

fn wide(extents: u32) -> Wide {
    let mut p = Wide::new(MIB).unwrap();
    p.add_lun(id(100), extents).unwrap();
    p
}

#[test]
fn one_lv_grows_to_its_limit_in_one_segment() {
    let mut p = wide(1000);
    p.create_volume(id(1), 100 * MIB, 0).unwrap();
    let limit = p.volume(id(1)).unwrap().limit;
    for n in 2..=limit / MIB {
        p.extend(id(1), n * MIB, false).unwrap();
    }
    assert_eq!(size_of_wide(&p, id(1)), limit);
    assert_eq!(p.segments(id(1)).unwrap().len(), 1);
}

fn size_of_wide(p: &Wide, volume: Uuid) -> u64 {
    p.volume(volume).unwrap().size
}

#[test]
fn four_lvs_growing_in_turn_one_extent_at_a_time_all_reach_their_limits() {
    // Exactly the room the four need: 4 × 111 extents.
    let mut p = wide(4 * 111);
    for v in 1..=4 {
        p.create_volume(id(v), 100 * MIB, 0).unwrap();
    }
    let limit = p.volume(id(1)).unwrap().limit;
    assert_eq!(limit, 111 * MIB);
    for n in 2..=limit / MIB {
        for v in 1..=4 {
            assert_eq!(
                p.extend(id(v), n * MIB, false),
                Ok(Extend::Extended { size: n * MIB }),
                "LV {v} at {n} MiB"
            );
        }
    }
    assert_eq!(p.free_extents(), 0);
    for v in 1..=4 {
        let segments = p.segments(id(v)).unwrap();
        std::println!("LV {v}: {segments:?}");
        assert!(
            segments.len() <= 8,
            "LV {v} has {} segments",
            segments.len()
        );
    }
    p.check_invariants().unwrap();
}

#[test]
fn a_new_segment_takes_the_largest_free_run() {
    let mut p = wide(10);
    p.add_lun(id(101), 20).unwrap();
    p.create_volume(id(1), 64 * MIB, 0).unwrap();
    // LUN 1's run of 20 is the largest; nothing precedes extent 0.
    assert_eq!(
        p.segments(id(1)).unwrap(),
        &[Segment {
            lun: 1,
            first_extent: 0,
            extents: 1
        }]
    );
}

#[test]
fn without_one_run_large_enough_several_runs_are_taken_largest_first() {
    let mut p = wide(3);
    p.add_lun(id(101), 5).unwrap();
    p.create_volume(id(1), 64 * MIB, 7 * MIB).unwrap();
    assert_eq!(
        p.segments(id(1)).unwrap(),
        &[
            Segment {
                lun: 1,
                first_extent: 0,
                extents: 5
            },
            Segment {
                lun: 0,
                first_extent: 0,
                extents: 2
            },
        ]
    );
}

// --- delete, release and reclaim -------------------------------------------------

#[test]
fn deleted_extents_are_released_not_free_until_reclaimed_at_their_commit() {
    let mut p = pool_with(4);
    p.create_volume(id(1), 8 * EXT, 2 * EXT).unwrap();
    p.create_volume(id(2), 8 * EXT, 2 * EXT).unwrap();
    assert_eq!(p.free_extents(), 0);
    assert_eq!(p.delete_volume(id(1)), Ok(2));
    assert_eq!(p.volume(id(1)), None);
    assert_eq!((p.free_extents(), p.released_extents()), (0, 2));
    // Not reusable: the extension parks.
    assert!(matches!(
        p.extend(id(2), 3 * EXT, false),
        Ok(Extend::Parked { .. })
    ));
    // Not stamped yet: no acknowledgement frees it.
    assert_eq!(p.reclaim(u64::MAX), 0);
    let mut a = buffer();
    p.encode(6, &mut a).unwrap();
    assert_eq!(a[40..48], 6u64.to_le_bytes(), "the releasing commit");
    assert!(p.stamp_released(6));
    assert_eq!(p.release_seq(), 6);
    assert!(!p.stamp_released(7), "nothing left to stamp");
    assert_eq!(p.reclaim(5), 0);
    assert_eq!(p.released_extents(), 2);
    // Reclaiming serves the parked request.
    assert_eq!(p.reclaim(6), 2);
    assert_eq!(
        completions(&mut p),
        [Completion {
            volume: id(2),
            size: 3 * EXT
        }]
    );
    assert_eq!((p.free_extents(), p.released_extents()), (1, 0));
    // A later commit carries the release sequence on.
    p.encode(8, &mut a).unwrap();
    assert_eq!(a[40..48], 6u64.to_le_bytes());
}

#[test]
fn a_decoded_pool_counts_free_extents_below_the_mark_released_at_its_release_seq() {
    let mut p = pool_with(10);
    p.create_volume(id(1), 8 * EXT, 2 * EXT).unwrap();
    p.create_volume(id(2), 8 * EXT, 2 * EXT).unwrap();
    p.delete_volume(id(1)).unwrap();
    let mut b = buffer();
    p.encode(3, &mut b).unwrap();
    p.stamp_released(3);
    let (mut q, seq) = Small::decode(&[], &b).unwrap();
    assert_eq!((seq, q.release_seq()), (3, 3));
    // id(2) lies at 6..8: 0..6 is below the mark, 8..10 never used.
    assert_eq!((q.free_extents(), q.released_extents()), (2, 6));
    let mut runs = std::vec::Vec::new();
    q.free_runs_below_used(|r| runs.push(r));
    assert!(runs.is_empty());
    assert_eq!(q.reclaim(2), 0);
    assert_eq!(q.reclaim(3), 6);
    q.free_runs_below_used(|r| runs.push(r));
    assert_eq!(
        runs,
        [FreeRun {
            lun: 0,
            first: 0,
            extents: 6
        }]
    );
    // Without releases, release_seq 0: no floor.
    let mut fresh = two_volumes();
    fresh.encode(1, &mut b).unwrap();
    fresh.luns[0].used = 10;
    let (q, _) = Small::decode(&[], &b).unwrap();
    assert_eq!((q.release_seq(), q.released_extents()), (0, 0));
}

#[test]
fn deleting_or_reducing_an_lv_with_a_parked_request_is_refused() {
    let mut p = pool_with(2);
    p.create_volume(id(1), 8 * EXT, 2 * EXT).unwrap();
    assert!(matches!(
        p.extend(id(1), 3 * EXT, true),
        Ok(Extend::Parked { .. })
    ));
    assert_eq!(p.delete_volume(id(1)), Err(PoolError::Parked));
    assert_eq!(p.reduce_volume(id(1), EXT), Err(PoolError::Parked));
    assert_eq!(p.delete_volume(id(9)), Err(PoolError::UnknownVolume));
    assert_eq!(size(&p, id(1)), 2 * EXT);
}

#[test]
fn a_full_released_list_folds_into_a_floor_that_waits_for_the_newest_commit() {
    let mut p = Pool::<1, 4, 4, 4>::new(EXT).unwrap();
    let runs = MAX_RELEASED_RUNS as u64 + 1;
    p.add_lun(id(100), u32::try_from(runs).unwrap() + 1)
        .unwrap();
    for seq in 1..=runs {
        p.create_volume(id(1), 8 * EXT, 0).unwrap();
        p.delete_volume(id(1)).unwrap();
        assert!(p.stamp_released(seq));
    }
    assert_eq!(p.released_extents(), runs);
    assert_eq!(p.reclaim(runs - 1), 0, "the floor waits for the newest");
    assert_eq!(p.reclaim(runs), runs);
    p.check_invariants().unwrap();
}

// --- reduce ----------------------------------------------------------------------

#[test]
fn reducing_splits_the_last_segment_and_regrowing_merges_it_back() {
    let mut p = pool_with(10);
    p.create_volume(id(1), 8 * EXT, 2 * EXT).unwrap();
    p.create_volume(id(2), 8 * EXT, EXT).unwrap(); // 0..2, 6..7
    p.extend(id(1), 5 * EXT, false).unwrap(); // 0..5
    assert_eq!(p.reduce_volume(id(1), 2 * EXT - 512), Ok(2 * EXT));
    let seg = |first_extent, extents| Segment {
        lun: 0,
        first_extent,
        extents,
    };
    assert_eq!(p.segments(id(1)).unwrap(), &[seg(0, 2)]);
    assert_eq!(p.released_extents(), 3);
    p.stamp_released(1);
    assert_eq!(p.reclaim(1), 3);
    p.extend(id(1), 4 * EXT, false).unwrap();
    assert_eq!(p.segments(id(1)).unwrap(), &[seg(0, 4)]);
    p.check_invariants().unwrap();
}

#[test]
fn reducing_drops_whole_segments_and_refuses_bad_sizes() {
    let mut p = fragmented(0);
    assert_eq!(p.reduce_volume(id(1), 2 * EXT), Ok(2 * EXT));
    assert_eq!(p.segments(id(1)).unwrap().len(), 2);
    assert_eq!(p.released_extents(), 2);
    assert_eq!(
        p.reduce_volume(id(1), 3 * EXT),
        Err(PoolError::AboveSize { size: 2 * EXT })
    );
    assert_eq!(
        p.reduce_volume(id(1), 0),
        Err(PoolError::InvalidSize { size: 0 })
    );
    assert_eq!(
        p.reduce_volume(id(1), 100),
        Err(PoolError::InvalidSize { size: 100 })
    );
    assert_eq!(p.reduce_volume(id(1), 2 * EXT), Ok(2 * EXT), "no change");
    assert_eq!(p.reduce_volume(id(9), EXT), Err(PoolError::UnknownVolume));
}

// --- relocate, draining and dropping a LUN -----------------------------------------

#[test]
fn segments_move_off_a_draining_lun_which_is_then_dropped() {
    let mut p = pool_with(4);
    p.create_volume(id(1), 8 * EXT, 2 * EXT).unwrap(); // LUN 0 0..2
    p.add_lun(id(101), 6).unwrap();
    p.add_lun(id(102), 3).unwrap();
    p.create_volume(id(2), 8 * EXT, EXT).unwrap(); // LUN 1 0..1
    p.set_draining(0, true).unwrap();
    assert!(p.is_draining(0));
    assert_eq!(p.drop_lun(0), Err(PoolError::LunInUse));
    // The largest free run elsewhere: LUN 1's 1..6.
    let plan = p.plan_relocation(0).unwrap().unwrap();
    assert_eq!(
        plan,
        Relocation {
            volume: id(1),
            segment: 0,
            from: Segment {
                lun: 0,
                first_extent: 0,
                extents: 2
            },
            to: Segment {
                lun: 1,
                first_extent: 1,
                extents: 2
            },
        }
    );
    // A draining LUN is no destination, nor for allocation.
    assert_eq!(p.relocate(id(1), 0, 0, 2), Err(PoolError::NotFree));
    assert_eq!(p.relocate(id(1), 0, 1, 0), Err(PoolError::NotFree));
    assert_eq!(p.relocate(id(1), 1, 1, 1), Err(PoolError::UnknownSegment));
    p.relocate(id(1), plan.segment, plan.to.lun, plan.to.first_extent)
        .unwrap();
    assert_eq!(p.segments(id(1)).unwrap(), &[plan.to]);
    assert_eq!(p.plan_relocation(0), Ok(None));
    assert_eq!(p.drop_lun(0), Err(PoolError::LunInUse), "released");
    p.stamp_released(1);
    p.reclaim(1);
    // Extending id(2) skips the draining LUN's free extents.
    p.extend(id(2), 6 * EXT, false).unwrap();
    assert!(p.segments(id(2)).unwrap().iter().all(|s| s.lun != 0));
    p.drop_lun(0).unwrap();
    assert_eq!(p.luns().len(), 2);
    assert_eq!(p.luns()[0].id, id(101));
    assert_eq!(p.segments(id(1)).unwrap()[0].lun, 0, "renumbered");
    assert!(!p.is_draining(0));
    p.check_invariants().unwrap();
    assert_eq!(p.drop_lun(5), Err(PoolError::UnknownLun));
}

#[test]
fn a_relocated_segment_merges_with_a_neighbour_it_now_touches() {
    let mut p = pool_with(10);
    p.add_lun(id(101), 4).unwrap();
    p.create_volume(id(1), 8 * EXT, 2 * EXT).unwrap(); // LUN 0 0..2
    p.create_volume(id(2), 8 * EXT, EXT).unwrap(); // LUN 0 6..7
    p.set_draining(0, true).unwrap();
    p.extend(id(1), 3 * EXT, false).unwrap(); // LUN 1 0..1
    p.set_draining(0, false).unwrap();
    assert_eq!(p.segments(id(1)).unwrap().len(), 2);
    p.relocate(id(1), 1, 0, 2).unwrap();
    assert_eq!(
        p.segments(id(1)).unwrap(),
        &[Segment {
            lun: 0,
            first_extent: 0,
            extents: 3
        }]
    );
    assert_eq!(p.released_extents(), 1);
    p.check_invariants().unwrap();
}

// --- metadata versions -------------------------------------------------------------

#[test]
fn a_version_1_copy_decodes_with_release_seq_0() {
    let p = two_volumes();
    let mut a = buffer();
    p.encode(0, &mut a).unwrap();
    a[8] = 1;
    reseal(&mut a);
    let (q, seq) = Small::decode(&a, &[]).unwrap();
    assert_eq!((seq, q.release_seq(), q.released_extents()), (0, 0, 0));
    assert_eq!(state(&q), state(&p));
    // Version 1 reserved bytes 40..48.
    a[41] = 1;
    reseal(&mut a);
    assert_eq!(
        Small::decode(&a, &[]).unwrap_err(),
        PoolError::NoValidCopy {
            a: CopyDefect::ReservedNotZero { offset: 41 },
            b: CopyDefect::TooShort { len: 0 }
        }
    );
}

#[test]
fn release_seq_round_trips_through_encode_and_decode() {
    let mut p = two_volumes();
    p.reduce_volume(id(1), EXT).unwrap();
    let mut a = buffer();
    p.encode(4, &mut a).unwrap();
    p.stamp_released(4);
    let (q, _) = Small::decode(&a, &[]).unwrap();
    assert_eq!(q.release_seq(), 4);
    let mut b = buffer();
    q.encode(5, &mut b).unwrap();
    assert_eq!(b[40..48], 4u64.to_le_bytes());
    assert_eq!(state(&q), state(&p));
}

#[test]
fn moving_round_trips_through_encode_and_decode() {
    let mut p = two_volumes();
    assert_eq!(p.moving(), Uuid::NIL);
    p.set_moving(id(2)).unwrap();
    assert_eq!(p.moving(), id(2));
    let mut a = buffer();
    p.encode(0, &mut a).unwrap();
    assert_eq!(a[48..64], [2; 16]);
    let (q, _) = Small::decode(&a, &[]).unwrap();
    assert_eq!(q.moving(), id(2));
    assert_eq!(state(&q), state(&p));
    // Cleared, the next commit carries nil again.
    let mut q = q;
    q.set_moving(Uuid::NIL).unwrap();
    let mut b = buffer();
    q.encode(1, &mut b).unwrap();
    assert_eq!(b[48..64], [0; 16]);
    let (r, seq) = Small::decode(&a, &b).unwrap();
    assert_eq!((seq, r.moving()), (1, Uuid::NIL));
}

#[test]
fn a_version_2_copy_decodes_with_moving_nil_and_its_bytes_48_to_64_zero() {
    let mut p = two_volumes();
    p.reduce_volume(id(1), EXT).unwrap();
    let mut a = buffer();
    p.encode(2, &mut a).unwrap();
    a[8] = 2;
    reseal(&mut a);
    let (q, seq) = Small::decode(&a, &[]).unwrap();
    assert_eq!((seq, q.release_seq(), q.moving()), (2, 2, Uuid::NIL));
    assert_eq!(state(&q), state(&p));
    // Version 2 reserved bytes 48..64: a nonzero byte there is refused,
    // not read as `moving`.
    for at in [48, 63] {
        let mut bad = a.clone();
        bad[at] = 1;
        reseal(&mut bad);
        assert_eq!(
            Small::decode(&bad, &[]).unwrap_err(),
            PoolError::NoValidCopy {
                a: CopyDefect::ReservedNotZero { offset: at as u8 },
                b: CopyDefect::TooShort { len: 0 }
            }
        );
    }
}

#[test]
fn a_version_1_copy_with_release_seq_or_moving_bytes_set_is_refused() {
    let p = two_volumes();
    let mut good = buffer();
    p.encode(0, &mut good).unwrap();
    good[8] = 1;
    for at in [40, 50] {
        let mut a = good.clone();
        a[at] = 1;
        reseal(&mut a);
        assert_eq!(
            Small::decode(&a, &[]).unwrap_err(),
            PoolError::NoValidCopy {
                a: CopyDefect::ReservedNotZero { offset: at as u8 },
                b: CopyDefect::TooShort { len: 0 }
            }
        );
    }
}

#[test]
fn moving_an_unknown_volume_is_refused_and_changes_nothing() {
    let mut p = two_volumes();
    p.set_moving(id(1)).unwrap();
    assert_eq!(p.set_moving(id(9)), Err(PoolError::UnknownVolume));
    assert_eq!(p.moving(), id(1));
    let mut q = two_volumes();
    assert_eq!(q.set_moving(id(9)), Err(PoolError::UnknownVolume));
    assert_eq!(q.moving(), Uuid::NIL);
}

#[test]
fn deleting_the_moving_volume_clears_moving() {
    let mut p = two_volumes();
    p.set_moving(id(1)).unwrap();
    p.delete_volume(id(2)).unwrap();
    assert_eq!(p.moving(), id(1), "another volume's delete leaves it");
    p.delete_volume(id(1)).unwrap();
    assert_eq!(p.moving(), Uuid::NIL);
    let mut a = buffer();
    p.encode(0, &mut a).unwrap();
    assert_eq!(a[48..64], [0; 16]);
    p.check_invariants().unwrap();
}

#[test]
fn a_moving_volume_the_payload_lacks_decodes() {
    let p = two_volumes();
    let mut a = buffer();
    p.encode(0, &mut a).unwrap();
    for value in [[9; 16], [0xFF; 16]] {
        a[48..64].copy_from_slice(&value);
        reseal(&mut a);
        let (q, _) = Small::decode(&a, &[]).unwrap();
        assert_eq!(q.moving(), Uuid(value));
        assert_eq!(state(&q), state(&p));
        q.check_invariants().unwrap();
    }
}
