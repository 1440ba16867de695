//! Near-duplicate removal in two phases, so it scales past one machine:
//!
//! 1. [`write_signatures`]: each of n processes reads its share of the corpus files (file i goes
//!    to shard i mod n) and writes one signature file: every document's position in the corpus
//!    (file index, document index in the file), its source, its length and its MinHash
//!    signature. Any scheduler that can start n processes runs this phase.
//! 2. [`merge_signatures`]: one process reads all signature files, buckets the documents by
//!    band, verifies candidates, clusters with union-find and decides, per cluster, to keep the
//!    document that comes first in the corpus. The decision does not depend on n.
//!
//! Signature files are binary (little-endian):
//! `b"ANMH2\n"`, u32 length + JSON [`MinHashConfig`], then per document: u32 file index,
//! u64 document index, u32 source length + source bytes, u64 text bytes, k × u64 signature;
//! last, the xxHash3 of everything before it (u64). They are written to a temporary name,
//! fsynced and renamed, so a killed phase 1 leaves no partial file behind; a reader checks every
//! length against the bytes the file has before allocating, and the checksum at the end, and
//! refuses a damaged file by name.

use crate::corpus::Corpus;
use crate::minhash::{cluster, estimated_jaccard, MinHashConfig, MinHasher};
use crate::{io_err, Error, Result};
use rayon::prelude::*;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8] = b"ANMH2\n";

/// A writer that hashes what passes through it (the signature file's checksum).
struct Hashing<W> {
    inner: W,
    hash: xxhash_rust::xxh3::Xxh3,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes what passes through it.
struct HashingReader<R> {
    inner: R,
    hash: xxhash_rust::xxh3::Xxh3,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// The fields of a signature file after its magic: each length checked against the bytes left
/// before anything is read or allocated.
struct Fields<'a, R> {
    r: R,
    left: u64,
    bad: &'a dyn Fn(String) -> Error,
}

impl<R: Read> Fields<'_, R> {
    /// Exactly `N` bytes of `what`.
    fn fixed<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.fill(&mut buf, what)?;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u64> {
        Ok(u32::from_le_bytes(self.fixed(what)?) as u64)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.fixed(what)?))
    }

    /// A field of `len` bytes, refused when the file holds fewer.
    fn bytes(&mut self, len: u64, what: &str) -> Result<Vec<u8>> {
        self.check(len, what)?;
        let mut buf = vec![0u8; len as usize];
        self.fill(&mut buf, what)?;
        Ok(buf)
    }

    fn check(&self, len: u64, what: &str) -> Result<()> {
        if len > self.left {
            return Err((self.bad)(format!(
                "{what} claims {len} bytes where {} remain: truncated or damaged, not read",
                self.left
            )));
        }
        Ok(())
    }

    fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        self.check(buf.len() as u64, what)?;
        self.r
            .read_exact(buf)
            .map_err(|_| (self.bad)(format!("truncated in {what}")))?;
        self.left -= buf.len() as u64;
        Ok(())
    }
}

/// One document's record in a signature file.
#[derive(Clone, Debug, PartialEq)]
pub struct SignedDocument {
    /// Index of its file in the corpus's sorted file list.
    pub file: u32,
    /// Index of the document within its file (the JSONL line's document number; 0 for text).
    pub index: u64,
    /// Where it came from (`path` or `path:line`).
    pub source: String,
    /// Bytes of text.
    pub bytes: u64,
    /// MinHash signature.
    pub signature: Vec<u64>,
}

