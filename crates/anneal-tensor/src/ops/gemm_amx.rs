//! bf16 matrix products on AMX tiles: `C (+)= A·B` with A and B read as bf16 and C in f32.
//!
//! An AMX tile register holds up to 16 rows of 64 bytes. `tdpbf16ps c, a, b` multiplies a 16 × 32
//! bf16 tile of A by a tile of B holding 16 pairs of k for 16 columns (each row a column's pair of
//! k side by side in a 32-bit word, the layout [`super::gemm_bf16`] packs B into) and adds the
//! 16 × 16 result to an f32 tile: 8,192 multiply-adds per instruction, against 16 for an f32 FMA
//! and 32 for `vdpbf16ps`. The kernel keeps a 32 × 32 block of C in four tiles and, per 32 values
//! of k, loads two tiles of A and two of B and issues four products. bf16 inputs that are
//! denormal read as zero, sums round to nearest even and denormal results are flushed (Intel's
//! description of the instruction); the summation order inside an instruction is the hardware's,
//! so tests compare against the exact product of the rounded operands within a tolerance.
//!
//! A is packed a strip of 32 rows at a time, tile by tile (rounded to bf16 as it is packed, zero
//! padded to a multiple of 32 in k), and kept in L1 while the panels of B (32 columns in pairs of
//! k, packed once per block of k) stream past it from L2: measured on a Sapphire Rapids core,
//! this order and the tile-contiguous A run the kernel 1.3x faster than A strips in L2 read at
//! their row stride. Linux hands a process
//! the tile registers only after it asks (`arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`);
//! [`available`] asks once and the path is never chosen if the answer is no. The instructions are
//! written in inline assembly, as the AMX intrinsics are not yet stable in Rust.

use super::gemm_bf16::{on_tile, pack_b, Bf16Source, NR};
use super::matmul::Mat;

/// Rows of C a strip covers (two tiles of 16).
pub(crate) const TM: usize = 32;
/// k per tile product.
const TK: usize = 32;
/// k per packed block (a multiple of [`TK`]): a packed A strip of 32 × 256 bf16 (16 KiB) stays in
/// L1 while the B panels stream past it from L2.
const KC: usize = 256;
/// Columns of B packed at once (a multiple of [`NR`]): 256 × 1024 bf16 = 512 KiB, in L2.
const NC: usize = 1024;

/// Whether this process can run AMX bf16 tile products: the CPU has AMX-TILE, AMX-BF16 and the
/// AVX-512 F the packing runs on, and the kernel granted the tile data state. Asked once.
pub(crate) fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
            let cpu = leaf7.edx & (1 << 22) != 0
                && leaf7.edx & (1 << 24) != 0
                && std::arch::is_x86_feature_detected!("avx512f");
            cpu && request_tile_state()
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

/// Asks Linux for the AMX tile data state for this process: `arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA)`; true when granted.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_state() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: a plain system call; it reads no memory of ours and the kernel preserves every
    // register but rax, rcx and r11.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    ret == 0
}

/// The tile configuration: palette 1, tiles 0–7 all 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

const CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64;
        c[48 + t] = 16;
        t += 1;
    }
    TileConfig(c)
};

/// Where packed element (row `r`, k `p`) of a strip sits: step `p / TK`, then the row, then
/// `p % TK`.
#[inline(always)]
fn packed_at(r: usize, p: usize) -> usize {
    (p / TK) * TM * TK + r * TK + p % TK
}

/// Packs rows `i0..i0+TM` and k `k0..k0+kc` of `a` tile by tile: for each 32 values of k, the
/// strip's 32 rows of 32 bf16 (64 bytes each), so that a step's two A tiles are 2 KiB read in
/// order. Zero past the matrix and past `kc` (up to `steps` × 32). A whole strip of a row-major
/// or transposed A goes through AVX-512, anything else (an edge strip, a k left over) element by
/// element.
///
/// # Safety
/// AVX-512 F present; `a` valid for its extents and strides; `out` holds `steps·TM·TK` values.
#[cfg(target_arch = "x86_64")]
unsafe fn pack_a<T: Bf16Source>(
    a: &Mat<T>,
    i0: usize,
    k0: usize,
    kc: usize,
    steps: usize,
    out: &mut [u16],
) {
    let rows = TM.min(a.rows.saturating_sub(i0));
    if rows < TM || !kc.is_multiple_of(TK) {
        out[..steps * TM * TK].fill(0);
    }
    let done = if rows == TM && (a.cs == 1 || a.rs == 1) {
        pack_a_avx512(a, i0, k0, kc, out)
    } else {
        0
    };
    pack_a_cols(a, i0, k0 + done, done, kc - done, rows, out);
}

