//! Whole host areas: a header and 31 slots, read together.
//!
//! A slot is acted on only if its record is valid, belongs exactly where it
//! was read from, and carries the generation its area header names. A
//! record of another generation is *stale*: left over from an earlier
//! incarnation, or ahead of a header whose write was torn. Stale records
//! are reported, never acted on.
//!
//! An inbox slot holds a request (kind 5) or a hold record (kind 8); the
//! kind says which. Each typed view sees the other kind as an empty slot:
//! in an [`InboxArea`] a slot with a valid hold record (of any generation)
//! holds no request and is [`SlotState::Empty`]; a [`HoldArea`] sees a
//! valid request the same way. A defective record of either kind is
//! defective in both views.

use core::marker::PhantomData;

use super::{
    AREA_SIZE, Defect, Hold, InboxHeader, Kind, Location, OutboxHeader, RECORD_LEN, Reply, Request,
    SLOTS_PER_AREA, Uuid,
};
use super::{Epoch, Generation, HostId, Slot};

/// What a slot holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum SlotState<T> {
    /// All zero.
    Empty,
    /// A valid record of the area's current generation: act on it.
    Valid(T),
    /// A valid record of another generation than the area header's (or of
    /// an area whose header is empty or defective): do not act on it.
    Stale(T),
    /// Not a valid record for this place; see the defect.
    Defective(Defect),
}

/// A record that lives in the slots of a host area, with the header that
/// anchors its generation. Implemented by [`Request`] (inbox) and
/// [`Reply`] (outbox).
pub trait SlotRecord: Sized + Copy {
    /// The header record of the area.
    type Header: Copy;
    /// Parses a slot record read from `at`.
    fn parse_slot(bytes: &[u8], at: &Location) -> Result<Option<Self>, Defect>;
    /// Parses the area header read from `at`.
    fn parse_header(bytes: &[u8], at: &Location) -> Result<Option<Self::Header>, Defect>;
    /// The generation the slot record carries.
    fn generation(&self) -> Generation;
    /// The generation the header names.
    fn header_generation(header: &Self::Header) -> Generation;
}

impl SlotRecord for Request {
    type Header = InboxHeader;
    fn parse_slot(bytes: &[u8], at: &Location) -> Result<Option<Self>, Defect> {
        match Request::parse(bytes, at) {
            // A hold record is no request: a valid one leaves the slot
            // without a request, a defective one is reported as such.
            Err(Defect::WrongKind {
                found: Kind::Hold, ..
            }) => Hold::parse(bytes, at).map(|_| None),
            other => other,
        }
    }
    fn parse_header(bytes: &[u8], at: &Location) -> Result<Option<InboxHeader>, Defect> {
        InboxHeader::parse(bytes, at)
    }
    fn generation(&self) -> Generation {
        self.generation
    }
    fn header_generation(header: &InboxHeader) -> Generation {
        header.generation
    }
}

impl SlotRecord for Hold {
    type Header = InboxHeader;
    fn parse_slot(bytes: &[u8], at: &Location) -> Result<Option<Self>, Defect> {
        match Hold::parse(bytes, at) {
            Err(Defect::WrongKind {
                found: Kind::Request,
                ..
            }) => Request::parse(bytes, at).map(|_| None),
            other => other,
        }
    }
    fn parse_header(bytes: &[u8], at: &Location) -> Result<Option<InboxHeader>, Defect> {
        InboxHeader::parse(bytes, at)
    }
    fn generation(&self) -> Generation {
        self.generation
    }
    fn header_generation(header: &InboxHeader) -> Generation {
        header.generation
    }
}

impl SlotRecord for Reply {
    type Header = OutboxHeader;
    fn parse_slot(bytes: &[u8], at: &Location) -> Result<Option<Self>, Defect> {
        Reply::parse(bytes, at)
    }
    fn parse_header(bytes: &[u8], at: &Location) -> Result<Option<OutboxHeader>, Defect> {
        OutboxHeader::parse(bytes, at)
    }
    fn generation(&self) -> Generation {
        self.generation
    }
    fn header_generation(header: &OutboxHeader) -> Generation {
        header.generation
    }
}

