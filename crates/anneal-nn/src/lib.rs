//! # anneal-nn
//!
//! Layers and models built on `anneal-tensor`, written to be read top to bottom. Parameter names
//! follow the Hugging Face checkpoints of each architecture, so weights load and export without
//! renaming.
//!
//! * [`layers`]: `Linear`, `Embedding`, `LayerNorm`/`RMSNorm`, self-attention (multi-head and
//!   grouped key/value heads, RoPE, KV cache), `Mlp` (GELU, gated SiLU), the pre-norm `Block`,
//!   and heads (language model tied or untied, classification, scalar); each built from a
//!   `Builder` under a name prefix, looking its tensors up at forward time through a
//!   `ParallelContext` (single-device by default; where tensor parallelism and ZeRO-3 plug in).
//! * [`gpt`]: GPT-2 (Radford et al. 2019) composed of those layers: learned positions, pre-norm
//!   blocks, GELU MLP, tied or untied output head, optional block recomputation, KV cache.
//! * [`bert`]: BERT (Devlin et al. 2019): learned positions and token types, post-norm layers,
//!   bidirectional attention with padding masked, erf GELU, mean and `[CLS]` pooling.
//! * [`llama`]: Llama (Touvron et al. 2023): RMSNorm, rotary positions, grouped key/value heads,
//!   gated SiLU MLP, tied or untied head, KV cache.
//! * [`autoencoder`]: a fully connected classifier pretrained greedily as stacked autoencoders
//!   (the deep-belief-network era's layer-wise pretraining).
//! * [`lenet`]: LeNet-5 (LeCun et al. 1998), the supervised convolutional baseline.
//! * [`vit`]: a small Vision Transformer (Dosovitskiy et al. 2021) with MAE's masked-autoencoder
//!   decoder (He et al. 2022).
//! * Mixture of Experts: `layers::MoeMlp` (Switch and top-k routing, capacity or dropless,
//!   balancing and z-losses), in any GPT block through `GptConfig::moe`; [`limoe`]: one MoE
//!   encoder shared by image patches and text tokens, trained contrastively with LIMoE's
//!   per-modality entropy losses (Mustafa et al. 2022).

pub mod autoencoder;
pub mod bert;
pub mod gpt;
pub mod layers;
pub mod lenet;
pub mod limoe;
pub mod llama;
pub mod vit;

pub use autoencoder::StackedAutoencoder;
pub use gpt::{Gpt, GptConfig, GptLayer, GptMoe, PartInput};
pub use layers::KvCache;
pub use lenet::{LeNet, LeNetConfig};
pub use llama::{Llama, LlamaConfig};
pub use vit::{Vit, VitConfig};
