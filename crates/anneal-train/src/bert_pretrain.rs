//! BERT pretrained from scratch, then fine-tuned with few labels, against the same encoder
//! trained from scratch on those labels alone (Devlin et al. 2019): the text row of the
//! label-efficiency claim.
//!
//! ```text
//! unlabelled text (BBC training articles, labels dropped, plus general prose)
//!   → a WordPiece vocabulary trained on it → documents cut into sentences
//!   → masked LM (15%: 80/10/10) + next-sentence prediction (half true next) → encoder
//! BBC news, a balanced share of the training labels → classifier on the mean-pooled encoder,
//!   from the pretrained encoder or from scratch → test accuracy
//! ```

use crate::finetune::ClassCorpus;
use crate::model::TrainModel;
use crate::objectives::{argmax_rows, MaskedLmNsp, SequenceClassification};
use crate::vision::{pretrain, run_steps, simple_trainer, StepProgress, TrainSettings};
use anneal_data::mlm::{Masking, PairSource};
use anneal_data::tokenizer::WORDPIECE_SPECIALS;
use anneal_data::{LabelledSource, Tokenizer};
use anneal_nn::bert::{Bert, BertConfig};
use anneal_tensor::ParamStore;
use anyhow::Result;
use std::time::Instant;

/// The encoder this experiment pretrains: 4 layers of width 128, 4 heads, 128 positions.
pub fn small_bert(vocab_size: usize) -> BertConfig {
    BertConfig {
        vocab_size,
        hidden_size: 128,
        num_layers: 4,
        num_heads: 4,
        intermediate_size: 512,
        max_positions: 128,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        dropout: 0.1,
        dtype: anneal_tensor::DType::F32,
        pre_norm: false,
        tie_word_embeddings: true,
    }
}

/// `text` cut into sentences: at line breaks, and after `.`, `!` or `?` followed by white
/// space; empty pieces dropped.
pub fn sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut start = 0;
        let bytes = line.as_bytes();
        for i in 0..bytes.len() {
            let end = matches!(bytes[i], b'.' | b'!' | b'?')
                && bytes.get(i + 1).is_some_and(|b| b.is_ascii_whitespace());
            if end {
                out.push(line[start..=i].trim());
                start = i + 1;
            }
        }
        out.push(line[start..].trim());
    }
    out.retain(|s| !s.is_empty());
    out
}

/// Documents as sentences of WordPiece ids (specials stripped; sentences longer than
/// `max_sentence` tokens cut).
pub fn tokenize_documents(
    tokenizer: &Tokenizer,
    texts: &[String],
    max_sentence: usize,
) -> Result<Vec<Vec<Vec<u32>>>> {
    let first_ordinary = WORDPIECE_SPECIALS.len() as u32;
    let mut docs = Vec::with_capacity(texts.len());
    for text in texts {
        let mut doc = Vec::new();
        for s in sentences(text) {
            let mut ids: Vec<u32> = tokenizer
                .encode(s)?
                .into_iter()
                .filter(|&i| i >= first_ordinary || i == 1)
                .collect();
            ids.truncate(max_sentence);
            if !ids.is_empty() {
                doc.push(ids);
            }
        }
        if !doc.is_empty() {
            docs.push(doc);
        }
    }
    Ok(docs)
}

/// MLM + NSP pretraining of `config` on `documents` for `settings.steps` steps of
/// `settings.batch` pairs of `seq` tokens; the model and its final loss.
pub fn pretrain_bert(
    config: &BertConfig,
    documents: Vec<Vec<Vec<u32>>>,
    seq: usize,
    settings: &TrainSettings,
    progress: StepProgress<'_>,
) -> Result<(Box<dyn TrainModel>, f64)> {
    let source = PairSource {
        documents,
        seq,
        masking: Masking {
            rate: 0.15,
            mask_id: 4,
            first_ordinary: WORDPIECE_SPECIALS.len() as u32,
            vocab_size: config.vocab_size as u32,
        },
        specials: (2, 3, 0),
    };
    let model = Bert::for_pretraining(config.clone(), settings.seed)?;
    pretrain(
        Box::new(model),
        Box::new(MaskedLmNsp),
        Box::new(source),
        settings,
        progress,
    )
}

/// What one fine-tuning run gave.
#[derive(Clone, Debug, PartialEq)]
pub struct TextCell {
    /// Test accuracy.
    pub accuracy: f64,
    /// Labelled training documents.
    pub labels: usize,
    /// Optimizer steps.
    pub steps: u64,
    /// Seconds of training and scoring.
    pub seconds: f64,
}

/// `share` of `corpus`'s training documents, balanced over the classes and drawn by `seed`.
pub fn labelled_share(corpus: &ClassCorpus, share: f64, seed: u64) -> Result<Vec<usize>> {
    let classes = corpus.classes.len();
    let n = ((corpus.train.len() as f64 * share).round() as usize).max(classes);
    let labels = corpus.train.iter().map(|(_, l)| *l as usize);
    Ok(anneal_data::batch::balanced_picks(
        labels, classes, n, seed,
    )?)
}

