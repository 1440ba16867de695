//! Fused multi-head scaled dot-product attention (Vaswani et al. 2017), causal or with a key
//! padding mask, with grouped key/value heads (Ainslie et al. 2023, as in Llama 2), and rotary
//! position embeddings (Su et al. 2021) as a separate op.
//!
//! Memory follows FlashAttention (Dao et al. 2022): forward keeps only the output and one
//! log-sum-exp per query row; backward recomputes each block of probabilities from Q, K and the
//! log-sum-exp, so no B×H×T×S probability tensor outlives a block of 64 query rows. Under a causal
//! mask, blocks of keys entirely in the future are skipped, halving the work.
//!
//! Inputs are read in place through their strides (the last axis must be unit-stride), so the
//! query, key and value slices of one packed projection are used without copies.

use rayon::prelude::*;

use super::gemm_bf16::gemm_on;
use super::matmul::{gemm_f32, Mat, Operand, SendPtr};
use crate::autocast::{output_dtype, Kind};
use crate::autograd::Backward;
use crate::backend::{product_kernel, ProductKernel};
use crate::error::{invalid, Error, Result};
use crate::storage::Buffer;
use crate::{DType, Tensor};

/// Query rows per block under a causal mask (64 measured fastest of 16, 32, 64 and 128 on the GPT
/// benchmark shapes: smaller blocks skip more of the future).
const CAUSAL_BLOCK: usize = 64;
/// Without a causal mask nothing is skipped, so blocks grow until a block of scores reaches this
/// many elements (256 KiB, within L2) or [`MAX_BLOCK`] rows: fewer, larger products. Measured on
/// BERT's shapes (T = S = 256, D = 32), 256-row blocks took 0.85x the time of 64-row ones.
const BLOCK_SCORES: usize = 1 << 16;
const MAX_BLOCK: usize = 256;

/// Options of [`Tensor::attention`].
#[derive(Clone, Debug, Default)]
pub struct AttentionOptions {
    /// Query i sees keys j ≤ i + (S − T) only.
    pub causal: bool,
    /// `[B, S]` flags, `true` where the key is real and `false` where it is padding.
    pub key_padding_mask: Option<Vec<bool>>,
    /// Multiplies the scores; defaults to 1/√D.
    pub scale: Option<f32>,
    /// Keep the probabilities for backward (B·H·T·S values) instead of recomputing them from
    /// the log-sum-exp: no recomputation, at the memory FlashAttention saves.
    pub save_probs: bool,
}

/// How one tensor's `[B, L, H, D]` elements sit in memory (element strides; D is unit-stride).
#[derive(Clone, Copy)]
struct Heads {
    /// The f32 elements; null when only `half` is given.
    ptr: *const f32,
    /// The same elements in bf16, read in place by the bf16 kernels (null when not given): the
    /// queries, keys and values of a bf16 attention enter products only, so they are never
    /// widened.
    half: *const u16,
    sb: usize,
    sl: usize,
    sh: usize,
}
unsafe impl Send for Heads {}
unsafe impl Sync for Heads {}

impl Heads {
    /// Rows `from..to` of head `h` in batch `b`, as a matrix.
    ///
    /// # Safety
    /// `b`, `h` and `to - 1` must be within the `[B, L, H, D]` tensor whose buffer `ptr` points
    /// into, `from <= to` and `d <= D`, and the buffer must outlive the returned matrix: the
    /// offset is computed without bounds checks.
    unsafe fn mat(&self, b: usize, h: usize, from: usize, to: usize, d: usize) -> Mat {
        unsafe { self.mat_of(self.ptr, b, h, from, to, d) }
    }

    /// [`Heads::mat`] as a product operand: the bf16 elements in place when given.
    ///
    /// # Safety
    /// As [`Heads::mat`].
    unsafe fn operand(&self, b: usize, h: usize, from: usize, to: usize, d: usize) -> Operand {
        if self.half.is_null() {
            Operand::F32(unsafe { self.mat(b, h, from, to, d) })
        } else {
            Operand::Bf16(unsafe { self.mat_of(self.half, b, h, from, to, d) })
        }
    }

    /// The matrix of [`Heads::mat`] over the elements at `base` (`ptr` or `half`).
    ///
    /// # Safety
    /// As [`Heads::mat`], for `base`.
    unsafe fn mat_of<T>(
        &self,
        base: *const T,
        b: usize,
        h: usize,
        from: usize,
        to: usize,
        d: usize,
    ) -> Mat<T> {
        Mat {
            // SAFETY: in bounds of the buffer by the caller's contract.
            ptr: unsafe { base.add(b * self.sb + from * self.sl + h * self.sh) },
            rows: to - from,
            cols: d,
            rs: self.sl as isize,
            cs: 1,
            batch: 1,
            bs: 0,
        }
    }
}

#[derive(Clone, Copy)]
struct Geometry {
    b: usize,
    t: usize,
    s: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    scale: f32,
    causal: bool,
    /// The kernel of the blocks' products, chosen where the op is issued: bf16 inputs multiply
    /// on the bf16 kernel path where there is one (the probabilities and gradient blocks rounded
    /// to bf16 as they are packed, as autocast attention does elsewhere), in f32 otherwise.
    kernel: ProductKernel,
}

