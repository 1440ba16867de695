//! Training for anneal, as the `anneal` binary drives it:
//!
//! * [`trainer`]: the `Trainer` (set-up/resume, `step`, `evaluate`, `save`) over a model, an
//!   objective, an optimizer, a strategy and a batch source;
//! * [`model`]: what the trainer asks of a model (`TrainModel`: parameters, forward, FLOPs);
//! * [`objectives`]: what a model is trained for (`Objective`; causal language modelling);
//! * [`strategy`]: how a step runs on the hardware (`Strategy`: one device, data parallelism,
//!   ZeRO-1/2/3, hybrid sharding, experts split beside data parallelism);
//! * [`mesh`]: the dp × tp × pp process groups of a job and the strategy wrapper that gathers a
//!   split model's checkpoints whole and cuts them back;
//! * [`pipeline`]: pipeline stages under GPipe and 1F1B;
//! * [`pretrain`]: a pretraining run over token shards: metrics, validation, loss-curve plot,
//!   checkpoint cadence, progress reported through a callback;
//! * [`eval`]: next-token negative log-likelihood over windows, the one evaluation behind the
//!   validation loss, `anneal eval` and the pipeline's perplexity signal;
//! * [`config`]: the TOML run configuration, every key overridable as `section.key=value`, and
//!   errors that name the key, the value and what is allowed;
//! * [`schedule`]: linear warm-up then cosine decay of the learning rate;
//! * [`checkpoint`]: checkpoint directories over the parameter store, the optimizer's and the
//!   objective's state, written atomically, verified on load, resumed exactly;
//! * [`generate`]: sampling with temperature, top-k and top-p over the model's KV cache;
//! * [`hf`]: Hugging Face GPT-2 export and import;
//! * [`hf_llama`]: Hugging Face Llama directories, exported and loaded;
//! * [`llama_gguf`]: Llama models, their tokenizers and chat templates from GGUF files;
//! * [`limoe`]: a LIMoE-style MoE encoder trained contrastively on Fashion-MNIST images and
//!   descriptions of their classes, with zero-shot accuracy and routing per modality;
//! * [`chat`]: chat templates rendered as transformers renders them;
//! * [`memory`]: the lower bound of a run's memory, checked against the machine's before
//!   anything is allocated;
//! * [`machine`]: the machine's f32 peak, thread settings and the process's memory high-water
//!   mark.
//!
//! This crate is the application layer between the libraries and the binary: its errors are
//! `anyhow` errors carrying the file, key or value at fault.

pub mod align;
pub mod bert_pretrain;
pub mod chat;
pub mod chat_sft;
pub mod checkpoint;
pub mod config;
pub mod eval;
pub mod finetune;
pub mod generate;
pub mod hf;
pub mod hf_bert;
pub mod hf_llama;
pub mod limoe;
pub mod llama_gguf;
pub mod machine;
pub mod memory;
pub mod mesh;
pub mod model;
pub mod objectives;
pub mod peft;
pub mod pipeline;
pub mod pretrain;
pub mod proxy;
pub mod schedule;
pub mod strategy;
pub mod trainer;
pub mod vision;

pub use config::RunConfig;
