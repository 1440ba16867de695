//! A small Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words") sized
//! for 28×28 images on a CPU, with the masked-autoencoder decoder of MAE (He et al. 2022,
//! "Masked Autoencoders Are Scalable Vision Learners") for self-supervised pretraining:
//!
//! ```text
//! image [B, C, S, S] → patches [B, P, C·p²] (P = (S/p)², no overlap)
//!   → linear patch embedding + learned positions
//!   → [cls] token prepended → pre-norm blocks (bidirectional attention, GELU MLP) → LayerNorm
//!   → classifier head on the [cls] output
//!
//! MAE: keep a random (1 − mask ratio) of each image's patches; the encoder sees only those
//!   → decoder embedding; a learned mask token in every masked place; decoder positions
//!   → light decoder blocks → LayerNorm → linear to C·p² values per patch
//! ```
//!
//! Parameter names follow MAE's reference code (`patch_embed`, `cls_token`, `pos_embed`,
//! `blocks.i`, `norm`, `head`; `decoder_embed`, `mask_token`, `decoder_pos_embed`,
//! `decoder_blocks.i`, `decoder_norm`, `decoder_pred`), so an MAE checkpoint's encoder loads into
//! a classifier by name.

use crate::layers::{
    Block, BlockConfig, Builder, Embedding, Init, LayerNorm, Linear, LinearOptions, Split, Weights,
};
use anneal_tensor::{DType, DropoutKey, ParamId, ParamStore, Result, Rng, Tensor};

/// The shape of a ViT, and of its MAE decoder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VitConfig {
    /// Image side in pixels.
    pub side: usize,
    /// Image channels.
    pub channels: usize,
    /// Patch side in pixels (divides `side`).
    pub patch: usize,
    /// Encoder width.
    pub d_model: usize,
    /// Encoder attention heads.
    pub n_head: usize,
    /// Encoder blocks.
    pub n_layer: usize,
    /// Classes of the head (0: no head, a pretraining encoder).
    pub classes: usize,
    /// Decoder width (MAE); 0 builds no decoder.
    pub decoder_d: usize,
    /// Decoder blocks.
    pub decoder_layers: usize,
    /// Decoder attention heads.
    pub decoder_heads: usize,
    /// Width of the contrastive projector's and predictor's output (MoCo v3); 0 builds
    /// neither.
    pub proj_dim: usize,
}

impl VitConfig {
    /// The ViT this project trains on 28×28 grey images: 4×4 patches (49 tokens), width 64,
    /// 4 heads, 4 blocks; a decoder of width 64 with 2 blocks (MAE's "light" decoder).
    pub fn small(classes: usize) -> VitConfig {
        VitConfig {
            side: 28,
            channels: 1,
            patch: 4,
            d_model: 64,
            n_head: 4,
            n_layer: 4,
            classes,
            decoder_d: 64,
            decoder_layers: 2,
            decoder_heads: 4,
            proj_dim: 0,
        }
    }

    /// Patches per image.
    pub fn patches(&self) -> usize {
        (self.side / self.patch).pow(2)
    }

    /// Values per patch.
    pub fn patch_dim(&self) -> usize {
        self.channels * self.patch * self.patch
    }

    fn check(&self) -> Result<()> {
        let ok = self.patch > 0
            && self.side.is_multiple_of(self.patch)
            && self.n_head > 0
            && self.d_model.is_multiple_of(self.n_head)
            && (self.decoder_d == 0
                || (self.decoder_heads > 0 && self.decoder_d.is_multiple_of(self.decoder_heads)));
        if ok {
            return Ok(());
        }
        Err(anneal_tensor::Error::Invalid {
            op: "Vit",
            reason: format!(
                "{self:?}: the patch side must divide the image side and the heads each width"
            ),
        })
    }
}

/// `n` images `[n, c, side, side]` (row-major) as patches `[n, P, c·p²]`, patches in row-major
/// order, each patch's values channel by channel, row by row.
pub fn patchify(pixels: &[f32], n: usize, c: usize, side: usize, patch: usize) -> Vec<f32> {
    let g = side / patch;
    let mut out = Vec::with_capacity(pixels.len());
    for i in 0..n {
        let image = &pixels[i * c * side * side..(i + 1) * c * side * side];
        for py in 0..g {
            for px in 0..g {
                for ch in 0..c {
                    for y in 0..patch {
                        let row = (ch * side + py * patch + y) * side + px * patch;
                        out.extend_from_slice(&image[row..row + patch]);
                    }
                }
            }
        }
    }
    out
}

