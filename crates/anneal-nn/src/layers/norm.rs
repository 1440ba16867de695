//! Normalisation layers over the last axis: LayerNorm (Ba et al. 2016; GPT-2, BERT) and RMSNorm
//! (Zhang & Sennrich 2019; Llama).

use super::{join, Builder, Init, Weights};
use anneal_tensor::{ParamId, Result, Tensor};

/// `(x − mean) / √(var + eps) · weight + bias`.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: ParamId,
    bias: Option<ParamId>,
    eps: f32,
}

impl LayerNorm {
    /// Declares `prefix.weight` (ones) and, with `bias`, `prefix.bias` (zeros); neither decayed.
    pub fn new(b: &mut Builder, prefix: &str, dim: usize, bias: bool, eps: f32) -> Result<Self> {
        let weight = b.vector(&join(prefix, "weight"), dim, Init::Ones)?;
        let bias = bias
            .then(|| b.vector(&join(prefix, "bias"), dim, Init::Zeros))
            .transpose()?;
        Ok(LayerNorm { weight, bias, eps })
    }

    /// Every parameter id of the layer.
    pub fn params(&self) -> Vec<ParamId> {
        std::iter::once(self.weight).chain(self.bias).collect()
    }

    /// Normalises `x` over its last axis.
    pub fn forward(&self, w: &Weights, x: &Tensor) -> Result<Tensor> {
        let bias = self.bias.map(|id| w.get(id)).transpose()?;
        x.layer_norm(&w.get(self.weight)?, bias.as_ref(), self.eps)
    }
}

/// `x / √(mean(x²) + eps) · weight`.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: ParamId,
    eps: f32,
}

impl RmsNorm {
    /// Declares `prefix.weight` (ones, not decayed).
    pub fn new(b: &mut Builder, prefix: &str, dim: usize, eps: f32) -> Result<Self> {
        let weight = b.vector(&join(prefix, "weight"), dim, Init::Ones)?;
        Ok(RmsNorm { weight, eps })
    }

    /// Every parameter id of the layer.
    pub fn params(&self) -> Vec<ParamId> {
        vec![self.weight]
    }

    /// Normalises `x` over its last axis.
    pub fn forward(&self, w: &Weights, x: &Tensor) -> Result<Tensor> {
        x.rms_norm(&w.get(self.weight)?, self.eps)
    }
}

/// Which normalisation a block uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NormKind {
    /// LayerNorm, with or without a bias.
    Layer {
        /// Whether it has a bias.
        bias: bool,
    },
    /// RMSNorm.
    Rms,
}

/// A LayerNorm or an RMSNorm.
#[derive(Clone, Debug)]
pub enum Norm {
    /// LayerNorm.
    Layer(LayerNorm),
    /// RMSNorm.
    Rms(RmsNorm),
}

impl Norm {
    /// Declares a norm of `kind` under `prefix`.
    pub fn new(
        b: &mut Builder,
        prefix: &str,
        dim: usize,
        kind: NormKind,
        eps: f32,
    ) -> Result<Self> {
        Ok(match kind {
            NormKind::Layer { bias } => Norm::Layer(LayerNorm::new(b, prefix, dim, bias, eps)?),
            NormKind::Rms => Norm::Rms(RmsNorm::new(b, prefix, dim, eps)?),
        })
    }

    /// Every parameter id of the layer.
    pub fn params(&self) -> Vec<ParamId> {
        match self {
            Norm::Layer(n) => n.params(),
            Norm::Rms(n) => n.params(),
        }
    }

    /// Normalises `x` over its last axis.
    pub fn forward(&self, w: &Weights, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Layer(n) => n.forward(w, x),
            Norm::Rms(n) => n.forward(w, x),
        }
    }
}
