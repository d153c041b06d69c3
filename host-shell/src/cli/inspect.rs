//! `spmbox inspect`: decode every record of a mailbox and report every
//! defect with its exact place.
//!
//! The audit is a pure function over an image of the mailbox in memory, so
//! it can be tested on any bytes; the command reads the device once and
//! hands the image over.

use std::fmt::Write as _;

use serde_json::{Value, json};
use spmbox_core::wire::{
    AREA_SIZE, DOORBELL_OFFSET, Defect, Doorbell, Geometry, Hold, HoldArea, HostId, InboxArea,
    Location, OutboxArea, Place, RECORD_LEN, RESERVED_OFFSET, Record, Reply, Request,
    SPM_HEADER_OFFSET, SUPERBLOCK_BACKUP_OFFSET, SUPERBLOCK_OFFSET, Slot, SlotRecord, SlotState,
    SpmHeader, Superblock, first_nonzero,
};

use crate::cli::json;

/// What the audit found in one record that is not a slot.
#[derive(Debug, Clone, PartialEq)]
pub enum Found<T> {
    /// All zero.
    Empty,
    /// Valid.
    Valid(T),
    /// Defective.
    Defective(Defect),
}

impl<T> From<Result<Option<T>, Defect>> for Found<T> {
    fn from(parsed: Result<Option<T>, Defect>) -> Self {
        match parsed {
            Ok(None) => Found::Empty,
            Ok(Some(v)) => Found::Valid(v),
            Err(d) => Found::Defective(d),
        }
    }
}

/// One host's areas: headers and every non-empty slot.
#[derive(Debug, Clone)]
pub struct HostReport {
    /// The host.
    pub host_id: HostId,
    /// Its inbox header.
    pub inbox_header: Found<spmbox_core::wire::InboxHeader>,
    /// Its outbox header.
    pub outbox_header: Found<spmbox_core::wire::OutboxHeader>,
    /// Non-empty inbox slots but those with hold records (defective ones
    /// of either kind included).
    pub requests: Vec<(Slot, SlotState<Request>)>,
    /// Inbox slots with a valid hold record, of the header's generation
    /// (valid) or another (stale).
    pub holds: Vec<(Slot, SlotState<Hold>)>,
    /// Non-empty outbox slots.
    pub replies: Vec<(Slot, SlotState<Reply>)>,
}

/// Something that must not be there: a defective record or a nonzero byte
/// in space that must be zero.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// Where: the record's first byte, or the offending byte.
    pub place: Place,
    /// Whether `place` is a whole record or a single byte of unused space.
    pub record: bool,
    /// The verdict name (docs/format.md section 6), or `nonzero_unused`.
    pub verdict: &'static str,
    /// Why, in words.
    pub message: String,
    /// The defect, for records.
    pub defect: Option<Defect>,
    /// For `nonzero_unused`: how many bytes of the zero-only region the
    /// byte at `place` opens are nonzero (it is the first of them).
    pub nonzero_bytes: usize,
}

/// The whole audit.
#[derive(Debug, Clone)]
pub struct Report {
    /// The superblock (valid: the audit needs it).
    pub superblock: Superblock,
    /// The SPM header.
    pub spm_header: Found<SpmHeader>,
    /// The doorbell.
    pub doorbell: Found<Doorbell>,
    /// Every host with anything in its areas (or the one asked for).
    pub hosts: Vec<HostReport>,
    /// Every problem, in offset order.
    pub problems: Vec<Problem>,
}

impl Report {
    /// Valid requests in the audited hosts' inboxes.
    pub fn requests(&self) -> usize {
        self.count(|h| {
            h.requests
                .iter()
                .filter(|(_, s)| matches!(s, SlotState::Valid(_)))
                .count()
        })
    }

    /// Valid replies in the audited hosts' outboxes.
    pub fn replies(&self) -> usize {
        self.count(|h| {
            h.replies
                .iter()
                .filter(|(_, s)| matches!(s, SlotState::Valid(_)))
                .count()
        })
    }

    /// Valid hold records in the audited hosts' inboxes.
    pub fn holds(&self) -> usize {
        self.count(|h| {
            h.holds
                .iter()
                .filter(|(_, s)| matches!(s, SlotState::Valid(_)))
                .count()
        })
    }

