//! A run's numbers depend on its seed alone: every gradient sum split across threads (LayerNorm
//! and linear-bias gradients, the global gradient norm) adds fixed-size chunks in index order, so
//! neither work stealing nor the thread count changes a bit of the loss.
//!
//! The model is the Shakespeare recipe's shape (4 layers, 4 heads, width 128, context 64, batch
//! 12, biases on so that linear-bias sums run too): 768 rows, 24 row-chunks per LayerNorm
//! reduction. The matrix products (`gemm`) split their output across threads, never the inner
//! dimension, so they too give the same bits on 1 and 2 threads.

use anneal_nn::{Gpt, GptConfig};
use anneal_tensor::optim::{AdamW, AdamWConfig};
use anneal_tensor::{Optimizer, Rng};

const STEPS: usize = 50;

fn losses(threads: usize) -> Vec<u32> {
    anneal_tensor::with_threads(threads, || {
        let config = GptConfig {
            vocab_size: 65,
            block_size: 64,
            n_layer: 4,
            n_head: 4,
            n_embd: 128,
            bias: true,
            ..GptConfig::gpt2()
        };
        let (batch, seq) = (12, 64);
        let model = Gpt::new(config, 1337).unwrap();
        let mut opt = AdamW::new(&model.params, AdamWConfig::default());
        // A corpus with structure to learn: a noisy repeating pattern.
        let mut rng = Rng::new(7);
        let corpus: Vec<u32> = (0..20_000)
            .map(|i| {
                if rng.uniform() < 0.2 {
                    (rng.next_u64() % 65) as u32
                } else {
                    (i * 7 % 65) as u32
                }
            })
            .collect();
        let mut out = Vec::with_capacity(STEPS);
        for _ in 0..STEPS {
            let (mut ids, mut targets) = (Vec::new(), Vec::new());
            for _ in 0..batch {
                let at = (rng.next_u64() % (corpus.len() - seq - 1) as u64) as usize;
                ids.extend_from_slice(&corpus[at..at + seq]);
                targets.extend(corpus[at + 1..at + seq + 1].iter().map(|&t| t as i64));
            }
            model.params.zero_grad();
            let loss = model.loss(&ids, &targets, batch, seq, None).unwrap();
            loss.backward().unwrap();
            model.params.clip_grad_norm(1.0);
            opt.step(&model.params, 1e-3);
            out.push(loss.item().unwrap().to_bits());
        }
        out
    })
    .unwrap()
}

#[test]
fn fifty_steps_repeat_bit_for_bit_on_any_thread_count() {
    let first = losses(2);
    assert_eq!(first.len(), STEPS);
    assert!(
        f32::from_bits(first[STEPS - 1]) < f32::from_bits(first[0]),
        "the model learned nothing: {} -> {}",
        f32::from_bits(first[0]),
        f32::from_bits(first[STEPS - 1])
    );
    assert_eq!(first, losses(2), "two runs on 2 threads differ");
    assert_eq!(first, losses(1), "1 thread differs from 2");
}
