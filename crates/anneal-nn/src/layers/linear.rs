//! A fully connected layer, `y = x·W + b`, optionally split across the tensor-parallel group by
//! output columns or input rows (Megatron-LM's column- and row-parallel linear layers).

use super::{join, Builder, Init, Split, Weights};
use anneal_tensor::{Error, ParamId, ParamStore, Result, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): beside a frozen
/// weight W `[out, in]`, a trainable update ΔW = (α/r)·B·A with A `[r, in]` and B `[out, r]`,
/// B starting at zero so the adapted model starts as the base. Applied to the linear layers whose
/// name is one of `targets` or ends with `.target` (PEFT's matching: `query` adapts every
/// `….attention.self.query`). Parameters are named as PEFT names them: `<layer>.lora_A.weight`
/// and `<layer>.lora_B.weight`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// The rank r.
    pub rank: usize,
    /// α: the update is scaled by α/r.
    pub alpha: f32,
    /// Names (or name suffixes) of the linear layers to adapt.
    pub targets: Vec<String>,
    /// Dropout on the adapter's input while training (PEFT's `lora_dropout`; the base
    /// weight's input is never dropped).
    pub dropout: f32,
}

impl LoraConfig {
    /// α/r.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// The target that layer `name` matches, if any.
    pub fn target_of(&self, name: &str) -> Option<usize> {
        self.targets
            .iter()
            .position(|t| name == t || name.ends_with(&format!(".{t}")))
    }

    /// Whether a parameter name is one of a LoRA adapter's.
    pub fn is_adapter(name: &str) -> bool {
        name.contains(".lora_A.") || name.contains(".lora_B.")
    }
}

/// A linear layer's LoRA adapter.
#[derive(Clone, Debug)]
pub(crate) struct Lora {
    a: ParamId,
    b: ParamId,
    scale: f32,
    dropout: f32,
    /// Whether ΔW is merged into the weight (forward then skips the adapter).
    merged: Arc<AtomicBool>,
}

impl Lora {
    /// Declares the adapter of a `fan_in → fan_out` layer named `prefix`: A Normal(0, 1/in),
    /// B zeros.
    /// Under tensor parallelism the adapter is split as its layer is: a column-parallel layer's
    /// B by output rows (A whole), a row-parallel layer's A by input columns (B whole), so each
    /// rank's ΔW = B·A is the slice of the layer's weight it holds.
    pub(crate) fn new(
        b: &mut Builder,
        prefix: &str,
        fan_in: usize,
        fan_out: usize,
        config: &LoraConfig,
        split: LinearSplit,
    ) -> Result<Lora> {
        let r = config.rank;
        let (a_split, b_split) = match split {
            LinearSplit::None => (Split::Replicated, Split::Replicated),
            LinearSplit::Column => (Split::Replicated, Split::Axis(0)),
            LinearSplit::ColumnBlocks(parts) => {
                (Split::Replicated, Split::Interleaved { axis: 0, parts })
            }
            LinearSplit::Row => {
                if config.dropout > 0.0 {
                    return Err(Error::Invalid {
                        op: "LoRA",
                        reason: format!(
                            "{prefix} is split by input features across tensor-parallel ranks; \
                             its adapter cannot drop its input yet (lora dropout {}): use 0",
                            config.dropout
                        ),
                    });
                }
                (Split::Axis(1), Split::Replicated)
            }
        };
        let a = b.param(
            &join(prefix, "lora_A.weight"),
            &[r, fan_in],
            Init::Normal(1.0 / (fan_in as f32).sqrt()),
            false,
            a_split,
        )?;
        let bw = b.param(
            &join(prefix, "lora_B.weight"),
            &[fan_out, r],
            Init::Zeros,
            false,
            b_split,
        )?;
        Ok(Lora {
            a,
            b: bw,
            scale: config.scale(),
            dropout: config.dropout,
            merged: Arc::new(AtomicBool::new(false)),
        })
    }
}

/// How a checkpoint stores the weight matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WeightLayout {
    /// `[in, out]`: Hugging Face GPT-2's `Conv1D`.
    #[default]
    InOut,
    /// `[out, in]`: PyTorch's `nn.Linear` (BERT, Llama).
    OutIn,
}

/// How a linear layer is split across the tensor-parallel group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LinearSplit {
    /// Every rank holds the whole layer.
    #[default]
    None,
    /// Each rank holds a slice of the output columns (and of the bias); its output is that
    /// slice.
    Column,
    /// A column-parallel layer whose outputs are this many equal blocks side by side (GPT-2's
    /// fused Q, K, V): each rank holds its slice of every block ([`Split::Interleaved`]).
    ColumnBlocks(usize),
    /// Each rank holds a slice of the input rows and takes the matching slice of the input; the
    /// partial outputs are summed across ranks before the (whole) bias is added.
    Row,
}

/// Options of [`Linear::new`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearOptions {
    /// Whether the layer has a bias.
    pub bias: bool,
    /// Standard deviation of the weights' normal initialisation.
    pub std: f32,
    /// How the checkpoint stores the weight.
    pub layout: WeightLayout,
    /// Tensor-parallel split.
    pub split: LinearSplit,
}

