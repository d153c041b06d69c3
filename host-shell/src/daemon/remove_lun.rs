//! `pool remove-lun`: every segment on a LUN is copied to other LUNs,
//! volume by volume, then the LUN leaves the pool (docs/pool-format.md
//! 6.7, docs/operations.md 4.2).
//!
//! The SPM's loop (or the command, when no SPM runs) calls
//! [`Removal::step`] once per turn: a step plans the next segment, or
//! copies at most [`COPY_CHUNK`] of it, or ends it, so that the SPM keeps
//! its heartbeat and answers `status` while it copies. While a segment is
//! being copied ([`Removal::copying`]) nothing may be allocated: the
//! destination extents are free in the pool until the move is committed.
//!
//! Before the first extent of a volume is copied, the pool is committed
//! naming the volume as *moving*, and only then are the hosts' hold
//! records read: a host that opens a volume writes its hold first and then
//! reads the pool, so either the SPM sees the hold and stops, or the host
//! sees the volume moving and waits for the new map.

use serde_json::{Value, json};
use spmbox_core::wire::Uuid;

use crate::backend::builtin::COPY_CHUNK;
use crate::backend::{BackendError, LunMover, Relocation};
use crate::daemon::release::host_list;
use crate::daemon::spm::LiveHolders;
use crate::units::{Bytes, Elapsed};

/// How often a removal whose segments all moved tries to drop the LUN
/// while released extents on it wait for the hosts' acknowledgements.
const DROP_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// Where a removal is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Segments are being moved off the LUN.
    Moving,
    /// Every segment moved; the old extents wait until every live host
    /// acknowledged their release, then the LUN is dropped.
    Reclaiming,
    /// The LUN left the pool.
    Done,
    /// It stopped; the LUN stays in the pool (no longer draining) and the
    /// segments moved so far stay where they went.
    Failed(String),
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Moving => "moving",
            State::Reclaiming => "reclaiming",
            State::Done => "done",
            State::Failed(_) => "failed",
        }
    }
}

/// How far a removal is, from its [`Removal::report`]: `12 of 40 extents
/// moved (48.0 MiB of 160 MiB), copying volume V: 8.0 MiB of 32.0 MiB`.
pub fn progress_words(r: &Value) -> String {
    let extent = r["extent_size"].as_u64().unwrap_or(0);
    let (moved, total) = (
        r["moved_extents"].as_u64().unwrap_or(0),
        r["total_extents"].as_u64().unwrap_or(0),
    );
    let mut words = format!(
        "{moved} of {total} extents moved ({} of {})",
        Bytes(moved * extent),
        Bytes(total * extent)
    );
    if let Some(c) = r.get("copying") {
        words.push_str(&format!(
            ", copying volume {}: {} of {}",
            c["volume"].as_str().unwrap_or("?"),
            Bytes(c["done_bytes"].as_u64().unwrap_or(0)),
            Bytes(c["bytes"].as_u64().unwrap_or(0))
        ));
    }
    words
}

/// Refuses to go on moving `volume` when `hosts` (live ones) hold it.
fn refuse_held(volume: Uuid, hosts: Vec<u16>) -> Result<(), BackendError> {
    if hosts.is_empty() {
        return Ok(());
    }
    Err(BackendError::new(format!(
        "{} opened volume {volume} (it has extents on the LUN) while the LUN was being \
         emptied; stop that guest, then run this again",
        host_list(&hosts)
    )))
}

/// One `pool remove-lun`, from its start to its end.
#[derive(Debug)]
pub struct Removal {
    /// The LUN.
    pub lun: Uuid,
    extent_size: u64,
    /// Extents volumes held on the LUN when it started.
    pub total: u64,
    /// Extents moved so far.
    pub moved: u64,
    /// Segments moved so far.
    pub segments: u64,
    /// The segment being copied and the bytes of it copied so far.
    copy: Option<(Relocation, u64)>,
    /// The volume named moving whose holds are read a second time at
    /// this instant, before its first copy.
    recheck: Option<(Uuid, std::time::Instant)>,
    /// Where it is.
    pub state: State,
    started: std::time::Instant,
    next_drop: std::time::Instant,
}

