//! The commands of the `spmbox` binary, and their exit codes.

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use spmbox_core::wire::{HostId, RECORD_LEN, SPM_HEADER_OFFSET, SpmHeader, Uuid};

use crate::cli::args::{
    AddLunArgs, ConfigCheckArgs, FormatArgs, GenerateAssetsArgs, HostArgs, InspectArgs,
    PoolCreateArgs, RepairArgs, SpmArgs, StatusArgs, UpgradeArgs, VolumeCreateArgs,
};
use crate::cli::inspect;
use crate::io::device::Access;
use crate::io::mailbox::{self, FormatOptions, Mailbox, MailboxError};
use crate::units::Bytes;

/// Exit status: success; for `inspect`, the mailbox is valid.
pub const EXIT_OK: u8 = 0;
/// Exit status: an error (I/O, permissions, a refused operation).
pub const EXIT_ERROR: u8 = 1;
/// Exit status: the command line makes no sense.
pub const EXIT_USAGE: u8 = 2;
/// Exit status of `inspect`: the mailbox has defective records or nonzero
/// bytes where there must be zeroes.
pub const EXIT_DEFECTS: u8 = 3;
/// Exit status: the device holds no usable mailbox (no spmbox superblock,
/// a damaged one, another version), or the device does not fit the mailbox
/// (sector size, size).
pub const EXIT_NOT_A_MAILBOX: u8 = 4;
/// Exit status: a program or file the command needs is not installed
/// (`--vm` without qemu, a kernel or busybox); the message names the
/// package. The same number as [`EXIT_NOT_A_MAILBOX`]: nothing was done
/// and nothing will be until the machine is set up.
pub const EXIT_MISSING: u8 = 4;

/// An error of a command, with the exit status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Opening or formatting failed.
    #[error(transparent)]
    Mailbox(#[from] MailboxError),
    /// The arguments make no sense for this mailbox.
    #[error("{0}")]
    Usage(String),
    /// Writing the output failed.
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
    /// A domain, daemon or backend operation failed.
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
    /// Something the command needs is not installed.
    #[error("{0}")]
    Missing(String),
}

impl CommandError {
    /// The exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CommandError::Usage(_) => EXIT_USAGE,
            CommandError::Missing(_) => EXIT_MISSING,
            CommandError::Mailbox(e) if e.is_no_usable_mailbox() => EXIT_NOT_A_MAILBOX,
            CommandError::Backend(e) if e.is_no_usable_mailbox() => EXIT_NOT_A_MAILBOX,
            CommandError::Mailbox(_) | CommandError::Output(_) | CommandError::Backend(_) => {
                EXIT_ERROR
            }
        }
    }
}

/// The largest `spmbox host --write-size`: each guest holds a buffer of
/// this size.
pub const WRITE_SIZE_MAX: u64 = 64 << 20;

/// Parses the UUID given with `flag`; the nil UUID is refused (the format
/// reserves it for "none").
pub(crate) fn parse_uuid(flag: &str, text: &str) -> Result<Uuid, CommandError> {
    match Uuid::parse_str(text) {
        Some(u) if u.is_nil() => Err(CommandError::Usage(format!(
            "{flag} {text:?} is the nil UUID, which marks an empty record; give another UUID \
             (or leave {flag} out for a random one where that is allowed)"
        ))),
        Some(u) => Ok(u),
        None => Err(CommandError::Usage(format!(
            "{flag} {text:?} is not a UUID (expected 8-4-4-4-12 hex digits)"
        ))),
    }
}

/// `spmbox format`.
pub fn format(args: &FormatArgs) -> Result<ExitCode, CommandError> {
    let path = args.device.as_path();
    let domain = args
        .domain
        .as_deref()
        .map(|text| parse_uuid("--domain", text))
        .transpose()?;
    let options = FormatOptions {
        hosts: args.hosts,
        sector_size: args.sector_size(),
        domain,
        force: args.force,
    };
    let done = mailbox::format(path, &options)?;
    let g = done.superblock.geometry;
    tracing::info!(device = %path.display(), domain = %done.superblock.domain, "formatted mailbox");
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} {}: domain {}, {} hosts, {}-byte sectors, mailbox {}",
        if done.created {
            "created and formatted"
        } else {
            "formatted"
        },
        path.display(),
        done.superblock.domain,
        g.max_hosts(),
        g.sector_size(),
        Bytes(g.mailbox_size())
    )?;
    Ok(ExitCode::from(EXIT_OK))
}

