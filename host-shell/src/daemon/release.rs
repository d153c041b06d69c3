//! Which hosts are live, which volumes they hold open, and how far they
//! have acknowledged released extents: what the SPM needs before it
//! deletes or reduces a volume, and before it hands out extents it took
//! from one (docs/protocol.md, "Holding volumes and releasing extents").
//!
//! Everything here comes from the hosts' inbox areas: the inbox header's
//! builtin lease (`heartbeat`, `heartbeat_interval_ms`) and `release_ack`,
//! and the hold records in the slots. A host counts as *live* while its
//! lease may be held:
//!
//! - a header with a heartbeat interval is live from the first time it is
//!   seen until its heartbeat has stood still for [`LEASE_EXPIRY`]
//!   intervals (a host seen once is live: nothing says it is dead yet);
//! - a header without one (the host stopped cleanly, or holds its id
//!   through sanlock) is live if sanlock says so, when the hosts use
//!   sanlock; otherwise while it lists any hold record (a host that
//!   stops cleanly removes its holds).
//!
//! A live host must acknowledge every release; a host that is not live
//! holds no map (a stopped host's volumes are closed; a dead host's lease
//! has expired, and a new process for its id starts from fresh maps).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use spmbox_core::wire::{AREA_SIZE, Geometry, HoldArea, HostId, SlotState, Uuid};

use crate::backend::BackendError;
use crate::io::mailbox::Mailbox;

/// A builtin lease expires when its heartbeat has not moved for this many
/// heartbeat intervals (the same rule an SPM's lease follows).
pub const LEASE_EXPIRY: f64 = 2.5;

/// What one read of a host's inbox area says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSeen {
    /// The host.
    pub host: u16,
    /// Its generation (inbox header).
    pub generation: u64,
    /// Its builtin lease's heartbeat and interval.
    pub heartbeat: u64,
    /// 0: no builtin lease.
    pub interval_ms: u32,
    /// The newest release it has acknowledged.
    pub release_ack: u64,
    /// The volumes its hold records of its current generation list.
    pub holds: Vec<Uuid>,
}

/// Reads every host area of an image of the inbox region (`max_hosts`
/// areas from the inbox's first byte). Hosts whose header is missing or
/// defective are left out: they have never started, or their header will
/// be rewritten by their next write (and until then they hold nothing the
/// SPM can see; a host writes its holds before it opens a volume).
pub fn read_hosts(inbox: &[u8], geometry: Geometry, domain: Uuid) -> Vec<HostSeen> {
    let mut out = Vec::new();
    for host in 1..=geometry.max_hosts() {
        let at = usize::from(host - 1) * AREA_SIZE;
        let Some(bytes) = inbox.get(at..at + AREA_SIZE) else {
            break;
        };
        let Some(area) = HoldArea::new(bytes, domain, HostId::new(host)) else {
            continue;
        };
        let Ok(Some(h)) = area.header() else {
            continue;
        };
        // Valid holds are those of the header's generation; stale ones
        // (an earlier incarnation's) hold nothing.
        let mut holds = Vec::new();
        for (_, state) in area.slots() {
            if let SlotState::Valid(hold) = state {
                holds.extend_from_slice(hold.held());
            }
        }
        holds.sort();
        holds.dedup();
        out.push(HostSeen {
            host,
            generation: h.generation.get(),
            heartbeat: h.heartbeat,
            interval_ms: h.heartbeat_interval_ms,
            release_ack: h.release_ack,
            holds,
        });
    }
    out
}

/// [`read_hosts`] of the inbox region of `mailbox`, read at once.
pub fn read_mailbox_hosts(mailbox: &Mailbox) -> Result<Vec<HostSeen>, BackendError> {
    let g = mailbox.geometry();
    let first = g.inbox_area(HostId::new(1)).unwrap_or(0);
    let image = mailbox.read(first, usize::from(g.max_hosts()) * AREA_SIZE)?;
    Ok(read_hosts(&image, g, mailbox.superblock().domain))
}

#[derive(Debug, Clone)]
struct Track {
    seen: HostSeen,
    /// When its heartbeat (or generation) was last seen to change, or
    /// first seen.
    moved_at: Instant,
}

/// Live hosts, their holds and acknowledgements, over successive reads.
#[derive(Debug, Default)]
pub struct Hosts {
    tracks: HashMap<u16, Track>,
}