/// k `k0..k0+len` of the strip's first `rows` rows into packed columns `p0..p0+len`, element by
/// element.
unsafe fn pack_a_cols<T: Bf16Source>(
    a: &Mat<T>,
    i0: usize,
    k0: usize,
    p0: usize,
    len: usize,
    rows: usize,
    out: &mut [u16],
) {
    for r in 0..rows {
        for p in 0..len {
            *out.get_unchecked_mut(packed_at(r, p0 + p)) = (*a
                .ptr
                .offset((i0 + r) as isize * a.rs + (k0 + p) as isize * a.cs))
            .bf16_bits();
        }
    }
}

/// [`pack_a`] of a whole strip on AVX-512: 16 values at a time along k for a row-major A; for a
/// transposed one, per step of 32 k, the 16 pairs of k of 16 rows as 16 vectors of words (two k
/// side by side) transposed in registers into 16 tile rows. Returns how many k it packed (all of
/// `kc` for a row-major A, the whole steps for a transposed one).
///
/// # Safety
/// AVX-512 F present; `a.cs == 1` or `a.rs == 1`; rows `i0..i0+TM` inside `a`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_a_avx512<T: Bf16Source>(
    a: &Mat<T>,
    i0: usize,
    k0: usize,
    kc: usize,
    out: &mut [u16],
) -> usize {
    use std::arch::x86_64::*;
    if a.cs == 1 {
        for r in 0..TM {
            let src = a.ptr.offset((i0 + r) as isize * a.rs + k0 as isize);
            let mut p = 0;
            while p + 16 <= kc {
                let v = _mm512_cvtepi32_epi16(T::load16(src.add(p)));
                _mm256_storeu_si256(out.as_mut_ptr().add(packed_at(r, p)) as *mut __m256i, v);
                p += 16;
            }
            for q in p..kc {
                out[packed_at(r, q)] = (*src.add(q)).bf16_bits();
            }
        }
        return kc;
    }
    let words = out.as_mut_ptr() as *mut i32;
    let whole = kc / TK;
    for t in 0..whole {
        for h in 0..TM / 16 {
            let mut v = [_mm512_setzero_si512(); 16];
            for (q, w) in v.iter_mut().enumerate() {
                let p = t * TK + 2 * q;
                let s0 = a
                    .ptr
                    .offset((k0 + p) as isize * a.cs + (i0 + 16 * h) as isize);
                let s1 = s0.offset(a.cs);
                *w = _mm512_or_si512(T::load16(s0), _mm512_slli_epi32::<16>(T::load16(s1)));
            }
            let rows = transpose16(v);
            for (r, row) in rows.iter().enumerate() {
                let at = packed_at(16 * h + r, t * TK) / 2;
                _mm512_storeu_si512(words.add(at) as *mut _, *row);
            }
        }
    }
    whole * TK
}

/// The 16 × 16 transpose of 32-bit words: lane `j` of row `i` goes to lane `i` of row `j`. Three
/// stages: 32-bit and 64-bit interleaves within 128-bit lanes, then a 4 × 4 transpose of the
/// 128-bit lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn transpose16(a: [std::arch::x86_64::__m512i; 16]) -> [std::arch::x86_64::__m512i; 16] {
    use std::arch::x86_64::*;
    let mut b = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        b[2 * i] = _mm512_unpacklo_epi32(a[2 * i], a[2 * i + 1]);
        b[2 * i + 1] = _mm512_unpackhi_epi32(a[2 * i], a[2 * i + 1]);
    }
    // c[4i + k], 128-bit lane L: row 4L + k, words of rows 4i .. 4i + 3 of `a`.
    let mut c = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        c[4 * i] = _mm512_unpacklo_epi64(b[4 * i], b[4 * i + 2]);
        c[4 * i + 1] = _mm512_unpackhi_epi64(b[4 * i], b[4 * i + 2]);
        c[4 * i + 2] = _mm512_unpacklo_epi64(b[4 * i + 1], b[4 * i + 3]);
        c[4 * i + 3] = _mm512_unpackhi_epi64(b[4 * i + 1], b[4 * i + 3]);
    }
    let mut out = [_mm512_setzero_si512(); 16];
    for k in 0..4 {
        let d0 = _mm512_shuffle_i32x4::<0x44>(c[k], c[4 + k]);
        let d1 = _mm512_shuffle_i32x4::<0xee>(c[k], c[4 + k]);
        let d2 = _mm512_shuffle_i32x4::<0x44>(c[8 + k], c[12 + k]);
        let d3 = _mm512_shuffle_i32x4::<0xee>(c[8 + k], c[12 + k]);
        out[k] = _mm512_shuffle_i32x4::<0x88>(d0, d2);
        out[4 + k] = _mm512_shuffle_i32x4::<0xdd>(d0, d2);
        out[8 + k] = _mm512_shuffle_i32x4::<0x88>(d1, d3);
        out[12 + k] = _mm512_shuffle_i32x4::<0xdd>(d1, d3);
    }
    out
}