/// `spmbox repair`.
pub fn repair(args: &RepairArgs) -> Result<ExitCode, CommandError> {
    let path = args.device.as_path();
    let domain = match args.domain.as_deref() {
        Some(text) => Some(Uuid::parse_str(text).filter(|u| !u.is_nil()).ok_or_else(|| {
            CommandError::Usage(format!(
                "--domain {text:?} is not a UUID (expected 8-4-4-4-12 hex digits, not all zero)"
            ))
        })?),
        None => None,
    };
    let (superblock, from) = mailbox::repair(path, args.hosts, args.sector_size(), domain)?;
    let what = match from {
        mailbox::RepairedFrom::Intact => "both copies are intact; nothing written",
        mailbox::RepairedFrom::Primary => "the backup rewritten from the superblock",
        mailbox::RepairedFrom::Backup => "the superblock rewritten from its backup",
        mailbox::RepairedFrom::Given => "both rewritten from the values given",
    };
    writeln!(
        std::io::stdout().lock(),
        "{}: domain {}, {} hosts, {}-byte sectors: {what}",
        path.display(),
        superblock.domain,
        superblock.geometry.max_hosts(),
        superblock.geometry.sector_size()
    )?;
    Ok(ExitCode::from(EXIT_OK))
}

/// `spmbox upgrade`.
pub fn upgrade(args: &UpgradeArgs) -> Result<ExitCode, CommandError> {
    let path = args.device.as_path();
    let done = mailbox::upgrade(path)?;
    let changed = done.from_version != done.to_version;
    let (epoch, pool_commit) = match &done.spm_header {
        Ok(Some(h)) => (Some(h.epoch.get()), Some(h.pool_commit)),
        _ => (None, None),
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        let value = serde_json::json!({
            "device": path.display().to_string(),
            "from_version": done.from_version,
            "to_version": done.to_version,
            "changed": changed,
            "records_rewritten": done.records_rewritten,
            "doorbell_cleared": done.doorbell_cleared,
            "defective_left": done.defective_left,
            "records_already_upgraded": done.already_new,
            "superblock_needs_repair": done.superblock_needs_repair,
            "epoch": epoch,
            "pool_commit": pool_commit,
        });
        writeln!(out, "{value}")?;
        return Ok(ExitCode::from(EXIT_OK));
    }
    if !changed {
        writeln!(
            out,
            "{}: the mailbox is already version {} of the format; nothing to upgrade, nothing \
             written",
            path.display(),
            done.to_version
        )?;
        return Ok(ExitCode::from(EXIT_OK));
    }
    let plural = |n: usize, one: &str, many: &str| {
        format!("{} {}", grouped(n), if n == 1 { one } else { many })
    };
    let mut what = vec![plural(
        done.records_rewritten,
        "record rewritten",
        "records rewritten",
    )];
    if done.doorbell_cleared {
        what.push("the doorbell cleared".into());
    }
    if done.defective_left > 0 {
        what.push(format!(
            "{} left as {} (`spmbox inspect` lists them)",
            plural(done.defective_left, "defective record", "defective records"),
            if done.defective_left == 1 {
                "it was"
            } else {
                "they were"
            }
        ));
    }
    let kept = match &done.spm_header {
        Ok(Some(h)) => format!("epoch {} and pool commit {} kept", h.epoch, h.pool_commit),
        Ok(None) => "the SPM header is empty".into(),
        Err(_) => "the SPM header is damaged and was left as it was".into(),
    };
    writeln!(
        out,
        "upgraded {} from format version {} to {}: {}; {kept}",
        path.display(),
        done.from_version,
        done.to_version,
        what.join(", ")
    )?;
    if done.already_new > 0 {
        writeln!(
            out,
            "{} of version {} already (an earlier run was interrupted) left as they were",
            plural(done.already_new, "record", "records"),
            done.to_version
        )?;
    }
    if done.superblock_needs_repair {
        writeln!(
            out,
            "one copy of the superblock was damaged before and was left as it was: rewrite it \
             from the other with `spmbox repair --device {}`",
            path.display()
        )?;
    }
    writeln!(out, "start the SPM and the hosts again with this spmbox")?;
    Ok(ExitCode::from(EXIT_OK))
}

