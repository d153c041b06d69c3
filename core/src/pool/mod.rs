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
//! Extents are never freed: this version has no LV removal and no shrink.
//! So every LUN has a *high-water mark* ([`Lun::used`]): extents below it
//! belong to exactly one LV, extents above it are free, and allocation
//! hands out the extents right at the mark, in order. That makes handing
//! one extent to two LVs impossible by construction, and allocation O(1)
//! per LUN touched:
//!
//! - An extension takes extents from the LUNs that have free extents, in
//!   LUN order, until it has enough.
//! - On each LUN it touches, if the LV's last segment ends exactly at that
//!   LUN's high-water mark the segment grows (the LV stays contiguous);
//!   otherwise a new segment `(lun, first_extent, extents)` is appended.
//! - All or nothing: an extension is planned first and committed only if
//!   there are enough free extents in the pool *and* enough free segment
//!   slots in the LV (at most `SEGS` segments per LV, else
//!   [`PoolError::SegmentsFull`]). A failed extension changes nothing.
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
//!  32              40                                                64
//!  +---------------+-------------------------------------------------+
//!  |  extent_size  |                  reserved (0)                   |
//!  +---------------+-------------------------------------------------+
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
//! | 8 | 1 | `version` | 1 ([`METADATA_VERSION`]) |
//! | 9 | 7 | reserved | zero |
//! | 16 | 8 | `seq` | commit sequence number; even in copy A, odd in copy B |
//! | 24 | 4 | `payload_len` | bytes of payload after the header |
//! | 28 | 4 | reserved | zero |
//! | 32 | 8 | `extent_size` | bytes per extent |
//! | 40 | 24 | reserved | zero |
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
    METADATA_VERSION, commit_place, max_copy_len, metadata_offset, next_copy,
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
    /// Its high-water mark: extents `0..used` belong to LVs, the rest are
    /// free.
    pub used: u32,
}

