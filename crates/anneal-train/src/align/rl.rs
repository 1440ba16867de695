//! The arithmetic of PPO-RLHF (InstructGPT, Ouyang et al. 2022; PPO, Schulman et al. 2017) on
//! one sampled reply: per-token rewards with a KL penalty to the reference model, generalised
//! advantage estimation, whitening, and PPO's clipped losses; GRPO's group-relative advantages,
//! best-of-k selection for rejection sampling, and a guard that stops a drifting policy.

use anneal_tensor::{Backward, Result, Tensor};

/// InstructGPT's settings, the defaults of `anneal align ppo`: the per-token KL coefficient,
/// GAE's γ and λ, PPO's clip range (policy and value) and the value loss's weight.
pub const KL_COEF: f32 = 0.05;
/// GAE's discount γ (an episode is one reply: undiscounted).
pub const GAMMA: f32 = 1.0;
/// GAE's λ.
pub const LAMBDA: f32 = 0.95;
/// PPO's clip range ε.
pub const CLIP: f32 = 0.2;
/// The value loss's weight in PPO's objective.
pub const VALUE_COEF: f32 = 0.1;

/// Per-token rewards of one reply: −coef·(ln π(tₜ) − ln π_ref(tₜ)) at every token, plus the
/// reward model's `score` at the last one (InstructGPT's per-token KL penalty). A token the
/// policy finds likelier than the reference does is penalised.
pub fn kl_penalized_rewards(logp: &[f32], ref_logp: &[f32], score: f32, coef: f32) -> Vec<f32> {
    let mut r: Vec<f32> = logp
        .iter()
        .zip(ref_logp)
        .map(|(l, r)| -coef * (l - r))
        .collect();
    if let Some(last) = r.last_mut() {
        *last += score;
    }
    r
}

/// The KL divergence KL(π ‖ π_ref) estimated from tokens sampled from π, as the mean of
/// k₃ = e^(ln π_ref − ln π) − (ln π_ref − ln π) − 1 (Schulman 2020, "Approximating KL
/// divergence"): unbiased like the mean of ln π − ln π_ref, but every term is ≥ 0, so the
/// reported KL can never go negative, as the plain log-ratio's sample mean often does.
pub fn kl_estimate(logp: &[f32], ref_logp: &[f32]) -> f64 {
    let n = logp.len().max(1) as f64;
    logp.iter()
        .zip(ref_logp)
        .map(|(&l, &r)| {
            let d = (r - l) as f64;
            d.exp() - d - 1.0
        })
        .sum::<f64>()
        / n
}

/// Generalised advantage estimation (Schulman et al. 2016) over one reply of `rewards.len()`
/// tokens whose value estimates are `values`, the state after the last token terminal:
/// δₜ = rₜ + γ·Vₜ₊₁ − Vₜ, Aₜ = δₜ + γλ·Aₜ₊₁. Returns the advantages and the returns Aₜ + Vₜ (the
/// value head's targets).
pub fn gae(rewards: &[f32], values: &[f32], gamma: f32, lambda: f32) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(rewards.len(), values.len(), "a value for every reward");
    let n = rewards.len();
    let mut adv = vec![0.0f32; n];
    let mut next = (0.0f32, 0.0f32); // (Vₜ₊₁, Aₜ₊₁)
    for t in (0..n).rev() {
        let delta = rewards[t] + gamma * next.0 - values[t];
        adv[t] = delta + gamma * lambda * next.1;
        next = (values[t], adv[t]);
    }
    let returns = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, returns)
}

/// `x` shifted to mean 0 and scaled to standard deviation 1 (population), as PPO whitens a
/// batch's advantages; a constant batch becomes zeros.
pub fn whiten(x: &[f32]) -> Vec<f32> {
    let n = x.len().max(1) as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let scale = 1.0 / (var.sqrt() + 1e-8);
    x.iter()
        .map(|&v| ((v as f64 - mean) * scale) as f32)
        .collect()
}

/// GRPO's advantages (Shao et al. 2024, DeepSeekMath §4.1): each of a prompt's `group` sampled
/// replies is scored against its siblings, (r − mean) / (std + 1e-8) within the group, in place
/// of a value model; every token of a reply takes its reply's advantage. `rewards` holds the
/// groups one after another. A group whose replies all score the same teaches nothing (zeros).
pub fn group_advantages(rewards: &[f32], group: usize) -> Vec<f32> {
    assert!(
        group > 0 && rewards.len().is_multiple_of(group),
        "whole groups of {group} replies"
    );
    rewards.chunks(group).flat_map(whiten).collect()
}

