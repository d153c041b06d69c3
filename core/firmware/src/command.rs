//! Commands from the machine that runs qemu, through files beside the
//! domain file (the firmware has no socket):
//!
//! 1. `spmbox pool add-lun --firmware` (or a script) labels the LUN on
//!    Linux, then writes one line to `<domain>.cmd.tmp` and renames it to
//!    `<domain>.cmd`: `add-lun <lun-uuid> <extents>` or `stop`.
//! 2. The firmware takes it by renaming it to `<domain>.cmd.taken` (so a
//!    writer that gives up and removes `<domain>.cmd` knows for sure
//!    whether the firmware took it), carries it out, writes one line to
//!    `<domain>.reply` (through `<domain>.reply.tmp`): `ok <message>` or
//!    `error <message>`, and removes `<domain>.cmd.taken`.
//!
//! A LUN already in the pool is answered `ok`: repeating an add-lun whose
//! answer was lost is harmless.

use core::fmt::Write as _;

use defmt::{info, warn};
use spmbox_core::wire::Uuid;

use crate::Paths;
use crate::disk;

/// Suffixes of the files beside the domain file.
pub const COMMAND_SUFFIX: &[u8] = b".cmd";
/// The command once the firmware took it.
pub const TAKEN_SUFFIX: &[u8] = b".cmd.taken";
/// The answer.
pub const REPLY_SUFFIX: &[u8] = b".reply";
/// The answer while it is written.
pub const REPLY_TMP_SUFFIX: &[u8] = b".reply.tmp";
/// The longest command line taken.
pub const COMMAND_MAX: usize = 128;
/// The longest answer.
pub const REPLY_MAX: usize = 320;

/// A command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Add a LUN of `extents` extents labelled `lun` on Linux.
    AddLun {
        /// The LUN's UUID (its label's).
        lun: Uuid,
        /// Its extents.
        extents: u32,
    },
    /// Stop gracefully: the replies due, the vacant SPM header, exit.
    Stop,
    /// A `stop` an earlier run of the firmware took and did not answer:
    /// not for this run.
    StaleStop,
    /// Anything else.
    Unknown,
}

/// Parses one command line.
pub fn parse(text: &[u8]) -> Command {
    let Ok(text) = core::str::from_utf8(text) else {
        return Command::Unknown;
    };
    let mut words = text.split_ascii_whitespace();
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some("stop"), None, None, None) => Command::Stop,
        (Some("add-lun"), Some(lun), Some(extents), None) => {
            match (Uuid::parse_str(lun), extents.parse::<u32>()) {
                (Some(lun), Ok(extents)) if extents > 0 => Command::AddLun { lun, extents },
                _ => Command::Unknown,
            }
        }
        _ => Command::Unknown,
    }
}

/// Takes the pending command, if there is one.
pub fn take(paths: &Paths) -> Option<Command> {
    disk::rename(disk::c(&paths.command), disk::c(&paths.taken)).ok()?;
    // Taken but unreadable: answered as unknown rather than left hanging.
    read_taken(paths).or(Some(Command::Unknown))
}

/// A command an earlier run of the firmware took and did not answer (it
/// stopped or crashed in between), if there is one. An `add-lun` is done
/// again (a LUN in the pool already is answered as such); a `stop` is
/// not for this run.
pub fn leftover(paths: &Paths) -> Option<Command> {
    match read_taken(paths)? {
        Command::Stop => Some(Command::StaleStop),
        other => Some(other),
    }
}

fn read_taken(paths: &Paths) -> Option<Command> {
    let mut buf = [0u8; COMMAND_MAX];
    let n = disk::read_small(disk::c(&paths.taken), &mut buf)?;
    let cmd = parse(&buf[..n]);
    info!("firmware: command {=[u8]:a}", buf[..n].trim_ascii());
    Some(cmd)
}

/// An answer line.
pub struct Reply {
    ok: bool,
    text: heapless::String<REPLY_MAX>,
}

impl Reply {
    fn new(ok: bool, args: core::fmt::Arguments<'_>) -> Reply {
        let mut text = heapless::String::new();
        let _ = text.push_str(if ok { "ok " } else { "error " });
        // A message longer than REPLY_MAX is cut.
        let _ = text.write_fmt(args);
        let _ = text.push('\n');
        Reply { ok, text }
    }

    /// Done.
    pub fn ok(args: core::fmt::Arguments<'_>) -> Reply {
        Reply::new(true, args)
    }

    /// Refused or failed.
    pub fn error(args: core::fmt::Arguments<'_>) -> Reply {
        Reply::new(false, args)
    }

    /// Whether it says done.
    pub fn is_ok(&self) -> bool {
        self.ok
    }
}

/// Writes the answer, then removes the taken command.
pub fn answer(paths: &Paths, reply: &Reply) {
    if let Err(e) = disk::write_small(
        disk::c(&paths.reply_tmp),
        disk::c(&paths.reply),
        reply.text.as_bytes(),
    ) {
        warn!("firmware: cannot write the answer: {}", e);
    }
    let _ = disk::remove(disk::c(&paths.taken));
}
