//! bf16 matrix products on AVX512-BF16: `C (+)= A·B` with A and B read as bf16 and C in f32.
//!
//! `vdpbf16ps acc, a, b` adds to each of 16 f32 lanes the two products of a pair of bf16 values:
//! `acc[i] += a[2i+1]·b[2i+1]`, then `+= a[2i]·b[2i]`, each addition rounded to nearest even,
//! with bf16 denormals read as zero and denormal sums flushed to zero (Intel's description of the
//! instruction, checked on hardware by this module's tests through [`dpbf16_emulated`]). Pairs run
//! along k, so operands are packed BLIS-style: B into panels of [`NR`] columns holding, for each
//! pair of k, the two rows' values side by side in a 32-bit word per column; A into panels of
//! [`MR`] rows holding each row's pair of k as one 32-bit word, broadcast to all lanes. A
//! [`MR`] × [`NR`] tile keeps 24 of the 32 vector registers as accumulators and issues two
//! `vdpbf16ps` per row per pair: 32 multiply-adds per instruction against f32 FMA's 16.
//!
//! Packing also converts: an f32 operand (a gradient) is rounded to bf16 to nearest even as it is
//! packed, so the bf16 operand beside it is never widened and no widened copy is kept.
//!
//! Every output element is `init` followed by its k pairs in order through the instruction, whatever
//! the blocking and threads: the result is a function of the data alone, and [`reference`] (the
//! same loop on [`dpbf16_emulated`]) reproduces it bit for bit.

use super::matmul::{product_front, Mat, Operand};
pub(crate) use crate::backend::Unit;

/// Rows of a micro-tile.
pub(crate) const MR: usize = 12;
/// Columns of a micro-tile (two 16-lane registers).
pub(crate) const NR: usize = 32;
/// k per packed block (even, so pairs never straddle blocks): a B micro-panel of KC × NR bf16
/// (24 KiB) stays in L1 while the A panels stream past it.
const KC: usize = 384;
/// Rows of A packed at once (a multiple of MR): 96 × 384 bf16 = 72 KiB, in L2.
const MC: usize = 96;
/// Columns of B packed at once: 384 × 1536 bf16 = 1.1 MiB.
const NC: usize = 1536;

/// Work (m·n·k) below which a product runs on one thread.
const SMALL: usize = 64 * 64 * 64;

/// An element a product can read as bf16.
pub(crate) trait Bf16Source: Copy + Send + Sync + 'static {
    /// The value's bf16 bits (rounded to nearest even for f32).
    fn bf16_bits(self) -> u16;

    /// 16 consecutive elements from `p` as bf16 bits in the low halves of 32-bit lanes.
    ///
    /// # Safety
    /// AVX-512 F present (inlined into a function that enables it); `p` valid for 16 elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512i;

    /// 16 pairs of consecutive elements, the pair of lane `l` at `base + idx[l]` (in elements),
    /// as words with the first element's bf16 bits in the low half.
    ///
    /// # Safety
    /// As [`Bf16Source::load16`], with every pair inside its allocation.
    #[cfg(target_arch = "x86_64")]
    unsafe fn gather_pairs16(
        base: *const Self,
        idx: std::arch::x86_64::__m512i,
    ) -> std::arch::x86_64::__m512i;
}

/// f32 bit patterns in 16 lanes rounded to bf16 in the low halves: [`Bf16Source::bf16_bits`] on
/// AVX-512 (round to nearest even, NaN kept quiet).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn round16(v: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(v), _mm512_set1_epi32(1));
    let bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
    let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(v, bias));
    let abs = _mm512_and_si512(v, _mm512_set1_epi32(0x7fff_ffff));
    let nan = _mm512_cmpgt_epu32_mask(abs, _mm512_set1_epi32(0x7f80_0000));
    let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(v), _mm512_set1_epi32(0x40));
    _mm512_mask_blend_epi32(nan, rounded, quiet)
}

impl Bf16Source for f32 {
    #[inline(always)]
    fn bf16_bits(self) -> u16 {
        crate::kernels::bf16_bits(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        round16(_mm512_loadu_si512(p as *const _))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn gather_pairs16(
        base: *const f32,
        idx: std::arch::x86_64::__m512i,
    ) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        let lo = round16(_mm512_i32gather_epi32::<4>(idx, base as *const i32));
        let hi = round16(_mm512_i32gather_epi32::<4>(idx, base.add(1) as *const i32));
        _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi))
    }
}

