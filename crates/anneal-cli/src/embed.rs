//! `anneal embed MODEL --input FILE`: sentence embeddings of every line of a text file from a
//! Hugging Face BERT directory (sentence-transformers' all-MiniLM-L6-v2, say), one JSON array of
//! unit-length floats per input line.

use anyhow::{Context, Result};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

#[derive(Args, Clone, Debug)]
pub struct EmbedArgs {
    /// A Hugging Face BERT directory (config.json, model.safetensors, tokenizer.json).
    model: PathBuf,
    /// A text file: one sentence (or passage) per line; empty lines embed the empty text.
    #[arg(long)]
    input: PathBuf,
    /// Where to write the embeddings, one JSON array per input line (default: standard output).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Lines embedded at once.
    #[arg(long, default_value_t = 32)]
    batch: usize,
}

/// `anneal embed`.
pub fn run(a: EmbedArgs) -> Result<()> {
    anyhow::ensure!(a.batch > 0, "--batch must be at least 1");
    let encoder = anneal_train::hf_bert::load(&a.model)?;
    let text = std::fs::read_to_string(&a.input)
        .with_context(|| format!("reading {}", a.input.display()))?;
    let lines: Vec<&str> = text.lines().collect();
    let sink: Box<dyn Write> = match &a.out {
        Some(path) => Box::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut sink = std::io::BufWriter::new(sink);
    // On standard error, hidden when it is not a terminal.
    let progress = indicatif::ProgressBar::new(lines.len() as u64);
    for chunk in lines.chunks(a.batch) {
        for v in encoder.embed(chunk)? {
            serde_json::to_writer(&mut sink, &v)?;
            sink.write_all(b"\n")?;
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    sink.flush()?;
    tracing::info!(
        "{} embeddings of {} floats ({} layers × {} wide, inputs up to {} tokens)",
        lines.len(),
        encoder.model.config.hidden_size,
        encoder.model.config.num_layers,
        encoder.model.config.hidden_size,
        encoder.max_len
    );
    Ok(())
}
