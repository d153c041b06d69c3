//! A small NBD server: the subset of the Network Block Device protocol that
//! qemu's NBD client uses, served on a Unix socket.
//!
//! `spmbox host` exports each volume it serves this way, and qemu opens it
//! as `-blockdev driver=nbd,server.type=unix,server.path=SOCK,export=NAME`.
//!
//! # What is implemented
//!
//! - Fixed newstyle negotiation (the server sends `NBD_FLAG_FIXED_NEWSTYLE`
//!   and `NBD_FLAG_NO_ZEROES`) with the options `NBD_OPT_EXPORT_NAME`,
//!   `NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_LIST` and `NBD_OPT_ABORT`.
//!   Every other option, structured replies included, is answered with
//!   `NBD_REP_ERR_UNSUP`: the server sends simple replies only. An export
//!   name other than the one served gets `NBD_REP_ERR_UNKNOWN` (after
//!   `NBD_OPT_EXPORT_NAME`, which has no error reply, the connection is
//!   closed).
//! - `NBD_OPT_GO` and `NBD_OPT_INFO` reply `NBD_INFO_EXPORT` (size and
//!   transmission flags) and `NBD_INFO_BLOCK_SIZE`: minimum the export's
//!   [`Export::block_size`] (4096 by default, so qemu aligns every request
//!   itself, as `O_DIRECT` needs), preferred 64 KiB, maximum 32 MiB.
//! - Transmission: `READ`, `WRITE` (with `FUA`), `FLUSH`, `TRIM`,
//!   `WRITE_ZEROES` (with `FUA`) and `DISC`. Flags: `HAS_FLAGS`,
//!   `SEND_FLUSH`, `SEND_FUA`, `SEND_TRIM`, `SEND_WRITE_ZEROES`. `TRIM` is
//!   passed to [`Export::trim`], which may do nothing: the protocol makes
//!   trim a hint, and trimmed bytes may read back as before.
//!
//! # Limits
//!
//! - A `READ` or `WRITE` longer than the maximum block size (32 MiB) is
//!   refused with `EINVAL`; a refused write's payload is read and
//!   discarded in small pieces, so the connection stays in step.
//!   `WRITE_ZEROES` and `TRIM` carry no payload and may be longer.
//! - Each connection holds at most 64 MiB of request and reply data at
//!   once (one request is always let through); the reader waits for
//!   replies to go out before taking more.
//! - Payloads are read into, and read replies built in, buffers aligned
//!   for `O_DIRECT` ([`Export::write_aligned`], [`Export::read_aligned`]);
//!   each connection keeps up to 8 of them of at most 4 MiB for reuse (so
//!   up to 32 MiB stays allocated while it is open).
//! - Option data is at most 8 KiB (`NBD_REP_ERR_TOO_BIG` past it, the data
//!   discarded); a client has 30 s for each read of the negotiation.
//! - At most 16 connections at once; more are closed at once.
//! - A request whose magic is wrong closes the connection: the stream can
//!   no longer be parsed.
//!
//! # Concurrency
//!
//! One thread accepts. Each connection gets a reader thread, which parses
//! requests and reads write payloads, and 4 worker threads, which call the
//! export and write the replies, each whole under the connection's write
//! lock; replies may go out of order (simple replies carry the client's
//! handle). A `FLUSH` waits until every write, write-zeroes and trim the
//! connection received before it has finished, then calls
//! [`Export::flush`], so it covers every write replied to before it.
//!
//! The socket is created with mode 0600. Dropping the [`Server`] closes the
//! listener and every connection, joins every thread, and removes the
//! socket file.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::io::device::AlignedBuf;

/// `NBDMAGIC`: the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation; also the magic of each option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of each option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of each transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of each simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option `NBD_OPT_EXPORT_NAME`.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// Option `NBD_OPT_LIST`.
pub const OPT_LIST: u32 = 3;
/// Option `NBD_OPT_INFO`.
pub const OPT_INFO: u32 = 6;
/// Option `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;
/// Option `NBD_OPT_STRUCTURED_REPLY` (refused).
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// Option reply `NBD_REP_SERVER`.
pub const REP_SERVER: u32 = 2;
/// Option reply `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// Option reply `NBD_REP_ERR_UNSUP`.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Option reply `NBD_REP_ERR_INVALID`.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// Option reply `NBD_REP_ERR_UNKNOWN`.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// Option reply `NBD_REP_ERR_TOO_BIG`.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Information type `NBD_INFO_EXPORT`.
pub const INFO_EXPORT: u16 = 0;
/// Information type `NBD_INFO_BLOCK_SIZE`.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag `NBD_FLAG_HAS_FLAGS`.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag `NBD_FLAG_SEND_FLUSH`.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag `NBD_FLAG_SEND_FUA`.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag `NBD_FLAG_SEND_TRIM`.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag `NBD_FLAG_SEND_WRITE_ZEROES`.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// The transmission flags this server sends.
pub const TRANSMISSION_FLAGS: u16 =
    FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;

/// Command `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// Command `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// Command `NBD_CMD_DISC`.
pub const CMD_DISC: u16 = 2;
/// Command `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// Command `NBD_CMD_TRIM`.
pub const CMD_TRIM: u16 = 4;
/// Command `NBD_CMD_WRITE_ZEROES`.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command flag `NBD_CMD_FLAG_FUA`.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag `NBD_CMD_FLAG_NO_HOLE` (zeroes are always written).
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Error `EPERM`.
pub const EPERM: u32 = 1;
/// Error `EIO`.
pub const EIO: u32 = 5;
/// Error `ENOMEM`.
pub const ENOMEM: u32 = 12;
/// Error `EINVAL`.
pub const EINVAL: u32 = 22;
/// Error `ENOSPC`.
pub const ENOSPC: u32 = 28;
/// Error `EOVERFLOW`.
pub const EOVERFLOW: u32 = 75;
/// Error `ENOTSUP`.
pub const ENOTSUP: u32 = 95;
/// Error `ESHUTDOWN`.
pub const ESHUTDOWN: u32 = 108;