impl Bf16Source for u16 {
    #[inline(always)]
    fn bf16_bits(self) -> u16 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const u16) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn gather_pairs16(
        base: *const u16,
        idx: std::arch::x86_64::__m512i,
    ) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        _mm512_i32gather_epi32::<2>(idx, base as *const i32)
    }
}

/// The whole pairs of [`pack_b`] (`whole` of them, all `NR` columns inside the matrix) on
/// AVX-512: two rows side by side for a row-major B, a gather of each column's pair for a
/// transposed one.
///
/// # Safety
/// AVX-512 F present; as [`pack_b`], with `b.cs == 1` or `b.rs == 1`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_b_pairs_avx512<T: Bf16Source>(
    b: &Mat<T>,
    k0: usize,
    j0: usize,
    whole: usize,
    out: &mut [u32],
) {
    use std::arch::x86_64::*;
    let o = out.as_mut_ptr() as *mut __m512i;
    if b.cs == 1 {
        for p in 0..whole {
            let r0 = b.ptr.offset((k0 + 2 * p) as isize * b.rs + j0 as isize);
            let r1 = r0.offset(b.rs);
            for h in 0..NR / 16 {
                let lo = T::load16(r0.add(16 * h));
                let hi = T::load16(r1.add(16 * h));
                let w = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
                _mm512_storeu_si512(o.add(p * NR / 16 + h), w);
            }
        }
    } else {
        // Column j's pair p at column start + 2p: one gather per 16 columns.
        let base = b.ptr.offset(j0 as isize * b.cs + k0 as isize);
        let cs = b.cs as i32;
        let lanes = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(cs),
        );
        for p in 0..whole {
            for h in 0..NR / 16 {
                let idx = _mm512_add_epi32(lanes, _mm512_set1_epi32(16 * h as i32 * cs));
                let w = T::gather_pairs16(base.add(2 * p), idx);
                _mm512_storeu_si512(o.add(p * NR / 16 + h), w);
            }
        }
    }
}

/// Element `(i, j)` of `m` as bf16 bits, 0 outside the matrix (the padding of edge panels).
#[inline(always)]
unsafe fn at<T: Bf16Source>(m: &Mat<T>, i: usize, j: usize) -> u32 {
    if i < m.rows && j < m.cols {
        (*m.ptr.offset(i as isize * m.rs + j as isize * m.cs)).bf16_bits() as u32
    } else {
        0
    }
}

/// Packs rows `i0..i0+MR` and k `k0..k0+kc` of `a` as `[kc/2][MR]` words, each a row's pair of
/// k (the lower k in the low half).
unsafe fn pack_a<T: Bf16Source>(a: &Mat<T>, i0: usize, k0: usize, kc: usize, out: &mut [u32]) {
    let kp = kc.div_ceil(2);
    let full = i0 + MR <= a.rows && k0 + 2 * kp <= a.cols;
    if full && a.cs == 1 {
        for r in 0..MR {
            let row = a.ptr.offset((i0 + r) as isize * a.rs + k0 as isize);
            for p in 0..kp {
                let lo = (*row.add(2 * p)).bf16_bits() as u32;
                let hi = (*row.add(2 * p + 1)).bf16_bits() as u32;
                *out.get_unchecked_mut(p * MR + r) = lo | hi << 16;
            }
        }
        return;
    }
    for p in 0..kp {
        for r in 0..MR {
            let (i, k) = (i0 + r, k0 + 2 * p);
            out[p * MR + r] = at(a, i, k) | at(a, i, k + 1) << 16;
        }
    }
}

