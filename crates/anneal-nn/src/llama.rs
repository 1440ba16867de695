//! Llama (Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models"), the
//! decoder of Hugging Face's `LlamaForCausalLM` with its parameter names, composed of the layers
//! in [`crate::layers`]:
//!
//! ```text
//! x = embed_tokens[ids]
//! for each layer:  x = x + o_proj(attention(rope(q_proj(h)), rope(k_proj(h)), v_proj(h)))
//!                        where h = RMSNorm(x)          (causal, grouped key/value heads)
//!                  x = x + down_proj(silu(gate_proj(h)) · up_proj(h))   where h = RMSNorm(x)
//! logits = RMSNorm(x) · embed_tokensᵀ     (tied head; or lm_head.weightᵀ when untied)
//! ```
//!
//! RoPE is the "rotate half" form of Hugging Face's checkpoints (element i pairs with i + D/2);
//! loaders of files that store Q and K for the interleaved form (GGUF) un-permute their rows.

use crate::layers::{
    Block, BlockConfig, Builder, Embedding, KvCache, LmHead, LoraConfig, PackedWeights,
    ParallelContext, RmsNorm, Weights,
};
use anneal_tensor::quant::QuantMatrix;
use anneal_tensor::{
    checkpoint, CrossEntropyOptions, DType, DropoutKey, Error, ParamId, ParamStore, Result, Tensor,
};
use std::sync::Arc;

/// Hyper-parameters of a Llama model (the keys of a Hugging Face `config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `hidden_size`: width of the residual stream.
    pub hidden_size: usize,
    /// `intermediate_size`: hidden width of the gated MLP.
    pub intermediate_size: usize,
    /// `num_hidden_layers`.
    pub num_layers: usize,
    /// `num_attention_heads`.
    pub num_heads: usize,
    /// `num_key_value_heads` (grouped-query attention when fewer than the heads).
    pub num_kv_heads: usize,
    /// `max_position_embeddings`: the longest context.
    pub max_positions: usize,
    /// `rope_theta`: the rotary base.
    pub rope_theta: f32,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f32,
    /// `tie_word_embeddings`: the head shares the token embedding.
    pub tie_embeddings: bool,
    /// Dropout on residual branches while training (Llama checkpoints: none).
    pub dropout: f32,
    /// Storage dtype of parameters and activations.
    pub dtype: DType,
    /// Recompute each block in backward instead of keeping its activations.
    pub checkpoint_blocks: bool,
}

impl LlamaConfig {
    /// SmolLM2-135M's shape: 30 layers, width 576, 9 heads over 3 key/value heads, MLP 1,536,
    /// 49,152 tokens, θ = 100,000, tied embeddings.
    pub fn smollm2_135m() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            max_positions: 8192,
            rope_theta: 100_000.0,
            rms_norm_eps: 1e-5,
            tie_embeddings: true,
            dropout: 0.0,
            dtype: DType::F32,
            checkpoint_blocks: false,
        }
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads.max(1)
    }

    /// Fails, naming the key, unless every size is positive and the heads divide evenly.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| {
            Err(Error::Invalid {
                op: "LlamaConfig",
                reason,
            })
        };
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("max_position_embeddings", self.max_positions),
        ] {
            if v == 0 {
                return bad(format!("{key} must be at least 1"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) || !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "num_attention_heads = {} must divide hidden_size = {} into heads of even width \
                 (RoPE rotates pairs)",
                self.num_heads, self.hidden_size
            ));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_key_value_heads = {} must divide num_attention_heads = {}",
                self.num_kv_heads, self.num_heads
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return bad(format!("rope_theta = {} must be above 1", self.rope_theta));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(format!(
                "rms_norm_eps = {} must be positive",
                self.rms_norm_eps
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout = {} must be in [0, 1)", self.dropout));
        }
        Ok(())
    }

    /// The shape of every parameter under its Hugging Face name, in declaration order.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let kv = self.num_kv_heads * self.head_dim();
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, d])];
        for i in 0..self.num_layers {
            let p = |n: &str| format!("model.layers.{i}.{n}");
            out.extend([
                (p("input_layernorm.weight"), vec![d]),
                (p("post_attention_layernorm.weight"), vec![d]),
                (p("self_attn.q_proj.weight"), vec![d, d]),
                (p("self_attn.k_proj.weight"), vec![kv, d]),
                (p("self_attn.v_proj.weight"), vec![kv, d]),
                (p("self_attn.o_proj.weight"), vec![d, d]),
                (p("mlp.gate_proj.weight"), vec![f, d]),
                (p("mlp.up_proj.weight"), vec![f, d]),
                (p("mlp.down_proj.weight"), vec![d, f]),
            ]);
        }
        out.push(("model.norm.weight".to_string(), vec![d]));
        if !self.tie_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, d]));
        }
        out
    }

    /// Every parameter, or `None` where the count overflows.
    pub fn total_params(&self) -> Option<usize> {
        self.shapes().iter().try_fold(0usize, |acc, (_, s)| {
            acc.checked_add(s.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?)
        })
    }
}

