//! Telling storage that a range of a LUN holds nothing any more: punching
//! a hole in a file, `BLKDISCARD` on a block device (through util-linux's
//! `blkdiscard`). The SPM does it for extents that came back to the pool
//! when it runs with `--discard` (docs/operations.md, section 4.1).

use std::path::Path;
use std::process::Command;

use crate::backend::BackendError;

/// Discards `len` bytes at `offset` of the file or block device at `path`.
/// The range reads back as zeroes afterwards on files and on devices that
/// say so; the data it held is gone either way.
pub fn discard(path: &Path, offset: u64, len: u64) -> Result<(), BackendError> {
    if len == 0 {
        return Ok(());
    }
    let meta = std::fs::metadata(path)
        .map_err(|e| BackendError::io(format!("cannot discard on {}", path.display()), e))?;
    if meta.is_file() {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| BackendError::io(format!("cannot open {}", path.display()), e))?;
        let flags = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
        return rustix::fs::fallocate(&file, flags, offset, len).map_err(|e| {
            BackendError::io(
                format!(
                    "cannot punch a hole of {len} bytes at {offset} in {}",
                    path.display()
                ),
                e.into(),
            )
        });
    }
    let out = Command::new("blkdiscard")
        .arg("--offset")
        .arg(offset.to_string())
        .arg("--length")
        .arg(len.to_string())
        .arg(path)
        .output()
        .map_err(|e| {
            BackendError::io(
                "cannot run blkdiscard (util-linux) to discard freed extents",
                e,
            )
        })?;
    if !out.status.success() {
        return Err(BackendError::new(format!(
            "blkdiscard of {len} bytes at {offset} on {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};

    #[test]
    fn a_discarded_range_of_a_file_reads_back_as_zeroes_and_the_rest_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lun");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![0xAB; 3 << 20]).unwrap();
        drop(f);
        discard(&path, 1 << 20, 1 << 20).unwrap();
        let mut f = std::fs::File::open(&path).unwrap();
        let mut all = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut all).unwrap();
        assert_eq!(all.len(), 3 << 20, "the size is kept");
        assert!(all[..1 << 20].iter().all(|&b| b == 0xAB));
        assert!(all[1 << 20..2 << 20].iter().all(|&b| b == 0));
        assert!(all[2 << 20..].iter().all(|&b| b == 0xAB));
    }
}
