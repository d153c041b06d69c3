//! The fleet: host engines for hundreds or thousands of hosts driven from
//! one thread, writing each host's inbox area, ringing the doorbell and
//! reading outbox areas as the host daemon does.

use std::cell::{Cell, RefCell};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant as StdInstant};

use spmbox_core::driver::{BlockDevice, HostDriver};
use spmbox_core::host::{Host, HostConfig, HostEvent};
use spmbox_core::pool::max_size;
use spmbox_core::wire::{AREA_SIZE, DOORBELL_OFFSET, HostId, RECORD_LEN, Uuid};

use super::err;
use crate::backend::BackendError;
use crate::daemon::Clock;
use crate::io::device::{Access, AlignedBuf, Device};
use crate::io::mailbox::{self, Mailbox};

/// Bytes one fleet request asks for.
pub(super) const FLEET_CHUNK: u64 = 1 << 20;

/// Batched, inbox areas written in one pass with at most this many
/// unwritten areas between them go to the device in one write.
const FLEET_WRITE_GAP: usize = 8;

/// The most volumes one fleet host drives: enough for one host to fill
/// all 31 slots of its area.
pub(super) const FLEET_VOLUMES: usize = 32;

/// A volume of a fleet host.
pub(super) struct FleetVolume {
    pub(super) id: Uuid,
    physical: u64,
    /// When its request went on disk.
    sent: Option<StdInstant>,
}

/// One host of a fleet: the core's host driver on a [`FleetDisk`].
pub(super) struct FleetHost {
    pub(super) driver: Box<HostDriver<FleetDisk, AlignedBuf, FLEET_VOLUMES>>,
    pub(super) volumes: Vec<FleetVolume>,
}

/// Host engines driven from one thread, as host daemons would drive them.
pub(super) struct Fleet {
    mailbox: Mailbox,
    clock: Clock,
    pub(super) hosts: Vec<FleetHost>,
    /// Round trips, milliseconds: request on disk to reply read.
    pub(super) round_trips: Vec<f64>,
    /// Requests answered with anything but an extension.
    pub(super) refused: u64,
    /// The device every host's driver writes through.
    io: Rc<FleetIo>,
    /// Hands a pass's rings to a [`Ringer`] thread (see [`FleetIo`]).
    batched: Option<Ringer>,
    /// A pass's rings are written at the same moment ([`Ringer::ring`]).
    rings_at_once: bool,
    /// CPU time of the last [`keep_asking`], seconds.
    pub(super) cpu: f64,
}

/// The mailbox device as the fleet's host drivers see it.
///
/// Unbatched (one sender at a time), every read and write goes to the
/// device as a host daemon's would. Batched (bursts and throughput runs),
/// the fleet stands in for hosts that run at the same time on their own
/// machines, which one thread doing one host's I/O after another cannot
/// be: with 250 hosts that took 44 ms to write a burst's areas and 60 ms
/// to read their outboxes once, so a round trip measured the fleet's turn
/// rather than the SPM. So in a batched pass the inbox areas the hosts
/// wrote are kept in `inboxes` and go to the device as runs of areas
/// (merging gaps of up to [`FLEET_WRITE_GAP`] areas, which are rewritten
/// as they are), the rings are handed to a [`Ringer`] thread, and the
/// hosts read their outbox areas and the SPM header through the page cache
/// (`cached`), which the SPM's direct writes invalidate: a read costs a
/// copy unless the SPM wrote there since, and then one read of the device.
/// (Each host reads the SPM header once a second; 2000 of them in turn
/// took over 100 ms of the fleet's thread, which real hosts spend on their
/// own machines.)
struct FleetIo {
    device: Device,
    inbox_offset: u64,
    outbox_offset: u64,
    batched: Cell<bool>,
    /// The device opened without `O_DIRECT`, for batched outbox reads.
    cached: std::fs::File,
    /// Every inbox area of the mailbox, as the fleet's hosts wrote them.
    inboxes: RefCell<AlignedBuf>,
    /// Areas written in this pass (batched).
    dirty: RefCell<Vec<usize>>,
    /// Rings of this pass, with their host's area (batched).
    rings: RefCell<Vec<(usize, [u8; RECORD_LEN])>>,
}

