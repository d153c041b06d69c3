//! The man pages and shell completions, generated from the clap
//! definitions of [`crate::cli::args`] by the hidden command
//! `spmbox generate-assets --out DIR`, which the package build runs before
//! `cargo deb` (see README, "Install"). They are not kept in the
//! repository: they cannot drift from the flags.
//!
//! `DIR/man/` gets `spmbox.1` and one page per command (`spmbox-spm.1`,
//! `spmbox-pool-create.1`, ...); `DIR/completions/` gets `spmbox.bash`,
//! `_spmbox` (zsh) and `spmbox.fish`.

use std::path::{Path, PathBuf};

use clap::CommandFactory as _;
use clap_complete::Shell;

use crate::cli::args::Cli;

/// Writes the man pages and completions under `out`; returns the files
/// written.
pub fn generate(out: &Path) -> std::io::Result<Vec<PathBuf>> {
    let man = out.join("man");
    let completions = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    clap_mangen::generate_to(Cli::command(), &man)?;
    let mut written = Vec::new();
    for entry in std::fs::read_dir(&man)? {
        written.push(entry?.path());
    }
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut command = Cli::command();
        written.push(clap_complete::generate_to(
            shell,
            &mut command,
            "spmbox",
            &completions,
        )?);
    }
    written.sort();
    Ok(written)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_visible_command_gets_a_man_page_and_each_shell_a_completion() {
        let dir = tempfile::tempdir().unwrap();
        let files = super::generate(dir.path()).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for name in [
            "spmbox.1",
            "spmbox-spm.1",
            "spmbox-host.1",
            "spmbox-status.1",
            "spmbox-pool-create.1",
            "spmbox-config-check.1",
            "spmbox.bash",
            "_spmbox",
            "spmbox.fish",
        ] {
            assert!(names.iter().any(|n| n == name), "no {name} in {names:?}");
        }
        assert!(
            !names
                .iter()
                .any(|n| n.contains("vm-guest") || n.contains("generate"))
        );
        let spm = std::fs::read_to_string(dir.path().join("man/spmbox-spm.1")).unwrap();
        assert!(spm.contains("doorbell\\-interval"), "{spm}");
        let bash = std::fs::read_to_string(dir.path().join("completions/spmbox.bash")).unwrap();
        assert!(bash.contains("--full-scan-interval"));
    }
}
