//! Charts (plotters), written as SVG and PNG with an embedded DejaVu font, so nothing is needed
//! from the system. Each chart is drawn by one generic function for both backends.

use crate::error::{Error, Result};
use crate::estimate::Estimate;
use crate::units::Bytes;
use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::FontStyle;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::{Path, PathBuf};
use std::sync::Once;

const SIZE: (u32, u32) = (1200, 720);
/// Colours of the memory terms, in stacking order.
const TERMS: [(&str, RGBColor); 7] = [
    ("weights", RGBColor(52, 101, 164)),
    ("gradients", RGBColor(245, 121, 0)),
    ("optimizer states", RGBColor(115, 210, 22)),
    ("activations", RGBColor(204, 0, 0)),
    ("logits / loss", RGBColor(117, 80, 123)),
    ("temporary", RGBColor(193, 125, 17)),
    ("runtime overhead", RGBColor(136, 138, 133)),
];
const LINES: [RGBColor; 7] = [
    RGBColor(52, 101, 164),
    RGBColor(204, 0, 0),
    RGBColor(115, 210, 22),
    RGBColor(245, 121, 0),
    RGBColor(117, 80, 123),
    RGBColor(193, 125, 17),
    RGBColor(46, 52, 54),
];

fn fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bundled DejaVu Sans (Bitstream Vera licence) covers every label.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
        let _ = plotters::style::register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold());
    });
}

pub use crate::explore::{Bar, Cell, Series, SweepPoint};

fn draw_err<E: std::fmt::Debug>(path: &Path) -> impl Fn(E) -> Error + '_ {
    move |e| Error::Write {
        path: path.into(),
        message: format!("chart: {e:?}"),
    }
}

/// A chart that can draw itself on any plotters backend.
trait Chart {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String>;
}

/// Draws `chart` into `dir/stem.svg` and `dir/stem.png` (each written atomically).
fn both(dir: &Path, stem: &str, chart: &impl Chart) -> Result<Vec<PathBuf>> {
    fonts();
    std::fs::create_dir_all(dir).map_err(|e| Error::Write {
        path: dir.into(),
        message: e.to_string(),
    })?;
    let svg_path = dir.join(format!("{stem}.svg"));
    let png_path = dir.join(format!("{stem}.png"));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        chart.draw(&root).map_err(draw_err(&svg_path))?;
        root.present().map_err(draw_err(&svg_path))?;
    }
    super::write_atomic(&svg_path, svg.as_bytes())?;
    // The bitmap backend writes by path: into our own exclusively created temporary file.
    let tmp = super::temp_beside(&png_path)?;
    {
        let root = BitMapBackend::new(tmp.path(), SIZE).into_drawing_area();
        let drawn = chart
            .draw(&root)
            .and_then(|_| root.present().map_err(|e| format!("{e:?}")));
        if let Err(e) = drawn {
            return Err(Error::Write {
                path: png_path,
                message: format!("chart: {e}"),
            });
        }
    }
    super::persist(tmp, &png_path)?;
    Ok(vec![svg_path, png_path])
}

fn gib(b: Bytes) -> f64 {
    b.gib()
}

/// The device's memory as a horizontal line across the plot, then the framed legend.
fn limit_and_legend<'a, DB: DrawingBackend + 'a, Y: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<RangedCoordf64, Y>>,
    x_end: f64,
    device: f64,
    what: &str,
    width: u32,
    position: SeriesLabelPosition,
) -> std::result::Result<(), String> {
    chart
        .draw_series(LineSeries::new(
            [(0.0, device), (x_end, device)],
            BLACK.stroke_width(width),
        ))
        .map_err(|e| format!("{e:?}"))?
        .label(format!("{what} ({device:.1} GiB)"))
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 14, y)], BLACK.stroke_width(width)));
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()
        .map_err(|e| format!("{e:?}"))
}

fn terms(e: &Estimate) -> [f64; 7] {
    let b = &e.memory.at_peak;
    [
        b.weights,
        b.gradients,
        b.optimizer,
        b.activations,
        b.logits,
        b.temporary,
        e.memory.overhead,
    ]
    .map(gib)
}

