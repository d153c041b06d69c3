//! Shared code of the spmbox fuzz targets: an independent model of the
//! on-disk format v4 as `docs/format.md` specifies it, and a trait that lets
//! the targets treat the eight typed records alike.
//!
//! The model does not call into the code under test (it has its own CRC32C,
//! its own field offsets, its own reading steps), so every target can check
//! `spmbox-core` against the specification, not only against itself.

use core::fmt::Debug;
use core::ops::Range;

use spmbox_core::wire::{
    Defect, Doorbell, Epoch, Field, Generation, Geometry, GeometryError, Hold, HostId, InboxHeader,
    Kind, Location, OutboxHeader, RECORD_LEN, Record, RejectReason, Reply, ReplyStatus, Request,
    Slot, SpmHeader, SpmState, Superblock, Uuid,
};

/// The record length (docs/format.md section 2).
pub const LEN: usize = 128;
const _: () = assert!(LEN == RECORD_LEN);

/// The most hosts a mailbox holds (docs/format.md section 3).
pub const MAX_HOSTS: u16 = 2000;

/// The format version modelled (docs/format.md section 4).
pub const VERSION: u8 = 4;

// ---------------------------------------------------------------------------
// Bytes.

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// CRC-32C (Castagnoli), as docs/format.md section 2 defines it, written
/// independently of the `crc` crate the core uses.
pub fn crc32c(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

const _: () = {
    // The check value of docs/format.md, evaluated at compile time.
    let s = b"123456789";
    let mut c = !0u32;
    let mut i = 0;
    while i < s.len() {
        c = CRC_TABLE[((c ^ s[i] as u32) & 0xff) as usize] ^ (c >> 8);
        i += 1;
    }
    assert!(!c == 0xE306_9283);
};

/// Little-endian u16 at `off`.
pub fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

/// Little-endian u32 at `off`.
pub fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

/// Little-endian u64 at `off`.
pub fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// 16 bytes at `off` as a UUID.
pub fn uuid(b: &[u8], off: usize) -> Uuid {
    Uuid(b[off..off + 16].try_into().unwrap())
}

/// Writes a little-endian u16 at `off`.
pub fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

/// Writes a little-endian u32 at `off`.
pub fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Writes a little-endian u64 at `off`.
pub fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Writes the common prefix (docs/format.md section 4), CRC left zero.
pub fn put_prefix(rec: &mut [u8; LEN], kind: u8, host_id: u16, index: u16, domain: [u8; 16]) {
    rec[4..8].copy_from_slice(b"SPMB");
    rec[8] = kind;
    rec[9] = VERSION;
    put16(rec, 10, host_id);
    put16(rec, 12, index);
    rec[16..32].copy_from_slice(&domain);
}

/// Stores the CRC32C of bytes 4..128 in bytes 0..4.
pub fn seal(rec: &mut [u8; LEN]) {
    let crc = crc32c(&rec[4..]);
    put32(rec, 0, crc);
}

/// The kind with this code (docs/format.md section 4), independently of
/// `Kind::from_code`.
pub fn kind_of_code(code: u8) -> Option<Kind> {
    Some(match code {
        1 => Kind::Superblock,
        2 => Kind::SpmHeader,
        3 => Kind::Doorbell,
        4 => Kind::InboxHeader,
        5 => Kind::Request,
        6 => Kind::OutboxHeader,
        7 => Kind::Reply,
        8 => Kind::Hold,
        _ => return None,
    })
}

/// The code of a kind (docs/format.md section 4).
pub fn code_of_kind(kind: Kind) -> u8 {
    match kind {
        Kind::Superblock => 1,
        Kind::SpmHeader => 2,
        Kind::Doorbell => 3,
        Kind::InboxHeader => 4,
        Kind::Request => 5,
        Kind::OutboxHeader => 6,
        Kind::Reply => 7,
        Kind::Hold => 8,
    }
}

/// Where the prefix of `rec` says the record lives.
pub fn prefix_location(rec: &[u8]) -> Location {
    Location {
        domain: uuid(rec, 16),
        host_id: HostId::new(le16(rec, 10)),
        index: le16(rec, 12),
    }
}

// ---------------------------------------------------------------------------
// Reading a record: docs/format.md section 6.

/// The reserved bytes of each kind (docs/format.md section 5), besides the
/// prefix's 14..16.
#[allow(clippy::single_range_in_vec_init)] // lists of ranges, some of one
pub fn reserved_ranges(kind: Kind) -> &'static [Range<usize>] {
    match kind {
        Kind::Superblock => &[72..128],
        Kind::SpmHeader => &[43..44, 80..128],
        Kind::Doorbell => &[36..40, 56..128],
        Kind::InboxHeader => &[68..128],
        Kind::Request => &[84..128],
        Kind::OutboxHeader => &[48..128],
        Kind::Reply => &[90..92, 96..128],
        Kind::Hold => &[41..48, 112..128],
    }
}

