//! Normalisation over the last axis: LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich
//! 2019), fused forward and backward. Rows are processed in parallel; the weight gradients are
//! summed per block of 32 rows and then across blocks in block order, so they do
//! not depend on the thread count or on which thread ran which block.

use rayon::prelude::*;

use crate::autocast::{output_dtype, Kind};
use crate::autograd::Backward;
use crate::error::{Error, Result};
use crate::Tensor;

const ROWS_PER_TASK: usize = 32;

/// Elements a norm reads a row at a time: f32 borrowed in place, bf16 widened into `buf`.
trait RowSource: Sync {
    fn row<'a>(&'a self, start: usize, buf: &'a mut [f32]) -> &'a [f32];
}

impl RowSource for &[f32] {
    #[inline(always)]
    fn row<'a>(&'a self, start: usize, buf: &'a mut [f32]) -> &'a [f32] {
        &self[start..start + buf.len()]
    }
}

impl RowSource for &[half::bf16] {
    #[inline(always)]
    fn row<'a>(&'a self, start: usize, buf: &'a mut [f32]) -> &'a [f32] {
        use crate::kernels::Widen;
        let src = &self[start..start + buf.len()];
        for (b, s) in buf.iter_mut().zip(src) {
            *b = s.widen();
        }
        buf
    }
}

fn check(op: &'static str, x: &Tensor, w: &Tensor) -> Result<usize> {
    let d = *x.shape().last().ok_or_else(|| Error::BadShape {
        op,
        shape: vec![],
        reason: "needs at least one axis".into(),
    })?;
    if w.shape() != [d] {
        return Err(Error::ShapeMismatch {
            op,
            lhs: x.shape().to_vec(),
            rhs: w.shape().to_vec(),
        });
    }
    Ok(d)
}

struct LayerNormBackward {
    x: Tensor,
    weight: Tensor,
    has_bias: bool,
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

impl Backward for LayerNormBackward {
    fn name(&self) -> &'static str {
        "layer_norm"
    }
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let d = self.weight.numel();
        let mut dx = crate::pool::uninit(self.x.numel());
        let w = self.weight.to_vec_f32();
        let partials = grad.with_f32(|g| {
            // A bf16 input is read in place and widened a row at a time.
            let mut rows = |x: &dyn RowSource| {
                dx.par_chunks_mut((ROWS_PER_TASK * d).max(1))
                    .enumerate()
                    .map(|(c, dxc)| {
                        crate::kernels::vectorized(|| {
                            let mut dw = crate::pool::zeros(d);
                            let mut db = crate::pool::zeros(d);
                            let mut dxhat = crate::pool::zeros(d);
                            let mut xhat = crate::pool::zeros(d);
                            let mut xrow = vec![0f32; d];
                            for (r, dxr) in dxc.chunks_mut(d.max(1)).enumerate() {
                                let row = c * ROWS_PER_TASK + r;
                                let (mean, rstd) = (self.mean[row], self.rstd[row]);
                                // Every slice cut to exactly d elements, so the loops carry no
                                // bounds checks and vectorise.
                                let xr = x.row(row * d, &mut xrow[..d]);
                                let gr = &g[row * d..(row + 1) * d];
                                let (w, dxr) = (&w[..d], &mut dxr[..d]);
                                let (xhat, dxhat) = (&mut xhat[..d], &mut dxhat[..d]);
                                let (dw, db) = (&mut dw[..d], &mut db[..d]);
                                for i in 0..d {
                                    xhat[i] = (xr[i] - mean) * rstd;
                                    dw[i] += gr[i] * xhat[i];
                                    db[i] += gr[i];
                                    dxhat[i] = gr[i] * w[i];
                                }
                                let sum_dxhat = crate::kernels::sum(dxhat);
                                let sum_dxhat_xhat = crate::kernels::dot(dxhat, xhat);
                                let (m1, m2) = (sum_dxhat / d as f32, sum_dxhat_xhat / d as f32);
                                for i in 0..d {
                                    dxr[i] = rstd * (dxhat[i] - m1 - xhat[i] * m2);
                                }
                            }
                            (dw, db)
                        })
                    })
                    .collect::<Vec<_>>()
            };
            match self.x.with_bf16(|x| rows(&x)) {
                Some(p) => p,
                None => self.x.with_f32(|x| rows(&x)),
            }
        });
        let (dw, db): (Vec<_>, Vec<_>) = partials.into_iter().unzip();
        let (dw, db) = (
            crate::kernels::sum_in_order(dw, d),
            crate::kernels::sum_in_order(db, d),
        );
        let mut grads = vec![
            Some(Tensor::from_f32_unchecked(dx, self.x.shape())),
            Some(Tensor::from_f32_unchecked(dw, &[d])),
        ];
        if self.has_bias {
            grads.push(Some(Tensor::from_f32_unchecked(db, &[d])));
        }
        Ok(grads)
    }
}