/// One fleet host's handle on [`FleetIo`].
pub(super) struct FleetDisk {
    io: Rc<FleetIo>,
    /// The host's inbox area, as an index.
    area: usize,
}

impl embedded_io::ErrorType for FleetDisk {
    type Error = crate::io::device::DeviceError;
}

impl BlockDevice for FleetDisk {
    fn sector_size(&self) -> u32 {
        self.io.device.sector_size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        if self.io.batched.get()
            && (offset >= self.io.outbox_offset || offset < self.io.inbox_offset)
        {
            use std::os::unix::fs::FileExt;
            return self.io.cached.read_exact_at(buf, offset).map_err(|e| {
                crate::io::device::DeviceError::Read {
                    path: self.io.device.path().to_owned(),
                    offset,
                    len: buf.len() as u64,
                    source: rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO),
                }
            });
        }
        self.io.device.read_slice(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), Self::Error> {
        let io = &self.io;
        if !io.batched.get() {
            return io.device.write_slice(offset, buf);
        }
        if offset == DOORBELL_OFFSET {
            let mut record = [0; RECORD_LEN];
            record.copy_from_slice(&buf[..RECORD_LEN]);
            io.rings.borrow_mut().push((self.area, record));
            return Ok(());
        }
        let at = (offset - io.inbox_offset) as usize;
        io.inboxes.borrow_mut()[at..at + buf.len()].copy_from_slice(buf);
        io.dirty.borrow_mut().push(self.area);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        self.io.device.sync_data()
    }
}

/// Rings waiting to be written, keyed by their host's inbox area place.
type RingQueue = std::collections::VecDeque<(usize, [u8; RECORD_LEN])>;

/// Writes the doorbell rings it is given, one after another, in its own
/// thread, as thousands of hosts ringing on their own would: each ring is
/// written unless the same host rang again before it was (the newer ring
/// takes its place), and rings that follow each other faster than the
/// SPM reads the doorbell overwrite each other on disk, as they would.
struct Ringer {
    pending: Arc<std::sync::Mutex<RingQueue>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ringer {
    fn start(mailbox: &Mailbox) -> Result<Ringer, BackendError> {
        let device = crate::io::device::Device::open(mailbox.device().path(), Access::ReadWrite)?;
        let sector = mailbox.geometry().sector_size() as usize;
        let pending = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (pending.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = AlignedBuf::zeroed(sector, device.dio_mem_align());
            while !s.load(Ordering::Relaxed) {
                let next: Option<(usize, [u8; RECORD_LEN])> =
                    p.lock().ok().and_then(|mut q| q.pop_front());
                match next {
                    Some((_, record)) => {
                        buf[..RECORD_LEN].copy_from_slice(&record);
                        // A lost ring is a hint lost: the SPM's scans
                        // cover it.
                        let _ = device.write_at(DOORBELL_OFFSET, &buf);
                    }
                    None => std::thread::sleep(Duration::from_micros(200)),
                }
            }
        });
        Ok(Ringer {
            pending,
            stop,
            thread: Some(thread),
        })
    }

    /// Rings of hosts (keyed by their inbox area's place). `at_once`:
    /// they were written at the same moment, on separate machines, so the
    /// doorbell is left holding one of them (the last) and the others are
    /// lost, as they would be.
    fn ring(&self, rings: &[(usize, [u8; RECORD_LEN])], at_once: bool) {
        let rings = match rings.split_last() {
            Some((last, _)) if at_once => std::slice::from_ref(last),
            _ => rings,
        };
        if let Ok(mut q) = self.pending.lock() {
            for &(host, record) in rings {
                match q.iter_mut().find(|(h, _)| *h == host) {
                    Some(slot) => slot.1 = record,
                    None => q.push_back((host, record)),
                }
            }
        }
    }
}

impl Drop for Ringer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A volume a fleet host drives: its id, virtual size and current size.
type FleetVolumeSpec = (Uuid, u64, u64);

impl Fleet {
    /// A fleet of hosts `ids`, each with one volume of its own (the no-op
    /// SPM extends whatever is asked).
    pub(super) fn new(
        device: &Path,
        ids: impl Iterator<Item = u16>,
    ) -> Result<Fleet, BackendError> {
        let mut hosts = Vec::new();
        for id in ids {
            let v = mailbox::random_uuid()?;
            hosts.push((id, vec![(v, 1u64 << 40, FLEET_CHUNK)]));
        }
        Fleet::with_volumes(device, hosts)
    }

