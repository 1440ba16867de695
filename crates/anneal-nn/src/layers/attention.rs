//! Multi-head self-attention (Vaswani et al. 2017) with grouped key/value heads (Ainslie et al.
//! 2023, GQA), optional rotary positions (Su et al. 2021, RoPE) and a key/value cache for
//! generation. Q, K and V come from one fused projection (GPT-2's `c_attn`) or three
//! (`q_proj`, `k_proj`, `v_proj` as Llama names them).

use super::{join, Builder, Linear, LinearOptions, LinearSplit, WeightLayout, Weights};
use anneal_tensor::{AttentionOptions, Error, ParamId, Result, Tensor};

/// Names of the Q/K/V projections under the attention's prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkvNames {
    /// One projection producing Q, K and V side by side (GPT-2: `c_attn`).
    Fused(&'static str),
    /// Three projections (Llama: `q_proj`, `k_proj`, `v_proj`).
    Separate(&'static str, &'static str, &'static str),
}

/// The shape and names of an attention layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionConfig {
    /// Width of the residual stream.
    pub d_model: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (a divisor of `n_head`; equal for multi-head attention).
    pub n_kv_head: usize,
    /// Biases on the projections.
    pub bias: bool,
    /// Each position attends only to itself and earlier ones.
    pub causal: bool,
    /// Rotary position embedding base (Llama: 10,000), or none (learned positions elsewhere).
    pub rope_base: Option<f32>,
    /// Keep the attention probabilities for backward instead of recomputing them
    /// ([`AttentionOptions::save_probs`]): the recomputation policy "none".
    pub save_probs: bool,
    /// Weight layout of the checkpoint.
    pub layout: WeightLayout,
    /// Initial standard deviation of the Q/K/V weights.
    pub std: f32,
    /// Initial standard deviation of the output projection.
    pub proj_std: f32,
    /// Names of the Q/K/V projections.
    pub qkv: QkvNames,
    /// Name of the output projection (GPT-2: `c_proj`, Llama: `o_proj`).
    pub out: &'static str,
}

#[derive(Clone, Debug)]
enum Qkv {
    Fused(Linear),
    Separate(Linear, Linear, Linear),
}

/// Self-attention with its input and output projections.
#[derive(Clone, Debug)]
pub struct Attention {
    qkv: Qkv,
    out: Linear,
    /// Heads on this rank.
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    causal: bool,
    rope_base: Option<f32>,
    save_probs: bool,
}

