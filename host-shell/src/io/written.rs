//! How much of a volume its guest has written, read from the volume's
//! data: for `volume reduce` without `--to` (docs/operations.md 4.1).
//!
//! Two kinds of content are recognized:
//!
//! - a **qcow2 image** (a VM's disk): the end of its last cluster in use,
//!   from its refcount structures, the figure `qemu-img check` prints as
//!   "Image end offset". The header gives the cluster size
//!   (`1 << cluster_bits`, bytes 20..24, big-endian), the refcount table
//!   (`refcount_table_offset` at 48..56, `refcount_table_clusters` at
//!   56..60) and, in version 3, the refcount width (`refcount_order` at
//!   96..100; version 2: 16 bits). Each nonzero table entry (bits 9..56)
//!   is a refcount block of one cluster, `cluster_size * 8 / width`
//!   entries; the image ends after the highest cluster whose refcount is
//!   not 0.
//! - **spmbox's test data** (`spmbox host` without `--vm`): the run of
//!   good blocks from offset 0 ([`guest::recover_allocation`]).
//!
//! Anything else is not guessed at.

use spmbox_core::wire::Uuid;

use crate::daemon::guest::{self, Devices};
use crate::io::device::AlignedBuf;
use crate::io::mapping::Mapping;

/// The largest cluster qcow2 allows (2 MiB), and so the most one refcount
/// block read takes.
const MAX_CLUSTER_BITS: u32 = 21;

/// What [`written`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// A qcow2 image ending at this offset.
    Qcow2(u64),
    /// spmbox's test data, this many bytes from the start.
    TestData(u64),
    /// Content this module does not know (or nothing: the first block
    /// is not either kind).
    Unknown,
}

/// Reads `len` bytes at `offset` of a volume.
pub trait ReadAt {
    /// Fills `out` from `offset`; an error says what failed.
    fn read_at(&mut self, offset: u64, out: &mut [u8]) -> Result<(), String>;
}

/// A volume read through its map.
pub struct VolumeReader<'a> {
    /// The volume.
    pub volume: Uuid,
    /// Its map.
    pub map: &'a Mapping,
    /// Its devices.
    pub devices: &'a mut Devices,
}

