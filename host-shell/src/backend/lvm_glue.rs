//! The lvm backend: volumes are LVs of a real lvm2 volume group.
//!
//! An LV is named by its volume's UUID and carries its virtual size in a
//! tag (`spmbox_virtual_<bytes>`); its limit follows the builtin pool's
//! rule ([`spmbox_core::pool::max_size`]). The SPM extends with `lvextend`
//! to the absolute size; lvm2 writes its metadata before `lvextend`
//! returns, so [`SpmBackend::commit`] has nothing left to do. Requests
//! that do not fit the free extents are parked in the SPM's memory (one
//! per volume, the largest target kept) and served, urgent first, when a
//! PV is added or `vgs` shows more free extents at a full scan. A
//! restarted SPM rebuilds them from the mailbox, where they stay until
//! answered; a request its host withdraws from the mailbox leaves the
//! parked list (or lowers its target) as soon as the SPM reads that.
//!
//! Hosts read an LV's map from lvm2's segment report and the PVs' first
//! extent (metadata-only mode), or, with device-mapper, activate the LV,
//! run `lvchange --refresh` and write through `/dev/<vg>/<lv>`.

use std::path::{Path, PathBuf};

use spmbox_core::pool::{max_size, valid_extent_size};
use spmbox_core::spm::{JobResult, errno};
use spmbox_core::wire::Uuid;

use crate::backend::builtin::CreateOptions;
use crate::backend::lvm::{LvInfo, Lvm, VgInfo};
use crate::backend::{BackendError, PoolReport, PoolUsage, SpmBackend, VolumeMaps, VolumeReport};
use crate::io::mailbox;
use crate::io::mapping::{Mapping, Run};
use crate::units::Bytes;

/// The tag prefix that records a volume's virtual size.
pub const VIRTUAL_TAG: &str = "spmbox_virtual_";

/// Parked requests the SPM keeps at most; more are answered EAGAIN and
/// stay in the mailbox for a later scan.
pub const MAX_PARKED: usize = 1024;

/// A volume as the lvm backend knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lv {
    id: Uuid,
    size: u64,
    virtual_size: u64,
    limit: u64,
}

fn lv_of(info: &LvInfo, extent_size: u64) -> Option<Lv> {
    let id = Uuid::parse_str(&info.name)?;
    let virtual_size = info
        .tags
        .iter()
        .find_map(|t| t.strip_prefix(VIRTUAL_TAG)?.parse::<u64>().ok())?;
    Some(Lv {
        id,
        size: info.size,
        virtual_size,
        limit: max_size(virtual_size, extent_size)?,
    })
}

#[derive(Debug, Clone, Copy)]
struct Parked {
    volume: Uuid,
    target: u64,
    urgent: bool,
    order: u64,
}

