//! Streaming corpus reading.
//!
//! A corpus is a list of files and directories. Directories are walked recursively in sorted
//! order (so every run sees the same documents in the same order) and their files kept when the
//! name, after an optional `.gz` or `.zst` suffix, ends in one of the chosen extensions. Files
//! given by name are always read.
//!
//! - A text file is one document. Lines that are not valid UTF-8 are dropped and reported.
//! - A JSONL file (`.jsonl`, `.json`) holds one document per line, its text in a configurable
//!   field. Lines that are not JSON objects with a string in that field are reported.
//!
//! A document longer than [`CorpusOptions::max_document_bytes`] is handed on in parts of at most
//! that size, cut before a space where there is one ([`piece_end`]); every part after the first
//! is marked [`Document::continued`], so a consumer that needs the whole text (tokenization,
//! which puts no end-of-text token between parts) can join them. A text file is read a bounded
//! piece at a time, a single line of any length included, so memory stays bounded whatever the
//! corpus holds; a JSONL line is parsed whole.

use crate::{io_err, Error, Result};
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// How a file's content is split into documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Decide by extension: `.jsonl` / `.json` are JSONL, anything else is text.
    Auto,
    /// The whole file is one document.
    Text,
    /// One JSON object per line.
    Jsonl,
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Format> {
        match s {
            "auto" => Ok(Format::Auto),
            "text" => Ok(Format::Text),
            "jsonl" => Ok(Format::Jsonl),
            _ => Err(Error::Invalid {
                key: "format".into(),
                value: s.into(),
                allowed: "one of auto, text, jsonl".into(),
            }),
        }
    }
}

/// What to read from a corpus.
#[derive(Clone, Debug)]
pub struct CorpusOptions {
    /// File extensions kept when walking directories, without the dot (`txt`, `rs`, `jsonl`).
    /// Empty keeps every file.
    pub extensions: Vec<String>,
    /// How files become documents.
    pub format: Format,
    /// The JSONL field holding the text.
    pub text_field: String,
    /// Drop documents whose text is byte-identical to one seen before.
    pub dedup_exact: bool,
    /// Stop after this many bytes of document text (`None`: read everything).
    pub max_bytes: Option<u64>,
    /// A document larger than this is handed on in parts of at most this size (64 MiB by
    /// default; at least 64 bytes), so that no single file or line has to fit in memory. Text
    /// files are cut at line ends where they can be, and otherwise (a line longer than this)
    /// before a space ([`piece_end`]).
    pub max_document_bytes: usize,
}

impl Default for CorpusOptions {
    fn default() -> Self {
        CorpusOptions {
            extensions: vec!["txt".into(), "md".into(), "jsonl".into()],
            format: Format::Auto,
            text_field: "text".into(),
            dedup_exact: false,
            max_bytes: None,
            max_document_bytes: 64 << 20,
        }
    }
}

/// One document and where it came from.
#[derive(Clone, Debug)]
pub struct Document {
    /// The file, with `:line` for JSONL documents.
    pub source: String,
    /// Its text.
    pub text: String,
    /// Whether this continues the document before it: a part, after the first, of a document
    /// longer than [`CorpusOptions::max_document_bytes`].
    pub continued: bool,
}

/// Where to end a piece of at most `max` bytes (at least 4) of the text `text`, so that the pieces
/// of a long text can be processed one at a time: `text.len()` when it fits; else just before
/// the last newline, or failing that the last ASCII whitespace byte (in the second half of the
/// piece) that a printable ASCII byte follows,
/// so the next piece begins with that whitespace (GPT-2's pre-tokenisation, Radford et al.
/// 2019, attaches a space to the word after it, so byte-level BPE encodes the pieces as it
/// would the whole); failing that, the last UTF-8 character boundary. Never 0 for a non-empty
/// `text` and `max >= 4`.
pub fn piece_end(text: &[u8], max: usize) -> usize {
    let max = max.max(4);
    if text.len() <= max {
        return text.len();
    }
    // A line end first (parts then end where lines do), then any whitespace.
    for newline_only in [true, false] {
        for p in (max / 2..max).rev() {
            let cut = if newline_only {
                text[p] == b'\n'
            } else {
                text[p].is_ascii_whitespace()
            };
            if p > 0 && cut && text[p + 1].is_ascii_graphic() {
                return p;
            }
        }
    }
    let mut p = max;
    while p > 0 && (text[p] & 0xC0) == 0x80 {
        p -= 1;
    }
    if p == 0 {
        max
    } else {
        p
    }
}

