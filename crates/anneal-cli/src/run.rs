//! `anneal pretrain`, `generate`, `eval`, `export` and `quickstart`.

use crate::data::{tokenize_corpus, CorpusArgs, TokenizeArgs};
use anneal_data::Corpus;
use anneal_train::eval::StreamNll;
use anneal_train::generate::{complete, generate_until, load_model, CausalLm, SampleOptions};
use anneal_train::pretrain::{train, Progress, Resume, RunOptions, RunSummary};
use anneal_train::RunConfig;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Arguments of `anneal pretrain`.
#[derive(Args)]
pub struct PretrainArgs {
    /// TOML run config (sections [data], [model], [train]); defaults apply to keys it omits.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Override a config key, e.g. --set train.lr=3e-4 --set model.n_layer=6 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Resume from the newest checkpoint under train.out_dir, or from the checkpoint given.
    #[arg(long, value_name = "CHECKPOINT", num_args = 0..=1, default_missing_value = "latest")]
    pub resume: Option<String>,
    /// Print the resolved config and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Print the memory the run will need (parameters, gradients, optimizer state, activations,
    /// caches, and the peak RSS they come to) for this config and exit.
    #[arg(long)]
    pub estimate_memory: bool,
    /// Run even when the memory the run needs at least (parameters, gradients, optimizer
    /// state, one batch of activations) exceeds the machine's physical memory.
    #[arg(long)]
    pub force: bool,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Run as this many ranks, threads of this process sharing its cores, laid out by the
    /// config's [parallel] section (data parallelism over all of them by default; e.g.
    /// --set parallel.zero=2 for ZeRO-2). Gives the same training as one rank at the same
    /// train.batch_size, which must divide by the ranks.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub ranks: usize,
}

/// A stop flag that Ctrl-C (SIGINT) and SIGTERM, what batch schedulers send, set: the run saves
/// a checkpoint after its current step and exits with 130. A second signal exits at once.
fn stop_on_ctrl_c() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let installed = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupt or termination: saving a checkpoint after this step (Ctrl-C again to \
             quit now)"
        );
    });
    if let Err(e) = installed {
        tracing::warn!("Ctrl-C will not save a checkpoint: {e}");
    }
    stop
}

fn print_summary(s: &RunSummary) {
    println!(
        "{} steps{} in {:.1} s: {:.1} ms/step, {:.0} tokens/s, MFU {:.1}%, peak RSS {:.0} MB \
         (estimated {:.0} MB)",
        s.steps - s.start_step,
        if s.start_step > 0 {
            format!(" (from step {})", s.start_step)
        } else {
            String::new()
        },
        s.wall_seconds,
        s.ms_per_step,
        s.tokens_per_second,
        100.0 * s.mfu,
        s.peak_rss_mb,
        s.estimated_peak_mb
    );
    if s.exposed_comm_ms_per_step > 0.0 {
        println!(
            "exposed communication {:.2} ms/step",
            s.exposed_comm_ms_per_step
        );
    }
    if let Some(v) = s.val_loss {
        println!("validation loss {v:.4} (perplexity {:.2})", v.exp());
    }
    if let Some(c) = &s.checkpoint {
        println!("checkpoint: {}", c.display());
    }
    if s.interrupted {
        println!("interrupted; continue with --resume");
    }
}

/// Where `--resume` says to start.
fn resume_of(a: &PretrainArgs) -> Resume {
    match a.resume.as_deref() {
        None => Resume::No,
        Some("latest") => Resume::Latest,
        Some(dir) => Resume::From(PathBuf::from(dir)),
    }
}

/// Prints a run's summary and writes it beside the run as `summary.json`.
fn report_run(config: &RunConfig, summary: &RunSummary) -> Result<()> {
    print_summary(summary);
    std::fs::write(
        config.train.out_dir.join("summary.json"),
        serde_json::to_string_pretty(summary)?,
    )?;
    Ok(())
}

