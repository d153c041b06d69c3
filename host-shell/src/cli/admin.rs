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
use std::time::Duration;

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
    let answer = match with_pool(device, control, request, direct, &mut |backend, mailbox| {
        let mut watch = crate::daemon::release::HostWatch::new(None);
        Ok(spm::admin(
            backend,
            request,
            &mut |v| watch.settled_live_holders(mailbox, v),
            &mut |v, keep| retract_replies(device, v, keep),
        ))
    })? {
        Answer::Spm(answer) | Answer::Direct(answer) => answer,
    };
    if answer["ok"] == json!(true) {
        Ok(answer)
    } else {
        Err(BackendError::new(
            answer["error"].as_str().unwrap_or("refused").to_string(),
        ))
    }
}

/// Who answered a request to change the pool.
pub enum Answer {
    /// The running SPM, through its control socket.
    Spm(Value),
    /// This command, on the pool directly under the domain lock.
    Direct(Value),
}

/// What [`with_pool`] runs when no SPM does.
pub type Offline<'a> =
    &'a mut dyn FnMut(&mut dyn SpmBackend, &Mailbox) -> Result<Value, BackendError>;

/// Sends `request` to the running SPM, or, if none runs, takes the domain
/// lock, checks that no SPM elsewhere is live, opens the backend with
/// `direct` and runs `offline` on it.
pub fn with_pool(
    device: &Path,
    control: Option<&Path>,
    request: &Value,
    direct: DirectBackend<'_>,
    offline: Offline<'_>,
) -> Result<Answer, BackendError> {
    let socket = control_path(device, control)?;
    if let Some(answer) = control::control_request(&socket, request)? {
        return Ok(Answer::Spm(answer));
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
        return Ok(Answer::Spm(answer));
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
    backend.note_release_commit(header.map_or(0, |h| h.release_commit));
    offline(backend.as_mut(), &mailbox).map(Answer::Direct)
}

/// Empties every reply (valid or stale) on the mailbox of `device` that says
/// `volume` was extended to more than `keep` bytes, and makes it durable:
/// what the SPM's driver does before a delete or reduce, done here by
/// a command that changes the pool without an SPM (it holds the domain
/// lock, and no SPM is live). Returns how many replies it emptied.
fn retract_replies(device: &Path, volume: Uuid, keep: u64) -> Result<usize, BackendError> {
    let mailbox = Mailbox::open(device, Access::ReadWrite)?;
    let g = mailbox.geometry();
    let domain = mailbox.superblock().domain;
    let sector = g.sector_size() as usize;
    let first = g.outbox_area(HostId::new(1)).unwrap_or(0);
    let len = usize::from(g.max_hosts()) * AREA_SIZE;
    let mut image = mailbox.read(first, len)?;
    let mut sectors = std::collections::BTreeSet::new();
    let mut count = 0;
    for host in 1..=g.max_hosts() {
        let at = usize::from(host - 1) * AREA_SIZE;
        let mut emptied = Vec::new();
        if let Some(outbox) = OutboxArea::new(&image[at..at + AREA_SIZE], domain, HostId::new(host))
        {
            for (slot, state) in outbox.slots() {
                if let SlotState::Valid(r) | SlotState::Stale(r) = state
                    && r.volume == volume
                    && r.status == ReplyStatus::Extended
                    && r.size > keep
                {
                    emptied.push(at + usize::from(slot.get()) * spmbox_core::wire::RECORD_LEN);
                }
            }
        }
        for record in emptied {
            count += 1;
            image[record..record + spmbox_core::wire::RECORD_LEN].fill(0);
            sectors.insert(record / sector);
        }
    }
    let device = mailbox.device();
    for &s in &sectors {
        let mut buf = crate::io::device::AlignedBuf::zeroed(sector, device.dio_mem_align());
        buf.copy_from_slice(&image[s * sector..(s + 1) * sector]);
        device
            .write_at(first + (s * sector) as u64, &buf)
            .map_err(|e| BackendError::device("emptying replies", e))?;
    }
    if !sectors.is_empty() {
        device
            .sync_data()
            .map_err(|e| BackendError::device("emptying replies", e))?;
    }
    Ok(count)
}

/// The longest `status` watches heartbeats by default (1.5 of the longest
/// heartbeat interval in the mailbox, at most this).
pub const STATUS_WATCH_MAX: Duration = Duration::from_secs(10);

/// A request slot as `status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotStatus {
    /// The host.
    pub host: HostId,
    /// The slot.
    pub slot: Slot,
    /// The request's sequence number.
    pub sequence: u64,
    /// The volume.
    pub volume: String,
    /// The size asked for.
    pub target: u64,
    /// Whether the guest is paused.
    pub paused: bool,
    /// `in flight`, `waiting for space` (parked by the SPM), or the final
    /// answer.
    pub state: String,
    /// How long the request has been there at least: the watch, when
    /// both reads saw it unanswered; 0 when it is new.
    pub age_ms_at_least: u64,
}

