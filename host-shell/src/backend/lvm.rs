//! Running lvm2 for the lvm backend, and reading its JSON reports.
//!
//! Every command gets a `--config` that admits exactly the domain's PVs
//! (`devices { filter global_filter }`), so lvm2 never scans or touches
//! any other disk of the machine, and that turns off what a shared-storage
//! daemon must not depend on: udev, lvmlockd, metadata backups and
//! archives in `/etc/lvm`.
//!
//! On a kernel without device-mapper (no `device-mapper` in `/proc/misc`),
//! every command also gets `--driverloaded n`: lvm2 then edits metadata
//! only and never activates anything, and hosts find a volume's bytes on
//! the PVs from lvm2's segment report (see [`Lvm::segments`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::backend::BackendError;

/// The lvm2 binary.
const LVM: &str = "lvm";

/// Whether this kernel has device-mapper: the driver registers the
/// `device-mapper` misc device (a `/dev/mapper/control` node alone proves
/// nothing; containers often have one without the driver).
pub fn device_mapper_present() -> bool {
    std::fs::read_to_string("/proc/misc").is_ok_and(|misc| {
        misc.lines()
            .any(|l| l.split_whitespace().nth(1) == Some("device-mapper"))
    })
}

/// Whether a volume group name is one spmbox accepts: lvm2's own rule
/// (letters, digits, `+_.-`, not starting with `-`), at most 127 bytes.
pub fn valid_vg_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 127
        && !name.starts_with('-')
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+_.-".contains(&b))
}

/// `path` as an anchored lvm2 filter regex, or `None` if it holds the
/// filter's delimiter `|` or a character that is not printable ASCII.
pub fn filter_regex(path: &Path) -> Option<String> {
    let text = path.to_str()?;
    if text.is_empty()
        || text
            .bytes()
            .any(|b| b == b'|' || b == b'"' || !(0x20..0x7f).contains(&b))
    {
        return None;
    }
    let mut out = String::from("^");
    for c in text.chars() {
        if "\\.+*?()[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('$');
    Some(out)
}

/// The `--config` string for a set of PVs.
pub fn config(pvs: &[PathBuf]) -> Result<String, BackendError> {
    let mut accept = Vec::new();
    for pv in pvs {
        let regex = filter_regex(pv).ok_or_else(|| {
            BackendError::new(format!(
                "{} cannot be put in an lvm2 device filter (it holds `|`, `\"` or \
                 non-ASCII characters); use another path to the device",
                pv.display()
            ))
        })?;
        accept.push(format!("\"a|{regex}|\""));
    }
    accept.push("\"r|.*|\"".into());
    let filter = accept.join(",");
    Ok(format!(
        "devices {{ filter=[{filter}] global_filter=[{filter}] obtain_device_list_from_udev=0 \
         scan_lvs=0 use_devicesfile=0 }} global {{ use_lvmlockd=0 }} \
         activation {{ udev_sync=0 udev_rules=0 }} backup {{ backup=0 archive=0 }}"
    ))
}

/// One row of an lvm2 JSON report: field name to value, all strings.
pub type Row = HashMap<String, String>;

/// The rows of section `key` (`vg`, `pv`, `lv`, `seg`) of an lvm2 JSON
/// report (`--reportformat json`).
pub fn parse_report(json: &str, key: &str) -> Result<Vec<Row>, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    let mut rows = Vec::new();
    for section in v["report"].as_array().ok_or("no \"report\" array")? {
        let Some(list) = section[key].as_array() else {
            continue;
        };
        for item in list {
            let obj = item.as_object().ok_or("a row is not an object")?;
            rows.push(
                obj.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect(),
            );
        }
    }
    Ok(rows)
}

/// A field of a row as a number.
pub fn number(row: &Row, field: &str) -> Result<u64, String> {
    let text = row
        .get(field)
        .ok_or_else(|| format!("the report has no field {field}"))?;
    text.trim()
        .parse()
        .map_err(|_| format!("field {field} is {text:?}, not a number"))
}

