//! The data-quality pipeline: read → normalise → exact dedup → near-duplicate dedup → filters →
//! signals → write, configured by a TOML file whose sections switch stages on.
//!
//! ```toml
//! [input]
//! paths = ["crawl/"]
//! extensions = ["jsonl"]
//! [output]
//! dir = "curated/"
//! [normalize]                  # a present section turns its stage on; keys override defaults
//! [exact_dedup]
//! [near_dedup]
//! threshold = 0.8
//! [filters.gopher_quality]
//! [filters.gopher_repetition]
//! [filters.c4]
//! [filters.language]
//! languages = ["eng"]
//! [signals]
//! target = ["reference-sample/"]   # optional: n-gram divergence to this sample
//! ```
//!
//! Output, in `output.dir`:
//! - `kept-00000.jsonl` …: `{"text", "source", "signals"}` per kept document, in corpus order;
//! - `rejected-00000.jsonl` …: `{"text", "source", "stage", "reason"}` per removed document, so
//!   every decision can be audited and reversed;
//! - `stats.json`: documents and bytes in, out of each stage, and the count of each reason;
//! - `clusters.jsonl`: the near-duplicate clusters, when that stage is on.
//!
//! The outputs replace those of an earlier run whole ([`crate::Staged`]): a run killed midway
//! leaves the earlier outputs as they were; other files in the directory are kept.
//!
//! Deduplication needs the whole corpus before it can decide, so the pipeline reads twice: pass 1
//! hashes and signs every normalised document, pass 2 applies the decisions, then the filters and
//! signals, in parallel batches written in order. Exact duplicates keep their first occurrence;
//! near-duplicate clusters keep their first document in corpus order.

use crate::corpus::{Corpus, CorpusOptions, CorpusReport, Document};
use crate::filters::{C4Lines, CodeRules, GopherQuality, GopherRepetition, LengthBounds};
use crate::minhash::{cluster, estimated_jaccard, MinHashConfig, MinHasher};
use crate::normalize::Normalize;
use crate::signals::{compute, LanguageFilter, NgramDistribution, Signals};
use crate::{io_err, Error, Result};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Where documents come from.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// Files or directories.
    pub paths: Vec<PathBuf>,
    /// Extensions read from directories.
    #[serde(default = "default_extensions")]
    pub extensions: Vec<String>,
    /// JSONL text field.
    #[serde(default = "default_text_field")]
    pub text_field: String,
}

fn default_extensions() -> Vec<String> {
    CorpusOptions::default().extensions
}

fn default_text_field() -> String {
    "text".into()
}

/// Where results go.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Output directory.
    pub dir: PathBuf,
    /// Documents per output shard.
    #[serde(default = "default_shard_documents")]
    pub shard_documents: usize,
}

fn default_shard_documents() -> usize {
    100_000
}

/// Exact deduplication (no settings: content hash of the normalised text, xxHash3-128).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExactDedup {}

/// Near-duplicate deduplication settings.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NearDedup {
    /// Jaccard threshold.
    pub threshold: f64,
    /// Hash functions at most.
    pub num_perm: usize,
    /// Words per shingle.
    pub ngram: usize,
    /// Seed of the hash family.
    pub seed: u64,
}

impl Default for NearDedup {
    fn default() -> Self {
        NearDedup {
            threshold: 0.8,
            num_perm: 128,
            ngram: 5,
            seed: 1,
        }
    }
}

/// The filters, each on when its section is present, applied in this order.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Character bounds.
    pub length: Option<LengthBounds>,
    /// C4 line rules (rewrites the text).
    pub c4: Option<C4Lines>,
    /// Gopher quality rules.
    pub gopher_quality: Option<GopherQuality>,
    /// Gopher repetition rules.
    pub gopher_repetition: Option<GopherRepetition>,
    /// Language identification.
    pub language: Option<LanguageFilter>,
    /// Source-code rules.
    pub code: Option<CodeRules>,
}

/// Signal settings.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SignalConfig {
    /// A target sample (files or directories) for the distribution-match signal.
    pub target: Vec<PathBuf>,
    /// Character n-gram size of the divergence.
    pub ngram: usize,
}

impl Default for SignalConfig {
    fn default() -> Self {
        SignalConfig {
            target: Vec::new(),
            ngram: 3,
        }
    }
}

