//! The builtin pool's test vectors (`tests/vectors/pool/`), built from
//! docs/pool-format.md alone by `tests/vectors/generate_pool.py`, checked
//! against the reference implementation: every metadata copy read at its
//! place, every pair of copies, every LUN label, the domain layouts, the
//! allocation histories replayed, no orphan files, and the generator
//! reproducing the committed bytes.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value, json};
use spmbox::backend::builtin::{LABEL_LEN, LunLabel, domain_size, metadata_offset};
use spmbox_core::pool::{
    CopyDefect, DEFAULT_EXTENT_SIZE, DefaultPool, Invariant, METADATA_COPY_SIZE, METADATA_VERSION,
    PoolError,
};
use spmbox_core::wire::{Geometry, Uuid};
use spmbox_tests::vectors::{assert_no_failures, bin_files, regenerate, show, uuid};

fn pool_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("vectors")
        .join("pool")
}

/// `tests/vectors/pool/manifest.json`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Manifest {
    metadata_copy_size: u64,
    limits: Limits,
    layouts: Vec<Layout>,
    copies: Vec<CopyEntry>,
    pairs: Vec<PairEntry>,
    labels: Vec<LabelEntry>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Limits {
    luns: usize,
    volumes: usize,
    segments: usize,
    max_payload_len: usize,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Layout {
    max_hosts: u16,
    mailbox_size: u64,
    copy_a: u64,
    copy_b: u64,
    domain_size: u64,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
struct CopyEntry {
    file: String,
    description: String,
    place: String,
    verdict: String,
    #[serde(default)]
    pool: Option<Value>,
    #[serde(default)]
    defect: Option<Map<String, Value>>,
    #[serde(default)]
    history: Option<Vec<Vec<Value>>>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct PairEntry {
    a: Option<String>,
    b: Option<String>,
    description: String,
    winner: Option<String>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    defects: Option<Value>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct LabelEntry {
    file: String,
    description: String,
    verdict: String,
    #[serde(default)]
    label: Option<Value>,
}

fn load() -> Manifest {
    let path = pool_dir().join("manifest.json");
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read(file: &str) -> Result<Vec<u8>, String> {
    let path = pool_dir().join(file);
    fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The copy as a reader finds it on the domain device: the file, then
/// zeroes to the end of the copy's space.
fn region(file: Option<&str>) -> Result<Vec<u8>, String> {
    let mut bytes = match file {
        Some(file) => read(file)?,
        None => Vec::new(),
    };
    if bytes.len() > METADATA_COPY_SIZE {
        return Err(format!("is longer than a copy ({} bytes)", bytes.len()));
    }
    bytes.resize(METADATA_COPY_SIZE, 0);
    Ok(bytes)
}

fn new_pool() -> Box<DefaultPool> {
    Box::new(DefaultPool::new(DEFAULT_EXTENT_SIZE).expect("the default extent size is valid"))
}

/// The pool as the manifest renders it.
fn render_pool(pool: &DefaultPool, seq: u64) -> Value {
    let luns: Vec<Value> = pool
        .luns()
        .iter()
        .map(|l| json!({"id": l.id.to_string(), "extents": l.extents, "used": l.used}))
        .collect();
    let volumes: Vec<Value> = pool
        .volumes()
        .map(|v| {
            let segments: Vec<Value> = pool
                .segments(v.id)
                .unwrap_or_default()
                .iter()
                .map(
                    |s| json!({"lun": s.lun, "first_extent": s.first_extent, "extents": s.extents}),
                )
                .collect();
            json!({"id": v.id.to_string(), "virtual_size": v.virtual_size, "segments": segments})
        })
        .collect();
    json!({
        "seq": seq,
        "extent_size": pool.extent_size(),
        "release_seq": pool.release_seq(),
        "moving": pool.moving().to_string(),
        "luns": luns,
        "volumes": volumes
    })
}

/// A copy defect as the manifest spells it.
fn render_defect(d: &CopyDefect) -> Value {
    match *d {
        CopyDefect::TooShort { len } => json!({"verdict": "too_short", "len": len}),
        CopyDefect::Empty => json!({"verdict": "empty"}),
        CopyDefect::BadMagic => json!({"verdict": "bad_magic"}),
        CopyDefect::PayloadLength { payload_len } => {
            json!({"verdict": "payload_length", "payload_len": payload_len})
        }
        CopyDefect::Checksum { stored, computed } => {
            json!({"verdict": "checksum", "stored": stored, "computed": computed})
        }
        CopyDefect::UnsupportedVersion { version } => {
            json!({"verdict": "unsupported_version", "version": version})
        }
        CopyDefect::ReservedNotZero { offset } => {
            json!({"verdict": "reserved_not_zero", "offset": offset})
        }
        CopyDefect::ExtentSize { extent_size } => {
            json!({"verdict": "extent_size", "extent_size": extent_size})
        }
        CopyDefect::Misplaced { seq } => json!({"verdict": "misplaced", "seq": seq}),
        CopyDefect::Payload => json!({"verdict": "payload"}),
        CopyDefect::Inconsistent(broken) => {
            let mut out = render_invariant(&broken);
            if let Value::Object(map) = &mut out {
                map.insert("verdict".into(), "inconsistent".into());
            }
            out
        }
    }
}

fn render_invariant(i: &Invariant) -> Value {
    let id = |u: Uuid| u.to_string();
    match *i {
        Invariant::ExtentSize => json!({"invariant": "extent_size"}),
        Invariant::NilId => json!({"invariant": "nil_id"}),
        Invariant::DuplicateLun { lun } => json!({"invariant": "duplicate_lun", "lun": lun}),
        Invariant::LunBounds { lun } => json!({"invariant": "lun_bounds", "lun": lun}),
        Invariant::VolumeOrder { volume } => {
            json!({"invariant": "volume_order", "volume": id(volume)})
        }
        Invariant::VirtualSize { volume } => {
            json!({"invariant": "virtual_size", "volume": id(volume)})
        }
        Invariant::EmptyVolume { volume } => {
            json!({"invariant": "empty_volume", "volume": id(volume)})
        }
        Invariant::OverLimit { volume } => json!({"invariant": "over_limit", "volume": id(volume)}),
        Invariant::SegmentBounds { volume, segment } => {
            json!({"invariant": "segment_bounds", "volume": id(volume), "segment": segment})
        }
        Invariant::Overlap { a, b, lun } => {
            json!({"invariant": "overlap", "a": id(a), "b": id(b), "lun": lun})
        }
        Invariant::Released { lun } => json!({"invariant": "released", "lun": lun}),
        Invariant::Parked { volume } => json!({"invariant": "parked", "volume": id(volume)}),
    }
}

/// Reads one copy at its place (0 = A, 1 = B), the other copy absent.
fn read_copy(pool: &mut DefaultPool, bytes: &[u8], place: usize) -> Result<u64, CopyDefect> {
    let (a, b): (&[u8], &[u8]) = if place == 0 {
        (bytes, &[])
    } else {
        (&[], bytes)
    };
    match pool.decode_into(a, b) {
        Ok(seq) => Ok(seq),
        Err(PoolError::NoValidCopy { a, b }) => Err(if place == 0 { a } else { b }),
        Err(e) => panic!("decode_into failed other than with NoValidCopy: {e}"),
    }
}

fn place_of(name: &str) -> Result<usize, String> {
    match name {
        "A" => Ok(0),
        "B" => Ok(1),
        _ => Err(format!("unknown place {name:?}")),
    }
}

fn as_u64(v: &Value) -> Result<u64, String> {
    v.as_u64().ok_or_else(|| format!("{v} is not a u64"))
}

fn as_uuid(v: &Value) -> Result<Uuid, String> {
    uuid(v.as_str().ok_or_else(|| format!("{v} is not a UUID"))?)
}

/// Replays a history of operations on a new pool of `extent_size`.
fn replay(extent_size: u64, history: &[Vec<Value>]) -> Result<Box<DefaultPool>, String> {
    let mut pool = Box::new(DefaultPool::new(extent_size).map_err(|e| e.to_string())?);
    for op in history {
        let name = op.first().and_then(Value::as_str).unwrap_or_default();
        let arg = |i: usize| {
            op.get(i)
                .ok_or_else(|| format!("{op:?} lacks argument {i}"))
        };
        let done = match name {
            "add_lun" => {
                let extents = u32::try_from(as_u64(arg(2)?)?).map_err(|e| e.to_string())?;
                pool.add_lun(as_uuid(arg(1)?)?, extents).map(|_| ())
            }
            "create_volume" => {
                pool.create_volume(as_uuid(arg(1)?)?, as_u64(arg(2)?)?, as_u64(arg(3)?)?)
            }
            "extend" => {
                let urgent = op.get(3).and_then(Value::as_bool).unwrap_or(false);
                pool.extend(as_uuid(arg(1)?)?, as_u64(arg(2)?)?, urgent)
                    .map(|_| ())
            }
            "delete_volume" => pool.delete_volume(as_uuid(arg(1)?)?).map(|_| ()),
            "reduce_volume" => pool
                .reduce_volume(as_uuid(arg(1)?)?, as_u64(arg(2)?)?)
                .map(|_| ()),
            "commit" => {
                pool.stamp_released(as_u64(arg(1)?)?);
                Ok(())
            }
            "reclaim" => {
                pool.reclaim(as_u64(arg(1)?)?);
                Ok(())
            }
            _ => return Err(format!("unknown operation {op:?}")),
        };
        done.map_err(|e| format!("{op:?}: {e}"))?;
        while pool.poll_completed().is_some() {}
    }
    Ok(pool)
}

/// Encodes `pool` as commit `seq` and checks it gives exactly `bytes`,
/// then zeroes to the end of the copy.
fn check_encoding(pool: &DefaultPool, seq: u64, bytes: &[u8], how: &str) -> Result<(), String> {
    let mut out = vec![0xA5u8; METADATA_COPY_SIZE];
    let len = pool
        .encode(seq, &mut out)
        .map_err(|e| format!("{how}: encode refuses: {e}"))?;
    if out.get(..len) != Some(bytes) {
        return Err(format!(
            "{how}: encoding gives other bytes ({len} bytes, the file has {})",
            bytes.len()
        ));
    }
    if out[len..].iter().any(|&b| b != 0) {
        return Err(format!("{how}: encode left nonzero bytes after the copy"));
    }
    Ok(())
}

fn check_copy(entry: &CopyEntry) -> Result<(), String> {
    let file = read(&entry.file)?;
    let bytes = region(Some(&entry.file))?;
    let place = place_of(&entry.place)?;
    let mut pool = new_pool();
    let got = read_copy(&mut pool, &bytes, place);
    match (&got, entry.verdict.as_str()) {
        (Ok(seq), "valid") => {
            let rendered = render_pool(&pool, *seq);
            if entry.pool.as_ref() != Some(&rendered) {
                return Err(format!(
                    "pool differs: expected {}, got {}",
                    entry.pool.as_ref().map(show).unwrap_or_default(),
                    show(&rendered)
                ));
            }
            // A version 1 or 2 copy is written back as the current
            // version: its bytes differ in the version and the CRC.
            if file.get(8) == Some(&METADATA_VERSION) {
                check_encoding(&pool, *seq, &file, "the decoded pool")?;
            }
            if let Some(history) = &entry.history {
                let replayed = replay(pool.extent_size(), history)?;
                check_encoding(&replayed, *seq, &file, "the replayed history")?;
            }
            Ok(())
        }
        (Ok(seq), want) => Err(format!("expected {want}, got valid (seq {seq})")),
        (Err(d), _) => {
            let mut want = Map::new();
            want.insert("verdict".into(), entry.verdict.clone().into());
            want.extend(entry.defect.clone().unwrap_or_default());
            let rendered = render_defect(d);
            if rendered != Value::Object(want.clone()) {
                return Err(format!(
                    "expected {}, got {} ({d})",
                    show(&want),
                    show(&rendered)
                ));
            }
            Ok(())
        }
    }
}

#[test]
fn every_metadata_copy_reads_at_its_place_as_the_manifest_says() {
    let manifest = load();
    assert!(manifest.copies.iter().any(|c| c.verdict == "valid"));
    let failures: Vec<String> = manifest
        .copies
        .iter()
        .filter_map(|e| {
            check_copy(e)
                .err()
                .map(|m| format!("{} ({}): {m}", e.file, e.description))
        })
        .collect();
    assert_no_failures("metadata copies", manifest.copies.len(), &failures);
}

fn check_pair(entry: &PairEntry) -> Result<(), String> {
    let a = region(entry.a.as_deref())?;
    let b = region(entry.b.as_deref())?;
    let mut pool = new_pool();
    match (pool.decode_into(&a, &b), &entry.winner) {
        (Ok(seq), Some(winner)) => {
            let got = if seq % 2 == 0 { "A" } else { "B" };
            if got != winner || Some(seq) != entry.seq {
                return Err(format!(
                    "expected {winner} (seq {:?}), got {got} (seq {seq})",
                    entry.seq
                ));
            }
            // The winner alone gives the same pool.
            let (file, place) = if got == "A" {
                (entry.a.as_deref(), 0)
            } else {
                (entry.b.as_deref(), 1)
            };
            let mut alone = new_pool();
            read_copy(&mut alone, &region(file)?, place)
                .map_err(|d| format!("the winner alone is defective: {d}"))?;
            if render_pool(&alone, seq) != render_pool(&pool, seq) {
                return Err("the winner alone reads differently".into());
            }
            Ok(())
        }
        (Err(PoolError::NoValidCopy { a, b }), None) => {
            let got = json!({"a": render_defect(&a), "b": render_defect(&b)});
            if entry.defects.as_ref() != Some(&got) {
                return Err(format!(
                    "expected defects {}, got {}",
                    entry.defects.as_ref().map(show).unwrap_or_default(),
                    show(&got)
                ));
            }
            Ok(())
        }
        (Ok(seq), None) => Err(format!("expected no valid copy, got seq {seq}")),
        (Err(e), _) => Err(format!("expected {:?} to win, got {e}", entry.winner)),
    }
}

#[test]
fn every_pair_of_copies_gives_the_winner_the_manifest_says() {
    let manifest = load();
    let failures: Vec<String> = manifest
        .pairs
        .iter()
        .filter_map(|e| {
            check_pair(e)
                .err()
                .map(|m| format!("{:?} + {:?} ({}): {m}", e.a, e.b, e.description))
        })
        .collect();
    assert_no_failures("pairs", manifest.pairs.len(), &failures);
}

fn check_label(entry: &LabelEntry) -> Result<(), String> {
    let bytes = read(&entry.file)?;
    if bytes.len() != LABEL_LEN {
        return Err(format!("is {} bytes, not {LABEL_LEN}", bytes.len()));
    }
    match (LunLabel::parse(&bytes), entry.verdict.as_str()) {
        (Some(label), "valid") => {
            let got = json!({
                "domain": label.domain.to_string(),
                "lun": label.lun.to_string(),
                "data_offset": label.data_offset,
                "extent_size": label.extent_size,
                "extents": label.extents,
            });
            if entry.label.as_ref() != Some(&got) {
                return Err(format!(
                    "expected {}, got {}",
                    entry.label.as_ref().map(show).unwrap_or_default(),
                    show(&got)
                ));
            }
            if label.to_block()[..] != bytes[..] && bytes[64..].iter().all(|&b| b == 0) {
                return Err("writing the label gives other bytes".into());
            }
            Ok(())
        }
        (None, "valid") => Err("expected a label, got none".into()),
        (Some(label), want) => Err(format!("expected {want}, got {label:?}")),
        (None, _) => Ok(()),
    }
}

#[test]
fn every_lun_label_reads_as_the_manifest_says() {
    let manifest = load();
    let failures: Vec<String> = manifest
        .labels
        .iter()
        .filter_map(|e| {
            check_label(e)
                .err()
                .map(|m| format!("{} ({}): {m}", e.file, e.description))
        })
        .collect();
    assert_no_failures("labels", manifest.labels.len(), &failures);
}

#[test]
fn the_layouts_and_limits_are_the_reference_ones() {
    let manifest = load();
    assert_eq!(manifest.metadata_copy_size, METADATA_COPY_SIZE as u64);
    let limits = &manifest.limits;
    assert_eq!(
        (
            limits.luns,
            limits.volumes,
            limits.segments,
            limits.max_payload_len + 64
        ),
        (16, 1024, 32, DefaultPool::MAX_COPY_LEN)
    );
    for layout in &manifest.layouts {
        let g = Geometry::new(layout.max_hosts, 512).expect("a valid geometry");
        for sector in [512, 4096] {
            let g2 = Geometry::new(layout.max_hosts, sector).expect("a valid geometry");
            assert_eq!(metadata_offset(g2), metadata_offset(g));
        }
        let got = (
            g.mailbox_size(),
            metadata_offset(g),
            metadata_offset(g) + METADATA_COPY_SIZE as u64,
            domain_size(g),
        );
        let want = (
            layout.mailbox_size,
            layout.copy_a,
            layout.copy_b,
            layout.domain_size,
        );
        assert_eq!(got, want, "{} hosts", layout.max_hosts);
    }
}

#[test]
fn every_pool_vector_file_is_in_the_manifest() {
    let manifest = load();
    let listed: BTreeSet<String> = manifest
        .copies
        .iter()
        .map(|c| c.file.clone())
        .chain(manifest.labels.iter().map(|l| l.file.clone()))
        .collect();
    let on_disk = bin_files(&pool_dir());
    assert_eq!(on_disk, listed, "files on disk vs files in the manifest");
    for p in &manifest.pairs {
        for file in [&p.a, &p.b].into_iter().flatten() {
            assert!(listed.contains(file), "pair names unknown file {file}");
        }
    }
}

#[test]
fn the_pool_generator_reproduces_the_committed_files() {
    let script = pool_dir()
        .parent()
        .expect("tests/vectors")
        .join("generate_pool.py");
    let Some((files, failures)) = regenerate(
        &script,
        &pool_dir(),
        &Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("spmbox-pool-vectors-{}", std::process::id())),
    ) else {
        println!("skipped: generator reproducibility: python3 not found");
        return;
    };
    assert_no_failures(
        "files (rerun python3 tests/vectors/generate_pool.py and review the diff)",
        files,
        &failures,
    );
}

/// The checks above can fail: a manifest that says something else than
/// the reader makes of a vector is caught.
#[test]
fn the_checks_reject_a_manifest_that_disagrees() {
    let manifest = load();
    let find = |verdict: &str| {
        manifest
            .copies
            .iter()
            .find(|c| c.verdict == verdict)
            .cloned()
            .unwrap_or_else(|| panic!("no {verdict} copy"))
    };
    let mut valid = find("valid");
    check_copy(&valid).expect("the valid copy checks out");
    if let Some(Value::Object(pool)) = &mut valid.pool {
        pool.insert("seq".into(), json!(12345));
    }
    assert!(check_copy(&valid).is_err(), "a wrong seq went unnoticed");
    let mut moved = find("valid");
    if let Some(Value::Object(pool)) = &mut moved.pool {
        pool.insert(
            "moving".into(),
            json!("c0111111-1111-1111-1111-111100000063"),
        );
    }
    assert!(check_copy(&moved).is_err(), "a wrong moving went unnoticed");
    let mut inconsistent = find("inconsistent");
    check_copy(&inconsistent).expect("the inconsistent copy checks out");
    inconsistent.verdict = "payload".into();
    assert!(
        check_copy(&inconsistent).is_err(),
        "a wrong verdict went unnoticed"
    );
    let mut swapped = find("valid");
    swapped.place = if swapped.place == "A" { "B" } else { "A" }.into();
    assert!(
        check_copy(&swapped).is_err(),
        "a copy read at the wrong place went unnoticed"
    );
}

/// `moving` is read from version 3 copies as it is, whether or not the
/// payload has that volume, and as nil from versions 1 and 2.
#[test]
fn the_moving_vectors_read_as_written() {
    let manifest = load();
    let moving = |file: &str| {
        let entry = manifest
            .copies
            .iter()
            .find(|c| c.file == file)
            .unwrap_or_else(|| panic!("no {file}"));
        let pool = entry
            .pool
            .as_ref()
            .unwrap_or_else(|| panic!("{file} is not valid"));
        let volumes: Vec<&str> = pool["volumes"]
            .as_array()
            .map(|v| v.iter().filter_map(|v| v["id"].as_str()).collect())
            .unwrap_or_default();
        let moving = pool["moving"]
            .as_str()
            .expect("moving is a UUID")
            .to_owned();
        let known = volumes.contains(&moving.as_str());
        let mut decoded = new_pool();
        let bytes = region(Some(file)).expect("the file reads");
        let place = place_of(&entry.place).expect("a place");
        read_copy(&mut decoded, &bytes, place).expect("the copy decodes");
        assert_eq!(decoded.moving().to_string(), moving, "{file}");
        (moving, known)
    };
    let nil = Uuid::NIL.to_string();
    assert!(matches!(moving("moving.bin"), (m, true) if m != nil));
    assert!(matches!(moving("moving-unknown.bin"), (m, false) if m != nil));
    assert_eq!(moving("version-1.bin"), (nil.clone(), false));
    assert_eq!(moving("version-2.bin"), (nil.clone(), false));
    assert_eq!(moving("several-a.bin"), (nil, false));
}
