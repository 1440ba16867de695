//! The run configuration: three TOML sections, `[data]`, `[model]` and `[train]`, every key with
//! a default, every key overridable from the command line as `section.key=value`.
//!
//! Loading goes default → file → overrides through `anneal-config`, each key checked against the
//! defaults: an unknown key is named with the keys its section allows, a value of the wrong type
//! is named with the type expected, and [`RunConfig::validate`] names values out of range with
//! the allowed range.

use anneal_tensor::optim::{AdamWConfig, MomentDType};
use anneal_tensor::DType;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where the tokenized corpus lives.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A directory written by `anneal data tokenize` (manifest.json, tokenizer.json, shards).
    pub dir: PathBuf,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dir: PathBuf::from("data/shakespeare-char"),
        }
    }
}

/// The GPT's shape. The vocabulary size comes from the tokenized corpus.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Transformer blocks.
    pub n_layer: usize,
    /// Attention heads (must divide `n_embd`).
    pub n_head: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Context length in tokens.
    pub block_size: usize,
    /// Dropout probability while training.
    pub dropout: f32,
    /// Biases in linear layers and LayerNorms.
    pub bias: bool,
    /// Output head shares the token embedding.
    pub tie_embeddings: bool,
    /// Parameter and activation storage: `f32`, `bf16` or `f16` (with dynamic loss scaling).
    pub dtype: String,
    /// Recompute each block in backward instead of storing its activations: the older spelling
    /// of `recompute = "full"`.
    pub checkpoint_blocks: bool,
    /// What backward recomputes instead of keeping from forward, per block: "none" (keep the
    /// attention probabilities too), "selective" (recompute the attention scores from a
    /// log-sum-exp per row, as FlashAttention does; the default) or "full" (recompute each block
    /// from its input).
    #[serde(default = "default_recompute")]
    pub recompute: String,
    /// Mixture-of-Experts blocks (`[model.moe]`; absent: a dense model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe: Option<MoeSection>,
}

/// `[model.moe]`: Mixture-of-Experts feed-forward layers in place of some dense ones.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeSection {
    /// Experts per MoE layer.
    pub experts: usize,
    /// Experts each token goes to (1: Switch routing; k ≥ 2 renormalises the gates).
    pub top_k: usize,
    /// Capacity factor while training: each expert takes ⌈factor · top_k · tokens / experts⌉
    /// assignments, the rest pass on the residual path; `"none"` routes dropless.
    pub capacity_factor: String,
    /// Capacity factor in evaluation and generation, or `"none"`.
    pub eval_capacity_factor: String,
    /// Every n-th block is MoE (1: all; 2: every other one, blocks 1, 3, …).
    pub every: usize,
    /// Hidden width of each expert; 0 takes the dense network's 4 · n_embd.
    pub d_ff: usize,
    /// Weight α of the load-balancing loss α · E · Σ fᵢ · Pᵢ.
    pub aux_loss: f64,
    /// Weight β of the router z-loss β · mean(logsumexp(logits)²).
    pub z_loss: f64,
    /// Router input noise: each element times Uniform(1 − ε, 1 + ε) while training; 0 is off.
    pub jitter: f64,
}

impl Default for MoeSection {
    fn default() -> Self {
        let c = anneal_nn::layers::MoeConfig::switch(8);
        let factor = |f: Option<f64>| f.map_or("none".to_string(), |f| f.to_string());
        MoeSection {
            experts: c.experts,
            top_k: c.top_k,
            capacity_factor: factor(c.capacity_factor),
            eval_capacity_factor: factor(c.eval_capacity_factor),
            every: 2,
            d_ff: 0,
            aux_loss: widen(c.aux_loss),
            z_loss: widen(c.z_loss),
            jitter: widen(c.jitter),
        }
    }
}

impl MoeSection {
    /// A capacity factor as written: a positive number, or `"none"` (dropless).
    fn factor(key: &str, text: &str) -> Result<Option<f64>> {
        let t = text.trim();
        if t.eq_ignore_ascii_case("none") {
            return Ok(None);
        }
        match t.parse::<f64>() {
            Ok(f) if f > 0.0 && f.is_finite() => Ok(Some(f)),
            _ => bail!(
                "config key model.moe.{key} = {text:?} is not allowed: a positive number, or \
                 \"none\" (dropless)"
            ),
        }
    }

    /// The layer settings and the block placement, checked; errors name the key.
    pub fn resolve(&self, n_layer: usize, n_embd: usize) -> Result<anneal_nn::GptMoe> {
        let layer = anneal_nn::layers::MoeConfig {
            experts: self.experts,
            top_k: self.top_k,
            capacity_factor: MoeSection::factor("capacity_factor", &self.capacity_factor)?,
            eval_capacity_factor: MoeSection::factor(
                "eval_capacity_factor",
                &self.eval_capacity_factor,
            )?,
            aux_loss: self.aux_loss as f32,
            z_loss: self.z_loss as f32,
            jitter: self.jitter as f32,
        };
        if let Err(e) = layer.validate("model.moe") {
            match e {
                anneal_tensor::Error::Invalid { reason, .. } => bail!("config key {reason}"),
                other => return Err(other.into()),
            }
        }
        check_key(
            self.every >= 1 && self.every <= n_layer,
            "model.moe.every",
            self.every.to_string(),
            &format!("between 1 and model.n_layer ({n_layer})"),
        )?;
        Ok(anneal_nn::GptMoe {
            layer,
            every: self.every,
            d_ff: if self.d_ff == 0 {
                4 * n_embd
            } else {
                self.d_ff
            },
        })
    }
}

