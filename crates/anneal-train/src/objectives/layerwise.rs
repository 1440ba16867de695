//! One stage of greedy layer-wise pretraining (Bengio et al. 2007): the mean squared error with
//! which a stacked autoencoder's layer `layer` and its decoder reconstruct that layer's input,
//! the codes of the frozen layers below (the images themselves at the first stage).

use super::{wrong_batch, Loss, Objective};
use crate::model::{ModelInput, ModelOutput};
use anneal_data::Batch;
use anneal_tensor::Result;

/// Stage `layer` of layer-wise autoencoder pretraining.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerwiseAutoencoder {
    /// The layer trained.
    pub layer: usize,
}

impl Objective for LayerwiseAutoencoder {
    fn name(&self) -> &'static str {
        "layerwise_autoencoder"
    }

    fn inputs<'a>(&self, batch: &'a Batch) -> Result<ModelInput<'a>> {
        match batch {
            Batch::Images(i) if i.views == 1 => Ok(ModelInput::ReconstructLayer {
                pixels: &i.pixels,
                shape: i.image_shape(),
                layer: self.layer,
            }),
            other => Err(wrong_batch("layerwise_autoencoder", other)),
        }
    }

    fn loss(&self, output: &ModelOutput, _batch: &Batch) -> Result<Loss> {
        let diff = output.logits.sub(output.extra("target")?)?;
        Ok(Loss {
            value: diff.mul(&diff)?.mean_all()?,
            metrics: Vec::new(),
        })
    }
}
