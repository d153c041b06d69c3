//! What a real virtual machine needs to run the in-VM workload, found and
//! built at run time from what the machine has installed (nothing is
//! downloaded).
//!
//! A VM boots this machine's own kernel (`-kernel`) with an initramfs
//! built here (`-initrd`): busybox, the virtio modules, the `spmbox`
//! binary with the shared libraries it needs, and an `/init` script that
//! loads the modules, waits for the disk (`/dev/vda`) and runs
//! `spmbox vm-guest` (see [`crate::vm::guest`]) with the parameters it finds
//! on the kernel command line (`spmbox.*=` words, written by
//! [`kernel_cmdline`]). The workload prints one result line on the serial
//! console, which [`parse_result`] reads; then the VM powers off.
//!
//! # The initramfs format
//!
//! An uncompressed cpio archive in the "newc" format, which the kernel
//! unpacks into its root file system (Documentation/driver-api/
//! early-userspace/buffer-format.rst): for each file a 110-byte ASCII
//! header (`070701` and thirteen 8-digit hex fields), the NUL-terminated
//! name, padding to 4 bytes, the data, padding to 4 bytes; the archive
//! ends with an entry named `TRAILER!!!`. The kernel creates no missing
//! parent directories, so every directory is written before what it holds.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use spmbox_core::wire::Uuid;

use crate::daemon::guest::{self, Devices, GuestError, VerifyReport};
use crate::io::mapping::{Mapping, Run};

/// The virtio modules the guest needs for its disk, in load order (each
/// after those it depends on). Those built into the kernel are skipped.
pub const VIRTIO_MODULES: [&str; 6] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
];

/// Memory given to a VM, in MiB. The initramfs (about 11 MiB) lives in it
/// twice while the kernel unpacks it; with Debian's cloud kernel 80 MiB
/// runs out of memory during boot and 96 MiB boots, so 128 MiB leaves a
/// margin (docs/operations.md).
pub const VM_MEMORY_MIB: u32 = 128;

/// The machine type: `pc` boots faster than `q35` under TCG here (see
/// docs/operations.md).
pub const VM_MACHINE: &str = "pc";

/// The marker of the workload's result line on the serial console.
pub const RESULT_MARKER: &str = "SPMBOX-VM-RESULT ";

/// Where the modules go inside the initramfs.
const MODULE_DIR: &str = "lib/modules/spmbox";

/// Bumped whenever the initramfs layout or `/init` changes, so a cached
/// image of an older layout is rebuilt.
const IMAGE_LAYOUT: u32 = 1;

/// The programs and files a VM needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmTools {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// `qemu-img`.
    pub qemu_img: PathBuf,
    /// The kernel image (`/boot/vmlinuz-VERSION`).
    pub kernel: PathBuf,
    /// Its modules directory (`/lib/modules/VERSION`).
    pub modules: PathBuf,
    /// A statically linked busybox.
    pub busybox: PathBuf,
}

/// Something a VM needs is missing (or unusable), with the Debian package
/// that provides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingTool {
    what: String,
    package: &'static str,
    detail: String,
}

impl MissingTool {
    /// The Debian package to install.
    pub fn package(&self) -> &'static str {
        self.package
    }

    /// Whether the thing exists but cannot be read (the kernel image, mode
    /// 0600 on Debian): installing the package does not help, running as
    /// root does.
    pub fn is_unreadable(&self) -> bool {
        self.detail.contains("cannot be read")
    }
}

impl fmt::Display for MissingTool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} to run VMs: {}; it comes with the Debian package {} (apt-get install \
             qemu-system-x86 qemu-utils linux-image-cloud-amd64 busybox-static installs \
             all that VMs need)",
            self.what, self.detail, self.package
        )
    }
}

impl std::error::Error for MissingTool {}