/// Preferred block size advertised: 64 KiB.
pub const PREFERRED_BLOCK: u32 = 64 << 10;
/// Maximum block size advertised, and the longest read or write taken.
pub const MAX_BLOCK: u32 = 32 << 20;
/// Longest option data taken during negotiation.
pub const MAX_OPTION: u32 = 8 << 10;
/// Request and reply bytes one connection holds at once.
pub const CONNECTION_BUDGET: u64 = 64 << 20;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Worker threads per connection.
pub const WORKERS: usize = 4;
/// Payload buffers each connection keeps for reuse.
pub const POOLED_BUFFERS: usize = 8;
/// Largest payload buffer kept for reuse; longer requests get a buffer of
/// their own, freed once answered.
pub const MAX_POOLED_BUFFER: usize = 4 << 20;
/// How long the server waits for each read during negotiation.
pub const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(30);

/// What an export serves. Offsets and lengths are bytes.
///
/// The server checks every request against [`Export::size`] before it
/// calls the export (reads and trims past it are `EINVAL`, writes
/// `ENOSPC`), and never passes a read or write longer than [`MAX_BLOCK`].
pub trait Export: Send + Sync + 'static {
    /// The size told to clients.
    fn size(&self) -> u64;
    /// The minimum block size told to clients (a power of two, at most
    /// 64 KiB); qemu then aligns every request to it.
    fn block_size(&self) -> u32 {
        4096
    }
    /// Fills `buf` from `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError>;
    /// Writes `data` at `offset`; with `fua`, durably before returning.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError>;
    /// [`Export::read`] into a buffer aligned for `O_DIRECT`, which an
    /// export on devices can read into without a bounce buffer. The server
    /// calls this one; by default it calls [`Export::read`].
    fn read_aligned(&self, offset: u64, buf: &mut AlignedBuf) -> Result<(), NbdError> {
        self.read(offset, buf)
    }
    /// [`Export::write`] from a buffer aligned for `O_DIRECT`, which an
    /// export on devices can write from without a copy. The server calls
    /// this one; by default it calls [`Export::write`].
    fn write_aligned(&self, offset: u64, data: &AlignedBuf, fua: bool) -> Result<(), NbdError> {
        self.write(offset, data, fua)
    }
    /// Writes `len` zero bytes at `offset`; with `fua`, durably.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), NbdError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), NbdError>;
    /// A hint that `offset..offset + len` is no longer needed; may do
    /// nothing.
    fn trim(&self, offset: u64, len: u64) -> Result<(), NbdError>;
}

/// An error for the client: the NBD error number and what happened (logged).
#[derive(Clone, PartialEq, Eq)]
pub struct NbdError {
    /// The error number sent to the client (one of the protocol's: EPERM,
    /// EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN; any
    /// other is sent as EIO).
    pub errno: u32,
    /// What happened, for the log.
    pub what: String,
}

impl NbdError {
    /// An error with this number.
    pub fn new(errno: u32, what: impl Into<String>) -> NbdError {
        NbdError {
            errno,
            what: what.into(),
        }
    }

    /// `ENOSPC`: no room to write there (yet).
    pub fn no_space(what: impl Into<String>) -> NbdError {
        NbdError::new(ENOSPC, what)
    }

    /// `EIO`: the storage failed.
    pub fn io(what: impl Into<String>) -> NbdError {
        NbdError::new(EIO, what)
    }

    /// `EINVAL`: the request is not valid.
    pub fn invalid(what: impl Into<String>) -> NbdError {
        NbdError::new(EINVAL, what)
    }

    /// The number sent on the wire: the protocol's values only.
    pub fn wire_errno(&self) -> u32 {
        match self.errno {
            EPERM | EIO | ENOMEM | EINVAL | ENOSPC | EOVERFLOW | ENOTSUP | ESHUTDOWN => self.errno,
            _ => EIO,
        }
    }
}

impl fmt::Debug for NbdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NbdError(errno {}: {})", self.errno, self.what)
    }
}

impl fmt::Display for NbdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (NBD error {})", self.what, self.errno)
    }
}

impl std::error::Error for NbdError {}

/// What the accept thread and the connections share.
struct Shared {
    name: String,
    export: Arc<dyn Export>,
    stop: AtomicBool,
    connections: AtomicUsize,
    /// A clone of each open connection's stream, to shut it down on stop.
    streams: Mutex<HashMap<u64, UnixStream>>,
}

