//! Typed records: validated values with `decode`, `parse` and `emit`.
//!
//! - `decode(bytes)` checks everything that can be checked from the record
//!   alone: magic, checksum, version, kind, reserved bytes, field values.
//! - `parse(bytes, &location)` also checks that the record belongs where it
//!   was read from (domain, host, record index); use it for acting on disk
//!   contents.
//! - `emit(&mut buf)` writes the record with its checksum, after checking
//!   the same rules the decoder applies.

use core::ops::Range;

use zerocopy::little_endian::{U16, U32, U64};

use super::raw::{self, Prefix};
use super::{
    CRC32C, Defect, Epoch, FLAG_PAUSED, FORMAT_VERSION, Field, Generation, Geometry, HOLD_VOLUMES,
    HostId, Kind, Location, MAGIC, MAX_HOSTS, RECORD_LEN, SLOTS_PER_AREA, Slot, Uuid,
};

/// Checks shared by all kinds: length, empty, magic, checksum, version,
/// known kind. Returns the record and its kind, or `None` when all zero.
fn open(bytes: &[u8]) -> Result<Option<(&[u8; RECORD_LEN], Kind)>, Defect> {
    let rec: &[u8; RECORD_LEN] = bytes.try_into().map_err(|_| Defect::Length {
        len: u32::try_from(bytes.len()).unwrap_or(u32::MAX),
    })?;
    if rec.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let Some((stored, covered)) = rec.split_first_chunk::<4>() else {
        return Err(Defect::Length { len: 0 });
    };
    let prefix: &Prefix = zerocopy::transmute_ref!(rec.first_chunk::<32>().unwrap_or(&[0; 32]));
    if prefix.magic != MAGIC {
        return Err(Defect::BadMagic);
    }
    let stored = u32::from_le_bytes(*stored);
    let computed = CRC32C.checksum(covered);
    if stored != computed {
        return Err(Defect::Checksum { stored, computed });
    }
    if prefix.version != FORMAT_VERSION {
        return Err(Defect::UnsupportedVersion {
            version: prefix.version,
        });
    }
    let kind = Kind::from_code(prefix.kind).ok_or(Defect::UnknownKind { code: prefix.kind })?;
    Ok(Some((rec, kind)))
}

/// The checks after [`open`] for a record of kind `kind`: the right kind,
/// the right place (if `at` is given), reserved bytes zero.
fn open_kind<'a>(
    bytes: &'a [u8],
    kind: Kind,
    reserved: &[Range<usize>],
    at: Option<&Location>,
) -> Result<Option<&'a [u8; RECORD_LEN]>, Defect> {
    let Some((rec, found)) = open(bytes)? else {
        return Ok(None);
    };
    if found != kind {
        return Err(Defect::WrongKind {
            expected: kind,
            found,
        });
    }
    let prefix: &Prefix = zerocopy::transmute_ref!(rec.first_chunk::<32>().unwrap_or(&[0; 32]));
    if let Some(at) = at {
        let domain = Uuid(prefix.domain);
        if domain != at.domain {
            return Err(Defect::Foreign { domain });
        }
        let (host_id, index) = (HostId::new(prefix.host_id.get()), prefix.index.get());
        if (host_id, index) != (at.host_id, at.index) {
            return Err(Defect::Misdirected { host_id, index });
        }
    }
    let ranges = core::iter::once(raw::reserved::PREFIX).chain(reserved.iter().cloned());
    for range in ranges {
        let start = range.start;
        if let Some(pos) = rec.get(range).and_then(super::first_nonzero) {
            // Offsets are below RECORD_LEN (128), so they fit in a u8.
            let offset = u8::try_from(start + pos).unwrap_or(u8::MAX);
            return Err(Defect::ReservedNotZero { offset });
        }
    }
    Ok(Some(rec))
}

/// Writes `raw` (whose CRC field is ignored) into `buf` and seals it with
/// the checksum of bytes 4..128.
fn seal(raw: &[u8; RECORD_LEN], buf: &mut [u8; RECORD_LEN]) {
    *buf = *raw;
    if let Some((crc, covered)) = buf.split_first_chunk_mut::<4>() {
        *crc = CRC32C.checksum(covered).to_le_bytes();
    }
}

fn prefix(kind: Kind, host_id: u16, index: u16, domain: Uuid) -> Prefix {
    Prefix {
        crc: U32::new(0),
        magic: MAGIC,
        kind: kind as u8,
        version: FORMAT_VERSION,
        host_id: U16::new(host_id),
        index: U16::new(index),
        reserved: [0; 2],
        domain: domain.0,
    }
}

fn require(ok: bool, field: Field) -> Result<(), Field> {
    if ok { Ok(()) } else { Err(field) }
}

/// Domain-wide records live at host 0, index 0, in a non-nil domain.
fn check_domain_wide(domain: Uuid, host_id: u16, index: u16) -> Result<(), Field> {
    require(!domain.is_nil(), Field::Domain)?;
    require(host_id == 0, Field::HostId)?;
    require(index == 0, Field::Index)
}

/// Host records live at a real host id; headers at index 0, slots at 1..=31.
fn check_host_record(domain: Uuid, host_id: u16, index: u16, slot: bool) -> Result<(), Field> {
    require(!domain.is_nil(), Field::Domain)?;
    require((1..=MAX_HOSTS).contains(&host_id), Field::HostId)?;
    let index_ok = if slot {
        (1..=SLOTS_PER_AREA).contains(&index)
    } else {
        index == 0
    };
    require(index_ok, Field::Index)
}

fn check_size(size: u64, field: Field) -> Result<(), Field> {
    require(size != 0 && size % 512 == 0, field)
}

/// Generates `decode`, `parse`, `emit` and `to_bytes` for a record type
/// from its private `from_raw`, `raw` and `check`.
macro_rules! codec {
    ($ty:ident, $raw:ident, $kind:expr, $reserved:expr) => {
        impl $ty {
            /// The kind code this record carries.
            pub const KIND: Kind = $kind;

            /// Decodes a record from exactly [`RECORD_LEN`] bytes without
            /// checking where it was read from. `Ok(None)`: all zero (empty).
            pub fn decode(bytes: &[u8]) -> Result<Option<Self>, Defect> {
                Self::decode_at(bytes, None)
            }

            /// Decodes a record and checks that it belongs at `at` (domain,
            /// host, record index). `Ok(None)`: all zero (empty).
            pub fn parse(bytes: &[u8], at: &Location) -> Result<Option<Self>, Defect> {
                Self::decode_at(bytes, Some(at))
            }

            fn decode_at(bytes: &[u8], at: Option<&Location>) -> Result<Option<Self>, Defect> {
                let Some(rec) = open_kind(bytes, $kind, $reserved, at)? else {
                    return Ok(None);
                };
                let raw: &raw::$raw = zerocopy::transmute_ref!(rec);
                let value = Self::from_raw(raw).map_err(|field| Defect::InvalidField { field })?;
                value
                    .check()
                    .map_err(|field| Defect::InvalidField { field })?;
                Ok(Some(value))
            }

            /// Writes the record, checksum included, into `buf`. Refuses
            /// (naming the field) a value that [`Self::decode`] would
            /// reject; `buf` is untouched then.
            pub fn emit(&self, buf: &mut [u8; RECORD_LEN]) -> Result<(), Field> {
                self.check()?;
                let bytes: [u8; RECORD_LEN] = zerocopy::transmute!(self.raw());
                seal(&bytes, buf);
                Ok(())
            }

            /// The record's bytes, as [`Self::emit`] writes them.
            pub fn to_bytes(&self) -> Result<[u8; RECORD_LEN], Field> {
                let mut buf = [0; RECORD_LEN];
                self.emit(&mut buf)?;
                Ok(buf)
            }
        }
    };
}

