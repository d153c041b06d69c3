//! Unit tests of the device: direct I/O on files in a directory where
//! `O_DIRECT` works.

use super::*;
use std::path::PathBuf;
use tempfile::TempDir;

const TMPFS_MAGIC: i128 = 0x0102_1994;
const MIB: u64 = 1 << 20;

/// Makes a temporary directory in `base` and checks that `O_DIRECT`
/// works there.
fn probe(base: &Path) -> Result<TempDir, String> {
    let dir = tempfile::tempdir_in(base).map_err(|e| e.to_string())?;
    let file = dir.path().join("probe");
    std::fs::write(&file, [0u8; 4096]).map_err(|e| e.to_string())?;
    let flags = OFlags::RDONLY | OFlags::DIRECT | OFlags::CLOEXEC;
    rustix::fs::open(&file, flags, Mode::empty())
        .map_err(|e| format!("O_DIRECT open failed: {e}"))?;
    Ok(dir)
}

/// A temporary directory where `O_DIRECT` works: the system temp dir,
/// else /var/tmp. `None` (after printing why) if neither.
fn direct_io_dir(test: &str) -> Option<TempDir> {
    let mut reasons = Vec::new();
    for base in [std::env::temp_dir(), PathBuf::from("/var/tmp")] {
        match probe(&base) {
            Ok(dir) => return Some(dir),
            Err(why) => reasons.push(format!("{}: {why}", base.display())),
        }
    }
    println!(
        "skipped: {test}: no temporary directory supports O_DIRECT ({})",
        reasons.join("; ")
    );
    None
}

/// A buffer of `len` bytes aligned well enough for `dev`, filled with
/// `fill`.
fn buf_for(dev: &Device, len: usize, fill: u8) -> AlignedBuf {
    let mut buf = AlignedBuf::zeroed(len, dev.dio_mem_align().max(DEFAULT_ALIGN));
    buf.fill(fill);
    buf
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 1) as u8).collect()
}

/// Creates a 1 MiB mailbox file in `dir`.
fn new_device(dir: &TempDir) -> (Device, PathBuf) {
    let path = dir.path().join("mailbox");
    let dev = Device::create_file(&path, MIB).expect("create_file");
    (dev, path)
}

fn sector(dev: &Device) -> usize {
    dev.sector_size() as usize
}

#[test]
fn aligned_buf_has_requested_alignment_and_length() {
    for align in [512, 4096, 65536, 1 << 21] {
        for len in [0, 1, 511, 512, 4096, 10_000, 1 << 20] {
            let mut buf = AlignedBuf::zeroed(len, align);
            assert_eq!(buf.len(), len);
            assert_eq!(buf.is_empty(), len == 0);
            assert_eq!(buf.align(), align);
            assert_eq!(buf.as_ptr().addr() % align, 0, "len {len} align {align}");
            assert!(buf.iter().all(|&b| b == 0), "not zeroed");
            buf.fill(0xa5);
            let ptr = buf.as_ptr();
            let moved = buf;
            assert_eq!(moved.as_ptr(), ptr, "moving must not reallocate");
            assert!(moved.iter().all(|&b| b == 0xa5));
        }
    }
    assert_eq!(AlignedBuf::new(100).align(), DEFAULT_ALIGN);
    assert_eq!(AlignedBuf::new(100).len(), 100);
}

#[test]
fn set_len_reuses_the_allocation_up_to_its_capacity() {
    let mut buf = AlignedBuf::zeroed(4096, 4096);
    assert!(buf.capacity() >= 4096);
    let ptr = buf.as_ptr();
    buf.fill(7);
    assert!(buf.set_len(512));
    assert_eq!((buf.len(), buf.as_ptr()), (512, ptr));
    assert!(buf.set_len(4096));
    assert!(buf.iter().all(|&b| b == 7), "contents kept");
    let cap = buf.capacity();
    assert!(!buf.set_len(cap + 1));
    assert_eq!(buf.len(), 4096, "a refused length changes nothing");
}

#[test]
#[should_panic(expected = "power of two")]
fn aligned_buf_rejects_non_power_of_two() {
    AlignedBuf::zeroed(4096, 1000);
}

