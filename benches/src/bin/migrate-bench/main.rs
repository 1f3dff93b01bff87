//! `migrate-bench`: the macro benchmark. End-to-end migrations between two
//! `migrate-cli` processes over a matrix of guest sizes, page mixes and
//! dirty rates per transport, the link's ceilings measured in the same run
//! (`iperf3`, `ib_write_bw`, `ib_send_bw`, memcpy), then a markdown table and
//! a PNG plot. `scripts/bench.sh` runs it on the host and in the SoftRoCE VM;
//! BENCHMARKS.md says how to read the results.
//!
//! - `migrate-bench run --site NAME... --out RAW.json`: measure; one raw file
//!   per machine (the host, the VM).
//! - `migrate-bench micro --criterion DIR --machine host|vm --out FILE`:
//!   collect criterion's micro-benchmark estimates.
//! - `migrate-bench qemu --out DIR/raw/peer/qemu.json`: QEMU's migration
//!   and ours on the same image, side by side (see [`qemu`]).
//! - `migrate-bench boot-sector --out DIR/raw/peer/boot-sector.json`: QEMU
//!   and mini-vmm migrating the same running boot sector (see
//!   [`boot_sector`]).
//! - `migrate-bench postcopy --machine host|vm`: a guest that out-dirties
//!   the link, by pre-copy and by post-copy (see [`postcopy`]).
//! - `migrate-bench protect --machine host|vm`: fault tolerance by
//!   continuous mirroring (see [`protect`]).
//! - `migrate-bench fabric --machine host|vm`: a migration sharing a
//!   shaped link with an IP flow, classed by its marks (see [`fabric`]).
//! - `migrate-bench report --results DIR`: read `DIR/raw/*.json` and
//!   `DIR/raw/micro/*.json`, write `DIR/results.md` and `DIR/results.png`,
//!   and, with `--prose BENCHMARKS.md`, the figures it quotes (see
//!   [`prose`]); `--check` writes nothing and fails where either differs
//!   from the raws.

#![forbid(unsafe_code)]

