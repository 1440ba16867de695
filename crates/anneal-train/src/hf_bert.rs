//! Hugging Face BERT directories in: `config.json`, `model.safetensors` and a WordPiece
//! `tokenizer.json`, as `transformers`' `BertModel` and sentence-transformers save them (e.g.
//! all-MiniLM-L6-v2). A sentence-transformers directory's `sentence_bert_config.json` gives the
//! longest input and `1_Pooling/config.json` the pooling; both are optional.

use anneal_data::Tokenizer;
use anneal_nn::bert::{Bert, BertConfig, BertInput, Pooling};
use anneal_nn::layers::LoraConfig;
use anneal_tensor::{DType, Tensor};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::Path;

/// A BERT encoder with its tokenizer: text in, unit-length sentence embeddings out.
pub struct SentenceEncoder {
    /// The encoder.
    pub model: Bert,
    /// Its WordPiece tokenizer.
    pub tokenizer: Tokenizer,
    /// Longest input in tokens, special tokens included; longer texts are truncated.
    pub max_len: usize,
    /// The pooling.
    pub pooling: Pooling,
    /// The padding id.
    pub pad: u32,
}

/// Keys of a BERT checkpoint that are not part of the encoder: the pooler (a `[CLS]` projection
/// for next-sentence prediction that sentence embeddings do not use) and a buffer of positions.
fn ignored(key: &str) -> bool {
    key.starts_with("pooler.") || key == "embeddings.position_ids"
}