/// An NBD server on a Unix socket. Stops (closes the listener and every
/// connection, joins its threads, removes the socket file) on drop.
pub struct Server {
    shared: Arc<Shared>,
    listener: Arc<UnixListener>,
    accept: Option<JoinHandle<()>>,
    socket: PathBuf,
    /// Device and inode of the socket file, to remove only our own.
    id: (u64, u64),
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("socket", &self.socket)
            .field("name", &self.shared.name)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Server {
    /// Listens on `socket` (a stale socket file left by a dead process is
    /// replaced; a live one, i.e. connect() succeeds, is an error naming it),
    /// serving `export` under `name`. Returns once listening.
    pub fn serve(socket: &Path, name: &str, export: Arc<dyn Export>) -> io::Result<Server> {
        if name.len() > 4096 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "NBD export name is {} bytes long; the protocol allows at most 4096",
                    name.len()
                ),
            ));
        }
        let shown = socket.display();
        match std::fs::symlink_metadata(socket) {
            Ok(md) if md.file_type().is_socket() => {
                if UnixStream::connect(socket).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!(
                            "{shown} is in use: a live server accepts connections on it; \
                             stop that server or choose another socket path"
                        ),
                    ));
                }
                tracing::info!(socket = %shown, "replacing a stale NBD socket");
            }
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{shown} exists and is not a socket; remove it or choose another socket path"
                    ),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot look at NBD socket path {shown}: {e}"),
                ));
            }
        }
        // Bound under a temporary name, made 0600, then renamed into
        // place: the socket is never reachable with a wider mode, and a
        // stale socket is replaced in one step.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = match socket.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        let tmp = dir.join(format!(
            ".nbd{}.{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot create NBD socket {} (bound first as {}): {e}; \
                     check that the directory exists and is writable, and that the path \
                     is shorter than 108 bytes",
                    shown,
                    tmp.display()
                ),
            )
        })?;
        let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&tmp, socket))
            .and_then(|()| std::fs::symlink_metadata(socket));
        let md = match placed {
            Ok(md) => md,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot put NBD socket in place at {shown}: {e}"),
                ));
            }
        };
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            export,
            stop: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            streams: Mutex::new(HashMap::new()),
        });
        let listener = Arc::new(listener);
        let accept = {
            let shared = Arc::clone(&shared);
            let listener = Arc::clone(&listener);
            std::thread::Builder::new().name("nbd-accept".into()).spawn(
                crate::daemon::in_current_span(move || accept_loop(&listener, &shared)),
            )
        };
        let accept = match accept {
            Ok(h) => h,
            Err(e) => {
                let _ = std::fs::remove_file(socket);
                return Err(e);
            }
        };
        tracing::info!(socket = %shown, export = name, "NBD server listening");
        Ok(Server {
            shared,
            listener,
            accept: Some(accept),
            socket: socket.to_owned(),
            id: (md.dev(), md.ino()),
        })
    }

    /// Clients connected now.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes the accept thread: shutdown makes a blocked accept()
        // return; the connection is a second way if it did not.
        let _ = rustix::net::shutdown(&*self.listener, rustix::net::Shutdown::Both);
        let _ = UnixStream::connect(&self.socket);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        if let Ok(md) = std::fs::symlink_metadata(&self.socket)
            && (md.dev(), md.ino()) == self.id
        {
            let _ = std::fs::remove_file(&self.socket);
        }
        tracing::info!(socket = %self.socket.display(), "NBD server stopped");
    }
}

fn accept_loop(listener: &UnixListener, shared: &Arc<Shared>) {
    let mut handles: Vec<JoinHandle<()>> = Vec::new();
    let mut next_id = 0u64;
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "NBD accept failed");
                // EMFILE and the like: do not spin.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        // Reap finished connections.
        let (done, running): (Vec<_>, Vec<_>) = handles.into_iter().partition(|h| h.is_finished());
        handles = running;
        for h in done {
            let _ = h.join();
        }
        // At the limit, a closing connection may free a slot soon (a
        // client that reconnects races its old connection's end).
        for _ in 0..100 {
            if shared.connections.load(Ordering::SeqCst) < MAX_CONNECTIONS {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if shared.connections.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            tracing::warn!(
                limit = MAX_CONNECTIONS,
                "NBD connection refused: too many connections"
            );
            continue;
        }
        let Ok(clone) = stream.try_clone() else {
            continue;
        };
        let id = next_id;
        next_id += 1;
        lock(&shared.streams).insert(id, clone);
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let conn_shared = Arc::clone(shared);
        let spawned = std::thread::Builder::new().name("nbd-conn".into()).spawn(
            crate::daemon::in_current_span(move || {
                serve_connection(stream, &conn_shared);
                lock(&conn_shared.streams).remove(&id);
                conn_shared.connections.fetch_sub(1, Ordering::SeqCst);
            }),
        );
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start an NBD connection thread");
                lock(&shared.streams).remove(&id);
                shared.connections.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
    for s in lock(&shared.streams).values() {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    for h in handles {
        let _ = h.join();
    }
}

fn serve_connection(stream: UnixStream, shared: &Arc<Shared>) {
    let _ = stream.set_read_timeout(Some(NEGOTIATION_TIMEOUT));
    match negotiate(&stream, shared) {
        Ok(true) => {
            let _ = stream.set_read_timeout(None);
            transmission(stream, shared);
        }
        Ok(false) => {}
        Err(e) => tracing::debug!(error = %e, "NBD negotiation ended"),
    }
}

#[cfg(test)]
fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Reads and drops `len` bytes, a few KiB at a time.
fn discard(r: &mut impl Read, len: u64) -> io::Result<()> {
    let n = io::copy(&mut r.take(len), &mut io::sink())?;
    if n < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

fn option_reply(w: &mut impl Write, option: u32, reply: u32, data: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    // Replies are built from bounded data (the name, a few fields).
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(data);
    w.write_all(&out)
}

fn block_sizes(export: &dyn Export) -> (u32, u32, u32) {
    let min = export.block_size();
    let min = if min.is_power_of_two() && min <= PREFERRED_BLOCK {
        min
    } else {
        4096
    };
    (min, PREFERRED_BLOCK, MAX_BLOCK)
}

/// The negotiation phase. `Ok(true)`: go on to transmission.
fn negotiate(stream: &UnixStream, shared: &Shared) -> io::Result<bool> {
    let mut s = stream;
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let client = read_u32(&mut s)?;
    if client & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(bad("client sent unknown client flags"));
    }
    let no_zeroes = client & FLAG_C_NO_ZEROES != 0;
    let export = &*shared.export;
    loop {
        if read_u64(&mut s)? != IHAVEOPT {
            return Err(bad("option without IHAVEOPT magic"));
        }
        let option = read_u32(&mut s)?;
        let len = read_u32(&mut s)?;
        if len > MAX_OPTION {
            if option == OPT_EXPORT_NAME {
                return Err(bad("export name too long"));
            }
            discard(&mut s, u64::from(len))?;
            option_reply(&mut s, option, REP_ERR_TOO_BIG, b"")?;
            continue;
        }
        let mut data = vec![0; len as usize];
        s.read_exact(&mut data)?;
        match option {
            OPT_EXPORT_NAME => {
                if data != shared.name.as_bytes() {
                    // This option has no error reply: the spec says close.
                    tracing::info!(
                        asked = %String::from_utf8_lossy(&data),
                        "NBD client asked for an unknown export"
                    );
                    return Ok(false);
                }
                let mut out = Vec::with_capacity(10 + 124);
                out.extend_from_slice(&export.size().to_be_bytes());
                out.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0; 124]);
                }
                s.write_all(&out)?;
                return Ok(true);
            }
            OPT_ABORT => {
                let _ = option_reply(&mut s, option, REP_ACK, b"");
                return Ok(false);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_reply(&mut s, option, REP_ERR_INVALID, b"")?;
                    continue;
                }
                let name = shared.name.as_bytes();
                let mut reply = Vec::with_capacity(4 + name.len());
                reply.extend_from_slice(&(name.len() as u32).to_be_bytes());
                reply.extend_from_slice(name);
                option_reply(&mut s, option, REP_SERVER, &reply)?;
                option_reply(&mut s, option, REP_ACK, b"")?;
            }
            OPT_INFO | OPT_GO => {
                let Some(name) = parse_info_request(&data) else {
                    option_reply(&mut s, option, REP_ERR_INVALID, b"")?;
                    continue;
                };
                if name != shared.name.as_bytes() {
                    tracing::info!(
                        asked = %String::from_utf8_lossy(name),
                        "NBD client asked for an unknown export"
                    );
                    option_reply(&mut s, option, REP_ERR_UNKNOWN, b"")?;
                    continue;
                }
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&export.size().to_be_bytes());
                info.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                option_reply(&mut s, option, REP_INFO, &info)?;
                let (min, preferred, max) = block_sizes(export);
                let mut info = Vec::with_capacity(14);
                info.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                info.extend_from_slice(&min.to_be_bytes());
                info.extend_from_slice(&preferred.to_be_bytes());
                info.extend_from_slice(&max.to_be_bytes());
                option_reply(&mut s, option, REP_INFO, &info)?;
                option_reply(&mut s, option, REP_ACK, b"")?;
                if option == OPT_GO {
                    return Ok(true);
                }
            }
            _ => option_reply(&mut s, option, REP_ERR_UNSUP, b"")?,
        }
    }
}

