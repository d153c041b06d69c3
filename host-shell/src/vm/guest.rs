//! The workload inside a real VM (`spmbox vm-guest`): writes verifiable
//! blocks to the VM's disk, reads them all back, and reports on the
//! serial console.
//!
//! The blocks are those of the simulated guests ([`crate::daemon::guest`]): each
//! names its volume, offset and writer generation and carries a checksum,
//! so the host can check the disk image after the VM is gone
//! ([`crate::vm::image::verify_raw`]).
//!
//! # Resuming
//!
//! Blocks are written in order from offset 0, and the data is flushed to
//! the disk ([`FLUSH_EVERY`]) as it goes. A VM started again on the same
//! disk (qemu restarted after a crash) goes on at the first block that is
//! not good. Only the writes since the last flush can be lost, and only
//! they can have left a hole before good blocks, so: a binary search finds
//! a good block followed by a bad one, then the [`FLUSH_EVERY`] plus one
//! write before it are read, and the first bad block among them is where
//! writing resumes.
//!
//! # Output
//!
//! `spmbox-vm: resuming at N` (when N > 0), `spmbox-vm: wrote X of N`
//! every 16 MiB, and the result line
//! `SPMBOX-VM-RESULT {"written":..,"verified":..,"errors":..,"resumed_from":..,"first_error":..}`
//! that [`crate::vm::image::parse_result`] reads. Exit status 0 when
//! `errors` is 0, 1 otherwise.

use std::fs;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use rustix::io::Errno;
use spmbox_core::wire::Uuid;

use crate::cli::args::VmGuestArgs;
use crate::daemon::guest::{BLOCK, Pacer, check_block, fill_block};
use crate::io::device::{Access, AlignedBuf, Device, DeviceError};
use crate::vm::image::GuestResult;

/// How often the written data is flushed (and a progress line printed).
pub const FLUSH_EVERY: u64 = 16 << 20;

/// The most bytes read at once when checking.
const READ_CHUNK: u64 = 1 << 20;

/// How long a write that failed with EIO or ENOSPC waits before it is
/// tried again.
pub const RETRY_DELAY: Duration = Duration::from_millis(100);

/// How many times one write is tried before the workload gives up
/// writing (30 s of failures).
pub const MAX_ATTEMPTS: u32 = 300;

