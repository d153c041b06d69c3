//! Helpers for the format test vectors in `tests/vectors/`: the manifest's
//! schema (see `tests/vectors/README.md`), parsing a record where it was
//! read, and comparing what the reference implementation makes of a vector
//! with what the manifest (built from docs/format.md alone by
//! `tests/vectors/generate.py`) says it must.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};
use spmbox_core::wire::{
    Defect, Doorbell, Field, Hold, HostId, InboxHeader, Kind, Location, OutboxHeader, RECORD_LEN,
    Record, Reply, Request, SpmHeader, Superblock, Uuid,
};

/// The directory that holds the vectors, the manifest and the generator.
pub fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors")
}

/// Where the manifest lives.
pub fn manifest_path() -> PathBuf {
    vectors_dir().join("manifest.json")
}

/// `tests/vectors/manifest.json`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The format version the vectors are of.
    pub format_version: u8,
    /// The CRC32C check value of docs/format.md section 2.
    pub crc32c_check: CrcCheck,
    /// One entry per record file.
    pub records: Vec<RecordEntry>,
    /// One entry per host-area file.
    pub areas: Vec<AreaEntry>,
}

/// `crc32c_check`: the CRC32C of `input` (as ASCII bytes) is `crc`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct CrcCheck {
    /// The input text.
    pub input: String,
    /// Its CRC32C.
    pub crc: u32,
}

/// The place a record is read at.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct At {
    /// The kind that belongs there (docs/format.md section 4 names).
    pub kind: String,
    /// The mailbox's domain.
    pub domain: String,
    /// The host whose area it is; 0 for domain-wide kinds.
    pub host_id: u16,
    /// The record index: 0 for headers and domain-wide kinds, else the slot.
    pub index: u16,
}

/// What a reader must make of some bytes.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    /// `valid`, `empty` or a defect name of docs/format.md section 6.
    pub verdict: String,
    /// For `valid`: the record as `spmbox::json::record` renders it.
    #[serde(default)]
    pub record: Option<Value>,
    /// For defects: the details `spmbox::json::defect` renders, without
    /// `verdict` and `message`.
    #[serde(default)]
    pub defect: Option<Map<String, Value>>,
}

/// One record vector.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RecordEntry {
    /// File name in `tests/vectors/`.
    pub file: String,
    /// What the vector is.
    pub description: String,
    /// Where it is read.
    pub at: At,
    /// The verdict when read at `at`.
    pub verdict: String,
    /// For `valid`: the record.
    #[serde(default)]
    pub record: Option<Value>,
    /// For defects: the details.
    #[serde(default)]
    pub defect: Option<Map<String, Value>>,
    /// Only when it differs: the outcome of decoding as `at.kind` without
    /// a place (steps 8 and 9 skipped).
    #[serde(default)]
    pub without_place: Option<Outcome>,
}

impl RecordEntry {
    /// The outcome at the entry's place.
    pub fn outcome(&self) -> Outcome {
        Outcome {
            verdict: self.verdict.clone(),
            record: self.record.clone(),
            defect: self.defect.clone(),
        }
    }
}

/// One host-area vector (4096 bytes).
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct AreaEntry {
    /// File name in `tests/vectors/`.
    pub file: String,
    /// What the vector is.
    pub description: String,
    /// `inbox` or `outbox`.
    pub side: String,
    /// The mailbox's domain.
    pub domain: String,
    /// The host the area belongs to.
    pub host_id: u16,
    /// What the area header (record 0) reads as.
    pub header: Outcome,
    /// Every non-empty slot; slots not listed are empty.
    pub slots: Vec<SlotEntry>,
}

/// One non-empty slot of an area vector.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct SlotEntry {
    /// 1..=31.
    pub slot: u16,
    /// `valid`, `stale` or a defect name.
    pub state: String,
    /// For `valid` and `stale`: the record's sequence.
    #[serde(default)]
    pub sequence: Option<u64>,
    /// For `valid` and `stale`: the record.
    #[serde(default)]
    pub record: Option<Value>,
    /// For defects: the details.
    #[serde(default)]
    pub defect: Option<Map<String, Value>>,
}

