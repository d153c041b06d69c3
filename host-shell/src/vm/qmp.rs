//! A QMP client: qemu's JSON machine protocol over its Unix socket.
//!
//! The host daemon uses a handful of commands (`qmp_capabilities`,
//! `query-status`, `query-blockstats`, `block-set-write-threshold`, `cont`)
//! and a handful of events (`BLOCK_WRITE_THRESHOLD`, `BLOCK_IO_ERROR`,
//! `STOP`, `RESUME`). Messages are one JSON
//! object per line; serde_json reads and writes them. A typed QMP crate
//! would pin the project to one qemu release's schema for eight messages
//! whose few fields are read by name here.
//!
//! A reader thread owns the receiving half of the socket: command answers
//! go back to [`Qmp::execute`], events to the callback given to
//! [`Qmp::connect`]. When qemu closes the socket (it exited, or another
//! client took over) the callback gets [`QmpMessage::Closed`].

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};

/// How long a command waits for qemu's answer.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest line read from qemu; a longer one closes the connection.
pub const LINE_MAX: usize = 1 << 20;

/// What the reader thread hands to the callback.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpMessage {
    /// An event: its name and its `data` (`null` if it has none).
    Event {
        /// `BLOCK_WRITE_THRESHOLD`, `STOP`, ...
        name: String,
        /// The event's data.
        data: Value,
    },
    /// The socket closed: qemu exited or dropped this client.
    Closed,
}

/// A QMP error: what was asked and what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be used.
    #[error("QMP socket {path}: {source}")]
    Io {
        /// The socket.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// qemu answered with an error.
    #[error("qemu refused {command}: {class}: {desc}")]
    Refused {
        /// The command.
        command: String,
        /// qemu's error class.
        class: String,
        /// qemu's description.
        desc: String,
    },
    /// No answer in time, or the connection closed first.
    #[error("qemu did not answer {command} ({why})")]
    NoAnswer {
        /// The command.
        command: String,
        /// Timeout or closed.
        why: &'static str,
    },
    /// The greeting was not QMP's.
    #[error("{path} does not speak QMP: {what}")]
    NotQmp {
        /// The socket.
        path: String,
        /// What came instead.
        what: String,
    },
}

/// A connection to one qemu's QMP socket.
pub struct Qmp {
    path: String,
    writer: UnixStream,
    answers: mpsc::Receiver<Value>,
    next_id: u64,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp").field("path", &self.path).finish()
    }
}

impl Qmp {
    /// Connects, reads the greeting and leaves negotiation mode. Events
    /// (and [`QmpMessage::Closed`]) go to `on_message` from a reader
    /// thread, from the moment the connection is up.
    pub fn connect(
        path: &Path,
        on_message: impl Fn(QmpMessage) + Send + 'static,
    ) -> Result<Qmp, QmpError> {
        let name = path.display().to_string();
        let io = |source| QmpError::Io {
            path: name.clone(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(io)?;
        stream.set_read_timeout(Some(COMMAND_TIMEOUT)).map_err(io)?;
        let mut reader = BufReader::new(stream.try_clone().map_err(io)?);
        let greeting = read_line(&mut reader).map_err(io)?;
        let greeting: Value = serde_json::from_str(&greeting).unwrap_or(Value::Null);
        if greeting.get("QMP").is_none() {
            return Err(QmpError::NotQmp {
                path: name,
                what: greeting.to_string(),
            });
        }
        stream.set_read_timeout(None).map_err(io)?;
        let (answer_tx, answers) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(crate::daemon::in_current_span(move || {
                while let Ok(line) = read_line(&mut reader) {
                    let Ok(message) = serde_json::from_str::<Value>(&line) else {
                        tracing::warn!("QMP: ignoring a line that is not JSON: {line:.200}");
                        continue;
                    };
                    if let Some(name) = message.get("event").and_then(Value::as_str) {
                        on_message(QmpMessage::Event {
                            name: name.to_owned(),
                            data: message.get("data").cloned().unwrap_or(Value::Null),
                        });
                    } else if answer_tx.send(message).is_err() {
                        break;
                    }
                }
                on_message(QmpMessage::Closed);
            }))
            .map_err(io)?;
        let mut qmp = Qmp {
            path: name,
            writer: stream,
            answers,
            next_id: 1,
            reader: Some(thread),
        };
        qmp.execute("qmp_capabilities", Value::Null)?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` (`null`: none) and returns qemu's
    /// `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = json!({"execute": command, "id": id});
        if !arguments.is_null() {
            message["arguments"] = arguments;
        }
        let mut line = message.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        let deadline = std::time::Instant::now() + COMMAND_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let answer = match self.answers.recv_timeout(left) {
                Ok(a) => a,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(QmpError::NoAnswer {
                        command: command.to_owned(),
                        why: "timed out",
                    });
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(QmpError::NoAnswer {
                        command: command.to_owned(),
                        why: "the connection closed",
                    });
                }
            };
            // An answer to an earlier command that timed out is dropped.
            if answer.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(error) = answer.get("error") {
                return Err(QmpError::Refused {
                    command: command.to_owned(),
                    class: error["class"].as_str().unwrap_or("?").to_owned(),
                    desc: error["desc"].as_str().unwrap_or("?").to_owned(),
                });
            }
            return Ok(answer.get("return").cloned().unwrap_or(Value::Null));
        }
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        let _ = self.writer.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}

fn read_line(reader: &mut BufReader<UnixStream>) -> std::io::Result<String> {
    let mut line = Vec::new();
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&buf[..i]);
            reader.consume(i + 1);
            break;
        }
        let n = buf.len();
        line.extend_from_slice(buf);
        reader.consume(n);
        if line.len() > LINE_MAX {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a QMP line longer than {LINE_MAX} bytes"),
            ));
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// The status `query-status` reports: `running`, `paused`, `io-error`,
/// `prelaunch`, `shutdown`, ...
pub fn status(qmp: &mut Qmp) -> Result<String, QmpError> {
    let v = qmp.execute("query-status", Value::Null)?;
    Ok(v["status"].as_str().unwrap_or("unknown").to_owned())
}

