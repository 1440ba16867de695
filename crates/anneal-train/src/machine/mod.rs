//! What the machine can do and what this process used.

pub mod peak;

/// Peak resident set size of this process, from the kernel's high-water mark.
pub fn peak_rss_mb() -> f64 {
    status_mb("VmHWM:")
}

/// Resident set size of this process now.
pub fn rss_mb() -> f64 {
    status_mb("VmRSS:")
}

/// A kB field of `/proc/self/status` in MB (NaN where there is none).
fn status_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// The f32 peak of `threads` cores in GFLOP/s, and how it was found: measured by
/// [`peak::measured_f32_peak`] where the CPU has a vector FMA loop there (the
/// nominal figure is named beside it), otherwise nominal. Measured once per process per thread
/// count.
pub fn peak_gflops(threads: usize) -> (f64, String) {
    static CACHE: std::sync::Mutex<Vec<(usize, f64, String)>> = std::sync::Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, g, how)) = cache.iter().find(|c| c.0 == threads) {
        return (*g, how.clone());
    }
    let (nominal, nominal_how) = nominal_peak_gflops(threads);
    let found = match peak::measured_f32_peak(threads) {
        Some((g, how)) if nominal.is_finite() => {
            (g, format!("{how}; nominal {nominal:.0} = {nominal_how}"))
        }
        Some(found) => found,
        None => (nominal, nominal_how),
    };
    cache.push((threads, found.0, found.1.clone()));
    found
}

/// The nominal f32 peak of `threads` cores: cores × clock × FLOPs per cycle, where a core with
/// AVX2 and FMA retires two 8-wide fused multiply-adds per cycle (32 FLOP/cycle). The clock is
/// `cpu MHz` from /proc/cpuinfo, which is below the clock a core boosts to.
pub fn nominal_peak_gflops(threads: usize) -> (f64, String) {
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

/// The most threads a `threads` setting may ask for: beyond this, creating the pool alone takes
/// seconds, and no machine anneal runs on has as many cores.
pub const MAX_THREADS: usize = 1024;

/// The thread count a `threads` setting means: 0 is every core.
pub fn threads(setting: usize) -> usize {
    match setting {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}
