//! Matrix products on the `gemm` crate: `matmul` (batched, either operand transposed through a
//! strided view, no copy) and `linear` (x·W + b with the bias fused into the product).
//!
//! Backward of C = A·B: dA = dC·Bᵀ and dB = Aᵀ·dC, both computed by `gemm` straight from the
//! saved operands' strides, so a transposed operand is never materialised. When B is shared across
//! the batch (a weight), dB sums over the batch in a single product with the batch folded into K.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::autocast::{output_dtype, Kind};
use crate::autograd::Backward;
use crate::backend::ProductKernel;
use crate::error::{Error, Result};
use crate::storage::Buffer;
use crate::{DType, Tensor};

/// A batch of strided matrices (of f32 unless said otherwise; bf16 as its `u16` bits).
#[derive(Clone, Copy)]
pub(crate) struct Mat<T = f32> {
    pub ptr: *const T,
    pub rows: usize,
    pub cols: usize,
    pub rs: isize,
    pub cs: isize,
    pub batch: usize,
    /// Stride between matrices of the batch; 0 when one matrix serves the whole batch.
    pub bs: isize,
}

// SAFETY: a `Mat` only describes memory; every function that reads or writes through it is
// `unsafe` and its caller guarantees the memory is valid and not written concurrently.
unsafe impl<T> Send for Mat<T> {}
unsafe impl<T> Sync for Mat<T> {}

impl<T> Mat<T> {
    /// One row-major `rows × cols` matrix.
    pub fn dense(ptr: *const T, rows: usize, cols: usize) -> Mat<T> {
        Mat {
            ptr,
            rows,
            cols,
            rs: cols as isize,
            cs: 1,
            batch: 1,
            bs: 0,
        }
    }

    /// Matrix `i` of the batch.
    ///
    /// # Safety
    /// `i` must be within the batch.
    pub unsafe fn item(self, i: usize) -> Mat<T> {
        Mat {
            ptr: self.ptr.offset(i as isize * self.bs),
            ..self
        }
    }

    /// Rows `lo..hi`.
    ///
    /// # Safety
    /// The range must be within the matrix.
    pub(crate) unsafe fn row_range(self, lo: usize, hi: usize) -> Mat<T> {
        Mat {
            ptr: self.ptr.offset(lo as isize * self.rs),
            rows: hi - lo,
            ..self
        }
    }

    /// The transposed view.
    pub fn t(self) -> Mat<T> {
        Mat {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

#[derive(Clone, Copy)]
pub(super) struct SendPtr<T>(pub(super) T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

/// Work (m·n·k) below which a product runs on one thread; batched small products are instead
/// spread over threads one matrix each.
const SMALL_GEMM: usize = 96 * 96 * 96;

/// A matrix a product's output can be cut along: its rows, or through the transpose its columns.
pub(crate) trait Split: Copy + Send + Sync {
    /// (rows, cols).
    fn dims(&self) -> (usize, usize);
    /// The transposed view.
    fn transposed(self) -> Self;
    /// Rows `lo..hi`.
    ///
    /// # Safety
    /// The range must be within the matrix.
    unsafe fn rows_between(self, lo: usize, hi: usize) -> Self;
}

impl<T: Copy> Split for Mat<T> {
    fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
    fn transposed(self) -> Self {
        self.t()
    }
    unsafe fn rows_between(self, lo: usize, hi: usize) -> Self {
        self.row_range(lo, hi)
    }
}

/// The front every product kernel shares. An empty output is done; k = 0 writes zeros (or leaves
/// an accumulated output alone); with several threads and at least `small` work the output is cut
/// along its longer side into one independent product per thread, each given to `run` (which
/// runs it on its own thread), at boundaries on multiples of `split(cut_rows).0` and into parts
/// no shorter than `split(cut_rows).1`. Returns false when the caller is left with the whole
/// product.
///
/// Independent parts rather than a kernel's own threading: `gemm`'s shares packed panels between
/// threads and scaled 1.5x on two cores for our shapes, while independent halves scale close to
/// 2x (the duplicated packing of the other operand is cheap next to the product).
///
/// # Safety
/// As [`gemm_f32`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product_front<O: Split>(
    dst: *mut f32,
    drs: isize,
    dcs: isize,
    accumulate: bool,
    a: O,
    b: O,
    threads: usize,
    small: usize,
    split: impl Fn(bool) -> (usize, usize),
    run: impl Fn(*mut f32, O, O) + Sync,
) -> bool {
    let ((m, k), (k2, n)) = (a.dims(), b.dims());
    debug_assert_eq!(k, k2);
    if m == 0 || n == 0 {
        return true;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *dst.offset(i as isize * drs + j as isize * dcs) = 0.0;
                }
            }
        }
        return true;
    }
    if threads <= 1 || m * n * k < small {
        return false;
    }
    let cut_rows = m >= n;
    let len = if cut_rows { m } else { n };
    let (tile, min_part) = split(cut_rows);
    let parts = threads.min(len / min_part).max(1);
    if parts == 1 {
        return false;
    }
    let d = &SendPtr(dst);
    let bound = |i: usize| ((len * i / parts).div_ceil(tile) * tile).min(len);
    (0..parts).into_par_iter().for_each(|i| {
        let (lo, hi) = (bound(i), bound(i + 1));
        if lo >= hi {
            return;
        }
        // Cutting the columns of C is cutting the rows of Cᵀ = Bᵀ·Aᵀ.
        if cut_rows {
            run(d.0.offset(lo as isize * drs), a.rows_between(lo, hi), b);
        } else {
            let b = b.transposed().rows_between(lo, hi).transposed();
            run(d.0.offset(lo as isize * dcs), a, b);
        }
    });
    true
}

