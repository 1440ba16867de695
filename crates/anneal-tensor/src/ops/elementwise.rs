//! Elementwise ops: broadcasting binary arithmetic and the activations, each with its backward.
//!
//! Broadcasting follows NumPy: shapes align from the last axis, and an axis of extent 1 stretches.
//! The backward of a broadcast operand sums the gradient over the axes it was stretched along.

use crate::autocast::{output_dtype, Kind};
use crate::autograd::Backward;
use crate::error::{Error, Result};
use crate::kernels::{map_into, map_to, zip_into, zip_map, Widen};
use crate::tensor::contiguous_strides;
use crate::Tensor;

/// The shape two shapes broadcast to.
pub fn broadcast_shape(op: &'static str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank {
            a[i + a.len() - rank]
        } else {
            1
        };
        let db = if i + b.len() >= rank {
            b[i + b.len() - rank]
        } else {
            1
        };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(Error::ShapeMismatch {
                op,
                lhs: a.to_vec(),
                rhs: b.to_vec(),
            });
        };
    }
    Ok(out)
}

/// The elements of `t` stretched to `shape` (which `t` broadcasts to), row-major f32.
fn expand(t: &Tensor, shape: &[usize]) -> Vec<f32> {
    if t.shape() == shape {
        return t.to_vec_f32();
    }
    let src = t.to_vec_f32();
    let rank = shape.len();
    let pad = rank - t.rank();
    let src_strides = contiguous_strides(t.shape());
    let strides: Vec<usize> = (0..rank)
        .map(|i| {
            if i < pad || t.shape()[i - pad] == 1 {
                0
            } else {
                src_strides[i - pad]
            }
        })
        .collect();
    let numel: usize = shape.iter().product();
    let inner = shape.last().copied().unwrap_or(1);
    let inner_stride = strides.last().copied().unwrap_or(0);
    let mut out = crate::pool::zeros(numel);
    let mut index = vec![0usize; rank.saturating_sub(1)];
    for row in out.chunks_mut(inner.max(1)) {
        let base: usize = index.iter().zip(&strides).map(|(i, s)| i * s).sum();
        for (j, o) in row.iter_mut().enumerate() {
            *o = src[base + j * inner_stride];
        }
        for a in (0..index.len()).rev() {
            index[a] += 1;
            if index[a] < shape[a] {
                break;
            }
            index[a] = 0;
        }
    }
    out
}

/// Sums a gradient of shape `from` down to `to` (the shape of an operand that was broadcast).
pub(crate) fn sum_to_shape(grad: Vec<f32>, from: &[usize], to: &[usize]) -> Vec<f32> {
    if from == to {
        return grad;
    }
    let rank = from.len();
    let pad = rank - to.len();
    let to_full: Vec<usize> = (0..rank)
        .map(|i| if i < pad { 1 } else { to[i - pad] })
        .collect();
    let mut out = crate::pool::zeros(to.iter().product());
    let kept: usize = to.iter().product();
    if kept > 0 && from[pad..] == *to {
        // Repeated over leading axes only (a bias): rows summed in order, as the loop below.
        for row in grad.chunks_exact(kept) {
            crate::kernels::vectorized(|| out.iter_mut().zip(row).for_each(|(o, g)| *o += g));
        }
        return out;
    }
    let to_strides = contiguous_strides(&to_full);
    let mut index = vec![0usize; rank];
    for &g in &grad {
        let mut at = 0;
        for a in 0..rank {
            if to_full[a] != 1 {
                at += index[a] * to_strides[a];
            }
        }
        out[at] += g;
        for a in (0..rank).rev() {
            index[a] += 1;
            if index[a] < from[a] {
                break;
            }
            index[a] = 0;
        }
    }
    out
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinaryOp {
    fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
        }
    }
}

