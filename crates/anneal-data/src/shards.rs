//! Tokenized corpora as memory-mapped binary shards.
//!
//! A tokenized corpus is a directory:
//! ```text
//! manifest.json          what is below, token counts, checksums, the corpus report
//! tokenizer.json         the tokenizer that produced the ids
//! train-00000.bin …      little-endian u16 ids when the vocabulary fits in 16 bits, else u32
//! val-00000.bin …
//! ```
//! Documents are concatenated, each followed by the tokenizer's end-of-text token when it has
//! one. The train/validation split is either by document (each document goes to validation with
//! probability `val_fraction`, decided by a seeded hash of its index) or, as nanoGPT does for its
//! Shakespeare example, by position: the last `val_fraction` of the token stream.
//!
//! Tokenisation streams: documents are read in parts of at most [`TOKENIZE_PART_BYTES`] (a
//! long document's parts are joined again: no end-of-text token between them, one split for
//! all), in batches of about `batch_bytes`; each batch is encoded in parallel and written in
//! order, so memory stays bounded by the batch size whatever the size of the corpus or of its
//! longest document.

use crate::corpus::{Corpus, CorpusReport, Document};
use crate::tokenizer::Tokenizer;
use crate::{io_err, Error, Result};
use rayon::prelude::*;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Documents are read for tokenization in parts of at most this many bytes.
pub const TOKENIZE_PART_BYTES: usize = 1 << 20;

/// How the validation split is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitMode {
    /// Whole documents, chosen by a seeded hash of their index.
    Documents,
    /// The last `val_fraction` of the concatenated token stream (nanoGPT's Shakespeare split).
    Tail,
}

impl std::str::FromStr for SplitMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<SplitMode> {
        match s {
            "documents" => Ok(SplitMode::Documents),
            "tail" => Ok(SplitMode::Tail),
            _ => Err(Error::Invalid {
                key: "split".into(),
                value: s.into(),
                allowed: "documents or tail".into(),
            }),
        }
    }
}

/// Settings of [`tokenize`].
#[derive(Clone, Debug)]
pub struct TokenizeOptions {
    /// Share of the data held out for validation, in [0, 1).
    pub val_fraction: f64,
    /// How the held-out share is chosen.
    pub split: SplitMode,
    /// Seed of the document split.
    pub seed: u64,
    /// Tokens per shard file at most.
    pub shard_tokens: u64,
    /// Bytes of text encoded per parallel batch.
    pub batch_bytes: usize,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        TokenizeOptions {
            val_fraction: 0.05,
            split: SplitMode::Documents,
            seed: 1234,
            shard_tokens: 1 << 27,
            batch_bytes: 4 << 20,
        }
    }
}

/// One shard file.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShardInfo {
    /// File name inside the corpus directory.
    pub file: String,
    /// Tokens it holds.
    pub tokens: u64,
    /// xxHash3-64 of its bytes, checked when it is opened.
    pub xxh3: String,
}

/// The description of a tokenized corpus (`manifest.json`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// Format version (1).
    pub version: u32,
    /// `u16` or `u32`.
    pub dtype: String,
    /// Vocabulary size of the tokenizer.
    pub vocab_size: usize,
    /// End-of-text id appended after each document, if any.
    pub eos: Option<u32>,
    /// Training shards, in order.
    pub train: Vec<ShardInfo>,
    /// Validation shards, in order.
    pub val: Vec<ShardInfo>,
    /// Documents in each split (for the tail split, documents are counted where they start).
    pub train_documents: u64,
    /// See `train_documents`.
    pub val_documents: u64,
    /// How validation was chosen.
    pub split: SplitMode,
    /// Its share.
    pub val_fraction: f64,
    /// Seed of the document split.
    pub seed: u64,
    /// What was read, including skipped bad input.
    pub corpus: CorpusReport,
}

impl Manifest {
    /// Reads `dir/manifest.json`.
    pub fn load(dir: &Path) -> Result<Manifest> {
        crate::recover_dir_keeping(dir, dataset_file)?;
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        serde_json::from_str(&text).map_err(|e| Error::Format {
            path,
            reason: format!("not a token-shard manifest: {e}"),
        })
    }

