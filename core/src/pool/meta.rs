//! Pool metadata copies: the 64-byte header, the postcard payload, and the
//! choice between copy A and copy B. The layout and the writer protocol are
//! in the [module docs](super).

use core::fmt;

use heapless::Vec;
use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{DefaultPool, Lun, Pool, PoolError, Volume, valid_extent_size};
use crate::wire::{CRC32C, Geometry, Uuid};

/// Bytes 4..8 of a metadata copy: ASCII `SPMP`.
pub const METADATA_MAGIC: [u8; 4] = *b"SPMP";
/// The metadata format version this crate writes; it also reads versions
/// [`METADATA_VERSION_1`] and [`METADATA_VERSION_2`].
pub const METADATA_VERSION: u8 = 3;
/// The second metadata version, still read: as version 3 with `moving`
/// nil (its bytes 48..64 were reserved, zero).
pub const METADATA_VERSION_2: u8 = 2;
/// The first metadata version, still read: as version 3 with
/// `release_seq` 0 and `moving` nil (its bytes 40..64 were reserved, zero).
pub const METADATA_VERSION_1: u8 = 1;
/// Length of the header that starts every metadata copy.
pub const METADATA_HEADER_LEN: usize = 64;

/// The space to reserve for each metadata copy of a [`DefaultPool`]:
/// 454 656 bytes (444 KiB, 111 blocks of 4 KiB).
///
/// It is [`Pool::MAX_COPY_LEN`] of [`DefaultPool`] (454 115 bytes: the
/// header plus the payload with every limit reached, 16 LUNs, 1024 LVs of
/// 32 segments each, and every integer at its longest varint) rounded up to
/// whole 4 KiB blocks, so each copy can be written with aligned whole-block
/// I/O on 512- and 4096-byte-sector devices. Any state a `DefaultPool` can
/// reach therefore fits: a commit never fails for lack of room.
pub const METADATA_COPY_SIZE: usize = DefaultPool::MAX_COPY_LEN.next_multiple_of(BLOCK);

/// Metadata copies are whole blocks of this many bytes.
const BLOCK: usize = 4096;

/// Bytes of the longest varint postcard writes for an unsigned integer of
/// `bits` bits (7 bits per byte).
const fn varint_max(bits: usize) -> usize {
    bits.div_ceil(7)
}

/// Bytes of the varint postcard writes for the length `n`.
const fn varint_len(n: usize) -> usize {
    let mut bytes = 1;
    let mut rest = n >> 7;
    while rest != 0 {
        bytes += 1;
        rest >>= 7;
    }
    bytes
}

/// The most bytes a metadata copy (header and payload) can take for a pool
/// of `luns` LUNs, `lvs` LVs and `segs` segments per LV, each at its limit
/// and every integer at its longest varint.
///
/// Saturates at `usize::MAX` instead of overflowing (a pool type that large
/// is refused at compile time anyway: `payload_len` is a `u32`).
pub const fn max_copy_len(luns: usize, lvs: usize, segs: usize) -> usize {
    const UUID: usize = 16;
    let lun = UUID + varint_max(32) + varint_max(32);
    let segment = varint_max(16) + varint_max(32) + varint_max(32);
    let volume =
        (UUID + varint_max(64) + varint_len(segs)).saturating_add(segs.saturating_mul(segment));
    (METADATA_HEADER_LEN + varint_len(luns) + varint_len(lvs))
        .saturating_add(luns.saturating_mul(lun))
        .saturating_add(lvs.saturating_mul(volume))
}

/// Which copy (0 = A, 1 = B) a commit of sequence number `seq` is written
/// to: `seq % 2`. Successive commits alternate, each overwriting the copy
/// with the older state.
pub fn next_copy(seq: u64) -> usize {
    usize::from(seq % 2 == 1)
}

/// Where the metadata copies start on a domain's device: the first
/// [`METADATA_ALIGN`] boundary after the mailbox of `geometry`. Copy A
/// follows at that offset, copy B [`METADATA_COPY_SIZE`] bytes later.
pub const fn metadata_offset(geometry: &Geometry) -> u64 {
    geometry.mailbox_size().next_multiple_of(METADATA_ALIGN)
}

/// Metadata copies start on a boundary of this many bytes (1 MiB) on the
/// domain's device.
pub const METADATA_ALIGN: u64 = 1 << 20;

