//! Adapters in PEFT's format: `adapter_config.json` and `adapter_model.safetensors`, which
//! `peft.PeftModel.from_pretrained(base, DIR)` loads onto the base model.
//!
//! PEFT names each tensor by its module path in the wrapped PyTorch model under
//! `base_model.model.`, with the adapter name dropped: `….query.lora_A.weight` (`[r, in]`) and
//! `….query.lora_B.weight` (`[out, r]`), which are anneal's own names and shapes; whole modules
//! trained beside the adapters (a classification head) travel as `modules_to_save`, their
//! tensors under their plain names. Only the adapters and those modules are written: the base
//! weights stay where they came from.

use anneal_nn::layers::LoraConfig;
use anneal_tensor::{ParamStore, Tensor};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

/// How the adapted model sits in the PyTorch model PEFT wraps.
pub struct PeftLayout<'a> {
    /// Module path of anneal's parameter names in that model (`encoder.` where the PyTorch
    /// model holds the BERT as `self.encoder`; empty where the names already match).
    pub prefix: &'a str,
    /// Modules saved whole (`classifier`), by their name in the PyTorch model.
    pub modules_to_save: &'a [&'a str],
    /// PEFT's `task_type` (`SEQ_CLS`, `CAUSAL_LM`, `FEATURE_EXTRACTION`), if any.
    pub task_type: Option<&'a str>,
    /// Where the base model came from (`base_model_name_or_path`).
    pub base_model: &'a str,
}

/// The PEFT key of anneal parameter `name`.
fn peft_key(layout: &PeftLayout<'_>, name: &str) -> String {
    let saved = layout
        .modules_to_save
        .iter()
        .any(|m| name.starts_with(&format!("{m}.")));
    if saved {
        format!("base_model.model.{name}")
    } else {
        format!("base_model.model.{}{name}", layout.prefix)
    }
}

/// Writes the adapters of `params` (and the `modules_to_save`) as a PEFT adapter directory at
/// `out`, atomically.
pub fn export(
    params: &ParamStore,
    lora: &LoraConfig,
    layout: &PeftLayout<'_>,
    out: &Path,
    overwrite: bool,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in params.named() {
        let saved = layout
            .modules_to_save
            .iter()
            .any(|m| name.starts_with(&format!("{m}.")));
        if LoraConfig::is_adapter(&name) || saved {
            let copy = Tensor::from_f32(t.to_vec_f32(), t.shape())?;
            tensors.push((peft_key(layout, &name), copy));
        }
    }
    if !tensors.iter().any(|(n, _)| LoraConfig::is_adapter(n)) {
        bail!("the model has no LoRA adapters to export");
    }
    let config = json!({
        "peft_type": "LORA",
        "task_type": layout.task_type,
        "base_model_name_or_path": layout.base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": lora.targets,
        "modules_to_save": if layout.modules_to_save.is_empty() {
            serde_json::Value::Null
        } else {
            json!(layout.modules_to_save)
        },
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
    });
    crate::hf::export_dir(out, overwrite, |tmp| {
        let bytes = anneal_tensor::io::encode_safetensors(&tensors)?;
        for (name, bytes) in [
            ("adapter_model.safetensors", bytes),
            (
                "adapter_config.json",
                serde_json::to_string_pretty(&config)?.into_bytes(),
            ),
        ] {
            let path = tmp.join(name);
            std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    })
}

/// Reads a PEFT adapter directory back: its LoRA configuration and its tensors under anneal's
/// names (the inverse of [`export`]).
pub fn load(dir: &Path, layout: &PeftLayout<'_>) -> Result<(LoraConfig, HashMap<String, Tensor>)> {
    let config_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let c: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not JSON", config_path.display()))?;
    if c.get("peft_type").and_then(|v| v.as_str()) != Some("LORA") {
        bail!("{}: peft_type is not \"LORA\"", config_path.display());
    }
    let rank = c
        .get("r")
        .and_then(|v| v.as_u64())
        .with_context(|| format!("{}: no integer \"r\"", config_path.display()))?
        as usize;
    let alpha = c
        .get("lora_alpha")
        .and_then(|v| v.as_f64())
        .with_context(|| format!("{}: no number \"lora_alpha\"", config_path.display()))?
        as f32;
    let targets: Vec<String> = match c.get("target_modules") {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .with_context(|| format!("{}: target_modules", config_path.display()))?,
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        _ => bail!("{}: no target_modules", config_path.display()),
    };
    let dropout = c
        .get("lora_dropout")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.0) as f32;
    let weights_path = dir.join("adapter_model.safetensors");
    let mut tensors = HashMap::new();
    for (key, t) in anneal_tensor::io::load_safetensors(&weights_path)? {
        let Some(rest) = key.strip_prefix("base_model.model.") else {
            bail!(
                "{}: key {key:?} is not under base_model.model.",
                weights_path.display()
            );
        };
        let name = rest.strip_prefix(layout.prefix).unwrap_or(rest);
        tensors.insert(name.to_string(), t);
    }
    Ok((
        LoraConfig {
            rank,
            alpha,
            targets,
            dropout,
        },
        tensors,
    ))
}
