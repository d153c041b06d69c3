//! Arbitrary bytes (any length) through every record decoder.
//!
//! Every 128-byte input is checked twice: as it is, and with its CRC fixed
//! (random bytes almost never pass the checksum, and everything behind it
//! would go unfuzzed).
//!
//! Checks that `Record::decode`, the seven typed `decode`s, `Record::parse`
//! and the typed `parse`s never panic and:
//! - give exactly the verdict of docs/format.md section 6 (an independent
//!   model in `spmbox_fuzz`): non-128-byte input is `Defect::Length`,
//!   all-zero input is `Ok(None)`, the defects come in the documented order,
//!   an invalid field is reported by a field that really breaks its rule;
//! - decode a valid record to the value its bytes spell out, and emitting
//!   that value (`emit`, `to_bytes`, `Record::emit`) gives back exactly the
//!   input bytes;
//! - agree with each other: a typed decoder returns what `Record::decode`
//!   returns for its kind and `WrongKind` for every other kind;
//! - `parse` at a location (the record's own and perturbations of it)
//!   returns a record only if the location's domain, host and index are the
//!   record's, and then the same record `decode` returns.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spmbox_core::wire::{
    Defect, Doorbell, Hold, HostId, InboxHeader, Location, OutboxHeader, Record, Reply, Request,
    SpmHeader, Superblock, Uuid,
};
use spmbox_fuzz::{
    LEN, Typed, assert_verdict, expected_record, is_nil, kind_of_code, kind_outcome,
    prefix_location, seal, verdict,
};

fuzz_target!(|data: &[u8]| {
    check(data);
    // Random bytes almost never carry a matching CRC, so a 128-byte input is
    // also checked with its CRC fixed: that takes the fuzzer past the
    // checksum to the version, kind, place, reserved byte and field checks.
    if let Ok(rec) = <[u8; LEN]>::try_from(data) {
        let mut sealed = rec;
        seal(&mut sealed);
        if sealed != rec {
            check(&sealed);
        }
    }
});

fn check(data: &[u8]) {
    let decoded = Record::decode(data);
    assert_verdict(
        "Record::decode",
        kind_outcome(&decoded, Record::kind),
        &verdict(data, None, None),
    );
    if data.len() != LEN {
        assert_eq!(
            decoded,
            Err(Defect::Length {
                len: data.len() as u32
            })
        );
    } else if is_nil(data) {
        assert_eq!(decoded, Ok(None));
    }
    // Without a place and a kind to expect, these defects cannot arise.
    assert!(
        !matches!(
            decoded,
            Err(Defect::WrongKind { .. } | Defect::Foreign { .. } | Defect::Misdirected { .. })
        ),
        "Record::decode reported {decoded:?}"
    );
    if let Err(defect) = decoded {
        // Reporting never panics either.
        assert!(!defect.to_string().is_empty() && !defect.name().is_empty());
    }
    if let Ok(Some(record)) = decoded {
        let rec: &[u8; LEN] = data.try_into().unwrap();
        assert_eq!(
            record,
            expected_record(rec, record.kind()),
            "decoded value differs from the bytes' fields"
        );
        let mut buf = [0x5a; LEN];
        assert_eq!(record.emit(&mut buf), Ok(()), "a decoded record must emit");
        assert_eq!(&buf, rec, "emit must give back the decoded bytes");
    }

    typed::<Superblock>(data, &decoded);
    typed::<SpmHeader>(data, &decoded);
    typed::<Doorbell>(data, &decoded);
    typed::<InboxHeader>(data, &decoded);
    typed::<Request>(data, &decoded);
    typed::<OutboxHeader>(data, &decoded);
    typed::<Reply>(data, &decoded);
    typed::<Hold>(data, &decoded);

    for at in locations(data) {
        let parsed = Record::parse(data, &at);
        assert_verdict(
            "Record::parse",
            kind_outcome(&parsed, Record::kind),
            &verdict(data, None, Some(&at)),
        );
        match (&decoded, &parsed) {
            (_, Ok(Some(record))) => {
                assert_eq!(prefix_location(data), at, "parse accepted another place");
                assert_eq!(decoded, Ok(Some(*record)), "parse and decode disagree");
            }
            (Ok(None), p) => assert_eq!(*p, Ok(None)),
            (Err(_), p) => assert!(p.is_err(), "parse accepted what decode refused"),
            (Ok(Some(_)), p) => assert!(
                matches!(p, Err(Defect::Foreign { .. } | Defect::Misdirected { .. })),
                "a valid record read elsewhere must be foreign or misdirected, got {p:?}"
            ),
        }
        typed_parse::<Superblock>(data, &at);
        typed_parse::<SpmHeader>(data, &at);
        typed_parse::<Doorbell>(data, &at);
        typed_parse::<InboxHeader>(data, &at);
        typed_parse::<Request>(data, &at);
        typed_parse::<OutboxHeader>(data, &at);
        typed_parse::<Reply>(data, &at);
        typed_parse::<Hold>(data, &at);
    }
}