/// Which patches of each image MAE keeps: `keep` of `patches` for each of `n` images, drawn by
/// `seed` (a shuffle per image; Fisher–Yates), each image's kept indices in increasing order.
pub fn random_keep(n: usize, patches: usize, keep: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(n * keep);
    for _ in 0..n {
        let mut order: Vec<usize> = (0..patches).collect();
        for i in (1..patches).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        let mut kept = order[..keep].to_vec();
        kept.sort_unstable();
        out.extend(kept);
    }
    out
}

/// A pre-norm transformer stack with its final LayerNorm.
struct Stack {
    blocks: Vec<Block>,
    norm: LayerNorm,
}

impl Stack {
    fn new(
        b: &mut Builder,
        blocks: &str,
        norm: &str,
        d: usize,
        heads: usize,
        layers: usize,
    ) -> Result<Stack> {
        let mut config = BlockConfig::gpt2(d, heads, layers, true);
        config.attention.causal = false;
        let blocks = (0..layers)
            .map(|i| Block::new(b, &format!("{blocks}.{i}"), &config))
            .collect::<Result<Vec<_>>>()?;
        Ok(Stack {
            blocks,
            norm: LayerNorm::new(b, norm, d, true, 1e-6)?,
        })
    }

    fn forward(&self, w: &Weights, x: Tensor, training: Option<DropoutKey>) -> Result<Tensor> {
        let mut x = x;
        for (i, block) in self.blocks.iter().enumerate() {
            let key = training.map(|k| crate::layers::layer_key(k, i));
            x = block.forward(w, &x, 0.0, key)?.0;
        }
        self.norm.forward(w, &x)
    }
}

/// The MAE decoder.
struct Decoder {
    embed: Linear,
    mask_token: ParamId,
    pos: Embedding,
    stack: Stack,
    pred: Linear,
}

/// What MAE's forward pass gives.
pub struct MaeOutput {
    /// Predicted values of every patch `[B, P, C·p²]`.
    pub pred: Tensor,
    /// The true patches `[B, P, C·p²]` (what the prediction is scored against).
    pub patches: Tensor,
    /// 1 for each masked patch, 0 for a kept one, `[B, P]` row-major.
    pub mask: Vec<f32>,
}

/// A ViT and its parameters (and, when configured, its MAE decoder).
pub struct Vit {
    /// Its shape.
    pub config: VitConfig,
    /// Its parameters.
    pub params: ParamStore,
    parallel: std::sync::Arc<dyn crate::layers::ParallelContext>,
    patch_embed: Linear,
    cls_token: ParamId,
    pos: Embedding,
    encoder: Stack,
    head: Option<Linear>,
    decoder: Option<Decoder>,
    projector: Option<[Linear; 2]>,
    predictor: Option<[Linear; 2]>,
}

/// Width of the hidden layer of the contrastive projector and predictor.
const CONTRASTIVE_HIDDEN: usize = 256;

impl Vit {
    /// A freshly initialised ViT (Normal(0, 0.02) weights, as MAE's truncated normal).
    pub fn new(config: VitConfig, seed: u64) -> Result<Vit> {
        Vit::build(config, Builder::new(seed))
    }

    /// [`Vit::new`] with its layers split as `parallel` says: under tensor parallelism each
    /// block's attention heads and MLP hidden units; the patch embedding and heads are
    /// replicated.
    pub fn new_in(
        config: VitConfig,
        seed: u64,
        parallel: std::sync::Arc<dyn crate::layers::ParallelContext>,
    ) -> Result<Vit> {
        Vit::build(config, Builder::with_parallel(seed, parallel))
    }

