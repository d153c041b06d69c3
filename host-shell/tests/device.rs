//! `spmbox::io::device` on real block devices: loop devices with 512- and
//! 4096-byte logical sectors.
//!
//! These tests need root and `losetup`; without them they print why they
//! were skipped and pass.

mod common;

use std::path::PathBuf;

use common::{Loop, loop_devices_missing};
use spmbox::io::device::{Access, AlignedBuf, Device, DeviceError, DeviceKind};
use tempfile::TempDir;

/// Size of the loop devices' backing files.
const SIZE: u64 = 4 << 20;

const TMPFS_MAGIC: i128 = 0x0102_1994;

/// A temporary directory on a real (non-tmpfs) file system.
fn disk_temp_dir() -> TempDir {
    for base in [std::env::temp_dir(), PathBuf::from("/var/tmp")] {
        let tmpfs = rustix::fs::statfs(&base).is_ok_and(|s| i128::from(s.f_type) == TMPFS_MAGIC);
        if !tmpfs {
            return tempfile::tempdir_in(&base).expect("create temp dir");
        }
    }
    panic!("both the temp dir and /var/tmp are on tmpfs; set TMPDIR to a disk file system");
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// Attaches a loop device with `sector_size`-byte sectors and exercises
/// `Device` on it.
fn check_loop_device(test: &str, sector_size: u32) {
    if let Some(reason) = loop_devices_missing() {
        println!("skipped: {test}: {reason}");
        return;
    }
    let dir = disk_temp_dir();
    let backing = dir.path().join("backing");
    std::fs::File::create(&backing)
        .and_then(|f| f.set_len(SIZE))
        .expect("create backing file");
    let lo = Loop::attach(&backing, sector_size);

    let dev = Device::open(&lo.dev, Access::ReadWrite).expect("open loop device");
    assert_eq!(dev.path(), lo.dev);
    assert_eq!(dev.kind(), DeviceKind::BlockDevice);
    assert_eq!(dev.sector_size(), sector_size);
    assert_eq!(dev.size(), SIZE);
    assert!(dev.dio_mem_align() >= 512 && dev.dio_mem_align() <= 4096);

    // Write two sectors at sector 3 and read them back.
    let ss = sector_size as usize;
    let offset = 3 * u64::from(sector_size);
    let data = pattern(2 * ss, (sector_size / 512) as u8);
    let mut buf = AlignedBuf::new(2 * ss);
    buf.copy_from_slice(&data);
    dev.write_at(offset, &buf).expect("write");
    dev.sync_data().expect("sync");
    let mut back = AlignedBuf::new(2 * ss);
    dev.read_at(offset, &mut back).expect("read");
    assert_eq!(&back[..], &data[..]);
    let on_disk = std::fs::read(&backing).expect("read backing file");
    assert_eq!(
        &on_disk[3 * ss..5 * ss],
        &data[..],
        "not in the backing file"
    );

    // The last sector is in range, the one after it is not.
    let last = SIZE - u64::from(sector_size);
    let mut one = AlignedBuf::new(ss);
    dev.read_at(last, &mut one).expect("read last sector");
    assert!(matches!(
        dev.read_at(SIZE, &mut one),
        Err(DeviceError::OutOfRange { size: SIZE, .. })
    ));

    // A 512-byte write at offset 512 is whole sectors only on 512-byte devices.
    let small = AlignedBuf::new(512);
    match (sector_size, dev.write_at(512, &small)) {
        (512, Ok(())) => {}
        (
            4096,
            Err(DeviceError::Unaligned {
                offset: 512,
                len: 512,
                sector_size: 4096,
                ..
            }),
        ) => {}
        (_, other) => panic!("512-byte write on {sector_size}-byte device: {other:?}"),
    }
}

#[test]
fn loop_device_with_512_byte_sectors() {
    check_loop_device("loop_device_with_512_byte_sectors", 512);
}

#[test]
fn loop_device_with_4096_byte_sectors() {
    check_loop_device("loop_device_with_4096_byte_sectors", 4096);
}

#[test]
fn loop_device_refuses_unaligned_512_byte_write_at_offset_zero() {
    let test = "loop_device_refuses_unaligned_512_byte_write_at_offset_zero";
    if let Some(reason) = loop_devices_missing() {
        println!("skipped: {test}: {reason}");
        return;
    }
    let dir = disk_temp_dir();
    let backing = dir.path().join("backing");
    std::fs::write(&backing, vec![0xabu8; SIZE as usize]).expect("create backing file");
    let lo = Loop::attach(&backing, 4096);
    let dev = Device::open(&lo.dev, Access::ReadWrite).expect("open loop device");
    let small = AlignedBuf::new(512);
    assert!(matches!(
        dev.write_at(0, &small),
        Err(DeviceError::Unaligned {
            sector_size: 4096,
            ..
        })
    ));
    drop(dev);
    let on_disk = std::fs::read(&backing).expect("read backing file");
    assert!(
        on_disk.iter().all(|&b| b == 0xab),
        "refused write reached the disk"
    );
}
