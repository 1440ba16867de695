//! A reward model: the language model's final hidden state at a reply's last token, read by a
//! scalar head (InstructGPT's reward model: the LM with its unembedding replaced by a linear
//! layer to one output), trained with the Bradley–Terry loss on preference pairs.

use anneal_nn::Llama;
use anneal_tensor::{DType, ParamId, ParamStore, ParamStoreBuilder, Result, Rng, Tensor};

/// The scalar head, in a store of its own beside the language model's (which, with LoRA, keeps
/// its base frozen and shared).
pub struct RewardHead {
    /// The head's one parameter, `score.weight` `[1, d]`.
    pub params: ParamStore,
    weight: ParamId,
}

impl RewardHead {
    /// A head for hidden states of width `d`, drawn Normal(0, 0.02) from `seed` (the
    /// initialiser Hugging Face's sequence-classification heads use).
    pub fn new(d: usize, seed: u64) -> Result<RewardHead> {
        let mut b = ParamStoreBuilder::new();
        let init = Tensor::randn(&[1, d], 0.02, DType::F32, &mut Rng::new(seed));
        let weight = b.add("score.weight", &init, false)?;
        Ok(RewardHead {
            params: b.build(DType::F32),
            weight,
        })
    }

    /// The score of each packed sequence (`[batch]`): the head applied to the final hidden state
    /// at its last real token.
    pub fn scores(&self, model: &Llama, seqs: &PackedSequences) -> Result<Tensor> {
        let h = model.normed_hidden(&seqs.ids, seqs.batch, seqs.seq, None)?;
        let d = h.shape()[2];
        let rows: Vec<usize> = seqs
            .lengths
            .iter()
            .enumerate()
            .map(|(b, &n)| b * seqs.seq + n - 1)
            .collect();
        let last = h
            .reshape(&[seqs.batch * seqs.seq, d])?
            .index_select(0, &rows)?;
        self.apply(&last)
    }

    /// The head on hidden states `[n, d]`: `[n]` scores. PPO's value head is such a head too,
    /// read at every reply position.
    pub fn apply(&self, hidden: &Tensor) -> Result<Tensor> {
        let n = hidden.shape()[0];
        let w = self.params.get(self.weight).transpose(0, 1)?;
        hidden.to_dtype(DType::F32).linear(&w, None)?.reshape(&[n])
    }
}

/// A trained reward model sharing the policy's frozen base: its adapters are swapped into the
/// policy's adapter slots while it scores and swapped back after, so policy, reference, value
/// head and reward model hold one copy of the base weights between them.
pub struct SharedReward {
    adapters: Vec<(ParamId, Tensor)>,
    head: RewardHead,
}

impl SharedReward {
    /// The reward model written in `dir` (PEFT adapters and its head's `score_file`) for
    /// `model`, whose adapters must be the same layers at the same rank.
    pub fn load(
        dir: &std::path::Path,
        score_file: &str,
        model: &Llama,
    ) -> anyhow::Result<SharedReward> {
        use anyhow::Context;
        let layout = crate::peft::PeftLayout {
            prefix: "",
            modules_to_save: &[],
            task_type: Some("CAUSAL_LM"),
            base_model: "",
        };
        let (_, tensors) = crate::peft::load(dir, &layout)
            .with_context(|| format!("reading the reward model in {}", dir.display()))?;
        let params = &model.params;
        let mut adapters = Vec::new();
        for (name, info) in params.named() {
            if !anneal_nn::layers::LoraConfig::is_adapter(&name) {
                continue;
            }
            let t = tensors.get(&name).with_context(|| {
                format!(
                    "{}: the reward model has no {name}; train it with the policy's [lora] \
                     settings",
                    dir.display()
                )
            })?;
            if t.shape() != info.shape() {
                anyhow::bail!(
                    "{}: {name} is {:?}, the policy's is {:?}; train the reward model with the \
                     policy's [lora] settings",
                    dir.display(),
                    t.shape(),
                    info.shape()
                );
            }
            adapters.push((params.id(&name)?, t.clone()));
        }
        if adapters.len() != tensors.len() {
            anyhow::bail!(
                "{}: {} adapter tensors, the policy has {}: not the policy's [lora] layout",
                dir.display(),
                tensors.len(),
                adapters.len()
            );
        }
        let path = dir.join(score_file);
        let head_tensors = anneal_tensor::io::load_safetensors(&path)?;
        let w = head_tensors
            .get("score.weight")
            .with_context(|| format!("{}: no score.weight", path.display()))?;
        let d = model.config.hidden_size;
        if w.shape() != [1, d] {
            anyhow::bail!(
                "{}: score.weight is {:?}, not [1, {d}]",
                path.display(),
                w.shape()
            );
        }
        let head = RewardHead::new(d, 0)?;
        head.params.set(head.weight, w)?;
        Ok(SharedReward { adapters, head })
    }

    /// Scores of whole sequences (prompt and reply tokens), `batch` at a time: the reward
    /// model's adapters in, the scores read, the policy's adapters back exactly as they were.
    pub fn scores(
        &self,
        model: &Llama,
        seqs: &[Vec<u32>],
        pad: u32,
        batch: usize,
    ) -> anyhow::Result<Vec<f32>> {
        let params = &model.params;
        let t = params.tensors();
        // Copies: the store's tensors are views of its buffer.
        let saved = self
            .adapters
            .iter()
            .map(|(id, _)| {
                let v = &t[id.0];
                Ok((*id, Tensor::from_f32(v.to_vec_f32(), v.shape())?))
            })
            .collect::<Result<Vec<_>>>()?;
        for (id, v) in &self.adapters {
            params.set(*id, v)?;
        }
        let mut out = Vec::with_capacity(seqs.len());
        let scored = (|| -> Result<()> {
            for chunk in seqs.chunks(batch.max(1)) {
                let packed = pack_sequences(chunk, pad);
                out.extend(
                    anneal_tensor::no_grad(|| self.head.scores(model, &packed))?.to_vec_f32(),
                );
            }
            Ok(())
        })();
        for (id, v) in &saved {
            params.set(*id, v)?;
        }
        scored?;
        Ok(out)
    }
}

