//! `anneal generate` and `anneal chat` on a GGUF file: the tiny random Llama of
//! `tests/fixtures/make_llama_fixtures.py`, whose greedy tokens transformers recorded.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn anneal(args: &[&str]) -> Output {
    let o = Command::new(env!("CARGO_BIN_EXE_anneal"))
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

#[test]
fn generate_continues_a_prompt_greedily_as_transformers_does() {
    let model = fixtures().join("tiny-llama.gguf");
    let model = model.to_str().unwrap();
    let reference =
        anneal_tensor::io::load_safetensors(&fixtures().join("tiny-llama.safetensors")).unwrap();
    let want: Vec<u32> = reference["greedy.0"]
        .to_vec_f32()
        .iter()
        .map(|&v| v as u32)
        .collect();
    let prompt = "The capital of France is";
    let o = anneal(&[
        "generate",
        model,
        "--prompt",
        prompt,
        "--temperature",
        "0",
        "--tokens",
        "50",
    ]);
    let text = String::from_utf8(o.stdout).unwrap();
    let m = anneal_train::llama_gguf::load(&fixtures().join("tiny-llama.gguf"), None).unwrap();
    // The reference ran past end-of-turn tokens; generate stops at the first.
    let stop = want
        .iter()
        .position(|t| m.stop_tokens.contains(t))
        .unwrap_or(want.len());
    let expected = format!("{prompt}{}\n", m.tokenizer.decode(&want[..stop]).unwrap());
    assert_eq!(text, expected);

    // Two prompts as one left-padded batch: each row continues as it does alone.
    let other = "Once upon a time, in a land far away,";
    let want2: Vec<u32> = reference["greedy.2"]
        .to_vec_f32()
        .iter()
        .map(|&v| v as u32)
        .collect();
    let stop2 = want2
        .iter()
        .position(|t| m.stop_tokens.contains(t))
        .unwrap_or(want2.len());
    let o = anneal(&[
        "generate",
        model,
        "--prompt",
        prompt,
        "--prompt",
        other,
        "--temperature",
        "0",
        "--tokens",
        "50",
    ]);
    let text = String::from_utf8(o.stdout).unwrap();
    assert_eq!(
        text,
        format!(
            "--- prompt 1 ---\n{expected}--- prompt 2 ---\n{other}{}\n",
            m.tokenizer.decode(&want2[..stop2]).unwrap()
        )
    );

    let o = anneal(&["generate", model, "--prompt", prompt, "--show-logits"]);
    let shown = String::from_utf8(o.stdout).unwrap();
    let all = shown.lines().find_map(|l| l.strip_prefix("all: ")).unwrap();
    let logits: Vec<f32> = serde_json::from_str(all).unwrap();
    let want = reference["logits.0"].to_vec_f32();
    assert_eq!(logits.len(), want.len());
    for (g, w) in logits.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-3 * w.abs().max(1.0), "{g} vs {w}");
    }
}

