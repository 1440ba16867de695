//! `anneal finetune` end to end on the tiny random BERT of `tests/fixtures/` and a small corpus
//! of two topics written from its vocabulary: the three methods train, the test set is every
//! fifth document, and configuration faults name their key.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn anneal(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_anneal"))
        .args(args)
        .output()
        .unwrap()
}

/// `root/animals/NNN.txt` and `root/sky/NNN.txt`, 15 of each, each a few of its topic's words.
fn corpus(root: &Path) {
    let animals = ["cat", "dog", "fox"];
    let sky = ["sun", "moon", "night"];
    for (class, words) in [("animals", animals), ("sky", sky)] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..15 {
            let text: Vec<&str> = (0..1 + i % 4).map(|k| words[(i + k) % 3]).collect();
            let text = format!("the {}", text.join(" "));
            std::fs::write(root.join(class).join(format!("{i:03}.txt")), text).unwrap();
        }
    }
}

#[test]
fn finetune_trains_each_method_and_reports_test_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    corpus(dir.path());
    // Outputs outside the corpus, whose every directory is a class.
    let outs = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-bert");
    for (method, lr) in [("full", "1e-2"), ("lora", "2e-2"), ("head", "5e-2")] {
        let json = dir.path().join(format!("{method}.json"));
        let sets = [
            format!("model.dir={}", model.display()),
            format!("data.dir={}", dir.path().display()),
            format!("train.method={method}"),
            format!("train.lr={lr}"),
            "train.min_lr=0".into(),
            "train.steps=30".into(),
            "train.batch_size=8".into(),
            "train.warmup_steps=0".into(),
            "train.dropout=0".into(),
            "data.max_tokens=16".into(),
            "lora.targets=[\"query\", \"value\"]".into(),
            format!("train.out={}", outs.path().join(method).display()),
        ];
        let mut args = vec!["finetune".to_string()];
        for s in &sets {
            args.extend(["--set".to_string(), s.clone()]);
        }
        args.extend(["--json".to_string(), json.display().to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = anneal(&args);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{method}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(stdout.contains("test accuracy"), "{stdout}");
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        // 30 documents: every fifth (6) is the test set, 3 of each class.
        let confusion: Vec<Vec<u64>> = serde_json::from_value(report["confusion"].clone()).unwrap();
        assert_eq!(confusion.iter().flatten().sum::<u64>(), 6, "{method}");
        assert_eq!(confusion[0].iter().sum::<u64>(), 3, "{method}");
        let losses: Vec<f64> = serde_json::from_value(report["losses"].clone()).unwrap();
        let (first, last) = (losses[0], *losses.last().unwrap());
        assert!(last < first, "{method}: loss {first} → {last}");
        let (trainable, total) = (
            report["trainable"].as_u64().unwrap(),
            report["total"].as_u64().unwrap(),
        );
        match method {
            "full" => {
                assert_eq!(trainable, total);
                assert_eq!(report["accuracy"].as_f64().unwrap(), 1.0, "{stdout}");
            }
            // The head: 2 classes × 32 + 2.
            "head" => assert_eq!(trainable, 66),
            _ => assert!(trainable < total / 10, "{trainable} of {total}"),
        }
        // Optimizer state: two moments of each trained parameter.
        assert_eq!(report["optimizer_bytes"].as_u64().unwrap(), 8 * trainable);
        // The result: under LoRA a PEFT adapter directory of the adapters and the head alone.
        let out = outs.path().join(method);
        if method == "lora" {
            let saved = anneal_tensor::io::load_safetensors(&out.join("adapter_model.safetensors"))
                .unwrap();
            let numel: usize = saved.values().map(|t| t.numel()).sum();
            assert_eq!(numel as u64, trainable);
            assert!(out.join("adapter_config.json").is_file());
        } else {
            let saved =
                anneal_tensor::io::load_safetensors(&out.join("model.safetensors")).unwrap();
            let numel: usize = saved.values().map(|t| t.numel()).sum();
            assert_eq!(numel as u64, total);
        }
    }
}

#[test]
fn finetune_config_faults_name_the_key() {
    for (set, words) in [
        ("train.method=adapter", "\"full\", \"lora\" or \"head\""),
        ("train.batch_size=0", "train.batch_size"),
        ("lora.rnk=4", "[lora] allows"),
        ("data.dir=/nonexistent/corpus", "/nonexistent/corpus"),
        ("data.format=csv", "data.format"),
    ] {
        let o = anneal(&["finetune", "--set", set]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(words), "{set}: {err}");
    }
}

#[test]
fn finetune_freezes_by_pattern_and_by_lower_blocks() {
    let dir = tempfile::tempdir().unwrap();
    corpus(dir.path());
    let model = fixtures().join("tiny-bert");
    let run = |extra: &[&str]| -> (Output, Option<serde_json::Value>) {
        let json = dir.path().join("freeze.json");
        let _ = std::fs::remove_file(&json);
        let mut args = vec![
            "finetune".to_string(),
            "--set".into(),
            format!("model.dir={}", model.display()),
            "--set".into(),
            format!("data.dir={}", dir.path().display()),
            "--set".into(),
            "train.steps=2".into(),
            "--set".into(),
            "data.max_tokens=16".into(),
            "--json".into(),
            json.display().to_string(),
        ];
        for e in extra {
            args.extend(["--set".to_string(), e.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = anneal(&args);
        let report = std::fs::read_to_string(&json)
            .ok()
            .map(|t| serde_json::from_str(&t).unwrap());
        (o, report)
    };
    let (_, all) = run(&[]);
    let all = all.unwrap();
    let total = all["total"].as_u64().unwrap();
    assert_eq!(all["trainable"].as_u64().unwrap(), total);
    // The tiny BERT: embeddings (word, position and token-type rows of its width, and a
    // LayerNorm), 2 layers, and the head (2 classes).
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    let k = |key: &str| c[key].as_u64().unwrap();
    let d = k("hidden_size");
    let embeddings =
        (k("vocab_size") + k("max_position_embeddings") + k("type_vocab_size")) * d + 2 * d;
    let (_, lower) = run(&["train.freeze_lower_blocks=1"]);
    let lower = lower.unwrap();
    let layer = (total - 2 * d - 2 - embeddings) / k("num_hidden_layers");
    assert_eq!(
        lower["trainable"].as_u64().unwrap(),
        total - embeddings - layer
    );
    let (_, biases) = run(&["train.freeze=[\"*.bias\", \"embeddings.*\"]"]);
    let biases = biases.unwrap()["trainable"].as_u64().unwrap();
    assert!(biases < total - embeddings, "{biases}");
    for (set, words) in [
        ("train.freeze=[\"decoder.*\"]", "decoder.*"),
        ("train.freeze_lower_blocks=3", "2 blocks"),
    ] {
        let (o, _) = run(&[set]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(words), "{set}: {err}");
    }
}

#[test]
fn bench_proxy_reports_every_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    corpus(dir.path());
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\ndir = {:?}\n[data]\ndir = {:?}\nmax_tokens = 16\n[train]\nsteps = 2\n\
             batch_size = 4\n",
            fixtures().join("tiny-bert").display().to_string(),
            dir.path().display().to_string()
        ),
    )
    .unwrap();
    let json = dir.path().join("proxy.json");
    let o = anneal(&[
        "bench",
        "proxy",
        "--config",
        config.to_str().unwrap(),
        "--llm",
        fixtures().join("tiny-llama.gguf").to_str().unwrap(),
        "--lora-steps",
        "2",
        "--article-tokens",
        "8",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("A proxy, not a replication"), "{stdout}");
    assert!(
        stdout.contains("predicted classes: zero-shot: animals"),
        "{stdout}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for v in [
        &r["minilm_accuracy"],
        &r["smollm2"]["zero_shot"],
        &r["smollm2"]["five_shot"],
        &r["smollm2"]["lora"],
    ] {
        let a = v.as_f64().unwrap();
        assert!((0.0..=1.0).contains(&a), "{r}");
    }
    assert_eq!(r["smollm2"]["test_articles"], 6);
}
