//! Checkpoints are the same whatever the layout that wrote them, so a run moves between layouts:
//! a data-parallel run of 20 steps resumed on one device trains the next 20 steps as the
//! uninterrupted run does (losses within 1e-4 relative), and a checkpoint saved under ZeRO-2 on
//! 4 ranks, loaded under hybrid ZeRO-1 (2 replicas × 2) and saved, then loaded under ZeRO-2 again
//! and saved, holds parameters and optimizer state bitwise equal to the original (the round trip
//! of DeepSpeed's universal-checkpoint test). The round trip reads each checkpoint on rank 0 only
//! and hands it to the others (`Trainer::restore_shared`); training on from it matches every rank
//! reading it (`Trainer::restore`). A data-parallel checkpoint resumes under tensor parallelism,
//! under tensor × pipeline parallelism (each rank keeping its slices of its stage) and under
//! ZeRO-3 (each keeping its shards), and trains on as the uninterrupted single-device run; saved
//! again from the slices it is the checkpoint it was, bit for bit. So does a Mixture-of-Experts
//! GPT's, with its experts split inside the mesh (ep × tp, ep × pp); and on 8 ranks, ZeRO-1
//! beside experts split in a pipeline trains as one device and gathers its checkpoint whole.

use std::path::{Path, PathBuf};

use anneal_dist::{local, Communicator};
use anneal_train::checkpoint::{self, TrainerState};
use anneal_train::trainer::Trainer;
use anneal_train::RunConfig;

mod common;

use common::{tiny_config, tiny_state, tiny_trainer};

/// A tiny GPT's run config under the layout `parallel` (`section.key=value` settings).
fn config(parallel: &[&str]) -> RunConfig {
    let base = [
        "train.batch_size=8",
        "train.max_steps=40",
        "train.warmup_steps=5",
        "train.lr=1e-2",
    ];
    tiny_config(&base, parallel)
}

fn trainer(config: &RunConfig, world: Option<Box<dyn anneal_dist::Communicator>>) -> Trainer {
    tiny_trainer(config, world)
}

fn state(config: &RunConfig) -> TrainerState {
    tiny_state(config)
}

/// Runs `f` on every rank of a `ranks`-rank job under `layout`, each with its trainer, and returns
/// rank 0's result.
fn on_ranks<T: Send>(
    ranks: usize,
    layout: &[&str],
    f: impl Fn(&mut Trainer, &dyn Communicator) -> anyhow::Result<T> + Sync,
) -> T {
    let config = config(layout);
    let mut results = local::run(ranks, |comm| {
        // A copy of the world for the test's own collectives; the trainer takes the world.
        let group = comm.split(0, comm.rank()).map_err(|e| e.to_string())?;
        let mut t = trainer(&config, Some(Box::new(comm)));
        f(&mut t, group.as_ref()).map_err(|e| format!("{e:#}"))
    })
    .unwrap();
    results.swap_remove(0)
}

