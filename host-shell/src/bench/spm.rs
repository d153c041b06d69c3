//! The SPM harness: the real SPM daemon in a thread, on a chosen backend,
//! and the scan section that times the SPM engine's pass over a mailbox.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant as StdInstant};

use serde_json::{Value, json};
use spmbox_core::driver::HostDriver;
use spmbox_core::host::{Host, HostConfig};
use spmbox_core::spm::{JobResult, Spm, SpmConfig};
use spmbox_core::testing::{MemDisk, NoFaults};
use spmbox_core::wire::{AREA_SIZE, Geometry, HostId, Uuid};

/// The scan image's writer: a one-volume host's driver on an in-memory disk.
type ScanDriver<'a> = HostDriver<&'a mut MemDisk<Vec<u8>, NoFaults>, Vec<u8>, 1>;

use super::err;
use super::fleet::FLEET_CHUNK;
use crate::backend::builtin;
use crate::backend::{BackendError, PoolReport, SpmBackend};
use crate::daemon::Clock;
use crate::daemon::spm::{self, SpmOptions};
use crate::io::device::Access;
use crate::io::mailbox::Mailbox;
use crate::stats::{percentile, round};

/// An SPM backend that extends every volume to whatever is asked, at once
/// and durably: the mailbox round trip with nothing behind it.
#[derive(Debug, Default)]
pub struct NoopBackend;

