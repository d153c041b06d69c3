//! The SPM's control socket and the run directory that holds it: admin
//! requests (`status`, `add_lun`, `create_volume`) arrive as one line of
//! JSON each and reach the SPM daemon's loop over a channel; the client
//! side sends them.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use spmbox_core::wire::Uuid;

use crate::backend::BackendError;

/// The default control socket of a domain.
pub fn default_control(domain: Uuid) -> PathBuf {
    run_dir().join(format!("spm-{domain}.sock"))
}

/// Where daemons keep sockets and status files: `$SPMBOX_RUN_DIR`, else
/// `/run/spmbox` for root, else `$XDG_RUNTIME_DIR/spmbox`, else
/// `/tmp/spmbox-<uid>`. Daemons create it with mode 0700 and refuse one
/// that is not theirs alone ([`private_dir`]).
pub fn run_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SPMBOX_RUN_DIR") {
        return PathBuf::from(dir);
    }
    let uid = rustix::process::geteuid();
    if uid.is_root() {
        return PathBuf::from("/run/spmbox");
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(dir).join("spmbox");
    }
    PathBuf::from(format!("/tmp/spmbox-{}", uid.as_raw()))
}

/// Makes sure `dir`, where a daemon puts its control socket or status
/// file, is this user's alone: creates it (and missing parents) with mode
/// 0700, and refuses one that another user owns or that group or others
/// may write to, since whoever can write there can replace the socket or
/// the status file. Nothing is changed when it refuses.
pub fn private_dir(dir: &Path) -> Result<(), BackendError> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                BackendError::new(format!(
                    "cannot create the run directory {}: {e}; create it (mode 0700) or set \
                     SPMBOX_RUN_DIR (or --control) to a directory of your own",
                    dir.display()
                ))
            })?;
    }
    let meta = std::fs::metadata(dir).map_err(|e| {
        BackendError::new(format!(
            "cannot use the run directory {}: {e}",
            dir.display()
        ))
    })?;
    if !meta.is_dir() {
        return Err(BackendError::new(format!(
            "the run directory {} is not a directory; remove it, or set SPMBOX_RUN_DIR \
             (or --control) to a directory of your own",
            dir.display()
        )));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(BackendError::new(format!(
            "the run directory {} belongs to uid {}, not to this user (uid {me}): another user \
             could replace the control socket or status files there; remove it (as its owner or root), or set \
             SPMBOX_RUN_DIR (or --control) to a directory of your own",
            dir.display(),
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(BackendError::new(format!(
            "the run directory {} is writable by group or others (mode {:04o}): another user \
             could replace the control socket or status files there; `chmod go-w {}`, or set SPMBOX_RUN_DIR \
             (or --control) to a directory of your own",
            dir.display(),
            meta.mode() & 0o7777,
            dir.display()
        )));
    }
    Ok(())
}

/// How long a `status` request waits for the SPM's answer.
pub const STATUS_ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

/// Sends one admin request to the SPM's control socket. `Ok(None)` if no
/// SPM listens there.
pub fn control_request(control: &Path, request: &Value) -> Result<Option<Value>, BackendError> {
    let mut stream = match UnixStream::connect(control) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => {
            return Err(BackendError::new(format!(
                "cannot reach the SPM at {}: {e}",
                control.display()
            )));
        }
    };
    // A running SPM answers `status` within milliseconds; one that does
    // not within STATUS_ANSWER_TIMEOUT is stopped or stuck, and callers
    // fall back to what is on disk. Changes (an lvextend, a pvcreate) may
    // take longer.
    let timeout = if request["op"] == json!("status") {
        STATUS_ANSWER_TIMEOUT
    } else {
        CONTROL_ANSWER_TIMEOUT
    };
    stream.set_read_timeout(Some(timeout))?;
    let mut line = request.to_string();
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| BackendError::io("cannot talk to the SPM", e))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(|e| BackendError::io("no answer from the SPM", e))?;
    let value: Value = serde_json::from_str(&answer)
        .map_err(|e| BackendError::new(format!("the SPM answered nonsense ({e}): {answer}")))?;
    if value["ok"] == json!(true) {
        Ok(Some(value))
    } else {
        Err(BackendError::new(
            value["error"]
                .as_str()
                .unwrap_or("the SPM refused")
                .to_string(),
        ))
    }
}

/// An admin request from the control socket, and where its answer goes.
pub(super) type ControlMsg = (Value, std::sync::mpsc::Sender<Value>);

/// The longest admin request the control socket reads, newline included.
/// Requests are a line of JSON of a few hundred bytes; a longer one is
/// answered with an error and the connection closed.
pub const CONTROL_REQUEST_MAX: usize = 4096;

/// How long a client has to send its whole request line, from the moment
/// it connected; then the connection is answered with an error and closed.
pub const CONTROL_REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// The most control connections served at once (each on its own thread);
/// a connection past it is answered with an error at once and closed.
pub const CONTROL_CONNECTIONS: usize = 8;