/// A range of physical extents on one PV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeRange {
    /// The PV.
    pub pv: PathBuf,
    /// The first extent.
    pub first: u64,
    /// Extents in the range.
    pub count: u64,
}

/// Parses `seg_pe_ranges` (`/dev/loop0:0-2 /dev/loop1:5-9`, inclusive).
pub fn parse_pe_ranges(text: &str) -> Result<Vec<PeRange>, String> {
    let mut out = Vec::new();
    for part in text.split_whitespace() {
        let (pv, range) = part
            .rsplit_once(':')
            .ok_or_else(|| format!("PE range {part:?} has no `:`"))?;
        let (a, b) = range
            .split_once('-')
            .ok_or_else(|| format!("PE range {part:?} has no `-`"))?;
        let first: u64 = a.parse().map_err(|_| format!("PE range {part:?}"))?;
        let last: u64 = b.parse().map_err(|_| format!("PE range {part:?}"))?;
        if last < first {
            return Err(format!("PE range {part:?} ends before it starts"));
        }
        out.push(PeRange {
            pv: PathBuf::from(pv),
            first,
            count: last - first + 1,
        });
    }
    Ok(out)
}

/// A volume group as `vgs` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VgInfo {
    /// Bytes per extent.
    pub extent_size: u64,
    /// Extents in all PVs.
    pub extent_count: u64,
    /// Extents no LV holds.
    pub free_count: u64,
}

/// A PV as `pvs` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvInfo {
    /// Its device path.
    pub name: PathBuf,
    /// Its volume group (empty: none).
    pub vg: String,
    /// Byte offset of its first extent.
    pub pe_start: u64,
}

/// An LV as `lvs` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LvInfo {
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its tags.
    pub tags: Vec<String>,
}

/// One segment of an LV: where its extents start in the LV and where they
/// lie on the PVs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// The segment's first extent in the LV.
    pub start: u64,
    /// Its extents.
    pub count: u64,
    /// Where they are.
    pub ranges: Vec<PeRange>,
}

/// Checks a device path that is to become a PV (`pvcreate`, `vgextend`):
/// it must exist, and must not start with `-`, which lvm2 (and most
/// tools) would read as an option.
pub fn check_device_path(path: &Path) -> Result<(), BackendError> {
    if path.as_os_str().as_encoded_bytes().first() == Some(&b'-') {
        return Err(BackendError::new(format!(
            "device path {:?} starts with '-'; give the device's full path (/dev/...)",
            path.display().to_string()
        )));
    }
    if let Err(e) = std::fs::metadata(path) {
        return Err(BackendError::new(format!(
            "device {} cannot be used: {e}; give the path of an existing block device",
            path.display()
        )));
    }
    Ok(())
}

/// lvm2 for one volume group and the PVs it may use.
#[derive(Debug, Clone)]
pub struct Lvm {
    vg: String,
    pvs: Vec<PathBuf>,
    metadata_only: bool,
}

impl Lvm {
    /// lvm2 for `vg`, admitting only `pvs`.
    pub fn new(vg: &str, pvs: &[PathBuf]) -> Result<Lvm, BackendError> {
        if !valid_vg_name(vg) {
            return Err(BackendError::new(format!(
                "--vg {vg:?} is not a valid volume group name (letters, digits, `+_.-`, \
                 not starting with `-`)"
            )));
        }
        if pvs.is_empty() {
            return Err(BackendError::new(
                "the lvm backend needs the volume group's PVs: pass each with --pv",
            ));
        }
        config(pvs)?;
        Ok(Lvm {
            vg: vg.to_owned(),
            pvs: pvs.to_vec(),
            metadata_only: !device_mapper_present(),
        })
    }

    /// The volume group.
    pub fn vg(&self) -> &str {
        &self.vg
    }

    /// The PVs lvm2 may see.
    pub fn pvs(&self) -> &[PathBuf] {
        &self.pvs
    }

    /// Whether lvm2 runs without device-mapper.
    pub fn metadata_only(&self) -> bool {
        self.metadata_only
    }

