//! A Mixture-of-Experts feed-forward layer: a router sends each token to its `top_k` most
//! probable experts, each expert a GELU network of its own, and the token's output is the
//! gate-weighted sum of what its experts return (Shazeer et al. 2017; Lepikhin et al. 2020,
//! GShard; Fedus et al. 2021, "Switch Transformers", for top-1):
//!
//! ```text
//! p      = softmax(x · W_router)                  in f32, whatever the model's dtype
//! experts, gates = top-k of p, gates renormalised over the k chosen (k ≥ 2)
//! y[t]   = Σ_c gate[t, c] · expert_c(x[t])        an assignment over capacity adds nothing
//! ```
//!
//! Each expert takes at most ⌈capacity factor · k · tokens / experts⌉ assignments, first choices
//! before second choices, each in position order; the rest are dropped and the token passes on
//! the residual path. No capacity factor routes dropless (Megatron-core's default).
//!
//! The layer adds two losses: the load-balancing loss α · E · Σᵢ fᵢ · Pᵢ (Switch Transformers
//! eq. 4: fᵢ the share of assignments routed to expert i, Pᵢ its mean router probability; α =
//! 1e-2), and the router z-loss β · mean(logsumexp(logits)²) (Zoph et al. 2022, ST-MoE eq. 5;
//! β = 1e-3), which keeps the router's logits small.
//!
//! Dispatch goes through the parallel context ([`ParallelContext::dispatch_to_experts`]), so
//! expert parallelism adds its all-to-all there and nothing here changes.
//!
//! [`ParallelContext::dispatch_to_experts`]: super::ParallelContext::dispatch_to_experts

use super::{join, Builder, Init, Split, Weights};
use anneal_tensor::{
    expert_capacity, DType, DropoutKey, Error, ParamId, Result, Rng, Routing, Tensor,
};

/// How a Mixture-of-Experts layer routes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MoeConfig {
    /// Experts in the layer.
    pub experts: usize,
    /// Experts each token goes to (1: Switch routing).
    pub top_k: usize,
    /// Capacity factor while training; `None` routes dropless.
    pub capacity_factor: Option<f64>,
    /// Capacity factor in evaluation and generation; `None` routes dropless.
    pub eval_capacity_factor: Option<f64>,
    /// Weight α of the load-balancing loss.
    pub aux_loss: f32,
    /// Weight β of the router z-loss.
    pub z_loss: f32,
    /// Multiplicative noise on the router's input while training: each element times
    /// Uniform(1 − ε, 1 + ε) (Switch Transformers §2.4); 0 turns it off.
    pub jitter: f32,
}

impl MoeConfig {
    /// Switch routing over `experts`: top-1, capacity factor 1.25 in training (Switch
    /// Transformers Table 1 finds 1.0–1.25 the best trade-off), dropless in evaluation (so a
    /// token's loss does not depend on the batch it is scored in), α = 1e-2, β = 1e-3, no jitter.
    pub fn switch(experts: usize) -> MoeConfig {
        MoeConfig {
            experts,
            top_k: 1,
            capacity_factor: Some(1.25),
            eval_capacity_factor: None,
            aux_loss: 1e-2,
            z_loss: 1e-3,
            jitter: 0.0,
        }
    }

    /// Checks every value before anything is built; the error names the key (under `prefix`,
    /// e.g. `model.moe`), its value and what is allowed.
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let bad = |key: &str, value: String, allowed: &str| {
            Err(Error::Invalid {
                op: "MoeConfig",
                reason: format!("{prefix}.{key} = {value} is not allowed: {allowed}"),
            })
        };
        if self.experts == 0 {
            return bad("experts", "0".into(), "at least 1");
        }
        if self.top_k == 0 || self.top_k > self.experts {
            let allowed = format!("between 1 and {prefix}.experts ({})", self.experts);
            return bad("top_k", self.top_k.to_string(), &allowed);
        }
        for (key, f) in [
            ("capacity_factor", self.capacity_factor),
            ("eval_capacity_factor", self.eval_capacity_factor),
        ] {
            if let Some(f) = f {
                if !(f > 0.0 && f.is_finite()) {
                    return bad(
                        key,
                        f.to_string(),
                        "a positive number, or \"none\" (dropless)",
                    );
                }
            }
        }
        for (key, v) in [("aux_loss", self.aux_loss), ("z_loss", self.z_loss)] {
            if !(v >= 0.0 && v.is_finite()) {
                return bad(key, v.to_string(), "zero or a positive number");
            }
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return bad("jitter", self.jitter.to_string(), "a number in [0, 1)");
        }
        Ok(())
    }
}

