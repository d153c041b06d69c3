//! The deterministic simulation: hosts and the SPM sharing one faulty disk.
pub mod disk;
pub mod rng;
