//! Tensor parallelism against one device, on the `local` backend: a GPT split over 2 and 4 ranks
//! (heads, MLP hidden units and an unevenly split vocabulary), with or without sequence
//! parallelism (the residual stream split by rows), with its Mixture-of-Experts layers' experts
//! split, gives the single-device model's logits, loss and gradients, as Megatron-LM's tests hold a tensor-parallel layer to its
//! single-device layer (to 1e-6, `tests/unit_tests/tensor_parallel`).

use anneal_dist::{local, Communicator, ModelParallel};
use anneal_nn::layers::ParallelContext;
use anneal_nn::{Gpt, GptConfig};
use anneal_tensor::{CrossEntropyOptions, DropoutKey, Tensor};
use std::sync::Arc;

fn config() -> GptConfig {
    GptConfig {
        // 13 tokens: over 2 ranks 7 + 6 rows, over 4 ranks 4 + 4 + 4 + 1.
        vocab_size: 13,
        block_size: 8,
        n_layer: 2,
        n_head: 4,
        n_embd: 16,
        dropout: 0.1,
        ..GptConfig::gpt2()
    }
}

const BATCH: usize = 2;
const SEQ: usize = 6;

fn ids() -> (Vec<u32>, Vec<i64>) {
    let ids: Vec<u32> = (0..BATCH * SEQ).map(|i| (i * 5 % 13) as u32).collect();
    let mut targets: Vec<i64> = (0..BATCH * SEQ).map(|i| (i * 7 % 13) as i64).collect();
    targets[3] = -100;
    (ids, targets)
}

/// The loss, the whole logits and every parameter's whole gradient, by name.
struct Run {
    loss: f32,
    logits: Vec<f32>,
    grads: Vec<(String, Vec<f32>)>,
}

fn run(model: &Gpt, smoothing: f32) -> Run {
    let (ids, targets) = ids();
    let key = Some(DropoutKey::default().with_seed(7));
    let (logits, moe) = model.forward_with_aux(&ids, BATCH, SEQ, key).unwrap();
    let opts = CrossEntropyOptions {
        label_smoothing: smoothing,
        ..CrossEntropyOptions::default()
    };
    let mut loss = model
        .parallel()
        .cross_entropy(&logits, &targets, opts)
        .unwrap();
    // A Mixture of Experts' balancing and z-losses train the router.
    for (_, aux) in moe {
        loss = loss.add(&aux.balance).unwrap().add(&aux.z).unwrap();
    }
    loss.backward().unwrap();
    let parallel = model.parallel();
    let whole_logits = {
        // The logits are a slice of the vocabulary: gather it as the vocabulary axis is.
        let t = logits.detach().transpose(0, 1).unwrap().contiguous();
        gather_rows(parallel.as_ref(), &t, model.config.vocab_size)
    };
    let grads = model
        .params
        .infos()
        .iter()
        .map(|info| {
            let g = model
                .params
                .get(model.params.id(&info.name).unwrap())
                .grad()
                .unwrap();
            let whole = parallel.gather(&info.name, &g).unwrap();
            (info.name.clone(), whole.to_vec_f32())
        })
        .collect();
    Run {
        loss: loss.item().unwrap(),
        logits: whole_logits,
        grads,
    }
}

/// Rows of `t` split as the vocabulary is, gathered whole and transposed back to `[N, V]`.
fn gather_rows(parallel: &dyn ParallelContext, t: &Tensor, vocab: usize) -> Vec<f32> {
    let (_, tp) = parallel.tensor_parallel();
    if tp == 1 {
        return t.transpose(0, 1).unwrap().contiguous().to_vec_f32();
    }
    // Borrow the head's recorded split: the tied table is split by rows exactly so.
    let whole = parallel.gather("transformer.wte.weight", t).unwrap();
    assert_eq!(whole.shape()[0], vocab);
    whole.transpose(0, 1).unwrap().contiguous().to_vec_f32()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * scale,
            "{what}[{i}]: {g} vs {w} (scale {scale})"
        );
    }
}

fn check(tp: usize, smoothing: f32) {
    check_with(tp, smoothing, false, false);
}

fn check_with(tp: usize, smoothing: f32, sequence: bool, recomputed: bool) {
    check_model(tp, smoothing, sequence, recomputed, None);
}

