//! A BERT encoder loaded from a Hugging Face directory against transformers: the tiny random
//! model of `tests/fixtures/make_bert_fixtures.py` (token ids, last hidden states and sentence
//! embeddings computed in float64 by transformers), and the directory faults a user meets.

use anneal_nn::bert::Pooling;
use anneal_nn::layers::LoraConfig;
use anneal_tensor::Tensor;
use anneal_train::hf_bert;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn golden() -> HashMap<String, Tensor> {
    anneal_tensor::io::load_safetensors(&fixtures().join("tiny-bert.safetensors")).unwrap()
}

fn sentences() -> Vec<String> {
    std::fs::read_to_string(fixtures().join("tiny-bert-sentences.txt"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The largest |a − b| over two equal-length slices.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn a_hugging_face_bert_embeds_sentences_as_transformers_does() {
    let encoder = hf_bert::load(&fixtures().join("tiny-bert")).unwrap();
    assert_eq!(
        encoder.max_len, 16,
        "sentence_bert_config.json's max_seq_length"
    );
    assert_eq!(encoder.pooling, Pooling::Mean);
    let golden = golden();
    let texts = sentences();
    let input = encoder.input(&texts).unwrap();
    // Token ids (the WordPiece tokenizer, [CLS] … [SEP], truncation keeping [SEP], padding)
    // and the attention mask, exactly.
    let want_ids: Vec<u32> = golden["ids"]
        .to_vec_f32()
        .iter()
        .map(|&x| x as u32)
        .collect();
    assert_eq!(golden["ids"].shape(), [input.batch, input.seq]);
    assert_eq!(input.ids, want_ids);
    let want_mask: Vec<bool> = golden["mask"]
        .to_vec_f32()
        .iter()
        .map(|&x| x > 0.5)
        .collect();
    assert_eq!(input.mask, want_mask);
    // Last hidden states at every real position (measured: within 3.6e-7 of float64; the tanh
    // approximation of GELU is 2.1e-4 off).
    let hidden = encoder.model.forward(&input, None).unwrap().to_vec_f32();
    let want = golden["hidden"].to_vec_f32();
    let d = encoder.model.config.hidden_size;
    let real: Vec<usize> = (0..input.mask.len()).filter(|&i| input.mask[i]).collect();
    let pick = |v: &[f32]| -> Vec<f32> {
        real.iter()
            .flat_map(|&i| v[i * d..(i + 1) * d].iter().copied())
            .collect()
    };
    let err = max_diff(&pick(&hidden), &pick(&want));
    assert!(err < 1e-5, "hidden states differ by {err}");
    // Sentence embeddings: cosine similarity ≥ 0.99999 with transformers' for every sentence.
    let got = encoder.embed(&texts).unwrap();
    let want = golden["embeddings"].to_vec_f32();
    for (i, e) in got.iter().enumerate() {
        let w = &want[i * d..(i + 1) * d];
        let cos: f32 = e.iter().zip(w).map(|(a, b)| a * b).sum();
        assert!(
            cos >= 0.99999,
            "sentence {i} ({:?}): cosine {cos}",
            texts[i]
        );
        assert!(max_diff(e, w) < 1e-5, "sentence {i}");
    }
    // A batch of one gives the same embedding as within the padded batch.
    let alone = encoder.embed(&texts[..1]).unwrap();
    assert!(max_diff(&alone[0], &got[0]) < 1e-6);
}

/// A copy of the tiny model's directory to break.
fn copy_of_tiny() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(fixtures().join("tiny-bert")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    dir
}

fn load_error(dir: &Path) -> String {
    match hf_bert::load(dir) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn faults_in_a_bert_directory_are_named() {
    // Each missing file is named.
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        let dir = copy_of_tiny();
        std::fs::remove_file(dir.path().join(file)).unwrap();
        let err = load_error(dir.path());
        assert!(err.contains(file), "{file}: {err}");
    }
    // A configuration whose shapes disagree with the weights names both files.
    let dir = copy_of_tiny();
    let path = dir.path().join("config.json");
    let config = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        config.replace("\"hidden_size\": 32", "\"hidden_size\": 4096"),
    )
    .unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("config.json") && err.contains("model.safetensors") && err.contains("shape"),
        "{err}"
    );
    // An unsupported setting names its key and the allowed values.
    std::fs::write(
        &path,
        config.replace("\"hidden_act\": \"gelu\"", "\"hidden_act\": \"relu\""),
    )
    .unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("hidden_act") && err.contains("\"gelu\""),
        "{err}"
    );
    // A missing key is named.
    std::fs::write(&path, config.replace("\"num_hidden_layers\"", "\"layers\"")).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("num_hidden_layers"), "{err}");
    // Another architecture is refused by name.
    std::fs::write(
        &path,
        config.replace("\"model_type\": \"bert\"", "\"model_type\": \"llama\""),
    )
    .unwrap();
    assert!(load_error(dir.path()).contains("llama"));
}

