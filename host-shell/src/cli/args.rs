//! The command line of the `spmbox` binary, as clap definitions: one
//! argument struct per command, which the command's function takes as it
//! is. `main.rs` parses a [`Cli`] and dispatches on its [`Command`]; the
//! same definitions can generate man pages and shell completions.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::cli::commands;
use crate::daemon::pool_usage::PoolWarn;
use crate::units::{Bytes, parse_duration, parse_size};

/// How every error message of `spmbox` starts, those of the command-line
/// parser included.
pub const ERROR_PREFIX: &str = "spmbox: error: ";

/// Prints what the command-line parser found (an error with
/// [`ERROR_PREFIX`] and, for a value from a configuration file, its file
/// and line; or the help or version text asked for) and returns the exit
/// status: 2 for an error, 0 for help and version.
pub fn exit_on_parse_error(err: &clap::Error, config: &crate::cli::config::Config) -> ExitCode {
    if !err.use_stderr() {
        let _ = err.print();
        return ExitCode::SUCCESS;
    }
    let text = err.render().to_string();
    let body = text.strip_prefix("error: ").unwrap_or(&text);
    // A value from a configuration file: say where it is.
    let place = crate::cli::config::place_of(err, config)
        .map(|p| format!("{p}: "))
        .unwrap_or_default();
    eprint!("{ERROR_PREFIX}{place}{body}");
    ExitCode::from(commands::EXIT_USAGE)
}

/// The smallest `--chunk-size`: one extent of the smallest size the pool
/// takes (a smaller growth step is a typo for a larger unit).
pub const MIN_CHUNK_SIZE: u64 = spmbox_core::pool::MIN_EXTENT_SIZE;

/// The block of the guests' writes: `--write-size` is a multiple of it.
pub const WRITE_BLOCK: u64 = crate::daemon::guest::BLOCK;

/// The unit of volume sizes: `--virtual-size` is a multiple of it.
pub const VOLUME_SIZE_UNIT: u64 = 512;

/// `--chunk-size`: at least [`MIN_CHUNK_SIZE`], a multiple of 512.
pub fn parse_chunk_size(text: &str) -> Result<u64, String> {
    let n = parse_size(text)?;
    if n < MIN_CHUNK_SIZE || n % VOLUME_SIZE_UNIT != 0 {
        return Err(format!(
            "{text:?} is not a chunk size: a volume grows by at least {} per request, in \
             multiples of 512 bytes (say 256M)",
            Bytes(MIN_CHUNK_SIZE)
        ));
    }
    Ok(n)
}

/// `--extent-size`: a power of two the pool takes.
pub fn parse_extent_size(text: &str) -> Result<u64, String> {
    let n = parse_size(text)?;
    if !spmbox_core::pool::valid_extent_size(n) {
        return Err(format!(
            "{text:?} is not an extent size: use a power of two from {} to {}",
            Bytes(spmbox_core::pool::MIN_EXTENT_SIZE),
            Bytes(spmbox_core::pool::MAX_EXTENT_SIZE)
        ));
    }
    Ok(n)
}

/// `--write-size`: a nonzero multiple of [`WRITE_BLOCK`] up to
/// [`commands::WRITE_SIZE_MAX`].
pub fn parse_write_size(text: &str) -> Result<u64, String> {
    let n = parse_size(text)?;
    if n == 0 || n % WRITE_BLOCK != 0 || n > commands::WRITE_SIZE_MAX {
        return Err(format!(
            "{text:?} is not a write size: a nonzero multiple of 4K of at most {} (each guest \
             holds a buffer of this size)",
            Bytes(commands::WRITE_SIZE_MAX)
        ));
    }
    Ok(n)
}

/// `--virtual-size`: a nonzero multiple of [`VOLUME_SIZE_UNIT`].
pub fn parse_virtual_size(text: &str) -> Result<u64, String> {
    let n = parse_size(text)?;
    if n == 0 || n % VOLUME_SIZE_UNIT != 0 {
        return Err(format!(
            "{text:?} is not a virtual size: a nonzero multiple of 512 bytes"
        ));
    }
    Ok(n)
}

/// A size that must not be zero (`--guest-bytes`, `vm-guest --bytes`).
pub fn parse_nonzero_size(text: &str) -> Result<u64, String> {
    match parse_size(text)? {
        0 => Err(format!("{text:?} is zero: give a nonzero size")),
        n => Ok(n),
    }
}

