//! The `spmbox` command line. This file only parses arguments; the work is
//! in the library's modules.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use spmbox::cli::commands;

/// spmbox: the storage mailbox through which hosts ask the Storage Pool
/// Manager to extend thin-provisioned volumes on shared block storage.
#[derive(Debug, Parser)]
#[command(name = "spmbox", version, about, long_about = None)]
struct Cli {
    /// More log output on stderr (-v: info, -vv: debug, -vvv: trace).
    /// SPMBOX_LOG (a tracing filter such as `spmbox=debug`) overrides it.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a fresh, empty mailbox to a file or block device.
    ///
    /// A file that does not exist is created with exactly the mailbox's
    /// size. Without --force only an all-zero device is written over;
    /// the device of a live domain never is.
    Format {
        /// The file or block device.
        #[arg(long, value_name = "PATH")]
        device: PathBuf,
        /// How many host ids the mailbox serves (1..=2000); hosts are
        /// numbered 1..=N.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=2000))]
        hosts: u16,
        /// Logical sector size (512 or 4096). Default: the device's (for a
        /// file, its file system's direct-I/O alignment).
        #[arg(long, value_name = "BYTES", value_parser = ["512", "4096"])]
        sector_size: Option<String>,
        /// The storage domain's UUID. Default: a new random one.
        #[arg(long, value_name = "UUID")]
        domain: Option<String>,
        /// Overwrite an existing mailbox or other data (every request and
        /// reply in it, and a domain's pool metadata, is lost).
        #[arg(long)]
        force: bool,
    },
    /// Rewrite a damaged superblock (or its backup at offset 0xF000) from
    /// the intact copy, keeping the domain.
    ///
    /// Writes nothing but the two superblock blocks: the pool metadata,
    /// the LUNs and every request and reply stay as they are. With both
    /// copies damaged, give --hosts and --sector-size as the domain was
    /// made; the domain UUID comes from the SPM header (or --domain).
    /// Safe while the daemons run: they read the superblock only at start.
    Repair {
        /// The file or block device.
        #[arg(long, value_name = "PATH")]
        device: PathBuf,
        /// Host ids of the mailbox (only when both copies are damaged).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=2000))]
        hosts: Option<u16>,
        /// Sector size of the mailbox (only when both copies are damaged).
        #[arg(long, value_name = "BYTES", value_parser = ["512", "4096"])]
        sector_size: Option<String>,
        /// The domain UUID (only when both copies are damaged and the SPM
        /// header names none).
        #[arg(long, value_name = "UUID")]
        domain: Option<String>,
    },
    /// Decode and check every record of a mailbox.
    ///
    /// Exit status: 0 all valid; 3 defective records or nonzero bytes in
    /// unused space (each listed with its place); 4 no usable mailbox on
    /// the device; 1 other errors; 2 bad arguments.
    Inspect {
        /// The file or block device.
        #[arg(long, value_name = "PATH")]
        device: PathBuf,
        /// Only this host's areas (the domain-wide records are always shown).
        #[arg(long, value_name = "N")]
        host: Option<u16>,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Set up and change the pool of a storage domain.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Thin volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Show hosts, requests in flight and parked, volumes and pool usage.
    Status {
        /// The domain device.
        #[arg(long, value_name = "PATH")]
        device: PathBuf,
        /// The running SPM's control socket. Default: the domain's.
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        lease: LeaseArgs,
    },
    /// Run the Storage Pool Manager: serve extension requests until
    /// SIGTERM or SIGINT.
    Spm {
        /// The domain device.
        #[arg(long, value_name = "PATH")]
        device: PathBuf,
        /// How often the doorbell is read.
        #[arg(long, value_name = "DURATION", default_value = "5ms", value_parser = parse_duration)]
        doorbell_interval: std::time::Duration,
        /// How often every host's areas are read.
        #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
        full_scan_interval: std::time::Duration,
        /// The SPM's host id (0 when the SPM is not one of the hosts).
        #[arg(long, value_name = "N", default_value_t = 0)]
        spm_id: u16,
        /// The control socket admin commands use. Default: a path named
        /// for the domain under the run directory.
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        /// Serve Prometheus text metrics at http://ADDR/metrics (a
        /// loopback address, such as 127.0.0.1:9464).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        /// Start even though the pool metadata is older than what SPMs
        /// already answered (its newest copy was damaged or its write was
        /// lost). Extents given out since may be handed out again and
        /// their data overwritten: restore the domain device instead if
        /// you can. See docs/operations.md.
        #[arg(long)]
        accept_metadata_rollback: bool,
        #[command(flatten)]
        lvm: LvmArgs,
        #[command(flatten)]
        lease: LeaseArgs,
    },
    /// Run one host: its guests write to their volumes and the host asks
    /// the SPM for extensions as they fill up.
    Host {
        /// The domain device.
        #[arg(long, value_name = "PATH")]
        device: PathBuf,
        /// This host's id.
        #[arg(long, value_name = "N")]
        host_id: u16,
        /// A volume whose guest runs here (repeat for each).
        #[arg(long = "volume", value_name = "UUID", required = true)]
        volumes: Vec<String>,
        /// Each guest's write rate per second (0: unlimited).
        #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
        rate: u64,
        /// Bytes per guest write (a multiple of 4K, at most 64M).
        #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = parse_size)]
        write_size: u64,
        /// How much each guest writes in all. Default: its virtual size.
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        guest_bytes: Option<u64>,
        /// How much a volume grows per request (nonzero).
        #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
        chunk_size: u64,
        /// Ask for more when free space falls below chunk x (100 - this) / 100.
        #[arg(long, value_name = "PERCENT", default_value_t = 50)]
        utilization: u8,
        /// Where to look for the domain's LUNs (files, block devices or
        /// directories; repeat). Default: the domain device's directory.
        #[arg(long = "lun-search", value_name = "PATH")]
        lun_search: Vec<PathBuf>,
        /// Exit once every guest has written all it should.
        #[arg(long)]
        exit_when_done: bool,
        /// Print each event as one JSON object per line on stdout.
        #[arg(long)]
        json_events: bool,
        /// Serve Prometheus text metrics at http://ADDR/metrics (a
        /// loopback address, such as 127.0.0.1:9464).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        /// Run a real VM (qemu) on each volume instead of a simulated
        /// guest: its disk is a qcow2 image on the volume, exported over
        /// NBD; the workload inside writes --guest-bytes at --rate and
        /// checks it. Needs qemu-system-x86, qemu-utils, a kernel and
        /// busybox-static (docs/operations.md).
        #[arg(long)]
        vm: bool,
        /// The VMs' kernel. Default: the newest in /boot with virtio modules.
        #[arg(long, value_name = "PATH", requires = "vm")]
        vm_kernel: Option<PathBuf>,
        /// The VMs' initramfs. Default: built from installed files.
        #[arg(long, value_name = "PATH", requires = "vm")]
        vm_initrd: Option<PathBuf>,
        #[command(flatten)]
        lvm: LvmArgs,
        #[command(flatten)]
        lease: LeaseArgs,
    },
    /// Measure the round trip, whole extensions, SPM throughput and idle
    /// cost, guest write rate and the core's scan speed (docs/performance.md).
    Bench {
        /// The mailbox device for the no-op runs (a file or block device;
        /// it is formatted over). Default: a temporary file.
        #[arg(long, value_name = "PATH")]
        device: Option<PathBuf>,
        /// A run of about a minute (CI's smoke test).
        #[arg(long)]
        quick: bool,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
        /// Write the latency distributions as an SVG plot here.
        #[arg(long, value_name = "PATH")]
        svg: Option<PathBuf>,
        /// Run only these sections (repeat or separate with commas);
        /// the JSON then holds only their keys.
        #[arg(long, value_name = "SECTION", value_delimiter = ',')]
        only: Vec<spmbox::bench::Section>,
    },
    /// Run a whole domain on temporary files: the SPM and three hosts,
    /// guests writing until the pool runs out, a LUN added, every byte
    /// verified.
    Demo {
        /// One JSON object with the summary on stdout.
        #[arg(long)]
        json: bool,
        /// Keep the temporary directory.
        #[arg(long)]
        keep: bool,
        /// Real VMs (qemu) instead of simulated guests: 3 hosts, 4 VMs,
        /// qcow2 images on the volumes (docs/operations.md, "Running VMs").
        #[arg(long)]
        vm: bool,
    },
    /// Inside a VM: write verifiable blocks to its disk, read them back,
    /// print the result line on the console (see vm/guest.rs).
    #[command(hide = true)]
    VmGuest {
        /// The VM's disk.
        #[arg(long, value_name = "PATH")]
        device: PathBuf,
        /// The volume whose blocks are written.
        #[arg(long, value_name = "UUID")]
        volume: String,
        /// The generation stamped into the blocks.
        #[arg(long, value_name = "N", default_value_t = 1)]
        generation: u64,
        /// Bytes to have written from offset 0.
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        bytes: u64,
        /// Bytes per second (0: unlimited).
        #[arg(long, value_name = "SIZE", default_value = "0", value_parser = parse_size)]
        rate: u64,
        /// Bytes per write (a multiple of 4K, at most 64M).
        #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = parse_size)]
        write_size: u64,
    },
}

/// Which storage backend the SPM (and hosts) use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BackendKind {
    /// The core's thin pool, its metadata on the domain device (no root,
    /// no lvm2).
    Builtin,
    /// Real lvm2 on real PVs.
    Lvm,
}

