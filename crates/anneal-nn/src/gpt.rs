//! GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"), the
//! architecture of nanoGPT's `model.py` and Hugging Face's `GPT2LMHeadModel`, with the same
//! parameter names and layouts (`Conv1D` weights stored `[in, out]`), composed of the layers in
//! [`crate::layers`]:
//!
//! ```text
//! x = wte[ids] + wpe[0..T]
//! for each block:  x = x + proj(attention(ln_1(x)))        (causal, fused)
//!                  x = x + mlp_proj(gelu(fc(ln_2(x))))
//! logits = ln_f(x) · wteᵀ            (tied head; or lm_head.weightᵀ when untied)
//! ```

use crate::layers::{
    Block, BlockConfig, Builder, Embedding, FeedForward, KvCache, LayerNorm, LmHead, MoeAux,
    MoeConfig, ParallelContext, SingleDevice, Weights,
};
use anneal_tensor::{
    checkpoint, CrossEntropyOptions, DType, DropoutKey, ParamId, ParamStore, Result, Tensor,
};
use std::collections::HashMap;
use std::sync::Arc;

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
    /// Recompute each block in backward instead of keeping its activations (recomputation
    /// policy "full").
    pub checkpoint_blocks: bool,
    /// Keep each block's attention probabilities for backward instead of recomputing them
    /// from the log-sum-exp (recomputation policy "none"; by default only the attention scores
    /// are recomputed, FlashAttention's and Korthikanti et al.'s "selective" recomputation).
    pub save_attention_probs: bool,
    /// Mixture-of-Experts blocks in place of some dense ones.
    pub moe: Option<GptMoe>,
}

/// The Mixture-of-Experts blocks of a GPT.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GptMoe {
    /// How each MoE layer routes.
    pub layer: MoeConfig,
    /// Every `every`-th block is MoE: blocks `every − 1`, `2·every − 1`, … (1: all of them; 2:
    /// every other one, as GShard and Switch Transformers alternate).
    pub every: usize,
    /// Hidden width of each expert (a dense GPT-2 block's is 4·n_embd).
    pub d_ff: usize,
}

impl GptMoe {
    /// Whether block `index` is a Mixture of Experts.
    pub fn is_moe_block(&self, index: usize) -> bool {
        self.every > 0 && (index + 1).is_multiple_of(self.every)
    }
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
            save_attention_probs: false,
            moe: None,
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

