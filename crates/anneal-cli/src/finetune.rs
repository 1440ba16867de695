//! `anneal finetune --config FILE`: fine-tunes a pretrained BERT for classification on a
//! class-per-directory corpus and reports test accuracy and the confusion matrix.

use anneal_train::finetune::{read_class_dirs, resolve, FinetuneConfig};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

/// Arguments of `anneal finetune`.
#[derive(Args)]
pub struct FinetuneArgs {
    /// TOML config (sections [model], [data], [train], [lora]); defaults apply to keys it omits.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Override a config key, e.g. --set train.method=lora --set lora.rank=16 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Print the resolved config and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Write the report (accuracy, confusion matrix, losses, timings) as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `anneal finetune`.
pub fn run(a: FinetuneArgs) -> Result<()> {
    let config = FinetuneConfig::load(a.config.as_deref(), &a.overrides)?;
    if a.print_config {
        print!("{}", toml::to_string_pretty(&config)?);
        return Ok(());
    }
    if config.data.format == "chatterbot" {
        return chat(&a, &config);
    }
    let corpus = read_class_dirs(&resolve(&config.data.dir), config.data.test_every)?;
    for p in &corpus.not_utf8 {
        tracing::warn!(
            "{} is not valid UTF-8; read with replacement characters",
            p.display()
        );
    }
    let bar = progress(config.train.steps);
    let report = anneal_train::finetune::run(&config, &corpus, &mut |_, loss| {
        bar.set_message(format!("loss {loss:.4}"));
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    let last = report.losses.last().copied().unwrap_or(f64::NAN);
    println!(
        "{}: test accuracy {:.2}% ({} documents), last training loss {last:.4}, {:.2} s/step, \
         {} of {} parameters trained",
        config.train.method,
        100.0 * report.accuracy,
        report.confusion.iter().flatten().sum::<usize>(),
        report.seconds_per_step,
        report.trainable,
        report.total
    );
    let corner = "true \\ predicted";
    let width = report
        .classes
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(5)
        .max(5);
    let first = width.max(corner.len());
    print!("{corner:>first$}");
    for c in &report.classes {
        print!(" {c:>width$}");
    }
    println!();
    for (c, row) in report.classes.iter().zip(&report.confusion) {
        print!("{c:>first$}");
        for n in row {
            print!(" {n:>width$}");
        }
        println!();
    }
    if let Some(path) = &a.json {
        let json = serde_json::json!({
            "method": config.train.method,
            "accuracy": report.accuracy,
            "confusion": report.confusion,
            "classes": report.classes,
            "losses": report.losses,
            "seconds_per_step": report.seconds_per_step,
            "trainable": report.trainable,
            "total": report.total,
            "optimizer_bytes": report.optimizer_bytes,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}

pub(crate) fn progress(steps: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(steps);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps, {msg}, ETA {eta}")
            .expect("a valid template"),
    );
    bar
}

/// `anneal finetune` on a chat corpus: supervised fine-tuning of a Llama chat model.
fn chat(a: &FinetuneArgs, config: &FinetuneConfig) -> Result<()> {
    let bar = progress(config.train.steps);
    let report = anneal_train::chat_sft::run(config, &mut |_, loss| {
        bar.set_message(format!("loss {loss:.4}"));
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    println!(
        "{}: held-out assistant-token loss {:.4} → {:.4} ({} held-out, {} training \
         conversations{}), {:.2} s/step, {} of {} parameters trained",
        config.train.method,
        report.heldout_loss_before,
        report.heldout_loss_after,
        report.heldout_conversations,
        report.train_conversations,
        if report.skipped > 0 {
            format!(", {} skipped", report.skipped)
        } else {
            String::new()
        },
        report.seconds_per_step,
        report.trainable,
        report.total
    );
    for (prompt, reference, before, after) in &report.samples {
        println!("\nuser:      {prompt}");
        println!("reference: {reference}");
        println!("before:    {before}");
        println!("after:     {after}");
    }
    if let Some(path) = &a.json {
        let mut json = serde_json::to_value(&report)?;
        json["method"] = serde_json::json!(config.train.method);
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}
