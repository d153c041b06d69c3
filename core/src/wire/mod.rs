//! The mailbox's on-disk format, version 4.
//!
//! `docs/format.md` is the specification; this module implements it and the
//! two say the same thing. In short:
//!
//! ```text
//!  offset                      size              written by
//!  0x00000  superblock block   4 KiB             `spmbox format` only
//!  0x01000  SPM header block   4 KiB             the SPM
//!  0x02000  doorbell block     4 KiB             any host (a hint only)
//!  0x03000  reserved           52 KiB (zero)     nobody
//!  0x10000  inbox              max_hosts x 4 KiB host h writes area h only
//!  ...      outbox             max_hosts x 4 KiB the SPM
//! ```
//!
//! A 4 KiB block holds 32 records of [`RECORD_LEN`] (128) bytes, so no
//! record ever straddles a 512-byte sector. In a host area, record 0 is the
//! area header and records 1..=31 are the slots; in the superblock, SPM
//! header and doorbell blocks only record 0 is used and the rest is zero.
//!
//! Every record begins with the same 32-byte prefix:
//!
//! ```text
//!  0       4       8   9   10      12      14      16                      32
//!  +-------+-------+---+---+-------+-------+-------+-----------------------+
//!  | crc32c| "SPMB"|knd|ver|host_id| index | resvd |   domain UUID (16)    |
//!  +-------+-------+---+---+-------+-------+-------+-----------------------+
//! ```
//!
//! The CRC32C (Castagnoli) covers bytes 4..128. The prefix says which
//! domain, host and record index the record belongs to, so a record that was
//! written to the wrong place, left over from another domain, or torn is
//! recognised and never acted on.
//!
//! # Parsing never panics
//!
//! Every decoder takes any `&[u8]` and returns `Ok(None)` for an all-zero
//! (empty) record, `Ok(Some(record))` for a valid one and `Err(Defect)` that
//! says exactly what is wrong otherwise. Emitters take a
//! `&mut [u8; RECORD_LEN]` and refuse (with the offending [`Field`]) to write
//! a value that the decoder would not accept, so what is written is always
//! readable.

mod area;
mod geometry;
mod ids;
mod raw;
mod records;

pub use area::{Area, HoldArea, InboxArea, OutboxArea, SlotRecord, SlotState, areas};
pub use geometry::{Geometry, GeometryError, Place, Region};
pub use ids::{Epoch, Generation, HostId, Slot};
pub use records::{
    Doorbell, Hold, InboxHeader, OutboxHeader, Record, RejectReason, Reply, ReplyStatus, Request,
    SpmHeader, SpmState, Superblock,
};

use core::fmt;

/// Length of every record, in bytes.
pub const RECORD_LEN: usize = 128;
/// Size of a host area (and of every block of the mailbox), in bytes.
pub const AREA_SIZE: usize = 4096;
/// Records in one area: the header (index 0) and the slots.
pub const RECORDS_PER_AREA: usize = AREA_SIZE / RECORD_LEN;
/// Slots in one host area, numbered 1..=31 (index 0 is the area header).
pub const SLOTS_PER_AREA: u16 = (RECORDS_PER_AREA - 1) as u16;
/// The most hosts a mailbox can hold (sanlock's limit). Host ids are
/// 1..=`MAX_HOSTS`; 0 means "not a host".
pub const MAX_HOSTS: u16 = 2000;
/// Offset of the inbox: the first 64 KiB hold the superblock, SPM header
/// and doorbell blocks and reserved space.
pub const INBOX_OFFSET: u64 = 64 * 1024;
/// Offset of the superblock block.
pub const SUPERBLOCK_OFFSET: u64 = 0;
/// Offset of the SPM header block.
pub const SPM_HEADER_OFFSET: u64 = 4096;
/// Offset of the doorbell block.
pub const DOORBELL_OFFSET: u64 = 8192;
/// First byte of the reserved space that follows the doorbell block.
pub const RESERVED_OFFSET: u64 = 12288;
/// Offset of the backup superblock block: its record 0 is a byte-for-byte
/// copy of the superblock record, the rest zero. It sits at the end of the
/// first 64 KiB, away from the start of the device where stray writes
/// (partition tools, file system signatures) land.
pub const SUPERBLOCK_BACKUP_OFFSET: u64 = 0xF000;
/// The magic at bytes 4..8 of every record.
pub const MAGIC: [u8; 4] = *b"SPMB";
/// The format version this crate reads and writes.
pub const FORMAT_VERSION: u8 = 4;
/// Logical sector sizes the format supports.
pub const SECTOR_SIZES: [u32; 2] = [512, 4096];
/// Request flag: the guest is paused for lack of space; serve it first.
pub const FLAG_PAUSED: u32 = 1;
/// Volumes one hold record lists at most.
pub const HOLD_VOLUMES: usize = 4;

