//! Arbitrary bytes as a run of whole host areas, scanned as inboxes and as
//! outboxes, plus the mailbox geometry.
//!
//! Input: bytes 0..16 the domain, 16..18 the first host id, 18..20
//! `max_hosts`, 20..24 `sector_size`, 24..32 an offset (all little-endian),
//! byte 32 flags, then the areas (zero-padded to whole 4 KiB areas, at most
//! 8). Flag bit 0: fix the CRC of every nonzero record before scanning, so
//! that the fuzzer gets past the checksum to the place and generation
//! checks.
//!
//! Checks that `wire::areas::<Request>`, `wire::areas::<Hold>` and
//! `wire::areas::<Reply>` never panic and that:
//! - they yield one area per whole 4 KiB (as far as host ids reach),
//!   numbered from the first host on, and ignore a trailing partial area;
//! - every area yields exactly 31 slots, numbered 1..=31, each the same as
//!   `slot(n)`; `slot(0)`, `slot(32)` and `slot(33)` are `None`;
//! - the header and every slot are what the typed `parse` at that place
//!   makes of the record's bytes, and what docs/format.md section 6 says;
//! - a `Valid` record belongs to the area's host, its slot and the scan's
//!   domain, and carries the generation of a valid header; a `Stale` one
//!   belongs there too but the header is missing, defective or of another
//!   generation; `Empty` is all zero, or in an inbox a valid record of the
//!   other inbox kind (a hold record in the request view, a request in the
//!   hold view: docs/format.md 6.1), which a defective one of either kind
//!   is not.
//!
//! And `Geometry::new` accepts exactly 512/4096-byte sectors and 1..=2000
//! hosts; `locate(offset)` is `Some` exactly below `mailbox_size()` and
//! names the region, host (in 1..=max_hosts), record and byte that
//! docs/format.md section 3 gives that offset.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spmbox_core::wire::{
    AREA_SIZE, Defect, Geometry, Hold, HostId, Kind, Location, Place, Region, Reply, Request, Slot,
    SlotRecord, SlotState, Uuid, areas,
};
use spmbox_fuzz::{
    LEN, MAX_HOSTS, Typed, Verdict, assert_geometry_error, assert_verdict, is_nil, kind_outcome,
    le16, le32, le64, seal, verdict,
};

const HEAD: usize = 33;
const MAX_AREAS: usize = 8;

fuzz_target!(|data: &[u8]| check(data));

fn check(data: &[u8]) {
    let mut head = [0u8; HEAD];
    let n = data.len().min(HEAD);
    head[..n].copy_from_slice(&data[..n]);
    let domain = Uuid(head[..16].try_into().unwrap());
    let first_host = le16(&head, 16);
    let max_hosts = le16(&head, 18);
    let sector_size = le32(&head, 20);
    let offset = le64(&head, 24);
    let body = &data[n..];

    // Whole areas, zero-padded, at most MAX_AREAS.
    let count = body.len().div_ceil(AREA_SIZE).min(MAX_AREAS);
    let mut region = vec![0u8; count * AREA_SIZE];
    let copied = body.len().min(region.len());
    region[..copied].copy_from_slice(&body[..copied]);
    if head[32] & 1 != 0 {
        for rec in region.chunks_exact_mut(LEN) {
            if !is_nil(rec) {
                seal(rec.try_into().unwrap());
            }
        }
    }
    // Host ids stop at u16::MAX.
    let hosts_left = usize::from(u16::MAX - first_host) + 1;
    scan::<Request>(&region, domain, first_host, count.min(hosts_left));
    scan::<Hold>(&region, domain, first_host, count.min(hosts_left));
    scan::<Reply>(&region, domain, first_host, count.min(hosts_left));
    // A trailing partial area is ignored.
    let unpadded = &body[..body.len().min(MAX_AREAS * AREA_SIZE)];
    let whole = (unpadded.len() / AREA_SIZE).min(hosts_left);
    assert_eq!(
        areas::<Request>(unpadded, domain, HostId::new(first_host)).count(),
        whole
    );
    assert_eq!(
        areas::<Reply>(unpadded, domain, HostId::new(first_host)).count(),
        whole
    );

    let in_range = max_hosts % MAX_HOSTS + 1;
    for hosts in [max_hosts, in_range] {
        for sector in [sector_size, 512, 4096] {
            geometry(hosts, sector, offset, first_host);
        }
    }
}

