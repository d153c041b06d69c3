//! The reference thin pool: LUNs cut into extents, thin logical volumes
//! that grow by whole extents, requests parked until capacity arrives, and
//! crash-safe metadata.
//!
//! Sans-I/O like the rest of the crate: the pool is plain memory. The caller
//! persists it with [`Pool::encode`] and reads it back with
//! [`Pool::decode`]; it never touches a device itself.
//!
//! # The model
//!
//! A *volume group* is a list of LUNs (physical volumes), each cut into
//! extents of [`Pool::extent_size`] bytes (a power of two, at least
//! [`MIN_EXTENT_SIZE`]; [`DEFAULT_EXTENT_SIZE`] is 128 MiB, as in oVirt
//! block storage domains). A *thin logical volume* (LV) has a virtual size
//! (what the guest sees) and a physical size (the extents it owns), which
//! only grows, by whole extents, up to its limit [`max_size`]: the virtual
//! size plus an allowance for the image format's (qcow2's) metadata.
//! An LV's extents are a list of [`Segment`]s, runs of consecutive extents
//! on one LUN; byte `o` of the LV lives where [`Pool::map`] says.
//!
//! # Allocation rule
//!
//! Every extent of a LUN is *held* (in a segment), *released* (taken from
//! an LV by [`Pool::delete_volume`], [`Pool::reduce_volume`] or
//! [`Pool::relocate`], not reusable yet) or *free*. Every LUN has a
//! *high-water mark* ([`Lun::used`]): extents at or above it never
//! belonged to any LV. *Free runs* are the maximal runs of free extents on
//! LUNs that are not draining ([`Pool::set_draining`]), preferred larger
//! first, then by lower LUN index, then by lower first extent. To give an
//! LV `need` more extents (docs/pool-format.md section 6.3):
//!
//! 1. if the free runs hold fewer than `need` extents, park (nothing
//!    changes);
//! 2. grow in place: if a free run starts right after the LV's last
//!    segment, the segment grows into it as far as needed;
//! 3. for the rest, if the preferred free run (not the one grown into)
//!    holds it, one new segment there: at the run's start, or, when the
//!    extent before the run ends some LV's last segment (that LV would grow
//!    into it), `min(len / 2, len - rest)` extents into it, so that LVs
//!    growing at the same time leave each other room;
//! 4. else whole free runs in order of preference, the last one partly;
//! 5. all or nothing: if the LV would have more than `SEGS` segments,
//!    [`PoolError::SegmentsFull`] and nothing changes. A new segment that
//!    continues the LV's last one is merged into it.
//!
//! Free runs are the gaps between the segments and released runs, found
//! through an index of every segment in order of LUN and first extent (4
//! bytes per segment slot, 128 KiB for a [`DefaultPool`]): an extension
//! costs O(S) for S segments, plus O(S) per new segment (about 0.25 ms
//! with 32 000 segments on a PC); deleting, reducing, relocating and
//! dropping a LUN rebuild the index, O(S log S).
//!
//! # Releasing and reclaiming
//!
//! Released extents are not free: a host may still write through an old
//! map. The pool keeps the runs it released, in memory, with the sequence
//! number of the commit that wrote the release: [`Pool::encode`] writes
//! `release_seq` = its own `seq` when it carries releases not stamped yet
//! ([`Pool::release_seq_for`]), and the caller calls
//! [`Pool::stamp_released`] with that `seq` once the commit is durable.
//! [`Pool::reclaim`]`(acked)` frees every run released at a sequence at
//! most `acked` (the least acknowledgement of the live hosts) and serves
//! parked requests. After [`Pool::decode`], every free-looking extent below
//! a LUN's high-water mark counts as released at the copy's `release_seq`
//! (the *floor*), when that is not 0. At most [`MAX_RELEASED_RUNS`] runs
//! are kept one by one; one more folds them all into the floor, released
//! at the next commit.
//!
//! # Parking and priority
//!
//! [`Pool::extend`] takes an absolute target size, so asking twice changes
//! nothing. When the pool lacks the free extents for a request, nothing is
//! allocated and the request is *parked* (one entry per LV: a second park
//! keeps the larger target and ORs the urgency; the entry keeps its place).
//! [`Pool::add_lun`] then serves parked requests in this order:
//!
//! 1. urgent ones (their guests are paused) before the others;
//! 2. within each group, in the order they were first parked (FIFO);
//! 3. each fully or not at all, and **strictly in that order**: serving
//!    stops at the first request that still does not fit, even if a later,
//!    smaller one would. A large urgent request is thereby never starved by
//!    a stream of small ones; the price is that the smaller ones wait for
//!    the same capacity.
//!
//! The parked list is ordered only against itself: a *new* request that
//! fits the free extents now is served at once, even while others are
//! parked, since parked requests wait for capacity that only a new LUN
//! brings and holding back one that fits would pause a guest for nothing.
//! If such a direct extension satisfies the LV's own parked request, that
//! request completes at once.
//!
//! The parked list never asks for more than the mailbox does. A parked
//! entry stands for requests that wait in hosts' mailbox slots; when a
//! host withdraws one (it restarted and emptied the slot, or asks for
//! less under a new generation), the SPM engine notices at its next read
//! of that host and the caller passes what still waits to
//! [`Pool::withdraw_parked`]: an entry nobody waits for is removed, one
//! that now asks for less is lowered (it keeps its place; its urgency
//! stays only if a waiting guest is still paused). Capacity added later
//! therefore serves exactly what a restarted SPM, which rebuilds the
//! parked list from the mailbox, would serve. The strict order above
//! holds among what still waits: a withdrawn large request stops holding
//! back smaller ones.
//!
//! [`Pool::reclaim`] and the end of a drain serve parked requests the same
//! way.
//!
//! Every request that leaves the parked list does so as a [`Completion`],
//! taken with [`Pool::poll_completed`]. A parked request occupies one of
//! `PARKED` places from the moment it is parked until its completion is
//! polled, so the completion queue can never overflow; when all places are
//! taken, [`Pool::extend`] returns [`PoolError::ParkedFull`] and the
//! caller retries later (the mailbox still holds the request: nothing is
//! lost).
//!
//! # Metadata
//!
//! The pool's state (LUNs, LVs and their segments; not the parked list,
//! which the SPM rebuilds from the mailbox) is stored in two *copies*, A
//! (index 0) and B (index 1), each at most [`METADATA_COPY_SIZE`] bytes
//! (for [`DefaultPool`]; [`Pool::MAX_COPY_LEN`] in general):
//!
//! ```text
//!  0       4       8   9             16              24      28      32
//!  +-------+-------+---+-------------+---------------+-------+-------+
//!  | crc32c| "SPMP"|ver| reserved (0)|      seq      |pay_len| rsv(0)|
//!  +-------+-------+---+-------------+---------------+-------+-------+
//!  32              40              48                                64
//!  +---------------+---------------+---------------------------------+
//!  |  extent_size  |  release_seq  |             moving              |
//!  +---------------+---------------+---------------------------------+
//!  64                                               64 + payload_len
//!  +--------------------------------------------------+
//!  |        payload: postcard-encoded LUNs and LVs     |
//!  +--------------------------------------------------+
//! ```
//!
//! | offset | size | field | value |
//! |---|---|---|---|
//! | 0 | 4 | `crc` | CRC32C of bytes 4..64 followed by the payload |
//! | 4 | 4 | `magic` | ASCII `SPMP` ([`METADATA_MAGIC`]) |
//! | 8 | 1 | `version` | 3 ([`METADATA_VERSION`]); versions 1 and 2 are read with the fields they lack zero |
//! | 9 | 7 | reserved | zero |
//! | 16 | 8 | `seq` | commit sequence number; even in copy A, odd in copy B |
//! | 24 | 4 | `payload_len` | bytes of payload after the header |
//! | 28 | 4 | reserved | zero |
//! | 32 | 8 | `extent_size` | bytes per extent |
//! | 40 | 8 | `release_seq` | the newest commit that released extents, 0 if none (reserved, zero, in version 1) |
//! | 48 | 16 | `moving` | the UUID of the volume being moved to other extents, nil if none (reserved, zero, in versions 1 and 2) |
//!
//! All integers are little-endian. The payload is [postcard]: varints for
//! integers (each in its shortest form: a payload with a longer one is
//! refused, so that every reader, whatever its word size, reads a copy the
//! same way), a varint length before each list, UUIDs as 16 raw bytes
//! (docs/pool-format.md gives it byte for byte):
//!
//! ```text
//!  payload = varint(#luns)    { uuid[16] varint(extents) varint(used) }      LUN order
//!            varint(#volumes) { uuid[16] varint(virtual_size)                ascending uuid
//!                               varint(#segments) { varint(lun) varint(first_extent) varint(extents) } }
//! ```
//!
//! Bytes after `64 + payload_len` are not part of the copy ([`Pool::encode`]
//! zeroes them).
//!
//! ## Writer protocol
//!
//! - The copies lie on the domain's device right after the mailbox, from
//!   [`metadata_offset`] on (A, then B); [`commit_place`] says where a
//!   commit goes and how many bytes of it to write.
//! - A commit of sequence number `seq` goes to copy [`next_copy`]`(seq)`,
//!   that is `seq % 2`: every commit overwrites the copy holding the *older*
//!   state, so a commit torn by a crash leaves the previous state intact in
//!   the other copy.
//! - A new pool is formatted by writing `seq` 0 to copy A and zeroing copy
//!   B (so that nothing left over from an earlier pool can win).
//! - The next commit after reading a pool whose newest valid copy has
//!   sequence `s` uses `s + 1`, whatever the other copy holds.
//! - [`Pool::decode`] takes the newest copy that is valid: CRC, magic,
//!   version, reserved bytes, extent size, `seq` parity matching its place,
//!   payload that parses exactly, and [`Pool::check_invariants`]. If one
//!   copy is torn or corrupt, the other wins; if both are invalid, the
//!   error ([`PoolError::NoValidCopy`]) says what is wrong with each.
//!
//! # Limits
//!
//! Every collection is bounded by a const generic of [`Pool`]:
//!
//! | limit | meaning | [`DefaultPool`] |
//! |---|---|---|
//! | `LUNS` | LUNs in the volume group (at most 65536: indexes are [`LunIndex`]) | 16 |
//! | `LVS` | thin LVs | 1024 |
//! | `SEGS` | segments per LV (at least 1) | 32 |
//! | `PARKED` | parked requests plus unpolled completions | 256 |
//!
//! Extents per LUN are a `u32`; a LUN's size in bytes must fit a `u64`.
//! Sizes are multiples of [`SECTOR_SIZE`]. The extent size lies in
//! [`MIN_EXTENT_SIZE`]..=[`MAX_EXTENT_SIZE`].
//!
//! [postcard]: https://postcard.jamesmunns.com/wire-format

mod meta;
#[cfg(test)]
mod tests;

pub use meta::{
    CopyDefect, METADATA_ALIGN, METADATA_COPY_SIZE, METADATA_HEADER_LEN, METADATA_MAGIC,
    METADATA_VERSION, METADATA_VERSION_1, METADATA_VERSION_2, commit_place, max_copy_len,
    metadata_offset, next_copy,
};

use core::fmt;

use heapless::{Deque, Vec};
use serde::{Deserialize, Serialize};

use crate::fmt::{debug_assert, debug_assert_eq};
use crate::wire::Uuid;

/// Debug builds check every invariant ([`Pool::check_invariants`]) after
/// each change of the pool, but only while the LVs hold at most this many
/// segments in all, so that a change stays cheap; a larger pool is still
/// checked before every [`Pool::encode`] and after every decode.
pub const CHECK_AFTER_CHANGE_MAX_SEGMENTS: usize = 1024;

