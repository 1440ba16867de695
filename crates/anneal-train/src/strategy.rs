//! How a training step runs on the hardware: forward and backward over the micro-batches,
//! gradient reduction, clipping and the optimizer step, behind one [`Strategy`] trait (the shape
//! of Megatron-core's `get_forward_backward_func`): [`SingleDevice`], [`DataParallel`],
//! [`ZeroOne`], [`ZeroTwo`], [`ZeroThree`] and [`ExpertDataParallel`] here; pipelines in
//! [`crate::pipeline`]; tensor parallelism lives in the model's layers (built in
//! `anneal_dist::ModelParallel`) with [`crate::mesh::WithModelParallel`] around the data ranks'
//! strategy.

use crate::model::TrainModel;
use crate::objectives::Objective;
use anneal_data::Batch;
use anneal_nn::layers::Split;
use anneal_tensor::{DropoutKey, Optimizer, Tensor};
use anyhow::{bail, Result};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Settings of one optimizer step.
#[derive(Clone, Copy, Debug)]
pub struct StepSettings {
    /// Learning rate of this step.
    pub lr: f32,
    /// Global gradient-norm clip; 0 turns clipping off.
    pub grad_clip: f32,
    /// Measure the gradient norm even when not clipping (it is logged; a benchmark that does not
    /// log it skips the pass over the gradients).
    pub measure_grad_norm: bool,
    /// The loss is multiplied by this before backward and the gradients divided by it before the
    /// optimizer (dynamic loss scaling, [`anneal_tensor::loss_scale`]); 1 is none. Under a
    /// scale, a step whose gradients overflow is skipped ([`StepOutput::skipped`]).
    pub loss_scale: f32,
}

impl StepSettings {
    /// Whether the step needs the gradient norm: to clip, to log it, or to find an overflow of
    /// loss-scaled gradients (a non-finite norm).
    pub fn needs_norm(&self) -> bool {
        self.grad_clip > 0.0 || self.measure_grad_norm || self.loss_scale != 1.0
    }
}

/// What one optimizer step did.
#[derive(Clone, Debug, Default)]
pub struct StepOutput {
    /// Mean loss over the micro-batches (objective plus auxiliary losses).
    pub loss: f64,
    /// Global gradient norm before clipping (NaN when neither clipped nor measured).
    pub grad_norm: f64,
    /// The objective's metrics and the layers' auxiliary losses, each averaged over the
    /// micro-batches.
    pub metrics: Vec<(String, f64)>,
    /// Seconds in forward (and loss), backward, and clipping plus the optimizer.
    pub phases: [f64; 3],
    /// Seconds spent waiting for communication outside backward (gradient reductions not hidden
    /// behind it, and ZeRO's parameter all-gather; counted in `phases[2]` too).
    pub exposed_comm: f64,
    /// The loss-scaled gradients overflowed: the optimizer did not step.
    pub skipped: bool,
}

/// Runs one optimizer step of a model.
pub trait Strategy: Send {
    /// A short description for logs.
    fn describe(&self) -> String;

    /// Forward and backward over `micro_batches` (gradients summed, each micro-batch weighted
    /// 1/n), gradient reduction, clipping, and the optimizer step. `dropout` holds each
    /// micro-batch's dropout key (its seed, and where its rows start in the step's whole batch). `after_forward` runs after each forward pass, outside the timed
    /// phases (profilers and memory probes use it). Fails, without stepping the optimizer, when
    /// the loss is not finite.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        model: &dyn TrainModel,
        objective: &mut dyn Objective,
        optimizer: &mut dyn Optimizer,
        micro_batches: &[Batch],
        dropout: &[DropoutKey],
        settings: StepSettings,
        after_forward: &mut dyn FnMut(),
    ) -> Result<StepOutput>;

    /// The optimizer's state as one unsharded optimizer would hold it (every trainable element,
    /// in the store's state order), returned on the rank that writes checkpoints (rank 0 of the
    /// job) and `None` on the others. Collective: every rank calls it. A checkpoint holds this
    /// whole state, so it loads under any layout.
    fn gather_optimizer_state(
        &self,
        model: &dyn TrainModel,
        optimizer: &dyn Optimizer,
    ) -> Result<Option<NamedState>> {
        Ok(Some(optimizer.state(model.params())))
    }

    /// True where this rank's optimizer holds the whole state a checkpoint saves and no other
    /// rank takes part in saving it (one device): the checkpoint is then written from the
    /// optimizer's own storage instead of [`Strategy::gather_optimizer_state`]'s f32 copy.
    fn holds_whole_optimizer_state(&self) -> bool {
        false
    }

    /// The mean next-token loss of `windows` without gradients, where the strategy must run the
    /// model itself (a pipeline's stages, collective over them): `Some` on every rank; `None`
    /// where the trainer runs the model whole.
    fn evaluate(
        &self,
        model: &dyn TrainModel,
        windows: &anneal_data::TokenWindows,
    ) -> Result<Option<f64>> {
        let _ = (model, windows);
        Ok(None)
    }

    /// The model's whole parameters by name, as a checkpoint holds them, returned where
    /// [`Strategy::gather_optimizer_state`] returns the state (every rank of a model that is
    /// whole on each; the first of each tensor-parallel group, which gathers the slices).
    /// Collective.
    fn gather_parameters(&self, model: &dyn TrainModel) -> Result<Option<Vec<(String, Tensor)>>> {
        Ok(Some(model.params().named()))
    }

    /// The range of the trainable elements (state order) whose optimizer state this rank keeps:
    /// all of them, or its shard under ZeRO.
    fn optimizer_shard(&self, model: &dyn TrainModel) -> Range<usize> {
        0..model.params().trainable_numel()
    }

    /// Loads a whole, unsharded optimizer state ([`Strategy::gather_optimizer_state`]'s) into
    /// this rank's optimizer, keeping its own shard of it (vectors already cut to the shard are
    /// taken as they are).
    fn restore_optimizer_state(
        &self,
        model: &dyn TrainModel,
        optimizer: &mut dyn Optimizer,
        steps: u64,
        state: &HashMap<String, Vec<f32>>,
    ) -> Result<()> {
        Ok(optimizer.load_state(model.params(), steps, state)?)
    }
}

/// Named flat state vectors, as [`Optimizer::state`] gives them.
pub type NamedState = Vec<(String, Vec<f32>)>;

/// The error of a step whose loss is not finite (the optimizer was not stepped).
#[derive(Debug, Clone, Copy)]
pub struct NonFiniteLoss(pub f64);

impl std::fmt::Display for NonFiniteLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the loss became {}", self.0)
    }
}

impl std::error::Error for NonFiniteLoss {}

/// Adds `value` to the running sum named `name`.
pub(crate) fn accumulate(sums: &mut Vec<(String, f64)>, name: &str, value: f64) {
    match sums.iter_mut().find(|(n, _)| n == name) {
        Some((_, s)) => *s += value,
        None => sums.push((name.to_string(), value)),
    }
}

/// Everything on one device: micro-batches one after another, no gradient reduction.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleDevice;

impl Strategy for SingleDevice {
    fn describe(&self) -> String {
        "single device".into()
    }

    fn holds_whole_optimizer_state(&self) -> bool {
        true
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
        let mut out = forward_backward(
            model,
            objective,
            micro_batches,
            dropout,
            settings.loss_scale,
            after_forward,
            &mut |_| {},
        )?;
        if !out.loss.is_finite() {
            return Err(NonFiniteLoss(out.loss).into());
        }
        clip_and_step(model, optimizer, settings, &mut out)?;
        Ok(out)
    }
}

