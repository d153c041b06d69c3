//! A simulated shared disk: atomic per sector and nothing more, with
//! injected faults.
//!
//! Writers hand it records at absolute offsets; like the real daemons, the
//! simulation writes the whole sector holding each record (read-modify-write
//! of a sector only its writer owns). A write of several sectors may be
//! torn (only a prefix lands). Any write may be lost, land in the same
//! place of another host's area (misdirected), or land with one bit
//! flipped.

use spmbox_core::wire::{AREA_SIZE, Geometry, RECORD_LEN};

use super::rng::Rng;

/// Fault rates, in parts per million of writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// A multi-sector write lands only in part.
    pub torn_ppm: u32,
    /// A write does not land at all.
    pub lost_ppm: u32,
    /// A write lands in another host's area of the same region.
    pub misdirected_ppm: u32,
    /// A write lands with one bit flipped.
    pub bitflip_ppm: u32,
}

impl Faults {
    /// No faults.
    pub const NONE: Faults = Faults {
        torn_ppm: 0,
        lost_ppm: 0,
        misdirected_ppm: 0,
        bitflip_ppm: 0,
    };

    /// Every fault kind at a rate that shows up in a short run.
    pub fn all(rate_ppm: u32) -> Faults {
        Faults {
            torn_ppm: rate_ppm,
            lost_ppm: rate_ppm,
            misdirected_ppm: rate_ppm,
            bitflip_ppm: rate_ppm,
        }
    }
}

/// How many faults of each kind were injected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Torn writes.
    pub torn: u64,
    /// Lost writes.
    pub lost: u64,
    /// Misdirected writes.
    pub misdirected: u64,
    /// Bit flips.
    pub bitflips: u64,
    /// Writes in all.
    pub writes: u64,
}

/// The disk: the mailbox, then any extra space (pool metadata).
#[derive(Clone, Debug)]
pub struct SimDisk {
    bytes: Vec<u8>,
    geometry: Geometry,
    sector: usize,
    /// Current fault rates.
    pub faults: Faults,
    /// What was injected so far.
    pub counts: FaultCounts,
    /// Bumped by every write, so that readers can cache what they derive.
    version: u64,
}

impl SimDisk {
    /// A zeroed disk with the mailbox of `geometry` and `extra` bytes after
    /// it.
    pub fn new(geometry: Geometry, extra: usize) -> SimDisk {
        let len = geometry.mailbox_size() as usize + extra;
        SimDisk {
            bytes: vec![0; len],
            geometry,
            sector: geometry.sector_size() as usize,
            faults: Faults::NONE,
            counts: FaultCounts::default(),
            version: 0,
        }
    }

