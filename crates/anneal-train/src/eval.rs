//! Evaluation: next-token negative log-likelihood over windows of a model's context, the one
//! measure behind the trainer's validation loss, `anneal eval`'s perplexity and the data
//! pipeline's perplexity signal.

use crate::model::{ModelInput, TrainModel};
use anneal_data::{batch::token_windows, Sampler, ShardSet, Stream};
use anneal_tensor::{CrossEntropyOptions, Result};

/// Summed next-token negative log-likelihood and the tokens it covers.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Nll {
    /// Σ −log p(token), in nats.
    pub sum: f64,
    /// Tokens scored.
    pub tokens: u64,
}

impl Nll {
    /// Mean NLL per token (nats): the cross-entropy.
    pub fn mean(&self) -> f64 {
        self.sum / self.tokens as f64
    }

    /// exp(mean NLL).
    pub fn perplexity(&self) -> f64 {
        self.mean().exp()
    }
}

/// Summed NLL of `batch` windows of `seq` tokens `ids` against next tokens `targets`, without
/// recording gradients.
pub fn window_nll(
    model: &dyn TrainModel,
    ids: &[u32],
    targets: &[i64],
    batch: usize,
    seq: usize,
) -> Result<Nll> {
    let input = ModelInput::Tokens { ids, batch, seq };
    let loss = anneal_tensor::no_grad(|| {
        model
            .forward(&input, None)?
            .cross_entropy(targets, CrossEntropyOptions::default())
    })?;
    let tokens = (batch * seq) as u64;
    Ok(Nll {
        sum: loss.item()? as f64 * tokens as f64,
        tokens,
    })
}

/// Mean loss over `batches` fixed batches of `batch` windows of a split: the same windows at
/// every call (the evaluation stream of `seed`), so validation losses of one run compare.
pub fn split_loss(
    model: &dyn TrainModel,
    set: &ShardSet,
    seed: u64,
    batches: usize,
    batch: usize,
    seq: usize,
) -> Result<f64> {
    let losses = batch_losses(model, set, seed, 0..batches, batch, seq)?;
    Ok(losses.iter().sum::<f64>() / batches as f64)
}

/// The mean loss of each of the fixed evaluation batches `indices` of [`split_loss`] (ranks of a
/// job each score some, and the means are put together in batch order).
pub fn batch_losses(
    model: &dyn TrainModel,
    set: &ShardSet,
    seed: u64,
    indices: impl Iterator<Item = usize>,
    batch: usize,
    seq: usize,
) -> Result<Vec<f64>> {
    batch_losses_by(set, seed, indices, batch, seq, &mut |w| {
        Ok(window_nll(model, &w.ids, &w.targets, w.batch, w.seq)?.mean())
    })
}

/// [`batch_losses`] with each batch's windows scored by `score` (a pipeline runs them through
/// its stages).
pub fn batch_losses_by(
    set: &ShardSet,
    seed: u64,
    indices: impl Iterator<Item = usize>,
    batch: usize,
    seq: usize,
    score: &mut dyn FnMut(&anneal_data::TokenWindows) -> Result<f64>,
) -> Result<Vec<f64>> {
    let sampler = Sampler { seed };
    let span = set.len() - seq as u64;
    indices
        .map(|i| {
            let offsets = sampler.offsets(Stream::Eval, &[i as u64], batch, span);
            score(&token_windows(set, &offsets, seq))
        })
        .collect()
}

/// Scores a token stream in consecutive, non-overlapping windows of the model's context,
/// `batch` windows per forward pass, holding only the tokens not yet scored.
pub struct StreamNll<'m> {
    model: &'m dyn TrainModel,
    context: usize,
    batch: usize,
    stream: Vec<u32>,
    nll: Nll,
    limit: u64,
}

impl<'m> StreamNll<'m> {
    /// A scorer over windows of `context` tokens, `batch` per pass.
    pub fn new(model: &'m dyn TrainModel, context: usize, batch: usize) -> StreamNll<'m> {
        StreamNll {
            model,
            context: context.max(1),
            batch: batch.max(1),
            stream: Vec::new(),
            nll: Nll::default(),
            limit: u64::MAX,
        }
    }

    /// Stops scoring once `max_tokens` tokens have been scored (whole passes, so it may score up
    /// to one pass more).
    pub fn with_limit(mut self, max_tokens: u64) -> StreamNll<'m> {
        self.limit = max_tokens;
        self
    }

