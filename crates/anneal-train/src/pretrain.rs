//! A pretraining run: a [`Trainer`] driven over a tokenized corpus, with metrics, plots,
//! checkpoints and progress:
//!
//! ```text
//! set-up, or resume from the newest checkpoint
//! for step in start..max_steps:
//!     Trainer::step                     (lr from the schedule, micro-batches, clip, AdamW)
//!     every eval_interval steps:        Trainer::evaluate, metrics.jsonl, loss-curve PNG
//!     every checkpoint_interval steps:  Trainer::save (and at the end, and on Ctrl-C)
//! ```
//!
//! Batches are windows of `block_size + 1` tokens at offsets drawn by a generator seeded with
//! (seed, step, micro-batch); dropout masks are seeded the same way. Nothing random carries state
//! from one step to the next, so a run resumed from the checkpoint of step s draws exactly what
//! the uninterrupted run drew, and its losses are bitwise identical.

use crate::checkpoint::{self, DataPosition, TrainerState};
use crate::config::RunConfig;
use crate::trainer::{pretraining_on, Trainer};
use anneal_chart::{line_chart, Series};
use anneal_data::{Manifest, ShardSet, Tokenizer};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Where a run starts.
#[derive(Clone, Debug, Default)]
pub enum Resume {
    /// From scratch (an existing run directory's checkpoints are left alone but not used).
    #[default]
    No,
    /// From the newest checkpoint under the run's `out_dir`.
    Latest,
    /// From this checkpoint directory.
    From(PathBuf),
}

/// How long work reports its progress: the library calls it, the binary draws it (a progress
/// bar) or ignores it.
pub trait Progress: Send + Sync {
    /// Work of `total` units starts at `position`.
    fn begin(&self, total: u64, position: u64) {
        let _ = (total, position);
    }
    /// `position` units are done; `message` says how it goes.
    fn advance(&self, position: u64, message: &str) {
        let _ = (position, message);
    }
    /// Runs `f` (which logs) with the display out of the way.
    fn suspend(&self, f: &mut dyn FnMut()) {
        f()
    }
    /// The work is over.
    fn finish(&self) {}
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {}

/// How a run is driven.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Where to start.
    pub resume: Resume,
    /// Where progress goes (nowhere when `None`).
    pub progress: Option<Arc<dyn Progress>>,
    /// Set (by a Ctrl-C handler) to stop after the current step with a checkpoint.
    pub stop: Arc<AtomicBool>,
    /// Run even when the memory the run needs at least exceeds the machine's physical memory.
    pub force: bool,
    /// Ranks to run as threads of this process (the `local` backend); 0 or 1 runs one. The
    /// layout over them is the run config's `[parallel]` section.
    pub ranks: usize,
}
/// An f64 that JSON wrote as `null` (a NaN or an infinity) reads back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// A validation history whose `null` losses (NaN) read back as NaN.
fn history_nan_if_null<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<(u64, f64)>, D::Error> {
    let v: Vec<(u64, Option<f64>)> = Deserialize::deserialize(d)?;
    Ok(v.into_iter()
        .map(|(s, l)| (s, l.unwrap_or(f64::NAN)))
        .collect())
}

