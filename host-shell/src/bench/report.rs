//! The report: latency distributions, JSON rows, tables and the SVG plot.

use serde_json::{Value, json};

use crate::stats::{percentile, round};
use crate::units::Bytes;

/// A latency distribution, milliseconds.
#[derive(Debug, Clone, Default)]
pub(super) struct Dist {
    pub(super) samples: Vec<f64>,
}

impl Dist {
    pub(super) fn summary(&self) -> Value {
        let mut s = self.samples.clone();
        s.sort_by(f64::total_cmp);
        json!({
            "samples": s.len(),
            "p50_ms": round(percentile(&s, 50.0), 3),
            "p99_ms": round(percentile(&s, 99.0), 3),
            "max_ms": round(s.last().copied().unwrap_or(0.0), 3),
        })
    }
}

pub(super) fn merge(into: &mut Value, from: Value) {
    if let (Some(a), Some(b)) = (into.as_object_mut(), from.as_object()) {
        for (k, v) in b {
            a.insert(k.clone(), v.clone());
        }
    }
}

/// A cumulative distribution plot of the latency sets, as SVG.
pub(super) fn svg(sets: &[(String, Vec<f64>)]) -> String {
    let (w, h, left, bottom) = (720.0, 420.0, 60.0, 40.0);
    let (lo, hi) = (0.1f64.log10(), 10_000f64.log10());
    let x = |ms: f64| left + (ms.max(0.1).log10() - lo) / (hi - lo) * (w - left - 20.0);
    let y = |q: f64| (h - bottom) - q * (h - bottom - 20.0);
    let colors = [
        "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666",
    ];
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for ms in [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0] {
        out += &format!(
            "<line x1=\"{0:.1}\" y1=\"20\" x2=\"{0:.1}\" y2=\"{1:.1}\" stroke=\"#ddd\"/><text x=\"{0:.1}\" y=\"{2:.1}\" text-anchor=\"middle\">{ms} ms</text>\n",
            x(ms),
            h - bottom,
            h - bottom + 15.0
        );
    }
    for q in [0.0, 0.5, 0.99, 1.0] {
        out += &format!(
            "<line x1=\"{left}\" y1=\"{0:.1}\" x2=\"{1:.1}\" y2=\"{0:.1}\" stroke=\"#ddd\"/><text x=\"{2:.1}\" y=\"{3:.1}\" text-anchor=\"end\">{q}</text>\n",
            y(q),
            w - 20.0,
            left - 5.0,
            y(q) + 4.0
        );
    }
    // VDSM's published ranges, for scale.
    for (k, (label, from, to)) in [
        ("VDSM round trip (events): 0.5-1.0 s", 500.0, 1000.0),
        ("VDSM whole extension: 0.77-1.39 s", 770.0, 1390.0),
    ]
    .into_iter()
    .enumerate()
    {
        out += &format!(
            "<rect x=\"{:.1}\" y=\"20\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#999\" fill-opacity=\"0.15\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#555\">{label}</text>\n",
            x(from),
            x(to) - x(from),
            h - bottom - 20.0,
            w - 25.0,
            h - bottom - 30.0 - 14.0 * k as f64
        );
    }
    for (i, (name, samples)) in sets.iter().enumerate() {
        let mut s = samples.clone();
        s.sort_by(f64::total_cmp);
        if s.is_empty() {
            continue;
        }
        let color = colors[i % colors.len()];
        let step = (s.len() / 400).max(1);
        let points: Vec<String> = s
            .iter()
            .enumerate()
            .filter(|(k, _)| k % step == 0 || *k == s.len() - 1)
            .map(|(k, ms)| format!("{:.1},{:.1}", x(*ms), y((k + 1) as f64 / s.len() as f64)))
            .collect();
        out += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{color}\">{name} ({} samples)</text>\n",
            points.join(" "),
            left + 10.0,
            35.0 + 14.0 * i as f64,
            s.len()
        );
    }
    out += &format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">latency (log scale); vertical: fraction of samples at or below</text>\n</svg>\n",
        w / 2.0,
        h - 5.0
    );
    out
}

/// One latency row of the table, in columns (a JSON value ignores width,
/// so each is made a string first).
fn latency_line(o: &mut String, label: &str, row: &Value) {
    use std::fmt::Write as _;
    let cell = |key: &str| row[key].to_string();
    let _ = writeln!(
        o,
        "{label:<44} {:>10} {:>10} {:>10} {:>8}",
        cell("p50_ms"),
        cell("p99_ms"),
        cell("max_ms"),
        cell("samples")
    );
}