/// A 32 × 32 block of C (row stride `ldc` bytes) `(=|+=)` a packed strip of A times a packed B
/// panel, over `steps` × 32 values of k. The strip is always packed: tiles loaded straight from a
/// row-major bf16 operand at its own row stride were tried and measured slower in training (the
/// strided rows miss the cache where the packed copy streams).
///
/// # Safety
/// AMX available and configured with [`CONFIG`] on this thread; the pointers cover the block.
#[cfg(target_arch = "x86_64")]
unsafe fn block(steps: usize, a: *const u16, b: *const u32, c: *mut f32, ldc: usize, load: bool) {
    use std::arch::asm;
    let c2 = (c as *mut u8).add(16 * ldc);
    if load {
        asm!(
            "tileloadd tmm0, [{c} + {s}*1]",
            "tileloadd tmm1, [{c} + {s}*1 + 64]",
            "tileloadd tmm2, [{c2} + {s}*1]",
            "tileloadd tmm3, [{c2} + {s}*1 + 64]",
            c = in(reg) c,
            c2 = in(reg) c2,
            s = in(reg) ldc,
            options(nostack, readonly)
        );
    } else {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
    }
    // A B step: 16 pairs of k for NR columns; an A step: 32 rows of 32 k, 64 bytes a row.
    const B_STEP: usize = TK / 2 * NR;
    const A_STEP: usize = TM * TK;
    let lda = TK * 2;
    for t in 0..steps {
        let at = a.add(t * A_STEP) as *const u8;
        let bt = b.add(t * B_STEP);
        asm!(
            "tileloadd tmm4, [{a} + {la}*1]",
            "tileloadd tmm5, [{a2} + {la}*1]",
            "tileloadd tmm6, [{b} + {lb}*1]",
            "tileloadd tmm7, [{b} + {lb}*1 + 64]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a = in(reg) at,
            a2 = in(reg) at.add(16 * lda),
            la = in(reg) lda,
            b = in(reg) bt,
            lb = in(reg) NR * 4,
            options(nostack, readonly)
        );
    }
    asm!(
        "tilestored [{c} + {s}*1], tmm0",
        "tilestored [{c} + {s}*1 + 64], tmm1",
        "tilestored [{c2} + {s}*1], tmm2",
        "tilestored [{c2} + {s}*1 + 64], tmm3",
        c = in(reg) c,
        c2 = in(reg) c2,
        s = in(reg) ldc,
        options(nostack)
    );
}

thread_local! {
    /// Packing buffers, kept per thread between products.
    static PACKED: std::cell::RefCell<(Vec<u16>, Vec<u32>)> = const {
        std::cell::RefCell::new((Vec::new(), Vec::new()))
    };
}

/// `dst (+)= a·b` on this thread, on AMX tiles.
///
/// # Safety
/// [`available`]; pointers valid for the extents and strides; `dst` aliases neither operand.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn product_1<T: Bf16Source, TB: Bf16Source>(
    dst: *mut f32,
    drs: isize,
    dcs: isize,
    accumulate: bool,
    a: &Mat<T>,
    b: &Mat<TB>,
) {
    use std::arch::asm;
    let (m, n, k) = (a.rows, b.cols, a.cols);
    asm!("ldtilecfg [{c}]", c = in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
    PACKED.with(|bufs| {
        let mut bufs = bufs.borrow_mut();
        let (pa, pb) = &mut *bufs;
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            let panels = nc.div_ceil(NR);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                let steps = kc.div_ceil(TK);
                let kp = steps * TK / 2;
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
                pa.resize(steps * TM * TK, 0);
                // Each strip of A packed once and kept in L1 while every panel of B passes.
                for i0 in (0..m).step_by(TM) {
                    pack_a(a, i0, pc, kc, steps, pa);
                    for q in 0..panels {
                        let j0 = jc + q * NR;
                        let bq = pb.as_ptr().add(q * kp * NR);
                        on_tile::<TM>(
                            dst.offset(i0 as isize * drs + j0 as isize * dcs),
                            drs,
                            dcs,
                            (TM.min(m - i0), NR.min(n - j0)),
                            load,
                            |c, ldc| block(steps, pa.as_ptr(), bq, c, ldc * 4, load),
                        );
                    }
                }
            }
        }
    });
    asm!("tilerelease", options(nostack, nomem));
}
