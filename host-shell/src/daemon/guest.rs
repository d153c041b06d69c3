//! Simulated guests: sequential writers of verifiable data.
//!
//! A guest stands in for a virtual machine filling its thin disk. It
//! writes its volume from front to back, in blocks of [`BLOCK`] bytes,
//! through the volume's current [`Mapping`] with `O_DIRECT`, and never
//! writes past the mapping's end: when the next write would pass it, the
//! guest reports [`Step::Full`] and its caller pauses it until the map
//! grows. Nothing is dropped or skipped.
//!
//! # The block format
//!
//! Every block says what it is, so any block read back can be checked on
//! its own, without knowing who wrote it or when:
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `SPMBGST1` |
//! | 8..24 | volume UUID |
//! | 24..32 | the block's offset in the volume, little-endian u64 |
//! | 32..40 | the writer's generation (the host generation), little-endian u64 |
//! | 40..44 | CRC-32C of bytes 0..40 and 44..4096, little-endian |
//! | 44..4096 | pattern: a xorshift64* stream seeded from volume, offset and generation |
//!
//! A block is good when all of it holds: magic, volume, offset, checksum
//! and the pattern the header's fields derive. A block written to the
//! wrong place (wrong offset or volume), a lost write (zeroes or stale
//! data), a torn one and a bit flip are each caught.
//!
//! # Where a restarted guest goes on
//!
//! The allocation of a volume is what its guest has written: the length
//! of the run of good blocks from offset 0. [`recover_allocation`] reads
//! it back after a restart, so a guest killed at any moment resumes at its
//! first block that is not good, and a write that was in flight when it
//! died is simply written again.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use spmbox_core::wire::{CRC32C, Uuid};

use crate::io::device::{Access, AlignedBuf, Device, DeviceError};
use crate::io::mapping::Mapping;

/// Bytes per guest block: the unit guests write and the verifier checks.
pub const BLOCK: u64 = 4096;

/// Magic at the start of every guest block.
pub const BLOCK_MAGIC: [u8; 8] = *b"SPMBGST1";

/// The most one read of [`recover_allocation`] or [`verify`] covers.
const READ_CHUNK: u64 = 1 << 20;

/// Where the checksum sits in a block.
const CRC_AT: usize = 40;
/// Where the pattern starts.
const PATTERN_AT: usize = 44;

/// What is wrong with a block that is not good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockDefect {
    /// All zeroes: never written (or the write was lost).
    Unwritten,
    /// Not a guest block at all.
    BadMagic,
    /// A guest block of another volume.
    WrongVolume,
    /// A block of this volume that belongs at another offset (a
    /// misdirected write).
    WrongOffset(u64),
    /// The checksum does not match: torn or flipped.
    Checksum,
    /// Checksum right, but the pattern differs from what volume, offset
    /// and generation derive.
    Pattern,
}

impl fmt::Display for BlockDefect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockDefect::Unwritten => f.write_str("never written (all zeroes)"),
            BlockDefect::BadMagic => f.write_str("not a guest block (bad magic)"),
            BlockDefect::WrongVolume => f.write_str("a block of another volume"),
            BlockDefect::WrongOffset(at) => write!(f, "the block written for offset {at}"),
            BlockDefect::Checksum => f.write_str("checksum mismatch (torn or corrupted)"),
            BlockDefect::Pattern => f.write_str("pattern mismatch"),
        }
    }
}

/// An error of a guest, a recovery or a verification.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// I/O on a device of the volume failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The map does not cover a range it should: a bug or a damaged map.
    #[error(
        "volume {volume}: the map ({size} bytes) does not cover bytes {offset}..{end}; \
         refresh the volume's map"
    )]
    OutsideMap {
        /// The volume.
        volume: Uuid,
        /// The map's size.
        size: u64,
        /// Start of the range.
        offset: u64,
        /// End of the range.
        end: u64,
    },
    /// A run of the map is not aligned to the device's sectors.
    #[error(
        "volume {volume}: bytes {offset}..{end} lie at {device_offset} on {}, \
         which is not a multiple of its {sector}-byte sectors",
        device.display()
    )]
    Misaligned {
        /// The volume.
        volume: Uuid,
        /// Start of the range in the volume.
        offset: u64,
        /// End of the range.
        end: u64,
        /// The device.
        device: PathBuf,
        /// Where the range starts on it.
        device_offset: u64,
        /// The device's sector size.
        sector: u32,
    },
    /// A LUN file is now shorter than the pool's view of it: it was
    /// truncated. A write would grow it back with zeroes in between, and
    /// the data in the cut range is lost, so nothing is written.
    #[error(
        "volume {volume}: LUN file {} is {size} bytes now, but the volume's bytes lie up to \
         {needed} on it: the file was truncated (or replaced). Nothing was written; restore \
         the LUN file from a copy, then start the host again",
        device.display()
    )]
    Truncated {
        /// The volume.
        volume: Uuid,
        /// The LUN file.
        device: PathBuf,
        /// Its size now.
        size: u64,
        /// Where the write would end on it.
        needed: u64,
    },
}

