//! Firmware-sized instantiations of the spmbox-core engines and their
//! drivers, for measuring code size and static memory on
//! `thumbv7em-none-eabihf`. Every public input and output of each engine
//! is reached from a function here (through the driver, as firmware runs
//! them), so the compiled object holds the code firmware would link.
#![no_std]

use core::mem::size_of;

use spmbox_core::driver::{BlockDevice, HostDriver, SpmDriver};
use spmbox_core::host::{Host, HostConfig, HostEvent};
use spmbox_core::pool::DefaultPool;
use spmbox_core::spm::{Spm, SpmConfig, run_pool_job};
use spmbox_core::time::Instant;
use spmbox_core::wire::{Geometry, HostId, SpmHeader, Uuid};

/// The SPM engine with a 256-request window (any number of hosts).
pub type FirmwareSpm = Spm<256>;
/// A host engine for 64 volumes.
pub type FirmwareHost = Host<64>;

/// Bytes of state of each engine on this target: SPM, host, pool.
pub const STATE_BYTES: [usize; 3] = [
    size_of::<FirmwareSpm>(),
    size_of::<FirmwareHost>(),
    size_of::<DefaultPool>(),
];

/// A block device over memory (what a firmware's storage driver stands in
/// for here: the probe measures the mailbox driver, not a storage driver).
pub struct Ram<'a>(pub &'a mut [u8]);

impl embedded_io::ErrorType for Ram<'_> {
    type Error = core::convert::Infallible;
}

impl BlockDevice for Ram<'_> {
    fn sector_size(&self) -> u32 {
        512
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        let at = offset as usize;
        if let Some(src) = self.0.get(at..at + buf.len()) {
            buf.copy_from_slice(src);
        }
        Ok(())
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), Self::Error> {
        let at = offset as usize;
        if let Some(dst) = self.0.get_mut(at..at + buf.len()) {
            dst.copy_from_slice(buf);
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// The SPM as firmware runs it: the engine in its driver, without a mirror
/// of the outbox areas (reads 16 hosts per chunk).
pub type FirmwareSpmDriver<'a> = SpmDriver<Ram<'a>, &'a mut [u8], 256>;
/// A host in its driver.
pub type FirmwareHostDriver<'a> = HostDriver<Ram<'a>, &'a mut [u8], 64>;

/// An SPM driver for `spm` on `disk`, in `buffer`.
pub fn spm_driver<'a>(
    spm: FirmwareSpm,
    disk: &'a mut [u8],
    buffer: &'a mut [u8],
) -> Option<FirmwareSpmDriver<'a>> {
    SpmDriver::new(Ram(disk), spm, buffer, 16, false).ok()
}

/// One round of an SPM: every input and output, through the driver.
pub fn spm_round(driver: &mut FirmwareSpmDriver<'_>, pool: &mut DefaultPool, now: Instant) -> u64 {
    let _ = driver.read(now);
    while let Some(job) = driver.engine_mut().poll_job() {
        let result = run_pool_job(pool, &job);
        driver
            .engine_mut()
            .handle_job_result(now, job.volume, result);
    }
    if let Ok(Some(_)) = driver.poll_commit(now) {
        driver.engine_mut().handle_committed(now, 1);
    }
    while let Some(c) = pool.poll_completed() {
        driver.engine_mut().handle_capacity(now, c.volume, c.size);
    }
    let _ = driver.write();
    while driver.engine_mut().poll_event().is_some() {}
    driver.stats().reads + driver.engine().poll_timeout().map_or(0, |t| t.as_micros())
}

/// A graceful stop of an SPM.
pub fn spm_stop(driver: &mut FirmwareSpmDriver<'_>, now: Instant) -> bool {
    driver.stop(now).unwrap_or(false)
}

/// A new SPM taking over from `found`.
pub fn spm_start(
    now: Instant,
    domain: Uuid,
    geometry: Geometry,
    found: Option<&SpmHeader>,
) -> Option<FirmwareSpm> {
    Spm::new(
        now,
        domain,
        geometry,
        HostId::NONE,
        1,
        found,
        SpmConfig::default(),
    )
    .ok()
}

/// One round of a host: every input and output, through the driver.
pub fn host_round(
    driver: &mut FirmwareHostDriver<'_>,
    now: Instant,
    volume: Uuid,
    allocation: u64,
) -> u64 {
    driver
        .engine_mut()
        .handle_allocation(now, volume, allocation);
    let _ = driver.step(now);
    while let Some(e) = driver.engine_mut().poll_event() {
        if let HostEvent::Refresh { volume, size } = e {
            driver.engine_mut().handle_refreshed(now, volume, size);
        }
    }
    driver.stats().writes + driver.engine().poll_timeout().map_or(0, |t| t.as_micros())
}

/// A host starting from its areas, in its driver.
pub fn host_start<'a>(
    domain: Uuid,
    geometry: Geometry,
    now: Instant,
    disk: &'a mut [u8],
    buffer: &'a mut [u8],
) -> Option<FirmwareHostDriver<'a>> {
    let host = Host::new(domain, HostId::new(1), geometry, HostConfig::default()).ok()?;
    let mut driver = HostDriver::new(Ram(disk), host, buffer).ok()?;
    driver.start(now, 1).ok()?.ok()?;
    Some(driver)
}

/// A clean stop of a host.
pub fn host_stop(driver: &mut FirmwareHostDriver<'_>) -> bool {
    driver.release().is_ok()
}

/// Pool metadata: commit and reload.
pub fn pool_commit(pool: &DefaultPool, seq: u64, out: &mut [u8]) -> usize {
    pool.encode(seq, out).unwrap_or(0)
}

/// Pool metadata reload from its two copies.
pub fn pool_load(pool: &mut DefaultPool, a: &[u8], b: &[u8]) -> u64 {
    pool.decode_into(a, b).unwrap_or(0)
}

/// Pool administration.
pub fn pool_admin(pool: &mut DefaultPool, lun: Uuid, volume: Uuid) -> bool {
    pool.add_lun(lun, 100).is_ok()
        && pool.create_volume(volume, 1 << 30, 1 << 27).is_ok()
        && pool.check_invariants().is_ok()
}