    /// Stale requests, hold records and replies.
    pub fn stale(&self) -> usize {
        self.count(|h| {
            h.requests
                .iter()
                .filter(|(_, s)| matches!(s, SlotState::Stale(_)))
                .count()
                + h.holds
                    .iter()
                    .filter(|(_, s)| matches!(s, SlotState::Stale(_)))
                    .count()
                + h.replies
                    .iter()
                    .filter(|(_, s)| matches!(s, SlotState::Stale(_)))
                    .count()
        })
    }

    fn count(&self, f: impl Fn(&HostReport) -> usize) -> usize {
        self.hosts.iter().map(f).sum()
    }
}

/// Audits `image`, the mailbox's bytes from offset 0 (at least
/// `mailbox_size` of them), whose superblock is `superblock`. With `host`,
/// only that host's areas are audited (the domain-wide blocks always are).
pub fn audit(image: &[u8], superblock: &Superblock, host: Option<HostId>) -> Report {
    let geometry = superblock.geometry;
    let domain = superblock.domain;
    let mut problems = Vec::new();
    let block = |offset: u64| -> &[u8] {
        let start = offset as usize;
        image.get(start..start + AREA_SIZE).unwrap_or(&[])
    };
    let at0 = Location {
        domain,
        host_id: HostId::NONE,
        index: 0,
    };

    for offset in [SUPERBLOCK_OFFSET, SUPERBLOCK_BACKUP_OFFSET] {
        match Superblock::parse(head(block(offset)), &at0) {
            Err(defect) => record_problem(&mut problems, &geometry, offset, defect),
            Ok(None) => empty_problem(&mut problems, &geometry, offset),
            Ok(Some(_)) => {}
        }
    }
    let spm_header = Found::from(SpmHeader::parse(head(block(SPM_HEADER_OFFSET)), &at0));
    let doorbell = Found::from(Doorbell::parse(head(block(DOORBELL_OFFSET)), &at0));
    for (offset, found) in [
        (SPM_HEADER_OFFSET, defect_of(&spm_header)),
        (DOORBELL_OFFSET, defect_of(&doorbell)),
    ] {
        if let Some(defect) = found {
            record_problem(&mut problems, &geometry, offset, defect);
        }
    }
    for offset in [
        SUPERBLOCK_OFFSET,
        SPM_HEADER_OFFSET,
        DOORBELL_OFFSET,
        SUPERBLOCK_BACKUP_OFFSET,
    ] {
        unused_problem(
            &mut problems,
            &geometry,
            offset + RECORD_LEN as u64,
            &block(offset)[RECORD_LEN.min(block(offset).len())..],
        );
    }
    let mut offset = RESERVED_OFFSET;
    while offset < SUPERBLOCK_BACKUP_OFFSET {
        unused_problem(&mut problems, &geometry, offset, block(offset));
        offset += AREA_SIZE as u64;
    }

    let mut hosts = Vec::new();
    let ids: Box<dyn Iterator<Item = HostId>> = match host {
        Some(h) => Box::new(std::iter::once(h)),
        None => Box::new(geometry.hosts()),
    };
    for host_id in ids {
        let (Some(inbox_at), Some(outbox_at)) =
            (geometry.inbox_area(host_id), geometry.outbox_area(host_id))
        else {
            continue;
        };
        let (inbox_bytes, outbox_bytes) = (block(inbox_at), block(outbox_at));
        if host.is_none()
            && first_nonzero(inbox_bytes).is_none()
            && first_nonzero(outbox_bytes).is_none()
        {
            continue;
        }
        let (Some(inbox), Some(outbox)) = (
            InboxArea::new(inbox_bytes, domain, host_id),
            OutboxArea::new(outbox_bytes, domain, host_id),
        ) else {
            continue;
        };
        let inbox_header = Found::from(inbox.header());
        let outbox_header = Found::from(outbox.header());
        for (offset, defect) in [
            (inbox_at, defect_of(&inbox_header)),
            (outbox_at, defect_of(&outbox_header)),
        ] {
            if let Some(defect) = defect {
                record_problem(&mut problems, &geometry, offset, defect);
            }
        }
        let requests = slots(&inbox, inbox_at, &geometry, &mut problems);
        let replies = slots(&outbox, outbox_at, &geometry, &mut problems);
        // Defective slots are reported once, with the requests.
        let holds = HoldArea::new(inbox_bytes, domain, host_id)
            .map(|area| {
                area.slots()
                    .filter(|(_, s)| matches!(s, SlotState::Valid(_) | SlotState::Stale(_)))
                    .collect()
            })
            .unwrap_or_default();
        hosts.push(HostReport {
            host_id,
            inbox_header,
            outbox_header,
            requests,
            holds,
            replies,
        });
    }
    problems.sort_by_key(|p| p.place.offset);
    Report {
        superblock: *superblock,
        spm_header,
        doorbell,
        hosts,
        problems,
    }
}

