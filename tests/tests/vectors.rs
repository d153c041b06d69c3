//! The format's test vectors (`tests/vectors/`), built from docs/format.md
//! alone by `tests/vectors/generate.py`, checked against the reference
//! implementation: every record read at its place, every host area, no
//! orphan files, and the generator reproducing the committed bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use spmbox_core::wire::{
    AREA_SIZE, Area, CRC32C, Defect, FORMAT_VERSION, HoldArea, HostId, InboxArea, OutboxArea,
    RECORD_LEN, Record, SLOTS_PER_AREA, Slot, SlotRecord, SlotState,
};
use spmbox_tests::vectors::{
    AreaEntry, Parsed, SlotEntry, assert_no_failures, bin_files, check_defect, check_outcome,
    decode_as, describe, emit, first_difference, load_manifest, parse_at, place, read_vector,
    regenerate, show, uuid, vectors_dir,
};

/// Checks one record vector; `Err` says what is wrong.
fn check_record_vector(entry: &spmbox_tests::vectors::RecordEntry) -> Result<(), String> {
    let bytes = read_vector(&entry.file)?;
    if entry.verdict != "length" && bytes.len() != RECORD_LEN {
        return Err(format!("is {} bytes, not {RECORD_LEN}", bytes.len()));
    }
    let (kind, at) = place(&entry.at)?;
    let want = entry.outcome();
    let got = parse_at(kind, &bytes, &at);
    check_outcome(&got, &want).map_err(|e| format!("read at {}: {e}", show_at(entry)))?;

    // Decoded as the same kind without a place: the same outcome unless the
    // manifest says otherwise (a foreign or misdirected record is valid on
    // its own).
    let alone_want = entry.without_place.clone().unwrap_or_else(|| want.clone());
    let alone = decode_as(kind, &bytes);
    check_outcome(&alone, &alone_want)
        .map_err(|e| format!("decoded as {} without a place: {e}", kind.name()))?;

    // A valid record: Record::decode agrees, and emitting it gives back the
    // file's exact bytes.
    for (how, parsed) in [("at its place", &got), ("without a place", &alone)] {
        if let Ok(Some(record)) = parsed {
            let any = Record::decode(&bytes);
            if any != Ok(Some(*record)) {
                return Err(format!(
                    "Record::decode gives {}, the typed decoder ({how}) {}",
                    describe(&any),
                    describe(parsed)
                ));
            }
            let emitted = emit(record)
                .map_err(|f| format!("emit of the record valid {how} refuses field {f}"))?;
            if emitted[..] != bytes[..] {
                return Err(format!(
                    "emitting the record valid {how} gives other bytes (first difference at byte {})",
                    first_difference(&emitted, &bytes)
                ));
            }
        }
    }
    Ok(())
}

fn show_at(entry: &spmbox_tests::vectors::RecordEntry) -> String {
    let at = &entry.at;
    format!(
        "{} of host {} index {} in {}",
        at.kind, at.host_id, at.index, at.domain
    )
}

#[test]
fn every_record_vector_reads_at_its_place_as_the_manifest_says() {
    let manifest = load_manifest();
    assert!(
        !manifest.records.is_empty(),
        "the manifest lists no records"
    );
    let failures: Vec<String> = manifest
        .records
        .iter()
        .filter_map(|entry| {
            check_record_vector(entry)
                .err()
                .map(|e| format!("{}: {e}", entry.file))
        })
        .collect();
    assert_no_failures("record vectors", manifest.records.len(), &failures);
}

