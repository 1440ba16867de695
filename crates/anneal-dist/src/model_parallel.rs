//! Megatron-LM tensor parallelism (Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion
//! Parameter Language Models Using Model Parallelism", §3): the [`ParallelContext`] that splits a
//! model's layers across the ranks of a tensor-parallel group.
//!
//! - A column-parallel linear layer holds a slice of the output features; its input passes
//!   through `f` (identity forward, all-reduce of the gradient in backward).
//! - A row-parallel linear layer holds the matching slice of the input features; its partial
//!   outputs are summed by `g` (all-reduce forward, identity backward).
//! - Attention splits by heads (the query, key and value projections are column-parallel, the
//!   output projection row-parallel); the MLP's first layer is column-parallel, its second
//!   row-parallel. Each transformer block so costs two all-reduces of `B·T·d` values forward and
//!   two backward, and nothing else.
//! - The token embedding splits the vocabulary: each rank looks up the ids in its rows and the
//!   lookups are summed; the tied output head gives each rank its slice of the logits, and the
//!   vocabulary-parallel cross-entropy combines the slices' maxima, sums of exponentials and
//!   target logits, so no rank holds a whole row of logits (Megatron's `VocabParallelEmbedding`
//!   and `vocab_parallel_cross_entropy`). A vocabulary the group does not divide splits unevenly.
//!
//! Every rank draws each whole parameter from the same seed and keeps its slice, so a split
//! model starts from the single-device model's weights; [`ParallelContext::gather`] gives a
//! parameter back whole (checkpoints hold whole parameters and load under any layout).

use crate::{comm_error, Communicator, ExpertParallel, Reduce, ZeroThree};
use anneal_nn::layers::{ParallelContext, Split};
use anneal_tensor::autograd::Backward;
use anneal_tensor::{CrossEntropyOptions, DType, Error, ParamId, Result, Tensor};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Which parameters a rank holds, by name: a pipeline stage's.
pub type Holds = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// The model-parallel context of one rank: its tensor-parallel group (of one rank without
/// tensor parallelism), the parameters it holds (a pipeline stage's, or all), and how each
/// parameter was split (by name, with the whole shape).
pub struct ModelParallel {
    group: Arc<dyn Communicator>,
    holds: Option<Holds>,
    splits: Mutex<HashMap<String, (Split, Vec<usize>)>>,
    /// Sequence parallelism: activations outside the split layers are split by rows.
    sequence: bool,
    /// Each parameter's split, in declaration order (its id), for lookups.
    by_id: Mutex<Vec<Split>>,
    /// Expert parallelism beside: the Mixture-of-Experts layers' experts split over an
    /// expert-parallel group of data ranks first, then over the tensor-parallel group.
    experts: Option<Arc<ExpertParallel>>,
    /// The rows per local expert of the last dispatch, for the return that follows it.
    dispatched: Mutex<Option<Vec<usize>>>,
    /// ZeRO-3 beside: each tensor-parallel slice sharded over the data ranks.
    zero: Option<Arc<ZeroThree>>,
}

impl ModelParallel {
    /// The context of this rank of `group` (the ranks that split each layer between them).
    pub fn new(group: Arc<dyn Communicator>) -> ModelParallel {
        ModelParallel {
            group: crate::Timed::wrap(group),
            holds: None,
            splits: Mutex::new(HashMap::new()),
            sequence: false,
            by_id: Mutex::new(Vec::new()),
            experts: None,
            dispatched: Mutex::new(None),
            zero: None,
        }
    }

    /// This context with ZeRO-3 beside it (PyTorch's FSDP with tensor parallelism): each rank's
    /// tensor-parallel slice of every parameter is sharded over the data ranks of `zero`,
    /// gathered at its lookup (the gradient reduce-scattered back) and freed after its layer.
    pub fn with_zero_three(mut self, zero: Arc<ZeroThree>) -> ModelParallel {
        self.zero = Some(zero);
        self
    }

    /// This context with expert parallelism beside it (GShard's, over data ranks): each
    /// Mixture-of-Experts layer's experts are split over the ranks of `experts` (tokens
    /// exchanged by all-to-all), and each rank's share of them over the tensor-parallel group.
    pub fn with_experts(mut self, experts: Arc<ExpertParallel>) -> ModelParallel {
        self.experts = (experts.group().size() > 1).then_some(experts);
        self
    }