/// What a Mixture-of-Experts layer reports besides its output.
#[derive(Clone, Debug)]
pub struct MoeAux {
    /// The load-balancing loss, weighted by α (a scalar).
    pub balance: Tensor,
    /// The router z-loss, weighted by β (a scalar).
    pub z: Tensor,
    /// Each expert's share of the assignments the router made, before capacity.
    pub load: Vec<f64>,
    /// The share of assignments dropped for want of capacity.
    pub dropped: f64,
    /// The router's probabilities `[tokens, experts]` (f32, in the graph), for losses on the
    /// routing itself ([`router_entropies`]); `None` where the layer ran inside a recomputed
    /// segment.
    pub probs: Option<Tensor>,
}

/// LIMoE's entropy losses on the router probabilities `probs` `[tokens, experts]` of one
/// modality (Mustafa et al. 2022, "Multimodal Contrastive Learning with LIMoE", §3.1, eqs. 2–3):
/// the local loss mean_t H(p_t), low when each token is routed confidently, and the global loss
/// −H(mean_t p_t), low when the modality's tokens spread over many experts. H(p) = −Σ p·ln p.
pub fn router_entropies(probs: &Tensor) -> Result<(Tensor, Tensor)> {
    if probs.numel() == 0 {
        return Ok((
            Tensor::zeros(&[], DType::F32),
            Tensor::zeros(&[], DType::F32),
        ));
    }
    // ln(p + 1e-9): a probability that underflowed to zero adds nothing instead of NaN.
    let plogp = |p: &Tensor| -> Result<Tensor> { p.mul(&p.add_scalar(1e-9).log()) };
    let local = plogp(probs)?.sum(1, false)?.mean_all()?.scale(-1.0);
    let mean = probs.mean(0, false)?;
    let global = plogp(&mean)?.sum_all()?;
    Ok((local, global))
}

/// A Mixture-of-Experts feed-forward layer of GELU experts (GPT-2's or BERT's network, once per
/// expert), its weights stacked over the experts.
#[derive(Clone, Debug)]
pub struct MoeMlp {
    config: MoeConfig,
    d: usize,
    hidden: usize,
    router: ParamId,
    fc: (ParamId, Option<ParamId>),
    proj: (ParamId, Option<ParamId>),
    exact_gelu: bool,
}