/// Whether two paths name the same device (symlinks such as
/// `/dev/disk/by-id/...` resolved).
fn same_device(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The SPM's side of the lvm backend.
#[derive(Debug)]
pub struct LvmSpm {
    lvm: Lvm,
    vg: VgInfo,
    volumes: Vec<Lv>,
    parked: Vec<Parked>,
    next_order: u64,
    completed: Vec<(Uuid, u64)>,
    /// LVs that hold released extents until hosts acknowledge: (release,
    /// name, extents).
    released: Vec<(u64, String, u64)>,
    /// The newest release number given out (or read from the SPM header).
    release_seq: u64,
    /// Discard a released LV's extents before it is removed.
    discard: bool,
}

/// The name prefix of an LV that holds extents released from a volume
/// (deleted, or the tail of a reduced one) until every live host has
/// acknowledged the release: `spmbox_released_<release>_<volume>[_tail]`.
/// lvm2 hands out an LV's extents as soon as it is removed, so the SPM
/// keeps them in such an LV until then.
pub const RELEASED_PREFIX: &str = "spmbox_released_";

/// The release number of a released LV's name.
fn released_seq(name: &str) -> Option<u64> {
    name.strip_prefix(RELEASED_PREFIX)?
        .split('_')
        .next()?
        .parse()
        .ok()
}

/// Opens the SPM's lvm backend on volume group `vg` with PVs `pvs`.
pub fn spm_backend(vg: &str, pvs: &[PathBuf]) -> Result<Box<dyn SpmBackend>, BackendError> {
    Ok(Box::new(LvmSpm::open(vg, pvs)?))
}

/// Opens a host's lvm backend on volume group `vg`; `pvs` must name every
/// device that is or may become a PV of it.
pub fn maps(vg: &str, pvs: &[PathBuf]) -> Result<Box<dyn VolumeMaps>, BackendError> {
    Ok(Box::new(LvmMaps::open(vg, pvs)?))
}

impl LvmSpm {
    /// Loads the volume group `vg` and its spmbox volumes.
    pub fn open(vg: &str, pvs: &[PathBuf]) -> Result<LvmSpm, BackendError> {
        let lvm = Lvm::new(vg, pvs)?;
        let info = lvm.vg_info()?;
        let mut spm = LvmSpm {
            lvm,
            vg: info,
            volumes: Vec::new(),
            parked: Vec::new(),
            next_order: 0,
            completed: Vec::new(),
            released: Vec::new(),
            release_seq: 0,
            discard: false,
        };
        spm.reload()?;
        Ok(spm)
    }

    fn reload(&mut self) -> Result<(), BackendError> {
        self.vg = self.lvm.vg_info()?;
        let extent = self.vg.extent_size;
        let infos = self.lvm.lv_infos(None)?;
        self.volumes = infos.iter().filter_map(|i| lv_of(i, extent)).collect();
        self.released = infos
            .iter()
            .filter_map(|i| Some((released_seq(&i.name)?, i.name.clone(), i.size / extent)))
            .collect();
        self.released.sort();
        if let Some((seq, _, _)) = self.released.last() {
            self.release_seq = self.release_seq.max(*seq);
        }
        Ok(())
    }

    /// Discards the extents of LV `name` on its PVs (before it is
    /// removed); what fails is logged.
    fn discard_lv(&self, name: &str) {
        let result = (|| -> Result<u64, BackendError> {
            let pvs = self.lvm.pv_infos()?;
            let mut bytes = 0;
            for seg in self.lvm.segments(name)? {
                for r in seg.ranges {
                    let pv = pvs.iter().find(|p| p.name == r.pv).ok_or_else(|| {
                        BackendError::new(format!("PV {} is not among --pv", r.pv.display()))
                    })?;
                    let len = r.count * self.vg.extent_size;
                    crate::io::discard::discard(
                        &r.pv,
                        pv.pe_start + r.first * self.vg.extent_size,
                        len,
                    )?;
                    bytes += len;
                }
            }
            Ok(bytes)
        })();
        match result {
            Ok(bytes) => tracing::info!("discarded {} of released LV {name}", Bytes(bytes)),
            Err(e) => tracing::warn!("discarding released LV {name} failed: {e}"),
        }
    }

    /// Refuses to take extents from `id` while a request for it is parked
    /// (its host holds it and waits for it to grow).
    fn refuse_parked(&self, id: Uuid, what: &str) -> Result<Lv, BackendError> {
        let v = self.volume(id).copied().ok_or_else(|| {
            BackendError::new(format!(
                "cannot {what} volume {id}: volume group {} has no such volume \
                 (`spmbox volume list` shows them). Nothing was changed",
                self.lvm.vg()
            ))
        })?;
        if self.parked.iter().any(|p| p.volume == id) {
            return Err(BackendError::new(format!(
                "cannot {what} volume {id}: a host waits for it to grow (a parked request); \
                 stop that host's guest first. Nothing was changed"
            )));
        }
        Ok(v)
    }

    fn volume(&self, id: Uuid) -> Option<&Lv> {
        self.volumes.iter().find(|v| v.id == id)
    }

    fn extents(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.vg.extent_size)
    }

    /// `lvextend` to `target` rounded up to extents; the new size.
    fn lvextend(&mut self, id: Uuid, target: u64) -> Result<u64, BackendError> {
        let size = self.extents(target) * self.vg.extent_size;
        let lv = format!("{}/{id}", self.lvm.vg());
        self.lvm
            .run_on("lvextend", &["-L", &format!("{size}b")], &[&lv])?;
        let before = self.volume(id).map_or(0, |v| v.size);
        if let Some(v) = self.volumes.iter_mut().find(|v| v.id == id) {
            v.size = size;
        }
        let grown = self.extents(size).saturating_sub(self.extents(before));
        self.vg.free_count = self.vg.free_count.saturating_sub(grown);
        Ok(size)
    }

    fn park(&mut self, volume: Uuid, target: u64, urgent: bool) -> bool {
        if let Some(p) = self.parked.iter_mut().find(|p| p.volume == volume) {
            p.target = p.target.max(target);
            p.urgent |= urgent;
            return true;
        }
        if self.parked.len() >= MAX_PARKED {
            return false;
        }
        self.parked.push(Parked {
            volume,
            target,
            urgent,
            order: self.next_order,
        });
        self.next_order += 1;
        true
    }

    /// Serves parked requests that fit now: urgent first, then oldest.
    fn serve_parked(&mut self) {
        self.parked.sort_by_key(|p| (!p.urgent, p.order));
        let parked = std::mem::take(&mut self.parked);
        for p in parked {
            let Some(v) = self.volume(p.volume).copied() else {
                continue;
            };
            if p.target <= v.size {
                self.completed.push((p.volume, v.size));
                continue;
            }
            let needed = self.extents(p.target) - self.extents(v.size);
            if needed > self.vg.free_count {
                self.parked.push(p);
                continue;
            }
            match self.lvextend(p.volume, p.target) {
                Ok(size) => self.completed.push((p.volume, size)),
                Err(e) => {
                    tracing::warn!("parked extension of {} failed (kept parked): {e}", p.volume);
                    self.parked.push(p);
                }
            }
        }
    }
}