/// Every field of `rec` (a record of `kind`) that breaks its rule in
/// docs/format.md sections 4 and 5. The specification does not order the
/// field rules, so a reader may report any one of them.
pub fn invalid_fields(rec: &[u8; LEN], kind: Kind) -> Vec<Field> {
    let mut bad = Vec::new();
    let mut rule = |ok: bool, field: Field| {
        if !ok {
            bad.push(field);
        }
    };
    let host_id = le16(rec, 10);
    let index = le16(rec, 12);
    let is_host = (1..=MAX_HOSTS).contains(&host_id);
    rule(!is_nil(&rec[16..32]), Field::Domain);
    match kind {
        Kind::Superblock | Kind::SpmHeader | Kind::Doorbell => {
            rule(host_id == 0, Field::HostId);
            rule(index == 0, Field::Index);
        }
        Kind::InboxHeader | Kind::OutboxHeader => {
            rule(is_host, Field::HostId);
            rule(index == 0, Field::Index);
        }
        Kind::Request | Kind::Reply | Kind::Hold => {
            rule(is_host, Field::HostId);
            rule((1..=31).contains(&index), Field::Index);
        }
    }
    let size_ok = |size: u64| size != 0 && size.is_multiple_of(512);
    match kind {
        Kind::Superblock => {
            let max_hosts = u64::from(le16(rec, 36));
            let outbox = 65536 + max_hosts * 4096;
            rule(matches!(le32(rec, 32), 512 | 4096), Field::SectorSize);
            rule(
                (1..=u64::from(MAX_HOSTS)).contains(&max_hosts),
                Field::MaxHosts,
            );
            rule(le16(rec, 38) == 31, Field::SlotsPerArea);
            rule(le32(rec, 40) == 4096, Field::AreaSize);
            rule(le32(rec, 44) == 128, Field::RecordSize);
            rule(le64(rec, 48) == 65536, Field::InboxOffset);
            rule(le64(rec, 56) == outbox, Field::OutboxOffset);
            rule(
                le64(rec, 64) == outbox + max_hosts * 4096,
                Field::MailboxSize,
            );
        }
        Kind::SpmHeader => {
            let state = rec[42];
            rule(le16(rec, 40) <= MAX_HOSTS, Field::SpmId);
            rule(state <= 1, Field::State);
            if state == 1 {
                rule(le64(rec, 32) >= 1, Field::Epoch);
                rule(le32(rec, 44) >= 1, Field::HeartbeatIntervalMs);
                rule(le64(rec, 56) != 0, Field::Owner);
            }
        }
        Kind::Doorbell => {
            rule((1..=MAX_HOSTS).contains(&le16(rec, 32)), Field::Ringer);
            rule(le64(rec, 40) >= 1, Field::Generation);
            rule(le64(rec, 48) >= 1, Field::Sequence);
            rule(le16(rec, 34) >= 1, Field::Rings);
        }
        Kind::InboxHeader => {
            rule(le64(rec, 32) >= 1, Field::Generation);
            if le32(rec, 56) != 0 {
                rule(le64(rec, 40) != 0, Field::Owner);
            }
        }
        Kind::Request => {
            rule(le64(rec, 32) >= 1, Field::Generation);
            rule(le64(rec, 40) >= 1, Field::Sequence);
            rule(!is_nil(&rec[48..64]), Field::Volume);
            rule(size_ok(le64(rec, 64)), Field::TargetSize);
            rule(le32(rec, 80) & !1 == 0, Field::Flags);
        }
        Kind::OutboxHeader => {
            rule(le64(rec, 32) >= 1, Field::Epoch);
            rule(le64(rec, 40) >= 1, Field::Generation);
        }
        Kind::Reply => {
            let (status, reason, detail) = (rec[88], rec[89], le32(rec, 92));
            rule(le64(rec, 32) >= 1, Field::Generation);
            rule(le64(rec, 40) >= 1, Field::Sequence);
            rule(!is_nil(&rec[48..64]), Field::Volume);
            rule(size_ok(le64(rec, 64)), Field::TargetSize);
            rule(le64(rec, 80) >= 1, Field::Epoch);
            rule((1..=4).contains(&status), Field::Status);
            if status == 3 {
                rule((1..=4).contains(&reason), Field::Reason);
            } else {
                rule(reason == 0, Field::Reason);
            }
            if status != 4 {
                rule(detail == 0, Field::Detail);
            }
            if status == 1 {
                rule(le64(rec, 72) >= le64(rec, 64), Field::Size);
            }
        }
        Kind::Hold => {
            let count = usize::from(rec[40]);
            rule(le64(rec, 32) >= 1, Field::Generation);
            rule((1..=4).contains(&count), Field::Count);
            let vol = |i: usize| &rec[48 + 16 * i..64 + 16 * i];
            let mut ok = true;
            for i in 0..4 {
                if i < count {
                    ok &= !is_nil(vol(i)) && (0..i).all(|j| vol(j) != vol(i));
                } else {
                    ok &= is_nil(vol(i));
                }
            }
            rule(ok, Field::Volumes);
        }
    }
    bad
}