/// Zeroes the gradients, then runs forward and backward over `micro_batches` (gradients summed,
/// times `loss_scale`): the loss and metrics, and the forward and backward times. The part of a
/// step every strategy shares. `last_backward` is told, before each backward, whether it is the step's last (when
/// data parallelism's gradient hooks start communicating).
///
/// Each micro-batch's mean loss is weighted by its share of the step's tokens, so the loss (and
/// gradient) is normalised by the step's token count, as one pass over the whole batch would be,
/// however it is cut into micro-batches (batches without tokens weigh 1/n).
pub fn forward_backward(
    model: &dyn TrainModel,
    objective: &mut dyn Objective,
    micro_batches: &[Batch],
    dropout: &[DropoutKey],
    loss_scale: f32,
    after_forward: &mut dyn FnMut(),
    last_backward: &mut dyn FnMut(bool),
) -> Result<StepOutput> {
    let params = model.params();
    let n = micro_batches.len();
    if n == 0 || dropout.len() != n {
        bail!("a step needs one or more micro-batches and a dropout key for each");
    }
    let mut out = StepOutput::default();
    params.zero_grad();
    let total_tokens: usize = micro_batches.iter().map(Batch::tokens).sum();
    let weight_of = |batch: &Batch| {
        if total_tokens == 0 {
            1.0 / n as f64
        } else {
            batch.tokens() as f64 / total_tokens as f64
        }
    };
    let mut loss_sum = 0.0f64;
    for (m, (batch, &key)) in micro_batches.iter().zip(dropout).enumerate() {
        let weight = weight_of(batch);
        let t0 = Instant::now();
        let output = model.forward(&objective.inputs(batch)?, Some(key))?;
        let loss = objective.loss(&output, batch)?;
        let mut total = loss.value;
        for (name, aux) in &output.aux_losses {
            accumulate(&mut out.metrics, name, weight * aux.item()? as f64);
            total = total.add(aux)?;
        }
        for (name, value) in loss.metrics.iter().chain(&output.stats) {
            accumulate(&mut out.metrics, name, weight * *value);
        }
        loss_sum += weight * total.item()? as f64;
        out.phases[0] += t0.elapsed().as_secs_f64();
        after_forward();
        let t1 = Instant::now();
        last_backward(m + 1 == n);
        if n == 1 && loss_scale == 1.0 {
            total.backward()?;
        } else {
            let seed = Tensor::from_f32(vec![weight as f32 * loss_scale], total.shape())?;
            total.backward_with_grad(&seed)?;
        }
        out.phases[1] += t1.elapsed().as_secs_f64();
    }
    out.loss = loss_sum;
    out.grad_norm = f64::NAN;
    Ok(out)
}

/// Clips the gradients (or measures their norm) as `settings` say and steps the optimizer,
/// adding the time to `out.phases[2]`.
pub fn clip_and_step(
    model: &dyn TrainModel,
    optimizer: &mut dyn Optimizer,
    settings: StepSettings,
    out: &mut StepOutput,
) -> Result<()> {
    let t2 = Instant::now();
    out.grad_norm = if settings.needs_norm() {
        global_grad_norm(model)? as f64
    } else {
        f64::NAN
    };
    clip_with_and_step(model, optimizer, settings, out);
    out.phases[2] += t2.elapsed().as_secs_f64();
    Ok(())
}

/// Steps the optimizer after [`unscale_and_clip`] over the gradients this rank holds.
pub fn clip_with_and_step(
    model: &dyn TrainModel,
    optimizer: &mut dyn Optimizer,
    settings: StepSettings,
    out: &mut StepOutput,
) {
    let params = model.params();
    if unscale_and_clip(params, params.held_grads(), settings, out) {
        optimizer.step(params, settings.lr);
    }
}

/// Given `out.grad_norm`, the global norm of the (loss-scaled) gradients however the strategy
/// summed it over the ranks: under a loss scale, a non-finite norm is an overflow (the same pass
/// that measured the norm found it), so the step is marked skipped and `false` returned;
/// otherwise the norm is unscaled and the gradients in `range` multiplied, in one pass, by the
/// inverse scale and the factor that clips their norm to `settings.grad_clip`.
pub fn unscale_and_clip(
    params: &anneal_tensor::ParamStore,
    range: Range<usize>,
    settings: StepSettings,
    out: &mut StepOutput,
) -> bool {
    let scale = settings.loss_scale;
    if scale != 1.0 && !out.grad_norm.is_finite() {
        out.skipped = true;
        return false;
    }
    out.grad_norm /= scale as f64;
    let mut factor = 1.0 / scale;
    if settings.grad_clip > 0.0 {
        if let Some(s) =
            anneal_tensor::params::clip_factor(out.grad_norm as f32, settings.grad_clip)
        {
            factor *= s;
        }
    }
    if factor != 1.0 {
        params.scale_grads(range, factor);
    }
    true
}

/// The global norm of the model's gradients. Under tensor parallelism each rank holds a slice of
/// the split parameters' gradients and a whole copy of the others': the slices' sums of squares
/// are added over the group, the copies counted once.
pub fn global_grad_norm(model: &dyn TrainModel) -> Result<f32> {
    let split = model
        .parallel()
        .is_some_and(|p| p.tensor_parallel().1 > 1 || p.expert_parallel().1 > 1);
    if !split {
        return Ok(model.params().grad_norm());
    }
    Ok(split_model_grad_norm_sq(model, None)?.sqrt() as f32)
}

/// The sum of squares of the gradients of the model this rank holds part of, leaving out the
/// parameter `skip` (a tied copy another rank counts): the tensor-parallel slices' sums added
/// over the tensor-parallel group, the experts' over the ranks splitting them, the parameters
/// every rank of those groups holds whole counted once.
pub(crate) fn split_model_grad_norm_sq(model: &dyn TrainModel, skip: Option<&str>) -> Result<f64> {
    NormParts::of(model, model.params().held_grads(), skip).added_over_splits(model)
}

/// A split model's squared gradients summed apart by how their parameters are split: slices of
/// the tensor-parallel group's, experts, and parameters held whole.
struct NormParts {
    split: f64,
    experts: f64,
    whole: f64,
}

impl NormParts {
    /// The parts over the elements `range` (of the trainable elements) this rank holds, leaving
    /// out the parameter `skip`.
    fn of(model: &dyn TrainModel, range: Range<usize>, skip: Option<&str>) -> NormParts {
        let params = model.params();
        let parallel = model.parallel();
        let tp = parallel.map_or(1, |p| p.tensor_parallel().1);
        let ep = parallel.map_or(1, |p| p.expert_parallel().1);
        // The gradients this rank holds: its shard under ZeRO, else all of them.
        let held = params.held_grads();
        let range = range.start.max(held.start)..range.end.min(held.end);
        let mut parts = NormParts {
            split: 0.0,
            experts: 0.0,
            whole: 0.0,
        };
        params.with_grads(|g| {
            for (info, _, state) in params.trainable_ranges() {
                let (from, to) = (state.start.max(range.start), state.end.min(range.end));
                if from >= to || Some(info.name.as_str()) == skip {
                    continue;
                }
                let local = &g[from - held.start..to - held.start];
                let sq: f64 = local.iter().map(|&x| x as f64 * x as f64).sum();
                match parallel.map(|p| p.split_of(&info.name)) {
                    Some(Split::Axis(_) | Split::Interleaved { .. }) if tp > 1 => parts.split += sq,
                    Some(Split::Experts) if ep > 1 => parts.experts += sq,
                    _ => parts.whole += sq,
                }
            }
        });
        parts
    }

    /// The global sum of squares: the split parameters' part added over the tensor-parallel
    /// group, the experts' over the ranks splitting them (when the model has experts split: every
    /// rank of those groups holds the same layers, so they all call alike).
    fn added_over_splits(self, model: &dyn TrainModel) -> Result<f64> {
        let Some(p) = model.parallel() else {
            return Ok(self.split + self.experts + self.whole);
        };
        let mut split = self.split;
        if p.tensor_parallel().1 > 1 {
            split = p.sum_over_group(vec![split as f32])?[0] as f64;
        }
        let mut experts = self.experts;
        let has_experts = p.expert_parallel().1 > 1
            && model
                .params()
                .trainable_ranges()
                .any(|(info, _, _)| p.split_of(&info.name) == Split::Experts);
        if has_experts {
            experts = p.sum_over_experts(vec![experts as f32])?[0] as f64;
        }
        Ok(split + experts + self.whole)
    }
}

/// Replaces this rank's loss and metrics by their means over the ranks of each of `comms` in
/// turn (what every rank reports), then fails on a non-finite mean loss: after every reduction,
/// so all ranks fail alike and none is left waiting in a collective.
pub(crate) fn average_loss(
    comms: &[&dyn anneal_dist::Communicator],
    out: &mut StepOutput,
) -> Result<()> {
    for comm in comms {
        let local: Vec<f32> = std::iter::once(out.loss as f32)
            .chain(out.metrics.iter().map(|(_, v)| *v as f32))
            .collect();
        let global = comm.all_reduce(local, anneal_dist::Reduce::Mean)?;
        out.loss = global[0] as f64;
        for ((_, v), g) in out.metrics.iter_mut().zip(&global[1..]) {
            *v = *g as f64;
        }
    }
    if !out.loss.is_finite() {
        return Err(NonFiniteLoss(out.loss).into());
    }
    Ok(())
}

/// ZeRO gathers parameters as f32 into the store, which would drop a half-precision store's
/// master copy: refused until the master copy is sharded too.
fn check_zero_store(model: &dyn TrainModel) -> Result<()> {
    let dtype = model.params().dtype();
    if dtype != anneal_tensor::DType::F32 {
        bail!("ZeRO needs f32 parameters for now, not {dtype:?}: use data parallelism for bf16/f16 models");
    }
    Ok(())
}