/// `n` with a comma between groups of three digits: 4,031.
fn grouped(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `spmbox inspect`.
pub fn inspect(args: &InspectArgs) -> Result<ExitCode, CommandError> {
    let (path, host, json) = (args.device.as_path(), args.host, args.json);
    let mailbox = Mailbox::open(path, Access::ReadOnly)?;
    let geometry = mailbox.geometry();
    if let Some(h) = host {
        if geometry.inbox_area(HostId::new(h)).is_none() {
            return Err(CommandError::Usage(format!(
                "--host {h} is out of range: the mailbox on {} has host ids 1..={}",
                path.display(),
                geometry.max_hosts()
            )));
        }
    }
    let image = mailbox.read_all()?;
    let report = inspect::audit(&image, mailbox.superblock(), host.map(HostId::new));
    let pool = pool_metadata_report(path, &mailbox, &image)?;
    let device = path.display().to_string();
    let mut out = std::io::stdout().lock();
    if json {
        let mut value = inspect::to_json(&report, &device);
        value["pool_metadata"] = pool.as_ref().map_or(serde_json::Value::Null, |p| p.json());
        if pool.as_ref().is_some_and(|p| !p.problems.is_empty()) {
            value["valid"] = serde_json::Value::Bool(false);
        }
        let text = serde_json::to_string_pretty(&value).map_err(std::io::Error::other)?;
        writeln!(out, "{text}")?;
    } else {
        write!(out, "{}", inspect::render(&report, &device))?;
        if let Some(p) = &pool {
            write!(out, "{}", p.render())?;
        }
    }
    let code = if report.problems.is_empty() && pool.as_ref().is_none_or(|p| p.problems.is_empty())
    {
        EXIT_OK
    } else {
        EXIT_DEFECTS
    };
    Ok(ExitCode::from(code))
}

/// The builtin pool's two metadata copies as `inspect` reports them.
struct PoolMetadataReport {
    /// Per copy: its name, offset, and commit or why it is not used.
    copies: Vec<(
        &'static str,
        u64,
        Result<u64, spmbox_core::pool::CopyDefect>,
    )>,
    /// The commit the SPM header says was made durable.
    header_commit: u64,
    /// What is wrong, in words.
    problems: Vec<String>,
}

impl PoolMetadataReport {
    fn newest(&self) -> Option<u64> {
        self.copies.iter().filter_map(|(_, _, c)| c.ok()).max()
    }

    fn json(&self) -> serde_json::Value {
        let copies: Vec<serde_json::Value> = self
            .copies
            .iter()
            .map(|(name, offset, state)| match state {
                Ok(seq) => serde_json::json!({"copy": name, "offset": offset, "state": "valid", "commit": seq}),
                Err(spmbox_core::pool::CopyDefect::Empty) => {
                    serde_json::json!({"copy": name, "offset": offset, "state": "empty"})
                }
                Err(d) => serde_json::json!({"copy": name, "offset": offset, "state": "defective", "why": d.to_string()}),
            })
            .collect();
        serde_json::json!({
            "copies": copies,
            "newest_commit": self.newest(),
            "spm_header_pool_commit": self.header_commit,
            "problems": self.problems,
        })
    }

    fn render(&self) -> String {
        let mut text = String::from("pool metadata:\n");
        for (name, offset, state) in &self.copies {
            let what = match state {
                Ok(seq) if Some(*seq) == self.newest() => format!("commit {seq} (newest, in use)"),
                Ok(seq) => format!("commit {seq}"),
                Err(spmbox_core::pool::CopyDefect::Empty) => "empty".to_string(),
                Err(d) => format!("DEFECTIVE: {d}"),
            };
            text.push_str(&format!("  copy {name} at {offset:#x}: {what}\n"));
        }
        text.push_str(&format!(
            "  the SPM header says commit {} was made durable\n",
            self.header_commit
        ));
        for p in &self.problems {
            text.push_str(&format!("  PROBLEM: {p}\n"));
        }
        text
    }
}

/// Checks the builtin pool's metadata copies after the mailbox, when the
/// device has room for them: each copy on its own, and the newest against
/// the commit the SPM header says was made durable. `None` for a bare
/// mailbox (or an lvm domain's).
fn pool_metadata_report(
    path: &Path,
    mailbox: &Mailbox,
    image: &[u8],
) -> Result<Option<PoolMetadataReport>, CommandError> {
    if mailbox.device().size() < crate::backend::builtin::domain_size(mailbox.geometry()) {
        return Ok(None);
    }
    let domain = crate::backend::builtin::Domain::open(path, Access::ReadOnly)?;
    let [a, b] = domain.check_copies()?;
    let header = image
        .get(SPM_HEADER_OFFSET as usize..SPM_HEADER_OFFSET as usize + RECORD_LEN)
        .and_then(|r| SpmHeader::decode(r).ok().flatten());
    let header_commit = header.map_or(0, |h| h.pool_commit);
    let mut report = PoolMetadataReport {
        copies: vec![("A", a.0, a.1), ("B", b.0, b.1)],
        header_commit,
        problems: Vec::new(),
    };
    if report.copies.iter().all(|(_, _, c)| c.is_err()) {
        // An lvm domain reserves the space and leaves it empty.
        if report
            .copies
            .iter()
            .all(|(_, _, c)| *c == Err(spmbox_core::pool::CopyDefect::Empty))
        {
            return Ok(None);
        }
        report
            .problems
            .push("no copy is valid: the pool cannot be loaded".to_string());
    }
    for (name, _, state) in &report.copies {
        if let Err(d) = state
            && *d != spmbox_core::pool::CopyDefect::Empty
        {
            report.problems.push(format!(
                "copy {name} is defective ({d}); a commit torn by a crash leaves this, and the \
                 next commit overwrites it, unless the other copy is older than the SPM header's \
                 commit (then see the next line)"
            ));
        }
    }
    if let Some(newest) = report.newest()
        && newest < header_commit
    {
        report.problems.push(format!(
            "the newest valid copy is commit {newest}, older than the commit {header_commit} the \
             SPM header says was made durable: the pool was rolled back (a damaged newest copy \
             or a lost write). The SPM refuses to start on it; see docs/operations.md, \
             \"Damaged or rolled-back pool metadata\""
        ));
    }
    Ok(Some(report))
}

/// Which backend a command uses.
#[derive(Debug, Clone)]
pub enum BackendArgs {
    /// The builtin pool on the domain device.
    Builtin,
    /// lvm2: the volume group and its PVs.
    Lvm {
        /// The volume group.
        vg: String,
        /// Its PVs.
        pvs: Vec<std::path::PathBuf>,
    },
}

/// Which leases protect the SPM role and host ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseArgs {
    /// None on shared storage: the SPM header's heartbeat and a lock on
    /// this machine.
    Builtin,
    /// sanlock: the lockspace and the SPM resource lease on the domain
    /// device.
    Sanlock {
        /// sanlock's I/O timeout, seconds.
        io_timeout: u32,
    },
}