/// The seed of a block's pattern.
fn seed(volume: Uuid, offset: u64, generation: u64) -> u64 {
    let v = volume.0;
    let hi = u64::from_le_bytes([v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]]);
    let lo = u64::from_le_bytes([v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]]);
    let mut x = hi
        ^ lo.rotate_left(29)
        ^ offset.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ generation.rotate_left(47);
    // splitmix64 finalizer, so nearby offsets give unrelated streams; a
    // zero state would stall xorshift.
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    if x == 0 { 0x2545_F491_4F6C_DD1D } else { x }
}

/// Fills `out` with the pattern of `seed`.
fn pattern(seed: u64, out: &mut [u8]) {
    let mut x = seed;
    let mut next = || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes()
    };
    // Whole words first (fixed-size copies the compiler turns into
    // stores), then any tail.
    let mut words = out.chunks_exact_mut(8);
    for chunk in &mut words {
        chunk.copy_from_slice(&next());
    }
    let tail = words.into_remainder();
    if !tail.is_empty() {
        let word = next();
        tail.copy_from_slice(&word[..tail.len()]);
    }
}

fn checksum(block: &[u8]) -> u32 {
    let mut digest = CRC32C.digest();
    digest.update(&block[..CRC_AT]);
    digest.update(&block[PATTERN_AT..]);
    digest.finalize()
}

/// Writes the block of `volume` at volume offset `offset` by a writer of
/// `generation` into `out` ([`BLOCK`] bytes).
pub fn fill_block(out: &mut [u8], volume: Uuid, offset: u64, generation: u64) {
    debug_assert_eq!(out.len() as u64, BLOCK);
    out[..8].copy_from_slice(&BLOCK_MAGIC);
    out[8..24].copy_from_slice(&volume.0);
    out[24..32].copy_from_slice(&offset.to_le_bytes());
    out[32..40].copy_from_slice(&generation.to_le_bytes());
    pattern(seed(volume, offset, generation), &mut out[PATTERN_AT..]);
    let crc = checksum(out);
    out[CRC_AT..PATTERN_AT].copy_from_slice(&crc.to_le_bytes());
}

