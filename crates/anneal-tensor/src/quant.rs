//! Weight matrices kept in GGML's quantised blocks and multiplied without widening them in
//! memory: each 32-element block is dequantised into registers and used against every row of the
//! input before the next block is read.
//!
//! Generating one token reads every weight once, so at small batches the matrix products are
//! bound by memory traffic, not arithmetic: a Q4_1 block is 20 bytes for 32 weights against 128
//! in f32, a Q8_0 block 34. The values used are exactly the dequantised f32 ones (`d·q + m`), so
//! outputs equal the f32 product up to the order of summation.

use std::sync::Arc;

use rayon::prelude::*;

use crate::error::{invalid, Result};
use crate::gguf::{dequantize_block, dequantize_into, GgmlType};
use crate::Tensor;

/// A `[rows, cols]` matrix stored row by row in GGML blocks of 32.
#[derive(Clone)]
pub struct QuantMatrix {
    ggml_type: GgmlType,
    rows: usize,
    cols: usize,
    data: Arc<Vec<u8>>,
}

impl std::fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QuantMatrix({} [{}, {}])",
            self.ggml_type, self.rows, self.cols
        )
    }
}

impl QuantMatrix {
    /// Types multiplied in their blocks: those with blocks of 32 (the float types widen at
    /// load instead).
    pub fn supports(t: GgmlType) -> bool {
        matches!(t.block(), Some((32, _)))
    }

    /// A `[rows, cols]` matrix from its blocks, row-major.
    pub fn new(
        ggml_type: GgmlType,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<QuantMatrix> {
        let op = "QuantMatrix::new";
        let Some((32, bytes)) = ggml_type.block() else {
            return Err(invalid(op, format!("{ggml_type} has no 32-element blocks")));
        };
        if !cols.is_multiple_of(32) || data.len() != rows * cols / 32 * bytes {
            return Err(invalid(
                op,
                format!(
                    "{} bytes of {ggml_type} do not hold [{rows}, {cols}] in whole blocks",
                    data.len()
                ),
            ));
        }
        Ok(QuantMatrix {
            ggml_type,
            rows,
            cols,
            data: Arc::new(data),
        })
    }

    /// Rows (outputs).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (inputs).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Its storage type.
    pub fn ggml_type(&self) -> GgmlType {
        self.ggml_type
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    fn row_bytes(&self) -> usize {
        self.cols / 32 * self.ggml_type.block().expect("checked at construction").1
    }

    /// The matrix with its rows reordered: row i of the result is row `order[i]` of this one.
    pub fn permute_rows(&self, order: &[usize]) -> Result<QuantMatrix> {
        let rb = self.row_bytes();
        if order.len() != self.rows || order.iter().any(|&r| r >= self.rows) {
            return Err(invalid(
                "QuantMatrix::permute_rows",
                "not an order of the rows",
            ));
        }
        let mut data = Vec::with_capacity(self.data.len());
        for &r in order {
            data.extend_from_slice(&self.data[r * rb..(r + 1) * rb]);
        }
        QuantMatrix::new(self.ggml_type, self.rows, self.cols, data)
    }

    /// Every element, widened to f32 (`[rows, cols]`).
    pub fn dequantize(&self) -> Result<Tensor> {
        let mut out = vec![0.0; self.rows * self.cols];
        dequantize_into(self.ggml_type, &self.data, &mut out)
            .map_err(|e| invalid("QuantMatrix::dequantize", e))?;
        Tensor::from_f32(out, &[self.rows, self.cols])
    }

    /// `x · Wᵀ` for `x` `[…, cols]`: `[…, rows]`, without gradient (for inference).
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        let shape = x.shape();
        if shape.last() != Some(&self.cols) {
            return Err(crate::Error::ShapeMismatch {
                op: "QuantMatrix::matmul_t",
                lhs: shape.to_vec(),
                rhs: vec![self.rows, self.cols],
            });
        }
        let m = x.numel() / self.cols;
        let xs = x.to_vec_f32();
        let out_t = self.product_t(&xs, m);
        // out_t is [rows, m]; the result is [m, rows].
        let mut out = vec![0.0f32; m * self.rows];
        for (n, col) in out_t.chunks_exact(m.max(1)).enumerate() {
            for (i, &v) in col.iter().enumerate() {
                out[i * self.rows + n] = v;
            }
        }
        let mut out_shape = shape.to_vec();
        *out_shape.last_mut().expect("rank ≥ 1") = self.rows;
        Tensor::from_f32(out, &out_shape)
    }

    /// `(x · Wᵀ)ᵀ`, `[rows, m]`, for `x` `[m, cols]`: rows of W in parallel tasks, each block
    /// widened once into registers and multiplied with all m rows of x.
    fn product_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (t, cols) = (self.ggml_type, self.cols);
        let (_, bb) = t.block().expect("checked at construction");
        let rb = self.row_bytes();
        let mut out = vec![0.0f32; self.rows * m];
        // About 64 KB of weights per task.
        let rows_per_task = (65536 / rb.max(1)).clamp(1, 256);
        out.par_chunks_mut(rows_per_task * m.max(1))
            .zip(self.data.par_chunks(rows_per_task * rb))
            .for_each(|(o, w)| rows_times_x(t, w, o, x, m.max(1), cols, rb, bb));
        out
    }
}