/// This rank's shard of `model`'s trainable elements under ZeRO over `comm`: the range its
/// optimizer owns.
pub(crate) fn zero_shard(
    comm: &dyn anneal_dist::Communicator,
    model: &dyn TrainModel,
) -> Range<usize> {
    let total = model.params().trainable_numel();
    anneal_dist::shard_range(total, comm.rank(), comm.size(), SHARD_ALIGN)
}

/// Gathers every rank's `shard` of the trainable parameters (shards of
/// [`anneal_dist::shard_len`] elements) so each rank holds the whole model again.
pub(crate) fn gather_parameters(
    comm: &dyn anneal_dist::Communicator,
    model: &dyn TrainModel,
    shard: Range<usize>,
) -> Result<()> {
    let params = model.params();
    let total = params.trainable_numel();
    let padded = anneal_dist::shard_len(total, comm.size(), SHARD_ALIGN);
    let mut mine = params.trainable_values(shard);
    mine.resize(padded, 0.0);
    let mut all = comm.all_gather(mine)?;
    all.truncate(total);
    params.set_trainable_values(0, &all);
    Ok(())
}

/// Data parallelism: each rank holds the whole model and runs its own share of the global batch;
/// the gradients are averaged across the ranks, the loss and metrics too, and every rank takes
/// the same optimizer step, so the replicas stay identical (the communicator's reductions are the
/// same bits on every rank). Each rank's micro-batches must be the same size, so that the mean of
/// the ranks' means is the global mean.
///
/// Gradients travel in buckets (PyTorch DDP's scheme, Li et al. 2020, "PyTorch Distributed:
/// Experiences on Accelerating Data Parallel Training"): the trainable parameters, taken in
/// reverse order (roughly the order backward finishes them), are grouped into buckets of about
/// `bucket_bytes`; a gradient hook on each parameter counts down its bucket during the last
/// micro-batch's backward, and the moment a bucket's gradients are all final its all-reduce
/// starts, while backward goes on. Earlier micro-batches of an accumulated step communicate
/// nothing. After backward the strategy waits for the buckets (the exposed communication) and
/// writes the averages back.
pub struct DataParallel {
    comm: Arc<dyn anneal_dist::Communicator>,
    bucket_floats: usize,
    bf16: bool,
    overlap: Arc<Mutex<Overlap>>,
}

/// Starts the mean of `buf` across `group`, sent as f32 or, with `bf16`, as bf16 (half the
/// bytes; each value then carries bf16's 8 bits of precision).
fn mean_start(
    group: &Arc<dyn anneal_dist::Communicator>,
    buf: Vec<f32>,
    bf16: bool,
) -> anneal_dist::Result<anneal_dist::Handle<Vec<f32>>> {
    if bf16 {
        anneal_dist::all_reduce_bf16_start(group, buf, anneal_dist::Reduce::Mean)
    } else {
        group.all_reduce_start(buf, anneal_dist::Reduce::Mean)
    }
}

/// One bucket of gradients: a range of the gradient buffer, and its all-reduce once started.
struct Bucket {
    range: Range<usize>,
    /// Parameters in the bucket, and those whose gradient is not final yet in this backward.
    params: usize,
    pending: usize,
    started: Option<anneal_dist::Handle<Vec<f32>>>,
}

/// The buckets the gradient hooks fill, and whether they are armed (the last micro-batch).
#[derive(Default)]
struct Overlap {
    armed: bool,
    /// Buckets whose all-reduce a hook started during the last step's backward.
    started_in_backward: usize,
    buckets: Vec<Bucket>,
    /// The gradient buffer the hooks were registered for (hooks are registered once per model).
    hooked: Option<usize>,
}

impl DataParallel {
    /// Gradient buckets of 25 MB, PyTorch DDP's default.
    pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

    /// Data parallelism over the ranks of `comm`, reducing gradients in buckets of about
    /// `bucket_bytes` (at least one parameter each).
    pub fn new(comm: Box<dyn anneal_dist::Communicator>, bucket_bytes: usize) -> DataParallel {
        DataParallel {
            comm: Arc::from(comm),
            bucket_floats: (bucket_bytes / 4).max(1),
            bf16: false,
            overlap: Default::default(),
        }
    }

    /// Sends gradients as bf16 (half the bytes) when `on`, as f32 otherwise.
    pub fn with_bf16_gradients(mut self, on: bool) -> DataParallel {
        self.bf16 = on;
        self
    }

    /// Lays `model`'s trainable parameters out in buckets and registers the hooks that start
    /// each bucket's all-reduce (once per model).
    fn hook(&self, model: &dyn TrainModel) -> Result<()> {
        let params = model.params();
        let key = Arc::as_ptr(params.grads()) as usize;
        let mut overlap = self.overlap.lock().unwrap_or_else(|e| e.into_inner());
        if overlap.hooked == Some(key) {
            return Ok(());
        }
        let mut buckets = Vec::new();
        let mut members = Vec::new();
        for (b, bucket) in params.buckets(self.bucket_floats).into_iter().enumerate() {
            members.extend(bucket.params.iter().map(|id| (id.0, b)));
            buckets.push(Bucket {
                range: bucket.range,
                params: bucket.params.len(),
                pending: bucket.params.len(),
                started: None,
            });
        }
        for (id, bucket) in members {
            let (state, comm, bf16) = (self.overlap.clone(), self.comm.clone(), self.bf16);
            let grads = params.grads().clone();
            params
                .get(anneal_tensor::ParamId(id))
                .register_grad_hook(move |_| {
                    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                    if !st.armed {
                        return;
                    }
                    let b = &mut st.buckets[bucket];
                    b.pending -= 1;
                    if b.pending == 0 {
                        // Every gradient of the bucket is final: one copy of its range.
                        let mut buf = vec![0.0; b.range.len()];
                        grads.read().read_range_f32(b.range.start, &mut buf);
                        // A failed start is met again, and reported, when the bucket is waited on.
                        b.started = mean_start(&comm, buf, bf16).ok();
                        st.started_in_backward += 1;
                    }
                })?;
        }
        overlap.buckets = buckets;
        overlap.hooked = Some(key);
        Ok(())
    }

    /// Arms the hooks for the last micro-batch's backward, or disarms them.
    fn arm(&self, on: bool) {
        let mut overlap = self.overlap.lock().unwrap_or_else(|e| e.into_inner());
        overlap.armed = on;
    }

    /// The gradient buckets, and how many of them started their all-reduce during the last
    /// step's backward (the rest started after it).
    pub fn buckets_overlapped(&self) -> (usize, usize) {
        let overlap = self.overlap.lock().unwrap_or_else(|e| e.into_inner());
        (overlap.buckets.len(), overlap.started_in_backward)
    }

    /// Waits for every bucket's all-reduce (starting those whose hooks did not all fire), then
    /// (hybrid layouts) averages each across `replicas` too, and writes the averages back.
    /// Returns the seconds spent waiting.
    fn reduce_gradients(
        &self,
        model: &dyn TrainModel,
        replicas: Option<&Arc<dyn anneal_dist::Communicator>>,
    ) -> Result<f64> {
        let waited = Instant::now();
        let params = model.params();
        let mut overlap = self.overlap.lock().unwrap_or_else(|e| e.into_inner());
        overlap.armed = false;
        let mut pending = Vec::with_capacity(overlap.buckets.len());
        for b in &mut overlap.buckets {
            let handle = match b.started.take() {
                Some(h) => h,
                None => {
                    let buf = params.with_grads(|g| g[b.range.clone()].to_vec());
                    mean_start(&self.comm, buf, self.bf16)?
                }
            };
            b.pending = b.params;
            pending.push((b.range.clone(), handle));
        }
        drop(overlap);
        if let Some(replicas) = replicas {
            pending = pending
                .into_iter()
                .map(|(r, h)| Ok((r, mean_start(replicas, h.wait()?, self.bf16)?)))
                .collect::<Result<Vec<_>>>()?;
        }
        let mut averaged = Vec::with_capacity(pending.len());
        for (range, handle) in pending {
            averaged.push((range, handle.wait()?));
        }
        params.with_grads_mut(|g| {
            for (range, values) in averaged {
                g[range].copy_from_slice(&values);
            }
        });
        Ok(waited.elapsed().as_secs_f64())
    }