fn head(block: &[u8]) -> &[u8] {
    block.get(..RECORD_LEN).unwrap_or(block)
}

fn defect_of<T>(found: &Found<T>) -> Option<Defect> {
    match found {
        Found::Defective(d) => Some(*d),
        _ => None,
    }
}

fn slots<S: SlotRecord>(
    area: &spmbox_core::wire::Area<'_, S>,
    area_offset: u64,
    geometry: &Geometry,
    problems: &mut Vec<Problem>,
) -> Vec<(Slot, SlotState<S>)> {
    let mut found = Vec::new();
    for (slot, state) in area.slots() {
        match state {
            SlotState::Empty => continue,
            SlotState::Defective(defect) => {
                let offset = area_offset + u64::from(slot.get()) * RECORD_LEN as u64;
                record_problem(problems, geometry, offset, defect);
            }
            SlotState::Valid(_) | SlotState::Stale(_) => {}
        }
        found.push((slot, state));
    }
    found
}

fn record_problem(problems: &mut Vec<Problem>, geometry: &Geometry, offset: u64, defect: Defect) {
    if let Some(place) = geometry.locate(offset) {
        problems.push(Problem {
            place,
            record: true,
            verdict: defect.name(),
            message: defect.to_string(),
            defect: Some(defect),
            nonzero_bytes: 0,
        });
    }
}

/// A record that must be there is empty (the superblock or its backup:
/// it was wiped).
fn empty_problem(problems: &mut Vec<Problem>, geometry: &Geometry, offset: u64) {
    if let Some(place) = geometry.locate(offset) {
        problems.push(Problem {
            place,
            record: true,
            verdict: "empty",
            message: "all zero where a superblock must be; repair it with `spmbox repair`"
                .to_string(),
            defect: None,
            nonzero_bytes: 0,
        });
    }
}

/// One problem per zero-only region (the records after record 0 of a
/// block, or a 4 KiB block of reserved space) that holds a nonzero byte:
/// the first such byte, with how many there are and where the last is
/// (docs/format.md 6.2).
fn unused_problem(problems: &mut Vec<Problem>, geometry: &Geometry, offset: u64, bytes: &[u8]) {
    let Some(pos) = first_nonzero(bytes) else {
        return;
    };
    let nonzero = bytes.iter().filter(|&&b| b != 0).count();
    let last = bytes.iter().rposition(|&b| b != 0).unwrap_or(pos);
    let at = offset + pos as u64;
    let Some(place) = geometry.locate(at) else {
        return;
    };
    let message = if nonzero == 1 {
        format!("byte {:#04x} in space that must be zero", bytes[pos])
    } else {
        format!(
            "byte {:#04x} in space that must be zero, the first of {nonzero} nonzero bytes \
             up to offset {:#x}",
            bytes[pos],
            offset + last as u64
        )
    };
    problems.push(Problem {
        place,
        record: false,
        verdict: "nonzero_unused",
        message,
        defect: None,
        nonzero_bytes: nonzero,
    });
}

/// Where a problem is, in words: a record's place, or a byte's.
pub fn describe(problem: &Problem) -> String {
    let p = &problem.place;
    if !problem.record {
        return p.to_string();
    }
    use spmbox_core::wire::Region;
    let name = match p.region {
        Region::Superblock => "superblock".to_string(),
        Region::SpmHeader => "SPM header".to_string(),
        Region::Doorbell => "doorbell".to_string(),
        Region::Reserved => "reserved space".to_string(),
        Region::SuperblockBackup => "superblock backup".to_string(),
        Region::Inbox { host_id } | Region::Outbox { host_id } => {
            let side = if matches!(p.region, Region::Inbox { .. }) {
                "inbox"
            } else {
                "outbox"
            };
            if p.index == 0 {
                format!("host {host_id} {side} header")
            } else {
                format!("host {host_id} {side} slot {}", p.index)
            }
        }
    };
    format!("{name} (offset {} = {:#x})", p.offset, p.offset)
}

