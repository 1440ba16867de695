//! A pre-norm transformer block (GPT-2, Llama):
//!
//! ```text
//! x = x + dropout(attention(norm_1(x)))
//! x = x + dropout(mlp(norm_2(x)))
//! ```
//!
//! The feed-forward network may be a Mixture of Experts ([`MoeMlp`]), whose auxiliary losses
//! and routing statistics the block's forward returns beside its output.

use super::{
    join, Attention, AttentionConfig, Builder, Linear, Mlp, MlpKind, MoeAux, MoeConfig, MoeMlp,
    Norm, NormKind, QkvNames, WeightLayout, Weights,
};
use anneal_tensor::{DropoutKey, ParamId, ParamStore, Result, Tensor};

/// Names of a block's four parts under its prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockNames {
    /// The norm before attention.
    pub norm_1: &'static str,
    /// The attention.
    pub attn: &'static str,
    /// The norm before the feed-forward network.
    pub norm_2: &'static str,
    /// The feed-forward network.
    pub mlp: &'static str,
}

impl BlockNames {
    /// GPT-2's: `ln_1`, `attn`, `ln_2`, `mlp`.
    pub const GPT2: BlockNames = BlockNames {
        norm_1: "ln_1",
        attn: "attn",
        norm_2: "ln_2",
        mlp: "mlp",
    };
    /// Llama's: `input_layernorm`, `self_attn`, `post_attention_layernorm`, `mlp`.
    pub const LLAMA: BlockNames = BlockNames {
        norm_1: "input_layernorm",
        attn: "self_attn",
        norm_2: "post_attention_layernorm",
        mlp: "mlp",
    };
}

/// Everything that shapes a block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockConfig {
    /// The attention.
    pub attention: AttentionConfig,
    /// Hidden width of the feed-forward network.
    pub d_ff: usize,
    /// Which feed-forward network.
    pub mlp: MlpKind,
    /// Which norm.
    pub norm: NormKind,
    /// The norms' ε.
    pub eps: f32,
    /// Names of the parts.
    pub names: BlockNames,
    /// A Mixture of Experts in place of the dense network, its experts `d_ff` wide.
    pub moe: Option<MoeConfig>,
}

impl BlockConfig {
    /// A GPT-2 block: LayerNorm, fused causal attention, GELU MLP of width 4·d, `[in, out]`
    /// weights, Normal(0, 0.02) weights with residual projections scaled by 1/√(2·n_layer)
    /// (GPT-2 paper §2.3).
    pub fn gpt2(d: usize, n_head: usize, n_layer: usize, bias: bool) -> BlockConfig {
        let proj_std = 0.02 / (2.0 * n_layer as f32).sqrt();
        BlockConfig {
            attention: AttentionConfig {
                d_model: d,
                n_head,
                n_kv_head: n_head,
                bias,
                causal: true,
                rope_base: None,
                save_probs: false,
                layout: WeightLayout::InOut,
                std: 0.02,
                proj_std,
                qkv: QkvNames::Fused("c_attn"),
                out: "c_proj",
            },
            d_ff: 4 * d,
            mlp: MlpKind::Gelu {
                fc: "c_fc",
                proj: "c_proj",
            },
            norm: NormKind::Layer { bias },
            eps: 1e-5,
            names: BlockNames::GPT2,
            moe: None,
        }
    }

    /// A Llama block: RMSNorm, grouped-query causal attention with RoPE, SiLU-gated MLP,
    /// `[out, in]` weights, no biases.
    pub fn llama(
        d: usize,
        n_head: usize,
        n_kv_head: usize,
        d_ff: usize,
        rope_base: f32,
        eps: f32,
    ) -> BlockConfig {
        BlockConfig {
            attention: AttentionConfig {
                d_model: d,
                n_head,
                n_kv_head,
                bias: false,
                causal: true,
                rope_base: Some(rope_base),
                save_probs: false,
                layout: WeightLayout::OutIn,
                std: 0.02,
                proj_std: 0.02,
                qkv: QkvNames::Separate("q_proj", "k_proj", "v_proj"),
                out: "o_proj",
            },
            d_ff,
            mlp: MlpKind::GatedSilu {
                gate: "gate_proj",
                up: "up_proj",
                down: "down_proj",
            },
            norm: NormKind::Rms,
            eps,
            names: BlockNames::LLAMA,
            moe: None,
        }
    }
}