/// The other kind an inbox slot may hold (docs/format.md 3.1).
fn sibling(kind: Kind) -> Option<Kind> {
    match kind {
        Kind::Request => Some(Kind::Hold),
        Kind::Hold => Some(Kind::Request),
        _ => None,
    }
}

/// What docs/format.md 6.1 says a slot of an area of `kind` slots holds:
/// a valid record of the sibling kind is no record of this kind (empty);
/// a defective one is defective.
fn slot_verdict(rec: &[u8], kind: Kind, at: &Location) -> Verdict {
    let here = verdict(rec, Some(kind), Some(at));
    match (&here, sibling(kind)) {
        (Verdict::Defect(Defect::WrongKind { found, .. }), Some(other)) if *found == other => {
            match verdict(rec, Some(other), Some(at)) {
                Verdict::Valid(_) => Verdict::Empty,
                v => v,
            }
        }
        _ => here,
    }
}

fn scan<S>(region: &[u8], domain: Uuid, first_host: u16, expected_areas: usize)
where
    S: SlotRecord + Typed,
    S::Header: Typed,
{
    let mut seen = 0;
    for (i, area) in areas::<S>(region, domain, HostId::new(first_host)).enumerate() {
        seen += 1;
        let host_id = area.host_id();
        assert_eq!(usize::from(host_id.get()), usize::from(first_host) + i);
        let bytes = &region[i * AREA_SIZE..(i + 1) * AREA_SIZE];
        let at = |index: u16| Location {
            domain,
            host_id,
            index,
        };
        for index in 0..=33u16 {
            let want = bytes.get(usize::from(index) * LEN..(usize::from(index) + 1) * LEN);
            assert_eq!(
                area.record_bytes(index).map(|b| &b[..]),
                want,
                "record {index}"
            );
        }
        assert_eq!(area.record_bytes(u16::MAX), None);

        // The header.
        let header = area.header();
        let header_bytes = &bytes[..LEN];
        assert_eq!(header, S::Header::parse(header_bytes, &at(0)));
        assert_verdict(
            "area header",
            kind_outcome(&header, |_| S::Header::KIND),
            &verdict(header_bytes, Some(S::Header::KIND), Some(&at(0))),
        );
        if let Ok(Some(h)) = header {
            assert_eq!(h.location(), at(0), "header of another place accepted");
        }
        let generation = match header {
            Ok(Some(h)) => Some(S::header_generation(&h)),
            _ => None,
        };

        // The slots.
        let slots: Vec<(Slot, SlotState<S>)> = area.slots().collect();
        assert_eq!(slots.len(), 31, "an area has 31 slots");
        for (i, (slot, state)) in slots.iter().enumerate() {
            assert_eq!(usize::from(slot.get()), i + 1, "slots are numbered 1..=31");
            assert_eq!(area.slot(*slot), Some(*state), "slot({slot}) != slots()");
            let rec = &bytes[usize::from(slot.get()) * LEN..][..LEN];
            let parsed = S::parse_slot(rec, &at(slot.get()));
            let want = slot_verdict(rec, S::KIND, &at(slot.get()));
            assert_verdict("slot", kind_outcome(&parsed, |_| S::KIND), &want);
            if want != Verdict::Empty {
                assert_eq!(parsed, S::parse(rec, &at(slot.get())));
            }
            match *state {
                SlotState::Empty => {
                    assert!(
                        is_nil(rec) || want == Verdict::Empty,
                        "non-zero slot {slot} empty"
                    );
                    assert_eq!(parsed, Ok(None));
                }
                SlotState::Valid(r) => {
                    assert_eq!(parsed, Ok(Some(r)));
                    assert_eq!(
                        r.location(),
                        at(slot.get()),
                        "valid record of another place"
                    );
                    assert_eq!(
                        Some(r.generation()),
                        generation,
                        "valid slot {slot} without a valid header of its generation"
                    );
                }
                SlotState::Stale(r) => {
                    assert_eq!(parsed, Ok(Some(r)));
                    assert_eq!(
                        r.location(),
                        at(slot.get()),
                        "stale record of another place"
                    );
                    assert_ne!(
                        Some(r.generation()),
                        generation,
                        "slot {slot} of the header's generation is stale"
                    );
                }
                SlotState::Defective(defect) => assert_eq!(parsed, Err(defect)),
            }
        }
        // With slot(1..=31) above, slot(n) for n in 0..=33 and beyond.
        for slot in [0, 32, 33, u16::MAX] {
            assert_eq!(area.slot(Slot::new(slot)), None, "slot {slot} exists");
        }
    }
    assert_eq!(seen, expected_areas, "areas yielded");
}

