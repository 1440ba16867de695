//! Bytes per device.
//!
//! **Model states** (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
//! Trillion Parameter Models", §3.1 and Figure 1). Mixed-precision Adam keeps 2Ψ bytes of 16-bit
//! parameters, 2Ψ of 16-bit gradients and KΨ = 12Ψ of optimizer state (fp32 master weights,
//! momentum and variance). With a sharding degree N:
//!
//! ```text
//! stage 0: (2 + 2 + K)·Ψ          stage 1: (2 + 2)·Ψ + K·Ψ/N
//! stage 2: 2Ψ + (2 + K)·Ψ/N        stage 3: (2 + 2 + K)·Ψ/N
//! ```
//!
//! Pure fp32 training keeps 4Ψ + 4Ψ + 8Ψ (no master copy), the same 16Ψ in total.
//!
//! **Activations** of one transformer layer for a micro-batch of b sequences, in bytes with
//! 16-bit activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
//! Transformer Models", Table 2), with t-way tensor parallelism and sequence parallelism:
//!
//! ```text
//! no recomputation:      s·b·h·(34/t + 5·a·s/(h·t))
//! selective:             s·b·h·34/t
//! full:                  2·s·b·h/t           (the layer's input only)
//! ```
//!
//! With a pipeline of p stages under 1F1B, the first stage holds p micro-batches in flight, so
//! each device holds the activations of l/p layers × p micro-batches = l layers' worth; GPipe
//! holds all m micro-batches.

use crate::flops::Recompute;
use crate::ModelSpec;
use serde::{Deserialize, Serialize};

/// How parameters, gradients and optimizer states are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DtypePolicy {
    /// Everything in fp32.
    Fp32,
    /// bf16 parameters and gradients, fp32 master weights and Adam moments.
    Bf16,
    /// fp16 parameters and gradients (with loss scaling), fp32 master weights and Adam moments.
    Fp16,
}

impl DtypePolicy {
    /// (parameter, gradient, optimizer) bytes per parameter.
    pub fn bytes(self) -> (f64, f64, f64) {
        match self {
            DtypePolicy::Fp32 => (4.0, 4.0, 8.0),
            DtypePolicy::Bf16 | DtypePolicy::Fp16 => (2.0, 2.0, 12.0),
        }
    }

    /// Bytes of one activation element.
    pub fn activation_bytes(self) -> f64 {
        match self {
            DtypePolicy::Fp32 => 4.0,
            _ => 2.0,
        }
    }
}

/// Model-state bytes per device, split as ZeRO accounts them.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelStates {
    /// Parameters.
    pub params: f64,
    /// Gradients.
    pub grads: f64,
    /// Optimizer states (master weights and moments).
    pub optimizer: f64,
}

impl ModelStates {
    /// Their sum.
    pub fn total(&self) -> f64 {
        self.params + self.grads + self.optimizer
    }
}

/// Model states per device for `psi` parameters held by the device's model-parallel group, under
/// ZeRO `stage` with sharding degree `n`.
pub fn model_states(psi: f64, policy: DtypePolicy, stage: u8, n: usize) -> ModelStates {
    let (p, g, o) = policy.bytes();
    let n = n.max(1) as f64;
    let (ps, gs, os) = match stage {
        0 => (1.0, 1.0, 1.0),
        1 => (1.0, 1.0, n),
        2 => (1.0, n, n),
        _ => (n, n, n),
    };
    ModelStates {
        params: p * psi / ps,
        grads: g * psi / gs,
        optimizer: o * psi / os,
    }
}

/// Activation bytes of one layer for a micro-batch of `micro_batch` sequences with `tp`-way
/// tensor (and sequence) parallelism.
pub fn layer_activations(
    m: &ModelSpec,
    micro_batch: usize,
    tp: usize,
    recompute: Recompute,
    policy: DtypePolicy,
) -> f64 {
    let (s, b, h, a, t) = (
        m.seq as f64,
        micro_batch as f64,
        m.hidden as f64,
        m.heads as f64,
        tp.max(1) as f64,
    );
    // Korthikanti's constants count 2-byte activations; scale for fp32.
    let scale = policy.activation_bytes() / 2.0;
    scale
        * match recompute {
            Recompute::None => s * b * h * (34.0 / t + 5.0 * a * s / (h * t)),
            Recompute::Selective => s * b * h * 34.0 / t,
            Recompute::Full => 2.0 * s * b * h / t,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ZeRO paper's example: a 7.5B-parameter model with mixed-precision Adam on 64 GPUs
    /// needs 120 GB per device without sharding and 1.9 GB with stage 3.
    #[test]
    fn zero_paper_figures() {
        let psi = 7.5e9;
        let gb = |s: ModelStates| s.total() / 1e9;
        assert!((gb(model_states(psi, DtypePolicy::Bf16, 0, 64)) - 120.0).abs() < 1e-9);
        assert!((gb(model_states(psi, DtypePolicy::Bf16, 3, 64)) - 1.875).abs() < 1e-9);
        for n in [2usize, 8, 64, 1024] {
            let nf = n as f64;
            let s1 = model_states(psi, DtypePolicy::Fp16, 1, n).total();
            let s2 = model_states(psi, DtypePolicy::Fp16, 2, n).total();
            assert!((s1 - (4.0 * psi + 12.0 * psi / nf)).abs() < 1.0);
            assert!((s2 - (2.0 * psi + 14.0 * psi / nf)).abs() < 1.0);
        }
        // The paper's Figure 1 row for N = 64: stage 1 31.4 GB, stage 2 16.6 GB.
        assert!((gb(model_states(psi, DtypePolicy::Bf16, 1, 64)) - 31.4).abs() < 0.05);
        assert!((gb(model_states(psi, DtypePolicy::Bf16, 2, 64)) - 16.6).abs() < 0.05);
    }

    #[test]
    fn more_devices_never_increase_zero3_model_states() {
        let mut last = f64::INFINITY;
        for n in 1..=512 {
            let s = model_states(1e9, DtypePolicy::Bf16, 3, n).total();
            assert!(s <= last);
            last = s;
        }
    }

    /// Korthikanti et al. 2022, Table 2 and §5: recomputation shrinks activations in this order.
    #[test]
    fn activation_memory_ordering() {
        let m = ModelSpec::gpt(96, 12288, 96, 51200, 2048);
        let act = |r, t| layer_activations(&m, 1, t, r, DtypePolicy::Bf16);
        assert!(act(Recompute::None, 8) > act(Recompute::Selective, 8));
        assert!(act(Recompute::Selective, 8) > act(Recompute::Full, 8));
        assert!((act(Recompute::None, 1) / act(Recompute::None, 8) - 8.0).abs() < 1e-9);
        // s·b·h·(34 + 5as/h) bytes for one GPT-3 layer with b = 1: 2048·12288·(34 + 5·96·2048/12288).
        let expect = 2048.0 * 12288.0 * (34.0 + 5.0 * 96.0 * 2048.0 / 12288.0);
        assert!((act(Recompute::None, 1) - expect).abs() < 1.0);
    }
}
