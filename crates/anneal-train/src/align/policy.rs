//! The chat policy every alignment stage trains: a Llama chat model with LoRA adapters (only
//! they train), its tokenizer and chat template; the optimizer step the stages share; and the
//! held-out exact-answer evaluation.
//!
//! An earlier stage's adapters (SFT's, say) are merged into the base weights when a stage
//! loads, and the stage adds fresh adapters of its own. The merged model is then both where the
//! policy starts and its reference: the reference is the same weights read with the adapters
//! switched off ([`anneal_nn::Llama::forward_base`]), so policy, reference and value head share
//! one frozen base in memory.

use crate::align::logprobs::{pack, PackedReplies};
use crate::align::tasks::Problem;
use crate::chat::{ChatTemplate, Message};
use crate::chat_sft::encode_conversation;
use crate::generate::{generate_batch_ended, SampleOptions};
use crate::llama_gguf::LlamaModel;
use crate::schedule::CosineSchedule;
use anneal_nn::layers::LoraConfig;
use anneal_nn::Llama;
use anneal_tensor::optim::{AdamW, AdamWConfig};
use anneal_tensor::{Optimizer, ParamStore};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;

/// A chat model with trainable LoRA adapters.
pub struct ChatPolicy {
    /// The model, its tokenizer and stop tokens.
    pub lm: LlamaModel,
    /// Its chat template.
    pub template: ChatTemplate,
    /// The adapters this stage trains.
    pub lora: LoraConfig,
    /// The token that pads batches.
    pub pad: u32,
}

impl ChatPolicy {
    /// Loads the chat model at `model` (a Llama GGUF file or Hugging Face directory), merges
    /// the PEFT adapters at `fold` into its weights when given, and adds fresh `lora` adapters,
    /// the only parameters trained.
    pub fn load(model: &Path, fold: Option<&Path>, lora: LoraConfig) -> Result<ChatPolicy> {
        let mut lm = match fold {
            None => crate::chat_sft::load(model, Some(lora.clone()))?,
            Some(dir) => {
                let layout = crate::peft::PeftLayout {
                    prefix: "",
                    modules_to_save: &[],
                    task_type: Some("CAUSAL_LM"),
                    base_model: "",
                };
                let (earlier, tensors) = crate::peft::load(dir, &layout)
                    .with_context(|| format!("reading the adapters in {}", dir.display()))?;
                let mut lm = crate::chat_sft::load(model, Some(earlier))?;
                let params = &lm.model.params;
                for (name, t) in &tensors {
                    let id = params.id(name).with_context(|| {
                        format!("{}: adapter {name} is not in the model", dir.display())
                    })?;
                    params.set(id, t)?;
                }
                lm.model.set_lora_merged(true)?;
                // A fresh model with this stage's adapters, holding the merged weights.
                let mut fresh = Llama::for_loading(lm.model.config.clone(), Some(lora.clone()))?;
                for (name, t) in lm.model.params.named() {
                    if !LoraConfig::is_adapter(&name) {
                        fresh.params.set(fresh.params.id(&name)?, &t)?;
                    }
                }
                fresh.config.dropout = 0.0;
                lm.model = fresh;
                lm
            }
        };
        lm.model.params.train_only(LoraConfig::is_adapter);
        let Some(template) = lm.chat_template.clone() else {
            bail!("{}: the model carries no chat template", model.display());
        };
        let pad = lm.stop_tokens.first().copied().unwrap_or(0);
        Ok(ChatPolicy {
            lm,
            template,
            lora,
            pad,
        })
    }

    /// The model.
    pub fn model(&self) -> &Llama {
        &self.lm.model
    }

    /// The tokens of `prompt` as a user turn, up to where the assistant's reply begins.
    pub fn prompt_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        self.lm.encode(
            &self
                .template
                .render(&[Message::new("user", prompt)], true)?,
        )
    }

    /// `prompt` and `reply` as the model reads them: the prompt's tokens and the reply's,
    /// the end-of-turn markup that closes the reply included.
    pub fn example(&self, prompt: &str, reply: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let (tokens, predicted) =
            encode_conversation(&self.lm, &self.template, &[prompt.into(), reply.into()])?;
        let start = predicted.iter().position(|&p| p).unwrap_or(tokens.len());
        let end = predicted.iter().rposition(|&p| p).map_or(start, |e| e + 1);
        Ok((tokens[..start].to_vec(), tokens[start..end].to_vec()))
    }

    /// Decodes reply tokens as text (a closing stop token dropped).
    pub fn decode(&self, reply: &[u32]) -> Result<String> {
        let end = match reply.last() {
            Some(t) if self.lm.stop_tokens.contains(t) => reply.len() - 1,
            _ => reply.len(),
        };
        Ok(self.lm.tokenizer.decode(&reply[..end])?.trim().to_string())
    }

    /// Replies to `prompts` (token ids), each with the stop token that ended it appended:
    /// greedy at temperature 0, else sampled from the whole distribution (no top-k or top-p,
    /// so the sampled tokens' log-probabilities are the policy's own).
    pub fn sample(
        &self,
        prompts: &[Vec<u32>],
        temperature: f32,
        max_new_tokens: usize,
        seed: u64,
    ) -> Result<Vec<Vec<u32>>> {
        sample_replies(
            self.model(),
            prompts,
            &self.lm.stop_tokens,
            self.pad,
            temperature,
            max_new_tokens,
            seed,
        )
    }

    /// Writes the adapters as a PEFT directory for `LlamaForCausalLM`.
    pub fn save(&self, out: &Path, base_model: &str) -> Result<()> {
        let layout = crate::peft::PeftLayout {
            prefix: "",
            modules_to_save: &[],
            task_type: Some("CAUSAL_LM"),
            base_model,
        };
        crate::peft::export(&self.lm.model.params, &self.lora, &layout, out, true)
    }
}

