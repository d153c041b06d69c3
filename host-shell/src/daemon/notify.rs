//! What a daemon tells the service manager (systemd's `sd_notify`):
//! readiness once it serves, a status line, the watchdog's keep-alive
//! from its main loop, and that it is stopping. Outside a `Type=notify`
//! service (no NOTIFY_SOCKET) every call does nothing.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// The service manager's side of a daemon.
#[derive(Debug)]
pub struct Notifier {
    /// How often the watchdog wants a keep-alive: half its timeout, or
    /// `None` without `WatchdogSec=`.
    keep_alive: Option<Duration>,
    /// When the next keep-alive is due.
    next: Instant,
}

impl Default for Notifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Notifier {
    /// Reads the watchdog's timeout from the environment systemd gives.
    pub fn new() -> Notifier {
        let mut usec = 0;
        let keep_alive = sd_notify::watchdog_enabled(false, &mut usec)
            .then(|| Duration::from_micros(usec) / 2)
            .filter(|d| !d.is_zero());
        Notifier {
            keep_alive,
            next: Instant::now(),
        }
    }

    /// The daemon serves: systemd starts the units ordered after it.
    pub fn ready(&self, status: &str) {
        let _ = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// A new status line (`systemctl status` shows it).
    pub fn status(&self, status: &str) {
        let _ = sd_notify::notify(false, &[NotifyState::Status(status)]);
    }

    /// Called from the main loop at least every few hundred milliseconds:
    /// sends the keep-alive when it is due, so that a loop that hangs is
    /// killed and restarted by the watchdog.
    pub fn tick(&mut self) {
        let Some(every) = self.keep_alive else {
            return;
        };
        let now = Instant::now();
        if now >= self.next {
            let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
            self.next = now + every;
        }
    }

    /// The daemon is stopping (it writes its last records first).
    pub fn stopping(&self) {
        let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
    }
}