fn lora(targets: &[&str]) -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: targets.iter().map(|t| t.to_string()).collect(),
        dropout: 0.0,
    }
}

#[test]
fn lora_adapters_start_as_the_base_merge_into_it_and_alone_are_trained() {
    let dir = fixtures().join("tiny-bert");
    let base = hf_bert::load(&dir).unwrap();
    let mut adapted = hf_bert::load_with(&dir, Some(lora(&["query", "value"]))).unwrap();
    let texts = sentences();
    let input = base.input(&texts).unwrap();
    let hidden = |e: &hf_bert::SentenceEncoder| e.model.forward(&input, None).unwrap().to_vec_f32();
    // PEFT's names, one adapter per targeted projection of each layer.
    let names: Vec<String> = adapted
        .model
        .params
        .infos()
        .iter()
        .map(|p| p.name.clone())
        .filter(|n| LoraConfig::is_adapter(n))
        .collect();
    assert_eq!(names.len(), 2 * 2 * 2, "{names:?}");
    assert!(names.contains(&"encoder.layer.1.attention.self.value.lora_B.weight".to_string()));
    // B starts at zero: the adapted model computes exactly what the base does.
    let h0 = hidden(&base);
    assert_eq!(hidden(&adapted), h0);
    // With B non-zero the output moves; merging gives the same output with plain weights,
    // and unmerging restores the weights.
    let params = &adapted.model.params;
    let mut rng = anneal_tensor::Rng::new(7);
    for n in names.iter().filter(|n| n.contains("lora_B")) {
        let id = params.id(n).unwrap();
        let shape = params.get(id).shape().to_vec();
        let values = Tensor::randn(&shape, 0.5, anneal_tensor::DType::F32, &mut rng);
        params.set(id, &values).unwrap();
    }
    let unmerged = hidden(&adapted);
    assert!(
        max_diff(&unmerged, &h0) > 1e-2,
        "the adapters change the output"
    );
    let weights_before: Vec<f32> = params
        .by_name("encoder.layer.0.attention.self.query.weight")
        .unwrap()
        .to_vec_f32();
    adapted.model.set_lora_merged(true).unwrap();
    let merged = hidden(&adapted);
    let err = max_diff(&merged, &unmerged);
    assert!(err < 1e-5, "merged differs from unmerged by {err}");
    adapted.model.set_lora_merged(false).unwrap();
    let back = adapted
        .model
        .params
        .by_name("encoder.layer.0.attention.self.query.weight")
        .unwrap()
        .to_vec_f32();
    assert!(max_diff(&back, &weights_before) < 1e-6);
    assert!(max_diff(&hidden(&adapted), &unmerged) < 1e-5);
    // Training only the adapters: gradients (and so optimizer state) cover them alone.
    let trained = adapted.model.params.train_only(LoraConfig::is_adapter);
    assert_eq!(trained, names.len());
    let params = &adapted.model.params;
    let adapter_numel: usize = params
        .infos()
        .iter()
        .filter(|p| LoraConfig::is_adapter(&p.name))
        .map(|p| p.len)
        .sum();
    assert_eq!(params.trainable_numel(), adapter_numel);
    let loss = adapted
        .model
        .mean_pooled(&input, None)
        .unwrap()
        .sum_all()
        .unwrap();
    loss.backward().unwrap();
    assert!(params.grad_norm() > 0.0, "the adapters get gradients");
}

#[test]
fn a_lora_target_that_matches_nothing_is_named() {
    let err = hf_bert::load_with(
        &fixtures().join("tiny-bert"),
        Some(lora(&["query", "q_proj"])),
    )
    .err()
    .map(|e| format!("{e:#}"))
    .unwrap();
    assert!(
        err.contains("q_proj") && !err.contains("\"query\""),
        "{err}"
    );
}