impl ModelConfig {
    /// How a checkpoint's `[model]` (`saved`) differs from this one, naming the first key that
    /// differs, or `None` when they are the same model. The storage dtype is not part of the
    /// model (a checkpoint converts between precisions, [`RunConfig::precision_change`]), nor
    /// is what backward recomputes.
    pub fn difference_from(&self, saved: &ModelConfig) -> Option<String> {
        let saved = &ModelConfig {
            dtype: self.dtype.clone(),
            checkpoint_blocks: self.checkpoint_blocks,
            recompute: self.recompute.clone(),
            ..saved.clone()
        };
        if self == saved {
            return None;
        }
        match (&saved.moe, &self.moe) {
            (Some(m), None) => {
                return Some(format!(
                    "it holds a Mixture-of-Experts model ([model.moe] experts = {}, top_k = {}, \
                     every = {}) and this configuration has no [model.moe] section; add the \
                     checkpoint's [model.moe] (its config.toml has it) or start a new run",
                    m.experts, m.top_k, m.every
                ))
            }
            (None, Some(_)) => {
                return Some(
                    "it holds a dense model and this configuration has a [model.moe] section \
                     (a Mixture-of-Experts model); remove model.moe or start a new run"
                        .into(),
                )
            }
            _ => {}
        }
        let differ = || Some("the [model] sections differ".to_string());
        let (Ok(a), Ok(b)) = (toml::Table::try_from(saved), toml::Table::try_from(self)) else {
            return differ();
        };
        let mut keys = Vec::new();
        flat_keys("model", &a, &mut keys);
        flat_keys("model", &b, &mut keys);
        let lookup = |t: &toml::Table, key: &str| -> Option<toml::Value> {
            let mut v = toml::Value::Table(t.clone());
            for part in key.split('.').skip(1) {
                v = v.as_table()?.get(part)?.clone();
            }
            Some(v)
        };
        keys.into_iter()
            .find_map(|key| {
                let (x, y) = (lookup(&a, &key), lookup(&b, &key));
                (x != y).then(|| {
                    let show =
                        |v: Option<toml::Value>| v.map_or("nothing".into(), |v| v.to_string());
                    format!("{key} = {} in the checkpoint but {} here", show(x), show(y))
                })
            })
            .or_else(differ)
    }
}

/// Every leaf key of `table`, dotted under `prefix`.
fn flat_keys(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
    for (k, v) in table {
        let key = format!("{prefix}.{k}");
        match v {
            toml::Value::Table(t) => flat_keys(&key, t, out),
            _ => out.push(key),
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            n_layer: 4,
            n_head: 4,
            n_embd: 128,
            block_size: 64,
            dropout: 0.0,
            bias: false,
            tie_embeddings: true,
            dtype: "f32".into(),
            checkpoint_blocks: false,
            recompute: default_recompute(),
            moe: None,
        }
    }
}

/// The optimisation and the run's bookkeeping.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    pub grad_accum: usize,
    /// Optimizer steps.
    pub max_steps: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay.
    pub min_lr: f64,
    /// Steps of linear warm-up.
    pub warmup_steps: u64,
    /// Steps until the decay reaches `min_lr`; 0 means `max_steps`.
    pub decay_steps: u64,
    /// AdamW β₁.
    pub beta1: f64,
    /// AdamW β₂.
    pub beta2: f64,
    /// Decoupled weight decay (not applied to norms, biases and embeddings).
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 turns clipping off.
    pub grad_clip: f64,
    /// Steps between validation passes; 0 validates only at the end.
    pub eval_interval: u64,
    /// Batches per validation pass.
    pub eval_batches: usize,
    /// Steps between checkpoints; 0 checkpoints only at the end.
    pub checkpoint_interval: u64,
    /// Checkpoints kept (older ones are deleted).
    pub keep_checkpoints: usize,
    /// Seed of initialisation, batch sampling and dropout.
    pub seed: u64,
    /// Kernel threads; 0 uses every core.
    pub threads: usize,
    /// Where checkpoints, metrics, the loss curve and logs go.
    pub out_dir: PathBuf,
    /// How AdamW keeps its two moments: "f32", "bf16" (stochastic rounding, 2 bytes each) or
    /// "8bit" (block-wise dynamic quantisation, about 1 byte each).
    #[serde(default = "default_moments")]
    pub moments: String,
    /// Whether a bf16 model keeps an f32 master copy of its weights (2 more bytes per
    /// parameter); without one every update is rounded into the bf16 weights stochastically.
    #[serde(default = "default_master_weights")]
    pub master_weights: bool,
    /// What the gradient buffer keeps between backward and the optimizer step: "f32", or
    /// "bf16" (2 bytes per parameter instead of 4; each gradient is computed in f32 and rounded
    /// to nearest as it accumulates). One device only.
    #[serde(default = "default_grads")]
    pub grads: String,
}

/// The gradient storage kinds (`train.grads`).
pub const GRADS: [&str; 2] = ["f32", "bf16"];

fn default_grads() -> String {
    "f32".into()
}

/// The recomputation policies (`model.recompute`): keep everything, recompute the attention
/// scores, recompute whole blocks.
pub const RECOMPUTE: [&str; 3] = ["none", "selective", "full"];

fn default_recompute() -> String {
    "selective".into()
}

fn default_moments() -> String {
    "f32".into()
}

fn default_master_weights() -> bool {
    true
}

