//! Output heads: a language-model head (tied to the token embedding or its own matrix), a
//! classification head and a scalar value/reward head.

use super::{Builder, Linear, LinearOptions, WeightLayout, Weights};
use anneal_tensor::{Error, ParamId, Result, Tensor};

/// Logits over the vocabulary from hidden states.
#[derive(Clone, Debug)]
pub enum LmHead {
    /// `x · Eᵀ` with the token embedding E (GPT-2; Press & Wolf 2017).
    Tied {
        /// The embedding table.
        table: ParamId,
        /// Whether the table is vocabulary-parallel (the logits are then this rank's slice).
        split: bool,
    },
    /// Its own `[vocab, d]` matrix, `lm_head.weight`.
    Untied(Linear),
}

impl LmHead {
    /// A head tied to the embedding table `embedding` (vocabulary-parallel when it is).
    pub fn tied(embedding: &super::Embedding) -> LmHead {
        LmHead::Tied {
            table: embedding.weight(),
            split: embedding.is_split(),
        }
    }

    /// A head with its own `[vocab, d]` weight `prefix.weight` (no bias, decayed); under
    /// tensor parallelism its rows are split like a vocabulary-parallel embedding's (a
    /// column-parallel layer whose logits are this rank's slice of the vocabulary).
    pub fn untied(b: &mut Builder, prefix: &str, d: usize, vocab: usize, std: f32) -> Result<Self> {
        let split = if b.parallel().tensor_parallel().1 > 1 {
            super::LinearSplit::Column
        } else {
            super::LinearSplit::None
        };
        let opts = LinearOptions {
            bias: false,
            std,
            layout: WeightLayout::OutIn,
            split,
        };
        Ok(LmHead::Untied(Linear::new(b, prefix, d, vocab, opts)?))
    }

    /// Parameter ids the head owns (none when tied).
    pub fn params(&self) -> Vec<ParamId> {
        match self {
            LmHead::Tied { .. } => Vec::new(),
            LmHead::Untied(l) => l.params(),
        }
    }

    /// Logits `[rows, vocab]` of hidden states `x` `[rows, d]`.
    pub fn forward(&self, w: &Weights, x: &Tensor) -> Result<Tensor> {
        match self {
            LmHead::Tied { table, split } => match w.packed(*table, x.shape()[0]) {
                Some(q) => q.matmul_t(x),
                // A vocabulary-parallel table gives this rank's slice of the logits, and the
                // input's gradient is the sum over the ranks' slices.
                None if *split => w
                    .parallel()
                    .enter_parallel(x)?
                    .matmul(&w.get(*table)?.transpose(0, 1)?),
                None => x.matmul(&w.get(*table)?.transpose(0, 1)?),
            },
            LmHead::Untied(l) => l.forward(w, x),
        }
    }
}

/// Class logits from a pooled representation: one linear layer (BERT's sequence classifier).
#[derive(Clone, Debug)]
pub struct ClassificationHead {
    proj: Linear,
}

impl ClassificationHead {
    /// Declares `prefix.weight` `[classes, d]` and `prefix.bias`.
    pub fn new(b: &mut Builder, prefix: &str, d: usize, classes: usize) -> Result<Self> {
        let opts = LinearOptions {
            layout: WeightLayout::OutIn,
            ..LinearOptions::default()
        };
        Ok(ClassificationHead {
            proj: Linear::new(b, prefix, d, classes, opts)?,
        })
    }

    /// Every parameter id of the head.
    pub fn params(&self) -> Vec<ParamId> {
        self.proj.params()
    }

    /// Logits `[B, classes]` of pooled states `[B, d]`.
    pub fn forward(&self, w: &Weights, pooled: &Tensor) -> Result<Tensor> {
        self.proj.forward(w, pooled)
    }
}

/// One number per sequence, read at its last token: a value head (PPO) or a reward model's
/// score (InstructGPT, Ouyang et al. 2022).
#[derive(Clone, Debug)]
pub struct ScalarHead {
    proj: Linear,
}

impl ScalarHead {
    /// Declares `prefix.weight` `[1, d]` (no bias).
    pub fn new(b: &mut Builder, prefix: &str, d: usize) -> Result<Self> {
        let opts = LinearOptions {
            bias: false,
            layout: WeightLayout::OutIn,
            ..LinearOptions::default()
        };
        Ok(ScalarHead {
            proj: Linear::new(b, prefix, d, 1, opts)?,
        })
    }

    /// Every parameter id of the head.
    pub fn params(&self) -> Vec<ParamId> {
        self.proj.params()
    }

    /// Scores `[B]` of hidden states `[B, T, d]`, each read at position `lengths[b] − 1`.
    pub fn forward(&self, w: &Weights, hidden: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let (b, t, d) = (hidden.shape()[0], hidden.shape()[1], hidden.shape()[2]);
        if lengths.len() != b || lengths.iter().any(|&l| l == 0 || l > t) {
            return Err(Error::Invalid {
                op: "ScalarHead::forward",
                reason: format!("lengths {lengths:?} must be {b} values in 1..={t}"),
            });
        }
        let rows: Vec<usize> = lengths
            .iter()
            .enumerate()
            .map(|(i, &l)| i * t + l - 1)
            .collect();
        let last = hidden.reshape(&[b * t, d])?.index_select(0, &rows)?;
        self.proj.forward(w, &last)?.reshape(&[b])
    }
}
