//! The SVG plots. [`draw`]: one row per scenario. Left, the first reloads up close:
//! connections per second by the generation that answered them (one line
//! per generation), reload starts as grey lines, failed connections as red
//! crosses. Right, the whole run: all successful connections per second
//! and failures per second. [`lines`]: panels of lines against a linear x
//! axis (the scale section: costs against listeners; linear, so that
//! linear growth looks straight).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use super::report::Buckets;

/// What one scenario's row shows.
pub struct Row {
    pub title: String,
    /// Load start, for the time axis (`CLOCK_MONOTONIC`, ns).
    pub t0_ns: u64,
    pub zoom: Buckets,
    pub whole: Buckets,
    /// Reload windows, seconds since the load started.
    pub reloads_s: Vec<(f64, f64)>,
    pub failed: u64,
    pub connections: u64,
}

const GENERATION_COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(23, 190, 207),
];
const FAILED: RGBColor = RGBColor(214, 39, 40);
const MARKER: RGBColor = RGBColor(150, 150, 150);

fn err(e: impl std::fmt::Debug) -> anyhow::Error {
    anyhow!("plot: {e:?}")
}

/// Bucket `i`'s middle, seconds since `t0_ns`.
fn x(b: &Buckets, t0_ns: u64, i: usize) -> f64 {
    (b.from_ns - t0_ns) as f64 / 1e9 + (i as f64 + 0.5) * b.width_ns as f64 / 1e9
}

fn per_second(b: &Buckets, count: u32) -> f64 {
    f64::from(count) * 1e9 / b.width_ns as f64
}

fn range(b: &Buckets, t0_ns: u64) -> std::ops::Range<f64> {
    let from = (b.from_ns - t0_ns) as f64 / 1e9;
    from..from + b.ok.len() as f64 * b.width_ns as f64 / 1e9
}

