//! The Mixture-of-Experts layer against PyTorch (`tests/fixtures/moe.safetensors`, computed in
//! float64 by `tests/fixtures/make_moe_fixtures.py` from the gather/scatter reference in
//! `bench/torch_moe.py`): output, balancing and z-losses, dropped assignments and every gradient,
//! for top-1 and top-2 with capacity and top-2 dropless; then the degenerate case MegaBlocks
//! tests (one expert, no capacity limit, equals the dense MLP exactly), and finite differences
//! through the router and the gates.

use std::collections::HashMap;
use std::path::Path;

use anneal_nn::layers::{Builder, Mlp, MlpKind, MoeConfig, MoeMlp, WeightLayout, Weights};
use anneal_tensor::io::load_safetensors;
use anneal_tensor::testing::{randn, rel_err_inf};
use anneal_tensor::{DType, ParamStore, Tensor};

fn fixtures() -> HashMap<String, Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/moe.safetensors");
    load_safetensors(&path).expect("fixtures load")
}

const NAMES: [(&str, &str); 5] = [
    ("router", "mlp.router.weight"),
    ("w1", "mlp.experts.c_fc.weight"),
    ("b1", "mlp.experts.c_fc.bias"),
    ("w2", "mlp.experts.c_proj.weight"),
    ("b2", "mlp.experts.c_proj.bias"),
];

fn layer(config: MoeConfig, d: usize, hidden: usize) -> (MoeMlp, ParamStore, Weights) {
    let mut b = Builder::new(0);
    let moe = MoeMlp::new(
        &mut b,
        "mlp",
        d,
        hidden,
        config,
        ("c_fc", "c_proj"),
        false,
        true,
        0.02,
        0.02,
    )
    .unwrap();
    let (params, parallel) = b.build(DType::F32);
    let w = Weights::new(&params, parallel);
    (moe, params, w)
}

fn config(experts: usize, top_k: usize, factor: Option<f64>) -> MoeConfig {
    MoeConfig {
        top_k,
        capacity_factor: factor,
        eval_capacity_factor: factor,
        ..MoeConfig::switch(experts)
    }
}

