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
const LINES: [RGBColor; 10] = [
    RGBColor(52, 101, 164),
    RGBColor(204, 0, 0),
    RGBColor(115, 210, 22),
    RGBColor(245, 121, 0),
    RGBColor(117, 80, 123),
    RGBColor(193, 125, 17),
    RGBColor(46, 52, 54),
    RGBColor(6, 152, 154),
    RGBColor(237, 212, 0),
    RGBColor(233, 115, 205),
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
    both_sized(dir, stem, chart, SIZE)
}

fn both_sized(
    dir: &Path,
    stem: &str,
    chart: &impl Chart,
    size: (u32, u32),
) -> Result<Vec<PathBuf>> {
    fonts();
    std::fs::create_dir_all(dir).map_err(|e| Error::Write {
        path: dir.into(),
        message: e.to_string(),
    })?;
    let svg_path = dir.join(format!("{stem}.svg"));
    let png_path = dir.join(format!("{stem}.png"));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        chart.draw(&root).map_err(draw_err(&svg_path))?;
        root.present().map_err(draw_err(&svg_path))?;
    }
    super::write_atomic(&svg_path, svg.as_bytes())?;
    // The bitmap backend writes by path: into our own exclusively created temporary file.
    let tmp = super::temp_beside(&png_path)?;
    {
        let root = BitMapBackend::new(tmp.path(), size).into_drawing_area();
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

/// "Which parameters update": one panel per method, parts by block.
pub fn write_updates(dir: &Path, stem: &str, u: &crate::explore::Updates) -> Result<Vec<PathBuf>> {
    let height = 150 + 128 * u.panels.len() as u32;
    both_sized(dir, stem, &UpdatesChart(u), (1200, height))
}

struct UpdatesChart<'a>(&'a crate::explore::Updates);

const UPDATE_COLOURS: [(crate::explore::Update, &str, RGBColor); 5] = [
    (
        crate::explore::Update::Trains,
        "trains",
        RGBColor(78, 154, 6),
    ),
    (
        crate::explore::Update::Partly,
        "partly trains",
        RGBColor(170, 220, 120),
    ),
    (
        crate::explore::Update::Added,
        "added by the method",
        RGBColor(245, 121, 0),
    ),
    (
        crate::explore::Update::Frozen,
        "frozen",
        RGBColor(186, 189, 182),
    ),
    (
        crate::explore::Update::Absent,
        "none here",
        RGBColor(255, 255, 255),
    ),
];

impl Chart for UpdatesChart<'_> {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        let u = self.0;
        let err = |e| format!("{e:?}");
        root.fill(&WHITE).map_err(err)?;
        let font = |size| ("sans-serif", size).into_font();
        root.draw(&Text::new(
            u.title.clone(),
            (20, 15),
            ("sans-serif", 24, FontStyle::Bold).into_font(),
        ))
        .map_err(err)?;
        let (left, right) = (330i32, 1180i32);
        let columns = u.blocks as i32 + 1;
        let cell_w = ((right - left) / columns).max(1);
        let row_h = 18i32;
        for (i, panel) in u.panels.iter().enumerate() {
            let top = 60 + 128 * i as i32;
            root.draw(&Text::new(
                format!(
                    "{} ({} trainable)",
                    panel.method,
                    human(panel.trainable_params)
                ),
                (20, top),
                ("sans-serif", 18, FontStyle::Bold).into_font(),
            ))
            .map_err(err)?;
            for (r, part) in crate::explore::PARTS.iter().enumerate() {
                let y = top + 22 + r as i32 * row_h;
                root.draw(&Text::new(part.to_string(), (40, y + 2), font(14)))
                    .map_err(err)?;
                for (c, cell) in panel.cells.iter().enumerate() {
                    let x = left + c as i32 * cell_w + if c > 0 { 6 } else { 0 };
                    let colour = UPDATE_COLOURS
                        .iter()
                        .find(|(k, _, _)| *k == cell[r])
                        .map_or(WHITE, |(_, _, col)| *col);
                    root.draw(&Rectangle::new(
                        [(x, y), (x + cell_w - 1, y + row_h - 2)],
                        colour.filled(),
                    ))
                    .map_err(err)?;
                }
            }
        }
        // Column legend and colour key.
        let y = 60 + 128 * u.panels.len() as i32;
        root.draw(&Text::new(
            format!(
                "first column: outside the blocks (embeddings, final norm, head); then blocks 0..{}",
                u.blocks.saturating_sub(1)
            ),
            (left, y),
            font(14),
        ))
        .map_err(err)?;
        for (k, (_, label, colour)) in UPDATE_COLOURS.iter().enumerate() {
            let x = 40 + 220 * k as i32;
            root.draw(&Rectangle::new(
                [(x, y + 30), (x + 18, y + 46)],
                ShapeStyle::from(colour).filled(),
            ))
            .map_err(err)?;
            root.draw(&Rectangle::new([(x, y + 30), (x + 18, y + 46)], BLACK))
                .map_err(err)?;
            root.draw(&Text::new(label.to_string(), (x + 26, y + 31), font(16)))
                .map_err(err)?;
        }
        Ok(())
    }
}

