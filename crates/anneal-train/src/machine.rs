//! What the machine can do and what this process used.

/// Peak resident set size of this process, from the kernel's high-water mark.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// The f32 peak of `threads` cores: cores × clock × FLOPs per cycle, where a core with AVX2 and
/// FMA retires two 8-wide fused multiply-adds per cycle (32 FLOP/cycle; AMD Zen 4 runs AVX-512 on
/// the same two 256-bit pipes, so the figure holds there too). The clock is `cpu MHz` from
/// /proc/cpuinfo.
pub fn peak_gflops(threads: usize) -> (f64, String) {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mhz = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse::<f64>().ok());
    let flags = info.lines().find(|l| l.starts_with("flags")).unwrap_or("");
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let per_cycle = if has("avx2") && has("fma") { 32.0 } else { 8.0 };
    match mhz {
        Some(mhz) => (
            threads as f64 * mhz / 1000.0 * per_cycle,
            format!(
                "{threads} cores × {:.3} GHz × {per_cycle} FLOP/cycle",
                mhz / 1000.0
            ),
        ),
        None => (
            f64::NAN,
            "unknown (no cpu MHz in /proc/cpuinfo; pass --peak-gflops)".into(),
        ),
    }
}
