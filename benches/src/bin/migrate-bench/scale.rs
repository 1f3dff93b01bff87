//! `migrate-bench scale`: ours at a base size (1 GiB) and at a large one
//! (8 GiB), same page mix and settings, runs interleaved: does a guest 8×
//! larger take 8× the time, CPU and no more memory overhead?
//!
//! Each size has its own image (the page mix, default 40 % zero, 30 %
//! text-like, 30 % random) in a file in /dev/shm, which the source maps
//! (`--memory-file IMAGE --no-fill --guest idle`). The destination's memory
//! is anonymous and allocated before it listens (`--memory N --prefault`),
//! so neither side's allocation is timed. The time is the source's
//! migration (`total_ms` of its report: connection to commit); the time
//! from starting the source to the destination's completion line is kept
//! beside it. The bytes are checked with `--digest` on both sides: the
//! two memories' digests must be equal.
//!
//! The large size needs its image in /dev/shm and the destination's memory
//! besides: when the machine has not that much available, the run records
//! why it skipped, prints it, and the report shows it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cell::Spread;
use crate::qemu_report::{BarPanel, bars};

/// `migrate-bench scale`.
#[derive(Debug, Clone, clap::Args)]
pub struct ScaleArgs {
    /// The migrate-cli binary.
    #[arg(long, default_value = "target/release/migrate-cli")]
    pub cli: PathBuf,
    /// The base guest size, MiB.
    #[arg(long, default_value_t = 1024)]
    pub base_mib: u64,
    /// The large guest size, MiB.
    #[arg(long, default_value_t = 8192)]
    pub large_mib: u64,
    /// Page mix of the images, `zero:text:random` weights.
    #[arg(long, default_value = "40:30:30")]
    pub mix: String,
    /// Data streams.
    #[arg(long, default_value_t = 2)]
    pub streams: u16,
    /// Runs per size (medians, min–max).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Where the images go (memory-backed).
    #[arg(long, default_value = "/dev/shm")]
    pub dir: PathBuf,
    /// Write the raw results here (JSON).
    #[arg(long)]
    pub out: PathBuf,
    /// The command line to record with the results.
    #[arg(long, default_value = "")]
    pub command_line: String,
}

/// Everything one `migrate-bench scale` measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ScaleRaw {
    pub date: String,
    pub command: String,
    pub kernel: String,
    pub mix: String,
    pub streams: u16,
    pub base_mib: u64,
    pub large_mib: u64,
    /// Why nothing was measured, if so.
    pub skipped: Option<String>,
    pub runs: Vec<ScaleRun>,
}

/// One migration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ScaleRun {
    pub size_mib: u64,
    pub rep: usize,
    /// The source's migration time (its report's `total_ms`), ms.
    pub ms: f64,
    /// From starting the source to the destination's completion line, ms.
    pub end_to_end_ms: f64,
    /// CPU seconds of the source and the destination process.
    pub src_cpu_s: f64,
    pub dst_cpu_s: f64,
    /// Memory beyond the guest's, each side (their reports'
    /// `overhead_bytes`).
    pub src_overhead_bytes: u64,
    pub dst_overhead_bytes: u64,
    /// Both sides' memory digests are equal.
    pub verified: bool,
    pub error: Option<String>,
}