/// Rejection sampling (best-of-k, as LaMDA filters candidate responses): for each prompt's `k`
/// scored candidates (groups one after another in `scores`), the index of the best one when it
/// reaches `threshold`, else `None`; ties go to the first.
pub fn best_of(scores: &[f32], k: usize, threshold: f32) -> Vec<Option<usize>> {
    assert!(
        k > 0 && scores.len().is_multiple_of(k),
        "whole groups of {k} candidates"
    );
    scores
        .chunks(k)
        .enumerate()
        .map(|(g, c)| {
            let (i, best) =
                c.iter().enumerate().fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &s)| if s > b.1 { (i, s) } else { b },
                );
            (best >= threshold).then_some(g * k + i)
        })
        .collect()
}

/// Stops a reinforcement-learning run whose policy drifts from the reference: more than
/// `patience` updates in a row with the KL estimate above `bound` is an error naming both, so
/// the run can checkpoint and stop instead of diverging silently.
#[derive(Clone, Debug)]
pub struct KlGuard {
    /// The largest KL (nats per token) an update may reach.
    pub bound: f64,
    /// Updates in a row allowed above the bound.
    pub patience: usize,
    over: usize,
}

impl KlGuard {
    /// A guard with nothing seen yet.
    pub fn new(bound: f64, patience: usize) -> KlGuard {
        KlGuard {
            bound,
            patience,
            over: 0,
        }
    }

    /// Records one update's KL estimate; fails once more than `patience` in a row exceed the
    /// bound (a non-finite KL counts as exceeding it).
    pub fn check(&mut self, step: u64, kl: f64) -> anyhow::Result<()> {
        if kl.is_finite() && kl <= self.bound {
            self.over = 0;
            return Ok(());
        }
        self.over += 1;
        if self.over > self.patience {
            anyhow::bail!(
                "the policy drifted from the reference: KL {kl:.4} nats per token at update \
                 {step}, above the bound {} for {} updates in a row; lower the learning rate or \
                 raise the KL coefficient",
                self.bound,
                self.over
            );
        }
        Ok(())
    }
}

/// PPO's clipped policy loss (Schulman et al. 2017, eq. 7), −mean(min(ρ·A, clip(ρ, 1−ε, 1+ε)·A))
/// with ρ = e^(ln π − ln π_old), from the policy's log-probabilities of the sampled tokens
/// (`[tokens]`, tracked) and those of the policy that sampled them. Also returns the share of
/// tokens whose ratio was clipped.
pub fn ppo_policy_loss(
    logp: &Tensor,
    old_logp: &[f32],
    advantages: &[f32],
    clip: f32,
) -> Result<(Tensor, f64)> {
    let lp = logp.to_vec_f32();
    let n = lp.len().max(1) as f32;
    let (mut loss, mut clipped) = (0.0f64, 0usize);
    // d loss / d ln π per token: −A·ρ/n where the unclipped term is the smaller, else 0.
    let mut slope = Vec::with_capacity(lp.len());
    for ((&l, &o), &a) in lp.iter().zip(old_logp).zip(advantages) {
        let ratio = (l - o).exp();
        let bounded = ratio.clamp(1.0 - clip, 1.0 + clip);
        let (u, c) = (ratio * a, bounded * a);
        if c < u {
            clipped += 1;
            loss -= c as f64;
            slope.push(0.0);
        } else {
            loss -= u as f64;
            slope.push(-a * ratio / n);
        }
    }
    let value = Tensor::from_f32(vec![(loss / n as f64) as f32], &[])?;
    let out = Tensor::from_op(
        value,
        &[logp],
        Slope {
            name: "ppo_policy_loss",
            slope,
        },
    );
    Ok((out, clipped as f64 / n as f64))
}

