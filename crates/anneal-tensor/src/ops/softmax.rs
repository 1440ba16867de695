//! Softmax, log-softmax and the fused softmax cross-entropy loss, over the last axis.

use rayon::prelude::*;

use crate::autocast::{output_dtype, Kind};
use crate::autograd::Backward;
use crate::error::{Error, Result};
use crate::Tensor;

/// Writes softmax(row) into `out`, returning the row's log-sum-exp.
#[inline]
fn softmax_row(row: &[f32], out: &mut [f32]) -> f32 {
    let max = crate::kernels::max(row);
    for (o, &x) in out.iter_mut().zip(row) {
        *o = crate::kernels::fast_exp(x - max);
    }
    let sum = crate::kernels::sum(out);
    let inv = 1.0 / sum;
    out.iter_mut().for_each(|o| *o *= inv);
    max + sum.ln()
}

struct SoftmaxBackward {
    y: Tensor,
    log: bool,
}

impl Backward for SoftmaxBackward {
    fn name(&self) -> &'static str {
        if self.log {
            "log_softmax"
        } else {
            "softmax"
        }
    }
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let d = *self.y.shape().last().unwrap_or(&1);
        let mut dx = crate::pool::uninit(self.y.numel());
        let log = self.log;
        grad.with_f32(|g| {
            self.y.with_f32(|y| {
                dx.par_chunks_mut(d.max(1))
                    .enumerate()
                    .for_each(|(r, dxr)| {
                        crate::kernels::vectorized(|| {
                            let (gr, yr) = (&g[r * d..(r + 1) * d], &y[r * d..(r + 1) * d]);
                            if log {
                                // y = x - lse: dx = g - softmax(x)·Σg
                                let s = crate::kernels::sum(gr);
                                for i in 0..d {
                                    dxr[i] = gr[i] - crate::kernels::fast_exp(yr[i]) * s;
                                }
                            } else {
                                // dx = y·(g - Σ g·y)
                                let s = crate::kernels::dot(gr, yr);
                                for i in 0..d {
                                    dxr[i] = yr[i] * (gr[i] - s);
                                }
                            }
                        })
                    })
            })
        });
        Ok(vec![Some(Tensor::from_f32_unchecked(dx, self.y.shape()))])
    }
}

fn softmax_impl(x: &Tensor, log: bool) -> Result<Tensor> {
    let d = *x.shape().last().ok_or_else(|| Error::BadShape {
        op: "softmax",
        shape: vec![],
        reason: "needs at least one axis".into(),
    })?;
    let mut out = crate::pool::uninit(x.numel());
    x.with_f32(|v| {
        out.par_chunks_mut(d.max(1)).enumerate().for_each(|(r, o)| {
            crate::kernels::vectorized(|| {
                let row = &v[r * d..(r + 1) * d];
                let lse = softmax_row(row, o);
                if log {
                    for (o, &x) in o.iter_mut().zip(row) {
                        *o = x - lse;
                    }
                }
            })
        })
    });
    let value = Tensor::from_f32_as(out, x.shape(), output_dtype(Kind::Softmax, x.dtype()));
    let y = value.data();
    Ok(Tensor::from_op(value, &[x], SoftmaxBackward { y, log }))
}

/// Backward of the row log-sum-exp: dx = g · softmax(x), from the kept softmax.
struct LogSumExpBackward {
    softmax: Tensor,
}

impl Backward for LogSumExpBackward {
    fn name(&self) -> &'static str {
        "logsumexp"
    }
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let d = *self.softmax.shape().last().unwrap_or(&1);
        let mut dx = crate::pool::uninit(self.softmax.numel());
        grad.with_f32(|g| {
            self.softmax.with_f32(|y| {
                dx.par_chunks_mut(d.max(1))
                    .zip(y.par_chunks(d.max(1)))
                    .zip(g.par_iter())
                    .for_each(|((dxr, yr), &gr)| {
                        for (o, &p) in dxr.iter_mut().zip(yr) {
                            *o = gr * p;
                        }
                    })
            })
        });
        Ok(vec![Some(Tensor::from_f32_unchecked(
            dx,
            self.softmax.shape(),
        ))])
    }
}