    /// This context with sequence parallelism (Korthikanti et al. 2022, "Reducing Activation
    /// Recomputation in Large Transformer Models", §4.2.2): the activations between the split
    /// layers (the residual stream, norms, dropout) are split by rows over the group; a split
    /// region's input is all-gathered (its gradient reduce-scattered) and its output
    /// reduce-scattered (its gradient all-gathered), which moves what the all-reduces moved. The
    /// replicated parameters then see only this rank's rows, so their gradients are summed over
    /// the group as they are looked up.
    pub fn with_sequence_parallel(mut self, on: bool) -> ModelParallel {
        self.sequence = on && self.group.size() > 1;
        self
    }

    /// This context holding only the parameters `holds` names (a pipeline stage's layers'); the
    /// others are declared empty (`[0]`), their values drawn and dropped so every stage draws
    /// the whole model's initial values in the same order.
    pub fn holding(mut self, holds: Holds) -> ModelParallel {
        self.holds = Some(holds);
        self
    }

    /// Whether this rank holds parameter `name`.
    pub fn holds(&self, name: &str) -> bool {
        self.holds.as_ref().is_none_or(|h| h(name))
    }

    /// The tensor-parallel group.
    pub fn group(&self) -> &Arc<dyn Communicator> {
        &self.group
    }

    /// Rank `rank`'s part of an axis of `len` elements.
    fn part(&self, len: usize, rank: usize) -> Range<usize> {
        crate::shard_range(len, rank, self.group.size(), 1)
    }

    /// The recorded split and whole shape of `name`.
    fn recorded(&self, name: &str) -> Option<(Split, Vec<usize>)> {
        self.splits.lock().ok()?.get(name).cloned()
    }

    /// Every rank's slice along `axis` gathered into the whole (`len` along the axis), slices
    /// being [`ModelParallel::part`]s (padded to equal lengths for the all-gather).
    fn gather_axis(&self, local: &Tensor, axis: usize, len: usize) -> Result<Tensor> {
        let n = self.group.size();
        // The axis first, so a slice is a run of whole rows.
        let front = if axis == 0 {
            local.contiguous()
        } else {
            local.transpose(0, axis as isize)?.contiguous()
        };
        let row: usize = front.shape()[1..].iter().product();
        let chunk = crate::shard_len(len, n, 1) * row;
        let mut mine = front.to_vec_f32();
        mine.resize(chunk, 0.0);
        let all = self
            .group
            .all_gather(mine)
            .map_err(comm_error("tensor-parallel gather"))?;
        let mut whole = Vec::with_capacity(len * row);
        for (j, c) in all.chunks(chunk.max(1)).enumerate().take(n) {
            whole.extend_from_slice(&c[..self.part(len, j).len() * row]);
        }
        let mut shape = front.shape().to_vec();
        shape[0] = len;
        let whole = Tensor::from_f32(whole, &shape)?;
        let whole = if axis == 0 {
            whole
        } else {
            whole.transpose(0, axis as isize)?.contiguous()
        };
        Ok(whole.to_dtype(local.dtype()))
    }
}

impl ParallelContext for ModelParallel {
    fn tensor_parallel(&self) -> (usize, usize) {
        (self.group.rank(), self.group.size())
    }