/// One product `dst (+)= a·b`, with `dst` strided (`drs`, `dcs`), on up to `threads` threads
/// (1: this one).
///
/// # Safety
/// Pointers must be valid for the given extents and strides; `dst` must not alias `a` or `b`.
pub(crate) unsafe fn gemm_f32(
    dst: *mut f32,
    drs: isize,
    dcs: isize,
    accumulate: bool,
    a: Mat,
    b: Mat,
    threads: usize,
) {
    // Part boundaries on multiples of 16 rows/columns (the micro-kernel's tile), parts of at
    // least 64.
    let (m, n, k) = (a.rows, b.cols, a.cols);
    let split = |_| (16, 64);
    let run = |d: *mut f32, a: Mat, b: Mat| gemm_f32(d, drs, dcs, accumulate, a, b, 1);
    if product_front(
        dst, drs, dcs, accumulate, a, b, threads, SMALL_GEMM, split, run,
    ) {
        return;
    }
    // Not split (small, or too narrow to cut): `gemm`'s own threads, if there are several.
    let par = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    gemm::gemm(
        m, n, k, dst, dcs, drs, accumulate, a.ptr, a.cs, a.rs, b.ptr, b.cs, b.rs, 1.0f32, 1.0f32,
        false, false, false, par,
    );
}

/// One operand of a product as its kernel reads it: f32, or bf16 bits for the bf16 kernel (only
/// made when [`crate::backend`] chose that kernel, so only on a CPU that has it).
#[derive(Clone, Copy)]
pub(crate) enum Operand {
    F32(Mat),
    Bf16(Mat<u16>),
}

/// Applies a layout change to whichever matrix an [`Operand`] holds.
macro_rules! each {
    ($o:expr, $m:ident => $e:expr) => {
        match $o {
            Operand::F32($m) => Operand::F32($e),
            Operand::Bf16($m) => Operand::Bf16($e),
        }
    };
}

impl Operand {
    /// (rows, cols, batch, batch stride, row stride, column stride).
    fn geometry(&self) -> (usize, usize, usize, isize, isize, isize) {
        match self {
            Operand::F32(m) => (m.rows, m.cols, m.batch, m.bs, m.rs, m.cs),
            Operand::Bf16(m) => (m.rows, m.cols, m.batch, m.bs, m.rs, m.cs),
        }
    }
    pub fn rows(&self) -> usize {
        self.geometry().0
    }
    pub fn cols(&self) -> usize {
        self.geometry().1
    }
    pub fn t(self) -> Operand {
        each!(self, m => m.t())
    }
    /// # Safety
    /// As [`Mat::item`].
    pub unsafe fn item(self, i: usize) -> Operand {
        each!(self, m => m.item(i))
    }
    /// # Safety
    /// As [`Mat::row_range`].
    pub unsafe fn row_range(self, lo: usize, hi: usize) -> Operand {
        each!(self, m => m.row_range(lo, hi))
    }
}