    /// Checks the shape before anything is allocated; the error names the key, its value and
    /// what is allowed. [`Gpt::new`] calls it, so a configuration read from a file (a checkpoint's,
    /// a Hugging Face `config.json`) passes the same checks as a run configuration.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, value: String, allowed: String| {
            Err(anneal_tensor::Error::Invalid {
                op: "GptConfig",
                reason: format!("{key} = {value} is not allowed: {allowed}"),
            })
        };
        for (key, value) in [
            ("vocab_size", self.vocab_size),
            ("block_size", self.block_size),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
        ] {
            if value == 0 {
                return bad(key, value.to_string(), "at least 1".into());
            }
        }
        if self.n_embd == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            let allowed = format!("a positive multiple of n_head ({})", self.n_head);
            return bad("n_embd", self.n_embd.to_string(), allowed);
        }
        if !(0.0..1.0).contains(&self.dropout) {
            let allowed = "a probability in [0, 1)".into();
            return bad("dropout", self.dropout.to_string(), allowed);
        }
        if let Some(moe) = &self.moe {
            moe.layer.validate("moe")?;
            if moe.every == 0 || moe.every > self.n_layer {
                let allowed = format!("between 1 and n_layer ({})", self.n_layer);
                return bad("moe.every", moe.every.to_string(), allowed);
            }
            if moe.d_ff == 0 {
                return bad("moe.d_ff", "0".into(), "at least 1".into());
            }
        }
        Ok(())
    }

    /// The blocks that are Mixtures of Experts.
    pub fn moe_blocks(&self) -> Vec<usize> {
        match &self.moe {
            Some(moe) => (0..self.n_layer).filter(|&i| moe.is_moe_block(i)).collect(),
            None => Vec::new(),
        }
    }

    /// Parameters outside the embeddings: 12·d² + 13·d per block (with biases) plus the final
    /// LayerNorm, and the head when it is not tied (Kaplan et al. 2020 count N this way).
    pub fn non_embedding_params(&self) -> usize {
        self.checked_non_embedding_params().unwrap_or(usize::MAX)
    }

    /// The non-embedding parameters one token computes with: a Mixture-of-Experts block counts
    /// its router and `top_k` experts (equal to [`GptConfig::non_embedding_params`] for a dense
    /// model).
    pub fn active_non_embedding_params(&self) -> usize {
        self.counted_non_embedding_params(true)
            .unwrap_or(usize::MAX)
    }

    /// [`GptConfig::non_embedding_params`], or `None` where the count overflows.
    fn checked_non_embedding_params(&self) -> Option<usize> {
        self.counted_non_embedding_params(false)
    }

    /// Parameters outside the embeddings, each MoE block counting all its experts or (`active`)
    /// the `top_k` a token uses; `None` where the count overflows.
    fn counted_non_embedding_params(&self, active: bool) -> Option<usize> {
        let (d, v) = (self.n_embd, self.vocab_size);
        let b = usize::from(self.bias);
        // Attention 4·d² + 4·b·d, two norms 2·d + 2·b·d, dense MLP 8·d² + 5·b·d.
        let dense_block = d
            .checked_mul(d)?
            .checked_mul(12)?
            .checked_add(d.checked_mul(b * (3 + 1 + 4 + 1) + 2 + 2 * b)?)?;
        let dense_mlp = d.checked_mul(d)?.checked_mul(8)?.checked_add(5 * b * d)?;
        let moe_blocks = self.moe_blocks().len();
        let moe_block = match &self.moe {
            Some(moe) => {
                let h = moe.d_ff;
                let expert = d
                    .checked_mul(h)?
                    .checked_mul(2)?
                    .checked_add(b.checked_mul(h.checked_add(d)?)?)?;
                let experts = if active {
                    moe.layer.top_k
                } else {
                    moe.layer.experts
                };
                (dense_block - dense_mlp)
                    .checked_add(d.checked_mul(moe.layer.experts)?)?
                    .checked_add(experts.checked_mul(expert)?)?
            }
            None => 0,
        };
        let head = if self.tie_embeddings {
            0
        } else {
            v.checked_mul(d)?
        };
        (self.n_layer - moe_blocks)
            .checked_mul(dense_block)?
            .checked_add(moe_blocks.checked_mul(moe_block)?)?
            .checked_add(d.checked_mul(1 + b)?)?
            .checked_add(head)
    }

    /// Every parameter, embeddings and head included, or `None` where the count overflows.
    pub fn total_params(&self) -> Option<usize> {
        let d = self.n_embd;
        self.checked_non_embedding_params()?
            .checked_add(self.vocab_size.checked_mul(d)?)?
            .checked_add(self.block_size.checked_mul(d)?)
    }

    /// Checks this configuration against weights read from a file, before a model is built from
    /// it: the embeddings' shapes, the number of blocks and the number of elements must all
    /// match, so a configuration that claims more than the file holds (a `config.json` or
    /// `trainer_state.json` with a huge `n_embd`, say) is refused before anything of its size
    /// is allocated.
    pub fn check_weights(&self, weights: &HashMap<String, Tensor>) -> Result<()> {
        self.validate()?;
        let bad = |reason: String| {
            Err(anneal_tensor::Error::Invalid {
                op: "GptConfig",
                reason,
            })
        };
        for (name, want) in [
            ("transformer.wte.weight", [self.vocab_size, self.n_embd]),
            ("transformer.wpe.weight", [self.block_size, self.n_embd]),
        ] {
            match weights.get(name) {
                Some(t) if t.shape() == want => {}
                Some(t) => {
                    return bad(format!(
                        "the configuration gives {name} the shape {want:?}; the weights hold {:?}",
                        t.shape()
                    ))
                }
                None => return bad(format!("the weights lack {name}")),
            }
        }
        let blocks = (0..weights.len())
            .take_while(|i| weights.contains_key(&format!("transformer.h.{i}.ln_1.weight")))
            .count();
        if blocks != self.n_layer {
            return bad(format!(
                "n_layer = {} but the weights hold {blocks} blocks",
                self.n_layer
            ));
        }
        let held: usize = weights.values().map(|t| t.numel()).sum();
        match self.total_params() {
            Some(n) if n == held => Ok(()),
            n => bad(format!(
                "the configuration has {} parameters; the weights hold {held}",
                n.map_or("more than 2^64".to_string(), |n| n.to_string())
            )),
        }
    }

    /// Training FLOPs per token: 6·N + 12·L·T·d (Kaplan et al. 2020; the attention term as in
    /// PaLM's MFU accounting, Chowdhery et al. 2022).
    /// A Mixture-of-Experts block counts the parameters a token computes with (router and
    /// `top_k` experts).
    pub fn flops_per_token(&self, seq_len: usize) -> f64 {
        6.0 * self.active_non_embedding_params() as f64
            + 12.0 * (self.n_layer * seq_len * self.n_embd) as f64
    }
}

/// Where [`Gpt::forward_part`] starts.
pub enum PartInput<'a> {
    /// Token ids `[batch, seq]` (row-major), for a range that starts with the embedding.
    Tokens {
        /// The ids.
        ids: &'a [u32],
        /// Sequences.
        batch: usize,
        /// Their length.
        seq: usize,
    },
    /// Hidden states from the layer before the range: `[B, T, d]`, or under sequence parallelism
    /// this rank's rows of `[B·T, d]`.
    Hidden {
        /// The hidden states.
        x: Tensor,
        /// Sequences.
        batch: usize,
        /// Their length.
        seq: usize,
    },
}

