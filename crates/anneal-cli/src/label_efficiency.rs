//! `anneal experiment label-efficiency`: test accuracy against the number of labels for each
//! training method on an image data set, every cell trained from scratch in this process, with
//! its steps, epochs and wall time, as a table (report.md, results.json) and a chart.

use anneal_chart::{line_chart, Series};
use anneal_train::checkpoint::{read_params, write_atomic, write_params};
use anneal_train::model::TrainModel;
use anneal_train::objectives::{FixMatch, Mae};
use anneal_train::strategy::StepOutput;
use anneal_train::vision::{
    finetune_mlp, finetune_vit, new_mlp, new_vit, pretrain_layerwise, pretrain_mae, pretrain_moco,
    save_image_model, train_fixmatch, train_lenet, train_mlp, train_pseudo_label, train_vit,
    CellResult, FixMatchViews, ImageData, ImageModelInfo, Optim, TrainSettings, VitRole,
    MLP_HIDDEN,
};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;

/// The methods a table can hold, in table order.
pub const METHODS: [&str; 10] = [
    "lenet",
    "fixmatch",
    "pseudo-label",
    "vit",
    "mae",
    "mae-probe",
    "moco",
    "moco-probe",
    "mlp",
    "layerwise",
];

/// The methods whose cells need unlabelled images (none at all labels).
const NEEDS_UNLABELLED: [&str; 7] = [
    "fixmatch",
    "pseudo-label",
    "mae",
    "mae-probe",
    "moco",
    "moco-probe",
    "layerwise",
];

#[derive(Args, Clone, Debug)]
pub struct LabelEfficiency {
    /// The image data set: fashion-mnist or mnist (scripts/fetch-data.sh NAME).
    #[arg(long, default_value = "fashion-mnist")]
    pub dataset: String,
    /// Labelled training images per run, comma-separated (balanced over the classes).
    #[arg(long, value_delimiter = ',', default_value = "100,600,6000,60000")]
    pub labels: Vec<usize>,
    /// Methods, comma-separated: lenet (supervised LeNet-5), fixmatch (FixMatch on LeNet-5),
    /// pseudo-label (a supervised LeNet-5 teacher labels the rest; a student trains on its
    /// confident labels), vit (supervised ViT from scratch), mae (MAE pretraining of the same
    /// ViT on every training image, then fine-tuning), mae-probe (a linear probe on the MAE
    /// encoder), moco and moco-probe (the same after MoCo v3 pretraining), mlp (a fully
    /// connected 784-500-250-100 sigmoid network from scratch), layerwise (the same network
    /// pretrained greedily as stacked autoencoders, then fine-tuned). Methods that learn from
    /// unlabelled images skip the all-labels cell.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "lenet,fixmatch,pseudo-label,vit,mae,mae-probe,moco,moco-probe,mlp,layerwise"
    )]
    pub methods: Vec<String>,
    /// MAE pretraining steps of 128 images (scaled by --scale), once per seed, shared by the
    /// mae and mae-probe cells of every label count.
    #[arg(long, default_value_t = 4000)]
    pub mae_steps: u64,
    /// MoCo v3 pretraining steps of 128 images (two views each), once per seed, shared like
    /// MAE's.
    #[arg(long, default_value_t = 3000)]
    pub moco_steps: u64,
    /// Layer-wise pretraining steps of 128 images per layer (scaled by --scale), once per
    /// seed, shared by the layerwise cells.
    #[arg(long, default_value_t = 1500)]
    pub layerwise_steps: u64,
    /// FixMatch's unlabelled images per labelled one (μ).
    #[arg(long, default_value_t = 7)]
    pub fixmatch_ratio: usize,
    /// FixMatch's optimizer steps (scaled by --scale). At 600 Fashion-MNIST labels, with the
    /// paper's views, its gain over supervised LeNet-5 grew from +2.7 points at 3,000 steps to
    /// +3.8 at 8,000.
    #[arg(long, default_value_t = 8000)]
    pub fixmatch_steps: u64,
    /// Crop padding of FixMatch's weak view, in pixels. The paper's 12.5% of the side (4 pixels
    /// here) with its Cutout of up to half the side gave 81.9 ± 0.9% at 600 Fashion-MNIST labels;
    /// 2 pixels (as the supervised recipe shifts) with Cutout up to 0.3 of the side gives
    /// 83.2 ± 1.3% (3 seeds, 8,000 steps).
    #[arg(long, default_value_t = 2)]
    pub fixmatch_weak_pad: usize,
    /// Largest Cutout square of FixMatch's strong view, as a share of the side (the paper: 0.5).
    #[arg(long, default_value_t = 0.3)]
    pub fixmatch_cutout: f32,
    /// FixMatch's optimizer: adamw (the supervised recipe's AdamW) or sgd (the paper's SGD
    /// with Nesterov momentum 0.9 and L2 weight decay).
    #[arg(long, default_value = "adamw", value_parser = ["adamw", "sgd"])]
    pub fixmatch_optimizer: String,
    /// FixMatch's peak learning rate (default: 2e-3 with adamw, the paper's 0.03 with sgd).
    #[arg(long)]
    pub fixmatch_lr: Option<f64>,
    /// FixMatch's weight decay (default: the supervised recipe's 5e-4 with adamw, the paper's
    /// 5e-4 with sgd).
    #[arg(long)]
    pub fixmatch_wd: Option<f64>,
    /// Label-split seeds per cell (each also seeds initialisation and batches).
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Seeds for some label counts in place of --seeds, as LABELS=SEEDS, comma-separated:
    /// `100=1,6000=1,60000=1` keeps three seeds only at 600 labels, where the targets are
    /// measured, for about 0.7 of the table's time.
    #[arg(long, value_delimiter = ',', value_parser = parse_seeds_for)]
    pub seeds_for: Vec<(usize, u64)>,
    /// Output folder: report.md, results.json, accuracy.png, and each run's model under
    /// models/METHOD-LABELS-seedSEED (for `anneal experiment shift`).
    #[arg(long, default_value = "runs/label-efficiency")]
    pub out: PathBuf,
    /// Scale every cell's steps by this factor (0.1: a tenth of the training).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// A small version that runs the whole path in seconds: 600 labels, one seed, at most 30
    /// steps per training run, 1,000 test images.
    #[arg(long)]
    pub quick: bool,
    /// Keep the runs (and pretrained encoders) an earlier, interrupted or partial, table left in
    /// --out with the same recipe, and train only the rest: each finished run's result.json lies
    /// beside its model, so a table stopped at any point loses only the run in progress.
    #[arg(long)]
    pub resume: bool,
}