/// `dst (+)= a·b` for one block, on `g`'s kernel, on this thread: on a bf16 kernel f32 operands
/// too are multiplied in bf16.
///
/// # Safety
/// As [`gemm_f32`]; the CPU can run the kernel.
#[inline(always)]
unsafe fn product(
    g: &Geometry,
    dst: *mut f32,
    drs: isize,
    accumulate: bool,
    a: Operand,
    b: Operand,
) {
    match (g.kernel, a, b) {
        (ProductKernel::Bf16(unit), a, b) => gemm_on(unit, dst, drs, 1, accumulate, a, b, 1),
        (ProductKernel::F32, Operand::F32(a), Operand::F32(b)) => {
            gemm_f32(dst, drs, 1, accumulate, a, b, 1)
        }
        _ => unreachable!("bf16 heads are given only to the bf16 kernels"),
    }
}

impl Geometry {
    /// Query rows per block.
    fn block(&self) -> usize {
        if self.causal {
            CAUSAL_BLOCK
        } else {
            (BLOCK_SCORES / self.s.max(1)).clamp(CAUSAL_BLOCK, MAX_BLOCK)
        }
    }

    /// Keys visible to query rows `from..to` (causal: up to the last row's diagonal).
    fn key_end(&self, to: usize) -> usize {
        if self.causal {
            (to + self.s - self.t).min(self.s)
        } else {
            self.s
        }
    }
}

/// Query rows `from..to` of head `h` (sharing KV head `kvh`) in batch `b`, and the keys `0..kend`
/// they can see.
#[derive(Clone, Copy)]
struct Block {
    b: usize,
    h: usize,
    kvh: usize,
    from: usize,
    to: usize,
    kend: usize,
}

impl Block {
    fn new(g: &Geometry, b: usize, h: usize, from: usize) -> Block {
        let to = (from + g.block()).min(g.t);
        Block {
            b,
            h,
            kvh: h / (g.hq / g.hkv),
            from,
            to,
            kend: g.key_end(to),
        }
    }

    fn rows(&self) -> usize {
        self.to - self.from
    }
}