/// The error of a part of the layers given the wrong input: the first layer takes token ids, the
/// others hidden states.
fn wrong_input(start: usize) -> anneal_tensor::Error {
    let wants = if start == 0 {
        "token ids"
    } else {
        "hidden states"
    };
    anneal_tensor::Error::Invalid {
        op: "Gpt::forward_part",
        reason: format!("layers from {start} take {wants}"),
    }
}

/// One of a GPT's layers in forward order, as a pipeline cuts them into stages.
pub enum GptLayer<'a> {
    /// Token and position embeddings.
    Embedding {
        /// Token embedding.
        wte: &'a Embedding,
        /// Learned positions.
        wpe: &'a Embedding,
    },
    /// Transformer block `index`.
    Block {
        /// Its place in the stack.
        index: usize,
        /// The block.
        block: &'a Block,
    },
    /// Final norm and output head.
    Head {
        /// Final LayerNorm.
        ln_f: &'a LayerNorm,
        /// Output head.
        head: &'a LmHead,
    },
}

impl GptLayer<'_> {
    /// Parameter ids the layer owns (a tied head owns none: the embedding does).
    pub fn params(&self) -> Vec<ParamId> {
        match self {
            GptLayer::Embedding { wte, wpe } => vec![wte.weight(), wpe.weight()],
            GptLayer::Block { block, .. } => block.params(),
            GptLayer::Head { ln_f, head } => [ln_f.params(), head.params()].concat(),
        }
    }
}

/// A GPT-2 model and its parameters.
pub struct Gpt {
    /// Its hyper-parameters.
    pub config: GptConfig,
    /// Its parameters, flat, under Hugging Face names.
    pub params: ParamStore,
    parallel: Arc<dyn ParallelContext>,
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    head: LmHead,
}

impl Gpt {
    /// A freshly initialised model on one device: weights Normal(0, 0.02), residual projections
    /// scaled by 1/√(2·n_layer) (GPT-2 paper §2.3), biases zero, LayerNorm weights one.
    pub fn new(config: GptConfig, seed: u64) -> Result<Gpt> {
        Gpt::new_in(config, seed, Arc::new(SingleDevice))
    }

