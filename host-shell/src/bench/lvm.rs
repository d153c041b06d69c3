//! Loop devices and lvm2 probing, and the whole-extension section on an
//! lvm2 volume group.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use serde_json::{Value, json};

use super::report::{Dist, merge};
use super::spm::{Backend, SpmThread};
use super::{
    GUEST_EXTENT, GUEST_RATE, GUEST_VOLUME, ROUND_EXTENSIONS, guest_host_options, preallocate,
};
use crate::backend::BackendError;
use crate::backend::builtin::CreateOptions;
use crate::io::mailbox;
use crate::stats::round;

/// A loop device over a file, detached when dropped.
struct LoopDevice(PathBuf);

impl LoopDevice {
    fn attach(file: &Path) -> Result<LoopDevice, BackendError> {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show", "--sector-size", "512"])
            .arg(file)
            .output()
            .map_err(|e| BackendError::io("cannot run losetup", e))?;
        if !out.status.success() {
            return Err(BackendError::new(format!(
                "losetup {} failed: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(LoopDevice(PathBuf::from(
            String::from_utf8_lossy(&out.stdout).trim(),
        )))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .status();
    }
}

/// Why the lvm row cannot run here, if it cannot.
fn lvm_unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("needs root (loop devices and lvm2)".into());
    }
    let works = |cmd: &str, arg: &str| {
        std::process::Command::new(cmd)
            .arg(arg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !works("losetup", "--version") {
        return Some("needs losetup (util-linux)".into());
    }
    if !works("lvm", "version") {
        return Some("needs lvm2 (apt-get install lvm2)".into());
    }
    None
}

/// The whole extension with the lvm backend: one host, one guest, a real
/// lvm2 volume group on a loop device (metadata only where the kernel has
/// no device-mapper: the guest writes through the segment map `lvs`
/// reports). Beside it, lvextend's own time as the SPM measured it.
pub(super) fn whole_extension_lvm(
    dir: &Path,
    run_dir: &Path,
    seconds: f64,
) -> Result<(Value, Vec<f64>), BackendError> {
    if let Some(why) = lvm_unavailable() {
        return Ok((json!({"backend": "lvm", "skipped": why}), Vec::new()));
    }
    let domain_file = dir.join("lvm-domain");
    let lun_file = dir.join("lvm-lun");
    let extent = GUEST_EXTENT;
    let per_volume = GUEST_VOLUME;
    for (f, size) in [
        (&domain_file, 16u64 << 20),
        (&lun_file, 2 * per_volume + (64 << 20)),
    ] {
        std::fs::File::create(f)
            .and_then(|file| preallocate(&file, size))
            .map_err(|e| BackendError::io(format!("cannot make {}", f.display()), e))?;
    }
    let domain_loop = LoopDevice::attach(&domain_file)?;
    let lun_loop = LoopDevice::attach(&lun_file)?;
    let vg = format!("spmboxbench{}", std::process::id());
    let pvs = vec![lun_loop.0.clone()];
    let _cleanup = crate::backend::lvm::VgRemoval {
        vg: vg.clone(),
        pvs: pvs.clone(),
    };
    crate::backend::lvm_glue::create(
        &domain_loop.0,
        &pvs,
        &CreateOptions {
            hosts: 250,
            sector_size: None,
            domain: None,
            extent_size: extent,
            force: true,
        },
        &vg,
        &pvs,
    )?;
    let volume = mailbox::random_uuid()?;
    crate::backend::lvm_glue::spm_backend(&vg, &pvs)?.create_volume(volume, per_volume, extent)?;
    let spm = SpmThread::start(
        &domain_loop.0,
        run_dir,
        Backend::Lvm {
            vg: vg.clone(),
            pvs: pvs.clone(),
        },
    )?;
    let mut maps = crate::backend::lvm_glue::maps(&vg, &pvs)?;
    // Fewer extensions than the builtin rows: each is an lvextend and a
    // refresh of the map from lvm2's metadata.
    let rate = GUEST_RATE;
    let bytes = ((rate as f64 * seconds) as u64).clamp(8 * extent, ROUND_EXTENSIONS * extent);
    let options = guest_host_options(
        domain_loop.0.clone(),
        1,
        vec![volume],
        extent,
        rate,
        256 << 10,
        bytes,
    );
    let summary =
        crate::daemon::host::run(&options, maps.as_mut(), Arc::new(AtomicBool::new(false)))?;
    let run = spm.stop()?;
    let lat = summary.latencies_ms;
    let mut v = json!({
        "backend": "lvm",
        "hosts": 1,
        "volumes": 1,
        "rounds": 1,
        "device_mapper": crate::backend::lvm::device_mapper_present(),
        "lvextend_ms_mean": round(run.summary.extend_seconds * 1e3 / run.summary.jobs.max(1) as f64, 3),
        "commit_ms_mean": round(run.summary.commit_seconds * 1e3 / run.summary.commits.max(1) as f64, 3),
    });
    merge(
        &mut v,
        Dist {
            samples: lat.clone(),
        }
        .summary(),
    );
    Ok((v, lat))
}
