//! BERT's pretraining data (Devlin et al. 2019, §3.1 and appendix A.1): sentence pairs for
//! next-sentence prediction, corrupted for masked language modelling.
//!
//! * [`mask_tokens`]: 15% of the ordinary tokens are chosen for prediction; a chosen token is
//!   replaced by `[MASK]` 80% of the time, by a random ordinary token 10% of the time, and left
//!   as it is 10% of the time. The targets are the original ids at the chosen places, −100
//!   elsewhere.
//! * [`PairSource`]: each example is `[CLS] A [SEP] B [SEP]`, A a run of consecutive sentences
//!   of a document and B, half of the time, the sentences that follow it (label 0, "is next"),
//!   otherwise sentences of another document (label 1), cut to fit `seq` tokens, with token
//!   types 0 for A and 1 for B. Each row draws from a seed of the run's seed, the step and its
//!   row, so a run sees the same examples however it is cut or resumed.

use crate::batch::{Batch, BatchSource, Sampler, Stream};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How tokens are chosen and replaced.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Masking {
    /// Share of ordinary tokens chosen for prediction (0.15).
    pub rate: f32,
    /// The `[MASK]` id.
    pub mask_id: u32,
    /// Ids below this are special (`[PAD]`, `[UNK]`, `[CLS]`, `[SEP]`, `[MASK]`): never chosen,
    /// never drawn as random replacements.
    pub first_ordinary: u32,
    /// Vocabulary size: random replacements are drawn from `first_ordinary..vocab_size`.
    pub vocab_size: u32,
}

fn unit(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32
}

/// Corrupts `ids` in place as BERT's masked LM does; returns the targets (the original id at
/// each chosen place, −100 elsewhere). Special ids are never chosen.
pub fn mask_tokens(ids: &mut [u32], m: &Masking, rng: &mut ChaCha8Rng) -> Vec<i64> {
    let ordinary = (m.vocab_size - m.first_ordinary).max(1);
    ids.iter_mut()
        .map(|id| {
            if *id < m.first_ordinary || unit(rng) >= m.rate {
                return -100;
            }
            let original = *id;
            let roll = unit(rng);
            if roll < 0.8 {
                *id = m.mask_id;
            } else if roll < 0.9 {
                *id = m.first_ordinary + (rng.next_u32() % ordinary);
            }
            original as i64
        })
        .collect()
}

/// Sentence pairs with masked tokens, their token types and next-sentence labels.
#[derive(Clone, Debug, PartialEq)]
pub struct MaskedPairs {
    /// Ids `[batch, seq]`, row-major, padded after each row's real tokens.
    pub ids: Vec<u32>,
    /// Segment of each position (0: `[CLS]` A `[SEP]`; 1: B `[SEP]`; 0 in the padding).
    pub token_types: Vec<u32>,
    /// Masked-LM targets `[batch, seq]`; −100 where no prediction is made.
    pub targets: Vec<i64>,
    /// Real length of each row.
    pub lengths: Vec<usize>,
    /// 0 when B follows A in its document, 1 when B comes from another document.
    pub next: Vec<i64>,
    /// Rows.
    pub batch: usize,
    /// Positions per row.
    pub seq: usize,
}

impl MaskedPairs {
    /// Rows `rows` as a batch of their own.
    pub fn rows(&self, rows: std::ops::Range<usize>) -> MaskedPairs {
        let r = rows.start * self.seq..rows.end * self.seq;
        MaskedPairs {
            ids: self.ids[r.clone()].to_vec(),
            token_types: self.token_types[r.clone()].to_vec(),
            targets: self.targets[r].to_vec(),
            lengths: self.lengths[rows.clone()].to_vec(),
            next: self.next[rows.clone()].to_vec(),
            batch: rows.len(),
            seq: self.seq,
        }
    }
}

/// Documents cut into sentences of token ids, drawn as BERT's pretraining pairs.
pub struct PairSource {
    /// Each document's sentences (ordinary ids only). Documents need two or more sentences to
    /// give a true next pair; others serve as random B segments.
    pub documents: Vec<Vec<Vec<u32>>>,
    /// Positions per example, `[CLS]` and both `[SEP]` included.
    pub seq: usize,
    /// How tokens are masked.
    pub masking: Masking,
    /// `[CLS]`, `[SEP]` and `[PAD]` ids.
    pub specials: (u32, u32, u32),
}

