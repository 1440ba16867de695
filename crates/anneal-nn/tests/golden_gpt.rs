//! A 2-layer GPT-2 against PyTorch: logits, loss, every parameter gradient and every parameter
//! after one AdamW step, from `tests/fixtures/gpt2.safetensors` (reference computed in float64 by
//! `tests/fixtures/make_fixtures.py`).
//!
//! f32: norm-wise relative error ≤ 1e-5 for logits, loss, gradients and parameters after the step. bf16 (parameters and activations stored in bf16, arithmetic in f32): bf16 keeps 8
//! significant bits (relative rounding 2⁻⁹ ≈ 2e-3 per stored value), and errors add up across the
//! blocks, so logits must agree within 3e-2 and the loss within 1e-2 relative.

use std::collections::HashMap;
use std::path::Path;

use anneal_nn::{Gpt, GptConfig};
use anneal_tensor::io::load_safetensors;
use anneal_tensor::optim::{AdamW, AdamWConfig};
use anneal_tensor::testing::rel_err_inf;
use anneal_tensor::Optimizer;
use anneal_tensor::{DType, Tensor};

fn fixtures() -> HashMap<String, Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gpt2.safetensors");
    load_safetensors(&path).expect("fixtures load")
}

fn model(fx: &HashMap<String, Tensor>, dtype: DType) -> Gpt {
    let config = GptConfig {
        vocab_size: 64,
        block_size: 16,
        n_layer: 2,
        n_head: 4,
        n_embd: 32,
        dtype,
        ..GptConfig::gpt2()
    };
    let m = Gpt::new(config, 0).unwrap();
    for p in m.params.infos() {
        let id = m.params.id(&p.name).unwrap();
        m.params.set(id, &fx[&p.name]).unwrap();
    }
    m
}

fn inputs(fx: &HashMap<String, Tensor>) -> (Vec<u32>, Vec<i64>) {
    let ids = fx["ids"].to_vec_f32().iter().map(|&v| v as u32).collect();
    let targets = fx["targets"]
        .to_vec_f32()
        .iter()
        .map(|&v| v as i64)
        .collect();
    (ids, targets)
}

#[test]
fn f32_forward_backward_and_adamw_step_match_pytorch() {
    let fx = fixtures();
    let m = model(&fx, DType::F32);
    let (ids, targets) = inputs(&fx);
    let logits = m.forward(&ids, 2, 16, None).unwrap();
    let e = rel_err_inf(&logits.to_vec_f32(), &fx["logits"].to_vec_f32());
    assert!(e <= 1e-5, "logits relative error {e}");
    let loss = m.loss(&ids, &targets, 2, 16, None).unwrap();
    let e = rel_err_inf(&[loss.item().unwrap()], &fx["loss"].to_vec_f32());
    assert!(e <= 1e-5, "loss relative error {e}");
    loss.backward().unwrap();
    for p in m.params.infos() {
        let g = m.params.by_name(&p.name).unwrap().grad().unwrap();
        let e = rel_err_inf(
            &g.to_vec_f32(),
            &fx[&format!("grad.{}", p.name)].to_vec_f32(),
        );
        assert!(e <= 1e-5, "gradient of {}: relative error {e}", p.name);
    }
    // Step from the reference gradients, so the optimizer is tested on its own: a few gradients are
    // zero in exact arithmetic (the key bias cannot change a softmax) and are rounding noise in any
    // f32 computation, and Adam's first step maps noise to ±lr.
    for p in m.params.infos() {
        let id = m.params.id(&p.name).unwrap();
        m.params
            .set_grad(id, &fx[&format!("grad.{}", p.name)])
            .unwrap();
    }
    let mut opt = AdamW::new(
        &m.params,
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            ..AdamWConfig::DEFAULT
        },
    );
    opt.step(&m.params, 1e-3);
    for p in m.params.infos() {
        let v = m.params.by_name(&p.name).unwrap().to_vec_f32();
        let e = rel_err_inf(&v, &fx[&format!("adamw.{}", p.name)].to_vec_f32());
        assert!(e <= 1e-5, "{} after AdamW: relative error {e}", p.name);
    }
}

#[test]
fn bf16_forward_within_stated_tolerance() {
    let fx = fixtures();
    let m = model(&fx, DType::BF16);
    let (ids, targets) = inputs(&fx);
    let logits = m.forward(&ids, 2, 16, None).unwrap();
    assert_eq!(logits.dtype(), DType::BF16);
    let e = rel_err_inf(&logits.to_vec_f32(), &fx["logits"].to_vec_f32());
    assert!(e <= 3e-2, "bf16 logits relative error {e}");
    let loss = m.loss(&ids, &targets, 2, 16, None).unwrap().item().unwrap();
    let e = rel_err_inf(&[loss], &fx["loss"].to_vec_f32());
    assert!(e <= 1e-2, "bf16 loss relative error {e}");
}
