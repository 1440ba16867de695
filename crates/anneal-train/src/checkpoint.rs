//! Checkpoints: one directory per checkpoint,
//!
//! ```text
//! checkpoints/step-000500/
//!     model.safetensors        parameters under Hugging Face GPT-2 names
//!     objective.safetensors    state the objective owns, when it keeps any
//!     optimizer.safetensors    the optimizer's state (AdamW: moments, and the f32 master copy
//!                              of bf16 models), trainable parameters only
//!     trainer_state.json       step, seeds, data position, config, tokenizer, file checksums
//! ```
//!
//! Written atomically: every file goes into a hidden temporary directory and is fsynced, then the
//! directory is renamed into place and its parent fsynced, so a run killed at any moment leaves
//! either the whole checkpoint or none of it. Loading checks each file's size and xxHash3 against
//! `trainer_state.json` and names the file that is truncated or corrupted; nothing is loaded
//! silently.

use anneal_tensor::{ParamStore, Tensor};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Size and checksum of one file of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileCheck {
    /// Length in bytes.
    pub bytes: u64,
    /// xxHash3-64, hexadecimal.
    pub xxh3: String,
}

/// Where the data stream stands. Batches are drawn from a generator seeded by
/// (seed, step, micro-batch), so the step alone fixes every later batch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DataPosition {
    /// The tokenized corpus.
    pub dir: PathBuf,
    /// Training tokens it held (a resumed run checks it reads the same corpus).
    pub train_tokens: u64,
    /// Optimizer steps already drawn from it.
    pub steps_drawn: u64,
}

/// Everything besides tensors that a resumed run needs (`trainer_state.json`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrainerState {
    /// Format version (1).
    pub format: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// Seed of initialisation, sampling and dropout; with `step` it fixes every random draw to
    /// come (the generators are counter-based, so this is their whole state).
    pub seed: u64,
    /// The data position.
    pub data: DataPosition,
    /// Tokens trained on so far.
    pub tokens_seen: u64,
    /// The run configuration (model and training), as TOML.
    pub config: String,
    /// The objective trained for (`causal_lm`, …); empty in checkpoints from before objectives
    /// were named.
    #[serde(default)]
    pub objective: String,
    /// The trainable parameters in the order the optimizer state lays them out (name, elements);
    /// empty in checkpoints from before it was recorded, whose order is the model's declaration
    /// order with every parameter trained.
    #[serde(default)]
    pub optimizer_layout: Vec<(String, usize)>,
    /// The tokenizer, as `tokenizer.json` text.
    pub tokenizer: String,
    /// Vocabulary size of the model.
    pub vocab_size: usize,
    /// Checksums of the tensor files.
    pub files: BTreeMap<String, FileCheck>,
    /// The dynamic loss scale of an f16 run ([`anneal_tensor::loss_scale::LossScaler::to_state`]:
    /// scale, clean steps, overflows in a row, overflows in all); empty without one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loss_scale: Vec<f64>,
}

impl TrainerState {
    /// Steps the optimizer took: the trainer's, less those a loss scale skipped.
    pub fn optimizer_steps(&self) -> u64 {
        optimizer_steps(self.step, &self.loss_scale)
    }
}

/// Steps the optimizer took after `step` trainer steps under the loss scale `loss_scale`
/// ([`TrainerState::loss_scale`]'s form): those it skipped are left out.
pub fn optimizer_steps(step: u64, loss_scale: &[f64]) -> u64 {
    step - loss_scale.get(3).map_or(0, |&s| s as u64)
}

/// A checkpoint read back and verified.
pub struct Loaded {
    /// Its directory.
    pub dir: PathBuf,
    /// Its state.
    pub state: TrainerState,
    /// Model parameters by name.
    pub model: HashMap<String, Tensor>,
    /// Optimizer tensors by name (`adam.m`, `adam.v`, optionally `adam.master`).
    pub optimizer: HashMap<String, Tensor>,
    /// The objective's state by name (empty when it keeps none).
    pub objective: HashMap<String, Tensor>,
}

/// [`check`] of the file at `path`, read in pieces.
fn check_file(path: &Path) -> Result<FileCheck> {
    use std::io::Read;
    let mut f = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileCheck {
        bytes,
        xxh3: format!("{:016x}", hasher.digest()),
    })
}

