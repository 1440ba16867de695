//! Reductions over one axis (`sum`, `mean`, `max`) and over all elements.

use crate::autocast::{output_dtype, Kind};
use crate::autograd::Backward;
use crate::error::Result;
use crate::Tensor;

/// Splits a shape around `axis` into (outer, extent, inner) counts.
pub(crate) fn around(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (
        shape[..axis].iter().product(),
        shape[axis],
        shape[axis + 1..].iter().product(),
    )
}

fn reduced_shape(shape: &[usize], axis: usize, keepdim: bool) -> Vec<usize> {
    let mut s = shape.to_vec();
    if keepdim {
        s[axis] = 1;
    } else {
        s.remove(axis);
    }
    s
}

struct SumBackward {
    shape: Vec<usize>,
    axis: usize,
    scale: f32,
}

impl Backward for SumBackward {
    fn name(&self) -> &'static str {
        "sum"
    }
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (outer, n, inner) = around(&self.shape, self.axis);
        let mut out = crate::pool::zeros(outer * n * inner);
        grad.with_f32(|g| {
            for o in 0..outer {
                for j in 0..n {
                    let dst = &mut out[(o * n + j) * inner..(o * n + j + 1) * inner];
                    for (d, &g) in dst.iter_mut().zip(&g[o * inner..(o + 1) * inner]) {
                        *d = g * self.scale;
                    }
                }
            }
        });
        Ok(vec![Some(Tensor::from_f32_unchecked(out, &self.shape))])
    }
}

struct MaxBackward {
    shape: Vec<usize>,
    axis: usize,
    argmax: Vec<usize>,
}

impl Backward for MaxBackward {
    fn name(&self) -> &'static str {
        "max"
    }
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (_, n, inner) = around(&self.shape, self.axis);
        let mut out = crate::pool::zeros(self.shape.iter().product());
        grad.with_f32(|g| {
            for (r, &j) in self.argmax.iter().enumerate() {
                let (o, i) = (r / inner, r % inner);
                out[(o * n + j) * inner + i] += g[r];
            }
        });
        Ok(vec![Some(Tensor::from_f32_unchecked(out, &self.shape))])
    }
}

impl Tensor {
    fn sum_scaled(&self, axis: isize, keepdim: bool, scale: f32) -> Result<Tensor> {
        let ax = self.axis(axis, "sum")?;
        let (outer, n, inner) = around(self.shape(), ax);
        let mut out = crate::pool::zeros(outer * inner);
        self.with_f32(|v| {
            for o in 0..outer {
                let dst = &mut out[o * inner..(o + 1) * inner];
                for j in 0..n {
                    crate::kernels::add_assign(
                        dst,
                        &v[(o * n + j) * inner..(o * n + j + 1) * inner],
                    );
                }
                dst.iter_mut().for_each(|d| *d *= scale);
            }
        });
        let shape = reduced_shape(self.shape(), ax, keepdim);
        let value = Tensor::from_f32_as(out, &shape, output_dtype(Kind::Reduction, self.dtype()));
        Ok(Tensor::from_op(
            value,
            &[self],
            SumBackward {
                shape: self.shape().to_vec(),
                axis: ax,
                scale,
            },
        ))
    }

    /// Sum over `axis`; `keepdim` keeps it with extent 1.
    pub fn sum(&self, axis: isize, keepdim: bool) -> Result<Tensor> {
        self.sum_scaled(axis, keepdim, 1.0)
    }

    /// Mean over `axis`.
    pub fn mean(&self, axis: isize, keepdim: bool) -> Result<Tensor> {
        let n = self.dim(axis)?;
        self.sum_scaled(axis, keepdim, 1.0 / n as f32)
    }

    /// Maximum over `axis`; the gradient goes to the first maximal element.
    pub fn max(&self, axis: isize, keepdim: bool) -> Result<Tensor> {
        let ax = self.axis(axis, "max")?;
        let (outer, n, inner) = around(self.shape(), ax);
        let mut out = vec![f32::NEG_INFINITY; outer * inner];
        let mut argmax = vec![0usize; outer * inner];
        self.with_f32(|v| {
            for o in 0..outer {
                for j in 0..n {
                    for i in 0..inner {
                        let x = v[(o * n + j) * inner + i];
                        let r = o * inner + i;
                        if x > out[r] || j == 0 {
                            out[r] = x;
                            argmax[r] = j;
                        }
                    }
                }
            }
        });
        let shape = reduced_shape(self.shape(), ax, keepdim);
        let value = Tensor::from_f32_as(out, &shape, self.dtype());
        Ok(Tensor::from_op(
            value,
            &[self],
            MaxBackward {
                shape: self.shape().to_vec(),
                axis: ax,
                argmax,
            },
        ))
    }

    /// Sum of all elements, as a rank-0 tensor.
    pub fn sum_all(&self) -> Result<Tensor> {
        self.reshape(&[self.numel()])?.sum(0, false)
    }

    /// Mean of all elements, as a rank-0 tensor.
    pub fn mean_all(&self) -> Result<Tensor> {
        self.reshape(&[self.numel()])?.mean(0, false)
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::{assert_grads, randn};

    #[test]
    fn reduction_grads() {
        let x = randn(&[3, 4, 5], 1);
        for axis in [0isize, 1, -1] {
            assert_grads(|t| t[0].sum(axis, false), &[x.clone()]);
            assert_grads(|t| t[0].mean(axis, true), &[x.clone()]);
            assert_grads(|t| t[0].max(axis, false), &[x.clone()]);
        }
        assert_grads(|t| t[0].mean_all(), &[x.clone()]);
    }

    #[test]
    fn reduction_values() {
        let x = crate::Tensor::from_f32(vec![1., 5., 3., 2., 0., 4.], &[2, 3]).unwrap();
        assert_eq!(x.sum(1, false).unwrap().to_vec_f32(), vec![9., 6.]);
        assert_eq!(x.max(0, false).unwrap().to_vec_f32(), vec![2., 5., 4.]);
        assert_eq!(x.mean(0, true).unwrap().shape(), &[1, 3]);
    }
}