const _: () = assert!(AREA_SIZE % RECORD_LEN == 0);
const _: () = assert!(
    512 % RECORD_LEN == 0,
    "records must not straddle a 512-byte sector"
);
const _: () = assert!(SLOTS_PER_AREA == 31);
const _: () = assert!(INBOX_OFFSET % AREA_SIZE as u64 == 0);
const _: () = assert!(RESERVED_OFFSET == DOORBELL_OFFSET + AREA_SIZE as u64);
const _: () = assert!(SUPERBLOCK_BACKUP_OFFSET + AREA_SIZE as u64 == INBOX_OFFSET);
const _: () = assert!(SUPERBLOCK_BACKUP_OFFSET > RESERVED_OFFSET);

/// How [`CRC32C`] computes: slice-by-16 with a 16 KiB table under the
/// `fast-crc` feature (hosts and SPMs with the memory to spare, several
/// times faster), else byte-wise with a 1 KiB table (firmware default).
#[cfg(feature = "fast-crc")]
pub type CrcTable = crc::Table<16>;
/// How [`CRC32C`] computes: slice-by-16 with a 16 KiB table under the
/// `fast-crc` feature (hosts and SPMs with the memory to spare, several
/// times faster), else byte-wise with a 1 KiB table (firmware default).
#[cfg(not(feature = "fast-crc"))]
pub type CrcTable = crc::Table<1>;

/// The CRC used by every record: CRC-32C (Castagnoli), as iSCSI and ext4
/// use it. `crc32c(b"123456789") == 0xE306_9283`. Both tables give the same
/// values; only speed and size differ.
pub const CRC32C: crc::Crc<u32, CrcTable> = crc::Crc::<u32, CrcTable>::new(&crc::CRC_32_ISCSI);

/// A 16-byte UUID, stored in the order of its text form (RFC 9562).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// The nil UUID (all zero), never a valid domain or volume.
    pub const NIL: Uuid = Uuid([0; 16]);

    /// Whether this is the nil UUID.
    pub fn is_nil(&self) -> bool {
        self.0 == [0; 16]
    }

    /// Parses the canonical text form (`8-4-4-4-12` hex digits, either
    /// case). Returns `None` for anything else.
    pub fn parse_str(text: &str) -> Option<Uuid> {
        let text = text.as_bytes();
        if text.len() != 36 {
            return None;
        }
        let mut out = [0u8; 16];
        let mut nibbles = 0usize;
        for (i, &c) in text.iter().enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
                if c != b'-' {
                    return None;
                }
                continue;
            }
            let v = (c as char).to_digit(16)? as u8;
            let byte = out.get_mut(nibbles / 2)?;
            *byte = (*byte << 4) | v;
            nibbles += 1;
        }
        Some(Uuid(out))
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// What kind of record a record is (byte 8).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum Kind {
    /// The superblock: domain and geometry.
    Superblock = 1,
    /// The SPM header: who is SPM, in which epoch.
    SpmHeader = 2,
    /// The doorbell: the last host that rang.
    Doorbell = 3,
    /// A host's inbox area header: its generation.
    InboxHeader = 4,
    /// An extension request in an inbox slot.
    Request = 5,
    /// A host's outbox area header: the SPM epoch and generation served.
    OutboxHeader = 6,
    /// A reply in an outbox slot.
    Reply = 7,
    /// The volumes a host holds open, in an inbox slot.
    Hold = 8,
}