    /// The mailbox geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Changes whenever the contents may have changed.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&self, offset: u64, len: usize) -> &[u8] {
        let o = offset as usize;
        &self.bytes[o..o + len]
    }

    /// The 128-byte record at `offset`.
    pub fn record(&self, offset: u64) -> &[u8] {
        self.read(offset, RECORD_LEN)
    }

    /// Writes without faults (setup only).
    pub fn put(&mut self, offset: u64, data: &[u8]) {
        let o = offset as usize;
        self.version += 1;
        self.bytes[o..o + data.len()].copy_from_slice(data);
    }

    /// Writes one record the way a daemon does: the whole sector holding
    /// it, read-modify-write. Faults apply.
    pub fn write_record(&mut self, rng: &mut Rng, offset: u64, record: &[u8; RECORD_LEN]) {
        let start = offset - offset % self.sector as u64;
        let mut sector = self.read(start, self.sector).to_vec();
        let within = (offset - start) as usize;
        sector[within..within + RECORD_LEN].copy_from_slice(record);
        self.write(rng, start, &sector);
    }

    /// Writes whole sectors at a sector-aligned offset. Each sector lands
    /// atomically or not at all; faults apply.
    pub fn write(&mut self, rng: &mut Rng, offset: u64, data: &[u8]) {
        assert_eq!(
            offset as usize % self.sector,
            0,
            "unaligned write at {offset}"
        );
        assert_eq!(
            data.len() % self.sector,
            0,
            "write of {} bytes is not whole sectors",
            data.len()
        );
        self.counts.writes += 1;
        self.version += 1;
        if rng.chance(self.faults.lost_ppm) {
            self.counts.lost += 1;
            return;
        }
        let mut data = data.to_vec();
        if rng.chance(self.faults.bitflip_ppm) {
            self.counts.bitflips += 1;
            let bit = rng.below(data.len() as u64 * 8) as usize;
            data[bit / 8] ^= 1 << (bit % 8);
        }
        let mut target = offset;
        if rng.chance(self.faults.misdirected_ppm) {
            if let Some(other) = self.misdirect(rng, offset) {
                self.counts.misdirected += 1;
                target = other;
            }
        }
        let sectors = data.len() / self.sector;
        let landed = if sectors > 1 && rng.chance(self.faults.torn_ppm) {
            self.counts.torn += 1;
            rng.below(sectors as u64) as usize
        } else {
            sectors
        };
        let len = landed * self.sector;
        self.put(target, &data[..len]);
    }

    /// The same place in another host's area of the same region, if the
    /// offset is in a host area and there is another host.
    fn misdirect(&self, rng: &mut Rng, offset: u64) -> Option<u64> {
        let g = self.geometry;
        let hosts = u64::from(g.max_hosts());
        if hosts < 2 {
            return None;
        }
        let area = AREA_SIZE as u64;
        let region = if (g.inbox_offset()..g.outbox_offset()).contains(&offset) {
            g.inbox_offset()
        } else if (g.outbox_offset()..g.mailbox_size()).contains(&offset) {
            g.outbox_offset()
        } else {
            return None;
        };
        let host = (offset - region) / area;
        let other = (host + 1 + rng.below(hosts - 1)) % hosts;
        Some(region + other * area + (offset - region) % area)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_faults_a_record_lands_exactly() {
        let g = Geometry::new(4, 512).unwrap();
        let mut disk = SimDisk::new(g, 0);
        let mut rng = Rng::new(1);
        let offset = g.inbox_area(2).unwrap() + 3 * 128;
        disk.write_record(&mut rng, offset, &[7; RECORD_LEN]);
        assert_eq!(disk.record(offset), &[7; RECORD_LEN]);
        assert!(disk.read(offset - 128, 128).iter().all(|&b| b == 0));
    }

    #[test]
    fn a_misdirected_write_lands_in_another_hosts_area() {
        let g = Geometry::new(4, 512).unwrap();
        let mut disk = SimDisk::new(g, 0);
        disk.faults.misdirected_ppm = 1_000_000;
        let mut rng = Rng::new(2);
        let offset = g.inbox_area(2).unwrap() + 128;
        disk.write_record(&mut rng, offset, &[9; RECORD_LEN]);
        assert!(disk.record(offset).iter().all(|&b| b == 0));
        let hits = (1..=4)
            .filter(|&h| disk.record(g.inbox_area(h).unwrap() + 128) == [9; RECORD_LEN])
            .count();
        assert_eq!(hits, 1);
    }

    #[test]
    fn a_torn_write_lands_a_prefix_of_its_sectors() {
        let g = Geometry::new(4, 512).unwrap();
        let mut disk = SimDisk::new(g, 0);
        disk.faults.torn_ppm = 1_000_000;
        let mut rng = Rng::new(3);
        let offset = g.inbox_area(1).unwrap();
        disk.write(&mut rng, offset, &[5; AREA_SIZE]);
        let landed = disk
            .read(offset, AREA_SIZE)
            .iter()
            .take_while(|&&b| b == 5)
            .count();
        assert!(landed < AREA_SIZE && landed % 512 == 0, "landed {landed}");
        assert!(
            disk.read(offset + landed as u64, AREA_SIZE - landed)
                .iter()
                .all(|&b| b == 0)
        );
    }
}
