//! Training FLOPs per step.
//!
//! A transformer layer's forward pass costs 24·B·s·h² FLOPs in its matrix products (QKV,
//! output projection and the 4h MLP, at 2 FLOPs per multiply-add) plus 4·B·s²·h in attention
//! (QKᵀ and the product with V); the output layer costs 2·B·s·h·V. Backward costs twice the
//! forward. Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training on GPU Clusters
//! Using Megatron-LM", §5.1, eq. 3) count a step with full activation recomputation, an extra
//! forward pass of every layer, as
//!
//! ```text
//! F = 96·B·s·l·h² · (1 + s/(6h) + V/(16·l·h))
//! ```
//!
//! and without recomputation the layers cost 3 forward passes instead of 4:
//! F = 72·B·s·l·h² · (1 + s/(6h) + V/(12·l·h)). Selective recomputation (Korthikanti et al. 2022,
//! "Reducing Activation Recomputation in Large Transformer Models", §4.2) recomputes only the
//! attention core, adding 4·B·s²·h per layer.
//!
//! For other shapes (grouped KV heads, gated feed-forward, experts) the layer's matrix-product
//! FLOPs are 2·s·B times its active matrix parameters, which gives 24·B·s·h² for a GPT layer.

use crate::ModelSpec;
use serde::{Deserialize, Serialize};

/// Which activations are recomputed in backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Everything stored.
    None,
    /// The attention core recomputed (Korthikanti et al. 2022).
    Selective,
    /// Every layer recomputed from its input.
    Full,
}

/// Matrix-product parameters a token passes through in one layer (experts: `top_k` of them).
fn layer_matmul_params(m: &ModelSpec) -> f64 {
    let h = m.hidden as f64;
    let kv = h * m.kv_heads as f64 / m.heads as f64;
    let attention = 2.0 * h * h + 2.0 * h * kv;
    let ffn_matrices = if m.gated_ffn { 3.0 } else { 2.0 } * h * m.ffn as f64;
    let ffn = match &m.moe {
        // Averaged over layers: MoE layers run top_k experts.
        Some(moe) => {
            let share = 1.0 / moe.every.max(1) as f64;
            ffn_matrices * (1.0 - share + share * moe.top_k as f64)
        }
        None => ffn_matrices,
    };
    attention + ffn
}

/// Forward FLOPs of the transformer layers for `batch` sequences.
pub fn layers_forward(m: &ModelSpec, batch: usize) -> f64 {
    let (b, s, l, h) = (batch as f64, m.seq as f64, m.layers as f64, m.hidden as f64);
    l * (2.0 * b * s * layer_matmul_params(m) + 4.0 * b * s * s * h)
}

/// Forward FLOPs of the output layer for `batch` sequences.
pub fn logits_forward(m: &ModelSpec, batch: usize) -> f64 {
    2.0 * batch as f64 * m.seq as f64 * m.hidden as f64 * m.vocab as f64
}

/// FLOPs of one training step (forward, backward, and the recomputation `recompute` asks for)
/// over a global batch of `batch` sequences.
pub fn step(m: &ModelSpec, batch: usize, recompute: Recompute) -> f64 {
    let layers = layers_forward(m, batch);
    let (b, s, l, h) = (batch as f64, m.seq as f64, m.layers as f64, m.hidden as f64);
    let extra = match recompute {
        Recompute::None => 0.0,
        Recompute::Selective => l * 4.0 * b * s * s * h,
        Recompute::Full => layers,
    };
    3.0 * (layers + logits_forward(m, batch)) + extra
}

/// The FLOPs a step does useful work with: forward and backward without recomputation
/// (what model FLOP utilisation counts; Chowdhery et al. 2022, "PaLM", appendix B).
pub fn model_step(m: &ModelSpec, batch: usize) -> f64 {
    step(m, batch, Recompute::None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_narayanan_equation_3() {
        let m = ModelSpec::gpt(128, 25600, 160, 51200, 2048);
        let (b, s, l, h, v) = (3072.0, 2048.0, 128.0, 25600.0, 51200.0);
        let paper = 96.0 * b * s * l * h * h * (1.0 + s / (6.0 * h) + v / (16.0 * l * h));
        let ours = step(&m, 3072, Recompute::Full);
        assert!((ours / paper - 1.0).abs() < 1e-3, "{ours:e} vs {paper:e}");
        let no_recompute = 72.0 * b * s * l * h * h * (1.0 + s / (6.0 * h) + v / (12.0 * l * h));
        assert!((model_step(&m, 3072) / no_recompute - 1.0).abs() < 1e-3);
        let selective = step(&m, 3072, Recompute::Selective);
        assert!(selective > model_step(&m, 3072) && selective < step(&m, 3072, Recompute::Full));
    }
}