/// One `LABELS=SEEDS` pair of --seeds-for.
fn parse_seeds_for(text: &str) -> std::result::Result<(usize, u64), String> {
    let bad = || format!("{text:?}: use LABELS=SEEDS, such as 60000=1");
    let (labels, seeds) = text.split_once('=').ok_or_else(bad)?;
    let labels = labels.trim().parse().map_err(|_| bad())?;
    let seeds: u64 = seeds.trim().parse().map_err(|_| bad())?;
    if seeds == 0 {
        return Err(format!("{text:?}: a cell needs at least one seed"));
    }
    Ok((labels, seeds))
}

impl LabelEfficiency {
    /// The seeds a cell of `labels` labelled images runs: one with --quick, else --seeds-for's,
    /// else --seeds.
    fn seeds_at(&self, labels: usize) -> u64 {
        if self.quick {
            return 1;
        }
        self.seeds_for
            .iter()
            .rev()
            .find(|(n, _)| *n == labels)
            .map_or(self.seeds, |(_, s)| *s)
            .max(1)
    }
}

/// Everything besides (method, labels, seed) that decides what a run gives: a run left in
/// --out is kept by --resume only when it was trained under the same string.
fn recipe(e: &LabelEfficiency) -> String {
    format!(
        "recipes {RECIPES}; {}; fixmatch {} steps, mu {}, pad {}, cutout {}, {} lr {:?} wd {:?}; pretraining mae {} moco {} layerwise \
         {} steps; scale {}; quick {}",
        e.dataset,
        e.fixmatch_steps,
        e.fixmatch_ratio,
        e.fixmatch_weak_pad,
        e.fixmatch_cutout,
        e.fixmatch_optimizer,
        e.fixmatch_lr,
        e.fixmatch_wd,
        e.mae_steps,
        e.moco_steps,
        e.layerwise_steps,
        e.scale,
        e.quick
    )
}

/// The version of the recipes written in this file (settings functions, step caps): raise it
/// whenever one changes, so that --resume trains again what they now train differently.
const RECIPES: u32 = 1;