impl Split for Operand {
    fn dims(&self) -> (usize, usize) {
        (self.rows(), self.cols())
    }
    fn transposed(self) -> Self {
        self.t()
    }
    unsafe fn rows_between(self, lo: usize, hi: usize) -> Self {
        self.row_range(lo, hi)
    }
}

/// `dst (+)= a·b`: two f32 operands on `gemm`, a bf16 one on the unit `kernel` names.
///
/// # Safety
/// As [`gemm_f32`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_any(
    kernel: ProductKernel,
    dst: *mut f32,
    drs: isize,
    dcs: isize,
    accumulate: bool,
    a: Operand,
    b: Operand,
    threads: usize,
) {
    match (a, b, kernel) {
        (Operand::F32(a), Operand::F32(b), _) => gemm_f32(dst, drs, dcs, accumulate, a, b, threads),
        // SAFETY: a bf16 operand exists only where the bf16 kernel was selected for this CPU.
        (a, b, ProductKernel::Bf16(unit)) => {
            super::gemm_bf16::gemm_on(unit, dst, drs, dcs, accumulate, a, b, threads)
        }
        (_, _, ProductKernel::F32) => {
            unreachable!("bf16 operands are read for the bf16 kernel only")
        }
    }
}

/// `dst[i] (+)= a[i]·b[i]` for each matrix of the batch; `dst` is row-major `[batch, m, n]`, or a
/// single `[m, n]` that sums the whole batch when `reduce` is set.
///
/// # Safety
/// As [`gemm_f32`].
pub(crate) unsafe fn bmm(
    kernel: ProductKernel,
    dst: *mut f32,
    accumulate: bool,
    reduce: bool,
    a: Operand,
    b: Operand,
) {
    let (m, k, a_batch, a_bs, _, _) = a.geometry();
    let (_, n, b_batch, _, _, _) = b.geometry();
    // A shared operand has batch 1 and stride 0; the batch is the other's, which may be 0.
    let batch = if a_bs == 0 && a_batch <= 1 {
        b_batch
    } else {
        a_batch
    };
    if m == 0 || n == 0 {
        return;
    }
    if batch == 0 {
        if reduce && !accumulate {
            for i in 0..m * n {
                *dst.add(i) = 0.0;
            }
        }
        return;
    }
    let dst_bs = (m * n) as isize;
    let threads = rayon::current_num_threads();
    if reduce {
        for i in 0..batch {
            gemm_any(
                kernel,
                dst,
                n as isize,
                1,
                accumulate || i > 0,
                a.item(i),
                b.item(i),
                threads,
            );
        }
        return;
    }
    if batch > 1 && m * n * k <= SMALL_GEMM && threads > 1 {
        let d = SendPtr(dst);
        (0..batch).into_par_iter().for_each(move |i| {
            let d = d;
            gemm_any(
                kernel,
                d.0.offset(i as isize * dst_bs),
                n as isize,
                1,
                accumulate,
                a.item(i),
                b.item(i),
                1,
            );
        });
        return;
    }
    let threads = if m * n * k <= SMALL_GEMM { 1 } else { threads };
    for i in 0..batch {
        gemm_any(
            kernel,
            dst.offset(i as isize * dst_bs),
            n as isize,
            1,
            accumulate,
            a.item(i),
            b.item(i),
            threads,
        );
    }
}

/// Describes the last two axes of a tensor (whose buffer starts at `base`) as a batch of matrices,
/// or `None` when its batch axes cannot be folded into one stride (the caller then makes it
/// contiguous).
fn as_mat<T>(t: &Tensor, base: *const T) -> Option<Mat<T>> {
    let r = t.rank();
    let shape = t.shape();
    let strides = t.strides();
    let (rows, cols) = (shape[r - 2], shape[r - 1]);
    let batch: usize = shape[..r - 2].iter().product();
    // Fold batch axes: each (non-unit) axis must step by the extent of the axes after it.
    let mut bs: Option<usize> = None;
    let mut span = 1usize;
    for ax in (0..r - 2).rev() {
        if shape[ax] == 1 {
            continue;
        }
        match bs {
            None => {
                bs = Some(strides[ax]);
                span = shape[ax];
            }
            Some(s) => {
                if strides[ax] != s * span {
                    return None;
                }
                span *= shape[ax];
            }
        }
    }
    Some(Mat {
        ptr: unsafe { base.add(t.offset()) },
        rows,
        cols,
        rs: strides[r - 2] as isize,
        cs: strides[r - 1] as isize,
        batch,
        bs: bs.unwrap_or(0) as isize,
    })
}

