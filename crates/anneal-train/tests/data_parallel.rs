//! Data parallelism on the local backend equals single-device training at the same global
//! batch: the GPT trained for 10 steps on 2 and on 4 ranks (each rank a share of the batch)
//! against one device on the whole batch; every step's loss within 1e-5 relative, every final
//! parameter within rtol 1e-5 + atol 1e-6, and the replicas bitwise identical to one another;
//! ZeRO-1 (optimizer state sharded) and ZeRO-2 (gradients too) equal to plain data parallelism
//! bit for bit.

use anneal_data::{Batch, TokenWindows};
use anneal_dist::{local, Communicator};
use anneal_nn::{Gpt, GptConfig};
use anneal_tensor::optim::{AdamW, AdamWConfig};
use anneal_tensor::Optimizer;
use anneal_train::objectives::CausalLm;
use anneal_train::strategy::{
    DataParallel, SingleDevice, StepSettings, Strategy, ZeroOne, ZeroTwo,
};

const BATCH: usize = 8;
const SEQ: usize = 8;
const STEPS: u64 = 10;

fn model() -> Gpt {
    let config = GptConfig {
        vocab_size: 13,
        block_size: SEQ,
        n_layer: 2,
        n_head: 2,
        n_embd: 16,
        dropout: 0.0,
        // Without biases: the key bias cannot change a softmax, so its true gradient is zero and
        // any computation's is rounding noise, which Adam turns into steps of ±lr.
        bias: false,
        ..GptConfig::gpt2()
    };
    Gpt::new(config, 5).unwrap()
}

/// Rows `rows` of step `step`'s global batch: windows of a fixed pseudo-random token stream.
fn batch(step: u64, rows: std::ops::Range<usize>) -> Batch {
    let token = |i: u64| ((i * 7 + i / 5 * 3) % 13) as u32;
    let (mut ids, mut targets) = (Vec::new(), Vec::new());
    for row in rows.clone() {
        let start = step * 97 + row as u64 * 31;
        ids.extend((start..start + SEQ as u64).map(token));
        targets.extend((start + 1..start + 1 + SEQ as u64).map(|i| token(i) as i64));
    }
    Batch::Tokens(TokenWindows {
        ids,
        targets,
        batch: rows.len(),
        seq: SEQ,
    })
}

/// Losses of every step and the final parameters.
type Trained = (Vec<f64>, Vec<f32>);

/// Trains with `strategy` on the rows of `rows`, returning the losses and final parameters.
fn train(strategy: Box<dyn Strategy>, rows: std::ops::Range<usize>) -> anyhow::Result<Trained> {
    train_micro(strategy, rows, 1)
}

/// [`train`] with the rows cut into `micro` micro-batches (gradient accumulation).
fn train_micro(
    strategy: Box<dyn Strategy>,
    rows: std::ops::Range<usize>,
    micro: usize,
) -> anyhow::Result<Trained> {
    train_with(rows, micro, |gpt| {
        let opt = AdamW::new(&gpt.params, AdamWConfig::DEFAULT);
        (strategy, Box::new(opt))
    })
}

/// Trains with the strategy and optimizer `make` builds for the model.
fn train_with(
    rows: std::ops::Range<usize>,
    micro: usize,
    make: impl FnOnce(&Gpt) -> (Box<dyn Strategy>, Box<dyn Optimizer>),
) -> anyhow::Result<Trained> {
    let gpt = model();
    let (mut strategy, mut optimizer) = make(&gpt);
    let mut objective = CausalLm;
    let settings = StepSettings {
        lr: 1e-2,
        // Low enough that every step clips: the sharded norm must equal the whole one.
        grad_clip: 0.05,
        measure_grad_norm: false,
    };
    let mut losses = Vec::new();
    let mut clipped = 0;
    let per = rows.len() / micro;
    for step in 0..STEPS {
        let batches: Vec<Batch> = (0..micro)
            .map(|m| batch(step, rows.start + m * per..rows.start + (m + 1) * per))
            .collect();
        let seeds: Vec<u64> = (0..micro as u64).map(|m| step * 100 + m).collect();
        let out = strategy.step(
            &gpt,
            &mut objective,
            optimizer.as_mut(),
            &batches,
            &seeds,
            settings,
            &mut || {},
        )?;
        losses.push(out.loss);
        clipped += usize::from(out.grad_norm > 0.05);
    }
    assert_eq!(clipped, STEPS as usize, "every step clipped");
    let params = gpt
        .params
        .named()
        .iter()
        .flat_map(|(_, t)| t.to_vec_f32())
        .collect();
    Ok((losses, params))
}

#[test]
fn data_parallel_equals_one_device_at_the_same_global_batch() {
    let (want_losses, want_params) = train(Box::new(SingleDevice), 0..BATCH).unwrap();
    assert!(
        want_losses[STEPS as usize - 1] < want_losses[0],
        "{want_losses:?}"
    );
    for ranks in [2, 4] {
        let per_rank = BATCH / ranks;
        let replicas = local::run(ranks, |comm| {
            let rows = comm.rank() * per_rank..(comm.rank() + 1) * per_rank;
            train(Box::new(DataParallel::new(Box::new(comm), 1 << 10)), rows)
        })
        .unwrap();
        for (rank, (losses, params)) in replicas.iter().enumerate() {
            for (step, (got, want)) in losses.iter().zip(&want_losses).enumerate() {
                let rel = (got - want).abs() / want.abs();
                assert!(
                    rel <= 1e-5,
                    "{ranks} ranks, rank {rank}, step {step}: {got} vs {want}"
                );
            }
            for (i, (g, w)) in params.iter().zip(&want_params).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-6 + 1e-5 * w.abs(),
                    "{ranks} ranks, rank {rank}, parameter element {i}: {g} vs {w}"
                );
            }
            assert_eq!(
                params.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                replicas[0]
                    .1
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                "replicas stay bitwise identical"
            );
        }
    }
}

