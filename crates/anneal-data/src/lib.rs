//! Text data for anneal: streaming corpus reading (directories of text files, JSONL, `.gz` and
//! `.zst`), tokenizers on the Hugging Face `tokenizers` crate (byte-level BPE training,
//! character vocabularies, GPT-2's own vocabulary), tokenized corpora stored as memory-mapped
//! binary shards with a JSON manifest, and the training batches drawn from them ([`batch`]: one
//! [`Batch`] type for every objective, one [`Sampler`] whose draws depend on the seed and the
//! step alone). The curation pipeline ([`pipeline`]) normalises, deduplicates ([`dedup`],
//! [`minhash`]), filters ([`filters`]), attaches quality signals ([`signals`]), mixes sources
//! ([`mix`]) and reports ([`report`]).
//!
//! Bad input never ends a run: invalid UTF-8 and malformed JSON lines are skipped, counted and
//! reported with their file and line ([`BadInput`]). Errors are this crate's own [`Error`],
//! naming the file or value at fault. Long work reports progress through callbacks; drawing it is
//! the binary's job.

pub mod batch;
pub mod corpus;
pub mod dedup;
pub mod filters;
pub mod minhash;
pub mod mix;
pub mod normalize;
pub mod pipeline;
pub mod report;
pub mod shards;
pub mod signals;
pub mod tokenizer;

pub use batch::{Batch, BatchSource, Sampler, Stream, TokenWindows, WindowSource};
pub use corpus::{BadInput, Corpus, CorpusOptions, CorpusReport, Document, Format};
pub use shards::{
    tokenize, Manifest, ShardInfo, ShardSet, SplitMode, TokenizeOptions, TokenizeSummary,
    TOKENIZE_PART_BYTES,
};
pub use tokenizer::Tokenizer;

use std::path::{Path, PathBuf};

/// Text shared by the unit tests of the filters, signals and pipeline.
#[cfg(test)]
pub(crate) const TEST_PROSE: &str =
    "The committee met on Tuesday to discuss the budget for the coming year. \
    After a long debate, the members agreed that the library should receive new funds, and \
    that the park near the river would be repaired before the summer. Several residents spoke \
    with passion about the value of public spaces to the town. The mayor thanked everyone for \
    their patience and promised to publish the final figures within a week. Nobody expected \
    the meeting to last so long, yet most people stayed until the end.";

/// Errors of corpus reading, tokenizers and shards. Each names the file or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A file exists but its content is not what it should be.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong and, where possible, how to fix it.
        reason: String,
    },
    /// A setting has a value that is not allowed.
    #[error("{key} = {value:?} is not allowed: {allowed}")]
    Invalid {
        /// The setting.
        key: String,
        /// Its value.
        value: String,
        /// What is allowed.
        allowed: String,
    },
    /// The tokenizers library failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A configuration key or value is not allowed.
    #[error(transparent)]
    Config(#[from] anneal_config::Error),
    /// Drawing a chart failed.
    #[error(transparent)]
    Chart(#[from] anneal_chart::Error),
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}

/// `dir`'s hidden sibling `.NAME.SUFFIX`, where a directory's replacement is written.
pub fn sibling(dir: &Path, suffix: &str) -> Result<PathBuf> {
    let name = dir.file_name().ok_or_else(|| Error::Invalid {
        key: "output directory".into(),
        value: dir.display().to_string(),
        allowed: "a directory with a name".into(),
    })?;
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    let parent = parent.unwrap_or(Path::new("."));
    Ok(parent.join(format!(".{}.{suffix}", name.to_string_lossy())))
}

/// Puts the finished directory `new` at `dest`: an existing `dest` is renamed aside (to its
/// sibling `.NAME.old`), `new` renamed into place, and the old one removed, so `dest` always
/// holds one whole version. Checkpoints, exports and tokenized datasets are written this way.
pub fn replace_dir(new: &Path, dest: &Path) -> Result<()> {
    if dest.exists() {
        let old = sibling(dest, "old")?;
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
        }
        std::fs::rename(dest, &old).map_err(io_err(&old))?;
        std::fs::rename(new, dest).map_err(io_err(dest))?;
        std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
    } else {
        if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        std::fs::rename(new, dest).map_err(io_err(dest))?;
    }
    Ok(())
}

/// The data cache that `scripts/fetch-data.sh` fills: `$ANNEAL_DATA`, else `~/.cache/anneal`.
pub fn data_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("ANNEAL_DATA") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("anneal")
}

/// `data_root()/relative` when it exists (tests use it to skip when data is not fetched).
pub fn data_dir(relative: &str) -> Option<PathBuf> {
    let p = data_root().join(relative);
    p.exists().then_some(p)
}