    /// Forward and backward with the bucket hooks armed for the last micro-batch.
    fn forward_backward(
        &self,
        model: &dyn TrainModel,
        objective: &mut dyn Objective,
        micro_batches: &[Batch],
        dropout: &[DropoutKey],
        loss_scale: f32,
        after_forward: &mut dyn FnMut(),
    ) -> Result<StepOutput> {
        self.hook(model)?;
        self.overlap
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .started_in_backward = 0;
        let out = forward_backward(
            model,
            objective,
            micro_batches,
            dropout,
            loss_scale,
            after_forward,
            &mut |last| self.arm(last),
        );
        self.arm(false);
        out
    }
}

/// Every rank's shard of a sharded optimizer's state, sent to rank 0 of `group` and put together
/// there in rank order (the shards are consecutive ranges of the trainable elements): `Some` on
/// that rank, `None` elsewhere. Ranks outside the lead replica (`lead` false) take no part.
pub(crate) fn gather_sharded_state(
    group: &dyn anneal_dist::Communicator,
    lead: bool,
    model: &dyn TrainModel,
    optimizer: &dyn Optimizer,
) -> Result<Option<NamedState>> {
    const TAG: u32 = 0x5a5a;
    if !lead {
        return Ok(None);
    }
    let params = model.params();
    let state = optimizer.state(params);
    if group.rank() != 0 {
        for (_, v) in state {
            group.send(v, 0, TAG)?;
        }
        return Ok(None);
    }
    let total = params.trainable_numel();
    let mut whole = Vec::with_capacity(state.len());
    for (name, mine) in state {
        let mut v = Vec::with_capacity(total);
        v.extend_from_slice(&mine);
        drop(mine);
        for from in 1..group.size() {
            v.extend_from_slice(&group.recv(from, TAG)?);
        }
        if v.len() != total {
            bail!(
                "gathering the optimizer state {name}: its shards hold {} elements, not the {total} \
                 trainable ones",
                v.len()
            );
        }
        whole.push((name, v));
    }
    Ok(Some(whole))
}

/// Loads a whole optimizer state into this rank's optimizer: its ZeRO-1 `shard` when it keeps
/// one, else all of it.
pub(crate) fn restore_state_in(
    shard: Option<&Range<usize>>,
    model: &dyn TrainModel,
    optimizer: &mut dyn Optimizer,
    steps: u64,
    state: &HashMap<String, Vec<f32>>,
) -> Result<()> {
    match shard {
        Some(shard) => restore_sharded_state(shard.clone(), model, optimizer, steps, state),
        None => Ok(optimizer.load_state(model.params(), steps, state)?),
    }
}

/// Loads this rank's `shard` of a whole optimizer state (vectors over every trainable element
/// are cut to the shard).
pub(crate) fn restore_sharded_state(
    shard: Range<usize>,
    model: &dyn TrainModel,
    optimizer: &mut dyn Optimizer,
    steps: u64,
    state: &HashMap<String, Vec<f32>>,
) -> Result<()> {
    let params = model.params();
    let total = params.trainable_numel();
    let mine = state
        .iter()
        .map(|(name, v)| {
            let part = if v.len() == total {
                v[shard.clone()].to_vec()
            } else {
                v.clone()
            };
            (name.clone(), part)
        })
        .collect();
    Ok(optimizer.load_state(params, steps, &mine)?)
}

impl Strategy for DataParallel {
    fn describe(&self) -> String {
        format!("data parallel over {} ranks", self.comm.size())
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
        let mut out = self.forward_backward(
            model,
            objective,
            micro_batches,
            dropout,
            settings.loss_scale,
            after_forward,
        )?;
        let t = Instant::now();
        out.exposed_comm += self.reduce_gradients(model, None)?;
        average_loss(&[self.comm.as_ref()], &mut out)?;
        out.phases[2] += t.elapsed().as_secs_f64();
        clip_and_step(model, optimizer, settings, &mut out)?;
        Ok(out)
    }

    fn gather_optimizer_state(
        &self,
        model: &dyn TrainModel,
        optimizer: &dyn Optimizer,
    ) -> Result<Option<NamedState>> {
        // Every replica holds the whole state: rank 0's is the one written.
        Ok((self.comm.rank() == 0).then(|| optimizer.state(model.params())))
    }
}

/// Shards of ZeRO hold whole chunks of the gradient norm's partial sums, so a sharded norm is
/// the same bits as the whole one, and whole blocks of 8-bit optimizer moments, so no block
/// straddles two ranks and a sharded optimizer quantises as the whole one does.
const SHARD_ALIGN: usize = anneal_tensor::quant8::BLOCK;
const _: () = assert!(SHARD_ALIGN.is_multiple_of(anneal_tensor::params::NORM_CHUNK));

/// ZeRO stage 1 (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
/// Parameter Models"): data parallelism whose optimizer state is sharded. Gradients are averaged
/// across the ranks as in [`DataParallel`]; each rank's optimizer, built with
/// [`anneal_tensor::optim::AdamW::shard`] over [`anneal_dist::shard_range`], updates only its
/// shard of the parameters, and the updated shards are all-gathered so every rank holds the
/// whole model again. Optimizer memory per rank falls to 1/ranks; every value equals plain data
/// parallelism's bit for bit.
///
/// With a replica group ([`ZeroOne::hybrid`]) it is hybrid sharding: ZeRO-1 inside each sharding
/// group, each bucket's averaged gradients averaged again across the replicas (equal to data
/// parallelism to rounding, as [`ZeroTwo::hybrid`]).
pub struct ZeroOne {
    data_parallel: DataParallel,
    replicas: Option<Arc<dyn anneal_dist::Communicator>>,
}

impl ZeroOne {
    /// ZeRO-1 over the ranks of `comm`, reducing gradients in buckets of `bucket_bytes`.
    pub fn new(comm: Box<dyn anneal_dist::Communicator>, bucket_bytes: usize) -> ZeroOne {
        ZeroOne {
            data_parallel: DataParallel::new(comm, bucket_bytes),
            replicas: None,
        }
    }

    /// Hybrid sharding: ZeRO-1 over `sharding_group`, gradients also averaged across
    /// `replica_group` ([`anneal_dist::hybrid_groups`] makes both).
    pub fn hybrid(
        sharding_group: Box<dyn anneal_dist::Communicator>,
        replica_group: Box<dyn anneal_dist::Communicator>,
        bucket_bytes: usize,
    ) -> ZeroOne {
        ZeroOne {
            data_parallel: DataParallel::new(sharding_group, bucket_bytes),
            replicas: Some(Arc::from(replica_group)),
        }
    }

    /// Sends gradients as bf16 (half the bytes) when `on`, as f32 otherwise.
    pub fn with_bf16_gradients(mut self, on: bool) -> ZeroOne {
        self.data_parallel = self.data_parallel.with_bf16_gradients(on);
        self
    }

    /// This rank's shard of `model`'s trainable elements: the range its optimizer owns.
    pub fn shard(&self, model: &dyn TrainModel) -> Range<usize> {
        zero_shard(self.data_parallel.comm.as_ref(), model)
    }
}

