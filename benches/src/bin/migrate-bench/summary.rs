//! From raw results to the markdown table: medians with min–max per matrix
//! cell, ratios to the ceilings, and the targets.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::ceiling::{BEST, Ceiling, ceiling_for};
use crate::cell::{Cell, Spread};
use crate::plan::{DOWNTIME_MS, STREAMS};
use crate::prose::Figures;
use crate::run::{Raw, RunResult};

/// The raw file that measured `case` last: a later partial run (e.g. the
/// TLS cells and the plaintext cells beside them, `--transport ...
/// --bulk-only`) re-measures its cells, and the ratios it prints stay
/// within one run.
fn newest_with(raws: &[Raw], has: impl Fn(&Raw) -> bool) -> Option<&Raw> {
    raws.iter()
        .filter(|r| has(r))
        .max_by(|a, b| a.date.cmp(&b.date))
}

/// Ceilings, each measured setting from the newest run of the same machine
/// that measured it (the memory ceilings' site is `machine` on every
/// machine).
pub fn newest_ceilings(raws: &[Raw]) -> Vec<Ceiling> {
    let mut out: Vec<Ceiling> = Vec::new();
    for raw in raws {
        for c in &raw.ceilings {
            // The best-of rows of a site are one figure, whatever setting
            // won in each run: only the newest run's counts.
            fn tool(t: &str) -> &str {
                if t.starts_with(BEST) { BEST } else { t }
            }
            let same = |o: &Ceiling| {
                o.site == c.site && o.bounds == c.bounds && tool(&o.tool) == tool(&c.tool)
            };
            let newest = newest_with(raws, |r| {
                r.machine.kind == raw.machine.kind && r.ceilings.iter().any(same)
            });
            if newest.is_some_and(|n| std::ptr::eq(n, raw)) {
                out.push(c.clone());
            }
        }
    }
    out
}

/// Group runs by matrix cell, in the order they ran; a cell measured by
/// several raw files takes its runs from the newest.
pub fn cells(raws: &[Raw]) -> Vec<Cell> {
    let mut out: Vec<Cell> = Vec::new();
    for raw in raws {
        for r in &raw.runs {
            let Some(case) = &r.case else { continue };
            let newest = newest_with(raws, |o| {
                o.runs.iter().any(|x| x.case.as_ref() == Some(case))
            });
            if !newest.is_some_and(|n| std::ptr::eq(n, raw)) {
                continue;
            }
            let i = match out.iter().position(|c| c.case == *case) {
                Some(i) => i,
                None => {
                    out.push(Cell {
                        case: case.clone(),
                        run: raw.date.clone(),
                        runs: Vec::new(),
                        failed: 0,
                    });
                    out.len() - 1
                }
            };
            if r.error.is_some() {
                out[i].failed += 1;
            } else {
                out[i].runs.push(r.clone());
            }
        }
    }
    out
}

pub fn load(results: &Path) -> Result<Vec<Raw>> {
    let dir = results.join("raw");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "no raw results in {} (run migrate-bench run first)",
            dir.display()
        );
    }
    files
        .iter()
        .map(|p| {
            serde_json::from_str(&std::fs::read_to_string(p)?)
                .with_context(|| format!("reading {}", p.display()))
        })
        .collect()
}