/// `o[r·m + i] = Σ_k W[r, k]·x[i, k]` for the rows `w` of W: with AVX2, FMA and F16C intrinsics
/// where the CPU has them (each block widened into four 8-lane registers, one fused
/// multiply-add per register and input row into four independent accumulators, lanes summed
/// once per row), else portably.
#[allow(clippy::too_many_arguments)]
fn rows_times_x(
    t: GgmlType,
    w: &[u8],
    o: &mut [f32],
    x: &[f32],
    m: usize,
    cols: usize,
    rb: usize,
    bb: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the features were detected above; the slices' lengths are whole rows.
            return unsafe { x86::rows_times_x(t, w, o, x, m, cols, rb, bb) };
        }
    }
    rows_times_x_any(t, w, o, x, m, cols, rb, bb)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::gguf::{dequantize_block, GgmlType};
    use std::arch::x86_64::*;

    /// Eight bytes as eight f32 lanes, unsigned.
    #[inline(always)]
    unsafe fn u8x8(v: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
    }

    /// The 32 weights of one block in four registers (elements 0–7, 8–15, 16–23, 24–31).
    #[inline(always)]
    unsafe fn block(t: GgmlType, b: &[u8]) -> [__m256; 4] {
        let p = b.as_ptr();
        // The hardware conversion (F16C), exact like the software one.
        let scale = |i: usize| {
            let h = u16::from_le_bytes([b[i], b[i + 1]]) as i32;
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)))
        };
        match t {
            GgmlType::Q8_0 => {
                let d = _mm256_set1_ps(scale(0));
                let q = |k: usize| {
                    let v = _mm_loadl_epi64(p.add(2 + 8 * k) as *const __m128i);
                    _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), d)
                };
                [q(0), q(1), q(2), q(3)]
            }
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let (d, m, at) = if t == GgmlType::Q4_1 {
                    (scale(0), scale(2), 4)
                } else {
                    (scale(0), -8.0 * scale(0), 2)
                };
                let (d, m) = (_mm256_set1_ps(d), _mm256_set1_ps(m));
                // Low nibbles are elements 0–15, high nibbles 16–31.
                let qs = _mm_loadu_si128(p.add(at) as *const __m128i);
                let mask = _mm_set1_epi8(0x0f);
                let lo = _mm_and_si128(qs, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
                let w = |v: __m128i| _mm256_fmadd_ps(u8x8(v), d, m);
                [
                    w(lo),
                    w(_mm_srli_si128(lo, 8)),
                    w(hi),
                    w(_mm_srli_si128(hi, 8)),
                ]
            }
            _ => {
                let mut f = [0.0f32; 32];
                dequantize_block(t, b, &mut f);
                let q = |k: usize| _mm256_loadu_ps(f.as_ptr().add(8 * k));
                [q(0), q(1), q(2), q(3)]
            }
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA; `w` holds whole rows of `rb` bytes, `o` `m` outputs per
    /// row, `x` `m` rows of `cols`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn rows_times_x(
        t: GgmlType,
        w: &[u8],
        o: &mut [f32],
        x: &[f32],
        m: usize,
        cols: usize,
        rb: usize,
        bb: usize,
    ) {
        let fma4 = |w: &[__m256; 4], xp: *const f32, a: &mut [__m256; 4]| {
            for k in 0..4 {
                a[k] = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(xp.add(8 * k)), a[k]);
            }
        };
        let total = |a: &[__m256; 4]| {
            hsum(_mm256_add_ps(
                _mm256_add_ps(a[0], a[1]),
                _mm256_add_ps(a[2], a[3]),
            ))
        };
        let zero = [_mm256_setzero_ps(); 4];
        if m == 1 {
            // One input row: the accumulators stay in registers.
            for (o, row) in o.iter_mut().zip(w.chunks_exact(rb)) {
                let mut a = zero;
                for (j, b) in row.chunks_exact(bb).enumerate() {
                    fma4(&block(t, b), x.as_ptr().add(j * 32), &mut a);
                }
                *o = total(&a);
            }
            return;
        }
        let mut acc = vec![zero; m];
        for (o, row) in o.chunks_exact_mut(m).zip(w.chunks_exact(rb)) {
            acc.iter_mut().for_each(|a| *a = zero);
            for (j, b) in row.chunks_exact(bb).enumerate() {
                let wb = block(t, b);
                for (i, a) in acc.iter_mut().enumerate() {
                    fma4(&wb, x.as_ptr().add(i * cols + j * 32), a);
                }
            }
            for (o, a) in o.iter_mut().zip(&acc) {
                *o = total(a);
            }
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows_times_x_any(
    t: GgmlType,
    w: &[u8],
    o: &mut [f32],
    x: &[f32],
    m: usize,
    cols: usize,
    rb: usize,
    bb: usize,
) {
    let mut block = [0.0f32; 32];
    for (o, row) in o.chunks_exact_mut(m).zip(w.chunks_exact(rb)) {
        for (j, b) in row.chunks_exact(bb).enumerate() {
            dequantize_block(t, b, &mut block);
            for (i, acc) in o.iter_mut().enumerate() {
                let at = i * cols + j * 32;
                let xs: &[f32; 32] = x[at..at + 32].try_into().expect("32 elements");
                *acc += dot32(&block, xs);
            }
        }
    }
}

/// Σ a·b over 32 elements, as eight lanes (a vector register's worth) summed at the end.
#[inline(always)]
fn dot32(a: &[f32; 32], b: &[f32; 32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    for k in 0..4 {
        for l in 0..8 {
            lanes[l] += a[k * 8 + l] * b[k * 8 + l];
        }
    }
    let (lo, hi) = lanes.split_at(4);
    (lo[0] + hi[0]) + (lo[1] + hi[1]) + (lo[2] + hi[2]) + (lo[3] + hi[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(t: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let (_, bb) = t.block().unwrap();
        let mut rng = crate::Rng::new(seed);
        let mut data = Vec::new();
        for _ in 0..rows * cols / 32 {
            let mut b: Vec<u8> = (0..bb).map(|_| (rng.uniform() * 256.0) as u8).collect();
            // Finite, moderate scales (and minimums).
            let d = half::f16::from_f32(0.01 + rng.uniform() * 0.1).to_le_bytes();
            b[0..2].copy_from_slice(&d);
            if t == GgmlType::Q4_1 || t == GgmlType::Q5_1 {
                let m = half::f16::from_f32(rng.uniform() - 0.5).to_le_bytes();
                b[2..4].copy_from_slice(&m);
            }
            data.extend(b);
        }
        data
    }

    #[test]
    fn product_equals_the_f32_product_of_the_dequantised_matrix() {
        for t in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
        ] {
            let (rows, cols) = (37, 96);
            let q = QuantMatrix::new(t, rows, cols, blocks(t, rows, cols, 3)).unwrap();
            let w = q.dequantize().unwrap();
            for m in [1, 3, 16] {
                let x = crate::testing::randn(&[m, cols], 5);
                let got = q.matmul_t(&x).unwrap();
                let want = x.matmul(&w.transpose(0, 1).unwrap()).unwrap();
                assert_eq!(got.shape(), &[m, rows]);
                for (g, w) in got.to_vec_f32().iter().zip(want.to_vec_f32()) {
                    assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{t}: {g} vs {w}");
                }
            }
            // Rows reordered move whole rows of blocks.
            let order: Vec<usize> = (0..rows).rev().collect();
            let p = q
                .permute_rows(&order)
                .unwrap()
                .dequantize()
                .unwrap()
                .to_vec_f32();
            let w = w.to_vec_f32();
            assert_eq!(&p[..cols], &w[(rows - 1) * cols..]);
        }
        assert!(QuantMatrix::new(GgmlType::F32, 1, 32, vec![0; 128]).is_err());
        assert!(QuantMatrix::new(GgmlType::Q8_0, 2, 32, vec![0; 34]).is_err());
    }
}
