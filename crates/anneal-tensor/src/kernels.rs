//! Small vector kernels shared by the ops, written so the compiler vectorises them.

use rayon::prelude::*;

/// Runs `f` compiled for AVX2 and FMA when the CPU has them (checked once, then cached by std),
/// otherwise as built. The default x86-64 target only assumes SSE2, so without this the
/// elementwise loops run 4 lanes wide instead of 8; `f` is inlined into the AVX2 function, which
/// recompiles its loops for the wider registers. A portable binary keeps working on older CPUs.
#[inline(always)]
pub(crate) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn run<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY: the features were detected above.
            return unsafe { run(f) };
        }
    }
    f()
}

/// Whether the CPU has AVX2 and FMA (detected once, then cached by std).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Elements per rayon task for elementwise loops: below this, splitting costs more than it saves.
pub(crate) const PAR_CHUNK: usize = 1 << 15;

/// Runs `f(dst[i], src[i])` over both slices in parallel chunks of [`PAR_CHUNK`], each compiled
/// for the widest vectors available.
fn update_with<D: Send, S: Copy + Sync>(dst: &mut [D], src: &[S], f: impl Fn(&mut D, S) + Sync) {
    let run = |d: &mut [D], s: &[S]| vectorized(|| d.iter_mut().zip(s).for_each(|(d, &s)| f(d, s)));
    if dst.len() >= 2 * PAR_CHUNK {
        dst.par_chunks_mut(PAR_CHUNK)
            .zip(src.par_chunks(PAR_CHUNK))
            .for_each(|(d, s)| run(d, s));
    } else {
        run(dst, src);
    }
}

/// `dst += src`.
pub(crate) fn add_assign(dst: &mut [f32], src: &[f32]) {
    update_with(dst, src, |d, s| *d += s);
}

/// `dst = bf16(dst + src)`, rounded to nearest even: a bf16 gradient buffer accumulating an f32
/// gradient.
pub(crate) fn add_assign_bf16(dst: &mut [half::bf16], src: &[f32]) {
    update_with(dst, src, |d, s| {
        *d = half::bf16::from_bits(bf16_bits(d.widen() + s))
    });
}

/// Adds per-chunk partial sums in chunk order: `parts[0] + parts[1] + …`, element by element.
///
/// Reductions split across rayon tasks collect their partials with an order-preserving
/// `collect` and sum them here, so the result depends only on the data and the fixed chunk size,
/// never on which thread ran which chunk or how many threads there are (rayon's `reduce` and `sum`
/// combine partials in a tree whose shape follows the work stealing). The partials go back to the
/// buffer pool.
pub(crate) fn sum_in_order(parts: Vec<Vec<f32>>, n: usize) -> Vec<f32> {
    let mut parts = parts.into_iter();
    let mut acc = match parts.next() {
        Some(first) => first,
        None => return crate::pool::zeros(n),
    };
    for p in parts {
        vectorized(|| acc.iter_mut().zip(&p).for_each(|(a, &b)| *a += b));
        crate::pool::recycle(p);
    }
    acc
}

/// Applies `f` to every element of `src`, writing `dst`, in parallel chunks.
pub(crate) fn map_into(dst: &mut [f32], src: &[f32], f: impl Fn(f32) -> f32 + Sync) {
    update_with(dst, src, |d, s| *d = f(s));
}

/// `dst[i] = f(a[i], b[i])` in parallel chunks.
pub(crate) fn zip_into<A: Widen, B: Widen>(
    dst: &mut [f32],
    a: &[A],
    b: &[B],
    f: impl Fn(f32, f32) -> f32 + Sync,
) {
    let run = |d: &mut [f32], a: &[A], b: &[B]| {
        vectorized(|| {
            for ((d, &a), &b) in d.iter_mut().zip(a).zip(b) {
                *d = f(a.widen(), b.widen());
            }
        })
    };
    if dst.len() >= 2 * PAR_CHUNK {
        dst.par_chunks_mut(PAR_CHUNK)
            .zip(a.par_chunks(PAR_CHUNK).zip(b.par_chunks(PAR_CHUNK)))
            .for_each(|(d, (a, b))| run(d, a, b));
    } else {
        run(dst, a, b);
    }
}