/// Checks a slot against the manifest's entry for it (`None`: empty).
fn check_slot<S: SlotRecord>(
    state: &SlotState<S>,
    want: Option<&SlotEntry>,
    to_record: fn(S) -> Record,
) -> Result<(), String> {
    let (name, record) = match state {
        SlotState::Empty => ("empty", None),
        SlotState::Valid(r) => ("valid", Some(to_record(*r))),
        SlotState::Stale(r) => ("stale", Some(to_record(*r))),
        SlotState::Defective(d) => (d.name(), None),
    };
    let Some(want) = want else {
        return match state {
            SlotState::Empty => Ok(()),
            _ => Err(format!(
                "expected empty, got {name} {}",
                slot_detail(state, record)
            )),
        };
    };
    if want.state != name {
        return Err(format!(
            "expected {}, got {name} {}",
            want.state,
            slot_detail(state, record)
        ));
    }
    match (state, record) {
        (SlotState::Defective(d), _) => check_defect(d, &want.state, want.defect.as_ref()),
        (_, Some(record)) => {
            let rendered = spmbox::json::record(&record);
            // Requests and replies carry a sequence; hold records none.
            let sequence = rendered.get("sequence").and_then(|s| s.as_u64());
            if sequence != want.sequence {
                return Err(format!(
                    "expected sequence {:?}, got {sequence:?}",
                    want.sequence
                ));
            }
            if want.record.as_ref() != Some(&rendered) {
                return Err(format!(
                    "record differs: expected {}, got {}",
                    want.record.as_ref().map(show).unwrap_or_default(),
                    show(&rendered)
                ));
            }
            Ok(())
        }
        _ => Err(format!(
            "the manifest lists the empty slot as {}",
            want.state
        )),
    }
}

fn slot_detail<S>(state: &SlotState<S>, record: Option<Record>) -> String {
    match (state, record) {
        (SlotState::Defective(d), _) => format!("({d})"),
        (_, Some(r)) => show(&spmbox::json::record(&r)),
        _ => String::new(),
    }
}

fn check_area<S: SlotRecord + PartialEq>(
    area: &Area<'_, S>,
    entry: &AreaEntry,
    header_record: fn(S::Header) -> Record,
    slot_record: fn(S) -> Record,
) -> Vec<String> {
    let mut failures = Vec::new();
    let header: Parsed = area.header().map(|h| h.map(header_record));
    if let Err(e) = check_outcome(&header, &entry.header) {
        failures.push(format!("header: {e}"));
    }
    let mut listed: BTreeMap<u16, &SlotEntry> = BTreeMap::new();
    for slot in &entry.slots {
        if !(1..=SLOTS_PER_AREA).contains(&slot.slot) || listed.insert(slot.slot, slot).is_some() {
            failures.push(format!(
                "the manifest lists slot {} out of range or twice",
                slot.slot
            ));
        }
    }
    for n in 1..=SLOTS_PER_AREA {
        let Some(state) = area.slot(Slot::new(n)) else {
            failures.push(format!("slot {n}: the area refuses the slot number"));
            continue;
        };
        if let Err(e) = check_slot(&state, listed.get(&n).copied(), slot_record) {
            failures.push(format!("slot {n}: {e}"));
        }
    }
    // The iterator agrees with slot-by-slot reading.
    let all: Vec<(Slot, SlotState<S>)> = area.slots().collect();
    let one_by_one: Vec<(Slot, SlotState<S>)> = (1..=SLOTS_PER_AREA)
        .filter_map(|n| area.slot(Slot::new(n)).map(|s| (Slot::new(n), s)))
        .collect();
    if all != one_by_one {
        failures.push("slots() disagrees with slot(n)".into());
    }
    failures
}