/// Write results.md, its plots and the figures `prose` quotes from the raw
/// results in `results`; or, with `check`, write nothing and fail where
/// results.md or a quoted figure differs from what the raws give.
pub fn report(results: &Path, prose: Option<&Path>, check: bool) -> Result<()> {
    let raws = load(results)?;
    let cells = cells(&raws);
    let ceilings = newest_ceilings(&raws);
    let mut figures = Figures::default();
    let (mut md, unmeasured) = markdown(&raws, &cells, &ceilings, &mut figures);
    let micro = crate::micro::load(results)?;
    if !micro.is_empty() {
        md += "\n## Micro benchmarks (criterion)\n\n";
        md += &crate::micro::markdown(&micro);
    }
    let peer = crate::qemu_report::load(results)?;
    if let Some(peer) = &peer {
        md += &crate::qemu_report::markdown(peer, &mut figures);
    }
    let boot = crate::boot_sector::load(results)?;
    if let Some(boot) = &boot {
        md += &crate::boot_sector::markdown(boot);
    }
    let boot_postcopy = crate::boot_sector::load_postcopy(results)?;
    if let Some(boot) = &boot_postcopy {
        md += &crate::boot_sector::markdown(boot);
    }
    let postcopy = crate::postcopy::load(results)?;
    if !postcopy.is_empty() {
        md += &crate::postcopy::markdown(&postcopy);
    }
    let scale = crate::scale::load(results)?;
    if let Some(scale) = &scale {
        md += &crate::scale::markdown(scale);
    }
    let protect = crate::protect::load(results)?;
    if !protect.is_empty() {
        md += &crate::protect::markdown(&protect);
    }
    let fabric = crate::fabric::load(results)?;
    if !fabric.is_empty() {
        md += &crate::fabric::markdown(&fabric);
    }
    md += &provenance(results);
    let md_path = results.join("results.md");
    let (filled, stale) = match prose {
        Some(prose) => {
            let quoted = std::fs::read_to_string(prose)
                .with_context(|| format!("reading {}", prose.display()))?;
            crate::prose::fill(&quoted, &figures)
                .map(|(filled, stale)| (Some((prose, filled)), stale))
                .with_context(|| format!("the figures {} quotes", prose.display()))?
        }
        None => (None, Vec::new()),
    };
    let prose_name = prose.map_or_else(|| "the prose".into(), |p| p.display().to_string());
    if check {
        return check_report(&md_path, &md, &stale, &prose_name);
    }
    std::fs::write(&md_path, md).with_context(|| format!("writing {}", md_path.display()))?;
    if let Some((prose, filled)) = filled.filter(|_| !stale.is_empty()) {
        std::fs::write(prose, filled).with_context(|| format!("writing {}", prose.display()))?;
        for s in &stale {
            eprintln!(
                "migrate-bench: {}: {} {:?} -> {:?}",
                prose.display(),
                s.name,
                s.quoted,
                s.now
            );
        }
    }

    let png = results.join("results.png");
    crate::plot::draw(&png, &cells, &ceilings)?;
    if let Some(peer) = &peer {
        crate::qemu_report::draw(&results.join("results-qemu.png"), peer)?;
    }
    if let Some(boot) = &boot {
        crate::boot_sector::draw(&results.join("results-boot-sector.png"), boot)?;
    }
    if let Some(boot) = &boot_postcopy {
        crate::boot_sector::draw(&results.join("results-boot-sector-postcopy.png"), boot)?;
    }
    crate::postcopy::draw(&results.join("results-postcopy.png"), &postcopy)?;
    if let Some(scale) = &scale {
        crate::scale::draw(&results.join("results-scale.png"), scale)?;
    }
    crate::protect::draw(&results.join("results-protect.png"), &protect)?;
    crate::fabric::draw(&results.join("results-fabric.png"), &fabric)?;
    eprintln!(
        "migrate-bench: wrote {} and {}",
        md_path.display(),
        png.display()
    );
    if unmeasured > 0 {
        bail!("{unmeasured} targets not measured: their ceiling failed (see the report)");
    }
    Ok(())
}

/// `report --check`: fail, naming each, where the committed `md_path`
/// differs from `md` (the report the raws give) or the prose quotes a
/// `stale` figure.
fn check_report(
    md_path: &Path,
    md: &str,
    stale: &[crate::prose::Stale],
    prose_name: &str,
) -> Result<()> {
    let committed = std::fs::read_to_string(md_path).unwrap_or_default();
    let mut wrong = Vec::new();
    if committed != md {
        let line = committed
            .lines()
            .zip(md.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(md.lines().count()));
        wrong.push(format!(
            "{} is not what its raws give (first difference at line {}: {:?} against {:?})",
            md_path.display(),
            line + 1,
            committed.lines().nth(line).unwrap_or(""),
            md.lines().nth(line).unwrap_or("")
        ));
    }
    for s in stale {
        wrong.push(format!(
            "{prose_name} quotes {} as {:?}; the raws give {:?}",
            s.name, s.quoted, s.now
        ));
    }
    if !wrong.is_empty() {
        bail!(
            "{}\n(`migrate-bench report` writes them from the raws)",
            wrong.join("\n")
        );
    }
    eprintln!(
        "migrate-bench: {} and the figures {prose_name} quotes match the raws",
        md_path.display()
    );
    Ok(())
}

const GIB: f64 = (1u64 << 30) as f64;

