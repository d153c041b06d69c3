//! The daemons' configuration files: TOML whose keys are the flags of
//! `spmbox spm` and `spmbox host`, without their dashes.
//!
//! ```toml
//! [log]
//! level = "info"          # warn, info, debug, trace, or a SPMBOX_LOG filter
//! format = "text"         # or "json"
//!
//! [spm]
//! device = "/dev/mapper/domain1-mailbox"
//! full-scan-interval = "15s"
//!
//! [host]
//! device = "/dev/mapper/domain1-mailbox"
//! host-id = 3
//! volume = ["6f1c...", "8a0b..."]
//! ```
//!
//! A flag that takes one comma-separated list ([`COMMA_LISTS`]:
//! `--pool-warn 80,85,90,95`) takes a TOML list too
//! (`pool-warn = [80, 85, 90, 95]`), joined with commas; an empty list is
//! the flag's `none`.
//!
//! `--config FILE` (repeatable) names the files; later files win over
//! earlier ones (the package's `/etc/spmbox/spmbox.toml`, then a domain's
//! `/etc/spmbox/domains/NAME.toml`), and flags on the command line win
//! over every file. A flag given on the command line replaces a list from
//! a file rather than adding to it. An unknown section or key, or a value
//! of the wrong type, is refused with its file and line.
//!
//! The files are turned into flags before the command line is parsed, so
//! a value in a file is checked exactly as the same flag would be.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::CommandFactory as _;

use crate::cli::args::Cli;

/// Where the package installs the configuration that every daemon reads.
pub const DEFAULT_CONFIG: &str = "/etc/spmbox/spmbox.toml";

/// The sections a file may have: the daemons' commands, and `log`.
pub const DAEMON_SECTIONS: [&str; 2] = ["spm", "host"];

/// The keys of the `[log]` section.
pub const LOG_KEYS: [&str; 2] = ["level", "format"];

/// Flags whose one value is a comma-separated list, so a file may give
/// them a TOML list; an empty list is `none`.
pub const COMMA_LISTS: [&str; 1] = ["pool-warn"];

/// The largest configuration file read: a config is a few dozen lines.
pub const MAX_CONFIG_LEN: u64 = 1 << 20;

/// A configuration file that cannot be used; the message names the file
/// and line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// One `key = value` of a daemon section, as flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// The flag without its dashes (`doorbell-interval`).
    pub key: String,
    /// The flag's values: one for a plain flag, none for a switch that is
    /// on, each element of a list.
    pub values: Vec<String>,
    /// The file and line, for messages.
    pub place: String,
}

/// What the files say, merged in order (a later file's key replaces an
/// earlier one's).
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// `[spm]` and `[host]`, by section.
    pub sections: Vec<(String, Vec<Setting>)>,
    /// `[log] level`.
    pub log_level: Option<String>,
    /// `[log] format`.
    pub log_format: Option<crate::cli::logging::LogFormat>,
}

impl Config {
    /// The settings of `section` (`spm` or `host`).
    pub fn section(&self, section: &str) -> &[Setting] {
        self.sections
            .iter()
            .find(|(name, _)| name == section)
            .map_or(&[], |(_, s)| s.as_slice())
    }

    fn set(&mut self, section: &str, setting: Setting) {
        let index = match self.sections.iter().position(|(name, _)| name == section) {
            Some(i) => i,
            None => {
                self.sections.push((section.to_string(), Vec::new()));
                self.sections.len() - 1
            }
        };
        let settings = &mut self.sections[index].1;
        settings.retain(|s| s.key != setting.key);
        settings.push(setting);
    }
}

/// How a daemon flag takes its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `--flag VALUE`.
    One,
    /// `--flag VALUE` repeated.
    Many,
    /// `--flag A,B,C`: one value, a list in a file ([`COMMA_LISTS`]).
    Commas,
    /// `--flag` alone.
    Switch,
}

/// The flags of a daemon command a file may set: every long flag but
/// `--config`, help and the global ones (`[log]` sets those).
fn flags_of(section: &str) -> Vec<(String, Shape)> {
    let cli = Cli::command();
    let Some(command) = cli.find_subcommand(section) else {
        return Vec::new();
    };
    command
        .get_arguments()
        .filter(|a| !a.is_global_set())
        .filter_map(|a| {
            let long = a.get_long()?;
            if long == "config" || long == "help" {
                return None;
            }
            let shape = match a.get_action() {
                _ if COMMA_LISTS.contains(&long) => Shape::Commas,
                clap::ArgAction::SetTrue => Shape::Switch,
                clap::ArgAction::Append => Shape::Many,
                _ => Shape::One,
            };
            Some((long.to_string(), shape))
        })
        .collect()
}

/// The line (1-based) of byte `offset` of `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(0, |t| t.bytes().filter(|&b| b == b'\n').count())
        + 1
}

