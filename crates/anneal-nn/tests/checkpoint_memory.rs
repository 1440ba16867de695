//! Activation checkpointing changes no gradient and lowers peak memory. Alone in its own test
//! binary because it reads the process-wide tensor memory counters.

use anneal_nn::{Gpt, GptConfig};
use anneal_tensor::{memory_stats, reset_peak_memory};

#[test]
fn checkpointing_blocks_keeps_gradients_and_lowers_peak_memory() {
    let config = GptConfig {
        vocab_size: 128,
        block_size: 64,
        n_layer: 4,
        n_head: 4,
        n_embd: 64,
        dropout: 0.1,
        ..GptConfig::gpt2()
    };
    let ids: Vec<u32> = (0..4 * 64).map(|i| (i * 31 % 128) as u32).collect();
    let targets: Vec<i64> = ids.iter().map(|&i| ((i + 1) % 128) as i64).collect();
    let run = |checkpoint_blocks: bool| {
        let m = Gpt::new(
            GptConfig {
                checkpoint_blocks,
                ..config.clone()
            },
            3,
        )
        .unwrap();
        reset_peak_memory();
        let before = memory_stats().live_bytes;
        let loss = m.loss(&ids, &targets, 4, 64, Some(11.into())).unwrap();
        loss.backward().unwrap();
        let peak = memory_stats().peak_bytes - before;
        (m.params.grads_to_vec(), peak)
    };
    let (plain, plain_peak) = run(false);
    let (ckpt, ckpt_peak) = run(true);
    assert_eq!(plain, ckpt, "checkpointing changed a gradient");
    assert!(
        (ckpt_peak as f64) < 0.75 * plain_peak as f64,
        "peak activation memory {ckpt_peak} B with checkpointing vs {plain_peak} B without"
    );
    println!("peak above parameters: {plain_peak} B plain, {ckpt_peak} B checkpointed");
}