/// Stacked memory terms per method, with the device's memory as a line.
pub fn write_compare(dir: &Path, stem: &str, title: &str, bars: &[Bar]) -> Result<Vec<PathBuf>> {
    both(dir, stem, &Compare { title, bars })
}

struct Compare<'a> {
    title: &'a str,
    bars: &'a [Bar],
}

impl Chart for Compare<'_> {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        let (title, bars) = (self.title, self.bars);
        let device = bars.iter().map(|b| gib(b.budget)).fold(0.0, f64::max);
        // Per-GPU limit lines need room below the legend box.
        let per_gpu = !bars.iter().all(|b| b.budget == bars[0].budget);
        let top = bars
            .iter()
            .map(|b| terms(&b.estimate).iter().sum::<f64>())
            .fold(device, f64::max)
            * if per_gpu { 1.5 } else { 1.15 };
        let n = bars.len();
        {
            root.fill(&WHITE).map_err(|e| format!("{e:?}"))?;
            let mut chart = ChartBuilder::on(root)
                .caption(title, ("sans-serif", 24, FontStyle::Bold))
                .margin(20)
                .x_label_area_size(50)
                .y_label_area_size(80)
                .build_cartesian_2d(0f64..n as f64, 0f64..top)
                .map_err(|e| format!("{e:?}"))?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(0)
                .x_desc("method (labelled above each bar)")
                .y_desc("memory (GiB)")
                .label_style(("sans-serif", 18))
                .axis_desc_style(("sans-serif", 20))
                .draw()
                .map_err(|e| format!("{e:?}"))?;
            for (t, (name, color)) in TERMS.iter().enumerate() {
                let rects: Vec<Rectangle<(f64, f64)>> = bars
                    .iter()
                    .enumerate()
                    .map(|(i, b)| {
                        let v = terms(&b.estimate);
                        let below: f64 = v[..t].iter().sum();
                        Rectangle::new(
                            [(i as f64 + 0.2, below), (i as f64 + 0.8, below + v[t])],
                            color.filled(),
                        )
                    })
                    .collect();
                chart
                    .draw_series(rects)
                    .map_err(|e| format!("{e:?}"))?
                    .label(*name)
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled())
                    });
            }
            let above = Pos::new(HPos::Center, VPos::Bottom);
            for (i, b) in bars.iter().enumerate() {
                let total: f64 = terms(&b.estimate).iter().sum();
                let style = TextStyle::from(("sans-serif", 17).into_font()).pos(above);
                chart
                    .draw_series([Text::new(
                        format!("{} ({total:.1})", b.label),
                        (i as f64 + 0.5, total + top * 0.01),
                        style,
                    )])
                    .map_err(|e| format!("{e:?}"))?;
            }
            if bars.iter().all(|b| b.budget == bars[0].budget) {
                return limit_and_legend(
                    &mut chart,
                    n as f64,
                    device,
                    "device memory",
                    3,
                    SeriesLabelPosition::UpperRight,
                );
            }
            // Different GPUs: each bar is measured against its own device's memory.
            for (i, b) in bars.iter().enumerate() {
                let limit = gib(b.budget);
                let drawn = chart
                    .draw_series(LineSeries::new(
                        [(i as f64 + 0.1, limit), (i as f64 + 0.9, limit)],
                        BLACK.stroke_width(3),
                    ))
                    .map_err(|e| format!("{e:?}"))?;
                if i == 0 {
                    drawn
                        .label("device memory (each bar's GPU)")
                        .legend(|(x, y)| {
                            PathElement::new([(x, y), (x + 14, y)], BLACK.stroke_width(3))
                        });
                }
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .label_font(("sans-serif", 16))
                .draw()
                .map_err(|e| format!("{e:?}"))
        }
    }
}

/// Required memory against the swept variable, one curve per method, the device limit drawn.
pub fn write_sweep(
    dir: &Path,
    stem: &str,
    title: &str,
    axis: &str,
    series: &[Series],
    budget: Bytes,
) -> Result<Vec<PathBuf>> {
    both(
        dir,
        stem,
        &Sweep {
            title,
            axis,
            series,
            budget,
        },
    )
}

