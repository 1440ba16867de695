//! 2-D convolution (cross-correlation, as every framework computes it) by im2col + `gemm`, and
//! max/average pooling, all on NCHW tensors: enough for LeNet-5 (LeCun et al. 1998).

use super::matmul::{gemm_f32, Mat};
use crate::autograd::Backward;
use crate::error::{Error, Result};
use crate::Tensor;
use rayon::prelude::*;

/// Geometry of a sliding window over an image.
#[derive(Clone, Copy, Debug)]
struct Window {
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    oh: usize,
    ow: usize,
}

impl Window {
    fn new(
        op: &'static str,
        shape: &[usize],
        kh: usize,
        kw: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Window> {
        if shape.len() != 4 || stride == 0 || shape[2] + 2 * pad < kh || shape[3] + 2 * pad < kw {
            return Err(Error::BadShape {
                op,
                shape: shape.to_vec(),
                reason: format!(
                    "needs NCHW input at least {kh}×{kw} after padding {pad}, stride ≥ 1"
                ),
            });
        }
        let (c, h, w) = (shape[1], shape[2], shape[3]);
        Ok(Window {
            c,
            h,
            w,
            kh,
            kw,
            stride,
            pad,
            oh: (h + 2 * pad - kh) / stride + 1,
            ow: (w + 2 * pad - kw) / stride + 1,
        })
    }

    /// The output columns `lo..hi` whose input column `ox·stride + kx − pad` lies inside the
    /// image, for kernel column `kx`.
    #[inline]
    fn valid_columns(&self, kx: usize) -> (usize, usize) {
        let s = self.stride;
        let lo = if self.pad > kx {
            (self.pad - kx).div_ceil(s)
        } else {
            0
        };
        let hi = if self.w + self.pad > kx {
            ((self.w - 1 + self.pad - kx) / s + 1).min(self.ow)
        } else {
            0
        };
        (lo.min(hi), hi)
    }

    /// The input row of output row `oy` at kernel row `ky`, or None in the padding.
    #[inline]
    fn source_row(&self, oy: usize, ky: usize) -> Option<usize> {
        let y = (oy * self.stride + ky) as isize - self.pad as isize;
        (y >= 0 && y < self.h as isize).then_some(y as usize)
    }

    /// im2col of one image: `[C·kh·kw, oh·ow]`.
    fn im2col(&self, img: &[f32], cols: &mut [f32]) {
        let plane = self.oh * self.ow;
        for c in 0..self.c {
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = (c * self.kh + ky) * self.kw + kx;
                    let (lo, hi) = self.valid_columns(kx);
                    for oy in 0..self.oh {
                        let dst = &mut cols[row * plane + oy * self.ow..][..self.ow];
                        let Some(y) = self.source_row(oy, ky) else {
                            dst.fill(0.0);
                            continue;
                        };
                        let src = &img[(c * self.h + y) * self.w..][..self.w];
                        dst[..lo].fill(0.0);
                        dst[hi..].fill(0.0);
                        if lo == hi {
                            continue;
                        }
                        let first = lo * self.stride + kx - self.pad;
                        if self.stride == 1 {
                            dst[lo..hi].copy_from_slice(&src[first..first + hi - lo]);
                        } else {
                            for (i, d) in dst[lo..hi].iter_mut().enumerate() {
                                *d = src[first + i * self.stride];
                            }
                        }
                    }
                }
            }
        }
    }

    /// The adjoint of im2col: adds columns back onto the image they came from.
    fn col2im(&self, cols: &[f32], img: &mut [f32]) {
        let plane = self.oh * self.ow;
        for c in 0..self.c {
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = (c * self.kh + ky) * self.kw + kx;
                    let (lo, hi) = self.valid_columns(kx);
                    for oy in 0..self.oh {
                        let Some(y) = self.source_row(oy, ky).filter(|_| lo < hi) else {
                            continue;
                        };
                        let src = &cols[row * plane + oy * self.ow..][..self.ow];
                        let dst = &mut img[(c * self.h + y) * self.w..][..self.w];
                        let first = lo * self.stride + kx - self.pad;
                        for (i, v) in src[lo..hi].iter().enumerate() {
                            dst[first + i * self.stride] += v;
                        }
                    }
                }
            }
        }
    }
}

/// Images per group in conv2d's backward: each group sums its weight gradient alone, and the
/// groups' sums are added in order.
const CONV_GROUP: usize = 8;