/// A finished run's record beside its model (`result.json`).
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedRun<T> {
    recipe: String,
    result: T,
}

/// The record in `dir` when it was written under `recipe`.
fn saved_run<T: serde::de::DeserializeOwned>(dir: &std::path::Path, recipe: &str) -> Option<T> {
    let text = std::fs::read_to_string(dir.join("result.json")).ok()?;
    let saved: SavedRun<T> = serde_json::from_str(&text).ok()?;
    (saved.recipe == recipe).then_some(saved.result)
}

/// Writes `result` under `recipe` to `dir` (atomically: a run killed while writing leaves no
/// record, and is trained again).
fn save_run<T: serde::Serialize>(dir: &std::path::Path, recipe: &str, result: T) -> Result<()> {
    let saved = SavedRun {
        recipe: recipe.to_string(),
        result,
    };
    write_atomic(
        &dir.join("result.json"),
        serde_json::to_string_pretty(&saved)?.as_bytes(),
    )?;
    Ok(())
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

/// How much of each recipe's training a run does: its steps times `scale`, at most `cap`.
#[derive(Clone, Copy, Debug)]
struct Budget {
    scale: f64,
    cap: u64,
}

impl Budget {
    fn steps(self, steps: u64) -> u64 {
        ((steps as f64 * self.scale).ceil() as u64).clamp(1, self.cap)
    }
}

/// The supervised LeNet-5 recipe for `labels` labelled images: AdamW 2e-3 with weight decay
/// 5e-4, batch 64, augmentation (crop, flip where allowed, erasing), 15 epochs, at least 600
/// steps (about 380 epochs at 100 labels).
fn lenet_settings(labels: usize, seed: u64, budget: Budget) -> TrainSettings {
    TrainSettings {
        steps: budget.steps(TrainSettings::steps_for(labels, 64, 15.0, 600)),
        batch: 64,
        lr: 2e-3,
        weight_decay: 5e-4,
        optimizer: Optim::AdamW,
        seed,
    }
}

/// The supervised ViT recipe (also MAE's and MoCo's fine-tuning): AdamW 1e-3 with weight decay
/// 0.05, batch 64, 15 epochs, at least 600 and at most [`VIT_MAX_STEPS`] steps.
fn vit_settings(labels: usize, seed: u64, budget: Budget) -> TrainSettings {
    let settings = lenet_settings(labels, seed, budget);
    TrainSettings {
        lr: 1e-3,
        weight_decay: 0.05,
        steps: settings.steps.min(budget.steps(VIT_MAX_STEPS)),
        ..settings
    }
}

/// FixMatch's recipe on top of the supervised one (`settings`): batches of 32 labelled images
/// for `--fixmatch-steps`, AdamW at the supervised rate or the paper's SGD at 0.03, weight decay
/// 5e-4 unless set; and its views.
fn fixmatch_recipe(
    e: &LabelEfficiency,
    settings: &TrainSettings,
    budget: Budget,
) -> (TrainSettings, FixMatchViews) {
    let sgd = e.fixmatch_optimizer == "sgd";
    let settings = TrainSettings {
        steps: budget.steps(e.fixmatch_steps),
        batch: 32,
        lr: e
            .fixmatch_lr
            .unwrap_or(if sgd { 0.03 } else { settings.lr }),
        weight_decay: e.fixmatch_wd.unwrap_or(5e-4),
        optimizer: if sgd {
            Optim::SgdNesterov
        } else {
            Optim::AdamW
        },
        ..settings.clone()
    };
    let views = FixMatchViews {
        ratio: e.fixmatch_ratio,
        weak_pad: e.fixmatch_weak_pad,
        cutout: e.fixmatch_cutout,
    };
    (settings, views)
}

/// The ViT's step cap: 5,000 steps of 64 (5.3 epochs at 60,000 labels, where 15 epochs would
/// take 14,063 steps, about 23 minutes a seed on two cores, a third of the table's time).
const VIT_MAX_STEPS: u64 = 5000;

/// A linear probe's recipe: AdamW 1e-2 without weight decay, batch 64, 15 epochs, at least
/// 600 steps.
fn probe_settings(labels: usize, seed: u64, budget: Budget) -> TrainSettings {
    TrainSettings {
        lr: 1e-2,
        weight_decay: 0.0,
        ..lenet_settings(labels, seed, budget)
    }
}

/// A step callback that advances `bar`, labelled `what`, and every 20 steps shows the loss.
fn ticker<'a>(
    bar: &'a indicatif::ProgressBar,
    what: String,
) -> impl FnMut(u64, u64, &StepOutput) + 'a {
    bar.set_message(what.clone());
    move |_, _, out| {
        bar.inc(1);
        if bar.position().is_multiple_of(20) {
            bar.set_message(format!("{what}, loss {:.3}", out.loss));
        }
    }
}