    fn shard(&self, name: &str, full: &Tensor, split: Split) -> Result<Tensor> {
        let (r, n) = (self.group.rank(), self.group.size());
        let bad = |reason: String| Error::Invalid {
            op: "tensor-parallel shard",
            reason: format!("{name} of shape {:?}: {reason}", full.shape()),
        };
        let declared = self.splits.lock().is_ok_and(|s| s.contains_key(name));
        if !declared {
            if let Ok(mut by_id) = self.by_id.lock() {
                by_id.push(split);
            }
        }
        if !self.holds(name) {
            if let Ok(mut splits) = self.splits.lock() {
                splits.insert(name.to_string(), (split, full.shape().to_vec()));
            }
            return Ok(Tensor::zeros(&[0], full.dtype()));
        }
        let local = match split {
            Split::Replicated => full.clone(),
            Split::Experts => {
                let mine = match &self.experts {
                    Some(experts) => experts.shard(name, full, split)?,
                    None => full.clone(),
                };
                let e = mine.shape()[0];
                if !e.is_multiple_of(n) {
                    return Err(bad(format!("{e} experts do not divide over {n} ranks")));
                }
                mine.narrow(0, r * e / n, e / n)?.contiguous()
            }
            Split::Axis(axis) => {
                let len = *full
                    .shape()
                    .get(axis)
                    .ok_or_else(|| bad("no such axis".into()))?;
                if len < n {
                    return Err(bad(format!(
                        "{len} elements cannot be split over {n} ranks"
                    )));
                }
                let part = self.part(len, r);
                full.narrow(axis as isize, part.start, part.len())?
                    .contiguous()
            }
            Split::Interleaved { axis, parts } => {
                let len = *full
                    .shape()
                    .get(axis)
                    .ok_or_else(|| bad("no such axis".into()))?;
                if parts == 0 || !len.is_multiple_of(parts) || !(len / parts).is_multiple_of(n) {
                    return Err(bad(format!(
                        "{parts} blocks along an axis of {len} do not split over {n} ranks"
                    )));
                }
                let (block, slice) = (len / parts, len / parts / n);
                let pieces = (0..parts)
                    .map(|p| full.narrow(axis as isize, p * block + r * slice, slice))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::concat(&pieces.iter().collect::<Vec<_>>(), axis as isize)?.contiguous()
            }
        };
        if let Ok(mut splits) = self.splits.lock() {
            splits.insert(name.to_string(), (split, full.shape().to_vec()));
        }
        match &self.zero {
            Some(zero) => zero.shard(name, &local, split),
            None => Ok(local),
        }
    }

    fn gather(&self, name: &str, local: &Tensor) -> Result<Tensor> {
        // Under ZeRO-3 this rank's slice, gathered from the data ranks' shards first.
        let local = &match &self.zero {
            Some(zero) => zero.gather(name, local)?,
            None => local.clone(),
        };
        let Some((split, shape)) = self.recorded(name) else {
            return Ok(local.clone());
        };
        if !self.holds(name) || self.split_of(name) == Split::Replicated {
            return Ok(local.clone());
        }
        match split {
            Split::Replicated => Ok(local.clone()),
            Split::Experts => {
                let ep = self.experts.as_ref().map_or(1, |e| e.group().size());
                let mine = if self.group.size() > 1 {
                    self.gather_axis(local, 0, shape[0] / ep)?
                } else {
                    local.clone()
                };
                match &self.experts {
                    Some(experts) => experts.gather(name, &mine),
                    None => Ok(mine),
                }
            }
            Split::Axis(axis) => self.gather_axis(local, axis, shape[axis]),
            Split::Interleaved { axis, parts } => {
                // Rank-major after the gather ([q₀ k₀ v₀][q₁ k₁ v₁]…): reorder to block-major.
                let n = self.group.size();
                let whole = self.gather_axis(local, axis, shape[axis])?;
                let slice = shape[axis] / parts / n;
                let mut pieces = Vec::with_capacity(parts * n);
                for p in 0..parts {
                    for j in 0..n {
                        pieces.push(whole.narrow(axis as isize, (j * parts + p) * slice, slice)?);
                    }
                }
                Tensor::concat(&pieces.iter().collect::<Vec<_>>(), axis as isize)
                    .map(|t| t.contiguous())
            }
        }
    }

    fn whole_shape(&self, name: &str, local: &[usize]) -> Vec<usize> {
        self.recorded(name)
            .map_or_else(|| local.to_vec(), |(_, shape)| shape)
    }

    fn split_of(&self, name: &str) -> Split {
        match self.recorded(name) {
            Some((Split::Experts, _)) if self.experts.is_some() => Split::Experts,
            _ if self.group.size() == 1 => Split::Replicated,
            recorded => recorded.map_or(Split::Replicated, |(split, _)| split),
        }
    }

    fn holds(&self, name: &str) -> bool {
        ModelParallel::holds(self, name)
    }

    fn splits_parameters(&self) -> bool {
        self.group.size() > 1
            || self.holds.is_some()
            || self.experts.is_some()
            || self.zero.is_some()
    }

