//! # anneal-tensor
//!
//! The engine under anneal: n-dimensional tensors stored as f32, bf16 or f16, CPU kernels, and
//! reverse-mode autograd on a graph of coarse, fused ops.
//!
//! * [`Tensor`]: shape and strides over shared storage; views (`reshape`, `transpose`, `narrow`,
//!   `permute`) copy nothing.
//! * Ops, each with its backward beside it in [`ops`]: matmul and linear on the `gemm` crate,
//!   broadcasting arithmetic, reductions, layout ops, embedding, LayerNorm, RMSNorm, GELU, SiLU,
//!   softmax, fused cross-entropy, fused attention (causal, padding mask, grouped KV heads, RoPE)
//!   whose backward recomputes probabilities, dropout, conv2d and pooling, dtype casts.
//! * [`autograd`]: `backward` from a loss or from a supplied gradient, `no_grad`, `detach`, leaf
//!   gradient hooks, custom ops through [`Tensor::from_op`], and activation [`checkpoint`]ing.
//! * [`params`] and [`optim`]: named parameters flat per dtype, with a gradient buffer (and
//!   optimizer state) for the trainable ones only and parameter groups; the [`Optimizer`] trait
//!   with AdamW and SGD taking the learning rate per step; gradient clipping. Reductions split
//!   across threads add fixed-size chunks in order, so results do not depend on the thread
//!   count.
//!
//! ```
//! use anneal_tensor::{DType, Tensor};
//! let w = Tensor::from_f32(vec![1.0, 2.0, 3.0, 4.0], &[2, 2]).unwrap().requires_grad_();
//! let x = Tensor::from_f32(vec![1.0, 1.0], &[1, 2]).unwrap();
//! let loss = x.matmul(&w).unwrap().sum_all().unwrap();
//! loss.backward().unwrap();
//! assert_eq!(w.grad().unwrap().to_vec_f32(), vec![1.0, 1.0, 1.0, 1.0]);
//! # let _ = DType::F32;
//! ```

pub mod autocast;
pub mod autograd;
pub mod backend;
mod dtype;
mod error;
pub mod gguf;
pub mod init;
pub mod io;
mod kernels;
pub mod loss_scale;
pub mod ops;
pub mod optim;
pub mod params;
pub mod pool;
pub mod quant;
pub mod quant8;
pub mod storage;
mod tensor;
pub mod testing;

/// The CPU kernel path detected at run time, for reports: element-wise loops compiled for AVX2
/// and FMA or portable code, whether the CPU has AVX-512 (the `gemm` crate's f32 matrix
/// products pick their widest vectors themselves), and how bf16 products run
/// ([`backend::KernelPath`]: on AMX tiles, on `vdpbf16ps` or widened to f32).
pub fn kernel_path() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let elementwise = if kernels::has_avx2_fma() {
            "avx2+fma"
        } else {
            "portable"
        };
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        format!(
            "element-wise {elementwise}, f32 matmul gemm ({}), bf16 matmul {}",
            if avx512 {
                "avx512f present"
            } else {
                "no avx512"
            },
            backend::kernel_path().name()
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        format!(
            "element-wise portable, f32 matmul gemm, bf16 matmul {}",
            backend::kernel_path().name()
        )
    }
}

pub use autograd::{checkpoint, enable_grad, is_grad_enabled, no_grad, Backward};
pub use dtype::DType;
pub use error::{Error, Result};
pub use init::Rng;
pub use ops::attention::AttentionOptions;
pub use ops::dropout::DropoutKey;
pub use ops::moe::{expert_capacity, Routing};
pub use ops::softmax::CrossEntropyOptions;
pub use optim::Optimizer;
pub use params::{GradBucket, ParamGroup, ParamId, ParamStore, ParamStoreBuilder};
pub use storage::{memory_stats, reset_peak_memory, GradientBytes, MemoryStats};
pub use tensor::Tensor;

/// Where a tensor's storage lives. Only the CPU exists today; a CUDA backend adds a variant and
/// its kernels behind the same ops, without touching model code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// Host memory, kernels on rayon threads.
    Cpu,
}

/// Runs `f` on a pool of `threads` kernel threads, with the calling code itself on one of them.
///
/// Prefer this to [`set_num_threads`] for a training loop: ops issued from a pool thread take part
/// in their own parallel loops, whereas ops issued from an outside thread hand each loop to the
/// pool and sleep until it finishes, a wake-up per op (measured: about 600 context switches per
/// GPT step, and steps 20–40% slower on a busy host).
pub fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> Result<R> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::Invalid {
            op: "with_threads",
            reason: e.to_string(),
        })?;
    Ok(pool.install(f))
}

/// Sets the number of threads kernels use (call once, before any op). Returns an error if the
/// global pool was already built.
pub fn set_num_threads(n: usize) -> Result<()> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| Error::Invalid {
            op: "set_num_threads",
            reason: e.to_string(),
        })
}