/// Probabilities of a block of query rows `from..to` of head `h`: fills `p` (rows × kend) with
/// scale·QKᵀ, masks, and turns each row into softmax using `lse` if given, else computing it.
#[inline(always)]
unsafe fn block_probs(
    g: &Geometry,
    q: &Heads,
    k: &Heads,
    mask: Option<&[bool]>,
    blk: Block,
    p: &mut [f32],
    lse_in: Option<&[f32]>,
    lse_out: Option<&mut [f32]>,
) {
    let Block {
        b,
        h,
        kvh,
        from,
        to,
        kend,
    } = blk;
    let qm = q.operand(b, h, from, to, g.d);
    let km = k.operand(b, kvh, 0, kend, g.d);
    product(g, p.as_mut_ptr(), kend as isize, false, qm, km.t());
    let mut lse_out = lse_out;
    for (r, row) in p.chunks_mut(kend.max(1)).enumerate() {
        let i = from + r;
        // Keys after `visible` are in the future of query i.
        let visible = if g.causal {
            (i + g.s - g.t + 1).min(kend)
        } else {
            kend
        };
        row[visible..].fill(0.0);
        let vis = &mut row[..visible];
        // A positive scale is applied inside the exponential rather than in a pass of its own:
        // rounding is monotonic, so max(scale·s) = scale·max(s) and every value is the same.
        let k = if g.scale > 0.0 {
            g.scale
        } else {
            vis.iter_mut().for_each(|x| *x *= g.scale);
            1.0
        };
        if let Some(m) = mask {
            let keys = &m[b * g.s..b * g.s + visible];
            for (x, &keep) in vis.iter_mut().zip(keys) {
                if !keep {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        // e = exp(k·s − shift), with masked (−∞) scores exactly 0, which the clamped fast exp alone
        // would not give. Written as a select and summed apart so that both loops vectorise.
        let exp_row = |vis: &mut [f32], shift: f32| -> f32 {
            for x in vis.iter_mut() {
                let e = crate::kernels::fast_exp(*x * k - shift);
                *x = if *x == f32::NEG_INFINITY { 0.0 } else { e };
            }
            crate::kernels::sum(vis)
        };
        let lse = match lse_in {
            Some(l) => {
                if l[r] == f32::NEG_INFINITY {
                    vis.fill(0.0);
                } else {
                    exp_row(vis, l[r]);
                }
                l[r]
            }
            None => {
                let max = crate::kernels::max(vis) * k;
                if max == f32::NEG_INFINITY {
                    vis.fill(0.0);
                    f32::NEG_INFINITY
                } else {
                    // One exponential per score: e = exp(s − max), normalised by its sum.
                    let sum = exp_row(vis, max);
                    let inv = 1.0 / sum;
                    vis.iter_mut().for_each(|x| *x *= inv);
                    max + sum.ln()
                }
            }
        };
        if let Some(out) = lse_out.as_deref_mut() {
            out[r] = lse;
        }
    }
}

/// Forward: writes `out` (`[B, T, Hq, D]` contiguous) and `lse` (`[B, Hq, T]`), and with `save`
/// the probabilities (`[B, Hq, T, S]`, each row's visible keys).
fn forward(
    g: Geometry,
    q: Heads,
    k: Heads,
    v: Heads,
    mask: Option<&[bool]>,
    save: bool,
) -> (Vec<f32>, Vec<f32>, Option<Vec<f32>>) {
    let mut out = crate::pool::uninit(g.b * g.t * g.hq * g.d);
    let mut lse = crate::pool::zeros(g.b * g.hq * g.t);
    let mut probs = save.then(|| crate::pool::uninit(g.b * g.hq * g.t * g.s));
    let saved = probs.as_mut().map(|p| SendPtr(p.as_mut_ptr()));
    let o = Heads {
        ptr: out.as_mut_ptr(),
        half: std::ptr::null(),
        sb: g.t * g.hq * g.d,
        sl: g.hq * g.d,
        sh: g.d,
    };
    lse.par_chunks_mut(g.t.max(1))
        .enumerate()
        .for_each(|(bh, lse_bh)| {
            crate::kernels::vectorized(|| {
                let (b, h) = (bh / g.hq, bh % g.hq);
                let mut p = crate::pool::zeros(g.block() * g.s);
                for from in (0..g.t).step_by(g.block()) {
                    let blk = Block::new(&g, b, h, from);
                    let Block { kvh, to, kend, .. } = blk;
                    let p = &mut p[..blk.rows() * kend];
                    unsafe {
                        block_probs(&g, &q, &k, mask, blk, p, None, Some(&mut lse_bh[from..to]));
                        if let Some(base) = &saved {
                            // SAFETY: each (batch, head) writes its own [T, S] plane of `probs`.
                            for (r, row) in p.chunks_exact(kend.max(1)).enumerate() {
                                let dst = base.0.add((bh * g.t + from + r) * g.s);
                                std::ptr::copy_nonoverlapping(row.as_ptr(), dst, row.len());
                            }
                        }
                        let pm = Mat::dense(p.as_ptr(), blk.rows(), kend);
                        let om = o.mat(b, h, from, to, g.d);
                        product(
                            &g,
                            om.ptr as *mut f32,
                            om.rs,
                            false,
                            Operand::F32(pm),
                            v.operand(b, kvh, 0, kend, g.d),
                        );
                    }
                }
            })
        });
    (out, lse, probs)
}

/// Backward: accumulates dQ, dK, dV into the given (zeroed) strided buffers.
#[allow(clippy::too_many_arguments)]
fn backward(
    g: Geometry,
    q: Heads,
    k: Heads,
    v: Heads,
    o: Heads,
    d_o: Heads,
    lse: &[f32],
    probs: Option<&[f32]>,
    mask: Option<&[bool]>,
    dq: Heads,
    dk: Heads,
    dv: Heads,
) {
    let args = BackwardArgs {
        g,
        q,
        k,
        v,
        o,
        d_o,
        lse,
        probs,
        mask,
        dq,
        dk,
        dv,
    };
    // One task per (batch, kv head): the query heads sharing it accumulate into the same dK, dV.
    (0..g.b * g.hkv).into_par_iter().for_each(|task| {
        // SAFETY: tasks write disjoint (batch, KV head) slices of the gradients.
        unsafe {
            #[cfg(target_arch = "x86_64")]
            if crate::kernels::has_avx2_fma() {
                return backward_task_avx2(&args, task);
            }
            backward_task(&args, task)
        }
    });
}

/// The operands and gradient buffers of one [`backward`] call, shared by its tasks.
struct BackwardArgs<'a> {
    g: Geometry,
    q: Heads,
    k: Heads,
    v: Heads,
    o: Heads,
    d_o: Heads,
    lse: &'a [f32],
    probs: Option<&'a [f32]>,
    mask: Option<&'a [bool]>,
    dq: Heads,
    dk: Heads,
    dv: Heads,
}

/// [`backward_task`] compiled for AVX2 and FMA. A closure this large handed to
/// `kernels::vectorized` is not inlined into its AVX2 frame, so its loops (the exponentials above
/// all) ran 4 wide; this entry point is the explicit form of the same dispatch.
///
/// # Safety
/// As [`backward_task`], on a CPU with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn backward_task_avx2(args: &BackwardArgs, task: usize) {
    // SAFETY: the caller's contract.
    unsafe { backward_task(args, task) }
}

/// One (batch, KV head) of [`backward`].
///
/// # Safety
/// `task` < B·Hkv, and the heads describe live buffers of `g`'s shapes; no other task writes
/// this task's rows of `dq`, `dk` and `dv`.
#[inline(always)]
unsafe fn backward_task(args: &BackwardArgs, task: usize) {
    let BackwardArgs {
        g,
        q,
        k,
        v,
        o,
        d_o,
        lse,
        probs,
        mask,
        dq,
        dk,
        dv,
    } = *args;
    let group = g.hq / g.hkv;
    let (b, kvh) = (task / g.hkv, task % g.hkv);
    let mut p = crate::pool::zeros(g.block() * g.s);
    let mut dp = crate::pool::zeros(g.block() * g.s);
    let mut di = crate::pool::zeros(g.block());
    for h in kvh * group..(kvh + 1) * group {
        let lse_bh = &lse[(b * g.hq + h) * g.t..(b * g.hq + h + 1) * g.t];
        for from in (0..g.t).step_by(g.block()) {
            let blk = Block::new(&g, b, h, from);
            let Block { to, kend, .. } = blk;
            let rows = blk.rows();
            let p = &mut p[..rows * kend];
            let dp = &mut dp[..rows * kend];
            unsafe {
                match probs {
                    Some(all) => {
                        let plane = &all[(b * g.hq + h) * g.t * g.s..];
                        for (r, row) in p.chunks_exact_mut(kend.max(1)).enumerate() {
                            let at = (from + r) * g.s;
                            row.copy_from_slice(&plane[at..at + row.len()]);
                        }
                    }
                    None => block_probs(&g, &q, &k, mask, blk, p, Some(&lse_bh[from..to]), None),
                }
                let dom = d_o.mat(b, h, from, to, g.d);
                // dP = dO · Vᵀ
                product(
                    &g,
                    dp.as_mut_ptr(),
                    kend as isize,
                    false,
                    Operand::F32(dom),
                    v.operand(b, kvh, 0, kend, g.d).t(),
                );
                // D_i = Σ_d dO·O
                let om = o.mat(b, h, from, to, g.d);
                for r in 0..rows {
                    let orow = std::slice::from_raw_parts(om.ptr.offset(r as isize * om.rs), g.d);
                    let grow = std::slice::from_raw_parts(dom.ptr.offset(r as isize * dom.rs), g.d);
                    di[r] = crate::kernels::dot(orow, grow);
                }
                // dS = P ∘ (dP − D), scaled by the score scale
                for ((pr, dpr), &d) in p
                    .chunks_exact(kend.max(1))
                    .zip(dp.chunks_exact_mut(kend.max(1)))
                    .zip(&di[..rows])
                {
                    for (x, &pj) in dpr.iter_mut().zip(pr) {
                        *x = pj * (*x - d) * g.scale;
                    }
                }
                let pm = Mat::dense(p.as_ptr(), rows, kend);
                let dsm = Mat::dense(dp.as_ptr(), rows, kend);
                // dV += Pᵀ · dO
                let dvm = dv.mat(b, kvh, 0, kend, g.d);
                product(
                    &g,
                    dvm.ptr as *mut f32,
                    dvm.rs,
                    true,
                    Operand::F32(pm.t()),
                    Operand::F32(dom),
                );
                // dQ = dS · K
                let dqm = dq.mat(b, h, from, to, g.d);
                product(
                    &g,
                    dqm.ptr as *mut f32,
                    dqm.rs,
                    true,
                    Operand::F32(dsm),
                    k.operand(b, kvh, 0, kend, g.d),
                );
                // dK += dSᵀ · Q
                let dkm = dk.mat(b, kvh, 0, kend, g.d);
                product(
                    &g,
                    dkm.ptr as *mut f32,
                    dkm.rs,
                    true,
                    Operand::F32(dsm.t()),
                    q.operand(b, h, from, to, g.d),
                );
            }
        }
    }
}

/// Runs `f` with `[B, L, H, D]` head layouts of f32 tensors (converting half types or a
/// non-unit-stride last axis into a temporary).
fn with_heads<R>(t: &Tensor, f: impl FnOnce(Heads) -> R) -> R {
    with_heads_for(t, false, f)
}

/// [`with_heads`] for a tensor that enters products only: with `half` (the bf16 kernels run) a
/// bf16 tensor is read in place, not widened.
fn with_heads_for<R>(t: &Tensor, half: bool, f: impl FnOnce(Heads) -> R) -> R {
    if half && t.dtype() == DType::BF16 && t.strides()[3] == 1 {
        let buf = t.storage().read();
        if let Buffer::BF16(v) = &*buf {
            let s = t.strides();
            return f(Heads {
                ptr: std::ptr::null(),
                half: unsafe { (v.as_ptr() as *const u16).add(t.offset()) },
                sb: s[0],
                sl: s[1],
                sh: s[2],
            });
        }
    }
    let usable = t.dtype() == DType::F32 && t.strides()[3] == 1;
    let tmp;
    let src = if usable {
        t
    } else {
        tmp = Tensor::from_f32_unchecked(t.to_vec_f32(), t.shape());
        &tmp
    };
    let buf = src.storage().read();
    let Buffer::F32(v) = &*buf else {
        unreachable!("f32 checked above")
    };
    let s = src.strides();
    f(Heads {
        ptr: unsafe { v.as_ptr().add(src.offset()) },
        half: std::ptr::null(),
        sb: s[0],
        sl: s[1],
        sh: s[2],
    })
}

fn contiguous_heads(buf: &mut [f32], l: usize, h: usize, d: usize) -> Heads {
    Heads {
        ptr: buf.as_mut_ptr(),
        half: std::ptr::null(),
        sb: l * h * d,
        sl: h * d,
        sh: d,
    }
}

struct AttentionBackward {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Vec<f32>,
    probs: Option<Vec<f32>>,
    mask: Option<Vec<bool>>,
    geometry: Geometry,
}

impl Backward for AttentionBackward {
    fn name(&self) -> &'static str {
        "attention"
    }
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let g = self.geometry;
        let mut dq = crate::pool::zeros(g.b * g.t * g.hq * g.d);
        let mut dk = crate::pool::zeros(g.b * g.s * g.hkv * g.d);
        let mut dv = crate::pool::zeros(g.b * g.s * g.hkv * g.d);
        let (dqh, dkh, dvh) = (
            contiguous_heads(&mut dq, g.t, g.hq, g.d),
            contiguous_heads(&mut dk, g.s, g.hkv, g.d),
            contiguous_heads(&mut dv, g.s, g.hkv, g.d),
        );
        let half = self.geometry.kernel != ProductKernel::F32;
        with_heads_for(&self.q, half, |q| {
            with_heads_for(&self.k, half, |k| {
                with_heads_for(&self.v, half, |v| {
                    with_heads(&self.out, |o| {
                        with_heads(&grad.contiguous_data(), |d_o| {
                            backward(
                                g,
                                q,
                                k,
                                v,
                                o,
                                d_o,
                                &self.lse,
                                self.probs.as_deref(),
                                self.mask.as_deref(),
                                dqh,
                                dkh,
                                dvh,
                            )
                        })
                    })
                })
            })
        });
        Ok(vec![
            Some(Tensor::from_f32_unchecked(dq, self.q.shape())),
            Some(Tensor::from_f32_unchecked(dk, self.k.shape())),
            Some(Tensor::from_f32_unchecked(dv, self.v.shape())),
        ])
    }
}