    fn sum_over_group(&self, values: Vec<f32>) -> Result<Vec<f32>> {
        self.group
            .all_reduce(values, Reduce::Sum)
            .map_err(comm_error("tensor-parallel all-reduce"))
    }

    fn sum_over_experts(&self, values: Vec<f32>) -> Result<Vec<f32>> {
        let values = if self.group.size() > 1 {
            self.sum_over_group(values)?
        } else {
            values
        };
        match &self.experts {
            Some(experts) => experts.sum_over_experts(values),
            None => Ok(values),
        }
    }

    fn axis_range(&self, len: usize) -> Range<usize> {
        self.part(len, self.group.rank())
    }

    fn sequence_parallel(&self) -> bool {
        self.sequence
    }

    fn gather_sequence(&self, x: &Tensor) -> Result<Tensor> {
        if !self.sequence {
            return Ok(x.clone());
        }
        let rows = x.shape()[0];
        let mut shape = x.shape().to_vec();
        shape[0] = rows * self.group.size();
        let all = self
            .group
            .all_gather(x.to_vec_f32())
            .map_err(comm_error("sequence-parallel all-gather"))?;
        let value = Tensor::from_f32(all, &shape)?.to_dtype(x.dtype());
        Ok(Tensor::from_op(
            value,
            &[x],
            ReduceScatterRows {
                group: self.group.clone(),
            },
        ))
    }

    fn lookup(&self, id: ParamId, stored: &Tensor) -> Result<Tensor> {
        let stored = &match &self.zero {
            Some(zero) => zero.lookup(id, stored)?,
            None => stored.clone(),
        };
        let replicated = self.sequence
            && self
                .by_id
                .lock()
                .is_ok_and(|s| s.get(id.0) == Some(&Split::Replicated));
        if !replicated {
            return Ok(stored.clone());
        }
        // Applied to this rank's rows only: the gradient is summed over the group.
        Ok(Tensor::from_op(
            stored.detach(),
            &[stored],
            AllReduceGradient {
                group: self.group.clone(),
            },
        ))
    }

    fn end_layer(&self, x: &Tensor) -> Result<Tensor> {
        match &self.zero {
            Some(zero) => zero.end_layer(x),
            None => Ok(x.clone()),
        }
    }

    fn enter_parallel(&self, x: &Tensor) -> Result<Tensor> {
        if self.sequence {
            // The region's input was gathered whole (`gather_sequence`), whose backward sums the
            // ranks' gradients.
            return Ok(x.clone());
        }
        Ok(Tensor::from_op(
            x.detach(),
            &[x],
            AllReduceGradient {
                group: self.group.clone(),
            },
        ))
    }

    fn reduce_parallel(&self, x: &Tensor) -> Result<Tensor> {
        if self.sequence {
            // Sum the partial outputs and keep this rank's rows: `[n, …]` → `[n/tp, d]`.
            let d = x.shape().last().copied().unwrap_or(1);
            let n = x.numel() / d.max(1);
            let tp = self.group.size();
            if !n.is_multiple_of(tp) {
                return Err(Error::Invalid {
                    op: "sequence parallelism",
                    reason: format!("{n} rows do not split over {tp} tensor-parallel ranks"),
                });
            }
            let mine = self
                .group
                .reduce_scatter(x.to_vec_f32(), Reduce::Sum)
                .map_err(comm_error("sequence-parallel reduce-scatter"))?;
            let value = Tensor::from_f32(mine, &[n / tp, d])?.to_dtype(x.dtype());
            return Ok(Tensor::from_op(
                value,
                &[x],
                AllGatherRows {
                    group: self.group.clone(),
                    shape: x.shape().to_vec(),
                },
            ));
        }
        let summed = self
            .group
            .all_reduce(x.to_vec_f32(), Reduce::Sum)
            .map_err(comm_error("tensor-parallel all-reduce"))?;
        let value = Tensor::from_f32(summed, x.shape())?.to_dtype(x.dtype());
        Ok(Tensor::from_op(value, &[x], PassGradient))
    }

    fn cross_entropy(
        &self,
        logits: &Tensor,
        targets: &[i64],
        opts: CrossEntropyOptions,
    ) -> Result<Tensor> {
        vocab_parallel_cross_entropy(self.group.as_ref(), logits, targets, opts)
    }

