//! sanlock leases for a domain: a lockspace whose delta leases are the
//! host ids, and a Paxos resource lease `SPM` that only the running SPM
//! holds (oVirt's `ids` and `leases` volumes).
//!
//! The lease area lives on the domain device after the mailbox and the
//! builtin pool's two metadata copies (reserved for lvm domains too, so the
//! place never depends on the backend), at the next multiple of 8 MiB:
//!
//! | offset | size | what |
//! |---|---|---|
//! | L = [`Area::lockspace`] | 8 MiB | the lockspace named by the domain UUID |
//! | L + 8 MiB | 8 MiB | the resource `SPM` |
//!
//! 8 MiB holds sanlock's largest alignment (4096-byte sectors, 2000
//! hosts), and both offsets are multiples of every sector size.
//!
//! Everything goes through the `sanlock` command (`direct init`, `client
//! add_lockspace`, `acquire`, `inquire`, `release`, `rem_lockspace`,
//! `direct dump`), except the registration of the SPM's own process: that
//! is one 32-byte message on sanlock's socket, kept open for as long as the
//! process lives (sanlock releases the process's leases when it closes,
//! and kills the process if its leases are lost).

use std::fs::File;
use std::io::Write as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use spmbox_core::wire::{Geometry, SpmHeader, Uuid};

use crate::backend::BackendError;

/// Bytes reserved for the lockspace and for the resource each.
pub const SLOT: u64 = 8 << 20;

/// The resource lease the SPM holds.
pub const SPM_RESOURCE: &str = "SPM";

/// sanlock's default I/O timeout, seconds (oVirt's too).
pub const DEFAULT_IO_TIMEOUT: u32 = 10;

/// Where a domain's leases live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Area {
    /// The domain device, as sanlock opens it.
    pub path: PathBuf,
    /// The lockspace's offset.
    pub lockspace: u64,
    /// The SPM resource's offset.
    pub resource: u64,
    /// Sector size, bytes.
    pub sector: u32,
    /// sanlock's alignment (area per lease), MiB.
    pub align_mib: u32,
}

impl Area {
    /// The lease area of the domain with `geometry` on `device`.
    pub fn of(device: &Path, geometry: Geometry) -> Area {
        let lockspace = crate::backend::builtin::domain_size(geometry).next_multiple_of(SLOT);
        let sector = geometry.sector_size();
        let align_mib = match (sector, geometry.max_hosts()) {
            (512, _) | (_, ..=250) => 1,
            (_, ..=500) => 2,
            (_, ..=1000) => 4,
            _ => 8,
        };
        Area {
            path: device.to_owned(),
            lockspace,
            resource: lockspace + SLOT,
            sector,
            align_mib,
        }
    }

    /// Where the area ends: the least size of the domain device.
    pub fn end(&self) -> u64 {
        self.resource + SLOT
    }

    fn path_arg(&self) -> Result<String, BackendError> {
        let text = self
            .path
            .to_str()
            .ok_or_else(|| BackendError::new(format!("{} is not UTF-8", self.path.display())))?;
        if text.contains(':') || text.contains(' ') || text.len() > 1000 {
            return Err(BackendError::new(format!(
                "sanlock cannot name {text}: its path holds ':' or ' ' or is too long; use a path without them"
            )));
        }
        Ok(text.to_owned())
    }

    /// `LOCKSPACE` as sanlock writes it.
    pub fn lockspace_arg(&self, domain: Uuid, host: u16) -> Result<String, BackendError> {
        Ok(format!(
            "{domain}:{host}:{}:{}",
            self.path_arg()?,
            self.lockspace
        ))
    }

    /// `RESOURCE` of the SPM lease.
    pub fn resource_arg(&self, domain: Uuid) -> Result<String, BackendError> {
        Ok(format!(
            "{domain}:{SPM_RESOURCE}:{}:{}",
            self.path_arg()?,
            self.resource
        ))
    }

    fn align_args(&self) -> [String; 4] {
        [
            "-Z".into(),
            self.sector.to_string(),
            "-A".into(),
            format!("{}M", self.align_mib),
        ]
    }
}

