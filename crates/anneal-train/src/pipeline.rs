//! Pipeline parallelism: the model's ordered layers (embedding, blocks, head) cut into stages, one
//! per rank of a pipeline group, each step's batches cut into micro-batches that flow through
//! the stages, activations forward and their gradients backward, the loss on the last stage.
//!
//! Two schedules (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
//! Clusters Using Megatron-LM", §2.2):
//! - **GPipe** (Huang et al. 2019): every micro-batch's forward, then every backward; m
//!   micro-batches of activations in flight.
//! - **1F1B** (PipeDream-Flush): stage s runs `p − s − 1` warm-up forwards, then alternates one
//!   forward and one backward, then drains the remaining backwards; at most `p − s` micro-batches
//!   in flight. Both have the bubble (p − 1)/m.
//!
//! A tied token embedding lives on the first stage (the embedding) and the last (the head); the
//! two copies start equal and stay equal because their gradients are summed across the
//! embedding group (the first and last stage) before the optimizer step, as Megatron-LM does.
//! Sends never block (messages are buffered), so both schedules run without deadlock on
//! blocking receives.

use crate::model::{StageInput, TrainModel};
use crate::objectives::Objective;
use crate::strategy::{NonFiniteLoss, StepOutput, StepSettings, Strategy};
use anneal_data::Batch;
use anneal_dist::{Communicator, Reduce};
use anneal_tensor::{DropoutKey, Optimizer, Tensor};
use anyhow::{bail, Result};
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

/// Message tags of the activations sent forward and their gradients sent back (MPI allows tags
/// up to 32,767).
const TAG_ACTIVATION: u32 = 0x1ac7;
const TAG_GRADIENT: u32 = 0x196d;

/// One stage of a pipeline.
pub struct Pipeline {
    /// The pipeline group: stage s is rank s.
    group: Arc<dyn Communicator>,
    /// This stage's layers of the model.
    layers: Range<usize>,
    /// 1F1B (else GPipe).
    one_f_one_b: bool,
    /// Pipeline micro-batches each of the step's batches is cut into.
    chunks: usize,
    /// The first and last stage, which both hold the tied embedding `(group, parameter name)`.
    embedding: Option<(Box<dyn Communicator>, String)>,
    /// The data-parallel group whose replicas' gradients are averaged (none with one replica).
    data: Option<Box<dyn Communicator>>,
    /// ZeRO-1's shard of this stage's trainable elements over the data group.
    zero: Option<Range<usize>>,
    /// With expert parallelism: the data ranks holding this rank's experts (its
    /// expert-data-parallel group).
    experts: Option<Box<dyn Communicator>>,
    /// Whether every stage may add losses and metrics (a Mixture-of-Experts layer's balancing
    /// loss and expert loads): the stages then add their parts up, else the last stage's loss is
    /// the step's.
    stage_losses: bool,
}

/// What a forward leaves for its backward.
struct InFlight {
    /// The received activation (a leaf whose gradient goes back), on every stage but the first.
    input: Option<Tensor>,
    /// The stage's output, or on the last stage the weighted loss.
    output: Tensor,
    /// The weighted auxiliary losses of a stage before the last (its Mixture-of-Experts layers').
    aux: Option<Tensor>,
}

impl Pipeline {
    /// Stage `group.rank()` of `group.size()`, running `layers` of the model, with `chunks`
    /// micro-batches per batch under 1F1B (`one_f_one_b`) or GPipe. `embedding` is the group of
    /// the first and last stage when they share a tied embedding (with its parameter's name),
    /// `data` the data-parallel group (more than one replica).
    pub fn new(
        group: Arc<dyn Communicator>,
        layers: Range<usize>,
        one_f_one_b: bool,
        chunks: usize,
        embedding: Option<(Box<dyn Communicator>, String)>,
        data: Option<Box<dyn Communicator>>,
    ) -> Pipeline {
        Pipeline {
            group: anneal_dist::Timed::wrap(group),
            layers,
            one_f_one_b,
            chunks: chunks.max(1),
            embedding,
            data,
            zero: None,
            stage_losses: false,
            experts: None,
        }
    }