fn u64_at(block: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&block[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Checks that `block` is the good block of `volume` at `offset`, and
/// returns the generation that wrote it.
pub fn check_block(block: &[u8], volume: Uuid, offset: u64) -> Result<u64, BlockDefect> {
    if block.len() as u64 != BLOCK {
        return Err(BlockDefect::BadMagic);
    }
    if block[..8] != BLOCK_MAGIC {
        if block.iter().all(|&b| b == 0) {
            return Err(BlockDefect::Unwritten);
        }
        return Err(BlockDefect::BadMagic);
    }
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&block[CRC_AT..PATTERN_AT]);
    if u32::from_le_bytes(crc) != checksum(block) {
        return Err(BlockDefect::Checksum);
    }
    if block[8..24] != volume.0 {
        return Err(BlockDefect::WrongVolume);
    }
    let at = u64_at(block, 24);
    if at != offset {
        return Err(BlockDefect::WrongOffset(at));
    }
    let generation = u64_at(block, 32);
    let mut expected = [0u8; (BLOCK as usize) - PATTERN_AT];
    pattern(seed(volume, offset, generation), &mut expected);
    if block[PATTERN_AT..] != expected[..] {
        return Err(BlockDefect::Pattern);
    }
    Ok(generation)
}

/// Devices a guest or verifier has opened, by path.
#[derive(Debug, Default)]
pub struct Devices {
    open: HashMap<PathBuf, Device>,
}

impl Devices {
    /// No devices open yet.
    pub fn new() -> Devices {
        Devices::default()
    }

    /// The device at `path`, opened read-write with `O_DIRECT` on first use.
    pub fn get(&mut self, path: &Path) -> Result<&Device, DeviceError> {
        if !self.open.contains_key(path) {
            let device = Device::open(path, Access::ReadWrite)?;
            self.open.insert(path.to_owned(), device);
        }
        Ok(&self.open[path])
    }
}

/// Does `f` for each piece of volume range `offset..offset + len`, with the
/// device, the device offset, the offset within the range and the length.
fn for_pieces(
    volume: Uuid,
    map: &Mapping,
    devices: &mut Devices,
    offset: u64,
    len: u64,
    mut f: impl FnMut(&Device, u64, usize, usize) -> Result<(), GuestError>,
) -> Result<(), GuestError> {
    let pieces = map.pieces(offset, len).ok_or(GuestError::OutsideMap {
        volume,
        size: map.size,
        offset,
        end: offset.saturating_add(len),
    })?;
    for piece in pieces {
        let device = devices.get(piece.device)?;
        let sector = u64::from(device.sector_size());
        if piece.device_offset % sector != 0 || piece.len % sector != 0 {
            return Err(GuestError::Misaligned {
                volume,
                offset: piece.volume_offset,
                end: piece.volume_offset + piece.len,
                device: piece.device.to_owned(),
                device_offset: piece.device_offset,
                sector: device.sector_size(),
            });
        }
        // Both fit in usize: a piece is at most one write or read chunk.
        f(
            device,
            piece.device_offset,
            (piece.volume_offset - offset) as usize,
            piece.len as usize,
        )?;
    }
    Ok(())
}

/// Reads volume range `offset..offset + len` into `buf[..len]`.
pub fn read_range(
    volume: Uuid,
    map: &Mapping,
    devices: &mut Devices,
    offset: u64,
    buf: &mut AlignedBuf,
    len: u64,
) -> Result<(), GuestError> {
    for_pieces(volume, map, devices, offset, len, |device, at, start, n| {
        if start == 0 && n == buf.len() {
            device.read_at(at, buf)?;
        } else {
            let mut part = AlignedBuf::new(n);
            device.read_at(at, &mut part)?;
            buf[start..start + n].copy_from_slice(&part);
        }
        Ok(())
    })
}

/// What one [`Guest::write_next`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Wrote `bytes`; the guest has now written `allocation` bytes.
    Wrote {
        /// Bytes written by this step.
        bytes: u64,
        /// Bytes written in all (the volume's allocation).
        allocation: u64,
    },
    /// The next block lies past the map's end: pause until it grows.
    Full,
    /// The guest has written all it was asked to.
    Done,
}

/// One guest: writes its volume sequentially from its allocation to a
/// limit.
#[derive(Debug)]
pub struct Guest {
    volume: Uuid,
    generation: u64,
    allocation: u64,
    limit: u64,
    write_size: u64,
    buf: AlignedBuf,
}

impl Guest {
    /// A guest of `volume` that has written `allocation` bytes, writes
    /// blocks stamped with `generation`, stops at `limit` bytes, and
    /// writes up to `write_size` bytes at a time. `allocation`, `limit`
    /// and `write_size` are rounded down to whole blocks (a `write_size`
    /// below one block is one block).
    pub fn new(
        volume: Uuid,
        generation: u64,
        allocation: u64,
        limit: u64,
        write_size: u64,
    ) -> Guest {
        let write_size = (write_size - write_size % BLOCK).max(BLOCK);
        Guest {
            volume,
            generation,
            allocation: allocation - allocation % BLOCK,
            limit: limit - limit % BLOCK,
            write_size,
            buf: AlignedBuf::new(write_size as usize),
        }
    }

    /// Bytes written so far (the volume's allocation).
    pub fn allocation(&self) -> u64 {
        self.allocation
    }

    /// Writes the next piece through `map`: up to `write_size` bytes, no
    /// further than the limit nor the map's end. Returns [`Step::Full`]
    /// when not one block fits before the map's end.
    pub fn write_next(&mut self, map: &Mapping, devices: &mut Devices) -> Result<Step, GuestError> {
        if self.allocation >= self.limit {
            return Ok(Step::Done);
        }
        let room = map.size.saturating_sub(self.allocation);
        let len = self
            .write_size
            .min(self.limit - self.allocation)
            .min(room - room % BLOCK);
        if len == 0 {
            return Ok(Step::Full);
        }
        let offset = self.allocation;
        let (volume, generation) = (self.volume, self.generation);
        for (i, block) in self.buf[..len as usize]
            .chunks_mut(BLOCK as usize)
            .enumerate()
        {
            fill_block(block, volume, offset + i as u64 * BLOCK, generation);
        }
        let buf = &self.buf;
        for_pieces(volume, map, devices, offset, len, |device, at, start, n| {
            let needed = at + n as u64;
            let size = device.current_size();
            if size < needed {
                return Err(GuestError::Truncated {
                    volume,
                    device: device.path().to_owned(),
                    size,
                    needed,
                });
            }
            if start == 0 && n == buf.len() {
                device.write_at(at, buf)?;
            } else {
                let mut part = AlignedBuf::new(n);
                part.copy_from_slice(&buf[start..start + n]);
                device.write_at(at, &part)?;
            }
            Ok(())
        })?;
        self.allocation += len;
        Ok(Step::Wrote {
            bytes: len,
            allocation: self.allocation,
        })
    }
}

