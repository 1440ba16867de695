//! A Mixture-of-Experts GPT through the whole job: `[model.moe]` from the command line,
//! pretraining with its routing in `metrics.jsonl` and the expert-load chart, a stopped run
//! resumed bit for bit, generation from its checkpoint, its experts split over 2 ranks (expert
//! parallelism) or its blocks over 2 pipeline stages training as one device does, and the settings refused before any compute.

mod common;

use common::*;

const MOE: [&str; 10] = [
    "--set",
    "model.moe.experts=4",
    "--set",
    "model.moe.every=1",
    "--set",
    "model.moe.top_k=2",
    "--set",
    "model.moe.capacity_factor=1.0",
    "--set",
    "train.decay_steps=40",
];

#[test]
fn moe_runs_log_routing_resume_bit_for_bit_and_generate() {
    let dir = tempfile::tempdir().unwrap();
    let data = tokenize(dir.path());
    let straight = dir.path().join("straight");
    ok(pretrain(&data, &straight, 40, &MOE).output().unwrap());
    assert!(straight.join("expert_load.png").is_file());
    // Each step logs each MoE layer's expert load (shares summing to one) and dropped share.
    let text = std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("loss").is_some())
        .collect();
    assert_eq!(steps.len(), 40);
    for v in &steps {
        let moe = &v["moe"];
        assert!(moe["aux_loss"].as_f64().unwrap() > 0.0, "{v}");
        assert!(moe["z_loss"].as_f64().unwrap() > 0.0, "{v}");
        let layers = moe["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 2, "both blocks are MoE: {v}");
        for l in layers {
            let load: Vec<f64> = l["load"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert_eq!(load.len(), 4);
            assert!((load.iter().sum::<f64>() - 1.0).abs() < 1e-6, "{v}");
            let dropped = l["dropped"].as_f64().unwrap();
            assert!((0.0..1.0).contains(&dropped), "{v}");
        }
    }
    // Stopped at 20 and resumed: every loss repeats.
    let resumed = dir.path().join("resumed");
    ok(pretrain(&data, &resumed, 20, &MOE).output().unwrap());
    let mut again = MOE.to_vec();
    again.extend(["--set", "train.max_steps=40", "--resume"]);
    ok(pretrain(&data, &resumed, 20, &again).output().unwrap());
    let (want, want_val) = losses(&straight);
    let (got, got_val) = losses(&resumed);
    assert_eq!(got.len(), 40);
    for (a, b) in got.iter().zip(&want) {
        assert_eq!(a.1.to_bits(), b.1.to_bits(), "loss at step {} differs", a.0);
    }
    assert_eq!(got_val.last(), want_val.last());
    // Generation reads the MoE model back from its checkpoint.
    let run = straight.to_str().unwrap();
    let text = ok(anneal(&[
        "generate", run, "--prompt", "the ", "--tokens", "20", "--seed", "1",
    ]));
    assert!(text.starts_with("the ") && text.len() > 10, "{text}");
    // A dense configuration does not resume the MoE checkpoint: the key is named.
    let out = pretrain(&data, &resumed, 50, &["--resume"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("model.moe") && err.contains("Mixture-of-Experts"),
        "{err}"
    );
}

#[cfg(unix)]
#[test]
fn experts_split_over_ranks_train_as_one_device_running_each_ranks_rows() {
    let dir = tempfile::tempdir().unwrap();
    let data = tokenize(dir.path());
    let steps = 20;
    // Each rank routes its own rows: one device running each rank's share of a batch as a
    // micro-batch (batches of 4 rows, 4 micro-batches) trains the same model.
    let one = dir.path().join("one");
    let mut sets = MOE.to_vec();
    sets.extend(["--set", "train.batch_size=4", "--set", "train.grad_accum=4"]);
    ok(pretrain(&data, &one, steps, &sets).output().unwrap());
    let (want, _) = losses(&one);
    let split = dir.path().join("split");
    // Expert parallelism alone, and with ZeRO-1 (the optimizer state sharded over the ranks
    // holding the same experts, gathered whole into the checkpoint).
    // And a pipeline of 2 stages, one MoE block each, 4 rows a pipeline micro-batch: each stage
    // backpropagates its balancing losses, and the log holds both stages' layers.
    // Then experts split over the 2 data ranks of each of 2 pipeline stages, on 4 ranks.
    let piped = dir.path().join("piped");
    let mesh = dir.path().join("mesh");
    for (out, ranks, layout) in [
        (&split, "2", ["parallel.ep=2", "parallel.zero=0"]),
        (
            &dir.path().join("zero1"),
            "2",
            ["parallel.ep=2", "parallel.zero=1"],
        ),
        (&piped, "2", ["parallel.pp=2", "parallel.micro_batches=2"]),
        (&mesh, "4", ["parallel.ep=2", "parallel.pp=2"]),
    ] {
        let mut sets = MOE.to_vec();
        sets.extend(["--ranks", ranks, "--set", layout[0], "--set", layout[1]]);
        ok(pretrain(&data, out, steps, &sets).output().unwrap());
        let (got, _) = losses(out);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g.1 - w.1).abs() <= 1e-5 * w.1.abs(),
                "{layout:?}, step {}: {} vs {}",
                g.0,
                g.1,
                w.1
            );
        }
    }
    let text = std::fs::read_to_string(piped.join("metrics.jsonl")).unwrap();
    let last = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .rfind(|v| v.get("loss").is_some())
        .unwrap();
    let layers = last["moe"]["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2, "both stages' MoE blocks: {last}");
    for l in layers {
        let load = l["load"].as_array().unwrap().iter();
        let sum: f64 = load.map(|x| x.as_f64().unwrap()).sum();
        assert!((sum - 1.0).abs() < 1e-5, "{last}");
    }
    // The checkpoints hold every expert whole, and load on one device.
    for run in [&split, &mesh] {
        let run = run.to_str().unwrap();
        let text = ok(anneal(&[
            "generate", run, "--prompt", "the ", "--tokens", "20", "--seed", "1",
        ]));
        assert!(text.starts_with("the "), "{text}");
    }
}