/// `--pool-warn`: percentages 1..=100, strictly increasing, separated
/// by commas; `none` for no warnings.
pub fn parse_pool_warn(text: &str) -> Result<PoolWarn, String> {
    let refuse = |why: String| {
        format!(
            "{text:?} is not a list of pool usage thresholds: {why}; give percentages from 1 \
             to 100 in increasing order, separated by commas (say 80,85,90,95), or none"
        )
    };
    let t = text.trim();
    if t.eq_ignore_ascii_case("none") {
        return Ok(PoolWarn::off());
    }
    let mut percents = Vec::new();
    for part in t.split(',') {
        let part = part.trim();
        let p = part
            .parse::<u8>()
            .ok()
            .filter(|p| (1..=100).contains(p))
            .ok_or_else(|| {
                refuse(if part.is_empty() {
                    "an empty item".into()
                } else {
                    format!("{part:?} is not a percentage from 1 to 100")
                })
            })?;
        percents.push(p);
    }
    PoolWarn::new(percents).map_err(refuse)
}

/// The end of `spmbox --help` and of the spmbox(1) man page.
const AFTER_HELP: &str = "\
Exit status: 0 success; 1 an error (I/O, permissions, a refused operation); \
2 the arguments or a configuration file make no sense; 3 `inspect` found \
defects; 4 no usable mailbox on the device, or a program that --vm needs is \
not installed.

Files: /etc/spmbox/spmbox.toml (every daemon's settings), \
/etc/spmbox/domains/NAME.toml (one domain's), read by the units \
spmbox-spm@NAME.service and spmbox-host@NAME.service; /run/spmbox (control \
sockets, host status files). `spmbox config check` checks the files.

Environment: SPMBOX_LOG (a log filter such as `info` or `spmbox=debug`), \
SPMBOX_RUN_DIR (instead of /run/spmbox), NO_COLOR.

Documentation: /usr/share/doc/spmbox/operations.md";

/// spmbox: the storage mailbox through which hosts ask the Storage Pool
/// Manager to extend thin-provisioned volumes on shared block storage.
#[derive(Debug, Parser)]
#[command(name = "spmbox", version, about, long_about = None, after_long_help = AFTER_HELP)]
pub struct Cli {
    /// More log output on stderr (-v: info, -vv: debug, -vvv: trace).
    /// SPMBOX_LOG (a tracing filter such as `spmbox=debug`) overrides it.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    /// How log lines on stderr are written: text (coloured only on a
    /// terminal) or json (one object per line).
    #[arg(long, value_enum, value_name = "FORMAT", global = true)]
    pub log_format: Option<crate::cli::logging::LogFormat>,

    // The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands of `spmbox`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a fresh, empty mailbox to a file or block device.
    ///
    /// A file that does not exist is created with exactly the mailbox's
    /// size. Without --force only an all-zero device is written over;
    /// the device of a live domain never is.
    Format(FormatArgs),
    /// Rewrite a damaged superblock (or its backup at offset 0xF000) from
    /// the intact copy, keeping the domain.
    ///
    /// Writes nothing but the two superblock blocks: the pool metadata,
    /// the LUNs and every request and reply stay as they are. With both
    /// copies damaged, give --hosts and --sector-size as the domain was
    /// made; the domain UUID comes from the SPM header (or --domain).
    /// Safe while the daemons run: they read the superblock only at start.
    Repair(RepairArgs),
    /// Convert a mailbox of format version 2 or 3 to version 4 in place,
    /// keeping the SPM's epoch and pool commit, every request and reply and
    /// every generation.
    ///
    /// Stop the SPM and every host first: it refuses while the SPM or a
    /// host with the builtin lease is seen alive. A version-2 doorbell (a
    /// hint) is cleared; defective records are left as they are.
    /// Interrupted, it finishes when run again; on a version-4 mailbox it
    /// writes nothing.
    Upgrade(UpgradeArgs),
    /// Decode and check every record of a mailbox.
    ///
    /// Exit status: 0 all valid; 3 defective records or nonzero bytes in
    /// unused space (each listed with its place); 4 no usable mailbox on
    /// the device; 1 other errors; 2 bad arguments.
    Inspect(InspectArgs),
    /// Set up and change the pool of a storage domain.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Thin volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Show hosts, requests in flight and parked, volumes and pool usage.
    Status(StatusArgs),
    /// Run the Storage Pool Manager: serve extension requests until
    /// SIGTERM or SIGINT.
    Spm(SpmArgs),
    /// Run one host: its guests write to their volumes and the host asks
    /// the SPM for extensions as they fill up.
    Host(HostArgs),
    /// Measure the round trip, whole extensions, SPM throughput and idle
    /// cost, guest write rate and the core's scan speed (docs/performance.md).
    Bench(BenchArgs),
    /// Run a whole domain on temporary files: the SPM and three hosts,
    /// guests writing until the pool runs out, a LUN added, every byte
    /// verified.
    Demo(DemoArgs),
    /// Check configuration files as the daemons read them.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Inside a VM: write verifiable blocks to its disk, read them back,
    /// print the result line on the console (see vm/guest.rs).
    #[command(hide = true)]
    VmGuest(VmGuestArgs),
    /// Write the man pages and shell completions (the package build runs
    /// this; see cli/assets.rs).
    #[command(hide = true)]
    GenerateAssets(GenerateAssetsArgs),
}

