//! tollgate-chart: draws scenario (a)'s latency percentiles (direct, pass-through, tollgate,
//! one panel per rate) from `bench/run.sh`'s results (the loadgen's JSON lines) as an SVG.
//!
//!     tollgate-chart RESULTS.jsonl OUT.svg

use std::collections::BTreeMap;
use std::process::ExitCode;

use plotters::prelude::*;
use serde_json::Value;

const PERCENTILES: [(&str, &str); 5] = [
    ("p50", "p50"),
    ("p90", "p90"),
    ("p99", "p99"),
    ("p99_9", "p99.9"),
    ("max", "max"),
];
const TARGETS: [(&str, RGBColor); 3] = [
    ("direct", RGBColor(120, 120, 120)),
    ("passthrough", RGBColor(31, 119, 180)),
    ("tollgate", RGBColor(214, 39, 40)),
];

/// rate → target → the five percentiles, in microseconds.
type Series = BTreeMap<u64, BTreeMap<String, Vec<f64>>>;

fn read(path: &str) -> Result<Series, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let mut out = Series::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).map_err(|e| format!("{path}: {e}"))?;
        let label = v["label"].as_str().unwrap_or_default();
        let parts: Vec<&str> = label.split(':').collect();
        let [scenario, rate, target] = parts[..] else {
            continue;
        };
        let Ok(rate) = rate.parse::<u64>() else {
            continue;
        };
        if scenario != "a" || v["valid"] != true {
            continue;
        }
        let lat = &v["latency_us"];
        let points: Option<Vec<f64>> = PERCENTILES
            .iter()
            .map(|(k, _)| lat[*k].as_f64().map(|us| us.max(1.0)))
            .collect();
        if let Some(points) = points {
            out.entry(rate)
                .or_default()
                .insert(target.to_string(), points);
        }
    }
    if out.is_empty() {
        return Err(format!("{path}: no valid scenario (a) results"));
    }
    Ok(out)
}

fn draw(series: &Series, out: &str) -> Result<(), Box<dyn std::error::Error>> {
    let panels = series.len() as u32;
    let root = SVGBackend::new(out, (460 * panels, 360)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((1, series.len()));
    for (area, (rate, targets)) in areas.iter().zip(series) {
        let max = targets.values().flatten().fold(1.0_f64, |m, v| m.max(*v)) * 1.5;
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("non-streaming, open loop at {rate} req/s"),
                ("sans-serif", 16),
            )
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(64)
            .build_cartesian_2d(0..PERCENTILES.len() - 1, (10.0_f64..max).log_scale())?;
        chart
            .configure_mesh()
            .x_labels(PERCENTILES.len())
            .x_label_formatter(&|i| PERCENTILES.get(*i).map_or("", |p| p.1).to_string())
            .y_desc("latency (us, log)")
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        for (name, color) in TARGETS {
            let Some(points) = targets.get(name) else {
                continue;
            };
            chart
                .draw_series(LineSeries::new(
                    points.iter().enumerate().map(|(i, v)| (i, *v)),
                    color.stroke_width(2),
                ))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            chart.draw_series(
                points
                    .iter()
                    .enumerate()
                    .map(|(i, v)| Circle::new((i, *v), 3, color.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, results, out] = &args[..] else {
        eprintln!("usage: tollgate-chart RESULTS.jsonl OUT.svg");
        return ExitCode::from(1);
    };
    let drawn = read(results).and_then(|s| draw(&s, out).map_err(|e| e.to_string()));
    match drawn {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate-chart: {e}");
            ExitCode::from(1)
        }
    }
}
