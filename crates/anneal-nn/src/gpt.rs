//! GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"), the
//! architecture of nanoGPT's `model.py` and Hugging Face's `GPT2LMHeadModel`, with the same
//! parameter names and layouts (`Conv1D` weights stored `[in, out]`).
//!
//! ```text
//! x = wte[ids] + wpe[0..T]
//! for each block:  x = x + proj(attention(ln_1(x)))        (causal, fused)
//!                  x = x + mlp_proj(gelu(fc(ln_2(x))))
//! logits = ln_f(x) · wteᵀ            (tied head; or lm_head.weightᵀ when untied)
//! ```

use anneal_tensor::{
    checkpoint, AttentionOptions, CrossEntropyOptions, DType, ParamId, ParamStore,
    ParamStoreBuilder, Result, Rng, Tensor,
};

/// Hyper-parameters of a GPT-2 model.
#[derive(Clone, Debug, PartialEq)]
pub struct GptConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest context (number of learned positions).
    pub block_size: usize,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Dropout probability on embeddings, attention output and MLP output while training.
    pub dropout: f32,
    /// Whether linear layers and LayerNorms have biases (GPT-2: yes).
    pub bias: bool,
    /// Output head shares the token embedding (GPT-2: yes).
    pub tie_embeddings: bool,
    /// Storage dtype of parameters and activations (arithmetic is f32).
    pub dtype: DType,
    /// Recompute each block in backward instead of keeping its activations.
    pub checkpoint_blocks: bool,
}

impl GptConfig {
    /// GPT-2 small: 12 layers, 12 heads, width 768, 50,257 tokens, 1,024 positions.
    pub fn gpt2() -> GptConfig {
        GptConfig {
            vocab_size: 50257,
            block_size: 1024,
            n_layer: 12,
            n_head: 12,
            n_embd: 768,
            dropout: 0.0,
            bias: true,
            tie_embeddings: true,
            dtype: DType::F32,
            checkpoint_blocks: false,
        }
    }

    /// The engine's reference benchmark model: 4 layers, width 256, 4 heads, context 256,
    /// vocabulary 512.
    pub fn bench() -> GptConfig {
        GptConfig {
            vocab_size: 512,
            block_size: 256,
            n_layer: 4,
            n_head: 4,
            n_embd: 256,
            ..GptConfig::gpt2()
        }
    }

    /// Parameters outside the embeddings: 12·d² + 13·d per block (with biases) plus the final
    /// LayerNorm, and the head when it is not tied (Kaplan et al. 2020 count N this way).
    pub fn non_embedding_params(&self) -> usize {
        let d = self.n_embd;
        let b = if self.bias { 1 } else { 0 };
        let per_block = 12 * d * d + b * (3 * d + d + 4 * d + d) + (2 + 2 * b) * d;
        let head = if self.tie_embeddings {
            0
        } else {
            self.vocab_size * d
        };
        self.n_layer * per_block + (1 + b) * d + head
    }

    /// Training FLOPs per token: 6·N + 12·L·T·d (Kaplan et al. 2020; the attention term as in
    /// PaLM's MFU accounting, Chowdhery et al. 2022).
    pub fn flops_per_token(&self, seq_len: usize) -> f64 {
        6.0 * self.non_embedding_params() as f64
            + 12.0 * (self.n_layer * seq_len * self.n_embd) as f64
    }
}

struct BlockParams {
    ln_1: (ParamId, Option<ParamId>),
    c_attn: (ParamId, Option<ParamId>),
    attn_proj: (ParamId, Option<ParamId>),
    ln_2: (ParamId, Option<ParamId>),
    c_fc: (ParamId, Option<ParamId>),
    mlp_proj: (ParamId, Option<ParamId>),
}

/// A GPT-2 model and its parameters.
pub struct Gpt {
    /// Its hyper-parameters.
    pub config: GptConfig,
    /// Its parameters, flat, under Hugging Face names.
    pub params: ParamStore,
    wte: ParamId,
    wpe: ParamId,
    blocks: Vec<BlockParams>,
    ln_f: (ParamId, Option<ParamId>),
    lm_head: Option<ParamId>,
}

