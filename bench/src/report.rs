//! The results table (markdown, for BENCHMARKS.md) and a PNG chart of throughput and
//! latency next to the ceilings.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use crate::figures::Run;

/// One row of the table: a figure over its runs, and the ceiling over its runs.
pub struct Row {
    pub figure: String,
    /// The figure's name under its bars in the chart.
    pub label: &'static str,
    pub unit: &'static str,
    pub runs: Vec<Run>,
    pub ceiling_name: String,
    pub ceiling: Vec<Run>,
    pub target: String,
    /// Whether the median meets the target (`None`: no target for this row).
    pub met: Option<bool>,
    /// Shown in the chart.
    pub chart: bool,
    /// What the ratio column compares with the ceiling.
    pub compare: Compare,
}

/// The ratio of a row: throughput against the ceiling's, or, for a latency figure, the
/// ceiling's p99 against ours (both: 100 % = as good as the raw ceiling).
#[derive(Clone, Copy)]
pub enum Compare {
    Rate,
    P99,
}

/// Median, min and max of `value` over `runs`.
pub fn stats(runs: &[Run], value: impl Fn(&Run) -> f64) -> (f64, f64, f64) {
    let mut values: Vec<f64> = runs.iter().map(value).collect();
    values.sort_by(f64::total_cmp);
    let median = values.get(values.len() / 2).copied().unwrap_or(0.0);
    let min = values.first().copied().unwrap_or(0.0);
    let max = values.last().copied().unwrap_or(0.0);
    (median, min, max)
}

pub fn median(runs: &[Run], value: impl Fn(&Run) -> f64) -> f64 {
    stats(runs, value).0
}

fn number(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

impl Row {
    pub fn ratio(&self) -> Option<f64> {
        match self.compare {
            Compare::Rate => {
                let ceiling = median(&self.ceiling, |r| r.rate);
                (ceiling > 0.0).then(|| median(&self.runs, |r| r.rate) / ceiling)
            }
            Compare::P99 => {
                let ours = median(&self.runs, |r| r.p99_ms);
                (ours > 0.0 && !self.ceiling.is_empty())
                    .then(|| median(&self.ceiling, |r| r.p99_ms) / ours)
            }
        }
    }
}

/// The markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str("| figure | median (min – max) | p50 / p99 ms | ceiling: median | ratio | target | met | CPU s system / load generator |\n");
    out.push_str("|---|---|---|---|---|---|---|---|\n");
    for row in rows {
        let (median_rate, min, max) = stats(&row.runs, |r| r.rate);
        let p50 = median(&row.runs, |r| r.p50_ms);
        let p99 = median(&row.runs, |r| r.p99_ms);
        let ceiling = if row.ceiling.is_empty() {
            "—".to_owned()
        } else {
            let rate = median(&row.ceiling, |r| r.rate);
            let p99 = median(&row.ceiling, |r| r.p99_ms);
            if p99 > 0.0 {
                format!(
                    "{}: {} {} (p99 {} ms)",
                    row.ceiling_name,
                    number(rate),
                    row.unit,
                    number(p99)
                )
            } else {
                format!("{}: {} {}", row.ceiling_name, number(rate), row.unit)
            }
        };
        let ratio = row
            .ratio()
            .map_or_else(|| "—".to_owned(), |r| format!("{:.0} %", r * 100.0));
        let met = match row.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        let latency = if p99 > 0.0 {
            format!("{} / {}", number(p50), number(p99))
        } else {
            "—".to_owned()
        };
        let _ = writeln!(
            out,
            "| {} | {} {} ({} – {}) | {} | {} | {} | {} | {} | {:.1} / {:.1} |",
            row.figure,
            number(median_rate),
            row.unit,
            number(min),
            number(max),
            latency,
            ceiling,
            ratio,
            row.target,
            met,
            median(&row.runs, |r| r.system_cpu),
            median(&row.runs, |r| r.load_cpu),
        );
    }
    out
}

/// Two panels: throughput of each charted figure next to its ceiling, and p99 latency.
pub fn chart(rows: &[Row], path: &Path) -> anyhow::Result<()> {
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
        .context("the DejaVu font (Debian package fonts-dejavu-core) for the chart")?;
    // plotters keeps registered fonts for the life of the process.
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("registering the chart font"))?;

    let rows: Vec<&Row> = rows.iter().filter(|r| r.chart).collect();
    let root = BitMapBackend::new(path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(450);
    let labels: Vec<String> = rows.iter().map(|r| r.label.to_owned()).collect();

    let throughput: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| (median(&r.runs, |x| x.rate), median(&r.ceiling, |x| x.rate)))
        .collect();
    let highest = throughput
        .iter()
        .map(|(a, b)| a.max(*b))
        .fold(1.0, f64::max);
    bars(
        &top,
        "Throughput per second (median): system (blue) vs raw ceiling (grey)",
        &labels,
        &throughput,
        highest * 1.1,
    )?;

    let latency: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| {
            (
                median(&r.runs, |x| x.p99_ms),
                median(&r.ceiling, |x| x.p99_ms),
            )
        })
        .collect();
    let highest = latency.iter().map(|(a, b)| a.max(*b)).fold(1.0, f64::max);
    bars(
        &bottom,
        "p99 latency in ms (median of runs): system (blue) vs raw ceiling (grey)",
        &labels,
        &latency,
        highest * 1.1,
    )?;
    root.present()?;
    Ok(())
}

fn bars(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    labels: &[String],
    values: &[(f64, f64)],
    top: f64,
) -> anyhow::Result<()> {
    let n = labels.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..n as f64, 0.0..top)?;
    let labels_for_axis = labels.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&move |x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 {
                labels_for_axis.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 14))
        .draw()?;
    for (i, (system, ceiling)) in values.iter().enumerate() {
        let x = i as f64;
        chart.draw_series([Rectangle::new(
            [(x + 0.15, 0.0), (x + 0.48, *system)],
            BLUE.filled(),
        )])?;
        chart.draw_series([Rectangle::new(
            [(x + 0.52, 0.0), (x + 0.85, *ceiling)],
            RGBColor(160, 160, 160).filled(),
        )])?;
    }
    Ok(())
}

/// The machine, for the report header.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or_else(
            || "?".into(),
            |kb| format!("{:.0} GiB", kb / 1024.0 / 1024.0),
        );
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    format!("{cores} cores ({cpu}), {memory} RAM, Linux {kernel}")
}

/// The 1-minute load average (`/proc/loadavg`): other work on the machine shows up here.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}