    /// A freshly initialised model whose layers are split as `parallel` says.
    pub fn new_in(config: GptConfig, seed: u64, parallel: Arc<dyn ParallelContext>) -> Result<Gpt> {
        config.validate()?;
        let c = &config;
        // Sized for the whole model where this rank holds it whole (a split one declares less
        // and grows its buffer as it goes).
        let elements = match parallel.splits_parameters() {
            false => c.total_params().unwrap_or(0),
            true => 0,
        };
        let mut b = Builder::with_parallel(seed, parallel).storing(c.dtype, elements);
        let wte =
            Embedding::vocab_parallel(&mut b, "transformer.wte", c.vocab_size, c.n_embd, 0.02)?;
        let wpe = Embedding::new(&mut b, "transformer.wpe", c.block_size, c.n_embd, 0.02)?;
        let mut block = BlockConfig::gpt2(c.n_embd, c.n_head, c.n_layer, c.bias);
        block.attention.save_probs = c.save_attention_probs;
        let blocks = (0..c.n_layer)
            .map(|i| {
                let config = match &c.moe {
                    Some(moe) if moe.is_moe_block(i) => BlockConfig {
                        moe: Some(moe.layer),
                        d_ff: moe.d_ff,
                        ..block
                    },
                    _ => block,
                };
                Block::new(&mut b, &format!("transformer.h.{i}"), &config)
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::new(&mut b, "transformer.ln_f", c.n_embd, c.bias, block.eps)?;
        let head = if c.tie_embeddings {
            LmHead::tied(&wte)
        } else {
            LmHead::untied(&mut b, "lm_head", c.n_embd, c.vocab_size, 0.02)?
        };
        let (params, parallel) = b.build(c.dtype);
        Ok(Gpt {
            config,
            params,
            parallel,
            wte,
            wpe,
            blocks,
            ln_f,
            head,
        })
    }

    /// The parallel context the layers were built in.
    pub fn parallel(&self) -> &Arc<dyn ParallelContext> {
        &self.parallel
    }

    /// The parameters as layers look them up at forward time.
    pub fn weights(&self) -> Weights {
        Weights::new(&self.params, self.parallel.clone())
    }

    /// The layers in forward order: embedding, blocks, head.
    pub fn layers(&self) -> Vec<GptLayer<'_>> {
        let mut out = vec![GptLayer::Embedding {
            wte: &self.wte,
            wpe: &self.wpe,
        }];
        out.extend(
            self.blocks
                .iter()
                .enumerate()
                .map(|(index, block)| GptLayer::Block { index, block }),
        );
        out.push(GptLayer::Head {
            ln_f: &self.ln_f,
            head: &self.head,
        });
        out
    }

    /// Token plus position embeddings `[B, T, d]` of `ids` `[B, T]` at positions
    /// `start..start + T`, after checking that they fit the context and the vocabulary.
    fn embed(&self, w: &Weights, ids: &[u32], shape: [usize; 2], start: usize) -> Result<Tensor> {
        let (op, t) = ("Gpt::forward", shape[1]);
        if t == 0 || start + t > self.config.block_size {
            return Err(anneal_tensor::Error::Invalid {
                op,
                reason: format!(
                    "{t} positions after {start} must be at least one and fit in block_size {}",
                    self.config.block_size
                ),
            });
        }
        let tok = self.wte.forward(w, ids, &shape, op)?;
        tok.add(&self.wpe.range(w, start, t)?)
    }

    /// Final LayerNorm and output head: `[…, d]` → logits `[rows, vocab]`.
    fn head(&self, w: &Weights, x: &Tensor, rows: usize) -> Result<Tensor> {
        let x = self
            .ln_f
            .forward(w, x)?
            .reshape(&[rows, self.config.n_embd])?;
        self.head.forward(w, &x)
    }

    /// Logits `[B·T, vocab]` for token ids `[B, T]` (row-major). `dropout` turns dropout on
    /// (training) with masks derived from its key (a seed, and where these B rows start in the
    /// whole batch, so any cut of a batch drops what the whole does); `None` is evaluation.
    pub fn forward(
        &self,
        ids: &[u32],
        batch: usize,
        seq: usize,
        dropout: Option<DropoutKey>,
    ) -> Result<Tensor> {
        Ok(self.forward_with_aux(ids, batch, seq, dropout)?.0)
    }

    /// [`Gpt::forward`], with what each Mixture-of-Experts block reports (its block index, its
    /// weighted balancing and z-losses, its expert load and dropped share).
    pub fn forward_with_aux(
        &self,
        ids: &[u32],
        batch: usize,
        seq: usize,
        dropout: Option<DropoutKey>,
    ) -> Result<(Tensor, Vec<(usize, MoeAux)>)> {
        let all = 0..self.config.n_layer + 2;
        self.forward_part(PartInput::Tokens { ids, batch, seq }, all, dropout)
    }

    /// The layers `layers` of [`Gpt::layers`] (0 the embedding, 1..=n_layer the blocks,
    /// n_layer + 1 the head) on `input`: token ids when the range starts with the embedding, else
    /// the hidden states `[B, T, d]` the layer before it gave. Returns hidden states, or the
    /// logits when the range ends with the head, and what the Mixture-of-Experts blocks among
    /// them reported. A pipeline stage runs its range of layers this way; the whole range is
    /// [`Gpt::forward_with_aux`].
    pub fn forward_part(
        &self,
        input: PartInput<'_>,
        layers: std::ops::Range<usize>,
        dropout: Option<DropoutKey>,
    ) -> Result<(Tensor, Vec<(usize, MoeAux)>)> {
        let c = &self.config;
        let head = c.n_layer + 1;
        let p_drop = c.dropout;
        let w = self.weights();
        let bad = |reason: String| anneal_tensor::Error::Invalid {
            op: "Gpt::forward_part",
            reason,
        };
        if layers.is_empty() || layers.end > head + 1 {
            return Err(bad(format!(
                "layers {layers:?} of a model of {} layers",
                head + 1
            )));
        }
        if w.parallel().sequence_parallel() {
            return self.forward_rows(&w, input, layers, dropout);
        }
        let mut x = match (input, layers.start) {
            (PartInput::Tokens { ids, batch, seq }, 0) => w.parallel().end_layer(
                &self
                    .embed(&w, ids, [batch, seq], 0)?
                    .dropout_at(dropout.map_or(0.0, |_| p_drop), dropout.unwrap_or_default())?,
            )?,
            (PartInput::Hidden { x, .. }, start) if start > 0 => x,
            (_, start) => return Err(wrong_input(start)),
        };
        let mut moe = Vec::new();
        let blocks = layers.start.max(1) - 1..layers.end.min(head) - 1;
        for (index, block) in self.blocks.iter().enumerate() {
            if !blocks.contains(&index) {
                continue;
            }
            let key = dropout.map(|key| crate::layers::layer_key(key, index));
            let (y, aux) = match (c.checkpoint_blocks, block.feed_forward()) {
                (false, _) => block.forward(&w, &x, p_drop, key)?,
                (true, FeedForward::Dense(_)) => {
                    let (block, w) = (block.clone(), w.clone());
                    let y =
                        checkpoint(&[x], move |t| Ok(block.forward(&w, &t[0], p_drop, key)?.0))?;
                    (y, None)
                }
                (true, FeedForward::Experts(_)) => {
                    checkpointed_moe_block(block, &w, x, p_drop, key)?
                }
            };
            x = w.parallel().end_layer(&y)?;
            if let Some(aux) = aux {
                moe.push((index, aux));
            }
        }
        if layers.end <= head {
            return Ok((x, moe));
        }
        let rows = x.shape()[..x.rank() - 1].iter().product();
        Ok((self.head(&w, &x, rows)?, moe))
    }

    /// The layers `layers` under sequence parallelism (Korthikanti et al. 2022): the residual
    /// stream (and a pipeline stage's input and output) is this rank's rows of the `[B·T, d]`
    /// activations, rows `r·B·T/tp ..` of its tensor-parallel
    /// rank r, from the vocabulary-parallel embedding's reduce-scatter to the final norm, whose
    /// output is gathered whole for the head. Dropout masks are the single-device ones: each
    /// row's key counts rows of the whole batch.
    fn forward_rows(
        &self,
        w: &Weights,
        input: PartInput<'_>,
        layers: std::ops::Range<usize>,
        dropout: Option<DropoutKey>,
    ) -> Result<(Tensor, Vec<(usize, MoeAux)>)> {
        let c = &self.config;
        let head = c.n_layer + 1;
        let (b, t) = match &input {
            PartInput::Tokens { batch, seq, .. } | PartInput::Hidden { batch, seq, .. } => {
                (*batch, *seq)
            }
        };
        let shape = [b, t];
        let (r, tp) = w.parallel().tensor_parallel();
        let n = b * t;
        if t == 0 || t > c.block_size || !n.is_multiple_of(tp) {
            return Err(anneal_tensor::Error::Invalid {
                op: "Gpt::forward",
                reason: format!(
                    "{b} × {t} tokens under sequence parallelism: at most block_size {} \
                     positions, and a multiple of the {tp} tensor-parallel ranks in all",
                    c.block_size
                ),
            });
        }
        let rows = n / tp;
        let first = r * rows;
        // This rank's rows' keys: the whole batch's, counted in rows of [B·T, d].
        let rows_key = |key: DropoutKey| DropoutKey {
            first_row: key.first_row * t as u64 + first as u64,
            ..key
        };
        let p_drop = c.dropout;
        let mut x = match (input, layers.start) {
            (PartInput::Tokens { ids, .. }, 0) => {
                let tok = self.wte.forward(w, ids, &shape, "Gpt::forward")?;
                let positions: Vec<u32> = (first..first + rows).map(|i| (i % t) as u32).collect();
                let pos = self.wpe.forward(w, &positions, &[rows], "Gpt::forward")?;
                tok.add(&pos)?.dropout_at(
                    dropout.map_or(0.0, |_| p_drop),
                    rows_key(dropout.unwrap_or_default()),
                )?
            }
            (PartInput::Hidden { x, .. }, start) if start > 0 => x,
            (_, start) => return Err(wrong_input(start)),
        };
        let blocks = layers.start.max(1) - 1..layers.end.min(head) - 1;
        for (index, block) in self.blocks.iter().enumerate() {
            if !blocks.contains(&index) {
                continue;
            }
            let key = dropout.map(|key| rows_key(crate::layers::layer_key(key, index)));
            x = if c.checkpoint_blocks {
                let (block, w) = (block.clone(), w.clone());
                checkpoint(&[x], move |v| {
                    block.forward_rows(&w, &v[0], shape, p_drop, key)
                })?
            } else {
                block.forward_rows(w, &x, shape, p_drop, key)?
            };
        }
        if layers.end <= head {
            return Ok((x, Vec::new()));
        }
        let x = w.parallel().gather_sequence(&self.ln_f.forward(w, &x)?)?;
        Ok((self.head.forward(w, &x)?, Vec::new()))
    }

    /// The layers of [`Gpt::layers`] that use parameter `name` (the tied token embedding is the
    /// embedding's and the head's): a pipeline stage holds the parameters of its layers.
    pub fn layers_of(config: &GptConfig, name: &str) -> Vec<usize> {
        let head = config.n_layer + 1;
        if name == "transformer.wte.weight" {
            return if config.tie_embeddings {
                vec![0, head]
            } else {
                vec![0]
            };
        }
        if name.starts_with("transformer.wpe.") {
            return vec![0];
        }
        if let Some(rest) = name.strip_prefix("transformer.h.") {
            if let Some(i) = rest.split('.').next().and_then(|i| i.parse::<usize>().ok()) {
                return vec![1 + i];
            }
        }
        vec![head]
    }

    /// Logits `[n, vocab]` of `ids` (one sequence) following the positions held in `cache`,
    /// which grows by `n`. Runs without recording gradients. Fails when the cache would exceed
    /// `block_size` (the caller then restarts from a shorter context).
    pub fn forward_cached(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let (start, n) = (cache.len(), ids.len());
        let w = self.weights();
        anneal_tensor::no_grad(|| {
            let mut x = self.embed(&w, ids, [1, n], start)?;
            for (i, block) in self.blocks.iter().enumerate() {
                let (y, kv) = block.forward_cached(&w, &x, cache.layer(i), start)?;
                cache.set_layer(i, kv);
                x = y;
            }
            cache.advance(n);
            self.head(&w, &x, n)
        })
    }

    /// Mean next-token cross-entropy of `[B, T]` inputs against `[B, T]` targets.
    pub fn loss(
        &self,
        ids: &[u32],
        targets: &[i64],
        batch: usize,
        seq: usize,
        dropout: Option<DropoutKey>,
    ) -> Result<Tensor> {
        let logits = self.forward(ids, batch, seq, dropout)?;
        self.parallel
            .cross_entropy(&logits, targets, CrossEntropyOptions::default())
    }
}

/// A Mixture-of-Experts block under activation checkpointing. The checkpointed segment returns
/// one tensor, so the block's output and its two losses travel packed in one (the losses cast to
/// the output's dtype), and the routing statistics of the first run are kept aside (the
/// recomputation repeats them exactly).
fn checkpointed_moe_block(
    block: &Block,
    w: &Weights,
    x: Tensor,
    p_drop: f32,
    key: Option<DropoutKey>,
) -> Result<(Tensor, Option<MoeAux>)> {
    let shape = x.shape().to_vec();
    let n = x.numel();
    // Packed in f32, so the losses keep their precision in a bf16 model (the block's output is
    // held in f32 between forward and backward: twice a bf16 output's bytes).
    let dtype = x.dtype();
    let stats = Arc::new(std::sync::Mutex::new(None));
    let (block, w, kept) = (block.clone(), w.clone(), stats.clone());
    let packed = checkpoint(&[x], move |t| {
        let (y, aux) = block.forward(&w, &t[0], p_drop, key)?;
        let aux = aux.ok_or_else(|| anneal_tensor::Error::Invalid {
            op: "Gpt::forward",
            reason: "a Mixture-of-Experts block reported nothing".into(),
        })?;
        let parts = [
            y.to_dtype(DType::F32).reshape(&[n])?,
            aux.balance.to_dtype(DType::F32).reshape(&[1])?,
            aux.z.to_dtype(DType::F32).reshape(&[1])?,
        ];
        if let Ok(mut kept) = kept.lock() {
            *kept = Some((aux.load, aux.dropped));
        }
        Tensor::concat(&parts.iter().collect::<Vec<_>>(), 0)
    })?;
    let (load, dropped) = stats
        .lock()
        .ok()
        .and_then(|mut s| s.take())
        .unwrap_or_default();
    let scalar = |i: usize| -> Result<Tensor> { packed.narrow(0, n + i, 1)?.reshape(&[]) };
    let aux = MoeAux {
        balance: scalar(0)?,
        z: scalar(1)?,
        load,
        dropped,
        probs: None,
    };
    let y = packed.narrow(0, 0, n)?.reshape(&shape)?.to_dtype(dtype);
    Ok((y, Some(aux)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use anneal_tensor::optim::{AdamW, AdamWConfig};
    use anneal_tensor::Optimizer;
    use anneal_tensor::ParamId;

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
        let mut opt = AdamW::new(&m.params, AdamWConfig::default());
        let first = m.loss(&ids, &targets, 2, 8, None).unwrap().item().unwrap();
        let mut last = first;
        for _ in 0..60 {
            m.params.zero_grad();
            let loss = m.loss(&ids, &targets, 2, 8, None).unwrap();
            loss.backward().unwrap();
            opt.step(&m.params, 1e-2);
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
            m.loss(&ids, &targets, 2, 8, Some(5.into()))
                .unwrap()
                .backward()
                .unwrap();
            m.params.grads_to_vec()
        };
        assert_eq!(grads(false), grads(true));
    }

    fn tiny_moe(experts: usize, top_k: usize, every: usize) -> GptConfig {
        GptConfig {
            moe: Some(GptMoe {
                layer: MoeConfig {
                    top_k,
                    capacity_factor: Some(1.0),
                    ..MoeConfig::switch(experts)
                },
                every,
                d_ff: 12,
            }),
            ..tiny()
        }
    }

    #[test]
    fn moe_parameter_counts_total_and_active() {
        let c = tiny_moe(4, 2, 2);
        assert_eq!(c.moe_blocks(), vec![1]);
        let m = Gpt::new(c.clone(), 0).unwrap();
        let embed = c.vocab_size * c.n_embd + c.block_size * c.n_embd;
        assert_eq!(m.params.numel(), embed + c.non_embedding_params());
        assert!(m
            .params
            .by_name("transformer.h.1.mlp.experts.c_fc.weight")
            .is_ok_and(|t| t.shape() == [4, 8, 12]));
        assert!(m.params.by_name("transformer.h.0.mlp.c_fc.weight").is_ok());
        // Active: the router and two of the four experts (each 2·8·12 + 12 + 8 parameters).
        let expert = 2 * 8 * 12 + 12 + 8;
        assert_eq!(
            c.non_embedding_params() - c.active_non_embedding_params(),
            2 * expert
        );
        let dense = tiny();
        assert_eq!(
            dense.non_embedding_params(),
            dense.active_non_embedding_params()
        );
    }

    #[test]
    fn moe_blocks_train_checkpointed_with_the_same_losses_and_gradients() {
        let ids: Vec<u32> = (0..16).map(|i| (i * 7 % 11) as u32).collect();
        let targets: Vec<i64> = ids.iter().map(|&i| ((i + 3) % 11) as i64).collect();
        let run = |ckpt: bool| {
            let m = Gpt::new(
                GptConfig {
                    checkpoint_blocks: ckpt,
                    dropout: 0.1,
                    ..tiny_moe(3, 2, 1)
                },
                2,
            )
            .unwrap();
            let (logits, moe) = m.forward_with_aux(&ids, 2, 8, Some(5.into())).unwrap();
            assert_eq!(moe.len(), 2);
            let mut loss = logits
                .cross_entropy(&targets, CrossEntropyOptions::default())
                .unwrap();
            let mut stats = Vec::new();
            for (_, aux) in &moe {
                loss = loss.add(&aux.balance).unwrap().add(&aux.z).unwrap();
                stats.push((aux.load.clone(), aux.dropped));
            }
            let value = loss.item().unwrap();
            loss.backward().unwrap();
            (value, stats, m.params.grads_to_vec())
        };
        let (a, b) = (run(false), run(true));
        assert_eq!(a.0, b.0);
        assert_eq!(a.1, b.1);
        assert_eq!(a.2, b.2);
    }

    #[test]
    fn bf16_moe_models_route_in_f32_and_keep_their_losses_under_recomputation() {
        let ids: Vec<u32> = (0..16).map(|i| (i * 5 % 11) as u32).collect();
        let targets: Vec<i64> = ids.iter().map(|&i| ((i + 2) % 11) as i64).collect();
        let run = |dtype: DType, ckpt: bool| {
            let m = Gpt::new(
                GptConfig {
                    dtype,
                    checkpoint_blocks: ckpt,
                    ..tiny_moe(4, 2, 1)
                },
                3,
            )
            .unwrap();
            let (logits, moe) = m.forward_with_aux(&ids, 2, 8, Some(1.into())).unwrap();
            let ce = logits
                .cross_entropy(&targets, CrossEntropyOptions::default())
                .unwrap();
            let aux: Vec<f32> = moe
                .iter()
                .flat_map(|(_, a)| [a.balance.item().unwrap(), a.z.item().unwrap()])
                .collect();
            assert!(moe.iter().all(|(_, a)| a.balance.dtype() == DType::F32));
            let mut total = ce.clone();
            for (_, a) in &moe {
                total = total.add(&a.balance).unwrap().add(&a.z).unwrap();
            }
            total.backward().unwrap();
            let grads = m.params.grads_to_vec();
            assert!(grads.iter().all(|g| g.is_finite()));
            (ce.item().unwrap(), aux)
        };
        let (f32_loss, f32_aux) = run(DType::F32, false);
        let (bf16_loss, bf16_aux) = run(DType::BF16, false);
        assert!(
            (f32_loss - bf16_loss).abs() < 2e-2 * f32_loss,
            "{f32_loss} vs {bf16_loss}"
        );
        for (a, b) in f32_aux.iter().zip(&bf16_aux) {
            assert!((a - b).abs() < 2e-2 * a.abs().max(1e-3), "{a} vs {b}");
        }
        // Recomputed blocks report the same losses in bf16 (packed in f32, not rounded).
        let (ckpt_loss, ckpt_aux) = run(DType::BF16, true);
        assert_eq!(ckpt_aux, bf16_aux);
        assert_eq!(ckpt_loss, bf16_loss);
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
    fn freezing_all_but_one_block_cuts_gradient_and_optimizer_bytes_in_proportion() {
        let full = Gpt::new(GptConfig::bench(), 0).unwrap();
        let mut m = Gpt::new(GptConfig::bench(), 0).unwrap();
        let block: Vec<ParamId> = match &m.layers()[2] {
            GptLayer::Block { index: 1, block } => block.params(),
            _ => panic!("layer 2 is block 1"),
        };
        let names: Vec<String> = block
            .iter()
            .map(|&id| m.params.infos()[id.0].name.clone())
            .collect();
        assert!(names.iter().all(|n| n.starts_with("transformer.h.1.")));
        let kept = m.params.train_only(|n| names.iter().any(|k| k == n));
        assert_eq!(kept, block.len());
        let block_numel: usize = block.iter().map(|&id| m.params.infos()[id.0].len).sum();
        assert_eq!(m.params.trainable_numel(), block_numel);
        assert_eq!(m.params.grads().bytes(), 4 * block_numel);
        let adam = |p: &ParamStore| AdamW::new(p, AdamWConfig::default()).state_bytes();
        // Gradient and optimizer bytes shrink by the trainable share of the parameters.
        let share = block_numel as f64 / full.params.numel() as f64;
        let ratio = m.params.grads().bytes() as f64 / full.params.grads().bytes() as f64;
        assert!((ratio - share).abs() < 1e-12, "{ratio} vs {share}");
        let ratio = adam(&m.params) as f64 / adam(&full.params) as f64;
        assert!((ratio - share).abs() < 1e-12, "{ratio} vs {share}");
        // Training moves the block and nothing else; frozen parameters get no gradient.
        let ids: Vec<u32> = (0..2 * 16).map(|i| (i * 5 % 512) as u32).collect();
        let targets: Vec<i64> = ids.iter().map(|&i| ((i + 1) % 512) as i64).collect();
        let before = m.params.named();
        let before: Vec<Vec<f32>> = before.iter().map(|(_, t)| t.to_vec_f32()).collect();
        let mut opt = AdamW::new(&m.params, AdamWConfig::default());
        m.loss(&ids, &targets, 2, 16, None)
            .unwrap()
            .backward()
            .unwrap();
        opt.step(&m.params, 1e-2);
        for (i, (name, t)) in m.params.named().iter().enumerate() {
            let moved = t.to_vec_f32() != before[i];
            assert_eq!(moved, names.contains(name), "{name}");
            assert_eq!(t.grad().is_some(), names.contains(name), "{name}");
        }
    }

    #[test]
    fn a_frozen_parameter_in_its_own_dtype_is_widened_at_lookup() {
        let ids: Vec<u32> = vec![3, 1, 4, 1, 5, 9, 2, 6];
        let targets: Vec<i64> = ids.iter().map(|&i| ((i + 1) % 11) as i64).collect();
        let mut m = Gpt::new(tiny(), 6).unwrap();
        let full_bytes = m.params.bytes();
        let wte = m.params.id("transformer.wte.weight").unwrap();
        // The reference: the same model with the embedding rounded to bf16 in place.
        let reference = Gpt::new(tiny(), 6).unwrap();
        let rounded = m.params.get(wte).to_dtype(DType::BF16).to_dtype(DType::F32);
        reference.params.set(wte, &rounded).unwrap();
        m.params.freeze_as(wte, DType::BF16);
        assert_eq!(m.params.get(wte).dtype(), DType::BF16);
        assert_eq!(
            m.params.bytes(),
            full_bytes - 11 * 8 * 2,
            "4 → 2 bytes per value"
        );
        assert_eq!(m.params.trainable_numel(), m.params.numel() - 11 * 8);
        // It stays frozen: the optimizer steps only the flat buffer.
        m.params.train_only(|_| true);
        assert!(!m.params.get(wte).requires_grad());
        assert_eq!(m.params.trainable_numel(), m.params.numel() - 11 * 8);
        let a = m.forward(&ids, 1, 8, None).unwrap().to_vec_f32();
        let b = reference.forward(&ids, 1, 8, None).unwrap().to_vec_f32();
        assert_eq!(a, b);
        // Training leaves it as it is and moves the rest.
        let mut opt = AdamW::new(&m.params, AdamWConfig::default());
        let before: Vec<(String, Vec<f32>)> = m
            .params
            .named()
            .into_iter()
            .map(|(n, t)| (n, t.to_vec_f32()))
            .collect();
        m.loss(&ids, &targets, 1, 8, None)
            .unwrap()
            .backward()
            .unwrap();
        opt.step(&m.params, 1e-2);
        for ((name, old), (_, new)) in before.iter().zip(m.params.named()) {
            let moved = *old != new.to_vec_f32();
            assert_eq!(moved, name != "transformer.wte.weight", "{name}");
        }
        // Loading writes into its own buffer.
        let all: std::collections::HashMap<String, Tensor> =
            reference.params.named().into_iter().collect();
        m.params.load_named(&all).unwrap();
        assert_eq!(m.params.get(wte).to_vec_f32(), rounded.to_vec_f32());
    }

    #[test]
    fn shapes_from_files_are_checked_before_anything_is_built() {
        let err = |c: GptConfig| Gpt::new(c, 0).err().expect("refused").to_string();
        let e = err(GptConfig {
            n_head: 0,
            ..tiny()
        });
        assert!(e.contains("n_head = 0 is not allowed: at least 1"), "{e}");
        let e = err(GptConfig {
            n_head: 3,
            n_embd: 32,
            ..tiny()
        });
        assert!(
            e.contains("n_embd = 32") && e.contains("multiple of n_head (3)"),
            "{e}"
        );
        let e = err(GptConfig {
            vocab_size: 0,
            ..tiny()
        });
        assert!(e.contains("vocab_size = 0"), "{e}");
    }

    #[test]
    fn rejects_out_of_range_tokens_and_long_sequences() {
        let m = Gpt::new(tiny(), 0).unwrap();
        assert!(m.forward(&[11], 1, 1, None).is_err());
        assert!(m.forward(&[0; 9], 1, 9, None).is_err());
    }
}
