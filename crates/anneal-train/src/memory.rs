//! A lower bound of the memory a training run needs, checked before anything is allocated: the
//! one estimator of it (mixed-precision policies refine it here).
//!
//! It counts what must exist at once: the parameters in their storage dtype, an f32 gradient
//! for each trainable parameter, the optimizer's state (AdamW: two f32 moments, plus the master
//! copy's bytes for a half-precision store: 2 per parameter for bf16, 4 for f16), and one
//! micro-batch's activations. Activations follow Korthikanti et al. 2022 ("Reducing Activation
//! Recomputation in Large Transformer Models") for a block with fused attention, 34·s·b·h bytes
//! at 16 bits (no s² term: the attention probabilities are recomputed), 2·s·b·h with block
//! recomputation, plus the logits and their gradient, 2·4·s·b·V bytes.

use crate::config::RunConfig;
use anneal_tensor::DType;
use anyhow::Result;

/// Bytes a run needs at least, by part.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryBound {
    /// Parameters in their storage dtype.
    pub parameters: f64,
    /// f32 gradients of the trainable parameters.
    pub gradients: f64,
    /// Optimizer state.
    pub optimizer: f64,
    /// One micro-batch's activations, logits included.
    pub activations: f64,
}

impl MemoryBound {
    /// All parts together.
    pub fn total(&self) -> f64 {
        self.parameters + self.gradients + self.optimizer + self.activations
    }

    /// One rank's share under `layout`: the whole model (its 1/tp under tensor parallelism,
    /// which keeps norms whole on every rank: a lower bound), the optimizer state divided over
    /// the ZeRO sharding group (and the gradients too under ZeRO-2, whose buckets in flight come
    /// on top of this lower bound), the activations of its share of the batch (and of its
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
        }
    }

    /// `12.3 GB (parameters 1.0, gradients 2.0, optimizer 4.0, activations 5.3)`.
    pub fn describe(&self) -> String {
        let gb = |x: f64| x / 1e9;
        format!(
            "{:.1} GB (parameters {:.1}, gradients {:.1}, optimizer {:.1}, activations {:.1})",
            gb(self.total()),
            gb(self.parameters),
            gb(self.gradients),
            gb(self.optimizer),
            gb(self.activations)
        )
    }
}

/// The lower bound of a GPT pretraining run of `config` over a vocabulary of `vocab_size`.
pub fn lower_bound(config: &RunConfig, vocab_size: usize) -> Result<MemoryBound> {
    let gpt = config.gpt_config(vocab_size)?;
    let (d, v) = (gpt.n_embd as f64, vocab_size as f64);
    // Counted without overflow: a size no machine holds gives an infinite bound, never a
    // wrapped small one.
    let params = gpt.total_params().map_or(f64::INFINITY, |n| n as f64);
    let (store, master) = match gpt.dtype {
        DType::F32 => (4.0, 0.0),
        DType::BF16 => (2.0, 2.0),
        DType::F16 => (2.0, 4.0),
    };
    let (s, b) = (
        config.model.block_size as f64,
        config.train.batch_size as f64,
    );
    let per_layer = if gpt.checkpoint_blocks {
        2.0 * s * b * d
    } else {
        34.0 * s * b * d
    } * store
        / 2.0;
    Ok(MemoryBound {
        parameters: store * params,
        gradients: 4.0 * params,
        optimizer: (8.0 + master) * params,
        activations: gpt.n_layer as f64 * per_layer + 2.0 * 4.0 * s * b * v,
    })
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
