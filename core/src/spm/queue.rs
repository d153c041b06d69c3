//! The SPM's bounded request queue: a window over the mailbox.
//!
//! The mailbox is the durable queue; this is the part of it the SPM is
//! working on. Every entry is one request (host, slot, generation,
//! sequence) from the time it is queued until its final reply is written.
//! When the queue is full, or a host has `per_host_cap` entries already, a
//! request is simply not taken: it stays on disk and a later scan offers it
//! again. Nothing is lost to a full queue.
//!
//! Policy, in the words the engine uses:
//! - **one job per volume**: requests for the same volume are deduplicated;
//!   the job asks for the largest target queued for the volume, and its
//!   result answers every request it satisfies;
//! - **paused first**: requests whose guest is paused are dispatched before
//!   all others;
//! - **round robin**: otherwise hosts take turns, starting after the host
//!   served last, so one busy host cannot starve the others; within a host,
//!   requests go in arrival order.

use crate::fmt::{debug_assert, debug_assert_eq};
use crate::wire::{HostId, MAX_HOSTS, ReplyStatus, Request, SLOTS_PER_AREA, Slot, Uuid};

/// Debug builds check every invariant ([`RequestQueue::check_invariants`])
/// after each change of the queue while it holds at most this many
/// entries; above, only the linear part (the per-host counts and caps),
/// so that a change stays cheap. The key of a new entry is checked to be
/// unique at any length.
pub const CHECK_AFTER_CHANGE_MAX_ENTRIES: usize = 128;

// A host's entries are counted in a `u8`: one per slot at most.
const _: () = ::core::assert!(SLOTS_PER_AREA as usize <= u8::MAX as usize);

/// What a queued request is waiting for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum EntryState {
    /// Waiting for a job.
    Queued,
    /// A job for its volume runs.
    Running,
    /// The pool had no room; "waiting for space" was answered (or is about
    /// to be) and the request waits for capacity.
    Parked,
}

/// One queued request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Entry {
    /// The request as read from the inbox.
    pub request: Request,
    /// Where it stands.
    pub state: EntryState,
    /// Arrival order, for FIFO within a host.
    pub arrival: u64,
    /// A reply to write (status, volume size), handed out by the engine's
    /// `poll_write`.
    pub reply: Option<(ReplyStatus, u64)>,
    /// The host's outbox header does not yet name this SPM's epoch and the
    /// request's generation: write it before the reply.
    pub header_needed: bool,
    /// "Waiting for space" was written for this request already.
    pub waiting_sent: bool,
}

/// Why a request was not taken. The request stays on disk.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Refused {
    /// The queue holds `N` entries.
    Full,
    /// The host already has `per_host_cap` entries.
    HostCap,
    /// The host id is not in 1..=[`MAX_HOSTS`] or the slot not in
    /// 1..=[`SLOTS_PER_AREA`]: no host can have written the request (the
    /// wire format refuses such records, so only a caller's bug gets here).
    OutOfRange,
}

/// A broken queue invariant, found by [`RequestQueue::check_invariants`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum QueueInvariant {
    /// An entry's host id or slot is out of range.
    OutOfRange {
        /// The host.
        host_id: HostId,
        /// The slot.
        slot: Slot,
    },
    /// A host's entry count differs from its entries in the queue.
    HostCount {
        /// The host.
        host_id: HostId,
    },
    /// A host has more than `per_host_cap` entries.
    HostCap {
        /// The host.
        host_id: HostId,
    },
    /// Two entries are for the same host and slot.
    Duplicate {
        /// The host.
        host_id: HostId,
        /// The slot.
        slot: Slot,
    },
}

impl core::fmt::Display for QueueInvariant {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            QueueInvariant::OutOfRange { host_id, slot } => {
                write!(f, "an entry for host {host_id} slot {slot} is out of range")
            }
            QueueInvariant::HostCount { host_id } => {
                write!(f, "host {host_id}'s entry count is wrong")
            }
            QueueInvariant::HostCap { host_id } => {
                write!(f, "host {host_id} has more entries than its cap")
            }
            QueueInvariant::Duplicate { host_id, slot } => {
                write!(f, "host {host_id} slot {slot} is queued twice")
            }
        }
    }
}

