//! The seam through which parallel strategies split layers: a [`ParallelContext`] says which
//! shard of each parameter this rank holds, looks parameters up at forward time, and runs the
//! collectives a split layer needs. [`SingleDevice`] is the identity; `anneal-dist` implements
//! the others (Megatron-LM's column- and row-parallel linear layers and vocabulary-parallel
//! embedding, Shoeybi et al. 2019; ZeRO-3's gather at the lookup, Rajbhandari et al. 2020;
//! expert parallelism's all-to-all, Lepikhin et al. 2020, GShard).

use anneal_tensor::{ParamId, Result, Tensor};

/// How a parameter is divided across the tensor-parallel group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Every rank holds all of it.
    Replicated,
    /// Each rank holds an equal slice along this axis.
    Axis(usize),
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

    /// This rank's shard of a freshly initialised full parameter.
    fn shard(&self, full: &Tensor, split: Split) -> Result<Tensor> {
        let _ = split;
        Ok(full.clone())
    }

    /// Parameter `id` as forward computes with it, from this rank's stored tensor (ZeRO-3
    /// gathers the shards here and frees them after use).
    fn lookup(&self, id: ParamId, stored: &Tensor) -> Result<Tensor> {
        let _ = id;
        Ok(stored.clone())
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