/// A BERT classifier on `labelled` training documents of `corpus` (each cut to `seq` tokens),
/// from `pretrained`'s encoder or from scratch, scored on the test documents.
#[allow(clippy::too_many_arguments)]
pub fn finetune_bert(
    corpus: &ClassCorpus,
    tokenizer: &Tokenizer,
    config: &BertConfig,
    pretrained: Option<&ParamStore>,
    labelled: &[usize],
    seq: usize,
    settings: &TrainSettings,
    progress: StepProgress<'_>,
) -> Result<TextCell> {
    let t0 = Instant::now();
    let classes = corpus.classes.len();
    let model = Bert::with_head(config.clone(), settings.seed, None, Some(classes))?;
    if let Some(p) = pretrained {
        model.params.copy_from(p, Bert::is_encoder_param)?;
    }
    let texts: Vec<&str> = labelled
        .iter()
        .map(|&i| corpus.train[i].0.as_str())
        .collect();
    let ids = tokenizer.encode_for_model(&texts, seq)?;
    let examples = ids
        .into_iter()
        .zip(labelled)
        .map(|(ids, &i)| (ids, corpus.train[i].1))
        .collect();
    let source = LabelledSource { examples, pad: 0 };
    let mut trainer = simple_trainer(
        Box::new(model),
        Box::new(SequenceClassification),
        Box::new(source),
        settings,
    );
    run_steps(&mut trainer, settings.steps, progress)?;
    let test_texts: Vec<&str> = corpus.test.iter().map(|(t, _)| t.as_str()).collect();
    let test_ids = tokenizer.encode_for_model(&test_texts, seq)?;
    let mut right = 0;
    anneal_tensor::no_grad(|| -> Result<()> {
        for (chunk, labels) in test_ids.chunks(32).zip(corpus.test.chunks(32)) {
            let batch = anneal_data::LabelledSequences::padded(
                &chunk.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                &labels.iter().map(|(_, l)| *l).collect::<Vec<_>>(),
                0,
            );
            let input = crate::model::ModelInput::Sequences {
                ids: &batch.ids,
                lengths: &batch.lengths,
                batch: batch.batch,
                seq: batch.seq,
            };
            let logits = trainer.model().forward(&input, None)?.logits;
            let predicted = argmax_rows(&logits.to_vec_f32(), classes);
            right += predicted
                .iter()
                .zip(labels)
                .filter(|(p, (_, l))| **p as i64 == *l)
                .count();
        }
        Ok(())
    })?;
    Ok(TextCell {
        accuracy: right as f64 / corpus.test.len().max(1) as f64,
        labels: labelled.len(),
        steps: settings.steps,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vision::Optim;

    #[test]
    fn sentences_split_at_stops_and_lines() {
        assert_eq!(
            sentences("One. Two? Three!\nFour 3.5 five.\n\n  "),
            ["One.", "Two?", "Three!", "Four 3.5 five."]
        );
    }

    #[test]
    fn pretraining_then_fine_tuning_runs_end_to_end_on_a_tiny_corpus() {
        let topics = [
            (
                "sport",
                "the team won the match and the players scored goals",
            ),
            (
                "money",
                "the bank raised rates and the market fell on profits",
            ),
        ];
        let mut corpus = ClassCorpus {
            classes: topics.iter().map(|t| t.0.to_string()).collect(),
            ..ClassCorpus::default()
        };
        for i in 0..40 {
            let (label, words) = (i % 2, topics[i % 2].1);
            let text = format!("{words}. again {words} today. story {i}.");
            if i % 5 == 0 {
                corpus.test.push((text, label as i64));
            } else {
                corpus.train.push((text, label as i64));
            }
        }
        let texts: Vec<String> = corpus.train.iter().map(|(t, _)| t.clone()).collect();
        let tokenizer = Tokenizer::train_wordpiece(texts.iter(), 120, false).unwrap();
        let docs = tokenize_documents(&tokenizer, &texts, 32).unwrap();
        let mut config = small_bert(tokenizer.vocab_size());
        config.hidden_size = 32;
        config.num_layers = 1;
        config.intermediate_size = 64;
        config.num_heads = 2;
        let settings = TrainSettings {
            steps: 10,
            batch: 8,
            lr: 1e-3,
            weight_decay: 0.01,
            optimizer: Optim::AdamW,
            seed: 0,
        };
        let (pretrained, loss) =
            pretrain_bert(&config, docs, 32, &settings, &mut |_, _, _| {}).unwrap();
        assert!(loss.is_finite());
        let labelled = labelled_share(&corpus, 0.25, 0).unwrap();
        assert_eq!(labelled.len(), 8);
        let cell = finetune_bert(
            &corpus,
            &tokenizer,
            &config,
            Some(pretrained.params()),
            &labelled,
            32,
            &settings,
            &mut |_, _, _| {},
        )
        .unwrap();
        assert!((0.0..=1.0).contains(&cell.accuracy));
        assert_eq!(cell.labels, 8);
    }
}