/// A toy topic task on the tiny model's vocabulary: animals (0) against sky and time (1).
fn toy_task(encoder: &hf_bert::SentenceEncoder) -> Vec<(Vec<u32>, i64)> {
    let animals = [
        "the cat sat",
        "a dog ran",
        "the fox was quick",
        "a lazy cat",
        "dogs run",
    ];
    let sky = [
        "the sun",
        "a night moon",
        "the day was happy",
        "sun and moon",
        "a sad night",
    ];
    let texts: Vec<&str> = animals.iter().chain(&sky).copied().collect();
    let ids = encoder.tokenizer.encode_for_model(&texts, 16).unwrap();
    ids.into_iter()
        .enumerate()
        .map(|(i, ids)| (ids, (i >= animals.len()) as i64))
        .collect()
}

/// Trains `encoder` (with its classification head) for `steps` on the toy task; returns the
/// first and last losses and the last accuracy (at a constant learning rate `lr`).
fn fine_tune(encoder: hf_bert::SentenceEncoder, steps: u64, lr: f64) -> (f64, f64, f64) {
    use anneal_train::trainer::{Trainer, TrainerParts};
    let examples = toy_task(&encoder);
    let pad = encoder.pad;
    let model = encoder.model;
    let optimizer = anneal_tensor::optim::AdamW::new(
        &model.params,
        anneal_tensor::optim::AdamWConfig {
            weight_decay: 0.0,
            ..anneal_tensor::optim::AdamWConfig::default()
        },
    );
    let mut trainer = Trainer::new(TrainerParts {
        model: Box::new(model),
        objective: Box::new(anneal_train::objectives::SequenceClassification),
        optimizer: Box::new(optimizer),
        strategy: Box::new(anneal_train::strategy::SingleDevice),
        source: Box::new(anneal_data::LabelledSource { examples, pad }),
        seed: 3,
        schedule: anneal_train::schedule::CosineSchedule {
            max_lr: lr,
            min_lr: lr,
            warmup_steps: 0,
            decay_steps: steps,
        },
        batch_size: 10,
        grad_accum: 1,
        grad_clip: 1.0,
    });
    let first = trainer.step().unwrap().loss;
    let mut last = trainer.step().unwrap();
    for _ in 2..steps {
        last = trainer.step().unwrap();
    }
    let accuracy = last
        .metrics
        .iter()
        .find(|(n, _)| n == "accuracy")
        .unwrap()
        .1;
    (first, last.loss, accuracy)
}

#[test]
fn a_bert_classifier_fine_tunes_whole_with_lora_or_with_its_encoder_frozen() {
    let dir = fixtures().join("tiny-bert");
    let load = |lora: Option<LoraConfig>| {
        let mut e = hf_bert::load_with_head(&dir, lora, Some(2)).unwrap();
        e.model.config.dropout = 0.0;
        e
    };
    // Full fine-tuning: every parameter trains.
    let full = load(None);
    let all = full.model.params.trainable_numel();
    let (first, last, accuracy) = fine_tune(full, 40, 3e-3);
    assert!(
        last < 0.5 * first && accuracy == 1.0,
        "{first} → {last}, {accuracy}"
    );
    // LoRA: only the adapters and the head train.
    let mut lora_model = load(Some(lora(&["query", "value"])));
    lora_model
        .model
        .params
        .train_only(|n| LoraConfig::is_adapter(n) || n.starts_with("classifier."));
    let trained = lora_model.model.params.trainable_numel();
    assert!(trained < all / 10, "{trained} of {all}");
    let (first, last, accuracy) = fine_tune(lora_model, 40, 2e-2);
    assert!(
        last < 0.5 * first && accuracy == 1.0,
        "LoRA: {first} → {last}, {accuracy}"
    );
    // A frozen encoder: the head alone trains.
    let mut frozen = load(None);
    frozen
        .model
        .params
        .train_only(|n| n.starts_with("classifier."));
    assert_eq!(frozen.model.params.trainable_numel(), 2 * 32 + 2);
    let (first, last, _) = fine_tune(frozen, 40, 2e-2);
    assert!(last < first, "frozen encoder: {first} → {last}");
}