/// What a run did (written to `summary.json` in the run directory).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSummary {
    /// Step the run started from (0, or the resumed checkpoint's).
    pub start_step: u64,
    /// Steps completed in total.
    pub steps: u64,
    /// Whether it stopped early on request.
    pub interrupted: bool,
    /// Last validation loss.
    pub val_loss: Option<f64>,
    /// Validation losses by step.
    #[serde(deserialize_with = "history_nan_if_null")]
    pub val_history: Vec<(u64, f64)>,
    /// Wall time of this invocation, evaluation and checkpoints included.
    #[serde(deserialize_with = "nan_if_null")]
    pub wall_seconds: f64,
    /// Mean time of one optimizer step in this invocation.
    #[serde(deserialize_with = "nan_if_null")]
    pub ms_per_step: f64,
    /// Mean time per step spent waiting for communication outside backward (gradient reductions
    /// overlapping did not hide, ZeRO's parameter all-gather) and, with model parallelism, inside
    /// forward and backward (tensor-parallel collectives, a pipeline stage's receives with its
    /// bubble, ZeRO-3's gathers, experts' all-to-alls); 0 on one rank.
    #[serde(deserialize_with = "nan_if_null")]
    pub exposed_comm_ms_per_step: f64,
    /// Training tokens per second (steps only).
    #[serde(deserialize_with = "nan_if_null")]
    pub tokens_per_second: f64,
    /// Model FLOP utilisation against the machine's f32 peak.
    #[serde(deserialize_with = "nan_if_null")]
    pub mfu: f64,
    /// The last checkpoint written.
    pub checkpoint: Option<PathBuf>,
    /// Peak resident memory of the process in MB.
    #[serde(deserialize_with = "nan_if_null")]
    pub peak_rss_mb: f64,
    /// The peak RSS the memory estimate predicted before the run ([`crate::memory`]), MB.
    #[serde(default)]
    pub estimated_peak_mb: f64,
    /// The engine's peak of tensor storage in the process (parameters, gradients, activations,
    /// communication copies) plus the optimizer's state, in MB: what `anneal plan` estimates
    /// per rank (under `--ranks`, every rank of the process together).
    #[serde(default, deserialize_with = "nan_if_null")]
    pub peak_tensor_mb: f64,
}

/// One line of `metrics.jsonl`: a training step, or a validation pass.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Metric {
    /// A validation pass after `step` steps.
    Eval {
        /// Steps completed.
        step: u64,
        /// Mean validation cross-entropy (nats per token).
        val_loss: f64,
        /// exp(val_loss).
        val_ppl: f64,
        /// Mean training loss of the steps since the previous pass.
        train_loss: Option<f64>,
    },
    /// One optimizer step.
    Step {
        /// This step's number (1-based: steps completed after it).
        step: u64,
        /// Mean loss over its micro-batches.
        loss: f64,
        /// Its learning rate.
        lr: f64,
        /// Global gradient norm before clipping.
        grad_norm: f64,
        /// Training tokens per second over the steps since the last log line.
        tokens_per_s: f64,
        /// Model FLOP utilisation.
        mfu: f64,
        /// What the Mixture-of-Experts layers reported, for an MoE model.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        moe: Option<MoeMetrics>,
        /// The loss scale this step ran under, for an f16 run (dynamic loss scaling).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        loss_scale: Option<f64>,
        /// Steps skipped so far because their loss-scaled gradients overflowed (f16 runs).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        skipped_steps: Option<u64>,
    },
}

/// A training step's Mixture-of-Experts figures in `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoeMetrics {
    /// The load-balancing losses, weighted and summed over the layers (part of `loss`'s step
    /// but not of `loss`).
    pub aux_loss: f64,
    /// The router z-losses, weighted and summed over the layers.
    pub z_loss: f64,
    /// Each MoE layer's routing.
    pub layers: Vec<MoeLayerMetrics>,
}

/// One Mixture-of-Experts layer's routing over a step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoeLayerMetrics {
    /// Its block.
    pub block: usize,
    /// Each expert's share of the assignments the router made (before capacity).
    pub load: Vec<f64>,
    /// The share of assignments dropped for want of capacity.
    pub dropped: f64,
}

impl MoeMetrics {
    /// The figures among a step's named metrics (`moe_aux_loss`, `moe_z_loss`, `moe.i.load.e`,
    /// `moe.i.dropped`, as the model reports them), or `None` for a dense model.
    pub fn from_named(metrics: &[(String, f64)]) -> Option<MoeMetrics> {
        let get = |name: &str| metrics.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
        let (aux_loss, z_loss) = (get("moe_aux_loss")?, get("moe_z_loss")?);
        let mut layers: std::collections::BTreeMap<usize, MoeLayerMetrics> = Default::default();
        for (name, v) in metrics {
            let parts: Vec<&str> = name.split('.').collect();
            let Some(block) = parts.get(1).and_then(|b| b.parse::<usize>().ok()) else {
                continue;
            };
            let layer = || MoeLayerMetrics {
                block,
                load: Vec::new(),
                dropped: 0.0,
            };
            match parts[..] {
                ["moe", _, "load", e] => {
                    let Ok(e) = e.parse::<usize>() else { continue };
                    let load = &mut layers.entry(block).or_insert_with(layer).load;
                    if load.len() <= e {
                        load.resize(e + 1, 0.0);
                    }
                    load[e] = *v;
                }
                ["moe", _, "dropped"] => layers.entry(block).or_insert_with(layer).dropped = *v,
                _ => {}
            }
        }
        Some(MoeMetrics {
            aux_loss,
            z_loss,
            layers: layers.into_values().collect(),
        })
    }
}