fn check(bytes: &[u8]) -> FileCheck {
    FileCheck {
        bytes: bytes.len() as u64,
        xxh3: format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes)),
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, synced, then renamed over
/// it, so a reader sees the old file or the new one, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    write_synced(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
    Ok(())
}

/// Writes every parameter of `params` to `path` as safetensors, under its name, atomically.
pub fn write_params(path: &Path, params: &ParamStore) -> Result<()> {
    write_atomic(
        path,
        &anneal_tensor::io::encode_safetensors(&params.named())?,
    )
}

/// Reads the safetensors file `path` into `params` by name (as [`write_params`] wrote it); the
/// error names the file.
pub fn read_params(path: &Path, params: &ParamStore) -> Result<()> {
    let tensors = anneal_tensor::io::load_safetensors(path)
        .with_context(|| format!("reading {}", path.display()))?;
    params
        .load_named(&tensors)
        .with_context(|| format!("loading {}", path.display()))?;
    Ok(())
}

fn sync_dir(dir: &Path) {
    // Directory fsync makes the rename durable; not every platform allows opening a directory.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The directory name of step `step`'s checkpoint.
pub fn dir_name(step: u64) -> String {
    format!("step-{step:06}")
}

/// Writes the checkpoint of `state.step` under `root` (created if missing) and returns its path.
/// `optimizer` is the optimizer's whole state ([`anneal_tensor::Optimizer::state`] of an unsharded optimizer, or
/// a sharded one's gathered), so the checkpoint loads under any layout.
pub fn save(
    root: &Path,
    params: &ParamStore,
    optimizer: Vec<(String, Vec<f32>)>,
    objective: Vec<(String, Vec<f32>)>,
    state: TrainerState,
) -> Result<PathBuf> {
    save_whole(
        root,
        &params.named(),
        state_layout(params),
        OptimizerState::Gathered(optimizer),
        objective,
        state,
    )
}

/// Where a checkpoint's optimizer state comes from.
pub enum OptimizerState<'a> {
    /// Whole f32 vectors (gathered from the ranks that hold shards of it).
    Gathered(Vec<(String, Vec<f32>)>),
    /// An optimizer holding the whole state itself, read a piece at a time as the file is
    /// written ([`anneal_tensor::Optimizer::read_state`]): 8- and 16-bit moments are never
    /// widened into whole f32 copies.
    InPlace(&'a dyn anneal_tensor::Optimizer, &'a ParamStore),
}

/// [`save`] of a model held in slices across ranks, from its whole parameters `named` and the
/// whole trainable parameters' state layout `(name, elements)` in state order.
pub fn save_whole(
    root: &Path,
    named: &[(String, Tensor)],
    layout: Vec<(String, usize)>,
    optimizer: OptimizerState<'_>,
    objective: Vec<(String, Vec<f32>)>,
    mut state: TrainerState,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let name = dir_name(state.step);
    let tmp = root.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp)?;
    state.optimizer_layout = layout;
    // Each file is written from the buffers it holds, synced, then read back for its checksum,
    // so no copy of a file's bytes is ever held.
    state.files.clear();
    let mut finish = |name: &str, path: &Path| -> Result<()> {
        File::open(path)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", path.display()))?;
        state.files.insert(name.to_string(), check_file(path)?);
        Ok(())
    };
    let written = (|| -> Result<()> {
        let path = tmp.join("model.safetensors");
        anneal_tensor::io::write_safetensors(&path, named)?;
        finish("model.safetensors", &path)?;
        let path = tmp.join("optimizer.safetensors");
        match &optimizer {
            OptimizerState::Gathered(state) => {
                anneal_tensor::io::write_f32_safetensors(&path, state)?
            }
            OptimizerState::InPlace(opt, store) => anneal_tensor::io::write_f32_safetensors_with(
                &path,
                &opt.state_layout(),
                |i, from, out| opt.read_state(store, i, from, out),
            )?,
        }
        finish("optimizer.safetensors", &path)?;
        if !objective.is_empty() {
            let path = tmp.join("objective.safetensors");
            anneal_tensor::io::write_f32_safetensors(&path, &objective)?;
            finish("objective.safetensors", &path)?;
        }
        Ok(())
    })();
    let written = written.and_then(|()| {
        let json = serde_json::to_vec_pretty(&state).expect("states serialise");
        write_synced(&tmp.join("trainer_state.json"), &json)
    });
    if let Err(e) = written {
        // Nothing half-written is left behind (a full disk, say).
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    sync_dir(&tmp);
    let dest = root.join(&name);
    anneal_data::failpoint("checkpoint");
    anneal_data::replace_dir(&tmp, &dest)
        .with_context(|| format!("moving checkpoint into {}", dest.display()))?;
    sync_dir(root);
    Ok(dest)
}