#[test]
fn lora_adapters_and_head_export_in_peft_format_and_load_back() {
    use anneal_train::peft::{self, PeftLayout};
    let dir = fixtures().join("tiny-bert");
    let config = lora(&["query", "value"]);
    let trained = hf_bert::load_with_head(&dir, Some(config.clone()), Some(3)).unwrap();
    // Adapters and head moved off their initial values, as training would.
    let params = &trained.model.params;
    let mut rng = anneal_tensor::Rng::new(11);
    for (name, t) in params.named() {
        if name.contains("lora_B") || name.starts_with("classifier.") {
            let values = Tensor::randn(t.shape(), 0.3, anneal_tensor::DType::F32, &mut rng);
            params.set(params.id(&name).unwrap(), &values).unwrap();
        }
    }
    let layout = PeftLayout {
        prefix: "encoder.",
        modules_to_save: &["classifier"],
        task_type: None,
        base_model: "tiny-bert",
    };
    let out = tempfile::tempdir().unwrap();
    let adapter = out.path().join("adapter");
    peft::export(params, &config, &layout, &adapter, false).unwrap();
    // PEFT's file: the adapters under the wrapped model's module paths, the head whole.
    let saved =
        anneal_tensor::io::load_safetensors(&adapter.join("adapter_model.safetensors")).unwrap();
    assert_eq!(saved.len(), 2 * 2 * 2 + 2, "{:?}", saved.keys());
    let a = &saved["base_model.model.encoder.encoder.layer.0.attention.self.query.lora_A.weight"];
    let b = &saved["base_model.model.encoder.encoder.layer.0.attention.self.query.lora_B.weight"];
    assert_eq!((a.shape(), b.shape()), (&[4, 32][..], &[32, 4][..]));
    assert!(saved.contains_key("base_model.model.classifier.weight"));
    let c: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(c["peft_type"], "LORA");
    assert_eq!(c["r"], 4);
    assert_eq!(c["modules_to_save"][0], "classifier");
    // Loaded onto a fresh base, the adapters and the head give the trained model's logits.
    let (config_back, tensors) = peft::load(&adapter, &layout).unwrap();
    assert_eq!(config_back, config);
    let fresh = hf_bert::load_with_head(&dir, Some(config_back), Some(3)).unwrap();
    for (name, t) in &tensors {
        let id = fresh.model.params.id(name).unwrap();
        fresh.model.params.set(id, t).unwrap();
    }
    let input = trained.input(&sentences()).unwrap();
    let want = trained.model.classify(&input, None).unwrap().to_vec_f32();
    let got = fresh.model.classify(&input, None).unwrap().to_vec_f32();
    assert_eq!(got, want);
    // A model without adapters has nothing to export.
    let plain = hf_bert::load_with_head(&dir, None, Some(3)).unwrap();
    let e = peft::export(
        &plain.model.params,
        &config,
        &layout,
        &out.path().join("x"),
        false,
    );
    assert!(e.is_err());
}

#[test]
fn lora_dropout_drops_the_adapters_input_only_while_training() {
    let dir = fixtures().join("tiny-bert");
    let config = LoraConfig {
        dropout: 0.5,
        ..lora(&["query", "value"])
    };
    // Adapters moved off zero, the same way in each model.
    let randomize_b = |params: &anneal_tensor::ParamStore| {
        let mut rng = anneal_tensor::Rng::new(5);
        for (name, t) in params.named() {
            if name.ends_with("lora_B.weight") {
                let values = Tensor::randn(t.shape(), 0.5, anneal_tensor::DType::F32, &mut rng);
                params.set(params.id(&name).unwrap(), &values).unwrap();
            }
        }
    };
    let mut adapted = hf_bert::load_with(&dir, Some(config)).unwrap();
    adapted.model.config.dropout = 0.0;
    randomize_b(&adapted.model.params);
    let input = adapted.input(&sentences()).unwrap();
    let run = |key: Option<anneal_tensor::DropoutKey>| {
        adapted.model.forward(&input, key).unwrap().to_vec_f32()
    };
    let key = anneal_tensor::DropoutKey::default().with_seed(3);
    let eval = run(None);
    let train = run(Some(key));
    // Training draws masks (the same ones again for the same key); evaluation draws none.
    assert!(max_diff(&train, &eval) > 1e-3);
    assert_eq!(train, run(Some(key)));
    assert_ne!(train, run(Some(key.with_seed(4))));
    // Without adapter dropout (and the hidden dropout off) training computes what evaluation does.
    let mut plain = hf_bert::load_with(&dir, Some(lora(&["query", "value"]))).unwrap();
    plain.model.config.dropout = 0.0;
    randomize_b(&plain.model.params);
    let a = plain.model.forward(&input, Some(key)).unwrap().to_vec_f32();
    let b = plain.model.forward(&input, None).unwrap().to_vec_f32();
    assert_eq!(a, b);
    assert!(max_diff(&a, &eval) > 1e-3 || max_diff(&a, &train) > 1e-3);
}

