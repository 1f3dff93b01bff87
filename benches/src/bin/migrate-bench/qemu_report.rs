//! The QEMU comparison in the report: a table with the ratios and the
//! targets, and a bar chart (`results-qemu.png`).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

use crate::cell::Spread;
use crate::peer::{PeerRaw, PeerRun};

/// Where `migrate-bench qemu` writes inside a results folder.
pub const RAW: &str = "raw/peer/qemu.json";

/// The comparison, when one was measured.
pub fn load(results: &Path) -> Result<Option<PeerRaw>> {
    crate::load_raw(results, RAW)
}

/// The good runs of one engine with one kind of destination memory, in
/// one order (interleaved, or each engine alone), or in both (`None`).
fn runs<'a>(
    raw: &'a PeerRaw,
    engine: &'a str,
    prealloc: bool,
    alone: Option<bool>,
) -> impl Iterator<Item = &'a PeerRun> {
    raw.runs.iter().filter(move |r| {
        r.engine == engine
            && r.prealloc == prealloc
            && r.error.is_none()
            && alone.is_none_or(|a| r.alone == a)
    })
}

fn spread(
    raw: &PeerRaw,
    engine: &str,
    prealloc: bool,
    alone: Option<bool>,
    f: fn(&PeerRun) -> f64,
) -> Option<Spread> {
    Spread::of(runs(raw, engine, prealloc, alone).map(f))
}

/// An engine at its best: the lower of its medians interleaved and alone.
fn best(raw: &PeerRaw, engine: &str, prealloc: bool, f: fn(&PeerRun) -> f64) -> Option<f64> {
    [false, true]
        .into_iter()
        .filter_map(|alone| spread(raw, engine, prealloc, Some(alone), f))
        .map(|s| s.median)
        .min_by(f64::total_cmp)
}

const KINDS: [(bool, &str); 2] = [(false, "fresh"), (true, "preallocated")];
const ORDERS: [(bool, &str); 2] = [(false, "interleaved"), (true, "each alone")];

/// `engine` / `to` of the medians in one order.
fn ratio_in(
    raw: &PeerRaw,
    engine: &str,
    to: &str,
    prealloc: bool,
    alone: bool,
    f: fn(&PeerRun) -> f64,
) -> Option<f64> {
    let (q, o) = (
        spread(raw, to, prealloc, Some(alone), f)?,
        spread(raw, engine, prealloc, Some(alone), f)?,
    );
    (q.median > 0.0).then(|| o.median / q.median)
}

/// `engine` / `to`, each at its best.
fn ratio_best(
    raw: &PeerRaw,
    engine: &str,
    to: &str,
    prealloc: bool,
    f: fn(&PeerRun) -> f64,
) -> Option<f64> {
    let (q, o) = (best(raw, to, prealloc, f)?, best(raw, engine, prealloc, f)?);
    (q > 0.0).then(|| o / q)
}

/// The verdict on a target `got <= bound` (both / QEMU), given where the
/// floor of the same run lies.
fn verdict(got: Option<f64>, bound: f64, floor: Option<f64>) -> String {
    match (got, floor) {
        (None, _) => "not measured".into(),
        (Some(x), _) if x <= bound => "met".into(),
        (Some(_), Some(f)) if f > bound => {
            format!("**not met**; below the floor ({f:.2}): no engine can reach it here")
        }
        (Some(_), _) => "**not met**".into(),
    }
}

