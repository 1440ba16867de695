//! The [`Trainer`]: one model with its objective, optimizer and strategy, the source its batches
//! come from and its learning-rate schedule, cut into the parts of a training loop (nanoGPT's
//! `train.py` in shape):
//!
//! ```text
//! Trainer::new / restore   set-up, or resume from a checkpoint
//! Trainer::step            lr ← schedule(step); the sampler's micro-batches; the strategy runs
//!                          forward/backward (the objective gives the loss), reduces, clips and
//!                          steps the optimizer
//! Trainer::evaluate        validation loss on fixed windows
//! Trainer::save            a checkpoint of parameters, optimizer and objective state
//! ```
//!
//! The run around it (metrics, plots, checkpoint cadence, progress) is [`crate::pretrain`].

use crate::checkpoint::{self, TrainerState};
use crate::config::RunConfig;
use crate::model::TrainModel;
use crate::objectives::{CausalLm, Objective};
use crate::schedule::CosineSchedule;
use crate::strategy::{NonFiniteLoss, SingleDevice, StepOutput, StepSettings, Strategy};
use anneal_data::{BatchSource, Sampler, ShardSet, Stream, WindowSource};
use anneal_nn::layers::ParallelContext;
use anneal_nn::Gpt;
use anneal_tensor::loss_scale::{LossScaleConfig, LossScaler};
use anneal_tensor::optim::AdamW;
use anneal_tensor::{DropoutKey, Optimizer};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The error of a step whose loss scale cannot go lower (or that overflowed too many steps in a
/// row): the run has diverged. The step was not taken; the run writes a checkpoint and stops.
#[derive(Debug, Clone)]
pub struct LossScaleDiverged(pub String);

impl std::fmt::Display for LossScaleDiverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LossScaleDiverged {}

/// The training state of one model: its objective, optimizer and strategy, where its batches
/// come from, its learning-rate schedule and the steps taken.
pub struct Trainer {
    model: Box<dyn TrainModel>,
    objective: Box<dyn Objective>,
    optimizer: Box<dyn Optimizer>,
    strategy: Box<dyn Strategy>,
    source: Box<dyn BatchSource>,
    sampler: Sampler,
    schedule: CosineSchedule,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Global gradient-norm clip (0: none).
    pub grad_clip: f64,
    /// Measure the gradient norm of every step even when not clipping (on by default).
    pub measure_grad_norm: bool,
    step: u64,
    tokens_seen: u64,
    /// Dynamic loss scaling (f16 runs).
    loss_scaler: Option<LossScaler>,
    /// This trainer's data-parallel position `(rank, ranks)`: it runs rows
    /// `rank·b/ranks .. (rank+1)·b/ranks` of every global micro-batch of b rows.
    data_rank: (usize, usize),
}

/// The pieces a [`Trainer`] is made of.
pub struct TrainerParts {
    /// The model.
    pub model: Box<dyn TrainModel>,
    /// What it is trained for.
    pub objective: Box<dyn Objective>,
    /// The optimizer over the model's trainable parameters.
    pub optimizer: Box<dyn Optimizer>,
    /// How a step runs on the hardware.
    pub strategy: Box<dyn Strategy>,
    /// Where micro-batches come from.
    pub source: Box<dyn BatchSource>,
    /// The run's seed (sampling and dropout).
    pub seed: u64,
    /// The learning rate by step.
    pub schedule: CosineSchedule,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per step.
    pub grad_accum: usize,
    /// Global gradient-norm clip (0: none).
    pub grad_clip: f64,
}

impl Trainer {
    /// A trainer at step 0 from its parts.
    pub fn new(p: TrainerParts) -> Trainer {
        Trainer {
            model: p.model,
            objective: p.objective,
            optimizer: p.optimizer,
            strategy: p.strategy,
            source: p.source,
            sampler: Sampler { seed: p.seed },
            schedule: p.schedule,
            batch_size: p.batch_size,
            grad_accum: p.grad_accum.max(1),
            grad_clip: p.grad_clip,
            measure_grad_norm: true,
            step: 0,
            tokens_seen: 0,
            loss_scaler: None,
            data_rank: (0, 1),
        }
    }

    /// This trainer with dynamic loss scaling: each step's loss is multiplied by the scale
    /// before backward, a step whose gradients overflow is skipped, and the scale and the skipped
    /// steps are reported in every step's metrics (`loss_scale`, `skipped_steps`).
    pub fn with_loss_scaling(mut self, config: LossScaleConfig) -> Result<Trainer> {
        self.loss_scaler = Some(LossScaler::new(config)?);
        Ok(self)
    }

    /// The loss scale's state as words for a broadcast: present, then
    /// [`LossScaler::to_state`]'s numbers as bits.
    fn loss_scale_words(state: &[f64]) -> [u64; 5] {
        let mut w = [0u64; 5];
        if state.len() == 4 {
            w[0] = 1;
            for (w, x) in w[1..].iter_mut().zip(state) {
                *w = x.to_bits();
            }
        }
        w
    }

    /// [`Trainer::loss_scale_words`] read back: the state's numbers, or none.
    fn loss_scale_of_words(w: &[u64]) -> Vec<f64> {
        match w {
            [1, rest @ ..] => rest.iter().map(|&b| f64::from_bits(b)).collect(),
            _ => Vec::new(),
        }
    }

    /// Takes a checkpoint's loss-scale state (`saved`, empty when it had none): resumed exactly
    /// when this run scales its loss, a fresh scale when the checkpoint had none, dropped when
    /// this run does not scale.
    fn restore_loss_scale(&mut self, saved: &[f64]) -> Result<()> {
        if let Some(scaler) = &mut self.loss_scaler {
            let config = scaler.config();
            *scaler = match saved {
                [a, b, c, d] => LossScaler::from_state(config, [*a, *b, *c, *d])?,
                _ => LossScaler::new(config)?,
            };
        }
        Ok(())
    }

    /// The loss scale's state for a checkpoint (empty without one).
    fn loss_scale_state(&self) -> Vec<f64> {
        self.loss_scaler
            .map_or_else(Vec::new, |s| s.to_state().to_vec())
    }

    /// This trainer as rank `rank` of `ranks` data-parallel replicas: every step it draws the
    /// same global micro-batches as a single trainer would and runs its equal share of their
    /// rows (its strategy reduces the gradients across the replicas). Fails when `batch_size`
    /// does not split into `ranks` equal shares.
    pub fn with_data_rank(mut self, rank: usize, ranks: usize) -> Result<Trainer> {
        if ranks == 0 || rank >= ranks || !self.batch_size.is_multiple_of(ranks) {
            anyhow::bail!(
                "train.batch_size = {} does not split into {ranks} equal data-parallel shares \
                 (rank {rank}); use a multiple of {ranks}",
                self.batch_size
            );
        }
        self.data_rank = (rank, ranks);
        Ok(self)
    }

    /// The model.
    pub fn model(&self) -> &dyn TrainModel {
        &*self.model
    }

    /// The objective.
    pub fn objective(&self) -> &dyn Objective {
        &*self.objective
    }

    /// The model, the trainer given up.
    pub fn into_model(self) -> Box<dyn TrainModel> {
        self.model
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &dyn Optimizer {
        &*self.optimizer
    }

    /// How steps run on the hardware.
    pub fn strategy(&self) -> &dyn Strategy {
        &*self.strategy
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Tokens trained on.
    pub fn tokens_seen(&self) -> u64 {
        self.tokens_seen
    }

    /// The learning rate of the next step.
    pub fn lr(&self) -> f64 {
        self.schedule.lr(self.step)
    }

    /// One optimizer step; see [`Trainer::step_with`].
    pub fn step(&mut self) -> Result<StepOutput> {
        self.step_with(&mut || {})
    }

    /// One optimizer step: the sampler's batch for this step, cut into micro-batches (and, on a
    /// data-parallel rank, into this rank's share of each), forward and backward through the
    /// strategy, the optimizer at the scheduled learning rate. `after_forward` runs after each
    /// forward pass, outside the timed phases.
    ///
    /// The step's batch is drawn whole (`grad_accum × batch_size` rows) and its dropout masks are
    /// keyed by each row's place in it, so how it is cut (micro-batches, ranks) changes neither
    /// the examples nor the elements dropped: every layout trains on the same step.
    pub fn step_with(&mut self, after_forward: &mut dyn FnMut()) -> Result<StepOutput> {
        let step = self.step;
        let b = self.batch_size;
        let whole = self
            .source
            .draw(&self.sampler, step, 0, self.grad_accum * b);
        let (rank, ranks) = self.data_rank;
        let share = b / ranks;
        let firsts: Vec<usize> = (0..self.grad_accum).map(|m| m * b + rank * share).collect();
        let tokens = whole.tokens() as u64;
        let mine: Vec<_> = if firsts.len() == 1 && ranks == 1 {
            vec![whole]
        } else {
            firsts.iter().map(|&f| whole.rows(f..f + share)).collect()
        };
        let seed = self.sampler.seed_of(Stream::Dropout, &[step, 0]);
        let keys: Vec<DropoutKey> = firsts
            .iter()
            .map(|&f| DropoutKey {
                seed,
                first_row: f as u64,
            })
            .collect();
        let loss_scale = self.loss_scaler.map_or(1.0, |s| s.scale());
        let settings = StepSettings {
            lr: self.lr() as f32,
            grad_clip: self.grad_clip as f32,
            measure_grad_norm: self.measure_grad_norm,
            loss_scale,
        };
        let mut out = self
            .strategy
            .step(
                &*self.model,
                &mut *self.objective,
                &mut *self.optimizer,
                &mine,
                &keys,
                settings,
                after_forward,
            )
            .map_err(|e| {
                let advice = if e.downcast_ref::<NonFiniteLoss>().is_some() {
                    format!(
                        "; lower train.lr (its peak is {}) or resume from an earlier checkpoint",
                        self.schedule.max_lr
                    )
                } else {
                    String::new()
                };
                e.context(format!("step {}{advice}", step + 1))
            })?;
        if let Some(scaler) = &mut self.loss_scaler {
            scaler
                .update(!out.skipped)
                .map_err(|e| anyhow::Error::new(LossScaleDiverged(e.to_string())))
                .with_context(|| format!("step {}", step + 1))?;
            out.metrics.push(("loss_scale".into(), loss_scale as f64));
            out.metrics
                .push(("skipped_steps".into(), scaler.skipped() as f64));
        }
        self.step += 1;
        self.tokens_seen += tokens;
        self.objective
            .after_optimizer_step(&*self.model, self.step)?;
        Ok(out)
    }

    /// Mean next-token loss over `batches` fixed batches of windows of `set`.
    pub fn evaluate(&self, set: &ShardSet, seed: u64, batches: usize, seq: usize) -> Result<f64> {
        self.evaluate_on(set, seed, batches, seq, None)
    }

    /// [`Trainer::evaluate`] shared by the ranks of `group` (collective): rank r scores batches
    /// r, r + ranks, …, and every rank receives every batch's mean and adds them in batch order,
    /// so the loss is the one a single device computes, bit for bit. Under tensor parallelism
    /// `group` is the whole job: the `tp` ranks of a data rank score its batches together.
    pub fn evaluate_on(
        &self,
        set: &ShardSet,
        seed: u64,
        batches: usize,
        seq: usize,
        group: Option<&dyn anneal_dist::Communicator>,
    ) -> Result<f64> {
        let (rank, ranks) = match group {
            Some(g) if g.size() > self.data_rank.1 => self.data_rank,
            Some(g) => (g.rank(), g.size()),
            None => (0, 1),
        };
        // The world ranks of data rank d start at d·tp (tensor-parallel ranks are neighbours).
        let tp = self.model.parallel().map_or(1, |p| p.tensor_parallel().1);
        let (model, strategy) = (&*self.model, &*self.strategy);
        // Where a forward is itself collective across the data ranks (ZeRO-3 gathers each
        // parameter), every rank runs as many forwards: those short of a batch repeat one and
        // drop its loss.
        let per = batches.div_ceil(ranks);
        let collective = group.is_some() && model.parallel().is_some_and(|p| p.splits_parameters());
        let indices: Vec<usize> = if collective {
            (0..per)
                .map(|j| (rank + j * ranks) % batches.max(1))
                .collect()
        } else {
            (rank..batches).step_by(ranks).collect()
        };
        let kept = (rank..batches).step_by(ranks).count();
        let mut mine = crate::eval::batch_losses_by(
            set,
            seed,
            indices.into_iter(),
            self.batch_size,
            seq,
            &mut |w| match strategy.evaluate(model, w).map_err(|e| {
                anneal_tensor::Error::Invalid {
                    op: "evaluate",
                    reason: format!("{e:#}"),
                }
            })? {
                Some(loss) => Ok(loss),
                None => {
                    Ok(crate::eval::window_nll(model, &w.ids, &w.targets, w.batch, w.seq)?.mean())
                }
            },
        )?;
        mine.truncate(kept);
        let Some(group) = group else {
            return Ok(mine.iter().sum::<f64>() / batches as f64);
        };
        // f64 means travel as exact bit patterns, each rank's padded to the same count.
        let mut words = anneal_dist::words_to_f32(mine.iter().map(|m| m.to_bits()));
        words.resize(2 * per, 0.0);
        let all: Vec<f64> = anneal_dist::f32_to_words(&group.all_gather(words)?)
            .map(f64::from_bits)
            .collect();
        // Batch i was data rank i % ranks's (i / ranks)-th (read from the first rank of its
        // tensor-parallel group).
        let sum: f64 = (0..batches)
            .map(|i| all[(i % ranks) * tp * per + i / ranks])
            .sum();
        Ok(sum / batches as f64)
    }

    /// Writes a checkpoint of the parameters, the optimizer's and the objective's state under
    /// `root`; `state` describes the run (its step is set here). Collective when the strategy
    /// spans ranks: every rank calls it, the optimizer state is gathered whole, and rank 0 writes
    /// the checkpoint and returns its path (the others return `None`). The checkpoint is the same
    /// whatever the layout, so it resumes under any other.
    pub fn save(&self, root: &Path, mut state: TrainerState) -> Result<Option<PathBuf>> {
        // A strategy whose rank holds the whole state lets the file be written from it in
        // place; the others gather it (collectively).
        let optimizer = if self.strategy.holds_whole_optimizer_state() {
            Some(checkpoint::OptimizerState::InPlace(
                &*self.optimizer,
                self.model.params(),
            ))
        } else {
            self.strategy
                .gather_optimizer_state(&*self.model, &*self.optimizer)?
                .map(checkpoint::OptimizerState::Gathered)
        };
        let named = self.strategy.gather_parameters(&*self.model)?;
        let (Some(optimizer), Some(named)) = (optimizer, named) else {
            return Ok(None);
        };
        state.step = self.step;
        state.tokens_seen = self.tokens_seen;
        state.loss_scale = self.loss_scale_state();
        state.objective = self.objective.name().to_string();
        state.data.steps_drawn = self.step;
        // One device's layout is its own whole one.
        let whole: Arc<dyn ParallelContext> = self
            .split_context()
            .unwrap_or_else(|| Arc::new(anneal_nn::layers::SingleDevice));
        let layout = checkpoint::whole_state_layout(self.model.params(), whole.as_ref());
        checkpoint::save_whole(
            root,
            &named,
            layout,
            optimizer,
            self.objective.state(),
            state,
        )
        .map(Some)
    }

    /// The model's parallel context when this rank holds parts of its parameters (tensor
    /// parallel slices, a pipeline stage's layers, ZeRO-3 shards).
    fn split_context(&self) -> Option<Arc<dyn ParallelContext>> {
        self.model
            .parallel()
            .filter(|p| p.splits_parameters())
            .cloned()
    }

    /// Fails unless `loaded` was trained for this trainer's objective (or names none).
    fn check_objective(&self, loaded: &checkpoint::Loaded) -> Result<()> {
        let (saved, ours) = (&loaded.state.objective, self.objective.name());
        if !saved.is_empty() && saved != ours {
            anyhow::bail!(
                "{} was trained for the objective {saved}, not {ours}: a checkpoint resumes only \
                 the same objective",
                loaded.dir.display()
            );
        }
        Ok(())
    }

    /// Restores parameters, optimizer, objective and position from a loaded checkpoint.
    pub fn restore(&mut self, loaded: &checkpoint::Loaded) -> Result<()> {
        self.check_objective(loaded)?;
        let params = self.model.params();
        loaded.restore_params(params)?;
        let state = checkpoint::optimizer_state(params, loaded)?;
        self.strategy
            .restore_optimizer_state(
                &*self.model,
                &mut *self.optimizer,
                loaded.state.optimizer_steps(),
                &state,
            )
            .with_context(|| {
                format!(
                    "restoring the optimizer from {}",
                    loaded.dir.join("optimizer.safetensors").display()
                )
            })?;
        let objective = loaded
            .objective
            .iter()
            .map(|(k, t)| (k.clone(), t.to_vec_f32()))
            .collect();
        self.objective
            .load_state(&objective)
            .with_context(|| format!("restoring the objective from {}", loaded.dir.display()))?;
        self.step = loaded.state.step;
        self.tokens_seen = loaded.state.tokens_seen;
        self.restore_loss_scale(&loaded.state.loss_scale)?;
        Ok(())
    }

    /// [`Trainer::restore`] for every rank of `group` from the checkpoint rank 0 alone has read
    /// (`loaded` is `Some` there, `None` elsewhere; collective): rank 0 restores it, then
    /// broadcasts the parameters, sends each rank the part of every optimizer state vector it
    /// keeps ([`Strategy::optimizer_shard`]: its shard under ZeRO), and broadcasts the objective's
    /// state and the position. Only rank 0 reads the checkpoint, so the
    /// other ranks need not see its filesystem, and a process of several ranks reads it once.
    pub fn restore_shared(
        &mut self,
        loaded: Option<&checkpoint::Loaded>,
        group: &dyn anneal_dist::Communicator,
    ) -> Result<()> {
        use anneal_dist::{f32_to_words, words_to_f32};
        let lead = group.rank() == 0;
        if lead != loaded.is_some() {
            anyhow::bail!("restore_shared: rank 0, and only rank 0, holds the checkpoint");
        }
        if let Some(parallel) = self.split_context() {
            return self.restore_split(loaded, group, parallel.as_ref());
        }
        if let Some(loaded) = loaded {
            self.restore(loaded)?;
        }
        let params = self.model.params();
        for (name, t) in params.named() {
            let values = group.broadcast(if lead { t.to_vec_f32() } else { Vec::new() }, 0)?;
            if !lead {
                let id = params.id(&name)?;
                params.set(id, &anneal_tensor::Tensor::from_f32(values, t.shape())?)?;
            }
        }
        let mut words = vec![self.step, self.tokens_seen];
        words.extend(Self::loss_scale_words(&self.loss_scale_state()));
        let position = group.broadcast(words_to_f32(words), 0)?;
        let position: Vec<u64> = f32_to_words(&position).collect();
        let saved_scale = Self::loss_scale_of_words(&position[2..]);
        let optimizer_steps = checkpoint::optimizer_steps(position[0], &saved_scale);
        // Rank 0's whole optimizer state, one vector at a time, under the names every rank's
        // optimizer keeps: each rank receives the part it keeps (its shard under ZeRO), so no
        // rank but 0 ever holds a whole vector.
        const TAG: u32 = 0x5e5e;
        let total = params.trainable_numel();
        let shard = self.strategy.optimizer_shard(&*self.model);
        let shards = group.all_gather(words_to_f32([shard.start as u64, shard.end as u64]))?;
        let shards: Vec<u64> = f32_to_words(&shards).collect();
        let whole = match loaded {
            Some(loaded) => checkpoint::optimizer_state(params, loaded)?,
            None => Default::default(),
        };
        let names: Vec<String> = self
            .optimizer
            .state(params)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let mut state = std::collections::HashMap::new();
        for name in names {
            let values = if lead {
                let v = whole.get(&name).map(Vec::as_slice).unwrap_or_default();
                for (r, range) in shards.chunks(2).enumerate().skip(1) {
                    // Vectors over every trainable element are cut; others go whole.
                    let part = match v.len() == total {
                        true => &v[range[0] as usize..range[1] as usize],
                        false => v,
                    };
                    group.send(part.to_vec(), r, TAG)?;
                }
                Vec::new()
            } else {
                group.recv(0, TAG)?
            };
            state.insert(name, values);
        }
        drop(whole);
        if !lead {
            self.strategy.restore_optimizer_state(
                &*self.model,
                &mut *self.optimizer,
                optimizer_steps,
                &state,
            )?;
        }
        drop(state);
        let mut objective = std::collections::HashMap::new();
        for (name, values) in self.objective.state() {
            objective.insert(name, group.broadcast(values, 0)?);
        }
        if !lead {
            self.objective.load_state(&objective)?;
            self.step = position[0];
            self.tokens_seen = position[1];
            self.restore_loss_scale(&saved_scale)?;
        }
        Ok(())
    }

    /// [`Trainer::restore_shared`] for a model split across tensor-parallel groups: rank 0
    /// broadcasts each whole parameter and optimizer state vector, and every rank keeps its
    /// slices (so a checkpoint written under any layout resumes under this one).
    fn restore_split(
        &mut self,
        loaded: Option<&checkpoint::Loaded>,
        group: &dyn anneal_dist::Communicator,
        parallel: &dyn ParallelContext,
    ) -> Result<()> {
        use anneal_dist::{f32_to_words, words_to_f32};
        let params = self.model.params();
        let layout = checkpoint::whole_state_layout(params, parallel);
        let whole_state = match loaded {
            Some(loaded) => {
                self.check_objective(loaded)?;
                checkpoint::optimizer_state_for(layout, loaded)?
            }
            None => Default::default(),
        };
        for (name, local) in params.named() {
            let shape = parallel.whole_shape(&name, local.shape());
            let values = match loaded {
                Some(loaded) => {
                    let t = loaded.model.get(&name).ok_or_else(|| {
                        anyhow::anyhow!(
                            "{}: no parameter {name} in the checkpoint",
                            loaded.dir.display()
                        )
                    })?;
                    if t.shape() != shape.as_slice() {
                        anyhow::bail!(
                            "{}: {name} has shape {:?} in the checkpoint, {shape:?} in this model",
                            loaded.dir.display(),
                            t.shape()
                        );
                    }
                    group.broadcast(t.to_vec_f32(), 0)?
                }
                None => group.broadcast(Vec::new(), 0)?,
            };
            let whole = anneal_tensor::Tensor::from_f32(values, &shape)?;
            let mine = parallel.shard(&name, &whole, parallel.split_of(&name))?;
            params.set(params.id(&name)?, &mine)?;
        }
        let lead_position = loaded.map_or_else(
            || vec![0; 7],
            |l| {
                let mut w = vec![l.state.step, l.state.tokens_seen];
                w.extend(Self::loss_scale_words(&l.state.loss_scale));
                w
            },
        );
        let position = group.broadcast(words_to_f32(lead_position), 0)?;
        let position: Vec<u64> = f32_to_words(&position).collect();
        let saved_scale = Self::loss_scale_of_words(&position[2..]);
        let optimizer_steps = checkpoint::optimizer_steps(position[0], &saved_scale);
        let names: Vec<String> = self
            .optimizer
            .state(params)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let mut state = std::collections::HashMap::new();
        for name in names {
            let mine = whole_state.get(&name).cloned().unwrap_or_default();
            state.insert(name, group.broadcast(mine, 0)?);
        }
        drop(whole_state);
        self.strategy.restore_optimizer_state(
            &*self.model,
            &mut *self.optimizer,
            optimizer_steps,
            &state,
        )?;
        let saved_objective: std::collections::HashMap<String, Vec<f32>> = loaded
            .map(|l| {
                l.objective
                    .iter()
                    .map(|(k, t)| (k.clone(), t.to_vec_f32()))
                    .collect()
            })
            .unwrap_or_default();
        let mut objective = std::collections::HashMap::new();
        for (name, values) in self.objective.state() {
            let mine = saved_objective.get(&name).cloned().unwrap_or(values);
            objective.insert(name, group.broadcast(mine, 0)?);
        }
        self.objective.load_state(&objective)?;
        self.step = position[0];
        self.tokens_seen = position[1];
        self.restore_loss_scale(&saved_scale)?;
        Ok(())
    }
}

/// Wall time by kind of op, forward and backward, summed over the steps run through
/// [`OpProfile::step`] (the engine's per-thread op profiles).
#[derive(Default)]
pub struct OpProfile {
    times: [std::collections::HashMap<&'static str, (u32, f64)>; 2],
    steps: u64,
}

impl OpProfile {
    /// One trainer step with every op's time recorded.
    pub fn step(&mut self, trainer: &mut Trainer) -> Result<crate::strategy::StepOutput> {
        use anneal_tensor::autograd;
        autograd::start_forward_profile();
        autograd::start_backward_profile();
        let out = trainer.step();
        let taken = [
            autograd::take_forward_profile(),
            autograd::take_backward_profile(),
        ];
        for (map, ops) in self.times.iter_mut().zip(taken) {
            for (name, calls, seconds) in ops {
                let e = map.entry(name).or_default();
                e.0 += calls;
                e.1 += seconds;
            }
        }
        self.steps += 1;
        out
    }

    /// ("forward" / "backward", the `top` slowest ops as "name 1.2 ms (3 calls)" per step).
    pub fn report(&self, top: usize) -> Vec<(&'static str, String)> {
        let per_step = self.steps.max(1) as f64;
        ["forward", "backward"]
            .into_iter()
            .zip(&self.times)
            .map(|(pass, map)| {
                let mut ops: Vec<_> = map.iter().collect();
                ops.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
                let lines: Vec<String> = ops
                    .iter()
                    .take(top)
                    .map(|(name, (calls, s))| {
                        format!(
                            "{name} {:.2} ms ({} calls)",
                            1e3 * s / per_step,
                            *calls as f64 / per_step
                        )
                    })
                    .collect();
                (pass, lines.join(", "))
            })
            .collect()
    }
}

/// A GPT pretraining trainer as `config` describes it (model, AdamW, causal LM, one device),
/// drawing from `train` windows.
pub fn pretraining(config: &RunConfig, vocab_size: usize, train: ShardSet) -> Result<Trainer> {
    let source = WindowSource {
        set: train,
        seq: config.model.block_size,
    };
    pretraining_on(config, vocab_size, Box::new(source), None)
}

/// [`pretraining`] from any batch source, as one rank of a job over `world` (one device when
/// `None`), laid out as
/// `config`'s `[parallel]` section says: the strategy of that layout, an optimizer over this
/// rank's shard under ZeRO, and this rank's share of every batch. Every rank starts from rank
/// 0's initial parameters (broadcast, so replicas agree even where initialisation would not).
pub fn pretraining_on(
    config: &RunConfig,
    vocab_size: usize,
    source: Box<dyn BatchSource>,
    world: Option<Box<dyn anneal_dist::Communicator>>,
) -> Result<Trainer> {
    let t = &config.train;
    let adamw = config.adamw()?;
    let gpt = config.gpt_config(vocab_size)?;
    let (mut model, strategy, optimizer, data_rank): (_, Box<dyn crate::strategy::Strategy>, _, _) =
        match world {
            None => {
                let model = Gpt::new(gpt, t.seed)?;
                let optimizer = AdamW::new(&model.params, adamw);
                (model, Box::new(SingleDevice), optimizer, (0, 1))
            }
            Some(world)
                if world.size() > 1
                    && config.layout(world.size())?.zero == 3
                    && config.layout(world.size())?.tp > 1 =>
            {
                // ZeRO-3 beside tensor parallelism: each tensor-parallel slice sharded over the
                // data ranks holding the same slice.
                let layout = config.layout(world.size())?;
                let mesh = crate::mesh::Mesh::split(world, &layout)?;
                let tensor = mesh
                    .tensor
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("tensor parallelism without its group"))?;
                let data: Arc<dyn anneal_dist::Communicator> = Arc::from(mesh.data);
                let rank = (data.rank(), data.size());
                let zero = Arc::new(anneal_dist::ZeroThree::new(data.clone()));
                let parallel = Arc::new(
                    anneal_dist::ModelParallel::new(tensor)
                        .with_sequence_parallel(layout.sequence_parallel)
                        .with_zero_three(zero.clone()),
                );
                let model = Gpt::new_in(gpt, t.seed, parallel.clone())?;
                let optimizer = AdamW::new(&model.params, adamw);
                let inner = Box::new(crate::strategy::ZeroThree::new(data.clone(), zero));
                let strategy: Box<dyn crate::strategy::Strategy> = Box::new(
                    crate::mesh::WithModelParallel::model_parallel(inner, parallel, None)
                        .with_lead_group(data),
                );
                (model, strategy, optimizer, rank)
            }
            Some(world) if world.size() > 1 && config.layout(world.size())?.zero == 3 => {
                // Data rank d is shard d % sharding of replica d / sharding.
                let layout = config.layout(world.size())?;
                let rank = (world.rank(), world.size());
                let (group, replicas): (Arc<dyn anneal_dist::Communicator>, _) = if layout.dp == 1 {
                    (Arc::from(world), None)
                } else {
                    let (sharding, replicas) =
                        anneal_dist::hybrid_groups(world.as_ref(), layout.dp, layout.sharding)?;
                    (Arc::from(sharding), Some(replicas))
                };
                let zero = Arc::new(anneal_dist::ZeroThree::new(group.clone()));
                // Every rank draws the whole model from the seed and keeps its shards.
                let model = Gpt::new_in(gpt, t.seed, zero.clone())?;
                let optimizer = AdamW::new(&model.params, adamw);
                let mut inner = crate::strategy::ZeroThree::new(group.clone(), zero.clone());
                if let Some(replicas) = replicas {
                    inner = inner.hybrid(replicas);
                }
                let inner = Box::new(inner);
                let strategy: Box<dyn crate::strategy::Strategy> = Box::new(
                    crate::mesh::WithModelParallel::new(inner, zero, group, None),
                );
                (model, strategy, optimizer, rank)
            }
            Some(world)
                if world.size() > 1
                    && config.layout(world.size())?.ep > 1
                    && config.layout(world.size())?.model_ranks() == 1 =>
            {
                let ep = config.layout(world.size())?.ep;
                // Groups of `ep` neighbouring ranks split the experts; the ranks holding the
                // same experts form the expert-data-parallel group.
                let (group, experts) =
                    anneal_dist::hybrid_groups(world.as_ref(), world.size() / ep, ep)?;
                let group: Arc<dyn anneal_dist::Communicator> = Arc::from(group);
                let context = Arc::new(anneal_dist::ExpertParallel::new(group.clone()));
                let model = Gpt::new_in(gpt, t.seed, context.clone())?;
                let rank = (world.rank(), world.size());
                let inner = crate::strategy::ExpertDataParallel::new(world, experts, group.clone());
                let zero_one = config.parallel.zero == 1;
                let (inner, optimizer) =
                    crate::strategy::with_adamw(inner, zero_one, &model, adamw)?;
                let strategy: Box<dyn crate::strategy::Strategy> = Box::new(
                    crate::mesh::WithModelParallel::new(inner, context, group, None),
                );
                (model, strategy, optimizer, rank)
            }
            Some(world) => {
                let layout = config.layout(world.size())?;
                let mesh = crate::mesh::Mesh::split(world, &layout)?;
                let layers = match mesh.pipeline {
                    Some(_) => crate::mesh::stage_layers(&config.stage_blocks(layout.pp)?)
                        [mesh.stage()]
                    .clone(),
                    None => 0..gpt.n_layer + 2,
                };
                // With expert parallelism, groups of `ep` neighbouring data ranks split the
                // experts; the data ranks holding the same experts form the
                // expert-data-parallel group.
                let experts = match layout.ep {
                    1 => None,
                    ep => {
                        let data = mesh.data.as_ref();
                        let (group, experts) =
                            anneal_dist::hybrid_groups(data, data.size() / ep, ep)?;
                        let group: Arc<dyn anneal_dist::Communicator> = Arc::from(group);
                        Some((group, experts))
                    }
                };
                // This rank's part of the model: its tensor-parallel slices of its stage's
                // layers (and its share of the experts).
                let parallel = mesh.tensor.clone().map(|group| {
                    let mut context = anneal_dist::ModelParallel::new(group)
                        .with_sequence_parallel(layout.sequence_parallel);
                    if let Some((ep, _)) = &experts {
                        context = context
                            .with_experts(Arc::new(anneal_dist::ExpertParallel::new(ep.clone())));
                    }
                    let context = match mesh.pipeline {
                        Some(_) => {
                            let (config, layers) = (gpt.clone(), layers.clone());
                            context.holding(Arc::new(move |name: &str| {
                                Gpt::layers_of(&config, name)
                                    .iter()
                                    .any(|l| layers.contains(l))
                            }))
                        }
                        None => context,
                    };
                    Arc::new(context)
                });
                let mut model = match &parallel {
                    Some(p) => Gpt::new_in(gpt.clone(), t.seed, p.clone())?,
                    None => Gpt::new(gpt.clone(), t.seed)?,
                };
                let crate::mesh::Mesh {
                    data,
                    pipeline,
                    embedding,
                    ..
                } = mesh;
                let rank = (data.rank(), data.size());
                let initial = model
                    .params
                    .trainable_values(0..model.params.trainable_numel());
                // The ranks holding the same parameters start from the first one's values.
                let same = experts.as_ref().map_or(data.as_ref(), |(_, e)| e.as_ref());
                let initial = same.broadcast(initial, 0)?;
                model.params.set_trainable_values(0, &initial);
                let (ep_group, expert_data) = experts.unzip();
                let (strategy, optimizer): (Box<dyn crate::strategy::Strategy>, _) = match &pipeline
                {
                    Some(pipe) => {
                        let tied = embedding
                            .filter(|_| gpt.tie_embeddings)
                            .map(|g| (g, "transformer.wte.weight".to_string()));
                        let data = (data.size() > 1).then_some(data);
                        let mut pipeline = crate::pipeline::Pipeline::new(
                            pipe.clone(),
                            layers,
                            layout.one_f_one_b,
                            layout.micro_batches,
                            tied,
                            data,
                        );
                        if gpt.moe.is_some() {
                            pipeline = pipeline.with_stage_losses();
                        }
                        if let Some(experts) = expert_data {
                            pipeline = pipeline.with_expert_data(experts);
                        }
                        crate::strategy::with_adamw(pipeline, layout.zero == 1, &model, adamw)?
                    }
                    None if expert_data.is_some() => {
                        let ep = ep_group.clone().expect("an expert-parallel group");
                        let experts = expert_data.expect("an expert-data-parallel group");
                        let inner = crate::strategy::ExpertDataParallel::new(data, experts, ep);
                        crate::strategy::with_adamw(inner, layout.zero == 1, &model, adamw)?
                    }
                    None => {
                        let data_layout = crate::config::Layout {
                            tp: 1,
                            pp: 1,
                            ..layout
                        };
                        let (strategy, shard) =
                            crate::strategy::for_layout(data_layout, data, &mut model)?;
                        let optimizer = if layout.zero > 0 && layout.data_ranks() > 1 {
                            AdamW::shard(&model.params, adamw, shard)?
                        } else {
                            AdamW::new(&model.params, adamw)
                        };
                        (strategy, optimizer)
                    }
                };
                let strategy: Box<dyn crate::strategy::Strategy> = match parallel {
                    Some(p) => {
                        let split =
                            crate::mesh::WithModelParallel::model_parallel(strategy, p, pipeline);
                        Box::new(match ep_group {
                            Some(ep) => split.with_lead_group(ep),
                            None => split,
                        })
                    }
                    None => strategy,
                };
                (model, strategy, optimizer, rank)
            }
        };
    // bf16 gradients are for one device ([`RunConfig::layout`] refuses them over ranks).
    model.params.set_grad_dtype(config.grad_dtype()?)?;
    let trainer = Trainer::new(TrainerParts {
        model: Box::new(model),
        objective: Box::new(CausalLm),
        optimizer: Box::new(optimizer),
        strategy,
        source,
        seed: t.seed,
        schedule: CosineSchedule {
            max_lr: t.lr,
            min_lr: t.min_lr,
            warmup_steps: t.warmup_steps,
            decay_steps: config.decay_steps(),
        },
        batch_size: t.batch_size,
        grad_accum: t.grad_accum,
        grad_clip: t.grad_clip,
    });
    let trainer = if config.dtype()? == anneal_tensor::DType::F16 {
        trainer.with_loss_scaling(LossScaleConfig::default())?
    } else {
        trainer
    };
    trainer.with_data_rank(data_rank.0, data_rank.1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ModelInput, ModelOutput};
    use crate::objectives::Loss;
    use anneal_data::{Batch, TokenWindows};
    use anneal_nn::GptConfig;
    use anneal_tensor::{ParamStore, Tensor};
    use std::collections::HashMap;

    /// Windows of a short repeating token pattern.
    struct Pattern;

    impl BatchSource for Pattern {
        fn draw(&self, sampler: &Sampler, step: u64, micro: u64, batch: usize) -> Batch {
            let seq = 8;
            let offsets = sampler.offsets(Stream::Sample, &[step, micro], batch, 50);
            let token = |i: u64| (i * 3 % 11) as u32;
            let ids = offsets
                .iter()
                .flat_map(|&o| (o..o + seq).map(token))
                .collect();
            let targets = offsets
                .iter()
                .flat_map(|&o| (o + 1..o + seq + 1).map(|i| token(i) as i64))
                .collect();
            Batch::Tokens(TokenWindows {
                ids,
                targets,
                batch,
                seq: seq as usize,
            })
        }
    }

    /// A GPT whose layers add a constant auxiliary loss, as an MoE layer adds its balancing loss.
    struct WithAux(Gpt);

    impl TrainModel for WithAux {
        fn params(&self) -> &ParamStore {
            &self.0.params
        }
        fn params_mut(&mut self) -> &mut ParamStore {
            &mut self.0.params
        }
        fn forward(
            &self,
            input: &ModelInput<'_>,
            seed: Option<DropoutKey>,
        ) -> anneal_tensor::Result<ModelOutput> {
            let mut out = TrainModel::forward(&self.0, input, seed)?;
            out.aux_losses
                .push(("balance".into(), Tensor::from_f32(vec![0.25], &[])?));
            Ok(out)
        }
        fn flops_per_token(&self, seq: usize) -> f64 {
            self.0.config.flops_per_token(seq)
        }
    }

    /// A GPT with an auxiliary loss of value 0 whose gradient is 1e30 on each of the token
    /// embedding's 176 elements (c·(w − w̄) with w̄ a detached copy): under a loss scale above
    /// 2^24.6 the scaled gradients' norm, 1e30·scale·√176, overflows f32.
    struct Spiky(Gpt);

    impl TrainModel for Spiky {
        fn params(&self) -> &ParamStore {
            &self.0.params
        }
        fn params_mut(&mut self) -> &mut ParamStore {
            &mut self.0.params
        }
        fn forward(
            &self,
            input: &ModelInput<'_>,
            seed: Option<DropoutKey>,
        ) -> anneal_tensor::Result<ModelOutput> {
            let mut out = TrainModel::forward(&self.0, input, seed)?;
            let w = self.0.params.by_name("transformer.wte.weight")?;
            let spike = w.sub(&w.detach())?.scale(1e30).sum_all()?;
            out.aux_losses.push(("spike".into(), spike));
            Ok(out)
        }
        fn flops_per_token(&self, seq: usize) -> f64 {
            self.0.config.flops_per_token(seq)
        }
    }

    fn spiky(scaling: LossScaleConfig) -> Trainer {
        trainer(Box::new(Spiky(gpt())), Box::new(CausalLm), 1)
            .with_loss_scaling(scaling)
            .unwrap()
    }

    #[test]
    fn overflowing_steps_are_skipped_the_scale_halved_and_a_resume_after_them_is_exact() {
        // From 2⁴⁰ the scale halves on each overflow to 2²⁴, where the norm fits in f32.
        let scaling = LossScaleConfig {
            initial: 2f32.powi(40),
            growth_interval: 3,
            ..LossScaleConfig::default()
        };
        let metric =
            |o: &StepOutput, name: &str| o.metrics.iter().find(|(n, _)| n == name).unwrap().1;
        let mut t = spiky(scaling);
        let before = t.model().params().trainable_values(0..64);
        let outs: Vec<StepOutput> = (0..21).map(|_| t.step().unwrap()).collect();
        let skipped = outs.iter().take_while(|o| o.skipped).count();
        assert_eq!(skipped, 16, "2⁴⁰ down to 2²⁴");
        assert_eq!(metric(&outs[0], "loss_scale"), 2f64.powi(40));
        assert_eq!(metric(&outs[16], "loss_scale"), 2f64.powi(24));
        assert!(outs[16..19]
            .iter()
            .all(|o| o.grad_norm > 1e30 && o.grad_norm < 2e31));
        // Three clean steps double the scale, which overflows again and halves.
        assert!(outs[19].skipped && metric(&outs[19], "loss_scale") == 2f64.powi(25));
        assert!(!outs[20].skipped && metric(&outs[20], "skipped_steps") == 17.0);
        assert_ne!(t.model().params().trainable_values(0..64), before);
        let want: Vec<u64> = outs.iter().map(|o| o.loss.to_bits()).collect();
        for stop in [5, 17] {
            let dir = tempfile::tempdir().unwrap();
            let mut first = spiky(scaling);
            let mut got: Vec<u64> = (0..stop)
                .map(|_| first.step().unwrap().loss.to_bits())
                .collect();
            let state = TrainerState {
                format: 1,
                ..TrainerState::default()
            };
            let saved = first.save(dir.path(), state).unwrap().unwrap();
            let loaded = checkpoint::load(&saved).unwrap();
            assert_eq!(loaded.state.loss_scale.len(), 4);
            let mut resumed = spiky(scaling);
            resumed.restore(&loaded).unwrap();
            got.extend((stop..21).map(|_| resumed.step().unwrap().loss.to_bits()));
            assert_eq!(got, want, "stopped after {stop}");
            assert_eq!(
                bits(resumed.model().params()),
                bits(t.model().params()),
                "stopped after {stop}"
            );
        }
    }

    fn bits(p: &ParamStore) -> Vec<u32> {
        p.trainable_values(0..p.trainable_numel())
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    #[test]
    fn a_run_that_overflows_too_many_steps_in_a_row_stops_untaken() {
        let mut t = spiky(LossScaleConfig {
            initial: 2f32.powi(40),
            max_skipped_in_a_row: 4,
            ..LossScaleConfig::default()
        });
        for _ in 0..4 {
            assert!(t.step().unwrap().skipped);
        }
        let e = t.step().unwrap_err();
        assert!(e.downcast_ref::<LossScaleDiverged>().is_some(), "{e:#}");
        let text = format!("{e:#}");
        assert!(
            text.contains("step 5") && text.contains("5 steps in a row overflowed"),
            "{text}"
        );
        assert_eq!(t.steps(), 4, "the failed step was not taken");
    }

    /// Causal LM that counts its optimizer steps as state it owns.
    #[derive(Default)]
    struct Counting(u64);

    impl Objective for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }
        fn inputs<'a>(&self, batch: &'a Batch) -> anneal_tensor::Result<ModelInput<'a>> {
            CausalLm.inputs(batch)
        }
        fn loss(&self, output: &ModelOutput, batch: &Batch) -> anneal_tensor::Result<Loss> {
            let mut loss = CausalLm.loss(output, batch)?;
            loss.metrics.push(("count".into(), self.0 as f64));
            Ok(loss)
        }
        fn after_optimizer_step(
            &mut self,
            _: &dyn TrainModel,
            step: u64,
        ) -> anneal_tensor::Result<()> {
            assert_eq!(step, self.0 + 1);
            self.0 = step;
            Ok(())
        }
        fn state(&self) -> Vec<(String, Vec<f32>)> {
            vec![("count".into(), vec![self.0 as f32])]
        }
        fn load_state(&mut self, state: &HashMap<String, Vec<f32>>) -> anneal_tensor::Result<()> {
            self.0 = state["count"][0] as u64;
            Ok(())
        }
    }

    fn trainer(model: Box<dyn TrainModel>, objective: Box<dyn Objective>, accum: usize) -> Trainer {
        let optimizer = Box::new(AdamW::new(
            model.params(),
            anneal_tensor::optim::AdamWConfig::default(),
        ));
        Trainer::new(TrainerParts {
            model,
            objective,
            optimizer,
            strategy: Box::new(SingleDevice),
            source: Box::new(Pattern),
            seed: 9,
            schedule: CosineSchedule {
                max_lr: 1e-2,
                min_lr: 1e-3,
                warmup_steps: 2,
                decay_steps: 20,
            },
            batch_size: 4,
            grad_accum: accum,
            grad_clip: 1.0,
        })
    }

    fn gpt() -> Gpt {
        let config = GptConfig {
            vocab_size: 11,
            block_size: 8,
            n_layer: 1,
            n_head: 2,
            n_embd: 16,
            dropout: 0.1,
            ..GptConfig::gpt2()
        };
        Gpt::new(config, 5).unwrap()
    }

    #[test]
    fn layers_auxiliary_losses_are_added_to_the_loss_and_logged() {
        let mut plain = trainer(Box::new(gpt()), Box::new(CausalLm), 2);
        let mut aux = trainer(Box::new(WithAux(gpt())), Box::new(CausalLm), 2);
        let (a, b) = (plain.step().unwrap(), aux.step().unwrap());
        assert!(
            (b.loss - a.loss - 0.25).abs() < 1e-6,
            "{} vs {}",
            b.loss,
            a.loss
        );
        assert_eq!(b.metrics, vec![("balance".to_string(), 0.25)]);
        // A constant adds no gradient: both took the same step.
        assert_eq!(a.grad_norm, b.grad_norm);
        assert_eq!(plain.tokens_seen(), 2 * 4 * 8);
    }

    #[test]
    fn data_parallel_trainers_repeat_the_single_one() {
        // Dropout off: masks are drawn per micro-batch tensor, so a rank's share of the rows
        // would be masked differently from the same rows of the whole batch.
        let gpt = || {
            let mut g = gpt();
            g.config.dropout = 0.0;
            Gpt::new(g.config.clone(), 5).unwrap()
        };
        let mut single = trainer(Box::new(gpt()), Box::new(CausalLm), 2);
        let want: Vec<f64> = (0..6).map(|_| single.step().unwrap().loss).collect();
        let got = anneal_dist::local::run(2, |comm| {
            let rank = anneal_dist::Communicator::rank(&comm);
            let mut t = trainer(Box::new(gpt()), Box::new(CausalLm), 2);
            t.strategy = Box::new(crate::strategy::DataParallel::new(Box::new(comm), 1 << 20));
            let mut t = t.with_data_rank(rank, 2)?;
            (0..6)
                .map(|_| t.step().map(|o| o.loss))
                .collect::<Result<Vec<f64>>>()
        })
        .unwrap();
        for losses in got {
            for (g, w) in losses.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5 * w.abs(), "{g} vs {w}");
            }
        }
        let e = trainer(Box::new(gpt()), Box::new(CausalLm), 1)
            .with_data_rank(0, 3)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("train.batch_size = 4 does not split into 3"),
            "{e}"
        );
    }

    #[test]
    fn a_resumed_trainer_repeats_the_uninterrupted_one_with_its_objective_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut straight = trainer(Box::new(gpt()), Box::<Counting>::default(), 2);
        let want: Vec<u64> = (0..6)
            .map(|_| straight.step().unwrap().loss.to_bits())
            .collect();

        let mut first = trainer(Box::new(gpt()), Box::<Counting>::default(), 2);
        let mut got: Vec<u64> = (0..3)
            .map(|_| first.step().unwrap().loss.to_bits())
            .collect();
        let state = TrainerState {
            format: 1,
            step: 0,
            seed: 9,
            data: Default::default(),
            tokens_seen: 0,
            config: String::new(),
            objective: String::new(),
            optimizer_layout: Vec::new(),
            tokenizer: String::new(),
            vocab_size: 11,
            files: Default::default(),
            loss_scale: Vec::new(),
        };
        let saved = first
            .save(dir.path(), state)
            .unwrap()
            .expect("one device writes");
        let loaded = checkpoint::load(&saved).unwrap();
        assert_eq!(loaded.objective["count"].to_vec_f32(), vec![3.0]);
        assert_eq!(loaded.state.objective, "counting");
        let mut other = trainer(Box::new(gpt()), Box::new(CausalLm), 2);
        let e = other.restore(&loaded).unwrap_err().to_string();
        assert!(e.contains("objective counting, not causal_lm"), "{e}");
        // Optimizer state laid out for other trainable parameters is refused by name.
        let mut frozen = gpt();
        frozen.params.train_only(|n| !n.contains("wpe"));
        let mut other = trainer(Box::new(frozen), Box::<Counting>::default(), 2);
        let e = format!("{:#}", other.restore(&loaded).unwrap_err());
        assert!(
            e.contains("transformer.wpe.weight") && e.contains("other trainable"),
            "{e}"
        );
        // A fresh trainer, restored from the checkpoint.
        let mut resumed = trainer(Box::new(gpt()), Box::<Counting>::default(), 2);
        resumed.restore(&loaded).unwrap();
        assert_eq!(resumed.steps(), 3);
        for _ in 0..3 {
            let out = resumed.step().unwrap();
            assert_eq!(out.metrics.last().unwrap().1, (resumed.steps() - 1) as f64);
            got.push(out.loss.to_bits());
        }
        assert_eq!(got, want);
    }
}
