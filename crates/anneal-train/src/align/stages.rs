//! The alignment stages `anneal align` runs on a chat model with LoRA: supervised fine-tuning on
//! gold replies, DPO on preference pairs, PPO-RLHF and GRPO on sampled replies scored exactly,
//! rejection sampling (sample k, keep the best, fine-tune on it, repeat), and the held-out
//! exact-answer evaluation each one ends with.
//!
//! Every stage starts from `model.dir` with `model.adapters` (an earlier stage's) merged in,
//! trains fresh adapters of its own and writes them to `train.out/adapters` as a PEFT
//! directory, with `metrics.jsonl` (one line per step) and `report.json`.

use crate::align::config::AlignConfig;
use crate::align::logprobs::{reply_logprobs, PackedReplies};
use crate::align::losses::dpo;
use crate::align::policy::{evaluate, pack_replies, ChatPolicy, EvalReport, Updater};
use crate::align::prefs::read_preferences;
use crate::align::reward::RewardHead;
use crate::align::rl::{best_of, KlGuard};
use crate::align::rlhf::{self, Critic, RlSettings};
use crate::align::tasks::{read_problems, Problem};
use crate::finetune::resolve;
use anneal_tensor::Rng;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// An alignment method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Supervised fine-tuning on the gold replies of `sft.jsonl`.
    Sft,
    /// Direct preference optimisation on the preference files.
    Dpo,
    /// PPO-RLHF on `rl-prompts.jsonl`, rewards exact.
    Ppo,
    /// GRPO on `rl-prompts.jsonl`, rewards exact.
    Grpo,
    /// Rejection sampling on `rl-prompts.jsonl`: the best of `rl.group` samples, when correct,
    /// fine-tuned on.
    RejectionSampling,
    /// A reward model (adapters and a scalar head) on the `reward.train` pairs, with the
    /// Bradley–Terry loss; held-out accuracy on `reward.test` beside two baselines.
    Reward,
}

impl Method {
    /// The method's name as the command line spells it.
    pub fn name(self) -> &'static str {
        match self {
            Method::Sft => "sft",
            Method::Dpo => "dpo",
            Method::Ppo => "ppo",
            Method::Grpo => "grpo",
            Method::RejectionSampling => "rs",
            Method::Reward => "reward",
        }
    }
}

/// What a stage measured.
#[derive(Clone, Debug, Serialize)]
pub struct StageReport {
    /// The method.
    pub method: &'static str,
    /// Optimizer steps taken.
    pub steps: u64,
    /// Wall time of the training (evaluation excluded), seconds.
    pub seconds: f64,
    /// Seconds per optimizer step.
    pub seconds_per_step: f64,
    /// Peak resident memory of the process, MB.
    pub peak_rss_mb: f64,
    /// Parameters trained and in all.
    pub trainable: usize,
    /// All parameters of the model.
    pub total: usize,
    /// Examples skipped as longer than `data.max_tokens`, and input lines skipped as malformed.
    pub skipped: usize,
    /// The held-out evaluation after training.
    pub eval: Option<EvalReport>,
    /// A reward model's held-out accuracy, with the baselines'.
    pub reward: Option<RewardReport>,
    /// Each step's metrics.
    pub metrics: Vec<Value>,
}

/// Where a stage writes.
struct Output {
    dir: Option<PathBuf>,
    metrics: Option<std::fs::File>,
    base_model: String,
}

impl Output {
    fn new(config: &AlignConfig) -> Result<Output> {
        let dir = (!config.train.out.is_empty()).then(|| PathBuf::from(&config.train.out));
        let metrics = match &dir {
            Some(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
                let path = d.join("metrics.jsonl");
                Some(
                    std::fs::File::create(&path)
                        .with_context(|| format!("creating {}", path.display()))?,
                )
            }
            None => None,
        };
        Ok(Output {
            dir,
            metrics,
            base_model: config.model.dir.clone(),
        })
    }

    fn record(&mut self, line: &Value) -> Result<()> {
        if let Some(f) = &mut self.metrics {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }

    /// Writes the adapters into `<out>/<name>`.
    fn save(&self, policy: &ChatPolicy, name: &str) -> Result<Option<PathBuf>> {
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        let path = dir.join(name);
        policy.save(&path, &self.base_model)?;
        Ok(Some(path))
    }
}

/// The policy of `config`: its model with `model.adapters` merged in and fresh adapters.
pub fn load_policy(config: &AlignConfig) -> Result<ChatPolicy> {
    let model = resolve(&config.model.dir);
    let fold = (!config.model.adapters.is_empty()).then(|| resolve(&config.model.adapters));
    ChatPolicy::load(&model, fold.as_deref(), config.lora_config())
        .with_context(|| format!("loading the model of model.dir = {:?}", config.model.dir))
}

fn data_file(config: &AlignConfig, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        resolve(&config.data.dir).join(name)
    }
}

/// Warns of the first malformed lines of `path`; fails when it held no good record.
fn report_bad(path: &Path, bad: &[anneal_data::BadInput], good: usize) -> Result<()> {
    for b in bad.iter().take(5) {
        tracing::warn!("skipped {b}");
    }
    if bad.len() > 5 {
        tracing::warn!(
            "… {} malformed lines in {} in all",
            bad.len(),
            path.display()
        );
    }
    if good == 0 {
        bail!(
            "{}: no usable records ({} lines skipped); write them with anneal align data or \
             anneal align chat-data",
            path.display(),
            bad.len()
        );
    }
    Ok(())
}

/// The problems of a file in `data.dir`, malformed lines reported and skipped.
fn problems(config: &AlignConfig, name: &str) -> Result<(Vec<Problem>, usize)> {
    let path = data_file(config, name);
    let (ps, bad) = read_problems(std::slice::from_ref(&path))?;
    report_bad(&path, &bad, ps.len())?;
    Ok((ps, bad.len()))
}

