//! `anneal bench`: the engine on a reference workload, beside PyTorch on the same workload.
//!
//! Each measurement runs in its own process (this binary re-invoked with `--worker`, or
//! `python3 bench/torch_gpt.py`) so that each peak RSS is that run's alone.

use anneal_train::machine::{peak_gflops, peak_rss_mb, rss_mb};
use std::path::{Path, PathBuf};
use std::process::Command;

use anneal_data::{Batch, BatchSource, Sampler, Stream, TokenWindows};
use anneal_nn::{Gpt, GptConfig};
use anneal_tensor::optim::{AdamW, AdamWConfig, MomentDType};
use anneal_tensor::{DType, Rng};
use anneal_train::objectives::CausalLm;
use anneal_train::schedule::CosineSchedule;
use anneal_train::strategy::SingleDevice;
use anneal_train::trainer::{Trainer, TrainerParts};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time GPT training steps (forward, backward, AdamW) and compare with PyTorch eager.
    ///
    /// Example: anneal bench gpt --dtype both --steps 10
    Gpt(GptBench),
    /// Pretrain from a run config with anneal and with the same model, recipe and data in
    /// PyTorch (bench/torch_pretrain.py); compare validation loss, wall time, step time, memory.
    ///
    /// Example: anneal bench pretrain --config configs/shakespeare-char.toml
    #[command(verbatim_doc_comment)]
    Pretrain(PretrainBench),
    /// Run the C4 and Gopher quality and repetition filters over a JSONL corpus with anneal's
    /// data pipeline and with datatrove (bench/datatrove_filters.py); compare time and counts.
    ///
    /// Example: anneal bench curate --input corpus/ --workers 2
    #[command(verbatim_doc_comment)]
    Curate(CurateBench),
    /// Near-duplicate removal over a JSONL corpus with anneal's pipeline (MinHash LSH, 5-word
    /// shingles, threshold 0.8) and with datatrove's four MinHash stages
    /// (bench/datatrove_minhash.py, 14 buckets × 8 hashes); both read the corpus, find the
    /// duplicates and write kept and removed documents.
    ///
    /// Example: anneal bench dedup --input corpus/ --workers 2
    #[command(verbatim_doc_comment)]
    Dedup(CurateBench),
    /// Tokenize generated one-line documents of several sizes (`anneal data tokenize`, each in
    /// its own process) and compare their peak memory: it should not grow with the document.
    ///
    /// Example: anneal bench tokenize --mb 20,200 --tokenizer chars
    #[command(verbatim_doc_comment)]
    Tokenize(TokenizeBench),
    /// Each rank's parameter, gradient and optimizer bytes under ZeRO stages 0, 1 and 2 against
    /// `anneal plan`'s formulas. One process per rank under mpirun (feature mpi), else threads.
    ///
    /// Example: mpirun -np 2 anneal bench zero; anneal bench zero --ranks 4
    #[command(verbatim_doc_comment)]
    Zero(crate::bench_zero::ZeroBench),
    /// Generation speed of a GGUF Llama (SmolLM2-135M-Instruct by default) at batch 1 and 16:
    /// tokens per second and time to first token, beside transformers on the same file
    /// (bench/transformers_generate.py, dequantised to f32) and llama.cpp (llama-cpp-python).
    ///
    /// Example: anneal bench generate --batch 1,16 --tokens 64
    #[command(verbatim_doc_comment)]
    Generate(crate::bench_generate::GenerateBench),
    /// A proxy for "task tuning beats scale" (InstructGPT): MiniLM (22M) fine-tuned on BBC news
    /// against SmolLM2-135M zero-shot, 5-shot and with LoRA on the same labels, the LM choosing
    /// the class whose name it finds likeliest.
    ///
    /// Example: anneal bench proxy --test-limit 89
    #[command(verbatim_doc_comment)]
    Proxy(crate::bench_proxy::ProxyBench),
    /// A Mixture-of-Experts layer's forward and backward against the dense MLP of the same active
    /// FLOPs (8 and 16 top-1 experts, 8 top-2 experts of half width), and against the same layer
    /// in PyTorch, gather/scatter style (bench/torch_moe.py).
    ///
    /// Example: anneal bench moe --tokens 4096 --width 256
    #[command(verbatim_doc_comment)]
    Moe(crate::bench_moe::MoeBench),
    /// LeNet-5 training steps (forward, backward, AdamW) against the same model in PyTorch
    /// (bench/torch_lenet.py), as the time of one Fashion-MNIST epoch.
    ///
    /// Example: anneal bench lenet --batch 64
    #[command(verbatim_doc_comment)]
    Lenet(crate::bench_lenet::LenetBench),
}

#[derive(Args, Clone, Debug)]
pub struct TokenizeBench {
    /// Sizes of the one-line documents, in MB.
    #[arg(long, value_delimiter = ',', default_values_t = [20u64, 200])]
    mb: Vec<u64>,
    /// The tokenizer, as `anneal data tokenize --tokenizer` takes it.
    #[arg(long, default_value = "chars")]
    tokenizer: String,
    /// Scratch directory (each document and its dataset are removed once measured).
    #[arg(long, default_value = "runs/bench-tokenize")]
    out: PathBuf,
}

#[derive(Args, Clone, Debug)]
pub struct CurateBench {
    /// Directory of .jsonl files with a "text" field.
    #[arg(long, short)]
    input: PathBuf,
    /// Scratch directory for both outputs.
    #[arg(long, default_value = "runs/bench-curate")]
    out: PathBuf,
    /// Threads for anneal and worker processes for datatrove.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// datatrove side of the comparison.
    #[arg(long, value_enum, default_value = "auto")]
    datatrove: Reference,
    /// The datatrove script (default: bench/datatrove_filters.py in the source tree).
    #[arg(long)]
    datatrove_script: Option<PathBuf>,
}

