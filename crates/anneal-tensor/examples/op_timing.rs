//! Times the forward and backward of each op on the shapes of the reference GPT workload
//! (B=8, T=256, d=256, 4 heads), median of several runs:
//!
//!     cargo run --release -p anneal-tensor --example op_timing -- [threads] [name filter]

use anneal_tensor::testing::{median_seconds, randn};
use anneal_tensor::{AttentionOptions, Result, Tensor};

fn time(label: &str, reps: usize, mut f: impl FnMut() -> Result<()>) {
    let s = median_seconds(2, reps, || f().unwrap());
    println!("{label:<34} {:>8.2} ms", s * 1e3);
}

fn fwd_bwd(label: &str, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) {
    if let Some(filter) = std::env::args().nth(2) {
        if !label.contains(&filter) {
            return;
        }
    }
    let leaves: Vec<Tensor> = inputs.iter().map(|t| t.requires_grad_()).collect();
    time(&format!("{label} forward"), 7, || f(&leaves).map(|_| ()));
    let y = f(&leaves).unwrap();
    let g = randn(y.shape(), 99);
    time(&format!("{label} forward+backward"), 7, || {
        f(&leaves)?.backward_with_grad(&g)
    });
}

fn main() {
    let threads = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2);
    anneal_tensor::set_num_threads(threads).unwrap();
    let (n, d) = (2048, 256);
    let x = randn(&[8, 256, d], 1);
    fwd_bwd(
        "linear 2048x256 · 256x768",
        &[x.clone(), randn(&[d, 3 * d], 2), randn(&[3 * d], 3)],
        |t| t[0].linear(&t[1], Some(&t[2])),
    );
    fwd_bwd(
        "linear 2048x256 · 256x1024",
        &[x.clone(), randn(&[d, 4 * d], 2), randn(&[4 * d], 3)],
        |t| t[0].linear(&t[1], Some(&t[2])),
    );
    fwd_bwd(
        "linear 2048x1024 · 1024x256",
        &[
            randn(&[8, 256, 4 * d], 4),
            randn(&[4 * d, d], 2),
            randn(&[d], 3),
        ],
        |t| t[0].linear(&t[1], Some(&t[2])),
    );
    fwd_bwd(
        "head 2048x256 · (512x256)ᵀ",
        &[randn(&[n, d], 4), randn(&[512, d], 5)],
        |t| t[0].matmul(&t[1].transpose(0, 1)?),
    );
    fwd_bwd("gelu_tanh 2048x1024", &[randn(&[n, 4 * d], 6)], |t| {
        Ok(t[0].gelu_tanh())
    });
    fwd_bwd(
        "layer_norm 2048x256",
        &[x.clone(), randn(&[d], 7), randn(&[d], 8)],
        |t| t[0].layer_norm(&t[1], Some(&t[2]), 1e-5),
    );
    fwd_bwd("add 2048x256", &[x.clone(), randn(&[8, 256, d], 9)], |t| {
        t[0].add(&t[1])
    });
    let causal = AttentionOptions {
        causal: true,
        ..Default::default()
    };
    fwd_bwd(
        "attention_packed causal",
        &[randn(&[8, 256, 3 * d], 10)],
        |t| t[0].attention_packed(4, 4, &causal),
    );
    fwd_bwd("cross_entropy 2048x512", &[randn(&[n, 512], 11)], |t| {
        t[0].cross_entropy(&vec![3; n], Default::default())
    });
}