/// The k₃ KL estimate of [`kl_estimate`] as a loss on the policy's log-probabilities of sampled
/// tokens (`[tokens]`, tracked) against the reference's: GRPO's KL term (DeepSeekMath eq. 4),
/// whose gradient 1 − e^(ln π_ref − ln π) per token (over their count) pulls the policy back.
pub fn kl_loss(logp: &Tensor, ref_logp: &[f32]) -> Result<Tensor> {
    let lp = logp.to_vec_f32();
    let n = lp.len().max(1) as f32;
    let value = kl_estimate(&lp, ref_logp) as f32;
    let slope = lp
        .iter()
        .zip(ref_logp)
        .map(|(&l, &r)| (1.0 - (r - l).exp()) / n)
        .collect();
    Ok(Tensor::from_op(
        Tensor::from_f32(vec![value], &[])?,
        &[logp],
        Slope {
            name: "kl_loss",
            slope,
        },
    ))
}

/// PPO's clipped value loss, ½·mean(max((V − R)², (V_old + clip(V − V_old, −ε, ε) − R)²)), from
/// the value head's estimates (`[tokens]`, tracked), those at sampling time and the returns.
pub fn ppo_value_loss(
    values: &Tensor,
    old_values: &[f32],
    returns: &[f32],
    clip: f32,
) -> Result<Tensor> {
    let v = values.to_vec_f32();
    let n = v.len().max(1) as f32;
    let mut loss = 0.0f64;
    let mut slope = Vec::with_capacity(v.len());
    for ((&v, &o), &r) in v.iter().zip(old_values).zip(returns) {
        let bounded = o + (v - o).clamp(-clip, clip);
        let (u, c) = ((v - r).powi(2), (bounded - r).powi(2));
        if c > u {
            // The clipped estimate does not move with V (inside the clip it equals V, and
            // then the two terms are equal).
            loss += 0.5 * c as f64;
            slope.push(0.0);
        } else {
            loss += 0.5 * u as f64;
            slope.push((v - r) / n);
        }
    }
    let value = Tensor::from_f32(vec![(loss / n as f64) as f32], &[])?;
    Ok(Tensor::from_op(
        value,
        &[values],
        Slope {
            name: "ppo_value_loss",
            slope,
        },
    ))
}

/// The gradient of a scalar loss that is a sum of per-element terms: d loss / d xᵢ, fixed at
/// the forward pass.
struct Slope {
    name: &'static str,
    slope: Vec<f32>,
}

