//! MoCo v3 (Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision
//! Transformers", Algorithm 1): two augmented views of each image; the query encoder (backbone,
//! projector, predictor) is trained so that each view's query picks out the other view's key,
//! computed by a momentum encoder (backbone and projector, an exponential moving average of the
//! query encoder's), among the keys of the batch:
//!
//! ```text
//! ctr(q, k) = CE(q̂·k̂ᵀ / τ, [0, 1, …, N−1]) · 2τ          q̂, k̂ unit rows; τ = 0.2
//! loss      = ctr(q₁, k₂) + ctr(q₂, k₁)                    k carries no gradient
//! θ_k ← m·θ_k + (1 − m)·θ_q after each step, m rising from 0.99 to 1 on a cosine over training
//! ```
//!
//! The momentum encoder is this objective's state, saved in every checkpoint.

use super::{wrong_batch, Loss, Objective};
use crate::model::{ModelInput, ModelOutput, TrainModel};
use anneal_data::Batch;
use anneal_nn::Vit;
use anneal_tensor::{CrossEntropyOptions, Result, Tensor};
use std::collections::HashMap;

/// Rows of `x` scaled to unit length: x·exp(−½·ln(Σx² + ε)).
fn unit_rows(x: &Tensor) -> Result<Tensor> {
    let inv = x
        .mul(x)?
        .sum(1, true)?
        .add_scalar(1e-12)
        .log()
        .scale(-0.5)
        .exp();
    x.mul(&inv)
}

/// MoCo v3's contrastive loss of queries `q` against keys `k` (`[N, d]` each, row i of each
/// from the same image), with temperature `t`.
pub fn contrastive_loss(q: &Tensor, k: &Tensor, t: f32) -> Result<Tensor> {
    let n = q.shape()[0];
    let logits = unit_rows(q)?
        .matmul(&unit_rows(k)?.transpose(0, 1)?)?
        .scale(1.0 / t);
    let targets: Vec<i64> = (0..n as i64).collect();
    Ok(logits
        .cross_entropy(&targets, CrossEntropyOptions::default())?
        .scale(2.0 * t))
}

/// The momentum coefficient at `step` of `total`: 1 − (1 − m₀)·(cos(π·step/total) + 1)/2.
pub fn momentum_at(m0: f32, step: u64, total: u64) -> f32 {
    let progress = (step as f64 / total.max(1) as f64).min(1.0);
    1.0 - (1.0 - m0) * ((std::f64::consts::PI * progress).cos() as f32 + 1.0) / 2.0
}

/// MoCo v3 with its momentum encoder.
pub struct MocoV3 {
    /// The momentum encoder (same shape as the model trained; its predictor unused).
    pub momentum: Vit,
    /// The momentum at the start (0.99).
    pub m0: f32,
    /// Steps of training, over which the momentum rises to 1.
    pub total_steps: u64,
    /// Temperature τ (0.2).
    pub temperature: f32,
}

impl MocoV3 {
    /// MoCo v3 whose momentum encoder starts as a copy of `model`'s parameters (a ViT of the
    /// same configuration, built by `momentum`). Both must hold the same parameters, every one
    /// trainable, so that their flat trainable values line up.
    pub fn new(model: &Vit, momentum: Vit, total_steps: u64) -> Result<MocoV3> {
        let (a, b) = (&model.params, &momentum.params);
        let aligned = a.infos().len() == b.infos().len()
            && a.infos()
                .iter()
                .zip(b.infos())
                .all(|(x, y)| x.name == y.name && x.shape == y.shape)
            && a.trainable_numel() == a.numel()
            && b.trainable_numel() == b.numel();
        if !aligned {
            return Err(anneal_tensor::Error::Invalid {
                op: "MocoV3::new",
                reason: "the momentum encoder needs the model's parameters, every one trainable"
                    .into(),
            });
        }
        momentum.params.copy_from(&model.params, |_| true)?;
        Ok(MocoV3 {
            momentum,
            m0: 0.99,
            total_steps,
            temperature: 0.2,
        })
    }
}

/// The rows of `[2N, …]` example-major pairs `(view 0, view 1)`: view `v`'s N rows.
fn view_rows(n: usize, v: usize) -> Vec<usize> {
    (0..n).map(|i| 2 * i + v).collect()
}

