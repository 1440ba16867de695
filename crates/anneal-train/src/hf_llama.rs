//! Hugging Face Llama directories: export of a Llama (a fine-tuned one with its adapters merged)
//! as `transformers`' `LlamaForCausalLM` reads it (`config.json`, `model.safetensors`,
//! `tokenizer.json`, `tokenizer_config.json` with the chat template), and loading from one.
//! Check an export with:
//!
//! ```text
//! python3 -c "import torch, transformers as t; m = t.AutoModelForCausalLM.from_pretrained('DIR'); \
//!   k = t.AutoTokenizer.from_pretrained('DIR'); \
//!   print(m(**k('The capital of France is', return_tensors='pt')).logits[0, -1, :5])"
//! ```
//! and compare with `anneal generate DIR --prompt "The capital of France is" --show-logits`.

use crate::chat::ChatTemplate;
use crate::hf_bert::read_json;
use crate::llama_gguf::LlamaModel;
use anneal_data::Tokenizer;
use anneal_nn::layers::LoraConfig;
use anneal_nn::{Llama, LlamaConfig};
use anneal_tensor::{DType, Tensor};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

/// Whether `dir` holds a Hugging Face Llama (`config.json` with `model_type` `llama`).
pub fn is_llama_dir(dir: &Path) -> bool {
    matches!(
        read_json(dir, "config.json"),
        Ok(Some(c)) if c.get("model_type").and_then(|v| v.as_str()) == Some("llama")
    )
}

/// Writes `m` as a Hugging Face Llama directory at `out`, atomically (as [`crate::hf::export`]).
/// Adapters are merged into the weights they adapt for the export and taken out again.
pub fn export(m: &LlamaModel, out: &Path, overwrite: bool) -> Result<()> {
    crate::hf::export_dir(out, overwrite, |tmp| {
        // Unmerging subtracts what merging added, which rounds: the adapted weights are put
        // back exactly as they were instead.
        let params = &m.model.params;
        // (Copies: the store's tensors are views of its flat buffer.)
        let adapted: Vec<(String, Tensor)> = params
            .named()
            .into_iter()
            .filter(|(n, _)| {
                n.strip_suffix(".weight")
                    .is_some_and(|l| params.id(&format!("{l}.lora_A.weight")).is_ok())
            })
            .map(|(n, t)| Ok((n, Tensor::from_f32(t.to_vec_f32(), t.shape())?)))
            .collect::<Result<_>>()?;
        m.model.set_lora_merged(true)?;
        let written = write_dir(m, tmp);
        m.model.set_lora_merged(false)?;
        for (name, t) in &adapted {
            params.set(params.id(name)?, t)?;
        }
        written
    })
}

fn write_dir(m: &LlamaModel, out: &Path) -> Result<()> {
    let c = &m.model.config;
    let tensors: Vec<(String, Tensor)> = m
        .model
        .params
        .named()
        .into_iter()
        .filter(|(n, _)| !LoraConfig::is_adapter(n))
        .map(|(n, t)| Ok((n, Tensor::from_f32(t.to_vec_f32(), t.shape())?)))
        .collect::<Result<_>>()?;
    let write = |name: &str, bytes: &[u8]| {
        let path = out.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))
    };
    write(
        "model.safetensors",
        &anneal_tensor::io::encode_safetensors(&tensors)?,
    )?;
    let eos = m.stop_tokens.first().copied();
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim(),
        "max_position_embeddings": c.max_positions,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
        "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "initializer_range": 0.02,
        "bos_token_id": m.bos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    });
    write(
        "config.json",
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    m.tokenizer.save(&out.join("tokenizer.json"))?;
    let token = |id: Option<u32>| id.and_then(|i| m.tokenizer.id_to_token(i));
    let mut tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": m.bos.is_some(),
        "add_eos_token": false,
        "bos_token": token(m.bos),
        "eos_token": token(eos),
        "pad_token": token(eos),
        "clean_up_tokenization_spaces": false,
        "model_max_length": c.max_positions,
    });
    if let Some(t) = &m.chat_template {
        tokenizer_config["chat_template"] = json!(t.source());
    }
    write(
        "tokenizer_config.json",
        serde_json::to_string_pretty(&tokenizer_config)?.as_bytes(),
    )?;
    Ok(())
}

