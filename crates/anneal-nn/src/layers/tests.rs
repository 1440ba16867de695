use super::*;
use anneal_tensor::testing::rel_err_inf;

fn x(shape: &[usize], seed: u64) -> Tensor {
    // Inputs of unit scale.
    Tensor::randn(shape, 1.0, DType::F32, &mut Rng::new(seed))
}

#[test]
fn parameters_are_named_under_the_prefix() {
    let mut b = Builder::new(0);
    let c = BlockConfig::llama(16, 4, 2, 32, 10_000.0, 1e-5);
    Block::new(&mut b, "model.layers.3", &c).unwrap();
    let (params, _) = b.build(DType::F32);
    let names: Vec<&str> = params.infos().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "model.layers.3.input_layernorm.weight",
            "model.layers.3.post_attention_layernorm.weight",
            "model.layers.3.self_attn.q_proj.weight",
            "model.layers.3.self_attn.k_proj.weight",
            "model.layers.3.self_attn.v_proj.weight",
            "model.layers.3.self_attn.o_proj.weight",
            "model.layers.3.mlp.gate_proj.weight",
            "model.layers.3.mlp.up_proj.weight",
            "model.layers.3.mlp.down_proj.weight",
        ]
    );
    // [out, in] as nn.Linear stores them; grouped K/V heads are narrower.
    assert_eq!(
        params
            .by_name("model.layers.3.self_attn.k_proj.weight")
            .unwrap()
            .shape(),
        &[8, 16]
    );
    assert_eq!(
        params
            .by_name("model.layers.3.mlp.down_proj.weight")
            .unwrap()
            .shape(),
        &[16, 32]
    );
}

#[test]
fn out_in_linear_equals_in_out_with_the_transposed_weight() {
    let build = |layout| {
        let mut b = Builder::new(1);
        let opts = LinearOptions {
            layout,
            ..LinearOptions::default()
        };
        let l = Linear::new(&mut b, "fc", 5, 3, opts).unwrap();
        let (p, par) = b.build(DType::F32);
        (l, p, par)
    };
    let (a, pa, par_a) = build(WeightLayout::InOut);
    let (t, pt, par_t) = build(WeightLayout::OutIn);
    let w = pa.by_name("fc.weight").unwrap().transpose(0, 1).unwrap();
    let w = Tensor::from_f32(w.to_vec_f32(), &[3, 5]).unwrap();
    pt.set(pt.id("fc.weight").unwrap(), &w).unwrap();
    let input = x(&[4, 5], 2);
    let ya = a.forward(&Weights::new(&pa, par_a), &input).unwrap();
    let yt = t.forward(&Weights::new(&pt, par_t), &input).unwrap();
    assert!(rel_err_inf(&ya.to_vec_f32(), &yt.to_vec_f32()) < 1e-6);
    ya.sum_all().unwrap().backward().unwrap();
    yt.sum_all().unwrap().backward().unwrap();
    let ga = pa.by_name("fc.weight").unwrap().grad().unwrap();
    let gt = pt.by_name("fc.weight").unwrap().grad().unwrap();
    let ga_t = ga.transpose(0, 1).unwrap().to_vec_f32();
    assert!(rel_err_inf(&ga_t, &gt.to_vec_f32()) < 1e-6);
}

#[test]
fn llama_block_with_rope_and_grouped_heads_caches_exactly() {
    let mut b = Builder::new(3);
    let c = BlockConfig::llama(16, 4, 2, 24, 10_000.0, 1e-5);
    let block = Block::new(&mut b, "layer", &c).unwrap();
    let (params, parallel) = b.build(DType::F32);
    // Large weights, so that attention is far from uniform and positions matter.
    for (i, p) in params.infos().iter().enumerate() {
        let id = anneal_tensor::ParamId(i);
        params
            .set(id, &x(&p.shape, 100 + i as u64).scale(0.5))
            .unwrap();
    }
    let w = Weights::new(&params, parallel);
    let input = x(&[1, 7, 16], 4);
    let full = block.forward(&w, &input, 0.0, None).unwrap().0.to_vec_f32();
    // Three positions, then one at a time, through the cache.
    let mut past: Option<(Tensor, Tensor)> = None;
    let mut got = Vec::new();
    for (start, n) in [(0, 3), (3, 1), (4, 1), (5, 2)] {
        let part = input.narrow(1, start, n).unwrap();
        let (y, kv) = block
            .forward_cached(&w, &part, past.as_ref(), start)
            .unwrap();
        got.extend(y.to_vec_f32());
        past = Some(kv);
    }
    assert_eq!(past.unwrap().0.shape(), &[1, 7, 2, 4]);
    let err = rel_err_inf(&got, &full);
    assert!(err < 1e-5, "relative error {err}");
    // Rotary positions are relative: the same tokens all one place later attend alike, but a
    // cache that misplaces its keys changes the output.
    let head = input.narrow(1, 0, 3).unwrap();
    let shifted = block
        .forward_cached(&w, &head, None, 1)
        .unwrap()
        .0
        .to_vec_f32();
    assert!(rel_err_inf(&shifted, &full[..3 * 16]) < 1e-5);
    let (_, kv) = block.forward_cached(&w, &head, None, 0).unwrap();
    let next = input.narrow(1, 3, 1).unwrap();
    let wrong = block
        .forward_cached(&w, &next, Some(&kv), 5)
        .unwrap()
        .0
        .to_vec_f32();
    assert!(rel_err_inf(&wrong, &full[3 * 16..4 * 16]) > 1e-3);
}

#[test]
fn fused_and_separate_projections_give_the_same_attention() {
    // GPT-2's packed path against the general path of one model: Q, K, V narrowed from c_attn.
    let c = BlockConfig::gpt2(16, 4, 2, true);
    let mut b = Builder::new(5);
    let block = Block::new(&mut b, "h.0", &c).unwrap();
    let (params, parallel) = b.build(DType::F32);
    let w = Weights::new(&params, parallel);
    let input = x(&[2, 6, 16], 6);
    let packed = block.forward(&w, &input, 0.0, None).unwrap().0.to_vec_f32();
    let mut cached = Vec::new();
    for i in 0..2 {
        let row = input.narrow(0, i, 1).unwrap();
        cached.extend(
            block
                .forward_cached(&w, &row, None, 0)
                .unwrap()
                .0
                .to_vec_f32(),
        );
    }
    assert!(rel_err_inf(&cached, &packed) < 1e-5);
}

#[test]
fn heads_read_the_right_rows() {
    let mut b = Builder::new(7);
    let score = ScalarHead::new(&mut b, "score", 4).unwrap();
    let classify = ClassificationHead::new(&mut b, "classifier", 4, 3).unwrap();
    let (params, parallel) = b.build(DType::F32);
    let w = Weights::new(&params, parallel);
    let hidden = x(&[2, 5, 4], 8);
    let s = score.forward(&w, &hidden, &[2, 5]).unwrap().to_vec_f32();
    let weight = params.by_name("score.weight").unwrap().to_vec_f32();
    let h = hidden.to_vec_f32();
    let dot = |row: usize| (0..4).map(|j| h[row * 4 + j] * weight[j]).sum::<f32>();
    assert!(
        (s[0] - dot(1)).abs() < 1e-5 && (s[1] - dot(9)).abs() < 1e-5,
        "{s:?}"
    );
    assert!(score.forward(&w, &hidden, &[0, 5]).is_err());
    let logits = classify.forward(
        &w,
        &hidden.narrow(1, 0, 1).unwrap().reshape(&[2, 4]).unwrap(),
    );
    assert_eq!(logits.unwrap().shape(), &[2, 3]);
}