/// A block's feed-forward network.
#[derive(Clone, Debug)]
pub enum FeedForward {
    /// One network for every token.
    Dense(Mlp),
    /// A Mixture of Experts.
    Experts(MoeMlp),
}

impl FeedForward {
    /// Every parameter id.
    pub fn params(&self) -> Vec<ParamId> {
        match self {
            FeedForward::Dense(m) => m.params(),
            FeedForward::Experts(m) => m.params(),
        }
    }

    /// The network on `x`; `training` as [`MoeMlp::forward`] takes it.
    pub fn forward(
        &self,
        w: &Weights,
        x: &Tensor,
        training: Option<DropoutKey>,
    ) -> Result<(Tensor, Option<MoeAux>)> {
        match self {
            FeedForward::Dense(m) => Ok((m.forward(w, x)?, None)),
            FeedForward::Experts(m) => {
                let (y, aux) = m.forward(w, x, training)?;
                Ok((y, Some(aux)))
            }
        }
    }
}

/// A pre-norm transformer block.
#[derive(Clone, Debug)]
pub struct Block {
    norm_1: Norm,
    attn: Attention,
    norm_2: Norm,
    ffn: FeedForward,
}

impl Block {
    /// Declares the block's parameters under `prefix` (e.g. `transformer.h.0`): both norms,
    /// then the attention, then the feed-forward network. (The order lays out the flat
    /// buffers; it is the one GPT checkpoints have always had, so their optimizer state loads.)
    pub fn new(b: &mut Builder, prefix: &str, c: &BlockConfig) -> Result<Block> {
        let (n, a) = (&c.names, &c.attention);
        let d = a.d_model;
        let norm_1 = Norm::new(b, &join(prefix, n.norm_1), d, c.norm, c.eps)?;
        let norm_2 = Norm::new(b, &join(prefix, n.norm_2), d, c.norm, c.eps)?;
        let attn = Attention::new(b, &join(prefix, n.attn), a)?;
        let ffn = match (c.moe, c.mlp) {
            (None, _) => FeedForward::Dense(Mlp::new(
                b,
                &join(prefix, n.mlp),
                d,
                c.d_ff,
                c.mlp,
                a.bias,
                a.layout,
                a.std,
                a.proj_std,
            )?),
            (Some(moe), MlpKind::Gelu { fc, proj } | MlpKind::GeluErf { fc, proj })
                if a.layout == WeightLayout::InOut =>
            {
                FeedForward::Experts(MoeMlp::new(
                    b,
                    &join(prefix, n.mlp),
                    d,
                    c.d_ff,
                    moe,
                    (fc, proj),
                    matches!(c.mlp, MlpKind::GeluErf { .. }),
                    a.bias,
                    a.std,
                    a.proj_std,
                )?)
            }
            (Some(_), kind) => {
                return Err(anneal_tensor::Error::Invalid {
                    op: "Block",
                    reason: format!(
                        "a Mixture of Experts is built of GELU experts with [in, out] weights; \
                         this block has {kind:?} with {:?} weights",
                        a.layout
                    ),
                })
            }
        };
        Ok(Block {
            norm_1,
            attn,
            norm_2,
            ffn,
        })
    }

    /// Its feed-forward network.
    pub fn feed_forward(&self) -> &FeedForward {
        &self.ffn
    }

    /// Every parameter id of the block.
    pub fn params(&self) -> Vec<ParamId> {
        [
            self.norm_1.params(),
            self.attn.params(),
            self.norm_2.params(),
            self.ffn.params(),
        ]
        .concat()
    }