/// Why an initramfs could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VmImageError {
    /// A file could not be read or written.
    #[error("{what} {}: {source}", .path.display())]
    Io {
        /// What was done, such as "cannot read".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A helper program (ldd, strip) failed.
    #[error("{program} failed on {}: {detail}", .path.display())]
    Program {
        /// The program.
        program: &'static str,
        /// The file it was run on.
        path: PathBuf,
        /// Its exit status and error output.
        detail: String,
    },
    /// A virtio module is needed but its file is unusable.
    #[error(
        "kernel module {name} of {} is {}, which busybox insmod cannot load; \
         install a kernel whose modules are uncompressed (Debian's linux-image-cloud-amd64)",
        .modules.display(), .file.display()
    )]
    CompressedModule {
        /// The module.
        name: String,
        /// The modules directory.
        modules: PathBuf,
        /// Its file.
        file: PathBuf,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> VmImageError {
    let path = path.to_owned();
    move |source| VmImageError::Io { what, path, source }
}

/// The first executable file named `name` in `$PATH` (and the usual
/// system directories, which a sudo or cron `$PATH` may lack).
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"];
    std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| {
            fs::metadata(p)
                .map(|m| m.is_file() && m.mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Compares kernel versions such as `6.1.0-57-cloud-amd64` by their runs
/// of digits as numbers and the rest as text.
fn version_key(v: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut chars = v.chars().peekable();
    while chars.peek().is_some() {
        let mut digits = String::new();
        while let Some(c) = chars.peek().filter(|c| c.is_ascii_digit()) {
            digits.push(*c);
            chars.next();
        }
        let mut rest = String::new();
        while let Some(c) = chars.peek().filter(|c| !c.is_ascii_digit()) {
            rest.push(*c);
            chars.next();
        }
        out.push((digits.parse().unwrap_or(0), rest));
    }
    out
}

/// The modules of a kernel's modules directory, as `modules.dep` lists
/// them: name to (file relative to the directory, the names it needs).
fn module_deps(modules: &Path) -> Option<BTreeMap<String, (String, Vec<String>)>> {
    let text = fs::read_to_string(modules.join("modules.dep")).ok()?;
    let name_of = |file: &str| {
        let base = file.rsplit('/').next().unwrap_or(file);
        let base = base.split(".ko").next().unwrap_or(base);
        base.replace('-', "_")
    };
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some((file, deps)) = line.split_once(':') else {
            continue;
        };
        let deps = deps.split_whitespace().map(name_of).collect();
        out.insert(name_of(file), (file.to_owned(), deps));
    }
    Some(out)
}

/// The modules built into a kernel (`modules.builtin`), by name.
fn builtin_modules(modules: &Path) -> BTreeSet<String> {
    fs::read_to_string(modules.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .map(|b| b.trim_end_matches(".ko").replace('-', "_"))
        .collect()
}

/// Whether a kernel's modules directory can give the guest its disk:
/// virtio_blk is a module or built in.
fn has_virtio_blk(modules: &Path) -> bool {
    builtin_modules(modules).contains("virtio_blk")
        || module_deps(modules).is_some_and(|m| m.contains_key("virtio_blk"))
}

/// Whether `path` is an ELF executable without a program interpreter (a
/// statically linked one). Only 64-bit little-endian ELF is recognized.
fn is_static_elf(path: &Path) -> bool {
    let Ok(data) = fs::read(path) else {
        return false;
    };
    let u16_at = |at: usize| {
        data.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        data.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |at: usize| {
        data.get(at..at + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    if data.get(..6) != Some(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    const PT_INTERP: u32 = 3;
    (0..u64::from(phnum)).all(|i| {
        let at = usize::try_from(phoff + i * u64::from(phentsize)).unwrap_or(usize::MAX);
        u32_at(at).is_some_and(|t| t != PT_INTERP)
    })
}

/// Finds `qemu-system-x86_64`, `qemu-img`, the newest kernel in `/boot`
/// whose modules directory has the virtio modules, and a static busybox.
///
/// The error names what is missing and the Debian package that provides
/// it, and says when the kernel exists but cannot be read (Debian installs
/// `/boot/vmlinuz-*` mode 0600: run as root).
pub fn find_tools() -> Result<VmTools, MissingTool> {
    find_tools_in(Path::new("/boot"), Path::new("/lib/modules"))
}

fn find_tools_in(boot: &Path, lib_modules: &Path) -> Result<VmTools, MissingTool> {
    let missing = |what: &str, package, detail: String| MissingTool {
        what: what.to_owned(),
        package,
        detail,
    };
    let qemu = which("qemu-system-x86_64").ok_or_else(|| {
        missing(
            "qemu-system-x86_64 is needed",
            "qemu-system-x86",
            "it is not in $PATH".into(),
        )
    })?;
    let qemu_img = which("qemu-img").ok_or_else(|| {
        missing(
            "qemu-img is needed",
            "qemu-utils",
            "it is not in $PATH".into(),
        )
    })?;
    let mut kernels: Vec<(String, PathBuf)> = fs::read_dir(boot)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name.strip_prefix("vmlinuz-")?.to_owned();
            Some((version, e.path()))
        })
        .filter(|(version, _)| has_virtio_blk(&lib_modules.join(version)))
        .collect();
    kernels.sort_by_key(|(v, _)| version_key(v));
    let Some((version, kernel)) = kernels.pop() else {
        return Err(missing(
            "a kernel is needed",
            "linux-image-cloud-amd64",
            format!(
                "no {}/vmlinuz-VERSION has a {}/VERSION with the virtio_blk module",
                boot.display(),
                lib_modules.display()
            ),
        ));
    };
    if let Err(e) = fs::File::open(&kernel) {
        return Err(missing(
            "the kernel is needed",
            "linux-image-cloud-amd64",
            format!(
                "{} exists but cannot be read ({e}); Debian installs it mode 0600: \
                 run as root (or make it readable)",
                kernel.display()
            ),
        ));
    }
    let busybox = ["busybox", "busybox-static"]
        .iter()
        .filter_map(|name| which(name))
        .chain([PathBuf::from("/bin/busybox")])
        .find(|p| is_static_elf(p))
        .ok_or_else(|| {
            missing(
                "a statically linked busybox is needed",
                "busybox-static",
                "no busybox in $PATH or /bin is statically linked".into(),
            )
        })?;
    Ok(VmTools {
        qemu,
        qemu_img,
        kernel,
        modules: lib_modules.join(version),
        busybox,
    })
}

/// A writer of newc cpio archives.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

impl<W: Write> CpioWriter<W> {
    /// An empty archive writing to `out`.
    pub fn new(out: W) -> CpioWriter<W> {
        CpioWriter {
            out,
            written: 0,
            next_ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - self.written % 4) % 4;
        self.out.write_all(&[0u8; 3][..n as usize])?;
        self.written += n;
        Ok(())
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let ino = self.next_ino;
        self.next_ino += 1;
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name} is over 4 GiB, the most a newc cpio entry holds"),
            )
        })?;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}\
             {:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0,
            0,
            0,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.written += header.len() as u64 + name.len() as u64 + 1;
        self.pad()?;
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        self.pad()
    }

    /// Adds directory `path` (relative, such as `lib/modules`) and any of
    /// its parents not added yet.
    pub fn dir(&mut self, path: &str) -> io::Result<()> {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return Ok(());
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.dirs.insert(path.to_owned());
        self.entry(path, 0o040755, (0, 0), &[])
    }

    fn parent(&mut self, path: &str) -> io::Result<String> {
        let path = path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        Ok(path.to_owned())
    }

    /// Adds regular file `path` with permission bits `perm`, and its
    /// parent directories.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let path = self.parent(path)?;
        self.entry(&path, 0o100000 | (perm & 0o7777), (0, 0), data)
    }

    /// Adds symbolic link `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let path = self.parent(path)?;
        self.entry(&path, 0o120777, (0, 0), target.as_bytes())
    }

    /// Adds character device node `path` with device numbers `major:minor`.
    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        let path = self.parent(path)?;
        self.entry(&path, 0o020000 | (perm & 0o7777), (major, minor), &[])
    }

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// The shell function of `/init` that turns the `spmbox.KEY=VALUE` words
/// of the kernel command line (its first argument) into `--KEY VALUE`
/// arguments, `_` in keys becoming `-`.
pub const INIT_ARGS_FUNCTION: &str = r#"spmbox_args() {
	for w in $1; do
		case "$w" in
		spmbox.*=*)
			k=${w%%=*}
			k=${k#spmbox.}
			printf ' --%s %s' "$(echo "$k" | tr _ -)" "${w#*=}"
			;;
		esac
	done
}
"#;