/// Runs `sanlock ARGS`; returns the code after `done` (0 success, a
/// negative errno or sanlock error) and the output.
fn sanlock(args: &[String]) -> Result<(i64, String), BackendError> {
    let out = Command::new("sanlock").args(args).output().map_err(|e| {
        BackendError::new(format!(
            "cannot run `sanlock` ({e}): install sanlock (Debian, Fedora: package `sanlock`) \
             or use --lease builtin"
        ))
    })?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let code = text
        .lines()
        .rev()
        .filter_map(|l| l.split_once("done ").map(|(_, rest)| rest))
        .find_map(|rest| rest.split_whitespace().next()?.parse::<i64>().ok())
        .unwrap_or(if out.status.success() { 0 } else { -1 });
    Ok((code, text))
}

fn daemon_hint(code: i64) -> Option<String> {
    // ENOENT, ECONNREFUSED: no daemon listens on the socket.
    matches!(code, -2 | -111).then(|| {
        format!(
            "the sanlock daemon is not running (no socket {}): start it (`systemctl start \
             sanlock wdmd`)",
            socket_path().display()
        )
    })
}

/// sanlock's socket: `$SANLOCK_RUN_DIR/sanlock.sock`, by default under
/// `/run/sanlock`.
pub fn socket_path() -> PathBuf {
    std::env::var_os("SANLOCK_RUN_DIR")
        .map_or_else(|| PathBuf::from("/run/sanlock"), PathBuf::from)
        .join("sanlock.sock")
}

/// Checks that the `sanlock` command runs.
pub fn check_tool() -> Result<(), BackendError> {
    sanlock(&["version".into()]).map(|_| ())
}

/// Writes the lockspace and the SPM resource (`sanlock direct init`), with
/// `io_timeout` seconds written into the host id leases.
pub fn init(area: &Area, domain: Uuid, io_timeout: u32) -> Result<(), BackendError> {
    for (what, target) in [
        ("-s", area.lockspace_arg(domain, 0)?),
        ("-r", area.resource_arg(domain)?),
    ] {
        let mut args = vec![
            "direct".to_string(),
            "init".into(),
            "-o".into(),
            io_timeout.to_string(),
            what.into(),
            target.clone(),
        ];
        args.extend(area.align_args());
        let (code, text) = sanlock(&args)?;
        if code != 0 {
            return Err(BackendError::new(format!(
                "sanlock could not write {target} (error {code}): {}; fix that and run \
                 `pool create --force` again",
                text.trim()
            )));
        }
    }
    Ok(())
}

/// A host id this machine's sanlock daemon has joined, used by this
/// process. Other processes of this machine that use the same lockspace
/// hold a shared lock on the same users file; the last to leave removes
/// the lockspace ([`Joined::leave`]).
#[derive(Debug)]
pub struct Joined {
    lockspace: String,
    users: PathBuf,
    _shared: File,
    _host: Option<File>,
}

fn lock_file(path: &Path) -> Result<File, BackendError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| BackendError::io(format!("cannot create {}", dir.display()), e))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| BackendError::io(format!("cannot open {}", path.display()), e))
}

