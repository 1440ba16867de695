//! What one training step hands to each collective, per rank and process group, under the
//! data-parallel and sharded layouts `anneal-dist` runs: `dp` replicas of a ZeRO sharding group of
//! `sharding` ranks (PaddlePaddle's hybrid sharding; `sharding = 1` is plain data parallelism).
//!
//! With Ψ trainable parameters, g bytes per gradient value (4 for f32; bf16 is sent as an
//! all-to-all and an all-gather of packed pairs, see [`step_payload`]) and shards of
//! s = ⌈⌈Ψ/n⌉/a⌉·a elements (n = `sharding`, a the shard alignment):
//!
//! | stage | sharding group | replica group (dp > 1) |
//! |---|---|---|
//! | 0 | all-reduce Ψ·g | — |
//! | 1 | all-reduce Ψ·g; all-gather s·4 | all-reduce Ψ·g |
//! | 2 | all-to-all Ψ·g per micro-batch; all-gather s·4 (+ s/a·8 for the gradient norm) | all-reduce s·g |
//!
//! plus, on every group, an all-reduce of the step's loss and its k metrics, 4(1 + k) bytes
//! (ZeRO stages 1 and 2 store parameters in f32, so their all-gathers move 4-byte values). The
//! volumes match the ZeRO paper's accounting (Rajbhandari et al. 2020, §7.2): stage 1 and 2 move
//! what an all-reduce moves, a reduce-scatter of the gradients and an all-gather of the
//! parameters. ZeRO-2's reduce-scatter runs bucket by bucket as backward finishes each, every
//! micro-batch (the rank holds only its shard of the gradients between micro-batches): each
//! bucket is cut where it meets the ranks' shards and the parts exchanged by an all-to-all, so
//! it hands Ψ·g bytes per micro-batch, unpadded (bf16 parts of an even length, as every
//! parameter of an even size gives, pack exactly two values to a word).

use serde::{Deserialize, Serialize};

/// A process group of a data-parallel × sharding layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Group {
    /// The ranks of one sharding group (every data-parallel rank without ZeRO).
    Sharding,
    /// The ranks holding the same shard in each replica (hybrid layouts).
    Replicas,
    /// The ranks of a tensor-parallel group, which split every layer between them.
    Tensor,
    /// The stages of a pipeline.
    Pipeline,
    /// A pipeline's first and last stage, which both hold a tied token embedding.
    Embedding,
    /// The ranks holding the same part of a model-parallel model (one per replica).
    Data,
}

/// A collective.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Collective {
    /// All-reduce.
    AllReduce,
    /// Reduce-scatter.
    ReduceScatter,
    /// All-gather.
    AllGather,
    /// All-to-all.
    AllToAll,
    /// Point-to-point sends (a pipeline's activations and gradients).
    Send,
    /// Broadcast (counted on the root).
    Broadcast,
}

/// The layout and what travels.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataLayout {
    /// Replicas of the sharding group.
    pub dp: usize,
    /// Ranks per sharding group.
    pub sharding: usize,
    /// ZeRO stage (0, 1, 2) inside the sharding group.
    pub zero: u8,
    /// Gradients sent as bf16 (else f32).
    pub bf16_gradients: bool,
    /// Shards hold whole multiples of this many elements.
    pub align: usize,
    /// Micro-batches per step (gradient accumulation); ZeRO-2 reduces each.
    #[serde(default = "one")]
    pub micro_batches: usize,
}

fn one() -> usize {
    1
}

/// Bytes one rank hands to `collective` on `group` in one step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Payload {
    /// The group.
    pub group: Group,
    /// The collective.
    pub collective: Collective,
    /// Bytes, summed over the step's calls.
    pub bytes: f64,
}

/// A shard's elements: ⌈⌈total/n⌉/align⌉·align.
pub fn shard_len(total: usize, n: usize, align: usize) -> usize {
    let align = align.max(1);
    total.div_ceil(n.max(1)).div_ceil(align) * align
}