struct Conv2dBackward {
    x: Tensor,
    /// Whether the input needs its gradient (not for the images entering a first layer).
    x_needs_grad: bool,
    weight: Tensor,
    has_bias: bool,
    win: Window,
}

impl Backward for Conv2dBackward {
    fn name(&self) -> &'static str {
        "conv2d"
    }
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let win = self.win;
        let o = self.weight.shape()[0];
        let k = win.c * win.kh * win.kw;
        let plane = win.oh * win.ow;
        let img = win.c * win.h * win.w;
        // Allocated either way: its chunks pace the loop over images.
        let mut dx = crate::pool::zeros(self.x.numel());
        let w = self.weight.to_vec_f32();
        // Fixed groups of images in parallel, each summing its own dW and db; the groups' sums
        // are then added in group order, so the result does not depend on the thread count or
        // on which thread ran which group (deterministic, as every reduction here).
        let partials: Vec<(Vec<f32>, Vec<f32>)> = grad.with_f32(|g| {
            self.x.with_f32(|x| {
                dx.par_chunks_mut(img * CONV_GROUP)
                    .zip(g.par_chunks(o * plane * CONV_GROUP))
                    .zip(x.par_chunks(img * CONV_GROUP))
                    .map(|((dxs, gs), xs)| {
                        let mut dw = vec![0.0f32; o * k];
                        let mut db = vec![0.0f32; o];
                        let mut cols = vec![0.0f32; k * plane];
                        let mut dcols = vec![0.0f32; k * plane];
                        for ((dxi, gi), xi) in dxs
                            .chunks_mut(img)
                            .zip(gs.chunks(o * plane))
                            .zip(xs.chunks(img))
                        {
                            win.im2col(xi, &mut cols);
                            unsafe {
                                // dW += dY · colsᵀ
                                gemm_f32(
                                    dw.as_mut_ptr(),
                                    k as isize,
                                    1,
                                    true,
                                    Mat::dense(gi.as_ptr(), o, plane),
                                    Mat::dense(cols.as_ptr(), k, plane).t(),
                                    1,
                                );
                            }
                            if self.x_needs_grad {
                                // dcols = Wᵀ · dY
                                unsafe {
                                    gemm_f32(
                                        dcols.as_mut_ptr(),
                                        plane as isize,
                                        1,
                                        false,
                                        Mat::dense(w.as_ptr(), o, k).t(),
                                        Mat::dense(gi.as_ptr(), o, plane),
                                        1,
                                    );
                                }
                                win.col2im(&dcols, dxi);
                            }
                            for (oc, d) in db.iter_mut().enumerate() {
                                *d += gi[oc * plane..(oc + 1) * plane].iter().sum::<f32>();
                            }
                        }
                        (dw, db)
                    })
                    .collect()
            })
        });
        let (mut dw, mut db) = (vec![0.0f32; o * k], vec![0.0f32; o]);
        for (pw, pb) in &partials {
            dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
        }
        let mut grads = vec![
            self.x_needs_grad
                .then(|| Tensor::from_f32_unchecked(dx, self.x.shape())),
            Some(Tensor::from_f32_unchecked(dw, self.weight.shape())),
        ];
        if self.has_bias {
            grads.push(Some(Tensor::from_f32_unchecked(db, &[o])));
        }
        Ok(grads)
    }
}

#[derive(Clone, Copy)]
enum Pool {
    Max,
    Avg,
}

struct PoolBackward {
    kind: Pool,
    shape: Vec<usize>,
    win: Window,
    /// For max pooling, each output's source position within its input plane.
    argmax: Vec<u32>,
}

impl Backward for PoolBackward {
    fn name(&self) -> &'static str {
        match self.kind {
            Pool::Max => "max_pool2d",
            Pool::Avg => "avg_pool2d",
        }
    }
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let win = self.win;
        let mut dx = crate::pool::zeros(self.shape.iter().product());
        let inv = 1.0 / (win.kh * win.kw) as f32;
        let (in_plane, out_plane) = (win.h * win.w, win.oh * win.ow);
        grad.with_f32(|g| {
            dx.par_chunks_mut(in_plane)
                .zip(g.par_chunks(out_plane))
                .enumerate()
                .for_each(|(p, (dx, g))| match self.kind {
                    Pool::Max => {
                        let argmax = &self.argmax[p * out_plane..(p + 1) * out_plane];
                        for (&at, &gr) in argmax.iter().zip(g) {
                            dx[at as usize] += gr;
                        }
                    }
                    Pool::Avg => {
                        for oy in 0..win.oh {
                            for ox in 0..win.ow {
                                let share = g[oy * win.ow + ox] * inv;
                                let base = oy * win.stride * win.w + ox * win.stride;
                                for ky in 0..win.kh {
                                    for d in &mut dx[base + ky * win.w..][..win.kw] {
                                        *d += share;
                                    }
                                }
                            }
                        }
                    }
                });
        });
        Ok(vec![Some(Tensor::from_f32_unchecked(dx, &self.shape))])
    }
}

