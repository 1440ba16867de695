//! `anneal align …`: alignment data and training.

use std::path::PathBuf;

use anneal_chart::{line_chart, Series};
use anneal_train::align::config::AlignConfig;
use anneal_train::align::policy::EvalReport;
use anneal_train::align::stages::{self, Method};
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
    /// Supervised fine-tuning on the gold replies of sft.jsonl (LoRA adapters).
    ///
    /// Example: anneal align sft --config configs/align-smollm2.toml --set train.out=runs/sft
    #[command(verbatim_doc_comment)]
    Sft(StageArgs),
    /// DPO (β 0.1) on preference pairs, the reference log-probabilities computed once before
    /// training.
    ///
    /// Example: anneal align dpo --config configs/align-smollm2.toml \
    ///            --set model.adapters=runs/sft/adapters --set train.out=runs/dpo
    #[command(verbatim_doc_comment)]
    Dpo(StageArgs),
    /// PPO-RLHF on rl-prompts.jsonl: sampled replies scored exactly, a per-token KL penalty to
    /// the reference (the base with adapters off), a value head, GAE and clipped losses.
    ///
    /// Example: anneal align ppo --config configs/align-smollm2.toml \
    ///            --set model.adapters=runs/sft/adapters --set train.out=runs/ppo
    #[command(verbatim_doc_comment)]
    Ppo(StageArgs),
    /// GRPO on rl-prompts.jsonl: advantages relative to each prompt's group of replies, no
    /// value model.
    #[command(verbatim_doc_comment)]
    Grpo(StageArgs),
    /// Rejection sampling (rating-filtered fine-tuning): sample rl.group replies per prompt,
    /// keep the best when it is right, fine-tune on the kept ones, repeat for rs.rounds.
    #[command(verbatim_doc_comment)]
    Rs(StageArgs),
    /// A reward model: the chat model's adapters and a scalar head on the last token, trained
    /// with the Bradley–Terry loss on reward.train pairs; held-out accuracy on reward.test beside
    /// a length-only and a bag-of-words logistic baseline on the same pairs.
    ///
    /// Example: anneal align reward --config configs/align-smollm2.toml \
    ///            --set data.dir=data/chat --set train.out=runs/rm
    #[command(verbatim_doc_comment)]
    Reward(StageArgs),
    /// Preference pairs from ChatterBot's English conversations: the human reply preferred over
    /// a reply sampled from the model of --config, matched in length (within ±20% of the human
    /// reply's tokens); prompts split by a hash into disjoint SFT, reward-model (train, test),
    /// judge, RL and evaluation sets.
    ///
    /// Example: anneal align chat-data --config configs/align-smollm2.toml --out data/chat
    #[command(verbatim_doc_comment)]
    ChatData(ChatDataArgs),
    /// Win rates against the baseline (model.adapters, e.g. the SFT adapters): greedy replies
    /// of each policy to the evaluation prompts, judged by a second reward model trained on a
    /// split none of them saw, with the mean reply length beside each.
    ///
    /// Example: anneal align compare --config configs/align-smollm2.toml --set data.dir=data/chat \
    ///            --judge runs/judge/adapters runs/ppo/adapters runs/dpo/adapters
    #[command(verbatim_doc_comment)]
    Compare(CompareArgs),
    /// Exact-answer accuracy on the held-out problems of eval.jsonl (greedy replies) of the
    /// model with model.adapters.
    ///
    /// Example: anneal align eval --config configs/align-smollm2.toml \
    ///            --set model.adapters=runs/sft/adapters
    #[command(verbatim_doc_comment)]
    Eval(StageArgs),
}

#[derive(Args)]
pub struct CompareArgs {
    #[command(flatten)]
    stage: StageArgs,
    /// The judge: a reward model's adapter directory (anneal align reward).
    #[arg(long)]
    judge: PathBuf,
    /// The prompt file, relative to data.dir unless absolute.
    #[arg(long, default_value = "eval-prompts.jsonl")]
    prompts: String,
    /// The policies' adapter directories.
    policies: Vec<String>,
}