#[test]
fn bad_moe_settings_are_refused_before_any_compute() {
    for (set, key, allowed) in [
        (
            "model.moe.top_k=5",
            "model.moe.top_k = 5",
            "between 1 and model.moe.experts (4)",
        ),
        (
            "model.moe.capacity_factor=0",
            "model.moe.capacity_factor",
            "\"none\"",
        ),
        (
            "model.moe.capacity_factor=-2",
            "model.moe.capacity_factor",
            "positive",
        ),
        ("model.moe.every=9", "model.moe.every = 9", "model.n_layer"),
        (
            "model.moe.expert=3",
            "model.moe.expert",
            "[model.moe] allows aux_loss",
        ),
    ] {
        let out = anneal(&[
            "pretrain",
            "--set",
            "model.moe.experts=4",
            "--set",
            set,
            "--set",
            "data.dir=/nonexistent/corpus",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(key) && err.contains(allowed),
            "{set}: {err}"
        );
        assert!(
            !err.contains("/nonexistent/corpus"),
            "refused before reading data: {err}"
        );
    }
}

#[test]
fn the_moe_experiment_runs_end_to_end_in_its_quick_form() {
    let dir = tempfile::tempdir().unwrap();
    let data = tokenize(dir.path());
    let out = dir.path().join("experiment");
    let (data_s, out_s) = (data.to_str().unwrap(), out.to_str().unwrap());
    let experiment = |variants: &str| {
        anneal(&[
            "experiment",
            "moe",
            "--quick",
            "--data",
            data_s,
            "--out",
            out_s,
            "--variants",
            variants,
            "--seeds",
            "1",
        ])
    };
    let text = ok(experiment("dense,moe4"));
    assert!(
        text.contains("| dense seed 0") && text.contains("| moe4 seed 0"),
        "{text}"
    );
    assert!(out.join("val_loss.png").is_file());
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let runs = results.as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert!(runs[1]["params"].as_u64() > runs[1]["active_params"].as_u64());
    assert_eq!(runs[0]["params"], runs[0]["active_params"]);
    // A second invocation reuses the finished runs.
    let again = ok(experiment("dense,moe4"));
    assert_eq!(again.matches("done earlier").count(), 2, "{again}");
    // An unknown variant is refused before any run.
    let bad = experiment("moe3");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("moe3") && err.contains("moe8-top2-half"),
        "{err}"
    );
}

#[test]
fn the_limoe_experiment_runs_in_its_quick_form_when_fashion_mnist_is_fetched() {
    let cache = anneal_data::data_root();
    if !anneal_data::images::fashion_mnist_dir(&cache)
        .join("train-images-idx3-ubyte.gz")
        .is_file()
    {
        eprintln!("skipped: Fashion-MNIST not fetched (scripts/fetch-data.sh fashion-mnist)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("limoe");
    let text = ok(anneal(&[
        "experiment",
        "limoe",
        "--quick",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(text.contains("zero-shot accuracy"), "{text}");
    assert!(out.join("expert_modality.png").is_file() && out.join("loss.png").is_file());
}