impl Strategy for ZeroOne {
    fn describe(&self) -> String {
        let group = self.data_parallel.comm.size();
        match &self.replicas {
            None => format!("ZeRO-1 (optimizer state sharded) over {group} ranks"),
            Some(r) => format!(
                "hybrid sharding: {} replicas of ZeRO-1 over {group} ranks",
                r.size()
            ),
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
        check_zero_store(model)?;
        let mut out = self.data_parallel.forward_backward(
            model,
            objective,
            micro_batches,
            dropout,
            settings.loss_scale,
            after_forward,
        )?;
        let t = Instant::now();
        out.exposed_comm += self
            .data_parallel
            .reduce_gradients(model, self.replicas.as_ref())?;
        let comm = self.data_parallel.comm.as_ref();
        let mut groups = vec![comm];
        groups.extend(self.replicas.as_deref());
        average_loss(&groups, &mut out)?;
        out.phases[2] += t.elapsed().as_secs_f64();
        clip_and_step(model, optimizer, settings, &mut out)?;
        // The optimizer stepped this rank's shard; every rank gathers the others'.
        let t = Instant::now();
        gather_parameters(comm, model, self.shard(model))?;
        let gathered = t.elapsed().as_secs_f64();
        out.phases[2] += gathered;
        out.exposed_comm += gathered;
        Ok(out)
    }

    fn gather_optimizer_state(
        &self,
        model: &dyn TrainModel,
        optimizer: &dyn Optimizer,
    ) -> Result<Option<NamedState>> {
        let lead = self.replicas.as_ref().is_none_or(|r| r.rank() == 0);
        gather_sharded_state(self.data_parallel.comm.as_ref(), lead, model, optimizer)
    }

    fn restore_optimizer_state(
        &self,
        model: &dyn TrainModel,
        optimizer: &mut dyn Optimizer,
        steps: u64,
        state: &HashMap<String, Vec<f32>>,
    ) -> Result<()> {
        restore_sharded_state(self.shard(model), model, optimizer, steps, state)
    }

    fn optimizer_shard(&self, model: &dyn TrainModel) -> Range<usize> {
        self.shard(model)
    }
}

/// ZeRO stage 2 (Rajbhandari et al. 2020): ZeRO-1 whose gradients are sharded too. The store
/// holds only this rank's shard of the gradients ([`anneal_tensor::ParamStore::shard_gradients`], which
/// [`for_layout`] calls); backward accumulates each bucket of parameters into a storage of its
/// own, and the moment a bucket's gradients are final its gradient hook starts a reduce-scatter
/// of it ([`anneal_dist::Communicator::reduce_scatter_v_start`]: the bucket cut where it meets
/// the ranks' shards) and gives the bucket's memory back; each rank adds its part into its
/// shard when the reduction completes. This happens on every micro-batch, so between
/// micro-batches a rank holds its shard and the buckets in flight (at most
/// [`ZeroTwo::MAX_IN_FLIGHT`], besides the one just finished and the one backward is filling), never the whole gradient.
/// Then it clips with the global norm (each rank's chunks of the norm's partial sums, gathered
/// and added in order), steps its shard and all-gathers the parameters. With one micro-batch a
/// step every value equals plain data parallelism's bit for bit; with several, each
/// micro-batch's mean is added into the shard (DeepSpeed's order), which differs from summing
/// the micro-batches first by rounding.
///
/// With a replica group ([`ZeroTwo::hybrid`]) it is hybrid sharding: ZeRO-2 inside each sharding
/// group, and each shard's averaged gradients averaged again across the replicas holding the
/// same shard (the mean of equal-sized means is the global mean; the summation order differs
/// from a flat reduction, so it equals data parallelism to rounding, not bitwise).
pub struct ZeroTwo {
    comm: Arc<dyn anneal_dist::Communicator>,
    bf16: bool,
    bucket_floats: usize,
    replicas: Option<Arc<dyn anneal_dist::Communicator>>,
    flow: Arc<Mutex<Flow>>,
}

/// A bucket of ZeRO-2's gradients during a step.
struct FlowBucket {
    range: Range<usize>,
    storage: Arc<anneal_tensor::storage::Storage>,
    /// Each rank's part: where the bucket meets its shard.
    counts: Vec<usize>,
    /// This rank's part (of the gradient buffer's order).
    part: Range<usize>,
    params: usize,
    pending: usize,
    started: bool,
}

/// A bucket's reduce-scatter in flight, and the gradient bytes it holds until it completes.
struct InFlight {
    handle: anneal_dist::Handle<Vec<f32>>,
    part: Range<usize>,
    _held: anneal_tensor::GradientBytes,
}

/// ZeRO-2's buckets, the reductions in flight, and the shard they are added into.
#[derive(Default)]
struct Flow {
    armed: bool,
    buckets: Vec<FlowBucket>,
    in_flight: std::collections::VecDeque<InFlight>,
    /// The store's gradient shard and its range.
    shard: Option<(Arc<anneal_tensor::storage::Storage>, Range<usize>)>,
    /// The first failure of a reduction started or completed in a hook, reported after backward.
    error: Option<anneal_dist::Error>,
    started_in_backward: usize,
    /// The gradient shard the hooks were registered for (hooks are registered once per model).
    hooked: Option<usize>,
}

impl Flow {
    /// Starts bucket `b`'s reduce-scatter, its gradients taken out of its storage (zeros when
    /// backward wrote none), after waiting for the oldest in flight if there are enough.
    fn start(&mut self, b: usize, comm: &dyn anneal_dist::Communicator, bf16: bool) {
        let bucket = &mut self.buckets[b];
        bucket.started = true;
        let buf = bucket
            .storage
            .take_f32()
            .unwrap_or_else(|| vec![0.0; bucket.range.len()]);
        let held = anneal_tensor::GradientBytes::hold(4 * buf.len());
        let (counts, part) = (bucket.counts.clone(), bucket.part.clone());
        while self.in_flight.len() >= ZeroTwo::MAX_IN_FLIGHT {
            self.complete_oldest();
        }
        match comm.reduce_scatter_v_start(buf, &counts, anneal_dist::Reduce::Mean, bf16) {
            Ok(handle) => self.in_flight.push_back(InFlight {
                handle,
                part,
                _held: held,
            }),
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
    }

    /// Waits for the oldest reduction in flight and adds this rank's part into the shard.
    fn complete_oldest(&mut self) {
        let Some(f) = self.in_flight.pop_front() else {
            return;
        };
        match f.handle.wait() {
            Ok(mine) => {
                if let Some((shard, range)) = &self.shard {
                    let at = f.part.start - range.start;
                    shard.with_f32_mut(|g| {
                        for (s, v) in g[at..at + mine.len()].iter_mut().zip(&mine) {
                            *s += v;
                        }
                    });
                }
            }
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
    }

    /// Starts the buckets backward did not finish (parameters without a gradient this pass), in
    /// bucket order, and readies every bucket for the next backward.
    fn start_rest(&mut self, comm: &dyn anneal_dist::Communicator, bf16: bool) {
        for b in 0..self.buckets.len() {
            if !self.buckets[b].started && self.buckets[b].pending < self.buckets[b].params {
                self.start(b, comm, bf16);
            }
        }
        // (A bucket no gradient reached holds zeros on every rank: nothing to add.)
        for b in &mut self.buckets {
            b.pending = b.params;
            b.started = false;
        }
    }
}

impl ZeroTwo {
    /// Bucket reductions in flight at once (a bucket finished while one is in flight waits for
    /// it): one bucket is reduced while backward fills the next (DeepSpeed's double buffering
    /// of `overlap_comm`). Bounds the gradient memory held beyond the shard: measured on the
    /// 56M-parameter model of `anneal bench zero`, a second bucket in flight added a bucket's
    /// bytes to the peak.
    pub const MAX_IN_FLIGHT: usize = 1;

    /// ZeRO-2 over the ranks of `comm`, reducing gradients in buckets of about `bucket_bytes`.
    pub fn new(comm: Box<dyn anneal_dist::Communicator>, bucket_bytes: usize) -> ZeroTwo {
        ZeroTwo {
            comm: Arc::from(comm),
            bf16: false,
            bucket_floats: (bucket_bytes / 4).max(1),
            replicas: None,
            flow: Default::default(),
        }
    }

    /// Hybrid sharding: ZeRO-2 over `sharding_group`, gradients also averaged across
    /// `replica_group` ([`anneal_dist::hybrid_groups`] makes both).
    pub fn hybrid(
        sharding_group: Box<dyn anneal_dist::Communicator>,
        replica_group: Box<dyn anneal_dist::Communicator>,
        bucket_bytes: usize,
    ) -> ZeroTwo {
        ZeroTwo {
            replicas: Some(Arc::from(replica_group)),
            ..ZeroTwo::new(sharding_group, bucket_bytes)
        }
    }

    /// Sends gradients as bf16 (half the bytes) when `on`, as f32 otherwise.
    pub fn with_bf16_gradients(mut self, on: bool) -> ZeroTwo {
        self.bf16 = on;
        self
    }

    /// This rank's shard of `model`'s trainable elements: the range its optimizer owns.
    pub fn shard(&self, model: &dyn TrainModel) -> Range<usize> {
        zero_shard(self.comm.as_ref(), model)
    }

    /// Shards `params`' gradients as this strategy needs: this rank's shard held, buckets of
    /// the strategy's size accumulated by backward. Call it before the first step (and again
    /// after freezing or unfreezing parameters).
    pub fn shard_gradients(&self, params: &mut anneal_tensor::ParamStore) -> Result<()> {
        let total = params.trainable_numel();
        let shard =
            anneal_dist::shard_range(total, self.comm.rank(), self.comm.size(), SHARD_ALIGN);
        Ok(params.shard_gradients(shard, self.bucket_floats)?)
    }

    /// Registers the hooks that start each bucket's reduce-scatter (once per model).
    fn hook(&self, model: &dyn TrainModel) -> Result<()> {
        let params = model.params();
        let shard = self.shard(model);
        if params.held_grads() != shard || params.gradient_buckets().is_empty() {
            bail!(
                "ZeRO-2 needs the model's gradients sharded over this rank's shard {shard:?}: \
                 call ZeroTwo::shard_gradients on its parameters first"
            );
        }
        let key = Arc::as_ptr(params.grads()) as usize;
        let mut flow = self.flow.lock().unwrap_or_else(|e| e.into_inner());
        if flow.hooked == Some(key) {
            return Ok(());
        }
        let (total, size) = (params.trainable_numel(), self.comm.size());
        let mut buckets = Vec::new();
        for (b, bucket) in params.gradient_buckets().iter().enumerate() {
            let counts: Vec<usize> = (0..size)
                .map(|r| {
                    let s = anneal_dist::shard_range(total, r, size, SHARD_ALIGN);
                    s.end
                        .min(bucket.range.end)
                        .saturating_sub(s.start.max(bucket.range.start))
                })
                .collect();
            let count = counts[self.comm.rank()];
            let start = if count == 0 {
                shard.start
            } else {
                bucket.range.start.max(shard.start)
            };
            let part = start..start + count;
            buckets.push(FlowBucket {
                range: bucket.range.clone(),
                storage: bucket
                    .storage
                    .clone()
                    .expect("sharded buckets have storage"),
                counts,
                part,
                params: bucket.params.len(),
                pending: bucket.params.len(),
                started: false,
            });
            for &id in &bucket.params {
                let (flow, comm, bf16) = (self.flow.clone(), self.comm.clone(), self.bf16);
                params.get(id).register_grad_hook(move |_| {
                    let mut f = flow.lock().unwrap_or_else(|e| e.into_inner());
                    if !f.armed {
                        return;
                    }
                    f.buckets[b].pending -= 1;
                    if f.buckets[b].pending == 0 {
                        f.start(b, comm.as_ref(), bf16);
                        f.started_in_backward += 1;
                    }
                })?;
            }
        }
        flow.buckets = buckets;
        flow.shard = Some((params.grads().clone(), shard));
        flow.hooked = Some(key);
        Ok(())
    }

    /// The gradient buckets, and how many of them started their reduce-scatter during the last
    /// step's backward passes (summed over its micro-batches).
    pub fn buckets_overlapped(&self) -> (usize, usize) {
        let flow = self.flow.lock().unwrap_or_else(|e| e.into_inner());
        (flow.buckets.len(), flow.started_in_backward)
    }

    /// The global gradient norm from each rank's partial sums over its shard.
    fn global_norm(&self, model: &dyn TrainModel, shard: Range<usize>) -> Result<f32> {
        use anneal_tensor::params::NORM_CHUNK;
        if model.parallel().is_some_and(|p| p.tensor_parallel().1 > 1) {
            return sharded_split_model_norm(model, self.comm.as_ref(), shard);
        }
        let params = model.params();
        let total = params.trainable_numel();
        let chunks = anneal_dist::shard_len(total, self.comm.size(), SHARD_ALIGN) / NORM_CHUNK;
        // f64 partial sums travel as exact bit patterns.
        let partials = params.grad_norm_partials(shard);
        let mut mine = anneal_dist::words_to_f32(partials.into_iter().map(f64::to_bits));
        mine.resize(2 * chunks, 0.0);
        let all = self.comm.all_gather(mine)?;
        let sum: f64 = anneal_dist::f32_to_words(&all)
            .take(total.div_ceil(NORM_CHUNK))
            .map(f64::from_bits)
            .sum();
        Ok(sum.sqrt() as f32)
    }
}

/// The global gradient norm of a model split by tensor parallelism whose gradients are sharded
/// over `comm` (ZeRO-2's and ZeRO-3's data ranks): each rank's `shard` of its slice's gradients,
/// summed apart by split ([`NormParts`]) and added over `comm`, then over the splits.
fn sharded_split_model_norm(
    model: &dyn TrainModel,
    comm: &dyn anneal_dist::Communicator,
    shard: Range<usize>,
) -> Result<f32> {
    let mine = NormParts::of(model, shard, None);
    let sums = comm.all_reduce(
        vec![mine.split as f32, mine.experts as f32, mine.whole as f32],
        anneal_dist::Reduce::Sum,
    )?;
    let all = NormParts {
        split: sums[0] as f64,
        experts: sums[1] as f64,
        whole: sums[2] as f64,
    };
    Ok(all.added_over_splits(model)?.sqrt() as f32)
}

impl Strategy for ZeroTwo {
    fn describe(&self) -> String {
        match &self.replicas {
            None => format!(
                "ZeRO-2 (optimizer state and gradients sharded) over {} ranks",
                self.comm.size()
            ),
            Some(r) => format!(
                "hybrid sharding: {} replicas of ZeRO-2 over {} ranks",
                r.size(),
                self.comm.size()
            ),
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
        check_zero_store(model)?;
        self.hook(model)?;
        let (comm, bf16) = (self.comm.clone(), self.bf16);
        {
            let mut flow = self.flow.lock().unwrap_or_else(|e| e.into_inner());
            flow.armed = true;
            flow.started_in_backward = 0;
        }
        let flow = self.flow.clone();
        let lock = || flow.lock().unwrap_or_else(|e| e.into_inner());
        // Before each backward, the buckets the previous one left are started.
        let out = forward_backward(
            model,
            objective,
            micro_batches,
            dropout,
            settings.loss_scale,
            after_forward,
            &mut |_| lock().start_rest(comm.as_ref(), bf16),
        );
        let waited = Instant::now();
        let error = {
            let mut flow = lock();
            flow.armed = false;
            flow.start_rest(comm.as_ref(), bf16);
            while !flow.in_flight.is_empty() {
                flow.complete_oldest();
            }
            flow.error.take()
        };
        let mut out = out?;
        if let Some(e) = error {
            return Err(e.into());
        }
        let params = model.params();
        let shard = self.shard(model);
        if let Some(replicas) = &self.replicas {
            // Padded to whole shards, so every replica group moves the same bytes.
            let padded =
                anneal_dist::shard_len(params.trainable_numel(), self.comm.size(), SHARD_ALIGN);
            let mut mine = params.grads_to_vec();
            mine.resize(padded, 0.0);
            let mean = mean_start(replicas, mine, self.bf16)?.wait()?;
            params.with_grads_mut(|g| g.copy_from_slice(&mean[..g.len()]));
        }
        out.exposed_comm += waited.elapsed().as_secs_f64();
        let mut groups = vec![self.comm.as_ref()];
        groups.extend(self.replicas.as_deref());
        average_loss(&groups, &mut out)?;
        out.grad_norm = if settings.needs_norm() {
            self.global_norm(model, shard.clone())? as f64
        } else {
            f64::NAN
        };
        if unscale_and_clip(params, shard.clone(), settings, &mut out) {
            optimizer.step(params, settings.lr);
        }
        let gathering = Instant::now();
        gather_parameters(self.comm.as_ref(), model, shard)?;
        out.exposed_comm += gathering.elapsed().as_secs_f64();
        out.phases[2] += waited.elapsed().as_secs_f64();
        Ok(out)
    }

    fn gather_optimizer_state(
        &self,
        model: &dyn TrainModel,
        optimizer: &dyn Optimizer,
    ) -> Result<Option<NamedState>> {
        let lead = self.replicas.as_ref().is_none_or(|r| r.rank() == 0);
        gather_sharded_state(self.comm.as_ref(), lead, model, optimizer)
    }

    fn restore_optimizer_state(
        &self,
        model: &dyn TrainModel,
        optimizer: &mut dyn Optimizer,
        steps: u64,
        state: &HashMap<String, Vec<f32>>,
    ) -> Result<()> {
        restore_sharded_state(self.shard(model), model, optimizer, steps, state)
    }

    fn optimizer_shard(&self, model: &dyn TrainModel) -> Range<usize> {
        self.shard(model)
    }
}

/// ZeRO stage 3 (Rajbhandari et al. 2020, §5.3): the model was built with its parameters sharded
/// over the ranks ([`anneal_dist::ZeroThree`]): each lookup gathers a parameter whole and the
/// gather's backward reduce-scatters its gradient, averaged, into the shard. What is left for the
/// step: the loss averaged over the ranks, the gradient norm summed from the shards, clipping,
/// and each rank's optimizer stepping its shards.
///
/// Hybrid sharding ([`ZeroThree::hybrid`], PyTorch's HSDP, PaddlePaddle's `sharding` axis beside
/// `dp`): the shards span one sharding group, which holds a whole replica; the groups of ranks
/// holding the same shard average their shards' gradients after backward, so the parameters'
/// traffic stays inside a sharding group and only one all-reduce of a shard crosses replicas.
pub struct ZeroThree {
    comm: Arc<dyn anneal_dist::Communicator>,
    zero: Arc<anneal_dist::ZeroThree>,
    /// The ranks holding the same shard in the other replicas, with hybrid sharding.
    replicas: Option<Box<dyn anneal_dist::Communicator>>,
}

impl ZeroThree {
    /// ZeRO-3 over the ranks of `comm`, the model's parameters sharded by `zero`.
    pub fn new(
        comm: Arc<dyn anneal_dist::Communicator>,
        zero: Arc<anneal_dist::ZeroThree>,
    ) -> Self {
        ZeroThree {
            comm,
            zero,
            replicas: None,
        }
    }

    /// Hybrid sharding: `comm` is one replica's sharding group and `replicas` the ranks of the
    /// other replicas holding this rank's shard (rank i of it in replica i).
    pub fn hybrid(mut self, replicas: Box<dyn anneal_dist::Communicator>) -> Self {
        self.replicas = (replicas.size() > 1).then_some(replicas);
        self
    }
}

impl Strategy for ZeroThree {
    fn describe(&self) -> String {
        match &self.replicas {
            Some(r) => format!(
                "{} replicas × ZeRO-3 over {} ranks",
                r.size(),
                self.comm.size()
            ),
            None => format!("ZeRO-3 over {} ranks", self.comm.size()),
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
        let params = model.params();
        self.zero.begin_step(params.tensors())?;
        let ran = forward_backward(
            model,
            objective,
            micro_batches,
            dropout,
            settings.loss_scale,
            after_forward,
            &mut |_| {},
        );
        self.zero.end_step()?;
        let mut out = ran?;
        let t = Instant::now();
        let mut comms = vec![self.comm.as_ref()];
        if let Some(replicas) = &self.replicas {
            // Each shard's gradient is the mean over its sharding group's rows; the replicas'
            // mean makes it the global batch's.
            let grads = params.with_grads(|g| g.to_vec());
            let mean = replicas.all_reduce(grads, anneal_dist::Reduce::Mean)?;
            params.with_grads_mut(|g| g.copy_from_slice(&mean));
            out.exposed_comm += t.elapsed().as_secs_f64();
            comms.push(replicas.as_ref());
        }
        average_loss(&comms, &mut out)?;
        let tensor = model.parallel().is_some_and(|p| p.tensor_parallel().1 > 1);
        out.grad_norm = if !settings.needs_norm() {
            f64::NAN
        } else if tensor {
            let all = 0..params.trainable_numel();
            sharded_split_model_norm(model, self.comm.as_ref(), all)? as f64
        } else {
            let mine: f64 = params.grad_norm_partials(params.held_grads()).iter().sum();
            let all = self
                .comm
                .all_reduce(vec![mine as f32], anneal_dist::Reduce::Sum)?;
            all[0].sqrt() as f64
        };
        crate::strategy::clip_with_and_step(model, optimizer, settings, &mut out);
        out.phases[2] += t.elapsed().as_secs_f64();
        Ok(out)
    }

    /// The first replica's state (every replica's is the same); `None` on the others.
    fn gather_optimizer_state(
        &self,
        model: &dyn TrainModel,
        optimizer: &dyn Optimizer,
    ) -> Result<Option<NamedState>> {
        let first = self.replicas.as_ref().is_none_or(|r| r.rank() == 0);
        Ok(first.then(|| optimizer.state(model.params())))
    }
}

/// Expert parallelism beside data parallelism (GShard, Lepikhin et al. 2020): the model's
/// Mixture-of-Experts layers hold `experts / ep` experts on each rank of an expert-parallel group
/// ([`anneal_dist::ExpertParallel`]) and exchange tokens with its other ranks; every other
/// parameter is replicated on every data rank. After backward the replicated parameters'
/// gradients are averaged over the data ranks, and each expert's gradient (already summed over its
/// expert-parallel group's tokens) is summed over the ranks holding the same experts and divided
/// by the data ranks, which is the gradient of the mean loss over the global batch. The gradient
/// norm adds the expert-parallel group's experts to the replicated part.
///
/// With ZeRO-1 ([`ZeroOneBeside::with_zero_one`]) the optimizer state is sharded over the
/// expert-data-parallel group, the ranks whose parameters are all the same (the replicated ones
/// and the same experts): each updates its shard and the group all-gathers the parameters.
pub struct ExpertDataParallel {
    data: Box<dyn anneal_dist::Communicator>,
    experts: Box<dyn anneal_dist::Communicator>,
    ep: Arc<dyn anneal_dist::Communicator>,
    /// ZeRO-1's shard of the trainable elements over `experts`.
    zero: Option<Range<usize>>,
}

impl ExpertDataParallel {
    /// Over the data ranks `data`, the expert-data-parallel group `experts` (the ranks holding
    /// this rank's experts) and the expert-parallel group `ep`.
    pub fn new(
        data: Box<dyn anneal_dist::Communicator>,
        experts: Box<dyn anneal_dist::Communicator>,
        ep: Arc<dyn anneal_dist::Communicator>,
    ) -> Self {
        ExpertDataParallel {
            data,
            experts,
            ep,
            zero: None,
        }
    }
}

impl ZeroOneBeside for ExpertDataParallel {
    /// With the optimizer state of `model` sharded over the expert-data-parallel group.
    fn with_zero_one(mut self, model: &dyn TrainModel) -> (Self, Range<usize>) {
        let shard = zero_shard(self.experts.as_ref(), model);
        self.zero = Some(shard.clone());
        (self, shard)
    }
}

/// A strategy that can shard its optimizer state (ZeRO-1) over the ranks holding the same
/// parameters as this one.
pub trait ZeroOneBeside: Strategy + Sized + 'static {
    /// This strategy with `model`'s optimizer state sharded; the range of the trainable elements
    /// this rank's optimizer keeps.
    fn with_zero_one(self, model: &dyn TrainModel) -> (Self, Range<usize>);
}

/// `strategy` (with ZeRO-1 when `zero_one`) and the AdamW of this rank: over its shard of the
/// trainable elements, or all of them.
pub fn with_adamw<S: ZeroOneBeside>(
    strategy: S,
    zero_one: bool,
    model: &dyn TrainModel,
    config: anneal_tensor::optim::AdamWConfig,
) -> Result<(Box<dyn Strategy>, anneal_tensor::optim::AdamW)> {
    let params = model.params();
    if !zero_one {
        return Ok((
            Box::new(strategy),
            anneal_tensor::optim::AdamW::new(params, config),
        ));
    }
    let (strategy, shard) = strategy.with_zero_one(model);
    let optimizer = anneal_tensor::optim::AdamW::shard(params, config, shard)?;
    Ok((Box::new(strategy), optimizer))
}

/// Each trainable parameter's place in state order, and whether it is an expert's (split over
/// the expert-parallel group).
fn expert_ranges(model: &dyn TrainModel) -> Vec<(Range<usize>, bool)> {
    let params = model.params();
    params
        .trainable_ranges()
        .map(|(info, _, state)| {
            let expert = model
                .parallel()
                .is_some_and(|p| p.split_of(&info.name) == Split::Experts);
            (state, expert)
        })
        .collect()
}

/// Averages the gradients of a model whose Mixture-of-Experts layers split their experts over
/// expert-parallel groups of the data ranks `data`: the replicated parameters' over `data`; each
/// expert's (already summed over its expert-parallel group's tokens) summed over `experts`, the
/// ranks holding the same experts, and divided by the data ranks. That is the gradient of the
/// mean loss over the global batch.
pub(crate) fn reduce_expert_gradients(
    model: &dyn TrainModel,
    data: &dyn anneal_dist::Communicator,
    experts: &dyn anneal_dist::Communicator,
) -> Result<()> {
    let params = model.params();
    let ranges = expert_ranges(model);
    let (mut shared, mut expert) = (Vec::new(), Vec::new());
    params.with_grads(|g| {
        for (range, is_expert) in &ranges {
            let into = if *is_expert { &mut expert } else { &mut shared };
            into.extend_from_slice(&g[range.clone()]);
        }
    });
    let shared = data.all_reduce(shared, anneal_dist::Reduce::Mean)?;
    let dp = data.size() as f32;
    let expert: Vec<f32> = experts
        .all_reduce(expert, anneal_dist::Reduce::Sum)?
        .into_iter()
        .map(|v| v / dp)
        .collect();
    let (mut at_shared, mut at_expert) = (0, 0);
    params.with_grads_mut(|g| {
        for (range, is_expert) in &ranges {
            let (from, at) = if *is_expert {
                (&expert, &mut at_expert)
            } else {
                (&shared, &mut at_shared)
            };
            g[range.clone()].copy_from_slice(&from[*at..*at + range.len()]);
            *at += range.len();
        }
    });
    Ok(())
}

impl Strategy for ExpertDataParallel {
    fn describe(&self) -> String {
        format!(
            "data parallel over {} ranks, experts split over {}",
            self.data.size(),
            self.ep.size()
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
        let mut out = forward_backward(
            model,
            objective,
            micro_batches,
            dropout,
            settings.loss_scale,
            after_forward,
            &mut |_| {},
        )?;
        let t = Instant::now();
        reduce_expert_gradients(model, self.data.as_ref(), self.experts.as_ref())?;
        average_loss(&[self.data.as_ref()], &mut out)?;
        out.exposed_comm += t.elapsed().as_secs_f64();
        out.grad_norm = if settings.needs_norm() {
            split_model_grad_norm_sq(model, None)?.sqrt()
        } else {
            f64::NAN
        };
        crate::strategy::clip_with_and_step(model, optimizer, settings, &mut out);
        if let Some(shard) = &self.zero {
            let t = Instant::now();
            gather_parameters(self.experts.as_ref(), model, shard.clone())?;
            out.exposed_comm += t.elapsed().as_secs_f64();
        }
        out.phases[2] += t.elapsed().as_secs_f64();
        Ok(out)
    }

    fn gather_optimizer_state(
        &self,
        model: &dyn TrainModel,
        optimizer: &dyn Optimizer,
    ) -> Result<Option<NamedState>> {
        // The first expert-parallel group holds every expert once: its ranks' states are
        // gathered whole (from their group's shards under ZeRO-1).
        if self.zero.is_some() {
            return gather_sharded_state(self.experts.as_ref(), true, model, optimizer);
        }
        Ok((self.experts.rank() == 0).then(|| optimizer.state(model.params())))
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
        state: &HashMap<String, Vec<f32>>,
    ) -> Result<()> {
        restore_state_in(self.zero.as_ref(), model, optimizer, steps, state)
    }
}

/// The strategy that runs `layout` over the job's ranks (`world`), with its gradient buckets and
/// gradient dtype, and the range of `model`'s trainable elements this rank's optimizer owns
/// (all of them without ZeRO). Sub-groups are split from `world` (collectively) in
/// [`anneal_dist::hybrid_groups`]' arrangement: rank r is shard `r % sharding` of replica
/// `r / sharding`.
pub fn for_layout(
    layout: crate::config::Layout,
    world: Box<dyn anneal_dist::Communicator>,
    model: &mut dyn TrainModel,
) -> Result<(Box<dyn Strategy>, Range<usize>)> {
    let (bucket_bytes, bf16) = (layout.bucket_bytes, layout.bf16_gradients);
    if world.size() != layout.ranks() {
        bail!(
            "the layout dp = {} × sharding = {} needs {} ranks, not the job's {}",
            layout.dp,
            layout.sharding,
            layout.ranks(),
            world.size()
        );
    }
    let total = model.params().trainable_numel();
    if world.size() == 1 {
        return Ok((Box::new(SingleDevice), 0..total));
    }
    if layout.zero == 0 {
        let dp = DataParallel::new(world, bucket_bytes).with_bf16_gradients(bf16);
        return Ok((Box::new(dp), 0..total));
    }
    check_zero_store(model)?;
    let shard_rank = world.rank() % layout.sharding;
    let shard = anneal_dist::shard_range(total, shard_rank, layout.sharding, SHARD_ALIGN);
    let strategy: Box<dyn Strategy> = if layout.dp == 1 {
        match layout.zero {
            1 => Box::new(ZeroOne::new(world, bucket_bytes).with_bf16_gradients(bf16)),
            _ => {
                let zero = ZeroTwo::new(world, bucket_bytes).with_bf16_gradients(bf16);
                zero.shard_gradients(model.params_mut())?;
                Box::new(zero)
            }
        }
    } else {
        let (sharding, replicas) =
            anneal_dist::hybrid_groups(world.as_ref(), layout.dp, layout.sharding)?;
        match layout.zero {
            1 => Box::new(
                ZeroOne::hybrid(sharding, replicas, bucket_bytes).with_bf16_gradients(bf16),
            ),
            _ => {
                let zero =
                    ZeroTwo::hybrid(sharding, replicas, bucket_bytes).with_bf16_gradients(bf16);
                zero.shard_gradients(model.params_mut())?;
                Box::new(zero)
            }
        }
    };
    Ok((strategy, shard))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objectives::CausalLm;
    use anneal_data::TokenWindows;
    use anneal_nn::{Gpt, GptConfig};
    use anneal_tensor::optim::{AdamW, AdamWConfig};

    /// A 2-layer GPT of width 16 over 11 tokens.
    fn tiny() -> GptConfig {
        GptConfig {
            vocab_size: 11,
            block_size: 8,
            n_layer: 2,
            n_head: 2,
            n_embd: 16,
            ..GptConfig::gpt2()
        }
    }

    /// Rank `r`'s micro-batch: 2 windows of 8 tokens.
    fn batch(r: usize) -> Batch {
        Batch::Tokens(TokenWindows {
            ids: (0..16).map(|i| ((i + 3 * r) % 11) as u32).collect(),
            targets: (0..16).map(|i| ((i + 1 + 3 * r) % 11) as i64).collect(),
            batch: 2,
            seq: 8,
        })
    }

    #[test]
    fn buckets_start_communicating_during_backward_and_only_on_the_last_micro_batch() {
        let config = tiny();
        let stats = anneal_dist::local::run(2, |comm| -> Result<_> {
            let gpt = Gpt::new(config.clone(), 1)?;
            let mut opt = AdamW::new(&gpt.params, AdamWConfig::DEFAULT);
            // Buckets of 4 KB: the model's gradients fill several.
            let mut dp = DataParallel::new(Box::new(comm), 4096);
            let settings = StepSettings {
                lr: 1e-3,
                grad_clip: 0.0,
                measure_grad_norm: false,
                loss_scale: 1.0,
            };
            let keys = [DropoutKey::default(); 2];
            let micro = [batch(0), batch(1)];
            dp.step(
                &gpt,
                &mut CausalLm,
                &mut opt,
                &micro,
                &keys,
                settings,
                &mut || {},
            )?;
            Ok(dp.buckets_overlapped())
        })
        .unwrap();
        for (buckets, started) in stats {
            assert!(buckets > 3, "{buckets} buckets");
            assert_eq!(
                started, buckets,
                "every bucket started during backward, once"
            );
        }
    }

    #[test]
    fn zero_two_reduces_every_micro_batch_and_holds_only_its_shard() {
        let config = tiny();
        let out = anneal_dist::local::run(2, |comm| -> Result<_> {
            let mut gpt = Gpt::new(config.clone(), 1)?;
            let mut zero = ZeroTwo::new(Box::new(comm), 4096);
            let step = |zero: &mut ZeroTwo, gpt: &Gpt| -> Result<_> {
                let shard = zero.shard(gpt);
                let mut opt = AdamW::shard(&gpt.params, AdamWConfig::DEFAULT, shard.clone())?;
                let settings = StepSettings {
                    lr: 1e-3,
                    grad_clip: 1.0,
                    measure_grad_norm: true,
                    loss_scale: 1.0,
                };
                let keys = [DropoutKey::default(); 2];
                let out = zero.step(
                    gpt,
                    &mut CausalLm,
                    &mut opt,
                    &[batch(0), batch(1)],
                    &keys,
                    settings,
                    &mut || {},
                )?;
                Ok((shard, out))
            };
            // Without sharded gradients the step is refused, naming the call that shards them.
            let err = step(&mut zero, &gpt).err().map(|e| e.to_string());
            zero.shard_gradients(&mut gpt.params)?;
            let (shard, out) = step(&mut zero, &gpt)?;
            let params = &gpt.params;
            let released = params
                .gradient_buckets()
                .iter()
                .all(|b| !b.storage.as_ref().unwrap().is_allocated());
            Ok((
                err,
                zero.buckets_overlapped(),
                params.grads().bytes() == 4 * shard.len(),
                released,
                out.grad_norm,
            ))
        })
        .unwrap();
        for (err, (buckets, started), shard_only, released, norm) in out {
            assert!(
                err.is_some_and(|e| e.contains("shard_gradients")),
                "an unsharded store is refused"
            );
            assert!(buckets > 3, "{buckets} buckets");
            assert_eq!(
                started,
                2 * buckets,
                "each micro-batch reduced every bucket"
            );
            assert!(
                shard_only,
                "the store holds its shard of the gradients alone"
            );
            assert!(released, "every bucket gave its memory back");
            assert!(norm.is_finite() && norm > 0.0);
        }
    }
}