/// The report, and how many targets could not be judged (their ceiling
/// failed to measure).
fn markdown(
    raws: &[Raw],
    cells: &[Cell],
    ceilings: &[Ceiling],
    figures: &mut Figures,
) -> (String, usize) {
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmark results\n");
    let _ = writeln!(
        s,
        "Written by `migrate-bench report` from `raw/*.json`; BENCHMARKS.md explains \
         how to reproduce them and how to read them. Every migration's bytes were \
         checked: the destination's memory after the commit equals the paused source's \
         (`--digest` on both sides, outside the downtime; runs recorded before it ran with \
         `--verify`, whose time the tables show after a +), \
         {STREAMS} data streams / queue pairs, a {DOWNTIME_MS} ms downtime budget and a \
         preallocated destination (`--prefault`) unless the row says *fresh*. Figures are \
         medians with (min–max) over the repeats.\n"
    );
    for r in raws {
        let _ = writeln!(
            s,
            "- **{}** — {} — {} × {}, {:.1} GiB, Linux {} — {}",
            r.sites
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            r.date,
            r.machine.cpus,
            r.machine.cpu,
            r.machine.mem_gib,
            r.machine.kernel,
            r.machine.kind
        );
        let mut trackers: Vec<&str> = r
            .runs
            .iter()
            .map(|x| x.tracker.as_str())
            .filter(|t| !t.is_empty())
            .collect();
        trackers.sort_unstable();
        trackers.dedup();
        if !trackers.is_empty() {
            let _ = writeln!(s, "  dirty tracker: {}", trackers.join(", "));
        }
        if !r.command.is_empty() {
            let _ = writeln!(s, "  command: `{}`", r.command);
        }
    }

    let _ = writeln!(s, "\n## Ceilings (same run)\n");
    let _ = writeln!(s, "| site | bounds | tool | Mbit/s |\n|---|---|---|---|");
    for c in ceilings {
        let v = Spread::of(c.mbps.iter().copied())
            .map(|x| x.fmt(0))
            .unwrap_or_else(|| format!("— ({})", c.error.as_deref().unwrap_or("no result")));
        let _ = writeln!(s, "| {} | {} | `{}` | {} |", c.site, c.bounds, c.tool, v);
    }

    let _ = writeln!(s, "\n## Targets\n");
    let unmeasured = targets(&mut s, cells, ceilings, figures);
    memory_bounds(raws, figures);

    let _ = writeln!(s, "\n## Ratios to every ceiling\n");
    ratios(&mut s, cells, ceilings);
    rdma_vs_tcp(&mut s, raws, figures);
    tls_vs_plain(&mut s, cells, figures);

    let _ = writeln!(s, "\n## Migrations\n");
    let _ = writeln!(
        s,
        "First pass = round 0's wire rate (the transport's bulk rate); ratio = first pass / \
         the ceiling of the transport at that site. Downtime is measured without \
         `--verify` (after +: the time `--verify` took, in runs that used it). CPU is each process's CPU time over the migration per GiB \
         of guest memory, without the built-in guest's threads. Overhead is the larger \
         side's peak RSS beyond its start and its resident guest pages, as a share of guest \
         memory.\n"
    );
    let _ = writeln!(
        s,
        "| site | transport | guest | mix | load | first pass Mbit/s | ratio | total ms | \
         downtime ms (+verify) | setup ms | rounds | wire MiB | dirty pages/s | CPU src / dst s/GiB | overhead |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for c in cells {
        let k = &c.case;
        let ceiling = ceiling_for(ceilings, &k.site, &k.transport)
            .and_then(|c| Spread::of(c.mbps.iter().copied()));
        let sp = |f: &dyn Fn(&RunResult) -> f64, d: usize| {
            c.spread(f).map(|x| x.fmt(d)).unwrap_or_else(|| "—".into())
        };
        let fp = c.spread(|r| r.first_pass_mbps);
        let ratio = match (fp, ceiling) {
            (Some(f), Some(cl)) => format!("{:.2}", f.median / cl.median),
            _ => "—".into(),
        };
        let gib = k.size_mib as f64 / 1024.0;
        let verify = c.spread(|r| r.verify_ms).map_or(0.0, |x| x.median);
        let overhead = c
            .spread(|r| {
                r.src_overhead_bytes.max(r.dst_overhead_bytes) as f64
                    / (r.bytes_total as f64).max(1.0)
                    * 100.0
            })
            .map(|x| format!("{:.2} %", x.max))
            .unwrap_or_else(|| "—".into());
        let failed = if c.failed > 0 {
            format!(" ({} failed)", c.failed)
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "| {} | {}{} | {} MiB{} | {} | {} | {} | {} | {} | {} +{:.0} | {} | {} | {} | {} | {} / {} | {} |",
            k.site,
            k.transport,
            failed,
            k.size_mib,
            if k.prefault { "" } else { " *fresh*" },
            k.mix,
            k.load,
            fp.map(|x| x.fmt(0)).unwrap_or_else(|| "—".into()),
            ratio,
            sp(&|r| r.total_ms, 0),
            sp(&|r| r.downtime_net_ms(), 1),
            verify,
            sp(&|r| r.setup_ms + r.connect_ms, 1),
            sp(&|r| r.rounds as f64, 0),
            sp(&|r| r.bytes_transferred as f64 / (1u64 << 20) as f64, 0),
            sp(&|r| r.dirty_rate_pps, 0),
            sp(&|r| r.src_cpu_ms / 1e3 / gib, 2),
            sp(&|r| r.dst_cpu_ms / 1e3 / gib, 2),
            overhead,
        );
    }
    let _ = writeln!(s, "\n![throughput and downtime](results.png)");
    (s, unmeasured)
}

