//! The position-wise feed-forward network of a transformer block: GELU between two projections
//! (GPT-2, BERT), or SiLU-gated (Shazeer 2020, "GLU Variants Improve Transformer"; Llama).

use super::{join, Builder, Linear, LinearOptions, LinearSplit, WeightLayout, Weights};
use anneal_tensor::{ParamId, Result, Tensor};

/// Which feed-forward network, with its projections' names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MlpKind {
    /// `proj(gelu_tanh(fc(x)))` (GPT-2: `c_fc`, `c_proj`).
    Gelu {
        /// The widening projection.
        fc: &'static str,
        /// The narrowing projection.
        proj: &'static str,
    },
    /// `proj(gelu(fc(x)))` with the exact, erf-based GELU (BERT: `intermediate.dense`,
    /// `output.dense`).
    GeluErf {
        /// The widening projection.
        fc: &'static str,
        /// The narrowing projection.
        proj: &'static str,
    },
    /// `down(silu(gate(x)) · up(x))` (Llama: `gate_proj`, `up_proj`, `down_proj`).
    GatedSilu {
        /// The gate projection.
        gate: &'static str,
        /// The up projection.
        up: &'static str,
        /// The down projection.
        down: &'static str,
    },
}

/// A feed-forward network.
#[derive(Clone, Debug)]
pub struct Mlp {
    fc: Linear,
    up: Option<Linear>,
    proj: Linear,
    /// The erf GELU rather than its tanh approximation (ungated networks).
    exact_gelu: bool,
}

impl Mlp {
    /// Declares the projections of a `d → hidden → d` network under `prefix`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        b: &mut Builder,
        prefix: &str,
        d: usize,
        hidden: usize,
        kind: MlpKind,
        bias: bool,
        layout: WeightLayout,
        std: f32,
        proj_std: f32,
    ) -> Result<Mlp> {
        let (_, tp) = b.parallel().tensor_parallel();
        if !hidden.is_multiple_of(tp) {
            return Err(anneal_tensor::Error::Invalid {
                op: "Mlp::new",
                reason: format!(
                    "{hidden} hidden units do not split over {tp} tensor-parallel ranks; use a \
                     multiple of {tp}"
                ),
            });
        }
        let (column, row) = if tp > 1 {
            (LinearSplit::Column, LinearSplit::Row)
        } else {
            (LinearSplit::None, LinearSplit::None)
        };
        let opts = |std, split| LinearOptions {
            bias,
            std,
            layout,
            split,
        };
        let (fc, up, proj) = match kind {
            MlpKind::Gelu { fc, proj } | MlpKind::GeluErf { fc, proj } => (fc, None, proj),
            MlpKind::GatedSilu { gate, up, down } => (gate, Some(up), down),
        };
        Ok(Mlp {
            fc: Linear::new(b, &join(prefix, fc), d, hidden, opts(std, column))?,
            up: up
                .map(|up| Linear::new(b, &join(prefix, up), d, hidden, opts(std, column)))
                .transpose()?,
            proj: Linear::new(b, &join(prefix, proj), hidden, d, opts(proj_std, row))?,
            exact_gelu: matches!(kind, MlpKind::GeluErf { .. }),
        })
    }

    /// Its linear layers, input side first.
    pub fn linears(&self) -> Vec<&Linear> {
        std::iter::once(&self.fc)
            .chain(self.up.as_ref())
            .chain(std::iter::once(&self.proj))
            .collect()
    }

    /// Every parameter id of the layer.
    pub fn params(&self) -> Vec<ParamId> {
        let mut out = self.fc.params();
        if let Some(up) = &self.up {
            out.extend(up.params());
        }
        out.extend(self.proj.params());
        out
    }

    /// The network on `x` `[…, d]`.
    pub fn forward(&self, w: &Weights, x: &Tensor) -> Result<Tensor> {
        match &self.up {
            None => self
                .proj
                .forward_gelu(w, &self.fc.forward(w, x)?, self.exact_gelu),
            Some(up) => {
                let h = self.fc.forward(w, x)?.silu().mul(&up.forward(w, x)?)?;
                self.proj.forward(w, &h)
            }
        }
    }
}