#[derive(Args, Clone, Debug)]
pub struct PretrainBench {
    /// The run config both engines train from.
    #[arg(long, short)]
    config: PathBuf,
    /// Config overrides for both (repeatable), e.g. --set train.max_steps=500.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// PyTorch side of the comparison.
    #[arg(long, value_enum, default_value = "auto")]
    torch: Reference,
    /// The PyTorch script (default: bench/torch_pretrain.py in the source tree).
    #[arg(long)]
    torch_script: Option<PathBuf>,
    /// Also run nanoGPT's own recipe (bench/nanogpt_shakespeare.py: exact GELU, decayed
    /// embeddings, its evaluation schedule) on the same data and model size.
    #[arg(long)]
    nanogpt: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
pub enum DTypeChoice {
    F32,
    Bf16,
    /// f32, then bf16 parameters and activations.
    Both,
}

/// Whether a benchmark runs its reference side (PyTorch, datatrove).
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
pub enum Reference {
    /// Run it when it is installed (`python3` imports it).
    Auto,
    /// Skip it: anneal's side alone.
    Off,
    /// Fail if it cannot run.
    Require,
}

#[derive(Args, Clone, Debug)]
pub struct GptBench {
    /// Storage dtype of parameters and activations.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeChoice,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Kernel threads: the global --threads, 2 when it is not given.
    #[arg(skip = 2usize)]
    threads: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    seq: usize,
    #[arg(long, default_value_t = 4)]
    layers: usize,
    #[arg(long, default_value_t = 256)]
    width: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[arg(long, default_value_t = 512)]
    vocab: usize,
    /// PyTorch side of the comparison.
    #[arg(long, value_enum, default_value = "auto")]
    torch: Reference,
    /// The PyTorch script (default: bench/torch_gpt.py in the source tree).
    #[arg(long)]
    torch_script: Option<PathBuf>,
    /// Override the machine's f32 peak in GFLOP/s (default: measured, one thread's FMA rate times
    /// the threads).
    #[arg(long)]
    peak_gflops: Option<f64>,
    /// Repeat the whole comparison this many times, engines interleaved, and report every round
    /// and the median ratio (for machines whose speed drifts).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Print results as JSON lines.
    #[arg(long)]
    json: bool,
    /// Print where a step's time goes: forward, backward by op, optimizer (one process, f32).
    #[arg(long)]
    profile: bool,
    /// Run the engines side by side, one step each in turn (anneal f32, anneal bf16, PyTorch,
    /// then again), so that a machine whose speed drifts slows all of them alike; ratios are the
    /// median of per-step ratios. Without it, each engine runs all its steps in a row.
    #[arg(long, conflicts_with = "profile")]
    lockstep: bool,
    /// Every precision mode (f32; bf16 with f32, bf16 or 8-bit AdamW moments; f16 with loss
    /// scaling; the leanest, bf16 without a master copy, bf16 gradients and 8-bit moments), each with the
    /// attention scores recomputed and with whole blocks recomputed, one process each: step
    /// time, peak RSS against f32's, and bytes per parameter against the arithmetic.
    #[arg(long, conflicts_with_all = ["lockstep", "profile"])]
    precision: bool,
    /// Internal: the precision mode of a worker (a name of `--precision`'s table).
    #[arg(long, hide = true)]
    mode: Option<String>,
    /// What backward recomputes: none, selective (the attention scores) or full (each block).
    #[arg(long, default_value = "selective")]
    recompute: String,
    /// Internal: run one measurement in this process and print it as JSON.
    #[arg(long, hide = true)]
    worker: bool,
}

/// A precision mode of the training step: storage dtype, AdamW's moments, master copy.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PrecisionMode {
    pub name: &'static str,
    pub dtype: DType,
    pub moments: MomentDType,
    pub master_weights: bool,
    /// What the gradient buffer keeps (f32, or bf16 in the leanest mode).
    pub grads: DType,
}

impl PrecisionMode {
    /// Bytes per parameter the arithmetic gives for parameters, gradients and optimizer
    /// state (activations aside).
    pub fn bytes_per_param(&self) -> f64 {
        let state = self.adamw().state_bytes_per_param(self.dtype);
        (self.dtype.size_in_bytes() + self.grads.size_in_bytes()) as f64 + state
    }

    /// The benchmark's AdamW settings (PyTorch's β₂, decay 0.1, as `bench/torch_gpt.py`) with
    /// this mode's state.
    fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta2: 0.999,
            weight_decay: 0.1,
            moments: self.moments,
            master_weights: self.master_weights,
            ..Default::default()
        }
    }
}

/// The modes `anneal bench gpt --precision` compares, f32 first.
pub(crate) const PRECISION_MODES: [PrecisionMode; 6] = [
    PrecisionMode {
        name: "f32",
        dtype: DType::F32,
        moments: MomentDType::F32,
        master_weights: true,
        grads: DType::F32,
    },
    PrecisionMode {
        name: "bf16",
        dtype: DType::BF16,
        moments: MomentDType::F32,
        master_weights: true,
        grads: DType::F32,
    },
    PrecisionMode {
        name: "bf16+bf16-states",
        dtype: DType::BF16,
        moments: MomentDType::BF16,
        master_weights: true,
        grads: DType::F32,
    },
    PrecisionMode {
        name: "bf16+8bit-states",
        dtype: DType::BF16,
        moments: MomentDType::Int8,
        master_weights: true,
        grads: DType::F32,
    },
    PrecisionMode {
        name: "f16+loss-scale",
        dtype: DType::F16,
        moments: MomentDType::F32,
        master_weights: true,
        grads: DType::F32,
    },
    PrecisionMode {
        name: "lean",
        dtype: DType::BF16,
        moments: MomentDType::Int8,
        master_weights: false,
        grads: DType::BF16,
    },
];

fn precision_mode(name: &str) -> Result<PrecisionMode> {
    PRECISION_MODES
        .iter()
        .find(|m| m.name == name)
        .copied()
        .ok_or_else(|| {
            let names: Vec<&str> = PRECISION_MODES.iter().map(|m| m.name).collect();
            anyhow::anyhow!("no precision mode {name:?}: {}", names.join(", "))
        })
}

/// One measured configuration.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Measurement {
    pub engine: String,
    pub dtype: String,
    pub ms_per_step: f64,
    /// Fastest and slowest timed step.
    #[serde(default)]
    pub ms_min: f64,
    #[serde(default)]
    pub ms_max: f64,
    pub tokens_per_s: f64,
    pub gflops: f64,
    pub peak_rss_mb: f64,
    /// Most bytes held by live tensors at once (the engine's own count), MB.
    #[serde(default)]
    pub peak_tensor_mb: f64,
    /// Resident set size before the model was built (runtime, binary), MB.
    #[serde(default)]
    pub base_rss_mb: f64,
    /// Tensor bytes alive at the end of forward, when every saved activation, parameter and
    /// gradient is held at once, MB.
    #[serde(default)]
    pub forward_live_mb: f64,
    /// Parameters as stored, MB (within `forward_live_mb`).
    #[serde(default)]
    pub params_mb: f64,
    /// Their gradients (f32, or bf16 in the leanest mode), MB (within
    /// `forward_live_mb`).
    #[serde(default)]
    pub grads_mb: f64,
    /// Optimizer state (moments, and the master copy of a half-precision store), MB.
    #[serde(default)]
    pub optimizer_state_mb: f64,
    pub final_loss: f64,
    /// The precision mode (`--precision`'s name) and recomputation policy of an anneal run.
    #[serde(default)]
    pub mode: String,
    #[serde(default)]
    pub recompute: String,
    /// Parameters of the model.
    #[serde(default)]
    pub params: usize,
    /// Every timed step in ms, in order (lock-step runs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub step_ms: Vec<f64>,
}

impl Measurement {
    /// Column titles of [`Measurement::row`].
    fn header() -> String {
        format!(
            "{:<8} {:<5} {:>10} {:>15} {:>10} {:>9} {:>8} {:>10} {:>8}",
            "engine",
            "dtype",
            "ms/step",
            "(min-max)",
            "tokens/s",
            "GFLOP/s",
            "% peak",
            "peak RSS",
            "loss"
        )
    }