/// Bytes handed to collectives per rank in one step of `layout` for `trainable` parameters,
/// with `metrics` metrics averaged beside the loss and, with `norm`, the global gradient norm
/// taken from shards (ZeRO-2). Gradient all-reduces are for f32 gradients in buckets (their sizes
/// add to the whole); a bf16 all-reduce of `n` ranks is an all-to-all of its values packed two to
/// a 4-byte word in `n` even chunks and an all-gather of one chunk, so per bucket of v values it
/// hands 2·n·⌈⌈v/n⌉/2⌉·2 and 2·⌈⌈v/n⌉/2⌉·2 bytes: [`step_payload`] counts one bucket, and a run
/// of several buckets exceeds it by at most 4·n bytes a bucket.
pub fn step_payload(
    trainable: usize,
    layout: DataLayout,
    metrics: usize,
    norm: bool,
) -> Vec<Payload> {
    use Collective::*;
    let n = layout.sharding.max(1);
    let psi = trainable as f64;
    let s = shard_len(trainable, n, layout.align);
    let mut out = Vec::new();
    let mut add = |group, collective, bytes: f64| match out
        .iter_mut()
        .find(|p: &&mut Payload| p.group == group && p.collective == collective)
    {
        Some(p) => p.bytes += bytes,
        None => out.push(Payload {
            group,
            collective,
            bytes,
        }),
    };
    // An all-reduce of v values over m ranks, f32 or bf16.
    let all_reduce = |add: &mut dyn FnMut(Group, Collective, f64), group, v: f64, m: usize| {
        if layout.bf16_gradients {
            let chunk = ((v / m as f64).ceil() / 2.0).ceil() * 2.0;
            add(group, AllToAll, 2.0 * m as f64 * chunk);
            add(group, AllGather, 2.0 * chunk);
        } else {
            add(group, AllReduce, 4.0 * v);
        }
    };
    let replicas = layout.dp > 1 && layout.zero > 0;
    let ranks_of_sharding = if layout.zero == 0 { layout.dp * n } else { n };
    match layout.zero {
        0 | 1 => {
            all_reduce(&mut add, Group::Sharding, psi, ranks_of_sharding);
            if replicas {
                all_reduce(&mut add, Group::Replicas, psi, layout.dp);
            }
        }
        _ => {
            let g = if layout.bf16_gradients { 2.0 } else { 4.0 };
            add(
                Group::Sharding,
                AllToAll,
                g * psi * layout.micro_batches.max(1) as f64,
            );
            if replicas {
                all_reduce(&mut add, Group::Replicas, s as f64, layout.dp);
            }
            if norm {
                add(
                    Group::Sharding,
                    AllGather,
                    8.0 * (s / layout.align.max(1)) as f64,
                );
            }
        }
    }
    if layout.zero > 0 {
        add(Group::Sharding, AllGather, 4.0 * s as f64);
    }
    let scalars = 4.0 * (1 + metrics) as f64;
    add(Group::Sharding, AllReduce, scalars);
    if replicas {
        add(Group::Replicas, AllReduce, scalars);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(p: &[Payload], g: Group, c: Collective) -> f64 {
        p.iter()
            .find(|x| x.group == g && x.collective == c)
            .map_or(0.0, |x| x.bytes)
    }

    #[test]
    fn zero_moves_what_an_all_reduce_moves() {
        // ZeRO paper §7.2: stage 1/2 traffic equals data parallelism's (reduce-scatter plus
        // all-gather of Ψ each, against one all-reduce of Ψ that moves twice a one-way pass).
        let layout = |zero| DataLayout {
            dp: 1,
            sharding: 4,
            zero,
            bf16_gradients: false,
            align: 1,
            micro_batches: 1,
        };
        let psi = 1_000_000;
        let dp = step_payload(
            psi,
            DataLayout {
                dp: 4,
                sharding: 1,
                ..layout(0)
            },
            0,
            false,
        );
        assert_eq!(
            bytes(&dp, Group::Sharding, Collective::AllReduce),
            4e6 + 4.0
        );
        let z2 = step_payload(psi, layout(2), 0, false);
        assert_eq!(bytes(&z2, Group::Sharding, Collective::AllToAll), 4e6);
        let accumulated = step_payload(
            psi,
            DataLayout {
                micro_batches: 3,
                ..layout(2)
            },
            0,
            false,
        );
        assert_eq!(
            bytes(&accumulated, Group::Sharding, Collective::AllToAll),
            12e6
        );
        assert_eq!(bytes(&z2, Group::Sharding, Collective::AllGather), 1e6);
        let z1 = step_payload(psi, layout(1), 2, false);
        assert_eq!(
            bytes(&z1, Group::Sharding, Collective::AllReduce),
            4e6 + 12.0
        );
        let bf16 = step_payload(
            psi,
            DataLayout {
                bf16_gradients: true,
                ..layout(1)
            },
            0,
            false,
        );
        assert_eq!(bytes(&bf16, Group::Sharding, Collective::AllToAll), 2e6);
    }
}

/// What a tensor-parallel group's collectives carry: `rows` tokens per micro-batch on each data
/// rank (its sequences × their length), a residual stream `d_model` wide, `layers` transformer
/// blocks.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorLayout {
    /// Ranks of the group.
    pub tp: usize,
    /// Tokens per micro-batch on a data rank, N = b·T.
    pub rows: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Micro-batches per step.
    pub micro_batches: usize,
    /// Blocks recomputed in backward (their forward all-reduces run twice).
    pub recomputed: bool,
    /// Cross-entropy with label smoothing (one more sum per row).
    pub label_smoothing: bool,
    /// Sequence parallelism: the residual stream split by rows between the split regions.
    #[serde(default)]
    pub sequence_parallel: bool,
    /// Under sequence parallelism, the elements of the replicated parameters a forward looks up
    /// (norms, row-parallel biases, learned positions), whose gradients are summed over the
    /// group.
    #[serde(default)]
    pub replicated: usize,
}