/// A host as `status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HostStatus {
    /// The host id.
    pub host: u16,
    /// The generation of the process that holds (or held) it.
    pub generation: u64,
    /// Its heartbeat counter at the second read.
    pub heartbeat: u64,
    /// Its heartbeat interval (0: it keeps no builtin lease: stopped and
    /// released, or held by a sanlock lease).
    pub heartbeat_interval_ms: u32,
    /// `alive` (the heartbeat moved while status watched), `silent` (it
    /// did not: the process is dead or hung), `released` (no heartbeat
    /// kept: stopped, or see `--lease sanlock`), `unknown` (not watched).
    pub state: &'static str,
    /// Whether it is alive; null when the mailbox cannot tell.
    pub alive: Option<bool>,
    /// When its heartbeat was last seen moving (RFC 3339, UTC); null when
    /// it was not seen moving.
    pub last_seen: Option<String>,
    /// For a silent host: its heartbeat stood still for at least this.
    pub silent_for_ms_at_least: Option<u64>,
}

/// What `status` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// The domain.
    pub domain: String,
    /// Host ids the mailbox serves.
    pub max_hosts: u16,
    /// The SPM header: epoch, id, state, heartbeat, and whether its
    /// heartbeat moved.
    pub spm: Value,
    /// Whether an SPM serves the domain: the header is active and its
    /// heartbeat moved while status watched (null: not watched).
    pub serving: Option<bool>,
    /// When no SPM serves it, why, in words.
    pub no_spm: Option<String>,
    /// How long status watched the heartbeats, milliseconds.
    pub watched_ms: u64,
    /// Hosts that have written an inbox header.
    pub hosts: Vec<HostStatus>,
    /// Requests without a final answer.
    pub requests: Vec<SlotStatus>,
    /// The pool.
    pub pool: Option<PoolReport>,
    /// What the running hosts on this machine report (allocation): only
    /// of hosts the mailbox does not show silent or released, whose
    /// process still runs.
    pub host_reports: Vec<Value>,
    /// How long each parked request (by volume) has waited, as the running
    /// SPM counts it: from its first *waiting for space* reply.
    pub parked_age_ms: std::collections::BTreeMap<String, u64>,
    /// Why the pool is missing, if it is.
    pub pool_error: Option<String>,
    /// Where the pool came from: `spm` (the running SPM's control
    /// socket, live), `metadata` (the committed metadata on the device:
    /// no SPM answered) or `none`.
    pub pool_source: &'static str,
    /// The running SPM's `pool remove-lun`, under way or the last one:
    /// the LUN, its state (`moving`, `reclaiming`, `done`, `failed`), the
    /// extents moved of those to move, the segment being copied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub removal: Option<Value>,
    /// Who holds the domain's sanlock leases (`status --lease sanlock`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leases: Option<Value>,
    /// What looks wrong, in words: a volume whose guest has written past
    /// the size the pool gives it (the pool was rolled back, or the host
    /// runs on a stale map).
    pub warnings: Vec<String>,
}

/// The fields of the records `status` reads, as plain numbers: the one
/// place that reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Beat {
    generation: u64,
    owner: u64,
    heartbeat: u64,
    interval_ms: u32,
}