    /// A Mixture-of-Experts layer's experts split over the tensor-parallel group, the way a
    /// row-parallel layer splits its inputs: every rank routes the same tokens, runs the rows of
    /// its own experts, and the experts' outputs are summed over the group
    /// ([`ParallelContext::return_from_experts`]). With expert parallelism beside, the experts
    /// are first split over the expert-parallel group: rank t of the tensor-parallel group in
    /// expert-parallel rank j holds share `j·tp + t`.
    fn expert_parallel(&self) -> (usize, usize) {
        let (j, ep) = self
            .experts
            .as_ref()
            .map_or((0, 1), |e| (e.group().rank(), e.group().size()));
        let (t, tp) = (self.group.rank(), self.group.size());
        (j * tp + t, ep * tp)
    }

    /// The rows of this rank's expert-parallel share of the experts (exchanged by all-to-all),
    /// then of its own experts among those (`f`: the gradient of the whole rows summed over the
    /// tensor-parallel group, each rank having given its experts' rows theirs).
    fn dispatch_to_experts(&self, rows: &Tensor, counts: &[usize]) -> Result<(Tensor, Vec<usize>)> {
        let (rows, counts) = match &self.experts {
            Some(experts) => experts.dispatch_to_experts(rows, counts)?,
            None => (rows.clone(), counts.to_vec()),
        };
        if self.group.size() == 1 {
            return Ok((rows, counts));
        }
        if let Ok(mut last) = self.dispatched.lock() {
            *last = Some(counts.clone());
        }
        let rows = &rows;
        let (experts, offset, len) = self.my_experts(&counts);
        let rows = Tensor::from_op(
            rows.detach(),
            &[rows],
            AllReduceGradient {
                group: self.group.clone(),
            },
        );
        Ok((rows.narrow(0, offset, len)?, counts[experts].to_vec()))
    }

    /// This rank's experts' output rows in their places among every expert's (zeros elsewhere),
    /// summed over the tensor-parallel group (`g`); then sent back to the ranks whose tokens
    /// they are, with expert parallelism.
    fn return_from_experts(&self, rows: &Tensor, counts: &[usize]) -> Result<Tensor> {
        let summed = if self.group.size() == 1 {
            rows.clone()
        } else {
            let dispatched = self.dispatched.lock().ok().and_then(|mut d| d.take());
            self.sum_experts(rows, dispatched.as_deref().unwrap_or(counts))?
        };
        match &self.experts {
            Some(experts) => experts.return_from_experts(&summed, counts),
            None => Ok(summed),
        }
    }
}

impl ModelParallel {
    /// This rank's experts' output rows placed among the rows of every expert of `counts` (zeros
    /// elsewhere) and summed over the tensor-parallel group (`g`: identity backward).
    fn sum_experts(&self, rows: &Tensor, counts: &[usize]) -> Result<Tensor> {
        let (_, offset, len) = self.my_experts(counts);
        let total: usize = counts.iter().sum();
        let d = rows.shape().get(1).copied().unwrap_or(0);
        let before = Tensor::zeros(&[offset, d], rows.dtype());
        let after = Tensor::zeros(&[total - offset - len, d], rows.dtype());
        let parts: Vec<&Tensor> = [&before, rows, &after]
            .into_iter()
            .filter(|t| t.shape()[0] > 0)
            .collect();
        let placed = match parts.as_slice() {
            [] => Tensor::zeros(&[0, d], rows.dtype()),
            [one] => (*one).clone(),
            _ => Tensor::concat(&parts, 0)?,
        };
        let summed = self
            .group
            .all_reduce(placed.to_vec_f32(), Reduce::Sum)
            .map_err(comm_error("expert all-reduce"))?;
        let value = Tensor::from_f32(summed, placed.shape())?.to_dtype(rows.dtype());
        Ok(Tensor::from_op(value, &[&placed], PassGradient))
    }

    /// This rank's experts of a layer whose rows come grouped by expert, `counts[e]` for expert
    /// `e`: their indices, and where their rows start and how many there are.
    fn my_experts(&self, counts: &[usize]) -> (Range<usize>, usize, usize) {
        let (r, n) = (self.group.rank(), self.group.size());
        let e = counts.len();
        let experts = r * e / n..(r + 1) * e / n;
        let offset = counts[..experts.start].iter().sum();
        let len = counts[experts.clone()].iter().sum();
        (experts, offset, len)
    }
}

