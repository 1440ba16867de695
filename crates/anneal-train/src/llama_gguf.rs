//! Llama models from GGUF files (llama.cpp's format): the configuration from the file's
//! metadata, every tensor dequantised to f32 under its Hugging Face name, Q and K rows
//! un-permuted back to the rotate-half order, the tokenizer built from the file's vocabulary and
//! merges, and the chat template the file carries.
//!
//! Weights are dequantised at load (the model then computes in f32, as transformers' GGUF loader
//! does); nothing of a tensor's size is allocated before its shape has been checked against the
//! configuration.

use crate::chat::ChatTemplate;
use anneal_data::Tokenizer;
use anneal_nn::layers::LoraConfig;
use anneal_nn::{Llama, LlamaConfig};
use anneal_tensor::gguf::{GgufFile, GgufValue};
use anneal_tensor::Tensor;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A causal language model with its tokenizer and chat conventions.
pub struct LlamaModel {
    /// The model.
    pub model: Llama,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its chat template, if the file carries one.
    pub chat_template: Option<ChatTemplate>,
    /// Token ids that end a reply (the file's end-of-sequence token, and `<|im_end|>` /
    /// `<|endoftext|>` / `<|eot_id|>` where the vocabulary has them).
    pub stop_tokens: Vec<u32>,
    /// The beginning-of-sequence token, when the file asks for one before every text.
    pub bos: Option<u32>,
    /// The file it was loaded from.
    pub source: PathBuf,
}

/// Whether `path` is a file that starts with GGUF's magic bytes.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && &magic == b"GGUF"
}

/// The GGUF tensor name of each Hugging Face Llama parameter name.
pub fn gguf_name(hf: &str) -> Option<String> {
    if hf == "model.embed_tokens.weight" {
        return Some("token_embd.weight".into());
    }
    if hf == "model.norm.weight" {
        return Some("output_norm.weight".into());
    }
    if hf == "lm_head.weight" {
        return Some("output.weight".into());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (i, part) = rest.split_once('.')?;
    let part = match part {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{i}.{part}"))
}

/// The tokens that end a reply: the model's `eos`, then `<|im_end|>`, `<|endoftext|>`,
/// `<|eot_id|>` and `<|end_of_text|>` where the vocabulary has them.
pub fn stop_tokens(tokenizer: &Tokenizer, eos: Option<u32>) -> Vec<u32> {
    let mut stop: Vec<u32> = eos.into_iter().collect();
    for t in [
        "<|im_end|>",
        "<|endoftext|>",
        "<|eot_id|>",
        "<|end_of_text|>",
    ] {
        if let Some(id) = tokenizer.token_to_id(t) {
            if !stop.contains(&id) {
                stop.push(id);
            }
        }
    }
    stop
}

/// Rows of a Q or K projection `[heads·D, cols]` stored for interleaved RoPE (llama.cpp's
/// converter pairs rows 2i and 2i+1 of each head) put back in Hugging Face's rotate-half order
/// (row i pairs with i + D/2), as [`unpermute_order`] orders them.
pub fn unpermute_rows(values: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    unpermute_order(values.len() / cols, heads)
        .iter()
        .flat_map(|&r| &values[r * cols..(r + 1) * cols])
        .copied()
        .collect()
}

fn meta<'a>(g: &'a GgufFile, key: &str) -> Result<&'a GgufValue> {
    g.get(key)
        .with_context(|| format!("{}: metadata key {key:?} is missing", g.file()))
}

fn meta_usize(g: &GgufFile, key: &str) -> Result<usize> {
    meta(g, key)?
        .as_u64()
        .and_then(|v| usize::try_from(v).ok())
        .with_context(|| {
            format!(
                "{}: metadata {key:?} is not a non-negative integer",
                g.file()
            )
        })
}

fn meta_f32(g: &GgufFile, key: &str, default: f32) -> Result<f32> {
    match g.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_f64()
            .map(|v| v as f32)
            .with_context(|| format!("{}: metadata {key:?} is not a number", g.file())),
    }
}

