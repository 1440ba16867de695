//! `anneal plan`: rank every parallel layout of a model on a cluster.

use anneal_plan::cluster::Cluster;
use anneal_plan::flops::Recompute;
use anneal_plan::memory::DtypePolicy;
use anneal_plan::planner::{Efficiency, Job};
use anneal_plan::{ModelSpec, MoeSpec};
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

/// Arguments of `anneal plan`. Every flag may also come from a TOML file (`--config`) under the
/// same name with underscores (`kv_heads = 8`); flags given on the command line win.
#[derive(Args, Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlanArgs {
    /// A TOML file with any of these settings.
    #[arg(long, short)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Transformer layers.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Hidden size.
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Attention heads.
    #[arg(long)]
    pub heads: Option<usize>,
    /// Key/value heads (grouped-query attention; default: --heads).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Feed-forward size (default: 4 × hidden, or Llama's 8/3 × hidden rounded to 256 with
    /// --llama).
    #[arg(long)]
    pub ffn: Option<usize>,
    /// Llama-style blocks: gated (SwiGLU) feed-forward, RMSNorm, no biases, rotary positions.
    #[arg(long)]
    pub llama: bool,
    /// Vocabulary size.
    #[arg(long, default_value_t = 51200)]
    pub vocab: usize,
    /// Sequence length.
    #[arg(long, default_value_t = 2048)]
    pub seq: usize,
    /// Experts per MoE layer (0: dense).
    #[arg(long, default_value_t = 0)]
    pub experts: usize,
    /// Experts per token.
    #[arg(long, default_value_t = 2)]
    pub top_k: usize,
    /// Expert capacity factor.
    #[arg(long, default_value_t = 1.25)]
    pub capacity_factor: f64,
    /// Every n-th layer is an MoE layer.
    #[arg(long, default_value_t = 1)]
    pub moe_every: usize,
    /// Global batch in sequences.
    #[arg(long)]
    pub batch: Option<usize>,
    /// fp32, bf16 or fp16 (the 16-bit ones with fp32 master weights).
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Node preset: a100-40gb, a100-80gb, h100, h200; or `local`, this machine's CPU cores as
    /// --ranks ranks, with its f32 peak and the all-reduce bandwidth and latency between ranks
    /// measured when the plan runs.
    #[arg(long, default_value = "a100-80gb")]
    pub cluster: String,
    /// Nodes of 8 accelerators (not for `local`).
    #[arg(long)]
    pub nodes: Option<usize>,
    /// Ranks of the `local` cluster (its cores are shared among them).
    #[arg(long, default_value_t = 2)]
    pub ranks: usize,
    /// Achievable fraction of peak in large matrix products.
    #[arg(long)]
    pub matmul_efficiency: Option<f64>,
    /// Achievable fraction of link bandwidth.
    #[arg(long)]
    pub link_efficiency: Option<f64>,
    /// Share of data-parallel gradient traffic hidden behind backward.
    #[arg(long)]
    pub dp_overlap: Option<f64>,
    /// Reduce gradients in the 16-bit dtype instead of fp32.
    #[arg(long)]
    pub half_grad_reduce: bool,
    /// Layouts shown.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Show only the layouts that match, each `key=value` of dp, tp, pp, ep, zero, mb (sequences
    /// per micro-batch), schedule (gpipe or 1f1b) and recompute (none, selective or full):
    /// `--only tp=2,pp=2,mb=4,recompute=none` gives the estimate of the layout a run uses.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also draw the memory breakdown and MFU of the top layouts into this PNG.
    #[arg(long)]
    pub chart: Option<PathBuf>,
}

fn recompute_name(r: Recompute) -> &'static str {
    match r {
        Recompute::None => "none",
        Recompute::Selective => "selective",
        Recompute::Full => "full",
    }
}