/// The sanlock lease area of the domain on `device`, and its UUID.
fn lease_area(device: &Path) -> Result<(crate::daemon::sanlock::Area, Uuid), CommandError> {
    let mailbox = Mailbox::open(device, Access::ReadOnly)?;
    let path = std::fs::canonicalize(device)
        .map_err(|e| CommandError::Usage(format!("--device {}: {e}", device.display())))?;
    Ok((
        crate::daemon::sanlock::Area::of(&path, mailbox.geometry()),
        mailbox.superblock().domain,
    ))
}

pub(crate) fn open_spm_backend(
    device: &Path,
    backend: &BackendArgs,
) -> Result<Box<dyn crate::backend::SpmBackend>, crate::backend::BackendError> {
    match backend {
        BackendArgs::Builtin => crate::cli::admin::builtin(device),
        BackendArgs::Lvm { vg, pvs } => crate::backend::lvm_glue::spm_backend(vg, pvs),
    }
}

pub(crate) fn print_json(value: &serde_json::Value) -> Result<(), CommandError> {
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    writeln!(std::io::stdout().lock(), "{text}")?;
    Ok(())
}

/// `spmbox pool create`.
pub fn pool_create(args: &PoolCreateArgs) -> Result<ExitCode, CommandError> {
    let (device, luns, hosts) = (args.device.as_path(), args.luns.as_slice(), args.hosts);
    let sector_size = args.sector_size();
    let backend = args.lvm.to_backend();
    let lease = args.lease.to_lease();
    if let LeaseArgs::Sanlock { .. } = lease {
        check_lease_room(device, hosts, sector_size)?;
    }
    let domain = args
        .domain
        .as_deref()
        .map(|text| parse_uuid("--domain", text))
        .transpose()?;
    let options = crate::backend::builtin::CreateOptions {
        hosts,
        sector_size,
        domain,
        extent_size: args.extent_size,
        force: args.force,
    };
    let mut out = std::io::stdout().lock();
    match &backend {
        BackendArgs::Builtin => {
            let (id, labels) = crate::backend::builtin::create(device, luns, &options)?;
            writeln!(
                out,
                "created domain {id} on {}: {hosts} hosts",
                device.display()
            )?;
            for (path, label) in luns.iter().zip(&labels) {
                writeln!(
                    out,
                    "  LUN {} on {}: {} extents of {}",
                    label.lun,
                    path.display(),
                    label.extents,
                    Bytes(label.extent_size)
                )?;
            }
        }
        BackendArgs::Lvm { vg, pvs } => {
            let id = crate::backend::lvm_glue::create(device, luns, &options, vg, pvs)?;
            writeln!(
                out,
                "created domain {id} on {}: {hosts} hosts, volume group {vg} on {} PVs",
                device.display(),
                luns.len()
            )?;
        }
    }
    if let LeaseArgs::Sanlock { io_timeout } = lease {
        let (area, id) = lease_area(device)?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(device)
            .map_err(|e| CommandError::Usage(format!("--device {}: {e}", device.display())))?;
        if file.metadata()?.is_file() && file.metadata()?.len() < area.end() {
            file.set_len(area.end())?;
        }
        crate::daemon::sanlock::init(&area, id, io_timeout)?;
        writeln!(
            out,
            "  sanlock leases: lockspace {id} at {}, SPM lease at {} (io timeout {io_timeout} s)",
            area.lockspace, area.resource
        )?;
    }
    Ok(ExitCode::from(EXIT_OK))
}

