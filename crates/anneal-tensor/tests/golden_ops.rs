//! Every op against PyTorch: outputs and input gradients from `tests/fixtures/ops.safetensors`
//! (written by `tests/fixtures/make_fixtures.py`, reference values computed in float64).
//!
//! Error measure: norm-wise relative error ‖ours − reference‖∞ / ‖reference‖∞, required ≤ 1e-5
//! in f32.

use std::collections::HashMap;
use std::path::Path;

use anneal_tensor::io::load_safetensors;
use anneal_tensor::testing::rel_err_inf;
use anneal_tensor::{AttentionOptions, CrossEntropyOptions, Result, Tensor};

const TOL: f32 = 1e-5;

fn fixtures() -> HashMap<String, Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/ops.safetensors");
    load_safetensors(&path).expect("fixtures load")
}

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape(), b.shape(), "shape");
    rel_err_inf(&a.to_vec_f32(), &b.to_vec_f32())
}

fn ints(t: &Tensor) -> Vec<usize> {
    t.to_vec_f32().iter().map(|&v| v as usize).collect()
}

/// Runs `f` on the op's named inputs, backpropagates the stored upstream gradient and compares
/// the output and every stored input gradient.
fn check(
    fx: &HashMap<String, Tensor>,
    op: &str,
    names: &[&str],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) {
    let get = |k: &str| {
        fx.get(&format!("{op}.{k}"))
            .unwrap_or_else(|| panic!("fixture {op}.{k}"))
            .clone()
    };
    let inputs: Vec<Tensor> = names.iter().map(|n| get(n).requires_grad_()).collect();
    let y = f(&inputs).unwrap();
    let e = rel_err(&y, &get("y"));
    assert!(e <= TOL, "{op}: output relative error {e}");
    let gy = get("gy").reshape(y.shape()).unwrap();
    y.backward_with_grad(&gy).unwrap();
    let mut checked = 0;
    for (n, x) in names.iter().zip(&inputs) {
        if let Some(want) = fx.get(&format!("{op}.g{n}")) {
            let e = rel_err(&x.grad().unwrap(), want);
            assert!(e <= TOL, "{op}: gradient of {n} relative error {e}");
            checked += 1;
        }
    }
    assert_eq!(
        checked,
        names.len(),
        "{op}: every input has a reference gradient"
    );
}

#[test]
fn products() {
    let fx = fixtures();
    check(&fx, "matmul", &["a", "b"], |t| t[0].matmul(&t[1]));
    check(&fx, "matmul_t", &["a", "b"], |t| {
        t[0].transpose(0, 1)?.matmul(&t[1].transpose(0, 1)?)
    });
    check(&fx, "bmm", &["a", "b"], |t| t[0].matmul(&t[1]));
    check(&fx, "linear", &["x", "w", "b"], |t| {
        t[0].linear(&t[1], Some(&t[2]))
    });
}

#[test]
fn elementwise_and_reductions() {
    let fx = fixtures();
    check(&fx, "add", &["a", "b"], |t| t[0].add(&t[1]));
    check(&fx, "sub", &["a", "b"], |t| t[0].sub(&t[1]));
    check(&fx, "mul", &["a", "b"], |t| t[0].mul(&t[1]));
    check(&fx, "div", &["a", "b"], |t| t[0].div(&t[1]));
    check(&fx, "sum", &["x"], |t| t[0].sum(1, false));
    check(&fx, "mean", &["x"], |t| t[0].mean(-1, true));
    check(&fx, "max", &["x"], |t| t[0].max(0, false));
    check(&fx, "gelu_tanh", &["x"], |t| Ok(t[0].gelu_tanh()));
    check(&fx, "gelu", &["x"], |t| Ok(t[0].gelu()));
    check(&fx, "relu", &["x"], |t| Ok(t[0].relu()));
    check(&fx, "silu", &["x"], |t| Ok(t[0].silu()));
}

#[test]
fn normalisation_and_softmax() {
    let fx = fixtures();
    check(&fx, "softmax", &["x"], |t| t[0].softmax());
    check(&fx, "log_softmax", &["x"], |t| t[0].log_softmax());
    check(&fx, "layer_norm", &["x", "w", "b"], |t| {
        t[0].layer_norm(&t[1], Some(&t[2]), 1e-5)
    });
    check(&fx, "rms_norm", &["x", "w"], |t| t[0].rms_norm(&t[1], 1e-6));
    let targets: Vec<i64> = fx["cross_entropy.targets"]
        .to_vec_f32()
        .iter()
        .map(|&v| v as i64)
        .collect();
    check(&fx, "cross_entropy", &["x"], |t| {
        t[0].cross_entropy(&targets, CrossEntropyOptions::default())
    });
    let smooth = CrossEntropyOptions {
        label_smoothing: 0.1,
        ..Default::default()
    };
    check(&fx, "cross_entropy_smooth", &["x"], |t| {
        t[0].cross_entropy(&targets, smooth)
    });
}

#[test]
fn attention_and_rope() {
    let fx = fixtures();
    let causal = AttentionOptions {
        causal: true,
        ..Default::default()
    };
    check(&fx, "attention_causal_gqa", &["q", "k", "v"], |t| {
        Tensor::attention(&t[0], &t[1], &t[2], &causal)
    });
    let mask: Vec<bool> = fx["attention_padding.mask"]
        .to_vec_f32()
        .iter()
        .map(|&v| v != 0.0)
        .collect();
    let padded = AttentionOptions {
        key_padding_mask: Some(mask),
        ..Default::default()
    };
    check(&fx, "attention_padding", &["q", "k", "v"], |t| {
        Tensor::attention(&t[0], &t[1], &t[2], &padded)
    });
    check(&fx, "rope", &["x"], |t| t[0].rope(10000.0, 3));
}

#[test]
fn convolution_and_pooling() {
    let fx = fixtures();
    check(&fx, "conv2d", &["x", "w", "b"], |t| {
        t[0].conv2d(&t[1], Some(&t[2]), 2, 1)
    });
    check(&fx, "max_pool2d", &["x"], |t| t[0].max_pool2d(2, 2));
    check(&fx, "avg_pool2d", &["x"], |t| t[0].avg_pool2d(2, 2));
}

#[test]
fn layout_and_indexing() {
    let fx = fixtures();
    check(&fx, "concat", &["a", "b"], |t| {
        Tensor::concat(&[&t[0], &t[1]], 1)
    });
    let ids: Vec<u32> = fx["embedding.ids"]
        .to_vec_f32()
        .iter()
        .map(|&v| v as u32)
        .collect();
    check(&fx, "embedding", &["w"], |t| {
        t[0].embedding(&ids, &[ids.len()])
    });
    let sel = ints(&fx["index_select.index"]);
    check(&fx, "index_select", &["x"], |t| t[0].index_select(1, &sel));
    let gidx = ints(&fx["gather.index"]);
    check(&fx, "gather", &["x"], |t| t[0].gather(1, &gidx, &[2, 3]));
    check(&fx, "scatter_add", &["x", "s"], |t| {
        t[0].scatter_add(1, &gidx, &t[1])
    });
}