impl Removal {
    /// Checks that LUN `lun` (its UUID or the path of its device) can be
    /// removed and marks it draining; refuses, changing nothing, when it is
    /// the only LUN, when the other LUNs lack the free extents for what it
    /// holds, or when a live host holds a volume with a segment on it.
    pub fn start(
        mover: &mut dyn LunMover,
        lun: &str,
        luns: usize,
        holders: LiveHolders<'_>,
    ) -> Result<Removal, BackendError> {
        let (index, id) = mover.find_lun(lun)?;
        if luns < 2 {
            return Err(BackendError::new(format!(
                "cannot remove LUN {id}: it is the pool's only LUN, and its volumes would have \
                 nowhere to go. Add another LUN first (`spmbox pool add-lun`). Nothing was changed"
            )));
        }
        let extent = mover.extent_size();
        let (held, free) = mover.room(index);
        if held > free {
            return Err(BackendError::new(format!(
                "cannot remove LUN {id}: its volumes hold {held} extents ({}), and the other \
                 LUNs have {free} free ({}). Add a LUN (`spmbox pool add-lun`), or delete or \
                 reduce volumes, then run this again. Nothing was changed",
                Bytes(held * extent),
                Bytes(free * extent)
            )));
        }
        let mut held_by = Vec::new();
        for volume in mover.volumes_on(index) {
            let hosts = holders(volume)?;
            if !hosts.is_empty() {
                held_by.push(format!("{volume} ({})", host_list(&hosts)));
            }
        }
        if !held_by.is_empty() {
            return Err(BackendError::new(format!(
                "cannot remove LUN {id}: live hosts hold volumes with extents on it open, and \
                 their guests write through maps that name this LUN: {}. Stop those VMs (or \
                 the `spmbox host` daemons that run them), then run this again; a host that \
                 died holds nothing once its lease has expired. Nothing was changed",
                held_by.join("; ")
            )));
        }
        mover.set_draining(index, true)?;
        let now = std::time::Instant::now();
        tracing::info!(
            "removing LUN {id}: {held} extents ({}) of {} volumes to move",
            Bytes(held * extent),
            mover.volumes_on(index).len()
        );
        Ok(Removal {
            lun: id,
            extent_size: extent,
            total: held,
            moved: 0,
            segments: 0,
            copy: None,
            recheck: None,
            state: if held == 0 {
                State::Reclaiming
            } else {
                State::Moving
            },
            started: now,
            next_drop: now,
        })
    }

    /// Whether a segment is being copied: nothing may be allocated until
    /// the next step that ends it.
    pub fn copying(&self) -> bool {
        self.copy.is_some()
    }

    /// Whether it has ended (done or failed).
    pub fn ended(&self) -> bool {
        matches!(self.state, State::Done | State::Failed(_))
    }

    /// Whether the next step has work to do at once (not a wait for the
    /// second read of the holds, or for acknowledgements).
    pub fn busy(&self) -> bool {
        self.state == State::Moving && self.recheck.is_none()
    }

    /// One step; an error ends the removal ([`State::Failed`]) after the
    /// LUN stops draining and no volume is named as moving any more.
    /// `recheck`: how long after the first read of a volume's holds (once
    /// it is named moving) they are read again before its first copy, so
    /// that a hold record a torn or late write hid from the first read is
    /// seen in a later whole write of the host's area.
    pub fn step(
        &mut self,
        mover: &mut dyn LunMover,
        recheck: std::time::Duration,
        holders: LiveHolders<'_>,
    ) {
        if self.ended() {
            return;
        }
        if let Err(e) = self.try_step(mover, recheck, holders) {
            let mut message = format!(
                "removing LUN {} stopped after {} of {} extents moved: {e}",
                self.lun, self.moved, self.total
            );
            self.copy = None;
            self.recheck = None;
            if !mover.moving().is_nil()
                && let Err(e) = mover.set_moving(Uuid::NIL)
            {
                message.push_str(&format!(
                    "; the pool still names a volume as moving ({e}), so hosts do not open it \
                     until an SPM starts or this command runs again"
                ));
            }
            if let Ok((index, _)) = mover.find_lun(&self.lun.to_string()) {
                let _ = mover.set_draining(index, false);
            }
            message.push_str(
                ". The LUN stays in the pool; what moved stays moved, and running this again \
                 goes on from there",
            );
            tracing::error!("{message}");
            self.state = State::Failed(message);
        }
    }