impl core::error::Error for QueueInvariant {}

/// What `offer` did with a request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Offered {
    /// Queued as a new entry.
    New,
    /// The same request was queued already (a rescan or a resend); its
    /// paused flag is updated.
    Known,
    /// The slot held an older request, which is replaced.
    Replaced,
}

/// The bounded queue. `N` is the window size.
#[derive(Debug)]
pub struct RequestQueue<const N: usize> {
    entries: heapless::Vec<Entry, N>,
    /// Entries per host id (a host has at most 31 slots, so a `u8`
    /// holds it): a scan offers every request of every host, and for the
    /// many hosts with nothing queued this answers in one step.
    per_host: [u8; MAX_HOSTS as usize + 1],
    per_host_cap: usize,
    arrivals: u64,
    last_host: u16,
    /// Parked or running entries that left because their request left
    /// the disk.
    withdrawn: u64,
}

impl<const N: usize> RequestQueue<N> {
    /// An empty queue; a host may hold at most `per_host_cap` entries
    /// (at least 1).
    pub fn new(per_host_cap: usize) -> Self {
        Self {
            entries: heapless::Vec::new(),
            per_host: [0; MAX_HOSTS as usize + 1],
            per_host_cap: per_host_cap.max(1),
            arrivals: 0,
            last_host: 0,
            withdrawn: 0,
        }
    }

    /// Entries in the queue.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the queue is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every entry.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Mutable access for the engine (state changes, reply flags).
    pub(crate) fn entries_mut(&mut self) -> &mut [Entry] {
        &mut self.entries
    }

