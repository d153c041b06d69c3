//! The SPM's side of the driver.

use crate::spm::{Spm, SpmCommit, SpmIo, SpmWrite};
use crate::time::Instant;
use crate::wire::{
    AREA_SIZE, DOORBELL_OFFSET, Epoch, Geometry, HostId, RECORD_LEN, SPM_HEADER_OFFSET, Uuid,
};

use core::ops::Range;

use super::{BlockDevice, Counted, DriverError, IoStats, StartError, carve};

/// Outbox areas with no request between two that have one are read along
/// with them when there are at most this many.
pub const OUTBOX_GAP: usize = 8;

/// Dirty outbox sectors at most this many bytes apart are written in one
/// run (the clean sectors between them written back as the mirror holds
/// them).
pub const MERGE_GAP: usize = 8 * AREA_SIZE;

/// Records outside the outbox areas (the SPM header) staged at once.
const OTHERS: usize = 4;

/// Outbox records staged at once without a mirror.
const STAGED: usize = 64;

/// Runs an [`Spm`] engine against a [`BlockDevice`].
///
/// One step of an SPM, in this order:
/// 1. [`SpmDriver::read`]: every read the engine asks for.
/// 2. jobs: `engine_mut().poll_job()`, run on the backend, results to
///    `engine_mut().handle_job_result(..)`;
/// 3. [`SpmDriver::poll_commit`]: when it returns a commit, make the
///    backend durable, then `engine_mut().handle_committed(..)`;
/// 4. [`SpmDriver::write`]: the replies and the SPM header.
///
/// With a mirror (`buffer_len(.., true)`: one 4 KiB copy per host, 8 MiB
/// at 2000 hosts) replies are written without reading first, and merged;
/// without one (firmware with little RAM) each record's sector is read,
/// patched and written.
#[derive(Debug)]
pub struct SpmDriver<D: BlockDevice, B, const QUEUE: usize> {
    io: Counted<D>,
    engine: Spm<QUEUE>,
    geometry: Geometry,
    sector: usize,
    /// Hosts read per chunk of a `ReadHosts`.
    chunk_hosts: usize,
    /// The caller's buffer, in parts: [`Parts`].
    pub(super) buf: B,
    pub(super) parts: Parts,
    /// Whether any bit of `dirty` is set.
    any_dirty: bool,
    /// Records outside the outbox areas waiting to be written.
    others: heapless::Vec<SpmWrite, OTHERS>,
    /// Outbox records waiting to be written (without a mirror).
    staged: heapless::Vec<SpmWrite, STAGED>,
    /// A record taken from the engine whose area could not be read into
    /// the mirror yet.
    held: Option<SpmWrite>,
    /// A read that failed: done again first.
    failed_read: Option<SpmIo>,
}

/// Where each part of the driver's buffer is.
#[derive(Clone, Debug)]
pub(super) struct Parts {
    /// One sector.
    one: Range<usize>,
    /// Inbox areas of the chunk being read.
    inbox: Range<usize>,
    /// Outbox areas of the chunk being read, as handed to the engine:
    /// zeros where the inbox had no request.
    pub(super) view: Range<usize>,
    /// Every outbox area as this SPM last read or wrote it (empty without
    /// a mirror).
    mirror: Range<usize>,
    /// Per outbox area, a bit: the mirror holds it.
    known: Range<usize>,
    /// Per outbox sector, a bit: the mirror's copy is newer than the disk.
    dirty: Range<usize>,
}