// ---------------------------------------------------------------------------

/// The superblock (kind 1): which domain this mailbox serves and its
/// geometry. Written once, by `spmbox format`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Superblock {
    /// The storage domain.
    pub domain: Uuid,
    /// Host count and sector size, and everything derived from them.
    pub geometry: Geometry,
}

impl Superblock {
    fn from_raw(raw: &raw::RawSuperblock) -> Result<Self, Field> {
        check_domain_wide(
            Uuid(raw.prefix.domain),
            raw.prefix.host_id.get(),
            raw.prefix.index.get(),
        )?;
        let geometry =
            Geometry::new(raw.max_hosts.get(), raw.sector_size.get()).map_err(|e| e.field())?;
        let expected = Self {
            domain: Uuid(raw.prefix.domain),
            geometry,
        }
        .raw();
        require(
            raw.slots_per_area == expected.slots_per_area,
            Field::SlotsPerArea,
        )?;
        require(raw.area_size == expected.area_size, Field::AreaSize)?;
        require(raw.record_size == expected.record_size, Field::RecordSize)?;
        require(
            raw.inbox_offset == expected.inbox_offset,
            Field::InboxOffset,
        )?;
        require(
            raw.outbox_offset == expected.outbox_offset,
            Field::OutboxOffset,
        )?;
        require(
            raw.mailbox_size == expected.mailbox_size,
            Field::MailboxSize,
        )?;
        Ok(Self {
            domain: Uuid(raw.prefix.domain),
            geometry,
        })
    }

    fn raw(&self) -> raw::RawSuperblock {
        let g = &self.geometry;
        raw::RawSuperblock {
            prefix: prefix(Kind::Superblock, 0, 0, self.domain),
            sector_size: U32::new(g.sector_size()),
            max_hosts: U16::new(g.max_hosts()),
            slots_per_area: U16::new(SLOTS_PER_AREA),
            area_size: U32::new(super::AREA_SIZE as u32),
            record_size: U32::new(RECORD_LEN as u32),
            inbox_offset: U64::new(g.inbox_offset()),
            outbox_offset: U64::new(g.outbox_offset()),
            mailbox_size: U64::new(g.mailbox_size()),
            reserved: [0; 56],
        }
    }

    fn check(&self) -> Result<(), Field> {
        check_domain_wide(self.domain, 0, 0)
    }
}
codec!(
    Superblock,
    RawSuperblock,
    Kind::Superblock,
    raw::reserved::SUPERBLOCK
);

// ---------------------------------------------------------------------------

/// Whether an SPM holds the mailbox.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum SpmState {
    /// No SPM runs: never started, or the last one stopped cleanly.
    Vacant = 0,
    /// An SPM runs and bumps `heartbeat` every `heartbeat_interval_ms`.
    Active = 1,
}

/// The SPM header (kind 2): who serves the mailbox and in which epoch.
/// Written only by the SPM.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SpmHeader {
    /// The storage domain.
    pub domain: Uuid,
    /// Raised by every SPM that takes over; replies carry it, and hosts
    /// ignore replies from an epoch older than the newest they have seen.
    /// 0 only before any SPM ever ran.
    pub epoch: Epoch,
    /// The host id of the SPM, or 0 when the SPM is not one of the hosts
    /// (a storage array).
    pub spm_id: HostId,
    /// Whether an SPM holds the mailbox.
    pub state: SpmState,
    /// How often an active SPM bumps `heartbeat`, in milliseconds.
    pub heartbeat_interval_ms: u32,
    /// A counter the active SPM bumps; a stalled counter means a dead SPM.
    pub heartbeat: u64,
    /// A random number the SPM instance that wrote the header chose when
    /// it started: two SPMs that took the same epoch tell each other apart
    /// by it (the one whose owner is no longer in the header stands down).
    /// Nonzero when `state` is active; 0 in a header no SPM wrote.
    pub owner: u64,
    /// The sequence number of the newest pool metadata commit this SPM
    /// knows to be durable (0: none, or a backend without such numbers). A
    /// second place for it, so a rolled-back pool is noticed.
    pub pool_commit: u64,
    /// The sequence number of the newest pool commit that released
    /// extents (took them from a volume), as this SPM knows it; 0 if none
    /// ever did. Hosts acknowledge it in their inbox header's
    /// `release_ack` once every map they hold is at least that new.
    pub release_commit: u64,
}

impl SpmHeader {
    /// A vacant header at `epoch`: what `spmbox format` writes (epoch 0),
    /// and what a new SPM starts from when it found no header but knows
    /// an epoch it must be above.
    pub const fn vacant(domain: Uuid, epoch: Epoch) -> SpmHeader {
        SpmHeader {
            domain,
            epoch,
            spm_id: HostId::NONE,
            state: SpmState::Vacant,
            heartbeat_interval_ms: 0,
            heartbeat: 0,
            owner: 0,
            pool_commit: 0,
            release_commit: 0,
        }
    }

    fn from_raw(raw: &raw::RawSpmHeader) -> Result<Self, Field> {
        check_domain_wide(
            Uuid(raw.prefix.domain),
            raw.prefix.host_id.get(),
            raw.prefix.index.get(),
        )?;
        let state = match raw.state {
            0 => SpmState::Vacant,
            1 => SpmState::Active,
            _ => return Err(Field::State),
        };
        Ok(Self {
            domain: Uuid(raw.prefix.domain),
            epoch: Epoch::new(raw.epoch.get()),
            spm_id: HostId::new(raw.spm_id.get()),
            state,
            heartbeat_interval_ms: raw.heartbeat_interval_ms.get(),
            heartbeat: raw.heartbeat.get(),
            owner: raw.owner.get(),
            pool_commit: raw.pool_commit.get(),
            release_commit: raw.release_commit.get(),
        })
    }

    fn raw(&self) -> raw::RawSpmHeader {
        raw::RawSpmHeader {
            prefix: prefix(Kind::SpmHeader, 0, 0, self.domain),
            epoch: U64::new(self.epoch.get()),
            spm_id: U16::new(self.spm_id.get()),
            state: self.state as u8,
            reserved0: 0,
            heartbeat_interval_ms: U32::new(self.heartbeat_interval_ms),
            heartbeat: U64::new(self.heartbeat),
            owner: U64::new(self.owner),
            pool_commit: U64::new(self.pool_commit),
            release_commit: U64::new(self.release_commit),
            reserved: [0; 48],
        }
    }