impl SpmBackend for LvmSpm {
    fn extend(&mut self, volume: Uuid, target: u64, urgent: bool) -> JobResult {
        let Some(v) = self.volume(volume).copied() else {
            return JobResult::UnknownVolume;
        };
        if target == 0 || target % 512 != 0 {
            return JobResult::Malformed;
        }
        if target > v.limit {
            return JobResult::OverLimit { size: v.size };
        }
        if target <= v.size {
            return JobResult::Extended { size: v.size };
        }
        let needed = self.extents(target) - self.extents(v.size);
        if needed > self.vg.free_count {
            return if self.park(volume, target, urgent) {
                JobResult::NoSpace { size: v.size }
            } else {
                JobResult::Failed {
                    code: errno::EAGAIN,
                }
            };
        }
        match self.lvextend(volume, target) {
            Ok(size) => JobResult::Extended { size },
            Err(e) => {
                tracing::warn!("extending {volume}: {e}");
                // Someone else may have used the space: look again.
                if self.reload().is_ok()
                    && self.extents(target) - self.extents(v.size) > self.vg.free_count
                    && self.park(volume, target, urgent)
                {
                    return JobResult::NoSpace { size: v.size };
                }
                JobResult::Failed { code: errno::EIO }
            }
        }
    }

    fn commit(&mut self) -> Result<(), BackendError> {
        // lvm2 has written and synced its metadata when lvextend returns.
        Ok(())
    }

    fn take_completed(&mut self) -> Vec<(Uuid, u64)> {
        std::mem::take(&mut self.completed)
    }

    fn remove_empty_lun(&mut self, lun: &str) -> Result<String, BackendError> {
        let path = Path::new(lun);
        let vg = self.lvm.vg().to_owned();
        let pv = self
            .lvm
            .pv_infos()?
            .into_iter()
            .find(|p| same_device(&p.name, path) && p.vg == vg)
            .ok_or_else(|| {
                BackendError::new(format!(
                    "{lun} is not a PV of volume group {vg} (give the PV's device path; `pvs` \
                     lists them). Nothing was changed"
                ))
            })?;
        let pvs = self.lvm.pv_infos()?;
        if pvs.iter().filter(|p| p.vg == vg).count() < 2 {
            return Err(BackendError::new(format!(
                "cannot remove PV {lun}: it is the only PV of volume group {vg}. Nothing was \
                 changed"
            )));
        }
        let (mut volumes, mut released) = (Vec::new(), Vec::new());
        for lv in self.lvm.lv_infos(None)? {
            let on = self
                .lvm
                .segments(&lv.name)?
                .iter()
                .flat_map(|s| s.ranges.iter())
                .any(|r| same_device(&r.pv, &pv.name));
            if on && released_seq(&lv.name).is_some() {
                released.push(lv.name);
            } else if on {
                volumes.push(lv.name);
            }
        }
        if !volumes.is_empty() {
            return Err(BackendError::new(format!(
                "cannot remove PV {lun}: LVs {} have extents on it. spmbox moves extents only \
                 in its builtin pool; with lvm2, stop every host that uses those volumes (their \
                 maps name this PV), move the extents with `pvmove {lun}` (it needs \
                 device-mapper), then run this again. Nothing was changed",
                volumes.join(", ")
            )));
        }
        if !released.is_empty() {
            return Err(BackendError::new(format!(
                "cannot remove PV {lun} yet: extents released from deleted or reduced volumes \
                 ({}) wait on it until every live host has acknowledged their release; run \
                 this again in a few seconds. Nothing was changed",
                released.join(", ")
            )));
        }
        let before = self.vg.extent_count;
        self.lvm
            .run_on("vgreduce", &[], &[&vg, &pv.name.to_string_lossy()])?;
        self.reload()?;
        Ok(format!(
            "PV {lun} removed from volume group {vg}: {} extents of {} fewer (its PV label \
             stays; `pvremove` wipes it)",
            before.saturating_sub(self.vg.extent_count),
            Bytes(self.vg.extent_size)
        ))
    }

