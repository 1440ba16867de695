//! Which kernels run an op: one selection, made from the device a tensor's storage lives on and
//! what the CPU can do, so that models never name a kernel and a new backend (a GPU's) adds a
//! variant here and its kernels behind the same ops.
//!
//! Today the choice that matters is the one for 16-bit matrix products. A product whose operands
//! are bf16 runs, best first, on AMX tiles (`tdpbf16ps`, [`crate::ops::gemm_amx`]) where the CPU
//! and the operating system allow them; on `vdpbf16ps` (pairs of bf16 products summed into f32
//! accumulators, [`crate::ops::gemm_bf16`]) where the CPU has AVX512-BF16 and a short timing at
//! start shows it beating f32 FMA; elsewhere its operands are widened to f32 and the f32 product
//! runs. The selection is made once and can be forced, for a process with the `ANNEAL_KERNELS`
//! environment variable (`auto`, `amx`, `avx512-bf16` or `widening`) and for the calling thread
//! with [`with_kernel_path`] (tests run every path the CPU has in one process this way). A path
//! the CPU lacks is never run: asking for one gives the best path below it.

use std::cell::Cell;
use std::sync::OnceLock;

use crate::{DType, Device};

/// How matrix products with bf16 operands run on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelPath {
    /// bf16 operands (and f32 ones rounded to bf16 as they are packed) multiplied on AMX tiles,
    /// 16 × 16 × 32 multiply-adds per instruction into f32 tiles.
    Amx,
    /// bf16 operands (and f32 ones rounded to bf16 as they are packed) multiplied by
    /// `vdpbf16ps` with f32 accumulation: twice the multiply-adds per instruction of f32 FMA and
    /// no widened copy of either operand.
    Avx512Bf16,
    /// bf16 operands widened to f32, then the f32 product: what runs without the above.
    Widening,
}

impl KernelPath {
    /// The name `ANNEAL_KERNELS` takes and reports print.
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Amx => "amx",
            KernelPath::Avx512Bf16 => "avx512-bf16",
            KernelPath::Widening => "widening",
        }
    }

    /// Whether this CPU (and, for AMX, the operating system) can run the path.
    pub fn available(self) -> bool {
        match self {
            KernelPath::Amx => has_amx_bf16(),
            KernelPath::Avx512Bf16 => has_avx512_bf16(),
            KernelPath::Widening => true,
        }
    }

    /// This path if the CPU can run it, else the best one below it that it can.
    fn or_below(self) -> KernelPath {
        match self {
            KernelPath::Amx if !has_amx_bf16() => KernelPath::Avx512Bf16.or_below(),
            KernelPath::Avx512Bf16 if !has_avx512_bf16() => KernelPath::Widening,
            p => p,
        }
    }
}

/// Whether this CPU has the AVX-512 BF16 dot-product instruction (and AVX-512 F under it).
pub fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this process can run AMX bf16 tile products (the CPU has AMX-TILE and AMX-BF16 and
/// the operating system granted the tile state).
pub fn has_amx_bf16() -> bool {
    crate::ops::gemm_amx::available()
}

/// `vdpbf16ps`'s multiply-add rate over f32 FMA's on this CPU, timed once (None without
/// AVX512-BF16).
pub fn pairs_over_fma_rate() -> Option<f64> {
    static RATE: OnceLock<Option<f64>> = OnceLock::new();
    *RATE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if has_avx512_bf16() && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            let r = (0..3)
                .map(|_| unsafe { crate::ops::gemm_bf16::pairs_over_fma_rate() })
                .fold(0f64, f64::max);
            return Some(r);
        }
        None
    })
}

/// The best path for this CPU: AMX, else `vdpbf16ps` where it outruns f32 FMA by a margin, else
/// widening.
fn detected_path() -> KernelPath {
    if has_amx_bf16() {
        KernelPath::Amx
    } else if pairs_over_fma_rate().is_some_and(|r| r > 1.2) {
        KernelPath::Avx512Bf16
    } else {
        KernelPath::Widening
    }
}

/// The process-wide path: `ANNEAL_KERNELS` if set, else the best the CPU has. A request for a
/// path the CPU lacks falls back to the best one below it (and says so once on stderr), never
/// to an instruction the CPU lacks.
fn process_path() -> KernelPath {
    static PATH: OnceLock<KernelPath> = OnceLock::new();
    *PATH.get_or_init(|| {
        let asked = match std::env::var("ANNEAL_KERNELS").as_deref() {
            Err(_) | Ok("") | Ok("auto") => return detected_path(),
            Ok("widening") => KernelPath::Widening,
            Ok("avx512-bf16") => KernelPath::Avx512Bf16,
            Ok("amx") => KernelPath::Amx,
            Ok(other) => {
                let best = detected_path();
                eprintln!(
                    "ANNEAL_KERNELS={other:?} is not one of auto, amx, avx512-bf16, widening; \
                     using {}",
                    best.name()
                );
                return best;
            }
        };
        let got = asked.or_below();
        if got != asked {
            eprintln!(
                "ANNEAL_KERNELS={}: this CPU cannot run it; using {}",
                asked.name(),
                got.name()
            );
        }
        got
    })
}

thread_local! {
    static FORCED: Cell<Option<KernelPath>> = const { Cell::new(None) };
}

/// The path products with bf16 operands take on this thread now.
pub fn kernel_path() -> KernelPath {
    FORCED.with(Cell::get).unwrap_or_else(process_path)
}

/// Runs `f` with bf16 products on `path` for ops issued from this thread (the choice is made where
/// an op is issued, so the op's worker threads follow it). Asking for a path the CPU lacks gives
/// the best one below it.
pub fn with_kernel_path<R>(path: KernelPath, f: impl FnOnce() -> R) -> R {
    let path = path.or_below();
    let before = FORCED.with(|c| c.replace(Some(path)));
    struct Restore(Option<KernelPath>);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(before);
    f()
}

/// The instruction a bf16 product runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unit {
    /// `vdpbf16ps` on AVX-512 registers.
    Pairs,
    /// `tdpbf16ps` on AMX tiles.
    Tiles,
}

/// The kernels of one matrix product, chosen where the op is issued and carried to the threads
/// that run it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProductKernel {
    /// f32 operands (half types widened) on the `gemm` crate.
    F32,
    /// bf16 on `unit`; f32 operands are rounded to bf16 as they are packed.
    Bf16(Unit),
}

/// The kernel for a product of operands of these dtypes on `device`: bf16 arithmetic when either
/// operand is bf16, neither is f16 (whose extra mantissa bits bf16 would drop) and the path
/// allows it; f32 otherwise.
pub(crate) fn product_kernel(device: Device, a: DType, b: DType) -> ProductKernel {
    match device {
        Device::Cpu => {
            let bf16 = (a == DType::BF16 || b == DType::BF16) && a != DType::F16 && b != DType::F16;
            match kernel_path() {
                KernelPath::Amx if bf16 => ProductKernel::Bf16(Unit::Tiles),
                KernelPath::Avx512Bf16 if bf16 => ProductKernel::Bf16(Unit::Pairs),
                _ => ProductKernel::F32,
            }
        }
    }
}