    /// Lets lvm2 see `pv` too.
    pub fn admit(&mut self, pv: &Path) -> Result<(), BackendError> {
        if !self.pvs.iter().any(|p| p == pv) {
            let mut pvs = self.pvs.clone();
            pvs.push(pv.to_owned());
            config(&pvs)?;
            self.pvs = pvs;
        }
        Ok(())
    }

    /// Runs `lvm <command> <args>` and returns its standard output. `args`
    /// are options only; operands (volume groups, LVs, device paths) go
    /// through [`Lvm::run_on`].
    pub fn run(&self, command: &str, args: &[&str]) -> Result<String, BackendError> {
        self.run_on(command, args, &[])
    }

    /// The arguments of `lvm <command>`: the command, the fixed options,
    /// `options`, then `--` and `operands`, so that no operand (a device
    /// path given by a user) is ever read as an option.
    pub fn argv(
        &self,
        command: &str,
        options: &[&str],
        operands: &[&str],
    ) -> Result<Vec<String>, BackendError> {
        let mut argv = vec![command.to_owned()];
        if self.metadata_only {
            argv.extend(["--driverloaded", "n"].map(String::from));
        }
        argv.extend(["--config".to_owned(), config(&self.pvs)?]);
        argv.extend(options.iter().map(|o| (*o).to_owned()));
        if !operands.is_empty() {
            argv.push("--".into());
            argv.extend(operands.iter().map(|o| (*o).to_owned()));
        }
        Ok(argv)
    }

