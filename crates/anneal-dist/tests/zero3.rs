//! ZeRO-3 against one device, on the `local` backend: a GPT whose parameters are sharded over 2
//! and 3 ranks (shards padded where the ranks do not divide a parameter) gives the single-device
//! loss, and each rank's shard of every gradient is its slice of the single-device gradient
//! (averaged over ranks that ran the same batch); from the second step on, every lookup but the
//! first finds its gather started ahead.

use anneal_dist::{local, Communicator, ZeroThree};
use anneal_nn::layers::ParallelContext;
use anneal_nn::{Gpt, GptConfig};
use anneal_tensor::DropoutKey;
use std::sync::Arc;

fn config(checkpoint_blocks: bool) -> GptConfig {
    GptConfig {
        vocab_size: 13,
        block_size: 8,
        n_layer: 2,
        n_head: 2,
        n_embd: 10,
        dropout: 0.1,
        checkpoint_blocks,
        ..GptConfig::gpt2()
    }
}

fn batch() -> (Vec<u32>, Vec<i64>) {
    let ids = (0..12).map(|i| (i * 5 % 13) as u32).collect();
    let targets = (0..12).map(|i| (i * 7 % 13) as i64).collect();
    (ids, targets)
}

/// The loss and every parameter's whole gradient after one forward and backward.
fn one_device(checkpoint_blocks: bool) -> (f32, Vec<Vec<f32>>) {
    let model = Gpt::new(config(checkpoint_blocks), 5).unwrap();
    let (ids, targets) = batch();
    let key = Some(DropoutKey::from(3));
    let loss = model.loss(&ids, &targets, 2, 6, key).unwrap();
    loss.backward().unwrap();
    let grads = model
        .params
        .infos()
        .iter()
        .map(|i| {
            model
                .params
                .by_name(&i.name)
                .unwrap()
                .grad()
                .unwrap()
                .to_vec_f32()
        })
        .collect();
    (loss.item().unwrap(), grads)
}

fn check(ranks: usize, checkpoint_blocks: bool) {
    let (want_loss, want) = one_device(checkpoint_blocks);
    let results = local::run(ranks, |comm| {
        let group: Arc<dyn Communicator> = Arc::new(comm);
        let zero = Arc::new(ZeroThree::new(group.clone()));
        let model =
            Gpt::new_in(config(checkpoint_blocks), 5, zero.clone()).map_err(|e| e.to_string())?;
        let (ids, targets) = batch();
        let mut losses = Vec::new();
        for _ in 0..2 {
            model.params.zero_grad();
            zero.begin_step(model.params.tensors())
                .map_err(|e| e.to_string())?;
            let loss = model
                .loss(&ids, &targets, 2, 6, Some(DropoutKey::from(3)))
                .map_err(|e| e.to_string())?;
            loss.backward().map_err(|e| e.to_string())?;
            zero.end_step().map_err(|e| e.to_string())?;
            losses.push(loss.item().map_err(|e| e.to_string())?);
        }
        let grads: Vec<Vec<f32>> = model
            .params
            .infos()
            .iter()
            .map(|i| {
                let g = model.params.by_name(&i.name).unwrap().grad().unwrap();
                zero.gather(&i.name, &g).unwrap().to_vec_f32()
            })
            .collect();
        Ok::<_, String>((losses, grads, zero.prefetched()))
    })
    .unwrap();
    for (rank, (losses, grads, (lookups, hits))) in results.iter().enumerate() {
        let what = format!("{ranks} ranks, rank {rank}, recomputed {checkpoint_blocks}");
        for l in losses {
            assert!(
                (l - want_loss).abs() <= 1e-6 * want_loss.abs(),
                "{what}: loss {l} vs {want_loss}"
            );
        }
        for (g, w) in grads.iter().zip(&want) {
            assert_eq!(g.len(), w.len(), "{what}");
            let scale = w.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
            for (a, b) in g.iter().zip(w) {
                assert!((a - b).abs() <= 1e-5 * scale, "{what}: gradient {a} vs {b}");
            }
        }
        // Each step looks the same parameters up in the same order: the second step's lookups
        // but its first were started ahead.
        assert_eq!(lookups % 2, 0, "{what}");
        assert_eq!(
            *hits,
            lookups / 2 - 1,
            "{what}: {hits} of {lookups} lookups prefetched"
        );
    }
}

#[test]
fn a_gpt_sharded_over_two_ranks_equals_one_device() {
    check(2, false);
    check(2, true);
}

#[test]
fn shards_padded_over_three_ranks_equal_one_device() {
    check(3, false);
}

/// Without recomputation a layer's gathered parameters are freed when the layer ends (while
/// autograd still holds them for backward) and gathered again at that point of backward: the
/// value is released after `end_layer`, whole again after backward, and the gradient through it
/// is the one-device gradient.
#[test]
fn a_layers_gathered_parameters_are_freed_at_its_end_and_gathered_again_for_backward() {
    let name = "transformer.h.0.attn.c_attn.weight";
    let whole = Gpt::new(config(false), 5).unwrap();
    let w_whole = whole.params.by_name(name).unwrap().to_vec_f32();
    let results = local::run(2, |comm| {
        let group: Arc<dyn Communicator> = Arc::new(comm);
        let zero = Arc::new(ZeroThree::new(group));
        let model = Gpt::new_in(config(false), 5, zero.clone()).map_err(|e| e.to_string())?;
        let id = model.params.id(name).map_err(|e| e.to_string())?;
        zero.begin_step(model.params.tensors())
            .map_err(|e| e.to_string())?;
        let w = zero
            .lookup(id, model.params.get(id))
            .map_err(|e| e.to_string())?;
        let x =
            anneal_tensor::Tensor::from_f32((0..20).map(|i| i as f32 / 7.0).collect(), &[2, 10])
                .map_err(|e| e.to_string())?
                .requires_grad_();
        let h = x.linear(&w, None).map_err(|e| e.to_string())?;
        let out = zero.end_layer(&h).map_err(|e| e.to_string())?;
        let freed = w.storage().is_released();
        let live_freed = !w.storage().is_allocated();
        out.sum_all()
            .and_then(|s| s.backward())
            .map_err(|e| e.to_string())?;
        let again = w.storage().is_released();
        zero.end_step().map_err(|e| e.to_string())?;
        let x_grad = x.grad().map(|g| g.to_vec_f32()).unwrap_or_default();
        Ok::<_, String>((freed, live_freed, again, w.to_vec_f32(), x_grad))
    })
    .unwrap();
    // One device, the same product with the whole parameter.
    let x = anneal_tensor::Tensor::from_f32((0..20).map(|i| i as f32 / 7.0).collect(), &[2, 10])
        .unwrap()
        .requires_grad_();
    let w = whole.params.by_name(name).unwrap().detach();
    x.linear(&w, None)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let want = x.grad().unwrap().to_vec_f32();
    for (rank, (freed, live_freed, again, w, x_grad)) in results.into_iter().enumerate() {
        assert!(freed && live_freed, "rank {rank}: freed at the layer's end");
        assert!(!again, "rank {rank}: gathered again for backward");
        assert_eq!(w, w_whole, "rank {rank}: the whole parameter again");
        for (g, e) in x_grad.iter().zip(&want) {
            assert!(
                (g - e).abs() <= 1e-5 * e.abs().max(1.0),
                "rank {rank}: {g} vs {e}"
            );
        }
        assert_eq!(x_grad.len(), want.len());
    }
}