    /// Tokens in the training split.
    pub fn train_tokens(&self) -> u64 {
        self.train.iter().map(|s| s.tokens).sum()
    }

    /// Tokens in the validation split.
    pub fn val_tokens(&self) -> u64 {
        self.val.iter().map(|s| s.tokens).sum()
    }
}

/// What [`tokenize`] did.
#[derive(Clone, Debug)]
pub struct TokenizeSummary {
    /// The manifest written.
    pub manifest: Manifest,
    /// Wall time.
    pub seconds: f64,
}

impl TokenizeSummary {
    /// Input text megabytes per second.
    pub fn mb_per_s(&self) -> f64 {
        self.manifest.corpus.bytes as f64 / 1e6 / self.seconds.max(1e-9)
    }
}

struct ShardWriter {
    dir: PathBuf,
    prefix: &'static str,
    wide: bool,
    max_tokens: u64,
    out: Option<(BufWriter<File>, PathBuf, xxhash_rust::xxh3::Xxh3, u64)>,
    shards: Vec<ShardInfo>,
    /// The little-endian bytes of at most [`ShardWriter::CHUNK`] ids, reused.
    bytes: Vec<u8>,
}

impl ShardWriter {
    fn new(dir: &Path, prefix: &'static str, wide: bool, max_tokens: u64) -> ShardWriter {
        ShardWriter {
            dir: dir.to_path_buf(),
            prefix,
            wide,
            max_tokens,
            out: None,
            shards: Vec::new(),
            bytes: Vec::new(),
        }
    }

    /// Ids converted at a time.
    const CHUNK: usize = 1 << 16;

