//! One reinforcement-learning update of a LoRA policy from a batch of scored rollouts: PPO-RLHF
//! (InstructGPT: per-token KL penalty to the reference, a value head, GAE, whitened advantages,
//! clipped policy and value losses) or GRPO (DeepSeekMath: group-relative advantages, no value
//! model, the KL as a loss term), sharing the rollout, KL and clipping code.
//!
//! The reference is the policy's own base weights with the adapters switched off, and the value
//! head reads the policy's final hidden states, so one frozen base serves policy, reference and
//! value model.

use crate::align::logprobs::token_logprobs;
use crate::align::policy::{pack_replies, sample_replies, Updater};
use crate::align::reward::RewardHead;
use crate::align::rl;
use anneal_nn::Llama;
use anneal_tensor::Tensor;
use anyhow::Result;
use serde::Serialize;

/// Sampled replies with their scores.
#[derive(Clone, Debug, Default)]
pub struct Rollouts {
    /// Each rollout's prompt tokens (a prompt's group of replies one after another).
    pub prompts: Vec<Vec<u32>>,
    /// Each reply's tokens, its closing stop token included when one ended it.
    pub replies: Vec<Vec<u32>>,
    /// Each reply's score (the exact reward, or a reward model's).
    pub scores: Vec<f32>,
}

/// Samples `group` replies to each of `prompts` at temperature 1 from the whole distribution
/// (so the KL estimate is valid) and scores each with `score(prompt index, reply tokens)`.
#[allow(clippy::too_many_arguments)]
pub fn rollouts(
    model: &Llama,
    prompts: &[Vec<u32>],
    group: usize,
    stop: &[u32],
    pad: u32,
    max_new_tokens: usize,
    seed: u64,
    score: &mut dyn FnMut(usize, &[u32]) -> Result<f32>,
) -> Result<Rollouts> {
    let expanded: Vec<Vec<u32>> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), group))
        .collect();
    let replies = anneal_tensor::no_grad(|| {
        sample_replies(model, &expanded, stop, pad, 1.0, max_new_tokens, seed)
    })?;
    let scores = replies
        .iter()
        .enumerate()
        .map(|(i, r)| score(i / group, r))
        .collect::<Result<_>>()?;
    Ok(Rollouts {
        prompts: expanded,
        replies,
        scores,
    })
}

/// The settings of an update.
#[derive(Clone, Copy, Debug)]
pub struct RlSettings {
    /// Per-token KL coefficient (PPO: in the reward; GRPO: on the loss).
    pub kl_coef: f32,
    /// Clip ε of the policy ratio and the value estimate.
    pub clip: f32,
    /// Weight of the value loss (PPO).
    pub value_coef: f32,
    /// Discount γ (PPO).
    pub gamma: f32,
    /// GAE's λ (PPO).
    pub lambda: f32,
    /// Passes over the batch.
    pub epochs: usize,
    /// Replies per prompt in the batch (GRPO's group).
    pub group: usize,
}

impl RlSettings {
    /// The settings of a configuration's `[rl]` section.
    pub fn of(s: &crate::align::config::RlSection) -> RlSettings {
        RlSettings {
            kl_coef: s.kl_coef as f32,
            clip: s.clip as f32,
            value_coef: s.value_coef as f32,
            gamma: s.gamma as f32,
            lambda: s.lambda as f32,
            epochs: s.epochs,
            group: s.group,
        }
    }
}

/// What an update measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RlStats {
    /// Mean score of the rollouts.
    pub score: f64,
    /// Mean KL(π ‖ π_ref) per reply token at sampling time (k₃, never negative).
    pub kl: f64,
    /// Mean reply length in tokens.
    pub reply_tokens: f64,
    /// Policy loss of the last pass.
    pub policy_loss: f64,
    /// Value loss of the last pass (PPO).
    pub value_loss: f64,
    /// Share of tokens whose ratio was clipped in the last pass.
    pub clipped: f64,
    /// Gradient norm of the last pass, before clipping.
    pub grad_norm: f64,
}