/// The pretraining `method` starts from (`mae`, `moco` or `layerwise`: one encoder per seed,
/// shared by every label count), if any.
fn pretraining_kind(method: &str) -> Option<&str> {
    let kind = method.split('-').next().unwrap_or_default();
    ["mae", "moco", "layerwise"].contains(&kind).then_some(kind)
}

/// Where the encoder `kind` pretrained for `seed` is kept.
fn pretrained_dir(e: &LabelEfficiency, kind: &str, seed: u64) -> PathBuf {
    e.out
        .join("models")
        .join(format!("{kind}-pretrained-seed{seed}"))
}

/// Pretrains a ViT on every training image with `kind` (`mae` or `moco`), with a progress bar;
/// the model and the seconds it took.
fn pretrain(
    e: &LabelEfficiency,
    data: &ImageData,
    kind: &str,
    seed: u64,
    budget: Budget,
) -> Result<(Box<dyn TrainModel>, f64)> {
    let dir = pretrained_dir(e, kind, seed);
    let recipe = recipe(e);
    if e.resume {
        if let Some(seconds) = saved_run::<f64>(&dir, &recipe) {
            let model: Box<dyn TrainModel> = match kind {
                "mae" => Box::new(new_vit(data, VitRole::Mae, seed)?),
                "moco" => Box::new(new_vit(data, VitRole::Contrastive, seed)?),
                _ => Box::new(new_mlp(data, seed)?),
            };
            read_params(&dir.join("model.safetensors"), model.params())?;
            println!(
                "{:>10} {kind} pretraining seed {seed}: kept from {} ({seconds:.1} s)",
                "",
                dir.display()
            );
            return Ok((model, seconds));
        }
    }
    let (steps, name, layers) = match kind {
        "mae" => (budget.steps(e.mae_steps), "MAE", 1),
        "moco" => (budget.steps(e.moco_steps), "MoCo v3", 1),
        _ => (
            budget.steps(e.layerwise_steps),
            "layer-wise",
            MLP_HIDDEN.len() as u64,
        ),
    };
    let bar = crate::finetune::progress(steps * layers);
    let t0 = std::time::Instant::now();
    let settings = TrainSettings {
        steps,
        batch: 128,
        lr: 1.5e-3,
        weight_decay: 0.05,
        optimizer: Optim::AdamW,
        seed,
    };
    let mut tick = ticker(&bar, format!("{name} pretraining, seed {seed}"));
    let (model, loss) = match kind {
        "mae" => pretrain_mae(data, Mae::default(), &settings, &mut tick)?,
        "moco" => pretrain_moco(data, &settings, &mut tick)?,
        _ => {
            let (model, losses) = pretrain_layerwise(data, &settings, &mut tick)?;
            (model, losses.last().copied().unwrap_or(f64::NAN))
        }
    };
    bar.finish_and_clear();
    let seconds = t0.elapsed().as_secs_f64();
    println!(
        "{:>10} {name} pretraining seed {seed}: {} steps of 128 unlabelled images ({:.1} \
         epochs) in {seconds:.1} s, final loss {loss:.3}",
        "",
        steps * layers,
        (steps * layers * 128) as f64 / data.train.len() as f64
    );
    std::fs::create_dir_all(&dir)?;
    write_params(&dir.join("model.safetensors"), model.params())?;
    save_run(&dir, &recipe, seconds)?;
    Ok((model, seconds))
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
    if !(0.0..=1.0).contains(&e.fixmatch_cutout) {
        bail!(
            "--fixmatch-cutout {}: use a share of the side from 0 to 1",
            e.fixmatch_cutout
        );
    }
    let mut data = ImageData::load(&e.dataset, &anneal_data::data_root())?;
    let budget = Budget {
        scale: e.scale,
        cap: if e.quick { 30 } else { u64::MAX },
    };
    let labels = if e.quick {
        let mut test = (*data.test).clone();
        test.pixels.truncate(1000 * test.rows * test.cols);
        test.labels.truncate(1000);
        data.test = std::sync::Arc::new(test);
        vec![600]
    } else {
        e.labels.clone()
    };
    let seeds: Vec<u64> = labels.iter().map(|&n| e.seeds_at(n)).collect();
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
         seeds per cell {:?}; kernel path: {}",
        data.name,
        data.train.len(),
        data.test.len(),
        data.classes(),
        labels,
        seeds,
        anneal_tensor::kernel_path()
    );
    let recipe = recipe(&e);
    let mut cells = Vec::new();
    // MAE and MoCo encoders by seed, pretrained once and shared by every label count.
    let mut pretrained: HashMap<(String, u64), (Box<dyn TrainModel>, f64)> = HashMap::new();
    for method in &e.methods {
        for &n in &labels {
            if NEEDS_UNLABELLED.contains(&method.as_str()) && n >= data.train.len() {
                println!("{method:>10} {n:>6} labels: skipped (no unlabelled images left)");
                continue;
            }
            let mut cell = Cell {
                method: method.clone(),
                labels: n,
                runs: Vec::new(),
            };
            for seed in 0..e.seeds_at(n) {
                let dir = e
                    .out
                    .join("models")
                    .join(format!("{method}-{n}-seed{seed}"));
                if e.resume {
                    if let Some(result) = saved_run::<CellResult>(&dir, &recipe) {
                        println!(
                            "{method:>10} {n:>6} labels seed {seed}: test accuracy {:.2}% after \
                             {} steps in {:.1} s (kept from an earlier run)",
                            100.0 * result.accuracy,
                            result.steps,
                            result.seconds
                        );
                        cell.runs.push(result);
                        continue;
                    }
                }
                let labelled = data.train.balanced_subset(n, seed)?;
                let settings = lenet_settings(n, seed, budget);
                let (fixmatch_settings, fixmatch_views) = fixmatch_recipe(&e, &settings, budget);
                let total_steps = match method.as_str() {
                    "fixmatch" => fixmatch_settings.steps,
                    "pseudo-label" => 0,
                    _ => settings.steps,
                };
                let kind = pretraining_kind(method).unwrap_or_default().to_string();
                if !kind.is_empty() && !pretrained.contains_key(&(kind.clone(), seed)) {
                    let (model, seconds) = pretrain(&e, &data, &kind, seed, budget)?;
                    pretrained.insert((kind.clone(), seed), (model, seconds));
                }
                let bar = crate::finetune::progress(total_steps);
                let mut tick = ticker(&bar, format!("{method}, {n} labels, seed {seed}"));
                let (model, result) = match method.as_str() {
                    "lenet" => train_lenet(&data, &labelled, true, &settings, &mut tick)?,
                    "fixmatch" => train_fixmatch(
                        &data,
                        &labelled,
                        FixMatch::default(),
                        fixmatch_views,
                        &fixmatch_settings,
                        &mut tick,
                    )?,
                    "pseudo-label" => {
                        let (model, r, pseudo) = train_pseudo_label(
                            &data,
                            &labelled,
                            0.95,
                            &settings,
                            15.0 * budget.scale.min(1.0),
                            budget.cap,
                            &mut tick,
                        )?;
                        println!("{:>10} {n:>6} labels seed {seed}: {pseudo} pseudo-labels of probability >= 0.95", "");
                        (model, r)
                    }
                    "vit" => {
                        let settings = vit_settings(n, seed, budget);
                        train_vit(&data, &labelled, &settings, &mut tick)?
                    }
                    "mae" | "mae-probe" | "moco" | "moco-probe" => {
                        let probe = method.ends_with("-probe");
                        let settings = if probe {
                            probe_settings(n, seed, budget)
                        } else {
                            vit_settings(n, seed, budget)
                        };
                        let (encoder, _) = &pretrained[&(kind.clone(), seed)];
                        finetune_vit(
                            &data,
                            encoder.params(),
                            &labelled,
                            probe,
                            &settings,
                            &mut tick,
                        )?
                    }
                    "mlp" => train_mlp(&data, &labelled, &settings, &mut tick)?,
                    "layerwise" => {
                        let (pretrained, _) = &pretrained[&(kind.clone(), seed)];
                        finetune_mlp(&data, pretrained.params(), &labelled, &settings, &mut tick)?
                    }
                    other => unreachable!("method {other} was checked above"),
                };
                bar.finish_and_clear();
                let architecture = match method.as_str() {
                    "lenet" | "fixmatch" | "pseudo-label" => "lenet",
                    "mlp" | "layerwise" => "mlp",
                    _ => "vit",
                };
                let info = ImageModelInfo {
                    kind: architecture.into(),
                    dataset: data.name.clone(),
                    side: data.train.rows,
                    classes: data.classes(),
                    normalise: data.normalise,
                    label: format!("{method}, {n} labels, seed {seed}"),
                };
                save_image_model(&dir, &*model, &info)?;
                save_run(&dir, &recipe, &result)?;
                let metrics: Vec<String> = result
                    .metrics
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.3}"))
                    .collect();
                println!(
                    "{method:>10} {n:>6} labels seed {seed}: test accuracy {:.2}% after {} steps \
                     ({:.1} epochs) in {:.1} s (final training loss {:.3}; {})",
                    100.0 * result.accuracy,
                    result.steps,
                    result.epochs,
                    result.seconds,
                    result.final_loss,
                    metrics.join(", ")
                );
                cell.runs.push(result);
            }
            cells.push(cell);
        }
    }
    let mut pretraining: BTreeMap<(String, u64), f64> = pretrained
        .iter()
        .map(|(key, (_, seconds))| (key.clone(), *seconds))
        .collect();
    // Encoders whose every run was kept were not loaded: their time comes from their record.
    let most_seeds = seeds.iter().copied().max().unwrap_or(1);
    for kind in e.methods.iter().filter_map(|m| pretraining_kind(m)) {
        for seed in 0..most_seeds {
            if let Entry::Vacant(slot) = pretraining.entry((kind.to_string(), seed)) {
                if let Some(seconds) = saved_run::<f64>(&pretrained_dir(&e, kind, seed), &recipe) {
                    slot.insert(seconds);
                }
            }
        }
    }
    write_report(&e, &data, &labels, &cells, &pretraining)
}