struct BinaryBackward {
    op: BinaryOp,
    /// The operands' values, each kept only where a needed gradient reads it (mul: the other
    /// operand's; div: the divisor, and the dividend for the divisor's gradient).
    a: Option<Tensor>,
    b: Option<Tensor>,
    /// Which operands need a gradient.
    needs: [bool; 2],
    a_shape: Vec<usize>,
    b_shape: Vec<usize>,
    out_shape: Vec<usize>,
}

impl Backward for BinaryBackward {
    fn name(&self) -> &'static str {
        self.op.name()
    }
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let [need_a, need_b] = self.needs;
        if self.op == BinaryOp::Add
            && self.a_shape == self.out_shape
            && self.b_shape == self.out_shape
        {
            return Ok(vec![
                need_a.then(|| grad.clone()),
                need_b.then(|| grad.clone()),
            ]);
        }
        let g = grad.to_vec_f32();
        let n = g.len();
        let kept = |t: &Option<Tensor>| {
            expand(
                t.as_ref().expect("kept for the gradient that reads it"),
                &self.out_shape,
            )
        };
        let ga = need_a.then(|| match self.op {
            BinaryOp::Add | BinaryOp::Sub => g.clone(),
            BinaryOp::Mul => {
                let mut ga = crate::pool::uninit(n);
                zip_into(&mut ga, &g, &kept(&self.b), |g, b| g * b);
                ga
            }
            BinaryOp::Div => {
                let mut ga = crate::pool::uninit(n);
                zip_into(&mut ga, &g, &kept(&self.b), |g, b| g / b);
                ga
            }
        });
        let gb = need_b.then(|| match self.op {
            BinaryOp::Add => g.clone(),
            BinaryOp::Sub => {
                let mut neg = crate::pool::uninit(n);
                map_into(&mut neg, &g, |x| -x);
                neg
            }
            BinaryOp::Mul => {
                let mut gb = crate::pool::uninit(n);
                zip_into(&mut gb, &g, &kept(&self.a), |g, a| g * a);
                gb
            }
            BinaryOp::Div => {
                let (a, b) = (kept(&self.a), kept(&self.b));
                let mut gb = crate::pool::uninit(n);
                for i in 0..n {
                    gb[i] = -g[i] * a[i] / (b[i] * b[i]);
                }
                gb
            }
        });
        Ok(vec![
            ga.map(|ga| {
                let da = sum_to_shape(ga, &self.out_shape, &self.a_shape);
                Tensor::from_f32_unchecked(da, &self.a_shape)
            }),
            gb.map(|gb| {
                let db = sum_to_shape(gb, &self.out_shape, &self.b_shape);
                Tensor::from_f32_unchecked(db, &self.b_shape)
            }),
        ])
    }
}

/// The value of a binary op through f32: operands widened (or borrowed when f32), broadcast
/// where needed, the result stored as `dtype`.
fn binary_value(
    a: &Tensor,
    b: &Tensor,
    shape: &[usize],
    f: fn(f32, f32) -> f32,
    dtype: crate::DType,
) -> Tensor {
    let numel: usize = shape.iter().product();
    let mut out = crate::pool::uninit(numel);
    if a.shape() == shape && b.shape() == shape {
        a.with_f32(|av| b.with_f32(|bv| zip_into(&mut out, av, bv, f)));
    } else if a.shape() == shape && shape.ends_with(b.shape()) {
        // Common case: a row vector (bias, scale) repeated over leading axes.
        let inner = b.numel().max(1);
        a.with_f32(|av| {
            b.with_f32(|bv| {
                for (o, x) in out.chunks_mut(inner).zip(av.chunks(inner)) {
                    for ((o, &x), &y) in o.iter_mut().zip(x).zip(bv) {
                        *o = f(x, y);
                    }
                }
            })
        });
    } else {
        let av = expand(a, shape);
        let bv = expand(b, shape);
        zip_into(&mut out, &av, &bv, f);
    }
    Tensor::from_f32_as(out, shape, dtype)
}