fn spm_beat(h: &spmbox_core::wire::SpmHeader) -> Beat {
    Beat {
        generation: h.epoch.get(),
        owner: h.owner,
        heartbeat: h.heartbeat,
        interval_ms: h.heartbeat_interval_ms,
    }
}

fn host_beat(h: &spmbox_core::wire::InboxHeader) -> Beat {
    Beat {
        generation: h.generation.get(),
        owner: h.owner,
        heartbeat: h.heartbeat,
        interval_ms: h.heartbeat_interval_ms,
    }
}

/// One read of the mailbox.
struct Sample {
    image: crate::io::device::AlignedBuf,
    spm: Option<spmbox_core::wire::SpmHeader>,
    hosts: Vec<(u16, Beat)>,
    /// Unanswered requests: (host, slot, sequence).
    pending: Vec<(u16, u16, u64)>,
}

fn sample(mailbox: &Mailbox) -> Result<Sample, BackendError> {
    let g = mailbox.geometry();
    let domain = mailbox.superblock().domain;
    let image = mailbox.read_all()?;
    let spm = spm::read_spm_header(mailbox)?;
    let mut hosts = Vec::new();
    let mut pending = Vec::new();
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
        hosts.push((host, host_beat(&h)));
        let out_gen = outbox.header_generation();
        for (slot, state) in inbox.slots() {
            let SlotState::Valid(r) = state else {
                continue;
            };
            let final_answer = matches!(outbox.slot_under(slot, out_gen),
                Some(SlotState::Valid(reply)) if reply.answers(&r) && reply.status != ReplyStatus::WaitingForSpace);
            if !final_answer {
                pending.push((host, slot.get(), r.sequence));
            }
        }
    }
    Ok(Sample {
        image,
        spm,
        hosts,
        pending,
    })
}

