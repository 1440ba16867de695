//! ZeRO stage 3 (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
//! Parameter Models", §5.3): the parameters themselves sharded over the data-parallel ranks. Each
//! rank stores an equal flat shard of every parameter (⌈numel/n⌉ elements, the last padded with
//! zeros); a layer's lookup of a parameter all-gathers the shards into the whole tensor, which
//! forward computes with and autograd keeps only until that layer's backward; the backward of
//! the gather reduce-scatters the whole gradient (averaged over the ranks) into the shard's. The
//! optimizer then updates each rank's shards alone, so parameters, gradients and optimizer state
//! all take 1/n of the memory, for about 1.5× data parallelism's traffic (an all-gather in
//! forward, one more for backward, and a reduce-scatter in backward, against an all-reduce's
//! reduce-scatter and all-gather).
//!
//! A block's gathered parameters are freed when its forward ends and gathered again for its
//! backward, so a rank holds one block's whole parameters at a time (PyTorch FSDP's
//! reshard-after-forward). With the blocks recomputed in backward (`model.checkpoint_blocks`)
//! the recomputation gathers them; otherwise autograd still holds the gathered tensors for the
//! block's backward, and [`ParallelContext::end_layer`] gives their memory back and gathers them
//! into the same tensors (one all-gather per block) when backward reaches the block's end. The
//! gather of the next parameter in lookup order starts as soon as the current one has arrived
//! (prefetch), overlapping it with the layer's compute.

use crate::{comm_error, Communicator, Handle, Reduce};
use anneal_nn::layers::{ParallelContext, Split};
use anneal_tensor::autograd::Backward;
use anneal_tensor::storage::Storage;
use anneal_tensor::{Error, ParamId, Result, Tensor};
use std::sync::{Arc, Mutex, Weak};

/// A parameter's whole value gathered in a step: the parameter, its elements, and the storage
/// its value lives in (while autograd holds it).
struct Gathered {
    index: usize,
    numel: usize,
    storage: Weak<Storage>,
}

/// Parameters sharded over a group of ranks, gathered at each lookup.
pub struct ZeroThree {
    group: Arc<dyn Communicator>,
    /// Each parameter's name and whole shape, in declaration order (its [`ParamId`]).
    params: Mutex<Vec<(String, Vec<usize>)>>,
    /// The gather started ahead for the parameter that was looked up after the current one the
    /// last time (lookups repeat their order every forward).
    prefetch: Mutex<Prefetch>,
    /// The parameters gathered in a step since the last layer ended, which the end of the layer
    /// frees.
    layer: Mutex<Vec<Gathered>>,
}

#[derive(Default)]
struct Prefetch {
    /// The parameters the last step looked up, in order.
    previous: Vec<usize>,
    /// The parameters this step has looked up so far, in order.
    current: Vec<usize>,
    /// Whether this step has followed the last one's order so far (gathers are started ahead
    /// only while it does).
    on_track: bool,
    /// A gather in flight: the parameter and the pending all-gather.
    pending: Option<(usize, Handle<Vec<f32>>)>,
    /// The store's tensors (this rank's shards), to start a gather ahead from.
    shards: Option<Arc<Vec<Tensor>>>,
    /// Lookups in steps, and those whose gather had been started ahead.
    lookups: usize,
    hits: usize,
}

impl ZeroThree {
    /// Parameters sharded over the ranks of `group`.
    pub fn new(group: Arc<dyn Communicator>) -> ZeroThree {
        ZeroThree {
            group: crate::Timed::wrap(group),
            params: Mutex::new(Vec::new()),
            prefetch: Mutex::new(Prefetch::default()),
            layer: Mutex::new(Vec::new()),
        }
    }

    /// The sharding group.
    pub fn group(&self) -> &Arc<dyn Communicator> {
        &self.group
    }

    /// The length of every shard of a parameter of `numel` elements.
    fn shard_len(&self, numel: usize) -> usize {
        numel.div_ceil(self.group.size())
    }

    fn shape_of(&self, index: usize) -> Result<Vec<usize>> {
        let params = self.params.lock().map_err(|_| poisoned())?;
        params
            .get(index)
            .map(|(_, s)| s.clone())
            .ok_or_else(|| Error::Invalid {
                op: "ZeRO-3 lookup",
                reason: format!("parameter {index} was never declared"),
            })
    }

    /// The whole values of a parameter from every rank's shard (padding dropped).
    fn gathered(&self, all: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        let mut all = all;
        all.truncate(numel);
        Tensor::from_f32(all, shape)
    }

