//! Text generation: sampling with temperature, top-k and nucleus (top-p) filtering over the
//! model's KV cache, and loading a model to generate from.
//!
//! Each new token runs one position through the model against the cached keys and values of the
//! context (O(context) attention work), instead of re-running the whole context. When the context
//! fills `block_size`, the cache is rebuilt from the last half of it and generation continues.

use crate::checkpoint;
use crate::config::RunConfig;
use anneal_data::Tokenizer;
use anneal_nn::{Gpt, KvCache, Llama};
use anneal_tensor::{Rng, Tensor};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// A model ready to generate or evaluate, and where it came from.
pub struct LoadedModel {
    /// The model.
    pub model: Gpt,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// The run configuration it was trained with (anneal checkpoints only).
    pub config: Option<RunConfig>,
    /// The directory it was loaded from.
    pub dir: PathBuf,
}

/// Loads a model from an anneal checkpoint directory, a run directory (its newest checkpoint),
/// or a Hugging Face GPT-2 directory (`config.json` + `model.safetensors`).
pub fn load_model(path: &Path) -> Result<LoadedModel> {
    let dir = if path.join("trainer_state.json").is_file() || path.join("config.json").is_file() {
        path.to_path_buf()
    } else if path.join("checkpoints").is_dir() {
        checkpoint::latest(&path.join("checkpoints"))
            .with_context(|| format!("{}: the run has no checkpoint yet", path.display()))?
    } else if path.join("model.safetensors").is_file() {
        bail!(
            "{}: holds model.safetensors but neither trainer_state.json (which an anneal \
             checkpoint needs) nor config.json (which a Hugging Face directory needs)",
            path.display()
        );
    } else {
        bail!(
            "{}: not a checkpoint (trainer_state.json), a run directory (checkpoints/), \
             or a Hugging Face directory (config.json)",
            path.display()
        );
    };
    if dir.join("trainer_state.json").is_file() {
        let loaded = checkpoint::load_weights(&dir)?;
        let config = loaded.config()?;
        let gpt = config.gpt_config(loaded.state.vocab_size)?;
        gpt.check_weights(&loaded.model).with_context(|| {
            format!(
                "{}: the model it describes is not the one in model.safetensors",
                dir.join("trainer_state.json").display()
            )
        })?;
        let model = Gpt::new(gpt, 0)?;
        loaded.restore_params(&model.params)?;
        let tokenizer = Tokenizer::from_json(&loaded.state.tokenizer)
            .with_context(|| format!("{}: tokenizer in trainer_state.json", dir.display()))?;
        Ok(LoadedModel {
            model,
            tokenizer,
            config: Some(config),
            dir,
        })
    } else {
        let (model, tokenizer) = crate::hf::load_dir(&dir)?;
        // Ids the tokenizer can give must have an embedding: refused here, by name, rather than
        // failing on the first text that uses them.
        if tokenizer.vocab_size() > model.config.vocab_size {
            bail!(
                "{}: {} tokens, but the model in {} embeds only {}: not this model's tokenizer",
                dir.join("tokenizer.json").display(),
                tokenizer.vocab_size(),
                dir.join("config.json").display(),
                model.config.vocab_size
            );
        }
        Ok(LoadedModel {
            model,
            tokenizer,
            config: None,
            dir,
        })
    }
}

/// How tokens are drawn.
#[derive(Clone, Copy, Debug)]
pub struct SampleOptions {
    /// Divides the logits; 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (Holtzman et al.
    /// 2020, "The Curious Case of Neural Text Degeneration"); 1 keeps all.
    pub top_p: f32,
    /// Seed of the draws.
    pub seed: u64,
    /// Tokens to generate.
    pub max_new_tokens: usize,
    /// Stop at the end-of-text token.
    pub stop_at_eos: bool,
}

impl Default for SampleOptions {
    fn default() -> Self {
        SampleOptions {
            temperature: 0.8,
            top_k: 200,
            top_p: 1.0,
            seed: 0,
            max_new_tokens: 200,
            stop_at_eos: true,
        }
    }
}