    fn add_lun(&mut self, path: &Path) -> Result<String, BackendError> {
        crate::backend::lvm::check_device_path(path)?;
        let mut lvm = self.lvm.clone();
        lvm.admit(path)?;
        let pv = lvm
            .pv_infos()?
            .into_iter()
            .find(|p| same_device(&p.name, path));
        match pv {
            Some(p) if p.vg == lvm.vg() => {
                return Err(BackendError::new(format!(
                    "{} is already a PV of volume group {}",
                    path.display(),
                    p.vg
                )));
            }
            Some(p) if !p.vg.is_empty() => {
                return Err(BackendError::new(format!(
                    "{} is a PV of another volume group ({}); remove it from there first",
                    path.display(),
                    p.vg
                )));
            }
            Some(_) => {}
            None => {
                lvm.run_on("pvcreate", &[], &[&path.to_string_lossy()])?;
            }
        }
        lvm.run_on("vgextend", &[], &[lvm.vg(), &path.to_string_lossy()])?;
        self.lvm = lvm;
        let before = self.vg.extent_count;
        self.reload()?;
        self.serve_parked();
        Ok(format!(
            "PV {} added to volume group {}: {} extents of {}",
            path.display(),
            self.lvm.vg(),
            self.vg.extent_count.saturating_sub(before),
            Bytes(self.vg.extent_size)
        ))
    }