    /// With the Mixture-of-Experts layers' experts split over expert-parallel groups of the data
    /// ranks: `experts` is the group of data ranks holding this rank's experts, over which their
    /// gradients are summed (the others' averaged over every data rank).
    pub fn with_expert_data(mut self, experts: Box<dyn Communicator>) -> Pipeline {
        self.experts = Some(experts);
        self
    }

    /// With losses and metrics on every stage (a model with Mixture-of-Experts layers): each
    /// stage backpropagates its layers' auxiliary losses beside the gradient the next stage
    /// sends, and the step's loss and metrics are the stages' parts added up.
    pub fn with_stage_losses(mut self) -> Pipeline {
        self.stage_losses = true;
        self
    }

    /// The ranks holding the same parameters as this one in the other replicas (the data group,
    /// or with experts split the expert-data-parallel group), when there are any.
    fn replicas(&self) -> Option<&dyn Communicator> {
        self.data.as_ref()?;
        self.experts.as_deref().or(self.data.as_deref())
    }

    /// The pipeline group.
    pub fn group(&self) -> &Arc<dyn Communicator> {
        &self.group
    }

    fn stage(&self) -> usize {
        self.group.rank()
    }

    fn is_first(&self) -> bool {
        self.stage() == 0
    }

    fn is_last(&self) -> bool {
        self.stage() + 1 == self.group.size()
    }

    /// The order of one step's forwards (`true`) and backwards over `m` micro-batches.
    fn order(&self, m: usize) -> Vec<bool> {
        let (p, s) = (self.group.size(), self.stage());
        let warmup = if self.one_f_one_b {
            (p - s - 1).min(m)
        } else {
            m
        };
        let mut order = vec![true; warmup];
        for _ in warmup..m {
            order.push(true);
            order.push(false);
        }
        order.extend(std::iter::repeat_n(false, warmup));
        order
    }

    /// Micro-batch `i`'s forward on this stage; on the last stage, its loss (times its weight)
    /// is added to `out`.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        model: &dyn TrainModel,
        objective: &mut dyn Objective,
        batch: &Batch,
        key: DropoutKey,
        weight: f64,
        out: &mut StepOutput,
    ) -> Result<InFlight> {
        let input = if self.is_first() {
            None
        } else {
            Some(self.receive_activation(model, batch)?.requires_grad_())
        };
        let model_input = objective.inputs(batch)?;
        let stage_input = match &input {
            None => StageInput::Model(&model_input),
            Some(x) => hidden(x.clone(), batch)?,
        };
        let output = model.forward_layers(stage_input, self.layers.clone(), Some(key))?;
        let (mut total, metrics) = if self.is_last() {
            let loss = objective.loss(&output, batch)?;
            (Some(loss.value), loss.metrics)
        } else {
            self.group
                .send(output.logits.to_vec_f32(), self.stage() + 1, TAG_ACTIVATION)?;
            (None, Vec::new())
        };
        for (name, aux) in &output.aux_losses {
            crate::strategy::accumulate(&mut out.metrics, name, weight * aux.item()? as f64);
            total = Some(match total {
                Some(t) => t.add(aux)?,
                None => aux.clone(),
            });
        }
        for (name, value) in metrics.iter().chain(&output.stats) {
            crate::strategy::accumulate(&mut out.metrics, name, weight * *value);
        }
        let weighted = match total {
            Some(total) => {
                out.loss += weight * total.item()? as f64;
                let weight = Tensor::from_f32(vec![weight as f32], total.shape())?;
                Some(total.mul(&weight)?)
            }
            None => None,
        };
        Ok(match (self.is_last(), weighted) {
            (true, Some(loss)) => InFlight {
                input,
                output: loss,
                aux: None,
            },
            (_, aux) => InFlight {
                input,
                output: output.logits,
                aux,
            },
        })
    }

    /// A micro-batch's backward: from its weighted loss on the last stage, from the gradient the
    /// next stage sends elsewhere; the gradient of its input goes back to the stage before.
    fn backward(&self, flight: InFlight) -> Result<()> {
        if self.is_last() {
            flight.output.backward()?;
        } else {
            let values = self.group.recv(self.stage() + 1, TAG_GRADIENT)?;
            let grad = Tensor::from_f32(values, flight.output.shape())?;
            match flight.aux {
                // One backward from ⟨output, grad⟩ + aux: the output's gradient is `grad`, and
                // the auxiliary losses add theirs.
                Some(aux) => flight.output.mul(&grad)?.sum_all()?.add(&aux)?.backward()?,
                None => flight.output.backward_with_grad(&grad)?,
            }
        }
        if let Some(input) = flight.input {
            let grad = input
                .grad()
                .map(|g| g.to_vec_f32())
                .unwrap_or_else(|| vec![0.0; input.numel()]);
            self.group.send(grad, self.stage() - 1, TAG_GRADIENT)?;
        }
        Ok(())
    }

    /// The activation of `batch` from the stage before, as `[B, T, d]`; under sequence
    /// parallelism this rank's rows of it, `[B·T/tp, d]`.
    fn receive_activation(&self, model: &dyn TrainModel, batch: &Batch) -> Result<Tensor> {
        let values = self.group.recv(self.stage() - 1, TAG_ACTIVATION)?;
        let (b, t) = batch_shape(batch)?;
        let split = model.parallel().filter(|p| p.sequence_parallel());
        let shape = match split {
            Some(p) => {
                let rows = b * t / p.tensor_parallel().1;
                vec![rows, values.len() / rows.max(1)]
            }
            None => vec![b, t, values.len() / (b * t).max(1)],
        };
        Ok(Tensor::from_f32(values, &shape)?)
    }

    /// The global gradient norm: each stage's sum of squares (the split parameters' slices added
    /// over the tensor-parallel group, the tied embedding counted on the first stage only) added
    /// over the pipeline.
    fn grad_norm(&self, model: &dyn TrainModel) -> Result<f32> {
        let tied = self
            .embedding
            .as_ref()
            .filter(|_| !self.is_first())
            .map(|(_, name)| name.as_str());
        let stage = crate::strategy::split_model_grad_norm_sq(model, tied)? as f32;
        let total = self.group.all_reduce(vec![stage], Reduce::Sum)?[0];
        Ok(total.sqrt())
    }
}