struct Sweep<'a> {
    title: &'a str,
    axis: &'a str,
    series: &'a [Series],
    budget: Bytes,
}

impl Chart for Sweep<'_> {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        let (title, axis, series, budget) = (self.title, self.axis, self.series, self.budget);
        let xs: Vec<u64> = series
            .first()
            .map(|s| s.points.iter().map(|p| p.x).collect())
            .unwrap_or_default();
        let device = gib(budget);
        let values = || {
            series
                .iter()
                .flat_map(|s| s.points.iter().map(|p| gib(p.required)))
        };
        let top = values().fold(device, f64::max) * 1.3;
        let bottom = values().fold(device, f64::min).max(0.01) * 0.7;
        let n = xs.len().max(1);
        {
            root.fill(&WHITE).map_err(|e| format!("{e:?}"))?;
            let mut chart = ChartBuilder::on(root)
                .caption(title, ("sans-serif", 24, FontStyle::Bold))
                .margin(20)
                .x_label_area_size(50)
                .y_label_area_size(80)
                .margin_right(50)
                .build_cartesian_2d(0f64..(n - 1).max(1) as f64, (bottom..top).log_scale())
                .map_err(|e| format!("{e:?}"))?;
            chart
                .configure_mesh()
                .light_line_style(WHITE)
                .x_labels(n)
                .y_labels(12)
                .y_label_formatter(&|y| format!("{y:.1}"))
                .x_label_formatter(&|x| {
                    xs.get(x.round() as usize)
                        .map(|v| v.to_string())
                        .unwrap_or_default()
                })
                .x_desc(format!("{axis}, log scale"))
                .y_desc("required memory (GiB, log scale)")
                .label_style(("sans-serif", 18))
                .axis_desc_style(("sans-serif", 20))
                .draw()
                .map_err(|e| format!("{e:?}"))?;
            for (i, s) in series.iter().enumerate() {
                let color = LINES[i % LINES.len()];
                chart
                    .draw_series(LineSeries::new(
                        s.points
                            .iter()
                            .enumerate()
                            .map(|(j, p)| (j as f64, gib(p.required).max(bottom))),
                        color.stroke_width(3),
                    ))
                    .map_err(|e| format!("{e:?}"))?
                    .label(s.name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 14, y)], color.stroke_width(3))
                    });
            }
            limit_and_legend(
                &mut chart,
                (n - 1).max(1) as f64,
                device,
                "device limit",
                2,
                SeriesLabelPosition::UpperLeft,
            )
        }
    }
}

/// Models x GPUs: green cells fit, red cells do not, each labelled with its required GiB.
pub fn write_matrix(
    dir: &Path,
    stem: &str,
    title: &str,
    gpus: &[String],
    rows: &[(String, Vec<Cell>)],
) -> Result<Vec<PathBuf>> {
    both(dir, stem, &Matrix { title, gpus, rows })
}

struct Matrix<'a> {
    title: &'a str,
    gpus: &'a [String],
    rows: &'a [(String, Vec<Cell>)],
}

