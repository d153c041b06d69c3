//! The daemons: `spmbox spm` and `spmbox host`, the SPM's control socket,
//! the sanlock leases that guard them, the simulated guests a host runs,
//! the SPM's pool usage warnings, and their metrics; and
//! what both daemons share: the engines' [`Clock`] and the `Retry` of
//! failed I/O on the domain device.

pub mod control;
pub mod guest;
pub mod host;
pub mod metrics;
pub mod notify;
pub mod pool_usage;
pub mod release;
pub mod remove_lun;
pub mod sanlock;
pub mod spm;

use crate::units::Elapsed;
use std::time::Duration;

use spmbox_core::time::Instant;

/// A clock for the engines: microseconds since the daemon started.
#[derive(Clone, Copy, Debug)]
pub struct Clock(std::time::Instant);

impl Clock {
    /// A clock starting now.
    pub fn start() -> Clock {
        Clock(std::time::Instant::now())
    }

    /// Now, for the engines.
    pub fn now(&self) -> Instant {
        Instant(u64::try_from(self.0.elapsed().as_micros()).unwrap_or(u64::MAX))
    }

    /// How long until `at`.
    pub fn until(&self, at: Instant) -> Duration {
        Duration::from_micros(at.0.saturating_sub(self.now().0))
    }
}

/// The first wait before an I/O of the domain device that failed is done
/// again; each failure in a row doubles it, up to [`IO_RETRY_MAX`].
pub const IO_RETRY_FIRST: Duration = Duration::from_millis(10);

/// The longest wait between two attempts of an I/O that keeps failing.
pub const IO_RETRY_MAX: Duration = Duration::from_secs(1);

/// One kind of I/O of the domain device and its current run of failures:
/// the first failure is logged with the error, the first success after a
/// run is logged with its length; in between, attempts wait
/// [`IO_RETRY_FIRST`] doubling to [`IO_RETRY_MAX`].
pub(crate) struct Retry {
    what: &'static str,
    streak: Option<Streak>,
}

struct Streak {
    since: std::time::Instant,
    retries: u64,
    backoff: Duration,
    next: std::time::Instant,
    error: String,
}

impl Retry {
    pub(crate) fn new(what: &'static str) -> Retry {
        Retry { what, streak: None }
    }

    /// Whether an attempt may be made now.
    pub(crate) fn ready(&self) -> bool {
        self.streak
            .as_ref()
            .is_none_or(|s| std::time::Instant::now() >= s.next)
    }

    /// How long until the next attempt, during a run of failures.
    pub(crate) fn until_next(&self) -> Option<Duration> {
        self.streak
            .as_ref()
            .map(|s| s.next.saturating_duration_since(std::time::Instant::now()))
    }

    /// The error that started the current run of failures.
    pub(crate) fn failing(&self) -> Option<&str> {
        self.streak.as_ref().map(|s| s.error.as_str())
    }

    pub(crate) fn failed(&mut self, error: &dyn std::fmt::Display) {
        let now = std::time::Instant::now();
        match &mut self.streak {
            Some(s) => {
                s.retries += 1;
                s.backoff = (s.backoff * 2).min(IO_RETRY_MAX);
                s.next = now + s.backoff;
            }
            None => {
                tracing::error!(
                    "{} failed: {error}; retrying every {} to {} until it succeeds",
                    self.what,
                    Elapsed(IO_RETRY_FIRST),
                    Elapsed(IO_RETRY_MAX)
                );
                self.streak = Some(Streak {
                    since: now,
                    retries: 0,
                    backoff: IO_RETRY_FIRST,
                    next: now + IO_RETRY_FIRST,
                    error: error.to_string(),
                });
            }
        }
    }

    pub(crate) fn succeeded(&mut self) {
        if let Some(s) = self.streak.take() {
            tracing::warn!(
                "{} works again after {:.3} s of errors and {} retries",
                self.what,
                s.since.elapsed().as_secs_f64(),
                s.retries + 1
            );
        }
    }
}

/// `body` to run on a new thread inside the span current here (a daemon's
/// `domain` and `host` or `epoch`), so that what the thread logs carries
/// them too.
pub fn in_current_span<T>(body: impl FnOnce() -> T) -> impl FnOnce() -> T {
    let span = tracing::Span::current();
    move || span.in_scope(body)
}