/// The `prompt`s of a file in `data.dir`, malformed lines reported and skipped.
fn prompts_file(config: &AlignConfig, name: &str) -> Result<(Vec<String>, usize)> {
    let path = data_file(config, name);
    let (ps, bad) = crate::align::prefs::read_jsonl(std::slice::from_ref(&path), |v| {
        crate::align::prefs::string_field(v, "prompt")
    })?;
    report_bad(&path, &bad, ps.len())?;
    Ok((ps, bad.len()))
}

/// The file beside a reward model's adapters naming the model it was trained from.
pub const REWARD_META: &str = "reward.json";

/// What scores an RL stage's sampled replies.
enum Scorer {
    /// The verifiable tasks' exact reward.
    Exact(Vec<Problem>),
    /// A reward model sharing the policy's base.
    Model(Box<crate::align::reward::SharedReward>),
}

impl Scorer {
    /// `group` replies sampled to each of `prompts` (token ids of the records `idx`), scored.
    fn rollouts(
        &self,
        config: &AlignConfig,
        policy: &ChatPolicy,
        prompts: &[Vec<u32>],
        idx: &[usize],
        seed: u64,
    ) -> Result<rlhf::Rollouts> {
        let (model, rl) = (policy.model(), &config.rl);
        let mut exact = |k: usize, reply: &[u32]| -> Result<f32> {
            match self {
                Scorer::Exact(ps) => Ok(ps[idx[k]].reward(&policy.decode(reply)?)),
                Scorer::Model(_) => Ok(0.0),
            }
        };
        let mut r = rlhf::rollouts(
            model,
            prompts,
            rl.group,
            &policy.lm.stop_tokens,
            policy.pad,
            rl.max_new_tokens,
            seed,
            &mut exact,
        )?;
        if let Scorer::Model(rm) = self {
            let seqs: Vec<Vec<u32>> = r
                .prompts
                .iter()
                .zip(&r.replies)
                .map(|(p, reply)| [p.as_slice(), reply].concat())
                .collect();
            r.scores = rm.scores(model, &seqs, policy.pad, config.eval.batch)?;
        }
        Ok(r)
    }
}

/// The scorer `rl.reward` names, and the prompts it scores replies to. A reward model must
/// have been trained from this stage's starting model: one on another tokenizer is refused
/// naming both models, one on another base naming both.
fn scorer(config: &AlignConfig, policy: &ChatPolicy) -> Result<(Scorer, Vec<String>, usize)> {
    if config.rl.reward == "exact" {
        let (ps, bad) = problems(config, &config.rl.prompts)?;
        let prompts = ps.iter().map(|p| p.prompt.clone()).collect();
        return Ok((Scorer::Exact(ps), prompts, bad));
    }
    let dir = resolve(&config.rl.reward);
    let meta_path = dir.join(REWARD_META);
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).with_context(|| {
            format!(
                "rl.reward = {:?}: reading {}",
                config.rl.reward,
                meta_path.display()
            )
        })?)
        .with_context(|| format!("{}: not JSON", meta_path.display()))?;
    let field = |k: &str| {
        meta.get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let (rm_model, rm_adapters) = (field("model"), field("adapters"));
    if rm_model != config.model.dir {
        let rm = crate::chat_sft::load(&resolve(&rm_model), None)
            .with_context(|| format!("loading the reward model's base {rm_model:?}"))?;
        crate::align::reward::check_same_tokenizer(
            &policy.lm.tokenizer,
            &config.model.dir,
            &rm.tokenizer,
            &rm_model,
        )?;
        bail!(
            "the reward model in {} was trained from {rm_model:?}, the policy starts from {:?}: \
             a reward model shares the policy's base, so train it from model.dir = {:?}",
            dir.display(),
            config.model.dir,
            config.model.dir
        );
    }
    if rm_adapters != config.model.adapters {
        bail!(
            "the reward model in {} was trained with model.adapters = {rm_adapters:?}, the \
             policy starts from {:?}: a reward model shares the policy's base, so train it \
             from the same adapters",
            dir.display(),
            config.model.adapters
        );
    }
    let rm = crate::align::reward::SharedReward::load(&dir, SCORE_FILE, policy.model())?;
    let (prompts, bad) = prompts_file(config, &config.rl.prompts)?;
    Ok((Scorer::Model(Box::new(rm)), prompts, bad))
}

/// The held-out evaluation problems `eval.problems` asks for: all, or that many spread evenly
/// over the file (so every task kind is in).
pub fn eval_problems(config: &AlignConfig) -> Result<Vec<Problem>> {
    let (ps, _) = problems(config, "eval.jsonl")?;
    let n = config.eval.problems;
    if n == 0 || n >= ps.len() {
        return Ok(ps);
    }
    Ok((0..n).map(|i| ps[i * ps.len() / n].clone()).collect())
}

/// Exact-answer accuracy of `config`'s model (with `model.adapters`) on the held-out problems.
pub fn run_eval(
    config: &AlignConfig,
    on_batch: &mut dyn FnMut(usize, usize),
) -> Result<EvalReport> {
    let policy = load_policy(config)?;
    let ps = eval_problems(config)?;
    let n = ps.len();
    evaluate(
        &policy,
        &ps,
        config.eval.batch,
        config.eval.max_new_tokens,
        &mut |done| on_batch(done, n),
    )
}

/// Batches of `batch` indices into `n` examples, reshuffled each pass, from `seed`.
struct Batches {
    order: Vec<usize>,
    at: usize,
    rng: Rng,
}

impl Batches {
    fn new(n: usize, seed: u64) -> Batches {
        let mut b = Batches {
            order: (0..n).collect(),
            at: n,
            rng: Rng::new(seed),
        };
        b.reshuffle();
        b
    }

    fn reshuffle(&mut self) {
        for i in (1..self.order.len()).rev() {
            let j = (self.rng.next_u64() % (i as u64 + 1)) as usize;
            self.order.swap(i, j);
        }
        self.at = 0;
    }

