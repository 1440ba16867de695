//! `anneal experiment shift`: image models scored on their test set and on shifted versions of
//! it, as ObjectNet (Barbu et al. 2019) measured ImageNet models on rotated, occluded and
//! re-framed objects (a 40–45 point fall): rotations by ±15° and ±30°, a blank square of a
//! quarter of the area, and re-framings (zoomed out ×0.75 and shifted, zoomed in ×1.25 and
//! shifted). Each model's accuracy under each shift and its drop from the clean test set.

use anneal_train::vision::{load_image_model, test_accuracy, ImageData, Shift};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(Args, Clone, Debug)]
pub struct ShiftExperiment {
    /// A saved image model (a folder with image_model.json), or a folder of them, such as the
    /// models folder `anneal experiment label-efficiency` writes.
    #[arg(long, default_value = "runs/label-efficiency/models")]
    pub models: PathBuf,
    /// Output folder: report.md, results.json.
    #[arg(long, default_value = "runs/shift")]
    pub out: PathBuf,
    /// Score only the first N test images (all by default).
    #[arg(long)]
    pub limit: Option<usize>,
}

/// The model folders under `root` (itself when it holds a model), sorted by name.
fn model_dirs(root: &Path) -> Result<Vec<PathBuf>> {
    if root.join("image_model.json").is_file() {
        return Ok(vec![root.to_path_buf()]);
    }
    let entries = std::fs::read_dir(root).with_context(|| {
        format!(
            "reading {} (train models first: anneal experiment label-efficiency)",
            root.display()
        )
    })?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("image_model.json").is_file())
        .collect();
    dirs.sort();
    if dirs.is_empty() {
        bail!(
            "{} holds no saved image model (folders with image_model.json)",
            root.display()
        );
    }
    Ok(dirs)
}

/// The cell a model folder named `METHOD-LABELS-seedS` belongs to (the name without its seed).
fn cell_of(model: &str) -> &str {
    match model.rsplit_once("-seed") {
        Some((cell, seed)) if !seed.is_empty() && seed.bytes().all(|b| b.is_ascii_digit()) => cell,
        _ => model,
    }
}

/// One model's scores: clean accuracy and accuracy under each shift of [`Shift::ALL`].
struct Scored {
    model: String,
    clean: f64,
    shifted: Vec<f64>,
}

/// A cell's models averaged over their seeds.
struct CellSummary {
    cell: String,
    models: usize,
    /// Mean clean accuracy.
    clean: f64,
    /// Mean change under each shift (negative: a drop).
    drops: Vec<f64>,
}

/// Each cell's models averaged, in first-seen order.
fn summary_by_cell(scored: &[Scored]) -> Vec<CellSummary> {
    let mut out: Vec<CellSummary> = Vec::new();
    for s in scored {
        let cell = cell_of(&s.model);
        let at = match out.iter().position(|c| c.cell == cell) {
            Some(at) => at,
            None => {
                out.push(CellSummary {
                    cell: cell.to_string(),
                    models: 0,
                    clean: 0.0,
                    drops: vec![0.0; s.shifted.len()],
                });
                out.len() - 1
            }
        };
        let entry = &mut out[at];
        entry.models += 1;
        entry.clean += s.clean;
        for (sum, acc) in entry.drops.iter_mut().zip(&s.shifted) {
            *sum += acc - s.clean;
        }
    }
    for c in &mut out {
        let n = c.models as f64;
        c.clean /= n;
        c.drops.iter_mut().for_each(|d| *d /= n);
    }
    out
}

