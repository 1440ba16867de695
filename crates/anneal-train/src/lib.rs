//! Training runs for anneal, as the `anneal` binary drives them:
//!
//! * [`config`]: the TOML run configuration, every key overridable as `section.key=value`, and
//!   errors that name the key, the value and what is allowed;
//! * [`schedule`]: linear warm-up then cosine decay of the learning rate;
//! * [`trainer`]: the pretraining loop over memory-mapped token shards (micro-batches, gradient
//!   accumulation, AdamW, clipping, periodic validation, metrics, progress, loss-curve plot);
//! * [`checkpoint`]: checkpoint directories written atomically, verified on load, resumed exactly;
//! * [`generate`]: sampling with temperature, top-k and top-p over the model's KV cache;
//! * [`hf`]: Hugging Face GPT-2 export and import;
//! * [`machine`]: the machine's f32 peak and the process's memory high-water mark.
//!
//! This crate is the application layer between the libraries and the binary: its errors are
//! `anyhow` errors carrying the file, key or value at fault.

pub mod checkpoint;
pub mod config;
pub mod generate;
pub mod hf;
pub mod machine;
pub mod schedule;
pub mod trainer;

pub use config::RunConfig;
