//! `spmbox pool remove-lun` (docs/operations.md 4.2): through the running
//! SPM, which moves the extents step by step while it serves the hosts,
//! or, with none, here under the domain lock.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Value, json};
use spmbox_core::wire::{RECORD_LEN, SPM_HEADER_OFFSET, SpmHeader, Uuid};

use crate::backend::{BackendError, SpmBackend};
use crate::cli::admin::{Answer, control_path, with_pool};
use crate::cli::args::RemoveLunArgs;
use crate::cli::commands::{CommandError, EXIT_OK, open_spm_backend, print_json};
use crate::daemon::control::control_request;
use crate::daemon::release::HostWatch;
use crate::daemon::remove_lun::{Removal, State, progress_words};
use crate::daemon::spm;
use crate::io::device::{Access, AlignedBuf};
use crate::io::mailbox::Mailbox;
use crate::units::{Bytes, Elapsed};

/// How often the command asks the SPM how far the removal is.
const POLL: Duration = Duration::from_millis(250);

/// How long the command, without an SPM, waits for the live hosts to
/// acknowledge the release of the extents it moved away from the LUN.
pub const ACK_PATIENCE: Duration = Duration::from_secs(60);

/// `spmbox pool remove-lun`.
pub fn remove_lun(args: &RemoveLunArgs) -> Result<ExitCode, CommandError> {
    let device = args.device.as_path();
    let backend = args.lvm.to_backend();
    // A path is sent whole: the SPM may run in another directory.
    let lun = match std::fs::canonicalize(&args.lun) {
        Ok(path) if Uuid::parse_str(&args.lun).is_none() => path.display().to_string(),
        _ => args.lun.clone(),
    };
    let request = json!({"op": "remove_lun", "lun": lun});
    let answer = with_pool(
        device,
        args.control.as_deref(),
        &request,
        &|| open_spm_backend(device, &backend),
        &mut |backend, mailbox| offline(device, backend, mailbox, &lun, &args.lun_search),
    )?;
    let report = match answer {
        Answer::Direct(report) => report,
        Answer::Spm(answer) => {
            if answer["ok"] != json!(true) {
                return Err(BackendError::new(
                    answer["error"].as_str().unwrap_or("refused").to_string(),
                )
                .into());
            }
            if answer["removal"]["state"] == "done" {
                answer["removal"].clone()
            } else {
                follow(
                    &control_path(device, args.control.as_deref())?,
                    &answer["removal"],
                )?
            }
        }
    };
    if args.json {
        let mut out = report.clone();
        out["ok"] = json!(true);
        print_json(&out)?;
    } else {
        writeln!(std::io::stdout().lock(), "{}", done_line(&report))?;
    }
    Ok(ExitCode::from(EXIT_OK))
}

/// The last line of a removal that ended well.
fn done_line(r: &Value) -> String {
    if let Some(message) = r["message"].as_str() {
        return message.to_owned();
    }
    let extent = r["extent_size"].as_u64().unwrap_or(0);
    let moved = r["moved_extents"].as_u64().unwrap_or(0);
    format!(
        "LUN {} removed from the pool: {} extents ({}) in {} segments moved to the other LUNs \
         in {}; its label is wiped",
        r["lun"].as_str().unwrap_or("?"),
        moved,
        Bytes(moved * extent),
        r["moved_segments"].as_u64().unwrap_or(0),
        Elapsed(Duration::from_secs_f64(
            r["seconds"].as_f64().unwrap_or(0.0)
        ))
    )
}

/// Prints a progress line on stderr when it says something new.
struct Progress {
    last: String,
    at: std::time::Instant,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            last: String::new(),
            at: std::time::Instant::now(),
        }
    }

    fn show(&mut self, r: &Value) {
        let mut line = format!(
            "LUN {}: {}",
            r["lun"].as_str().unwrap_or("?"),
            progress_words(r)
        );
        if r.get("copying").is_none() && r["state"] == "reclaiming" {
            line.push_str(", waiting for the hosts to acknowledge the moves");
        }
        // At most one line a second, and only when something changed.
        if line != self.last && self.at.elapsed() >= Duration::from_secs(1) {
            let _ = writeln!(std::io::stderr().lock(), "{line}");
            self.at = std::time::Instant::now();
            self.last = line;
        }
    }
}

