//! # anneal-chart
//!
//! The charts anneal draws, as PNG images with `plotters`: line charts (loss curves of
//! `anneal pretrain`), histograms (the signals of `anneal data report`) and stacked bars (the
//! memory breakdown of `anneal plan --chart`). Data, training and planning all use them, so they
//! live here rather than in one of those crates.
//!
//! ```no_run
//! use anneal_chart::{line_chart, Series};
//! let points = [(0.0, 4.2), (100.0, 2.5), (200.0, 1.9)];
//! let train = Series { label: "train", points: &points };
//! line_chart("loss.png".as_ref(), "loss", "step", "nats", &[train]).unwrap();
//! ```
//!
//! Text needs a TrueType font, read at run time from the first of a few usual system locations
//! (or `$ANNEAL_FONT`); on a machine without one the curves are drawn without labels.

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
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

/// Drawing or writing a chart failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The drawing library failed.
    #[error("plot: {0}")]
    Draw(String),
    /// The image could not be put in place.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::Draw(e.to_string())
}

/// One named series of (x, y) points.
pub struct Series<'a> {
    /// Legend label.
    pub label: &'a str,
    /// Points, x increasing.
    pub points: &'a [(f64, f64)],
}

type Area<'b> = DrawingArea<BitMapBackend<'b>, Shift>;
type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Ten distinguishable colours (the first five are plotters' primaries), so charts of up to ten
/// series never repeat one.
const COLORS: [RGBColor; 10] = [
    BLUE,
    RED,
    GREEN,
    MAGENTA,
    CYAN,
    RGBColor(255, 140, 0),
    RGBColor(128, 0, 128),
    RGBColor(139, 69, 19),
    RGBColor(0, 0, 0),
    RGBColor(128, 128, 0),
];

/// Draws into a `size` PNG at `path` with `draw(area, text)`, `text` telling whether a font is
/// available. The image goes to a temporary file first (whose name ends in .png too: the encoder
/// picks the format from the extension) and is renamed into place.
fn write_png(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&Area, bool) -> Result<()>,
) -> Result<()> {
    let name = path
        .file_name()
        .map_or("plot.png".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.tmp.png"));
    let text = font_available();
    let drawn = (|| {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        draw(&root, text)?;
        root.present().map_err(plot_err)
    })();
    if let Err(e) = drawn {
        // Nothing half-written is left behind (a full disk, say); the error names the image.
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        });
    }
    std::fs::rename(&tmp, path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
}

/// Axes over `x` × `y` on `area`, with a caption and axis descriptions when `text`;
/// `categories` labels the integer slots of x instead of numbers (bar charts).
fn axes<'a, 'b>(
    area: &'a Area<'b>,
    text: bool,
    caption: Option<(&str, u32)>,
    (x, y): (std::ops::Range<f64>, std::ops::Range<f64>),
    (x_desc, y_desc): (&str, &str),
    categories: Option<&[String]>,
) -> Result<Chart<'a, 'b>> {
    let mut builder = ChartBuilder::on(area);
    builder.margin(15);
    if text {
        if let Some((title, size)) = caption {
            builder.caption(title, ("sans-serif", size));
        }
        builder.x_label_area_size(45).y_label_area_size(55);
    }
    let mut chart = builder.build_cartesian_2d(x, y).map_err(plot_err)?;
    let label = |v: &f64| {
        categories
            .and_then(|c| c.get(v.floor() as usize).cloned())
            .unwrap_or_default()
    };
    let mut mesh = chart.configure_mesh();
    if !text {
        mesh.disable_x_axis().disable_y_axis();
    } else {
        mesh.x_desc(x_desc).y_desc(y_desc);
        if let Some(c) = categories {
            mesh.x_labels(c.len()).x_label_formatter(&label);
        }
    }
    if categories.is_some() {
        mesh.disable_x_mesh();
    }
    mesh.draw().map_err(plot_err)?;
    Ok(chart)
}

/// The legend of the labelled series, when text can be drawn.
fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, text: bool) -> Result<()> {
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
    }
    Ok(())
}

/// Draws `series` as lines into a PNG at `path` (written to a temporary file, then renamed).
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    let finite = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite();
    let points: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(finite)
        .collect();
    if points.is_empty() {
        return Ok(());
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in &points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    write_png(path, (900, 560), |root, text| {
        let mut chart = axes(
            root,
            text,
            Some((title, 24)),
            (x0..x1, y0 - pad..y1 + pad),
            (x_label, y_label),
            None,
        )?;
        for (i, s) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let drawn = chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied().filter(finite),
                    color.stroke_width(2),
                ))
                .map_err(plot_err)?;
            if text {
                drawn.label(s.label).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            }
        }
        legend(&mut chart, text)
    })
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
    write_png(path, (640, 360), |root, text| {
        let mut chart = axes(
            root,
            text,
            Some((title, 20)),
            (lo..hi, 0.0..top),
            (x_label, "documents"),
            None,
        )?;
        chart
            .draw_series(counts.iter().enumerate().map(|(i, &c)| {
                let x0 = lo + i as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width, c as f64)], BLUE.mix(0.6).filled())
            }))
            .map_err(plot_err)?;
        Ok(())
    })
}

/// `points` (x increasing) averaged over consecutive windows of about 1% of them, each window
/// placed at its last x: a noisy per-step curve drawn readably.
pub fn smooth(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let w = (points.len() / 100).max(1);
    points
        .chunks(w)
        .map(|c| {
            let last = c.last().expect("chunks are not empty").0;
            (last, c.iter().map(|p| p.1).sum::<f64>() / c.len() as f64)
        })
        .collect()
}

/// Two panels: stacked bars of `series` per label (left, its axis named `unit`) and bars of
/// `line` per label (right), as a PNG at `path`. Labels are drawn only when a font is available.
pub fn stacked_bars(
    path: &Path,
    title: &str,
    labels: &[String],
    series: &[(&str, Vec<f64>)],
    unit: &str,
    line: (&str, &[f64]),
) -> Result<()> {
    if labels.is_empty() {
        return Ok(());
    }
    let n = labels.len();
    let peak = |v: &mut dyn Iterator<Item = f64>| v.fold(0.0, f64::max).max(1e-9) * 1.1;
    let top = peak(&mut (0..n).map(|i| series.iter().map(|s| s.1[i]).sum()));
    let line_top = peak(&mut line.1.iter().copied());
    let slot = |i: usize, from: f64, to: f64| [(i as f64 + 0.15, from), (i as f64 + 0.85, to)];
    write_png(path, (1100, 480), |root, text| {
        let root = if text {
            root.titled(title, ("sans-serif", 20)).map_err(plot_err)?
        } else {
            root.clone()
        };
        let (left, right) = root.split_horizontally(700);
        let slots = (0.0..n as f64, 0.0..top);
        let mut chart = axes(&left, text, None, slots, ("", unit), Some(labels))?;
        let mut base = vec![0.0; n];
        for (k, (name, values)) in series.iter().enumerate() {
            let color = COLORS[k % COLORS.len()];
            let bars: Vec<Rectangle<(f64, f64)>> = (0..n)
                .map(|i| {
                    let r = Rectangle::new(
                        slot(i, base[i], base[i] + values[i]),
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
        legend(&mut chart, text)?;
        let slots = (0.0..n as f64, 0.0..line_top);
        let mut chart = axes(&right, text, None, slots, ("", line.0), Some(labels))?;
        chart
            .draw_series(
                (0..n).map(|i| Rectangle::new(slot(i, 0.0, line.1[i]), BLUE.mix(0.5).filled())),
            )
            .map_err(plot_err)?;
        Ok(())
    })
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