#[derive(Args)]
pub struct ChatDataArgs {
    #[command(flatten)]
    stage: StageArgs,
    /// The ChatterBot corpus directory (.yml files); relative paths are also looked up in the
    /// data cache.
    #[arg(
        long,
        default_value = "chatterbot-corpus/chatterbot_corpus/data/english"
    )]
    corpus: String,
    /// Human replies shorter than this many tokens are dropped (too short to prefer).
    #[arg(long, default_value_t = 5)]
    min_tokens: usize,
    /// Samples drawn per prompt to find a length-matched reply.
    #[arg(long, default_value_t = 4)]
    tries: usize,
    /// Directory to write the split files into.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct StageArgs {
    /// TOML config (sections [model], [data], [train], [lora], [eval], [dpo], [rl], [rs]);
    /// defaults apply to keys it omits.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override a config key, e.g. --set train.steps=100 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Print the resolved config and exit.
    #[arg(long)]
    print_config: bool,
    /// Write the report as JSON to this file as well.
    #[arg(long)]
    json: Option<PathBuf>,
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
        AlignCommand::Sft(a) => stage(a, Method::Sft),
        AlignCommand::Dpo(a) => stage(a, Method::Dpo),
        AlignCommand::Ppo(a) => stage(a, Method::Ppo),
        AlignCommand::Grpo(a) => stage(a, Method::Grpo),
        AlignCommand::Rs(a) => stage(a, Method::RejectionSampling),
        AlignCommand::Eval(a) => eval(a),
        AlignCommand::Reward(a) => stage(a, Method::Reward),
        AlignCommand::ChatData(a) => chat_data(a),
        AlignCommand::Compare(a) => compare(a),
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

fn load(a: &StageArgs) -> Result<Option<AlignConfig>> {
    let config = AlignConfig::load(a.config.as_deref(), &a.overrides)?;
    if a.print_config {
        print!("{}", toml::to_string_pretty(&config)?);
        return Ok(None);
    }
    Ok(Some(config))
}

fn print_eval(what: &str, e: &EvalReport) {
    let tasks: Vec<String> = e
        .by_task
        .iter()
        .map(|(name, acc, n)| format!("{name} {:.1}% of {n}", 100.0 * acc))
        .collect();
    println!(
        "{what}: exact-answer accuracy {:.2}% ({}), mean reply {:.1} tokens, {:.0} s",
        100.0 * e.accuracy,
        tasks.join(", "),
        e.mean_reply_tokens,
        e.seconds
    );
    for (prompt, answer, reply) in e.samples.iter().take(3) {
        println!("  {prompt}\n    answer {answer:?}, reply {reply:?}");
    }
}