/// Where a commit of sequence number `seq` goes on a domain's device of
/// `geometry`, and how many bytes of a copy that [`Pool::encode`] made
/// `used` bytes long to write there: the copy rounded up to whole 4 KiB
/// blocks (so that it can be written with aligned direct I/O), never more
/// than [`METADATA_COPY_SIZE`]. The bytes past `used` are the zeroes
/// `encode` left in its buffer.
pub fn commit_place(geometry: &Geometry, seq: u64, used: usize) -> (u64, usize) {
    let offset = metadata_offset(geometry)
        .saturating_add((next_copy(seq) as u64).saturating_mul(METADATA_COPY_SIZE as u64));
    let len = used.min(METADATA_COPY_SIZE).next_multiple_of(BLOCK);
    (offset, len)
}

/// The header of a metadata copy.
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawHeader {
    /// CRC32C of bytes 4..64 followed by the payload.
    crc: U32,
    /// [`METADATA_MAGIC`].
    magic: [u8; 4],
    /// [`METADATA_VERSION`].
    version: u8,
    reserved0: [u8; 7],
    /// Commit sequence number.
    seq: U64,
    /// Bytes of payload after the header.
    payload_len: U32,
    reserved1: [u8; 4],
    /// Bytes per extent.
    extent_size: U64,
    /// The sequence number of the newest commit that released extents.
    release_seq: U64,
    /// The volume being moved (nil: none).
    moving: [u8; 16],
}

const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<RawHeader>() == METADATA_HEADER_LEN);
    assert!(align_of::<RawHeader>() == 1);
    assert!(offset_of!(RawHeader, crc) == 0);
    assert!(offset_of!(RawHeader, magic) == 4);
    assert!(offset_of!(RawHeader, version) == 8);
    assert!(offset_of!(RawHeader, reserved0) == 9);
    assert!(offset_of!(RawHeader, seq) == 16);
    assert!(offset_of!(RawHeader, payload_len) == 24);
    assert!(offset_of!(RawHeader, reserved1) == 28);
    assert!(offset_of!(RawHeader, extent_size) == 32);
    assert!(offset_of!(RawHeader, release_seq) == 40);
    assert!(offset_of!(RawHeader, moving) == 48);
    assert!(METADATA_COPY_SIZE % BLOCK == 0);
    // Versions 2 and 3 added no payload: the space reserved per copy is
    // that of version 1.
    assert!(METADATA_COPY_SIZE == 454_656);
    assert!(METADATA_COPY_SIZE >= DefaultPool::MAX_COPY_LEN);
};

/// Reserved byte ranges of the header, which must be zero.
const RESERVED: [core::ops::Range<usize>; 2] = [9..16, 28..32];

/// Bytes of the header that version 1 reserved and versions 2 and 3 use
/// (`release_seq`, `moving`): zero in a version 1 copy.
const RESERVED_IN_VERSION_1: core::ops::Range<usize> = 40..64;

/// Bytes of the header that version 2 reserved and version 3 uses
/// (`moving`): zero in a version 2 copy.
const RESERVED_IN_VERSION_2: core::ops::Range<usize> = 48..64;

/// Why a metadata copy is not used. Checked in this order; the first that
/// applies is reported.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum CopyDefect {
    /// Shorter than the header.
    TooShort {
        /// The length given.
        len: u64,
    },
    /// The header is all zero: never written (or zeroed by a format).
    Empty,
    /// Bytes 4..8 are not [`METADATA_MAGIC`].
    BadMagic,
    /// `payload_len` reaches past the end of the copy or beyond the most
    /// this pool type can ever write.
    PayloadLength {
        /// The `payload_len` found.
        payload_len: u32,
    },
    /// The CRC32C does not match: torn or corrupted.
    Checksum {
        /// The CRC stored in bytes 0..4.
        stored: u32,
        /// The CRC of the bytes as read.
        computed: u32,
    },
    /// A metadata version this reader does not know (it reads 1 to 3).
    UnsupportedVersion {
        /// The version found.
        version: u8,
    },
    /// A reserved header byte is not zero.
    ReservedNotZero {
        /// Its offset in the header.
        offset: u8,
    },
    /// The extent size is not a valid extent size.
    ExtentSize {
        /// The extent size found.
        extent_size: u64,
    },
    /// The sequence number's parity does not match the copy's place (even
    /// in A, odd in B): a copy written to the wrong place.
    Misplaced {
        /// The sequence number found.
        seq: u64,
    },
    /// The payload does not parse, has bytes left over, has a varint
    /// longer than its shortest form, or exceeds this pool type's limits.
    Payload,
    /// The state parses but breaks an invariant.
    Inconsistent(super::Invariant),
}

