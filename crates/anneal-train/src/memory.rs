//! The memory a training run needs, estimated before anything is allocated: the one estimator
//! of it, refined for every precision mode and recomputation policy, checked against the
//! machine's memory at the start of a run, printed by `anneal pretrain --estimate-memory`, and
//! reported beside the measured peak when the run ends.
//!
//! It counts what exists at once when a step peaks, at the start of backward:
//!
//! - the parameters in their storage dtype, an f32 gradient for each trainable one, and the
//!   optimizer's state by arithmetic (AdamW: two moments of 4, 2 or about 1 byte, plus a bf16
//!   store's 2-byte master copy or an f16 store's 4-byte one);
//! - the activations the engine keeps for backward, counted from what each op saves: per GPT
//!   block 12 values per token and channel in the storage dtype (the block input, both norm
//!   outputs, the packed Q/K/V, the attention output, the residual between, and the MLP's 4d
//!   pre-activation; the fused GELU-linear recomputes its activation), plus the embedding output,
//!   the final norm and the logits; with whole blocks recomputed, one input per block; with the
//!   attention probabilities kept (no recomputation), B·H·T² f32 values per block. This is
//!   Korthikanti et al. 2022's count ("Reducing Activation Recomputation in Large Transformer
//!   Models", 34·s·b·h bytes a block at 16 bits with dropout masks and unfused attention) for
//!   this engine's ops;
//! - the caches: backward's transients (the gradients of one block's activations, widened
//!   copies of 16-bit operands, the buffer cache that keeps freed activation-sized buffers for
//!   reuse) and the optimizer's per-thread scratch. These are measured, not derived: fitted on
//!   `anneal bench gpt` runs of four shapes × three precision modes × three policies on 2
//!   threads, they come to about 29 (selective), 35 (full) or 25 (none) f32 activations of
//!   B·T·d each, plus 3 MB; the fit leaves every one of those 36 runs within 8% of its peak
//!   RSS. Large models at batch 1 (12-layer GPTs of 72M–340M parameters in f32 and the leanest
//!   mode) add 0.3 bytes a parameter (the weight gradients' f32 buffers the cache keeps, one
//!   per shape). A 16-bit store whose products widen (no bf16 arithmetic on the CPU, or f16)
//!   adds the f32 copies its weights are widened into, which the buffer cache keeps (3 bytes a
//!   parameter measured);
//! - a checkpoint being written, when a run's memory peaks again after its steps: on one device
//!   a piece of the optimizer state at a time, read from its own storage; over several ranks
//!   the state rank 0 gathers as f32 vectors (the files are written from the buffers without a
//!   copy);
//! - the process itself before the model (runtime and binary, 7.2 MB; a pretraining run adds
//!   its corpus, whose pages sampling touches, and 3 MB of bookkeeping: tokenizer, logs).

use crate::config::RunConfig;
use anneal_tensor::backend::KernelPath;
use anneal_tensor::DType;
use anyhow::Result;

/// Bytes a run needs, by part.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryBound {
    /// Parameters in their storage dtype.
    pub parameters: f64,
    /// Gradients of the trainable parameters (f32, or bf16 under `train.grads = "bf16"`).
    pub gradients: f64,
    /// Optimizer state.
    pub optimizer: f64,
    /// One micro-batch's activations kept for backward, logits included.
    pub activations: f64,
    /// Backward's transients, the buffer cache and optimizer scratch.
    pub caches: f64,
    /// A checkpoint's gathered and encoded copies while it is written (0 where none is).
    pub checkpoint: f64,
    /// The process before the model: runtime and binary, and a run's corpus.
    pub process: f64,
}

/// The process before the model: runtime and binary, measured as 7.2 MB on Linux.
pub const PROCESS_BYTES: f64 = 7.2 * MB;

/// The megabyte of memory figures (2²⁰ bytes, as peak RSS is reported).
pub const MB: f64 = 1048576.0;

