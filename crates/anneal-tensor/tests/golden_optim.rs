//! AdamW against PyTorch over eight steps, from `tests/fixtures/adamw.safetensors` (written by
//! `tests/fixtures/make_fixtures.py`, reference in float64): the learning rate changes every
//! step, gradients range over three orders of magnitude and one step's are zero, so both
//! moments' decay and their bias corrections decide the result, as they do not on a first step
//! from zero state. Three parameter groups (decay on, off, and a group at twice the learning
//! rate with a decay of its own) and a frozen parameter that must not move.

use std::collections::HashMap;
use std::path::Path;

use anneal_tensor::io::load_safetensors;
use anneal_tensor::optim::{AdamW, AdamWConfig};
use anneal_tensor::testing::rel_err_inf;
use anneal_tensor::{DType, Optimizer, ParamGroup, ParamStore, ParamStoreBuilder, Tensor};

/// Norm-wise relative error allowed after each step: f32 arithmetic against float64.
const TOL: f32 = 2e-6;

const NAMES: [&str; 4] = ["w", "b", "e", "head"];

fn fixtures() -> HashMap<String, Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/adamw.safetensors");
    load_safetensors(&path).expect("fixtures load")
}

/// The fixture's parameters in the fixture's groups, plus a frozen one.
fn store(fx: &HashMap<String, Tensor>) -> ParamStore {
    let mut b = ParamStoreBuilder::new();
    for name in NAMES {
        b.add(name, &fx[&format!("init.{name}")], name != "b")
            .unwrap();
    }
    let frozen = b
        .add("frozen", &Tensor::full(&[3], 0.5, DType::F32), true)
        .unwrap();
    let mut s = b.build(DType::F32);
    s.set_requires_grad(frozen, false);
    let head = s.add_group(ParamGroup {
        name: "head".into(),
        lr_scale: 2.0,
        weight_decay: Some(0.05),
    });
    s.set_group(s.id("head").unwrap(), head).unwrap();
    s
}

fn step(s: &ParamStore, opt: &mut AdamW, fx: &HashMap<String, Tensor>, k: usize, lr: f32) {
    for name in NAMES {
        s.set_grad(s.id(name).unwrap(), &fx[&format!("grad.{k}.{name}")])
            .unwrap();
    }
    opt.step(s, lr);
}

fn params(s: &ParamStore) -> Vec<Vec<f32>> {
    NAMES
        .iter()
        .map(|n| s.by_name(n).unwrap().to_vec_f32())
        .collect()
}

#[test]
fn eight_adamw_steps_match_pytorch() {
    let fx = fixtures();
    let lrs = fx["lr"].to_vec_f32();
    assert_eq!(lrs.len(), 8);
    let s = store(&fx);
    let mut opt = AdamW::new(&s, AdamWConfig::DEFAULT);
    for (k, &lr) in lrs.iter().enumerate() {
        step(&s, &mut opt, &fx, k, lr);
        for name in NAMES {
            let got = s.by_name(name).unwrap().to_vec_f32();
            let want = fx[&format!("after.{k}.{name}")].to_vec_f32();
            let e = rel_err_inf(&got, &want);
            assert!(e <= TOL, "{name} after step {k}: relative error {e}");
        }
    }
    assert_eq!(s.by_name("frozen").unwrap().to_vec_f32(), [0.5; 3]);
    // The moments, in the store's order of trainable parameters.
    let state: HashMap<String, Vec<f32>> = opt.state(&s).into_iter().collect();
    for (key, torch) in [("adam.m", "exp_avg"), ("adam.v", "exp_avg_sq")] {
        let want: Vec<f32> = NAMES
            .iter()
            .flat_map(|n| fx[&format!("{torch}.{n}")].to_vec_f32())
            .collect();
        let e = rel_err_inf(&state[key], &want);
        assert!(e <= 1e-5, "{key}: relative error {e}");
    }
}

#[test]
fn adamw_resumed_from_its_state_continues_bit_for_bit() {
    let fx = fixtures();
    let lrs = fx["lr"].to_vec_f32();
    let (a, b) = (store(&fx), store(&fx));
    let mut straight = AdamW::new(&a, AdamWConfig::DEFAULT);
    let mut first = AdamW::new(&b, AdamWConfig::DEFAULT);
    for (k, &lr) in lrs.iter().enumerate().take(4) {
        step(&a, &mut straight, &fx, k, lr);
        step(&b, &mut first, &fx, k, lr);
    }
    let saved: HashMap<String, Vec<f32>> = first.state(&b).into_iter().collect();
    let mut resumed = AdamW::new(&b, AdamWConfig::DEFAULT);
    resumed.load_state(&b, first.steps(), &saved).unwrap();
    for (k, &lr) in lrs.iter().enumerate().skip(4) {
        step(&a, &mut straight, &fx, k, lr);
        step(&b, &mut resumed, &fx, k, lr);
    }
    assert_eq!(params(&a), params(&b));
}