/// Joins host id `host` of the domain's lockspace (`sanlock client
/// add_lockspace`), unless this machine's daemon has joined it already
/// with that host id. With `exclusive` (a host daemon) no other process of
/// this machine may use `host` as a host at the same time.
pub fn join(
    area: &Area,
    domain: Uuid,
    host: u16,
    io_timeout: u32,
    exclusive: bool,
) -> Result<Joined, BackendError> {
    let run = crate::daemon::control::run_dir();
    let host_lock = if exclusive {
        let path = run.join(format!("lease-{domain}-{host}.host"));
        let file = lock_file(&path)?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
            |_| {
                BackendError::new(format!(
                    "host id {host} of domain {domain} is in use by another `spmbox host` on \
                     this machine; a host id runs once: stop that one or use another --host-id"
                ))
            },
        )?;
        Some(file)
    } else {
        None
    };
    let users = run.join(format!("lease-{domain}-{host}.users"));
    let shared = lock_file(&users)?;
    // Waits while a last user removes the lockspace.
    rustix::fs::flock(&shared, rustix::fs::FlockOperation::LockShared)
        .map_err(|e| BackendError::new(format!("cannot lock {}: {e}", users.display())))?;
    let lockspace = area.lockspace_arg(domain, host)?;
    tracing::info!("joining sanlock lockspace {lockspace} (io timeout {io_timeout} s)");
    let add = || {
        sanlock(&[
            "client".into(),
            "add_lockspace".into(),
            "-o".into(),
            io_timeout.to_string(),
            "-s".into(),
            lockspace.clone(),
        ])
    };
    let mut answer = add()?;
    // EINPROGRESS: another process of this machine is joining it now.
    let patience = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while answer.0 == -115 && std::time::Instant::now() < patience {
        std::thread::sleep(std::time::Duration::from_millis(500));
        answer = add()?;
    }
    let (code, text) = answer;
    match code {
        0 => {}
        // EEXIST: this daemon has joined the lockspace already; EINVAL:
        // with another host id.
        -17 | -22 => {
            let joined = joined_host_id(domain)?;
            if joined != Some(host) {
                return Err(BackendError::new(format!(
                    "this machine's sanlock daemon has joined the lockspace of domain {domain} \
                     with host id {}; a machine has one host id per domain: use that id",
                    joined.map_or_else(|| "?".into(), |h| h.to_string())
                )));
            }
            tracing::info!("sanlock lockspace {lockspace} is joined already");
        }
        // SANLK_HOSTID_BUSY: the delta lease is renewed by another daemon.
        -262 => {
            return Err(BackendError::new(format!(
                "host id {host} of domain {domain} is held by another host: its sanlock delta \
                 lease is being renewed; a host id runs once: stop that host or use another id"
            )));
        }
        other => {
            return Err(BackendError::new(daemon_hint(other).unwrap_or_else(|| {
                format!(
                    "sanlock could not join {lockspace} (error {other}): {}",
                    text.trim()
                )
            })));
        }
    }
    Ok(Joined {
        lockspace,
        users,
        _shared: shared,
        _host: host_lock,
    })
}

impl Joined {
    /// Leaves the lockspace if no other process of this machine uses it.
    /// sanlock kills processes that hold resource leases in a lockspace it
    /// leaves, so release them first.
    pub fn leave(self) {
        let Joined {
            lockspace,
            users,
            _shared,
            _host,
        } = self;
        drop(_shared);
        let Ok(file) = lock_file(&users) else { return };
        if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            tracing::info!("sanlock lockspace {lockspace} stays joined: another process uses it");
            return;
        }
        match sanlock(&[
            "client".into(),
            "rem_lockspace".into(),
            "-s".into(),
            lockspace.clone(),
        ]) {
            Ok((0, _)) => tracing::info!("left sanlock lockspace {lockspace}"),
            Ok((code, text)) => tracing::warn!(
                "sanlock could not leave {lockspace} (error {code}): {}",
                text.trim()
            ),
            Err(e) => tracing::warn!("{e}"),
        }
    }
}

/// The host id with which this machine's daemon has joined the domain's
/// lockspace (`sanlock client status`).
fn joined_host_id(domain: Uuid) -> Result<Option<u16>, BackendError> {
    let (_, text) = sanlock(&["client".into(), "status".into()])?;
    let prefix = format!("s {domain}:");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(':').next()?.parse().ok()))
}

/// The SPM resource lease, held by this process.
#[derive(Debug)]
pub struct SpmLease {
    /// The lease version sanlock gave this acquisition: it grows by one at
    /// every acquisition, by any host.
    pub lver: u64,
    resource: String,
    registration: Option<UnixStream>,
    joined: Option<Joined>,
}