impl MemoryBound {
    /// What training holds (the parts a machine must fit): parameters, gradients, optimizer
    /// state, activations and caches.
    pub fn total(&self) -> f64 {
        self.parameters + self.gradients + self.optimizer + self.activations + self.caches
    }

    /// The peak RSS this predicts: [`MemoryBound::total`], a checkpoint being written (the
    /// buffer cache keeps the step's memory after it), and the process itself.
    pub fn peak(&self) -> f64 {
        self.total() + self.checkpoint + self.process
    }

    /// One rank's share under `layout`: the whole model (its 1/tp under tensor parallelism,
    /// which keeps norms whole on every rank: a lower bound), the optimizer state divided over
    /// the ZeRO sharding group (and the gradients too under ZeRO-2, whose buckets in flight come
    /// on top), the activations and transients of its share of the batch (and of its
    /// tensor-parallel slice, though the residual stream is whole on every rank).
    pub fn per_rank(self, layout: &crate::config::Layout) -> MemoryBound {
        let tp = layout.model_ranks() as f64;
        let sharded = if layout.zero > 0 { layout.sharding } else { 1 };
        let grads_sharded = if layout.zero >= 2 { layout.sharding } else { 1 };
        let params_sharded = if layout.zero >= 3 { layout.sharding } else { 1 };
        MemoryBound {
            parameters: self.parameters / tp / params_sharded as f64,
            gradients: self.gradients / grads_sharded as f64 / tp,
            optimizer: self.optimizer / sharded as f64 / tp,
            activations: self.activations / layout.ranks() as f64,
            caches: self.caches / layout.ranks() as f64,
            // Rank 0 of several gathers the whole state to write it; one device writes it
            // from the optimizer's own storage.
            checkpoint: if layout.ranks() == 1 {
                STREAMED_CHECKPOINT
            } else {
                self.checkpoint
            },
            process: self.process,
        }
    }

    /// `n` ranks' worth (ranks as threads of one process).
    pub fn times(self, n: usize) -> MemoryBound {
        let n = n as f64;
        MemoryBound {
            parameters: self.parameters * n,
            gradients: self.gradients * n,
            optimizer: self.optimizer * n,
            activations: self.activations * n,
            caches: self.caches * n,
            // One rank of the process writes, and the process is one.
            checkpoint: self.checkpoint,
            process: self.process,
        }
    }

    /// `12.3 GB (parameters 1.0, gradients 2.0, optimizer 4.0, activations 5.3, caches 0.1)`.
    pub fn describe(&self) -> String {
        let gb = |x: f64| x / 1e9;
        format!(
            "{:.1} GB (parameters {:.1}, gradients {:.1}, optimizer {:.1}, activations {:.1}, \
             caches {:.1})",
            gb(self.total()),
            gb(self.parameters),
            gb(self.gradients),
            gb(self.optimizer),
            gb(self.activations),
            gb(self.caches)
        )
    }

    /// One line per part in MB, and the predicted peak RSS.
    pub fn table(&self) -> String {
        let mb = |x: f64| x / MB;
        format!(
            "parameters   {:>10.1} MB\ngradients    {:>10.1} MB\noptimizer    {:>10.1} MB\n\
             activations  {:>10.1} MB\ncaches       {:>10.1} MB\ncheckpoint   {:>10.1} MB\n\
             process      {:>10.1} MB\npeak RSS     {:>10.1} MB (estimated)",
            mb(self.parameters),
            mb(self.gradients),
            mb(self.optimizer),
            mb(self.activations),
            mb(self.caches),
            mb(self.checkpoint),
            mb(self.process),
            mb(self.peak())
        )
    }
}