/// The `/init` script: mounts, loads `modules` in order, waits for the
/// disk, runs the workload, powers off.
fn init_script(modules: &[String], lib_dirs: &[String]) -> String {
    let mut s = String::from("#!/bin/busybox sh\n");
    s += "/bin/busybox mkdir -p /proc /sys /dev /tmp\n";
    s += "/bin/busybox mount -t proc proc /proc\n";
    s += "/bin/busybox --install -s\n";
    s += "export PATH=/bin:/sbin:/usr/bin:/usr/sbin\n";
    s += "mount -t sysfs sysfs /sys\n";
    s += "mount -t devtmpfs devtmpfs /dev\n";
    s += "exec </dev/console >/dev/console 2>&1\n";
    if !lib_dirs.is_empty() {
        s += &format!("export LD_LIBRARY_PATH={}\n", lib_dirs.join(":"));
    }
    for m in modules {
        s +=
            &format!("insmod /{MODULE_DIR}/{m}.ko || echo \"spmbox-vm: cannot load module {m}\"\n");
    }
    s += INIT_ARGS_FUNCTION;
    s += r#"i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
if [ -b /dev/vda ]; then
	/bin/spmbox vm-guest --device /dev/vda $(spmbox_args "$(cat /proc/cmdline)")
	echo "spmbox-vm: workload exit status $?"
else
	echo "spmbox-vm: no disk: /dev/vda did not appear within 10 s (is the virtio-blk device attached?)"
fi
sync
poweroff -f
"#;
    s
}