/// `anneal pretrain`.
pub fn pretrain(a: PretrainArgs) -> Result<()> {
    let config = RunConfig::load(a.config.as_deref(), &a.overrides)?;
    if a.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    if a.estimate_memory {
        let m = anneal_train::pretrain::estimate_memory(&config, a.ranks)?;
        println!(
            "GPT of {} layers, width {}, batch {} × {}, model.dtype {}, train.moments {}, \
             train.grads {}, model.recompute {}{}",
            config.model.n_layer,
            config.model.n_embd,
            config.train.batch_size,
            config.model.block_size,
            config.model.dtype,
            config.train.moments,
            config.train.grads,
            config.recompute()?,
            if a.ranks > 1 {
                format!(", {} ranks in this process", a.ranks)
            } else {
                String::new()
            }
        );
        println!("{}", m.table());
        return Ok(());
    }
    if anneal_dist::launched_by_mpi() {
        return pretrain_mpi(config, a);
    }
    let resume = resume_of(&a);
    let opts = RunOptions {
        resume,
        progress: progress_bar(a.quiet),
        stop: stop_on_ctrl_c(),
        force: a.force,
        ranks: a.ranks,
    };
    let summary = train(&config, &opts)?;
    report_run(&config, &summary)?;
    if summary.interrupted {
        std::process::exit(130);
    }
    Ok(())
}

/// `anneal pretrain` as one process of an `mpirun` job: every process trains its rank, rank 0
/// writes the run and reports. A rank that fails reports its error and ends the whole job.
#[cfg(feature = "mpi")]
fn pretrain_mpi(config: RunConfig, a: PretrainArgs) -> Result<()> {
    use anneal_dist::Communicator;
    if a.ranks > 1 {
        bail!(
            "--ranks {} runs ranks as threads of one process; under mpirun the ranks are \
             mpirun's processes (-np), so leave --ranks out",
            a.ranks
        );
    }
    anneal_dist::mpi::abort_on_panic();
    let world = anneal_dist::mpi::init()?;
    let rank = world.rank();
    let resume = resume_of(&a);
    let opts = RunOptions {
        resume,
        progress: if rank == 0 {
            progress_bar(a.quiet)
        } else {
            None
        },
        stop: stop_on_ctrl_c(),
        force: a.force,
        ranks: 1,
    };
    // This handle keeps MPI alive until the outcome is known: a failed rank aborts the job
    // rather than finalising while the others wait for it.
    let keep = world.clone();
    let outcome =
        anneal_train::pretrain::train_rank(&config, &opts, Box::new(world)).and_then(|summary| {
            if rank == 0 {
                report_run(&config, &summary)?;
            }
            Ok(summary)
        });
    match outcome {
        Ok(summary) => {
            drop(keep);
            if summary.interrupted {
                std::process::exit(130);
            }
            Ok(())
        }
        Err(e) => {
            eprintln!("error: rank {rank} of {}: {e:#}", keep.size());
            anneal_dist::mpi::abort(1)
        }
    }
}

#[cfg(not(feature = "mpi"))]
fn pretrain_mpi(_config: RunConfig, _a: PretrainArgs) -> Result<()> {
    bail!(
        "anneal was started by mpirun but built without MPI: build it with \
         `cargo build --release --features mpi` (needs libopenmpi-dev and libclang-dev)"
    )
}

/// Sampling flags shared by `generate`, `chat` and `quickstart`.
#[derive(Args, Clone)]
pub struct SampleArgs {
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    pub tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 200)]
    pub top_k: usize,
    /// Keep the most likely tokens up to this total probability (1: all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SampleArgs {
    pub fn options(&self) -> Result<SampleOptions> {
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p {} is not allowed: a number in (0, 1]", self.top_p);
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!(
                "--temperature {} is not allowed: zero (greedy) or a positive number",
                self.temperature
            );
        }
        if self.tokens == 0 {
            bail!("--tokens 0 is not allowed: at least 1");
        }
        Ok(SampleOptions {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            max_new_tokens: self.tokens,
            stop_at_eos: true,
        })
    }
}