    fn check(&self) -> Result<(), Field> {
        check_domain_wide(self.domain, 0, 0)?;
        require(self.spm_id.get() <= MAX_HOSTS, Field::SpmId)?;
        if self.state == SpmState::Active {
            require(self.epoch.get() >= 1, Field::Epoch)?;
            require(self.heartbeat_interval_ms >= 1, Field::HeartbeatIntervalMs)?;
            require(self.owner != 0, Field::Owner)?;
        }
        Ok(())
    }
}
codec!(
    SpmHeader,
    RawSpmHeader,
    Kind::SpmHeader,
    raw::reserved::SPM_HEADER
);

// ---------------------------------------------------------------------------

/// The doorbell (kind 3): the last host that wrote a request. Any host
/// writes it, so concurrent rings overwrite each other: it is a hint that
/// lets the SPM notice new mail early, never the only way it does.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Doorbell {
    /// The storage domain.
    pub domain: Uuid,
    /// The host that rang, 1..=2000.
    pub ringer: HostId,
    /// The ringer's generation.
    pub generation: Generation,
    /// The sequence number of the request the ringer just wrote.
    pub sequence: u64,
    /// How many times the ringer has rung since it wrote that request: 1
    /// for its first ring, one more for each ring again while no reply
    /// came. 2 or more says an earlier ring went unanswered, most likely
    /// overwritten by another host's ring before the SPM read it.
    pub rings: u16,
}

impl Doorbell {
    fn from_raw(raw: &raw::RawDoorbell) -> Result<Self, Field> {
        check_domain_wide(
            Uuid(raw.prefix.domain),
            raw.prefix.host_id.get(),
            raw.prefix.index.get(),
        )?;
        Ok(Self {
            domain: Uuid(raw.prefix.domain),
            ringer: HostId::new(raw.ringer.get()),
            generation: Generation::new(raw.generation.get()),
            sequence: raw.sequence.get(),
            rings: raw.rings.get(),
        })
    }

    fn raw(&self) -> raw::RawDoorbell {
        raw::RawDoorbell {
            prefix: prefix(Kind::Doorbell, 0, 0, self.domain),
            ringer: U16::new(self.ringer.get()),
            rings: U16::new(self.rings),
            reserved0: [0; 4],
            generation: U64::new(self.generation.get()),
            sequence: U64::new(self.sequence),
            reserved: [0; 72],
        }
    }

    fn check(&self) -> Result<(), Field> {
        check_domain_wide(self.domain, 0, 0)?;
        require((1..=MAX_HOSTS).contains(&self.ringer.get()), Field::Ringer)?;
        require(self.generation.get() >= 1, Field::Generation)?;
        require(self.sequence >= 1, Field::Sequence)?;
        require(self.rings >= 1, Field::Rings)
    }
}
codec!(
    Doorbell,
    RawDoorbell,
    Kind::Doorbell,
    raw::reserved::DOORBELL
);

// ---------------------------------------------------------------------------

/// A host's inbox area header (kind 4, record 0 of its inbox area): the
/// host's generation, and the lease on its host id. Only requests of this
/// generation are acted on. The process that holds the host id writes its
/// random `owner` and raises `heartbeat` every `heartbeat_interval_ms`; a
/// process that finds the heartbeat moving knows the host id is taken.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct InboxHeader {
    /// The storage domain.
    pub domain: Uuid,
    /// The host, 1..=2000.
    pub host_id: HostId,
    /// The host's incarnation, raised on every start; at least 1.
    pub generation: Generation,
    /// A random number the process holding the host id chose when it
    /// started. Nonzero while `heartbeat_interval_ms` is.
    pub owner: u64,
    /// A counter the holding process raises every `heartbeat_interval_ms`.
    pub heartbeat: u64,
    /// How often `heartbeat` moves, in milliseconds; 0: no process holds
    /// the host id (it stopped cleanly, or never took a lease).
    pub heartbeat_interval_ms: u32,
    /// The newest SPM header `release_commit` this host has applied: every
    /// map of a volume it holds was refreshed from pool metadata at least
    /// that new. 0 at format.
    pub release_ack: u64,
}

impl InboxHeader {
    fn from_raw(raw: &raw::RawInboxHeader) -> Result<Self, Field> {
        require(raw.prefix.index.get() == 0, Field::Index)?;
        Ok(Self {
            domain: Uuid(raw.prefix.domain),
            host_id: HostId::new(raw.prefix.host_id.get()),
            generation: Generation::new(raw.generation.get()),
            owner: raw.owner.get(),
            heartbeat: raw.heartbeat.get(),
            heartbeat_interval_ms: raw.heartbeat_interval_ms.get(),
            release_ack: raw.release_ack.get(),
        })
    }

    fn raw(&self) -> raw::RawInboxHeader {
        raw::RawInboxHeader {
            prefix: prefix(Kind::InboxHeader, self.host_id.get(), 0, self.domain),
            generation: U64::new(self.generation.get()),
            owner: U64::new(self.owner),
            heartbeat: U64::new(self.heartbeat),
            heartbeat_interval_ms: U32::new(self.heartbeat_interval_ms),
            release_ack: U64::new(self.release_ack),
            reserved: [0; 60],
        }
    }

    fn check(&self) -> Result<(), Field> {
        check_host_record(self.domain, self.host_id.get(), 0, false)?;
        require(self.generation.get() >= 1, Field::Generation)?;
        if self.heartbeat_interval_ms != 0 {
            require(self.owner != 0, Field::Owner)?;
        }
        Ok(())
    }
}
codec!(
    InboxHeader,
    RawInboxHeader,
    Kind::InboxHeader,
    raw::reserved::INBOX_HEADER
);

// ---------------------------------------------------------------------------

/// An extension request (kind 5) in slot 1..=31 of a host's inbox area:
/// "make volume V at least `target_size` bytes". The target is absolute, so
/// applying a request twice changes nothing.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Request {
    /// The storage domain.
    pub domain: Uuid,
    /// The requesting host, 1..=2000.
    pub host_id: HostId,
    /// The slot, 1..=31.
    pub slot: Slot,
    /// The host's generation when it wrote the request.
    pub generation: Generation,
    /// The host's request sequence number, at least 1; a new request gets
    /// a new number, a resend keeps it.
    pub sequence: u64,
    /// The volume to extend.
    pub volume: Uuid,
    /// The size the volume must reach, in bytes: nonzero, a multiple of 512.
    pub target_size: u64,
    /// The volume's size as the host saw it when it asked (informational).
    pub current_size: u64,
    /// The guest is paused for lack of space: serve this request first.
    pub paused: bool,
}

