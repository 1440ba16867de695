//! Loss curves as PNG images, drawn with `plotters`.
//!
//! Text needs a TrueType font, read at run time from the first of a few usual system locations
//! (or `$ANNEAL_FONT`); on a machine without one the curves are drawn without labels.

use crate::{Error, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a system font as "sans-serif" once; false when none was found.
fn font_available() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        let custom = std::env::var("ANNEAL_FONT").ok();
        for path in custom
            .iter()
            .map(|s| s.as_str())
            .chain(FONT_PATHS.iter().copied())
        {
            if let Ok(bytes) = std::fs::read(path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::Plot(e.to_string())
}

/// One named series of (x, y) points.
pub struct Series<'a> {
    /// Legend label.
    pub label: &'a str,
    /// Points, x increasing.
    pub points: &'a [(f64, f64)],
}

/// Draws `series` as lines into a PNG at `path` (written to a temporary file, then renamed).
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .collect();
    if all.is_empty() {
        return Ok(());
    }
    let finite = |v: f64| v.is_finite();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all.iter().filter(|(x, y)| finite(*x) && finite(*y)) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return Ok(());
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let (y0, y1) = (y0 - pad, y1 + pad);
    // The encoder picks the format from the extension, so the temporary name ends in .png too.
    let name = path
        .file_name()
        .map_or("plot.png".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.tmp.png"));
    let text = font_available();
    {
        let root = BitMapBackend::new(&tmp, (900, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut builder = ChartBuilder::on(&root);
        builder.margin(20);
        if text {
            builder
                .caption(title, ("sans-serif", 24))
                .x_label_area_size(45)
                .y_label_area_size(60);
        }
        let mut chart = builder
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(plot_err)?;
        let mut mesh = chart.configure_mesh();
        if text {
            mesh.x_desc(x_label).y_desc(y_label);
        } else {
            mesh.disable_x_axis().disable_y_axis();
        }
        mesh.draw().map_err(plot_err)?;
        let colors = [BLUE, RED, GREEN, MAGENTA, CYAN];
        for (i, s) in series.iter().enumerate() {
            let color = colors[i % colors.len()];
            let drawn = chart
                .draw_series(LineSeries::new(
                    s.points
                        .iter()
                        .copied()
                        .filter(|(x, y)| finite(*x) && finite(*y)),
                    color.stroke_width(2),
                ))
                .map_err(plot_err)?;
            if text {
                drawn.label(s.label).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            }
        }
        if text {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(plot_err)?;
        }
        root.present().map_err(plot_err)?;
    }
    std::fs::rename(&tmp, path).map_err(crate::io_err(path))?;
    Ok(())
}

/// Draws a histogram of `values` in `bins` equal-width bins into a PNG at `path`.
pub fn histogram(
    path: &Path,
    title: &str,
    x_label: &str,
    values: &[f64],
    bins: usize,
) -> Result<()> {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        return Ok(());
    }
    let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let mut hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if hi <= lo {
        hi = lo + 1.0;
    }
    let bins = bins.max(1);
    let width = (hi - lo) / bins as f64;
    let mut counts = vec![0u32; bins];
    for v in &finite {
        let b = (((v - lo) / width) as usize).min(bins - 1);
        counts[b] += 1;
    }
    let top = *counts.iter().max().expect("bins > 0") as f64 * 1.05;
    let name = path
        .file_name()
        .map_or("plot.png".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.tmp.png"));
    let text = font_available();
    {
        let root = BitMapBackend::new(&tmp, (640, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut builder = ChartBuilder::on(&root);
        builder.margin(15);
        if text {
            builder
                .caption(title, ("sans-serif", 20))
                .x_label_area_size(40)
                .y_label_area_size(50);
        }
        let mut chart = builder
            .build_cartesian_2d(lo..hi, 0.0..top)
            .map_err(plot_err)?;
        let mut mesh = chart.configure_mesh();
        if text {
            mesh.x_desc(x_label).y_desc("documents");
        } else {
            mesh.disable_x_axis().disable_y_axis();
        }
        mesh.draw().map_err(plot_err)?;
        chart
            .draw_series(counts.iter().enumerate().map(|(i, &c)| {
                let x0 = lo + i as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width, c as f64)], BLUE.mix(0.6).filled())
            }))
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    std::fs::rename(&tmp, path).map_err(crate::io_err(path))?;
    Ok(())
}

/// Two panels: stacked bars of `series` per label (left) and bars of `line` per label (right),
/// as a PNG at `path`. Labels are drawn only when a font is available.
pub fn stacked_bars(
    path: &Path,
    title: &str,
    labels: &[String],
    series: &[(&str, Vec<f64>)],
    line: (&str, &[f64]),
) -> Result<()> {
    if labels.is_empty() {
        return Ok(());
    }
    let n = labels.len();
    let totals: Vec<f64> = (0..n)
        .map(|i| series.iter().map(|s| s.1[i]).sum())
        .collect();
    let top = totals.iter().copied().fold(0.0, f64::max).max(1e-9) * 1.1;
    let line_top = line.1.iter().copied().fold(0.0, f64::max).max(1e-9) * 1.1;
    let name = path
        .file_name()
        .map_or("plot.png".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.tmp.png"));
    let text = font_available();
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN];
    {
        let root = BitMapBackend::new(&tmp, (1100, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let root = if text {
            root.titled(title, ("sans-serif", 20)).map_err(plot_err)?
        } else {
            root
        };
        let (left, right) = root.split_horizontally(700);
        let label = |x: &f64| labels.get(x.floor() as usize).cloned().unwrap_or_default();
        let mut chart = ChartBuilder::on(&left);
        chart.margin(10);
        if text {
            chart.x_label_area_size(40).y_label_area_size(50);
        }
        let mut chart = chart
            .build_cartesian_2d(0.0..n as f64, 0.0..top)
            .map_err(plot_err)?;
        let mut mesh = chart.configure_mesh();
        if text {
            mesh.x_labels(n).x_label_formatter(&label).y_desc("GB");
        } else {
            mesh.disable_x_axis().disable_y_axis();
        }
        mesh.disable_x_mesh().draw().map_err(plot_err)?;
        let mut base = vec![0.0; n];
        for (k, (name, values)) in series.iter().enumerate() {
            let color = colors[k % colors.len()];
            let bars: Vec<Rectangle<(f64, f64)>> = (0..n)
                .map(|i| {
                    let r = Rectangle::new(
                        [
                            (i as f64 + 0.15, base[i]),
                            (i as f64 + 0.85, base[i] + values[i]),
                        ],
                        color.mix(0.7).filled(),
                    );
                    base[i] += values[i];
                    r
                })
                .collect();
            let drawn = chart.draw_series(bars).map_err(plot_err)?;
            if text {
                drawn.label(*name).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.mix(0.7).filled())
                });
            }
        }
        if text {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(plot_err)?;
        }
        let mut chart = ChartBuilder::on(&right);
        chart.margin(10);
        if text {
            chart.x_label_area_size(40).y_label_area_size(50);
        }
        let mut chart = chart
            .build_cartesian_2d(0.0..n as f64, 0.0..line_top)
            .map_err(plot_err)?;
        let mut mesh = chart.configure_mesh();
        if text {
            mesh.x_labels(n).x_label_formatter(&label).y_desc(line.0);
        } else {
            mesh.disable_x_axis().disable_y_axis();
        }
        mesh.disable_x_mesh().draw().map_err(plot_err)?;
        chart
            .draw_series((0..n).map(|i| {
                Rectangle::new(
                    [(i as f64 + 0.15, 0.0), (i as f64 + 0.85, line.1[i])],
                    BLUE.mix(0.5).filled(),
                )
            }))
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    std::fs::rename(&tmp, path).map_err(crate::io_err(path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let train: Vec<(f64, f64)> = (0..50)
            .map(|i| (i as f64, 4.0 / (1.0 + i as f64)))
            .collect();
        let val = [(0.0, 4.2), (25.0, 0.3), (49.0, 0.2)];
        line_chart(
            &path,
            "loss",
            "step",
            "loss",
            &[
                Series {
                    label: "train",
                    points: &train,
                },
                Series {
                    label: "validation",
                    points: &val,
                },
            ],
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(bytes.len() > 2000);
        let h = dir.path().join("hist.png");
        let values: Vec<f64> = (0..500).map(|i| ((i * 37) % 100) as f64 / 100.0).collect();
        histogram(&h, "signal", "value", &values, 20).unwrap();
        assert_eq!(&std::fs::read(&h).unwrap()[1..4], b"PNG");
    }
}
