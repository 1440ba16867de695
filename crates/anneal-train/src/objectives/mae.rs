//! Masked image modelling with a masked autoencoder (He et al. 2022, "Masked Autoencoders Are
//! Scalable Vision Learners"): the model hides a random 75% of each image's patches from its
//! encoder, a light decoder predicts them, and the loss is the mean squared error on the masked
//! patches only, against each patch's pixels normalised by the patch's own mean and standard
//! deviation (the paper's `norm_pix_loss`, which it finds gives better representations):
//!
//! ```text
//! t̂ = (t − mean(t)) / √(var(t) + 1e-6)            per patch, unbiased variance, no gradient
//! L = Σ_masked mean_values((pred − t̂)²) / #masked
//! ```

use super::{wrong_batch, Loss, Objective};
use crate::model::{ModelInput, ModelOutput};
use anneal_data::Batch;
use anneal_tensor::{Result, Tensor};

/// MAE's objective.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mae {
    /// The share of each image's patches hidden (the paper's 0.75).
    pub mask_ratio: f32,
    /// Whether targets are normalised per patch (the paper's default for its best results).
    pub norm_pix: bool,
}

impl Default for Mae {
    fn default() -> Self {
        Mae {
            mask_ratio: 0.75,
            norm_pix: true,
        }
    }
}

/// Each patch's values `[…, n]` normalised by the patch's mean and unbiased variance (+1e-6).
pub fn normalise_patches(values: &[f32], n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(values.len());
    for patch in values.chunks(n.max(1)) {
        let mean = patch.iter().sum::<f32>() / n as f32;
        let var = patch.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / (n as f32 - 1.0).max(1.0);
        let inv = 1.0 / (var + 1e-6).sqrt();
        out.extend(patch.iter().map(|v| (v - mean) * inv));
    }
    out
}

/// The loss of predicted patches `pred` `[B, P, n]` against `target` (same shape) on the
/// patches where `mask` `[B, P]` is 1.
pub fn mae_loss(pred: &Tensor, target: &Tensor, mask: &Tensor, norm_pix: bool) -> Result<Tensor> {
    let n = *pred.shape().last().unwrap_or(&1);
    let t = target.to_vec_f32();
    let t = if norm_pix {
        normalise_patches(&t, n)
    } else {
        t
    };
    let diff = pred.sub(&Tensor::from_f32(t, pred.shape())?)?;
    let per_patch = diff.mul(&diff)?.mean(2, false)?;
    let masked: f32 = mask.to_vec_f32().iter().sum();
    Ok(per_patch.mul(mask)?.sum_all()?.scale(1.0 / masked.max(1.0)))
}

impl Objective for Mae {
    fn name(&self) -> &'static str {
        "mae"
    }

    fn inputs<'a>(&self, batch: &'a Batch) -> Result<ModelInput<'a>> {
        match batch {
            Batch::Images(i) if i.views == 1 => Ok(ModelInput::MaskedImages {
                pixels: &i.pixels,
                shape: i.image_shape(),
                mask_ratio: self.mask_ratio,
            }),
            other => Err(wrong_batch("mae", other)),
        }
    }

    fn loss(&self, output: &ModelOutput, _batch: &Batch) -> Result<Loss> {
        let value = mae_loss(
            &output.logits,
            output.extra("target")?,
            output.extra("mask")?,
            self.norm_pix,
        )?;
        Ok(Loss {
            value,
            metrics: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_and_gradient_match_pytorch() {
        let f = crate::objectives::fixtures();
        let pred = f["mae.pred"].requires_grad_();
        let mut out = ModelOutput::logits(pred.clone());
        out.extras = vec![
            ("target".into(), f["mae.target"].clone()),
            ("mask".into(), f["mae.mask"].clone()),
        ];
        let batch = Batch::Images(anneal_data::batch::LabelledImages {
            pixels: Vec::new(),
            shape: [2, 1, 1, 1],
            views: 1,
            labels: vec![-1, -1],
        });
        let loss = Mae::default().loss(&out, &batch).unwrap().value;
        let want = f["mae.loss"].to_vec_f32()[0];
        assert!(
            (loss.item().unwrap() - want).abs() < 1e-4 * want,
            "{loss:?} vs {want}"
        );
        loss.backward().unwrap();
        let err = anneal_tensor::testing::rel_err_inf(
            &pred.grad().unwrap().to_vec_f32(),
            &f["mae.gpred"].to_vec_f32(),
        );
        assert!(err < 1e-4, "gradient off by {err}");
        // Unmasked patches take no gradient.
        let g = pred.grad().unwrap().to_vec_f32();
        assert!(g[9..18].iter().all(|&v| v == 0.0));
    }
}