/// A whole pipeline.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Input.
    pub input: InputConfig,
    /// Output.
    pub output: OutputConfig,
    /// Normalisation, when present.
    pub normalize: Option<Normalize>,
    /// Exact dedup, when present.
    pub exact_dedup: Option<ExactDedup>,
    /// Near-duplicate dedup, when present.
    pub near_dedup: Option<NearDedup>,
    /// Filters.
    #[serde(default)]
    pub filters: FilterConfig,
    /// Signals, when present.
    pub signals: Option<SignalConfig>,
}

impl Default for InputConfig {
    fn default() -> Self {
        InputConfig {
            paths: Vec::new(),
            extensions: default_extensions(),
            text_field: default_text_field(),
        }
    }
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            dir: PathBuf::new(),
            shard_documents: default_shard_documents(),
        }
    }
}

impl Default for PipelineConfig {
    /// No input, no output directory, no stage on.
    fn default() -> Self {
        PipelineConfig {
            input: InputConfig::default(),
            output: OutputConfig::default(),
            normalize: None,
            exact_dedup: None,
            near_dedup: None,
            filters: FilterConfig::default(),
            signals: None,
        }
    }
}

impl PipelineConfig {
    /// Every stage on with its default settings.
    pub fn all_stages() -> PipelineConfig {
        PipelineConfig {
            normalize: Some(Default::default()),
            exact_dedup: Some(Default::default()),
            near_dedup: Some(Default::default()),
            filters: FilterConfig {
                length: Some(Default::default()),
                c4: Some(Default::default()),
                gopher_quality: Some(Default::default()),
                gopher_repetition: Some(Default::default()),
                language: Some(Default::default()),
                code: Some(Default::default()),
            },
            signals: Some(Default::default()),
            ..PipelineConfig::default()
        }
    }

    /// Defaults, then the pipeline file at `path` (if any), then `section.key=value` overrides
    /// (`near_dedup.threshold=0.7`, `filters.c4.min_words=5`), through anneal's one loader: a
    /// stage section named in the file or an override switches the stage on; errors name the
    /// file, the key and the keys its section allows. The caller validates
    /// ([`PipelineConfig::validate`]) once input and output are filled in; [`run`] refuses an
    /// invalid configuration.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<PipelineConfig> {
        Ok(anneal_config::Loader::new(&PipelineConfig::default())
            .allow(&PipelineConfig::all_stages())
            .load(path, overrides)?)
    }

    /// Checks every setting's range, for a file and for flags alike (the pipeline runs only a
    /// valid configuration); the error names the key, its value and what is allowed.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, value: String, allowed: &str| {
            Err(Error::Invalid {
                key: key.into(),
                value,
                allowed: allowed.into(),
            })
        };
        if self.output.shard_documents == 0 {
            return bad("output.shard_documents", "0".into(), "at least 1");
        }
        if let Some(n) = &self.near_dedup {
            crate::minhash::check_settings(n.threshold, n.num_perm, n.ngram, None).map_err(
                |e| match e {
                    Error::Invalid {
                        key,
                        value,
                        allowed,
                    } => Error::Invalid {
                        key: format!("near_dedup.{key}"),
                        value,
                        allowed,
                    },
                    other => other,
                },
            )?;
        }
        let f = &self.filters;
        if let Some(l) = &f.length {
            if l.min_chars > l.max_chars {
                let value = format!("{} > max_chars {}", l.min_chars, l.max_chars);
                return bad("filters.length.min_chars", value, "at most max_chars");
            }
        }
        if let Some(l) = &f.language {
            if let Some(code) = l
                .languages
                .iter()
                .find(|c| whatlang::Lang::from_code(c.as_str()).is_none())
            {
                let allowed = "ISO 639-3 codes the detector knows (eng, fra, deu, cmn, …)";
                return bad("filters.language.languages", code.clone(), allowed);
            }
            if !(0.0..=1.0).contains(&l.min_confidence) {
                let value = l.min_confidence.to_string();
                return bad(
                    "filters.language.min_confidence",
                    value,
                    "a number in [0, 1]",
                );
            }
        }
        if let Some(s) = &self.signals {
            if s.ngram == 0 {
                return bad("signals.ngram", "0".into(), "at least 1");
            }
        }
        Ok(())
    }

    /// The configuration key of stage `name` (`c4` → `filters.c4`), or `None` for a name that
    /// is not a stage. Naming that key in a file or an override switches the stage on.
    pub fn stage_key(name: &str) -> Option<String> {
        let top = ["normalize", "exact_dedup", "near_dedup", "signals"];
        let filters = [
            "length",
            "c4",
            "gopher_quality",
            "gopher_repetition",
            "language",
            "code",
        ];
        if top.contains(&name) {
            Some(name.to_string())
        } else {
            filters.contains(&name).then(|| format!("filters.{name}"))
        }
    }

    /// The stages that are on, in order.
    pub fn stages(&self) -> Vec<&'static str> {
        let f = &self.filters;
        [
            ("normalize", self.normalize.is_some()),
            ("exact_dedup", self.exact_dedup.is_some()),
            ("near_dedup", self.near_dedup.is_some()),
            ("length", f.length.is_some()),
            ("c4", f.c4.is_some()),
            ("gopher_quality", f.gopher_quality.is_some()),
            ("gopher_repetition", f.gopher_repetition.is_some()),
            ("language", f.language.is_some()),
            ("code", f.code.is_some()),
            ("signals", self.signals.is_some()),
        ]
        .into_iter()
        .filter(|s| s.1)
        .map(|s| s.0)
        .collect()
    }
}

