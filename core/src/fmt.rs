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

/// Assertions, imported by path (`use crate::fmt::{assert, ...}`) where the
/// crate checks its own invariants.
///
/// With the `defmt` feature they are `defmt`'s (the message is a compact
/// defmt frame, not a formatted string); otherwise `core`'s, also with
/// `log`. They are not in textual scope crate-wide, so compile-time checks
/// (`const _: () = assert!(..)`) keep using `core::assert!`, which is const.
///
/// Only a bug can fail one: the core never panics on any input, and the
/// fuzzers and the simulation run with debug assertions on to prove it.
/// Messages follow the rule of the logging macros above: `{}` only, with
/// arguments that are `Display` and, for `defmt`, `defmt::Format`.
mod assertions {
    macro_rules! assert {
        ($($arg:tt)+) => {{
            #[cfg(feature = "defmt")]
            ::defmt::assert!($($arg)+);
            #[cfg(not(feature = "defmt"))]
            ::core::assert!($($arg)+);
        }};
    }

    macro_rules! assert_eq {
        ($($arg:tt)+) => {{
            #[cfg(feature = "defmt")]
            ::defmt::assert_eq!($($arg)+);
            #[cfg(not(feature = "defmt"))]
            ::core::assert_eq!($($arg)+);
        }};
    }

    macro_rules! debug_assert {
        ($($arg:tt)+) => {{
            #[cfg(feature = "defmt")]
            ::defmt::debug_assert!($($arg)+);
            #[cfg(not(feature = "defmt"))]
            ::core::debug_assert!($($arg)+);
        }};
    }

    macro_rules! debug_assert_eq {
        ($($arg:tt)+) => {{
            #[cfg(feature = "defmt")]
            ::defmt::debug_assert_eq!($($arg)+);
            #[cfg(not(feature = "defmt"))]
            ::core::debug_assert_eq!($($arg)+);
        }};
    }

    /// `unwrap!(x)` / `unwrap!(x, "why {}", arg)` on an `Option` or a
    /// `Result`: the value, or a panic that names the expression (and the
    /// error: `Debug`, and `defmt::Format` with `defmt`). For values that
    /// cannot be missing unless the crate has a bug.
    #[cfg(feature = "defmt")]
    macro_rules! unwrap {
        ($($arg:tt)+) => {
            ::defmt::unwrap!($($arg)+)
        };
    }

    #[cfg(not(feature = "defmt"))]
    macro_rules! unwrap {
        ($value:expr $(,)?) => {
            match $crate::fmt::Unwrap::into_result($value) {
                ::core::result::Result::Ok(value) => value,
                ::core::result::Result::Err(error) => ::core::panic!(
                    "unwrap of `{}` failed: {:?}",
                    ::core::stringify!($value),
                    error
                ),
            }
        };
        ($value:expr, $($msg:tt)+) => {
            match $crate::fmt::Unwrap::into_result($value) {
                ::core::result::Result::Ok(value) => value,
                ::core::result::Result::Err(error) => ::core::panic!(
                    "unwrap of `{}` failed: {}: {:?}",
                    ::core::stringify!($value),
                    ::core::format_args!($($msg)+),
                    error
                ),
            }
        };
    }

    pub(crate) use {assert, assert_eq, debug_assert, debug_assert_eq, unwrap};
}

#[allow(unused_imports)]
pub(crate) use assertions::{assert, assert_eq, debug_assert, debug_assert_eq, unwrap};

/// What `unwrap!` accepts: an `Option` (a `None` is the error) or a
/// `Result`. (Unused while no production code unwraps: the core keeps its
/// fallible paths panic-free and asserts its invariants instead.)
#[cfg(not(feature = "defmt"))]
#[allow(dead_code)]
pub(crate) trait Unwrap {
    /// The value inside.
    type Value;
    /// What a failure carries.
    type Error: core::fmt::Debug;
    /// The value, or the failure.
    fn into_result(self) -> Result<Self::Value, Self::Error>;
}

/// The error of an `Option` that was `None`.
#[cfg(not(feature = "defmt"))]
#[derive(Debug)]
#[allow(dead_code)]
pub(crate) struct NoneError;

#[cfg(not(feature = "defmt"))]
impl<T> Unwrap for Option<T> {
    type Value = T;
    type Error = NoneError;
    fn into_result(self) -> Result<T, NoneError> {
        self.ok_or(NoneError)
    }
}

#[cfg(not(feature = "defmt"))]
impl<T, E: core::fmt::Debug> Unwrap for Result<T, E> {
    type Value = T;
    type Error = E;
    fn into_result(self) -> Result<T, E> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::{assert, assert_eq, debug_assert, debug_assert_eq, unwrap};

    #[test]
    fn unwrap_gives_the_value_of_an_option_and_a_result() {
        let some: Option<u8> = Some(3);
        let ok: Result<u8, ()> = Ok(4);
        assert_eq!(unwrap!(some), 3);
        assert_eq!(unwrap!(ok, "a result with {}", "a message"), 4);
    }

    #[test]
    #[should_panic(expected = "unwrap of `none` failed: NoneError")]
    fn unwrap_of_none_panics_and_names_the_expression() {
        let none: Option<u8> = None;
        let _ = unwrap!(none);
    }

    #[test]
    #[should_panic(expected = "unwrap of `err` failed: the pool: 7")]
    fn unwrap_of_an_error_panics_with_the_message_and_the_error() {
        let err: Result<u8, u32> = Err(7);
        let _ = unwrap!(err, "the {}", "pool");
    }

    #[test]
    fn assertions_route_to_core_without_defmt() {
        assert!(1 + 1 == 2, "arithmetic {}", "works");
        debug_assert!(true);
        debug_assert_eq!(2, 2, "equal");
        let failed = std::panic::catch_unwind(|| assert!(false, "always on"));
        std::assert!(failed.is_err());
        let failed = std::panic::catch_unwind(|| debug_assert_eq!(1, 2));
        std::assert_eq!(failed.is_err(), cfg!(debug_assertions));
    }
}