/// The typed decoder of `T` against the model and against `Record::decode`.
fn typed<T: Typed>(data: &[u8], decoded: &Result<Option<Record>, Defect>) {
    let got = T::decode(data);
    let name = T::KIND.name();
    assert_verdict(
        name,
        kind_outcome(&got, |_| T::KIND),
        &verdict(data, Some(T::KIND), None),
    );
    let expected = match *decoded {
        Ok(None) => Ok(None),
        Ok(Some(record)) => match T::unwrap(record) {
            Some(v) => Ok(Some(v)),
            None => Err(Defect::WrongKind {
                expected: T::KIND,
                found: record.kind(),
            }),
        },
        // Found once the kind is known: reported as such for the kind,
        // as a wrong kind by the other decoders.
        Err(defect @ (Defect::ReservedNotZero { .. } | Defect::InvalidField { .. })) => {
            let found = kind_of_code(data[8]).expect("a known kind");
            if found == T::KIND {
                Err(defect)
            } else {
                Err(Defect::WrongKind {
                    expected: T::KIND,
                    found,
                })
            }
        }
        Err(defect) => Err(defect),
    };
    assert_eq!(
        got, expected,
        "{name}::decode disagrees with Record::decode"
    );
    if let Ok(Some(v)) = got {
        let mut buf = [0xa5; LEN];
        assert_eq!(
            v.emit(&mut buf),
            Ok(()),
            "{name}: a decoded record must emit"
        );
        assert_eq!(&buf[..], data, "{name}: emit must give back the bytes");
        assert_eq!(v.to_bytes().as_ref().map(|b| &b[..]), Ok(data));
        assert_eq!(v.wrap(), decoded.unwrap().unwrap());
    }
}

/// The typed parser of `T` at `at`.
fn typed_parse<T: Typed>(data: &[u8], at: &Location) {
    let got = T::parse(data, at);
    let name = T::KIND.name();
    assert_verdict(
        name,
        kind_outcome(&got, |_| T::KIND),
        &verdict(data, Some(T::KIND), Some(at)),
    );
    if let Ok(Some(v)) = got {
        assert_eq!(v.location(), *at, "{name}::parse accepted another place");
        assert_eq!(prefix_location(data), *at);
        assert_eq!(
            T::decode(data),
            Ok(Some(v)),
            "{name}: parse and decode disagree"
        );
    }
}

/// Places to parse the input at: where its prefix says it belongs, and
/// that place with the domain, the host or the index changed (which bit is
/// chosen by the CRC bytes, which vary with everything else).
fn locations(data: &[u8]) -> [Location; 5] {
    let mut prefix = [0u8; 32];
    let n = data.len().min(32);
    prefix[..n].copy_from_slice(&data[..n]);
    let own = prefix_location(&prefix);
    let (a, b) = (usize::from(prefix[0]), u32::from(prefix[1]));
    let mut domain = own.domain.0;
    domain[a % 16] ^= 1 << (b % 8);
    [
        own,
        Location {
            domain: Uuid(domain),
            ..own
        },
        Location {
            host_id: HostId::new(own.host_id.get() ^ (1 << (b % 16))),
            ..own
        },
        Location {
            index: own.index ^ (1 << (a % 16)),
            ..own
        },
        Location {
            host_id: HostId::new(own.host_id.get().wrapping_add(1)),
            index: own.index.wrapping_sub(1),
            ..own
        },
    ]
}