impl Request {
    fn from_raw(raw: &raw::RawRequest) -> Result<Self, Field> {
        let flags = raw.flags.get();
        require(flags & !FLAG_PAUSED == 0, Field::Flags)?;
        let request = Self {
            domain: Uuid(raw.prefix.domain),
            host_id: HostId::new(raw.prefix.host_id.get()),
            slot: Slot::new(raw.prefix.index.get()),
            generation: Generation::new(raw.generation.get()),
            sequence: raw.sequence.get(),
            volume: Uuid(raw.volume),
            target_size: raw.target_size.get(),
            current_size: raw.current_size.get(),
            paused: flags & FLAG_PAUSED != 0,
        };
        Ok(request)
    }

    fn raw(&self) -> raw::RawRequest {
        raw::RawRequest {
            prefix: prefix(
                Kind::Request,
                self.host_id.get(),
                self.slot.get(),
                self.domain,
            ),
            generation: U64::new(self.generation.get()),
            sequence: U64::new(self.sequence),
            volume: self.volume.0,
            target_size: U64::new(self.target_size),
            current_size: U64::new(self.current_size),
            flags: U32::new(if self.paused { FLAG_PAUSED } else { 0 }),
            reserved: [0; 44],
        }
    }

    fn check(&self) -> Result<(), Field> {
        check_host_record(self.domain, self.host_id.get(), self.slot.get(), true)?;
        require(self.generation.get() >= 1, Field::Generation)?;
        require(self.sequence >= 1, Field::Sequence)?;
        require(!self.volume.is_nil(), Field::Volume)?;
        check_size(self.target_size, Field::TargetSize)
    }
}
codec!(Request, RawRequest, Kind::Request, raw::reserved::REQUEST);

// ---------------------------------------------------------------------------

/// A host's outbox area header (kind 6, record 0 of its outbox area),
/// written by the SPM when it starts serving a generation of the host.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct OutboxHeader {
    /// The storage domain.
    pub domain: Uuid,
    /// The host, 1..=2000.
    pub host_id: HostId,
    /// The epoch of the SPM that wrote the area last; at least 1.
    pub epoch: Epoch,
    /// The host generation the replies in this area answer; at least 1.
    pub generation: Generation,
}

impl OutboxHeader {
    fn from_raw(raw: &raw::RawOutboxHeader) -> Result<Self, Field> {
        require(raw.prefix.index.get() == 0, Field::Index)?;
        Ok(Self {
            domain: Uuid(raw.prefix.domain),
            host_id: HostId::new(raw.prefix.host_id.get()),
            epoch: Epoch::new(raw.epoch.get()),
            generation: Generation::new(raw.generation.get()),
        })
    }

    fn raw(&self) -> raw::RawOutboxHeader {
        raw::RawOutboxHeader {
            prefix: prefix(Kind::OutboxHeader, self.host_id.get(), 0, self.domain),
            epoch: U64::new(self.epoch.get()),
            generation: U64::new(self.generation.get()),
            reserved: [0; 80],
        }
    }

    fn check(&self) -> Result<(), Field> {
        check_host_record(self.domain, self.host_id.get(), 0, false)?;
        require(self.epoch.get() >= 1, Field::Epoch)?;
        require(self.generation.get() >= 1, Field::Generation)
    }
}
codec!(
    OutboxHeader,
    RawOutboxHeader,
    Kind::OutboxHeader,
    raw::reserved::OUTBOX_HEADER
);

// ---------------------------------------------------------------------------

/// Why the SPM refused a request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum RejectReason {
    /// The domain has no volume with that UUID.
    UnknownVolume = 1,
    /// The target is beyond the volume's virtual size plus format overhead.
    OverLimit = 2,
    /// The request is well-formed on disk but makes no sense (for example a
    /// target that is not a whole number of sectors for the backend).
    Malformed = 3,
    /// The volume's map has as many segments as the pool keeps per volume
    /// and the extension cannot be placed contiguously: the volume grows no
    /// further (until it is reduced or moved).
    SegmentsFull = 4,
}

impl RejectReason {
    /// The reason with this code, if any.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::UnknownVolume,
            2 => Self::OverLimit,
            3 => Self::Malformed,
            4 => Self::SegmentsFull,
            _ => return None,
        })
    }

    /// The name used in docs/format.md and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::UnknownVolume => "unknown_volume",
            Self::OverLimit => "over_limit",
            Self::Malformed => "malformed",
            Self::SegmentsFull => "segments_full",
        }
    }
}

/// What the SPM did with a request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ReplyStatus {
    /// The volume is now `size` bytes, at least the target. Final.
    Extended,
    /// The pool has no room; the request is parked and will be completed
    /// when capacity is added. Not final: a later reply replaces it.
    WaitingForSpace,
    /// The request will never be met. Final.
    Rejected(RejectReason),
    /// The backend failed (`code` is its error number, such as an errno).
    /// Final for this sequence number; the host may ask again.
    Failed {
        /// The backend's error number.
        code: u32,
    },
}

impl ReplyStatus {
    /// The status code stored at byte 88.
    pub fn code(self) -> u8 {
        match self {
            Self::Extended => 1,
            Self::WaitingForSpace => 2,
            Self::Rejected(_) => 3,
            Self::Failed { .. } => 4,
        }
    }

    /// The name used in docs/format.md and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Extended => "extended",
            Self::WaitingForSpace => "waiting_for_space",
            Self::Rejected(_) => "rejected",
            Self::Failed { .. } => "failed",
        }
    }

    /// Whether the host may forget the request on seeing this status.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::WaitingForSpace)
    }
}

/// A reply (kind 7) in slot 1..=31 of a host's outbox area, answering the
/// request in the same slot of the host's inbox area. It echoes the
/// request's generation, sequence, volume and target so the host can match
/// it strictly, and carries the SPM's epoch.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Reply {
    /// The storage domain.
    pub domain: Uuid,
    /// The host the reply is for, 1..=2000.
    pub host_id: HostId,
    /// The slot, 1..=31, the same as the request's.
    pub slot: Slot,
    /// The request's generation.
    pub generation: Generation,
    /// The request's sequence number.
    pub sequence: u64,
    /// The request's volume.
    pub volume: Uuid,
    /// The request's target size.
    pub target_size: u64,
    /// The volume's size after the SPM acted (at least `target_size` when
    /// extended), in bytes; 0 if unknown.
    pub size: u64,
    /// The epoch of the SPM that wrote the reply; at least 1.
    pub epoch: Epoch,
    /// What the SPM did.
    pub status: ReplyStatus,
}

