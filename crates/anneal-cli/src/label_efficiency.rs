//! `anneal experiment label-efficiency`: test accuracy against the number of labels for each
//! training method on an image data set, every cell trained from scratch in this process, with
//! its steps, epochs and wall time, as a table (report.md, results.json) and a chart.

use anneal_chart::{line_chart, Series};
use anneal_train::vision::{train_lenet, CellResult, ImageData, TrainSettings};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::fmt::Write as _;
use std::path::PathBuf;

/// The methods a table can hold, in table order.
pub const METHODS: [&str; 1] = ["lenet"];

#[derive(Args, Clone, Debug)]
pub struct LabelEfficiency {
    /// The image data set: fashion-mnist or mnist (scripts/fetch-data.sh NAME).
    #[arg(long, default_value = "fashion-mnist")]
    pub dataset: String,
    /// Labelled training images per run, comma-separated (balanced over the classes).
    #[arg(long, value_delimiter = ',', default_value = "100,600,6000,60000")]
    pub labels: Vec<usize>,
    /// Methods, comma-separated: lenet (supervised LeNet-5).
    #[arg(long, value_delimiter = ',', default_value = "lenet")]
    pub methods: Vec<String>,
    /// Label-split seeds per cell (each also seeds initialisation and batches).
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Output folder: report.md, results.json, accuracy.png.
    #[arg(long, default_value = "runs/label-efficiency")]
    pub out: PathBuf,
    /// Scale every cell's steps by this factor (0.1: a tenth of the training).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// A small version that runs the whole path in seconds: 100 and 600 labels, one seed, a
    /// few dozen steps per cell, 1,000 test images.
    #[arg(long)]
    pub quick: bool,
}

/// One cell's runs (one per seed).
struct Cell {
    method: String,
    labels: usize,
    runs: Vec<CellResult>,
}

impl Cell {
    fn mean_sd(&self) -> (f64, f64) {
        let n = self.runs.len().max(1) as f64;
        let mean = self.runs.iter().map(|r| r.accuracy).sum::<f64>() / n;
        let var = self
            .runs
            .iter()
            .map(|r| (r.accuracy - mean).powi(2))
            .sum::<f64>()
            / (n - 1.0).max(1.0);
        (mean, var.sqrt())
    }

    fn seconds(&self) -> f64 {
        self.runs.iter().map(|r| r.seconds).sum()
    }
}

/// The supervised LeNet-5 recipe for `labels` labelled images: AdamW 2e-3 with weight decay
/// 5e-4, batch 64, augmentation (crop, flip where allowed, erasing), 15 epochs, at least 600
/// steps (about 380 epochs at 100 labels).
fn lenet_settings(labels: usize, seed: u64, scale: f64) -> TrainSettings {
    let steps = TrainSettings::steps_for(labels, 64, 15.0, 600);
    TrainSettings {
        steps: ((steps as f64 * scale).ceil() as u64).max(1),
        batch: 64,
        lr: 2e-3,
        weight_decay: 5e-4,
        seed,
    }
}

