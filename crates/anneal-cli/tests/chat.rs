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
