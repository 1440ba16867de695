//! Hugging Face GPT-2 compatibility: export to, and import from, the directory layout of
//! `transformers`' `GPT2LMHeadModel` (`config.json`, `model.safetensors`, `tokenizer.json`).
//!
//! anneal's GPT already uses GPT-2's parameter names and `Conv1D` layout (`[in, out]` weights),
//! so the tensors pass through unchanged. Models trained without biases get zero biases on
//! export (GPT-2 always has them; a zero bias changes nothing), and hub checkpoints saved from
//! `GPT2Model` (keys without the `transformer.` prefix) load too. Check an export with:
//!
//! ```text
//! python3 -c "import torch, transformers as t; m = t.GPT2LMHeadModel.from_pretrained('DIR'); \
//!   print(m(torch.tensor([[1, 2, 3]])).logits[0, -1, :5])"
//! ```
//! and compare with `anneal generate DIR --show-logits "…"`.

use anneal_data::Tokenizer;
use anneal_nn::{Gpt, GptConfig};
use anneal_tensor::{DType, Tensor};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

/// Writes `model` and `tokenizer` as a Hugging Face GPT-2 directory at `out`, atomically: the
/// files go into a temporary directory beside it, which is renamed into place. An existing,
/// non-empty `out` is replaced only with `overwrite`; a checkpoint or run directory never is.
pub fn export(model: &Gpt, tokenizer: &Tokenizer, out: &Path, overwrite: bool) -> Result<()> {
    if let Some(moe) = &model.config.moe {
        bail!(
            "this model has Mixture-of-Experts blocks ([model.moe] experts = {}), which Hugging \
             Face's GPT-2 has no place for; anneal's own checkpoint is the way to keep it",
            moe.layer.experts
        );
    }
    export_dir(out, overwrite, |tmp| write_dir(model, tokenizer, tmp))
}

/// Writes a directory at `out` atomically with `write` (which fills the temporary directory it
/// is given): refuses a checkpoint or run directory, and a non-empty `out` unless `overwrite`.
pub(crate) fn export_dir(
    out: &Path,
    overwrite: bool,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    anneal_data::recover_dir(out)?;
    if out.join("trainer_state.json").exists() || out.join("checkpoints").is_dir() {
        bail!(
            "{} is a checkpoint or a run directory; export to a directory of its own",
            out.display()
        );
    }
    let occupied = std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some());
    if occupied && !overwrite {
        bail!(
            "{} is not empty; choose an empty or new directory, or pass --force to replace it",
            out.display()
        );
    }
    if out.exists() && !out.is_dir() {
        bail!("{} exists and is not a directory", out.display());
    }
    let tmp = anneal_data::sibling(out, "export-tmp")?;
    let _ = std::fs::remove_dir_all(&tmp);
    let written = std::fs::create_dir_all(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))
        .and_then(|()| write(&tmp));
    if let Err(e) = written {
        // Nothing half-written is left behind (a full disk, say).
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    anneal_data::failpoint("export");
    anneal_data::replace_dir(&tmp, out)
        .with_context(|| format!("moving the export to {}", out.display()))?;
    Ok(())
}

/// The export's files, written into `out`.
fn write_dir(model: &Gpt, tokenizer: &Tokenizer, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let c = &model.config;
    let mut tensors: Vec<(String, Tensor)> = model
        .params
        .named()
        .into_iter()
        .map(|(n, t)| Ok((n, Tensor::from_f32(t.to_vec_f32(), t.shape())?)))
        .collect::<Result<_>>()?;
    // GPT-2 gives every LayerNorm and Conv1D a bias: a model trained without them gets zero
    // biases, named and sized from its own weights (the last axis of a `[in, out]` or `[d]`
    // weight), so no second table of names is kept here.
    let missing: Vec<(String, Tensor)> = model
        .params
        .infos()
        .iter()
        .filter_map(|p| {
            let layer = p.name.strip_suffix(".weight")?;
            let embedding = layer.ends_with(".wte") || layer.ends_with(".wpe");
            let bias = format!("{layer}.bias");
            let has = model.params.id(&bias).is_ok();
            (!embedding && layer != "lm_head" && !has).then(|| {
                let n = *p.shape.last().expect("weights have an axis");
                (bias, Tensor::zeros(&[n], DType::F32))
            })
        })
        .collect();
    tensors.extend(missing);
    let bytes = anneal_tensor::io::encode_safetensors(&tensors)?;
    let write = |name: &str, bytes: &[u8]| {
        let path = out.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))
    };
    write("model.safetensors", &bytes)?;
    let eos = tokenizer.eos().unwrap_or(0);
    let config = json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_ctx": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": null,
        "activation_function": "gelu_new",
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    });
    write(
        "config.json",
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    tokenizer.save(&out.join("tokenizer.json"))?;
    Ok(())
}