/// Dot product with eight independent accumulators over exact chunks of eight (so it vectorises
/// without fast-math and without bounds checks).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    sum_zip(a, b, |x, y| x * y)
}

/// Error function, accurate to about 1e-13 (evaluated in f64; the reference the fast kernels
/// are tested against): the Maclaurin series for
/// |x| < 3 and Lentz's continued fraction for erfc beyond (Abramowitz & Stegun 7.1.5, 7.1.14).
#[cfg(test)]
pub(crate) fn erf(x: f64) -> f64 {
    let ax = x.abs();
    let r = if ax < 3.0 {
        // erf(x) = 2/sqrt(pi) * sum_n (-1)^n x^(2n+1) / (n! (2n+1))
        let x2 = ax * ax;
        let mut term = ax;
        let mut sum = ax;
        let mut n = 0.0;
        loop {
            n += 1.0;
            term *= -x2 / n;
            let t = term / (2.0 * n + 1.0);
            sum += t;
            if t.abs() <= 1e-17 * sum.abs() || n > 200.0 {
                break;
            }
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else {
        // erfc(x) = exp(-x^2)/sqrt(pi) * 1/(x + 1/2/(x + 1/(x + 3/2/(x + ...))))
        let mut f = ax;
        for k in (1..60).rev() {
            f = ax + (k as f64 / 2.0) / f;
        }
        1.0 - (-ax * ax).exp() / (std::f64::consts::PI.sqrt() * f)
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_normal_cdf_is_within_3e_7_of_the_exact_one() {
        let mut worst = 0.0f64;
        for i in -20_000..=20_000 {
            let x = i as f32 * 5e-4;
            let exact = 0.5 * (1.0 + erf(x as f64 / std::f64::consts::SQRT_2));
            worst = worst.max((fast_normal_cdf(x) as f64 - exact).abs());
            let pdf = (-0.5 * (x as f64).powi(2)).exp() / (2.0 * std::f64::consts::PI).sqrt();
            assert!(
                (fast_normal_cdf_pdf(x).1 as f64 - pdf).abs() < 1e-7,
                "pdf({x})"
            );
        }
        assert!(worst < 3e-7, "worst absolute error {worst}");
        // The lower tail stays a small number near the true one (a 1 − (1 − ε) form would give
        // 0 or a multiple of 6e-8 here): measured 0.4% off at −6.
        let far = fast_normal_cdf(-6.0) as f64;
        assert!((far / 9.865_876_450_377e-10 - 1.0).abs() < 1e-2, "{far}");
    }

    #[test]
    fn erf_matches_reference_values() {
        // Values from Abramowitz & Stegun Table 7.1.
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_047),
            (1.0, 0.842_700_792_949_715),
            (2.0, 0.995_322_265_018_953),
            (3.5, 0.999_999_256_901_628),
            (-1.0, -0.842_700_792_949_715),
        ] {
            assert!((erf(x) - want).abs() < 1e-12, "erf({x}) = {}", erf(x));
        }
    }
}

/// eˣ in f32, branch-free so loops over it vectorise: x = n·ln2 + r with |r| ≤ ln2/2 (Cody–Waite
/// reduction with ln2 split in two), eʳ by its degree-6 Taylor polynomial (truncation ≤ 2.2e-8
/// relative), 2ⁿ assembled in the exponent bits. Relative error about 2 ulp over [−87, 88];
/// inputs outside are clamped (so e^−∞ gives 1.6e-38, not 0: callers that need exact zeros for
/// masked entries test for them).
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // The low bits of t hold n + 0x40_0000 (n is in [-126, 127]): build 2ⁿ with integer
    // operations only, which vectorise where a float-to-int cast does not.
    let biased = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127);
    let scale = f32::from_bits(biased << 23);
    p * scale
}

/// The standard normal CDF Φ(x) = ½·erfc(−x/√2) in f32, branch-free so loops over it vectorise:
/// erfc(a) for a = |x|/√2 by Abramowitz & Stegun 7.1.26 (a degree-5 polynomial in
/// t = 1/(1 + p·a) times e^−a², absolute error ≤ 1.5e-7), then Φ = 1 − ½·erfc(a) for x ≥ 0 and
/// ½·erfc(a) below, so neither tail loses accuracy to cancellation (measured: within 2.5e-7 of
/// the exact Φ over [−10, 10]). The exact GELU is x·Φ(x).
#[inline(always)]
pub(crate) fn fast_normal_cdf(x: f32) -> f32 {
    fast_normal_cdf_pdf(x).0
}