    fn create_volume(
        &mut self,
        id: Uuid,
        virtual_size: u64,
        initial_size: u64,
    ) -> Result<VolumeReport, BackendError> {
        if self.volume(id).is_some() {
            return Err(BackendError::new(format!("volume {id} already exists")));
        }
        if virtual_size == 0 || virtual_size % 512 != 0 {
            return Err(BackendError::new(format!(
                "cannot create volume {id}: the virtual size must be a nonzero multiple of 512"
            )));
        }
        let limit = max_size(virtual_size, self.vg.extent_size)
            .ok_or_else(|| BackendError::new(format!("cannot create volume {id}: too large")))?;
        let size = self.extents(initial_size.max(1)) * self.vg.extent_size;
        if size > limit {
            return Err(BackendError::new(format!(
                "cannot create volume {id}: {} is over its limit of {}; give an --initial-size within it",
                Bytes(size),
                Bytes(limit)
            )));
        }
        self.reload()?;
        if self.extents(size) > self.vg.free_count {
            return Err(BackendError::new(format!(
                "cannot create volume {id}: {} extents needed, {} free; add a LUN \
                 (`spmbox pool add-lun`) or give a smaller --initial-size",
                self.extents(size),
                self.vg.free_count
            )));
        }
        let name = id.to_string();
        let tag = format!("{VIRTUAL_TAG}{virtual_size}");
        let mut args = vec![
            "-L".to_owned(),
            format!("{size}b"),
            "-n".into(),
            name,
            "--addtag".into(),
            tag,
        ];
        if self.lvm.metadata_only() {
            args.extend(["-an", "--zero", "n"].map(String::from));
        } else {
            args.extend(["-ay", "--zero", "n"].map(String::from));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.lvm.run_on("lvcreate", &args, &[self.lvm.vg()])?;
        self.reload()?;
        let v = self
            .volume(id)
            .ok_or_else(|| BackendError::new(format!("lvcreate made no LV for {id}")))?;
        Ok(VolumeReport {
            id,
            virtual_size: v.virtual_size,
            size: v.size,
            limit: v.limit,
        })
    }

    fn withdraw_parked(&mut self, still_waiting: &dyn Fn(Uuid) -> Option<(u64, bool)>) {
        let mut kept = Vec::with_capacity(self.parked.len());
        for mut p in std::mem::take(&mut self.parked) {
            let Some((target, urgent)) = still_waiting(p.volume) else {
                tracing::info!("parked: request for {} withdrawn by its host", p.volume);
                continue;
            };
            p.target = p.target.min(target);
            p.urgent &= urgent;
            let size = self.volume(p.volume).map_or(0, |v| v.size);
            if p.target <= size {
                self.completed.push((p.volume, size));
            } else {
                kept.push(p);
            }
        }
        self.parked = kept;
    }

    fn poll_capacity(&mut self) -> Result<(), BackendError> {
        if self.parked.is_empty() {
            return Ok(());
        }
        let free = self.vg.free_count;
        self.reload()?;
        if self.vg.free_count > free {
            self.serve_parked();
        }
        Ok(())
    }

    fn delete_volume(&mut self, id: Uuid) -> Result<crate::backend::Released, BackendError> {
        let v = self.refuse_parked(id, "delete")?;
        let release = self.release_seq + 1;
        let name = format!("{RELEASED_PREFIX}{release}_{id}");
        // The LV keeps its extents under its new name: no host finds it by
        // the volume's UUID any more, and lvm2 gives them to nobody else.
        self.lvm
            .run_on("lvrename", &[], &[self.lvm.vg(), &id.to_string(), &name])?;
        self.release_seq = release;
        self.reload()?;
        Ok(crate::backend::Released {
            extents: self.extents(v.size),
            release,
        })
    }

    fn reduce_volume(
        &mut self,
        id: Uuid,
        size: u64,
    ) -> Result<(VolumeReport, crate::backend::Released), BackendError> {
        let v = self.refuse_parked(id, "reduce")?;
        if size == 0 || size % 512 != 0 {
            return Err(BackendError::new(format!(
                "cannot reduce volume {id} to {size} bytes: give a nonzero multiple of 512. \
                 Nothing was changed"
            )));
        }
        let keep = self.extents(size).max(1);
        let have = self.extents(v.size);
        if keep > have {
            return Err(BackendError::new(format!(
                "cannot reduce volume {id} to {}: it has only {} (`spmbox volume list`). \
                 Nothing was changed",
                Bytes(size),
                Bytes(v.size)
            )));
        }
        let release = self.release_seq + 1;
        if keep == have {
            return Ok((
                VolumeReport {
                    id,
                    virtual_size: v.virtual_size,
                    size: v.size,
                    limit: v.limit,
                },
                crate::backend::Released {
                    extents: 0,
                    release: self.release_seq,
                },
            ));
        }
        // The tail's PE ranges, from lvm2's segment report.
        let mut tail = Vec::new();
        for seg in self.lvm.segments(&id.to_string())? {
            let mut at = seg.start;
            for r in seg.ranges {
                let (first, count) = (r.first, r.count);
                let skip = keep.saturating_sub(at).min(count);
                if skip < count {
                    tail.push(format!(
                        "{}:{}-{}",
                        r.pv.display(),
                        first + skip,
                        first + count - 1
                    ));
                }
                at += count;
            }
        }
        let lv = format!("{}/{id}", self.lvm.vg());
        let bytes = keep * self.vg.extent_size;
        self.lvm
            .run_on("lvreduce", &["-f", "-L", &format!("{bytes}b")], &[&lv])?;
        // Hold the freed extents in a released LV at once: lvm2 would give
        // them to the next lvextend. (A crash between the two commands
        // leaves them free at once; the volume was held by no host.)
        let name = format!("{RELEASED_PREFIX}{release}_{id}_tail");
        let count = (have - keep).to_string();
        let mut args: Vec<&str> = vec!["-l", &count, "-n", &name, "--zero", "n", "-an"];
        if !self.lvm.metadata_only() {
            args.retain(|a| *a != "-an");
            args.push("-ay");
        }
        let mut targets: Vec<&str> = vec![self.lvm.vg()];
        targets.extend(tail.iter().map(String::as_str));
        if let Err(e) = self.lvm.run_on("lvcreate", &args, &targets) {
            tracing::warn!(
                "volume {id} was reduced, but holding its freed extents failed ({e}): they \
                 are free now; no host held the volume"
            );
        }
        self.release_seq = release;
        self.reload()?;
        let v = self
            .volume(id)
            .copied()
            .ok_or_else(|| BackendError::new(format!("volume {id} vanished after lvreduce")))?;
        Ok((
            VolumeReport {
                id,
                virtual_size: v.virtual_size,
                size: v.size,
                limit: v.limit,
            },
            crate::backend::Released {
                extents: have - keep,
                release,
            },
        ))
    }

    fn reclaim(&mut self, acked: u64) -> u64 {
        let mut freed = 0;
        let done: Vec<(u64, String, u64)> = self
            .released
            .iter()
            .filter(|(seq, _, _)| *seq <= acked)
            .cloned()
            .collect();
        for (_, name, extents) in done {
            if self.discard {
                self.discard_lv(&name);
            }
            let lv = format!("{}/{name}", self.lvm.vg());
            match self.lvm.run_on("lvremove", &["-f"], &[&lv]) {
                Ok(_) => freed += extents,
                Err(e) => tracing::warn!("removing released LV {name} failed (retried): {e}"),
            }
        }
        if freed > 0 {
            let _ = self.reload();
            self.serve_parked();
        }
        freed
    }

    fn release_pending(&self) -> Option<u64> {
        self.released.last().map(|(seq, _, _)| *seq)
    }

    fn release_seq(&self) -> u64 {
        self.release_seq
    }

    fn set_discard(&mut self, _search: Vec<PathBuf>) {
        // lvm2 knows where its PVs are.
        self.discard = true;
    }

    fn note_release_commit(&mut self, seq: u64) {
        self.release_seq = self.release_seq.max(seq);
    }

    fn usage(&self) -> PoolUsage {
        // `vgs`'s figures as last read, less what this SPM's lvextends
        // took since (see `lvextend`).
        PoolUsage {
            extent_size: self.vg.extent_size,
            total_extents: self.vg.extent_count,
            free_extents: self.vg.free_count,
        }
    }

    fn report(&self) -> PoolReport {
        PoolReport {
            backend: "lvm",
            extent_size: self.vg.extent_size,
            total_extents: self.vg.extent_count,
            free_extents: self.vg.free_count,
            luns: self
                .lvm
                .pvs()
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            volumes: self
                .volumes
                .iter()
                .map(|v| VolumeReport {
                    id: v.id,
                    virtual_size: v.virtual_size,
                    size: v.size,
                    limit: v.limit,
                })
                .collect(),
            parked: self
                .parked
                .iter()
                .map(|p| (p.volume.to_string(), p.target))
                .collect(),
            segments: Default::default(),
            released_extents: self.released.iter().map(|(_, _, e)| e).sum(),
            moving: None,
        }
    }
}

/// A host's side of the lvm backend.
#[derive(Debug)]
pub struct LvmMaps {
    lvm: Lvm,
    extent_size: u64,
}

impl LvmMaps {
    /// Opens volume group `vg`; `pvs` must include every device that is or
    /// may become one of its PVs.
    pub fn open(vg: &str, pvs: &[PathBuf]) -> Result<LvmMaps, BackendError> {
        let lvm = Lvm::new(vg, pvs)?;
        let extent_size = lvm.vg_info()?.extent_size;
        Ok(LvmMaps { lvm, extent_size })
    }