/// The name in `NBD_OPT_INFO`/`NBD_OPT_GO` data, if the data is well formed:
/// u32 name length, name, u16 count, count u16 information requests.
fn parse_info_request(data: &[u8]) -> Option<&[u8]> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name_end = 4usize.checked_add(name_len)?;
    let name = data.get(4..name_end)?;
    let count = u16::from_be_bytes(data.get(name_end..name_end + 2)?.try_into().ok()?) as usize;
    if data.len() != name_end + 2 + 2 * count {
        return None;
    }
    Some(name)
}

/// What a worker does for one request.
enum Work {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: AlignedBuf,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Trim {
        offset: u64,
        len: u64,
    },
    Flush,
}

struct Job {
    handle: u64,
    /// Position in the connection's order of requests.
    seq: u64,
    /// Bytes taken from the connection's budget.
    bytes: u64,
    work: Work,
}

/// One connection in transmission.
struct Conn {
    export: Arc<dyn Export>,
    out: Mutex<UnixStream>,
    /// Request and reply bytes held now.
    budget: Mutex<u64>,
    budget_freed: Condvar,
    /// Sequence numbers of the writes, write-zeroes and trims under way.
    writes: Mutex<BTreeSet<u64>>,
    writes_done: Condvar,
    /// Payload buffers to reuse (at most [`POOLED_BUFFERS`]).
    buffers: Mutex<Vec<AlignedBuf>>,
}

impl Conn {
    /// A buffer of `len` bytes for a payload, reused when one fits. New
    /// ones are made at least [`PREFERRED_BLOCK`] long, rounded up to a
    /// power of two, so that they fit later requests too.
    fn take_buffer(&self, len: usize) -> AlignedBuf {
        let mut pool = lock(&self.buffers);
        if let Some(i) = pool.iter().position(|b| b.capacity() >= len) {
            let mut buf = pool.swap_remove(i);
            if buf.set_len(len) {
                return buf;
            }
        }
        drop(pool);
        let room = len.next_power_of_two().max(PREFERRED_BLOCK as usize);
        if room > MAX_POOLED_BUFFER {
            return AlignedBuf::new(len);
        }
        let mut buf = AlignedBuf::new(room);
        buf.set_len(len);
        buf
    }

    /// Keeps `buf` for reuse, in place of a smaller one when the pool is
    /// full.
    fn give_buffer(&self, buf: AlignedBuf) {
        if buf.capacity() > MAX_POOLED_BUFFER {
            return;
        }
        let mut pool = lock(&self.buffers);
        if pool.len() < POOLED_BUFFERS {
            pool.push(buf);
        } else if let Some(small) = pool.iter_mut().min_by_key(|b| b.capacity())
            && small.capacity() < buf.capacity()
        {
            *small = buf;
        }
    }

    fn take_budget(&self, bytes: u64) {
        let mut held = lock(&self.budget);
        while *held > 0 && *held + bytes > CONNECTION_BUDGET {
            held = self
                .budget_freed
                .wait(held)
                .unwrap_or_else(|e| e.into_inner());
        }
        *held += bytes;
    }

    fn give_budget(&self, bytes: u64) {
        let mut held = lock(&self.budget);
        *held = held.saturating_sub(bytes);
        self.budget_freed.notify_all();
    }

    fn write_done(&self, seq: u64) {
        lock(&self.writes).remove(&seq);
        self.writes_done.notify_all();
    }

