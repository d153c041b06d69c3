//! What the daemons log, as an administrator reads it in a file or in
//! journald: no colour escapes, no Rust debug output, one line per event,
//! each naming its domain (and epoch or host id), and `--log-format json`.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_spmbox")
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir()
        .or_else(|_| tempfile::tempdir_in("/var/tmp"))
        .expect("temp dir")
}

struct Domain {
    dir: tempfile::TempDir,
}

impl Domain {
    fn new() -> Domain {
        let dir = tempdir();
        fs::create_dir(dir.path().join("run")).unwrap();
        fs::File::create(dir.path().join("lun1"))
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let d = Domain { dir };
        let out = d
            .cmd(&["pool", "create", "--hosts", "4", "--extent-size", "1M"])
            .args(["--device", d.p("dom"), "--lun", d.p("lun1")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        d
    }

    fn p(&self, name: &str) -> &str {
        let path: PathBuf = self.dir.path().join(name);
        Box::leak(
            path.into_os_string()
                .into_string()
                .unwrap()
                .into_boxed_str(),
        )
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.args(args)
            .env("SPMBOX_RUN_DIR", self.dir.path().join("run"))
            .env_remove("SPMBOX_LOG");
        c
    }

    /// A daemon whose stderr goes to `log`, as under a service manager.
    fn daemon(&self, args: &[&str], log: &str) -> Child {
        let file = fs::File::create(self.dir.path().join(log)).unwrap();
        self.cmd(args)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn")
    }

    fn wait_for_spm(&self, spm: &mut Child) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self
                .cmd(&["status", "--json", "--device", self.p("dom")])
                .output()
                .unwrap();
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            if v["pool_source"] == "spm" {
                return;
            }
            assert!(matches!(spm.try_wait(), Ok(None)), "the SPM exited");
            assert!(Instant::now() < deadline, "the SPM did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn volume(&self) -> String {
        let out = self
            .cmd(&[
                "volume",
                "create",
                "--virtual-size",
                "16M",
                "--initial-size",
                "1M",
            ])
            .args(["--device", self.p("dom")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    fn read(&self, log: &str) -> String {
        fs::read_to_string(self.dir.path().join(log)).unwrap()
    }
}

fn term(child: &mut Child) {
    let pid = rustix::process::Pid::from_child(child);
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    let _ = child.wait();
}

/// Runs an SPM (with `spm_args`) and one host that needs a few
/// extensions; returns the domain, the SPM's log and the host's.
fn run_domain(spm_args: &[&str], host_args: &[&str]) -> (Domain, String, String) {
    let d = Domain::new();
    let mut spm = d.daemon(
        &[&["spm", "--device", d.p("dom")], spm_args].concat(),
        "spm.log",
    );
    d.wait_for_spm(&mut spm);
    let volume = d.volume();
    let mut host = d.daemon(
        &[
            &[
                "host",
                "--device",
                d.p("dom"),
                "--host-id",
                "1",
                "--volume",
                &volume,
                "--rate",
                "0",
                "--guest-bytes",
                "6M",
                "--chunk-size",
                "1M",
                "--exit-when-done",
            ],
            host_args,
        ]
        .concat(),
        "host.log",
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while matches!(host.try_wait(), Ok(None)) {
        assert!(Instant::now() < deadline, "the host did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(host.wait().unwrap().success(), "{}", d.read("host.log"));
    term(&mut spm);
    let (spm_log, host_log) = (d.read("spm.log"), d.read("host.log"));
    (d, spm_log, host_log)
}

fn domain_of(d: &Domain) -> String {
    let out = d
        .cmd(&["status", "--json", "--device", d.p("dom")])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["domain"].as_str().unwrap().to_string()
}

#[test]
fn text_logs_in_a_file_have_no_escapes_no_debug_output_and_name_the_domain() {
    let (d, spm, host) = run_domain(&["-v"], &["-v"]);
    let domain = domain_of(&d);
    for (name, log) in [("spm", &spm), ("host", &host)] {
        assert!(!log.is_empty(), "{name}: nothing logged");
        assert!(
            !log.contains('\x1b'),
            "{name}: escape codes in a file:\n{log}"
        );
        for line in log.lines() {
            assert!(
                line.contains(&domain),
                "{name}: a line without the domain: {line}"
            );
            for debug in [" { ", "Some(", "WaitingForSpace", "Extended {", "NoSpace"] {
                assert!(!line.contains(debug), "{name}: debug output: {line}");
            }
        }
    }
    // From the engine's start (its line names the epoch) on, every SPM
    // line carries the epoch.
    let started = spm
        .lines()
        .skip_while(|l| !l.contains("starting with epoch"))
        .skip(1);
    for line in started {
        assert!(
            line.contains("epoch="),
            "an SPM line without its epoch: {line}"
        );
    }
    assert!(
        host.lines().all(|l| l.contains("host=1")),
        "a host line without its id:\n{host}"
    );
    // One line per extension: the core's, not the shell's again.
    let extended = host.lines().filter(|l| l.contains("extended")).count();
    let stopped = host
        .lines()
        .find(|l| l.contains("stopped:"))
        .unwrap_or_else(|| panic!("no summary line:\n{host}"));
    let n: usize = stopped
        .split("stopped: ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no count in {stopped}"));
    assert!(n > 0, "{host}");
    assert_eq!(extended, n, "extension lines vs. extensions:\n{host}");
}

#[test]
fn json_logs_are_one_object_per_line_with_the_daemon_fields() {
    let (d, spm, host) = run_domain(
        &["-v", "--log-format", "json"],
        &["-v", "--log-format", "json"],
    );
    let domain = domain_of(&d);
    for (name, log, field) in [("spm", &spm, "epoch"), ("host", &host, "host")] {
        assert!(!log.is_empty(), "{name}: nothing logged");
        for line in log.lines() {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {line}"));
            assert!(v["message"].is_string(), "{name}: {line}");
            assert!(v["level"].is_string(), "{name}: {line}");
            assert_eq!(v["span"]["domain"], domain.as_str(), "{name}: {line}");
            let before_epoch = field == "epoch"
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("starting with epoch"));
            assert!(
                before_epoch || !v["span"][field].is_null(),
                "{name}: no {field}: {line}"
            );
        }
    }
    assert!(
        host.lines().any(|l| l.contains("\"volume\"")),
        "no line with a volume field:\n{host}"
    );
}