/// Draws one token from `logits` (one row) under `opts`.
pub fn pick(logits: &[f32], opts: &SampleOptions, rng: &mut Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &v)| if v > b.1 { (i, v) } else { b },
            )
            .0 as u32
    };
    if opts.temperature <= 0.0 {
        return argmax();
    }
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    if opts.top_k > 0 {
        order.truncate(opts.top_k);
    }
    let max = logits[order[0] as usize];
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| (((logits[i as usize] - max) / opts.temperature) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if opts.top_p < 1.0 {
        let mut cum = 0.0;
        let keep = probs
            .iter()
            .position(|&p| {
                cum += p;
                cum >= opts.top_p as f64
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let u = rng.uniform() as f64;
    let mut cum = 0.0;
    for (i, p) in probs.iter().enumerate() {
        cum += p;
        if u < cum {
            return order[i];
        }
    }
    order[probs.len() - 1]
}

/// What generation needs of a causal language model.
pub trait CausalLm {
    /// Tokens in the vocabulary (the width of a logits row).
    fn vocab_size(&self) -> usize;
    /// The longest context the model takes.
    fn context(&self) -> usize;
    /// Logits `[n, vocab]` of `ids` following the positions in `cache`, which grows by `n`.
    fn forward_cached(&self, ids: &[u32], cache: &mut KvCache) -> anneal_tensor::Result<Tensor>;
    /// Logits `[B, vocab]` of each row's last position for a left-padded batch `ids` `[B, n]`
    /// (see [`Llama::forward_rows_cached`]); models with learned positions do not batch.
    fn forward_rows_cached(
        &self,
        _ids: &[u32],
        _batch: usize,
        _cache: &mut KvCache,
        _starts: &[isize],
        _key_padding_mask: Vec<bool>,
    ) -> anneal_tensor::Result<Tensor> {
        Err(anneal_tensor::Error::Invalid {
            op: "generate",
            reason: "batched generation needs a model with rotary positions (Llama)".into(),
        })
    }
}

impl CausalLm for Gpt {
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    fn context(&self) -> usize {
        self.config.block_size
    }
    fn forward_cached(&self, ids: &[u32], cache: &mut KvCache) -> anneal_tensor::Result<Tensor> {
        Gpt::forward_cached(self, ids, cache)
    }
}

impl CausalLm for Llama {
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    fn context(&self) -> usize {
        self.config.max_positions
    }
    fn forward_cached(&self, ids: &[u32], cache: &mut KvCache) -> anneal_tensor::Result<Tensor> {
        Llama::forward_cached(self, ids, cache)
    }
    fn forward_rows_cached(
        &self,
        ids: &[u32],
        batch: usize,
        cache: &mut KvCache,
        starts: &[isize],
        key_padding_mask: Vec<bool>,
    ) -> anneal_tensor::Result<Tensor> {
        Llama::forward_rows_cached(self, ids, batch, cache, starts, Some(key_padding_mask))
    }
}

/// Generates after each of `prompts` at once: the prompts left-padded with `pad` to one length
/// (the padding masked, each row's positions starting at its first real token), one KV cache
/// for the batch, each row drawing with its own generator (seed + row, so row i draws as
/// `generate` does with that seed) and ending at its own first `stop` token. Returns each row's
/// new tokens. Rows that have ended ride along until every row has.
pub fn generate_batch<M: CausalLm + ?Sized>(
    model: &M,
    prompts: &[Vec<u32>],
    stop: &[u32],
    pad: u32,
    opts: &SampleOptions,
) -> Result<Vec<Vec<u32>>> {
    Ok(generate_batch_ended(model, prompts, stop, pad, opts)?
        .into_iter()
        .map(|(tokens, _)| tokens)
        .collect())
}

/// [`generate_batch`], each row's new tokens with the stop token that ended it (`None` when it
/// ran out of tokens or context first): a reply whose probability is wanted ends with it.
pub fn generate_batch_ended<M: CausalLm + ?Sized>(
    model: &M,
    prompts: &[Vec<u32>],
    stop: &[u32],
    pad: u32,
    opts: &SampleOptions,
) -> Result<Vec<(Vec<u32>, Option<u32>)>> {
    let b = prompts.len();
    if b == 0 {
        return Ok(Vec::new());
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        bail!("prompt {i} of the batch is empty");
    }
    let l = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if l >= model.context() {
        bail!(
            "the longest prompt is {l} tokens; the model's context is {}",
            model.context()
        );
    }
    let pads: Vec<usize> = prompts.iter().map(|p| l - p.len()).collect();
    let mut ids = Vec::with_capacity(b * l);
    let mut mask: Vec<Vec<bool>> = Vec::with_capacity(b);
    for (p, &np) in prompts.iter().zip(&pads) {
        ids.extend(std::iter::repeat_n(pad, np));
        ids.extend_from_slice(p);
        let mut m = vec![false; np];
        m.resize(l, true);
        mask.push(m);
    }
    let vocab = model.vocab_size();
    let mut cache = KvCache::new();
    let starts =
        |len: usize| -> Vec<isize> { pads.iter().map(|&p| len as isize - p as isize).collect() };
    let mut logits = model
        .forward_rows_cached(&ids, b, &mut cache, &starts(0), mask.concat())?
        .to_vec_f32();
    let mut rngs: Vec<Rng> = (0..b).map(|i| Rng::new(opts.seed + i as u64)).collect();
    let mut out = vec![Vec::new(); b];
    let mut ended = vec![None; b];
    let mut done = vec![false; b];
    for step in 0..opts.max_new_tokens {
        let mut next = vec![pad; b];
        for r in 0..b {
            if done[r] {
                continue;
            }
            let tok = pick(&logits[r * vocab..(r + 1) * vocab], opts, &mut rngs[r]);
            if opts.stop_at_eos && stop.contains(&tok) {
                done[r] = true;
                ended[r] = Some(tok);
                continue;
            }
            out[r].push(tok);
            next[r] = tok;
        }
        if done.iter().all(|&d| d)
            || step + 1 == opts.max_new_tokens
            || cache.len() + 1 > model.context()
        {
            break;
        }
        for (m, &d) in mask.iter_mut().zip(&done) {
            m.push(!d);
        }
        let at = starts(cache.len());
        logits = model
            .forward_rows_cached(&next, b, &mut cache, &at, mask.concat())?
            .to_vec_f32();
    }
    Ok(out.into_iter().zip(ended).collect())
}

/// Generates up to `opts.max_new_tokens` tokens after `prompt`, calling `on_token` with each as it
/// is drawn; returns the new tokens. `eos` ends generation (when `opts.stop_at_eos`) and starts
/// an empty prompt.
pub fn generate<M: CausalLm + ?Sized>(
    model: &M,
    prompt: &[u32],
    eos: Option<u32>,
    opts: &SampleOptions,
    on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    generate_until(model, prompt, eos.as_slice(), opts, on_token)
}

/// [`generate`], ending at any of the `stop` tokens (a chat model's end of turn and end of
/// text); the first of them starts an empty prompt.
pub fn generate_until<M: CausalLm + ?Sized>(
    model: &M,
    prompt: &[u32],
    stop: &[u32],
    opts: &SampleOptions,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    let block = model.context();
    let mut all: Vec<u32> = if prompt.is_empty() {
        vec![stop.first().copied().unwrap_or(0)]
    } else {
        prompt.to_vec()
    };
    if all.len() > block {
        all.drain(..all.len() - block);
    }
    let mut rng = Rng::new(opts.seed);
    let mut cache = KvCache::new();
    let last_row = |logits: anneal_tensor::Tensor| -> Vec<f32> {
        let v = logits.to_vec_f32();
        let vocab = model.vocab_size();
        v[v.len() - vocab..].to_vec()
    };
    let mut logits = last_row(model.forward_cached(&all, &mut cache)?);
    let mut out = Vec::with_capacity(opts.max_new_tokens);
    for _ in 0..opts.max_new_tokens {
        let tok = pick(&logits, opts, &mut rng);
        if opts.stop_at_eos && stop.contains(&tok) {
            break;
        }
        out.push(tok);
        all.push(tok);
        on_token(tok);
        if cache.len() + 1 > block {
            // Context full: keep its last half and rebuild the cache from it.
            cache.clear();
            let keep = all[all.len() - block / 2..].to_vec();
            logits = last_row(model.forward_cached(&keep, &mut cache)?);
        } else {
            logits = last_row(model.forward_cached(&[tok], &mut cache)?);
        }
    }
    Ok(out)
}

/// Generates a completion of `prompt` as text.
pub fn complete(loaded: &LoadedModel, prompt: &str, opts: &SampleOptions) -> Result<String> {
    let ids = loaded.tokenizer.encode(prompt)?;
    let new = generate(&loaded.model, &ids, loaded.tokenizer.eos(), opts, |_| {})?;
    Ok(loaded.tokenizer.decode(&new)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_top_k_and_top_p() {
        let logits = [0.0, 3.0, 1.0, 2.9];
        let mut rng = Rng::new(0);
        let greedy = SampleOptions {
            temperature: 0.0,
            ..Default::default()
        };
        assert_eq!(pick(&logits, &greedy, &mut rng), 1);
        let top2 = SampleOptions {
            temperature: 1.0,
            top_k: 2,
            ..Default::default()
        };
        for _ in 0..200 {
            let t = pick(&logits, &top2, &mut rng);
            assert!(t == 1 || t == 3);
        }
        // p(1) ≈ 0.47: a nucleus of 0.4 keeps token 1 alone.
        let nucleus = SampleOptions {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.4,
            ..Default::default()
        };
        for _ in 0..50 {
            assert_eq!(pick(&logits, &nucleus, &mut rng), 1);
        }
        let all = SampleOptions {
            temperature: 1.0,
            top_k: 0,
            ..Default::default()
        };
        let seen: std::collections::HashSet<u32> =
            (0..400).map(|_| pick(&logits, &all, &mut rng)).collect();
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn generation_is_seeded_and_survives_a_full_context() {
        let model = Gpt::new(
            anneal_nn::GptConfig {
                vocab_size: 13,
                block_size: 8,
                n_layer: 1,
                n_head: 2,
                n_embd: 8,
                ..anneal_nn::GptConfig::gpt2()
            },
            5,
        )
        .unwrap();
        let opts = SampleOptions {
            max_new_tokens: 30,
            stop_at_eos: false,
            seed: 9,
            ..Default::default()
        };
        let mut streamed = Vec::new();
        let a = generate(&model, &[1, 2, 3], None, &opts, |t| streamed.push(t)).unwrap();
        assert_eq!(a.len(), 30, "runs past block_size by rebuilding the cache");
        assert_eq!(a, streamed);
        let b = generate(&model, &[1, 2, 3], None, &opts, |_| {}).unwrap();
        assert_eq!(a, b);
        let c = generate(
            &model,
            &[1, 2, 3],
            None,
            &SampleOptions { seed: 10, ..opts },
            |_| {},
        )
        .unwrap();
        assert_ne!(a, c);
    }
}