impl PairSource {
    /// Sentences `from..` of document `doc`, concatenated up to `budget` tokens (at least the
    /// first sentence's first tokens).
    fn take(&self, doc: usize, from: usize, budget: usize) -> Vec<u32> {
        let mut out = Vec::new();
        for sentence in &self.documents[doc][from..] {
            if !out.is_empty() && out.len() + sentence.len() > budget {
                break;
            }
            out.extend_from_slice(sentence);
        }
        out.truncate(budget);
        out
    }

    /// One example from generator `rng`: (tokens with types, next label).
    fn example(&self, rng: &mut ChaCha8Rng) -> (Vec<u32>, Vec<u32>, i64) {
        let n = self.documents.len();
        let budget = self.seq.saturating_sub(3).max(2);
        // A document with a next sentence, when there is one.
        let with_next: Vec<usize> = (0..n).filter(|&d| self.documents[d].len() >= 2).collect();
        let doc = if with_next.is_empty() {
            rng.next_u64() as usize % n
        } else {
            with_next[rng.next_u64() as usize % with_next.len()]
        };
        let sentences = self.documents[doc].len();
        let is_next = sentences >= 2 && (n < 2 || unit(rng) < 0.5);
        let split = if sentences >= 2 {
            1 + rng.next_u64() as usize % (sentences - 1)
        } else {
            sentences
        };
        let start = rng.next_u64() as usize % split;
        let a_budget = (budget / 2).max(1);
        // A: sentences start.. up to the split point, as many as fit half the budget.
        let mut a = Vec::new();
        let mut a_end = start;
        for sentence in &self.documents[doc][start..split] {
            if !a.is_empty() && a.len() + sentence.len() > a_budget {
                break;
            }
            a.extend_from_slice(sentence);
            a_end += 1;
        }
        a.truncate(a_budget);
        let b_budget = budget - a.len();
        let b = if is_next {
            self.take(doc, a_end, b_budget)
        } else {
            let mut other = rng.next_u64() as usize % (n - 1).max(1);
            if other >= doc && n > 1 {
                other += 1;
            }
            let other = other.min(n - 1);
            let from = rng.next_u64() as usize % self.documents[other].len().max(1);
            self.take(other, from, b_budget)
        };
        let (cls, sep, _) = self.specials;
        let mut ids = vec![cls];
        ids.extend(&a);
        ids.push(sep);
        let a_len = ids.len();
        ids.extend(&b);
        ids.push(sep);
        let mut types = vec![0u32; a_len];
        types.resize(ids.len(), 1);
        (ids, types, i64::from(!is_next))
    }
}

