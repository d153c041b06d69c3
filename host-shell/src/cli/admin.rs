//! Admin commands on a domain: `pool create`, `pool add-lun`,
//! `volume create`, `status`.
//!
//! Changes to the pool go through the running SPM, which owns it: the
//! command sends them over the SPM's control socket. When no SPM listens
//! there, the command takes the domain's lock (the one a running SPM holds)
//! and, after checking that no SPM elsewhere keeps the SPM header's
//! heartbeat moving, changes the pool itself.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use serde_json::{Value, json};
use spmbox_core::wire::{
    AREA_SIZE, HostId, InboxArea, OutboxArea, ReplyStatus, Slot, SlotState, SpmState, Uuid,
};

use crate::backend::builtin::{self, BuiltinSpm};
use crate::backend::{BackendError, PoolReport, SpmBackend};
use crate::daemon::control;
use crate::daemon::spm;
use crate::io::device::Access;
use crate::io::mailbox::Mailbox;
use crate::units::Bytes;

/// Opens the backend to change the pool directly, when no SPM runs.
pub type DirectBackend<'a> = &'a dyn Fn() -> Result<Box<dyn SpmBackend>, BackendError>;

/// The builtin backend of the domain on `device`, for [`change_pool`].
pub fn builtin(device: &Path) -> Result<Box<dyn SpmBackend>, BackendError> {
    Ok(Box::new(BuiltinSpm::open(device)?))
}

/// The control socket to use: `control`, else the domain's default.
pub fn control_path(device: &Path, control: Option<&Path>) -> Result<PathBuf, BackendError> {
    if let Some(c) = control {
        return Ok(c.to_owned());
    }
    let mailbox = Mailbox::open(device, Access::ReadOnly)?;
    Ok(control::default_control(mailbox.superblock().domain))
}

/// Sends `request` to the running SPM, or, if none runs, carries it out
/// on the backend `direct` opens, under the domain lock.
pub fn change_pool(
    device: &Path,
    control: Option<&Path>,
    request: &Value,
    direct: DirectBackend<'_>,
) -> Result<Value, BackendError> {
    let socket = control_path(device, control)?;
    if let Some(answer) = control::control_request(&socket, request)? {
        return Ok(answer);
    }
    // An SPM that is starting holds the lock before its socket listens:
    // while waiting for the lock, keep asking the socket.
    let mut answered = None;
    let lock = spm::lock_domain(device, || {
        if let Some(answer) = control::control_request(&socket, request)? {
            answered = Some(answer);
            return Err(BackendError::new("answered"));
        }
        Ok(())
    });
    if let Some(answer) = answered {
        return Ok(answer);
    }
    let _lock = lock.map_err(|e| {
        BackendError::new(format!(
            "{e}; its control socket {} does not answer (pass --control if it listens elsewhere)",
            socket.display()
        ))
    })?;
    let mailbox = Mailbox::open(device, Access::ReadOnly)?;
    let header = spm::read_spm_header(&mailbox)?;
    if header.is_some_and(|h| h.state == SpmState::Active) {
        // A crashed SPM leaves "active" behind; a live one elsewhere moves
        // its heartbeat.
        spm::check_no_live_spm(&mailbox, &AtomicBool::new(false)).map_err(|e| {
            BackendError::new(format!(
                "{e}; run this command on the SPM's machine, or pass --control with its socket"
            ))
        })?;
    }
    let mut backend = direct()?;
    let answer = spm::admin(backend.as_mut(), request);
    if answer["ok"] == json!(true) {
        Ok(answer)
    } else {
        Err(BackendError::new(
            answer["error"].as_str().unwrap_or("refused").to_string(),
        ))
    }
}

/// A request slot as `status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotStatus {
    /// The host.
    pub host: HostId,
    /// The slot.
    pub slot: Slot,
    /// The volume.
    pub volume: String,
    /// The size asked for.
    pub target: u64,
    /// Whether the guest is paused.
    pub paused: bool,
    /// `in flight`, `waiting for space`, or the final answer.
    pub state: String,
}

/// What `status` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// The domain.
    pub domain: String,
    /// Host ids the mailbox serves.
    pub max_hosts: u16,
    /// The SPM header: epoch, id, state, heartbeat.
    pub spm: Value,
    /// Hosts that have written an inbox header, with their generation.
    pub hosts: Vec<Value>,
    /// Requests without a final answer.
    pub requests: Vec<SlotStatus>,
    /// The pool.
    pub pool: Option<PoolReport>,
    /// What the running hosts on this machine report (allocation).
    pub host_reports: Vec<Value>,
    /// Why the pool is missing, if it is.
    pub pool_error: Option<String>,
    /// Where the pool came from: `spm` (the running SPM's control
    /// socket, live), `metadata` (the committed metadata on the device:
    /// no SPM answered) or `none`.
    pub pool_source: &'static str,
    /// Who holds the domain's sanlock leases (`status --lease sanlock`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leases: Option<Value>,
    /// What looks wrong, in words: a volume whose guest has written past
    /// the size the pool gives it (the pool was rolled back, or the host
    /// runs on a stale map).
    pub warnings: Vec<String>,
}