fn write_report(
    e: &LabelEfficiency,
    data: &ImageData,
    labels: &[usize],
    cells: &[Cell],
    pretraining: &BTreeMap<(String, u64), f64>,
) -> Result<()> {
    let mut md = String::new();
    writeln!(
        md,
        "# Label efficiency on {}\n\nTest accuracy (mean ± sd over label-split seeds) on {} test \
         images, by labelled training images; each cell's wall time is the sum over its seeds.\n\n\
         Recipe: {}; kernel path: {}.\n",
        data.name,
        data.test.len(),
        recipe(e),
        anneal_tensor::kernel_path()
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
                    let accuracy = match c.runs.len() {
                        1 => format!("{:.1}% (1 seed; ", 100.0 * mean),
                        _ => format!("{:.1} ± {:.1}% (", 100.0 * mean, 100.0 * sd),
                    };
                    row.push(format!(
                        "{accuracy}{} steps, {:.0} epochs, {:.0} s)",
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
    let trained: f64 = cells.iter().map(Cell::seconds).sum();
    let pretrained: f64 = pretraining.values().sum();
    if !pretraining.is_empty() {
        let each: Vec<String> = pretraining
            .iter()
            .map(|((kind, seed), seconds)| format!("{kind} seed {seed} {seconds:.0} s"))
            .collect();
        writeln!(
            md,
            "\nPretraining on the unlabelled images, once per seed for every label count: {}.",
            each.join(", ")
        )?;
    }
    writeln!(
        md,
        "\nTotal wall time: {:.0} s ({trained:.0} s in the cells, {pretrained:.0} s pretraining).",
        trained + pretrained
    )?;
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
    crate::experiment::write_report(&e.out, &md, &serde_json::Value::Array(json))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        e: LabelEfficiency,
    }

    #[test]
    fn seeds_for_overrides_seeds_by_label_count() {
        let cli =
            Cli::try_parse_from(["t", "--seeds", "3", "--seeds-for", "100=1,60000=2"]).unwrap();
        assert_eq!(cli.e.seeds_at(100), 1);
        assert_eq!(cli.e.seeds_at(600), 3);
        assert_eq!(cli.e.seeds_at(60000), 2);
        for bad in ["600", "600=0", "x=1", "600=y"] {
            let err = Cli::try_parse_from(["t", "--seeds-for", bad])
                .err()
                .unwrap();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }
}