/// [`ChatPolicy::sample`] on a bare model: each reply with its closing stop token, when one
/// ended it.
pub fn sample_replies(
    model: &Llama,
    prompts: &[Vec<u32>],
    stop: &[u32],
    pad: u32,
    temperature: f32,
    max_new_tokens: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    let opts = SampleOptions {
        temperature,
        top_k: 0,
        top_p: 1.0,
        seed,
        max_new_tokens,
        stop_at_eos: true,
    };
    Ok(generate_batch_ended(model, prompts, stop, pad, &opts)?
        .into_iter()
        .map(|(mut tokens, end)| {
            tokens.extend(end);
            tokens
        })
        .collect())
}

/// `(prompt, reply)` pairs packed for one forward, an empty reply standing in as the pad token
/// (so every row has a target).
pub fn pack_replies(examples: &[(Vec<u32>, Vec<u32>)], pad: u32) -> PackedReplies {
    let fixed: Vec<(Vec<u32>, Vec<u32>)> = examples
        .iter()
        .map(|(p, r)| {
            let r = if r.is_empty() { vec![pad] } else { r.clone() };
            (p.clone(), r)
        })
        .collect();
    pack(&fixed, pad)
}

/// AdamW on a store's trainable parameters with warm-up and cosine decay and a global
/// gradient-norm clip: the step every alignment stage takes.
pub struct Updater {
    opt: AdamW,
    schedule: CosineSchedule,
    clip: f32,
    step: u64,
}

impl Updater {
    /// An optimizer for `params` over `steps` steps.
    pub fn new(params: &ParamStore, t: &crate::align::config::AlignTrain, steps: u64) -> Updater {
        let config = AdamWConfig {
            weight_decay: t.weight_decay as f32,
            ..AdamWConfig::default()
        };
        Updater {
            opt: AdamW::new(params, config),
            schedule: CosineSchedule {
                max_lr: t.lr,
                min_lr: t.min_lr,
                warmup_steps: t.warmup_steps,
                decay_steps: steps,
            },
            clip: t.grad_clip as f32,
            step: 0,
        }
    }

    /// Clips the gradients, steps, zeroes them; returns the norm before clipping.
    pub fn step(&mut self, params: &ParamStore) -> f32 {
        let norm = if self.clip > 0.0 {
            params.clip_grad_norm(self.clip)
        } else {
            params.grad_norm()
        };
        self.opt.step(params, self.schedule.lr(self.step) as f32);
        params.zero_grad();
        self.step += 1;
        norm
    }

    /// Bytes of optimizer state.
    pub fn state_bytes(&self) -> usize {
        self.opt.state_bytes()
    }
}

/// Exact-answer accuracy on held-out problems.
#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    /// Share of problems whose reply has the right final answer.
    pub accuracy: f64,
    /// Per task kind: name, accuracy, problems.
    pub by_task: Vec<(String, f64, usize)>,
    /// Mean reply length in tokens.
    pub mean_reply_tokens: f64,
    /// A few problems with their answer and the reply.
    pub samples: Vec<(String, String, String)>,
    /// Seconds taken.
    pub seconds: f64,
}

/// Greedy replies to `problems`, `batch` at a time, scored exactly; `on_batch(done)` after
/// each batch.
pub fn evaluate(
    policy: &ChatPolicy,
    problems: &[Problem],
    batch: usize,
    max_new_tokens: usize,
    on_batch: &mut dyn FnMut(usize),
) -> Result<EvalReport> {
    let started = std::time::Instant::now();
    let mut rewards = Vec::with_capacity(problems.len());
    let (mut tokens, mut samples) = (0usize, Vec::new());
    for chunk in problems.chunks(batch.max(1)) {
        let prompts = chunk
            .iter()
            .map(|p| policy.prompt_ids(&p.prompt))
            .collect::<Result<Vec<_>>>()?;
        let replies = anneal_tensor::no_grad(|| policy.sample(&prompts, 0.0, max_new_tokens, 0))?;
        for (p, r) in chunk.iter().zip(&replies) {
            let text = policy.decode(r)?;
            rewards.push(p.reward(&text));
            tokens += r.len();
            if samples.len() < 6 {
                samples.push((p.prompt.clone(), p.answer.clone(), text));
            }
        }
        on_batch(rewards.len());
    }
    let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
    let mut by_task = Vec::new();
    for (name, kind) in crate::align::tasks::TaskKind::ALL {
        let r: Vec<f32> = problems
            .iter()
            .zip(&rewards)
            .filter(|(p, _)| p.kind == kind)
            .map(|(_, &r)| r)
            .collect();
        if !r.is_empty() {
            by_task.push((name.to_string(), mean(&r), r.len()));
        }
    }
    Ok(EvalReport {
        accuracy: mean(&rewards),
        by_task,
        mean_reply_tokens: tokens as f64 / problems.len().max(1) as f64,
        samples,
        seconds: started.elapsed().as_secs_f64(),
    })
}
