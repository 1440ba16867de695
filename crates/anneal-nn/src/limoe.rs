//! A LIMoE-style encoder (Mustafa et al. 2022, "Multimodal Contrastive Learning with LIMoE: the
//! Language-Image Mixture of Experts"): one transformer encoder with Mixture-of-Experts blocks,
//! shared by two modalities, image patches and text tokens, trained contrastively on paired
//! examples (Radford et al. 2021, CLIP), with LIMoE's per-modality entropy losses on the routers.
//!
//! ```text
//! image [B, P, patch²] → linear patch embedding + positions ─┐
//!                                                             ├→ shared blocks (MoE every n-th)
//! text  [B, L] ids     → token embedding + positions ────────┘   → LayerNorm → mean over positions
//!                                                                → per-modality projection → unit norm
//! loss = (CE(image→text) + CE(text→image)) / 2 over the batch's similarity / τ
//!      + balancing loss over both modalities' tokens, per modality: z-loss, local entropy,
//!        global entropy (applied below a threshold)
//! ```

use crate::layers::{
    router_entropies, Block, BlockConfig, Builder, Embedding, LayerNorm, Linear, LinearOptions,
    MoeAux, MoeConfig, Weights,
};
use anneal_tensor::{CrossEntropyOptions, DType, DropoutKey, ParamStore, Result, Tensor};

/// The shape of a LIMoE encoder.
#[derive(Clone, Debug, PartialEq)]
pub struct LimoeConfig {
    /// Image patches per image.
    pub patches: usize,
    /// Values per patch (patch side²).
    pub patch_dim: usize,
    /// Text vocabulary.
    pub vocab_size: usize,
    /// Longest text.
    pub max_text: usize,
    /// Width of the encoder.
    pub d_model: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Encoder blocks.
    pub n_layer: usize,
    /// Every n-th block is MoE (1: all).
    pub moe_every: usize,
    /// How the MoE blocks route.
    pub moe: MoeConfig,
    /// Width of the shared embedding space.
    pub proj_dim: usize,
    /// Weight of the local entropy loss (per modality).
    pub local_entropy: f32,
    /// Weight of the global entropy loss (per modality).
    pub global_entropy: f32,
    /// The global entropy loss applies only while a modality's routing entropy is below
    /// ln(this many experts) (LIMoE §3.1's threshold): a modality may settle on a subset of the
    /// experts rather than be pushed onto all of them; 0 applies it always.
    pub global_threshold: f32,
    /// Temperature τ of the contrastive loss.
    pub temperature: f32,
}

/// What one modality's pass through the encoder gives.
pub struct Encoded {
    /// Unit-norm embeddings `[B, proj_dim]`.
    pub embeddings: Tensor,
    /// Each MoE block's report, with its block index.
    pub moe: Vec<(usize, MoeAux)>,
}

/// The contrastive loss of a batch and its parts.
pub struct LimoeLoss {
    /// The total to minimise.
    pub total: Tensor,
    /// The contrastive part.
    pub contrastive: f32,
    /// The balancing loss over both modalities' tokens, plus each modality's z-loss.
    pub balance: f32,
    /// Local entropy (weighted), image and text.
    pub local: [f32; 2],
    /// Global entropy (weighted), image and text.
    pub global: [f32; 2],
}

/// A LIMoE encoder and its parameters.
pub struct Limoe {
    /// Its shape.
    pub config: LimoeConfig,
    /// Its parameters.
    pub params: ParamStore,
    parallel: std::sync::Arc<dyn crate::layers::ParallelContext>,
    patch_embed: Linear,
    image_pos: Embedding,
    token_embed: Embedding,
    text_pos: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    image_proj: Linear,
    text_proj: Linear,
}