    /// A fleet of the given hosts, each with its volumes (at most
    /// [`FLEET_VOLUMES`]).
    pub(super) fn with_volumes(
        device: &Path,
        hosts: Vec<(u16, Vec<FleetVolumeSpec>)>,
    ) -> Result<Fleet, BackendError> {
        let mailbox = Mailbox::open(device, Access::ReadWrite).map_err(err)?;
        let geometry = mailbox.geometry();
        let domain = mailbox.superblock().domain;
        let clock = Clock::start();
        // The fleet stands in for many hosts' requests and replies in one
        // process; each of its engines keeps no builtin host-id lease.
        let config = HostConfig {
            chunk_size: FLEET_CHUNK,
            lease_interval: std::time::Duration::ZERO,
            ..HostConfig::default()
        };
        let inboxes = mailbox.read(
            geometry.inbox_offset(),
            usize::from(geometry.max_hosts()) * AREA_SIZE,
        )?;
        let io = Rc::new(FleetIo {
            device: Device::open(device, Access::ReadWrite)?,
            inbox_offset: geometry.inbox_offset(),
            outbox_offset: geometry.outbox_offset(),
            batched: Cell::new(false),
            cached: std::fs::File::open(device)
                .map_err(|e| BackendError::io(format!("cannot open {}", device.display()), e))?,
            inboxes: RefCell::new(inboxes),
            dirty: RefCell::new(Vec::new()),
            rings: RefCell::new(Vec::new()),
        });
        let align = io.device.dio_mem_align();
        let mut fleet = Vec::new();
        for (id, specs) in hosts {
            let Some(inbox) = geometry.inbox_area(HostId::new(id)) else {
                continue;
            };
            let mut engine = Host::new(domain, HostId::new(id), geometry, config)?;
            let mut volumes = Vec::new();
            for (v, virtual_size, size) in specs.into_iter().take(FLEET_VOLUMES) {
                let limit = max_size(virtual_size, 1 << 20).unwrap_or(u64::MAX);
                engine.add_volume(v, virtual_size, limit, size, 0)?;
                volumes.push(FleetVolume {
                    id: v,
                    physical: size,
                    sent: None,
                });
            }
            let disk = FleetDisk {
                io: io.clone(),
                area: ((inbox - geometry.inbox_offset()) as usize) / AREA_SIZE,
            };
            let buffer = AlignedBuf::zeroed(
                HostDriver::<FleetDisk, AlignedBuf, FLEET_VOLUMES>::BUFFER_LEN,
                align,
            );
            let mut driver = Box::new(
                HostDriver::new(disk, engine, buffer)
                    .map_err(|e| BackendError::new(format!("fleet host {id}: {e}")))?,
            );
            driver.start(clock.now(), 1)??;
            fleet.push(FleetHost { driver, volumes });
        }
        Ok(Fleet {
            mailbox,
            clock,
            hosts: fleet,
            round_trips: Vec::new(),
            refused: 0,
            io,
            batched: None,
            rings_at_once: false,
            cpu: 0.0,
        })
    }

    /// Batched writes, rings and reads from now on (see [`FleetIo`]);
    /// `rings_at_once`: the rings of a pass are written at the same
    /// moment, so all but one are lost ([`Ringer::ring`]).
    pub(super) fn batch(&mut self, rings_at_once: bool) -> Result<(), BackendError> {
        self.rings_at_once = rings_at_once;
        if self.batched.is_some() {
            return Ok(());
        }
        // Unbatched writes went to the device: start from what is there.
        let geometry = self.mailbox.geometry();
        *self.io.inboxes.borrow_mut() = self.mailbox.read(
            geometry.inbox_offset(),
            usize::from(geometry.max_hosts()) * AREA_SIZE,
        )?;
        self.batched = Some(Ringer::start(&self.mailbox)?);
        self.io.batched.set(true);
        Ok(())
    }

    /// Host `i`'s guest on its first volume crosses its watermark.
    pub(super) fn ask(&mut self, i: usize) {
        self.ask_volume(i, 0);
    }