/// Reads and parses the manifest.
pub fn load_manifest() -> Manifest {
    let path = manifest_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Reads a vector file.
pub fn read_vector(file: &str) -> Result<Vec<u8>, String> {
    let path = vectors_dir().join(file);
    std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The kind with this docs/format.md name.
pub fn kind_named(name: &str) -> Option<Kind> {
    (1..=u8::MAX)
        .filter_map(Kind::from_code)
        .find(|k| k.name() == name)
}

/// A UUID from the manifest.
pub fn uuid(text: &str) -> Result<Uuid, String> {
    Uuid::parse_str(text).ok_or_else(|| format!("bad UUID {text:?}"))
}

/// The manifest's place as a [`Location`], and the kind that belongs there.
pub fn place(at: &At) -> Result<(Kind, Location), String> {
    let kind = kind_named(&at.kind).ok_or_else(|| format!("unknown kind {:?}", at.kind))?;
    let location = Location {
        domain: uuid(&at.domain)?,
        host_id: HostId::new(at.host_id),
        index: at.index,
    };
    Ok((kind, location))
}

/// What a reader makes of a record.
pub type Parsed = Result<Option<Record>, Defect>;

/// Parses `bytes` with the typed parser of `kind` at `at`.
pub fn parse_at(kind: Kind, bytes: &[u8], at: &Location) -> Parsed {
    Ok(match kind {
        Kind::Superblock => Superblock::parse(bytes, at)?.map(Record::Superblock),
        Kind::SpmHeader => SpmHeader::parse(bytes, at)?.map(Record::SpmHeader),
        Kind::Doorbell => Doorbell::parse(bytes, at)?.map(Record::Doorbell),
        Kind::InboxHeader => InboxHeader::parse(bytes, at)?.map(Record::InboxHeader),
        Kind::Request => Request::parse(bytes, at)?.map(Record::Request),
        Kind::OutboxHeader => OutboxHeader::parse(bytes, at)?.map(Record::OutboxHeader),
        Kind::Reply => Reply::parse(bytes, at)?.map(Record::Reply),
        Kind::Hold => Hold::parse(bytes, at)?.map(Record::Hold),
    })
}

/// Decodes `bytes` with the typed decoder of `kind`, without a place.
pub fn decode_as(kind: Kind, bytes: &[u8]) -> Parsed {
    Ok(match kind {
        Kind::Superblock => Superblock::decode(bytes)?.map(Record::Superblock),
        Kind::SpmHeader => SpmHeader::decode(bytes)?.map(Record::SpmHeader),
        Kind::Doorbell => Doorbell::decode(bytes)?.map(Record::Doorbell),
        Kind::InboxHeader => InboxHeader::decode(bytes)?.map(Record::InboxHeader),
        Kind::Request => Request::decode(bytes)?.map(Record::Request),
        Kind::OutboxHeader => OutboxHeader::decode(bytes)?.map(Record::OutboxHeader),
        Kind::Reply => Reply::decode(bytes)?.map(Record::Reply),
        Kind::Hold => Hold::decode(bytes)?.map(Record::Hold),
    })
}

/// The record's bytes as its typed `emit` writes them.
pub fn emit(record: &Record) -> Result<[u8; RECORD_LEN], Field> {
    let mut buf = [0u8; RECORD_LEN];
    match record {
        Record::Superblock(r) => r.emit(&mut buf),
        Record::SpmHeader(r) => r.emit(&mut buf),
        Record::Doorbell(r) => r.emit(&mut buf),
        Record::InboxHeader(r) => r.emit(&mut buf),
        Record::Request(r) => r.emit(&mut buf),
        Record::OutboxHeader(r) => r.emit(&mut buf),
        Record::Reply(r) => r.emit(&mut buf),
        Record::Hold(r) => r.emit(&mut buf),
    }?;
    Ok(buf)
}

/// Compact JSON for messages.
pub fn show(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("<{e}>"))
}

/// Checks a defect against the manifest's verdict and details: its name
/// is the verdict, and `spmbox::json::defect` renders exactly `verdict`,
/// a nonempty `message` and the manifest's details.
pub fn check_defect(
    d: &Defect,
    verdict: &str,
    details: Option<&Map<String, Value>>,
) -> Result<(), String> {
    if d.name() != verdict {
        return Err(format!("expected {verdict}, got {} ({d:?}: {d})", d.name()));
    }
    let Some(want) = details else {
        return Err(format!(
            "the manifest gives no defect details for {verdict}"
        ));
    };
    let rendered = spmbox::json::defect(d);
    let Value::Object(mut got) = rendered.clone() else {
        return Err(format!("json::defect is not an object: {rendered}"));
    };
    if got.remove("verdict") != Some(Value::from(verdict)) {
        return Err(format!("json::defect has the wrong verdict: {rendered}"));
    }
    match got.remove("message") {
        Some(Value::String(m)) if !m.is_empty() => {}
        _ => return Err(format!("json::defect has no message: {rendered}")),
    }
    if &got != want {
        return Err(format!(
            "{verdict} details differ: expected {}, got {}",
            show(want),
            show(&got)
        ));
    }
    Ok(())
}

/// Checks what a reader made of a record against the manifest.
pub fn check_outcome(got: &Parsed, want: &Outcome) -> Result<(), String> {
    match (want.verdict.as_str(), got) {
        ("empty", Ok(None)) => Ok(()),
        ("valid", Ok(Some(record))) => {
            let Some(expected) = &want.record else {
                return Err("the manifest gives no record for a valid vector".into());
            };
            let rendered = spmbox::json::record(record);
            if &rendered != expected {
                return Err(format!(
                    "decoded record differs: expected {}, got {}",
                    show(expected),
                    show(&rendered)
                ));
            }
            Ok(())
        }
        ("empty" | "valid", _) => Err(format!("expected {}, got {}", want.verdict, describe(got))),
        (verdict, Err(d)) => check_defect(d, verdict, want.defect.as_ref()),
        (verdict, Ok(_)) => Err(format!("expected {verdict}, got {}", describe(got))),
    }
}

/// A short description of a parse result for messages.
pub fn describe(got: &Parsed) -> String {
    match got {
        Ok(None) => "empty".into(),
        Ok(Some(r)) => format!("valid {}", show(&spmbox::json::record(r))),
        Err(d) => format!("{} ({d})", d.name()),
    }
}

/// Panics with every failure, one a line, if there are any.
#[track_caller]
pub fn assert_no_failures(what: &str, total: usize, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} of {total} {what} failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

/// The `*.bin` files in `dir`, by name.
pub fn bin_files(dir: &Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").file_name())
        .filter_map(|name| name.into_string().ok())
        .filter(|name| name.ends_with(".bin"))
        .collect()
}

/// Where two byte strings first differ (the shorter one's length if one is
/// a prefix of the other).
pub fn first_difference(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()))
}