    /// Waits until no write received before `seq` is under way.
    fn wait_writes_before(&self, seq: u64) {
        let mut w = lock(&self.writes);
        while w.first().is_some_and(|&first| first < seq) {
            w = self.writes_done.wait(w).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Sends a simple reply, whole, under the write lock.
    fn reply(&self, handle: u64, error: u32, data: &[u8]) {
        let mut head = [0u8; 16];
        head[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        head[4..8].copy_from_slice(&error.to_be_bytes());
        head[8..16].copy_from_slice(&handle.to_be_bytes());
        let mut out = lock(&self.out);
        let sent = out.write_all(&head).and_then(|()| {
            if error == 0 && !data.is_empty() {
                out.write_all(data)
            } else {
                Ok(())
            }
        });
        if let Err(e) = sent {
            tracing::debug!(error = %e, "NBD reply not sent; closing the connection");
            let _ = out.shutdown(std::net::Shutdown::Both);
        }
    }

    fn fail(&self, handle: u64, e: &NbdError) {
        tracing::warn!(errno = e.errno, what = %e.what, "NBD request failed");
        self.reply(handle, e.wire_errno(), b"");
    }

    fn run(&self, job: Job) {
        let export = &*self.export;
        let result = match job.work {
            Work::Read { offset, len } => {
                let mut buf = self.take_buffer(len as usize);
                let read = export.read_aligned(offset, &mut buf);
                if read.is_ok() {
                    self.reply(job.handle, 0, &buf);
                }
                self.give_buffer(buf);
                read
            }
            Work::Write { offset, data, fua } => {
                // Done only once answered: a later flush answers after it.
                match export.write_aligned(offset, &data, fua) {
                    Ok(()) => self.reply(job.handle, 0, b""),
                    Err(e) => self.fail(job.handle, &e),
                }
                self.give_buffer(data);
                self.write_done(job.seq);
                Ok(())
            }
            Work::WriteZeroes { offset, len, fua } => {
                // Done only once answered: a later flush answers after it.
                match export.write_zeroes(offset, len, fua) {
                    Ok(()) => self.reply(job.handle, 0, b""),
                    Err(e) => self.fail(job.handle, &e),
                }
                self.write_done(job.seq);
                Ok(())
            }
            Work::Trim { offset, len } => {
                // Done only once answered: a later flush answers after it.
                match export.trim(offset, len) {
                    Ok(()) => self.reply(job.handle, 0, b""),
                    Err(e) => self.fail(job.handle, &e),
                }
                self.write_done(job.seq);
                Ok(())
            }
            Work::Flush => {
                self.wait_writes_before(job.seq);
                export.flush().map(|()| self.reply(job.handle, 0, b""))
            }
        };
        if let Err(e) = result {
            self.fail(job.handle, &e);
        }
        self.give_budget(job.bytes);
    }
}

/// A request header.
struct Request {
    flags: u16,
    kind: u16,
    handle: u64,
    offset: u64,
    len: u32,
}

fn read_request(r: &mut impl Read) -> io::Result<Option<Request>> {
    let mut b = [0u8; 28];
    // A clean end of stream between requests is not an error.
    let mut got = 0;
    while got < b.len() {
        match r.read(&mut b[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let be16 = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let be32 = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let be64 = |i: usize| (u64::from(be32(i)) << 32) | u64::from(be32(i + 4));
    if be32(0) != REQUEST_MAGIC {
        return Err(bad("request magic is wrong"));
    }
    Ok(Some(Request {
        flags: be16(4),
        kind: be16(6),
        handle: be64(8),
        offset: be64(16),
        len: be32(24),
    }))
}

fn transmission(stream: UnixStream, shared: &Shared) {
    let out = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot clone the NBD connection");
            return;
        }
    };
    let conn = Arc::new(Conn {
        export: Arc::clone(&shared.export),
        out: Mutex::new(out),
        budget: Mutex::new(0),
        budget_freed: Condvar::new(),
        writes: Mutex::new(BTreeSet::new()),
        writes_done: Condvar::new(),
        buffers: Mutex::new(Vec::new()),
    });
    let (tx, rx) = mpsc::sync_channel::<Job>(WORKERS);
    let rx = Arc::new(Mutex::new(rx));
    let mut workers = Vec::with_capacity(WORKERS);
    for _ in 0..WORKERS {
        let conn = Arc::clone(&conn);
        let rx = Arc::clone(&rx);
        let spawned = std::thread::Builder::new().name("nbd-worker".into()).spawn(
            crate::daemon::in_current_span(move || {
                loop {
                    // The lock is held only while taking a job.
                    let job = lock(&rx).recv();
                    match job {
                        Ok(job) => conn.run(job),
                        Err(_) => break,
                    }
                }
            }),
        );
        match spawned {
            Ok(h) => workers.push(h),
            Err(e) => tracing::warn!(error = %e, "cannot start an NBD worker thread"),
        }
    }
    if workers.is_empty() {
        return;
    }
    if let Err(e) = read_requests(&stream, &conn, &tx) {
        tracing::debug!(error = %e, "NBD connection closed");
    }
    // Requests already taken are finished and answered, then the
    // connection closes.
    drop(tx);
    for w in workers {
        let _ = w.join();
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

fn read_requests(stream: &UnixStream, conn: &Conn, tx: &mpsc::SyncSender<Job>) -> io::Result<()> {
    let mut s = stream;
    let size = conn.export.size();
    let mut seq = 0u64;
    let closed = || io::Error::from(io::ErrorKind::BrokenPipe);
    while let Some(req) = read_request(&mut s)? {
        seq += 1;
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let len = u64::from(req.len);
        let end = req.offset.checked_add(len);
        let inside = end.is_some_and(|e| e <= size);
        let unknown_flags = req.flags & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE) != 0;
        let refuse = |errno: u32, what: String| {
            tracing::warn!(errno, what = %what, "NBD request refused");
            conn.reply(req.handle, errno, b"");
        };
        let range = || format!("{}..{}", req.offset, req.offset as u128 + len as u128);
        let work = match req.kind {
            CMD_DISC => return Ok(()),
            CMD_READ => {
                if req.len > MAX_BLOCK {
                    refuse(
                        EINVAL,
                        format!("read of {len} bytes is over the maximum {MAX_BLOCK}"),
                    );
                    continue;
                }
                if !inside || unknown_flags {
                    let why = if unknown_flags {
                        "unknown flags"
                    } else {
                        "past the export's end"
                    };
                    refuse(EINVAL, format!("read {}: {why} (size {size})", range()));
                    continue;
                }
                Work::Read {
                    offset: req.offset,
                    len: req.len,
                }
            }
            CMD_WRITE => {
                if req.len > MAX_BLOCK || unknown_flags {
                    discard(&mut s, len)?;
                    refuse(
                        EINVAL,
                        format!(
                            "write {}: over the maximum {MAX_BLOCK} or unknown flags",
                            range()
                        ),
                    );
                    continue;
                }
                if !inside {
                    discard(&mut s, len)?;
                    refuse(
                        ENOSPC,
                        format!("write {}: past the export's end ({size})", range()),
                    );
                    continue;
                }
                conn.take_budget(len);
                // Read straight into an aligned buffer: the export writes
                // it with O_DIRECT without another copy.
                let mut data = conn.take_buffer(req.len as usize);
                if let Err(e) = s.read_exact(&mut data) {
                    conn.give_budget(len);
                    return Err(e);
                }
                Work::Write {
                    offset: req.offset,
                    data,
                    fua,
                }
            }
            CMD_WRITE_ZEROES => {
                if unknown_flags || !inside {
                    let errno = if unknown_flags { EINVAL } else { ENOSPC };
                    refuse(
                        errno,
                        format!(
                            "write zeroes {}: past the end ({size}) or unknown flags",
                            range()
                        ),
                    );
                    continue;
                }
                Work::WriteZeroes {
                    offset: req.offset,
                    len,
                    fua,
                }
            }
            CMD_TRIM => {
                if !inside {
                    refuse(
                        EINVAL,
                        format!("trim {}: past the export's end ({size})", range()),
                    );
                    continue;
                }
                Work::Trim {
                    offset: req.offset,
                    len,
                }
            }
            CMD_FLUSH => Work::Flush,
            other => {
                refuse(EINVAL, format!("unsupported command {other}"));
                continue;
            }
        };
        let bytes = match work {
            Work::Read { .. } => {
                conn.take_budget(len);
                len
            }
            Work::Write { .. } => len,
            _ => 0,
        };
        if matches!(
            work,
            Work::Write { .. } | Work::WriteZeroes { .. } | Work::Trim { .. }
        ) {
            lock(&conn.writes).insert(seq);
        }
        let job = Job {
            handle: req.handle,
            seq,
            bytes,
            work,
        };
        if tx.send(job).is_err() {
            return Err(closed());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An export in memory; `gate` (if set) holds every write until the
    /// test sends on it, and `log` records the order of calls.
    struct Mem {
        data: Mutex<Vec<u8>>,
        gate: Option<Mutex<mpsc::Receiver<()>>>,
        log: Mutex<Vec<&'static str>>,
    }

    impl Mem {
        fn new(size: usize) -> Arc<Mem> {
            Arc::new(Mem {
                data: Mutex::new(vec![0; size]),
                gate: None,
                log: Mutex::new(Vec::new()),
            })
        }
    }

    impl Export for Mem {
        fn size(&self) -> u64 {
            lock(&self.data).len() as u64
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
            let d = lock(&self.data);
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), NbdError> {
            if let Some(g) = &self.gate {
                let _ = lock(g).recv();
            }
            lock(&self.data)[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            lock(&self.log).push("write");
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), NbdError> {
            lock(&self.data)[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
        fn flush(&self) -> Result<(), NbdError> {
            lock(&self.log).push("flush");
            Ok(())
        }
        fn trim(&self, _offset: u64, _len: u64) -> Result<(), NbdError> {
            Ok(())
        }
    }

    /// A byte-level client.
    struct Client {
        s: UnixStream,
    }

    impl Client {
        /// Connects and reads the greeting; sends client flags.
        fn connect(path: &Path, client_flags: u32) -> Client {
            let mut s = UnixStream::connect(path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            assert_eq!(read_u64(&mut s).unwrap(), NBDMAGIC);
            assert_eq!(read_u64(&mut s).unwrap(), IHAVEOPT);
            assert_eq!(
                read_u16(&mut s).unwrap(),
                FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
            );
            s.write_all(&client_flags.to_be_bytes()).unwrap();
            Client { s }
        }

        fn option(&mut self, option: u32, data: &[u8]) {
            let mut out = IHAVEOPT.to_be_bytes().to_vec();
            out.extend_from_slice(&option.to_be_bytes());
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(data);
            self.s.write_all(&out).unwrap();
        }

        /// One option reply: (option, reply type, data).
        fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
            assert_eq!(read_u64(&mut self.s).unwrap(), OPTION_REPLY_MAGIC);
            let option = read_u32(&mut self.s).unwrap();
            let kind = read_u32(&mut self.s).unwrap();
            let len = read_u32(&mut self.s).unwrap();
            let mut data = vec![0; len as usize];
            self.s.read_exact(&mut data).unwrap();
            (option, kind, data)
        }

        fn go(&mut self, name: &str) -> Vec<(u32, Vec<u8>)> {
            self.option(OPT_GO, &info_request(name, &[INFO_BLOCK_SIZE]));
            let mut replies = Vec::new();
            loop {
                let (opt, kind, data) = self.option_reply();
                assert_eq!(opt, OPT_GO);
                replies.push((kind, data));
                if kind != REP_INFO {
                    return replies;
                }
            }
        }

        fn request(
            &mut self,
            kind: u16,
            flags: u16,
            handle: u64,
            offset: u64,
            len: u32,
            data: &[u8],
        ) {
            let mut out = REQUEST_MAGIC.to_be_bytes().to_vec();
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&handle.to_be_bytes());
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(data);
            self.s.write_all(&out).unwrap();
        }

        /// A simple reply: (error, handle).
        fn reply(&mut self) -> (u32, u64) {
            assert_eq!(read_u32(&mut self.s).unwrap(), SIMPLE_REPLY_MAGIC);
            let error = read_u32(&mut self.s).unwrap();
            let handle = read_u64(&mut self.s).unwrap();
            (error, handle)
        }

        fn read_data(&mut self, len: usize) -> Vec<u8> {
            let mut d = vec![0; len];
            self.s.read_exact(&mut d).unwrap();
            d
        }

        /// Whether the server closed the connection.
        fn closed(&mut self) -> bool {
            let mut b = [0u8; 1];
            matches!(self.s.read(&mut b), Ok(0) | Err(_))
        }
    }

    fn info_request(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    fn serve(mem: Arc<Mem>) -> (tempfile::TempDir, Server) {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::serve(&dir.path().join("vol.sock"), "vol", mem).unwrap();
        (dir, server)
    }

    const FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

    #[test]
    fn go_replies_size_flags_and_block_sizes_then_serves_reads_and_writes() {
        let (_dir, server) = serve(Mem::new(1 << 20));
        let mut c = Client::connect(server.socket(), FLAGS);
        let replies = c.go("vol");
        assert_eq!(replies.len(), 3);
        let mut export = INFO_EXPORT.to_be_bytes().to_vec();
        export.extend_from_slice(&(1u64 << 20).to_be_bytes());
        export.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
        assert_eq!(replies[0], (REP_INFO, export));
        let mut sizes = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [4096u32, 64 << 10, 32 << 20] {
            sizes.extend_from_slice(&v.to_be_bytes());
        }
        assert_eq!(replies[1], (REP_INFO, sizes));
        assert_eq!(replies[2], (REP_ACK, vec![]));

        c.request(CMD_WRITE, CMD_FLAG_FUA, 7, 4096, 4096, &[0xab; 4096]);
        assert_eq!(c.reply(), (0, 7));
        c.request(CMD_READ, 0, 8, 4096, 4096, b"");
        assert_eq!(c.reply(), (0, 8));
        assert_eq!(c.read_data(4096), vec![0xab; 4096]);
        c.request(CMD_WRITE_ZEROES, 0, 9, 4096, 2048, b"");
        assert_eq!(c.reply(), (0, 9));
        c.request(CMD_TRIM, 0, 10, 0, 8192, b"");
        assert_eq!(c.reply(), (0, 10));
        c.request(CMD_FLUSH, 0, 11, 0, 0, b"");
        assert_eq!(c.reply(), (0, 11));
        c.request(CMD_READ, 0, 12, 4096, 4096, b"");
        assert_eq!(c.reply(), (0, 12));
        let mut want = vec![0u8; 2048];
        want.extend_from_slice(&[0xab; 2048]);
        assert_eq!(c.read_data(4096), want);
        assert_eq!(server.connections(), 1);
        c.request(CMD_DISC, 0, 13, 0, 0, b"");
        assert!(c.closed());
    }

    #[test]
    fn info_unknown_names_unsupported_options_list_and_abort() {
        let (_dir, server) = serve(Mem::new(8192));
        let mut c = Client::connect(server.socket(), FLAG_C_FIXED_NEWSTYLE);
        c.option(OPT_INFO, &info_request("vol", &[]));
        assert_eq!(c.option_reply().1, REP_INFO);
        assert_eq!(c.option_reply().1, REP_INFO);
        assert_eq!(c.option_reply().1, REP_ACK);
        c.option(OPT_GO, &info_request("other", &[]));
        assert_eq!(c.option_reply(), (OPT_GO, REP_ERR_UNKNOWN, vec![]));
        c.option(OPT_STRUCTURED_REPLY, b"");
        assert_eq!(
            c.option_reply(),
            (OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, vec![])
        );
        c.option(9999, b"some data");
        assert_eq!(c.option_reply(), (9999, REP_ERR_UNSUP, vec![]));
        c.option(OPT_GO, b"\0\0\0\x09vol");
        assert_eq!(c.option_reply(), (OPT_GO, REP_ERR_INVALID, vec![]));
        c.option(OPT_LIST, b"");
        assert_eq!(
            c.option_reply(),
            (OPT_LIST, REP_SERVER, b"\0\0\0\x03vol".to_vec())
        );
        assert_eq!(c.option_reply(), (OPT_LIST, REP_ACK, vec![]));
        c.option(OPT_INFO, &vec![0; MAX_OPTION as usize + 1]);
        assert_eq!(c.option_reply(), (OPT_INFO, REP_ERR_TOO_BIG, vec![]));
        c.option(OPT_ABORT, b"");
        assert_eq!(c.option_reply(), (OPT_ABORT, REP_ACK, vec![]));
        assert!(c.closed());
    }

    #[test]
    fn export_name_replies_size_flags_and_zeroes_unless_no_zeroes() {
        let (_dir, server) = serve(Mem::new(8192));
        let mut c = Client::connect(server.socket(), FLAG_C_FIXED_NEWSTYLE);
        c.option(OPT_EXPORT_NAME, b"vol");
        assert_eq!(read_u64(&mut c.s).unwrap(), 8192);
        assert_eq!(read_u16(&mut c.s).unwrap(), TRANSMISSION_FLAGS);
        assert_eq!(c.read_data(124), vec![0; 124]);
        c.request(CMD_READ, 0, 1, 0, 512, b"");
        assert_eq!(c.reply(), (0, 1));

        let mut c = Client::connect(server.socket(), FLAGS);
        c.option(OPT_EXPORT_NAME, b"vol");
        assert_eq!(read_u64(&mut c.s).unwrap(), 8192);
        assert_eq!(read_u16(&mut c.s).unwrap(), TRANSMISSION_FLAGS);
        c.request(CMD_READ, 0, 2, 0, 512, b"");
        assert_eq!(c.reply(), (0, 2));

        let mut c = Client::connect(server.socket(), FLAGS);
        c.option(OPT_EXPORT_NAME, b"nope");
        assert!(c.closed(), "an unknown name after EXPORT_NAME closes");
    }

    #[test]
    fn a_request_with_a_wrong_magic_closes_the_connection() {
        let (_dir, server) = serve(Mem::new(8192));
        let mut c = Client::connect(server.socket(), FLAGS);
        c.go("vol");
        c.s.write_all(&[0x11; 28]).unwrap();
        assert!(c.closed());
    }

    #[test]
    fn oversized_and_out_of_range_requests_are_refused_and_the_stream_stays_in_step() {
        let (_dir, server) = serve(Mem::new(1 << 20));
        let mut c = Client::connect(server.socket(), FLAGS);
        c.go("vol");
        c.request(CMD_READ, 0, 1, 0, MAX_BLOCK + 1, b"");
        assert_eq!(c.reply(), (EINVAL, 1));
        // The payload of a refused write is consumed, not taken as requests.
        let big = vec![0x25u8; MAX_BLOCK as usize + 4096];
        c.request(CMD_WRITE, 0, 2, 0, big.len() as u32, &big);
        assert_eq!(c.reply(), (EINVAL, 2));
        c.request(CMD_READ, 0, 3, (1 << 20) - 4096, 8192, b"");
        assert_eq!(c.reply(), (EINVAL, 3));
        c.request(CMD_WRITE, 0, 4, (1 << 20) - 4096, 8192, &[1; 8192]);
        assert_eq!(c.reply(), (ENOSPC, 4));
        c.request(CMD_WRITE_ZEROES, 0, 5, u64::MAX - 10, 4096, b"");
        assert_eq!(c.reply(), (ENOSPC, 5));
        c.request(CMD_TRIM, 0, 6, 1 << 20, 1, b"");
        assert_eq!(c.reply(), (EINVAL, 6));
        c.request(7, 0, 7, 0, 0, b"");
        assert_eq!(c.reply(), (EINVAL, 7), "block status is not offered");
        c.request(CMD_READ, 0, 8, 0, 4096, b"");
        assert_eq!(c.reply(), (0, 8));
        assert_eq!(c.read_data(4096), vec![0; 4096]);
    }

    #[test]
    fn a_flush_waits_for_the_writes_received_before_it() {
        let (gate_tx, gate_rx) = mpsc::channel();
        let mem = Arc::new(Mem {
            data: Mutex::new(vec![0; 8192]),
            gate: Some(Mutex::new(gate_rx)),
            log: Mutex::new(Vec::new()),
        });
        let (_dir, server) = serve(Arc::clone(&mem));
        let mut c = Client::connect(server.socket(), FLAGS);
        c.go("vol");
        c.request(CMD_WRITE, 0, 1, 0, 4096, &[9; 4096]);
        c.request(CMD_FLUSH, 0, 2, 0, 0, b"");
        // Give a wrong server the time to flush ahead of the write.
        std::thread::sleep(Duration::from_millis(200));
        let early = lock(&mem.log).clone();
        gate_tx.send(()).unwrap();
        assert!(early.is_empty(), "flushed before the write finished");
        assert_eq!(c.reply(), (0, 1));
        assert_eq!(c.reply(), (0, 2));
        assert_eq!(*lock(&mem.log), vec!["write", "flush"]);
    }

    #[test]
    fn garbage_from_clients_never_stops_the_server() {
        let (_dir, server) = serve(Mem::new(1 << 20));
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..200 {
            let mut s = UnixStream::connect(server.socket()).unwrap();
            let mut junk = Vec::new();
            // Some rounds speak a valid prefix first, then garbage.
            if round % 2 == 0 {
                junk.extend_from_slice(&FLAGS.to_be_bytes());
                junk.extend_from_slice(&IHAVEOPT.to_be_bytes());
            }
            if round % 4 == 0 {
                junk.extend_from_slice(&OPT_GO.to_be_bytes());
                let req = info_request("vol", &[]);
                junk.extend_from_slice(&(req.len() as u32).to_be_bytes());
                junk.extend_from_slice(&req);
                junk.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            }
            for _ in 0..(next() % 64) {
                junk.extend_from_slice(&next().to_be_bytes());
            }
            let _ = s.write_all(&junk);
            drop(s);
        }
        for _ in 0..1000 {
            if server.connections() == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(server.connections(), 0, "every garbage connection ended");
        let mut c = Client::connect(server.socket(), FLAGS);
        assert_eq!(c.go("vol").last().unwrap().0, REP_ACK);
        c.request(CMD_READ, 0, 1, 0, 512, b"");
        assert_eq!(c.reply(), (0, 1));
    }

    #[test]
    fn the_socket_is_private_a_stale_one_is_replaced_and_a_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.sock");
        // A socket left by a process that is gone.
        drop(UnixListener::bind(&path).unwrap());
        let server = Server::serve(&path, "vol", Mem::new(4096)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = Server::serve(&path, "vol", Mem::new(4096)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        drop(server);
        assert!(!path.exists(), "the socket file is removed on drop");

        std::fs::write(&path, b"not a socket").unwrap();
        let err = Server::serve(&path, "vol", Mem::new(4096)).unwrap_err();
        assert!(err.to_string().contains("is not a socket"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    }

    fn conn() -> Conn {
        let (out, _) = UnixStream::pair().unwrap();
        Conn {
            export: Mem::new(4096),
            out: Mutex::new(out),
            budget: Mutex::new(0),
            budget_freed: Condvar::new(),
            writes: Mutex::new(BTreeSet::new()),
            writes_done: Condvar::new(),
            buffers: Mutex::new(Vec::new()),
        }
    }

    #[test]
    fn payload_buffers_are_aligned_and_reused_for_later_requests() {
        let c = conn();
        let a = c.take_buffer(4096);
        assert_eq!((a.len(), a.as_ptr().addr() % 4096), (4096, 0));
        let at = a.as_ptr();
        c.give_buffer(a);
        let b = c.take_buffer(PREFERRED_BLOCK as usize);
        assert_eq!(b.as_ptr(), at, "a fitting buffer is taken again");
        assert_eq!(b.len(), PREFERRED_BLOCK as usize);
        c.give_buffer(b);
        let big = c.take_buffer(MAX_POOLED_BUFFER + 1);
        assert_eq!(big.len(), MAX_POOLED_BUFFER + 1);
        c.give_buffer(big);
        assert_eq!(lock(&c.buffers).len(), 1, "an oversized buffer is not kept");
        for _ in 0..POOLED_BUFFERS + 2 {
            let fresh = AlignedBuf::new(8192);
            c.give_buffer(fresh);
        }
        assert_eq!(lock(&c.buffers).len(), POOLED_BUFFERS);
    }

    #[test]
    fn dropping_the_server_closes_every_connection() {
        let (_dir, server) = serve(Mem::new(8192));
        let mut a = Client::connect(server.socket(), FLAGS);
        a.go("vol");
        let mut b = Client::connect(server.socket(), FLAGS);
        b.go("vol");
        assert_eq!(server.connections(), 2);
        drop(server);
        assert!(a.closed());
        assert!(b.closed());
    }
}