    fn next(&mut self, batch: usize) -> Vec<usize> {
        (0..batch)
            .map(|_| {
                if self.at == self.order.len() {
                    self.reshuffle();
                }
                self.at += 1;
                self.order[self.at - 1]
            })
            .collect()
    }
}

/// Runs `method` as `config` says; `on_step(step, metrics)` sees each step.
pub fn run(
    config: &AlignConfig,
    method: Method,
    on_step: &mut dyn FnMut(u64, &Value),
) -> Result<StageReport> {
    let policy = load_policy(config)?;
    let mut out = Output::new(config)?;
    let total = policy.model().params.numel();
    let trainable = policy.model().params.trainable_numel();
    let started = Instant::now();
    let mut metrics = Vec::new();
    let mut record = |out: &mut Output, step: u64, mut line: Value| -> Result<()> {
        line["step"] = json!(step);
        line["seconds"] = json!(started.elapsed().as_secs_f64());
        out.record(&line)?;
        on_step(step, &line);
        metrics.push(line);
        Ok(())
    };
    let (mut reward, mut head) = (None, None);
    let skipped = match method {
        Method::Reward => {
            let (r, skipped, h) = reward_model(config, &policy, &mut out, &mut record)?;
            (reward, head) = (Some(r), Some(h));
            skipped
        }
        Method::Sft => sft(config, &policy, &mut out, &mut record)?,
        Method::Dpo => dpo_stage(config, &policy, &mut out, &mut record)?,
        Method::Ppo | Method::Grpo => rl_stage(config, &policy, method, &mut out, &mut record)?,
        Method::RejectionSampling => rejection_sampling(config, &policy, &mut out, &mut record)?,
    };
    let seconds = started.elapsed().as_secs_f64();
    let steps = metrics.len() as u64;
    if let Some(dir) = out.save(&policy, "adapters")? {
        if let Some(head) = &head {
            let meta = json!({"model": config.model.dir, "adapters": config.model.adapters});
            std::fs::write(dir.join(REWARD_META), serde_json::to_string_pretty(&meta)?)?;
            // The reward model's head beside its adapters.
            let path = dir.join(SCORE_FILE);
            std::fs::write(
                &path,
                anneal_tensor::io::encode_safetensors(&head.params.named())?,
            )
            .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    // The exact-answer evaluation, where the data has verifiable problems.
    let has_problems = data_file(config, "eval.jsonl").is_file();
    let eval = if config.eval.after && method != Method::Reward && has_problems {
        let ps = eval_problems(config)?;
        Some(evaluate(
            &policy,
            &ps,
            config.eval.batch,
            config.eval.max_new_tokens,
            &mut |_| {},
        )?)
    } else {
        None
    };
    let report = StageReport {
        method: method.name(),
        steps,
        seconds,
        seconds_per_step: seconds / steps.max(1) as f64,
        peak_rss_mb: crate::machine::peak_rss_mb(),
        trainable,
        total,
        skipped,
        eval,
        reward,
        metrics,
    };
    if let Some(dir) = &out.dir {
        let path = dir.join("report.json");
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

/// Prompt tokens and reply tokens.
type Example = (Vec<u32>, Vec<u32>);

type Record<'a> = dyn FnMut(&mut Output, u64, Value) -> Result<()> + 'a;

/// `(prompt, reply)` token pairs of `pairs`, those over `data.max_tokens` dropped and counted.
fn encode_examples(
    config: &AlignConfig,
    policy: &ChatPolicy,
    pairs: impl Iterator<Item = (String, String)>,
) -> Result<(Vec<Example>, usize)> {
    let (mut kept, mut long) = (Vec::new(), 0);
    for (prompt, reply) in pairs {
        let (p, r) = policy.example(&prompt, &reply)?;
        if p.len() + r.len() > config.data.max_tokens || r.is_empty() {
            long += 1;
        } else {
            kept.push((p, r));
        }
    }
    Ok((kept, long))
}

/// Next-token cross-entropy on the reply tokens of `packed`.
fn reply_loss(policy: &ChatPolicy, packed: &PackedReplies) -> Result<anneal_tensor::Tensor> {
    Ok(policy
        .model()
        .loss(&packed.ids, &packed.targets, packed.batch, packed.seq, None)?)
}

/// Fine-tunes on `examples` for `steps` steps, `batch` at a time, with `opt`.
fn fine_tune(
    policy: &ChatPolicy,
    examples: &[(Vec<u32>, Vec<u32>)],
    steps: std::ops::Range<u64>,
    batch: usize,
    seed: u64,
    opt: &mut Updater,
    out: &mut Output,
    record: &mut Record<'_>,
) -> Result<()> {
    let mut batches = Batches::new(examples.len(), seed);
    for step in steps {
        let picked: Vec<_> = batches
            .next(batch)
            .into_iter()
            .map(|i| examples[i].clone())
            .collect();
        let packed = pack_replies(&picked, policy.pad);
        let loss = reply_loss(policy, &packed)?;
        let value = loss.item()? as f64;
        loss.backward()?;
        let norm = opt.step(&policy.model().params);
        record(out, step, json!({"loss": value, "grad_norm": norm}))?;
    }
    Ok(())
}

fn sft(
    config: &AlignConfig,
    policy: &ChatPolicy,
    out: &mut Output,
    record: &mut Record<'_>,
) -> Result<usize> {
    let path = data_file(config, &config.data.sft);
    let (pairs, bad) = crate::align::prefs::read_jsonl(std::slice::from_ref(&path), |v| {
        use crate::align::prefs::string_field;
        Ok((string_field(v, "prompt")?, string_field(v, "reply")?))
    })?;
    report_bad(&path, &bad, pairs.len())?;
    let bad = bad.len();
    let (examples, long) = encode_examples(config, policy, pairs.into_iter())?;
    let t = &config.train;
    let mut opt = Updater::new(&policy.model().params, t, t.steps);
    fine_tune(
        policy,
        &examples,
        0..t.steps,
        t.batch_size,
        t.seed,
        &mut opt,
        out,
        record,
    )?;
    Ok(bad + long)
}

fn dpo_stage(
    config: &AlignConfig,
    policy: &ChatPolicy,
    out: &mut Output,
    record: &mut Record<'_>,
) -> Result<usize> {
    let paths: Vec<PathBuf> = config
        .data
        .preferences
        .iter()
        .map(|p| data_file(config, p))
        .collect();
    let set = read_preferences(&paths)?;
    tracing::info!("{}", set.summary());
    let mut pairs = Vec::new();
    let mut long = 0;
    for pair in &set.pairs {
        let (p, c) = policy.example(&pair.prompt, &pair.chosen)?;
        let (_, r) = policy.example(&pair.prompt, &pair.rejected)?;
        if p.len() + c.len().max(r.len()) > config.data.max_tokens {
            long += 1;
        } else {
            pairs.push((p, c, r));
        }
    }
    if pairs.is_empty() {
        bail!(
            "no preference pairs fit data.max_tokens = {}",
            config.data.max_tokens
        );
    }
    let packed_of = |idx: &[usize]| -> PackedReplies {
        let rows: Vec<(Vec<u32>, Vec<u32>)> = idx
            .iter()
            .map(|&i| (pairs[i].0.clone(), pairs[i].1.clone()))
            .chain(
                idx.iter()
                    .map(|&i| (pairs[i].0.clone(), pairs[i].2.clone())),
            )
            .collect();
        pack_replies(&rows, policy.pad)
    };
    // The reference's log-probabilities, once, before training: no second model is held.
    let model = policy.model();
    let mut reference = vec![(0.0f32, 0.0f32); pairs.len()];
    let all: Vec<usize> = (0..pairs.len()).collect();
    for idx in all.chunks(config.eval.batch) {
        let p = packed_of(idx);
        let lp = anneal_tensor::no_grad(|| -> Result<Vec<f32>> {
            let logits = model.forward_base(&p.ids, p.batch, p.seq)?;
            Ok(reply_logprobs(&logits, &p)?.to_vec_f32())
        })?;
        for (k, &i) in idx.iter().enumerate() {
            reference[i] = (lp[k], lp[idx.len() + k]);
        }
    }
    let t = &config.train;
    let mut opt = Updater::new(&model.params, t, t.steps);
    let mut batches = Batches::new(pairs.len(), t.seed);
    for step in 0..t.steps {
        let idx = batches.next(t.batch_size);
        let p = packed_of(&idx);
        let logits = model.forward(&p.ids, p.batch, p.seq, None)?;
        let lp = reply_logprobs(&logits, &p)?;
        let n = idx.len();
        let (ref_c, ref_r): (Vec<f32>, Vec<f32>) = idx.iter().map(|&i| reference[i]).unzip();
        let o = dpo(
            &lp.narrow(0, 0, n)?,
            &lp.narrow(0, n, n)?,
            &ref_c,
            &ref_r,
            config.dpo.beta as f32,
        )?;
        let loss = o.loss.item()? as f64;
        let accuracy = o.accuracy();
        let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
        let (chosen, rejected) = (mean(&o.chosen_rewards), mean(&o.rejected_rewards));
        o.loss.backward()?;
        let norm = opt.step(&model.params);
        record(
            out,
            step,
            json!({"loss": loss, "accuracy": accuracy, "chosen_reward": chosen,
                   "rejected_reward": rejected, "margin": chosen - rejected, "grad_norm": norm}),
        )?;
        save_every(config, policy, out, step)?;
    }
    Ok(set.bad.len() + long)
}

fn save_every(config: &AlignConfig, policy: &ChatPolicy, out: &Output, step: u64) -> Result<()> {
    let every = config.train.save_every;
    if every > 0 && (step + 1).is_multiple_of(every) {
        out.save(policy, "adapters")?;
    }
    Ok(())
}

fn rl_stage(
    config: &AlignConfig,
    policy: &ChatPolicy,
    method: Method,
    out: &mut Output,
    record: &mut Record<'_>,
) -> Result<usize> {
    let (scorer, texts, bad) = scorer(config, policy)?;
    let prompts = texts
        .iter()
        .map(|p| policy.prompt_ids(p))
        .collect::<Result<Vec<_>>>()?;
    let (t, rl) = (&config.train, &config.rl);
    let model = policy.model();
    let mut opt = Updater::new(&model.params, t, t.steps);
    let head = RewardHead::new(model.config.hidden_size, t.seed ^ 0x5eed)?;
    let mut value_opt = Updater::new(&head.params, t, t.steps);
    let settings = RlSettings::of(rl);
    let mut guard = KlGuard::new(rl.kl_bound, rl.kl_patience);
    let mut batches = Batches::new(prompts.len(), t.seed);
    for step in 0..t.steps {
        let idx = batches.next(t.batch_size);
        let batch: Vec<Vec<u32>> = idx.iter().map(|&i| prompts[i].clone()).collect();
        let seed = t.seed.wrapping_mul(1_000_003).wrapping_add(step);
        let r = scorer.rollouts(config, policy, &batch, &idx, seed)?;
        let critic = match method {
            Method::Ppo => Critic::Value(&head, &mut value_opt),
            _ => Critic::Group,
        };
        let stats = rlhf::update(model, &mut opt, critic, &r, &settings, policy.pad)?;
        let kl = stats.kl;
        record(out, step, serde_json::to_value(&stats)?)?;
        if let Err(e) = guard.check(step, kl) {
            let saved = out.save(policy, "adapters-stopped")?;
            return Err(match saved {
                Some(p) => e.context(format!("the adapters at the stop are in {}", p.display())),
                None => e,
            });
        }
        save_every(config, policy, out, step)?;
    }
    Ok(bad)
}

fn rejection_sampling(
    config: &AlignConfig,
    policy: &ChatPolicy,
    out: &mut Output,
    record: &mut Record<'_>,
) -> Result<usize> {
    let (scorer, texts, bad) = scorer(config, policy)?;
    let prompts = texts
        .iter()
        .map(|p| policy.prompt_ids(p))
        .collect::<Result<Vec<_>>>()?;
    let (t, rs, k) = (&config.train, &config.rs, config.rl.group);
    let model = policy.model();
    let mut opt = Updater::new(&model.params, t, t.steps);
    let mut batches = Batches::new(prompts.len(), t.seed);
    let per_round = t.steps.div_ceil(rs.rounds as u64);
    let mut step = 0;
    for round in 0..rs.rounds {
        let idx = batches.next(rs.prompts);
        let mut kept = Vec::new();
        let mut sampled = 0.0f64;
        for (c, chunk) in idx.chunks(config.eval.batch.max(1)).enumerate() {
            let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
            let seed = t
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add((round * 100_000 + c) as u64);
            let r = scorer.rollouts(config, policy, &batch, chunk, seed)?;
            sampled += r.scores.iter().map(|&s| s as f64).sum::<f64>();
            for i in best_of(&r.scores, k, rs.threshold as f32)
                .into_iter()
                .flatten()
            {
                if !r.replies[i].is_empty() {
                    kept.push((r.prompts[i].clone(), r.replies[i].clone()));
                }
            }
        }
        let line = json!({"round": round, "sample_reward": sampled / (idx.len() * k) as f64,
                          "kept": kept.len(), "prompts": idx.len()});
        tracing::info!("round {round}: {line}");
        if let Some(f) = &mut out.metrics {
            writeln!(f, "{line}")?;
        }
        let end = (step + per_round).min(t.steps);
        if kept.is_empty() {
            tracing::warn!(
                "round {round}: no sampled reply reached rs.threshold; nothing to fine-tune on"
            );
        } else {
            fine_tune(
                policy,
                &kept,
                step..end,
                t.batch_size,
                t.seed + round as u64,
                &mut opt,
                out,
                record,
            )?;
        }
        step = end;
        save_every(config, policy, out, step.saturating_sub(1))?;
    }
    Ok(bad)
}

/// One policy's replies judged against the baseline's.
#[derive(Clone, Debug, Serialize)]
pub struct WinRate {
    /// The policy (its adapters' directory).
    pub policy: String,
    /// Share of prompts whose reply the judge scores above the baseline's (ties half).
    pub win_rate: f64,
    /// Mean reply length, tokens.
    pub mean_reply_tokens: f64,
    /// Mean judge score.
    pub mean_score: f64,
}

/// Greedy replies of the baseline (`model.adapters`) and of each of `policies` (adapter
/// directories) to the prompts of `prompts`, scored by the reward model in `judge` (trained on a
/// split none of them saw); the baseline first, against itself (0.5).
pub fn compare(
    config: &AlignConfig,
    judge: &Path,
    policies: &[String],
    prompts: &str,
    on_policy: &mut dyn FnMut(&str),
) -> Result<Vec<WinRate>> {
    let (texts, _) = prompts_file(config, prompts)?;
    let mut names = vec![config.model.adapters.clone()];
    names.extend(policies.iter().cloned());
    let mut replies: Vec<Vec<Vec<u32>>> = Vec::new();
    for name in &names {
        on_policy(name);
        let mut c = config.clone();
        c.model.adapters = name.clone();
        let policy = load_policy(&c)?;
        let ids = texts
            .iter()
            .map(|p| policy.prompt_ids(p))
            .collect::<Result<Vec<_>>>()?;
        let mut all = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(config.eval.batch.max(1)) {
            all.extend(anneal_tensor::no_grad(|| {
                policy.sample(chunk, 0.0, config.eval.max_new_tokens, 0)
            })?);
        }
        replies.push(all);
    }
    on_policy("judge");
    let meta_path = judge.join(REWARD_META);
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(&meta_path)
            .with_context(|| format!("reading {}", meta_path.display()))?,
    )
    .with_context(|| format!("{}: not JSON", meta_path.display()))?;
    let mut jc = config.clone();
    jc.model.dir = meta
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("")
        .into();
    jc.model.adapters = meta
        .get("adapters")
        .and_then(Value::as_str)
        .unwrap_or("")
        .into();
    let judge_policy = load_policy(&jc)?;
    if jc.model.dir != config.model.dir {
        crate::align::reward::check_same_tokenizer(
            &load_policy_tokenizer(config)?,
            &config.model.dir,
            &judge_policy.lm.tokenizer,
            &jc.model.dir,
        )?;
    }
    let rm = crate::align::reward::SharedReward::load(judge, SCORE_FILE, judge_policy.model())?;
    let ids = texts
        .iter()
        .map(|p| judge_policy.prompt_ids(p))
        .collect::<Result<Vec<_>>>()?;
    let mut scores = Vec::new();
    for r in &replies {
        let seqs: Vec<Vec<u32>> = ids
            .iter()
            .zip(r)
            .map(|(p, reply)| [p.as_slice(), reply].concat())
            .collect();
        scores.push(rm.scores(
            judge_policy.model(),
            &seqs,
            judge_policy.pad,
            config.eval.batch,
        )?);
    }
    let n = texts.len().max(1) as f64;
    Ok(names
        .iter()
        .zip(&replies)
        .zip(&scores)
        .map(|((name, r), s)| WinRate {
            policy: if name.is_empty() {
                config.model.dir.clone()
            } else {
                name.clone()
            },
            win_rate: s
                .iter()
                .zip(&scores[0])
                .map(|(a, b)| match a.partial_cmp(b) {
                    Some(std::cmp::Ordering::Greater) => 1.0,
                    Some(std::cmp::Ordering::Equal) => 0.5,
                    _ => 0.0,
                })
                .sum::<f64>()
                / n,
            mean_reply_tokens: r.iter().map(Vec::len).sum::<usize>() as f64 / n,
            mean_score: s.iter().map(|&x| x as f64).sum::<f64>() / n,
        })
        .collect())
}

/// The tokenizer of `config`'s model.
fn load_policy_tokenizer(config: &AlignConfig) -> Result<anneal_data::Tokenizer> {
    Ok(crate::chat_sft::load(&resolve(&config.model.dir), None)?.tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::align::tasks::{task_data, write_task_data, TaskDataSizes, TaskKind};
    use crate::chat::ChatTemplate;
    use crate::llama_gguf::LlamaModel;
    use anneal_data::Tokenizer;
    use anneal_nn::{Llama, LlamaConfig};

    /// A tiny chat model with a character vocabulary, written as a Hugging Face Llama
    /// directory: `|` ends a turn.
    fn tiny_chat_model(dir: &Path, text: &str) {
        let tokenizer = Tokenizer::train_chars(
            [
                text,
                "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?:|-",
            ]
            .into_iter(),
        )
        .unwrap();
        let eos = tokenizer.token_to_id("|");
        let template = ChatTemplate::new(
            "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}{{ eos_token }}\
             {% endfor %}{% if add_generation_prompt %}a:{% endif %}",
            &tokenizer,
            None,
            eos,
        )
        .unwrap();
        let config = LlamaConfig {
            vocab_size: tokenizer.vocab_size(),
            hidden_size: 16,
            intermediate_size: 24,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            max_positions: 320,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-6,
            tie_embeddings: true,
            dropout: 0.0,
            dtype: anneal_tensor::DType::F32,
            checkpoint_blocks: false,
        };
        let m = LlamaModel {
            model: Llama::new(config, 3).unwrap(),
            stop_tokens: eos.into_iter().collect(),
            tokenizer,
            chat_template: Some(template),
            bos: None,
            source: dir.to_path_buf(),
        };
        crate::hf_llama::export(&m, dir, true).unwrap();
    }

    /// Every stage on a tiny model and small task files: SFT writes adapters the others start
    /// from; DPO's first loss is ln 2; PPO and GRPO record a non-negative KL and move the
    /// adapters; rejection sampling and the evaluation run; malformed lines are counted.
    #[test]
    fn every_stage_runs_end_to_end_on_a_tiny_chat_model() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        let sizes = TaskDataSizes {
            sft: 24,
            preferences: 16,
            rl: 16,
            eval: 8,
        };
        let tasks = task_data(&[TaskKind::Arithmetic, TaskKind::Sorting], sizes, 1);
        write_task_data(&data, &tasks).unwrap();
        // A malformed line in each file a stage reads.
        for name in ["sft.jsonl", "preferences.jsonl", "rl-prompts.jsonl"] {
            let path = data.join(name);
            let mut text = std::fs::read_to_string(&path).unwrap();
            text.push_str("{\"prompt\": \"\", \"chosen\": 1}\n");
            std::fs::write(&path, text).unwrap();
        }
        let all: String = tasks
            .sft
            .iter()
            .chain(&tasks.rl)
            .chain(&tasks.eval)
            .map(|p| format!("{} {}", p.prompt, p.gold_reply()))
            .collect();
        let model = root.path().join("model");
        tiny_chat_model(&model, &all);
        let config = |out: &str, adapters: &str| {
            let mut c = AlignConfig::default();
            c.model.dir = model.display().to_string();
            c.model.adapters = adapters.to_string();
            c.data.dir = data.display().to_string();
            c.data.max_tokens = 300;
            c.train.steps = 2;
            c.train.batch_size = 2;
            c.train.lr = 1e-2;
            c.train.warmup_steps = 0;
            c.train.out = root.path().join(out).display().to_string();
            c.lora.rank = 2;
            c.eval.batch = 4;
            c.eval.max_new_tokens = 6;
            c.rl.max_new_tokens = 6;
            c.rl.group = 2;
            c.rs.rounds = 1;
            c.rs.prompts = 4;
            c.rs.threshold = 0.0;
            c
        };
        let run_stage = |method, c: &AlignConfig| run(c, method, &mut |_, _| {}).unwrap();
        let sft = run_stage(Method::Sft, &config("sft", ""));
        assert_eq!((sft.steps, sft.skipped), (2, 1));
        let adapters = root.path().join("sft/adapters");
        assert!(adapters.join("adapter_model.safetensors").is_file());
        assert!(root.path().join("sft/report.json").is_file());
        let e = sft.eval.as_ref().unwrap();
        assert!((0.0..=1.0).contains(&e.accuracy) && e.by_task.len() == 2);
        let from_sft = adapters.display().to_string();
        let dpo = run_stage(Method::Dpo, &config("dpo", &from_sft));
        let first = dpo.metrics[0]["loss"].as_f64().unwrap();
        assert!((first - std::f64::consts::LN_2).abs() < 1e-5, "{first}");
        assert_eq!(dpo.skipped, 1);
        for method in [Method::Ppo, Method::Grpo] {
            let r = run_stage(method, &config(method.name(), &from_sft));
            assert_eq!((r.steps, r.skipped), (2, 1));
            for m in &r.metrics {
                assert!(m["kl"].as_f64().unwrap() >= 0.0, "{m}");
                assert!(m["reply_tokens"].as_f64().unwrap() >= 1.0, "{m}");
            }
        }
        let rs = run_stage(Method::RejectionSampling, &config("rs", &from_sft));
        assert_eq!(rs.steps, 2);
        let lines = std::fs::read_to_string(root.path().join("rs/metrics.jsonl")).unwrap();
        assert!(lines.lines().next().unwrap().contains("\"kept\""));
        // Chat preference data from a small ChatterBot corpus, then a reward model on it.
        let corpus = root.path().join("corpus");
        std::fs::create_dir_all(&corpus).unwrap();
        let mut yaml = String::from("categories:\n- talk\nconversations:\n");
        for i in 0..60 {
            yaml.push_str(&format!(
                "- - what is {i} plus {}\n  - it is {} and that is all\n",
                i + 1,
                2 * i + 1
            ));
        }
        std::fs::write(corpus.join("talk.yml"), yaml).unwrap();
        let chat = root.path().join("chat");
        let policy = load_policy(&config("", "")).unwrap();
        let built =
            crate::align::chat_data::build(&policy, &corpus, &chat, 3, 3, 8, 0, &mut |_, _| {})
                .unwrap();
        assert_eq!(built.conversations, 60);
        let mut seen = std::collections::HashMap::new();
        for (name, n) in &built.written {
            let text = std::fs::read_to_string(chat.join(name)).unwrap();
            assert_eq!(text.lines().count(), *n);
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                let prompt = v["prompt"].as_str().unwrap().to_string();
                // No prompt in two splits.
                assert_eq!(seen.entry(prompt).or_insert(name.clone()), name);
            }
        }
        // Every prompt is written once, or counted as dropped.
        assert_eq!(seen.len() + built.unmatched + built.short, 60);
        let mut rm = config("rm", "");
        rm.data.dir = chat.display().to_string();
        // Every kept pair of this corpus, so the stage has pairs to train and test on.
        rm.reward.train = vec!["rm-train.jsonl".into(), "judge-train.jsonl".into()];
        rm.reward.test = "rm-train.jsonl".into();
        let r = run_stage(Method::Reward, &rm);
        let rep = r.reward.unwrap();
        assert!(rep.test_pairs > 0 && (0.0..=1.0).contains(&rep.accuracy));
        assert!(root.path().join("rm/adapters").join(SCORE_FILE).is_file());
        // PPO scored by that reward model, which shares the policy's base.
        let rm_dir = root.path().join("rm/adapters");
        let mut ppo_rm = config("ppo-rm", "");
        ppo_rm.data.dir = chat.display().to_string();
        ppo_rm.rl.reward = rm_dir.display().to_string();
        ppo_rm.rl.prompts = "rm-train.jsonl".into();
        let r = run_stage(Method::Ppo, &ppo_rm);
        assert_eq!(r.steps, 2);
        assert!(r
            .metrics
            .iter()
            .all(|m| m["score"].as_f64().unwrap().is_finite()));
        // A policy from another starting point is refused, naming the adapters.
        let mut other_start = ppo_rm.clone();
        other_start.model.adapters = from_sft.clone();
        let err = format!(
            "{:#}",
            run(&other_start, Method::Ppo, &mut |_, _| {}).unwrap_err()
        );
        assert!(err.contains("model.adapters"), "{err}");
        // A reward model from a model with another tokenizer is refused, naming both models.
        let model2 = root.path().join("model2");
        tiny_chat_model(&model2, "xyz only");
        let rm2 = root.path().join("rm2");
        std::fs::create_dir_all(&rm2).unwrap();
        for f in std::fs::read_dir(&rm_dir).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, rm2.join(f.file_name().unwrap())).unwrap();
        }
        let meta = json!({"model": model2.display().to_string(), "adapters": ""});
        std::fs::write(rm2.join(REWARD_META), meta.to_string()).unwrap();
        let mut other_tok = ppo_rm.clone();
        other_tok.rl.reward = rm2.display().to_string();
        let err = format!(
            "{:#}",
            run(&other_tok, Method::Ppo, &mut |_, _| {}).unwrap_err()
        );
        assert!(
            err.contains(&model2.display().to_string())
                && err.contains(&model.display().to_string()),
            "{err}"
        );
        // Win rates judged by the reward model: the baseline ties itself.
        let mut cmp = config("", "");
        cmp.data.dir = chat.display().to_string();
        let rates = compare(
            &cmp,
            &rm_dir,
            &[from_sft.clone()],
            "rm-test.jsonl",
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(rates.len(), 2);
        assert_eq!(rates[0].win_rate, 0.5);
        assert!((0.0..=1.0).contains(&rates[1].win_rate));
        // Evaluating the SFT adapters again gives what SFT reported.
        let again = run_eval(&config("", &from_sft), &mut |_, _| {}).unwrap();
        assert_eq!(again.accuracy, e.accuracy);
        assert_eq!(again.mean_reply_tokens, e.mean_reply_tokens);
    }
}

/// The file of a reward model's head, in its adapter directory.
pub const SCORE_FILE: &str = "score.safetensors";

/// A reward model's held-out pairwise accuracy, before and after training, beside the
/// baselines' on the same pairs.
#[derive(Clone, Debug, Serialize)]
pub struct RewardReport {
    /// Training and held-out pairs.
    pub train_pairs: usize,
    /// Held-out pairs.
    pub test_pairs: usize,
    /// The fresh head's accuracy.
    pub accuracy_before: f64,
    /// The trained model's.
    pub accuracy: f64,
    /// A pairwise logistic regression on reply length (tokens, characters).
    pub length_baseline: f64,
    /// A pairwise logistic regression on word counts.
    pub bag_of_words_baseline: f64,
    /// Mean token length of chosen and rejected held-out replies.
    pub mean_tokens: (f64, f64),
}

/// Whole conversations (prompt and reply tokens) of each pair, chosen then rejected.
type PairTokens = (Vec<u32>, Vec<u32>);

fn pair_tokens(
    config: &AlignConfig,
    policy: &ChatPolicy,
    pairs: &[crate::align::prefs::PreferencePair],
) -> Result<(Vec<PairTokens>, Vec<usize>)> {
    let (mut out, mut kept) = (Vec::new(), Vec::new());
    for (i, pair) in pairs.iter().enumerate() {
        let (p, c) = policy.example(&pair.prompt, &pair.chosen)?;
        let (_, r) = policy.example(&pair.prompt, &pair.rejected)?;
        if p.len() + c.len().max(r.len()) <= config.data.max_tokens {
            out.push(([p.as_slice(), &c].concat(), [p.as_slice(), &r].concat()));
            kept.push(i);
        }
    }
    Ok((out, kept))
}

/// Reward-model scores of sequences, `batch` at a time, without gradient.
pub fn score_all(
    model: &anneal_nn::Llama,
    head: &RewardHead,
    seqs: &[Vec<u32>],
    pad: u32,
    batch: usize,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(batch.max(1)) {
        let packed = crate::align::reward::pack_sequences(chunk, pad);
        out.extend(anneal_tensor::no_grad(|| head.scores(model, &packed))?.to_vec_f32());
    }
    Ok(out)
}

fn reward_model(
    config: &AlignConfig,
    policy: &ChatPolicy,
    out: &mut Output,
    record: &mut Record<'_>,
) -> Result<(RewardReport, usize, RewardHead)> {
    use crate::align::baselines::{pairwise_logistic, BagOfWords, Features, LengthFeatures};
    use crate::align::losses::{bradley_terry, pairwise_accuracy};
    let train_paths: Vec<PathBuf> = config
        .reward
        .train
        .iter()
        .map(|p| data_file(config, p))
        .collect();
    let train_set = read_preferences(&train_paths)?;
    let test_set = read_preferences(&[data_file(config, &config.reward.test)])?;
    tracing::info!("training: {}", train_set.summary());
    tracing::info!("held out: {}", test_set.summary());
    let (train, train_kept) = pair_tokens(config, policy, &train_set.pairs)?;
    let (test, test_kept) = pair_tokens(config, policy, &test_set.pairs)?;
    if train.is_empty() || test.is_empty() {
        bail!(
            "{} training and {} held-out pairs fit data.max_tokens = {}: too few",
            train.len(),
            test.len(),
            config.data.max_tokens
        );
    }
    let skipped = train_set.bad.len()
        + test_set.bad.len()
        + (train_set.pairs.len() - train.len())
        + (test_set.pairs.len() - test.len());
    // The baselines, on the same pairs.
    let tokens = |s: &str| -> Result<usize> { Ok(policy.lm.tokenizer.encode(s)?.len()) };
    let featurise =
        |f: &dyn Features, pairs: &[crate::align::prefs::PreferencePair], kept: &[usize]| {
            kept.iter()
                .map(|&i| {
                    let p = &pairs[i];
                    Ok((
                        f.features(&p.chosen, tokens(&p.chosen)?),
                        f.features(&p.rejected, tokens(&p.rejected)?),
                    ))
                })
                .collect::<Result<Vec<_>>>()
        };
    let length_baseline = pairwise_logistic(
        &featurise(&LengthFeatures, &train_set.pairs, &train_kept)?,
        &featurise(&LengthFeatures, &test_set.pairs, &test_kept)?,
        1e-3,
        500,
    );
    let bow = BagOfWords::fit(train_kept.iter().flat_map(|&i| {
        [
            train_set.pairs[i].chosen.as_str(),
            train_set.pairs[i].rejected.as_str(),
        ]
    }));
    let bag_of_words_baseline = pairwise_logistic(
        &featurise(&bow, &train_set.pairs, &train_kept)?,
        &featurise(&bow, &test_set.pairs, &test_kept)?,
        1e-2,
        500,
    );
    let mean_len = |pick: fn(&PairTokens) -> usize| {
        test.iter().map(pick).sum::<usize>() as f64 / test.len() as f64
    };
    let mean_tokens = (mean_len(|p| p.0.len()), mean_len(|p| p.1.len()));
    let model = policy.model();
    let t = &config.train;
    let head = RewardHead::new(model.config.hidden_size, t.seed ^ 0x5eed)?;
    let accuracy_of = |head: &RewardHead| -> Result<f64> {
        let c: Vec<Vec<u32>> = test.iter().map(|p| p.0.clone()).collect();
        let r: Vec<Vec<u32>> = test.iter().map(|p| p.1.clone()).collect();
        let (sc, sr) = (
            score_all(model, head, &c, policy.pad, config.eval.batch)?,
            score_all(model, head, &r, policy.pad, config.eval.batch)?,
        );
        Ok(pairwise_accuracy(&sc, &sr))
    };
    let accuracy_before = accuracy_of(&head)?;
    let mut opt = Updater::new(&model.params, t, t.steps);
    let mut head_opt = Updater::new(&head.params, t, t.steps);
    let mut batches = Batches::new(train.len(), t.seed);
    for step in 0..t.steps {
        let idx = batches.next(t.batch_size);
        let seqs: Vec<Vec<u32>> = idx
            .iter()
            .map(|&i| train[i].0.clone())
            .chain(idx.iter().map(|&i| train[i].1.clone()))
            .collect();
        let packed = crate::align::reward::pack_sequences(&seqs, policy.pad);
        let scores = head.scores(model, &packed)?;
        let n = idx.len();
        let (c, r) = (scores.narrow(0, 0, n)?, scores.narrow(0, n, n)?);
        let accuracy = pairwise_accuracy(&c.to_vec_f32(), &r.to_vec_f32());
        let loss = bradley_terry(&c, &r)?;
        let value = loss.item()? as f64;
        loss.backward()?;
        let norm = opt.step(&model.params);
        head_opt.step(&head.params);
        record(
            out,
            step,
            json!({"loss": value, "accuracy": accuracy, "grad_norm": norm}),
        )?;
    }
    let accuracy = accuracy_of(&head)?;
    Ok((
        RewardReport {
            train_pairs: train.len(),
            test_pairs: test.len(),
            accuracy_before,
            accuracy,
            length_baseline,
            bag_of_words_baseline,
            mean_tokens,
        },
        skipped,
        head,
    ))
}
