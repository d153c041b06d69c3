//! I/O on shared storage: the block device, the mailbox on it, and the
//! maps that say where a volume's bytes live.

pub mod device;
pub mod discard;
pub mod mailbox;
pub mod mapping;
pub mod written;
