//! The `anneal` binary: one subcommand per job.

mod bench;

use clap::{Parser, Subcommand};

/// anneal: train large models efficiently, from one CPU to clusters.
#[derive(Parser)]
#[command(name = "anneal", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks, each timed beside the reference implementation a user would otherwise pick.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(b) => bench::run(b),
    }
}