/// Refuses, before anything is written, a domain device too small for the
/// sanlock lease area (a regular file is extended), or a machine without
/// the `sanlock` command.
fn check_lease_room(device: &Path, hosts: u16, sector: Option<u32>) -> Result<(), CommandError> {
    crate::daemon::sanlock::check_tool()?;
    let Ok(meta) = std::fs::metadata(device) else {
        return Ok(());
    };
    if meta.is_file() {
        return Ok(());
    }
    let d = crate::io::device::Device::open(device, Access::ReadOnly)
        .map_err(|e| CommandError::Usage(format!("--device {}: {e}", device.display())))?;
    let sector = sector.unwrap_or(d.sector_size());
    let geometry = spmbox_core::wire::Geometry::new(hosts, sector)
        .map_err(|e| CommandError::Usage(e.to_string()))?;
    let need = crate::daemon::sanlock::Area::of(device, geometry).end();
    if d.size() < need {
        return Err(CommandError::Usage(format!(
            "{} is {}; a domain for {hosts} hosts with sanlock leases needs {} (mailbox, pool \
             metadata and the lease area); use a larger device",
            device.display(),
            Bytes(d.size()),
            Bytes(need)
        )));
    }
    Ok(())
}

/// `spmbox pool add-lun`.
pub fn add_lun(args: &AddLunArgs) -> Result<ExitCode, CommandError> {
    let (device, lun, control) = (
        args.device.as_path(),
        args.lun.as_path(),
        args.control.as_deref(),
    );
    let backend = &args.lvm.to_backend();
    let lun = std::fs::canonicalize(lun)
        .map_err(|e| CommandError::Usage(format!("--lun {}: {e}", lun.display())))?;
    if args.firmware {
        let message =
            crate::cli::firmware::add_lun(device, &lun, std::time::Duration::from_secs(args.wait))?;
        writeln!(std::io::stdout().lock(), "{message}")?;
        return Ok(ExitCode::from(EXIT_OK));
    }
    let request = serde_json::json!({"op": "add_lun", "path": lun});
    let answer = crate::cli::admin::change_pool(device, control, &request, &|| {
        open_spm_backend(device, backend)
    })?;
    writeln!(
        std::io::stdout().lock(),
        "{}",
        answer["message"].as_str().unwrap_or("LUN added")
    )?;
    Ok(ExitCode::from(EXIT_OK))
}