/// A scalar as the text a flag would carry.
fn scalar(value: &toml::de::DeValue<'_>) -> Option<String> {
    use toml::de::DeValue;
    match value {
        DeValue::String(s) => Some(s.to_string()),
        DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
            .ok()
            .map(|n| n.to_string()),
        DeValue::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Reads one file into `config`, over what earlier files set.
pub fn read_file(path: &Path, config: &mut Config) -> Result<(), ConfigError> {
    let name = path.display();
    let meta = std::fs::metadata(path).map_err(|e| ConfigError(format!("{name}: {e}")))?;
    if meta.len() > MAX_CONFIG_LEN {
        return Err(ConfigError(format!(
            "{name} is {} bytes; a configuration file is at most {MAX_CONFIG_LEN}",
            meta.len()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError(format!("{name}: {e}")))?;
    read_str(&name.to_string(), &text, config)
}

/// Reads the text of a file named `name` into `config`.
pub fn read_str(name: &str, text: &str, config: &mut Config) -> Result<(), ConfigError> {
    use toml::de::{DeTable, DeValue};
    let at = |offset: usize| format!("{name}, line {}", line_of(text, offset));
    let table = DeTable::parse(text).map_err(|e| {
        let line = e.span().map_or(String::new(), |s| at(s.start));
        ConfigError(format!("{line}: {}", e.message().trim_end()))
    })?;
    let mut sections: Vec<_> = table.get_ref().iter().collect();
    sections.sort_by_key(|(k, _)| k.span().start);
    for (section, body) in sections {
        let section_name: &str = section.get_ref();
        let DeValue::Table(body) = body.get_ref() else {
            return Err(ConfigError(format!(
                "{}: `{section_name}` is not a section: every key belongs in [spm], [host] or \
                 [log]",
                at(section.span().start)
            )));
        };
        let mut keys: Vec<_> = body.iter().collect();
        keys.sort_by_key(|(k, _)| k.span().start);
        if section_name == "log" {
            for (key, value) in keys {
                let place = at(key.span().start);
                let key_name: &str = key.get_ref();
                let Some(text) = scalar(value.get_ref()).filter(|_| value.get_ref().is_str())
                else {
                    return Err(ConfigError(format!(
                        "{place}: [log] {key_name} takes a string"
                    )));
                };
                match key_name {
                    "level" => config.log_level = Some(text),
                    "format" => {
                        config.log_format = Some(
                            <crate::cli::logging::LogFormat as clap::ValueEnum>::from_str(
                                &text, false,
                            )
                            .map_err(|_| {
                                ConfigError(format!(
                                    "{place}: [log] format is \"text\" or \"json\", not {text:?}"
                                ))
                            })?,
                        )
                    }
                    _ => {
                        return Err(ConfigError(format!(
                            "{place}: unknown key `{key_name}` in [log] (known: {})",
                            LOG_KEYS.join(", ")
                        )));
                    }
                }
            }
            continue;
        }
        if !DAEMON_SECTIONS.contains(&section_name) {
            return Err(ConfigError(format!(
                "{}: unknown section [{section_name}] (known: [spm], [host], [log])",
                at(section.span().start)
            )));
        }
        let flags = flags_of(section_name);
        for (key, value) in keys {
            let place = at(key.span().start);
            let key_name: &str = key.get_ref();
            let Some(&(_, shape)) = flags.iter().find(|(f, _)| f == key_name) else {
                let mut known: Vec<&str> = flags.iter().map(|(f, _)| f.as_str()).collect();
                known.sort_unstable();
                return Err(ConfigError(format!(
                    "{place}: unknown key `{key_name}` in [{section_name}]: keys are the flags \
                     of `spmbox {section_name}` without their dashes ({})",
                    known.join(", ")
                )));
            };
            let values = match (shape, value.get_ref()) {
                (Shape::Switch, DeValue::Boolean(true)) => Vec::new(),
                (Shape::Switch, DeValue::Boolean(false)) => {
                    // Off: as if the key were not there (and an earlier
                    // file's `true` is undone).
                    if let Some((_, s)) =
                        config.sections.iter_mut().find(|(n, _)| n == section_name)
                    {
                        s.retain(|s| s.key != key_name);
                    }
                    continue;
                }
                (Shape::Switch, _) => {
                    return Err(ConfigError(format!(
                        "{place}: {key_name} is a switch: true or false"
                    )));
                }
                (Shape::Many, DeValue::Array(items)) => {
                    let mut values = Vec::new();
                    for item in items.iter() {
                        values.push(scalar(item.get_ref()).ok_or_else(|| {
                            ConfigError(format!(
                                "{}: {key_name} takes strings or numbers",
                                at(item.span().start)
                            ))
                        })?);
                    }
                    values
                }
                (Shape::Commas, DeValue::Array(items)) => {
                    let mut values = Vec::new();
                    for item in items.iter() {
                        let text = match item.get_ref() {
                            DeValue::Boolean(_) => None,
                            v => scalar(v),
                        };
                        values.push(text.ok_or_else(|| {
                            ConfigError(format!(
                                "{}: {key_name} takes a list of whole numbers",
                                at(item.span().start)
                            ))
                        })?);
                    }
                    if values.is_empty() {
                        vec!["none".to_string()]
                    } else {
                        vec![values.join(",")]
                    }
                }
                (_, DeValue::Boolean(_)) | (_, DeValue::Array(_)) | (_, DeValue::Table(_)) => {
                    return Err(ConfigError(format!(
                        "{place}: {key_name} takes {}",
                        if shape == Shape::Many {
                            "a list of values, or one value"
                        } else if shape == Shape::Commas {
                            "a list of whole numbers, or a string such as \"80,90\""
                        } else {
                            "one value (a string or a number)"
                        }
                    )));
                }
                (_, v) => vec![scalar(v).ok_or_else(|| {
                    ConfigError(format!("{place}: {key_name} takes a string or a number"))
                })?],
            };
            config.set(
                section_name,
                Setting {
                    key: key_name.to_string(),
                    values,
                    place,
                },
            );
        }
    }
    Ok(())
}

/// The `--config` files named on a command line (`--config F` and
/// `--config=F`), in order.
pub fn config_files(args: &[OsString]) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        let Some(text) = arg.to_str() else { continue };
        if text == "--" {
            break;
        }
        if text == "--config" {
            if let Some(value) = iter.next() {
                files.push(PathBuf::from(value));
            }
        } else if let Some(value) = text.strip_prefix("--config=") {
            files.push(PathBuf::from(value));
        }
    }
    files
}

/// The command line with the files' settings put in as flags right after
/// the command's name, leaving out every key whose flag the command line
/// gives itself (the command line wins). Only `spm` and `host` read files.
pub fn apply(args: Vec<OsString>, config: &Config) -> Vec<OsString> {
    // The command is the first word that is not a global flag or its
    // value.
    let mut at = None;
    let mut i = 1;
    while let Some(arg) = args.get(i) {
        if arg == "--log-format" {
            i += 2;
            continue;
        }
        if !arg.to_string_lossy().starts_with('-') {
            at = Some(i);
            break;
        }
        i += 1;
    }
    let Some(at) = at.filter(|&i| DAEMON_SECTIONS.iter().any(|s| args[i] == *s)) else {
        return args;
    };
    let section = args[at].to_string_lossy().into_owned();
    let given = |key: &str| {
        let flag = format!("--{key}");
        let with_value = format!("--{key}=");
        args[at + 1..]
            .iter()
            .take_while(|a| *a != "--")
            .filter_map(|a| a.to_str())
            .any(|a| a == flag || a.starts_with(&with_value))
    };
    let mut out: Vec<OsString> = args[..=at].to_vec();
    for setting in config.section(&section) {
        if given(&setting.key) {
            continue;
        }
        if setting.values.is_empty() {
            out.push(format!("--{}", setting.key).into());
        }
        for value in &setting.values {
            out.push(format!("--{}={value}", setting.key).into());
        }
    }
    out.extend(args[at + 1..].iter().cloned());
    out
}

/// The file and line of the setting a command-line error is about, when
/// the value came from a file.
pub fn place_of(err: &clap::Error, config: &Config) -> Option<String> {
    let arg = err.get(clap::error::ContextKind::InvalidArg)?.to_string();
    let key = arg.strip_prefix("--")?.split([' ', '=']).next()?;
    config
        .sections
        .iter()
        .flat_map(|(_, settings)| settings)
        .find(|s| s.key == key)
        .map(|s| s.place.clone())
}

/// Reads `files` in order.
pub fn read_files(files: &[PathBuf]) -> Result<Config, ConfigError> {
    let mut config = Config::default();
    for file in files {
        read_file(file, &mut config)?;
    }
    Ok(config)
}

/// The flags a section's settings stand for, as `config check` shows them.
pub fn render_flags(settings: &[Setting]) -> String {
    let mut words = Vec::new();
    for s in settings {
        if s.values.is_empty() {
            words.push(format!("--{}", s.key));
        }
        for v in &s.values {
            let quoted = if v.is_empty() || v.contains(|c: char| c.is_whitespace() || c == '\'') {
                format!("'{}'", v.replace('\'', "'\\''"))
            } else {
                v.clone()
            };
            words.push(format!("--{} {quoted}", s.key));
        }
    }
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Config, ConfigError> {
        let mut c = Config::default();
        read_str("test.toml", text, &mut c).map(|()| c)
    }

    #[test]
    fn keys_become_flags_and_later_files_win() {
        let mut c = Config::default();
        read_str(
            "a.toml",
            "[log]\nlevel = \"info\"\n[spm]\ndevice = \"/dev/a\"\nspm-id = 2\n\
             accept-metadata-rollback = true\n[host]\nvolume = [\"v1\", \"v2\"]\n",
            &mut c,
        )
        .unwrap();
        read_str(
            "b.toml",
            "[spm]\ndevice = \"/dev/b\"\naccept-metadata-rollback = false\n",
            &mut c,
        )
        .unwrap();
        assert_eq!(c.log_level.as_deref(), Some("info"));
        assert_eq!(render_flags(c.section("spm")), "--spm-id 2 --device /dev/b");
        assert_eq!(render_flags(c.section("host")), "--volume v1 --volume v2");
    }

    #[test]
    fn a_comma_list_flag_takes_a_toml_list_and_an_empty_one_is_none() {
        let c = read("[spm]\npool-warn = [80, 90]\n").unwrap();
        assert_eq!(render_flags(c.section("spm")), "--pool-warn 80,90");
        let c = read("[spm]\npool-warn = \"50,95\"\n").unwrap();
        assert_eq!(render_flags(c.section("spm")), "--pool-warn 50,95");
        let c = read("[spm]\npool-warn = []\n").unwrap();
        assert_eq!(render_flags(c.section("spm")), "--pool-warn none");
        let e = read("[spm]\npool-warn = [\n  80,\n  true,\n]\n").unwrap_err();
        assert!(
            e.0.starts_with("test.toml, line 4: pool-warn takes a list of whole numbers"),
            "{e}"
        );
        let e = read("[spm]\npool-warn = true\n").unwrap_err();
        assert!(
            e.0.starts_with("test.toml, line 2: pool-warn takes a list of whole numbers"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_and_sections_are_refused_with_their_line() {
        let e = read("[spm]\ndevice = \"/dev/a\"\n\ndoorbell = \"5ms\"\n").unwrap_err();
        assert!(
            e.0.starts_with("test.toml, line 4: unknown key `doorbell` in [spm]"),
            "{e}"
        );
        assert!(e.0.contains("doorbell-interval"), "{e}");
        let e = read("\n[spn]\ndevice = \"x\"\n").unwrap_err();
        assert!(
            e.0.starts_with("test.toml, line 2: unknown section [spn]"),
            "{e}"
        );
        let e = read("[host]\nexit-when-done = \"yes\"\n").unwrap_err();
        assert!(
            e.0.starts_with("test.toml, line 2: exit-when-done is a switch"),
            "{e}"
        );
        let e = read("[log]\nformat = \"xml\"\n").unwrap_err();
        assert!(e.0.starts_with("test.toml, line 2:"), "{e}");
        let e = read("[spm]\ndevice = \n").unwrap_err();
        assert!(e.0.starts_with("test.toml, line 2:"), "{e}");
        let e = read("device = \"x\"\n").unwrap_err();
        assert!(
            e.0.starts_with("test.toml, line 1: `device` is not a section"),
            "{e}"
        );
        // Global flags are set in [log], and --config is not a key.
        assert!(read("[spm]\nverbose = 1\n").is_err());
        assert!(read("[spm]\nconfig = \"x\"\n").is_err());
    }

    #[test]
    fn flags_on_the_command_line_win_over_the_files() {
        let c = read("[host]\ndevice = \"/dev/a\"\nhost-id = 3\nvolume = [\"v1\"]\n").unwrap();
        let args: Vec<OsString> = ["spmbox", "-v", "host", "--volume", "v2", "--host-id=4"]
            .iter()
            .map(OsString::from)
            .collect();
        let out: Vec<String> = apply(args, &c)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            out,
            [
                "spmbox",
                "-v",
                "host",
                "--device=/dev/a",
                "--volume",
                "v2",
                "--host-id=4"
            ]
        );
        // Other commands read no file, even with a value that is a
        // command's name.
        for argv in [
            &["spmbox", "status"][..],
            &["spmbox", "pool", "create", "--device", "host"][..],
            &[
                "spmbox",
                "--log-format",
                "json",
                "status",
                "--device",
                "host",
            ][..],
        ] {
            let args: Vec<OsString> = argv.iter().map(OsString::from).collect();
            assert_eq!(apply(args.clone(), &c), args);
        }
        let args: Vec<OsString> = ["spmbox", "--log-format", "json", "host"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(apply(args, &c).len(), 7);
    }

    #[test]
    fn config_files_are_found_in_both_spellings() {
        let args: Vec<OsString> = [
            "spmbox",
            "spm",
            "--config",
            "a",
            "--config=b",
            "--",
            "--config",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        assert_eq!(
            config_files(&args),
            [PathBuf::from("a"), PathBuf::from("b")]
        );
    }
}