const LN_EPS: f32 = 1e-5;

impl Gpt {
    /// A freshly initialised model: weights Normal(0, 0.02), residual projections scaled by
    /// 1/√(2·n_layer) (GPT-2 paper §2.3), biases zero, LayerNorm weights one.
    pub fn new(config: GptConfig, seed: u64) -> Result<Gpt> {
        let c = &config;
        let mut rng = Rng::new(seed);
        let mut b = ParamStoreBuilder::new();
        let d = c.n_embd;
        let std = 0.02;
        let proj_std = 0.02 / (2.0 * c.n_layer as f32).sqrt();
        let mut normal = |shape: &[usize], s: f32| Tensor::randn(shape, s, DType::F32, &mut rng);
        let wte = b.add(
            "transformer.wte.weight",
            &normal(&[c.vocab_size, d], std),
            false,
        )?;
        let wpe = b.add(
            "transformer.wpe.weight",
            &normal(&[c.block_size, d], std),
            false,
        )?;
        let zeros = |n: usize| Tensor::zeros(&[n], DType::F32);
        let ones = |n: usize| Tensor::ones(&[n], DType::F32);
        let mut blocks = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let p = format!("transformer.h.{i}");
            let norm =
                |b: &mut ParamStoreBuilder, name: &str| -> Result<(ParamId, Option<ParamId>)> {
                    let w = b.add(&format!("{p}.{name}.weight"), &ones(d), false)?;
                    let bias = if c.bias {
                        Some(b.add(&format!("{p}.{name}.bias"), &zeros(d), false)?)
                    } else {
                        None
                    };
                    Ok((w, bias))
                };
            let ln_1 = norm(&mut b, "ln_1")?;
            let ln_2 = norm(&mut b, "ln_2")?;
            let mut linear = |b: &mut ParamStoreBuilder,
                              name: &str,
                              fan_in: usize,
                              fan_out: usize,
                              s: f32|
             -> Result<(ParamId, Option<ParamId>)> {
                let w = b.add(
                    &format!("{p}.{name}.weight"),
                    &normal(&[fan_in, fan_out], s),
                    true,
                )?;
                let bias = if c.bias {
                    Some(b.add(&format!("{p}.{name}.bias"), &zeros(fan_out), false)?)
                } else {
                    None
                };
                Ok((w, bias))
            };
            let c_attn = linear(&mut b, "attn.c_attn", d, 3 * d, std)?;
            let attn_proj = linear(&mut b, "attn.c_proj", d, d, proj_std)?;
            let c_fc = linear(&mut b, "mlp.c_fc", d, 4 * d, std)?;
            let mlp_proj = linear(&mut b, "mlp.c_proj", 4 * d, d, proj_std)?;
            blocks.push(BlockParams {
                ln_1,
                c_attn,
                attn_proj,
                ln_2,
                c_fc,
                mlp_proj,
            });
        }
        let ln_f_w = b.add("transformer.ln_f.weight", &ones(d), false)?;
        let ln_f_b = if c.bias {
            Some(b.add("transformer.ln_f.bias", &zeros(d), false)?)
        } else {
            None
        };
        let lm_head = if c.tie_embeddings {
            None
        } else {
            Some(b.add("lm_head.weight", &normal(&[c.vocab_size, d], std), true)?)
        };
        Ok(Gpt {
            params: b.build(c.dtype),
            config,
            wte,
            wpe,
            blocks,
            ln_f: (ln_f_w, ln_f_b),
            lm_head,
        })
    }

    fn p(&self, id: ParamId) -> Tensor {
        self.params.get(id).clone()
    }

    fn pair(&self, ids: (ParamId, Option<ParamId>)) -> (Tensor, Option<Tensor>) {
        (self.p(ids.0), ids.1.map(|b| self.p(b)))
    }

    /// Logits `[B·T, vocab]` for token ids `[B, T]` (row-major). `dropout_seed` turns dropout on
    /// (training) with masks derived from it; `None` is evaluation.
    pub fn forward(
        &self,
        ids: &[u32],
        batch: usize,
        seq: usize,
        dropout_seed: Option<u64>,
    ) -> Result<Tensor> {
        let c = &self.config;
        if seq > c.block_size {
            return Err(anneal_tensor::Error::Invalid {
                op: "Gpt::forward",
                reason: format!("sequence length {seq} exceeds block_size {}", c.block_size),
            });
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= c.vocab_size) {
            return Err(anneal_tensor::Error::IndexOutOfRange {
                op: "Gpt::forward",
                index: bad as i64,
                limit: c.vocab_size,
            });
        }
        let p_drop = if dropout_seed.is_some() {
            c.dropout
        } else {
            0.0
        };
        let seed = dropout_seed.unwrap_or(0);
        let tok = self.p(self.wte).embedding(ids, &[batch, seq])?;
        let pos = self.p(self.wpe).narrow(0, 0, seq)?;
        let mut x = tok.add(&pos)?.dropout(p_drop, seed)?;
        for i in 0..self.blocks.len() {
            let run = self.block_run(
                i,
                p_drop,
                seed.wrapping_add(1 + 2 * i as u64)
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            x = if c.checkpoint_blocks {
                checkpoint(&[x], move |t| run.forward(&t[0]))?
            } else {
                run.forward(&x)?
            };
        }
        self.head(&x, batch * seq)
    }

    fn block_run(&self, i: usize, p_drop: f32, seed: u64) -> BlockRun {
        let blk = &self.blocks[i];
        BlockRun {
            ln_1: self.pair(blk.ln_1),
            c_attn: self.pair(blk.c_attn),
            attn_proj: self.pair(blk.attn_proj),
            ln_2: self.pair(blk.ln_2),
            c_fc: self.pair(blk.c_fc),
            mlp_proj: self.pair(blk.mlp_proj),
            n_head: self.config.n_head,
            p_drop,
            seed,
        }
    }

    /// Final LayerNorm and output head: `[…, d]` → logits `[rows, vocab]`.
    fn head(&self, x: &Tensor, rows: usize) -> Result<Tensor> {
        let (w, b) = self.pair(self.ln_f);
        let x = x.layer_norm(&w, b.as_ref(), LN_EPS)?;
        let head = match self.lm_head {
            Some(id) => self.p(id),
            None => self.p(self.wte),
        };
        let x = x.reshape(&[rows, self.config.n_embd])?;
        x.matmul(&head.transpose(0, 1)?)
    }

    /// Logits `[n, vocab]` of `ids` (one sequence) following the positions held in `cache`,
    /// which grows by `n`. Runs without recording gradients. Fails when the cache would exceed
    /// `block_size` (the caller then restarts from a shorter context).
    pub fn forward_cached(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let c = &self.config;
        let (start, n) = (cache.len, ids.len());
        if n == 0 || start + n > c.block_size {
            return Err(anneal_tensor::Error::Invalid {
                op: "Gpt::forward_cached",
                reason: format!(
                    "{n} new positions after {start} cached must be at least one and fit in \
                     block_size {}",
                    c.block_size
                ),
            });
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= c.vocab_size) {
            return Err(anneal_tensor::Error::IndexOutOfRange {
                op: "Gpt::forward_cached",
                index: bad as i64,
                limit: c.vocab_size,
            });
        }
        anneal_tensor::no_grad(|| {
            let (h, d) = (c.n_head, c.n_embd);
            let tok = self.p(self.wte).embedding(ids, &[1, n])?;
            let pos = self.p(self.wpe).narrow(0, start, n)?;
            let mut x = tok.add(&pos)?;
            for i in 0..self.blocks.len() {
                let run = self.block_run(i, 0.0, 0);
                x = run.forward_with(&x, |qkv| {
                    let part = |j: usize| qkv.narrow(2, j * d, d)?.reshape(&[1, n, h, d / h]);
                    let (q, mut k, mut v) = (part(0)?, part(1)?, part(2)?);
                    if let Some((pk, pv)) = cache.layers.get(i) {
                        k = Tensor::concat(&[pk, &k], 1)?;
                        v = Tensor::concat(&[pv, &v], 1)?;
                    }
                    let a = Tensor::attention(&q, &k, &v, &CAUSAL)?;
                    if i < cache.layers.len() {
                        cache.layers[i] = (k, v);
                    } else {
                        cache.layers.push((k, v));
                    }
                    a.reshape(&[1, n, d])
                })?;
            }
            cache.len += n;
            self.head(&x, n)
        })
    }

    /// Mean next-token cross-entropy of `[B, T]` inputs against `[B, T]` targets.
    pub fn loss(
        &self,
        ids: &[u32],
        targets: &[i64],
        batch: usize,
        seq: usize,
        dropout_seed: Option<u64>,
    ) -> Result<Tensor> {
        let logits = self.forward(ids, batch, seq, dropout_seed)?;
        logits.cross_entropy(targets, CrossEntropyOptions::default())
    }
}