/// The longest the control thread waits in `accept` before it looks
/// whether the daemon is stopping: the longest a stop waits for it.
const CONTROL_POLL: Duration = Duration::from_millis(250);

/// The control socket's thread: it accepts connections (with a receive
/// timeout on the listening socket, so that it ends within
/// [`CONTROL_POLL`] of the daemon stopping, whatever happened to the
/// socket file, and costs a few wake-ups a second when idle) and serves
/// each on a thread of its own, at most
/// [`CONTROL_CONNECTIONS`] at once. Requests reach the daemon's loop over
/// a channel and wake it from its wait.
pub(super) struct ControlServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlServer {
    pub(super) fn start(
        listener: UnixListener,
        tx: std::sync::mpsc::Sender<ControlMsg>,
    ) -> Result<ControlServer, BackendError> {
        // accept(2) on a Unix socket ends with EAGAIN after SO_RCVTIMEO.
        rustix::net::sockopt::set_socket_timeout(
            &listener,
            rustix::net::sockopt::Timeout::Recv,
            Some(CONTROL_POLL),
        )
        .map_err(|e| BackendError::new(format!("cannot set up the control socket: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(crate::daemon::in_current_span(move || {
                accept_control(&listener, &tx, &flag)
            }))
            .map_err(|e| BackendError::io("cannot start the control thread", e))?;
        Ok(ControlServer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_control(
    listener: &UnixListener,
    tx: &std::sync::mpsc::Sender<ControlMsg>,
    stop: &AtomicBool,
) {
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => {
                tracing::warn!("control socket: {e}");
                std::thread::sleep(CONTROL_POLL);
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= CONTROL_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(
                "control socket: {CONTROL_CONNECTIONS} connections are being served; one more refused"
            );
            answer_control(
                &stream,
                &control_error(format!(
                    "the SPM is serving {CONTROL_CONNECTIONS} control connections already; \
                     try again in a few seconds"
                )),
            );
            continue;
        }
        let (tx, served) = (tx.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(crate::daemon::in_current_span(move || {
                serve_control(stream, &tx);
                served.fetch_sub(1, Ordering::AcqRel);
            }));
        if let Err(e) = spawned {
            tracing::warn!("control socket: cannot start a thread for a client: {e}");
            active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// How long a control client waits for the daemon's loop to answer.
const CONTROL_ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

fn control_error(error: String) -> Value {
    json!({ "ok": false, "error": error })
}

fn answer_control(stream: &UnixStream, answer: &Value) {
    let _ = stream.set_write_timeout(Some(CONTROL_REQUEST_DEADLINE));
    let mut out = answer.to_string();
    out.push('\n');
    let _ = (&*stream).write_all(out.as_bytes());
}

/// Reads one request line of at most [`CONTROL_REQUEST_MAX`] bytes within
/// [`CONTROL_REQUEST_DEADLINE`]. `Ok(None)`: the client closed without
/// sending anything.
fn read_control_request(stream: &UnixStream) -> Result<Option<Vec<u8>>, String> {
    let deadline = std::time::Instant::now() + CONTROL_REQUEST_DEADLINE;
    let mut line = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no whole request line within {CONTROL_REQUEST_DEADLINE:?}; \
                 send one line of JSON ending in a newline"
            ));
        }
        let _ = stream.set_read_timeout(Some(left));
        let n = match (&*stream).read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => return Err(format!("reading the request: {e}")),
        };
        if n == 0 {
            return if line.is_empty() {
                Ok(None)
            } else {
                Ok(Some(line))
            };
        }
        let end = buf[..n].iter().position(|&b| b == b'\n');
        let take = end.map_or(n, |i| i + 1);
        if line.len() + take > CONTROL_REQUEST_MAX {
            return Err(format!(
                "the request is longer than {CONTROL_REQUEST_MAX} bytes; \
                 send one line of JSON of at most that size"
            ));
        }
        line.extend_from_slice(&buf[..take]);
        if end.is_some() {
            return Ok(Some(line));
        }
    }
}

fn serve_control(stream: UnixStream, tx: &std::sync::mpsc::Sender<ControlMsg>) {
    let line = match read_control_request(&stream) {
        Ok(Some(line)) => line,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!("control socket: request refused: {e}");
            answer_control(&stream, &control_error(e));
            return;
        }
    };
    let answer = match serde_json::from_slice::<Value>(&line) {
        Ok(request) => {
            let (reply_tx, reply_rx) = std::sync::mpsc::channel();
            if tx.send((request, reply_tx)).is_err() {
                control_error("the SPM is stopping".into())
            } else {
                match reply_rx.recv_timeout(CONTROL_ANSWER_TIMEOUT) {
                    Ok(answer) => answer,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => control_error(format!(
                        "the SPM did not answer within {CONTROL_ANSWER_TIMEOUT:?}"
                    )),
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        control_error("the SPM is stopping".into())
                    }
                }
            }
        }
        Err(e) => control_error(format!("not a JSON request: {e}")),
    };
    answer_control(&stream, &answer);
}
