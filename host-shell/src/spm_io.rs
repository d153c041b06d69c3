//! The SPM daemon's reads and writes of the mailbox.
//!
//! The SPM is the only writer of the outbox areas, so what it last read or
//! wrote of an area is what the area holds. [`SpmDisk`] keeps that copy
//! (the *mirror*) for every area it has seen, and so:
//! - writes a reply without first reading the sector that holds it;
//! - writes the replies of a batch as few runs of whole sectors: dirty
//!   sectors less than [`MERGE_GAP`] bytes apart go in one write, the clean
//!   sectors between them written back as they are (only through areas
//!   whose content it knows);
//! - reads into buffers kept for the daemon's life (a full scan of 2000
//!   hosts reads 8 MiB of inboxes, and allocating that per scan costs page
//!   faults).
//!
//! A full scan reads a host's outbox area only when its inbox has a slot in
//! use: an area with no request needs no reply looked at, and an idle full
//! scan then reads the inboxes alone. Nearby outbox reads are merged.

use spmbox_core::spm::SpmWrite;
use spmbox_core::wire::{AREA_SIZE, RECORD_LEN};

use crate::device::{AlignedBuf, DeviceError};
use crate::mailbox::Mailbox;

/// Outbox areas with no request between two that have one are read along
/// with them when there are at most this many.
pub const OUTBOX_GAP: usize = 8;

/// Dirty outbox sectors at most this many bytes apart are written in one
/// run.
pub const MERGE_GAP: usize = 8 * AREA_SIZE;

/// The mailbox as the SPM daemon reads and writes it.
pub struct SpmDisk<'a> {
    mailbox: &'a Mailbox,
    sector: usize,
    outbox_offset: u64,
    /// Inbox areas of the last host read.
    inbox: AlignedBuf,
    /// The outbox areas of the last host read as handed to the engine:
    /// zeros where the inbox had no request.
    outbox_view: Vec<u8>,
    /// Every outbox area as this SPM last read or wrote it.
    mirror: AlignedBuf,
    /// Per outbox area: whether `mirror` holds it.
    known: Vec<bool>,
    /// One sector, for records outside the outbox areas.
    one: AlignedBuf,
    /// Syscalls and bytes, for the metrics and the benchmark.
    pub stats: DiskStats,
}

/// What [`SpmDisk`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct DiskStats {
    /// Read calls.
    pub reads: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Write calls.
    pub writes: u64,
    /// Bytes written.
    pub written_bytes: u64,
}

