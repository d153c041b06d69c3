//! Mailbox geometry: where every block, area and record lives.

use super::{
    AREA_SIZE, DOORBELL_OFFSET, Field, HostId, INBOX_OFFSET, MAX_HOSTS, RECORD_LEN,
    RESERVED_OFFSET, SECTOR_SIZES, SPM_HEADER_OFFSET, SUPERBLOCK_BACKUP_OFFSET, SUPERBLOCK_OFFSET,
};
use core::fmt;

const AREA: u64 = AREA_SIZE as u64;

/// The two numbers a mailbox is built from, and everything derived from
/// them. Valid by construction: see [`Geometry::new`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Geometry {
    max_hosts: u16,
    sector_size: u32,
}

/// Why a geometry is refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum GeometryError {
    /// The sector size is neither 512 nor 4096.
    SectorSize {
        /// The size given.
        sector_size: u32,
    },
    /// The host count is not in 1..=2000.
    MaxHosts {
        /// The count given.
        max_hosts: u16,
    },
}

impl GeometryError {
    /// The superblock field that holds the refused value.
    pub fn field(self) -> Field {
        match self {
            GeometryError::SectorSize { .. } => Field::SectorSize,
            GeometryError::MaxHosts { .. } => Field::MaxHosts,
        }
    }
}

impl fmt::Display for GeometryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            GeometryError::SectorSize { sector_size } => {
                write!(
                    f,
                    "sector size {sector_size} is not supported (use 512 or 4096)"
                )
            }
            GeometryError::MaxHosts { max_hosts } => {
                write!(
                    f,
                    "host count {max_hosts} is out of range (1..={MAX_HOSTS})"
                )
            }
        }
    }
}

impl core::error::Error for GeometryError {}

impl Geometry {
    /// A mailbox for host ids 1..=`max_hosts` on a device with
    /// `sector_size`-byte logical sectors.
    pub const fn new(max_hosts: u16, sector_size: u32) -> Result<Geometry, GeometryError> {
        if sector_size != SECTOR_SIZES[0] && sector_size != SECTOR_SIZES[1] {
            return Err(GeometryError::SectorSize { sector_size });
        }
        if max_hosts == 0 || max_hosts > MAX_HOSTS {
            return Err(GeometryError::MaxHosts { max_hosts });
        }
        Ok(Geometry {
            max_hosts,
            sector_size,
        })
    }

    /// The highest host id.
    pub const fn max_hosts(&self) -> u16 {
        self.max_hosts
    }

    /// The logical sector size the mailbox was made for.
    pub const fn sector_size(&self) -> u32 {
        self.sector_size
    }

    /// The valid host ids, 1..=`max_hosts`, in order.
    pub fn hosts(&self) -> impl DoubleEndedIterator<Item = HostId> + Clone + use<> {
        (1..=self.max_hosts).map(HostId::new)
    }

    /// Where the inbox starts.
    pub const fn inbox_offset(&self) -> u64 {
        INBOX_OFFSET
    }

    /// Where the outbox starts.
    pub const fn outbox_offset(&self) -> u64 {
        INBOX_OFFSET + self.max_hosts as u64 * AREA
    }

    /// The size of the whole mailbox; the device must be at least this big.
    pub const fn mailbox_size(&self) -> u64 {
        self.outbox_offset() + self.max_hosts as u64 * AREA
    }

    /// The length of the inbox (and of the outbox).
    pub const fn region_len(&self) -> u64 {
        self.max_hosts as u64 * AREA
    }

    /// Where host `host_id`'s inbox area starts, if the host id is valid.
    pub const fn inbox_area(&self, host_id: HostId) -> Option<u64> {
        let host_id = host_id.get();
        if host_id == 0 || host_id > self.max_hosts {
            return None;
        }
        Some(INBOX_OFFSET + (host_id as u64 - 1) * AREA)
    }

    /// Where host `host_id`'s outbox area starts, if the host id is valid.
    pub const fn outbox_area(&self, host_id: HostId) -> Option<u64> {
        let host_id = host_id.get();
        if host_id == 0 || host_id > self.max_hosts {
            return None;
        }
        Some(self.outbox_offset() + (host_id as u64 - 1) * AREA)
    }

    /// What lives at byte `offset` of the mailbox, or `None` past its end.
    pub fn locate(&self, offset: u64) -> Option<Place> {
        if offset >= self.mailbox_size() {
            return None;
        }
        let block = offset / AREA;
        let within = offset % AREA;
        let region = if offset < SPM_HEADER_OFFSET {
            Region::Superblock
        } else if offset < DOORBELL_OFFSET {
            Region::SpmHeader
        } else if offset < RESERVED_OFFSET {
            Region::Doorbell
        } else if offset < SUPERBLOCK_BACKUP_OFFSET {
            Region::Reserved
        } else if offset < INBOX_OFFSET {
            Region::SuperblockBackup
        } else if offset < self.outbox_offset() {
            Region::Inbox {
                host_id: HostId::new((block - INBOX_OFFSET / AREA + 1) as u16),
            }
        } else {
            Region::Outbox {
                host_id: HostId::new((block - self.outbox_offset() / AREA + 1) as u16),
            }
        };
        Some(Place {
            offset,
            region,
            index: (within / RECORD_LEN as u64) as u16,
            byte: (within % RECORD_LEN as u64) as u16,
        })
    }
}

