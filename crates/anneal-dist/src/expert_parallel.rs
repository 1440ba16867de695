//! Expert parallelism (Lepikhin et al. 2020, "GShard", §2.2; Fedus et al. 2021, "Switch
//! Transformers", §2.2): the experts of every Mixture-of-Experts layer split over the ranks of an
//! expert-parallel group, each rank holding `experts / ep` consecutive experts. Each rank routes
//! its own tokens; the rows the router sends to each expert travel to the rank holding it by an
//! all-to-all, the experts' outputs come back by the reverse all-to-all, and the gradients take
//! the same two exchanges the other way. Everything else in the model is replicated.
//!
//! The experts a rank holds see the tokens of every rank of its group, so their gradients are
//! sums over the group; a strategy then reduces them over the expert-data-parallel group (the
//! ranks holding the same experts), the replicated parameters' over every data rank.

use crate::{comm_error, Communicator};
use anneal_nn::layers::{ParallelContext, Split};
use anneal_tensor::autograd::Backward;
use anneal_tensor::{DType, Error, Result, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The expert-parallel context of one rank.
pub struct ExpertParallel {
    group: Arc<dyn Communicator>,
    /// Whole shapes of the expert parameters this rank holds a share of, by name.
    experts: Mutex<HashMap<String, Vec<usize>>>,
    /// The plan of the last dispatch, which the return that follows it reuses (every rank
    /// makes the same calls in the same order, so every rank reuses it alike).
    dispatched: Mutex<Option<Plan>>,
}

/// How rows move in one direction of an exchange: for each rank of the group, how many rows of
/// each of the layer's experts it routed.
#[derive(Clone)]
struct Plan {
    /// `counts[i][e]`: rows rank i routed to expert e.
    counts: Vec<Vec<usize>>,
    /// Experts per rank.
    local: usize,
    /// This rank.
    me: usize,
    /// Row width.
    width: usize,
}

impl Plan {
    /// Rank `i`'s rows for rank `j`'s experts: how many.
    fn rows_for(&self, i: usize, j: usize) -> usize {
        self.counts[i][j * self.local..(j + 1) * self.local]
            .iter()
            .sum()
    }

    /// This rank's rows (grouped by expert, in expert order) cut into one chunk per rank: the
    /// rows for that rank's experts.
    fn chunks_out(&self, rows: &[f32]) -> Vec<Vec<f32>> {
        let n = self.counts.len();
        let mut at = 0;
        (0..n)
            .map(|j| {
                let len = self.rows_for(self.me, j) * self.width;
                let chunk = rows[at..at + len].to_vec();
                at += len;
                chunk
            })
            .collect()
    }

    /// The chunks received (rank i's rows for this rank's experts, grouped by expert) laid out
    /// grouped by local expert: expert 0's rows from every rank in rank order, then expert 1's…
    fn by_expert(&self, received: &[Vec<f32>]) -> Vec<f32> {
        let mut out = Vec::new();
        let mut offsets = vec![0usize; received.len()];
        for l in 0..self.local {
            for (i, chunk) in received.iter().enumerate() {
                let len = self.counts[i][self.me * self.local + l] * self.width;
                out.extend_from_slice(&chunk[offsets[i]..offsets[i] + len]);
                offsets[i] += len;
            }
        }
        out
    }

    /// The reverse of [`Plan::by_expert`]: rows grouped by local expert cut back into one chunk
    /// per rank (its rows, grouped by expert).
    fn by_rank(&self, rows: &[f32]) -> Vec<Vec<f32>> {
        let n = self.counts.len();
        let mut chunks = vec![Vec::new(); n];
        let mut at = 0;
        for l in 0..self.local {
            for (i, chunk) in chunks.iter_mut().enumerate() {
                let len = self.counts[i][self.me * self.local + l] * self.width;
                chunk.extend_from_slice(&rows[at..at + len]);
                at += len;
            }
        }
        chunks
    }

    /// Rows this rank's experts receive, per local expert.
    fn local_counts(&self) -> Vec<usize> {
        (0..self.local)
            .map(|l| {
                self.counts
                    .iter()
                    .map(|c| c[self.me * self.local + l])
                    .sum()
            })
            .collect()
    }

    /// Rows this rank's experts receive in all.
    fn received_rows(&self) -> usize {
        self.local_counts().iter().sum()
    }
}

impl ExpertParallel {
    /// The context of this rank of `group` (the ranks that split each layer's experts).
    pub fn new(group: Arc<dyn Communicator>) -> ExpertParallel {
        ExpertParallel {
            group: crate::Timed::wrap(group),
            experts: Mutex::new(HashMap::new()),
            dispatched: Mutex::new(None),
        }
    }

    /// The expert-parallel group.
    pub fn group(&self) -> &Arc<dyn Communicator> {
        &self.group
    }

    /// Every rank's routing counts, and how rows of `width` values move.
    fn plan(&self, counts: &[usize], width: usize) -> Result<Plan> {
        let n = self.group.size();
        if !counts.len().is_multiple_of(n) {
            return Err(Error::Invalid {
                op: "expert parallelism",
                reason: format!("{} experts do not divide over {n} ranks", counts.len()),
            });
        }
        let mine: Vec<f32> = counts.iter().map(|&c| c as f32).collect();
        let all = self
            .group
            .all_gather(mine)
            .map_err(comm_error("expert-parallel counts"))?;
        Ok(Plan {
            counts: all
                .chunks(counts.len())
                .map(|c| c.iter().map(|&v| v as usize).collect())
                .collect(),
            local: counts.len() / n,
            me: self.group.rank(),
            width,
        })
    }

    /// Sends this rank's rows (grouped by expert) to the experts' ranks: the rows received,
    /// grouped by local expert.
    fn forward_exchange(&self, plan: &Plan, rows: &[f32]) -> Result<Vec<f32>> {
        let received = self
            .group
            .all_to_all(plan.chunks_out(rows))
            .map_err(comm_error("expert-parallel all-to-all"))?;
        Ok(plan.by_expert(&received))
    }

    /// Sends rows grouped by local expert back to the ranks they came from: this rank's rows,
    /// grouped by expert.
    fn reverse_exchange(&self, plan: &Plan, rows: &[f32]) -> Result<Vec<f32>> {
        let received = self
            .group
            .all_to_all(plan.by_rank(rows))
            .map_err(comm_error("expert-parallel all-to-all"))?;
        Ok(received.concat())
    }
}

impl ParallelContext for ExpertParallel {
    fn expert_parallel(&self) -> (usize, usize) {
        (self.group.rank(), self.group.size())
    }

    fn shard(&self, name: &str, full: &Tensor, split: Split) -> Result<Tensor> {
        if split != Split::Experts {
            return Ok(full.clone());
        }
        let (r, n) = (self.group.rank(), self.group.size());
        let e = full.shape()[0];
        if !e.is_multiple_of(n) {
            return Err(Error::Invalid {
                op: "expert-parallel shard",
                reason: format!("{name}: {e} experts do not divide over {n} ranks"),
            });
        }
        if let Ok(mut experts) = self.experts.lock() {
            experts.insert(name.to_string(), full.shape().to_vec());
        }
        Ok(full.narrow(0, r * e / n, e / n)?.contiguous())
    }

    fn gather(&self, name: &str, local: &Tensor) -> Result<Tensor> {
        let Some(shape) = self.experts.lock().ok().and_then(|e| e.get(name).cloned()) else {
            return Ok(local.clone());
        };
        let all = self
            .group
            .all_gather(local.to_vec_f32())
            .map_err(comm_error("expert-parallel gather"))?;
        Ok(Tensor::from_f32(all, &shape)?.to_dtype(local.dtype()))
    }

    fn whole_shape(&self, name: &str, local: &[usize]) -> Vec<usize> {
        self.experts
            .lock()
            .ok()
            .and_then(|e| e.get(name).cloned())
            .unwrap_or_else(|| local.to_vec())
    }

    fn split_of(&self, name: &str) -> Split {
        let held = self.experts.lock().is_ok_and(|e| e.contains_key(name));
        if held {
            Split::Experts
        } else {
            Split::Replicated
        }
    }

    fn splits_parameters(&self) -> bool {
        true
    }

    fn sum_over_experts(&self, values: Vec<f32>) -> Result<Vec<f32>> {
        self.group
            .all_reduce(values, crate::Reduce::Sum)
            .map_err(comm_error("expert-parallel all-reduce"))
    }

    fn dispatch_to_experts(&self, rows: &Tensor, counts: &[usize]) -> Result<(Tensor, Vec<usize>)> {
        let width = rows.shape().get(1).copied().unwrap_or(0);
        let plan = self.plan(counts, width)?;
        if let Ok(mut last) = self.dispatched.lock() {
            *last = Some(plan.clone());
        }
        let out = self.forward_exchange(&plan, &rows.to_vec_f32())?;
        let value = Tensor::from_f32(out, &[plan.received_rows(), width])?.to_dtype(rows.dtype());
        let local = plan.local_counts();
        let op = Exchange {
            context: self.group.clone(),
            plan,
            forward: true,
            dtype: rows.dtype(),
            rows: rows.shape()[0],
        };
        Ok((Tensor::from_op(value, &[rows], op), local))
    }

    fn return_from_experts(&self, rows: &Tensor, counts: &[usize]) -> Result<Tensor> {
        let width = rows.shape().get(1).copied().unwrap_or(0);
        // The dispatch just before, with this rank's same counts: its plan, without gathering
        // the counts again.
        let last = self.dispatched.lock().ok().and_then(|mut l| l.take());
        let plan = match last {
            Some(p) if p.counts.get(p.me).map(Vec::as_slice) == Some(counts) => Plan { width, ..p },
            _ => self.plan(counts, width)?,
        };
        let mine: usize = counts.iter().sum();
        let out = self.reverse_exchange(&plan, &rows.to_vec_f32())?;
        let value = Tensor::from_f32(out, &[mine, width])?.to_dtype(rows.dtype());
        let op = Exchange {
            context: self.group.clone(),
            plan,
            forward: false,
            dtype: rows.dtype(),
            rows: rows.shape()[0],
        };
        Ok(Tensor::from_op(value, &[rows], op))
    }
}

/// The backward of an exchange: the gradients take the other direction.
struct Exchange {
    context: Arc<dyn Communicator>,
    plan: Plan,
    /// Whether the op was the dispatch (its backward is then the return).
    forward: bool,
    dtype: DType,
    /// Rows of the op's input.
    rows: usize,
}

impl Backward for Exchange {
    fn name(&self) -> &'static str {
        if self.forward {
            "expert_dispatch"
        } else {
            "expert_return"
        }
    }

    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let g = grad.to_vec_f32();
        let exchanged = if self.forward {
            self.context
                .all_to_all(self.plan.by_rank(&g))
                .map(|r| r.concat())
        } else {
            self.context
                .all_to_all(self.plan.chunks_out(&g))
                .map(|r| self.plan.by_expert(&r))
        }
        .map_err(comm_error("expert-parallel all-to-all"))?;
        Ok(vec![Some(
            Tensor::from_f32(exchanged, &[self.rows, self.plan.width])?.to_dtype(self.dtype),
        )])
    }
}