/// Packs k `k0..k0+kc` and columns `j0..j0+NR` of `b` as `[kp][NR]` words, each a column's
/// pair of k (zero past the matrix and past `kc`; `kp` ≥ `kc/2` rounded up).
///
/// # Safety
/// AVX-512 F present; `b` valid for its extents and strides; `out` holds `kp·NR` words.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn pack_b<T: Bf16Source>(
    b: &Mat<T>,
    k0: usize,
    j0: usize,
    kc: usize,
    kp: usize,
    out: &mut [u32],
) {
    // Pairs whose both k lie inside the block and the matrix, for whole panels.
    let whole = if j0 + NR <= b.cols {
        kc.min(b.rows.saturating_sub(k0)) / 2
    } else {
        0
    };
    // Whole pairs of a row-major or transposed B on AVX-512 (which every CPU that selects a
    // bf16 kernel has; gathers index in i32), the rest element by element.
    let vector = b.cs == 1 || (b.rs == 1 && b.cs.unsigned_abs() * b.cols < i32::MAX as usize / 4);
    let done = if vector {
        pack_b_pairs_avx512(b, k0, j0, whole, out);
        whole
    } else {
        0
    };
    let kend = k0 + kc;
    for p in done..kp {
        for j in 0..NR {
            let (k, c) = (k0 + 2 * p, j0 + j);
            let lo = if k < kend { at(b, k, c) } else { 0 };
            let hi = if k + 1 < kend { at(b, k + 1, c) } else { 0 };
            out[p * NR + j] = lo | hi << 16;
        }
    }
}

/// The micro-kernel: `c[r][j] (= or +=) Σ_p a[p][r] · b[p][j]` over `kp` pairs for an MR × NR
/// tile of `c` with row stride `ldc`, loading `c` first when `load` is set.
///
/// # Safety
/// AVX512-F and AVX512-BF16 present; `a` holds `kp·MR` words, `b` `kp·NR`, `c` the tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn micro(kp: usize, a: *const u32, b: *const u32, c: *mut f32, ldc: usize, load: bool) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    if load {
        for (r, row) in acc.iter_mut().enumerate() {
            row[0] = _mm512_loadu_ps(c.add(r * ldc));
            row[1] = _mm512_loadu_ps(c.add(r * ldc + 16));
        }
    }
    for p in 0..kp {
        let bp = b.add(p * NR);
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(16) as *const _));
        let ap = a.add(p * MR);
        for (r, row) in acc.iter_mut().enumerate() {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(r) as i32));
            row[0] = _mm512_dpbf16_ps(row[0], av, b0);
            row[1] = _mm512_dpbf16_ps(row[1], av, b1);
        }
    }
    for (r, row) in acc.iter().enumerate() {
        _mm512_storeu_ps(c.add(r * ldc), row[0]);
        _mm512_storeu_ps(c.add(r * ldc + 16), row[1]);
    }
}

/// Runs `kernel(c, ldc)` (`ldc` in elements) on an `R × NR` tile of C at `dst`, of which
/// `mr × nr` lie inside C: straight on C when the tile is whole and C row-major, else on a scratch
/// tile, copied in first when `load` is set and copied back after.
///
/// # Safety
/// `dst` valid for the `mr × nr` elements at its strides.
#[inline(always)]
pub(crate) unsafe fn on_tile<const R: usize>(
    dst: *mut f32,
    drs: isize,
    dcs: isize,
    (mr, nr): (usize, usize),
    load: bool,
    kernel: impl FnOnce(*mut f32, usize),
) {
    if mr == R && nr == NR && dcs == 1 {
        return kernel(dst, drs as usize);
    }
    let mut t = [[0f32; NR]; R];
    let at = |r: usize, j: usize| dst.offset(r as isize * drs + j as isize * dcs);
    if load {
        for (r, row) in t.iter_mut().enumerate().take(mr) {
            for (j, x) in row.iter_mut().enumerate().take(nr) {
                *x = *at(r, j);
            }
        }
    }
    kernel(t.as_mut_ptr() as *mut f32, NR);
    for (r, row) in t.iter().enumerate().take(mr) {
        for (j, x) in row.iter().enumerate().take(nr) {
            *at(r, j) = *x;
        }
    }
}

thread_local! {
    /// Packing buffers, kept per thread between products.
    static PACKED: std::cell::RefCell<(Vec<u32>, Vec<u32>)> = const {
        std::cell::RefCell::new((Vec::new(), Vec::new()))
    };
}