/// The section; figures `qemu-targets` (its targets table), `qemu-run`
/// (when and where it was measured) and `qemu.KIND.ORDER.ENGINE` (median
/// times, e.g. `qemu.preallocated.alone.qemu`).
pub fn markdown(raw: &PeerRaw, figures: &mut crate::prose::Figures) -> String {
    let mut s = String::new();
    let n = raw.runs.len();
    let identical = raw.runs.iter().filter(|r| r.identical).count();
    let failed = raw.runs.iter().filter(|r| r.error.is_some()).count();
    let _ = writeln!(s, "\n## Beside QEMU (same image, same run)\n");
    let _ = writeln!(
        s,
        "{} — {}, multifd with {} channels, against `migrate-cli` with {} streams; a {} MiB \
         image ({} zero:text:random pages), loopback TCP, both destinations files in /dev/shm, \
         each compared with the image byte for byte after the migration: {identical} of {n} \
         identical{}. Linux {}{}. Medians (min–max), interleaved (QEMU, ours, the floor, QEMU, ...) \
         and, where measured, each engine alone (its runs back to back). Time: QEMU from \
         `migrate` to the destination's completion event, ours from starting the source \
         process to {}. CPU: both processes over the migration (QEMU's from \
         `migrate` on; ours as each process reports it, from its connection on). \
         The floor is the least work any engine must do to move the image over the same \
         streams, measured the same way (see `floor.rs` in the benchmark: zero test, \
         vectored writes of the non-zero pages, reads straight into the destination file; \
         no protocol, tracking, hashes or switch-over). `results-qemu.png` draws it.\n",
        raw.date,
        raw.qemu_version,
        raw.channels,
        raw.channels,
        raw.size_mib,
        raw.mix,
        if failed > 0 {
            format!(", **{failed} failed**")
        } else {
            String::new()
        },
        raw.kernel,
        if raw.cpu.is_empty() {
            String::new()
        } else {
            format!(", {}", raw.cpu)
        },
        if raw.runs.iter().any(|r| r.source_exit_ms.is_some()) {
            "the destination's completion (the line it prints once its guest resumed; \
             the source's exit, after its teardown, is `source_exit_ms` in the raw file)"
        } else {
            "its exit (runs before 2026-11-30)"
        },
    );
    let _ = writeln!(
        s,
        "| destination memory | order | QEMU ms | ours ms | floor ms | ours / QEMU | floor / QEMU \
         | QEMU CPU s | ours CPU s | floor CPU s | ours / QEMU | floor / QEMU |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    let cell = |x: Option<Spread>, d: usize| x.map_or("not measured".into(), |x| x.fmt(d));
    let times: fn(&PeerRun) -> f64 = |r| r.ms;
    let cpus: fn(&PeerRun) -> f64 = PeerRun::cpu_s;
    let ratio_text = |x: Option<f64>| x.map_or("—".into(), |x| format!("{x:.2}"));
    for (prealloc, kind) in KINDS {
        for (alone, order) in ORDERS {
            if runs(raw, "qemu", prealloc, Some(alone)).next().is_none()
                && runs(raw, "ours", prealloc, Some(alone)).next().is_none()
            {
                continue;
            }
            let sp = |e, f| spread(raw, e, prealloc, Some(alone), f);
            for e in ["qemu", "ours", "floor"] {
                if let Some(x) = sp(e, times) {
                    let order = if alone { "alone" } else { "interleaved" };
                    figures.set(
                        format!("qemu.{kind}.{order}.{e}"),
                        format!("{:.0} ms", x.median),
                    );
                }
            }
            let r = |e, f| ratio_text(ratio_in(raw, e, "qemu", prealloc, alone, f));
            let _ = writeln!(
                s,
                "| {kind} | {order} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                cell(sp("qemu", times), 0),
                cell(sp("ours", times), 0),
                cell(sp("floor", times), 0),
                r("ours", times),
                r("floor", times),
                cell(sp("qemu", cpus), 2),
                cell(sp("ours", cpus), 2),
                cell(sp("floor", cpus), 2),
                r("ours", cpus),
                r("floor", cpus),
            );
        }
    }
    let _ = writeln!(
        s,
        "\nTargets: each engine at its best (the lower of its medians interleaved and \
         alone), against QEMU's best and against the floor's.\n"
    );
    let mut table = String::from(
        "| target | ours / QEMU | floor / QEMU | ours / floor | |\n|---|---|---|---|---|",
    );
    type Figure = fn(&PeerRun) -> f64;
    let targets: [(&str, bool, Figure, f64); 4] = [
        ("time, preallocated destination", true, times, 0.8),
        ("CPU, preallocated destination", true, cpus, 0.8),
        ("time, fresh destination", false, times, 0.6),
        ("CPU, fresh destination", false, cpus, 0.6),
    ];
    const TO_FLOOR: f64 = 1.2;
    for (what, prealloc, f, bound) in targets {
        let got = ratio_best(raw, "ours", "qemu", prealloc, f);
        let floor = ratio_best(raw, "floor", "qemu", prealloc, f);
        let to_floor = ratio_best(raw, "ours", "floor", prealloc, f);
        let _ = write!(
            table,
            "\n| {what}: ≤ {bound} × QEMU, ≤ {TO_FLOOR} × the floor | {} | {} | {} | {}; {} |",
            ratio_text(got),
            ratio_text(floor),
            ratio_text(to_floor),
            verdict(got, bound, floor),
            match to_floor {
                None => "to the floor: not measured".to_string(),
                Some(x) if x <= TO_FLOOR => "to the floor: met".to_string(),
                Some(_) => "to the floor: **not met**".to_string(),
            }
        );
    }
    let _ = writeln!(s, "{table}");
    figures.set("qemu-targets", table);
    figures.set(
        "qemu-run",
        format!(
            "{}, {} MiB, {}{}",
            raw.date,
            raw.size_mib,
            raw.qemu_version
                .split(" (")
                .next()
                .unwrap_or(&raw.qemu_version),
            if raw.cpu.is_empty() {
                String::new()
            } else {
                format!(", {}", raw.cpu)
            }
        ),
    );
    s
}

/// Two panels of bars (time, CPU): per kind of destination memory, QEMU,
/// ours and the floor side by side, the median as the bar and min–max as a whisker.
pub fn draw(path: &Path, raw: &PeerRaw) -> Result<()> {
    type Figure = fn(&PeerRun) -> f64;
    let panel = |title: &str, unit: &'static str, f: Figure| BarPanel {
        title: format!("{title}, {} MiB image", raw.size_mib),
        unit,
        groups: KINDS
            .iter()
            .map(|&(prealloc, kind)| {
                (
                    format!("{kind} destination"),
                    vec![
                        spread(raw, "qemu", prealloc, None, f),
                        spread(raw, "ours", prealloc, None, f),
                        spread(raw, "floor", prealloc, None, f),
                    ],
                )
            })
            .collect(),
    };
    bars(
        path,
        &["QEMU multifd", "migrate-cli", "floor"],
        &[
            panel("End-to-end time", "ms", |r| r.ms),
            panel("CPU, both processes", "CPU s", PeerRun::cpu_s),
        ],
    )
}

