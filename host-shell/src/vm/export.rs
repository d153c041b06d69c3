//! The [`Export`] of one spmbox volume: NBD requests mapped through the
//! volume's segment map onto its LUN devices with `O_DIRECT`.
//!
//! A volume has a physical size (what its map covers now) and an
//! advertised size (what it may grow to: its virtual size plus format
//! overhead), which is the size clients see. A write any byte of which lies
//! at or past the physical size fails whole with `ENOSPC` and writes
//! nothing, exactly as a write past an LV's end fails; qemu with
//! `werror=enospc` pauses the VM on it until the volume is extended and the
//! longer map is given with [`VolumeExport::set_map`]. Reads past the
//! physical size return zeroes. Past the advertised size, reads are
//! `EINVAL` and writes `ENOSPC`.
//!
//! The NBD server hands over reads and writes in aligned buffers; a piece
//! of a request that lies in whole sectors of a device is read into or
//! written from that buffer directly, with no copy (the common case: the
//! server tells qemu to align requests to 4096 bytes). Other pieces go
//! through a bounce buffer, and a write that is not a multiple of a
//! device's sector is done by read-modify-write of the sectors around it. `TRIM` does nothing: NBD makes it a hint, and trimmed bytes
//! read back as before. A `FUA` write syncs the devices it wrote before it
//! is answered; a flush syncs every device of the map.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::io::device::{Access, AlignedBuf, Device, DeviceError};
use crate::io::mapping::Mapping;
use crate::vm::nbd::{Export, NbdError};

/// Write-zeroes requests are written this many bytes at a time.
const ZERO_CHUNK: u64 = 1 << 20;

/// The NBD export of one volume.
#[derive(Debug)]
pub struct VolumeExport {
    map: RwLock<Arc<Mapping>>,
    advertised: u64,
    devices: Mutex<HashMap<PathBuf, Arc<Device>>>,
    /// Held by read-modify-write, so two unaligned writes into one sector
    /// do not undo each other.
    rmw: Mutex<()>,
    highest: AtomicU64,
    no_space: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn device_error(e: DeviceError) -> NbdError {
    if e.is_no_space() {
        NbdError::no_space(e.to_string())
    } else {
        NbdError::io(e.to_string())
    }
}

/// Where a read goes: any bytes, or a buffer aligned for `O_DIRECT`.
enum Dest<'a> {
    Slice(&'a mut [u8]),
    Aligned(&'a mut AlignedBuf),
}

impl Dest<'_> {
    fn bytes(&mut self) -> &mut [u8] {
        match self {
            Dest::Slice(b) => b,
            Dest::Aligned(b) => b,
        }
    }
}

/// `offset..offset + len` widened to whole sectors.
fn aligned(offset: u64, len: u64, sector: u64) -> (u64, u64) {
    let start = offset / sector * sector;
    let end = (offset + len).div_ceil(sector) * sector;
    (start, end)
}

impl VolumeExport {
    /// `map`: the volume's current segment map (crate::io::mapping::Mapping);
    /// `advertised`: the size told to clients (the volume's limit: its
    /// virtual size plus format overhead, what it may grow to).
    pub fn new(map: Mapping, advertised: u64) -> VolumeExport {
        VolumeExport {
            map: RwLock::new(Arc::new(map)),
            advertised,
            devices: Mutex::new(HashMap::new()),
            rmw: Mutex::new(()),
            highest: AtomicU64::new(0),
            no_space: AtomicU64::new(0),
        }
    }

    /// A refreshed, longer map (must keep every byte in place:
    /// Mapping::is_prefix_of; else Err and the old map stays).
    pub fn set_map(&self, map: Mapping) -> Result<(), String> {
        let mut current = self.map.write().unwrap_or_else(|e| e.into_inner());
        if !current.is_prefix_of(&map) {
            return Err(format!(
                "the new map ({} bytes) does not keep every byte of the current map ({} bytes) \
                 in place; a refreshed map may only add runs at the end or lengthen the last; \
                 the export keeps the current map (read the volume's map again)",
                map.size, current.size
            ));
        }
        tracing::info!(
            from = current.size,
            to = map.size,
            "volume export uses a longer map"
        );
        *current = Arc::new(map);
        Ok(())
    }

    /// The current map's size.
    pub fn physical(&self) -> u64 {
        self.snapshot().size
    }