    fn write(&mut self, mut ids: &[u32]) -> Result<()> {
        let mut bytes = std::mem::take(&mut self.bytes);
        while !ids.is_empty() {
            if self.out.is_none() {
                let path = self
                    .dir
                    .join(format!("{}-{:05}.bin", self.prefix, self.shards.len()));
                let file = File::create(&path).map_err(io_err(&path))?;
                self.out = Some((
                    BufWriter::with_capacity(1 << 20, file),
                    path,
                    xxhash_rust::xxh3::Xxh3::new(),
                    0,
                ));
            }
            let (w, path, hash, count) = self.out.as_mut().expect("opened above");
            let take = ids
                .len()
                .min((self.max_tokens - *count) as usize)
                .min(Self::CHUNK);
            bytes.clear();
            for &id in &ids[..take] {
                if self.wide {
                    bytes.extend_from_slice(&id.to_le_bytes());
                } else {
                    bytes.extend_from_slice(&(id as u16).to_le_bytes());
                }
            }
            w.write_all(&bytes).map_err(io_err(path.as_path()))?;
            hash.update(&bytes);
            *count += take as u64;
            ids = &ids[take..];
            if *count == self.max_tokens {
                self.close()?;
            }
        }
        self.bytes = bytes;
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        if let Some((w, path, hash, count)) = self.out.take() {
            let file = w
                .into_inner()
                .map_err(|e| io_err(path.as_path())(e.into_error()))?;
            file.sync_all().map_err(io_err(path.as_path()))?;
            crate::failpoint("shard");
            self.shards.push(ShardInfo {
                file: path
                    .file_name()
                    .expect("shard paths have names")
                    .to_string_lossy()
                    .into_owned(),
                tokens: count,
                xxh3: hex(hash.digest()),
            });
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<ShardInfo>> {
        self.close()?;
        Ok(self.shards)
    }
}

/// A 64-bit checksum as the manifest writes it.
/// Reads until `buf` is full or the file ends; the bytes read.
fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn hex(digest: u64) -> String {
    format!("{digest:016x}")
}

/// Token ids from their little-endian u32 (`wide`) or u16 encoding; `out` holds one per id.
fn decode_ids(bytes: &[u8], wide: bool, out: &mut [u32]) {
    if wide {
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    } else {
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            *o = u16::from_le_bytes([c[0], c[1]]) as u32;
        }
    }
}

fn in_validation(index: u64, seed: u64, fraction: f64) -> bool {
    let h = xxhash_rust::xxh3::xxh3_64_with_seed(&index.to_le_bytes(), seed);
    (h as f64 / u64::MAX as f64) < fraction
}

/// Tokenizes `corpus` with `tokenizer` into shards under `out_dir` (created if missing), writing
/// `tokenizer.json` and `manifest.json` beside them. `progress` is told the bytes of text read
/// so far, after each document (the binary draws it).
pub fn tokenize(
    corpus: &Corpus,
    tokenizer: &Tokenizer,
    out_dir: &Path,
    opts: &TokenizeOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<TokenizeSummary> {
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return Err(Error::Invalid {
            key: "val_fraction".into(),
            value: opts.val_fraction.to_string(),
            allowed: "a number in [0, 1)".into(),
        });
    }
    let start = Instant::now();
    // The new dataset is written beside the old one and swapped in whole at the end, so a run
    // killed midway (or a full disk) leaves the old dataset as it was.
    let staged = crate::Staged::new(out_dir, "tokenize-tmp", dataset_file)?;
    let out_dir = staged.path();
    let vocab_size = tokenizer.vocab_size();
    let wide = vocab_size > 1 << 16;
    let mut train = ShardWriter::new(out_dir, "train", wide, opts.shard_tokens);
    let mut val = ShardWriter::new(out_dir, "val", wide, opts.shard_tokens);
    let (mut train_docs, mut val_docs, mut index) = (0u64, 0u64, 0u64);
    let mut bytes_read = 0u64;
    let mut batch: Vec<Document> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut failure: Option<Error> = None;
    // Whether the document being written goes to validation; `None` before the first.
    let mut current: Option<bool> = None;
    // One id buffer per document of a batch, kept across batches: reused rather than allocated
    // anew, so the allocator's footprint does not creep up over a long run.
    let mut id_buffers: Vec<Vec<u32>> = Vec::new();
    let mut flush = |batch: &mut Vec<Document>, last: bool| -> Result<()> {
        if id_buffers.len() < batch.len() {
            id_buffers.resize_with(batch.len(), Vec::new);
        }
        id_buffers[..batch.len()]
            .par_iter_mut()
            .zip(batch.par_iter())
            .map(|(ids, d)| {
                ids.clear();
                tokenizer.encode_pieces(&d.text, |piece| {
                    ids.extend_from_slice(piece);
                    true
                })
            })
            .collect::<Result<()>>()?;
        for (doc, ids) in batch.iter().zip(&id_buffers) {
            if !doc.continued || current.is_none() {
                // A new document: the one before it ends with end-of-text.
                if let (Some(to_val), Some(eos)) = (current, tokenizer.eos()) {
                    if to_val { &mut val } else { &mut train }.write(&[eos])?;
                }
                let to_val = opts.split == SplitMode::Documents
                    && in_validation(index, opts.seed, opts.val_fraction);
                index += 1;
                if to_val {
                    val_docs += 1;
                } else {
                    train_docs += 1;
                }
                current = Some(to_val);
            }
            let to_val = current == Some(true);
            if to_val { &mut val } else { &mut train }.write(ids)?;
        }
        batch.clear();
        if last {
            if let (Some(to_val), Some(eos)) = (current, tokenizer.eos()) {
                if to_val { &mut val } else { &mut train }.write(&[eos])?;
            }
        }
        Ok(())
    };
    let corpus = corpus.in_parts_of(TOKENIZE_PART_BYTES);
    let report = corpus.for_each(|doc| {
        batch_bytes += doc.text.len();
        bytes_read += doc.text.len() as u64;
        progress(bytes_read);
        batch.push(doc);
        if batch_bytes >= opts.batch_bytes {
            batch_bytes = 0;
            if let Err(e) = flush(&mut batch, false) {
                failure = Some(e);
                return false;
            }
        }
        true
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    flush(&mut batch, true)?;
    let mut train_shards = train.finish()?;
    let mut val_shards = val.finish()?;
    if opts.split == SplitMode::Tail {
        move_tail(
            out_dir,
            &mut train_shards,
            &mut val_shards,
            opts,
            wide,
            &mut train_docs,
            &mut val_docs,
        )?;
    }
    let manifest = Manifest {
        version: 1,
        dtype: if wide { "u32" } else { "u16" }.into(),
        vocab_size,
        eos: tokenizer.eos(),
        train: train_shards,
        val: val_shards,
        train_documents: train_docs,
        val_documents: val_docs,
        split: opts.split,
        val_fraction: opts.val_fraction,
        seed: opts.seed,
        corpus: report,
    };
    if manifest.train_tokens() == 0 {
        // Nothing to train on: keep whatever dataset was there (dropping the staged outputs
        // removes them) and say why.
        drop(staged);
        return Err(Error::Invalid {
            key: "input".into(),
            value: corpus
                .files()
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            allowed: format!(
                "text to tokenize; this input gave no training tokens ({})",
                manifest.corpus.summary()
            ),
        });
    }
    tokenizer.save(&out_dir.join("tokenizer.json"))?;
    let path = out_dir.join("manifest.json");
    let json = serde_json::to_string_pretty(&manifest).expect("manifests serialise");
    std::fs::write(&path, json).map_err(io_err(&path))?;
    staged.commit()?;
    Ok(TokenizeSummary {
        manifest,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Whether a file name is part of a tokenized dataset (shards, manifest, tokenizer).
fn dataset_file(name: &str) -> bool {
    name == "manifest.json"
        || name == "tokenizer.json"
        || ((name.starts_with("train-") || name.starts_with("val-")) && name.ends_with(".bin"))
}

/// Moves the last `val_fraction` of the training tokens into validation shards (the tail split).
fn move_tail(
    dir: &Path,
    train: &mut Vec<ShardInfo>,
    val: &mut Vec<ShardInfo>,
    opts: &TokenizeOptions,
    wide: bool,
    train_docs: &mut u64,
    val_docs: &mut u64,
) -> Result<()> {
    let total: u64 = train.iter().map(|s| s.tokens).sum();
    let keep = ((total as f64) * (1.0 - opts.val_fraction)) as u64;
    let width = if wide { 4 } else { 2 };
    let mut writer = ShardWriter::new(dir, "val", wide, opts.shard_tokens);
    let mut offset = 0u64;
    let mut kept = Vec::new();
    for shard in train.drain(..) {
        let path = dir.join(&shard.file);
        let local_keep = keep.saturating_sub(offset).min(shard.tokens);
        if local_keep < shard.tokens {
            // Streamed a chunk at a time, so memory does not grow with the shard.
            use std::io::{Read, Seek, SeekFrom};
            const CHUNK: usize = 1 << 18;
            let head_len = local_keep * width;
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io_err(&path))?;
            file.seek(SeekFrom::Start(head_len))
                .map_err(io_err(&path))?;
            let mut bytes = vec![0u8; CHUNK];
            let mut ids = vec![0u32; CHUNK / width as usize];
            loop {
                let n = read_full(&mut file, &mut bytes).map_err(io_err(&path))?;
                if n == 0 {
                    break;
                }
                let count = n / width as usize;
                decode_ids(&bytes[..n], wide, &mut ids[..count]);
                writer.write(&ids[..count])?;
            }
            if local_keep == 0 {
                drop(file);
                std::fs::remove_file(&path).map_err(io_err(&path))?;
            } else {
                file.set_len(head_len).map_err(io_err(&path))?;
                file.seek(SeekFrom::Start(0)).map_err(io_err(&path))?;
                let mut hash = xxhash_rust::xxh3::Xxh3::new();
                let mut left = head_len as usize;
                while left > 0 {
                    let n = left.min(CHUNK);
                    file.read_exact(&mut bytes[..n]).map_err(io_err(&path))?;
                    hash.update(&bytes[..n]);
                    left -= n;
                }
                file.sync_all().map_err(io_err(&path))?;
                kept.push(ShardInfo {
                    file: shard.file.clone(),
                    tokens: local_keep,
                    xxh3: hex(hash.digest()),
                });
            }
        } else {
            kept.push(shard.clone());
        }
        offset += shard.tokens;
    }
    *train = kept;
    *val = writer.finish()?;
    // Documents are not tracked through the cut; count the split by token share instead.
    let docs = *train_docs + *val_docs;
    *val_docs = ((docs as f64) * opts.val_fraction).round() as u64;
    *train_docs = docs - *val_docs;
    Ok(())
}

/// One split of a tokenized corpus, memory-mapped and verified against its manifest.
pub struct ShardSet {
    maps: Vec<memmap2::Mmap>,
    starts: Vec<u64>,
    total: u64,
    wide: bool,
}

impl ShardSet {
    /// Opens split `train` or `val` of the corpus in `dir`, checking each shard's size and
    /// checksum (a truncated or altered shard is reported by name).
    pub fn open(dir: &Path, manifest: &Manifest, split: &str) -> Result<ShardSet> {
        let shards = match split {
            "train" => &manifest.train,
            "val" => &manifest.val,
            _ => {
                return Err(Error::Invalid {
                    key: "split".into(),
                    value: split.into(),
                    allowed: "train or val".into(),
                })
            }
        };
        let wide = match manifest.dtype.as_str() {
            "u16" => false,
            "u32" => true,
            other => {
                return Err(Error::Format {
                    path: dir.join("manifest.json"),
                    reason: format!("dtype {other:?} is neither u16 nor u32"),
                })
            }
        };
        let width = if wide { 4 } else { 2 };
        let mut maps = Vec::new();
        let mut starts = Vec::new();
        let mut total = 0u64;
        for s in shards {
            let path = dir.join(&s.file);
            let file = File::open(&path).map_err(io_err(&path))?;
            // Safety: shards are written once and never modified while a run reads them.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(&path))?;
            if map.len() as u64 != s.tokens * width {
                return Err(Error::Format {
                    path,
                    reason: format!(
                        "holds {} bytes but the manifest says {} tokens of {width} bytes: \
                         truncated or replaced; tokenize the corpus again",
                        map.len(),
                        s.tokens
                    ),
                });
            }
            let digest = hex(xxhash_rust::xxh3::xxh3_64(&map));
            if digest != s.xxh3 {
                return Err(Error::Format {
                    path,
                    reason: format!(
                        "checksum {digest} differs from the manifest's {}: the file is corrupted",
                        s.xxh3
                    ),
                });
            }
            starts.push(total);
            total += s.tokens;
            maps.push(map);
        }
        Ok(ShardSet {
            maps,
            starts,
            total,
            wide,
        })
    }

    /// Tokens in the split.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// Whether the split is empty.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Fills `out` with the tokens starting at `start` (shards read as one stream).
    ///
    /// # Panics
    /// When the range runs past the end.
    pub fn read(&self, start: u64, out: &mut [u32]) {
        assert!(
            start + out.len() as u64 <= self.total,
            "read past the split"
        );
        let mut pos = start;
        let mut filled = 0;
        while filled < out.len() {
            let shard = self.starts.partition_point(|&s| s <= pos) - 1;
            let local = (pos - self.starts[shard]) as usize;
            let map = &self.maps[shard];
            let width = if self.wide { 4 } else { 2 };
            let avail = map.len() / width - local;
            let take = avail.min(out.len() - filled);
            let bytes = &map[local * width..(local + take) * width];
            decode_ids(bytes, self.wide, &mut out[filled..filled + take]);
            filled += take;
            pos += take as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::CorpusOptions;

    fn corpus_dir(docs: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (i, d) in docs.iter().enumerate() {
            std::fs::write(dir.path().join(format!("{i:03}.txt")), d).unwrap();
        }
        dir
    }

    /// A corpus of `docs`, their character tokenizer, and a tail split of 10% into shards of 7
    /// tokens (several shards, and a cut inside one) encoded in batches of 5 bytes.
    fn three_documents(docs: &[&str]) -> (tempfile::TempDir, Corpus, Tokenizer, TokenizeOptions) {
        let src = corpus_dir(docs);
        let corpus = Corpus::new(&[src.path().to_path_buf()], CorpusOptions::default()).unwrap();
        let tok = Tokenizer::train_chars(docs.iter()).unwrap();
        let opts = TokenizeOptions {
            val_fraction: 0.1,
            split: SplitMode::Tail,
            shard_tokens: 7,
            batch_bytes: 5,
            ..Default::default()
        };
        (src, corpus, tok, opts)
    }

    fn all(set: &ShardSet) -> Vec<u32> {
        let mut v = vec![0; set.len() as usize];
        set.read(0, &mut v);
        v
    }

    #[test]
    fn tail_split_matches_a_cut_of_the_concatenation() {
        let docs = ["abcdefghij", "klmnopqrst", "uvwxyz"];
        let (_src, corpus, tok, opts) = three_documents(&docs);
        let out = tempfile::tempdir().unwrap();
        let summary = tokenize(&corpus, &tok, out.path(), &opts, &mut |_| {}).unwrap();
        let m = Manifest::load(out.path()).unwrap();
        assert_eq!(m.dtype, "u16");
        assert_eq!(summary.manifest.train_tokens(), 23); // int(26 · 0.9)
        assert_eq!(m.val_tokens(), 3);
        let text: String = docs.concat();
        let expect = tok.encode(&text).unwrap();
        let train = ShardSet::open(out.path(), &m, "train").unwrap();
        let val = ShardSet::open(out.path(), &m, "val").unwrap();
        assert_eq!(all(&train), expect[..23]);
        assert_eq!(all(&val), expect[23..]);
        // Reads spanning shard boundaries.
        let mut w = [0u32; 9];
        train.read(5, &mut w);
        assert_eq!(w, expect[5..14]);
        let back = Tokenizer::load(&out.path().join("tokenizer.json")).unwrap();
        assert_eq!(back.decode(&all(&val)).unwrap(), "xyz");
    }

    #[test]
    fn a_document_longer_than_a_part_is_one_document_of_the_dataset() {
        // Lines, indentation and runs of blank lines, where a cut at a line end would change
        // byte-level BPE's pre-tokens ("\n    x" is "\n   " + " x" whole).
        let long: String = (0..(TOKENIZE_PART_BYTES * 5 / 2) / 16)
            .map(|i| {
                format!(
                    "{:07}\n{}x{}\n",
                    i % 9_999_991,
                    " ".repeat(i % 5),
                    "\n".repeat(i % 3)
                )
            })
            .collect();
        let docs = [long.as_str(), "after"];
        let src = corpus_dir(&docs);
        let corpus = Corpus::new(&[src.path().to_path_buf()], CorpusOptions::default()).unwrap();
        let tok = Tokenizer::train_bpe(docs.iter(), 300, false).unwrap();
        let eos = tok.eos().unwrap();
        let opts = TokenizeOptions {
            val_fraction: 0.0,
            batch_bytes: TOKENIZE_PART_BYTES,
            ..Default::default()
        };
        let out = tempfile::tempdir().unwrap();
        let s = tokenize(&corpus, &tok, out.path(), &opts, &mut |_| {}).unwrap();
        assert_eq!(s.manifest.train_documents, 2);
        assert_eq!(s.manifest.corpus.documents, 2);
        let set = ShardSet::open(out.path(), &s.manifest, "train").unwrap();
        let mut expect = tok.encode(&long).unwrap();
        expect.push(eos);
        expect.extend(tok.encode("after").unwrap());
        expect.push(eos);
        let mut got = vec![0u32; expect.len()];
        assert_eq!(set.len(), expect.len() as u64);
        set.read(0, &mut got);
        assert_eq!(
            got, expect,
            "the parts joined, with no end-of-text between them"
        );
    }

    #[test]
    fn a_retokenization_stopped_midway_leaves_the_old_dataset_whole() {
        let docs = ["abcdefghij", "klmnopqrst", "uvwxyz"];
        let (_src, corpus, tok, opts) = three_documents(&docs);
        let out = tempfile::tempdir().unwrap();
        tokenize(&corpus, &tok, out.path(), &opts, &mut |_| {}).unwrap();
        std::fs::write(out.path().join("notes.txt"), "mine").unwrap();
        let before =
            all(
                &ShardSet::open(out.path(), &Manifest::load(out.path()).unwrap(), "train").unwrap(),
            );
        // A second run into the same directory dies after its first document (a kill, a full
        // disk): the old dataset still opens, checksums and all.
        let other = Tokenizer::train_chars(["0abcdefghijklmnopqrstuvwxyz"].iter()).unwrap();
        let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tokenize(&corpus, &other, out.path(), &opts, &mut |_| {
                panic!("killed")
            })
        }));
        assert!(died.is_err());
        let m = Manifest::load(out.path()).unwrap();
        assert_eq!(
            all(&ShardSet::open(out.path(), &m, "train").unwrap()),
            before
        );
        // A run that finishes replaces the dataset whole and keeps the user's other files.
        tokenize(&corpus, &other, out.path(), &opts, &mut |_| {}).unwrap();
        let m = Manifest::load(out.path()).unwrap();
        assert_ne!(
            all(&ShardSet::open(out.path(), &m, "train").unwrap()),
            before
        );
        assert_eq!(
            std::fs::read_to_string(out.path().join("notes.txt")).unwrap(),
            "mine"
        );
    }

    #[test]
    fn input_that_gives_no_tokens_is_an_error_and_keeps_the_old_dataset() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("a.jsonl"), "not json\nnor this\n").unwrap();
        let corpus = Corpus::new(&[src.path().to_path_buf()], CorpusOptions::default()).unwrap();
        let tok = Tokenizer::train_chars(["abc"].iter()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let good = corpus_dir(&["abcabcabc"]);
        let good = Corpus::new(&[good.path().to_path_buf()], CorpusOptions::default()).unwrap();
        tokenize(
            &good,
            &tok,
            out.path(),
            &TokenizeOptions::default(),
            &mut |_| {},
        )
        .unwrap();
        let e = tokenize(
            &corpus,
            &tok,
            out.path(),
            &TokenizeOptions::default(),
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("no training tokens") && e.contains("a.jsonl"),
            "{e}"
        );
        assert_eq!(Manifest::load(out.path()).unwrap().train_tokens(), 9);
    }

    #[test]
    fn document_split_is_seeded_and_keeps_every_document() {
        let docs: Vec<String> = (0..200).map(|i| format!("document number {i}. ")).collect();
        let refs: Vec<&str> = docs.iter().map(|s| s.as_str()).collect();
        let src = corpus_dir(&refs);
        let corpus = Corpus::new(&[src.path().to_path_buf()], CorpusOptions::default()).unwrap();
        let tok = Tokenizer::train_bpe(refs.iter(), 300, false).unwrap();
        let eos = tok.eos().unwrap();
        let run = |seed| {
            let out = tempfile::tempdir().unwrap();
            let opts = TokenizeOptions {
                val_fraction: 0.2,
                seed,
                batch_bytes: 100,
                ..Default::default()
            };
            tokenize(&corpus, &tok, out.path(), &opts, &mut |_| {}).unwrap();
            let m = Manifest::load(out.path()).unwrap();
            let train = all(&ShardSet::open(out.path(), &m, "train").unwrap());
            let val = all(&ShardSet::open(out.path(), &m, "val").unwrap());
            (m, train, val)
        };
        let (m, train, val) = run(7);
        assert_eq!(m.train_documents + m.val_documents, 200);
        assert!((20..=60).contains(&m.val_documents), "{}", m.val_documents);
        let n_eos = |v: &[u32]| v.iter().filter(|&&t| t == eos).count() as u64;
        assert_eq!(n_eos(&train), m.train_documents);
        assert_eq!(n_eos(&val), m.val_documents);
        let (_, train2, _) = run(7);
        assert_eq!(train, train2);
        let (_, train3, _) = run(8);
        assert_ne!(train, train3);
    }

    #[test]
    fn corrupted_and_truncated_shards_are_named() {
        let src = corpus_dir(&["some text to tokenize"]);
        let corpus = Corpus::new(&[src.path().to_path_buf()], CorpusOptions::default()).unwrap();
        let tok = Tokenizer::train_chars(["some text to tokenize"].iter()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let opts = TokenizeOptions {
            val_fraction: 0.0,
            ..Default::default()
        };
        tokenize(&corpus, &tok, out.path(), &opts, &mut |_| {}).unwrap();
        let m = Manifest::load(out.path()).unwrap();
        let path = out.path().join("train-00000.bin");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[0] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = ShardSet::open(out.path(), &m, "train")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("train-00000.bin") && err.contains("corrupted"),
            "{err}"
        );
        std::fs::write(&path, &bytes[..bytes.len() - 2]).unwrap();
        let err = ShardSet::open(out.path(), &m, "train")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("train-00000.bin") && err.contains("truncated"),
            "{err}"
        );
    }
}