/// `i/n`: this process handles files i, i + n, i + 2n, …
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// 0-based index.
    pub index: usize,
    /// Number of shards.
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = Error;
    fn from_str(s: &str) -> Result<Shard> {
        let bad = || Error::Invalid {
            key: "shard".into(),
            value: s.into(),
            allowed: "i/n with 0 ≤ i < n, for example 0/4".into(),
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

/// The signature file name of a shard.
pub fn signature_file_name(shard: Shard) -> String {
    format!("signatures-{:05}-of-{:05}.bin", shard.index, shard.count)
}

/// Phase 1: signs this shard's documents of `corpus` and writes its signature file into
/// `out_dir`. Returns the file and the number of documents signed.
pub fn write_signatures(
    corpus: &Corpus,
    shard: Shard,
    config: &MinHashConfig,
    out_dir: &Path,
) -> Result<(PathBuf, u64)> {
    std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    let name = signature_file_name(shard);
    let tmp = out_dir.join(format!(".{name}.tmp"));
    let path = out_dir.join(&name);
    let count = match sign_into(corpus, shard, config, &tmp) {
        Ok(count) => count,
        Err(e) => {
            // Nothing half-written is left behind (a full disk, say).
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    crate::failpoint("signatures");
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    Ok((path, count))
}

/// Writes the signature file of [`write_signatures`] to `tmp`, synced; the documents signed.
fn sign_into(corpus: &Corpus, shard: Shard, config: &MinHashConfig, tmp: &Path) -> Result<u64> {
    let hasher = MinHasher::new(config.clone());
    let file = File::create(tmp).map_err(io_err(tmp))?;
    let mut w = Hashing {
        inner: BufWriter::new(file),
        hash: xxhash_rust::xxh3::Xxh3::new(),
    };
    let header = serde_json::to_vec(config).expect("configs serialise");
    let mut write = |bytes: &[u8]| w.write_all(bytes).map_err(io_err(tmp));
    write(MAGIC)?;
    write(&(header.len() as u32).to_le_bytes())?;
    write(&header)?;
    // Documents are signed in parallel batches and written in corpus order.
    let mut batch: Vec<(u32, u64, crate::corpus::Document)> = Vec::new();
    let mut count = 0u64;
    let mut failure = None;
    let mut flush = |batch: &mut Vec<(u32, u64, crate::corpus::Document)>,
                     w: &mut Hashing<BufWriter<File>>|
     -> Result<()> {
        let signed: Vec<Vec<u64>> = batch
            .par_iter()
            .map(|(_, _, d)| hasher.signature(&d.text))
            .collect();
        for ((file, index, doc), sig) in batch.drain(..).zip(signed) {
            let mut rec = Vec::with_capacity(24 + doc.source.len() + 8 * sig.len());
            rec.extend_from_slice(&file.to_le_bytes());
            rec.extend_from_slice(&index.to_le_bytes());
            rec.extend_from_slice(&(doc.source.len() as u32).to_le_bytes());
            rec.extend_from_slice(doc.source.as_bytes());
            rec.extend_from_slice(&(doc.text.len() as u64).to_le_bytes());
            for v in sig {
                rec.extend_from_slice(&v.to_le_bytes());
            }
            w.write_all(&rec).map_err(io_err(tmp))?;
            count += 1;
        }
        Ok(())
    };
    let mut batch_bytes = 0usize;
    corpus.for_each_in_files(
        |i| i % shard.count == shard.index,
        |file, index, doc| {
            batch_bytes += doc.text.len();
            batch.push((file as u32, index, doc));
            if batch_bytes >= 4 << 20 {
                batch_bytes = 0;
                if let Err(e) = flush(&mut batch, &mut w) {
                    failure = Some(e);
                    return false;
                }
            }
            true
        },
    )?;
    if let Some(e) = failure {
        return Err(e);
    }
    flush(&mut batch, &mut w)?;
    let checksum = w.hash.digest();
    let mut w = w.inner;
    w.write_all(&checksum.to_le_bytes()).map_err(io_err(tmp))?;
    let file = w.into_inner().map_err(|e| io_err(tmp)(e.into_error()))?;
    file.sync_all().map_err(io_err(tmp))?;
    Ok(count)
}

/// Reads one signature file, checking every length against the bytes the file holds before
/// allocating and the checksum at its end; a damaged file is refused by name.
pub fn read_signatures(path: &Path) -> Result<(MinHashConfig, Vec<SignedDocument>)> {
    let bad = |reason: String| Error::Format {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(io_err(path))?;
    let total = file.metadata().map_err(io_err(path))?.len();
    if total < (MAGIC.len() + 4 + 8) as u64 {
        return Err(bad("too short for a signature file".into()));
    }
    // Everything but the trailing checksum, hashed as it is read.
    let body = total - 8;
    let mut r = HashingReader {
        inner: BufReader::new(file).take(body),
        hash: xxhash_rust::xxh3::Xxh3::new(),
    };
    let mut magic = [0u8; 6];
    r.read_exact(&mut magic)
        .map_err(|_| bad("too short for a signature file".into()))?;
    if magic == *b"ANMH1\n" {
        return Err(bad(
            "written by an older anneal without a checksum; sign the corpus again".into(),
        ));
    }
    if magic != MAGIC {
        return Err(bad("not an anneal signature file (bad magic)".into()));
    }
    let mut f = Fields {
        r,
        left: body - MAGIC.len() as u64,
        bad: &bad,
    };
    let header_len = f.u32("the header length")?;
    let header = f.bytes(header_len, "the header")?;
    let config: MinHashConfig =
        serde_json::from_slice(&header).map_err(|e| bad(format!("bad header: {e}")))?;
    crate::minhash::check_settings(
        config.threshold,
        config.num_perm(),
        config.ngram,
        Some((config.bands, config.rows)),
    )
    .map_err(|e| bad(format!("header: {e}")))?;
    let k = config.num_perm() as u64;
    let mut docs = Vec::new();
    while f.left > 0 {
        let file = f.u32("a document's file index")? as u32;
        let index = f.u64("a document's index")?;
        let source_len = f.u32("a source length")?;
        let source = f.bytes(source_len, "a source")?;
        let bytes = f.u64("a document length")?;
        let sig = f.bytes(8 * k, "a signature")?;
        docs.push(SignedDocument {
            file,
            index,
            source: String::from_utf8_lossy(&source).into_owned(),
            bytes,
            signature: sig
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        });
    }
    let r = f.r;
    let computed = r.hash.digest();
    let mut stored = [0u8; 8];
    r.inner
        .into_inner()
        .read_exact(&mut stored)
        .map_err(io_err(path))?;
    if u64::from_le_bytes(stored) != computed {
        return Err(bad(format!(
            "checksum {:016x} differs from the recorded {:016x}: damaged, not read",
            computed,
            u64::from_le_bytes(stored)
        )));
    }
    Ok((config, docs))
}

/// Writes `clusters.jsonl` into `dir`: one line per cluster of two or more documents, as
/// [`crate::minhash::Clusters::groups`] orders them (largest first), with the kept document's
/// source, the size, and every member's source; `source(i)` names document i.
pub fn write_clusters<'s>(
    dir: &Path,
    groups: &[(u32, Vec<u32>)],
    source: impl Fn(usize) -> &'s str,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let path = dir.join("clusters.jsonl");
    let mut w = BufWriter::new(File::create(&path).map_err(io_err(&path))?);
    for (root, members) in groups {
        let line = serde_json::json!({
            "kept": source(*root as usize),
            "size": members.len(),
            "members": members.iter().map(|&m| source(m as usize)).collect::<Vec<_>>(),
        });
        writeln!(w, "{line}").map_err(io_err(&path))?;
    }
    w.flush().map_err(io_err(&path))
}

/// A document removed as a near-duplicate, and the kept document of its cluster.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Removal {
    /// The removed document.
    pub source: String,
    /// The document kept in its place (the cluster's first in corpus order).
    pub duplicate_of: String,
    /// Estimated Jaccard similarity between the two.
    pub estimated_jaccard: f64,
}

/// The outcome of phase 2.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DedupSummary {
    /// The configuration every shard used.
    pub config: MinHashConfig,
    /// Signature files merged.
    pub shards: usize,
    /// Documents seen.
    pub documents: u64,
    /// Documents kept.
    pub kept: u64,
    /// Bytes of the removed documents.
    pub removed_bytes: u64,
    /// Candidate pairs from the LSH buckets.
    pub candidates: u64,
    /// Verified near-duplicate pairs.
    pub pairs: u64,
    /// Clusters of two or more documents.
    pub clusters: u64,
    /// Sizes of the largest clusters.
    pub largest_clusters: Vec<usize>,
}

/// Phase 2: merges the signature files in `sig_dir`, clusters, and writes into `out_dir`
/// `removed.jsonl` (one [`Removal`] per removed document, in corpus order), `clusters.jsonl`
/// (clusters of two or more, largest first: the kept source and the members) and `dedup.json`
/// (the [`DedupSummary`]).
pub fn merge_signatures(sig_dir: &Path, out_dir: &Path) -> Result<DedupSummary> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(sig_dir)
        .map_err(io_err(sig_dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("signatures-") && n.ends_with(".bin"))
        })
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(Error::Invalid {
            key: "signatures".into(),
            value: sig_dir.display().to_string(),
            allowed: "a directory holding signatures-*.bin files from phase 1".into(),
        });
    }
    let mut config: Option<MinHashConfig> = None;
    let mut docs = Vec::new();
    // (shard index, shard count) of every file named as phase 1 names them.
    let mut shards: Vec<(PathBuf, usize, usize)> = Vec::new();
    for p in &paths {
        let (c, d) = read_signatures(p)?;
        if let Some(prev) = &config {
            if *prev != c {
                return Err(Error::Format {
                    path: p.clone(),
                    reason: format!(
                        "made with {c:?}, other shards with {prev:?}; sign every shard alike"
                    ),
                });
            }
        }
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let parsed = name
            .strip_prefix("signatures-")
            .and_then(|s| s.strip_suffix(".bin"))
            .and_then(|s| s.split_once("-of-"))
            .and_then(|(i, n)| Some((i.parse::<usize>().ok()?, n.parse::<usize>().ok()?)));
        if let Some((i, n)) = parsed {
            shards.push((p.clone(), i, n));
        }
        config = Some(c);
        docs.extend(d);
    }
    let config = config.expect("at least one file");
    if let Some((first, _, n)) = shards.first() {
        // Files of two phase-1 runs (different shard counts) are named, as are missing shards.
        if let Some((other, _, m)) = shards.iter().find(|s| s.2 != *n) {
            return Err(Error::Invalid {
                key: "signatures".into(),
                value: format!("{} files in {}", paths.len(), sig_dir.display()),
                allowed: format!(
                    "the shards of one phase-1 run: {} is one of {n}, {} one of {m}; remove \
                     the other run's files",
                    first.display(),
                    other.display()
                ),
            });
        }
        let missing: Vec<String> = (0..*n)
            .filter(|i| !shards.iter().any(|s| s.1 == *i))
            .map(|i| i.to_string())
            .collect();
        if !missing.is_empty() || paths.len() != *n {
            return Err(Error::Invalid {
                key: "signatures".into(),
                value: format!("{} files in {}", paths.len(), sig_dir.display()),
                allowed: format!(
                    "all {n} shards of phase 1; missing: {}",
                    if missing.is_empty() {
                        "none, but other files are there".to_string()
                    } else {
                        missing.join(", ")
                    }
                ),
            });
        }
    }
    // Corpus order, whatever the sharding.
    docs.sort_by_key(|d| (d.file, d.index));
    let hasher = MinHasher::new(config.clone());
    // Moved out of the records rather than copied: signatures are most of phase 2's memory.
    let signatures: Vec<Vec<u64>> = docs
        .iter_mut()
        .map(|d| std::mem::take(&mut d.signature))
        .collect();
    let clusters = cluster(&hasher, &signatures);
    // The outputs replace an earlier run's whole, or not at all.
    let staged = crate::Staged::new(out_dir, "dedup-tmp", |name| {
        matches!(name, "removed.jsonl" | "clusters.jsonl" | "dedup.json")
    })?;
    let out_dir = staged.path();
    let write_lines = |name: &str, lines: Vec<String>| -> Result<()> {
        let path = out_dir.join(name);
        let mut w = BufWriter::new(File::create(&path).map_err(io_err(&path))?);
        for l in lines {
            writeln!(w, "{l}").map_err(io_err(&path))?;
        }
        w.flush().map_err(io_err(&path))
    };
    let mut removed = Vec::new();
    let mut removed_bytes = 0;
    for (i, d) in docs.iter().enumerate() {
        if !clusters.is_kept(i) {
            let root = clusters.root[i] as usize;
            removed_bytes += d.bytes;
            let r = Removal {
                source: d.source.clone(),
                duplicate_of: docs[root].source.clone(),
                estimated_jaccard: estimated_jaccard(&signatures[i], &signatures[root]),
            };
            removed.push(serde_json::to_string(&r).expect("serialises"));
        }
    }
    let groups = clusters.groups();
    write_clusters(out_dir, &groups, |i| &docs[i].source)?;
    let summary = DedupSummary {
        config,
        shards: paths.len(),
        documents: docs.len() as u64,
        kept: (docs.len() - removed.len()) as u64,
        removed_bytes,
        candidates: clusters.candidates as u64,
        pairs: clusters.pairs.len() as u64,
        clusters: groups.len() as u64,
        largest_clusters: groups.iter().take(10).map(|g| g.1.len()).collect(),
    };
    write_lines("removed.jsonl", removed)?;
    let path = out_dir.join("dedup.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&summary).expect("serialises"),
    )
    .map_err(io_err(&path))?;
    staged.commit()?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::CorpusOptions;

    fn corpus(dir: &Path) -> Corpus {
        let base = "the committee met on tuesday to discuss the budget for the coming year and agreed \
                    that the library would receive new funds for books and the park would be repaired";
        let near = base.replace("tuesday", "wednesday");
        let other =
            "an entirely different text about rivers mountains and the weather in the north \
                     where winters are long and summers are short and bright";
        let lines = [
            base.to_string(),
            other.to_string(),
            near.clone(),
            base.to_string(),
        ];
        for (f, chunk) in lines.chunks(2).enumerate() {
            let body: String = chunk
                .iter()
                .map(|t| serde_json::json!({ "text": t }).to_string() + "\n")
                .collect();
            std::fs::write(dir.join(format!("part{f}.jsonl")), body).unwrap();
        }
        std::fs::write(dir.join("solo.txt"), near).unwrap();
        Corpus::new(&[dir.to_path_buf()], CorpusOptions::default()).unwrap()
    }

    #[test]
    fn sharded_and_single_runs_remove_the_same_documents() {
        let src = tempfile::tempdir().unwrap();
        let corpus = corpus(src.path());
        let config = MinHashConfig::new(0.7, 128, 3, 11);
        let run = |n: usize| {
            let sigs = tempfile::tempdir().unwrap();
            for i in 0..n {
                write_signatures(&corpus, Shard { index: i, count: n }, &config, sigs.path())
                    .unwrap();
            }
            let out = tempfile::tempdir().unwrap();
            let summary = merge_signatures(sigs.path(), out.path()).unwrap();
            let removed = std::fs::read_to_string(out.path().join("removed.jsonl")).unwrap();
            (summary, removed)
        };
        let (one, removed_one) = run(1);
        let (three, removed_three) = run(3);
        assert_eq!(removed_one, removed_three);
        assert_eq!(one.documents, 5);
        assert_eq!(one.kept, 2, "{removed_one}");
        assert_eq!(three.shards, 3);
        let first: Removal = serde_json::from_str(removed_one.lines().next().unwrap()).unwrap();
        assert!(first.duplicate_of.ends_with("part0.jsonl:1"), "{first:?}");
    }

    #[test]
    fn damaged_signature_files_are_refused_without_allocating() {
        let src = tempfile::tempdir().unwrap();
        let corpus = corpus(src.path());
        let config = MinHashConfig::new(0.7, 64, 3, 11);
        let sigs = tempfile::tempdir().unwrap();
        let one = Shard { index: 0, count: 1 };
        let (path, n) = write_signatures(&corpus, one, &config, sigs.path()).unwrap();
        let (back, docs) = read_signatures(&path).unwrap();
        assert_eq!((back, docs.len() as u64), (config.clone(), n));
        let good = std::fs::read(&path).unwrap();
        let err = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            read_signatures(&path).unwrap_err().to_string()
        };
        // Any flipped bit in the records is caught by the checksum.
        for at in [good.len() / 2, good.len() - 20, good.len() - 1] {
            let mut b = good.clone();
            b[at] ^= 0x10;
            let e = err(&b);
            assert!(
                e.contains(&path.display().to_string()) && e.contains("damaged"),
                "{e}"
            );
        }
        // Lengths past the file's end are refused before anything is allocated.
        let mut b = good.clone();
        b[6..10].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        assert!(err(&b).contains("claims 4294967280 bytes"), "{}", err(&b));
        // A header asking for 10⁵ × 10⁵ hashes is refused by its settings.
        let huge = serde_json::to_vec(&MinHashConfig {
            bands: 100_000,
            rows: 100_000,
            ..config.clone()
        })
        .unwrap();
        let mut b = MAGIC.to_vec();
        b.extend((huge.len() as u32).to_le_bytes());
        b.extend(&huge);
        b.extend(0u64.to_le_bytes());
        assert!(err(&b).contains("not allowed: 1 to 65536"), "{}", err(&b));
        assert!(
            err(&good[..good.len() - 3]).contains("damaged")
                || err(&good[..good.len() - 3]).contains("truncated")
        );
    }

    #[test]
    fn missing_shards_and_bad_files_are_named() {
        let src = tempfile::tempdir().unwrap();
        let corpus = corpus(src.path());
        let config = MinHashConfig::new(0.7, 64, 3, 11);
        let sigs = tempfile::tempdir().unwrap();
        let (path, _) =
            write_signatures(&corpus, "0/2".parse().unwrap(), &config, sigs.path()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let err = merge_signatures(sigs.path(), out.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing: 1"), "{err}");
        // A file left from a run with another shard count is named as such.
        write_signatures(&corpus, "0/3".parse().unwrap(), &config, sigs.path()).unwrap();
        let err = merge_signatures(sigs.path(), out.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("one of 2") && err.contains("one of 3"),
            "{err}"
        );
        std::fs::remove_file(sigs.path().join("signatures-00000-of-00003.bin")).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let err = read_signatures(&path).unwrap_err().to_string();
        assert!(
            err.contains("truncated") && err.contains("signatures-00000-of-00002.bin"),
            "{err}"
        );
        assert!("3/2".parse::<Shard>().is_err());
        assert!("1/2".parse::<Shard>().is_ok());
    }
}
