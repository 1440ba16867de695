//! BERT's pretraining objective (Devlin et al. 2019 §3.1): the masked-LM cross-entropy over the
//! positions chosen for prediction plus the next-sentence cross-entropy of every pair.

use super::{accuracy, wrong_batch, Loss, Objective};
use crate::model::{ModelInput, ModelOutput};
use anneal_data::Batch;
use anneal_tensor::{CrossEntropyOptions, Result};

/// Masked language modelling plus next-sentence prediction, on `MaskedPairs` batches.
#[derive(Clone, Copy, Debug, Default)]
pub struct MaskedLmNsp;

impl Objective for MaskedLmNsp {
    fn name(&self) -> &'static str {
        "mlm_nsp"
    }

    fn inputs<'a>(&self, batch: &'a Batch) -> Result<ModelInput<'a>> {
        match batch {
            Batch::MaskedPairs(p) => Ok(ModelInput::MaskedPairs {
                ids: &p.ids,
                token_types: &p.token_types,
                lengths: &p.lengths,
                targets: &p.targets,
                batch: p.batch,
                seq: p.seq,
            }),
            other => Err(wrong_batch("mlm_nsp", other)),
        }
    }

    fn loss(&self, output: &ModelOutput, batch: &Batch) -> Result<Loss> {
        let Batch::MaskedPairs(p) = batch else {
            return Err(wrong_batch("mlm_nsp", batch));
        };
        let targets: Vec<i64> = p.targets.iter().copied().filter(|&t| t >= 0).collect();
        let next = output.extra("next_sentence")?;
        let nsp = next.cross_entropy(&p.next, CrossEntropyOptions::default())?;
        let mut metrics = vec![
            ("nsp_loss".into(), nsp.item()? as f64),
            ("nsp_accuracy".into(), accuracy(next, &p.next)),
        ];
        let value = if targets.is_empty() {
            nsp
        } else {
            let mlm = output
                .logits
                .cross_entropy(&targets, CrossEntropyOptions::default())?;
            metrics.push(("mlm_loss".into(), mlm.item()? as f64));
            metrics.push(("mlm_accuracy".into(), accuracy(&output.logits, &targets)));
            mlm.add(&nsp)?
        };
        Ok(Loss { value, metrics })
    }
}
