//! Layer types, each a small struct of parameter ids built from a [`Builder`] under a name
//! prefix (candle's `VarBuilder` pattern), that looks its tensors up in [`Weights`] at forward
//! time:
//!
//! ```text
//! let mut b = Builder::new(seed);
//! let fc = Linear::new(&mut b, "h.0.mlp.c_fc", 256, 1024, LinearOptions::default())?;
//! let (params, parallel) = b.build(DType::F32);
//! let y = fc.forward(&Weights::new(&params, parallel), &x)?;
//! ```
//!
//! Parameter names follow the Hugging Face checkpoints of each architecture, so weights load and
//! export without renaming. The builder carries a [`ParallelContext`] (single-device unless a
//! distributed strategy supplies another): through it a layer learns which shard of each
//! parameter it holds, and at forward time the lookup and the collectives a split layer needs
//! go through it.

mod attention;
mod block;
mod conv;
mod embedding;
mod heads;
mod linear;
mod mlp;
mod moe;
mod norm;
mod parallel;

pub use attention::{Attention, AttentionConfig, KvCache, QkvNames};
pub use block::{Block, BlockConfig, BlockNames, FeedForward};
pub use conv::Conv2d;
pub use embedding::Embedding;
pub use heads::{ClassificationHead, LmHead, ScalarHead};
pub use linear::{Linear, LinearOptions, LinearSplit, LoraConfig, WeightLayout};
pub use mlp::{Mlp, MlpKind};
pub use moe::{router_entropies, MoeAux, MoeConfig, MoeMlp};
pub use norm::{LayerNorm, Norm, NormKind, RmsNorm};
pub use parallel::{ParallelContext, SingleDevice, Split};

use anneal_tensor::{
    DType, DropoutKey, ParamId, ParamStore, ParamStoreBuilder, Result, Rng, Tensor,
};
use std::sync::Arc;

/// The dropout key of layer `index` of a stack, derived from the model's key so each layer
/// draws its own masks.
pub fn layer_key(key: DropoutKey, index: usize) -> DropoutKey {
    key.with_seed(
        key.seed
            .wrapping_add(1 + 2 * index as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15),
    )
}

/// How a parameter starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Normal(0, std²).
    Normal(f32),
    /// All zeros (biases).
    Zeros,
    /// All ones (norm weights).
    Ones,
}

/// Declares parameters under Hugging Face names, drawing initial values from one seeded
/// generator in declaration order, and hands each rank its shard through the parallel context.
pub struct Builder {
    params: ParamStoreBuilder,
    rng: Rng,
    parallel: Arc<dyn ParallelContext>,
    /// LoRA adapters to give the linear layers it names, and which of its targets matched.
    lora: Option<(LoraConfig, Vec<bool>)>,
    /// Declares the base weights as zeros instead of drawing them (their values are about to
    /// be loaded from a file); adapters are still drawn.
    skip_base_init: bool,
}

/// `prefix.name`, or `name` when the prefix is empty.
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

impl Builder {
    /// A builder on one device, initialising from `seed`.
    pub fn new(seed: u64) -> Builder {
        Builder::with_parallel(seed, Arc::new(SingleDevice))
    }

    /// A builder whose layers are split as `parallel` says.
    pub fn with_parallel(seed: u64, parallel: Arc<dyn ParallelContext>) -> Builder {
        Builder {
            params: ParamStoreBuilder::new(),
            rng: Rng::new(seed),
            parallel,
            lora: None,
            skip_base_init: false,
        }
    }

    /// Declares the parameters straight into a store of `dtype` sized for about `elements`
    /// values ([`ParamStoreBuilder::with_capacity`]), so a large 16-bit model is never held in
    /// f32 while it is built. Call before declaring any parameter.
    pub fn storing(mut self, dtype: DType, elements: usize) -> Builder {
        debug_assert!(
            self.params.is_empty(),
            "storing() after parameters were declared"
        );
        self.params = ParamStoreBuilder::with_capacity(dtype, elements);
        self
    }

    /// Leaves every weight but the adapters at zero rather than drawing it: for a model whose
    /// weights are loaded right after (drawing SmolLM2's 135M weights costs seconds).
    pub fn for_loading(mut self) -> Builder {
        self.skip_base_init = true;
        self
    }

    /// Gives every linear layer that `lora` targets an adapter (declared right after the
    /// layer's own parameters). Fails unless the rank is at least 1.
    pub fn with_lora(mut self, lora: LoraConfig) -> Result<Builder> {
        if lora.rank == 0 || lora.targets.is_empty() {
            return Err(anneal_tensor::Error::Invalid {
                op: "LoRA",
                reason: format!(
                    "rank {} and targets {:?}: the rank must be at least 1 and one or more \
                     targets named",
                    lora.rank, lora.targets
                ),
            });
        }
        let n = lora.targets.len();
        self.lora = Some((lora, vec![false; n]));
        Ok(self)
    }

    /// The LoRA settings for the linear layer named `prefix`, if it is a target (noting the
    /// match).
    pub(crate) fn lora_target(&mut self, prefix: &str) -> Option<LoraConfig> {
        let (config, matched) = self.lora.as_mut()?;
        let i = config.target_of(prefix)?;
        matched[i] = true;
        Some(config.clone())
    }