/// How advantages are estimated.
pub enum Critic<'a> {
    /// PPO: a value head on the policy's hidden states, and its optimizer.
    Value(&'a RewardHead, &'a mut Updater),
    /// GRPO: relative to the group's other replies.
    Group,
}

/// One update of `model`'s trainable parameters on `r`.
pub fn update(
    model: &Llama,
    opt: &mut Updater,
    mut critic: Critic<'_>,
    r: &Rollouts,
    s: &RlSettings,
    pad: u32,
) -> Result<RlStats> {
    let examples: Vec<(Vec<u32>, Vec<u32>)> = r
        .prompts
        .iter()
        .cloned()
        .zip(r.replies.iter().cloned())
        .collect();
    let packed = pack_replies(&examples, pad);
    let (b, t) = (packed.batch, packed.seq);
    let rows: Vec<usize> = (0..packed.targets.len())
        .filter(|&i| packed.targets[i] >= 0)
        .collect();
    let hidden_rows = |h: &Tensor| -> anneal_tensor::Result<Tensor> {
        let d = h.shape()[2];
        h.reshape(&[b * t, d])?.index_select(0, &rows)
    };
    // At sampling time: the policy's and the reference's token log-probabilities, the values.
    let (old_logp, ref_logp, old_values) = anneal_tensor::no_grad(|| -> Result<_> {
        let (logits, hidden) = model.forward_with_hidden(&packed.ids, b, t, None)?;
        let old = token_logprobs(&logits, &packed)?.to_vec_f32();
        let values = match &critic {
            Critic::Value(head, _) => head.apply(&hidden_rows(&hidden)?)?.to_vec_f32(),
            Critic::Group => Vec::new(),
        };
        let base = model.forward_base(&packed.ids, b, t)?;
        let reference = token_logprobs(&base, &packed)?.to_vec_f32();
        Ok((old, reference, values))
    })?;
    // Each reply's token range.
    let mut ranges = Vec::with_capacity(b);
    let mut at = 0;
    for &n in &packed.reply_tokens {
        ranges.push(at..at + n);
        at += n;
    }
    let kl = ranges
        .iter()
        .map(|g| rl::kl_estimate(&old_logp[g.clone()], &ref_logp[g.clone()]))
        .sum::<f64>()
        / b.max(1) as f64;
    let (advantages, returns) = match &critic {
        Critic::Value(..) => {
            let (mut adv, mut ret) = (Vec::new(), Vec::new());
            for (g, &score) in ranges.iter().zip(&r.scores) {
                let rewards = rl::kl_penalized_rewards(
                    &old_logp[g.clone()],
                    &ref_logp[g.clone()],
                    score,
                    s.kl_coef,
                );
                let (a, rt) = rl::gae(&rewards, &old_values[g.clone()], s.gamma, s.lambda);
                adv.extend(a);
                ret.extend(rt);
            }
            (rl::whiten(&adv), ret)
        }
        Critic::Group => {
            let per_reply = rl::group_advantages(&r.scores, s.group);
            let adv = ranges
                .iter()
                .zip(per_reply)
                .flat_map(|(g, a)| std::iter::repeat_n(a, g.len()))
                .collect();
            (adv, Vec::new())
        }
    };
    let mut stats = RlStats {
        score: r.scores.iter().map(|&x| x as f64).sum::<f64>() / b.max(1) as f64,
        kl,
        reply_tokens: r.replies.iter().map(Vec::len).sum::<usize>() as f64 / b.max(1) as f64,
        ..RlStats::default()
    };
    for _ in 0..s.epochs {
        let (logits, hidden) = model.forward_with_hidden(&packed.ids, b, t, None)?;
        let logp = token_logprobs(&logits, &packed)?;
        let (policy_loss, clipped) = rl::ppo_policy_loss(&logp, &old_logp, &advantages, s.clip)?;
        stats.policy_loss = policy_loss.item()? as f64;
        stats.clipped = clipped;
        let loss = match &critic {
            Critic::Value(head, _) => {
                let values = head.apply(&hidden_rows(&hidden)?)?;
                let value_loss = rl::ppo_value_loss(&values, &old_values, &returns, s.clip)?;
                stats.value_loss = value_loss.item()? as f64;
                policy_loss.add(&value_loss.scale(s.value_coef))?
            }
            Critic::Group => policy_loss.add(&rl::kl_loss(&logp, &ref_logp)?.scale(s.kl_coef))?,
        };
        loss.backward()?;
        stats.grad_norm = opt.step(&model.params) as f64;
        if let Critic::Value(head, value_opt) = &mut critic {
            value_opt.step(&head.params);
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::align::config::AlignTrain;

    /// Every parameter's values, by name (copies: the store's tensors share its buffer).
    fn snapshot(m: &Llama) -> Vec<(String, Vec<f32>)> {
        m.params
            .named()
            .into_iter()
            .map(|(n, t)| (n, t.to_vec_f32()))
            .collect()
    }

    /// Two PPO updates on a tiny policy rewarded for replies full of token 7: the adapters
    /// move, the value head learns, and the KL is reported non-negative.
    #[test]
    fn two_ppo_updates_change_the_policy() {
        let m = crate::align::tiny_policy();
        let before = snapshot(&m);
        let t = AlignTrain {
            lr: 1e-2,
            warmup_steps: 0,
            ..AlignTrain::default()
        };
        let mut opt = Updater::new(&m.params, &t, 2);
        let head = RewardHead::new(16, 1).unwrap();
        let mut value_opt = Updater::new(&head.params, &t, 2);
        let head_before = head.params.named()[0].1.to_vec_f32();
        let prompts = vec![vec![1, 2, 3], vec![4, 5]];
        let s = RlSettings::of(&crate::align::config::RlSection::default());
        let mut score = |_: usize, reply: &[u32]| {
            Ok(reply.iter().filter(|&&t| t == 7).count() as f32 / reply.len().max(1) as f32)
        };
        for step in 0..2 {
            let r = rollouts(&m, &prompts, 2, &[12], 0, 6, step, &mut score).unwrap();
            assert_eq!(r.replies.len(), 4);
            let stats = update(
                &m,
                &mut opt,
                Critic::Value(&head, &mut value_opt),
                &r,
                &s,
                0,
            )
            .unwrap();
            assert!(stats.kl >= 0.0 && stats.policy_loss.is_finite());
            assert!(stats.value_loss > 0.0 && stats.grad_norm > 0.0);
        }
        let moved = snapshot(&m)
            .iter()
            .zip(&before)
            .filter(|((_, a), (_, b))| a != b)
            .map(|((n, _), _)| n.clone())
            .collect::<Vec<_>>();
        assert!(!moved.is_empty(), "the policy did not move");
        assert!(moved.iter().all(|n| n.contains(".lora_")), "{moved:?}");
        assert_ne!(head.params.named()[0].1.to_vec_f32(), head_before);
    }

    /// GRPO: a group whose replies all score the same teaches nothing; a group with different
    /// scores moves the adapters.
    #[test]
    fn grpo_learns_only_from_groups_with_different_scores() {
        let m = crate::align::tiny_policy();
        let t = AlignTrain {
            lr: 1e-2,
            warmup_steps: 0,
            ..AlignTrain::default()
        };
        // No KL term: equal scores then give exactly zero gradient.
        let s = RlSettings {
            group: 2,
            kl_coef: 0.0,
            ..RlSettings::of(&crate::align::config::RlSection::default())
        };
        let prompts = vec![vec![1, 2, 3]];
        let r = rollouts(&m, &prompts, 2, &[12], 0, 5, 3, &mut |_, _| Ok(1.0)).unwrap();
        let before = snapshot(&m);
        let mut opt = Updater::new(&m.params, &t, 1);
        update(&m, &mut opt, Critic::Group, &r, &s, 0).unwrap();
        let same = snapshot(&m) == before;
        assert!(same, "equal scores gave a gradient");
        let mut r2 = r.clone();
        r2.scores = vec![1.0, 0.0];
        if r2.replies[0] != r2.replies[1] {
            update(&m, &mut opt, Critic::Group, &r2, &s, 0).unwrap();
            assert!(snapshot(&m) != before);
        }
    }
}