/// One panel of [`bars`]: groups of bars (one per engine) under a label.
pub struct BarPanel {
    pub title: String,
    pub unit: &'static str,
    /// Label, and per engine the spread (or nothing measured).
    pub groups: Vec<(String, Vec<Option<Spread>>)>,
}

/// Panels side by side, each with its groups of bars: per engine (the
/// first in red, the second in blue, a third in grey) the median as the bar
/// and min–max as a whisker.
pub fn bars(path: &Path, engines: &[&str], panels: &[BarPanel]) -> Result<()> {
    crate::plot::load_font()?;
    let width = 600 * panels.len() as u32;
    let root = BitMapBackend::new(path, (width, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((1, panels.len()));
    let colors = [RED, BLUE, RGBColor(110, 110, 110)];
    let n_engines = engines.len().clamp(1, colors.len());
    // Each group spans 0.7 of its unit, shared by its bars.
    let width_of_bar = 0.7 / n_engines as f64;
    for (area, p) in areas.iter().zip(panels) {
        let top = p
            .groups
            .iter()
            .flat_map(|(_, g)| g.iter().flatten().map(|s| s.max))
            .fold(0.0, f64::max)
            * 1.2;
        let n = p.groups.len().max(1) as f64;
        let labels: Vec<String> = p.groups.iter().map(|(l, _)| l.clone()).collect();
        let mut chart = ChartBuilder::on(area)
            .caption(&p.title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..n, 0.0..top.max(1e-3))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(2 * labels.len() + 1)
            .x_label_formatter(&|x| {
                let k = x - 0.5;
                if (k - k.round()).abs() < 0.01 && k >= -0.01 {
                    labels.get(k.round() as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc(p.unit)
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 17))
            .draw()?;
        for (k, (_, group)) in p.groups.iter().enumerate() {
            let x0 = k as f64;
            for (e, sp) in group.iter().enumerate().take(n_engines) {
                let Some(sp) = sp else { continue };
                let color = colors[e];
                let a = x0 + 0.15 + width_of_bar * e as f64;
                let b = a + width_of_bar * 0.85;
                let bar = chart.draw_series(std::iter::once(Rectangle::new(
                    [(a, 0.0), (b, sp.median)],
                    color.mix(0.7).filled(),
                )))?;
                if k == 0 {
                    bar.label(engines[e]).legend(move |(x, y)| {
                        Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.mix(0.7).filled())
                    });
                }
                let mid = (a + b) / 2.0;
                chart.draw_series(std::iter::once(PathElement::new(
                    [(mid, sp.min), (mid, sp.max)],
                    BLACK.stroke_width(2),
                )))?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 15))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::verdict;

    #[test]
    fn a_target_below_the_floor_says_so() {
        assert_eq!(verdict(Some(0.6), 0.7, Some(0.5)), "met");
        assert_eq!(verdict(Some(0.9), 0.7, Some(0.6)), "**not met**");
        assert!(verdict(Some(0.9), 0.5, Some(0.6)).contains("below the floor (0.60)"));
        assert_eq!(verdict(Some(0.9), 0.7, None), "**not met**");
        assert_eq!(verdict(None, 0.7, Some(0.6)), "not measured");
    }
}