/// `spmbox generate-assets`.
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateAssetsArgs {
    /// Where to write `man/` and `completions/`.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// `spmbox pool`.
#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Create a storage domain: the mailbox and the pool metadata on
    /// --device (a file that does not exist is created), and data LUNs.
    Create(PoolCreateArgs),
    /// Add a LUN to the pool while everything runs: parked requests are
    /// served at once and paused guests resume.
    AddLun(AddLunArgs),
    /// Remove a LUN from the pool: every extent volumes hold on it is
    /// copied to the other LUNs, volume by volume, then it leaves the pool
    /// and its label is wiped. Volumes with extents on it must not be open
    /// on any host while it runs.
    RemoveLun(RemoveLunArgs),
}

/// `spmbox config`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Read configuration files in order, as `--config` does, refuse
    /// unknown sections and keys (with the file and line) and values the
    /// flag would refuse, and show the flags each daemon gets from them.
    Check(ConfigCheckArgs),
}

/// `spmbox config check`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigCheckArgs {
    /// The files, in the order the daemon reads them (later ones win).
    #[arg(value_name = "FILE", default_value = crate::cli::config::DEFAULT_CONFIG)]
    pub files: Vec<PathBuf>,
}

/// `spmbox volume`.
#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a thin volume; prints its UUID.
    Create(VolumeCreateArgs),
    /// Read back every byte `spmbox host`'s guests wrote to volumes and
    /// check it (once their hosts have stopped); exits 1 on a data error.
    Verify(VolumeVerifyArgs),
    /// List every volume: its sizes and segments, the hosts that hold it
    /// open, and the requests for it in flight or parked.
    List(VolumeListArgs),
    /// Delete a volume no host holds open; its extents return to the pool
    /// once every live host has acknowledged the change.
    Delete(VolumeDeleteArgs),
    /// Shrink a volume no host holds open to `--to` (rounded up to whole
    /// extents); the extents past it return to the pool once every live
    /// host has acknowledged the change.
    Reduce(VolumeReduceArgs),
}

/// The value of `--sector-size` as a number (clap has checked that it is
/// 512 or 4096).
fn sector_size(text: Option<&str>) -> Option<u32> {
    text.and_then(|s| s.parse().ok())
}

/// `spmbox format`.
#[derive(Debug, Clone, clap::Args)]
pub struct FormatArgs {
    /// The file or block device.
    #[arg(long, value_name = "PATH")]
    pub device: PathBuf,
    /// How many host ids the mailbox serves (1..=2000); hosts are
    /// numbered 1..=N.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=2000))]
    pub hosts: u16,
    /// Logical sector size (512 or 4096). Default: the device's (for a
    /// file, its file system's direct-I/O alignment).
    #[arg(long, value_name = "BYTES", value_parser = ["512", "4096"])]
    pub sector_size: Option<String>,
    /// The storage domain's UUID. Default: a new random one.
    #[arg(long, value_name = "UUID")]
    pub domain: Option<String>,
    /// Overwrite an existing mailbox or other data (every request and
    /// reply in it, and a domain's pool metadata, is lost).
    #[arg(long)]
    pub force: bool,
}