/// Reads and verifies the checkpoint in `dir`: parameters, optimizer and objective state.
pub fn load(dir: &Path) -> Result<Loaded> {
    load_parts(dir, true)
}

/// Reads and verifies only the parameters and the state file of the checkpoint in `dir`, as
/// generation, evaluation and export need (a damaged optimizer file does not stop them); the
/// optimizer and objective maps of the result are empty.
pub fn load_weights(dir: &Path) -> Result<Loaded> {
    load_parts(dir, false)
}

fn load_parts(dir: &Path, with_state: bool) -> Result<Loaded> {
    let state_path = dir.join("trainer_state.json");
    let text = std::fs::read(&state_path).with_context(|| {
        format!(
            "{}: cannot read the checkpoint's state (is {} a checkpoint directory?)",
            state_path.display(),
            dir.display()
        )
    })?;
    let state: TrainerState = serde_json::from_slice(&text).with_context(|| {
        format!(
            "{}: truncated or corrupted, not loaded",
            state_path.display()
        )
    })?;
    if state.format != 1 {
        bail!(
            "{}: checkpoint format {} is not supported (1 is)",
            state_path.display(),
            state.format
        );
    }
    let read = |name: &str| -> Result<HashMap<String, Tensor>> {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let Some(expected) = state.files.get(name) else {
            bail!("{}: no checksum for {name}", state_path.display());
        };
        let got = check(&bytes);
        if got.bytes != expected.bytes {
            bail!(
                "{}: {} bytes where {} were written: truncated, not loaded",
                path.display(),
                got.bytes,
                expected.bytes
            );
        }
        if got.xxh3 != expected.xxh3 {
            bail!(
                "{}: checksum {} differs from the recorded {}: corrupted, not loaded",
                path.display(),
                got.xxh3,
                expected.xxh3
            );
        }
        Ok(anneal_tensor::io::decode_safetensors(
            &bytes,
            &path.display().to_string(),
        )?)
    };
    let model = read("model.safetensors")?;
    if !with_state {
        return Ok(Loaded {
            dir: dir.to_path_buf(),
            state,
            model,
            optimizer: HashMap::new(),
            objective: HashMap::new(),
        });
    }
    let optimizer = read("optimizer.safetensors")?;
    let objective = if state.files.contains_key("objective.safetensors") {
        read("objective.safetensors")?
    } else {
        HashMap::new()
    };
    Ok(Loaded {
        dir: dir.to_path_buf(),
        state,
        model,
        optimizer,
        objective,
    })
}

/// Checkpoint directories under `root`, oldest first.
pub fn list(root: &Path) -> Vec<(u64, PathBuf)> {
    // A checkpoint re-saved under its own step and killed between the two renames of
    // `replace_dir` waits at `.step-N.old`: put it back first.
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".old")) {
            if step.starts_with("step-") {
                let _ = anneal_data::recover_dir(&root.join(step));
            }
        }
    }
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path().is_dir().then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The newest checkpoint under `root`.
pub fn latest(root: &Path) -> Option<PathBuf> {
    list(root).pop().map(|(_, p)| p)
}