/// The largest `--write-size`.
pub const WRITE_SIZE_MAX: u64 = 64 << 20;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Runs the workload and prints its result line; returns the exit status.
pub fn run(args: &VmGuestArgs) -> ExitCode {
    let result = match prepare(args) {
        Ok((device, volume, bytes, write_size)) => work(
            &device,
            volume,
            args.generation,
            bytes,
            args.rate,
            write_size,
        ),
        Err(message) => GuestResult {
            written: 0,
            verified: 0,
            errors: 1,
            resumed_from: 0,
            first_error: Some(message),
            write_seconds: 0.0,
        },
    };
    if let Some(e) = &result.first_error {
        say(&format!("spmbox-vm: error: {e}"));
    }
    say(&result.to_line());
    if result.errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Opens the disk and checks the arguments against it.
fn prepare(args: &VmGuestArgs) -> Result<(Device, Uuid, u64, u64), String> {
    let volume = Uuid::parse_str(&args.volume)
        .filter(|u| !u.is_nil())
        .ok_or_else(|| {
            format!(
                "--volume {:?} is not a UUID other than the nil one (expected 8-4-4-4-12 hex digits)",
                args.volume
            )
        })?;
    if args.write_size < BLOCK || args.write_size % BLOCK != 0 || args.write_size > WRITE_SIZE_MAX {
        return Err(format!(
            "--write-size {} is not a multiple of {BLOCK} between {BLOCK} and {WRITE_SIZE_MAX}",
            args.write_size
        ));
    }
    let device = Device::open(&args.device, Access::ReadWrite).map_err(|e| e.to_string())?;
    let bytes = args.bytes - args.bytes % BLOCK;
    if bytes > device.size() {
        return Err(format!(
            "--bytes {} is more than {} holds ({} bytes); give the VM a larger disk or write less",
            args.bytes,
            args.device.display(),
            device.size()
        ));
    }
    Ok((device, volume, bytes, args.write_size))
}

/// Reads `len` bytes at `offset` into `buf[..len]`.
fn read(device: &Device, offset: u64, buf: &mut AlignedBuf, len: u64) -> Result<(), DeviceError> {
    device.read_into(offset, buf, 0..len as usize)
}

fn is_good(
    device: &Device,
    buf: &mut AlignedBuf,
    volume: Uuid,
    at: u64,
) -> Result<bool, DeviceError> {
    read(device, at, buf, BLOCK)?;
    Ok(check_block(&buf[..BLOCK as usize], volume, at).is_ok())
}

/// Where writing resumes on a disk whose first `bytes` should hold blocks
/// of `volume` written in order (see the module documentation).
pub fn resume_point(
    device: &Device,
    volume: Uuid,
    bytes: u64,
    write_size: u64,
) -> Result<u64, DeviceError> {
    let mut buf = AlignedBuf::new(READ_CHUNK as usize);
    // Binary search over blocks for a good block followed by a bad one.
    let (mut lo, mut hi) = (0u64, bytes / BLOCK);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if is_good(device, &mut buf, volume, mid * BLOCK)? {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let found = lo * BLOCK;
    // A hole can only be among the writes since the last flush.
    let mut at = found.saturating_sub(FLUSH_EVERY + write_size);
    while at < found {
        let len = READ_CHUNK.min(found - at);
        read(device, at, &mut buf, len)?;
        for (i, block) in buf[..len as usize].chunks(BLOCK as usize).enumerate() {
            let offset = at + i as u64 * BLOCK;
            if check_block(block, volume, offset).is_err() {
                return Ok(offset);
            }
        }
        at += len;
    }
    Ok(found)
}

/// Whether a failed write is one to wait out and try again.
fn retryable(e: &DeviceError) -> bool {
    matches!(
        e,
        DeviceError::Write {
            source: Errno::IO | Errno::NOSPC,
            ..
        }
    )
}

/// Counts an error; the first one is kept in words.
fn fail(result: &mut GuestResult, message: String) {
    result.errors += 1;
    if result.first_error.is_none() {
        result.first_error = Some(message);
    }
}

fn work(
    device: &Device,
    volume: Uuid,
    generation: u64,
    bytes: u64,
    rate: u64,
    write_size: u64,
) -> GuestResult {
    let mut result = GuestResult {
        written: 0,
        verified: 0,
        errors: 0,
        resumed_from: 0,
        first_error: None,
        write_seconds: 0.0,
    };
    let start = match resume_point(device, volume, bytes, write_size) {
        Ok(at) => at,
        Err(e) => {
            fail(&mut result, format!("finding where to resume: {e}"));
            return result;
        }
    };
    result.resumed_from = start;
    if let Some(up) = fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next().map(str::to_owned))
    {
        say(&format!("spmbox-vm: started {up} s after boot"));
    }
    if start > 0 {
        say(&format!("spmbox-vm: resuming at {start}"));
    }

    let mut buf = AlignedBuf::new(write_size as usize);
    let mut pacer = Pacer::new(rate);
    let mut offset = start;
    let mut next_flush = (start / FLUSH_EVERY + 1) * FLUSH_EVERY;
    let began = Instant::now();
    'writing: while offset < bytes {
        let len = write_size.min(bytes - offset);
        for (i, block) in buf[..len as usize].chunks_mut(BLOCK as usize).enumerate() {
            fill_block(block, volume, offset + i as u64 * BLOCK, generation);
        }
        std::thread::sleep(pacer.delay(Instant::now(), len));
        let mut attempts = 0;
        loop {
            attempts += 1;
            match device.write_from(offset, &buf, 0..len as usize) {
                Ok(()) => break,
                Err(e) if retryable(&e) && attempts < MAX_ATTEMPTS => {
                    fail(&mut result, format!("{e} (retried)"));
                    std::thread::sleep(RETRY_DELAY);
                }
                Err(e) => {
                    fail(
                        &mut result,
                        format!("{e} (gave up writing after {attempts} attempts)"),
                    );
                    break 'writing;
                }
            }
        }
        offset += len;
        result.written += len;
        if offset >= next_flush || offset == bytes {
            if let Err(e) = device.sync_data() {
                fail(&mut result, e.to_string());
            }
            next_flush = (offset / FLUSH_EVERY + 1) * FLUSH_EVERY;
            say(&format!("spmbox-vm: wrote {offset} of {bytes}"));
        }
    }
    let secs = began.elapsed().as_secs_f64();
    result.write_seconds = secs;
    if result.written > 0 && secs > 0.0 {
        say(&format!(
            "spmbox-vm: wrote {} bytes in {secs:.2} s ({:.1} MiB/s)",
            result.written,
            result.written as f64 / secs / (1 << 20) as f64
        ));
    }

    let began = Instant::now();
    let mut rbuf = AlignedBuf::new(READ_CHUNK as usize);
    let mut at = 0;
    while at < bytes {
        let len = READ_CHUNK.min(bytes - at);
        if let Err(e) = read(device, at, &mut rbuf, len) {
            fail(&mut result, e.to_string());
            break;
        }
        for (i, block) in rbuf[..len as usize].chunks(BLOCK as usize).enumerate() {
            let offset = at + i as u64 * BLOCK;
            match check_block(block, volume, offset) {
                Ok(_) => result.verified += BLOCK,
                Err(defect) => fail(&mut result, format!("block at {offset}: {defect}")),
            }
        }
        at += len;
    }
    say(&format!(
        "spmbox-vm: read back {bytes} bytes in {:.2} s",
        began.elapsed().as_secs_f64()
    ));
    result
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const V: Uuid = Uuid([0x33; 16]);
    const MIB: u64 = 1 << 20;

    /// A file device whose first `good` bytes hold the volume's blocks,
    /// or `None` when no temporary directory supports O_DIRECT.
    fn disk(dir: &Path, size: u64, good: u64) -> Option<Device> {
        let dev = Device::create_file(&dir.join("disk"), size).ok()?;
        let mut buf = AlignedBuf::new(MIB as usize);
        let mut at = 0;
        while at < good {
            let len = MIB.min(good - at);
            for (i, b) in buf[..len as usize].chunks_mut(BLOCK as usize).enumerate() {
                fill_block(b, V, at + i as u64 * BLOCK, 1);
            }
            dev.write_from(at, &buf, 0..len as usize).unwrap();
            at += len;
        }
        Some(dev)
    }

    fn zero_block(dev: &Device, at: u64) {
        dev.write_at(at, &AlignedBuf::new(BLOCK as usize)).unwrap();
    }

    #[test]
    fn resuming_starts_at_the_end_of_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let Some(dev) = disk(dir.path(), 8 * MIB, 3 * MIB + 8192) else {
            eprintln!("skipped: no temporary directory supports O_DIRECT");
            return;
        };
        assert_eq!(resume_point(&dev, V, 8 * MIB, MIB).unwrap(), 3 * MIB + 8192);
        // Asked for less than is there: nothing more to write.
        assert_eq!(resume_point(&dev, V, 2 * MIB, MIB).unwrap(), 2 * MIB);
        // Another volume's disk: start from the beginning.
        assert_eq!(resume_point(&dev, Uuid([1; 16]), 8 * MIB, MIB).unwrap(), 0);
    }

    #[test]
    fn resuming_goes_back_to_a_hole_left_by_an_unflushed_write() {
        let dir = tempfile::tempdir().unwrap();
        let Some(dev) = disk(dir.path(), 40 * MIB, 20 * MIB) else {
            eprintln!("skipped: no temporary directory supports O_DIRECT");
            return;
        };
        // A crash lost one block of a write before the last good one; the
        // binary search alone would land at 20 MiB.
        zero_block(&dev, 19 * MIB + 4096);
        assert_eq!(
            resume_point(&dev, V, 40 * MIB, MIB).unwrap(),
            19 * MIB + 4096
        );
    }

    #[test]
    fn only_eio_and_enospc_are_retried() {
        let write = |source| DeviceError::Write {
            path: "/dev/vda".into(),
            offset: 0,
            len: 4096,
            source,
        };
        assert!(retryable(&write(Errno::IO)));
        assert!(retryable(&write(Errno::NOSPC)));
        assert!(!retryable(&write(Errno::INVAL)));
    }
}