struct PackedAttentionBackward {
    qkv: Tensor,
    out: Tensor,
    lse: Vec<f32>,
    probs: Option<Vec<f32>>,
    mask: Option<Vec<bool>>,
    geometry: Geometry,
}

impl Backward for PackedAttentionBackward {
    fn name(&self) -> &'static str {
        "attention_packed"
    }
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let g = self.geometry;
        let width = (g.hq + 2 * g.hkv) * g.d;
        let mut dqkv = crate::pool::zeros(g.b * g.t * width);
        let base = Heads {
            ptr: dqkv.as_mut_ptr(),
            half: std::ptr::null(),
            sb: g.t * width,
            sl: width,
            sh: g.d,
        };
        // SAFETY: `dqkv` holds the packed [B, T, Hq + 2·Hkv, D] gradient and outlives its heads.
        let (dqh, dkh, dvh) = unsafe { packed_parts(base, &g) };
        with_packed(&self.qkv, &g, |q, k, v| {
            with_heads(&self.out, |o| {
                let grad = grad.contiguous_data();
                let grad4 = grad.view_raw(
                    vec![g.b, g.t, g.hq, g.d],
                    vec![g.t * g.hq * g.d, g.hq * g.d, g.d, 1],
                    grad.offset(),
                );
                with_heads(&grad4, |d_o| {
                    backward(
                        g,
                        q,
                        k,
                        v,
                        o,
                        d_o,
                        &self.lse,
                        self.probs.as_deref(),
                        self.mask.as_deref(),
                        dqh,
                        dkh,
                        dvh,
                    )
                })
            })
        });
        Ok(vec![Some(Tensor::from_f32_unchecked(
            dqkv,
            self.qkv.shape(),
        ))])
    }
}

