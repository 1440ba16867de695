//! Log-probabilities of replies given their prompts: what DPO compares between the policy and
//! the reference model, and what PPO's ratios and KL penalty are made of.

use anneal_tensor::{CrossEntropyOptions, Result, Tensor};

/// Prompt + reply sequences packed into one right-padded batch for a causal LM: position t of a
/// row predicts its token t + 1, and only reply tokens are targets.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedReplies {
    /// Input ids `[batch, seq]`, row-major: each sequence without its last token, then padding.
    pub ids: Vec<u32>,
    /// Next-token targets `[batch, seq]`: reply tokens, −100 on prompt and padding positions.
    pub targets: Vec<i64>,
    /// Rows.
    pub batch: usize,
    /// Positions per row.
    pub seq: usize,
    /// Reply tokens per row.
    pub reply_tokens: Vec<usize>,
}

/// Packs `(prompt, reply)` token sequences (each reply non-empty) with `pad` filling the rows
/// up to the longest.
pub fn pack(examples: &[(Vec<u32>, Vec<u32>)], pad: u32) -> PackedReplies {
    let seq = examples
        .iter()
        .map(|(p, r)| p.len() + r.len() - 1)
        .max()
        .unwrap_or(0);
    let (mut ids, mut targets) = (Vec::new(), Vec::new());
    for (prompt, reply) in examples {
        assert!(
            !reply.is_empty() && !prompt.is_empty(),
            "a prompt and a reply"
        );
        let whole: Vec<u32> = prompt.iter().chain(reply).copied().collect();
        let n = whole.len() - 1;
        ids.extend_from_slice(&whole[..n]);
        ids.extend(std::iter::repeat_n(pad, seq - n));
        // Position t predicts whole[t + 1]: a reply token from t = prompt.len() − 1 on.
        targets.extend((0..n).map(|t| {
            if t + 1 >= prompt.len() {
                whole[t + 1] as i64
            } else {
                -100
            }
        }));
        targets.extend(std::iter::repeat_n(-100, seq - n));
    }
    PackedReplies {
        ids,
        targets,
        batch: examples.len(),
        seq,
        reply_tokens: examples.iter().map(|(_, r)| r.len()).collect(),
    }
}

/// Σ ln p(reply token) of each row (`[batch]`) from the model's logits `[batch·seq, vocab]` for
/// `packed.ids`: one fused cross-entropy per row over its reply positions, so no
/// `[batch·seq, vocab]` log-softmax is held.
pub fn reply_logprobs(logits: &Tensor, packed: &PackedReplies) -> Result<Tensor> {
    let s = packed.seq;
    let rows: Vec<Tensor> = (0..packed.batch)
        .map(|b| {
            let targets = &packed.targets[b * s..(b + 1) * s];
            let mean = logits
                .narrow(0, b * s, s)?
                .cross_entropy(targets, CrossEntropyOptions::default())?;
            mean.scale(-(packed.reply_tokens[b] as f32)).reshape(&[1])
        })
        .collect::<Result<_>>()?;
    let refs: Vec<&Tensor> = rows.iter().collect();
    Tensor::concat(&refs, 0)
}

/// ln p(target) of each reply token of `packed` (`[Σ reply_tokens]`, row by row, in order) from
/// the logits `[batch·seq, vocab]`: the per-token log-probabilities PPO's ratios, KL penalty and
/// value targets are made of. Its backward sends g·(onehot − softmax) into each reply
/// position's logits.
pub fn token_logprobs(logits: &Tensor, packed: &PackedReplies) -> Result<Tensor> {
    let vocab = *logits.shape().last().unwrap_or(&0);
    let rows: Vec<(usize, usize)> = packed
        .targets
        .iter()
        .enumerate()
        .filter(|(_, &t)| t >= 0)
        .map(|(i, &t)| (i, t as usize))
        .collect();
    let values = logits.to_vec_f32();
    let mut out = Vec::with_capacity(rows.len());
    let mut softmax = Vec::with_capacity(rows.len() * vocab);
    for &(row, target) in &rows {
        let x = &values[row * vocab..(row + 1) * vocab];
        let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let sum: f64 = x.iter().map(|&v| ((v - max) as f64).exp()).sum();
        let lse = max + sum.ln() as f32;
        out.push(x[target] - lse);
        softmax.extend(x.iter().map(|&v| (v - lse).exp()));
    }
    let n = out.len();
    let value = Tensor::from_f32(out, &[n])?;
    Ok(Tensor::from_op(
        value,
        &[logits],
        TokenLogprobs {
            rows,
            softmax,
            shape: logits.shape().to_vec(),
        },
    ))
}

struct TokenLogprobs {
    rows: Vec<(usize, usize)>,
    softmax: Vec<f32>,
    shape: Vec<usize>,
}

