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
    for dir in &dirs {
        let (model, info) = load_image_model(dir)?;
        if !datasets.contains_key(&info.dataset) {
            let data = ImageData::load(&info.dataset, &anneal_data::data_root())?;
            datasets.insert(info.dataset.clone(), data);
        }
        let data = &datasets[&info.dataset];
        let clean = test_accuracy(&*model, &data.test, info.normalise, e.limit, None)?;
        let mut cells = Vec::new();
        let mut shifted = Vec::new();
        for shift in shifts {
            let apply = move |i: usize, img: &mut [f32], d| shift.apply(i, img, d);
            let acc = test_accuracy(&*model, &data.test, info.normalise, e.limit, Some(&apply))?;
            cells.push(format!(
                "{:.1} ({:+.1})",
                100.0 * acc,
                100.0 * (acc - clean)
            ));
            shifted.push(serde_json::json!({"shift": shift.name(), "accuracy": acc}));
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
            "shifted": shifted,
        }));
    }
    std::fs::create_dir_all(&e.out).with_context(|| format!("creating {}", e.out.display()))?;
    crate::experiment::write_report(&e.out, &md, &serde_json::Value::Array(json))
}