/// Arguments of `anneal generate`.
#[derive(Args)]
pub struct GenerateArgs {
    /// A checkpoint, a run directory (its newest checkpoint), a Hugging Face GPT-2 directory, or
    /// a Llama GGUF file.
    pub model: PathBuf,
    /// Text to continue (empty: start from the end-of-text token). Repeat it to generate for
    /// several prompts as one batch (left-padded; Llama models).
    #[arg(long = "prompt", short, default_value = "")]
    pub prompts: Vec<String>,
    /// A PEFT LoRA adapter directory (`adapter_config.json`, `adapter_model.safetensors`) to
    /// apply to a Llama model, as `anneal finetune --set train.out=DIR` writes one.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Samples to draw (seeds seed, seed+1, …).
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Print the last position's logits for the prompt (the ten largest with their tokens, then
    /// all) instead of sampling, to compare with another implementation.
    #[arg(long)]
    pub show_logits: bool,
    #[command(flatten)]
    pub sample: SampleArgs,
}

/// A model to generate from, whatever file it came from.
pub struct Generator {
    /// The model.
    pub model: Box<dyn CausalLm>,
    /// Its tokenizer.
    pub tokenizer: anneal_data::Tokenizer,
    /// Tokens that end a sample.
    pub stop: Vec<u32>,
    /// A token put before every prompt, if the model wants one.
    pub bos: Option<u32>,
    /// Its chat template, if it has one.
    pub chat_template: Option<anneal_train::chat::ChatTemplate>,
}

impl Generator {
    /// Loads a GGUF file (a Llama), an anneal checkpoint or run, or a Hugging Face GPT-2
    /// directory.
    /// `adapter` names a PEFT LoRA adapter directory to apply to a Llama.
    pub fn load(path: &std::path::Path, adapter: Option<&std::path::Path>) -> Result<Generator> {
        if let Some(m) = load_llama(path, adapter)? {
            tracing::info!(
                "{}: Llama, {} layers, width {}, {} heads over {} key/value heads, {:.1}M \
                 parameters (f32)",
                path.display(),
                m.model.config.num_layers,
                m.model.config.hidden_size,
                m.model.config.num_heads,
                m.model.config.num_kv_heads,
                m.model.params.numel() as f64 / 1e6
            );
            return Ok(Generator {
                model: Box::new(m.model),
                tokenizer: m.tokenizer,
                stop: m.stop_tokens,
                bos: m.bos,
                chat_template: m.chat_template,
            });
        }
        if let Some(dir) = adapter {
            bail!(
                "--adapter {}: adapters apply to Llama models (a GGUF file or Hugging Face Llama \
                 directory); {} is neither",
                dir.display(),
                path.display()
            );
        }
        let loaded = load_model(path)?;
        Ok(Generator {
            stop: loaded.tokenizer.eos().into_iter().collect(),
            model: Box::new(loaded.model),
            tokenizer: loaded.tokenizer,
            bos: None,
            chat_template: None,
        })
    }

    /// Token ids of `text` (special tokens written in it matched whole), after the BOS token
    /// where the model wants one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        ids.extend(self.tokenizer.encode(text)?);
        Ok(ids)
    }

    /// Samples after `ids`, printing the text as it comes; returns the new tokens.
    pub fn stream(&self, ids: &[u32], opts: &SampleOptions) -> Result<Vec<u32>> {
        // Tokens not yet printed: held until they decode to whole characters (a multi-byte
        // character can be split over tokens), then printed and dropped, so each token is
        // decoded a bounded number of times and printing stays linear in the output.
        let mut pending = Vec::new();
        let new = generate_until(self.model.as_ref(), ids, &self.stop, opts, |t| {
            pending.push(t);
            if let Ok(text) = self.tokenizer.decode(&pending) {
                if !text.ends_with('\u{fffd}') {
                    print!("{text}");
                    let _ = std::io::stdout().flush();
                    pending.clear();
                }
            }
        })?;
        // Bytes that never completed a character print as replacement characters, as the
        // whole reply decodes.
        if !pending.is_empty() {
            print!("{}", self.tokenizer.decode(&pending)?);
        }
        Ok(new)
    }
}