impl fmt::Display for CopyDefect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            CopyDefect::TooShort { len } => write!(
                f,
                "{len} bytes, shorter than the {METADATA_HEADER_LEN}-byte header"
            ),
            CopyDefect::Empty => f.write_str("empty (all-zero header)"),
            CopyDefect::BadMagic => f.write_str("not pool metadata (bad magic)"),
            CopyDefect::PayloadLength { payload_len } => {
                write!(f, "payload length {payload_len} is out of range")
            }
            CopyDefect::Checksum { stored, computed } => write!(
                f,
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): torn or corrupted"
            ),
            CopyDefect::UnsupportedVersion { version } => write!(
                f,
                "metadata version {version} is not supported (this reader knows versions {METADATA_VERSION_1} to {METADATA_VERSION})"
            ),
            CopyDefect::ReservedNotZero { offset } => {
                write!(f, "reserved header byte at offset {offset} is not zero")
            }
            CopyDefect::ExtentSize { extent_size } => {
                write!(f, "invalid extent size {extent_size}")
            }
            CopyDefect::Misplaced { seq } => {
                write!(f, "sequence {seq} does not belong in this copy")
            }
            CopyDefect::Payload => {
                f.write_str("payload does not parse or exceeds the pool's limits")
            }
            CopyDefect::Inconsistent(broken) => write!(f, "inconsistent state: {broken}"),
        }
    }
}

impl core::error::Error for CopyDefect {}

/// A copy whose header checked out.
#[derive(Clone, Copy)]
struct Header<'a> {
    seq: u64,
    extent_size: u64,
    release_seq: u64,
    moving: Uuid,
    payload: &'a [u8],
}

/// Checks the header and CRC of the copy at `place` (0 = A, 1 = B) for a
/// pool type whose payload is at most `max_payload` bytes.
fn open(copy: &[u8], place: usize, max_payload: usize) -> Result<Header<'_>, CopyDefect> {
    let too_short = CopyDefect::TooShort {
        len: u64::try_from(copy.len()).unwrap_or(u64::MAX),
    };
    let (head, rest) = copy
        .split_first_chunk::<METADATA_HEADER_LEN>()
        .ok_or(too_short)?;
    if head.iter().all(|&b| b == 0) {
        return Err(CopyDefect::Empty);
    }
    let raw: &RawHeader = zerocopy::transmute_ref!(head);
    if raw.magic != METADATA_MAGIC {
        return Err(CopyDefect::BadMagic);
    }
    let payload_len = raw.payload_len.get();
    let payload = usize::try_from(payload_len)
        .ok()
        .filter(|&len| len <= max_payload)
        .and_then(|len| rest.get(..len))
        .ok_or(CopyDefect::PayloadLength { payload_len })?;
    let stored = raw.crc.get();
    let mut digest = CRC32C.digest();
    digest.update(head.get(4..).unwrap_or_default());
    digest.update(payload);
    let computed = digest.finalize();
    if stored != computed {
        return Err(CopyDefect::Checksum { stored, computed });
    }
    let older = match raw.version {
        METADATA_VERSION => None,
        METADATA_VERSION_2 => Some(RESERVED_IN_VERSION_2),
        METADATA_VERSION_1 => Some(RESERVED_IN_VERSION_1),
        version => return Err(CopyDefect::UnsupportedVersion { version }),
    };
    for range in RESERVED.into_iter().chain(older) {
        let start = range.start;
        if let Some(pos) = head.get(range).and_then(crate::wire::first_nonzero) {
            let offset = u8::try_from(start + pos).unwrap_or(u8::MAX);
            return Err(CopyDefect::ReservedNotZero { offset });
        }
    }
    let extent_size = raw.extent_size.get();
    if !valid_extent_size(extent_size) {
        return Err(CopyDefect::ExtentSize { extent_size });
    }
    let seq = raw.seq.get();
    if next_copy(seq) != place {
        return Err(CopyDefect::Misplaced { seq });
    }
    Ok(Header {
        seq,
        extent_size,
        release_seq: raw.release_seq.get(),
        moving: Uuid(raw.moving),
        payload,
    })
}

/// Deserializes a postcard sequence by pushing each element into an
/// existing bounded vector (so a large pool is never built on the stack
/// twice).
struct Fill<'v, T, const N: usize>(&'v mut Vec<T, N>);

impl<'de, T: de::Deserialize<'de>, const N: usize> DeserializeSeed<'de> for Fill<'_, T, N> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de, T: de::Deserialize<'de>, const N: usize> Visitor<'de> for Fill<'_, T, N> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a sequence of at most {N} elements")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(value) = seq.next_element::<T>()? {
            if self.0.push(value).is_err() {
                return Err(de::Error::invalid_length(N.saturating_add(1), &self));
            }
        }
        Ok(())
    }
}