fn check_area_vector(entry: &AreaEntry) -> Vec<String> {
    let bytes = match read_vector(&entry.file) {
        Ok(b) => b,
        Err(e) => return vec![e],
    };
    if bytes.len() != AREA_SIZE {
        return vec![format!("is {} bytes, not {AREA_SIZE}", bytes.len())];
    }
    let domain = match uuid(&entry.domain) {
        Ok(d) => d,
        Err(e) => return vec![e],
    };
    match entry.side.as_str() {
        "inbox" => {
            // An inbox slot holds a request or a hold record: each view
            // sees the other kind as empty, and a defect in both.
            let is_hold = |s: &SlotEntry| {
                s.record
                    .as_ref()
                    .and_then(|r| r.get("kind"))
                    .is_some_and(|k| k == "hold")
            };
            let view = |holds: bool| AreaEntry {
                slots: entry
                    .slots
                    .iter()
                    .filter(|s| s.defect.is_some() || is_hold(s) == holds)
                    .cloned()
                    .collect(),
                ..entry.clone()
            };
            let host = HostId::new(entry.host_id);
            match (
                InboxArea::new(&bytes, domain, host),
                HoldArea::new(&bytes, domain, host),
            ) {
                (Some(requests), Some(holds)) => {
                    let mut failures = check_area(
                        &requests,
                        &view(false),
                        Record::InboxHeader,
                        Record::Request,
                    );
                    failures.extend(
                        check_area(&holds, &view(true), Record::InboxHeader, Record::Hold)
                            .into_iter()
                            .map(|f| format!("hold view: {f}")),
                    );
                    failures
                }
                _ => vec!["InboxArea::new refuses it".into()],
            }
        }
        "outbox" => match OutboxArea::new(&bytes, domain, HostId::new(entry.host_id)) {
            Some(area) => check_area(&area, entry, Record::OutboxHeader, Record::Reply),
            None => vec!["OutboxArea::new refuses it".into()],
        },
        side => vec![format!("unknown side {side:?}")],
    }
}

#[test]
fn every_area_vector_reads_as_the_manifest_says() {
    let manifest = load_manifest();
    assert!(!manifest.areas.is_empty(), "the manifest lists no areas");
    let failures: Vec<String> = manifest
        .areas
        .iter()
        .flat_map(|entry| {
            check_area_vector(entry)
                .into_iter()
                .map(move |e| format!("{}: {e}", entry.file))
        })
        .collect();
    assert_no_failures("area vectors", manifest.areas.len(), &failures);
}

#[test]
fn every_vector_file_is_in_the_manifest_and_every_entry_has_its_file() {
    let manifest = load_manifest();
    let mut named = BTreeSet::new();
    let mut twice = Vec::new();
    let files = manifest.records.iter().map(|r| &r.file);
    for file in files.chain(manifest.areas.iter().map(|a| &a.file)) {
        if !named.insert(file.clone()) {
            twice.push(file.clone());
        }
    }
    let on_disk = bin_files(&vectors_dir());
    let orphans: Vec<_> = on_disk.difference(&named).collect();
    let missing: Vec<_> = named.difference(&on_disk).collect();
    assert!(
        orphans.is_empty() && missing.is_empty() && twice.is_empty(),
        "vector files not in the manifest: {orphans:?}; manifest entries without their file: \
         {missing:?}; files listed twice: {twice:?}"
    );
}

#[test]
fn crc32c_check_value_holds() {
    assert_eq!(CRC32C.checksum(b"123456789"), 0xE306_9283);
    let manifest = load_manifest();
    assert_eq!(
        manifest.format_version, FORMAT_VERSION,
        "manifest.json: format_version"
    );
    let check = &manifest.crc32c_check;
    assert_eq!(
        check.input, "123456789",
        "manifest.json: crc32c_check.input"
    );
    assert_eq!(
        CRC32C.checksum(check.input.as_bytes()),
        check.crc,
        "manifest.json: crc32c_check.crc"
    );
}