/// The run directory's files.
struct RunFiles {
    metrics: PathBuf,
    plot: PathBuf,
    expert_plot: PathBuf,
    checkpoints: PathBuf,
    abandoned: PathBuf,
}

impl RunFiles {
    fn new(out: &Path) -> RunFiles {
        RunFiles {
            metrics: out.join("metrics.jsonl"),
            plot: out.join("loss.png"),
            expert_plot: out.join("expert_load.png"),
            checkpoints: out.join("checkpoints"),
            abandoned: out.join("abandoned"),
        }
    }
}

/// Reads `metrics.jsonl`, keeping the lines up to `step` (a resumed run drops what came after
/// its checkpoint) and skipping lines that do not parse (a run killed mid-write).
fn read_metrics(path: &Path, up_to: u64) -> Vec<Metric> {
    let Ok(file) = File::open(path) else {
        return Vec::new();
    };
    BufReader::new(file)
        .lines()
        .map_while(|l| l.ok())
        .filter_map(|l| serde_json::from_str::<Metric>(&l).ok())
        .filter(|m| match m {
            Metric::Eval { step, .. } | Metric::Step { step, .. } => *step <= up_to,
        })
        .collect()
}

fn open_tokenized(dir: &Path) -> Result<(Manifest, Tokenizer, ShardSet, ShardSet)> {
    let manifest = Manifest::load(dir).with_context(|| {
        format!(
            "no tokenized corpus in {} (create one with `anneal data tokenize`)",
            dir.display()
        )
    })?;
    let tokenizer = Tokenizer::load(&dir.join("tokenizer.json"))?;
    let train = ShardSet::open(dir, &manifest, "train")?;
    let val = ShardSet::open(dir, &manifest, "val")?;
    Ok((manifest, tokenizer, train, val))
}

/// Resuming from an older checkpoint starts a new branch: the checkpoints after it, from the
/// branch being abandoned, move to `abandoned/` under the run directory, so that neither pruning
/// nor a later `--resume` ever prefers them over the new branch.
fn set_aside_newer(files: &RunFiles, step: u64) -> Result<()> {
    let newer: Vec<_> = checkpoint::list(&files.checkpoints)
        .into_iter()
        .filter(|(s, _)| *s > step)
        .collect();
    if newer.is_empty() {
        return Ok(());
    }
    let aside = files.abandoned.join(format!("after-step-{step:06}"));
    std::fs::create_dir_all(&aside).with_context(|| format!("creating {}", aside.display()))?;
    for (_, dir) in &newer {
        let to = aside.join(dir.file_name().expect("checkpoint directories have names"));
        if to.exists() {
            std::fs::remove_dir_all(&to).with_context(|| format!("removing {}", to.display()))?;
        }
        std::fs::rename(dir, &to).with_context(|| format!("moving {} aside", dir.display()))?;
    }
    tracing::warn!(
        "resuming at step {step} starts a new branch: {} newer checkpoint(s) moved to {}",
        newer.len(),
        aside.display()
    );
    Ok(())
}

fn plot_losses(path: &Path, metrics: &[Metric]) -> Result<()> {
    let mut train = Vec::new();
    let mut val = Vec::new();
    for m in metrics {
        match m {
            Metric::Step { step, loss, .. } => train.push((*step as f64, *loss)),
            Metric::Eval { step, val_loss, .. } => val.push((*step as f64, *val_loss)),
        }
    }
    let smooth = anneal_chart::smooth(&train);
    line_chart(
        path,
        "anneal pretrain: loss",
        "step",
        "cross-entropy (nats/token)",
        &[
            Series {
                label: "train",
                points: &smooth,
            },
            Series {
                label: "validation",
                points: &val,
            },
        ],
    )?;
    Ok(())
}