/// Segments the overlap check of [`Pool::check_invariants`] sorts at once
/// (8 bytes each, on the stack): it walks each LUN's segments in order of
/// their first extent in batches of this many, so the check costs
/// O(S × (S / 128 + LUNs) × log 128) for S segments instead of O(S²).
const DISJOINT_BATCH: usize = 128;

/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// The smallest extent size the pool accepts: 1 MiB.
pub const MIN_EXTENT_SIZE: u64 = MIB;
/// The largest extent size the pool accepts: 16 GiB. A bound of this
/// implementation that keeps byte arithmetic far from `u64` overflow.
pub const MAX_EXTENT_SIZE: u64 = 16 << 30;
/// The extent size of oVirt block storage domains, and the usual choice:
/// 128 MiB.
pub const DEFAULT_EXTENT_SIZE: u64 = 128 * MIB;
/// Sizes (virtual, initial and target) are whole 512-byte sectors.
pub const SECTOR_SIZE: u64 = 512;

/// The index of a LUN in the pool: its position in [`Pool::luns`], in the
/// order the LUNs were added.
pub type LunIndex = u16;

/// A typical configuration: 16 LUNs, 1024 thin LVs of up to 32 segments,
/// 256 parked requests.
pub type DefaultPool = Pool<16, 1024, 32, 256>;

/// The most an LV of `virtual_size` bytes may grow to with extents of
/// `extent_size` bytes: the virtual size plus 10 % plus one extent, rounded
/// up to whole extents.
///
/// The allowance is for the image format's own metadata: a qcow2 image of
/// a fully written disk is larger than its virtual size by its L1/L2
/// tables, refcount blocks, header and any internal bookkeeping (oVirt
/// allows about 10 % and rounds to extents likewise).
///
/// `None` if `extent_size` is not a valid extent size or the result does
/// not fit a `u64`.
pub fn max_size(virtual_size: u64, extent_size: u64) -> Option<u64> {
    if !valid_extent_size(extent_size) {
        return None;
    }
    virtual_size
        .checked_add(virtual_size / 10)?
        .checked_add(extent_size)?
        .checked_next_multiple_of(extent_size)
}

/// Whether `extent_size` is a power of two in
/// [`MIN_EXTENT_SIZE`]..=[`MAX_EXTENT_SIZE`].
pub fn valid_extent_size(extent_size: u64) -> bool {
    extent_size.is_power_of_two() && (MIN_EXTENT_SIZE..=MAX_EXTENT_SIZE).contains(&extent_size)
}

/// Serde for a [`Uuid`]: its 16 bytes (postcard writes them raw).
mod uuid_bytes {
    use super::Uuid;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Writes the 16 bytes.
    pub fn serialize<S: Serializer>(id: &Uuid, serializer: S) -> Result<S::Ok, S::Error> {
        id.0.serialize(serializer)
    }

    /// Reads 16 bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Uuid, D::Error> {
        <[u8; 16]>::deserialize(deserializer).map(Uuid)
    }
}

/// A LUN (physical volume) of the volume group.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Lun {
    /// The LUN's UUID.
    #[serde(with = "uuid_bytes")]
    pub id: Uuid,
    /// Its size in extents.
    pub extents: u32,
    /// Its high-water mark: extents at or above it never belonged to any
    /// LV (they need no discard); below it, each extent belongs to at most
    /// one LV (or is free or released).
    pub used: u32,
}

impl Lun {
    /// Extents at or above the high-water mark: never used.
    pub fn never_used(&self) -> u32 {
        self.extents.saturating_sub(self.used)
    }
}

/// A run of consecutive extents of one LUN that belongs to an LV.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Segment {
    /// The LUN's index.
    pub lun: LunIndex,
    /// The first extent of the run, counted from the start of the LUN.
    pub first_extent: u32,
    /// Extents in the run (at least 1).
    pub extents: u32,
}

impl Segment {
    /// The extent after the run (exclusive end), as a `u64` so it cannot
    /// overflow.
    pub fn end(&self) -> u64 {
        u64::from(self.first_extent) + u64::from(self.extents)
    }

    /// Whether two runs share an extent.
    pub fn overlaps(&self, other: &Segment) -> bool {
        self.lun == other.lun
            && u64::from(self.first_extent) < other.end()
            && u64::from(other.first_extent) < self.end()
    }
}

/// A thin LV as stored: its id, virtual size and segments.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Volume<const SEGS: usize> {
    /// The LV's UUID.
    #[serde(with = "uuid_bytes")]
    id: Uuid,
    /// The size the guest sees.
    virtual_size: u64,
    /// Its extents, in LV order.
    segments: Vec<Segment, SEGS>,
}

impl<const SEGS: usize> Volume<SEGS> {
    /// Extents the LV owns.
    fn extents(&self) -> u64 {
        self.segments.iter().map(|s| u64::from(s.extents)).sum()
    }
}

/// What [`Pool::volume`] says about an LV.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct VolumeInfo {
    /// The LV's UUID.
    pub id: Uuid,
    /// The size the guest sees, in bytes.
    pub virtual_size: u64,
    /// The LV's physical size in bytes: its extents times the extent size.
    pub size: u64,
    /// The most it may grow to, in bytes: [`max_size`] of its virtual size.
    pub limit: u64,
}

/// The outcome of [`Pool::extend`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Extend {
    /// The LV is at least as large as asked (extended now, or already).
    Extended {
        /// The LV's size in bytes afterwards.
        size: u64,
    },
    /// Not enough free extents: nothing was allocated and the request is
    /// parked until a LUN is added.
    Parked {
        /// The LV's size in bytes, unchanged.
        size: u64,
    },
}

impl Extend {
    /// The LV's size in bytes after the call.
    pub fn size(&self) -> u64 {
        match *self {
            Extend::Extended { size } | Extend::Parked { size } => size,
        }
    }
}

/// A request waiting for capacity.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Parked {
    /// The LV.
    pub volume: Uuid,
    /// The size asked for, in bytes (the largest of all parks for the LV).
    pub target_size: u64,
    /// Whether the guest is paused (any park for the LV said so).
    pub urgent: bool,
}

/// A parked request that left the parked list.
///
/// Normally the LV now has at least the size the request asked for. The one
/// exception: if serving it would have needed more segments than the LV has
/// room for (`SEGS`), the request is dropped and `size` is the LV's
/// unchanged size, below the target; the caller answers it as failed
/// (compare with the target it parked).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Completion {
    /// The LV.
    pub volume: Uuid,
    /// The LV's size in bytes after serving the request.
    pub size: u64,
}

/// A broken pool invariant, found by [`Pool::check_invariants`] (also when
/// decoding metadata).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Invariant {
    /// The extent size is not a power of two within the allowed range.
    ExtentSize,
    /// A LUN or LV has the nil UUID.
    NilId,
    /// Two LUNs have the same UUID.
    DuplicateLun {
        /// The later of the two.
        lun: LunIndex,
    },
    /// A LUN has no extents, is larger than a `u64` of bytes, or its
    /// high-water mark is beyond its end.
    LunBounds {
        /// The LUN.
        lun: LunIndex,
    },
    /// The LVs are not in strictly ascending UUID order (a duplicate or an
    /// unsorted list).
    VolumeOrder {
        /// The first LV out of order.
        volume: Uuid,
    },
    /// An LV's virtual size is zero, not whole sectors, or has no limit.
    VirtualSize {
        /// The LV.
        volume: Uuid,
    },
    /// An LV owns no extents.
    EmptyVolume {
        /// The LV.
        volume: Uuid,
    },
    /// An LV is larger than its limit.
    OverLimit {
        /// The LV.
        volume: Uuid,
    },
    /// A segment is empty, names a LUN that does not exist, or lies
    /// (partly) at or above its LUN's high-water mark.
    SegmentBounds {
        /// The LV that owns the segment.
        volume: Uuid,
        /// The segment's position in the LV's list.
        segment: u16,
    },
    /// Two segments share an extent.
    Overlap {
        /// The LV that owns one of them.
        a: Uuid,
        /// The LV that owns the other (may be the same LV).
        b: Uuid,
        /// The LUN.
        lun: LunIndex,
    },
    /// A released run is empty, on an unknown LUN, at or above its LUN's
    /// high-water mark, or shares an extent with a segment or another
    /// released run; or the floor reaches above a LUN's high-water mark.
    Released {
        /// The LUN.
        lun: LunIndex,
    },
    /// A parked request names an unknown LV, repeats an LV, asks for no
    /// more than the LV has or more than its limit, or the parked list and
    /// the completions together exceed `PARKED`.
    Parked {
        /// The LV named.
        volume: Uuid,
    },
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Invariant::ExtentSize => f.write_str("invalid extent size"),
            Invariant::NilId => f.write_str("a LUN or LV has the nil UUID"),
            Invariant::DuplicateLun { lun } => write!(f, "LUN {lun} repeats an earlier LUN's id"),
            Invariant::LunBounds { lun } => {
                write!(f, "LUN {lun} is empty, too large, or used beyond its end")
            }
            Invariant::VolumeOrder { volume } => {
                write!(f, "LV {volume} is a duplicate or out of order")
            }
            Invariant::VirtualSize { volume } => {
                write!(f, "LV {volume} has an invalid virtual size")
            }
            Invariant::EmptyVolume { volume } => write!(f, "LV {volume} owns no extents"),
            Invariant::OverLimit { volume } => write!(f, "LV {volume} is larger than its limit"),
            Invariant::SegmentBounds { volume, segment } => write!(
                f,
                "segment {segment} of LV {volume} is empty, on an unknown LUN, or above the LUN's high-water mark"
            ),
            Invariant::Overlap { a, b, lun } => {
                write!(f, "LVs {a} and {b} share an extent of LUN {lun}")
            }
            Invariant::Released { lun } => {
                write!(f, "a released run of LUN {lun} is out of place")
            }
            Invariant::Parked { volume } => {
                write!(f, "the parked request for LV {volume} is inconsistent")
            }
        }
    }
}

impl core::error::Error for Invariant {}

