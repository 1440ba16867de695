//! `anneal bench moe`: forward and backward of a Mixture-of-Experts feed-forward layer against
//! the dense GPT-2 MLP of the same active FLOPs per token (top-1 experts as wide as the dense
//! network; top-2 experts half as wide), and against a PyTorch implementation of the same layer,
//! gather/scatter style (`bench/torch_moe.py`), on the same shapes.
//!
//! anneal's cases run in this process in lock-step (one step of each case in turn, repeated), so
//! that the ratios to the dense layer are not skewed by the machine's load drifting between
//! cases; the medians are reported.

use anneal_nn::layers::{Builder, Mlp, MlpKind, MoeConfig, MoeMlp, WeightLayout, Weights};
use anneal_tensor::{DType, ParamStore, Rng, Tensor};
use anyhow::{Context, Result};
use clap::Args;
use std::process::Command;
use std::time::Instant;

#[derive(Args, Clone, Debug)]
pub struct MoeBench {
    /// Tokens per step (batch × context).
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Width of the residual stream.
    #[arg(long, default_value_t = 256)]
    width: usize,
    /// Untimed steps per case first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Timed steps per case.
    #[arg(long, default_value_t = 15)]
    reps: usize,
    /// Capacity factor of the MoE cases in training ("none": dropless).
    #[arg(long, default_value = "1.25")]
    capacity_factor: String,
    /// Skip the PyTorch comparison.
    #[arg(long)]
    no_torch: bool,
    /// Kernel threads (the pool's size).
    #[arg(skip = 1usize)]
    pub threads: usize,
}

/// One layer to time: the dense MLP or an MoE layer, with its parameters.
struct Case {
    name: String,
    layer: Layer,
    params: ParamStore,
    weights: Weights,
}

enum Layer {
    Dense(Mlp),
    Experts(MoeMlp),
}

impl Case {
    fn new(name: &str, d: usize, experts: Option<(usize, usize, Option<f64>)>) -> Result<Case> {
        let mut b = Builder::new(7);
        let kind = MlpKind::Gelu {
            fc: "c_fc",
            proj: "c_proj",
        };
        let layer = match experts {
            None => Layer::Dense(Mlp::new(
                &mut b,
                "mlp",
                d,
                4 * d,
                kind,
                true,
                WeightLayout::InOut,
                0.02,
                0.02,
            )?),
            Some((e, k, factor)) => Layer::Experts(MoeMlp::new(
                &mut b,
                "mlp",
                d,
                4 * d / k,
                MoeConfig {
                    top_k: k,
                    capacity_factor: factor,
                    ..MoeConfig::switch(e)
                },
                ("c_fc", "c_proj"),
                false,
                true,
                0.02,
                0.02,
            )?),
        };
        let (params, parallel) = b.build(DType::F32);
        let weights = Weights::new(&params, parallel);
        Ok(Case {
            name: name.to_string(),
            layer,
            params,
            weights,
        })
    }

    /// One forward and backward on `x` with upstream gradient `gy`; returns the dropped share.
    fn step(&self, x: &Tensor, gy: &Tensor) -> Result<f64> {
        self.params.zero_grad();
        let x = x.detach().requires_grad_();
        let (loss, dropped) = match &self.layer {
            Layer::Dense(m) => (m.forward(&self.weights, &x)?.mul(gy)?.sum_all()?, 0.0),
            Layer::Experts(m) => {
                let (y, aux) = m.forward(&self.weights, &x, Some(1.into()))?;
                let loss = y.mul(gy)?.sum_all()?.add(&aux.balance)?.add(&aux.z)?;
                (loss, aux.dropped)
            }
        };
        loss.backward()?;
        Ok(dropped)
    }
}

/// The median of `v` (NaN when empty).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn moe(b: MoeBench) -> Result<()> {
    let d = b.width;
    let factor = match b.capacity_factor.trim() {
        "none" => None,
        f => Some(
            f.parse::<f64>()
                .ok()
                .filter(|f| *f > 0.0)
                .context("--capacity-factor takes a positive number or \"none\"")?,
        ),
    };
    let cases = [
        Case::new("dense", d, None)?,
        Case::new("moe8-top1", d, Some((8, 1, factor)))?,
        Case::new("moe16-top1", d, Some((16, 1, factor)))?,
        Case::new("moe8-top2", d, Some((8, 2, factor)))?,
    ];
    let mut rng = Rng::new(3);
    let x = Tensor::randn(&[b.tokens, d], 1.0, DType::F32, &mut rng);
    let gy = Tensor::randn(&[b.tokens, d], 1.0, DType::F32, &mut rng);
    let (peak, how) = anneal_train::machine::peak_gflops(b.threads);
    println!(
        "MoE feed-forward layer, forward + backward: {} tokens, width {d}, capacity factor {}, \
         {} threads (f32 peak {peak:.0} GFLOP/s: {how}); every case has the dense MLP's active \
         FLOPs (top-1 experts 4·d wide, top-2 experts 2·d wide)\n",
        b.tokens, b.capacity_factor, b.threads,
    );
    for c in &cases {
        for _ in 0..b.warmup {
            c.step(&x, &gy)?;
        }
    }
    let mut times = vec![Vec::new(); cases.len()];
    let mut dropped = vec![0.0; cases.len()];
    for _ in 0..b.reps.max(1) {
        for (i, c) in cases.iter().enumerate() {
            let t0 = Instant::now();
            dropped[i] = c.step(&x, &gy)?;
            times[i].push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let ms: Vec<f64> = times.into_iter().map(median).collect();
    let torch = if b.no_torch { None } else { torch_times(&b) };
    println!(
        "{:<12} {:>10} {:>10} {:>12} {:>12} {:>14}",
        "case", "anneal ms", "vs dense", "dropped", "PyTorch ms", "anneal/PyTorch"
    );
    for (i, c) in cases.iter().enumerate() {
        let t = torch
            .as_ref()
            .and_then(|t| t.iter().find(|(n, _)| *n == c.name).map(|(_, ms)| *ms));
        println!(
            "{:<12} {:>10.1} {:>9.2}x {:>11.1}% {:>12} {:>14}",
            c.name,
            ms[i],
            ms[i] / ms[0],
            100.0 * dropped[i],
            t.map_or("-".into(), |t| format!("{t:.1}")),
            t.map_or("-".into(), |t| format!("{:.2}x", ms[i] / t)),
        );
    }
    if torch.is_none() && !b.no_torch {
        println!("\n(PyTorch not importable by python3: comparison skipped; `pip install torch`)");
    }
    Ok(())
}

/// The PyTorch reference's median milliseconds per case, or `None` when it cannot run.
fn torch_times(b: &MoeBench) -> Option<Vec<(String, f64)>> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/torch_moe.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(["--tokens", &b.tokens.to_string()])
        .args(["--d", &b.width.to_string()])
        .args(["--threads", &b.threads.to_string()])
        .args(["--warmup", &b.warmup.to_string()])
        .args(["--reps", &b.reps.to_string()])
        .args(["--capacity-factor", &b.capacity_factor])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| Some((v["case"].as_str()?.to_string(), v["ms"].as_f64()?)))
            .collect(),
    )
}