    /// Fails, naming them, when LoRA targets matched no linear layer of the model built so far
    /// (a misspelt target would otherwise train nothing but the head).
    pub fn check_lora_targets(&self) -> Result<()> {
        let Some((config, matched)) = &self.lora else {
            return Ok(());
        };
        let missed: Vec<&String> = config
            .targets
            .iter()
            .zip(matched)
            .filter(|(_, &m)| !m)
            .map(|(t, _)| t)
            .collect();
        if missed.is_empty() {
            return Ok(());
        }
        Err(anneal_tensor::Error::Invalid {
            op: "LoRA",
            reason: format!("the targets {missed:?} match no linear layer of the model"),
        })
    }

    /// The parallel context layers are built in.
    pub fn parallel(&self) -> &dyn ParallelContext {
        &*self.parallel
    }

    /// Declares parameter `name` of full shape `shape`: the full tensor is drawn from `init`
    /// (so every layout starts from the same weights) and this rank keeps the shard `split`
    /// names. `weight_decay` marks it for decoupled decay (off for biases, norms, embeddings).
    pub fn param(
        &mut self,
        name: &str,
        shape: &[usize],
        init: Init,
        weight_decay: bool,
        split: Split,
    ) -> Result<ParamId> {
        let full = match init {
            Init::Normal(_) if self.skip_base_init && !LoraConfig::is_adapter(name) => {
                Tensor::zeros(shape, DType::F32)
            }
            Init::Normal(std) => Tensor::randn(shape, std, DType::F32, &mut self.rng),
            Init::Zeros => Tensor::zeros(shape, DType::F32),
            Init::Ones => Tensor::ones(shape, DType::F32),
        };
        let local = self.parallel.shard(name, &full, split)?;
        self.params.add(name, &local, weight_decay)
    }

    /// Declares a replicated 1-D parameter of `len` elements without weight decay (a norm's
    /// weight, a bias), initialised to `init`.
    pub fn vector(&mut self, name: &str, len: usize, init: Init) -> Result<ParamId> {
        self.param(name, &[len], init, false, Split::Replicated)
    }

    /// Lays the parameters out flat in `dtype`; returns them with the parallel context.
    pub fn build(self, dtype: DType) -> (ParamStore, Arc<dyn ParallelContext>) {
        (self.params.build(dtype), self.parallel)
    }
}

/// What layers read their parameters from at forward time: the store's tensors and the parallel
/// context. Cheap to clone and independent of a borrow of the store, so a recomputed segment can
/// hold one.
#[derive(Clone)]
pub struct Weights {
    tensors: Arc<Vec<Tensor>>,
    parallel: Arc<dyn ParallelContext>,
    dtype: DType,
    packed: Option<Arc<PackedWeights>>,
    dropout: Option<DropoutKey>,
    /// Whether LoRA adapters add their update (off: the base model, as a reference model
    /// sharing the policy's frozen weights reads it).
    adapters: bool,
}

/// Weight matrices also held in quantised blocks, by parameter: an inference model's matrix
/// products at a few rows (generating) read these instead of the f32 weights.
pub type PackedWeights = std::collections::HashMap<ParamId, anneal_tensor::quant::QuantMatrix>;

/// Most rows of input a product reads packed weights for: beyond, the f32 weights' GEMM wins.
pub const PACKED_MAX_ROWS: usize = 8;

impl Weights {
    /// The parameters of `params`, looked up through `parallel`.
    pub fn new(params: &ParamStore, parallel: Arc<dyn ParallelContext>) -> Weights {
        Weights {
            tensors: params.tensors(),
            parallel,
            dtype: params.dtype(),
            packed: None,
            dropout: None,
            adapters: true,
        }
    }

    /// These weights with every LoRA adapter switched off: layers compute the base model, so a
    /// policy's reference model is the same parameters read this way, with no copy held.
    pub fn without_adapters(mut self) -> Weights {
        self.adapters = false;
        self
    }

    /// Whether adapters add their update ([`Weights::without_adapters`]).
    pub fn adapters_on(&self) -> bool {
        self.adapters
    }

    /// These weights for a training forward whose dropout masks derive from `key` (LoRA
    /// adapters drop their input with it); `None` is evaluation.
    pub fn with_dropout(mut self, key: Option<DropoutKey>) -> Weights {
        self.dropout = key;
        self
    }

    /// The training forward's dropout key, if any.
    pub fn dropout_key(&self) -> Option<DropoutKey> {
        self.dropout
    }

    /// These weights with `packed` copies of some matrices.
    pub fn with_packed(mut self, packed: Option<Arc<PackedWeights>>) -> Weights {
        self.packed = packed;
        self
    }

    /// The packed copy of `id` for a product over `rows` input rows, when there is one, the
    /// product is small enough and no gradient is being recorded.
    pub fn packed(&self, id: ParamId, rows: usize) -> Option<&anneal_tensor::quant::QuantMatrix> {
        if rows > PACKED_MAX_ROWS || anneal_tensor::is_grad_enabled() {
            return None;
        }
        self.packed.as_ref()?.get(&id)
    }

    /// Parameter `id` as this rank computes with it (where ZeRO-3 gathers its shards), in the
    /// model's dtype (a frozen parameter held in another dtype is converted here).
    pub fn get(&self, id: ParamId) -> Result<Tensor> {
        let t = self.parallel.lookup(id, &self.tensors[id.0])?;
        Ok(t.to_dtype(self.dtype))
    }

    /// Parameter `id` in f32 whatever the model's dtype (a router computes in f32).
    pub fn get_f32(&self, id: ParamId) -> Result<Tensor> {
        let t = self.parallel.lookup(id, &self.tensors[id.0])?;
        Ok(t.to_dtype(DType::F32))
    }

    /// The parallel context.
    pub fn parallel(&self) -> &dyn ParallelContext {
        &*self.parallel
    }
}

#[cfg(test)]
mod tests;
