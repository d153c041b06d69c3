//! The `spmbox` command line. This file only parses arguments; the work is
//! in the library's modules.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use spmbox::commands;

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
    /// size. An existing mailbox is never overwritten without --force.
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
        /// Overwrite an existing mailbox (every request and reply in it is
        /// lost).
        #[arg(long)]
        force: bool,
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    spmbox::logging::init(cli.verbose);
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
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("spmbox: error: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}