impl FormatArgs {
    /// `--sector-size` as a number.
    pub fn sector_size(&self) -> Option<u32> {
        sector_size(self.sector_size.as_deref())
    }
}

/// `spmbox repair`.
#[derive(Debug, Clone, clap::Args)]
pub struct RepairArgs {
    /// The file or block device.
    #[arg(long, value_name = "PATH")]
    pub device: PathBuf,
    /// Host ids of the mailbox (only when both copies are damaged).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=2000))]
    pub hosts: Option<u16>,
    /// Sector size of the mailbox (only when both copies are damaged).
    #[arg(long, value_name = "BYTES", value_parser = ["512", "4096"])]
    pub sector_size: Option<String>,
    /// The domain UUID (only when both copies are damaged and the SPM
    /// header names none).
    #[arg(long, value_name = "UUID")]
    pub domain: Option<String>,
}

impl RepairArgs {
    /// `--sector-size` as a number.
    pub fn sector_size(&self) -> Option<u32> {
        sector_size(self.sector_size.as_deref())
    }
}

/// `spmbox upgrade`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpgradeArgs {
    /// The file or block device.
    #[arg(long, value_name = "PATH")]
    pub device: PathBuf,
    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `spmbox inspect`.
#[derive(Debug, Clone, clap::Args)]
pub struct InspectArgs {
    /// The file or block device.
    #[arg(long, value_name = "PATH")]
    pub device: PathBuf,
    /// Only this host's areas (the domain-wide records are always shown).
    #[arg(long, value_name = "N")]
    pub host: Option<u16>,
    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `spmbox status`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// The domain device.
    #[arg(long, value_name = "PATH")]
    pub device: PathBuf,
    /// The running SPM's control socket. Default: the domain's.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// How long to watch the heartbeats that tell live SPMs and hosts
    /// from dead ones (0: read once, liveness unknown). Default: 1.5
    /// heartbeat intervals, at most 10s.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub watch: Option<Duration>,
    // The leases.
    #[command(flatten)]
    pub lease: LeaseArgs,
}

/// `spmbox spm`.
#[derive(Debug, Clone, clap::Args)]
pub struct SpmArgs {
    /// A configuration file (TOML; its [spm] and [host] keys are these
    /// flags). Repeat for more: later files win, and flags given here win
    /// over every file. See `spmbox config check`.
    #[arg(long, value_name = "FILE")]
    pub config: Vec<PathBuf>,
    /// The domain device.
    #[arg(long, value_name = "PATH")]
    pub device: PathBuf,
    /// How often the doorbell is read.
    #[arg(long, value_name = "DURATION", default_value = "5ms", value_parser = parse_duration)]
    pub doorbell_interval: Duration,
    /// How often every host's areas are read.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
    pub full_scan_interval: Duration,
    /// The SPM's host id (0 when the SPM is not one of the hosts).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub spm_id: u16,
    /// The control socket admin commands use. Default: a path named
    /// for the domain under the run directory.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Serve Prometheus text metrics at http://ADDR/metrics (a
    /// loopback address, such as 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Start even though the pool metadata is older than what SPMs
    /// already answered (its newest copy was damaged or its write was
    /// lost). Extents given out since may be handed out again and
    /// their data overwritten: restore the domain device instead if
    /// you can. See docs/operations.md.
    #[arg(long)]
    pub accept_metadata_rollback: bool,
    /// Warn in the log when the pool's usage reaches each of these
    /// percentages of its extents (comma-separated, 1 to 100,
    /// increasing; a threshold warns again once an added LUN brought
    /// usage back under it); `none`: no warnings. The metrics show usage
    /// either way.
    #[arg(long, value_name = "PERCENTS", default_value = "80,85,90,95",
          value_parser = parse_pool_warn)]
    pub pool_warn: PoolWarn,
    /// Discard extents once they come back to the pool after a volume
    /// delete or reduce (punch holes in LUN files, BLKDISCARD on LUN
    /// devices), so that thin storage under the LUNs gets the space back.
    #[arg(long)]
    pub discard: bool,
    /// Where the builtin pool's LUNs are, for `--discard` and `pool
    /// remove-lun` (repeat for each). Default: the domain device's
    /// directory for a file.
    #[arg(long = "lun-search", value_name = "PATH")]
    pub lun_search: Vec<PathBuf>,
    // The backend.
    #[command(flatten)]
    pub lvm: LvmArgs,
    // The leases.
    #[command(flatten)]
    pub lease: LeaseArgs,
}