impl Objective for MocoV3 {
    fn name(&self) -> &'static str {
        "moco_v3"
    }

    fn inputs<'a>(&self, batch: &'a Batch) -> Result<ModelInput<'a>> {
        match batch {
            Batch::Images(i) if i.views == 2 => Ok(ModelInput::ContrastiveImages {
                pixels: &i.pixels,
                shape: i.image_shape(),
            }),
            other => Err(wrong_batch("moco_v3 (two views per example)", other)),
        }
    }

    fn loss(&self, output: &ModelOutput, batch: &Batch) -> Result<Loss> {
        let Batch::Images(i) = batch else {
            return Err(wrong_batch("moco_v3", batch));
        };
        let n = i.shape[0];
        let images = Tensor::from_f32(i.pixels.clone(), &i.image_shape())?;
        let keys = anneal_tensor::no_grad(|| self.momentum.project(&images, None))?;
        let q = &output.logits;
        let (q1, q2) = (
            q.index_select(0, &view_rows(n, 0))?,
            q.index_select(0, &view_rows(n, 1))?,
        );
        let (k1, k2) = (
            keys.index_select(0, &view_rows(n, 0))?,
            keys.index_select(0, &view_rows(n, 1))?,
        );
        let value = contrastive_loss(&q1, &k2, self.temperature)?.add(&contrastive_loss(
            &q2,
            &k1,
            self.temperature,
        )?)?;
        Ok(Loss {
            value,
            metrics: Vec::new(),
        })
    }

    fn after_optimizer_step(&mut self, model: &dyn TrainModel, step: u64) -> Result<()> {
        let m = momentum_at(self.m0, step, self.total_steps);
        let params = &self.momentum.params;
        let n = params.trainable_numel();
        let online = model.params();
        if online.trainable_numel() != n {
            return Err(anneal_tensor::Error::Invalid {
                op: "moco_v3",
                reason: format!(
                    "the model trains {} values, its momentum encoder holds {n}",
                    online.trainable_numel()
                ),
            });
        }
        let q = online.trainable_values(0..n);
        let mut k = params.trainable_values(0..n);
        for (k, q) in k.iter_mut().zip(q) {
            *k = m * *k + (1.0 - m) * q;
        }
        params.set_trainable_values(0, &k);
        Ok(())
    }

    fn state(&self) -> Vec<(String, Vec<f32>)> {
        let params = &self.momentum.params;
        vec![(
            "momentum".into(),
            params.trainable_values(0..params.trainable_numel()),
        )]
    }

    fn load_state(&mut self, state: &HashMap<String, Vec<f32>>) -> Result<()> {
        let params = &self.momentum.params;
        match state.get("momentum") {
            Some(values) if values.len() == params.trainable_numel() => {
                params.set_trainable_values(0, values);
                Ok(())
            }
            other => Err(anneal_tensor::Error::Invalid {
                op: "moco_v3",
                reason: format!(
                    "the checkpoint's momentum encoder holds {} values, this one {}",
                    other.map_or(0, Vec::len),
                    params.trainable_numel()
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infonce_matches_pytorch() {
        let f = crate::objectives::fixtures();
        let (q1, q2) = (
            f["infonce.q1"].requires_grad_(),
            f["infonce.q2"].requires_grad_(),
        );
        let loss = contrastive_loss(&q1, &f["infonce.k2"], 0.2)
            .unwrap()
            .add(&contrastive_loss(&q2, &f["infonce.k1"], 0.2).unwrap())
            .unwrap();
        let want = f["infonce.loss"].to_vec_f32()[0];
        assert!(
            (loss.item().unwrap() - want).abs() < 1e-5,
            "{loss:?} vs {want}"
        );
        loss.backward().unwrap();
        for (q, g) in [(&q1, "infonce.gq1"), (&q2, "infonce.gq2")] {
            let err = anneal_tensor::testing::rel_err_inf(
                &q.grad().unwrap().to_vec_f32(),
                &f[g].to_vec_f32(),
            );
            assert!(err < 1e-4, "{g} off by {err}");
        }
    }

    #[test]
    fn momentum_rises_on_a_cosine_and_the_update_mixes_weights() {
        assert!((momentum_at(0.99, 0, 100) - 0.99).abs() < 1e-7);
        assert!((momentum_at(0.99, 50, 100) - 0.995).abs() < 1e-6);
        assert_eq!(momentum_at(0.99, 100, 100), 1.0);
        let config = anneal_nn::VitConfig {
            side: 8,
            patch: 4,
            d_model: 8,
            n_head: 2,
            n_layer: 1,
            classes: 0,
            decoder_d: 0,
            decoder_layers: 0,
            decoder_heads: 0,
            proj_dim: 4,
            channels: 1,
        };
        let online = Vit::new(config.clone(), 1).unwrap();
        let mut moco = MocoV3::new(&online, Vit::new(config.clone(), 2).unwrap(), 100).unwrap();
        let name = "projector.0.weight";
        let before = moco.momentum.params.by_name(name).unwrap().to_vec_f32();
        assert_eq!(
            before,
            online.params.by_name(name).unwrap().to_vec_f32(),
            "starts equal"
        );
        // Move the online weights, then one update at step 0 (m = 0.99).
        let other = Vit::new(config, 3).unwrap();
        let id = online.params.id(name).unwrap();
        online
            .params
            .set(id, other.params.by_name(name).unwrap())
            .unwrap();
        moco.after_optimizer_step(&online, 0).unwrap();
        let after = moco.momentum.params.by_name(name).unwrap().to_vec_f32();
        let q = online.params.by_name(name).unwrap().to_vec_f32();
        for ((a, b), q) in after.iter().zip(&before).zip(&q) {
            assert!((a - (0.99 * b + 0.01 * q)).abs() < 1e-6);
        }
        // The state round-trips.
        let saved: HashMap<String, Vec<f32>> = moco.state().into_iter().collect();
        let mut fresh = MocoV3::new(
            &online,
            Vit::new(moco.momentum.config.clone(), 4).unwrap(),
            100,
        )
        .unwrap();
        fresh.load_state(&saved).unwrap();
        assert_eq!(
            fresh.momentum.params.by_name(name).unwrap().to_vec_f32(),
            after
        );
    }
}