fn binary(a: &Tensor, b: &Tensor, op: BinaryOp) -> Result<Tensor> {
    if a.dtype() != b.dtype() {
        return Err(Error::DTypeMismatch {
            op: op.name(),
            lhs: a.dtype(),
            rhs: b.dtype(),
        });
    }
    let shape = broadcast_shape(op.name(), a.shape(), b.shape())?;
    let f = match op {
        BinaryOp::Add => |x: f32, y: f32| x + y,
        BinaryOp::Sub => |x: f32, y: f32| x - y,
        BinaryOp::Mul => |x: f32, y: f32| x * y,
        BinaryOp::Div => |x: f32, y: f32| x / y,
    };
    let out_dtype = output_dtype(Kind::Elementwise, a.dtype());
    let fused = if a.shape() == shape.as_slice()
        && b.shape() == shape.as_slice()
        && out_dtype == crate::DType::BF16
    {
        // bf16 in and out: one fused pass, no f32 copies.
        a.with_bf16(|av| {
            b.with_bf16(|bv| -> Vec<half::bf16> {
                match op {
                    BinaryOp::Add => zip_map(av, bv, |x, y| x + y),
                    BinaryOp::Sub => zip_map(av, bv, |x, y| x - y),
                    BinaryOp::Mul => zip_map(av, bv, |x, y| x * y),
                    BinaryOp::Div => zip_map(av, bv, |x, y| x / y),
                }
            })
        })
        .flatten()
    } else {
        None
    };
    let value = match fused {
        Some(v) => Tensor::over_buffer(crate::storage::Buffer::BF16(v), &shape),
        None => binary_value(a, b, &shape, f, out_dtype),
    };
    // Add and sub need only the shapes, so their inputs are not kept alive for backward; mul and
    // div keep what the needed gradients read.
    let needs = [a.requires_grad(), b.requires_grad()];
    let keep_a = match op {
        BinaryOp::Add | BinaryOp::Sub => false,
        BinaryOp::Mul | BinaryOp::Div => needs[1],
    };
    let keep_b = match op {
        BinaryOp::Add | BinaryOp::Sub => false,
        BinaryOp::Mul => needs[0],
        BinaryOp::Div => needs[0] || needs[1],
    };
    Ok(Tensor::from_op(
        value,
        &[a, b],
        BinaryBackward {
            op,
            a: keep_a.then(|| a.data()),
            b: keep_b.then(|| b.data()),
            needs,
            a_shape: a.shape().to_vec(),
            b_shape: b.shape().to_vec(),
            out_shape: shape,
        },
    ))
}

#[derive(Clone, Copy)]
enum Unary {
    Relu,
    GeluTanh,
    GeluErf,
    Silu,
    Sigmoid,
    LogSigmoid,
    Tanh,
    Exp,
    Log,
    Scale(f32),
    AddScalar(f32),
}

impl Unary {
    /// The exact GELU, or its tanh approximation.
    fn gelu(exact: bool) -> Unary {
        if exact {
            Unary::GeluErf
        } else {
            Unary::GeluTanh
        }
    }