/// Now as RFC 3339 (UTC, seconds).
fn rfc3339_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Gathers the status of the domain on `device`. The mailbox is read
/// twice, `watch` apart (default: 1.5 of the longest heartbeat interval
/// it names, at most [`STATUS_WATCH_MAX`]), so that a heartbeat that moved
/// tells a live SPM or host from a dead one.
pub fn status(
    device: &Path,
    control: Option<&Path>,
    watch: Option<Duration>,
) -> Result<Status, BackendError> {
    let mailbox = Mailbox::open(device, Access::ReadOnly)?;
    let g = mailbox.geometry();
    let domain = mailbox.superblock().domain;
    let first = sample(&mailbox)?;
    let longest = first
        .hosts
        .iter()
        .map(|(_, b)| b.interval_ms)
        .chain(first.spm.iter().map(|h| spm_beat(h).interval_ms))
        .max()
        .unwrap_or(0);
    let watch = watch.unwrap_or_else(|| {
        (Duration::from_millis(u64::from(longest)) * 3 / 2).min(STATUS_WATCH_MAX)
    });
    let watched = !watch.is_zero();
    if watched {
        std::thread::sleep(watch);
    }
    let second = sample(&mailbox)?;
    let watched_ms = watch.as_millis() as u64;
    let now = rfc3339_now();

    // The SPM.
    let (spm, serving, no_spm) = match second.spm {
        None => (
            json!(null),
            Some(false),
            Some("the SPM header is empty or damaged: no SPM is serving this domain".to_string()),
        ),
        Some(h) => {
            let beat = spm_beat(&h);
            let before = first.spm.as_ref().map(spm_beat);
            let moved = before.is_some_and(|b| b != beat);
            let active = h.state == SpmState::Active;
            let serving = if !active {
                Some(false)
            } else if watched {
                Some(moved)
            } else {
                None
            };
            let why = match (active, serving) {
                (false, _) => Some(
                    "the SPM header is vacant: no SPM is serving this domain (start one: \
                     systemctl start spmbox-spm@NAME)"
                        .to_string(),
                ),
                (true, Some(false)) => Some(format!(
                    "no SPM is serving this domain: the header names SPM {} at epoch {} as \
                     active, but its heartbeat did not move in {}: it is dead or hung",
                    h.spm_id,
                    beat.generation,
                    crate::units::Elapsed(watch)
                )),
                _ => None,
            };
            (
                json!({"epoch": beat.generation, "spm_id": h.spm_id,
                       "state": if active { "active" } else { "vacant" },
                       "heartbeat": beat.heartbeat, "heartbeat_interval_ms": beat.interval_ms,
                       "heartbeat_moved": if watched { json!(moved) } else { json!(null) },
                       "last_seen": if moved { json!(now) } else { json!(null) }}),
                serving,
                why,
            )
        }
    };

    // The hosts.
    let hosts: Vec<HostStatus> = second
        .hosts
        .iter()
        .map(|&(host, beat)| {
            let before = first
                .hosts
                .iter()
                .find(|(h, _)| *h == host)
                .map(|(_, b)| *b);
            let moved = before.is_some_and(|b| b != beat);
            let (state, alive) = if moved {
                ("alive", Some(true))
            } else if beat.interval_ms == 0 {
                ("released", None)
            } else if !watched || watch < Duration::from_millis(u64::from(beat.interval_ms)) {
                // Not watched for a whole heartbeat interval.
                ("unknown", None)
            } else {
                ("silent", Some(false))
            };
            HostStatus {
                host,
                generation: beat.generation,
                heartbeat: beat.heartbeat,
                heartbeat_interval_ms: beat.interval_ms,
                state,
                alive,
                last_seen: moved.then(|| now.clone()),
                silent_for_ms_at_least: (state == "silent").then_some(watched_ms),
            }
        })
        .collect();

    // The requests, from the second read.
    let mut requests = Vec::new();
    for host in 1..=g.max_hosts() {
        let id = HostId::new(host);
        let (Some(ib), Some(ob)) = (g.inbox_area(id), g.outbox_area(id)) else {
            continue;
        };
        let image = &second.image;
        let area = |at: u64| &image[at as usize..at as usize + AREA_SIZE];
        let (Some(inbox), Some(outbox)) = (
            InboxArea::new(area(ib), domain, id),
            OutboxArea::new(area(ob), domain, id),
        ) else {
            continue;
        };
        if !matches!(inbox.header(), Ok(Some(_))) {
            continue;
        }
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
                Some(other) => other.name().replace('_', " "),
            };
            let seen_before = first.pending.contains(&(host, slot.get(), r.sequence));
            requests.push(SlotStatus {
                host: HostId::new(host),
                slot,
                sequence: r.sequence,
                volume: r.volume.to_string(),
                target: r.target_size,
                paused: r.paused,
                state,
                age_ms_at_least: if seen_before && watched {
                    watched_ms
                } else {
                    0
                },
            });
        }
    }
    let socket = control_path(device, control)?;
    let mut parked_age_ms = std::collections::BTreeMap::new();
    let mut removal = None;
    let (pool, pool_error, pool_source) =
        match control::control_request(&socket, &json!({"op": "status"})) {
            Ok(Some(answer)) => match pool_from_json(&answer["pool"]) {
                Some(p) if answer["removal"].is_object() => {
                    removal = Some(answer["removal"].clone());
                    for (v, ms) in answer["parked_age_ms"].as_object().into_iter().flatten() {
                        if let Some(ms) = ms.as_u64() {
                            parked_age_ms.insert(v.clone(), ms);
                        }
                    }
                    (Some(p), None, "spm")
                }
                Some(p) if answer["parked_age_ms"].is_object() => {
                    for (v, ms) in answer["parked_age_ms"].as_object().into_iter().flatten() {
                        if let Some(ms) = ms.as_u64() {
                            parked_age_ms.insert(v.clone(), ms);
                        }
                    }
                    (Some(p), None, "spm")
                }
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
                // A report counts only while its process runs and the
                // mailbox does not show its host id silent or released:
                // a dead host's file stays behind.
                let pid_runs = v["pid"]
                    .as_u64()
                    .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
                let host_state = hosts
                    .iter()
                    .find(|h| v["host"].as_u64() == Some(u64::from(h.host)))
                    .map(|h| h.state);
                if pid_runs && matches!(host_state, Some("alive" | "unknown")) {
                    host_reports.push(v);
                }
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
        serving,
        no_spm,
        watched_ms,
        hosts,
        requests,
        pool,
        host_reports,
        pool_error,
        parked_age_ms,
        pool_source,
        removal,
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
        segments: v["segments"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(id, runs)| {
                        let runs = runs
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|r| {
                                Some(crate::backend::SegmentReport {
                                    lun: r["lun"].as_str()?.to_owned(),
                                    first_extent: r["first_extent"].as_u64()?,
                                    extents: r["extents"].as_u64()?,
                                })
                            })
                            .collect();
                        (id.clone(), runs)
                    })
                    .collect()
            })
            .unwrap_or_default(),
        released_extents: v["released_extents"].as_u64().unwrap_or(0),
        moving: v["moving"].as_str().map(str::to_owned),
    })
}