/// A Llama from a GGUF file or a Hugging Face Llama directory, with the LoRA adapter of a PEFT
/// directory where `adapter` names one; `None` for other models.
fn load_llama(
    path: &std::path::Path,
    adapter: Option<&std::path::Path>,
) -> Result<Option<anneal_train::llama_gguf::LlamaModel>> {
    use anneal_train::{hf_llama, llama_gguf, peft};
    let (lora, tensors) = match adapter {
        Some(dir) => {
            let layout = peft::PeftLayout {
                prefix: "",
                modules_to_save: &[],
                task_type: Some("CAUSAL_LM"),
                base_model: "",
            };
            let (lora, tensors) = peft::load(dir, &layout)?;
            (Some(lora), tensors)
        }
        None => (None, Default::default()),
    };
    let mut m = if llama_gguf::is_gguf(path) {
        let mut m = llama_gguf::load(path, lora)?;
        let bytes = llama_gguf::pack_quantized(&mut m)?;
        tracing::debug!(
            "{:.1} MB of quantised blocks kept for generation",
            bytes as f64 / 1e6
        );
        m
    } else if hf_llama::is_llama_dir(path) {
        hf_llama::load_dir(path, lora)?
    } else {
        return Ok(None);
    };
    for (name, t) in tensors {
        let params = &mut m.model.params;
        let id = params.id(&name).map_err(|_| {
            anyhow::anyhow!(
                "{}: tensor {name:?} is not a parameter of {}",
                adapter.map(|d| d.display().to_string()).unwrap_or_default(),
                path.display()
            )
        })?;
        params
            .set(id, &t)
            .with_context(|| format!("loading adapter tensor {name:?}"))?;
    }
    Ok(Some(m))
}

/// `anneal generate`.
pub fn generate(a: GenerateArgs) -> Result<()> {
    if a.samples == 0 {
        bail!("--samples 0 is not allowed: at least 1");
    }
    let g = Generator::load(&a.model, a.adapter.as_deref())?;
    if a.prompts.len() > 1 {
        if a.show_logits || a.samples > 1 {
            bail!("--show-logits and --samples take one --prompt");
        }
        return generate_batched(&g, &a.prompts, &a.sample.options()?);
    }
    let prompt = a.prompts.first().cloned().unwrap_or_default();
    let ids = g.encode(&prompt)?;
    // A character vocabulary drops what it has never seen; say so rather than continue a
    // different prompt.
    let kept = g.tokenizer.decode(&ids[usize::from(g.bos.is_some())..])?;
    if kept != prompt {
        let lost: String = prompt.chars().filter(|c| !kept.contains(*c)).collect();
        tracing::warn!(
            "the model's vocabulary lacks {lost:?} from the prompt; continuing {kept:?} instead"
        );
    }
    if a.show_logits {
        if ids.is_empty() {
            bail!("--show-logits needs a --prompt");
        }
        let n = ids.len().min(g.model.context());
        let ids = &ids[ids.len() - n..];
        let mut cache = anneal_nn::KvCache::new();
        let all = g.model.forward_cached(ids, &mut cache)?.to_vec_f32();
        let vocab = g.model.vocab_size();
        let last = &all[all.len() - vocab..];
        println!("tokens: {ids:?}");
        println!("last position's logits ({vocab}):");
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&x, &y| last[y].total_cmp(&last[x]));
        println!("top 10:");
        for &i in order.iter().take(10) {
            let token = g.tokenizer.id_to_token(i as u32).unwrap_or_default();
            println!("  {i:>6} {:>12.6}  {token:?}", last[i]);
        }
        println!("all: {last:?}");
        return Ok(());
    }
    let base = a.sample.options()?;
    let started = std::time::Instant::now();
    let mut produced = 0;
    for i in 0..a.samples {
        let opts = SampleOptions {
            seed: base.seed + i as u64,
            ..base
        };
        if a.samples > 1 {
            println!("--- sample {} ---", i + 1);
        }
        print!("{prompt}");
        produced += g.stream(&ids, &opts)?.len();
        println!();
    }
    eprintln!(
        "{produced} tokens in {:.2} s ({:.0} tokens/s, KV cache)",
        started.elapsed().as_secs_f64(),
        produced as f64 / started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `anneal generate` with several prompts: one batch, each completion printed after its prompt.
fn generate_batched(g: &Generator, prompts: &[String], opts: &SampleOptions) -> Result<()> {
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| g.encode(p)).collect::<Result<_>>()?;
    let pad = g.stop.first().copied().unwrap_or(0);
    let started = std::time::Instant::now();
    let out = anneal_train::generate::generate_batch(g.model.as_ref(), &ids, &g.stop, pad, opts)?;
    let secs = started.elapsed().as_secs_f64();
    for (i, (p, new)) in prompts.iter().zip(&out).enumerate() {
        println!("--- prompt {} ---", i + 1);
        println!("{p}{}", g.tokenizer.decode(new)?);
    }
    let produced: usize = out.iter().map(Vec::len).sum();
    eprintln!(
        "{produced} tokens for {} prompts in {secs:.2} s ({:.0} tokens/s, one batch, KV cache)",
        prompts.len(),
        produced as f64 / secs
    );
    Ok(())
}

