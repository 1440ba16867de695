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
//!   KL estimate that cannot go negative, and PPO's clipped policy and value losses.

pub mod logprobs;
pub mod losses;
pub mod prefs;
pub mod reward;
pub mod rl;
pub mod tasks;