impl Hosts {
    /// A tracker that has seen nothing.
    pub fn new() -> Hosts {
        Hosts::default()
    }

    /// Takes in one read of every host area, made at `now`. A host missing
    /// from `seen` is forgotten.
    pub fn observe(&mut self, now: Instant, seen: Vec<HostSeen>) {
        let mut next = HashMap::with_capacity(seen.len());
        for s in seen {
            let moved_at = match self.tracks.get(&s.host) {
                Some(t)
                    if t.seen.generation == s.generation
                        && t.seen.heartbeat == s.heartbeat
                        && t.seen.interval_ms == s.interval_ms =>
                {
                    t.moved_at
                }
                _ => now,
            };
            next.insert(s.host, Track { seen: s, moved_at });
        }
        self.tracks = next;
    }

    /// Whether `host` may hold its lease at `now`. For a host that keeps no
    /// builtin lease, `leased` are the hosts the lease manager (sanlock)
    /// reports live; without it (`None`) such a host counts as live while
    /// it lists any hold (a host that stopped cleanly lists none).
    fn live(t: &Track, now: Instant, leased: Option<&BTreeSet<u16>>) -> bool {
        if t.seen.interval_ms == 0 {
            return match leased {
                Some(set) => set.contains(&t.seen.host),
                None => !t.seen.holds.is_empty(),
            };
        }
        let expiry = Duration::from_millis(u64::from(t.seen.interval_ms)).mul_f64(LEASE_EXPIRY);
        now.saturating_duration_since(t.moved_at) <= expiry
    }

    /// The hosts live at `now`, in id order.
    #[cfg(test)]
    fn live_hosts(&self, now: Instant, leased: Option<&BTreeSet<u16>>) -> Vec<u16> {
        let mut v: Vec<u16> = self
            .tracks
            .values()
            .filter(|t| Self::live(t, now, leased))
            .map(|t| t.seen.host)
            .collect();
        v.sort_unstable();
        v
    }