/// Max or average pooling without padding: every window lies inside its plane.
fn pool(x: &Tensor, kind: Pool, kernel: usize, stride: usize) -> Result<Tensor> {
    let name = match kind {
        Pool::Max => "max_pool2d",
        Pool::Avg => "avg_pool2d",
    };
    let win = Window::new(name, x.shape(), kernel, kernel, stride, 0)?;
    let planes = x.shape()[0] * x.shape()[1];
    let (in_plane, out_plane) = (win.h * win.w, win.oh * win.ow);
    let mut out = crate::pool::zeros(planes * out_plane);
    let mut argmax = match kind {
        Pool::Max => vec![0u32; out.len()],
        Pool::Avg => Vec::new(),
    };
    let inv = 1.0 / (kernel * kernel) as f32;
    x.with_f32(|v| {
        let planes_in = v.par_chunks(in_plane).zip(out.par_chunks_mut(out_plane));
        match kind {
            Pool::Max => {
                planes_in
                    .zip(argmax.par_chunks_mut(out_plane))
                    .for_each(|((src, out), argmax)| {
                        for oy in 0..win.oh {
                            for ox in 0..win.ow {
                                let base = oy * stride * win.w + ox * stride;
                                let (mut best, mut best_at) = (src[base], base);
                                for ky in 0..kernel {
                                    let row = base + ky * win.w;
                                    for (kx, &val) in src[row..row + kernel].iter().enumerate() {
                                        if val > best {
                                            best = val;
                                            best_at = row + kx;
                                        }
                                    }
                                }
                                out[oy * win.ow + ox] = best;
                                argmax[oy * win.ow + ox] = best_at as u32;
                            }
                        }
                    })
            }
            Pool::Avg => planes_in.for_each(|(src, out)| {
                for oy in 0..win.oh {
                    for ox in 0..win.ow {
                        let base = oy * stride * win.w + ox * stride;
                        let sum: f32 = (0..kernel)
                            .map(|ky| src[base + ky * win.w..][..kernel].iter().sum::<f32>())
                            .sum();
                        out[oy * win.ow + ox] = sum * inv;
                    }
                }
            }),
        }
    });
    let shape = [x.shape()[0], x.shape()[1], win.oh, win.ow];
    let value = Tensor::from_f32_as(out, &shape, x.dtype());
    Ok(Tensor::from_op(
        value,
        &[x],
        PoolBackward {
            kind,
            shape: x.shape().to_vec(),
            win,
            argmax,
        },
    ))
}

impl Tensor {
    /// 2-D convolution of NCHW input with `[O, C, kh, kw]` weights, optional `[O]` bias, square
    /// stride and zero padding. Output `[N, O, oh, ow]` with oh = (H + 2·pad − kh)/stride + 1.
    pub fn conv2d(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        padding: usize,
    ) -> Result<Tensor> {
        if weight.rank() != 4 || self.rank() != 4 || weight.shape()[1] != self.shape()[1] {
            return Err(Error::ShapeMismatch {
                op: "conv2d",
                lhs: self.shape().to_vec(),
                rhs: weight.shape().to_vec(),
            });
        }
        let (o, kh, kw) = (weight.shape()[0], weight.shape()[2], weight.shape()[3]);
        if let Some(b) = bias {
            if b.shape() != [o] {
                return Err(Error::ShapeMismatch {
                    op: "conv2d bias",
                    lhs: weight.shape().to_vec(),
                    rhs: b.shape().to_vec(),
                });
            }
        }
        let win = Window::new("conv2d", self.shape(), kh, kw, stride, padding)?;
        let n = self.shape()[0];
        let k = win.c * kh * kw;
        let plane = win.oh * win.ow;
        let img = win.c * win.h * win.w;
        let mut out = crate::pool::zeros(n * o * plane);
        let w = weight.to_vec_f32();
        let b = bias.map(|b| b.to_vec_f32());
        // Images in parallel, one single-threaded product each: LeNet's products are far too
        // small to split.
        self.with_f32(|x| {
            out.par_chunks_mut(o * plane)
                .zip(x.par_chunks(img))
                .for_each_init(
                    || vec![0.0f32; k * plane],
                    |cols, (dst, src)| {
                        win.im2col(src, cols);
                        if let Some(b) = &b {
                            for (oc, row) in dst.chunks_mut(plane).enumerate() {
                                row.fill(b[oc]);
                            }
                        }
                        unsafe {
                            gemm_f32(
                                dst.as_mut_ptr(),
                                plane as isize,
                                1,
                                b.is_some(),
                                Mat::dense(w.as_ptr(), o, k),
                                Mat::dense(cols.as_ptr(), k, plane),
                                1,
                            );
                        }
                    },
                );
        });
        let value = Tensor::from_f32_as(out, &[n, o, win.oh, win.ow], self.dtype());
        let mut inputs = vec![self, weight];
        if let Some(b) = bias {
            inputs.push(b);
        }
        Ok(Tensor::from_op(
            value,
            &inputs,
            Conv2dBackward {
                x: self.data(),
                x_needs_grad: self.requires_grad(),
                weight: weight.data(),
                has_bias: bias.is_some(),
                win,
            },
        ))
    }