fn check_model(
    tp: usize,
    smoothing: f32,
    sequence: bool,
    recomputed: bool,
    moe: Option<anneal_nn::GptMoe>,
) {
    let config = || GptConfig {
        checkpoint_blocks: recomputed,
        moe,
        ..config()
    };
    let one = run(&Gpt::new(config(), 3).unwrap(), smoothing);
    let runs = local::run(tp, |comm| {
        let group: Arc<dyn Communicator> = Arc::new(comm);
        let parallel = Arc::new(ModelParallel::new(group).with_sequence_parallel(sequence));
        let model = Gpt::new_in(config(), 3, parallel).map_err(|e| e.to_string())?;
        Ok::<_, String>(run(&model, smoothing))
    })
    .unwrap();
    for (rank, got) in runs.iter().enumerate() {
        let what = format!(
            "tp {tp}, rank {rank}, smoothing {smoothing}, sequence parallel {sequence}, \
             recomputed {recomputed}"
        );
        assert!(
            (got.loss - one.loss).abs() <= 1e-6 * one.loss.abs(),
            "{what}: loss {} vs {}",
            got.loss,
            one.loss
        );
        assert_close(&format!("{what}: logits"), &got.logits, &one.logits, 1e-6);
        assert_eq!(got.grads.len(), one.grads.len());
        for ((name, g), (_, w)) in got.grads.iter().zip(&one.grads) {
            assert_close(&format!("{what}: gradient of {name}"), g, w, 1e-5);
        }
    }
}

#[test]
fn a_gpt_split_over_two_ranks_equals_one_device() {
    check(2, 0.0);
}

#[test]
fn a_gpt_split_over_four_ranks_with_an_uneven_vocabulary_equals_one_device() {
    check(4, 0.0);
    check(4, 0.1);
}

#[test]
fn sequence_parallelism_equals_one_device() {
    check_with(2, 0.0, true, false);
    check_with(4, 0.1, true, false);
    check_with(2, 0.0, true, true);
}

/// A Mixture-of-Experts GPT (4 experts, top-2, capacity-limited, in every block): the experts
/// split over the tensor-parallel group, every rank routing the same tokens to its own experts.
#[test]
fn experts_split_over_the_tensor_parallel_group_equal_one_device() {
    let moe = anneal_nn::GptMoe {
        layer: anneal_nn::layers::MoeConfig {
            top_k: 2,
            capacity_factor: Some(1.0),
            ..anneal_nn::layers::MoeConfig::switch(4)
        },
        every: 1,
        d_ff: 24,
    };
    check_model(2, 0.0, false, false, Some(moe));
    check_model(4, 0.0, false, true, Some(moe));
}

/// A Llama (separate Q/K/V projections, grouped key/value heads, gated MLP, untied head) with
/// LoRA adapters on column- and row-parallel projections, their B matrices drawn non-zero: the
/// loss and every gradient over 2 ranks equal one device's.
#[test]
fn lora_adapters_on_split_projections_equal_one_device() {
    use anneal_nn::layers::LoraConfig;
    use anneal_nn::{Llama, LlamaConfig};
    let config = || LlamaConfig {
        vocab_size: 13,
        hidden_size: 16,
        intermediate_size: 24,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        max_positions: 32,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-6,
        tie_embeddings: false,
        dropout: 0.0,
        dtype: anneal_tensor::DType::F32,
        checkpoint_blocks: false,
    };
    let lora = || LoraConfig {
        rank: 2,
        alpha: 4.0,
        targets: ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
            .map(String::from)
            .to_vec(),
        dropout: 0.0,
    };
    // Non-zero B matrices, whole, drawn once: each rank keeps its slice.
    let b_values = |model: &Llama| -> Vec<(String, Tensor)> {
        let mut rng = anneal_tensor::Rng::new(9);
        model
            .params
            .infos()
            .iter()
            .filter(|i| i.name.contains("lora_B"))
            .map(|i| {
                let shape = model.weights().parallel().whole_shape(&i.name, &i.shape);
                let t = Tensor::randn(&shape, 0.1, anneal_tensor::DType::F32, &mut rng);
                (i.name.clone(), t)
            })
            .collect()
    };
    let (ids, targets) = ids();
    let run = |model: &Llama| -> (f32, Vec<Vec<f32>>) {
        for (name, whole) in b_values(model) {
            let parallel = model.weights();
            let parallel = parallel.parallel();
            let mine = parallel
                .shard(&name, &whole, parallel.split_of(&name))
                .unwrap();
            model
                .params
                .set(model.params.id(&name).unwrap(), &mine)
                .unwrap();
        }
        let loss = model.loss(&ids, &targets, BATCH, SEQ, None).unwrap();
        loss.backward().unwrap();
        let w = model.weights();
        let grads = model
            .params
            .infos()
            .iter()
            .filter_map(|i| {
                let g = model.params.by_name(&i.name).unwrap().grad()?;
                Some(w.parallel().gather(&i.name, &g).unwrap().to_vec_f32())
            })
            .collect();
        (loss.item().unwrap(), grads)
    };
    let one = run(&Llama::with_lora(config(), 4, lora()).unwrap());
    let runs = local::run(2, |comm| {
        let group: Arc<dyn Communicator> = Arc::new(comm);
        let parallel = Arc::new(ModelParallel::new(group));
        let model =
            Llama::with_lora_in(config(), 4, parallel, lora()).map_err(|e| e.to_string())?;
        Ok::<_, String>(run(&model))
    })
    .unwrap();
    for (rank, (loss, grads)) in runs.iter().enumerate() {
        assert!(
            (loss - one.0).abs() <= 1e-6 * one.0.abs(),
            "rank {rank}: loss {loss} vs {}",
            one.0
        );
        assert_eq!(grads.len(), one.1.len());
        assert!(
            grads.len() > 20,
            "the adapters and the base weights have gradients"
        );
        for (i, (g, w)) in grads.iter().zip(&one.1).enumerate() {
            assert_close(&format!("rank {rank}: gradient {i}"), g, w, 1e-5);
        }
    }
}