/// Whether `b` (at most 128 bytes) is all zero. A slice comparison rather
/// than a loop: one `memcmp` instead of an instrumented compare per byte.
pub fn is_nil(b: &[u8]) -> bool {
    static ZERO: [u8; LEN] = [0; LEN];
    b == &ZERO[..b.len()]
}

/// What docs/format.md section 6 says a reader must make of some bytes.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Verdict {
    /// All zero (step 2).
    Empty,
    /// Passes all the steps; a record of this kind.
    Valid(Kind),
    /// Fails one of steps 1 and 3..=10: exactly this defect.
    Defect(Defect),
    /// Fails step 11: these fields (never none) break their rules; the
    /// reader reports one of them.
    InvalidField(Vec<Field>),
}

/// The verdict of docs/format.md section 6 on `bytes` read where a record
/// of kind `expected` (any kind if `None`) belongs, at place `at` (no place
/// checks if `None`).
pub fn verdict(bytes: &[u8], expected: Option<Kind>, at: Option<&Location>) -> Verdict {
    // Step 1.
    let Ok(rec) = <&[u8; LEN]>::try_from(bytes) else {
        return Verdict::Defect(Defect::Length {
            len: u32::try_from(bytes.len()).unwrap_or(u32::MAX),
        });
    };
    // Step 2.
    if is_nil(rec) {
        return Verdict::Empty;
    }
    // Step 3.
    if rec[4..8] != *b"SPMB" {
        return Verdict::Defect(Defect::BadMagic);
    }
    // Step 4.
    let (stored, computed) = (le32(rec, 0), crc32c(&rec[4..]));
    if stored != computed {
        return Verdict::Defect(Defect::Checksum { stored, computed });
    }
    // Step 5.
    if rec[9] != VERSION {
        return Verdict::Defect(Defect::UnsupportedVersion { version: rec[9] });
    }
    // Step 6.
    let Some(kind) = kind_of_code(rec[8]) else {
        return Verdict::Defect(Defect::UnknownKind { code: rec[8] });
    };
    // Step 7.
    if let Some(expected) = expected
        && expected != kind
    {
        return Verdict::Defect(Defect::WrongKind {
            expected,
            found: kind,
        });
    }
    // Steps 8 and 9.
    if let Some(at) = at {
        let here = prefix_location(rec);
        if here.domain != at.domain {
            return Verdict::Defect(Defect::Foreign {
                domain: here.domain,
            });
        }
        if (here.host_id, here.index) != (at.host_id, at.index) {
            return Verdict::Defect(Defect::Misdirected {
                host_id: here.host_id,
                index: here.index,
            });
        }
    }
    // Step 10: the first nonzero reserved byte.
    let first = core::iter::once(14..16)
        .chain(reserved_ranges(kind).iter().cloned())
        .find(|range| !is_nil(&rec[range.clone()]))
        .and_then(|range| range.clone().find(|&i| rec[i] != 0));
    if let Some(offset) = first {
        return Verdict::Defect(Defect::ReservedNotZero {
            offset: offset as u8,
        });
    }
    // Step 11.
    let bad = invalid_fields(rec, kind);
    if !bad.is_empty() {
        return Verdict::InvalidField(bad);
    }
    Verdict::Valid(kind)
}