impl Reply {
    fn from_raw(raw: &raw::RawReply) -> Result<Self, Field> {
        let status = match (raw.status, raw.reason) {
            (1, 0) => ReplyStatus::Extended,
            (2, 0) => ReplyStatus::WaitingForSpace,
            (3, reason) => {
                ReplyStatus::Rejected(RejectReason::from_code(reason).ok_or(Field::Reason)?)
            }
            (4, 0) => ReplyStatus::Failed {
                code: raw.detail.get(),
            },
            (1..=4, _) => return Err(Field::Reason),
            _ => return Err(Field::Status),
        };
        if !matches!(status, ReplyStatus::Failed { .. }) && raw.detail.get() != 0 {
            return Err(Field::Detail);
        }
        Ok(Self {
            domain: Uuid(raw.prefix.domain),
            host_id: HostId::new(raw.prefix.host_id.get()),
            slot: Slot::new(raw.prefix.index.get()),
            generation: Generation::new(raw.generation.get()),
            sequence: raw.sequence.get(),
            volume: Uuid(raw.volume),
            target_size: raw.target_size.get(),
            size: raw.size.get(),
            epoch: Epoch::new(raw.epoch.get()),
            status,
        })
    }

    fn raw(&self) -> raw::RawReply {
        let (reason, detail) = match self.status {
            ReplyStatus::Rejected(reason) => (reason as u8, 0),
            ReplyStatus::Failed { code } => (0, code),
            ReplyStatus::Extended | ReplyStatus::WaitingForSpace => (0, 0),
        };
        raw::RawReply {
            prefix: prefix(
                Kind::Reply,
                self.host_id.get(),
                self.slot.get(),
                self.domain,
            ),
            generation: U64::new(self.generation.get()),
            sequence: U64::new(self.sequence),
            volume: self.volume.0,
            target_size: U64::new(self.target_size),
            size: U64::new(self.size),
            epoch: U64::new(self.epoch.get()),
            status: self.status.code(),
            reason,
            reserved0: [0; 2],
            detail: U32::new(detail),
            reserved: [0; 32],
        }
    }

    fn check(&self) -> Result<(), Field> {
        check_host_record(self.domain, self.host_id.get(), self.slot.get(), true)?;
        require(self.generation.get() >= 1, Field::Generation)?;
        require(self.sequence >= 1, Field::Sequence)?;
        require(!self.volume.is_nil(), Field::Volume)?;
        check_size(self.target_size, Field::TargetSize)?;
        require(self.epoch.get() >= 1, Field::Epoch)?;
        if self.status == ReplyStatus::Extended {
            require(self.size >= self.target_size, Field::Size)?;
        }
        Ok(())
    }

    /// The reply to `request` with `status`, the volume's `size` and the
    /// SPM's `epoch`: it echoes everything [`Reply::answers`] compares.
    pub fn answering(request: &Request, status: ReplyStatus, size: u64, epoch: Epoch) -> Reply {
        Reply {
            domain: request.domain,
            host_id: request.host_id,
            slot: request.slot,
            generation: request.generation,
            sequence: request.sequence,
            volume: request.volume,
            target_size: request.target_size,
            size,
            epoch,
            status,
        }
    }

    /// Whether this reply answers `request` (same host, slot, generation,
    /// sequence, volume and target). Epoch ordering is the caller's: a host
    /// also ignores replies older than the newest epoch it has seen.
    pub fn answers(&self, request: &Request) -> bool {
        self.domain == request.domain
            && self.host_id == request.host_id
            && self.slot == request.slot
            && self.generation == request.generation
            && self.sequence == request.sequence
            && self.volume == request.volume
            && self.target_size == request.target_size
    }
}
codec!(Reply, RawReply, Kind::Reply, raw::reserved::REPLY);

// ---------------------------------------------------------------------------

/// A hold record (kind 8) in slot 1..=31 of a host's inbox area: volumes
/// the host holds open (it may read or write through their maps). A host
/// lists every volume it holds in hold records of its current generation;
/// an SPM that releases extents learns from them which volumes live hosts
/// hold. A hold of another generation than the inbox header's counts for
/// nothing.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Hold {
    /// The storage domain.
    pub domain: Uuid,
    /// The host, 1..=2000.
    pub host_id: HostId,
    /// The slot, 1..=31.
    pub slot: Slot,
    /// The host's generation when it wrote the record; at least 1.
    pub generation: Generation,
    /// How many of `volumes` are listed, 1..=[`HOLD_VOLUMES`].
    pub count: u8,
    /// The volumes held: the first `count` are non-nil and differ from
    /// each other; the rest are nil.
    pub volumes: [Uuid; HOLD_VOLUMES],
}

impl Hold {
    /// A hold record listing `held` (1..=[`HOLD_VOLUMES`] volumes; more
    /// are left out, and none gives a record that does not encode).
    pub fn listing(
        domain: Uuid,
        host_id: HostId,
        slot: Slot,
        generation: Generation,
        held: &[Uuid],
    ) -> Hold {
        let mut volumes = [Uuid::NIL; HOLD_VOLUMES];
        for (to, from) in volumes.iter_mut().zip(held) {
            *to = *from;
        }
        let count = u8::try_from(held.len().min(HOLD_VOLUMES)).unwrap_or(0);
        Hold {
            domain,
            host_id,
            slot,
            generation,
            count,
            volumes,
        }
    }

    /// The volumes listed: the first `count`.
    pub fn held(&self) -> &[Uuid] {
        let n = usize::from(self.count).min(HOLD_VOLUMES);
        self.volumes.get(..n).unwrap_or(&[])
    }

    fn from_raw(raw: &raw::RawHold) -> Result<Self, Field> {
        let mut volumes = [Uuid::NIL; HOLD_VOLUMES];
        for (to, from) in volumes.iter_mut().zip(raw.volumes.iter()) {
            *to = Uuid(*from);
        }
        Ok(Self {
            domain: Uuid(raw.prefix.domain),
            host_id: HostId::new(raw.prefix.host_id.get()),
            slot: Slot::new(raw.prefix.index.get()),
            generation: Generation::new(raw.generation.get()),
            count: raw.count,
            volumes,
        })
    }

    fn raw(&self) -> raw::RawHold {
        let mut volumes = [[0u8; 16]; HOLD_VOLUMES];
        for (to, from) in volumes.iter_mut().zip(self.volumes.iter()) {
            *to = from.0;
        }
        raw::RawHold {
            prefix: prefix(Kind::Hold, self.host_id.get(), self.slot.get(), self.domain),
            generation: U64::new(self.generation.get()),
            count: self.count,
            reserved0: [0; 7],
            volumes,
            reserved: [0; 16],
        }
    }

    fn check(&self) -> Result<(), Field> {
        check_host_record(self.domain, self.host_id.get(), self.slot.get(), true)?;
        require(self.generation.get() >= 1, Field::Generation)?;
        let count = usize::from(self.count);
        require((1..=HOLD_VOLUMES).contains(&count), Field::Count)?;
        for (i, v) in self.volumes.iter().enumerate() {
            if i < count {
                require(!v.is_nil(), Field::Volumes)?;
                let earlier = self.volumes.get(..i).unwrap_or(&[]);
                require(!earlier.contains(v), Field::Volumes)?;
            } else {
                require(v.is_nil(), Field::Volumes)?;
            }
        }
        Ok(())
    }
}
codec!(Hold, RawHold, Kind::Hold, raw::reserved::HOLD);