    fn name(self) -> &'static str {
        match self {
            Unary::Relu => "relu",
            Unary::GeluTanh => "gelu_tanh",
            Unary::GeluErf => "gelu",
            Unary::Silu => "silu",
            Unary::Sigmoid => "sigmoid",
            Unary::LogSigmoid => "log_sigmoid",
            Unary::Tanh => "tanh",
            Unary::Exp => "exp",
            Unary::Log => "log",
            Unary::Scale(_) => "scale",
            Unary::AddScalar(_) => "add_scalar",
        }
    }

    #[inline(always)]
    fn forward(self, x: f32) -> f32 {
        match self {
            Unary::Relu => x.max(0.0),
            Unary::GeluTanh => {
                let u = GELU_K * (x + 0.044715 * x * x * x);
                0.5 * x * (1.0 + crate::kernels::fast_tanh(u))
            }
            // x·Φ(x), Φ to 2.5e-7 (`fast_normal_cdf`).
            Unary::GeluErf => x * crate::kernels::fast_normal_cdf(x),
            Unary::Silu => x / (1.0 + crate::kernels::fast_exp(-x)),
            Unary::Sigmoid => 1.0 / (1.0 + crate::kernels::fast_exp(-x)),
            // min(x, 0) − ln(1 + e^−|x|): no overflow for any x, exact where e^−|x| is tiny.
            Unary::LogSigmoid => x.min(0.0) - (-x.abs()).exp().ln_1p(),
            Unary::Tanh => crate::kernels::fast_tanh(x),
            Unary::Exp => x.exp(),
            Unary::Log => x.ln(),
            Unary::Scale(c) => x * c,
            Unary::AddScalar(c) => x + c,
        }
    }

    /// d(forward)/dx at x.
    #[inline(always)]
    fn derivative(self, x: f32) -> f32 {
        match self {
            Unary::Relu => {
                if x > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Unary::GeluTanh => {
                let x2 = x * x;
                let u = GELU_K * (x + 0.044715 * x2 * x);
                let t = crate::kernels::fast_tanh(u);
                let du = GELU_K * (1.0 + 3.0 * 0.044715 * x2);
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
            }
            Unary::GeluErf => {
                let (cdf, pdf) = crate::kernels::fast_normal_cdf_pdf(x);
                cdf + x * pdf
            }
            Unary::Silu => {
                let s = 1.0 / (1.0 + crate::kernels::fast_exp(-x));
                s * (1.0 + x * (1.0 - s))
            }
            Unary::Sigmoid => {
                let s = 1.0 / (1.0 + crate::kernels::fast_exp(-x));
                s * (1.0 - s)
            }
            // d/dx ln σ(x) = 1 − σ(x) = σ(−x).
            Unary::LogSigmoid => 1.0 / (1.0 + x.exp()),
            Unary::Tanh => {
                let t = crate::kernels::fast_tanh(x);
                1.0 - t * t
            }
            Unary::Exp => x.exp(),
            Unary::Log => 1.0 / x,
            Unary::Scale(c) => c,
            Unary::AddScalar(_) => 1.0,
        }
    }
}

/// sqrt(2/pi), the constant of the tanh approximation of GELU.
const GELU_K: f32 = 0.797_884_6;

struct UnaryBackward {
    op: Unary,
    /// The input, kept only by ops whose derivative depends on it (not scale, add_scalar).
    x: Option<Tensor>,
}

impl Backward for UnaryBackward {
    fn name(&self) -> &'static str {
        self.op.name()
    }
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let op = self.op;
        if let Unary::AddScalar(_) = op {
            return Ok(vec![Some(grad.clone())]);
        }
        let out = match op {
            Unary::Scale(c) => {
                let mut out = crate::pool::uninit(grad.numel());
                grad.with_f32(|g| map_into(&mut out, g, |g| g * c));
                out
            }
            _ => derivative_value(op, grad, self.x.as_ref().expect("kept for this op")),
        };
        Ok(vec![Some(Tensor::from_f32_unchecked(out, grad.shape()))])
    }
}

/// Evaluates `$body` with `$f` bound to the function `op` computes, once per op, so that every
/// loop `$body` runs is monomorphised for its op and vectorises.
macro_rules! with_forward {
    ($op:expr, |$f:ident| $body:expr) => {
        match $op {
            Unary::Relu => {
                let $f = |x: f32| Unary::Relu.forward(x);
                $body
            }
            Unary::GeluTanh => {
                let $f = |x: f32| Unary::GeluTanh.forward(x);
                $body
            }
            Unary::GeluErf => {
                let $f = |x: f32| Unary::GeluErf.forward(x);
                $body
            }
            Unary::Silu => {
                let $f = |x: f32| Unary::Silu.forward(x);
                $body
            }
            Unary::Sigmoid => {
                let $f = |x: f32| Unary::Sigmoid.forward(x);
                $body
            }
            Unary::LogSigmoid => {
                let $f = |x: f32| Unary::LogSigmoid.forward(x);
                $body
            }
            Unary::Tanh => {
                let $f = |x: f32| Unary::Tanh.forward(x);
                $body
            }
            Unary::Exp => {
                let $f = |x: f32| x.exp();
                $body
            }
            Unary::Log => {
                let $f = |x: f32| x.ln();
                $body
            }
            Unary::Scale(c) => {
                let $f = move |x: f32| x * c;
                $body
            }
            Unary::AddScalar(c) => {
                let $f = move |x: f32| x + c;
                $body
            }
        }
    };
}

