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
        };
        spm.reload()?;
        Ok(spm)
    }

    fn reload(&mut self) -> Result<(), BackendError> {
        self.vg = self.lvm.vg_info()?;
        let extent = self.vg.extent_size;
        self.volumes = self
            .lvm
            .lv_infos(None)?
            .iter()
            .filter_map(|i| lv_of(i, extent))
            .collect();
        Ok(())
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
