//! Training batches, one type for every objective, and the sampler that draws them.
//!
//! A [`Batch`] is token windows (causal language modelling), token sequences with loss masks and
//! document boundaries (masked LM, fine-tuning), labelled images (classification, MAE,
//! contrastive and semi-supervised objectives) or preference pairs (reward models, DPO). A
//! [`Sampler`] decides which examples a step draws from the seed, the step and the micro-batch
//! alone; a distributed strategy gives each rank a slice of that global batch, so the examples a
//! step trains on never depend on the number of ranks.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::ShardSet;

/// `batch` windows of `seq` tokens and, for each position, the token to predict.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenWindows {
    /// Input ids `[batch, seq]`, row-major.
    pub ids: Vec<u32>,
    /// Target ids `[batch, seq]` (the next token of each input position).
    pub targets: Vec<i64>,
    /// Windows.
    pub batch: usize,
    /// Tokens per window.
    pub seq: usize,
}

/// Token sequences padded to one length, with the positions that count towards the loss and
/// the document each position belongs to (packed sequences attend within their document).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenSequences {
    /// Ids `[batch, seq]`, row-major.
    pub ids: Vec<u32>,
    /// Targets `[batch, seq]`; −100 where no loss is taken.
    pub targets: Vec<i64>,
    /// Document index of each position `[batch, seq]` (0, 1, … within each row).
    pub documents: Vec<u32>,
    /// Real (unpadded) length of each row.
    pub lengths: Vec<usize>,
    /// Rows.
    pub batch: usize,
    /// Positions per row.
    pub seq: usize,
}

/// Examples of one or more images each (augmented views of one image; FixMatch's labelled image
/// with its unlabelled companions), with a label per example; −1 marks an unlabelled example.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelledImages {
    /// Pixels `[batch, views, channels, height, width]`, row-major, normalised.
    pub pixels: Vec<f32>,
    /// `[batch, channels, height, width]` (each view's shape, per example).
    pub shape: [usize; 4],
    /// Images per example, ≥ 1.
    pub views: usize,
    /// Class of each example, or −1.
    pub labels: Vec<i64>,
}

impl LabelledImages {
    /// All the batch's images as one `[batch·views, channels, height, width]` shape.
    pub fn image_shape(&self) -> [usize; 4] {
        let [b, c, h, w] = self.shape;
        [b * self.views, c, h, w]
    }
}

/// Token sequences padded to one length, each with one class label (sequence classification:
/// a topic, a sentiment).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LabelledSequences {
    /// Ids `[batch, seq]`, row-major, padded after each row's real tokens.
    pub ids: Vec<u32>,
    /// Real (unpadded) length of each row.
    pub lengths: Vec<usize>,
    /// Class of each row.
    pub labels: Vec<i64>,
    /// Rows.
    pub batch: usize,
    /// Positions per row.
    pub seq: usize,
}

impl LabelledSequences {
    /// `sequences` right-padded with `pad` to the longest, with their labels.
    pub fn padded(sequences: &[&[u32]], labels: &[i64], pad: u32) -> LabelledSequences {
        let seq = sequences.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(sequences.len() * seq);
        for s in sequences {
            ids.extend(
                s.iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad, seq - s.len())),
            );
        }
        LabelledSequences {
            ids,
            lengths: sequences.iter().map(|s| s.len()).collect(),
            labels: labels.to_vec(),
            batch: sequences.len(),
            seq,
        }
    }
}

/// Pairs of responses to the same prompts, the first preferred.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PreferencePairs {
    /// Prompt plus preferred response; loss targets only on the response.
    pub chosen: TokenSequences,
    /// Prompt plus rejected response.
    pub rejected: TokenSequences,
}

/// One micro-batch for any objective.
#[derive(Clone, Debug, PartialEq)]
pub enum Batch {
    /// Windows of a token stream.
    Tokens(TokenWindows),
    /// Masked, document-aware token sequences.
    Sequences(TokenSequences),
    /// Labelled (or unlabelled) images.
    Images(LabelledImages),
    /// Preference pairs.
    Preferences(PreferencePairs),
    /// Labelled token sequences.
    Classes(LabelledSequences),
    /// Sentence pairs with masked tokens and next-sentence labels (BERT pretraining).
    MaskedPairs(crate::mlm::MaskedPairs),
}