/// `spmbox host`.
#[derive(Debug, Clone, clap::Args)]
pub struct HostArgs {
    /// A configuration file (TOML; its [spm] and [host] keys are these
    /// flags). Repeat for more: later files win, and flags given here win
    /// over every file. See `spmbox config check`.
    #[arg(long, value_name = "FILE")]
    pub config: Vec<PathBuf>,
    /// The domain device.
    #[arg(long, value_name = "PATH")]
    pub device: PathBuf,
    /// This host's id.
    #[arg(long, value_name = "N")]
    pub host_id: u16,
    /// A volume whose guest runs here (repeat for each).
    #[arg(long = "volume", value_name = "UUID", required = true)]
    pub volumes: Vec<String>,
    /// Each guest's write rate per second (0: unlimited).
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
    pub rate: u64,
    /// Bytes per guest write (a multiple of 4K, at most 64M).
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = parse_write_size)]
    pub write_size: u64,
    /// How much each guest writes in all. Default: its virtual size.
    #[arg(long, value_name = "SIZE", value_parser = parse_nonzero_size)]
    pub guest_bytes: Option<u64>,
    /// How much a volume grows per request (at least 1M).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_chunk_size)]
    pub chunk_size: u64,
    /// Ask for more when free space falls below chunk x (100 - this) / 100.
    #[arg(long, value_name = "PERCENT", default_value_t = 50,
          value_parser = clap::value_parser!(u8).range(0..=100))]
    pub utilization: u8,
    /// Where to look for the domain's LUNs (files, block devices or
    /// directories; repeat). Default: the domain device's directory.
    #[arg(long = "lun-search", value_name = "PATH")]
    pub lun_search: Vec<PathBuf>,
    /// Warn when requests have waited this long without any answer: no
    /// SPM seems to serve the domain.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub no_spm_warning: Duration,
    /// Exit once every guest has written all it should.
    #[arg(long)]
    pub exit_when_done: bool,
    /// Print each event as one JSON object per line on stdout.
    #[arg(long)]
    pub json_events: bool,
    /// Serve Prometheus text metrics at http://ADDR/metrics (a
    /// loopback address, such as 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Run a real VM (qemu) on each volume instead of a simulated
    /// guest: its disk is a qcow2 image on the volume, exported over
    /// NBD; the workload inside writes --guest-bytes at --rate and
    /// checks it. Needs qemu-system-x86, qemu-utils, a kernel and
    /// busybox-static (docs/operations.md).
    #[arg(long)]
    pub vm: bool,
    /// The VMs' kernel. Default: the newest in /boot with virtio modules.
    #[arg(long, value_name = "PATH", requires = "vm")]
    pub vm_kernel: Option<PathBuf>,
    /// The VMs' initramfs. Default: built from installed files.
    #[arg(long, value_name = "PATH", requires = "vm")]
    pub vm_initrd: Option<PathBuf>,
    // The backend.
    #[command(flatten)]
    pub lvm: LvmArgs,
    // The leases.
    #[command(flatten)]
    pub lease: LeaseArgs,
}

/// `spmbox bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The mailbox device for the no-op runs (a file or block device;
    /// it is formatted over). Default: a temporary file.
    #[arg(long, value_name = "PATH")]
    pub device: Option<PathBuf>,
    /// A run of about a minute (CI's smoke test).
    #[arg(long)]
    pub quick: bool,
    /// One JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Write the latency distributions as an SVG plot here.
    #[arg(long, value_name = "PATH")]
    pub svg: Option<PathBuf>,
    /// Run only these sections (repeat or separate with commas);
    /// the JSON then holds only their keys.
    #[arg(long, value_name = "SECTION", value_delimiter = ',')]
    pub only: Vec<crate::bench::Section>,
}

/// `spmbox demo`.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct DemoArgs {
    /// One JSON object with the summary on stdout.
    #[arg(long)]
    pub json: bool,
    /// Keep the temporary directory.
    #[arg(long)]
    pub keep: bool,
    /// Real VMs (qemu) instead of simulated guests: 3 hosts, 4 VMs,
    /// qcow2 images on the volumes (docs/operations.md, "Running VMs").
    #[arg(long)]
    pub vm: bool,
}

