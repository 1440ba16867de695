//! A 2-D convolution layer over NCHW images.

use super::{join, Builder, Init, Split, Weights};
use anneal_tensor::{ParamId, Result, Tensor};

/// `y = conv2d(x, W) + b` with a square kernel, stride and zero padding; weight
/// `[out, in, k, k]` (PyTorch's `Conv2d` layout and names).
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: ParamId,
    bias: Option<ParamId>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// Declares `prefix.weight` (He initialisation, Normal(0, 2/fan_in); He et al. 2015) and,
    /// with `bias`, `prefix.bias` (zeros).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        b: &mut Builder,
        prefix: &str,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    ) -> Result<Conv2d> {
        let fan_in = in_channels * kernel * kernel;
        let weight = b.param(
            &join(prefix, "weight"),
            &[out_channels, in_channels, kernel, kernel],
            Init::Normal((2.0 / fan_in as f32).sqrt()),
            true,
            Split::Replicated,
        )?;
        let bias = if bias {
            Some(b.vector(&join(prefix, "bias"), out_channels, Init::Zeros)?)
        } else {
            None
        };
        Ok(Conv2d {
            weight,
            bias,
            stride,
            padding,
        })
    }

    /// Every parameter id of the layer.
    pub fn params(&self) -> Vec<ParamId> {
        std::iter::once(self.weight).chain(self.bias).collect()
    }

    /// The convolution of `x` `[N, in, H, W]`: `[N, out, H', W']`.
    pub fn forward(&self, w: &Weights, x: &Tensor) -> Result<Tensor> {
        let bias = self.bias.map(|id| w.get(id)).transpose()?;
        x.conv2d(
            &w.get(self.weight)?,
            bias.as_ref(),
            self.stride,
            self.padding,
        )
    }
}