    /// One table row, with the share of `peak` GFLOP/s.
    fn row(&self, peak: f64) -> String {
        format!(
            "{:<8} {:<5} {:>10.1} {:>15} {:>10.0} {:>9.1} {:>7.1}% {:>7.0} MB {:>8.3}",
            self.engine,
            self.dtype,
            self.ms_per_step,
            format!("({:.0}-{:.0})", self.ms_min, self.ms_max),
            self.tokens_per_s,
            self.gflops,
            100.0 * self.gflops / peak,
            self.peak_rss_mb,
            self.final_loss
        )
    }
}

fn mb(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// What each anneal run's peak RSS is made of. The process before the model, the tensors alive at
/// the end of forward (parameters, their gradients, every activation saved for backward) and the
/// optimizer state are all held at once at that moment, so their sum is the least this step can
/// peak at whatever the allocator does; the rest of the peak is buffer caches, allocator free
/// lists and transient scratch. For bf16 against f32 it prints the ratio of floors beside the
/// ratio of peaks, so a memory target can be checked against what the numerics allow.
fn print_memory<'a>(results: impl IntoIterator<Item = &'a Measurement>) {
    let runs: Vec<&Measurement> = results
        .into_iter()
        .filter(|m| m.engine == "anneal")
        .collect();
    if runs.is_empty() {
        return;
    }
    let floor = |m: &Measurement| m.base_rss_mb + m.forward_live_mb + m.optimizer_state_mb;
    println!(
        "{:<13} {:>8} {:>7} {:>6} {:>12} {:>10} {:>7} {:>9} {:>14}",
        "memory (MB)",
        "process",
        "params",
        "grads",
        "activations",
        "optimizer",
        "floor",
        "peak RSS",
        "caches & rest"
    );
    for m in &runs {
        println!(
            "{:<13} {:>8.1} {:>7.1} {:>6.1} {:>12.1} {:>10.1} {:>7.1} {:>9.1} {:>14.1}",
            format!("anneal {}", m.dtype),
            m.base_rss_mb,
            m.params_mb,
            m.grads_mb,
            m.forward_live_mb - m.params_mb - m.grads_mb,
            m.optimizer_state_mb,
            floor(m),
            m.peak_rss_mb,
            m.peak_rss_mb - floor(m)
        );
    }
    let find = |d: &str| runs.iter().find(|m| m.dtype == d);
    if let (Some(h), Some(f)) = (find("bf16"), find("f32")) {
        println!(
            "floor of bf16 vs f32: {:.2}x (peak RSS {:.2}x)",
            floor(h) / floor(f),
            h.peak_rss_mb / f.peak_rss_mb
        );
    }
    println!();
}

/// Runs a benchmark; `threads` (the global --threads) sets the engines' thread count or, for the
/// data benchmarks, the workers.
pub fn run(cmd: BenchCommand, threads: Option<usize>) -> Result<()> {
    match cmd {
        BenchCommand::Gpt(mut b) => {
            b.threads = threads.unwrap_or(b.threads);
            gpt(b)
        }
        BenchCommand::Pretrain(mut b) => {
            if let Some(t) = threads {
                b.overrides.push(format!("train.threads={t}"));
            }
            pretrain(b)
        }
        BenchCommand::Curate(mut b) => {
            b.workers = threads.unwrap_or(b.workers);
            curate(b)
        }
        BenchCommand::Dedup(mut b) => {
            b.workers = threads.unwrap_or(b.workers);
            dedup(b)
        }
        BenchCommand::Tokenize(b) => tokenize(b, threads),
        BenchCommand::Zero(mut b) => {
            b.threads = threads.unwrap_or(1);
            crate::bench_zero::zero(b)
        }
        BenchCommand::Proxy(b) => crate::bench_proxy::proxy(b),
        BenchCommand::Moe(mut b) => {
            b.threads = anneal_train::machine::threads(threads.unwrap_or(0));
            crate::bench_moe::moe(b)
        }
        BenchCommand::Lenet(mut b) => {
            b.threads = anneal_train::machine::threads(threads.unwrap_or(0));
            crate::bench_lenet::lenet(b)
        }
        BenchCommand::Generate(mut b) => {
            b.threads = anneal_train::machine::threads(threads.unwrap_or(0));
            crate::bench_generate::generate(b)
        }
    }
}