impl BatchSource for PairSource {
    fn draw(&self, sampler: &Sampler, step: u64, micro: u64, batch: usize) -> Batch {
        let seq = self.seq;
        let pad = self.specials.2;
        let mut out = MaskedPairs {
            ids: Vec::with_capacity(batch * seq),
            token_types: Vec::with_capacity(batch * seq),
            targets: Vec::with_capacity(batch * seq),
            lengths: Vec::with_capacity(batch),
            next: Vec::with_capacity(batch),
            batch,
            seq,
        };
        for row in 0..batch {
            let global = micro as usize * batch + row;
            let seed = sampler.seed_of(Stream::Sample, &[step, global as u64]);
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let (mut ids, mut types, next) = self.example(&mut rng);
            ids.truncate(seq);
            types.truncate(seq);
            let mut targets = mask_tokens(&mut ids, &self.masking, &mut rng);
            let len = ids.len();
            ids.resize(seq, pad);
            types.resize(seq, 0);
            targets.resize(seq, -100);
            out.ids.extend(ids);
            out.token_types.extend(types);
            out.targets.extend(targets);
            out.lengths.push(len);
            out.next.push(next);
        }
        Batch::MaskedPairs(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: Masking = Masking {
        rate: 0.15,
        mask_id: 4,
        first_ordinary: 5,
        vocab_size: 1000,
    };

    #[test]
    fn masking_chooses_15_percent_then_80_10_10_over_many_draws() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (mut chosen, mut masked, mut random, mut kept, mut total) = (0, 0, 0, 0, 0);
        for _ in 0..2000 {
            // Specials at both ends: never chosen.
            let original: Vec<u32> = [2]
                .into_iter()
                .chain((0..126).map(|i| 5 + (i * 37) % 995))
                .chain([3])
                .collect();
            let mut ids = original.clone();
            let targets = mask_tokens(&mut ids, &M, &mut rng);
            assert_eq!((targets[0], targets[127]), (-100, -100));
            assert_eq!((ids[0], ids[127]), (2, 3));
            for i in 1..127 {
                total += 1;
                if targets[i] == -100 {
                    assert_eq!(ids[i], original[i], "unchosen tokens are left alone");
                    continue;
                }
                chosen += 1;
                assert_eq!(targets[i], original[i] as i64);
                if ids[i] == 4 {
                    masked += 1;
                } else if ids[i] == original[i] {
                    kept += 1;
                } else {
                    assert!((5..1000).contains(&ids[i]), "a random ordinary token");
                    random += 1;
                }
            }
        }
        let share = |n: usize, of: usize| n as f64 / of as f64;
        // 252,000 positions: the chosen share within ±0.003 of 0.15 (about 4 standard errors).
        assert!(
            (share(chosen, total) - 0.15).abs() < 0.003,
            "{chosen} of {total}"
        );
        assert!(
            (share(masked, chosen) - 0.8).abs() < 0.01,
            "{masked} of {chosen}"
        );
        // A random replacement equals the original one time in 995: counted as kept.
        assert!(
            (share(random, chosen) - 0.1).abs() < 0.006,
            "{random} of {chosen}"
        );
        assert!(
            (share(kept, chosen) - 0.1).abs() < 0.006,
            "{kept} of {chosen}"
        );
    }

    fn source() -> PairSource {
        // Document d's sentence s is [100·d + 10·s + 5, …] of 3 tokens: recognisable.
        let documents = (0..6)
            .map(|d| {
                (0..8)
                    .map(|s| (0..3).map(|t| 100 * d + 10 * s + t + 5).collect())
                    .collect()
            })
            .collect();
        PairSource {
            documents,
            seq: 24,
            masking: Masking { rate: 0.0, ..M },
            specials: (2, 3, 0),
        }
    }

    #[test]
    fn pairs_are_half_true_next_and_laid_out_as_bert_reads_them() {
        let src = source();
        let sampler = Sampler { seed: 5 };
        let Batch::MaskedPairs(b) = src.draw(&sampler, 3, 0, 400) else {
            panic!("not pairs")
        };
        assert_eq!(Batch::MaskedPairs(b.clone()), src.draw(&sampler, 3, 0, 400));
        let next = b.next.iter().filter(|&&n| n == 0).count();
        assert!((170..230).contains(&next), "{next} of 400 true next");
        for r in 0..b.batch {
            let row = &b.ids[r * 24..r * 24 + b.lengths[r]];
            let types = &b.token_types[r * 24..r * 24 + b.lengths[r]];
            assert_eq!((row[0], *row.last().unwrap()), (2, 3));
            let sep = row.iter().position(|&t| t == 3).unwrap();
            assert!(
                types[..=sep].iter().all(|&t| t == 0) && types[sep + 1..].iter().all(|&t| t == 1)
            );
            let (a, bseg) = (&row[1..sep], &row[sep + 1..row.len() - 1]);
            let doc = |t: u32| (t - 5) / 100;
            let same_doc = doc(bseg[0]) == doc(a[0]);
            // A true next B starts with the sentence after A's last.
            let follows = same_doc && bseg[0] == a[a.len() - 1] + 8;
            assert_eq!(b.next[r] == 0, follows, "row {r}: {row:?}");
            assert!(b.targets[r * 24..(r + 1) * 24].iter().all(|&t| t == -100));
        }
        let tail = b.rows(398..400);
        assert_eq!((tail.batch, tail.ids.len()), (2, 48));
    }
}