impl Lun {
    /// Free extents on this LUN.
    pub fn free(&self) -> u32 {
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
    /// A LUN's high-water mark differs from the extents its segments hold.
    Leak {
        /// The LUN.
        lun: LunIndex,
        /// Its high-water mark.
        used: u32,
        /// The sum of its segments' extents.
        allocated: u64,
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
            Invariant::Leak {
                lun,
                used,
                allocated,
            } => write!(
                f,
                "LUN {lun} has {used} extents used but its segments hold {allocated}"
            ),
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
    /// A deliberate bug, for proving that tests catch it (never stored).
    #[cfg(feature = "fault-injection")]
    forget_extents_used: bool,
}

/// Extents for `need` more, planned against `luns` for an LV whose last
/// segment is `last`: `Ok(new segments)`, or why not.
fn plan(luns: &[Lun], last: Option<Segment>, need: u64) -> Result<usize, PoolError> {
    let mut remaining = need;
    let mut new_segments = 0usize;
    let mut free = 0u64;
    for (index, lun) in luns.iter().enumerate() {
        free = free.saturating_add(u64::from(lun.free()));
        if remaining == 0 || lun.free() == 0 {
            continue;
        }
        let take = remaining.min(u64::from(lun.free()));
        let contiguous = last.is_some_and(|s| {
            usize::from(s.lun) == index && s.end() == u64::from(lun.used) && new_segments == 0
        });
        if !contiguous {
            new_segments = new_segments.saturating_add(1);
        }
        remaining = remaining.saturating_sub(take);
    }
    if remaining > 0 {
        return Err(PoolError::NoSpace { needed: need, free });
    }
    Ok(new_segments)
}

/// Allocates `need` extents to `segments` from `luns` by the allocation
/// rule, all or nothing.
fn allocate<const SEGS: usize>(
    luns: &mut [Lun],
    segments: &mut Vec<Segment, SEGS>,
    need: u64,
) -> Result<(), PoolError> {
    debug_assert!(need > 0, "allocating no extents");
    let new_segments = plan(luns, segments.last().copied(), need)?;
    if segments.len().saturating_add(new_segments) > SEGS {
        return Err(PoolError::SegmentsFull);
    }
    #[cfg(debug_assertions)]
    let (used_before, owned_before, count_before) = (
        luns.iter().map(|l| u64::from(l.used)).sum::<u64>(),
        segments.iter().map(|s| u64::from(s.extents)).sum::<u64>(),
        segments.len(),
    );
    let broken = PoolError::Invariant(Invariant::ExtentSize);
    let mut remaining = need;
    for (index, lun) in luns.iter_mut().enumerate() {
        if remaining == 0 {
            break;
        }
        let free = lun.free();
        if free == 0 {
            continue;
        }
        // `take` <= `free`, a u32.
        let take = u32::try_from(remaining.min(u64::from(free))).map_err(|_| broken)?;
        let lun_index = LunIndex::try_from(index).map_err(|_| broken)?;
        match segments.last_mut() {
            Some(last) if last.lun == lun_index && last.end() == u64::from(lun.used) => {
                last.extents = last.extents.checked_add(take).ok_or(broken)?;
            }
            _ => segments
                .push(Segment {
                    lun: lun_index,
                    first_extent: lun.used,
                    extents: take,
                })
                .map_err(|_| PoolError::SegmentsFull)?,
        }
        lun.used = lun.used.checked_add(take).ok_or(broken)?;
        debug_assert!(lun.used <= lun.extents, "LUN {} used beyond its end", index);
        remaining = remaining.saturating_sub(u64::from(take));
    }
    // The plan said the extents and the segment slots are there.
    debug_assert_eq!(remaining, 0, "allocation fell short of its plan");
    #[cfg(debug_assertions)]
    {
        let used: u64 = luns.iter().map(|l| u64::from(l.used)).sum();
        let owned: u64 = segments.iter().map(|s| u64::from(s.extents)).sum();
        debug_assert_eq!(
            used,
            used_before + need,
            "LUNs marked other than the need used"
        );
        debug_assert_eq!(owned, owned_before + need, "the LV got other than its need");
        debug_assert_eq!(
            segments.len(),
            count_before + new_segments,
            "the allocation took other segment slots than planned"
        );
    }
    Ok(())
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
            && let Err(broken) = self.check_invariants()
        {
            debug_assert!(false, "pool invariant broken: {}", broken);
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

    /// Extents not yet handed to any LV.
    pub fn free_extents(&self) -> u64 {
        self.luns.iter().map(|l| u64::from(l.free())).sum()
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
        let mut segments = Vec::new();
        allocate(&mut self.luns, &mut segments, extents)?;
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
        let free_before = self.free_extents();
        let Some(lv) = self.volumes.get_mut(index) else {
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
        #[cfg(feature = "fault-injection")]
        let luns_before = self.luns.clone();
        match allocate(&mut self.luns, &mut lv.segments, need) {
            Ok(()) => {
                #[cfg(feature = "fault-injection")]
                if self.forget_extents_used {
                    // The bug: the LV got the extents, the LUNs still say
                    // they are free, so the next extension hands them out
                    // again.
                    self.luns = luns_before;
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
        let lv = self
            .volumes
            .get_mut(index)
            .ok_or(PoolError::UnknownVolume)?;
        let extents = lv.extents();
        if extents < target_extents {
            allocate(
                &mut self.luns,
                &mut lv.segments,
                target_extents.saturating_sub(extents),
            )?;
        }
        debug_assert!(lv.extents() >= target_extents, "served short of the target");
        Ok(lv.extents().saturating_mul(extent_size))
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
    /// - no two segments share an extent;
    /// - on every LUN, the high-water mark equals the extents its segments
    ///   hold (so, with the above, every used extent belongs to exactly one
    ///   LV);
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
        self.check_disjoint()?;
        for (index, lun) in self.luns.iter().enumerate() {
            let allocated: u64 = self
                .volumes
                .iter()
                .flat_map(|v| v.segments.iter())
                .filter(|s| usize::from(s.lun) == index)
                .map(|s| u64::from(s.extents))
                .sum();
            if allocated != u64::from(lun.used) {
                return Err(Invariant::Leak {
                    lun: LunIndex::try_from(index).unwrap_or(LunIndex::MAX),
                    used: lun.used,
                    allocated,
                });
            }
        }
        self.check_parked()
    }

    /// No two segments share an extent.
    ///
    /// Every segment is non-empty and below its LUN's high-water mark
    /// (checked before), so the segments of a LUN are disjoint exactly
    /// when, in order of their first extents, they run back to back from
    /// extent 0: [`Pool::tiles`] walks them so. Only if a LUN fails is the
    /// pair that overlaps searched (pairwise) to name it; a LUN whose
    /// segments merely leave a gap is left to the leak check.
    fn check_disjoint(&self) -> Result<(), Invariant> {
        if self
            .luns
            .iter()
            .enumerate()
            .all(|(index, lun)| self.tiles(index, lun.used))
        {
            return Ok(());
        }
        self.find_overlap()
    }

    /// Whether the segments on LUN `index`, in order of their first
    /// extents, run back to back from extent 0 to `used`, each once.
    ///
    /// Needs no memory beyond a batch of [`DISJOINT_BATCH`] segments: each
    /// round scans the LUN's segments for the smallest first extents not
    /// walked yet (a bounded max-heap keeps them), sorts them (heapsort)
    /// and walks them.
    fn tiles(&self, index: usize, used: u32) -> bool {
        let on_lun = || {
            self.volumes
                .iter()
                .flat_map(|v| v.segments.iter())
                .filter(move |s| usize::from(s.lun) == index)
        };
        let count = on_lun().count();
        let end = u64::from(used);
        // The extent the next segment must start at, and segments walked.
        let mut at = 0u64;
        let mut walked = 0usize;
        let mut batch = [(0u32, 0u32); DISJOINT_BATCH];
        // Each round walks at least one segment or returns.
        for _ in 0..=count {
            if at >= end || walked >= count {
                break;
            }
            let mut len = 0usize;
            for s in on_lun() {
                if u64::from(s.first_extent) < at {
                    continue;
                }
                let item = (s.first_extent, s.extents);
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
                // Nothing starts at or after `at`: a gap.
                return false;
            };
            if len < DISJOINT_BATCH {
                heapify(round);
            }
            heapsort(round);
            for &(first, extents) in round.iter() {
                if u64::from(first) != at {
                    return false;
                }
                at += u64::from(extents);
                walked += 1;
            }
        }
        at == end && walked == count
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