#[test]
fn chat_answers_each_message_through_the_template() {
    let model = fixtures().join("tiny-llama.gguf");
    let o = anneal(&[
        "chat",
        model.to_str().unwrap(),
        "--message",
        "What is 2+2?",
        "--message",
        "And 3+3?",
        "--temperature",
        "0",
        "--tokens",
        "8",
        "--show-prompt",
    ]);
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(out.contains("> What is 2+2?"), "{out}");
    assert!(out.contains(
        "[prompt]\n<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by \
         Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n[/prompt]"
    ), "{out}");
    // The second prompt holds the first exchange.
    let second = out.split("[prompt]").nth(2).unwrap();
    assert!(second.contains("What is 2+2?<|im_end|>\n<|im_start|>assistant\n"));
    assert!(second.contains("<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"));

    // A file without a template is refused by name.
    let o = Command::new(env!("CARGO_BIN_EXE_anneal"))
        .args(["chat", "no-such-model.gguf", "--message", "hi"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no-such-model.gguf"));
}

/// `root/*.yml`: ChatterBot conversations of two or four turns.
fn chatterbot(root: &Path) {
    let mut yml = String::from("categories:\n- test\nconversations:\n");
    for i in 0..20 {
        yml.push_str(&format!(
            "- - What is {i} plus {i}?\n  - It is {}.\n",
            2 * i
        ));
        if i % 4 == 0 {
            yml.push_str("  - Thanks!\n  - You are welcome.\n");
        }
    }
    std::fs::write(root.join("sums.yml"), yml).unwrap();
    std::fs::write(root.join("broken.yml"), "conversations: [unclosed\n").unwrap();
}

#[test]
fn finetune_trains_a_chat_model_on_its_assistant_turns() {
    let data = tempfile::tempdir().unwrap();
    chatterbot(data.path());
    let outs = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-llama.gguf");
    for (method, lr) in [("full", "3e-3"), ("lora", "3e-2")] {
        let json = outs.path().join(format!("{method}.json"));
        let out = outs.path().join(method);
        let sets = [
            format!("model.dir={}", model.display()),
            "data.format=chatterbot".to_string(),
            format!("data.dir={}", data.path().display()),
            "data.max_tokens=128".into(),
            "data.test_every=5".into(),
            format!("train.method={method}"),
            format!("train.lr={lr}"),
            "train.steps=12".into(),
            "train.batch_size=4".into(),
            "train.warmup_steps=0".into(),
            "train.weight_decay=0".into(),
            "lora.targets=[\"q_proj\", \"v_proj\"]".into(),
            format!("train.out={}", out.display()),
        ];
        let mut args = vec!["finetune".to_string()];
        for s in &sets {
            args.extend(["--set".to_string(), s.clone()]);
        }
        args.extend(["--json".to_string(), json.display().to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = anneal(&args);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(stdout.contains("held-out assistant-token loss"), "{stdout}");
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        // 20 conversations: every fifth (4) held out; the broken file is skipped, not fatal.
        assert_eq!(r["heldout_conversations"], 4, "{method}");
        assert_eq!(r["train_conversations"], 16, "{method}");
        let (before, after) = (
            r["heldout_loss_before"].as_f64().unwrap(),
            r["heldout_loss_after"].as_f64().unwrap(),
        );
        assert!(after < before, "{method}: held-out loss {before} → {after}");
        assert_eq!(r["samples"].as_array().unwrap().len(), 3);
        let (trainable, total) = (
            r["trainable"].as_u64().unwrap(),
            r["total"].as_u64().unwrap(),
        );
        if method == "lora" {
            assert!(trainable < total / 10);
            let c: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(c["task_type"], "CAUSAL_LM");
            let saved = anneal_tensor::io::load_safetensors(&out.join("adapter_model.safetensors"))
                .unwrap();
            assert!(saved
                .contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
            // The adapter applied to the base replies as the trained model did.
            let sample = &r["samples"][0];
            let (question, after) = (sample[0].as_str().unwrap(), sample[3].as_str().unwrap());
            let o = anneal(&[
                "chat",
                model.to_str().unwrap(),
                "--adapter",
                out.to_str().unwrap(),
                "--message",
                question,
                "--temperature",
                "0",
                "--tokens",
                "48",
            ]);
            let reply = String::from_utf8(o.stdout).unwrap();
            let reply = reply.lines().skip(1).collect::<Vec<_>>().join("\n");
            assert_eq!(reply.trim(), after, "{question}");
        } else {
            assert_eq!(trainable, total);
            // A Hugging Face Llama directory that generates.
            anneal(&[
                "generate",
                out.to_str().unwrap(),
                "--prompt",
                "What is",
                "--tokens",
                "4",
            ]);
        }
    }
    // A method chat fine-tuning has no use for is named.
    let o = Command::new(env!("CARGO_BIN_EXE_anneal"))
        .args([
            "finetune",
            "--set",
            "data.format=chatterbot",
            "--set",
            "train.method=head",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("train.method"));
}