/// The virtio modules `modules` needs loaded, with their dependencies,
/// each after those it depends on: (name, file).
fn modules_to_load(modules: &Path) -> Result<Vec<(String, PathBuf)>, VmImageError> {
    let deps = module_deps(modules).unwrap_or_default();
    let builtin = builtin_modules(modules);
    let mut order: Vec<(String, PathBuf)> = Vec::new();
    fn visit(
        name: &str,
        deps: &BTreeMap<String, (String, Vec<String>)>,
        modules: &Path,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<(String, PathBuf)>,
    ) -> Result<(), VmImageError> {
        if !seen.insert(name.to_owned()) {
            return Ok(());
        }
        let Some((file, needs)) = deps.get(name) else {
            return Ok(());
        };
        for need in needs {
            visit(need, deps, modules, seen, order)?;
        }
        if !file.ends_with(".ko") {
            return Err(VmImageError::CompressedModule {
                name: name.to_owned(),
                modules: modules.to_owned(),
                file: PathBuf::from(file),
            });
        }
        order.push((name.to_owned(), modules.join(file)));
        Ok(())
    }
    let mut seen = builtin;
    for name in VIRTIO_MODULES {
        visit(name, &deps, modules, &mut seen, &mut order)?;
    }
    Ok(order)
}

/// The shared libraries `ldd` lists for `binary`, and its dynamic
/// loader, as absolute paths.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, VmImageError> {
    let Some(ldd) = which("ldd") else {
        // Without ldd, a static binary needs nothing; a dynamic one
        // would fail to start in the VM, which its result line shows.
        return Ok(Vec::new());
    };
    let out = Command::new(ldd)
        .arg(binary)
        .output()
        .map_err(io_err("cannot run ldd on", binary))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable")
        || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
    {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        return Err(VmImageError::Program {
            program: "ldd",
            path: binary.to_owned(),
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        } else if line.contains("not found") {
            return Err(VmImageError::Program {
                program: "ldd",
                path: binary.to_owned(),
                detail: format!("a library is missing: {line}"),
            });
        }
    }
    Ok(libs)
}

/// `binary` without its debug information, if a tool to strip it exists;
/// else as it is.
fn stripped(binary: &Path, scratch: &Path) -> Result<Vec<u8>, VmImageError> {
    let tools: [(&str, &[&str]); 3] = [
        ("strip", &["--strip-debug", "-o"]),
        ("objcopy", &["--strip-debug"]),
        ("llvm-objcopy", &["--strip-debug"]),
    ];
    for (tool, args) in tools {
        let Some(program) = which(tool) else {
            continue;
        };
        let mut cmd = Command::new(program);
        cmd.args(args);
        if tool == "strip" {
            cmd.arg(scratch).arg(binary);
        } else {
            cmd.arg(binary).arg(scratch);
        }
        let ok = cmd.output().map(|o| o.status.success()).unwrap_or(false);
        if ok {
            let data = fs::read(scratch).map_err(io_err("cannot read", scratch));
            let _ = fs::remove_file(scratch);
            return data;
        }
        let _ = fs::remove_file(scratch);
    }
    fs::read(binary).map_err(io_err("cannot read", binary))
}

/// What an initramfs was built from: it is rebuilt when this changes.
fn stamp(tools: &VmTools, spmbox: &Path) -> Result<String, VmImageError> {
    let mut s = format!("layout {IMAGE_LAYOUT}\n");
    for path in [spmbox, &tools.kernel, &tools.modules, &tools.busybox] {
        let m = fs::metadata(path).map_err(io_err("cannot stat", path))?;
        s += &format!(
            "{} {} {} {}\n",
            path.display(),
            m.len(),
            m.mtime(),
            m.mtime_nsec()
        );
    }
    Ok(s)
}

fn stamp_path(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".stamp");
    PathBuf::from(name)
}