/// One host's 4 KiB area, parsed on demand (no copies, no allocation).
#[derive(Clone, Copy, Debug)]
pub struct Area<'a, S: SlotRecord> {
    bytes: &'a [u8; AREA_SIZE],
    domain: Uuid,
    host_id: HostId,
    _slots: PhantomData<S>,
}

/// A host's inbox area: inbox header and requests (hold records read as
/// empty slots).
pub type InboxArea<'a> = Area<'a, Request>;
/// A host's inbox area seen for its hold records (requests read as empty
/// slots).
pub type HoldArea<'a> = Area<'a, Hold>;
/// A host's outbox area: outbox header and replies.
pub type OutboxArea<'a> = Area<'a, Reply>;

impl<'a, S: SlotRecord> Area<'a, S> {
    /// Views `bytes` as host `host_id`'s area in `domain`. `None` if
    /// `bytes` is not exactly [`AREA_SIZE`] long.
    pub fn new(bytes: &'a [u8], domain: Uuid, host_id: HostId) -> Option<Self> {
        Some(Self {
            bytes: bytes.try_into().ok()?,
            domain,
            host_id,
            _slots: PhantomData,
        })
    }

    /// The host this area belongs to.
    pub fn host_id(&self) -> HostId {
        self.host_id
    }

    /// The raw bytes of record `index` (0 = header, 1..=31 = slots).
    pub fn record_bytes(&self, index: u16) -> Option<&'a [u8; RECORD_LEN]> {
        let start = usize::from(index).checked_mul(RECORD_LEN)?;
        self.bytes.get(start..start + RECORD_LEN)?.try_into().ok()
    }

    fn location(&self, index: u16) -> Location {
        Location {
            domain: self.domain,
            host_id: self.host_id,
            index,
        }
    }

    /// The area header: `Ok(None)` if the host never wrote one.
    pub fn header(&self) -> Result<Option<S::Header>, Defect> {
        let bytes = self.record_bytes(0).map_or(&[][..], |b| &b[..]);
        S::parse_header(bytes, &self.location(0))
    }

    /// The generation of a valid header; `None` if the header is empty or
    /// defective (then every slot record is stale).
    pub fn header_generation(&self) -> Option<Generation> {
        self.header()
            .ok()
            .flatten()
            .map(|h| S::header_generation(&h))
    }

    /// What slot `slot` (1..=31) holds; `None` for a slot number out of
    /// range.
    pub fn slot(&self, slot: Slot) -> Option<SlotState<S>> {
        self.slot_under(slot, self.header_generation())
    }

    /// [`Area::slot`] with the header's generation already known (from
    /// [`Area::header_generation`] on this same area), for a reader that
    /// looks at several slots and parses the header once.
    pub fn slot_under(
        &self,
        slot: Slot,
        header_generation: Option<Generation>,
    ) -> Option<SlotState<S>> {
        if !(1..=SLOTS_PER_AREA).contains(&slot.get()) {
            return None;
        }
        Some(self.slot_with(slot, header_generation))
    }

    fn slot_with(&self, slot: Slot, header_generation: Option<Generation>) -> SlotState<S> {
        let bytes = self.record_bytes(slot.get()).map_or(&[][..], |b| &b[..]);
        match S::parse_slot(bytes, &self.location(slot.get())) {
            Ok(None) => SlotState::Empty,
            Ok(Some(record)) if Some(record.generation()) == header_generation => {
                SlotState::Valid(record)
            }
            Ok(Some(record)) => SlotState::Stale(record),
            Err(defect) => SlotState::Defective(defect),
        }
    }

    /// Every slot, 1..=31, with what it holds. The header is parsed once.
    pub fn slots(&self) -> impl Iterator<Item = (Slot, SlotState<S>)> + '_ {
        let header = self.header_generation();
        (1..=SLOTS_PER_AREA)
            .map(Slot::new)
            .map(move |slot| (slot, self.slot_with(slot, header)))
    }
}