/// The optimizer defaults every command takes ([`AdamWConfig::default`], written once).
const OPTIMIZER: AdamWConfig = AdamWConfig::DEFAULT;

/// The f64 a person would write for an f32 (0.99, not 0.9900000095367432).
fn widen(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            batch_size: 12,
            grad_accum: 1,
            max_steps: 2000,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 100,
            decay_steps: 0,
            beta1: widen(OPTIMIZER.beta1),
            beta2: widen(OPTIMIZER.beta2),
            weight_decay: widen(OPTIMIZER.weight_decay),
            grad_clip: 1.0,
            eval_interval: 250,
            eval_batches: 20,
            checkpoint_interval: 500,
            keep_checkpoints: 3,
            seed: 1337,
            threads: 0,
            out_dir: PathBuf::from("runs/shakespeare-char"),
            moments: default_moments(),
            master_weights: default_master_weights(),
            grads: default_grads(),
        }
    }
}

/// How a run is laid out over ranks (`[parallel]`): the data-parallel and sharding axes of
/// PaddlePaddle's hybrid parallelism. The ranks come from the launch (`anneal pretrain --ranks N`
/// on one machine, or `mpirun -np N`), and must equal `dp × sharding`; each rank runs
/// `batch_size / ranks` rows of every micro-batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelConfig {
    /// Data-parallel replicas; 0 takes every rank `sharding` and `tp` leave.
    pub dp: usize,
    /// Tensor-parallel ranks that split every layer between them (Megatron-LM's: heads, MLP
    /// hidden units and the vocabulary); 1 is none. Neighbouring ranks form a group.
    pub tp: usize,
    /// Sequence parallelism beside tensor parallelism (Korthikanti et al. 2022): the residual
    /// stream, norms and dropout split by tokens over the tensor-parallel group.
    pub sequence_parallel: bool,
    /// Pipeline stages the model's layers are cut into (GPipe, Huang et al. 2019; 1F1B,
    /// Narayanan et al. 2021); 1 is none. The first stage holds the embedding, the last the head.
    pub pp: usize,
    /// Blocks of each pipeline stage, in order (uneven stages allowed; the first and last may
    /// hold none beside the embedding and the head); empty cuts the blocks evenly, earlier
    /// stages taking the remainder.
    pub pp_blocks: Vec<usize>,
    /// Pipeline schedule: `1f1b` (one forward, one backward: at most `pp` micro-batches of
    /// activations in flight) or `gpipe` (every forward, then every backward).
    pub schedule: String,
    /// Pipeline micro-batches each of the step's batches (`train.grad_accum` of them) is cut
    /// into; 1F1B needs at least `pp` in a step.
    pub micro_batches: usize,
    /// Expert-parallel ranks: each Mixture-of-Experts layer's experts split over groups of `ep`
    /// neighbouring data ranks, tokens exchanged by all-to-all (GShard); 1 is none.
    pub ep: usize,
    /// Ranks in each ZeRO sharding group; 0 means every rank when `zero` is 1 or 2, else 1.
    pub sharding: usize,
    /// ZeRO stage inside each sharding group: 0 (none: plain data parallelism), 1 (optimizer
    /// state sharded), 2 (gradients too) or 3 (parameters too, gathered per layer).
    pub zero: u8,
    /// Size of the gradient buckets data parallelism reduces, in MB (PyTorch DDP's 25).
    pub bucket_mb: f64,
    /// How gradients travel between ranks: `f32`, or `bf16` (half the bytes, bf16's precision).
    pub grad_dtype: String,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig {
            dp: 0,
            tp: 1,
            sequence_parallel: false,
            pp: 1,
            pp_blocks: Vec::new(),
            schedule: "1f1b".into(),
            micro_batches: 1,
            ep: 1,
            sharding: 0,
            zero: 0,
            bucket_mb: 25.0,
            grad_dtype: "f32".into(),
        }
    }
}

/// A layout resolved against the job's ranks: `dp × sharding × tp × pp = ranks`, ordered as
/// Megatron-LM orders them, tensor parallelism fastest: rank r is tensor-parallel rank `r % tp`
/// of data rank `r / tp % (dp·sharding)` in pipeline stage `r / (tp·dp·sharding)` (a
/// tensor-parallel group is `tp` neighbouring ranks), and data rank d is shard `d % sharding` of
/// replica `d / sharding`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Data-parallel replicas.
    pub dp: usize,
    /// Tensor-parallel ranks per group.
    pub tp: usize,
    /// Sequence parallelism beside tensor parallelism.
    pub sequence_parallel: bool,
    /// Pipeline stages.
    pub pp: usize,
    /// Pipeline micro-batches per batch of the step.
    pub micro_batches: usize,
    /// 1F1B (else GPipe).
    pub one_f_one_b: bool,
    /// Expert-parallel ranks per group (dividing the data ranks).
    pub ep: usize,
    /// Ranks in each sharding group.
    pub sharding: usize,
    /// ZeRO stage (0, 1, 2, 3).
    pub zero: u8,
    /// Bytes per gradient bucket.
    pub bucket_bytes: usize,
    /// Gradients travel as bf16.
    pub bf16_gradients: bool,
}

impl Layout {
    /// Every rank of the job.
    pub fn ranks(&self) -> usize {
        self.data_ranks() * self.tp * self.pp
    }

    /// The ranks of one model replica: `tp × pp`.
    pub fn model_ranks(&self) -> usize {
        self.tp * self.pp
    }