fn meta_strings(g: &GgufFile, key: &str) -> Result<Vec<String>> {
    let arr = meta(g, key)?
        .as_array()
        .with_context(|| format!("{}: metadata {key:?} is not an array", g.file()))?;
    arr.iter()
        .map(|v| v.as_str().map(str::to_string))
        .collect::<Option<Vec<_>>>()
        .with_context(|| format!("{}: metadata {key:?} holds a non-string", g.file()))
}

/// The model's configuration from the file's `llama.*` metadata.
pub fn llama_config(g: &GgufFile) -> Result<LlamaConfig> {
    let arch = meta(g, "general.architecture")?
        .as_str()
        .with_context(|| format!("{}: general.architecture is not a string", g.file()))?;
    if arch != "llama" {
        bail!(
            "{}: general.architecture = {arch:?}; anneal reads \"llama\" GGUF files",
            g.file()
        );
    }
    let key = |k: &str| format!("llama.{k}");
    let num_heads = meta_usize(g, &key("attention.head_count"))?;
    let hidden_size = meta_usize(g, &key("embedding_length"))?;
    let vocab_size = match g.get(&key("vocab_size")) {
        Some(_) => meta_usize(g, &key("vocab_size"))?,
        None => meta(g, "tokenizer.ggml.tokens")?
            .as_array()
            .map(<[GgufValue]>::len)
            .context("tokenizer.ggml.tokens is not an array")?,
    };
    let config = LlamaConfig {
        vocab_size,
        hidden_size,
        intermediate_size: meta_usize(g, &key("feed_forward_length"))?,
        num_layers: meta_usize(g, &key("block_count"))?,
        num_heads,
        num_kv_heads: match g.get(&key("attention.head_count_kv")) {
            Some(_) => meta_usize(g, &key("attention.head_count_kv"))?,
            None => num_heads,
        },
        max_positions: meta_usize(g, &key("context_length"))?,
        rope_theta: meta_f32(g, &key("rope.freq_base"), 10_000.0)?,
        rms_norm_eps: meta_f32(g, &key("attention.layer_norm_rms_epsilon"), 1e-5)?,
        tie_embeddings: g.info("output.weight").is_none(),
        dropout: 0.0,
        dtype: anneal_tensor::DType::F32,
        checkpoint_blocks: false,
    };
    config
        .validate()
        .with_context(|| format!("{}: the llama.* metadata", g.file()))?;
    if let Some(v) = g.get(&key("rope.dimension_count")) {
        if v.as_u64() != Some(config.head_dim() as u64) {
            bail!(
                "{}: llama.rope.dimension_count = {v:?}, but heads are {} wide; partial rotary \
                 embeddings are not supported",
                g.file(),
                config.head_dim()
            );
        }
    }
    if g.get(&key("rope.scaling.type")).is_some() {
        bail!(
            "{}: llama.rope.scaling.type is set; scaled RoPE is not supported",
            g.file()
        );
    }
    Ok(config)
}

/// Splitting regexes of the pre-tokenizers GGUF names, where they differ from GPT-2's.
fn split_regex(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    matches!(
        pre,
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "dbrx"
    )
    .then_some(LLAMA3)
}

/// The tokenizer the file's `tokenizer.ggml.*` metadata describes (byte-level BPE only).
pub fn tokenizer(g: &GgufFile) -> Result<Tokenizer> {
    let model = meta(g, "tokenizer.ggml.model")?.as_str().unwrap_or("");
    if model != "gpt2" {
        bail!(
            "{}: tokenizer.ggml.model = {model:?}; anneal builds byte-level BPE (\"gpt2\") \
             tokenizers",
            g.file()
        );
    }
    let tokens = meta_strings(g, "tokenizer.ggml.tokens")?;
    let merges = meta_strings(g, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .as_array()
            .and_then(|a| a.iter().map(GgufValue::as_i64).collect::<Option<Vec<_>>>())
            .with_context(|| format!("{}: tokenizer.ggml.token_type is not integers", g.file()))?,
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        bail!(
            "{}: {} token types for {} tokens",
            g.file(),
            types.len(),
            tokens.len()
        );
    }
    let pre = g
        .get("tokenizer.ggml.pre")
        .and_then(GgufValue::as_str)
        .unwrap_or("default");
    Tokenizer::from_vocab_and_merges(&tokens, &merges, &types, split_regex(pre))
        .with_context(|| format!("{}: the tokenizer metadata", g.file()))
}

