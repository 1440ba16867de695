//! `anneal data tokenize` → `pretrain` → `generate` / `eval` / `export`, on a corpus small
//! enough for CI, including a run killed with SIGKILL and one stopped with SIGINT, each resumed,
//! whose losses must equal an uninterrupted run's bit for bit.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

#[cfg(unix)]
#[test]
fn killed_and_interrupted_runs_resume_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let data = tokenize(dir.path());
    let steps = 200;

    let straight = dir.path().join("straight");
    let out = pretrain(&data, &straight, steps, &[]).output().unwrap();
    ok(out);
    let (want_train, want_val) = losses(&straight);
    assert_eq!(want_train.len(), steps as usize);
    assert!(
        want_val.last().unwrap().1 < want_val[0].1 - 0.5,
        "validation loss falls: {want_val:?}"
    );

    let resumed = dir.path().join("resumed");
    // SIGKILL somewhere after step 50: no chance to save anything.
    let mut child = pretrain(&data, &resumed, steps, &[]).spawn().unwrap();
    let at = wait_for_step(&mut child, &resumed, 50);
    signal(&child, "-KILL");
    child.wait().unwrap();
    let killed_at = losses(&resumed).0.len();
    assert!(
        killed_at < steps as usize,
        "killed at step {at}, before the end"
    );
    // Resume; then SIGINT after step 120, which saves a checkpoint and exits with 130.
    let mut child = pretrain(&data, &resumed, steps, &["--resume"])
        .spawn()
        .unwrap();
    wait_for_step(&mut child, &resumed, 120);
    signal(&child, "-INT");
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(130),
        "SIGINT exits with 130 after saving"
    );
    let stopped = losses(&resumed).0.last().unwrap().0;
    let ckpt = resumed.join(format!("checkpoints/step-{stopped:06}"));
    assert!(
        ckpt.join("model.safetensors").is_file(),
        "SIGINT saved {}",
        ckpt.display()
    );
    // Resume; SIGTERM (what batch schedulers send) after step 140 saves a checkpoint too.
    let mut child = pretrain(&data, &resumed, steps, &["--resume"])
        .spawn()
        .unwrap();
    wait_for_step(&mut child, &resumed, 140);
    signal(&child, "-TERM");
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(130),
        "SIGTERM exits with 130 after saving"
    );
    let stopped = losses(&resumed).0.last().unwrap().0;
    assert!(
        resumed
            .join(format!("checkpoints/step-{stopped:06}/model.safetensors"))
            .is_file(),
        "SIGTERM saved step {stopped}"
    );
    // Resume again to the end.
    ok(pretrain(&data, &resumed, steps, &["--resume"])
        .output()
        .unwrap());
    let (got_train, got_val) = losses(&resumed);
    assert_eq!(got_train.len(), steps as usize);
    for (a, b) in got_train.iter().zip(&want_train) {
        assert_eq!(a.0, b.0);
        assert_eq!(a.1.to_bits(), b.1.to_bits(), "loss at step {} differs", a.0);
    }
    assert_eq!(got_val, want_val);
    // Only the newest checkpoints are kept.
    let kept = std::fs::read_dir(resumed.join("checkpoints"))
        .unwrap()
        .count();
    assert_eq!(kept, 2);
}

#[cfg(unix)]
#[test]
fn a_second_writer_to_a_run_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = tokenize(dir.path());
    let run = dir.path().join("run");
    let mut first = pretrain(&data, &run, 100_000, &[]).spawn().unwrap();
    wait_for_step(&mut first, &run, 3);
    for extra in [&[][..], &["--resume"][..]] {
        let second = pretrain(&data, &run, 100_000, extra).output().unwrap();
        let err = String::from_utf8_lossy(&second.stderr);
        assert!(
            !second.status.success()
                && err.contains("in use by another anneal process")
                && err.contains(&format!("pid {}", first.id())),
            "{extra:?}: {err}"
        );
    }
    // A killed holder leaves no stale lock behind.
    signal(&first, "-KILL");
    first.wait().unwrap();
    ok(pretrain(
        &data,
        &run,
        100_000,
        &["--resume", "--set", "train.max_steps=5"],
    )
    .output()
    .unwrap());
}

