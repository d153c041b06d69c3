//! Crate-private logging macros.
//!
//! `trace!` .. `error!` route to `defmt` with the `defmt` feature, to `log`
//! with the `log` feature, and compile to nothing with neither (the
//! arguments are still type-checked, so a message cannot rot). Format
//! strings must be literals that both back ends accept: `{}` and `{=...}`
//! placeholders are not mixed, only `{}` is used.
#![allow(unused_macros)]

#[cfg(all(feature = "defmt", feature = "log"))]
compile_error!("the `defmt` and `log` features are mutually exclusive: enable at most one");

macro_rules! log_event {
    ($level:ident, $($arg:tt)+) => {{
        #[cfg(feature = "defmt")]
        ::defmt::$level!($($arg)+);
        #[cfg(feature = "log")]
        ::log::$level!($($arg)+);
        #[cfg(not(any(feature = "defmt", feature = "log")))]
        {
            if false {
                let _ = ::core::format_args!($($arg)+);
            }
        }
    }};
}

macro_rules! trace {
    ($($arg:tt)+) => { log_event!(trace, $($arg)+) };
}
macro_rules! debug {
    ($($arg:tt)+) => { log_event!(debug, $($arg)+) };
}
macro_rules! info {
    ($($arg:tt)+) => { log_event!(info, $($arg)+) };
}
macro_rules! warn {
    ($($arg:tt)+) => { log_event!(warn, $($arg)+) };
}
macro_rules! error {
    ($($arg:tt)+) => { log_event!(error, $($arg)+) };
}