#[test]
fn matches_pytorch_for_top1_top2_and_dropless() {
    let fx = fixtures();
    for (case, k, factor) in [
        ("top1", 1, Some(1.0)),
        ("top2", 2, Some(1.0)),
        ("top2n", 2, None),
    ] {
        let (moe, params, w) = layer(config(4, k, factor), 8, 16);
        for (key, name) in NAMES {
            params.set(params.id(name).unwrap(), &fx[key]).unwrap();
        }
        let x = fx["x"].detach().requires_grad_();
        let (y, aux) = moe.forward(&w, &x, Some(3.into())).unwrap();
        let close = |what: &str, got: &Tensor, want: &Tensor, tol: f32| {
            assert_eq!(got.shape(), want.shape(), "{case} {what}");
            let err = rel_err_inf(&got.to_vec_f32(), &want.to_vec_f32());
            assert!(err < tol, "{case} {what}: relative error {err}");
        };
        close("y", &y, &fx[&format!("{case}.y")], 1e-5);
        let scalar = |t: &Tensor| t.reshape(&[1]).unwrap();
        close(
            "balance",
            &scalar(&aux.balance),
            &fx[&format!("{case}.balance")],
            1e-5,
        );
        close("z", &scalar(&aux.z), &fx[&format!("{case}.z")], 1e-5);
        let dropped = fx[&format!("{case}.dropped")].to_vec_f32()[0] as f64;
        assert!(
            (aux.dropped * 12.0 * k as f64 - dropped).abs() < 1e-9,
            "{case}"
        );
        assert!((aux.load.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let loss = y
            .mul(&fx["gy"])
            .unwrap()
            .sum_all()
            .unwrap()
            .add(&aux.balance)
            .unwrap()
            .add(&aux.z)
            .unwrap();
        loss.backward().unwrap();
        close("gx", &x.grad().unwrap(), &fx[&format!("{case}.gx")], 1e-5);
        for (key, name) in NAMES {
            let g = params.get(params.id(name).unwrap()).grad().unwrap();
            close(&format!("g{key}"), &g, &fx[&format!("{case}.g{key}")], 1e-5);
        }
        // The two losses alone: their gradient reaches the tokens and the router.
        params.zero_grad();
        let x = fx["x"].detach().requires_grad_();
        let (_, aux) = moe.forward(&w, &x, Some(3.into())).unwrap();
        aux.balance.add(&aux.z).unwrap().backward().unwrap();
        close(
            "aux gx",
            &x.grad().unwrap(),
            &fx[&format!("{case}.aux_gx")],
            1e-5,
        );
        let g = params.get(params.id(NAMES[0].1).unwrap()).grad().unwrap();
        close("aux grouter", &g, &fx[&format!("{case}.aux_grouter")], 1e-5);
    }
}

#[test]
fn one_expert_without_capacity_limit_is_the_dense_mlp_exactly() {
    let (d, hidden) = (16, 64);
    let mut b = Builder::new(1);
    let kind = MlpKind::Gelu {
        fc: "c_fc",
        proj: "c_proj",
    };
    let mlp = Mlp::new(
        &mut b,
        "mlp",
        d,
        hidden,
        kind,
        true,
        WeightLayout::InOut,
        0.02,
        0.01,
    )
    .unwrap();
    let (dense, parallel) = b.build(DType::F32);
    let dw = Weights::new(&dense, parallel);
    let (moe, params, w) = layer(config(1, 1, None), d, hidden);
    let pairs = [
        ("mlp.c_fc.weight", "mlp.experts.c_fc.weight"),
        ("mlp.c_fc.bias", "mlp.experts.c_fc.bias"),
        ("mlp.c_proj.weight", "mlp.experts.c_proj.weight"),
        ("mlp.c_proj.bias", "mlp.experts.c_proj.bias"),
    ];
    for (from, to) in pairs {
        let t = dense.by_name(from).unwrap();
        let mut shape = vec![1];
        shape.extend(t.shape());
        let id = params.id(to).unwrap();
        params
            .set(id, &t.detach().reshape(&shape).unwrap())
            .unwrap();
    }
    let x0 = randn(&[2, 5, d], 7);
    let gy = randn(&[2, 5, d], 8);
    let (xd, xm) = (x0.detach().requires_grad_(), x0.detach().requires_grad_());
    let yd = mlp.forward(&dw, &xd).unwrap();
    let (ym, aux) = moe.forward(&w, &xm, Some(1.into())).unwrap();
    assert_eq!(yd.to_vec_f32(), ym.to_vec_f32());
    assert_eq!(aux.dropped, 0.0);
    assert_eq!(aux.load, vec![1.0]);
    yd.backward_with_grad(&gy).unwrap();
    // The router's softmax over one expert is 1 whatever its logit, so the output passes it no
    // gradient (nor does the balancing loss, the constant α); the z-loss would move it, so it is
    // left out here.
    assert_eq!(aux.balance.item().unwrap(), 1e-2);
    ym.backward_with_grad(&gy).unwrap();
    assert_eq!(
        xd.grad().unwrap().to_vec_f32(),
        xm.grad().unwrap().to_vec_f32()
    );
    for (from, to) in pairs {
        let a = dense.by_name(from).unwrap().grad().unwrap().to_vec_f32();
        let b = params.by_name(to).unwrap().grad().unwrap().to_vec_f32();
        assert_eq!(a, b, "{from}");
    }
}

#[test]
fn router_and_gate_gradients_match_finite_differences() {
    // Top-2 with a capacity that drops some assignments: the router's gradient comes through the
    // renormalised gates, the balancing loss's probabilities and the z-loss.
    let cfg = MoeConfig {
        aux_loss: 0.5,
        z_loss: 0.1,
        ..config(4, 2, Some(0.75))
    };
    let (moe, params, w) = layer(cfg, 6, 8);
    let mut rng = anneal_tensor::Rng::new(5);
    for info in params.infos().to_vec() {
        let id = params.id(&info.name).unwrap();
        let t = params.get(id);
        params
            .set(id, &Tensor::randn(t.shape(), 0.5, DType::F32, &mut rng))
            .unwrap();
    }
    let x = randn(&[10, 6], 11);
    let gy = randn(&[10, 6], 12);
    let loss = |x: &Tensor| -> f64 {
        let (y, aux) = moe.forward(&w, x, Some(2.into())).unwrap();
        let l = y.mul(&gy).unwrap().sum_all().unwrap();
        (l.item().unwrap() + aux.balance.item().unwrap() + aux.z.item().unwrap()) as f64
    };
    let xg = x.detach().requires_grad_();
    let (y, aux) = moe.forward(&w, &xg, Some(2.into())).unwrap();
    assert!(aux.dropped > 0.0, "the capacity drops some assignments");
    y.mul(&gy)
        .unwrap()
        .sum_all()
        .unwrap()
        .add(&aux.balance)
        .unwrap()
        .add(&aux.z)
        .unwrap()
        .backward()
        .unwrap();
    let eps = 1e-3f32;
    let check = |analytic: Vec<f32>, perturb: &dyn Fn(usize, f32) -> f64, what: &str| {
        let mut checked = 0;
        for (j, &a) in analytic.iter().enumerate() {
            let numeric = ((perturb(j, eps) - perturb(j, -eps)) / (2.0 * eps as f64)) as f32;
            assert!(
                (a - numeric).abs() <= 2e-3 + 1e-2 * numeric.abs(),
                "{what} element {j}: analytic {a} vs numeric {numeric}"
            );
            checked += 1;
        }
        assert!(checked > 0);
    };
    let router = params.id("mlp.router.weight").unwrap();
    let base = params.get(router).to_vec_f32();
    check(
        params.get(router).grad().unwrap().to_vec_f32(),
        &|j, e| {
            let mut v = base.clone();
            v[j] += e;
            params
                .set(router, &Tensor::from_f32(v, &[6, 4]).unwrap())
                .unwrap();
            let l = loss(&x);
            params
                .set(router, &Tensor::from_f32(base.clone(), &[6, 4]).unwrap())
                .unwrap();
            l
        },
        "router",
    );
    let xv = x.to_vec_f32();
    check(
        xg.grad().unwrap().to_vec_f32(),
        &|j, e| {
            let mut v = xv.clone();
            v[j] += e;
            loss(&Tensor::from_f32(v, &[10, 6]).unwrap())
        },
        "tokens",
    );
}

#[test]
fn bad_routing_settings_are_refused_naming_the_key() {
    let err = |c: MoeConfig| c.validate("model.moe").unwrap_err().to_string();
    let e = err(config(4, 5, None));
    assert!(
        e.contains("model.moe.top_k = 5") && e.contains("between 1 and model.moe.experts (4)"),
        "{e}"
    );
    let e = err(config(4, 1, Some(0.0)));
    assert!(
        e.contains("model.moe.capacity_factor = 0") && e.contains("\"none\""),
        "{e}"
    );
    let e = err(MoeConfig {
        eval_capacity_factor: Some(-1.0),
        ..config(4, 1, None)
    });
    assert!(e.contains("model.moe.eval_capacity_factor = -1"), "{e}");
    let e = err(config(0, 1, None));
    assert!(e.contains("model.moe.experts = 0"), "{e}");
}
