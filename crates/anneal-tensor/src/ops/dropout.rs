//! Seeded dropout (Srivastava et al. 2014). The mask is a pure function of (seed, element index),
//! so backward regenerates it instead of storing it, results do not depend on thread count, and a
//! recomputed (checkpointed) segment drops exactly the same elements.

use rayon::prelude::*;

use crate::autograd::Backward;
use crate::error::{invalid, Result};
use crate::Tensor;

/// A well-mixed 64-bit hash of (seed, index): SplitMix64's finaliser (Steele et al. 2014).
#[inline]
pub(crate) fn mix(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Keep-scale of element `i`: 0 if dropped, 1/(1−p) if kept.
#[inline]
fn keep(seed: u64, i: usize, p: f32) -> f32 {
    let u = (mix(seed, i as u64) >> 40) as f32 / (1u64 << 24) as f32;
    if u < p {
        0.0
    } else {
        1.0 / (1.0 - p)
    }
}

fn apply(x: &[f32], seed: u64, p: f32) -> Vec<f32> {
    let mut out = crate::pool::uninit(x.len());
    out.par_chunks_mut(1 << 14).enumerate().for_each(|(c, o)| {
        let base = c << 14;
        for (j, o) in o.iter_mut().enumerate() {
            *o = x[base + j] * keep(seed, base + j, p);
        }
    });
    out
}

struct DropoutBackward {
    seed: u64,
    p: f32,
}

impl Backward for DropoutBackward {
    fn name(&self) -> &'static str {
        "dropout"
    }
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let dx = grad.with_f32(|g| apply(g, self.seed, self.p));
        Ok(vec![Some(Tensor::from_f32_unchecked(dx, grad.shape()))])
    }
}

impl Tensor {
    /// Zeroes each element with probability `p` and scales the rest by 1/(1−p). `p = 0` is the
    /// identity. The same `seed` drops the same elements.
    pub fn dropout(&self, p: f32, seed: u64) -> Result<Tensor> {
        if !(0.0..1.0).contains(&p) {
            return Err(invalid("dropout", format!("p = {p} must be in [0, 1)")));
        }
        if p == 0.0 {
            return Ok(self.clone());
        }
        let out = self.with_f32(|x| apply(x, seed, p));
        let value = Tensor::from_f32_as(out, self.shape(), self.dtype());
        Ok(Tensor::from_op(value, &[self], DropoutBackward { seed, p }))
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::{assert_grads, randn};

    #[test]
    fn dropout_is_seeded_and_scaled() {
        let x = crate::Tensor::ones(&[10000], crate::DType::F32);
        let a = x.dropout(0.25, 9).unwrap().to_vec_f32();
        assert_eq!(a, x.dropout(0.25, 9).unwrap().to_vec_f32());
        assert_ne!(a, x.dropout(0.25, 10).unwrap().to_vec_f32());
        let dropped = a.iter().filter(|&&v| v == 0.0).count() as f32 / 10000.0;
        assert!((dropped - 0.25).abs() < 0.02, "{dropped}");
        assert!(a.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        assert_grads(|t| t[0].dropout(0.5, 3), &[randn(&[4, 5], 1)]);
    }
}