impl MoeMlp {
    /// Declares the router `prefix.router.weight` `[d, experts]` and the experts' stacked
    /// projections `prefix.experts.{fc}.weight` `[experts, d, hidden]` and
    /// `prefix.experts.{proj}.weight` `[experts, hidden, d]` (with biases `[experts, …]` when
    /// `bias`), each rank keeping its share of the experts.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        b: &mut Builder,
        prefix: &str,
        d: usize,
        hidden: usize,
        config: MoeConfig,
        names: (&str, &str),
        exact_gelu: bool,
        bias: bool,
        std: f32,
        proj_std: f32,
    ) -> Result<MoeMlp> {
        config.validate("moe")?;
        let (_, ep) = b.parallel().expert_parallel();
        if !config.experts.is_multiple_of(ep) {
            return Err(Error::Invalid {
                op: "MoeMlp",
                reason: format!(
                    "{} experts do not divide over {ep} expert-parallel ranks",
                    config.experts
                ),
            });
        }
        let e = config.experts;
        let router = b.param(
            &join(prefix, "router.weight"),
            &[d, e],
            Init::Normal(std),
            true,
            Split::Replicated,
        )?;
        let experts = join(prefix, "experts");
        let mut stacked = |name: &str, shape: [usize; 2], std: f32| -> Result<_> {
            let p = join(&experts, name);
            let w = b.param(
                &join(&p, "weight"),
                &[e, shape[0], shape[1]],
                Init::Normal(std),
                true,
                Split::Experts,
            )?;
            let bias = bias
                .then(|| {
                    b.param(
                        &join(&p, "bias"),
                        &[e, shape[1]],
                        Init::Zeros,
                        false,
                        Split::Experts,
                    )
                })
                .transpose()?;
            Ok((w, bias))
        };
        let fc = stacked(names.0, [d, hidden], std)?;
        let proj = stacked(names.1, [hidden, d], proj_std)?;
        Ok(MoeMlp {
            config,
            d,
            hidden,
            router,
            fc,
            proj,
            exact_gelu,
        })
    }

    /// How it routes.
    pub fn config(&self) -> &MoeConfig {
        &self.config
    }

    /// Every parameter id: the router, then the experts' projections.
    pub fn params(&self) -> Vec<ParamId> {
        let mut out = vec![self.router, self.fc.0];
        out.extend(self.fc.1);
        out.push(self.proj.0);
        out.extend(self.proj.1);
        out
    }

    /// Parameters of one expert.
    pub fn params_per_expert(&self) -> usize {
        let bias = usize::from(self.fc.1.is_some());
        2 * self.d * self.hidden + bias * (self.hidden + self.d)
    }

    /// All its parameters (over every rank's experts), and those one token computes with: the
    /// router and `top_k` experts.
    pub fn total_and_active_params(&self) -> (usize, usize) {
        let router = self.d * self.config.experts;
        let expert = self.params_per_expert();
        (
            router + self.config.experts * expert,
            router + self.config.top_k * expert,
        )
    }

    /// The layer on `x` `[…, d]`; `training` (the dropout key of a training forward, `None` in
    /// evaluation) picks the capacity factor and draws the router's jitter.
    pub fn forward(
        &self,
        w: &Weights,
        x: &Tensor,
        training: Option<DropoutKey>,
    ) -> Result<(Tensor, MoeAux)> {
        let c = &self.config;
        let factor = if training.is_some() {
            c.capacity_factor
        } else {
            c.eval_capacity_factor
        };
        self.forward_with_capacity(w, x, training, factor)
    }

    /// The layer in evaluation with no capacity limit: generation routes this way, so a token
    /// is routed alike whether it comes in a prompt or one at a time.
    pub fn forward_dropless(&self, w: &Weights, x: &Tensor) -> Result<(Tensor, MoeAux)> {
        self.forward_with_capacity(w, x, None, None)
    }

    /// The layer with capacity factor `factor` (`None`: dropless).
    fn forward_with_capacity(
        &self,
        w: &Weights,
        x: &Tensor,
        training: Option<DropoutKey>,
        factor: Option<f64>,
    ) -> Result<(Tensor, MoeAux)> {
        let c = &self.config;
        let (d, e, k) = (self.d, c.experts, c.top_k);
        let shape = x.shape().to_vec();
        let tokens = x.numel() / d.max(1);
        if tokens == 0 {
            let zero = || Tensor::zeros(&[], DType::F32);
            let aux = MoeAux {
                balance: zero(),
                z: zero(),
                load: vec![0.0; e],
                dropped: 0.0,
                probs: None,
            };
            return Ok((Tensor::zeros(&shape, x.dtype()), aux));
        }
        let x2 = x.reshape(&[tokens, d])?;
        // The router in f32 (Switch Transformers' selective precision).
        let mut xr = x2.to_dtype(DType::F32);
        if let (Some(key), true) = (training, c.jitter > 0.0) {
            let mut rng = Rng::new(
                key.seed
                    .wrapping_mul(0x2545_F491_4F6C_DD1D)
                    .wrapping_add(key.first_row),
            );
            let noise = Tensor::rand_uniform(
                &[tokens, d],
                1.0 - c.jitter,
                1.0 + c.jitter,
                DType::F32,
                &mut rng,
            );
            xr = xr.mul(&noise)?;
        }
        let logits = xr.linear(&w.get_f32(self.router)?, None)?;
        let probs = logits.softmax()?;
        let capacity = factor.map(|f| expert_capacity(f, k, tokens, e));
        let routing = Routing::top_k(&probs.to_vec_f32(), e, k, capacity)?;
        let mut gates = probs.gather(1, routing.choice(), &[tokens, k])?;
        if k > 1 {
            gates = gates.div(&gates.sum(1, true)?)?;
        }
        // Dispatch: each expert's rows, one product per expert, back to the tokens.
        let rows = x2.index_select(0, &routing.row_tokens())?;
        let parallel = w.parallel();
        let (rows, local) = parallel.dispatch_to_experts(&rows, routing.counts())?;
        let bias = |id: Option<ParamId>| id.map(|id| w.get(id)).transpose();
        let h = rows.grouped_linear(&w.get(self.fc.0)?, bias(self.fc.1)?.as_ref(), &local, None)?;
        let out = h.grouped_linear(
            &w.get(self.proj.0)?,
            bias(self.proj.1)?.as_ref(),
            &local,
            Some(self.exact_gelu),
        )?;
        let out = parallel.return_from_experts(&out, routing.counts())?;
        let y = out.moe_combine(&gates, &routing)?.reshape(&shape)?;
        // Balancing: α · E · Σ fᵢ Pᵢ, the gradient reaching the router through Pᵢ only.
        let assignments = (tokens * k).max(1) as f64;
        let load: Vec<f64> = routing
            .wanted()
            .iter()
            .map(|&n| n as f64 / assignments)
            .collect();
        let weights: Vec<f32> = load
            .iter()
            .map(|f| (f * e as f64 * c.aux_loss as f64) as f32)
            .collect();
        let balance = probs
            .mean(0, false)?
            .mul(&Tensor::from_f32(weights, &[e])?)?
            .sum_all()?;
        let lse = logits.logsumexp()?;
        let z = lse.mul(&lse)?.mean_all()?.scale(c.z_loss);
        Ok((
            y,
            MoeAux {
                balance,
                z,
                load,
                dropped: routing.dropped_fraction(),
                probs: Some(probs),
            },
        ))
    }
}
