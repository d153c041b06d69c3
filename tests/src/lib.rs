//! Cross-crate tests of spmbox.
//!
//! - [`vectors`]: the format test vectors of `tests/vectors/` and what the
//!   reference implementation must make of them;
//! - [`sim`]: a deterministic, fault-injecting simulation of hosts and the
//!   SPM sharing one disk.

pub mod sim;
pub mod vectors;
