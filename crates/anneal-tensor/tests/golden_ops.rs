//! Every op against PyTorch: outputs and input gradients from `tests/fixtures/ops.safetensors`
//! and, on the same ops with inputs rounded to bfloat16, `tests/fixtures/bf16_ops.safetensors`
//! (both written by `tests/fixtures/make_fixtures.py`, reference values computed in float64).
//!
//! Error measure: norm-wise relative error ‖ours − reference‖∞ / ‖reference‖∞, required ≤ 1e-5
//! in f32 and ≤ [`BF16_TOL`] in bf16, where every output and gradient is rounded to 8
//! significant bits (a relative error of up to 2⁻⁹ per element) and the saved activations a
//! backward pass reads are bf16 too.

use std::collections::HashMap;
use std::path::Path;

use anneal_tensor::io::load_safetensors;
use anneal_tensor::testing::rel_err_inf;
use anneal_tensor::{AttentionOptions, CrossEntropyOptions, DType, Result, Tensor};

const TOL: f32 = 1e-5;

/// Two roundings to bf16 (2⁻⁹ each): the output's own, and one of a saved value a backward pass
/// reads. Measured: at most 3.2e-3 (LayerNorm's output); gradients reach f32 leaves, most within
/// 1e-6, those through a saved bf16 softmax (softmax, attention's query and key) within 2.6e-3.
const BF16_TOL: f32 = 4e-3;

/// Attention in bf16 where the CPU multiplies in bf16 (AMX or AVX512-BF16): the probabilities
/// and the score gradients are rounded to bf16 as they enter their products, as autocast
/// attention does, two roundings more than [`BF16_TOL`] counts. Measured: 8.0e-3 (the query's
/// gradient under a padding mask).
const BF16_ATTENTION_TOL: f32 = 1.2e-2;

/// One fixture file and the dtype and tolerance its ops are run at.
struct Golden {
    fx: HashMap<String, Tensor>,
    dtype: DType,
    tol: f32,
}

fn load(file: &str) -> HashMap<String, Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(file);
    load_safetensors(&path).expect("fixtures load")
}

/// The f32 and the bf16 fixtures.
fn fixtures() -> [Golden; 2] {
    [
        Golden {
            fx: load("ops.safetensors"),
            dtype: DType::F32,
            tol: TOL,
        },
        Golden {
            fx: load("bf16_ops.safetensors"),
            dtype: DType::BF16,
            tol: BF16_TOL,
        },
    ]
}

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape(), b.shape(), "shape");
    rel_err_inf(&a.to_vec_f32(), &b.to_vec_f32())
}

fn ints(t: &Tensor) -> Vec<usize> {
    t.to_vec_f32().iter().map(|&v| v as usize).collect()
}

/// Runs `f` on the op's named inputs (in the fixture's dtype), backpropagates the stored upstream
/// gradient and compares the output and every stored input gradient.
fn check(g: &Golden, op: &str, names: &[&str], f: impl Fn(&[Tensor]) -> Result<Tensor>) {
    check_within(g, g.tol, op, names, f)
}