impl Backward for Slope {
    fn name(&self) -> &'static str {
        self.name
    }

    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let g = grad.item()?;
        let n = self.slope.len();
        let values = self.slope.into_iter().map(|s| s * g).collect();
        Ok(vec![Some(Tensor::from_f32(values, &[n])?)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anneal_tensor::testing::assert_grads;

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-6, "{a:?} against {b:?}");
        }
    }

    #[test]
    fn kl_loss_is_the_estimate_and_checks_by_differences() {
        let lp = Tensor::from_f32(vec![-1.0, -2.5, -0.3], &[3]).unwrap();
        let reference = [-1.2, -2.0, -0.3];
        let got = kl_loss(&lp, &reference).unwrap().item().unwrap() as f64;
        let want = kl_estimate(&lp.to_vec_f32(), &reference);
        assert!((got - want).abs() < 1e-6 && want > 0.0);
        assert_grads(|x| kl_loss(&x[0], &reference), &[lp]);
    }

    #[test]
    fn gae_matches_a_hand_computed_trajectory() {
        // γ 1, λ 0.95: δ = (−0.1, 0.2, 0.4); A₂ = 0.4, A₁ = 0.2 + 0.95·0.4, A₀ = −0.1 + 0.95·A₁.
        let (adv, ret) = gae(&[0.0, 0.0, 1.0], &[0.5, 0.4, 0.6], 1.0, 0.95);
        close(&adv, &[0.451, 0.58, 0.4]);
        close(&ret, &[0.951, 0.98, 1.0]);
        // γ 0.5, λ 0: one-step TD errors.
        let (adv, _) = gae(&[1.0, 2.0], &[0.0, 1.0], 0.5, 0.0);
        close(&adv, &[1.5, 1.0]);
    }

    #[test]
    fn the_kl_penalty_has_the_right_sign_and_the_estimate_never_goes_negative() {
        // The policy likes token 0 more than the reference does, token 1 less.
        let r = kl_penalized_rewards(&[-0.5, -2.0], &[-1.0, -1.0], 3.0, 0.05);
        close(&r, &[-0.025, 0.05 + 3.0]);
        assert_eq!(kl_estimate(&[-0.3, -1.2], &[-0.3, -1.2]), 0.0);
        // Samples where the plain log-ratio averages below zero: k₃ stays positive.
        let (logp, refp) = ([-2.0f32, -0.1, -0.2], [-0.5f32, -0.3, -0.4]);
        let k1: f64 = logp
            .iter()
            .zip(&refp)
            .map(|(l, r)| (l - r) as f64)
            .sum::<f64>()
            / 3.0;
        assert!(k1 < 0.0);
        let k3 = kl_estimate(&logp, &refp);
        let want = [(1.5f64), (-0.2), (-0.2)]
            .iter()
            .map(|d| d.exp() - d - 1.0)
            .sum::<f64>()
            / 3.0;
        assert!(k3 > 0.0 && (k3 - want).abs() < 1e-6, "{k3} {want}");
    }

    #[test]
    fn group_advantages_best_of_k_and_the_kl_guard() {
        // Two groups of three: rewards (1, 0, 0) and (1, 1, 1).
        let a = group_advantages(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], 3);
        let s = (2.0f32 / 9.0).sqrt();
        close(
            &a[..3],
            &[(2.0 / 3.0) / s, (-1.0 / 3.0) / s, (-1.0 / 3.0) / s],
        );
        assert_eq!(&a[3..], &[0.0, 0.0, 0.0]);
        assert_eq!(
            best_of(&[0.2, 0.9, 0.9, 0.1, 0.3, 0.2], 3, 0.25),
            vec![Some(1), Some(4)]
        );
        assert_eq!(best_of(&[0.2, 0.1], 2, 0.5), vec![None]);
        let mut guard = KlGuard::new(0.5, 2);
        for (step, kl) in [0.6, 0.7, 0.1, 0.6, 0.6].into_iter().enumerate() {
            guard.check(step as u64, kl).unwrap();
        }
        let err = guard.check(5, 0.9).unwrap_err().to_string();
        assert!(
            err.contains("KL 0.9000") && err.contains("3 updates in a row"),
            "{err}"
        );
        assert!(KlGuard::new(0.5, 0).check(0, f64::NAN).is_err());
    }

    #[test]
    fn whitening_gives_mean_zero_and_unit_spread() {
        let w = whiten(&[1.0, 2.0, 3.0, 6.0]);
        let mean: f32 = w.iter().sum::<f32>() / 4.0;
        let var: f32 = w.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5, "{w:?}");
        assert_eq!(whiten(&[2.0, 2.0]), vec![0.0, 0.0]);
    }

    #[test]
    fn ppo_losses_clip_by_hand_and_their_gradients_match_finite_differences() {
        // Ratios e^0.5 ≈ 1.65 (A > 0: clipped at 1.2), e^−0.5 ≈ 0.61 (A < 0: clipped at 0.8),
        // e^0.1 (inside), e^0.5 with A < 0 (the unclipped term is the smaller: kept).
        let old = [0.0f32; 4];
        let adv = [1.0f32, -2.0, 0.5, -1.0];
        let lp = [0.5f32, -0.5, 0.1, 0.5];
        let logp = Tensor::from_f32(lp.to_vec(), &[4]).unwrap();
        let (loss, clipped) = ppo_policy_loss(&logp, &old, &adv, 0.2).unwrap();
        let e = |x: f32| x.exp();
        let want = -(1.2 * 1.0 + 0.8 * -2.0 + e(0.1) * 0.5 - e(0.5)) / 4.0;
        assert!((loss.item().unwrap() - want).abs() < 1e-6);
        assert_eq!(clipped, 0.5);
        assert_grads(
            |x| Ok(ppo_policy_loss(&x[0], &old, &adv, 0.2)?.0),
            &[logp.clone()],
        );
        // Values: V 0.9 from 0.5 (clipped to 0.7), return 1.0: max((−0.1)², (−0.3)²) = 0.09,
        // the clipped term, which does not move with V; V 0.2 from 0.3, return 0: unclipped.
        let values = Tensor::from_f32(vec![0.9, 0.2], &[2]).unwrap();
        let loss = ppo_value_loss(&values, &[0.5, 0.3], &[1.0, 0.0], 0.2).unwrap();
        assert!((loss.item().unwrap() - 0.5 * (0.09 + 0.04) / 2.0).abs() < 1e-6);
        assert_grads(
            |x| ppo_value_loss(&x[0], &[0.5, 0.3], &[1.0, 0.0], 0.2),
            &[values.clone()],
        );
    }
}