/// Fails, naming both models and the first token id they read differently, unless the reward
/// model's tokenizer is the policy's: a reward model scores token ids, so one trained on
/// another vocabulary would score replies it cannot read.
pub fn check_same_tokenizer(
    policy: &anneal_data::Tokenizer,
    policy_name: &str,
    reward: &anneal_data::Tokenizer,
    reward_name: &str,
) -> anyhow::Result<()> {
    let (a, b) = (policy.vocab_size(), reward.vocab_size());
    if a != b {
        anyhow::bail!(
            "the reward model {reward_name} reads a vocabulary of {b} tokens, the policy \
             {policy_name} one of {a}: a reward model must share the policy's tokenizer"
        );
    }
    if let Some(id) = (0..a as u32).find(|&id| policy.id_to_token(id) != reward.id_to_token(id)) {
        anyhow::bail!(
            "the reward model {reward_name} reads token {id} as {:?}, the policy {policy_name} \
             as {:?}: a reward model must share the policy's tokenizer",
            reward.id_to_token(id).unwrap_or_default(),
            policy.id_to_token(id).unwrap_or_default()
        );
    }
    Ok(())
}

/// Whole sequences (prompt and reply) in one right-padded batch.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedSequences {
    /// Ids `[batch, seq]`, row-major.
    pub ids: Vec<u32>,
    /// Rows.
    pub batch: usize,
    /// Positions per row.
    pub seq: usize,
    /// Real tokens per row.
    pub lengths: Vec<usize>,
}

/// Packs non-empty sequences, `pad` filling the rows up to the longest.
pub fn pack_sequences(seqs: &[Vec<u32>], pad: u32) -> PackedSequences {
    let seq = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(seqs.len() * seq);
    for s in seqs {
        assert!(!s.is_empty(), "a sequence to score");
        ids.extend_from_slice(s);
        ids.extend(std::iter::repeat_n(pad, seq - s.len()));
    }
    PackedSequences {
        ids,
        batch: seqs.len(),
        seq,
        lengths: seqs.iter().map(Vec::len).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::align::losses::{bradley_terry, pairwise_accuracy};
    use anneal_tensor::optim::{AdamW, AdamWConfig};
    use anneal_tensor::Optimizer;

    #[test]
    fn a_reward_model_on_another_tokenizer_is_refused_by_name() {
        let chars = |text: &str| anneal_data::Tokenizer::train_chars([text].into_iter()).unwrap();
        let (a, b, c) = (chars("abc"), chars("abd"), chars("abcd"));
        assert!(check_same_tokenizer(&a, "policy", &chars("cab"), "rm").is_ok());
        let err = check_same_tokenizer(&a, "policy", &b, "rm")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("rm reads token 2") && err.contains("policy"),
            "{err}"
        );
        let err = check_same_tokenizer(&a, "policy", &c, "rm")
            .unwrap_err()
            .to_string();
        assert!(err.contains("4 tokens") && err.contains("3"), "{err}");
    }

    #[test]
    fn a_reward_model_learns_which_reply_is_preferred() {
        let m = crate::align::tiny_policy();
        let head = RewardHead::new(16, 1).unwrap();
        // Replies ending in 4 are preferred to replies ending in 10, after any prompt; the
        // rejected rows are padded, so the last real token is what the head must find.
        let prompts: [&[u32]; 4] = [&[1, 2, 3], &[6, 7], &[2, 9, 9, 1], &[5]];
        let chosen: Vec<Vec<u32>> = prompts.iter().map(|p| [*p, &[8, 4]].concat()).collect();
        let rejected: Vec<Vec<u32>> = prompts.iter().map(|p| [*p, &[10]].concat()).collect();
        let (c, r) = (pack_sequences(&chosen, 0), pack_sequences(&rejected, 0));
        assert_eq!(r.lengths, [4, 3, 5, 2]);
        let mut opt_lm = AdamW::new(&m.params, AdamWConfig::default());
        let mut opt_head = AdamW::new(&head.params, AdamWConfig::default());
        let mut losses = Vec::new();
        for _ in 0..40 {
            let (sc, sr) = (head.scores(&m, &c).unwrap(), head.scores(&m, &r).unwrap());
            let loss = bradley_terry(&sc, &sr).unwrap();
            losses.push(loss.item().unwrap());
            loss.backward().unwrap();
            opt_lm.step(&m.params, 2e-2);
            opt_head.step(&head.params, 2e-2);
            m.params.zero_grad();
            head.params.zero_grad();
        }
        let (sc, sr) = (
            head.scores(&m, &c).unwrap().to_vec_f32(),
            head.scores(&m, &r).unwrap().to_vec_f32(),
        );
        assert_eq!(pairwise_accuracy(&sc, &sr), 1.0, "{sc:?} {sr:?}");
        assert!(losses[39] < 0.5 * losses[0], "{losses:?}");
        // A padded row scores as the same sequence alone.
        let alone = head
            .scores(&m, &pack_sequences(&rejected[3..], 0))
            .unwrap()
            .to_vec_f32();
        assert!((alone[0] - sr[3]).abs() < 1e-5, "{alone:?} {sr:?}");
    }
}
