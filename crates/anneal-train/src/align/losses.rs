//! The pairwise losses of preference learning.

use anneal_tensor::{Result, Tensor};

/// DPO's β, the default of `anneal align dpo` (Rafailov et al. 2023 use 0.1 for most runs).
pub const DPO_BETA: f32 = 0.1;

/// The Bradley–Terry pairwise loss of a reward model (Ouyang et al. 2022, eq. 1):
/// mean over pairs of −ln σ(r(chosen) − r(rejected)), from the two replies' scalar scores
/// (shape `[pairs]`).
pub fn bradley_terry(chosen: &Tensor, rejected: &Tensor) -> Result<Tensor> {
    Ok(chosen.sub(rejected)?.log_sigmoid().mean_all()?.scale(-1.0))
}

/// The share of pairs whose chosen score is above the rejected one (a reward model's pairwise
/// accuracy).
pub fn pairwise_accuracy(chosen: &[f32], rejected: &[f32]) -> f64 {
    let right = chosen.iter().zip(rejected).filter(|(c, r)| c > r).count();
    right as f64 / chosen.len().max(1) as f64
}

/// The DPO loss and the implicit rewards it trains.
pub struct DpoOutput {
    /// −mean ln σ(β·((π_c − ref_c) − (π_r − ref_r))).
    pub loss: Tensor,
    /// β·(π_c − ref_c) per pair: the implicit reward of the chosen reply.
    pub chosen_rewards: Vec<f32>,
    /// β·(π_r − ref_r) per pair.
    pub rejected_rewards: Vec<f32>,
}

impl DpoOutput {
    /// The share of pairs whose chosen reply has the larger implicit reward.
    pub fn accuracy(&self) -> f64 {
        pairwise_accuracy(&self.chosen_rewards, &self.rejected_rewards)
    }
}

/// Direct preference optimisation (Rafailov et al. 2023, eq. 7) from the policy's summed
/// log-probabilities of each pair's replies (`[pairs]`, tracked) and the reference model's,
/// computed once before training (plain values: no second model is held while training). At
/// the first step, where the policy is the reference, the loss is ln 2 whatever the data.
pub fn dpo(
    policy_chosen: &Tensor,
    policy_rejected: &Tensor,
    reference_chosen: &[f32],
    reference_rejected: &[f32],
    beta: f32,
) -> Result<DpoOutput> {
    let n = reference_chosen.len();
    let reference = |v: &[f32]| Tensor::from_f32(v.to_vec(), &[n]);
    let chosen = policy_chosen
        .sub(&reference(reference_chosen)?)?
        .scale(beta);
    let rejected = policy_rejected
        .sub(&reference(reference_rejected)?)?
        .scale(beta);
    let loss = chosen.sub(&rejected)?.log_sigmoid().mean_all()?.scale(-1.0);
    Ok(DpoOutput {
        loss,
        chosen_rewards: chosen.to_vec_f32(),
        rejected_rewards: rejected.to_vec_f32(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_f32(v.to_vec(), &[v.len()]).unwrap()
    }

    #[test]
    fn bradley_terry_matches_hand_computed_values_and_gradients() {
        let (c, r) = (
            t(&[2.0, 0.5]).requires_grad_(),
            t(&[1.0, 1.5]).requires_grad_(),
        );
        let loss = bradley_terry(&c, &r).unwrap();
        // Margins 1 and −1: (ln(1 + e⁻¹) + ln(1 + e)) / 2.
        let want = ((1.0f64 + (-1.0f64).exp()).ln() + (1.0f64 + 1.0f64.exp()).ln()) / 2.0;
        assert!((loss.item().unwrap() as f64 - want).abs() < 1e-6);
        assert!((want - 0.813_261_7).abs() < 1e-6);
        loss.backward().unwrap();
        // d/dc = −σ(−m)/2, d/dr = +σ(−m)/2.
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let gc = c.grad().unwrap().to_vec_f32();
        let gr = r.grad().unwrap().to_vec_f32();
        for (i, m) in [1.0, -1.0].into_iter().enumerate() {
            assert!((gc[i] as f64 + sig(-m) / 2.0).abs() < 1e-6, "{gc:?}");
            assert!((gr[i] as f64 - sig(-m) / 2.0).abs() < 1e-6, "{gr:?}");
        }
        assert_eq!(pairwise_accuracy(&[2.0, 0.5], &[1.0, 1.5]), 0.5);
    }

    #[test]
    fn dpo_starts_at_ln_2_and_matches_a_hand_computed_step() {
        // The policy is the reference: every margin is zero, the loss ln 2, whatever the data.
        let (pc, pr) = ([-10.0, -3.5, -40.0], [-12.0, -3.0, -1.0]);
        let out = dpo(&t(&pc), &t(&pr), &pc, &pr, 0.1).unwrap();
        assert!((out.loss.item().unwrap() - std::f32::consts::LN_2).abs() < 1e-7);
        assert_eq!(out.accuracy(), 0.0);
        // β 0.1, chosen 1 above its reference, rejected 1 below: margin 0.2.
        let c = t(&[-10.0]).requires_grad_();
        let r = t(&[-12.0]).requires_grad_();
        let out = dpo(&c, &r, &[-11.0], &[-11.0], 0.1).unwrap();
        let want = (1.0f64 + (-0.2f64).exp()).ln();
        assert!((out.loss.item().unwrap() as f64 - want).abs() < 1e-6);
        assert!((out.chosen_rewards[0] - 0.1).abs() < 1e-6);
        assert!((out.rejected_rewards[0] + 0.1).abs() < 1e-6);
        assert_eq!(out.accuracy(), 1.0);
        out.loss.backward().unwrap();
        // d/dπ_c = −β·σ(−margin).
        let g = c.grad().unwrap().to_vec_f32()[0] as f64;
        assert!((g + 0.1 / (1.0 + 0.2f64.exp())).abs() < 1e-6, "{g}");
        assert!((r.grad().unwrap().to_vec_f32()[0] as f64 + g).abs() < 1e-7);
    }
}