/// Follows a removal the SPM runs until it ends; returns its last report.
fn follow(socket: &Path, started: &Value) -> Result<Value, BackendError> {
    let lun = started["lun"].clone();
    let mut progress = Progress::new();
    let mut last = started.clone();
    loop {
        std::thread::sleep(POLL);
        let Some(status) = control_request(socket, &json!({"op": "status"}))? else {
            return Err(BackendError::new(format!(
                "the SPM stopped while LUN {} was being removed ({} of {} extents moved); start \
                 it and run this again: what moved stays moved",
                lun.as_str().unwrap_or("?"),
                last["moved_extents"],
                last["total_extents"]
            )));
        };
        let r = &status["removal"];
        if r["lun"] != lun {
            return Err(BackendError::new(
                "the SPM no longer reports this removal (it restarted); run this again",
            ));
        }
        last = r.clone();
        progress.show(r);
        match r["state"].as_str() {
            Some("done") => return Ok(last),
            Some("failed") => {
                return Err(BackendError::new(
                    r["error"].as_str().unwrap_or("failed").to_string(),
                ));
            }
            _ => {}
        }
    }
}

/// The removal run here, without an SPM, under the domain lock.
fn offline(
    device: &Path,
    backend: &mut dyn SpmBackend,
    mailbox: &Mailbox,
    lun: &str,
    search: &[PathBuf],
) -> Result<Value, BackendError> {
    backend.set_lun_search(search.to_vec());
    let luns = backend.report().luns.len();
    let mut watch = HostWatch::new(None);
    let Some(mover) = backend.lun_mover() else {
        return spm::empty_lun_removed(backend, lun).map(|v| v["removal"].clone());
    };
    let stale = mover.moving();
    if !stale.is_nil() {
        mover.set_moving(Uuid::NIL)?;
        tracing::warn!(
            "the pool named volume {stale} as being moved: a `pool remove-lun` was cut short; \
             what it moved stays moved"
        );
    }
    let mut removal = Removal::start(mover, lun, luns, &mut |v| {
        watch.settled_live_holders(mailbox, v)
    })?;
    let mut progress = Progress::new();
    let mut published = 0;
    let mut waiting: Option<std::time::Instant> = None;
    loop {
        if let Some(mover) = backend.lun_mover() {
            let recheck = watch.recheck_wait();
            removal.step(mover, recheck, &mut |v| {
                watch.settled_live_holders(mailbox, v)
            });
        }
        progress.show(&removal.report());
        match &removal.state {
            State::Done => return Ok(removal.report()),
            State::Failed(e) => return Err(BackendError::new(e.clone())),
            State::Moving if removal.busy() => continue,
            State::Moving => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            State::Reclaiming => {}
        }
        let Some(pending) = backend.release_pending() else {
            continue;
        };
        // The hosts learn of the release from the SPM header, as from an
        // SPM, and acknowledge it in their inbox headers.
        if published < backend.release_seq() {
            published = backend.release_seq();
            publish_release(device, published)?;
        }
        let since = *waiting.get_or_insert_with(std::time::Instant::now);
        if std::time::Instant::now() >= watch.next_check {
            let acked = watch.check(mailbox, pending)?;
            backend.reclaim(acked);
        }
        if since.elapsed() >= ACK_PATIENCE {
            if let Some(mover) = backend.lun_mover()
                && let Ok((index, _)) = mover.find_lun(&removal.lun.to_string())
            {
                let _ = mover.set_draining(index, false);
            }
            return Err(BackendError::new(format!(
                "every extent on LUN {} moved ({} extents), but the LUN stays in the pool: \
                 live hosts have not acknowledged the move within {} (`spmbox status` shows \
                 each host's release_ack). Start the SPM and run this again once they have",
                removal.lun,
                removal.moved,
                Elapsed(ACK_PATIENCE)
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes `release` as the SPM header's `release_commit` (a vacant header
/// if none was ever written), durably: what an SPM does after a commit
/// that released extents, done by a command that holds the domain lock
/// while no SPM runs.
fn publish_release(device: &Path, release: u64) -> Result<(), BackendError> {
    let mailbox = Mailbox::open(device, Access::ReadWrite)?;
    let domain = mailbox.superblock().domain;
    let mut header = spm::read_spm_header(&mailbox)?
        .unwrap_or_else(|| SpmHeader::vacant(domain, Default::default()));
    if header.release_commit >= release {
        return Ok(());
    }
    header.release_commit = release;
    let record = header
        .to_bytes()
        .map_err(|e| BackendError::new(format!("the SPM header: {}", e.name())))?;
    let sector = mailbox.geometry().sector_size() as usize;
    let dev = mailbox.device();
    let mut buf = AlignedBuf::zeroed(sector, dev.dio_mem_align());
    buf.copy_from_slice(&mailbox.read(SPM_HEADER_OFFSET, sector)?);
    buf[..RECORD_LEN].copy_from_slice(&record);
    dev.write_at(SPM_HEADER_OFFSET, &buf)
        .and_then(|()| dev.sync_data())
        .map_err(|e| BackendError::device("writing the SPM header's release_commit", e))
}
