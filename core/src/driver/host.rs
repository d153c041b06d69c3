//! The host's side of the driver.

use crate::host::{Host, HostError, HostRead};
use crate::time::Instant;
use crate::wire::{AREA_SIZE, DOORBELL_OFFSET, RECORD_LEN, SPM_HEADER_OFFSET};

use super::{BlockDevice, Counted, DriverError, IoStats};

/// The inbox area's mirror in the buffer.
const MIRROR: core::ops::Range<usize> = 0..AREA_SIZE;
/// The outbox area as read.
const READ: core::ops::Range<usize> = AREA_SIZE..2 * AREA_SIZE;
/// Where the sector buffer starts.
const ONE: usize = 2 * AREA_SIZE;

/// Runs a [`Host`] engine against a [`BlockDevice`].
///
/// The host is the only writer of its inbox area, so the driver keeps the
/// area (the *mirror*) and writes it whole on every change: one write per
/// step however many records changed, and a write lost or damaged by
/// anything else is repaired by the next. The doorbell is written after
/// the area it announces is on disk, never before: an SPM that reads the
/// ring finds the request.
///
/// A step ([`HostDriver::step`]): the engine's timers, its writes, then
/// its reads. Events (refresh a volume, a request failed, ...) are then
/// taken with `engine_mut().poll_event()`.
#[derive(Debug)]
pub struct HostDriver<D: BlockDevice, B, const VOLUMES: usize> {
    io: Counted<D>,
    engine: Host<VOLUMES>,
    sector: usize,
    inbox_offset: u64,
    /// The caller's buffer: the inbox area as this host last wrote it (or
    /// read it at start), then an outbox area as read, then one sector.
    buf: B,
    /// The mirror holds records not yet written.
    area_dirty: bool,
    /// The newest doorbell ring not yet written.
    bell: Option<[u8; RECORD_LEN]>,
    /// A read that failed: done again first.
    failed_read: Option<HostRead>,
}

impl<D: BlockDevice, B: AsRef<[u8]> + AsMut<[u8]>, const VOLUMES: usize> HostDriver<D, B, VOLUMES> {
    /// The buffer a host driver needs: the inbox area's mirror, an outbox
    /// area, and one sector (at most 4 KiB).
    pub const BUFFER_LEN: usize = 3 * AREA_SIZE;

    /// A driver for `engine` (volumes added, not started) on `device`, in
    /// `buffer` (at least [`HostDriver::BUFFER_LEN`] bytes, its start
    /// aligned as the device needs).
    pub fn new(device: D, engine: Host<VOLUMES>, buffer: B) -> Result<Self, DriverError> {
        let geometry = *engine.geometry();
        if device.sector_size() != geometry.sector_size() {
            return Err(DriverError::SectorSize {
                device: device.sector_size(),
                mailbox: geometry.sector_size(),
            });
        }
        if buffer.as_ref().len() < Self::BUFFER_LEN {
            return Err(DriverError::BufferTooSmall {
                needed: Self::BUFFER_LEN,
            });
        }
        let sector = geometry.sector_size() as usize;
        let inbox_offset = geometry.inbox_area(engine.host_id()).unwrap_or(0);
        Ok(HostDriver {
            io: Counted {
                device,
                stats: IoStats::default(),
            },
            engine,
            sector,
            inbox_offset,
            buf: buffer,
            area_dirty: false,
            bell: None,
            failed_read: None,
        })
    }

    /// Reads the host's inbox and outbox areas and the SPM header and
    /// starts the engine from them ([`Host::start`]) as `owner`; the inbox
    /// area as read becomes the mirror. The outer `Err` is the device's;
    /// the inner one the engine's refusal.
    pub fn start(&mut self, now: Instant, owner: u64) -> Result<Result<(), HostError>, D::Error> {
        let geometry = *self.engine.geometry();
        let Some(outbox) = geometry.outbox_area(self.engine.host_id()) else {
            return Ok(Err(HostError::HostId));
        };
        let buf = self.buf.as_mut();
        self.io.read(self.inbox_offset, &mut buf[MIRROR])?;
        self.io.read(outbox, &mut buf[READ])?;
        if let Err(e) = self.engine.start(now, &buf[MIRROR], &buf[READ], owner) {
            return Ok(Err(e));
        }
        self.read_spm_header(now)?;
        Ok(Ok(()))
    }

    /// The engine.
    pub fn engine(&self) -> &Host<VOLUMES> {
        &self.engine
    }

    /// The engine, for allocations, refreshes and events.
    pub fn engine_mut(&mut self) -> &mut Host<VOLUMES> {
        &mut self.engine
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.io.device
    }