/// [`check`] at tolerance `tol`.
fn check_within(
    g: &Golden,
    tol: f32,
    op: &str,
    names: &[&str],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) {
    let (fx, dtype) = (&g.fx, g.dtype);
    let get = |k: &str| {
        fx.get(&format!("{op}.{k}"))
            .unwrap_or_else(|| panic!("fixture {op}.{k}"))
            .clone()
    };
    let inputs: Vec<Tensor> = names
        .iter()
        .map(|n| get(n).to_dtype(dtype).requires_grad_())
        .collect();
    let y = f(&inputs).unwrap();
    let e = rel_err(&y, &get("y"));
    assert!(e <= tol, "{op} in {dtype:?}: output relative error {e}");
    let gy = get("gy").reshape(y.shape()).unwrap().to_dtype(dtype);
    y.backward_with_grad(&gy).unwrap();
    let mut checked = 0;
    for (n, x) in names.iter().zip(&inputs) {
        if let Some(want) = fx.get(&format!("{op}.g{n}")) {
            let e = rel_err(&x.grad().unwrap(), want);
            assert!(
                e <= tol,
                "{op} in {dtype:?}: gradient of {n} relative error {e}"
            );
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
    for g in &fixtures() {
        check(g, "matmul", &["a", "b"], |t| t[0].matmul(&t[1]));
        check(g, "matmul_t", &["a", "b"], |t| {
            t[0].transpose(0, 1)?.matmul(&t[1].transpose(0, 1)?)
        });
        check(g, "bmm", &["a", "b"], |t| t[0].matmul(&t[1]));
        check(g, "linear", &["x", "w", "b"], |t| {
            t[0].linear(&t[1], Some(&t[2]))
        });
    }
}

#[test]
fn elementwise_and_reductions() {
    for g in &fixtures() {
        check(g, "add", &["a", "b"], |t| t[0].add(&t[1]));
        check(g, "sub", &["a", "b"], |t| t[0].sub(&t[1]));
        check(g, "mul", &["a", "b"], |t| t[0].mul(&t[1]));
        check(g, "div", &["a", "b"], |t| t[0].div(&t[1]));
        check(g, "sum", &["x"], |t| t[0].sum(1, false));
        check(g, "mean", &["x"], |t| t[0].mean(-1, true));
        check(g, "max", &["x"], |t| t[0].max(0, false));
        check(g, "gelu_tanh", &["x"], |t| Ok(t[0].gelu_tanh()));
        check(g, "gelu", &["x"], |t| Ok(t[0].gelu()));
        check(g, "relu", &["x"], |t| Ok(t[0].relu()));
        check(g, "silu", &["x"], |t| Ok(t[0].silu()));
    }
}

#[test]
fn normalisation_and_softmax() {
    for g in &fixtures() {
        check(g, "softmax", &["x"], |t| t[0].softmax());
        check(g, "log_softmax", &["x"], |t| t[0].log_softmax());
        check(g, "layer_norm", &["x", "w", "b"], |t| {
            t[0].layer_norm(&t[1], Some(&t[2]), 1e-5)
        });
        check(g, "rms_norm", &["x", "w"], |t| t[0].rms_norm(&t[1], 1e-6));
        let targets: Vec<i64> = g.fx["cross_entropy.targets"]
            .to_vec_f32()
            .iter()
            .map(|&v| v as i64)
            .collect();
        check(g, "cross_entropy", &["x"], |t| {
            t[0].cross_entropy(&targets, CrossEntropyOptions::default())
        });
        let smooth = CrossEntropyOptions {
            label_smoothing: 0.1,
            ..Default::default()
        };
        check(g, "cross_entropy_smooth", &["x"], |t| {
            t[0].cross_entropy(&targets, smooth)
        });
    }
}

#[test]
fn attention_and_rope() {
    for g in &fixtures() {
        let causal = AttentionOptions {
            causal: true,
            ..Default::default()
        };
        let tol = if g.dtype == DType::BF16 {
            BF16_ATTENTION_TOL
        } else {
            g.tol
        };
        check_within(g, tol, "attention_causal_gqa", &["q", "k", "v"], |t| {
            Tensor::attention(&t[0], &t[1], &t[2], &causal)
        });
        let mask: Vec<bool> = g.fx["attention_padding.mask"]
            .to_vec_f32()
            .iter()
            .map(|&v| v != 0.0)
            .collect();
        let padded = AttentionOptions {
            key_padding_mask: Some(mask),
            ..Default::default()
        };
        check_within(g, tol, "attention_padding", &["q", "k", "v"], |t| {
            Tensor::attention(&t[0], &t[1], &t[2], &padded)
        });
        check(g, "rope", &["x"], |t| t[0].rope(10000.0, 3));
    }
}

#[test]
fn convolution_and_pooling() {
    for g in &fixtures() {
        check(g, "conv2d", &["x", "w", "b"], |t| {
            t[0].conv2d(&t[1], Some(&t[2]), 2, 1)
        });
        check(g, "max_pool2d", &["x"], |t| t[0].max_pool2d(2, 2));
        check(g, "avg_pool2d", &["x"], |t| t[0].avg_pool2d(2, 2));
    }
}

#[test]
fn layout_and_indexing() {
    for g in &fixtures() {
        check(g, "concat", &["a", "b"], |t| {
            Tensor::concat(&[&t[0], &t[1]], 1)
        });
        let ids: Vec<u32> = g.fx["embedding.ids"]
            .to_vec_f32()
            .iter()
            .map(|&v| v as u32)
            .collect();
        check(g, "embedding", &["w"], |t| {
            t[0].embedding(&ids, &[ids.len()])
        });
        let sel = ints(&g.fx["index_select.index"]);
        check(g, "index_select", &["x"], |t| t[0].index_select(1, &sel));
        let gidx = ints(&g.fx["gather.index"]);
        check(g, "gather", &["x"], |t| t[0].gather(1, &gidx, &[2, 3]));
        check(g, "scatter_add", &["x", "s"], |t| {
            t[0].scatter_add(1, &gidx, &t[1])
        });
    }
}