/// Joins the lockspace with `spm_id` and acquires the SPM lease for this
/// process. Fails at once if another SPM holds it.
pub fn acquire_spm(
    area: &Area,
    domain: Uuid,
    spm_id: u16,
    io_timeout: u32,
) -> Result<SpmLease, BackendError> {
    if spm_id == 0 {
        return Err(BackendError::new(
            "--lease sanlock needs the SPM's host id in the lockspace: pass --spm-id N (1..=max hosts)",
        ));
    }
    let joined = join(area, domain, spm_id, io_timeout, false)?;
    let registration = register()?;
    let resource = area.resource_arg(domain)?;
    let pid = std::process::id().to_string();
    let (code, text) = sanlock(&[
        "client".into(),
        "acquire".into(),
        "-r".into(),
        resource.clone(),
        "-p".into(),
        pid.clone(),
    ])?;
    if code != 0 {
        let owner = holders(area, domain)
            .ok()
            .and_then(|h| h["spm"]["owner"].as_u64())
            .map_or_else(String::new, |o| format!(" (held by host id {o})"));
        let why = match code {
            // SANLK_ACQUIRE_* (another owner), SANLK_DBLOCK_* (a
            // competing ballot won), EEXIST, EAGAIN.
            -245..=-240 | -215..=-210 | -17 | -11 => format!(
                "another SPM holds the SPM lease of domain {domain}{owner}; only one SPM may \
                 serve a domain: stop that one first"
            ),
            _ => daemon_hint(code).unwrap_or_else(|| {
                format!(
                    "sanlock could not acquire {resource} (error {code}): {}",
                    text.trim()
                )
            }),
        };
        drop(registration);
        joined.leave();
        return Err(BackendError::new(why));
    }
    let (_, text) = sanlock(&["client".into(), "inquire".into(), "-p".into(), pid])?;
    let lver = text
        .lines()
        .filter_map(|l| {
            let l = l.trim().trim_matches('"');
            l.starts_with(&resource)
                .then(|| l.rsplit(':').next()?.parse::<u64>().ok())?
        })
        .next()
        .ok_or_else(|| {
            BackendError::new(format!(
                "sanlock acquired {resource} but does not say its version: {}",
                text.trim()
            ))
        })?;
    tracing::info!("holding sanlock lease {resource} at version {lver}");
    Ok(SpmLease {
        lver,
        resource,
        registration: Some(registration),
        joined: Some(joined),
    })
}

/// Registers this process with the sanlock daemon: sanlock's `struct
/// sm_header` (eight little-endian u32: magic, protocol version, command
/// 1 = register, flags, length 32, seq, data, data2). No answer follows.
fn register() -> Result<UnixStream, BackendError> {
    let socket = socket_path();
    let mut stream = UnixStream::connect(&socket).map_err(|e| {
        BackendError::new(format!(
            "cannot reach the sanlock daemon at {} ({e}): start it (`systemctl start sanlock wdmd`)",
            socket.display()
        ))
    })?;
    let mut msg = Vec::with_capacity(32);
    for word in [0x0428_2010_u32, 1, 1, 0, 32, 0, 0, 0] {
        msg.extend_from_slice(&word.to_le_bytes());
    }
    stream
        .write_all(&msg)
        .map_err(|e| BackendError::io("cannot register with sanlock", e))?;
    Ok(stream)
}

impl SpmLease {
    /// Releases the lease and leaves the lockspace if nothing else of this
    /// machine uses it.
    pub fn release(mut self) {
        self.release_inner();
    }

    fn release_inner(&mut self) {
        if self.registration.is_none() {
            return;
        }
        match sanlock(&[
            "client".into(),
            "release".into(),
            "-r".into(),
            self.resource.clone(),
            "-p".into(),
            std::process::id().to_string(),
        ]) {
            Ok((0, _)) => tracing::info!("released sanlock lease {}", self.resource),
            Ok((code, text)) => tracing::warn!(
                "sanlock could not release {} (error {code}): {}",
                self.resource,
                text.trim()
            ),
            Err(e) => tracing::warn!("{e}"),
        }
        self.registration = None;
        if let Some(joined) = self.joined.take() {
            joined.leave();
        }
    }
}

