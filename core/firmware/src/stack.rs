//! The stack's high-water mark. cortex-m-rt's `paint-stack` fills the
//! stack with `STACK_PAINT_VALUE` before `main`; the deepest word that no
//! longer holds it is as deep as the stack ever went.

/// Bytes of stack used at the deepest so far, and the stack's size.
#[allow(unsafe_code)]
pub fn peak() -> (usize, usize) {
    unsafe extern "C" {
        static _stack_start: u32;
        static _stack_end: u32;
    }
    let top = &raw const _stack_start as usize;
    let bottom = &raw const _stack_end as usize;
    let mut at = bottom;
    while at < top {
        // SAFETY: every word in `_stack_end.._stack_start` is RAM that
        // cortex-m-rt reserves for the stack (its linker script places
        // nothing else there) and painted before `main`; a volatile read
        // of an aligned word of it is always valid, whatever this thread
        // or an interrupt handler wrote there.
        let word = unsafe { core::ptr::read_volatile(at as *const u32) };
        if word != cortex_m_rt::STACK_PAINT_VALUE {
            break;
        }
        at += 4;
    }
    (top - at, top - bottom)
}