#[test]
fn resuming_an_older_checkpoint_starts_a_new_branch() {
    let dir = tempfile::tempdir().unwrap();
    let data = tokenize(dir.path());
    let run = dir.path().join("run");
    // Checkpoints every 20 steps, the newest two kept: 40 and 60.
    ok(pretrain(&data, &run, 60, &[]).output().unwrap());
    let step40 = run.join("checkpoints/step-000040");
    let resume_40 = step40.to_str().unwrap().to_string();
    ok(pretrain(
        &data,
        &run,
        60,
        &["--set", "train.max_steps=50", "--resume", &resume_40],
    )
    .output()
    .unwrap());
    // The abandoned branch's step 60 is set aside, never pruned into or resumed from.
    assert!(run.join("abandoned/after-step-000040/step-000060").is_dir());
    let kept: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        kept.contains(&"step-000040".to_string()) && kept.contains(&"step-000050".to_string()),
        "{kept:?}"
    );
    assert!(!kept.contains(&"step-000060".to_string()), "{kept:?}");
}

#[test]
fn bf16_runs_resume_bit_for_bit() {
    // bf16 parameters keep their exact f32 master copy in a checkpoint (bf16 part in the model
    // file, the whole value in the optimizer file): a run stopped and resumed repeats every loss.
    let dir = tempfile::tempdir().unwrap();
    let data = tokenize(dir.path());
    let bf16 = ["--set", "model.dtype=bf16", "--set", "train.decay_steps=40"];
    let straight = dir.path().join("straight");
    ok(pretrain(&data, &straight, 40, &bf16).output().unwrap());
    let resumed = dir.path().join("resumed");
    ok(pretrain(&data, &resumed, 20, &bf16).output().unwrap());
    let mut again = bf16.to_vec();
    again.extend(["--set", "train.max_steps=40", "--resume"]);
    // Logged at info into a pipe, as a redirected log would be: plain text, no colour escapes.
    let log = pretrain(&data, &resumed, 20, &again)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    ok(log.clone());
    let log = String::from_utf8_lossy(&log.stderr);
    assert!(log.contains("resumed from"), "{log}");
    assert!(
        !log.contains('\x1b'),
        "colour escapes in a redirected log: {log:?}"
    );
    let (want, _) = losses(&straight);
    let (got, _) = losses(&resumed);
    assert_eq!(want.len(), 40);
    assert_eq!(got.len(), 40);
    for (a, b) in got.iter().zip(&want) {
        assert_eq!(a.1.to_bits(), b.1.to_bits(), "loss at step {} differs", a.0);
    }
}