#[test]
fn accumulating_micro_batches_on_every_rank_equals_one_batch_on_one_device() {
    // 2 ranks × 2 micro-batches × 2 rows against 1 device × 1 batch × 8 rows (every window has
    // the same number of tokens, so the mean of micro-batch means is the global mean).
    let (want_losses, want_params) = train(Box::new(SingleDevice), 0..BATCH).unwrap();
    let replicas = local::run(2, |comm| {
        let rows = comm.rank() * 4..(comm.rank() + 1) * 4;
        train_micro(
            Box::new(DataParallel::new(Box::new(comm), 1 << 12)),
            rows,
            2,
        )
    })
    .unwrap();
    for (losses, params) in &replicas {
        for (got, want) in losses.iter().zip(&want_losses) {
            assert!((got - want).abs() <= 1e-5 * want.abs(), "{got} vs {want}");
        }
        for (g, w) in params.iter().zip(&want_params) {
            assert!((g - w).abs() <= 1e-6 + 1e-5 * w.abs(), "{g} vs {w}");
        }
    }
}

#[test]
fn hybrid_sharding_equals_one_device_and_refuses_a_wrong_layout() {
    // dp 2 × sharding 2: each of the 4 ranks runs 2 rows of the batch of 8.
    let (want_losses, want_params) = train(Box::new(SingleDevice), 0..BATCH).unwrap();
    let replicas = local::run(4, |comm| {
        let rows = comm.rank() * 2..(comm.rank() + 1) * 2;
        let (shards, replicas) = anneal_dist::hybrid_groups(&comm, 2, 2)?;
        train_with(rows, 1, |gpt| {
            let zero = ZeroTwo::hybrid(shards, replicas);
            let shard = zero.shard(gpt);
            let opt = AdamW::shard(&gpt.params, AdamWConfig::DEFAULT, shard).unwrap();
            (
                Box::new(zero) as Box<dyn Strategy>,
                Box::new(opt) as Box<dyn Optimizer>,
            )
        })
    })
    .unwrap();
    for (losses, params) in &replicas {
        for (got, want) in losses.iter().zip(&want_losses) {
            assert!((got - want).abs() <= 1e-5 * want.abs(), "{got} vs {want}");
        }
        for (g, w) in params.iter().zip(&want_params) {
            assert!((g - w).abs() <= 1e-6 + 1e-5 * w.abs(), "{g} vs {w}");
        }
        assert!(params == &replicas[0].1, "every rank holds the same model");
    }
    let err = local::run(4, |comm| {
        anneal_dist::hybrid_groups(&comm, 3, 2).map(|_| ())
    })
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("dp = 3 × sharding = 2 must equal the 4 ranks"),
        "{err}"
    );
}

#[test]
fn a_failing_rank_ends_data_parallel_training_on_every_rank() {
    let err = local::run(2, |comm| {
        if comm.rank() == 1 {
            anyhow::bail!("rank 1 ran out of memory");
        }
        train(Box::new(DataParallel::new(Box::new(comm), 1 << 20)), 0..4)
    })
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("rank 1 failed: rank 1 ran out of memory"),
        "{err}"
    );
}

#[test]
fn zero_one_and_two_equal_data_parallel_bitwise() {
    for ranks in [2, 4] {
        let per_rank = BATCH / ranks;
        let rows = |rank: usize| rank * per_rank..(rank + 1) * per_rank;
        let plain = local::run(ranks, |comm| {
            let r = rows(comm.rank());
            train(Box::new(DataParallel::new(Box::new(comm), 1 << 12)), r)
        })
        .unwrap();
        let bits = |t: &Trained| {
            (
                t.0.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
                t.1.iter().map(|p| p.to_bits()).collect::<Vec<_>>(),
            )
        };
        for stage in [1, 2] {
            let sharded = local::run(ranks, |comm| {
                let r = rows(comm.rank());
                train_with(r, 1, |gpt| {
                    let (strategy, shard): (Box<dyn Strategy>, _) = if stage == 1 {
                        let zero = ZeroOne::new(Box::new(comm), 1 << 12);
                        let shard = zero.shard(gpt);
                        (Box::new(zero), shard)
                    } else {
                        let zero = ZeroTwo::new(Box::new(comm));
                        let shard = zero.shard(gpt);
                        (Box::new(zero), shard)
                    };
                    let all = gpt.params.trainable_numel();
                    assert!(
                        shard.len() < all,
                        "each rank holds a part: {shard:?} of {all}"
                    );
                    let opt =
                        AdamW::shard(&gpt.params, AdamWConfig::DEFAULT, shard.clone()).unwrap();
                    assert_eq!(
                        opt.state_bytes(),
                        8 * shard.len(),
                        "moments of the shard only"
                    );
                    (strategy, Box::new(opt) as Box<dyn Optimizer>)
                })
            })
            .unwrap();
            for (rank, (p, z)) in plain.iter().zip(&sharded).enumerate() {
                assert!(
                    bits(p) == bits(z),
                    "{ranks} ranks, rank {rank}: ZeRO-{stage} differs from data parallel"
                );
            }
        }
    }
}