/// The memory of a GPT pretraining run of `config` over a vocabulary of `vocab_size`, on one
/// device.
pub fn lower_bound(config: &RunConfig, vocab_size: usize) -> Result<MemoryBound> {
    let gpt = config.gpt_config(vocab_size)?;
    let adamw = config.adamw()?;
    let (d, v, h) = (gpt.n_embd as f64, vocab_size as f64, gpt.n_head as f64);
    // Counted without overflow: a size no machine holds gives an infinite estimate, never a
    // wrapped small one.
    let params = gpt.total_params().map_or(f64::INFINITY, |n| n as f64);
    let store = gpt.dtype.size_in_bytes() as f64;
    let (s, b, layers) = (
        config.model.block_size as f64,
        config.train.batch_size as f64,
        gpt.n_layer as f64,
    );
    let tokens = s * b;
    let policy = config.recompute()?;
    // Values per token and channel each block keeps (see the module's note), and the per-row
    // f32 statistics of its norms and attention.
    let per_block = if policy == "full" { 1.0 } else { 12.0 };
    let stats = if policy == "full" {
        0.0
    } else {
        4.0 * (4.0 + h)
    };
    let probabilities = if policy == "none" {
        4.0 * b * h * s * s
    } else {
        0.0
    };
    let activations = layers * (per_block * tokens * d * store + tokens * stats + probabilities)
        + 2.0 * tokens * d * store
        + tokens * v * store;
    let transients = match policy {
        "full" => 35.0,
        "none" => 25.0,
        _ => 29.0,
    };
    Ok(MemoryBound {
        parameters: store * params,
        gradients: config.grad_dtype()?.size_in_bytes() as f64 * params,
        optimizer: adamw.state_bytes_per_param(gpt.dtype) * params,
        activations,
        // Where bf16 products widen their operands (no bf16 arithmetic on this CPU, or f16),
        // the buffer cache also keeps the f32 copies 16-bit weights are widened into (measured:
        // 3 bytes a parameter on GPTs of 14M and 57M parameters); the bf16 kernels read them in
        // place.
        caches: 3.0 * MB
            + transients * tokens * d * 4.0
            + 0.3 * params
            + if widens_weights(gpt.dtype) {
                3.0 * params
            } else {
                0.0
            },
        checkpoint: 0.0,
        process: PROCESS_BYTES,
    })
}

/// Whether products of a `dtype` store widen its weights into f32 copies on this CPU.
fn widens_weights(dtype: DType) -> bool {
    match dtype {
        DType::F32 => false,
        DType::BF16 => anneal_tensor::backend::kernel_path() == KernelPath::Widening,
        DType::F16 => true,
    }
}

/// Bytes a checkpoint written from the optimizer's own storage holds while it writes: one piece
/// of state in f32 and the file's write buffer.
const STREAMED_CHECKPOINT: f64 = 4.0 * anneal_tensor::io::STREAM_CHUNK as f64 + MB;

/// [`lower_bound`] for `anneal pretrain`: with a checkpoint written every so often and the
/// corpus of `corpus_bytes` mapped.
pub fn run_estimate(
    config: &RunConfig,
    vocab_size: usize,
    corpus_bytes: f64,
) -> Result<MemoryBound> {
    let mut m = lower_bound(config, vocab_size)?;
    let params = m.parameters / config.dtype()?.size_in_bytes() as f64;
    // Each state vector in f32 (two moments, and the master copy of a half-precision store that
    // keeps one), gathered; the files are written from the buffers, with no copy of their bytes.
    let master = config.adamw()?.keeps_master(config.dtype()?);
    m.checkpoint = 4.0 * params * if master { 3.0 } else { 2.0 };
    // A half-precision run's activations go back to the allocator after the step (the buffer
    // cache keeps f32 buffers only), where the checkpoint's copies find room.
    if config.dtype()? != DType::F32 {
        m.checkpoint = (m.checkpoint - m.activations).max(0.0);
    }
    m.process += corpus_bytes + 3.0 * MB;
    Ok(m)
}