/// `out = g · op'(x)`, one monomorphised loop per op.
fn derivative_all<X: Widen>(op: Unary, out: &mut [f32], g: &[f32], x: &[X]) {
    match op {
        Unary::Relu => zip_into(out, g, x, |g, x| g * Unary::Relu.derivative(x)),
        Unary::GeluTanh => zip_into(out, g, x, |g, x| g * Unary::GeluTanh.derivative(x)),
        Unary::GeluErf => zip_into(out, g, x, |g, x| g * Unary::GeluErf.derivative(x)),
        Unary::Silu => zip_into(out, g, x, |g, x| g * Unary::Silu.derivative(x)),
        Unary::Sigmoid => zip_into(out, g, x, |g, x| g * Unary::Sigmoid.derivative(x)),
        Unary::LogSigmoid => zip_into(out, g, x, |g, x| g * Unary::LogSigmoid.derivative(x)),
        Unary::Tanh => zip_into(out, g, x, |g, x| g * Unary::Tanh.derivative(x)),
        Unary::Exp => zip_into(out, g, x, |g, x| g * x.exp()),
        Unary::Log => zip_into(out, g, x, |g, x| g / x),
        Unary::Scale(_) | Unary::AddScalar(_) => unreachable!("handled in UnaryBackward"),
    }
}

/// `op(x)` stored as `x`'s elementwise output dtype: bf16 to bf16 in one fused pass, anything
/// else through f32.
fn forward_value(op: Unary, x: &Tensor) -> Tensor {
    let dtype = output_dtype(Kind::Elementwise, x.dtype());
    if dtype == crate::DType::BF16 {
        if let Some(v) = x.with_bf16(|v| with_forward!(op, |f| map_to::<_, half::bf16>(v, f))) {
            return Tensor::over_buffer(crate::storage::Buffer::BF16(v), x.shape());
        }
    }
    let mut out = crate::pool::uninit(x.numel());
    x.with_f32(|v| with_forward!(op, |f| map_into(&mut out, v, f)));
    Tensor::from_f32_as(out, x.shape(), dtype)
}

/// `g · op'(x)` in f32, reading a contiguous bf16 `x` in place.
fn derivative_value(op: Unary, g: &Tensor, x: &Tensor) -> Vec<f32> {
    let mut out = crate::pool::uninit(g.numel());
    g.with_f32(|g| {
        if x.with_bf16(|x| derivative_all(op, &mut out, g, x))
            .is_none()
        {
            x.with_f32(|x| derivative_all(op, &mut out, g, x))
        }
    });
    out
}

/// GELU (erf, or the tanh approximation) of every element of `x`, as `Tensor::gelu` and
/// `Tensor::gelu_tanh` compute it, rounded to `x`'s dtype.
pub(crate) fn gelu_values(x: &Tensor, exact: bool) -> Tensor {
    forward_value(Unary::gelu(exact), x)
}

/// `g · gelu'(x)`, as the backward of `Tensor::gelu` (or `gelu_tanh`) computes it.
pub(crate) fn gelu_grad(g: &Tensor, x: &Tensor, exact: bool) -> Tensor {
    Tensor::from_f32_unchecked(derivative_value(Unary::gelu(exact), g, x), g.shape())
}

fn unary(x: &Tensor, op: Unary) -> Tensor {
    let value = forward_value(op, x);
    let saved = match op {
        Unary::Scale(_) | Unary::AddScalar(_) => None,
        _ => Some(x.data()),
    };
    Tensor::from_op(value, &[x], UnaryBackward { op, x: saved })
}