/// Bytes one rank of a tensor-parallel group hands to each collective in one step of a GPT split
/// as Megatron-LM splits it (Shoeybi et al. 2019, §3): per micro-batch, every block all-reduces
/// N·d values twice in forward (attention's and the MLP's row-parallel outputs) and twice in
/// backward (the gradients of their column-parallel inputs), twice more in a recomputed forward;
/// the vocabulary-parallel embedding all-reduces its lookup (N·d) and the tied head the gradient
/// of its input (N·d); the vocabulary-parallel cross-entropy all-gathers each row's maximum with
/// the slice's width (N + 1) and all-reduces the rows' sums of exponentials and target logits (2N,
/// 3N with label smoothing). Once per step, the split parameters' share of the gradient norm (1
/// value). Values are f32.
pub fn tensor_parallel_payload(layout: TensorLayout) -> Vec<Payload> {
    if layout.sequence_parallel {
        return sequence_parallel_payload(layout);
    }
    let (n, d, l) = (
        layout.rows as f64,
        layout.d_model as f64,
        layout.layers as f64,
    );
    let per_block = if layout.recomputed { 6.0 } else { 4.0 };
    let sums = if layout.label_smoothing { 3.0 } else { 2.0 };
    let m = layout.micro_batches.max(1) as f64;
    let all_reduce = m * 4.0 * (n * d * (per_block * l + 2.0) + sums * n) + 4.0;
    let all_gather = m * 4.0 * (n + 1.0);
    vec![
        Payload {
            group: Group::Tensor,
            collective: Collective::AllReduce,
            bytes: all_reduce,
        },
        Payload {
            group: Group::Tensor,
            collective: Collective::AllGather,
            bytes: all_gather,
        },
    ]
}