impl<'a> SpmDisk<'a> {
    /// Buffers for `mailbox`'s geometry (about twice the outbox region's
    /// size, plus the inbox region's).
    pub fn new(mailbox: &'a Mailbox) -> SpmDisk<'a> {
        let geometry = mailbox.geometry();
        let hosts = usize::from(geometry.max_hosts());
        let align = mailbox.device().dio_mem_align();
        let sector = geometry.sector_size() as usize;
        SpmDisk {
            mailbox,
            sector,
            outbox_offset: geometry.outbox_offset(),
            inbox: AlignedBuf::zeroed(hosts * AREA_SIZE, align),
            outbox_view: vec![0; hosts * AREA_SIZE],
            mirror: AlignedBuf::zeroed(hosts * AREA_SIZE, align),
            known: vec![false; hosts],
            one: AlignedBuf::zeroed(sector, align.max(sector)),
            stats: DiskStats::default(),
        }
    }

    fn read(
        &mut self,
        offset: u64,
        into: Target,
        range: std::ops::Range<usize>,
    ) -> Result<(), DeviceError> {
        self.stats.reads += 1;
        self.stats.read_bytes += range.len() as u64;
        let buf = match into {
            Target::Inbox => &mut self.inbox,
            Target::Mirror => &mut self.mirror,
            Target::One => &mut self.one,
        };
        self.mailbox.device().read_into(offset, buf, range)
    }

    /// The record at `offset` (a domain-wide block), read as its sector.
    pub fn read_record(&mut self, offset: u64) -> Result<&[u8], DeviceError> {
        let start = offset - offset % self.sector as u64;
        self.read(start, Target::One, 0..self.sector)?;
        let within = (offset - start) as usize;
        Ok(&self.one[within..within + RECORD_LEN])
    }

    /// The inbox and outbox areas of hosts `first_host ..` `+ count`, for
    /// [`spmbox_core::spm::Spm::handle_hosts`]. Outbox areas whose inbox
    /// has no slot in use are not read and are given as zeros.
    pub fn read_hosts(
        &mut self,
        first_host: u16,
        count: u16,
    ) -> Result<(&[u8], &[u8]), DeviceError> {
        let geometry = self.mailbox.geometry();
        let Some(ib) = geometry.inbox_area(first_host) else {
            return Ok((&[], &[]));
        };
        let first = usize::from(first_host) - 1;
        let count = usize::from(count).min(self.known.len() - first);
        let len = count * AREA_SIZE;
        self.read(ib, Target::Inbox, 0..len)?;
        let busy: Vec<bool> = (0..count)
            .map(|i| {
                self.inbox[i * AREA_SIZE + RECORD_LEN..(i + 1) * AREA_SIZE]
                    .iter()
                    .any(|&b| b != 0)
            })
            .collect();
        let mut i = 0;
        while i < count {
            if !busy[i] {
                i += 1;
                continue;
            }
            // A run from i to the last busy area with gaps of at most
            // OUTBOX_GAP.
            let mut end = i + 1;
            let mut j = i + 1;
            while j < count && j - end <= OUTBOX_GAP {
                if busy[j] {
                    end = j + 1;
                }
                j += 1;
            }
            let at = (first + i) * AREA_SIZE;
            let to = (first + end) * AREA_SIZE;
            self.read(self.outbox_offset + at as u64, Target::Mirror, at..to)?;
            self.known[first + i..first + end].fill(true);
            i = end;
        }
        for (k, &b) in busy.iter().enumerate() {
            let view = &mut self.outbox_view[k * AREA_SIZE..(k + 1) * AREA_SIZE];
            if b {
                let at = (first + k) * AREA_SIZE;
                view.copy_from_slice(&self.mirror[at..at + AREA_SIZE]);
            } else {
                view.fill(0);
            }
        }
        Ok((&self.inbox[..len], &self.outbox_view[..len]))
    }

    /// Writes `records` (whole 128-byte records at absolute offsets) as
    /// whole sectors. Records in the outbox areas go through the mirror in
    /// merged runs; others are written read-modify-write, each sector once,
    /// in the order they came.
    ///
    /// A write that fails may have written some of the sectors; writing
    /// the same records again (with any newer ones after them) puts all
    /// of them on disk: every sector is written whole from what this SPM
    /// holds.
    pub fn write(&mut self, records: &[SpmWrite]) -> Result<(), DeviceError> {
        let sector = self.sector;
        let region = self.outbox_offset..self.outbox_offset + self.mirror.len() as u64;
        let mut dirty: Vec<usize> = Vec::new();
        let mut others: Vec<(u64, AlignedBuf)> = Vec::new();
        for w in records {
            if region.contains(&w.offset) {
                let at = (w.offset - self.outbox_offset) as usize;
                let area = at / AREA_SIZE;
                if !self.known[area] {
                    let from = area * AREA_SIZE;
                    self.read(
                        self.outbox_offset + from as u64,
                        Target::Mirror,
                        from..from + AREA_SIZE,
                    )?;
                    self.known[area] = true;
                }
                self.mirror[at..at + RECORD_LEN].copy_from_slice(&w.record);
                dirty.push(at / sector);
                continue;
            }
            let start = w.offset - w.offset % sector as u64;
            let i = match others.iter().position(|(s, _)| *s == start) {
                Some(i) => i,
                None => {
                    self.read(start, Target::One, 0..sector)?;
                    let mut copy = AlignedBuf::zeroed(sector, self.one.align());
                    copy.copy_from_slice(&self.one);
                    others.push((start, copy));
                    others.len() - 1
                }
            };
            let within = (w.offset - start) as usize;
            others[i].1[within..within + RECORD_LEN].copy_from_slice(&w.record);
        }
        for (start, buf) in &others {
            self.stats.writes += 1;
            self.stats.written_bytes += buf.len() as u64;
            self.mailbox.device().write_at(*start, buf)?;
        }
        dirty.sort_unstable();
        dirty.dedup();
        let merge = MERGE_GAP / sector;
        let mut k = 0;
        while k < dirty.len() {
            let first = dirty[k];
            let mut last = first;
            k += 1;
            while k < dirty.len()
                && dirty[k] - last <= merge
                && self.known_between(last * sector, dirty[k] * sector)
            {
                last = dirty[k];
                k += 1;
            }
            let (from, to) = (first * sector, (last + 1) * sector);
            self.stats.writes += 1;
            self.stats.written_bytes += (to - from) as u64;
            self.mailbox.device().write_from(
                self.outbox_offset + from as u64,
                &self.mirror,
                from..to,
            )?;
        }
        Ok(())
    }

    /// Whether every area from byte `from` to byte `to` of the outbox
    /// region is in the mirror.
    fn known_between(&self, from: usize, to: usize) -> bool {
        self.known[from / AREA_SIZE..=to / AREA_SIZE]
            .iter()
            .all(|&k| k)
    }
}

/// Which buffer a read goes to.
#[derive(Clone, Copy)]
enum Target {
    Inbox,
    Mirror,
    One,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Access;
    use crate::mailbox::{self, FormatOptions};
    use spmbox_core::wire::SPM_HEADER_OFFSET;

    fn mailbox(hosts: u16) -> (tempfile::TempDir, Mailbox) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mbox");
        mailbox::format(
            &path,
            &FormatOptions {
                hosts,
                sector_size: Some(512),
                domain: None,
                force: false,
            },
        )
        .unwrap();
        let m = Mailbox::open(&path, Access::ReadWrite).unwrap();
        (dir, m)
    }