#[test]
fn damaged_checkpoints_are_named_and_not_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let data = tokenize(dir.path());
    let run = dir.path().join("run");
    ok(pretrain(&data, &run, 20, &[]).output().unwrap());
    // Starting afresh over a run's checkpoints is refused rather than mixing two runs.
    let out = pretrain(&data, &run, 30, &[]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--resume"), "{err}");

    let model = run.join("checkpoints/step-000020/model.safetensors");
    let bytes = std::fs::read(&model).unwrap();

    let mut flipped = bytes.clone();
    let n = flipped.len();
    flipped[n - 5] ^= 0x40;
    std::fs::write(&model, &flipped).unwrap();
    let out = pretrain(&data, &run, 30, &["--resume"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("model.safetensors") && err.contains("corrupted"),
        "{err}"
    );

    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let out = anneal(&["generate", run.to_str().unwrap(), "--tokens", "5"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );

    // A damaged optimizer file stops a resume but not generation, which needs only the weights.
    std::fs::write(&model, &bytes).unwrap();
    let optimizer = run.join("checkpoints/step-000020/optimizer.safetensors");
    let opt_bytes = std::fs::read(&optimizer).unwrap();
    std::fs::write(&optimizer, &opt_bytes[..opt_bytes.len() / 2]).unwrap();
    ok(anneal(&[
        "generate",
        run.to_str().unwrap(),
        "--tokens",
        "5",
    ]));
    let out = pretrain(&data, &run, 30, &["--resume"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("optimizer.safetensors"),
        "{err}"
    );
    std::fs::write(&optimizer, &opt_bytes).unwrap();

    let state = run.join("checkpoints/step-000020/trainer_state.json");
    let text = std::fs::read(&state).unwrap();
    std::fs::write(&state, &text[..text.len() / 2]).unwrap();
    let out = anneal(&["generate", run.to_str().unwrap(), "--tokens", "5"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("trainer_state.json") && err.contains("truncated or corrupted"),
        "{err}"
    );
    // A checkpoint directory without its state file is named as such.
    std::fs::remove_file(&state).unwrap();
    let ckpt = run.join("checkpoints/step-000020");
    let out = anneal(&["generate", ckpt.to_str().unwrap(), "--tokens", "5"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("neither trainer_state.json"),
        "{err}"
    );
}

#[test]
fn generate_eval_and_export_from_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = tokenize(dir.path());
    let run = dir.path().join("run");
    ok(pretrain(&data, &run, 30, &[]).output().unwrap());
    assert!(run.join("loss.png").is_file());
    let run_s = run.to_str().unwrap();
    let text = ok(anneal(&[
        "generate", run_s, "--prompt", "the ", "--tokens", "40", "--seed", "3",
    ]));
    assert!(text.starts_with("the ") && text.len() > 20, "{text}");
    let again = ok(anneal(&[
        "generate", run_s, "--prompt", "the ", "--tokens", "40", "--seed", "3",
    ]));
    assert_eq!(text, again, "seeded sampling repeats");
    // Bad sampling settings are refused; a prompt the vocabulary cannot hold is named.
    for (flag, value) in [
        ("--temperature", "nan"),
        ("--samples", "0"),
        ("--tokens", "0"),
    ] {
        let out = anneal(&["generate", run_s, flag, value]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(flag),
            "{flag} {value}: {err}"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_anneal"))
        .args(["generate", run_s, "--prompt", "the 日本", "--tokens", "5"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.contains("lacks \"日本\""),
        "{err}"
    );

    let src = dir.path().join("src/part1.txt");
    let eval = ok(anneal(&["eval", run_s, "--input", src.to_str().unwrap()]));
    assert!(eval.contains("perplexity"), "{eval}");
    // A long one-line document is encoded only as far as --max-tokens needs: an 8 MB line and a
    // 2 MB one (both longer than a part) give the same tokens and loss in about the same memory,
    // and a few kilobytes of it the same loss.
    let line: String = std::fs::read_to_string(&src)
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let long = dir.path().join("long.txt");
    let short = dir.path().join("short.txt");
    std::fs::write(&long, line.repeat((8 << 20) / line.len() + 1)).unwrap();
    std::fs::write(&short, line.repeat((2 << 20) / line.len() + 1)).unwrap();
    let tiny = dir.path().join("tiny.txt");
    std::fs::write(&tiny, &line.repeat(4096 / line.len() + 1)[..4096]).unwrap();
    let peak_and_loss = |input: &Path| {
        let out = ok(anneal(&[
            "eval",
            run_s,
            "--input",
            input.to_str().unwrap(),
            "--max-tokens",
            "500",
        ]));
        let line = out
            .lines()
            .find(|l| l.contains("peak memory"))
            .expect("eval summary");
        let peak: f64 = line
            .split("peak memory ")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        (peak, line.split(" (").next().unwrap().to_string())
    };
    let (long_peak, long_loss) = peak_and_loss(&long);
    let (short_peak, short_loss) = peak_and_loss(&short);
    assert_eq!(long_loss, short_loss);
    assert_eq!(peak_and_loss(&tiny).1, short_loss);
    assert!(
        long_peak < short_peak * 1.1 + 2.0,
        "eval of the first 500 tokens of an 8 MB line peaked at {long_peak} MB, of 2 MB at {short_peak} MB"
    );

    // The model as a data signal: perplexity of each kept document under it.
    let curated = dir.path().join("curated");
    ok(anneal(&[
        "data",
        "pipeline",
        "--input",
        src.to_str().unwrap(),
        "--out",
        curated.to_str().unwrap(),
        "--stages",
        "normalize",
        "--perplexity-model",
        run_s,
        "--quiet",
    ]));
    let kept = std::fs::read_to_string(curated.join("kept-00000.jsonl")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(kept.lines().next().unwrap()).unwrap();
    let ppl = doc["signals"]["model_perplexity"].as_f64().unwrap();
    assert!(ppl > 1.0 && ppl < 100.0, "{ppl}");

    let hf = dir.path().join("hf");
    ok(anneal(&["export", run_s, "--out", hf.to_str().unwrap()]));
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(hf.join(f).is_file(), "{f}");
    }
    // Never over a run or a non-empty directory without --force.
    let into_run = anneal(&["export", run_s, "--out", run_s]);
    assert!(!into_run.status.success(), "exported into the run itself");
    let again = anneal(&["export", run_s, "--out", hf.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success() && err.contains("--force"), "{err}");
    ok(anneal(&[
        "export",
        run_s,
        "--out",
        hf.to_str().unwrap(),
        "--force",
    ]));
    let logits = |m: &Path| {
        ok(anneal(&[
            "generate",
            m.to_str().unwrap(),
            "--prompt",
            "to be",
            "--show-logits",
        ]))
    };
    assert_eq!(
        logits(&run),
        logits(&hf),
        "the exported model computes the same logits"
    );

    // A tokenizer with more ids than the model embeds is refused by name, not discovered as a
    // perplexity of null on every document.
    let wide = dir.path().join("wide");
    std::fs::create_dir_all(&wide).unwrap();
    std::fs::write(wide.join("all.txt"), ('!'..='~').collect::<String>()).unwrap();
    let wide_data = dir.path().join("wide-data");
    ok(anneal(&[
        "data",
        "tokenize",
        "--input",
        wide.to_str().unwrap(),
        "--tokenizer",
        "chars",
        "--val-fraction",
        "0",
        "--quiet",
        "--out",
        wide_data.to_str().unwrap(),
    ]));
    std::fs::copy(wide_data.join("tokenizer.json"), hf.join("tokenizer.json")).unwrap();
    let out = anneal(&[
        "data",
        "pipeline",
        "--input",
        src.to_str().unwrap(),
        "--out",
        dir.path().join("scored").to_str().unwrap(),
        "--stages",
        "normalize",
        "--perplexity-model",
        hf.to_str().unwrap(),
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("tokenizer.json") && err.contains("embeds only"),
        "{err}"
    );
}

#[test]
fn config_errors_name_the_key_and_the_allowed_values() {
    let out = anneal(&["pretrain", "--set", "train.lr=fast"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("train.lr") && err.contains("fast") && err.contains("number"),
        "{err}"
    );
    let out = anneal(&["pretrain", "--set", "model.layers=3"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("model.layers") && err.contains("n_layer"),
        "{err}"
    );
    let out = anneal(&["pretrain", "--set", "data.dir=/nonexistent/corpus"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/corpus") && err.contains("anneal data tokenize"),
        "{err}"
    );
    // A run that cannot fit the machine is refused with its memory bound, before anything is
    // allocated (no allocation abort).
    let dir = tempfile::tempdir().unwrap();
    let data = tokenize(dir.path());
    for huge in [
        &[
            "--set",
            "model.n_embd=1000000",
            "--set",
            "model.n_head=1000",
        ][..],
        &["--set", "train.batch_size=1000000000"][..],
    ] {
        let out = pretrain(&data, &dir.path().join("run"), 10, huge)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(1)
                && err.contains("needs at least")
                && err.contains("--force"),
            "{huge:?}: {err}"
        );
        assert!(
            !dir.path().join("run").exists(),
            "a refused run leaves no directory"
        );
    }
}

/// `bench pretrain` with the PyTorch side off: anneal's run of the config, and its row.
#[test]
fn bench_pretrain_runs_with_the_reference_off() {
    let dir = tempfile::tempdir().unwrap();
    let data = tokenize(dir.path());
    let config = dir.path().join("run.toml");
    std::fs::write(&config, "[train]\nmax_steps = 10\n").unwrap();
    let mut args = vec![
        "bench".to_string(),
        "pretrain".into(),
        "--config".into(),
        config.display().to_string(),
        "--torch".into(),
        "off".into(),
    ];
    args.extend(settings(&data, &dir.path().join("run"), 10));
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let text = ok(anneal(&args));
    let row = text
        .lines()
        .find(|l| l.starts_with("| anneal"))
        .unwrap_or("");
    let loss: f64 = row
        .split('|')
        .nth(2)
        .and_then(|c| c.trim().parse().ok())
        .unwrap_or_else(|| panic!("no anneal row with a validation loss:\n{text}"));
    assert!(loss.is_finite() && loss > 0.0, "{text}");
    assert!(!text.contains("PyTorch"), "{text}");
}

/// Runs `args` with files limited to `kb` kilobytes (as a full disk would stop them: the write
/// fails with "File too large"), returning standard error.
#[cfg(unix)]
fn with_file_limit(kb: u64, args: &[&str]) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("trap '' XFSZ; ulimit -f {kb}; exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_anneal"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Hidden leftovers in `dir`.
fn hidden(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.') && n != ".lock")
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(unix)]
#[test]
fn a_full_disk_is_reported_with_the_file_and_leaves_nothing_half_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = tokenize(dir.path());
    let run = dir.path().join("run");
    ok(pretrain(&data, &run, 20, &[]).output().unwrap());
    let hf = dir.path().join("hf");
    let err = with_file_limit(
        8,
        &[
            "export",
            run.to_str().unwrap(),
            "--out",
            hf.to_str().unwrap(),
        ],
    );
    assert!(
        err.contains("model.safetensors") && err.contains("File too large"),
        "{err}"
    );
    assert!(
        !hf.exists() && hidden(dir.path()).is_empty(),
        "{:?}",
        hidden(dir.path())
    );

    let src = dir.path().join("src");
    let again = dir.path().join("again");
    let err = with_file_limit(
        8,
        &[
            "data",
            "tokenize",
            "--input",
            src.to_str().unwrap(),
            "--tokenizer",
            "chars",
            "--quiet",
            "--out",
            again.to_str().unwrap(),
        ],
    );
    assert!(
        err.contains("train-00000.bin") && err.contains("File too large"),
        "{err}"
    );
    assert!(
        !again.exists() && hidden(dir.path()).is_empty(),
        "{:?}",
        hidden(dir.path())
    );

    let full = dir.path().join("full");
    let mut args = vec!["pretrain".to_string(), "--quiet".into()];
    args.extend(settings(&data, &full, 20));
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let err = with_file_limit(8, &args);
    assert!(
        err.contains("model.safetensors") && err.contains("File too large"),
        "{err}"
    );
    let checkpoints = full.join("checkpoints");
    assert!(
        hidden(&checkpoints).is_empty() && hidden(&full).is_empty(),
        "{:?}",
        hidden(&checkpoints)
    );
}