/// Counts through one stage.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StageStats {
    /// Documents that reached the stage.
    pub documents_in: u64,
    /// Documents it removed.
    pub removed: u64,
    /// Bytes it removed.
    pub removed_bytes: u64,
}

/// What a pipeline run did.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct PipelineStats {
    /// The input pass's report (files, bad lines).
    pub input: CorpusReport,
    /// Per stage, in order.
    pub stages: Vec<(String, StageStats)>,
    /// Removal reasons (the rule, without the measured value) and their counts.
    pub reasons: BTreeMap<String, u64>,
    /// Documents kept.
    pub kept: u64,
    /// Bytes kept.
    pub kept_bytes: u64,
    /// Wall time in seconds.
    pub seconds: f64,
}

impl PipelineStats {
    /// Input megabytes per second.
    pub fn mb_per_s(&self) -> f64 {
        self.input.bytes as f64 / 1e6 / self.seconds.max(1e-9)
    }
}

/// The outcome for one document.
enum Fate {
    Kept(String, Signals),
    Rejected(String, &'static str, String),
}

/// Rotating JSONL shard writer.
struct ShardedJsonl {
    dir: PathBuf,
    prefix: &'static str,
    per_shard: usize,
    count: usize,
    out: Option<BufWriter<File>>,
    shards: usize,
}

impl ShardedJsonl {
    fn new(dir: &Path, prefix: &'static str, per_shard: usize) -> ShardedJsonl {
        ShardedJsonl {
            dir: dir.to_path_buf(),
            prefix,
            per_shard: per_shard.max(1),
            count: 0,
            out: None,
            shards: 0,
        }
    }

    fn write(&mut self, value: &serde_json::Value) -> Result<()> {
        if self.out.is_none() || self.count == self.per_shard {
            if let Some(mut w) = self.out.take() {
                w.flush().map_err(io_err(&self.dir))?;
                crate::failpoint("shard");
            }
            let path = self
                .dir
                .join(format!("{}-{:05}.jsonl", self.prefix, self.shards));
            self.out = Some(BufWriter::new(File::create(&path).map_err(io_err(&path))?));
            self.shards += 1;
            self.count = 0;
        }
        let w = self.out.as_mut().expect("opened above");
        serde_json::to_writer(&mut *w, value).map_err(|e| io_err(&self.dir)(e.into()))?;
        w.write_all(b"\n").map_err(io_err(&self.dir))?;
        self.count += 1;
        Ok(())
    }