impl Default for LinearOptions {
    fn default() -> Self {
        LinearOptions {
            bias: true,
            std: 0.02,
            layout: WeightLayout::InOut,
            split: LinearSplit::None,
        }
    }
}

/// `y = x·W + b` over the last axis.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: ParamId,
    bias: Option<ParamId>,
    layout: WeightLayout,
    split: LinearSplit,
    lora: Option<Lora>,
}

impl Linear {
    /// Declares `prefix.weight` (decayed) and, with `opts.bias`, `prefix.bias` (zeros, not
    /// decayed) for a map from `fan_in` to `fan_out` features.
    pub fn new(
        b: &mut Builder,
        prefix: &str,
        fan_in: usize,
        fan_out: usize,
        opts: LinearOptions,
    ) -> Result<Linear> {
        let (shape, out_axis) = match opts.layout {
            WeightLayout::InOut => ([fan_in, fan_out], 1),
            WeightLayout::OutIn => ([fan_out, fan_in], 0),
        };
        let (weight_split, bias_split) = match opts.split {
            LinearSplit::None => (Split::Replicated, Split::Replicated),
            LinearSplit::Column => (Split::Axis(out_axis), Split::Axis(0)),
            LinearSplit::ColumnBlocks(parts) => (
                Split::Interleaved {
                    axis: out_axis,
                    parts,
                },
                Split::Interleaved { axis: 0, parts },
            ),
            LinearSplit::Row => (Split::Axis(1 - out_axis), Split::Replicated),
        };
        let weight = b.param(
            &join(prefix, "weight"),
            &shape,
            Init::Normal(opts.std),
            true,
            weight_split,
        )?;
        let bias = if opts.bias {
            Some(b.param(
                &join(prefix, "bias"),
                &[fan_out],
                Init::Zeros,
                false,
                bias_split,
            )?)
        } else {
            None
        };
        let lora = match b.lora_target(prefix) {
            None => None,
            Some(config) => Some(Lora::new(b, prefix, fan_in, fan_out, &config, opts.split)?),
        };
        Ok(Linear {
            weight,
            bias,
            layout: opts.layout,
            split: opts.split,
            lora,
        })
    }

    /// The weight's id.
    pub fn weight(&self) -> ParamId {
        self.weight
    }

    /// The bias's id, if the layer has one.
    pub fn bias(&self) -> Option<ParamId> {
        self.bias
    }

    /// Every parameter id of the layer (its LoRA adapter's too).
    pub fn params(&self) -> Vec<ParamId> {
        let lora = self.lora.iter().flat_map(|l| [l.a, l.b]);
        std::iter::once(self.weight)
            .chain(self.bias)
            .chain(lora)
            .collect()
    }

    /// Whether the layer has a LoRA adapter.
    pub fn is_adapted(&self) -> bool {
        self.lora.is_some()
    }

    /// Adds (`merge`) or subtracts the adapter's update (α/r)·B·A into the weight, so the layer
    /// computes the adapted map with one matrix product (a merged model exports as a plain
    /// one); forward skips the adapter while it is merged. Does nothing without an adapter or
    /// when already in the asked state.
    pub fn set_merged(&self, params: &ParamStore, merge: bool) -> Result<()> {
        let Some(lora) = &self.lora else {
            return Ok(());
        };
        if lora.merged.load(Ordering::Acquire) == merge {
            return Ok(());
        }
        let t = params.tensors();
        let delta = anneal_tensor::no_grad(|| -> Result<Tensor> {
            let ba = t[lora.b.0].matmul(&t[lora.a.0])?.scale(lora.scale);
            match self.layout {
                WeightLayout::OutIn => Ok(ba),
                WeightLayout::InOut => Ok(ba.transpose(0, 1)?.contiguous()),
            }
        })?;
        let w = &t[self.weight.0];
        let updated = anneal_tensor::no_grad(|| match merge {
            true => w.detach().add(&delta),
            false => w.detach().sub(&delta),
        })?;
        params.set(self.weight, &updated)?;
        lora.merged.store(merge, Ordering::Release);
        Ok(())
    }

    /// The adapter whose update the forward adds under `w`: none without one, while it is
    /// merged into the weight, or with adapters switched off (which a merged one cannot be).
    fn active_adapter(&self, w: &Weights) -> Result<Option<&Lora>> {
        let Some(l) = &self.lora else {
            return Ok(None);
        };
        match (l.merged.load(Ordering::Acquire), w.adapters_on()) {
            (false, true) => Ok(Some(l)),
            (true, true) | (false, false) => Ok(None),
            (true, false) => Err(anneal_tensor::Error::Invalid {
                op: "Linear::forward",
                reason: "the LoRA adapters are merged into the weights, so the base model cannot \
                         be read with them switched off: unmerge them first"
                    .into(),
            }),
        }
    }