/// What a pipeline stage's collectives carry (tensor parallelism aside).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PipelineLayout {
    /// This stage.
    pub stage: usize,
    /// Stages.
    pub stages: usize,
    /// Tokens per pipeline micro-batch, N = b·T.
    pub rows: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Pipeline micro-batches per step.
    pub micro_batches: usize,
    /// Trainable parameters this stage holds.
    pub stage_params: usize,
    /// Elements of the tied token embedding, which the first and last stage both hold (0 when
    /// untied).
    pub tied_embedding: usize,
    /// Data-parallel replicas of the pipeline.
    pub dp: usize,
}

/// Bytes one pipeline stage hands to each collective in one step (f32 values). Per micro-batch,
/// every stage but the last sends its output activation (N·d) to the next and every stage but the
/// first sends the gradient of its input (N·d) to the one before (Narayanan et al. 2021, §2.2;
/// without the scatter/gather of §4.1, so each tensor-parallel rank sends the whole activation).
/// Once per step: the last stage broadcasts the loss (1 value) and the stages all-reduce their
/// share of the gradient norm (1 value); the first and last stage all-reduce the tied
/// embedding's gradient; with replicas, each stage's gradients and the loss are averaged over
/// its data group.
pub fn pipeline_payload(layout: PipelineLayout) -> Vec<Payload> {
    let (s, p) = (layout.stage, layout.stages);
    let activation = 4.0 * (layout.rows * layout.d_model * layout.micro_batches) as f64;
    let mut out = Vec::new();
    let mut add = |group, collective, bytes: f64| {
        if bytes > 0.0 {
            out.push(Payload {
                group,
                collective,
                bytes,
            })
        }
    };
    let sends = usize::from(s + 1 < p) + usize::from(s > 0);
    add(Group::Pipeline, Collective::Send, sends as f64 * activation);
    add(
        Group::Pipeline,
        Collective::Broadcast,
        if s + 1 == p { 4.0 } else { 0.0 },
    );
    add(Group::Pipeline, Collective::AllReduce, 4.0);
    if (s == 0 || s + 1 == p) && p > 1 {
        add(
            Group::Embedding,
            Collective::AllReduce,
            4.0 * layout.tied_embedding as f64,
        );
    }
    if layout.dp > 1 {
        add(
            Group::Data,
            Collective::AllReduce,
            4.0 * (layout.stage_params + 1) as f64,
        );
    }
    out
}

/// [`tensor_parallel_payload`] under sequence parallelism (Korthikanti et al. 2022, §4.2.2):
/// each of a block's two split regions all-gathers its input rows (N/t·d handed) and
/// reduce-scatters its output (N·d handed) in forward, the reverse in backward (both again in a
/// recomputed forward); the embedding reduce-scatters its lookup, the final norm's rows are
/// all-gathered for the head; the replicated parameters' gradients are all-reduced per lookup;
/// the cross-entropy and the norm as without.
fn sequence_parallel_payload(layout: TensorLayout) -> Vec<Payload> {
    let t = layout.tp.max(1) as f64;
    let (n, d, l) = (
        layout.rows as f64,
        layout.d_model as f64,
        layout.layers as f64,
    );
    let passes = if layout.recomputed { 3.0 } else { 2.0 };
    let m = layout.micro_batches.max(1) as f64;
    let sums = if layout.label_smoothing { 3.0 } else { 2.0 };
    // Per block and pass, two regions; the embedding scatters forward and gathers back, the
    // final norm the other way round.
    let gathers = 2.0 * passes * l + 2.0;
    let scatters = 2.0 * passes * l + 2.0;
    vec![
        Payload {
            group: Group::Tensor,
            collective: Collective::AllGather,
            bytes: m * 4.0 * (gathers * n / t * d + n + 1.0),
        },
        Payload {
            group: Group::Tensor,
            collective: Collective::ReduceScatter,
            bytes: m * 4.0 * scatters * n * d,
        },
        Payload {
            group: Group::Tensor,
            collective: Collective::AllReduce,
            bytes: m * 4.0 * (sums * n + layout.replicated as f64) + 4.0,
        },
    ]
}

