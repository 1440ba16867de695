//! The mesh of a job's ranks: data (`dp × sharding`), tensor (`tp`) and pipeline (`pp`)
//! parallelism, ordered as Megatron-LM orders them, tensor parallelism fastest. Rank r is
//! tensor-parallel rank `r % tp` of data rank `r / tp % D` (D = dp·sharding) in pipeline stage
//! `r / (tp·D)`. Each dimension gets its process group, split from the world:
//!
//! - the tensor-parallel group: the `tp` ranks of one data rank and stage, splitting each layer;
//! - the data group: the `D` ranks of one tensor-parallel rank and stage, running different rows;
//! - the pipeline group: the `pp` ranks of one data rank and tensor-parallel rank, one per stage;
//! - the embedding group: the first and last stage of a pipeline group, which both hold a tied
//!   token embedding.
//!
//! [`WithModelParallel`] wraps the strategy of a split model: its checkpoints gather whole
//! parameters and optimizer state from the tensor-parallel slices and the pipeline's stages, and
//! cut them back into slices on restore, so a checkpoint is the same whatever the layout.

use crate::config::Layout;
use crate::model::TrainModel;
use crate::objectives::Objective;
use crate::strategy::{NamedState, StepOutput, StepSettings, Strategy};
use anneal_data::Batch;
use anneal_dist::{Communicator, ModelParallel};
use anneal_nn::layers::ParallelContext;
use anneal_tensor::{DropoutKey, Optimizer, Tensor};
use anyhow::{bail, Result};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

/// Tag of the parameters and state a pipeline's stages send to its first.
const TAG_GATHER: u32 = 0x6a7e;

/// This rank's process groups.
pub struct Mesh {
    /// The data group: the ranks holding the same part of the model (the whole world without
    /// model parallelism).
    pub data: Box<dyn Communicator>,
    /// The tensor-parallel group (one rank without tensor parallelism), when the model is split.
    pub tensor: Option<Arc<dyn Communicator>>,
    /// The pipeline group (stage s is rank s), with pipeline parallelism.
    pub pipeline: Option<Arc<dyn Communicator>>,
    /// The first and last stage of the pipeline group (on those two ranks only).
    pub embedding: Option<Box<dyn Communicator>>,
}

impl Mesh {
    /// Splits `world` as `layout` lays it out (collective). Without model parallelism the world
    /// is the data group.
    pub fn split(world: Box<dyn Communicator>, layout: &Layout) -> Result<Mesh> {
        let (tp, pp) = (layout.tp, layout.pp);
        if tp * pp == 1 {
            return Ok(Mesh {
                data: world,
                tensor: None,
                pipeline: None,
                embedding: None,
            });
        }
        if world.size() != layout.ranks() {
            bail!(
                "the layout dp = {} × sharding = {} × tp = {tp} × pp = {pp} needs {} ranks, not \
                 the job's {}",
                layout.dp,
                layout.sharding,
                layout.ranks(),
                world.size()
            );
        }
        let r = world.rank();
        let data_ranks = layout.data_ranks();
        let (t, d, s) = (r % tp, r / tp % data_ranks, r / (tp * data_ranks));
        let tensor: Arc<dyn Communicator> = Arc::from(world.split(r / tp, t)?);
        let data = world.split(s * tp + t, d)?;
        let (pipeline, embedding) = if pp > 1 {
            let pipe: Arc<dyn Communicator> = Arc::from(world.split(d * tp + t, s)?);
            let ends = s == 0 || s == pp - 1;
            let group = pipe.split(usize::from(!ends), s)?;
            (Some(pipe), ends.then_some(group))
        } else {
            (None, None)
        };
        Ok(Mesh {
            data,
            tensor: Some(tensor),
            pipeline,
            embedding,
        })
    }

    /// This rank's pipeline stage (0 without a pipeline).
    pub fn stage(&self) -> usize {
        self.pipeline.as_ref().map_or(0, |p| p.rank())
    }
}

/// The layers of each of the `blocks.len()` stages of a model of `blocks.iter().sum() + 2`
/// layers (embedding, blocks, head): stage s runs its blocks, the first the embedding before
/// them, the last the head after them.
pub fn stage_layers(blocks: &[usize]) -> Vec<Range<usize>> {
    let mut start = 0;
    let last = blocks.len().saturating_sub(1);
    (0..blocks.len())
        .map(|s| {
            let from = if s == 0 { 0 } else { start };
            let to = 1 + blocks[..=s].iter().sum::<usize>() + usize::from(s == last);
            start = to;
            from..to
        })
        .collect()
}