/// Runs the vector generator `script` with `--out out` (a directory it
/// replaces, and removes afterwards) and compares what it writes, every
/// `*.bin` and `manifest.json`, with the files committed in `committed`:
/// the files compared and what differs. `None` when `python3` is not
/// installed.
pub fn regenerate(script: &Path, committed: &Path, out: &Path) -> Option<(usize, Vec<String>)> {
    let _ = std::fs::remove_dir_all(out);
    let output = match std::process::Command::new("python3")
        .arg(script)
        .arg("--out")
        .arg(out)
        .output()
    {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("cannot run python3 {}: {e}", script.display()),
        Ok(output) => output,
    };
    assert!(
        output.status.success(),
        "{} --out {} failed ({}):\n{}",
        script.display(),
        out.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let mut names = bin_files(committed);
    names.extend(bin_files(out));
    names.insert("manifest.json".into());
    let mut failures = Vec::new();
    for name in &names {
        match (
            std::fs::read(committed.join(name)),
            std::fs::read(out.join(name)),
        ) {
            (Ok(committed), Ok(generated)) if committed == generated => {}
            (Ok(committed), Ok(generated)) => failures.push(format!(
                "{name}: the generator writes other bytes ({} bytes, committed {}; first \
                 difference at byte {})",
                generated.len(),
                committed.len(),
                first_difference(&generated, &committed)
            )),
            (Err(_), Ok(_)) => failures.push(format!("{name}: generated but not committed")),
            (Ok(_), Err(_)) => failures.push(format!("{name}: committed but not generated")),
            (Err(e), Err(_)) => failures.push(format!("{name}: {e}")),
        }
    }
    let _ = std::fs::remove_dir_all(out);
    Some((names.len(), failures))
}