/// Runs `f` with the tensor as an f32 matrix batch (converting half types and unfoldable layouts
/// into a temporary first).
pub(crate) fn with_mat<R>(t: &Tensor, f: impl FnOnce(Mat) -> R) -> R {
    if t.dtype() == DType::F32 {
        let buf = t.storage().read();
        if let Buffer::F32(v) = &*buf {
            if let Some(m) = as_mat(t, v.as_ptr()) {
                return f(m);
            }
        }
    }
    // One widening pass that also gathers a strided layout.
    let tmp = Tensor::from_f32_unchecked(t.to_vec_f32(), t.shape());
    // Unlike elementwise conversion scratch, the widened copy goes back to the buffer cache when
    // `tmp` drops: a bf16 run widens the same operand sizes every step, and handing them to the
    // allocator instead tripled page faults (+20% step time for 6 MB less peak memory).
    let buf = tmp.storage().read();
    match &*buf {
        Buffer::F32(v) => f(as_mat(&tmp, v.as_ptr()).expect("contiguous tensors fold")),
        _ => unreachable!("converted to f32 above"),
    }
}

/// Runs `f` with the tensor as an operand of `kernel`: a bf16 tensor as its own bits for the bf16
/// kernel (gathered into a contiguous copy only when its layout does not fold), anything else as
/// [`with_mat`] gives it.
pub(crate) fn with_operand<R>(
    t: &Tensor,
    kernel: ProductKernel,
    f: impl FnOnce(Operand) -> R,
) -> R {
    if matches!(kernel, ProductKernel::Bf16(_)) && t.dtype() == DType::BF16 {
        let gathered;
        let src = if as_mat(t, std::ptr::null::<u16>()).is_some() {
            t
        } else {
            gathered = t.contiguous();
            &gathered
        };
        let buf = src.storage().read();
        if let Buffer::BF16(v) = &*buf {
            let m = as_mat(src, v.as_ptr() as *const u16).expect("contiguous tensors fold");
            return f(Operand::Bf16(m));
        }
        unreachable!("a bf16 tensor holds a bf16 buffer");
    }
    with_mat(t, |m| f(Operand::F32(m)))
}

/// The kernel of a product of `a` and `b`.
fn kernel_for(a: &Tensor, b: &Tensor) -> ProductKernel {
    crate::backend::product_kernel(a.device(), a.dtype(), b.dtype())
}

fn check_matmul(a: &Tensor, b: &Tensor) -> Result<(Vec<usize>, usize, usize, usize)> {
    if a.rank() < 2 || b.rank() < 2 {
        return Err(Error::BadShape {
            op: "matmul",
            shape: if a.rank() < 2 { a.shape() } else { b.shape() }.to_vec(),
            reason: "both operands need at least 2 axes".into(),
        });
    }
    let (ra, rb) = (a.rank(), b.rank());
    let (m, k) = (a.shape()[ra - 2], a.shape()[ra - 1]);
    let (k2, n) = (b.shape()[rb - 2], b.shape()[rb - 1]);
    let batch_ok = rb == 2 || a.shape()[..ra - 2] == b.shape()[..rb - 2];
    if k != k2 || !batch_ok {
        return Err(Error::ShapeMismatch {
            op: "matmul",
            lhs: a.shape().to_vec(),
            rhs: b.shape().to_vec(),
        });
    }
    let mut out = a.shape()[..ra - 2].to_vec();
    out.push(m);
    out.push(n);
    Ok((out, m, n, k))
}

/// Folds a batch of matrices whose rows follow each other in memory into one tall matrix, so a
/// product with a shared right operand is a single large `gemm`.
fn fold_rows(a: Operand) -> Operand {
    each!(a, a => if a.batch > 1 && a.bs == a.rows as isize * a.rs && a.cs == 1 {
        Mat {
            rows: a.rows * a.batch,
            batch: 1,
            bs: 0,
            ..a
        }
    } else {
        a
    })
}

/// Forward product into a fresh f32 buffer; `bias`, if given, pre-fills each output row.
fn product(a: &Tensor, b: &Tensor, bias: Option<&Tensor>) -> Result<(Vec<f32>, Vec<usize>)> {
    let (out_shape, _, _, _) = check_matmul(a, b)?;
    let numel: usize = out_shape.iter().product();
    let mut out = crate::pool::uninit(numel);
    product_into(a, b, bias, &mut out)?;
    Ok((out, out_shape))
}

