//! A proxy, and only a proxy, for InstructGPT's finding that tuning on the task beats scale
//! (Ouyang et al. 2022: a 1.3B model tuned to follow instructions preferred over the 175B
//! GPT-3): on BBC news topics, the 22M-parameter MiniLM fine-tuned on the labels against the
//! 135M-parameter SmolLM2-135M-Instruct used zero-shot, 5-shot and with LoRA on the same labels.
//!
//! SmolLM2 classifies by the log-likelihood of each class name after a prompt
//! (`Article: … \nTopic:` then ` business`, ` sport`, …; Brown et al. 2020's scoring of
//! multiple-choice tasks): the class whose name it finds likeliest.

use crate::chat_sft::{llama_with, train_masked};
use crate::finetune::{read_class_dirs, resolve, ClassCorpus, FinetuneConfig, TrainSection};
use anneal_data::Tokenizer;
use anneal_nn::layers::LoraConfig;
use anneal_nn::{KvCache, Llama};
use anyhow::{Context, Result};
use serde::Serialize;

/// The experiment's knobs.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    /// The causal LM (a Llama GGUF file or Hugging Face directory).
    pub llm: String,
    /// Article tokens in each prompt (and in each example shot).
    pub article_tokens: usize,
    /// Tokens of each example article in the 5-shot prompt.
    pub shot_tokens: usize,
    /// Test articles scored (0: all).
    pub test_limit: usize,
    /// The LoRA run on the labels.
    pub train: TrainSection,
    /// Its adapters.
    pub lora: LoraConfig,
}

/// Every accuracy the experiment measured.
#[derive(Clone, Debug, Serialize)]
pub struct ProxyReport {
    /// Test articles scored.
    pub test_articles: usize,
    /// SmolLM2 zero-shot.
    pub zero_shot: f64,
    /// SmolLM2 with one example of each class in the prompt.
    pub five_shot: f64,
    /// SmolLM2 after LoRA on the training labels (the class name's tokens predicted).
    pub lora: f64,
    /// Seconds per LoRA step.
    pub lora_seconds_per_step: f64,
    /// How often each class was predicted, per method (zero-shot, 5-shot, LoRA): a
    /// prompt-biased LM favours one name whatever the article.
    pub predicted: Vec<Vec<usize>>,
}

fn prompt_ids(tok: &Tokenizer, article: &str, tokens: usize) -> Result<Vec<u32>> {
    let mut ids = tok.encode("Article: ")?;
    let body = tok.encode(article.trim())?;
    ids.extend_from_slice(&body[..body.len().min(tokens)]);
    ids.extend(tok.encode("\nTopic:")?);
    Ok(ids)
}

/// The index of the class whose name is likeliest after `prefix` (already in `cache`) then
/// `query`.
fn classify(model: &Llama, cache: &KvCache, query: &[u32], names: &[Vec<u32>]) -> Result<usize> {
    let mut cache = cache.clone();
    let logits = model.forward_cached(query, &mut cache)?.to_vec_f32();
    let v = model.config.vocab_size;
    let last = &logits[logits.len() - v..];
    let log_softmax = |row: &[f32]| -> Vec<f64> {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max
            + row
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        row.iter().map(|&x| x as f64 - lse).collect()
    };
    let first = log_softmax(last);
    let mut best = (0, f64::NEG_INFINITY);
    for (c, name) in names.iter().enumerate() {
        let mut score = first[name[0] as usize];
        if name.len() > 1 {
            // Later tokens of a multi-token name, each given the ones before.
            let mut c_cache = cache.clone();
            let l = model
                .forward_cached(&name[..name.len() - 1], &mut c_cache)?
                .to_vec_f32();
            for (k, &t) in name[1..].iter().enumerate() {
                score += log_softmax(&l[k * v..(k + 1) * v])[t as usize];
            }
        }
        if score > best.1 {
            best = (c, score);
        }
    }
    Ok(best.0)
}

/// Accuracy of `model` on `test`, every prompt following the tokens of `prefix`, and how often
/// each class was predicted.
fn accuracy(
    tok: &Tokenizer,
    model: &Llama,
    prefix: &[u32],
    test: &[(String, i64)],
    names: &[Vec<u32>],
    article_tokens: usize,
) -> Result<(f64, Vec<usize>)> {
    let mut cache = KvCache::new();
    if !prefix.is_empty() {
        model.forward_cached(prefix, &mut cache)?;
    }
    let (mut right, mut counts) = (0, vec![0; names.len()]);
    for (text, label) in test {
        let query = prompt_ids(tok, text, article_tokens)?;
        let c = classify(model, &cache, &query, names)?;
        counts[c] += 1;
        if c == *label as usize {
            right += 1;
        }
    }
    Ok((right as f64 / test.len().max(1) as f64, counts))
}