/// Loads a Llama GGUF file, with LoRA adapters where `lora` targets (initialised so the model
/// computes what the base does).
pub fn load(path: &Path, lora: Option<LoraConfig>) -> Result<LlamaModel> {
    let started = std::time::Instant::now();
    let g = GgufFile::open(path)?;
    let config = llama_config(&g)?;
    // Every tensor the configuration needs, in the shape it needs, before any is dequantised.
    let shapes = config.shapes();
    let mut wanted = std::collections::HashSet::new();
    for (hf, shape) in &shapes {
        let name = gguf_name(hf).expect("every Llama parameter has a GGUF name");
        let info = g.info(&name).with_context(|| {
            format!(
                "{}: tensor {name:?} is missing (the metadata describes {} layers)",
                g.file(),
                config.num_layers
            )
        })?;
        if &info.shape != shape {
            bail!(
                "{}: tensor {name:?} has shape {:?}; the llama.* metadata gives it {shape:?}",
                g.file(),
                info.shape
            );
        }
        wanted.insert(name);
    }
    if let Some(extra) = g.tensors.iter().find(|t| !wanted.contains(&t.name)) {
        bail!(
            "{}: tensor {:?} is not part of a {}-layer Llama",
            g.file(),
            extra.name,
            config.num_layers
        );
    }
    let tokenizer = tokenizer(&g)?;
    tracing::debug!(
        "{}: tokenizer built at {:.2} s",
        g.file(),
        started.elapsed().as_secs_f64()
    );
    if tokenizer.vocab_size() > config.vocab_size {
        bail!(
            "{}: the tokenizer has {} tokens; the model embeds {}",
            g.file(),
            tokenizer.vocab_size(),
            config.vocab_size
        );
    }
    let model = Llama::for_loading(config.clone(), lora)?;
    tracing::debug!(
        "{}: model built at {:.2} s",
        g.file(),
        started.elapsed().as_secs_f64()
    );
    let (heads, kv_heads, d) = (config.num_heads, config.num_kv_heads, config.hidden_size);
    let mut weights: HashMap<String, Tensor> = HashMap::new();
    for (hf, shape) in &shapes {
        let name = gguf_name(hf).expect("named above");
        let info = g.info(&name).expect("checked above");
        let mut values = g.dequantize(info)?;
        if hf.ends_with("q_proj.weight") {
            values = unpermute_rows(&values, heads, d);
        } else if hf.ends_with("k_proj.weight") {
            values = unpermute_rows(&values, kv_heads, d);
        }
        weights.insert(hf.clone(), Tensor::from_f32(values, shape)?);
    }
    for (name, t) in model.params.named() {
        if LoraConfig::is_adapter(&name) {
            weights.insert(name, t);
        }
    }
    tracing::debug!(
        "{}: dequantised at {:.2} s",
        g.file(),
        started.elapsed().as_secs_f64()
    );
    model
        .params
        .load_named(&weights)
        .with_context(|| format!("loading {}", path.display()))?;
    tracing::debug!(
        "{}: weights loaded at {:.2} s",
        g.file(),
        started.elapsed().as_secs_f64()
    );

    let token = |key: &str| -> Option<u32> {
        g.get(key)
            .and_then(GgufValue::as_u64)
            .and_then(|v| u32::try_from(v).ok())
            .filter(|&v| (v as usize) < config.vocab_size)
    };
    let stop_tokens = stop_tokens(&tokenizer, token("tokenizer.ggml.eos_token_id"));
    // transformers' GGUF tokenizer adds no BOS for byte-level vocabularies; neither do we
    // unless the file both asks for it and names a BOS token distinct from its EOS.
    let bos = match (
        g.get("tokenizer.ggml.add_bos_token")
            .and_then(GgufValue::as_bool),
        token("tokenizer.ggml.bos_token_id"),
    ) {
        (Some(true), Some(b)) if Some(b) != token("tokenizer.ggml.eos_token_id") => Some(b),
        _ => None,
    };
    let chat_template = match g.get("tokenizer.chat_template").and_then(GgufValue::as_str) {
        Some(t) => Some(
            ChatTemplate::new(t, &tokenizer, bos, stop_tokens.first().copied())
                .with_context(|| format!("{}: tokenizer.chat_template", g.file()))?,
        ),
        None => None,
    };
    Ok(LlamaModel {
        model,
        tokenizer,
        chat_template,
        stop_tokens,
        bos,
        source: path.to_path_buf(),
    })
}

