//! Criterion's results, collected: `migrate-bench micro` reads a criterion
//! folder (`target/criterion`, or `CRITERION_HOME`) into one small JSON file
//! per machine, and the report turns those into the micro-benchmark table.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One criterion benchmark's estimate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Micro {
    /// `group/function/parameter`.
    pub id: String,
    /// Median time per iteration, ns, and its 95 % confidence interval.
    pub median_ns: f64,
    pub lower_ns: f64,
    pub upper_ns: f64,
    /// Bytes or elements per iteration, when the benchmark declares them.
    pub bytes: Option<u64>,
    pub elements: Option<u64>,
}

/// The micro results of one machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MicroSet {
    /// `host` or `vm`.
    pub machine: String,
    pub date: String,
    pub results: Vec<Micro>,
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n == "new") && p.join("benchmark.json").exists() {
                out.push(p);
            } else {
                walk(&p, out);
            }
        }
    }
}

pub fn collect(criterion: &Path, machine: &str, date: String) -> Result<MicroSet> {
    let mut dirs = Vec::new();
    walk(criterion, &mut dirs);
    dirs.sort();
    let mut results = Vec::new();
    for d in dirs {
        let read = |f: &str| -> Result<Value> {
            let p = d.join(f);
            serde_json::from_str(&std::fs::read_to_string(&p)?)
                .with_context(|| format!("reading {}", p.display()))
        };
        let (b, e) = (read("benchmark.json")?, read("estimates.json")?);
        let m = &e["median"];
        results.push(Micro {
            id: b["full_id"].as_str().unwrap_or("?").to_string(),
            median_ns: m["point_estimate"].as_f64().unwrap_or(f64::NAN),
            lower_ns: m["confidence_interval"]["lower_bound"]
                .as_f64()
                .unwrap_or(f64::NAN),
            upper_ns: m["confidence_interval"]["upper_bound"]
                .as_f64()
                .unwrap_or(f64::NAN),
            bytes: b["throughput"]["Bytes"].as_u64(),
            elements: b["throughput"]["Elements"].as_u64(),
        });
    }
    Ok(MicroSet {
        machine: machine.into(),
        date,
        results,
    })
}

/// `DIR/raw/micro/*.json`, if any.
pub fn load(results: &Path) -> Result<Vec<MicroSet>> {
    let dir = results.join("raw").join("micro");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Ok(Vec::new());
    };
    let mut files: Vec<_> = rd.flatten().map(|e| e.path()).collect();
    files.sort();
    files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            serde_json::from_str(&std::fs::read_to_string(p)?)
                .with_context(|| format!("reading {}", p.display()))
        })
        .collect()
}

fn time(ns: f64) -> String {
    match ns {
        _ if ns >= 1e9 => format!("{:.2} s", ns / 1e9),
        _ if ns >= 1e6 => format!("{:.2} ms", ns / 1e6),
        _ if ns >= 1e3 => format!("{:.2} µs", ns / 1e3),
        _ => format!("{ns:.1} ns"),
    }
}

/// The micro-benchmark table.
pub fn markdown(sets: &[MicroSet]) -> String {
    let mut s = String::from(
        "| machine | benchmark | median time (95 % CI) | throughput |\n|---|---|---|---|\n",
    );
    for set in sets {
        for r in &set.results {
            let rate = match (r.bytes, r.elements) {
                (Some(b), _) => format!("{:.2} GiB/s", b as f64 / r.median_ns / 1.073_741_824),
                (_, Some(n)) => format!("{:.3} M/s", n as f64 / r.median_ns * 1e3),
                _ => String::new(),
            };
            s += &format!(
                "| {} | `{}` | {} ({}–{}) | {} |\n",
                set.machine,
                r.id,
                time(r.median_ns),
                time(r.lower_ns),
                time(r.upper_ns),
                rate
            );
        }
    }
    s
}