    /// Host `i`'s guest on volume `v` crosses its watermark.
    pub(super) fn ask_volume(&mut self, i: usize, v: usize) {
        let now = self.clock.now();
        let h = &mut self.hosts[i];
        let Some(vol) = h.volumes.get(v) else {
            return;
        };
        h.driver
            .engine_mut()
            .handle_allocation(now, vol.id, vol.physical.saturating_sub(4096));
    }

    /// Every host's writes: its inbox area, then its doorbell ring.
    /// A request counts as sent once its area is on the device.
    pub(super) fn flush(&mut self) -> Result<(), BackendError> {
        let mut sent = Vec::new();
        for (i, h) in self.hosts.iter_mut().enumerate() {
            h.driver.write()?;
            let engine = h.driver.engine();
            for (v, vol) in h.volumes.iter_mut().enumerate() {
                if vol.sent.is_none() && engine.volume(vol.id).is_some_and(|s| s.request.is_some())
                {
                    if self.batched.is_some() {
                        sent.push((i, v));
                    } else {
                        vol.sent = Some(StdInstant::now());
                    }
                }
            }
        }
        let Some(ringer) = &self.batched else {
            return Ok(());
        };
        // The pass's areas as runs (the fleet holds every inbox area, so
        // the unchanged ones in a gap are rewritten as they are), then its
        // rings.
        let mut dirty = std::mem::take(&mut *self.io.dirty.borrow_mut());
        dirty.sort_unstable();
        dirty.dedup();
        let inboxes = self.io.inboxes.borrow();
        let mut k = 0;
        while k < dirty.len() {
            let first = dirty[k];
            let mut end = first + 1;
            k += 1;
            while k < dirty.len() && dirty[k] <= end + FLEET_WRITE_GAP {
                end = dirty[k] + 1;
                k += 1;
            }
            let (from, to) = (first * AREA_SIZE, end * AREA_SIZE);
            self.io
                .device
                .write_from(self.io.inbox_offset + from as u64, &inboxes, from..to)?;
        }
        drop(inboxes);
        let now = StdInstant::now();
        for (i, v) in sent {
            self.hosts[i].volumes[v].sent = Some(now);
        }
        ringer.ring(
            &std::mem::take(&mut *self.io.rings.borrow_mut()),
            self.rings_at_once,
        );
        Ok(())
    }

    /// Does the reads each host's engine asks for (its outbox area while
    /// it waits for a reply, the SPM header) and completes the extensions
    /// whose replies arrived. Returns how many completed.
    pub(super) fn poll(&mut self) -> Result<usize, BackendError> {
        let mut completed = 0;
        for h in &mut self.hosts {
            let now = self.clock.now();
            h.driver.engine_mut().handle_timeout(now);
            h.driver.read(now)?;
            let read_at = StdInstant::now();
            while let Some(event) = h.driver.engine_mut().poll_event() {
                match event {
                    HostEvent::Refresh { volume, size } => {
                        if let Some(v) = h.volumes.iter_mut().find(|v| v.id == volume) {
                            if let Some(sent) = v.sent.take() {
                                self.round_trips
                                    .push(read_at.duration_since(sent).as_secs_f64() * 1e3);
                            }
                            v.physical = v.physical.max(size);
                        }
                        h.driver.engine_mut().handle_refreshed(now, volume, size);
                    }
                    HostEvent::Extended { .. } => completed += 1,
                    HostEvent::Failed { volume, .. } | HostEvent::Rejected { volume, .. } => {
                        self.refused += 1;
                        if let Some(v) = h.volumes.iter_mut().find(|v| v.id == volume) {
                            v.sent = None;
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(completed)
    }

    /// Sends what was asked and polls until every request is answered;
    /// an error naming `what` once `deadline` passes first.
    pub(super) fn answer_all(
        &mut self,
        deadline: StdInstant,
        what: &str,
    ) -> Result<(), BackendError> {
        self.flush()?;
        while self.in_flight() > 0 {
            self.poll()?;
            self.flush()?;
            if StdInstant::now() > deadline {
                return Err(BackendError::new(format!(
                    "{what} did not complete in 120 s"
                )));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    pub(super) fn in_flight(&self) -> usize {
        self.hosts
            .iter()
            .map(|h| h.driver.engine().in_flight())
            .sum()
    }
}