/// Gathers the status of the domain on `device`.
pub fn status(device: &Path, control: Option<&Path>) -> Result<Status, BackendError> {
    let mailbox = Mailbox::open(device, Access::ReadOnly)?;
    let g = mailbox.geometry();
    let domain = mailbox.superblock().domain;
    let image = mailbox.read_all()?;
    let header = spm::read_spm_header(&mailbox)?;
    let spm = header.map_or(json!(null), |h| {
        json!({"epoch": h.epoch, "spm_id": h.spm_id, "state": format!("{:?}", h.state).to_lowercase(),
               "heartbeat": h.heartbeat, "heartbeat_interval_ms": h.heartbeat_interval_ms})
    });
    let mut hosts = Vec::new();
    let mut requests = Vec::new();
    for host in 1..=g.max_hosts() {
        let (Some(ib), Some(ob)) = (
            g.inbox_area(HostId::new(host)),
            g.outbox_area(HostId::new(host)),
        ) else {
            continue;
        };
        let area = |at: u64| &image[at as usize..at as usize + AREA_SIZE];
        let (Some(inbox), Some(outbox)) = (
            InboxArea::new(area(ib), domain, HostId::new(host)),
            OutboxArea::new(area(ob), domain, HostId::new(host)),
        ) else {
            continue;
        };
        let Ok(Some(h)) = inbox.header() else {
            continue;
        };
        hosts.push(json!({"host": host, "generation": h.generation}));
        let out_gen = outbox.header_generation();
        for (slot, state) in inbox.slots() {
            let SlotState::Valid(r) = state else {
                continue;
            };
            let answer = match outbox.slot_under(slot, out_gen) {
                Some(SlotState::Valid(reply)) if reply.answers(&r) => Some(reply.status),
                _ => None,
            };
            let state = match answer {
                None => "in flight".to_string(),
                Some(ReplyStatus::WaitingForSpace) => "waiting for space".to_string(),
                Some(ReplyStatus::Extended) => "extended (host refreshing)".to_string(),
                Some(other) => format!("{other:?}").to_lowercase(),
            };
            requests.push(SlotStatus {
                host: HostId::new(host),
                slot,
                volume: r.volume.to_string(),
                target: r.target_size,
                paused: r.paused,
                state,
            });
        }
    }
    let socket = control_path(device, control)?;
    let (pool, pool_error, pool_source) =
        match control::control_request(&socket, &json!({"op": "status"})) {
            Ok(Some(answer)) => match pool_from_json(&answer["pool"]) {
                Some(p) => (Some(p), None, "spm"),
                None => (None, Some(format!("the SPM answered {answer}")), "none"),
            },
            _ => match builtin::committed_report(device) {
                Ok(p) => (Some(p), None, "metadata"),
                Err(e) => (None, Some(e.to_string()), "none"),
            },
        };
    let mut host_reports = Vec::new();
    if let Ok(entries) = std::fs::read_dir(control::run_dir()) {
        let prefix = format!("host-{domain}-");
        let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.starts_with(&prefix)
                && name.ends_with(".json")
                && let Ok(text) = std::fs::read_to_string(&p)
                && let Ok(v) = serde_json::from_str::<Value>(&text)
            {
                host_reports.push(v);
            }
        }
    }
    let mut warnings = Vec::new();
    for v in pool.iter().flat_map(|p| p.volumes.iter()) {
        let id = v.id.to_string();
        for h in &host_reports {
            let Some(alloc) = h["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|x| x["id"].as_str() == Some(id.as_str()))
                .and_then(|x| x["allocation"].as_u64())
            else {
                continue;
            };
            if alloc > v.size {
                warnings.push(format!(
                    "volume {id}: host {} reports {} written, more than the {} the pool gives \
                     it: the pool metadata was rolled back (check `spmbox inspect`) or the \
                     host runs on a stale map; do not add capacity or start an SPM before \
                     this is understood",
                    h["host"],
                    Bytes(alloc),
                    Bytes(v.size)
                ));
            }
        }
    }
    Ok(Status {
        domain: domain.to_string(),
        max_hosts: g.max_hosts(),
        spm,
        hosts,
        requests,
        pool,
        host_reports,
        pool_error,
        pool_source,
        leases: None,
        warnings,
    })
}

