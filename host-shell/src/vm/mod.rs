//! Real VMs on spmbox volumes: qemu, its disk exported over NBD, and the
//! host side of thin provisioning through QMP.
//!
//! Each volume a host serves with `--vm` gets:
//! - an NBD export of the volume ([`crate::vm::export`]) on a Unix
//!   socket in the VM's directory: the stand-in for the LV's /dev node
//!   where there is no device-mapper. A write past the volume's physical
//!   size fails with ENOSPC, as a write past an LV's end does;
//! - a qcow2 image on the volume (created through the export the first
//!   time), virtual size the volume's virtual size;
//! - a qemu process (daemonized: it outlives the host daemon, as VMs
//!   outlive VDSM) whose disk is that image over the export, with
//!   `werror=enospc,rerror=enospc`: qemu pauses the VM when a write hits
//!   the end of the volume;
//! - a QMP connection: the write threshold of the image's protocol node
//!   is armed at the engine's watermark and re-armed after every refresh;
//!   `BLOCK_WRITE_THRESHOLD` and a `query-blockstats` poll every
//!   [`POLL_INTERVAL`] hand the allocation to the engine; `BLOCK_IO_ERROR`
//!   with `nospace` marks the volume paused (its request becomes urgent),
//!   and `cont` is sent once the refreshed volume covers the failed write.
//!
//! A host daemon that restarts finds a running VM again by its pid file
//! and QMP socket, serves the export on the same socket (qemu reconnects:
//! its NBD client waits up to [`RECONNECT_DELAY`] for the server), and
//! resumes a VM that paused while it was down once the volume has room.

pub mod export;
pub mod guest;
pub mod image;
pub mod nbd;
pub mod qmp;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use spmbox_core::wire::Uuid;

use crate::backend::BackendError;
use crate::io::mapping::Mapping;
use crate::units::Bytes;
use crate::vm::export::VolumeExport;
use image::{GuestParams, GuestResult, VmTools};
use qmp::{Qmp, QmpMessage};

/// The qcow2 image's protocol node: the volume as qemu sees it through
/// NBD; its write threshold and highest offset are the volume's
/// allocation.
pub const PROTOCOL_NODE: &str = "vol-proto";
/// The qcow2 node the guest's disk is attached to.
pub const FORMAT_NODE: &str = "vol-qcow2";
/// How often a running VM's highest written offset is polled, besides the
/// write-threshold event (VDSM's fallback before events).
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// How long qemu's NBD client holds requests while the export is away
/// (the host daemon restarting) before it fails them.
pub const RECONNECT_DELAY: Duration = Duration::from_secs(60);
/// How often a VM that died without reporting a result is started again
/// before the host gives up on it.
pub const MAX_RESTARTS: u32 = 3;
/// How long a starting qemu gets to create its QMP socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How the host runs VMs.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Where each VM's sockets, pid file and serial log live (one
    /// subdirectory per volume).
    pub dir: PathBuf,
    /// The kernel; default: found in /boot.
    pub kernel: Option<PathBuf>,
    /// The initramfs; default: built from installed files (cached in
    /// `dir`).
    pub initrd: Option<PathBuf>,
    /// The guest's write rate, bytes per second (0: as fast as it can).
    pub rate: u64,
    /// Bytes per guest write.
    pub write_size: u64,
    /// How much each guest writes; `None`: the volume's virtual size.
    pub guest_bytes: Option<u64>,
}

/// What every VM of a host shares: the tools and the boot files.
#[derive(Debug, Clone)]
pub struct VmSetup {
    tools: VmTools,
    initramfs: PathBuf,
    options: VmOptions,
}

impl VmSetup {
    /// Finds qemu, qemu-img, a kernel and busybox, and builds the
    /// initramfs (or takes the ones given).
    pub fn prepare(options: &VmOptions) -> Result<VmSetup, BackendError> {
        let mut tools = image::find_tools().map_err(|e| BackendError::new(e.to_string()))?;
        if let Some(kernel) = &options.kernel {
            tools.kernel = kernel.clone();
        }
        crate::daemon::control::private_dir(&options.dir)?;
        let initramfs = match &options.initrd {
            Some(p) => p.clone(),
            None => {
                let out = options.dir.join("initramfs.cpio");
                let exe = std::env::current_exe()
                    .map_err(|e| BackendError::io("cannot find the spmbox binary", e))?;
                image::build_initramfs(&tools, &exe, &out)
                    .map_err(|e| BackendError::new(format!("building the VM's initramfs: {e}")))?;
                out
            }
        };
        Ok(VmSetup {
            tools,
            initramfs,
            options: options.clone(),
        })
    }