impl crate::strategy::ZeroOneBeside for Pipeline {
    /// With this stage's optimizer state sharded over its data group (ZeRO-1, Megatron-LM's
    /// distributed optimizer): each replica's rank updates its shard of the stage's parameters
    /// and the group all-gathers them. With experts split over the data ranks
    /// ([`Pipeline::with_expert_data`], called first) the shards span the ranks holding the same
    /// experts. Returns the range of the trainable elements its optimizer keeps (all of them with
    /// one replica).
    fn with_zero_one(mut self, model: &dyn TrainModel) -> (Pipeline, Range<usize>) {
        let shard = match self.replicas() {
            Some(group) => crate::strategy::zero_shard(group, model),
            None => 0..model.params().trainable_numel(),
        };
        if self.replicas().is_some() {
            self.zero = Some(shard.clone());
        }
        (self, shard)
    }
}

/// The sequences and their length of a pipeline's batch (token windows).
fn batch_shape(batch: &Batch) -> Result<(usize, usize)> {
    match batch {
        Batch::Tokens(w) => Ok((w.batch, w.seq)),
        other => bail!("a pipeline runs token windows, not {}", other.kind()),
    }
}

/// Hidden states `x` received for `batch`, as a stage's input.
fn hidden(x: Tensor, batch: &Batch) -> Result<StageInput<'static>> {
    let (batch, seq) = batch_shape(batch)?;
    Ok(StageInput::Hidden { x, batch, seq })
}

/// The loss parts and named metrics of every rank of `group`, each added up over the ranks that
/// report it: the loss first (as `loss`), then the metrics in the order of the ranks that report
/// them. Collective; names travel as their bytes.
fn add_over(
    group: &dyn Communicator,
    loss: f64,
    metrics: Vec<(String, f64)>,
) -> Result<Vec<(String, f64)>> {
    let mut mine = vec![loss as f32, metrics.len() as f32];
    for (name, value) in &metrics {
        mine.push(name.len() as f32);
        mine.extend(name.bytes().map(f32::from));
        mine.push(*value as f32);
    }
    let lengths = group.all_gather(vec![mine.len() as f32])?;
    let longest = lengths.iter().fold(0.0f32, |a, &b| a.max(b)) as usize;
    mine.resize(longest, 0.0);
    let all = group.all_gather(mine)?;
    let mut sums = vec![("loss".to_string(), 0.0)];
    for rank in all.chunks(longest) {
        sums[0].1 += rank[0] as f64;
        let mut at = 2;
        for _ in 0..rank[1] as usize {
            let len = rank[at] as usize;
            let bytes: Vec<u8> = rank[at + 1..at + 1 + len]
                .iter()
                .map(|&b| b as u8)
                .collect();
            let name = String::from_utf8_lossy(&bytes);
            crate::strategy::accumulate(&mut sums, &name, rank[at + 1 + len] as f64);
            at += len + 2;
        }
    }
    Ok(sums)
}