/// Writes `bytes` of seeded pseudo-random lowercase words, separated by single spaces, on one
/// line without a newline.
fn write_one_line_document(path: &Path, bytes: u64, seed: u64) -> Result<()> {
    use std::io::Write;
    let file = std::fs::File::create(path).with_context(|| path.display().to_string())?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut state = seed | 1;
    let mut next = || {
        // xorshift64 (Marsaglia 2003).
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut chunk = Vec::with_capacity(1 << 16);
    let mut written = 0u64;
    while written < bytes {
        chunk.clear();
        while chunk.len() < 1 << 16 {
            let r = next();
            for i in 0..1 + (r % 9) as usize {
                chunk.push(b'a' + ((r >> (8 + 5 * i)) % 26) as u8);
            }
            chunk.push(b' ');
        }
        let take = chunk.len().min((bytes - written) as usize);
        w.write_all(&chunk[..take])?;
        written += take as u64;
    }
    w.flush()?;
    Ok(())
}

fn tokenize(b: TokenizeBench, threads: Option<usize>) -> Result<()> {
    if b.mb.is_empty() || b.mb.contains(&0) {
        bail!(
            "--mb {:?} is not allowed: one or more sizes of at least 1 MB",
            b.mb
        );
    }
    std::fs::create_dir_all(&b.out).with_context(|| b.out.display().to_string())?;
    let exe = std::env::current_exe()?;
    println!(
        "tokenizer {}, one-line documents of random words",
        b.tokenizer
    );
    println!("| document MB | peak memory MB | MB/s | training tokens |");
    println!("|---|---|---|---|");
    let mut peaks = Vec::new();
    for &mb in &b.mb {
        let doc = b.out.join(format!("doc-{mb}mb.txt"));
        let data = b.out.join(format!("data-{mb}mb"));
        write_one_line_document(&doc, mb * 1_000_000, mb)?;
        let mut cmd = Command::new(&exe);
        if let Some(t) = threads {
            cmd.arg("--threads").arg(t.to_string());
        }
        let out = cmd
            .args([
                "data",
                "tokenize",
                "--quiet",
                "--split",
                "tail",
                "--tokenizer",
            ])
            .arg(&b.tokenizer)
            .arg("--input")
            .arg(&doc)
            .arg("--out")
            .arg(&data)
            .output()?;
        let _ = std::fs::remove_file(&doc);
        let _ = std::fs::remove_dir_all(&data);
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "anneal data tokenize failed on the {mb} MB document:\n{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // The summary line: "N training tokens (…), … MB/s, peak memory P MB".
        let line = stdout
            .lines()
            .find(|l| l.contains("training tokens") && l.contains("peak memory"))
            .context("anneal data tokenize printed no summary with its peak memory")?;
        let word_after = |key: &str| -> Option<f64> {
            let rest = &line[line.find(key)? + key.len()..];
            rest.split_whitespace().next()?.parse().ok()
        };
        let word_before = |key: &str| -> Option<f64> {
            let head = &line[..line.find(key)?];
            head.split_whitespace().last()?.parse().ok()
        };
        let peak = word_after("peak memory ").context("unreadable peak memory")?;
        let tokens = line.split_whitespace().next().unwrap_or("?");
        let mbs = word_before(" MB/s").unwrap_or(f64::NAN);
        println!("| {mb} | {peak:.0} | {mbs:.1} | {tokens} |");
        peaks.push(peak);
    }
    let (lo, hi) = peaks
        .iter()
        .fold((f64::INFINITY, 0f64), |(lo, hi), &p| (lo.min(p), hi.max(p)));
    println!("\nlargest peak / smallest: {:.3}", hi / lo);
    Ok(())
}

fn config(b: &GptBench, dtype: DType) -> GptConfig {
    GptConfig {
        vocab_size: b.vocab,
        block_size: b.seq,
        n_layer: b.layers,
        n_head: b.heads,
        n_embd: b.width,
        dtype,
        checkpoint_blocks: b.recompute == "full",
        save_attention_probs: b.recompute == "none",
        ..GptConfig::bench()
    }
}

fn worker(b: &GptBench) -> Result<Measurement> {
    anneal_tensor::with_threads(b.threads, || {
        if b.lockstep && b.worker {
            worker_lockstep(b)
        } else {
            worker_steps(b)
        }
    })?
}

/// Random token windows over the benchmark vocabulary, with a fixed next-token rule as targets.
pub(crate) struct RandomTokens {
    pub(crate) vocab: usize,
    pub(crate) seq: usize,
}

impl BatchSource for RandomTokens {
    fn draw(&self, sampler: &Sampler, step: u64, micro: u64, batch: usize) -> Batch {
        let n = batch * self.seq;
        let mut rng = Rng::new(sampler.seed_of(Stream::Sample, &[step, micro]));
        let ids: Vec<u32> = (0..n)
            .map(|_| (rng.next_u64() % self.vocab as u64) as u32)
            .collect();
        let targets = ids
            .iter()
            .map(|&i| ((i as usize * 7 + 3) % self.vocab) as i64)
            .collect();
        Batch::Tokens(TokenWindows {
            ids,
            targets,
            batch,
            seq: self.seq,
        })
    }
}

/// The benchmark model in a [`Trainer`], one training step at a time: the same step
/// `anneal pretrain` runs.
pub(crate) struct Stepper {
    trainer: Trainer,
    batch: usize,
    seq: usize,
    cfg: GptConfig,
    mode: PrecisionMode,
    /// RSS before the model was built, MB.
    base_rss_mb: f64,
    /// Most tensor bytes alive at the end of a forward pass.
    forward_live: usize,
}

/// Seconds spent in forward, backward and the optimizer during one step.
type Phases = [f64; 3];

impl Stepper {
    fn new(b: &GptBench) -> Result<Stepper> {
        if !anneal_train::config::RECOMPUTE.contains(&b.recompute.as_str()) {
            bail!(
                "--recompute {} is not allowed: {}",
                b.recompute,
                anneal_train::config::RECOMPUTE.join(", ")
            );
        }
        let mode = match (&b.mode, b.dtype) {
            (Some(name), _) => precision_mode(name)?,
            (None, DTypeChoice::F32) => PRECISION_MODES[0],
            (None, DTypeChoice::Bf16) => PRECISION_MODES[1],
            (None, DTypeChoice::Both) => bail!("a worker measures one dtype"),
        };
        Stepper::for_mode(config(b, mode.dtype), b.batch, mode)
    }

    /// The benchmark's training step (PyTorch's AdamW settings, a constant learning rate, no
    /// clipping, random tokens) for the GPT `cfg` at `batch` sequences, f32 AdamW state.
    pub(crate) fn for_model(cfg: GptConfig, batch: usize) -> Result<Stepper> {
        Stepper::for_mode(cfg, batch, PRECISION_MODES[0])
    }

    /// [`Stepper::for_model`] with the optimizer state and loss scaling of `mode` (its dtype is
    /// `cfg`'s).
    pub(crate) fn for_mode(cfg: GptConfig, batch: usize, mode: PrecisionMode) -> Result<Stepper> {
        let (vocab, seq) = (cfg.vocab_size, cfg.block_size);
        let base_rss_mb = rss_mb();
        let mut model = Gpt::new(cfg.clone(), 1337)?;
        model.params.set_grad_dtype(mode.grads)?;
        // As bench/torch_gpt.py: PyTorch's β₂, decay 0.1, a constant learning rate, no clipping.
        let optimizer = AdamW::new(&model.params, mode.adamw());
        let lr = 3e-4;
        let mut trainer = Trainer::new(TrainerParts {
            model: Box::new(model),
            objective: Box::new(CausalLm),
            optimizer: Box::new(optimizer),
            strategy: Box::new(SingleDevice),
            source: Box::new(RandomTokens { vocab, seq }),
            seed: 0,
            schedule: CosineSchedule {
                max_lr: lr,
                min_lr: lr,
                warmup_steps: 0,
                decay_steps: 1,
            },
            batch_size: batch,
            grad_accum: 1,
            grad_clip: 0.0,
        });
        trainer.measure_grad_norm = false;
        if cfg.dtype == DType::F16 {
            trainer = trainer.with_loss_scaling(Default::default())?;
        }
        Ok(Stepper {
            trainer,
            batch,
            seq,
            cfg,
            mode,
            base_rss_mb,
            forward_live: 0,
        })
    }

    /// One [`Trainer::step`] on a fresh random batch; returns its phases and loss.
    /// `after_forward` runs between forward and backward, outside the timed phases.
    pub(crate) fn step(&mut self, after_forward: &mut dyn FnMut()) -> Result<(Phases, f32)> {
        let forward_live = &mut self.forward_live;
        let out = self.trainer.step_with(&mut || {
            *forward_live = (*forward_live).max(anneal_tensor::memory_stats().live_bytes);
            after_forward();
        })?;
        Ok((out.phases, out.loss as f32))
    }

    /// The measurement of `times` (seconds per step).
    fn measurement(&self, mut times: Vec<f64>, final_loss: f32) -> Measurement {
        times.sort_by(|a, b| a.total_cmp(b));
        let median = times[times.len() / 2];
        let tokens = (self.batch * self.seq) as f64;
        let params = self.trainer.model().params();
        Measurement {
            engine: "anneal".into(),
            dtype: self.cfg.dtype.as_str().into(),
            ms_per_step: median * 1e3,
            ms_min: times[0] * 1e3,
            ms_max: times[times.len() - 1] * 1e3,
            tokens_per_s: tokens / median,
            gflops: self.cfg.flops_per_token(self.seq) * tokens / median / 1e9,
            peak_rss_mb: peak_rss_mb(),
            peak_tensor_mb: mb(anneal_tensor::memory_stats().peak_bytes),
            base_rss_mb: self.base_rss_mb,
            forward_live_mb: mb(self.forward_live),
            params_mb: mb(params.bytes()),
            grads_mb: mb(params.grads().bytes()),
            optimizer_state_mb: mb(self.trainer.optimizer().state_bytes()),
            final_loss: final_loss as f64,
            mode: self.mode.name.into(),
            recompute: match (self.cfg.checkpoint_blocks, self.cfg.save_attention_probs) {
                (true, _) => "full",
                (_, true) => "none",
                _ => "selective",
            }
            .into(),
            params: params.numel(),
            step_ms: Vec::new(),
        }
    }
}

fn worker_steps(b: &GptBench) -> Result<Measurement> {
    let mut stepper = Stepper::new(b)?;
    let mut times = Vec::with_capacity(b.steps);
    let mut loss_value = 0.0;
    let mut phases = [0.0f64; 3];
    let mut profile = OpTimes::default();
    let mut fwd_profile = OpTimes::default();
    for step in 0..b.warmup + b.steps {
        let timed = step >= b.warmup;
        if b.profile && timed {
            anneal_tensor::autograd::start_backward_profile();
            anneal_tensor::autograd::start_forward_profile();
        }
        let (p, loss) = stepper.step(&mut || {
            if b.profile && timed {
                merge_op_times(
                    &mut fwd_profile,
                    anneal_tensor::autograd::take_forward_profile(),
                );
            }
        })?;
        let dt: f64 = p.iter().sum();
        if b.profile && timed {
            merge_op_times(
                &mut profile,
                anneal_tensor::autograd::take_backward_profile(),
            );
            for (acc, x) in phases.iter_mut().zip(p) {
                *acc += x;
            }
        }
        loss_value = loss;
        if timed {
            times.push(dt);
        }
        if b.profile {
            eprintln!(
                "step {step:>3}: {:.1} ms{}",
                dt * 1e3,
                if timed { "" } else { " (warm-up)" }
            );
        }
    }
    if b.profile {
        let n = b.steps as f64;
        eprintln!(
            "per step: forward {:.1} ms, backward {:.1} ms, optimizer {:.1} ms",
            phases[0] / n * 1e3,
            phases[1] / n * 1e3,
            phases[2] / n * 1e3
        );
        // The same split as `bench/torch_gpt.py --profile` prints, to set the engines side by side.
        let (mut products, mut attention) = (0.0, 0.0);
        for (name, (_, secs)) in fwd_profile.iter().chain(profile.iter()) {
            if name.starts_with("matmul") {
                products += secs;
            } else if name.starts_with("attention") {
                attention += secs;
            }
        }
        let total: f64 = phases.iter().sum();
        eprintln!(
            "  matrix products {:.1} ms/step, attention {:.1}, everything else {:.1}",
            products / n * 1e3,
            attention / n * 1e3,
            (total - products - attention) / n * 1e3
        );
        print_op_times("forward ", fwd_profile, n);
        print_op_times("backward", profile, n);
    }
    Ok(stepper.measurement(times, loss_value))
}

/// Lock-step worker: warms up, prints `ready`, then runs one timed step per `step` line read from
/// standard input and answers each with its time in ms; at `done` (or end of input) prints the
/// whole measurement as JSON.
fn worker_lockstep(b: &GptBench) -> Result<Measurement> {
    use std::io::{BufRead, Write};
    let mut stepper = Stepper::new(b)?;
    let mut loss = 0.0;
    for _ in 0..b.warmup {
        loss = stepper.step(&mut || {})?.1;
    }
    // Standard output is locked only to write, never across a step.
    let say = |line: String| -> Result<()> {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
        Ok(())
    };
    say("ready".into())?;
    let mut times = Vec::new();
    for line in std::io::stdin().lock().lines() {
        match line?.trim() {
            "step" => {
                let (p, l) = stepper.step(&mut || {})?;
                let dt: f64 = p.iter().sum();
                loss = l;
                times.push(dt);
                say(format!("{}", dt * 1e3))?;
            }
            "done" => break,
            other => bail!("lock-step worker: unexpected command {other:?}"),
        }
    }
    if times.is_empty() {
        bail!("lock-step worker: no step was asked for");
    }
    let mut m = stepper.measurement(times.clone(), loss);
    m.step_ms = times.iter().map(|t| t * 1e3).collect();
    Ok(m)
}

type OpTimes = std::collections::HashMap<&'static str, (u32, f64)>;

fn merge_op_times(into: &mut OpTimes, from: Vec<(&'static str, u32, f64)>) {
    for (name, calls, secs) in from {
        let e = into.entry(name).or_insert((0, 0.0));
        e.0 += calls;
        e.1 += secs;
    }
}

fn print_op_times(phase: &str, times: OpTimes, steps: f64) {
    let mut rows: Vec<_> = times.into_iter().collect();
    rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
    for (name, (calls, secs)) in rows {
        eprintln!(
            "  {phase} {name:<18} {:>4} calls/step {:>8.1} ms/step",
            calls as f64 / steps,
            secs / steps * 1e3
        );
    }
}

/// One measurement in a worker process of this binary, run with `args` (its dtype or precision
/// mode) and `b`'s shape and threads.
fn spawn_self(b: &GptBench, args: &[&str]) -> Result<Measurement> {
    let exe = std::env::current_exe().context("locating the anneal binary")?;
    let out = Command::new(exe)
        .args(["bench", "gpt", "--worker", "--json"])
        .args(args)
        .args(shape_args(b))
        .args(["--threads", &b.threads.to_string()])
        .output()
        .context("running a benchmark worker")?;
    parse_worker(out, "anneal worker")
}

/// `anneal bench gpt --precision`: every mode × recomputation policy in its own process.
fn precision(b: &GptBench) -> Result<()> {
    let mut runs = Vec::new();
    for recompute in ["selective", "full"] {
        for mode in PRECISION_MODES {
            let m = spawn_self(b, &["--mode", mode.name, "--recompute", recompute])?;
            if b.json {
                println!("{}", serde_json::to_string(&m)?);
            } else {
                eprintln!(
                    "  {} / {recompute}: {:.1} ms/step",
                    mode.name, m.ms_per_step
                );
            }
            runs.push((mode, m));
        }
    }
    if b.json {
        return Ok(());
    }
    let params = runs[0].1.params as f64;
    println!(
        "\n{} parameters; bytes per parameter: (peak RSS − process) / parameters, beside \
         parameters + gradients + optimizer state by arithmetic",
        runs[0].1.params
    );
    println!(
        "| mode | recompute | ms/step | peak RSS MB | × f32 peak | × f32 time | bytes/param | arithmetic | final loss |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let f32_of = |recompute: &str| {
        runs.iter()
            .find(|(m, r)| m.name == "f32" && r.recompute == recompute)
            .map(|(_, r)| r)
    };
    for (mode, m) in &runs {
        let base = f32_of(&m.recompute).expect("f32 runs first");
        println!(
            "| {} | {} | {:.1} | {:.0} | {:.2} | {:.2} | {:.1} | {:.1} | {:.4} |",
            mode.name,
            m.recompute,
            m.ms_per_step,
            m.peak_rss_mb,
            m.peak_rss_mb / base.peak_rss_mb,
            m.ms_per_step / base.ms_per_step,
            (m.peak_rss_mb - m.base_rss_mb) * 1024.0 * 1024.0 / params,
            mode.bytes_per_param(),
            m.final_loss
        );
    }
    Ok(())
}

fn shape_args(b: &GptBench) -> Vec<String> {
    [
        ("--steps", b.steps),
        ("--warmup", b.warmup),
        ("--batch", b.batch),
        ("--seq", b.seq),
        ("--layers", b.layers),
        ("--width", b.width),
        ("--heads", b.heads),
        ("--vocab", b.vocab),
    ]
    .iter()
    .flat_map(|(k, v)| [k.to_string(), v.to_string()])
    .collect()
}

/// The last JSON line a successful child process printed.
fn parse_worker<T: serde::de::DeserializeOwned>(
    out: std::process::Output,
    what: &str,
) -> Result<T> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| format!("{what} printed no JSON:\n{text}"))?;
    serde_json::from_str(line).with_context(|| format!("parsing {what} output: {line}"))
}