/// [`product`] into `out`, which holds exactly the product's elements.
pub(super) fn product_into(
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    out: &mut [f32],
) -> Result<()> {
    let (out_shape, _, n, _) = check_matmul(a, b)?;
    assert_eq!(out.len(), out_shape.iter().product::<usize>());
    let accumulate = if let Some(bias) = bias {
        bias.with_f32(|bv| {
            for row in out.chunks_mut(n.max(1)) {
                row.copy_from_slice(bv);
            }
        });
        true
    } else {
        false
    };
    let kernel = kernel_for(a, b);
    with_operand(a, kernel, |am| {
        with_operand(b, kernel, |bm| unsafe {
            let am = if b.rank() == 2 { fold_rows(am) } else { am };
            bmm(kernel, out.as_mut_ptr(), accumulate, false, am, bm);
        })
    });
    Ok(())
}

/// Column sums of a row-major `[rows, n]` gradient (a bias's gradient): blocks of a fixed number
/// of rows summed in parallel, then the partial sums in block order (the same bits whatever the
/// thread count).
pub(super) fn column_sums(g: &[f32], n: usize) -> Vec<f32> {
    let rows_per_task = (1 << 16) / n.max(1) + 1;
    let parts = g
        .par_chunks((rows_per_task * n).max(1))
        .map(|block| {
            let mut part = crate::pool::zeros(n);
            for row in block.chunks(n.max(1)) {
                crate::kernels::vectorized(|| part.iter_mut().zip(row).for_each(|(p, r)| *p += r));
            }
            part
        })
        .collect::<Vec<_>>();
    crate::kernels::sum_in_order(parts, n)
}

pub(super) struct MatmulBackward {
    pub a: Tensor,
    pub b: Tensor,
    pub has_bias: bool,
    /// Which of A, B and the bias need a gradient: a frozen weight (fine-tuning with LoRA or a
    /// frozen encoder) costs no dB product.
    pub needs: [bool; 3],
}

impl MatmulBackward {
    /// dA = dC·Bᵀ into `da` and dB = Aᵀ·dC (summed over the batch when B is shared) into `db`,
    /// each only when asked for.
    pub(super) fn products(&self, grad: &Tensor, da: Option<&mut [f32]>, db: Option<&mut [f32]>) {
        let (a, b) = (&self.a, &self.b);
        let shared_b = b.rank() == 2 && a.rank() > 2;
        let plain = a.rank() == 2 && b.rank() == 2;
        let threads = rayon::current_num_threads();
        let kernel = kernel_for(a, b);
        with_operand(grad, kernel, |gm| {
            with_operand(b, kernel, |bm| {
                with_operand(a, kernel, |am| unsafe {
                    let (af, gf) = (fold_rows(am), fold_rows(gm));
                    let (k, n) = (bm.rows() as isize, bm.cols() as isize);
                    let unbatched = |o: &Operand| o.geometry().2 == 1;
                    let fused = (shared_b || plain) && unbatched(&af) && unbatched(&gf);
                    let (da, db) = match (da, db) {
                        (Some(da), Some(db)) => (da, db),
                        // One product alone, on every thread.
                        (Some(da), None) if fused => {
                            return gemm_any(
                                kernel,
                                da.as_mut_ptr(),
                                k,
                                1,
                                false,
                                gf,
                                bm.t(),
                                threads,
                            )
                        }
                        (None, Some(db)) if fused => {
                            return gemm_any(
                                kernel,
                                db.as_mut_ptr(),
                                n,
                                1,
                                false,
                                af.t(),
                                gf,
                                threads,
                            )
                        }
                        (Some(da), None) => {
                            let lhs = if shared_b { gf } else { gm };
                            return bmm(kernel, da.as_mut_ptr(), false, false, lhs, bm.t());
                        }
                        (None, Some(db)) => {
                            return bmm(kernel, db.as_mut_ptr(), false, shared_b, am.t(), gm)
                        }
                        (None, None) => return,
                    };
                    if fused {
                        // A weight shared by the whole batch, as in a linear layer, or a plain
                        // 2-D product: two single products of the same size, run side by side on
                        // half the threads each. Fewer, larger products than splitting each over
                        // every thread, so each operand is packed once fewer (measured in
                        // lock-step on the GPT benchmark: 2% off the step).
                        let (pa, pb) = (SendPtr(da.as_mut_ptr()), SendPtr(db.as_mut_ptr()));
                        let half = (threads / 2).max(1);
                        let rest = (threads - half).max(1);
                        rayon::join(
                            move || {
                                let pa = pa;
                                gemm_any(kernel, pa.0, k, 1, false, gf, bm.t(), half)
                            },
                            move || {
                                let pb = pb;
                                gemm_any(kernel, pb.0, n, 1, false, af.t(), gf, rest)
                            },
                        );
                    } else {
                        bmm(
                            kernel,
                            da.as_mut_ptr(),
                            false,
                            false,
                            if shared_b { gf } else { gm },
                            bm.t(),
                        );
                        bmm(kernel, db.as_mut_ptr(), false, shared_b, am.t(), gm);
                    }
                })
            })
        });
    }
}