/// A split model's strategy: `inner` runs the steps; this gathers and cuts checkpoints.
pub struct WithModelParallel {
    inner: Box<dyn Strategy>,
    parallel: Arc<dyn ParallelContext>,
    /// The group whose first rank gathers the parameters whole (the tensor-parallel group, the
    /// ZeRO-3 sharding group).
    group: Arc<dyn Communicator>,
    pipeline: Option<Arc<dyn Communicator>>,
    /// A group of data ranks whose first rank's replica writes, when `parallel`'s gathers span
    /// data ranks too (experts split over them, ZeRO-3 shards).
    lead: Option<Arc<dyn Communicator>>,
}

impl WithModelParallel {
    /// `inner` on a model split by `parallel` across `group` (and cut into the stages of
    /// `pipeline`).
    pub fn new(
        inner: Box<dyn Strategy>,
        parallel: Arc<dyn ParallelContext>,
        group: Arc<dyn Communicator>,
        pipeline: Option<Arc<dyn Communicator>>,
    ) -> Self {
        WithModelParallel {
            inner,
            parallel,
            group,
            pipeline,
            lead: None,
        }
    }

    /// With `parallel` gathering over the data ranks of `lead` too (experts split over them,
    /// ZeRO-3 shards): its first rank writes the checkpoints the group gathers.
    pub fn with_lead_group(mut self, lead: Arc<dyn Communicator>) -> Self {
        self.lead = Some(lead);
        self
    }

    /// `inner` on a model split by a [`ModelParallel`] context.
    pub fn model_parallel(
        inner: Box<dyn Strategy>,
        parallel: Arc<ModelParallel>,
        pipeline: Option<Arc<dyn Communicator>>,
    ) -> Self {
        let group = parallel.group().clone();
        WithModelParallel::new(inner, parallel, group, pipeline)
    }

    /// Whether this rank writes checkpoints for its model replica: the first rank of its group
    /// in the first stage (and of its lead group).
    fn is_writer(&self) -> bool {
        self.group.rank() == 0
            && self.pipeline.as_ref().is_none_or(|p| p.rank() == 0)
            && self.lead.as_ref().is_none_or(|e| e.rank() == 0)
    }

    /// For every name of `names`, the first pipeline stage that holds it (collective over the
    /// pipeline group).
    fn owners(&self, names: &[String]) -> Result<Vec<usize>> {
        let Some(pipe) = &self.pipeline else {
            return Ok(vec![0; names.len()]);
        };
        let mine: Vec<f32> = names
            .iter()
            .map(|n| f32::from(u8::from(self.parallel.holds(n))))
            .collect();
        let all = pipe.all_gather(mine)?;
        Ok((0..names.len())
            .map(|i| {
                (0..pipe.size())
                    .find(|&s| all[s * names.len() + i] > 0.0)
                    .unwrap_or(0)
            })
            .collect())
    }

    /// `tensors` (whole on this rank where it holds them: `(name, values)`) collected on the
    /// first stage from the stages that own them (collective over the pipeline group).
    fn collect(&self, tensors: Vec<(String, Vec<f32>)>) -> Result<Vec<(String, Vec<f32>)>> {
        let Some(pipe) = &self.pipeline else {
            return Ok(tensors);
        };
        let names: Vec<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
        let owners = self.owners(&names)?;
        let stage = pipe.rank();
        let mut out = Vec::with_capacity(tensors.len());
        for ((name, values), owner) in tensors.into_iter().zip(owners) {
            if owner == 0 {
                out.push((name, values));
            } else if stage == owner {
                pipe.send(values, 0, TAG_GATHER)?;
                out.push((name, Vec::new()));
            } else if stage == 0 {
                out.push((name, pipe.recv(owner, TAG_GATHER)?));
            } else {
                out.push((name, Vec::new()));
            }
        }
        Ok(out)
    }
}

/// Each trainable parameter's name, shape and place in state order.
fn state_parts(model: &dyn TrainModel) -> Vec<(String, Vec<usize>, Range<usize>)> {
    let params = model.params();
    params
        .trainable_ranges()
        .map(|(info, _, state)| (info.name.clone(), info.shape.clone(), state))
        .collect()
}

impl Strategy for WithModelParallel {
    fn describe(&self) -> String {
        let tp = self.parallel.tensor_parallel().1;
        if tp > 1 {
            format!(
                "tensor parallel over {tp} ranks × {}",
                self.inner.describe()
            )
        } else {
            self.inner.describe()
        }
    }

