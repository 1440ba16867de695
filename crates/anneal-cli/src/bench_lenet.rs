//! `anneal bench lenet`: LeNet-5 training steps (forward, cross-entropy, backward, AdamW) on
//! batches of 28×28 images through the trainer, against the same model and optimizer in
//! PyTorch (`bench/torch_lenet.py`), as the time of one epoch of Fashion-MNIST's 60,000 images.
//!
//! The PyTorch run sits between two halves of anneal's, and anneal's time is the median over
//! both halves, so a drift in the machine's load weighs on both sides alike.

use crate::bench_moe::median;
use anneal_data::batch::LabelledImages;
use anneal_data::{Batch, BatchSource, Sampler};
use anneal_nn::{LeNet, LeNetConfig};
use anneal_tensor::{DType, Rng, Tensor};
use anneal_train::objectives::ImageClassification;
use anneal_train::vision::{simple_trainer, Optim, TrainSettings};
use anyhow::Result;
use clap::Args;
use std::process::Command;
use std::time::Instant;

#[derive(Args, Clone, Debug)]
pub struct LenetBench {
    /// Images per step.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// Timed steps (per side; anneal's split in two halves around PyTorch's).
    #[arg(long, default_value_t = 300)]
    reps: usize,
    /// Skip the PyTorch comparison.
    #[arg(long)]
    no_torch: bool,
    /// Print the time of each kind of op, forward and backward, over 50 extra steps.
    #[arg(long)]
    profile: bool,
    /// Kernel threads (the pool's size).
    #[arg(skip = 1usize)]
    pub threads: usize,
}

/// The same batch every step.
struct Fixed(Batch);

impl BatchSource for Fixed {
    fn draw(&self, _: &Sampler, _: u64, _: u64, _: usize) -> Batch {
        self.0.clone()
    }
}

pub fn lenet(b: LenetBench) -> Result<()> {
    let mut rng = Rng::new(0);
    let pixels = Tensor::randn(&[b.batch, 1, 28, 28], 1.0, DType::F32, &mut rng).to_vec_f32();
    let batch = Batch::Images(LabelledImages {
        pixels,
        shape: [b.batch, 1, 28, 28],
        views: 1,
        labels: (0..b.batch as i64).map(|i| i % 10).collect(),
    });
    let settings = TrainSettings {
        steps: u64::MAX,
        batch: b.batch,
        lr: 1e-3,
        weight_decay: 5e-4,
        optimizer: Optim::AdamW,
        seed: 0,
    };
    let mut trainer = simple_trainer(
        Box::new(LeNet::new(LeNetConfig::default(), 0)?),
        Box::new(ImageClassification),
        Box::new(Fixed(batch)),
        &settings,
    );
    trainer.measure_grad_norm = false;
    println!(
        "LeNet-5 training step (forward, cross-entropy, backward, AdamW), batch {}, {} threads; \
         kernel path: {}",
        b.batch,
        b.threads,
        anneal_tensor::kernel_path()
    );
    for _ in 0..b.warmup {
        trainer.step()?;
    }
    let mut times = Vec::with_capacity(b.reps);
    let mut half = |n: usize| -> Result<()> {
        for _ in 0..n {
            let t0 = Instant::now();
            trainer.step()?;
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        Ok(())
    };
    half(b.reps / 2)?;
    let torch = if b.no_torch { None } else { torch_ms(&b) };
    half(b.reps - b.reps / 2)?;
    let ms = median(times);
    if b.profile {
        let mut profile = anneal_train::trainer::OpProfile::default();
        for _ in 0..50 {
            profile.step(&mut trainer)?;
        }
        for (pass, line) in profile.report(10) {
            println!("{pass} per step: {line}");
        }
    }
    let steps_per_epoch = 60_000f64 / b.batch as f64;
    println!(
        "{:<8} {:>12} {:>12}\n{:<8} {:>12.2} {:>12.1}",
        "engine",
        "ms/step",
        "s/epoch",
        "anneal",
        ms,
        ms * steps_per_epoch / 1e3
    );
    match torch {
        Some(t) => println!(
            "{:<8} {:>12.2} {:>12.1}\nanneal / PyTorch epoch time: {:.2}x",
            "PyTorch",
            t,
            t * steps_per_epoch / 1e3,
            ms / t
        ),
        None if !b.no_torch => {
            println!("(PyTorch not importable by python3: comparison skipped; `pip install torch`)")
        }
        None => {}
    }
    Ok(())
}

/// PyTorch's median milliseconds per step, or `None` when it cannot run.
fn torch_ms(b: &LenetBench) -> Option<f64> {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/torch_lenet.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(["--batch", &b.batch.to_string()])
        .args(["--threads", &b.threads.to_string()])
        .args(["--warmup", &b.warmup.to_string()])
        .args(["--reps", &b.reps.to_string()])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["ms"].as_f64())
}