/// Draws the Mixture-of-Experts layers' routing over the run: for each layer, the busiest
/// expert's share of the assignments (a balanced layer sits at 1/experts) and the share dropped,
/// smoothed over about 1% of the run. Nothing for a dense model.
fn plot_expert_load(path: &Path, metrics: &[Metric]) -> Result<()> {
    /// A layer's block, experts, busiest expert's share by step and dropped share by step.
    type LayerCurves = (usize, usize, Vec<(f64, f64)>, Vec<(f64, f64)>);
    let mut per_layer: Vec<LayerCurves> = Vec::new();
    for m in metrics {
        let Metric::Step {
            step,
            moe: Some(moe),
            ..
        } = m
        else {
            continue;
        };
        for (i, l) in moe.layers.iter().enumerate() {
            if per_layer.len() <= i {
                per_layer.push((l.block, l.load.len(), Vec::new(), Vec::new()));
            }
            let busiest = l.load.iter().cloned().fold(0.0, f64::max);
            per_layer[i].2.push((*step as f64, busiest));
            per_layer[i].3.push((*step as f64, l.dropped));
        }
    }
    if per_layer.is_empty() {
        return Ok(());
    }
    let smooth = anneal_chart::smooth;
    let experts = per_layer[0].1.max(1);
    let first = per_layer[0].2.first().map_or(0.0, |p| p.0);
    let last = per_layer[0].2.last().map_or(1.0, |p| p.0);
    let uniform = [(first, 1.0 / experts as f64), (last, 1.0 / experts as f64)];
    let mut labels = Vec::new();
    let mut points = Vec::new();
    for (block, _, busiest, dropped) in &per_layer {
        labels.push(format!("block {block}: busiest expert"));
        points.push(smooth(busiest));
        labels.push(format!("block {block}: dropped"));
        points.push(smooth(dropped));
    }
    let mut series: Vec<Series> = labels
        .iter()
        .zip(&points)
        .map(|(label, points)| Series { label, points })
        .collect();
    series.push(Series {
        label: "balanced share (1/experts)",
        points: &uniform,
    });
    line_chart(
        path,
        "anneal pretrain: expert load",
        "step",
        "share of assignments",
        &series,
    )?;
    Ok(())
}

/// Runs (or resumes) the pretraining described by `config`: on one rank, or on `opts.ranks`
/// ranks as threads of this process (the `local` backend), each with its share of the threads.
/// With several ranks, rank 0 writes the run directory and reports; the summary is rank 0's.
pub fn train(config: &RunConfig, opts: &RunOptions) -> Result<RunSummary> {
    let threads = crate::machine::threads(config.train.threads);
    let ranks = opts.ranks.max(1);
    if ranks == 1 {
        return anneal_tensor::with_threads(threads, || {
            train_on_pool(config, opts, threads, None)
        })?;
    }
    // An impossible layout is refused before any thread starts.
    config.layout(ranks)?;
    let per_rank = (threads / ranks).max(1);
    let mut summaries = anneal_dist::local::run(ranks, |comm| {
        let world: Box<dyn anneal_dist::Communicator> = Box::new(comm);
        anneal_tensor::with_threads(per_rank, || {
            train_on_pool(config, opts, per_rank, Some(world))
        })
        .map_err(anyhow::Error::from)
        .and_then(|r| r)
        .map_err(|e| format!("{e:#}"))
    })?;
    Ok(summaries.swap_remove(0))
}

/// Runs (or resumes) the pretraining described by `config` as one rank of a job over `world`
/// (one process of `mpirun`, say), on `config.train.threads` threads. Every rank of the job calls
/// it; rank 0 writes the run directory and reports.
pub fn train_rank(
    config: &RunConfig,
    opts: &RunOptions,
    world: Box<dyn anneal_dist::Communicator>,
) -> Result<RunSummary> {
    let mut threads = crate::machine::threads(config.train.threads);
    if config.train.threads == 0 {
        // Every core is shared by the ranks the launcher put on this machine.
        threads = (threads / anneal_dist::ranks_on_this_node().unwrap_or(1)).max(1);
    }
    anneal_tensor::with_threads(threads, || {
        train_on_pool(config, opts, threads, Some(world))
    })?
}

/// Whether any rank of `group` asks to stop (collective, so every rank stops at the same step).
fn agree_to_stop(group: Option<&dyn anneal_dist::Communicator>, mine: bool) -> Result<bool> {
    Ok(match group {
        None => mine,
        Some(g) => {
            g.all_reduce(vec![f32::from(u8::from(mine))], anneal_dist::Reduce::Sum)?[0] > 0.0
        }
    })
}

