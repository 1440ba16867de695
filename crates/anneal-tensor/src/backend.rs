//! Which kernels run an op: one selection, made from the device a tensor's storage lives on and
//! what the CPU can do, so that models never name a kernel and a new backend (a GPU's) adds a
//! variant here and its kernels behind the same ops.
//!
//! Today the choice that matters is the one for 16-bit matrix products. On a CPU with AVX512-BF16
//! a product whose operands are bf16 runs on `vdpbf16ps` (pairs of bf16 products summed into f32
//! accumulators, [`crate::ops::gemm_bf16`]); elsewhere its operands are widened to f32 and the f32
//! product runs. The selection is detected once and can be forced, for a process with the
//! `ANNEAL_KERNELS` environment variable (`auto`, `avx512-bf16` or `widening`) and for the calling
//! thread with [`with_kernel_path`] (tests run both paths in one process this way).

use std::cell::Cell;
use std::sync::OnceLock;

use crate::{DType, Device};

/// How matrix products with bf16 operands run on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelPath {
    /// bf16 operands (and f32 ones rounded to bf16 as they are packed) multiplied by
    /// `vdpbf16ps` with f32 accumulation: twice the multiply-adds per instruction of f32 FMA and
    /// no widened copy of either operand.
    Avx512Bf16,
    /// bf16 operands widened to f32, then the f32 product: what runs without AVX512-BF16.
    Widening,
}

impl KernelPath {
    /// The name `ANNEAL_KERNELS` takes and reports print.
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Avx512Bf16 => "avx512-bf16",
            KernelPath::Widening => "widening",
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

/// The process-wide path: `ANNEAL_KERNELS` if set, else the best the CPU has. A request for
/// AVX512-BF16 on a CPU without it falls back to widening (and says so once on stderr), never
/// to an instruction the CPU lacks.
fn process_path() -> KernelPath {
    static PATH: OnceLock<KernelPath> = OnceLock::new();
    *PATH.get_or_init(|| {
        let detected = if has_avx512_bf16() {
            KernelPath::Avx512Bf16
        } else {
            KernelPath::Widening
        };
        match std::env::var("ANNEAL_KERNELS").as_deref() {
            Err(_) | Ok("") | Ok("auto") => detected,
            Ok("widening") => KernelPath::Widening,
            Ok("avx512-bf16") => {
                if detected != KernelPath::Avx512Bf16 {
                    eprintln!(
                        "ANNEAL_KERNELS=avx512-bf16: this CPU lacks AVX512-BF16; using widening"
                    );
                }
                detected
            }
            Ok(other) => {
                eprintln!(
                    "ANNEAL_KERNELS={other:?} is not one of auto, avx512-bf16, widening; using {}",
                    detected.name()
                );
                detected
            }
        }
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
/// an op is issued, so the op's worker threads follow it). Asking for AVX512-BF16 where the CPU
/// lacks it gives widening.
pub fn with_kernel_path<R>(path: KernelPath, f: impl FnOnce() -> R) -> R {
    let path = if path == KernelPath::Avx512Bf16 && !has_avx512_bf16() {
        KernelPath::Widening
    } else {
        path
    };
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

/// The kernels of one matrix product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProductKernel {
    /// f32 operands (half types widened) on the `gemm` crate.
    F32,
    /// bf16 pairs on `vdpbf16ps`; f32 operands are rounded to bf16 as they are packed.
    Bf16,
}

/// The kernel for a product of operands of these dtypes on `device`: bf16 arithmetic when either
/// operand is bf16, neither is f16 (whose extra mantissa bits bf16 would drop) and the path
/// allows it; f32 otherwise.
pub(crate) fn product_kernel(device: Device, a: DType, b: DType) -> ProductKernel {
    match device {
        Device::Cpu => {
            let bf16 = (a == DType::BF16 || b == DType::BF16) && a != DType::F16 && b != DType::F16;
            if bf16 && kernel_path() == KernelPath::Avx512Bf16 {
                ProductKernel::Bf16
            } else {
                ProductKernel::F32
            }
        }
    }
}