#[test]
#[should_panic(expected = "at least 512")]
fn aligned_buf_rejects_small_alignment() {
    AlignedBuf::zeroed(4096, 256);
}

#[test]
fn create_file_reads_back_zeroes() {
    let Some(dir) = direct_io_dir("create_file_reads_back_zeroes") else {
        return;
    };
    let (dev, path) = new_device(&dir);
    assert_eq!(dev.path(), path);
    assert_eq!(dev.kind(), DeviceKind::File);
    assert_eq!(dev.size(), MIB);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), MIB);
    assert!(dev.sector_size().is_power_of_two() && dev.sector_size() >= 512);
    assert!(dev.dio_mem_align().is_power_of_two() && dev.dio_mem_align() >= 512);
    let mut buf = buf_for(&dev, MIB as usize, 0xff);
    dev.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "new file must read as zeroes");
}

#[test]
fn write_then_read_pattern_at_nonzero_sector() {
    let Some(dir) = direct_io_dir("write_then_read_pattern_at_nonzero_sector") else {
        return;
    };
    let (dev, path) = new_device(&dir);
    let ss = sector(&dev);
    let data = pattern(2 * ss);
    let mut buf = buf_for(&dev, 2 * ss, 0);
    buf.copy_from_slice(&data);
    dev.write_at(3 * ss as u64, &buf).unwrap();
    dev.sync_data().unwrap();

    let mut back = buf_for(&dev, 2 * ss, 0);
    dev.read_at(3 * ss as u64, &mut back).unwrap();
    assert_eq!(&back[..], &data[..]);
    // The neighbouring sectors are untouched.
    let mut around = buf_for(&dev, ss, 0xff);
    for s in [2, 5] {
        dev.read_at((s * ss) as u64, &mut around).unwrap();
        assert!(around.iter().all(|&b| b == 0), "sector {s} changed");
    }
    // The bytes are in the file where expected, and survive reopening.
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(&on_disk[3 * ss..5 * ss], &data[..]);
    let ro = Device::open(&path, Access::ReadOnly).unwrap();
    let mut again = buf_for(&ro, 2 * ss, 0);
    ro.read_at(3 * ss as u64, &mut again).unwrap();
    assert_eq!(&again[..], &data[..]);
}

