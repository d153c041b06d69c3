//! The stack's high-water marks. cortex-m-rt's `paint-stack` fills the
//! stack with `STACK_PAINT_VALUE` before `main`; the deepest word that no
//! longer holds it is as deep as the stack ever went. [`repaint`] paints
//! the unused part again, so that the SPM's loop is measured apart from
//! start-up (which builds the engine and the driver by value before they
//! move into their statics).

use cortex_m_rt::STACK_PAINT_VALUE;

/// Bytes left unpainted below the stack pointer by [`repaint`]: room for
/// its own frame.
const REPAINT_MARGIN: usize = 256;

// The linker script's symbols (their addresses are the bounds).
#[allow(unsafe_code)]
unsafe extern "C" {
    static _stack_start: u32;
    static _stack_end: u32;
}

/// The stack's top (where it starts) and bottom (how far it may grow).
fn bounds() -> (usize, usize) {
    (
        &raw const _stack_start as usize,
        &raw const _stack_end as usize,
    )
}

/// Bytes of stack used at the deepest since it was last painted, and the
/// stack's size.
#[allow(unsafe_code)]
pub fn peak() -> (usize, usize) {
    let (top, bottom) = bounds();
    let mut at = bottom;
    while at < top {
        // SAFETY: every word in `_stack_end.._stack_start` is RAM that
        // cortex-m-rt's linker script reserves for the stack and nothing
        // else; a volatile read of an aligned word of it is always valid,
        // whatever this thread or an interrupt handler wrote there.
        let word = unsafe { core::ptr::read_volatile(at as *const u32) };
        if word != STACK_PAINT_VALUE {
            break;
        }
        at += 4;
    }
    (top - at, top - bottom)
}

/// Paints the stack below the current frame again (leaving
/// [`REPAINT_MARGIN`] bytes below the stack pointer alone).
#[allow(unsafe_code)]
pub fn repaint() {
    let (_, bottom) = bounds();
    let sp = cortex_m::register::msp::read() as usize;
    let end = sp.saturating_sub(REPAINT_MARGIN) & !3;
    let mut at = bottom;
    while at < end {
        // SAFETY: `bottom..end` lies below the stack pointer, in the
        // stack's reserved RAM: no live frame is there (an interrupt
        // handler's frame lives only while it runs, and this code does
        // not run then), so overwriting it with the paint is harmless.
        unsafe { core::ptr::write_volatile(at as *mut u32, STACK_PAINT_VALUE) };
        at += 4;
    }
}