fn found_text<T>(found: &Found<T>, valid: impl Fn(&T) -> String) -> String {
    match found {
        Found::Empty => "empty".into(),
        Found::Valid(v) => valid(v),
        Found::Defective(d) => format!("DEFECTIVE: {d}"),
    }
}

fn request_text(r: &Request) -> String {
    format!(
        "request seq {} gen {} volume {} target {} (was {}){}",
        r.sequence,
        r.generation,
        r.volume,
        r.target_size,
        r.current_size,
        if r.paused { " [guest paused]" } else { "" }
    )
}

fn hold_text(h: &Hold) -> String {
    let volumes: Vec<String> = h.held().iter().map(ToString::to_string).collect();
    format!(
        "hold gen {}: {} volume{} held: {}",
        h.generation,
        h.count,
        if h.count == 1 { "" } else { "s" },
        volumes.join(", ")
    )
}

fn reply_text(r: &Reply) -> String {
    let mut s = format!(
        "reply seq {} gen {} volume {} target {}: {}",
        r.sequence,
        r.generation,
        r.volume,
        r.target_size,
        r.status.name()
    );
    match r.status {
        spmbox_core::wire::ReplyStatus::Rejected(reason) => {
            let _ = write!(s, " ({})", reason.name());
        }
        spmbox_core::wire::ReplyStatus::Failed { code } => {
            let _ = write!(s, " (error {code})");
        }
        _ => {}
    }
    let _ = write!(s, ", size {}, epoch {}", r.size, r.epoch);
    s
}

fn slot_text<T>(state: &SlotState<T>, valid: impl Fn(&T) -> String) -> String {
    match state {
        SlotState::Empty => "empty".into(),
        SlotState::Valid(v) => valid(v),
        SlotState::Stale(v) => format!("STALE (not acted on): {}", valid(v)),
        SlotState::Defective(d) => format!("DEFECTIVE: {d}"),
    }
}

/// The report as text for a terminal.
pub fn render(report: &Report, device: &str) -> String {
    let mut out = String::new();
    let sb = &report.superblock;
    let g = sb.geometry;
    let _ = writeln!(
        out,
        "mailbox {device}: domain {}, format version {}, {} hosts, {}-byte sectors, {}",
        sb.domain,
        spmbox_core::wire::FORMAT_VERSION,
        g.max_hosts(),
        g.sector_size(),
        crate::units::Bytes(g.mailbox_size())
    );
    let _ = writeln!(
        out,
        "SPM: {}",
        found_text(&report.spm_header, |h| format!(
            "{}, epoch {}, spm id {}, heartbeat {} every {} ms, pool commit {}, release commit {}",
            match h.state {
                spmbox_core::wire::SpmState::Vacant => "vacant",
                spmbox_core::wire::SpmState::Active => "active",
            },
            h.epoch,
            h.spm_id,
            h.heartbeat,
            h.heartbeat_interval_ms,
            h.pool_commit,
            h.release_commit
        ))
    );
    let _ = writeln!(
        out,
        "doorbell: {}",
        found_text(&report.doorbell, |d| format!(
            "last rung by host {} (generation {}, sequence {}, ring {} for that request)",
            d.ringer, d.generation, d.sequence, d.rings
        ))
    );
    for host in &report.hosts {
        let _ = writeln!(
            out,
            "host {}: inbox {}; outbox {}",
            host.host_id,
            found_text(&host.inbox_header, |h| format!(
                "generation {}, release ack {}",
                h.generation, h.release_ack
            )),
            found_text(&host.outbox_header, |h| format!(
                "epoch {}, generation {}",
                h.epoch, h.generation
            )),
        );
        let mut inbox: Vec<(Slot, String)> = host
            .requests
            .iter()
            .map(|(slot, state)| (*slot, slot_text(state, request_text)))
            .chain(
                host.holds
                    .iter()
                    .map(|(slot, state)| (*slot, slot_text(state, hold_text))),
            )
            .collect();
        inbox.sort_by_key(|(slot, _)| slot.get());
        for (slot, text) in inbox {
            let _ = writeln!(out, "  inbox slot {slot:>2}: {text}");
        }
        for (slot, state) in &host.replies {
            let _ = writeln!(
                out,
                "  outbox slot {slot:>2}: {}",
                slot_text(state, reply_text)
            );
        }
    }
    if !report.problems.is_empty() {
        let _ = writeln!(out, "problems ({}):", report.problems.len());
        for p in &report.problems {
            let _ = writeln!(out, "  {}: {}: {}", describe(p), p.verdict, p.message);
        }
    }
    let _ = writeln!(
        out,
        "summary: {} hosts with mail, {} requests, {} hold records, {} replies, {} stale, {} \
         problems",
        report.hosts.len(),
        report.requests(),
        report.holds(),
        report.replies(),
        report.stale(),
        report.problems.len()
    );
    out
}