    fn lv(&self, volume: Uuid) -> Result<LvInfo, BackendError> {
        let name = volume.to_string();
        let found = self.lvm.lv_infos(Some(&name)).map_err(|e| {
            BackendError::new(format!(
                "volume {volume} is not an LV of volume group {} ({e}); create it with \
                 `spmbox volume create --backend lvm`",
                self.lvm.vg()
            ))
        })?;
        found.into_iter().find(|l| l.name == name).ok_or_else(|| {
            BackendError::new(format!(
                "volume {volume} is not an LV of volume group {}",
                self.lvm.vg()
            ))
        })
    }

    /// The map from lvm2's segment report: each segment's PE ranges as
    /// runs on the PVs.
    fn map_from_segments(&self, volume: Uuid) -> Result<Mapping, BackendError> {
        let name = volume.to_string();
        let pvs = self.lvm.pv_infos()?;
        let mut runs = Vec::new();
        let mut next = 0;
        for seg in self.lvm.segments(&name)? {
            if seg.start != next {
                return Err(BackendError::new(format!(
                    "LV {name}: segment at extent {} follows extent {next}; the report has a gap",
                    seg.start
                )));
            }
            let in_ranges: u64 = seg.ranges.iter().map(|r| r.count).sum();
            if in_ranges != seg.count {
                return Err(BackendError::new(format!(
                    "LV {name}: a segment of {} extents lies on {in_ranges}; only linear LVs are supported",
                    seg.count
                )));
            }
            for r in &seg.ranges {
                let pv = pvs.iter().find(|p| p.name == r.pv).ok_or_else(|| {
                    BackendError::new(format!(
                        "LV {name} lies on {}, which is not among the --pv devices; pass it \
                         with --pv (hosts must list every PV the volume group may get)",
                        r.pv.display()
                    ))
                })?;
                runs.push(Run {
                    device: r.pv.clone(),
                    offset: pv.pe_start + r.first * self.extent_size,
                    len: r.count * self.extent_size,
                });
            }
            next = seg.start + seg.count;
        }
        Ok(Mapping::new(runs))
    }
}

impl VolumeMaps for LvmMaps {
    fn refresh(&mut self, volume: Uuid) -> Result<Mapping, BackendError> {
        if self.lvm.metadata_only() {
            return self.map_from_segments(volume);
        }
        let lv = format!("{}/{volume}", self.lvm.vg());
        self.lvm.run_on("lvchange", &["-ay"], &[&lv])?;
        self.lvm.run_on("lvchange", &["--refresh"], &[&lv])?;
        let info = self.lv(volume)?;
        Ok(Mapping::new(vec![Run {
            device: PathBuf::from(format!("/dev/{}/{volume}", self.lvm.vg())),
            offset: 0,
            len: info.size,
        }]))
    }