fn human(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2} M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} K", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

/// "Why PEFT": trainable parameters and peak memory per method against model size.
pub fn write_scale(dir: &Path, stem: &str, s: &crate::explore::Scale) -> Result<Vec<PathBuf>> {
    both_sized(dir, stem, &ScaleChart(s), (1400, 720))
}

struct ScaleChart<'a>(&'a crate::explore::Scale);

impl Chart for ScaleChart<'_> {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        let s = self.0;
        let err = |e| format!("{e:?}");
        root.fill(&WHITE).map_err(err)?;
        let root = root
            .titled(&s.title, ("sans-serif", 22, FontStyle::Bold))
            .map_err(err)?;
        let (a, b) = root.split_horizontally(700);
        let xs: Vec<f64> = s.total_params.iter().map(|&p| p as f64).collect();
        let (x_lo, x_hi) = (
            xs.iter().copied().fold(f64::INFINITY, f64::min) / 1.5,
            xs.iter().copied().fold(0.0, f64::max) * 1.5,
        );
        for (area, trainable) in [(&a, true), (&b, false)] {
            let values: Vec<f64> = s
                .series
                .iter()
                .flat_map(|m| {
                    if trainable {
                        m.trainable_params
                            .iter()
                            .filter(|&&t| t > 0)
                            .map(|&t| t as f64)
                            .collect::<Vec<_>>()
                    } else {
                        m.peak_gib.iter().flatten().copied().collect()
                    }
                })
                .collect();
            let lo = values
                .iter()
                .copied()
                .fold(f64::INFINITY, f64::min)
                .max(1e-3)
                / 2.0;
            let hi = values.iter().copied().fold(0.0, f64::max).max(lo * 10.0) * 2.0;
            let mut chart = ChartBuilder::on(area)
                .margin(20)
                .x_label_area_size(50)
                .y_label_area_size(90)
                .build_cartesian_2d((x_lo..x_hi).log_scale(), (lo..hi).log_scale())
                .map_err(err)?;
            chart
                .configure_mesh()
                .light_line_style(WHITE)
                .x_desc("model parameters (log)")
                .y_desc(if trainable {
                    "trainable parameters (log)"
                } else {
                    "peak memory per GPU, GiB (log)"
                })
                .x_label_formatter(&|x| human(*x as u64))
                .y_label_formatter(&|y| {
                    if trainable {
                        human(*y as u64)
                    } else {
                        format!("{y:.1}")
                    }
                })
                .label_style(("sans-serif", 15))
                .axis_desc_style(("sans-serif", 17))
                .draw()
                .map_err(err)?;
            for (i, m) in s.series.iter().enumerate() {
                let colour = LINES[i % LINES.len()];
                let points: Vec<(f64, f64)> = xs
                    .iter()
                    .enumerate()
                    .filter_map(|(j, &x)| {
                        let y = if trainable {
                            Some(m.trainable_params[j] as f64).filter(|&t| t > 0.0)
                        } else {
                            m.peak_gib[j]
                        };
                        y.map(|y| (x, y))
                    })
                    .collect();
                chart
                    .draw_series(LineSeries::new(points.clone(), colour.stroke_width(3)))
                    .map_err(err)?
                    .label(m.method.clone())
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 14, y)], colour.stroke_width(3))
                    });
                chart
                    .draw_series(points.iter().map(|&p| Circle::new(p, 4, colour.filled())))
                    .map_err(err)?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 14))
                .draw()
                .map_err(err)?;
        }
        Ok(())
    }
}