    /// The ranks that run different rows of the batch: `dp × sharding`.
    pub fn data_ranks(&self) -> usize {
        self.dp * self.sharding
    }
}

/// Fails unless `ok`, naming the config key, its value and what is allowed (every config's
/// `validate` reports a bad value this way).
pub fn check_key(ok: bool, key: &str, value: String, allowed: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        bail!("config key {key} = {value} is not allowed: {allowed}")
    }
}

/// A whole run configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The corpus.
    #[serde(default)]
    pub data: DataConfig,
    /// The model.
    #[serde(default)]
    pub model: ModelConfig,
    /// The optimisation.
    #[serde(default)]
    pub train: TrainConfig,
    /// The layout over ranks.
    #[serde(default)]
    pub parallel: ParallelConfig,
}

impl RunConfig {
    /// Defaults, then the TOML file at `path` (if any), then each `section.key=value` override,
    /// through anneal's one loader ([`anneal_config::Loader`]); then [`RunConfig::validate`].
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<RunConfig> {
        let config: RunConfig = RunConfig::loader().load(path, overrides)?;
        config.validate()?;
        Ok(config)
    }

    /// As [`RunConfig::load`] with the file's text given (a recipe built into the binary);
    /// errors name it as `name`.
    pub fn load_text(text: &str, name: &str, overrides: &[String]) -> Result<RunConfig> {
        let config: RunConfig =
            RunConfig::loader().load_text(Some((text, Path::new(name))), overrides)?;
        config.validate()?;
        Ok(config)
    }

    /// The loader of run configurations: every key of the defaults, and the optional
    /// `[model.moe]` section, which a file or `--set model.moe.experts=8` switches on.
    fn loader() -> anneal_config::Loader {
        let mut example = RunConfig::default();
        example.model.moe = Some(MoeSection::default());
        anneal_config::Loader::new(&RunConfig::default()).allow(&example)
    }