/// The arguments with a `--config` file's settings filled in where no flag was given: anneal's
/// one loader reads clap's defaults, then the file, then every flag whose value differs from its
/// default as an override.
fn merged(a: PlanArgs) -> Result<PlanArgs> {
    let Some(path) = a.config.clone() else {
        return Ok(a);
    };
    let defaults = <PlanArgs as clap::FromArgMatches>::from_arg_matches(
        &<PlanArgs as clap::Args>::augment_args(clap::Command::new("plan"))
            .get_matches_from(["plan"]),
    )?;
    let table = |p: &PlanArgs| toml::Table::try_from(p).expect("plan settings serialise");
    let (given, default) = (table(&a), table(&defaults));
    let flags: Vec<String> = given
        .iter()
        .filter(|(k, v)| default.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    // Optional settings (layers, nodes, …) are allowed though their default is to be absent.
    let example = PlanArgs {
        layers: Some(1),
        hidden: Some(1),
        heads: Some(1),
        kv_heads: Some(1),
        ffn: Some(1),
        batch: Some(1),
        nodes: Some(1),
        matmul_efficiency: Some(1.0),
        link_efficiency: Some(1.0),
        dp_overlap: Some(1.0),
        chart: Some(PathBuf::new()),
        ..defaults.clone()
    };
    let mut merged: PlanArgs = anneal_config::Loader::new(&defaults)
        .allow(&example)
        .load(Some(&path), &flags)?;
    merged.config = a.config;
    Ok(merged)
}

/// The f32 GFLOP/s a GPT training step of `model` at `batch` sequences sustains on `threads`
/// threads (forward, backward, AdamW; the median of 3 steps after 1 untimed), its FLOPs counted by
/// [`anneal_plan::flops::step`] as the planner counts them. Models anneal cannot build as a GPT
/// (gated, Mixture-of-Experts) or that would need more than a quarter of `memory` are measured
/// on `anneal bench gpt`'s workload instead (4 layers, 256 wide, 256 tokens, batch 8, vocabulary
/// 512). Returns the rate and what was measured.
fn sustained_gflops(
    threads: usize,
    model: &ModelSpec,
    batch: usize,
    memory: f64,
) -> Result<(f64, String)> {
    use anneal_nn::GptConfig;
    // Parameters, gradients and Adam moments, and a generous allowance for activations.
    let needs =
        16.0 * model.params() + 40.0 * (batch * model.seq * model.hidden * model.layers) as f64;
    let own = !model.gated_ffn
        && model.moe.is_none()
        && model.kv_heads == model.heads
        && model.ffn == 4 * model.hidden
        && needs < memory / 4.0;
    let (cfg, b) = if own {
        let cfg = GptConfig {
            vocab_size: model.vocab,
            block_size: model.seq,
            n_layer: model.layers,
            n_head: model.heads,
            n_embd: model.hidden,
            ..GptConfig::bench()
        };
        (cfg, batch.max(1))
    } else {
        (GptConfig::bench(), 8)
    };
    let what = if own {
        format!("this model at {b} sequence(s)")
    } else {
        "anneal bench gpt's workload".to_string()
    };
    anneal_tensor::with_threads(threads, || -> Result<(f64, String)> {
        let (t, v) = (cfg.block_size, cfg.vocab_size);
        let mut stepper = crate::bench::Stepper::for_model(cfg.clone(), b)?;
        let mut times = Vec::new();
        for i in 0..4 {
            let began = std::time::Instant::now();
            stepper.step(&mut || {})?;
            if i > 0 {
                times.push(began.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        // Counted as the planner counts a step's FLOPs, so its estimates divide like by like.
        let spec = ModelSpec::gpt(cfg.n_layer, cfg.n_embd, cfg.n_head, v, t);
        let rate = anneal_plan::flops::step(&spec, b, Recompute::None) / times[1] / 1e9;
        Ok((rate, what))
    })?
}

/// This machine as `ranks` CPU ranks for `model` at a global batch of `batch`: each rank's f32
/// rate (what a training step of its share of the batch sustains on its share of the cores,
/// [`sustained_gflops`]; the planner's matrix efficiency is then 1), and the all-reduce bus bandwidth and
/// latency between `ranks` ranks of the local backend, fitted to the ring model the planner uses
/// (t = 2(n−1)/n · bytes / bandwidth + 2(n−1) · latency) from the median times of all-reduces of
/// 8 bytes and of 64 MB.
fn local_cluster(ranks: usize, model: &ModelSpec, batch: usize) -> Result<Cluster> {
    let cores = anneal_train::machine::threads(0);
    let per_rank = (cores / ranks).max(1);
    let memory = anneal_train::memory::physical_memory().unwrap_or(0.0);
    // More ranks than cores share them.
    let crowding = (ranks as f64 / cores as f64).max(1.0);
    let (rate, what) = sustained_gflops(per_rank, model, batch / ranks, memory)?;
    let gflops = rate / crowding;
    let how = format!(
        "a training step of {what} sustained on {per_rank} thread(s){}",
        if crowding > 1.0 {
            format!(", shared by {crowding:.1} ranks per core")
        } else {
            String::new()
        }
    );
    let times = |len: usize, reps: usize| -> Result<f64> {
        let all = anneal_dist::local::run(ranks, |comm| {
            use anneal_dist::Communicator;
            let mut t = Vec::with_capacity(reps);
            for _ in 0..reps + 1 {
                comm.barrier()?;
                let began = std::time::Instant::now();
                comm.all_reduce(vec![1.0f32; len], anneal_dist::Reduce::Sum)?;
                t.push(began.elapsed().as_secs_f64());
            }
            t.remove(0);
            t.sort_by(f64::total_cmp);
            Ok::<_, anneal_dist::Error>(t[t.len() / 2])
        })?;
        Ok(all.iter().copied().fold(0.0, f64::max))
    };
    let n = ranks as f64;
    let (latency, bandwidth) = if ranks > 1 {
        let small = times(2, 200)?;
        let big_len = 16 << 20;
        let big = times(big_len, 5)?;
        let latency = small / (2.0 * (n - 1.0));
        let bandwidth = 2.0 * (n - 1.0) / n * (4 * big_len) as f64 / (big - small).max(1e-9);
        (latency, bandwidth)
    } else {
        (0.0, f64::INFINITY)
    };
    eprintln!(
        "local: {ranks} ranks on {cores} cores, {gflops:.0} GFLOP/s f32 each ({how}); \
         all-reduce between them {:.2} GB/s bus bandwidth, {:.1} µs latency per step; {:.1} GB \
         of memory each",
        bandwidth / 1e9,
        latency * 1e6,
        memory / n / 1e9
    );
    Ok(Cluster::local(
        ranks,
        memory,
        gflops * 1e9,
        bandwidth,
        latency,
    ))
}

/// The job the arguments describe.
pub fn job(a: &PlanArgs) -> Result<Job> {
    let need = |v: Option<usize>, name: &str| {
        v.ok_or_else(|| {
            anyhow::anyhow!("--{name} is required (on the command line or in --config)")
        })
    };
    let local = a.cluster == "local";
    let (layers, hidden, heads, batch, nodes) = (
        need(a.layers, "layers")?,
        need(a.hidden, "hidden")?,
        need(a.heads, "heads")?,
        need(a.batch, "batch")?,
        if local { 1 } else { need(a.nodes, "nodes")? },
    );
    let policy = match a.dtype.as_str() {
        "fp32" => DtypePolicy::Fp32,
        "bf16" => DtypePolicy::Bf16,
        "fp16" => DtypePolicy::Fp16,
        other => bail!("--dtype {other:?} is not allowed: fp32, bf16 or fp16"),
    };
    let preset = if local {
        if !(1..=64).contains(&a.ranks) {
            bail!("--ranks {} is not allowed: 1 to 64", a.ranks);
        }
        None
    } else {
        let Some(cluster) = Cluster::preset(&a.cluster, nodes) else {
            bail!(
                "--cluster {:?} is not a preset: {}, local",
                a.cluster,
                Cluster::PRESETS.join(", ")
            );
        };
        Some(cluster)
    };
    // Sizes a plan can reason about: at least 1, and far above any model or cluster built, so a
    // typo cannot send the layout search off for ever.
    for (flag, value, most) in [
        ("--nodes", nodes, 1 << 16),
        ("--layers", layers, 10_000),
        ("--hidden", hidden, 1 << 20),
        ("--heads", heads, 1 << 14),
        ("--batch", batch, 1 << 30),
        ("--seq", a.seq, 1 << 24),
        ("--vocab", a.vocab, 1 << 24),
    ] {
        if !(1..=most).contains(&value) {
            bail!("{flag} {value} is not allowed: 1 to {most}");
        }
    }
    if hidden % heads != 0 {
        bail!("--hidden {hidden} is not a multiple of --heads {heads}");
    }
    let mut model = ModelSpec::gpt(layers, hidden, heads, a.vocab, a.seq);
    if a.llama {
        model.gated_ffn = true;
        model.ffn = (8 * hidden / 3).div_ceil(256) * 256;
    }
    if let Some(f) = a.ffn {
        if !(1..=1 << 22).contains(&f) {
            bail!("--ffn {f} is not allowed: 1 to {}", 1 << 22);
        }
        model.ffn = f;
    }
    model.kv_heads = a.kv_heads.unwrap_or(heads);
    if model.kv_heads == 0 || heads % model.kv_heads != 0 {
        bail!(
            "--kv-heads {} does not divide --heads {heads}",
            model.kv_heads
        );
    }
    if a.experts > 0 {
        if a.experts > 1 << 16 {
            bail!("--experts {} is not allowed: 0 to {}", a.experts, 1 << 16);
        }
        if !(1..=a.experts).contains(&a.top_k) {
            bail!(
                "--top-k {} is not allowed: 1 to --experts ({})",
                a.top_k,
                a.experts
            );
        }
        if !(a.capacity_factor.is_finite() && a.capacity_factor > 0.0) {
            bail!(
                "--capacity-factor {} is not allowed: a positive number",
                a.capacity_factor
            );
        }
        if !(1..=layers).contains(&a.moe_every) {
            bail!(
                "--moe-every {} is not allowed: 1 to --layers ({layers})",
                a.moe_every
            );
        }
        model.moe = Some(MoeSpec {
            experts: a.experts,
            top_k: a.top_k,
            capacity_factor: a.capacity_factor,
            every: a.moe_every,
        });
    }
    let cluster = match preset {
        Some(c) => c,
        None => local_cluster(a.ranks, &model, batch)?,
    };
    let d = Efficiency::default();
    let efficiency = Efficiency {
        // The local preset's rate is already a sustained training rate.
        matmul: a
            .matmul_efficiency
            .unwrap_or(if local { 1.0 } else { d.matmul }),
        link: a.link_efficiency.unwrap_or(d.link),
        dp_overlap: a.dp_overlap.unwrap_or(d.dp_overlap),
    };
    for (name, v) in [
        ("--matmul-efficiency", efficiency.matmul),
        ("--link-efficiency", efficiency.link),
    ] {
        if !(v > 0.0 && v <= 1.0) {
            bail!("{name} {v} is not allowed: a fraction in (0, 1]");
        }
    }
    if !(0.0..=1.0).contains(&efficiency.dp_overlap) {
        bail!(
            "--dp-overlap {} is not allowed: a fraction in [0, 1]",
            efficiency.dp_overlap
        );
    }
    Ok(Job {
        model,
        batch,
        policy,
        cluster,
        efficiency,
        reduce_grads_in_fp32: !a.half_grad_reduce && policy != DtypePolicy::Fp32,
    })
}

/// The estimates whose layouts match every `key=value` of `filters` (`--only`); fails naming a
/// key or value it does not know, or when none matches.
fn only(
    plan: Vec<anneal_plan::planner::Estimate>,
    filters: &[String],
) -> Result<Vec<anneal_plan::planner::Estimate>> {
    use anneal_plan::planner::Schedule;
    let mut kept = plan;
    for f in filters {
        let Some((key, value)) = f.split_once('=') else {
            bail!("--only {f:?} is not key=value (keys: dp, tp, pp, ep, zero, mb, schedule, recompute)");
        };
        let number = || -> Result<usize> {
            value
                .trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("--only {key}={value:?}: not a whole number"))
        };
        let keep: Box<dyn Fn(&anneal_plan::planner::Layout) -> bool> = match key.trim() {
            "dp" => { let n = number()?; Box::new(move |l| l.dp == n) }
            "tp" => { let n = number()?; Box::new(move |l| l.tp == n) }
            "pp" => { let n = number()?; Box::new(move |l| l.pp == n) }
            "ep" => { let n = number()?; Box::new(move |l| l.ep == n) }
            "zero" => { let n = number()?; Box::new(move |l| l.zero_stage as usize == n) }
            "mb" => { let n = number()?; Box::new(move |l| l.micro_batch == n) }
            "schedule" => {
                let s = match value.trim() {
                    "gpipe" => Schedule::GPipe,
                    "1f1b" => Schedule::OneFOneB,
                    other => bail!("--only schedule={other:?} is not allowed: gpipe or 1f1b"),
                };
                Box::new(move |l| l.schedule == s)
            }
            "recompute" => {
                let r = value.trim().to_string();
                if !["none", "selective", "full"].contains(&r.as_str()) {
                    bail!("--only recompute={r:?} is not allowed: none, selective or full");
                }
                Box::new(move |l| recompute_name(l.recompute) == r)
            }
            other => bail!(
                "--only {other:?} is not a layout key: dp, tp, pp, ep, zero, mb, schedule, recompute"
            ),
        };
        kept.retain(|e| keep(&e.layout));
    }
    if kept.is_empty() {
        bail!("no layout of this job matches --only {}", filters.join(","));
    }
    Ok(kept)
}

/// `anneal plan`.
pub fn run(a: PlanArgs) -> Result<()> {
    let a = merged(a)?;
    let job = job(&a)?;
    let plan = job.plan();
    if plan.is_empty() {
        bail!(
            "no layout divides this job: {} GPUs, {} layers, {} heads, batch {}",
            job.cluster.gpus(),
            job.model.layers,
            job.model.heads,
            job.batch
        );
    }
    let plan = only(plan, &a.only)?;
    let top: Vec<_> = plan.iter().take(a.top).collect();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&top)?);
    } else {
        let gb = |x: f64| x / 1e9;
        let peak = job.cluster.accelerator.peak_half;
        println!(
            "{:.2}B parameters ({:.2}B active), batch {} × {} tokens, {} × {} ({:.0} GB, {}), {} layouts",
            job.model.params() / 1e9,
            job.model.active_params() / 1e9,
            job.batch,
            job.model.seq,
            job.cluster.gpus(),
            job.cluster.accelerator.name,
            job.cluster.accelerator.memory / 1e9,
            if peak < 1e12 {
                format!("{:.0} GFLOP/s", peak / 1e9)
            } else {
                format!("{:.0} TFLOP/s", peak / 1e12)
            },
            plan.len()
        );
        println!(
            "{:>3} {:>5} {:>3} {:>4} {:>3} {:>3} {:>5} {:>4} {:>9} | {:>6} {:>6} {:>6} {:>6} {:>6} {:>4} | {:>7} {:>6} {:>6} {:>11} {:>6}",
            "#", "dp", "tp", "pp", "ep", "mb", "sched", "zero", "recompute", "param", "grad", "optim", "act", "total", "fits",
            "compute", "bubble", "comm", "tokens/s", "MFU"
        );
        for (i, e) in top.iter().enumerate() {
            let l = &e.layout;
            println!(
                "{:>3} {:>5} {:>3} {:>4} {:>3} {:>3} {:>5} {:>4} {:>9} | {:>6.1} {:>6.1} {:>6.1} {:>6.1} {:>6.1} {:>4} | {:>7.2} {:>6.2} {:>6.2} {:>11.0} {:>5.1}%",
                i + 1,
                l.dp,
                l.tp,
                l.pp,
                l.ep,
                l.micro_batch,
                match l.schedule {
                    anneal_plan::planner::Schedule::GPipe => "gpipe",
                    anneal_plan::planner::Schedule::OneFOneB => "1f1b",
                },
                l.zero_stage,
                recompute_name(l.recompute),
                gb(e.memory.params),
                gb(e.memory.grads),
                gb(e.memory.optimizer),
                gb(e.memory.activations),
                gb(e.memory.total()),
                if e.fits { "yes" } else { "no" },
                e.compute_s,
                e.bubble_s,
                e.comm_s.iter().sum::<f64>(),
                e.tokens_per_s,
                100.0 * e.mfu
            );
        }
        let best = &plan[0];
        if best.fits {
            let comm: f64 = best.comm_s.iter().sum();
            println!(
                "\nrecommended: dp {} × tp {} × pp {}: {:.1} of {:.0} GB per device; a step of {:.2} s is {:.0}% compute, {:.0}% pipeline bubble, {:.0}% exposed communication (tensor {:.2} s, pipeline {:.2} s, data {:.2} s, all-to-all {:.2} s); MFU {:.1}%",
                best.layout.dp,
                best.layout.tp,
                best.layout.pp,
                gb(best.memory.total()),
                job.cluster.accelerator.memory / 1e9,
                best.step_s,
                100.0 * best.compute_s / best.step_s,
                100.0 * best.bubble_s / best.step_s,
                100.0 * comm / best.step_s,
                best.comm_s[0],
                best.comm_s[1],
                best.comm_s[2],
                best.comm_s[3],
                100.0 * best.mfu
            );
        } else {
            println!("\nno layout fits in {:.0} GB per device: add nodes, shard with ZeRO, or shorten the sequence", job.cluster.accelerator.memory / 1e9);
        }
    }
    if let Some(path) = &a.chart {
        let labels: Vec<String> = top
            .iter()
            .map(|e| {
                format!(
                    "{}/{}/{} b{} z{}",
                    e.layout.dp,
                    e.layout.tp,
                    e.layout.pp,
                    e.layout.micro_batch,
                    e.layout.zero_stage
                )
            })
            .collect();
        let series = [
            (
                "parameters",
                top.iter()
                    .map(|e| e.memory.params / 1e9)
                    .collect::<Vec<_>>(),
            ),
            (
                "gradients",
                top.iter().map(|e| e.memory.grads / 1e9).collect(),
            ),
            (
                "optimizer",
                top.iter().map(|e| e.memory.optimizer / 1e9).collect(),
            ),
            (
                "activations",
                top.iter().map(|e| e.memory.activations / 1e9).collect(),
            ),
        ];
        let mfu: Vec<f64> = top.iter().map(|e| 100.0 * e.mfu).collect();
        anneal_chart::stacked_bars(
            path,
            "memory per device (GB) and MFU (%) of the top layouts (dp/tp/pp, micro-batch, ZeRO stage)",
            &labels,
            &series,
            "GB",
            ("MFU %", &mfu),
        )?;
        eprintln!("chart: {}", path.display());
    }
    Ok(())
}