/// `given`, else `bench/NAME` in the source tree this binary was built from, else in the working
/// directory.
pub(crate) fn bench_script(given: &Option<PathBuf>, name: &str) -> PathBuf {
    if let Some(p) = given {
        return p.clone();
    }
    let from_build = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../bench")
        .join(name);
    if from_build.exists() {
        from_build
    } else {
        Path::new("bench").join(name)
    }
}

fn torch_available() -> bool {
    Command::new("python3")
        .args(["-c", "import torch"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn run_torch(b: &GptBench, dtype: &str) -> Result<Measurement> {
    let script = bench_script(&b.torch_script, "torch_gpt.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(shape_args(b))
        .args([
            "--threads",
            &b.threads.to_string(),
            "--dtype",
            dtype,
            "--json",
        ])
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    parse_worker(out, "PyTorch benchmark")
}

fn gpt(b: GptBench) -> Result<()> {
    if b.worker || b.profile {
        let m = worker(&b)?;
        println!("{}", serde_json::to_string(&m)?);
        return Ok(());
    }
    let cfg = config(&b, DType::F32);
    let (peak, how) = match b.peak_gflops {
        Some(p) => (p, "given with --peak-gflops".to_string()),
        None => peak_gflops(b.threads),
    };
    if !b.json {
        println!(
            "GPT {} layers, d={}, {} heads, context {}, batch {}, vocab {}, AdamW, {} threads",
            b.layers, b.width, b.heads, b.seq, b.batch, b.vocab, b.threads
        );
        println!(
            "FLOPs/step = tokens × (6 × {} non-embedding params + 12 × L × T × d) = {:.2} GFLOP",
            cfg.non_embedding_params(),
            cfg.flops_per_token(b.seq) * (b.batch * b.seq) as f64 / 1e9
        );
        println!("f32 peak: {peak:.0} GFLOP/s ({how})");
        println!("kernels: {}", anneal_tensor::kernel_path());
        if !b.lockstep {
            println!("median of {} steps after {} warm-up\n", b.steps, b.warmup);
        }
    }
    if b.precision {
        return precision(&b);
    }
    let dtypes: &[&str] = match b.dtype {
        DTypeChoice::F32 => &["f32"],
        DTypeChoice::Bf16 => &["bf16"],
        DTypeChoice::Both => &["f32", "bf16"],
    };
    let use_torch = match b.torch {
        Reference::Off => false,
        Reference::Auto if !torch_available() => {
            if !b.json {
                println!("(PyTorch not importable by python3: comparison skipped; `pip install torch` to add it)\n");
            }
            false
        }
        _ => true,
    };
    if b.lockstep {
        return lockstep(&b, dtypes, use_torch, peak);
    }
    let rounds = b.rounds.max(1);
    let mut all: Vec<(usize, Measurement)> = Vec::new();
    for round in 1..=rounds {
        for d in dtypes {
            all.push((round, spawn_self(&b, &["--dtype", d])?));
        }
        if use_torch {
            for d in dtypes {
                all.push((round, run_torch(&b, d)?));
            }
        }
    }
    if b.json {
        for (_, r) in &all {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    println!("{:>5} {}", "round", Measurement::header());
    for (round, r) in &all {
        println!("{round:>5} {}", r.row(peak));
    }
    println!();
    print_memory(all.iter().filter(|(r, _)| *r == rounds).map(|(_, m)| m));
    let find = |round: usize, engine: &str, dtype: &str| {
        all.iter()
            .find(|(r, m)| *r == round && m.engine == engine && m.dtype == dtype)
            .map(|(_, m)| m)
    };
    // Per-round ratios, then their median across rounds.
    let median = |mut v: Vec<f64>| -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            0.5 * (v[n / 2 - 1] + v[n / 2])
        }
    };
    let ratios = |num: (&str, &str),
                  den: (&str, &str),
                  f: &dyn Fn(&Measurement, &Measurement) -> (f64, f64)| {
        let per: Vec<(f64, f64)> = (1..=rounds)
            .filter_map(|r| Some(f(find(r, num.0, num.1)?, find(r, den.0, den.1)?)))
            .collect();
        (!per.is_empty()).then(|| {
            (
                median(per.iter().map(|p| p.0).collect()),
                median(per.iter().map(|p| p.1).collect()),
            )
        })
    };
    let of_rounds = if rounds > 1 {
        format!(" (median of {rounds} rounds)")
    } else {
        String::new()
    };
    for d in dtypes {
        if let Some((speed, rss)) = ratios(("anneal", d), ("pytorch", d), &|a, t| {
            (
                a.tokens_per_s / t.tokens_per_s,
                a.peak_rss_mb / t.peak_rss_mb,
            )
        }) {
            println!(
                "anneal {d} vs PyTorch {d}: {speed:.2}x tokens/s, {rss:.2}x peak RSS{of_rounds}"
            );
        }
    }
    if let Some((time, rss)) = ratios(("anneal", "bf16"), ("anneal", "f32"), &|h, f| {
        (h.ms_per_step / f.ms_per_step, h.peak_rss_mb / f.peak_rss_mb)
    }) {
        println!("anneal bf16 vs f32: {time:.2}x step time, {rss:.2}x peak RSS{of_rounds}");
    }
    Ok(())
}

/// A lock-step benchmark worker process.
struct Stepping {
    name: String,
    child: std::process::Child,
    input: std::process::ChildStdin,
    output: std::io::BufReader<std::process::ChildStdout>,
}

impl Stepping {
    fn start(name: String, mut cmd: Command) -> Result<Stepping> {
        use std::process::Stdio;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting the {name} worker"))?;
        let input = child.stdin.take().context("worker stdin")?;
        let output = std::io::BufReader::new(child.stdout.take().context("worker stdout")?);
        let mut w = Stepping {
            name,
            child,
            input,
            output,
        };
        let first = w.line()?;
        if first != "ready" {
            bail!("{} worker: expected `ready`, got {first:?}", w.name);
        }
        Ok(w)
    }

    fn line(&mut self) -> Result<String> {
        use std::io::BufRead;
        let mut line = String::new();
        if self.output.read_line(&mut line)? == 0 {
            bail!("{} worker exited early", self.name);
        }
        Ok(line.trim().to_string())
    }

    fn say(&mut self, what: &str) -> Result<()> {
        use std::io::Write;
        writeln!(self.input, "{what}")?;
        self.input.flush()?;
        Ok(())
    }

    /// One timed step; its ms.
    fn step(&mut self) -> Result<f64> {
        self.say("step")?;
        let line = self.line()?;
        line.parse()
            .with_context(|| format!("{} worker: bad step time {line:?}", self.name))
    }

    fn finish(mut self) -> Result<Measurement> {
        self.say("done")?;
        let json = self.line()?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("{} worker failed ({status})", self.name);
        }
        serde_json::from_str(&json)
            .with_context(|| format!("parsing the {} worker's result: {json}", self.name))
    }
}

/// `--lockstep`: every engine in its own process, warmed up, then one step each in turn.
fn lockstep(b: &GptBench, dtypes: &[&str], use_torch: bool, peak: f64) -> Result<()> {
    let exe = std::env::current_exe().context("locating the anneal binary")?;
    let mut workers = Vec::new();
    for d in dtypes {
        let mut cmd = Command::new(&exe);
        cmd.args(["bench", "gpt", "--worker", "--lockstep", "--dtype", d])
            .args(shape_args(b))
            .args(["--threads", &b.threads.to_string()]);
        workers.push(Stepping::start(format!("anneal {d}"), cmd)?);
    }
    if use_torch {
        // PyTorch in each dtype anneal runs: f32 eager, and bf16 under its CPU autocast.
        let script = bench_script(&b.torch_script, "torch_gpt.py");
        for d in dtypes {
            let mut cmd = Command::new("python3");
            cmd.arg(&script).args(shape_args(b)).args([
                "--threads",
                &b.threads.to_string(),
                "--dtype",
                d,
                "--lockstep",
            ]);
            workers.push(Stepping::start(format!("pytorch {d}"), cmd)?);
        }
    }
    let steps = b.steps * b.rounds.max(1);
    let pb = indicatif::ProgressBar::new(steps as u64);
    for _ in 0..steps {
        for w in workers.iter_mut() {
            // A pause between engines, so that the threads of the one that just finished have
            // gone to sleep before the next one starts.
            std::thread::sleep(std::time::Duration::from_millis(30));
            w.step()?;
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    let results = workers
        .into_iter()
        .map(|w| w.finish())
        .collect::<Result<Vec<_>>>()?;
    if b.json {
        for r in &results {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    println!(
        "{steps} steps per engine, taken in turn ({}), after {} warm-up each\n",
        results
            .iter()
            .map(|r| format!("{} {}", r.engine, r.dtype))
            .collect::<Vec<_>>()
            .join(", "),
        b.warmup
    );
    println!("{}", Measurement::header());
    for r in &results {
        println!("{}", r.row(peak));
    }
    println!();
    print_memory(&results);
    // Ratios of neighbouring steps, then their median and quartiles.
    let per_step = |num: &Measurement, den: &Measurement| -> (f64, f64, f64) {
        let mut v: Vec<f64> = num
            .step_ms
            .iter()
            .zip(&den.step_ms)
            .map(|(a, b)| a / b)
            .collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let q = |f: f64| v[((v.len() - 1) as f64 * f).round() as usize];
        (q(0.5), q(0.25), q(0.75))
    };
    let find = |engine: &str, dtype: &str| {
        results
            .iter()
            .find(|r| r.engine == engine && r.dtype == dtype)
    };
    for d in dtypes {
        if let (Some(t), Some(a)) = (find("pytorch", d), find("anneal", d)) {
            let (m, lo, hi) = per_step(t, a);
            println!(
                "anneal {d} vs PyTorch {d}: {m:.2}x tokens/s (median of per-step ratios; \
                 quartiles {lo:.2}–{hi:.2}), {:.2}x peak RSS",
                a.peak_rss_mb / t.peak_rss_mb
            );
        }
    }
    if let (Some(h), Some(f)) = (find("pytorch", "bf16"), find("pytorch", "f32")) {
        let (m, lo, hi) = per_step(h, f);
        println!("PyTorch bf16 vs f32: {m:.2}x step time (quartiles {lo:.2}–{hi:.2})");
    }
    if let (Some(h), Some(f)) = (find("anneal", "bf16"), find("anneal", "f32")) {
        let (m, lo, hi) = per_step(h, f);
        println!(
            "anneal bf16 vs f32: {m:.2}x step time (quartiles {lo:.2}–{hi:.2}), {:.2}x peak RSS",
            h.peak_rss_mb / f.peak_rss_mb
        );
    }
    Ok(())
}

fn pretrain(b: PretrainBench) -> Result<()> {
    let config = anneal_train::RunConfig::load(Some(&b.config), &b.overrides)?;
    let with_torch = match b.torch {
        Reference::Off => false,
        Reference::Auto => torch_available(),
        Reference::Require => {
            if !torch_available() {
                bail!("--torch require: python3 cannot import torch (pip install torch numpy)");
            }
            true
        }
    };
    let sets: Vec<String> = b
        .overrides
        .iter()
        .flat_map(|o| ["--set".to_string(), o.clone()])
        .collect();
    println!(
        "pretraining {} ({} steps) with anneal{}",
        b.config.display(),
        config.train.max_steps,
        if with_torch {
            ", then with PyTorch"
        } else {
            ""
        }
    );
    // A fresh run directory beside the config's, so a rerun never resumes or mixes runs.
    let mut run_dir = config.train.out_dir.clone().into_os_string();
    run_dir.push("-bench");
    let run_dir = PathBuf::from(run_dir);
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir).with_context(|| {
            format!("removing the previous benchmark run {}", run_dir.display())
        })?;
    }
    let exe = std::env::current_exe()?;
    let out = Command::new(&exe)
        .arg("pretrain")
        .arg("--config")
        .arg(&b.config)
        .args(&sets)
        .arg("--set")
        .arg(format!("train.out_dir={}", run_dir.display()))
        .arg("--quiet")
        .env("RUST_LOG", "warn")
        .output()
        .context("running anneal pretrain")?;
    if !out.status.success() {
        bail!(
            "anneal pretrain failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let summary_path = run_dir.join("summary.json");
    let anneal: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&summary_path)
            .with_context(|| format!("reading {}", summary_path.display()))?,
    )?;
    let mut rows = vec![("anneal".to_string(), anneal)];
    let mut references = Vec::new();
    if with_torch {
        references.push((
            bench_script(&b.torch_script, "torch_pretrain.py"),
            "PyTorch",
        ));
        if b.nanogpt {
            references.push((
                bench_script(&None, "nanogpt_shakespeare.py"),
                "nanoGPT's recipe, PyTorch",
            ));
        }
    }
    for (script, label) in references {
        let out = Command::new("python3")
            .arg(&script)
            .arg("--config")
            .arg(&b.config)
            .args(&sets)
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        let v: serde_json::Value = parse_worker(out, &script.display().to_string())?;
        let name = format!("{label} {}", v["torch"].as_str().unwrap_or(""));
        rows.push((name, v));
    }
    println!(
        "\n| engine | validation loss | wall s | ms/step | tokens/s | peak RSS MB |\n|---|---|---|---|---|---|"
    );
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    for (name, v) in &rows {
        println!(
            "| {name} | {:.4} | {:.1} | {:.1} | {:.0} | {:.0} |",
            f(v, "val_loss"),
            f(v, "wall_seconds"),
            f(v, "ms_per_step"),
            f(v, "tokens_per_second"),
            f(v, "peak_rss_mb")
        );
    }
    let a = &rows[0].1;
    for (name, t) in &rows[1..] {
        println!(
            "\nanneal vs {name}: {:.2}x wall time, {:.2}x step time, {:.2}x peak RSS, validation loss {:+.4}",
            f(a, "wall_seconds") / f(t, "wall_seconds"),
            f(a, "ms_per_step") / f(t, "ms_per_step"),
            f(a, "peak_rss_mb") / f(t, "peak_rss_mb"),
            f(a, "val_loss") - f(t, "val_loss")
        );
    }
    Ok(())
}

/// Runs anneal's pipeline over `b`'s JSONL input into `b.out/name` with only `filters` and
/// `near_dedup` on, on `b.workers` threads.
fn bench_pipeline(
    b: &CurateBench,
    name: &str,
    filters: anneal_data::pipeline::FilterConfig,
    near_dedup: Option<anneal_data::pipeline::NearDedup>,
) -> Result<anneal_data::pipeline::PipelineStats> {
    use anneal_data::pipeline::*;
    let config = PipelineConfig {
        input: InputConfig {
            paths: vec![b.input.clone()],
            extensions: vec!["jsonl".into()],
            text_field: "text".into(),
        },
        output: OutputConfig {
            dir: b.out.join(name),
            shard_documents: 100_000,
        },
        normalize: None,
        exact_dedup: None,
        near_dedup,
        filters,
        signals: None,
    };
    Ok(anneal_tensor::with_threads(b.workers, || {
        run(&config, |_, _| {})
    })??)
}

fn curate(b: CurateBench) -> Result<()> {
    let filters = anneal_data::pipeline::FilterConfig {
        c4: Some(Default::default()),
        gopher_quality: Some(Default::default()),
        gopher_repetition: Some(Default::default()),
        ..Default::default()
    };
    let stats = bench_pipeline(&b, "anneal", filters, None)?;
    let removed = |name: &str| {
        stats
            .stages
            .iter()
            .find(|s| s.0 == name)
            .map_or(0, |s| s.1.removed)
    };
    println!("| engine | wall s | MB/s | kept | removed by C4 | by Gopher quality | by Gopher repetition |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| anneal | {:.1} | {:.2} | {} | {} | {} | {} |",
        stats.seconds,
        stats.mb_per_s(),
        stats.kept,
        removed("c4"),
        removed("gopher_quality"),
        removed("gopher_repetition")
    );
    let Some(v) = run_datatrove(&b, "datatrove_filters.py", "datatrove spacy")? else {
        return Ok(());
    };
    let wall = v["wall_seconds"].as_f64().unwrap_or(f64::NAN);
    println!(
        "| datatrove | {wall:.1} | {:.2} | {} | {} | {} | {} |",
        stats.input.bytes as f64 / 1e6 / wall,
        v["kept"],
        v["removed"]["c4"],
        v["removed"]["gopher_quality"],
        v["removed"]["gopher_repetition"]
    );
    println!("\nanneal is {:.1}x faster", wall / stats.seconds);
    Ok(())
}

fn dedup(b: CurateBench) -> Result<()> {
    let stats = bench_pipeline(
        &b,
        "anneal-dedup",
        Default::default(),
        Some(Default::default()),
    )?;
    println!("| engine | wall s | MB/s | kept | removed |");
    println!("|---|---|---|---|---|");
    println!(
        "| anneal (12 bands × 10 rows, verified at 0.8) | {:.1} | {:.2} | {} | {} |",
        stats.seconds,
        stats.mb_per_s(),
        stats.kept,
        stats.input.documents - stats.kept
    );
    let Some(v) = run_datatrove(&b, "datatrove_minhash.py", "datatrove xxhash")? else {
        return Ok(());
    };
    let wall = v["wall_seconds"].as_f64().unwrap_or(f64::NAN);
    println!(
        "| datatrove ({} buckets × {} hashes) | {wall:.1} | {:.2} | {} | {} |",
        v["bands"],
        v["rows"],
        stats.input.bytes as f64 / 1e6 / wall,
        v["kept"],
        v["removed"]
    );
    println!("\nanneal is {:.1}x faster", wall / stats.seconds);
    Ok(())
}

/// Runs a datatrove script of bench/ on `b`'s input and returns the JSON line it prints, or
/// `None` (after saying why and what to install) when datatrove could not run.
fn run_datatrove(
    b: &CurateBench,
    script: &str,
    packages: &str,
) -> Result<Option<serde_json::Value>> {
    if b.datatrove == Reference::Off {
        println!("(datatrove side off)");
        return Ok(None);
    }
    let script = bench_script(&b.datatrove_script, script);
    let name = script
        .file_stem()
        .map_or("datatrove".into(), |n| n.to_string_lossy().into_owned());
    let out = Command::new("python3")
        .arg(&script)
        .arg("--input")
        .arg(&b.input)
        .arg("--out")
        .arg(b.out.join(name))
        .arg("--workers")
        .arg(b.workers.to_string())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    match parse_worker(out, "datatrove") {
        Ok(v) => Ok(Some(v)),
        Err(e) if b.datatrove == Reference::Require => {
            Err(e.context(format!("--datatrove require: pip install {packages}")))
        }
        Err(e) => {
            let why = format!("{e:#}");
            let tail: Vec<&str> = why.lines().rev().take(3).collect();
            println!(
                "datatrove did not run (pip install {packages}):\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            Ok(None)
        }
    }
}
