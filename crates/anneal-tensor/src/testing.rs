//! Test helpers: finite-difference gradient checks and tolerance comparisons, public so that
//! crates defining custom ops test them the same way.

use crate::error::{invalid, Result};
use crate::{no_grad, DType, Rng, Tensor};

/// Tolerances of [`gradcheck`]: an analytic gradient `a` passes against the numeric `n` when
/// |a − n| ≤ `atol` + `rtol`·|n|.
#[derive(Clone, Copy, Debug)]
pub struct GradTolerance {
    /// Finite-difference step.
    pub eps: f32,
    /// Absolute tolerance.
    pub atol: f32,
    /// Relative tolerance.
    pub rtol: f32,
}

impl Default for GradTolerance {
    /// Central differences in f32 with step 1e-2: truncation error O(eps²) and rounding error
    /// O(ulp/eps) make about 1e-3 relative agreement the expectation for smooth ops, so the
    /// default bound is 2e-3 absolute plus 1e-2 relative.
    fn default() -> Self {
        GradTolerance {
            eps: 1e-2,
            atol: 2e-3,
            rtol: 1e-2,
        }
    }
}

/// Checks the gradients `f` computes for every element of every input in `check` against central
/// finite differences of L = Σ f(inputs)·w, w a fixed random tensor. Inputs not in `check` are
/// passed as constants.
pub fn gradcheck(
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    check: &[usize],
    tol: GradTolerance,
) -> Result<()> {
    let leaves: Vec<Tensor> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if check.contains(&i) {
                t.requires_grad_()
            } else {
                t.detach()
            }
        })
        .collect();
    let y = f(&leaves)?;
    let w = Tensor::randn(y.shape(), 1.0, DType::F32, &mut Rng::new(1234));
    let wv = w.to_vec_f32();
    let loss = y.to_dtype(DType::F32).mul(&w)?.sum_all()?;
    loss.backward()?;
    let objective = |xs: &[Tensor]| -> Result<f64> {
        let y = no_grad(|| f(xs))?;
        Ok(y.to_vec_f32()
            .iter()
            .zip(&wv)
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum())
    };
    for &i in check {
        let analytic = leaves[i].grad().expect("leaf").to_vec_f32();
        let base = inputs[i].to_vec_f32();
        for j in 0..base.len() {
            let mut plus = base.clone();
            plus[j] += tol.eps;
            let mut minus = base.clone();
            minus[j] -= tol.eps;
            let mut xs: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
            xs[i] = Tensor::from_f32(plus, inputs[i].shape())?.to_dtype(inputs[i].dtype());
            let lp = objective(&xs)?;
            xs[i] = Tensor::from_f32(minus, inputs[i].shape())?.to_dtype(inputs[i].dtype());
            let lm = objective(&xs)?;
            let numeric = ((lp - lm) / (2.0 * tol.eps as f64)) as f32;
            let a = analytic[j];
            if (a - numeric).abs() > tol.atol + tol.rtol * numeric.abs() {
                return Err(invalid(
                    "gradcheck",
                    format!("input {i} element {j}: analytic {a} vs numeric {numeric}"),
                ));
            }
        }
    }
    Ok(())
}

/// Norm-wise relative error ‖a − b‖∞ / ‖b‖∞ of `a` against the reference `b`, the measure the
/// golden tests bound.
pub fn rel_err_inf(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    diff / b.iter().map(|y| y.abs()).fold(0.0, f32::max).max(1e-30)
}

/// Median wall time of `f` in seconds over `reps` runs after `warmup` untimed ones, for the
/// timing examples.
pub fn median_seconds(warmup: usize, reps: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        f();
    }
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t0 = std::time::Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}

/// A standard-normal f32 tensor from `seed`, for tests.
pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, 1.0, DType::F32, &mut Rng::new(seed))
}

/// Checks every input's gradient with the default tolerance, panicking with the failure.
pub fn assert_grads(f: impl Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor]) {
    let all: Vec<usize> = (0..inputs.len()).collect();
    if let Err(e) = gradcheck(f, inputs, &all, GradTolerance::default()) {
        panic!("{e}");
    }
}