/// Asserts that a decoder's outcome (reduced to the kind it decoded) is
/// what the specification says.
#[track_caller]
pub fn assert_verdict(what: &str, got: Result<Option<Kind>, Defect>, want: &Verdict) {
    let ok = match (want, &got) {
        (Verdict::Empty, Ok(None)) => true,
        (Verdict::Valid(kind), Ok(Some(found))) => kind == found,
        (Verdict::Defect(defect), Err(found)) => defect == found,
        (Verdict::InvalidField(fields), Err(Defect::InvalidField { field })) => {
            fields.contains(field)
        }
        _ => false,
    };
    assert!(ok, "{what}: got {got:?}, docs/format.md says {want:?}");
}

/// The record a valid `rec` of kind `kind` holds, built from its bytes by
/// the offsets of docs/format.md section 5 (not by the core's decoder).
/// Panics if `rec` is not valid.
pub fn expected_record(rec: &[u8; LEN], kind: Kind) -> Record {
    let domain = uuid(rec, 16);
    let host_id = le16(rec, 10);
    let index = le16(rec, 12);
    match kind {
        Kind::Superblock => Record::Superblock(Superblock {
            domain,
            geometry: Geometry::new(le16(rec, 36), le32(rec, 32)).expect("valid geometry"),
        }),
        Kind::SpmHeader => Record::SpmHeader(SpmHeader {
            domain,
            epoch: Epoch::new(le64(rec, 32)),
            spm_id: HostId::new(le16(rec, 40)),
            state: if rec[42] == 1 {
                SpmState::Active
            } else {
                SpmState::Vacant
            },
            heartbeat_interval_ms: le32(rec, 44),
            heartbeat: le64(rec, 48),
            owner: le64(rec, 56),
            pool_commit: le64(rec, 64),
            release_commit: le64(rec, 72),
        }),
        Kind::Doorbell => Record::Doorbell(Doorbell {
            domain,
            ringer: HostId::new(le16(rec, 32)),
            generation: Generation::new(le64(rec, 40)),
            sequence: le64(rec, 48),
            rings: le16(rec, 34),
        }),
        Kind::InboxHeader => Record::InboxHeader(InboxHeader {
            domain,
            host_id: HostId::new(host_id),
            generation: Generation::new(le64(rec, 32)),
            owner: le64(rec, 40),
            heartbeat: le64(rec, 48),
            heartbeat_interval_ms: le32(rec, 56),
            release_ack: le64(rec, 60),
        }),
        Kind::Request => Record::Request(Request {
            domain,
            host_id: HostId::new(host_id),
            slot: Slot::new(index),
            generation: Generation::new(le64(rec, 32)),
            sequence: le64(rec, 40),
            volume: uuid(rec, 48),
            target_size: le64(rec, 64),
            current_size: le64(rec, 72),
            paused: le32(rec, 80) & 1 != 0,
        }),
        Kind::OutboxHeader => Record::OutboxHeader(OutboxHeader {
            domain,
            host_id: HostId::new(host_id),
            epoch: Epoch::new(le64(rec, 32)),
            generation: Generation::new(le64(rec, 40)),
        }),
        Kind::Reply => Record::Reply(Reply {
            domain,
            host_id: HostId::new(host_id),
            slot: Slot::new(index),
            generation: Generation::new(le64(rec, 32)),
            sequence: le64(rec, 40),
            volume: uuid(rec, 48),
            target_size: le64(rec, 64),
            size: le64(rec, 72),
            epoch: Epoch::new(le64(rec, 80)),
            status: match (rec[88], rec[89]) {
                (1, _) => ReplyStatus::Extended,
                (2, _) => ReplyStatus::WaitingForSpace,
                (3, 1) => ReplyStatus::Rejected(RejectReason::UnknownVolume),
                (3, 2) => ReplyStatus::Rejected(RejectReason::OverLimit),
                (3, 3) => ReplyStatus::Rejected(RejectReason::Malformed),
                (3, 4) => ReplyStatus::Rejected(RejectReason::SegmentsFull),
                (4, _) => ReplyStatus::Failed {
                    code: le32(rec, 92),
                },
                other => panic!("not a valid status/reason: {other:?}"),
            },
        }),
        Kind::Hold => Record::Hold(Hold {
            domain,
            host_id: HostId::new(host_id),
            slot: Slot::new(index),
            generation: Generation::new(le64(rec, 32)),
            count: rec[40],
            volumes: [uuid(rec, 48), uuid(rec, 64), uuid(rec, 80), uuid(rec, 96)],
        }),
    }
}

