//! `anneal align …`: alignment data and training.

use std::path::PathBuf;

use anneal_train::align::tasks::{self, TaskDataSizes, TaskKind};
use anyhow::{bail, Result};
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum AlignCommand {
    /// Generate verifiable-task data with exact answers: SFT problems, rule-ranked preference
    /// pairs (the right answer over a wrong one), RL prompts and held-out evaluation problems
    /// (new numbers and wordings), with no prompt in two sets.
    ///
    /// Example: anneal align data --out data/align
    #[command(verbatim_doc_comment)]
    Data(DataArgs),
}

#[derive(Args)]
pub struct DataArgs {
    /// Task kinds, comma-separated: arithmetic, units, sorting.
    #[arg(
        long,
        default_value = "arithmetic,units,sorting",
        value_delimiter = ','
    )]
    tasks: Vec<String>,
    /// SFT problems.
    #[arg(long, default_value_t = 3000)]
    sft: usize,
    /// Preference pairs.
    #[arg(long, default_value_t = 2000)]
    preferences: usize,
    /// RL prompts.
    #[arg(long, default_value_t = 1000)]
    rl: usize,
    /// Held-out evaluation problems.
    #[arg(long, default_value_t = 600)]
    eval: usize,
    /// Seed of the draw.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Directory to write the JSONL files into.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(c: AlignCommand) -> Result<()> {
    match c {
        AlignCommand::Data(a) => data(a),
    }
}

fn data(a: DataArgs) -> Result<()> {
    let mut kinds = Vec::new();
    for name in &a.tasks {
        match TaskKind::ALL.iter().find(|(n, _)| n == name) {
            Some((_, k)) => kinds.push(*k),
            None => {
                let names: Vec<&str> = TaskKind::ALL.iter().map(|(n, _)| *n).collect();
                bail!("--tasks {name:?} is not a task: {}", names.join(", "));
            }
        }
    }
    let sizes = TaskDataSizes {
        sft: a.sft,
        preferences: a.preferences,
        rl: a.rl,
        eval: a.eval,
    };
    let data = tasks::task_data(&kinds, sizes, a.seed);
    let short = [
        ("SFT problems", a.sft, data.sft.len()),
        ("preference pairs", a.preferences, data.preferences.len()),
        ("RL prompts", a.rl, data.rl.len()),
        ("evaluation problems", a.eval, data.eval.len()),
    ];
    for (name, asked, got) in short {
        if got < asked {
            tracing::warn!(
                "{got} {name} of {asked} asked: the tasks hold no more distinct prompts"
            );
        }
    }
    for (path, n) in tasks::write_task_data(&a.out, &data)? {
        println!("{:>6} lines  {}", n, path.display());
    }
    Ok(())
}