/// One piece of input that was skipped.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BadInput {
    /// The file.
    pub path: PathBuf,
    /// The 1-based line, when the problem is on one line.
    pub line: Option<u64>,
    /// What is wrong with it.
    pub reason: String,
}

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}", self.path.display(), self.reason),
            None => write!(f, "{}: {}", self.path.display(), self.reason),
        }
    }
}

/// Counts from one pass over a corpus.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct CorpusReport {
    /// Files opened.
    pub files: u64,
    /// Documents produced.
    pub documents: u64,
    /// Bytes of document text produced.
    pub bytes: u64,
    /// Documents dropped as exact duplicates.
    pub duplicates: u64,
    /// Skipped lines and files, all of them counted here.
    pub bad_count: u64,
    /// The first [`CorpusReport::MAX_LISTED`] of them, with file and line.
    pub bad: Vec<BadInput>,
}

impl CorpusReport {
    /// How many bad inputs are listed individually.
    pub const MAX_LISTED: usize = 50;

    fn bad(&mut self, path: &Path, line: Option<u64>, reason: String) {
        self.bad_count += 1;
        if self.bad.len() < Self::MAX_LISTED {
            self.bad.push(BadInput {
                path: path.to_path_buf(),
                line,
                reason,
            });
        }
    }

    /// A human summary: counts, then each listed bad input on its own line.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} files, {} documents, {:.1} MB",
            self.files,
            self.documents,
            self.bytes as f64 / 1e6
        );
        if self.duplicates > 0 {
            s += &format!(", {} exact duplicates dropped", self.duplicates);
        }
        if self.bad_count > 0 {
            s += &format!("; {} bad inputs skipped:", self.bad_count);
            for b in &self.bad {
                s += &format!("\n  {b}");
            }
            if self.bad_count as usize > self.bad.len() {
                s += &format!(
                    "\n  … and {} more",
                    self.bad_count as usize - self.bad.len()
                );
            }
        }
        s
    }
}

/// A corpus: the files to read and how to read them.
#[derive(Clone, Debug)]
pub struct Corpus {
    files: Vec<PathBuf>,
    options: CorpusOptions,
}

fn strip_compression(name: &str) -> &str {
    name.strip_suffix(".gz")
        .or_else(|| name.strip_suffix(".zst"))
        .unwrap_or(name)
}

fn walk(dir: &Path, opts: &CorpusOptions, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            walk(&path, opts, out)?;
        } else if path.is_file() {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let name = strip_compression(name);
            let keep = opts.extensions.is_empty()
                || opts.extensions.iter().any(|e| {
                    name.len() > e.len() + 1
                        && name.ends_with(e.as_str())
                        && name.as_bytes()[name.len() - e.len() - 1] == b'.'
                });
            if keep {
                out.push(path);
            }
        }
    }
    Ok(())
}

/// Whether `path` is read through a decompressor.
fn compressed(path: &Path) -> bool {
    let name = path.to_string_lossy();
    name.ends_with(".gz") || name.ends_with(".zst")
}

/// Decompresses all of `path` without keeping anything, so a damaged stream (a failed checksum,
/// a truncation) is found before any of its documents is handed on: a decompressor reports such
/// damage only when it reaches it, after the documents before it have been decoded.
fn check_stream(path: &Path) -> std::result::Result<(), String> {
    let mut reader = open(path).map_err(|e| e.to_string())?;
    std::io::copy(&mut reader, &mut std::io::sink())
        .map(|_| ())
        .map_err(|e| format!("damaged compressed stream ({e}); none of its documents is used"))
}

