//! JSON renderings of on-disk records, shared by `spmbox inspect --json`
//! and the test vectors' manifest. Keys are the field names of
//! docs/format.md; sizes and counters are plain numbers, UUIDs strings.

use serde_json::{Value, json};
use spmbox_core::wire::{
    Defect, Doorbell, Hold, InboxHeader, OutboxHeader, Record, Reply, ReplyStatus, Request,
    SpmHeader, SpmState, Superblock,
};

/// A record as JSON, with its `kind`.
pub fn record(record: &Record) -> Value {
    match record {
        Record::Superblock(r) => superblock(r),
        Record::SpmHeader(r) => spm_header(r),
        Record::Doorbell(r) => doorbell(r),
        Record::InboxHeader(r) => inbox_header(r),
        Record::Request(r) => request(r),
        Record::OutboxHeader(r) => outbox_header(r),
        Record::Reply(r) => reply(r),
        Record::Hold(r) => hold(r),
    }
}

/// The superblock as JSON.
pub fn superblock(r: &Superblock) -> Value {
    let g = &r.geometry;
    json!({
        "kind": "superblock",
        "domain": r.domain.to_string(),
        "sector_size": g.sector_size(),
        "max_hosts": g.max_hosts(),
        "slots_per_area": spmbox_core::wire::SLOTS_PER_AREA,
        "area_size": spmbox_core::wire::AREA_SIZE,
        "record_size": spmbox_core::wire::RECORD_LEN,
        "inbox_offset": g.inbox_offset(),
        "outbox_offset": g.outbox_offset(),
        "mailbox_size": g.mailbox_size(),
    })
}

/// The SPM header as JSON.
pub fn spm_header(r: &SpmHeader) -> Value {
    json!({
        "kind": "spm_header",
        "domain": r.domain.to_string(),
        "epoch": r.epoch,
        "spm_id": r.spm_id,
        "state": match r.state { SpmState::Vacant => "vacant", SpmState::Active => "active" },
        "heartbeat_interval_ms": r.heartbeat_interval_ms,
        "heartbeat": r.heartbeat,
        "owner": r.owner,
        "pool_commit": r.pool_commit,
        "release_commit": r.release_commit,
    })
}

/// The doorbell as JSON.
pub fn doorbell(r: &Doorbell) -> Value {
    json!({
        "kind": "doorbell",
        "domain": r.domain.to_string(),
        "ringer": r.ringer,
        "rings": r.rings,
        "generation": r.generation,
        "sequence": r.sequence,
    })
}

/// An inbox header as JSON.
pub fn inbox_header(r: &InboxHeader) -> Value {
    json!({
        "kind": "inbox_header",
        "domain": r.domain.to_string(),
        "host_id": r.host_id,
        "generation": r.generation,
        "owner": r.owner,
        "heartbeat": r.heartbeat,
        "heartbeat_interval_ms": r.heartbeat_interval_ms,
        "release_ack": r.release_ack,
    })
}

/// A hold record as JSON: `volumes` lists the `count` volumes held.
pub fn hold(r: &Hold) -> Value {
    json!({
        "kind": "hold",
        "domain": r.domain.to_string(),
        "host_id": r.host_id,
        "slot": r.slot,
        "generation": r.generation,
        "count": r.count,
        "volumes": r.held().iter().map(ToString::to_string).collect::<Vec<_>>(),
    })
}

/// A request as JSON.
pub fn request(r: &Request) -> Value {
    json!({
        "kind": "request",
        "domain": r.domain.to_string(),
        "host_id": r.host_id,
        "slot": r.slot,
        "generation": r.generation,
        "sequence": r.sequence,
        "volume": r.volume.to_string(),
        "target_size": r.target_size,
        "current_size": r.current_size,
        "paused": r.paused,
    })
}

/// An outbox header as JSON.
pub fn outbox_header(r: &OutboxHeader) -> Value {
    json!({
        "kind": "outbox_header",
        "domain": r.domain.to_string(),
        "host_id": r.host_id,
        "epoch": r.epoch,
        "generation": r.generation,
    })
}

/// A reply as JSON. `reason` is null unless rejected; `detail` is the
/// backend's error number when failed, else 0.
pub fn reply(r: &Reply) -> Value {
    let (reason, detail) = match r.status {
        ReplyStatus::Rejected(reason) => (Value::from(reason.name()), 0),
        ReplyStatus::Failed { code } => (Value::Null, code),
        ReplyStatus::Extended | ReplyStatus::WaitingForSpace => (Value::Null, 0),
    };
    json!({
        "kind": "reply",
        "domain": r.domain.to_string(),
        "host_id": r.host_id,
        "slot": r.slot,
        "generation": r.generation,
        "sequence": r.sequence,
        "volume": r.volume.to_string(),
        "target_size": r.target_size,
        "size": r.size,
        "epoch": r.epoch,
        "status": r.status.name(),
        "reason": reason,
        "detail": detail,
    })
}

/// A defect as JSON: `verdict` (the name of docs/format.md section 6),
/// `message`, and the defect's details.
pub fn defect(d: &Defect) -> Value {
    let mut v = json!({ "verdict": d.name(), "message": d.to_string() });
    let details = match *d {
        Defect::Length { len } => json!({ "len": len }),
        Defect::Checksum { stored, computed } => json!({
            "stored": format!("{stored:#010x}"),
            "computed": format!("{computed:#010x}"),
        }),
        Defect::UnsupportedVersion { version } => json!({ "version": version }),
        Defect::UnknownKind { code } => json!({ "code": code }),
        Defect::WrongKind { expected, found } => {
            json!({ "expected": expected.name(), "found": found.name() })
        }
        Defect::Foreign { domain } => json!({ "domain": domain.to_string() }),
        Defect::Misdirected { host_id, index } => json!({ "host_id": host_id, "index": index }),
        Defect::ReservedNotZero { offset } => json!({ "offset": offset }),
        Defect::InvalidField { field } => json!({ "field": field.name() }),
        Defect::BadMagic => json!({}),
    };
    if let (Some(obj), Value::Object(extra)) = (v.as_object_mut(), details) {
        obj.extend(extra);
    }
    v
}

/// Serializes a UUID in its text form (for `#[serde(serialize_with)]`).
pub fn uuid<S: serde::Serializer>(
    id: &spmbox_core::wire::Uuid,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(id)
}
