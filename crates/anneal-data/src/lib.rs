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

pub mod augment;
pub mod batch;
pub mod corpus;
pub mod dedup;
pub mod dialogue;
pub mod filters;
pub mod images;
pub mod minhash;
pub mod mix;
pub mod mlm;
pub mod normalize;
pub mod pipeline;
pub mod report;
pub mod shards;
pub mod signals;
pub mod tokenizer;

pub use batch::{
    epoch_picks, Batch, BatchSource, LabelledSequences, LabelledSource, MaskedSource, Sampler,
    Stream, TokenWindows, WindowSource,
};
pub use corpus::{BadInput, Corpus, CorpusOptions, CorpusReport, Document, Format};
pub use images::{ImageSet, FASHION_MNIST_CLASSES};
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
/// sibling `.NAME.old`), `new` renamed into place, and the old one removed, so `dest` holds one
/// whole version. A process killed between the two renames leaves `dest` missing and the old
/// version at `.NAME.old`; [`recover_dir`], which this and every reader of such a directory call
/// first, puts it back. Checkpoints, exports, tokenized datasets and the outputs of the curation
/// commands ([`Staged`]) are written this way.
pub fn replace_dir(new: &Path, dest: &Path) -> Result<()> {
    replace_dir_keeping(new, dest, |_| true)
}

/// [`replace_dir`] for a directory that may also hold files that are not its outputs (`owns`
/// says which are): those are moved from the old version into the new one once it is in place.
pub fn replace_dir_keeping(new: &Path, dest: &Path, owns: fn(&str) -> bool) -> Result<()> {
    recover_dir_keeping(dest, owns)?;
    if dest.exists() {
        let old = sibling(dest, "old")?;
        std::fs::rename(dest, &old).map_err(io_err(&old))?;
        failpoint("replace");
        std::fs::rename(new, dest).map_err(io_err(dest))?;
        failpoint("replace");
        move_foreign(&old, dest, owns)?;
        std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
    } else {
        if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        std::fs::rename(new, dest).map_err(io_err(dest))?;
    }
    Ok(())
}

/// Moves the entries of `from` that `owns` does not claim into `to`.
fn move_foreign(from: &Path, to: &Path, owns: fn(&str) -> bool) -> Result<()> {
    for entry in std::fs::read_dir(from).map_err(io_err(from))?.flatten() {
        let name = entry.file_name();
        if !owns(&name.to_string_lossy()) && !to.join(&name).exists() {
            let dest = to.join(&name);
            std::fs::rename(entry.path(), &dest).map_err(io_err(&dest))?;
        }
    }
    Ok(())
}

/// Finishes a [`replace_dir`] that a killed process left halfway: when `dest` is missing and its
/// old version waits at `.NAME.old`, that version is put back; when both exist, the old one is
/// removed.
pub fn recover_dir(dest: &Path) -> Result<()> {
    recover_dir_keeping(dest, |_| true)
}

/// [`recover_dir`] for [`replace_dir_keeping`]: files of the old version that are not outputs
/// move into the new one before the old is removed.
pub fn recover_dir_keeping(dest: &Path, owns: fn(&str) -> bool) -> Result<()> {
    let Ok(old) = sibling(dest, "old") else {
        return Ok(());
    };
    if !old.exists() {
        return Ok(());
    }
    if dest.exists() {
        move_foreign(&old, dest, owns)?;
        std::fs::remove_dir_all(&old).map_err(io_err(&old))
    } else {
        std::fs::rename(&old, dest).map_err(io_err(dest))
    }
}

/// A directory of outputs that replaces the previous one whole, or not at all. The outputs are
/// written into a hidden sibling (`.NAME.SUFFIX`, [`Staged::path`]); [`Staged::commit`] puts it
/// in place with [`replace_dir_keeping`], carrying over the files of the old directory that are
/// not outputs of this kind (`owns` says which are). A process killed at any moment leaves
/// either the old outputs or the new ones, and the user's files; the next run cleans up.
pub struct Staged {
    work: PathBuf,
    dest: PathBuf,
    owns: fn(&str) -> bool,
    committed: bool,
}

impl Drop for Staged {
    /// A run that ends in an error (a full disk, say) removes its partial outputs.
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }
}

impl Staged {
    /// Starts replacing the outputs in `dest`: finishes a replacement a killed predecessor left
    /// halfway, removes its work directory, and creates an empty one.
    pub fn new(dest: &Path, suffix: &str, owns: fn(&str) -> bool) -> Result<Staged> {
        recover_dir_keeping(dest, owns)?;
        let work = sibling(dest, suffix)?;
        if work.exists() {
            std::fs::remove_dir_all(&work).map_err(io_err(&work))?;
        }
        std::fs::create_dir_all(&work).map_err(io_err(&work))?;
        Ok(Staged {
            work,
            dest: dest.to_path_buf(),
            owns,
            committed: false,
        })
    }

    /// Where the new outputs are written.
    pub fn path(&self) -> &Path {
        &self.work
    }

    /// Puts the new outputs in place of the old ones.
    pub fn commit(mut self) -> Result<()> {
        failpoint("commit");
        replace_dir_keeping(&self.work, &self.dest, self.owns)?;
        self.committed = true;
        Ok(())
    }
}

/// A point where the end-to-end fault tests can kill the process. With the `failpoints` feature
/// (tests only), `ANNEAL_FAILPOINT=NAME:K` sends the process SIGKILL the K-th time it passes the
/// point `NAME`, as `kill -9` would: no destructors, no buffered writes flushed. Without the
/// feature it compiles to nothing. The points: `shard` (a shard of tokens or documents written),
/// `signatures` (a MinHash signature file written, before it is renamed into place), `commit`
/// (every output of a command written, before they replace the old), `replace` (first between
/// the two renames of [`replace_dir`], then after the second), `checkpoint` (a checkpoint's files written, before it is put in
/// place), `export` (an export written, before it is put in place).
#[inline(always)]
pub fn failpoint(name: &str) {
    #[cfg(feature = "failpoints")]
    failpoints::pass(name);
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

#[cfg(feature = "failpoints")]
mod failpoints {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static PASSES: AtomicU64 = AtomicU64::new(0);

    pub(crate) fn pass(name: &str) {
        let target = TARGET.get_or_init(|| {
            let spec = std::env::var("ANNEAL_FAILPOINT").ok()?;
            let (point, k) = spec.rsplit_once(':')?;
            Some((point.to_string(), k.parse().ok()?))
        });
        let Some((point, k)) = target else { return };
        if point == name && PASSES.fetch_add(1, Ordering::SeqCst) + 1 == *k {
            eprintln!("failpoint {name}:{k}: killing the process");
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &std::process::id().to_string()])
                .status();
            std::process::abort();
        }
    }
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