/// Options of [`Tensor::cross_entropy`].
#[derive(Clone, Copy, Debug)]
pub struct CrossEntropyOptions {
    /// Targets equal to this contribute no loss and no gradient (PyTorch's default is −100).
    pub ignore_index: i64,
    /// Label smoothing ε: the target distribution is (1−ε)·one-hot + ε/V (Szegedy et al. 2016).
    pub label_smoothing: f32,
}

impl Default for CrossEntropyOptions {
    fn default() -> Self {
        CrossEntropyOptions {
            ignore_index: -100,
            label_smoothing: 0.0,
        }
    }
}

struct CrossEntropyBackward {
    logits: Tensor,
    lse: Vec<f32>,
    targets: Vec<i64>,
    opts: CrossEntropyOptions,
    count: usize,
}

impl Backward for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let v = *self.logits.shape().last().unwrap_or(&1);
        let scale = grad.item()? / self.count.max(1) as f32;
        let eps = self.opts.label_smoothing;
        let mut dx = crate::pool::zeros(self.logits.numel());
        self.logits.with_f32(|x| {
            dx.par_chunks_mut(v.max(1)).enumerate().for_each(|(r, d)| {
                crate::kernels::vectorized(|| {
                    let t = self.targets[r];
                    if t == self.opts.ignore_index {
                        return;
                    }
                    let lse = self.lse[r];
                    let row = &x[r * v..(r + 1) * v];
                    let smooth = eps / v as f32;
                    for i in 0..v {
                        d[i] = (crate::kernels::fast_exp(row[i] - lse) - smooth) * scale;
                    }
                    d[t as usize] -= (1.0 - eps) * scale;
                })
            })
        });
        Ok(vec![Some(Tensor::from_f32_unchecked(
            dx,
            self.logits.shape(),
        ))])
    }
}

impl Tensor {
    /// Softmax over the last axis.
    pub fn softmax(&self) -> Result<Tensor> {
        softmax_impl(self, false)
    }

    /// Log-softmax over the last axis, computed stably as x − logsumexp(x).
    pub fn log_softmax(&self) -> Result<Tensor> {
        softmax_impl(self, true)
    }

    /// log Σ exp over the last axis, computed stably (max + log Σ exp(x − max)): `[…, n]` →
    /// `[…]`. The router z-loss of ST-MoE (Zoph et al. 2022, eq. 5) squares it.
    pub fn logsumexp(&self) -> Result<Tensor> {
        let d = match self.shape().last() {
            Some(&d) if d > 0 => d,
            _ => {
                return Err(Error::BadShape {
                    op: "logsumexp",
                    shape: self.shape().to_vec(),
                    reason: "needs a last axis of at least one element".into(),
                })
            }
        };
        let rows = self.numel() / d;
        let mut softmax = crate::pool::uninit(self.numel());
        let mut lse = crate::pool::uninit(rows);
        self.with_f32(|v| {
            softmax
                .par_chunks_mut(d)
                .zip(lse.par_iter_mut())
                .enumerate()
                .for_each(|(r, (o, l))| *l = softmax_row(&v[r * d..(r + 1) * d], o))
        });
        let shape = &self.shape()[..self.rank() - 1];
        let value = Tensor::from_f32_as(lse, shape, output_dtype(Kind::Softmax, self.dtype()));
        let softmax = Tensor::from_f32_unchecked(softmax, self.shape());
        Ok(Tensor::from_op(
            value,
            &[self],
            LogSumExpBackward { softmax },
        ))
    }

