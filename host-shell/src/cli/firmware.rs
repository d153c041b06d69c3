//! The shell's side of a firmware SPM (core/firmware, docs/firmware.md):
//! `pool add-lun --firmware`, which labels the LUN here and hands the
//! firmware `add-lun <uuid> <extents>` through the command file beside the
//! domain device, and `volume verify`, which reads back what `spmbox
//! host`'s guests wrote.
//!
//! The command file protocol (the firmware's `command` module):
//! `<device>.cmd` is written whole (through `<device>.cmd.tmp`); the
//! firmware takes it by renaming it to `<device>.cmd.taken`, carries it
//! out and answers one line in `<device>.reply`: `ok <message>` or
//! `error <message>`. A command the firmware did not take in time is
//! withdrawn (removed) and nothing changed; one it took is waited for.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::backend::builtin::{self, BuiltinMaps};
use crate::backend::{BackendError, VolumeMaps as _};
use crate::cli::args::VolumeVerifyArgs;
use crate::cli::commands::{CommandError, EXIT_ERROR, EXIT_OK};
use crate::daemon::guest::{self, Devices};
use crate::io::device::Access;
use crate::io::mailbox::Mailbox;
use crate::units::Bytes;

/// How often the answer is looked for.
const POLL: Duration = Duration::from_millis(50);