/// `spmbox volume create`.
pub fn volume_create(args: &VolumeCreateArgs) -> Result<ExitCode, CommandError> {
    let (device, control) = (args.device.as_path(), args.control.as_deref());
    let (virtual_size, initial_size) = (args.virtual_size, args.initial_size);
    let backend = &args.lvm.to_backend();
    let id = match args.id.as_deref() {
        Some(text) => parse_uuid("--id", text)?,
        None => mailbox::random_uuid()?,
    };
    if virtual_size == 0 || virtual_size % 512 != 0 {
        return Err(CommandError::Usage(format!(
            "--virtual-size {virtual_size} must be a nonzero multiple of 512 bytes"
        )));
    }
    let request = serde_json::json!({"op": "create_volume", "id": id.to_string(),
        "virtual_size": virtual_size, "initial_size": initial_size});
    let answer = crate::cli::admin::change_pool(device, control, &request, &|| {
        open_spm_backend(device, backend)
    })?;
    let size = answer["volume"]["size"].as_u64().unwrap_or(0);
    writeln!(std::io::stdout().lock(), "{id}")?;
    tracing::info!(
        "created volume {id}: virtual {}, physical {}",
        Bytes(virtual_size),
        Bytes(size)
    );
    Ok(ExitCode::from(EXIT_OK))
}

/// `spmbox status`.
pub fn status(args: &StatusArgs) -> Result<ExitCode, CommandError> {
    let device = args.device.as_path();
    let mut s = crate::cli::admin::status(device, args.control.as_deref(), args.watch)?;
    if let LeaseArgs::Sanlock { .. } = args.lease.to_lease() {
        let (area, id) = lease_area(device)?;
        s.leases = Some(crate::daemon::sanlock::holders(&area, id)?);
    }
    if args.json {
        print_json(&serde_json::to_value(&s).map_err(std::io::Error::other)?)?;
    } else {
        let mut text = crate::cli::admin::render(&s);
        if let Some(leases) = &s.leases {
            text.push_str(&crate::daemon::sanlock::render(leases));
        }
        write!(std::io::stdout().lock(), "{text}")?;
    }
    Ok(ExitCode::from(EXIT_OK))
}

fn stop_flag() -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>, CommandError> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    Ok(stop)
}