    fn build(config: VitConfig, mut b: Builder) -> Result<Vit> {
        config.check()?;
        let c = &config;
        let plain = LinearOptions {
            layout: crate::layers::WeightLayout::OutIn,
            ..LinearOptions::default()
        };
        let patch_embed = Linear::new(&mut b, "patch_embed", c.patch_dim(), c.d_model, plain)?;
        let cls_token = b.param(
            "cls_token",
            &[1, c.d_model],
            Init::Normal(0.02),
            false,
            Split::Replicated,
        )?;
        let pos = Embedding::new(&mut b, "pos_embed", c.patches() + 1, c.d_model, 0.02)?;
        let encoder = Stack::new(&mut b, "blocks", "norm", c.d_model, c.n_head, c.n_layer)?;
        let head = (c.classes > 0)
            .then(|| Linear::new(&mut b, "head", c.d_model, c.classes, plain))
            .transpose()?;
        let decoder = if c.decoder_d > 0 {
            let embed = Linear::new(&mut b, "decoder_embed", c.d_model, c.decoder_d, plain)?;
            let mask_token = b.param(
                "mask_token",
                &[1, c.decoder_d],
                Init::Normal(0.02),
                false,
                Split::Replicated,
            )?;
            let pos = Embedding::new(
                &mut b,
                "decoder_pos_embed",
                c.patches() + 1,
                c.decoder_d,
                0.02,
            )?;
            let stack = Stack::new(
                &mut b,
                "decoder_blocks",
                "decoder_norm",
                c.decoder_d,
                c.decoder_heads,
                c.decoder_layers,
            )?;
            let pred = Linear::new(&mut b, "decoder_pred", c.decoder_d, c.patch_dim(), plain)?;
            Some(Decoder {
                embed,
                mask_token,
                pos,
                stack,
                pred,
            })
        } else {
            None
        };
        let two_layers = |b: &mut Builder, name: &str, fan_in: usize| -> Result<[Linear; 2]> {
            Ok([
                Linear::new(b, &format!("{name}.0"), fan_in, CONTRASTIVE_HIDDEN, plain)?,
                Linear::new(
                    b,
                    &format!("{name}.1"),
                    CONTRASTIVE_HIDDEN,
                    c.proj_dim,
                    plain,
                )?,
            ])
        };
        let (projector, predictor) = if c.proj_dim > 0 {
            (
                Some(two_layers(&mut b, "projector", c.d_model)?),
                Some(two_layers(&mut b, "predictor", c.proj_dim)?),
            )
        } else {
            (None, None)
        };
        let (params, parallel) = b.build(DType::F32);
        Ok(Vit {
            config,
            params,
            parallel,
            patch_embed,
            cls_token,
            pos,
            encoder,
            head,
            decoder,
            projector,
            predictor,
        })
    }

    /// What the layers read their parameters from, made anew each pass so it sees the current
    /// parameter tensors (freezing lays them out afresh).
    pub fn weights(&self) -> Weights {
        Weights::new(&self.params, self.parallel.clone())
    }

    /// The encoder's output `[B, 1 + kept, d]` for patches `[B, P, C·p²]`, of which each image
    /// keeps the patch indices in `keep` (`kept` per image, flattened), or all of them.
    fn encode(
        &self,
        patches: &Tensor,
        keep: Option<&[usize]>,
        training: Option<DropoutKey>,
    ) -> Result<Tensor> {
        let w = &self.weights();
        let c = &self.config;
        let (b, p) = (patches.shape()[0], c.patches());
        let pos = self.pos.range(w, 1, p)?;
        let x = self.patch_embed.forward(w, patches)?.add(&pos)?;
        let (x, kept) = match keep {
            None => (x, p),
            Some(keep) => {
                let kept = keep.len() / b.max(1);
                let rows: Vec<usize> = keep
                    .iter()
                    .enumerate()
                    .map(|(r, &k)| (r / kept) * p + k)
                    .collect();
                let x = x
                    .reshape(&[b * p, c.d_model])?
                    .index_select(0, &rows)?
                    .reshape(&[b, kept, c.d_model])?;
                (x, kept)
            }
        };
        let cls = w
            .get(self.cls_token)?
            .add(&self.pos.range(w, 0, 1)?)?
            .index_select(0, &vec![0; b])?
            .reshape(&[b, 1, c.d_model])?;
        let x = Tensor::concat(&[&cls, &x], 1)?;
        debug_assert_eq!(x.shape(), [b, kept + 1, c.d_model]);
        self.encoder.forward(w, x, training)
    }

    /// Patches `[B, P, C·p²]` of images `[B, C, S, S]`.
    pub fn patches_of(&self, images: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let b = images.shape()[0];
        let values = images.to_vec_f32();
        Tensor::from_f32(
            patchify(&values, b, c.channels, c.side, c.patch),
            &[b, c.patches(), c.patch_dim()],
        )
    }

