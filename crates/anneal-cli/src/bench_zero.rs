//! `anneal bench zero`: each rank's parameter, gradient and optimizer bytes under ZeRO stages 0, 1
//! and 2, against `anneal plan`'s formulas for the same model (`anneal_plan::memory::model_states`),
//! plus the peak of the engine's tensor storage over two steps (parameters, gradients,
//! activations and communication copies; the optimizer's moments are plain vectors, counted in
//! their own column). The gradient column is the allocator's peak of gradient storage over the
//! two steps: the store's gradient buffer (ZeRO-2: its shard) and, under ZeRO-2, the buckets
//! backward fills and those in flight to the other ranks. Run it under `mpirun -np N` (built with `--features mpi`) for
//! one process per rank, where the allocator's peak is that rank's alone, or with `--ranks N` as
//! threads of one process (the peak is then the process's).

use anneal_dist::Communicator;
use anneal_plan::memory::{model_states, DtypePolicy};
use anneal_train::trainer::pretraining_on;
use anneal_train::RunConfig;
use anyhow::Result;
use clap::Args;

#[derive(Args, Clone, Debug)]
pub struct ZeroBench {
    /// Transformer blocks.
    #[arg(long, default_value_t = 7)]
    layers: usize,
    /// Width of the residual stream.
    #[arg(long, default_value_t = 768)]
    width: usize,
    /// Vocabulary (the default model has 56M parameters).
    #[arg(long, default_value_t = 8192)]
    vocab: usize,
    /// Context length (one sequence per rank per step).
    #[arg(long, default_value_t = 64)]
    seq: usize,
    /// Ranks as threads of this process (ignored under mpirun, whose processes are the ranks).
    #[arg(long, default_value_t = 2)]
    ranks: usize,
    /// Gradient bucket size in MB (`parallel.bucket_mb`).
    #[arg(long, default_value_t = 25.0)]
    bucket_mb: f64,
    /// ZeRO stages to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [0u8, 1, 2])]
    stages: Vec<u8>,
    /// Kernel threads per rank.
    #[arg(skip = 1usize)]
    pub threads: usize,
}

/// Values [`measure`] returns per rank.
const MEASURED: usize = 6;

/// One rank's measured bytes: parameters, gradients held after the steps, the gradient peak,
/// optimizer state, the tensor-storage peak, and the largest parameter.
fn measure(b: &ZeroBench, stage: u8, world: &dyn Communicator) -> Result<[f64; MEASURED]> {
    let ranks = world.size();
    let sets = [
        format!("model.n_layer={}", b.layers),
        format!("model.n_embd={}", b.width),
        format!("model.n_head={}", (b.width / 64).max(1)),
        format!("model.block_size={}", b.seq),
        format!("train.batch_size={ranks}"),
        format!("parallel.zero={stage}"),
        format!("parallel.bucket_mb={}", b.bucket_mb),
        "train.warmup_steps=1".into(),
    ];
    let config = RunConfig::load(None, &sets)?;
    world.barrier()?;
    let before = anneal_tensor::memory_stats();
    let source = crate::bench::RandomTokens {
        vocab: b.vocab,
        seq: b.seq,
    };
    let mut trainer = pretraining_on(
        &config,
        b.vocab,
        Box::new(source),
        Some(world.split(0, world.rank())?),
    )?;
    // The peaks of the two steps (building the model first lays its gradients out flat).
    anneal_tensor::reset_peak_memory();
    for _ in 0..2 {
        trainer.step()?;
    }
    let params = trainer.model().params();
    let after = anneal_tensor::memory_stats();
    let peak = after.peak_bytes.saturating_sub(before.live_bytes);
    // What the store holds (the buckets are given back by the end of a step).
    let held = params.grads().bytes()
        + params
            .gradient_buckets()
            .iter()
            .filter_map(|b| b.storage.as_ref())
            .map(|s| s.bytes())
            .sum::<usize>();
    let grad_peak = after.grad_peak_bytes.saturating_sub(before.grad_live_bytes);
    let largest = params.infos().iter().map(|p| 4 * p.len).max().unwrap_or(0);
    Ok([
        params.bytes() as f64,
        held as f64,
        grad_peak as f64,
        trainer.optimizer().state_bytes() as f64,
        peak as f64,
        largest as f64,
    ])
}