impl SpmBackend for NoopBackend {
    fn extend(&mut self, _volume: Uuid, target: u64, _urgent: bool) -> JobResult {
        JobResult::Extended { size: target }
    }
    fn commit(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    fn take_completed(&mut self) -> Vec<(Uuid, u64)> {
        Vec::new()
    }
    fn withdraw_parked(&mut self, _still_waiting: &dyn Fn(Uuid) -> Option<(u64, bool)>) {
        // Nothing is ever parked here.
    }
    fn add_lun(&mut self, _path: &Path) -> Result<String, BackendError> {
        Err(BackendError::new("the no-op backend has no LUNs"))
    }
    fn create_volume(
        &mut self,
        _id: Uuid,
        _virtual_size: u64,
        _initial_size: u64,
    ) -> Result<crate::backend::VolumeReport, BackendError> {
        Err(BackendError::new("the no-op backend has no volumes"))
    }
    fn poll_capacity(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    fn delete_volume(&mut self, _: Uuid) -> Result<crate::backend::Released, BackendError> {
        Err(BackendError::new("the no-op backend has no volumes"))
    }
    fn reduce_volume(
        &mut self,
        _: Uuid,
        _: u64,
    ) -> Result<(crate::backend::VolumeReport, crate::backend::Released), BackendError> {
        Err(BackendError::new("the no-op backend has no volumes"))
    }
    fn reclaim(&mut self, _: u64) -> u64 {
        0
    }
    fn release_pending(&self) -> Option<u64> {
        None
    }
    fn release_seq(&self) -> u64 {
        0
    }
    fn set_discard(&mut self, _: Vec<PathBuf>) {}
    fn report(&self) -> PoolReport {
        PoolReport {
            backend: "noop",
            extent_size: 1 << 20,
            total_extents: 0,
            free_extents: 0,
            luns: Vec::new(),
            volumes: Vec::new(),
            parked: Vec::new(),
            segments: Default::default(),
            released_extents: 0,
            moving: None,
        }
    }
}

/// The backend of an [`SpmThread`].
pub(super) enum Backend {
    Noop,
    Builtin,
    Lvm { vg: String, pvs: Vec<PathBuf> },
}

/// An SPM daemon running in a thread until dropped.
pub(super) struct SpmThread {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<SpmRun, String>>>,
}

/// What an SPM thread did.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct SpmRun {
    /// CPU time of its thread, seconds.
    pub(super) cpu: f64,
    pub(super) summary: spm::SpmSummary,
}

/// CPU time of the calling thread, seconds.
pub(super) fn thread_cpu_seconds() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

impl SpmThread {
    pub(super) fn start(
        device: &Path,
        run_dir: &Path,
        backend: Backend,
    ) -> Result<SpmThread, BackendError> {
        let stop = Arc::new(AtomicBool::new(false));
        let options = SpmOptions {
            device: device.to_owned(),
            config: spm::daemon_config(
                SpmConfig::default().doorbell_interval,
                SpmConfig::default().full_scan_interval,
            ),
            spm_id: 0,
            control: run_dir.join(format!("spm-{}.sock", std::process::id())),
            metrics: None,
            lease_version: 0,
            accept_metadata_rollback: false,
            // The bench times the mailbox and the backends, not the
            // pool's fill: no usage warnings in its output.
            pool_warn: crate::daemon::pool_usage::PoolWarn::off(),
            discard: None,
            lun_search: Vec::new(),
        };
        let flag = stop.clone();
        let path = device.to_owned();
        let thread = std::thread::spawn(move || {
            let open = || -> Result<Box<dyn SpmBackend>, BackendError> {
                match &backend {
                    Backend::Noop => Ok(Box::new(NoopBackend)),
                    Backend::Builtin => Ok(Box::new(builtin::BuiltinSpm::open(&path)?)),
                    Backend::Lvm { vg, pvs } => crate::backend::lvm_glue::spm_backend(vg, pvs),
                }
            };
            spm::run(&options, &open, flag)
                .map(|summary| SpmRun {
                    cpu: thread_cpu_seconds(),
                    summary,
                })
                .map_err(|e| e.to_string())
        });
        let spm = SpmThread {
            stop,
            thread: Some(thread),
        };
        // Wait until the SPM header says active.
        let mailbox = Mailbox::open(device, Access::ReadOnly).map_err(err)?;
        let started = StdInstant::now();
        loop {
            if let Some(h) = spm::read_spm_header(&mailbox)?
                && h.state == spmbox_core::wire::SpmState::Active
                && h.heartbeat > 0
            {
                return Ok(spm);
            }
            if spm.thread.as_ref().is_some_and(|t| t.is_finished())
                || started.elapsed() > Duration::from_secs(30)
            {
                return Err(BackendError::new("the SPM did not start"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the SPM; returns what it did.
    pub(super) fn stop(mut self) -> Result<SpmRun, BackendError> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Ok(run))) => Ok(run),
            Some(Ok(Err(e))) => Err(BackendError::new(format!("the SPM failed: {e}"))),
            Some(Err(_)) => Err(BackendError::new("the SPM thread panicked")),
            None => Ok(SpmRun::default()),
        }
    }
}

impl Drop for SpmThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The core engine reading a 2000-host mailbox image from memory.
pub(super) fn scan(fraction_busy: f64, label: &str, repeats: usize) -> Result<Value, BackendError> {
    let hosts = 2000u16;
    let geometry = Geometry::new(hosts, 512)?;
    let domain = Uuid([0x5a; 16]);
    let area_bytes = usize::from(hosts) * AREA_SIZE;
    let mut image = MemDisk::new(
        vec![0u8; geometry.mailbox_size() as usize],
        geometry.sector_size(),
        NoFaults,
    );
    let outbox = vec![0u8; area_bytes];
    let busy = ((f64::from(hosts) * fraction_busy).round() as usize).min(usize::from(hosts));
    let clock = Clock::start();
    let config = HostConfig {
        chunk_size: FLEET_CHUNK,
        lease_interval: std::time::Duration::ZERO,
        ..HostConfig::default()
    };
    for k in 0..busy {
        let id = (k * usize::from(hosts) / busy.max(1)) as u16 + 1;
        let mut engine = Host::<1>::new(domain, HostId::new(id), geometry, config)?;
        let volume = Uuid([
            (k % 251) as u8 + 1,
            (k / 251) as u8 + 1,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
        ]);
        engine.add_volume(volume, 1 << 40, 1 << 41, FLEET_CHUNK, 0)?;
        // The request goes on an in-memory disk through the core's host
        // driver, as a host daemon writes it.
        let mut driver = HostDriver::new(&mut image, engine, vec![0u8; ScanDriver::BUFFER_LEN])
            .map_err(|e| BackendError::new(format!("scan image: {e}")))?;
        driver.start(clock.now(), 1).map_err(err)??;
        driver
            .engine_mut()
            .handle_allocation(clock.now(), volume, FLEET_CHUNK - 4096);
        driver.write().map_err(err)?;
    }
    let at = geometry.inbox_offset() as usize;
    let inbox = &image.bytes()[at..at + area_bytes];
    let mut times = Vec::new();
    for _ in 0..repeats {
        let mut spm: Box<Spm<1024>> = Box::new(Spm::new(
            clock.now(),
            domain,
            geometry,
            HostId::NONE,
            1,
            None,
            SpmConfig::default(),
        )?);
        let t = StdInstant::now();
        spm.handle_hosts(clock.now(), HostId::new(1), inbox, &outbox);
        times.push(t.elapsed().as_secs_f64() * 1e3);
        let queued = spm.queue_len();
        if queued < busy.min(1024) {
            return Err(BackendError::new(format!(
                "scan queued {queued} requests of {busy}: the benchmark's image is wrong"
            )));
        }
    }
    times.sort_by(f64::total_cmp);
    let p50 = percentile(&times, 50.0);
    Ok(json!({
        "hosts": hosts,
        "busy": label,
        "busy_hosts": busy,
        "scan_p50_ms": round(p50, 3),
        "scans_per_s": round(1e3 / p50, 1),
        "mib_per_s": round(2.0 * area_bytes as f64 / (1 << 20) as f64 / (p50 / 1e3), 1),
    }))
}