/// Deserializes the payload, `(luns, volumes)`, into a pool's vectors.
struct State<'p, const LUNS: usize, const LVS: usize, const SEGS: usize> {
    luns: &'p mut Vec<Lun, LUNS>,
    volumes: &'p mut Vec<Volume<SEGS>, LVS>,
}

impl<'de, const LUNS: usize, const LVS: usize, const SEGS: usize> DeserializeSeed<'de>
    for State<'_, LUNS, LVS, SEGS>
{
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_tuple(2, self)
    }
}

impl<'de, const LUNS: usize, const LVS: usize, const SEGS: usize> Visitor<'de>
    for State<'_, LUNS, LVS, SEGS>
{
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the LUNs and the volumes")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let missing = |n| de::Error::invalid_length(n, &"LUNs and volumes");
        seq.next_element_seed(Fill(self.luns))?
            .ok_or_else(|| missing(0))?;
        seq.next_element_seed(Fill(self.volumes))?
            .ok_or_else(|| missing(1))?;
        Ok(())
    }
}

impl<const LUNS: usize, const LVS: usize, const SEGS: usize, const PARKED: usize>
    Pool<LUNS, LVS, SEGS, PARKED>
{
    /// The most payload bytes this pool type can write.
    const MAX_PAYLOAD_LEN: usize = Self::MAX_COPY_LEN - METADATA_HEADER_LEN;

    /// Writes a metadata copy of the pool with sequence number `seq` to
    /// the start of `out` and zeroes the rest of `out`; returns the copy's
    /// length. The copy goes to place [`next_copy`]`(seq)`. The parked list
    /// and completions are not part of it, nor the released runs: its
    /// `release_seq` is [`Pool::release_seq_for`]`(seq)`, `seq` itself if
    /// the pool released extents since the last [`Pool::stamp_released`];
    /// the caller calls `stamp_released(seq)` once this copy is durable.
    ///
    /// A buffer of [`Pool::MAX_COPY_LEN`] bytes (for [`DefaultPool`],
    /// [`METADATA_COPY_SIZE`]) always suffices; a smaller one may not, and
    /// then the answer is [`PoolError::BufferTooSmall`] with the bytes this
    /// copy needs.
    ///
    /// The pool checks its invariants first ([`Pool::check_invariants`],
    /// in every build): a pool that breaks one (a bug) is refused with
    /// [`PoolError::Invariant`] and `out` is left untouched, so that no
    /// commit writes a state that decoding would refuse.
    pub fn encode(&self, seq: u64, out: &mut [u8]) -> Result<usize, PoolError> {
        if !self.fault_injected() {
            self.check_invariants().map_err(PoolError::Invariant)?;
        }
        let state = (self.luns.as_slice(), self.volumes.as_slice());
        let available = u64::try_from(out.len()).unwrap_or(u64::MAX);
        let too_small = || {
            let payload =
                postcard::serialize_with_flavor(&state, postcard::ser_flavors::Size::default())
                    .unwrap_or(Self::MAX_PAYLOAD_LEN);
            PoolError::BufferTooSmall {
                needed: u64::try_from(METADATA_HEADER_LEN.saturating_add(payload))
                    .unwrap_or(u64::MAX),
                available,
            }
        };
        let Some((head, rest)) = out.split_first_chunk_mut::<METADATA_HEADER_LEN>() else {
            return Err(too_small());
        };
        let payload_len = match postcard::to_slice(&state, rest) {
            Ok(written) => written.len(),
            Err(_) => return Err(too_small()),
        };
        let raw = RawHeader {
            crc: U32::new(0),
            magic: METADATA_MAGIC,
            version: METADATA_VERSION,
            reserved0: [0; 7],
            seq: U64::new(seq),
            payload_len: U32::new(u32::try_from(payload_len).map_err(|_| too_small())?),
            reserved1: [0; 4],
            extent_size: U64::new(self.extent_size),
            release_seq: U64::new(self.release_seq_for(seq)),
            moving: self.moving.0,
        };
        *head = zerocopy::transmute!(raw);
        let mut digest = CRC32C.digest();
        digest.update(head.get(4..).unwrap_or_default());
        digest.update(rest.get(..payload_len).unwrap_or_default());
        let crc = digest.finalize().to_le_bytes();
        if let Some(field) = head.first_chunk_mut::<4>() {
            *field = crc;
        }
        if let Some(tail) = rest.get_mut(payload_len..) {
            tail.fill(0);
        }
        Ok(METADATA_HEADER_LEN.saturating_add(payload_len))
    }

    /// Reads the pool back from its two metadata copies (A, then B) and
    /// returns it with the sequence number of the copy it came from. The
    /// newest valid copy wins (see the [module docs](super)); the parked
    /// list and completions start empty, no LUN is draining, and if the
    /// copy's `release_seq` is not 0 every free extent below a LUN's
    /// high-water mark counts as released at it (the floor: see
    /// [`Pool::reclaim`]).
    ///
    /// The pool is built in place; with large const generics prefer
    /// [`Pool::decode_into`] on a pool that lives in a static or a box.
    pub fn decode(copy_a: &[u8], copy_b: &[u8]) -> Result<(Self, u64), PoolError> {
        let mut pool = Self::new(super::DEFAULT_EXTENT_SIZE)?;
        let seq = pool.decode_into(copy_a, copy_b)?;
        Ok((pool, seq))
    }

    /// [`Pool::decode`] into an existing pool, replacing everything it
    /// held. On error the pool is left empty (no LUNs, no LVs, nothing
    /// parked).
    pub fn decode_into(&mut self, copy_a: &[u8], copy_b: &[u8]) -> Result<u64, PoolError> {
        self.clear(self.extent_size);
        let max = Self::MAX_PAYLOAD_LEN;
        let a = open(copy_a, 0, max);
        let b = open(copy_b, 1, max);
        // Try the copy with the higher sequence number first.
        let b_first = match (&a, &b) {
            (Ok(ha), Ok(hb)) => hb.seq > ha.seq,
            (Err(_), Ok(_)) => true,
            _ => false,
        };
        let (first, second) = if b_first { (b, a) } else { (a, b) };
        let first = match first.and_then(|h| self.load(&h).map(|()| h.seq)) {
            Ok(seq) => return Ok(seq),
            Err(defect) => defect,
        };
        let second = match second.and_then(|h| self.load(&h).map(|()| h.seq)) {
            Ok(seq) => return Ok(seq),
            Err(defect) => defect,
        };
        let (a, b) = if b_first {
            (second, first)
        } else {
            (first, second)
        };
        Err(PoolError::NoValidCopy { a, b })
    }

    /// Empties the pool and sets its extent size.
    fn clear(&mut self, extent_size: u64) {
        self.extent_size = extent_size;
        self.luns.clear();
        self.volumes.clear();
        self.parked.clear();
        self.completed.clear();
        self.release_seq = 0;
        self.moving = Uuid::NIL;
        self.released.clear();
        self.floor = None;
        self.floor_marks = [0; LUNS];
        self.draining = [false; LUNS];
        self.order_len = 0;
    }

    /// Replaces the pool's state with the copy's; on error the pool is
    /// left empty.
    fn load(&mut self, header: &Header<'_>) -> Result<(), CopyDefect> {
        self.clear(header.extent_size);
        let seed = State {
            luns: &mut self.luns,
            volumes: &mut self.volumes,
        };
        let mut deserializer = postcard::Deserializer::from_bytes(header.payload);
        let parsed = seed.deserialize(&mut deserializer);
        let left_over = deserializer.finalize().map(|rest| !rest.is_empty());
        // Every varint in its shortest form: postcard also reads longer
        // ones (up to the type's most bytes, and for lengths up to the
        // platform's `usize`), so a copy would read on a 64-bit host and
        // not on a 32-bit SPM. Each form is at least as long as the
        // shortest, so the payload is in shortest form exactly when the
        // state it gave encodes to as many bytes.
        let state = (self.luns.as_slice(), self.volumes.as_slice());
        let shortest =
            postcard::serialize_with_flavor(&state, postcard::ser_flavors::Size::default());
        let result = match (parsed, left_over, shortest) {
            (Ok(()), Ok(false), Ok(len)) if len == header.payload.len() => {
                self.release_seq = header.release_seq;
                self.moving = header.moving;
                if header.release_seq > 0 {
                    self.floor = Some(super::Stamp::At(header.release_seq));
                    for (mark, lun) in self.floor_marks.iter_mut().zip(self.luns.iter()) {
                        *mark = lun.used;
                    }
                }
                self.rebuild_order();
                self.check_invariants().map_err(CopyDefect::Inconsistent)
            }
            _ => Err(CopyDefect::Payload),
        };
        if result.is_err() {
            self.clear(header.extent_size);
        }
        result
    }
}
