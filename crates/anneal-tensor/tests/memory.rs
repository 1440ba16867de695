//! Backward frees what each op saved as soon as it has used it, even while the graph's root is
//! still referenced. Alone in its binary: it reads the process-wide tensor memory counters.

use anneal_tensor::testing::randn;
use anneal_tensor::{memory_stats, Tensor};

#[test]
fn saved_tensors_are_freed_by_backward() {
    let x = randn(&[256, 256], 1).requires_grad_();
    let w = randn(&[256, 256], 2);
    let mut h: Tensor = x.clone();
    for _ in 0..8 {
        h = h.matmul(&w).unwrap().gelu_tanh();
    }
    let loss = h.mean_all().unwrap();
    drop(h);
    let with_graph = memory_stats().live_bytes;
    loss.backward().unwrap();
    let after = memory_stats().live_bytes;
    // Eight layers each saved two 256 KB activations; after backward only x, w, x's gradient and
    // the loss remain.
    assert!(
        with_graph - after > 8 * 2 * 256 * 256 * 4 * 9 / 10,
        "backward freed {} bytes of {} held",
        with_graph - after,
        with_graph
    );
    assert!(
        loss.requires_grad(),
        "the loss tensor itself is still alive"
    );
}
