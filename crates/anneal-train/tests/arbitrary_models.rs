//! Model descriptions read from files (a checkpoint's `trainer_state.json` and the run config in
//! it, a Hugging Face `config.json`) with forged sizes or flipped bytes never panic, never abort
//! on an allocation and never allocate beyond a bound set by the weights actually on disk: each
//! ends in the model or an error naming the file.

use std::path::{Path, PathBuf};

use anneal_data::Tokenizer;
use anneal_nn::Gpt;
use anneal_tensor::optim::{AdamW, AdamWConfig};
use anneal_tensor::Optimizer;
use anneal_tensor::{memory_stats, reset_peak_memory};
use anneal_train::checkpoint::{self, TrainerState};
use anneal_train::{generate, hf, RunConfig};
use proptest::prelude::*;

const TEXT: &str = "abcdefghij ";

fn tiny() -> (Gpt, Tokenizer, RunConfig) {
    let sets: Vec<String> = [
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=8",
        "model.block_size=8",
    ]
    .map(String::from)
    .to_vec();
    let config = RunConfig::load(None, &sets).unwrap();
    let tok = Tokenizer::train_chars([TEXT].iter()).unwrap();
    let gpt = Gpt::new(config.gpt_config(tok.vocab_size()).unwrap(), 0).unwrap();
    (gpt, tok, config)
}

fn checkpoint_dir(root: &Path) -> PathBuf {
    let (gpt, tok, config) = tiny();
    let opt = AdamW::new(&gpt.params, AdamWConfig::DEFAULT);
    let state = TrainerState {
        format: 1,
        step: 1,
        seed: 0,
        data: Default::default(),
        tokens_seen: 0,
        config: config.to_toml(),
        objective: "causal_lm".into(),
        optimizer_layout: Vec::new(),
        tokenizer: tok.to_json().unwrap(),
        vocab_size: tok.vocab_size(),
        files: Default::default(),
        loss_scale: Vec::new(),
    };
    checkpoint::save(root, &gpt.params, opt.state(&gpt.params), Vec::new(), state).unwrap()
}

/// Whether the tiny model's weights (width 8) load under `key = value`: only the original sizes
/// fit them, but any head count that divides the width gives weights of the same shapes.
fn fits(key: &str, value: u64, original: u64) -> bool {
    value == original || (key == "n_head" && value > 0 && 8 % value == 0)
}

/// Sizes: small ones (0 and mismatches), and ones no machine could allocate.
fn size() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..70, 1u64 << 20..1u64 << 40, any::<u64>()]
}

/// Tensor memory is counted process-wide: cases hold this while they run, so that one test's
/// allocations are not counted in another's.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `load`, requiring an error naming `file` unless it succeeds, and tensor memory within
/// four times the bytes of the weights on disk.
fn bounded<T>(
    weights: &Path,
    file: &Path,
    load: impl FnOnce() -> anyhow::Result<T>,
) -> Result<bool, TestCaseError> {
    let on_disk = std::fs::metadata(weights).unwrap().len() as usize;
    reset_peak_memory();
    let before = memory_stats().live_bytes;
    let result = load();
    let grew = memory_stats().peak_bytes.saturating_sub(before);
    prop_assert!(grew <= 4 * on_disk + 4096, "{grew} bytes allocated");
    match result {
        Ok(_) => Ok(true),
        Err(e) => {
            let e = format!("{e:#}");
            prop_assert!(e.contains(&file.display().to_string()), "{}", e);
            Ok(false)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn forged_sizes_in_a_checkpoint_are_refused_before_allocation(
        key in prop::sample::select(vec!["n_layer", "n_head", "n_embd", "block_size", "vocab_size"]),
        value in size(),
    ) {
        let _serial = serial();
        let root = tempfile::tempdir().unwrap();
        let dir = checkpoint_dir(root.path());
        let path = dir.join("trainer_state.json");
        let mut state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let original;
        if key == "vocab_size" {
            original = state["vocab_size"].as_u64().unwrap();
            state["vocab_size"] = value.into();
        } else {
            let mut run: toml::Table = state["config"].as_str().unwrap().parse().unwrap();
            let model = run["model"].as_table_mut().unwrap();
            original = model[key].as_integer().unwrap() as u64;
            // TOML integers are signed 64-bit: larger values are written as the largest.
            model[key] = toml::Value::Integer(value.min(i64::MAX as u64) as i64);
            state["config"] = run.to_string().into();
        }
        std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
        let loaded = bounded(&dir.join("model.safetensors"), &path, || generate::load_model(&dir))?;
        prop_assert_eq!(loaded, fits(key, value, original), "{} = {}", key, value);
    }

    #[test]
    fn flipped_bytes_in_a_checkpoint_state_end_in_the_model_or_an_error(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let _serial = serial();
        let root = tempfile::tempdir().unwrap();
        let dir = checkpoint_dir(root.path());
        let path = dir.join("trainer_state.json");
        let mut bytes = std::fs::read(&path).unwrap();
        for (at, value) in &flips {
            let i = at.index(bytes.len());
            bytes[i] = *value;
        }
        std::fs::write(&path, &bytes).unwrap();
        // Any file of the checkpoint may be the one named (a flipped checksum names the weights).
        bounded(&dir.join("model.safetensors"), &dir, || generate::load_model(&dir))?;
    }

    #[test]
    fn forged_sizes_in_a_hugging_face_config_are_refused_before_allocation(
        key in prop::sample::select(vec!["n_layer", "n_head", "n_embd", "n_positions", "vocab_size"]),
        value in size(),
    ) {
        let _serial = serial();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("hf");
        let (gpt, tok, _) = tiny();
        hf::export(&gpt, &tok, &out, false).unwrap();
        let path = out.join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let original = config[key].as_u64().unwrap();
        config[key] = value.into();
        std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
        let loaded = bounded(&out.join("model.safetensors"), &path, || hf::load_dir(&out))?;
        prop_assert_eq!(loaded, fits(key, value, original), "{} = {}", key, value);
    }
}