/// How much of `volume` its guests have written: the length of the run of
/// good blocks from offset 0, within `map`.
pub fn recover_allocation(
    volume: Uuid,
    map: &Mapping,
    devices: &mut Devices,
) -> Result<u64, GuestError> {
    let end = map.size - map.size % BLOCK;
    let mut offset = 0;
    let mut buf = AlignedBuf::new(READ_CHUNK as usize);
    while offset < end {
        let len = READ_CHUNK.min(end - offset);
        read_range(volume, map, devices, offset, &mut buf, len)?;
        for (i, block) in buf[..len as usize].chunks(BLOCK as usize).enumerate() {
            let at = offset + i as u64 * BLOCK;
            if check_block(block, volume, at).is_err() {
                return Ok(at);
            }
        }
        offset += len;
    }
    Ok(end)
}

/// A block that failed verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadBlock {
    /// Its offset in the volume.
    pub offset: u64,
    /// What is wrong with it.
    pub defect: BlockDefect,
}

/// Blocks [`verify`] keeps in [`VerifyReport::errors`]; the rest are
/// only counted.
pub const KEPT_ERRORS: usize = 64;

/// What [`verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Bytes read and found good.
    pub bytes_verified: u64,
    /// The first bad blocks, at most [`KEPT_ERRORS`].
    pub errors: Vec<BadBlock>,
    /// Bad blocks in all.
    pub error_count: u64,
}

/// Reads `volume` from offset 0 to `upto` (rounded down to whole blocks)
/// through `map` and checks every block.
pub fn verify(
    volume: Uuid,
    map: &Mapping,
    devices: &mut Devices,
    upto: u64,
) -> Result<VerifyReport, GuestError> {
    let end = upto - upto % BLOCK;
    if end > map.size {
        return Err(GuestError::OutsideMap {
            volume,
            size: map.size,
            offset: 0,
            end,
        });
    }
    let mut report = VerifyReport::default();
    let mut offset = 0;
    let mut buf = AlignedBuf::new(READ_CHUNK as usize);
    while offset < end {
        let len = READ_CHUNK.min(end - offset);
        read_range(volume, map, devices, offset, &mut buf, len)?;
        for (i, block) in buf[..len as usize].chunks(BLOCK as usize).enumerate() {
            let at = offset + i as u64 * BLOCK;
            match check_block(block, volume, at) {
                Ok(_) => report.bytes_verified += BLOCK,
                Err(defect) => {
                    report.error_count += 1;
                    if report.errors.len() < KEPT_ERRORS {
                        report.errors.push(BadBlock { offset: at, defect });
                    }
                }
            }
        }
        offset += len;
    }
    Ok(report)
}

/// Paces a guest to a rate, without bursts after a pause.
#[derive(Debug, Clone)]
pub struct Pacer {
    rate: u64,
    next: Option<Instant>,
}

impl Pacer {
    /// A pacer for `rate` bytes per second; 0 means unpaced.
    pub fn new(rate: u64) -> Pacer {
        Pacer { rate, next: None }
    }

    /// How long to wait at `now` before writing `bytes`. Time spent paused
    /// is not made up afterwards.
    pub fn delay(&mut self, now: Instant, bytes: u64) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let start = match self.next {
            Some(next) if next > now => next,
            _ => now,
        };
        let cost = Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        self.next = Some(start + cost);
        start - now
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::mapping::Run;

    const V: Uuid = Uuid([7; 16]);

    #[test]
    fn a_block_checks_and_every_single_flip_is_caught() {
        let mut block = vec![0u8; BLOCK as usize];
        fill_block(&mut block, V, 8192, 3);
        assert_eq!(check_block(&block, V, 8192), Ok(3));
        assert_eq!(
            check_block(&block, V, 4096),
            Err(BlockDefect::WrongOffset(8192))
        );
        assert_eq!(
            check_block(&block, Uuid([8; 16]), 8192),
            Err(BlockDefect::WrongVolume)
        );
        for i in (0..BLOCK as usize).step_by(7) {
            let mut bad = block.clone();
            bad[i] ^= 0x10;
            assert!(check_block(&bad, V, 8192).is_err(), "flip at {i}");
        }
        assert_eq!(
            check_block(&[0u8; BLOCK as usize], V, 0),
            Err(BlockDefect::Unwritten)
        );
    }