    /// The qemu-img binary.
    pub fn qemu_img(&self) -> &Path {
        &self.tools.qemu_img
    }

    /// The kernel the VMs boot.
    pub fn kernel(&self) -> &Path {
        &self.tools.kernel
    }

    /// The initramfs the VMs boot.
    pub fn initramfs(&self) -> &Path {
        &self.initramfs
    }
}

/// Where the host daemons on this machine keep their VMs' files: one
/// directory per volume under it (volume UUIDs are unique). Kept short: a
/// Unix socket's path must be shorter than 108 bytes, and qemu connects to
/// these by path.
pub fn vm_dir() -> PathBuf {
    crate::daemon::control::run_dir().join("vm")
}

/// Where one VM keeps its files.
#[derive(Debug, Clone)]
pub struct VmPaths {
    /// The VM's directory.
    pub dir: PathBuf,
}

impl VmPaths {
    /// The paths of `volume`'s VM under `root`.
    pub fn new(root: &Path, volume: Uuid) -> VmPaths {
        VmPaths {
            dir: root.join(volume.to_string()),
        }
    }
    /// The NBD export's socket.
    pub fn nbd(&self) -> PathBuf {
        self.dir.join("disk.nbd")
    }
    /// qemu's QMP socket.
    pub fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    /// qemu's pid file.
    pub fn pid(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
    /// The guest's serial console.
    pub fn serial(&self) -> PathBuf {
        self.dir.join("serial.log")
    }
}

/// Where a VM stands, as qemu reported it.
#[derive(Debug, Clone, PartialEq)]
pub enum VmState {
    /// qemu runs the guest.
    Running,
    /// qemu paused the guest: a write failed with ENOSPC (`enospc`), or
    /// another reason (`status` is qemu's).
    Paused {
        /// Paused by ENOSPC on the disk.
        enospc: bool,
        /// qemu's run state.
        status: String,
    },
    /// qemu exited; the guest's result if it printed one.
    Exited(Option<GuestResult>),
}

impl VmState {
    /// A word for status output: `running`, `paused`, `paused-enospc`,
    /// `exited`.
    pub fn name(&self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Paused { enospc: true, .. } => "paused-enospc",
            VmState::Paused { .. } => "paused",
            VmState::Exited(_) => "exited",
        }
    }
}

/// What qemu reported for one VM.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct VmCounts {
    /// `BLOCK_WRITE_THRESHOLD` events.
    pub threshold_events: u64,
    /// Pauses qemu reported for ENOSPC (`BLOCK_IO_ERROR` with `nospace`).
    pub enospc_pauses: u64,
    /// `cont` commands that resumed the VM.
    pub resumes: u64,
    /// Times qemu was started again after it died without a result.
    pub restarts: u64,
}

/// What the host daemon must do after a VM event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmAction {
    /// Nothing.
    None,
    /// The guest's allocation is at least this: tell the engine.
    Allocation(u64),
    /// qemu paused the guest on ENOSPC: the volume is out of space.
    OutOfSpace,
    /// qemu exited.
    Exited,
}

/// One VM on one volume.
pub struct Vm {
    /// The volume.
    pub volume: Uuid,
    paths: VmPaths,
    export: Arc<VolumeExport>,
    _server: crate::vm::nbd::Server,
    qmp: Option<Qmp>,
    pid: Option<i32>,
    /// Where the VM stands.
    pub state: VmState,
    /// What qemu reported.
    pub counts: VmCounts,
    /// The host-side check of the image after the VM exited: `Ok(blocks
    /// verified)` or what was wrong.
    pub image_check: Option<Result<u64, String>>,
    /// The image check while it runs.
    checking: Option<std::thread::JoinHandle<Result<u64, String>>>,
    params: GuestParams,
    virtual_size: u64,
    /// Where the write threshold is armed now (one-shot: `None` after it
    /// fired).
    armed: Option<u64>,
    /// The physical size when qemu paused on ENOSPC: `cont` once the
    /// volume is larger than that (and than the export's refused write).
    paused_at: Option<u64>,
    next_poll: Instant,
    on_message: Arc<dyn Fn(QmpMessage) + Send + Sync>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("volume", &self.volume)
            .field("state", &self.state)
            .field("counts", &self.counts)
            .finish()
    }
}

