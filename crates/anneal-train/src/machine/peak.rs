//! The machine's f32 arithmetic peak, measured rather than computed from a nominal clock: one
//! thread runs independent fused multiply-adds (enough chains to hide the FMA latency) for a few
//! tens of milliseconds, best of three, and the peak of `n` threads is `n` times that. The nominal
//! formula (cores × `cpu MHz` × FLOP/cycle) undercounts on machines that boost above the clock
//! /proc/cpuinfo reports: on the project's benchmark machine it gives 166 GFLOP/s for two cores
//! where one core alone retires 107.
//!
//! The figure assumes each thread has a core of its own: with more threads than physical cores
//! (SMT siblings), or where one busy core boosts higher than all of them together, it overstates
//! the peak, and shares of it read low.
//!
//! All threads are also measured together, and that figure is reported beside the peak: on a
//! shared virtual machine it shows how much of the second core other tenants take at the moment
//! (measured here: 110 to 213 GFLOP/s for two threads within a minute, while one thread stayed at
//! 105–108), which is the noise every multi-threaded timing on such a machine carries.

use std::sync::Barrier;
use std::time::Instant;

/// The widest FMA loop this CPU runs, as (FLOP per iteration, loop).
#[cfg(target_arch = "x86_64")]
type FmaLoop = (f64, unsafe fn(u64) -> f32);

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// 12 independent 8-wide FMA chains per iteration.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma256(iters: u64) -> f32 {
        let mut acc = [_mm256_set1_ps(0.0); 12];
        let a = _mm256_set1_ps(0.999_999_9);
        let b = _mm256_set1_ps(1e-7);
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for x in acc {
            s = _mm256_add_ps(s, x);
        }
        let mut out = [0.0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), s);
        out.iter().sum()
    }

    /// 24 independent 16-wide FMA chains per iteration.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma512(iters: u64) -> f32 {
        let mut acc = [_mm512_set1_ps(0.0); 24];
        let a = _mm512_set1_ps(0.999_999_9);
        let b = _mm512_set1_ps(1e-7);
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
    }
}

#[cfg(target_arch = "x86_64")]
fn loops() -> Vec<(&'static str, FmaLoop)> {
    let mut out: Vec<(&'static str, FmaLoop)> = Vec::new();
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        out.push(("AVX2 FMA", (12.0 * 8.0 * 2.0, x86::fma256)));
    }
    if is_x86_feature_detected!("avx512f") {
        out.push(("AVX-512 FMA", (24.0 * 16.0 * 2.0, x86::fma512)));
    }
    out
}

/// GFLOP/s of `threads` threads running `f` together for about `secs`, best of three.
#[cfg(target_arch = "x86_64")]
fn run(threads: usize, (flop_per_iter, f): FmaLoop, secs: f64) -> f64 {
    // Calibrate the iteration count on one thread.
    let probe = 1u64 << 16;
    let t = Instant::now();
    std::hint::black_box(unsafe { f(probe) });
    let per_iter = t.elapsed().as_secs_f64().max(1e-9) / probe as f64;
    let iters = ((secs / per_iter) as u64).max(probe);
    (0..3)
        .map(|_| {
            let barrier = Barrier::new(threads);
            let slowest = std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads)
                    .map(|_| {
                        s.spawn(|| {
                            barrier.wait();
                            let t = Instant::now();
                            std::hint::black_box(unsafe { f(iters) });
                            t.elapsed().as_secs_f64()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or(f64::INFINITY))
                    .fold(0.0, f64::max)
            });
            threads as f64 * iters as f64 * flop_per_iter / slowest / 1e9
        })
        .fold(0.0, f64::max)
}

/// The measured f32 peak of `threads` threads in GFLOP/s (`threads` × one thread's rate) and how
/// it was measured, including what the threads reach together now; `None` on a CPU without a
/// vector FMA loop here (then a nominal figure has to do). Takes about 0.2 s per instruction set.
pub fn measured_f32_peak(threads: usize) -> Option<(f64, String)> {
    #[cfg(target_arch = "x86_64")]
    {
        let threads = threads.max(1);
        let (one, name, l) = loops()
            .into_iter()
            .map(|(name, l)| (run(1, l, 0.03), name, l))
            .max_by(|a, b| a.0.total_cmp(&b.0))?;
        let peak = one * threads as f64;
        let mut how = format!("{threads} × {one:.0} measured on one thread with {name}s");
        if threads > 1 {
            how += &format!(
                "; {threads} threads together reach {:.0} now",
                run(threads, l, 0.03)
            );
        }
        Some((peak, how))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = threads;
        None
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_measured_peak_is_positive_and_finite_where_there_is_one() {
        if let Some((g, how)) = super::measured_f32_peak(1) {
            assert!(g.is_finite() && g > 0.1, "{g} from {how}");
        }
    }
}