impl Batch {
    /// Examples in the batch.
    pub fn len(&self) -> usize {
        match self {
            Batch::Tokens(t) => t.batch,
            Batch::Sequences(s) => s.batch,
            Batch::Images(i) => i.shape[0],
            Batch::Preferences(p) => p.chosen.batch,
            Batch::Classes(c) => c.batch,
            Batch::MaskedPairs(p) => p.batch,
        }
    }

    /// Whether the batch holds no example.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens the batch feeds the model (0 for images).
    pub fn tokens(&self) -> usize {
        match self {
            Batch::Tokens(t) => t.batch * t.seq,
            Batch::Sequences(s) => s.batch * s.seq,
            Batch::Images(_) => 0,
            Batch::Preferences(p) => 2 * p.chosen.batch * p.chosen.seq,
            // One loss per sequence, whatever its length: micro-batches weigh by their rows.
            Batch::Classes(_) => 0,
            Batch::MaskedPairs(p) => p.batch * p.seq,
        }
    }

    /// Examples `rows` of the batch, as a batch of its own (a data-parallel rank's share of a
    /// global batch). `rows` must lie within the batch.
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Batch {
        assert!(
            rows.end <= self.len(),
            "rows {rows:?} of a batch of {}",
            self.len()
        );
        let n = rows.len();
        match self {
            Batch::Tokens(t) => {
                let r = rows.start * t.seq..rows.end * t.seq;
                Batch::Tokens(TokenWindows {
                    ids: t.ids[r.clone()].to_vec(),
                    targets: t.targets[r].to_vec(),
                    batch: n,
                    seq: t.seq,
                })
            }
            Batch::Sequences(s) => Batch::Sequences(sequence_rows(s, rows)),
            Batch::Images(i) => {
                let per = i.views * i.shape[1] * i.shape[2] * i.shape[3];
                Batch::Images(LabelledImages {
                    pixels: i.pixels[rows.start * per..rows.end * per].to_vec(),
                    shape: [n, i.shape[1], i.shape[2], i.shape[3]],
                    views: i.views,
                    labels: i.labels[rows].to_vec(),
                })
            }
            Batch::Preferences(p) => Batch::Preferences(PreferencePairs {
                chosen: sequence_rows(&p.chosen, rows.clone()),
                rejected: sequence_rows(&p.rejected, rows),
            }),
            Batch::Classes(c) => Batch::Classes(LabelledSequences {
                ids: c.ids[rows.start * c.seq..rows.end * c.seq].to_vec(),
                lengths: c.lengths[rows.clone()].to_vec(),
                labels: c.labels[rows].to_vec(),
                batch: n,
                seq: c.seq,
            }),
            Batch::MaskedPairs(p) => Batch::MaskedPairs(p.rows(rows)),
        }
    }

    /// The variant's name, for errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Batch::Tokens(_) => "token windows",
            Batch::Sequences(_) => "token sequences",
            Batch::Images(_) => "labelled images",
            Batch::Preferences(_) => "preference pairs",
            Batch::Classes(_) => "labelled sequences",
            Batch::MaskedPairs(_) => "masked sentence pairs",
        }
    }
}

/// Rows `rows` of padded sequences.
fn sequence_rows(s: &TokenSequences, rows: std::ops::Range<usize>) -> TokenSequences {
    let r = rows.start * s.seq..rows.end * s.seq;
    TokenSequences {
        ids: s.ids[r.clone()].to_vec(),
        targets: s.targets[r.clone()].to_vec(),
        documents: s.documents[r].to_vec(),
        lengths: s.lengths[rows.clone()].to_vec(),
        batch: rows.len(),
        seq: s.seq,
    }
}

/// Mixes a seed and counters into one generator seed (xxHash3 of their bytes).
pub fn derive_seed(seed: u64, parts: &[u64]) -> u64 {
    let mut bytes = Vec::with_capacity(8 * (parts.len() + 1));
    bytes.extend_from_slice(&seed.to_le_bytes());
    for p in parts {
        bytes.extend_from_slice(&p.to_le_bytes());
    }
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

/// What a seed stream is for, so that sampling, dropout and evaluation draw independent streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Stream {
    /// Which examples a training micro-batch holds.
    Sample = 1,
    /// Dropout masks.
    Dropout = 2,
    /// The fixed evaluation batches.
    Eval = 3,
    /// Image augmentations (5: 4 seeds the epoch orders).
    Augment = 5,
    /// The order unlabelled examples are visited in, beside the labelled ones.
    Unlabelled = 6,
}