#[test]
fn layouts_the_model_cannot_take_are_refused_naming_the_sizes() {
    let err = local::run(3, |comm| {
        let group: Arc<dyn Communicator> = Arc::new(comm);
        match Gpt::new_in(config(), 3, Arc::new(ModelParallel::new(group))) {
            Ok(_) => Err("built".to_string()),
            Err(e) => Ok::<_, String>(e.to_string()),
        }
    })
    .unwrap();
    assert!(err[0].contains("3 tensor-parallel ranks"), "{}", err[0]);
}

/// A loss and every parameter's whole gradient, by name.
type LossAndGrads = (f32, Vec<(String, Vec<f32>)>);

/// Every parameter's whole gradient (gathered from the tensor-parallel slices), by name.
fn whole_grads(
    params: &anneal_tensor::ParamStore,
    parallel: &dyn ParallelContext,
) -> Vec<(String, Vec<f32>)> {
    params
        .infos()
        .iter()
        .map(|info| {
            let g = params
                .get(params.id(&info.name).unwrap())
                .grad()
                .unwrap_or_else(|| panic!("{} has no gradient", info.name));
            (
                info.name.clone(),
                parallel.gather(&info.name, &g).unwrap().to_vec_f32(),
            )
        })
        .collect()
}

/// Fails unless every rank's loss and gradients equal one device's (`one`).
fn assert_runs_equal(what: &str, runs: &[LossAndGrads], one: &LossAndGrads) {
    for (rank, (loss, grads)) in runs.iter().enumerate() {
        assert!(
            (loss - one.0).abs() <= 1e-6 * one.0.abs(),
            "{what}, rank {rank}: loss {loss} vs {}",
            one.0
        );
        assert_eq!(grads.len(), one.1.len(), "{what}: parameters");
        for ((name, g), (_, w)) in grads.iter().zip(&one.1) {
            // The key bias cannot change a softmax: its true gradient is zero, and what either
            // computation gives is rounding noise (about 1e-13 here).
            if name.ends_with("key.bias") {
                assert!(g.iter().chain(w).all(|v| v.abs() < 1e-9), "{what}: {name}");
                continue;
            }
            assert_close(
                &format!("{what}, rank {rank}: gradient of {name}"),
                g,
                w,
                1e-5,
            );
        }
    }
}