/// `spmbox spm`.
pub fn spm(args: &SpmArgs) -> Result<ExitCode, CommandError> {
    let device = args.device.as_path();
    let (doorbell_interval, full_scan_interval) = (args.doorbell_interval, args.full_scan_interval);
    let spm_id = args.spm_id;
    let backend = &args.lvm.to_backend();
    if doorbell_interval.is_zero() || full_scan_interval.is_zero() {
        return Err(CommandError::Usage(
            "--doorbell-interval and --full-scan-interval must be nonzero".into(),
        ));
    }
    let control = match &args.control {
        Some(c) => c.clone(),
        None => crate::cli::admin::control_path(device, None)?,
    };
    let options = crate::daemon::spm::SpmOptions {
        device: device.to_owned(),
        config: crate::daemon::spm::daemon_config(doorbell_interval, full_scan_interval),
        spm_id,
        control,
        metrics: args.metrics.clone(),
        lease_version: 0,
        accept_metadata_rollback: args.accept_metadata_rollback,
        pool_warn: args.pool_warn.clone(),
        discard: args.discard.then(|| args.lun_search.clone()),
        lun_search: args.lun_search.clone(),
    };
    let mut options = options;
    let stop = stop_flag()?;
    // The SPM lease is taken before the daemon writes anything, and held
    // until it has stopped.
    let spm_lease = match args.lease.to_lease() {
        LeaseArgs::Builtin => None,
        LeaseArgs::Sanlock { io_timeout } => {
            let (area, id) = lease_area(device)?;
            let held = crate::daemon::sanlock::acquire_spm(&area, id, spm_id, io_timeout)?;
            options.lease_version = held.lver;
            Some(held)
        }
    };
    let result = crate::daemon::spm::run(&options, &|| open_spm_backend(device, backend), stop);
    if let Some(held) = spm_lease {
        held.release();
    }
    result?;
    Ok(ExitCode::from(EXIT_OK))
}

/// `spmbox host`.
pub fn host(args: &HostArgs) -> Result<ExitCode, CommandError> {
    let lease = args.lease.to_lease();
    let mut volumes = Vec::new();
    for text in &args.volumes {
        let id = parse_uuid("--volume", text)?;
        if volumes.contains(&id) {
            return Err(CommandError::Usage(format!("--volume {id} is given twice")));
        }
        volumes.push(id);
    }
    if volumes.len() > crate::daemon::host::HOST_VOLUMES {
        return Err(CommandError::Usage(format!(
            "{} volumes given: a host runs at most {} (--volume)",
            volumes.len(),
            crate::daemon::host::HOST_VOLUMES
        )));
    }
    if args.write_size == 0
        || args.write_size % crate::daemon::guest::BLOCK != 0
        || args.write_size > WRITE_SIZE_MAX
    {
        return Err(CommandError::Usage(format!(
            "--write-size {} must be a nonzero multiple of 4K of at most {} (each guest \
             holds a buffer of this size)",
            args.write_size,
            Bytes(WRITE_SIZE_MAX)
        )));
    }
    if args.chunk_size == 0 {
        return Err(CommandError::Usage(
            "--chunk-size must be nonzero: it is how much a volume grows per request \
             (say 256M)"
                .into(),
        ));
    }
    if args.utilization > 100 {
        return Err(CommandError::Usage("--utilization must be 0..=100".into()));
    }
    let mailbox = Mailbox::open(&args.device, Access::ReadOnly)?;
    let domain = mailbox.superblock().domain;
    if mailbox
        .geometry()
        .inbox_area(HostId::new(args.host_id))
        .is_none()
    {
        return Err(CommandError::Usage(format!(
            "--host-id {} is out of range: the domain on {} has host ids 1..={}",
            args.host_id,
            args.device.display(),
            mailbox.geometry().max_hosts()
        )));
    }
    let search = if args.lun_search.is_empty() {
        crate::backend::builtin::default_search(&args.device, mailbox.device().kind())
    } else {
        args.lun_search.clone()
    };
    drop(mailbox);
    let mut maps: Box<dyn crate::backend::VolumeMaps> = match &args.lvm.to_backend() {
        BackendArgs::Builtin => Box::new(crate::backend::builtin::BuiltinMaps::open(
            &args.device,
            search,
        )?),
        BackendArgs::Lvm { vg, pvs } => crate::backend::lvm_glue::maps(vg, pvs)?,
    };
    let status_file = crate::cli::admin::host_status_file(domain, args.host_id);
    if let Some(dir) = status_file.parent() {
        crate::daemon::control::private_dir(dir)?;
    }
    let vm = if args.vm {
        crate::vm::image::find_tools().map_err(|e| CommandError::Missing(e.to_string()))?;
        Some(crate::vm::VmOptions {
            dir: crate::vm::vm_dir(),
            kernel: args.vm_kernel.clone(),
            initrd: args.vm_initrd.clone(),
            rate: args.rate,
            write_size: args.write_size,
            guest_bytes: args.guest_bytes,
        })
    } else {
        None
    };
    let options = crate::daemon::host::HostOptions {
        device: args.device.clone(),
        host_id: args.host_id,
        volumes,
        config: spmbox_core::host::HostConfig {
            chunk_size: args.chunk_size,
            utilization_percent: args.utilization,
            // sanlock's delta lease holds the host id; the inbox header
            // then says that no builtin lease is kept.
            lease_interval: match lease {
                LeaseArgs::Builtin => spmbox_core::host::HostConfig::default().lease_interval,
                LeaseArgs::Sanlock { .. } => std::time::Duration::ZERO,
            },
            ..Default::default()
        },
        rate: args.rate,
        write_size: args.write_size,
        guest_bytes: args.guest_bytes,
        exit_when_done: args.exit_when_done,
        json_events: args.json_events,
        status_file: Some(status_file),
        metrics: args.metrics.clone(),
        vm,
        keep_latencies: false,
        no_spm_warning: args.no_spm_warning,
    };
    let stop = stop_flag()?;
    // The host id is joined before the host writes anything, and left
    // after it has stopped.
    let joined = match lease {
        LeaseArgs::Builtin => None,
        LeaseArgs::Sanlock { io_timeout } => {
            let (area, id) = lease_area(&args.device)?;
            Some(crate::daemon::sanlock::join(
                &area,
                id,
                args.host_id,
                io_timeout,
                true,
            )?)
        }
    };
    let result = crate::daemon::host::run(&options, maps.as_mut(), stop);
    if let Some(joined) = joined {
        joined.leave();
    }
    let summary = result?;
    tracing::info_span!("host", %domain, host = args.host_id).in_scope(|| {
        tracing::info!(
            "stopped: {} extensions, {} pauses, {} resumes, {} written",
            summary.extensions,
            summary.pauses,
            summary.resumes,
            Bytes(summary.bytes_written)
        )
    });
    Ok(ExitCode::from(EXIT_OK))
}