// ---------------------------------------------------------------------------

/// Any record, as [`Record::decode`] finds it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[allow(missing_docs)] // each variant holds the record of the same name
pub enum Record {
    Superblock(Superblock),
    SpmHeader(SpmHeader),
    Doorbell(Doorbell),
    InboxHeader(InboxHeader),
    Request(Request),
    OutboxHeader(OutboxHeader),
    Reply(Reply),
    Hold(Hold),
}

impl Record {
    /// Decodes a record of any kind, without checking where it was read
    /// from. `Ok(None)`: all zero (empty).
    pub fn decode(bytes: &[u8]) -> Result<Option<Record>, Defect> {
        Self::decode_at(bytes, None)
    }

    /// Decodes a record of any kind and checks that it belongs at `at`.
    /// The kind is not checked: use the typed `parse` for that.
    pub fn parse(bytes: &[u8], at: &Location) -> Result<Option<Record>, Defect> {
        Self::decode_at(bytes, Some(at))
    }

    fn decode_at(bytes: &[u8], at: Option<&Location>) -> Result<Option<Record>, Defect> {
        let Some((_, kind)) = open(bytes)? else {
            return Ok(None);
        };
        Ok(match kind {
            Kind::Superblock => Superblock::decode_at(bytes, at)?.map(Record::Superblock),
            Kind::SpmHeader => SpmHeader::decode_at(bytes, at)?.map(Record::SpmHeader),
            Kind::Doorbell => Doorbell::decode_at(bytes, at)?.map(Record::Doorbell),
            Kind::InboxHeader => InboxHeader::decode_at(bytes, at)?.map(Record::InboxHeader),
            Kind::Request => Request::decode_at(bytes, at)?.map(Record::Request),
            Kind::OutboxHeader => OutboxHeader::decode_at(bytes, at)?.map(Record::OutboxHeader),
            Kind::Reply => Reply::decode_at(bytes, at)?.map(Record::Reply),
            Kind::Hold => Hold::decode_at(bytes, at)?.map(Record::Hold),
        })
    }