fn found_json<T>(found: &Found<T>, valid: impl Fn(&T) -> Value) -> Value {
    match found {
        Found::Empty => json!({ "state": "empty" }),
        Found::Valid(v) => json!({ "state": "valid", "record": valid(v) }),
        Found::Defective(d) => json!({ "state": "defective", "defect": json::defect(d) }),
    }
}

fn slot_json<T>(slot: u16, state: &SlotState<T>, valid: impl Fn(&T) -> Value) -> Value {
    match state {
        SlotState::Empty => json!({ "slot": slot, "state": "empty" }),
        SlotState::Valid(v) => json!({ "slot": slot, "state": "valid", "record": valid(v) }),
        SlotState::Stale(v) => json!({ "slot": slot, "state": "stale", "record": valid(v) }),
        SlotState::Defective(d) => {
            json!({ "slot": slot, "state": "defective", "defect": json::defect(d) })
        }
    }
}

/// The report as one JSON object (its schema: docs/format.md, section 11).
pub fn to_json(report: &Report, device: &str) -> Value {
    let hosts: Vec<Value> = report
        .hosts
        .iter()
        .map(|h| {
            let mut inbox: Vec<(u16, Value)> = h
                .requests
                .iter()
                .map(|(s, st)| (s.get(), slot_json(s.get(), st, json::request)))
                .chain(
                    h.holds
                        .iter()
                        .map(|(s, st)| (s.get(), slot_json(s.get(), st, json::hold))),
                )
                .collect();
            inbox.sort_by_key(|(slot, _)| *slot);
            json!({
                "host_id": h.host_id,
                "inbox": {
                    "header": found_json(&h.inbox_header, |r| json::record(&Record::InboxHeader(*r))),
                    "slots": inbox.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
                },
                "outbox": {
                    "header": found_json(&h.outbox_header, |r| json::record(&Record::OutboxHeader(*r))),
                    "slots": h.replies.iter().map(|(s, st)| slot_json(s.get(), st, json::reply)).collect::<Vec<_>>(),
                },
            })
        })
        .collect();
    let problems: Vec<Value> = report
        .problems
        .iter()
        .map(|p| {
            json!({
                "offset": p.place.offset,
                "place": describe(p),
                "verdict": p.verdict,
                "message": p.message,
                "nonzero_bytes": (p.verdict == "nonzero_unused").then_some(p.nonzero_bytes),
            })
        })
        .collect();
    json!({
        "device": device,
        "valid": report.problems.is_empty(),
        "superblock": json::superblock(&report.superblock),
        "spm_header": found_json(&report.spm_header, json::spm_header),
        "doorbell": found_json(&report.doorbell, json::doorbell),
        "hosts": hosts,
        "problems": problems,
        "summary": {
            "hosts_with_mail": report.hosts.len(),
            "requests": report.requests(),
            "holds": report.holds(),
            "replies": report.replies(),
            "stale": report.stale(),
            "problems": report.problems.len(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use spmbox_core::wire::{
        Epoch, Generation, InboxHeader, RejectReason, ReplyStatus, SpmState, Uuid,
    };

    const DOMAIN: Uuid = Uuid([0xd0; 16]);

    fn put(image: &mut [u8], offset: u64, record: [u8; RECORD_LEN]) {
        let at = offset as usize;
        image[at..at + RECORD_LEN].copy_from_slice(&record);
    }

    /// A 4-host mailbox with the version-4 fields set, two hold records
    /// (one stale) and a request beside them, and a segments_full reply.
    fn image() -> (Vec<u8>, Superblock) {
        let superblock = Superblock {
            domain: DOMAIN,
            geometry: Geometry::new(4, 512).unwrap(),
        };
        let g = superblock.geometry;
        let mut image = vec![0u8; g.mailbox_size() as usize];
        let sb = superblock.to_bytes().unwrap();
        put(&mut image, SUPERBLOCK_OFFSET, sb);
        put(&mut image, SUPERBLOCK_BACKUP_OFFSET, sb);
        let spm = SpmHeader {
            epoch: Epoch::new(2),
            state: SpmState::Vacant,
            pool_commit: 11,
            release_commit: 9,
            ..SpmHeader::vacant(DOMAIN, Epoch::new(2))
        };
        put(&mut image, SPM_HEADER_OFFSET, spm.to_bytes().unwrap());
        let host = HostId::new(2);
        let inbox = g.inbox_area(host).unwrap();
        let header = InboxHeader {
            domain: DOMAIN,
            host_id: host,
            generation: Generation::new(3),
            owner: 0,
            heartbeat: 0,
            heartbeat_interval_ms: 0,
            release_ack: 7,
        };
        put(&mut image, inbox, header.to_bytes().unwrap());
        let hold = |slot: u16, generation: u64, held: &[Uuid]| {
            Hold::listing(
                DOMAIN,
                host,
                Slot::new(slot),
                Generation::new(generation),
                held,
            )
            .to_bytes()
            .unwrap()
        };
        put(
            &mut image,
            inbox + 31 * 128,
            hold(31, 3, &[Uuid([1; 16]), Uuid([2; 16])]),
        );
        put(&mut image, inbox + 30 * 128, hold(30, 2, &[Uuid([3; 16])]));
        let request = Request {
            domain: DOMAIN,
            host_id: host,
            slot: Slot::new(1),
            generation: Generation::new(3),
            sequence: 4,
            volume: Uuid([1; 16]),
            target_size: 1 << 30,
            current_size: 1 << 29,
            paused: false,
        };
        put(&mut image, inbox + 128, request.to_bytes().unwrap());
        let outbox = g.outbox_area(host).unwrap();
        let outbox_header = spmbox_core::wire::OutboxHeader {
            domain: DOMAIN,
            host_id: host,
            epoch: Epoch::new(2),
            generation: Generation::new(3),
        };
        put(&mut image, outbox, outbox_header.to_bytes().unwrap());
        let reply = Reply::answering(
            &request,
            ReplyStatus::Rejected(RejectReason::SegmentsFull),
            1 << 29,
            Epoch::new(2),
        );
        put(&mut image, outbox + 128, reply.to_bytes().unwrap());
        (image, superblock)
    }

    #[test]
    fn holds_the_new_fields_and_segments_full_are_shown_and_are_no_problems() {
        let (image, superblock) = image();
        let report = audit(&image, &superblock, None);
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(
            (report.requests(), report.holds(), report.stale()),
            (1, 1, 1)
        );
        let text = render(&report, "dom");
        for want in [
            "release commit 9",
            "release ack 7",
            "inbox slot 31: hold gen 3: 2 volumes held: 01010101-",
            "inbox slot 30: STALE (not acted on): hold gen 2: 1 volume held",
            "rejected (segments_full)",
            "1 requests, 1 hold records",
        ] {
            assert!(text.contains(want), "{want:?} not in:\n{text}");
        }
        let json = to_json(&report, "dom");
        assert_eq!(json["spm_header"]["record"]["release_commit"], 9);
        let host = &json["hosts"][0];
        assert_eq!(host["inbox"]["header"]["record"]["release_ack"], 7);
        let slots = host["inbox"]["slots"].as_array().unwrap();
        let kinds: Vec<(u64, &str, &str)> = slots
            .iter()
            .map(|s| {
                (
                    s["slot"].as_u64().unwrap(),
                    s["state"].as_str().unwrap(),
                    s["record"]["kind"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            kinds,
            [
                (1, "valid", "request"),
                (30, "stale", "hold"),
                (31, "valid", "hold")
            ]
        );
        assert_eq!(slots[2]["record"]["count"], 2);
        assert_eq!(slots[2]["record"]["volumes"].as_array().unwrap().len(), 2);
        assert_eq!(
            host["outbox"]["slots"][0]["record"]["reason"],
            "segments_full"
        );
        assert_eq!(json["summary"]["holds"], 1);
    }
}