/// Opens a file, decompressing `.gz` and `.zst` transparently.
pub fn open(path: &Path) -> Result<Box<dyn Read + Send>> {
    let file = File::open(path).map_err(io_err(path))?;
    let name = path.to_string_lossy();
    Ok(if name.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(file)))
    } else if name.ends_with(".zst") {
        Box::new(zstd::stream::read::Decoder::new(file).map_err(io_err(path))?)
    } else {
        Box::new(file)
    })
}

impl Corpus {
    /// The corpus under `paths` (files or directories). Fails when a path does not exist or
    /// nothing matches.
    pub fn new(paths: &[PathBuf], options: CorpusOptions) -> Result<Corpus> {
        let mut files = Vec::new();
        for p in paths {
            if p.is_dir() {
                walk(p, &options, &mut files)?;
            } else if p.is_file() {
                files.push(p.clone());
            } else {
                return Err(Error::Io {
                    path: p.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no such file or directory",
                    ),
                });
            }
        }
        if files.is_empty() {
            return Err(Error::Invalid {
                key: "data".into(),
                value: paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                allowed: format!(
                    "a file, or a directory holding files with extensions {:?}",
                    options.extensions
                ),
            });
        }
        Ok(Corpus { files, options })
    }

    /// The files that will be read, in order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Puts the files in a seeded pseudo-random order (by a hash of each path), so that a byte
    /// budget samples the whole tree instead of its alphabetically first directories.
    pub fn shuffle_files(&mut self, seed: u64) {
        self.files.sort_by_cached_key(|p| {
            xxhash_rust::xxh3::xxh3_64_with_seed(p.to_string_lossy().as_bytes(), seed)
        });
    }

    /// This corpus with documents handed on in parts of at most `bytes` (or the smaller size it
    /// already has): for consumers that stream a document's parts and want memory bounded by
    /// `bytes`, not by the longest document.
    pub fn in_parts_of(&self, bytes: usize) -> Corpus {
        let mut c = self.clone();
        c.options.max_document_bytes = c.options.max_document_bytes.min(bytes);
        c
    }

    /// Keeps only the files for which `keep` is true.
    pub fn retain_files(&mut self, keep: impl FnMut(&PathBuf) -> bool) {
        self.files.retain(keep);
    }

    /// Reads every document in order, handing each to `f`; `f` returns `false` to stop early.
    /// Bad input is skipped and counted in the returned report.
    pub fn for_each(&self, mut f: impl FnMut(Document) -> bool) -> Result<CorpusReport> {
        self.for_each_in_files(|_| true, |_, _, doc| f(doc))
    }

    /// Reads the documents of the files whose index `select` accepts, handing each to `f` with
    /// its file's index in [`Corpus::files`] and its place in the file (the line number for
    /// JSONL, 0 for a text file); `f` returns `false` to stop early.
    pub fn for_each_in_files(
        &self,
        select: impl Fn(usize) -> bool,
        mut f: impl FnMut(usize, u64, Document) -> bool,
    ) -> Result<CorpusReport> {
        let mut report = CorpusReport::default();
        let mut seen = HashSet::new();
        let opts = &self.options;
        let max_part = opts.max_document_bytes.max(64);
        // Whether the document before was dropped, so that a part continuing it is not joined
        // to the one before that.
        let mut dropped = false;
        let mut emit =
            |file: usize, index: u64, doc: Document, report: &mut CorpusReport| -> bool {
                if doc.text.is_empty() {
                    return true;
                }
                if opts.dedup_exact
                    && !seen.insert(xxhash_rust::xxh3::xxh3_128(doc.text.as_bytes()))
                {
                    report.duplicates += 1;
                    dropped = true;
                    return true;
                }
                if let Some(max) = opts.max_bytes {
                    if report.bytes >= max {
                        return false;
                    }
                }
                let continued = doc.continued && !dropped;
                dropped = false;
                report.documents += u64::from(!continued);
                report.bytes += doc.text.len() as u64;
                if doc.text.len() <= max_part {
                    return f(file, index, Document { continued, ..doc });
                }
                // A JSONL or Parquet document longer than a part.
                let mut rest = doc.text.as_str();
                let mut first = true;
                while !rest.is_empty() {
                    let end = piece_end(rest.as_bytes(), max_part);
                    let part = Document {
                        source: doc.source.clone(),
                        text: rest[..end].to_string(),
                        continued: continued || !first,
                    };
                    if !f(file, index, part) {
                        return false;
                    }
                    rest = &rest[end..];
                    first = false;
                }
                true
            };
        'files: for (file_index, path) in self.files.iter().enumerate() {
            if !select(file_index) {
                continue;
            }
            report.files += 1;
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let jsonl = match opts.format {
                Format::Jsonl => true,
                Format::Text => false,
                Format::Auto => {
                    let n = strip_compression(name);
                    n.ends_with(".jsonl") || n.ends_with(".json")
                }
            };
            if strip_compression(name).ends_with(".parquet") {
                let mut stop = false;
                read_parquet(
                    path,
                    &opts.text_field,
                    &mut report,
                    |number, text, report| {
                        let doc = Document {
                            source: format!("{}:{number}", path.display()),
                            text,
                            continued: false,
                        };
                        stop = !emit(file_index, number, doc, report);
                        !stop
                    },
                );
                if stop {
                    break 'files;
                }
                continue;
            }
            if compressed(path) {
                if let Err(reason) = check_stream(path) {
                    report.bad(path, None, reason);
                    continue;
                }
            }
            let reader = match open(path) {
                Ok(r) => r,
                Err(e) => {
                    report.bad(path, None, e.to_string());
                    continue;
                }
            };
            if jsonl {
                let read_all = for_each_line(
                    reader,
                    path,
                    &mut report,
                    usize::MAX,
                    |number, line, report| {
                        if line.iter().all(|b| b.is_ascii_whitespace()) {
                            return true;
                        }
                        match json_text(line, &opts.text_field) {
                            Ok(text) => {
                                let doc = Document {
                                    source: format!("{}:{number}", path.display()),
                                    text,
                                    continued: false,
                                };
                                emit(file_index, number, doc, report)
                            }
                            Err(reason) => {
                                report.bad(path, Some(number), reason);
                                true
                            }
                        }
                    },
                );
                if !read_all {
                    break;
                }
            } else {
                // A file up to `max_document_bytes` is one document; a larger one is handed on
                // in parts of at most that size, cut at line ends (or inside a longer line), so
                // memory stays bounded whatever one file or line holds.
                let mut text = String::new();
                let mut part = 0u64;
                // Emits the first `end` bytes of `text` as the next part (all of it when `end`
                // is its length) and keeps the rest for the part after.
                let mut emit_part = |text: &mut String, end: usize, report: &mut CorpusReport| {
                    let source = if part == 0 {
                        path.display().to_string()
                    } else {
                        format!("{}#part{part}", path.display())
                    };
                    let rest = text.split_off(end);
                    // A file that needs a second part is long: the next part is allocated at
                    // its full size at once, not grown, so memory is reused part after part.
                    let next = if rest.is_empty() {
                        String::new()
                    } else {
                        let mut next = String::with_capacity(2 * max_part);
                        next.push_str(&rest);
                        next
                    };
                    let doc = Document {
                        source,
                        text: std::mem::replace(text, next),
                        continued: part > 0,
                    };
                    part += 1;
                    emit(file_index, part - 1, doc, report)
                };
                let read_all = for_each_line(
                    reader,
                    path,
                    &mut report,
                    max_part,
                    |number, line, report| {
                        let line = match std::str::from_utf8(line) {
                            Ok(l) => l,
                            Err(e) => {
                                report.bad(
                                    path,
                                    Some(number),
                                    format!(
                                        "invalid UTF-8 at byte {} of the line",
                                        e.valid_up_to()
                                    ),
                                );
                                return true;
                            }
                        };
                        text.push_str(line);
                        // Cut where byte-level BPE would split the text anyway (before a
                        // newline or space that a word follows, [`piece_end`]), so the parts,
                        // joined by tokenization, encode as the whole file would.
                        while text.len() > max_part {
                            let end = piece_end(text.as_bytes(), max_part);
                            if !emit_part(&mut text, end, report) {
                                return false;
                            }
                        }
                        true
                    },
                );
                let end = text.len();
                if !read_all || (!text.is_empty() && !emit_part(&mut text, end, &mut report)) {
                    break;
                }
            }
        }
        Ok(report)
    }
}