impl Backward for MatmulBackward {
    fn name(&self) -> &'static str {
        "matmul"
    }
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (a, b) = (&self.a, &self.b);
        let [need_a, need_b, need_bias] = self.needs;
        let mut da = need_a.then(|| crate::pool::uninit(a.numel()));
        let mut db = need_b.then(|| crate::pool::uninit(b.numel()));
        self.products(grad, da.as_deref_mut(), db.as_deref_mut());
        let dbias = if self.has_bias && need_bias {
            let n = *grad.shape().last().expect("rank >= 2");
            let acc = grad.with_f32(|g| column_sums(g, n));
            Some(Tensor::from_f32_unchecked(acc, &[n]))
        } else {
            None
        };
        let mut grads = vec![
            da.map(|da| Tensor::from_f32_unchecked(da, a.shape())),
            db.map(|db| Tensor::from_f32_unchecked(db, b.shape())),
        ];
        if self.has_bias {
            grads.push(dbias);
        }
        Ok(grads)
    }
}

/// Backward of `gelu(x)·W + b`: the GELU's output was not kept, so it is recomputed from `x` for
/// dW, and dX = (dY·Wᵀ) ∘ gelu'(x).
struct GeluLinearBackward {
    x: Tensor,
    weight: Tensor,
    exact: bool,
    has_bias: bool,
    needs: [bool; 3],
}

impl Backward for GeluLinearBackward {
    fn name(&self) -> &'static str {
        "gelu_linear"
    }
    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let product = Box::new(MatmulBackward {
            a: super::elementwise::gelu_values(&self.x, self.exact),
            b: self.weight,
            has_bias: self.has_bias,
            needs: self.needs,
        });
        let mut grads = product.backward(grad)?;
        if let Some(dh) = grads[0].take() {
            grads[0] = Some(super::elementwise::gelu_grad(&dh, &self.x, self.exact));
        }
        Ok(grads)
    }
}

fn check_linear(weight: &Tensor, bias: Option<&Tensor>) -> Result<()> {
    if weight.rank() != 2 {
        return Err(Error::BadShape {
            op: "linear",
            shape: weight.shape().to_vec(),
            reason: "weight must be [in, out]".into(),
        });
    }
    if let Some(b) = bias {
        if b.shape() != [weight.shape()[1]] {
            return Err(Error::ShapeMismatch {
                op: "linear bias",
                lhs: weight.shape().to_vec(),
                rhs: b.shape().to_vec(),
            });
        }
    }
    Ok(())
}

impl Tensor {
    /// `gelu(self)·W + b` (the exact GELU, or its tanh approximation when `exact` is false): the
    /// two projections of a transformer's feed-forward network meet here. Values and gradients
    /// are those of `self.gelu().linear(weight, bias)`, but the GELU's output, as large as the
    /// input, is not kept for backward: it is recomputed there from the input, which the GELU
    /// keeps anyway. A GELU of width 4·d saves 4·d floats per token per layer for one extra pass
    /// over them.
    pub fn gelu_linear(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        exact: bool,
    ) -> Result<Tensor> {
        check_linear(weight, bias)?;
        if self.rank() < 2 {
            let h = if exact { self.gelu() } else { self.gelu_tanh() };
            return h.linear(weight, bias);
        }
        let (out, shape) = {
            let h = super::elementwise::gelu_values(self, exact);
            product(&h, weight, bias)?
        };
        let value = Tensor::from_f32_as(out, &shape, output_dtype(Kind::Product, self.dtype()));
        let mut inputs = vec![self, weight];
        if let Some(b) = bias {
            inputs.push(b);
        }
        Ok(Tensor::from_op(
            value,
            &inputs,
            GeluLinearBackward {
                x: self.data(),
                weight: weight.data(),
                exact,
                has_bias: bias.is_some(),
                needs: [
                    self.requires_grad(),
                    weight.requires_grad(),
                    bias.is_some_and(Tensor::requires_grad),
                ],
            },
        ))
    }

