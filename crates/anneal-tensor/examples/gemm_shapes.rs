//! Times the matrix products of one GPT block's forward and backward, as `gemm` sees them, to
//! compare layouts and threading:
//!
//!     cargo run --release -p anneal-tensor --example gemm_shapes -- [threads] [f32|bf16]
//!
//! With `bf16` the operands are stored in bf16 and the products take the kernel path chosen at
//! run time (`ANNEAL_KERNELS=widening` forces the fallback).

use anneal_tensor::testing::{median_seconds, randn};
use anneal_tensor::{DType, Tensor};

fn bench(label: &str, a: &Tensor, b: &Tensor) {
    let (m, k, n) = (a.shape()[0], a.shape()[1], b.shape()[1]);
    let s = median_seconds(0, 9, || drop(a.matmul(b).unwrap()));
    println!(
        "{label:<40} {m:>5}x{k:>5}x{n:>5} {:>7.2} ms {:>6.1} GFLOP/s",
        s * 1e3,
        2.0 * (m * k * n) as f64 / s / 1e9
    );
}

fn main() {
    let threads = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2);
    let dtype = match std::env::args().nth(2).as_deref() {
        Some("bf16") => DType::BF16,
        _ => DType::F32,
    };
    anneal_tensor::set_num_threads(threads).unwrap();
    println!("{dtype:?}: {}", anneal_tensor::kernel_path());
    for (k, n) in [(256usize, 768usize), (256, 256), (256, 1024), (1024, 256)] {
        let x = randn(&[2048, k], 1).to_dtype(dtype);
        let w = randn(&[k, n], 2).to_dtype(dtype);
        let dy = randn(&[2048, n], 3).to_dtype(dtype);
        bench(&format!("forward x·W ({k}->{n})"), &x, &w);
        bench("grad input dY·Wᵀ (view)", &dy, &w.transpose(0, 1).unwrap());
        bench(
            "grad input dY·Wᵀ (copied)",
            &dy,
            &w.transpose(0, 1).unwrap().contiguous(),
        );
        bench("grad weight Xᵀ·dY (view)", &x.transpose(0, 1).unwrap(), &dy);
        bench(
            "grad weight Xᵀ·dY (copied)",
            &x.transpose(0, 1).unwrap().contiguous(),
            &dy,
        );
    }
}