#[test]
fn unaligned_offset_is_refused() {
    let Some(dir) = direct_io_dir("unaligned_offset_is_refused") else {
        return;
    };
    let (dev, path) = new_device(&dir);
    let ss = sector(&dev);
    let off = (ss / 2) as u64;
    let mut buf = buf_for(&dev, ss, 0xee);
    match dev.read_at(off, &mut buf) {
        Err(DeviceError::Unaligned {
            offset,
            len,
            sector_size,
            ..
        }) => {
            assert_eq!(
                (offset, len, sector_size),
                (off, ss as u64, dev.sector_size())
            );
        }
        other => panic!("expected Unaligned, got {other:?}"),
    }
    assert!(matches!(
        dev.write_at(off, &buf),
        Err(DeviceError::Unaligned { .. })
    ));
    // Nothing was written.
    assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn unaligned_length_is_refused() {
    let Some(dir) = direct_io_dir("unaligned_length_is_refused") else {
        return;
    };
    let (dev, path) = new_device(&dir);
    let ss = sector(&dev);
    let mut buf = buf_for(&dev, ss + ss / 2, 0xee);
    match dev.write_at(ss as u64, &buf) {
        Err(DeviceError::Unaligned { offset, len, .. }) => {
            assert_eq!((offset, len), (ss as u64, (ss + ss / 2) as u64));
        }
        other => panic!("expected Unaligned, got {other:?}"),
    }
    assert!(matches!(
        dev.read_at(0, &mut buf),
        Err(DeviceError::Unaligned { .. })
    ));
    assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn out_of_range_is_refused() {
    let Some(dir) = direct_io_dir("out_of_range_is_refused") else {
        return;
    };
    let (dev, path) = new_device(&dir);
    let ss = sector(&dev) as u64;
    let last_aligned = u64::MAX / ss * ss;
    for (offset, want_len) in [(MIB - ss, 2 * ss), (MIB, ss), (last_aligned, ss)] {
        let mut buf = buf_for(&dev, want_len as usize, 0xee);
        match dev.read_at(offset, &mut buf) {
            Err(DeviceError::OutOfRange {
                offset: o,
                len,
                size,
                ..
            }) => assert_eq!((o, len, size), (offset, want_len, MIB)),
            other => panic!("expected OutOfRange at {offset}, got {other:?}"),
        }
    }
    let two = buf_for(&dev, 2 * ss as usize, 0xee);
    assert!(matches!(
        dev.write_at(MIB - ss, &two),
        Err(DeviceError::OutOfRange { .. })
    ));
    // A pwrite past the end would have grown the file.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), MIB);
    // The last whole sector is still in range.
    let mut one = buf_for(&dev, ss as usize, 0xee);
    dev.read_at(MIB - ss, &mut one).unwrap();
}

#[test]
fn underaligned_buffer_is_refused() {
    let Some(dir) = direct_io_dir("underaligned_buffer_is_refused") else {
        return;
    };
    let (mut dev, _path) = new_device(&dir);
    // Pretend the device needs more alignment than the buffer has.
    dev.mem_align = 2 * DEFAULT_ALIGN;
    let buf = AlignedBuf::zeroed(sector(&dev), DEFAULT_ALIGN);
    match dev.write_at(0, &buf) {
        Err(DeviceError::UnalignedBuffer {
            align, required, ..
        }) => {
            assert_eq!((align, required), (DEFAULT_ALIGN, 2 * DEFAULT_ALIGN));
        }
        other => panic!("expected UnalignedBuffer, got {other:?}"),
    }
}

#[test]
fn read_past_shrunken_end_is_short_read() {
    let Some(dir) = direct_io_dir("read_past_shrunken_end_is_short_read") else {
        return;
    };
    let (dev, path) = new_device(&dir);
    let ss = sector(&dev) as u64;
    let half = MIB / 2;
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(half).unwrap();
    let mut buf = buf_for(&dev, 2 * ss as usize, 0xee);
    match dev.read_at(half - ss, &mut buf) {
        Err(DeviceError::ShortRead {
            offset, len, got, ..
        }) => assert_eq!((offset, len, got), (half - ss, 2 * ss, ss)),
        other => panic!("expected ShortRead, got {other:?}"),
    }
}

#[test]
fn write_on_read_only_device_fails_with_ebadf() {
    let Some(dir) = direct_io_dir("write_on_read_only_device_fails_with_ebadf") else {
        return;
    };
    let (dev, path) = new_device(&dir);
    let ro = Device::open(&path, Access::ReadOnly).unwrap();
    let buf = buf_for(&dev, sector(&dev), 0xee);
    match ro.write_at(0, &buf) {
        Err(DeviceError::Write { source, len, .. }) => {
            assert_eq!(source, Errno::BADF);
            assert_eq!(len, buf.len() as u64);
        }
        other => panic!("expected Write(EBADF), got {other:?}"),
    }
}

#[test]
fn create_file_refuses_existing_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("taken");
    std::fs::write(&path, b"precious").unwrap();
    match Device::create_file(&path, MIB) {
        Err(e @ DeviceError::AlreadyExists { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&*path.to_string_lossy()), "{msg}");
            assert!(msg.contains("already exists; remove it"), "{msg}");
        }
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[test]
fn open_refuses_directory_fifo_and_char_device() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, Mode::from_raw_mode(0o600)).unwrap();
    let mut cases = vec![
        (dir.path().to_owned(), "a directory"),
        (fifo, "a FIFO (named pipe)"),
    ];
    if Path::new("/dev/null").exists() {
        cases.push((PathBuf::from("/dev/null"), "a character device"));
    }
    for (path, expected) in cases {
        for access in [Access::ReadOnly, Access::ReadWrite] {
            match Device::open(&path, access) {
                Err(DeviceError::NotABlockDeviceOrFile { path: p, what }) => {
                    assert_eq!((p.as_path(), what), (path.as_path(), expected));
                }
                other => panic!("expected NotABlockDeviceOrFile, got {other:?}"),
            }
        }
    }
}