fn geometry(max_hosts: u16, sector_size: u32, offset: u64, host: u16) {
    let g = match Geometry::new(max_hosts, sector_size) {
        Ok(g) => g,
        Err(err) => {
            assert_geometry_error(err, max_hosts, sector_size);
            return;
        }
    };
    assert!(matches!(sector_size, 512 | 4096) && (1..=MAX_HOSTS).contains(&max_hosts));
    assert_eq!((g.max_hosts(), g.sector_size()), (max_hosts, sector_size));
    assert!(g.hosts().map(HostId::get).eq(1..=max_hosts));
    let area = AREA_SIZE as u64;
    let hosts = u64::from(max_hosts);
    assert_eq!(g.inbox_offset(), 65536);
    assert_eq!(g.outbox_offset(), 65536 + hosts * area);
    assert_eq!(g.mailbox_size(), 65536 + 2 * hosts * area);
    assert_eq!(g.region_len(), hosts * area);

    let size = g.mailbox_size();
    let offsets = [
        offset,
        offset % (size + 2 * area),
        offset % 65536,
        0,
        4095,
        4096,
        8192,
        12288,
        61439,
        61440,
        65535,
        65536,
        g.outbox_offset() - 1,
        g.outbox_offset(),
        size - 1,
        size,
        u64::MAX,
    ];
    for off in offsets {
        let place = g.locate(off);
        assert_eq!(place, expected_place(off, max_hosts), "locate({off})");
        if let Some(p) = place {
            assert!(!p.to_string().is_empty());
            if let Region::Inbox { host_id } | Region::Outbox { host_id } = p.region {
                assert!((1..=max_hosts).contains(&host_id.get()), "host {host_id}");
            }
        }
    }

    for h in [host, 0, 1, max_hosts, max_hosts.wrapping_add(1)] {
        let valid = (1..=max_hosts).contains(&h);
        let (inbox, outbox) = (g.inbox_area(HostId::new(h)), g.outbox_area(HostId::new(h)));
        assert_eq!(inbox.is_some(), valid, "inbox_area({h})");
        assert_eq!(outbox.is_some(), valid, "outbox_area({h})");
        if let (Some(i), Some(o)) = (inbox, outbox) {
            for (start, region) in [
                (
                    i,
                    Region::Inbox {
                        host_id: HostId::new(h),
                    },
                ),
                (
                    o,
                    Region::Outbox {
                        host_id: HostId::new(h),
                    },
                ),
            ] {
                for within in [0, 127, 128, 4095] {
                    let p = g.locate(start + within).expect("area inside the mailbox");
                    assert_eq!(p.region, region);
                    assert_eq!(
                        (p.index, p.byte),
                        ((within / 128) as u16, (within % 128) as u16)
                    );
                }
            }
        }
    }
}

/// What docs/format.md section 3 puts at `off`.
fn expected_place(off: u64, max_hosts: u16) -> Option<Place> {
    let hosts = u64::from(max_hosts);
    let outbox = 65536 + hosts * 4096;
    let end = outbox + hosts * 4096;
    if off >= end {
        return None;
    }
    let region = match off {
        0..4096 => Region::Superblock,
        4096..8192 => Region::SpmHeader,
        8192..12288 => Region::Doorbell,
        12288..61440 => Region::Reserved,
        61440..65536 => Region::SuperblockBackup,
        _ if off < outbox => Region::Inbox {
            host_id: HostId::new(((off - 65536) / 4096 + 1) as u16),
        },
        _ => Region::Outbox {
            host_id: HostId::new(((off - outbox) / 4096 + 1) as u16),
        },
    };
    Some(Place {
        offset: off,
        region,
        index: (off % 4096 / 128) as u16,
        byte: (off % 128) as u16,
    })
}