/// A Llama model and its parameters.
pub struct Llama {
    /// Its hyper-parameters.
    pub config: LlamaConfig,
    /// Its parameters, flat, under Hugging Face names.
    pub params: ParamStore,
    parallel: Arc<dyn ParallelContext>,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    head: LmHead,
    packed: Option<Arc<PackedWeights>>,
}

impl Llama {
    /// A freshly initialised model on one device: weights Normal(0, 0.02), norms one.
    pub fn new(config: LlamaConfig, seed: u64) -> Result<Llama> {
        Llama::build(config, Builder::new(seed))
    }

    /// A model whose `lora` targets carry low-rank adapters (Hu et al. 2021).
    pub fn with_lora(config: LlamaConfig, seed: u64, lora: LoraConfig) -> Result<Llama> {
        Llama::build(config, Builder::new(seed).with_lora(lora)?)
    }

    /// A model whose base weights are zeros, to be overwritten by loaded ones (adapters, if
    /// `lora` asks for them, are initialised as [`Llama::with_lora`] does).
    pub fn for_loading(config: LlamaConfig, lora: Option<LoraConfig>) -> Result<Llama> {
        let b = Builder::new(0).for_loading();
        match lora {
            Some(l) => Llama::build(config, b.with_lora(l)?),
            None => Llama::build(config, b),
        }
    }

    /// A freshly initialised model whose layers are split as `parallel` says.
    pub fn new_in(
        config: LlamaConfig,
        seed: u64,
        parallel: Arc<dyn ParallelContext>,
    ) -> Result<Llama> {
        Llama::build(config, Builder::with_parallel(seed, parallel))
    }

    /// [`Llama::with_lora`] with its layers (and their adapters) split as `parallel` says.
    pub fn with_lora_in(
        config: LlamaConfig,
        seed: u64,
        parallel: Arc<dyn ParallelContext>,
        lora: LoraConfig,
    ) -> Result<Llama> {
        Llama::build(
            config,
            Builder::with_parallel(seed, parallel).with_lora(lora)?,
        )
    }

    fn build(config: LlamaConfig, mut b: Builder) -> Result<Llama> {
        config.validate()?;
        let c = &config;
        let embed = Embedding::new(
            &mut b,
            "model.embed_tokens",
            c.vocab_size,
            c.hidden_size,
            0.02,
        )?;
        let block = BlockConfig::llama(
            c.hidden_size,
            c.num_heads,
            c.num_kv_heads,
            c.intermediate_size,
            c.rope_theta,
            c.rms_norm_eps,
        );
        let blocks = (0..c.num_layers)
            .map(|i| Block::new(&mut b, &format!("model.layers.{i}"), &block))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(&mut b, "model.norm", c.hidden_size, c.rms_norm_eps)?;
        let head = if c.tie_embeddings {
            LmHead::tied(&embed)
        } else {
            LmHead::untied(&mut b, "lm_head", c.hidden_size, c.vocab_size, 0.02)?
        };
        b.check_lora_targets()?;
        let (params, parallel) = b.build(c.dtype);
        Ok(Llama {
            config,
            params,
            parallel,
            embed,
            blocks,
            norm,
            head,
            packed: None,
        })
    }

    /// The parameters as layers look them up at forward time.
    pub fn weights(&self) -> Weights {
        Weights::new(&self.params, self.parallel.clone()).with_packed(self.packed.clone())
    }