/// Decides which examples each step draws, from the seed, the step and the micro-batch alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sampler {
    /// The run's seed.
    pub seed: u64,
}

impl Sampler {
    /// The generator seed of `stream` at `at` (a training micro-batch: its step and index;
    /// an evaluation batch: its index).
    pub fn seed_of(&self, stream: Stream, at: &[u64]) -> u64 {
        let mut parts = Vec::with_capacity(at.len() + 1);
        parts.push(stream as u64);
        parts.extend_from_slice(at);
        derive_seed(self.seed, &parts)
    }

    /// `count` offsets drawn uniformly from `0..span` for `stream` at `at`: the start of each
    /// window of a global micro-batch, in order. A rank of a data-parallel group trains on its
    /// slice of them.
    pub fn offsets(&self, stream: Stream, at: &[u64], count: usize, span: u64) -> Vec<u64> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed_of(stream, at));
        (0..count).map(|_| rng.next_u64() % span.max(1)).collect()
    }

    /// A permutation of `0..len` for `epoch` (Fisher–Yates): finite sets (images, pairs) are
    /// visited once per epoch in this order.
    pub fn epoch_order(&self, epoch: u64, len: usize) -> Vec<usize> {
        let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(self.seed, &[4, epoch]));
        let mut order: Vec<usize> = (0..len).collect();
        for i in (1..len).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        order
    }
}

/// `n` example indices balanced over `classes` (`n / classes` of each, the first
/// `n % classes` classes one more), each class's drawn without replacement in the order
/// `seed` gives it; class by class. `labels` holds each example's class. Fails when `n` is 0
/// or a class has too few examples.
pub fn balanced_picks(
    labels: impl Iterator<Item = usize>,
    classes: usize,
    n: usize,
    seed: u64,
) -> crate::Result<Vec<usize>> {
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
    let mut total = 0;
    for (i, l) in labels.enumerate() {
        by_class[l].push(i);
        total += 1;
    }
    let invalid = |allowed: String| crate::Error::Invalid {
        key: "labels".into(),
        value: n.to_string(),
        allowed,
    };
    if n == 0 || classes == 0 {
        return Err(invalid(format!("1 to {total} labelled examples")));
    }
    let sampler = Sampler { seed };
    let mut picked = Vec::with_capacity(n);
    for (c, members) in by_class.iter().enumerate() {
        let want = n / classes + usize::from(c < n % classes);
        if want > members.len() {
            return Err(invalid(format!(
                "at most {} per class: class {c} has {} examples",
                members.len(),
                members.len()
            )));
        }
        let order = sampler.epoch_order(c as u64, members.len());
        picked.extend(order[..want].iter().map(|&k| members[k]));
    }
    Ok(picked)
}

/// Labelled token sequences visited once per epoch in the sampler's order: each step's batch
/// takes the next `batch` examples of that order (an epoch's last batch runs on into the next
/// epoch's order).
pub struct LabelledSource {
    /// Each example's token ids and class.
    pub examples: Vec<(Vec<u32>, i64)>,
    /// The padding id.
    pub pad: u32,
}

/// The examples (of `n`) that micro-batch `micro` of step `step` takes, `batch` of them, when
/// examples are visited once per epoch in the sampler's order: step s holds positions
/// s·batch.. of the epochs' orders (the trainer draws each step whole, as micro-batch 0; a later
/// micro-batch starts `micro` batches on), an epoch's last batch running on into the next.
pub fn epoch_picks(sampler: &Sampler, step: u64, micro: u64, batch: usize, n: usize) -> Vec<usize> {
    let n = n.max(1);
    let first = (step as usize + micro as usize) * batch;
    let mut order: Option<(usize, Vec<usize>)> = None;
    (first..first + batch)
        .map(|i| {
            let epoch = i / n;
            if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                order = Some((epoch, sampler.epoch_order(epoch as u64, n)));
            }
            order.as_ref().expect("set above").1[i % n]
        })
        .collect()
}