/// Gives `m` (loaded from the GGUF file at `m.source`) quantised copies of its weight
/// matrices, for inference: at a few rows a product then reads the file's blocks (Q4_1: 20
/// bytes per 32 weights) instead of f32 weights, dequantising each block in registers, with the
/// same values. Q and K rows are reordered as at load. Returns the bytes kept.
pub fn pack_quantized(m: &mut LlamaModel) -> Result<usize> {
    use anneal_tensor::quant::QuantMatrix;
    let g = GgufFile::open(&m.source)?;
    let c = m.model.config.clone();
    let mut packed = Vec::new();
    for (hf, shape) in c.shapes() {
        let Some(info) = gguf_name(&hf).and_then(|n| g.info(&n)) else {
            continue;
        };
        if shape.len() != 2 || !QuantMatrix::supports(info.ggml_type) {
            continue;
        }
        let q = QuantMatrix::new(info.ggml_type, shape[0], shape[1], g.raw(info).to_vec())?;
        let heads = if hf.ends_with("q_proj.weight") {
            Some(c.num_heads)
        } else if hf.ends_with("k_proj.weight") {
            Some(c.num_kv_heads)
        } else {
            None
        };
        let q = match heads {
            Some(h) => q.permute_rows(&unpermute_order(shape[0], h))?,
            None => q,
        };
        packed.push((hf, q));
    }
    m.model.set_packed(packed)?;
    Ok(m.model.packed_bytes())
}

/// For each Hugging Face row of a Q or K projection, its row in the GGUF file: GGUF row
/// h·D + 2i + j is HF row h·D + j·D/2 + i.
fn unpermute_order(rows: usize, heads: usize) -> Vec<usize> {
    let d = rows / heads;
    let half = d / 2;
    let mut order = vec![0; rows];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                order[h * d + j * half + i] = h * d + 2 * i + j;
            }
        }
    }
    order
}

impl LlamaModel {
    /// Token ids of `text`, special tokens written in it (`<|im_start|>`) matched whole, with
    /// the BOS token first when the model wants one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        ids.extend(self.tokenizer.encode(text)?);
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_the_converters_permutation() {
        // llama.cpp: w.reshape(heads, 2, D/2, cols).swapaxes(1, 2).reshape(w.shape).
        let (heads, d, cols) = (2, 6, 3);
        let hf: Vec<f32> = (0..heads * d * cols).map(|v| v as f32).collect();
        let mut gguf = vec![0.0; hf.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..d / 2 {
                    for c in 0..cols {
                        // Source index [h, j, i, c] lands at [h, i, j, c].
                        gguf[((h * d / 2 + i) * 2 + j) * cols + c] =
                            hf[((h * 2 + j) * d / 2 + i) * cols + c];
                    }
                }
            }
        }
        assert_ne!(gguf, hf);
        assert_eq!(unpermute_rows(&gguf, heads, cols), hf);
        // The row order used for packed blocks is the same permutation.
        let order = unpermute_order(heads * d, heads);
        let by_order: Vec<f32> = order
            .iter()
            .flat_map(|&r| gguf[r * cols..(r + 1) * cols].to_vec())
            .collect();
        assert_eq!(by_order, hf);
    }

    #[test]
    fn every_parameter_has_a_gguf_name() {
        let c = LlamaConfig {
            tie_embeddings: false,
            ..LlamaConfig::smollm2_135m()
        };
        let names: std::collections::HashSet<String> = c
            .shapes()
            .iter()
            .map(|(n, _)| gguf_name(n).unwrap())
            .collect();
        assert_eq!(names.len(), c.shapes().len());
        assert!(names.contains("blk.29.ffn_down.weight"));
        assert_eq!(
            gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq"),
            None
        );
    }
}