/// The largest idle all-random cell of each site and transport against
/// every ceiling measured on the same machine.
fn ratios(s: &mut String, cells: &[Cell], ceilings: &[Ceiling]) {
    let _ = writeln!(
        s,
        "First pass of the largest idle all-random guest of each site and transport, \
         divided by each ceiling measured on the same machine.\n\n\
         The physical bound of every site is the `memcpy` row: each migrated byte is \
         copied twice (TCP: into the sender's kernel and out of the receiver's; rxe: \
         into the packet and out of it into the registered memory, with a CRC over it), \
         and this machine has two cores, so even with the two copies on different cores \
         in parallel and nothing else to do (no hashing, no zero test, no TLS, no \
         protocol), a site moves at most what one core copies.\n"
    );
    let _ = writeln!(
        s,
        "| site | transport | first pass Mbit/s | ceiling | ratio |\n|---|---|---|---|---|"
    );
    for c in bulk_cells(cells) {
        let k = &c.case;
        let Some(fp) = c.spread(|r| r.first_pass_mbps) else {
            continue;
        };
        // This site's link ceilings, then the memory ceilings of the same
        // machine (the raw file the site came from).
        let machine_of_site = ceilings.iter().position(|x| x.site == k.site).unwrap_or(0);
        let memory = ceilings[..machine_of_site]
            .iter()
            .rev()
            .filter(|x| x.bounds == "memory")
            .take(2);
        for cl in ceilings.iter().filter(|x| x.site == k.site).chain(memory) {
            let Some(cm) = Spread::of(cl.mbps.iter().copied()) else {
                continue;
            };
            let ratio = fp.median / cm.median;
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | `{}` {:.0} | {:.2}{} |",
                k.site,
                k.transport,
                fp.median,
                cl.tool,
                cm.median,
                ratio,
                if ratio > 1.0 && cl.bounds != "memory" {
                    " (not an upper bound)"
                } else {
                    ""
                }
            );
        }
    }
}

/// Per site and transport, the largest idle all-random cell with a
/// preallocated destination: the bulk rate, with nothing to skip or re-send.
fn bulk_cells(cells: &[Cell]) -> Vec<&Cell> {
    let mut out: Vec<&Cell> = Vec::new();
    for c in cells {
        let k = &c.case;
        if k.load != "idle" || k.mix != "random" || !k.prefault {
            continue;
        }
        match out
            .iter_mut()
            .find(|o| o.case.site == k.site && o.case.transport == k.transport)
        {
            Some(o) if o.case.size_mib < k.size_mib => *o = c,
            Some(_) => {}
            None => out.push(c),
        }
    }
    out
}

/// Who sealed a TLS transport's records.
fn tls_sealer(transport: &str) -> &'static str {
    if transport == "tcp-ktls" {
        "kernel TLS"
    } else {
        "records sealed by migrate-cli"
    }
}