impl Attention {
    /// Declares the projections under `prefix`. Under tensor parallelism the heads are split
    /// across ranks (separate projections only).
    pub fn new(b: &mut Builder, prefix: &str, c: &AttentionConfig) -> Result<Attention> {
        let (_, tp) = b.parallel().tensor_parallel();
        if c.n_kv_head == 0
            || !c.n_head.is_multiple_of(c.n_kv_head)
            || !c.d_model.is_multiple_of(c.n_head)
            || !c.n_kv_head.is_multiple_of(tp)
        {
            return Err(Error::Invalid {
                op: "Attention::new",
                reason: format!(
                    "{} heads, {} key/value heads, width {} and {tp} tensor-parallel ranks: \
                     heads must divide the width, key/value heads the heads, ranks the \
                     key/value heads",
                    c.n_head, c.n_kv_head, c.d_model
                ),
            });
        }
        let hd = c.d_model / c.n_head;
        let (column, row) = if tp > 1 {
            (LinearSplit::Column, LinearSplit::Row)
        } else {
            (LinearSplit::None, LinearSplit::None)
        };
        let opts = |std: f32, split| LinearOptions {
            bias: c.bias,
            std,
            layout: c.layout,
            split,
        };
        let qkv = match c.qkv {
            QkvNames::Fused(name) => {
                if tp > 1 && c.n_kv_head != c.n_head {
                    return Err(Error::Invalid {
                        op: "Attention::new",
                        reason: format!(
                            "a fused QKV projection with grouped key/value heads ({} of {}) \
                             cannot be split across ranks; use separate projections",
                            c.n_kv_head, c.n_head
                        ),
                    });
                }
                let width = (c.n_head + 2 * c.n_kv_head) * hd;
                // Each rank takes its heads' queries, keys and values.
                let split = if tp > 1 {
                    LinearSplit::ColumnBlocks(3)
                } else {
                    column
                };
                Qkv::Fused(Linear::new(
                    b,
                    &join(prefix, name),
                    c.d_model,
                    width,
                    opts(c.std, split),
                )?)
            }
            QkvNames::Separate(q, k, v) => {
                let kv = c.n_kv_head * hd;
                Qkv::Separate(
                    Linear::new(
                        b,
                        &join(prefix, q),
                        c.d_model,
                        c.d_model,
                        opts(c.std, column),
                    )?,
                    Linear::new(b, &join(prefix, k), c.d_model, kv, opts(c.std, column))?,
                    Linear::new(b, &join(prefix, v), c.d_model, kv, opts(c.std, column))?,
                )
            }
        };
        let out = Linear::new(
            b,
            &join(prefix, c.out),
            c.d_model,
            c.d_model,
            opts(c.proj_std, row),
        )?;
        Ok(Attention {
            qkv,
            out,
            n_head: c.n_head / tp,
            n_kv_head: c.n_kv_head / tp,
            head_dim: hd,
            causal: c.causal,
            rope_base: c.rope_base,
            save_probs: c.save_probs,
        })
    }