/// Where lvm2 keeps the domain's volumes.
#[derive(Debug, Clone, clap::Args)]
struct LvmArgs {
    /// The backend.
    #[arg(long, value_enum, default_value_t = BackendKind::Builtin)]
    backend: BackendKind,
    /// The volume group (lvm backend).
    #[arg(long, value_name = "VG", required_if_eq("backend", "lvm"))]
    vg: Option<String>,
    /// A PV of the volume group (lvm backend; repeat for each). Only these
    /// devices are visible to lvm2.
    #[arg(long = "pv", value_name = "DEVICE")]
    pvs: Vec<PathBuf>,
}

/// How the SPM role and host ids are protected on shared storage.
#[derive(Debug, Clone, clap::Args)]
struct LeaseArgs {
    /// builtin: the SPM header's heartbeat and a lock on this machine;
    /// sanlock: sanlock leases on the domain device (the sanlock daemon
    /// must run on every machine).
    #[arg(long, value_enum, default_value_t = LeaseKind::Builtin)]
    lease: LeaseKind,
    /// sanlock's I/O timeout in seconds: written into the host id leases
    /// (pool create) and used when joining the lockspace. Failure
    /// detection takes about 8 times this.
    #[arg(long, value_name = "SECONDS", default_value_t = spmbox::daemon::sanlock::DEFAULT_IO_TIMEOUT,
          value_parser = clap::value_parser!(u32).range(1..=60))]
    sanlock_io_timeout: u32,
}