    /// Keeps quantised copies of weight matrices (by parameter name) for inference: products
    /// over a few rows without gradient (generating) read them instead of the f32 weights.
    /// For a model that is not trained afterwards: the copies do not follow updates. Each
    /// matrix must have its parameter's `[out, in]` shape.
    pub fn set_packed(&mut self, packed: Vec<(String, QuantMatrix)>) -> Result<()> {
        let mut map = PackedWeights::new();
        for (name, q) in packed {
            let id = self.params.id(&name)?;
            let shape = &self.params.infos()[id.0].shape;
            if shape.as_slice() != [q.rows(), q.cols()] {
                return Err(Error::Invalid {
                    op: "Llama::set_packed",
                    reason: format!(
                        "{name} is {shape:?}; the packed matrix is [{}, {}]",
                        q.rows(),
                        q.cols()
                    ),
                });
            }
            map.insert(id, q);
        }
        self.packed = (!map.is_empty()).then(|| Arc::new(map));
        Ok(())
    }

    /// Bytes of the packed copies.
    pub fn packed_bytes(&self) -> usize {
        self.packed
            .as_ref()
            .map_or(0, |p| p.values().map(QuantMatrix::bytes).sum())
    }

    /// The blocks' parameter ids, block by block (for freezing the lower ones).
    pub fn block_params(&self) -> Vec<Vec<ParamId>> {
        self.blocks.iter().map(Block::params).collect()
    }

    /// Merges every adapter into its weight (`true`) or takes it back out (`false`).
    pub fn set_lora_merged(&self, merge: bool) -> Result<()> {
        for block in &self.blocks {
            block.set_lora_merged(&self.params, merge)?;
        }
        Ok(())
    }

    fn check_positions(&self, op: &'static str, start: usize, n: usize) -> Result<()> {
        if n == 0 || start + n > self.config.max_positions {
            return Err(Error::Invalid {
                op,
                reason: format!(
                    "{n} positions after {start} must be at least one and fit in \
                     max_position_embeddings {}",
                    self.config.max_positions
                ),
            });
        }
        Ok(())
    }

    /// Final norm and output head: `[…, d]` → logits `[rows, vocab]`.
    fn head(&self, w: &Weights, x: &Tensor, rows: usize) -> Result<Tensor> {
        let x = self
            .norm
            .forward(w, x)?
            .reshape(&[rows, self.config.hidden_size])?;
        self.head.forward(w, &x)
    }

    /// Last hidden states `[B, T, d]` (before the final norm) of token ids `[B, T]`.
    pub fn hidden(
        &self,
        ids: &[u32],
        batch: usize,
        seq: usize,
        dropout: Option<DropoutKey>,
    ) -> Result<Tensor> {
        self.hidden_in(self.weights().with_dropout(dropout), ids, batch, seq)
    }

    /// Hidden states `[B, T, d]` after the final norm (what the output head reads; a reward or
    /// value head reads them too).
    pub fn normed_hidden(
        &self,
        ids: &[u32],
        batch: usize,
        seq: usize,
        dropout: Option<DropoutKey>,
    ) -> Result<Tensor> {
        let w = self.weights().with_dropout(dropout);
        let x = self.hidden_in(w.clone(), ids, batch, seq)?;
        self.norm.forward(&w, &x)
    }

    /// Logits `[B·T, vocab]` and the hidden states after the final norm `[B, T, d]` of one
    /// forward: what a policy samples from and what its value head reads.
    pub fn forward_with_hidden(
        &self,
        ids: &[u32],
        batch: usize,
        seq: usize,
        dropout: Option<DropoutKey>,
    ) -> Result<(Tensor, Tensor)> {
        let w = self.weights().with_dropout(dropout);
        let x = self.hidden_in(w.clone(), ids, batch, seq)?;
        let normed = self.norm.forward(&w, &x)?;
        let flat = normed.reshape(&[batch * seq, self.config.hidden_size])?;
        Ok((self.head.forward(&w, &flat)?, normed))
    }

    /// Logits `[B·T, vocab]` of the base model, every LoRA adapter switched off and no dropout:
    /// the reference model of alignment methods, read from the policy's own frozen weights.
    pub fn forward_base(&self, ids: &[u32], batch: usize, seq: usize) -> Result<Tensor> {
        let w = self.weights().without_adapters();
        let x = self.hidden_in(w.clone(), ids, batch, seq)?;
        self.head(&w, &x, batch * seq)
    }