/// Why a pool operation was refused. A refused operation changes nothing.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PoolError {
    /// The extent size is not a power of two in
    /// [`MIN_EXTENT_SIZE`]..=[`MAX_EXTENT_SIZE`].
    InvalidExtentSize {
        /// The size given.
        extent_size: u64,
    },
    /// The nil UUID names no LUN and no LV.
    NilId,
    /// A LUN with this UUID is already in the pool.
    DuplicateLun,
    /// The pool already has `LUNS` LUNs.
    TooManyLuns,
    /// A LUN must have at least one extent.
    EmptyLun,
    /// The LUN's size in bytes does not fit a `u64`.
    LunTooLarge,
    /// An LV with this UUID already exists.
    DuplicateVolume,
    /// The pool already has `LVS` LVs.
    TooManyVolumes,
    /// A size that is zero where that makes no sense, not whole 512-byte
    /// sectors, or so large that its limit does not fit a `u64`.
    InvalidSize {
        /// The size given.
        size: u64,
    },
    /// Not enough free extents to create the LV (creation is not parked).
    NoSpace {
        /// Extents needed.
        needed: u64,
        /// Extents free.
        free: u64,
    },
    /// No LV has this UUID.
    UnknownVolume,
    /// The size asked for is above the LV's limit ([`max_size`]).
    OverLimit {
        /// The LV's limit in bytes.
        limit: u64,
    },
    /// The request had to be parked but all `PARKED` places are taken
    /// (parked requests and unpolled completions). Nothing changed; retry
    /// later.
    ParkedFull,
    /// The extension would need more than `SEGS` segments for the LV.
    SegmentsFull,
    /// A request for the LV is parked: it is neither deleted nor reduced
    /// until that request completes or is withdrawn.
    Parked,
    /// A reduction asked for more than the LV has.
    AboveSize {
        /// The LV's size in bytes.
        size: u64,
    },
    /// No LUN has this index.
    UnknownLun,
    /// The LV has no segment at this position.
    UnknownSegment,
    /// The destination of a relocation is not all free extents of a LUN
    /// that is not draining.
    NotFree,
    /// The LUN still holds segments or released extents.
    LunInUse,
    /// The output buffer cannot hold the metadata copy.
    BufferTooSmall {
        /// Bytes the copy needs.
        needed: u64,
        /// Bytes the buffer has.
        available: u64,
    },
    /// Neither metadata copy is valid.
    NoValidCopy {
        /// What is wrong with copy A.
        a: CopyDefect,
        /// What is wrong with copy B.
        b: CopyDefect,
    },
    /// The pool found one of its own invariants broken while working (a
    /// bug; the operation was refused and nothing changed).
    Invariant(Invariant),
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PoolError::InvalidExtentSize { extent_size } => write!(
                f,
                "extent size {extent_size} is not a power of two between {MIN_EXTENT_SIZE} and {MAX_EXTENT_SIZE}"
            ),
            PoolError::NilId => f.write_str("the nil UUID is not a valid LUN or volume id"),
            PoolError::DuplicateLun => f.write_str("a LUN with this id is already in the pool"),
            PoolError::TooManyLuns => f.write_str("the pool has no room for another LUN"),
            PoolError::EmptyLun => f.write_str("a LUN must have at least one extent"),
            PoolError::LunTooLarge => f.write_str("the LUN is too large"),
            PoolError::DuplicateVolume => f.write_str("a volume with this id already exists"),
            PoolError::TooManyVolumes => f.write_str("the pool has no room for another volume"),
            PoolError::InvalidSize { size } => write!(
                f,
                "size {size} is invalid (zero, not a multiple of {SECTOR_SIZE}, or too large)"
            ),
            PoolError::NoSpace { needed, free } => {
                write!(f, "not enough free extents: {needed} needed, {free} free")
            }
            PoolError::UnknownVolume => f.write_str("unknown volume"),
            PoolError::OverLimit { limit } => {
                write!(f, "size is over the volume's limit of {limit} bytes")
            }
            PoolError::ParkedFull => {
                f.write_str("too many requests are waiting for space; retry later")
            }
            PoolError::SegmentsFull => f.write_str("the volume has no room for another segment"),
            PoolError::Parked => f.write_str("a request for the volume is waiting for space"),
            PoolError::AboveSize { size } => {
                write!(f, "the size asked for is above the volume's {size} bytes")
            }
            PoolError::UnknownLun => f.write_str("unknown LUN"),
            PoolError::UnknownSegment => f.write_str("the volume has no such segment"),
            PoolError::NotFree => f.write_str("the destination extents are not free"),
            PoolError::LunInUse => f.write_str("the LUN still holds segments or released extents"),
            PoolError::BufferTooSmall { needed, available } => write!(
                f,
                "metadata copy needs {needed} bytes, the buffer has {available}"
            ),
            PoolError::NoValidCopy { a, b } => {
                write!(f, "no valid pool metadata copy: copy A: {a}; copy B: {b}")
            }
            PoolError::Invariant(broken) => write!(f, "pool invariant broken: {broken}"),
        }
    }
}

impl core::error::Error for PoolError {}

/// The thin pool: up to `LUNS` LUNs, `LVS` thin LVs of up to `SEGS`
/// segments each, and `PARKED` parked requests (see the [module
/// docs](self) for the rules).
#[derive(Clone, Debug)]
pub struct Pool<const LUNS: usize, const LVS: usize, const SEGS: usize, const PARKED: usize> {
    /// Bytes per extent, a valid extent size.
    extent_size: u64,
    /// The LUNs, in the order they were added (their index).
    luns: Vec<Lun, LUNS>,
    /// The LVs, in ascending UUID order (binary search).
    volumes: Vec<Volume<SEGS>, LVS>,
    /// Parked requests, in the order they were first parked.
    parked: Vec<Parked, PARKED>,
    /// Parked requests that completed and were not polled yet.
    completed: Deque<Completion, PARKED>,
    /// The sequence number of the newest commit that released extents, as
    /// last stamped ([`Pool::stamp_released`]) or read from metadata.
    release_seq: u64,
    /// The volume whose segments an SPM is moving ([`Pool::set_moving`]);
    /// nil if none. Committed with the pool.
    moving: Uuid,
    /// Released runs, in order of LUN and first extent; never adjacent to
    /// another of the same sequence on the same LUN (merged).
    released: Vec<Released, MAX_RELEASED_RUNS>,
    /// The floor: while set, every extent of LUN `l` below
    /// `floor_marks[l]` that no segment holds counts as released.
    floor: Option<Stamp>,
    /// Per LUN, the end of the floor (the LUN's high-water mark when the
    /// floor was set).
    floor_marks: [u32; LUNS],
    /// Per LUN, whether it is draining (nothing is allocated there).
    draining: [bool; LUNS],
    /// Every segment of every LV, in order of LUN and first extent, in the
    /// first `order_len` places of these `LVS × SEGS` (4 bytes each: 128
    /// KiB for a [`DefaultPool`]). The free runs are the gaps between them.
    /// An extension inserts its new segments; other changes rebuild it
    /// (O(S log S) for S segments).
    order: [[Ref; SEGS]; LVS],
    /// Segments in `order`.
    order_len: usize,
    /// A deliberate bug, for proving that tests catch it (never stored).
    #[cfg(feature = "fault-injection")]
    forget_extents_used: bool,
}

/// The most released runs the pool remembers one by one
/// ([`Pool::released_extents`]); one more folds them all into the floor
/// (see [`Pool::reclaim`]).
pub const MAX_RELEASED_RUNS: usize = 256;

/// When a released run (or the floor) may be reused.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stamp {
    /// Released by changes not committed yet: the next
    /// [`Pool::stamp_released`] gives it that commit's sequence number.
    Pending,
    /// Released by the commit of this sequence number.
    At(u64),
}

/// A run of extents taken from an LV and not yet reusable.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Released {
    /// The LUN.
    lun: LunIndex,
    /// Its first extent.
    first: u32,
    /// Extents (at least 1).
    extents: u32,
    /// The commit that released it.
    stamp: Stamp,
}

impl Released {
    /// The extent after the run.
    fn end(&self) -> u64 {
        u64::from(self.first) + u64::from(self.extents)
    }
}

/// A segment in the free-run index: the LV's position in the pool's list
/// and the segment's in the LV's (4 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
struct Ref {
    volume: u16,
    segment: u16,
}

/// A maximal run of free extents on one LUN.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FreeRun {
    /// The LUN's index.
    pub lun: LunIndex,
    /// Its first extent.
    pub first: u32,
    /// Extents in the run (at least 1).
    pub extents: u32,
}

impl FreeRun {
    /// Preference among free runs: larger first, then lower LUN index,
    /// then lower first extent (a larger key is preferred).
    fn key(&self) -> u128 {
        (u128::from(self.extents) << 64)
            | (u128::from(LunIndex::MAX - self.lun) << 32)
            | u128::from(u32::MAX - self.first)
    }
}

/// One whole segment to move off a LUN, as [`Pool::plan_relocation`]
/// proposes it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Relocation {
    /// The LV that owns the segment.
    pub volume: Uuid,
    /// The segment's position in the LV's list.
    pub segment: u16,
    /// The segment as it lies now.
    pub from: Segment,
    /// Where it goes: LUN and first extent (the segment's length).
    pub to: Segment,
}

/// An allocation planned by [`Pool::plan`]: extents to grow the LV's last
/// segment by, then new segments in order.
struct Plan<const SEGS: usize> {
    grow: u32,
    new: Vec<Segment, SEGS>,
}

/// The segment `r` points at, and whether it is its LV's last.
fn segment_at<const SEGS: usize>(volumes: &[Volume<SEGS>], r: Ref) -> Option<(Segment, bool)> {
    let v = volumes.get(usize::from(r.volume))?;
    let s = v.segments.get(usize::from(r.segment))?;
    Some((
        *s,
        usize::from(r.segment).saturating_add(1) == v.segments.len(),
    ))
}

/// Where `r` lies: (LUN, first extent); unknown references sort last.
fn place_of<const SEGS: usize>(volumes: &[Volume<SEGS>], r: Ref) -> (LunIndex, u32) {
    segment_at(volumes, r).map_or((LunIndex::MAX, u32::MAX), |(s, _)| (s.lun, s.first_extent))
}

/// Restores the max-heap order of `heap` by `key` from position `i` down.
fn sift_down_by<T: Copy, K: Ord>(heap: &mut [T], mut i: usize, key: &impl Fn(T) -> K) {
    // Each step at least doubles `i`.
    for _ in 0..usize::BITS {
        let left = i.saturating_mul(2).saturating_add(1);
        let right = left.saturating_add(1);
        let mut largest = i;
        for child in [left, right] {
            if let (Some(&c), Some(&l)) = (heap.get(child), heap.get(largest))
                && key(c) > key(l)
            {
                largest = child;
            }
        }
        if largest == i {
            return;
        }
        heap.swap(i, largest);
        i = largest;
    }
}

/// Sorts `items` in ascending order of `key` (heapsort: no memory,
/// O(n log n)).
fn heapsort_by<T: Copy, K: Ord>(items: &mut [T], key: impl Fn(T) -> K) {
    for i in (0..items.len() / 2).rev() {
        sift_down_by(items, i, &key);
    }
    for end in (1..items.len()).rev() {
        items.swap(0, end);
        if let Some(rest) = items.get_mut(..end) {
            sift_down_by(rest, 0, &key);
        }
    }
}

/// Raises the high-water mark of the LUN of `s` to its end.
fn raise_used(luns: &mut [Lun], s: &Segment) {
    if let Some(lun) = luns.get_mut(usize::from(s.lun)) {
        lun.used = lun.used.max(u32::try_from(s.end()).unwrap_or(u32::MAX));
        debug_assert!(lun.used <= lun.extents, "LUN {} used beyond its end", s.lun);
    }
}

/// Applies `plan` to an LV's `segments` (grow the last, then append, a new
/// segment that starts where the last ends merged into it) and raises the
/// LUNs' high-water marks.
fn apply<const SEGS: usize>(
    luns: &mut [Lun],
    segments: &mut Vec<Segment, SEGS>,
    plan: &Plan<SEGS>,
) -> Result<(), PoolError> {
    let broken = PoolError::Invariant(Invariant::ExtentSize);
    if plan.grow > 0 {
        let last = segments.last_mut().ok_or(broken)?;
        last.extents = last.extents.checked_add(plan.grow).ok_or(broken)?;
        raise_used(luns, last);
    }
    for s in &plan.new {
        match segments.last_mut() {
            Some(last) if last.lun == s.lun && last.end() == u64::from(s.first_extent) => {
                last.extents = last.extents.checked_add(s.extents).ok_or(broken)?;
            }
            _ => segments.push(*s).map_err(|_| PoolError::SegmentsFull)?,
        }
        raise_used(luns, s);
    }
    Ok(())
}