struct RmsNormBackward {
    x: Tensor,
    weight: Tensor,
    rstd: Vec<f32>,
}

impl Backward for RmsNormBackward {
    fn name(&self) -> &'static str {
        "rms_norm"
    }
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let d = self.weight.numel();
        let mut dx = crate::pool::zeros(self.x.numel());
        let w = self.weight.to_vec_f32();
        let partials = grad.with_f32(|g| {
            self.x.with_f32(|x| {
                dx.par_chunks_mut((ROWS_PER_TASK * d).max(1))
                    .enumerate()
                    .map(|(c, dxc)| {
                        crate::kernels::vectorized(|| {
                            let mut dw = crate::pool::zeros(d);
                            for (r, dxr) in dxc.chunks_mut(d.max(1)).enumerate() {
                                let row = c * ROWS_PER_TASK + r;
                                let rstd = self.rstd[row];
                                let xr = &x[row * d..(row + 1) * d];
                                let gr = &g[row * d..(row + 1) * d];
                                let (w, dw, dxr) = (&w[..d], &mut dw[..d], &mut dxr[..d]);
                                for i in 0..d {
                                    dw[i] += gr[i] * xr[i] * rstd;
                                }
                                // dxr holds g·w first, then the gradient.
                                for i in 0..d {
                                    dxr[i] = gr[i] * w[i];
                                }
                                let s = rstd * crate::kernels::dot(dxr, xr);
                                let m = s / d as f32;
                                for i in 0..d {
                                    dxr[i] = rstd * (dxr[i] - xr[i] * rstd * m);
                                }
                            }
                            dw
                        })
                    })
                    .collect::<Vec<_>>()
            })
        });
        let dw = crate::kernels::sum_in_order(partials, d);
        Ok(vec![
            Some(Tensor::from_f32_unchecked(dx, self.x.shape())),
            Some(Tensor::from_f32_unchecked(dw, &[d])),
        ])
    }
}