    /// The entry for a host's slot, if any.
    pub fn find(&self, host_id: HostId, slot: Slot) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| e.request.host_id == host_id && e.request.slot == slot)
    }

    /// How many parked or running entries have left the queue because
    /// the host withdrew their request (emptied or rewrote the slot)
    /// before it was answered. When this changes, the pool may hold a
    /// parked request nobody asks for any more (see
    /// [`RequestQueue::waiting`]).
    pub fn withdrawn(&self) -> u64 {
        self.withdrawn
    }

    /// What the parked and running entries for `volume` still ask: the
    /// largest target and whether any guest is paused; `None` if no entry
    /// for it is parked or running. The pool's parked entry for the volume
    /// must ask no more than this.
    pub fn waiting(&self, volume: Uuid) -> Option<(u64, bool)> {
        self.entries
            .iter()
            .filter(|e| {
                e.request.volume == volume
                    && matches!(e.state, EntryState::Parked | EntryState::Running)
            })
            .fold(None, |acc, e| {
                let (target, urgent) = acc.unwrap_or((0, false));
                Some((
                    target.max(e.request.target_size),
                    urgent || e.request.paused,
                ))
            })
    }

    /// Entries of `host_id`.
    pub fn host_entries(&self, host_id: HostId) -> usize {
        usize::from(
            self.per_host
                .get(usize::from(host_id.get()))
                .copied()
                .unwrap_or(0),
        )
    }

    /// Counts an entry of `host_id` in (`up`) or out. Entries are only
    /// queued for hosts in range, and a host's count never exceeds its
    /// slots: anything else is a bug, asserted in debug builds and left
    /// uncounted in release.
    fn count(&mut self, host_id: HostId, up: bool) {
        let Some(c) = self.per_host.get_mut(usize::from(host_id.get())) else {
            debug_assert!(false, "host {} has no entry count", host_id);
            return;
        };
        let next = if up {
            c.checked_add(1).filter(|&n| u16::from(n) <= SLOTS_PER_AREA)
        } else {
            c.checked_sub(1)
        };
        debug_assert!(
            next.is_some(),
            "host {}'s entry count out of range",
            host_id
        );
        if let Some(next) = next {
            *c = next;
        }
    }

    fn swap_remove(&mut self, i: usize) -> Entry {
        let e = self.entries.swap_remove(i);
        self.count(e.request.host_id, false);
        e
    }

    /// Checks the queue from scratch: every entry's host id and slot are
    /// in range, each host's count matches its entries and is within
    /// `per_host_cap`, and no two entries are for the same host and slot.
    /// (The length is within `N` by construction.)
    ///
    /// The counts cost O(`N` + [`MAX_HOSTS`]), the duplicate search
    /// O(`N`²): for tests, fuzzers and debug builds.
    pub fn check_invariants(&self) -> Result<(), QueueInvariant> {
        self.check_counts()?;
        for (i, e) in self.entries.iter().enumerate() {
            let (host_id, slot) = (e.request.host_id, e.request.slot);
            if self
                .entries
                .iter()
                .skip(i.saturating_add(1))
                .any(|o| o.request.host_id == host_id && o.request.slot == slot)
            {
                return Err(QueueInvariant::Duplicate { host_id, slot });
            }
        }
        Ok(())
    }

    /// The linear part of [`RequestQueue::check_invariants`]: ranges,
    /// counts and caps.
    fn check_counts(&self) -> Result<(), QueueInvariant> {
        // Every entry takes one off its host's count; all must end at 0.
        let mut left = self.per_host;
        for e in &self.entries {
            let (host_id, slot) = (e.request.host_id, e.request.slot);
            if !in_range(host_id, slot) {
                return Err(QueueInvariant::OutOfRange { host_id, slot });
            }
            let Some(c) = left.get_mut(usize::from(host_id.get())) else {
                return Err(QueueInvariant::OutOfRange { host_id, slot });
            };
            *c = c
                .checked_sub(1)
                .ok_or(QueueInvariant::HostCount { host_id })?;
        }
        if let Some(host) = left.iter().position(|&c| c != 0) {
            let host_id = HostId::new(u16::try_from(host).unwrap_or(u16::MAX));
            return Err(QueueInvariant::HostCount { host_id });
        }
        if let Some(host) = self
            .per_host
            .iter()
            .position(|&c| usize::from(c) > self.per_host_cap)
        {
            let host_id = HostId::new(u16::try_from(host).unwrap_or(u16::MAX));
            return Err(QueueInvariant::HostCap { host_id });
        }
        Ok(())
    }

    /// Debug builds only: asserts the invariants after a change, in full
    /// up to [`CHECK_AFTER_CHANGE_MAX_ENTRIES`] entries, else the linear
    /// part.
    fn check_after_change(&self) {
        if !cfg!(debug_assertions) {
            return;
        }
        let checked = if self.entries.len() <= CHECK_AFTER_CHANGE_MAX_ENTRIES {
            self.check_invariants()
        } else {
            self.check_counts()
        };
        if let Err(broken) = checked {
            debug_assert!(false, "request queue invariant broken: {}", broken);
        }
    }

    /// Offers a valid, non-stale request read from the inbox.
    ///
    /// Refused with [`Refused::OutOfRange`] (a host id or slot no host
    /// has), [`Refused::HostCap`] or [`Refused::Full`]; a refused request
    /// changes nothing.
    pub fn offer(&mut self, request: Request) -> Result<Offered, Refused> {
        if !in_range(request.host_id, request.slot) {
            return Err(Refused::OutOfRange);
        }
        let offered = self.offer_in_range(request);
        self.check_after_change();
        offered
    }

    fn offer_in_range(&mut self, request: Request) -> Result<Offered, Refused> {
        let queued = self.host_entries(request.host_id);
        let same_slot = if queued == 0 {
            None
        } else {
            self.entries.iter().position(|e| {
                e.request.host_id == request.host_id && e.request.slot == request.slot
            })
        };
        if let Some(i) = same_slot {
            let Some(entry) = self.entries.get_mut(i) else {
                return Err(Refused::Full);
            };
            let same = entry.request.generation == request.generation
                && entry.request.sequence == request.sequence
                && entry.request.volume == request.volume
                && entry.request.target_size == request.target_size;
            if same {
                entry.request.paused |= request.paused;
                return Ok(Offered::Known);
            }
            // The host rewrote the slot: the old request is gone from disk.
            let old = self.swap_remove(i);
            self.count_withdrawn(&old);
            // The old entry's place is free again.
            self.push(request)?;
            debug_assert_eq!(self.host_entries(request.host_id), queued);
            return Ok(Offered::Replaced);
        }
        if queued >= self.per_host_cap {
            return Err(Refused::HostCap);
        }
        self.push(request)?;
        Ok(Offered::New)
    }

    fn count_withdrawn(&mut self, e: &Entry) {
        if matches!(e.state, EntryState::Parked | EntryState::Running) {
            self.withdrawn = self.withdrawn.wrapping_add(1);
        }
    }

    fn push(&mut self, request: Request) -> Result<(), Refused> {
        self.arrivals = self.arrivals.wrapping_add(1);
        let entry = Entry {
            request,
            state: EntryState::Queued,
            arrival: self.arrivals,
            reply: None,
            header_needed: true,
            waiting_sent: false,
        };
        self.entries.push(entry).map_err(|_| Refused::Full)?;
        self.count(request.host_id, true);
        // The key is new: the caller found no entry for the slot.
        debug_assert!(
            self.entries
                .iter()
                .filter(|e| e.request.host_id == request.host_id && e.request.slot == request.slot)
                .count()
                == 1,
            "host {} slot {} queued twice",
            request.host_id,
            request.slot
        );
        Ok(())
    }

    /// Removes a host's slot entry (its final reply was written, or the
    /// request disappeared from disk).
    pub fn remove(&mut self, host_id: HostId, slot: Slot) -> Option<Entry> {
        let i = self
            .entries
            .iter()
            .position(|e| e.request.host_id == host_id && e.request.slot == slot)?;
        let removed = self.swap_remove(i);
        self.check_after_change();
        Some(removed)
    }

    /// Removes every entry of a host whose request is no longer on disk, as
    /// told by `still_there`; entries with a reply still to write stay.
    pub fn retain_host(&mut self, host_id: HostId, mut still_there: impl FnMut(&Request) -> bool) {
        if self.host_entries(host_id) == 0 {
            return;
        }
        let before = self.entries.len();
        let mut left = 0usize;
        let mut withdrawn = 0u64;
        self.entries.retain(|e| {
            let keep = e.request.host_id != host_id || e.reply.is_some() || still_there(&e.request);
            if keep && e.request.host_id == host_id {
                left += 1;
            }
            if !keep && matches!(e.state, EntryState::Parked | EntryState::Running) {
                withdrawn += 1;
            }
            keep
        });
        self.withdrawn = self.withdrawn.wrapping_add(withdrawn);
        // At most the host's count before, which fits a u8.
        let left = u8::try_from(left);
        debug_assert!(
            left.is_ok(),
            "host {} kept more entries than it had",
            host_id
        );
        if let (Some(c), Ok(left)) = (self.per_host.get_mut(usize::from(host_id.get())), left) {
            debug_assert!(left <= *c, "host {} gained entries", host_id);
            debug_assert_eq!(before - self.entries.len(), usize::from(*c - left));
            *c = left;
        }
        self.check_after_change();
    }

    /// Whether a job runs for `volume`.
    pub fn running(&self, volume: Uuid) -> bool {
        self.entries
            .iter()
            .any(|e| e.request.volume == volume && e.state == EntryState::Running)
    }

    /// Picks the next job: the volume of the most urgent queued entry whose
    /// volume has no job running, and the largest target queued for that
    /// volume. Marks every queued entry of the volume as running. Paused
    /// first; then the first host after the one served last; then arrival.
    pub fn next_job(&mut self) -> Option<Job> {
        let last = self.last_host;
        // Volumes with a job running, as a filter: a clear bit means
        // certainly not running, so the exact check (a pass over the
        // queue) is made only for a candidate that would win and whose
        // bit is set. One call stays linear in the queue's length.
        let mut running = [0u64; FILTER_WORDS];
        for e in self
            .entries
            .iter()
            .filter(|e| e.state == EntryState::Running)
        {
            let (word, bit) = filter_bit(&e.request.volume);
            running[word] |= bit;
        }
        let mut best: Option<(bool, u16, u64, Uuid)> = None;
        for e in self
            .entries
            .iter()
            .filter(|e| e.state == EntryState::Queued)
        {
            // Distance from the host after the last one served, circularly.
            let turn = e.request.host_id.get().wrapping_sub(last).wrapping_sub(1);
            let key = (!e.request.paused, turn, e.arrival, e.request.volume);
            let better = match best {
                None => true,
                Some((p, t, a, _)) => (key.0, key.1, key.2) < (p, t, a),
            };
            if !better {
                continue;
            }
            let (word, bit) = filter_bit(&e.request.volume);
            if running[word] & bit != 0 && self.running(e.request.volume) {
                continue;
            }
            best = Some(key);
        }
        let (_, turn, _, volume) = best?;
        // One job per volume: the filter only skips exact checks that
        // would have passed.
        debug_assert!(!self.running(volume), "a second job for a volume");
        self.last_host = last.wrapping_add(turn).wrapping_add(1);
        let mut job = Job {
            volume,
            target_size: 0,
            urgent: false,
        };
        for e in self
            .entries
            .iter_mut()
            .filter(|e| e.request.volume == volume && e.state == EntryState::Queued)
        {
            e.state = EntryState::Running;
            job.target_size = job.target_size.max(e.request.target_size);
            job.urgent |= e.request.paused;
        }
        debug_assert!(self.running(volume), "a job without a running entry");
        self.check_after_change();
        Some(job)
    }
}