impl BatchSource for LabelledSource {
    fn draw(&self, sampler: &Sampler, step: u64, micro: u64, batch: usize) -> Batch {
        let picked = epoch_picks(sampler, step, micro, batch, self.examples.len());
        let seqs: Vec<&[u32]> = picked
            .iter()
            .map(|&i| self.examples[i].0.as_slice())
            .collect();
        let labels: Vec<i64> = picked.iter().map(|&i| self.examples[i].1).collect();
        Batch::Classes(LabelledSequences::padded(&seqs, &labels, self.pad))
    }
}

/// Token sequences of which only some positions are predicted (a chat model's assistant
/// turns), visited once per epoch in the sampler's order ([`epoch_picks`]): each batch is right-
/// padded to its longest sequence, with next-token targets at the predicted positions and −100
/// elsewhere (the prompt, the padding).
pub struct MaskedSource {
    /// Each example's tokens and, per token, whether it is predicted.
    pub examples: Vec<(Vec<u32>, Vec<bool>)>,
    /// The padding id.
    pub pad: u32,
}

impl MaskedSource {
    /// The examples `picked` as one batch of inputs and targets.
    pub fn batch_of(&self, picked: &[usize]) -> TokenWindows {
        let seq = picked
            .iter()
            .map(|&i| self.examples[i].0.len().saturating_sub(1))
            .max()
            .unwrap_or(0)
            .max(1);
        let mut out = TokenWindows {
            ids: Vec::with_capacity(picked.len() * seq),
            targets: Vec::with_capacity(picked.len() * seq),
            batch: picked.len(),
            seq,
        };
        for &i in picked {
            let (tokens, predicted) = &self.examples[i];
            let n = tokens.len().saturating_sub(1);
            out.ids.extend_from_slice(&tokens[..n]);
            out.ids.extend(std::iter::repeat_n(self.pad, seq - n));
            out.targets
                .extend((1..=n).map(|t| if predicted[t] { tokens[t] as i64 } else { -100 }));
            out.targets.extend(std::iter::repeat_n(-100, seq - n));
        }
        out
    }
}

impl BatchSource for MaskedSource {
    fn draw(&self, sampler: &Sampler, step: u64, micro: u64, batch: usize) -> Batch {
        let picked = epoch_picks(sampler, step, micro, batch, self.examples.len());
        Batch::Tokens(self.batch_of(&picked))
    }
}

/// Where a trainer's micro-batches come from.
pub trait BatchSource: Send + Sync {
    /// Micro-batch `micro` of training step `step`, `batch` examples, as `sampler` draws it.
    fn draw(&self, sampler: &Sampler, step: u64, micro: u64, batch: usize) -> Batch;
}

/// Random windows of `seq` tokens (and their next tokens) of a tokenized split.
pub struct WindowSource {
    /// The split.
    pub set: ShardSet,
    /// Tokens per window.
    pub seq: usize,
}

impl BatchSource for WindowSource {
    fn draw(&self, sampler: &Sampler, step: u64, micro: u64, batch: usize) -> Batch {
        let span = self.set.len().saturating_sub(self.seq as u64);
        let offsets = sampler.offsets(Stream::Sample, &[step, micro], batch, span);
        Batch::Tokens(token_windows(&self.set, &offsets, self.seq))
    }
}

