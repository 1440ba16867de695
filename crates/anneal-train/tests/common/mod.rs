//! Helpers shared by the parallel-training tests: a token source and a tiny GPT's run config.
#![allow(dead_code)]

use anneal_data::{Batch, BatchSource, Sampler, Stream, TokenWindows};
use anneal_train::checkpoint::TrainerState;
use anneal_train::trainer::{pretraining_on, Trainer};
use anneal_train::RunConfig;

/// Vocabulary of the tiny GPT's token stream.
pub const VOCAB: usize = 11;

/// Context length of the tiny GPT.
pub const SEQ: usize = 8;

/// Windows of `SEQ` tokens of a fixed pseudo-random stream over `vocab` tokens, at offsets drawn
/// from `0..span`.
pub struct TokenStream {
    pub vocab: usize,
    pub span: u64,
}

impl BatchSource for TokenStream {
    fn draw(&self, sampler: &Sampler, step: u64, micro: u64, batch: usize) -> Batch {
        let offsets = sampler.offsets(Stream::Sample, &[step, micro], batch, self.span);
        let vocab = self.vocab as u64;
        let token = |i: u64| ((i * 7 + i / 5 * 3) % vocab) as u32;
        let ids = offsets
            .iter()
            .flat_map(|&o| (o..o + SEQ as u64).map(token))
            .collect();
        let targets = offsets
            .iter()
            .flat_map(|&o| (o + 1..o + SEQ as u64 + 1).map(|i| token(i) as i64))
            .collect();
        Batch::Tokens(TokenWindows {
            ids,
            targets,
            batch,
            seq: SEQ,
        })
    }
}

/// A 2-layer, 16-wide GPT's run config: `base` settings, then `extra` (`section.key=value`).
pub fn tiny_config(base: &[&str], extra: &[&str]) -> RunConfig {
    let sets: Vec<String> = [
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=16",
        "model.block_size=8",
    ]
    .iter()
    .chain(base)
    .chain(extra)
    .map(|s| s.to_string())
    .collect();
    RunConfig::load(None, &sets).expect("a valid config")
}

/// The tiny GPT of `config` pretraining on a [`TokenStream`] over [`VOCAB`] tokens, as one rank of
/// `world` (one device when `None`).
pub fn tiny_trainer(
    config: &RunConfig,
    world: Option<Box<dyn anneal_dist::Communicator>>,
) -> Trainer {
    let source = TokenStream {
        vocab: VOCAB,
        span: 500,
    };
    pretraining_on(config, VOCAB, Box::new(source), world).unwrap()
}

/// The state a checkpoint of the tiny GPT's run under `config` describes it with.
pub fn tiny_state(config: &RunConfig) -> TrainerState {
    TrainerState {
        format: 1,
        step: 0,
        seed: config.train.seed,
        data: Default::default(),
        tokens_seen: 0,
        config: config.to_toml(),
        objective: String::new(),
        optimizer_layout: Vec::new(),
        tokenizer: anneal_data::Tokenizer::train_chars(["abcdefghij "].iter())
            .unwrap()
            .to_json()
            .unwrap(),
        vocab_size: VOCAB,
        files: Default::default(),
        loss_scale: Vec::new(),
    }
}
