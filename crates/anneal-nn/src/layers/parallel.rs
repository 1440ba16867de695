//! The seam through which parallel strategies split layers: a [`ParallelContext`] says which
//! shard of each parameter this rank holds, looks parameters up at forward time, and runs the
//! collectives a split layer needs. [`SingleDevice`] is the identity; `anneal-dist` implements
//! the others (Megatron-LM's column- and row-parallel linear layers and vocabulary-parallel
//! embedding, Shoeybi et al. 2019; ZeRO-3's gather at the lookup, Rajbhandari et al. 2020;
//! expert parallelism's all-to-all, Lepikhin et al. 2020, GShard).

use anneal_tensor::{CrossEntropyOptions, ParamId, Result, Tensor};
use std::ops::Range;

/// How a parameter is divided across the tensor-parallel group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Every rank holds all of it.
    Replicated,
    /// Each rank holds a slice along this axis: ⌈n/size⌉ elements of it, the last ranks' slices
    /// shorter when the size does not divide n ([`ParallelContext::axis_range`]; a vocabulary
    /// splits unevenly, heads and hidden units evenly).
    Axis(usize),
    /// The axis is `parts` equal blocks side by side (GPT-2's fused Q, K and V projection) and
    /// each rank holds its slice of every block, concatenated: its heads' queries, keys and
    /// values.
    Interleaved {
        /// The axis.
        axis: usize,
        /// Blocks along it.
        parts: usize,
    },
    /// A Mixture-of-Experts layer's experts (axis 0): each rank of the expert-parallel group
    /// holds an equal share of them.
    Experts,
}

/// What a layer asks of the parallel layout it runs in. Every method has the single-device
/// answer as its default.
pub trait ParallelContext: Send + Sync {
    /// This rank's index in its tensor-parallel group and the group's size.
    fn tensor_parallel(&self) -> (usize, usize) {
        (0, 1)
    }

    /// This rank's shard of the full parameter `name` (freshly initialised, or loaded from a
    /// checkpoint). The context remembers each name's split, to gather the whole again
    /// ([`ParallelContext::gather`]).
    fn shard(&self, name: &str, full: &Tensor, split: Split) -> Result<Tensor> {
        let _ = (name, split);
        Ok(full.clone())
    }

    /// The whole parameter `name` from this rank's shard `local` (collective over the
    /// tensor-parallel group: every rank of it calls this for the same names in the same order).
    /// A checkpoint holds whole parameters, so it loads under any layout.
    fn gather(&self, name: &str, local: &Tensor) -> Result<Tensor> {
        let _ = name;
        Ok(local.clone())
    }

    /// Whether this rank's parameters are parts of the whole model's (slices, shards, or a
    /// pipeline stage's layers): checkpoints then gather them whole and cut them back.
    fn splits_parameters(&self) -> bool {
        false
    }

    /// Whether this rank holds parameter `name` (a pipeline stage holds only its layers';
    /// the others are empty on it).
    fn holds(&self, name: &str) -> bool {
        let _ = name;
        true
    }

    /// The whole shape of parameter `name`, whose slice on this rank has shape `local`.
    fn whole_shape(&self, name: &str, local: &[usize]) -> Vec<usize> {
        let _ = name;
        local.to_vec()
    }

    /// How parameter `name` is split (recorded when it was sharded).
    fn split_of(&self, name: &str) -> Split {
        let _ = name;
        Split::Replicated
    }

    /// Whether activations between the tensor-parallel regions are split by rows (tokens) across
    /// the group (Megatron-LM's sequence parallelism, Korthikanti et al. 2022): norms, dropout and
    /// residual additions then run on each rank's rows only.
    fn sequence_parallel(&self) -> bool {
        false
    }

    /// Under sequence parallelism, every rank's rows `[n/tp, d]` gathered into the whole
    /// `[n, d]` (backward: the whole gradient reduce-scattered back into rows): Megatron's `g`
    /// before a column-parallel region. The identity otherwise.
    fn gather_sequence(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }

    /// `values` summed over the tensor-parallel group (the split parameters' share of a global
    /// gradient norm); collective over the group.
    fn sum_over_group(&self, values: Vec<f32>) -> Result<Vec<f32>> {
        Ok(values)
    }

    /// `values` summed over the ranks that split the experts of the Mixture-of-Experts layers
    /// between them (the experts' share of a global gradient norm); collective over them.
    fn sum_over_experts(&self, values: Vec<f32>) -> Result<Vec<f32>> {
        Ok(values)
    }

    /// The part of an axis of `len` elements this rank holds under [`Split::Axis`] (a
    /// vocabulary-parallel embedding's rows).
    fn axis_range(&self, len: usize) -> Range<usize> {
        0..len
    }

    /// Parameter `id` as forward computes with it, from this rank's stored tensor (ZeRO-3
    /// gathers the shards here and frees them after use).
    fn lookup(&self, id: ParamId, stored: &Tensor) -> Result<Tensor> {
        let _ = id;
        Ok(stored.clone())
    }

    /// The output `x` of a layer whose forward has ended (the embedding, a transformer block):
    /// ZeRO-3 frees the parameters the layer gathered here and gathers them again at this point
    /// of backward, before the layer's own backward needs them. The identity otherwise.
    fn end_layer(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }

    /// The input of a column-parallel layer: identity forward, all-reduce of its gradient in
    /// backward (Megatron's `f`).
    fn enter_parallel(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }

    /// The output of a row-parallel layer: all-reduce forward, identity backward (Megatron's
    /// `g`).
    fn reduce_parallel(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }

    /// The mean cross-entropy of `logits` `[rows, vocab]` against `targets`, where the logits
    /// may hold only this rank's slice of the vocabulary ([`ParallelContext::axis_range`] of it):
    /// Megatron-LM's vocabulary-parallel cross-entropy combines the slices' maxima, sums of
    /// exponentials and target logits across the group, so no rank ever holds the whole row.
    fn cross_entropy(
        &self,
        logits: &Tensor,
        targets: &[i64],
        opts: CrossEntropyOptions,
    ) -> Result<Tensor> {
        logits.cross_entropy(targets, opts)
    }

    /// This rank's index in its expert-parallel group and the group's size: each rank holds
    /// `experts / size` consecutive experts of every Mixture-of-Experts layer
    /// ([`Split::Experts`]).
    fn expert_parallel(&self) -> (usize, usize) {
        (0, 1)
    }

    /// Sends rows grouped by expert (`counts[e]` rows for each expert `e` of the layer, in
    /// expert order) to the ranks that hold their experts, and returns the rows this rank's
    /// experts received, grouped by local expert, with their counts. Expert parallelism's
    /// all-to-all goes here (its backward is the reverse all-to-all); on one device every
    /// expert is local and the rows stay as they are.
    fn dispatch_to_experts(&self, rows: &Tensor, counts: &[usize]) -> Result<(Tensor, Vec<usize>)> {
        Ok((rows.clone(), counts.to_vec()))
    }

    /// The reverse of [`ParallelContext::dispatch_to_experts`]: this rank's experts' output rows
    /// go back to the ranks whose tokens they are, which receive them grouped as the `counts`
    /// they dispatched.
    fn return_from_experts(&self, rows: &Tensor, counts: &[usize]) -> Result<Tensor> {
        let _ = counts;
        Ok(rows.clone())
    }
}

/// One device: every parameter whole, every collective the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleDevice;

impl ParallelContext for SingleDevice {}
