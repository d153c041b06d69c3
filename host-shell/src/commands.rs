//! The commands of the `spmbox` binary, and their exit codes.

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use spmbox_core::wire::Uuid;

use crate::device::Access;
use crate::inspect;
use crate::mailbox::{self, FormatOptions, Mailbox, MailboxError};
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
}

impl CommandError {
    /// The exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CommandError::Usage(_) => EXIT_USAGE,
            CommandError::Mailbox(
                MailboxError::NotAMailbox { .. }
                | MailboxError::DamagedSuperblock { .. }
                | MailboxError::UnsupportedVersion { .. }
                | MailboxError::SectorSizeMismatch { .. }
                | MailboxError::TooSmall { .. },
            ) => EXIT_NOT_A_MAILBOX,
            CommandError::Mailbox(_) | CommandError::Output(_) => EXIT_ERROR,
        }
    }
}

/// `spmbox format`.
pub fn format(
    path: &Path,
    hosts: u16,
    sector_size: Option<u32>,
    domain: Option<&str>,
    force: bool,
) -> Result<ExitCode, CommandError> {
    let domain = match domain {
        Some(text) => Some(Uuid::parse_str(text).filter(|u| !u.is_nil()).ok_or_else(|| {
            CommandError::Usage(format!(
                "--domain {text:?} is not a UUID (expected 8-4-4-4-12 hex digits, not all zero)"
            ))
        })?),
        None => None,
    };
    let options = FormatOptions {
        hosts,
        sector_size,
        domain,
        force,
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

/// `spmbox inspect`.
pub fn inspect(path: &Path, host: Option<u16>, json: bool) -> Result<ExitCode, CommandError> {
    let mailbox = Mailbox::open(path, Access::ReadOnly)?;
    let geometry = mailbox.geometry();
    if let Some(h) = host {
        if geometry.inbox_area(h).is_none() {
            return Err(CommandError::Usage(format!(
                "--host {h} is out of range: the mailbox on {} has host ids 1..={}",
                path.display(),
                geometry.max_hosts()
            )));
        }
    }
    let image = mailbox.read_all()?;
    let report = inspect::audit(&image, mailbox.superblock(), host);
    let device = path.display().to_string();
    let mut out = std::io::stdout().lock();
    if json {
        let text = serde_json::to_string_pretty(&inspect::to_json(&report, &device))
            .map_err(std::io::Error::other)?;
        writeln!(out, "{text}")?;
    } else {
        write!(out, "{}", inspect::render(&report, &device))?;
    }
    let code = if report.problems.is_empty() {
        EXIT_OK
    } else {
        EXIT_DEFECTS
    };
    Ok(ExitCode::from(code))
}