/// `spmbox vm-guest`, run inside a VM.
#[derive(Debug, Clone, clap::Args)]
pub struct VmGuestArgs {
    /// The VM's disk.
    #[arg(long, value_name = "PATH")]
    pub device: PathBuf,
    /// The volume whose blocks are written.
    #[arg(long, value_name = "UUID")]
    pub volume: String,
    /// The generation stamped into the blocks.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub generation: u64,
    /// Bytes to have written from offset 0.
    #[arg(long, value_name = "SIZE", value_parser = parse_nonzero_size)]
    pub bytes: u64,
    /// Bytes per second (0: unlimited).
    #[arg(long, value_name = "SIZE", default_value = "0", value_parser = parse_size)]
    pub rate: u64,
    /// Bytes per write (a multiple of 4K, at most 64M).
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = parse_write_size)]
    pub write_size: u64,
}

/// `spmbox pool create`.
#[derive(Debug, Clone, clap::Args)]
pub struct PoolCreateArgs {
    /// The domain device (file or block device).
    #[arg(long, value_name = "PATH")]
    pub device: PathBuf,
    /// A data LUN (file or block device; repeat for each).
    #[arg(long = "lun", value_name = "PATH", required = true)]
    pub luns: Vec<PathBuf>,
    /// Host ids 1..=N (at most 2000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=2000))]
    pub hosts: u16,
    /// Bytes per extent: a power of two, 1M to 16G.
    #[arg(long, value_name = "SIZE", default_value = "128M", value_parser = parse_extent_size)]
    pub extent_size: u64,
    /// Logical sector size (512 or 4096). Default: the device's.
    #[arg(long, value_name = "BYTES", value_parser = ["512", "4096"])]
    pub sector_size: Option<String>,
    /// The domain UUID. Default: a new random one.
    #[arg(long, value_name = "UUID")]
    pub domain: Option<String>,
    /// Overwrite an existing mailbox and LUN labels.
    #[arg(long)]
    pub force: bool,
    // The backend.
    #[command(flatten)]
    pub lvm: LvmArgs,
    // The leases.
    #[command(flatten)]
    pub lease: LeaseArgs,
}

impl PoolCreateArgs {
    /// `--sector-size` as a number.
    pub fn sector_size(&self) -> Option<u32> {
        sector_size(self.sector_size.as_deref())
    }
}

/// `spmbox pool add-lun`.
#[derive(Debug, Clone, clap::Args)]
pub struct AddLunArgs {
    /// The domain device.
    #[arg(long, value_name = "PATH")]
    pub device: PathBuf,
    /// The new LUN (file or block device).
    #[arg(long, value_name = "PATH")]
    pub lun: PathBuf,
    /// The running SPM's control socket. Default: the domain's.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// The domain's SPM is firmware (core/firmware, docs/firmware.md):
    /// label the LUN here and hand `add-lun` to the firmware through the
    /// command file beside the domain device (`<device>.cmd`).
    #[arg(long, conflicts_with = "control")]
    pub firmware: bool,
    /// With --firmware: how long to wait for the firmware's answer.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 30,
        requires = "firmware"
    )]
    pub wait: u64,
    // The backend.
    #[command(flatten)]
    pub lvm: LvmArgs,
}

/// `spmbox pool remove-lun`.
#[derive(Debug, Clone, clap::Args)]
pub struct RemoveLunArgs {
    /// The LUN: its UUID (`spmbox volume list` shows each segment's LUN),
    /// or the path of its device or file.
    #[arg(value_name = "LUN")]
    pub lun: String,
    /// The domain device.
    #[arg(long, value_name = "PATH")]
    pub device: PathBuf,
    /// The running SPM's control socket. Default: the domain's.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Where the LUNs are, when no SPM runs and this command copies the
    /// extents itself (repeat for each). Default: the domain device's
    /// directory for a file. A running SPM uses its own --lun-search.
    #[arg(long = "lun-search", value_name = "PATH")]
    pub lun_search: Vec<PathBuf>,
    /// Print the result as one JSON object (progress stays on stderr).
    #[arg(long)]
    pub json: bool,
    // The backend.
    #[command(flatten)]
    pub lvm: LvmArgs,
}

