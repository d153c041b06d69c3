//! The `spmbox` command line. This file only parses arguments
//! ([`spmbox::cli::args`]), runs the command and maps its result to the
//! exit status; the work is in the library's modules.

use std::process::ExitCode;

use clap::Parser as _;
use spmbox::cli::args::{Cli, Command, ConfigCommand, PoolCommand, VolumeCommand};
use spmbox::cli::{commands, config};

fn main() -> ExitCode {
    // The daemons' configuration files become flags before parsing, so
    // that a value in a file is checked as the flag is.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let config = match config::read_files(&config::config_files(&argv)) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("{}{err}", spmbox::cli::args::ERROR_PREFIX);
            return ExitCode::from(commands::EXIT_USAGE);
        }
    };
    let cli = match Cli::try_parse_from(config::apply(argv, &config)) {
        Ok(cli) => cli,
        Err(err) => return spmbox::cli::args::exit_on_parse_error(&err, &config),
    };
    let level = match (cli.verbose, &config.log_level) {
        (0, Some(level)) => level.as_str(),
        (n, _) => spmbox::cli::logging::level_of(n),
    };
    spmbox::cli::logging::init(
        level,
        cli.log_format.or(config.log_format).unwrap_or_default(),
    );
    let result = match &cli.command {
        Command::Format(args) => commands::format(args),
        Command::Repair(args) => commands::repair(args),
        Command::Inspect(args) => commands::inspect(args),
        Command::Upgrade(args) => commands::upgrade(args),
        Command::Pool(PoolCommand::Create(args)) => commands::pool_create(args),
        Command::Pool(PoolCommand::AddLun(args)) => commands::add_lun(args),
        Command::Pool(PoolCommand::RemoveLun(args)) => spmbox::cli::lun::remove_lun(args),
        Command::Volume(VolumeCommand::Create(args)) => commands::volume_create(args),
        Command::Volume(VolumeCommand::Verify(args)) => spmbox::cli::firmware::verify(args),
        Command::Volume(VolumeCommand::List(args)) => spmbox::cli::volume::list(args),
        Command::Volume(VolumeCommand::Delete(args)) => spmbox::cli::volume::delete(args),
        Command::Volume(VolumeCommand::Reduce(args)) => spmbox::cli::volume::reduce(args),
        Command::Status(args) => commands::status(args),
        Command::Spm(args) => commands::spm(args),
        Command::Host(args) => commands::host(args),
        Command::Bench(args) => spmbox::bench::run(args),
        Command::Demo(args) => spmbox::cli::demo::run(args),
        Command::Config(ConfigCommand::Check(args)) => commands::config_check(args),
        Command::GenerateAssets(args) => commands::generate_assets(args),
        Command::VmGuest(args) => Ok(spmbox::vm::guest::run(args)),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("spmbox: error: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}