/// TLS against plaintext TCP, size by size, where a site measured both
/// (same run): the cost of authentication and encryption.
/// Figures: `tls.SITE` and `ktls.SITE`, the ratios by size ascending
/// ("0.62 / 0.62 / 0.74").
fn tls_vs_plain(s: &mut String, cells: &[Cell], figures: &mut Figures) {
    let mut quoted: Vec<(String, u64, String)> = Vec::new();
    for c in cells
        .iter()
        .filter(|c| crate::plan::is_tls(&c.case.transport))
    {
        let k = &c.case;
        if let (Some(tls), Some(plain)) = (
            idle_random_first_pass(cells, &c.run, &k.site, &k.transport, k.size_mib),
            idle_random_first_pass(cells, &c.run, &k.site, "tcp", k.size_mib),
        ) {
            let name = if k.transport == "tcp-ktls" {
                "ktls"
            } else {
                "tls"
            };
            quoted.push((
                format!("{name}.{}", k.site),
                k.size_mib,
                format!("{:.2}", tls.median / plain.median),
            ));
            let _ = writeln!(
                s,
                "\nTLS ({}) / plaintext TCP at {} ({} MiB idle random, same run): {:.0} / {:.0} Mbit/s first pass = {:.2}.",
                tls_sealer(&k.transport),
                k.site,
                k.size_mib,
                tls.median,
                plain.median,
                tls.median / plain.median
            );
        }
    }
    quoted.sort();
    for (name, _, _) in &quoted {
        let ratios: Vec<&str> = quoted
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, _, r)| r.as_str())
            .collect();
        figures.set(name.clone(), ratios.join(" / "));
    }
}

/// The first pass of the idle random, preallocated cell of `transport` at
/// `site` and `size_mib` in run `run`, if that run has it.
fn idle_random_first_pass(
    cells: &[Cell],
    run: &str,
    site: &str,
    transport: &str,
    size_mib: u64,
) -> Option<Spread> {
    cells
        .iter()
        .find(|c| {
            let k = &c.case;
            c.run == run
                && k.site == site
                && k.transport == transport
                && k.size_mib == size_mib
                && k.load == "idle"
                && k.mix == "random"
                && k.prefault
        })
        .and_then(|c| c.spread(|r| r.first_pass_mbps))
}

/// RDMA against TCP where one run (one raw file: one boot, same CPU)
/// measured both at a site, on the largest idle random guest RDMA moved in
/// it (a later run that re-measured TCP alone does not mix in). Figure
/// `rdma-vs-tcp.SITE` from the newest such run: "0.74 (420 / 567 Mbit/s)".
fn rdma_vs_tcp(s: &mut String, raws: &[Raw], figures: &mut Figures) {
    let mut by_date: Vec<&Raw> = raws.iter().collect();
    by_date.sort_by(|a, b| a.date.cmp(&b.date));
    for raw in by_date {
        rdma_vs_tcp_in(s, &cells(std::slice::from_ref(raw)), figures);
    }
}

fn rdma_vs_tcp_in(s: &mut String, cells: &[Cell], figures: &mut Figures) {
    for c in bulk_cells(cells) {
        let k = &c.case;
        if k.transport != "rdma" {
            continue;
        }
        let (Some(r), Some(t)) = (
            c.spread(|r| r.first_pass_mbps),
            idle_random_first_pass(cells, &c.run, &k.site, "tcp", k.size_mib),
        ) else {
            continue;
        };
        let _ = writeln!(
            s,
            "\nRDMA / TCP at {} ({} MiB idle random, same boot, run of {}): {:.0} / {:.0} Mbit/s = {:.2}.",
            k.site,
            k.size_mib,
            c.run,
            r.median,
            t.median,
            r.median / t.median
        );
        figures.set(
            format!("rdma-vs-tcp.{}", k.site),
            format!(
                "{:.2} ({:.0} / {:.0} Mbit/s)",
                r.median / t.median,
                r.median,
                t.median
            ),
        );
    }
}

/// A rate as the prose quotes it: Gbit/s from 10 Gbit/s up, else Mbit/s.
fn rate(mbps: f64) -> String {
    if mbps >= 10_000.0 {
        format!("{:.1} Gbit/s", mbps / 1000.0)
    } else {
        format!("{mbps:.0} Mbit/s")
    }
}