/// `spmbox volume verify`.
#[derive(Debug, Clone, clap::Args)]
pub struct VolumeVerifyArgs {
    /// The domain device.
    #[arg(long, value_name = "PATH")]
    pub device: PathBuf,
    /// A volume whose guest wrote it whole (`spmbox host`'s guests).
    #[arg(long = "volume", value_name = "UUID", required = true)]
    pub volumes: Vec<String>,
    /// Where the LUNs are. Default: the domain device's directory.
    #[arg(long = "lun-search", value_name = "PATH")]
    pub lun_search: Vec<PathBuf>,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// What `volume list`, `delete` and `reduce` act on and how they answer.
#[derive(Debug, Clone, clap::Args)]
pub struct VolumeAdminArgs {
    /// The domain device.
    #[arg(long, value_name = "PATH")]
    pub device: PathBuf,
    /// The running SPM's control socket. Default: the domain's.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    // The backend.
    #[command(flatten)]
    pub lvm: LvmArgs,
}

/// `spmbox volume list`.
#[derive(Debug, Clone, clap::Args)]
pub struct VolumeListArgs {
    // The domain, the SPM, the output and the backend.
    #[command(flatten)]
    pub on: VolumeAdminArgs,
}

/// `spmbox volume delete`.
#[derive(Debug, Clone, clap::Args)]
pub struct VolumeDeleteArgs {
    /// The volume.
    #[arg(value_name = "UUID")]
    pub id: String,
    // The domain, the SPM, the output and the backend.
    #[command(flatten)]
    pub on: VolumeAdminArgs,
}

/// `spmbox volume reduce`.
#[derive(Debug, Clone, clap::Args)]
pub struct VolumeReduceArgs {
    /// The volume.
    #[arg(value_name = "UUID")]
    pub id: String,
    /// The size to shrink to (rounded up to whole extents, at least one).
    /// It must not be below what the guest wrote: the bytes past it are
    /// given to other volumes. Without it: what the guest wrote, read from
    /// the volume (the end of a qcow2 image, or `spmbox host`'s test
    /// data), plus one extent.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub to: Option<u64>,
    /// Where the LUNs are, to read the volume without --to (builtin pool;
    /// repeat for each). Default: the domain device's directory for a
    /// file.
    #[arg(long = "lun-search", value_name = "PATH")]
    pub lun_search: Vec<PathBuf>,
    // The domain, the SPM, the output and the backend.
    #[command(flatten)]
    pub on: VolumeAdminArgs,
}

/// `spmbox volume create`.
#[derive(Debug, Clone, clap::Args)]
pub struct VolumeCreateArgs {
    /// The domain device.
    #[arg(long, value_name = "PATH")]
    pub device: PathBuf,
    /// The volume UUID. Default: a new random one.
    #[arg(long, value_name = "UUID")]
    pub id: Option<String>,
    /// The size the guest sees (a multiple of 512).
    #[arg(long, value_name = "SIZE", value_parser = parse_virtual_size)]
    pub virtual_size: u64,
    /// Bytes allocated now (rounded up to whole extents; at least one).
    #[arg(long, value_name = "SIZE", default_value = "0", value_parser = parse_size)]
    pub initial_size: u64,
    /// The running SPM's control socket. Default: the domain's.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    // The backend.
    #[command(flatten)]
    pub lvm: LvmArgs,
}

/// Which storage backend the SPM (and hosts) use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// The core's thin pool, its metadata on the domain device (no root,
    /// no lvm2).
    Builtin,
    /// Real lvm2 on real PVs.
    Lvm,
}

/// Where lvm2 keeps the domain's volumes.
#[derive(Debug, Clone, clap::Args)]
pub struct LvmArgs {
    /// The backend.
    #[arg(long, value_enum, default_value_t = BackendKind::Builtin)]
    pub backend: BackendKind,
    /// The volume group (lvm backend).
    #[arg(long, value_name = "VG", required_if_eq("backend", "lvm"))]
    pub vg: Option<String>,
    /// A PV of the volume group (lvm backend; repeat for each). Only these
    /// devices are visible to lvm2.
    #[arg(long = "pv", value_name = "DEVICE")]
    pub pvs: Vec<PathBuf>,
}

impl LvmArgs {
    /// The backend these flags select.
    pub fn to_backend(&self) -> commands::BackendArgs {
        match (self.backend, &self.vg) {
            (BackendKind::Lvm, Some(vg)) => commands::BackendArgs::Lvm {
                vg: vg.clone(),
                pvs: self.pvs.clone(),
            },
            _ => commands::BackendArgs::Builtin,
        }
    }
}