impl Tensor {
    /// Elementwise sum with broadcasting.
    pub fn add(&self, rhs: &Tensor) -> Result<Tensor> {
        binary(self, rhs, BinaryOp::Add)
    }
    /// Elementwise difference with broadcasting.
    pub fn sub(&self, rhs: &Tensor) -> Result<Tensor> {
        binary(self, rhs, BinaryOp::Sub)
    }
    /// Elementwise product with broadcasting.
    pub fn mul(&self, rhs: &Tensor) -> Result<Tensor> {
        binary(self, rhs, BinaryOp::Mul)
    }
    /// Elementwise quotient with broadcasting.
    pub fn div(&self, rhs: &Tensor) -> Result<Tensor> {
        binary(self, rhs, BinaryOp::Div)
    }
    /// max(x, 0).
    pub fn relu(&self) -> Tensor {
        unary(self, Unary::Relu)
    }
    /// GELU with the tanh approximation used by GPT-2:
    /// 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) (Hendrycks & Gimpel 2016).
    pub fn gelu_tanh(&self) -> Tensor {
        unary(self, Unary::GeluTanh)
    }
    /// Exact GELU, x·Φ(x) with Φ the standard normal CDF (Hendrycks & Gimpel 2016).
    pub fn gelu(&self) -> Tensor {
        unary(self, Unary::GeluErf)
    }
    /// SiLU / swish, x·σ(x) (Elfwing et al. 2018), the Llama MLP activation.
    pub fn silu(&self) -> Tensor {
        unary(self, Unary::Silu)
    }
    /// The logistic sigmoid σ(x) = 1/(1 + e⁻ˣ).
    pub fn sigmoid(&self) -> Tensor {
        unary(self, Unary::Sigmoid)
    }