/// `dst (+)= a·b` on this thread.
#[cfg(target_arch = "x86_64")]
unsafe fn product_1<TA: Bf16Source, TB: Bf16Source>(
    dst: *mut f32,
    drs: isize,
    dcs: isize,
    accumulate: bool,
    a: &Mat<TA>,
    b: &Mat<TB>,
) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    PACKED.with(|bufs| {
        let mut bufs = bufs.borrow_mut();
        let (pa, pb) = &mut *bufs;
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            let panels = nc.div_ceil(NR);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                let kp = kc.div_ceil(2);
                pb.resize(panels * kp * NR, 0);
                for q in 0..panels {
                    pack_b(
                        b,
                        pc,
                        jc + q * NR,
                        kc,
                        kp,
                        &mut pb[q * kp * NR..(q + 1) * kp * NR],
                    );
                }
                let load = accumulate || pc > 0;
                for ic in (0..m).step_by(MC) {
                    let mc = MC.min(m - ic);
                    let strips = mc.div_ceil(MR);
                    pa.resize(strips * kp * MR, 0);
                    for s in 0..strips {
                        pack_a(
                            a,
                            ic + s * MR,
                            pc,
                            kc,
                            &mut pa[s * kp * MR..(s + 1) * kp * MR],
                        );
                    }
                    for q in 0..panels {
                        let j0 = jc + q * NR;
                        let nr = NR.min(n - j0);
                        for s in 0..strips {
                            let i0 = ic + s * MR;
                            let mr = MR.min(m - i0);
                            let (ap, bp) =
                                (pa.as_ptr().add(s * kp * MR), pb.as_ptr().add(q * kp * NR));
                            on_tile::<MR>(
                                dst.offset(i0 as isize * drs + j0 as isize * dcs),
                                drs,
                                dcs,
                                (mr, nr),
                                load,
                                |c, ldc| micro(kp, ap, bp, c, ldc, load),
                            );
                        }
                    }
                }
            }
        }
    });
}

