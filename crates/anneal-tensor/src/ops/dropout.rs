//! Seeded dropout (Srivastava et al. 2014). The mask is a pure function of (seed, element index),
//! so backward regenerates it instead of storing it, results do not depend on thread count, and a
//! recomputed (checkpointed) segment drops exactly the same elements.
//!
//! The index can be global: a tensor holding rows `first_row..` of a larger batch (one rank's
//! share under data parallelism, one micro-batch of an accumulated step) numbers its elements from
//! where those rows start in the whole batch ([`Tensor::dropout_at`]), so however a batch is cut
//! into shares and micro-batches, the same elements are dropped.

use rayon::prelude::*;

use crate::autograd::Backward;
use crate::error::{invalid, Result};
use crate::Tensor;

/// A well-mixed 64-bit hash of (seed, index): SplitMix64's finaliser (Steele et al. 2014).
#[inline(always)]
pub(crate) fn mix(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Keep-scale of element `i`: 0 if dropped, 1/(1−p) if kept.
#[inline(always)]
fn keep(seed: u64, i: usize, p: f32) -> f32 {
    // The top 24 bits, through i32 (exact below 2²⁴) so that the conversion vectorises.
    let u = ((mix(seed, i as u64) >> 40) as i32) as f32 / (1u64 << 24) as f32;
    if u < p {
        0.0
    } else {
        1.0 / (1.0 - p)
    }
}

/// Where a dropout's masks come from: a seed, and the first row (along the leading dimension) of
/// the whole batch that the tensor holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropoutKey {
    /// The masks' seed.
    pub seed: u64,
    /// The tensor's first row in the whole batch.
    pub first_row: u64,
}

impl From<u64> for DropoutKey {
    /// A key for a whole batch.
    fn from(seed: u64) -> DropoutKey {
        DropoutKey { seed, first_row: 0 }
    }
}

impl DropoutKey {
    /// The same rows under another seed (each dropout site of a model its own).
    pub fn with_seed(self, seed: u64) -> DropoutKey {
        DropoutKey { seed, ..self }
    }
}

fn apply(x: &[f32], seed: u64, first: usize, p: f32) -> Vec<f32> {
    const CHUNK: usize = 1 << 14;
    let mut out = crate::pool::uninit(x.len());
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(c, (o, x))| {
            let base = first + c * CHUNK;
            crate::kernels::vectorized(|| {
                for (j, (o, &x)) in o.iter_mut().zip(x).enumerate() {
                    *o = x * keep(seed, base + j, p);
                }
            })
        });
    out
}

struct DropoutBackward {
    seed: u64,
    first: usize,
    p: f32,
}

impl Backward for DropoutBackward {
    fn name(&self) -> &'static str {
        "dropout"
    }
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let dx = grad.with_f32(|g| apply(g, self.seed, self.first, self.p));
        Ok(vec![Some(Tensor::from_f32_unchecked(dx, grad.shape()))])
    }
}

impl Tensor {
    /// Zeroes each element with probability `p` and scales the rest by 1/(1−p). `p = 0` is the
    /// identity. The same `seed` drops the same elements.
    pub fn dropout(&self, p: f32, seed: u64) -> Result<Tensor> {
        self.dropout_at(p, seed.into())
    }

    /// [`Tensor::dropout`] of a tensor holding rows `key.first_row..` of a larger batch: element
    /// i's mask is that of element `first_row · (numel / rows) + i` of the whole batch.
    pub fn dropout_at(&self, p: f32, key: DropoutKey) -> Result<Tensor> {
        if !(0.0..1.0).contains(&p) {
            return Err(invalid("dropout", format!("p = {p} must be in [0, 1)")));
        }
        if p == 0.0 {
            return Ok(self.clone());
        }
        let rows = self.shape().first().copied().unwrap_or(1).max(1);
        let first = (key.first_row as usize).saturating_mul(self.numel() / rows);
        let seed = key.seed;
        let out = self.with_f32(|x| apply(x, seed, first, p));
        let value = Tensor::from_f32_as(out, self.shape(), self.dtype());
        Ok(Tensor::from_op(
            value,
            &[self],
            DropoutBackward { seed, first, p },
        ))
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

    #[test]
    fn rows_of_a_batch_drop_what_the_whole_batch_drops() {
        let x = randn(&[6, 3, 4], 2);
        let key = |first_row| super::DropoutKey { seed: 7, first_row };
        let whole = x.dropout_at(0.3, key(0)).unwrap().to_vec_f32();
        let values = x.to_vec_f32();
        for (first, rows) in [(0usize, 2usize), (2, 3), (5, 1)] {
            let part = crate::Tensor::from_f32(
                values[first * 12..(first + rows) * 12].to_vec(),
                &[rows, 3, 4],
            )
            .unwrap();
            let got = part
                .dropout_at(0.3, key(first as u64))
                .unwrap()
                .to_vec_f32();
            assert_eq!(got, whole[first * 12..(first + rows) * 12]);
        }
        assert_grads(|t| t[0].dropout_at(0.5, key(3)), &[randn(&[2, 5], 4)]);
    }
}
