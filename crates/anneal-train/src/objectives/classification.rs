//! Sequence classification: the mean cross-entropy of each sequence's class, with accuracy as a
//! metric (BERT fine-tuning, Devlin et al. 2019 §4).

use super::{wrong_batch, Loss, Objective};
use crate::model::{ModelInput, ModelOutput};
use anneal_data::Batch;
use anneal_tensor::{CrossEntropyOptions, Result};

/// One class per labelled sequence.
#[derive(Clone, Copy, Debug, Default)]
pub struct SequenceClassification;

/// The index of the largest of each row of `logits` `[rows, classes]`.
pub fn argmax_rows(logits: &[f32], classes: usize) -> Vec<usize> {
    logits
        .chunks(classes.max(1))
        .map(|row| {
            row.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                    if v > best.1 {
                        (i, v)
                    } else {
                        best
                    }
                })
                .0
        })
        .collect()
}

impl Objective for SequenceClassification {
    fn name(&self) -> &'static str {
        "classification"
    }

    fn inputs<'a>(&self, batch: &'a Batch) -> Result<ModelInput<'a>> {
        match batch {
            Batch::Classes(c) => Ok(ModelInput::Sequences {
                ids: &c.ids,
                lengths: &c.lengths,
                batch: c.batch,
                seq: c.seq,
            }),
            other => Err(wrong_batch("classification", other)),
        }
    }

    fn loss(&self, output: &ModelOutput, batch: &Batch) -> Result<Loss> {
        let Batch::Classes(c) = batch else {
            return Err(wrong_batch("classification", batch));
        };
        let value = output
            .logits
            .cross_entropy(&c.labels, CrossEntropyOptions::default())?;
        let classes = output.logits.shape().last().copied().unwrap_or(1);
        let predicted = argmax_rows(&output.logits.to_vec_f32(), classes);
        let right = predicted
            .iter()
            .zip(&c.labels)
            .filter(|(p, l)| **p as i64 == **l)
            .count();
        Ok(Loss {
            value,
            metrics: vec![("accuracy".into(), right as f64 / c.batch.max(1) as f64)],
        })
    }
}
