//! The SPM's clock: SysTick at 1 kHz. Under qemu it runs on the emulated
//! machine's virtual clock, which tracks the host's time (no `-icount`).
//! Between interrupts the firmware sleeps (`wfi`), so an idle SPM costs
//! the host next to nothing.

use core::sync::atomic::{AtomicU32, Ordering};

use cortex_m::peripheral::SYST;
use cortex_m::peripheral::syst::SystClkSource;
use cortex_m_rt::exception;
use spmbox_core::time::Instant;

/// The core clock of the MPS2 FPGA images (SYSCLK_FRQ in qemu's mps2.c).
pub const CORE_HZ: u32 = 25_000_000;
/// SysTick interrupts per second.
pub const TICK_HZ: u32 = 1_000;

static TICKS: AtomicU32 = AtomicU32::new(0);

#[exception]
fn SysTick() {
    TICKS.fetch_add(1, Ordering::Relaxed);
}

/// Milliseconds since [`Clock::start`], widened to 64 bits by the caller
/// seeing every wrap of the 32-bit tick count (it reads the clock at
/// least every few seconds; the count wraps after 49 days).
pub struct Clock {
    last: u32,
    high: u64,
}

impl Clock {
    /// Starts SysTick.
    pub fn start(mut syst: SYST) -> Clock {
        syst.set_clock_source(SystClkSource::Core);
        syst.set_reload(CORE_HZ / TICK_HZ - 1);
        syst.clear_current();
        syst.enable_counter();
        syst.enable_interrupt();
        Clock { last: 0, high: 0 }
    }

    /// Now.
    pub fn now(&mut self) -> Instant {
        let t = TICKS.load(Ordering::Relaxed);
        if t < self.last {
            self.high += 1 << 32;
        }
        self.last = t;
        Instant((self.high + u64::from(t)).saturating_mul(1_000_000 / u64::from(TICK_HZ)))
    }

    /// Sleeps until `until` (at most `max_ms`), one tick at a time.
    pub fn sleep_until(&mut self, until: Option<Instant>, max_ms: u64) {
        let start = self.now();
        let end = until.map_or(start.as_micros() + max_ms * 1000, |u| {
            u.as_micros().min(start.as_micros() + max_ms * 1000)
        });
        while self.now().as_micros() < end {
            cortex_m::asm::wfi();
        }
    }
}