    /// Runs `lvm <command> <options> -- <operands>` and returns its
    /// standard output.
    pub fn run_on(
        &self,
        command: &str,
        options: &[&str],
        operands: &[&str],
    ) -> Result<String, BackendError> {
        let mut cmd = Command::new(LVM);
        cmd.args(self.argv(command, options, operands)?);
        let args: Vec<&str> = options.iter().chain(operands).copied().collect();
        cmd.env("LVM_SUPPRESS_FD_WARNINGS", "1");
        let shown = format!("lvm {command} {}", args.join(" "));
        let out = cmd.output().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                BackendError::new(
                    "lvm2 is not installed (install it: apt-get install lvm2, dnf install lvm2), \
                     or use the builtin backend",
                )
            } else {
                BackendError::io(format!("cannot run `{shown}`"), e)
            }
        })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let errors: Vec<&str> = stderr
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("WARNING:"))
                .collect();
            return Err(BackendError::new(format!(
                "`{shown}` failed ({}): {}",
                out.status,
                if errors.is_empty() {
                    stderr.trim().to_owned()
                } else {
                    errors.join("; ")
                }
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn report(
        &self,
        command: &str,
        args: &[&str],
        operands: &[&str],
        key: &str,
    ) -> Result<Vec<Row>, BackendError> {
        let mut all = vec!["--reportformat", "json", "--units", "b", "--nosuffix"];
        all.extend_from_slice(args);
        let text = self.run_on(command, &all, operands)?;
        parse_report(&text, key)
            .map_err(|e| BackendError::new(format!("cannot read `lvm {command}` output: {e}")))
    }

    /// The volume group's extents.
    pub fn vg_info(&self) -> Result<VgInfo, BackendError> {
        let rows = self.report(
            "vgs",
            &["-o", "vg_name,vg_extent_size,vg_extent_count,vg_free_count"],
            &[&self.vg],
            "vg",
        )?;
        let row = rows.first().ok_or_else(|| {
            BackendError::new(format!(
                "volume group {} not found on the given PVs",
                self.vg
            ))
        })?;
        let n = |f| number(row, f).map_err(BackendError::new);
        Ok(VgInfo {
            extent_size: n("vg_extent_size")?,
            extent_count: n("vg_extent_count")?,
            free_count: n("vg_free_count")?,
        })
    }

    /// Every PV lvm2 sees (only the admitted devices).
    pub fn pv_infos(&self) -> Result<Vec<PvInfo>, BackendError> {
        let rows = self.report("pvs", &["-o", "pv_name,vg_name,pe_start"], &[], "pv")?;
        rows.iter()
            .map(|row| {
                Ok(PvInfo {
                    name: PathBuf::from(row.get("pv_name").cloned().unwrap_or_default()),
                    vg: row.get("vg_name").cloned().unwrap_or_default(),
                    pe_start: number(row, "pe_start").map_err(BackendError::new)?,
                })
            })
            .collect()
    }

    /// The LVs of the volume group (`lv` names one, else all).
    pub fn lv_infos(&self, lv: Option<&str>) -> Result<Vec<LvInfo>, BackendError> {
        let target = match lv {
            Some(lv) => format!("{}/{lv}", self.vg),
            None => self.vg.clone(),
        };
        let rows = self.report("lvs", &["-o", "lv_name,lv_size,lv_tags"], &[&target], "lv")?;
        rows.iter()
            .map(|row| {
                Ok(LvInfo {
                    name: row.get("lv_name").cloned().unwrap_or_default(),
                    size: number(row, "lv_size").map_err(BackendError::new)?,
                    tags: row
                        .get("lv_tags")
                        .map(|t| {
                            t.split(',')
                                .filter(|s| !s.is_empty())
                                .map(str::to_owned)
                                .collect()
                        })
                        .unwrap_or_default(),
                })
            })
            .collect()
    }

    /// The segments of LV `lv`, in LV order.
    pub fn segments(&self, lv: &str) -> Result<Vec<Segment>, BackendError> {
        let target = format!("{}/{lv}", self.vg);
        let rows = self.report(
            "lvs",
            &[
                "--segments",
                "-o",
                "lv_name,seg_start_pe,seg_size_pe,seg_pe_ranges",
            ],
            &[&target],
            "seg",
        )?;
        let mut segments = Vec::new();
        for row in &rows {
            let e = |m: String| BackendError::new(format!("LV {target}: {m}"));
            segments.push(Segment {
                start: number(row, "seg_start_pe").map_err(e)?,
                count: number(row, "seg_size_pe").map_err(e)?,
                ranges: parse_pe_ranges(row.get("seg_pe_ranges").map_or("", String::as_str))
                    .map_err(e)?,
            });
        }
        segments.sort_by_key(|s| s.start);
        Ok(segments)
    }
}

/// A volume group and its PV labels, removed when dropped (`vgremove -f`,
/// `pvremove -ff -y`), for benchmarks and tests that make their own; drop
/// it before the devices under the PVs go away. Errors are ignored: what
/// is already gone stays gone.
#[derive(Debug)]
pub struct VgRemoval {
    /// The volume group.
    pub vg: String,
    /// Its PVs.
    pub pvs: Vec<PathBuf>,
}

impl Drop for VgRemoval {
    fn drop(&mut self) {
        let Ok(lvm) = Lvm::new(&self.vg, &self.pvs) else {
            return;
        };
        let _ = lvm.run_on("vgremove", &["-f"], &[&self.vg]);
        let names: Vec<String> = self.pvs.iter().map(|p| p.display().to_string()).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let _ = lvm.run_on("pvremove", &["-ff", "-y"], &names);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from lvm2 2.03.16 in metadata-only mode on loop devices.
    const SEGS: &str = r#"  {
      "report": [
          {
              "seg": [
                  {"lv_name":"6f1c0000-0000-0000-0000-000000000001", "seg_start_pe":"0", "seg_size_pe":"3", "seg_pe_ranges":"/dev/loop0:0-2"},
                  {"lv_name":"6f1c0000-0000-0000-0000-000000000001", "seg_start_pe":"3", "seg_size_pe":"5", "seg_pe_ranges":"/dev/loop1:0-4"}
              ]
          }
      ]
  }"#;
    const VGS: &str = r#"  {
      "report": [
          {
              "vg": [
                  {"vg_name":"vgx", "vg_extent_size":"4194304", "vg_extent_count":"15", "vg_free_count":"12"}
              ]
          }
      ]
  }"#;

    #[test]
    fn reports_parse() {
        let rows = parse_report(VGS, "vg").unwrap();
        assert_eq!(number(&rows[0], "vg_free_count"), Ok(12));
        assert!(number(&rows[0], "vg_name").is_err());
        assert!(number(&rows[0], "nope").is_err());
        let segs = parse_report(SEGS, "seg").unwrap();
        assert_eq!(segs.len(), 2);
        assert_eq!(
            parse_pe_ranges(&segs[1]["seg_pe_ranges"]).unwrap(),
            vec![PeRange {
                pv: "/dev/loop1".into(),
                first: 0,
                count: 5
            }]
        );
        assert!(parse_report("{}", "vg").is_err());
        assert!(parse_report("not json", "vg").is_err());
        assert_eq!(parse_report(VGS, "lv").unwrap(), vec![]);
    }

    #[test]
    fn pe_ranges_parse_and_bad_ones_are_refused() {
        assert_eq!(
            parse_pe_ranges("/dev/a:0-0 /dev/b:7-9").unwrap(),
            vec![
                PeRange {
                    pv: "/dev/a".into(),
                    first: 0,
                    count: 1
                },
                PeRange {
                    pv: "/dev/b".into(),
                    first: 7,
                    count: 3
                },
            ]
        );
        for bad in ["/dev/a", "/dev/a:1", "/dev/a:3-1", "/dev/a:x-2"] {
            assert!(parse_pe_ranges(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_pe_ranges("").unwrap(), vec![]);
    }

    #[test]
    fn the_filter_admits_exactly_the_pvs() {
        assert_eq!(
            filter_regex(Path::new("/dev/loop3")).unwrap(),
            "^/dev/loop3$"
        );
        assert_eq!(
            filter_regex(Path::new("/dev/disk/by-id/wwn-0x5.0+1")).unwrap(),
            r"^/dev/disk/by-id/wwn-0x5\.0\+1$"
        );
        assert!(filter_regex(Path::new("/dev/a|b")).is_none());
        assert!(filter_regex(Path::new("/dev/a\"b")).is_none());
        let c = config(&[PathBuf::from("/dev/loop3"), PathBuf::from("/dev/loop4")]).unwrap();
        assert!(
            c.contains(r#"filter=["a|^/dev/loop3$|","a|^/dev/loop4$|","r|.*|"]"#),
            "{c}"
        );
        assert!(c.contains("global_filter="), "{c}");
    }

    #[test]
    fn vg_names_follow_lvm2s_rule() {
        for good in ["vg0", "spmbox_domain-1", "a.b+c"] {
            assert!(valid_vg_name(good), "{good}");
        }
        for bad in ["", "-vg", "vg/0", "vg 0", ".", ".."] {
            assert!(!valid_vg_name(bad), "{bad}");
        }
        assert!(Lvm::new("vg0", &[]).is_err());
    }

    #[test]
    fn operands_follow_a_double_dash_after_every_option() {
        let lvm = Lvm {
            vg: "vgx".into(),
            pvs: vec![PathBuf::from("/dev/loop0")],
            metadata_only: true,
        };
        let argv = lvm
            .argv("pvcreate", &["-y"], &["-ff", "/dev/loop0"])
            .unwrap();
        let dash = argv.iter().position(|a| a == "--").expect("a --");
        assert_eq!(argv[dash + 1..], ["-ff", "/dev/loop0"]);
        assert_eq!(argv[0], "pvcreate");
        assert!(argv[..dash].iter().any(|a| a == "--config"));
        assert!(argv[..dash].iter().any(|a| a == "-y"));
        let options_only = lvm.argv("pvs", &["-o", "pv_name"], &[]).unwrap();
        assert!(!options_only.iter().any(|a| a == "--"));
    }

    #[test]
    fn a_device_path_starting_with_a_dash_is_refused() {
        let err = check_device_path(Path::new("--config=devices{}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("starts with '-'"), "{err}");
    }

    #[test]
    fn a_device_path_that_does_not_exist_is_refused() {
        let err = check_device_path(Path::new("/dev/spmbox-no-such-device"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/dev/spmbox-no-such-device cannot be used"),
            "{err}"
        );
        assert!(check_device_path(Path::new("/dev/null")).is_ok());
    }
}