/// Free runs, release and reclaim, allocation, and the life cycle of LVs
/// and LUNs (see the [module docs](self)).
impl<const LUNS: usize, const LVS: usize, const SEGS: usize, const PARKED: usize>
    Pool<LUNS, LVS, SEGS, PARKED>
{
    /// The index: every segment, in order of LUN and first extent.
    fn order(&self) -> &[Ref] {
        self.order
            .as_flattened()
            .get(..self.order_len)
            .unwrap_or_default()
    }

    /// Rebuilds the index from the LVs' segments.
    fn rebuild_order(&mut self) {
        let flat = self.order.as_flattened_mut();
        let mut len = 0usize;
        for (v, lv) in self.volumes.iter().enumerate() {
            for s in 0..lv.segments.len() {
                let (Ok(volume), Ok(segment)) = (u16::try_from(v), u16::try_from(s)) else {
                    continue;
                };
                if let Some(slot) = flat.get_mut(len) {
                    *slot = Ref { volume, segment };
                    len += 1;
                }
            }
        }
        let volumes = self.volumes.as_slice();
        if let Some(refs) = flat.get_mut(..len) {
            heapsort_by(refs, |r| place_of(volumes, r));
        }
        self.order_len = len;
    }

    /// Adds the segments of LV `volume` from position `from` on (just
    /// appended: an extension) to the index, each at its place: O(S) per
    /// segment instead of a rebuild. Growing a segment in place keeps the
    /// order as it is.
    fn index_appended(&mut self, volume: usize, from: usize) {
        let count = self.volumes.get(volume).map_or(0, |v| v.segments.len());
        let Ok(v) = u16::try_from(volume) else {
            return;
        };
        for position in from..count {
            let Ok(segment) = u16::try_from(position) else {
                return;
            };
            let r = Ref { volume: v, segment };
            let volumes = self.volumes.as_slice();
            let place = place_of(volumes, r);
            let flat = self.order.as_flattened_mut();
            let len = self.order_len;
            let Some(refs) = flat.get(..len) else {
                return;
            };
            let at = refs.partition_point(|&q| place_of(volumes, q) < place);
            if len >= flat.len() {
                debug_assert!(false, "the index is full");
                return;
            }
            flat.copy_within(at..len, at.saturating_add(1));
            if let Some(slot) = flat.get_mut(at) {
                *slot = r;
            }
            self.order_len = len.saturating_add(1);
        }
    }

    /// Whether the index holds every segment once, in order of LUN and
    /// first extent (segments are non-empty and disjoint, so strictly
    /// ascending places and the right count say so). For debug checks.
    fn index_is_sound(&self) -> bool {
        let volumes = self.volumes.as_slice();
        let order = self.order();
        order.len() == self.segments_in_use()
            && order.iter().all(|&r| segment_at(volumes, r).is_some())
            && order
                .windows(2)
                .all(|w| matches!(w, [a, b] if place_of(volumes, *a) < place_of(volumes, *b)))
    }

    /// Where the floor ends on LUN `lun` (0 without a floor).
    fn floor_end(&self, lun: usize) -> u32 {
        match self.floor {
            Some(_) => self.floor_marks.get(lun).copied().unwrap_or(0),
            None => 0,
        }
    }

    /// Visits the maximal free runs of LUN `lun` in order, draining or not:
    /// the extents no segment holds, not released and not under the floor.
    /// O(segments + released runs) after a binary search.
    fn free_runs_on(&self, lun: usize, mut visit: impl FnMut(FreeRun)) {
        let (Some(l), Ok(index)) = (self.luns.get(lun), LunIndex::try_from(lun)) else {
            return;
        };
        let volumes = self.volumes.as_slice();
        let order = self.order();
        let released = self.released.as_slice();
        let mut i = order.partition_point(|&r| place_of(volumes, r).0 < index);
        let mut j = released.partition_point(|r| r.lun < index);
        let mut at = u64::from(self.floor_end(lun));
        let mut emit = |from: u64, to: u64| {
            if to > from
                && let (Ok(first), Ok(extents)) = (u32::try_from(from), u32::try_from(to - from))
            {
                visit(FreeRun {
                    lun: index,
                    first,
                    extents,
                });
            }
        };
        // Each round consumes a segment or a released run.
        for _ in 0..=order.len().saturating_add(released.len()) {
            let seg = order
                .get(i)
                .and_then(|&r| segment_at(volumes, r))
                .filter(|(s, _)| s.lun == index)
                .map(|(s, _)| (u64::from(s.first_extent), s.end()));
            let rel = released
                .get(j)
                .filter(|r| r.lun == index)
                .map(|r| (u64::from(r.first), r.end()));
            let (start, end) = match (seg, rel) {
                (Some(a), Some(b)) if a.0 <= b.0 => {
                    i += 1;
                    a
                }
                (Some(a), None) => {
                    i += 1;
                    a
                }
                (_, Some(b)) => {
                    j += 1;
                    b
                }
                (None, None) => break,
            };
            emit(at, start);
            at = at.max(end);
        }
        emit(at, u64::from(l.extents));
    }

    /// Visits the free runs of every LUN that is not draining.
    fn allocatable_runs(&self, mut visit: impl FnMut(FreeRun)) {
        for lun in 0..self.luns.len() {
            if !self.draining.get(lun).copied().unwrap_or(true) {
                self.free_runs_on(lun, &mut visit);
            }
        }
    }

    /// Free extents on LUNs that are not draining: what allocation can use.
    pub fn allocatable_extents(&self) -> u64 {
        let mut free = 0u64;
        self.allocatable_runs(|r| free = free.saturating_add(u64::from(r.extents)));
        free
    }

    /// The preferred allocatable run (largest, then lowest LUN, then lowest
    /// first extent) among those `accept` takes whose key is below `below`.
    fn best_run(&self, below: Option<u128>, accept: impl Fn(&FreeRun) -> bool) -> Option<FreeRun> {
        let mut best: Option<FreeRun> = None;
        self.allocatable_runs(|r| {
            if below.is_none_or(|b| r.key() < b)
                && accept(&r)
                && best.is_none_or(|x| r.key() > x.key())
            {
                best = Some(r);
            }
        });
        best
    }

    /// The allocatable free run that starts at extent `first` of LUN `lun`.
    fn free_run_at(&self, lun: LunIndex, first: u64) -> Option<FreeRun> {
        if self.draining.get(usize::from(lun)).copied().unwrap_or(true) {
            return None;
        }
        let mut found = None;
        self.free_runs_on(usize::from(lun), |r| {
            if u64::from(r.first) == first {
                found = Some(r);
            }
        });
        found
    }

    /// Whether extent `first - 1` of LUN `lun` is the end of some LV's last
    /// segment (that LV would grow into a run starting at `first`).
    fn follows_a_last_segment(&self, lun: LunIndex, first: u32) -> bool {
        let volumes = self.volumes.as_slice();
        let order = self.order();
        let at = order.partition_point(|&r| place_of(volumes, r) < (lun, first));
        at.checked_sub(1)
            .and_then(|p| order.get(p))
            .and_then(|&r| segment_at(volumes, r))
            .is_some_and(|(s, last)| last && s.lun == lun && s.end() == u64::from(first))
    }

    /// Plans `need` more extents for an LV whose segments are `segments`,
    /// by the allocation rule (see the [module docs](self)); changes
    /// nothing. [`PoolError::NoSpace`] if the allocatable extents are
    /// fewer than `need`, [`PoolError::SegmentsFull`] if the LV would have
    /// more than `SEGS` segments.
    fn plan(&self, segments: &[Segment], need: u64) -> Result<Plan<SEGS>, PoolError> {
        let free = self.allocatable_extents();
        if free < need {
            return Err(PoolError::NoSpace { needed: need, free });
        }
        let broken = PoolError::Invariant(Invariant::ExtentSize);
        let mut plan = Plan {
            grow: 0,
            new: Vec::new(),
        };
        let mut rest = need;
        // 1. Grow in place.
        let mut grown: Option<FreeRun> = None;
        if let Some(last) = segments.last()
            && let Some(run) = self.free_run_at(last.lun, last.end())
        {
            let take = rest.min(u64::from(run.extents));
            plan.grow = u32::try_from(take).map_err(|_| broken)?;
            rest -= take;
            grown = Some(run);
        }
        if rest == 0 {
            return Ok(plan);
        }
        let other = |r: &FreeRun| grown.is_none_or(|g| g != *r);
        let full = |_| PoolError::SegmentsFull;
        let rest32 = |rest: u64| u32::try_from(rest).map_err(|_| broken);
        match self.best_run(None, other) {
            // 2. One new segment in the largest run.
            Some(run) if u64::from(run.extents) >= rest => {
                let (a, len) = (u64::from(run.first), u64::from(run.extents));
                let start = if a > 0 && self.follows_a_last_segment(run.lun, run.first) {
                    a + (len / 2).min(len - rest)
                } else {
                    a
                };
                plan.new
                    .push(Segment {
                        lun: run.lun,
                        first_extent: u32::try_from(start).map_err(|_| broken)?,
                        extents: rest32(rest)?,
                    })
                    .map_err(full)?;
            }
            // 3. Whole runs, largest first, the last partly.
            _ => {
                let mut below = None;
                for _ in 0..=SEGS {
                    if rest == 0 {
                        break;
                    }
                    let run = self.best_run(below, other).ok_or(broken)?;
                    below = Some(run.key());
                    let take = rest.min(u64::from(run.extents));
                    plan.new
                        .push(Segment {
                            lun: run.lun,
                            first_extent: run.first,
                            extents: rest32(take)?,
                        })
                        .map_err(full)?;
                    rest -= take;
                }
                if rest > 0 {
                    return Err(PoolError::SegmentsFull);
                }
            }
        }
        if segments.len().saturating_add(plan.new.len()) > SEGS {
            return Err(PoolError::SegmentsFull);
        }
        Ok(plan)
    }

    /// Whether a released run or the floor waits for a commit's sequence
    /// number.
    fn has_pending(&self) -> bool {
        self.floor == Some(Stamp::Pending)
            || self.released.iter().any(|r| r.stamp == Stamp::Pending)
    }

    /// Records `s` as released by the next commit, merged with a pending
    /// run it touches; folds every released run into the floor when
    /// [`MAX_RELEASED_RUNS`] are already kept.
    fn release(&mut self, s: Segment) {
        let joins = |r: &Released, first: u32, end: u64| {
            r.lun == s.lun
                && r.stamp == Stamp::Pending
                && (r.end() == u64::from(first) || u64::from(r.first) == end)
        };
        let at = self
            .released
            .partition_point(|r| (r.lun, r.first) < (s.lun, s.first_extent));
        let before = at.checked_sub(1);
        if let Some(prev) = before.and_then(|p| self.released.get_mut(p))
            && prev.lun == s.lun
            && prev.stamp == Stamp::Pending
            && prev.end() == u64::from(s.first_extent)
        {
            prev.extents = prev.extents.saturating_add(s.extents);
            let end = prev.end();
            let first = prev.first;
            // The next one may now touch it too.
            if let Some(next) = self.released.get(at).copied()
                && joins(&next, first, end)
                && u64::from(next.first) == end
            {
                if let Some(prev) = before.and_then(|p| self.released.get_mut(p)) {
                    prev.extents = prev.extents.saturating_add(next.extents);
                }
                self.released.remove(at);
            }
            return;
        }
        if let Some(next) = self.released.get_mut(at)
            && next.lun == s.lun
            && next.stamp == Stamp::Pending
            && u64::from(next.first) == s.end()
        {
            next.first = s.first_extent;
            next.extents = next.extents.saturating_add(s.extents);
            return;
        }
        let run = Released {
            lun: s.lun,
            first: s.first_extent,
            extents: s.extents,
            stamp: Stamp::Pending,
        };
        if self.released.insert(at, run).is_err() {
            debug!(
                "pool: {} released runs kept, folded into the floor",
                MAX_RELEASED_RUNS
            );
            for (mark, lun) in self.floor_marks.iter_mut().zip(self.luns.iter()) {
                *mark = lun.used;
            }
            self.floor = Some(Stamp::Pending);
            self.released.clear();
        }
    }

    /// Gives every released run (and the floor) that waits for one the
    /// sequence number `seq` of the commit that wrote the release; returns
    /// whether there was any. Call it once that commit is durable (until
    /// then the runs are not reclaimable), with the `seq` given to
    /// [`Pool::encode`]: `encode` writes `release_seq` = `seq` exactly
    /// when this would stamp something, and [`Pool::release_seq`] becomes
    /// `seq`.
    pub fn stamp_released(&mut self, seq: u64) -> bool {
        let mut any = false;
        for r in self.released.iter_mut() {
            if r.stamp == Stamp::Pending {
                r.stamp = Stamp::At(seq);
                any = true;
            }
        }
        if self.floor == Some(Stamp::Pending) {
            self.floor = Some(Stamp::At(seq));
            any = true;
        }
        if any {
            self.release_seq = seq;
        }
        self.check_after_change();
        any
    }

    /// Names volume `id` as being moved (nil: none), committed with the
    /// pool: a host that has not opened the volume waits until a commit
    /// no longer names it before it reads the map and opens it
    /// (docs/pool-format.md 6.7). Refused with [`PoolError::UnknownVolume`]
    /// for a volume the pool lacks.
    pub fn set_moving(&mut self, id: Uuid) -> Result<(), PoolError> {
        if !id.is_nil() && self.find(id).is_err() {
            return Err(PoolError::UnknownVolume);
        }
        self.moving = id;
        Ok(())
    }

    /// The volume being moved ([`Pool::set_moving`]), nil if none.
    pub fn moving(&self) -> Uuid {
        self.moving
    }

    /// The sequence number of the newest commit that released extents, as
    /// last stamped or read from metadata (0 if none ever did).
    pub fn release_seq(&self) -> u64 {
        self.release_seq
    }

    /// The `release_seq` a commit of sequence number `seq` writes: `seq`
    /// if it carries releases not stamped yet, else [`Pool::release_seq`].
    pub fn release_seq_for(&self, seq: u64) -> u64 {
        if self.has_pending() {
            seq
        } else {
            self.release_seq
        }
    }

    /// Frees every released run, and the floor, whose commit sequence is at
    /// most `acked` (runs not stamped yet stay released), then serves
    /// parked requests (their completions are then ready for
    /// [`Pool::poll_completed`]). Returns how many extents became free.
    pub fn reclaim(&mut self, acked: u64) -> u64 {
        let before = self.free_extents();
        self.released
            .retain(|r| !matches!(r.stamp, Stamp::At(seq) if seq <= acked));
        if matches!(self.floor, Some(Stamp::At(seq)) if seq <= acked) {
            self.floor = None;
            self.floor_marks = [0; LUNS];
        }
        let freed = self.free_extents().saturating_sub(before);
        if freed > 0 {
            debug!("pool: {} released extents reclaimed at {}", freed, acked);
            self.serve_parked();
        }
        self.check_after_change();
        freed
    }

    /// Extents taken from LVs and not reusable yet (released runs and the
    /// floor).
    pub fn released_extents(&self) -> u64 {
        let held: u64 = self.volumes.iter().map(|v| v.extents()).sum();
        self.total_extents()
            .saturating_sub(held)
            .saturating_sub(self.free_extents())
    }

    /// Visits the free runs of LUN `lun` (draining or not) in order of
    /// first extent: its extents no segment holds, not released and not
    /// under the floor. Nothing for a LUN the pool lacks.
    pub fn free_runs_on_lun(&self, lun: LunIndex, visit: impl FnMut(FreeRun)) {
        self.free_runs_on(usize::from(lun), visit);
    }

    /// Visits every free run below its LUN's high-water mark (clipped to
    /// it): the free extents that may still hold an earlier LV's data, for
    /// the caller to discard (after [`Pool::reclaim`] freed some). Needs
    /// no memory; O(S) for S segments.
    pub fn free_runs_below_used(&self, mut visit: impl FnMut(FreeRun)) {
        for (lun, l) in self.luns.iter().enumerate() {
            self.free_runs_on(lun, |r| {
                let end = u64::from(r.first) + u64::from(r.extents);
                let cut = end.min(u64::from(l.used));
                if cut > u64::from(r.first)
                    && let Ok(extents) = u32::try_from(cut - u64::from(r.first))
                {
                    visit(FreeRun { extents, ..r });
                }
            });
        }
    }

    /// Deletes LV `id`: its extents become released (not free: see
    /// [`Pool::reclaim`]), and if it is the volume being moved
    /// ([`Pool::moving`]) that becomes nil. Returns how many.
    ///
    /// Refused with [`PoolError::UnknownVolume`], then
    /// [`PoolError::Parked`] if a request for it is parked.
    pub fn delete_volume(&mut self, id: Uuid) -> Result<u64, PoolError> {
        let index = self.find(id).map_err(|_| PoolError::UnknownVolume)?;
        if self.parked.iter().any(|p| p.volume == id) {
            return Err(PoolError::Parked);
        }
        // O(S): only for the debug check below.
        let released_before = if cfg!(debug_assertions) {
            self.released_extents()
        } else {
            0
        };
        let lv = self.volumes.remove(index);
        if self.moving == id {
            self.moving = Uuid::NIL;
        }
        for s in &lv.segments {
            self.release(*s);
        }
        self.rebuild_order();
        debug!("pool: LV {} deleted, {} extents released", id, lv.extents());
        debug_assert!(
            self.released_extents() >= released_before + lv.extents(),
            "deleting released fewer extents than the LV had"
        );
        self.check_after_change();
        Ok(lv.extents())
    }

    /// Reduces LV `id` to `size` bytes rounded up to whole extents (at
    /// least one): the extents past that at the LV's end become released,
    /// the last kept segment split if needed. Returns the new size.
    ///
    /// Refused with, in this order: [`PoolError::InvalidSize`] (zero or
    /// not whole sectors); [`PoolError::UnknownVolume`];
    /// [`PoolError::Parked`]; [`PoolError::AboveSize`] (more than the LV
    /// has).
    pub fn reduce_volume(&mut self, id: Uuid, size: u64) -> Result<u64, PoolError> {
        if size == 0 || size % SECTOR_SIZE != 0 {
            return Err(PoolError::InvalidSize { size });
        }
        let index = self.find(id).map_err(|_| PoolError::UnknownVolume)?;
        if self.parked.iter().any(|p| p.volume == id) {
            return Err(PoolError::Parked);
        }
        let extent_size = self.extent_size;
        let keep = self.extents_for(size);
        let lv = self
            .volumes
            .get_mut(index)
            .ok_or(PoolError::UnknownVolume)?;
        let extents = lv.extents();
        let current = extents.saturating_mul(extent_size);
        if size > current {
            return Err(PoolError::AboveSize { size: current });
        }
        let mut cut = extents.saturating_sub(keep);
        let mut cuts: Vec<Segment, SEGS> = Vec::new();
        for _ in 0..SEGS {
            if cut == 0 {
                break;
            }
            let Some(last) = lv.segments.last_mut() else {
                break;
            };
            if u64::from(last.extents) <= cut {
                cut -= u64::from(last.extents);
                let whole = *last;
                lv.segments.pop();
                let _ = cuts.push(whole);
            } else {
                // cut < last.extents, a u32.
                let tail = u32::try_from(cut).unwrap_or(0);
                last.extents -= tail;
                let _ = cuts.push(Segment {
                    lun: last.lun,
                    first_extent: last.first_extent.saturating_add(last.extents),
                    extents: tail,
                });
                cut = 0;
            }
        }
        debug_assert_eq!(lv.extents(), keep, "reduced to other than asked");
        let size = lv.extents().saturating_mul(extent_size);
        for s in cuts {
            self.release(s);
        }
        self.rebuild_order();
        debug!("pool: LV {} reduced to {} bytes", id, size);
        self.check_after_change();
        Ok(size)
    }

    /// Moves segment `segment` of LV `id` whole to extents `first..` of LUN
    /// `lun` (the caller has copied its data there and commits this
    /// change before the LV is used through the new map): the old run
    /// becomes released; the moved segment is merged with a neighbour in
    /// the LV it now touches. The caller names the LV with
    /// [`Pool::set_moving`] in a durable commit before it copies anything,
    /// and moves none of it if a live host holds it (docs/pool-format.md
    /// 6.7).
    ///
    /// Refused with, in this order: [`PoolError::UnknownVolume`];
    /// [`PoolError::UnknownSegment`]; [`PoolError::UnknownLun`];
    /// [`PoolError::NotFree`] (the destination is not all free extents of
    /// a LUN that is not draining).
    pub fn relocate(
        &mut self,
        id: Uuid,
        segment: u16,
        lun: LunIndex,
        first: u32,
    ) -> Result<(), PoolError> {
        let index = self.find(id).map_err(|_| PoolError::UnknownVolume)?;
        let from = self
            .volumes
            .get(index)
            .and_then(|v| v.segments.get(usize::from(segment)))
            .copied()
            .ok_or(PoolError::UnknownSegment)?;
        if usize::from(lun) >= self.luns.len() {
            return Err(PoolError::UnknownLun);
        }
        let to = Segment {
            lun,
            first_extent: first,
            extents: from.extents,
        };
        let mut fits = false;
        if !self.draining.get(usize::from(lun)).copied().unwrap_or(true) {
            self.free_runs_on(usize::from(lun), |r| {
                let end = u64::from(r.first) + u64::from(r.extents);
                fits |= r.first <= first && to.end() <= end;
            });
        }
        if !fits {
            return Err(PoolError::NotFree);
        }
        let lv = self
            .volumes
            .get_mut(index)
            .ok_or(PoolError::UnknownVolume)?;
        let position = usize::from(segment);
        if let Some(slot) = lv.segments.get_mut(position) {
            *slot = to;
        }
        // Merge with the next segment, then with the previous one.
        let next = position.saturating_add(1);
        if let (Some(a), Some(b)) = (lv.segments.get(position), lv.segments.get(next))
            && a.lun == b.lun
            && a.end() == u64::from(b.first_extent)
        {
            let extents = a.extents.saturating_add(b.extents);
            if let Some(a) = lv.segments.get_mut(position) {
                a.extents = extents;
            }
            lv.segments.remove(next);
        }
        if let Some(prev) = position.checked_sub(1)
            && let (Some(a), Some(b)) = (lv.segments.get(prev), lv.segments.get(position))
            && a.lun == b.lun
            && a.end() == u64::from(b.first_extent)
        {
            let extents = a.extents.saturating_add(b.extents);
            if let Some(a) = lv.segments.get_mut(prev) {
                a.extents = extents;
            }
            lv.segments.remove(position);
        }
        raise_used(&mut self.luns, &to);
        self.release(from);
        self.rebuild_order();
        debug!(
            "pool: LV {} segment {} moved to LUN {} extent {}",
            id, segment, lun, first
        );
        self.check_after_change();
        Ok(())
    }

    /// The next segment to move off LUN `lun` (its segment with the lowest
    /// first extent) and where to: the start of the largest free run on
    /// another LUN that is not draining (ties: lowest LUN, lowest first
    /// extent). `Ok(None)` when no segment is left on the LUN.
    ///
    /// Refused with [`PoolError::UnknownLun`], or [`PoolError::NoSpace`]
    /// when no such run holds the whole segment.
    pub fn plan_relocation(&self, lun: LunIndex) -> Result<Option<Relocation>, PoolError> {
        if usize::from(lun) >= self.luns.len() {
            return Err(PoolError::UnknownLun);
        }
        let volumes = self.volumes.as_slice();
        let order = self.order();
        let at = order.partition_point(|&r| place_of(volumes, r).0 < lun);
        let Some((r, from)) = order
            .get(at)
            .and_then(|&r| segment_at(volumes, r).map(|(s, _)| (r, s)))
            .filter(|(_, s)| s.lun == lun)
        else {
            return Ok(None);
        };
        let volume = volumes
            .get(usize::from(r.volume))
            .map(|v| v.id)
            .ok_or(PoolError::Invariant(Invariant::ExtentSize))?;
        let dest = self.best_run(None, |run| run.lun != lun);
        match dest {
            Some(run) if run.extents >= from.extents => Ok(Some(Relocation {
                volume,
                segment: r.segment,
                from,
                to: Segment {
                    lun: run.lun,
                    first_extent: run.first,
                    extents: from.extents,
                },
            })),
            _ => Err(PoolError::NoSpace {
                needed: u64::from(from.extents),
                free: dest.map_or(0, |run| u64::from(run.extents)),
            }),
        }
    }

    /// Marks LUN `lun` draining (nothing is allocated there; in memory
    /// only) or not; ending a drain serves parked requests.
    pub fn set_draining(&mut self, lun: LunIndex, draining: bool) -> Result<(), PoolError> {
        let slot = self
            .draining
            .get_mut(usize::from(lun))
            .filter(|_| usize::from(lun) < self.luns.len())
            .ok_or(PoolError::UnknownLun)?;
        let was = *slot;
        *slot = draining;
        if was && !draining {
            self.serve_parked();
        }
        self.check_after_change();
        Ok(())
    }

    /// Whether LUN `lun` is draining.
    pub fn is_draining(&self, lun: LunIndex) -> bool {
        usize::from(lun) < self.luns.len()
            && self
                .draining
                .get(usize::from(lun))
                .copied()
                .unwrap_or(false)
    }

    /// Removes LUN `lun` from the pool; the LUNs after it move down one
    /// index (in every segment too).
    ///
    /// Refused with [`PoolError::UnknownLun`], or [`PoolError::LunInUse`]
    /// while a segment or a released run (or the floor) is on it.
    pub fn drop_lun(&mut self, lun: LunIndex) -> Result<(), PoolError> {
        let index = usize::from(lun);
        if index >= self.luns.len() {
            return Err(PoolError::UnknownLun);
        }
        let in_use = self
            .order()
            .iter()
            .any(|&r| place_of(&self.volumes, r).0 == lun)
            || self.released.iter().any(|r| r.lun == lun)
            || self.floor_end(index) > 0;
        if in_use {
            return Err(PoolError::LunInUse);
        }
        self.luns.remove(index);
        if let Some(tail) = self.floor_marks.get_mut(index..) {
            tail.rotate_left(1.min(tail.len()));
            if let Some(last) = tail.last_mut() {
                *last = 0;
            }
        }
        if let Some(tail) = self.draining.get_mut(index..) {
            tail.rotate_left(1.min(tail.len()));
            if let Some(last) = tail.last_mut() {
                *last = false;
            }
        }
        for s in self.volumes.iter_mut().flat_map(|v| v.segments.iter_mut()) {
            if s.lun > lun {
                s.lun -= 1;
            }
        }
        for r in self.released.iter_mut() {
            if r.lun > lun {
                r.lun -= 1;
            }
        }
        self.rebuild_order();
        debug!("pool: LUN {} dropped", lun);
        self.check_after_change();
        Ok(())
    }
}