    /// The `[cls]` output `[B, d]` of images `[B, C, S, S]` (the features a probe or head reads).
    pub fn features(&self, images: &Tensor, training: Option<DropoutKey>) -> Result<Tensor> {
        let x = self.encode(&self.patches_of(images)?, None, training)?;
        let b = x.shape()[0];
        x.narrow(1, 0, 1)?.reshape(&[b, self.config.d_model])
    }

    /// Class logits `[B, classes]` of images `[B, C, S, S]`; fails for a model without a head.
    pub fn classify(&self, images: &Tensor, training: Option<DropoutKey>) -> Result<Tensor> {
        let head = self
            .head
            .as_ref()
            .ok_or_else(|| anneal_tensor::Error::Invalid {
                op: "Vit::classify",
                reason: "this ViT was built without a classifier head (classes = 0)".into(),
            })?;
        head.forward(&self.weights(), &self.features(images, training)?)
    }

    /// MAE's forward pass on images `[B, C, S, S]`: a random `mask_ratio` of each image's
    /// patches (drawn from `seed`) is hidden from the encoder and predicted by the decoder.
    /// Fails for a model without a decoder.
    pub fn mae(
        &self,
        images: &Tensor,
        mask_ratio: f32,
        seed: u64,
        training: Option<DropoutKey>,
    ) -> Result<MaeOutput> {
        let d = self
            .decoder
            .as_ref()
            .ok_or_else(|| anneal_tensor::Error::Invalid {
                op: "Vit::mae",
                reason: "this ViT was built without an MAE decoder (decoder_d = 0)".into(),
            })?;
        let w = &self.weights();
        let c = &self.config;
        let (b, p) = (images.shape()[0], c.patches());
        let kept = ((p as f32 * (1.0 - mask_ratio)).round() as usize).clamp(1, p);
        let keep = random_keep(b, p, kept, seed);
        let patches = self.patches_of(images)?;
        let encoded = self.encode(&patches, Some(&keep), training)?;
        let x = d.embed.forward(w, &encoded)?; // [B, 1 + kept, dd]
        let dd = c.decoder_d;
        // Rows of [kept tokens of every image; mask tokens], put back in patch order.
        let visible = x.narrow(1, 1, kept)?.reshape(&[b * kept, dd])?;
        let masked = b * (p - kept);
        let fill = w
            .get(d.mask_token)?
            .index_select(0, &vec![0; masked.max(1)])?;
        let fill = fill.narrow(0, 0, masked)?;
        let pool = Tensor::concat(&[&visible, &fill], 0)?;
        let mut mask = vec![1.0f32; b * p];
        let mut order = vec![0usize; b * p];
        let mut next_fill = b * kept;
        for img in 0..b {
            let mut is_kept = vec![false; p];
            for (j, &k) in keep[img * kept..(img + 1) * kept].iter().enumerate() {
                is_kept[k] = true;
                order[img * p + k] = img * kept + j;
                mask[img * p + k] = 0.0;
            }
            for (k, _) in is_kept.iter().enumerate().filter(|(_, &kept)| !kept) {
                order[img * p + k] = next_fill;
                next_fill += 1;
            }
        }
        let tokens = pool.index_select(0, &order)?.reshape(&[b, p, dd])?;
        let cls = x.narrow(1, 0, 1)?;
        let y = Tensor::concat(&[&cls, &tokens], 1)?.add(&d.pos.range(w, 0, p + 1)?)?;
        let y = d
            .stack
            .forward(w, y, training.map(|k| k.with_seed(k.seed ^ 0xdec0)))?;
        let pred = d.pred.forward(w, &y.narrow(1, 1, p)?)?;
        Ok(MaeOutput {
            pred,
            patches,
            mask,
        })
    }

    /// The projector's output `[B, proj_dim]` of images `[B, C, S, S]` (MoCo v3's momentum
    /// branch); fails for a model without contrastive heads.
    pub fn project(&self, images: &Tensor, training: Option<DropoutKey>) -> Result<Tensor> {
        let [fc, out] = self
            .projector
            .as_ref()
            .ok_or_else(|| anneal_tensor::Error::Invalid {
                op: "Vit::project",
                reason: "this ViT was built without contrastive heads (proj_dim = 0)".into(),
            })?;
        let w = &self.weights();
        let h = fc.forward(w, &self.features(images, training)?)?.relu();
        out.forward(w, &h)
    }