    /// The end of the highest write or write-zeroes requested inside the
    /// advertised size, whether it succeeded or failed with `ENOSPC`: how
    /// far the client wants the volume to reach.
    pub fn highest_written(&self) -> u64 {
        self.highest.load(Ordering::SeqCst)
    }

    /// Writes (and write-zeroes) refused with `ENOSPC`.
    pub fn no_space_errors(&self) -> u64 {
        self.no_space.load(Ordering::SeqCst)
    }

    fn snapshot(&self) -> Arc<Mapping> {
        Arc::clone(&self.map.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The device at `path`, opened once; opened again if it has grown
    /// past what it was when opened and `need_end` needs that.
    fn device(&self, path: &Path, need_end: u64) -> Result<Arc<Device>, NbdError> {
        if let Some(d) = lock(&self.devices).get(path)
            && d.size() >= need_end
        {
            return Ok(Arc::clone(d));
        }
        let d = Arc::new(Device::open(path, Access::ReadWrite).map_err(device_error)?);
        if d.size() < need_end {
            return Err(NbdError::io(format!(
                "{} is {} bytes, but the volume's map places bytes up to {} on it; \
                 check the LUN and the volume's map",
                path.display(),
                d.size(),
                need_end
            )));
        }
        lock(&self.devices).insert(path.to_owned(), Arc::clone(&d));
        Ok(d)
    }

    /// Checks a write of `offset..offset + len` and returns the map to do
    /// it with; refused writes are counted.
    fn check_write(&self, offset: u64, len: u64) -> Result<Arc<Mapping>, NbdError> {
        let end = offset.checked_add(len).filter(|&e| e <= self.advertised);
        let Some(end) = end else {
            self.no_space.fetch_add(1, Ordering::SeqCst);
            return Err(NbdError::no_space(format!(
                "write at {offset} of {len} bytes passes the volume's limit {}",
                self.advertised
            )));
        };
        self.highest.fetch_max(end, Ordering::SeqCst);
        let map = self.snapshot();
        if end > map.size {
            self.no_space.fetch_add(1, Ordering::SeqCst);
            return Err(NbdError::no_space(format!(
                "write {offset}..{end} passes the volume's physical size {}; \
                 it succeeds once the volume is extended",
                map.size
            )));
        }
        Ok(map)
    }

    /// Writes `len` bytes at `offset` of `device`: `data`, or zeroes.
    fn write_piece(
        &self,
        device: &Device,
        offset: u64,
        data: Option<&[u8]>,
        len: u64,
    ) -> Result<(), NbdError> {
        let (start, end) = aligned(offset, len, u64::from(device.sector_size()));
        let mut buf = AlignedBuf::new((end - start) as usize);
        let skip = (offset - start) as usize;
        let whole = start == offset && end == offset + len;
        let _rmw = if whole {
            None
        } else {
            let guard = lock(&self.rmw);
            device.read_at(start, &mut buf).map_err(device_error)?;
            Some(guard)
        };
        let part = &mut buf[skip..skip + len as usize];
        match data {
            Some(d) => part.copy_from_slice(d),
            None => part.fill(0),
        }
        device.write_at(start, &buf).map_err(device_error)
    }

    /// Whether `buf[at..at + len]` can go to `device_offset` of `device`
    /// with `O_DIRECT` as it is: offset and length whole sectors, start
    /// aligned in memory.
    fn direct(device: &Device, buf: &AlignedBuf, at: usize, device_offset: u64, len: u64) -> bool {
        let sector = u64::from(device.sector_size());
        let mem = device.dio_mem_align();
        device_offset % sector == 0 && len % sector == 0 && buf.align() % mem == 0 && at % mem == 0
    }

    /// Fills `dest` from `offset`: straight into it where it is an
    /// aligned buffer and the piece lies in whole sectors, else through a
    /// bounce buffer.
    fn read_to(&self, offset: u64, mut dest: Dest<'_>) -> Result<(), NbdError> {
        let len = dest.bytes().len() as u64;
        let end = offset.checked_add(len).filter(|&e| e <= self.advertised);
        let Some(end) = end else {
            return Err(NbdError::invalid(format!(
                "read at {offset} of {len} bytes passes the volume's limit {}",
                self.advertised
            )));
        };
        let map = self.snapshot();
        let mapped_end = end.min(map.size).max(offset);
        let pieces = map
            .pieces(offset, mapped_end - offset)
            .ok_or_else(|| NbdError::io("the volume's map does not cover its own size"))?;
        for piece in pieces {
            let device = self.device(piece.device, piece.device_offset + piece.len)?;
            let at = (piece.volume_offset - offset) as usize;
            if let Dest::Aligned(buf) = &mut dest
                && Self::direct(&device, buf, at, piece.device_offset, piece.len)
            {
                device
                    .read_into(piece.device_offset, buf, at..at + piece.len as usize)
                    .map_err(device_error)?;
                continue;
            }
            let (start, stop) = aligned(
                piece.device_offset,
                piece.len,
                u64::from(device.sector_size()),
            );
            let mut bounce = AlignedBuf::new((stop - start) as usize);
            device.read_at(start, &mut bounce).map_err(device_error)?;
            let skip = (piece.device_offset - start) as usize;
            dest.bytes()[at..at + piece.len as usize]
                .copy_from_slice(&bounce[skip..skip + piece.len as usize]);
        }
        // Past the physical size: not written yet, reads as zeroes.
        dest.bytes()[(mapped_end - offset) as usize..].fill(0);
        Ok(())
    }

    /// Writes `data` at `offset`. `aligned` is `data` itself when it is an
    /// aligned buffer: a piece in whole sectors is then written from it
    /// with no copy; other pieces go through [`Self::write_piece`].
    fn write_from(
        &self,
        offset: u64,
        data: &[u8],
        aligned: Option<&AlignedBuf>,
        fua: bool,
    ) -> Result<(), NbdError> {
        let map = self.check_write(offset, data.len() as u64)?;
        let pieces = map
            .pieces(offset, data.len() as u64)
            .ok_or_else(|| NbdError::io("the volume's map does not cover its own size"))?;
        let mut used = Vec::new();
        for piece in pieces {
            let device = self.device(piece.device, piece.device_offset + piece.len)?;
            let at = (piece.volume_offset - offset) as usize;
            let range = at..at + piece.len as usize;
            match aligned {
                Some(buf) if Self::direct(&device, buf, at, piece.device_offset, piece.len) => {
                    device
                        .write_from(piece.device_offset, buf, range)
                        .map_err(device_error)?;
                }
                _ => {
                    self.write_piece(&device, piece.device_offset, Some(&data[range]), piece.len)?
                }
            }
            if fua {
                used.push(device);
            }
        }
        if fua {
            self.sync(&used)?;
        }
        Ok(())
    }

    fn sync(&self, devices: &[Arc<Device>]) -> Result<(), NbdError> {
        let mut done: Vec<&Path> = Vec::new();
        for d in devices {
            if !done.contains(&d.path()) {
                d.sync_data().map_err(device_error)?;
                done.push(d.path());
            }
        }
        Ok(())
    }
}

impl Export for VolumeExport {
    fn size(&self) -> u64 {
        self.advertised
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        self.read_to(offset, Dest::Slice(buf))
    }

    fn read_aligned(&self, offset: u64, buf: &mut AlignedBuf) -> Result<(), NbdError> {
        self.read_to(offset, Dest::Aligned(buf))
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError> {
        self.write_from(offset, data, None, fua)
    }

    fn write_aligned(&self, offset: u64, data: &AlignedBuf, fua: bool) -> Result<(), NbdError> {
        self.write_from(offset, data, Some(data), fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), NbdError> {
        let map = self.check_write(offset, len)?;
        let pieces = map
            .pieces(offset, len)
            .ok_or_else(|| NbdError::io("the volume's map does not cover its own size"))?;
        let mut used = Vec::new();
        for piece in pieces {
            let device = self.device(piece.device, piece.device_offset + piece.len)?;
            let end = piece.device_offset + piece.len;
            let mut at = piece.device_offset;
            while at < end {
                // Chunks after the first start on a chunk boundary.
                let n = (end - at).min(ZERO_CHUNK - at % ZERO_CHUNK);
                self.write_piece(&device, at, None, n)?;
                at += n;
            }
            used.push(device);
        }
        if fua {
            self.sync(&used)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), NbdError> {
        let map = self.snapshot();
        let mut devices = Vec::new();
        for run in &map.runs {
            devices.push(self.device(&run.device, 0)?);
        }
        self.sync(&devices)
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        // A hint in NBD; the bytes stay as they are.
        match offset.checked_add(len) {
            Some(end) if end <= self.advertised => Ok(()),
            _ => Err(NbdError::invalid(format!(
                "trim at {offset} of {len} bytes passes the volume's limit {}",
                self.advertised
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::mapping::Run;
    use crate::vm::nbd::{EINVAL, ENOSPC};

    const KIB: u64 = 1024;

    struct Luns {
        _dir: tempfile::TempDir,
        a: PathBuf,
        b: PathBuf,
    }

    /// Two 64 KiB LUN files.
    fn luns() -> Luns {
        let dir = tempfile::tempdir()
            .or_else(|_| tempfile::tempdir_in("/var/tmp"))
            .unwrap();
        let a = dir.path().join("lun-a");
        let b = dir.path().join("lun-b");
        for p in [&a, &b] {
            Device::create_file(p, 64 * KIB).unwrap();
        }
        Luns { _dir: dir, a, b }
    }

    fn run(device: &Path, offset: u64, len: u64) -> Run {
        Run {
            device: device.to_owned(),
            offset,
            len,
        }
    }

    fn file(p: &Path) -> Vec<u8> {
        std::fs::read(p).unwrap()
    }

    #[test]
    fn writes_land_where_the_map_says_and_read_back() {
        let l = luns();
        // Volume 0..8K on a at 16K, 8K..16K on b at 4K.
        let map = Mapping::new(vec![
            run(&l.a, 16 * KIB, 8 * KIB),
            run(&l.b, 4 * KIB, 8 * KIB),
        ]);
        let e = VolumeExport::new(map, 1 << 20);
        let data: Vec<u8> = (0..8 * KIB).map(|i| (i % 251) as u8).collect();
        e.write(4 * KIB, &data, true).unwrap();
        assert_eq!(&file(&l.a)[20 * 1024..24 * 1024], &data[..4096]);
        assert_eq!(&file(&l.b)[4 * 1024..8 * 1024], &data[4096..]);
        let mut back = vec![0; 8192];
        e.read(4 * KIB, &mut back).unwrap();
        assert_eq!(back, data);
        e.flush().unwrap();
        assert_eq!(e.highest_written(), 12 * KIB);
    }

    #[test]
    fn a_write_reaching_past_the_physical_size_fails_whole_and_writes_nothing() {
        let l = luns();
        let e = VolumeExport::new(Mapping::new(vec![run(&l.a, 0, 8 * KIB)]), 1 << 20);
        let err = e.write(4 * KIB, &[7; 8192], false).unwrap_err();
        assert_eq!(err.errno, ENOSPC);
        assert!(err.what.contains("physical size 8192"), "{}", err.what);
        assert!(file(&l.a).iter().all(|&b| b == 0), "nothing written");
        let err = e.write_zeroes(8 * KIB, 4096, false).unwrap_err();
        assert_eq!(err.errno, ENOSPC);
        let err = e.write(1 << 20, &[7; 512], false).unwrap_err();
        assert_eq!(err.errno, ENOSPC);
        assert_eq!(e.no_space_errors(), 3);
        assert_eq!(e.highest_written(), 12 * KIB);
    }

    #[test]
    fn reads_past_the_physical_size_are_zeroes_and_past_the_limit_invalid() {
        let l = luns();
        std::fs::write(&l.a, vec![5u8; 64 * 1024]).unwrap();
        let e = VolumeExport::new(Mapping::new(vec![run(&l.a, 0, 8 * KIB)]), 64 * KIB);
        let mut buf = vec![9u8; 8192];
        e.read(4 * KIB, &mut buf).unwrap();
        assert_eq!(&buf[..4096], &[5; 4096][..]);
        assert_eq!(&buf[4096..], &[0; 4096][..]);
        let mut buf = vec![0u8; 4096];
        assert_eq!(e.read(62 * KIB, &mut buf).unwrap_err().errno, EINVAL);
    }

    #[test]
    fn a_longer_map_makes_the_refused_write_succeed_and_a_moved_one_is_refused() {
        let l = luns();
        let e = VolumeExport::new(Mapping::new(vec![run(&l.a, 0, 8 * KIB)]), 1 << 20);
        e.write(0, &[1; 4096], false).unwrap();
        assert!(e.write(8 * KIB, &[2; 4096], false).is_err());
        let moved = Mapping::new(vec![run(&l.b, 0, 16 * KIB)]);
        assert!(
            e.set_map(moved)
                .unwrap_err()
                .contains("does not keep every byte")
        );
        assert_eq!(e.physical(), 8 * KIB);
        let longer = Mapping::new(vec![run(&l.a, 0, 8 * KIB), run(&l.b, 0, 8 * KIB)]);
        e.set_map(longer).unwrap();
        assert_eq!(e.physical(), 16 * KIB);
        e.write(8 * KIB, &[2; 4096], false).unwrap();
        let mut buf = vec![0; 12 * 1024];
        e.read(0, &mut buf).unwrap();
        assert_eq!(&buf[..4096], &[1; 4096][..]);
        assert_eq!(&buf[8192..], &[2; 4096][..]);
        assert_eq!(&file(&l.b)[..4096], &[2; 4096][..]);
    }

    #[test]
    fn unaligned_writes_keep_the_bytes_around_them() {
        let l = luns();
        std::fs::write(&l.a, vec![3u8; 64 * 1024]).unwrap();
        let e = VolumeExport::new(Mapping::new(vec![run(&l.a, 0, 64 * KIB)]), 64 * KIB);
        e.write(100, &[8; 5000], false).unwrap();
        e.write_zeroes(6000, 3000, true).unwrap();
        let f = file(&l.a);
        assert!(f[..100].iter().all(|&b| b == 3));
        assert!(f[100..5100].iter().all(|&b| b == 8));
        assert!(f[5100..6000].iter().all(|&b| b == 3));
        assert!(f[6000..9000].iter().all(|&b| b == 0));
        assert!(f[9000..].iter().all(|&b| b == 3));
        let mut buf = vec![0; 7];
        e.read(5097, &mut buf).unwrap();
        assert_eq!(buf, [8, 8, 8, 3, 3, 3, 3]);
    }

    fn aligned_copy(bytes: &[u8]) -> AlignedBuf {
        let mut buf = AlignedBuf::new(bytes.len());
        buf.copy_from_slice(bytes);
        buf
    }

    #[test]
    fn aligned_writes_and_reads_across_runs_land_where_the_map_says() {
        let l = luns();
        let map = Mapping::new(vec![
            run(&l.a, 16 * KIB, 8 * KIB),
            run(&l.b, 4 * KIB, 8 * KIB),
        ]);
        let e = VolumeExport::new(map, 1 << 20);
        let data: Vec<u8> = (0..8 * KIB).map(|i| (i % 253) as u8).collect();
        e.write_aligned(4 * KIB, &aligned_copy(&data), true)
            .unwrap();
        assert_eq!(&file(&l.a)[20 * 1024..24 * 1024], &data[..4096]);
        assert_eq!(&file(&l.b)[4 * 1024..8 * 1024], &data[4096..]);
        // Reaching past the physical size: the rest reads as zeroes.
        let mut back = AlignedBuf::new(16 * 1024);
        back.fill(9);
        e.read_aligned(4 * KIB, &mut back).unwrap();
        assert_eq!(&back[..8192], &data[..]);
        assert!(back[12 * 1024..].iter().all(|&b| b == 0));
    }

    #[test]
    fn aligned_buffers_with_unaligned_offsets_keep_the_bytes_around_them() {
        let l = luns();
        std::fs::write(&l.a, vec![3u8; 64 * 1024]).unwrap();
        let e = VolumeExport::new(Mapping::new(vec![run(&l.a, 0, 64 * KIB)]), 64 * KIB);
        e.write_aligned(100, &aligned_copy(&[8; 5000]), false)
            .unwrap();
        let f = file(&l.a);
        assert!(f[..100].iter().all(|&b| b == 3));
        assert!(f[100..5100].iter().all(|&b| b == 8));
        assert!(f[5100..].iter().all(|&b| b == 3));
        let mut buf = AlignedBuf::new(7);
        e.read_aligned(5097, &mut buf).unwrap();
        assert_eq!(&buf[..], [8, 8, 8, 3, 3, 3, 3]);
    }

    #[test]
    fn write_zeroes_spanning_many_chunks_and_runs_zeroes_them_all() {
        let l = luns();
        std::fs::write(&l.a, vec![4u8; 64 * 1024]).unwrap();
        std::fs::write(&l.b, vec![4u8; 64 * 1024]).unwrap();
        let map = Mapping::new(vec![run(&l.a, 0, 64 * KIB), run(&l.b, 0, 64 * KIB)]);
        let e = VolumeExport::new(map, 128 * KIB);
        e.write_zeroes(512, 128 * KIB - 1024, false).unwrap();
        let (a, b) = (file(&l.a), file(&l.b));
        assert!(a[..512].iter().all(|&x| x == 4));
        assert!(a[512..].iter().all(|&x| x == 0));
        assert!(b[..64 * 1024 - 512].iter().all(|&x| x == 0));
        assert!(b[64 * 1024 - 512..].iter().all(|&x| x == 4));
    }
}