/// Figures `memcpy.host`, `memcpy.vm`: one core's copy rate on each
/// machine, from the newest run that measured it (every site's physical
/// bound: two copies per byte on two cores).
fn memory_bounds(raws: &[Raw], figures: &mut Figures) {
    let mut newest: Vec<&Raw> = raws.iter().collect();
    newest.sort_by(|a, b| b.date.cmp(&a.date));
    for (name, host) in [("memcpy.host", true), ("memcpy.vm", false)] {
        let memcpy = newest
            .iter()
            .filter(|r| (r.machine.kind == "host") == host)
            .flat_map(|r| &r.ceilings)
            .find(|c| c.bounds == "memory" && c.tool.starts_with("memcpy"))
            .and_then(|c| Spread::of(c.mbps.iter().copied()));
        if let Some(m) = memcpy {
            figures.set(name, format!("{:.1} Gbit/s", m.median / 1000.0));
        }
    }
}

/// The targets table; returns how many could not be judged. Figures: the
/// first-pass table (`throughput-table`), `downtime.{runs,over,worst}`,
/// `overhead.worst`, `cpu-per-gib`.
fn targets(s: &mut String, cells: &[Cell], ceilings: &[Ceiling], figures: &mut Figures) -> usize {
    let mut unmeasured = 0;
    let mut table = vec![
        "| where | ours | best ceiling | ratio | target ≥ 0.9 |".to_string(),
        "|---|---|---|---|---|".to_string(),
    ];
    let size = |mib: u64| {
        if mib % 1024 == 0 {
            format!("{} GiB", mib / 1024)
        } else {
            format!("{mib} MiB")
        }
    };
    // Throughput: the bulk cells against their transport's ceiling.
    let _ = writeln!(s, "| target | where | measured | met |\n|---|---|---|---|");
    for c in bulk_cells(cells) {
        let k = &c.case;
        if crate::plan::is_tls(&k.transport) && k.site.starts_with("vm-") {
            // An emulated CPU's AES says nothing of a real one: the VM's
            // TLS ratios are recorded (above), not held to a target.
            continue;
        }
        if crate::plan::is_tls(&k.transport) {
            // TLS is held to plaintext TCP of the same run (issue 12's
            // target), not to a plaintext tool.
            let (Some(tls), Some(plain)) = (
                c.spread(|r| r.first_pass_mbps),
                idle_random_first_pass(cells, &c.run, &k.site, "tcp", k.size_mib),
            ) else {
                continue;
            };
            let ratio = tls.median / plain.median;
            let _ = writeln!(
                s,
                "| TCP-TLS ({}) ≥ 0.8 × plaintext TCP (same run) | {}, {} MiB idle random | {:.0} / {:.0} Mbit/s = {:.2} | {} |",
                tls_sealer(&k.transport),
                k.site,
                k.size_mib,
                tls.median,
                plain.median,
                ratio,
                if ratio >= 0.8 { "yes" } else { "**no**" }
            );
            continue;
        }
        let Some(fp) = c.spread(|r| r.first_pass_mbps) else {
            continue;
        };
        let ceiling = ceiling_for(ceilings, &k.site, &k.transport)
            .and_then(|cl| Spread::of(cl.mbps.iter().copied()).map(|cm| (cl, cm)));
        let Some((cl, cm)) = ceiling else {
            unmeasured += 1;
            table.push(format!(
                "| {}, {}, {} | {} | not measured | — | not met |",
                k.site,
                k.transport.to_uppercase(),
                size(k.size_mib),
                rate(fp.median)
            ));
            let _ = writeln!(
                s,
                "| {} ≥ 90 % of its best-measured ceiling | {}, {} MiB idle random | ceiling **not measured** | **no** |",
                k.transport.to_uppercase(),
                k.site,
                k.size_mib,
            );
            continue;
        };
        let ratio = fp.median / cm.median;
        let in_unit = |x: f64| rate(x).split(' ').next().unwrap_or_default().to_string();
        table.push(format!(
            "| {}, {}, {} | {} | `{}` {}{} | {:.2} | {} |",
            k.site,
            k.transport.to_uppercase(),
            size(k.size_mib),
            rate(fp.median),
            cl.tool.trim_start_matches(BEST),
            rate(cm.median),
            if cm.min == cm.max {
                String::new()
            } else {
                format!(" ({}–{})", in_unit(cm.min), in_unit(cm.max))
            },
            ratio,
            if ratio >= 0.9 { "met" } else { "not met" }
        ));
        let _ = writeln!(
            s,
            "| {} ≥ 90 % of `{}` | {}, {} MiB idle random | {:.0} / {:.0} Mbit/s = {:.0} %{} | {} |",
            k.transport.to_uppercase(),
            cl.tool,
            k.site,
            k.size_mib,
            fp.median,
            cm.median,
            ratio * 100.0,
            if ratio > 1.0 {
                " (faster than this ceiling: not an upper bound)"
            } else {
                ""
            },
            if ratio >= 0.9 { "yes" } else { "**no**" }
        );
    }
    // Downtime: every converged run (the switch-over came from the budget,
    // not from max rounds or the timeout) within the budget, verify aside.
    let runs: Vec<&RunResult> = cells.iter().flat_map(|c| &c.runs).collect();
    let over: Vec<&&RunResult> = runs
        .iter()
        .filter(|r| r.downtime_net_ms() > DOWNTIME_MS as f64)
        .collect();
    let worst = runs
        .iter()
        .map(|r| r.downtime_net_ms())
        .fold(0.0f64, f64::max);
    figures.set("throughput-table", table.join("\n"));
    figures.set("downtime.runs", runs.len().to_string());
    figures.set("downtime.within", (runs.len() - over.len()).to_string());
    figures.set("downtime.over", over.len().to_string());
    figures.set("downtime.worst", format!("{worst:.1} ms"));
    let _ = writeln!(
        s,
        "| downtime ≤ {DOWNTIME_MS} ms budget (without `--verify`) | all {} runs | worst {:.1} ms, {} over | {} |",
        runs.len(),
        worst,
        over.len(),
        if over.is_empty() { "yes" } else { "**no**" }
    );
    let worst_overhead = cells
        .iter()
        .filter(|c| c.case.size_mib >= 1024)
        .flat_map(|c| &c.runs)
        .map(|r| {
            r.src_overhead_bytes.max(r.dst_overhead_bytes) as f64 / (r.bytes_total as f64).max(1.0)
        })
        .fold(f64::NAN, f64::max);
    if worst_overhead.is_finite() {
        figures.set("overhead.worst", format!("{:.2} %", worst_overhead * 100.0));
        let _ = writeln!(
            s,
            "| memory overhead ≤ 1 % of guest memory | 1 GiB guests, either side | worst {:.2} % | {} |",
            worst_overhead * 100.0,
            if worst_overhead <= 0.01 {
                "yes"
            } else {
                "**no**"
            }
        );
    }
    let cpu: Vec<f64> = cells
        .iter()
        .filter(|c| c.case.size_mib >= 1024 && c.case.load == "idle")
        .flat_map(|c| &c.runs)
        .map(|r| (r.src_cpu_ms + r.dst_cpu_ms) / 1e3 / (r.bytes_total as f64 / GIB))
        .collect();
    if let Some(c) = Spread::of(cpu) {
        figures.set("cpu-per-gib", format!("{} s", c.fmt(2)));
        let _ = writeln!(
            s,
            "| (reported) CPU per GiB, both sides, idle 1 GiB | host | {} s | — |",
            c.fmt(2)
        );
    }
    unmeasured
}

/// The report's last section: every raw file, when and from which commit
/// it was measured, and whether the tree differed from that commit.
fn provenance(results: &Path) -> String {
    use std::fmt::Write as _;
    let mut files = Vec::new();
    let mut dirs = vec![results.join("raw")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "json") {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut s = String::from(
        "\n## Provenance\n\nEvery raw file, the commit that measured it and whether the \
         tree differed from that commit (outside the results folder); `–`: measured before \
         raw files recorded it.\n\n| raw file | measured | commit | tree |\n|---|---|---|---|\n",
    );
    for p in files {
        let v: serde_json::Value = std::fs::read_to_string(&p)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let rel = p.strip_prefix(results).unwrap_or(&p).display().to_string();
        let commit = v["commit"]
            .as_str()
            .map_or("–".to_string(), |c| c.get(..10).unwrap_or(c).to_string());
        let tree = match v["tree_dirty"].as_bool() {
            Some(true) => "changed",
            Some(false) => "clean",
            None => "–",
        };
        let date = v["date"].as_str().unwrap_or("–");
        let _ = writeln!(s, "| {rel} | {date} | {commit} | {tree} |");
    }
    s
}