    /// Max pooling over `kernel`×`kernel` windows of an NCHW tensor.
    pub fn max_pool2d(&self, kernel: usize, stride: usize) -> Result<Tensor> {
        pool(self, Pool::Max, kernel, stride)
    }

    /// Average pooling over `kernel`×`kernel` windows of an NCHW tensor.
    pub fn avg_pool2d(&self, kernel: usize, stride: usize) -> Result<Tensor> {
        pool(self, Pool::Avg, kernel, stride)
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::{assert_grads, randn};
    use crate::Tensor;

    #[test]
    fn conv2d_grads_with_stride_and_padding() {
        assert_grads(
            |t| t[0].conv2d(&t[1], Some(&t[2]), 1, 0),
            &[
                randn(&[2, 2, 5, 5], 1),
                randn(&[3, 2, 3, 3], 2),
                randn(&[3], 3),
            ],
        );
        assert_grads(
            |t| t[0].conv2d(&t[1], None, 2, 1),
            &[randn(&[1, 2, 5, 4], 4), randn(&[2, 2, 3, 3], 5)],
        );
    }

    #[test]
    fn conv2d_gradients_do_not_depend_on_the_thread_count() {
        let grads = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let x = randn(&[37, 3, 9, 9], 1).requires_grad_();
                let w = randn(&[4, 3, 3, 3], 2).requires_grad_();
                let b = randn(&[4], 3).requires_grad_();
                let y = x.conv2d(&w, Some(&b), 1, 1).unwrap();
                y.mul(&y).unwrap().sum_all().unwrap().backward().unwrap();
                [x, w, b].map(|t| {
                    t.grad()
                        .unwrap()
                        .to_vec_f32()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<u32>>()
                })
            })
        };
        let one = grads(1);
        assert_eq!(one, grads(2));
        assert_eq!(one, grads(3));
    }

    #[test]
    fn conv2d_value() {
        // A 1×1 image patch summed by a 2×2 kernel of ones.
        let x = Tensor::from_f32((1..=9).map(|v| v as f32).collect(), &[1, 1, 3, 3]).unwrap();
        let w = Tensor::ones(&[1, 1, 2, 2], crate::DType::F32);
        assert_eq!(
            x.conv2d(&w, None, 1, 0).unwrap().to_vec_f32(),
            vec![12., 16., 24., 28.]
        );
    }

    #[test]
    fn pooling_values_and_grads() {
        let x = Tensor::from_f32((1..=16).map(|v| v as f32).collect(), &[1, 1, 4, 4]).unwrap();
        assert_eq!(
            x.max_pool2d(2, 2).unwrap().to_vec_f32(),
            vec![6., 8., 14., 16.]
        );
        assert_eq!(
            x.avg_pool2d(2, 2).unwrap().to_vec_f32(),
            vec![3.5, 5.5, 11.5, 13.5]
        );
        assert_grads(|t| t[0].max_pool2d(2, 2), &[randn(&[2, 2, 4, 4], 6)]);
        assert_grads(|t| t[0].avg_pool2d(2, 1), &[randn(&[1, 2, 3, 3], 7)]);
    }
}