/// BERT's pretraining heads against transformers' `BertForPreTraining`
/// (`tests/fixtures/make_bert_pretraining_fixture.py`): masked-LM logits at every position and
/// next-sentence logits of two padded sentence pairs.
#[test]
fn bert_pretraining_heads_match_transformers() {
    use anneal_nn::bert::{Bert, BertConfig, BertInput};
    let f = anneal_tensor::io::load_safetensors(&fixtures().join("bert-pretraining.safetensors"))
        .unwrap();
    let config = BertConfig {
        vocab_size: 40,
        hidden_size: 16,
        num_layers: 2,
        num_heads: 2,
        intermediate_size: 32,
        max_positions: 16,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        dropout: 0.0,
        dtype: anneal_tensor::DType::F32,
        pre_norm: false,
        tie_word_embeddings: true,
    };
    let bert = Bert::for_pretraining(config, 0).unwrap();
    let weights: HashMap<String, Tensor> = f
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("w.").map(|n| (n.to_string(), v.clone())))
        .collect();
    assert_eq!(
        weights.len(),
        bert.params.infos().len(),
        "every parameter named alike"
    );
    bert.params.load_named(&weights).unwrap();
    let as_u32 =
        |name: &str| -> Vec<u32> { f[name].to_vec_f32().iter().map(|&v| v as u32).collect() };
    let input = BertInput {
        ids: as_u32("ids"),
        token_types: Some(as_u32("types")),
        mask: f["mask"].to_vec_f32().iter().map(|&m| m == 1.0).collect(),
        batch: 2,
        seq: 8,
    };
    let all: Vec<usize> = (0..16).collect();
    let out = bert.pretraining_logits(&input, &all, None).unwrap();
    let (mlm, want) = (out.mlm.to_vec_f32(), f["mlm"].to_vec_f32());
    // Padding positions' logits differ only in what the padding attends to; compare real ones.
    let real: Vec<usize> = (0..16).filter(|&p| input.mask[p]).collect();
    let pick = |v: &[f32]| -> Vec<f32> {
        real.iter()
            .flat_map(|&p| v[p * 40..(p + 1) * 40].to_vec())
            .collect()
    };
    assert!(
        max_diff(&pick(&mlm), &pick(&want)) < 2e-4,
        "{}",
        max_diff(&pick(&mlm), &pick(&want))
    );
    assert!(max_diff(&out.next_sentence.to_vec_f32(), &f["nsp"].to_vec_f32()) < 2e-4);
    // The masked-LM logits at chosen positions are those rows, in order.
    let some = bert
        .pretraining_logits(&input, &[9, 3], None)
        .unwrap()
        .mlm
        .to_vec_f32();
    assert!(max_diff(&some[..40], &mlm[9 * 40..10 * 40]) < 1e-5);
    assert!(max_diff(&some[40..], &mlm[3 * 40..4 * 40]) < 1e-5);
    assert!(Bert::new(bert.config.clone(), 0)
        .unwrap()
        .pretraining_logits(&input, &all, None)
        .is_err());

    // The same weights as a pre-norm encoder, with the fixture's final LayerNorm.
    let pre = Bert::for_pretraining(
        BertConfig {
            pre_norm: true,
            ..bert.config.clone()
        },
        0,
    )
    .unwrap();
    let mut weights = weights;
    for part in ["weight", "bias"] {
        weights.insert(
            format!("encoder.final_norm.{part}"),
            f[&format!("pre.final_norm.{part}")].clone(),
        );
    }
    assert_eq!(weights.len(), pre.params.infos().len());
    assert_eq!(
        pre.config.total_params().unwrap(),
        bert.config.total_params().unwrap() + 32,
        "the final norm's weight and bias"
    );
    pre.params.load_named(&weights).unwrap();
    let out = pre.pretraining_logits(&input, &all, None).unwrap();
    let d = max_diff(
        &pick(&out.mlm.to_vec_f32()),
        &pick(&f["pre.mlm"].to_vec_f32()),
    );
    assert!(d < 2e-4, "{d}");
    let d = max_diff(&out.next_sentence.to_vec_f32(), &f["pre.nsp"].to_vec_f32());
    assert!(d < 2e-4, "{d}");
    assert!(
        max_diff(&out.mlm.to_vec_f32(), &mlm) > 0.1,
        "pre-norm differs"
    );

    // An untied decoder holding the word embeddings' values gives the tied model's logits; its
    // own values give others.
    let untied = Bert::for_pretraining(
        BertConfig {
            tie_word_embeddings: false,
            ..bert.config.clone()
        },
        0,
    )
    .unwrap();
    assert_eq!(untied.params.infos().len(), bert.params.infos().len() + 1);
    let fresh = untied.pretraining_logits(&input, &all, None).unwrap().mlm;
    let mut weights: HashMap<String, Tensor> = f
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("w.").map(|n| (n.to_string(), v.clone())))
        .collect();
    weights.insert(
        "cls.predictions.decoder.weight".into(),
        weights["embeddings.word_embeddings.weight"].clone(),
    );
    untied.params.load_named(&weights).unwrap();
    let out = untied.pretraining_logits(&input, &all, None).unwrap();
    assert!(max_diff(&out.mlm.to_vec_f32(), &mlm) < 1e-6);
    assert!(max_diff(&fresh.to_vec_f32(), &mlm) > 0.1);
}