pub fn run(a: &ScaleArgs) -> Result<ScaleRaw> {
    if !a.cli.exists() {
        bail!("{} not found: build it first", a.cli.display());
    }
    let mix = fixtures::PageMix::parse(&a.mix).context("--mix: e.g. 40:30:30")?;
    let mut raw = ScaleRaw {
        date: crate::run::date(),
        command: a.command_line.clone(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .into(),
        mix: a.mix.clone(),
        streams: a.streams,
        base_mib: a.base_mib,
        large_mib: a.large_mib,
        ..Default::default()
    };
    // Both images, the destination's memory and 2 GiB to spare.
    let need = ((a.base_mib + 2 * a.large_mib) << 20) + (2 << 30);
    let (avail, shm) = (mem_available()?, shm_available(&a.dir)?);
    if avail < need || shm < (a.base_mib + a.large_mib) << 20 {
        let why = format!(
            "needs {} MiB of memory ({} available) and {} MiB in {} ({} free)",
            need >> 20,
            avail >> 20,
            a.base_mib + a.large_mib,
            a.dir.display(),
            shm >> 20
        );
        eprintln!("scale: SKIPPED: {why}");
        raw.skipped = Some(why);
        return Ok(raw);
    }
    let tag = std::process::id();
    let image = |mib: u64| a.dir.join(format!("migrate-bench-scale-{mib}.{tag}"));
    let result = (|| -> Result<()> {
        for mib in [a.base_mib, a.large_mib] {
            crate::qemu::write_image(&image(mib), mib << 20, mix)?;
        }
        // Interleaved, so that drifts of this shared machine hit both.
        for rep in 0..a.repeat.max(1) {
            for mib in [a.base_mib, a.large_mib] {
                let mut r = ScaleRun {
                    size_mib: mib,
                    rep,
                    ..Default::default()
                };
                if let Err(e) = one(a, &image(mib), &mut r) {
                    r.error = Some(format!("{e:#}"));
                }
                match &r.error {
                    None => eprintln!(
                        "scale {mib} MiB #{rep}: {:.0} ms ({:.0} ms/GiB), CPU {:.2} s + {:.2} s, \
                         overhead {} + {} KiB, digests equal",
                        r.ms,
                        r.ms * 1024.0 / mib as f64,
                        r.src_cpu_s,
                        r.dst_cpu_s,
                        r.src_overhead_bytes >> 10,
                        r.dst_overhead_bytes >> 10
                    ),
                    Some(e) => eprintln!("scale {mib} MiB #{rep}: FAILED: {e}"),
                }
                raw.runs.push(r);
            }
        }
        Ok(())
    })();
    for mib in [a.base_mib, a.large_mib] {
        let _ = std::fs::remove_file(image(mib));
    }
    result?;
    Ok(raw)
}

/// One migration of the image at `path`.
fn one(a: &ScaleArgs, path: &Path, r: &mut ScaleRun) -> Result<()> {
    let tmp = std::env::temp_dir().join(format!("migrate-bench-scale.{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let (sj, dj) = (tmp.join("s.json"), tmp.join("d.json"));
    let (size, streams) = (format!("{}M", r.size_mib), a.streams.to_string());
    let mut dest = Command::new(&a.cli)
        .args(["dest", "--listen", "127.0.0.1:0", "--streams", &streams])
        .args(["--memory", &size, "--prefault", "--digest", "--json"])
        .arg(&dj)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting migrate-cli dest")?;
    let mut out = BufReader::new(dest.stdout.take().context("dest stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    let Some(addr) = line
        .trim()
        .strip_prefix("listening on ")
        .map(str::to_string)
    else {
        let _ = dest.kill();
        let _ = dest.wait();
        bail!("the destination did not get ready: {line:?}");
    };
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let read = out.read_line(&mut line);
        let _ = done_tx.send((Instant::now(), read.map(|_| line)));
    });
    let t0 = Instant::now();
    let src = Command::new(&a.cli)
        .args(["source", "--connect", &addr, "--streams", &streams])
        .arg("--memory-file")
        .arg(path)
        .args([
            "--memory",
            &size,
            "--guest",
            "idle",
            "--no-fill",
            "--digest",
        ])
        .args(["--progress", "never", "--json"])
        .arg(&sj)
        .stdout(Stdio::null())
        .output()
        .context("running migrate-cli source")?;
    if !src.status.success() {
        let _ = dest.kill();
        let _ = dest.wait();
        bail!(
            "source exited with {}: {}",
            src.status,
            String::from_utf8_lossy(&src.stderr).trim()
        );
    }
    let done = done_rx.recv_timeout(Duration::from_secs(60));
    let status = dest.wait()?;
    let (done_at, said) = done.context("the destination did not report its completion")?;
    if !said?.contains("guest resumed") || !status.success() {
        bail!("the destination did not complete ({status})");
    }
    r.end_to_end_ms = done_at.duration_since(t0).as_secs_f64() * 1e3;
    let report =
        |p: &Path| -> Result<Value> { Ok(serde_json::from_str(&std::fs::read_to_string(p)?)?) };
    let (s, d) = (report(&sj)?, report(&dj)?);
    let _ = std::fs::remove_dir_all(&tmp);
    r.ms = s["total_ms"].as_f64().unwrap_or(0.0);
    let cpu = |v: &Value| v["resources"]["cpu_ms"].as_f64().unwrap_or(0.0) / 1e3;
    let overhead = |v: &Value| v["resources"]["overhead_bytes"].as_u64().unwrap_or(0);
    (r.src_cpu_s, r.dst_cpu_s) = (cpu(&s), cpu(&d));
    (r.src_overhead_bytes, r.dst_overhead_bytes) = (overhead(&s), overhead(&d));
    crate::run::digests_equal(&s, &d)?;
    r.verified = true;
    Ok(())
}

/// `MemAvailable` of /proc/meminfo, bytes.
fn mem_available() -> Result<u64> {
    fixtures::procfs::bytes_field("/proc/meminfo", "MemAvailable")
        .context("reading MemAvailable from /proc/meminfo")
}

/// Bytes free for an unprivileged writer in the filesystem of `dir`.
fn shm_available(dir: &Path) -> Result<u64> {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output()
        .with_context(|| format!("df {}", dir.display()))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| {
            format!(
                "df {}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stdout)
            )
        })
}

/// The scale results in a results folder, when they were measured.
pub fn load(results: &Path) -> Result<Option<ScaleRaw>> {
    crate::load_raw(results, "raw/peer/scale.json")
}

/// The spread of `f` over the successful runs of size `mib`.
fn spread(raw: &ScaleRaw, mib: u64, f: impl Fn(&ScaleRun) -> f64) -> Option<Spread> {
    Spread::of(
        raw.runs
            .iter()
            .filter(|r| r.size_mib == mib && r.error.is_none())
            .map(f),
    )
}

/// Per GiB of guest memory.
fn per_gib(r: &ScaleRun, v: f64) -> f64 {
    v * 1024.0 / r.size_mib as f64
}

/// Memory overhead as a share of guest memory, %.
fn share(r: &ScaleRun, bytes: u64) -> f64 {
    bytes as f64 / (r.size_mib << 20) as f64 * 100.0
}

/// The markdown section of the report.
pub fn markdown(raw: &ScaleRaw) -> String {
    let mut m = String::from("\n## Scale (same machine, same run)\n\n");
    if let Some(why) = &raw.skipped {
        m += &format!("{} — skipped: {why}\n", raw.date);
        return m;
    }
    m += &format!(
        "{} — ours at {} MiB and {} MiB, runs interleaved: the source maps an image of the page \
         mix {} in /dev/shm, the destination's anonymous memory is allocated before it listens \
         (`--prefault`), {} streams, loopback TCP; time is the source's migration (`total_ms`) \
         per GiB, CPU both processes' per GiB, overhead each side's memory beyond the guest's; \
         bytes checked by digest: {} of {} runs equal. Linux {}. Medians (min–max). \
         `results-scale.png` draws it.\n\n",
        raw.date,
        raw.base_mib,
        raw.large_mib,
        raw.mix,
        raw.streams,
        raw.runs.iter().filter(|r| r.verified).count(),
        raw.runs.len(),
        raw.kernel
    );
    m += "| guest | ms per GiB | CPU s per GiB | overhead, source | overhead, destination |\n\
          |---|---|---|---|---|\n";
    let cell = |s: Option<Spread>, prec: usize| {
        s.map_or("—".into(), |s| {
            format!("{:.prec$} ({:.prec$}–{:.prec$})", s.median, s.min, s.max)
        })
    };
    for mib in [raw.base_mib, raw.large_mib] {
        m += &format!(
            "| {mib} MiB | {} | {} | {} % | {} % |\n",
            cell(spread(raw, mib, |r| per_gib(r, r.ms)), 0),
            cell(
                spread(raw, mib, |r| per_gib(r, r.src_cpu_s + r.dst_cpu_s)),
                2
            ),
            cell(spread(raw, mib, |r| share(r, r.src_overhead_bytes)), 3),
            cell(spread(raw, mib, |r| share(r, r.dst_overhead_bytes)), 3),
        );
    }
    let ratio = |f: fn(&ScaleRun) -> f64| {
        let (b, l) = (
            spread(raw, raw.base_mib, f)?,
            spread(raw, raw.large_mib, f)?,
        );
        Some(l.median / b.median)
    };
    let time = ratio(|r| per_gib(r, r.ms));
    let cpu = ratio(|r| per_gib(r, r.src_cpu_s + r.dst_cpu_s));
    let worst = raw
        .runs
        .iter()
        .filter(|r| r.error.is_none())
        .map(|r| share(r, r.src_overhead_bytes.max(r.dst_overhead_bytes)))
        .fold(0.0, f64::max);
    if let (Some(time), Some(cpu)) = (time, cpu) {
        m += &format!(
            "\n| target | measured | |\n|---|---|---|\n\
             | {} MiB time per GiB ≤ 1.1 × {} MiB's | {time:.2} | {} |\n\
             | memory overhead ≤ 1 % of guest memory, both sizes | worst {worst:.3} % | {} |\n\
             | (reported) CPU per GiB, {} MiB / {} MiB | {cpu:.2} | — |\n",
            raw.large_mib,
            raw.base_mib,
            if time <= 1.1 { "met" } else { "**not met**" },
            if worst <= 1.0 { "met" } else { "**not met**" },
            raw.large_mib,
            raw.base_mib
        );
    }
    m
}

/// Two panels (time and CPU per GiB): the base size and the large one.
pub fn draw(path: &Path, raw: &ScaleRaw) -> Result<()> {
    if raw.skipped.is_some() {
        return Ok(());
    }
    let panel = |title: &str, unit: &'static str, f: fn(&ScaleRun) -> f64| BarPanel {
        title: title.into(),
        unit,
        groups: vec![(
            format!("idle guest, {} mix", raw.mix),
            vec![spread(raw, raw.base_mib, f), spread(raw, raw.large_mib, f)],
        )],
    };
    let (base, large) = (
        format!("{} MiB", raw.base_mib),
        format!("{} MiB", raw.large_mib),
    );
    bars(
        path,
        &[&base, &large],
        &[
            panel("Migration time per GiB", "ms per GiB", |r| per_gib(r, r.ms)),
            panel("CPU per GiB, both processes", "CPU s per GiB", |r| {
                per_gib(r, r.src_cpu_s + r.dst_cpu_s)
            }),
        ],
    )
}