/// The model's configuration from a Hugging Face `config.json`.
pub fn llama_config(cfg: &serde_json::Value, path: &Path) -> Result<LlamaConfig> {
    let int = |k: &str| -> Result<usize> {
        cfg.get(k)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .with_context(|| format!("{}: no integer {k:?}", path.display()))
    };
    let float = |k: &str, default: f32| -> Result<f32> {
        match cfg.get(k) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .map(|v| v as f32)
                .with_context(|| format!("{}: {k:?} is not a number", path.display())),
        }
    };
    let act = cfg
        .get("hidden_act")
        .and_then(|v| v.as_str())
        .unwrap_or("silu");
    if act != "silu" {
        bail!(
            "{}: hidden_act = {act:?} is not supported (silu is)",
            path.display()
        );
    }
    if cfg.get("rope_scaling").is_some_and(|v| !v.is_null()) {
        bail!(
            "{}: rope_scaling is set; scaled RoPE is not supported",
            path.display()
        );
    }
    for key in ["attention_bias", "mlp_bias"] {
        if cfg.get(key).and_then(|v| v.as_bool()) == Some(true) {
            bail!("{}: {key} = true is not supported", path.display());
        }
    }
    let num_heads = int("num_attention_heads")?;
    let config = LlamaConfig {
        vocab_size: int("vocab_size")?,
        hidden_size: int("hidden_size")?,
        intermediate_size: int("intermediate_size")?,
        num_layers: int("num_hidden_layers")?,
        num_heads,
        num_kv_heads: match cfg.get("num_key_value_heads") {
            Some(v) if !v.is_null() => int("num_key_value_heads")?,
            _ => num_heads,
        },
        max_positions: int("max_position_embeddings")?,
        rope_theta: float("rope_theta", 10_000.0)?,
        rms_norm_eps: float("rms_norm_eps", 1e-6)?,
        tie_embeddings: cfg
            .get("tie_word_embeddings")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        dropout: 0.0,
        dtype: DType::F32,
        checkpoint_blocks: false,
    };
    config
        .validate()
        .with_context(|| format!("{}", path.display()))?;
    if let Some(hd) = cfg.get("head_dim").and_then(|v| v.as_u64()) {
        if hd as usize != config.head_dim() {
            bail!(
                "{}: head_dim = {hd}, but hidden_size / num_attention_heads = {}",
                path.display(),
                config.head_dim()
            );
        }
    }
    Ok(config)
}

/// Loads a Hugging Face Llama directory (`config.json`, `model.safetensors`, `tokenizer.json`,
/// and `tokenizer_config.json` for the chat template and special tokens), with LoRA adapters
/// where `lora` targets.
pub fn load_dir(dir: &Path, lora: Option<LoraConfig>) -> Result<LlamaModel> {
    let config_path = dir.join("config.json");
    let cfg = read_json(dir, "config.json")?
        .with_context(|| format!("{} is missing", config_path.display()))?;
    let config = llama_config(&cfg, &config_path)?;
    let st = dir.join("model.safetensors");
    if !st.is_file() {
        bail!(
            "{} is missing (only safetensors weights are read)",
            st.display()
        );
    }
    let mut weights: HashMap<String, Tensor> = anneal_tensor::io::load_safetensors(&st)?
        .into_iter()
        .filter(|(n, _)| !n.ends_with("rotary_emb.inv_freq"))
        .filter(|(n, _)| !(config.tie_embeddings && n == "lm_head.weight"))
        .collect();
    let shapes = config.shapes();
    for (name, shape) in &shapes {
        match weights.get(name) {
            Some(t) if t.shape() == shape.as_slice() => {}
            Some(t) => bail!(
                "{}: tensor {name:?} has shape {:?}; {} gives it {shape:?}",
                st.display(),
                t.shape(),
                config_path.display()
            ),
            None => bail!(
                "{}: tensor {name:?} is missing ({} describes {} layers)",
                st.display(),
                config_path.display(),
                config.num_layers
            ),
        }
    }
    if weights.len() != shapes.len() {
        let known: std::collections::HashSet<&String> = shapes.iter().map(|(n, _)| n).collect();
        let extra = weights
            .keys()
            .find(|n| !known.contains(n))
            .cloned()
            .unwrap_or_default();
        bail!(
            "{}: tensor {extra:?} is not part of this Llama",
            st.display()
        );
    }
    let model = Llama::for_loading(config.clone(), lora)?;
    for (name, t) in model.params.named() {
        if LoraConfig::is_adapter(&name) {
            weights.insert(name, t);
        }
    }
    model
        .params
        .load_named(&weights)
        .with_context(|| format!("loading {}", st.display()))?;
    let tokenizer_path = dir.join("tokenizer.json");
    if !tokenizer_path.is_file() {
        bail!("{} is missing", tokenizer_path.display());
    }
    let tokenizer = Tokenizer::load(&tokenizer_path)?.without_length_limits()?;
    if tokenizer.vocab_size() > config.vocab_size {
        bail!(
            "{}: {} tokens; the model embeds {}",
            tokenizer_path.display(),
            tokenizer.vocab_size(),
            config.vocab_size
        );
    }
    let tc = read_json(dir, "tokenizer_config.json")?.unwrap_or(json!({}));
    let named = |k: &str| -> Option<u32> {
        tc.get(k)
            .and_then(|v| {
                v.as_str()
                    .or_else(|| v.get("content").and_then(|c| c.as_str()))
            })
            .and_then(|t| tokenizer.token_to_id(t))
    };
    let id = |k: &str| -> Option<u32> {
        cfg.get(k)
            .and_then(|v| v.as_u64().or_else(|| v.get(0).and_then(|x| x.as_u64())))
            .map(|v| v as u32)
    };
    let eos = named("eos_token").or_else(|| id("eos_token_id"));
    let stop_tokens = crate::llama_gguf::stop_tokens(&tokenizer, eos);
    let bos = match tc.get("add_bos_token").and_then(|v| v.as_bool()) {
        Some(true) => named("bos_token").or_else(|| id("bos_token_id")),
        _ => None,
    };
    let chat_template = match tc.get("chat_template").and_then(|v| v.as_str()) {
        Some(src) => Some(
            ChatTemplate::new(src, &tokenizer, bos, eos).with_context(|| {
                format!(
                    "{}: chat_template",
                    dir.join("tokenizer_config.json").display()
                )
            })?,
        ),
        None => None,
    };
    Ok(LlamaModel {
        model,
        tokenizer,
        chat_template,
        stop_tokens,
        bos,
        source: dir.to_path_buf(),
    })
}