pub fn run(e: LabelEfficiency) -> Result<()> {
    for m in &e.methods {
        if !METHODS.contains(&m.as_str()) {
            bail!(
                "--methods {m:?} is not known: use one or more of {}",
                METHODS.join(", ")
            );
        }
    }
    let mut data = ImageData::load(&e.dataset, &anneal_data::data_root())?;
    let (labels, seeds, scale) = if e.quick {
        (vec![100, 600], 1, 0.05 * e.scale)
    } else {
        (e.labels.clone(), e.seeds.max(1), e.scale)
    };
    if e.quick {
        let mut test = (*data.test).clone();
        test.pixels.truncate(1000 * test.rows * test.cols);
        test.labels.truncate(1000);
        data.test = std::sync::Arc::new(test);
    }
    for &n in &labels {
        if n == 0 || n > data.train.len() {
            bail!(
                "--labels {n}: use 1 to {} (the training images of {})",
                data.train.len(),
                data.name
            );
        }
    }
    std::fs::create_dir_all(&e.out).with_context(|| format!("creating {}", e.out.display()))?;
    println!(
        "label efficiency on {}: {} training images, {} test images, {} classes; labels {:?}, \
         {} seed(s) per cell; kernel path: {}",
        data.name,
        data.train.len(),
        data.test.len(),
        data.classes(),
        labels,
        seeds,
        anneal_tensor::kernel_path()
    );
    let mut cells = Vec::new();
    for method in &e.methods {
        for &n in &labels {
            let mut cell = Cell {
                method: method.clone(),
                labels: n,
                runs: Vec::new(),
            };
            for seed in 0..seeds {
                let labelled = data.train.balanced_subset(n, seed)?;
                let result = match method.as_str() {
                    "lenet" => {
                        let settings = lenet_settings(n, seed, scale);
                        let bar = crate::finetune::progress(settings.steps);
                        bar.set_message(format!("{method}, {n} labels, seed {seed}"));
                        let (_, r) =
                            train_lenet(&data, &labelled, true, &settings, &mut |_, _, loss| {
                                bar.inc(1);
                                if bar.position().is_multiple_of(20) {
                                    bar.set_message(format!(
                                        "{method}, {n} labels, seed {seed}, loss {loss:.3}"
                                    ));
                                }
                            })?;
                        bar.finish_and_clear();
                        r
                    }
                    other => unreachable!("method {other} was checked above"),
                };
                println!(
                    "{method:>10} {n:>6} labels seed {seed}: test accuracy {:.2}% after {} steps \
                     ({:.1} epochs) in {:.1} s (final training loss {:.3})",
                    100.0 * result.accuracy,
                    result.steps,
                    result.epochs,
                    result.seconds,
                    result.final_loss
                );
                cell.runs.push(result);
            }
            cells.push(cell);
        }
    }
    write_report(&e, &data, &labels, &cells)
}

fn write_report(
    e: &LabelEfficiency,
    data: &ImageData,
    labels: &[usize],
    cells: &[Cell],
) -> Result<()> {
    let mut md = String::new();
    writeln!(
        md,
        "# Label efficiency on {}\n\nTest accuracy (mean ± sd over label-split seeds) on {} test \
         images, by labelled training images; each cell's wall time is the sum over its seeds.\n",
        data.name,
        data.test.len()
    )?;
    let header: Vec<String> = labels.iter().map(|n| format!("{n} labels")).collect();
    writeln!(md, "| method | {} |", header.join(" | "))?;
    writeln!(md, "|---|{}", "---|".repeat(labels.len()))?;
    let mut series_points = Vec::new();
    for method in &e.methods {
        let mut row = Vec::new();
        let mut points = Vec::new();
        for &n in labels {
            match cells.iter().find(|c| &c.method == method && c.labels == n) {
                Some(c) => {
                    let (mean, sd) = c.mean_sd();
                    let r = &c.runs[0];
                    row.push(format!(
                        "{:.1} ± {:.1}% ({} steps, {:.0} epochs, {:.0} s)",
                        100.0 * mean,
                        100.0 * sd,
                        r.steps,
                        r.epochs,
                        c.seconds()
                    ));
                    points.push(((n as f64).log10(), 100.0 * mean));
                }
                None => row.push("—".into()),
            }
        }
        writeln!(md, "| {method} | {} |", row.join(" | "))?;
        series_points.push((method.clone(), points));
    }
    let total: f64 = cells.iter().map(Cell::seconds).sum();
    writeln!(md, "\nTotal wall time: {total:.0} s.")?;
    std::fs::write(e.out.join("report.md"), &md)?;
    let series: Vec<Series> = series_points
        .iter()
        .map(|(label, points)| Series { label, points })
        .collect();
    line_chart(
        &e.out.join("accuracy.png"),
        &format!("{}: test accuracy by labels", data.name),
        "log10(labelled images)",
        "test accuracy (%)",
        &series,
    )?;
    let json: Vec<serde_json::Value> = cells
        .iter()
        .map(|c| {
            let (mean, sd) = c.mean_sd();
            serde_json::json!({
                "method": c.method,
                "labels": c.labels,
                "accuracy_mean": mean,
                "accuracy_sd": sd,
                "runs": c.runs.iter().map(|r| serde_json::json!({
                    "accuracy": r.accuracy,
                    "steps": r.steps,
                    "epochs": r.epochs,
                    "seconds": r.seconds,
                    "final_loss": r.final_loss,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    std::fs::write(
        e.out.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    print!("\n{md}");
    println!("wrote {}", e.out.join("report.md").display());
    Ok(())
}