/// `spmbox config check`.
pub fn config_check(args: &ConfigCheckArgs) -> Result<ExitCode, CommandError> {
    use crate::cli::config;
    let config = config::read_files(&args.files).map_err(|e| CommandError::Usage(e.to_string()))?;
    let mut out = std::io::stdout().lock();
    for file in &args.files {
        writeln!(out, "{}: ok", file.display())?;
    }
    for section in config::DAEMON_SECTIONS {
        let settings = config.section(section);
        if settings.is_empty() {
            continue;
        }
        // Each value as its flag would take it; what only a later file or
        // the command line gives (say a domain's --device) may be missing.
        let argv: Vec<std::ffi::OsString> = vec!["spmbox".into(), section.into()];
        let argv = config::apply(argv, &config);
        if let Err(e) = <crate::cli::args::Cli as clap::Parser>::try_parse_from(argv) {
            if e.kind() != clap::error::ErrorKind::MissingRequiredArgument {
                let text = e.render().to_string();
                let text = text.strip_prefix("error: ").unwrap_or(&text);
                let first = text.lines().next().unwrap_or_default();
                let place = config::place_of(&e, &config).unwrap_or_else(|| format!("[{section}]"));
                return Err(CommandError::Usage(format!("{place}: {first}")));
            }
        }
        writeln!(
            out,
            "spmbox {section} gets: {}",
            config::render_flags(settings)
        )?;
    }
    if config.log_level.is_some() || config.log_format.is_some() {
        writeln!(
            out,
            "log: level {}, format {}",
            config.log_level.as_deref().unwrap_or("warn"),
            match config.log_format.unwrap_or_default() {
                crate::cli::logging::LogFormat::Text => "text",
                crate::cli::logging::LogFormat::Json => "json",
            }
        )?;
    }
    Ok(ExitCode::from(EXIT_OK))
}

/// `spmbox generate-assets`.
pub fn generate_assets(args: &GenerateAssetsArgs) -> Result<ExitCode, CommandError> {
    let files = crate::cli::assets::generate(&args.out)?;
    let mut out = std::io::stdout().lock();
    for f in files {
        writeln!(out, "{}", f.display())?;
    }
    Ok(ExitCode::from(EXIT_OK))
}