const CAUSAL: AttentionOptions = AttentionOptions {
    causal: true,
    key_padding_mask: None,
    scale: None,
};

/// Keys and values of the positions already run, per block, so that generating one more token
/// costs one position's work (O(context) attention) instead of a re-run of the whole context.
#[derive(Default)]
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
}

/// One block's parameters and settings, movable into a checkpointed closure.
struct BlockRun {
    ln_1: (Tensor, Option<Tensor>),
    c_attn: (Tensor, Option<Tensor>),
    attn_proj: (Tensor, Option<Tensor>),
    ln_2: (Tensor, Option<Tensor>),
    c_fc: (Tensor, Option<Tensor>),
    mlp_proj: (Tensor, Option<Tensor>),
    n_head: usize,
    p_drop: f32,
    seed: u64,
}

impl BlockRun {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, |qkv| {
            qkv.attention_packed(self.n_head, self.n_head, &CAUSAL)
        })
    }

    /// The block with its attention given as `attend(qkv) → [B, T, d]`.
    fn forward_with(
        &self,
        x: &Tensor,
        attend: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let h = x.layer_norm(&self.ln_1.0, self.ln_1.1.as_ref(), LN_EPS)?;
        let qkv = h.linear(&self.c_attn.0, self.c_attn.1.as_ref())?;
        let a = attend(&qkv)?;
        let a = a
            .linear(&self.attn_proj.0, self.attn_proj.1.as_ref())?
            .dropout(self.p_drop, self.seed)?;
        let x = x.add(&a)?;
        let h = x.layer_norm(&self.ln_2.0, self.ln_2.1.as_ref(), LN_EPS)?;
        let h = h.linear(&self.c_fc.0, self.c_fc.1.as_ref())?.gelu_tanh();
        let h = h
            .linear(&self.mlp_proj.0, self.mlp_proj.1.as_ref())?
            .dropout(self.p_drop, self.seed ^ 1)?;
        x.add(&h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anneal_tensor::optim::{AdamW, AdamWConfig};

    fn tiny() -> GptConfig {
        GptConfig {
            vocab_size: 11,
            block_size: 8,
            n_layer: 2,
            n_head: 2,
            n_embd: 8,
            ..GptConfig::gpt2()
        }
    }

    #[test]
    fn parameter_names_and_counts_match_gpt2() {
        let m = Gpt::new(GptConfig::bench(), 0).unwrap();
        let names: Vec<&str> = m.params.infos().iter().map(|p| p.name.as_str()).collect();
        assert!(names.contains(&"transformer.h.3.attn.c_attn.weight"));
        assert_eq!(
            m.params
                .by_name("transformer.h.0.mlp.c_fc.weight")
                .unwrap()
                .shape(),
            &[256, 1024]
        );
        let c = GptConfig::bench();
        let embed = c.vocab_size * c.n_embd + c.block_size * c.n_embd;
        assert_eq!(m.params.numel(), embed + c.non_embedding_params());
        // GPT-2 small has 124,439,808 parameters with the tied head.
        let g = GptConfig::gpt2();
        assert_eq!(
            g.non_embedding_params() + g.vocab_size * 768 + 1024 * 768,
            124_439_808
        );
    }

    #[test]
    fn overfits_a_tiny_sequence() {
        let m = Gpt::new(tiny(), 1).unwrap();
        let ids: Vec<u32> = vec![1, 2, 3, 4, 5, 6, 7, 8, 3, 4, 5, 6, 7, 8, 9, 10];
        let targets: Vec<i64> = ids.iter().map(|&i| ((i + 1) % 11) as i64).collect();
        let mut opt = AdamW::new(
            &m.params,
            AdamWConfig {
                lr: 1e-2,
                ..Default::default()
            },
        );
        let first = m.loss(&ids, &targets, 2, 8, None).unwrap().item().unwrap();
        let mut last = first;
        for _ in 0..60 {
            m.params.zero_grad();
            let loss = m.loss(&ids, &targets, 2, 8, None).unwrap();
            loss.backward().unwrap();
            opt.step(&m.params);
            last = loss.item().unwrap();
        }
        assert!(first > 2.0 && last < 0.3, "loss {first} -> {last}");
    }

    #[test]
    fn checkpointed_blocks_give_the_same_gradients() {
        let ids: Vec<u32> = (0..16).map(|i| (i * 7 % 11) as u32).collect();
        let targets: Vec<i64> = ids.iter().map(|&i| ((i + 3) % 11) as i64).collect();
        let grads = |ckpt: bool| {
            let m = Gpt::new(
                GptConfig {
                    checkpoint_blocks: ckpt,
                    dropout: 0.1,
                    ..tiny()
                },
                2,
            )
            .unwrap();
            m.loss(&ids, &targets, 2, 8, Some(5))
                .unwrap()
                .backward()
                .unwrap();
            m.params.grads_to_vec()
        };
        assert_eq!(grads(false), grads(true));
    }

    #[test]
    fn untied_head_has_its_own_parameter_and_gradient() {
        let m = Gpt::new(
            GptConfig {
                tie_embeddings: false,
                ..tiny()
            },
            4,
        )
        .unwrap();
        let head = m.params.by_name("lm_head.weight").unwrap().clone();
        assert_eq!(head.shape(), &[11, 8]);
        let ids: Vec<u32> = (0..8).collect();
        let targets: Vec<i64> = (1..9).collect();
        m.loss(&ids, &targets, 1, 8, None)
            .unwrap()
            .backward()
            .unwrap();
        assert!(head.grad().unwrap().to_vec_f32().iter().any(|&g| g != 0.0));
        let c = tiny();
        assert_eq!(
            m.params.numel(),
            c.vocab_size * c.n_embd
                + c.block_size * c.n_embd
                + GptConfig {
                    tie_embeddings: false,
                    ..tiny()
                }
                .non_embedding_params()
        );
    }

    #[test]
    fn cached_generation_matches_full_forward() {
        let m = Gpt::new(tiny(), 3).unwrap();
        let ids: Vec<u32> = vec![3, 1, 4, 1, 5, 9, 2, 6];
        let full = m.forward(&ids, 1, 8, None).unwrap().to_vec_f32();
        let mut cache = KvCache::new();
        // A prompt of three, then one position at a time.
        let mut got = m
            .forward_cached(&ids[..3], &mut cache)
            .unwrap()
            .to_vec_f32();
        for &t in &ids[3..] {
            got.extend(m.forward_cached(&[t], &mut cache).unwrap().to_vec_f32());
        }
        assert_eq!(cache.len(), 8);
        assert_eq!(got.len(), full.len());
        let err = anneal_tensor::testing::rel_err_inf(&got, &full);
        assert!(err < 1e-5, "relative error {err}");
        assert!(
            m.forward_cached(&[1], &mut cache).is_err(),
            "past block_size"
        );
    }

    #[test]
    fn rejects_out_of_range_tokens_and_long_sequences() {
        let m = Gpt::new(tiny(), 0).unwrap();
        assert!(m.forward(&[11], 1, 1, None).is_err());
        assert!(m.forward(&[0; 9], 1, 9, None).is_err());
    }
}