/// The status file a host daemon on this machine writes.
pub fn host_status_file(domain: Uuid, host: u16) -> PathBuf {
    control::run_dir().join(format!("host-{domain}-{host}.json"))
}

fn pool_from_json(v: &Value) -> Option<PoolReport> {
    let backend = match v["backend"].as_str()? {
        "lvm" => "lvm",
        _ => "builtin",
    };
    Some(PoolReport {
        backend,
        extent_size: v["extent_size"].as_u64()?,
        total_extents: v["total_extents"].as_u64()?,
        free_extents: v["free_extents"].as_u64()?,
        luns: v["luns"]
            .as_array()?
            .iter()
            .filter_map(|l| l.as_str().map(str::to_owned))
            .collect(),
        volumes: v["volumes"]
            .as_array()?
            .iter()
            .filter_map(|x| {
                Some(crate::backend::VolumeReport {
                    id: Uuid::parse_str(x["id"].as_str()?)?,
                    virtual_size: x["virtual_size"].as_u64()?,
                    size: x["size"].as_u64()?,
                    limit: x["limit"].as_u64()?,
                })
            })
            .collect(),
        parked: v["parked"]
            .as_array()?
            .iter()
            .filter_map(|p| Some((p[0].as_str()?.to_owned(), p[1].as_u64()?)))
            .collect(),
    })
}

/// Renders a status as text.
pub fn render(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(o, "domain {} ({} host ids)", s.domain, s.max_hosts);
    match s.spm.as_object() {
        Some(h) => {
            let _ = writeln!(
                o,
                "SPM: {} (id {}, epoch {}, heartbeat {})",
                h["state"].as_str().unwrap_or("?"),
                h["spm_id"],
                h["epoch"],
                h["heartbeat"]
            );
        }
        None => {
            let _ = writeln!(o, "SPM: the SPM header is empty or damaged");
        }
    }
    let _ = writeln!(o, "hosts: {}", s.hosts.len());
    for h in &s.hosts {
        let _ = writeln!(o, "  host {} generation {}", h["host"], h["generation"]);
    }
    let _ = writeln!(o, "requests: {}", s.requests.len());
    for r in &s.requests {
        let _ = writeln!(
            o,
            "  host {} slot {} volume {} to {}{}: {}",
            r.host,
            r.slot,
            r.volume,
            Bytes(r.target),
            if r.paused { " (guest paused)" } else { "" },
            r.state
        );
    }
    match &s.pool {
        Some(p) => {
            let _ = writeln!(
                o,
                "pool ({}, {}): {} of {} extents free, extent {}, {} LUNs",
                p.backend,
                if s.pool_source == "spm" {
                    "live from the running SPM"
                } else {
                    "as committed; no SPM answered, parked requests are not shown"
                },
                p.free_extents,
                p.total_extents,
                Bytes(p.extent_size),
                p.luns.len()
            );
            for v in &p.volumes {
                let report = s
                    .host_reports
                    .iter()
                    .flat_map(|h| h["volumes"].as_array().cloned().unwrap_or_default())
                    .find(|x| x["id"].as_str() == Some(&v.id.to_string()));
                let alloc = report.as_ref().and_then(|x| x["allocation"].as_u64());
                let vm = report
                    .as_ref()
                    .map(|x| &x["vm"])
                    .filter(|vm| vm.is_object())
                    .map(vm_words)
                    .unwrap_or_default();
                let _ = writeln!(
                    o,
                    "  volume {}: virtual {}, physical {}, allocation {}{vm}",
                    v.id,
                    Bytes(v.virtual_size),
                    Bytes(v.size),
                    alloc.map_or("unknown (no host on this machine runs it)".into(), |a| {
                        Bytes(a).to_string()
                    })
                );
            }
            for (v, t) in &p.parked {
                let _ = writeln!(o, "  parked: volume {v} to {}", Bytes(*t));
            }
        }
        None => {
            let _ = writeln!(
                o,
                "pool: unavailable ({})",
                s.pool_error.as_deref().unwrap_or("unknown")
            );
        }
    }
    for w in &s.warnings {
        let _ = writeln!(o, "WARNING: {w}");
    }
    o
}

/// A volume's VM in words, for `status`: how qemu runs it and what it
/// reported.
fn vm_words(vm: &Value) -> String {
    let state = match vm["state"].as_str().unwrap_or("unknown") {
        "paused-enospc" => "paused by qemu (ENOSPC: waiting for the volume to grow)",
        "paused" => "paused",
        "running" => "running",
        "exited" => "exited",
        other => other,
    };
    let c = &vm["counts"];
    format!(
        "; VM {state} (qemu pid {}; {} threshold events, {} ENOSPC pauses, {} resumes)",
        vm["pid"], c["threshold_events"], c["enospc_pauses"], c["resumes"]
    )
}