/// Runs the SmolLM2 side of the experiment on `corpus` (BBC news by `config.data`).
pub fn run(opts: &ProxyOptions, corpus: &ClassCorpus) -> Result<ProxyReport> {
    let path = resolve(&opts.llm);
    let m = if crate::llama_gguf::is_gguf(&path) {
        crate::llama_gguf::load(&path, Some(opts.lora.clone()))?
    } else {
        crate::hf_llama::load_dir(&path, Some(opts.lora.clone()))?
    };
    let names: Vec<Vec<u32>> = corpus
        .classes
        .iter()
        .map(|c| m.tokenizer.encode(&format!(" {c}")))
        .collect::<std::result::Result<_, _>>()?;
    let header = format!(
        "Classify the topic of each news article as one of: {}.\n\n",
        corpus.classes.join(", ")
    );
    let header_ids = m.tokenizer.encode(&header)?;
    let limit = if opts.test_limit == 0 {
        corpus.test.len()
    } else {
        opts.test_limit.min(corpus.test.len())
    };
    // Every fifth test article: the classes stay balanced when the set is cut.
    let step = (corpus.test.len() / limit.max(1)).max(1);
    let test: Vec<(String, i64)> = corpus
        .test
        .iter()
        .step_by(step)
        .take(limit)
        .cloned()
        .collect();
    let tok = m.tokenizer.clone();
    let (zero_shot, zero_counts) = accuracy(
        &tok,
        &m.model,
        &header_ids,
        &test,
        &names,
        opts.article_tokens,
    )?;
    tracing::info!("zero-shot: {:.2}%", 100.0 * zero_shot);
    // 5-shot: the first training article of each class, in class order.
    let mut shots = header_ids.clone();
    for (c, name) in names.iter().enumerate() {
        let (text, _) = corpus
            .train
            .iter()
            .find(|(_, l)| *l as usize == c)
            .context("a class without training articles")?;
        shots.extend(prompt_ids(&tok, text, opts.shot_tokens)?);
        shots.extend(name);
        shots.extend(m.tokenizer.encode("\n\n")?);
    }
    let (five_shot, five_counts) =
        accuracy(&tok, &m.model, &shots, &test, &names, opts.article_tokens)?;
    tracing::info!("5-shot: {:.2}%", 100.0 * five_shot);
    // LoRA on the labels: each training article's prompt, its class name predicted.
    let mut examples = Vec::with_capacity(corpus.train.len());
    for (text, label) in &corpus.train {
        let mut ids = header_ids.clone();
        ids.extend(prompt_ids(&tok, text, opts.article_tokens)?);
        let start = ids.len();
        ids.extend(&names[*label as usize]);
        let mut predicted = vec![false; ids.len()];
        predicted[start..].fill(true);
        examples.push((ids, predicted));
    }
    let config = m.model.config.clone();
    let mut model = m.model;
    model.params.train_only(LoraConfig::is_adapter);
    let pad = m.stop_tokens.first().copied().unwrap_or(0);
    let run = train_masked(model, examples, pad, &opts.train, &mut |step, loss| {
        if step % 10 == 0 {
            tracing::info!("LoRA step {step}: loss {loss:.4}");
        }
    })?;
    let tuned = llama_with(
        config,
        Some(opts.lora.clone()),
        run.trainer.model().params(),
    )?;
    let (lora, lora_counts) = accuracy(
        &tok,
        &tuned,
        &header_ids,
        &test,
        &names,
        opts.article_tokens,
    )?;
    tracing::info!("LoRA: {:.2}%", 100.0 * lora);
    Ok(ProxyReport {
        test_articles: test.len(),
        zero_shot,
        five_shot,
        lora,
        lora_seconds_per_step: run.seconds_per_step,
        predicted: vec![zero_counts, five_counts, lora_counts],
    })
}

/// The BBC corpus of `config` (the classification config's `data` section).
pub fn corpus(config: &FinetuneConfig) -> Result<ClassCorpus> {
    read_class_dirs(&resolve(&config.data.dir), config.data.test_every)
}