impl Tensor {
    /// LayerNorm over the last axis: (x − mean)/√(var + eps)·weight + bias, with the biased
    /// variance (Ba et al. 2016).
    pub fn layer_norm(&self, weight: &Tensor, bias: Option<&Tensor>, eps: f32) -> Result<Tensor> {
        let d = check("layer_norm", self, weight)?;
        if let Some(b) = bias {
            check("layer_norm bias", self, b)?;
        }
        let rows = self.numel() / d.max(1);
        let mut out = crate::pool::uninit(self.numel());
        let mut mean = crate::pool::zeros(rows);
        let mut rstd = crate::pool::zeros(rows);
        let w = weight.to_vec_f32();
        let b = bias.map(|b| b.to_vec_f32());
        let mut rows = |x: &dyn RowSource| {
            out.par_chunks_mut(d.max(1))
                .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
                .enumerate()
                .with_min_len(ROWS_PER_TASK)
                .for_each_init(
                    || vec![0f32; d],
                    |xrow, (r, (o, (m, s)))| {
                        crate::kernels::vectorized(|| {
                            let xr = x.row(r * d, &mut xrow[..d]);
                            let mu = crate::kernels::sum(xr) / d as f32;
                            let var =
                                crate::kernels::sum_map(xr, |v| (v - mu) * (v - mu)) / d as f32;
                            let rs = 1.0 / (var + eps).sqrt();
                            // Slices of exactly d elements and the bias test outside the loop, so
                            // the loop vectorises.
                            let (o, w) = (&mut o[..d], &w[..d]);
                            match &b {
                                Some(b) => {
                                    let b = &b[..d];
                                    for i in 0..d {
                                        o[i] = (xr[i] - mu) * rs * w[i] + b[i];
                                    }
                                }
                                None => {
                                    for i in 0..d {
                                        o[i] = (xr[i] - mu) * rs * w[i];
                                    }
                                }
                            }
                            *m = mu;
                            *s = rs;
                        })
                    },
                );
        };
        // A bf16 input is read in place and widened a row at a time.
        if self.with_bf16(|x| rows(&x)).is_none() {
            self.with_f32(|x| rows(&x));
        }
        let value = Tensor::from_f32_as(out, self.shape(), output_dtype(Kind::Norm, self.dtype()));
        let mut inputs = vec![self, weight];
        if let Some(b) = bias {
            inputs.push(b);
        }
        Ok(Tensor::from_op(
            value,
            &inputs,
            LayerNormBackward {
                x: self.data(),
                weight: weight.data(),
                has_bias: bias.is_some(),
                mean,
                rstd,
            },
        ))
    }

    /// RMSNorm over the last axis: x/√(mean(x²) + eps)·weight (Zhang & Sennrich 2019).
    pub fn rms_norm(&self, weight: &Tensor, eps: f32) -> Result<Tensor> {
        let d = check("rms_norm", self, weight)?;
        let rows = self.numel() / d.max(1);
        let mut out = crate::pool::zeros(self.numel());
        let mut rstd = crate::pool::zeros(rows);
        let w = weight.to_vec_f32();
        self.with_f32(|x| {
            out.par_chunks_mut(d.max(1))
                .zip(rstd.par_iter_mut())
                .enumerate()
                .with_min_len(ROWS_PER_TASK)
                .for_each(|(r, (o, s))| {
                    crate::kernels::vectorized(|| {
                        let xr = &x[r * d..(r + 1) * d];
                        let ms = crate::kernels::sum_map(xr, |v| v * v) / d as f32;
                        let rs = 1.0 / (ms + eps).sqrt();
                        let (o, w) = (&mut o[..d], &w[..d]);
                        for i in 0..d {
                            o[i] = xr[i] * rs * w[i];
                        }
                        *s = rs;
                    })
                });
        });
        let value = Tensor::from_f32_as(out, self.shape(), output_dtype(Kind::Norm, self.dtype()));
        Ok(Tensor::from_op(
            value,
            &[self, weight],
            RmsNormBackward {
                x: self.data(),
                weight: weight.data(),
                rstd,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::{assert_grads, randn};

    #[test]
    fn layer_norm_and_rms_norm_grads() {
        let x = randn(&[3, 4, 8], 1);
        assert_grads(
            |t| t[0].layer_norm(&t[1], Some(&t[2]), 1e-5),
            &[x.clone(), randn(&[8], 2), randn(&[8], 3)],
        );
        assert_grads(
            |t| t[0].layer_norm(&t[1], None, 1e-5),
            &[x.clone(), randn(&[8], 4)],
        );
        assert_grads(|t| t[0].rms_norm(&t[1], 1e-6), &[x.clone(), randn(&[8], 5)]);
    }

    #[test]
    fn layer_norm_normalises() {
        let x = randn(&[4, 16], 6).scale(3.0).add_scalar(2.0);
        let y = x
            .layer_norm(&crate::Tensor::ones(&[16], crate::DType::F32), None, 1e-5)
            .unwrap()
            .to_vec_f32();
        for row in y.chunks(16) {
            let m: f32 = row.iter().sum::<f32>() / 16.0;
            let v: f32 = row.iter().map(|x| (x - m) * (x - m)).sum::<f32>() / 16.0;
            assert!(m.abs() < 1e-5 && (v - 1.0).abs() < 1e-3);
        }
    }
}