    fn try_step(
        &mut self,
        mover: &mut dyn LunMover,
        recheck: std::time::Duration,
        holders: LiveHolders<'_>,
    ) -> Result<(), BackendError> {
        let (index, _) = mover.find_lun(&self.lun.to_string())?;
        match self.state {
            State::Moving => {}
            State::Reclaiming => {
                let now = std::time::Instant::now();
                if now >= self.next_drop {
                    self.next_drop = now + DROP_RETRY;
                    if mover.drop_lun(index)? {
                        tracing::info!(
                            "LUN {} removed from the pool: {} extents of {} segments moved in {}",
                            self.lun,
                            self.moved,
                            self.segments,
                            Elapsed(self.started.elapsed())
                        );
                        self.state = State::Done;
                    }
                }
                return Ok(());
            }
            State::Done | State::Failed(_) => return Ok(()),
        }
        if let Some((r, done)) = self.copy.take() {
            let bytes = u64::from(r.from.extents) * self.extent_size;
            let done = done + mover.copy(&r, done, COPY_CHUNK)?;
            if done < bytes {
                self.copy = Some((r, done));
                return Ok(());
            }
            // The copy is whole: the move is committed with the volume
            // still named moving, and the name goes once its last segment
            // on the LUN has moved.
            mover.finish_move(&r, r.volume)?;
            self.moved += u64::from(r.from.extents);
            self.segments += 1;
            tracing::info!(
                "volume {}: {} moved from LUN {} to another LUN ({} of {} extents moved)",
                r.volume,
                Bytes(bytes),
                self.lun,
                self.moved,
                self.total
            );
            let next = mover.next_move(index).ok().flatten();
            if next.is_none_or(|n| n.volume != r.volume) {
                mover.set_moving(Uuid::NIL)?;
            }
            return Ok(());
        }
        let Some(r) = mover.next_move(index)? else {
            if !mover.moving().is_nil() {
                mover.set_moving(Uuid::NIL)?;
            }
            self.state = State::Reclaiming;
            return Ok(());
        };
        let now = std::time::Instant::now();
        if mover.moving() != r.volume {
            // Named first (committed), then the holds are read, and read
            // again once every host wrote its area anew.
            mover.set_moving(r.volume)?;
            refuse_held(r.volume, holders(r.volume)?)?;
            self.recheck = Some((r.volume, now + recheck));
            return Ok(());
        }
        match self.recheck {
            Some((v, at)) if v == r.volume && now < at => return Ok(()),
            Some((v, _)) if v == r.volume => {
                refuse_held(r.volume, holders(r.volume)?)?;
                self.recheck = None;
            }
            _ => {}
        }
        self.copy = Some((r, 0));
        Ok(())
    }