impl Strategy for Pipeline {
    fn describe(&self) -> String {
        format!(
            "pipeline stage {} of {} (layers {:?}, {}, {} micro-batch(es) a batch){}",
            self.stage(),
            self.group.size(),
            self.layers,
            if self.one_f_one_b { "1F1B" } else { "GPipe" },
            self.chunks,
            self.data.as_ref().map_or(String::new(), |d| format!(
                " × data parallel over {}",
                d.size()
            ))
        )
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
        if micro_batches.is_empty() || dropout.len() != micro_batches.len() {
            bail!("a step needs one or more micro-batches and a dropout key for each");
        }
        // Each batch cut into `chunks` pieces of rows, each keyed by where its rows start.
        let mut pieces = Vec::new();
        for (batch, key) in micro_batches.iter().zip(dropout) {
            let rows = match batch {
                Batch::Tokens(w) => w.batch,
                other => bail!("a pipeline runs token windows, not {}", other.kind()),
            };
            if !rows.is_multiple_of(self.chunks) {
                bail!(
                    "{rows} rows do not cut into {} pipeline micro-batches",
                    self.chunks
                );
            }
            let share = rows / self.chunks;
            for c in 0..self.chunks {
                let piece_key = DropoutKey {
                    first_row: key.first_row + (c * share) as u64,
                    ..*key
                };
                pieces.push((batch.rows(c * share..(c + 1) * share), piece_key));
            }
        }
        let total_tokens: usize = pieces.iter().map(|(b, _)| b.tokens()).sum();
        let n = pieces.len();
        let weight_of = |b: &Batch| match total_tokens {
            0 => 1.0 / n as f64,
            t => b.tokens() as f64 / t as f64,
        };
        let params = model.params();
        params.zero_grad();
        let mut out = StepOutput::default();
        let mut flights = std::collections::VecDeque::new();
        let (mut next_forward, mut next_backward) = (0, 0);
        for forward in self.order(n) {
            if forward {
                let (batch, key) = &pieces[next_forward];
                let t = Instant::now();
                let flight =
                    self.forward(model, objective, batch, *key, weight_of(batch), &mut out)?;
                out.phases[0] += t.elapsed().as_secs_f64();
                after_forward();
                flights.push_back(flight);
                next_forward += 1;
            } else {
                let t = Instant::now();
                let flight = flights
                    .pop_front()
                    .ok_or_else(|| anyhow::anyhow!("pipeline schedule: backward before forward"))?;
                self.backward(flight)?;
                out.phases[1] += t.elapsed().as_secs_f64();
                next_backward += 1;
            }
        }
        debug_assert_eq!((next_forward, next_backward), (n, n));
        let t = Instant::now();
        let waited = anneal_dist::waited();
        // The tied embedding's two copies receive the sum of their gradients.
        if let Some((group, name)) = &self.embedding {
            let id = params.id(name)?;
            let grad = params
                .get(id)
                .grad()
                .ok_or_else(|| anyhow::anyhow!("{name} has no gradient"))?;
            let summed = group.all_reduce(grad.to_vec_f32(), Reduce::Sum)?;
            params.set_grad(id, &Tensor::from_f32(summed, grad.shape())?)?;
        }
        match (&self.data, &self.experts) {
            (Some(data), Some(experts)) => {
                crate::strategy::reduce_expert_gradients(model, data.as_ref(), experts.as_ref())?
            }
            (Some(data), None) => {
                let grads = params.grads_to_vec();
                let mean = data.all_reduce(grads, Reduce::Mean)?;
                params.with_grads_mut(|g| g.copy_from_slice(&mean));
            }
            (None, _) => {}
        }
        // Every stage reports the last stage's loss (or the stages' parts added up), averaged
        // over the replicas.
        if self.stage_losses {
            let parts = std::mem::take(&mut out.metrics);
            let mut all = add_over(self.group.as_ref(), out.loss, parts)?;
            out.loss = all.remove(0).1;
            out.metrics = all;
        } else {
            let last = self.group.size() - 1;
            out.loss = self.group.broadcast(vec![out.loss as f32], last)?[0] as f64;
        }
        if let Some(data) = &self.data {
            crate::strategy::average_loss(&[data.as_ref()], &mut out)?;
        }
        // The reductions after backward (the receives inside it are on the timed pipeline
        // group, counted by the caller through `anneal_dist::waited`).
        out.exposed_comm += t.elapsed().as_secs_f64() - (anneal_dist::waited() - waited);
        if !out.loss.is_finite() {
            return Err(NonFiniteLoss(out.loss).into());
        }
        out.grad_norm = if settings.needs_norm() {
            self.grad_norm(model)? as f64
        } else {
            f64::NAN
        };
        crate::strategy::clip_with_and_step(model, optimizer, settings, &mut out);
        if let (Some(shard), Some(group)) = (&self.zero, self.replicas()) {
            let t = Instant::now();
            crate::strategy::gather_parameters(group, model, shard.clone())?;
            out.exposed_comm += t.elapsed().as_secs_f64();
        }
        out.phases[2] += t.elapsed().as_secs_f64();
        Ok(out)
    }