/// Deletes all but the newest `keep` checkpoints under `root`.
pub fn prune(root: &Path, keep: usize) -> Result<()> {
    let all = list(root);
    for (_, dir) in all.iter().take(all.len().saturating_sub(keep)) {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

impl Loaded {
    /// The run configuration the checkpoint was trained with.
    /// Validated as a run configuration's are.
    pub fn config(&self) -> Result<crate::RunConfig> {
        let what = || {
            format!(
                "{}: the run config in it",
                self.dir.join("trainer_state.json").display()
            )
        };
        let config: crate::RunConfig = toml::from_str(&self.state.config).with_context(what)?;
        config.validate().with_context(what)?;
        Ok(config)
    }

    /// Writes the checkpoint's parameters into `params`.
    pub fn restore_params(&self, params: &ParamStore) -> Result<()> {
        params
            .load_named(&self.model)
            .with_context(|| format!("loading {}", self.dir.join("model.safetensors").display()))
    }
}

/// The trainable parameters in optimizer-state order: (name, elements).
fn state_layout(params: &ParamStore) -> Vec<(String, usize)> {
    params
        .trainable_ranges()
        .map(|(p, _, _)| (p.name.clone(), p.len))
        .collect()
}

/// The trainable parameters in state order (name, elements) of the whole model whose slices
/// `params` holds under `parallel` (each parameter's whole element count).
pub fn whole_state_layout(
    params: &ParamStore,
    parallel: &dyn anneal_nn::layers::ParallelContext,
) -> Vec<(String, usize)> {
    params
        .trainable_ranges()
        .map(|(p, _, _)| {
            let n = parallel.whole_shape(&p.name, &p.shape).iter().product();
            (p.name.clone(), n)
        })
        .collect()
}

/// A loaded checkpoint's whole optimizer state, by name, after checking that it was laid out for
/// `params`' trainable parameters (failing, naming the first parameter that differs, otherwise).
///
/// A checkpoint of f32 weights resumed into a half-precision store has no master copy: its f32
/// weights become one (under the optimizer's name for it), so no precision is lost in the
/// conversion.
pub fn optimizer_state(params: &ParamStore, loaded: &Loaded) -> Result<HashMap<String, Vec<f32>>> {
    let layout = state_layout(params);
    let mut state = optimizer_state_for(layout.clone(), loaded)?;
    let name = if state.contains_key("adam.m") {
        "adam.master"
    } else {
        "sgd.master"
    };
    let f32_weights = layout.iter().all(|(n, _)| {
        loaded
            .model
            .get(n)
            .is_some_and(|t| t.dtype() == anneal_tensor::DType::F32)
    });
    if params.dtype() != anneal_tensor::DType::F32 && !state.contains_key(name) && f32_weights {
        let mut master = Vec::with_capacity(params.trainable_numel());
        for (n, _) in &layout {
            master.extend(loaded.model[n].to_vec_f32());
        }
        state.insert(name.to_string(), master);
    }
    Ok(state)
}

/// [`optimizer_state`] checked against the state layout `ours` (a split model's whole one,
/// [`whole_state_layout`]).
pub fn optimizer_state_for(
    ours: Vec<(String, usize)>,
    loaded: &Loaded,
) -> Result<HashMap<String, Vec<f32>>> {
    let state: HashMap<String, Vec<f32>> = loaded
        .optimizer
        .iter()
        .map(|(name, t)| (name.clone(), t.to_vec_f32()))
        .collect();
    let saved = &loaded.state.optimizer_layout;
    if !saved.is_empty() && *saved != ours {
        let at = saved.iter().zip(&ours).position(|(a, b)| a != b);
        let (a, b) = match at {
            Some(i) => (format!("{:?}", saved[i]), format!("{:?}", ours[i])),
            None => (
                format!("{} parameters", saved.len()),
                format!("{} parameters", ours.len()),
            ),
        };
        bail!(
            "{}: the optimizer state was saved for other trainable parameters (saved {a}, this \
             model trains {b}); resume with the same model and the same frozen parameters",
            loaded.dir.display()
        );
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_left_aside_by_an_interrupted_replacement_is_listed_again() {
        let root = tempfile::tempdir().unwrap();
        let aside = root.path().join(".step-000010.old");
        std::fs::create_dir_all(&aside).unwrap();
        std::fs::write(aside.join("trainer_state.json"), "{}").unwrap();
        std::fs::create_dir_all(root.path().join("step-000005")).unwrap();
        let steps: Vec<u64> = list(root.path()).into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, [5, 10]);
        assert!(root.path().join("step-000010/trainer_state.json").is_file());
        assert!(!aside.exists());
    }
}