    fn finish(mut self) -> Result<()> {
        if let Some(mut w) = self.out.take() {
            w.flush().map_err(io_err(&self.dir))?;
            crate::failpoint("shard");
        }
        Ok(())
    }
}

/// A signal computed outside this crate: its name and a function of a kept document's text.
pub type ExtraSignal<'a> = (&'a str, &'a (dyn Fn(&str) -> f64 + Sync));

/// Runs the pipeline; `progress` is called with the bytes read so far in each pass.
pub fn run(config: &PipelineConfig, progress: impl FnMut(&str, u64)) -> Result<PipelineStats> {
    run_with_signals(config, &[], progress)
}

/// [`run`], adding `extra` signals to every kept document (when signals are on). The
/// authenticity signal "perplexity under a trained model" comes in this way, from the binary,
/// which knows the models.
pub fn run_with_signals(
    config: &PipelineConfig,
    extra: &[ExtraSignal],
    mut progress: impl FnMut(&str, u64),
) -> Result<PipelineStats> {
    config.validate()?;
    let started = std::time::Instant::now();
    let corpus = Corpus::new(
        &config.input.paths,
        CorpusOptions {
            extensions: config.input.extensions.clone(),
            text_field: config.input.text_field.clone(),
            ..Default::default()
        },
    )?;
    // The outputs replace the previous run's whole, or not at all (a run killed midway leaves
    // them as they were).
    let staged = crate::Staged::new(&config.output.dir, "pipeline-tmp", output_file)?;
    let out = staged.path().to_path_buf();
    let normalize = |t: &str| match &config.normalize {
        Some(n) => n.apply(t),
        None => t.to_string(),
    };
    // Pass 1: decisions of the dedup stages, by document position.
    let mut decisions: HashMap<u64, (&'static str, String)> = HashMap::new();
    let mut stages: Vec<(String, StageStats)> = Vec::new();
    let mut sources: Vec<String> = Vec::new();
    let mut sizes: Vec<u64> = Vec::new();
    if config.exact_dedup.is_some() || config.near_dedup.is_some() {
        let hasher = config
            .near_dedup
            .as_ref()
            .map(|n| MinHasher::new(MinHashConfig::new(n.threshold, n.num_perm, n.ngram, n.seed)));
        let mut hashes: Vec<u128> = Vec::new();
        let mut signatures: Vec<Vec<u64>> = Vec::new();
        let mut batch: Vec<Document> = Vec::new();
        let mut read = 0u64;
        let mut sign = |batch: &mut Vec<Document>| {
            let out: Vec<(u128, Option<Vec<u64>>, String, u64)> = batch
                .par_drain(..)
                .map(|d| {
                    let t = normalize(&d.text);
                    let h = xxhash_rust::xxh3::xxh3_128(t.as_bytes());
                    let sig = hasher.as_ref().map(|m| m.signature(&t));
                    (h, sig, d.source, d.text.len() as u64)
                })
                .collect();
            for (h, sig, source, size) in out {
                hashes.push(h);
                if let Some(s) = sig {
                    signatures.push(s);
                }
                sources.push(source);
                sizes.push(size);
            }
        };
        let mut batch_bytes = 0;
        corpus.for_each(|d| {
            read += d.text.len() as u64;
            batch_bytes += d.text.len();
            batch.push(d);
            if batch_bytes >= 4 << 20 {
                batch_bytes = 0;
                sign(&mut batch);
                progress("pass 1: hashing and signing", read);
            }
            true
        })?;
        sign(&mut batch);
        let n = hashes.len() as u64;
        let mut alive = vec![true; hashes.len()];
        if config.exact_dedup.is_some() {
            let mut first: HashMap<u128, usize> = HashMap::new();
            let mut st = StageStats {
                documents_in: n,
                ..Default::default()
            };
            for (i, h) in hashes.iter().enumerate() {
                match first.get(h) {
                    Some(&j) => {
                        alive[i] = false;
                        st.removed += 1;
                        st.removed_bytes += sizes[i];
                        decisions.insert(
                            i as u64,
                            (
                                "exact_dedup",
                                format!("exact_dedup: same text as {}", sources[j]),
                            ),
                        );
                    }
                    None => {
                        first.insert(*h, i);
                    }
                }
            }
            stages.push(("exact_dedup".into(), st));
        }
        if let Some(hasher) = &hasher {
            // Exact duplicates already removed take no part in clustering: an all-MAX signature
            // is never matched.
            for (sig, &a) in signatures.iter_mut().zip(&alive) {
                if !a {
                    sig.fill(u64::MAX);
                }
            }
            let live = signatures;
            let clusters = cluster(hasher, &live);
            // The clusters, largest first, for audits and the report.
            crate::dedup::write_clusters(&out, &clusters.groups(), |i| &sources[i])?;
            let mut st = StageStats {
                documents_in: alive.iter().filter(|&&a| a).count() as u64,
                ..Default::default()
            };
            for i in 0..live.len() {
                if alive[i] && !clusters.is_kept(i) {
                    let root = clusters.root[i] as usize;
                    st.removed += 1;
                    st.removed_bytes += sizes[i];
                    decisions.insert(
                        i as u64,
                        (
                            "near_dedup",
                            format!(
                                "near_dedup: estimated Jaccard {:.2} with {}",
                                estimated_jaccard(&live[i], &live[root]),
                                sources[root]
                            ),
                        ),
                    );
                }
            }
            stages.push(("near_dedup".into(), st));
        }
    }

    // Pass 2: filters and signals, in parallel batches written in order.
    let target = match &config.signals {
        Some(s) if !s.target.is_empty() => {
            let t = Corpus::new(&s.target, CorpusOptions::default())?;
            let mut texts = Vec::new();
            t.for_each(|d| {
                texts.push(d.text);
                true
            })?;
            Some(NgramDistribution::from_texts(
                texts.iter().map(|s| s.as_str()),
                s.ngram,
            ))
        }
        _ => None,
    };
    let f = &config.filters;
    let judge = |text: String| -> Fate {
        let mut text = text;
        macro_rules! check {
            ($stage:literal, $filter:expr) => {
                if let Some(filter) = $filter {
                    if let Err(reason) = filter.check(&text) {
                        return Fate::Rejected(text, $stage, reason);
                    }
                }
            };
        }
        check!("length", &f.length);
        if let Some(c4) = &f.c4 {
            match c4.apply(&text) {
                Ok(t) => text = t,
                Err(reason) => return Fate::Rejected(text, "c4", reason),
            }
        }
        check!("gopher_quality", &f.gopher_quality);
        check!("gopher_repetition", &f.gopher_repetition);
        check!("language", &f.language);
        check!("code", &f.code);
        let mut signals = compute(&text, target.as_ref());
        if config.signals.is_some() {
            for (name, f) in extra {
                signals.extra.insert(name.to_string(), f(&text));
            }
        }
        Fate::Kept(text, signals)
    };
    let mut kept_out = ShardedJsonl::new(&out, "kept", config.output.shard_documents);
    let mut rejected_out = ShardedJsonl::new(&out, "rejected", config.output.shard_documents);
    let mut filter_stats: BTreeMap<&'static str, StageStats> = BTreeMap::new();
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    for (stage, _) in &stages {
        let key = stage.clone();
        let count = decisions.values().filter(|(s, _)| *s == key).count() as u64;
        if count > 0 {
            reasons.insert(key, count);
        }
    }
    let (mut kept, mut kept_bytes) = (0u64, 0u64);
    let mut position = 0u64;
    let mut read = 0u64;
    let mut failure = None;
    let mut batch: Vec<(u64, Document)> = Vec::new();
    let mut batch_bytes = 0usize;
    let signals_on = config.signals.is_some();
    let mut flush = |batch: &mut Vec<(u64, Document)>| -> Result<()> {
        let fates: Vec<(u64, Document, Option<Fate>)> = batch
            .par_drain(..)
            .map(|(i, d)| {
                if decisions.contains_key(&i) {
                    (i, d, None)
                } else {
                    let fate = judge(normalize(&d.text));
                    (i, d, Some(fate))
                }
            })
            .collect();
        for (i, d, fate) in fates {
            match fate {
                None => {
                    let (stage, reason) = &decisions[&i];
                    rejected_out.write(&serde_json::json!({
                        "text": d.text, "source": d.source, "stage": stage, "reason": reason,
                    }))?;
                }
                Some(Fate::Rejected(text, stage, reason)) => {
                    let st = filter_stats.entry(stage).or_default();
                    st.removed += 1;
                    st.removed_bytes += d.text.len() as u64;
                    let rule = reason.split(':').next().unwrap_or(stage).to_string();
                    let detail = reason
                        .split_once(": ")
                        .map(|(_, r)| {
                            r.split(|c: char| c.is_ascii_digit())
                                .next()
                                .unwrap_or(r)
                                .trim()
                                .to_string()
                        })
                        .unwrap_or_default();
                    *reasons
                        .entry(
                            format!("{rule}: {detail}")
                                .trim_end_matches(": ")
                                .to_string(),
                        )
                        .or_default() += 1;
                    rejected_out.write(&serde_json::json!({
                        "text": text, "source": d.source, "stage": stage, "reason": reason,
                    }))?;
                }
                Some(Fate::Kept(text, signals)) => {
                    kept += 1;
                    kept_bytes += text.len() as u64;
                    let mut v = serde_json::json!({ "text": text, "source": d.source });
                    if signals_on {
                        v["signals"] = serde_json::to_value(&signals).expect("serialises");
                    }
                    kept_out.write(&v)?;
                }
            }
        }
        Ok(())
    };
    let input = corpus.for_each(|d| {
        read += d.text.len() as u64;
        batch_bytes += d.text.len();
        batch.push((position, d));
        position += 1;
        if batch_bytes >= 4 << 20 {
            batch_bytes = 0;
            if let Err(e) = flush(&mut batch) {
                failure = Some(e);
                return false;
            }
            progress("pass 2: filtering and writing", read);
        }
        true
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    flush(&mut batch)?;
    kept_out.finish()?;
    rejected_out.finish()?;
    // Per-filter stage counts, in pipeline order, each seeing what the previous left.
    let mut remaining = input.documents - stages.iter().map(|s| s.1.removed).sum::<u64>();
    for name in config.stages() {
        if matches!(name, "normalize" | "exact_dedup" | "near_dedup" | "signals") {
            continue;
        }
        let mut st = filter_stats.get(name).cloned().unwrap_or_default();
        st.documents_in = remaining;
        remaining -= st.removed;
        stages.push((name.to_string(), st));
    }
    let stats = PipelineStats {
        input,
        stages,
        reasons,
        kept,
        kept_bytes,
        seconds: started.elapsed().as_secs_f64(),
    };
    let path = out.join("stats.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&stats).expect("serialises"),
    )
    .map_err(io_err(&path))?;
    staged.commit()?;
    Ok(stats)
}

/// Whether a file name is one of the pipeline's outputs.
fn output_file(name: &str) -> bool {
    name == "stats.json"
        || name == "clusters.jsonl"
        || ((name.starts_with("kept-") || name.starts_with("rejected-"))
            && name.ends_with(".jsonl"))
}

#[cfg(test)]
mod tests {

    #[test]
    fn one_validation_serves_files_and_flags() {
        let check = |o: &[&str]| {
            let o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
            let mut c = PipelineConfig::load(None, &o).unwrap();
            c.input.paths = vec!["in".into()];
            c.output.dir = "out".into();
            c.validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert_eq!(check(&["near_dedup.threshold=0.7"]), "");
        for (set, want) in [
            ("near_dedup.num_perm=0", "near_dedup.num_perm = \"0\""),
            ("near_dedup.ngram=0", "near_dedup.ngram"),
            ("near_dedup.threshold=1.5", "near_dedup.threshold = \"1.5\""),
            ("filters.length.min_chars=1000", ""),
            ("filters.language.languages=[\"klingon\"]", "\"klingon\""),
            ("output.shard_documents=0", "output.shard_documents"),
            ("signals.ngram=0", "signals.ngram"),
        ] {
            let got = check(&[set]);
            assert!(got.contains(want), "{set}: {got}");
            if !want.is_empty() {
                assert!(got.contains("not allowed"), "{set}: {got}");
            }
        }
        let got = check(&["filters.length.min_chars=10", "filters.length.max_chars=5"]);
        assert!(
            got.contains("min_chars") && got.contains("at most max_chars"),
            "{got}"
        );
    }

    #[test]
    fn overrides_switch_stages_on_and_name_unknown_keys() {
        let set = |o: &[&str]| {
            let o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
            PipelineConfig::load(None, &o)
        };
        let c = set(&["filters.c4.min_sentences=2", "near_dedup.threshold=0.7"]).unwrap();
        assert_eq!(c.filters.c4.as_ref().unwrap().min_sentences, 2);
        assert_eq!(c.near_dedup.as_ref().unwrap().threshold, 0.7);
        assert_eq!(c.stages(), ["near_dedup", "c4"]);
        let e = set(&["filters.c4.min_sentence=2"]).unwrap_err().to_string();
        assert!(
            e.contains("[filters.c4] allows") && e.contains("min_sentences"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "[input]\npaths = [\"a\"]\n[output]\ndir = \"o\"\n[exact_dedup]\n",
        )
        .unwrap();
        let c = PipelineConfig::load(Some(&path), &["output.dir=elsewhere".into()]).unwrap();
        assert_eq!(c.stages(), ["exact_dedup"]);
        assert_eq!(c.output.dir, PathBuf::from("elsewhere"));
    }

    use super::*;

    const PROSE: &str = crate::TEST_PROSE;

    #[test]
    fn every_document_is_kept_or_rejected_with_its_stage() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        let other = "Rivers rise in the mountains and carry water to the sea, and the towns along \
            their banks have grown with the trade that the boats brought. In the spring the snow \
            melts and the water is high; in the autumn the fields are green with the new crop, and \
            the markets are busy with farmers who come to sell what they have grown.";
        let docs = [
            PROSE.to_string(),
            PROSE.to_string(),                     // exact duplicate
            PROSE.replace("Tuesday", "Wednesday"), // near duplicate
            "Too short.".to_string(),              // gopher quality
            "buy now and save\n".repeat(40),       // repetition or quality
            other.to_string(),                     // kept
            format!("{PROSE}\u{00A0}"),            // exact duplicate after normalising
        ];
        let body: String = docs
            .iter()
            .map(|t| serde_json::json!({ "text": t }).to_string() + "\n")
            .collect();
        std::fs::write(src.join("part.jsonl"), body + "not json\n").unwrap();
        let out = dir.path().join("out");
        let toml = format!(
            "[input]\npaths = [{src:?}]\n[output]\ndir = {out:?}\n[normalize]\n[exact_dedup]\n\
             [near_dedup]\nthreshold = 0.7\nngram = 3\n[filters.gopher_quality]\n\
             [filters.gopher_repetition]\n[filters.language]\n[signals]\ntarget = [{src:?}]\n",
            src = src.display().to_string(),
            out = out.display().to_string()
        );
        let path = dir.path().join("pipeline.toml");
        std::fs::write(&path, toml).unwrap();
        let config = PipelineConfig::load(Some(&path), &[]).unwrap();
        assert_eq!(
            config.stages(),
            [
                "normalize",
                "exact_dedup",
                "near_dedup",
                "gopher_quality",
                "gopher_repetition",
                "language",
                "signals"
            ]
        );
        let stats = run(&config, |_, _| {}).unwrap();
        assert_eq!(stats.input.documents, 7);
        assert_eq!(stats.input.bad_count, 1, "the malformed line is counted");
        assert_eq!(stats.kept, 2);
        let read = |name: &str| -> Vec<serde_json::Value> {
            std::fs::read_to_string(out.join(name))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        };
        let kept = read("kept-00000.jsonl");
        let rejected = read("rejected-00000.jsonl");
        assert_eq!(kept.len() + rejected.len(), 7, "nothing is lost");
        assert!(kept[0]["signals"]["compression_ratio"].as_f64().unwrap() > 0.3);
        assert!(kept[0]["signals"]["target_jsd"].as_f64().is_some());
        let stage_of = |i: usize| {
            rejected
                .iter()
                .find(|r| {
                    r["source"]
                        .as_str()
                        .unwrap()
                        .ends_with(&format!(":{}", i + 1))
                })
                .map(|r| r["stage"].as_str().unwrap().to_string())
        };
        assert_eq!(stage_of(1).as_deref(), Some("exact_dedup"));
        assert_eq!(stage_of(6).as_deref(), Some("exact_dedup"));
        assert_eq!(stage_of(2).as_deref(), Some("near_dedup"));
        assert_eq!(stage_of(3).as_deref(), Some("gopher_quality"));
        assert!(stage_of(4).is_some());
        assert_eq!(stats.stages[0].0, "exact_dedup");
        assert_eq!(stats.stages[0].1.removed, 2);
        assert!(
            stats
                .reasons
                .keys()
                .any(|r| r.starts_with("gopher_quality")),
            "{:?}",
            stats.reasons
        );
        assert!(out.join("clusters.jsonl").is_file());
        // The report reads it all back into one page.
        let html = dir.path().join("report.html");
        let summary = crate::report::write_report(&out, &html).unwrap();
        assert_eq!((summary.kept, summary.rejected), (2, 5));
        assert_eq!(summary.largest_clusters, [2]);
        assert!(summary.distinct_n[0] > 0.5 && summary.distinct_n[2] > 0.9);
        let page = std::fs::read_to_string(&html).unwrap();
        for needle in [
            "<h2>Stages</h2>",
            "near_dedup",
            "data:image/png;base64,",
            "compression_ratio",
            "Examples removed",
            "distinct-1",
        ] {
            assert!(page.contains(needle), "{needle}");
        }
    }

    #[test]
    fn unknown_sections_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "[input]\npaths = []\n[output]\ndir = \"x\"\n[filters.gopher]\n",
        )
        .unwrap();
        let err = PipelineConfig::load(Some(&path), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("gopher") && err.contains("gopher_quality") && err.contains("p.toml"),
            "{err}"
        );
    }
}
