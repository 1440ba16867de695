//! BERT (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language
//! Understanding"), the encoder of Hugging Face's `BertModel` with its parameter names, composed
//! of the layers in [`crate::layers`]:
//!
//! ```text
//! x = LayerNorm(word[ids] + position[0..T] + token_type[types])
//! for each layer:  x = LayerNorm(x + attention(x))          (bidirectional, padding masked)
//!                  x = LayerNorm(x + output(gelu(intermediate(x))))
//! ```
//!
//! Post-norm, unlike GPT's blocks: each residual sum is normalised. Sentence embeddings pool the
//! last hidden states: the mean over real tokens (sentence-transformers' pooling for
//! all-MiniLM-L6-v2, followed by L2 normalisation) or the `[CLS]` position.

use crate::layers::{
    Attention, AttentionConfig, Builder, ClassificationHead, Embedding, Init, LayerNorm, Linear,
    LinearOptions, LoraConfig, Mlp, MlpKind, ParallelContext, QkvNames, WeightLayout, Weights,
};
use anneal_tensor::{DType, DropoutKey, Error, ParamId, ParamStore, Result, Tensor};
use std::collections::HashMap;
use std::sync::Arc;

/// Hyper-parameters of a BERT encoder (the keys of a Hugging Face `config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `hidden_size`: width of the residual stream.
    pub hidden_size: usize,
    /// `num_hidden_layers`.
    pub num_layers: usize,
    /// `num_attention_heads`.
    pub num_heads: usize,
    /// `intermediate_size`: hidden width of the feed-forward network.
    pub intermediate_size: usize,
    /// `max_position_embeddings`: the longest input.
    pub max_positions: usize,
    /// `type_vocab_size`: token types (segments A and B).
    pub type_vocab_size: usize,
    /// `layer_norm_eps`.
    pub layer_norm_eps: f32,
    /// `hidden_dropout_prob`, applied while training.
    pub dropout: f32,
    /// Storage dtype of parameters and activations.
    pub dtype: DType,
    /// Pre-norm layers (Xiong et al. 2020, "On Layer Normalization in the Transformer
    /// Architecture": each sub-layer reads a normalised copy of the residual stream, and a final
    /// LayerNorm, `encoder.final_norm`, follows the last layer), which train stably at higher
    /// learning rates and converge faster from scratch; `false` is BERT's post-norm, as every
    /// Hugging Face checkpoint has it.
    pub pre_norm: bool,
    /// `tie_word_embeddings`: the masked-LM decoder reads the word embeddings (BERT's choice).
    /// Untied, it has its own `cls.predictions.decoder.weight`, and the softmax no longer pulls
    /// every rare token's input embedding towards one direction (Gao et al. 2019, "Representation
    /// Degeneration Problem in Training Natural Language Generation Models").
    pub tie_word_embeddings: bool,
}

impl BertConfig {
    /// all-MiniLM-L6-v2's shape: 6 layers, 12 heads, width 384, 30,522 WordPiece tokens.
    pub fn minilm_l6() -> BertConfig {
        BertConfig {
            vocab_size: 30522,
            hidden_size: 384,
            num_layers: 6,
            num_heads: 12,
            intermediate_size: 1536,
            max_positions: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            dropout: 0.1,
            dtype: DType::F32,
            pre_norm: false,
            tie_word_embeddings: true,
        }
    }

