//! The `anneal` binary end to end, on sizes small enough for CI.

use std::process::Command;

fn anneal(args: &[&str]) -> std::process::Output {
    anneal_with(args, &[])
}

/// [`anneal`] with environment variables set.
fn anneal_with(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_anneal"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("the anneal binary runs")
}

/// A GPT small enough for `bench gpt` in CI.
const TINY_GPT: [&str; 12] = [
    "--layers", "1", "--width", "32", "--heads", "2", "--seq", "16", "--batch", "2", "--vocab",
    "64",
];

/// `ANNEAL_KERNELS` picks the bf16 kernel path, `bench gpt` names the one that ran, and a value
/// it does not know is reported, not silently taken.
#[test]
fn the_kernel_path_can_be_forced_and_is_printed() {
    let run = |kernels: &str| {
        let args = [
            "bench", "gpt", "--dtype", "bf16", "--torch", "off", "--steps", "1",
        ];
        let args = [&args[..], &["--warmup", "0"], &TINY_GPT].concat();
        let out = anneal_with(&args, &[("ANNEAL_KERNELS", kernels)]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let out = run("widening");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("bf16 matmul widening"), "{text}");
    let out = run("fastest-please");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "ANNEAL_KERNELS=\"fastest-please\" is not one of auto, amx, avx512-bf16, widening"
        ),
        "{err}"
    );
}

#[test]
fn bench_gpt_runs_a_tiny_model_in_both_dtypes() {
    let args = [
        "bench", "gpt", "--dtype", "both", "--torch", "off", "--steps", "2",
    ];
    let args = [&args[..], &["--warmup", "1", "--json"], &TINY_GPT].concat();
    let out = anneal(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with('{')).collect();
    assert_eq!(lines.len(), 2, "one JSON line per dtype: {text}");
    for (line, dtype) in lines.iter().zip(["f32", "bf16"]) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["engine"], "anneal");
        assert_eq!(v["dtype"], dtype);
        assert!(v["ms_per_step"].as_f64().unwrap() > 0.0);
        assert!(v["final_loss"].as_f64().unwrap().is_finite());
        // The memory accounting: f32 gradients; parameters as stored; AdamW's two f32 moments,
        // plus 2 bytes per parameter of master copy for bf16; saved activations on top.
        let f = |k: &str| v[k].as_f64().unwrap();
        let per_byte = f("grads_mb") / 4.0;
        assert!(per_byte > 0.0, "{v}");
        let (param_bytes, state_bytes) = if dtype == "f32" {
            (4.0, 8.0)
        } else {
            (2.0, 10.0)
        };
        assert!(
            (f("params_mb") - param_bytes * per_byte).abs() < 1e-9,
            "{v}"
        );
        assert!(
            (f("optimizer_state_mb") - state_bytes * per_byte).abs() < 1e-9,
            "{v}"
        );
        assert!(f("forward_live_mb") > f("params_mb") + f("grads_mb"), "{v}");
        assert!(
            f("base_rss_mb") > 0.0 && f("base_rss_mb") < f("peak_rss_mb"),
            "{v}"
        );
    }
}

#[test]
fn bench_gpt_lockstep_takes_every_step_in_turn() {
    let args = [
        "bench",
        "gpt",
        "--lockstep",
        "--dtype",
        "both",
        "--torch",
        "off",
    ];
    let args = [
        &args[..],
        &["--steps", "3", "--warmup", "1", "--json"],
        &TINY_GPT,
    ]
    .concat();
    let out = anneal(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "one JSON line per dtype: {text}");
    for (v, dtype) in lines.iter().zip(["f32", "bf16"]) {
        assert_eq!(v["dtype"], dtype);
        let steps = v["step_ms"].as_array().unwrap();
        assert_eq!(steps.len(), 3, "{v}");
        assert!(steps.iter().all(|t| t.as_f64().unwrap() > 0.0));
    }
}