    fn poke(m: &Mailbox, offset: u64, byte: u8) {
        let start = offset - offset % 512;
        let mut buf = AlignedBuf::zeroed(512, m.device().dio_mem_align());
        m.device().read_at(start, &mut buf).unwrap();
        buf[(offset - start) as usize] = byte;
        m.device().write_at(start, &buf).unwrap();
    }

    fn peek(m: &Mailbox, offset: u64, len: usize) -> Vec<u8> {
        let start = offset - offset % 512;
        let span = (offset - start) as usize + len;
        let buf = m.read(start, span.next_multiple_of(512)).unwrap();
        buf[(offset - start) as usize..][..len].to_vec()
    }

    fn write(offset: u64, byte: u8) -> SpmWrite {
        SpmWrite {
            offset,
            record: [byte; RECORD_LEN],
        }
    }

    #[test]
    fn outbox_areas_of_hosts_without_requests_are_not_read_and_given_as_zeros() {
        let (_dir, m) = mailbox(8);
        let g = m.geometry();
        // Host 3 has a request (a non-zero slot); host 5 has none but
        // something in its outbox.
        poke(&m, g.inbox_area(3).unwrap() + RECORD_LEN as u64, 1);
        poke(&m, g.outbox_area(3).unwrap() + 7, 3);
        poke(&m, g.outbox_area(5).unwrap() + 7, 5);
        let mut disk = SpmDisk::new(&m);
        let (inbox, outbox) = disk.read_hosts(1, 8).unwrap();
        assert_eq!(inbox.len(), 8 * AREA_SIZE);
        assert_eq!(outbox[2 * AREA_SIZE + 7], 3, "host 3's outbox is read");
        assert_eq!(outbox[4 * AREA_SIZE + 7], 0, "host 5's is not");
        assert_eq!(disk.stats.reads, 2, "the inboxes, then host 3's outbox");
        assert_eq!(disk.stats.read_bytes, 9 * AREA_SIZE as u64);
    }

    #[test]
    fn replies_are_written_without_reading_and_merged_only_through_known_areas() {
        let (_dir, m) = mailbox(16);
        let g = m.geometry();
        for h in [1u16, 2, 3, 5] {
            poke(&m, g.inbox_area(h).unwrap() + RECORD_LEN as u64, 1);
        }
        // Host 4's outbox is never read (hosts 1-3 and 5 are read as
        // targeted reads), and what it holds must survive writes on both
        // sides of it.
        poke(&m, g.outbox_area(4).unwrap() + 300, 0x44);
        let mut disk = SpmDisk::new(&m);
        disk.read_hosts(1, 3).unwrap();
        disk.read_hosts(5, 1).unwrap();
        let reads = disk.stats.reads;
        let slot = |h: u16, s: u64| g.outbox_area(h).unwrap() + s * RECORD_LEN as u64;
        disk.write(&[
            write(slot(1, 1), 0xa1),
            write(slot(2, 5), 0xa2),
            write(slot(3, 1), 0xa3),
            write(slot(5, 2), 0xa5),
        ])
        .unwrap();
        assert_eq!(disk.stats.reads, reads, "no read before a write");
        assert_eq!(
            disk.stats.writes, 2,
            "hosts 1 to 3 in one run; host 5 apart, as host 4 is not known"
        );
        for (h, s, b) in [(1, 1, 0xa1), (2, 5, 0xa2), (3, 1, 0xa3), (5, 2, 0xa5)] {
            assert_eq!(peek(&m, slot(h, s), RECORD_LEN), vec![b; RECORD_LEN]);
        }
        assert_eq!(peek(&m, g.outbox_area(4).unwrap() + 300, 1), [0x44]);
        // A reply to a host never read: its area is read first, once.
        poke(&m, g.outbox_area(9).unwrap() + 1000, 0x99);
        disk.write(&[write(slot(9, 1), 0xb9)]).unwrap();
        assert_eq!(disk.stats.reads, reads + 1);
        assert_eq!(peek(&m, g.outbox_area(9).unwrap() + 1000, 1), [0x99]);
        assert_eq!(peek(&m, slot(9, 1), RECORD_LEN), vec![0xb9; RECORD_LEN]);
    }

    #[test]
    fn records_outside_the_outboxes_keep_their_neighbours() {
        let (_dir, m) = mailbox(4);
        let neighbour = SPM_HEADER_OFFSET + RECORD_LEN as u64;
        let before = peek(&m, neighbour, RECORD_LEN);
        let mut disk = SpmDisk::new(&m);
        disk.write(&[write(SPM_HEADER_OFFSET, 0x5a)]).unwrap();
        assert_eq!(peek(&m, SPM_HEADER_OFFSET, 4), [0x5a; 4]);
        assert_eq!(peek(&m, neighbour, RECORD_LEN), before);
        assert_eq!(
            disk.read_record(SPM_HEADER_OFFSET).unwrap(),
            &[0x5a; RECORD_LEN]
        );
    }
}
