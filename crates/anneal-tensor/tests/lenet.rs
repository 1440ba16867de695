//! LeNet-5 (LeCun et al. 1998) written with the engine's ops, trained for a few steps to memorise a
//! small batch: shows conv2d, pooling, linear, activations and cross-entropy compose and train.

use anneal_tensor::optim::{AdamW, AdamWConfig};
use anneal_tensor::Optimizer;
use anneal_tensor::{CrossEntropyOptions, DType, ParamStoreBuilder, Result, Rng, Tensor};

#[test]
fn lenet5_learns_a_small_batch() -> Result<()> {
    let mut rng = Rng::new(0);
    let mut b = ParamStoreBuilder::new();
    let mut p = |name: &str, shape: &[usize], fan_in: usize| {
        let std = (2.0 / fan_in as f32).sqrt();
        b.add(
            name,
            &Tensor::randn(shape, std, DType::F32, &mut rng),
            shape.len() > 1,
        )
    };
    let c1 = p("c1.weight", &[6, 1, 5, 5], 25)?;
    let c1b = p("c1.bias", &[6], 1_000_000)?;
    let c3 = p("c3.weight", &[16, 6, 5, 5], 150)?;
    let c3b = p("c3.bias", &[16], 1_000_000)?;
    let f5 = p("f5.weight", &[400, 120], 400)?;
    let f5b = p("f5.bias", &[120], 1_000_000)?;
    let f6 = p("f6.weight", &[120, 84], 120)?;
    let f6b = p("f6.bias", &[84], 1_000_000)?;
    let out = p("out.weight", &[84, 10], 84)?;
    let outb = p("out.bias", &[10], 1_000_000)?;
    let params = b.build(DType::F32);
    let g = |id| params.get(id);

    let n = 8;
    let images = Tensor::randn(&[n, 1, 28, 28], 1.0, DType::F32, &mut rng);
    let labels: Vec<i64> = (0..n as i64).map(|i| i % 10).collect();
    let forward = || -> Result<Tensor> {
        let x = images
            .conv2d(g(c1), Some(g(c1b)), 1, 2)?
            .relu()
            .max_pool2d(2, 2)?; // 6×14×14
        let x = x
            .conv2d(g(c3), Some(g(c3b)), 1, 0)?
            .relu()
            .avg_pool2d(2, 2)?; // 16×5×5
        let x = x.reshape(&[n, 400])?;
        let x = x.linear(g(f5), Some(g(f5b)))?.relu();
        let x = x.linear(g(f6), Some(g(f6b)))?.relu();
        x.linear(g(out), Some(g(outb)))
    };
    let mut opt = AdamW::new(&params, AdamWConfig::default());
    let first = forward()?
        .cross_entropy(&labels, CrossEntropyOptions::default())?
        .item()?;
    let mut last = first;
    for _ in 0..40 {
        params.zero_grad();
        let loss = forward()?.cross_entropy(&labels, CrossEntropyOptions::default())?;
        loss.backward()?;
        opt.step(&params, 3e-3);
        last = loss.item()?;
    }
    assert!(last < 0.1 * first, "loss {first} -> {last}");
    Ok(())
}