/// Takes the run directory `out` for this process, or fails naming the process that holds it:
/// an exclusive lock on its `.lock` file, held while the returned file lives and released when
/// the process ends however it ends (the kernel drops a killed process's lock, so no stale lock
/// outlives its run).
fn lock_run_dir(out: &Path) -> Result<File> {
    let path = out.join(".lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0)?;
            write!(file, "{}", std::process::id())?;
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            bail!(
                "{} is in use by another anneal process (pid {}); wait for it to finish, or set \
                 train.out_dir to another directory",
                out.display(),
                holder.trim()
            )
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// Bytes of the tokenized corpus's splits.
fn corpus_bytes(manifest: &Manifest, train: &ShardSet, val: &ShardSet) -> f64 {
    let width = if manifest.dtype == "u16" { 2.0 } else { 4.0 };
    (train.len() + val.len()) as f64 * width
}

/// The memory estimate of what one process of a run holds: each of its ranks' share (`threads`
/// ranks of the job's `ranks` as threads of this process).
fn process_memory(
    config: &RunConfig,
    vocab_size: usize,
    corpus: f64,
    ranks: usize,
    threads: usize,
) -> Result<crate::memory::MemoryBound> {
    let layout = config.layout(ranks)?;
    Ok(crate::memory::run_estimate(config, vocab_size, corpus)?
        .per_rank(&layout)
        .times(threads.max(1)))
}

/// The memory estimate of a run of `config` as one process of `ranks` ranks (threads), from the
/// vocabulary and size of its tokenized corpus: what `anneal pretrain --estimate-memory` prints.
pub fn estimate_memory(config: &RunConfig, ranks: usize) -> Result<crate::memory::MemoryBound> {
    let (manifest, _, train, val) = open_tokenized(&config.data.dir)?;
    let corpus = corpus_bytes(&manifest, &train, &val);
    process_memory(config, manifest.vocab_size, corpus, ranks.max(1), ranks)
}

fn train_on_pool(
    config: &RunConfig,
    opts: &RunOptions,
    threads: usize,
    world: Option<Box<dyn anneal_dist::Communicator>>,
) -> Result<RunSummary> {
    let wall = Instant::now();
    let t = &config.train;
    let out = &t.out_dir;
    let ranks = world.as_ref().map_or(1, |w| w.size());
    // Rank 0 writes the run directory, the metrics and the checkpoints, and reports.
    let lead = world.as_ref().is_none_or(|w| w.rank() == 0);
    // The run's own collectives (stopping, evaluation) go on a copy of the world, which the
    // trainer's strategy takes.
    let control = match &world {
        Some(w) => Some(w.split(0, w.rank())?),
        None => None,
    };
    let control = control.as_deref();
    // The data and the memory bound are checked before the run directory is made, so a run
    // refused for them leaves nothing behind.
    let (manifest, tokenizer, train_set, val_set) = open_tokenized(&config.data.dir)?;
    let seq = config.model.block_size;
    for (name, set) in [("training", &train_set), ("validation", &val_set)] {
        if set.len() <= seq as u64 {
            bail!(
                "the {name} split of {} holds {} tokens, fewer than model.block_size + 1 = {}; \
                 use more data, a larger validation share, or a shorter block_size",
                config.data.dir.display(),
                set.len(),
                seq + 1
            );
        }
    }
    let train_tokens = train_set.len();
    let corpus = corpus_bytes(&manifest, &train_set, &val_set);
    let bound = process_memory(config, manifest.vocab_size, corpus, ranks, opts.ranks)?;
    if let Some(physical) = crate::memory::physical_memory() {
        if bound.total() > physical && !opts.force {
            bail!(
                "this run needs at least {} but the machine has {:.1} GB; shrink the model or \
                 train.batch_size, or pass --force to try anyway",
                bound.describe(),
                physical / 1e9
            );
        }
    }
    let _lock = if lead {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        Some(lock_run_dir(out)?)
    } else {
        None
    };
    let files = RunFiles::new(out);
    let source = anneal_data::WindowSource {
        set: train_set,
        seq,
    };
    let mut trainer = pretraining_on(config, manifest.vocab_size, Box::new(source), world)?;
    // Rank 0 finds, reads and checks the checkpoint; the others receive it from rank 0 (they
    // need not see the run directory).
    let resume_dir = if lead {
        match &opts.resume {
            Resume::No => None,
            Resume::Latest => checkpoint::latest(&files.checkpoints),
            Resume::From(dir) => Some(dir.clone()),
        }
    } else {
        None
    };
    let loaded = match &resume_dir {
        Some(dir) => {
            let loaded = checkpoint::load(dir)?;
            let saved = loaded.config()?;
            if let Some(difference) = config.model.difference_from(&saved.model) {
                bail!(
                    "{} cannot resume with this configuration's [model]: {difference} (a \
                     checkpoint resumes only the same model)",
                    dir.display(),
                );
            }
            if let Some(change) = config.precision_change(&saved) {
                tracing::info!(
                    "{} converts to this run's precision: {change}",
                    dir.display()
                );
            }
            if loaded.state.data.train_tokens != train_tokens {
                bail!(
                    "{} was trained on {} training tokens but {} holds {}: resume on the same tokenized corpus",
                    dir.display(),
                    loaded.state.data.train_tokens,
                    config.data.dir.display(),
                    train_tokens
                );
            }
            Some(loaded)
        }
        None => None,
    };
    if lead && loaded.is_none() {
        if matches!(opts.resume, Resume::Latest) {
            tracing::info!(
                "no checkpoint under {}; starting from scratch",
                files.checkpoints.display()
            );
        } else if let Some(existing) = checkpoint::latest(&files.checkpoints) {
            bail!(
                "{} already holds checkpoints of a run (newest: {}); pass --resume to continue \
                 it, or set train.out_dir to another directory to start a new one",
                out.display(),
                existing.display()
            );
        }
    }
    // Whether rank 0 resumes, told to every rank.
    let resumes = match control {
        Some(g) => g.broadcast(vec![f32::from(u8::from(loaded.is_some()))], 0)?[0] > 0.0,
        None => loaded.is_some(),
    };
    if resumes {
        match control {
            Some(g) => trainer.restore_shared(loaded.as_ref(), g)?,
            None => trainer.restore(loaded.as_ref().expect("rank 0 read it"))?,
        }
        drop(loaded);
        // The checkpoint's tensors, of sizes training never asks for, leave the buffer cache.
        anneal_tensor::pool::empty_cache();
        if let Some(dir) = resume_dir.as_ref().filter(|_| lead) {
            tracing::info!("resumed from {} at step {}", dir.display(), trainer.steps());
            set_aside_newer(&files, trainer.steps())?;
        }
    }
    let start_step = trainer.steps();
    // A resumed run keeps the metrics up to its checkpoint; a new one starts the file afresh.
    let mut metrics = match resume_dir {
        Some(_) if lead => read_metrics(&files.metrics, start_step),
        _ => Vec::new(),
    };
    let mut metrics_file = if lead {
        // Written beside the old file and renamed over it, so a kill now loses no line.
        let tmp = files.metrics.with_extension("jsonl.tmp");
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        for m in &metrics {
            writeln!(f, "{}", serde_json::to_string(m)?)?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, &files.metrics)
            .with_context(|| format!("replacing {}", files.metrics.display()))?;
        std::fs::write(out.join("config.toml"), config.to_toml())?;
        Some(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&files.metrics)?,
        )
    } else {
        None
    };

    let tokens_per_step = (t.batch_size * seq * t.grad_accum) as u64;
    let flops_per_token = trainer.model().flops_per_token(seq);
    // Every rank runs on `threads` threads of a machine like this one.
    let peak_gflops = crate::machine::peak_gflops(threads).0 * ranks as f64;
    let params = trainer.model().params();
    let quiet = !lead;
    if lead {
        let gpt = config.gpt_config(manifest.vocab_size)?;
        // The whole model's count, where this rank holds part of it.
        let whole: usize = match trainer.model().parallel() {
            Some(p) => params
                .infos()
                .iter()
                .map(|i| p.whole_shape(&i.name, &i.shape).iter().product::<usize>())
                .sum(),
            None => params.numel(),
        };
        let active = match &gpt.moe {
            Some(moe) => format!(
                ", {} active per token (router and {} of {} experts in {} MoE blocks)",
                whole - (gpt.non_embedding_params() - gpt.active_non_embedding_params()),
                moe.layer.top_k,
                moe.layer.experts,
                gpt.moe_blocks().len()
            ),
            None => String::new(),
        };
        let held = if whole == params.numel() {
            String::new()
        } else {
            format!("{} on this rank, ", params.numel())
        };
        tracing::info!(
        "model: {whole} parameters ({held}{} trained{active}), vocabulary {}; data: {} training and {} validation tokens; {} tokens per step, {threads} threads, {}",
        params.trainable_numel(),
        manifest.vocab_size,
        train_tokens,
        val_set.len(),
        tokens_per_step,
        trainer.strategy().describe()
    );
    }
    let progress: Arc<dyn Progress> = match &opts.progress {
        Some(p) if lead => p.clone(),
        _ => Arc::new(NoProgress),
    };
    progress.begin(t.max_steps, start_step);
    let log = |f: &mut dyn FnMut()| {
        if !quiet {
            progress.suspend(f)
        }
    };

    let eval =
        |trainer: &Trainer, metrics: &mut Vec<Metric>, file: &mut Option<File>| -> Result<f64> {
            let step = trainer.steps();
            let val_loss = trainer.evaluate_on(&val_set, t.seed, t.eval_batches, seq, control)?;
            let Some(file) = file else {
                return Ok(val_loss);
            };
            let since: Vec<f64> = metrics
                .iter()
                .rev()
                .map_while(|m| match m {
                    Metric::Step { loss, .. } => Some(*loss),
                    _ => None,
                })
                .collect();
            let train_loss =
                (!since.is_empty()).then(|| since.iter().sum::<f64>() / since.len() as f64);
            let m = Metric::Eval {
                step,
                val_loss,
                val_ppl: val_loss.exp(),
                train_loss,
            };
            writeln!(file, "{}", serde_json::to_string(&m)?)?;
            metrics.push(m);
            if let Err(e) = plot_losses(&files.plot, metrics) {
                tracing::warn!("loss curve not drawn: {e}");
            }
            if let Err(e) = plot_expert_load(&files.expert_plot, metrics) {
                tracing::warn!("expert-load chart not drawn: {e}");
            }
            log(&mut || {
                tracing::info!(
                    "step {step}: validation loss {val_loss:.4} (perplexity {:.2}){}",
                    val_loss.exp(),
                    train_loss.map_or(String::new(), |l| format!(", training loss {l:.4}"))
                )
            });
            Ok(val_loss)
        };
    // Collective: the checkpoint is written by rank 0, and every rank waits until it is in
    // place (or until rank 0's failure reaches it), so no rank runs on past a checkpoint that
    // does not exist.
    let save = |trainer: &Trainer| -> Result<Option<PathBuf>> {
        let state = TrainerState {
            format: 1,
            step: 0,
            seed: t.seed,
            data: DataPosition {
                dir: config.data.dir.clone(),
                train_tokens,
                steps_drawn: 0,
            },
            tokens_seen: 0,
            config: config.to_toml(),
            objective: String::new(),
            optimizer_layout: Vec::new(),
            tokenizer: tokenizer.to_json()?,
            vocab_size: manifest.vocab_size,
            files: Default::default(),
            loss_scale: Vec::new(),
        };
        let dir = trainer.save(&files.checkpoints, state)?;
        if let Some(dir) = &dir {
            checkpoint::prune(&files.checkpoints, t.keep_checkpoints)?;
            log(&mut || tracing::info!("checkpoint {}", dir.display()));
        }
        if let Some(g) = control {
            g.barrier()?;
        }
        Ok(dir)
    };

    let mut val_history: Vec<(u64, f64)> = metrics
        .iter()
        .filter_map(|m| match m {
            Metric::Eval { step, val_loss, .. } => Some((*step, *val_loss)),
            _ => None,
        })
        .collect();
    if start_step == 0 {
        let v = eval(&trainer, &mut metrics, &mut metrics_file)?;
        val_history.push((0, v));
    }
    let mut step_seconds = 0.0;
    let mut exposed_comm = 0.0;
    let mut window = (Instant::now(), 0u64);
    let mut last_checkpoint = None;
    let mut interrupted = false;
    while trainer.steps() < t.max_steps {
        let began = Instant::now();
        let lr = trainer.lr();
        let s = match trainer.step() {
            Ok(s) => s,
            Err(e)
                if e.downcast_ref::<crate::trainer::LossScaleDiverged>()
                    .is_some() =>
            {
                // A diverged f16 run stops with a checkpoint of where it was, not spinning.
                let dir = save(&trainer)?;
                let at = dir.map_or(String::new(), |d| format!("; checkpoint {}", d.display()));
                return Err(e.context(format!("the run stopped at step {}{at}", trainer.steps())));
            }
            Err(e) => return Err(e),
        };
        let step = trainer.steps();
        step_seconds += began.elapsed().as_secs_f64();
        exposed_comm += s.exposed_comm;
        window.1 += 1;
        let dt = window.0.elapsed().as_secs_f64();
        let tokens_per_s = (window.1 * tokens_per_step) as f64 / dt.max(1e-9);
        let mfu = tokens_per_s * flops_per_token / (peak_gflops * 1e9);
        if dt > 2.0 {
            window = (Instant::now(), 0);
        }
        let moe = MoeMetrics::from_named(&s.metrics);
        let named = |name: &str| s.metrics.iter().find(|(n, _)| n == name).map(|m| m.1);
        // The objective's loss: the MoE losses are logged on their own.
        let objective_loss = s.loss - moe.as_ref().map_or(0.0, |m| m.aux_loss + m.z_loss);
        let m = Metric::Step {
            step,
            loss: objective_loss,
            lr,
            grad_norm: s.grad_norm,
            tokens_per_s,
            mfu,
            moe,
            loss_scale: named("loss_scale"),
            skipped_steps: named("skipped_steps").map(|n| n as u64),
        };
        if let Some(f) = &mut metrics_file {
            writeln!(f, "{}", serde_json::to_string(&m)?)?;
            metrics.push(m);
        }
        progress.advance(
            step,
            &format!(
                "loss {:.4} lr {lr:.2e} {:.1}k tok/s MFU {:.0}%",
                objective_loss,
                tokens_per_s / 1e3,
                100.0 * mfu
            ),
        );
        let last = step == t.max_steps;
        if (t.eval_interval > 0 && step % t.eval_interval == 0) || last {
            let v = eval(&trainer, &mut metrics, &mut metrics_file)?;
            val_history.push((step, v));
        }
        let stop = agree_to_stop(control, opts.stop.load(Ordering::SeqCst))?;
        if (t.checkpoint_interval > 0 && step % t.checkpoint_interval == 0) || last || stop {
            last_checkpoint = save(&trainer)?;
        }
        if stop && !last {
            interrupted = true;
            log(&mut || tracing::warn!("interrupted at step {step}; resume with --resume"));
            break;
        }
    }
    progress.finish();
    let steps_run = trainer.steps() - start_step;
    let ms_per_step = 1e3 * step_seconds / steps_run.max(1) as f64;
    let tokens_per_second = tokens_per_step as f64 * steps_run as f64 / step_seconds.max(1e-9);
    let summary = RunSummary {
        start_step,
        steps: trainer.steps(),
        interrupted,
        val_loss: val_history.last().map(|v| v.1),
        val_history,
        wall_seconds: wall.elapsed().as_secs_f64(),
        ms_per_step,
        exposed_comm_ms_per_step: 1e3 * exposed_comm / steps_run.max(1) as f64,
        tokens_per_second,
        mfu: tokens_per_second * flops_per_token / (peak_gflops * 1e9),
        checkpoint: last_checkpoint,
        peak_rss_mb: crate::machine::peak_rss_mb(),
        estimated_peak_mb: bound.peak() / crate::memory::MB,
        peak_tensor_mb: (anneal_tensor::memory_stats().peak_bytes
            + trainer.optimizer().state_bytes()) as f64
            / 1e6,
    };
    if lead {
        // What the run did, for scripts and experiments that compare runs; the run itself is
        // done and checkpointed either way.
        let path = config.train.out_dir.join("summary.json");
        let written = serde_json::to_string_pretty(&summary)
            .map_err(anyhow::Error::from)
            .and_then(|text| crate::checkpoint::write_atomic(&path, text.as_bytes()));
        if let Err(e) = written {
            tracing::warn!("{} not written: {e:#}", path.display());
        }
    }
    Ok(summary)
}