    #[test]
    fn a_consistent_block_with_a_foreign_pattern_is_caught() {
        let mut block = vec![0u8; BLOCK as usize];
        fill_block(&mut block, V, 0, 1);
        // Another generation's pattern under this header, checksum fixed.
        pattern(seed(V, 0, 2), &mut block[PATTERN_AT..]);
        let crc = checksum(&block);
        block[CRC_AT..PATTERN_AT].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(check_block(&block, V, 0), Err(BlockDefect::Pattern));
    }

    #[test]
    fn patterns_differ_by_volume_offset_and_generation() {
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        pattern(seed(V, 0, 1), &mut a);
        for other in [seed(V, BLOCK, 1), seed(V, 0, 2), seed(Uuid([9; 16]), 0, 1)] {
            pattern(other, &mut b);
            assert_ne!(a, b);
        }
    }

    #[test]
    fn the_pacer_keeps_the_rate_and_does_not_burst_after_a_pause() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1000);
        assert_eq!(p.delay(t0, 500), Duration::ZERO);
        assert_eq!(p.delay(t0, 500), Duration::from_millis(500));
        // After a long pause the next write goes at once, the one after
        // it waits its share again.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(p.delay(later, 100), Duration::ZERO);
        assert_eq!(p.delay(later, 100), Duration::from_millis(100));
        assert_eq!(Pacer::new(0).delay(t0, 1 << 30), Duration::ZERO);
    }

    fn direct_dir() -> Option<tempfile::TempDir> {
        let dir = tempfile::tempdir().ok()?;
        let probe = dir.path().join("probe");
        Device::create_file(&probe, 4096).ok()?;
        Some(dir)
    }

    #[test]
    fn a_guest_writes_through_runs_pauses_at_the_end_and_is_verified() {
        let Some(dir) = direct_dir() else {
            eprintln!("skipped: guest write test: no temporary directory supports O_DIRECT");
            return;
        };
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        Device::create_file(&a, 1 << 20).unwrap();
        Device::create_file(&b, 1 << 20).unwrap();
        let run = |device: &Path, offset, len| Run {
            device: device.to_owned(),
            offset,
            len,
        };
        // 40 KiB in two runs on two files, the second run out of order.
        let small = Mapping::new(vec![run(&a, 65536, 24576)]);
        let grown = Mapping::new(vec![run(&a, 65536, 24576), run(&b, 8192, 16384)]);
        let mut devices = Devices::new();
        let mut guest = Guest::new(V, 5, 0, 40960, 16384);
        assert_eq!(
            guest.write_next(&small, &mut devices).unwrap(),
            Step::Wrote {
                bytes: 16384,
                allocation: 16384
            }
        );
        // Only 8 KiB fit before the end: written, then Full.
        assert_eq!(
            guest.write_next(&small, &mut devices).unwrap(),
            Step::Wrote {
                bytes: 8192,
                allocation: 24576
            }
        );
        assert_eq!(guest.write_next(&small, &mut devices).unwrap(), Step::Full);
        assert_eq!(recover_allocation(V, &grown, &mut devices).unwrap(), 24576);
        assert_eq!(
            guest.write_next(&grown, &mut devices).unwrap(),
            Step::Wrote {
                bytes: 16384,
                allocation: 40960
            }
        );
        assert_eq!(guest.write_next(&grown, &mut devices).unwrap(), Step::Done);
        let report = verify(V, &grown, &mut devices, 40960).unwrap();
        assert_eq!(report.bytes_verified, 40960);
        assert_eq!(report.error_count, 0);
        assert_eq!(recover_allocation(V, &grown, &mut devices).unwrap(), 40960);

        // Damage one block on the second file: verify names it, and a
        // restarted guest would go on from there.
        let dev = Device::open(&b, Access::ReadWrite).unwrap();
        let mut buf = AlignedBuf::new(BLOCK as usize);
        dev.read_at(8192 + 4096, &mut buf).unwrap();
        buf[100] ^= 1;
        dev.write_at(8192 + 4096, &buf).unwrap();
        let report = verify(V, &grown, &mut devices, 40960).unwrap();
        assert_eq!(report.error_count, 1);
        assert_eq!(
            report.errors,
            vec![BadBlock {
                offset: 24576 + 4096,
                defect: BlockDefect::Checksum
            }]
        );
        assert_eq!(
            recover_allocation(V, &grown, &mut devices).unwrap(),
            24576 + 4096
        );
        assert!(matches!(
            verify(V, &small, &mut devices, 40960),
            Err(GuestError::OutsideMap { .. })
        ));
    }
}