#[test]
fn bad_arguments_are_reported_with_the_allowed_values() {
    let out = anneal(&["bench", "gpt", "--dtype", "f64"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("f64") && err.contains("bf16"), "{err}");
}

#[test]
fn plan_ranks_layouts_and_explains_the_best() {
    let out = anneal(&[
        "plan",
        "--layers",
        "24",
        "--hidden",
        "2304",
        "--heads",
        "24",
        "--batch",
        "512",
        "--dtype",
        "fp16",
        "--cluster",
        "a100-80gb",
        "--nodes",
        "4",
        "--top",
        "3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("1.65B parameters") && text.contains("recommended: dp"),
        "{text}"
    );
    let json = anneal(&[
        "plan", "--layers", "24", "--hidden", "2304", "--heads", "24", "--batch", "512", "--nodes",
        "4", "--top", "2", "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert!(v[0]["fits"].as_bool().unwrap());
    let bad = anneal(&[
        "plan",
        "--layers",
        "2",
        "--hidden",
        "64",
        "--heads",
        "4",
        "--batch",
        "8",
        "--nodes",
        "1",
        "--cluster",
        "tpu",
    ]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("a100-80gb") && err.contains("h200"),
        "{err}"
    );
    // Impossible models are refused, naming the flag, instead of printing nonsense.
    let base = [
        "plan", "--layers", "2", "--hidden", "64", "--heads", "4", "--batch", "8", "--nodes", "1",
    ];
    for (extra, want) in [
        (&["--experts", "4", "--top-k", "8"][..], "--top-k 8"),
        (
            &["--experts", "4", "--capacity-factor=-1"][..],
            "--capacity-factor -1",
        ),
        (&["--experts", "4", "--moe-every", "0"][..], "--moe-every 0"),
        (&["--seq", "0"][..], "--seq 0"),
        (&["--vocab", "0"][..], "--vocab 0"),
        (&["--layers", "400000000000"][..], "--layers 400000000000"),
    ] {
        let mut args = base.to_vec();
        if extra[0] == "--layers" {
            args[2] = extra[1];
        } else {
            args.extend(extra);
        }
        let out = anneal(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want) && err.contains("not allowed"),
            "{extra:?}: {err}"
        );
    }
}

#[test]
fn plan_reads_a_toml_file_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plan.toml");
    std::fs::write(
        &path,
        "layers = 24\nhidden = 2304\nheads = 24\nbatch = 512\nnodes = 4\ndtype = \"fp16\"\n",
    )
    .unwrap();
    let p = path.to_str().unwrap();
    let out = anneal(&["plan", "--config", p, "--top", "1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("32 × A100-80GB"), "{text}");
    let out = anneal(&["plan", "--config", p, "--top", "1", "--nodes", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("16 × A100-80GB"), "{text}");
    std::fs::write(&path, "layer = 24\n").unwrap();
    let out = anneal(&["plan", "--config", p]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("layer") && err.contains("plan.toml"),
        "{err}"
    );
}

#[test]
fn quickstart_runs_end_to_end_on_a_tiny_corpus() {
    // The main job on a corpus and a model small enough for CI: tokenizer training,
    // tokenization, pretraining, samples and the report folder.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..400 {
        let body = format!("fn f{i}(x: u32) -> u32 {{\n    let y = x * {i};\n    y + 1\n}}\n");
        std::fs::write(src.join(format!("f{i}.rs")), body).unwrap();
    }
    let out = dir.path().join("qs");
    let run = anneal(&[
        "quickstart",
        "--data",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-mb",
        "1",
        "--quiet",
        "--set",
        "train.max_steps=5",
        "--set",
        "model.n_layer=1",
        "--set",
        "model.n_embd=32",
        "--set",
        "model.n_head=2",
        "--set",
        "model.block_size=32",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.eval_interval=5",
        "--set",
        "train.eval_batches=1",
        "--set",
        "train.warmup_steps=1",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report = out.join("report");
    for f in [
        "loss.png",
        "samples.md",
        "metrics.jsonl",
        "config.toml",
        "summary.json",
    ] {
        assert!(report.join(f).is_file(), "{f}");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["run"]["steps"], 5);
    assert_eq!(summary["corpus"]["files"], 400);
    let samples = std::fs::read_to_string(report.join("samples.md")).unwrap();
    assert!(samples.contains("fn main() {"), "{samples}");

    // `anneal data mix` with the quickstart's tokenizer: two sources by weight, repeats capped.
    let prose = dir.path().join("prose");
    std::fs::create_dir_all(&prose).unwrap();
    for i in 0..20 {
        let line = format!("prose line number {i} about rivers and towns\n");
        std::fs::write(prose.join(format!("p{i}.txt")), line).unwrap();
    }
    let mix = dir.path().join("mix");
    let code = format!("code={}:0.7", src.display());
    let text = format!("prose={}:0.3", prose.display());
    let tokenizer = out.join("data/tokenizer.json");
    let run = anneal(&[
        "data",
        "mix",
        "--source",
        &code,
        "--source",
        &text,
        "--tokens",
        "2000",
        "--max-repeat",
        "2",
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--ext",
        "rs,txt",
        "--out",
        mix.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let mixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(mix.join("mixture.json")).unwrap()).unwrap();
    let text = mixture.to_string();
    assert!(text.contains("code") && text.contains("prose"), "{text}");
    assert!(mix.join("mix-code.jsonl").is_file() && mix.join("mix-prose.jsonl").is_file());
}

/// `bench curate` and `bench dedup` with the datatrove side off: anneal's side runs on a small
/// JSONL corpus and prints its row.
#[test]
fn bench_curate_and_dedup_run_with_the_reference_off() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    let prose = "The committee met on Tuesday to discuss the budget for the coming year. After a \
        long debate, the members agreed that the library should receive new funds, and that the \
        park near the river would be repaired before the summer.";
    let mut lines = String::new();
    for i in 0..40 {
        // Every fourth document repeats an earlier one with its number changed: near-duplicates.
        let text = format!("{prose} Item {}.", if i % 4 == 3 { i - 1 } else { i });
        lines += &(serde_json::json!({ "text": text }).to_string() + "\n");
    }
    std::fs::write(corpus.join("part.jsonl"), lines).unwrap();
    for command in ["curate", "dedup"] {
        let out = anneal(&[
            "bench",
            command,
            "--input",
            corpus.to_str().unwrap(),
            "--out",
            dir.path().join("scratch").to_str().unwrap(),
            "--workers",
            "1",
            "--datatrove",
            "off",
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Kept, then what each stage removed: every document is accounted for.
        let row = text
            .lines()
            .find(|l| l.starts_with("| anneal"))
            .unwrap_or("");
        let counts: Vec<u64> = row
            .split('|')
            .skip(4)
            .filter_map(|c| c.trim().parse().ok())
            .collect();
        assert!(
            counts.len() >= 2 && counts.iter().sum::<u64>() == 40,
            "{command}: {text}"
        );
        if command == "dedup" {
            assert!(counts[1] > 0, "near-duplicates removed: {text}");
        }
        assert!(text.contains("datatrove side off"), "{command}: {text}");
    }
}

#[test]
fn align_data_writes_disjoint_task_sets_and_names_an_unknown_task() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("align");
    let o = anneal(&[
        "align",
        "data",
        "--sft",
        "30",
        "--preferences",
        "20",
        "--rl",
        "10",
        "--eval",
        "9",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (file, lines) in [
        ("sft.jsonl", 30),
        ("preferences.jsonl", 20),
        ("rl-prompts.jsonl", 10),
        ("eval.jsonl", 9),
    ] {
        let text = std::fs::read_to_string(out.join(file)).unwrap();
        assert_eq!(text.lines().count(), lines, "{file}");
    }
    let o = anneal(&[
        "align",
        "data",
        "--tasks",
        "poetry",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("\"poetry\" is not a task: arithmetic, units, sorting"),
        "{err}"
    );
}

#[test]
fn align_stages_name_a_bad_config_key_and_print_the_resolved_config() {
    let o = anneal(&["align", "ppo", "--set", "rl.clip=0"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("rl.clip = 0") && err.contains("a positive number"),
        "{err}"
    );
    let o = anneal(&["align", "dpo", "--set", "dpo.gamma=1"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("dpo.gamma"), "{err}");
    let o = anneal(&[
        "align",
        "grpo",
        "--config",
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../configs/align-smollm2.toml"
        ),
        "--set",
        "rl.group=8",
        "--print-config",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("group = 8") && text.contains("kl_coef = 0.05"),
        "{text}"
    );
}