/// Which leases protect the domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LeaseKind {
    /// No shared-storage leases.
    Builtin,
    /// sanlock's lockspace (host ids) and SPM resource lease.
    Sanlock,
}

impl From<LeaseArgs> for commands::LeaseArgs {
    fn from(a: LeaseArgs) -> Self {
        match a.lease {
            LeaseKind::Builtin => commands::LeaseArgs::Builtin,
            LeaseKind::Sanlock => commands::LeaseArgs::Sanlock {
                io_timeout: a.sanlock_io_timeout,
            },
        }
    }
}

#[derive(Debug, Subcommand)]
enum PoolCommand {
    /// Create a storage domain: the mailbox and the pool metadata on
    /// --device (a file that does not exist is created), and data LUNs.
    Create {
        /// The domain device (file or block device).
        #[arg(long, value_name = "PATH")]
        device: PathBuf,
        /// A data LUN (file or block device; repeat for each).
        #[arg(long = "lun", value_name = "PATH", required = true)]
        luns: Vec<PathBuf>,
        /// Host ids 1..=N (at most 2000).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=2000))]
        hosts: u16,
        /// Bytes per extent: a power of two, at least 1M.
        #[arg(long, value_name = "SIZE", default_value = "128M", value_parser = parse_size)]
        extent_size: u64,
        /// Logical sector size (512 or 4096). Default: the device's.
        #[arg(long, value_name = "BYTES", value_parser = ["512", "4096"])]
        sector_size: Option<String>,
        /// The domain UUID. Default: a new random one.
        #[arg(long, value_name = "UUID")]
        domain: Option<String>,
        /// Overwrite an existing mailbox and LUN labels.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        lvm: LvmArgs,
        #[command(flatten)]
        lease: LeaseArgs,
    },
    /// Add a LUN to the pool while everything runs: parked requests are
    /// served at once and paused guests resume.
    AddLun {
        /// The domain device.
        #[arg(long, value_name = "PATH")]
        device: PathBuf,
        /// The new LUN (file or block device).
        #[arg(long, value_name = "PATH")]
        lun: PathBuf,
        /// The running SPM's control socket. Default: the domain's.
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        #[command(flatten)]
        lvm: LvmArgs,
    },
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Create a thin volume; prints its UUID.
    Create {
        /// The domain device.
        #[arg(long, value_name = "PATH")]
        device: PathBuf,
        /// The volume UUID. Default: a new random one.
        #[arg(long, value_name = "UUID")]
        id: Option<String>,
        /// The size the guest sees.
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        virtual_size: u64,
        /// Bytes allocated now (rounded up to whole extents; at least one).
        #[arg(long, value_name = "SIZE", default_value = "0", value_parser = parse_size)]
        initial_size: u64,
        /// The running SPM's control socket. Default: the domain's.
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        #[command(flatten)]
        lvm: LvmArgs,
    },
}