/// `dst (+)= a·b` with bf16 arithmetic and f32 accumulation on `unit`, `dst` strided (`drs`,
/// `dcs`), on up to `threads` threads (the output cut into independent products, as
/// [`product_front`] does for every kernel).
///
/// # Safety
/// The CPU can run `unit` ([`crate::backend`] names it only then); pointers are valid for the
/// given extents and strides; `dst` aliases neither operand.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_on(
    unit: Unit,
    dst: *mut f32,
    drs: isize,
    dcs: isize,
    accumulate: bool,
    a: Operand,
    b: Operand,
    threads: usize,
) {
    // Parts on whole micro-tiles, at least two of them long.
    let split = |cut_rows: bool| {
        let tile = match (unit, cut_rows) {
            (Unit::Tiles, true) => super::gemm_amx::TM,
            (Unit::Pairs, true) => MR,
            (_, false) => NR,
        };
        (tile, 2 * tile)
    };
    let run = |d: *mut f32, a: Operand, b: Operand| {
        gemm_on(unit, d, drs, dcs, accumulate, a, b, 1);
    };
    if product_front(dst, drs, dcs, accumulate, a, b, threads, SMALL, split, run) {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! run {
            ($a:expr, $b:expr) => {
                match unit {
                    Unit::Pairs => product_1(dst, drs, dcs, accumulate, $a, $b),
                    Unit::Tiles => super::gemm_amx::product_1(dst, drs, dcs, accumulate, $a, $b),
                }
            };
        }
        match (a, b) {
            (Operand::F32(a), Operand::F32(b)) => run!(&a, &b),
            (Operand::F32(a), Operand::Bf16(b)) => run!(&a, &b),
            (Operand::Bf16(a), Operand::F32(b)) => run!(&a, &b),
            (Operand::Bf16(a), Operand::Bf16(b)) => run!(&a, &b),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the bf16 kernel paths are only selected on x86-64");
}

/// Multiply-adds per second of `vdpbf16ps` over those of f32 FMA on this core, timed on
/// independent register chains for a fraction of a millisecond each: above 1 where the
/// instruction pays, below where it does not (an Intel Sapphire Rapids core issues it at a quarter
/// of its FMA rate, so half the multiply-adds, and has AMX for bf16 instead).
///
/// # Safety
/// The CPU has AVX512-F and AVX512-BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,fma")]
pub(crate) unsafe fn pairs_over_fma_rate() -> f64 {
    use std::arch::x86_64::*;
    use std::hint::black_box;
    const CHAINS: usize = 16;
    let time = |f: &mut dyn FnMut()| {
        f();
        let t = std::time::Instant::now();
        f();
        t.elapsed().as_secs_f64().max(1e-9)
    };
    let reps = black_box(20_000usize);
    let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(black_box(0x3f80_3f80)));
    let mut pairs = [_mm512_setzero_ps(); CHAINS];
    let t_pairs = time(&mut || {
        for _ in 0..reps {
            for r in pairs.iter_mut() {
                *r = _mm512_dpbf16_ps(*r, a, a);
            }
        }
        black_box(&pairs);
    });
    let x = _mm512_set1_ps(black_box(0.5));
    let mut fma = [_mm512_setzero_ps(); CHAINS];
    let t_fma = time(&mut || {
        for _ in 0..reps {
            for r in fma.iter_mut() {
                *r = _mm512_fmadd_ps(*r, x, x);
            }
        }
        black_box(&fma);
    });
    // 32 multiply-adds per `vdpbf16ps`, 16 per FMA.
    (32.0 / t_pairs) / (16.0 / t_fma)
}

/// `vdpbf16ps` on one lane, in portable code: `acc`, then the products of the high halves of `a`
/// and `b` (as bf16), then of the low halves, each product exact and each sum rounded to nearest
/// even; bf16 inputs and the accumulator read with denormals as zero, and denormal sums flushed to
/// zero. Sums are taken in f64, where a bf16 product is exact, and rounded once to f32.
#[cfg(test)]
pub(crate) fn dpbf16_emulated(acc: f32, a: u32, b: u32) -> f32 {
    let ftz = |v: f32| {
        if v.is_subnormal() {
            0f32.copysign(v)
        } else {
            v
        }
    };
    let h = |bits: u32| ftz(f32::from_bits((bits & 0xffff) << 16)) as f64;
    let acc = ftz(acc);
    let t = ftz((acc as f64 + h(a >> 16) * h(b >> 16)) as f32);
    ftz((t as f64 + h(a) * h(b)) as f32)
}

/// The bf16 product in portable code, element by element on [`dpbf16_emulated`]: what [`gemm_on`]
/// computes, bit for bit (the test oracle of the kernel, and of any port of it).
///
/// # Safety
/// As [`gemm_on`], without the CPU requirement.
#[cfg(test)]
pub(crate) unsafe fn reference(
    dst: *mut f32,
    drs: isize,
    dcs: isize,
    accumulate: bool,
    a: Operand,
    b: Operand,
) {
    let (m, n, k) = (a.rows(), b.cols(), a.cols());
    let get = |o: &Operand, i: usize, j: usize| match o {
        Operand::F32(x) => at(x, i, j),
        Operand::Bf16(x) => at(x, i, j),
    };
    for i in 0..m {
        for j in 0..n {
            let d = dst.offset(i as isize * drs + j as isize * dcs);
            let mut acc = if accumulate { *d } else { 0.0 };
            for p in 0..k.div_ceil(2) {
                let aw = get(&a, i, 2 * p) | get(&a, i, 2 * p + 1) << 16;
                let bw = get(&b, 2 * p, j) | get(&b, 2 * p + 1, j) << 16;
                acc = dpbf16_emulated(acc, aw, bw);
            }
            *d = acc;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{has_avx512_bf16, with_kernel_path, KernelPath};
    use crate::testing::randn;
    use crate::DType;

    fn bits(x: f32) -> u32 {
        (x.to_bits() >> 16) & 0xffff
    }

    /// A one-lane `vdpbf16ps` through the product: a 1×2 by 2×1 product.
    fn lane(acc: f32, a: [f32; 2], b: [f32; 2], hardware: bool) -> f32 {
        let (a, b) = ([a[0], a[1]], [b[0], b[1]]);
        let (am, bm) = (Mat::dense(a.as_ptr(), 1, 2), Mat::dense(b.as_ptr(), 2, 1));
        let mut c = [acc];
        unsafe {
            if hardware {
                gemm_on(
                    Unit::Pairs,
                    c.as_mut_ptr(),
                    1,
                    1,
                    true,
                    Operand::F32(am),
                    Operand::F32(bm),
                    1,
                );
            } else {
                reference(
                    c.as_mut_ptr(),
                    1,
                    1,
                    true,
                    Operand::F32(am),
                    Operand::F32(bm),
                );
            }
        }
        c[0]
    }

    #[test]
    fn the_emulation_rounds_flushes_and_orders_as_the_instruction_does() {
        let p = |e: i32| 2f32.powi(e);
        // (acc, a, b, what AVX512-BF16 hardware gives).
        let cases = [
            // Two sums, each rounded: 1 + 2⁻²⁴ + 2⁻²⁴ stays 1 (a fused sum would give 1 + 2⁻²³).
            (1.0, [p(-12), p(-12)], [p(-12), p(-12)], 1.0),
            // The high pair is added first: (2⁻²⁴ + 1) rounds to 1, then − 1 gives 0 ...
            (p(-24), [-1.0, 1.0], [1.0, 1.0], 0.0),
            // ... and with the signs swapped, 2⁻²⁴ − 1 is exact, so 2⁻²⁴ survives.
            (p(-24), [1.0, -1.0], [1.0, 1.0], p(-24)),
            // Denormal bf16 inputs read as zero.
            (0.0, [f32::from_bits(1 << 16), 0.0], [p(100), 0.0], 0.0),
            // A product below the normal range is exact until the sum, which is flushed.
            (p(-126), [0.0, p(-63)], [0.0, -p(-64)], 0.0),
            // A denormal intermediate sum is flushed before the second product is added.
            (1.5 * p(-126), [p(-63), p(-63)], [p(-63), -p(-63)], p(-126)),
            // Products are not rounded to f32 first: −2²⁰⁰ overflows the sum to −∞, and the
            // second product (+2²⁰⁰, not +∞) leaves it there instead of making NaN.
            (0.0, [p(100), p(100)], [p(100), -p(100)], f32::NEG_INFINITY),
            // A denormal accumulator reads as zero.
            (f32::from_bits(5), [0.0, 0.0], [0.0, 0.0], 0.0),
        ];
        let hardware = has_avx512_bf16();
        if !hardware {
            eprintln!(
                "no AVX512-BF16 on this CPU: the emulation is checked against recorded values only"
            );
        }
        for (acc, a, b, want) in cases {
            let got = lane(acc, a, b, false);
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "emulation: {acc:e} + {a:?}·{b:?}"
            );
            if hardware {
                let hw = lane(acc, a, b, true);
                assert_eq!(
                    hw.to_bits(),
                    want.to_bits(),
                    "hardware: {acc:e} + {a:?}·{b:?}"
                );
            }
        }
        assert_eq!(
            dpbf16_emulated(
                0.0,
                bits(2.0) << 16 | bits(3.0),
                bits(5.0) << 16 | bits(7.0)
            ),
            31.0
        );
    }

    /// Random values over a wide exponent range, some denormal, zero or special.
    fn wild(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::Rng::new(seed);
        (0..n)
            .map(|i| match i % 17 {
                0 => 0.0,
                1 => f32::from_bits(rng.next_u64() as u32 & 0x007f_ffff),
                2 => rng.normal() * 2f32.powi((rng.next_u64() % 60) as i32 - 30),
                _ => rng.normal(),
            })
            .collect()
    }

    #[test]
    fn the_kernel_equals_its_emulation_bit_for_bit() {
        if !has_avx512_bf16() {
            eprintln!("no AVX512-BF16 on this CPU: the kernel is not run here (nor dispatched to)");
            return;
        }
        // Edge tiles, odd k, k across blocks, n across column blocks, transposed and mixed
        // operands, accumulation, one and two threads.
        let shapes = [
            (1, 1, 1),
            (5, 3, 7),
            (13, 33, 31),
            (40, 70, 800),
            (100, 1600, 20),
            (37, 45, 390),
        ];
        for (case, &(m, n, k)) in shapes.iter().enumerate() {
            let a32 = wild(m * k, case as u64 * 2 + 1);
            let b32 = wild(k * n, case as u64 * 2 + 2);
            let a16: Vec<u16> = a32.iter().map(|x| x.bf16_bits()).collect();
            let b16: Vec<u16> = b32.iter().map(|x| x.bf16_bits()).collect();
            let c0 = wild(m * n, 99);
            for variant in 0..5 {
                let (a, b) = self::variant(variant, (m, n, k), (&a32, &a16), (&b32, &b16));
                for (accumulate, threads) in [(false, 1), (true, 1), (false, 2), (true, 2)] {
                    let mut want = c0.clone();
                    let mut got = c0.clone();
                    unsafe {
                        reference(want.as_mut_ptr(), n as isize, 1, accumulate, a, b);
                        gemm_on(
                            Unit::Pairs,
                            got.as_mut_ptr(),
                            n as isize,
                            1,
                            accumulate,
                            a,
                            b,
                            threads,
                        );
                    }
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                            "{m}×{k}·{k}×{n} variant {variant} acc {accumulate} threads {threads}: \
                             element {i}: {g:e} vs {w:e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn packing_rounds_f32_to_bf16_as_the_half_crate_does() {
        let specials = [
            0.0,
            -0.0,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0xff80_8000),
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
        ];
        let mut rng = crate::Rng::new(11);
        let random = (0..100_000).map(|_| f32::from_bits(rng.next_u64() as u32));
        for x in specials.into_iter().chain(random) {
            assert_eq!(
                x.bf16_bits(),
                half::bf16::from_f32(x).to_bits(),
                "{x:e} ({:#x})",
                x.to_bits()
            );
        }
    }

    /// Operand layouts a product meets: bf16 or f32, dense or transposed.
    fn variant<'a>(
        v: usize,
        (m, n, k): (usize, usize, usize),
        a: (&'a [f32], &'a [u16]),
        b: (&'a [f32], &'a [u16]),
    ) -> (Operand, Operand) {
        let ao = match v {
            0 => Operand::Bf16(Mat::dense(a.1.as_ptr(), m, k)),
            1 => Operand::F32(Mat::dense(a.0.as_ptr(), m, k)),
            4 => Operand::F32(Mat::dense(a.0.as_ptr(), k, m).t()),
            _ => Operand::Bf16(Mat::dense(a.1.as_ptr(), k, m).t()),
        };
        let bo = match v {
            0 | 2 => Operand::Bf16(Mat::dense(b.1.as_ptr(), k, n)),
            1 => Operand::Bf16(Mat::dense(b.1.as_ptr(), n, k).t()),
            4 => Operand::F32(Mat::dense(b.0.as_ptr(), k, n)),
            _ => Operand::F32(Mat::dense(b.0.as_ptr(), n, k).t()),
        };
        (ao, bo)
    }

    #[test]
    fn amx_tiles_give_the_product_of_the_rounded_operands() {
        if !crate::backend::has_amx_bf16() {
            eprintln!(
                "no AMX-BF16 on this CPU: the tile kernel is not run here (nor dispatched to)"
            );
            return;
        }
        // Tile edges, k below, across and not a multiple of a tile's 32 and of a block's 512,
        // n across column blocks, transposed and mixed operands, accumulation, one and two
        // threads. Small integers first (every sum exact, so the result is exact whatever the
        // order inside an instruction), then random values within rounding.
        let shapes = [
            (1, 1, 1),
            (5, 3, 7),
            (33, 65, 31),
            (40, 70, 800),
            (100, 1600, 20),
            (64, 64, 64),
            (37, 45, 1030),
        ];
        for exact in [true, false] {
            for (case, &(m, n, k)) in shapes.iter().enumerate() {
                let gen = |len: usize, seed: u64| -> Vec<f32> {
                    if exact {
                        (0..len)
                            .map(|i| ((i as u64 * 7 + seed) % 9) as f32 - 4.0)
                            .collect()
                    } else {
                        wild(len, seed)
                    }
                };
                let a32 = gen(m * k, case as u64 * 2 + 1);
                let b32 = gen(k * n, case as u64 * 2 + 2);
                let a16: Vec<u16> = a32.iter().map(|x| x.bf16_bits()).collect();
                let b16: Vec<u16> = b32.iter().map(|x| x.bf16_bits()).collect();
                let c0 = gen(m * n, 99);
                // An operand's element as the instruction reads it: bf16, denormals as zero.
                let r = |o: &Operand, i: usize, j: usize| {
                    let bits = unsafe {
                        match o {
                            Operand::F32(x) => at(x, i, j),
                            Operand::Bf16(x) => at(x, i, j),
                        }
                    };
                    let v = f32::from_bits(bits << 16);
                    if v.is_subnormal() {
                        0.0
                    } else {
                        v as f64
                    }
                };
                for v in 0..5 {
                    let (a, b) = variant(v, (m, n, k), (&a32, &a16), (&b32, &b16));
                    for (accumulate, threads) in [(false, 1), (true, 1), (false, 2), (true, 2)] {
                        let mut got = c0.clone();
                        unsafe {
                            gemm_on(
                                Unit::Tiles,
                                got.as_mut_ptr(),
                                n as isize,
                                1,
                                accumulate,
                                a,
                                b,
                                threads,
                            );
                        }
                        for i in 0..m {
                            for j in 0..n {
                                let c = if accumulate {
                                    c0[i * n + j] as f64
                                } else {
                                    0.0
                                };
                                let terms = (0..k).map(|p| r(&a, i, p) * r(&b, p, j));
                                let want: f64 = c + terms.clone().sum::<f64>();
                                let size: f64 = c.abs() + terms.map(f64::abs).sum::<f64>();
                                let g = got[i * n + j] as f64;
                                let tol = if exact {
                                    0.0
                                } else {
                                    (k + 1) as f64 * 2f64.powi(-23) * size
                                };
                                assert!(
                                    (g - want).abs() <= tol,
                                    "{m}×{k}·{k}×{n} variant {v} acc {accumulate} threads \
                                     {threads}: ({i}, {j}): {g:e} vs {want:e}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_emulated_product_is_the_f32_product_of_the_rounded_operands() {
        let (m, n, k) = (7, 9, 33);
        let a: Vec<f32> = randn(&[m, k], 3).to_vec_f32();
        let b: Vec<f32> = randn(&[k, n], 4).to_vec_f32();
        let r = |x: f32| half::bf16::from_f32(x).to_f32() as f64;
        let mut c = vec![0f32; m * n];
        unsafe {
            reference(
                c.as_mut_ptr(),
                n as isize,
                1,
                false,
                Operand::F32(Mat::dense(a.as_ptr(), m, k)),
                Operand::F32(Mat::dense(b.as_ptr(), k, n)),
            );
        }
        for i in 0..m {
            for j in 0..n {
                let exact: f64 = (0..k).map(|p| r(a[i * k + p]) * r(b[p * n + j])).sum();
                assert!((c[i * n + j] as f64 - exact).abs() < 1e-5 * (1.0 + exact.abs()));
            }
        }
    }

    #[test]
    fn bf16_products_on_either_path_agree_and_the_fallback_can_be_forced() {
        let x = randn(&[3, 40, 64], 5)
            .to_dtype(DType::BF16)
            .requires_grad_();
        let w = randn(&[64, 48], 6).to_dtype(DType::BF16).requires_grad_();
        let run = |path| {
            with_kernel_path(path, || {
                assert!(path == KernelPath::Widening || crate::backend::kernel_path() == path);
                let y = x.linear(&w, None).unwrap();
                let g = randn(&[3, 40, 48], 7);
                y.backward_with_grad(&g).unwrap();
                let out = (
                    y.to_vec_f32(),
                    x.grad().unwrap().to_vec_f32(),
                    w.grad().unwrap().to_vec_f32(),
                );
                x.zero_grad();
                w.zero_grad();
                out
            })
        };
        let widened = run(KernelPath::Widening);
        assert_eq!(
            with_kernel_path(KernelPath::Widening, crate::backend::kernel_path),
            KernelPath::Widening
        );
        for path in [KernelPath::Avx512Bf16, KernelPath::Amx] {
            if !path.available() {
                eprintln!("this CPU cannot run {}: not compared", path.name());
                continue;
            }
            let paired = run(path);
            // The forward reads the same bf16 values on every path and differs only in
            // summation order; backward rounds the f32 gradient to bf16 on the 16-bit paths.
            for (name, a, b, tol) in [
                ("y", &widened.0, &paired.0, 2e-2),
                ("dx", &widened.1, &paired.1, 5e-2),
                ("dw", &widened.2, &paired.2, 5e-2),
            ] {
                let scale = a.iter().map(|v| v.abs()).fold(0f32, f32::max);
                let worst = a
                    .iter()
                    .zip(b)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst <= tol * scale,
                    "{} {name}: {worst} against scale {scale}",
                    path.name()
                );
            }
        }
        if !has_avx512_bf16() {
            return;
        }
        use crate::backend::{product_kernel, ProductKernel};
        let kernel = |path| {
            with_kernel_path(path, || {
                product_kernel(crate::Device::Cpu, DType::BF16, DType::F32)
            })
        };
        assert_eq!(
            kernel(KernelPath::Avx512Bf16),
            ProductKernel::Bf16(Unit::Pairs)
        );
        assert_eq!(kernel(KernelPath::Widening), ProductKernel::F32);
    }
}