    /// Its linear layers: the Q/K/V projection(s), then the output projection.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut out = match &self.qkv {
            Qkv::Fused(l) => vec![l],
            Qkv::Separate(q, k, v) => vec![q, k, v],
        };
        out.push(&self.out);
        out
    }

    /// Every parameter id of the layer.
    pub fn params(&self) -> Vec<ParamId> {
        let mut out = match &self.qkv {
            Qkv::Fused(l) => l.params(),
            Qkv::Separate(q, k, v) => [q.params(), k.params(), v.params()].concat(),
        };
        out.extend(self.out.params());
        out
    }

    fn options(&self) -> AttentionOptions {
        AttentionOptions {
            causal: self.causal,
            key_padding_mask: None,
            scale: None,
            save_probs: self.save_probs,
        }
    }

    /// Attention over `x` `[B, T, d]` where `key_padding_mask` (`[B, T]` flags, `true` for
    /// real tokens) keeps every query from attending to padding (BERT's attention mask).
    pub fn forward_masked(
        &self,
        w: &Weights,
        x: &Tensor,
        key_padding_mask: Option<Vec<bool>>,
    ) -> Result<Tensor> {
        if key_padding_mask.is_none() {
            return self.forward(w, x);
        }
        let (b, t) = (x.shape()[0], x.shape()[1]);
        let options = AttentionOptions {
            key_padding_mask,
            ..self.options()
        };
        let [q, k, v] = self.project(w, x, &[0])?;
        let a = Tensor::attention(&q, &k, &v, &options)?.reshape(&[
            b,
            t,
            self.n_head * self.head_dim,
        ])?;
        self.out.forward(w, &a)
    }

    /// Q `[B, T, H, D]`, K and V `[B, T, Hkv, D]` of `x` `[B, T, d]`, rotated for positions
    /// `start..start + T` (one start, or one per row) when the layer uses RoPE.
    fn project(&self, w: &Weights, x: &Tensor, starts: &[isize]) -> Result<[Tensor; 3]> {
        let (b, t) = (x.shape()[0], x.shape()[1]);
        let (h, hkv, hd) = (self.n_head, self.n_kv_head, self.head_dim);
        let [q, k, v] = match &self.qkv {
            Qkv::Fused(l) => {
                let qkv = l.forward(w, x)?;
                [
                    qkv.narrow(2, 0, h * hd)?,
                    qkv.narrow(2, h * hd, hkv * hd)?,
                    qkv.narrow(2, (h + hkv) * hd, hkv * hd)?,
                ]
            }
            Qkv::Separate(q, k, v) => [q.forward(w, x)?, k.forward(w, x)?, v.forward(w, x)?],
        };
        let (q, k) = (q.reshape(&[b, t, h, hd])?, k.reshape(&[b, t, hkv, hd])?);
        let v = v.reshape(&[b, t, hkv, hd])?;
        match self.rope_base {
            Some(base) => Ok([q.rope_rows(base, starts)?, k.rope_rows(base, starts)?, v]),
            None => Ok([q, k, v]),
        }
    }

    /// Attention over `x` `[B, T, d]`, returning `[B, T, d]` after the output projection.
    pub fn forward(&self, w: &Weights, x: &Tensor) -> Result<Tensor> {
        let (b, t) = (x.shape()[0], x.shape()[1]);
        let a = match (&self.qkv, self.rope_base) {
            // GPT-2's fused path: one packed op, one packed gradient.
            (Qkv::Fused(l), None) => {
                l.forward(w, x)?
                    .attention_packed(self.n_head, self.n_kv_head, &self.options())?
            }
            _ => {
                let [q, k, v] = self.project(w, x, &[0])?;
                Tensor::attention(&q, &k, &v, &self.options())?.reshape(&[
                    b,
                    t,
                    self.n_head * self.head_dim,
                ])?
            }
        };
        self.out.forward(w, &a)
    }

    /// Attention of `x` `[1, n, d]` at positions `start..start + n` over the keys and values of
    /// the earlier positions in `past`; returns the output and the keys and values of all
    /// positions so far.
    pub fn forward_cached(
        &self,
        w: &Weights,
        x: &Tensor,
        past: Option<&(Tensor, Tensor)>,
        start: usize,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        self.forward_cached_rows(w, x, past, &[start as isize], None)
    }

    /// [`Attention::forward_cached`] for a batch `x` `[B, n, d]` of sequences that share the
    /// cache's time axis: row b's positions start at `starts[b]` (negative under left padding)
    /// and `key_padding_mask` (`[B, S]` flags over every position so far, `true` for real
    /// tokens) keeps queries off the padding.
    pub fn forward_cached_rows(
        &self,
        w: &Weights,
        x: &Tensor,
        past: Option<&(Tensor, Tensor)>,
        starts: &[isize],
        key_padding_mask: Option<Vec<bool>>,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let (b, n) = (x.shape()[0], x.shape()[1]);
        let [q, mut k, mut v] = self.project(w, x, starts)?;
        if let Some((pk, pv)) = past {
            k = Tensor::concat(&[pk, &k], 1)?;
            v = Tensor::concat(&[pv, &v], 1)?;
        }
        let options = AttentionOptions {
            key_padding_mask,
            ..self.options()
        };
        let a = Tensor::attention(&q, &k, &v, &options)?.reshape(&[
            b,
            n,
            self.n_head * self.head_dim,
        ])?;
        Ok((self.out.forward(w, &a)?, (k, v)))
    }
}

/// Keys and values of the positions already run, per layer, so that generating one more token
/// costs one position's work (O(context) attention) instead of a re-run of the whole context.
#[derive(Clone, Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> KvCache {
        KvCache::default()
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position.
    pub fn clear(&mut self) {
        self.layers.clear();
        self.len = 0;
    }

    /// Layer `i`'s keys and values, if it has run.
    pub fn layer(&self, i: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(i)
    }

    /// Stores layer `i`'s keys and values (layers are filled in order).
    pub fn set_layer(&mut self, i: usize, kv: (Tensor, Tensor)) {
        if i < self.layers.len() {
            self.layers[i] = kv;
        } else {
            self.layers.push(kv);
        }
    }

    /// Records that `n` more positions have run through every layer.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