fn bit(bits: &[u8], i: usize) -> bool {
    bits.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

fn set_bit(bits: &mut [u8], i: usize, on: bool) {
    if let Some(b) = bits.get_mut(i / 8) {
        if on {
            *b |= 1 << (i % 8);
        } else {
            *b &= !(1 << (i % 8));
        }
    }
}

/// The newest epoch in any outbox area on `device` (a header or a reply,
/// valid or stale; see [`crate::wire::OutboxArea::newest_epoch`]), `None`
/// if none names
/// one. A new SPM takes an epoch above it and above the SPM header's
/// ([`crate::spm::start_header`]): a predecessor's header write may have
/// been lost after it replied, and hosts ignore replies from an epoch
/// older than one they have seen.
///
/// Reads the outbox in runs of as many whole areas as `buffer` holds
/// (at least one, [`AREA_SIZE`] bytes; its start aligned as the device
/// needs).
pub fn newest_outbox_epoch<D: BlockDevice>(
    device: &mut D,
    geometry: &Geometry,
    domain: Uuid,
    buffer: &mut [u8],
) -> Result<Option<Epoch>, StartError<D::Error>> {
    let per_read = buffer.len() / AREA_SIZE;
    if per_read == 0 {
        return Err(StartError::Driver(DriverError::BufferTooSmall {
            needed: AREA_SIZE,
        }));
    }
    if device.sector_size() != geometry.sector_size() {
        return Err(StartError::Driver(DriverError::SectorSize {
            device: device.sector_size(),
            mailbox: geometry.sector_size(),
        }));
    }
    let mut newest = None;
    let mut hosts = geometry.hosts();
    loop {
        let Some(first) = hosts.next() else {
            return Ok(newest);
        };
        let n = 1 + hosts.by_ref().take(per_read - 1).count();
        let Some(at) = geometry.outbox_area(first) else {
            return Ok(newest);
        };
        let run = &mut buffer[..n * AREA_SIZE];
        device.read_at(at, run).map_err(StartError::Io)?;
        let run = &buffer[..n * AREA_SIZE];
        for area in crate::wire::areas::<crate::wire::Reply>(run, domain, first) {
            newest = newest.max(area.newest_epoch());
        }
    }
}

impl<D: BlockDevice, B: AsRef<[u8]> + AsMut<[u8]>, const QUEUE: usize> SpmDriver<D, B, QUEUE> {
    /// The buffer a driver for `geometry` needs, reading `chunk_hosts`
    /// hosts per read (at least 1; a full scan of `max_hosts` in one read
    /// is fastest on a host), with or without a mirror of the outbox areas.
    pub fn buffer_len(geometry: &Geometry, chunk_hosts: u16, mirror: bool) -> usize {
        let hosts = usize::from(geometry.max_hosts());
        let chunk = usize::from(chunk_hosts.clamp(1, geometry.max_hosts().max(1)));
        let sector = geometry.sector_size() as usize;
        let mut len = sector + 2 * chunk * AREA_SIZE;
        if mirror {
            let sectors = hosts * AREA_SIZE / sector;
            len += hosts * AREA_SIZE + hosts.div_ceil(8) + sectors.div_ceil(8);
        }
        len
    }

    /// A driver for `engine` on `device`, in `buffer` (at least
    /// [`SpmDriver::buffer_len`] bytes; its start aligned as the device
    /// needs: a `&mut [u8]`, a `Vec<u8>`, an aligned allocation).
    /// `mirror` must match what `buffer_len` was asked with.
    pub fn new(
        device: D,
        engine: Spm<QUEUE>,
        mut buffer: B,
        chunk_hosts: u16,
        mirror: bool,
    ) -> Result<Self, DriverError> {
        let geometry = *engine.geometry();
        let sector = geometry.sector_size() as usize;
        if device.sector_size() != geometry.sector_size() {
            return Err(DriverError::SectorSize {
                device: device.sector_size(),
                mailbox: geometry.sector_size(),
            });
        }
        let needed = Self::buffer_len(&geometry, chunk_hosts, mirror);
        if buffer.as_ref().len() < needed {
            return Err(DriverError::BufferTooSmall { needed });
        }
        let hosts = usize::from(geometry.max_hosts());
        let chunk = usize::from(chunk_hosts.clamp(1, geometry.max_hosts().max(1)));
        let mut at = 0;
        let one = carve(&mut at, sector);
        let inbox = carve(&mut at, chunk * AREA_SIZE);
        let view = carve(&mut at, chunk * AREA_SIZE);
        let (mirror, known, dirty) = if mirror {
            (
                carve(&mut at, hosts * AREA_SIZE),
                carve(&mut at, hosts.div_ceil(8)),
                carve(&mut at, (hosts * AREA_SIZE / sector).div_ceil(8)),
            )
        } else {
            (at..at, at..at, at..at)
        };
        let b = buffer.as_mut();
        b[known.clone()].fill(0);
        b[dirty.clone()].fill(0);
        Ok(SpmDriver {
            io: Counted {
                device,
                stats: IoStats::default(),
            },
            engine,
            geometry,
            sector,
            chunk_hosts: chunk,
            buf: buffer,
            parts: Parts {
                one,
                inbox,
                view,
                mirror,
                known,
                dirty,
            },
            any_dirty: false,
            others: heapless::Vec::new(),
            staged: heapless::Vec::new(),
            held: None,
            failed_read: None,
        })
    }

    /// The engine.
    pub fn engine(&self) -> &Spm<QUEUE> {
        &self.engine
    }

    /// The engine, for jobs, commits and events.
    pub fn engine_mut(&mut self) -> &mut Spm<QUEUE> {
        &mut self.engine
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.io.device
    }

    /// The device, for its owner's own needs.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.io.device
    }

    /// Calls and bytes so far.
    pub fn stats(&self) -> IoStats {
        self.io.stats
    }

    /// Whether records taken from the engine wait to be written.
    pub fn writes_pending(&self) -> bool {
        self.any_dirty || !self.others.is_empty() || !self.staged.is_empty() || self.held.is_some()
    }

    /// Does the reads the engine asks for at `now` and hands it what was
    /// read: all of them, except that it returns after a step of a full
    /// scan (a read of more than one host), so that the caller runs jobs
    /// and writes replies between steps and reads again at once (the
    /// engine's `poll_timeout` says now). On an error the read is done
    /// again first at the next call.
    pub fn read(&mut self, now: Instant) -> Result<(), D::Error> {
        while let Some(io) = self.failed_read.take().or_else(|| self.engine.poll_io(now)) {
            if let Err(e) = self.read_one(now, io) {
                self.failed_read = Some(io);
                return Err(e);
            }
            if matches!(io, SpmIo::ReadHosts { count, .. } if count > 1) {
                break;
            }
        }
        Ok(())
    }

    pub(super) fn read_one(&mut self, now: Instant, io: SpmIo) -> Result<(), D::Error> {
        match io {
            SpmIo::ReadDoorbell => {
                let within = self.read_sector_of(DOORBELL_OFFSET)?;
                let one = &self.buf.as_ref()[self.parts.one.clone()];
                self.engine
                    .handle_doorbell(now, &one[within..within + RECORD_LEN]);
            }
            SpmIo::ReadSpmHeader => {
                let within = self.read_sector_of(SPM_HEADER_OFFSET)?;
                let one = &self.buf.as_ref()[self.parts.one.clone()];
                self.engine
                    .handle_spm_header(now, &one[within..within + RECORD_LEN]);
            }
            SpmIo::ReadHosts { first_host, count } => {
                let last = u32::from(first_host.get()) + u32::from(count);
                let end = last.min(u32::from(self.geometry.max_hosts()) + 1);
                let mut host = u32::from(first_host.get().max(1));
                while host < end {
                    let n = (end - host).min(self.chunk_hosts as u32);
                    // Both fit a u16: `end` is at most max_hosts + 1.
                    self.read_chunk(now, HostId::new(host as u16), n as usize)?;
                    host += n;
                }
            }
        }
        Ok(())
    }

    /// Reads the sector holding the record at `offset` into the sector
    /// buffer; returns where in it the record starts.
    fn read_sector_of(&mut self, offset: u64) -> Result<usize, D::Error> {
        let start = offset - offset % self.sector as u64;
        let one = &mut self.buf.as_mut()[self.parts.one.clone()];
        self.io.read(start, one)?;
        Ok((offset - start) as usize)
    }

    /// Reads hosts `first ..` `+ n` and hands them to the engine.
    pub(super) fn read_chunk(
        &mut self,
        now: Instant,
        first: HostId,
        n: usize,
    ) -> Result<(), D::Error> {
        let (Some(ib), Some(ob)) = (
            self.geometry.inbox_area(first),
            self.geometry.outbox_area(first),
        ) else {
            return Ok(());
        };
        let len = n * AREA_SIZE;
        let p = &self.parts;
        let buf = self.buf.as_mut();
        self.io
            .read(ib, &mut buf[p.inbox.start..p.inbox.start + len])?;
        let busy = |buf: &[u8], i: usize| {
            buf[p.inbox.start + i * AREA_SIZE + RECORD_LEN..p.inbox.start + (i + 1) * AREA_SIZE]
                .iter()
                .any(|&b| b != 0)
        };
        let base = usize::from(first.get()) - 1;
        let mirrored = !p.mirror.is_empty();
        let per = AREA_SIZE / self.sector;
        let mut i = 0;
        while i < n {
            if !busy(buf, i) {
                i += 1;
                continue;
            }
            // A run from i to the last busy area with gaps of at most
            // OUTBOX_GAP.
            let mut end = i + 1;
            let mut j = i + 1;
            while j < n && j - end <= OUTBOX_GAP {
                if busy(buf, j) {
                    end = j + 1;
                }
                j += 1;
            }
            let at = ob + (i * AREA_SIZE) as u64;
            let view = p.view.start + i * AREA_SIZE..p.view.start + end * AREA_SIZE;
            self.io.read(at, &mut buf[view.clone()])?;
            if mirrored {
                // What was read replaces the mirror's copy, except sectors
                // staged and not yet written: those are newer.
                for s in (base + i) * per..(base + end) * per {
                    if bit(&buf[p.dirty.clone()], s) {
                        continue;
                    }
                    let from = view.start + (s - (base + i) * per) * self.sector;
                    let to = p.mirror.start + s * self.sector;
                    buf.copy_within(from..from + self.sector, to);
                }
                for k in base + i..base + end {
                    set_bit(&mut buf[p.known.clone()], k, true);
                }
            }
            i = end;
        }
        for k in 0..n {
            let view = p.view.start + k * AREA_SIZE;
            if !busy(buf, k) {
                buf[view..view + AREA_SIZE].fill(0);
            } else if mirrored {
                let at = p.mirror.start + (base + k) * AREA_SIZE;
                buf.copy_within(at..at + AREA_SIZE, view);
            }
        }
        let buf = self.buf.as_ref();
        self.engine.handle_hosts(
            now,
            first,
            &buf[p.inbox.start..p.inbox.start + len],
            &buf[p.view.start..p.view.start + len],
        );
        Ok(())
    }

    /// The commit to make now, if one is due: asks the engine, and does the
    /// fencing read of the SPM header it needs first. Make the backend's
    /// state durable, then call `engine_mut().handle_committed(..)` (or
    /// `handle_commit_failed`).
    pub fn poll_commit(&mut self, now: Instant) -> Result<Option<SpmCommit>, D::Error> {
        if let Some(c) = self.engine.poll_commit() {
            return Ok(Some(c));
        }
        if !self.engine.commit_pending() {
            return Ok(None);
        }
        self.read(now)?;
        Ok(self.engine.poll_commit())
    }

    /// Writes what the engine has to write: the SPM header, then replies,
    /// each sector whole. On an error what was not written stays staged and
    /// goes first at the next call.
    pub fn write(&mut self) -> Result<(), D::Error> {
        if let Some(w) = self.held.take() {
            self.stage(w)?;
        }
        while self.room() {
            let Some(w) = self.engine.poll_write() else {
                break;
            };
            self.stage(w)?;
        }
        self.flush_staged()
    }

    /// Empties, in every outbox area of `domain`, each reply (valid or
    /// stale) that says `volume` was extended to more than `keep` bytes:
    /// for a volume about to be deleted (`keep` 0) or reduced to `keep`, so
    /// that no reply promises what the pool will no longer keep (the
    /// rollback check of a starting SPM reads such a promise as a pool
    /// rolled back). The empty records are staged like replies; call
    /// [`SpmDriver::write`] and make it durable before the pool's change is
    /// committed. Returns how many were emptied. Reads every outbox area
    /// this SPM does not mirror.
    pub fn retract_replies(
        &mut self,
        domain: Uuid,
        volume: Uuid,
        keep: u64,
    ) -> Result<usize, D::Error> {
        let region = self.outbox_region();
        let mut emptied = 0;
        for h in 1..=self.geometry.max_hosts() {
            let area = usize::from(h) - 1;
            let offset = region.start + (area * AREA_SIZE) as u64;
            let p = self.parts.clone();
            let mirrored = !p.mirror.is_empty();
            let buf = self.buf.as_mut();
            let at = if mirrored {
                let from = p.mirror.start + area * AREA_SIZE;
                if !bit(&buf[p.known.clone()], area) {
                    self.io.read(offset, &mut buf[from..from + AREA_SIZE])?;
                    set_bit(&mut buf[p.known.clone()], area, true);
                }
                from
            } else {
                let from = p.view.start;
                self.io.read(offset, &mut buf[from..from + AREA_SIZE])?;
                from
            };
            let mut slots: heapless::Vec<u64, { crate::wire::SLOTS_PER_AREA as usize }> =
                heapless::Vec::new();
            if let Some(outbox) = crate::wire::OutboxArea::new(
                &self.buf.as_ref()[at..at + AREA_SIZE],
                domain,
                HostId::new(h),
            ) {
                for (slot, state) in outbox.slots() {
                    let reply = match state {
                        crate::wire::SlotState::Valid(r) | crate::wire::SlotState::Stale(r) => r,
                        _ => continue,
                    };
                    if reply.volume == volume
                        && reply.status == crate::wire::ReplyStatus::Extended
                        && reply.size > keep
                    {
                        let _ = slots.push(offset + u64::from(slot.get()) * RECORD_LEN as u64);
                    }
                }
            }
            for record_at in slots {
                if !mirrored && self.staged.is_full() {
                    self.flush_staged()?;
                }
                self.stage(SpmWrite {
                    offset: record_at,
                    record: [0; RECORD_LEN],
                })?;
                emptied += 1;
            }
        }
        Ok(emptied)
    }

    /// For a graceful stop at `now`: writes what is staged and what the
    /// engine still has, then the SPM header that vacates the mailbox, and
    /// flushes the device. A fenced SPM (it stalled) reads the SPM header
    /// first. Returns `false`, writing nothing more, when the engine was
    /// deposed (another SPM's header must stay).
    pub fn stop(&mut self, now: Instant) -> Result<bool, D::Error> {
        if self.engine.is_fenced() && !self.engine.is_deposed() {
            self.read_one(now, SpmIo::ReadSpmHeader)?;
        }
        self.write()?;
        if self.engine.is_deposed() {
            return Ok(false);
        }
        let Some(w) = self.engine.vacate() else {
            return Ok(false);
        };
        self.stage(w)?;
        self.flush_staged()?;
        self.io.device.flush()?;
        Ok(true)
    }

    fn room(&self) -> bool {
        self.held.is_none() && !self.others.is_full() && !self.staged.is_full()
    }

    fn outbox_region(&self) -> core::ops::Range<u64> {
        let at = self.geometry.outbox_offset();
        at..at + (usize::from(self.geometry.max_hosts()) * AREA_SIZE) as u64
    }

    /// Takes a record in: into the mirror (reading its area first if the
    /// mirror does not hold it), or into a staging list.
    pub(super) fn stage(&mut self, w: SpmWrite) -> Result<(), D::Error> {
        let region = self.outbox_region();
        if !region.contains(&w.offset) {
            match self.others.iter_mut().find(|o| o.offset == w.offset) {
                Some(o) => *o = w,
                None => {
                    if self.others.push(w).is_err() {
                        self.held = Some(w);
                    }
                }
            }
            return Ok(());
        }
        let p = &self.parts;
        if p.mirror.is_empty() {
            match self.staged.iter_mut().find(|o| o.offset == w.offset) {
                Some(o) => *o = w,
                None => {
                    if self.staged.push(w).is_err() {
                        self.held = Some(w);
                    }
                }
            }
            return Ok(());
        }
        let buf = self.buf.as_mut();
        let at = (w.offset - region.start) as usize;
        let area = at / AREA_SIZE;
        if !bit(&buf[p.known.clone()], area) {
            let from = p.mirror.start + area * AREA_SIZE;
            let read = self.io.read(
                region.start + (area * AREA_SIZE) as u64,
                &mut buf[from..from + AREA_SIZE],
            );
            if let Err(e) = read {
                self.held = Some(w);
                return Err(e);
            }
            set_bit(&mut buf[p.known.clone()], area, true);
        }
        let m = p.mirror.start + at;
        buf[m..m + RECORD_LEN].copy_from_slice(&w.record);
        set_bit(&mut buf[p.dirty.clone()], at / self.sector, true);
        self.any_dirty = true;
        Ok(())
    }

    /// Writes what is staged: records outside the outbox areas first (read-
    /// modify-write of their sector), then the outbox.
    pub(super) fn flush_staged(&mut self) -> Result<(), D::Error> {
        while let Some(&w) = self.others.first() {
            self.patch_sector(w)?;
            self.others.remove(0);
        }
        while let Some(&w) = self.staged.first() {
            self.patch_sector(w)?;
            self.staged.remove(0);
        }
        if self.any_dirty {
            self.write_dirty()?;
        }
        Ok(())
    }

    /// Reads the sector of `w`, puts `w` in it and writes it back.
    fn patch_sector(&mut self, w: SpmWrite) -> Result<(), D::Error> {
        let start = w.offset - w.offset % self.sector as u64;
        let one = &mut self.buf.as_mut()[self.parts.one.clone()];
        self.io.read(start, one)?;
        let within = (w.offset - start) as usize;
        one[within..within + RECORD_LEN].copy_from_slice(&w.record);
        self.io.write(start, one)
    }

    /// Writes the mirror's dirty sectors: runs of sectors less than
    /// [`MERGE_GAP`] apart go in one write, through known areas only.
    fn write_dirty(&mut self) -> Result<(), D::Error> {
        let sector = self.sector;
        let p = &self.parts;
        let buf = self.buf.as_mut();
        let total = p.mirror.len() / sector;
        let merge = MERGE_GAP / sector;
        let base = self.geometry.outbox_offset();
        let mut k = 0;
        while k < total {
            if !bit(&buf[p.dirty.clone()], k) {
                k += 1;
                continue;
            }
            let first = k;
            let mut last = k;
            let mut j = k + 1;
            while j < total && j - last <= merge {
                if bit(&buf[p.dirty.clone()], j) {
                    let known = (last * sector / AREA_SIZE..=j * sector / AREA_SIZE)
                        .all(|a| bit(&buf[p.known.clone()], a));
                    if !known {
                        break;
                    }
                    last = j;
                }
                j += 1;
            }
            let (from, to) = (first * sector, (last + 1) * sector);
            let m = p.mirror.start;
            self.io.write(base + from as u64, &buf[m + from..m + to])?;
            for s in first..=last {
                set_bit(&mut buf[p.dirty.clone()], s, false);
            }
            k = last + 1;
        }
        self.any_dirty = false;
        Ok(())
    }
}