    /// Calls and bytes so far.
    pub fn stats(&self) -> IoStats {
        self.io.stats
    }

    /// Whether the inbox area or a ring waits to be written.
    pub fn writes_pending(&self) -> bool {
        self.area_dirty || self.bell.is_some()
    }

    /// One step at `now`: the engine's timers if due, its writes, its
    /// reads. On an error what was not done stays due and goes first at the
    /// next step.
    pub fn step(&mut self, now: Instant) -> Result<(), D::Error> {
        if self.engine.poll_timeout().is_some_and(|t| t <= now) {
            self.engine.handle_timeout(now);
        }
        self.write()?;
        self.read(now)
    }

    /// The engine's writes: records into the mirror, the area written
    /// whole, then the newest ring.
    pub fn write(&mut self) -> Result<(), D::Error> {
        self.take_writes();
        let buf = self.buf.as_mut();
        if self.area_dirty {
            self.io.write(self.inbox_offset, &buf[MIRROR])?;
            self.area_dirty = false;
        }
        if let Some(record) = self.bell {
            // The doorbell's sector holds one ring; the rest stays zero.
            let one = &mut buf[ONE..ONE + self.sector];
            one.fill(0);
            one[..RECORD_LEN].copy_from_slice(&record);
            self.io.write(DOORBELL_OFFSET, one)?;
            self.bell = None;
        }
        Ok(())
    }

    fn take_writes(&mut self) {
        while let Some(w) = self.engine.poll_write() {
            if w.offset == DOORBELL_OFFSET {
                self.bell = Some(w.record);
            } else if let Some(at) = w.offset.checked_sub(self.inbox_offset)
                && (at as usize) + RECORD_LEN <= AREA_SIZE
            {
                let at = at as usize;
                self.buf.as_mut()[at..at + RECORD_LEN].copy_from_slice(&w.record);
                self.area_dirty = true;
            } else {
                debug_assert!(false, "a host writes only its inbox area and the doorbell");
            }
        }
    }

    /// The reads the engine asks for at `now`.
    pub fn read(&mut self, now: Instant) -> Result<(), D::Error> {
        while let Some(r) = self
            .failed_read
            .take()
            .or_else(|| self.engine.poll_read(now))
        {
            let done = match r {
                HostRead::OutboxArea { offset } => {
                    let buf = self.buf.as_mut();
                    self.io.read(offset, &mut buf[READ]).map(|()| {
                        self.engine.handle_outbox(now, &buf[READ]);
                    })
                }
                HostRead::InboxHeader { offset } => self.read_sector_of(offset).map(|at| {
                    let record = &self.buf.as_ref()[at..at + RECORD_LEN];
                    self.engine.handle_inbox_header(now, record);
                }),
                HostRead::SpmHeader => self.read_spm_header(now),
            };
            if let Err(e) = done {
                self.failed_read = Some(r);
                return Err(e);
            }
        }
        Ok(())
    }

    fn read_spm_header(&mut self, now: Instant) -> Result<(), D::Error> {
        let at = self.read_sector_of(SPM_HEADER_OFFSET)?;
        let record = &self.buf.as_ref()[at..at + RECORD_LEN];
        self.engine.handle_spm_header(now, record);
        Ok(())
    }

    /// Reads the sector holding the record at `offset` into the sector
    /// buffer; returns where in the buffer the record starts.
    fn read_sector_of(&mut self, offset: u64) -> Result<usize, D::Error> {
        let start = offset - offset % self.sector as u64;
        let one = &mut self.buf.as_mut()[ONE..ONE + self.sector];
        self.io.read(start, one)?;
        Ok(ONE + (offset - start) as usize)
    }

    /// For a clean stop, once no guest writes any more: the writes still
    /// due, then the inbox header that releases the host id
    /// ([`Host::release`]) with the hold records emptied (a stopped host
    /// holds no volume open), in one write of the area, flushed. Nothing
    /// is written once evicted.
    pub fn release(&mut self) -> Result<(), D::Error> {
        self.take_writes();
        let first_hold = (usize::from(self.engine.request_slots()) + 1) * RECORD_LEN;
        let buf = self.buf.as_mut();
        if let Some(w) = self.engine.release() {
            buf[..RECORD_LEN].copy_from_slice(&w.record);
            if let Some(holds) = buf.get_mut(first_hold..MIRROR.end) {
                holds.fill(0);
            }
            self.area_dirty = true;
        }
        if self.area_dirty {
            self.io.write(self.inbox_offset, &buf[MIRROR])?;
            self.area_dirty = false;
        }
        self.io.device.flush()
    }
}