/// Arguments of `anneal eval`.
#[derive(Args)]
pub struct EvalArgs {
    /// A checkpoint, a run directory, or a Hugging Face GPT-2 directory.
    pub model: PathBuf,
    /// Files or directories to evaluate on.
    #[arg(long, short, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    #[command(flatten)]
    pub read: crate::data::ReadArgs,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Evaluate at most this many tokens.
    #[arg(long)]
    pub max_tokens: Option<u64>,
}

/// `anneal eval`: mean next-token cross-entropy over non-overlapping windows of `block_size`
/// tokens of the concatenated documents (each followed by end-of-text), and its exponential,
/// the perplexity.
pub fn eval(a: EvalArgs) -> Result<()> {
    let loaded = load_model(&a.model)?;
    // Documents come in parts of bounded size and are encoded a piece at a time, so memory
    // does not grow with the longest document, and encoding stops once enough tokens are in.
    let corpus =
        Corpus::new(&a.input, a.read.options())?.in_parts_of(anneal_data::TOKENIZE_PART_BYTES);
    let t = loaded.model.config.block_size;
    let started = std::time::Instant::now();
    let mut scorer =
        StreamNll::new(&loaded.model, t, a.batch_size).with_limit(a.max_tokens.unwrap_or(u64::MAX));
    let eos = loaded.tokenizer.eos();
    let mut failure = None;
    let mut first = true;
    let report = corpus.for_each(|doc| {
        let mut scored = Ok(());
        // Each document is followed by end-of-text: pushed when the next one begins.
        if let (false, false, Some(eos)) = (first, doc.continued, eos) {
            scored = scorer.push(&[eos]).map_err(anyhow::Error::from);
        }
        first = false;
        if scored.is_ok() {
            scored = loaded
                .tokenizer
                .encode_pieces(&doc.text, |ids| {
                    if let Err(e) = scorer.push(ids) {
                        scored = Err(e.into());
                    }
                    scored.is_ok() && !scorer.done()
                })
                .map_err(|e| anyhow::anyhow!("{}: {e}", doc.source))
                .and(scored);
        }
        if let Err(e) = scored {
            failure = Some(e);
            return false;
        }
        !scorer.done()
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    if let (false, Some(eos)) = (first, eos) {
        if !scorer.done() {
            scorer.push(&[eos])?;
        }
    }
    let nll = scorer.finish(false)?;
    if nll.tokens == 0 {
        bail!(
            "the corpus holds fewer than block_size + 1 = {} tokens; nothing to evaluate",
            t + 1
        );
    }
    println!("{}", report.summary());
    println!(
        "{} tokens in windows of {t}: loss {:.4} nats/token, perplexity {:.3} ({:.1} s, peak memory {:.0} MB)",
        nll.tokens,
        nll.mean(),
        nll.perplexity(),
        started.elapsed().as_secs_f64(),
        anneal_train::machine::peak_rss_mb()
    );
    Ok(())
}

/// Arguments of `anneal export`.
#[derive(Args)]
pub struct ExportArgs {
    /// A checkpoint or a run directory (exported as GPT-2), or a Llama GGUF file (exported as a
    /// Llama, its weights dequantised to f32).
    pub model: PathBuf,
    /// Output directory (new or empty; written atomically).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Replace a non-empty output directory (never a checkpoint or run directory).
    #[arg(long)]
    pub force: bool,
}

/// `anneal export`.
pub fn export(a: ExportArgs) -> Result<()> {
    if let Some(m) = load_llama(&a.model, None)? {
        anneal_train::hf_llama::export(&m, &a.out, a.force)?;
        println!(
            "exported {} to {} (config.json, model.safetensors, tokenizer.json, \
             tokenizer_config.json)",
            a.model.display(),
            a.out.display()
        );
        println!(
            "check: anneal generate {0} --prompt \"Hello\" --show-logits, beside python3 -c \"import \
             transformers as t; m = t.AutoModelForCausalLM.from_pretrained('{0}'); k = \
             t.AutoTokenizer.from_pretrained('{0}'); print(m(**k('Hello', return_tensors='pt'))\
             .logits[0, -1, :8])\"",
            a.out.display()
        );
        return Ok(());
    }
    let loaded = load_model(&a.model)?;
    anneal_train::hf::export(&loaded.model, &loaded.tokenizer, &a.out, a.force)?;
    println!(
        "exported {} to {} (config.json, model.safetensors, tokenizer.json)",
        loaded.dir.display(),
        a.out.display()
    );
    println!(
        "check: python3 -c \"import torch, transformers as t; m = t.GPT2LMHeadModel.from_pretrained('{}'); print(m(torch.tensor([[1, 2, 3]])).logits[0, -1, :8])\"",
        a.out.display()
    );
    Ok(())
}

/// Arguments of `anneal quickstart`.
#[derive(Args)]
pub struct QuickstartArgs {
    /// Corpus directory (default: the Rust sources in the local cargo registry).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Extensions read from --data, comma-separated.
    #[arg(long, default_value = "rs", value_delimiter = ',')]
    pub ext: Vec<String>,
    /// Output folder (data, checkpoints, report).
    #[arg(long, default_value = "runs/quickstart")]
    pub out: PathBuf,
    /// Megabytes of source text to use.
    #[arg(long, default_value_t = 40)]
    pub max_mb: u64,
    /// A pretraining recipe to use instead of the built-in configs/quickstart.toml.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Override a pretraining config key (repeatable), e.g. --set train.max_steps=100.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// The cargo registry's unpacked sources: `$CARGO_HOME/registry/src`, else `~/.cargo/registry/src`.
pub(crate) fn cargo_registry_sources() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let src = home.join("registry").join("src");
    src.is_dir().then_some(src)
}

/// The quickstart's recipe, built in so the binary runs it from any directory.
const QUICKSTART: &str = include_str!("../../../configs/quickstart.toml");

/// The prompts the quickstart completes.
const PROMPTS: &[&str] = &[
    "fn main() {\n",
    "pub struct ",
    "impl<T> ",
    "/// Returns the number of ",
    "#[derive(Debug, Clone)]\npub enum ",
];

/// Tokenizes up to `max_mb` of the files under `data` with extensions `ext` (sampled in a seeded
/// order, exact duplicates dropped) into `out` with a 4,096-token byte-level BPE, the share
/// `val_fraction` of the documents held out for validation: the quickstart's corpus, and the
/// experiments'.
pub(crate) fn tokenize_sources(
    data: &std::path::Path,
    ext: &[String],
    max_mb: u64,
    val_fraction: f64,
    out: &std::path::Path,
    quiet: bool,
) -> Result<anneal_data::Manifest> {
    let targs = TokenizeArgs {
        corpus: CorpusArgs {
            input: vec![data.to_path_buf()],
            ext: ext.to_vec(),
            format: "auto".into(),
            text_field: "text".into(),
            dedup: true,
            max_mb: Some(max_mb),
            shuffle: true,
            seed: 1234,
        },
        out: out.to_path_buf(),
        tokenizer: "bpe".into(),
        vocab_size: 4096,
        tokenizer_train_mb: 8,
        val_fraction,
        split: "documents".into(),
        quiet,
    };
    let summary = tokenize_corpus(&targs)?;
    let m = &summary.manifest;
    println!("corpus: {}", m.corpus.summary());
    println!(
        "tokenized: {} training / {} validation tokens, vocabulary {}, {:.1} MB/s",
        m.train_tokens(),
        m.val_tokens(),
        m.vocab_size,
        summary.mb_per_s()
    );
    Ok(summary.manifest)
}

/// `anneal quickstart`.
pub fn quickstart(a: QuickstartArgs) -> Result<()> {
    let data = match &a.data {
        Some(d) => d.clone(),
        None => cargo_registry_sources().context(
            "no cargo registry sources found ($CARGO_HOME/registry/src or ~/.cargo/registry/src); \
             pass --data DIR with text or source files",
        )?,
    };
    let report = a.out.join("report");
    let old_checkpoints = a.out.join("checkpoints");
    if old_checkpoints.is_dir() {
        println!(
            "removing the previous quickstart's checkpoints in {}",
            old_checkpoints.display()
        );
        std::fs::remove_dir_all(&old_checkpoints)?;
    }
    std::fs::create_dir_all(&report)?;
    println!("quickstart: pretraining a small GPT on {}", data.display());
    let data_dir = a.out.join("data");
    let m = &tokenize_sources(&data, &a.ext, a.max_mb, 0.02, &data_dir, a.quiet)?;
    let mut overrides = vec![
        format!("data.dir={}", data_dir.display()),
        format!("train.out_dir={}", a.out.display()),
    ];
    overrides.extend(a.overrides.iter().cloned());
    let config = match &a.config {
        Some(path) => RunConfig::load(Some(path), &overrides)?,
        None => RunConfig::load_text(QUICKSTART, "configs/quickstart.toml", &overrides)?,
    };
    let opts = RunOptions {
        resume: Resume::No,
        progress: progress_bar(a.quiet),
        stop: stop_on_ctrl_c(),
        force: false,
        ranks: 1,
    };
    let summary = train(&config, &opts)?;
    print_summary(&summary);
    let first = summary.val_history.first().map(|v| v.1);
    if let (Some(f), Some(l)) = (first, summary.val_loss) {
        println!(
            "validation loss: {f:.3} at step 0 → {l:.3} at step {}",
            summary.steps
        );
    }
    let loaded = load_model(&a.out)?;
    let mut samples = String::from("# Samples\n\nTemperature 0.8, top-k 50, 120 tokens each.\n\n");
    for (i, prompt) in PROMPTS.iter().enumerate() {
        let opts = SampleOptions {
            temperature: 0.8,
            top_k: 50,
            top_p: 1.0,
            seed: i as u64,
            max_new_tokens: 120,
            stop_at_eos: true,
        };
        let text = complete(&loaded, prompt, &opts)?;
        println!("\n----- prompt {:?} -----\n{prompt}{text}", prompt);
        samples += &format!("## Prompt {prompt:?}\n\n```rust\n{prompt}{text}\n```\n\n");
    }
    std::fs::write(report.join("samples.md"), samples)?;
    for f in ["loss.png", "metrics.jsonl", "config.toml"] {
        let src = a.out.join(f);
        if src.exists() {
            std::fs::copy(&src, report.join(f))?;
        }
    }
    std::fs::write(
        report.join("summary.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "data": data,
            "corpus": m.corpus,
            "train_tokens": m.train_tokens(),
            "val_tokens": m.val_tokens(),
            "run": summary,
        }))?,
    )?;
    println!("\nreport: {}", report.display());
    Ok(())
}

/// A progress bar on standard error, drawn by the binary for the library's progress reports
/// (hidden with `--quiet`, and by indicatif itself when standard error is not a terminal).
struct Bar(indicatif::ProgressBar);

impl Progress for Bar {
    fn begin(&self, total: u64, position: u64) {
        self.0.set_length(total);
        self.0.set_position(position);
    }
    fn advance(&self, position: u64, message: &str) {
        self.0.set_position(position);
        self.0.set_message(message.to_string());
    }
    fn suspend(&self, f: &mut dyn FnMut()) {
        self.0.suspend(f)
    }
    fn finish(&self) {
        self.0.finish_and_clear()
    }
}

/// The training progress bar, unless `quiet`.
fn progress_bar(quiet: bool) -> Option<Arc<dyn Progress>> {
    if quiet {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise}, ETA {eta}]",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    Some(Arc::new(Bar(bar)))
}