/// Restores the max-heap order of `heap` from position `i` down.
fn sift_down<T: Ord + Copy>(heap: &mut [T], mut i: usize) {
    // Each step at least doubles `i`.
    for _ in 0..usize::BITS {
        let left = i.saturating_mul(2).saturating_add(1);
        let right = left.saturating_add(1);
        let mut largest = i;
        for child in [left, right] {
            if let (Some(c), Some(l)) = (heap.get(child), heap.get(largest))
                && c > l
            {
                largest = child;
            }
        }
        if largest == i {
            return;
        }
        heap.swap(i, largest);
        i = largest;
    }
}

/// Makes `items` a max-heap.
fn heapify<T: Ord + Copy>(items: &mut [T]) {
    for i in (0..items.len() / 2).rev() {
        sift_down(items, i);
    }
}

/// Sorts a max-heap in ascending order (heapsort: small code, no memory,
/// O(n log n) whatever the order).
fn heapsort<T: Ord + Copy>(heap: &mut [T]) {
    for end in (1..heap.len()).rev() {
        heap.swap(0, end);
        if let Some(rest) = heap.get_mut(..end) {
            sift_down(rest, 0);
        }
    }
}

impl<const LUNS: usize, const LVS: usize, const SEGS: usize, const PARKED: usize>
    Pool<LUNS, LVS, SEGS, PARKED>
{
    /// The most bytes an encoded metadata copy of this pool type can take:
    /// the header plus the worst-case payload at the limits.
    pub const MAX_COPY_LEN: usize = max_copy_len(LUNS, LVS, SEGS);

    /// Compile-time checks of the const generics, forced by [`Pool::new`].
    const LIMITS_OK: () = {
        assert!(
            LUNS <= LunIndex::MAX as usize + 1,
            "LUN indexes are u16: at most 65536 LUNs"
        );
        assert!(SEGS >= 1, "an LV needs at least one segment");
        assert!(SEGS <= u16::MAX as usize, "segment positions are u16");
        assert!(
            LVS <= u16::MAX as usize + 1,
            "LV positions in the free-run index are u16"
        );
        assert!(
            Self::MAX_COPY_LEN <= u32::MAX as usize,
            "payload_len is a u32"
        );
    };

    /// An empty pool (no LUNs, no LVs) with extents of `extent_size` bytes.
    pub fn new(extent_size: u64) -> Result<Self, PoolError> {
        #[allow(clippy::let_unit_value)]
        let () = Self::LIMITS_OK;
        if !valid_extent_size(extent_size) {
            return Err(PoolError::InvalidExtentSize { extent_size });
        }
        Ok(Pool {
            extent_size,
            luns: Vec::new(),
            volumes: Vec::new(),
            parked: Vec::new(),
            completed: Deque::new(),
            release_seq: 0,
            moving: Uuid::NIL,
            released: Vec::new(),
            floor: None,
            floor_marks: [0; LUNS],
            draining: [false; LUNS],
            order: [[Ref::default(); SEGS]; LVS],
            order_len: 0,
            #[cfg(feature = "fault-injection")]
            forget_extents_used: false,
        })
    }

    /// Breaks the pool on purpose, for tests that must show they catch a
    /// broken invariant: from now on [`Pool::extend`] gives an LV its
    /// extents but forgets to mark them used on their LUN, so they are
    /// handed out again. Only with the `fault-injection` feature; never
    /// enable that feature in a build that manages real storage.
    #[cfg(feature = "fault-injection")]
    pub fn inject_forget_extents_used(&mut self) {
        self.forget_extents_used = true;
    }

    /// Bytes per extent.
    pub fn extent_size(&self) -> u64 {
        self.extent_size
    }

    /// log2 of the extent size.
    fn shift(&self) -> u32 {
        self.extent_size.trailing_zeros()
    }

    /// Extents needed to hold `bytes` (rounded up), without division.
    fn extents_for(&self, bytes: u64) -> u64 {
        let shift = self.shift();
        let mask = self.extent_size.wrapping_sub(1);
        (bytes >> shift) + u64::from(bytes & mask != 0)
    }

    /// `extents` in bytes; `None` on overflow.
    fn bytes(&self, extents: u64) -> Option<u64> {
        extents.checked_mul(self.extent_size)
    }

    /// Segments held by all LVs.
    fn segments_in_use(&self) -> usize {
        self.volumes.iter().map(|v| v.segments.len()).sum()
    }

    /// Whether [`Pool::inject_forget_extents_used`] broke the pool: then
    /// the pool's own checks step aside, so that the tests that must catch
    /// the bug are what is tested.
    fn fault_injected(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        let injected = self.forget_extents_used;
        #[cfg(not(feature = "fault-injection"))]
        let injected = false;
        injected
    }

    /// Debug builds only: asserts [`Pool::check_invariants`] after a
    /// change, while the pool holds at most
    /// [`CHECK_AFTER_CHANGE_MAX_SEGMENTS`] segments.
    fn check_after_change(&self) {
        if cfg!(debug_assertions)
            && !self.fault_injected()
            && self.segments_in_use() <= CHECK_AFTER_CHANGE_MAX_SEGMENTS
        {
            if let Err(broken) = self.check_invariants() {
                debug_assert!(false, "pool invariant broken: {}", broken);
            }
            debug_assert!(self.index_is_sound(), "the free-run index is stale");
        }
    }

    /// Parked requests plus unpolled completions: the `PARKED` places
    /// taken.
    fn places_taken(&self) -> usize {
        self.parked.len().saturating_add(self.completed.len())
    }

    /// Queues the completion of a request that just left the parked list.
    /// Parked and completed share `PARKED` places, so there is room: the
    /// request's own place.
    fn push_completion(&mut self, completion: Completion) {
        if self.completed.push_back(completion).is_err() {
            debug_assert!(false, "no place for a completion");
        }
        debug_assert!(
            self.places_taken() <= PARKED,
            "more than PARKED places taken"
        );
    }

    /// The LUNs, by index.
    pub fn luns(&self) -> &[Lun] {
        &self.luns
    }

    /// Extents in all LUNs.
    pub fn total_extents(&self) -> u64 {
        self.luns.iter().map(|l| u64::from(l.extents)).sum()
    }

    /// Free extents: those of every LUN (draining ones too) that no
    /// segment holds and that are not released. O(S) for S segments.
    pub fn free_extents(&self) -> u64 {
        let mut free = 0u64;
        for lun in 0..self.luns.len() {
            self.free_runs_on(lun, |r| free = free.saturating_add(u64::from(r.extents)));
        }
        free
    }

    /// Adds a LUN of `extents` extents at the next index, then serves
    /// parked requests (see the [module docs](self)); their completions
    /// are then ready for [`Pool::poll_completed`].
    ///
    /// Refused with: [`PoolError::NilId`], [`PoolError::EmptyLun`] (zero
    /// extents), [`PoolError::LunTooLarge`], [`PoolError::DuplicateLun`],
    /// [`PoolError::TooManyLuns`], checked in this order.
    pub fn add_lun(&mut self, id: Uuid, extents: u32) -> Result<LunIndex, PoolError> {
        if id.is_nil() {
            return Err(PoolError::NilId);
        }
        if extents == 0 {
            return Err(PoolError::EmptyLun);
        }
        if self.bytes(u64::from(extents)).is_none() {
            return Err(PoolError::LunTooLarge);
        }
        if self.luns.iter().any(|l| l.id == id) {
            return Err(PoolError::DuplicateLun);
        }
        let index = LunIndex::try_from(self.luns.len()).map_err(|_| PoolError::TooManyLuns)?;
        let (total_before, free_before) = (self.total_extents(), self.free_extents());
        let places_before = self.places_taken();
        self.luns
            .push(Lun {
                id,
                extents,
                used: 0,
            })
            .map_err(|_| PoolError::TooManyLuns)?;
        if let Some(mark) = self.floor_marks.get_mut(usize::from(index)) {
            *mark = 0;
        }
        if let Some(draining) = self.draining.get_mut(usize::from(index)) {
            *draining = false;
        }
        debug!("pool: LUN {} added with {} extents", index, extents);
        self.serve_parked();
        debug_assert_eq!(self.total_extents(), total_before + u64::from(extents));
        debug_assert!(
            self.free_extents() <= free_before + u64::from(extents),
            "adding a LUN freed extents it did not bring"
        );
        // Serving moves requests from the parked list to the completions.
        debug_assert_eq!(self.places_taken(), places_before);
        self.check_after_change();
        Ok(index)
    }

    /// The position of LV `id` in `self.volumes`, or where it would go.
    fn find(&self, id: Uuid) -> Result<usize, usize> {
        self.volumes.binary_search_by(|v| v.id.cmp(&id))
    }

    /// The LV `id`, if it exists.
    fn get(&self, id: Uuid) -> Option<&Volume<SEGS>> {
        self.find(id).ok().and_then(|i| self.volumes.get(i))
    }

    /// Creates thin LV `id` of `virtual_size` bytes with `initial_size`
    /// bytes allocated (rounded up to whole extents, at least one).
    ///
    /// Refused with, in this order: [`PoolError::NilId`];
    /// [`PoolError::InvalidSize`] (a virtual size that is zero, not whole
    /// sectors or too large, or an initial size that is not whole
    /// sectors); [`PoolError::DuplicateVolume`];
    /// [`PoolError::TooManyVolumes`]; [`PoolError::OverLimit`] (initial
    /// size above the limit); [`PoolError::NoSpace`] (creation is never
    /// parked); [`PoolError::SegmentsFull`] (the extents would need more
    /// than `SEGS` segments).
    pub fn create_volume(
        &mut self,
        id: Uuid,
        virtual_size: u64,
        initial_size: u64,
    ) -> Result<(), PoolError> {
        if id.is_nil() {
            return Err(PoolError::NilId);
        }
        if virtual_size == 0 || virtual_size % SECTOR_SIZE != 0 {
            return Err(PoolError::InvalidSize { size: virtual_size });
        }
        if initial_size % SECTOR_SIZE != 0 {
            return Err(PoolError::InvalidSize { size: initial_size });
        }
        let limit = max_size(virtual_size, self.extent_size)
            .ok_or(PoolError::InvalidSize { size: virtual_size })?;
        let Err(position) = self.find(id) else {
            return Err(PoolError::DuplicateVolume);
        };
        if self.volumes.is_full() {
            return Err(PoolError::TooManyVolumes);
        }
        if initial_size > limit {
            return Err(PoolError::OverLimit { limit });
        }
        let extents = self.extents_for(initial_size).max(1);
        let free_before = self.free_extents();
        let plan = self.plan(&[], extents)?;
        let mut segments = Vec::new();
        apply(&mut self.luns, &mut segments, &plan)?;
        let volume = Volume {
            id,
            virtual_size,
            segments,
        };
        // Room was checked above; on the impossible failure nothing leaks
        // silently: the invariant checker reports the extents.
        self.volumes
            .insert(position, volume)
            .map_err(|_| PoolError::TooManyVolumes)?;
        self.rebuild_order();
        debug!("pool: LV {} created with {} extents", id, extents);
        debug_assert_eq!(self.free_extents(), free_before - extents);
        debug_assert_eq!(self.get(id).map(|v| v.extents()), Some(extents));
        self.check_after_change();
        Ok(())
    }

    /// Extends LV `volume` to at least `target_size` bytes (an absolute
    /// size: asking again changes nothing). `urgent` means the guest is
    /// paused; it matters only if the request is parked.
    ///
    /// - `Ok(Extended { size })`: the LV now has `size >= target_size`
    ///   bytes (if it already had, nothing changed).
    /// - `Ok(Parked { size })`: not enough free extents; nothing was
    ///   allocated and the request waits for [`Pool::add_lun`].
    ///
    /// Refused with, in this order: [`PoolError::InvalidSize`] (zero or
    /// not whole sectors); [`PoolError::UnknownVolume`];
    /// [`PoolError::OverLimit`]; [`PoolError::SegmentsFull`];
    /// [`PoolError::ParkedFull`].
    pub fn extend(
        &mut self,
        volume: Uuid,
        target_size: u64,
        urgent: bool,
    ) -> Result<Extend, PoolError> {
        if target_size == 0 || target_size % SECTOR_SIZE != 0 {
            return Err(PoolError::InvalidSize { size: target_size });
        }
        let index = self.find(volume).map_err(|_| PoolError::UnknownVolume)?;
        let extent_size = self.extent_size;
        let target_extents = self.extents_for(target_size);
        // O(S): only for the debug checks below.
        let free_before = if cfg!(debug_assertions) {
            self.free_extents()
        } else {
            0
        };
        let Some(lv) = self.volumes.get(index) else {
            return Err(PoolError::UnknownVolume);
        };
        let extents = lv.extents();
        let size = extents.saturating_mul(extent_size);
        if target_size <= size {
            return Ok(Extend::Extended { size });
        }
        let limit = max_size(lv.virtual_size, extent_size)
            .ok_or(PoolError::Invariant(Invariant::VirtualSize { volume }))?;
        if target_size > limit {
            return Err(PoolError::OverLimit { limit });
        }
        // target_size > size, so the LV lacks at least one extent.
        debug_assert!(target_extents > extents, "extending to no more extents");
        let need = target_extents.saturating_sub(extents);
        let planned = self.plan(&lv.segments, need);
        match planned {
            Ok(plan) => {
                let lv = self
                    .volumes
                    .get_mut(index)
                    .ok_or(PoolError::UnknownVolume)?;
                let before = lv.segments.len();
                apply(&mut self.luns, &mut lv.segments, &plan)?;
                // The deliberate bug: the LV got the extents, the index
                // still says they are free, so the next extension hands
                // them out again.
                if !self.fault_injected() {
                    self.index_appended(index, before);
                }
                let size = target_extents.saturating_mul(extent_size);
                trace!("pool: LV {} extended to {} bytes", volume, size);
                // Never shrinks, reaches the target, takes exactly the
                // extents it lacked.
                debug_assert_eq!(self.volume(volume).map(|v| v.size), Some(size));
                debug_assert!(size >= target_size, "extended short of the target");
                if !self.fault_injected() {
                    debug_assert_eq!(self.free_extents(), free_before - need);
                }
                self.complete_satisfied(volume, size);
                self.check_after_change();
                Ok(Extend::Extended { size })
            }
            Err(PoolError::NoSpace { .. }) => {
                self.park(volume, target_size, urgent)?;
                debug_assert_eq!(self.free_extents(), free_before, "parking allocated");
                debug_assert_eq!(self.volume(volume).map(|v| v.size), Some(size));
                self.check_after_change();
                Ok(Extend::Parked { size })
            }
            Err(other) => Err(other),
        }
    }

    /// If `volume` has a parked request that `size` satisfies, completes
    /// it.
    fn complete_satisfied(&mut self, volume: Uuid, size: u64) {
        if let Some(position) = self
            .parked
            .iter()
            .position(|p| p.volume == volume && p.target_size <= size)
        {
            self.parked.remove(position);
            self.push_completion(Completion { volume, size });
        }
    }

    /// Records a request that does not fit.
    fn park(&mut self, volume: Uuid, target_size: u64, urgent: bool) -> Result<(), PoolError> {
        if let Some(p) = self.parked.iter_mut().find(|p| p.volume == volume) {
            p.target_size = p.target_size.max(target_size);
            p.urgent |= urgent;
            return Ok(());
        }
        if self.places_taken() >= PARKED {
            return Err(PoolError::ParkedFull);
        }
        debug!("pool: LV {} parked for {} bytes", volume, target_size);
        self.parked
            .push(Parked {
                volume,
                target_size,
                urgent,
            })
            .map_err(|_| PoolError::ParkedFull)
    }

    /// Brings the parked list in line with the requests that still wait:
    /// `still_waiting(volume)` says what the requests for `volume` that
    /// wait for capacity ask now, as `(largest target, any urgent)`, or
    /// `None` if none waits any more (the hosts withdrew them). Each
    /// parked entry is then
    ///
    /// - removed, without a completion, if nothing waits for its LV;
    /// - lowered to the largest target still asked (never raised) and
    ///   urgent only if it was and a waiting request still is; it keeps
    ///   its place in the order;
    /// - completed at once if the LV already has what is still asked.
    ///
    /// So capacity added later serves only what is still asked for.
    /// Returns how many entries changed.
    pub fn withdraw_parked(
        &mut self,
        mut still_waiting: impl FnMut(Uuid) -> Option<(u64, bool)>,
    ) -> usize {
        let mut changed = 0;
        let mut i = 0;
        let places_before = self.places_taken();
        // Each round keeps or removes entry `i`, so PARKED rounds suffice.
        for _ in 0..PARKED {
            let Some(p) = self.parked.get(i).copied() else {
                break;
            };
            let size = self.volume(p.volume).map_or(0, |v| v.size);
            let now = still_waiting(p.volume).map(|(target, urgent)| Parked {
                volume: p.volume,
                target_size: p.target_size.min(target),
                urgent: p.urgent && urgent,
            });
            match now {
                Some(q) if q == p => i += 1,
                Some(q) if q.target_size > size => {
                    debug_assert!(
                        q.target_size <= p.target_size,
                        "withdrawing raised a target"
                    );
                    debug!(
                        "pool: parked LV {} lowered to {} bytes",
                        p.volume, q.target_size
                    );
                    if let Some(slot) = self.parked.get_mut(i) {
                        *slot = q;
                    }
                    changed += 1;
                    i += 1;
                }
                Some(_) => {
                    // What still waits fits the LV as it is.
                    self.parked.remove(i);
                    self.push_completion(Completion {
                        volume: p.volume,
                        size,
                    });
                    changed += 1;
                }
                None => {
                    debug!("pool: parked LV {} withdrawn", p.volume);
                    self.parked.remove(i);
                    changed += 1;
                }
            }
        }
        debug_assert!(i == self.parked.len(), "withdrawing stopped early");
        debug_assert!(
            self.places_taken() <= places_before,
            "withdrawing took places"
        );
        self.check_after_change();
        changed
    }

    /// Serves parked requests in priority order until one does not fit.
    fn serve_parked(&mut self) {
        // Each round removes an entry or stops, so PARKED rounds suffice.
        for _ in 0..PARKED {
            let Some(position) =
                self.parked
                    .iter()
                    .position(|p| p.urgent)
                    .or(if self.parked.is_empty() {
                        None
                    } else {
                        Some(0)
                    })
            else {
                return;
            };
            let Some(request) = self.parked.get(position).copied() else {
                return;
            };
            let size = match self.serve(request) {
                Ok(size) => size,
                Err(PoolError::NoSpace { .. }) => return,
                // Cannot ever be served as asked (segments full, or the LV
                // is gone): dropped, reported with the LV's current size.
                Err(_) => self.volume(request.volume).map_or(0, |v| v.size),
            };
            self.parked.remove(position);
            debug!(
                "pool: parked LV {} completed at {} bytes",
                request.volume, size
            );
            self.push_completion(Completion {
                volume: request.volume,
                size,
            });
        }
    }

    /// Extends for a parked request; `Ok(size)` after.
    fn serve(&mut self, request: Parked) -> Result<u64, PoolError> {
        let extent_size = self.extent_size;
        let target_extents = self.extents_for(request.target_size);
        let index = self
            .find(request.volume)
            .map_err(|_| PoolError::UnknownVolume)?;
        let lv = self.volumes.get(index).ok_or(PoolError::UnknownVolume)?;
        let extents = lv.extents();
        if extents < target_extents {
            let plan = self.plan(&lv.segments, target_extents.saturating_sub(extents))?;
            let lv = self
                .volumes
                .get_mut(index)
                .ok_or(PoolError::UnknownVolume)?;
            let before = lv.segments.len();
            apply(&mut self.luns, &mut lv.segments, &plan)?;
            self.index_appended(index, before);
        }
        let extents = self.volumes.get(index).map_or(0, |v| v.extents());
        debug_assert!(extents >= target_extents, "served short of the target");
        Ok(extents.saturating_mul(extent_size))
    }

    /// Takes the oldest completion of a parked request, if any.
    pub fn poll_completed(&mut self) -> Option<Completion> {
        let completion = self.completed.pop_front();
        self.check_after_change();
        completion
    }

    /// The parked requests, in the order they will be served: urgent ones
    /// first, each group in the order it was parked.
    pub fn parked(&self) -> impl Iterator<Item = Parked> + '_ {
        let urgent = self.parked.iter().filter(|p| p.urgent);
        let normal = self.parked.iter().filter(|p| !p.urgent);
        urgent.chain(normal).copied()
    }

    /// What the pool knows about LV `id`.
    pub fn volume(&self, id: Uuid) -> Option<VolumeInfo> {
        self.get(id).map(|v| self.info(v))
    }

    /// The [`VolumeInfo`] of a stored LV.
    fn info(&self, v: &Volume<SEGS>) -> VolumeInfo {
        VolumeInfo {
            id: v.id,
            virtual_size: v.virtual_size,
            size: v.extents().saturating_mul(self.extent_size),
            limit: max_size(v.virtual_size, self.extent_size).unwrap_or(u64::MAX),
        }
    }

    /// All LVs, in ascending UUID order.
    pub fn volumes(&self) -> impl Iterator<Item = VolumeInfo> + '_ {
        self.volumes.iter().map(|v| self.info(v))
    }

    /// The segments of LV `id`, in LV order.
    pub fn segments(&self, id: Uuid) -> Option<&[Segment]> {
        self.get(id).map(|v| v.segments.as_slice())
    }

    /// Where byte `offset` of LV `volume` lives: `(LUN index, byte offset
    /// in that LUN)`. `None` if the LV is unknown or `offset` is at or
    /// beyond its size.
    pub fn map(&self, volume: Uuid, offset: u64) -> Option<(LunIndex, u64)> {
        let lv = self.get(volume)?;
        let shift = self.shift();
        let extent = offset >> shift;
        let within = offset & self.extent_size.wrapping_sub(1);
        let mut base = 0u64;
        for s in &lv.segments {
            let next = base.checked_add(u64::from(s.extents))?;
            if extent < next {
                let lun_extent =
                    u64::from(s.first_extent).checked_add(extent.checked_sub(base)?)?;
                let at = self.bytes(lun_extent)?.checked_add(within)?;
                return Some((s.lun, at));
            }
            base = next;
        }
        None
    }

    /// Verifies the pool from scratch:
    ///
    /// - the extent size is valid; no nil or duplicate UUIDs; LVs sorted;
    /// - every LUN has extents, fits a `u64` of bytes, and its high-water
    ///   mark is within it;
    /// - every LV has a valid virtual size, owns at least one extent and no
    ///   more than its limit;
    /// - every segment is non-empty, on an existing LUN, and below that
    ///   LUN's high-water mark;
    /// - the floor and every released run lie below their LUN's
    ///   high-water mark, released runs are non-empty and sorted;
    /// - no two segments (or released runs) share an extent;
    /// - the parked list names existing LVs, once each, with targets above
    ///   the LV's size and within its limit, and fits `PARKED` together
    ///   with the completions.
    ///
    /// Costs O(S × (S / 128 + LUNs) × log 128) for S segments in use (at most
    /// `LVS × SEGS`; about 7 ms on a PC for a full [`DefaultPool`]):
    /// meant for commits ([`Pool::encode`] runs it first, also in release
    /// builds), decoding, tests and debug builds (after every change, up
    /// to [`CHECK_AFTER_CHANGE_MAX_SEGMENTS`] segments), not for every
    /// request of a release build.
    pub fn check_invariants(&self) -> Result<(), Invariant> {
        if !valid_extent_size(self.extent_size) {
            return Err(Invariant::ExtentSize);
        }
        for (index, lun) in self.luns.iter().enumerate() {
            let lun_index = LunIndex::try_from(index).unwrap_or(LunIndex::MAX);
            if lun.id.is_nil() {
                return Err(Invariant::NilId);
            }
            if self.luns.iter().take(index).any(|l| l.id == lun.id) {
                return Err(Invariant::DuplicateLun { lun: lun_index });
            }
            if lun.extents == 0
                || lun.used > lun.extents
                || self.bytes(u64::from(lun.extents)).is_none()
            {
                return Err(Invariant::LunBounds { lun: lun_index });
            }
        }
        let mut previous: Option<Uuid> = None;
        for lv in &self.volumes {
            let volume = lv.id;
            if volume.is_nil() {
                return Err(Invariant::NilId);
            }
            if previous.is_some_and(|p| p >= volume) {
                return Err(Invariant::VolumeOrder { volume });
            }
            previous = Some(volume);
            if lv.virtual_size == 0 || lv.virtual_size % SECTOR_SIZE != 0 {
                return Err(Invariant::VirtualSize { volume });
            }
            let limit = max_size(lv.virtual_size, self.extent_size)
                .ok_or(Invariant::VirtualSize { volume })?;
            for (position, s) in lv.segments.iter().enumerate() {
                let in_bounds = s.extents > 0
                    && self
                        .luns
                        .get(usize::from(s.lun))
                        .is_some_and(|l| s.end() <= u64::from(l.used));
                if !in_bounds {
                    let segment = u16::try_from(position).unwrap_or(u16::MAX);
                    return Err(Invariant::SegmentBounds { volume, segment });
                }
            }
            let extents = lv.extents();
            if extents == 0 {
                return Err(Invariant::EmptyVolume { volume });
            }
            if self.bytes(extents).is_none_or(|size| size > limit) {
                return Err(Invariant::OverLimit { volume });
            }
        }
        for (index, lun) in self.luns.iter().enumerate() {
            if self.floor_end(index) > lun.used {
                let lun = LunIndex::try_from(index).unwrap_or(LunIndex::MAX);
                return Err(Invariant::Released { lun });
            }
        }
        for (i, r) in self.released.iter().enumerate() {
            let in_bounds = r.extents > 0
                && self
                    .luns
                    .get(usize::from(r.lun))
                    .is_some_and(|l| r.end() <= u64::from(l.used));
            let sorted = i
                .checked_sub(1)
                .and_then(|p| self.released.get(p))
                .is_none_or(|q| (q.lun, q.first) < (r.lun, r.first));
            if !in_bounds || !sorted {
                return Err(Invariant::Released { lun: r.lun });
            }
        }
        self.check_disjoint()?;
        self.check_parked()
    }

    /// No two segments (and released runs) share an extent.
    ///
    /// Every segment is non-empty and below its LUN's high-water mark
    /// (checked before), so the runs of a LUN are disjoint exactly when, in
    /// order of their first extents, each starts at or after the end of
    /// the one before: [`Pool::disjoint_on`] walks them so. Only if a LUN
    /// fails is the pair of segments that overlap searched (pairwise) to
    /// name it; if none does, a released run is out of place.
    fn check_disjoint(&self) -> Result<(), Invariant> {
        for index in 0..self.luns.len() {
            if !self.disjoint_on(index) {
                self.find_overlap()?;
                let lun = LunIndex::try_from(index).unwrap_or(LunIndex::MAX);
                return Err(Invariant::Released { lun });
            }
        }
        Ok(())
    }

    /// Whether the segments and released runs on LUN `index`, in order of
    /// their first extents, each start at or after the end of the one
    /// before.
    ///
    /// Needs no memory beyond a batch of [`DISJOINT_BATCH`] runs: each
    /// round scans the LUN's runs for the smallest ones not walked yet (a
    /// bounded max-heap keeps them), sorts them (heapsort) and walks them.
    fn disjoint_on(&self, index: usize) -> bool {
        let on_lun = || {
            let segments = self
                .volumes
                .iter()
                .flat_map(|v| v.segments.iter())
                .filter(move |s| usize::from(s.lun) == index)
                .map(|s| (s.first_extent, s.extents));
            let released = self
                .released
                .iter()
                .filter(move |r| usize::from(r.lun) == index)
                .map(|r| (r.first, r.extents));
            segments.chain(released)
        };
        let count = on_lun().count();
        // The end of the runs walked so far, the last run walked, and how
        // many were walked.
        let mut at = 0u64;
        let mut after: Option<(u32, u32)> = None;
        let mut walked = 0usize;
        let mut batch = [(0u32, 0u32); DISJOINT_BATCH];
        // Each round walks at least one run or returns.
        for _ in 0..=count {
            if walked >= count {
                break;
            }
            let mut len = 0usize;
            for item in on_lun() {
                if after.is_some_and(|a| item <= a) {
                    continue;
                }
                if let Some(slot) = batch.get_mut(len) {
                    *slot = item;
                    len += 1;
                    if len == DISJOINT_BATCH {
                        heapify(&mut batch);
                    }
                } else if let Some(top) = batch.first_mut().filter(|top| item < **top) {
                    *top = item;
                    sift_down(&mut batch, 0);
                }
            }
            let Some(round) = batch.get_mut(..len).filter(|r| !r.is_empty()) else {
                // Runs left but none after the last walked: two equal.
                return false;
            };
            if len < DISJOINT_BATCH {
                heapify(round);
            }
            heapsort(round);
            for &(first, extents) in round.iter() {
                if u64::from(first) < at {
                    return false;
                }
                at = u64::from(first) + u64::from(extents);
                after = Some((first, extents));
                walked += 1;
            }
        }
        walked == count
    }

    /// The first two segments that share an extent, found pairwise
    /// (O(S²)); only called once [`Pool::tiles`] found a LUN amiss.
    fn find_overlap(&self) -> Result<(), Invariant> {
        for (i, a) in self.volumes.iter().enumerate() {
            for (j, sa) in a.segments.iter().enumerate() {
                // The rest of `a`'s own segments, then every later LV's.
                let own = a
                    .segments
                    .iter()
                    .skip(j.saturating_add(1))
                    .map(|s| (a.id, s));
                let later = self
                    .volumes
                    .iter()
                    .skip(i.saturating_add(1))
                    .flat_map(|b| b.segments.iter().map(move |s| (b.id, s)));
                if let Some((b, _)) = own.chain(later).find(|(_, sb)| sa.overlaps(sb)) {
                    return Err(Invariant::Overlap {
                        a: a.id,
                        b,
                        lun: sa.lun,
                    });
                }
            }
        }
        Ok(())
    }

    /// The parked list's invariants.
    fn check_parked(&self) -> Result<(), Invariant> {
        for (i, p) in self.parked.iter().enumerate() {
            let volume = p.volume;
            let bad = Invariant::Parked { volume };
            let info = self.volume(volume).ok_or(bad)?;
            if self.parked.iter().take(i).any(|q| q.volume == volume)
                || p.target_size <= info.size
                || p.target_size > info.limit
            {
                return Err(bad);
            }
        }
        if self.places_taken() > PARKED {
            let volume = self.parked.first().map_or(Uuid::NIL, |p| p.volume);
            return Err(Invariant::Parked { volume });
        }
        Ok(())
    }
}
