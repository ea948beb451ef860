//! SVG plots of used SNAT ports over time against the preallocation (plotters, SVG backend
//! only, no system fonts: text is SVG `<text>`).
//!
//! [`plot_report`] draws one replay: per instance its used ports (TCP, and UDP when used) as a
//! step line and its preallocation (R2.8) as a thin line of the same colour. [`plot_what_if`]
//! draws the busiest instance of each what-if variant on one chart with the baseline's
//! preallocation. Both return the SVG text; the caller writes the file.

use plotters::prelude::*;

use crate::error::PlanError;
use crate::mitigate::WhatIf;
use crate::report::{Report, Timeline};

const COLOURS: [RGBColor; 8] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// A step line through change points: the value holds until the next point.
fn steps(points: &[(u32, u32)]) -> Vec<(f64, f64)> {
    let mut v = Vec::with_capacity(points.len() * 2);
    for (k, &(t, y)) in points.iter().enumerate() {
        if k > 0 {
            v.push((f64::from(t), f64::from(points[k - 1].1)));
        }
        v.push((f64::from(t), f64::from(y)));
    }
    v
}

struct Line {
    label: String,
    colour: RGBColor,
    points: Vec<(f64, f64)>,
    thin: bool,
}

fn used_line(tl: &Timeline, proto: usize) -> Vec<(u32, u32)> {
    tl.points.iter().map(|p| (p.0, p.1[proto])).collect()
}

fn alloc_line(tl: &Timeline) -> Vec<(u32, u32)> {
    tl.points.iter().map(|p| (p.0, p.2)).collect()
}

/// The plotting library's error, as text (its type is generic over the backend).
fn plot_err(e: impl std::fmt::Display) -> PlanError {
    PlanError::Plot(e.to_string())
}

fn draw(title: &str, x_max: f64, lines: &[Line]) -> Result<String, PlanError> {
    let y_max = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(1.0f64, f64::max)
        * 1.1;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 450)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max.max(1.0), 0f64..y_max)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("time (s)")
            .y_desc("SNAT ports")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()
            .map_err(plot_err)?;
        for l in lines {
            let c = l.colour;
            let style = if l.thin {
                c.mix(0.6).stroke_width(1)
            } else {
                c.stroke_width(2)
            };
            chart
                .draw_series(LineSeries::new(l.points.iter().copied(), style))
                .map_err(plot_err)?
                .label(l.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// Used ports over time of every instance of `r` (needs a replay with `Options::timeline`).
pub fn plot_report(r: &Report, title: &str) -> Result<String, PlanError> {
    let mut lines = Vec::new();
    for (k, tl) in r.timeline.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        lines.push(Line {
            label: format!("{} used (tcp)", tl.instance),
            colour,
            points: steps(&used_line(tl, 0)),
            thin: false,
        });
        if tl.points.iter().any(|p| p.1[1] > 0) {
            lines.push(Line {
                label: format!("{} used (udp)", tl.instance),
                colour: COLOURS[(k + 4) % COLOURS.len()],
                points: steps(&used_line(tl, 1)),
                thin: false,
            });
        }
        if tl.allocated < 65535 {
            lines.push(Line {
                label: format!("{} preallocated", tl.instance),
                colour,
                points: steps(&alloc_line(tl)),
                thin: true,
            });
        }
    }
    draw(title, r.end_s, &lines)
}

/// The busiest instance of each what-if variant, and the baseline's preallocation.
pub fn plot_what_if(rows: &[WhatIf], title: &str) -> Result<String, PlanError> {
    let mut lines = Vec::new();
    let mut x_max = 1.0f64;
    let mut base_alloc = None;
    for (k, row) in rows.iter().enumerate() {
        let Ok(r) = &row.outcome else { continue };
        x_max = x_max.max(r.end_s);
        let Some(b) = r.busiest() else { continue };
        let Some(tl) = r.timeline.iter().find(|t| t.instance == b.name) else {
            continue;
        };
        let proto = usize::from(b.peak_used[1] > b.peak_used[0]);
        let points = steps(&used_line(tl, proto));
        // Identical curves hide each other: say so in the legend.
        let label = match lines.iter().find(|l: &&Line| l.points == points) {
            Some(same) => format!("{} (= {})", row.label, same.label),
            None => row.label.clone(),
        };
        lines.push(Line {
            label,
            colour: COLOURS[k % COLOURS.len()],
            points,
            thin: false,
        });
        if k == 0 {
            base_alloc = Some(steps(&alloc_line(tl)));
        }
    }
    if let Some(p) = base_alloc {
        lines.push(Line {
            label: "preallocated (baseline)".into(),
            colour: RGBColor(0, 0, 0),
            points: p,
            thin: true,
        });
    }
    draw(title, x_max, &lines)
}