    /// Whether the limit has been reached.
    pub fn done(&self) -> bool {
        self.nll.tokens >= self.limit
    }

    /// Appends tokens and scores every whole batch of windows they complete.
    pub fn push(&mut self, tokens: &[u32]) -> Result<()> {
        self.stream.extend_from_slice(tokens);
        self.score(self.batch)
    }

    /// Tokens scored so far.
    pub fn scored(&self) -> Nll {
        self.nll
    }

    /// Scores what is left: the remaining whole windows and, with `partial`, a last shorter
    /// window. Returns the total.
    pub fn finish(mut self, partial: bool) -> Result<Nll> {
        self.score(1)?;
        let n = self.stream.len().saturating_sub(1);
        if partial && n > 0 && !self.done() {
            let targets: Vec<i64> = self.stream[1..=n].iter().map(|&t| t as i64).collect();
            let part = window_nll(self.model, &self.stream[..n], &targets, 1, n)?;
            self.nll.sum += part.sum;
            self.nll.tokens += part.tokens;
        }
        Ok(self.nll)
    }

    /// Scores whole windows in passes of up to `batch`, while at least `min_windows` are ready.
    fn score(&mut self, min_windows: usize) -> Result<()> {
        let t = self.context;
        loop {
            let ready = self.stream.len().saturating_sub(1) / t;
            if ready == 0 || ready < min_windows || self.done() {
                return Ok(());
            }
            let take = ready.min(self.batch);
            let mut targets = Vec::with_capacity(take * t);
            for w in 0..take {
                let next = &self.stream[w * t + 1..(w + 1) * t + 1];
                targets.extend(next.iter().map(|&x| x as i64));
            }
            let part = window_nll(self.model, &self.stream[..take * t], &targets, take, t)?;
            self.nll.sum += part.sum;
            self.nll.tokens += part.tokens;
            self.stream.drain(..take * t);
        }
    }
}

/// Perplexity of a document's tokens under `model`: its windows of `context` tokens, the last
/// one shorter.
pub fn perplexity(model: &dyn TrainModel, ids: &[u32], context: usize) -> Result<f64> {
    let mut s = StreamNll::new(model, context, 1);
    s.push(ids)?;
    Ok(s.finish(true)?.perplexity())
}

#[cfg(test)]
mod tests {
    use super::*;
    use anneal_nn::{Gpt, GptConfig};

    fn model() -> Gpt {
        let config = GptConfig {
            vocab_size: 13,
            block_size: 6,
            n_layer: 1,
            n_head: 2,
            n_embd: 8,
            ..GptConfig::gpt2()
        };
        Gpt::new(config, 2).unwrap()
    }

    #[test]
    fn a_stream_scores_each_window_once_whatever_the_batching() {
        let m = model();
        let tokens: Vec<u32> = (0..33).map(|i| (i * 5 % 13) as u32).collect();
        // Five whole windows of 6 (30 positions, targets up to token 30); 2 tokens are left.
        let one_by_one: f64 = (0..5)
            .map(|w| {
                let ids = &tokens[w * 6..w * 6 + 6];
                let targets: Vec<i64> = tokens[w * 6 + 1..w * 6 + 7]
                    .iter()
                    .map(|&t| t as i64)
                    .collect();
                window_nll(&m, ids, &targets, 1, 6).unwrap().sum
            })
            .sum();
        for (batch, pieces) in [(1, 1), (2, 3), (4, 7)] {
            let mut s = StreamNll::new(&m, 6, batch);
            for chunk in tokens.chunks(tokens.len().div_ceil(pieces)) {
                s.push(chunk).unwrap();
            }
            let nll = s.finish(false).unwrap();
            assert_eq!(nll.tokens, 30);
            assert!(
                (nll.sum - one_by_one).abs() < 1e-4 * one_by_one,
                "batch {batch}"
            );
        }
        // With the shorter last window, every token but the first is scored.
        let all = perplexity(&m, &tokens, 6).unwrap();
        let mut s = StreamNll::new(&m, 6, 3);
        s.push(&tokens).unwrap();
        let nll = s.finish(true).unwrap();
        assert_eq!(nll.tokens, 32);
        assert!((nll.perplexity() - all).abs() < 1e-6 * all);
        // A limit stops scoring after the pass that reaches it.
        let mut s = StreamNll::new(&m, 6, 1).with_limit(12);
        s.push(&tokens).unwrap();
        assert!(s.done());
        assert_eq!(s.finish(true).unwrap().tokens, 12);
    }
}