/// Megatron's `f` in backward: the gradient summed over the group.
struct AllReduceGradient {
    group: Arc<dyn Communicator>,
}

impl Backward for AllReduceGradient {
    fn name(&self) -> &'static str {
        "tensor_parallel_enter"
    }

    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let summed = self
            .group
            .all_reduce(grad.to_vec_f32(), Reduce::Sum)
            .map_err(comm_error("tensor-parallel all-reduce"))?;
        Ok(vec![Some(
            Tensor::from_f32(summed, grad.shape())?.to_dtype(grad.dtype()),
        )])
    }
}

/// The backward of a gather of rows: the whole gradient summed over the group, each rank keeping
/// its rows.
struct ReduceScatterRows {
    group: Arc<dyn Communicator>,
}

impl Backward for ReduceScatterRows {
    fn name(&self) -> &'static str {
        "sequence_parallel_gather"
    }

    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut shape = grad.shape().to_vec();
        shape[0] /= self.group.size();
        let mine = self
            .group
            .reduce_scatter(grad.to_vec_f32(), Reduce::Sum)
            .map_err(comm_error("sequence-parallel reduce-scatter"))?;
        Ok(vec![Some(
            Tensor::from_f32(mine, &shape)?.to_dtype(grad.dtype()),
        )])
    }
}

/// The backward of a reduce-scatter of rows: every rank's rows of the gradient gathered whole.
struct AllGatherRows {
    group: Arc<dyn Communicator>,
    shape: Vec<usize>,
}

impl Backward for AllGatherRows {
    fn name(&self) -> &'static str {
        "sequence_parallel_scatter"
    }

    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let all = self
            .group
            .all_gather(grad.to_vec_f32())
            .map_err(comm_error("sequence-parallel all-gather"))?;
        Ok(vec![Some(
            Tensor::from_f32(all, &self.shape)?.to_dtype(grad.dtype()),
        )])
    }
}

/// Megatron's `g` in backward: the gradient as it is.
struct PassGradient;

impl Backward for PassGradient {
    fn name(&self) -> &'static str {
        "tensor_parallel_reduce"
    }

    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(grad.clone())])
    }
}