/// BERT pretraining through the trainer: masked-LM plus next-sentence loss falls on documents
/// with a learnable structure, and a run stopped after a checkpoint resumes bit for bit.
#[test]
fn bert_pretraining_learns_and_resumes_exactly() {
    use anneal_data::mlm::{Masking, PairSource};
    use anneal_nn::bert::{Bert, BertConfig};
    use anneal_train::checkpoint::{self, TrainerState};
    use anneal_train::objectives::MaskedLmNsp;
    use anneal_train::vision::{simple_trainer, Optim, TrainSettings};
    let config = BertConfig {
        vocab_size: 64,
        hidden_size: 32,
        num_layers: 2,
        num_heads: 2,
        intermediate_size: 64,
        max_positions: 32,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        dropout: 0.1,
        dtype: anneal_tensor::DType::F32,
        pre_norm: false,
        tie_word_embeddings: true,
    };
    // Document d: sentences counting up from 5 + 7d in steps that wrap in the vocabulary.
    let documents: Vec<Vec<Vec<u32>>> = (0..12)
        .map(|d| {
            (0..6)
                .map(|s| {
                    (0..4)
                        .map(|t| 5 + ((7 * d + 4 * s + t) % 59) as u32)
                        .collect()
                })
                .collect()
        })
        .collect();
    let source = || PairSource {
        documents: documents.clone(),
        seq: 24,
        masking: Masking {
            rate: 0.15,
            mask_id: 4,
            first_ordinary: 5,
            vocab_size: 64,
        },
        specials: (2, 3, 0),
    };
    let settings = TrainSettings {
        steps: 200,
        batch: 16,
        lr: 3e-3,
        weight_decay: 0.01,
        optimizer: Optim::AdamW,
        seed: 1,
    };
    let trainer = || {
        simple_trainer(
            Box::new(Bert::for_pretraining(config.clone(), 3).unwrap()),
            Box::new(MaskedLmNsp),
            Box::new(source()),
            &settings,
        )
    };
    let mut straight = trainer();
    let losses: Vec<f64> = (0..200).map(|_| straight.step().unwrap().loss).collect();
    let early: f64 = losses[..20].iter().sum::<f64>() / 20.0;
    let late: f64 = losses[180..].iter().sum::<f64>() / 20.0;
    assert!(late < 0.85 * early, "{early} -> {late}");
    // Stop after 4 steps, save, resume in a fresh trainer: the same next steps.
    let mut first = trainer();
    for _ in 0..4 {
        first.step().unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let state = TrainerState {
        format: 1,
        seed: 1,
        ..TrainerState::default()
    };
    let saved = first.save(dir.path(), state).unwrap().unwrap();
    let mut resumed = trainer();
    resumed.restore(&checkpoint::load(&saved).unwrap()).unwrap();
    for step in 4..8 {
        assert_eq!(
            resumed.step().unwrap().loss.to_bits(),
            losses[step].to_bits(),
            "step {step}"
        );
    }
}