    /// The whole parameter `index` from this rank's shard `stored`: the gather started ahead
    /// for it, or a gather now. Then, while this step looks parameters up in the last step's
    /// order, starts the gather of the next one in that order. The decisions depend on the order
    /// of lookups alone, the same on every rank, so the ranks' collectives stay matched; a step
    /// that repeats the last one's order (every step of a run but the first) gathers each
    /// parameter once per lookup, as without prefetching. Also says whether a step is under way.
    fn gather_whole(&self, index: usize, stored: &Tensor) -> Result<(Vec<f32>, bool)> {
        let mut pf = self.prefetch.lock().map_err(|_| poisoned())?;
        let ready = match pf.pending.take() {
            Some((i, handle)) if i == index => {
                pf.hits += 1;
                Some(handle.wait().map_err(comm_error("ZeRO-3 gather"))?)
            }
            // A miss (the order of lookups changed) is completed and dropped.
            Some((_, handle)) => {
                handle.wait().map_err(comm_error("ZeRO-3 gather"))?;
                None
            }
            None => None,
        };
        let all = match ready {
            Some(all) => all,
            None => self
                .group
                .all_gather(stored.to_vec_f32())
                .map_err(comm_error("ZeRO-3 gather"))?,
        };
        if pf.shards.is_none() {
            // Outside a step (evaluation): nothing is recorded or started ahead.
            return Ok((all, false));
        }
        pf.lookups += 1;
        let j = pf.current.len();
        pf.current.push(index);
        pf.on_track = pf.on_track && pf.previous.get(j) == Some(&index);
        let ahead = match pf.previous.get(j + 1) {
            Some(&next) if pf.on_track => pf
                .shards
                .as_ref()
                .and_then(|s| s.get(next))
                .map(|t| (next, t.to_vec_f32())),
            _ => None,
        };
        if let Some((next, values)) = ahead {
            let handle = self
                .group
                .all_gather_start(values)
                .map_err(comm_error("ZeRO-3 prefetch"))?;
            pf.pending = Some((next, handle));
        }
        Ok((all, true))
    }

    /// Starts a step whose lookups read this rank's shards from `shards` (the store's tensors):
    /// from here gathers are started ahead of their lookups.
    pub fn begin_step(&self, shards: Arc<Vec<Tensor>>) -> Result<()> {
        self.layer.lock().map_err(|_| poisoned())?.clear();
        let mut pf = self.prefetch.lock().map_err(|_| poisoned())?;
        pf.shards = Some(shards);
        pf.previous = std::mem::take(&mut pf.current);
        pf.on_track = true;
        Ok(())
    }

    /// Lookups made in steps so far, and how many of them found their gather started ahead.
    pub fn prefetched(&self) -> (usize, usize) {
        self.prefetch
            .lock()
            .map_or((0, 0), |pf| (pf.lookups, pf.hits))
    }

    /// Ends a step before the optimizer changes the shards: completes and drops any gather
    /// started ahead (every rank started it, so every rank completes it).
    pub fn end_step(&self) -> Result<()> {
        self.layer.lock().map_err(|_| poisoned())?.clear();
        let pending = {
            let mut pf = self.prefetch.lock().map_err(|_| poisoned())?;
            pf.shards = None;
            pf.pending.take()
        };
        if let Some((_, handle)) = pending {
            handle.wait().map_err(comm_error("ZeRO-3 prefetch"))?;
        }
        Ok(())
    }
}

fn poisoned() -> Error {
    Error::Invalid {
        op: "ZeRO-3",
        reason: "a rank's thread panicked while holding the parameter table".into(),
    }
}

impl ParallelContext for ZeroThree {
    fn shard(&self, name: &str, full: &Tensor, split: Split) -> Result<Tensor> {
        let _ = split;
        let (r, len) = (self.group.rank(), self.shard_len(full.numel()));
        let values = full.to_vec_f32();
        let from = (r * len).min(values.len());
        let to = ((r + 1) * len).min(values.len());
        let mut mine = values[from..to].to_vec();
        mine.resize(len, 0.0);
        let mut params = self.params.lock().map_err(|_| poisoned())?;
        match params.iter().position(|(n, _)| n == name) {
            Some(i) => params[i].1 = full.shape().to_vec(),
            None => params.push((name.to_string(), full.shape().to_vec())),
        }
        Ok(Tensor::from_f32(mine, &[len])?.to_dtype(full.dtype()))
    }