/// Reads the string column `field` of every row of a Parquet file, calling `emit(row, text)` (1-based
/// rows) until it returns false; rows without a string in `field` are reported.
#[cfg(feature = "parquet")]
fn read_parquet(
    path: &Path,
    field: &str,
    report: &mut CorpusReport,
    mut emit: impl FnMut(u64, String, &mut CorpusReport) -> bool,
) {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    let reader = match File::open(path)
        .map_err(|e| e.to_string())
        .and_then(|f| SerializedFileReader::new(f).map_err(|e| e.to_string()))
    {
        Ok(r) => r,
        Err(e) => {
            report.bad(path, None, format!("not a readable Parquet file: {e}"));
            return;
        }
    };
    let rows = match reader.get_row_iter(None) {
        Ok(rows) => rows,
        Err(e) => {
            report.bad(path, None, format!("Parquet: {e}"));
            return;
        }
    };
    for (i, row) in rows.enumerate() {
        let number = i as u64 + 1;
        let row = match row {
            Ok(r) => r,
            Err(e) => {
                report.bad(path, Some(number), format!("Parquet row: {e}"));
                continue;
            }
        };
        let text = row
            .get_column_iter()
            .find(|(name, _)| name.as_str() == field);
        match text {
            Some((_, Field::Str(s))) => {
                if !emit(number, s.clone(), report) {
                    return;
                }
            }
            Some((_, Field::Null)) => {
                report.bad(path, Some(number), format!("field {field:?} is null"))
            }
            Some(_) => report.bad(
                path,
                Some(number),
                format!("field {field:?} is not a string"),
            ),
            None => report.bad(path, Some(number), format!("no field {field:?}")),
        }
    }
}