/// The part of the mailbox a byte belongs to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Region {
    /// The superblock block (offset 0).
    Superblock,
    /// The SPM header block.
    SpmHeader,
    /// The doorbell block.
    Doorbell,
    /// The reserved space between the doorbell block and the superblock's
    /// backup; always zero in version 2.
    Reserved,
    /// The backup superblock block (offset 0xF000).
    SuperblockBackup,
    /// A host's inbox area.
    Inbox {
        /// The host.
        host_id: HostId,
    },
    /// A host's outbox area.
    Outbox {
        /// The host.
        host_id: HostId,
    },
}

/// A byte's place in the mailbox: region, record index in its 4 KiB block
/// (0 = header or the block's record, 1..=31 = slot) and byte in the record.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Place {
    /// The byte's offset in the mailbox.
    pub offset: u64,
    /// The region.
    pub region: Region,
    /// The record index within the 4 KiB block.
    pub index: u16,
    /// The byte within the 128-byte record.
    pub byte: u16,
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (index, byte) = (self.index, self.byte);
        match self.region {
            Region::Superblock
            | Region::SpmHeader
            | Region::Doorbell
            | Region::SuperblockBackup => {
                let name = match self.region {
                    Region::Superblock => "superblock",
                    Region::SpmHeader => "SPM header",
                    Region::SuperblockBackup => "superblock backup",
                    _ => "doorbell",
                };
                if index == 0 {
                    write!(f, "{name} record, byte {byte}")?;
                } else {
                    write!(f, "{name} block, unused space")?;
                }
            }
            Region::Reserved => f.write_str("reserved space before the superblock backup")?,
            Region::Inbox { host_id } | Region::Outbox { host_id } => {
                let side = if matches!(self.region, Region::Inbox { .. }) {
                    "inbox"
                } else {
                    "outbox"
                };
                if index == 0 {
                    write!(f, "host {host_id} {side} header, byte {byte}")?;
                } else {
                    write!(f, "host {host_id} {side} slot {index}, byte {byte}")?;
                }
            }
        }
        write!(f, " (offset {} = {:#x})", self.offset, self.offset)
    }
}

const _: () =
    assert!(SUPERBLOCK_OFFSET == 0 && SPM_HEADER_OFFSET == AREA && DOORBELL_OFFSET == 2 * AREA);
// The largest mailbox still fits comfortably in u64 and its host index in u16.
const _: () = assert!(INBOX_OFFSET + 2 * MAX_HOSTS as u64 * AREA < u32::MAX as u64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_512_and_4096_byte_sectors_and_1_to_2000_hosts() {
        assert!(Geometry::new(1, 512).is_ok());
        assert!(Geometry::new(2000, 4096).is_ok());
        assert_eq!(
            Geometry::new(0, 512),
            Err(GeometryError::MaxHosts { max_hosts: 0 })
        );
        assert_eq!(
            Geometry::new(2001, 512),
            Err(GeometryError::MaxHosts { max_hosts: 2001 })
        );
        assert_eq!(
            Geometry::new(10, 1024),
            Err(GeometryError::SectorSize { sector_size: 1024 })
        );
    }

    #[test]
    fn layout_of_a_2000_host_mailbox() {
        let g = Geometry::new(2000, 512).unwrap();
        assert_eq!(g.inbox_offset(), 0x10000);
        assert_eq!(g.outbox_offset(), 0x10000 + 2000 * 4096);
        assert_eq!(g.mailbox_size(), 16_449_536);
        assert_eq!(g.inbox_area(HostId::new(1)), Some(0x10000));
        assert_eq!(g.inbox_area(HostId::new(2000)), Some(0x10000 + 1999 * 4096));
        assert_eq!(g.outbox_area(HostId::new(1)), Some(g.outbox_offset()));
        assert_eq!(g.inbox_area(HostId::NONE), None);
        assert_eq!(g.outbox_area(HostId::new(2001)), None);
    }

    #[test]
    fn locate_names_region_record_and_byte() {
        let g = Geometry::new(4, 512).unwrap();
        let p = g.locate(0x10000 + 4096 + 3 * 128 + 17).unwrap();
        assert_eq!(
            p.region,
            Region::Inbox {
                host_id: HostId::new(2)
            }
        );
        assert_eq!((p.index, p.byte), (3, 17));
        assert_eq!(
            p.to_string(),
            format!(
                "host 2 inbox slot 3, byte 17 (offset {0} = {0:#x})",
                p.offset
            )
        );
        let p = g.locate(g.outbox_offset() + 3 * 4096).unwrap();
        assert_eq!(
            p.region,
            Region::Outbox {
                host_id: HostId::new(4)
            }
        );
        assert_eq!(g.locate(5).unwrap().region, Region::Superblock);
        assert_eq!(g.locate(4096 + 200).unwrap().region, Region::SpmHeader);
        assert_eq!(g.locate(8192).unwrap().region, Region::Doorbell);
        assert_eq!(g.locate(12288).unwrap().region, Region::Reserved);
        assert_eq!(
            g.locate(g.mailbox_size() - 1).unwrap().region,
            Region::Outbox {
                host_id: HostId::new(4)
            }
        );
        assert_eq!(g.locate(g.mailbox_size()), None);
    }
}