/// Windows of `seq + 1` tokens of a tokenized split, cut into inputs and next-token targets.
pub fn token_windows(set: &ShardSet, offsets: &[u64], seq: usize) -> TokenWindows {
    let mut window = vec![0u32; seq + 1];
    let mut out = TokenWindows {
        ids: Vec::with_capacity(offsets.len() * seq),
        targets: Vec::with_capacity(offsets.len() * seq),
        batch: offsets.len(),
        seq,
    };
    for &offset in offsets {
        set.read(offset, &mut window);
        out.ids.extend_from_slice(&window[..seq]);
        out.targets.extend(window[1..].iter().map(|&t| t as i64));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelled_sequences_are_visited_once_per_epoch_and_cut_by_rows() {
        let source = LabelledSource {
            examples: (0..7u32)
                .map(|i| (vec![1; 1 + i as usize], i as i64))
                .collect(),
            pad: 0,
        };
        let sampler = Sampler { seed: 5 };
        // Steps of 3 over 7 examples: the first 7 drawn are each example once.
        let mut seen = Vec::new();
        for step in 0..3 {
            let Batch::Classes(c) = source.draw(&sampler, step, 0, 3) else {
                unreachable!()
            };
            assert_eq!(
                c.seq,
                *c.lengths.iter().max().unwrap(),
                "padded to the longest"
            );
            for (r, &label) in c.labels.iter().enumerate() {
                // Each row holds its example's ids, then padding.
                assert_eq!(c.lengths[r], 1 + label as usize);
                assert!(c.ids[r * c.seq..][..c.seq]
                    .iter()
                    .enumerate()
                    .all(|(i, &id)| id == (i < c.lengths[r]) as u32));
            }
            seen.extend(c.labels);
        }
        let mut epoch: Vec<i64> = seen[..7].to_vec();
        epoch.sort();
        assert_eq!(epoch, (0..7).collect::<Vec<_>>());
        let Batch::Classes(c) = source.draw(&sampler, 0, 0, 3) else {
            unreachable!()
        };
        let Batch::Classes(tail) = Batch::Classes(c.clone()).rows(1..3) else {
            unreachable!()
        };
        assert_eq!(tail.labels, c.labels[1..]);
        assert_eq!(tail.ids, c.ids[c.seq..]);
        assert_eq!(Batch::Classes(c).tokens(), 0, "weighed by rows, not tokens");
    }

    #[test]
    fn rows_of_every_kind_of_batch() {
        let seqs = TokenSequences {
            ids: (0..6).collect(),
            targets: (10..16).collect(),
            documents: vec![0, 0, 0, 1, 1, 1],
            lengths: vec![3, 2],
            batch: 2,
            seq: 3,
        };
        let Batch::Sequences(second) = Batch::Sequences(seqs.clone()).rows(1..2) else {
            unreachable!()
        };
        assert_eq!(
            (
                second.ids,
                second.targets,
                second.documents,
                second.lengths,
                second.batch
            ),
            (vec![3, 4, 5], vec![13, 14, 15], vec![1, 1, 1], vec![2], 1)
        );
        let images = Batch::Images(LabelledImages {
            pixels: (0..12).map(|v| v as f32).collect(),
            shape: [3, 1, 2, 2],
            views: 1,
            labels: vec![7, -1, 2],
        });
        let Batch::Images(tail) = images.rows(1..3) else {
            unreachable!()
        };
        assert_eq!(tail.shape, [2, 1, 2, 2]);
        assert_eq!(tail.pixels[0], 4.0);
        assert_eq!(tail.labels, [-1, 2]);
        let pairs = Batch::Preferences(PreferencePairs {
            chosen: seqs.clone(),
            rejected: seqs,
        });
        assert_eq!(pairs.rows(0..1).len(), 1);
        assert_eq!(pairs.rows(0..2), pairs, "all rows are the batch itself");
    }

    #[test]
    fn draws_depend_on_seed_step_and_micro_batch_only() {
        let s = Sampler { seed: 1337 };
        let a = s.offsets(Stream::Sample, &[5, 0], 12, 1000);
        assert_eq!(a, s.offsets(Stream::Sample, &[5, 0], 12, 1000));
        assert_ne!(a, s.offsets(Stream::Sample, &[5, 1], 12, 1000));
        assert_ne!(a, s.offsets(Stream::Sample, &[6, 0], 12, 1000));
        assert_ne!(a, s.offsets(Stream::Eval, &[5, 0], 12, 1000));
        assert!(a.iter().all(|&o| o < 1000));
        // A longer draw starts with the shorter one: two ranks taking halves of a global
        // micro-batch see exactly the windows one rank would.
        assert_eq!(&s.offsets(Stream::Sample, &[5, 0], 24, 1000)[..12], &a[..]);
    }

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let s = Sampler { seed: 3 };
        let mut o = s.epoch_order(0, 50);
        assert_ne!(o, (0..50).collect::<Vec<_>>());
        assert_eq!(o, s.epoch_order(0, 50));
        assert_ne!(o, s.epoch_order(1, 50));
        o.sort();
        assert_eq!(o, (0..50).collect::<Vec<_>>());
    }
}