/// How the SPM role and host ids are protected on shared storage.
#[derive(Debug, Clone, clap::Args)]
pub struct LeaseArgs {
    /// builtin: the SPM header's heartbeat and a lock on this machine;
    /// sanlock: sanlock leases on the domain device (the sanlock daemon
    /// must run on every machine).
    #[arg(long, value_enum, default_value_t = LeaseKind::Builtin)]
    pub lease: LeaseKind,
    /// sanlock's I/O timeout in seconds: written into the host id leases
    /// (pool create) and used when joining the lockspace. Failure
    /// detection takes about 8 times this.
    #[arg(long, value_name = "SECONDS", default_value_t = crate::daemon::sanlock::DEFAULT_IO_TIMEOUT,
          value_parser = clap::value_parser!(u32).range(1..=60))]
    pub sanlock_io_timeout: u32,
}

/// Which leases protect the domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LeaseKind {
    /// No shared-storage leases.
    Builtin,
    /// sanlock's lockspace (host ids) and SPM resource lease.
    Sanlock,
}

impl LeaseArgs {
    /// The leases these flags select.
    pub fn to_lease(&self) -> commands::LeaseArgs {
        match self.lease {
            LeaseKind::Builtin => commands::LeaseArgs::Builtin,
            LeaseKind::Sanlock => commands::LeaseArgs::Sanlock {
                io_timeout: self.sanlock_io_timeout,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sector_size_is_a_number() {
        let cli = Cli::try_parse_from([
            "spmbox",
            "format",
            "--device",
            "d",
            "--hosts",
            "4",
            "--sector-size",
            "4096",
        ])
        .expect("parses");
        let Command::Format(args) = cli.command else {
            panic!("not format: {:?}", cli.command);
        };
        assert_eq!(args.sector_size(), Some(4096));
    }

    #[test]
    fn pool_warn_takes_increasing_percentages_or_none() {
        let spm = |extra: &[&str]| {
            let mut argv = vec!["spmbox", "spm", "--device", "d"];
            argv.extend_from_slice(extra);
            match Cli::try_parse_from(argv).map(|c| c.command) {
                Ok(Command::Spm(args)) => Ok(args.pool_warn),
                Ok(other) => panic!("not spm: {other:?}"),
                Err(e) => Err(e.to_string()),
            }
        };
        assert_eq!(spm(&[]).unwrap(), PoolWarn::default());
        assert_eq!(
            spm(&["--pool-warn", " 50, 90 "]).unwrap().percents(),
            [50, 90]
        );
        assert_eq!(spm(&["--pool-warn=100"]).unwrap().percents(), [100]);
        assert_eq!(spm(&["--pool-warn", "None"]).unwrap(), PoolWarn::off());
        for bad in [
            "", "0", "101", "90,80", "80,80", "80,,90", "80%", "-5", "none,80",
        ] {
            let e = spm(&[&format!("--pool-warn={bad}")]).unwrap_err();
            assert!(e.contains("--pool-warn <PERCENTS>"), "{bad:?}: {e}");
            assert!(e.contains("1 to 100 in increasing order"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn lvm_and_lease_flags_select_the_backend_and_leases() {
        let cli = Cli::try_parse_from([
            "spmbox",
            "spm",
            "--device",
            "d",
            "--backend",
            "lvm",
            "--vg",
            "vg0",
            "--pv",
            "/dev/sdb",
            "--lease",
            "sanlock",
            "--sanlock-io-timeout",
            "3",
        ])
        .expect("parses");
        let Command::Spm(args) = cli.command else {
            panic!("not spm: {:?}", cli.command);
        };
        assert!(matches!(args.lvm.to_backend(),
            commands::BackendArgs::Lvm { ref vg, ref pvs } if vg == "vg0" && pvs.len() == 1));
        assert_eq!(
            args.lease.to_lease(),
            commands::LeaseArgs::Sanlock { io_timeout: 3 }
        );
        let cli = Cli::try_parse_from(["spmbox", "status", "--device", "d"]).expect("parses");
        let Command::Status(args) = cli.command else {
            panic!("not status: {:?}", cli.command);
        };
        assert_eq!(args.lease.to_lease(), commands::LeaseArgs::Builtin);
    }
}
