//! Firmware-sized instantiations of the spmbox-core engines, for measuring
//! code size and static memory on `thumbv7em-none-eabihf`. Every public
//! input and output of each engine is reached from a function here, so the
//! compiled object holds the code firmware would link.
#![no_std]

use core::mem::size_of;

use spmbox_core::host::{Host, HostConfig, HostEvent};
use spmbox_core::pool::{DefaultPool, Extend};
use spmbox_core::spm::{JobResult, Spm, SpmConfig};
use spmbox_core::time::Instant;
use spmbox_core::wire::{Geometry, SpmHeader, Uuid};

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

/// What an SPM read in one round.
pub struct SpmReads<'a> {
    /// The doorbell record.
    pub doorbell: &'a [u8],
    /// The SPM header record.
    pub header: &'a [u8],
    /// Inbox areas from host 1 on.
    pub inbox: &'a [u8],
    /// Outbox areas from host 1 on.
    pub outbox: &'a [u8],
}

/// One round of an SPM: every input and output.
pub fn spm_round(
    spm: &mut FirmwareSpm,
    pool: &mut DefaultPool,
    now: Instant,
    reads: &SpmReads<'_>,
    out: &mut [u8; 128],
) -> u64 {
    spm.handle_doorbell(now, reads.doorbell);
    spm.handle_spm_header(now, reads.header);
    spm.handle_hosts(now, 1, reads.inbox, reads.outbox);
    let mut offsets = 0;
    while let Some(io) = spm.poll_io(now) {
        offsets += matches!(io, spmbox_core::spm::SpmIo::ReadDoorbell) as u64;
    }
    while let Some(job) = spm.poll_job() {
        let result = match pool.extend(job.volume, job.target_size, job.urgent) {
            Ok(Extend::Extended { size }) => JobResult::Extended { size },
            Ok(Extend::Parked { size }) => JobResult::NoSpace { size },
            Err(_) => JobResult::Failed { code: 5 },
        };
        spm.handle_job_result(now, job.volume, result);
    }
    while let Some(c) = pool.poll_completed() {
        spm.handle_capacity(now, c.volume, c.size);
    }
    while let Some(w) = spm.poll_write() {
        *out = w.record;
        offsets += w.offset;
    }
    while spm.poll_event().is_some() {}
    offsets + spm.poll_timeout().map_or(0, |t| t.as_micros())
}

/// A new SPM taking over from `found`.
pub fn spm_start(
    now: Instant,
    domain: Uuid,
    geometry: Geometry,
    found: Option<&SpmHeader>,
) -> Option<FirmwareSpm> {
    Spm::new(now, domain, geometry, 0, 1, found, SpmConfig::default()).ok()
}

/// One round of a host: every input and output.
pub fn host_round(
    host: &mut FirmwareHost,
    now: Instant,
    volume: Uuid,
    allocation: u64,
    outbox: &[u8],
    out: &mut [u8; 128],
) -> u64 {
    host.handle_allocation(now, volume, allocation);
    host.handle_outbox(now, outbox);
    host.handle_timeout(now);
    let mut n = 0;
    while let Some(w) = host.poll_write() {
        *out = w.record;
        n += w.offset;
    }
    while host.poll_read(now).is_some() {
        n += 1;
    }
    while let Some(e) = host.poll_event() {
        if let HostEvent::Refresh { volume, size } = e {
            host.handle_refreshed(now, volume, size);
        }
    }
    n + host.poll_timeout().map_or(0, |t| t.as_micros())
}

/// A host starting from its areas.
pub fn host_start(
    domain: Uuid,
    geometry: Geometry,
    now: Instant,
    inbox: &[u8],
    outbox: &[u8],
) -> Option<FirmwareHost> {
    let mut host = Host::new(domain, 1, geometry, HostConfig::default()).ok()?;
    host.start(now, inbox, outbox, 1).ok()?;
    Some(host)
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