/// Whether a host can have written a request at `host_id` and `slot`.
fn in_range(host_id: HostId, slot: Slot) -> bool {
    (1..=MAX_HOSTS).contains(&host_id.get()) && (1..=SLOTS_PER_AREA).contains(&slot.get())
}

/// Words of the running-volume filter of [`RequestQueue::next_job`]
/// (1024 bits, 128 bytes of stack).
const FILTER_WORDS: usize = 16;

/// A volume's bit in the running-volume filter. Volume ids are random, so
/// their first bytes spread well; any id maps somewhere, and a collision
/// only costs an exact check.
fn filter_bit(volume: &Uuid) -> (usize, u64) {
    let h = usize::from(volume.0[0]) | (usize::from(volume.0[1] ^ volume.0[15]) << 8);
    ((h >> 6) % FILTER_WORDS, 1u64 << (h & 63))
}

/// An extension job for the backend: make `volume` at least `target_size`
/// bytes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Job {
    /// The volume.
    pub volume: Uuid,
    /// The largest target queued for it.
    pub target_size: u64,
    /// A guest waiting for it is paused.
    pub urgent: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Generation;

    fn req(host_id: u16, slot: u16, volume: u8, target_gib: u64, paused: bool) -> Request {
        Request {
            domain: Uuid([1; 16]),
            host_id: HostId::new(host_id),
            slot: Slot::new(slot),
            generation: Generation::new(1),
            sequence: u64::from(slot),
            volume: Uuid([volume; 16]),
            target_size: target_gib << 30,
            current_size: 0,
            paused,
        }
    }

    #[test]
    fn a_full_queue_refuses_and_the_request_stays_on_disk() {
        let mut q: RequestQueue<2> = RequestQueue::new(8);
        assert_eq!(q.offer(req(1, 1, 1, 1, false)), Ok(Offered::New));
        assert_eq!(q.offer(req(2, 1, 2, 1, false)), Ok(Offered::New));
        assert_eq!(q.offer(req(3, 1, 3, 1, false)), Err(Refused::Full));
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn a_host_id_or_slot_no_host_has_is_refused_and_changes_nothing() {
        let mut q: RequestQueue<8> = RequestQueue::new(8);
        for (host, slot) in [(MAX_HOSTS + 1, 1), (u16::MAX, 1), (0, 1), (1, 0), (1, 32)] {
            // Twice: an entry left uncounted would be queued again.
            for _ in 0..2 {
                assert_eq!(
                    q.offer(req(host, slot, 1, 1, false)),
                    Err(Refused::OutOfRange),
                    "host {host} slot {slot}"
                );
            }
        }
        assert!(q.is_empty());
        assert_eq!(q.host_entries(HostId::new(MAX_HOSTS + 1)), 0);
        assert_eq!(q.offer(req(MAX_HOSTS, 31, 1, 1, false)), Ok(Offered::New));
        assert_eq!(q.host_entries(HostId::new(MAX_HOSTS)), 1);
        q.check_invariants().unwrap();
    }

    #[test]
    fn check_invariants_finds_wrong_counts_caps_and_duplicates() {
        let mut q: RequestQueue<8> = RequestQueue::new(2);
        q.offer(req(1, 1, 1, 1, false)).unwrap();
        q.offer(req(1, 2, 2, 1, false)).unwrap();
        q.check_invariants().unwrap();

        let mut counted = RequestQueue::<8>::new(2);
        counted.entries = q.entries.clone();
        counted.per_host = q.per_host;
        counted.per_host[1] = 1;
        assert_eq!(
            counted.check_invariants(),
            Err(QueueInvariant::HostCount {
                host_id: HostId::new(1)
            })
        );
        counted.per_host[1] = 2;
        counted.per_host[7] = 1;
        assert_eq!(
            counted.check_invariants(),
            Err(QueueInvariant::HostCount {
                host_id: HostId::new(7)
            })
        );

        let mut capped = RequestQueue::<8>::new(1);
        capped.entries = q.entries.clone();
        capped.per_host = q.per_host;
        assert_eq!(
            capped.check_invariants(),
            Err(QueueInvariant::HostCap {
                host_id: HostId::new(1)
            })
        );

        let mut twice = RequestQueue::<8>::new(2);
        twice.entries = q.entries.clone();
        twice.per_host = q.per_host;
        twice.entries[1].request.slot = Slot::new(1);
        assert_eq!(
            twice.check_invariants(),
            Err(QueueInvariant::Duplicate {
                host_id: HostId::new(1),
                slot: Slot::new(1)
            })
        );
        twice.entries[1].request.host_id = HostId::new(MAX_HOSTS + 1);
        assert_eq!(
            twice.check_invariants(),
            Err(QueueInvariant::OutOfRange {
                host_id: HostId::new(MAX_HOSTS + 1),
                slot: Slot::new(1)
            })
        );
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "request queue invariant broken")]
    fn debug_builds_assert_the_invariants_after_a_change() {
        let mut q: RequestQueue<8> = RequestQueue::new(4);
        q.offer(req(1, 1, 1, 1, false)).unwrap();
        q.offer(req(2, 1, 2, 1, false)).unwrap();
        // A count gone wrong behind the queue's back...
        q.per_host[2] = 3;
        // ...is caught by the next change.
        q.remove(HostId::new(1), Slot::new(1));
    }

    #[test]
    fn one_host_cannot_take_more_than_its_cap() {
        let mut q: RequestQueue<8> = RequestQueue::new(2);
        assert!(q.offer(req(1, 1, 1, 1, false)).is_ok());
        assert!(q.offer(req(1, 2, 2, 1, false)).is_ok());
        assert_eq!(q.offer(req(1, 3, 3, 1, false)), Err(Refused::HostCap));
        assert_eq!(q.offer(req(2, 1, 4, 1, false)), Ok(Offered::New));
    }

    #[test]
    fn offering_the_same_request_again_is_harmless() {
        let mut q: RequestQueue<4> = RequestQueue::new(4);
        q.offer(req(1, 1, 1, 1, false)).unwrap();
        assert_eq!(q.offer(req(1, 1, 1, 1, true)), Ok(Offered::Known));
        assert_eq!(q.len(), 1);
        assert!(
            q.entries()[0].request.paused,
            "a resend with PAUSED raises the priority"
        );
    }

    #[test]
    fn a_rewritten_slot_replaces_the_old_request() {
        let mut q: RequestQueue<4> = RequestQueue::new(4);
        q.offer(req(1, 1, 1, 1, false)).unwrap();
        let mut newer = req(1, 1, 1, 2, false);
        newer.sequence = 9;
        assert_eq!(q.offer(newer), Ok(Offered::Replaced));
        assert_eq!(q.len(), 1);
        assert_eq!(q.entries()[0].request.sequence, 9);
    }

    #[test]
    fn requests_for_one_volume_become_one_job_with_the_largest_target() {
        let mut q: RequestQueue<4> = RequestQueue::new(4);
        q.offer(req(1, 1, 7, 2, false)).unwrap();
        q.offer(req(2, 1, 7, 5, false)).unwrap();
        let job = q.next_job().unwrap();
        assert_eq!((job.volume, job.target_size), (Uuid([7; 16]), 5 << 30));
        assert!(q.entries().iter().all(|e| e.state == EntryState::Running));
        assert_eq!(q.next_job(), None, "one job per volume");
    }

    #[test]
    fn paused_guests_are_served_first() {
        let mut q: RequestQueue<4> = RequestQueue::new(4);
        q.offer(req(1, 1, 1, 1, false)).unwrap();
        q.offer(req(2, 1, 2, 1, true)).unwrap();
        assert_eq!(q.next_job().unwrap().volume, Uuid([2; 16]));
        assert!(q.next_job().is_some());
    }

    #[test]
    fn hosts_take_turns() {
        let mut q: RequestQueue<16> = RequestQueue::new(4);
        for slot in 1..=3 {
            q.offer(req(1, slot, slot as u8, 1, false)).unwrap();
        }
        q.offer(req(2, 1, 10, 1, false)).unwrap();
        q.offer(req(3, 1, 11, 1, false)).unwrap();
        let order: heapless::Vec<u8, 5> = core::iter::from_fn(|| q.next_job())
            .map(|j| j.volume.0[0])
            .collect();
        // Host 1, then 2 and 3 get their turn before host 1's second request.
        assert_eq!(order.as_slice(), &[1, 10, 11, 2, 3]);
    }

    /// The policy as first written, a pass over the queue per candidate:
    /// `next_job` must pick the same volume.
    fn reference_pick<const N: usize>(q: &RequestQueue<N>) -> Option<Uuid> {
        let e = q.entries();
        e.iter()
            .filter(|c| c.state == EntryState::Queued)
            .filter(|c| {
                !e.iter()
                    .any(|o| o.request.volume == c.request.volume && o.state == EntryState::Running)
            })
            .min_by_key(|c| {
                (
                    !c.request.paused,
                    c.request
                        .host_id
                        .get()
                        .wrapping_sub(q.last_host)
                        .wrapping_sub(1),
                    c.arrival,
                )
            })
            .map(|c| c.request.volume)
    }

    #[test]
    fn the_running_filter_never_changes_which_job_is_next() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..200 {
            let mut q: RequestQueue<64> = RequestQueue::new(8);
            for _ in 0..64 {
                // Few distinct first bytes: many filter collisions.
                let mut r = req(
                    1 + rand(12) as u16,
                    1 + rand(31) as u16,
                    0,
                    1 + rand(4),
                    rand(5) == 0,
                );
                r.volume = Uuid([rand(4) as u8; 16]);
                r.volume.0[15] = rand(40) as u8;
                let _ = q.offer(r);
            }
            while !q.is_empty() {
                q.check_invariants().unwrap();
                for h in 0..=12u16 {
                    let n = q
                        .entries()
                        .iter()
                        .filter(|e| e.request.host_id == HostId::new(h))
                        .count();
                    assert_eq!(q.host_entries(HostId::new(h)), n, "host {h}'s count");
                }
                let expected = reference_pick(&q);
                let job = q.next_job();
                assert_eq!(job.map(|j| j.volume), expected);
                if job.is_none() || rand(3) == 0 {
                    // A job finishes: its entries leave.
                    if let Some(v) = q
                        .entries()
                        .iter()
                        .find(|e| e.state == EntryState::Running)
                        .map(|e| e.request.volume)
                    {
                        while let Some(e) = q.entries().iter().find(|e| e.request.volume == v) {
                            let (h, s) = (e.request.host_id, e.request.slot);
                            q.remove(h, s);
                        }
                    } else if job.is_none() {
                        break;
                    }
                }
            }
        }
    }
}