fn eval(a: StageArgs) -> Result<()> {
    let Some(config) = load(&a)? else {
        return Ok(());
    };
    let bar = crate::finetune::progress(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} problems, ETA {eta}")
            .expect("a valid template"),
    );
    let report = stages::run_eval(&config, &mut |done, n| {
        bar.set_length(n as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    let what = if config.model.adapters.is_empty() {
        config.model.dir.clone()
    } else {
        format!("{} + {}", config.model.dir, config.model.adapters)
    };
    print_eval(&what, &report);
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

fn stage(a: StageArgs, method: Method) -> Result<()> {
    let Some(config) = load(&a)? else {
        return Ok(());
    };
    let steps = config.train.steps;
    let bar = crate::finetune::progress(steps);
    let report = stages::run(&config, method, &mut |_, m| {
        let shown: Vec<String> = ["loss", "accuracy", "score", "kl", "reply_tokens"]
            .iter()
            .filter_map(|k| {
                m.get(*k)
                    .and_then(|v| v.as_f64())
                    .map(|v| format!("{k} {v:.4}"))
            })
            .collect();
        bar.set_message(shown.join(", "));
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    println!(
        "{}: {} steps in {:.0} s ({:.2} s/step), peak memory {:.0} MB, {} of {} parameters \
         trained{}",
        method.name(),
        report.steps,
        report.seconds,
        report.seconds_per_step,
        report.peak_rss_mb,
        report.trainable,
        report.total,
        if report.skipped > 0 {
            format!(", {} examples or lines skipped", report.skipped)
        } else {
            String::new()
        }
    );
    if let Some(e) = &report.eval {
        print_eval("held-out", e);
    }
    if let Some(r) = &report.reward {
        println!(
            "reward model: held-out pairwise accuracy {:.3} (fresh head {:.3}) on {} pairs \
             ({} trained on); baselines on the same pairs: length-only {:.3}, bag-of-words \
             {:.3}; mean tokens chosen {:.1}, rejected {:.1}",
            r.accuracy,
            r.accuracy_before,
            r.test_pairs,
            r.train_pairs,
            r.length_baseline,
            r.bag_of_words_baseline,
            r.mean_tokens.0,
            r.mean_tokens.1
        );
    }
    if !config.train.out.is_empty() {
        let out = PathBuf::from(&config.train.out);
        charts(&out, method, &report.metrics)?;
        println!(
            "adapters, metrics.jsonl, report.json and charts in {}",
            out.display()
        );
    }
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

/// One chart per metric a stage records: the loss, or PPO's reward, KL and reply length.
fn charts(out: &std::path::Path, method: Method, metrics: &[serde_json::Value]) -> Result<()> {
    let keys: &[(&str, &str, &str)] = match method {
        Method::Ppo | Method::Grpo => &[
            (
                "score",
                "reward of the sampled replies",
                "mean exact reward",
            ),
            ("kl", "KL to the reference (k3 estimate)", "nats per token"),
            ("reply_tokens", "reply length", "tokens"),
        ],
        Method::Dpo => &[
            ("loss", "DPO loss", "loss"),
            (
                "margin",
                "implicit reward margin (chosen - rejected)",
                "beta * log-ratio",
            ),
        ],
        _ => &[("loss", "reply cross-entropy", "nats per token")],
    };
    for (key, title, y) in keys {
        let points: Vec<(f64, f64)> = metrics
            .iter()
            .filter_map(|m| Some((m.get("step")?.as_f64()?, m.get(*key)?.as_f64()?)))
            .collect();
        if points.len() < 2 {
            continue;
        }
        let smooth = anneal_chart::smooth(&points);
        line_chart(
            &out.join(format!("{key}.png")),
            &format!("{}: {title}", method.name()),
            "step",
            y,
            &[
                Series {
                    label: "per step",
                    points: &points,
                },
                Series {
                    label: "smoothed",
                    points: &smooth,
                },
            ],
        )?;
    }
    Ok(())
}

fn chat_data(a: ChatDataArgs) -> Result<()> {
    let Some(config) = load(&a.stage)? else {
        return Ok(());
    };
    let policy = stages::load_policy(&config)?;
    let corpus = anneal_train::finetune::resolve(&a.corpus);
    let bar = crate::finetune::progress(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} prompts sampled, ETA {eta}")
            .expect("a valid template"),
    );
    let report = anneal_train::align::chat_data::build(
        &policy,
        &corpus,
        &a.out,
        a.min_tokens,
        a.tries,
        config.eval.batch,
        config.train.seed,
        &mut |done, n| {
            bar.set_length(n as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    println!(
        "{} conversations: {} with a reply under {} tokens dropped, {} pairs with no \
         length-matched sample dropped, {} kept model replies cut at the length limit, {} \
         malformed skipped",
        report.conversations,
        report.short,
        a.min_tokens,
        report.unmatched,
        report.truncated,
        report.skipped
    );
    for (name, n) in &report.written {
        println!("{n:>6} lines  {}", a.out.join(name).display());
    }
    std::fs::write(
        a.out.join("chat-data.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(())
}

fn compare(a: CompareArgs) -> Result<()> {
    let Some(config) = load(&a.stage)? else {
        return Ok(());
    };
    let rates = stages::compare(&config, &a.judge, &a.policies, &a.prompts, &mut |name| {
        tracing::info!(
            "replying with {}",
            if name.is_empty() { "the base" } else { name }
        );
    })?;
    println!(
        "{:<48} {:>9} {:>11} {:>12}",
        "policy", "win rate", "mean score", "reply tokens"
    );
    for r in &rates {
        println!(
            "{:<48} {:>8.1}% {:>11.3} {:>12.1}",
            r.policy,
            100.0 * r.win_rate,
            r.mean_score,
            r.mean_reply_tokens
        );
    }
    if let Some(path) = &a.stage.json {
        std::fs::write(path, serde_json::to_string_pretty(&rates)?)?;
    }
    Ok(())
}