    /// The adapter's update (α/r)·dropout(x)·Aᵀ·Bᵀ; dropout only while the weights carry a
    /// training key, with masks drawn from it and this layer's weight id (so a recomputed
    /// forward drops the same elements).
    fn adapter(&self, w: &Weights, l: &Lora, x: &Tensor) -> Result<Tensor> {
        let a = w.get(l.a)?.transpose(0, 1)?;
        let b = w.get(l.b)?.transpose(0, 1)?;
        let x = match w.dropout_key() {
            Some(key) if l.dropout > 0.0 => {
                let seed =
                    key.seed ^ (self.weight.0 as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                x.dropout_at(l.dropout, key.with_seed(seed))?
            }
            _ => x.clone(),
        };
        Ok(x.linear(&a, None)?.linear(&b, None)?.scale(l.scale))
    }

    /// The adapter of a split layer. Column-parallel (A whole, B's rows split): x·Aᵀ is the
    /// same on every rank and its gradient the sum of the ranks' (Megatron's `f` on it), each
    /// rank then adding its output slice. Row-parallel (A's columns split, B whole): each rank's
    /// x·Aᵀ from its input slice is summed over the ranks (Megatron's `g`) before B.
    fn split_adapter(&self, w: &Weights, l: &Lora, x: &Tensor) -> Result<Tensor> {
        let a = w.get(l.a)?.transpose(0, 1)?;
        let b = w.get(l.b)?.transpose(0, 1)?;
        let x = match (w.dropout_key(), self.split) {
            (Some(key), LinearSplit::Column | LinearSplit::ColumnBlocks(_)) if l.dropout > 0.0 => {
                let seed =
                    key.seed ^ (self.weight.0 as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                x.dropout_at(l.dropout, key.with_seed(seed))?
            }
            _ => x.clone(),
        };
        let parallel = w.parallel();
        let h = match self.split {
            LinearSplit::Row => parallel.reduce_parallel(&x.linear(&a, None)?)?,
            _ => parallel.enter_parallel(&x.linear(&a, None)?)?,
        };
        Ok(h.linear(&b, None)?.scale(l.scale))
    }

    /// The weight as `[in, out]` (a view when stored `[out, in]`) and the bias.
    fn weight_and_bias(&self, w: &Weights) -> Result<(Tensor, Option<Tensor>)> {
        let weight = w.get(self.weight)?;
        let weight = match self.layout {
            WeightLayout::InOut => weight,
            WeightLayout::OutIn => weight.transpose(0, 1)?,
        };
        Ok((weight, self.bias.map(|id| w.get(id)).transpose()?))
    }

    /// `gelu(x)·W + b` (the exact GELU, or its tanh approximation): one fused op that does not
    /// keep the GELU's output for backward ([`Tensor::gelu_linear`]) where the layer is a plain
    /// product (no adapter, not split, not multiplied from packed blocks), else the two steps.
    pub fn forward_gelu(&self, w: &Weights, x: &Tensor, exact: bool) -> Result<Tensor> {
        let rows = x.numel() / x.shape().last().copied().unwrap_or(1).max(1);
        if self.active_adapter(w)?.is_none()
            && self.split == LinearSplit::None
            && w.packed(self.weight, rows).is_none()
        {
            let (weight, bias) = self.weight_and_bias(w)?;
            return x.gelu_linear(&weight, bias.as_ref(), exact);
        }
        let h = if exact { x.gelu() } else { x.gelu_tanh() };
        self.forward(w, &h)
    }

    /// `x·W + b` for `x` of shape `[…, in]`.
    pub fn forward(&self, w: &Weights, x: &Tensor) -> Result<Tensor> {
        // A packed copy holds the weight as loaded: not once an adapter is merged into it.
        let merged = self
            .lora
            .as_ref()
            .is_some_and(|l| l.merged.load(Ordering::Acquire));
        let adapter = self.active_adapter(w)?;
        let rows = x.numel() / x.shape().last().copied().unwrap_or(1).max(1);
        if let (Some(q), LinearSplit::None, WeightLayout::OutIn, false) =
            (w.packed(self.weight, rows), self.split, self.layout, merged)
        {
            let mut y = q.matmul_t(x)?;
            if let Some(b) = self.bias {
                y = y.add(&w.get(b)?)?;
            }
            return match adapter {
                Some(l) => y.add(&self.adapter(w, l, x)?),
                None => Ok(y),
            };
        }
        let (weight, bias) = self.weight_and_bias(w)?;
        match self.split {
            LinearSplit::None => {
                let y = x.linear(&weight, bias.as_ref())?;
                match adapter {
                    Some(l) => y.add(&self.adapter(w, l, x)?),
                    None => Ok(y),
                }
            }
            LinearSplit::Column | LinearSplit::ColumnBlocks(_) => {
                let y = w
                    .parallel()
                    .enter_parallel(x)?
                    .linear(&weight, bias.as_ref())?;
                match adapter {
                    Some(l) => y.add(&self.split_adapter(w, l, x)?),
                    None => Ok(y),
                }
            }
            LinearSplit::Row => {
                let y = w.parallel().reduce_parallel(&x.linear(&weight, None)?)?;
                let y = match bias {
                    Some(b) => y.add(&b)?,
                    None => y,
                };
                match adapter {
                    Some(l) => y.add(&self.split_adapter(w, l, x)?),
                    None => Ok(y),
                }
            }
        }
    }
}