#[cfg(not(feature = "parquet"))]
fn read_parquet(
    path: &Path,
    _field: &str,
    report: &mut CorpusReport,
    _emit: impl FnMut(u64, String, &mut CorpusReport) -> bool,
) {
    report.bad(
        path,
        None,
        "Parquet support is not built in; build anneal with `--features parquet`".into(),
    );
}

/// Reads `reader` line by line (newline kept), calling `f(number, line, report)` with 1-based
/// line numbers until it returns false; a line longer than `max` bytes is handed on in pieces
/// ([`piece_end`]) under its one number, so no more than `max` bytes are held. A read error is
/// reported at its line and ends the file. Returns false when `f` stopped the reading.
fn for_each_line(
    reader: impl Read,
    path: &Path,
    report: &mut CorpusReport,
    max: usize,
    mut f: impl FnMut(u64, &[u8], &mut CorpusReport) -> bool,
) -> bool {
    let max = max.max(64);
    let mut reader = BufReader::with_capacity(1 << 16, reader);
    let mut line = Vec::new();
    let mut number = 0u64;
    // Whether `line` holds the rest of a line whose first piece was already handed on.
    let mut counted = false;
    loop {
        let buf = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                report.bad(path, Some(number + 1), format!("read error: {e}"));
                return true;
            }
        };
        if buf.is_empty() {
            if line.is_empty() {
                return true;
            }
            number += u64::from(!counted);
            return f(number, &line, report);
        }
        let take = buf.len().min(max - line.len());
        match buf[..take].iter().position(|&b| b == b'\n') {
            Some(i) => {
                line.extend_from_slice(&buf[..=i]);
                reader.consume(i + 1);
                number += u64::from(!counted);
                counted = false;
                if !f(number, &line, report) {
                    return false;
                }
                line.clear();
            }
            None => {
                line.extend_from_slice(&buf[..take]);
                reader.consume(take);
                if line.len() == max {
                    // A line longer than `max`: hand on a piece of it, keep the rest.
                    number += u64::from(!counted);
                    counted = true;
                    let end = piece_end(&line, max - 1);
                    if !f(number, &line[..end], report) {
                        return false;
                    }
                    line.drain(..end);
                }
            }
        }
    }
}