    /// Fails, naming the key, unless every size is positive and the heads divide the width.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| {
            Err(Error::Invalid {
                op: "BertConfig",
                reason,
            })
        };
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_positions),
            ("type_vocab_size", self.type_vocab_size),
        ] {
            if v == 0 {
                return bad(format!("{key} must be at least 1"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            return bad(format!(
                "num_attention_heads = {} must divide hidden_size = {}",
                self.num_heads, self.hidden_size
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!(
                "hidden_dropout_prob = {} must be in [0, 1)",
                self.dropout
            ));
        }
        Ok(())
    }

    /// Parameters of the encoder (no pooler), or `None` past `usize`.
    pub fn total_params(&self) -> Option<usize> {
        let (d, f) = (self.hidden_size, self.intermediate_size);
        let rows = self
            .vocab_size
            .checked_add(self.max_positions)?
            .checked_add(self.type_vocab_size)?;
        let embeddings = rows.checked_mul(d)?.checked_add(2 * d)?;
        // Q, K, V and the output projection with biases, two LayerNorms, the two MLP layers.
        let layer = (4 * d * d + 4 * d)
            .checked_add(4 * d)?
            .checked_add(d.checked_mul(f)?.checked_mul(2)?)?
            .checked_add(f + d)?;
        let final_norm = if self.pre_norm { 2 * d } else { 0 };
        embeddings
            .checked_add(layer.checked_mul(self.num_layers)?)?
            .checked_add(final_norm)
    }

    /// Checks this configuration against weights read from a file before a model is built from
    /// it (so a `config.json` claiming more than the file holds allocates nothing of its size):
    /// the embeddings' shapes, the number of layers and the number of elements must match.
    pub fn check_weights(&self, weights: &HashMap<String, Tensor>) -> Result<()> {
        self.validate()?;
        let bad = |reason: String| {
            Err(Error::Invalid {
                op: "BertConfig",
                reason,
            })
        };
        let d = self.hidden_size;
        for (name, want) in [
            ("embeddings.word_embeddings.weight", [self.vocab_size, d]),
            (
                "embeddings.position_embeddings.weight",
                [self.max_positions, d],
            ),
            (
                "embeddings.token_type_embeddings.weight",
                [self.type_vocab_size, d],
            ),
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
        let layers = (0..weights.len())
            .take_while(|i| {
                weights.contains_key(&format!("encoder.layer.{i}.attention.self.query.weight"))
            })
            .count();
        if layers != self.num_layers {
            return bad(format!(
                "num_hidden_layers = {} but the weights hold {layers} layers",
                self.num_layers
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
}

/// One encoder layer, post-norm (BERT's) or pre-norm; both keep BERT's parameter names, the
/// attention's LayerNorm normalising before attention in pre-norm and the output's before the
/// feed-forward network.
#[derive(Clone, Debug)]
struct BertLayer {
    attention: Attention,
    attention_norm: LayerNorm,
    mlp: Mlp,
    output_norm: LayerNorm,
    pre_norm: bool,
}

impl BertLayer {
    fn new(b: &mut Builder, prefix: &str, c: &BertConfig) -> Result<BertLayer> {
        let d = c.hidden_size;
        let attention = AttentionConfig {
            d_model: d,
            n_head: c.num_heads,
            n_kv_head: c.num_heads,
            bias: true,
            causal: false,
            rope_base: None,
            save_probs: false,
            layout: WeightLayout::OutIn,
            std: 0.02,
            proj_std: 0.02,
            qkv: QkvNames::Separate("self.query", "self.key", "self.value"),
            out: "output.dense",
        };
        let eps = c.layer_norm_eps;
        Ok(BertLayer {
            attention: Attention::new(b, &format!("{prefix}.attention"), &attention)?,
            attention_norm: LayerNorm::new(
                b,
                &format!("{prefix}.attention.output.LayerNorm"),
                d,
                true,
                eps,
            )?,
            mlp: Mlp::new(
                b,
                prefix,
                d,
                c.intermediate_size,
                MlpKind::GeluErf {
                    fc: "intermediate.dense",
                    proj: "output.dense",
                },
                true,
                WeightLayout::OutIn,
                0.02,
                0.02,
            )?,
            output_norm: LayerNorm::new(b, &format!("{prefix}.output.LayerNorm"), d, true, eps)?,
            pre_norm: c.pre_norm,
        })
    }

    fn params(&self) -> Vec<ParamId> {
        [
            self.attention.params(),
            self.attention_norm.params(),
            self.mlp.params(),
            self.output_norm.params(),
        ]
        .concat()
    }

    fn forward(
        &self,
        w: &Weights,
        x: &Tensor,
        mask: Option<Vec<bool>>,
        p_drop: f32,
        key: DropoutKey,
    ) -> Result<Tensor> {
        let mlp_key = key.with_seed(key.seed ^ 1);
        if self.pre_norm {
            let a = self
                .attention
                .forward_masked(w, &self.attention_norm.forward(w, x)?, mask)?;
            let x = x.add(&a.dropout_at(p_drop, key)?)?;
            let h = self.mlp.forward(w, &self.output_norm.forward(w, &x)?)?;
            return x.add(&h.dropout_at(p_drop, mlp_key)?);
        }
        let a = self.attention.forward_masked(w, x, mask)?;
        let x = self
            .attention_norm
            .forward(w, &x.add(&a.dropout_at(p_drop, key)?)?)?;
        let h = self.mlp.forward(w, &x)?;
        let h = h.dropout_at(p_drop, mlp_key)?;
        self.output_norm.forward(w, &x.add(&h)?)
    }
}

/// How sentence embeddings pool the last hidden states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// The mean over real tokens (sentence-transformers' default).
    Mean,
    /// The first position (`[CLS]`).
    Cls,
}

/// A BERT encoder.
pub struct Bert {
    /// Its hyper-parameters.
    pub config: BertConfig,
    /// Its parameters, flat, under Hugging Face `BertModel` names.
    pub params: ParamStore,
    parallel: Arc<dyn ParallelContext>,
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    embeddings_norm: LayerNorm,
    layers: Vec<BertLayer>,
    final_norm: Option<LayerNorm>,
    classifier: Option<ClassificationHead>,
    pretraining: Option<PretrainingHeads>,
}

/// BERT's pretraining heads (Hugging Face `BertForPreTraining` names): the masked-LM head
/// (a dense layer, GELU and LayerNorm, then the word embeddings transposed plus a bias) and the
/// next-sentence head on the pooler (`[CLS]` through a dense layer and tanh).
struct PretrainingHeads {
    pooler: Linear,
    transform: Linear,
    transform_norm: LayerNorm,
    decoder_bias: ParamId,
    /// The decoder's own weight `[vocab, d]` when untied from the word embeddings.
    decoder: Option<ParamId>,
    next_sentence: Linear,
}

/// What BERT's pretraining heads give.
pub struct PretrainingOutput {
    /// Masked-LM logits `[M, vocab]` at the positions asked for, in their order.
    pub mlm: Tensor,
    /// Next-sentence logits `[B, 2]` (0: B follows A).
    pub next_sentence: Tensor,
}

/// Token ids of a batch of sequences padded to one length, with what a BERT reads beside them.
#[derive(Clone, Debug, PartialEq)]
pub struct BertInput {
    /// Token ids `[batch, seq]`, row-major (padding ids where `mask` is false).
    pub ids: Vec<u32>,
    /// Token types `[batch, seq]` (segment A = 0, B = 1); `None` is all zeros.
    pub token_types: Option<Vec<u32>>,
    /// `[batch, seq]`, `true` for real tokens, `false` for padding.
    pub mask: Vec<bool>,
    /// Sequences.
    pub batch: usize,
    /// Positions per sequence.
    pub seq: usize,
}

impl BertInput {
    /// Sequences of token ids, right-padded with `pad` to the longest.
    pub fn padded(sequences: &[Vec<u32>], pad: u32) -> BertInput {
        let seq = sequences.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(sequences.len() * seq);
        let mut mask = Vec::with_capacity(ids.capacity());
        for s in sequences {
            ids.extend(
                s.iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad, seq - s.len())),
            );
            mask.extend((0..seq).map(|i| i < s.len()));
        }
        BertInput {
            ids,
            token_types: None,
            mask,
            batch: sequences.len(),
            seq,
        }
    }
}

impl Bert {
    /// A freshly initialised encoder on one device: weights Normal(0, 0.02), biases zero,
    /// LayerNorm weights one.
    pub fn new(config: BertConfig, seed: u64) -> Result<Bert> {
        Bert::with_lora(config, seed, None)
    }

    /// [`Bert::new`] with LoRA adapters on the linear layers `lora` targets (the attention's
    /// `query`, `key`, `value`, `dense`, …); fails naming any target that matches none.
    pub fn with_lora(config: BertConfig, seed: u64, lora: Option<LoraConfig>) -> Result<Bert> {
        Bert::with_head(config, seed, lora, None)
    }

    /// [`Bert::with_lora`] with a classification head of `classes` outputs, `classifier.weight`
    /// and `classifier.bias` (Hugging Face's `BertForSequenceClassification` names), on the mean
    /// of the last hidden states over real tokens (sentence-transformers' pooling, where
    /// `BertForSequenceClassification` reads its pooler).
    pub fn with_head(
        config: BertConfig,
        seed: u64,
        lora: Option<LoraConfig>,
        classes: Option<usize>,
    ) -> Result<Bert> {
        Bert::build(config, seed, lora, classes, false)
    }

    /// A freshly initialised BERT with its pretraining heads (masked LM and next-sentence
    /// prediction), as `BertForPreTraining` (Devlin et al. 2019 §3.1).
    pub fn for_pretraining(config: BertConfig, seed: u64) -> Result<Bert> {
        Bert::build(config, seed, None, None, true)
    }

    /// [`Bert::with_head`] (with the pretraining heads when `pretraining`) with its layers split
    /// as `parallel` says: under tensor parallelism each layer's attention heads and
    /// intermediate units; the embeddings and heads are replicated.
    pub fn new_in(
        config: BertConfig,
        seed: u64,
        classes: Option<usize>,
        pretraining: bool,
        parallel: Arc<dyn ParallelContext>,
    ) -> Result<Bert> {
        Bert::build_with(
            config,
            Builder::with_parallel(seed, parallel),
            None,
            classes,
            pretraining,
        )
    }

    fn build(
        config: BertConfig,
        seed: u64,
        lora: Option<LoraConfig>,
        classes: Option<usize>,
        pretraining: bool,
    ) -> Result<Bert> {
        Bert::build_with(config, Builder::new(seed), lora, classes, pretraining)
    }

    fn build_with(
        config: BertConfig,
        mut b: Builder,
        lora: Option<LoraConfig>,
        classes: Option<usize>,
        pretraining: bool,
    ) -> Result<Bert> {
        config.validate()?;
        let c = &config;
        let d = c.hidden_size;
        if let Some(lora) = lora {
            b = b.with_lora(lora)?;
        }
        let word = Embedding::new(&mut b, "embeddings.word_embeddings", c.vocab_size, d, 0.02)?;
        let position = Embedding::new(
            &mut b,
            "embeddings.position_embeddings",
            c.max_positions,
            d,
            0.02,
        )?;
        let token_type = Embedding::new(
            &mut b,
            "embeddings.token_type_embeddings",
            c.type_vocab_size,
            d,
            0.02,
        )?;
        let embeddings_norm =
            LayerNorm::new(&mut b, "embeddings.LayerNorm", d, true, c.layer_norm_eps)?;
        let layers = (0..c.num_layers)
            .map(|i| BertLayer::new(&mut b, &format!("encoder.layer.{i}"), c))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = c
            .pre_norm
            .then(|| LayerNorm::new(&mut b, "encoder.final_norm", d, true, c.layer_norm_eps))
            .transpose()?;
        b.check_lora_targets()?;
        let classifier = classes
            .map(|k| ClassificationHead::new(&mut b, "classifier", d, k))
            .transpose()?;
        let pretraining = if pretraining {
            let dense = LinearOptions {
                layout: WeightLayout::OutIn,
                ..LinearOptions::default()
            };
            Some(PretrainingHeads {
                pooler: Linear::new(&mut b, "pooler.dense", d, d, dense)?,
                transform: Linear::new(&mut b, "cls.predictions.transform.dense", d, d, dense)?,
                transform_norm: LayerNorm::new(
                    &mut b,
                    "cls.predictions.transform.LayerNorm",
                    d,
                    true,
                    c.layer_norm_eps,
                )?,
                decoder_bias: b.vector("cls.predictions.bias", c.vocab_size, Init::Zeros)?,
                decoder: if c.tie_word_embeddings {
                    None
                } else {
                    Some(b.param(
                        "cls.predictions.decoder.weight",
                        &[c.vocab_size, d],
                        Init::Normal(0.02),
                        false,
                        crate::layers::Split::Replicated,
                    )?)
                },
                next_sentence: Linear::new(&mut b, "cls.seq_relationship", d, 2, dense)?,
            })
        } else {
            None
        };
        let (params, parallel) = b.build(c.dtype);
        Ok(Bert {
            config,
            params,
            parallel,
            word,
            position,
            token_type,
            embeddings_norm,
            layers,
            final_norm,
            classifier,
            pretraining,
        })
    }

    /// The pretraining heads on `input`: masked-LM logits at the flattened positions `predict`
    /// (row · seq + position) and next-sentence logits of every row. Fails for a model built
    /// without them ([`Bert::for_pretraining`]).
    pub fn pretraining_logits(
        &self,
        input: &BertInput,
        predict: &[usize],
        dropout: Option<DropoutKey>,
    ) -> Result<PretrainingOutput> {
        let Some(h) = &self.pretraining else {
            return Err(Error::Invalid {
                op: "Bert::pretraining_logits",
                reason: "the model has no pretraining heads (build it with Bert::for_pretraining)"
                    .into(),
            });
        };
        let hidden = self.forward(input, dropout)?;
        let (b, t, d) = (hidden.shape()[0], hidden.shape()[1], hidden.shape()[2]);
        let flat = hidden.reshape(&[b * t, d])?;
        let w = self.weights();
        let x = h
            .transform
            .forward(&w, &flat.index_select(0, predict)?)?
            .gelu();
        let x = h.transform_norm.forward(&w, &x)?;
        let mlm = x
            .matmul(
                &w.get(h.decoder.unwrap_or(self.word.weight()))?
                    .transpose(0, 1)?,
            )?
            .add(&w.get(h.decoder_bias)?)?;
        let first: Vec<usize> = (0..b).map(|i| i * t).collect();
        let pooled = h.pooler.forward(&w, &flat.index_select(0, &first)?)?.tanh();
        Ok(PretrainingOutput {
            mlm,
            next_sentence: h.next_sentence.forward(&w, &pooled)?,
        })
    }

    /// Whether parameter `name` belongs to the encoder (embeddings and layers): what a
    /// classifier takes from a pretrained BERT, leaving its heads behind.
    pub fn is_encoder_param(name: &str) -> bool {
        name.starts_with("embeddings.") || name.starts_with("encoder.")
    }

    /// The parameters as layers look them up at forward time.
    pub fn weights(&self) -> Weights {
        Weights::new(&self.params, self.parallel.clone())
    }

    /// The parameter ids of each encoder layer, bottom first (freezing the lower layers takes
    /// these).
    pub fn layer_params(&self) -> Vec<Vec<ParamId>> {
        self.layers.iter().map(BertLayer::params).collect()
    }

    /// Merges every LoRA adapter's update into its weight (`true`), or takes it out again.
    pub fn set_lora_merged(&self, merged: bool) -> Result<()> {
        for l in &self.layers {
            for linear in l.attention.linears().into_iter().chain(l.mlp.linears()) {
                linear.set_merged(&self.params, merged)?;
            }
        }
        Ok(())
    }

    /// Last hidden states `[B, T, d]`. `dropout` turns dropout on (training) with masks derived
    /// from its key; `None` is evaluation.
    pub fn forward(&self, input: &BertInput, dropout: Option<DropoutKey>) -> Result<Tensor> {
        let c = &self.config;
        let op = "Bert::forward";
        let (b, t) = (input.batch, input.seq);
        if t == 0 || t > c.max_positions || input.ids.len() != b * t || input.mask.len() != b * t {
            return Err(Error::Invalid {
                op,
                reason: format!(
                    "{b} sequences of {t} positions (1 to max_position_embeddings = {}) need \
                     {} ids and mask flags, not {} and {}",
                    c.max_positions,
                    b * t,
                    input.ids.len(),
                    input.mask.len()
                ),
            });
        }
        let p_drop = dropout.map_or(0.0, |_| c.dropout);
        let key = dropout.unwrap_or_default();
        let w = self.weights().with_dropout(dropout);
        let zeros;
        let types = match &input.token_types {
            Some(types) => types.as_slice(),
            None => {
                zeros = vec![0u32; b * t];
                &zeros
            }
        };
        let x = self
            .word
            .forward(&w, &input.ids, &[b, t], op)?
            .add(&self.position.range(&w, 0, t)?)?
            .add(&self.token_type.forward(&w, types, &[b, t], op)?)?;
        let mut x = self
            .embeddings_norm
            .forward(&w, &x)?
            .dropout_at(p_drop, key)?;
        let mask = (!input.mask.iter().all(|&m| m)).then(|| input.mask.clone());
        for (index, layer) in self.layers.iter().enumerate() {
            let key = crate::layers::layer_key(key, index);
            x = layer.forward(&w, &x, mask.clone(), p_drop, key)?;
        }
        match &self.final_norm {
            Some(norm) => norm.forward(&w, &x),
            None => Ok(x),
        }
    }

    /// Sentence embeddings `[B, d]`: the mean of the last hidden states over each sequence's real
    /// tokens (sentence-transformers' mean pooling).
    pub fn mean_pooled(&self, input: &BertInput, dropout: Option<DropoutKey>) -> Result<Tensor> {
        let hidden = self.forward(input, dropout)?;
        mean_pool(&hidden, &input.mask)
    }

    /// Class logits `[B, classes]` of the mean-pooled last hidden states; fails when the model
    /// was built without a classification head.
    pub fn classify(&self, input: &BertInput, dropout: Option<DropoutKey>) -> Result<Tensor> {
        let Some(head) = &self.classifier else {
            return Err(Error::Invalid {
                op: "Bert::classify",
                reason: "the model has no classification head (build it with Bert::with_head)"
                    .into(),
            });
        };
        let pooled = self.mean_pooled(input, dropout)?;
        head.forward(&self.weights(), &pooled)
    }

    /// The classification head's parameter ids (empty without one).
    pub fn head_params(&self) -> Vec<ParamId> {
        self.classifier
            .as_ref()
            .map_or_else(Vec::new, ClassificationHead::params)
    }

    /// Each sequence's last hidden state at its first position (`[CLS]`), `[B, d]`.
    pub fn cls_pooled(&self, input: &BertInput, dropout: Option<DropoutKey>) -> Result<Tensor> {
        let hidden = self.forward(input, dropout)?;
        let (b, t, d) = (hidden.shape()[0], hidden.shape()[1], hidden.shape()[2]);
        let rows: Vec<usize> = (0..b).map(|i| i * t).collect();
        hidden.reshape(&[b * t, d])?.index_select(0, &rows)
    }

    /// Unit-length sentence embeddings, one per sequence: pooled, then L2-normalised (mean
    /// pooling is what sentence-transformers computes for all-MiniLM-L6-v2). Runs without
    /// gradients.
    pub fn embed(&self, input: &BertInput, pooling: Pooling) -> Result<Vec<Vec<f32>>> {
        let pooled = anneal_tensor::no_grad(|| match pooling {
            Pooling::Mean => self.mean_pooled(input, None),
            Pooling::Cls => self.cls_pooled(input, None),
        })?;
        let d = self.config.hidden_size;
        Ok(pooled
            .to_vec_f32()
            .chunks(d)
            .map(|v| {
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                v.iter().map(|x| x / norm).collect()
            })
            .collect())
    }
}

/// The mean over each sequence's real tokens of `hidden` `[B, T, d]`, `mask` `[B, T]` flagging
/// them: `[B, d]`. A sequence without real tokens pools to zeros.
pub fn mean_pool(hidden: &Tensor, mask: &[bool]) -> Result<Tensor> {
    let (b, t) = (hidden.shape()[0], hidden.shape()[1]);
    if mask.len() != b * t {
        return Err(Error::Invalid {
            op: "mean_pool",
            reason: format!("{} mask flags for {b} × {t} positions", mask.len()),
        });
    }
    let weights: Vec<f32> = mask.iter().map(|&m| m as u8 as f32).collect();
    let counts: Vec<f32> = weights
        .chunks(t.max(1))
        .map(|c| c.iter().sum::<f32>().max(1e-9))
        .collect();
    let weights = Tensor::from_f32(weights, &[b, t, 1])?;
    let counts = Tensor::from_f32(counts, &[b, 1])?;
    hidden.mul(&weights)?.sum(1, false)?.div(&counts)
}
