//! Supervised image classification: the mean cross-entropy of each labelled image's class, with
//! accuracy as a metric (LeNet-5's objective; the fine-tuning stage of every pretraining method).

use super::{argmax_rows, wrong_batch, Loss, Objective};
use crate::model::{ModelInput, ModelOutput};
use anneal_data::Batch;
use anneal_tensor::{CrossEntropyOptions, Result, Tensor};

/// Cross-entropy that skips unlabelled examples (label −1).
pub(crate) const SKIP_UNLABELLED: CrossEntropyOptions = CrossEntropyOptions {
    ignore_index: -1,
    label_smoothing: 0.0,
};

/// One class per labelled image (one view per example; unlabelled examples, −1, are skipped).
#[derive(Clone, Copy, Debug, Default)]
pub struct ImageClassification;

/// The share of `labels` (−1 skipped) that the row-wise argmax of `logits` predicts.
pub fn accuracy(logits: &Tensor, labels: &[i64]) -> f64 {
    let classes = logits.shape().last().copied().unwrap_or(1);
    let predicted = argmax_rows(&logits.to_vec_f32(), classes);
    let (right, counted) = predicted
        .iter()
        .zip(labels)
        .filter(|(_, &l)| l >= 0)
        .fold((0usize, 0usize), |(r, n), (&p, &l)| {
            (r + usize::from(p as i64 == l), n + 1)
        });
    right as f64 / counted.max(1) as f64
}

impl Objective for ImageClassification {
    fn name(&self) -> &'static str {
        "image_classification"
    }

    fn inputs<'a>(&self, batch: &'a Batch) -> Result<ModelInput<'a>> {
        match batch {
            Batch::Images(i) if i.views == 1 => Ok(ModelInput::Images {
                pixels: &i.pixels,
                shape: i.image_shape(),
            }),
            other => Err(wrong_batch("image_classification", other)),
        }
    }

    fn loss(&self, output: &ModelOutput, batch: &Batch) -> Result<Loss> {
        let Batch::Images(i) = batch else {
            return Err(wrong_batch("image_classification", batch));
        };
        let value = output.logits.cross_entropy(&i.labels, SKIP_UNLABELLED)?;
        Ok(Loss {
            value,
            metrics: vec![("accuracy".into(), accuracy(&output.logits, &i.labels))],
        })
    }
}
