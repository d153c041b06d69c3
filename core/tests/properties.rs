//! Properties of the wire format over arbitrary input.

use proptest::prelude::*;
use spmbox_core::wire::{
    Defect, Epoch, Generation, Geometry, HostId, Location, RECORD_LEN, Record, RejectReason, Reply,
    ReplyStatus, Request, Slot, Uuid,
};

fn uuid() -> impl Strategy<Value = Uuid> {
    any::<[u8; 16]>()
        .prop_filter("non-nil", |b| *b != [0; 16])
        .prop_map(Uuid)
}

prop_compose! {
    fn valid_request()(
        domain in uuid(), host_id in 1u16..=2000, slot in 1u16..=31,
        generation in 1u64.., sequence in 1u64.., volume in uuid(),
        sectors in 1u64..(1 << 40), current_size in any::<u64>(), paused in any::<bool>(),
    ) -> Request {
        Request { domain, host_id: HostId::new(host_id), slot: Slot::new(slot), generation: Generation::new(generation), sequence, volume,
                  target_size: sectors * 512, current_size, paused }
    }
}

fn status() -> impl Strategy<Value = ReplyStatus> {
    prop_oneof![
        Just(ReplyStatus::Extended),
        Just(ReplyStatus::WaitingForSpace),
        Just(ReplyStatus::Rejected(RejectReason::UnknownVolume)),
        Just(ReplyStatus::Rejected(RejectReason::OverLimit)),
        Just(ReplyStatus::Rejected(RejectReason::Malformed)),
        any::<u32>().prop_map(|code| ReplyStatus::Failed { code }),
    ]
}

prop_compose! {
    fn valid_reply()(request in valid_request(), extra in 0u64..(1 << 30), epoch in 1u64.., status in status()) -> Reply {
        Reply {
            domain: request.domain, host_id: request.host_id, slot: request.slot,
            generation: request.generation, sequence: request.sequence, volume: request.volume,
            target_size: request.target_size, size: request.target_size + extra, epoch: Epoch::new(epoch), status,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Any bytes decode to something (never a panic), and whatever decodes
    /// as valid is emitted back to exactly the same bytes.
    #[test]
    fn arbitrary_bytes_never_panic_and_valid_ones_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(Some(record)) = Record::decode(&bytes) {
            let mut buf = [0u8; RECORD_LEN];
            record.emit(&mut buf).unwrap();
            prop_assert_eq!(&buf[..], &bytes[..]);
        }
    }

    /// Random 128-byte records with the right magic and version still never
    /// decode as valid unless their checksum matches.
    #[test]
    fn random_records_with_a_plausible_prefix_fail_the_checksum(mut bytes in any::<[u8; 32]>().prop_map(|head| {
        let mut r = [0u8; RECORD_LEN];
        r[..32].copy_from_slice(&head);
        r
    }), kind in 1u8..=7) {
        bytes[4..8].copy_from_slice(b"SPMB");
        bytes[8] = kind;
        bytes[9] = 1;
        let got = Record::decode(&bytes);
        let crc_ok = spmbox_core::wire::CRC32C.checksum(&bytes[4..]).to_le_bytes() == bytes[..4];
        prop_assert!(crc_ok || matches!(got, Err(Defect::Checksum { .. })), "got {:?}", got);
    }

    #[test]
    fn requests_round_trip(r in valid_request()) {
        let bytes = r.to_bytes().unwrap();
        prop_assert_eq!(Request::decode(&bytes), Ok(Some(r)));
        let at = Location { domain: r.domain, host_id: r.host_id, index: r.slot.get() };
        prop_assert_eq!(Request::parse(&bytes, &at), Ok(Some(r)));
    }

    #[test]
    fn replies_round_trip(r in valid_reply()) {
        let bytes = r.to_bytes().unwrap();
        prop_assert_eq!(Reply::decode(&bytes), Ok(Some(r)));
    }

    /// CRC32C detects every single-bit error, so no flipped record is valid.
    #[test]
    fn no_single_bit_flip_decodes(r in valid_request(), bit in 0usize..(RECORD_LEN * 8)) {
        let mut bytes = r.to_bytes().unwrap();
        bytes[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(Record::decode(&bytes).is_err());
    }

    /// A valid record parses only at the place it names.
    #[test]
    fn records_parse_only_where_they_belong(r in valid_request(), host_id in 1u16..=2000, index in 0u16..32, other in uuid()) {
        let bytes = r.to_bytes().unwrap();
        let here = (host_id, index) == (r.host_id.get(), r.slot.get());
        let got = Request::parse(&bytes, &Location { domain: r.domain, host_id: HostId::new(host_id), index });
        prop_assert_eq!(got.is_ok(), here);
        if other != r.domain {
            let got = Request::parse(&bytes, &Location { domain: other, host_id: r.host_id, index: r.slot.get() });
            prop_assert_eq!(got, Err(Defect::Foreign { domain: r.domain }));
        }
    }

    /// locate() and the area offsets agree for every host.
    #[test]
    fn locate_agrees_with_area_offsets(max_hosts in 1u16..=2000, host in 1u16..=2000, within in 0u64..4096) {
        let g = Geometry::new(max_hosts, 512).unwrap();
        match g.inbox_area(HostId::new(host)) {
            Some(start) => {
                let p = g.locate(start + within).unwrap();
                prop_assert_eq!(p.region, spmbox_core::wire::Region::Inbox { host_id: HostId::new(host) });
                let p = g.locate(g.outbox_area(HostId::new(host)).unwrap() + within).unwrap();
                prop_assert_eq!(p.region, spmbox_core::wire::Region::Outbox { host_id: HostId::new(host) });
            }
            None => prop_assert!(host > max_hosts),
        }
    }
}
