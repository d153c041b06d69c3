//! The commands of the `spmbox` binary: their arguments, what each does,
//! its output (text and JSON) and the log on stderr.

pub mod admin;
pub mod args;
pub mod assets;
pub mod commands;
pub mod config;
pub mod demo;
pub mod firmware;
pub mod inspect;
pub mod json;
pub mod logging;
pub mod lun;
pub mod volume;