/// Builds the initramfs at `out` (see the module documentation): busybox,
/// the virtio modules, `spmbox` (stripped of debug information when
/// `strip`, `objcopy` or `llvm-objcopy` exists) with its shared libraries
/// and dynamic loader at their own paths, and `/init`.
///
/// Cached: when `out` exists and `out.stamp` beside it says it was built
/// from the same `spmbox`, kernel, modules and busybox, nothing is done.
/// The image is written to a temporary file beside `out` and renamed into
/// place, so a failed build leaves no partial image.
pub fn build_initramfs(tools: &VmTools, spmbox: &Path, out: &Path) -> Result<(), VmImageError> {
    let stamp_file = stamp_path(out);
    let want = stamp(tools, spmbox)?;
    if out.exists() && fs::read_to_string(&stamp_file).is_ok_and(|s| s == want) {
        return Ok(());
    }
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // A temporary file of its own, so builds running at once (tests in
    // threads) do not write into each other's.
    let tmp = tempfile::Builder::new()
        .prefix(".spmbox-initramfs")
        .tempfile_in(dir)
        .map_err(io_err("cannot create a temporary file in", dir))?;
    let mut scratch = tmp.path().as_os_str().to_owned();
    scratch.push(".strip");
    write_initramfs(tools, spmbox, tmp.path(), Path::new(&scratch))?;
    // Readable by a qemu running as another user.
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o644))
        .map_err(io_err("cannot set the mode of", tmp.path()))?;
    tmp.persist(out)
        .map_err(|e| e.error)
        .map_err(io_err("cannot rename into", out))?;
    fs::write(&stamp_file, &want).map_err(io_err("cannot write", &stamp_file))
}

fn write_initramfs(
    tools: &VmTools,
    spmbox: &Path,
    tmp: &Path,
    scratch: &Path,
) -> Result<(), VmImageError> {
    let modules = modules_to_load(&tools.modules)?;
    let libs = shared_libraries(spmbox)?;
    let binary = stripped(spmbox, scratch)?;
    let busybox = fs::read(&tools.busybox).map_err(io_err("cannot read", &tools.busybox))?;
    let mut lib_dirs: Vec<String> = libs
        .iter()
        .filter_map(|l| l.parent().map(|p| p.display().to_string()))
        .collect();
    lib_dirs.dedup();
    let names: Vec<String> = modules.iter().map(|(n, _)| n.clone()).collect();
    let init = init_script(&names, &lib_dirs);

    let file = fs::File::create(tmp).map_err(io_err("cannot create", tmp))?;
    let mut cpio = CpioWriter::new(io::BufWriter::new(file));
    let write = |cpio: &mut CpioWriter<_>| -> io::Result<()> {
        for d in [
            "bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp",
        ] {
            cpio.dir(d)?;
        }
        cpio.char_device("dev/console", 0o600, 5, 1)?;
        cpio.file("bin/busybox", 0o755, &busybox)?;
        cpio.symlink("bin/sh", "busybox")?;
        cpio.file("bin/spmbox", 0o755, &binary)?;
        cpio.file("init", 0o755, init.as_bytes())?;
        Ok(())
    };
    write(&mut cpio).map_err(io_err("cannot write", tmp))?;
    for (name, file) in &modules {
        let data = fs::read(file).map_err(io_err("cannot read", file))?;
        cpio.file(&format!("{MODULE_DIR}/{name}.ko"), 0o644, &data)
            .map_err(io_err("cannot write", tmp))?;
    }
    for lib in &libs {
        let data = fs::read(lib).map_err(io_err("cannot read", lib))?;
        cpio.file(&lib.display().to_string(), 0o755, &data)
            .map_err(io_err("cannot write", tmp))?;
    }
    let out = cpio.finish().map_err(io_err("cannot write", tmp))?;
    out.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .map_err(io_err("cannot write", tmp))
}

/// What the in-VM workload does, passed on the kernel command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestParams {
    /// The volume whose blocks are written.
    pub volume: Uuid,
    /// The generation stamped into the blocks.
    pub generation: u64,
    /// Bytes to write from offset 0 (whole blocks).
    pub bytes: u64,
    /// Bytes per second (0: unpaced).
    pub rate: u64,
    /// Bytes per write.
    pub write_size: u64,
}