/// Asserts that `err`, from `Geometry::new(max_hosts, sector_size)`, names
/// a value that docs/format.md section 3 does not allow (either, if both
/// are wrong: the specification does not order them).
#[track_caller]
pub fn assert_geometry_error(err: GeometryError, max_hosts: u16, sector_size: u32) {
    let sector_ok = matches!(sector_size, 512 | 4096);
    let hosts_ok = (1..=MAX_HOSTS).contains(&max_hosts);
    let ok = match err {
        GeometryError::SectorSize { sector_size: s } => s == sector_size && !sector_ok,
        GeometryError::MaxHosts { max_hosts: m } => m == max_hosts && !hosts_ok,
        // A refusal the specification does not name.
        _ => false,
    };
    assert!(
        ok,
        "Geometry::new({max_hosts}, {sector_size}) refused with {err:?}"
    );
    let field = err.field();
    assert!(matches!(
        (err, field),
        (GeometryError::SectorSize { .. }, Field::SectorSize)
            | (GeometryError::MaxHosts { .. }, Field::MaxHosts)
    ));
    assert!(!err.to_string().is_empty());
}

// ---------------------------------------------------------------------------
// The typed records, alike.

/// What the fuzz targets need of every typed record.
pub trait Typed: Copy + PartialEq + Debug {
    /// The kind.
    const KIND: Kind;
    /// `T::decode`.
    fn decode(bytes: &[u8]) -> Result<Option<Self>, Defect>;
    /// `T::parse`.
    fn parse(bytes: &[u8], at: &Location) -> Result<Option<Self>, Defect>;
    /// `T::emit`.
    fn emit(&self, buf: &mut [u8; LEN]) -> Result<(), Field>;
    /// `T::to_bytes`.
    fn to_bytes(&self) -> Result<[u8; LEN], Field>;
    /// The value as a [`Record`].
    fn wrap(self) -> Record;
    /// The value, if `record` is of this kind.
    fn unwrap(record: Record) -> Option<Self>;
    /// Where the record belongs: its domain, host (0 for domain-wide
    /// records) and record index.
    fn location(&self) -> Location;
}

macro_rules! typed {
    ($ty:ident, |$r:ident| $host:expr, $index:expr) => {
        impl Typed for $ty {
            const KIND: Kind = $ty::KIND;
            fn decode(bytes: &[u8]) -> Result<Option<Self>, Defect> {
                $ty::decode(bytes)
            }
            fn parse(bytes: &[u8], at: &Location) -> Result<Option<Self>, Defect> {
                $ty::parse(bytes, at)
            }
            fn emit(&self, buf: &mut [u8; LEN]) -> Result<(), Field> {
                $ty::emit(self, buf)
            }
            fn to_bytes(&self) -> Result<[u8; LEN], Field> {
                $ty::to_bytes(self)
            }
            fn wrap(self) -> Record {
                Record::$ty(self)
            }
            fn unwrap(record: Record) -> Option<Self> {
                match record {
                    Record::$ty(v) => Some(v),
                    _ => None,
                }
            }
            fn location(&self) -> Location {
                let $r = self;
                Location {
                    domain: $r.domain,
                    host_id: $host,
                    index: $index,
                }
            }
        }
    };
}

typed!(Superblock, |_r| HostId::NONE, 0);
typed!(SpmHeader, |_r| HostId::NONE, 0);
typed!(Doorbell, |_r| HostId::NONE, 0);
typed!(InboxHeader, |r| r.host_id, 0);
typed!(Request, |r| r.host_id, r.slot.get());
typed!(OutboxHeader, |r| r.host_id, 0);
typed!(Reply, |r| r.host_id, r.slot.get());
typed!(Hold, |r| r.host_id, r.slot.get());

/// Calls `f` with the typed value inside `record`.
#[macro_export]
macro_rules! with_typed {
    ($record:expr, |$v:ident| $body:expr) => {
        match $record {
            ::spmbox_core::wire::Record::Superblock($v) => $body,
            ::spmbox_core::wire::Record::SpmHeader($v) => $body,
            ::spmbox_core::wire::Record::Doorbell($v) => $body,
            ::spmbox_core::wire::Record::InboxHeader($v) => $body,
            ::spmbox_core::wire::Record::Request($v) => $body,
            ::spmbox_core::wire::Record::OutboxHeader($v) => $body,
            ::spmbox_core::wire::Record::Reply($v) => $body,
            ::spmbox_core::wire::Record::Hold($v) => $body,
        }
    };
}

/// Reduces a decoder's outcome to the kind it decoded.
pub fn kind_outcome<T>(
    got: &Result<Option<T>, Defect>,
    kind: impl Fn(&T) -> Kind,
) -> Result<Option<Kind>, Defect> {
    match got {
        Ok(v) => Ok(v.as_ref().map(kind)),
        Err(e) => Err(*e),
    }
}