/// Measures every stage on `world`; rank 0 prints the table.
fn bench_on(b: &ZeroBench, world: &dyn Communicator, processes: bool) -> Result<()> {
    let ranks = world.size();
    let lead = world.rank() == 0;
    if lead {
        println!(
            "ZeRO memory per rank: GPT {} layers × {} wide, vocabulary {}, {} ranks ({}), batch 1 \
             per rank, f32",
            b.layers,
            b.width,
            b.vocab,
            ranks,
            if processes {
                "MPI processes: the peaks are each rank's"
            } else {
                "threads of one process: the gradient and tensor peaks are the whole process's"
            }
        );
        println!(
            "{:>5} {:>4} {:>9} {:>9} {:>10} {:>10} {:>9} {:>9} {:>9} {:>8} {:>8} {:>11}",
            "stage",
            "rank",
            "params MB",
            "plan",
            "grads held",
            "grads peak",
            "plan",
            "optim MB",
            "plan",
            "held",
            "peak",
            "tensor peak"
        );
    }
    let mut largest = 0.0f64;
    for &stage in &b.stages {
        let mine = measure(b, stage, world)?;
        let all = world.all_gather(mine.iter().map(|&v| v as f32).collect())?;
        if !lead {
            continue;
        }
        for (rank, m) in all.chunks(MEASURED).enumerate() {
            // The parameter count the model really has, from its f32 bytes.
            let psi = m[0] as f64 / 4.0;
            let plan = model_states(psi, DtypePolicy::Fp32, stage, ranks);
            let (params, held, peak, optim) = (m[0] as f64, m[1] as f64, m[2] as f64, m[3] as f64);
            largest = m[5] as f64;
            println!(
                "{stage:>5} {rank:>4} {:>9.1} {:>9.1} {:>10.1} {:>10.1} {:>9.1} {:>9.1} {:>9.1} {:>7.3}x {:>7.3}x {:>11.1}",
                params / 1e6,
                plan.params / 1e6,
                held / 1e6,
                peak / 1e6,
                plan.grads / 1e6,
                optim / 1e6,
                plan.optimizer / 1e6,
                (params + held + optim) / plan.total(),
                (params + peak + optim) / plan.total(),
                m[4] / 1e6,
            );
        }
    }
    if lead {
        println!(
            "(plan: anneal_plan::memory::model_states, 4Ψ parameters, 4Ψ gradients, 8Ψ Adam \
             moments, the stage's share divided by the ranks. grads held: the gradient bytes a \
             rank keeps between micro-batches and steps; grads peak: the allocator's peak of \
             gradient storage during the steps, which under ZeRO-2 adds the buckets backward \
             fills and those in flight ({} at most, of --bucket-mb or one parameter each; the \
             largest parameter holds {:.1} MB, and a tied embedding's gradient is held whole from \
             the head's backward to the embedding's). held, peak: params + grads + optimizer \
             against the plan's model states.)",
            anneal_train::strategy::ZeroTwo::MAX_IN_FLIGHT,
            largest / 1e6
        );
    }
    Ok(())
}

/// `anneal bench zero`.
pub fn zero(b: ZeroBench) -> Result<()> {
    if anneal_dist::launched_by_mpi() {
        return zero_mpi(b);
    }
    let threads = b.threads.max(1);
    anneal_dist::local::run(b.ranks.max(1), |comm| {
        anneal_tensor::with_threads(threads, || bench_on(&b, &comm, false))
            .map_err(anyhow::Error::from)
            .and_then(|r| r)
            .map_err(|e| format!("{e:#}"))
    })?;
    Ok(())
}

#[cfg(feature = "mpi")]
fn zero_mpi(b: ZeroBench) -> Result<()> {
    anneal_dist::mpi::abort_on_panic();
    let world = anneal_dist::mpi::init()?;
    if let Err(e) = anneal_tensor::with_threads(b.threads.max(1), || bench_on(&b, &world, true))
        .map_err(anyhow::Error::from)
        .and_then(|r| r)
    {
        eprintln!("error: rank {}: {e:#}", world.rank());
        anneal_dist::mpi::abort(1);
    }
    Ok(())
}

#[cfg(not(feature = "mpi"))]
fn zero_mpi(_b: ZeroBench) -> Result<()> {
    anyhow::bail!(
        "anneal was started by mpirun but built without MPI: build it with \
         `cargo build --release --features mpi`"
    )
}