pub(super) fn table(r: &Value) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<44} {:>10} {:>10} {:>10} {:>8}",
        "latency", "p50 ms", "p99 ms", "max ms", "samples"
    );
    if r.get("round_trip").is_some() {
        let _ = writeln!(o, "round trip (no-op backend)");
    }
    for row in r["round_trip"].as_array().into_iter().flatten() {
        let label = match row["slots"].as_u64() {
            Some(slots) => format!("  {} hosts, one host with {slots} at once", row["hosts"]),
            None => format!(
                "  {} hosts, {} sending at once",
                row["hosts"], row["senders"]
            ),
        };
        latency_line(&mut o, &label, row);
    }
    for row in r["whole_extension"].as_array().into_iter().flatten() {
        if let Some(why) = row["skipped"].as_str() {
            let _ = writeln!(
                o,
                "whole extension ({}): skipped, {why}",
                row["backend"].as_str().unwrap_or("")
            );
            continue;
        }
        let label = format!(
            "whole extension ({}, {} hosts, {} guests)",
            row["backend"].as_str().unwrap_or(""),
            row["hosts"],
            row["volumes"]
        );
        latency_line(&mut o, &label, row);
        if let Some(lvextend) = row["lvextend_ms_mean"].as_f64() {
            let _ = writeln!(
                o,
                "  lvextend itself: {lvextend} ms on average; device-mapper: {}",
                row["device_mapper"]
            );
        }
    }
    for t in r["throughput"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "throughput, {} backend, {} of {} hosts x {} volumes: {} extensions/s ({} in {} s; SPM {} % of a core, {} per SPM CPU second)",
            t["backend"].as_str().unwrap_or(""),
            t["sending_hosts"],
            t["hosts"],
            t["volumes_per_host"],
            t["extensions_per_s"],
            t["extensions"],
            t["seconds"],
            t["spm_cpu_percent"],
            t["extensions_per_spm_cpu_s"]
        );
    }
    for row in r["idle"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "idle SPM, {} hosts: {} % of a core, {}/s read with full scans ({}/s between them)",
            row["hosts"],
            row["cpu_percent"],
            Bytes(row["read_bytes_per_s"].as_f64().unwrap_or(0.0) as u64),
            Bytes(row["measured_read_bytes_per_s"].as_f64().unwrap_or(0.0) as u64)
        );
    }
    if let Some(w) = r.get("write_rate") {
        let _ = writeln!(
            o,
            "guest write rate, {} chunks: {} MiB/s, {} pauses, {} extensions (device {} MiB/s; making the data {} MiB/s)",
            Bytes(w["chunk_size"].as_u64().unwrap_or(0)),
            w["mib_per_s"],
            w["pauses"],
            w["extensions"],
            w["device_mib_per_s"],
            w["fill_mib_per_s"]
        );
    }
    for row in r["scan"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "core scan of a 2000-host mailbox, {} busy: {} ms ({} scans/s, {} MiB/s)",
            row["busy"].as_str().unwrap_or(""),
            row["scan_p50_ms"],
            row["scans_per_s"],
            row["mib_per_s"]
        );
    }
    if let Some(m) = r.get("memory") {
        let _ = writeln!(
            o,
            "engine state: Spm<1024> {} B, Host<64> {} B, DefaultPool {} B",
            m["spm_1024_bytes"], m["host_64_bytes"], m["default_pool_bytes"]
        );
    }
    if let Some(v) = r.get("vm") {
        if let Some(why) = v["skipped"].as_str() {
            let _ = writeln!(o, "VMs: skipped, {why}");
        } else {
            let t = &v["threshold_to_refresh"];
            latency_line(&mut o, "VM: write threshold event to refreshed", t);
            let _ = writeln!(
                o,
                "{:<44} {:>10} {:>10} {:>10}",
                "  VDSM (min / avg / max)", 770, 1150, 1390
            );
            let w = &v["write_rate"];
            let _ = writeln!(
                o,
                "VM write rate (median of {}): thin volume {} MiB/s ({} ENOSPC pauses, {} \
                 extensions), preallocated raw file {} MiB/s: ratio {}; a qcow2 file {} MiB/s; \
                 rounds: thin {}, raw {}, qcow2 file {}",
                w["rounds"],
                w["thin_mib_per_s"],
                w["enospc_pauses"],
                w["extensions"],
                w["raw_mib_per_s"],
                w["ratio"],
                w["qcow2_file_mib_per_s"],
                w["thin_rounds_mib_per_s"],
                w["raw_rounds_mib_per_s"],
                w["qcow2_file_rounds_mib_per_s"]
            );
            let l = &v["lun_added_to_resumed"];
            let _ = writeln!(
                o,
                "VM: LUN added to all {} paused VMs running: {} ms",
                l["vms"], l["all_running_ms"]
            );
        }
    }
    let _ = writeln!(o, "bench took {} s", r["seconds"]);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plot_is_svg_with_one_line_per_set() {
        let text = svg(&[("a".into(), vec![1.0, 2.0, 30.0]), ("b".into(), vec![0.5])]);
        assert!(text.starts_with("<svg"));
        assert_eq!(text.matches("<polyline").count(), 2);
        assert!(text.trim_end().ends_with("</svg>"));
    }
}