#[test]
fn open_missing_path_is_open_enoent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing");
    match Device::open(&path, Access::ReadWrite) {
        Err(e @ DeviceError::Open { .. }) => {
            let DeviceError::Open { source, .. } = &e else {
                unreachable!()
            };
            assert_eq!(*source, Errno::NOENT);
            let msg = e.to_string();
            assert!(msg.starts_with(&format!("cannot open {}: ", path.display())));
            assert!(msg.contains("No such file or directory"), "{msg}");
            assert!(msg.contains("check the path"), "{msg}");
        }
        other => panic!("expected Open(ENOENT), got {other:?}"),
    }
}

#[test]
fn proc_file_is_direct_io_unsupported() {
    let path = Path::new("/proc/version");
    if !path.exists() {
        println!("skipped: proc_file_is_direct_io_unsupported: /proc is not mounted");
        return;
    }
    match Device::open(path, Access::ReadOnly) {
        Err(e @ DeviceError::DirectIoUnsupported { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("/proc/version"), "{msg}");
            assert!(
                msg.contains("does not support direct I/O (O_DIRECT)"),
                "{msg}"
            );
            assert!(msg.contains("tmpfs") && msg.contains("ext4"), "{msg}");
        }
        other => panic!("expected DirectIoUnsupported, got {other:?}"),
    }
}

#[test]
fn tmpfs_without_direct_io_is_reported() {
    let test = "tmpfs_without_direct_io_is_reported";
    let shm = Path::new("/dev/shm");
    let is_tmpfs = rustix::fs::statfs(shm).is_ok_and(|s| i128::from(s.f_type) == TMPFS_MAGIC);
    if !is_tmpfs {
        println!("skipped: {test}: /dev/shm is missing or not tmpfs");
        return;
    }
    let dir = tempfile::tempdir_in(shm).unwrap();
    let path = dir.path().join("mailbox");
    std::fs::write(&path, [0u8; 4096]).unwrap();
    let flags = OFlags::RDONLY | OFlags::DIRECT | OFlags::CLOEXEC;
    match rustix::fs::open(&path, flags, Mode::empty()) {
        Err(Errno::INVAL) => {}
        Ok(_) => {
            // tmpfs supports O_DIRECT since Linux 6.6; then it must open.
            println!("skipped: {test}: tmpfs supports O_DIRECT on this kernel");
            let dev = Device::open(&path, Access::ReadWrite).unwrap();
            assert_eq!(dev.kind(), DeviceKind::File);
            return;
        }
        Err(e) => panic!("unexpected error probing tmpfs: {e}"),
    }
    assert!(matches!(
        Device::open(&path, Access::ReadWrite),
        Err(DeviceError::DirectIoUnsupported { .. })
    ));
    let new = dir.path().join("new");
    assert!(matches!(
        Device::create_file(&new, MIB),
        Err(DeviceError::DirectIoUnsupported { .. })
    ));
    assert!(!new.exists(), "create_file must remove the file it created");
}

#[test]
fn messages_show_offsets_in_decimal_and_hex() {
    let e = DeviceError::Unaligned {
        path: PathBuf::from("/dev/sdz"),
        offset: 65536,
        len: 100,
        sector_size: 4096,
    };
    assert_eq!(
        e.to_string(),
        "I/O on /dev/sdz at offset 65536 (0x10000) length 100 is not aligned to its \
         4096-byte sector size (this is a bug in spmbox)"
    );
    let e = DeviceError::Read {
        path: PathBuf::from("/dev/sdz"),
        offset: 512,
        len: 4096,
        source: Errno::IO,
    };
    let msg = e.to_string();
    assert!(
        msg.starts_with("cannot read 4096 bytes from /dev/sdz at offset 512 (0x200): "),
        "{msg}"
    );
    assert!(msg.contains("Input/output error (os error 5)"), "{msg}");
    let e = DeviceError::Open {
        path: PathBuf::from("/dev/sdz"),
        source: Errno::ACCESS,
    };
    assert!(e.to_string().contains("Permission denied"), "{e}");
    assert!(
        e.to_string().contains("run spmbox as a user allowed"),
        "{e}"
    );
}