/// The string in `field` of one JSON object line.
fn json_text(line: &[u8], field: &str) -> std::result::Result<String, String> {
    let line = std::str::from_utf8(line).map_err(|e| format!("invalid UTF-8: {e}"))?;
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("malformed JSON: {e}"))?;
    match value.get(field) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!(
            "field {field:?} is not a string but {}",
            match other {
                serde_json::Value::Null => "null",
                serde_json::Value::Bool(_) => "a boolean",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::Array(_) => "an array",
                _ => "an object",
            }
        )),
        None => Err(format!("no field {field:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(path: &Path, bytes: &[u8]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    fn read_all(paths: &[PathBuf], opts: CorpusOptions) -> (Vec<Document>, CorpusReport) {
        let corpus = Corpus::new(paths, opts).unwrap();
        let mut docs = Vec::new();
        let report = corpus
            .for_each(|d| {
                docs.push(d);
                true
            })
            .unwrap();
        (docs, report)
    }

    #[test]
    fn walks_directories_in_order_filtering_by_extension() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("b/two.txt"), b"two");
        write(&dir.path().join("a/one.txt"), b"one");
        write(&dir.path().join("a/skip.bin"), b"binary");
        write(&dir.path().join("c.rs"), b"fn main() {}");
        let opts = CorpusOptions {
            extensions: vec!["txt".into(), "rs".into()],
            ..Default::default()
        };
        let (docs, report) = read_all(&[dir.path().to_path_buf()], opts);
        let texts: Vec<_> = docs.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(texts, ["one", "two", "fn main() {}"]);
        assert_eq!(report.files, 3);
        assert_eq!(report.bad_count, 0);
    }

    #[test]
    fn no_document_of_a_damaged_compressed_stream_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let body: String = (0..200)
            .map(|i| format!("{{\"text\": \"document number {i}\"}}\n"))
            .collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(body.as_bytes()).unwrap();
        let gz = gz.finish().unwrap();
        // With a content checksum, as the zstd command line writes by default.
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
        enc.include_checksum(true).unwrap();
        enc.write_all(body.as_bytes()).unwrap();
        let zst = enc.finish().unwrap();
        let mut flipped_gz = gz.clone();
        let n = flipped_gz.len();
        flipped_gz[n - 6] ^= 0x01; // in the CRC trailer: found only at the end of the stream
        let mut flipped_zst = zst.clone();
        let n = flipped_zst.len();
        flipped_zst[n / 2] ^= 0x20;
        write(&dir.path().join("a.jsonl.gz"), &flipped_gz);
        write(&dir.path().join("b.jsonl.gz"), &gz[..gz.len() * 2 / 3]);
        write(&dir.path().join("c.jsonl.zst"), &flipped_zst);
        write(&dir.path().join("d.jsonl.gz"), &gz);
        let (docs, report) = read_all(&[dir.path().to_path_buf()], CorpusOptions::default());
        // Only the intact file's 200 documents; each damaged file is named once.
        assert_eq!(docs.len(), 200, "{}", report.summary());
        assert!(docs.iter().all(|d| d.source.contains("d.jsonl.gz")));
        assert_eq!(report.bad_count, 3, "{}", report.summary());
        for f in ["a.jsonl.gz", "b.jsonl.gz", "c.jsonl.zst"] {
            assert!(report.summary().contains(f), "{}", report.summary());
        }
    }

    #[test]
    fn jsonl_gz_and_zst_with_bad_lines_counted() {
        let dir = tempfile::tempdir().unwrap();
        let body = b"{\"text\": \"first\"}\nnot json\n\n{\"content\": \"x\"}\n{\"text\": 3}\n{\"text\": \"last\"}\n\xff\xfe\n";
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(body).unwrap();
        write(&dir.path().join("d.jsonl.gz"), &gz.finish().unwrap());
        write(
            &dir.path().join("e.jsonl.zst"),
            &zstd::encode_all(&b"{\"text\": \"zst doc\"}\n"[..], 1).unwrap(),
        );
        let (docs, report) = read_all(&[dir.path().to_path_buf()], CorpusOptions::default());
        let texts: Vec<_> = docs.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(texts, ["first", "last", "zst doc"]);
        assert_eq!(
            docs[1].source,
            format!("{}:6", dir.path().join("d.jsonl.gz").display())
        );
        assert_eq!(report.bad_count, 4);
        let lines: Vec<_> = report.bad.iter().map(|b| b.line.unwrap()).collect();
        assert_eq!(lines, [2, 4, 5, 7]);
        assert!(report.bad[0].reason.contains("malformed JSON"));
        assert!(report.bad[1].reason.contains("no field \"text\""));
        assert!(report.bad[2].reason.contains("not a string"));
        assert!(report.bad[3].reason.contains("UTF-8"));
        assert!(report.summary().contains("d.jsonl.gz:2"));
    }

    #[test]
    fn invalid_utf8_lines_of_text_files_are_dropped_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("t.txt"),
            b"good line\nbad \xc3\x28 line\nlast\n",
        );
        let (docs, report) = read_all(&[dir.path().join("t.txt")], CorpusOptions::default());
        assert_eq!(docs[0].text, "good line\nlast\n");
        assert_eq!(report.bad_count, 1);
        assert_eq!(report.bad[0].line, Some(2));
    }

    #[test]
    fn huge_text_files_are_cut_at_line_ends() {
        let dir = tempfile::tempdir().unwrap();
        let body: String = (0..100).map(|i| format!("line {i:03}\n")).collect();
        write(&dir.path().join("big.txt"), body.as_bytes());
        let opts = CorpusOptions {
            max_document_bytes: 200,
            ..Default::default()
        };
        let (docs, _) = read_all(&[dir.path().to_path_buf()], opts);
        assert_eq!(docs.len(), 5, "900 bytes in parts of at most 200");
        // Cut before a line end (where byte-level BPE splits too): every later part starts one.
        assert!(docs.iter().all(|d| d.text.len() <= 200));
        assert!(docs[1..].iter().all(|d| d.text.starts_with('\n')));
        assert_eq!(
            docs.iter().map(|d| d.text.as_str()).collect::<String>(),
            body
        );
        assert!(docs[1].source.ends_with("big.txt#part1"));
    }

    #[test]
    fn a_line_longer_than_a_part_is_cut_before_spaces_and_its_parts_joined() {
        let dir = tempfile::tempdir().unwrap();
        let line: String = (0..400).map(|i| format!("word{i} ")).collect();
        let body = format!("{line}\nshort line\n{line}");
        write(&dir.path().join("long.txt"), body.as_bytes());
        let opts = CorpusOptions {
            max_document_bytes: 100,
            ..Default::default()
        };
        let (docs, report) = read_all(&[dir.path().to_path_buf()], opts);
        assert!(docs.len() > 2 * line.len() / 100, "{}", docs.len());
        assert!(docs.iter().all(|d| d.text.len() <= 100));
        // Cut only before a space (the file's line ends aside): every part but the first begins
        // with a space or follows a line end.
        for pair in docs.windows(2) {
            let b = &pair[1].text;
            assert!(b.starts_with(' ') || pair[0].text.ends_with('\n'), "{b:?}");
        }
        assert!(!docs[0].continued && docs[1..].iter().all(|d| d.continued));
        assert_eq!(
            docs.iter().map(|d| d.text.as_str()).collect::<String>(),
            body
        );
        assert_eq!(report.documents, 1, "one file, one document");
        assert_eq!(report.bytes, body.len() as u64);
    }

    #[test]
    fn a_jsonl_document_longer_than_a_part_is_handed_on_in_parts() {
        let dir = tempfile::tempdir().unwrap();
        let text = "ab ".repeat(100) + "ünï";
        let lines = format!(
            "{}\n{}\n",
            serde_json::json!({ "text": text }),
            serde_json::json!({ "text": "next" })
        );
        write(&dir.path().join("a.jsonl"), lines.as_bytes());
        let opts = CorpusOptions {
            max_document_bytes: 64,
            ..Default::default()
        };
        let (docs, report) = read_all(&[dir.path().to_path_buf()], opts);
        let (last, parts) = docs.split_last().unwrap();
        assert_eq!(
            parts.iter().map(|d| d.text.as_str()).collect::<String>(),
            text
        );
        assert!(parts[1..]
            .iter()
            .all(|d| d.continued && d.source.ends_with(":1")));
        assert!(!parts[0].continued && !last.continued && last.text == "next");
        assert_eq!(report.documents, 2);
    }

    #[test]
    fn pieces_end_before_a_space_or_at_a_character_boundary() {
        assert_eq!(piece_end(b"short", 10), 5);
        assert_eq!(piece_end(b"aaaa bbbb cccc", 12), 9, "before ' cccc'");
        // Only whitespace before a printable byte counts: "  x" is cut before its last space.
        assert_eq!(piece_end(b"aaaaaa  xxxxxx", 12), 7);
        // No space in the second half: the last character boundary.
        let text = "ab ".to_string() + &"é".repeat(20);
        let end = piece_end(text.as_bytes(), 20);
        assert!(text.is_char_boundary(end) && end > 10 && end <= 20, "{end}");
        let cjk = "日本語".repeat(10);
        let end = piece_end(cjk.as_bytes(), 16);
        assert_eq!(end, 15);
    }

    #[test]
    fn exact_duplicates_and_byte_budget() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("a.txt"), b"same");
        write(&dir.path().join("b.txt"), b"same");
        write(&dir.path().join("c.txt"), b"other");
        write(&dir.path().join("d.txt"), b"more");
        let opts = CorpusOptions {
            dedup_exact: true,
            max_bytes: Some(9),
            ..Default::default()
        };
        let (docs, report) = read_all(&[dir.path().to_path_buf()], opts);
        assert_eq!(docs.len(), 2);
        assert_eq!(report.duplicates, 1);
        assert_eq!(report.bytes, 9);
    }

    #[test]
    fn shuffled_order_is_seeded() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..20 {
            write(&dir.path().join(format!("{i:02}.txt")), b"x");
        }
        let order = |seed| {
            let mut c = Corpus::new(&[dir.path().to_path_buf()], CorpusOptions::default()).unwrap();
            c.shuffle_files(seed);
            c.files().to_vec()
        };
        assert_eq!(order(1), order(1));
        assert_ne!(order(1), order(2));
        let mut sorted = order(1);
        sorted.sort();
        assert_eq!(sorted.len(), 20);
        assert_ne!(sorted, order(1));
    }

    #[cfg(feature = "parquet")]
    #[test]
    fn parquet_text_column_rows_are_documents() {
        use parquet::data_type::{ByteArray, ByteArrayType};
        use parquet::file::writer::SerializedFileWriter;
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docs.parquet");
        let schema = Arc::new(
            parquet::schema::parser::parse_message_type(
                "message doc { REQUIRED BYTE_ARRAY text (UTF8); REQUIRED BYTE_ARRAY url (UTF8); }",
            )
            .unwrap(),
        );
        let mut w =
            SerializedFileWriter::new(File::create(&path).unwrap(), schema, Default::default())
                .unwrap();
        let mut group = w.next_row_group().unwrap();
        for values in [["first doc", "second doc"], ["http://a", "http://b"]] {
            let mut col = group.next_column().unwrap().unwrap();
            let data: Vec<ByteArray> = values.iter().map(|v| ByteArray::from(*v)).collect();
            col.typed::<ByteArrayType>()
                .write_batch(&data, None, None)
                .unwrap();
            col.close().unwrap();
        }
        group.close().unwrap();
        w.close().unwrap();
        let opts = CorpusOptions {
            extensions: vec!["parquet".into()],
            ..Default::default()
        };
        let (docs, report) = read_all(&[dir.path().to_path_buf()], opts.clone());
        let texts: Vec<_> = docs.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(texts, ["first doc", "second doc"]);
        assert!(docs[1].source.ends_with("docs.parquet:2"));
        assert_eq!(report.bad_count, 0);
        let (_, report) = read_all(
            &[path],
            CorpusOptions {
                text_field: "body".into(),
                ..opts
            },
        );
        assert_eq!(report.bad_count, 2);
        assert!(report.bad[0].reason.contains("no field \"body\""));
    }

    #[test]
    fn missing_path_and_empty_corpus_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = Corpus::new(&[missing], CorpusOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("nope") && err.contains("no such file"),
            "{err}"
        );
        let err = Corpus::new(&[dir.path().to_path_buf()], CorpusOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("extensions"), "{err}");
    }
}
