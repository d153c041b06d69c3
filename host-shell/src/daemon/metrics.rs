//! Prometheus text metrics over HTTP, on a loopback address only.
//!
//! The daemon renders its figures into a [`Text`] about once a second and
//! publishes it; a small server thread answers `GET /metrics` with the
//! latest page. Nothing else is served and the daemon's loop never waits
//! for a scraper. Only loopback addresses are accepted: the page is meant
//! for a local agent (node exporter, a collector sidecar) or an SSH tunnel,
//! and has no authentication.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backend::BackendError;

/// The longest request head the server reads.
const MAX_REQUEST: usize = 8192;

/// How long the server waits for a slow client.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// A page of metrics in the Prometheus text format (version 0.0.4).
#[derive(Debug, Default, Clone)]
pub struct Text(String);

impl Text {
    /// An empty page.
    pub fn new() -> Text {
        Text::default()
    }

    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    /// A counter without labels.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.head(name, "counter", help);
        let _ = writeln!(self.0, "{name} {value}");
    }

    /// A gauge with one sample per label set (`labels` as `key="value"`
    /// pairs, already escaped).
    pub fn gauges(&mut self, name: &str, help: &str, samples: &[(String, f64)]) {
        self.head(name, "gauge", help);
        for (labels, value) in samples {
            if labels.is_empty() {
                let _ = writeln!(self.0, "{name} {value}");
            } else {
                let _ = writeln!(self.0, "{name}{{{labels}}} {value}");
            }
        }
    }

    /// A histogram in seconds.
    pub fn histogram(&mut self, name: &str, help: &str, histogram: &Histogram) {
        self.head(name, "histogram", help);
        let mut below = 0;
        for (bound, n) in LATENCY_BUCKETS.iter().zip(histogram.counts) {
            below += n;
            let _ = writeln!(self.0, "{name}_bucket{{le=\"{bound}\"}} {below}");
        }
        let _ = writeln!(self.0, "{name}_bucket{{le=\"+Inf\"}} {}", histogram.count);
        let _ = writeln!(self.0, "{name}_sum {}", histogram.sum);
        let _ = writeln!(self.0, "{name}_count {}", histogram.count);
    }

    /// The page.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Latency buckets in seconds, from a millisecond to a minute.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0, 60.0,
];

/// A Prometheus histogram of durations in seconds with the bounds
/// [`LATENCY_BUCKETS`]: a count per bucket, the sum and the count. Its
/// size is fixed however many values it records.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Histogram {
    /// Values in (previous bound, bound], one per bound (values above the
    /// last bound are only in `count`).
    counts: [u64; LATENCY_BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Histogram {
        Histogram::default()
    }

    /// Records one duration, in seconds.
    pub fn record(&mut self, seconds: f64) {
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| seconds <= *b) {
            self.counts[i] += 1;
        }
        self.sum += seconds;
        self.count += 1;
    }

    /// How many values it recorded.
    pub fn count(&self) -> u64 {
        self.count
    }
}

/// The running server: publish pages to it.
#[derive(Debug, Clone)]
pub struct Exporter {
    page: Arc<Mutex<String>>,
    addr: SocketAddr,
}

impl Exporter {
    /// Binds `addr` (`127.0.0.1:9464`, `[::1]:9464`, `localhost:0`) and
    /// serves from a background thread. Refuses addresses that are not
    /// loopback.
    pub fn serve(addr: &str) -> Result<Exporter, BackendError> {
        let resolved: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| {
                BackendError::new(format!(
                    "--metrics {addr:?}: {e}; give an address and port such as 127.0.0.1:9464"
                ))
            })?
            .collect();
        let Some(bind) = resolved.iter().find(|a| a.ip().is_loopback()).copied() else {
            return Err(BackendError::new(format!(
                "--metrics {addr:?} is not a loopback address: the metrics page has no \
                 authentication, so it is only served on 127.0.0.1 or ::1 (reach it from \
                 elsewhere through a local agent or an SSH tunnel)"
            )));
        };
        let listener = TcpListener::bind(bind).map_err(|e| {
            BackendError::new(format!(
                "cannot serve metrics on {bind}: {e}; pick a free port with --metrics"
            ))
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| BackendError::io("metrics socket", e))?;
        let page = Arc::new(Mutex::new(String::new()));
        let shared = page.clone();
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let text = shared.lock().map(|p| p.clone()).unwrap_or_default();
                    if let Err(e) = answer(stream, &text) {
                        tracing::debug!("metrics client: {e}");
                    }
                }
            })
            .map_err(|e| BackendError::io("cannot start the metrics thread", e))?;
        tracing::info!("metrics on http://{addr}/metrics");
        Ok(Exporter { page, addr })
    }

    /// Where the server listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the page.
    pub fn publish(&self, text: Text) {
        if let Ok(mut page) = self.page.lock() {
            *page = text.0;
        }
    }
}