/// The highest offset written to block node `node` since qemu started
/// (`query-blockstats`' `wr_highest_offset`), `None` if the node is not
/// there.
pub fn highest_offset(qmp: &mut Qmp, node: &str) -> Result<Option<u64>, QmpError> {
    let v = qmp.execute("query-blockstats", json!({"query-nodes": true}))?;
    Ok(find_node_stat(&v, node, "wr_highest_offset"))
}

/// Looks for `node`'s statistic `stat` in a `query-blockstats` answer,
/// including nested `parent`/`backing` entries.
fn find_node_stat(v: &Value, node: &str, stat: &str) -> Option<u64> {
    match v {
        Value::Array(items) => items.iter().find_map(|i| find_node_stat(i, node, stat)),
        Value::Object(map) => {
            if map.get("node-name").and_then(Value::as_str) == Some(node)
                && let Some(x) = map.get("stats").and_then(|s| s.get(stat))
            {
                return x.as_u64();
            }
            ["parent", "backing"]
                .iter()
                .filter_map(|k| map.get(*k))
                .find_map(|x| find_node_stat(x, node, stat))
        }
        _ => None,
    }
}

/// Arms the one-shot write threshold of block node `node` at `offset`.
pub fn set_write_threshold(qmp: &mut Qmp, node: &str, offset: u64) -> Result<(), QmpError> {
    qmp.execute(
        "block-set-write-threshold",
        json!({"node-name": node, "write-threshold": offset}),
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake qemu: greets, answers each command with `answer(command)`,
    /// and sends the events it is told to after the first command.
    fn fake_qemu(
        dir: &Path,
        answer: fn(&Value) -> Value,
        events: Vec<Value>,
    ) -> std::path::PathBuf {
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut w = stream.try_clone().unwrap();
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut reader = BufReader::new(stream);
            let mut events = Some(events);
            loop {
                let Ok(line) = read_line(&mut reader) else {
                    return;
                };
                let cmd: Value = serde_json::from_str(&line).unwrap();
                let mut reply = answer(&cmd);
                reply["id"] = cmd["id"].clone();
                if let Some(evs) = events.take() {
                    for e in evs {
                        writeln!(w, "{e}").unwrap();
                    }
                }
                writeln!(w, "{reply}").unwrap();
            }
        });
        path
    }

    #[test]
    fn commands_get_their_answers_and_events_go_to_the_callback() {
        let dir = tempfile::tempdir().unwrap();
        let path = fake_qemu(
            dir.path(),
            |cmd| match cmd["execute"].as_str() {
                Some("query-status") => json!({"return": {"status": "io-error", "running": false}}),
                Some("cont") => {
                    json!({"error": {"class": "GenericError", "desc": "not paused"}})
                }
                _ => json!({"return": {}}),
            },
            vec![json!({"event": "STOP", "timestamp": {}})],
        );
        let (tx, rx) = mpsc::channel();
        let mut qmp = Qmp::connect(&path, move |m| {
            let _ = tx.send(m);
        })
        .unwrap();
        assert_eq!(status(&mut qmp).unwrap(), "io-error");
        let e = qmp.execute("cont", Value::Null).unwrap_err();
        assert!(e.to_string().contains("not paused"), "{e}");
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            QmpMessage::Event {
                name: "STOP".into(),
                data: Value::Null
            }
        );
        drop(qmp);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            QmpMessage::Closed
        );
    }

    #[test]
    fn the_highest_offset_is_found_on_a_nested_node() {
        let answer = json!([
            {"device": "", "node-name": "fmt0", "stats": {"wr_highest_offset": 5},
             "parent": {"node-name": "proto0", "stats": {"wr_highest_offset": 7340032}}},
        ]);
        assert_eq!(
            find_node_stat(&answer, "proto0", "wr_highest_offset"),
            Some(7340032)
        );
        assert_eq!(
            find_node_stat(&answer, "fmt0", "wr_highest_offset"),
            Some(5)
        );
        assert_eq!(find_node_stat(&answer, "nope", "wr_highest_offset"), None);
    }

    #[test]
    fn a_socket_that_does_not_greet_with_qmp_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            writeln!(s, "hello").unwrap();
            std::thread::sleep(Duration::from_millis(200));
        });
        let e = Qmp::connect(&path, |_| {}).unwrap_err();
        assert!(e.to_string().contains("does not speak QMP"), "{e}");
    }
}