    fn hidden_in(&self, w: Weights, ids: &[u32], batch: usize, seq: usize) -> Result<Tensor> {
        let op = "Llama::forward";
        self.check_positions(op, 0, seq)?;
        let c = &self.config;
        let p_drop = c.dropout;
        let dropout = w.dropout_key();
        let mut x = self.embed.forward(&w, ids, &[batch, seq], op)?;
        for (index, block) in self.blocks.iter().enumerate() {
            let key = dropout.map(|key| crate::layers::layer_key(key, index));
            x = if c.checkpoint_blocks {
                let (block, w) = (block.clone(), w.clone());
                checkpoint(&[x], move |t| Ok(block.forward(&w, &t[0], p_drop, key)?.0))?
            } else {
                block.forward(&w, &x, p_drop, key)?.0
            };
        }
        Ok(x)
    }

    /// Logits `[B·T, vocab]` for token ids `[B, T]` (row-major); `dropout` as [`crate::Gpt`]'s.
    pub fn forward(
        &self,
        ids: &[u32],
        batch: usize,
        seq: usize,
        dropout: Option<DropoutKey>,
    ) -> Result<Tensor> {
        let x = self.hidden(ids, batch, seq, dropout)?;
        self.head(&self.weights(), &x, batch * seq)
    }

    /// Logits `[n, vocab]` of `ids` (one sequence) following the positions held in `cache`,
    /// which grows by `n`. Runs without recording gradients.
    pub fn forward_cached(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let (start, n) = (cache.len(), ids.len());
        self.check_positions("Llama::forward_cached", start, n)?;
        let w = self.weights();
        anneal_tensor::no_grad(|| {
            let mut x = self
                .embed
                .forward(&w, ids, &[1, n], "Llama::forward_cached")?;
            for (i, block) in self.blocks.iter().enumerate() {
                let (y, kv) = block.forward_cached(&w, &x, cache.layer(i), start)?;
                cache.set_layer(i, kv);
                x = y;
            }
            cache.advance(n);
            self.head(&w, &x, n)
        })
    }

    /// Logits `[B, vocab]` of each row's last position, for a batch `ids` `[B, n]` (row-major)
    /// following the positions in `cache` (which grows by `n`): row b's first position is
    /// `starts[b]` (negative under left padding, so that its first real token is position 0)
    /// and `key_padding_mask` (`[B, S]` over every position so far, `true` for real tokens)
    /// keeps attention off the padding. Only the last positions pass through the output head.
    pub fn forward_rows_cached(
        &self,
        ids: &[u32],
        batch: usize,
        cache: &mut KvCache,
        starts: &[isize],
        key_padding_mask: Option<Vec<bool>>,
    ) -> Result<Tensor> {
        let op = "Llama::forward_rows_cached";
        let n = ids.len() / batch.max(1);
        self.check_positions(op, cache.len(), n)?;
        let w = self.weights();
        anneal_tensor::no_grad(|| {
            let mut x = self.embed.forward(&w, ids, &[batch, n], op)?;
            for (i, block) in self.blocks.iter().enumerate() {
                let (y, kv) = block.forward_cached_rows(
                    &w,
                    &x,
                    cache.layer(i),
                    starts,
                    key_padding_mask.clone(),
                )?;
                cache.set_layer(i, kv);
                x = y;
            }
            cache.advance(n);
            let last = x.narrow(1, n - 1, 1)?.contiguous();
            self.head(&w, &last, batch)
        })
    }

    /// Mean next-token cross-entropy of `[B, T]` inputs against `[B, T]` targets (−100 is
    /// ignored, as in Hugging Face's loss).
    pub fn loss(
        &self,
        ids: &[u32],
        targets: &[i64],
        batch: usize,
        seq: usize,
        dropout: Option<DropoutKey>,
    ) -> Result<Tensor> {
        let logits = self.forward(ids, batch, seq, dropout)?;
        self.weights()
            .parallel()
            .cross_entropy(&logits, targets, CrossEntropyOptions::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn tiny() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 13,
            hidden_size: 16,
            intermediate_size: 24,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            max_positions: 32,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-6,
            tie_embeddings: true,
            dropout: 0.0,
            dtype: DType::F32,
            checkpoint_blocks: false,
        }
    }

