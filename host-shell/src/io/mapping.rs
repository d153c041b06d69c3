//! Where a volume's bytes live: the segment map a host refreshes after an
//! extension and that guests write through.
//!
//! Both backends produce the same shape: the builtin pool from its
//! committed metadata and the LUN labels, the lvm backend from lvm2's
//! report of the LV's segments and the PVs' first physical extent.

use std::path::{Path, PathBuf};

/// A run of a volume's bytes that lies contiguously on one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    /// The device (LUN file, loop device, PV) the run lies on.
    pub device: PathBuf,
    /// The run's first byte on that device.
    pub offset: u64,
    /// Its length in bytes.
    pub len: u64,
}

/// A volume's map: runs in volume order, covering `0..size` exactly.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Mapping {
    /// The volume's physical size (the sum of the runs' lengths).
    pub size: u64,
    /// The runs, in volume order.
    pub runs: Vec<Run>,
}

/// A piece of a volume range as it lies on one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece<'a> {
    /// The device.
    pub device: &'a Path,
    /// Where the piece starts on the device.
    pub device_offset: u64,
    /// Where it starts in the volume.
    pub volume_offset: u64,
    /// Its length.
    pub len: u64,
}

impl Mapping {
    /// A map from runs; `size` is their total length.
    pub fn new(runs: Vec<Run>) -> Mapping {
        let size = runs.iter().map(|r| r.len).sum();
        Mapping { size, runs }
    }

    /// The pieces of volume range `offset..offset + len`, in order, split
    /// where runs end. `None` if the range passes the end of the volume.
    pub fn pieces(&self, offset: u64, len: u64) -> Option<Vec<Piece<'_>>> {
        let end = offset.checked_add(len)?;
        if end > self.size {
            return None;
        }
        let mut out = Vec::new();
        let mut run_start = 0u64;
        for run in &self.runs {
            let run_end = run_start + run.len;
            let from = offset.max(run_start);
            let to = end.min(run_end);
            if from < to {
                out.push(Piece {
                    device: &run.device,
                    device_offset: run.offset + (from - run_start),
                    volume_offset: from,
                    len: to - from,
                });
            }
            run_start = run_end;
            if run_start >= end {
                break;
            }
        }
        Some(out)
    }

    /// Whether every byte this map places keeps its place in `newer`: a
    /// refreshed map may only add runs at the end (or lengthen the last).
    pub fn is_prefix_of(&self, newer: &Mapping) -> bool {
        if newer.size < self.size {
            return false;
        }
        let Some(old) = self.pieces(0, self.size) else {
            return false;
        };
        let Some(new) = newer.pieces(0, self.size) else {
            return false;
        };
        // Compare byte placement, not run boundaries.
        let mut i = 0;
        let mut j = 0;
        let (mut oi, mut oj) = (0u64, 0u64);
        while i < old.len() && j < new.len() {
            let a = &old[i];
            let b = &new[j];
            if a.device != b.device || a.device_offset + oi != b.device_offset + oj {
                return false;
            }
            let step = (a.len - oi).min(b.len - oj);
            oi += step;
            oj += step;
            if oi == a.len {
                i += 1;
                oi = 0;
            }
            if oj == b.len {
                j += 1;
                oj = 0;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(dev: &str, offset: u64, len: u64) -> Run {
        Run {
            device: PathBuf::from(dev),
            offset,
            len,
        }
    }

    #[test]
    fn pieces_split_at_run_boundaries() {
        let m = Mapping::new(vec![run("a", 100, 10), run("b", 0, 10), run("a", 500, 5)]);
        assert_eq!(m.size, 25);
        let p = m.pieces(5, 12).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].device_offset, p[0].len, p[0].volume_offset),
            (105, 5, 5)
        );
        assert_eq!(
            (p[1].device_offset, p[1].len, p[1].volume_offset),
            (0, 7, 10)
        );
        assert_eq!(m.pieces(20, 5).unwrap()[0].device_offset, 500);
        assert!(m.pieces(20, 6).is_none());
        assert!(m.pieces(0, 0).unwrap().is_empty());
    }

    #[test]
    fn a_refreshed_map_keeps_every_byte_in_place() {
        let old = Mapping::new(vec![run("a", 0, 10)]);
        let grown = Mapping::new(vec![run("a", 0, 20)]);
        let more = Mapping::new(vec![run("a", 0, 10), run("b", 0, 10)]);
        let moved = Mapping::new(vec![run("a", 10, 20)]);
        assert!(old.is_prefix_of(&grown));
        assert!(old.is_prefix_of(&more));
        assert!(!old.is_prefix_of(&moved));
        assert!(!grown.is_prefix_of(&old));
    }
}
