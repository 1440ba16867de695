//! A fully connected classifier pretrained greedily, layer by layer, as a stack of
//! autoencoders: the "deep belief network" row of history (Hinton, Osindero & Teh 2006; with
//! autoencoders in place of RBMs, as Bengio, Lamblin, Popovici & Larochelle 2007, "Greedy
//! Layer-Wise Training of Deep Networks", and Hinton & Salakhutdinov 2006):
//!
//! ```text
//! x [B, 784] → σ(layer 0) → σ(layer 1) → … → head → class logits
//! stage l: h_l = codes of the frozen layers below; train layer l and its linear decoder on
//!          mean ‖decoder l (σ(layer l (h_l))) − h_l‖²  (a linear decoder, as the pixels come
//!          standardised, not in [0, 1])
//! then:    fine-tune every layer and the head with back-propagation on the labels
//! ```
//!
//! Sigmoid units throughout, as in those papers. Parameter names: `layers.i`, `decoders.i`,
//! `head`.

use crate::layers::{Builder, Linear, LinearOptions, WeightLayout, Weights};
use anneal_tensor::{DType, ParamStore, Result, Tensor};

/// A stacked-autoencoder classifier and its parameters.
pub struct StackedAutoencoder {
    /// Widths: input, then each hidden layer.
    pub widths: Vec<usize>,
    /// Its parameters.
    pub params: ParamStore,
    parallel: std::sync::Arc<dyn crate::layers::ParallelContext>,
    layers: Vec<Linear>,
    decoders: Vec<Linear>,
    head: Linear,
}

impl StackedAutoencoder {
    /// A freshly initialised network of `widths` (input first, e.g. `[784, 500, 250, 100]`)
    /// with a head over `classes` (Normal(0, 1/fan_in) weights, zero biases). Fails without a
    /// hidden layer.
    pub fn new(widths: &[usize], classes: usize, seed: u64) -> Result<StackedAutoencoder> {
        if widths.len() < 2 || widths.contains(&0) || classes == 0 {
            return Err(anneal_tensor::Error::Invalid {
                op: "StackedAutoencoder",
                reason: format!(
                    "widths {widths:?} and {classes} classes: needs an input width, one or more \
                     hidden widths and classes, none zero"
                ),
            });
        }
        let mut b = Builder::new(seed);
        let opts = |fan_in: usize| LinearOptions {
            std: (1.0 / fan_in as f32).sqrt(),
            layout: WeightLayout::OutIn,
            ..LinearOptions::default()
        };
        let mut layers = Vec::new();
        let mut decoders = Vec::new();
        for (i, pair) in widths.windows(2).enumerate() {
            layers.push(Linear::new(
                &mut b,
                &format!("layers.{i}"),
                pair[0],
                pair[1],
                opts(pair[0]),
            )?);
            decoders.push(Linear::new(
                &mut b,
                &format!("decoders.{i}"),
                pair[1],
                pair[0],
                opts(pair[1]),
            )?);
        }
        let last = *widths.last().expect("checked above");
        let head = Linear::new(&mut b, "head", last, classes, opts(last))?;
        let (params, parallel) = b.build(DType::F32);
        Ok(StackedAutoencoder {
            widths: widths.to_vec(),
            params,
            parallel,
            layers,
            decoders,
            head,
        })
    }

    fn weights(&self) -> Weights {
        Weights::new(&self.params, self.parallel.clone())
    }

    /// Hidden layers.
    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// The codes of layer `upto` − 1 (the input itself for 0) of inputs `[B, widths[0]]`.
    pub fn codes(&self, x: &Tensor, upto: usize) -> Result<Tensor> {
        let w = &self.weights();
        let mut h = x.clone();
        for layer in &self.layers[..upto.min(self.layers.len())] {
            h = layer.forward(w, &h)?.sigmoid();
        }
        Ok(h)
    }

    /// Stage `layer`'s reconstruction of its input, and that input (`[B, widths[layer]]`, from
    /// the layers below, without gradient).
    pub fn reconstruct(&self, x: &Tensor, layer: usize) -> Result<(Tensor, Tensor)> {
        if layer >= self.layers.len() {
            return Err(anneal_tensor::Error::Invalid {
                op: "StackedAutoencoder::reconstruct",
                reason: format!("layer {layer} of a network of {} layers", self.layers.len()),
            });
        }
        let w = &self.weights();
        let input = anneal_tensor::no_grad(|| self.codes(x, layer))?;
        let code = self.layers[layer].forward(w, &input)?.sigmoid();
        let out = self.decoders[layer].forward(w, &code)?;
        Ok((out, input))
    }

    /// Class logits of inputs `[B, widths[0]]`.
    pub fn classify(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.codes(x, self.layers.len())?;
        self.head.forward(&self.weights(), &h)
    }

    /// Training FLOPs per example of the classifier (6 × its weights).
    pub fn flops_per_example(&self) -> f64 {
        let hidden: usize = self.widths.windows(2).map(|p| p[0] * p[1]).sum();
        6.0 * hidden as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_reconstruct_their_own_input_and_train_only_their_layer() {
        let mut net = StackedAutoencoder::new(&[12, 8, 4], 3, 0).unwrap();
        let x = Tensor::rand_uniform(
            &[5, 12],
            0.0,
            1.0,
            DType::F32,
            &mut anneal_tensor::Rng::new(1),
        );
        assert_eq!(net.classify(&x).unwrap().shape(), [5, 3]);
        let (out, input) = net.reconstruct(&x, 1).unwrap();
        assert_eq!((out.shape(), input.shape()), (&[5, 8][..], &[5, 8][..]));
        // Stage 1 with the rest frozen: only layer 1 and decoder 1 take gradients.
        net.params
            .train_only(|n| n.starts_with("layers.1") || n.starts_with("decoders.1"));
        let (out, input) = net.reconstruct(&x, 1).unwrap();
        let d = out.sub(&input).unwrap();
        d.mul(&d).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(net.params.grad_norm() > 0.0);
        assert!(net.reconstruct(&x, 2).is_err());
        assert!(StackedAutoencoder::new(&[12], 3, 0).is_err());
    }
}