    /// Checks every value's range; the error names the key, the value and what is allowed.
    pub fn validate(&self) -> Result<()> {
        let m = &self.model;
        let t = &self.train;
        let check = check_key;
        check(
            m.n_layer >= 1,
            "model.n_layer",
            m.n_layer.to_string(),
            "at least 1",
        )?;
        check(
            m.n_head >= 1,
            "model.n_head",
            m.n_head.to_string(),
            "at least 1",
        )?;
        check(
            m.n_embd >= 1 && m.n_embd.is_multiple_of(m.n_head.max(1)),
            "model.n_embd",
            m.n_embd.to_string(),
            &format!("a positive multiple of model.n_head ({})", m.n_head),
        )?;
        check(
            m.block_size >= 2,
            "model.block_size",
            m.block_size.to_string(),
            "at least 2",
        )?;
        check(
            (0.0..1.0).contains(&m.dropout),
            "model.dropout",
            m.dropout.to_string(),
            "a probability in [0, 1)",
        )?;
        self.dtype()?;
        self.recompute()?;
        if let Some(moe) = &m.moe {
            moe.resolve(m.n_layer, m.n_embd)?;
        }
        check(
            t.batch_size >= 1,
            "train.batch_size",
            t.batch_size.to_string(),
            "at least 1",
        )?;
        check(
            t.grad_accum >= 1,
            "train.grad_accum",
            t.grad_accum.to_string(),
            "at least 1",
        )?;
        check(
            t.max_steps >= 1,
            "train.max_steps",
            t.max_steps.to_string(),
            "at least 1",
        )?;
        check(
            t.lr > 0.0 && t.lr.is_finite(),
            "train.lr",
            t.lr.to_string(),
            "a positive number",
        )?;
        check(
            t.min_lr >= 0.0 && t.min_lr <= t.lr,
            "train.min_lr",
            t.min_lr.to_string(),
            &format!("between 0 and train.lr ({})", t.lr),
        )?;
        for (key, v) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            check(
                (0.0..1.0).contains(&v),
                key,
                v.to_string(),
                "a number in [0, 1)",
            )?;
        }
        self.adamw()?;
        self.grad_dtype()?;
        check(
            t.weight_decay >= 0.0,
            "train.weight_decay",
            t.weight_decay.to_string(),
            "zero or positive",
        )?;
        check(
            t.grad_clip >= 0.0,
            "train.grad_clip",
            t.grad_clip.to_string(),
            "zero (off) or positive",
        )?;
        check(
            t.eval_batches >= 1,
            "train.eval_batches",
            t.eval_batches.to_string(),
            "at least 1",
        )?;
        check(
            t.keep_checkpoints >= 1,
            "train.keep_checkpoints",
            t.keep_checkpoints.to_string(),
            "at least 1",
        )?;
        check(
            t.threads <= crate::machine::MAX_THREADS,
            "train.threads",
            t.threads.to_string(),
            &format!("0 (every core) to {}", crate::machine::MAX_THREADS),
        )?;
        let p = &self.parallel;
        check(
            p.tp >= 1,
            "parallel.tp",
            p.tp.to_string(),
            "1 (no tensor parallelism) or more ranks per tensor-parallel group",
        )?;
        check(
            p.pp >= 1,
            "parallel.pp",
            p.pp.to_string(),
            "1 (no pipeline) or more stages",
        )?;
        check(
            ["1f1b", "gpipe"].contains(&p.schedule.as_str()),
            "parallel.schedule",
            format!("{:?}", p.schedule),
            "\"1f1b\" or \"gpipe\"",
        )?;
        check(
            p.micro_batches >= 1,
            "parallel.micro_batches",
            p.micro_batches.to_string(),
            "1 or more pipeline micro-batches per batch",
        )?;
        check(
            p.ep >= 1,
            "parallel.ep",
            p.ep.to_string(),
            "1 (no expert parallelism) or more ranks per expert-parallel group",
        )?;
        check(
            p.zero <= 3,
            "parallel.zero",
            p.zero.to_string(),
            "0 (none), 1 (optimizer state sharded), 2 (gradients too) or 3 (parameters too)",
        )?;
        check(
            ["f32", "bf16"].contains(&p.grad_dtype.as_str()),
            "parallel.grad_dtype",
            format!("{:?}", p.grad_dtype),
            "\"f32\" or \"bf16\"",
        )?;
        check(
            p.bucket_mb > 0.0 && p.bucket_mb.is_finite(),
            "parallel.bucket_mb",
            p.bucket_mb.to_string(),
            "a positive size in MB",
        )?;
        check(
            !t.out_dir.as_os_str().is_empty(),
            "train.out_dir",
            "\"\"".into(),
            "a directory (an empty path would write into the current one)",
        )?;
        Ok(())
    }

    /// The layout of a job of `ranks` ranks: `[parallel]` with its automatic values filled in.
    /// Refused, naming the keys and what would fit, when the layout cannot run: ranks that are not
    /// `dp × sharding`, a sharding group without ZeRO, a batch that does not split into equal
    /// shares, ZeRO on a bf16 model.
    pub fn layout(&self, ranks: usize) -> Result<Layout> {
        let p = &self.parallel;
        let job = ranks.max(1);
        let (tp, pp) = (p.tp, p.pp);
        if !job.is_multiple_of(tp * pp) {
            bail!(
                "parallel.tp = {tp} × parallel.pp = {pp} does not divide the job's {job} rank(s); \
                 choose values whose product divides {job}"
            );
        }
        if tp > 1 {
            self.check_tensor_parallel(tp)?;
        }
        if pp > 1 {
            self.stage_blocks(pp)?;
            self.check_pipeline(pp)?;
        }
        let ranks = job / (tp * pp);
        let sharding = match (p.sharding, p.dp) {
            (0, 0) if p.zero > 0 => ranks,
            (0, 0) => 1,
            (0, dp) if ranks.is_multiple_of(dp) => ranks / dp,
            (s, _) => s,
        };
        let dp = if p.dp == 0 && ranks.is_multiple_of(sharding) {
            ranks / sharding
        } else {
            p.dp
        };
        if dp.checked_mul(sharding) != Some(ranks) {
            let of = if tp * pp > 1 {
                format!(
                    "{ranks} data ranks (the job's {job} over parallel.tp = {tp} × parallel.pp = \
                     {pp})"
                )
            } else {
                format!("{ranks} rank(s)")
            };
            bail!(
                "parallel.dp = {} × parallel.sharding = {} does not match the job's {of}; choose \
                 values whose product is {ranks} (0 fills one in)",
                p.dp,
                p.sharding
            );
        }
        if sharding > 1 && p.zero == 0 {
            let why = if p.sharding == 0 {
                format!("parallel.dp = {dp} of {ranks} ranks leaves sharding groups of {sharding}")
            } else {
                format!("parallel.sharding = {sharding}")
            };
            bail!(
                "{why}, which needs parallel.zero = 1, 2 or 3 (a sharding group shares the optimizer \
                 state); set parallel.zero, or parallel.dp = {ranks} for plain data parallelism"
            );
        }
        if p.zero == 3 && tp > 1 && (dp > 1 || p.ep > 1) {
            bail!(
                "parallel.zero = 3 with parallel.tp = {tp} shards over every data rank for now: \
                 parallel.dp = {dp} and parallel.ep = {} are not supported beside it; use \
                 parallel.dp = 1 and parallel.ep = 1",
                p.ep
            );
        }
        if p.zero > 0 && sharding == 1 && ranks > 1 {
            bail!(
                "parallel.zero = {} over sharding groups of 1 rank shards nothing; set \
                 parallel.sharding (the ranks of each ZeRO group, dividing {ranks}) or \
                 parallel.zero = 0",
                p.zero
            );
        }
        if self.dtype()? == DType::F16 && (pp > 1 || tp > 1 || p.ep > 1) {
            bail!(
                "model.dtype = \"f16\" (with dynamic loss scaling) trains on one device or data \
                 parallel for now, not split by parallel.tp = {tp}, parallel.pp = {pp} or \
                 parallel.ep = {}; use model.dtype = \"bf16\", which needs no loss scale",
                p.ep
            );
        }
        if ranks > 1 && self.grad_dtype()? != DType::F32 {
            bail!(
                "train.grads = \"bf16\" keeps gradients in 16 bits on one device; over {ranks} \
                 ranks they are reduced in f32 (parallel.grad_dtype = \"bf16\" sends them in 16 \
                 bits); use train.grads = \"f32\""
            );
        }
        if p.zero > 0 && ranks > 1 && self.dtype()? != DType::F32 {
            bail!(
                "parallel.zero = {} needs model.dtype = \"f32\" for now (a bf16 model's master \
                 copy is not sharded yet); use parallel.zero = 0",
                p.zero
            );
        }
        let b = self.train.batch_size;
        if !b.is_multiple_of(ranks) {
            let who = if tp * pp > 1 { "data ranks" } else { "ranks" };
            bail!(
                "train.batch_size = {b} does not split into equal shares over {ranks} {who}; use \
                 a multiple of {ranks}"
            );
        }
        if p.ep > 1 {
            self.check_expert_parallel(p.ep, ranks, dp, sharding)?;
            let experts = self.model.moe.as_ref().map_or(0, |m| m.experts);
            if !experts.is_multiple_of(p.ep * tp) {
                bail!(
                    "parallel.ep = {} × parallel.tp = {tp} does not divide model.moe.experts = \
                     {experts}: the experts split over both; choose values whose product divides \
                     {experts}",
                    p.ep
                );
            }
            if tp * pp > 1 && p.zero > 1 {
                bail!(
                    "parallel.ep = {} with parallel.zero = {} beside tensor or pipeline \
                     parallelism (parallel.tp = {tp}, parallel.pp = {pp}) is not supported yet; \
                     use parallel.zero = 0 or 1",
                    p.ep,
                    p.zero
                );
            }
        }
        let share = b / ranks;
        if pp == 1 && p.micro_batches > 1 {
            bail!(
                "parallel.micro_batches = {} cuts batches for a pipeline, and parallel.pp = 1; \
                 use train.grad_accum to accumulate micro-batches without one",
                p.micro_batches
            );
        }
        if !share.is_multiple_of(p.micro_batches) {
            bail!(
                "parallel.micro_batches = {} does not cut each data rank's {share} rows \
                 (train.batch_size = {b} over {ranks}) into equal micro-batches; use a divisor of \
                 {share}",
                p.micro_batches
            );
        }
        if p.sequence_parallel {
            let tokens = share / p.micro_batches * self.model.block_size;
            if tp == 1 || !tokens.is_multiple_of(tp) {
                bail!(
                    "parallel.sequence_parallel = true splits the {tokens} tokens of each \
                     micro-batch over the tensor-parallel group: it needs parallel.tp > 1 \
                     dividing them (parallel.tp = {tp})"
                );
            }
        }
        Ok(Layout {
            dp,
            tp,
            sequence_parallel: p.sequence_parallel,
            pp,
            micro_batches: p.micro_batches,
            one_f_one_b: p.schedule == "1f1b",
            ep: p.ep,
            sharding,
            zero: p.zero,
            bucket_bytes: (p.bucket_mb * 1e6) as usize,
            bf16_gradients: p.grad_dtype == "bf16",
        })
    }

    /// The run's AdamW settings: `[train]`'s β₁, β₂, weight decay, moment storage and master
    /// copy over anneal's defaults.
    pub fn adamw(&self) -> Result<AdamWConfig> {
        let t = &self.train;
        let Some(moments) = MomentDType::parse(&t.moments) else {
            let names: Vec<&str> = MomentDType::NAMES.iter().map(|(n, _)| *n).collect();
            bail!(
                "config key train.moments = {:?} is not allowed: {}",
                t.moments,
                names.join(", ")
            );
        };
        Ok(AdamWConfig {
            beta1: t.beta1 as f32,
            beta2: t.beta2 as f32,
            weight_decay: t.weight_decay as f32,
            moments,
            master_weights: t.master_weights,
            ..AdamWConfig::default()
        })
    }

    /// How resuming a checkpoint written under `saved` converts its precision to this run's:
    /// one line per change of model dtype, moment storage or master copy, or `None` when both
    /// keep the same. Every change converts: 16-bit weights resume in f32 from their master
    /// copy, f32 weights are rounded into 16 bits with the f32 values as the master copy,
    /// moments are rounded or quantised into the new storage.
    pub fn precision_change(&self, saved: &RunConfig) -> Option<String> {
        let mut lines = Vec::new();
        let (a, b) = (&saved.model.dtype, &self.model.dtype);
        if a != b {
            let how = if b == "f32" {
                "the weights are read from the checkpoint's f32 master copy"
            } else if a == "f32" {
                "the weights are rounded, their f32 values kept as the master copy"
            } else {
                "the weights are rounded from the checkpoint's f32 master copy"
            };
            lines.push(format!("model.dtype {a} → {b}: {how}"));
        }
        let (a, b) = (&saved.train.moments, &self.train.moments);
        if a != b {
            lines.push(format!(
                "train.moments {a} → {b}: the AdamW moments are {}",
                if b == "f32" {
                    "widened exactly"
                } else if b == "8bit" {
                    "quantised in blocks of 2,048"
                } else {
                    "rounded to nearest"
                }
            ));
        }
        let (a, b) = (saved.train.master_weights, self.train.master_weights);
        if a != b && self.model.dtype == "bf16" {
            lines.push(format!(
                "train.master_weights {a} → {b}: {}",
                if b {
                    "the master copy starts from the bf16 weights"
                } else {
                    "the master copy is rounded into the bf16 weights and dropped"
                }
            ));
        }
        (!lines.is_empty()).then(|| lines.join("; "))
    }

    /// The dtype of the gradient buffer, `train.grads`.
    pub fn grad_dtype(&self) -> Result<DType> {
        match self.train.grads.as_str() {
            "f32" => Ok(DType::F32),
            "bf16" => Ok(DType::BF16),
            other => bail!(
                "config key train.grads = {other:?} is not allowed: {}",
                GRADS.join(", ")
            ),
        }
    }

    /// The recomputation policy, `model.recompute` with `model.checkpoint_blocks = true` read
    /// as "full".
    pub fn recompute(&self) -> Result<&'static str> {
        let m = &self.model;
        let policy = RECOMPUTE
            .into_iter()
            .find(|p| *p == m.recompute)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "config key model.recompute = {:?} is not allowed: none, selective or full",
                    m.recompute
                )
            })?;
        match (m.checkpoint_blocks, policy) {
            (false, p) => Ok(p),
            (true, "none") => bail!(
                "model.checkpoint_blocks = true recomputes every block, and model.recompute = \
                 \"none\" recomputes nothing; set model.recompute = \"full\" alone"
            ),
            (true, _) => Ok("full"),
        }
    }

    /// The model's storage dtype.
    pub fn dtype(&self) -> Result<DType> {
        match self.model.dtype.as_str() {
            "f32" => Ok(DType::F32),
            "bf16" => Ok(DType::BF16),
            "f16" => Ok(DType::F16),
            other => bail!("config key model.dtype = {other:?} is not allowed: f32, bf16 or f16"),
        }
    }

    /// The configuration as TOML text (written beside every run and into checkpoints).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("configs serialise")
    }

    /// The GPT this configuration describes, for a vocabulary of `vocab_size` tokens.
    pub fn gpt_config(&self, vocab_size: usize) -> Result<anneal_nn::GptConfig> {
        let m = &self.model;
        Ok(anneal_nn::GptConfig {
            vocab_size,
            block_size: m.block_size,
            n_layer: m.n_layer,
            n_head: m.n_head,
            n_embd: m.n_embd,
            dropout: m.dropout,
            bias: m.bias,
            tie_embeddings: m.tie_embeddings,
            dtype: self.dtype()?,
            checkpoint_blocks: self.recompute()? == "full",
            save_attention_probs: self.recompute()? == "none",
            moe: m
                .moe
                .as_ref()
                .map(|moe| moe.resolve(m.n_layer, m.n_embd))
                .transpose()?,
        })
    }

    /// Fails, naming the keys, unless the model splits over `tp` tensor-parallel ranks: heads
    /// and MLP hidden units (or a Mixture of Experts' experts) divide evenly, the vocabulary has a
    /// row for every rank, and the layout is one this version runs (no ZeRO-2 or ZeRO-3 beside a
    /// pipeline, and no sequence parallelism beside a Mixture of Experts, yet).
    fn check_tensor_parallel(&self, tp: usize) -> Result<()> {
        let m = &self.model;
        if !m.n_head.is_multiple_of(tp) {
            bail!(
                "parallel.tp = {tp} does not divide model.n_head = {}: each rank takes whole \
                 heads; choose a divisor of {}",
                m.n_head,
                m.n_head
            );
        }
        if !(4 * m.n_embd).is_multiple_of(tp) {
            bail!(
                "parallel.tp = {tp} does not divide the MLP's {} hidden units (4 × model.n_embd)",
                4 * m.n_embd
            );
        }
        if self.parallel.zero >= 2 && self.parallel.pp > 1 {
            bail!(
                "parallel.zero = {} with parallel.tp = {tp} and parallel.pp = {} is not \
                 supported yet; use parallel.zero = 0 or 1 beside a pipeline",
                self.parallel.zero,
                self.parallel.pp
            );
        }
        if let Some(moe) = &m.moe {
            if !moe.experts.is_multiple_of(tp) {
                bail!(
                    "parallel.tp = {tp} does not divide model.moe.experts = {}: the experts split \
                     over the tensor-parallel group; choose a divisor of {}",
                    moe.experts,
                    moe.experts
                );
            }
            if self.parallel.sequence_parallel {
                bail!(
                    "parallel.sequence_parallel = true with a Mixture-of-Experts model \
                     ([model.moe]) is not supported yet; set parallel.sequence_parallel = false"
                );
            }
        }
        Ok(())
    }

    /// The blocks of each of `pp` pipeline stages: `parallel.pp_blocks`, or the blocks cut
    /// evenly (earlier stages taking the remainder). Fails, naming the key, unless they are `pp`
    /// counts adding up to `model.n_layer` with a block in every stage between the first and the
    /// last.
    pub fn stage_blocks(&self, pp: usize) -> Result<Vec<usize>> {
        let n = self.model.n_layer;
        let blocks = if self.parallel.pp_blocks.is_empty() {
            (0..pp).map(|s| n / pp + usize::from(s < n % pp)).collect()
        } else {
            self.parallel.pp_blocks.clone()
        };
        let inner_empty = pp > 2 && blocks[1..pp - 1].contains(&0);
        if blocks.len() != pp || blocks.iter().sum::<usize>() != n || inner_empty {
            bail!(
                "parallel.pp_blocks = {:?} does not cut model.n_layer = {n} blocks into \
                 parallel.pp = {pp} stages: give {pp} counts adding up to {n}, every stage but the \
                 first and last holding at least one",
                self.parallel.pp_blocks
            );
        }
        if pp > n + 2 {
            bail!(
                "parallel.pp = {pp} stages for model.n_layer = {n} blocks: at most {}",
                n + 2
            );
        }
        Ok(blocks)
    }

    /// Fails, naming the keys, unless `ep` expert-parallel ranks can split the model's experts
    /// over the `ranks` data ranks: a Mixture-of-Experts model whose experts and data ranks `ep`
    /// divides, with plain data parallelism or ZeRO-1 over every rank beside it.
    fn check_expert_parallel(
        &self,
        ep: usize,
        ranks: usize,
        dp: usize,
        sharding: usize,
    ) -> Result<()> {
        let Some(moe) = &self.model.moe else {
            bail!("parallel.ep = {ep} splits a Mixture of Experts, and the model has none; add [model.moe] or set parallel.ep = 1");
        };
        if !moe.experts.is_multiple_of(ep) {
            bail!(
                "parallel.ep = {ep} does not divide model.moe.experts = {}; choose a divisor of {}",
                moe.experts,
                moe.experts
            );
        }
        if !ranks.is_multiple_of(ep) {
            bail!("parallel.ep = {ep} does not divide the {ranks} data ranks; choose a divisor of {ranks}");
        }
        let zero_one_over_all = self.parallel.zero == 1 && dp == 1 && sharding == ranks;
        let plain = self.parallel.zero == 0 && sharding == 1 && dp == ranks;
        if !(plain || zero_one_over_all) {
            bail!(
                "parallel.ep = {ep} with parallel.zero = {} (dp = {dp}, sharding = {sharding}) is \
                 not supported yet; use parallel.zero = 0, or parallel.zero = 1 over every rank \
                 (its optimizer state is then sharded over the ranks holding the same experts)",
                self.parallel.zero
            );
        }
        Ok(())
    }

    /// Fails, naming the keys, unless the pipeline can run: enough micro-batches for 1F1B, and
    /// no ZeRO beyond stage 1 beside it yet.
    fn check_pipeline(&self, pp: usize) -> Result<()> {
        let p = &self.parallel;
        let m = self.train.grad_accum * p.micro_batches;
        if p.schedule == "1f1b" && m < pp {
            bail!(
                "parallel.schedule = \"1f1b\" with {m} micro-batch(es) a step \
                 (train.grad_accum = {} × parallel.micro_batches = {}) and parallel.pp = {pp} \
                 stages: 1F1B needs at least one micro-batch per stage; raise \
                 parallel.micro_batches to {} or use parallel.schedule = \"gpipe\"",
                self.train.grad_accum,
                p.micro_batches,
                pp.div_ceil(self.train.grad_accum)
            );
        }
        if p.zero > 1 {
            bail!(
                "parallel.zero = {} with parallel.pp = {pp} is not supported yet; use \
                 parallel.zero = 0 or 1 with pipeline parallelism",
                p.zero
            );
        }
        Ok(())
    }

    /// Steps of the cosine decay.
    pub fn decay_steps(&self) -> u64 {
        if self.train.decay_steps == 0 {
            self.train.max_steps
        } else {
            self.train.decay_steps
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(path: Option<&Path>, overrides: &[&str]) -> String {
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        format!("{:#}", RunConfig::load(path, &o).expect_err("should fail"))
    }

    #[test]
    fn file_then_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(
            &path,
            "[model]\nn_layer = 6\n[train]\nlr = 1\nout_dir = \"x\"\n",
        )
        .unwrap();
        let o = vec!["train.lr=3e-4".to_string(), "data.dir=/tmp/data".into()];
        let c = RunConfig::load(Some(&path), &o).unwrap();
        assert_eq!(c.model.n_layer, 6);
        assert_eq!(c.train.lr, 3e-4);
        assert_eq!(c.train.out_dir, PathBuf::from("x"));
        assert_eq!(c.data.dir, PathBuf::from("/tmp/data"));
        assert_eq!(c.model.n_head, 4, "untouched keys keep their defaults");
        let back: RunConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn the_quickstart_recipe_is_the_one_it_always_ran() {
        let recipe = include_str!("../../../configs/quickstart.toml");
        let from_file = RunConfig::load_text(recipe, "quickstart.toml", &[]).unwrap();
        let settings: Vec<String> = [
            "model.n_layer=4",
            "model.n_head=4",
            "model.n_embd=192",
            "model.block_size=128",
            "model.bias=false",
            "train.batch_size=16",
            "train.max_steps=1100",
            "train.lr=2e-3",
            "train.min_lr=2e-4",
            "train.warmup_steps=100",
            "train.eval_interval=100",
            "train.eval_batches=16",
            "train.checkpoint_interval=300",
            "train.keep_checkpoints=2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(from_file, RunConfig::load(None, &settings).unwrap());
    }

    #[test]
    fn errors_name_the_key_the_value_and_what_is_allowed() {
        let e = err(None, &["train.lrr=1"]);
        assert!(e.contains("train.lrr") && e.contains("batch_size"), "{e}");
        let e = err(None, &["optim.lr=1"]);
        assert!(e.contains("optim") && e.contains("train"), "{e}");
        let e = err(None, &["train.lr=fast"]);
        assert!(
            e.contains("train.lr") && e.contains("fast") && e.contains("a number"),
            "{e}"
        );
        let e = err(None, &["model.n_embd=130"]);
        assert!(
            e.contains("model.n_embd = 130") && e.contains("multiple"),
            "{e}"
        );
        let e = err(None, &["model.dtype=f64"]);
        assert!(
            e.contains("model.dtype") && e.contains("f64") && e.contains("bf16"),
            "{e}"
        );
        let e = err(None, &["train.max_steps=-5"]);
        assert!(
            e.contains("train.max_steps = -5") && e.contains("non-negative"),
            "{e}"
        );
        let e = err(None, &["train.lr"]);
        assert!(e.contains("section.key=value"), "{e}");
        let e = err(None, &["train.threads=10000"]);
        assert!(
            e.contains("train.threads = 10000") && e.contains("1024"),
            "{e}"
        );
        let e = err(None, &["train.out_dir="]);
        assert!(
            e.contains("train.out_dir") && e.contains("current one"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[train]\nbatch = 3\n").unwrap();
        let e = err(Some(&path), &[]);
        assert!(e.contains("bad.toml") && e.contains("train.batch"), "{e}");
    }
}
