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
        default_value = "dense,moe8,moe4,moe16,moe8-top2-half,moe8-top2"
    )]
    pub variants: Vec<String>,
    /// Every n-th block is MoE in the MoE variants (`model.moe.every`).
    #[arg(long, default_value_t = 1)]
    pub every: usize,
    /// Override a config key of every run (repeatable), e.g. --set train.max_steps=500.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// A small version that checks the whole path in seconds: a tiny model, 30 steps.
    #[arg(long)]
    pub quick: bool,
}

pub fn run(cmd: ExperimentCommand, threads: Option<usize>) -> Result<()> {
    match cmd {
        ExperimentCommand::Moe(e) => moe(e, threads),
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
fn variant(name: &str, every: usize, n_embd: usize) -> Result<(String, Vec<String>)> {
    let moe = |experts: usize, top_k: usize, d_ff: usize| {
        vec![
            format!("model.moe.experts={experts}"),
            format!("model.moe.top_k={top_k}"),
            format!("model.moe.every={every}"),
            format!("model.moe.d_ff={d_ff}"),
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
                tokenize_sources(&src, &["rs".to_string()], mb, &dir, false)?;
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
        let (what, sets) = variant(name, e.every, base.model.n_embd)?;
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
            let gpt = config.gpt_config(manifest.vocab_size)?;
            let embed = gpt.vocab_size * gpt.n_embd + gpt.block_size * gpt.n_embd;
            let params = (
                embed + gpt.non_embedding_params(),
                embed + gpt.active_non_embedding_params(),
            );
            plan.push((name.clone(), what.clone(), seed, dir, all, params));
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
    for (i, (name, what, seed, dir, sets, params)) in plan.into_iter().enumerate() {
        let summary_path = dir.join("summary.json");
        let done = std::fs::read_to_string(&summary_path)
            .ok()
            .and_then(|t| serde_json::from_str::<RunSummary>(&t).ok())
            .filter(|s| s.steps == steps && s.start_step == 0 && !s.interrupted);
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