impl anneal_tensor::Backward for TokenLogprobs {
    fn name(&self) -> &'static str {
        "token_logprobs"
    }

    fn backward(self: Box<Self>, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let g = grad.to_vec_f32();
        let vocab = *self.shape.last().unwrap_or(&0);
        let mut dx = vec![0.0f32; self.shape.iter().product()];
        for (k, &(row, target)) in self.rows.iter().enumerate() {
            let p = &self.softmax[k * vocab..(k + 1) * vocab];
            let d = &mut dx[row * vocab..(row + 1) * vocab];
            for (d, &p) in d.iter_mut().zip(p) {
                *d = -g[k] * p;
            }
            d[target] += g[k];
        }
        Ok(vec![Some(Tensor::from_f32(dx, &self.shape)?)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anneal_tensor::{DType, Rng};

    #[test]
    fn packing_targets_only_the_reply() {
        let p = pack(&[(vec![1, 2], vec![3, 4]), (vec![5, 6, 7], vec![8])], 0);
        assert_eq!((p.batch, p.seq), (2, 3));
        assert_eq!(p.ids, [1, 2, 3, 5, 6, 7]);
        assert_eq!(p.targets, [-100, 3, 4, -100, -100, 8]);
        assert_eq!(p.reply_tokens, [2, 1]);
        let q = pack(&[(vec![1], vec![2, 3, 4]), (vec![5], vec![6])], 9);
        assert_eq!(q.ids, [1, 2, 3, 5, 9, 9]);
        assert_eq!(q.targets, [2, 3, 4, 6, -100, -100]);
    }

    #[test]
    fn reply_logprobs_sum_the_reply_tokens_log_softmax_and_check_by_differences() {
        let p = pack(&[(vec![1, 2], vec![3, 4]), (vec![0, 1, 2], vec![4])], 0);
        let logits = Tensor::randn(&[6, 5], 1.0, DType::F32, &mut Rng::new(3));
        let got = reply_logprobs(&logits, &p).unwrap().to_vec_f32();
        let ls = logits.log_softmax().unwrap().to_vec_f32();
        let at = |row: usize, tok: usize| ls[row * 5 + tok];
        let want = [at(1, 3) + at(2, 4), at(5, 4)];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
        anneal_tensor::testing::assert_grads(|x| reply_logprobs(&x[0], &p), &[logits]);
    }

    #[test]
    fn token_logprobs_are_the_reply_positions_log_softmax_and_check_by_differences() {
        let p = pack(&[(vec![1, 2], vec![3, 4]), (vec![0, 1, 2], vec![4])], 0);
        let logits = Tensor::randn(&[6, 5], 1.0, DType::F32, &mut Rng::new(4));
        let got = token_logprobs(&logits, &p).unwrap().to_vec_f32();
        let ls = logits.log_softmax().unwrap().to_vec_f32();
        let want = [ls[5 + 3], ls[2 * 5 + 4], ls[5 * 5 + 4]];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
        // Summed per row they are the reply log-probabilities.
        let rows = reply_logprobs(&logits, &p).unwrap().to_vec_f32();
        assert!((rows[0] - got[0] - got[1]).abs() < 1e-5);
        anneal_tensor::testing::assert_grads(|x| token_logprobs(&x[0], &p), &[logits]);
    }

    #[test]
    fn dpo_on_a_llama_with_fresh_adapters_starts_at_ln_2_and_learns_the_preference() {
        use crate::align::losses::dpo;
        use anneal_nn::Llama;
        use anneal_tensor::optim::{AdamW, AdamWConfig};
        use anneal_tensor::Optimizer;
        let m = crate::align::tiny_policy();
        let chosen = pack(&[(vec![1, 2, 3], vec![4, 5]), (vec![6, 7], vec![8, 9])], 0);
        let rejected = pack(
            &[(vec![1, 2, 3], vec![10, 11]), (vec![6, 7], vec![12, 10])],
            0,
        );
        let logp = |m: &Llama, p: &PackedReplies, base: bool| {
            let logits = match base {
                true => anneal_tensor::no_grad(|| m.forward_base(&p.ids, p.batch, p.seq)),
                false => m.forward(&p.ids, p.batch, p.seq, None),
            };
            reply_logprobs(&logits.unwrap(), p).unwrap()
        };
        // The reference: computed once, before training.
        let (ref_c, ref_r) = (
            logp(&m, &chosen, true).to_vec_f32(),
            logp(&m, &rejected, true).to_vec_f32(),
        );
        let mut opt = AdamW::new(&m.params, AdamWConfig::default());
        let (mut losses, mut accuracy) = (Vec::new(), 0.0);
        for _ in 0..30 {
            let (pc, pr) = (logp(&m, &chosen, false), logp(&m, &rejected, false));
            let out = dpo(&pc, &pr, &ref_c, &ref_r, 0.1).unwrap();
            losses.push(out.loss.item().unwrap());
            accuracy = out.accuracy();
            out.loss.backward().unwrap();
            opt.step(&m.params, 5e-2);
            m.params.zero_grad();
        }
        // Fresh adapters (B = 0) leave the policy at the reference: ln 2, up to the rounding
        // of the adapter path against the fused one.
        assert!(
            (losses[0] - std::f32::consts::LN_2).abs() < 1e-6,
            "{losses:?}"
        );
        // The adapters move the replies' log-probabilities apart. (A random tiny model with
        // frozen embeddings and a final RMSNorm can move its logits only so far: the loss
        // levels off near 0.65 here.)
        assert!(losses[29] < losses[0] - 0.03, "{losses:?}");
        assert_eq!(accuracy, 1.0);
    }
}
