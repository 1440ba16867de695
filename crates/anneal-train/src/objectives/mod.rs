//! Training objectives. An [`Objective`] turns a batch into model inputs and computes a loss and
//! named metrics from the model's outputs and the batch (the shape of Megatron-LM's
//! `forward_step_func`): the strategy runs the model, so a pipeline computes the loss on its last
//! stage only. An objective may own state (a momentum encoder, reference log-probabilities, a
//! value head), updated after each optimizer step and saved in checkpoints.
//!
//! * [`CausalLm`]: next-token cross-entropy (GPT pretraining).
//! * [`SequenceClassification`]: one class per sequence (BERT fine-tuning), with accuracy.
//! * [`ImageClassification`]: supervised cross-entropy on labelled images, with accuracy.
//! * [`FixMatch`]: semi-supervised, pseudo-labels from weak views train strong views.
//! * [`Mae`]: masked image modelling, reconstruct the hidden 75% of patches.
//! * [`MocoV3`]: contrastive, each view's query finds the other view's momentum key.
//! * [`LayerwiseAutoencoder`]: one stage of greedy layer-wise autoencoder pretraining.
//! * [`MaskedLmNsp`]: BERT's masked language modelling plus next-sentence prediction.

mod causal_lm;
mod classification;
mod fixmatch;
mod image;
mod layerwise;
mod mae;
mod mlm;
mod moco;

pub use causal_lm::CausalLm;
pub use classification::{argmax_rows, SequenceClassification};
pub use fixmatch::FixMatch;
pub use image::{accuracy, ImageClassification};
pub use layerwise::LayerwiseAutoencoder;
pub use mae::{mae_loss, normalise_patches, Mae};
pub use mlm::MaskedLmNsp;
pub use moco::{contrastive_loss, momentum_at, MocoV3};

use crate::model::{ModelInput, ModelOutput, TrainModel};
use anneal_data::Batch;
use anneal_tensor::{Result, Tensor};
use std::collections::HashMap;

/// An objective's loss on one micro-batch and the metrics it reports.
pub struct Loss {
    /// The scalar to minimise (mean over the micro-batch).
    pub value: Tensor,
    /// Named metrics, averaged over a step's micro-batches and logged.
    pub metrics: Vec<(String, f64)>,
}

/// What to train a model for.
pub trait Objective: Send {
    /// A short name for logs and checkpoints, e.g. `causal_lm`.
    fn name(&self) -> &'static str;

    /// The model input for `batch`; fails naming the batch kind the objective cannot use.
    fn inputs<'a>(&self, batch: &'a Batch) -> Result<ModelInput<'a>>;

    /// The loss from the model's output on `batch`.
    fn loss(&self, output: &ModelOutput, batch: &Batch) -> Result<Loss>;

    /// Runs after each optimizer step (an EMA encoder's update, say).
    fn after_optimizer_step(&mut self, model: &dyn TrainModel, step: u64) -> Result<()> {
        let _ = (model, step);
        Ok(())
    }

    /// Weights to score and keep the model with at the end of training in place of its last
    /// ones (an average of them, as FixMatch evaluates), in the order of the trainable
    /// parameters; `None` keeps the last.
    fn averaged_weights(&self) -> Option<&[f32]> {
        None
    }

    /// State the objective owns, as named flat vectors saved with each checkpoint.
    fn state(&self) -> Vec<(String, Vec<f32>)> {
        Vec::new()
    }

    /// Restores [`Objective::state`] from a checkpoint.
    fn load_state(&mut self, state: &HashMap<String, Vec<f32>>) -> Result<()> {
        let _ = state;
        Ok(())
    }
}

/// The error for a batch an objective cannot use.
pub(crate) fn wrong_batch(objective: &'static str, batch: &Batch) -> anneal_tensor::Error {
    anneal_tensor::Error::Invalid {
        op: objective,
        reason: format!("cannot train on {}", batch.kind()),
    }
}

/// The golden losses and gradients of `tests/fixtures/objectives.safetensors` (made by
/// `tests/fixtures/make_objective_fixtures.py`), by name.
#[cfg(test)]
pub(crate) fn fixtures() -> HashMap<String, Tensor> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/objectives.safetensors");
    anneal_tensor::io::load_safetensors(&path).expect("fixtures load")
}