/// What ZeRO-3's collectives carry in one step, per rank: the shard lengths of the parameters a
/// forward looks up (each lookup's, so a tied embedding counts twice) and of those gathered again
/// for backward.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Zero3Layout {
    /// Ranks sharing the parameters.
    pub ranks: usize,
    /// Σ of the shard lengths over a forward's lookups.
    pub gathered: usize,
    /// Σ of the shard lengths gathered again for backward (a recomputed forward's lookups, or
    /// the parameters freed at their layer's end).
    pub recomputed: usize,
    /// Micro-batches per step.
    pub micro_batches: usize,
    /// Metrics averaged beside the loss.
    pub metrics: usize,
    /// Replicas of the sharded model (hybrid sharding; 1 is plain ZeRO-3).
    pub replicas: usize,
    /// Σ of the shard lengths of the trainable parameters (what a rank's gradients hold).
    pub shard: usize,
}

/// Bytes one rank hands to each collective in a ZeRO-3 step (Rajbhandari et al. 2020, §7.2.2):
/// per micro-batch, every lookup all-gathers its shard in forward, the parameters a layer keeps
/// for its backward are gathered again (`recomputed`: in a recomputed forward, or after being
/// freed at the layer's end), and the backward of every lookup that records gradients
/// reduce-scatters the whole (padded) gradient; once per step, the loss and metrics and the
/// gradient norm are all-reduced. Through a ring ([`ring_bytes`]) that is about Ψ per all-gather
/// pass and Ψ per reduce-scatter against data parallelism's 2Ψ all-reduce: 1.5× its volume, the
/// ZeRO paper's figure.
///
/// With hybrid sharding (`replicas` > 1) the ranks holding the same shard in every replica then
/// average their shards' gradients, and the loss and metrics once more.
pub fn zero3_payload(layout: Zero3Layout) -> Vec<Payload> {
    let m = layout.micro_batches.max(1) as f64;
    let n = layout.ranks as f64;
    let gathered = layout.gathered as f64;
    let mut replicas = Vec::new();
    if layout.replicas > 1 {
        replicas.push(Payload {
            group: Group::Replicas,
            collective: Collective::AllReduce,
            bytes: 4.0 * (layout.shard + 1 + layout.metrics) as f64,
        });
    }
    let sharded = vec![
        Payload {
            group: Group::Sharding,
            collective: Collective::AllGather,
            bytes: 4.0 * m * (gathered + layout.recomputed as f64),
        },
        Payload {
            group: Group::Sharding,
            collective: Collective::ReduceScatter,
            bytes: 4.0 * m * n * gathered,
        },
        Payload {
            group: Group::Sharding,
            collective: Collective::AllReduce,
            bytes: 4.0 * (1 + layout.metrics) as f64 + 4.0,
        },
    ];
    sharded.into_iter().chain(replicas).collect()
}

/// Bytes a payload moves through each rank's link under ring algorithms over `ranks` ranks
/// (Patarasuk & Yuan 2009): an all-reduce 2(n−1)/n of its buffer, a reduce-scatter (n−1)/n, an
/// all-gather (n−1) of the chunk handed, an all-to-all (n−1)/n; a send or broadcast its bytes.
pub fn ring_bytes(payload: &Payload, ranks: usize) -> f64 {
    let n = ranks.max(1) as f64;
    let b = payload.bytes;
    match payload.collective {
        Collective::AllReduce => 2.0 * (n - 1.0) / n * b,
        Collective::ReduceScatter | Collective::AllToAll => (n - 1.0) / n * b,
        Collective::AllGather => (n - 1.0) * b,
        Collective::Send | Collective::Broadcast => b,
    }
}