    /// The record's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Record::Superblock(_) => Kind::Superblock,
            Record::SpmHeader(_) => Kind::SpmHeader,
            Record::Doorbell(_) => Kind::Doorbell,
            Record::InboxHeader(_) => Kind::InboxHeader,
            Record::Request(_) => Kind::Request,
            Record::OutboxHeader(_) => Kind::OutboxHeader,
            Record::Reply(_) => Kind::Reply,
            Record::Hold(_) => Kind::Hold,
        }
    }

    /// Writes the record; see the typed `emit`.
    pub fn emit(&self, buf: &mut [u8; RECORD_LEN]) -> Result<(), Field> {
        match self {
            Record::Superblock(r) => r.emit(buf),
            Record::SpmHeader(r) => r.emit(buf),
            Record::Doorbell(r) => r.emit(buf),
            Record::InboxHeader(r) => r.emit(buf),
            Record::Request(r) => r.emit(buf),
            Record::OutboxHeader(r) => r.emit(buf),
            Record::Reply(r) => r.emit(buf),
            Record::Hold(r) => r.emit(buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Geometry;

    const DOMAIN: Uuid = Uuid([
        0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd,
        0xef,
    ]);
    const VOLUME: Uuid = Uuid([
        0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32, 0x10, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32,
        0x10,
    ]);

    /// A request of host 7, slot 3, built by hand from docs/format.md
    /// (CRC computed independently of this crate).
    static REQUEST_BYTES: [u8; RECORD_LEN] = [
        0x16, 0xfa, 0xf2, 0x95, 0x53, 0x50, 0x4d, 0x42, 0x05, 0x04, 0x07, 0x00, 0x03, 0x00, 0x00,
        0x00, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
        0xcd, 0xef, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x09, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32, 0x10, 0xfe, 0xdc, 0xba, 0x98,
        0x76, 0x54, 0x32, 0x10, 0x00, 0x00, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x40, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    fn request() -> Request {
        Request {
            domain: DOMAIN,
            host_id: HostId::new(7),
            slot: Slot::new(3),
            generation: Generation::new(2),
            sequence: 9,
            volume: VOLUME,
            target_size: 2 << 30,
            current_size: 1 << 30,
            paused: true,
        }
    }

    fn at(host_id: u16, index: u16) -> Location {
        Location {
            domain: DOMAIN,
            host_id: HostId::new(host_id),
            index,
        }
    }

    /// Re-seals a modified record so that only the intended change is
    /// tested, not the checksum.
    fn resealed(mut bytes: [u8; RECORD_LEN]) -> [u8; RECORD_LEN] {
        let copy = bytes;
        seal(&copy, &mut bytes);
        bytes
    }

    #[test]
    fn request_fixture_deconstructs_to_its_fields() {
        assert_eq!(Request::decode(&REQUEST_BYTES), Ok(Some(request())));
        assert_eq!(
            Request::parse(&REQUEST_BYTES, &at(7, 3)),
            Ok(Some(request()))
        );
    }

    #[test]
    fn request_constructs_to_the_fixture() {
        assert_eq!(request().to_bytes(), Ok(REQUEST_BYTES));
    }

    #[test]
    fn crc32c_has_its_standard_check_value() {
        assert_eq!(CRC32C.checksum(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn all_zero_record_is_empty_for_every_kind() {
        let zero = [0u8; RECORD_LEN];
        assert_eq!(Record::decode(&zero), Ok(None));
        assert_eq!(Request::decode(&zero), Ok(None));
        assert_eq!(Superblock::decode(&zero), Ok(None));
        assert_eq!(Reply::parse(&zero, &at(1, 1)), Ok(None));
    }

    #[test]
    fn wrong_length_is_a_defect_not_a_panic() {
        assert_eq!(
            Request::decode(&REQUEST_BYTES[..127]),
            Err(Defect::Length { len: 127 })
        );
        assert_eq!(Record::decode(&[]), Err(Defect::Length { len: 0 }));
        assert_eq!(Record::decode(&[0; 129]), Err(Defect::Length { len: 129 }));
    }

    #[test]
    fn every_single_byte_change_is_detected() {
        for i in 0..RECORD_LEN {
            for delta in [1u8, 0x80, 0xff] {
                let mut bytes = REQUEST_BYTES;
                bytes[i] ^= delta;
                let got = Request::decode(&bytes);
                assert!(got.is_err(), "byte {i} ^ {delta:#x} decoded as {got:?}");
            }
        }
    }

    #[test]
    fn checks_run_in_the_documented_order() {
        // Bad magic wins over a bad checksum.
        let mut bytes = REQUEST_BYTES;
        bytes[4] = b'X';
        assert_eq!(Request::decode(&bytes), Err(Defect::BadMagic));
        // A checksum mismatch is reported with both values.
        let mut bytes = REQUEST_BYTES;
        bytes[100] = 1;
        assert!(matches!(
            Request::decode(&bytes),
            Err(Defect::Checksum {
                stored: 0x95f2_fa16,
                ..
            })
        ));
        // Version before kind.
        let mut bytes = REQUEST_BYTES;
        bytes[8] = 99;
        bytes[9] = 3;
        assert_eq!(
            Request::decode(&resealed(bytes)),
            Err(Defect::UnsupportedVersion { version: 3 })
        );
        bytes[9] = 4;
        assert_eq!(
            Request::decode(&resealed(bytes)),
            Err(Defect::UnknownKind { code: 99 })
        );
    }

    #[test]
    fn a_record_of_another_kind_is_wrong_kind() {
        assert_eq!(
            Reply::decode(&REQUEST_BYTES),
            Err(Defect::WrongKind {
                expected: Kind::Reply,
                found: Kind::Request
            })
        );
    }

    #[test]
    fn a_record_of_another_domain_is_foreign() {
        let other = Uuid([9; 16]);
        let at_other = Location {
            domain: other,
            host_id: HostId::new(7),
            index: 3,
        };
        assert_eq!(
            Request::parse(&REQUEST_BYTES, &at_other),
            Err(Defect::Foreign { domain: DOMAIN })
        );
    }

    #[test]
    fn a_record_read_from_another_place_is_misdirected() {
        let expected = Err(Defect::Misdirected {
            host_id: HostId::new(7),
            index: 3,
        });
        assert_eq!(Request::parse(&REQUEST_BYTES, &at(8, 3)), expected);
        assert_eq!(Request::parse(&REQUEST_BYTES, &at(7, 4)), expected);
    }

    #[test]
    fn nonzero_reserved_bytes_are_reported_with_their_offset() {
        for offset in [14usize, 15, 84, 127] {
            let mut bytes = REQUEST_BYTES;
            bytes[offset] = 0x5a;
            let expected = Err(Defect::ReservedNotZero {
                offset: offset as u8,
            });
            assert_eq!(
                Request::decode(&resealed(bytes)),
                expected,
                "offset {offset}"
            );
        }
    }

    #[test]
    fn request_field_rules() {
        type Change = fn(&mut Request);
        let cases: [(Change, Field); 6] = [
            (|r| r.target_size = 0, Field::TargetSize),
            (|r| r.target_size = 1000, Field::TargetSize),
            (|r| r.generation = Generation::new(0), Field::Generation),
            (|r| r.sequence = 0, Field::Sequence),
            (|r| r.volume = Uuid::NIL, Field::Volume),
            (|r| r.slot = Slot::new(32), Field::Index),
        ];
        for (change, field) in cases {
            let mut r = request();
            change(&mut r);
            assert_eq!(r.to_bytes(), Err(field), "emit must refuse {field}");
            // The decoder refuses the same value when it is on disk.
            let mut raw: [u8; RECORD_LEN] = zerocopy::transmute!(r.raw());
            raw = resealed(raw);
            assert_eq!(Request::decode(&raw), Err(Defect::InvalidField { field }));
        }
        let mut bytes = REQUEST_BYTES;
        bytes[80] = 0b11;
        assert_eq!(
            Request::decode(&resealed(bytes)),
            Err(Defect::InvalidField {
                field: Field::Flags
            })
        );
    }

    #[test]
    fn emit_leaves_the_buffer_untouched_when_it_refuses() {
        let mut buf = [0xa5; RECORD_LEN];
        let mut r = request();
        r.volume = Uuid::NIL;
        assert_eq!(r.emit(&mut buf), Err(Field::Volume));
        assert_eq!(buf, [0xa5; RECORD_LEN]);
    }

    fn reply(status: ReplyStatus, size: u64) -> Reply {
        Reply::answering(&request(), status, size, Epoch::new(4))
    }

    #[test]
    fn every_reply_status_round_trips_and_answers_its_request() {
        let statuses = [
            ReplyStatus::Extended,
            ReplyStatus::WaitingForSpace,
            ReplyStatus::Rejected(RejectReason::UnknownVolume),
            ReplyStatus::Rejected(RejectReason::OverLimit),
            ReplyStatus::Rejected(RejectReason::Malformed),
            ReplyStatus::Rejected(RejectReason::SegmentsFull),
            ReplyStatus::Failed { code: 28 },
        ];
        for status in statuses {
            let r = reply(status, 3 << 30);
            let bytes = r.to_bytes().unwrap();
            assert_eq!(Reply::parse(&bytes, &at(7, 3)), Ok(Some(r)));
            assert!(r.answers(&request()));
            assert_eq!(status.is_final(), status != ReplyStatus::WaitingForSpace);
        }
    }

    #[test]
    fn a_reply_for_another_sequence_does_not_answer() {
        let mut r = reply(ReplyStatus::Extended, 2 << 30);
        r.sequence += 1;
        assert!(!r.answers(&request()));
    }

    #[test]
    fn extended_reply_must_reach_the_target() {
        let r = reply(ReplyStatus::Extended, (2 << 30) - 512);
        assert_eq!(r.to_bytes(), Err(Field::Size));
    }

    #[test]
    fn reply_reason_and_detail_must_fit_the_status() {
        let good = reply(ReplyStatus::Extended, 2 << 30).to_bytes().unwrap();
        let mut bytes = good;
        bytes[89] = 1; // a reason on an extended reply
        assert_eq!(
            Reply::decode(&resealed(bytes)),
            Err(Defect::InvalidField {
                field: Field::Reason
            })
        );
        let mut bytes = good;
        bytes[92] = 7; // a detail on an extended reply
        assert_eq!(
            Reply::decode(&resealed(bytes)),
            Err(Defect::InvalidField {
                field: Field::Detail
            })
        );
        let mut bytes = good;
        bytes[88] = 5;
        assert_eq!(
            Reply::decode(&resealed(bytes)),
            Err(Defect::InvalidField {
                field: Field::Status
            })
        );
        let mut bytes = good;
        bytes[88] = 3;
        bytes[89] = 5; // rejected with an unknown reason
        assert_eq!(
            Reply::decode(&resealed(bytes)),
            Err(Defect::InvalidField {
                field: Field::Reason
            })
        );
    }

    #[test]
    fn superblock_round_trips_and_checks_derived_fields() {
        let sb = Superblock {
            domain: DOMAIN,
            geometry: Geometry::new(2000, 4096).unwrap(),
        };
        let bytes = sb.to_bytes().unwrap();
        assert_eq!(Superblock::decode(&bytes), Ok(Some(sb)));
        assert_eq!(&bytes[32..36], &4096u32.to_le_bytes());
        assert_eq!(&bytes[64..72], &16_449_536u64.to_le_bytes());
        for (offset, field) in [
            (38, Field::SlotsPerArea),
            (40, Field::AreaSize),
            (44, Field::RecordSize),
            (48, Field::InboxOffset),
            (56, Field::OutboxOffset),
            (64, Field::MailboxSize),
        ] {
            let mut changed = bytes;
            changed[offset] ^= 1;
            assert_eq!(
                Superblock::decode(&resealed(changed)),
                Err(Defect::InvalidField { field }),
                "offset {offset}"
            );
        }
        let mut changed = bytes;
        changed[33] = 0x04; // sector size 1024: neither 512 nor 4096
        assert_eq!(
            Superblock::decode(&resealed(changed)),
            Err(Defect::InvalidField {
                field: Field::SectorSize
            })
        );
    }

    #[test]
    fn spm_header_rules() {
        let mut h = SpmHeader {
            domain: DOMAIN,
            epoch: Epoch::ZERO,
            spm_id: HostId::NONE,
            state: SpmState::Vacant,
            heartbeat_interval_ms: 0,
            heartbeat: 0,
            owner: 7,
            pool_commit: 0,
            release_commit: 0,
        };
        assert_eq!(SpmHeader::decode(&h.to_bytes().unwrap()), Ok(Some(h)));
        h.state = SpmState::Active;
        assert_eq!(h.to_bytes(), Err(Field::Epoch));
        h.epoch = Epoch::new(3);
        assert_eq!(h.to_bytes(), Err(Field::HeartbeatIntervalMs));
        h.heartbeat_interval_ms = 100;
        assert_eq!(SpmHeader::decode(&h.to_bytes().unwrap()), Ok(Some(h)));
        h.spm_id = HostId::new(2001);
        assert_eq!(h.to_bytes(), Err(Field::SpmId));
    }

    #[test]
    fn doorbell_and_headers_round_trip() {
        let d = Doorbell {
            domain: DOMAIN,
            ringer: HostId::new(2000),
            generation: Generation::new(1),
            sequence: 1,
            rings: 65535,
        };
        assert_eq!(
            Doorbell::parse(&d.to_bytes().unwrap(), &at(0, 0)),
            Ok(Some(d))
        );
        let i = InboxHeader {
            domain: DOMAIN,
            host_id: HostId::new(5),
            generation: Generation::new(3),
            owner: 0,
            heartbeat: 0,
            heartbeat_interval_ms: 0,
            release_ack: 0,
        };
        assert_eq!(
            InboxHeader::parse(&i.to_bytes().unwrap(), &at(5, 0)),
            Ok(Some(i))
        );
        let o = OutboxHeader {
            domain: DOMAIN,
            host_id: HostId::new(5),
            epoch: Epoch::new(2),
            generation: Generation::new(3),
        };
        assert_eq!(
            OutboxHeader::parse(&o.to_bytes().unwrap(), &at(5, 0)),
            Ok(Some(o))
        );
        assert_eq!(
            Doorbell {
                ringer: HostId::NONE,
                ..d
            }
            .to_bytes(),
            Err(Field::Ringer)
        );
        assert_eq!(
            InboxHeader {
                host_id: HostId::NONE,
                ..i
            }
            .to_bytes(),
            Err(Field::HostId)
        );
    }

    #[test]
    fn record_decode_agrees_with_the_typed_decoders() {
        let r = request();
        assert_eq!(Record::decode(&REQUEST_BYTES), Ok(Some(Record::Request(r))));
        let mut buf = [0; RECORD_LEN];
        Record::Request(r).emit(&mut buf).unwrap();
        assert_eq!(buf, REQUEST_BYTES);
        assert_eq!(Record::Request(r).kind(), Kind::Request);
    }

    fn hold() -> Hold {
        Hold::listing(
            DOMAIN,
            HostId::new(7),
            Slot::new(31),
            Generation::new(2),
            &[VOLUME, Uuid([0x33; 16])],
        )
    }

    #[test]
    fn hold_round_trips_and_lists_its_volumes() {
        let h = hold();
        let bytes = h.to_bytes().unwrap();
        assert_eq!(Hold::parse(&bytes, &at(7, 31)), Ok(Some(h)));
        assert_eq!(Record::decode(&bytes), Ok(Some(Record::Hold(h))));
        assert_eq!(h.held(), &[VOLUME, Uuid([0x33; 16])]);
        assert_eq!(bytes[8], 8);
        assert_eq!(bytes[40], 2);
        assert_eq!(&bytes[48..64], &VOLUME.0);
        assert!(bytes[80..128].iter().all(|&b| b == 0));
        let full = Hold::listing(
            DOMAIN,
            HostId::new(7),
            Slot::new(1),
            Generation::new(1),
            &[
                Uuid([1; 16]),
                Uuid([2; 16]),
                Uuid([3; 16]),
                Uuid([4; 16]),
                Uuid([5; 16]),
            ],
        );
        assert_eq!(full.count, 4);
        assert!(Hold::decode(&full.to_bytes().unwrap()).is_ok());
    }

    #[test]
    fn hold_field_rules() {
        type Change = fn(&mut Hold);
        let cases: [(Change, Field); 7] = [
            (|h| h.count = 0, Field::Count),
            (|h| h.count = 5, Field::Count),
            (|h| h.volumes[1] = Uuid::NIL, Field::Volumes),
            (|h| h.volumes[1] = h.volumes[0], Field::Volumes),
            (|h| h.volumes[3] = Uuid([9; 16]), Field::Volumes),
            (|h| h.generation = Generation::new(0), Field::Generation),
            (|h| h.slot = Slot::new(0), Field::Index),
        ];
        for (change, field) in cases {
            let mut h = hold();
            change(&mut h);
            assert_eq!(h.to_bytes(), Err(field), "emit must refuse {field}");
            let raw: [u8; RECORD_LEN] = zerocopy::transmute!(h.raw());
            assert_eq!(
                Hold::decode(&resealed(raw)),
                Err(Defect::InvalidField { field })
            );
        }
        for offset in [41usize, 47, 112, 127] {
            let mut bytes = hold().to_bytes().unwrap();
            bytes[offset] = 1;
            assert_eq!(
                Hold::decode(&resealed(bytes)),
                Err(Defect::ReservedNotZero {
                    offset: offset as u8
                })
            );
        }
    }

    #[test]
    fn the_new_header_fields_sit_where_the_format_says() {
        let h = SpmHeader {
            release_commit: 0x0102_0304_0506_0708,
            ..SpmHeader::vacant(DOMAIN, Epoch::new(1))
        };
        let bytes = h.to_bytes().unwrap();
        assert_eq!(&bytes[72..80], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(SpmHeader::decode(&bytes), Ok(Some(h)));
        let i = InboxHeader {
            domain: DOMAIN,
            host_id: HostId::new(5),
            generation: Generation::new(3),
            owner: 0,
            heartbeat: 0,
            heartbeat_interval_ms: 0,
            release_ack: 77,
        };
        let bytes = i.to_bytes().unwrap();
        assert_eq!(&bytes[60..68], &77u64.to_le_bytes());
        assert_eq!(InboxHeader::decode(&bytes), Ok(Some(i)));
    }
}