/// The kernel command line of a VM running the workload with `p`: a quiet
/// boot on the serial console, a panic powering off at once, and the
/// parameters as `spmbox.KEY=VALUE` words (which the kernel leaves alone
/// and `/init` reads from `/proc/cmdline`).
pub fn kernel_cmdline(p: &GuestParams) -> String {
    format!(
        "console=ttyS0 panic=-1 quiet loglevel=3 \
         spmbox.volume={} spmbox.generation={} spmbox.bytes={} spmbox.rate={} spmbox.write_size={}",
        p.volume, p.generation, p.bytes, p.rate, p.write_size
    )
}

/// The parameters in a kernel command line [`kernel_cmdline`] wrote;
/// `None` when one is missing or malformed.
pub fn parse_cmdline(cmdline: &str) -> Option<GuestParams> {
    let mut words = BTreeMap::new();
    for w in cmdline.split_whitespace() {
        if let Some((k, v)) = w.strip_prefix("spmbox.").and_then(|w| w.split_once('=')) {
            words.insert(k, v);
        }
    }
    let num = |k: &str| words.get(k)?.parse::<u64>().ok();
    Some(GuestParams {
        volume: Uuid::parse_str(words.get("volume")?)?,
        generation: num("generation")?,
        bytes: num("bytes")?,
        rate: num("rate")?,
        write_size: num("write_size")?,
    })
}

/// Whether KVM can run guests here: `/dev/kvm` opens for reading and
/// writing, and the CPU has virtualization extensions (`vmx` or `svm` in
/// `/proc/cpuinfo`). A VM whose hypervisor offers `/dev/kvm` without them
/// (nested virtualization turned off) lets qemu start guests that never
/// boot, so both are needed.
pub fn kvm_usable() -> bool {
    let device = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let extensions = fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
        c.lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
    });
    device && extensions
}

/// The accelerator VMs use: `SPMBOX_VM_ACCEL` (`kvm` or `tcg`) when set to
/// one of them, else `kvm` when [`kvm_usable`], else `tcg` (emulation,
/// several times slower but enough for these VMs).
pub fn accelerator() -> &'static str {
    match std::env::var("SPMBOX_VM_ACCEL").as_deref() {
        Ok("kvm") => "kvm",
        Ok("tcg") => "tcg",
        _ if kvm_usable() => "kvm",
        _ => "tcg",
    }
}

/// qemu's arguments for one VM, without any disk: machine, accelerator
/// ([`accelerator`]), memory, one CPU, no default
/// devices, no display, no reboot (a guest reboot or panic ends qemu), the
/// kernel, initramfs and command line, and the serial console written to
/// `serial_log`. The caller adds `-blockdev`/`-device virtio-blk-pci`
/// (the guest sees it as `/dev/vda`), `-qmp` and `-pidfile`.
pub fn qemu_base_args(
    tools: &VmTools,
    initramfs: &Path,
    cmdline: &str,
    serial_log: &Path,
) -> Vec<OsString> {
    let accel = accelerator();
    let mut serial = OsString::from("file:");
    serial.push(serial_log);
    vec![
        "-machine".into(),
        VM_MACHINE.into(),
        "-accel".into(),
        accel.into(),
        "-m".into(),
        format!("{VM_MEMORY_MIB}M").into(),
        "-smp".into(),
        "1".into(),
        "-nodefaults".into(),
        "-nographic".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        tools.kernel.clone().into_os_string(),
        "-initrd".into(),
        initramfs.to_owned().into_os_string(),
        "-append".into(),
        cmdline.into(),
        "-serial".into(),
        serial,
    ]
}

/// What the in-VM workload reported.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GuestResult {
    /// Bytes written by this boot.
    pub written: u64,
    /// Bytes read back and found good (from offset 0).
    pub verified: u64,
    /// Bad blocks found on reading back, plus writes that failed (each
    /// failed attempt, retried or not).
    pub errors: u64,
    /// Where this boot started writing: what earlier boots had written.
    pub resumed_from: u64,
    /// The first error, in words.
    pub first_error: Option<String>,
    /// Seconds the writes of this boot took, on the guest's clock (which
    /// stands still while qemu holds the VM paused).
    #[serde(default)]
    pub write_seconds: f64,
}

impl GuestResult {
    /// The line the workload prints.
    pub fn to_line(&self) -> String {
        // Serializing plain numbers and an optional string cannot fail.
        let json = serde_json::to_string(self).unwrap_or_default();
        format!("{RESULT_MARKER}{json}")
    }
}

/// The result line the workload printed on the serial console, if any (the
/// last one, should there be several).
pub fn parse_result(serial_log: &str) -> Option<GuestResult> {
    serial_log.lines().rev().find_map(|line| {
        let (_, json) = line.split_once(RESULT_MARKER)?;
        serde_json::from_str(json.trim()).ok()
    })
}

