//! Causal language modelling: the mean cross-entropy of each next token (Radford et al. 2018).

use super::{wrong_batch, Loss, Objective};
use crate::model::{ModelInput, ModelOutput};
use anneal_data::Batch;
use anneal_tensor::{CrossEntropyOptions, Result};

/// Next-token prediction over token windows.
#[derive(Clone, Copy, Debug, Default)]
pub struct CausalLm;

impl Objective for CausalLm {
    fn name(&self) -> &'static str {
        "causal_lm"
    }

    fn inputs<'a>(&self, batch: &'a Batch) -> Result<ModelInput<'a>> {
        match batch {
            Batch::Tokens(w) => Ok(ModelInput::Tokens {
                ids: &w.ids,
                batch: w.batch,
                seq: w.seq,
            }),
            other => Err(wrong_batch("causal_lm", other)),
        }
    }

    fn loss(&self, output: &ModelOutput, batch: &Batch) -> Result<Loss> {
        let Batch::Tokens(w) = batch else {
            return Err(wrong_batch("causal_lm", batch));
        };
        let value = output.cross_entropy(&w.targets, CrossEntropyOptions::default())?;
        Ok(Loss {
            value,
            metrics: Vec::new(),
        })
    }
}
