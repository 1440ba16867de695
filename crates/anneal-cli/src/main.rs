//! The `anneal` binary: one subcommand per job.

mod align;
mod bench;
mod bench_generate;
mod bench_lenet;
mod bench_moe;
mod bench_proxy;
mod bench_zero;
mod bert_experiment;
mod chat;
mod data;
mod embed;
mod experiment;
mod finetune;
mod label_efficiency;
mod plan;
mod run;
mod shift;

use clap::{Parser, Subcommand};

/// anneal: train large models efficiently, from one CPU to clusters.
#[derive(Parser)]
#[command(name = "anneal", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Threads for every command (0: every core). For pretrain and quickstart it sets
    /// train.threads; benchmarks default to 2 so that runs compare across machines.
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Prepare corpora: tokenize text into shards.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Pretrain a GPT on a tokenized corpus, from a TOML config with overrides.
    ///
    /// Writes checkpoints, metrics.jsonl, loss.png and config.toml to train.out_dir. Ctrl-C saves
    /// a checkpoint and stops; --resume continues exactly where the last checkpoint left off.
    ///
    /// Example: anneal pretrain --config configs/shakespeare-char.toml --set train.lr=3e-4
    #[command(verbatim_doc_comment)]
    Pretrain(run::PretrainArgs),
    /// Generate text from a checkpoint (anneal's, a Hugging Face GPT-2 directory, or a Llama
    /// GGUF file).
    ///
    /// Example: anneal generate runs/shakespeare-char --prompt "ROMEO:" --tokens 200 --top-k 40
    #[command(verbatim_doc_comment)]
    Generate(run::GenerateArgs),
    /// Chat with a chat model (a Llama GGUF file with a chat template, SmolLM2-135M-Instruct
    /// say): each message is rendered through the model's template and answered.
    ///
    /// Example: anneal chat SmolLM2-135M-Instruct.Q4_1.gguf --message "What is 2+2?" --temperature 0
    #[command(verbatim_doc_comment)]
    Chat(chat::ChatArgs),
    /// Perplexity of a checkpoint on a corpus (text files, JSONL, .gz, .zst).
    ///
    /// Example: anneal eval runs/shakespeare-char --input notes.txt
    #[command(verbatim_doc_comment)]
    Eval(run::EvalArgs),
    /// Export a checkpoint as a Hugging Face GPT-2 directory (config.json, model.safetensors,
    /// tokenizer.json) that transformers' GPT2LMHeadModel.from_pretrained loads.
    ///
    /// Example: anneal export runs/shakespeare-char --out exported/shakespeare
    #[command(verbatim_doc_comment)]
    Export(run::ExportArgs),
    /// Sentence embeddings of each line of a text file from a Hugging Face BERT directory
    /// (sentence-transformers' all-MiniLM-L6-v2, say): mean pooling and L2 normalisation, one
    /// JSON array per line.
    ///
    /// Example: anneal embed ~/.cache/anneal/minilm/all-MiniLM-L6-v2 --input sentences.txt
    #[command(verbatim_doc_comment)]
    Embed(embed::EmbedArgs),
    /// Fine-tune a pretrained BERT (a Hugging Face directory) for classification on a corpus of
    /// one directory per class: the whole model, LoRA adapters, or the head on a frozen encoder.
    /// Reports test accuracy and the confusion matrix.
    ///
    /// Example: anneal finetune --config configs/bbc-minilm.toml --set train.method=lora
    #[command(verbatim_doc_comment)]
    Finetune(finetune::FinetuneArgs),
    /// Alignment: preference and verifiable-task data, reward models, DPO, PPO.
    #[command(subcommand)]
    Align(align::AlignCommand),
    /// Rank every parallel layout (data, tensor, pipeline, expert parallelism, ZeRO stage,
    /// recomputation) of a model on a cluster by estimated step time, with memory per device,
    /// exposed communication and MFU; recommends the fastest that fits.
    ///
    /// Example: anneal plan --layers 24 --hidden 2304 --heads 24 --batch 512 --cluster a100-80gb --nodes 4
    #[command(verbatim_doc_comment)]
    Plan(plan::PlanArgs),
    /// Benchmarks, each timed beside the reference implementation a user would otherwise pick.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Experiments: training recipes compared end to end, each run in its own process, with a
    /// report and a chart.
    #[command(subcommand)]
    Experiment(experiment::ExperimentCommand),
    /// The main job on a built-in default: pretrain a small GPT on the Rust sources in the local
    /// cargo registry (about 5 minutes on 2 cores), then complete a few Rust prompts.
    ///
    /// Drops exact-duplicate files, trains a 4,096-token BPE tokenizer, tokenizes, pretrains,
    /// samples, and writes a report folder (loss curve, samples, metrics, config).
    ///
    /// Example: anneal quickstart --data ~/src/my-rust-project --out runs/quickstart
    #[command(verbatim_doc_comment)]
    Quickstart(run::QuickstartArgs),
}

fn main() -> anyhow::Result<()> {
    use std::io::IsTerminal;
    // Colour escapes only for a terminal: a redirected log stays plain text.
    tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let threads = cli.threads;
    if let Some(t) = threads.filter(|&t| t > anneal_train::machine::MAX_THREADS) {
        anyhow::bail!(
            "--threads {t} is not allowed: 0 (every core) to {}",
            anneal_train::machine::MAX_THREADS
        );
    }
    let mut command = cli.command;
    // Training runs make their own pool from the run config, where --threads lands.
    if let (Some(t), Command::Pretrain(run::PretrainArgs { overrides, .. }))
    | (Some(t), Command::Quickstart(run::QuickstartArgs { overrides, .. })) =
        (threads, &mut command)
    {
        overrides.push(format!("train.threads={t}"));
    }
    // Every command runs on one pool of that size, the libraries' parallel loops included.
    let pool = anneal_train::machine::threads(threads.unwrap_or(0));
    anneal_tensor::with_threads(pool, || match command {
        Command::Data(c) => data::run(c),
        Command::Align(c) => align::run(c),
        Command::Pretrain(a) => run::pretrain(a),
        Command::Generate(a) => run::generate(a),
        Command::Chat(a) => chat::run(a),
        Command::Eval(a) => run::eval(a),
        Command::Export(a) => run::export(a),
        Command::Embed(a) => embed::run(a),
        Command::Finetune(a) => finetune::run(a),
        Command::Bench(b) => bench::run(b, threads),
        Command::Experiment(e) => experiment::run(e, threads),
        Command::Plan(a) => plan::run(a),
        Command::Quickstart(a) => run::quickstart(a),
    })?
}
