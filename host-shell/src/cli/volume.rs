//! `spmbox volume list`, `volume delete` and `volume reduce`: a volume's
//! life after it was created (docs/operations.md, "The life of a volume").

use std::io::Write as _;
use std::process::ExitCode;

use serde_json::{Value, json};

use crate::cli::admin::{self, Status};
use crate::cli::args::{VolumeDeleteArgs, VolumeListArgs, VolumeReduceArgs};
use crate::cli::commands::{
    BackendArgs, CommandError, EXIT_OK, open_spm_backend, parse_uuid, print_json,
};
use crate::daemon::release;
use crate::io::device::Access;
use crate::io::mailbox::Mailbox;
use crate::io::written::Written;
use crate::units::Bytes;

/// One volume as `volume list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VolumeLine {
    /// The volume.
    pub id: String,
    /// The size the guest sees.
    pub virtual_size: u64,
    /// The bytes it owns now (whole extents).
    pub physical_size: u64,
    /// The largest size it may grow to.
    pub limit: u64,
    /// What the guest has written, as a running host on this machine
    /// reports it (null: no such report).
    pub allocated: Option<u64>,
    /// Its runs of extents, in order.
    pub segments: Vec<crate::backend::SegmentReport>,
    /// Hosts whose hold records list it, with their state as `status`
    /// tells it (`alive`, `silent`, `released`, `unknown`).
    pub held_by: Vec<Value>,
    /// Requests for it without a final answer: in flight, or waiting for
    /// space (parked).
    pub requests: Vec<Value>,
    /// Whether the SPM has parked a request for it (waiting for space).
    pub parked: bool,
    /// Whether the pool names it as being moved to another LUN (`pool
    /// remove-lun`): no host opens it until the move is committed.
    pub moving: bool,
}

/// `spmbox volume list`.
pub fn list(args: &VolumeListArgs) -> Result<ExitCode, CommandError> {
    let device = args.on.device.as_path();
    let mut s = admin::status(device, args.on.control.as_deref(), None)?;
    if s.pool.is_none()
        && let BackendArgs::Lvm { .. } = args.on.lvm.to_backend()
    {
        // No SPM answered: ask lvm2 itself.
        let backend = open_spm_backend(device, &args.on.lvm.to_backend())?;
        s.pool = Some(backend.report());
        s.pool_error = None;
    }
    if let (BackendArgs::Lvm { vg, pvs }, Some(pool)) = (args.on.lvm.to_backend(), s.pool.as_mut())
    {
        lvm_segments(&vg, &pvs, pool)?;
    }
    let lines = lines(device, &s)?;
    if args.on.json {
        let pool = s.pool.as_ref();
        print_json(&json!({
            "domain": s.domain,
            "pool_source": s.pool_source,
            "extent_size": pool.map(|p| p.extent_size),
            "total_extents": pool.map(|p| p.total_extents),
            "free_extents": pool.map(|p| p.free_extents),
            "released_extents": pool.map(|p| p.released_extents),
            "volumes": lines,
            "pool_error": s.pool_error,
        }))?;
        return Ok(ExitCode::from(EXIT_OK));
    }
    let mut out = std::io::stdout().lock();
    let Some(pool) = &s.pool else {
        return Err(CommandError::Backend(crate::backend::BackendError::new(
            format!(
                "cannot list the volumes: {}",
                s.pool_error.as_deref().unwrap_or("no pool found")
            ),
        )));
    };
    writeln!(
        out,
        "{} volumes; extents of {}: {} free, {} released and waiting for hosts to acknowledge \
         (pool from {})",
        lines.len(),
        Bytes(pool.extent_size),
        pool.free_extents,
        pool.released_extents,
        s.pool_source
    )?;
    for l in &lines {
        writeln!(
            out,
            "{}: virtual {}, physical {}, limit {}, written {}{}",
            l.id,
            Bytes(l.virtual_size),
            Bytes(l.physical_size),
            Bytes(l.limit),
            l.allocated
                .map_or_else(|| "unknown".to_string(), |a| Bytes(a).to_string()),
            if l.moving {
                "; being moved to another LUN (hosts wait to open it)"
            } else {
                ""
            }
        )?;
        let runs: Vec<String> = l
            .segments
            .iter()
            .map(|r| {
                format!(
                    "LUN {} extents {}..{}",
                    r.lun,
                    r.first_extent,
                    r.first_extent + r.extents
                )
            })
            .collect();
        writeln!(out, "  segments ({}): {}", runs.len(), runs.join(", "))?;
        let held: Vec<String> = l
            .held_by
            .iter()
            .map(|h| {
                format!(
                    "host {} ({})",
                    h["host"],
                    h["state"].as_str().unwrap_or("?")
                )
            })
            .collect();
        writeln!(
            out,
            "  open on: {}",
            if held.is_empty() {
                "no host".to_string()
            } else {
                held.join(", ")
            }
        )?;
        for r in &l.requests {
            writeln!(
                out,
                "  request: host {} slot {} to {}: {}",
                r["host"],
                r["slot"],
                Bytes(r["target"].as_u64().unwrap_or(0)),
                r["state"].as_str().unwrap_or("?")
            )?;
        }
    }
    Ok(ExitCode::from(EXIT_OK))
}