impl Limoe {
    /// A freshly initialised encoder (Normal(0, 0.02) weights).
    pub fn new(config: LimoeConfig, seed: u64) -> Result<Limoe> {
        config.moe.validate("moe")?;
        let c = &config;
        let mut b = Builder::new(seed);
        let linear = |bias| LinearOptions {
            bias,
            ..LinearOptions::default()
        };
        let patch_embed = Linear::new(
            &mut b,
            "vision.patch_embed",
            c.patch_dim,
            c.d_model,
            linear(true),
        )?;
        let image_pos = Embedding::new(&mut b, "vision.pos_embed", c.patches, c.d_model, 0.02)?;
        let token_embed =
            Embedding::new(&mut b, "text.token_embed", c.vocab_size, c.d_model, 0.02)?;
        let text_pos = Embedding::new(&mut b, "text.pos_embed", c.max_text, c.d_model, 0.02)?;
        let mut block = BlockConfig::gpt2(c.d_model, c.n_head, c.n_layer, true);
        block.attention.causal = false;
        let blocks = (0..c.n_layer)
            .map(|i| {
                let moe = (c.moe_every > 0 && (i + 1).is_multiple_of(c.moe_every)).then_some(c.moe);
                Block::new(
                    &mut b,
                    &format!("encoder.layers.{i}"),
                    &BlockConfig { moe, ..block },
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::new(&mut b, "encoder.ln_f", c.d_model, true, 1e-5)?;
        let image_proj = Linear::new(&mut b, "vision.proj", c.d_model, c.proj_dim, linear(false))?;
        let text_proj = Linear::new(&mut b, "text.proj", c.d_model, c.proj_dim, linear(false))?;
        let (params, parallel) = b.build(DType::F32);
        Ok(Limoe {
            config,
            params,
            parallel,
            patch_embed,
            image_pos,
            token_embed,
            text_pos,
            blocks,
            ln_f,
            image_proj,
            text_proj,
        })
    }

    /// What the layers read their parameters from, made anew each pass so it sees the current
    /// parameter tensors (freezing lays them out afresh).
    fn weights(&self) -> Weights {
        Weights::new(&self.params, self.parallel.clone())
    }

    /// The shared blocks, pooling and `proj` on `x` `[B, S, d]`.
    fn encode(&self, x: Tensor, proj: &Linear, training: Option<DropoutKey>) -> Result<Encoded> {
        let w = &self.weights();
        let mut x = x;
        let mut moe = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            let key = training.map(|k| crate::layers::layer_key(k, i));
            let (y, aux) = block.forward(w, &x, 0.0, key)?;
            x = y;
            if let Some(aux) = aux {
                moe.push((i, aux));
            }
        }
        let pooled = self.ln_f.forward(w, &x)?.mean(1, false)?;
        let z = proj.forward(w, &pooled)?;
        // z / ‖z‖, with ‖z‖⁻¹ = exp(−½ ln(Σ z² + ε)).
        let inv = z
            .mul(&z)?
            .sum(1, true)?
            .add_scalar(1e-6)
            .log()
            .scale(-0.5)
            .exp();
        Ok(Encoded {
            embeddings: z.mul(&inv)?,
            moe,
        })
    }

    /// Images as patches `[B, patches, patch_dim]` (normalised pixel values).
    pub fn encode_images(&self, patches: &Tensor, training: Option<DropoutKey>) -> Result<Encoded> {
        let w = &self.weights();
        let x = self
            .patch_embed
            .forward(w, patches)?
            .add(&self.image_pos.range(w, 0, self.config.patches)?)?;
        self.encode(x, &self.image_proj, training)
    }

    /// Texts as token ids `[B, len]` (row-major, every text `len` tokens).
    pub fn encode_texts(
        &self,
        ids: &[u32],
        batch: usize,
        len: usize,
        training: Option<DropoutKey>,
    ) -> Result<Encoded> {
        let w = &self.weights();
        let x = self
            .token_embed
            .forward(w, ids, &[batch, len], "Limoe::encode_texts")?
            .add(&self.text_pos.range(w, 0, len)?)?;
        self.encode(
            x,
            &self.text_proj,
            training.map(|k| k.with_seed(k.seed ^ 0x7e57)),
        )
    }

    /// The loss of `B` paired images and texts (pair i is image i with text i): the symmetric
    /// contrastive loss over their similarities / τ, plus for each modality the MoE blocks'
    /// balancing and z-losses and LIMoE's local and global entropy losses.
    pub fn loss(&self, images: &Encoded, texts: &Encoded) -> Result<LimoeLoss> {
        let c = &self.config;
        let b = images.embeddings.shape()[0];
        let logits = images
            .embeddings
            .matmul(&texts.embeddings.transpose(0, 1)?)?
            .scale(1.0 / c.temperature);
        let targets: Vec<i64> = (0..b as i64).collect();
        let opts = CrossEntropyOptions::default();
        let i2t = logits.cross_entropy(&targets, opts)?;
        let t2i = logits
            .transpose(0, 1)?
            .contiguous()
            .cross_entropy(&targets, opts)?;
        let contrastive = i2t.add(&t2i)?.scale(0.5);
        let mut total = contrastive.clone();
        let (mut balance, mut local, mut global) = (0.0, [0.0; 2], [0.0; 2]);
        // The balancing loss over both modalities' tokens together, as LIMoE computes its
        // auxiliary losses on the whole batch: experts may then serve one modality each, as long
        // as the batch as a whole spreads over them. (Each modality's own balancing loss would
        // push both onto every expert.)
        for ((_, a), (_, b)) in images.moe.iter().zip(&texts.moe) {
            let (Some(pa), Some(pb)) = (&a.probs, &b.probs) else {
                continue;
            };
            let (na, nb) = (pa.shape()[0] as f64, pb.shape()[0] as f64);
            let e = a.load.len();
            let f: Vec<f32> = a
                .load
                .iter()
                .zip(&b.load)
                .map(|(x, y)| ((x * na + y * nb) / (na + nb) * e as f64) as f32)
                .collect();
            let p = pa
                .sum(0, false)?
                .add(&pb.sum(0, false)?)?
                .scale(1.0 / (na + nb) as f32);
            let joint = p
                .mul(&Tensor::from_f32(f, &[e])?)?
                .sum_all()?
                .scale(c.moe.aux_loss);
            let z = a.z.add(&b.z)?;
            let part = joint.add(&z)?;
            balance += part.item()?;
            total = total.add(&part)?;
        }
        for (m, enc) in [images, texts].into_iter().enumerate() {
            for (_, aux) in &enc.moe {
                if let Some(probs) = &aux.probs {
                    let (l, g) = router_entropies(probs)?;
                    // −H(p̄) + ln τ > 0 exactly when the entropy is below ln τ.
                    let g = if c.global_threshold > 0.0 {
                        g.add_scalar(c.global_threshold.ln()).relu()
                    } else {
                        g
                    };
                    let (l, g) = (l.scale(c.local_entropy), g.scale(c.global_entropy));
                    local[m] += l.item()?;
                    global[m] += g.item()?;
                    total = total.add(&l)?.add(&g)?;
                }
            }
        }
        Ok(LimoeLoss {
            total,
            contrastive: contrastive.item()?,
            balance,
            local,
            global,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> LimoeConfig {
        LimoeConfig {
            patches: 4,
            patch_dim: 9,
            vocab_size: 12,
            max_text: 5,
            d_model: 16,
            n_head: 2,
            n_layer: 2,
            moe_every: 1,
            moe: MoeConfig {
                capacity_factor: None,
                eval_capacity_factor: None,
                ..MoeConfig::switch(4)
            },
            proj_dim: 8,
            local_entropy: 0.1,
            global_entropy: 0.1,
            global_threshold: 0.0,
            temperature: 0.1,
        }
    }

    #[test]
    fn pairs_are_pulled_together_and_routers_trained_by_both_modalities() {
        use anneal_tensor::optim::{AdamW, AdamWConfig};
        use anneal_tensor::Optimizer;
        let m = Limoe::new(tiny(), 1).unwrap();
        let mut rng = anneal_tensor::Rng::new(2);
        let images = Tensor::randn(&[3, 4, 9], 1.0, DType::F32, &mut rng);
        let ids: Vec<u32> = vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 3, 5, 7];
        let mut opt = AdamW::new(&m.params, AdamWConfig::default());
        let mut first = None;
        let mut last = 0.0;
        for step in 0..40u64 {
            m.params.zero_grad();
            let i = m.encode_images(&images, Some(step.into())).unwrap();
            let t = m.encode_texts(&ids, 3, 5, Some(step.into())).unwrap();
            assert_eq!(i.moe.len(), 2);
            let loss = m.loss(&i, &t).unwrap();
            assert!(
                loss.local.iter().all(|&l| l > 0.0),
                "entropies are positive"
            );
            assert!(
                loss.global.iter().all(|&g| g < 0.0),
                "−H of the mean is negative"
            );
            first.get_or_insert(loss.contrastive);
            last = loss.contrastive;
            loss.total.backward().unwrap();
            let router = m
                .params
                .by_name("encoder.layers.0.mlp.router.weight")
                .unwrap();
            assert!(router.grad().is_some());
            opt.step(&m.params, 1e-2);
        }
        let first = first.unwrap();
        assert!(last < 0.5 * first, "contrastive loss {first} → {last}");
    }
}
