//! Precision modes in training: AdamW's moments in bf16 or 8 bits, bf16 weights without a
//! master copy, bf16 gradients and f16 with dynamic loss scaling train, checkpoint and resume bit for bit; ZeRO-1
//! shards 8-bit moments on block edges and trains as one device; a checkpoint converts between precisions without losing the
//! f32 values (f32 weights become a bf16 run's master copy, and a bf16 run's master copy the f32
//! run's weights).

use anneal_train::checkpoint::{self, TrainerState};
use anneal_train::trainer::Trainer;
use anneal_train::RunConfig;

mod common;

use common::{tiny_config, tiny_state, tiny_trainer};

fn config(extra: &[&str]) -> RunConfig {
    let base = [
        "train.batch_size=8",
        "train.max_steps=40",
        "train.warmup_steps=2",
        "train.lr=1e-2",
    ];
    tiny_config(&base, extra)
}

fn trainer(config: &RunConfig, world: Option<Box<dyn anneal_dist::Communicator>>) -> Trainer {
    tiny_trainer(config, world)
}

fn state(config: &RunConfig) -> TrainerState {
    tiny_state(config)
}

/// The values `of` each trainable parameter gives, concatenated in `loaded`'s state order.
fn in_state_order(loaded: &checkpoint::Loaded, of: impl Fn(&str) -> Vec<f32>) -> Vec<f32> {
    loaded
        .state
        .optimizer_layout
        .iter()
        .flat_map(|(name, _)| of(name))
        .collect()
}

fn train(t: &mut Trainer, steps: u64) -> Vec<f64> {
    (0..steps).map(|_| t.step().unwrap().loss).collect()
}

#[test]
fn every_precision_mode_learns_and_resumes_bit_for_bit() {
    for mode in [
        &["train.grads=bf16"][..],
        &["train.moments=8bit"][..],
        &["model.dtype=bf16", "train.moments=8bit"],
        &["model.dtype=f16"],
        &[
            "model.dtype=bf16",
            "train.moments=bf16",
            "train.master_weights=false",
        ],
        &[
            "model.dtype=bf16",
            "train.moments=8bit",
            "train.master_weights=false",
            "train.grads=bf16",
        ],
    ] {
        let c = config(mode);
        let want = train(&mut trainer(&c, None), 12);
        assert!(want[11] < want[0] * 0.9, "{mode:?} learns: {want:?}");
        let root = tempfile::tempdir().unwrap();
        let mut first = trainer(&c, None);
        let mut got = train(&mut first, 6);
        let saved = first.save(root.path(), state(&c)).unwrap().unwrap();
        drop(first);
        let mut resumed = trainer(&c, None);
        resumed.restore(&checkpoint::load(&saved).unwrap()).unwrap();
        got.extend(train(&mut resumed, 6));
        assert_eq!(
            got.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
            "{mode:?}"
        );
    }
}

#[test]
fn bf16_gradients_are_refused_by_name_where_they_cannot_be_kept() {
    let err = RunConfig::load(None, &["train.grads=f8".to_string()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("train.grads") && err.contains("f32, bf16"),
        "{err}"
    );
    let err = config(&["train.grads=bf16"])
        .layout(2)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("train.grads = \"bf16\"") && err.contains("2 ranks"),
        "{err}"
    );
}

#[test]
fn zero_one_with_eight_bit_moments_trains_as_one_device() {
    let mode = ["train.moments=8bit", "parallel.zero=1"];
    let want = train(&mut trainer(&config(&mode[..1]), None), 10);
    let c = config(&mode);
    let got = anneal_dist::local::run(2, |comm| {
        Ok::<_, String>(train(&mut trainer(&c, Some(Box::new(comm))), 10))
    })
    .unwrap()
    .swap_remove(0);
    for (step, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * w.abs(),
            "step {}: {g} against {w}",
            step + 1
        );
    }
}

#[test]
fn checkpoints_convert_between_precisions_keeping_the_f32_values() {
    let root = tempfile::tempdir().unwrap();
    let f32_run = config(&[]);
    let bf16_run = config(&["model.dtype=bf16", "train.moments=8bit"]);
    assert_eq!(bf16_run.precision_change(&bf16_run), None);
    let change = bf16_run.precision_change(&f32_run).unwrap();
    assert!(
        change.contains("model.dtype f32 → bf16") && change.contains("train.moments f32 → 8bit"),
        "{change}"
    );
    // f32 → bf16: the f32 weights become the master copy, exactly.
    let mut a = trainer(&f32_run, None);
    train(&mut a, 4);
    let saved = a
        .save(&root.path().join("a"), state(&f32_run))
        .unwrap()
        .unwrap();
    let weights = checkpoint::load(&saved).unwrap();
    let mut b = trainer(&bf16_run, None);
    b.restore(&weights).unwrap();
    let again = b
        .save(&root.path().join("b"), state(&bf16_run))
        .unwrap()
        .unwrap();
    let again = checkpoint::load(&again).unwrap();
    let master = again.optimizer["adam.master"].to_vec_f32();
    let want = in_state_order(&again, |name| weights.model[name].to_vec_f32());
    assert!(
        master == want,
        "the master copy is the f32 checkpoint's weights"
    );
    // bf16 → f32: the master copy becomes the weights, exactly, and training goes on.
    train(&mut b, 3);
    let saved = b
        .save(&root.path().join("c"), state(&bf16_run))
        .unwrap()
        .unwrap();
    let loaded = checkpoint::load(&saved).unwrap();
    let mut c = trainer(&f32_run, None);
    c.restore(&loaded).unwrap();
    let got = in_state_order(&loaded, |name| {
        c.model().params().by_name(name).unwrap().to_vec_f32()
    });
    assert!(got == loaded.optimizer["adam.master"].to_vec_f32());
    let losses = train(&mut c, 3);
    assert!(losses.iter().all(|l| l.is_finite()));
}

#[test]
fn every_recomputation_policy_trains_the_same_model() {
    let want = train(&mut trainer(&config(&[]), None), 5);
    for policy in [
        "model.recompute=none",
        "model.recompute=full",
        "model.checkpoint_blocks=true",
    ] {
        let got = train(&mut trainer(&config(&[policy]), None), 5);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * w.abs(), "{policy}: {g} against {w}");
        }
    }
    let bad = RunConfig::load(None, &["model.recompute=some".to_string()]).unwrap_err();
    assert!(
        format!("{bad:#}")
            .contains("model.recompute = \"some\" is not allowed: none, selective or full"),
        "{bad:#}"
    );
    let both = ["model.recompute=none", "model.checkpoint_blocks=true"].map(String::from);
    let bad = RunConfig::load(None, &both).unwrap_err();
    assert!(
        format!("{bad:#}").contains("model.checkpoint_blocks = true"),
        "{bad:#}"
    );
}