/// Fills in each volume's segments from lvm2's segment report (the lvm
/// backend's pool report has none): one run per PE range, the LUN named by
/// its PV.
fn lvm_segments(
    vg: &str,
    pvs: &[std::path::PathBuf],
    pool: &mut crate::backend::PoolReport,
) -> Result<(), CommandError> {
    let lvm = crate::backend::lvm::Lvm::new(vg, pvs)?;
    for v in &pool.volumes {
        let runs = lvm
            .segments(&v.id.to_string())?
            .into_iter()
            .flat_map(|seg| seg.ranges)
            .map(|r| crate::backend::SegmentReport {
                lun: r.pv.display().to_string(),
                first_extent: r.first,
                extents: r.count,
            })
            .collect();
        pool.segments.insert(v.id.to_string(), runs);
    }
    Ok(())
}

/// The lines of `volume list` from a status and the hosts' hold records.
fn lines(device: &std::path::Path, s: &Status) -> Result<Vec<VolumeLine>, CommandError> {
    let Some(pool) = &s.pool else {
        return Ok(Vec::new());
    };
    let seen = release::read_mailbox_hosts(&Mailbox::open(device, Access::ReadOnly)?)?;
    let mut out = Vec::new();
    for v in &pool.volumes {
        let id = v.id.to_string();
        let held_by = seen
            .iter()
            .filter(|h| h.holds.contains(&v.id))
            .map(|h| {
                let state = s
                    .hosts
                    .iter()
                    .find(|x| x.host == h.host)
                    .map_or("unknown", |x| x.state);
                json!({"host": h.host, "state": state})
            })
            .collect();
        let requests = s
            .requests
            .iter()
            .filter(|r| r.volume == id)
            .map(|r| {
                json!({"host": r.host.get(), "slot": r.slot.get(), "target": r.target,
                       "paused": r.paused, "state": r.state})
            })
            .collect();
        let allocated = s
            .host_reports
            .iter()
            .filter_map(|h| {
                h["volumes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|x| x["id"].as_str() == Some(id.as_str()))
                    .and_then(|x| x["allocation"].as_u64())
            })
            .max();
        out.push(VolumeLine {
            segments: pool.segments.get(&id).cloned().unwrap_or_default(),
            parked: pool.parked.iter().any(|(p, _)| *p == id),
            moving: pool.moving.as_deref() == Some(id.as_str()),
            id,
            virtual_size: v.virtual_size,
            physical_size: v.size,
            limit: v.limit,
            allocated,
            held_by,
            requests,
        });
    }
    Ok(out)
}

/// What a delete or reduce answered, as text.
fn released_text(answer: &Value, extent_size: Option<u64>) -> String {
    let extents = answer["released"]["extents"].as_u64().unwrap_or(0);
    let release = answer["released"]["release"].as_u64().unwrap_or(0);
    let bytes = extent_size.map_or_else(String::new, |e| format!(" ({})", Bytes(extents * e)));
    format!(
        "{extents} extents{bytes} released (release {release}); other volumes get them once \
         every live host has acknowledged the release"
    )
}

/// `spmbox volume delete`.
pub fn delete(args: &VolumeDeleteArgs) -> Result<ExitCode, CommandError> {
    let device = args.on.device.as_path();
    let id = parse_uuid("UUID", &args.id)?;
    let backend = args.on.lvm.to_backend();
    let request = json!({"op": "delete_volume", "id": id.to_string()});
    let answer = admin::change_pool(device, args.on.control.as_deref(), &request, &|| {
        open_spm_backend(device, &backend)
    })?;
    if args.on.json {
        print_json(&json!({"volume": id.to_string(), "deleted": true,
                           "released": answer["released"]}))?;
    } else {
        writeln!(
            std::io::stdout().lock(),
            "deleted volume {id}: {}",
            released_text(&answer, answer["extent_size"].as_u64())
        )?;
    }
    Ok(ExitCode::from(EXIT_OK))
}

/// What the guest of volume `id` wrote, read from the volume, and what the
/// content is (`qcow2`, `test_data`); refused when it is neither.
fn read_written(
    device: &std::path::Path,
    id: spmbox_core::wire::Uuid,
    backend: &BackendArgs,
    search: &[std::path::PathBuf],
) -> Result<(u64, &'static str), CommandError> {
    let mut maps: Box<dyn crate::backend::VolumeMaps> = match backend {
        BackendArgs::Builtin => {
            let search = if search.is_empty() {
                let mailbox = Mailbox::open(device, Access::ReadOnly)?;
                crate::backend::builtin::default_search(device, mailbox.device().kind())
            } else {
                search.to_vec()
            };
            Box::new(crate::backend::builtin::BuiltinMaps::open(device, search)?)
        }
        BackendArgs::Lvm { vg, pvs } => crate::backend::lvm_glue::maps(vg, pvs)?,
    };
    let map = maps.refresh(id)?;
    let mut devices = crate::daemon::guest::Devices::new();
    let cannot = |why: String| {
        CommandError::Usage(format!(
            "cannot tell what the guest of volume {id} wrote: {why}; give --to SIZE (at least \
             what it wrote). Nothing was changed"
        ))
    };
    match crate::io::written::written(id, &map, &mut devices).map_err(cannot)? {
        Written::Qcow2(end) => Ok((end, "qcow2")),
        Written::TestData(n) => Ok((n, "test_data")),
        Written::Unknown => Err(cannot(
            "its data is neither a qcow2 image nor `spmbox host`'s test data".to_string(),
        )),
    }
}

/// `spmbox volume reduce`.
pub fn reduce(args: &VolumeReduceArgs) -> Result<ExitCode, CommandError> {
    let device = args.on.device.as_path();
    let id = parse_uuid("UUID", &args.id)?;
    let backend = args.on.lvm.to_backend();
    let (request, found) = match args.to {
        Some(to) if to == 0 || to % 512 != 0 => {
            return Err(CommandError::Usage(format!(
                "--to {to} must be a nonzero multiple of 512 bytes"
            )));
        }
        Some(to) => (
            json!({"op": "reduce_volume", "id": id.to_string(), "size": to}),
            None,
        ),
        None => {
            let (written, content) = read_written(device, id, &backend, &args.lun_search)?;
            (
                json!({"op": "reduce_volume", "id": id.to_string(),
                       "size": written.max(1).next_multiple_of(512), "margin_extents": 1}),
                Some((written, content)),
            )
        }
    };
    let answer = admin::change_pool(device, args.on.control.as_deref(), &request, &|| {
        open_spm_backend(device, &backend)
    })?;
    let size = answer["volume"]["size"].as_u64().unwrap_or(0);
    if args.on.json {
        let mut out = json!({"volume": id.to_string(), "size": size,
                             "released": answer["released"]});
        if let Some((written, content)) = found {
            out["written"] = json!(written);
            out["content"] = json!(content);
        }
        print_json(&out)?;
    } else {
        let how = found.map_or_else(String::new, |(written, content)| {
            format!(
                " (its guest wrote {} of {}; one extent more is kept)",
                Bytes(written),
                if content == "qcow2" {
                    "a qcow2 image"
                } else {
                    "test data"
                }
            )
        });
        writeln!(
            std::io::stdout().lock(),
            "reduced volume {id} to {}{how}: {}",
            Bytes(size),
            released_text(&answer, answer["extent_size"].as_u64())
        )?;
    }
    Ok(ExitCode::from(EXIT_OK))
}
