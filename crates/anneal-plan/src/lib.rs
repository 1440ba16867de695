//! # anneal-plan
//!
//! Arithmetic for laying a transformer out on a cluster, before renting one: for a model, a
//! batch, a dtype policy and a layout (data, tensor, pipeline and expert parallelism, ZeRO
//! sharding, activation recomputation), how many bytes each device holds and how many FLOPs a
//! step costs. Each formula cites its source.
//!
//! * [`ModelSpec`]: GPT or Llama dimensions, optional Mixture-of-Experts; parameter counts.
//! * [`flops`]: training FLOPs per step (Narayanan et al. 2021).
//! * [`memory`]: model states per device under ZeRO stages 0–3 (Rajbhandari et al. 2020) and
//!   activations per layer with and without recomputation (Korthikanti et al. 2022).
//! * [`cluster`]: accelerator and interconnect presets with the vendors' figures.
//! * [`comm`]: the bytes a data-parallel or sharded step hands to each collective.

pub mod cluster;
pub mod comm;
pub mod flops;
pub mod memory;
pub mod planner;

use serde::{Deserialize, Serialize};

/// Mixture-of-Experts feed-forward layers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoeSpec {
    /// Experts per MoE layer.
    pub experts: usize,
    /// Experts each token is routed to.
    pub top_k: usize,
    /// Tokens an expert accepts, as a multiple of its even share.
    pub capacity_factor: f64,
    /// Every `every`-th layer is an MoE layer (1: all).
    pub every: usize,
}

/// A decoder-only transformer's dimensions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Transformer layers l.
    pub layers: usize,
    /// Hidden size h.
    pub hidden: usize,
    /// Attention heads a.
    pub heads: usize,
    /// Key/value heads (grouped-query attention; = heads for multi-head attention).
    pub kv_heads: usize,
    /// Feed-forward inner size (4h for GPT).
    pub ffn: usize,
    /// Whether the feed-forward is gated (SwiGLU, three matrices, as Llama) or not (GPT, two).
    pub gated_ffn: bool,
    /// Vocabulary size V.
    pub vocab: usize,
    /// Sequence length s.
    pub seq: usize,
    /// Mixture-of-Experts, when the feed-forward layers are sparse.
    pub moe: Option<MoeSpec>,
}

impl ModelSpec {
    /// A GPT (Megatron-LM's): multi-head attention, 4h GELU MLP, learned positions.
    pub fn gpt(layers: usize, hidden: usize, heads: usize, vocab: usize, seq: usize) -> ModelSpec {
        ModelSpec {
            layers,
            hidden,
            heads,
            kv_heads: heads,
            ffn: 4 * hidden,
            gated_ffn: false,
            vocab,
            seq,
            moe: None,
        }
    }

    /// Parameters of one feed-forward block (one expert, for MoE).
    fn ffn_params(&self) -> f64 {
        let (h, f) = (self.hidden as f64, self.ffn as f64);
        if self.gated_ffn {
            3.0 * h * f
        } else {
            2.0 * h * f + f + h
        }
    }

    /// Parameters of attention in one layer: Q and O are h×h, K and V h×(h·kv/heads), plus
    /// biases for GPT.
    fn attention_params(&self) -> f64 {
        let h = self.hidden as f64;
        let kv = h * self.kv_heads as f64 / self.heads as f64;
        let bias = if self.gated_ffn {
            0.0
        } else {
            h + 2.0 * kv + h
        };
        2.0 * h * h + 2.0 * h * kv + bias
    }

    /// Total parameters Ψ. For a GPT this is Narayanan et al.'s
    /// P = 12·l·h²·(1 + 13/(12h) + (V + s)/(12·l·h)) (learned positions, tied embeddings); MoE
    /// layers hold `experts` feed-forward blocks and a router.
    pub fn params(&self) -> f64 {
        let (l, h) = (self.layers as f64, self.hidden as f64);
        let norms = if self.gated_ffn { 2.0 * h } else { 4.0 * h };
        let dense_ffn = self.ffn_params();
        let (moe_layers, experts) = match &self.moe {
            Some(m) => ((self.layers / m.every.max(1)) as f64, m.experts as f64),
            None => (0.0, 1.0),
        };
        let router = h * experts;
        let ffn_total = (l - moe_layers) * dense_ffn + moe_layers * (experts * dense_ffn + router);
        let positions = if self.gated_ffn {
            0.0
        } else {
            self.seq as f64 * h
        };
        l * (self.attention_params() + norms)
            + ffn_total
            + self.vocab as f64 * h
            + positions
            + if self.gated_ffn { h } else { 2.0 * h }
    }

    /// Parameters a token passes through (for MoE, `top_k` experts instead of all).
    pub fn active_params(&self) -> f64 {
        match &self.moe {
            None => self.params(),
            Some(m) => {
                let moe_layers = (self.layers / m.every.max(1)) as f64;
                self.params() - moe_layers * (m.experts - m.top_k) as f64 * self.ffn_params()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Megatron-LM Table 1 (Narayanan et al. 2021): the parameter counts of its GPT models with
    /// V = 51,200 and s = 2,048.
    #[test]
    fn gpt_parameter_counts_match_megatron_table_1() {
        for (layers, hidden, heads, billions) in [
            (24, 2304, 24, 1.7),
            (30, 3072, 32, 3.6),
            (36, 4096, 32, 7.5),
            (40, 6144, 48, 18.4),
            (48, 8192, 64, 39.1),
            (60, 10240, 80, 76.1),
            (80, 12288, 96, 145.6),
            (96, 16384, 128, 310.1),
            (105, 20480, 128, 529.6),
            (128, 25600, 160, 1008.0),
        ] {
            let p = ModelSpec::gpt(layers, hidden, heads, 51200, 2048).params();
            let (l, h) = (layers as f64, hidden as f64);
            let formula =
                12.0 * l * h * h * (1.0 + 13.0 / (12.0 * h) + (51200.0 + 2048.0) / (12.0 * l * h));
            // The paper's formula leaves out the final LayerNorm (2h parameters).
            assert!(
                (p - 2.0 * h - formula).abs() < 1.0,
                "{layers}×{hidden}: {p} vs {formula}"
            );
            // The table rounds: 1.65B is printed as 1.7B.
            let b = p / 1e9;
            assert!(
                (b - billions).abs() / billions < 0.035,
                "{layers}×{hidden}: {b:.2}B vs {billions}B"
            );
        }
    }

    #[test]
    fn moe_counts_every_expert_but_activates_top_k() {
        let dense = ModelSpec::gpt(12, 768, 12, 50257, 1024);
        let moe = ModelSpec {
            moe: Some(MoeSpec {
                experts: 8,
                top_k: 2,
                capacity_factor: 1.25,
                every: 2,
            }),
            ..dense.clone()
        };
        let ffn = 2.0 * 768.0 * 3072.0 + 3072.0 + 768.0;
        let extra = 6.0 * (7.0 * ffn + 768.0 * 8.0);
        assert!((moe.params() - dense.params() - extra).abs() < 1.0);
        assert!((moe.active_params() - (dense.params() + 6.0 * (ffn + 768.0 * 8.0))).abs() < 1.0);
    }
}