/// Loads a Hugging Face GPT-2 directory: `config.json`, `model.safetensors`, and
/// `tokenizer.json` or `vocab.json` + `merges.txt`.
pub fn load_dir(dir: &Path) -> Result<(Gpt, Tokenizer)> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let cfg: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not JSON", config_path.display()))?;
    let field = |k: &str| -> Result<usize> {
        cfg.get(k)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .with_context(|| format!("{}: no integer {k:?}", config_path.display()))
    };
    if let Some(t) = cfg.get("model_type").and_then(|v| v.as_str()) {
        if t != "gpt2" {
            bail!(
                "{}: model_type {t:?} is not supported here (gpt2 is)",
                config_path.display()
            );
        }
    }
    let act = cfg
        .get("activation_function")
        .and_then(|v| v.as_str())
        .unwrap_or("gelu_new");
    if act != "gelu_new" && act != "gelu_pytorch_tanh" {
        bail!(
            "{}: activation_function {act:?} is not supported (gelu_new is)",
            config_path.display()
        );
    }
    let tie = cfg
        .get("tie_word_embeddings")
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    let config = GptConfig {
        vocab_size: field("vocab_size")?,
        block_size: field("n_positions")?,
        n_layer: field("n_layer")?,
        n_head: field("n_head")?,
        n_embd: field("n_embd")?,
        dropout: 0.0,
        bias: true,
        tie_embeddings: tie,
        dtype: DType::F32,
        checkpoint_blocks: false,
        save_attention_probs: false,
        moe: None,
    };
    let st = dir.join("model.safetensors");
    if !st.is_file() {
        bail!(
            "{}: missing (only safetensors weights are read; convert pytorch_model.bin with \
             transformers' save_pretrained(safe_serialization=True))",
            st.display()
        );
    }
    let raw = anneal_tensor::io::load_safetensors(&st)?;
    let mut tensors = HashMap::new();
    for (name, t) in raw {
        if name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") {
            continue; // causal-mask buffers, not parameters
        }
        let name = if name.starts_with("transformer.") || name.starts_with("lm_head.") {
            name
        } else {
            format!("transformer.{name}")
        };
        if tie && name == "lm_head.weight" {
            continue;
        }
        tensors.insert(name, t);
    }
    config.check_weights(&tensors).with_context(|| {
        format!(
            "{}: the model it describes is not the one in {}",
            config_path.display(),
            st.display()
        )
    })?;
    let model = Gpt::new(config, 0).with_context(|| format!("{}", config_path.display()))?;
    model
        .params
        .load_named(&tensors)
        .with_context(|| format!("loading {}", st.display()))?;
    let tokenizer = if dir.join("tokenizer.json").is_file() {
        Tokenizer::load(&dir.join("tokenizer.json"))?
    } else if dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file() {
        Tokenizer::gpt2(&dir.join("vocab.json"), &dir.join("merges.txt"))?
    } else {
        bail!(
            "{}: no tokenizer: neither tokenizer.json nor vocab.json with merges.txt",
            dir.display()
        );
    };
    Ok((model, tokenizer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_then_import_gives_the_same_logits() {
        for bias in [false, true] {
            let model = Gpt::new(
                GptConfig {
                    vocab_size: 9,
                    block_size: 8,
                    n_layer: 2,
                    n_head: 2,
                    n_embd: 8,
                    bias,
                    ..GptConfig::gpt2()
                },
                3,
            )
            .unwrap();
            let tok = Tokenizer::train_chars(["abcdefghi"].iter()).unwrap();
            let dir = tempfile::tempdir().unwrap();
            export(&model, &tok, dir.path(), true).unwrap();
            let (back, tok2) = load_dir(dir.path()).unwrap();
            assert_eq!(tok2.encode("abc").unwrap(), tok.encode("abc").unwrap());
            let ids = [1, 2, 3, 4, 5, 6];
            let a = model.forward(&ids, 1, 6, None).unwrap().to_vec_f32();
            let b = back.forward(&ids, 1, 6, None).unwrap().to_vec_f32();
            assert_eq!(a, b);
            let cfg: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(dir.path().join("config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(cfg["n_layer"], 2);
            assert_eq!(cfg["activation_function"], "gelu_new");
        }
    }

    /// A one-block model and a character tokenizer for its nine tokens.
    fn small() -> (Gpt, Tokenizer) {
        let config = GptConfig {
            vocab_size: 9,
            block_size: 8,
            n_layer: 1,
            n_head: 2,
            n_embd: 8,
            ..GptConfig::gpt2()
        };
        let tok = Tokenizer::train_chars(["abcdefghi"].iter()).unwrap();
        (Gpt::new(config, 3).unwrap(), tok)
    }

    #[test]
    fn impossible_shapes_in_config_json_are_errors_naming_the_file() {
        let (model, tok) = small();
        let dir = tempfile::tempdir().unwrap();
        export(&model, &tok, dir.path(), true).unwrap();
        let path = dir.path().join("config.json");
        let text = std::fs::read_to_string(&path).unwrap();
        for (heads, want) in [(0, "n_head = 0"), (3, "n_embd = 8")] {
            std::fs::write(
                &path,
                text.replace("\"n_head\": 2", &format!("\"n_head\": {heads}")),
            )
            .unwrap();
            let e = format!("{:#}", load_dir(dir.path()).err().expect("refused"));
            assert!(e.contains("config.json") && e.contains(want), "{e}");
        }
        // A directory without its tokenizer says so, not that vocab.json is missing.
        std::fs::write(&path, &text).unwrap();
        std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
        let e = format!("{:#}", load_dir(dir.path()).err().expect("refused"));
        assert!(
            e.contains("no tokenizer") && e.contains("tokenizer.json"),
            "{e}"
        );
    }

    #[test]
    fn exports_replace_only_what_they_are_allowed_to() {
        let (model, tok) = small();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("hf");
        export(&model, &tok, &out, false).unwrap();
        assert!(out.join("model.safetensors").is_file());
        let e = export(&model, &tok, &out, false).unwrap_err().to_string();
        assert!(e.contains("not empty") && e.contains("--force"), "{e}");
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        export(&model, &tok, &out, true).unwrap();
        assert!(!out.join("notes.txt").exists() && out.join("config.json").is_file());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary directory left behind");
        let ckpt = dir.path().join("ckpt");
        std::fs::create_dir_all(&ckpt).unwrap();
        std::fs::write(ckpt.join("trainer_state.json"), "{}").unwrap();
        let e = export(&model, &tok, &ckpt, true).unwrap_err().to_string();
        assert!(e.contains("checkpoint"), "{e}");
        assert_eq!(
            std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap(),
            "{}"
        );
    }
}