    fn gather(&self, name: &str, local: &Tensor) -> Result<Tensor> {
        let shape = self.whole_shape(name, local.shape());
        let all = self
            .group
            .all_gather(local.to_vec_f32())
            .map_err(comm_error("ZeRO-3 gather"))?;
        Ok(self.gathered(all, &shape)?.to_dtype(local.dtype()))
    }

    fn splits_parameters(&self) -> bool {
        true
    }

    fn whole_shape(&self, name: &str, local: &[usize]) -> Vec<usize> {
        self.params
            .lock()
            .ok()
            .and_then(|p| p.iter().find(|(n, _)| n == name).map(|(_, s)| s.clone()))
            .unwrap_or_else(|| local.to_vec())
    }

    fn lookup(&self, id: ParamId, stored: &Tensor) -> Result<Tensor> {
        let shape = self.shape_of(id.0)?;
        let (all, in_step) = self.gather_whole(id.0, stored)?;
        let value = self.gathered(all, &shape)?.to_dtype(stored.dtype());
        if in_step && anneal_tensor::is_grad_enabled() {
            let mut layer = self.layer.lock().map_err(|_| poisoned())?;
            layer.push(Gathered {
                index: id.0,
                numel: value.numel(),
                storage: Arc::downgrade(value.storage()),
            });
        }
        Ok(Tensor::from_op(
            value,
            &[stored],
            ReduceScatterGradient {
                group: self.group.clone(),
                shard: stored.numel(),
            },
        ))
    }

    /// Frees the whole values the layer gathered that autograd still holds for its backward,
    /// and returns `x` through an op whose backward gathers them again (one all-gather of the
    /// layer's shards together) before the layer's backward runs.
    fn end_layer(&self, x: &Tensor) -> Result<Tensor> {
        let gathered = std::mem::take(&mut *self.layer.lock().map_err(|_| poisoned())?);
        let shards = self.prefetch.lock().map_err(|_| poisoned())?.shards.clone();
        let (Some(shards), true) = (shards, x.requires_grad()) else {
            return Ok(x.clone());
        };
        let released: Vec<Gathered> = gathered
            .into_iter()
            .filter(|g| g.storage.upgrade().is_some_and(|s| s.release_values()))
            .collect();
        if released.is_empty() {
            return Ok(x.clone());
        }
        Ok(Tensor::from_op(
            x.detach(),
            &[x],
            Regather {
                group: self.group.clone(),
                released,
                shards,
            },
        ))
    }
}

/// The backward of a layer's end: the parameters freed after its forward, gathered again (while
/// autograd still holds them, as every rank does alike) before the layer's backward; the
/// gradient passes through.
struct Regather {
    group: Arc<dyn Communicator>,
    released: Vec<Gathered>,
    shards: Arc<Vec<Tensor>>,
}

impl Backward for Regather {
    fn name(&self) -> &'static str {
        "zero3_regather"
    }

    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let alive: Vec<(&Gathered, Arc<Storage>)> = self
            .released
            .iter()
            .filter_map(|g| g.storage.upgrade().map(|s| (g, s)))
            .collect();
        let mine: Vec<f32> = alive
            .iter()
            .flat_map(|(g, _)| self.shards[g.index].to_vec_f32())
            .collect();
        let chunk = mine.len();
        let all = self
            .group
            .all_gather(mine)
            .map_err(comm_error("ZeRO-3 gather in backward"))?;
        let mut at = 0;
        for (g, storage) in &alive {
            let len = self.shards[g.index].numel();
            let mut whole: Vec<f32> = all
                .chunks(chunk.max(1))
                .take(self.group.size())
                .flat_map(|c| c[at..at + len].iter().copied())
                .collect();
            whole.truncate(g.numel);
            storage.restore_values(whole)?;
            at += len;
        }
        Ok(vec![Some(grad.clone())])
    }
}

/// The gather's backward: the whole gradient, averaged over the ranks, cut into their shards.
struct ReduceScatterGradient {
    group: Arc<dyn Communicator>,
    shard: usize,
}

impl Backward for ReduceScatterGradient {
    fn name(&self) -> &'static str {
        "zero3_gather"
    }

    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut values = grad.to_vec_f32();
        values.resize(self.shard * self.group.size(), 0.0);
        let mine = self
            .group
            .reduce_scatter(values, Reduce::Mean)
            .map_err(comm_error("ZeRO-3 reduce-scatter"))?;
        Ok(vec![Some(Tensor::from_f32(mine, &[self.shard])?)])
    }
}