impl From<LvmArgs> for commands::BackendArgs {
    fn from(a: LvmArgs) -> Self {
        match (a.backend, a.vg) {
            (BackendKind::Lvm, Some(vg)) => commands::BackendArgs::Lvm { vg, pvs: a.pvs },
            _ => commands::BackendArgs::Builtin,
        }
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    spmbox::units::parse_size(s)
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    spmbox::units::parse_duration(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    spmbox::cli::logging::init(cli.verbose);
    let result = match cli.command {
        Command::Format {
            device,
            hosts,
            sector_size,
            domain,
            force,
        } => {
            let sector_size = sector_size.and_then(|s| s.parse().ok());
            commands::format(&device, hosts, sector_size, domain.as_deref(), force)
        }
        Command::Inspect { device, host, json } => commands::inspect(&device, host, json),
        Command::Repair {
            device,
            hosts,
            sector_size,
            domain,
        } => {
            let sector_size = sector_size.and_then(|s| s.parse().ok());
            commands::repair(&device, hosts, sector_size, domain.as_deref())
        }
        Command::Pool(PoolCommand::Create {
            device,
            luns,
            hosts,
            extent_size,
            sector_size,
            domain,
            force,
            lvm,
            lease,
        }) => commands::pool_create(
            &device,
            &luns,
            hosts,
            extent_size,
            sector_size.and_then(|s| s.parse().ok()),
            domain.as_deref(),
            force,
            &lvm.into(),
            &lease.into(),
        ),
        Command::Pool(PoolCommand::AddLun {
            device,
            lun,
            control,
            lvm,
        }) => commands::add_lun(&device, &lun, control.as_deref(), &lvm.into()),
        Command::Volume(VolumeCommand::Create {
            device,
            id,
            virtual_size,
            initial_size,
            control,
            lvm,
        }) => commands::volume_create(
            &device,
            id.as_deref(),
            virtual_size,
            initial_size,
            control.as_deref(),
            &lvm.into(),
        ),
        Command::Status {
            device,
            control,
            json,
            lease,
        } => commands::status(&device, control.as_deref(), json, &lease.into()),
        Command::Spm {
            device,
            doorbell_interval,
            full_scan_interval,
            spm_id,
            control,
            metrics,
            accept_metadata_rollback,
            lvm,
            lease,
        } => commands::spm(
            &device,
            doorbell_interval,
            full_scan_interval,
            spm_id,
            control,
            metrics,
            accept_metadata_rollback,
            &lvm.into(),
            &lease.into(),
        ),
        Command::Host {
            device,
            host_id,
            volumes,
            rate,
            write_size,
            guest_bytes,
            chunk_size,
            utilization,
            lun_search,
            exit_when_done,
            json_events,
            metrics,
            vm,
            vm_kernel,
            vm_initrd,
            lvm,
            lease,
        } => commands::host(commands::HostArgs {
            device,
            host_id,
            volumes,
            rate,
            write_size,
            guest_bytes,
            chunk_size,
            utilization,
            lun_search,
            exit_when_done,
            json_events,
            metrics,
            backend: lvm.into(),
            lease: lease.into(),
            vm,
            vm_kernel,
            vm_initrd,
        }),
        Command::VmGuest {
            device,
            volume,
            generation,
            bytes,
            rate,
            write_size,
        } => Ok(spmbox::vm::guest::run(&spmbox::vm::guest::VmGuestArgs {
            device: &device,
            volume: &volume,
            generation,
            bytes,
            rate,
            write_size,
        })),
        Command::Demo { json, keep, vm } => spmbox::cli::demo::run(json, keep, vm),
        Command::Bench {
            device,
            quick,
            json,
            svg,
            only,
        } => spmbox::bench::run(&spmbox::bench::BenchOptions {
            device,
            quick,
            json,
            svg,
            only,
        }),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("spmbox: error: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}