/// The query, key and value heads of a packed `[B, T, Hq + 2·Hkv, D]` projection.
///
/// # Safety
/// `base` must describe a live buffer of that packed shape for `g`: the key and value heads
/// start `Hq·D` and `(Hq + Hkv)·D` elements into it, computed without bounds checks.
unsafe fn packed_parts(base: Heads, g: &Geometry) -> (Heads, Heads, Heads) {
    let q = base;
    // Whichever of the two pointers is given; the other stays null. Within the first row of the
    // packed buffer, by the caller's contract.
    let at = |n: usize| Heads {
        ptr: if base.ptr.is_null() {
            base.ptr
        } else {
            base.ptr.wrapping_add(n)
        },
        half: if base.half.is_null() {
            base.half
        } else {
            base.half.wrapping_add(n)
        },
        ..base
    };
    (q, at(g.hq * g.d), at((g.hq + g.hkv) * g.d))
}

fn with_packed<R>(qkv: &Tensor, g: &Geometry, f: impl FnOnce(Heads, Heads, Heads) -> R) -> R {
    let width = (g.hq + 2 * g.hkv) * g.d;
    let as4 = qkv.contiguous_data();
    let as4 = as4.view_raw(
        vec![g.b, g.t, g.hq + 2 * g.hkv, g.d],
        vec![g.t * width, width, g.d, 1],
        as4.offset(),
    );
    with_heads_for(&as4, g.kernel != ProductKernel::F32, |base| {
        // SAFETY: `as4` is the packed [B, T, Hq + 2·Hkv, D] view of `qkv`, alive for `f`.
        let (q, k, v) = unsafe { packed_parts(base, g) };
        f(q, k, v)
    })
}

fn check_mask(mask: &Option<Vec<bool>>, b: usize, s: usize) -> Result<()> {
    if let Some(m) = mask {
        if m.len() != b * s {
            return Err(invalid(
                "attention",
                format!(
                    "key_padding_mask has {} flags, expected B·S = {}",
                    m.len(),
                    b * s
                ),
            ));
        }
    }
    Ok(())
}