mod boot_sector;
mod ceiling;
mod cell;
mod fabric;
mod floor;
mod micro;
mod netns;
mod peer;
mod plan;
mod plot;
mod postcopy;
mod prose;
mod protect;
mod protect_cpu;
mod qemu;
mod qemu_report;
mod run;
mod scale;
mod spread;
mod summary;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "migrate-bench", about = "Macro benchmark of live migration")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure: migrations and ceilings at the given sites.
    Run(run::RunArgs),
    /// Collect criterion's results (micro benchmarks) into one JSON file.
    Micro {
        /// Criterion's folder (target/criterion, or $CRITERION_HOME).
        #[arg(long, default_value = "target/criterion")]
        criterion: PathBuf,
        /// `host` or `vm`.
        #[arg(long)]
        machine: String,
        /// Write here (the report reads results/raw/micro/*.json).
        #[arg(long)]
        out: PathBuf,
    },
    /// QEMU's migration beside ours, on the same image, in one run.
    Qemu(qemu::QemuArgs),
    /// QEMU and mini-vmm live-migrating the same running boot sector.
    BootSector(boot_sector::BootArgs),
    /// Pre-copy and post-copy of a guest that out-dirties the link.
    Postcopy(postcopy::PostcopyArgs),
    /// Fault tolerance: epoch pause, work rate, output delay, failover.
    Protect(protect::ProtectArgs),
    /// A migration and an IP flow sharing one shaped link, by class.
    Fabric(fabric::FabricArgs),
    /// Ours at 1 GiB and at 8 GiB: time, CPU and overhead per GiB.
    Scale(scale::ScaleArgs),
    /// The floor's sender (run by `qemu`; see the floor module).
    #[command(hide = true)]
    FloorSend(floor::FloorArgs),
    /// The floor's receiver (run by `qemu`).
    #[command(hide = true)]
    FloorRecv(floor::FloorArgs),
    /// Tables and plot from the raw results.
    Report {
        /// Results folder: reads raw/*.json, writes results.md and results.png.
        #[arg(long, default_value = "benches/results")]
        results: PathBuf,
        /// The prose that quotes the report's figures (marked
        /// `<!--fig NAME-->…<!--/fig-->`, e.g. BENCHMARKS.md for the
        /// committed results): its figures are written (checked) too.
        #[arg(long)]
        prose: Option<PathBuf>,
        /// Write nothing; fail if results.md or a quoted figure differs
        /// from what the raw results give (the test command's check).
        #[arg(long)]
        check: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(a) => {
            let raw = run::run(&a)?;
            write_stamped(&a.out, &raw)?;
            eprintln!("migrate-bench: wrote {}", a.out.display());
            let failed = raw.runs.iter().filter(|r| r.error.is_some()).count();
            if failed > 0 {
                anyhow::bail!(
                    "{failed} of {} runs failed (see {})",
                    raw.runs.len(),
                    a.out.display()
                );
            }
            Ok(())
        }
        Command::Micro {
            criterion,
            machine,
            out,
        } => {
            let set = micro::collect(&criterion, &machine, run::date())?;
            write_stamped(&out, &set)?;
            eprintln!(
                "migrate-bench: {} criterion results into {}",
                set.results.len(),
                out.display()
            );
            Ok(())
        }
        Command::FloorSend(a) => floor::send(&a),
        Command::FloorRecv(a) => floor::recv(&a),
        Command::Qemu(a) => {
            let raw = qemu::run(&a)?;
            let failed = raw.runs.iter().filter(|r| r.error.is_some()).count();
            write_raw(&a.out, &raw, failed, raw.runs.len(), "QEMU-peer")
        }
        Command::BootSector(a) => {
            let raw = boot_sector::run(&a)?;
            let failed = raw.runs.iter().filter(|r| r.error.is_some()).count();
            write_raw(&a.out, &raw, failed, raw.runs.len(), "boot-sector")
        }
        Command::Postcopy(a) => {
            let raw = postcopy::run(&a)?;
            let failed = raw
                .runs
                .iter()
                .filter(|r| r.error.is_some() || !r.consistent)
                .count();
            let out = postcopy::raw_path(&a.results, &a.machine);
            write_raw(&out, &raw, failed, raw.runs.len(), "post-copy")
        }
        Command::Protect(a) => {
            let raw = protect::run(&a)?;
            let failed = raw
                .runs
                .iter()
                .filter(|r| r.error.is_some() || !r.consistent)
                .count()
                + raw.cpu.iter().filter(|r| r.error.is_some()).count();
            let out = protect::raw_path(&a.results, &a.machine);
            write_raw(
                &out,
                &raw,
                failed,
                raw.runs.len() + raw.cpu.len(),
                "protect",
            )
        }
        Command::Fabric(a) => {
            let raw = fabric::run(&a)?;
            let failed = raw.runs.iter().filter(|r| r.error.is_some()).count();
            let out = fabric::raw_path(&a.results, &a.machine);
            write_raw(&out, &raw, failed, raw.runs.len(), "fabric")
        }
        Command::Scale(a) => {
            let raw = scale::run(&a)?;
            let failed = raw.runs.iter().filter(|r| r.error.is_some()).count();
            write_raw(&a.out, &raw, failed, raw.runs.len(), "scale")
        }
        Command::Report {
            results,
            prose,
            check,
        } => summary::report(&results, prose.as_deref(), check),
    }
}

/// Write one comparison's raw results to `out`; fail when any of its `runs`
/// failed (`failed` of them).
fn write_raw(
    out: &std::path::Path,
    raw: &impl serde::Serialize,
    failed: usize,
    runs: usize,
    what: &str,
) -> Result<()> {
    write_stamped(out, raw)?;
    eprintln!("migrate-bench: wrote {}", out.display());
    if failed > 0 {
        anyhow::bail!("{failed} of {runs} {what} runs failed");
    }
    Ok(())
}

/// Write a raw results file, stamped with the code that measured it: the
/// commit (`commit`) and whether the tree differed from it outside the
/// results folder (`tree_dirty`; null where git could not say).
fn write_stamped(out: &std::path::Path, raw: &impl serde::Serialize) -> Result<()> {
    let mut v = serde_json::to_value(raw)?;
    if let Some(m) = v.as_object_mut() {
        let (commit, dirty) = provenance();
        m.insert("commit".into(), commit.into());
        m.insert("tree_dirty".into(), dirty.into());
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    std::fs::write(out, serde_json::to_string_pretty(&v)? + "\n")
        .with_context(|| format!("writing {}", out.display()))
}

/// The checkout's commit, and whether its tracked files differ from it
/// (the results folder aside: a benchmark writes there as it goes).
fn provenance() -> (String, Option<bool>) {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = git(&[
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        ":(exclude)benches/results",
    ])
    .map(|o| !o.is_empty());
    (commit, dirty)
}

/// The raw results at `rel` in a results folder, when they were measured.
pub fn load_raw<T: serde::de::DeserializeOwned>(
    results: &std::path::Path,
    rel: &str,
) -> Result<Option<T>> {
    let path = results.join(rel);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)?;
    Ok(Some(
        serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?,
    ))
}
