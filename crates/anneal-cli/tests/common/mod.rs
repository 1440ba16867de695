//! Helpers shared by the CLI's end-to-end tests: running the binary, a small corpus, its
//! tokenized dataset, a tiny pretraining run, and its logged losses.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn anneal(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_anneal"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the anneal binary runs")
}

pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The error output of a run that must fail.
pub fn fails(out: Output) -> String {
    assert!(
        !out.status.success(),
        "succeeded where it should fail:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A small corpus with enough structure to learn: numbered verses of a few fixed lines.
pub fn corpus(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let lines = [
        "the quick brown fox jumps over the lazy dog.",
        "a stitch in time saves nine, and so on.",
        "to be, or not to be: that is the question.",
        "all that glitters is not gold; all who wander are not lost.",
    ];
    for f in 0..4 {
        let mut text = String::new();
        for i in 0..300 {
            text += &format!("{} {}\n", i % 17, lines[(i * 7 + f) % lines.len()]);
        }
        std::fs::write(src.join(format!("part{f}.txt")), text).unwrap();
    }
    // One line of invalid UTF-8: skipped and reported, never fatal.
    std::fs::write(src.join("broken.txt"), b"fine line\n\xff\xfe bad\n").unwrap();
    src
}

pub fn tokenize(dir: &Path) -> PathBuf {
    let src = corpus(dir);
    let data = dir.join("data");
    let out = ok(anneal(&[
        "data",
        "tokenize",
        "--input",
        src.to_str().unwrap(),
        "--tokenizer",
        "chars",
        "--split",
        "tail",
        "--val-fraction",
        "0.1",
        "--out",
        data.to_str().unwrap(),
        "--quiet",
    ]));
    assert!(
        out.contains("1 bad inputs skipped") && out.contains("broken.txt:2"),
        "{out}"
    );
    data
}

pub fn settings(data: &Path, out: &Path, steps: u64) -> Vec<String> {
    [
        format!("data.dir={}", data.display()),
        format!("train.out_dir={}", out.display()),
        "model.n_layer=2".into(),
        "model.n_head=2".into(),
        "model.n_embd=48".into(),
        "model.block_size=32".into(),
        "model.dropout=0.1".into(),
        "train.batch_size=8".into(),
        format!("train.max_steps={steps}"),
        "train.warmup_steps=10".into(),
        "train.eval_interval=50".into(),
        "train.eval_batches=2".into(),
        "train.checkpoint_interval=20".into(),
        "train.keep_checkpoints=2".into(),
        "train.grad_accum=2".into(),
        "train.threads=2".into(),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

pub fn pretrain(data: &Path, out: &Path, steps: u64, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_anneal"));
    c.arg("pretrain")
        .arg("--quiet")
        .args(settings(data, out, steps))
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// (step, loss) pairs.
pub type Curve = Vec<(u64, f64)>;

/// (step, loss) of every training step in metrics.jsonl, and (step, val_loss) of every evaluation.
pub fn losses(out: &Path) -> (Curve, Curve) {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let step = v["step"].as_u64().unwrap();
        if let Some(l) = v["loss"].as_f64() {
            train.push((step, l));
        } else if let Some(l) = v["val_loss"].as_f64() {
            val.push((step, l));
        }
    }
    (train, val)
}

/// Waits until the run has logged at least `step` steps; fails if it exits first.
pub fn wait_for_step(child: &mut Child, out: &Path, step: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = losses(out).0.last().map_or(0, |l| l.0);
        if done >= step {
            return done;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before step {step}");
        }
        assert!(Instant::now() < deadline, "no progress to step {step}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}