    /// Mean cross-entropy of `[N, V]` logits against `N` class targets, fused with the softmax;
    /// ignored targets are left out of the mean. Backward recomputes the probabilities from the
    /// saved logits and one log-sum-exp per row, so no `[N, V]` probability tensor is kept.
    pub fn cross_entropy(&self, targets: &[i64], opts: CrossEntropyOptions) -> Result<Tensor> {
        if self.rank() != 2 || self.shape()[0] != targets.len() {
            return Err(Error::BadShape {
                op: "cross_entropy",
                shape: self.shape().to_vec(),
                reason: format!("logits must be [N, V] with N = {} targets", targets.len()),
            });
        }
        let v = self.shape()[1];
        if let Some(&bad) = targets
            .iter()
            .find(|&&t| t != opts.ignore_index && (t < 0 || t as usize >= v))
        {
            return Err(Error::IndexOutOfRange {
                op: "cross_entropy",
                index: bad,
                limit: v,
            });
        }
        let eps = opts.label_smoothing;
        let mut lse = crate::pool::zeros(targets.len());
        let losses: Vec<f64> = self.with_f32(|x| {
            lse.par_iter_mut()
                .enumerate()
                .map(|(r, l)| {
                    crate::kernels::vectorized(|| {
                        let row = &x[r * v..(r + 1) * v];
                        let max = crate::kernels::max(row);
                        let sum =
                            crate::kernels::sum_map(row, |z| crate::kernels::fast_exp(z - max));
                        *l = max + sum.ln();
                        let t = targets[r];
                        if t == opts.ignore_index {
                            return 0.0;
                        }
                        let nll = (*l - row[t as usize]) as f64;
                        if eps == 0.0 {
                            nll
                        } else {
                            let mean_nll =
                                row.iter().map(|&z| (*l - z) as f64).sum::<f64>() / v as f64;
                            (1.0 - eps as f64) * nll + eps as f64 * mean_nll
                        }
                    })
                })
                .collect()
        });
        let count = targets.iter().filter(|&&t| t != opts.ignore_index).count();
        let loss = (losses.iter().sum::<f64>() / count.max(1) as f64) as f32;
        let value = Tensor::scalar(loss);
        Ok(Tensor::from_op(
            value,
            &[self],
            CrossEntropyBackward {
                logits: self.data(),
                lse,
                targets: targets.to_vec(),
                opts,
                count,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::CrossEntropyOptions;
    use crate::testing::{assert_grads, randn};

    #[test]
    fn softmax_grads() {
        let x = randn(&[3, 6], 1);
        assert_grads(|t| t[0].softmax(), &[x.clone()]);
        assert_grads(|t| t[0].log_softmax(), &[x.clone()]);
    }

    #[test]
    fn logsumexp_value_and_grads() {
        let x = crate::Tensor::from_f32(vec![0.0, 0.0, 1000.0, 1000.0, 1.0, 2.0], &[3, 2]).unwrap();
        let got = x.logsumexp().unwrap().to_vec_f32();
        let want = [
            2f32.ln(),
            1000.0 + 2f32.ln(),
            2.0 + (1.0 + (-1f32).exp()).ln(),
        ];
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                "{got:?} vs {want:?}"
            );
        }
        assert_grads(|t| t[0].logsumexp(), &[randn(&[4, 5], 3)]);
    }

    #[test]
    fn cross_entropy_grads_ignore_and_smoothing() {
        let x = randn(&[5, 7], 2);
        let targets = [1i64, -100, 6, 0, 3];
        assert_grads(
            |t| t[0].cross_entropy(&targets, CrossEntropyOptions::default()),
            &[x.clone()],
        );
        let smooth = CrossEntropyOptions {
            label_smoothing: 0.1,
            ..Default::default()
        };
        assert_grads(|t| t[0].cross_entropy(&targets, smooth), &[x.clone()]);
    }

    #[test]
    fn cross_entropy_value() {
        // Uniform logits over 4 classes: loss = ln 4 whatever the target.
        let x = crate::Tensor::zeros(&[2, 4], crate::DType::F32);
        let l = x
            .cross_entropy(&[0, 3], CrossEntropyOptions::default())
            .unwrap()
            .item()
            .unwrap();
        assert!((l - 4f32.ln()).abs() < 1e-6);
        assert!(x
            .cross_entropy(&[0, 4], CrossEntropyOptions::default())
            .is_err());
    }
}