    #[test]
    fn names_shapes_and_counts_match_the_config() {
        for tie in [true, false] {
            let c = LlamaConfig {
                tie_embeddings: tie,
                ..tiny()
            };
            let m = Llama::new(c.clone(), 0).unwrap();
            let infos = m.params.infos();
            let held: Vec<(String, Vec<usize>)> = infos
                .iter()
                .map(|p| (p.name.clone(), p.shape.clone()))
                .collect();
            let mut want = c.shapes();
            let mut held_sorted = held.clone();
            want.sort();
            held_sorted.sort();
            assert_eq!(held_sorted, want);
            let n: usize = infos
                .iter()
                .map(|p| p.shape.iter().product::<usize>())
                .sum();
            assert_eq!(Some(n), c.total_params());
        }
        let smol = LlamaConfig::smollm2_135m();
        assert_eq!(smol.total_params(), Some(134_515_008));
    }

    #[test]
    fn cached_steps_equal_the_full_forward() {
        let m = Llama::new(tiny(), 3).unwrap();
        let ids = [1u32, 5, 7, 2, 11, 0, 4];
        let full = m.forward(&ids, 1, ids.len(), None).unwrap().to_vec_f32();
        let mut cache = KvCache::new();
        let mut stepped = m
            .forward_cached(&ids[..3], &mut cache)
            .unwrap()
            .to_vec_f32();
        for &t in &ids[3..] {
            stepped.extend(m.forward_cached(&[t], &mut cache).unwrap().to_vec_f32());
        }
        assert_eq!(full.len(), stepped.len());
        for (a, b) in full.iter().zip(&stepped) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn adapters_switched_off_compute_the_base_model() {
        use crate::layers::LoraConfig;
        let lora = LoraConfig {
            rank: 2,
            alpha: 4.0,
            targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
            dropout: 0.0,
        };
        let m = Llama::with_lora(tiny(), 3, lora).unwrap();
        let set_b = |scale: f32| {
            for (name, t) in m.params.named() {
                if name.ends_with("lora_B.weight") {
                    let v = (0..t.numel())
                        .map(|i| ((i % 7) as f32 - 3.0) * scale)
                        .collect();
                    let id = m.params.id(&name).unwrap();
                    m.params
                        .set(id, &Tensor::from_f32(v, t.shape()).unwrap())
                        .unwrap();
                }
            }
        };
        let ids = [1u32, 5, 9, 2, 11, 7];
        // With B at zero the adapters add nothing: that is the base model.
        set_b(0.0);
        let base = m.forward(&ids, 1, 6, None).unwrap().to_vec_f32();
        set_b(0.05);
        let adapted = m.forward(&ids, 1, 6, None).unwrap().to_vec_f32();
        // Within rounding: without an adapter the layers take their fused products.
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
        let off = m.forward_base(&ids, 1, 6).unwrap().to_vec_f32();
        assert!(same(&off, &base), "adapters off is the base model");
        assert!(adapted.iter().zip(&base).any(|(a, b)| (a - b).abs() > 1e-3));
        // Merged adapters live in the weights: switching them off is refused, not ignored.
        m.set_lora_merged(true).unwrap();
        let err = m.forward_base(&ids, 1, 6).unwrap_err().to_string();
        assert!(err.contains("merged"), "{err}");
        m.set_lora_merged(false).unwrap();
        assert!(same(
            &m.forward_base(&ids, 1, 6).unwrap().to_vec_f32(),
            &base
        ));
    }

    #[test]
    fn bad_shapes_are_refused_by_key() {
        let e = |c: LlamaConfig| Llama::new(c, 0).err().unwrap().to_string();
        assert!(e(LlamaConfig {
            num_kv_heads: 3,
            ..tiny()
        })
        .contains("num_key_value_heads"));
        assert!(e(LlamaConfig {
            num_heads: 5,
            ..tiny()
        })
        .contains("num_attention_heads"));
        assert!(e(LlamaConfig {
            vocab_size: 0,
            ..tiny()
        })
        .contains("vocab_size"));
        let m = Llama::new(tiny(), 0).unwrap();
        assert!(m.forward(&[1; 33], 1, 33, None).is_err());
        assert!(m.forward(&[13], 1, 1, None).is_err());
    }
}
