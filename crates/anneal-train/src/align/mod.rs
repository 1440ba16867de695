//! Alignment: preference data, reward models, DPO and PPO-RLHF (InstructGPT, Ouyang et al. 2022;
//! DPO, Rafailov et al. 2023), built on the fine-tuning of pretrained models and LoRA.
//!
//! The pieces here are the arithmetic every alignment method shares, each tested against values
//! computed by hand:
//! - [`prefs`]: preference pairs in the common JSONL layout (`prompt`, `chosen`, `rejected`),
//!   bad lines counted and reported with file and line, never fatal;
//! - [`logprobs`]: prompt + reply batches and the summed log-probability of each reply;
//! - [`losses`]: the Bradley–Terry pairwise loss of a reward model and the DPO loss;
//! - [`reward`]: a reward model, the LM's final hidden state at the last token read by a scalar
//!   head;
//! - [`tasks`]: verifiable tasks (arithmetic word problems, unit conversions, sorting) generated
//!   with their answers, exact rewards, and held-out problems new in numbers and wording;
//! - [`rl`]: generalised advantage estimation, advantage whitening, the per-token KL penalty and a
//!   KL estimate that cannot go negative, and PPO's clipped policy and value losses;
//! - [`rlhf`]: one PPO or GRPO update from a batch of scored rollouts;
//! - [`policy`]: the chat policy with LoRA adapters, the shared optimizer step, and held-out
//!   exact-answer evaluation;
//! - [`stages`]: the stages `anneal align` runs (SFT, DPO, PPO, GRPO, rejection sampling),
//!   configured by [`config`].

pub mod baselines;
pub mod chat_data;
pub mod config;
pub mod logprobs;
pub mod losses;
pub mod policy;
pub mod prefs;
pub mod reward;
pub mod rl;
pub mod rlhf;
pub mod stages;
pub mod tasks;

/// A tiny Llama (vocabulary 13, width 16, two layers) with LoRA adapters on its query, value and
/// down projections, only the adapters trained: the policy the alignment tests train.
#[cfg(test)]
pub(crate) fn tiny_policy() -> anneal_nn::Llama {
    use anneal_nn::layers::LoraConfig;
    let config = anneal_nn::LlamaConfig {
        vocab_size: 13,
        hidden_size: 16,
        intermediate_size: 24,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        max_positions: 32,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-6,
        tie_embeddings: true,
        dropout: 0.0,
        dtype: anneal_tensor::DType::F32,
        checkpoint_blocks: false,
    };
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        dropout: 0.0,
    };
    let mut m = anneal_nn::Llama::with_lora(config, 5, lora).unwrap();
    m.params.train_only(LoraConfig::is_adapter);
    m
}