impl Chart for Matrix<'_> {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        let (title, gpus, rows) = (self.title, self.gpus, self.rows);
        let (cols, nrows) = (gpus.len().max(1), rows.len().max(1));
        {
            root.fill(&WHITE).map_err(|e| format!("{e:?}"))?;
            let mut chart = ChartBuilder::on(root)
                .caption(title, ("sans-serif", 24, FontStyle::Bold))
                .margin(20)
                .x_label_area_size(50)
                .y_label_area_size(160)
                .build_cartesian_2d(0f64..cols as f64, 0f64..nrows as f64)
                .map_err(|e| format!("{e:?}"))?;
            chart
                .configure_mesh()
                .disable_mesh()
                .x_labels(cols * 2 + 1)
                .y_labels(nrows * 2 + 1)
                .x_label_formatter(&|x| {
                    if x.fract() > 0.25 && x.fract() < 0.75 {
                        gpus.get(x.floor() as usize).cloned().unwrap_or_default()
                    } else {
                        String::new()
                    }
                })
                .y_label_formatter(&|y| {
                    if y.fract() > 0.25 && y.fract() < 0.75 {
                        rows.get(nrows - 1 - y.floor() as usize)
                            .map(|r| r.0.clone())
                            .unwrap_or_default()
                    } else {
                        String::new()
                    }
                })
                .x_desc("GPU")
                .y_desc("model")
                .label_style(("sans-serif", 16))
                .axis_desc_style(("sans-serif", 20))
                .draw()
                .map_err(|e| format!("{e:?}"))?;
            for (r, (_, cells)) in rows.iter().enumerate() {
                let y = (nrows - 1 - r) as f64;
                for (c, cell) in cells.iter().enumerate() {
                    let color = if cell.fits {
                        RGBColor(138, 226, 52)
                    } else {
                        RGBColor(239, 41, 41)
                    };
                    chart
                        .draw_series([Rectangle::new(
                            [(c as f64 + 0.04, y + 0.06), (c as f64 + 0.96, y + 0.94)],
                            color.mix(0.7).filled(),
                        )])
                        .map_err(|e| format!("{e:?}"))?;
                    let label = format!("{:.1} GiB", gib(cell.required));
                    chart
                        .draw_series([Text::new(
                            label,
                            (c as f64 + 0.2, y + 0.6),
                            ("sans-serif", 16),
                        )])
                        .map_err(|e| format!("{e:?}"))?;
                }
            }
            Ok(())
        }
    }
}

/// "GPUs needed per method": models along x, the fewest GPUs each method needs (log scale).
pub fn write_gpus_needed(
    dir: &Path,
    stem: &str,
    title: &str,
    models: &[String],
    series: &[crate::explore::Needed],
) -> Result<Vec<PathBuf>> {
    both(
        dir,
        stem,
        &Needed {
            title,
            models,
            series,
        },
    )
}

struct Needed<'a> {
    title: &'a str,
    models: &'a [String],
    series: &'a [crate::explore::Needed],
}

impl Chart for Needed<'_> {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        let most = self
            .series
            .iter()
            .flat_map(|s| s.gpus.iter().flatten())
            .copied()
            .max()
            .unwrap_or(1)
            .max(2) as f64;
        let n = self.models.len().max(1);
        root.fill(&WHITE).map_err(|e| format!("{e:?}"))?;
        let mut chart = ChartBuilder::on(root)
            .caption(self.title, ("sans-serif", 24, FontStyle::Bold))
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(80)
            .margin_right(50)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), (0.7f64..most * 1.6).log_scale())
            .map_err(|e| format!("{e:?}"))?;
        let models = self.models;
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .x_labels(n)
            .y_labels(12)
            .y_label_formatter(&|y| format!("{y:.0}"))
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() > 0.01 || i < 0.0 {
                    return String::new();
                }
                models.get(i as usize).cloned().unwrap_or_default()
            })
            .x_desc("model")
            .y_desc("fewest GPUs that fit (log scale)")
            .label_style(("sans-serif", 18))
            .axis_desc_style(("sans-serif", 20))
            .draw()
            .map_err(|e| format!("{e:?}"))?;
        for (i, s) in self.series.iter().enumerate() {
            let color = LINES[i % LINES.len()];
            let points: Vec<(f64, f64)> = s
                .gpus
                .iter()
                .enumerate()
                .filter_map(|(j, g)| g.map(|g| (j as f64, g as f64)))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(3)))
                .map_err(|e| format!("{e:?}"))?
                .label(s.method.clone())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 14, y)], color.stroke_width(3))
                });
            chart
                .draw_series(points.iter().map(|&(x, y)| {
                    EmptyElement::at((x, y))
                        + Circle::new((0, 0), 6, color.filled())
                        + Text::new(
                            format!("{y:.0}"),
                            (8, -22),
                            ("sans-serif", 16).into_font().color(&color),
                        )
                }))
                .map_err(|e| format!("{e:?}"))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 18))
            .draw()
            .map_err(|e| format!("{e:?}"))
    }
}