impl Kind {
    /// The kind with this code, if any.
    pub fn from_code(code: u8) -> Option<Kind> {
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

    /// The name used in docs/format.md, in messages and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Superblock => "superblock",
            Kind::SpmHeader => "spm_header",
            Kind::Doorbell => "doorbell",
            Kind::InboxHeader => "inbox_header",
            Kind::Request => "request",
            Kind::OutboxHeader => "outbox_header",
            Kind::Reply => "reply",
            Kind::Hold => "hold",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A record field, named as in docs/format.md, for reporting which value
/// is out of range.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[allow(missing_docs)] // each variant is the field of the same name
pub enum Field {
    HostId,
    Index,
    SectorSize,
    MaxHosts,
    SlotsPerArea,
    AreaSize,
    RecordSize,
    InboxOffset,
    OutboxOffset,
    MailboxSize,
    Epoch,
    SpmId,
    State,
    HeartbeatIntervalMs,
    Owner,
    Ringer,
    Rings,
    Generation,
    Sequence,
    Volume,
    TargetSize,
    Flags,
    Size,
    Status,
    Reason,
    Detail,
    Domain,
    Count,
    Volumes,
}

impl Field {
    /// The field's name in docs/format.md.
    pub fn name(self) -> &'static str {
        match self {
            Field::HostId => "host_id",
            Field::Index => "index",
            Field::SectorSize => "sector_size",
            Field::MaxHosts => "max_hosts",
            Field::SlotsPerArea => "slots_per_area",
            Field::AreaSize => "area_size",
            Field::RecordSize => "record_size",
            Field::InboxOffset => "inbox_offset",
            Field::OutboxOffset => "outbox_offset",
            Field::MailboxSize => "mailbox_size",
            Field::Epoch => "epoch",
            Field::SpmId => "spm_id",
            Field::State => "state",
            Field::HeartbeatIntervalMs => "heartbeat_interval_ms",
            Field::Owner => "owner",
            Field::Ringer => "ringer",
            Field::Rings => "rings",
            Field::Generation => "generation",
            Field::Sequence => "sequence",
            Field::Volume => "volume",
            Field::TargetSize => "target_size",
            Field::Flags => "flags",
            Field::Size => "size",
            Field::Status => "status",
            Field::Reason => "reason",
            Field::Detail => "detail",
            Field::Domain => "domain",
            Field::Count => "count",
            Field::Volumes => "volumes",
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a record is expected: the domain, the host (0 for domain-wide
/// records) and the record index within its 4 KiB block.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Location {
    /// The domain the mailbox belongs to.
    pub domain: Uuid,
    /// The host whose area this is; 0 for the superblock, SPM header and
    /// doorbell.
    pub host_id: HostId,
    /// The record index in the block: 0 for headers, 1..=31 for slots.
    pub index: u16,
}

/// Why a non-empty record is not acted on. Checked in this order; the first
/// that applies is reported.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Defect {
    /// The input is not [`RECORD_LEN`] bytes long.
    Length {
        /// The length given.
        len: u32,
    },
    /// Bytes 4..8 are not [`MAGIC`]: not an spmbox record at all.
    BadMagic,
    /// The CRC32C does not match: torn, bit-flipped or partly overwritten.
    Checksum {
        /// The CRC stored in bytes 0..4.
        stored: u32,
        /// The CRC of bytes 4..128 as read.
        computed: u32,
    },
    /// A format version this reader does not know.
    UnsupportedVersion {
        /// The version found.
        version: u8,
    },
    /// A kind code that no record of this version has.
    UnknownKind {
        /// The code found.
        code: u8,
    },
    /// A valid record of another kind where this kind belongs.
    WrongKind {
        /// The kind that belongs here.
        expected: Kind,
        /// The kind found.
        found: Kind,
    },
    /// A valid record of another storage domain.
    Foreign {
        /// The domain the record names.
        domain: Uuid,
    },
    /// A valid record of this domain that names another place.
    Misdirected {
        /// The host the record names.
        host_id: HostId,
        /// The record index the record names.
        index: u16,
    },
    /// A reserved byte is not zero.
    ReservedNotZero {
        /// Offset of the first nonzero reserved byte in the record.
        offset: u8,
    },
    /// A field holds a value the format does not allow.
    InvalidField {
        /// The field.
        field: Field,
    },
}

impl Defect {
    /// A short, stable name for JSON and the test vectors' manifest.
    pub fn name(&self) -> &'static str {
        match self {
            Defect::Length { .. } => "length",
            Defect::BadMagic => "bad_magic",
            Defect::Checksum { .. } => "checksum",
            Defect::UnsupportedVersion { .. } => "unsupported_version",
            Defect::UnknownKind { .. } => "unknown_kind",
            Defect::WrongKind { .. } => "wrong_kind",
            Defect::Foreign { .. } => "foreign",
            Defect::Misdirected { .. } => "misdirected",
            Defect::ReservedNotZero { .. } => "reserved_not_zero",
            Defect::InvalidField { .. } => "invalid_field",
        }
    }
}

impl fmt::Display for Defect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Defect::Length { len } => {
                write!(f, "record is {len} bytes long, expected {RECORD_LEN}")
            }
            Defect::BadMagic => f.write_str("not an spmbox record (bad magic)"),
            Defect::Checksum { stored, computed } => write!(
                f,
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): torn or corrupted"
            ),
            Defect::UnsupportedVersion { version } => write!(
                f,
                "format version {version} is not supported (this reader knows version {FORMAT_VERSION})"
            ),
            Defect::UnknownKind { code } => write!(f, "unknown record kind {code}"),
            Defect::WrongKind { expected, found } => {
                write!(f, "a {found} record where a {expected} belongs")
            }
            Defect::Foreign { domain } => write!(f, "record of foreign domain {domain}"),
            Defect::Misdirected { host_id, index } => write!(
                f,
                "misdirected: the record belongs to host {host_id}, record index {index}"
            ),
            Defect::ReservedNotZero { offset } => {
                write!(f, "reserved byte at record offset {offset} is not zero")
            }
            Defect::InvalidField { field } => write!(f, "field {field} holds an invalid value"),
        }
    }
}

impl core::error::Error for Defect {}

/// Returns the offset of the first nonzero byte, if any. Used to check that
/// unused space (the rest of a block, reserved regions) is zero.
pub fn first_nonzero(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b != 0)
}

#[cfg(test)]
mod crc_tests {
    use super::CRC32C;

    /// Whichever table the build uses, the values are CRC-32C's.
    #[test]
    fn the_configured_table_agrees_with_the_tableless_crc() {
        let reference = crc::Crc::<u32, crc::NoTable>::new(&crc::CRC_32_ISCSI);
        let mut data = [0u8; 300];
        let mut x: u32 = 0x9E37_79B9;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        for len in 0..data.len() {
            assert_eq!(
                CRC32C.checksum(&data[..len]),
                reference.checksum(&data[..len])
            );
        }
        assert_eq!(CRC32C.checksum(b"123456789"), 0xE306_9283);
    }
}