    /// The windows through the stages without gradients; the last stage's mean cross-entropy,
    /// broadcast to every stage.
    fn evaluate(
        &self,
        model: &dyn TrainModel,
        windows: &anneal_data::TokenWindows,
    ) -> Result<Option<f64>> {
        let batch = Batch::Tokens(windows.clone());
        let loss = anneal_tensor::no_grad(|| -> Result<f32> {
            let input = if self.is_first() {
                None
            } else {
                Some(self.receive_activation(model, &batch)?)
            };
            let model_input = crate::model::ModelInput::Tokens {
                ids: &windows.ids,
                batch: windows.batch,
                seq: windows.seq,
            };
            let stage_input = match input {
                None => StageInput::Model(&model_input),
                Some(x) => hidden(x, &batch)?,
            };
            let output = model.forward_layers(stage_input, self.layers.clone(), None)?;
            if !self.is_last() {
                self.group
                    .send(output.logits.to_vec_f32(), self.stage() + 1, TAG_ACTIVATION)?;
                return Ok(0.0);
            }
            let ce = output.cross_entropy(
                &windows.targets,
                anneal_tensor::CrossEntropyOptions::default(),
            )?;
            Ok(ce.item()?)
        })?;
        let last = self.group.size() - 1;
        Ok(Some(self.group.broadcast(vec![loss], last)?[0] as f64))
    }

    fn gather_optimizer_state(
        &self,
        model: &dyn TrainModel,
        optimizer: &dyn Optimizer,
    ) -> Result<Option<crate::strategy::NamedState>> {
        // Each replica holds the whole state of its stage (gathered from the replicas' shards
        // under ZeRO-1): the first replica's is gathered.
        if let (Some(_), Some(group)) = (&self.zero, self.replicas()) {
            return crate::strategy::gather_sharded_state(group, true, model, optimizer);
        }
        // With experts split over data ranks, the first expert-data replica: every expert once.
        let first = match &self.experts {
            Some(experts) => experts.rank() == 0,
            None => self.data.as_ref().is_none_or(|d| d.rank() == 0),
        };
        Ok(first.then(|| optimizer.state(model.params())))
    }

    fn optimizer_shard(&self, model: &dyn TrainModel) -> Range<usize> {
        self.zero
            .clone()
            .unwrap_or(0..model.params().trainable_numel())
    }

    fn restore_optimizer_state(
        &self,
        model: &dyn TrainModel,
        optimizer: &mut dyn Optimizer,
        steps: u64,
        state: &std::collections::HashMap<String, Vec<f32>>,
    ) -> Result<()> {
        crate::strategy::restore_state_in(self.zero.as_ref(), model, optimizer, steps, state)
    }
}
