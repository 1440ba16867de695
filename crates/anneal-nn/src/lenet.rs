//! LeNet-5 (LeCun, Bottou, Bengio & Haffner 1998, "Gradient-based learning applied to document
//! recognition"), the supervised convolutional baseline, as modern re-implementations write it:
//!
//! ```text
//! image [B, 1, 28, 28]
//!   → conv1 5×5, 6 maps, padding 2 (the paper's 32×32 input) → ReLU → 2×2 max pool  [B, 6, 14, 14]
//!   → conv2 5×5, 16 maps                                     → ReLU → 2×2 max pool  [B, 16, 5, 5]
//!   → fc1 400→120 → ReLU → fc2 120→84 → ReLU                 (the features)         [B, 84]
//!   → head 84→classes                                                                [B, classes]
//! ```
//!
//! Where the paper used scaled tanh units, trainable sub-sampling (average pooling with a
//! weight and bias), a partial C3 connection table and RBF outputs, this model uses ReLU, max
//! pooling, a full C3 and a linear head: the choices of the PyTorch and Keras versions users
//! compare against. Parameter names follow PyTorch (`conv1.weight`, `fc1.bias`, …).

use crate::layers::{Builder, Conv2d, Linear, LinearOptions, WeightLayout, Weights};
use anneal_tensor::{DType, ParamStore, Result, Tensor};

/// The shape of a LeNet-5.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeNetConfig {
    /// Input channels (1 for grey-level images).
    pub channels: usize,
    /// Input side in pixels (28: MNIST, Fashion-MNIST).
    pub side: usize,
    /// Output classes.
    pub classes: usize,
}

impl Default for LeNetConfig {
    fn default() -> Self {
        LeNetConfig {
            channels: 1,
            side: 28,
            classes: 10,
        }
    }
}

/// Width of the features the head reads.
pub const LENET_FEATURES: usize = 84;

/// A LeNet-5 and its parameters.
pub struct LeNet {
    /// Its shape.
    pub config: LeNetConfig,
    /// Its parameters.
    pub params: ParamStore,
    parallel: std::sync::Arc<dyn crate::layers::ParallelContext>,
    conv1: Conv2d,
    conv2: Conv2d,
    fc1: Linear,
    fc2: Linear,
    head: Linear,
}

impl LeNet {
    /// A freshly initialised LeNet-5 (He-initialised weights, zero biases). Fails when the
    /// input is too small for the two convolution and pooling stages.
    pub fn new(config: LeNetConfig, seed: u64) -> Result<LeNet> {
        let flat = LeNet::flat_features(&config)?;
        let mut b = Builder::new(seed);
        let conv1 = Conv2d::new(&mut b, "conv1", config.channels, 6, 5, 1, 2, true)?;
        let conv2 = Conv2d::new(&mut b, "conv2", 6, 16, 5, 1, 0, true)?;
        let he = |fan_in: usize| LinearOptions {
            std: (2.0 / fan_in as f32).sqrt(),
            layout: WeightLayout::OutIn,
            ..LinearOptions::default()
        };
        let fc1 = Linear::new(&mut b, "fc1", flat, 120, he(flat))?;
        let fc2 = Linear::new(&mut b, "fc2", 120, LENET_FEATURES, he(120))?;
        let head = Linear::new(
            &mut b,
            "head",
            LENET_FEATURES,
            config.classes,
            he(LENET_FEATURES),
        )?;
        let (params, parallel) = b.build(DType::F32);
        Ok(LeNet {
            config,
            params,
            parallel,
            conv1,
            conv2,
            fc1,
            fc2,
            head,
        })
    }

    /// What the layers read their parameters from, made anew each pass so it sees the current
    /// parameter tensors (freezing lays them out afresh).
    fn weights(&self) -> Weights {
        Weights::new(&self.params, self.parallel.clone())
    }

    /// Values entering fc1: 16 maps of ((side / 2) − 4) / 2 squared.
    fn flat_features(c: &LeNetConfig) -> Result<usize> {
        let after = (c.side / 2).checked_sub(4).map(|s| s / 2).unwrap_or(0);
        if after == 0 || c.channels == 0 || c.classes == 0 {
            return Err(anneal_tensor::Error::Invalid {
                op: "LeNet",
                reason: format!(
                    "{c:?}: LeNet-5 needs images of at least 12×12 pixels, one or more channels \
                     and classes"
                ),
            });
        }
        Ok(16 * after * after)
    }

    /// The 84 features of images `[B, channels, side, side]` (the layer before the head).
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        let w = &self.weights();
        let x = self.conv1.forward(w, images)?.relu().max_pool2d(2, 2)?;
        let x = self.conv2.forward(w, &x)?.relu().max_pool2d(2, 2)?;
        let n = x.shape()[0];
        let x = x.reshape(&[n, x.numel() / n.max(1)])?;
        let x = self.fc1.forward(w, &x)?.relu();
        Ok(self.fc2.forward(w, &x)?.relu())
    }

    /// Class logits `[B, classes]` of images `[B, channels, side, side]`.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        self.head.forward(&self.weights(), &self.features(images)?)
    }

    /// Training FLOPs per image (forward + backward ≈ 3 × forward's multiply-adds × 2).
    pub fn flops_per_image(&self) -> f64 {
        let c = &self.config;
        let s = c.side as f64;
        let conv1 = s * s * 6.0 * 25.0 * c.channels as f64;
        let half = (c.side / 2 - 4) as f64;
        let conv2 = half * half * 4.0 * 16.0 * 6.0 * 25.0;
        let fc = (16.0 * (half / 2.0).powi(2)) * 120.0 + 120.0 * 84.0 + 84.0 * c.classes as f64;
        6.0 * (conv1 + conv2 + fc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_names_and_refusals() {
        let net = LeNet::new(LeNetConfig::default(), 0).unwrap();
        let x = Tensor::zeros(&[3, 1, 28, 28], DType::F32);
        assert_eq!(net.features(&x).unwrap().shape(), [3, 84]);
        assert_eq!(net.forward(&x).unwrap().shape(), [3, 10]);
        let names: Vec<String> = net.params.infos().iter().map(|i| i.name.clone()).collect();
        assert_eq!(
            names,
            [
                "conv1.weight",
                "conv1.bias",
                "conv2.weight",
                "conv2.bias",
                "fc1.weight",
                "fc1.bias",
                "fc2.weight",
                "fc2.bias",
                "head.weight",
                "head.bias"
            ]
        );
        // 61,706 parameters, as PyTorch's LeNet-5 with a full C3 table counts them.
        assert_eq!(net.params.numel(), 61_706);
        assert_eq!(
            net.params.by_name("fc1.weight").unwrap().shape(),
            [120, 400]
        );
        let small = LeNetConfig {
            side: 8,
            ..LeNetConfig::default()
        };
        assert!(LeNet::new(small, 0).is_err());
    }
}