/// Every kind has a valid vector, every verdict of docs/format.md section 6
/// a vector, every reply status and reason a valid vector, and both sides
/// an area: a vector dropped from the generator does not go unnoticed.
#[test]
fn the_vectors_cover_every_kind_verdict_and_reply_status() {
    let manifest = load_manifest();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for entry in &manifest.records {
        seen.insert(entry.verdict.clone());
        if let Some(record) = &entry.record {
            let field = |k: &str| record.get(k).map(|v| v.to_string()).unwrap_or_default();
            seen.insert(format!("kind {}", field("kind")));
            if field("kind") == "\"reply\"" {
                seen.insert(format!("status {} {}", field("status"), field("reason")));
            }
        }
    }
    for entry in &manifest.areas {
        seen.insert(format!("area {}", entry.side));
        for slot in &entry.slots {
            seen.insert(format!("slot {}", slot.state));
            if let Some(kind) = slot.record.as_ref().and_then(|r| r.get("kind")) {
                seen.insert(format!("slot {} {kind}", slot.state));
            }
        }
    }
    let kinds = (1..=u8::MAX).filter_map(spmbox_core::wire::Kind::from_code);
    let mut required: Vec<String> = kinds.map(|k| format!("kind \"{}\"", k.name())).collect();
    let defects = [
        Defect::Length { len: 0 },
        Defect::BadMagic,
        Defect::Checksum {
            stored: 0,
            computed: 0,
        },
        Defect::UnsupportedVersion { version: 0 },
        Defect::UnknownKind { code: 0 },
        Defect::WrongKind {
            expected: spmbox_core::wire::Kind::Request,
            found: spmbox_core::wire::Kind::Reply,
        },
        Defect::Foreign {
            domain: spmbox_core::wire::Uuid::NIL,
        },
        Defect::Misdirected {
            host_id: HostId::NONE,
            index: 0,
        },
        Defect::ReservedNotZero { offset: 0 },
        Defect::InvalidField {
            field: spmbox_core::wire::Field::Flags,
        },
    ];
    required.extend(defects.iter().map(|d| d.name().to_string()));
    required.extend(["valid", "empty", "area inbox", "area outbox"].map(String::from));
    required.extend(["slot valid", "slot stale", "slot checksum"].map(String::from));
    required.extend(["slot valid \"hold\"", "slot stale \"hold\""].map(String::from));
    for status in [
        "\"extended\" null",
        "\"waiting_for_space\" null",
        "\"rejected\" \"unknown_volume\"",
        "\"rejected\" \"over_limit\"",
        "\"rejected\" \"malformed\"",
        "\"rejected\" \"segments_full\"",
        "\"failed\" null",
    ] {
        required.push(format!("status {status}"));
    }
    let missing: Vec<_> = required.iter().filter(|r| !seen.contains(*r)).collect();
    assert!(missing.is_empty(), "no vector covers: {missing:?}");
}

#[test]
fn the_generator_reproduces_the_committed_vectors() {
    let Some((files, failures)) = regenerate(
        &vectors_dir().join("generate.py"),
        &vectors_dir(),
        &Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("spmbox-vectors-{}", std::process::id())),
    ) else {
        println!("skipped: generator reproducibility: python3 not found");
        return;
    };
    assert_no_failures(
        "files (rerun python3 tests/vectors/generate.py and review the diff)",
        files,
        &failures,
    );
}

/// The checks above can fail: a manifest that says something else about a
/// vector than the reader makes of it is caught (wrong verdict, one wrong
/// record value, one wrong defect detail).
#[test]
fn the_checks_reject_a_manifest_that_disagrees() {
    let manifest = load_manifest();
    let find = |verdict: &str| {
        manifest
            .records
            .iter()
            .find(|r| r.verdict == verdict && r.without_place.is_none())
            .unwrap_or_else(|| panic!("no {verdict} vector"))
    };
    let valid = find("valid");
    let reserved = find("reserved_not_zero");
    for entry in [valid, reserved] {
        assert_eq!(check_record_vector(entry), Ok(()), "{}", entry.file);
        let (kind, at) = place(&entry.at).expect("place");
        let got = parse_at(kind, &read_vector(&entry.file).expect("file"), &at);
        let mut wrong = entry.outcome();
        wrong.verdict = "empty".into();
        assert!(
            check_outcome(&got, &wrong).is_err(),
            "{}: verdict",
            entry.file
        );
        let mut wrong = entry.outcome();
        if let Some(record) = wrong.record.as_mut() {
            record["domain"] = "00000000-0000-0000-0000-000000000001".into();
        }
        if let Some(defect) = wrong.defect.as_mut() {
            defect.insert("offset".into(), 127.into());
        }
        assert!(
            check_outcome(&got, &wrong).is_err(),
            "{}: detail",
            entry.file
        );
    }
}