    /// Where it is, for `status` and the command's progress.
    pub fn report(&self) -> Value {
        let mut v = json!({
            "lun": self.lun.to_string(),
            "state": self.state.name(),
            "total_extents": self.total,
            "moved_extents": self.moved,
            "moved_segments": self.segments,
            "extent_size": self.extent_size,
            "seconds": self.started.elapsed().as_secs_f64(),
        });
        if let Some((r, done)) = &self.copy {
            v["copying"] = json!({
                "volume": r.volume.to_string(),
                "done_bytes": done,
                "bytes": u64::from(r.from.extents) * self.extent_size,
            });
        }
        if let State::Failed(e) = &self.state {
            v["error"] = json!(e);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spmbox_core::pool::Segment;
    use std::cell::Cell;
    use std::rc::Rc;
    use std::time::Duration;

    const LUN: Uuid = Uuid([0x11; 16]);
    const V: Uuid = Uuid([0x22; 16]);

    /// One volume of 4 extents on LUN 0, which moves to LUN 1.
    struct Fake {
        moving: Rc<Cell<Uuid>>,
        draining: bool,
        moved: bool,
        dropped: bool,
    }

    impl LunMover for Fake {
        fn find_lun(&self, _: &str) -> Result<(u16, Uuid), BackendError> {
            Ok((0, LUN))
        }
        fn set_draining(&mut self, _: u16, draining: bool) -> Result<(), BackendError> {
            self.draining = draining;
            Ok(())
        }
        fn room(&self, _: u16) -> (u64, u64) {
            (if self.moved { 0 } else { 4 }, 10)
        }
        fn volumes_on(&self, _: u16) -> Vec<Uuid> {
            if self.moved { vec![] } else { vec![V] }
        }
        fn next_move(&self, _: u16) -> Result<Option<Relocation>, BackendError> {
            Ok((!self.moved).then_some(Relocation {
                volume: V,
                segment: 0,
                from: Segment {
                    lun: 0,
                    first_extent: 0,
                    extents: 4,
                },
                to: Segment {
                    lun: 1,
                    first_extent: 0,
                    extents: 4,
                },
            }))
        }
        fn set_moving(&mut self, volume: Uuid) -> Result<(), BackendError> {
            self.moving.set(volume);
            Ok(())
        }
        fn moving(&self) -> Uuid {
            self.moving.get()
        }
        fn copy(&mut self, r: &Relocation, done: u64, max: u64) -> Result<u64, BackendError> {
            Ok((u64::from(r.from.extents) * self.extent_size() - done).min(max))
        }
        fn finish_move(&mut self, _: &Relocation, after: Uuid) -> Result<(), BackendError> {
            self.moved = true;
            self.moving.set(after);
            Ok(())
        }
        fn drop_lun(&mut self, _: u16) -> Result<bool, BackendError> {
            self.dropped = true;
            Ok(true)
        }
        fn extent_size(&self) -> u64 {
            16 << 20
        }
    }

    fn fake() -> Fake {
        Fake {
            moving: Rc::new(Cell::new(Uuid::NIL)),
            draining: false,
            moved: false,
            dropped: false,
        }
    }

    /// Runs steps until the removal ends (at most 1000); `holders` is asked
    /// with the number of the read.
    fn run(mover: &mut Fake, mut holders: impl FnMut(usize, Uuid) -> Vec<u16>) -> Removal {
        let mut reads = 0;
        let mut r = Removal::start(mover, "lun", 2, &mut |v| {
            reads += 1;
            Ok(holders(reads, v))
        })
        .unwrap();
        for _ in 0..1000 {
            r.step(mover, Duration::from_millis(1), &mut |v| {
                reads += 1;
                Ok(holders(reads, v))
            });
            if r.ended() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        r
    }

    #[test]
    fn the_holds_are_read_twice_after_the_volume_is_named_moving_and_it_then_moves() {
        let mut mover = fake();
        let moving = mover.moving.clone();
        let mut seen = Vec::new();
        let r = run(&mut mover, |n, v| {
            seen.push((n, moving.get() == v));
            vec![]
        });
        assert_eq!(r.state, State::Done);
        assert!(mover.moved && mover.dropped);
        assert!(mover.moving.get().is_nil());
        assert_eq!(r.moved, 4);
        // Read 1 at the start (not named yet), reads 2 and 3 with it named.
        assert_eq!(seen, vec![(1, false), (2, true), (3, true)]);
    }

    #[test]
    fn a_hold_seen_only_by_the_second_read_stops_the_removal_before_any_copy() {
        let mut mover = fake();
        let r = run(&mut mover, |n, _| if n == 3 { vec![7] } else { vec![] });
        let State::Failed(e) = &r.state else {
            panic!("{:?}", r.state)
        };
        assert!(e.contains("host 7 opened volume"), "{e}");
        assert!(!mover.moved && !mover.draining && !mover.dropped);
        assert!(mover.moving.get().is_nil(), "the name is cleared");
    }

    #[test]
    fn a_held_volume_is_refused_at_the_start_and_nothing_changes() {
        let mut mover = fake();
        let e = Removal::start(&mut mover, "lun", 2, &mut |_| Ok(vec![2, 5])).unwrap_err();
        assert!(e.to_string().contains("(hosts 2, 5)"), "{e}");
        assert!(!mover.draining && mover.moving.get().is_nil());
        let e = Removal::start(&mut mover, "lun", 1, &mut |_| Ok(vec![])).unwrap_err();
        assert!(e.to_string().contains("only LUN"), "{e}");
    }
}