impl Tensor {
    /// Scaled dot-product attention softmax(scale·QKᵀ + mask)·V with `q` of shape `[B, T, Hq, D]`
    /// and `k`, `v` of shape `[B, S, Hkv, D]` (Hq a multiple of Hkv: grouped-query attention).
    /// Returns `[B, T, Hq, D]`.
    pub fn attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        opts: &AttentionOptions,
    ) -> Result<Tensor> {
        if q.rank() != 4 || k.rank() != 4 || k.shape() != v.shape() {
            return Err(Error::BadShape {
                op: "attention",
                shape: q.shape().to_vec(),
                reason: format!(
                    "q must be [B, T, Hq, D], k and v [B, S, Hkv, D]; got k {:?}, v {:?}",
                    k.shape(),
                    v.shape()
                ),
            });
        }
        let (b, t, hq, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
        let (s, hkv) = (k.shape()[1], k.shape()[2]);
        if k.shape()[0] != b
            || k.shape()[3] != d
            || hkv == 0
            || hq % hkv != 0
            || (opts.causal && s < t)
        {
            return Err(Error::ShapeMismatch {
                op: "attention",
                lhs: q.shape().to_vec(),
                rhs: k.shape().to_vec(),
            });
        }
        check_mask(&opts.key_padding_mask, b, s)?;
        let g = Geometry {
            b,
            t,
            s,
            hq,
            hkv,
            d,
            scale: opts.scale.unwrap_or(1.0 / (d as f32).sqrt()),
            causal: opts.causal,
            kernel: product_kernel(q.device(), q.dtype(), q.dtype()),
        };
        let mask = opts.key_padding_mask.as_deref();
        let half = g.kernel != ProductKernel::F32;
        let (out, lse, probs) = with_heads_for(q, half, |qh| {
            with_heads_for(k, half, |kh| {
                with_heads_for(v, half, |vh| forward(g, qh, kh, vh, mask, opts.save_probs))
            })
        });
        let value = Tensor::from_f32_as(out, q.shape(), output_dtype(Kind::Attention, q.dtype()));
        let saved_out = value.data();
        Ok(Tensor::from_op(
            value,
            &[q, k, v],
            AttentionBackward {
                q: q.data(),
                k: k.data(),
                v: v.data(),
                out: saved_out,
                lse,
                probs,
                mask: opts.key_padding_mask.clone(),
                geometry: g,
            },
        ))
    }

    /// Attention over a packed projection `[B, T, (Hq + 2·Hkv)·D]` holding Q, K and V side by side
    /// (GPT-2's `c_attn` output); returns `[B, T, Hq·D]`. Its gradient is one packed tensor.
    pub fn attention_packed(
        &self,
        n_head: usize,
        n_kv_head: usize,
        opts: &AttentionOptions,
    ) -> Result<Tensor> {
        if self.rank() != 3
            || n_kv_head == 0
            || !n_head.is_multiple_of(n_kv_head)
            || !self.shape()[2].is_multiple_of(n_head + 2 * n_kv_head)
        {
            return Err(Error::BadShape {
                op: "attention_packed",
                shape: self.shape().to_vec(),
                reason: format!(
                    "expected [B, T, (H + 2·Hkv)·D] with H = {n_head}, Hkv = {n_kv_head}"
                ),
            });
        }
        let (b, t) = (self.shape()[0], self.shape()[1]);
        let d = self.shape()[2] / (n_head + 2 * n_kv_head);
        check_mask(&opts.key_padding_mask, b, t)?;
        let g = Geometry {
            b,
            t,
            s: t,
            hq: n_head,
            hkv: n_kv_head,
            d,
            scale: opts.scale.unwrap_or(1.0 / (d as f32).sqrt()),
            causal: opts.causal,
            kernel: product_kernel(self.device(), self.dtype(), self.dtype()),
        };
        let mask = opts.key_padding_mask.as_deref();
        let (out, lse, probs) = with_packed(self, &g, |q, k, v| {
            forward(g, q, k, v, mask, opts.save_probs)
        });
        let value = Tensor::from_f32_as(
            out,
            &[b, t, n_head * d],
            output_dtype(Kind::Attention, self.dtype()),
        );
        let saved_out = value.view_raw(
            vec![b, t, n_head, d],
            vec![t * n_head * d, n_head * d, d, 1],
            value.offset(),
        );
        Ok(Tensor::from_op(
            value,
            &[self],
            PackedAttentionBackward {
                qkv: self.data(),
                out: saved_out,
                lse,
                probs,
                mask: opts.key_padding_mask.clone(),
                geometry: g,
            },
        ))
    }

    /// Rotary position embedding (Su et al. 2021, RoFormer) on `[B, T, H, D]`, in the "rotate
    /// half" pairing of GPT-NeoX and Hugging Face Llama: element i pairs with i + D/2, rotated by
    /// (position)·base^(−2i/D). `start` is the position of the first step (for a KV cache).
    pub fn rope(&self, base: f32, start: usize) -> Result<Tensor> {
        self.rope_rows(base, &[start as isize])
    }

    /// [`Tensor::rope`] with each sequence's own first position: `starts` holds one per batch row
    /// (or one for all). A left-padded row starts below zero so that its first real token sits
    /// at position 0; its padding gets negative positions, which only padding masks see.
    pub fn rope_rows(&self, base: f32, starts: &[isize]) -> Result<Tensor> {
        if self.rank() != 4 || !self.shape()[3].is_multiple_of(2) {
            return Err(Error::BadShape {
                op: "rope",
                shape: self.shape().to_vec(),
                reason: "expected [B, T, H, D] with D even".into(),
            });
        }
        let (bsz, t, h, d) = (
            self.shape()[0],
            self.shape()[1],
            self.shape()[2],
            self.shape()[3],
        );
        if starts.is_empty() || (starts.len() != 1 && starts.len() != bsz) {
            return Err(Error::Invalid {
                op: "rope",
                reason: format!(
                    "{} first positions for a batch of {bsz}: give one, or one per row",
                    starts.len()
                ),
            });
        }
        let half = d / 2;
        // One table of T positions per distinct row start.
        let rows = starts.len();
        let mut cos = crate::pool::zeros(rows * t * half);
        let mut sin = crate::pool::zeros(rows * t * half);
        for (r, &start) in starts.iter().enumerate() {
            for p in 0..t {
                for i in 0..half {
                    let inv_freq = 1.0 / (base as f64).powf(2.0 * i as f64 / d as f64);
                    let angle = (start + p as isize) as f64 * inv_freq;
                    cos[(r * t + p) * half + i] = angle.cos() as f32;
                    sin[(r * t + p) * half + i] = angle.sin() as f32;
                }
            }
        }
        let rotate = move |x: &[f32], sign: f32, cos: &[f32], sin: &[f32]| -> Vec<f32> {
            let mut out = crate::pool::zeros(x.len());
            out.par_chunks_mut((h * d).max(1))
                .enumerate()
                .for_each(|(bt, o)| {
                    // Row bt / t of the batch reads its own table when each row has one.
                    let p = if rows == 1 { bt % t } else { bt };
                    let (c, s) = (
                        &cos[p * half..(p + 1) * half],
                        &sin[p * half..(p + 1) * half],
                    );
                    for head in 0..h {
                        let xr = &x[bt * h * d + head * d..bt * h * d + (head + 1) * d];
                        let or = &mut o[head * d..(head + 1) * d];
                        for i in 0..half {
                            let (a, b) = (xr[i], xr[i + half]);
                            or[i] = a * c[i] - sign * b * s[i];
                            or[i + half] = b * c[i] + sign * a * s[i];
                        }
                    }
                });
            out
        };
        let out = self.with_f32(|x| rotate(x, 1.0, &cos, &sin));
        struct RopeBackward<F> {
            cos: Vec<f32>,
            sin: Vec<f32>,
            rotate: F,
        }
        impl<F: Fn(&[f32], f32, &[f32], &[f32]) -> Vec<f32> + Send + Sync> Backward for RopeBackward<F> {
            fn name(&self) -> &'static str {
                "rope"
            }
            fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
                // The transpose of a rotation is the rotation by the opposite angle.
                let dx = grad.with_f32(|g| (self.rotate)(g, -1.0, &self.cos, &self.sin));
                Ok(vec![Some(Tensor::from_f32_unchecked(dx, grad.shape()))])
            }
        }
        let value = Tensor::from_f32_as(
            out,
            self.shape(),
            output_dtype(Kind::Elementwise, self.dtype()),
        );
        Ok(Tensor::from_op(
            value,
            &[self],
            RopeBackward { cos, sin, rotate },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::AttentionOptions;
    use crate::testing::{assert_grads, randn};
    use crate::{Result, Tensor};

    /// Attention composed of unfused ops, as the reference.
    fn naive(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        causal: bool,
        mask: Option<&[bool]>,
    ) -> Result<Tensor> {
        let (b, t, hq, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
        let (s, hkv) = (k.shape()[1], k.shape()[2]);
        let heads: Vec<usize> = (0..hq).map(|h| h / (hq / hkv)).collect();
        let k = k.index_select(2, &heads)?;
        let v = v.index_select(2, &heads)?;
        let qh = q.permute(&[0, 2, 1, 3])?; // B H T D
        let kh = k.permute(&[0, 2, 3, 1])?; // B H D S
        let vh = v.permute(&[0, 2, 1, 3])?; // B H S D
        let scores = qh
            .contiguous()
            .matmul(&kh.contiguous())?
            .scale(1.0 / (d as f32).sqrt());
        let mut bias = vec![0.0f32; b * t * s];
        for bi in 0..b {
            for i in 0..t {
                for j in 0..s {
                    let masked = (causal && j > i + s - t) || mask.is_some_and(|m| !m[bi * s + j]);
                    if masked {
                        bias[(bi * t + i) * s + j] = -1e9;
                    }
                }
            }
        }
        let bias = Tensor::from_f32(bias, &[b, 1, t, s])?;
        let p = scores.add(&bias)?.softmax()?;
        p.matmul(&vh.contiguous())?
            .permute(&[0, 2, 1, 3])?
            .contiguous()
            .reshape(&[b, t, hq, d])
    }

    fn close(a: &Tensor, b: &Tensor) {
        let (a, b) = (a.to_vec_f32(), b.to_vec_f32());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }

    #[test]
    fn matches_unfused_reference_causal_gqa_and_padding() {
        let q = randn(&[2, 70, 4, 8], 1); // 70 > one 64-row block
        let k = randn(&[2, 70, 2, 8], 2);
        let v = randn(&[2, 70, 2, 8], 3);
        let causal = AttentionOptions {
            causal: true,
            ..Default::default()
        };
        close(
            &Tensor::attention(&q, &k, &v, &causal).unwrap(),
            &naive(&q, &k, &v, true, None).unwrap(),
        );
        let mut mask = vec![true; 2 * 70];
        for j in 60..70 {
            mask[j] = false;
        }
        let padded = AttentionOptions {
            key_padding_mask: Some(mask.clone()),
            ..Default::default()
        };
        close(
            &Tensor::attention(&q, &k, &v, &padded).unwrap(),
            &naive(&q, &k, &v, false, Some(&mask)).unwrap(),
        );
    }

    #[test]
    fn attention_grads() {
        let (q, k, v) = (
            randn(&[2, 5, 4, 3], 4),
            randn(&[2, 5, 2, 3], 5),
            randn(&[2, 5, 2, 3], 6),
        );
        let causal = AttentionOptions {
            causal: true,
            ..Default::default()
        };
        assert_grads(
            |t| Tensor::attention(&t[0], &t[1], &t[2], &causal),
            &[q.clone(), k.clone(), v.clone()],
        );
        let mask = vec![true, true, true, false, true, true, false, true, true, true];
        let padded = AttentionOptions {
            key_padding_mask: Some(mask),
            ..Default::default()
        };
        assert_grads(
            |t| Tensor::attention(&t[0], &t[1], &t[2], &padded),
            &[q, k, v],
        );
    }

    #[test]
    fn saved_probabilities_give_the_gradients_recomputed_ones_do() {
        // Causal over 3 blocks of rows with grouped heads, and padded without a mask of time.
        let (b, t, h, d) = (2, 150, 4, 8);
        let mask: Vec<bool> = (0..b * t).map(|i| i % 7 != 3).collect();
        for (causal, mask) in [(true, None), (false, Some(mask))] {
            let base = AttentionOptions {
                causal,
                key_padding_mask: mask,
                ..Default::default()
            };
            let saved = AttentionOptions {
                save_probs: true,
                ..base.clone()
            };
            let run = |opts: &AttentionOptions| {
                let q = randn(&[b, t, h, d], 1).requires_grad_();
                let k = randn(&[b, t, 2, d], 2).requires_grad_();
                let v = randn(&[b, t, 2, d], 3).requires_grad_();
                let y = Tensor::attention(&q, &k, &v, opts).unwrap();
                y.mul(&randn(&[b, t, h, d], 4))
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                (y, [q.grad().unwrap(), k.grad().unwrap(), v.grad().unwrap()])
            };
            let (y0, g0) = run(&base);
            let (y1, g1) = run(&saved);
            assert_eq!(y0.to_vec_f32(), y1.to_vec_f32(), "the same forward");
            for (a, b) in g0.iter().zip(&g1) {
                close(a, b);
            }
        }
        let qkv = randn(&[1, 70, 3 * 2 * 4], 9);
        let opts = AttentionOptions {
            causal: true,
            save_probs: true,
            ..Default::default()
        };
        assert_grads(|x| x[0].attention_packed(2, 2, &opts), &[qkv]);
    }

    #[test]
    fn packed_matches_separate_and_grads() {
        let (b, t, h, d) = (2, 67, 2, 4);
        let qkv = randn(&[b, t, 3 * h * d], 7);
        let opts = AttentionOptions {
            causal: true,
            ..Default::default()
        };
        let parts = qkv.split(2, &[h * d, h * d, h * d]).unwrap();
        let four = |x: &Tensor| x.reshape(&[b, t, h, d]).unwrap();
        let sep = Tensor::attention(
            &four(&parts[0].contiguous()),
            &four(&parts[1].contiguous()),
            &four(&parts[2].contiguous()),
            &opts,
        )
        .unwrap();
        let packed = qkv.attention_packed(h, h, &opts).unwrap();
        close(&packed, &sep.reshape(&[b, t, h * d]).unwrap());
        assert_grads(
            |x| x[0].attention_packed(2, 1, &opts),
            &[randn(&[1, 6, 4 * 3], 8)],
        );
    }

    #[test]
    fn rope_grads_and_norm_preserving() {
        let x = randn(&[1, 5, 2, 6], 9);
        let y = x.rope(10000.0, 3).unwrap();
        let n = |t: &Tensor| t.to_vec_f32().iter().map(|v| v * v).sum::<f32>();
        assert!((n(&x) - n(&y)).abs() < 1e-3);
        assert_grads(|t| t[0].rope(10000.0, 0), &[x]);
    }

    #[test]
    fn rope_rows_rotates_each_row_from_its_own_start() {
        let x = randn(&[3, 4, 2, 6], 10);
        let starts = [-2isize, 0, 5];
        let y = x.rope_rows(500.0, &starts).unwrap().to_vec_f32();
        let row = 4 * 2 * 6;
        for (b, &s) in starts.iter().enumerate() {
            let xb = x.narrow(0, b, 1).unwrap().contiguous();
            let got = &y[b * row..(b + 1) * row];
            let (got, want) = if s >= 0 {
                (got, xb.rope(500.0, s as usize).unwrap().to_vec_f32())
            } else {
                // Positions −s.. of a row starting at s are positions 0.. of its tail.
                let k = (-s) as usize;
                let tail = xb.narrow(1, k, 4 - k).unwrap().contiguous();
                (&got[k * 12..], tail.rope(500.0, 0).unwrap().to_vec_f32())
            };
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-6, "row {b}: {g} vs {w}");
            }
        }
        assert!(x.rope_rows(500.0, &[0, 1]).is_err());
        assert_grads(
            |t| t[0].rope_rows(500.0, &[-1, 2, 0]),
            &[randn(&[3, 2, 1, 4], 11)],
        );
    }
}
