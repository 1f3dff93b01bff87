//! The PNG: first-pass throughput across guest sizes with the ceilings as
//! dashed lines (left), downtime across dirty rates with the budget (right).

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::ceiling::{Ceiling, ceiling_for};
use crate::cell::{Cell, Spread};
use crate::plan::DOWNTIME_MS;

const FONTS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

pub fn load_font() -> Result<()> {
    let bytes = FONTS
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .context("no DejaVuSans.ttf for the plot's text (apt-get install fonts-dejavu-core)")?;
    // Registered once for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("DejaVuSans.ttf is not a usable font"))
}

/// The series: one per site and transport.
fn series(cells: &[Cell]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for c in cells {
        let id = (c.case.site.clone(), c.case.transport.clone());
        if !out.contains(&id) {
            out.push(id);
        }
    }
    out
}

pub fn draw(path: &Path, cells: &[Cell], ceilings: &[Ceiling]) -> Result<()> {
    load_font()?;
    let root = BitMapBackend::new(path, (1600, 720)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(900);
    let series = series(cells);
    let color = |i: usize| Palette99::pick(i).to_rgba();

    // Left: throughput vs size, idle all-random guests.
    let all_mbps: Vec<f64> = cells
        .iter()
        .flat_map(|c| c.runs.iter().map(|r| r.first_pass_mbps))
        .chain(
            ceilings
                .iter()
                .filter(|c| c.bounds != "memory")
                .flat_map(|c| c.mbps.clone()),
        )
        .filter(|x| *x > 0.0)
        .collect();
    let ymax = all_mbps.iter().copied().fold(1000.0, f64::max) * 2.0;
    let ymin = all_mbps
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .min(100.0)
        / 2.0;
    let sizes: Vec<u64> = cells.iter().map(|c| c.case.size_mib).collect();
    // x is log2 of the size in MiB: one label per power of two.
    let (xmin, xmax) = (
        (sizes.iter().copied().min().unwrap_or(32) as f64).log2() - 0.5,
        (sizes.iter().copied().max().unwrap_or(1024) as f64).log2() + 0.5,
    );
    let mut chart = ChartBuilder::on(&left)
        .caption(
            "First-pass throughput, idle all-random guest (dashed: ceiling)",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(xmin..xmax, (ymin..ymax).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("guest memory (MiB)")
        .y_desc("Mbit/s (log)")
        .x_labels(((xmax - xmin).ceil() as usize + 1) * 2)
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 0.01 {
                format!("{}", 2f64.powf(x.round()))
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()?;
    for (i, (site, t)) in series.iter().enumerate() {
        let col = color(i);
        let pts: Vec<(f64, Spread)> = cells
            .iter()
            .filter(|c| {
                c.case.site == *site
                    && c.case.transport == *t
                    && c.case.mix == "random"
                    && c.case.load == "idle"
                    && c.case.prefault
            })
            .filter_map(|c| {
                let x = (c.case.size_mib as f64).log2();
                Some((x, c.spread(|r| r.first_pass_mbps)?))
            })
            .collect();
        if pts.is_empty() {
            continue;
        }
        spread_series(&mut chart, &pts, col, 3, format!("{site} {t}"))?;
        if let Some(c) = ceiling_for(ceilings, site, t)
            .and_then(|c| Spread::of(c.mbps.iter().copied()).map(|s| (c.tool.clone(), s.median)))
        {
            chart
                .draw_series(DashedLineSeries::new(
                    [(xmin, c.1), (xmax, c.1)],
                    10,
                    6,
                    col.stroke_width(2),
                ))?
                .label(format!("{site}: {}", c.0))
                .legend(move |(x, y)| {
                    PathElement::new(
                        [(x, y), (x + 8, y), (x + 12, y), (x + 20, y)],
                        col.stroke_width(1),
                    )
                });
        }
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;

    // Right: downtime (verify aside) vs load, largest size per site.
    let loads = ["idle", "moderate", "high"];
    let downtimes: Vec<f64> = cells
        .iter()
        .flat_map(|c| c.runs.iter().map(|r| r.downtime_net_ms()))
        .collect();
    let dmax = downtimes
        .iter()
        .copied()
        .fold(DOWNTIME_MS as f64 * 1.2, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&right)
        .caption(
            format!("Downtime without --verify, largest guest (red: {DOWNTIME_MS} ms budget)"),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..2.5f64, (0.1f64..dmax).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("guest dirty rate")
        .y_desc("ms (log)")
        .y_label_formatter(&|y| format!("{y}"))
        .x_labels(3)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && (0.0..3.0).contains(&i) {
                loads[i as usize].to_string()
            } else {
                String::new()
            }
        })
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()?;
    chart.draw_series(LineSeries::new(
        [(-0.5, DOWNTIME_MS as f64), (2.5, DOWNTIME_MS as f64)],
        RED.stroke_width(2),
    ))?;
    let n = series.len().max(1) as f64;
    for (i, (site, t)) in series.iter().enumerate() {
        let col = color(i);
        let Some(size) = cells
            .iter()
            // The largest size measured at every dirty rate.
            .filter(|c| c.case.site == *site && c.case.transport == *t && c.case.load == "high")
            .map(|c| c.case.size_mib)
            .max()
        else {
            continue;
        };
        let dx = (i as f64 - (n - 1.0) / 2.0) * 0.08;
        let pts: Vec<(f64, Spread)> = loads
            .iter()
            .enumerate()
            .filter_map(|(j, load)| {
                let c = cells.iter().find(|c| {
                    c.case.site == *site
                        && c.case.transport == *t
                        && c.case.mix == "random"
                        && c.case.load == *load
                        && c.case.size_mib == size
                        && c.case.prefault
                })?;
                Some((j as f64 + dx, c.spread(|r| r.downtime_net_ms().max(0.1))?))
            })
            .collect();
        spread_series(&mut chart, &pts, col, 2, format!("{site} {t} {size} MiB"))?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Both panels: x linear, y logarithmic.
type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, LogCoord<f64>>>;

/// One series: medians joined by a line, a dot at each, a bar from min to
/// max, and a legend entry.
fn spread_series(
    chart: &mut Chart<'_, '_>,
    pts: &[(f64, Spread)],
    col: RGBAColor,
    width: u32,
    label: String,
) -> Result<()> {
    chart
        .draw_series(LineSeries::new(
            pts.iter().map(|(x, s)| (*x, s.median)),
            col.stroke_width(width),
        ))?
        .label(label)
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], col.stroke_width(3)));
    chart.draw_series(
        pts.iter()
            .map(|(x, s)| Circle::new((*x, s.median), 5, col.filled())),
    )?;
    chart.draw_series(
        pts.iter()
            .map(|(x, s)| PathElement::new([(*x, s.min), (*x, s.max)], col.stroke_width(2))),
    )?;
    Ok(())
}

fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, at: SeriesLabelPosition) -> Result<()> {
    chart
        .configure_series_labels()
        .position(at)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