    /// The predictor's output `[B, proj_dim]` of images `[B, C, S, S]` (MoCo v3's query
    /// branch: backbone, projector, predictor).
    pub fn predict(&self, images: &Tensor, training: Option<DropoutKey>) -> Result<Tensor> {
        let z = self.project(images, training)?;
        let [fc, out] = self
            .predictor
            .as_ref()
            .ok_or_else(|| anneal_tensor::Error::Invalid {
                op: "Vit::predict",
                reason: "this ViT was built without contrastive heads (proj_dim = 0)".into(),
            })?;
        let w = &self.weights();
        out.forward(w, &fc.forward(w, &z)?.relu())
    }

    /// Whether parameter `name` belongs to the encoder (what a fine-tuned classifier takes from
    /// a pretrained MAE or MoCo model): everything but the head, the decoder and the
    /// contrastive heads.
    pub fn is_encoder_param(name: &str) -> bool {
        !["head", "decoder", "mask_token", "projector", "predictor"]
            .iter()
            .any(|p| name.starts_with(p))
    }

    /// Copies every encoder parameter of `other` (the parameters of a ViT with the same encoder
    /// shape, an MAE's say) into this model.
    pub fn load_encoder_from(&self, other: &ParamStore) -> Result<()> {
        self.params.copy_from(other, Vit::is_encoder_param)?;
        Ok(())
    }

    /// Training FLOPs per image without masking (6 × parameters × tokens, the attention
    /// scores aside).
    pub fn flops_per_image(&self) -> f64 {
        6.0 * self.params.numel() as f64 * (self.config.patches() + 1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patchify_orders_patches_and_values_row_major() {
        // One 4×4 image of values 0..16 in 2×2 patches.
        let pixels: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let p = patchify(&pixels, 1, 1, 4, 2);
        assert_eq!(
            p,
            [0., 1., 4., 5., 2., 3., 6., 7., 8., 9., 12., 13., 10., 11., 14., 15.]
        );
    }

    #[test]
    fn random_keep_is_seeded_sorted_and_distinct() {
        let a = random_keep(3, 16, 4, 7);
        assert_eq!(a, random_keep(3, 16, 4, 7));
        assert_ne!(a, random_keep(3, 16, 4, 8));
        for img in a.chunks(4) {
            assert!(img.windows(2).all(|w| w[0] < w[1]));
        }
    }

    #[test]
    fn shapes_masking_and_encoder_transfer() {
        let config = VitConfig {
            side: 8,
            patch: 2,
            d_model: 16,
            n_head: 2,
            n_layer: 1,
            classes: 3,
            decoder_d: 8,
            decoder_layers: 1,
            decoder_heads: 2,
            proj_dim: 0,
            channels: 1,
        };
        let vit = Vit::new(config.clone(), 0).unwrap();
        let x = anneal_tensor::testing::randn(&[2, 1, 8, 8], 1);
        assert_eq!(vit.classify(&x, None).unwrap().shape(), [2, 3]);
        let out = vit.mae(&x, 0.75, 5, None).unwrap();
        assert_eq!(out.pred.shape(), [2, 16, 4]);
        assert_eq!(out.mask.iter().filter(|&&m| m == 1.0).count(), 24);
        // Gradients reach the encoder through the kept patches only.
        let loss = out.pred.sum_all().unwrap();
        loss.backward().unwrap();
        assert!(vit.params.grad_norm() > 0.0);
        // An MAE's encoder loads into a classifier without a decoder.
        let classifier = Vit::new(
            VitConfig {
                decoder_d: 0,
                ..config
            },
            9,
        )
        .unwrap();
        classifier.load_encoder_from(&vit.params).unwrap();
        assert_eq!(
            classifier
                .params
                .by_name("blocks.0.attn.c_attn.weight")
                .unwrap()
                .to_vec_f32(),
            vit.params
                .by_name("blocks.0.attn.c_attn.weight")
                .unwrap()
                .to_vec_f32()
        );
        assert!(classifier.mae(&x, 0.75, 5, None).is_err());
        // Frozen but for the head (a linear probe), the head still takes its gradient.
        let mut classifier = classifier;
        assert_eq!(classifier.params.train_only(|n| n.starts_with("head")), 2);
        let loss = classifier.classify(&x, None).unwrap().sum_all().unwrap();
        loss.backward().unwrap();
        assert!(classifier.params.grad_norm() > 0.0);
    }
}