    /// Its linear layers: attention's, then the feed-forward network's.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut out = self.attn.linears();
        if let FeedForward::Dense(mlp) = &self.ffn {
            out.extend(mlp.linears());
        }
        out
    }

    /// Merges every adapter of the block into its weight (`true`) or takes it back out.
    pub fn set_lora_merged(&self, params: &ParamStore, merge: bool) -> Result<()> {
        for l in self.linears() {
            l.set_merged(params, merge)?;
        }
        Ok(())
    }

    /// The block on `x` `[B, T, d]`, and what a Mixture of Experts reports; `training` is the
    /// dropout key of a training forward (`None`: evaluation). In training, `p_drop > 0` drops
    /// residual-branch outputs with masks derived from the key (attention's from its seed, the
    /// MLP's from the seed ^ 1).
    pub fn forward(
        &self,
        w: &Weights,
        x: &Tensor,
        p_drop: f32,
        training: Option<DropoutKey>,
    ) -> Result<(Tensor, Option<MoeAux>)> {
        let (p_drop, key) = match training {
            Some(key) => (p_drop, key),
            None => (0.0, DropoutKey::default()),
        };
        let a = self.attn.forward(w, &self.norm_1.forward(w, x)?)?;
        let x = x.add(&a.dropout_at(p_drop, key)?)?;
        let (h, aux) = self
            .ffn
            .forward(w, &self.norm_2.forward(w, &x)?, training)?;
        let y = x.add(&h.dropout_at(p_drop, key.with_seed(key.seed ^ 1))?)?;
        Ok((y, aux))
    }

    /// The block under sequence parallelism: `x` `[n/tp, d]` is this rank's rows of the batch's
    /// `[B, T, d]` (`shape` = `[B, T]`), and so is the output. The norms, dropout and residual
    /// additions run on the rows; attention's and the feed-forward network's input is gathered
    /// whole, their row-parallel outputs reduce-scattered back into rows. `training` is the
    /// dropout key of these rows (its `first_row` counting rows of `[n, d]`).
    pub fn forward_rows(
        &self,
        w: &Weights,
        x: &Tensor,
        shape: [usize; 2],
        p_drop: f32,
        training: Option<DropoutKey>,
    ) -> Result<Tensor> {
        let (p_drop, key) = match training {
            Some(key) => (p_drop, key),
            None => (0.0, DropoutKey::default()),
        };
        let d = x.shape()[1];
        let [b, t] = shape;
        let parallel = w.parallel();
        let whole =
            |h: &Tensor| -> Result<Tensor> { parallel.gather_sequence(h)?.reshape(&[b, t, d]) };
        let a = self.attn.forward(w, &whole(&self.norm_1.forward(w, x)?)?)?;
        let x = x.add(&a.dropout_at(p_drop, key)?)?;
        let (h, _) = self
            .ffn
            .forward(w, &whole(&self.norm_2.forward(w, &x)?)?, training)?;
        let h = h.reshape(&[x.shape()[0], d])?;
        x.add(&h.dropout_at(p_drop, key.with_seed(key.seed ^ 1))?)
    }

    /// The block on `x` `[1, n, d]` at positions `start..start + n`, attending to the cached
    /// `past`; returns the output and this layer's keys and values so far. No dropout.
    pub fn forward_cached(
        &self,
        w: &Weights,
        x: &Tensor,
        past: Option<&(Tensor, Tensor)>,
        start: usize,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        self.forward_cached_rows(w, x, past, &[start as isize], None)
    }

    /// [`Block::forward_cached`] for a batch whose rows start at their own positions, padding
    /// masked ([`Attention::forward_cached_rows`]).
    pub fn forward_cached_rows(
        &self,
        w: &Weights,
        x: &Tensor,
        past: Option<&(Tensor, Tensor)>,
        starts: &[isize],
        key_padding_mask: Option<Vec<bool>>,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let (a, kv) = self.attn.forward_cached_rows(
            w,
            &self.norm_1.forward(w, x)?,
            past,
            starts,
            key_padding_mask,
        )?;
        let x = x.add(&a)?;
        // Generation routes dropless: a token's experts do not depend on how many came with it.
        let n = self.norm_2.forward(w, &x)?;
        let h = match &self.ffn {
            FeedForward::Dense(m) => m.forward(w, &n)?,
            FeedForward::Experts(m) => m.forward_dropless(w, &n)?.0,
        };
        Ok((x.add(&h)?, kv))
    }
}