    /// The newest release every live host has acknowledged: the smallest
    /// `release_ack` among them, or `u64::MAX` when no host is live.
    pub fn acked(&self, now: Instant, leased: Option<&BTreeSet<u16>>) -> u64 {
        self.tracks
            .values()
            .filter(|t| Self::live(t, now, leased))
            .map(|t| t.seen.release_ack)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// The live hosts that have not acknowledged `release`, in id order.
    pub fn behind(&self, now: Instant, leased: Option<&BTreeSet<u16>>, release: u64) -> Vec<u16> {
        let mut v: Vec<u16> = self
            .tracks
            .values()
            .filter(|t| Self::live(t, now, leased) && t.seen.release_ack < release)
            .map(|t| t.seen.host)
            .collect();
        v.sort_unstable();
        v
    }

    /// The live hosts that hold `volume`, in id order.
    pub fn live_holders(
        &self,
        now: Instant,
        leased: Option<&BTreeSet<u16>>,
        volume: Uuid,
    ) -> Vec<u16> {
        let mut v: Vec<u16> = self
            .tracks
            .values()
            .filter(|t| t.seen.holds.contains(&volume) && Self::live(t, now, leased))
            .map(|t| t.seen.host)
            .collect();
        v.sort_unstable();
        v
    }
}

/// How often the SPM looks at the hosts' acknowledgements while extents
/// wait for them.
pub const RECLAIM_CHECK: Duration = Duration::from_millis(500);

/// After this long waiting for the same hosts to acknowledge a release,
/// the SPM names them in a warning (and again every this long).
pub const RECLAIM_PATIENCE: Duration = Duration::from_secs(30);

/// The longest [`HostWatch::settled_live_holders`] watches.
pub const SETTLE_MAX: Duration = Duration::from_secs(30);

/// Host ids in words: `host 2`, `hosts 2, 5`.
pub fn host_list(hosts: &[u16]) -> String {
    format!(
        "host{} {}",
        if hosts.len() == 1 { "" } else { "s" },
        hosts
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The SPM's view of the hosts, read from the mailbox (and sanlock's
/// lockspace when hosts hold their ids there) when it needs it: before a
/// delete or reduce, and while released extents wait.
pub struct HostWatch {
    hosts: Hosts,
    leased: Option<BTreeSet<u16>>,
    sanlock: Option<crate::daemon::sanlock::Area>,
    /// When the next look is due while extents wait.
    pub next_check: Instant,
    /// Since when the oldest waiting release has waited, and when the last
    /// warning about it was logged.
    waiting: Option<(u64, Instant, Instant)>,
}

impl HostWatch {
    /// A watch of the domain on `mailbox`'s device; `sanlock`: the hosts
    /// hold their ids through sanlock's lockspace there.
    pub fn new(sanlock: Option<crate::daemon::sanlock::Area>) -> HostWatch {
        HostWatch {
            hosts: Hosts::new(),
            leased: None,
            sanlock,
            next_check: Instant::now(),
            waiting: None,
        }
    }

    /// Reads every host's inbox area (one read of the inbox region) and,
    /// with sanlock, the lockspace.
    pub fn refresh(&mut self, mailbox: &Mailbox) -> Result<(), BackendError> {
        self.hosts
            .observe(Instant::now(), read_mailbox_hosts(mailbox)?);
        if let Some(area) = &self.sanlock {
            let v = crate::daemon::sanlock::holders(area, mailbox.superblock().domain)?;
            self.leased = Some(
                v["hosts"]
                    .as_array()
                    .map(|hs| {
                        hs.iter()
                            .filter_map(|h| h["host_id"].as_u64())
                            .filter_map(|h| u16::try_from(h).ok())
                            .collect()
                    })
                    .unwrap_or_default(),
            );
        }
        Ok(())
    }

    /// How long after a read of the holds a second read surely shows a
    /// later write of every host with a builtin lease: one and a half of
    /// the longest heartbeat interval the last read showed (hosts write
    /// their inbox area whole at every heartbeat), at least 100 ms.
    pub fn recheck_wait(&self) -> Duration {
        let longest = self
            .hosts
            .tracks
            .values()
            .map(|t| t.seen.interval_ms)
            .max()
            .unwrap_or(0);
        Duration::from_millis(u64::from(longest) * 3 / 2)
            .clamp(Duration::from_millis(100), SETTLE_MAX)
    }

    /// The live hosts that hold `volume`, from a fresh read.
    pub fn live_holders(
        &mut self,
        mailbox: &Mailbox,
        volume: Uuid,
    ) -> Result<Vec<u16>, BackendError> {
        self.refresh(mailbox)?;
        Ok(self
            .hosts
            .live_holders(Instant::now(), self.leased.as_ref(), volume))
    }

    /// The live hosts that hold `volume`, watched long enough to tell: if
    /// a host with a builtin lease lists it, the inbox areas are read
    /// again once that lease would have expired had the host died (at
    /// most [`SETTLE_MAX`] later), so that a dead host's holds do not
    /// count. For a command that runs without an SPM.
    pub fn settled_live_holders(
        &mut self,
        mailbox: &Mailbox,
        volume: Uuid,
    ) -> Result<Vec<u16>, BackendError> {
        let now = Instant::now();
        self.refresh(mailbox)?;
        let holders = self.hosts.live_holders(now, self.leased.as_ref(), volume);
        let longest = holders
            .iter()
            .filter_map(|h| self.hosts.tracks.get(h))
            .map(|t| t.seen.interval_ms)
            .max()
            .unwrap_or(0);
        if longest == 0 {
            return Ok(holders);
        }
        let wait = Duration::from_millis(u64::from(longest))
            .mul_f64(LEASE_EXPIRY)
            .min(SETTLE_MAX)
            + Duration::from_millis(100);
        tracing::info!(
            "volume {volume} is listed by {}: watching {} whether they are alive",
            host_list(&holders),
            crate::units::Elapsed(wait)
        );
        std::thread::sleep(wait);
        self.live_holders(mailbox, volume)
    }

    /// One look while released extents wait (`pending`: the newest
    /// release): returns the release every live host has acknowledged,
    /// and logs the hosts that hold it back once they have for
    /// [`RECLAIM_PATIENCE`].
    pub fn check(&mut self, mailbox: &Mailbox, pending: u64) -> Result<u64, BackendError> {
        let now = Instant::now();
        self.next_check = now + RECLAIM_CHECK;
        self.refresh(mailbox)?;
        let acked = self.hosts.acked(now, self.leased.as_ref());
        if acked >= pending {
            self.waiting = None;
            return Ok(acked);
        }
        let (since, warned) = match self.waiting {
            Some((p, since, warned)) if p == pending => (since, warned),
            _ => (now, now),
        };
        let mut warned_at = warned;
        if now.saturating_duration_since(warned) >= RECLAIM_PATIENCE {
            warned_at = now;
            let behind = self.hosts.behind(now, self.leased.as_ref(), pending);
            tracing::warn!(
                "extents released at commit {pending} have waited {} for host{} {} to \
                 acknowledge it (release_ack in the inbox header): a host that runs an older \
                 spmbox, or hangs, keeps them from being reused; the pool counts them as used \
                 until then",
                crate::units::Elapsed(now.saturating_duration_since(since)),
                if behind.len() == 1 { "" } else { "s" },
                behind
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        self.waiting = Some((pending, since, warned_at));
        Ok(acked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(host: u16, heartbeat: u64, interval_ms: u32, ack: u64, holds: &[u8]) -> HostSeen {
        HostSeen {
            host,
            generation: 1,
            heartbeat,
            interval_ms,
            release_ack: ack,
            holds: holds.iter().map(|&b| Uuid([b; 16])).collect(),
        }
    }

    #[test]
    fn a_host_seen_once_is_live_until_its_heartbeat_stood_still_for_the_expiry() {
        let t0 = Instant::now();
        let none = None;
        let mut hosts = Hosts::new();
        hosts.observe(t0, vec![seen(1, 5, 1000, 0, &[]), seen(2, 9, 1000, 0, &[])]);
        assert_eq!(hosts.live_hosts(t0, none), vec![1, 2]);
        // Host 1's heartbeat moves, host 2's does not.
        let t1 = t0 + Duration::from_millis(2000);
        hosts.observe(t1, vec![seen(1, 7, 1000, 0, &[]), seen(2, 9, 1000, 0, &[])]);
        assert_eq!(hosts.live_hosts(t1, none), vec![1, 2]);
        let t2 = t0 + Duration::from_millis(2600);
        hosts.observe(t2, vec![seen(1, 7, 1000, 0, &[]), seen(2, 9, 1000, 0, &[])]);
        assert_eq!(
            hosts.live_hosts(t2, none),
            vec![1],
            "host 2 stood still 2.6 s"
        );
    }

    #[test]
    fn a_host_without_a_builtin_lease_is_live_if_sanlock_says_so_or_else_while_it_holds_volumes() {
        let t0 = Instant::now();
        let mut hosts = Hosts::new();
        hosts.observe(t0, vec![seen(3, 0, 0, 0, &[7]), seen(5, 0, 0, 0, &[])]);
        let nobody = BTreeSet::new();
        assert!(hosts.live_hosts(t0, Some(&nobody)).is_empty());
        assert_eq!(hosts.acked(t0, Some(&nobody)), u64::MAX);
        let sanlock: BTreeSet<u16> = [3, 5].into();
        assert_eq!(hosts.live_hosts(t0, Some(&sanlock)), vec![3, 5]);
        assert_eq!(
            hosts.live_holders(t0, Some(&sanlock), Uuid([7; 16])),
            vec![3]
        );
        assert_eq!(hosts.acked(t0, Some(&sanlock)), 0);
        // Without sanlock: a host that lists holds is live, one that
        // lists none stopped.
        assert_eq!(hosts.live_hosts(t0, None), vec![3]);
    }

    #[test]
    fn the_acknowledged_release_is_the_smallest_among_live_hosts() {
        let t0 = Instant::now();
        let none = None;
        let mut hosts = Hosts::new();
        hosts.observe(
            t0,
            vec![
                seen(1, 1, 1000, 12, &[]),
                seen(2, 1, 1000, 10, &[1]),
                seen(4, 1, 0, 3, &[]),
            ],
        );
        assert_eq!(hosts.acked(t0, none), 10);
        assert_eq!(hosts.behind(t0, none, 11), vec![2]);
        assert_eq!(hosts.live_holders(t0, none, Uuid([1; 16])), vec![2]);
        // Host 2 dies: its lease expires, and only host 1 counts.
        let t1 = t0 + Duration::from_secs(3);
        hosts.observe(
            t1,
            vec![
                seen(1, 2, 1000, 12, &[]),
                seen(2, 1, 1000, 10, &[1]),
                seen(4, 1, 0, 3, &[]),
            ],
        );
        assert_eq!(hosts.acked(t1, none), 12);
        assert!(hosts.live_holders(t1, none, Uuid([1; 16])).is_empty());
    }
}