/// Φ(x) as [`fast_normal_cdf`] and the standard normal density φ(x) = e^(−x²/2)/√(2π), sharing one
/// exponential (e^−a² with a = |x|/√2 is e^(−x²/2)): the exact GELU's derivative Φ(x) + x·φ(x)
/// needs both.
#[inline(always)]
pub(crate) fn fast_normal_cdf_pdf(x: f32) -> (f32, f32) {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_72,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let a = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let e = fast_exp(-a * a);
    let half_erfc = 0.5 * poly * e;
    let cdf = if x >= 0.0 { 1.0 - half_erfc } else { half_erfc };
    (cdf, INV_SQRT_2PI * e)
}

/// tanh in f32 through [`fast_exp`]: 1 − 2/(e²ᵘ + 1). Absolute error about 2e-7.
#[inline(always)]
pub(crate) fn fast_tanh(u: f32) -> f32 {
    1.0 - 2.0 / (fast_exp(2.0 * u) + 1.0)
}

#[cfg(test)]
mod fast_math_tests {
    use super::*;

    #[test]
    fn fast_exp_and_tanh_accuracy() {
        let mut worst_exp = 0.0f64;
        let mut worst_tanh = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let e = fast_exp(x) as f64;
            let want = (x as f64).exp();
            worst_exp = worst_exp.max(((e - want) / want).abs());
            let u = x / 10.0;
            worst_tanh = worst_tanh.max((fast_tanh(u) as f64 - (u as f64).tanh()).abs());
            x += 0.0137;
        }
        assert!(worst_exp < 5e-7, "exp relative error {worst_exp}");
        assert!(worst_tanh < 5e-7, "tanh absolute error {worst_tanh}");
    }
}

/// Rounds f32 to bfloat16, to nearest with ties to even (as `half::bf16::from_f32`), written with
/// integer operations so the loop vectorises; NaN stays a quiet NaN.
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = ((b.wrapping_add(0x7FFF + ((b >> 16) & 1))) >> 16) as u16;
    if x.is_nan() {
        ((b >> 16) as u16) | 0x0040
    } else {
        rounded
    }
}

/// `dst[i] = bf16(src[i])`, in parallel.
pub(crate) fn f32_to_bf16(src: &[f32], dst: &mut [half::bf16]) {
    dst.par_chunks_mut(PAR_CHUNK)
        .zip(src.par_chunks(PAR_CHUNK))
        .for_each(|(d, s)| {
            vectorized(|| {
                for (d, &s) in d.iter_mut().zip(s) {
                    *d = half::bf16::from_bits(bf16_bits(s));
                }
            })
        });
}