    /// ln σ(x), computed without overflow for any x (the log-likelihood of a logistic
    /// preference: Bradley–Terry and DPO losses are −ln σ of a margin).
    pub fn log_sigmoid(&self) -> Tensor {
        unary(self, Unary::LogSigmoid)
    }
    /// The hyperbolic tangent (BERT's pooler).
    pub fn tanh(&self) -> Tensor {
        unary(self, Unary::Tanh)
    }
    /// eˣ.
    pub fn exp(&self) -> Tensor {
        unary(self, Unary::Exp)
    }
    /// Natural logarithm.
    pub fn log(&self) -> Tensor {
        unary(self, Unary::Log)
    }
    /// x·c.
    pub fn scale(&self, c: f32) -> Tensor {
        unary(self, Unary::Scale(c))
    }
    /// x + c.
    pub fn add_scalar(&self, c: f32) -> Tensor {
        unary(self, Unary::AddScalar(c))
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::{assert_grads, randn};
    use crate::Tensor;

    #[test]
    fn broadcasting_arithmetic_grads() {
        let a = randn(&[2, 3, 4], 1);
        let b = randn(&[3, 1], 2);
        assert_grads(|x| x[0].add(&x[1]), &[a.clone(), b.clone()]);
        assert_grads(|x| x[0].sub(&x[1]), &[a.clone(), b.clone()]);
        assert_grads(|x| x[0].mul(&x[1]), &[a.clone(), randn(&[4], 3)]);
        let pos = randn(&[3, 1], 4).exp().add_scalar(0.5);
        assert_grads(|x| x[0].div(&x[1]), &[a.clone(), pos]);
        assert_grads(|x| x[0].add(&x[1]), &[randn(&[3, 4], 5), randn(&[3, 4], 6)]);
    }

    #[test]
    fn a_frozen_operand_gets_no_gradient_and_the_other_the_same_one() {
        let (a0, b0) = (randn(&[2, 3, 4], 7), randn(&[3, 1], 8).exp());
        for op in 0..4 {
            let grads = |train_a: bool, train_b: bool| {
                let a = if train_a {
                    a0.requires_grad_()
                } else {
                    a0.clone()
                };
                let b = if train_b {
                    b0.requires_grad_()
                } else {
                    b0.clone()
                };
                let y = match op {
                    0 => a.add(&b),
                    1 => a.sub(&b),
                    2 => a.mul(&b),
                    _ => a.div(&b),
                }
                .unwrap();
                y.mul(&y).unwrap().sum_all().unwrap().backward().unwrap();
                (
                    a.grad().map(|g| g.to_vec_f32()),
                    b.grad().map(|g| g.to_vec_f32()),
                )
            };
            let (ga, gb) = grads(true, true);
            assert_eq!(grads(true, false), (ga, None), "op {op}");
            assert_eq!(grads(false, true), (None, gb), "op {op}");
        }
    }

    #[test]
    fn broadcast_values() {
        let a = Tensor::from_f32(vec![1., 2., 3., 4.], &[2, 2]).unwrap();
        let b = Tensor::from_f32(vec![10., 20.], &[2, 1]).unwrap();
        assert_eq!(a.add(&b).unwrap().to_vec_f32(), vec![11., 12., 23., 24.]);
        assert!(a.add(&randn(&[3], 1)).is_err());
    }

    #[test]
    fn activation_grads() {
        let x = randn(&[5, 7], 7);
        assert_grads(|x| Ok(x[0].gelu_tanh()), &[x.clone()]);
        assert_grads(|x| Ok(x[0].gelu()), &[x.clone()]);
        assert_grads(|x| Ok(x[0].silu()), &[x.clone()]);
        assert_grads(|x| Ok(x[0].sigmoid()), &[x.clone()]);
        assert_grads(|x| Ok(x[0].log_sigmoid()), &[x.clone()]);
        assert_grads(|x| Ok(x[0].tanh()), &[x.clone()]);
        // ln σ at the extremes: −x far left (no overflow), −e⁻ˣ far right (no loss to 1).
        let l = Tensor::from_f32(vec![-100.0, 0.0, 30.0], &[3])
            .unwrap()
            .log_sigmoid()
            .to_vec_f32();
        assert_eq!(l[0], -100.0);
        assert!((l[1] - (-std::f32::consts::LN_2)).abs() < 1e-7, "{}", l[1]);
        assert!((l[2] + (-30.0f32).exp()).abs() < 1e-18, "{}", l[2]);
        let t = Tensor::from_f32(vec![-20.0, -0.5, 0.0, 1.0], &[4])
            .unwrap()
            .tanh();
        for (got, want) in t
            .to_vec_f32()
            .iter()
            .zip([-1.0f32, -0.462_117_2, 0.0, 0.761_594_2])
        {
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
        let s = Tensor::from_f32(vec![-30.0, -1.0, 0.0, 2.0, 30.0], &[5])
            .unwrap()
            .sigmoid();
        let want = [0.0, 0.268_941_4, 0.5, 0.880_797_1, 1.0];
        for (got, want) in s.to_vec_f32().iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        assert_grads(|x| Ok(x[0].exp()), &[x.clone()]);
        assert_grads(|x| Ok(x[0].scale(-3.0).add_scalar(2.0)), &[x.clone()]);
        assert_grads(|x| Ok(x[0].exp().add_scalar(0.1).log()), &[x.clone()]);
        // ReLU: keep away from the kink at 0 where finite differences are meaningless.
        let away = Tensor::from_f32(
            x.to_vec_f32()
                .iter()
                .map(|v| if v.abs() < 0.05 { 0.5 } else { *v })
                .collect(),
            &[5, 7],
        )
        .unwrap();
        assert_grads(|x| Ok(x[0].relu()), &[away]);
    }

    #[test]
    fn gelu_values() {
        let x = Tensor::from_f32(vec![-3.0, -1.0, 0.0, 0.5, 2.0], &[5]).unwrap();
        // 0.5·x·(1 + erf(x/√2)) from a reference implementation.
        let want = [-0.004_049_7, -0.158_655_26, 0.0, 0.345_731_14, 1.954_499_7];
        for (g, w) in x.gelu().to_vec_f32().iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
    }
}
