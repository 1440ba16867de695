//! A store whose gradients are sharded (ZeRO-2) holds its shard, and each bucket of gradients
//! only from the first gradient backward writes into it until it is taken or released; the
//! gradients themselves are the flat layout's. Alone in its binary: it reads the process-wide
//! gradient memory counters.

use anneal_tensor::testing::randn;
use anneal_tensor::{memory_stats, DType, GradientBytes, ParamStore, ParamStoreBuilder, Tensor};

/// Three parameters of 1000, 24 and 2000 elements, and a loss that uses all of them.
fn store() -> ParamStore {
    let mut b = ParamStoreBuilder::new();
    b.add("a", &randn(&[10, 100], 1), true).unwrap();
    b.add("b", &randn(&[24], 2), false).unwrap();
    b.add("c", &randn(&[2000], 3), true).unwrap();
    b.build(DType::F32)
}

fn backward(s: &ParamStore) {
    let t = s.tensors();
    let a = t[0].mul(&t[0]).unwrap().sum_all().unwrap();
    let b = t[1].mul(&t[1]).unwrap().sum_all().unwrap();
    let c = t[2].gelu_tanh().sum_all().unwrap();
    a.add(&b).unwrap().add(&c).unwrap().backward().unwrap();
}

fn grad_bytes() -> usize {
    memory_stats().grad_live_bytes
}

#[test]
fn sharded_gradients_hold_the_shard_and_the_buckets_backward_is_filling() {
    let flat = store();
    backward(&flat);
    let want = flat.grads_to_vec();

    let base = grad_bytes();
    let mut s = store();
    assert_eq!(
        grad_bytes() - base,
        4 * 3024,
        "a flat store holds every gradient"
    );
    // Buckets of at least 1024 elements, filled in reverse order: [c], [b, a].
    s.shard_gradients(1024..2048, 1024).unwrap();
    assert_eq!(grad_bytes() - base, 4 * 1024, "only the shard is held");
    let buckets = s.gradient_buckets().to_vec();
    assert_eq!(
        buckets.iter().map(|b| b.range.clone()).collect::<Vec<_>>(),
        [1024..3024, 0..1024]
    );
    assert_eq!(s.held_grads(), 1024..2048);

    backward(&s);
    assert_eq!(
        grad_bytes() - base,
        4 * (1024 + 3024),
        "backward filled both buckets"
    );
    // Each bucket holds the flat layout's gradients for its range; the shard is untouched.
    let mut filled = 3024;
    for b in &buckets {
        let storage = b.storage.as_ref().unwrap();
        let got = storage.take_f32().unwrap();
        assert_eq!(got, want[b.range.clone()]);
        let in_flight = GradientBytes::hold(4 * got.len());
        assert!(!storage.is_allocated());
        assert_eq!(
            grad_bytes() - base,
            4 * (1024 + filled),
            "a bucket in flight is still counted"
        );
        drop(in_flight);
        filled -= b.range.len();
    }
    assert_eq!(grad_bytes() - base, 4 * 1024);
    assert!(s.grads_to_vec().iter().all(|&g| g == 0.0));

    // The gradient methods work on the shard; the optimizer must be sharded alike.
    s.with_grads_mut(|g| g.fill(2.0));
    assert_eq!(s.grad_norm(), (1024.0f32 * 4.0).sqrt());
    s.scale_grads(1024..2048, 0.5);
    assert_eq!(s.grads_to_vec()[0], 1.0);
    let whole = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        s.grad_norm_partials(0..1024)
    }));
    assert!(whole.is_err(), "gradients outside the shard are refused");
    let c = s.id("c").unwrap();
    let err = s
        .set_grad(c, &Tensor::zeros(&[2000], DType::F32))
        .unwrap_err();
    assert!(err.to_string().contains("shard"), "{err}");

    // A second backward fills the buckets again; zero_grad gives their memory back.
    backward(&s);
    assert_eq!(grad_bytes() - base, 4 * (1024 + 3024));
    s.zero_grad();
    assert_eq!(grad_bytes() - base, 4 * 1024);
    assert!(s.grads_to_vec().iter().all(|&g| g == 0.0));

    // Freezing lays the gradients out flat again.
    s.set_requires_grad(s.id("b").unwrap(), false);
    assert!(s.gradient_buckets().is_empty());
    assert_eq!(s.held_grads(), 0..3000);
    drop(s);
    drop(flat);
    assert_eq!(grad_bytes(), base - 4 * 3024);
}