/// The mean cross-entropy of logits split by vocabulary across `group` (Megatron-LM's
/// `vocab_parallel_cross_entropy`): `logits` `[N, V_r]` is this rank's slice, the ranks' slices
/// in rank order making up the vocabulary. One all-gather of each rank's row maxima (with its
/// slice's width) and one all-reduce of the sums of exponentials and the target logits (and, with
/// label smoothing, the logits' sums): 4·(N+1)·ranks and 8·N (12·N) bytes. The loss is
/// `lse − z_t` per row (with smoothing ε, `(1−ε)(lse − z_t) + ε(lse − mean z)`, Szegedy et al.
/// 2016), averaged over the rows whose target is not `ignore_index`.
pub fn vocab_parallel_cross_entropy(
    group: &dyn Communicator,
    logits: &Tensor,
    targets: &[i64],
    opts: CrossEntropyOptions,
) -> Result<Tensor> {
    let op = "vocab-parallel cross-entropy";
    if logits.rank() != 2 || logits.shape()[0] != targets.len() {
        return Err(Error::BadShape {
            op: "vocab_parallel_cross_entropy",
            shape: logits.shape().to_vec(),
            reason: format!("logits must be [N, V] with N = {} targets", targets.len()),
        });
    }
    let (rows, width) = (logits.shape()[0], logits.shape()[1]);
    let r = group.rank();
    let x = logits.to_vec_f32();
    let row = |i: usize| &x[i * width..(i + 1) * width];
    // Row maxima and this slice's width, gathered: every rank learns the global maxima, the
    // vocabulary's size and where its slice starts.
    let mut local: Vec<f32> = (0..rows)
        .map(|i| row(i).iter().copied().fold(f32::NEG_INFINITY, f32::max))
        .collect();
    local.push(width as f32);
    let gathered = group.all_gather(local).map_err(comm_error(op))?;
    let per_rank: Vec<&[f32]> = gathered.chunks(rows + 1).collect();
    let widths: Vec<usize> = per_rank.iter().map(|p| p[rows] as usize).collect();
    let (vocab, start) = (
        widths.iter().sum::<usize>(),
        widths[..r].iter().sum::<usize>(),
    );
    let max: Vec<f32> = (0..rows)
        .map(|i| {
            per_rank
                .iter()
                .map(|p| p[i])
                .fold(f32::NEG_INFINITY, f32::max)
        })
        .collect();
    if let Some(&bad) = targets
        .iter()
        .find(|&&t| t != opts.ignore_index && (t < 0 || t as usize >= vocab))
    {
        return Err(Error::IndexOutOfRange {
            op: "vocab_parallel_cross_entropy",
            index: bad,
            limit: vocab,
        });
    }
    let smoothing = opts.label_smoothing != 0.0;
    let terms = if smoothing { 3 } else { 2 };
    let mut sums = vec![0.0f32; terms * rows];
    for i in 0..rows {
        let z = row(i);
        sums[i] = z.iter().map(|&v| (v - max[i]).exp()).sum();
        let t = targets[i];
        if t != opts.ignore_index && (start..start + width).contains(&(t as usize)) {
            sums[rows + i] = z[t as usize - start];
        }
        if smoothing {
            sums[2 * rows + i] = z.iter().sum();
        }
    }
    let sums = group
        .all_reduce(sums, Reduce::Sum)
        .map_err(comm_error(op))?;
    let eps = opts.label_smoothing as f64;
    let lse: Vec<f32> = (0..rows).map(|i| max[i] + sums[i].ln()).collect();
    let mut total = 0.0f64;
    for i in 0..rows {
        if targets[i] == opts.ignore_index {
            continue;
        }
        let nll = (lse[i] - sums[rows + i]) as f64;
        total += if smoothing {
            let mean_nll = lse[i] as f64 - sums[2 * rows + i] as f64 / vocab as f64;
            (1.0 - eps) * nll + eps * mean_nll
        } else {
            nll
        };
    }
    let count = targets.iter().filter(|&&t| t != opts.ignore_index).count();
    let value = Tensor::scalar((total / count.max(1) as f64) as f32);
    Ok(Tensor::from_op(
        value,
        &[logits],
        VocabParallelCrossEntropyBackward {
            logits: x,
            shape: [rows, width],
            dtype: logits.dtype(),
            lse,
            targets: targets.to_vec(),
            opts,
            start,
            vocab,
            count,
        },
    ))
}

/// What the vocabulary-parallel cross-entropy's gradient needs: the slice's logits and the rows'
/// log-sum-exps over the whole vocabulary.
struct VocabParallelCrossEntropyBackward {
    logits: Vec<f32>,
    shape: [usize; 2],
    dtype: DType,
    lse: Vec<f32>,
    targets: Vec<i64>,
    opts: CrossEntropyOptions,
    start: usize,
    vocab: usize,
    count: usize,
}

impl Backward for VocabParallelCrossEntropyBackward {
    fn name(&self) -> &'static str {
        "vocab_parallel_cross_entropy"
    }

    /// dL/dz = (softmax(z) − (1−ε)·onehot(t) − ε/V)·g/count on every kept row, zero on ignored
    /// ones; each rank computes its slice's columns.
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let [rows, width] = self.shape;
        let scale = grad.item()? / self.count.max(1) as f32;
        let eps = self.opts.label_smoothing;
        let smooth = eps / self.vocab as f32;
        let mut dz = vec![0.0f32; rows * width];
        for i in 0..rows {
            let t = self.targets[i];
            if t == self.opts.ignore_index {
                continue;
            }
            let z = &self.logits[i * width..(i + 1) * width];
            let d = &mut dz[i * width..(i + 1) * width];
            for (o, &v) in d.iter_mut().zip(z) {
                *o = ((v - self.lse[i]).exp() - smooth) * scale;
            }
            let t = t as usize;
            if (self.start..self.start + width).contains(&t) {
                d[t - self.start] -= (1.0 - eps) * scale;
            }
        }
        Ok(vec![Some(
            Tensor::from_f32(dz, &self.shape)?.to_dtype(self.dtype),
        )])
    }
}