    /// Matrix product over the last two axes: `[..., m, k] · [..., k, n]` (or `· [k, n]`, one
    /// matrix shared by the whole batch). Either operand may be a transposed view. Output has the
    /// dtype of `self`; the product accumulates in f32.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        let (out, shape) = product(self, rhs, None)?;
        let value = Tensor::from_f32_as(out, &shape, output_dtype(Kind::Product, self.dtype()));
        Ok(Tensor::from_op(
            value,
            &[self, rhs],
            MatmulBackward {
                a: self.data(),
                b: rhs.data(),
                has_bias: false,
                needs: [self.requires_grad(), rhs.requires_grad(), false],
            },
        ))
    }

    /// Affine map `self · weight + bias` over the last axis, with `weight` of shape `[in, out]`
    /// (the Hugging Face GPT-2 `Conv1D` layout) and the bias added inside the product.
    pub fn linear(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        check_linear(weight, bias)?;
        let x = if self.rank() == 1 {
            self.reshape(&[1, self.shape()[0]])?
        } else {
            self.clone()
        };
        let (out, shape) = product(&x, weight, bias)?;
        let value = Tensor::from_f32_as(out, &shape, output_dtype(Kind::Product, self.dtype()));
        let mut inputs = vec![&x, weight];
        if let Some(b) = bias {
            inputs.push(b);
        }
        let y = Tensor::from_op(
            value,
            &inputs,
            MatmulBackward {
                a: x.data(),
                b: weight.data(),
                has_bias: bias.is_some(),
                needs: [
                    x.requires_grad(),
                    weight.requires_grad(),
                    bias.is_some_and(Tensor::requires_grad),
                ],
            },
        );
        if self.rank() == 1 {
            y.reshape(&[weight.shape()[1]])
        } else {
            Ok(y)
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::{assert_grads, randn};
    use crate::Tensor;

    #[test]
    fn matmul_forward_small() {
        let a = Tensor::from_f32(vec![1., 2., 3., 4., 5., 6.], &[2, 3]).unwrap();
        let b = Tensor::from_f32(vec![1., 0., 0., 1., 1., 1.], &[3, 2]).unwrap();
        assert_eq!(a.matmul(&b).unwrap().to_vec_f32(), vec![4., 5., 10., 11.]);
        // Transposed view operand, no copy.
        let bt = Tensor::from_f32(vec![1., 0., 1., 0., 1., 1.], &[2, 3]).unwrap();
        let c = a.matmul(&bt.transpose(0, 1).unwrap()).unwrap();
        assert_eq!(c.to_vec_f32(), vec![4., 5., 10., 11.]);
    }

    #[test]
    fn matmul_grads_plain_transposed_batched_shared() {
        assert_grads(
            |x| x[0].matmul(&x[1]),
            &[randn(&[3, 4], 1), randn(&[4, 5], 2)],
        );
        assert_grads(
            |x| x[0].transpose(0, 1)?.matmul(&x[1].transpose(0, 1)?),
            &[randn(&[4, 3], 3), randn(&[5, 4], 4)],
        );
        assert_grads(
            |x| x[0].matmul(&x[1]),
            &[randn(&[2, 3, 4], 5), randn(&[2, 4, 2], 6)],
        );
        assert_grads(
            |x| x[0].matmul(&x[1]),
            &[randn(&[2, 3, 4], 7), randn(&[4, 2], 8)],
        );
    }

    #[test]
    fn linear_with_bias_grads() {
        assert_grads(
            |x| x[0].linear(&x[1], Some(&x[2])),
            &[randn(&[2, 3, 4], 9), randn(&[4, 5], 10), randn(&[5], 11)],
        );
    }

    #[test]
    fn gelu_linear_grads() {
        for exact in [true, false] {
            assert_grads(
                |x| x[0].gelu_linear(&x[1], Some(&x[2]), exact),
                &[randn(&[2, 3, 4], 12), randn(&[4, 5], 13), randn(&[5], 14)],
            );
        }
    }

    #[test]
    fn gelu_linear_equals_gelu_then_linear_bit_for_bit() {
        for (exact, dtype) in [
            (true, crate::DType::F32),
            (false, crate::DType::F32),
            (true, crate::DType::BF16),
        ] {
            let run = |fused: bool| {
                let x = randn(&[3, 5, 8], 31).to_dtype(dtype).requires_grad_();
                let w = randn(&[8, 6], 32).requires_grad_();
                let b = randn(&[6], 33).requires_grad_();
                let y = if fused {
                    x.gelu_linear(&w, Some(&b), exact).unwrap()
                } else if exact {
                    x.gelu().linear(&w, Some(&b)).unwrap()
                } else {
                    x.gelu_tanh().linear(&w, Some(&b)).unwrap()
                };
                y.mul(&y).unwrap().sum_all().unwrap().backward().unwrap();
                [
                    y.to_vec_f32(),
                    x.grad().unwrap().to_vec_f32(),
                    w.grad().unwrap().to_vec_f32(),
                    b.grad().unwrap().to_vec_f32(),
                ]
            };
            assert_eq!(run(true), run(false), "exact {exact}, {dtype:?}");
        }
    }

    #[test]
    fn a_frozen_operand_gets_no_gradient_and_the_other_the_same_one() {
        // Linear (shared weight, fused path) and batched products: each operand's gradient
        // with the other frozen equals its gradient with both trained, bit for bit.
        let cases: [(Vec<usize>, Vec<usize>, bool); 2] = [
            (vec![3, 4, 6], vec![6, 5], true),
            (vec![2, 3, 4], vec![2, 4, 5], false),
        ];
        for (sa, sb, linear) in cases {
            let (a0, b0) = (randn(&sa, 21), randn(&sb, 22));
            let bias = randn(&[5], 23);
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
                let bias = bias.requires_grad_();
                let y = if linear {
                    a.linear(&b, Some(&bias)).unwrap()
                } else {
                    a.matmul(&b).unwrap().add(&bias).unwrap()
                };
                y.mul(&y).unwrap().sum_all().unwrap().backward().unwrap();
                (
                    a.grad().map(|g| g.to_vec_f32()),
                    b.grad().map(|g| g.to_vec_f32()),
                    bias.grad().unwrap().to_vec_f32(),
                )
            };
            let both = grads(true, true);
            let only_a = grads(true, false);
            let only_b = grads(false, true);
            assert_eq!(only_a.0, both.0, "dA with B frozen");
            assert_eq!(only_b.1, both.1, "dB with A frozen");
            assert!(only_a.1.is_none() && only_b.0.is_none());
            assert_eq!(only_a.2, both.2, "the bias");
        }
    }

    #[test]
    fn large_matmul_matches_naive() {
        let (m, k, n) = (130, 70, 150);
        let a = randn(&[m, k], 12);
        let b = randn(&[k, n], 13);
        let c = a.matmul(&b).unwrap().to_vec_f32();
        let (av, bv) = (a.to_vec_f32(), b.to_vec_f32());
        for i in (0..m).step_by(17) {
            for j in (0..n).step_by(13) {
                let want: f32 = (0..k).map(|p| av[i * k + p] * bv[p * n + j]).sum();
                assert!((c[i * n + j] - want).abs() < 1e-3);
            }
        }
    }

    #[test]
    fn empty_batches_give_empty_results_and_zero_weight_gradients() {
        let x = Tensor::zeros(&[0, 4, 8], crate::DType::F32).requires_grad_();
        let w = randn(&[8, 3], 1).requires_grad_();
        let y = x.linear(&w, None).unwrap();
        assert_eq!(y.shape(), &[0, 4, 3]);
        y.backward_with_grad(&Tensor::zeros(&[0, 4, 3], crate::DType::F32))
            .unwrap();
        assert_eq!(w.grad().unwrap().to_vec_f32(), vec![0.0; 24]);
    }

    #[test]
    fn shape_errors_name_the_shapes() {
        let e = randn(&[2, 3], 1).matmul(&randn(&[4, 2], 2)).unwrap_err();
        assert!(
            e.to_string().contains("[2, 3]") && e.to_string().contains("[4, 2]"),
            "{e}"
        );
    }
}