/// A Mixture-of-Experts GPT's settings (4 experts, top-2, in every block), then `extra`.
fn with_moe(extra: &[&'static str]) -> Vec<&'static str> {
    [
        "model.moe.experts=4",
        "model.moe.top_k=2",
        "model.moe.every=1",
        "model.moe.d_ff=32",
    ]
    .into_iter()
    .chain(extra.iter().copied())
    .collect()
}

/// Trains `steps` steps, returning their losses.
fn train(t: &mut Trainer, steps: u64) -> anyhow::Result<Vec<f64>> {
    (0..steps).map(|_| Ok(t.step()?.loss)).collect()
}

/// Loads the checkpoint in `from`, then saves it under `root`; returns rank 0's path.
fn reshard(
    t: &mut Trainer,
    from: &Path,
    root: &Path,
    config: &RunConfig,
    group: &dyn Communicator,
) -> anyhow::Result<Option<PathBuf>> {
    // Only rank 0 reads the checkpoint; the others receive it.
    let loaded = match group.rank() {
        0 => Some(checkpoint::load(from)?),
        _ => None,
    };
    t.restore_shared(loaded.as_ref(), group)?;
    // Every rank now holds rank 0's parameters and step.
    let params: Vec<f32> = t
        .model()
        .params()
        .named()
        .iter()
        .flat_map(|(_, p)| p.to_vec_f32())
        .chain([t.steps() as f32])
        .collect();
    let all = group.all_gather(params.clone())?;
    for (r, theirs) in all.chunks(params.len()).enumerate() {
        anyhow::ensure!(
            theirs
                .iter()
                .zip(&params)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "rank {r} restored other parameters than rank {}",
            group.rank()
        );
    }
    t.save(root, state(config))
}

#[test]
fn a_data_parallel_run_resumes_on_one_device() {
    let one = config(&[]);
    let mut whole = trainer(&one, None);
    let want = train(&mut whole, 40).unwrap();
    assert!(want[39] < want[0] * 0.8, "{want:?}");

    let root = tempfile::tempdir().unwrap();
    let dp = config(&["parallel.dp=2"]);
    let (first, saved) = on_ranks(2, &["parallel.dp=2"], |t, _| {
        let losses = train(t, 20)?;
        Ok((losses, t.save(root.path(), state(&dp))?))
    });
    let saved = saved.expect("rank 0 writes the checkpoint");
    let mut resumed = trainer(&one, None);
    resumed.restore(&checkpoint::load(&saved).unwrap()).unwrap();
    assert_eq!(resumed.steps(), 20);
    let second = train(&mut resumed, 20).unwrap();
    for (step, (got, want)) in first.iter().chain(&second).zip(&want).enumerate() {
        assert!(
            (got - want).abs() <= 1e-4 * want.abs(),
            "step {}: {got} against {want}",
            step + 1
        );
    }
}

#[test]
fn checkpoints_reshard_across_layouts_bit_for_bit() {
    let root = tempfile::tempdir().unwrap();
    let zero2 = ["parallel.zero=2"];
    let hybrid = ["parallel.zero=1", "parallel.dp=2", "parallel.sharding=2"];
    let (a_config, b_config) = (config(&zero2), config(&hybrid));
    let a = on_ranks(4, &zero2, |t, _| {
        train(t, 3)?;
        t.save(&root.path().join("a"), state(&a_config))
    })
    .unwrap();
    let b = on_ranks(4, &hybrid, |t, g| {
        reshard(t, &a, &root.path().join("b"), &b_config, g)
    })
    .unwrap();
    let a2 = on_ranks(4, &zero2, |t, g| {
        reshard(t, &b, &root.path().join("a2"), &a_config, g)
    })
    .unwrap();
    let original = checkpoint::load(&a).unwrap();
    assert!(original.optimizer.contains_key("adam.m"));
    for dir in [&b, &a2] {
        let back = checkpoint::load(dir).unwrap();
        assert_eq!(back.state.step, 3);
        assert_same_state(&dir.display().to_string(), &original, &back);
    }
    // And training goes on from the round trip as from the original.
    let go_on = |from: &Path| {
        on_ranks(4, &zero2, |t, _| {
            t.restore(&checkpoint::load(from)?)?;
            train(t, 2)
        })
    };
    assert_eq!(go_on(&a), go_on(&a2));
}

#[test]
fn a_data_parallel_checkpoint_resumes_split_across_ranks() {
    let one = config(&[]);
    let mut whole = trainer(&one, None);
    let want = train(&mut whole, 40).unwrap();

    let root = tempfile::tempdir().unwrap();
    let dp = config(&["parallel.dp=2"]);
    let (first, saved) = on_ranks(2, &["parallel.dp=2"], |t, _| {
        let losses = train(t, 20)?;
        Ok((losses, t.save(&root.path().join("dp"), state(&dp))?))
    });
    let saved = saved.expect("rank 0 writes the checkpoint");
    let continues = |what: &str, from: usize, got: &[f64]| {
        for (step, (got, want)) in got.iter().zip(&want[from..]).enumerate() {
            assert!(
                (got - want).abs() <= 1e-4 * want.abs(),
                "{what}, step {}: {got} against {want}",
                from + step + 1
            );
        }
    };
    continues("data parallel ×2", 0, &first);
    let original = checkpoint::load(&saved).unwrap();
    // The next 20 steps under tensor parallelism, tp 2 × pp 2 (1F1B, 2 micro-batches) and ZeRO-3
    // (each rank keeping its slices, its stage's or its shards); saved again at once, from the
    // parts, the checkpoint is the one it was.
    let layouts: [(&str, usize, &[&str]); 4] = [
        ("tp 2", 2, &["parallel.tp=2"]),
        ("ZeRO-3 ×2 × tp 2", 4, &["parallel.zero=3", "parallel.tp=2"]),
        (
            "tp 2 × pp 2",
            4,
            &["parallel.tp=2", "parallel.pp=2", "parallel.micro_batches=2"],
        ),
        ("ZeRO-3 ×2", 2, &["parallel.zero=3"]),
    ];
    for (i, (what, ranks, sets)) in layouts.into_iter().enumerate() {
        let split = config(sets);
        let (second, again) = on_ranks(ranks, sets, |t, g| {
            let loaded = match g.rank() {
                0 => Some(checkpoint::load(&saved)?),
                _ => None,
            };
            t.restore_shared(loaded.as_ref(), g)?;
            anyhow::ensure!(t.steps() == 20, "resumed at step {}", t.steps());
            let again = t.save(&root.path().join(i.to_string()), state(&split))?;
            Ok((train(t, 20)?, again))
        });
        continues(what, 20, &second);
        let back = checkpoint::load(&again.expect("rank 0 writes the checkpoint")).unwrap();
        assert_same_state(what, &original, &back);
    }
}

/// Fails unless checkpoints `want` and `got` hold bitwise the same parameters and optimizer
/// state.
fn assert_same_state(what: &str, want: &checkpoint::Loaded, got: &checkpoint::Loaded) {
    let bits = |t: &anneal_tensor::Tensor| -> Vec<u32> {
        t.to_vec_f32().iter().map(|v| v.to_bits()).collect()
    };
    for (part, want, got) in [
        ("parameters", &want.model, &got.model),
        ("optimizer state", &want.optimizer, &got.optimizer),
    ] {
        assert_eq!(want.len(), got.len(), "{what}: {part}");
        for (name, t) in want {
            assert_eq!(bits(t), bits(&got[name]), "{what}: {part} {name}");
        }
    }
}

#[test]
fn an_impossible_layout_is_refused_before_any_step() {
    let err = |ranks: usize, sets: &[&str]| -> String {
        format!("{:#}", config(sets).layout(ranks).expect_err("refused"))
    };
    let e = err(4, &["parallel.dp=3"]);
    assert!(e.contains("parallel.dp = 3") && e.contains("4 rank"), "{e}");
    let e = err(2, &["parallel.sharding=2"]);
    assert!(e.contains("parallel.zero"), "{e}");
    let e = err(3, &[]);
    assert!(e.contains("train.batch_size = 8") && e.contains("3"), "{e}");
    let e = err(2, &["parallel.zero=2", "model.dtype=bf16"]);
    assert!(e.contains("model.dtype"), "{e}");
    let e = err(4, &["parallel.dp=2"]);
    assert!(
        e.contains("parallel.dp = 2 of 4 ranks leaves sharding groups of 2")
            && e.contains("parallel.zero"),
        "{e}"
    );
    let e = err(4, &["parallel.zero=1", "parallel.dp=4"]);
    assert!(e.contains("shards nothing"), "{e}");
    // One rank: ZeRO has nothing to shard, and runs as one device.
    assert!(config(&["parallel.zero=2", "model.dtype=bf16"])
        .layout(1)
        .is_ok());
    let e = format!(
        "{:#}",
        RunConfig::load(None, &["parallel.zero=4".into()]).expect_err("refused")
    );
    assert!(
        e.contains("parallel.zero = 4") && e.contains("3 (parameters"),
        "{e}"
    );
    // Tensor parallelism: whole heads and hidden units per rank, a divisor of the job.
    let e = err(4, &["parallel.tp=3"]);
    assert!(e.contains("parallel.tp = 3") && e.contains("4 rank"), "{e}");
    let e = err(4, &["parallel.tp=4"]);
    assert!(
        e.contains("parallel.tp = 4") && e.contains("model.n_head = 2"),
        "{e}"
    );
    let e = err(4, &["parallel.tp=2", "parallel.zero=3", "parallel.dp=2"]);
    assert!(e.contains("parallel.zero = 3 with parallel.tp = 2"), "{e}");
    let e = err(
        4,
        &[
            "parallel.tp=2",
            "parallel.pp=2",
            "parallel.micro_batches=2",
            "parallel.zero=2",
        ],
    );
    assert!(
        e.contains("parallel.zero = 2 with parallel.tp = 2 and parallel.pp = 2"),
        "{e}"
    );
    assert!(config(&["parallel.tp=2", "parallel.zero=1"])
        .layout(4)
        .is_ok());
    let e = err(4, &["parallel.tp=2", "parallel.dp=4"]);
    assert!(
        e.contains("parallel.dp = 4") && e.contains("2 data ranks"),
        "{e}"
    );
    let layout = config(&["parallel.tp=2"]).layout(4).unwrap();
    assert_eq!((layout.dp, layout.tp, layout.ranks()), (2, 2, 4));
    // Pipelines: 1F1B needs a micro-batch per stage, stages cut the blocks.
    let e = err(4, &["parallel.pp=2"]);
    assert!(
        e.contains("1F1B needs at least one micro-batch per stage")
            && e.contains("parallel.micro_batches"),
        "{e}"
    );
    assert!(config(&["parallel.pp=2", "parallel.schedule=gpipe"])
        .layout(4)
        .is_ok());
    let e = err(
        4,
        &[
            "parallel.pp=2",
            "parallel.micro_batches=2",
            "parallel.pp_blocks=[2, 1]",
        ],
    );
    assert!(e.contains("parallel.pp_blocks = [2, 1]"), "{e}");
    let e = err(
        4,
        &[
            "parallel.pp=4",
            "parallel.micro_batches=4",
            "parallel.pp_blocks=[1, 0, 0, 1]",
        ],
    );
    assert!(e.contains("every stage but the first and last"), "{e}");
    let e = err(
        4,
        &[
            "parallel.pp=2",
            "parallel.micro_batches=2",
            "parallel.zero=2",
        ],
    );
    assert!(e.contains("parallel.zero = 2 with parallel.pp = 2"), "{e}");
    let e = err(4, &["parallel.pp=2", "parallel.micro_batches=3"]);
    assert!(e.contains("parallel.micro_batches = 3"), "{e}");
    // Hybrid ZeRO-3: two replicas, each sharded over two ranks.
    let hybrid = config(&["parallel.zero=3", "parallel.dp=2"])
        .layout(4)
        .unwrap();
    assert_eq!((hybrid.dp, hybrid.sharding), (2, 2));
    let e = err(
        4,
        &["parallel.tp=2", "parallel.pp=4", "parallel.micro_batches=4"],
    );
    assert!(e.contains("parallel.tp = 2 × parallel.pp = 4"), "{e}");
    let e = err(4, &["parallel.sequence_parallel=true"]);
    assert!(e.contains("parallel.tp > 1"), "{e}");
    // Expert parallelism: a Mixture of Experts whose experts and data ranks it divides.
    let e = err(4, &["parallel.ep=2"]);
    assert!(
        e.contains("parallel.ep = 2") && e.contains("[model.moe]"),
        "{e}"
    );
    let moe = ["model.moe.experts=6", "model.moe.every=1"];
    let e = err(4, &[moe[0], moe[1], "parallel.ep=4"]);
    assert!(e.contains("model.moe.experts = 6"), "{e}");
    let e = err(4, &[moe[0], moe[1], "parallel.ep=3"]);
    assert!(e.contains("4 data ranks"), "{e}");
    let e = err(4, &[moe[0], moe[1], "parallel.ep=2", "parallel.zero=2"]);
    assert!(e.contains("parallel.ep = 2 with parallel.zero = 2"), "{e}");
    assert!(
        config(&[moe[0], moe[1], "parallel.ep=2", "parallel.zero=1"])
            .layout(4)
            .is_ok()
    );
    assert_eq!(
        config(&[moe[0], moe[1], "parallel.ep=2"])
            .layout(4)
            .unwrap()
            .ep,
        2
    );
    // Automatic values: ZeRO over every rank, or data parallelism over every rank.
    let layout = config(&["parallel.zero=2"]).layout(4).unwrap();
    assert_eq!((layout.dp, layout.sharding), (1, 4));
    let layout = config(&[]).layout(4).unwrap();
    assert_eq!((layout.dp, layout.sharding), (4, 1));
    let layout = config(&["parallel.zero=1", "parallel.sharding=2"])
        .layout(4)
        .unwrap();
    assert_eq!((layout.dp, layout.sharding), (2, 2));
}

/// A Mixture-of-Experts GPT's data-parallel checkpoint resumes with its experts split inside the
/// mesh: over 2 data ranks beside 2 tensor-parallel ranks (each rank holding a quarter of the
/// experts), and over the 2 data ranks of each of 2 pipeline stages. Each data rank routes the
/// same 4 rows as under data parallelism, so the next 20 losses are the uninterrupted run's
/// (1e-4); saved again from the shares, the checkpoint is the one it was, bit for bit.
#[test]
fn a_moe_checkpoint_resumes_with_its_experts_split_inside_the_mesh() {
    let dp = with_moe(&["parallel.dp=2"]);
    let root = tempfile::tempdir().unwrap();
    let dp_config = config(&dp);
    let (want, saved) = on_ranks(2, &dp, |t, _| {
        let first = train(t, 20)?;
        let saved = t.save(&root.path().join("dp"), state(&dp_config))?;
        Ok((
            first.into_iter().chain(train(t, 20)?).collect::<Vec<_>>(),
            saved,
        ))
    });
    let saved = saved.expect("rank 0 writes the checkpoint");
    let original = checkpoint::load(&saved).unwrap();
    let layouts: [(&str, Vec<&str>); 2] = [
        ("ep 2 × tp 2", with_moe(&["parallel.ep=2", "parallel.tp=2"])),
        (
            "ep 2 × pp 2, GPipe",
            with_moe(&["parallel.ep=2", "parallel.pp=2", "parallel.schedule=gpipe"]),
        ),
    ];
    for (i, (what, sets)) in layouts.iter().enumerate() {
        let split = config(sets);
        let (second, again) = on_ranks(4, sets, |t, g| {
            let loaded = match g.rank() {
                0 => Some(checkpoint::load(&saved)?),
                _ => None,
            };
            t.restore_shared(loaded.as_ref(), g)?;
            anyhow::ensure!(t.steps() == 20, "resumed at step {}", t.steps());
            let again = t.save(&root.path().join(i.to_string()), state(&split))?;
            Ok((train(t, 20)?, again))
        });
        for (step, (got, want)) in second.iter().zip(&want[20..]).enumerate() {
            assert!(
                (got - want).abs() <= 1e-4 * want.abs(),
                "{what}, step {}: {got} against {want}",
                21 + step
            );
        }
        let back = checkpoint::load(&again.expect("rank 0 writes the checkpoint")).unwrap();
        assert_same_state(what, &original, &back);
    }
}

/// ZeRO-1 beside experts split inside the mesh, on 8 ranks: 2 pipeline stages of 4 data ranks,
/// each expert held by 2 of them, which share its optimizer state. Ten steps equal one device
/// running each data rank's 2 rows as a micro-batch, and the checkpoint gathers the whole model
/// and optimizer state: it loads on one device and equals that run's parameters.
#[test]
fn zero_one_beside_experts_split_in_a_pipeline_equals_one_device() {
    let one = config(&with_moe(&["train.batch_size=2", "train.grad_accum=4"]));
    let mut single = trainer(&one, None);
    let want = train(&mut single, 10).unwrap();
    let sets = with_moe(&[
        "parallel.ep=2",
        "parallel.pp=2",
        "parallel.schedule=gpipe",
        "parallel.zero=1",
    ]);
    let split = config(&sets);
    let root = tempfile::tempdir().unwrap();
    let (got, saved) = on_ranks(8, &sets, |t, _| {
        // Each rank keeps its shard of its stage's optimizer state (shards aligned to 1,024
        // elements split this tiny stage 2,048 + 1,424).
        let shard = t.strategy().optimizer_shard(t.model()).len();
        let held = t.model().params().trainable_numel();
        anyhow::ensure!(shard < held, "a shard of {shard} of {held}");
        let losses = train(t, 10)?;
        Ok((losses, t.save(root.path(), state(&split))?))
    });
    for (step, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * w.abs(),
            "step {}: {g} vs {w}",
            step + 1
        );
    }
    let loaded = checkpoint::load(&saved.expect("rank 0 writes the checkpoint")).unwrap();
    for (name, t) in single.model().params().named() {
        let saved = loaded.model[&name].to_vec_f32();
        for (a, b) in saved.iter().zip(t.to_vec_f32()) {
            assert!((a - b).abs() <= 1e-6 + 1e-5 * b.abs(), "{name}: {a} vs {b}");
        }
    }
    let total = single.model().params().trainable_numel();
    assert_eq!(
        loaded.optimizer["adam.m"].numel(),
        total,
        "the whole optimizer state"
    );
}