/// Renders a status as text.
pub fn render(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(o, "domain {} ({} host ids)", s.domain, s.max_hosts);
    let watched = crate::units::Elapsed(Duration::from_millis(s.watched_ms));
    match s.spm.as_object() {
        Some(h) if s.serving == Some(true) => {
            let _ = writeln!(
                o,
                "SPM: id {}, epoch {}: serving (heartbeat {} every {} ms, moved in the last {watched})",
                h["spm_id"], h["epoch"], h["heartbeat"], h["heartbeat_interval_ms"]
            );
        }
        Some(h) if s.serving.is_none() => {
            let _ = writeln!(
                o,
                "SPM: id {}, epoch {}, {} (heartbeat {}; not watched: liveness unknown)",
                h["spm_id"],
                h["epoch"],
                h["state"].as_str().unwrap_or("?"),
                h["heartbeat"]
            );
        }
        _ => {}
    }
    if let Some(why) = &s.no_spm {
        let _ = writeln!(o, "SPM: {why}");
    }
    let alive = s.hosts.iter().filter(|h| h.alive == Some(true)).count();
    let _ = writeln!(o, "hosts: {} ({alive} alive)", s.hosts.len());
    for h in &s.hosts {
        let what = match h.state {
            "alive" => format!(
                "alive, last seen {}",
                h.last_seen.as_deref().unwrap_or("now")
            ),
            "silent" => format!(
                "NOT ALIVE: heartbeat {} has not moved for at least {watched} (dead or hung)",
                h.heartbeat
            ),
            "released" => "no heartbeat: stopped and released, or held by a sanlock lease \
                           (--lease sanlock shows it)"
                .to_string(),
            _ => "liveness unknown (not watched long enough)".to_string(),
        };
        let _ = writeln!(o, "  host {} generation {}: {what}", h.host, h.generation);
    }
    let _ = writeln!(o, "requests: {}", s.requests.len());
    for r in &s.requests {
        let age = if r.age_ms_at_least > 0 {
            format!(
                " for at least {}",
                crate::units::Elapsed(Duration::from_millis(r.age_ms_at_least))
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            o,
            "  host {} slot {} volume {} to {}{}: {}{age}",
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
                "pool ({}, {}): {} of {} extents free{}, extent {}, {} LUNs",
                p.backend,
                if s.pool_source == "spm" {
                    "live from the running SPM"
                } else {
                    "as committed; no SPM answered, parked requests are not shown"
                },
                p.free_extents,
                p.total_extents,
                if p.released_extents > 0 {
                    format!(
                        " ({} more released, waiting for hosts to acknowledge)",
                        p.released_extents
                    )
                } else {
                    String::new()
                },
                Bytes(p.extent_size),
                p.luns.len()
            );
            if let Some(r) = &s.removal {
                let _ = writeln!(
                    o,
                    "  remove-lun {}: {}, {}{}",
                    r["lun"].as_str().unwrap_or("?"),
                    r["state"].as_str().unwrap_or("?"),
                    crate::daemon::remove_lun::progress_words(r),
                    r["error"]
                        .as_str()
                        .map_or_else(String::new, |e| format!(": {e}"))
                );
            }
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
                let age = s.parked_age_ms.get(v).map_or(String::new(), |ms| {
                    format!(
                        ", for {}",
                        crate::units::Elapsed(Duration::from_millis(*ms))
                    )
                });
                let _ = writeln!(o, "  parked: volume {v} to {}{age}", Bytes(*t));
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