fn answer(mut stream: TcpStream, page: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next(), parts.next());
    let (status, kind, body) = match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => ("200 OK", "text/plain; version=0.0.4", page),
        (Some(b"GET"), _) => ("404 Not Found", "text/plain", "only /metrics is served\n"),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET is served\n",
        ),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn the_page_is_served_on_loopback_and_only_there() {
        let e = Exporter::serve("127.0.0.1:0").unwrap();
        let mut t = Text::new();
        t.counter("spmbox_test_total", "A test counter.", 7);
        t.gauges(
            "spmbox_test_size_bytes",
            "A test gauge.",
            &[("volume=\"a\"".into(), 4.0)],
        );
        let mut h = Histogram::new();
        for v in [0.05, 0.5, 3.0] {
            h.record(v);
        }
        t.histogram("spmbox_test_seconds", "A test histogram.", &h);
        e.publish(t);
        let page = get(e.local_addr(), "/metrics");
        assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
        assert!(page.contains("\nspmbox_test_total 7\n"), "{page}");
        assert!(
            page.contains("spmbox_test_size_bytes{volume=\"a\"} 4\n"),
            "{page}"
        );
        assert!(
            page.contains("spmbox_test_seconds_bucket{le=\"0.1\"} 1\n"),
            "{page}"
        );
        assert!(
            page.contains("spmbox_test_seconds_bucket{le=\"1\"} 2\n"),
            "{page}"
        );
        assert!(
            page.contains("spmbox_test_seconds_bucket{le=\"60\"} 3\n"),
            "{page}"
        );
        assert!(
            page.contains("spmbox_test_seconds_bucket{le=\"+Inf\"} 3\n"),
            "{page}"
        );
        assert!(page.contains("spmbox_test_seconds_count 3\n"), "{page}");
        assert!(get(e.local_addr(), "/").starts_with("HTTP/1.1 404"));
        let err = Exporter::serve("0.0.0.0:0").unwrap_err().to_string();
        assert!(err.contains("not a loopback address"), "{err}");
    }

    #[test]
    fn a_histogram_counts_each_value_in_every_bucket_at_or_above_it() {
        let mut h = Histogram::new();
        for v in [0.0005, 0.001, 0.0015, 0.7, 120.0] {
            h.record(v);
        }
        let mut t = Text::new();
        t.histogram("x_seconds", "X.", &h);
        let page = t.as_str();
        assert!(
            page.contains("x_seconds_bucket{le=\"0.001\"} 2\n"),
            "{page}"
        );
        assert!(
            page.contains("x_seconds_bucket{le=\"0.002\"} 3\n"),
            "{page}"
        );
        assert!(page.contains("x_seconds_bucket{le=\"0.5\"} 3\n"), "{page}");
        assert!(page.contains("x_seconds_bucket{le=\"1\"} 4\n"), "{page}");
        assert!(page.contains("x_seconds_bucket{le=\"60\"} 4\n"), "{page}");
        assert!(page.contains("x_seconds_bucket{le=\"+Inf\"} 5\n"), "{page}");
        assert!(page.contains("x_seconds_count 5\n"), "{page}");
        assert!(page.contains("x_seconds_sum 120.70"), "{page}");
    }
}