impl Area<'_, Reply> {
    /// The newest epoch this outbox area names, in its header or in any
    /// reply, valid or stale (of any generation); `None` if it names none.
    /// A new SPM takes an epoch above every one found in any outbox area
    /// (docs/format.md, section 8), so a host that counts the epoch of
    /// every reply it finds never ignores the new SPM's replies.
    pub fn newest_epoch(&self) -> Option<Epoch> {
        let header = self.header().ok().flatten().map(|h| h.epoch);
        self.slots()
            .filter_map(|(_, state)| match state {
                SlotState::Valid(r) | SlotState::Stale(r) => Some(r.epoch),
                SlotState::Empty | SlotState::Defective(_) => None,
            })
            .chain(header)
            .max()
    }
}

/// Views a run of consecutive areas (say, a whole inbox read in one go) as
/// areas of hosts `first_host`, `first_host + 1`, ... A trailing partial
/// area is ignored.
pub fn areas<S: SlotRecord>(
    region: &[u8],
    domain: Uuid,
    first_host: HostId,
) -> impl Iterator<Item = Area<'_, S>> {
    region
        .chunks_exact(AREA_SIZE)
        .zip(first_host.get()..=u16::MAX)
        .filter_map(move |(bytes, host)| Area::new(bytes, domain, HostId::new(host)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Defect, HoldArea, InboxHeader, Request};

    const DOMAIN: Uuid = Uuid([0x11; 16]);

    fn request(slot: u16, generation: u64) -> Request {
        Request {
            domain: DOMAIN,
            host_id: HostId::new(7),
            slot: Slot::new(slot),
            generation: Generation::new(generation),
            sequence: u64::from(slot),
            volume: Uuid([0x22; 16]),
            target_size: 1 << 30,
            current_size: 0,
            paused: false,
        }
    }

    fn put(area: &mut [u8; AREA_SIZE], index: usize, record: [u8; RECORD_LEN]) {
        area[index * RECORD_LEN..(index + 1) * RECORD_LEN].copy_from_slice(&record);
    }

    fn area_with_header(generation: u64) -> [u8; AREA_SIZE] {
        let mut area = [0u8; AREA_SIZE];
        let header = InboxHeader {
            domain: DOMAIN,
            host_id: HostId::new(7),
            generation: Generation::new(generation),
            owner: 0,
            heartbeat: 0,
            heartbeat_interval_ms: 0,
            release_ack: 0,
        };
        put(&mut area, 0, header.to_bytes().unwrap());
        area
    }

    #[test]
    fn only_requests_of_the_headers_generation_are_valid() {
        let mut area = area_with_header(5);
        put(&mut area, 1, request(1, 5).to_bytes().unwrap());
        put(&mut area, 2, request(2, 4).to_bytes().unwrap());
        put(&mut area, 3, request(3, 6).to_bytes().unwrap());
        let inbox = InboxArea::new(&area, DOMAIN, HostId::new(7)).unwrap();
        assert_eq!(
            inbox.slot(Slot::new(1)),
            Some(SlotState::Valid(request(1, 5)))
        );
        assert_eq!(
            inbox.slot(Slot::new(2)),
            Some(SlotState::Stale(request(2, 4)))
        );
        assert_eq!(
            inbox.slot(Slot::new(3)),
            Some(SlotState::Stale(request(3, 6)))
        );
        assert_eq!(inbox.slot(Slot::new(4)), Some(SlotState::Empty));
    }

    #[test]
    fn without_a_valid_header_every_request_is_stale() {
        let mut area = [0u8; AREA_SIZE];
        put(&mut area, 1, request(1, 5).to_bytes().unwrap());
        let inbox = InboxArea::new(&area, DOMAIN, HostId::new(7)).unwrap();
        assert_eq!(inbox.header(), Ok(None));
        assert_eq!(
            inbox.slot(Slot::new(1)),
            Some(SlotState::Stale(request(1, 5)))
        );
        area[5] ^= 0xff; // damage the (empty) header
        let inbox = InboxArea::new(&area, DOMAIN, HostId::new(7)).unwrap();
        assert_eq!(inbox.header(), Err(Defect::BadMagic));
        assert_eq!(
            inbox.slot(Slot::new(1)),
            Some(SlotState::Stale(request(1, 5)))
        );
    }

    #[test]
    fn a_request_in_another_hosts_area_is_misdirected() {
        let mut area = area_with_header(5);
        let mut r = request(1, 5);
        r.host_id = HostId::new(8);
        put(&mut area, 1, r.to_bytes().unwrap());
        let inbox = InboxArea::new(&area, DOMAIN, HostId::new(7)).unwrap();
        assert_eq!(
            inbox.slot(Slot::new(1)),
            Some(SlotState::Defective(Defect::Misdirected {
                host_id: HostId::new(8),
                index: 1
            }))
        );
    }

    #[test]
    fn slots_yields_31_numbered_slots_and_rejects_others() {
        let area = area_with_header(1);
        let inbox = InboxArea::new(&area, DOMAIN, HostId::new(7)).unwrap();
        let numbers: heapless::Vec<u16, 31> = inbox.slots().map(|(n, _)| n.get()).collect();
        assert_eq!(numbers.first(), Some(&1));
        assert_eq!(numbers.last(), Some(&31));
        assert_eq!(numbers.len(), 31);
        assert_eq!(inbox.slot(Slot::new(0)), None);
        assert_eq!(inbox.slot(Slot::new(32)), None);
        assert!(InboxArea::new(&area[..4095], DOMAIN, HostId::new(7)).is_none());
    }

    #[test]
    fn areas_walks_consecutive_hosts() {
        let mut region = [0u8; 3 * AREA_SIZE];
        region[AREA_SIZE..2 * AREA_SIZE].copy_from_slice(&area_with_header(9));
        let hosts: heapless::Vec<(u16, bool), 3> =
            areas::<Request>(&region, DOMAIN, HostId::new(6))
                .map(|a| (a.host_id().get(), a.header().ok().flatten().is_some()))
                .collect();
        assert_eq!(hosts.as_slice(), &[(6, false), (7, true), (8, false)]);
    }

    #[test]
    fn a_hold_is_no_request_and_a_request_is_no_hold() {
        let mut area = area_with_header(5);
        let hold = crate::wire::Hold::listing(
            DOMAIN,
            HostId::new(7),
            Slot::new(31),
            Generation::new(5),
            &[Uuid([0x22; 16])],
        );
        put(&mut area, 31, hold.to_bytes().unwrap());
        put(&mut area, 1, request(1, 5).to_bytes().unwrap());
        let mut bad = hold;
        bad.slot = Slot::new(30);
        let mut bytes = bad.to_bytes().unwrap();
        bytes[120] = 1; // a reserved byte: defective in both views
        let crc = crate::wire::CRC32C.checksum(&bytes[4..]);
        bytes[..4].copy_from_slice(&crc.to_le_bytes());
        put(&mut area, 30, bytes);
        let inbox = InboxArea::new(&area, DOMAIN, HostId::new(7)).unwrap();
        let holds = HoldArea::new(&area, DOMAIN, HostId::new(7)).unwrap();
        assert_eq!(inbox.slot(Slot::new(31)), Some(SlotState::Empty));
        assert_eq!(holds.slot(Slot::new(31)), Some(SlotState::Valid(hold)));
        assert_eq!(holds.slot(Slot::new(1)), Some(SlotState::Empty));
        let defect = Some(SlotState::Defective(Defect::ReservedNotZero {
            offset: 120,
        }));
        assert_eq!(inbox.slot(Slot::new(30)), defect);
        assert_eq!(
            holds.slot(Slot::new(30)),
            Some(SlotState::Defective(Defect::ReservedNotZero {
                offset: 120
            }))
        );
    }
}