impl Drop for SpmLease {
    fn drop(&mut self) {
        self.release_inner();
    }
}

/// The SPM header the engine starts from, its epoch raised to at least
/// `lver - 1`, so that the engine's epoch (the header's + 1) is at least
/// the lease version: epochs then grow across every SPM that ever held the
/// lease, even one that died before it wrote the header.
pub fn raise_epoch(found: Option<SpmHeader>, lver: u64, domain: Uuid) -> Option<SpmHeader> {
    let floor = spmbox_core::wire::Epoch::new(lver.saturating_sub(1));
    spmbox_core::spm::start_header(found, floor, domain)
}

/// Who holds the domain's leases, read from disk (`sanlock direct dump`):
/// `{"lockspace": {...}, "hosts": [{"host_id", "owner", "generation",
/// "timestamp"}], "spm": {"owner", "generation", "lver", "timestamp",
/// "held"}}`. A host id whose timestamp is 0 was released; the SPM lease
/// is held while its timestamp is not 0.
pub fn holders(area: &Area, domain: Uuid) -> Result<Value, BackendError> {
    let path = area.path_arg()?;
    let dump = |offset: u64| -> Result<Vec<Vec<String>>, BackendError> {
        let (code, text) = sanlock(&[
            "direct".into(),
            "dump".into(),
            format!("{path}:{offset}:{SLOT}"),
        ])?;
        if code != 0 && !text.contains("offset") {
            return Err(BackendError::new(format!(
                "sanlock cannot read the leases at {path}:{offset} (error {code}): {}",
                text.trim()
            )));
        }
        Ok(text
            .lines()
            .filter(|l| !l.trim_start().starts_with("offset"))
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .filter(|f| f.len() >= 6 && f[1] == domain.to_string())
            .collect())
    };
    let num = |s: &str| s.parse::<u64>().unwrap_or(0);
    let hosts: Vec<Value> = dump(area.lockspace)?
        .iter()
        .filter(|f| num(&f[3]) != 0)
        .map(|f| {
            json!({"host_id": num(&f[4]), "owner": f[2], "generation": num(&f[5]),
                   "timestamp": num(&f[3])})
        })
        .collect();
    let spm = dump(area.resource)?
        .iter()
        .find(|f| f[2] == SPM_RESOURCE)
        .map_or(Value::Null, |f| {
            let timestamp = num(&f[3]);
            json!({"owner": num(&f[4]), "generation": num(&f[5]),
                   "lver": f.get(6).map_or(0, |v| num(v)), "timestamp": timestamp,
                   "held": timestamp != 0})
        });
    Ok(json!({
        "kind": "sanlock",
        "path": path,
        "lockspace_offset": area.lockspace,
        "resource_offset": area.resource,
        "hosts": hosts,
        "spm": spm,
    }))
}

/// Renders [`holders`] for `spmbox status`.
pub fn render(v: &Value) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "sanlock leases on {} (lockspace at {}, SPM lease at {}):",
        v["path"].as_str().unwrap_or("?"),
        v["lockspace_offset"],
        v["resource_offset"]
    );
    match &v["spm"] {
        Value::Null => o.push_str("  SPM lease: not initialised\n"),
        s if s["held"] == json!(true) => {
            let _ = writeln!(
                o,
                "  SPM lease: held by host id {} (generation {}, lease version {})",
                s["owner"], s["generation"], s["lver"]
            );
        }
        s => {
            let _ = writeln!(o, "  SPM lease: free (lease version {})", s["lver"]);
        }
    }
    let hosts = v["hosts"].as_array().map_or(&[][..], Vec::as_slice);
    if hosts.is_empty() {
        o.push_str("  host ids: none held\n");
    }
    for h in hosts {
        let _ = writeln!(
            o,
            "  host id {}: {} (generation {}, renewed at {})",
            h["host_id"],
            h["owner"].as_str().unwrap_or("?"),
            h["generation"],
            h["timestamp"]
        );
    }
    o
}