/// `<device><suffix>`.
fn beside(device: &Path, suffix: &str) -> PathBuf {
    let mut p = device.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// Labels `lun` for the domain on `device` and has the firmware SPM add
/// it; the firmware's message.
pub fn add_lun(device: &Path, lun: &Path, wait: Duration) -> Result<String, CommandError> {
    let domain = Mailbox::open(device, Access::ReadOnly)?.superblock().domain;
    let pool = builtin::committed_report(device)?;
    let label = builtin::label_lun(lun, domain, pool.extent_size, false)?;
    if label.extent_size != pool.extent_size {
        return Err(BackendError::new(format!(
            "{} is labelled for {} extents, the pool uses {}",
            lun.display(),
            Bytes(label.extent_size),
            Bytes(pool.extent_size)
        ))
        .into());
    }
    if pool.luns.contains(&label.lun.to_string()) {
        return Ok(format!(
            "LUN {} ({}) is in the pool already",
            label.lun,
            lun.display()
        ));
    }
    let (cmd, tmp, taken, reply) = (
        beside(device, ".cmd"),
        beside(device, ".cmd.tmp"),
        beside(device, ".cmd.taken"),
        beside(device, ".reply"),
    );
    if cmd.exists() || taken.exists() {
        return Err(BackendError::new(format!(
            "another command for the firmware SPM is pending ({}); wait for it (or, if no \
             firmware SPM runs, remove it), then run this again",
            if cmd.exists() { &cmd } else { &taken }.display()
        ))
        .into());
    }
    let _ = std::fs::remove_file(&reply);
    let line = format!("add-lun {} {}\n", label.lun, label.extents);
    std::fs::write(&tmp, &line)
        .and_then(|()| std::fs::rename(&tmp, &cmd))
        .map_err(|e| BackendError::io(format!("cannot write {}", cmd.display()), e))?;
    if let Some(answer) = wait_for(&reply, wait)? {
        return answered(answer);
    }
    match std::fs::remove_file(&cmd) {
        Ok(()) => Err(BackendError::new(format!(
            "the firmware SPM did not take the command within {wait:?} (it looks for {} every \
             0.25 s while it runs); the command was withdrawn and the pool is unchanged. LUN {} \
             keeps its label on {}: run this again once the firmware SPM runs",
            cmd.display(),
            label.lun,
            lun.display()
        ))
        .into()),
        Err(_) => match wait_for(&reply, wait)? {
            Some(answer) => answered(answer),
            None => Err(BackendError::new(format!(
                "the firmware SPM took the command but did not answer within {:?}; run this \
                 again later: a LUN already in the pool is answered as such",
                wait * 2
            ))
            .into()),
        },
    }
}

/// Waits up to `wait` for the answer file; takes it.
fn wait_for(reply: &Path, wait: Duration) -> Result<Option<String>, CommandError> {
    let deadline = Instant::now() + wait;
    loop {
        match std::fs::read_to_string(reply) {
            Ok(text) => {
                let _ = std::fs::remove_file(reply);
                return Ok(Some(text));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(BackendError::io(format!("cannot read {}", reply.display()), e).into());
            }
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(POLL);
    }
}

fn answered(answer: String) -> Result<String, CommandError> {
    let answer = answer.trim();
    match answer.split_once(' ') {
        Some(("ok", message)) => Ok(message.to_owned()),
        Some(("error", message)) => {
            Err(BackendError::new(format!("the firmware SPM refused: {message}")).into())
        }
        _ => Err(BackendError::new(format!(
            "the firmware SPM answered something this shell does not read: {answer:?}"
        ))
        .into()),
    }
}

/// `spmbox volume verify`.
pub fn verify(args: &VolumeVerifyArgs) -> Result<ExitCode, CommandError> {
    let mailbox = Mailbox::open(&args.device, Access::ReadOnly)?;
    let search = if args.lun_search.is_empty() {
        builtin::default_search(&args.device, mailbox.device().kind())
    } else {
        args.lun_search.clone()
    };
    let mut maps = BuiltinMaps::open(&args.device, search)?;
    let mut devices = Devices::new();
    let (mut bytes, mut errors, mut first) = (0u64, 0u64, Vec::new());
    for text in &args.volumes {
        let volume = spmbox_core::wire::Uuid::parse_str(text)
            .ok_or_else(|| CommandError::Usage(format!("--volume {text:?} is not a UUID")))?;
        let sizes = maps.sizes(volume)?;
        let map = maps.refresh(volume)?;
        let report = guest::verify(volume, &map, &mut devices, sizes.virtual_size.min(map.size))
            .map_err(BackendError::from)?;
        bytes += report.bytes_verified;
        errors += report.error_count;
        first.extend(
            report
                .errors
                .iter()
                .take(3)
                .map(|b| format!("volume {volume} offset {}: {}", b.offset, b.defect)),
        );
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        let v = serde_json::json!({"volumes": args.volumes.len(), "bytes_verified": bytes,
            "data_errors": errors, "first_errors": first});
        writeln!(out, "{v}")?;
    } else {
        writeln!(
            out,
            "verified {} of {} volumes: {errors} data errors",
            Bytes(bytes),
            args.volumes.len()
        )?;
        for e in &first {
            writeln!(out, "  {e}")?;
        }
    }
    Ok(ExitCode::from(if errors == 0 {
        EXIT_OK
    } else {
        EXIT_ERROR
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_and_files_lie_beside_the_device() {
        assert_eq!(answered("ok LUN x added\n".into()).unwrap(), "LUN x added");
        let refused = answered("error no room\n".into()).unwrap_err().to_string();
        assert!(refused.contains("refused: no room"), "{refused}");
        assert!(answered("what\n".into()).is_err());
        assert_eq!(
            beside(Path::new("/d/domain"), ".cmd"),
            PathBuf::from("/d/domain.cmd")
        );
    }

    /// A domain with one LUN of 8 extents of 1 MiB, and a second LUN
    /// file not labelled yet.
    fn domain() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let (device, lun1, lun2) = (
            dir.path().join("domain"),
            dir.path().join("lun1"),
            dir.path().join("lun2"),
        );
        for lun in [&lun1, &lun2] {
            std::fs::File::create(lun)
                .unwrap()
                .set_len(builtin::LUN_DATA_OFFSET + (8 << 20))
                .unwrap();
        }
        builtin::create(
            &device,
            std::slice::from_ref(&lun1),
            &builtin::CreateOptions {
                hosts: 4,
                sector_size: None,
                domain: None,
                extent_size: 1 << 20,
                force: false,
            },
        )
        .unwrap();
        (dir, device, lun2)
    }

    #[test]
    fn the_firmware_takes_the_command_and_its_answer_is_printed() {
        let (_dir, device, lun) = domain();
        let firmware = {
            let device = device.clone();
            std::thread::spawn(move || {
                let (cmd, taken) = (beside(&device, ".cmd"), beside(&device, ".cmd.taken"));
                while std::fs::rename(&cmd, &taken).is_err() {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let line = std::fs::read_to_string(&taken).unwrap();
                std::fs::write(beside(&device, ".reply"), "ok added\n").unwrap();
                std::fs::remove_file(&taken).unwrap();
                line
            })
        };
        let message = add_lun(&device, &lun, Duration::from_secs(10)).unwrap();
        assert_eq!(message, "added");
        let line = firmware.join().unwrap();
        let label = builtin::read_label(&lun).unwrap().unwrap();
        assert_eq!(line, format!("add-lun {} 8\n", label.lun));
        assert!(!beside(&device, ".reply").exists());
    }

    #[test]
    fn a_command_nobody_takes_is_withdrawn_and_the_label_kept() {
        let (_dir, device, lun) = domain();
        let err = add_lun(&device, &lun, Duration::from_millis(100))
            .unwrap_err()
            .to_string();
        assert!(err.contains("did not take the command"), "{err}");
        assert!(err.contains("the pool is unchanged"), "{err}");
        assert!(!beside(&device, ".cmd").exists(), "withdrawn");
        let label = builtin::read_label(&lun).unwrap().unwrap();
        // Again: the same label, and the command is written again.
        let err = add_lun(&device, &lun, Duration::from_millis(100))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&label.lun.to_string()), "{err}");
        // A command pending already is not overwritten.
        std::fs::write(beside(&device, ".cmd.taken"), "stop\n").unwrap();
        let err = add_lun(&device, &lun, Duration::from_millis(100))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is pending"), "{err}");
    }

    #[test]
    fn the_answer_file_is_waited_for_and_taken() {
        let dir = tempfile::tempdir().unwrap();
        let reply = dir.path().join("domain.reply");
        assert!(wait_for(&reply, Duration::ZERO).unwrap().is_none());
        std::fs::write(&reply, "ok done\n").unwrap();
        assert_eq!(
            wait_for(&reply, Duration::ZERO).unwrap().as_deref(),
            Some("ok done\n")
        );
        assert!(!reply.exists(), "the answer is taken");
    }
}