impl ReadAt for VolumeReader<'_> {
    fn read_at(&mut self, offset: u64, out: &mut [u8]) -> Result<(), String> {
        // Whole 4 KiB blocks around the range, for O_DIRECT.
        let start = offset - offset % 4096;
        let end = (offset + out.len() as u64).next_multiple_of(4096);
        if end > self.map.size {
            return Err(format!(
                "bytes {offset}..{} are past the volume's end ({})",
                offset + out.len() as u64,
                self.map.size
            ));
        }
        let len = end - start;
        let mut buf = AlignedBuf::new(len as usize);
        guest::read_range(self.volume, self.map, self.devices, start, &mut buf, len)
            .map_err(|e| e.to_string())?;
        let at = (offset - start) as usize;
        out.copy_from_slice(&buf[at..at + out.len()]);
        Ok(())
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

/// The end of the last cluster in use of the qcow2 image `image` of
/// `size` bytes at most; `Ok(None)` if it does not start with the qcow2
/// magic. A header or refcount structure that points outside `size` or
/// makes no sense is an error.
pub fn qcow2_end(image: &mut dyn ReadAt, size: u64) -> Result<Option<u64>, String> {
    let mut head = [0u8; 104];
    image.read_at(0, &mut head)?;
    if &head[0..4] != b"QFI\xfb" {
        return Ok(None);
    }
    let version = be32(&head, 4);
    let cluster_bits = be32(&head, 20);
    if !(9..=MAX_CLUSTER_BITS).contains(&cluster_bits) || !(2..=3).contains(&version) {
        return Err(format!(
            "qcow2 header: version {version}, cluster_bits {cluster_bits} not understood"
        ));
    }
    let cluster = 1u64 << cluster_bits;
    let order = if version >= 3 { be32(&head, 96) } else { 4 };
    if order > 6 {
        return Err(format!(
            "qcow2 header: refcount_order {order} not understood"
        ));
    }
    let width = 1u64 << order;
    let table_offset = be64(&head, 48);
    let table_clusters = u64::from(be32(&head, 56));
    let table_len = table_clusters.saturating_mul(cluster);
    if table_offset % cluster != 0 || table_offset.saturating_add(table_len) > size {
        return Err(format!(
            "qcow2 header: the refcount table ({table_clusters} clusters at {table_offset}) \
             is not inside the volume ({size} bytes)"
        ));
    }
    let mut table = vec![0u8; table_len as usize];
    image.read_at(table_offset, &mut table)?;
    let per_block = cluster * 8 / width;
    let mut block = vec![0u8; cluster as usize];
    let mut end = 0u64;
    for (i, entry) in table.chunks_exact(8).enumerate() {
        let at = be64(entry, 0) & !0x1ff;
        if at == 0 {
            continue;
        }
        if at % cluster != 0 || at.saturating_add(cluster) > size {
            return Err(format!(
                "qcow2 refcount block {i} at {at} is not inside the volume ({size} bytes)"
            ));
        }
        image.read_at(at, &mut block)?;
        for j in (0..per_block).rev() {
            let bit = j * width;
            let byte = (bit / 8) as usize;
            let nonzero = match width {
                1 | 2 | 4 => (block[byte] >> (bit % 8)) & ((1u16 << width) - 1) as u8 != 0,
                w => block[byte..byte + (w / 8) as usize].iter().any(|&b| b != 0),
            };
            if nonzero {
                let cluster_index = i as u64 * per_block + j;
                end = end.max((cluster_index + 1) * cluster);
                break;
            }
        }
    }
    Ok(Some(end))
}

/// What the guest of `volume` wrote, read through `map`.
pub fn written(volume: Uuid, map: &Mapping, devices: &mut Devices) -> Result<Written, String> {
    if map.size < 4096 {
        return Ok(Written::Unknown);
    }
    let mut reader = VolumeReader {
        volume,
        map,
        devices,
    };
    if let Some(end) = qcow2_end(&mut reader, map.size)? {
        return Ok(Written::Qcow2(end));
    }
    match guest::recover_allocation(volume, map, devices).map_err(|e| e.to_string())? {
        0 => Ok(Written::Unknown),
        n => Ok(Written::TestData(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(Vec<u8>);

    impl ReadAt for Mem {
        fn read_at(&mut self, offset: u64, out: &mut [u8]) -> Result<(), String> {
            let at = offset as usize;
            let src = self.0.get(at..at + out.len()).ok_or("past the end")?;
            out.copy_from_slice(src);
            Ok(())
        }
    }

    /// A version 3 image with 64 KiB clusters and 16-bit refcounts whose
    /// refcount table is at cluster 1 and its one block at cluster 2.
    fn image(in_use: &[u64]) -> Vec<u8> {
        let c = 65536usize;
        let mut img = vec![0u8; 16 * c];
        img[0..4].copy_from_slice(b"QFI\xfb");
        img[4..8].copy_from_slice(&3u32.to_be_bytes());
        img[20..24].copy_from_slice(&16u32.to_be_bytes());
        img[48..56].copy_from_slice(&(c as u64).to_be_bytes());
        img[56..60].copy_from_slice(&1u32.to_be_bytes());
        img[96..100].copy_from_slice(&4u32.to_be_bytes());
        img[c..c + 8].copy_from_slice(&(2 * c as u64).to_be_bytes());
        for &k in in_use {
            let at = 2 * c + 2 * k as usize;
            img[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
        }
        img
    }

    #[test]
    fn a_qcow2_image_ends_after_its_highest_cluster_in_use() {
        let img = image(&[0, 1, 2, 9]);
        let size = img.len() as u64;
        assert_eq!(qcow2_end(&mut Mem(img), size), Ok(Some(10 * 65536)));
        let img = image(&[0, 1, 2]);
        assert_eq!(qcow2_end(&mut Mem(img), size), Ok(Some(3 * 65536)));
    }

    #[test]
    fn other_content_is_not_qcow2_and_a_table_outside_the_volume_is_an_error() {
        assert_eq!(qcow2_end(&mut Mem(vec![0; 65536]), 65536), Ok(None));
        let mut img = image(&[0]);
        img[48..56].copy_from_slice(&(1u64 << 40).to_be_bytes());
        let size = img.len() as u64;
        assert!(
            qcow2_end(&mut Mem(img), size)
                .unwrap_err()
                .contains("not inside")
        );
    }
}

#[cfg(test)]
mod with_qemu_img {
    use super::*;

    struct File(std::fs::File);

    impl ReadAt for File {
        fn read_at(&mut self, offset: u64, out: &mut [u8]) -> Result<(), String> {
            use std::os::unix::fs::FileExt as _;
            self.0.read_exact_at(out, offset).map_err(|e| e.to_string())
        }
    }

    /// The end qemu-img's own check reports for images qemu wrote, with
    /// 16-bit and 1-bit refcounts and 512 KiB clusters.
    #[test]
    fn the_end_is_what_qemu_img_check_reports() {
        let tools = ["qemu-img", "qemu-io"];
        if tools.iter().any(|t| {
            std::process::Command::new(t)
                .arg("--version")
                .output()
                .is_err()
        }) {
            eprintln!(
                "skipped: the_end_is_what_qemu_img_check_reports: qemu-img or qemu-io missing"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for (options, writes) in [
            ("cluster_size=65536", vec!["write 0 64k", "write 10M 1M"]),
            ("cluster_size=65536,refcount_bits=1", vec!["write 5M 100k"]),
            ("cluster_size=524288", vec!["write 30M 4k", "write 1M 1M"]),
        ] {
            let path = dir.path().join("image.qcow2");
            let run = |args: &[&str]| {
                let out = std::process::Command::new(args[0])
                    .args(&args[1..])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{args:?}: {:?}", out);
                String::from_utf8(out.stdout).unwrap()
            };
            let p = path.to_str().unwrap();
            run(&[
                "qemu-img", "create", "-q", "-f", "qcow2", "-o", options, p, "64M",
            ]);
            for w in &writes {
                run(&["qemu-io", "-f", "qcow2", "-c", w, p]);
            }
            let check: serde_json::Value =
                serde_json::from_str(&run(&["qemu-img", "check", "--output=json", p])).unwrap();
            let expected = check["image-end-offset"].as_u64().unwrap();
            let size = std::fs::metadata(&path).unwrap().len();
            let end = qcow2_end(&mut File(std::fs::File::open(&path).unwrap()), size).unwrap();
            assert_eq!(end, Some(expected), "{options} {writes:?}");
        }
    }
}