    fn sizes(&mut self, volume: Uuid) -> Result<VolumeReport, BackendError> {
        let info = self.lv(volume)?;
        let lv = lv_of(&info, self.extent_size).ok_or_else(|| {
            BackendError::new(format!(
                "LV {volume} has no {VIRTUAL_TAG}<bytes> tag: it was not made by spmbox"
            ))
        })?;
        Ok(VolumeReport {
            id: volume,
            virtual_size: lv.virtual_size,
            size: lv.size,
            limit: lv.limit,
        })
    }
}

/// Creates an lvm-backed domain: the mailbox on `device`, and volume group
/// `vg` on `luns` (`pvcreate`, `vgcreate`). Checks what it can first; a
/// LUN that is a PV already, or a volume group that exists, is refused.
pub fn create(
    device: &Path,
    luns: &[PathBuf],
    options: &CreateOptions,
    vg: &str,
    pvs: &[PathBuf],
) -> Result<Uuid, BackendError> {
    if !valid_extent_size(options.extent_size) {
        return Err(BackendError::new(format!(
            "--extent-size {} is not a valid extent size: a power of two of at least 1 MiB",
            Bytes(options.extent_size)
        )));
    }
    for lun in luns {
        crate::backend::lvm::check_device_path(lun)?;
    }
    let mut all: Vec<PathBuf> = pvs.to_vec();
    for lun in luns {
        if !all.contains(lun) {
            all.push(lun.clone());
        }
    }
    let lvm = Lvm::new(vg, &all)?;
    let known = lvm.pv_infos()?;
    for lun in luns {
        if let Some(p) = known.iter().find(|p| same_device(&p.name, lun)) {
            return Err(BackendError::new(format!(
                "{} is already a PV{}; remove it first (pvremove) or use another LUN",
                lun.display(),
                if p.vg.is_empty() {
                    String::new()
                } else {
                    format!(" of volume group {}", p.vg)
                }
            )));
        }
    }
    if lvm.vg_info().is_ok() {
        return Err(BackendError::new(format!(
            "volume group {vg} exists already; pick another --vg"
        )));
    }
    let formatted = mailbox::format(
        device,
        &mailbox::FormatOptions {
            hosts: options.hosts,
            sector_size: options.sector_size,
            domain: options.domain,
            force: options.force,
        },
    )?;
    let names: Vec<String> = luns
        .iter()
        .map(|l| l.to_string_lossy().into_owned())
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    lvm.run_on("pvcreate", &[], &names)?;
    let extent = format!("{}b", options.extent_size);
    let mut operands = vec![vg];
    operands.extend_from_slice(&names);
    lvm.run_on("vgcreate", &["-s", extent.as_str()], &operands)?;
    Ok(formatted.superblock.domain)
}