/// Reads `bytes` (rounded down to whole blocks) of raw disk image `path`
/// from offset 0 and checks every block of `volume`, as the host sees the
/// disk after the VM is gone.
pub fn verify_raw(path: &Path, volume: Uuid, bytes: u64) -> Result<VerifyReport, GuestError> {
    let size = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let map = Mapping::new(vec![Run {
        device: path.to_owned(),
        offset: 0,
        len: size - size % guest::BLOCK,
    }]);
    guest::verify(volume, &map, &mut Devices::new(), bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One entry of a newc archive, as read back.
    #[derive(Debug, PartialEq, Eq)]
    struct Entry {
        name: String,
        mode: u32,
        rdev: (u32, u32),
        data: Vec<u8>,
    }

    /// A newc reader written from the format's description, independent
    /// of the writer.
    fn read_newc(mut a: &[u8]) -> Vec<Entry> {
        let mut out = Vec::new();
        let total = a.len();
        loop {
            assert_eq!((total - a.len()) % 4, 0, "entry not 4-byte aligned");
            assert_eq!(&a[..6], b"070701", "bad magic");
            let field = |i: usize| {
                let at = 6 + 8 * i;
                u32::from_str_radix(std::str::from_utf8(&a[at..at + 8]).unwrap(), 16).unwrap()
            };
            let (mode, size, namesize) = (field(1), field(6) as usize, field(11) as usize);
            let rdev = (field(9), field(10));
            let name_end = 110 + namesize;
            assert_eq!(a[name_end - 1], 0, "name not NUL-terminated");
            let name = String::from_utf8(a[110..name_end - 1].to_vec()).unwrap();
            let data_at = name_end.next_multiple_of(4);
            let data = a[data_at..data_at + size].to_vec();
            a = &a[(data_at + size).next_multiple_of(4).min(a.len())..];
            if name == "TRAILER!!!" {
                assert!(a.is_empty(), "bytes after the trailer");
                return out;
            }
            out.push(Entry {
                name,
                mode,
                rdev,
                data,
            });
        }
    }

    #[test]
    fn the_cpio_writer_output_reads_back_with_parents_before_children() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("lib/modules/spmbox/virtio.ko", 0o644, b"abcde")
            .unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        w.file("/init", 0o755, b"#!/bin/sh\n").unwrap();
        w.dir("lib/modules").unwrap();
        let entries = read_newc(&w.finish().unwrap());
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "lib",
                "lib/modules",
                "lib/modules/spmbox",
                "lib/modules/spmbox/virtio.ko",
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "init"
            ]
        );
        let e = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
        assert_eq!(e("lib").mode, 0o040755);
        assert_eq!(e("lib/modules/spmbox/virtio.ko").mode, 0o100644);
        assert_eq!(e("lib/modules/spmbox/virtio.ko").data, b"abcde");
        assert_eq!(e("bin/sh").mode, 0o120777);
        assert_eq!(e("bin/sh").data, b"busybox");
        assert_eq!(e("dev/console").mode, 0o020600);
        assert_eq!(e("dev/console").rdev, (5, 1));
        assert_eq!(e("init").data, b"#!/bin/sh\n");
    }

    #[test]
    fn the_cpio_writer_output_is_listed_by_cpio() {
        let Ok(mut child) = Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            eprintln!("skipped: cpio is not installed");
            return;
        };
        let mut w = CpioWriter::new(Vec::new());
        w.file("a/b/c", 0o644, b"xyz").unwrap();
        w.symlink("a/l", "b/c").unwrap();
        let archive = w.finish().unwrap();
        child.stdin.take().unwrap().write_all(&archive).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a\na/b\na/b/c\na/l\n");
    }

    fn params() -> GuestParams {
        GuestParams {
            volume: Uuid::parse_str("0b7e1a52-93c4-4d1e-8f00-2a6b9c3d4e5f").unwrap(),
            generation: 7,
            bytes: 48 << 20,
            rate: 64 << 20,
            write_size: 1 << 20,
        }
    }

    #[test]
    fn the_kernel_cmdline_carries_the_guest_parameters_and_parses_back() {
        let p = params();
        let line = kernel_cmdline(&p);
        assert!(line.starts_with("console=ttyS0 panic=-1 "));
        assert_eq!(parse_cmdline(&line), Some(p));
        assert_eq!(parse_cmdline("console=ttyS0 spmbox.volume=x"), None);
    }

    #[test]
    fn init_turns_the_kernel_cmdline_into_vm_guest_arguments() {
        let p = params();
        let script = format!("{INIT_ARGS_FUNCTION}spmbox_args \"$1\"");
        let Ok(out) = Command::new("sh")
            .args(["-c", &script, "sh", &kernel_cmdline(&p)])
            .output()
        else {
            eprintln!("skipped: no sh to run the init script's function");
            return;
        };
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!(
                " --volume {} --generation 7 --bytes 50331648 --rate 67108864 --write-size 1048576",
                p.volume
            )
        );
    }

    #[test]
    fn the_result_line_is_found_among_console_noise() {
        let r = GuestResult {
            written: 1 << 20,
            verified: 2 << 20,
            errors: 1,
            resumed_from: 1 << 20,
            first_error: Some("block at 4096: pattern mismatch".into()),
            write_seconds: 0.25,
        };
        let log = format!(
            "SeaBIOS\r\nspmbox-vm: wrote 1 of 2\r\n[    3.1] x{}\r\nspmbox-vm: workload exit status 1\r\n",
            r.to_line()
        );
        assert_eq!(parse_result(&log), Some(r));
        assert_eq!(parse_result("booting\nKernel panic\n"), None);
        assert_eq!(parse_result("SPMBOX-VM-RESULT {\"written\":1"), None);
    }

    #[test]
    fn kernel_versions_compare_by_number() {
        let mut v = vec![
            "6.10.0-1-cloud-amd64",
            "6.1.0-57-cloud-amd64",
            "6.1.0-9-cloud-amd64",
        ];
        v.sort_by_key(|v| version_key(v));
        assert_eq!(
            v,
            [
                "6.1.0-9-cloud-amd64",
                "6.1.0-57-cloud-amd64",
                "6.10.0-1-cloud-amd64"
            ]
        );
    }

    #[test]
    fn a_kernel_without_virtio_modules_is_missing_and_names_its_package() {
        if which("qemu-system-x86_64").is_none() || which("qemu-img").is_none() {
            eprintln!("skipped: qemu-system-x86_64 or qemu-img is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (boot, lib) = (dir.path().join("boot"), dir.path().join("modules"));
        fs::create_dir_all(lib.join("6.1.0-1-amd64")).unwrap();
        fs::create_dir_all(&boot).unwrap();
        fs::write(boot.join("vmlinuz-6.1.0-1-amd64"), b"kernel").unwrap();
        let e = find_tools_in(&boot, &lib).unwrap_err();
        assert_eq!(e.package(), "linux-image-cloud-amd64");
        assert!(e.to_string().contains("virtio_blk"), "{e}");

        // With virtio_blk listed, the kernel is found.
        fs::write(
            lib.join("6.1.0-1-amd64/modules.dep"),
            "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko\n",
        )
        .unwrap();
        match find_tools_in(&boot, &lib) {
            Ok(t) => assert_eq!(t.kernel, boot.join("vmlinuz-6.1.0-1-amd64")),
            Err(e) => assert_eq!(e.package(), "busybox-static", "{e}"),
        }
    }

    #[test]
    fn modules_load_after_their_dependencies_and_built_in_ones_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("modules.dep"),
            "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/drivers/virtio/virtio_ring.ko:\n\
             kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko \
             kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/drivers/virtio/virtio_pci_modern_dev.ko:\n\
             kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko \
             kernel/drivers/virtio/virtio_ring.ko\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("modules.builtin"),
            "kernel/drivers/virtio/virtio_pci_modern_dev.ko\n",
        )
        .unwrap();
        let order: Vec<String> = modules_to_load(dir.path())
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(order, ["virtio_ring", "virtio", "virtio_pci", "virtio_blk"]);

        fs::write(
            dir.path().join("modules.dep"),
            "kernel/drivers/block/virtio_blk.ko.xz:\n",
        )
        .unwrap();
        let e = modules_to_load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("virtio_blk.ko.xz"), "{e}");
    }

    #[test]
    fn only_an_executable_without_interpreter_counts_as_static() {
        // The test binary links against the C library dynamically.
        assert!(!is_static_elf(&std::env::current_exe().unwrap()));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("script");
        fs::write(&f, b"#!/bin/sh\n").unwrap();
        assert!(!is_static_elf(&f));
        if Path::new("/bin/busybox").exists() && find_tools().is_ok() {
            assert!(is_static_elf(Path::new("/bin/busybox")));
        }
    }
}
