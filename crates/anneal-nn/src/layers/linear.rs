//! A fully connected layer, `y = x·W + b`, optionally split across the tensor-parallel group by
//! output columns or input rows (Megatron-LM's column- and row-parallel linear layers).

use super::{join, Builder, Init, Split, Weights};
use anneal_tensor::{ParamId, Result, Tensor};

/// How a checkpoint stores the weight matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WeightLayout {
    /// `[in, out]`: Hugging Face GPT-2's `Conv1D`.
    #[default]
    InOut,
    /// `[out, in]`: PyTorch's `nn.Linear` (BERT, Llama).
    OutIn,
}

/// How a linear layer is split across the tensor-parallel group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LinearSplit {
    /// Every rank holds the whole layer.
    #[default]
    None,
    /// Each rank holds a slice of the output columns (and of the bias); its output is that
    /// slice.
    Column,
    /// Each rank holds a slice of the input rows and takes the matching slice of the input; the
    /// partial outputs are summed across ranks before the (whole) bias is added.
    Row,
}

/// Options of [`Linear::new`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearOptions {
    /// Whether the layer has a bias.
    pub bias: bool,
    /// Standard deviation of the weights' normal initialisation.
    pub std: f32,
    /// How the checkpoint stores the weight.
    pub layout: WeightLayout,
    /// Tensor-parallel split.
    pub split: LinearSplit,
}

impl Default for LinearOptions {
    fn default() -> Self {
        LinearOptions {
            bias: true,
            std: 0.02,
            layout: WeightLayout::InOut,
            split: LinearSplit::None,
        }
    }
}

/// `y = x·W + b` over the last axis.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: ParamId,
    bias: Option<ParamId>,
    layout: WeightLayout,
    split: LinearSplit,
}

impl Linear {
    /// Declares `prefix.weight` (decayed) and, with `opts.bias`, `prefix.bias` (zeros, not
    /// decayed) for a map from `fan_in` to `fan_out` features.
    pub fn new(
        b: &mut Builder,
        prefix: &str,
        fan_in: usize,
        fan_out: usize,
        opts: LinearOptions,
    ) -> Result<Linear> {
        let (shape, out_axis) = match opts.layout {
            WeightLayout::InOut => ([fan_in, fan_out], 1),
            WeightLayout::OutIn => ([fan_out, fan_in], 0),
        };
        let (weight_split, bias_split) = match opts.split {
            LinearSplit::None => (Split::Replicated, Split::Replicated),
            LinearSplit::Column => (Split::Axis(out_axis), Split::Axis(0)),
            LinearSplit::Row => (Split::Axis(1 - out_axis), Split::Replicated),
        };
        let weight = b.param(
            &join(prefix, "weight"),
            &shape,
            Init::Normal(opts.std),
            true,
            weight_split,
        )?;
        let bias = if opts.bias {
            Some(b.param(
                &join(prefix, "bias"),
                &[fan_out],
                Init::Zeros,
                false,
                bias_split,
            )?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            layout: opts.layout,
            split: opts.split,
        })
    }

    /// The weight's id.
    pub fn weight(&self) -> ParamId {
        self.weight
    }

    /// The bias's id, if the layer has one.
    pub fn bias(&self) -> Option<ParamId> {
        self.bias
    }

    /// Every parameter id of the layer.
    pub fn params(&self) -> Vec<ParamId> {
        std::iter::once(self.weight).chain(self.bias).collect()
    }

    /// `x·W + b` for `x` of shape `[…, in]`.
    pub fn forward(&self, w: &Weights, x: &Tensor) -> Result<Tensor> {
        let weight = w.get(self.weight)?;
        let weight = match self.layout {
            WeightLayout::InOut => weight,
            WeightLayout::OutIn => weight.transpose(0, 1)?,
        };
        let bias = self.bias.map(|id| w.get(id)).transpose()?;
        match self.split {
            LinearSplit::None => x.linear(&weight, bias.as_ref()),
            LinearSplit::Column => w
                .parallel()
                .enter_parallel(x)?
                .linear(&weight, bias.as_ref()),
            LinearSplit::Row => {
                let y = w.parallel().reduce_parallel(&x.linear(&weight, None)?)?;
                match bias {
                    Some(b) => y.add(&b),
                    None => Ok(y),
                }
            }
        }
    }
}