/// Reads `dir/name` as JSON, naming the file in errors; `None` when it does not exist.
pub(crate) fn read_json(dir: &Path, name: &str) -> Result<Option<serde_json::Value>> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            Ok(Some(serde_json::from_str(&text).with_context(|| {
                format!("{}: not JSON", path.display())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The encoder's configuration from a `config.json`, naming the file and key of any fault.
pub fn bert_config(cfg: &serde_json::Value, path: &Path) -> Result<BertConfig> {
    let field = |k: &str| -> Result<usize> {
        cfg.get(k)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .with_context(|| format!("{}: no integer {k:?}", path.display()))
    };
    let number = |k: &str, default: f64| -> Result<f64> {
        match cfg.get(k) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .with_context(|| format!("{}: {k:?} is not a number", path.display())),
        }
    };
    if let Some(t) = cfg.get("model_type").and_then(|v| v.as_str()) {
        if t != "bert" {
            bail!(
                "{}: model_type {t:?} is not a BERT encoder (bert is supported here)",
                path.display()
            );
        }
    }
    if let Some(act) = cfg.get("hidden_act").and_then(|v| v.as_str()) {
        if act != "gelu" {
            bail!(
                "{}: hidden_act {act:?} is not supported; allowed: \"gelu\"",
                path.display()
            );
        }
    }
    if let Some(p) = cfg.get("position_embedding_type").and_then(|v| v.as_str()) {
        if p != "absolute" {
            bail!(
                "{}: position_embedding_type {p:?} is not supported; allowed: \"absolute\"",
                path.display()
            );
        }
    }
    let config = BertConfig {
        vocab_size: field("vocab_size")?,
        hidden_size: field("hidden_size")?,
        num_layers: field("num_hidden_layers")?,
        num_heads: field("num_attention_heads")?,
        intermediate_size: field("intermediate_size")?,
        max_positions: field("max_position_embeddings")?,
        type_vocab_size: field("type_vocab_size").unwrap_or(2),
        layer_norm_eps: number("layer_norm_eps", 1e-12)? as f32,
        dropout: number("hidden_dropout_prob", 0.1)? as f32,
        dtype: DType::F32,
        pre_norm: false,
        tie_word_embeddings: true,
    };
    config
        .validate()
        .with_context(|| format!("{}", path.display()))?;
    Ok(config)
}

/// Loads a BERT encoder and its tokenizer from a Hugging Face directory. Weights whose keys start
/// with `bert.` (saved from a task model) load too; the pooler is not used. Fails naming the
/// missing file, the key of a bad configuration, or the tensor that does not fit, before
/// allocating anything a configuration claims beyond the weights on disk.
pub fn load(dir: &Path) -> Result<SentenceEncoder> {
    load_with(dir, None)
}

/// [`load`] with LoRA adapters on the linear layers `lora` targets: the base weights from the
/// directory, each adapter as initialised (B zero, so the model computes what the base does).
pub fn load_with(dir: &Path, lora: Option<LoraConfig>) -> Result<SentenceEncoder> {
    load_with_head(dir, lora, None)
}

/// [`load_with`] with a new classification head of `classes` outputs (Normal(0, 0.02) weights,
/// zero biases) on the mean-pooled states, for fine-tuning.
pub fn load_with_head(
    dir: &Path,
    lora: Option<LoraConfig>,
    classes: Option<usize>,
) -> Result<SentenceEncoder> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let config_path = dir.join("config.json");
    let cfg = read_json(dir, "config.json")?
        .with_context(|| format!("{} is missing", config_path.display()))?;
    let config = bert_config(&cfg, &config_path)?;
    let weights_path = dir.join("model.safetensors");
    if !weights_path.exists() {
        bail!(
            "{} is missing (only safetensors weights are read)",
            weights_path.display()
        );
    }
    let mut weights: HashMap<String, Tensor> = HashMap::new();
    for (key, t) in anneal_tensor::io::load_safetensors(&weights_path)? {
        let key = key.strip_prefix("bert.").map(str::to_string).unwrap_or(key);
        if !ignored(&key) {
            weights.insert(key, t);
        }
    }
    config.check_weights(&weights).with_context(|| {
        format!(
            "{} does not match {}",
            config_path.display(),
            weights_path.display()
        )
    })?;
    let model = Bert::with_head(config, 0, lora, classes)?;
    for (name, t) in model.params.named() {
        if LoraConfig::is_adapter(&name) || name.starts_with("classifier.") {
            weights.insert(name, t);
        }
    }
    model
        .params
        .load_named(&weights)
        .with_context(|| format!("loading {}", weights_path.display()))?;
    let tokenizer_path = dir.join("tokenizer.json");
    if !tokenizer_path.exists() {
        bail!("{} is missing", tokenizer_path.display());
    }
    let tokenizer = Tokenizer::load(&tokenizer_path)?.without_length_limits()?;
    if tokenizer.vocab_size() > model.config.vocab_size {
        bail!(
            "{} has {} tokens; the model embeds {}",
            tokenizer_path.display(),
            tokenizer.vocab_size(),
            model.config.vocab_size
        );
    }
    let max_len = match read_json(dir, "sentence_bert_config.json")? {
        Some(st) => st
            .get("max_seq_length")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .unwrap_or(model.config.max_positions),
        None => model.config.max_positions,
    }
    .min(model.config.max_positions);
    let pooling = match read_json(&dir.join("1_Pooling"), "config.json")? {
        Some(p) if p.get("pooling_mode_cls_token").and_then(|v| v.as_bool()) == Some(true) => {
            Pooling::Cls
        }
        Some(p) if p.get("pooling_mode_mean_tokens").and_then(|v| v.as_bool()) == Some(false) => {
            bail!(
                "{}: only mean and CLS pooling are supported",
                dir.join("1_Pooling/config.json").display()
            )
        }
        _ => Pooling::Mean,
    };
    let pad = tokenizer.token_to_id("[PAD]").unwrap_or(0);
    Ok(SentenceEncoder {
        model,
        tokenizer,
        max_len,
        pooling,
        pad,
    })
}

impl SentenceEncoder {
    /// The token ids of `texts`, padded into one batch.
    pub fn input<S: AsRef<str>>(&self, texts: &[S]) -> Result<BertInput> {
        let ids = self.tokenizer.encode_for_model(texts, self.max_len)?;
        Ok(BertInput::padded(&ids, self.pad))
    }

    /// Unit-length sentence embeddings of `texts` (pooled, then L2-normalised), one per text.
    pub fn embed<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.model.embed(&self.input(texts)?, self.pooling)?)
    }
}