pub fn draw(path: &Path, heading: &str, rows: &[Row]) -> Result<()> {
    let (width, row_height) = (1500u32, 280u32);
    let root =
        SVGBackend::new(path, (width, 70 + row_height * rows.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (top, body) = root.split_vertically(70);
    top.draw_text(
        heading,
        &("sans-serif", 20).into_font().color(&BLACK),
        (15, 10),
    )
    .map_err(err)?;
    top.draw_text(
        "lines: connections/s answered by each generation (left) or by all (right); \
         red ×: failed connections/s; grey lines: reload start and end",
        &("sans-serif", 14).into_font().color(&BLACK),
        (15, 40),
    )
    .map_err(err)?;
    let cells = body.split_evenly((rows.len().max(1), 2));
    for (row, pair) in rows.iter().zip(cells.chunks(2)) {
        zoom(&pair[0], row)?;
        whole(&pair[1], row)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

fn y_max(b: &Buckets) -> f64 {
    let top =
        b.ok.iter()
            .zip(&b.failed)
            .map(|(o, f)| per_second(b, *o.max(f)))
            .fold(1.0, f64::max);
    top * 1.15
}

fn zoom(area: &DrawingArea<SVGBackend, plotters::coord::Shift>, row: &Row) -> Result<()> {
    let b = &row.zoom;
    let xs = range(b, row.t0_ns);
    let ymax = y_max(b);
    let mut chart = axes(
        area,
        format!("{} — first reloads", row.title),
        xs.clone(),
        ymax,
    )?;
    for &(start, end) in row.reloads_s.iter().filter(|(s, _)| xs.contains(s)) {
        for (t, dashed) in [(start, false), (end, true)] {
            let style = if dashed {
                MARKER.mix(0.5).stroke_width(1)
            } else {
                MARKER.stroke_width(1)
            };
            chart
                .draw_series(LineSeries::new([(t, 0.0), (t, ymax)], style))
                .map_err(err)?;
        }
    }
    for (g, counts) in &b.ok_by_generation {
        let color = GENERATION_COLORS[*g as usize % GENERATION_COLORS.len()];
        rate_line(&mut chart, b, row.t0_ns, counts, color.stroke_width(2))?;
    }
    failures(&mut chart, b, row.t0_ns)?;
    Ok(())
}

/// A chart of connections per second over seconds, axes drawn.
fn axes<'a, 'b>(
    area: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    caption: String,
    xs: std::ops::Range<f64>,
    ymax: f64,
) -> Result<Chart<'a, 'b>> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 15))
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(55)
        .build_cartesian_2d(xs, 0.0..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the load started")
        .y_desc("connections/s")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    Ok(chart)
}

type Chart<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// Per-bucket counts as a line of connections per second.
fn rate_line(
    chart: &mut Chart<'_, '_>,
    b: &Buckets,
    t0_ns: u64,
    counts: &[u32],
    style: ShapeStyle,
) -> Result<()> {
    let points: Vec<(f64, f64)> = counts
        .iter()
        .enumerate()
        .map(|(i, c)| (x(b, t0_ns, i), per_second(b, *c)))
        .collect();
    chart
        .draw_series(LineSeries::new(points, style))
        .map_err(err)?;
    Ok(())
}

/// Failed connections per second, as red crosses where there were any.
fn failures(chart: &mut Chart<'_, '_>, b: &Buckets, t0_ns: u64) -> Result<()> {
    chart
        .draw_series(
            b.failed
                .iter()
                .enumerate()
                .filter(|(_, f)| **f > 0)
                .map(|(i, f)| {
                    Cross::new(
                        (x(b, t0_ns, i), per_second(b, *f)),
                        5,
                        FAILED.stroke_width(2),
                    )
                }),
        )
        .map_err(|e| anyhow!("plot: {e:?}"))?;
    Ok(())
}

fn whole(area: &DrawingArea<SVGBackend, plotters::coord::Shift>, row: &Row) -> Result<()> {
    let b = &row.whole;
    let xs = range(b, row.t0_ns);
    let ymax = y_max(b);
    let caption = format!(
        "whole run: {} reloads, {} of {} connections failed",
        row.reloads_s.len(),
        row.failed,
        row.connections
    );
    let mut chart = axes(area, caption, xs, ymax)?;
    if row.reloads_s.len() <= 50 {
        for &(start, _) in &row.reloads_s {
            chart
                .draw_series(LineSeries::new(
                    [(start, 0.0), (start, ymax)],
                    MARKER.stroke_width(1),
                ))
                .map_err(err)?;
        }
    }
    rate_line(&mut chart, b, row.t0_ns, &b.ok, BLACK.stroke_width(1))?;
    failures(&mut chart, b, row.t0_ns)?;
    Ok(())
}

/// One line of a [`lines`] panel.
pub struct Series {
    pub name: String,
    /// (x, y), x ≥ 0.
    pub points: Vec<(f64, f64)>,
}

/// One chart of [`lines`].
pub struct Panel {
    pub title: String,
    pub y_desc: String,
    pub series: Vec<Series>,
}

/// Panels side by side, each a set of lines with points marked, against
/// the same linear x axis from 0; a legend in each.
pub fn lines(path: &Path, heading: &str, x_desc: &str, panels: &[Panel]) -> Result<()> {
    let (panel_width, height) = (750u32, 520u32);
    let root = SVGBackend::new(
        path,
        (panel_width * panels.len().max(1) as u32, height + 40),
    )
    .into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (top, body) = root.split_vertically(40);
    top.draw_text(
        heading,
        &("sans-serif", 18).into_font().color(&BLACK),
        (15, 10),
    )
    .map_err(err)?;
    let cells = body.split_evenly((1, panels.len().max(1)));
    for (panel, area) in panels.iter().zip(&cells) {
        let all = panel.series.iter().flat_map(|s| s.points.iter());
        let x_max = all.clone().map(|p| p.0).fold(1.0, f64::max) * 1.05;
        let y_max = all.map(|p| p.1).fold(1.0, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 15))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(&panel.y_desc)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(err)?;
        for (i, s) in panel.series.iter().enumerate() {
            let color = GENERATION_COLORS[i % GENERATION_COLORS.len()];
            chart
                .draw_series(LineSeries::new(s.points.clone(), color.stroke_width(2)))
                .map_err(err)?
                .label(&s.name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}