pub fn run(e: ShiftExperiment) -> Result<()> {
    let dirs = model_dirs(&e.models)?;
    let mut datasets: HashMap<String, ImageData> = HashMap::new();
    let shifts = Shift::ALL;
    let mut md = String::new();
    writeln!(
        md,
        "# Accuracy under distribution shift\n\nTest accuracy (%) of each model on its clean test \
         set and on shifted copies; the drop from clean in points in brackets.\n"
    )?;
    let names: Vec<String> = shifts.iter().map(|s| s.name()).collect();
    writeln!(md, "| model | clean | {} |", names.join(" | "))?;
    writeln!(md, "|---|---|{}", "---|".repeat(shifts.len()))?;
    let mut json = Vec::new();
    let mut scored: Vec<Scored> = Vec::new();
    for dir in &dirs {
        let (model, info) = load_image_model(dir)?;
        if !datasets.contains_key(&info.dataset) {
            let data = ImageData::load(&info.dataset, &anneal_data::data_root())?;
            datasets.insert(info.dataset.clone(), data);
        }
        let data = &datasets[&info.dataset];
        let clean = test_accuracy(&*model, &data.test, info.normalise, e.limit, None)?;
        let mut cells = Vec::new();
        let mut accuracies = Vec::new();
        for shift in shifts {
            let apply = move |i: usize, img: &mut [f32], d| shift.apply(i, img, d);
            let acc = test_accuracy(&*model, &data.test, info.normalise, e.limit, Some(&apply))?;
            cells.push(format!(
                "{:.1} ({:+.1})",
                100.0 * acc,
                100.0 * (acc - clean)
            ));
            accuracies.push(acc);
        }
        let name = dir.file_name().map_or_else(
            || dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        println!(
            "{name}: clean {:.1}%, {}",
            100.0 * clean,
            names
                .iter()
                .zip(&cells)
                .map(|(n, c)| format!("{n} {c}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        writeln!(
            md,
            "| {name} | {:.1} | {} |",
            100.0 * clean,
            cells.join(" | ")
        )?;
        json.push(serde_json::json!({
            "model": name,
            "trained": info.label,
            "clean": clean,
            "shifted": shifts.iter().zip(&accuracies).map(|(shift, acc)| {
                serde_json::json!({"shift": shift.name(), "accuracy": acc})
            }).collect::<Vec<_>>(),
        }));
        scored.push(Scored {
            model: name,
            clean,
            shifted: accuracies,
        });
    }
    let by_cell = summary_by_cell(&scored);
    if by_cell.len() < scored.len() {
        writeln!(
            md,
            "\n## By cell\n\nMean over each cell's seeds: clean accuracy (%) and the drop in \
             points under each shift.\n"
        )?;
        writeln!(md, "| cell | models | clean | {} |", names.join(" | "))?;
        writeln!(md, "|---|---|---|{}", "---|".repeat(shifts.len()))?;
        for c in &by_cell {
            let drops: Vec<String> = c
                .drops
                .iter()
                .map(|d| format!("{:+.1}", 100.0 * d))
                .collect();
            writeln!(
                md,
                "| {} | {} | {:.1} | {} |",
                c.cell,
                c.models,
                100.0 * c.clean,
                drops.join(" | ")
            )?;
        }
    }
    std::fs::create_dir_all(&e.out).with_context(|| format!("creating {}", e.out.display()))?;
    crate::experiment::write_report(&e.out, &md, &serde_json::Value::Array(json))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_average_their_seeds() {
        assert_eq!(cell_of("lenet-600-seed2"), "lenet-600");
        assert_eq!(cell_of("mae-probe-100-seed10"), "mae-probe-100");
        assert_eq!(cell_of("my-model"), "my-model");
        assert_eq!(cell_of("odd-seedx"), "odd-seedx");
        let scored = |model: &str, clean: f64, shifted: [f64; 2]| Scored {
            model: model.to_string(),
            clean,
            shifted: shifted.to_vec(),
        };
        let scored = vec![
            scored("lenet-600-seed0", 0.8, [0.7, 0.4]),
            scored("vit-600-seed0", 0.6, [0.6, 0.3]),
            scored("lenet-600-seed1", 0.6, [0.3, 0.6]),
        ];
        let cells = summary_by_cell(&scored);
        assert_eq!(cells.len(), 2);
        let CellSummary {
            cell,
            models: n,
            clean,
            drops,
        } = &cells[0];
        assert_eq!((cell.as_str(), *n), ("lenet-600", 2));
        assert!((clean - 0.7).abs() < 1e-12);
        assert!((drops[0] + 0.2).abs() < 1e-12 && (drops[1] + 0.2).abs() < 1e-12);
        assert_eq!(cells[1].cell, "vit-600");
        assert!(cells[1].drops[0].abs() < 1e-12);
    }
}