fn err(what: impl std::fmt::Display) -> BackendError {
    BackendError::new(what.to_string())
}

fn alive(pid: i32) -> bool {
    let Some(pid) = rustix::process::Pid::from_raw(pid) else {
        return false;
    };
    if rustix::process::test_kill_process(pid).is_err() {
        return false;
    }
    // A recycled pid is not our qemu.
    std::fs::read(format!("/proc/{}/cmdline", pid.as_raw_nonzero()))
        .map(|c| String::from_utf8_lossy(&c).contains("qemu"))
        .unwrap_or(false)
}

/// Reads a guest's disk back through the qcow2 layer (`qemu-img convert`
/// of the image at `uri` to the raw file `raw`, removed after) and checks
/// every block of `volume` up to `bytes`. The number of good blocks.
fn check_image(
    qemu_img: &Path,
    uri: &str,
    raw: &Path,
    volume: Uuid,
    bytes: u64,
) -> Result<u64, String> {
    let _ = std::fs::remove_file(raw);
    let out = std::process::Command::new(qemu_img)
        .args(["convert", "-q", "-f", "qcow2", "-O", "raw", uri])
        .arg(raw)
        .output()
        .map_err(|e| format!("running qemu-img: {e}"))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(raw);
        return Err(format!(
            "qemu-img convert: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let report = image::verify_raw(raw, volume, bytes);
    let _ = std::fs::remove_file(raw);
    let report = report.map_err(|e| format!("reading the image back: {e}"))?;
    if report.error_count > 0 {
        let first = report
            .errors
            .first()
            .map(|b| format!(" (first at {}: {})", b.offset, b.defect))
            .unwrap_or_default();
        return Err(format!("{} bad blocks{first}", report.error_count));
    }
    if report.bytes_verified < bytes {
        return Err(format!(
            "only {} of {bytes} bytes read back good",
            report.bytes_verified
        ));
    }
    Ok(report.bytes_verified / crate::daemon::guest::BLOCK)
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

impl Vm {
    /// Serves `volume`'s export and starts its VM, or attaches to the one
    /// already running (a host daemon that restarted). `on_message` gets
    /// the VM's QMP events from a reader thread. A VM whose guest already
    /// printed its result is not started again.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        setup: &VmSetup,
        volume: Uuid,
        generation: u64,
        map: Mapping,
        virtual_size: u64,
        limit: u64,
        on_message: Arc<dyn Fn(QmpMessage) + Send + Sync>,
    ) -> Result<Vm, BackendError> {
        let paths = VmPaths::new(&setup.options.dir, volume);
        crate::daemon::control::private_dir(&paths.dir)?;
        let export = Arc::new(VolumeExport::new(map, limit));
        let server =
            crate::vm::nbd::Server::serve(&paths.nbd(), &volume.to_string(), export.clone())
                .map_err(|e| {
                    err(format!(
                        "volume {volume}: serving its NBD export on {}: {e}",
                        paths.nbd().display()
                    ))
                })?;
        let bytes = setup
            .options
            .guest_bytes
            .unwrap_or(virtual_size)
            .min(virtual_size);
        let params = GuestParams {
            volume,
            generation,
            bytes: bytes - bytes % crate::daemon::guest::BLOCK,
            rate: setup.options.rate,
            write_size: setup.options.write_size,
        };
        let mut vm = Vm {
            volume,
            paths,
            export,
            _server: server,
            qmp: None,
            pid: None,
            state: VmState::Running,
            counts: VmCounts::default(),
            image_check: None,
            checking: None,
            params,
            virtual_size,
            armed: None,
            paused_at: None,
            next_poll: Instant::now(),
            on_message,
        };
        if let Some(pid) = read_pid(&vm.paths.pid()).filter(|&p| alive(p)) {
            vm.pid = Some(pid);
            vm.attach()?;
            tracing::info!("volume {volume}: attached to its running VM (qemu pid {pid})");
        } else if let Some(result) = vm.result() {
            tracing::info!(
                "volume {volume}: its VM already finished (wrote {}, {} errors); not started again",
                Bytes(result.written),
                result.errors
            );
            vm.state = VmState::Exited(Some(result));
        } else {
            vm.ensure_image(setup)?;
            vm.launch(setup)?;
        }
        Ok(vm)
    }

    /// The export (for the physical size and refused writes).
    pub fn export(&self) -> &VolumeExport {
        &self.export
    }

    /// The guest's result, from its serial console.
    pub fn result(&self) -> Option<GuestResult> {
        let log = std::fs::read(self.paths.serial()).ok()?;
        image::parse_result(&String::from_utf8_lossy(&log))
    }

    /// The VM's files.
    pub fn paths(&self) -> &VmPaths {
        &self.paths
    }

    /// The nbd URI of the export, for qemu-img.
    fn uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.volume,
            self.paths.nbd().display()
        )
    }

    /// Creates the qcow2 image on the volume unless one is there.
    fn ensure_image(&self, setup: &VmSetup) -> Result<(), BackendError> {
        let mut head = vec![0u8; 4096];
        crate::vm::nbd::Export::read(&*self.export, 0, &mut head).map_err(|e| {
            err(format!(
                "volume {}: reading its first block: {}",
                self.volume, e.what
            ))
        })?;
        if head.starts_with(b"QFI\xfb") {
            return Ok(());
        }
        let out = std::process::Command::new(setup.qemu_img())
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
            .arg(self.uri())
            .arg(self.virtual_size.to_string())
            .output()
            .map_err(|e| err(format!("running {}: {e}", setup.qemu_img().display())))?;
        if !out.status.success() {
            return Err(err(format!(
                "volume {}: qemu-img create failed: {}",
                self.volume,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        tracing::info!(
            "volume {}: created a qcow2 image of {} on it",
            self.volume,
            Bytes(self.virtual_size)
        );
        Ok(())
    }

    fn launch(&mut self, setup: &VmSetup) -> Result<(), BackendError> {
        let _ = std::fs::remove_file(self.paths.qmp());
        let _ = std::fs::remove_file(self.paths.pid());
        let cmdline = image::kernel_cmdline(&self.params);
        let mut args: Vec<OsString> = image::qemu_base_args(
            &setup.tools,
            &setup.initramfs,
            &cmdline,
            &self.paths.serial(),
        )
        .into_iter()
        // -daemonize does not go with -nographic; there is no display
        // either way.
        .flat_map(|a| {
            if a == "-nographic" {
                vec![OsString::from("-display"), OsString::from("none")]
            } else {
                vec![a]
            }
        })
        .collect();
        let blockdev = format!(
            "driver=nbd,node-name={PROTOCOL_NODE},server.type=unix,server.path={},export={},reconnect-delay={}",
            self.paths.nbd().display(),
            self.volume,
            RECONNECT_DELAY.as_secs()
        );
        for a in [
            "-daemonize".to_owned(),
            "-pidfile".to_owned(),
            self.paths.pid().display().to_string(),
            "-qmp".to_owned(),
            format!("unix:{},server=on,wait=off", self.paths.qmp().display()),
            "-blockdev".to_owned(),
            blockdev,
            "-blockdev".to_owned(),
            format!("driver=qcow2,node-name={FORMAT_NODE},file={PROTOCOL_NODE}"),
            "-device".to_owned(),
            format!("virtio-blk-pci,drive={FORMAT_NODE},werror=enospc,rerror=enospc"),
        ] {
            args.push(a.into());
        }
        let out = std::process::Command::new(&setup.tools.qemu)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| err(format!("running {}: {e}", setup.tools.qemu.display())))?;
        if !out.status.success() {
            return Err(err(format!(
                "volume {}: qemu did not start: {}",
                self.volume,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let until = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(pid) = read_pid(&self.paths.pid()) {
                self.pid = Some(pid);
                break;
            }
            if Instant::now() > until {
                return Err(err(format!(
                    "volume {}: qemu wrote no pid file in {START_TIMEOUT:?}",
                    self.volume
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.armed = None;
        self.paused_at = None;
        self.state = VmState::Running;
        self.attach()?;
        tracing::info!(
            "volume {}: VM started (qemu pid {}), guest writes {} at {}/s",
            self.volume,
            self.pid.unwrap_or(0),
            Bytes(self.params.bytes),
            Bytes(self.params.rate)
        );
        Ok(())
    }

    /// Connects to QMP and learns where the VM stands.
    fn attach(&mut self) -> Result<(), BackendError> {
        let notify = self.on_message.clone();
        let mut qmp = Qmp::connect(&self.paths.qmp(), move |m| notify(m))
            .map_err(|e| err(format!("volume {}: {e}", self.volume)))?;
        let status = qmp::status(&mut qmp).map_err(err)?;
        self.state = match status.as_str() {
            "running" => VmState::Running,
            // Paused by werror=enospc (possibly while no host daemon ran).
            "io-error" => VmState::Paused {
                enospc: true,
                status,
            },
            _ => VmState::Paused {
                enospc: false,
                status,
            },
        };
        self.qmp = Some(qmp);
        Ok(())
    }

    /// Arms the write threshold at `offset` unless it is armed there.
    pub fn arm(&mut self, offset: Option<u64>) {
        // 0 turns qemu's threshold off; a volume whose watermark is at 0
        // must hear of its first write.
        let Some(offset) = offset.map(|o| o.max(1)) else {
            return;
        };
        if self.armed == Some(offset) {
            return;
        }
        let Some(q) = self.qmp.as_mut() else {
            return;
        };
        match qmp::set_write_threshold(q, PROTOCOL_NODE, offset) {
            Ok(()) => self.armed = Some(offset),
            Err(e) => tracing::warn!("volume {}: arming the write threshold: {e}", self.volume),
        }
    }

    /// Handles a QMP message for this VM.
    pub fn handle(&mut self, message: QmpMessage) -> VmAction {
        match message {
            QmpMessage::Event { name, data } => match name.as_str() {
                "BLOCK_WRITE_THRESHOLD" => {
                    self.counts.threshold_events += 1;
                    self.armed = None;
                    let t = data["write-threshold"].as_u64().unwrap_or(0);
                    let over = data["amount-exceeded"].as_u64().unwrap_or(0);
                    tracing::info!(
                        "volume {}: qemu reports the write threshold {} crossed by {}",
                        self.volume,
                        Bytes(t),
                        Bytes(over)
                    );
                    VmAction::Allocation(t.saturating_add(over))
                }
                "BLOCK_IO_ERROR" => {
                    let nospace = data["nospace"].as_bool().unwrap_or(false);
                    let action = data["action"].as_str().unwrap_or("");
                    if nospace && action == "stop" {
                        if !matches!(self.state, VmState::Paused { enospc: true, .. }) {
                            self.counts.enospc_pauses += 1;
                            self.paused_at = Some(self.export.physical());
                            tracing::warn!(
                                "volume {}: qemu paused the VM: a write hit the end of the volume \
                                 ({}, ENOSPC)",
                                self.volume,
                                Bytes(self.export.physical())
                            );
                        }
                        self.state = VmState::Paused {
                            enospc: true,
                            status: "io-error".into(),
                        };
                        VmAction::OutOfSpace
                    } else {
                        tracing::error!(
                            "volume {}: qemu reports an I/O error ({action}): {data}",
                            self.volume
                        );
                        VmAction::None
                    }
                }
                "STOP" => {
                    if self.state == VmState::Running {
                        self.state = VmState::Paused {
                            enospc: false,
                            status: "paused".into(),
                        };
                    }
                    VmAction::None
                }
                "RESUME" => {
                    self.state = VmState::Running;
                    VmAction::None
                }
                _ => VmAction::None,
            },
            QmpMessage::Closed => {
                self.qmp = None;
                // qemu closes QMP as it exits; wait for the process to go.
                let until = Instant::now() + Duration::from_secs(2);
                while self.pid.is_some_and(alive) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if self.pid.is_some_and(alive) {
                    tracing::warn!(
                        "volume {}: QMP closed but qemu still runs; reconnecting",
                        self.volume
                    );
                    if let Err(e) = self.attach() {
                        tracing::error!("volume {}: {e}", self.volume);
                    }
                    return VmAction::None;
                }
                self.state = VmState::Exited(self.result());
                VmAction::Exited
            }
        }
    }

    /// Whether the volume now has room for the write qemu paused on.
    fn covers_failed_write(&self) -> bool {
        let physical = self.export.physical();
        physical > self.paused_at.unwrap_or(0) && physical >= self.export.highest_written()
    }

    /// The volume was refreshed (`map` is longer): the export serves it,
    /// the threshold is re-armed at `threshold`, and a VM paused on ENOSPC
    /// goes on if the failed write fits now.
    pub fn refreshed(&mut self, map: Mapping, threshold: Option<u64>) -> Result<(), BackendError> {
        self.export
            .set_map(map)
            .map_err(|e| err(format!("volume {}: {e}", self.volume)))?;
        self.armed = None;
        self.arm(threshold);
        self.resume_if_room();
        Ok(())
    }

    /// Sends `cont` to a VM paused on ENOSPC once the volume covers the
    /// failed write. Whether it did.
    pub fn resume_if_room(&mut self) -> bool {
        if !matches!(self.state, VmState::Paused { enospc: true, .. })
            || !self.covers_failed_write()
        {
            return false;
        }
        let Some(q) = self.qmp.as_mut() else {
            return false;
        };
        match q.execute("cont", Value::Null) {
            Ok(_) => {
                self.counts.resumes += 1;
                self.paused_at = None;
                self.state = VmState::Running;
                tracing::info!(
                    "volume {}: the volume has room again ({}): VM resumed",
                    self.volume,
                    Bytes(self.export.physical())
                );
                true
            }
            Err(e) => {
                tracing::warn!("volume {}: cont: {e}", self.volume);
                false
            }
        }
    }

    /// The periodic poll: the highest written offset (a fallback for a
    /// missed threshold event) and the threshold armed. Returns the
    /// allocation qemu reports.
    pub fn poll(&mut self, threshold: Option<u64>) -> Option<u64> {
        if Instant::now() < self.next_poll {
            return None;
        }
        self.next_poll = Instant::now() + POLL_INTERVAL;
        let q = self.qmp.as_mut()?;
        let highest = match qmp::highest_offset(q, PROTOCOL_NODE) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!("volume {}: query-blockstats: {e}", self.volume);
                None
            }
        };
        self.arm(threshold);
        highest
    }

    /// Whether the VM is done: exited with its result and its image
    /// checked.
    pub fn is_done(&self) -> bool {
        matches!(self.state, VmState::Exited(_)) && self.checking.is_none()
    }

    /// After qemu exited: starts it again if the guest printed no result
    /// (up to [`MAX_RESTARTS`] times), else starts the check of the image
    /// through the qcow2 layer in a thread of its own (the host's mailbox
    /// I/O goes on meanwhile; [`Vm::poll_check`] says when it is done).
    /// Whether the VM runs again.
    pub fn after_exit(&mut self, setup: &VmSetup) -> Result<bool, BackendError> {
        let VmState::Exited(result) = &self.state else {
            return Ok(false);
        };
        if result.is_none() {
            if self.counts.restarts >= u64::from(MAX_RESTARTS) {
                return Err(err(format!(
                    "volume {}: the VM exited {} times without finishing; see its console log {}",
                    self.volume,
                    self.counts.restarts + 1,
                    self.paths.serial().display()
                )));
            }
            self.counts.restarts += 1;
            tracing::warn!(
                "volume {}: qemu exited before the guest finished; starting it again (the guest \
                 goes on where its data ends); console log {}",
                self.volume,
                self.paths.serial().display()
            );
            self.launch(setup)?;
            return Ok(true);
        }
        let (qemu_img, uri, raw) = (
            setup.qemu_img().to_owned(),
            self.uri(),
            self.paths.dir.join("check.raw"),
        );
        let (volume, bytes) = (self.volume, self.params.bytes);
        self.checking = Some(std::thread::spawn(crate::daemon::in_current_span(
            move || check_image(&qemu_img, &uri, &raw, volume, bytes),
        )));
        Ok(false)
    }

    /// Once the image check started by [`Vm::after_exit`] is done: its
    /// result, kept in [`Vm::image_check`]. `None` while it runs (or if
    /// none runs).
    pub fn poll_check(&mut self) -> Option<&Result<u64, String>> {
        if !self.checking.as_ref().is_some_and(|t| t.is_finished()) {
            return None;
        }
        let result = match self.checking.take()?.join() {
            Ok(r) => r,
            Err(_) => Err("the image check panicked".to_owned()),
        };
        self.image_check = Some(result);
        self.image_check.as_ref()
    }

    /// The status-file view.
    pub fn status_json(&self) -> Value {
        let result = match &self.state {
            VmState::Exited(Some(r)) => {
                json!({"written": r.written, "verified": r.verified, "errors": r.errors})
            }
            _ => Value::Null,
        };
        json!({
            "state": self.state.name(),
            "pid": self.pid,
            "counts": self.counts,
            "result": result,
            "image_check": self.image_check.as_ref().map(|c| match c {
                Ok(n) => json!({"ok": true, "blocks": n}),
                Err(e) => json!({"ok": false, "error": e}),
            }),
            "serial": self.paths.serial().display().to_string(),
        })
    }
}