/// An element a fused loop reads, widened to f32 in registers.
pub(crate) trait Widen: Copy + Send + Sync {
    fn widen(self) -> f32;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for half::bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

/// An element a fused loop writes, narrowed from f32 in registers (bf16: to nearest even).
pub(crate) trait Narrow: Copy + Send + Sync {
    fn narrow(x: f32) -> Self;
}

impl Narrow for f32 {
    #[inline(always)]
    fn narrow(x: f32) -> f32 {
        x
    }
}

impl Narrow for half::bf16 {
    #[inline(always)]
    fn narrow(x: f32) -> half::bf16 {
        half::bf16::from_bits(bf16_bits(x))
    }
}

/// A fresh vector of `f(a[i], b[i])`, each element widened, computed and narrowed in registers,
/// in parallel chunks: no f32 copy of either operand or of the result, and no zero-fill of the
/// output (a half-precision op's widened scratch, with its zeroing and page faults, measured at
/// over a tenth of the GPT benchmark's bf16 step).
pub(crate) fn zip_map<A: Widen, B: Widen, O: Narrow>(
    a: &[A],
    b: &[B],
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Vec<O> {
    assert_eq!(a.len(), b.len());
    let n = a.len();
    let mut out: Vec<O> = Vec::with_capacity(n);
    let run = |d: &mut [std::mem::MaybeUninit<O>], a: &[A], b: &[B]| {
        vectorized(|| {
            for ((d, &a), &b) in d.iter_mut().zip(a).zip(b) {
                d.write(O::narrow(f(a.widen(), b.widen())));
            }
        })
    };
    let dst = &mut out.spare_capacity_mut()[..n];
    if n >= 2 * PAR_CHUNK {
        dst.par_chunks_mut(PAR_CHUNK)
            .zip(a.par_chunks(PAR_CHUNK).zip(b.par_chunks(PAR_CHUNK)))
            .for_each(|(d, (a, b))| run(d, a, b));
    } else {
        run(dst, a, b);
    }
    // SAFETY: every one of the first n elements was written above.
    unsafe { out.set_len(n) };
    out
}

/// A fresh vector of `f(a[i])`, as [`zip_map`].
pub(crate) fn map_to<A: Widen, O: Narrow>(a: &[A], f: impl Fn(f32) -> f32 + Sync) -> Vec<O> {
    let n = a.len();
    let mut out: Vec<O> = Vec::with_capacity(n);
    let run = |d: &mut [std::mem::MaybeUninit<O>], a: &[A]| {
        vectorized(|| {
            for (d, &a) in d.iter_mut().zip(a) {
                d.write(O::narrow(f(a.widen())));
            }
        })
    };
    let dst = &mut out.spare_capacity_mut()[..n];
    if n >= 2 * PAR_CHUNK {
        dst.par_chunks_mut(PAR_CHUNK)
            .zip(a.par_chunks(PAR_CHUNK))
            .for_each(|(d, a)| run(d, a));
    } else {
        run(dst, a);
    }
    // SAFETY: every one of the first n elements was written above.
    unsafe { out.set_len(n) };
    out
}

/// `dst[i] = f32(src[i])` (exact), in parallel.
pub(crate) fn bf16_to_f32(src: &[half::bf16], dst: &mut [f32]) {
    dst.par_chunks_mut(PAR_CHUNK)
        .zip(src.par_chunks(PAR_CHUNK))
        .for_each(|(d, s)| {
            vectorized(|| {
                for (d, s) in d.iter_mut().zip(s) {
                    *d = f32::from_bits((s.to_bits() as u32) << 16);
                }
            })
        });
}

/// `dst[i] = f16(src[i])` (to nearest, ties to even), in parallel, with the CPU's F16C
/// conversions where it has them (`half` detects them at run time).
pub(crate) fn f32_to_f16(src: &[f32], dst: &mut [half::f16]) {
    use half::slice::HalfFloatSliceExt;
    dst.par_chunks_mut(PAR_CHUNK)
        .zip(src.par_chunks(PAR_CHUNK))
        .for_each(|(d, s)| d.convert_from_f32_slice(s));
}

/// `dst[i] = f32(src[i])` (exact), in parallel, as [`f32_to_f16`].
pub(crate) fn f16_to_f32(src: &[half::f16], dst: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    dst.par_chunks_mut(PAR_CHUNK)
        .zip(src.par_chunks(PAR_CHUNK))
        .for_each(|(d, s)| s.convert_to_f32_slice(d));
}

/// Splits f32 values into a bf16 part `hi` and the 16 bits it drops, `lo`, so that
/// [`join_bf16`] gives back every value bit for bit: an exact f32 master copy stored beside a
/// bf16 model in 2 extra bytes per element instead of 4.
///
/// `hi` rounds to nearest with ties away from zero (`(bits + 0x8000) >> 16`), so the dropped part
/// read as a signed 16-bit integer is the exact correction: bits = (hi << 16) + i16(lo). It differs
/// from round-to-nearest-even only when the dropped half is exactly 0x8000. NaN becomes the quiet
/// NaN with `lo = 0`.
#[inline(always)]
pub(crate) fn split_bf16(src: &[f32], hi: &mut [half::bf16], lo: &mut [u16]) {
    for ((&x, h), l) in src.iter().zip(hi.iter_mut()).zip(lo.iter_mut()) {
        let b = x.to_bits();
        let (hb, lb) = if x.is_nan() {
            (0x7FC0, 0)
        } else {
            ((b.wrapping_add(0x8000) >> 16) as u16, b as u16)
        };
        *h = half::bf16::from_bits(hb);
        *l = lb;
    }
}

/// The f32 values that [`split_bf16`] split: bits = (hi << 16) + i16(lo).
#[inline(always)]
pub(crate) fn join_bf16(hi: &[half::bf16], lo: &[u16], dst: &mut [f32]) {
    for ((d, h), &l) in dst.iter_mut().zip(hi).zip(lo) {
        let b = ((h.to_bits() as u32) << 16).wrapping_add(l as i16 as i32 as u32);
        *d = f32::from_bits(b);
    }
}

#[cfg(test)]
mod bf16_tests {
    use super::*;

    #[test]
    fn split_bf16_round_trips_every_value_and_rounds_to_nearest() {
        let mut xs: Vec<f32> = (0..200_000u32)
            .map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761)))
            .filter(|x| !x.is_nan())
            .collect();
        xs.extend([
            0.0,
            -0.0,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
            f32::from_bits(0x3F80_8000), // an exact tie
            f32::from_bits(0xBF81_8000),
        ]);
        let mut hi = vec![half::bf16::ZERO; xs.len()];
        let mut lo = vec![0u16; xs.len()];
        split_bf16(&xs, &mut hi, &mut lo);
        let mut back = vec![0.0f32; xs.len()];
        join_bf16(&hi, &lo, &mut back);
        for ((x, y), h) in xs.iter().zip(&back).zip(&hi) {
            assert_eq!(x.to_bits(), y.to_bits(), "{x:e}");
            // hi is a nearest bf16: off by at most half a bf16 spacing (overflow to ±inf aside).
            if x.is_finite() && h.to_f32().is_finite() {
                let near = half::bf16::from_f32(*x).to_f32();
                assert!((h.to_f32() - x).abs() <= (near - x).abs(), "{x:e}");
            }
        }
        let mut nan_hi = [half::bf16::ZERO];
        let mut nan_lo = [1u16];
        split_bf16(&[f32::from_bits(0x7FFF_FFFF)], &mut nan_hi, &mut nan_lo);
        join_bf16(&nan_hi, &nan_lo, &mut back[..1]);
        assert!(back[0].is_nan());
    }

    #[test]
    fn bf16_conversion_matches_half() {
        let xs: Vec<f32> = (0..20000)
            .map(|i| ((i as f32) * 0.37).sin() * 10f32.powi(i % 7 - 3))
            .chain([
                0.0,
                -0.0,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::MAX,
                1.0 + 1.0 / 256.0,
                1.0 + 3.0 / 256.0,
            ])
            .collect();
        let mut ours = vec![half::bf16::ZERO; xs.len()];
        f32_to_bf16(&xs, &mut ours);
        for (x, o) in xs.iter().zip(&ours) {
            assert_eq!(o.to_bits(), half::bf16::from_f32(*x).to_bits(), "{x}");
        }
        let mut back = vec![0.0f32; xs.len()];
        bf16_to_f32(&ours, &mut back);
        for (b, o) in back.iter().zip(&ours) {
            assert_eq!(*b, o.to_f32());
        }
        let mut nan = [half::bf16::ZERO];
        f32_to_bf16(&[f32::NAN], &mut nan);
        assert!(nan[0].is_nan());
    }
}

#[inline(always)]
fn reduce_lanes(acc: [f32; 8]) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Σ f(x) with eight independent partial sums over exact chunks of eight, so the loop vectorises
/// (a single running sum is a dependency chain of n additions that the compiler may not reorder).
#[inline(always)]
pub(crate) fn sum_map(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..8 {
            acc[j] += f(c[j]);
        }
    }
    let mut s = reduce_lanes(acc);
    for &v in rest {
        s += f(v);
    }
    s
}

/// Σ f(a, b) over two equally long slices, eight lanes wide.
#[inline(always)]
pub(crate) fn sum_zip(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for j in 0..8 {
            acc[j] += f(ca[j], cb[j]);
        }
    }
    let mut s = reduce_lanes(acc);
    for i in n / 8 * 8..n {
        s += f(a[i], b[i]);
    }
    s
}

/// Σ x.
#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f32 {
    sum_map(x, |v| v)
}

/// max x (−∞ for an empty slice), eight lanes wide.
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..8 {
            acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
        }
    }
    let mut m = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &v in rest {
        m = m.max(v);
    }
    m
}