    fn step(
        &mut self,
        model: &dyn TrainModel,
        objective: &mut dyn Objective,
        optimizer: &mut dyn Optimizer,
        micro_batches: &[Batch],
        dropout: &[DropoutKey],
        settings: StepSettings,
        after_forward: &mut dyn FnMut(),
    ) -> Result<StepOutput> {
        // The communication inside forward and backward (split layers' collectives, a
        // pipeline's receives, ZeRO-3's gathers, experts' all-to-alls) is exposed: nothing hides
        // it yet.
        let before = anneal_dist::waited();
        let mut out = self.inner.step(
            model,
            objective,
            optimizer,
            micro_batches,
            dropout,
            settings,
            after_forward,
        )?;
        out.exposed_comm += anneal_dist::waited() - before;
        Ok(out)
    }

    fn evaluate(
        &self,
        model: &dyn TrainModel,
        windows: &anneal_data::TokenWindows,
    ) -> Result<Option<f64>> {
        self.inner.evaluate(model, windows)
    }

    /// The inner strategy's state on the ranks of the first replica (their slices of their
    /// stages), gathered parameter by parameter into the whole model's state order.
    fn gather_optimizer_state(
        &self,
        model: &dyn TrainModel,
        optimizer: &dyn Optimizer,
    ) -> Result<Option<NamedState>> {
        let Some(state) = self.inner.gather_optimizer_state(model, optimizer)? else {
            return Ok(None);
        };
        let (parts, total) = (state_parts(model), model.params().trainable_numel());
        let mut whole = Vec::with_capacity(state.len());
        for (name, values) in state {
            if values.len() != total {
                whole.push((name, values));
                continue;
            }
            let mut pieces = Vec::with_capacity(parts.len());
            for (param, shape, range) in &parts {
                let local = Tensor::from_f32(values[range.clone()].to_vec(), shape)?;
                pieces.push((
                    param.clone(),
                    self.parallel.gather(param, &local)?.to_vec_f32(),
                ));
            }
            let out = self
                .collect(pieces)?
                .into_iter()
                .flat_map(|(_, v)| v)
                .collect();
            whole.push((name, out));
        }
        Ok(self.is_writer().then_some(whole))
    }

    fn optimizer_shard(&self, model: &dyn TrainModel) -> Range<usize> {
        self.inner.optimizer_shard(model)
    }

    fn gather_parameters(&self, model: &dyn TrainModel) -> Result<Option<Vec<(String, Tensor)>>> {
        let mut shapes = HashMap::new();
        let mut pieces = Vec::new();
        for (name, t) in model.params().named() {
            shapes.insert(name.clone(), self.parallel.whole_shape(&name, t.shape()));
            pieces.push((name.clone(), self.parallel.gather(&name, &t)?.to_vec_f32()));
        }
        let dtype = model.params().dtype();
        let whole = self
            .collect(pieces)?
            .into_iter()
            .map(|(name, values)| {
                let t = Tensor::from_f32(values, &shapes[&name])?.to_dtype(dtype);
                Ok((name, t))
            })
            .collect::<Result<Vec<_>>>();
        Ok(if self.is_writer() { Some(whole?) } else { None })
    }

    /// Cuts each whole state vector (the whole model's state order) into this rank's slices of
    /// its stage's parameters, then hands them to the inner strategy.
    fn restore_optimizer_state(
        &self,
        model: &dyn TrainModel,
        optimizer: &mut dyn Optimizer,
        steps: u64,
        state: &HashMap<String, Vec<f32>>,
    ) -> Result<()> {
        let parts = state_parts(model);
        let shapes: Vec<Vec<usize>> = parts
            .iter()
            .map(|(name, local, _)| self.parallel.whole_shape(name, local))
            .collect();
        let whole_len: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
        let mut mine = HashMap::new();
        for (name, values) in state {
            if values.len() != whole_len {
                mine.insert(name.clone(), values.clone());
                continue;
            }
            let mut out = Vec::with_capacity(model.params().trainable_numel());
            let mut at = 0;
            for ((param, _, _), shape) in parts.iter().zip(&shapes) {
                let n: usize = shape.iter().product();
                let whole = Tensor::from_f32(values[at..at + n].to_vec(), shape)?;
                at += n;
                let split = self.parallel.split_of(param);
                out.extend(self.parallel.shard(param, &whole, split)?.to_vec_f32());
            }
            mine.insert(name.clone(), out);
        }
        self.inner
            .restore_optimizer_state(model, optimizer, steps, &mine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_hold_the_embedding_first_and_the_head_last() {
        assert_eq!(stage_layers(&[2, 2]), vec![0..3, 3..6]);
        assert_eq!(stage_layers(&[0, 3, 1]), vec![0..1, 1..4, 4..6]);
        assert_eq!(stage_layers(&[4]), vec![0..6]);
    }
}