/// A BERT (separate query, key and value projections, post-norm, GELU with erf) with its
/// classification head and pretraining heads, split over 2 and 4 ranks by heads and intermediate
/// units: its classification, masked-LM and next-sentence losses and every gradient equal one
/// device's.
#[test]
fn a_bert_split_over_the_tensor_parallel_group_equals_one_device() {
    use anneal_nn::bert::{Bert, BertConfig, BertInput};
    let config = BertConfig {
        vocab_size: 13,
        hidden_size: 16,
        num_layers: 2,
        num_heads: 4,
        intermediate_size: 24,
        max_positions: 8,
        dropout: 0.1,
        ..BertConfig::minilm_l6()
    };
    let input = BertInput::padded(&[vec![2, 5, 7, 1, 9], vec![3, 4, 11]], 0);
    let run = |model: &Bert| -> LossAndGrads {
        let key = Some(DropoutKey::default().with_seed(5));
        let opts = CrossEntropyOptions::default();
        let classes = model.classify(&input, key).unwrap();
        let heads = model.pretraining_logits(&input, &[1, 3, 6], key).unwrap();
        let loss = classes
            .cross_entropy(&[2, 0], opts)
            .unwrap()
            .add(&heads.mlm.cross_entropy(&[4, 8, 12], opts).unwrap())
            .unwrap()
            .add(&heads.next_sentence.cross_entropy(&[1, 0], opts).unwrap())
            .unwrap();
        loss.backward().unwrap();
        let grads = whole_grads(&model.params, model.weights().parallel());
        (loss.item().unwrap(), grads)
    };
    let one = run(&Bert::new_in(
        config.clone(),
        3,
        Some(3),
        true,
        Arc::new(anneal_nn::layers::SingleDevice),
    )
    .unwrap());
    for tp in [2, 4] {
        let runs = local::run(tp, |comm| {
            let group: Arc<dyn Communicator> = Arc::new(comm);
            let parallel = Arc::new(ModelParallel::new(group));
            let model = Bert::new_in(config.clone(), 3, Some(3), true, parallel)
                .map_err(|e| e.to_string())?;
            // Split, not replicated: each rank holds its heads' queries.
            let query = "encoder.layer.0.attention.self.query.weight";
            let held = model.params.get(model.params.id(query).unwrap()).shape()[0];
            assert_eq!(held, 16 / tp, "{query} on a rank");
            Ok::<_, String>(run(&model))
        })
        .unwrap();
        assert_runs_equal(&format!("BERT, tp {tp}"), &runs, &one);
    }
}

/// A ViT with a classification head and an MAE decoder, split over 2 ranks: the classification
/// and reconstruction losses and every gradient equal one device's.
#[test]
fn a_vit_split_over_the_tensor_parallel_group_equals_one_device() {
    use anneal_nn::{Vit, VitConfig};
    let config = VitConfig {
        side: 8,
        patch: 4,
        d_model: 16,
        n_layer: 2,
        decoder_d: 8,
        decoder_layers: 1,
        decoder_heads: 2,
        ..VitConfig::small(3)
    };
    let images = Tensor::from_f32(
        (0..128).map(|i| (i % 17) as f32 / 17.0).collect(),
        &[2, 1, 8, 8],
    )
    .unwrap();
    let run = |model: &Vit| -> LossAndGrads {
        let key = Some(DropoutKey::default().with_seed(5));
        let classes = model.classify(&images, key).unwrap();
        let mae = model.mae(&images, 0.5, 9, key).unwrap();
        let reconstruction = mae.pred.sub(&mae.patches).unwrap();
        let loss = classes
            .cross_entropy(&[2, 0], CrossEntropyOptions::default())
            .unwrap()
            .add(
                &reconstruction
                    .mul(&reconstruction)
                    .unwrap()
                    .mean_all()
                    .unwrap(),
            )
            .unwrap();
        loss.backward().unwrap();
        let grads = whole_grads(&model.params, model.weights().parallel());
        (loss.item().unwrap(), grads)
    };
    let one = run(&Vit::new(config.clone(), 3).unwrap());
    let runs = local::run(2, |comm| {
        let group: Arc<dyn Communicator> = Arc::new(comm);
        let model = Vit::new_in(config.clone(), 3, Arc::new(ModelParallel::new(group)))
            .map_err(|e| e.to_string())?;
        // Split, not replicated: each rank holds half of every block's parameters.
        let whole = Vit::new(config.clone(), 3).map_err(|e| e.to_string())?;
        let blocks = |p: &anneal_tensor::ParamStore| -> usize {
            p.infos()
                .iter()
                .filter(|i| i.name.starts_with("blocks.0.mlp"))
                .map(|i| i.len)
                .sum()
        };
        let (mine, all) = (blocks(&model.params), blocks(&whole.params));
        assert!(mine > 0 && 2 * mine <= all + 64, "{mine} of {all}");
        Ok::<_, String>(run(&model))
    })
    .unwrap();
    assert_runs_equal("ViT, tp 2", &runs, &one);
}