/// This machine's physical memory in bytes (`MemTotal` of `/proc/meminfo`), where known.
pub fn physical_memory() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: f64 = text
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_counts_every_part_and_grows_with_the_run() {
        let c = RunConfig::default();
        let m = lower_bound(&c, 65).unwrap();
        // The Shakespeare model: the store's own count, 4 bytes each for values and
        // gradients, 8 for AdamW's moments.
        let params = m.parameters / 4.0;
        let model = anneal_nn::Gpt::new(c.gpt_config(65).unwrap(), 0).unwrap();
        assert_eq!(params, model.params.numel() as f64);
        assert_eq!(m.parameters, model.params.bytes() as f64);
        assert_eq!(m.gradients, 4.0 * params);
        assert_eq!(m.optimizer, 8.0 * params);
        assert!(m.caches > 0.0);
        assert!(m.total() < 1e9 && m.activations > 0.0);
        let mut huge = c.clone();
        huge.model.n_embd = 1_000_000;
        huge.model.n_head = 1000;
        assert!(lower_bound(&huge, 65).unwrap().total() > 1e13);
        let mut long = c;
        long.train.batch_size = 1_000_000_000;
        assert!(lower_bound(&long, 65).unwrap().activations > 1e15);
    }

    #[test]
    fn precision_modes_and_recomputation_move_the_parts_they_change() {
        let with = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            lower_bound(&RunConfig::load(None, &sets).unwrap(), 65).unwrap()
        };
        let f32 = with(&[]);
        let params = f32.gradients / 4.0;
        let bf16 = with(&["model.dtype=bf16"]);
        assert_eq!(bf16.parameters, 2.0 * params);
        assert_eq!(
            bf16.optimizer,
            10.0 * params,
            "two f32 moments and 2-byte master halves"
        );
        // Half the stored values; the norms' and attention's row statistics stay f32.
        assert!(bf16.activations < 0.51 * f32.activations);
        let states = with(&["model.dtype=bf16", "train.moments=bf16"]);
        assert_eq!(states.optimizer, 6.0 * params);
        let lean = with(&[
            "model.dtype=bf16",
            "train.moments=8bit",
            "train.master_weights=false",
        ]);
        assert_eq!(lean.optimizer, 2.0 * (1.0 + 4.0 / 2048.0) * params);
        let leanest = with(&[
            "model.dtype=bf16",
            "train.moments=8bit",
            "train.master_weights=false",
            "train.grads=bf16",
        ]);
        assert_eq!(leanest.gradients, 2.0 * params);
        assert_eq!(leanest.optimizer, lean.optimizer);
        let f16 = with(&["model.dtype=f16"]);
        assert_eq!(
            f16.optimizer,
            12.0 * params,
            "an f16 store's master copy is whole"
        );
        let full = with(&["model.recompute=full"]);
        let none = with(&["model.recompute=none"]);
        assert!(full.activations < f32.activations / 4.0);
        // Kept probabilities: 4 layers × batch 12 × 4 heads × 64² f32.
        assert_eq!(
            none.activations - f32.activations,
            4.0 * 12.0 * 4.0 * 64.0 * 64.0 * 4.0
        );
        assert!(lean.peak() < bf16.peak() && bf16.peak() < f32.peak());
    }

    #[test]
    fn a_rank_holds_its_share_of_what_its_zero_stage_shards() {
        let whole = lower_bound(&RunConfig::default(), 65).unwrap();
        let layout = |zero| crate::config::Layout {
            dp: 2,
            tp: 1,
            sequence_parallel: false,
            pp: 1,
            micro_batches: 1,
            one_f_one_b: true,
            ep: 1,
            sharding: 4,
            zero,
            bucket_bytes: 1 << 20,
            bf16_gradients: false,
        };
        for (zero, grads, optimizer) in [(0, 1.0, 1.0), (1, 1.0, 4.0), (2, 4.0, 4.0)] {
            let r = whole.per_rank(&layout(zero));
            assert_eq!(r.parameters, whole.parameters);
            assert_eq!(r.gradients, whole.gradients / grads, "ZeRO-{zero}");
            assert_eq!(r.optimizer, whole.optimizer / optimizer, "ZeRO-{zero}");
            assert_eq!(r.activations, whole.activations / 8.0);
        }
    }
}
